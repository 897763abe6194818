//! Receiving an upload: stream it in, hash it, enforce the size limit as bytes arrive, and keep
//! it in memory only while it is small (DESIGN invariant 8).

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;

use crate::blob::BlobKey;
use crate::storage::BlobBody;

/// Bodies up to this size stay in memory; larger ones spool to a temporary file.
pub const MEMORY_THRESHOLD: usize = 256 * 1024;
/// How much of the start of a spooled body is kept in memory for format sniffing.
const HEAD_LEN: usize = 4096;

#[derive(Debug, Clone)]
pub struct SpoolLimits {
    /// Largest accepted body; one byte more and the upload is refused.
    pub max_bytes: u64,
    /// Where large bodies spool (the system temporary directory when `None`).
    pub dir: Option<PathBuf>,
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

/// Reads `stream` to its end, or until it passes `limits.max_bytes`.
pub async fn spool_body<S, E>(mut stream: S, limits: &SpoolLimits) -> Result<SpooledBody, SpoolError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    let mut memory = BytesMut::new();
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
            None if memory.len() + chunk.len() <= MEMORY_THRESHOLD => memory.extend_from_slice(&chunk),
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
        None => Ok(SpooledBody { key, len, body: BlobBody::Bytes(memory.freeze()), head, _temp: None }),
        Some((mut file, path)) => {
            file.flush().await?;
            let body = BlobBody::File { path: path.to_path_buf(), len };
            Ok(SpooledBody { key, len, body, head, _temp: Some(path) })
        }
    }
}

async fn create_spool_file(limits: &SpoolLimits) -> std::io::Result<(tokio::io::BufWriter<tokio::fs::File>, TempPath)> {
    let dir = limits.dir.clone().unwrap_or_else(std::env::temp_dir);
    let named =
        tokio::task::spawn_blocking(move || tempfile::Builder::new().prefix("chitram-upload-").tempfile_in(dir))
            .await
            .map_err(std::io::Error::other)??;
    let (file, path) = named.into_parts();
    Ok((tokio::io::BufWriter::with_capacity(64 * 1024, tokio::fs::File::from_std(file)), path))
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
        SpoolLimits { max_bytes, dir: Some(dir.path().to_path_buf()) }
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = spool_body(chunks(1000, 100), &limits(&dir, 10_000)).await.unwrap();
        assert!(matches!(spooled.body, BlobBody::Bytes(ref b) if b.len() == 1000));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn large_bodies_spool_to_a_file_that_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = spool_body(chunks(MEMORY_THRESHOLD * 3, 10_000), &limits(&dir, u64::MAX)).await.unwrap();
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
        let spooled =
            spool_body(futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"abc"))]), &limits(&dir, 10))
                .await
                .unwrap();
        assert_eq!(spooled.key.as_str(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[tokio::test]
    async fn stops_reading_one_byte_past_the_limit_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = spool_body(chunks(MEMORY_THRESHOLD * 4, 4096), &limits(&dir, MEMORY_THRESHOLD as u64 * 2))
            .await
            .unwrap_err();
        assert!(matches!(error, SpoolError::TooLarge { .. }));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
