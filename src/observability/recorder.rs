//! The Prometheus recorder. The `metrics` facade has one recorder per process, so it is
//! installed once and every application built in the process (the tests build many) shares
//! its handle.

use std::sync::Mutex;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

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
    let handle = PrometheusBuilder::new().set_buckets(names::LATENCY_BUCKETS)?.install_recorder()?;
    names::describe();
    *installed = Some(handle.clone());
    Ok(handle)
}
