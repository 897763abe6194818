//! `GET /health`: whether this instance can serve, and the state of each component.
//! `GET /health/live` and `GET /health/ready`: the same question for load balancers, with no
//! internals in the answer.

use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ErrorBody;
use crate::accounts::Caller;
use crate::metadata::ReplicaCounts;
use crate::storage::breaker::CircuitState;
use crate::telemetry::error_chain;

/// How long one component may take to answer before it counts as down.
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How old the copy counts in a health answer may be: counting is a query over every copy,
/// and `/health` is called often, by anyone. The status itself is decided fresh each time.
const COUNTS_MAX_AGE: Duration = Duration::from_secs(10);

/// A value reused while younger than a maximum age; concurrent askers wait for one refresh
/// instead of each running their own.
#[derive(Debug)]
pub struct Reused<T> {
    last: tokio::sync::Mutex<Option<(Instant, T)>>,
}

impl<T> Default for Reused<T> {
    fn default() -> Self {
        Self { last: tokio::sync::Mutex::new(None) }
    }
}

impl<T: Clone> Reused<T> {
    /// The value, from `refresh` when the last one is `max_age` old or older (`Duration::ZERO`:
    /// always). A refresh that finds nothing (`None`) keeps nothing.
    async fn get(&self, max_age: Duration, refresh: impl Future<Output = Option<T>>) -> Option<T> {
        let mut last = self.last.lock().await;
        if let Some((at, value)) = &*last
            && at.elapsed() < max_age
        {
            return Some(value.clone());
        }
        let value = refresh.await?;
        *last = Some((Instant::now(), value.clone()));
        Some(value)
    }
}

/// The copy counts of the last health check, reused while younger than [`COUNTS_MAX_AGE`].
pub type ReplicaCountsCache = Reused<ReplicaCounts>;

/// How long the components' check (a database ping and one check per shard) is reused for
/// callers who are not admins. `/health` and `/health/ready` answer anyone, without a rate
/// limit, and each check is a database round trip and a request to every shard (a HeadBucket
/// on S3, billed and throttled, and counted by the shard's breaker): a flood of probes would
/// otherwise become a flood on the shards. Admins get a fresh check.
const SHARED_CHECK_MAX_AGE: Duration = Duration::from_secs(1);

/// The last check of the components, shared by callers who are not admins.
pub type ComponentChecks = Reused<Checked>;

/// What one check of the components found.
#[derive(Debug, Clone)]
pub struct Checked {
    database: ComponentHealth,
    shards: Vec<ComponentHealth>,
    /// Copies below the replication factor for too long (false when the database is down).
    under_replicated: bool,
}

/// The components as the caller may see them: checked afresh for an admin, else at most
/// [`SHARED_CHECK_MAX_AGE`] ago.
async fn checked_components(state: &AppState, caller: &Caller) -> Checked {
    let max_age = if caller.is_admin() { Duration::ZERO } else { SHARED_CHECK_MAX_AGE };
    let checked = state.component_checks.get(max_age, async { Some(check_components(state).await) }).await;
    checked.expect("a check of the components always has an answer")
}

async fn check_components(state: &AppState) -> Checked {
    let (database, shards) = tokio::join!(check_database(state), state.router.check_health(CHECK_TIMEOUT));
    let shards = shards
        .into_iter()
        .map(|shard| ComponentHealth {
            circuit: Some(shard.circuit.state),
            ..component(shard.name, shard.backend, shard.latency, shard.result.err().map(|e| error_chain(&e)))
        })
        .collect();
    let under_replicated =
        database.error.is_none() && state.metadata.any_copy_overdue(state.pending_overdue).await.unwrap_or(false);
    Checked { database, shards, under_replicated }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health)).route("/health/live", get(live)).route("/health/ready", get(ready))
}

/// Whether this instance takes new work: false from the start of a graceful shutdown, so a
/// load balancer stops sending requests before the listener closes.
#[derive(Debug)]
pub struct Readiness {
    accepting: std::sync::atomic::AtomicBool,
    /// Shards that must answer for the instance to be ready: enough to acknowledge an upload
    /// (`placement.write_quorum`).
    min_shards: usize,
}

impl Readiness {
    pub fn new(min_shards: usize) -> Self {
        Self { accepting: std::sync::atomic::AtomicBool::new(true), min_shards }
    }

    /// Graceful shutdown has begun.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_accepting(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A load balancer's probe answer: `live`, `ready`, `not_ready` or `stopping`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Probe {
    pub status: &'static str,
}

#[utoipa::path(
    get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process answers", body = Probe))
)]
async fn live() -> Json<Probe> {
    Json(Probe { status: "live" })
}

