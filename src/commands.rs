//! The operator commands behind `chitram ring`, `chitram rebalance` and `chitram scrub`. Each
//! checks the database and the shards first, shows progress while it works, and returns the
//! report to print and whether everything it found is in order (the exit status). The account
//! commands are in `accounts`.

pub mod accounts;

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::{self, StartError};
use crate::config::Settings;
use crate::maintenance::progress::TerminalProgress;
use crate::maintenance::rebalance::{self, RebalanceOptions, RebalancePlan, RebalanceSummary};
use crate::maintenance::scrub::{self, ScrubOptions, ScrubReport};
use crate::metadata::{MetadataError, MetadataStore, ReplicaState};
use crate::placement::plan::estimate_movement;
use crate::placement::report::ring_report;
use crate::placement::ring::{Ring, RingError};
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// Hypothetical keys for the expected movement of `ring --compare`.
const COMPARE_SAMPLE_KEYS: u64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// A command's report, and whether it ends well.
pub struct Outcome {
    pub report: String,
    pub ok: bool,
}

fn ring_of(settings: &Settings) -> Result<Ring, RingError> {
    Ring::new(settings.ring_members(), settings.placement.vnodes_per_weight)
}

/// `chitram ring [--compare NEW]`.
pub async fn ring(settings: &Settings, compare: Option<&Settings>) -> Result<Outcome, CommandError> {
    let ring = ring_of(settings)?;
    let mut out = ring_report(&ring);
    // The metadata adds what each shard holds; the ring report stands without it.
    let metadata = match app::open_existing_metadata(&settings.database.url).await {
        Ok(metadata) => Some(metadata),
        Err(error) if error.is_absent_database() => return Err(error.into()),
        Err(error) => {
            let _ = writeln!(out, "\n(metadata unavailable, stored copies not shown: {})", error_chain(&error));
            None
        }
    };
    write_shard_states(&mut out, settings, metadata.as_deref()).await?;
    if let Some(new) = compare {
        let new_ring = ring_of(new)?;
        write_expected_movement(&mut out, &ring, &new_ring, new.placement.replication_factor);
        if let Some(metadata) = &metadata {
            let plan = rebalance::plan(metadata.as_ref(), &new_ring, new.placement.replication_factor).await?;
            write_plan(&mut out, &plan, "exactly, from the metadata");
        }
    }
    Ok(Outcome { report: out, ok: true })
}

async fn write_shard_states(
    out: &mut String,
    settings: &Settings,
    metadata: Option<&dyn MetadataStore>,
) -> Result<(), CommandError> {
    let usage = match metadata {
        Some(metadata) => metadata.shard_usage().await?,
        None => Vec::new(),
    };
    let _ = writeln!(out, "\n{:<20} {:<9} {:>14} {:>16}", "shard", "state", "stored copies", "stored bytes");
    for shard in &settings.shards {
        let state = if shard.draining {
            "draining"
        } else if shard.weight == 0 {
            "weight 0"
        } else {
            "active"
        };
        let stored = usage.iter().find(|u| u.shard == shard.name && u.state == ReplicaState::Stored);
        let (copies, bytes) = stored.map_or((0, 0), |u| (u.copies, u.bytes));
        let _ = writeln!(out, "{:<20} {:<9} {:>14} {:>16}", shard.name, state, copies, bytes);
    }
    Ok(())
}

fn write_expected_movement(out: &mut String, old: &Ring, new: &Ring, replication_factor: usize) {
    let estimate = estimate_movement(old, new, replication_factor, COMPARE_SAMPLE_KEYS);
    let _ = writeln!(
        out,
        "\nexpected movement over {} sample keys, {} copies each:\n  \
         keys with a moved copy: {:>6.2}% (ideal {:.2}%)\n  \
         copies moved:           {:>6.2}% (ideal {:.2}%)",
        estimate.sample_keys,
        estimate.replication_factor,
        estimate.keys_moving * 100.0,
        estimate.ideal_keys * 100.0,
        estimate.copies_moving * 100.0,
        estimate.ideal_copies * 100.0
    );
    for (step, fraction) in &estimate.pairs {
        let from = step.from.as_deref().unwrap_or("(new copy)");
        let _ = writeln!(out, "  {from:>12} -> {:<12} a copy of {:>6.2}% of keys", step.to, fraction * 100.0);
    }
}

