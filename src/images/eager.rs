//! Eager replication: an upload copies its blob to the rest of its write set from its own
//! bytes, as soon as its first copy is committed (issue 11, "shrink the window of one copy").
//!
//! With `write_quorum = 1` an acknowledged image lives on one shard until its other copies are
//! made. The durable queue already holds a `Copy` task for each of them (committed with the
//! image); a worker would claim it, read the blob back from the first copy and write it. The
//! upload still has the bytes, in memory or in its spool file, so it claims those tasks itself
//! right after the commit and writes them at once: the window of one copy becomes the time of
//! one PUT instead of the queue's lag, and the first copy's shard is spared a read.
//!
//! The queue stays the record of truth and the fallback. A task is claimed like a worker
//! claims it (so no copy is made twice), and completed through the same
//! [`TaskQueue::complete_copy_task`](crate::metadata::TaskQueue::complete_copy_task), which
//! records the copy `Deleting` instead if the image was deleted meanwhile. A copy that cannot
//! be made now, or not within half the lease, is recorded as a failed attempt and left to the
//! workers. An instance that stops waits for its eager copies within the shutdown grace, then
//! stops those still running between two steps, and each releases its claims (see
//! [`EagerReplicator::stop`]); one that is killed leaves them to the workers when their lease
//! runs out.
//! Eager copies in flight are bounded: beyond the bound an upload leaves its copies to the
//! queue, so neither memory nor spool files grow with the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::spool::SpooledBody;
use crate::maintenance::deletion;
use crate::metadata::{CopyRef, MetadataStore, ReplicationTask};
use crate::observability::names;
use crate::storage::router::StorageRouter;
use crate::telemetry::error_chain;

/// How eager copies behave (`[replication]` settings).
#[derive(Debug, Clone)]
pub struct EagerSettings {
    /// Uploads whose copies may be in flight at once; 0 turns eager replication off.
    pub max_in_flight: usize,
    /// The claim's lease, as the workers take it.
    pub lease: Duration,
    /// When a failed eager copy is due again (for a worker).
    pub retry_after: Duration,
}

pub struct EagerReplicator {
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    settings: EagerSettings,
    in_flight: Arc<Semaphore>,
    /// Claims are made as `eager-<process>-<instance>-<upload>`: unique per upload, so an
    /// upload whose claim ran out can never complete or fail a claim another one took.
    worker_id: String,
    uploads: AtomicU64,
    /// Cancelled once the shutdown grace is over: the copies still running stop at their next
    /// step and release their claims.
    stopping: CancellationToken,
}

/// How long a stopping instance waits, after the grace, for its eager copies to reach a step
/// where they can stop and release their claims: a claim in flight (at most the pool's acquire
/// timeout and one statement), or the recording of a copy already written.
const SETTLE: Duration = Duration::from_secs(10);

impl EagerReplicator {
    pub fn new(metadata: Arc<dyn MetadataStore>, router: Arc<StorageRouter>, settings: EagerSettings) -> Self {
        let instance = uuid::Uuid::new_v4().simple().to_string();
        Self {
            metadata,
            router,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            worker_id: format!("eager-{}-{}", std::process::id(), &instance[..8]),
            uploads: AtomicU64::new(0),
            stopping: CancellationToken::new(),
        }
    }

