//! The maintenance leader: the instance that runs the singleton jobs (the background scrub).
//!
//! Every `serve` runs [`run_as_leader`]; the instance that holds the metadata store's
//! singleton lock (a Postgres advisory lock, see `metadata/singleton.rs`) runs the jobs, the
//! others try again every [`FOLLOWER_RETRY`]. The leader checks its lock every
//! [`HEARTBEAT`] and stops the jobs the moment it is lost. So when the leader dies, another
//! instance takes over within `FOLLOWER_RETRY` after Postgres ends the dead session (at once
//! for a killed process; about 20 s for a vanished host, by the session's TCP keepalives).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metrics::gauge;
use tokio_util::sync::CancellationToken;

use crate::metadata::{MetadataStore, SingletonLock};
use crate::observability::names;
use crate::telemetry::error_chain;

/// The lock's name: one lock for every singleton job, so they all run in the same instance.
pub const LOCK: &str = "maintenance";
/// How often an instance that is not the leader tries to become it.
pub const FOLLOWER_RETRY: Duration = Duration::from_secs(3);
/// How often the leader checks that it still holds the lock.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Runs `jobs` whenever this instance holds the lock, until `stop`. `jobs` gets a token that
/// is cancelled when the lock is lost or the instance stops; it returns once it has stopped.
pub async fn run_as_leader<F, Fut>(metadata: Arc<dyn MetadataStore>, stop: CancellationToken, mut jobs: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    gauge!(names::MAINTENANCE_LEADER).set(0.0);
    while !stop.is_cancelled() {
        match metadata.try_lock_singleton(LOCK).await {
            Ok(Some(lock)) => lead(lock, &stop, &mut jobs).await,
            Ok(None) => {}
            Err(error) => tracing::warn!(error = %error_chain(&error), "cannot reach the database to elect a leader"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(FOLLOWER_RETRY) => {}
        }
    }
}

/// One term as the leader: runs the jobs until the lock is lost or the instance stops.
async fn lead<F, Fut>(mut lock: Box<dyn SingletonLock>, stop: &CancellationToken, jobs: &mut F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tracing::info!("this instance now runs the maintenance jobs (scrub)");
    gauge!(names::MAINTENANCE_LEADER).set(1.0);
    let term = stop.child_token();
    let mut running = tokio::spawn(jobs(term.clone()));
    let mut finished = false;
    while !finished {
        tokio::select! {
            _ = &mut running => finished = true,
            () = tokio::time::sleep(HEARTBEAT) => {
                if !lock.still_held().await {
                    tracing::warn!("lost the maintenance lock (its database session ended); stopping the jobs");
                    break;
                }
            }
        }
    }
    term.cancel();
    if !finished {
        let _ = running.await;
    }
    lock.release().await;
    gauge!(names::MAINTENANCE_LEADER).set(0.0);
}
