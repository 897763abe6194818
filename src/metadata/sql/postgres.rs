//! The store's source (`store/`) compiled for Postgres; see `mod.rs`.

type D = super::dialect::Postgres;

#[path = "store/accounts.rs"]
mod accounts;
#[path = "store/copies.rs"]
mod copies;
#[path = "store/images.rs"]
mod images;
#[path = "store/jobs.rs"]
mod jobs;
#[path = "store/queue.rs"]
mod queue;
#[path = "store/variants.rs"]
mod variants;
#[path = "store/whole.rs"]
mod whole;
