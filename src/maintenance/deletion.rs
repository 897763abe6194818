//! Removing the copies of blobs that lost their last reference.
//!
//! The decision to delete is durable: `delete_image` marks every copy `Deleting` and queues a
//! `Delete` task per copy in the same transaction that drops the last reference. The copies are
//! removed right after the delete, and whatever fails then (a shard that is down) is retried by
//! the replication workers from the queue. Each copy is removed under the blob's lock (see
//! `metadata`), so an upload of the same bytes racing with the deletion never ends up pointing
//! at a deleted copy.
//!
//! A DELETE that does not answer within its deadline (the router's `control_deadline_ms`, so
//! the lock never waits long on a slow shard) is not over: the shard may still carry it out
//! later, after the lock is released. Such a copy is fenced for [`DELETION_DOUBT`] in the
//! same transaction that releases the lock (`CopyDeletionGuard::leave_in_doubt`): uploads of
//! the same bytes write elsewhere meanwhile, replication does not copy onto it, and the next
//! attempt to delete it waits until the fence has expired, so a late DELETE can never remove a
//! copy recorded as stored after it. A DELETE that failed with an answer is over: it is retried.
//!
//! The same holds for an object no row records (an orphan, a refused write's copy): its DELETE
//! runs under the blob's upload lock, and one that times out records the copy `deleting` with
//! the fence and a task. And a DELETE must not be dropped between being sent and being fenced:
//! callers that can be cancelled (a request, a worker, an eager copy) run it detached
//! ([`StorageRouter::spawn_detached`]), and `serve` waits for those before it exits.

use std::sync::Arc;
use std::time::Duration;

use crate::blob::BlobKey;
use crate::metadata::{CopyDeletionGuard, CopyRef, MetaResult, MetadataStore, ReplicaState};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// How long a deletion whose outcome is unknown fences its copy: longer than a request to a
/// shard can live (the S3 client gives up on an operation after `timeout_secs`, 60 by default),
/// so that by then a DELETE still in flight has landed or died.
pub const DELETION_DOUBT: Duration = Duration::from_secs(180);

/// What one attempt to delete a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeletionOutcome {
    Deleted,
    /// The blob is referenced again, or another worker already removed the copy.
    NoLongerWanted,
    /// The shard or the database failed; the copy stays `Deleting`, its task queued for a retry.
    Failed(String),
}

/// Refuses a copy onto `copy.shard` while a deletion of the same bytes whose DELETE did not
/// answer in time may still land there (see the module documentation): a copy written and
/// recorded now could vanish when it does. Every writer of a copy other than an upload (which
/// writes elsewhere instead) asks this first: replication, eager copies, rebalance and scrub's
/// restores.
pub async fn refuse_while_deletion_in_doubt(metadata: &dyn MetadataStore, copy: &CopyRef) -> Result<(), String> {
    if metadata.deletion_in_doubt(copy).await.map_err(|e| error_chain(&e))? {
        return Err(format!(
            "an earlier DELETE of this copy on {} may still land; copying once it has settled",
            copy.shard
        ));
    }
    Ok(())
}

/// Deletes one copy: lock, delete the object, forget the copy, commit.
pub async fn try_delete_copy(metadata: &dyn MetadataStore, router: &StorageRouter, copy: &CopyRef) -> DeletionOutcome {
    match metadata.deletion_in_doubt(copy).await {
        Ok(false) => {}
        Ok(true) => {
            return DeletionOutcome::Failed("an earlier DELETE of this copy may still land; waiting for it".to_owned());
        }
        Err(error) => return DeletionOutcome::Failed(error.to_string()),
    }
    let guard = match metadata.lock_copy_for_deletion(copy).await {
        Ok(Some(guard)) => guard,
        Ok(None) => return DeletionOutcome::NoLongerWanted,
        Err(error) => return DeletionOutcome::Failed(error.to_string()),
    };
    match delete_locked_copy(router, guard, &copy.shard, &copy.blob).await {
        Ok(()) => DeletionOutcome::Deleted,
        Err(problem) => DeletionOutcome::Failed(problem),
    }
}

/// Deletes one object while `guard` holds its blob's lock, then commits the guard: the copy is
/// forgotten once deleted, or fenced when the DELETE did not answer within its deadline (see
/// the module documentation).
pub async fn delete_locked_copy(
    router: &StorageRouter,
    guard: Box<dyn CopyDeletionGuard>,
    shard: &str,
    key: &BlobKey,
) -> Result<(), String> {
    match router.delete_on(shard, key).await {
        Ok(()) => guard.commit().await.map_err(|error| error_chain(&error)),
        Err(error) if error.is_deadline_exceeded() => {
            let problem = format!("{}; the copy is fenced while the DELETE may still land", error_chain(&error));
            match guard.leave_in_doubt(DELETION_DOUBT).await {
                Ok(()) => Err(problem),
                Err(error) => Err(format!("{problem}, but fencing it failed: {}", error_chain(&error))),
            }
        }
        Err(error) => Err(error_chain(&error)),
    }
}

