//! The Prometheus recorder. The `metrics` facade has one recorder per process, so it is
//! installed once and every application built in the process (the tests build many) shares
//! its handle.

use std::sync::Mutex;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use super::names;

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("cannot install the Prometheus recorder")]
    Install(#[from] BuildError),
}

/// Installs the recorder on first use and returns the handle that renders the exposition.
pub fn install() -> Result<PrometheusHandle, RecorderError> {
    let mut installed = HANDLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(names::LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(names::STORE_STAGE.to_owned()), names::STAGE_BUCKETS)?
        .install_recorder()?;
    names::describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// How often histogram samples are folded into their buckets. Without this the exporter keeps
/// every sample recorded between two scrapes: memory that grows with traffic when nobody scrapes.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded samples every [`UPKEEP_EVERY`] until `stop`.
pub async fn run_upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
        }
    }
}
