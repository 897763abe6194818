//! Making one copy of a blob: read it from a holder, check it, write it to the target, check
//! the target. Used by the replication workers, rebalance and scrub alike; and checking one
//! copy, which scrub and repair share.

use std::path::PathBuf;

use crate::blob::BlobKey;
use crate::images::spool::{SpoolError, SpoolLimits, SpooledBody, spool_body};
use crate::maintenance::suspicion::{self, Finding};
use crate::metadata::{BlobCopies, CopyRef, MetadataStore, ReplicaState};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// How one copy looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyCheck {
    Good,
    Bad(Finding, String),
    /// The shard did not answer: nothing can be said about the copy.
    Unreachable(String),
}

/// Checks the copy of `blob` on `shard`: its existence and size, and with `verify_checksum` its
/// SHA-256 (read through a spool file in `spool_dir`, so memory stays bounded).
pub async fn check_copy(
    router: &StorageRouter,
    blob: &BlobCopies,
    shard: &str,
    verify_checksum: bool,
    spool_dir: Option<PathBuf>,
) -> CopyCheck {
    if !verify_checksum {
        return match router.fetch_len_on(shard, &blob.blob).await {
            Ok(len) if len == blob.size => CopyCheck::Good,
            Ok(len) => CopyCheck::Bad(Finding::WrongSize, format!("{len} bytes instead of {}", blob.size)),
            Err(error) if error.is_not_found() => CopyCheck::Bad(Finding::Absent, "the object is absent".to_owned()),
            Err(error) => CopyCheck::Unreachable(error_chain(&error)),
        };
    }
    let limits = SpoolLimits::spooling(blob.size, spool_dir);
    match fetch_from(router, shard, &blob.blob, &limits).await {
        Ok(spooled) if spooled.key == blob.blob && spooled.len == blob.size => CopyCheck::Good,
        Ok(spooled) => {
            CopyCheck::Bad(Finding::WrongBytes, format!("{} bytes with SHA-256 {}", spooled.len, spooled.key))
        }
        Err(FetchError::Absent) => CopyCheck::Bad(Finding::Absent, "the object is absent".to_owned()),
        Err(FetchError::TooLong) => {
            CopyCheck::Bad(Finding::WrongSize, format!("longer than the recorded {} bytes", blob.size))
        }
        Err(FetchError::Failed(problem)) => CopyCheck::Unreachable(problem),
    }
}

/// Copies `blob` onto `target` from the first holder (other than `target`) whose bytes match
/// the blob's SHA-256 and size, spooling through `spool_dir` so memory stays bounded. `stored`
/// holders are tried first; when none serves, `missing` ones are, since a mark is a suspicion
/// and a disk that came back may hold good bytes: one that does is recorded `stored` again.
/// A `stored` holder found bad on the way is re-checked and recorded `missing`. Records nothing
/// about `target`: the caller does, once this returns `Ok`.
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
    let limits = SpoolLimits::spooling(blob.size, spool_dir);
    let mut problems = Vec::new();
    for state in [ReplicaState::Stored, ReplicaState::Missing] {
        let holders: Vec<&str> =
            blob.replicas.iter().filter(|r| r.state == state && r.shard != target).map(|r| r.shard.as_str()).collect();
        for source in router.read_order(&blob.blob, &holders) {
            let copy = CopyRef { blob: blob.blob.clone(), shard: source.to_owned() };
            let (finding, bad) = match fetch_from(router, source, &blob.blob, &limits).await {
                Ok(spooled) if spooled.key == blob.blob && spooled.len == blob.size => {
                    if state == ReplicaState::Missing {
                        restore_missing_copy(metadata, &copy).await;
                    }
                    return Ok(spooled);
                }
                Ok(spooled) => {
                    (Finding::WrongBytes, format!("bad copy ({} bytes, SHA-256 {})", spooled.len, spooled.key))
                }
                Err(FetchError::Absent) => (Finding::Absent, "the object is absent".to_owned()),
                Err(FetchError::TooLong) => {
                    (Finding::WrongSize, "the copy is longer than the recorded size".to_owned())
                }
                Err(FetchError::Failed(problem)) => {
                    problems.push(format!("{source}: {problem}"));
                    continue;
                }
            };
            problems.push(format!("{source} ({state}): {bad}"));
            if state == ReplicaState::Stored {
                suspicion::report_bad_copy(metadata, router, &copy, blob.size, finding).await;
            }
        }
    }
    if problems.is_empty() {
        return Err("no stored or missing copy to copy from".to_owned());
    }
    Err(format!("no source copy could be read: {}", problems.join("; ")))
}

/// A `missing` copy whose bytes verified is `stored` again, if it is still marked missing;
/// best effort (logged on failure).
async fn restore_missing_copy(metadata: &dyn MetadataStore, copy: &CopyRef) {
    match metadata.restore_missing_copy(copy).await {
        Ok(true) => {
            tracing::info!(shard = %copy.shard, blob = %copy.blob, "a copy marked missing verified; stored again")
        }
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(shard = %copy.shard, blob = %copy.blob, %error, "could not restore a verified copy")
        }
    }
}

enum FetchError {
    Absent,
    /// Longer than the recorded size: the spool stopped at the limit.
    TooLong,
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
    match spool_body(reader.stream, limits, None).await {
        Ok(spooled) => Ok(spooled),
        Err(SpoolError::TooLarge { .. }) => Err(FetchError::TooLong),
        Err(error) => Err(FetchError::Failed(error_chain(&error))),
    }
}