    /// Starts copying `body` to each of `targets` in the background, keeping the body (and its
    /// spool file) until the last copy is written. Returns at once; leaves the copies to the
    /// queue when too many are in flight.
    pub fn start(&self, body: SpooledBody, targets: Vec<String>) {
        if targets.is_empty() {
            return;
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            metrics::counter!(names::EAGER_COPIES, "outcome" => "left_to_queue").increment(targets.len() as u64);
            return;
        };
        let job = EagerCopies {
            metadata: self.metadata.clone(),
            router: self.router.clone(),
            settings: self.settings.clone(),
            worker_id: format!("{}-{}", self.worker_id, self.uploads.fetch_add(1, Ordering::Relaxed)),
            body: Arc::new(body),
            stopping: self.stopping.clone(),
        };
        let span = tracing::info_span!("eager_replication", blob = %job.body.key);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let copies = targets.into_iter().map(|shard| job.copy_to(shard));
                let stored = futures::future::join_all(copies).await;
                if stored.iter().all(|stored| *stored) {
                    metrics::histogram!(names::EAGER_COPY_LAG).record(started.elapsed());
                }
                if job.stopping.is_cancelled() {
                    job.release_claims().await;
                }
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// Graceful shutdown, once no upload is in flight: waits up to `within` for the eager
    /// copies still running, then stops them; each releases the claims it holds, so the tasks
    /// are free for the next instance at once instead of when their lease runs out. Uploads
    /// that start after this leave their copies to the queue.
    ///
    /// A copy is stopped between steps, never inside a claim: a claim given up while its
    /// `COMMIT` is on the wire still commits on the server, possibly after the release, and
    /// would hold its task for a whole lease.
    pub async fn stop(&self, within: Duration) {
        if !self.all_done_within(within).await {
            self.stopping.cancel();
            if !self.all_done_within(SETTLE).await {
                tracing::warn!(
                    settle_secs = SETTLE.as_secs(),
                    "eager copies did not stop in time; their claims may outlive the instance until their lease runs out"
                );
            }
        }
        self.in_flight.close();
    }

    /// Waits up to `within` until no eager copy is running (each holds a permit until it ends).
    async fn all_done_within(&self, within: Duration) -> bool {
        let all = u32::try_from(self.settings.max_in_flight).unwrap_or(u32::MAX);
        match tokio::time::timeout(within, self.in_flight.acquire_many(all)).await {
            Ok(Ok(permits)) => {
                permits.forget();
                true
            }
            _ => false,
        }
    }
}

/// One upload's eager copies.
struct EagerCopies {
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    settings: EagerSettings,
    worker_id: String,
    body: Arc<SpooledBody>,
    /// The instance is stopping (see [`EagerReplicator::stop`]): copies not yet written are
    /// left to the queue.
    stopping: CancellationToken,
}

impl EagerCopies {
    /// Makes one copy; true when it is recorded `Stored`.
    async fn copy_to(&self, shard: String) -> bool {
        let copy = CopyRef { blob: self.body.key.clone(), shard };
        let task = match self.metadata.claim_copy_task(&copy, &self.worker_id, self.settings.lease).await {
            Ok(Some(task)) => task,
            // A worker was quicker, or the copy is no longer wanted.
            Ok(None) => {
                count("taken_by_worker");
                return false;
            }
            Err(error) => {
                tracing::warn!(shard = %copy.shard, error = %error_chain(&error), "could not claim an eager copy; the queue has it");
                count("failed");
                return false;
            }
        };
        // The claim above ran to its end even if the instance began stopping meanwhile (see
        // `EagerReplicator::stop`); the write is the step that may be cut short.
        let written = tokio::select! {
            biased;
            () = self.stopping.cancelled() => None,
            written = self.write(&copy) => Some(written),
        };
        match written {
            Some(Ok(())) => self.complete(&task).await,
            Some(Err(reason)) => {
                self.fail(&task, &reason).await;
                false
            }
            None => {
                count("stopped");
                false
            }
        }
    }

    /// Writes the copy and checks its length, within half the claim's lease (the claim is not
    /// renewed: a copy slower than that is left to a worker, before the claim can run out).
    async fn write(&self, copy: &CopyRef) -> Result<(), String> {
        let limit = self.settings.lease / 2;
        tokio::time::timeout(limit, self.write_unbounded(copy))
            .await
            .unwrap_or_else(|_| Err(format!("the eager copy took longer than {} s", limit.as_secs())))
    }

    /// As a worker's copy does (`replication/copy.rs`). The bytes need no check: their
    /// SHA-256 is the blob's key.
    async fn write_unbounded(&self, copy: &CopyRef) -> Result<(), String> {
        // The worker retries once a deletion in doubt has settled.
        deletion::refuse_while_deletion_in_doubt(self.metadata.as_ref(), copy).await?;
        self.router.write_on(&copy.shard, &copy.blob, &self.body.body).await.map_err(|e| error_chain(&e))?;
        let written = self.router.fetch_len_on(&copy.shard, &copy.blob).await.map_err(|e| error_chain(&e))?;
        if written != self.body.len {
            return Err(format!("the new copy holds {written} bytes, expected {}", self.body.len));
        }
        Ok(())
    }

    /// Frees the tasks of copies this upload claimed but did not finish, for the next
    /// instance's workers (a copy that finished holds no claim any more).
    async fn release_claims(&self) {
        match self.metadata.release_claims(&self.worker_id).await {
            Ok(released) if released > 0 => {
                tracing::info!(released, "eager copies unfinished at shutdown are left to the queue")
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "could not release eager claims; they expire with their lease")
            }
        }
    }

    async fn complete(&self, task: &ReplicationTask) -> bool {
        match self.metadata.complete_copy_task(task, &self.worker_id).await {
            Ok(true) => {
                count("stored");
                true
            }
            Ok(false) => {
                count("lost_claim");
                deletion::remove_if_unwanted(self.metadata.clone(), self.router.clone(), &task.copy).await;
                false
            }
            Err(error) => {
                // The copy exists but is not recorded: the task's claim runs out and a worker
                // finds the copy there (or writes it again).
                tracing::warn!(shard = %task.copy.shard, error = %error_chain(&error), "could not record an eager copy; the queue finishes it");
                count("failed");
                false
            }
        }
    }

    async fn fail(&self, task: &ReplicationTask, reason: &str) {
        tracing::warn!(shard = %task.copy.shard, blob = %task.copy.blob, %reason, "eager copy failed; the replication queue retries it");
        count("failed");
        let recorded = self.metadata.fail_task(task.id, &self.worker_id, reason, self.settings.retry_after).await;
        if let Err(error) = recorded {
            tracing::warn!(task = task.id, error = %error_chain(&error), "could not record the failure; the claim runs out instead");
        }
    }
}

fn count(outcome: &'static str) {
    metrics::counter!(names::EAGER_COPIES, "outcome" => outcome).increment(1);
}
