//! Scrub: check every recorded copy, restore what is below the replication factor, and find
//! objects no row references.
//!
//! 1. Copies: every `Stored` copy of every referenced blob is checked for existence and size,
//!    and with `verify_checksums` for its SHA-256 (read through a spool file, so memory stays
//!    bounded). A bad copy is checked again under the blob's lock before it counts (scrub works
//!    from pages of the metadata, which rebalance or an upload may have changed since): one still
//!    recorded `stored` and still bad is reported, and with `repair` recorded `Missing` (queueing
//!    its repair). Every `Missing` copy is verified in full: a mark is a suspicion, and bytes
//!    that verify (a disk that came back) are recorded `stored` again with `repair`. Then the
//!    blob is restored right away onto the shards of its write set that lack a good copy. A
//!    referenced blob with no good copy anywhere is reported as lost — never dropped: its images
//!    keep their rows so an operator can restore the bytes from a backup.
//! 2. Orphans: objects on a shard that no copy row names, older than the grace period (younger
//!    ones may be uploads between their write and their commit). An object whose bytes are a
//!    referenced blob with no good copy (a backup an operator put back) is adopted with `repair`:
//!    recorded `stored` and restored onto the blob's write set. Others are deleted with
//!    `repair`, under the blob's lock, so an upload of the same bytes racing with the scrub is
//!    safe. Temporary files that crashed writes left, older than the grace period, go too.
//!
//! Shards that cannot be reached are reported and skipped: scrub judges no copy it cannot see.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::deletion::delete_unrecorded_object;
use super::deletion::refuse_while_deletion_in_doubt;
use super::progress::Progress;
use super::suspicion::{Verdict, recheck_copy};
use crate::blob::BlobKey;
use crate::metadata::{BlobCopies, CopyRef, MetaResult, MetadataStore, Replica, ReplicaState};
use crate::replication::copy::{CopyCheck, check_copy, copy_blob};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// Blobs read from the metadata per query; the background scrub saves its place after each.
const PAGE: u32 = 200;
/// Objects listed from a shard per request.
const LIST_PAGE: usize = 1000;
/// The job name under which the background scrub saves its place.
pub const JOB: &str = "scrub";

#[derive(Debug, Clone)]
pub struct ScrubOptions {
    pub repair: bool,
    pub verify_checksums: bool,
    pub orphan_grace: Duration,
    /// Pace: at most this many copies checked per second (`None`: as fast as possible).
    pub copies_per_sec: Option<u32>,
    pub spool_dir: Option<PathBuf>,
    /// Start where the last interrupted run stopped, and save the place as it goes.
    pub resume: bool,
    pub stop: CancellationToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub shard: String,
    pub key: BlobKey,
    pub len: u64,
    pub age: Duration,
}

#[derive(Debug, Default)]
pub struct ScrubReport {
    pub blobs_checked: u64,
    pub copies_checked: u64,
    /// Copies found absent, of the wrong size, or with the wrong checksum (and still so when
    /// checked again under the blob's lock).
    pub bad_copies: Vec<(CopyRef, String)>,
    /// Copies marked `missing` whose bytes verify (recorded `stored` again with `repair`).
    pub recovered: Vec<CopyRef>,
    /// Objects no row named whose bytes are a blob with no good copy (adopted with `repair`).
    pub adopted: Vec<CopyRef>,
    /// Temporary files of interrupted writes removed (with `repair`).
    pub stale_temporaries_removed: u64,
    /// Blobs with fewer good copies than the replication factor.
    pub under_replicated: u64,
    /// Copies made to restore them (with `repair`).
    pub restored: u64,
    /// Referenced blobs with no good copy anywhere, with their reference counts.
    pub lost: Vec<(BlobKey, u64)>,
    pub orphans: Vec<Orphan>,
    pub orphans_deleted: u64,
    /// Shards that could not be checked, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Problems while repairing.
    pub repair_failures: Vec<(BlobKey, String)>,
    pub interrupted: bool,
    pub elapsed: Duration,
}

impl ScrubReport {
    fn note_unreachable(&mut self, shard: &str, reason: String) {
        if !self.unreachable.iter().any(|(name, _)| name == shard) {
            self.unreachable.push((shard.to_owned(), reason));
        }
    }
}

