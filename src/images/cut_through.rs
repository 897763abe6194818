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
//! Cut-through is used only where it can pay: bodies of at least [`CUT_THROUGH_MIN`] bytes, and
//! bytes not already stored (looked up while the first chunks stream; a known blob's upload is
//! deduplicated, and its stream is given up as soon as the lookup answers).
//! With a write quorum above one the upload streams to every shard of the quorum at once (the
//! first `write_quorum` shards of the preference list), releases their last chunks together,
//! and writes from its own copy only to the shards whose stream failed.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::mpsc::Sender;
use tokio::task::{AbortHandle, JoinHandle};

use crate::blob::BlobKey;
use crate::observability::names;
use crate::storage::router::{RouterError, StorageRouter, WriteReceipt};
use crate::storage::{BodyFeed, FeedSeal};

/// The smallest body streamed cut-through. Below it the receive is a small part of an upload
/// (BENCHMARKS.md, "Cut-through uploads").
pub const CUT_THROUGH_MIN: u64 = 1024 * 1024;
/// Chunks in flight between the upload and each of its PUTs: enough to keep both busy, few
/// enough that a cut-through upload holds no more memory than a spooled one (the PUTs of a
/// quorum share the chunks, they do not copy them; splitting the depth between them was
/// measured, and made no difference: BENCHMARKS.md, "A write quorum of two").
const FEED_DEPTH: usize = 4;
/// How long the upload waits for a shard to take a chunk before it gives that PUT up and
/// goes on without it: a slow shard must not slow the client's upload down.
const FEED_STALL: Duration = Duration::from_secs(2);

/// PUTs of an upload's bytes under its declared key, one per shard of the write quorum, fed
/// as they arrive, their last chunk held back. Dropping it gives the PUTs up, and the shards
/// store nothing.
#[derive(Debug)]
pub struct PendingWrite {
    key: BlobKey,
    len: u64,
    write_set: Vec<String>,
    /// Empty once completed.
    feeds: Vec<Feed>,
    held: HeldBack,
    /// Bytes passed on to the shards so far: always fewer than `len` until the upload is
    /// accepted, so no shard can have a whole blob before then.
    sent: u64,
}

impl PendingWrite {
    /// Opens the PUTs of `len` bytes under `key` to the first `copies` shards of the blob's
    /// preference list, when all their circuits are closed.
    pub fn start(router: &Arc<StorageRouter>, key: BlobKey, len: u64, copies: usize) -> Option<Self> {
        let targets = router.feed_targets(&key, copies)?;
        let feeds = targets.iter().map(|shard| Feed::open(router, &key, len, &shard.name)).collect();
        let write_set = router.write_set(&key);
        Some(Self { key, len, write_set, feeds, held: HeldBack::default(), sent: 0 })
    }

    /// Gives the PUTs up from elsewhere, whenever it is called: the shards store nothing, and
    /// an upload that goes on stores and forwards.
    pub fn canceller(&self) -> impl FnOnce() + Send + 'static {
        let feeds: Vec<(SharedSender, AbortHandle)> =
            self.feeds.iter().map(|feed| (feed.sender.clone(), feed.put.abort_handle())).collect();
        move || {
            for (sender, put) in feeds {
                lock(&sender).take();
                put.abort();
            }
        }
    }

    /// Passes the chunk before this one on to the shards, and holds this one back. A shard
    /// that does not take it in time is given up; the others go on.
    pub async fn forward(&mut self, chunk: &Bytes) {
        let Some(previous) = self.held.replace(chunk) else { return };
        // With `chunk` still to come, `len` bytes or more passed on would mean a part longer
        // than announced: its bytes are not the blob, and a shard would hold a whole object
        // (the length its PUT was opened with) before anything was accepted. Give the PUTs up.
        if self.sent + previous.len() as u64 >= self.len {
            for feed in &self.feeds {
                feed.give_up(&self.key, "the body is longer than announced");
            }
            self.held = HeldBack::default();
            return;
        }
        self.sent += previous.len() as u64;
        let delivered = join_all(self.feeds.iter().map(|feed| feed.send(&previous))).await;
        for (feed, delivered) in self.feeds.iter().zip(delivered) {
            if !delivered {
                feed.give_up(&self.key, "the shard stopped taking the body");
            }
        }
        if self.feeds.iter().all(|feed| feed.sender().is_none()) {
            self.held = HeldBack::default();
        }
    }

    /// Completes the PUTs once the received bytes are known good: `key` and `len` are what was
    /// received. The receipt names the shards that stored the blob within `deadline`: all of
    /// the quorum, some (the caller writes the rest from its own copy), or none, when the
    /// bytes are not the ones the PUTs were opened for.
    pub async fn complete(mut self, key: &BlobKey, len: u64, deadline: Duration) -> WriteReceipt {
        let feeds = std::mem::take(&mut self.feeds);
        let streams = feeds.len();
        let mut receipt = WriteReceipt { stored: Vec::new(), write_set: self.write_set.clone() };
        if key == &self.key && len == self.len {
            let last = self.held.take();
            let outcomes = join_all(feeds.into_iter().map(|feed| feed.finish(last.clone(), deadline))).await;
            for outcome in outcomes {
                match outcome {
                    Ok(shard) => receipt.stored.push(shard),
                    Err((shard, error)) => {
                        tracing::warn!(%shard, blob = %self.key, %error, "cut-through write failed; storing and forwarding");
                    }
                }
            }
        } else {
            tracing::warn!(blob = %self.key, "the body is not the one the cut-through write announced; storing and forwarding");
        }
        let outcome = if receipt.stored.len() == streams { "stored" } else { "fallback" };
        metrics::counter!(names::CUT_THROUGH, "outcome" => outcome).increment(1);
        receipt
    }
}