/// Deletes an object no copy row records (an orphan, or the copy of an upload that was refused)
/// while holding the blob's upload lock, after checking again that no row records it: an
/// upload of the same bytes about to commit waits for the lock, then finds its copy gone and
/// writes it again. A DELETE that does not answer within the router's control deadline is
/// fenced like a recorded copy's (`UploadGuard::fence_unrecorded_deletion`): the copy is
/// recorded `deleting` with a fence and a task, so that no upload counts the shard while the
/// DELETE may still land, and the workers delete it again once it has settled. Returns whether
/// the object was deleted.
pub async fn delete_unrecorded_object(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    shard: &str,
    key: &BlobKey,
    len: u64,
) -> MetaResult<bool> {
    let guard = metadata.lock_blob_for_upload(key, len).await?;
    let recorded =
        metadata.find_blob_copies(key).await?.is_some_and(|blob| blob.replicas.iter().any(|r| r.shard == shard));
    if recorded {
        return Ok(false);
    }
    match router.delete_on(shard, key).await {
        Ok(()) => Ok(true), // The guard rolls back as it drops: the lock was all it was for.
        Err(error) if error.is_deadline_exceeded() => {
            guard.fence_unrecorded_deletion(shard, DELETION_DOUBT).await?;
            tracing::warn!(%shard, %key, error = %error_chain(&error),
                "an unrecorded object's DELETE may still land; fenced, and queued to delete again");
            Ok(false)
        }
        Err(error) => {
            tracing::warn!(%shard, %key, error = %error_chain(&error), "could not delete an unrecorded object; scrub will");
            Ok(false)
        }
    }
}

/// [`delete_unrecorded_object`] in a task of its own ([`StorageRouter::spawn_detached`]), for
/// callers that may be cancelled mid-DELETE (a request whose client leaves, an eager copy at
/// a stop): the DELETE still ends answered or fenced.
pub async fn delete_unrecorded_object_detached(
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    shard: String,
    key: BlobKey,
    len: u64,
) -> MetaResult<bool> {
    let detached = router.clone();
    let deletion = detached
        .spawn_detached(async move { delete_unrecorded_object(metadata.as_ref(), &router, &shard, &key, len).await });
    deletion.await.unwrap_or_else(|error| {
        tracing::warn!(%error, "deleting an unrecorded object stopped; scrub will");
        Ok(false)
    })
}

/// A copy just written whose task was gone when it was to be recorded: most often its image
/// was deleted meanwhile, and the deletion found no object to remove yet. If the blob has no
/// reference left, the object is removed under the blob's lock (unless a row records it by
/// then), so a deleted image leaves no orphan waiting for scrub. A blob referenced again keeps
/// the object: the upload or worker that wants it records it. Used by the replication workers
/// and the eager copies.
pub async fn remove_if_unwanted(metadata: Arc<dyn MetadataStore>, router: Arc<StorageRouter>, copy: &CopyRef) {
    let unwanted = match metadata.find_blob_copies(&copy.blob).await {
        Ok(blob) => blob.is_none_or(|blob| blob.ref_count == 0),
        Err(_) => false, // Scrub collects it if it is an orphan.
    };
    if !unwanted {
        return;
    }
    // Its length, for the blob's row if it has none left.
    let Ok(len) = router.fetch_len_on(&copy.shard, &copy.blob).await else { return };
    let removed = delete_unrecorded_object_detached(metadata, router, copy.shard.clone(), copy.blob.clone(), len).await;
    if let Err(error) = removed {
        tracing::warn!(shard = %copy.shard, blob = %copy.blob, error = %error_chain(&error), "an unwanted copy is left for scrub");
    }
}

/// Deletes every copy of an unreferenced blob, logging the ones left for the workers.
pub async fn delete_copies_of(metadata: &dyn MetadataStore, router: &StorageRouter, blob: &BlobKey) {
    // The recorded copies, not every configured shard: one query instead of a locking
    // transaction per shard, and copies on shards gone from the config are covered too.
    let copies = match metadata.find_blob_copies(blob).await {
        Ok(Some(copies)) => copies.replicas,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%blob, %error, "copies left for the replication workers");
            return;
        }
    };
    for replica in copies.into_iter().filter(|r| r.state == ReplicaState::Deleting) {
        let copy = CopyRef { blob: blob.clone(), shard: replica.shard };
        if let DeletionOutcome::Failed(reason) = try_delete_copy(metadata, router, &copy).await {
            tracing::warn!(blob = %copy.blob, shard = %copy.shard, %reason, "copy left for the replication workers");
        }
    }
}
