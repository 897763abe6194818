//! Receiving an upload: stream it in, hash it, enforce the size limit as bytes arrive, and keep
//! it in memory only while it is small or the process-wide [`MemoryBudget`] has room for it
//! (DESIGN invariant 8).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::blob::BlobKey;
use crate::observability::names;
use crate::storage::BlobBody;
use crate::storage::fs::remove_files_older_than;

/// Bodies up to this size always stay in memory; larger ones spool to a temporary file unless
/// the [`MemoryBudget`] holds them.
pub const MEMORY_THRESHOLD: usize = 256 * 1024;
/// The largest body the budget may hold in memory. Larger uploads spool whatever the budget:
/// a few of them would take all of it, and they spend far longer on the wire than on disk.
pub const MEMORY_BODY_MAX: u64 = 8 * 1024 * 1024;
/// How much of the start of a spooled body is kept in memory for format sniffing.
const HEAD_LEN: usize = 4096;
/// Small chunks gather in a buffer of this size before they go to the spool file.
const SPOOL_WRITE_BUFFER: usize = 64 * 1024;
/// The most of one large chunk that tokio's `File` copies for each write to the spool. Its
/// default, 2 MiB, made each concurrent large upload hold up to 2 MiB more (heaptrack: a third
/// of the server's heap under 32 concurrent 20 MiB uploads); at 256 KiB a MiB costs four
/// trips to the blocking pool instead of one, a few tens of microseconds.
const SPOOL_WRITE_MAX: usize = 256 * 1024;
/// The budget counts in KiB, so that a semaphore's permit count covers any sensible budget.
const BUDGET_UNIT: u64 = 1024;
/// Every spool file's name starts with this (uploads, and the copies and checks that spool).
const SPOOL_PREFIX: &str = "chitram-upload-";
/// How old a spool file must be before a starting instance takes it for the leftover of a
/// process that was killed mid-request: far longer than any request, copy or check keeps its
/// file, so the live files of another instance sharing the directory are never touched.
pub const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct SpoolLimits {
    /// Largest accepted body; one byte more and the upload is refused.
    pub max_bytes: u64,
    /// Where large bodies spool (the system temporary directory when `None`).
    pub dir: Option<PathBuf>,
    /// Memory shared by bodies kept off the spool file (none: everything over
    /// [`MEMORY_THRESHOLD`] spools).
    pub memory: MemoryBudget,
}

impl SpoolLimits {
    /// Limits under which everything over [`MEMORY_THRESHOLD`] spools.
    pub fn spooling(max_bytes: u64, dir: Option<PathBuf>) -> Self {
        Self { max_bytes, dir, memory: MemoryBudget::new(0) }
    }
}

/// Bytes of memory, shared by every request of the process, that uploads whose declared length
/// is known may use instead of a spool file. A 1 MiB upload held in memory skips a file
/// creation, a write and two reads of the whole body (the format check and the shard write).
/// A body that cannot reserve its length spools as before, so the budget bounds memory and
/// never refuses an upload.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    units: Arc<Semaphore>,
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> Self {
        let units = usize::try_from(bytes / BUDGET_UNIT).unwrap_or(Semaphore::MAX_PERMITS).min(Semaphore::MAX_PERMITS);
        Self { units: Arc::new(Semaphore::new(units)), bytes }
    }

    /// Bytes held by bodies in memory right now (the gauge `chitram_upload_memory_bytes`
    /// reports it to operators).
    #[cfg(test)]
    fn in_use(&self) -> u64 {
        (self.bytes / BUDGET_UNIT).saturating_sub(self.units.available_permits() as u64) * BUDGET_UNIT
    }

    /// Room for a body of `len` bytes, if it may stay in memory and the budget has it now.
    fn reserve(&self, len: u64) -> Option<MemoryShare> {
        if len <= MEMORY_THRESHOLD as u64 || len > MEMORY_BODY_MAX || self.bytes == 0 {
            return None;
        }
        let units = u32::try_from(len.div_ceil(BUDGET_UNIT)).ok()?;
        let Ok(permit) = self.units.clone().try_acquire_many_owned(units) else {
            // Operators raise `server.upload_memory_bytes` when this grows with the load.
            metrics::counter!(names::UPLOAD_MEMORY_FULL).increment(1);
            return None;
        };
        let bytes = u64::from(units) * BUDGET_UNIT;
        metrics::gauge!(names::UPLOAD_MEMORY).increment(bytes as f64);
        Some(MemoryShare { _permit: permit, bytes })
    }
}

