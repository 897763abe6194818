//! The replication queue (DESIGN invariant 3).
//!
//! Tasks are rows committed in the same transaction as the change that needs them:
//! [`UploadGuard::commit`](super::UploadGuard::commit) queues a `Copy` task for every copy it
//! records `Pending`; [`delete_image`](super::ImageStore::delete_image) queues a `Delete` task
//! for every copy it marks `Deleting`; [`record_missing_copy`](super::CopyStore::record_missing_copy)
//! queues a `Copy` task to restore the copy. There is at most one task per (blob, shard,
//! kind): queueing one that exists makes it due now instead.
//!
//! A worker claims a due task for a lease; while the lease runs no other worker (in this
//! process or another one on the same Postgres, claimed with `FOR UPDATE SKIP LOCKED`) can
//! claim it. A worker that dies leaves its claim to expire. Every call that ends a task
//! checks the claim is still the caller's, and does nothing (returning `false`) if not.

use std::time::Duration;

use async_trait::async_trait;

use super::{CopyRef, MetaResult, QueueStats, ReplicationTask};

#[async_trait]
pub trait TaskQueue: Send + Sync {
    /// Claims the due task that has waited longest (`next_attempt_at <= now`, unclaimed or
    /// with an expired claim), for `lease`, on behalf of `worker`.
    async fn claim_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<ReplicationTask>>;

    /// Claims the `Copy` task of one copy, if it is queued and nobody holds it: how an upload
    /// that still has its bytes makes the copy itself right after its commit
    /// (`images/eager.rs`), instead of leaving it to a worker that would read it back from
    /// the first copy. `None` when there is no such task or another worker holds it.
    async fn claim_copy_task(
        &self,
        copy: &CopyRef,
        worker: &str,
        lease: Duration,
    ) -> MetaResult<Option<ReplicationTask>>;

    /// Tasks due now, claimed or not, counted up to `cap`: how many workers the queue could
    /// keep busy (claimed ones count, or a pool busy on a deep queue would shrink mid-burst).
    /// Bounded so that sampling a deep queue every second stays cheap.
    async fn count_due_tasks(&self, cap: u64) -> MetaResult<u64>;

    /// Extends the caller's claim (a heartbeat during long copies). `false` if it was lost.
    async fn extend_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool>;

    /// A copy task succeeded: in one transaction, records the copy `Stored` and removes the
    /// task. If the blob has lost every reference meanwhile, the copy is recorded `Deleting`
    /// with a `Delete` task instead, so the new object is removed like the others; and if a
    /// deletion of that copy is in doubt (fenced since the write began), `Missing` with its
    /// repair queued, since the late DELETE may yet remove it.
    async fn complete_copy_task(&self, task: &ReplicationTask, worker: &str) -> MetaResult<bool>;

    /// Removes a task that is done or moot (a deletion carried out, a blob that no longer exists).
    async fn finish_task(&self, task: i64, worker: &str) -> MetaResult<bool>;

    /// Records a failed attempt: `attempts + 1`, the error, due again after `retry_after`, and
    /// the claim released. A task is never dropped for failing.
    async fn fail_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool>;

    /// Releases every claim `worker` holds (graceful shutdown), so other workers take them now.
    async fn release_claims(&self, worker: &str) -> MetaResult<u64>;

    async fn queue_stats(&self) -> MetaResult<QueueStats>;
}
