//! Removing the copies of blobs that lost their last reference.
//!
//! The decision to delete is durable: `delete_image` marks every copy `Deleting` in the same
//! transaction that drops the last reference. This module carries it out, right after the
//! delete and again from a periodic sweep, so a copy on a shard that was down is removed once
//! the shard is back. Each copy is removed under the blob's lock (see `metadata`), so an upload
//! of the same bytes racing with the deletion never ends up pointing at a deleted copy.

use std::time::Duration;

use crate::blob::BlobKey;
use crate::metadata::{CopyRef, MetadataStore};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// How many copies one sweep pass handles.
const SWEEP_BATCH: u32 = 100;

/// What one attempt to delete a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeletionOutcome {
    Deleted,
    /// The blob is referenced again, or another worker already removed the copy.
    NoLongerWanted,
    /// The shard or the database failed; the copy stays `Deleting` for a later sweep.
    Failed(String),
}

/// Deletes one copy: lock, delete the object, forget the copy, commit.
pub async fn try_delete_copy(metadata: &dyn MetadataStore, router: &StorageRouter, copy: &CopyRef) -> DeletionOutcome {
    let guard = match metadata.lock_copy_for_deletion(copy).await {
        Ok(Some(guard)) => guard,
        Ok(None) => return DeletionOutcome::NoLongerWanted,
        Err(error) => return DeletionOutcome::Failed(error.to_string()),
    };
    if let Err(error) = router.delete_on(&copy.shard, &copy.blob).await {
        return DeletionOutcome::Failed(error_chain(&error));
    }
    match guard.commit().await {
        Ok(()) => DeletionOutcome::Deleted,
        Err(error) => DeletionOutcome::Failed(error.to_string()),
    }
}

/// Deletes every copy of an unreferenced blob, logging the ones that must wait for the sweep.
pub async fn delete_copies_of(metadata: &dyn MetadataStore, router: &StorageRouter, blob: &BlobKey) {
    for shard in router.shards().iter().map(|shard| shard.name.clone()) {
        let copy = CopyRef { blob: blob.clone(), shard };
        if let DeletionOutcome::Failed(reason) = try_delete_copy(metadata, router, &copy).await {
            tracing::warn!(blob = %copy.blob, shard = %copy.shard, %reason, "copy left for the deletion sweep");
        }
    }
}

/// One pass over the copies awaiting deletion. Returns how many were deleted.
pub async fn sweep_once(metadata: &dyn MetadataStore, router: &StorageRouter) -> usize {
    let copies = match metadata.copies_awaiting_deletion(SWEEP_BATCH).await {
        Ok(copies) => copies,
        Err(error) => {
            tracing::warn!(%error, "deletion sweep could not read its work");
            return 0;
        }
    };
    let mut deleted = 0;
    for copy in &copies {
        match try_delete_copy(metadata, router, copy).await {
            DeletionOutcome::Deleted => deleted += 1,
            DeletionOutcome::NoLongerWanted => {}
            DeletionOutcome::Failed(reason) => {
                tracing::debug!(blob = %copy.blob, shard = %copy.shard, %reason, "deletion deferred")
            }
        }
    }
    deleted
}

/// Runs the sweep forever, every `interval`.
pub async fn run_sweeper(
    metadata: std::sync::Arc<dyn MetadataStore>,
    router: std::sync::Arc<StorageRouter>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let deleted = sweep_once(metadata.as_ref(), &router).await;
        if deleted > 0 {
            tracing::info!(deleted, "deletion sweep removed copies");
        }
    }
}
