//! Carrying a download on from the next holder when the one serving it fails mid-body.
//!
//! Blobs over `verify::CHECK_BEFORE_SENDING` stream from the first byte, so by the time a
//! holder's connection breaks (its server died, or went quiet past the body's idle timeout)
//! the client already has part of the body and a new response cannot start over. The copies
//! are the same bytes, so the stream goes on from another holder instead: it reads that copy
//! from the start, skips what was already delivered, and passes on the rest. The checksum is
//! checked over the whole stream above this one (`verify::checked_stream`), so bytes from two
//! holders are delivered as an image only if they are the image.
//!
//! Reading the skipped prefix again costs the second holder that many bytes; storage has no
//! ranged reads, and this path runs only when a shard fails during a download.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::storage::ByteStream;

/// Opens one holder's copy of the blob being read, by shard name.
pub type OpenHolder = Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<ByteStream>> + Send + Sync>;

/// Passes `first` through; if it fails, carries on from `others`, in order.
pub fn resuming(first: ByteStream, others: Vec<String>, open: OpenHolder) -> ByteStream {
    let state = Resume { current: first, others: others.into(), open, delivered: 0, skip: 0, ended: false };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    }))
}

struct Resume {
    current: ByteStream,
    others: VecDeque<String>,
    open: OpenHolder,
    /// Bytes passed on so far, from every holder.
    delivered: u64,
    /// Bytes of the current holder's copy still to drop: delivered from an earlier holder.
    skip: u64,
    ended: bool,
}

impl Resume {
    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.ended {
            return None;
        }
        loop {
            match self.current.next().await {
                Some(Ok(chunk)) => {
                    let Some(chunk) = self.drop_skipped(chunk) else { continue };
                    self.delivered += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
                None => return None,
                Some(Err(error)) => {
                    if !self.switch_holder(&error).await {
                        self.ended = true;
                        return Some(Err(error));
                    }
                }
            }
        }
    }

    /// The part of `chunk` not yet delivered, if any.
    fn drop_skipped(&mut self, chunk: Bytes) -> Option<Bytes> {
        let len = chunk.len() as u64;
        if self.skip >= len {
            self.skip -= len;
            return None;
        }
        let rest = chunk.slice(self.skip as usize..);
        self.skip = 0;
        Some(rest)
    }

    /// Opens the next holder that answers, to read past what was delivered; false when none.
    async fn switch_holder(&mut self, failure: &std::io::Error) -> bool {
        while let Some(shard) = self.others.pop_front() {
            match (self.open)(shard.clone()).await {
                Ok(stream) => {
                    tracing::warn!(%shard, delivered = self.delivered, %failure, "a holder failed mid-body; going on from another");
                    self.current = stream;
                    self.skip = self.delivered;
                    return true;
                }
                Err(error) => tracing::warn!(%shard, %error, "could not open the next holder to go on with a read"),
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]], fail_after: bool) -> ByteStream {
        let mut items: Vec<std::io::Result<Bytes>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        if fail_after {
            items.push(Err(std::io::Error::other("connection reset")));
        }
        Box::pin(futures::stream::iter(items))
    }

    async fn collect(stream: ByteStream) -> (Vec<u8>, bool) {
        let items: Vec<_> = stream.collect().await;
        let failed = items.iter().any(Result::is_err);
        (items.into_iter().filter_map(Result::ok).flatten().collect(), failed)
    }

    #[tokio::test]
    async fn a_failure_mid_body_goes_on_from_the_next_holder_past_what_was_delivered() {
        let open: OpenHolder = Arc::new(|shard| {
            Box::pin(async move {
                match shard.as_str() {
                    "down" => Err(std::io::Error::other("refused")),
                    _ => Ok(chunks(&[b"abc", b"defgh", b"ij"], false)),
                }
            })
        });
        let first = chunks(&[b"ab", b"cd"], true);
        let (bytes, failed) = collect(resuming(first, vec!["down".into(), "b".into()], open)).await;
        assert_eq!(bytes, b"abcdefghij");
        assert!(!failed);
    }

    #[tokio::test]
    async fn with_no_holder_left_the_failure_ends_the_stream() {
        let open: OpenHolder = Arc::new(|_| Box::pin(async { Err(std::io::Error::other("refused")) }));
        let (bytes, failed) = collect(resuming(chunks(&[b"ab"], true), vec!["down".into()], open)).await;
        assert_eq!(bytes, b"ab");
        assert!(failed);
    }
}
