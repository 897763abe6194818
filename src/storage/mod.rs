//! Byte storage: one trait per backend, and the router that places blobs on shards.
//!
//! Backends move bytes and know nothing of metadata (DESIGN, "storage/"). Every backend sorts
//! its failures into [`StorageError`], so the router decides failover on `is_not_found()` /
//! `is_unavailable()` and never matches on a backend's own error types.

pub mod breaker;
pub mod deadline;
pub mod fs;
pub mod hedge;
pub mod identity;
pub mod metered;
pub mod router;
pub mod s3;

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::blob::BlobKey;

/// The bytes of a blob about to be written. Both forms can be read more than once, so a write
/// can be retried on another shard, and later replicated, without buffering a large upload in
/// memory (DESIGN invariant 8).
#[derive(Debug, Clone)]
pub enum BlobBody {
    /// A small body kept in memory.
    Bytes(Bytes),
    /// A body spooled to a file of known length.
    File { path: PathBuf, len: u64 },
}

impl BlobBody {
    pub fn len(&self) -> u64 {
        match self {
            BlobBody::Bytes(bytes) => bytes.len() as u64,
            BlobBody::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bytes of a blob still arriving, handed over chunk by chunk by whoever receives them (a
/// cut-through upload, see `images/cut_through.rs`). A backend stores the blob only when
/// exactly `len` bytes arrived and the feed ended cleanly: a feed that fails, or whose sender
/// goes away early, stores nothing (S3 sends `len` as the request's `Content-Length`, so the
/// server sees a short body; a filesystem shard never renames its temporary file into place).
///
/// A filesystem shard also needs the sender's [`FeedSeal`]: `len` bytes followed by the
/// sender going away is not enough, since a sender that is given up (bad bytes, a dedup hit)
/// may have sent all of them by then. An S3 server cannot be told to wait for a seal (it
/// stores once `Content-Length` is met), but it checks the bytes against the key, the SHA-256
/// the request is signed with: only the blob's own bytes can land there.
#[derive(Debug)]
pub struct BodyFeed {
    pub len: u64,
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    seal: FeedSeal,
}

impl BodyFeed {
    /// A feed of `len` bytes, its sending end, which holds at most `depth` chunks in flight,
    /// and its seal.
    pub fn channel(len: u64, depth: usize) -> (tokio::sync::mpsc::Sender<std::io::Result<Bytes>>, FeedSeal, BodyFeed) {
        let (sender, chunks) = tokio::sync::mpsc::channel(depth);
        let seal = FeedSeal::default();
        (sender, seal.clone(), BodyFeed { len, chunks, seal })
    }

    /// The next chunk, for a backend writing from a blocking thread.
    pub fn blocking_next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        self.chunks.blocking_recv()
    }

    pub(crate) fn poll_next_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::io::Result<Bytes>>> {
        self.chunks.poll_recv(cx)
    }

    /// Whether the sender vouched for the whole body before it went away.
    pub fn is_sealed(&self) -> bool {
        self.seal.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The sender's word that a feed's body is whole and its bytes the ones wanted, given before
/// its last chunk is sent: without it a filesystem shard stores nothing (see [`BodyFeed`]).
#[derive(Debug, Clone, Default)]
pub struct FeedSeal(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl FeedSeal {
    pub fn seal(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A stream of a blob's bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// An open blob: its length and a stream of its bytes.
pub struct BlobReader {
    pub len: u64,
    pub stream: ByteStream,
}

impl fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobReader").field("len", &self.len).finish_non_exhaustive()
    }
}

/// One object found by listing a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: BlobKey,
    pub len: u64,
    pub modified: SystemTime,
}

/// Whose shard this is: written into a shard when it is first used, and checked whenever
/// the shard is opened (see [`identity`]). Serialised as the JSON of the label object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardLabel {
    /// The id of the Chitram store (kept in its metadata database).
    pub store_id: String,
    /// The shard's name in the config.
    pub shard: String,
}

/// The name of the label object at a shard's root (a file, or an object in the bucket). It is
/// not a blob key, so listings skip it.
pub const LABEL_NAME: &str = ".chitram-shard";

/// Why a backend operation failed, sorted for the router.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The shard answered, and it does not hold this blob.
    #[error("blob {0} is not on this shard")]
    NotFound(BlobKey),
    /// The shard could not be reached or is not serving (a missing root, a refused connection,
    /// a timeout). The router tries another shard.
    #[error("shard unavailable: {reason}")]
    Unavailable {
        reason: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The shard did not finish in time (see [`deadline`]). A late shard is treated as a down
    /// one: the router tries another, and the circuit breaker counts it as a failure.
    #[error("no answer from the shard within {} ms ({operation})", .deadline.as_millis())]
    DeadlineExceeded { operation: &'static str, deadline: std::time::Duration },
    /// The shard refused our credentials. Also a reason to fail over, but one an operator must fix.
    #[error("access denied by the shard: {0}")]
    AccessDenied(String),
    /// Anything else: the shard answered with an error we did not expect.
    #[error("storage operation failed: {reason}")]
    Other {
        reason: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound(_))
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable { .. } | StorageError::DeadlineExceeded { .. } | StorageError::AccessDenied(_)
        )
    }

    /// True when the shard did not answer within its deadline.
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, StorageError::DeadlineExceeded { .. })
    }

    pub fn unavailable(reason: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StorageError::Unavailable { reason: reason.into(), source: Some(source.into()) }
    }

    pub fn other(reason: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StorageError::Other { reason: reason.into(), source: Some(source.into()) }
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// A place that stores blobs by key: a directory, an S3 bucket.
///
/// Every method goes over the network or touches disk. Writes are atomic (a reader sees the
/// whole blob or none of it) and idempotent (writing the same key twice stores the same bytes);
/// deleting an absent blob succeeds.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// A short description for logs and health output, e.g. `fs:/var/lib/chitram/a`.
    fn describe(&self) -> String;

    /// Stores the body under the key, replacing any earlier object.
    async fn write_blob(&self, key: &BlobKey, body: &BlobBody) -> StorageResult<()>;

    /// Stores a body while it arrives (see [`BodyFeed`]): nothing is stored unless the feed
    /// delivers exactly its length and ends cleanly.
    async fn write_blob_feed(&self, key: &BlobKey, feed: BodyFeed) -> StorageResult<()>;

    /// Opens the blob for streaming.
    async fn read_blob(&self, key: &BlobKey) -> StorageResult<BlobReader>;

    /// The blob's length, without reading it.
    async fn fetch_blob_len(&self, key: &BlobKey) -> StorageResult<u64>;

    /// Removes the blob. Succeeds when it is already absent.
    async fn delete_blob(&self, key: &BlobKey) -> StorageResult<()>;

    /// Up to `limit` objects in key order, starting after `after`. Objects whose name is not a
    /// blob key (temporary files, foreign objects) are skipped.
    async fn list_blobs(&self, after: Option<&BlobKey>, limit: usize) -> StorageResult<Vec<StoredObject>>;

    /// Checks that the shard answers and accepts requests.
    async fn check_health(&self) -> StorageResult<()>;

    /// The label the shard carries, or `None` if it has none yet.
    async fn read_label(&self) -> StorageResult<Option<ShardLabel>>;

    /// Writes the shard's label, replacing any earlier one.
    async fn write_label(&self, label: &ShardLabel) -> StorageResult<()>;

    /// Removes what interrupted writes left behind (temporary files of a crashed process) that
    /// is older than `grace`; returns how many. Backends whose writes leave nothing behind do
    /// nothing.
    async fn remove_stale_temporaries(&self, grace: Duration) -> StorageResult<u64> {
        let _ = grace;
        Ok(0)
    }
}
