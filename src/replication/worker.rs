//! The replication worker: one task at a time, claimed from the durable queue.
//!
//! [`Replicator::try_run_next`] does one unit of work and says how it went; [`run_workers`]
//! owns the loop, the idle sleep, shutdown (after Zero To Production's issue-delivery worker)
//! and how many workers run ([`Scaling`]). Tests drive the single step.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::backoff::RetryPolicy;
use super::copy::{CopyCheck, check_copy, copy_blob};
use crate::maintenance::deletion::{self, DeletionOutcome};
use crate::metadata::{CopyRef, MetadataError, MetadataStore, ReplicaState, ReplicationTask, TaskKind};
use crate::observability::names;
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// How a worker's step went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// No task was due.
    Idle,
    /// The task is done (or turned out moot) and left the queue.
    Done(TaskKind),
    /// The task failed; it is due again later.
    Failed { kind: TaskKind, error: String },
    /// Another worker took the task over (this one's lease ran out): nothing was recorded.
    LostClaim,
    /// The instance is stopping: the task was given up and its claim is the caller's to release.
    Stopped,
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub lease: Duration,
    pub retry: RetryPolicy,
    pub idle_poll: Duration,
    /// Where copies spool while they are checked (the system temporary directory when `None`).
    pub spool_dir: Option<std::path::PathBuf>,
}

pub struct Replicator {
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    settings: WorkerSettings,
    /// This worker's identity in claims: unique per process and worker.
    id: String,
}

/// Why a task failed, for its record.
type TaskError = String;

impl Replicator {
    pub fn new(
        metadata: Arc<dyn MetadataStore>,
        router: Arc<StorageRouter>,
        settings: WorkerSettings,
        id: String,
    ) -> Self {
        Self { metadata, router, settings, id }
    }

    /// Claims one due task, carries it out while renewing its lease, and records the result.
    pub async fn try_run_next(&self) -> Result<StepOutcome, MetadataError> {
        self.run_next_until(&CancellationToken::new()).await
    }

    /// As [`Self::try_run_next`], but gives the task up once `stop` is cancelled
    /// ([`StepOutcome::Stopped`]). The claim itself is never given up half-way: a claim
    /// dropped while its `COMMIT` is in flight still commits on the server, possibly after the
    /// caller's release, and holds the task until its lease runs out.
    pub async fn run_next_until(&self, stop: &CancellationToken) -> Result<StepOutcome, MetadataError> {
        let Some(task) = self.metadata.claim_task(&self.id, self.settings.lease).await? else {
            return Ok(StepOutcome::Idle);
        };
        // The task's log lines carry the id of the request that queued it.
        let span = tracing::info_span!("replication_task", task = task.id, kind = task.kind.as_str(),
            shard = %task.copy.shard, request_id = task.request_id.as_deref().unwrap_or_default());
        let outcome = tokio::select! {
            () = stop.cancelled() => return Ok(StepOutcome::Stopped),
            outcome = self.run_claimed(&task).instrument(span) => outcome,
        };
        if let Ok(outcome) = &outcome {
            count_outcome(outcome);
        }
        outcome
    }

    async fn run_claimed(&self, task: &ReplicationTask) -> Result<StepOutcome, MetadataError> {
        let result = tokio::select! {
            result = self.execute(task) => result,
            lost = self.keep_claim(task.id) => return Ok(lost),
        };
        self.record(task, result).await
    }

