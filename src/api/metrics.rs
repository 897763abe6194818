//! `GET /metrics`: Prometheus' text format (the families are listed in
//! `observability/names.rs`). Served on the main listener (admins only once accounts exist)
//! and, with `[metrics] bind`, alone on an internal port.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::gauge;

use super::AppState;
use super::error::{ApiError, error_body};
use crate::accounts::Caller;
use crate::observability::names;
use crate::storage::breaker::CircuitState;

/// The exposition format's media type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics` on the main listener: admins only (everyone with accounts off).
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics_for_admins))
}

/// The internal listener's whole surface: `/metrics` and nothing else, without credentials
/// (the port is for the operator's network only).
pub fn internal_app(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

#[utoipa::path(
    get, path = "/metrics", tag = "operations", security(("bearer" = [])),
    responses(
        (status = 200, description = "Metrics in Prometheus' text format", body = String, content_type = "text/plain"),
        (status = 401, description = "UNAUTHORIZED", body = super::error::ErrorBody),
        (status = 403, description = "FORBIDDEN: admins only", body = super::error::ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = super::error::ErrorBody),
        (status = 404, description = "NOT_FOUND: metrics are off (`[metrics] enabled = false`)", body = super::error::ErrorBody),
    )
)]
async fn metrics_for_admins(State(state): State<AppState>, caller: Caller) -> Response {
    match caller.require_admin() {
        Ok(()) => metrics(State(state)).await,
        Err(refusal) => ApiError::from(refusal).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return error_body(StatusCode::NOT_FOUND, "NOT_FOUND", "metrics are off on this instance ([metrics] enabled)")
            .into_response();
    };
    // Circuit states change between refreshes and cost nothing to read: read them now.
    for shard in state.router.shards() {
        let value = match shard.circuit().state {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        };
        gauge!(names::SHARD_CIRCUIT, "shard" => shard.name.clone()).set(value);
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], handle.render()).into_response()
}