pub async fn scrub(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    options: &ScrubOptions,
    progress: &dyn Progress,
) -> MetaResult<ScrubReport> {
    let started = Instant::now();
    let mut report = ScrubReport::default();
    let to_check: u64 = metadata
        .shard_usage()
        .await?
        .iter()
        .filter(|u| matches!(u.state, ReplicaState::Stored | ReplicaState::Missing))
        .map(|u| u.copies)
        .sum();
    progress.start("checking copies", to_check, 0);
    check_copies(metadata, router, options, progress, &mut report).await?;
    progress.finish();
    if !options.stop.is_cancelled() {
        find_orphans(metadata, router, options, &mut report).await?;
    }
    report.interrupted = options.stop.is_cancelled();
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn check_copies(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    options: &ScrubOptions,
    progress: &dyn Progress,
    report: &mut ScrubReport,
) -> MetaResult<()> {
    let mut after = if options.resume { metadata.load_job_cursor(JOB).await? } else { None };
    let pace = options.copies_per_sec.map(|rate| Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    loop {
        let page = metadata.list_blob_copies(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.blob.clone());
        for blob in page.iter().filter(|blob| blob.ref_count > 0) {
            if options.stop.is_cancelled() {
                return Ok(());
            }
            check_blob(metadata, router, blob, options, pace, progress, report).await?;
        }
        if options.resume {
            metadata.save_job_cursor(JOB, after.as_ref()).await?;
        }
    }
    if options.resume {
        metadata.save_job_cursor(JOB, None).await?;
    }
    Ok(())
}

async fn check_blob(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobCopies,
    options: &ScrubOptions,
    pace: Option<Duration>,
    progress: &dyn Progress,
    report: &mut ScrubReport,
) -> MetaResult<()> {
    report.blobs_checked += 1;
    let mut good = Vec::new();
    let mut unseen = 0;
    let mut stale = false;
    let checked = blob.replicas.iter().filter(|r| matches!(r.state, ReplicaState::Stored | ReplicaState::Missing));
    for replica in checked {
        if let Some(pause) = pace {
            tokio::time::sleep(pause).await;
        }
        report.copies_checked += 1;
        progress.advance(1, 0);
        let copy = CopyRef { blob: blob.blob.clone(), shard: replica.shard.clone() };
        // A missing copy is verified in full: only its bytes can clear it.
        let verify = options.verify_checksums || replica.state == ReplicaState::Missing;
        match check_copy(router, blob, &replica.shard, verify, options.spool_dir.clone()).await {
            CopyCheck::Good => {
                if replica.state == ReplicaState::Missing {
                    // Not if the copy was removed or changed meanwhile (its bytes may be gone):
                    // judged below from a fresh read.
                    if options.repair && !metadata.restore_missing_copy(&copy).await? {
                        stale = true;
                        continue;
                    }
                    report.recovered.push(copy);
                }
                good.push(replica.shard.clone());
            }
            // Still missing: already known, its repair already queued.
            CopyCheck::Bad(..) if replica.state == ReplicaState::Missing => {}
            CopyCheck::Bad(finding, problem) => {
                match recheck_copy(metadata, router, &copy, blob.size, finding, options.repair).await? {
                    Verdict::Confirmed => report.bad_copies.push((copy, problem)),
                    // Moved or rewritten since the page was read: judged below from a fresh read.
                    Verdict::FalseAlarm => stale = true,
                    Verdict::Undecided(reason) => {
                        unseen += 1;
                        report.note_unreachable(&replica.shard, reason);
                    }
                }
            }
            CopyCheck::Unreachable(reason) => {
                unseen += 1;
                report.note_unreachable(&replica.shard, reason);
            }
        }
    }
    if stale && good.len() < router.replication_factor() {
        add_fresh_stored_copies(metadata, &blob.blob, &mut good, report).await?;
    }
    if good.is_empty() && unseen == 0 {
        report.lost.push((blob.blob.clone(), blob.ref_count));
        return Ok(());
    }
    // Enough good copies, wherever they are: moving them into place is rebalance's work, and
    // a scrub that overlaps a rebalance must not count (or redo) its moves.
    if good.len() >= router.replication_factor() {
        return Ok(());
    }
    report.under_replicated += 1;
    if options.repair && !good.is_empty() {
        restore(metadata, router, &blob.blob, &good, options, report).await?;
    }
    Ok(())
}

/// Counts as good the copies recorded `stored` now that the page did not show (another worker,
/// rebalance say, wrote and verified them since), except those this scrub found bad.
async fn add_fresh_stored_copies(
    metadata: &dyn MetadataStore,
    key: &BlobKey,
    good: &mut Vec<String>,
    report: &ScrubReport,
) -> MetaResult<()> {
    let Some(fresh) = metadata.find_blob_copies(key).await? else { return Ok(()) };
    for replica in fresh.replicas.into_iter().filter(|r| r.state == ReplicaState::Stored) {
        let found_bad = report.bad_copies.iter().any(|(copy, _)| &copy.blob == key && copy.shard == replica.shard);
        if !found_bad && !good.contains(&replica.shard) {
            good.push(replica.shard);
        }
    }
    Ok(())
}

/// Copies the blob from its good holders onto the write-set shards that lack a stored copy.
/// The blob's copies are read again first: a scrub page may be stale, and a copy that another
/// worker (replication, rebalance) has stored since needs no restoring and is not counted.
async fn restore(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    key: &BlobKey,
    good: &[String],
    options: &ScrubOptions,
    report: &mut ScrubReport,
) -> MetaResult<()> {
    let Some(fresh) = metadata.find_blob_copies(key).await? else { return Ok(()) };
    let stored_now =
        |shard: &String| fresh.replicas.iter().any(|r| &r.shard == shard && r.state == ReplicaState::Stored);
    // Copy only from holders that passed the check.
    let sources = BlobCopies {
        replicas: good.iter().map(|shard| Replica { shard: shard.clone(), state: ReplicaState::Stored }).collect(),
        ..fresh.clone()
    };
    for target in router.write_set(key).iter().filter(|shard| !good.contains(shard) && !stored_now(shard)) {
        let copy = CopyRef { blob: key.clone(), shard: target.clone() };
        let copied = match refuse_while_deletion_in_doubt(metadata, &copy).await {
            Ok(()) => copy_blob(metadata, router, &sources, target, options.spool_dir.clone()).await,
            Err(problem) => Err(problem),
        };
        match copied {
            Ok(()) => {
                if metadata.record_stored_copy(&copy).await? {
                    report.restored += 1;
                }
            }
            Err(problem) => report.repair_failures.push((key.clone(), format!("restoring onto {target}: {problem}"))),
        }
    }
    Ok(())
}

async fn find_orphans(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    options: &ScrubOptions,
    report: &mut ScrubReport,
) -> MetaResult<()> {
    for shard in router.shards() {
        let mut after: Option<BlobKey> = None;
        loop {
            if options.stop.is_cancelled() {
                return Ok(());
            }
            let objects = match router.list_on(&shard.name, after.as_ref(), LIST_PAGE).await {
                Ok(objects) => objects,
                Err(error) => {
                    report.note_unreachable(&shard.name, error_chain(&error));
                    break;
                }
            };
            let Some(last) = objects.last() else { break };
            after = Some(last.key.clone());
            for object in objects {
                let age = SystemTime::now().duration_since(object.modified).unwrap_or_default();
                let recorded = metadata.find_blob_copies(&object.key).await?;
                let holders = recorded.as_ref().map_or(&[][..], |blob| &blob.replicas[..]);
                if age < options.orphan_grace || holders.iter().any(|r| r.shard == shard.name) {
                    continue;
                }
                if let Some(blob) = recorded.as_ref().filter(|blob| needs_a_good_copy(blob)) {
                    match adopt(metadata, router, blob, &shard.name, options, report).await? {
                        Adoption::Adopted => continue,
                        // Perhaps the only good bytes of a lost blob: kept until a check can tell.
                        Adoption::Unchecked(problem) => {
                            let problem = format!("a possible backup on {} is kept unchecked: {problem}", shard.name);
                            report.repair_failures.push((object.key, problem));
                            continue;
                        }
                        Adoption::NotTheBlob => {}
                    }
                }
                let orphan = Orphan { shard: shard.name.clone(), key: object.key, len: object.len, age };
                if options.repair && delete_orphan(metadata, router, &orphan).await? {
                    report.orphans_deleted += 1;
                }
                report.orphans.push(orphan);
            }
        }
        if options.repair {
            match router.shard(&shard.name) {
                Ok(found) => match found.store.remove_stale_temporaries(options.orphan_grace).await {
                    Ok(removed) => report.stale_temporaries_removed += removed,
                    Err(error) => report.note_unreachable(&shard.name, error_chain(&error)),
                },
                Err(error) => report.note_unreachable(&shard.name, error.to_string()),
            }
        }
    }
    Ok(())
}

/// A referenced blob none of whose copies is `stored`: what a restored backup is for.
fn needs_a_good_copy(blob: &BlobCopies) -> bool {
    blob.ref_count > 0 && !blob.replicas.iter().any(|r| r.state == ReplicaState::Stored)
}

/// What an unrecorded object of a blob that has no good copy turned out to be.
enum Adoption {
    /// Its bytes verify: it is the blob's copy now (recorded, with `repair`).
    Adopted,
    /// Absent by now, or not the blob's bytes: an orphan like any other.
    NotTheBlob,
    /// Its bytes could not be read (a shard that stalls, a full spool directory): nothing can
    /// be said, so it must not be deleted.
    Unchecked(String),
}

/// Adopts an unrecorded object as a copy of a blob that has no good copy, if its bytes verify:
/// records it `stored` (with `repair`) and restores the blob onto its write set.
async fn adopt(
    metadata: &dyn MetadataStore,
    router: &StorageRouter,
    blob: &BlobCopies,
    shard: &str,
    options: &ScrubOptions,
    report: &mut ScrubReport,
) -> MetaResult<Adoption> {
    match check_copy(router, blob, shard, true, options.spool_dir.clone()).await {
        CopyCheck::Good => {}
        CopyCheck::Bad(..) => return Ok(Adoption::NotTheBlob),
        CopyCheck::Unreachable(problem) => return Ok(Adoption::Unchecked(problem)),
    }
    let copy = CopyRef { blob: blob.blob.clone(), shard: shard.to_owned() };
    if options.repair && metadata.record_stored_copy(&copy).await? {
        tracing::info!(%shard, blob = %blob.blob, "adopted a restored copy of a blob that had none");
        restore(metadata, router, &blob.blob, &[shard.to_owned()], options, report).await?;
    }
    report.adopted.push(copy);
    Ok(Adoption::Adopted)
}

async fn delete_orphan(metadata: &dyn MetadataStore, router: &StorageRouter, orphan: &Orphan) -> MetaResult<bool> {
    delete_unrecorded_object(metadata, router, &orphan.shard, &orphan.key, orphan.len).await
}

/// Runs a scrub with repair every `interval`, paced, resuming where an interrupted run stopped:
/// a run that a restart interrupted goes on at once, not an interval later.
pub async fn run_periodic(
    metadata: std::sync::Arc<dyn MetadataStore>,
    router: std::sync::Arc<StorageRouter>,
    interval: Duration,
    options: ScrubOptions,
) {
    let mut first = true;
    loop {
        let interrupted_run = first && matches!(metadata.load_job_cursor(JOB).await, Ok(Some(_)));
        first = false;
        if interrupted_run {
            tracing::info!("resuming the background scrub a restart interrupted");
        } else {
            tokio::select! {
                () = options.stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
        match scrub(metadata.as_ref(), &router, &options, &super::progress::Silent).await {
            Ok(report) if report.interrupted => {
                tracing::info!("background scrub interrupted; it resumes where it stopped")
            }
            Ok(report) => {
                metrics::counter!(crate::observability::names::SCRUB_RUNS).increment(1);
                tracing::info!(
                    blobs = report.blobs_checked,
                    copies = report.copies_checked,
                    bad = report.bad_copies.len(),
                    recovered = report.recovered.len(),
                    adopted = report.adopted.len(),
                    restored = report.restored,
                    lost = report.lost.len(),
                    orphans = report.orphans.len(),
                    "background scrub finished"
                )
            }
            Err(error) => tracing::warn!(error = %error_chain(&error), "background scrub stopped"),
        }
    }
}
