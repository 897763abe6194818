//! Per-shard metrics: every call to a shard's backend is counted, timed and sorted by outcome
//! (`observability::names::SHARD_*`). The router wraps each shard's backend in a
//! [`MeteredStore`], so every caller (requests, workers, scrub, rebalance) is measured alike.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{counter, histogram};
use tracing::Instrument;

use super::{BlobBody, BlobReader, BlobStore, BodyFeed, ShardLabel, StorageError, StorageResult, StoredObject};
use crate::blob::BlobKey;
use crate::observability::names;

#[derive(Debug)]
pub struct MeteredStore {
    shard: String,
    inner: Box<dyn BlobStore>,
}

impl MeteredStore {
    pub fn new(shard: String, inner: Box<dyn BlobStore>) -> Self {
        Self { shard, inner }
    }

    async fn measure<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        let mut measured = Measured { shard: &self.shard, operation, started: Instant::now(), finished: false };
        let span = tracing::info_span!("shard_operation", shard = %self.shard, operation);
        let result = call.instrument(span).await;
        measured.finish(result.as_ref().err());
        result
    }
}

/// One call being measured. Dropped unfinished, the call was cancelled: a deadline ran out
/// around it, or a hedged read's other holder answered first.
struct Measured<'a> {
    shard: &'a str,
    operation: &'static str,
    started: Instant,
    finished: bool,
}

impl Measured<'_> {
    fn finish(&mut self, error: Option<&StorageError>) {
        self.finished = true;
        let outcome = match error {
            None => "ok",
            Some(error) if error.is_not_found() => "not_found",
            Some(error) => {
                counter!(names::SHARD_ERRORS, "shard" => self.shard.to_owned(), "operation" => self.operation, "kind" => error_kind(error))
                    .increment(1);
                "error"
            }
        };
        self.record(outcome, self.started.elapsed());
    }

    fn record(&self, outcome: &'static str, took: Duration) {
        let (shard, operation) = (self.shard.to_owned(), self.operation);
        counter!(names::SHARD_OPERATIONS, "shard" => shard.clone(), "operation" => operation, "outcome" => outcome)
            .increment(1);
        histogram!(names::SHARD_DURATION, "shard" => shard, "operation" => operation).record(took.as_secs_f64());
    }
}

impl Drop for Measured<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record("cancelled", self.started.elapsed());
        }
    }
}

fn error_kind(error: &StorageError) -> &'static str {
    match error {
        StorageError::Unavailable { .. } => "unavailable",
        StorageError::DeadlineExceeded { .. } => "deadline",
        StorageError::AccessDenied(_) => "access_denied",
        StorageError::NotFound(_) | StorageError::Other { .. } => "other",
    }
}

#[async_trait]
impl BlobStore for MeteredStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn write_blob(&self, key: &BlobKey, body: &BlobBody) -> StorageResult<()> {
        self.measure("write", self.inner.write_blob(key, body)).await
    }

    async fn write_blob_feed(&self, key: &BlobKey, feed: BodyFeed) -> StorageResult<()> {
        self.measure("write", self.inner.write_blob_feed(key, feed)).await
    }

    async fn read_blob(&self, key: &BlobKey) -> StorageResult<BlobReader> {
        self.measure("read", self.inner.read_blob(key)).await
    }

    async fn fetch_blob_len(&self, key: &BlobKey) -> StorageResult<u64> {
        self.measure("head", self.inner.fetch_blob_len(key)).await
    }

    async fn delete_blob(&self, key: &BlobKey) -> StorageResult<()> {
        self.measure("delete", self.inner.delete_blob(key)).await
    }

    async fn list_blobs(&self, after: Option<&BlobKey>, limit: usize) -> StorageResult<Vec<StoredObject>> {
        self.measure("list", self.inner.list_blobs(after, limit)).await
    }

    async fn check_health(&self) -> StorageResult<()> {
        self.measure("health", self.inner.check_health()).await
    }

    async fn read_label(&self) -> StorageResult<Option<ShardLabel>> {
        self.inner.read_label().await
    }

    async fn write_label(&self, label: &ShardLabel) -> StorageResult<()> {
        self.inner.write_label(label).await
    }

    async fn remove_stale_temporaries(&self, grace: Duration) -> StorageResult<u64> {
        self.inner.remove_stale_temporaries(grace).await
    }
}
