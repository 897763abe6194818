//! Rebalance: bring every blob's copies to its current write set.
//!
//! The plan is exact, computed from the metadata: for each blob, the shards of its write set
//! that lack a stored copy (moves) and the recorded copies outside it (surplus). Executing a
//! move copies the blob from a stored holder, checks it, records it `Stored`, and only then —
//! under the blob's lock, and only if every shard of the write set holds a stored copy — deletes
//! a surplus copy. So reads never lose their last copy, and a copy is never deleted before its
//! replacement is recorded. An interrupted rebalance resumes by planning again: blobs already
//! in place need nothing.
//!
//! The check under the lock is by size (a HEAD each, within the control deadline). With
//! `verify_kept` (`chitram rebalance --verify`), the copies that stay and that this run did not
//! write are also read whole and their SHA-256 checked before any surplus copy goes: a kept
//! copy that rotted at the right size would otherwise leave the surplus copy as the blob's only
//! good one, and then remove it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::deletion::delete_locked_copy;
use super::deletion::refuse_while_deletion_in_doubt;
use super::progress::Progress;
use super::suspicion::{Finding, report_bad_copy};
use crate::blob::BlobKey;
use crate::metadata::{BlobCopies, CopyRef, MetaResult, MetadataStore, ReplicaState};
use crate::placement::plan::{Move, moves_for, write_set_names};
use crate::placement::ring::{Ring, key_hash};
use crate::replication::copy::{CopyCheck, check_copy, copy_blob};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// Blobs read from the metadata per query while planning.
const PLAN_PAGE: u32 = 500;

/// What one blob needs.
#[derive(Debug, Clone)]
pub struct BlobMoves {
    pub blob: BlobCopies,
    /// Its write set under the new ring.
    pub wanted: Vec<String>,
    pub moves: Vec<Move>,
    /// Recorded copies outside the write set, removed once the write set is complete.
    pub surplus: Vec<String>,
}

/// Copies and bytes that move from one shard to another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairTotal {
    pub copies: u64,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct RebalancePlan {
    pub blobs_scanned: u64,
    /// Referenced blobs with no stored copy at all: nothing can be copied from them.
    pub lost: Vec<BlobKey>,
    pub work: Vec<BlobMoves>,
    pub pairs: BTreeMap<Move, PairTotal>,
}

impl RebalancePlan {
    pub fn copies(&self) -> u64 {
        self.pairs.values().map(|pair| pair.copies).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.pairs.values().map(|pair| pair.bytes).sum()
    }

    pub fn removals(&self) -> u64 {
        self.work.iter().map(|blob| blob.surplus.len() as u64).sum()
    }
}

/// Plans the moves that bring every recorded blob to its write set under `ring`.
pub async fn plan(metadata: &dyn MetadataStore, ring: &Ring, replication_factor: usize) -> MetaResult<RebalancePlan> {
    let mut plan = RebalancePlan::default();
    let mut after: Option<BlobKey> = None;
    loop {
        let page = metadata.list_blob_copies(after.as_ref(), PLAN_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.blob.clone());
        for blob in page {
            plan.blobs_scanned += 1;
            add_blob(&mut plan, blob, ring, replication_factor);
        }
    }
    Ok(plan)
}

fn add_blob(plan: &mut RebalancePlan, blob: BlobCopies, ring: &Ring, replication_factor: usize) {
    if blob.ref_count == 0 {
        return; // Being deleted: its delete tasks remove every copy.
    }
    let holders: Vec<&str> =
        blob.replicas.iter().filter(|r| r.state == ReplicaState::Stored).map(|r| r.shard.as_str()).collect();
    if holders.is_empty() {
        plan.lost.push(blob.blob.clone());
        return;
    }
    let wanted = write_set_names(ring, key_hash(blob.blob.as_str().as_bytes()), replication_factor);
    let moves = moves_for(&holders, &wanted);
    let surplus: Vec<String> = blob
        .replicas
        .iter()
        .filter(|r| r.state != ReplicaState::Deleting && !wanted.contains(&r.shard.as_str()))
        .map(|r| r.shard.clone())
        .collect();
    if moves.is_empty() && surplus.is_empty() {
        return;
    }
    for step in &moves {
        let total = plan.pairs.entry(step.clone()).or_default();
        total.copies += 1;
        total.bytes += blob.size;
    }
    let wanted = wanted.into_iter().map(str::to_owned).collect();
    plan.work.push(BlobMoves { blob, wanted, moves, surplus });
}

