//! Cut-through uploads: the blob streams to its shard while the upload is still arriving.
//!
//! A blob's key is its SHA-256, so a shard can only be chosen once the key is known. A client
//! that declares the SHA-256 of its file up front (`X-Checksum-SHA256`) lets the upload open
//! the PUT to the blob's primary before the first byte, and pass each chunk on as it is
//! received, hashed and spooled: store and forward becomes a pipeline, and a large upload
//! costs about one transfer instead of two back to back.
//!
//! Nothing unchecked may be stored (DESIGN invariants 1, 7): the last chunk is **held back**
//! until the bytes are known good (their hash is the declared one, their length the one the
//! PUT announced, the format check passed, the owner has room and the blob is new). A shard
//! stores an object only once its whole body has arrived (S3's `Content-Length`; a filesystem
//! shard's rename), so an upload given up at any point before that (bad bytes, a dedup hit,
//! a client gone, a crash) leaves nothing behind. The body is still spooled (or held in memory)
//! as before, so a PUT that fails or stalls costs nothing but time: the upload falls back to
//! the store-and-forward write, with its failover, from its own copy.
//!
//! Cut-through is used only where it can pay: bodies of at least [`CUT_THROUGH_MIN`] bytes,
//! with `write_quorum = 1` (more copies before the 201 go store and forward).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;

use crate::blob::BlobKey;
use crate::observability::names;
use crate::storage::BodyFeed;
use crate::storage::router::{RouterError, StorageRouter, WriteReceipt};

/// The smallest body streamed cut-through. Below it the receive is a small part of an upload
/// (BENCHMARKS.md, "Cut-through uploads").
pub const CUT_THROUGH_MIN: u64 = 1024 * 1024;
/// Chunks in flight between the upload and its PUT: enough to keep both busy, few enough that
/// a cut-through upload holds no more memory than a spooled one.
const FEED_DEPTH: usize = 4;
/// How long the upload waits for the shard to take a chunk before it gives the PUT up and
/// goes on storing and forwarding: a slow shard must not slow the client's upload down.
const FEED_STALL: Duration = Duration::from_secs(2);

/// A PUT of an upload's bytes under its declared key, fed as they arrive, its last chunk
/// held back. Dropping it gives the PUT up, and the shard stores nothing.
#[derive(Debug)]
pub struct PendingWrite {
    key: BlobKey,
    len: u64,
    shard: String,
    write_set: Vec<String>,
    /// `None` once the feed is given up or complete.
    sender: Option<Sender<std::io::Result<Bytes>>>,
    held: Option<Bytes>,
    put: Option<JoinHandle<Result<(), RouterError>>>,
}

impl PendingWrite {
    /// Opens the PUT of `len` bytes under `key` to the blob's primary, when its circuit is
    /// closed.
    pub fn start(router: &Arc<StorageRouter>, key: BlobKey, len: u64) -> Option<Self> {
        let shard = router.feed_target(&key)?.name.clone();
        let (sender, feed) = BodyFeed::channel(len, FEED_DEPTH);
        let put = tokio::spawn({
            let (router, key, shard) = (router.clone(), key.clone(), shard.clone());
            async move { router.write_feed_on(&shard, &key, feed).await }
        });
        let write_set = router.write_set(&key);
        Some(Self { key, len, shard, write_set, sender: Some(sender), held: None, put: Some(put) })
    }

    /// Passes the chunk before this one on to the shard, and holds this one back.
    pub async fn forward(&mut self, chunk: &Bytes) {
        let Some(sender) = &self.sender else { return };
        let Some(previous) = self.held.replace(chunk.clone()) else { return };
        match tokio::time::timeout(FEED_STALL, sender.send(Ok(previous))).await {
            Ok(Ok(())) => {}
            // The PUT ended early (the shard failed) or stopped taking bytes.
            Ok(Err(_)) | Err(_) => self.give_up("the shard stopped taking the body"),
        }
    }

    /// Completes the PUT once the received bytes are known good: `key` and `len` are what was
    /// received. The receipt when the shard stored the blob within `deadline`; `None` when
    /// it did not (the caller stores and forwards instead), or when the bytes are not the
    /// ones the PUT was opened for.
    pub async fn complete(mut self, key: &BlobKey, len: u64, deadline: Duration) -> Option<WriteReceipt> {
        let mut put = self.put.take().expect("a pending write has its PUT until it completes");
        if key != &self.key || len != self.len {
            return self.fall_back(put, "the body is not the one the PUT announced".into());
        }
        let Some(sender) = self.sender.take() else {
            return self.fall_back(put, "the shard stopped taking the body".into());
        };
        if let Some(last) = self.held.take()
            && sender.send(Ok(last)).await.is_err()
        {
            return self.fall_back(put, "the shard failed before the last chunk".into());
        }
        drop(sender);
        let error = match tokio::time::timeout(deadline, &mut put).await {
            Ok(Ok(Ok(()))) => {
                metrics::counter!(names::CUT_THROUGH, "outcome" => "stored").increment(1);
                return Some(WriteReceipt { stored: vec![self.shard.clone()], write_set: self.write_set.clone() });
            }
            Ok(Ok(Err(error))) => error.to_string(),
            Ok(Err(join_error)) => join_error.to_string(),
            Err(_) => format!("no answer within {} ms", deadline.as_millis()),
        };
        self.fall_back(put, error)
    }

    /// Gives the PUT up for the store-and-forward write.
    fn fall_back(&mut self, put: JoinHandle<Result<(), RouterError>>, error: String) -> Option<WriteReceipt> {
        self.give_up("falling back");
        put.abort();
        tracing::warn!(shard = %self.shard, blob = %self.key, %error, "cut-through write failed; storing and forwarding");
        metrics::counter!(names::CUT_THROUGH, "outcome" => "fallback").increment(1);
        None
    }

    fn give_up(&mut self, why: &str) {
        if self.sender.take().is_some() {
            tracing::debug!(shard = %self.shard, blob = %self.key, why, "cut-through write given up");
        }
        self.held = None;
    }
}

impl Drop for PendingWrite {
    /// An upload that ends without completing its write (refused, deduplicated, the client
    /// gone) ends the feed short: the shard stores nothing.
    fn drop(&mut self) {
        if let Some(put) = self.put.take() {
            self.sender = None;
            put.abort();
            metrics::counter!(names::CUT_THROUGH, "outcome" => "abandoned").increment(1);
        }
    }
}
