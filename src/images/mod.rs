//! The image use cases: receive, validate, deduplicate, place, store, record, read, delete,
//! list. HTTP-free: the API layer turns these results into responses.

pub mod container;
pub mod cursor;
pub mod cut_through;
pub mod eager;
pub mod error;
pub mod filename;
pub mod format;
pub mod resume;
pub mod service;
pub mod spool;
pub mod store;
pub mod verify;