#[derive(Debug, Clone)]
pub struct RebalanceOptions {
    /// Blobs moved at once.
    pub concurrency: usize,
    /// Cap on copied bytes per second (`None`: no cap).
    pub bytes_per_sec: Option<u64>,
    pub spool_dir: Option<PathBuf>,
    /// Read the kept copies this run did not write and check their SHA-256 before removing a
    /// surplus copy (see the module documentation).
    pub verify_kept: bool,
    /// Cancelled: no new blob is started; those in flight finish.
    pub stop: CancellationToken,
}

#[derive(Debug, Default)]
pub struct RebalanceSummary {
    pub blobs_done: u64,
    pub copies_made: u64,
    pub bytes_copied: u64,
    pub copies_removed: u64,
    /// Surplus copies kept because the write set was not complete (a copy failed).
    pub copies_kept: u64,
    pub failures: Vec<(BlobKey, String)>,
    pub interrupted: bool,
    pub elapsed: Duration,
}

/// Carries out a plan. Safe while the service serves traffic (see the module doc).
pub async fn execute(
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    plan: RebalancePlan,
    options: &RebalanceOptions,
    progress: &dyn Progress,
) -> RebalanceSummary {
    let started = Instant::now();
    progress.start("rebalancing blobs", plan.work.len() as u64, plan.bytes());
    let limiter = Arc::new(Bandwidth::new(options.bytes_per_sec));
    let mut summary = RebalanceSummary::default();
    let mut outcomes = futures::stream::iter(plan.work)
        .take_while(|_| std::future::ready(!options.stop.is_cancelled()))
        .map(|blob| {
            let (metadata, router, limiter) = (metadata.clone(), router.clone(), limiter.clone());
            async move { move_blob(metadata.as_ref(), &router, &blob, options, &limiter).await }
        })
        .buffer_unordered(options.concurrency.max(1));
    while let Some(outcome) = outcomes.next().await {
        progress.advance(1, outcome.bytes_copied);
        summary.blobs_done += 1;
        summary.copies_made += outcome.copies_made;
        summary.bytes_copied += outcome.bytes_copied;
        summary.copies_removed += outcome.copies_removed;
        summary.copies_kept += outcome.copies_kept;
        if let Some(failure) = outcome.failure {
            summary.failures.push(failure);
        }
    }
    progress.finish();
    summary.interrupted = options.stop.is_cancelled();
    summary.elapsed = started.elapsed();
    summary
}

#[derive(Debug, Default)]
struct BlobOutcome {
    copies_made: u64,
    bytes_copied: u64,
    copies_removed: u64,
    copies_kept: u64,
    failure: Option<(BlobKey, String)>,
}

