//! Storing new bytes as a blob: write the copies, then record them under the blob's lock.
//! Shared by uploads (which record an image) and variants (which record a variant): each
//! passes the commit that records what refers to the blob.

use std::sync::Arc;

use futures::future::{BoxFuture, join_all};
use tracing::Instrument;

use super::cut_through::{CUT_THROUGH_MIN, PendingWrite};
use super::error::{ImageError, Result};
use crate::blob::BlobKey;
use crate::maintenance::deletion;
use crate::metadata::{
    ImageRecord, MetaResult, MetadataError, MetadataStore, Replica, ReplicaState, UploadGuard, VariantRecorded,
};
use crate::observability::stages::{Purpose, Stage, StageClock};
use crate::storage::BlobBody;
use crate::storage::StorageError;
use crate::storage::router::{RouterError, StorageRouter, WriteReceipt};

/// How often a write retries when a concurrent deletion removed the copy it had just written
/// (see [`BlobWriter::store`]). Each retry needs another deletion racing with it.
const STORE_ATTEMPTS: usize = 3;

/// The commit of a blob's new bytes: given the held lock and the copies to record, records
/// them with whatever refers to the blob, and commits.
pub type Commit<T> = Box<dyn FnMut(Box<dyn UploadGuard>, Vec<Replica>) -> BoxFuture<'static, MetaResult<T>> + Send>;

/// What a commit tells the writer: whether it recorded the bytes. One that did not (the image
/// a variant was made for was deleted while the variant's bytes were written) leaves the
/// copies just written unrecorded, and the writer removes them at once rather than leave them
/// to scrub as orphans.
pub trait CommitOutcome {
    fn recorded_the_bytes(&self) -> bool;
}

impl CommitOutcome for ImageRecord {
    fn recorded_the_bytes(&self) -> bool {
        true
    }
}

impl CommitOutcome for VariantRecorded {
    fn recorded_the_bytes(&self) -> bool {
        *self == VariantRecorded::Recorded
    }
}

#[derive(Clone)]
pub struct BlobWriter {
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    /// Copies stored before a write is acknowledged (`placement.write_quorum`).
    write_quorum: usize,
}

impl BlobWriter {
    pub fn new(metadata: Arc<dyn MetadataStore>, router: Arc<StorageRouter>, write_quorum: usize) -> Self {
        Self { metadata, router, write_quorum }
    }

    /// Opens a cut-through write of `len` bytes under `key` to the write quorum's shards (see
    /// [`super::cut_through`]), when it can pay: a body of at least [`CUT_THROUGH_MIN`] bytes,
    /// and the first `write_quorum` shards of the blob's preference list up. Whether the bytes
    /// are already stored is looked up meanwhile: if they are, the stream is given up (the
    /// upload will be deduplicated, and the shards would drop the bytes).
    pub fn start_cut_through(&self, key: BlobKey, len: u64) -> Option<PendingWrite> {
        if len < CUT_THROUGH_MIN {
            return None;
        }
        let pending = PendingWrite::start(&self.router, key.clone(), len, self.write_quorum)?;
        let (metadata, cancel) = (self.metadata.clone(), pending.canceller());
        let span = tracing::info_span!("metadata_query", operation = "blob_is_live");
        // Not awaited by the upload: the first chunks go out meanwhile. A failed lookup leaves
        // the decision to the upload's own dedup lookup.
        tokio::spawn(
            async move {
                if metadata.blob_is_live(&key).await.unwrap_or(false) {
                    tracing::debug!(blob = %key, "the bytes are already stored: the cut-through write is given up");
                    cancel();
                }
            }
            .instrument(span),
        );
        Some(pending)
    }

