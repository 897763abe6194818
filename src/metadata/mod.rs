//! Metadata: every fact about images, blobs and their copies, behind one trait.
//!
//! The metadata database is the source of truth (DESIGN invariant 1). Postgres serves
//! production and several instances; SQLite is the embedded default for one instance. Both
//! implement [`MetadataStore`] and pass the same behavioural suite (`tests/metadata.rs`).
//!
//! Dedup and deletion decide under the same lock on the blob's row (invariant 7): an upload
//! that needs new bytes holds an [`UploadGuard`] while it records them, and a copy is removed
//! from a shard only while a [`CopyDeletionGuard`] is held. So no copy is deleted once a new
//! reference to its blob has been committed, and no upload records a copy that a deleter removed.

pub mod postgres;
mod rows;
pub mod sqlite;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::blob::BlobKey;

/// The state of one copy of a blob on one shard (invariant 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Intended but not yet written: replication will create it.
    Pending,
    /// Written and verified.
    Stored,
    /// Expected but found absent or corrupt: repair will restore it.
    Missing,
    /// The blob lost its last reference: this copy is waiting to be removed.
    Deleting,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Stored => "stored",
            ReplicaState::Missing => "missing",
            ReplicaState::Deleting => "deleting",
        }
    }

    pub fn parse(text: &str) -> Result<Self, MetadataError> {
        match text {
            "pending" => Ok(ReplicaState::Pending),
            "stored" => Ok(ReplicaState::Stored),
            "missing" => Ok(ReplicaState::Missing),
            "deleting" => Ok(ReplicaState::Deleting),
            other => Err(MetadataError::Corrupt(format!("unknown replica state {other:?}"))),
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One copy of a blob: which shard holds it, and in what state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub shard: String,
    pub state: ReplicaState,
}

/// One copy of one blob, as a unit of background work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRef {
    pub blob: BlobKey,
    pub shard: String,
}

/// An image about to be recorded. `created_at` must already be truncated to microseconds,
/// the precision both databases keep, so the record read back equals the one written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub id: Uuid,
    pub filename: String,
    pub content_type: String,
    pub file_size: u64,
    pub width: u32,
    pub height: u32,
    pub blob: BlobKey,
    pub created_at: DateTime<Utc>,
}

/// A recorded image with the copies of its blob (in shard-name order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub id: Uuid,
    pub filename: String,
    pub content_type: String,
    pub file_size: u64,
    pub width: u32,
    pub height: u32,
    pub blob: BlobKey,
    pub created_at: DateTime<Utc>,
    pub replicas: Vec<Replica>,
}

/// Where a page of the image list ends: the list is ordered by `(created_at, id)` descending,
/// and the next page starts strictly after this position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListPosition {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// What deleting an image did to its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedImage {
    pub blob: BlobKey,
    /// True when this was the blob's last reference: every copy is now `Deleting`.
    pub blob_unreferenced: bool,
}

/// What a replication task does to its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// Create (or restore) the copy from a stored holder, verify it, and record it `Stored`.
    Copy,
    /// Remove the copy of a blob that lost its last reference (under the blob's lock).
    Delete,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Copy => "copy",
            TaskKind::Delete => "delete",
        }
    }
}

/// One unit of background replication work, as claimed by a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationTask {
    pub id: i64,
    pub kind: TaskKind,
    pub copy: CopyRef,
    /// Failed attempts so far (a claim that expired because its worker died is not counted).
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// The replication queue at a glance, for `/api/v1/admin/replication` and health.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    pub copy_tasks: u64,
    pub delete_tasks: u64,
    /// Age of the oldest task (by creation), measured on the database's clock.
    pub oldest_task_age: Option<std::time::Duration>,
    /// Per target shard: tasks that have failed at least once.
    pub failing: Vec<ShardFailures>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFailures {
    pub shard: String,
    /// Tasks for this shard with at least one failed attempt.
    pub failing_tasks: u64,
    /// Failed attempts summed over those tasks.
    pub failed_attempts: u64,
    /// The most recent error recorded for this shard.
    pub last_error: Option<String>,
}

/// A blob and every recorded copy of it, for workers and operator tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobCopies {
    pub blob: BlobKey,
    pub size: u64,
    pub ref_count: u64,
    /// Sorted by shard name.
    pub replicas: Vec<Replica>,
}

/// Copies and bytes on one shard, by state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardUsage {
    pub shard: String,
    pub state: ReplicaState,
    pub copies: u64,
    pub bytes: u64,
}

/// How many copies are in each state, for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    pub pending: u64,
    pub stored: u64,
    pub missing: u64,
    pub deleting: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The database cannot be reached (connection refused or lost, pool timed out).
    #[error("the metadata database is unavailable while {context}")]
    Unavailable {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The database answered with an error.
    #[error("metadata query failed while {context}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A row holds a value this version cannot read.
    #[error("stored metadata is malformed: {0}")]
    Corrupt(String),
    #[error("applying metadata migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: expected sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
}