async fn move_blob(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobMoves,
    options: &RebalanceOptions,
    limiter: &Bandwidth,
) -> BlobOutcome {
    let mut outcome = BlobOutcome::default();
    let key = &blob.blob.blob;
    for step in &blob.moves {
        let target = CopyRef { blob: key.clone(), shard: step.to.clone() };
        if let Err(problem) = refuse_while_deletion_in_doubt(metadata, &target).await {
            outcome.failure = Some((key.clone(), problem));
            break;
        }
        limiter.take(blob.blob.size).await;
        if let Err(problem) = copy_blob(metadata, router, &blob.blob, &step.to, options.spool_dir.clone()).await {
            outcome.failure = Some((key.clone(), format!("copying to {}: {problem}", step.to)));
            break;
        }
        match metadata.record_stored_copy(&target).await {
            Ok(true) => {
                outcome.copies_made += 1;
                outcome.bytes_copied += blob.blob.size;
            }
            // The blob lost its last reference meanwhile (the new copy is queued for deletion),
            // or a deletion on the shard is in doubt (recorded `missing`, its repair queued):
            // either way no surplus copy may go now.
            Ok(false) => return outcome,
            Err(error) => {
                outcome.failure =
                    Some((key.clone(), format!("recording the copy on {}: {}", step.to, error_chain(&error))));
                break;
            }
        }
    }
    if options.verify_kept
        && !blob.surplus.is_empty()
        && let Some(problem) = first_bad_kept_copy(metadata, router, blob, options, limiter).await
    {
        outcome.copies_kept += blob.surplus.len() as u64;
        outcome.failure.get_or_insert((key.clone(), problem));
        return outcome;
    }
    for shard in &blob.surplus {
        match remove_surplus(metadata, router, &blob.blob, shard, &blob.wanted).await {
            Ok(true) => outcome.copies_removed += 1,
            Ok(false) => outcome.copies_kept += 1,
            Err(problem) => {
                outcome.copies_kept += 1;
                outcome.failure.get_or_insert((key.clone(), format!("removing the copy on {shard}: {problem}")));
            }
        }
    }
    outcome
}

/// Deletes one surplus copy under the blob's lock; `false` when it must stay (the write set
/// is not completely stored). The copies it keeps are checked on their shards first, under the
/// same lock and within the router's control deadline: the metadata says they are stored, but a
/// copy is only removed once its replacements are seen to exist.
async fn remove_surplus(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobCopies,
    shard: &str,
    wanted: &[String],
) -> Result<bool, String> {
    let copy = CopyRef { blob: blob.blob.clone(), shard: shard.to_owned() };
    let Some(guard) = metadata.lock_surplus_copy(&copy, wanted).await.map_err(|e| error_chain(&e))? else {
        return Ok(false);
    };
    if let Some((kept, trouble)) = first_unconfirmed_copy(router, blob, wanted).await {
        drop(guard); // Released first: the re-check of a bad copy takes the same lock.
        if let KeptCopy::Bad(finding) = trouble {
            let kept_copy = CopyRef { blob: blob.blob.clone(), shard: kept.clone() };
            report_bad_copy(metadata, router, &kept_copy, blob.size, finding).await;
        }
        return Err(format!("the kept copy on {kept} is not confirmed ({trouble}); the surplus copy stays"));
    }
    delete_locked_copy(router, guard, shard, &blob.blob).await?;
    Ok(true)
}

/// Reads each copy of the write set that was there before this run (a move's copy was written
/// from bytes checked against the SHA-256) and checks its bytes. The first that is bad is
/// reported (re-checked and recorded `missing`, its repair queued) and, like one that cannot be
/// read, keeps every surplus copy: returns why.
async fn first_bad_kept_copy(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobMoves,
    options: &RebalanceOptions,
    limiter: &Bandwidth,
) -> Option<String> {
    let written: Vec<&str> = blob.moves.iter().map(|step| step.to.as_str()).collect();
    for kept in blob.wanted.iter().filter(|shard| !written.contains(&shard.as_str())) {
        limiter.take(blob.blob.size).await;
        match check_copy(router, &blob.blob, kept, true, options.spool_dir.clone()).await {
            CopyCheck::Good => {}
            CopyCheck::Bad(finding, detail) => {
                let copy = CopyRef { blob: blob.blob.blob.clone(), shard: kept.clone() };
                report_bad_copy(metadata, router, &copy, blob.blob.size, finding).await;
                return Some(format!("the kept copy on {kept} is bad ({detail}); the surplus copies stay"));
            }
            CopyCheck::Unreachable(problem) => {
                return Some(format!("the kept copy on {kept} could not be read ({problem}); the surplus copies stay"));
            }
        }
    }
    None
}

