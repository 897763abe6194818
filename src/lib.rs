//! Chitram: an image-hosting HTTP API over a sharded, replicated object store.
//!
//! Dependencies point one way (see DESIGN.md):
//! `api` → `images` → `storage::router` → storage backends, with `images` also using
//! `metadata`, and the router using `placement`. `app` assembles them; `main` is a thin CLI.

pub mod accounts;
pub mod api;
pub mod app;
pub mod blob;
pub mod commands;
pub mod config;
pub mod images;
pub mod instance_lock;
pub mod maintenance;
pub mod metadata;
pub mod observability;
pub mod placement;
pub mod ratelimit;
pub mod redact;
pub mod redis_link;
pub mod replication;
pub mod storage;
pub mod telemetry;
pub mod variants;
pub mod web;
