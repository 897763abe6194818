//! Shard labels: a shard that is not the one the config means is down, not empty.
//!
//! An unmounted disk leaves an empty directory where the shard's root should be; a typo in a
//! bucket name points at another store's bucket. Taken at their word, both look like a shard
//! that lost everything: every read finds nothing (and marks copies missing), every write lands
//! on the wrong disk. So each shard carries a label (the store's id and the shard's name), written
//! when the shard is first used, and every backend is wrapped in a [`LabelledStore`] that checks
//! the label before it lets any operation through:
//!
//! - the label matches: the shard serves;
//! - no label, and either the metadata records no copy on the shard (a new shard) or the shard
//!   holds objects (one that predates labels): the label is written and the shard serves;
//! - no label on a shard that holds nothing although the metadata records copies on it, or the
//!   label of another shard or store: the shard is *fenced*, answering `Unavailable` with the
//!   reason, until a health check finds the right label (the disk mounted again, the config
//!   fixed). Reads fail over meanwhile and writes go to the next shard.
//!
//! A filesystem shard also checks, on every operation, that the label it has seen is still
//! there (`storage/fs.rs`), so a disk unmounted while Chitram runs is caught at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{BlobBody, BlobReader, BlobStore, BodyFeed, ShardLabel, StorageError, StorageResult, StoredObject};
use crate::blob::BlobKey;

/// What the label check concluded about one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelVerdict {
    /// The shard is the one the config means.
    Matches,
    /// The shard is new (or predates labels): label it.
    Label,
    /// The shard is not the one the config means; the reason says what to check.
    Fence(String),
}

/// Judges a shard by the label found on it. `recorded_copies`: whether the metadata records any
/// copy on this shard; `holds_objects`: whether the shard lists any blob.
pub fn judge(
    found: Option<&ShardLabel>,
    expected: &ShardLabel,
    recorded_copies: bool,
    holds_objects: bool,
) -> LabelVerdict {
    match found {
        Some(label) if label == expected => LabelVerdict::Matches,
        Some(label) if label.store_id != expected.store_id => LabelVerdict::Fence(format!(
            "it is labelled for another Chitram store (id {}, shard {:?}); check the shard's path or bucket",
            label.store_id, label.shard
        )),
        Some(label) => LabelVerdict::Fence(format!(
            "it is labelled as shard {:?} of this store; two shards point at the same place, or a shard was \
             renamed (rename it back)",
            label.shard
        )),
        None if !recorded_copies || holds_objects => LabelVerdict::Label,
        None => LabelVerdict::Fence(
            "it holds no label and no object although the metadata records copies on it: is its disk mounted, \
             and is this the right path or bucket?"
                .to_owned(),
        ),
    }
}

/// A backend that serves only while its label is right; see the module documentation.
#[derive(Debug)]
pub struct LabelledStore {
    inner: Box<dyn BlobStore>,
    expected: ShardLabel,
    recorded_copies: bool,
    state: Mutex<LabelState>,
    /// Set once the label is verified (it never goes back): every operation reads it, and only
    /// a shard not verified yet takes the lock.
    verified: AtomicBool,
}

#[derive(Debug, Clone)]
enum LabelState {
    /// Not checked yet (the shard did not answer when it was opened).
    Unchecked,
    Verified,
    Fenced(String),
}

impl LabelledStore {
    /// Wraps `inner`, checking its label now if it answers.
    pub async fn open(inner: Box<dyn BlobStore>, expected: ShardLabel, recorded_copies: bool) -> Self {
        let store = Self {
            inner,
            expected,
            recorded_copies,
            state: Mutex::new(LabelState::Unchecked),
            verified: AtomicBool::new(false),
        };
        if let Err(error) = store.ensure_verified().await {
            tracing::warn!(shard = %store.expected.shard, %error, "shard is not serving");
        }
        store
    }