impl MetadataError {
    /// Sorts a driver error into unavailable (retry later, answer 503) or a query failure.
    pub fn from_sqlx(context: &'static str, source: sqlx::Error) -> Self {
        let unavailable = match &source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // Class 08 is "connection exception"; 57P0x are shutdowns; SQLITE_BUSY (5) and
            // SQLITE_LOCKED (6) mean another writer held the database past our busy timeout.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P") || code == "5" || code == "6"),
            _ => false,
        };
        if unavailable {
            MetadataError::Unavailable { context, source }
        } else {
            MetadataError::Query { context, source }
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, MetadataError::Unavailable { .. })
    }
}

pub type MetaResult<T> = Result<T, MetadataError>;

/// The metadata store. Every method is one transaction unless it returns a guard, which holds
/// its transaction until it commits or is dropped (a drop rolls back).
#[async_trait]
pub trait MetadataStore: Send + Sync {
    /// `"postgres"` or `"sqlite"`, for health output.
    fn backend_name(&self) -> &'static str;

    /// Applies this backend's migrations (`migrations/postgres` or `migrations/sqlite`).
    async fn migrate(&self) -> MetaResult<()>;

    /// A trivial query, to tell whether the database answers.
    async fn ping(&self) -> MetaResult<()>;

    /// The dedup path. If the image's blob is live (it has at least one reference and at least
    /// one `Stored` copy), adds a reference to it and records the image, in one transaction.
    /// Returns `None`, changing nothing, when the blob is absent or unreferenced.
    async fn insert_image_for_live_blob(&self, image: &NewImage) -> MetaResult<Option<ImageRecord>>;

    /// Locks the blob's row, creating it with no references (and `size`) if absent. While the
    /// guard lives no copy of this blob can be deleted, so the caller can check that the copy
    /// it wrote still exists and then commit.
    async fn lock_blob_for_upload(&self, blob: &BlobKey, size: u64) -> MetaResult<Box<dyn UploadGuard>>;

    async fn find_image(&self, id: Uuid) -> MetaResult<Option<ImageRecord>>;

    /// Up to `limit` images, newest first (`created_at` then `id`, both descending), starting
    /// strictly after `after`.
    async fn list_images(&self, limit: u32, after: Option<&ListPosition>) -> MetaResult<Vec<ImageRecord>>;

    /// Deletes the image and drops its reference to the blob. When that was the last reference,
    /// every copy of the blob becomes `Deleting` in the same transaction. `None` if no such image.
    async fn delete_image(&self, id: Uuid) -> MetaResult<Option<DeletedImage>>;

    /// Copies in state `Deleting`, oldest first.
    async fn copies_awaiting_deletion(&self, limit: u32) -> MetaResult<Vec<CopyRef>>;

