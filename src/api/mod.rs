//! HTTP: routes, extractors, JSON shapes, status codes and the OpenAPI document. No SQL, no
//! S3: handlers call the use cases in `images` and map their errors in `error`.

pub mod admin;
pub mod docs;
pub mod error;
pub mod health;
pub mod images;
pub mod json;
pub mod multipart;
pub mod variants;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::images::service::ImageService;
use crate::images::spool::SpoolLimits;
use crate::metadata::MetadataStore;
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
}

/// Limits on what a client may send.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    pub spool: SpoolLimits,
    pub max_batch_files: usize,
}

/// The whole HTTP surface.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(images::router())
        .merge(variants::router())
        .merge(health::router())
        .merge(admin::router())
        .merge(docs::router())
        .fallback(unknown_route)
        // Set once every route is in: it applies to the routes present. axum keeps `Allow`.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(TraceLayer::new_for_http())
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