    /// Renews the lease at a third of its length; returns only if the claim is lost.
    async fn keep_claim(&self, task: i64) -> StepOutcome {
        let mut ticker = tokio::time::interval(self.settings.lease / 3);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            match self.metadata.extend_claim(task, &self.id, self.settings.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(task, worker = %self.id, "lost the claim on a task; abandoning it");
                    return StepOutcome::LostClaim;
                }
                // A database hiccup: the lease still has two thirds to run; try again next tick.
                Err(error) => tracing::warn!(task, %error, "could not renew a claim"),
            }
        }
    }

    async fn record(
        &self,
        task: &ReplicationTask,
        result: Result<Completion, TaskError>,
    ) -> Result<StepOutcome, MetadataError> {
        let held = match &result {
            Ok(Completion::CopyStored) => {
                let held = self.metadata.complete_copy_task(task, &self.id).await?;
                if !held {
                    deletion::remove_if_unwanted(self.metadata.clone(), self.router.clone(), &task.copy).await;
                }
                held
            }
            Ok(Completion::Finished) => {
                // A deletion guard removes the task along with the copy, so the task may be
                // gone already: either way it is finished.
                self.metadata.finish_task(task.id, &self.id).await?;
                true
            }
            Err(error) => {
                let delay = self.settings.retry.delay_after(task.attempts + 1);
                tracing::warn!(task = task.id, kind = task.kind.as_str(), shard = %task.copy.shard, blob = %task.copy.blob,
                    attempts = task.attempts + 1, retry_in_ms = delay.as_millis() as u64, %error, "replication task failed");
                self.metadata.fail_task(task.id, &self.id, error, delay).await?
            }
        };
        Ok(match (held, result) {
            (false, _) => StepOutcome::LostClaim,
            (true, Ok(_)) => StepOutcome::Done(task.kind),
            (true, Err(error)) => StepOutcome::Failed { kind: task.kind, error },
        })
    }

    async fn execute(&self, task: &ReplicationTask) -> Result<Completion, TaskError> {
        match task.kind {
            TaskKind::Copy => self.copy(&task.copy).await,
            TaskKind::Delete => match self.delete_detached(&task.copy).await {
                DeletionOutcome::Deleted | DeletionOutcome::NoLongerWanted => Ok(Completion::Finished),
                DeletionOutcome::Failed(reason) => Err(reason),
            },
        }
    }

    /// Deletes the copy in a task of its own: a worker that stops, or loses its claim, must not
    /// cut a DELETE short between sending it and fencing its copy (see `maintenance/deletion.rs`),
    /// since the shard may still carry it out. The lock and the router's deadline bound it.
    async fn delete_detached(&self, copy: &CopyRef) -> DeletionOutcome {
        let (metadata, router, copy) = (self.metadata.clone(), self.router.clone(), copy.clone());
        let detached = router.clone();
        let deletion =
            detached.spawn_detached(async move { deletion::try_delete_copy(metadata.as_ref(), &router, &copy).await });
        deletion.await.unwrap_or_else(|error| DeletionOutcome::Failed(format!("the deletion stopped: {error}")))
    }

    /// Copies the blob to `target` from a stored holder, checking the bytes on the way.
    async fn copy(&self, target: &CopyRef) -> Result<Completion, TaskError> {
        let Some(blob) = self.metadata.find_blob_copies(&target.blob).await.map_err(|e| error_chain(&e))? else {
            return Ok(Completion::Finished); // The blob is gone: nothing to copy.
        };
        if blob.replicas.iter().any(|r| r.shard == target.shard && r.state == ReplicaState::Stored) {
            return Ok(Completion::CopyStored);
        }
        if blob.ref_count == 0 {
            return Ok(Completion::Finished); // Being deleted: its delete tasks handle it.
        }
        deletion::refuse_while_deletion_in_doubt(self.metadata.as_ref(), target).await?;
        let spool_dir = self.settings.spool_dir.clone();
        // A copy marked missing may have been right all along (a disk that came back): bytes
        // that verify need no copying.
        let marked_missing = blob.replicas.iter().any(|r| r.shard == target.shard && r.state == ReplicaState::Missing);
        if marked_missing
            && check_copy(&self.router, &blob, &target.shard, true, spool_dir.clone()).await == CopyCheck::Good
        {
            return Ok(Completion::CopyStored);
        }
        copy_blob(self.metadata.as_ref(), &self.router, &blob, &target.shard, spool_dir).await?;
        Ok(Completion::CopyStored)
    }
}

fn count_outcome(outcome: &StepOutcome) {
    let (kind, result) = match outcome {
        StepOutcome::Idle | StepOutcome::Stopped => return,
        StepOutcome::Done(kind) => (kind.as_str(), "done"),
        StepOutcome::Failed { kind, .. } => (kind.as_str(), "failed"),
        StepOutcome::LostClaim => ("unknown", "lost_claim"),
    };
    metrics::counter!(names::REPLICATION_TASKS, "kind" => kind, "outcome" => result).increment(1);
}

enum Completion {
    CopyStored,
    Finished,
}

/// How many workers run: `always` of them whatever the queue holds, and up to `most` while it
/// is deep, one more per `tasks_per_worker` due tasks. A burst that outruns the eager copies
/// (`images/eager.rs`), or a shard that comes back to hundreds of repairs, gets more hands;
/// an idle queue costs the database only the polls of the few that always run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaling {
    pub always: usize,
    pub most: usize,
    pub tasks_per_worker: u64,
    /// How often the queue's depth is sampled.
    pub sample_every: Duration,
}

impl Scaling {
    /// Workers for `due` due tasks.
    pub fn workers_for(&self, due: u64) -> usize {
        let wanted = usize::try_from(due.div_ceil(self.tasks_per_worker.max(1))).unwrap_or(usize::MAX);
        wanted.clamp(self.always, self.most.max(self.always))
    }