fn write_plan(out: &mut String, plan: &RebalancePlan, how: &str) {
    let _ = writeln!(
        out,
        "\nplan ({how}): {} of {} blobs move; {} copies, {} bytes to copy; {} surplus copies to remove",
        plan.work.len(),
        plan.blobs_scanned,
        plan.copies(),
        plan.bytes(),
        plan.removals()
    );
    for (step, total) in &plan.pairs {
        let from = step.from.as_deref().unwrap_or("(new copy)");
        let _ = writeln!(out, "  {from:>12} -> {:<12} {:>8} copies {:>14} bytes", step.to, total.copies, total.bytes);
    }
    if !plan.lost.is_empty() {
        let _ =
            writeln!(out, "  {} referenced blobs have no stored copy to move (run `chitram scrub`)", plan.lost.len());
    }
}

/// Opens what a job needs and checks both ends: the database must exist, hold Chitram's tables
/// and answer (nothing is created); shards that do not answer, or whose directory does not
/// exist, are listed, and the work that needs them will fail and can be resumed later.
async fn open_for_job(
    settings: &Settings,
    out: &mut String,
) -> Result<(Arc<dyn MetadataStore>, Arc<StorageRouter>), CommandError> {
    let metadata = app::open_existing_metadata(&settings.database.url).await?;
    metadata.ping().await?;
    // Jobs change copies: through the cache, so serving instances see the changes at once.
    let metadata = app::with_metadata_cache(settings, metadata).await?;
    let router = Arc::new(app::open_existing_storage(settings, metadata.as_ref()).await?);
    for shard in router.check_health(Duration::from_secs(5)).await {
        if let Err(error) = shard.result {
            let _ = writeln!(
                out,
                "warning: shard {} is down ({}); work that needs it will fail",
                shard.name,
                error_chain(&error)
            );
        }
    }
    Ok((metadata, router))
}

/// A token cancelled by Ctrl-C, so a job stops cleanly between blobs.
fn stop_on_ctrl_c() -> CancellationToken {
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("stopping after the blobs in flight…");
            cancel.cancel();
        }
    });
    stop
}

/// `chitram rebalance [--dry-run] [--verify]`.
pub async fn rebalance(settings: &Settings, dry_run: bool, verify: bool) -> Result<Outcome, CommandError> {
    let mut out = String::new();
    let (metadata, router) = open_for_job(settings, &mut out).await?;
    let plan = rebalance::plan(metadata.as_ref(), router.ring(), settings.placement.replication_factor).await?;
    write_plan(&mut out, &plan, if dry_run { "dry run: nothing moves" } else { "to carry out" });
    if dry_run || plan.work.is_empty() {
        return Ok(Outcome { report: out, ok: plan.lost.is_empty() });
    }
    eprint!("{out}");
    out.clear();
    let maintenance = &settings.maintenance;
    let options = RebalanceOptions {
        concurrency: maintenance.rebalance_concurrency,
        bytes_per_sec: (maintenance.rebalance_mib_per_sec > 0)
            .then_some(maintenance.rebalance_mib_per_sec * 1024 * 1024),
        spool_dir: settings.server.spool_dir.clone(),
        verify_kept: verify,
        stop: stop_on_ctrl_c(),
    };
    let summary = rebalance::execute(metadata.clone(), router, plan, &options, &TerminalProgress::new()).await;
    metadata.before_exit().await;
    write_summary(&mut out, &summary);
    Ok(Outcome { report: out, ok: summary.failures.is_empty() && !summary.interrupted })
}

fn write_summary(out: &mut String, summary: &RebalanceSummary) {
    let secs = summary.elapsed.as_secs_f64().max(0.001);
    let _ = writeln!(
        out,
        "rebalance {}: {} blobs, {} copies made ({} bytes, {:.1} MiB/s), {} surplus copies removed, {} kept, in {:.1} s",
        if summary.interrupted { "interrupted (run it again to resume)" } else { "done" },
        summary.blobs_done,
        summary.copies_made,
        summary.bytes_copied,
        summary.bytes_copied as f64 / 1_048_576.0 / secs,
        summary.copies_removed,
        summary.copies_kept,
        secs
    );
    for (blob, problem) in &summary.failures {
        let _ = writeln!(out, "  failed: {blob}: {problem}");
    }
}