    /// Writes the bytes, then records them under the blob's lock through `commit`.
    ///
    /// The write happens before the lock so that a slow upload does not hold it. Meanwhile a
    /// deletion of the same blob (its last reference going away) may remove a copy just
    /// written; deletions hold the same lock while they remove a copy, so once the lock is ours
    /// a check that the copies exist is final, and the commit makes the blob referenced again.
    ///
    /// The writes have the router's write deadline, and the check under the lock its short
    /// control deadline (DESIGN invariant 4). A copy the check cannot confirm in time is never
    /// recorded: the lock is released and the next attempt writes to other shards.
    ///
    /// A cut-through upload passes its `streamed` write, which is the first attempt's write
    /// (see [`super::cut_through`]): the copies it stored count, and the rest of the quorum is
    /// written from `body`.
    ///
    /// Each stage's time is recorded under `purpose` (see [`crate::observability::stages`]).
    pub async fn store<T: CommitOutcome>(
        &self,
        purpose: Purpose,
        blob: &BlobKey,
        size: u64,
        body: &BlobBody,
        mut streamed: Option<PendingWrite>,
        mut commit: Commit<T>,
    ) -> Result<T> {
        let mut unconfirmed: Vec<(String, StorageError)> = Vec::new();
        // Shards where an earlier deletion of these bytes may still land (see
        // `maintenance/deletion.rs`): a copy written there could vanish after the commit.
        let mut in_doubt: Vec<String> = Vec::new();
        for _ in 0..STORE_ATTEMPTS {
            let avoid: Vec<String> =
                unconfirmed.iter().map(|(shard, _)| shard.clone()).chain(in_doubt.clone()).collect();
            let mut clock = StageClock::start(purpose);
            let receipt = match streamed.take() {
                Some(pending) => {
                    let streamed = pending.complete(blob, size, self.router.deadlines().write_for(size)).await;
                    self.top_up(blob, size, body, streamed, &avoid).await?
                }
                None => self.write_copies(blob, size, body, self.write_quorum, &avoid).await?,
            };
            clock.finish(Stage::Write);
            let span = tracing::info_span!("metadata_query", operation = "lock_blob_for_upload");
            let guard = match self.metadata.lock_blob_for_upload(blob, size).instrument(span).await {
                Ok(guard) => guard,
                Err(error) => {
                    self.remove_unrecorded_copies(&receipt.stored, blob, size).await;
                    return Err(error.into());
                }
            };
            clock.finish(Stage::Lock);
            let doubtful: Vec<String> =
                receipt.stored.iter().filter(|shard| guard.shards_in_doubt().contains(shard)).cloned().collect();
            if !doubtful.is_empty() {
                drop(guard);
                tracing::warn!(%blob, shards = ?doubtful, "a deletion of these bytes may still land there; writing elsewhere");
                in_doubt.extend(doubtful);
                continue;
            }
            let confirmation = self.copies_still_exist(&receipt, blob, size).await;
            clock.finish(Stage::Confirm);
            match confirmation {
                Confirmation::Confirmed => {
                    let committed = match commit(guard, copies_after_write(&receipt)).await {
                        Ok(committed) => committed,
                        // A concurrent upload of the same owner took the room left: what was
                        // written for this one goes, and nothing was recorded.
                        Err(MetadataError::QuotaExceeded) => {
                            self.remove_unrecorded_copies(&receipt.stored, blob, size).await;
                            return Err(ImageError::QuotaExceeded("checked as the image was recorded".into()));
                        }
                        Err(error) => return Err(error.into()),
                    };
                    clock.finish(Stage::Commit);
                    if committed.recorded_the_bytes() {
                        tracing::info!(%blob, shards = ?receipt.stored, "stored a new blob");
                    } else {
                        self.remove_unrecorded_copies(&receipt.stored, blob, size).await;
                    }
                    return Ok(committed);
                }
                Confirmation::Gone => {
                    tracing::warn!(%blob, "a copy just written is gone (a concurrent deletion); writing again");
                }
                Confirmation::Unconfirmed(shard, error) => {
                    drop(guard);
                    tracing::warn!(%shard, %blob, %error, "could not confirm a copy in time; writing elsewhere");
                    unconfirmed.push((shard, error));
                }
            }
        }
        if !unconfirmed.is_empty() {
            let error =
                RouterError::NoShardAvailable { operation: "confirm", key: blob.clone(), attempts: unconfirmed };
            return Err(ImageError::StorageUnavailable(error));
        }
        Err(ImageError::Internal {
            context: "storing the blob: its copy kept disappearing",
            source: format!("{STORE_ATTEMPTS} attempts raced with deletions").into(),
        })
    }

    /// Writes `copies` copies through the router; a refused write removes what it did write.
    async fn write_copies(
        &self,
        blob: &BlobKey,
        size: u64,
        body: &BlobBody,
        copies: usize,
        avoid: &[String],
    ) -> Result<WriteReceipt> {
        match self.router.write_copies(blob, body, copies, avoid).await {
            Ok(receipt) => Ok(receipt),
            Err(error) => {
                self.remove_refused_copies(&error, blob, size).await;
                Err(ImageError::StorageUnavailable(error))
            }
        }
    }

