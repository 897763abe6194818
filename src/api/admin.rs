//! `/api/v1/admin/…`: what the background machinery is doing, and where the data is, for
//! operators (and the dashboard at `/admin`, which uses nothing else).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::health::{CHECK_TIMEOUT, ReplicaSummary};
use crate::accounts::Caller;
use crate::metadata::ReplicaState;
use crate::placement::report::{SAMPLE_KEYS, ShardShare, coefficient_of_variation, peak_to_mean, shard_shares};
use crate::placement::ring::Ring;
use crate::storage::breaker::CircuitState;
use crate::telemetry::error_chain;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/admin/replication", get(replication)).route("/api/v1/admin/storage", get(storage))
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

/// Where the data is and whether it is safe: the facts `chitram ring` and `/health` show.
#[derive(Debug, Serialize, ToSchema)]
pub struct StorageOverview {
    /// One entry per configured shard, in ring order.
    pub shards: Vec<ShardOverview>,
    pub ring: RingOverview,
    /// Copies per state, over every shard.
    pub replicas: ReplicaSummary,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShardOverview {
    pub name: String,
    /// `fs:/path`, `s3:endpoint/bucket`, …
    pub backend: String,
    /// `ok` or `down`, from a health check made for this answer.
    pub status: &'static str,
    pub circuit: CircuitState,
    pub consecutive_failures: u32,
    /// How long the health check took.
    pub latency_ms: f64,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
    pub weight: u32,
    /// Tokens on the ring (weight × `placement.vnodes_per_weight`).
    pub vnodes: usize,
    /// Its weight over the total weight: the share of the data it should get.
    pub weight_share: f64,
    /// The share of sample keys whose primary it is (as `chitram ring` simulates).
    pub simulated_share: f64,
    /// Copies recorded `stored` on it (objects).
    pub objects: u64,
    /// Bytes of those copies.
    pub bytes: u64,
    /// Its bytes over the stored bytes of every shard (0 when nothing is stored).
    pub data_share: f64,
    /// Copies on it per state.
    pub replicas: ReplicaSummary,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RingOverview {
    pub shards: usize,
    /// Tokens on the ring, all shards together.
    pub tokens: usize,
    pub vnodes_per_weight: u32,
    pub replication_factor: usize,
    /// The largest simulated share over expected share (1.0 is perfect).
    pub peak_to_mean: f64,
    /// The spread of simulated over expected shares (0 is perfect).
    pub coefficient_of_variation: f64,
    /// Keys hashed for the simulated shares.
    pub sample_keys: u64,
}

/// A ring's simulated shares, computed once per ring (hashing a million keys takes a while,
/// and a ring does not change while the process runs).
static RING_SHARES: LazyLock<Mutex<HashMap<String, Arc<Vec<ShardShare>>>>> = LazyLock::new(Default::default);

async fn ring_shares(ring: &Ring) -> Arc<Vec<ShardShare>> {
    let identity = format!(
        "{}|{:?}",
        ring.vnodes_per_weight(),
        ring.members().iter().map(|member| (&member.name, member.weight)).collect::<Vec<_>>()
    );
    if let Some(shares) = RING_SHARES.lock().expect("ring shares lock").get(&identity) {
        return shares.clone();
    }
    let owned = ring.clone();
    let shares = tokio::task::spawn_blocking(move || shard_shares(&owned, SAMPLE_KEYS))
        .await
        .map(Arc::new)
        .unwrap_or_else(|_| Arc::new(shard_shares(ring, 1_000)));
    RING_SHARES.lock().expect("ring shares lock").insert(identity, shares.clone());
    shares
}

#[utoipa::path(
    get, path = "/api/v1/admin/storage", tag = "operations", security(("bearer" = [])),
    responses(
        (status = 200, description = "Each shard's health, circuit, latency, objects and bytes against its share of the ring; the ring; copies by state", body = StorageOverview),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: admins only", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn storage(State(state): State<AppState>, caller: Caller) -> Result<Json<StorageOverview>, ApiError> {
    caller.require_admin()?;
    let ring = state.router.ring();
    let (usage, health, shares) =
        tokio::join!(state.metadata.shard_usage(), state.router.check_health(CHECK_TIMEOUT), ring_shares(ring));
    let usage = usage?;
    let stored_bytes: u64 = usage.iter().filter(|u| u.state == ReplicaState::Stored).map(|u| u.bytes).sum();
    let count = |shard: Option<&str>, wanted: ReplicaState| {
        usage.iter().filter(|u| u.state == wanted && shard.is_none_or(|name| u.shard == name)).map(|u| u.copies).sum()
    };
    let summary = |shard: Option<&str>| ReplicaSummary {
        pending: count(shard, ReplicaState::Pending),
        stored: count(shard, ReplicaState::Stored),
        missing: count(shard, ReplicaState::Missing),
        deleting: count(shard, ReplicaState::Deleting),
    };
    let shards = health
        .into_iter()
        .map(|check| {
            let share = shares.iter().find(|share| share.name == check.name);
            let stored = usage.iter().find(|u| u.shard == check.name && u.state == ReplicaState::Stored);
            let (objects, bytes) = stored.map_or((0, 0), |u| (u.copies, u.bytes));
            ShardOverview {
                status: if check.result.is_ok() { "ok" } else { "down" },
                circuit: check.circuit.state,
                consecutive_failures: check.circuit.consecutive_failures,
                latency_ms: check.latency.as_secs_f64() * 1000.0,
                error: check.result.err().map(|error| error_chain(&error)),
                weight: share.map_or(0, |share| share.weight),
                vnodes: share.map_or(0, |share| share.vnodes),
                weight_share: share.map_or(0.0, |share| share.expected),
                simulated_share: share.map_or(0.0, |share| share.simulated),
                objects,
                bytes,
                data_share: if stored_bytes == 0 { 0.0 } else { bytes as f64 / stored_bytes as f64 },
                replicas: summary(Some(&check.name)),
                backend: check.backend,
                name: check.name,
            }
        })
        .collect();
    let ring = RingOverview {
        shards: ring.members().len(),
        tokens: ring.token_count(),
        vnodes_per_weight: ring.vnodes_per_weight(),
        replication_factor: state.router.replication_factor(),
        peak_to_mean: peak_to_mean(&shares),
        coefficient_of_variation: coefficient_of_variation(&shares),
        sample_keys: SAMPLE_KEYS,
    };
    Ok(Json(StorageOverview { shards, ring, replicas: summary(None) }))
}
