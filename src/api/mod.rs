//! HTTP: routes, extractors, JSON shapes, status codes and the OpenAPI document. No SQL, no
//! S3: handlers call the use cases in `images` and map their errors in `error`.

pub mod admin;
pub mod auth;
pub mod caller;
pub mod docs;
pub mod error;
pub mod health;
pub mod images;
pub mod json;
pub mod local_only;
pub mod metrics;
pub mod multipart;
pub mod ratelimit;
pub mod request;
pub mod variants;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::middleware::from_fn;
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;

use crate::accounts::Accounts;
use crate::images::service::ImageService;
use crate::images::spool::SpoolLimits;
use crate::metadata::MetadataStore;
use crate::ratelimit::RateLimiter;
use crate::storage::router::StorageRouter;
use crate::variants::service::VariantService;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub images: Arc<ImageService>,
    pub variants: Arc<VariantService>,
    pub metadata: Arc<dyn MetadataStore>,
    pub router: Arc<StorageRouter>,
    pub limits: Arc<UploadLimits>,
    /// Replication workers running in this instance.
    pub replication_workers: usize,
    /// The copy counts `/health` shows, refreshed at most every few seconds.
    pub replica_counts: Arc<health::ReplicaCountsCache>,
    /// The components' last check, shared by the probes of callers who are not admins.
    pub component_checks: Arc<health::ComponentChecks>,
    /// How long a copy may stay pending before `/health` says `degraded`
    /// (`replication.pending_overdue_secs`).
    pub pending_overdue: std::time::Duration,
    pub accounts: Arc<Accounts>,
    pub limiter: Arc<RateLimiter>,
    /// Whether the client's address is the last `X-Forwarded-For` entry (behind a proxy).
    pub trust_forwarded_for: bool,
    /// Accounts off on a loopback bind: only requests for localhost, and no write from another
    /// site's page (`local_only`).
    pub local_only: bool,
    /// Renders `/metrics`; `None` when metrics are off.
    pub metrics: Option<PrometheusHandle>,
    /// What `/health/ready` answers from.
    pub readiness: Arc<health::Readiness>,
}

/// Limits on what a client may send.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    pub spool: SpoolLimits,
    pub max_batch_files: usize,
}

/// The whole HTTP surface. Every request is checked for where it comes from when accounts are
/// off (`local_only`), identified (`caller`), then rate limited (`ratelimit`), then routed.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(images::router())
        .merge(auth::router())
        .merge(variants::router())
        .merge(health::router())
        .merge(admin::router())
        .merge(docs::router())
        .merge(metrics::router())
        .merge(crate::web::router())
        .fallback(unknown_route)
        // Set once every route is in: it applies to the routes present. axum keeps `Allow`.
        .method_not_allowed_fallback(method_not_allowed)
        // The last layer added runs first.
        .layer(from_fn_with_state(state.clone(), ratelimit::limit))
        .layer(from_fn_with_state(state.clone(), caller::identify))
        .layer(from_fn_with_state(state.clone(), local_only::guard))
        .with_state(state)
        // Layers apply to each route after routing (so the route template is known), the
        // last added outermost: the id is checked, set, traced, echoed, then in scope.
        .layer(from_fn(request::observe))
        .layer(request::propagate_id())
        .layer(request::trace())
        .layer(request::set_id())
        .layer(from_fn(request::refuse_unacceptable_id))
        .layer(CatchPanicLayer::custom(error::panic_response))
}

async fn unknown_route() -> impl IntoResponse {
    error::error_body(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint; see /docs for the API")
}

async fn method_not_allowed() -> impl IntoResponse {
    error::error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this endpoint does not answer this method; the Allow header lists those it does",
    )
}