    /// Completes a write quorum that a cut-through write reached only in part: the copies it
    /// lacks are written from `body` to other shards (a shard whose stream failed may take
    /// its copy now, through its breaker). A quorum still short removes every copy written,
    /// the streamed ones too.
    async fn top_up(
        &self,
        blob: &BlobKey,
        size: u64,
        body: &BlobBody,
        streamed: WriteReceipt,
        avoid: &[String],
    ) -> Result<WriteReceipt> {
        let missing = self.write_quorum.saturating_sub(streamed.stored.len());
        if missing == 0 {
            return Ok(streamed);
        }
        let avoid: Vec<String> = avoid.iter().chain(&streamed.stored).cloned().collect();
        let written = match self.router.write_copies(blob, body, missing, &avoid).await {
            Ok(written) => written,
            Err(error) => {
                let error = error.with_earlier_copies(&streamed.stored, self.write_quorum);
                self.remove_refused_copies(&error, blob, size).await;
                return Err(ImageError::StorageUnavailable(error));
            }
        };
        let stored: Vec<&str> = streamed.stored.iter().chain(&written.stored).map(String::as_str).collect();
        Ok(WriteReceipt { stored: self.router.stored_in_read_order(blob, &stored), write_set: written.write_set })
    }

    /// A write refused for want of enough shards removes the copies it did write before it
    /// answers, so a refused request leaves nothing behind. Best effort: a copy that cannot be
    /// removed now (the database or its shard down) is an orphan that scrub collects.
    async fn remove_refused_copies(&self, error: &RouterError, blob: &BlobKey, size: u64) {
        let RouterError::QuorumNotReached { written, .. } = error else { return };
        self.remove_unrecorded_copies(written, blob, size).await;
    }

    /// Removes copies written for bytes that will not be recorded. Best effort, like
    /// [`Self::remove_refused_copies`]: what cannot be removed now is an orphan scrub collects.
    async fn remove_unrecorded_copies(&self, written: &[String], blob: &BlobKey, size: u64) {
        for shard in written {
            let (metadata, router) = (self.metadata.clone(), self.router.clone());
            let removed =
                deletion::delete_unrecorded_object_detached(metadata, router, shard.clone(), blob.clone(), size).await;
            if let Err(error) = removed {
                tracing::warn!(%shard, %blob, %error, "a refused write's copy is left for scrub");
            }
        }
    }

    /// Checks, under the blob's lock, that every copy just written is there, each check bounded
    /// by the router's control deadline. The checks run at once: a write quorum of two holds
    /// the lock for one round trip, not two.
    async fn copies_still_exist(&self, receipt: &WriteReceipt, blob: &BlobKey, size: u64) -> Confirmation {
        let checks = join_all(receipt.stored.iter().map(|shard| self.router.fetch_len_on(shard, blob))).await;
        for (shard, check) in receipt.stored.iter().zip(checks) {
            match check {
                Ok(len) if len == size => {}
                Ok(_) => return Confirmation::Gone,
                Err(error) if error.is_not_found() => return Confirmation::Gone,
                Err(RouterError::Shard { source, .. }) => return Confirmation::Unconfirmed(shard.clone(), source),
                Err(other) => {
                    let error = StorageError::Other { reason: other.to_string(), source: None };
                    return Confirmation::Unconfirmed(shard.clone(), error);
                }
            }
        }
        Confirmation::Confirmed
    }
}

/// What the check of freshly written copies found.
enum Confirmation {
    Confirmed,
    /// A copy is absent or has the wrong size: a concurrent deletion removed it.
    Gone,
    /// A shard did not answer the check (in time): its copy must not be recorded.
    Unconfirmed(String, StorageError),
}

/// The copies to record after a write: those written are stored, the rest of the write set
/// is pending for replication.
fn copies_after_write(receipt: &WriteReceipt) -> Vec<Replica> {
    let stored = receipt.stored.iter().map(|shard| Replica { shard: shard.clone(), state: ReplicaState::Stored });
    let pending = receipt
        .write_set
        .iter()
        .filter(|shard| !receipt.stored.contains(shard))
        .map(|shard| Replica { shard: shard.clone(), state: ReplicaState::Pending });
    stored.chain(pending).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_copy_is_stored_and_the_rest_of_the_write_set_pending() {
        let receipt = WriteReceipt { stored: vec!["c".into()], write_set: vec!["a".into(), "b".into()] };
        let copies = copies_after_write(&receipt);
        assert_eq!(copies[0], Replica { shard: "c".into(), state: ReplicaState::Stored });
        assert_eq!(
            copies[1..],
            [
                Replica { shard: "a".into(), state: ReplicaState::Pending },
                Replica { shard: "b".into(), state: ReplicaState::Pending }
            ]
        );
    }
}