/// A body's share of the [`MemoryBudget`], given back (and taken off the gauge) when it drops.
#[derive(Debug)]
struct MemoryShare {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl Drop for MemoryShare {
    fn drop(&mut self) {
        metrics::gauge!(names::UPLOAD_MEMORY).decrement(self.bytes as f64);
    }
}

/// A received body, hashed and of known length. A spooled file is deleted when this drops.
#[derive(Debug)]
pub struct SpooledBody {
    pub key: BlobKey,
    pub len: u64,
    pub body: BlobBody,
    /// The first bytes, for recognising the format.
    pub head: Bytes,
    _temp: Option<TempPath>,
    /// The share of the [`MemoryBudget`] a body in memory holds until it drops.
    _memory: Option<MemoryShare>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the file exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("writing the upload to the spool directory failed")]
    Io(#[from] std::io::Error),
}

/// Reads `stream` to its end, or until it passes `limits.max_bytes`. `expected_len`, when the
/// caller knows it (a request's `Content-Length`), is at least the body's length: a body that
/// can reserve it in `limits.memory` stays in memory.
pub async fn spool_body<S, E>(
    mut stream: S,
    limits: &SpoolLimits,
    expected_len: Option<u64>,
) -> Result<SpooledBody, SpoolError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    let reserved = expected_len.filter(|len| *len <= limits.max_bytes).and_then(|len| {
        let permit = limits.memory.reserve(len)?;
        Some((permit, len as usize))
    });
    // Sized up front: growing a buffer by doubling would copy the body about once more.
    let in_memory_max = reserved.as_ref().map_or(MEMORY_THRESHOLD, |(_, len)| *len);
    let mut memory = BytesMut::with_capacity(reserved.as_ref().map_or(0, |(_, len)| *len));
    let mut spool: Option<(tokio::io::BufWriter<tokio::fs::File>, TempPath)> = None;
    let mut head = BytesMut::new();

    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| SpoolError::Body(Box::new(error)))?;
        len += chunk.len() as u64;
        if len > limits.max_bytes {
            return Err(SpoolError::TooLarge { limit: limits.max_bytes });
        }
        hasher.update(&chunk);
        if head.len() < HEAD_LEN {
            let take = (HEAD_LEN - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
        }
        match spool.as_mut() {
            Some((file, _)) => file.write_all(&chunk).await?,
            None if memory.len() + chunk.len() <= in_memory_max => memory.extend_from_slice(&chunk),
            None => {
                let (mut file, path) = create_spool_file(limits).await?;
                file.write_all(&memory).await?;
                file.write_all(&chunk).await?;
                memory = BytesMut::new();
                spool = Some((file, path));
            }
        }
    }

    let key = BlobKey::from_digest(&hasher.finalize().into());
    let head = head.freeze();
    match spool {
        None => {
            let body = BlobBody::Bytes(memory.freeze());
            Ok(SpooledBody { key, len, body, head, _temp: None, _memory: reserved.map(|(permit, _)| permit) })
        }
        Some((mut file, path)) => {
            file.flush().await?;
            let body = BlobBody::File { path: path.to_path_buf(), len };
            Ok(SpooledBody { key, len, body, head, _temp: Some(path), _memory: None })
        }
    }
}

