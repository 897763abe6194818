//! Checking bytes read from a shard against the blob's key (its SHA-256) and length, so a
//! corrupt or truncated copy is never passed off as the image (DESIGN invariant 5).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::blob::BlobKey;
use crate::storage::{BlobReader, ByteStream};

/// Blobs up to this size are read whole and checked before the first byte is sent, so a bad
/// copy is replaced by the next holder without the client noticing. Larger blobs are checked
/// as they stream; a bad one ends the response with an error.
pub const CHECK_BEFORE_SENDING: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the copy is corrupt: {0}")]
    Corrupt(String),
    #[error("reading the copy failed")]
    Io(#[from] std::io::Error),
}

/// Reads a whole blob and checks it.
pub async fn read_checked(mut reader: BlobReader, key: &BlobKey, len: u64) -> Result<Bytes, ReadError> {
    let mut buffer = BytesMut::with_capacity(len.min(CHECK_BEFORE_SENDING) as usize);
    while let Some(chunk) = reader.stream.next().await {
        buffer.extend_from_slice(&chunk?);
        if buffer.len() as u64 > len {
            return Err(ReadError::Corrupt(format!("longer than the recorded {len} bytes")));
        }
    }
    let bytes = buffer.freeze();
    match mismatch(&Sha256::digest(&bytes).into(), bytes.len() as u64, key, len) {
        Some(problem) => Err(ReadError::Corrupt(problem)),
        None => Ok(bytes),
    }
}

/// Passes `stream` through, checking it as it goes. The last chunk is held back until the
/// whole copy is checked, so on a mismatch the client never receives the full length: the
/// stream ends with an error (a failed transfer, not a wrong image) and `on_corrupt` runs once.
pub fn checked_stream(
    stream: ByteStream,
    key: BlobKey,
    len: u64,
    on_corrupt: impl FnOnce(String) + Send + 'static,
) -> ByteStream {
    Box::pin(CheckedStream {
        inner: stream,
        key,
        len,
        seen: 0,
        hasher: Sha256::new(),
        held: None,
        on_corrupt: Some(Box::new(on_corrupt)),
    })
}

fn mismatch(digest: &[u8; 32], seen: u64, key: &BlobKey, len: u64) -> Option<String> {
    if seen != len {
        return Some(format!("{seen} bytes instead of the recorded {len}"));
    }
    let actual = BlobKey::from_digest(digest);
    (&actual != key).then(|| format!("its SHA-256 is {actual}"))
}

struct CheckedStream {
    inner: ByteStream,
    key: BlobKey,
    len: u64,
    seen: u64,
    hasher: Sha256,
    /// The latest chunk, sent only once the next one (or a successful check) arrives.
    held: Option<Bytes>,
    on_corrupt: Option<Box<dyn FnOnce(String) + Send>>,
}

impl CheckedStream {
    fn corrupt(&mut self, problem: String) -> Poll<Option<std::io::Result<Bytes>>> {
        if let Some(report) = self.on_corrupt.take() {
            report(problem.clone());
        }
        Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("corrupt copy: {problem}")))))
    }
}

impl Stream for CheckedStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.on_corrupt.is_none() {
                return Poll::Ready(self.held.take().map(Ok)); // Checked (or reported): drain.
            }
            match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.seen += chunk.len() as u64;
                    if self.seen > self.len {
                        let len = self.len;
                        self.held = None;
                        return self.corrupt(format!("longer than the recorded {len} bytes"));
                    }
                    self.hasher.update(&chunk);
                    if let Some(previous) = self.held.replace(chunk) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
                Poll::Ready(None) => {
                    let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
                    match mismatch(&digest, self.seen, &self.key, self.len) {
                        Some(problem) => {
                            self.held = None;
                            return self.corrupt(problem);
                        }
                        None => self.on_corrupt = None,
                    }
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn reader(parts: &[&'static [u8]]) -> BlobReader {
        let chunks: Vec<std::io::Result<Bytes>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        BlobReader { len: 0, stream: Box::pin(futures::stream::iter(chunks)) }
    }

    fn key_of(bytes: &[u8]) -> BlobKey {
        BlobKey::from_digest(&Sha256::digest(bytes).into())
    }

    #[tokio::test]
    async fn a_good_copy_reads_back() {
        let bytes = read_checked(reader(&[b"hel", b"lo"]), &key_of(b"hello"), 5).await.unwrap();
        assert_eq!(&bytes[..], b"hello");
    }

    #[tokio::test]
    async fn a_flipped_byte_or_a_short_copy_is_corrupt() {
        assert!(matches!(read_checked(reader(&[b"hellO"]), &key_of(b"hello"), 5).await, Err(ReadError::Corrupt(_))));
        assert!(matches!(read_checked(reader(&[b"hell"]), &key_of(b"hello"), 5).await, Err(ReadError::Corrupt(_))));
    }

    #[tokio::test]
    async fn a_streamed_corrupt_copy_ends_in_an_error_and_is_reported_once() {
        let reported = Arc::new(Mutex::new(Vec::new()));
        let sink = reported.clone();
        let stream = checked_stream(reader(&[b"hel", b"lO"]).stream, key_of(b"hello"), 5, move |problem| {
            sink.lock().unwrap().push(problem);
        });
        let items: Vec<std::io::Result<Bytes>> = stream.collect().await;
        // The first chunk passes; the last is held back and replaced by the error.
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap(), &Bytes::from_static(b"hel"));
        assert!(items[1].is_err());
        assert_eq!(reported.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_streamed_good_copy_passes_untouched() {
        let stream = checked_stream(reader(&[b"hel", b"lo"]).stream, key_of(b"hello"), 5, |_| panic!("not corrupt"));
        let items: Vec<Bytes> = stream.map(Result::unwrap).collect().await;
        assert_eq!(items.concat(), b"hello");
    }
}
