//! The variant generation workers: one task at a time, claimed from the durable queue
//! (`variant_tasks`), the way replication workers claim theirs. [`VariantWorker::try_run_next`]
//! does one unit of work; [`run_workers`] owns the loop, the idle sleep and shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::service::VariantService;
use crate::metadata::{MetadataError, VariantTask};
use crate::replication::backoff::RetryPolicy;
use crate::telemetry::error_chain;

/// How a worker's step went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VariantStep {
    Idle,
    /// The variant is ready or failed (a decode error is final), or the task was moot.
    Done,
    /// Storage or database trouble: due again later.
    Retry(String),
    /// Another worker took the task over.
    LostClaim,
    /// The instance is stopping: the task was given up and its claim is the caller's to release.
    Stopped,
}

#[derive(Debug, Clone)]
pub struct VariantWorkerSettings {
    pub lease: Duration,
    pub retry: RetryPolicy,
    pub idle_poll: Duration,
}

pub struct VariantWorker {
    service: Arc<VariantService>,
    settings: VariantWorkerSettings,
    id: String,
}

impl VariantWorker {
    pub fn new(service: Arc<VariantService>, settings: VariantWorkerSettings, id: String) -> Self {
        Self { service, settings, id }
    }

    /// Claims one due task, makes its variant while renewing the lease, and records the result.
    pub async fn try_run_next(&self) -> Result<VariantStep, MetadataError> {
        self.run_next_until(&CancellationToken::new()).await
    }

    /// As [`Self::try_run_next`], but gives the task up once `stop` is cancelled. The claim is
    /// never given up half-way (see `Replicator::run_next_until`).
    pub async fn run_next_until(&self, stop: &CancellationToken) -> Result<VariantStep, MetadataError> {
        let metadata = self.service.metadata().clone();
        let Some(task) = metadata.claim_variant_task(&self.id, self.settings.lease).await? else {
            return Ok(VariantStep::Idle);
        };
        let result = tokio::select! {
            () = stop.cancelled() => return Ok(VariantStep::Stopped),
            result = self.execute(&task) => result,
            lost = self.keep_claim(task.id) => return Ok(lost),
        };
        let held = match &result {
            Ok(()) => metadata.finish_variant_task(task.id, &self.id).await?,
            Err(error) => {
                let delay = self.settings.retry.delay_after(task.attempts + 1);
                tracing::warn!(task = task.id, image = %task.image, variant = %task.name, attempts = task.attempts + 1,
                    retry_in_ms = delay.as_millis() as u64, %error, "variant task failed");
                metadata.fail_variant_task(task.id, &self.id, error, delay).await?
            }
        };
        Ok(match (held, result) {
            (false, _) => VariantStep::LostClaim,
            (true, Ok(())) => VariantStep::Done,
            (true, Err(error)) => VariantStep::Retry(error),
        })
    }

    async fn execute(&self, task: &VariantTask) -> Result<(), String> {
        // A name no longer configured: nothing to make.
        let Some(spec) = self.service.catalog().get(&task.name).cloned() else { return Ok(()) };
        match self.service.generate(task.image, spec).await {
            Ok(_) => Ok(()),
            Err(error) if !error.is_transient() => Ok(()), // the image is gone
            Err(error) => Err(error_chain(error.as_ref())),
        }
    }

    /// Renews the lease at a third of its length; returns only if the claim is lost.
    async fn keep_claim(&self, task: i64) -> VariantStep {
        let metadata = self.service.metadata().clone();
        let mut ticker = tokio::time::interval(self.settings.lease / 3);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            match metadata.extend_variant_claim(task, &self.id, self.settings.lease).await {
                Ok(true) => {}
                Ok(false) => return VariantStep::LostClaim,
                Err(error) => tracing::warn!(task, %error, "could not renew a variant claim"),
            }
        }
    }
}

/// Runs each worker in its own task until `shutdown`; then releases their claims.
pub async fn run_workers(workers: Vec<VariantWorker>, shutdown: CancellationToken) {
    let handles: Vec<_> = workers
        .into_iter()
        .map(|worker| {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run_worker(worker, shutdown).await })
        })
        .collect();
    futures::future::join_all(handles).await;
}

async fn run_worker(worker: VariantWorker, shutdown: CancellationToken) {
    loop {
        let pause = match worker.run_next_until(&shutdown).await {
            Ok(VariantStep::Stopped) => break,
            Ok(VariantStep::Idle) => worker.settings.idle_poll,
            Ok(_) => Duration::ZERO,
            Err(error) => {
                tracing::warn!(worker = %worker.id, error = %error_chain(&error), "variant worker cannot reach the database");
                worker.settings.idle_poll * 4
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    if let Err(error) = worker.service.metadata().release_variant_claims(&worker.id).await {
        tracing::warn!(worker = %worker.id, %error, "could not release variant claims; they expire with their lease");
    }
}