    /// Lets an operation through once the label is verified; checks it first if it has not been.
    async fn ensure_verified(&self) -> StorageResult<()> {
        if self.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        match &*state {
            LabelState::Verified => Ok(()),
            LabelState::Fenced(reason) => Err(self.fenced(reason)),
            LabelState::Unchecked => {
                *state = self.check_label().await?;
                match &*state {
                    LabelState::Fenced(reason) => Err(self.fenced(reason)),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Reads the label and judges it, labelling a new shard. An error means the shard did not
    /// answer, and leaves the verdict for later.
    async fn check_label(&self) -> StorageResult<LabelState> {
        let found = self.inner.read_label().await?;
        let holds_objects = found.is_none() && !self.inner.list_blobs(None, 1).await?.is_empty();
        match judge(found.as_ref(), &self.expected, self.recorded_copies, holds_objects) {
            LabelVerdict::Matches => Ok(self.mark_verified()),
            LabelVerdict::Label => {
                self.inner.write_label(&self.expected).await?;
                tracing::info!(shard = %self.expected.shard, backend = %self.inner.describe(), "labelled the shard");
                Ok(self.mark_verified())
            }
            LabelVerdict::Fence(reason) => {
                tracing::error!(shard = %self.expected.shard, backend = %self.inner.describe(), %reason, "shard fenced");
                Ok(LabelState::Fenced(reason))
            }
        }
    }

    fn mark_verified(&self) -> LabelState {
        self.verified.store(true, Ordering::Release);
        LabelState::Verified
    }

    fn fenced(&self, reason: &str) -> StorageError {
        StorageError::Unavailable {
            reason: format!("shard {:?} ({}) is fenced: {reason}", self.expected.shard, self.inner.describe()),
            source: None,
        }
    }
}

#[async_trait]
impl BlobStore for LabelledStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn write_blob(&self, key: &BlobKey, body: &BlobBody) -> StorageResult<()> {
        self.ensure_verified().await?;
        self.inner.write_blob(key, body).await
    }

    async fn write_blob_feed(&self, key: &BlobKey, feed: BodyFeed) -> StorageResult<()> {
        self.ensure_verified().await?;
        self.inner.write_blob_feed(key, feed).await
    }

    async fn read_blob(&self, key: &BlobKey) -> StorageResult<BlobReader> {
        self.ensure_verified().await?;
        self.inner.read_blob(key).await
    }

    async fn fetch_blob_len(&self, key: &BlobKey) -> StorageResult<u64> {
        self.ensure_verified().await?;
        self.inner.fetch_blob_len(key).await
    }

    async fn delete_blob(&self, key: &BlobKey) -> StorageResult<()> {
        self.ensure_verified().await?;
        self.inner.delete_blob(key).await
    }

    async fn list_blobs(&self, after: Option<&BlobKey>, limit: usize) -> StorageResult<Vec<StoredObject>> {
        self.ensure_verified().await?;
        self.inner.list_blobs(after, limit).await
    }

    /// Also where a fenced shard gets its second chance: a health check reads the label again,
    /// so a disk mounted back, or a config fixed, brings the shard back without a restart.
    async fn check_health(&self) -> StorageResult<()> {
        {
            let mut state = self.state.lock().await;
            if !matches!(*state, LabelState::Verified) {
                *state = self.check_label().await?;
            }
            if let LabelState::Fenced(reason) = &*state {
                return Err(self.fenced(reason));
            }
        }
        self.inner.check_health().await
    }

    async fn read_label(&self) -> StorageResult<Option<ShardLabel>> {
        self.inner.read_label().await
    }

    async fn write_label(&self, label: &ShardLabel) -> StorageResult<()> {
        self.inner.write_label(label).await
    }

    async fn remove_stale_temporaries(&self, grace: Duration) -> StorageResult<u64> {
        self.ensure_verified().await?;
        self.inner.remove_stale_temporaries(grace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(store: &str, shard: &str) -> ShardLabel {
        ShardLabel { store_id: store.to_owned(), shard: shard.to_owned() }
    }

    #[test]
    fn the_right_label_serves() {
        assert_eq!(judge(Some(&label("s", "a")), &label("s", "a"), true, true), LabelVerdict::Matches);
    }

    #[test]
    fn a_new_shard_or_one_that_predates_labels_is_labelled() {
        assert_eq!(judge(None, &label("s", "a"), false, false), LabelVerdict::Label);
        assert_eq!(judge(None, &label("s", "a"), true, true), LabelVerdict::Label);
    }

    #[test]
    fn an_empty_unlabelled_shard_that_should_hold_copies_is_fenced() {
        let LabelVerdict::Fence(reason) = judge(None, &label("s", "a"), true, false) else { panic!() };
        assert!(reason.contains("is its disk mounted"), "{reason}");
    }

    #[test]
    fn another_stores_or_another_shards_label_is_fenced() {
        let LabelVerdict::Fence(reason) = judge(Some(&label("t", "a")), &label("s", "a"), false, true) else {
            panic!()
        };
        assert!(reason.contains("another Chitram store"), "{reason}");
        let LabelVerdict::Fence(reason) = judge(Some(&label("s", "b")), &label("s", "a"), false, true) else {
            panic!()
        };
        assert!(reason.contains("\"b\""), "{reason}");
    }
}
