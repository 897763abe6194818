//! Metadata: every fact about images, blobs and their copies (DESIGN invariant 1: the
//! metadata database is the source of truth).
//!
//! The store is split by concern, one trait a file, so a reader who wants "how is the queue
//! kept" opens one file:
//!
//! - [`ImageStore`] (`images.rs`): the rows clients see;
//! - [`CopyStore`] (`copies.rs`): blobs, their copies, and the locks dedup and deletion share;
//! - [`TaskQueue`] (`queue.rs`): the durable replication queue;
//! - [`JobCursors`] (`jobs.rs`): where resumable maintenance jobs stopped;
//! - [`AccountStore`] (`accounts.rs`): users, API keys, usage and the token secret.
//! - [`SingletonLocks`] (`singleton.rs`): which instance runs the jobs only one may run.
//! - [`VariantStore`] (`variants.rs`): variants of images and the queue that generates them.
//!
//! [`MetadataStore`] is all of them at once, over one connection pool; [`connect`] opens it.
//! [`cache::CachedMetadata`] wraps any of them with a Redis cache of image records
//! (`[redis] metadata_cache`); it implements every trait by delegation, so a method added to
//! a trait here must be added there too, with what it invalidates.
//! Postgres serves production and several instances; SQLite is the embedded default for one
//! instance. Both are one implementation, `sql/`, whose statements are written once; the few
//! places where the two databases differ are named in `sql/dialect.rs`. Both pass the same
//! behavioural suite (`tests/metadata.rs`). `docs/architecture.md` shows how to add a table.

mod accounts;
pub mod cache;
mod copies;
mod error;
mod images;
mod jobs;
mod model;
mod queue;
mod rows;
mod singleton;
mod sql;
mod variants;

use std::sync::Arc;

use async_trait::async_trait;

pub use accounts::{
    AccountStore, ApiKey, Limit, NewApiKey, NewUser, Quota, QuotaOverride, Role, Usage, User, UserCredentials,
};
pub use copies::{CopyDeletionGuard, CopyStore, MissingCopyGuard, UploadGuard};
pub use error::{MetaResult, MetadataError};
pub use images::ImageStore;
pub use jobs::JobCursors;
pub use model::{
    BlobCopies, CopyRef, DeletedImage, ImageOwner, ImageRecord, ListPosition, NewImage, NewVariant, QueueStats,
    Replica, ReplicaCounts, ReplicaState, ReplicationTask, ShardFailures, ShardUsage, TaskKind, VariantRecord,
    VariantState, VariantTask, Visibility,
};
pub use queue::TaskQueue;
pub use singleton::{SingletonLock, SingletonLocks};
pub use variants::{VariantRecorded, VariantStore};

use sql::SqlStore;
use sql::dialect::{Postgres, Sqlite};

/// The whole metadata store: every concern, over one pool. Every method is one transaction
/// unless it returns a guard, which holds its transaction until it commits or is dropped (a
/// drop rolls back).
#[async_trait]
pub trait MetadataStore:
    ImageStore + CopyStore + TaskQueue + JobCursors + AccountStore + SingletonLocks + VariantStore
{
    /// `"postgres"` or `"sqlite"`, for health output.
    fn backend_name(&self) -> &'static str;

    /// Applies this backend's migrations (`migrations/postgres` or `migrations/sqlite`).
    async fn migrate(&self) -> MetaResult<()>;

    /// Whether the migrations have created the store's tables: false for an empty database,
    /// which operator commands refuse rather than initialise.
    async fn is_initialised(&self) -> MetaResult<bool>;

    /// A trivial query, to tell whether the database answers.
    async fn ping(&self) -> MetaResult<()>;

    /// This store's id, created (a random UUID) the first time it is asked for; shards carry it
    /// in their labels (`storage/identity.rs`).
    async fn store_id(&self) -> MetaResult<String>;

    /// Delivers what this process holds that others need before it exits: the Redis cache's
    /// invalidations not delivered yet (`cache.rs`). Nothing for a database store alone.
    async fn before_exit(&self) {}
}

/// Opens the store a database URL names: `sqlite://PATH` (the file and its directory are
/// created if missing) or `postgres://…`.
pub async fn connect(url: &str) -> MetaResult<Arc<dyn MetadataStore>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqlStore::<Sqlite>::connect(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(SqlStore::<Postgres>::connect(url).await?))
    } else {
        Err(MetadataError::UnsupportedUrl(crate::redact::redact_url(url)))
    }
}
