//! `/api/v1/admin/…`: what the background machinery is doing, for operators.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::accounts::Caller;
use crate::storage::breaker::CircuitState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/admin/replication", get(replication))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicationStatus {
    /// Tasks in the queue (copies to create or restore, copies to delete).
    pub queue_depth: u64,
    pub copy_tasks: u64,
    pub delete_tasks: u64,
    /// Age of the oldest task, in seconds; `null` when the queue is empty.
    pub oldest_task_age_secs: Option<f64>,
    /// Workers in this instance (others on the same Postgres share the queue).
    pub workers: usize,
    /// One entry per configured shard.
    pub shards: Vec<ShardReplication>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShardReplication {
    pub name: String,
    pub circuit: CircuitState,
    pub consecutive_failures: u32,
    /// Queued tasks for this shard that have failed at least once.
    pub failing_tasks: u64,
    /// Failed attempts over those tasks.
    pub failed_attempts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/admin/replication", tag = "operations", security(("bearer" = [])),
    responses(
        (status = 200, description = "The replication queue and each shard's circuit", body = ReplicationStatus),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: admins only", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn replication(State(state): State<AppState>, caller: Caller) -> Result<Json<ReplicationStatus>, ApiError> {
    caller.require_admin()?;
    let stats = state.metadata.queue_stats().await?;
    let shards = state
        .router
        .shards()
        .iter()
        .map(|shard| {
            let failures = stats.failing.iter().find(|f| f.shard == shard.name);
            let circuit = shard.circuit();
            ShardReplication {
                name: shard.name.clone(),
                circuit: circuit.state,
                consecutive_failures: circuit.consecutive_failures,
                failing_tasks: failures.map_or(0, |f| f.failing_tasks),
                failed_attempts: failures.map_or(0, |f| f.failed_attempts),
                last_error: failures.and_then(|f| f.last_error.clone()),
            }
        })
        .collect();
    Ok(Json(ReplicationStatus {
        queue_depth: stats.copy_tasks + stats.delete_tasks,
        copy_tasks: stats.copy_tasks,
        delete_tasks: stats.delete_tasks,
        oldest_task_age_secs: stats.oldest_task_age.map(|age| age.as_secs_f64()),
        workers: state.replication_workers,
        shards,
    }))
}