/// Why a copy that rebalance keeps could not be confirmed.
enum KeptCopy {
    Bad(Finding),
    Unchecked(String),
}

impl std::fmt::Display for KeptCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeptCopy::Bad(finding) => write!(f, "{finding:?}"),
            KeptCopy::Unchecked(reason) => f.write_str(reason),
        }
    }
}

/// The first of `wanted` whose copy is not on its shard at the blob's size, with why.
async fn first_unconfirmed_copy(
    router: &StorageRouter,
    blob: &BlobCopies,
    wanted: &[String],
) -> Option<(String, KeptCopy)> {
    for kept in wanted {
        let trouble = match router.fetch_len_on(kept, &blob.blob).await {
            Ok(len) if len == blob.size => continue,
            Ok(_) => KeptCopy::Bad(Finding::WrongSize),
            Err(error) if error.is_not_found() => KeptCopy::Bad(Finding::Absent),
            Err(error) => KeptCopy::Unchecked(error_chain(&error)),
        };
        return Some((kept.clone(), trouble));
    }
    None
}

/// A cap on copied bytes per second, shared by the concurrent moves.
struct Bandwidth {
    bytes_per_sec: Option<u64>,
    started: Instant,
    taken: AtomicU64,
}

impl Bandwidth {
    fn new(bytes_per_sec: Option<u64>) -> Self {
        Self { bytes_per_sec, started: Instant::now(), taken: AtomicU64::new(0) }
    }

    /// Waits until copying `bytes` more keeps the average under the cap.
    async fn take(&self, bytes: u64) {
        let Some(rate) = self.bytes_per_sec.filter(|rate| *rate > 0) else { return };
        let taken = self.taken.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = Duration::from_secs_f64(taken as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::Replica;
    use crate::placement::ring::RingMember;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| RingMember { name: (*n).to_owned(), weight: 1 }).collect(), 64).unwrap()
    }

    fn blob(seed: u8, stored: &[&str]) -> BlobCopies {
        BlobCopies {
            blob: BlobKey::from_digest(&[seed; 32]),
            size: 100,
            ref_count: 1,
            replicas: stored.iter().map(|s| Replica { shard: (*s).to_owned(), state: ReplicaState::Stored }).collect(),
        }
    }

    #[test]
    fn a_blob_already_in_place_needs_nothing_and_a_lost_one_is_reported() {
        let ring = ring(&["a", "b", "c"]);
        let mut plan = RebalancePlan::default();
        let key = BlobKey::from_digest(&[1; 32]);
        let wanted = write_set_names(&ring, key_hash(key.as_str().as_bytes()), 2);
        add_blob(&mut plan, blob(1, &wanted), &ring, 2);
        assert!(plan.work.is_empty());
        add_blob(&mut plan, blob(2, &[]), &ring, 2);
        assert_eq!(plan.lost.len(), 1);
    }

    #[test]
    fn a_blob_on_the_wrong_shards_moves_and_counts_its_bytes() {
        let ring = ring(&["a", "b", "c", "d"]);
        let mut plan = RebalancePlan::default();
        for seed in 0..50 {
            add_blob(&mut plan, blob(seed, &["a", "b"]), &ring, 2);
        }
        assert!(!plan.work.is_empty());
        assert_eq!(plan.bytes(), plan.copies() * 100);
        for work in &plan.work {
            assert_eq!(work.moves.len(), work.surplus.len(), "each move replaces a surplus copy");
        }
    }

    #[tokio::test]
    async fn bandwidth_is_capped() {
        let limiter = Bandwidth::new(Some(1_000_000));
        let started = Instant::now();
        for _ in 0..3 {
            limiter.take(100_000).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    }
}