#[utoipa::path(
    get, path = "/health/ready", tag = "operations", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The database and enough shards to store an upload answer (checked at most a second ago; afresh for an admin)", body = Probe),
        (status = 401, description = "UNAUTHORIZED: credentials were sent and are not valid", body = ErrorBody),
        (status = 503, description = "Not ready (`not_ready`), or shutting down (`stopping`)", body = Probe),
    )
)]
async fn ready(State(state): State<AppState>, caller: Caller) -> (StatusCode, Json<Probe>) {
    let not_ready = |status| (StatusCode::SERVICE_UNAVAILABLE, Json(Probe { status }));
    if !state.readiness.is_accepting() {
        return not_ready("stopping");
    }
    let Checked { database, shards, .. } = checked_components(&state, &caller).await;
    let shards_up = shards.iter().filter(|shard| shard.error.is_none()).count();
    if database.error.is_some() || shards_up < state.readiness.min_shards.max(1) {
        return not_ready("not_ready");
    }
    (StatusCode::OK, Json(Probe { status: "ready" }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`: everything answers. `degraded`: serving, but a shard is down, a shard's circuit
    /// is open, or copies are below the replication factor for longer than replication
    /// normally takes (a copy `missing`, or `pending` for `replication.pending_overdue_secs`).
    /// `unavailable`: the database or every shard is down.
    pub status: &'static str,
    /// The components: shown to admins only (and to everyone with accounts off), since they
    /// name the store's internals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<ComponentHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<Vec<ComponentHealth>>,
    /// Copies per state (absent when the database is down), counted at most 10 s ago.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaSummary>,
    /// Whether credentials are needed and whether anyone may register: what a sign-in page
    /// needs to know, shown to everyone.
    pub accounts: AccountsInfo,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountsInfo {
    /// `auth.enabled`: off, every route is open to anonymous callers.
    pub enabled: bool,
    /// `POST /api/v1/auth/register` is open (`auth.open_registration`, with accounts on).
    pub open_registration: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ComponentHealth {
    pub name: String,
    /// `fs:/path`, `postgres`, …
    pub backend: String,
    /// `ok` or `down`.
    pub status: &'static str,
    /// Shards only: the circuit breaker's state (`closed`, `open`, `half_open`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit: Option<CircuitState>,
    pub latency_ms: f64,
    /// Why it is down: the cause, for the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaSummary {
    pub pending: u64,
    pub stored: u64,
    pub missing: u64,
    pub deleting: u64,
}

#[utoipa::path(
    get, path = "/health", tag = "operations", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The database and at least one shard answer; the components are listed for admins", body = Health),
        (status = 401, description = "UNAUTHORIZED: credentials were sent and are not valid", body = ErrorBody),
        (status = 503, description = "The database or every shard is down", body = Health),
    )
)]
async fn health(State(state): State<AppState>, caller: Caller) -> (StatusCode, Json<Health>) {
    let Checked { database, shards, under_replicated } = checked_components(&state, &caller).await;
    let database_up = database.error.is_none();
    // Counted only for the admins who see them.
    let replicas = if database_up && caller.is_admin() {
        state.replica_counts.get(COUNTS_MAX_AGE, async { state.metadata.count_replicas_by_state().await.ok() }).await
    } else {
        None
    };
    let shards_up = shards.iter().filter(|shard| shard.error.is_none()).count();
    let circuit_open = shards.iter().any(|shard| shard.circuit != Some(CircuitState::Closed));
    let (code, status) = match (database_up, shards_up) {
        (false, _) | (_, 0) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        _ if shards_up < shards.len() || under_replicated || circuit_open => (StatusCode::OK, "degraded"),
        _ => (StatusCode::OK, "ok"),
    };
    let replicas = replicas.map(|c| ReplicaSummary {
        pending: c.pending,
        stored: c.stored,
        missing: c.missing,
        deleting: c.deleting,
    });
    let enabled = state.accounts.enabled();
    let accounts = AccountsInfo { enabled, open_registration: enabled && state.accounts.open_registration() };
    if !caller.is_admin() {
        return (code, Json(Health { status, database: None, shards: None, replicas: None, accounts }));
    }
    (code, Json(Health { status, database: Some(database), shards: Some(shards), replicas, accounts }))
}

async fn check_database(state: &AppState) -> ComponentHealth {
    let started = Instant::now();
    let error = match tokio::time::timeout(CHECK_TIMEOUT, state.metadata.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error_chain(&error)),
        Err(_) => Some(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
    };
    let backend = state.metadata.backend_name();
    component("database".to_owned(), backend.to_owned(), started.elapsed(), error)
}

fn component(name: String, backend: String, latency: Duration, error: Option<String>) -> ComponentHealth {
    let status = if error.is_none() { "ok" } else { "down" };
    ComponentHealth { name, backend, status, circuit: None, latency_ms: latency.as_secs_f64() * 1000.0, error }
}
