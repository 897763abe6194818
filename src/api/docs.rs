//! The OpenAPI document (`/openapi.json`) and an interactive page (`/docs`), both served from
//! the binary: the Swagger UI assets are vendored at build time, so no network is needed.

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Chitram", description = "A self-hosted image store over a sharded, replicated object store.\n\n\
Every error is JSON, `{\"detail\": {\"code\": \"…\", \"message\": \"…\"}}` (schema `ErrorBody`), with a stable code. \
On every path: `404 NOT_FOUND` for a path that is no endpoint, `405 METHOD_NOT_ALLOWED` (with `Allow`) for a method \
the endpoint does not answer, `500 INTERNAL_ERROR` for a fault of the server; `503` answers carry `Retry-After`."),
    paths(
        super::images::upload,
        super::images::batch,
        super::images::list,
        super::images::find,
        super::images::remove,
        super::images::download,
        super::images::download_head,
        super::variants::variant,
        super::variants::variant_head,
        super::health::health,
        super::admin::replication,
    ),
    tags((name = "images", description = "Upload, list, fetch and delete images"), (name = "operations", description = "Health and replication"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
