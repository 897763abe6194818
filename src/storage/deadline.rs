//! Deadlines on calls to shards, so a shard that answers late costs a bounded wait (DESIGN
//! invariants 4 and 5: "slow is the new down").
//!
//! - A write on the request path has [`Deadlines::write_for`]: past it, the router writes to
//!   the next shard of the preference list as if the shard were down.
//! - A call that moves no body (HEAD, DELETE) has [`Deadlines::control`]: these run under the
//!   blob's lock (on SQLite, the database's write lock), so they must be short.
//! - A body being read has an idle timeout ([`Deadlines::body_idle`], see [`idle_timeout`]): a
//!   stream that stops moving fails instead of holding a worker, a lease or a client forever.
//!
//! Every deadline that passes is a [`StorageError::DeadlineExceeded`], which the circuit breaker
//! counts as a failure: a shard whose calls keep running out of time opens like a dead one.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{ByteStream, StorageError, StorageResult};

/// How long the router waits on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A write of an empty body on the request path (the base of [`Deadlines::write_for`]).
    pub write: Duration,
    /// The slowest write rate accepted, in bytes per second: a body of `len` bytes gets
    /// `len / write_min_bytes_per_sec` on top of `write`. `None`: no allowance for size.
    pub write_min_bytes_per_sec: Option<u64>,
    /// A call that moves no body: HEAD, DELETE.
    pub control: Duration,
    /// How long a body being read may go without a single byte.
    pub body_idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            write: Duration::from_secs(5),
            write_min_bytes_per_sec: Some(10 * 1024 * 1024),
            control: Duration::from_secs(1),
            body_idle: Duration::from_secs(10),
        }
    }
}

impl Deadlines {
    /// The deadline of a write of `len` bytes: the base, plus the time the body takes at the
    /// slowest accepted rate.
    pub fn write_for(&self, len: u64) -> Duration {
        let transfer = match self.write_min_bytes_per_sec {
            Some(rate) if rate > 0 => Duration::from_secs_f64(len as f64 / rate as f64),
            _ => Duration::ZERO,
        };
        self.write + transfer
    }
}

/// Runs `call`, failing with [`StorageError::DeadlineExceeded`] if it has not finished within
/// `deadline`. The call is dropped (cancelled) then.
pub async fn within<T>(
    operation: &'static str,
    deadline: Duration,
    call: impl Future<Output = StorageResult<T>>,
) -> StorageResult<T> {
    match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(StorageError::DeadlineExceeded { operation, deadline }),
    }
}

/// Wraps a body so that it fails with `TimedOut` when no byte arrives for `idle` while its
/// reader waits. Only time spent waiting on the shard counts: a reader that is slow to ask for
/// the next chunk (a slow client) never trips it.
pub fn idle_timeout(stream: ByteStream, idle: Duration) -> ByteStream {
    Box::pin(IdleTimeout { inner: stream, idle, timer: None, done: false })
}

struct IdleTimeout {
    inner: ByteStream,
    idle: Duration,
    /// Armed when the reader first waits on the shard; disarmed by every chunk.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl Stream for IdleTimeout {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                self.timer = None;
                self.done = item.is_none();
                Poll::Ready(item)
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        self.done = true;
                        self.timer = None;
                        let message = format!("the shard sent no byte of the body for {} ms", idle.as_millis());
                        Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message))))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_writes_get_time_for_their_bytes() {
        let deadlines = Deadlines::default();
        assert_eq!(deadlines.write_for(0), Duration::from_secs(5));
        assert_eq!(deadlines.write_for(50 * 1024 * 1024), Duration::from_secs(10));
        let fixed = Deadlines { write_min_bytes_per_sec: None, ..deadlines };
        assert_eq!(fixed.write_for(50 * 1024 * 1024), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_cancelled_with_an_error() {
        let result = within("write", Duration::from_millis(20), std::future::pending::<StorageResult<()>>()).await;
        let error = result.unwrap_err();
        assert!(matches!(error, StorageError::DeadlineExceeded { operation: "write", .. }), "{error}");
        assert!(error.is_unavailable(), "a late shard fails over like a dead one");
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_time() {
        let stalled = futures::stream::iter([Ok(Bytes::from_static(b"first"))]).chain(futures::stream::pending());
        let mut body = idle_timeout(Box::pin(stalled), Duration::from_millis(50));
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"first"));
        let started = std::time::Instant::now();
        let error = body.next().await.unwrap().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(body.next().await.is_none(), "the body ends after its error");
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_a_stall() {
        let chunks = futures::stream::iter([Ok(Bytes::from_static(b"a")), Ok(Bytes::from_static(b"b"))]);
        let mut body = idle_timeout(Box::pin(chunks), Duration::from_millis(20));
        assert!(body.next().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(60)).await; // the reader dawdles, not the shard
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"b"));
        assert!(body.next().await.is_none());
    }

    #[tokio::test]
    async fn a_body_that_keeps_moving_never_trips() {
        let trickle = futures::stream::unfold(0, |n| async move {
            (n < 5).then_some(())?;
            tokio::time::sleep(Duration::from_millis(15)).await;
            Some((Ok(Bytes::from_static(b"x")), n + 1))
        });
        let body = idle_timeout(Box::pin(trickle), Duration::from_millis(40));
        let chunks: Vec<_> = body.collect().await;
        assert_eq!(chunks.len(), 5);
        assert!(chunks.iter().all(Result::is_ok));
    }
}
