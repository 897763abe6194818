//! Making one copy of a blob: read it from a stored holder, check it, write it to the target,
//! check the target. Used by the replication workers, rebalance and scrub alike.

use std::path::PathBuf;

use crate::blob::BlobKey;
use crate::images::spool::{SpoolError, SpoolLimits, SpooledBody, spool_body};
use crate::metadata::{BlobCopies, CopyRef, MetadataStore, ReplicaState};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// Copies `blob` onto `target` from the first stored holder (other than `target`) whose bytes
/// match the blob's SHA-256 and size, spooling through `spool_dir` so memory stays bounded. A
/// holder found absent or corrupt on the way is recorded `Missing`, its repair queued. Records
/// nothing about `target`: the caller does, once this returns `Ok`.
pub async fn copy_blob(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobCopies,
    target: &str,
    spool_dir: Option<PathBuf>,
) -> Result<(), String> {
    let spooled = fetch_checked_copy(metadata, router, blob, target, spool_dir).await?;
    router.write_on(target, &blob.blob, &spooled.body).await.map_err(|e| error_chain(&e))?;
    let written = router.fetch_len_on(target, &blob.blob).await.map_err(|e| error_chain(&e))?;
    if written != blob.size {
        return Err(format!("the new copy on {target} holds {written} bytes, expected {}", blob.size));
    }
    Ok(())
}

async fn fetch_checked_copy(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobCopies,
    target: &str,
    spool_dir: Option<PathBuf>,
) -> Result<SpooledBody, String> {
    let holders: Vec<&str> = blob
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Stored && r.shard != target)
        .map(|r| r.shard.as_str())
        .collect();
    let limits = SpoolLimits { max_bytes: blob.size, dir: spool_dir };
    let mut problems = Vec::new();
    for source in router.read_order(&blob.blob, &holders) {
        let bad = match fetch_from(router, source, &blob.blob, &limits).await {
            Ok(spooled) if spooled.key == blob.blob && spooled.len == blob.size => return Ok(spooled),
            Ok(spooled) => format!("bad copy ({} bytes, SHA-256 {})", spooled.len, spooled.key),
            Err(FetchError::Absent) => "the object is absent".to_owned(),
            Err(FetchError::Failed(problem)) => {
                problems.push(format!("{source}: {problem}"));
                continue;
            }
        };
        problems.push(format!("{source}: {bad}"));
        queue_repair(metadata, &CopyRef { blob: blob.blob.clone(), shard: source.to_owned() }).await;
    }
    if problems.is_empty() {
        return Err("no stored copy to copy from".to_owned());
    }
    Err(format!("no source copy could be read: {}", problems.join("; ")))
}

enum FetchError {
    Absent,
    Failed(String),
}

async fn fetch_from(
    router: &StorageRouter,
    source: &str,
    key: &BlobKey,
    limits: &SpoolLimits,
) -> Result<SpooledBody, FetchError> {
    let reader = router.open_on(source, key).await.map_err(|error| {
        if error.is_not_found() { FetchError::Absent } else { FetchError::Failed(error_chain(&error)) }
    })?;
    // A copy longer than the recorded size stops at the limit and counts as bad.
    match spool_body(reader.stream, limits).await {
        Ok(spooled) => Ok(spooled),
        Err(SpoolError::TooLarge { .. }) => {
            Err(FetchError::Failed("the copy is longer than the recorded size".to_owned()))
        }
        Err(error) => Err(FetchError::Failed(error_chain(&error))),
    }
}

/// Records a bad copy `Missing` and queues its repair; best effort (logged on failure).
async fn queue_repair(metadata: &dyn MetadataStore, copy: &CopyRef) {
    if let Err(error) = metadata.record_missing_copy(copy).await {
        tracing::warn!(shard = %copy.shard, blob = %copy.blob, %error, "could not queue the repair of a bad copy");
    }
}