/// Removes the spool files older than `older_than` from `dir` (the system's temporary directory
/// when `None`): the leftovers of a process killed mid-request, which would otherwise stay until
/// someone cleans the directory (a spool file is removed when its request ends, and a killed
/// process ends none). Returns how many were removed.
pub fn remove_leftovers(dir: Option<&Path>, older_than: Duration) -> std::io::Result<u64> {
    let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    remove_files_older_than(&dir, older_than, |name| name.starts_with(SPOOL_PREFIX))
}

async fn create_spool_file(limits: &SpoolLimits) -> std::io::Result<(tokio::io::BufWriter<tokio::fs::File>, TempPath)> {
    let dir = limits.dir.clone().unwrap_or_else(std::env::temp_dir);
    let named = tokio::task::spawn_blocking(move || tempfile::Builder::new().prefix(SPOOL_PREFIX).tempfile_in(dir))
        .await
        .map_err(std::io::Error::other)??;
    let (file, path) = named.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    file.set_max_buf_size(SPOOL_WRITE_MAX);
    Ok((tokio::io::BufWriter::with_capacity(SPOOL_WRITE_BUFFER, file), path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn chunks(total: usize, chunk: usize) -> impl Stream<Item = Result<Bytes, Infallible>> + Unpin {
        let pieces: Vec<Result<Bytes, Infallible>> = (0..total.div_ceil(chunk))
            .map(|i| Ok(Bytes::from(vec![(i % 251) as u8; chunk.min(total - i * chunk)])))
            .collect();
        futures::stream::iter(pieces)
    }

    fn limits(dir: &tempfile::TempDir, max_bytes: u64) -> SpoolLimits {
        SpoolLimits::spooling(max_bytes, Some(dir.path().to_path_buf()))
    }

    fn budgeted(dir: &tempfile::TempDir, budget: u64) -> SpoolLimits {
        SpoolLimits { memory: MemoryBudget::new(budget), ..limits(dir, u64::MAX) }
    }

    fn files_in(dir: &tempfile::TempDir) -> usize {
        std::fs::read_dir(dir.path()).unwrap().count()
    }

    #[tokio::test]
    async fn only_old_spool_files_are_removed_as_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let aged = |name: &str, age: Duration| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - age).unwrap();
            path
        };
        let day = Duration::from_secs(24 * 3600);
        let leftover = aged("chitram-upload-dead", day);
        let in_use = aged("chitram-upload-live", Duration::ZERO);
        let someone_elses = aged("other-program-file", day);
        // A spool file of a request in flight, made the way requests make them.
        let spooled = spool_body(chunks(MEMORY_THRESHOLD + 1, 1000), &limits(&dir, u64::MAX), None).await.unwrap();
        assert!(matches!(spooled.body, BlobBody::File { .. }));

        assert_eq!(remove_leftovers(Some(dir.path()), LEFTOVER_AGE).unwrap(), 1);
        assert!(!leftover.exists(), "a day-old spool file is a leftover");
        assert!(in_use.exists() && someone_elses.exists(), "young files and other programs' files stay");
        assert_eq!(files_in(&dir), 3, "the spooled body's file stays too");
        assert!(remove_leftovers(Some(&dir.path().join("absent")), LEFTOVER_AGE).is_err());
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = spool_body(chunks(1000, 100), &limits(&dir, 10_000), None).await.unwrap();
        assert!(matches!(spooled.body, BlobBody::Bytes(ref b) if b.len() == 1000));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn large_bodies_spool_to_a_file_that_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = spool_body(chunks(MEMORY_THRESHOLD * 3, 10_000), &limits(&dir, u64::MAX), None).await.unwrap();
        let BlobBody::File { ref path, len } = spooled.body else { panic!("expected a spooled file") };
        assert_eq!(len, (MEMORY_THRESHOLD * 3) as u64);
        assert_eq!(std::fs::metadata(path).unwrap().len(), len);
        assert_eq!(spooled.head.len(), HEAD_LEN);
        drop(spooled);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn the_key_is_the_sha256_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = spool_body(
            futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"abc"))]),
            &limits(&dir, 10),
            None,
        )
        .await
        .unwrap();
        assert_eq!(spooled.key.as_str(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[tokio::test]
    async fn the_key_is_the_sha256_of_the_bytes_whatever_the_size_and_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let sizes =
            [(0, 1), (MEMORY_THRESHOLD - 1, 1000), (MEMORY_THRESHOLD + 1, 4096), (MEMORY_THRESHOLD * 5 + 17, 65_536)];
        for (total, chunk) in sizes {
            let body: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            let pieces: Vec<Result<Bytes, Infallible>> =
                body.chunks(chunk).map(|piece| Ok(Bytes::copy_from_slice(piece))).collect();
            let spooled = spool_body(futures::stream::iter(pieces), &limits(&dir, u64::MAX), None).await.unwrap();
            let expected = BlobKey::from_digest(&Sha256::digest(&body).into());
            assert_eq!(spooled.key, expected, "{total} bytes in chunks of {chunk}");
            assert_eq!(spooled.len, total as u64);
        }
    }

    #[tokio::test]
    async fn stops_reading_one_byte_past_the_limit_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = spool_body(chunks(MEMORY_THRESHOLD * 4, 4096), &limits(&dir, MEMORY_THRESHOLD as u64 * 2), None)
            .await
            .unwrap_err();
        assert!(matches!(error, SpoolError::TooLarge { .. }));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_declared_body_within_the_budget_stays_in_memory_and_holds_its_share_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let limits = budgeted(&dir, 4 * 1024 * 1024);
        let len = 1024 * 1024;
        let spooled = spool_body(chunks(len, 64 * 1024), &limits, Some(len as u64 + 200)).await.unwrap();
        assert!(matches!(spooled.body, BlobBody::Bytes(ref b) if b.len() == len));
        assert_eq!(files_in(&dir), 0);
        assert_eq!(limits.memory.in_use(), 1024 * 1024 + 1024, "the declared length, rounded up to a KiB");
        drop(spooled);
        assert_eq!(limits.memory.in_use(), 0);
    }

    #[tokio::test]
    async fn a_body_the_budget_has_no_room_for_spools() {
        let dir = tempfile::tempdir().unwrap();
        let limits = budgeted(&dir, 3 * 1024 * 1024);
        let len = 2 * 1024 * 1024;
        let first = spool_body(chunks(len, 64 * 1024), &limits, Some(len as u64)).await.unwrap();
        let second = spool_body(chunks(len, 64 * 1024), &limits, Some(len as u64)).await.unwrap();
        assert!(matches!(first.body, BlobBody::Bytes(_)));
        assert!(matches!(second.body, BlobBody::File { .. }), "only 1 MiB of the budget was left");
        assert_eq!(files_in(&dir), 1);
        assert_eq!(first.key, second.key);
    }

    #[tokio::test]
    async fn bodies_over_the_in_memory_maximum_or_of_unknown_length_spool_whatever_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let limits = budgeted(&dir, 64 * 1024 * 1024);
        let large = MEMORY_BODY_MAX as usize + 1;
        let spooled = spool_body(chunks(large, 256 * 1024), &limits, Some(large as u64)).await.unwrap();
        assert!(matches!(spooled.body, BlobBody::File { .. }));
        let unknown = spool_body(chunks(MEMORY_THRESHOLD * 2, 4096), &limits, None).await.unwrap();
        assert!(matches!(unknown.body, BlobBody::File { .. }));
        assert_eq!(limits.memory.in_use(), 0);
    }

    #[tokio::test]
    async fn a_refused_body_gives_its_share_back() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits { max_bytes: 1024 * 1024, ..budgeted(&dir, 4 * 1024 * 1024) };
        // The declared length is within the limit, the body is not (a multipart part's framing
        // is not the file): refused at the limit, and nothing stays reserved.
        let error = spool_body(chunks(2 * 1024 * 1024, 64 * 1024), &limits, Some(1024 * 1024)).await.unwrap_err();
        assert!(matches!(error, SpoolError::TooLarge { .. }));
        assert_eq!(limits.memory.in_use(), 0);
        assert_eq!(files_in(&dir), 0);
    }
}