impl Drop for PendingWrite {
    /// An upload that ends without completing its write (refused, deduplicated, the client
    /// gone) ends the feeds short: the shards store nothing.
    fn drop(&mut self) {
        if !self.feeds.is_empty() {
            metrics::counter!(names::CUT_THROUGH, "outcome" => "abandoned").increment(1);
        }
    }
}

/// The last chunk received, held back from the shards until the upload is accepted.
#[derive(Debug, Default)]
struct HeldBack(Option<Bytes>);

impl HeldBack {
    /// Holds `chunk` back, and returns the chunk it takes the place of, to be sent on now.
    /// An empty chunk is not held: multer ends a field with one when the file's last bytes
    /// arrived before the closing delimiter, and holding it would send those bytes on, giving
    /// the shards every byte before the upload is accepted.
    fn replace(&mut self, chunk: &Bytes) -> Option<Bytes> {
        if chunk.is_empty() {
            return None;
        }
        self.0.replace(chunk.clone())
    }

    fn take(&mut self) -> Option<Bytes> {
        self.0.take()
    }
}

/// One shard's PUT and the channel that feeds it. Dropping it ends the feed short and aborts
/// the PUT, so the shard stores nothing.
#[derive(Debug)]
struct Feed {
    shard: String,
    /// `None` once given up. Shared with [`PendingWrite::canceller`], which drops it to end the
    /// feed short: a shard written by a blocking thread (a filesystem's) stops only when its
    /// feed ends, aborting the PUT's task does not reach it.
    sender: SharedSender,
    /// Given once the upload is accepted, before the last chunk: a filesystem shard stores
    /// nothing without it (see [`crate::storage::BodyFeed`]).
    seal: FeedSeal,
    put: JoinHandle<Result<(), RouterError>>,
}

type SharedSender = Arc<Mutex<Option<Sender<std::io::Result<Bytes>>>>>;

/// A feed's sender cell. No code panics while holding it, and if one did, the cell (an
/// `Option` taken or cloned whole) would still be consistent.
fn lock(sender: &SharedSender) -> MutexGuard<'_, Option<Sender<std::io::Result<Bytes>>>> {
    sender.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Feed {
    fn open(router: &Arc<StorageRouter>, key: &BlobKey, len: u64, shard: &str) -> Self {
        let (sender, seal, feed) = BodyFeed::channel(len, FEED_DEPTH);
        let put = tokio::spawn({
            let (router, key, shard) = (router.clone(), key.clone(), shard.to_owned());
            async move { router.write_feed_on(&shard, &key, feed).await }
        });
        Self { shard: shard.to_owned(), sender: Arc::new(Mutex::new(Some(sender))), seal, put }
    }

    /// The sender, unless the feed was given up (or cancelled). The lock is never held across
    /// an await: a send uses a clone, which keeps the feed open only while it lasts.
    fn sender(&self) -> Option<Sender<std::io::Result<Bytes>>> {
        lock(&self.sender).clone()
    }

    fn take_sender(&self) -> Option<Sender<std::io::Result<Bytes>>> {
        lock(&self.sender).take()
    }

    /// Whether the shard took the chunk in time (a feed already given up takes nothing, and
    /// counts as taken: it was reported when it was given up).
    async fn send(&self, chunk: &Bytes) -> bool {
        let Some(sender) = self.sender() else { return true };
        // An error: the PUT ended early (the shard failed); a timeout: it stopped taking bytes.
        matches!(tokio::time::timeout(FEED_STALL, sender.send(Ok(chunk.clone()))).await, Ok(Ok(())))
    }

    fn give_up(&self, blob: &BlobKey, why: &str) {
        if self.take_sender().is_some() {
            tracing::debug!(shard = %self.shard, %blob, why, "cut-through write given up");
        }
    }

    /// Sends the last chunk and waits for the shard to store the blob: its name when it did,
    /// with the reason when it did not.
    async fn finish(mut self, last: Option<Bytes>, deadline: Duration) -> Result<String, (String, String)> {
        let Some(sender) = self.take_sender() else {
            return Err((self.shard.clone(), "the shard stopped taking the body".into()));
        };
        self.seal.seal();
        if let Some(last) = last
            && sender.send(Ok(last)).await.is_err()
        {
            return Err((self.shard.clone(), "the shard failed before the last chunk".into()));
        }
        drop(sender);
        let error = match tokio::time::timeout(deadline, &mut self.put).await {
            Ok(Ok(Ok(()))) => return Ok(self.shard.clone()),
            Ok(Ok(Err(error))) => error.to_string(),
            Ok(Err(join_error)) => join_error.to_string(),
            Err(_) => format!("no answer within {} ms", deadline.as_millis()),
        };
        Err((self.shard.clone(), error))
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // The sender too: the canceller may still hold the feed's sender cell.
        self.take_sender();
        // A no-op once the PUT has finished.
        self.put.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_bytes_stay_held_back_when_the_body_ends_with_an_empty_chunk() {
        let mut held = HeldBack::default();
        let (first, last) = (Bytes::from_static(b"first"), Bytes::from_static(b"last"));
        assert_eq!(held.replace(&first), None);
        assert_eq!(held.replace(&last), Some(first), "the chunk before is sent on");
        assert_eq!(held.replace(&Bytes::new()), None, "multer's empty end of a field sends nothing on");
        assert_eq!(held.take(), Some(last), "the last bytes wait for the upload to be accepted");
    }
}