    /// Due tasks worth counting: more would not add a worker.
    fn count_cap(&self) -> u64 {
        (self.most.max(self.always) as u64).saturating_mul(self.tasks_per_worker)
    }
}

/// The replicators of one instance (one per worker it may run, `Scaling::most`) and how many
/// of them run.
pub struct WorkerPool {
    pub replicators: Vec<Replicator>,
    pub scaling: Scaling,
}

/// Runs the pool until `shutdown` is cancelled; then releases the workers' claims so that
/// unfinished tasks stay in the queue, free for the next instance.
pub async fn run_workers(pool: WorkerPool, shutdown: CancellationToken) {
    let Some(first) = pool.replicators.first() else { return };
    let metadata = first.metadata.clone();
    let (wanted_tx, wanted) = watch::channel(pool.scaling.always);
    metrics::gauge!(names::REPLICATION_WORKERS).set(pool.scaling.always as f64);
    let scaler = (pool.replicators.len() > pool.scaling.always)
        .then(|| tokio::spawn(follow_queue_depth(metadata, pool.scaling, wanted_tx, shutdown.clone())));
    let handles: Vec<_> = pool
        .replicators
        .into_iter()
        .enumerate()
        .map(|(index, replicator)| {
            // Workers past `always` run only while the queue wants them.
            let gate = (index >= pool.scaling.always).then(|| (index, wanted.clone()));
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run_worker(replicator, gate, shutdown).await })
        })
        .collect();
    futures::future::join_all(handles).await;
    if let Some(scaler) = scaler {
        scaler.abort();
    }
}

/// Samples the queue's depth and publishes how many workers it wants.
async fn follow_queue_depth(
    metadata: Arc<dyn MetadataStore>,
    scaling: Scaling,
    wanted: watch::Sender<usize>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(scaling.sample_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // A database that does not answer keeps the current number; the workers report it.
        let Ok(due) = metadata.count_due_tasks(scaling.count_cap()).await else { continue };
        let workers = scaling.workers_for(due);
        wanted.send_if_modified(|current| std::mem::replace(current, workers) != workers);
        metrics::gauge!(names::REPLICATION_WORKERS).set(workers as f64);
    }
}

/// Waits, while the worker at `index` is not wanted; false when the pool is stopping.
async fn wait_until_wanted(gate: &mut Option<(usize, watch::Receiver<usize>)>, shutdown: &CancellationToken) -> bool {
    let Some((index, wanted)) = gate else { return true };
    let index = *index;
    tokio::select! {
        () = shutdown.cancelled() => false,
        wanted = wanted.wait_for(|wanted| *wanted > index) => wanted.is_ok(),
    }
}

async fn run_worker(
    replicator: Replicator,
    mut gate: Option<(usize, watch::Receiver<usize>)>,
    shutdown: CancellationToken,
) {
    loop {
        if !wait_until_wanted(&mut gate, &shutdown).await {
            break;
        }
        let pause = match replicator.run_next_until(&shutdown).await {
            Ok(StepOutcome::Stopped) => break,
            Ok(StepOutcome::Idle) => replicator.settings.idle_poll,
            Ok(_) => Duration::ZERO,
            Err(error) => {
                tracing::warn!(worker = %replicator.id, error = %error_chain(&error), "replication worker cannot reach the database");
                replicator.settings.idle_poll * 4
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    match replicator.metadata.release_claims(&replicator.id).await {
        Ok(released) if released > 0 => {
            tracing::info!(worker = %replicator.id, released, "left unfinished tasks in the queue")
        }
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(worker = %replicator.id, %error, "could not release claims; they expire with their lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaling(always: usize, most: usize) -> Scaling {
        Scaling { always, most, tasks_per_worker: 16, sample_every: Duration::from_secs(1) }
    }

    #[test]
    fn workers_follow_the_due_tasks_between_the_bounds() {
        let scaling = scaling(2, 8);
        assert_eq!(scaling.workers_for(0), 2);
        assert_eq!(scaling.workers_for(32), 2);
        assert_eq!(scaling.workers_for(33), 3);
        assert_eq!(scaling.workers_for(16 * 8), 8);
        assert_eq!(scaling.workers_for(u64::MAX), 8);
    }

    #[test]
    fn a_maximum_below_the_minimum_keeps_the_minimum() {
        assert_eq!(scaling(4, 1).workers_for(1000), 4);
        assert_eq!(scaling(0, 0).workers_for(1000), 0);
        assert_eq!(scaling(2, 8).count_cap(), 128);
    }
}