/// `chitram variants backfill`: makes every configured variant that is missing or stale,
/// resuming where an interrupted run stopped.
pub async fn variants_backfill(settings: &Settings) -> Result<Outcome, CommandError> {
    let mut out = String::new();
    let (metadata, router) = open_for_job(settings, &mut out).await?;
    eprint!("{out}");
    out.clear();
    let (_, variants) = app::image_services(settings, &metadata, &router)?;
    let summary = crate::variants::backfill::backfill(&variants, &TerminalProgress::new(), &stop_on_ctrl_c()).await;
    metadata.before_exit().await;
    let summary = summary?;
    let _ = writeln!(
        out,
        "variants backfill {}: {} images, {} variants made, {} already current, {} failed (cannot be decoded), {} not made (an outage: run again)",
        if summary.interrupted { "interrupted (run it again to resume)" } else { "done" },
        summary.images,
        summary.generated,
        summary.already_current,
        summary.failed,
        summary.errors
    );
    Ok(Outcome { report: out, ok: summary.errors == 0 && !summary.interrupted })
}

/// `chitram scrub [--repair] [--checksums]`.
pub async fn scrub(settings: &Settings, repair: bool, verify_checksums: bool) -> Result<Outcome, CommandError> {
    let mut out = String::new();
    let (metadata, router) = open_for_job(settings, &mut out).await?;
    let options = ScrubOptions {
        repair,
        verify_checksums,
        orphan_grace: Duration::from_secs(settings.maintenance.orphan_grace_secs),
        copies_per_sec: None,
        spool_dir: settings.server.spool_dir.clone(),
        resume: false,
        stop: stop_on_ctrl_c(),
    };
    let report = scrub::scrub(metadata.as_ref(), &router, &options, &TerminalProgress::new()).await;
    metadata.before_exit().await;
    let ok = write_scrub_report(&mut out, &report?, repair);
    Ok(Outcome { report: out, ok })
}

/// Writes the report; returns whether everything is in order (after repairs).
fn write_scrub_report(out: &mut String, report: &ScrubReport, repair: bool) -> bool {
    let _ = writeln!(
        out,
        "scrub {}: {} blobs, {} copies checked in {:.1} s",
        if report.interrupted { "interrupted" } else { "done" },
        report.blobs_checked,
        report.copies_checked,
        report.elapsed.as_secs_f64()
    );
    for (copy, problem) in &report.bad_copies {
        let action = if repair { "recorded missing; restored below" } else { "run with --repair" };
        let _ = writeln!(out, "  bad copy: {} on {}: {problem} ({action})", copy.blob, copy.shard);
    }
    for copy in &report.recovered {
        let action = if repair { "recorded stored again" } else { "run with --repair to record it stored" };
        let _ = writeln!(out, "  copy marked missing verifies: {} on {} ({action})", copy.blob, copy.shard);
    }
    for copy in &report.adopted {
        let action = if repair { "adopted as its copy" } else { "run with --repair to adopt it" };
        let _ =
            writeln!(out, "  restored object of a blob with no good copy: {} on {} ({action})", copy.blob, copy.shard);
    }
    let _ =
        writeln!(out, "  under-replicated blobs: {}; copies restored: {}", report.under_replicated, report.restored);
    for (blob, refs) in &report.lost {
        let _ = writeln!(
            out,
            "  LOST: blob {blob} ({refs} images) has no good copy on any reachable shard; restore it from a backup"
        );
    }
    for orphan in &report.orphans {
        let _ = writeln!(
            out,
            "  orphan: {} on {} ({} bytes, {} s old){}",
            orphan.key,
            orphan.shard,
            orphan.len,
            orphan.age.as_secs(),
            if repair { "" } else { " (run with --repair to delete)" }
        );
    }
    if repair {
        let _ = writeln!(out, "  orphans deleted: {}", report.orphans_deleted);
        let _ = writeln!(out, "  stale temporary files removed: {}", report.stale_temporaries_removed);
    }
    for (shard, reason) in &report.unreachable {
        let _ = writeln!(out, "  unreachable: {shard}: {reason}");
    }
    for (blob, problem) in &report.repair_failures {
        let _ = writeln!(out, "  repair failed: {blob}: {problem}");
    }
    let unresolved = if repair {
        report.repair_failures.len() + report.orphans.len() - report.orphans_deleted as usize
    } else {
        report.bad_copies.len()
            + report.recovered.len()
            + report.adopted.len()
            + report.orphans.len()
            + report.under_replicated as usize
    };
    report.lost.is_empty() && report.unreachable.is_empty() && unresolved == 0 && !report.interrupted
}
