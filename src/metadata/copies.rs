//! Blobs and their copies (DESIGN invariants 2 and 7): which shard holds which blob, in what
//! state, and the locks under which dedup, deletion and operator tools change that.
//!
//! Dedup and deletion decide under the same lock on the blob's row (invariant 7): an upload
//! that needs new bytes holds an [`UploadGuard`] while it records them, and a copy is removed
//! from a shard only while a [`CopyDeletionGuard`] is held. So no copy is deleted once a new
//! reference to its blob has been committed, and no upload records a copy that a deleter removed.

use async_trait::async_trait;

use super::variants::VariantRecorded;
use super::{BlobCopies, CopyRef, ImageRecord, MetaResult, NewImage, NewVariant, Replica, ReplicaCounts, ShardUsage};
use crate::blob::BlobKey;

#[async_trait]
pub trait CopyStore: Send + Sync {
    /// Locks the blob's row, creating it with no references (and `size`) if absent. While the
    /// guard lives no copy of this blob can be deleted, so the caller can check that the copy
    /// it wrote still exists and then commit.
    async fn lock_blob_for_upload(&self, blob: &BlobKey, size: u64) -> MetaResult<Box<dyn UploadGuard>>;

    /// Locks the blob's row to delete one copy. Returns `None` when the copy is no longer
    /// `Deleting`, or when the blob has references again: then a copy still `Deleting` (one an
    /// upload of the same bytes did not reuse, fenced at the time) is forgotten with its tasks
    /// once its fence has run out, its object left to scrub. Hold the guard while deleting the
    /// object, then commit it.
    async fn lock_copy_for_deletion(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>>;

    /// Read repair: a `Stored` copy found absent or corrupt becomes `Missing`, and a `Copy` task
    /// to restore it is queued, in one transaction. Copies in another state are left alone.
    /// Callers that saw the copy through a list that may be stale re-check it first, under
    /// [`CopyStore::lock_stored_copy`] (see `maintenance/suspicion.rs`).
    async fn record_missing_copy(&self, copy: &CopyRef) -> MetaResult<()>;

    /// Locks the blob's row to re-check a `Stored` copy suspected absent or corrupt. Returns
    /// `None`, changing nothing, unless the copy is recorded `Stored` (it may have moved or been
    /// marked since the caller looked). While the guard lives no upload, deletion or repair of
    /// the blob can change its copies, so the caller checks the object again and then either
    /// confirms (recording it `Missing`, repair queued) or drops the guard.
    async fn lock_stored_copy(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn MissingCopyGuard>>>;

    /// Records a copy that an operator tool wrote and verified as `Stored` (inserting or
    /// updating its row), and removes any `Copy` task for it; returns whether it is `Stored`
    /// now. If the blob has no reference left, the copy is recorded `Deleting` with a `Delete`
    /// task instead. If the blob has no row at all, nothing is recorded (there is no size to
    /// record it with): the object is an orphan for scrub. A copy whose deletion is in doubt
    /// is recorded `Missing`, as
    /// [`TaskQueue::complete_copy_task`](super::TaskQueue::complete_copy_task) does.
    async fn record_stored_copy(&self, copy: &CopyRef) -> MetaResult<bool>;

    /// A copy marked `Missing` whose bytes have since verified is `Stored` again, and its `Copy`
    /// task removed, under the blob's lock, but only while it is still `Missing`: a copy that
    /// was removed meanwhile (a rebalance's surplus) or changed state is left as it is, since
    /// the bytes that verified may be gone by now. Returns whether it was restored.
    async fn restore_missing_copy(&self, copy: &CopyRef) -> MetaResult<bool>;

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

    /// One blob and its copies, or `None` if it is not recorded.
    async fn find_blob_copies(&self, blob: &BlobKey) -> MetaResult<Option<BlobCopies>>;

    /// Up to `limit` blobs in key order, strictly after `after`, with their copies.
    async fn list_blob_copies(&self, after: Option<&BlobKey>, limit: u32) -> MetaResult<Vec<BlobCopies>>;

    /// Counts every copy by state: a query over the whole table, for reports and metrics, not
    /// for every request (see [`CopyStore::any_copy_overdue`]).
    async fn count_replicas_by_state(&self) -> MetaResult<ReplicaCounts>;

    /// Whether the store is below its replication factor somewhere for longer than replication
    /// normally takes: a copy `missing`, or `pending` for at least `pending_grace` (every
    /// upload's second copy is pending for a moment). Two index lookups, cheap enough for every
    /// health check.
    async fn any_copy_overdue(&self, pending_grace: std::time::Duration) -> MetaResult<bool>;

    /// Copies and bytes per shard and state.
    async fn shard_usage(&self) -> MetaResult<Vec<ShardUsage>>;

    /// Whether an earlier deletion of this copy has an unknown outcome and is still within its
    /// doubt window (see [`CopyDeletionGuard::leave_in_doubt`]): nothing may be written there yet.
    async fn deletion_in_doubt(&self, copy: &CopyRef) -> MetaResult<bool>;

    /// Referenced blobs that have at least one `Stored` copy, all of them on shards outside
    /// `known_shards` (the shards of the config): removing those shards would lose them. A
    /// blob with no `Stored` copy anywhere is lost already, not stranded, and is not counted.
    async fn count_stranded_blobs(&self, known_shards: &[String]) -> MetaResult<u64>;
}

/// Holds the lock on a blob's row during an upload; see [`CopyStore::lock_blob_for_upload`].
/// Dropping it rolls back.
#[async_trait]
pub trait UploadGuard: Send {
    /// Shards where a deletion of this blob's copy has an unknown outcome and is still within
    /// its doubt window: a copy written there may yet be removed by a late DELETE, so the
    /// upload must not count it (write elsewhere and list the shard as `Pending`).
    fn shards_in_doubt(&self) -> &[String];

    /// Records the given copies, adds a reference, records the image, and commits.
    ///
    /// Each listed copy takes the given state, except that a copy already `Stored` stays
    /// `Stored` when listed as `Pending`; each `Pending` copy gets a `Copy` task. Copies left
    /// `Deleting` by an earlier deletion and not listed are forgotten: their objects, if any
    /// remain, become orphans for scrub.
    async fn commit(self: Box<Self>, image: &NewImage, copies: &[Replica]) -> MetaResult<ImageRecord>;

    /// Like [`UploadGuard::commit`], for a generated variant instead of an image: records the
    /// copies, adds a reference, and records the variant (replacing, and releasing, an older
    /// one of the same name). Rolls back, returning `ImageGone`, if the image was deleted.
    async fn commit_variant(self: Box<Self>, variant: &NewVariant, copies: &[Replica]) -> MetaResult<VariantRecorded>;

    /// A DELETE of an object no row records (an orphan, the copy of a refused write) did not
    /// answer in time and may still land: records the copy on `shard` `Deleting`, fenced for
    /// `doubt` with a `Delete` task, and commits, so that no copy is written or counted there
    /// until it has settled (as [`CopyDeletionGuard::leave_in_doubt`] does for a recorded
    /// copy). A blob whose row this guard created is recorded without a reference.
    async fn fence_unrecorded_deletion(self: Box<Self>, shard: &str, doubt: std::time::Duration) -> MetaResult<()>;
}

/// Holds the lock on a blob's row while a suspect copy is checked again; see
/// [`CopyStore::lock_stored_copy`]. Dropping it rolls back.
#[async_trait]
pub trait MissingCopyGuard: Send {
    /// Records the copy `Missing`, queues its repair, and commits.
    async fn confirm_missing(self: Box<Self>) -> MetaResult<()>;
}

/// Holds the lock on a blob's row while one copy is deleted; see
/// [`CopyStore::lock_copy_for_deletion`] and [`CopyStore::lock_surplus_copy`]. Dropping it
/// rolls back.
#[async_trait]
pub trait CopyDeletionGuard: Send {
    /// Forgets the copy and every task for it, and the blob once it has no copy left, and
    /// commits.
    async fn commit(self: Box<Self>) -> MetaResult<()>;

    /// The deletion's outcome is unknown (it timed out, or failed in a way that may still have
    /// removed the object): keeps the copy as it is recorded, fences it for `doubt`, and
    /// commits, so that the lock is not released before the fence is in place.
    async fn leave_in_doubt(self: Box<Self>, doubt: std::time::Duration) -> MetaResult<()>;
}