    /// Locks the blob's row to delete one copy. Returns `None`, changing nothing, when the blob
    /// has references again or the copy is no longer `Deleting`. Hold the guard while deleting
    /// the object, then commit it.
    async fn lock_copy_for_deletion(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>>;

    /// Sets the state of an existing copy (the read path marks a copy `Missing`). A copy that
    /// is not recorded is left alone.
    async fn set_replica_state(&self, copy: &CopyRef, state: ReplicaState) -> MetaResult<()>;

    async fn count_replicas_by_state(&self) -> MetaResult<ReplicaCounts>;

    // ---- The replication queue (DESIGN invariant 3) -------------------------------------
    //
    // Tasks are rows committed in the same transaction as the change that needs them:
    // `UploadGuard::commit` queues a `Copy` task for every copy it records `Pending`;
    // `delete_image` queues a `Delete` task for every copy it marks `Deleting`;
    // `record_missing_copy` queues a `Copy` task to restore the copy. There is at most one task
    // per (blob, shard, kind): queueing one that exists makes it due now instead.
    //
    // A worker claims a due task for a lease; while the lease runs no other worker (in this
    // process or another one on the same Postgres, claimed with `FOR UPDATE SKIP LOCKED`) can
    // claim it. A worker that dies leaves its claim to expire. Every call that ends a task
    // checks the claim is still the caller's, and does nothing (returning `false`) if not.

    /// Claims the due task that has waited longest (`next_attempt_at <= now`, unclaimed or
    /// with an expired claim), for `lease`, on behalf of `worker`.
    async fn claim_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<ReplicationTask>>;

    /// Extends the caller's claim (a heartbeat during long copies). `false` if it was lost.
    async fn extend_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool>;

    /// A copy task succeeded: in one transaction, records the copy `Stored` and removes the
    /// task. If the blob has lost every reference meanwhile, the copy is recorded `Deleting`
    /// with a `Delete` task instead, so the new object is removed like the others.
    async fn complete_copy_task(&self, task: &ReplicationTask, worker: &str) -> MetaResult<bool>;

    /// Removes a task that is done or moot (a deletion carried out, a blob that no longer exists).
    async fn finish_task(&self, task: i64, worker: &str) -> MetaResult<bool>;

    /// Records a failed attempt: `attempts + 1`, the error, due again after `retry_after`, and
    /// the claim released. A task is never dropped for failing.
    async fn fail_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool>;

    /// Releases every claim `worker` holds (graceful shutdown), so other workers take them now.
    async fn release_claims(&self, worker: &str) -> MetaResult<u64>;

    /// Read repair: a `Stored` copy found absent or corrupt becomes `Missing`, and a `Copy` task
    /// to restore it is queued, in one transaction. Copies in another state are left alone.
    async fn record_missing_copy(&self, copy: &CopyRef) -> MetaResult<()>;

    async fn queue_stats(&self) -> MetaResult<QueueStats>;

    // ---- Operator tools: rebalance, scrub, drain -------------------------------------------

    /// One blob and its copies, or `None` if it is not recorded.
    async fn find_blob_copies(&self, blob: &BlobKey) -> MetaResult<Option<BlobCopies>>;

    /// Up to `limit` blobs in key order, strictly after `after`, with their copies.
    async fn list_blob_copies(&self, after: Option<&BlobKey>, limit: u32) -> MetaResult<Vec<BlobCopies>>;

    /// Records a copy that an operator tool wrote and verified as `Stored` (inserting or
    /// updating its row), and removes any `Copy` task for it. If the blob has no reference
    /// left, the copy is recorded `Deleting` with a `Delete` task instead and `false` is
    /// returned. If the blob has no row at all, nothing is recorded (there is no size to record
    /// it with) and `false` is returned: the object is an orphan for scrub.
    async fn record_stored_copy(&self, copy: &CopyRef) -> MetaResult<bool>;

    /// Locks the blob's row to remove a surplus copy (one on a shard outside `keep`, the
    /// blob's current write set). Returns `None`, changing nothing, unless the copy is recorded,
    /// its shard is not in `keep`, `keep` is not empty, and every shard in `keep` holds a
    /// `Stored` copy: a copy is never removed before its replacements are recorded. Hold the
    /// guard while deleting the object, then commit it (which forgets the copy and any task
    /// for it).
    async fn lock_surplus_copy(
        &self,
        copy: &CopyRef,
        keep: &[String],
    ) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>>;

    /// Copies and bytes per shard and state.
    async fn shard_usage(&self) -> MetaResult<Vec<ShardUsage>>;

    /// Referenced blobs that have at least one `Stored` copy, all of them on shards outside
    /// `known_shards` (the shards of the config): removing those shards would lose them. A
    /// blob with no `Stored` copy anywhere is lost already, not stranded, and is not counted.
    async fn count_stranded_blobs(&self, known_shards: &[String]) -> MetaResult<u64>;

    /// Where a resumable job (`"rebalance"`, `"scrub"`) stopped; `None` if it has not started
    /// or finished.
    async fn load_job_cursor(&self, job: &str) -> MetaResult<Option<BlobKey>>;

    /// Saves (or, with `None`, clears) a job's position.
    async fn save_job_cursor(&self, job: &str, cursor: Option<&BlobKey>) -> MetaResult<()>;
}

/// Holds the lock on a blob's row during an upload; see [`MetadataStore::lock_blob_for_upload`].
#[async_trait]
pub trait UploadGuard: Send {
    /// Records the given copies, adds a reference, records the image, and commits.
    ///
    /// Each listed copy takes the given state, except that a copy already `Stored` stays
    /// `Stored` when listed as `Pending`. Copies left `Deleting` by an earlier deletion and not
    /// listed are forgotten: their objects, if any remain, become orphans for scrub.
    async fn commit(self: Box<Self>, image: &NewImage, copies: &[Replica]) -> MetaResult<ImageRecord>;
}

/// Holds the lock on a blob's row while one copy is deleted; see
/// [`MetadataStore::lock_copy_for_deletion`].
#[async_trait]
pub trait CopyDeletionGuard: Send {
    /// Forgets the copy and every task for it, and the blob once it has no copy left, and
    /// commits.
    async fn commit(self: Box<Self>) -> MetaResult<()>;
}

/// Opens the store a database URL names: `sqlite://PATH` (the file and its directory are
/// created if missing) or `postgres://…`.
pub async fn connect(url: &str) -> MetaResult<Arc<dyn MetadataStore>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PostgresStore::connect(url).await?))
    } else {
        Err(MetadataError::UnsupportedUrl(url.to_owned()))
    }
}
