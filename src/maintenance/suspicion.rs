//! A copy found absent or corrupt is a suspicion, not a verdict (DESIGN invariant 5).
//!
//! Whoever finds a bad copy (a read, a replication worker reading its source, scrub) may be
//! looking through a stale list: rebalance may have moved the copy since, an upload may have
//! written it again, or the shard may have been briefly unreachable in a way that looked like
//! absence. So before a copy is recorded `missing`, the finding is checked again under the
//! blob's lock, where nothing can change the blob's copies: the copy must still be recorded
//! `stored`, and the object must still look bad. A check that does not finish within the
//! router's control deadline (`[latency] control_deadline_ms`) decides nothing: the lock (on
//! SQLite, the whole database's write lock) never waits long on a shard.
//!
//! Even a confirmed mark is not the end: scrub verifies `missing` copies again and restores
//! those whose bytes are good, and repair reads from them when no `stored` copy is left
//! (`replication/copy.rs`).

use crate::metadata::{CopyRef, MetaResult, MetadataStore};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// What was found wrong with a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// The shard said it does not hold the object.
    Absent,
    /// The object's length differs from the blob's.
    WrongSize,
    /// The bytes read did not match the blob's SHA-256.
    WrongBytes,
}

/// What the re-check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The copy is bad (and, when asked to, recorded `missing` with its repair queued).
    Confirmed,
    /// The copy is fine after all, or is no longer recorded `stored`: nothing to do.
    FalseAlarm,
    /// The shard did not answer the re-check (in time); nothing was recorded.
    Undecided(String),
}

/// Re-checks a suspect copy of a blob of `size` bytes under the blob's lock; with `record`, a
/// confirmed copy is recorded `missing` and its repair queued in the same transaction.
pub async fn recheck_copy(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    copy: &CopyRef,
    size: u64,
    finding: Finding,
    record: bool,
) -> MetaResult<Verdict> {
    let Some(guard) = metadata.lock_stored_copy(copy).await? else {
        return Ok(Verdict::FalseAlarm);
    };
    let verdict = match router.fetch_len_on(&copy.shard, &copy.blob).await {
        Err(error) if error.is_not_found() => Verdict::Confirmed,
        Err(error) => Verdict::Undecided(error_chain(&error)),
        Ok(len) if len != size => Verdict::Confirmed,
        // Present at the right length: absence and size were passing states, but bytes that
        // hashed wrong stay wrong.
        Ok(_) if finding == Finding::WrongBytes => Verdict::Confirmed,
        Ok(_) => Verdict::FalseAlarm,
    };
    if verdict == Verdict::Confirmed && record {
        guard.confirm_missing().await?;
    }
    Ok(verdict)
}

/// Re-checks a suspect copy and records it `missing` if it is bad; best effort, for paths that
/// go on regardless (a read trying the next holder). Logs what it decided.
pub async fn report_bad_copy(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    copy: &CopyRef,
    size: u64,
    finding: Finding,
) {
    match recheck_copy(metadata, router, copy, size, finding, true).await {
        Ok(Verdict::Confirmed) => {
            tracing::warn!(shard = %copy.shard, blob = %copy.blob, ?finding, "copy recorded missing; repair queued")
        }
        Ok(Verdict::FalseAlarm) => {
            tracing::info!(shard = %copy.shard, blob = %copy.blob, ?finding, "suspect copy is fine after all")
        }
        Ok(Verdict::Undecided(reason)) => {
            tracing::warn!(shard = %copy.shard, blob = %copy.blob, ?finding, %reason, "suspect copy left as it is")
        }
        Err(error) => tracing::warn!(shard = %copy.shard, blob = %copy.blob, error = %error_chain(&error),
            "could not re-check a suspect copy"),
    }
}
