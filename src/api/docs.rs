//! The OpenAPI document (`/openapi.json`) and an interactive page (`/docs`), both served from
//! the binary: the Swagger UI assets are vendored at build time, so no network is needed.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Chitram", description = "A self-hosted image store over a sharded, replicated object store.\n\n\
Every error is JSON, `{\"detail\": {\"code\": \"…\", \"message\": \"…\"}}` (schema `ErrorBody`), with a stable code. \
On every path: `404 NOT_FOUND` for a path that is no endpoint, `405 METHOD_NOT_ALLOWED` (with `Allow`) for a method \
the endpoint does not answer, `500 INTERNAL_ERROR` for a fault of the server; `503` answers carry `Retry-After`. \
With accounts off on a loopback address, `403 LOCAL_ONLY` for a request naming another host than this machine, or a \
write carrying another site's `Origin`.\n\n\
Credentials: `Authorization: Bearer <token>`, an API key (`chm_…`) or an access token from `POST /api/v1/auth/login`. \
Credentials that are sent and not valid get `401 UNAUTHORIZED` on every path. Every path but `/health` is rate limited \
per caller: answers carry `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`, and `429 RATE_LIMITED` \
carries `Retry-After`."),
    modifiers(&BearerAuth),
    paths(
        super::images::upload,
        super::images::batch,
        super::images::list,
        super::images::find,
        super::images::remove,
        super::images::change,
        super::images::sign,
        super::images::download,
        super::images::download_head,
        super::variants::variant,
        super::variants::variant_head,
        super::health::health,
        super::health::live,
        super::health::ready,
        super::metrics::metrics_for_admins,
        super::admin::replication,
        super::admin::storage,
        super::auth::register,
        super::auth::login,
        super::auth::me,
        super::auth::create_key,
        super::auth::list_keys,
        super::auth::revoke_key,
    ),
    tags((name = "images", description = "Upload, list, fetch and delete images"), (name = "operations", description = "Health, metrics and replication"), (name = "accounts", description = "Users, access tokens and API keys"))
)]
pub struct ApiDoc;

/// The `bearer` scheme the paths' `security` names.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An API key (`chm_…`) or an access token from `POST /api/v1/auth/login`"))
            .build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .layer(axum::middleware::map_response(hardened))
}

/// `/docs` shares its origin with the pages that keep an access token in `sessionStorage`: it
/// may not be framed (clickjacking), its assets are not sniffed, and links from it send no
/// `Referer`. (No content security policy: the vendored Swagger UI is not written for one.)
async fn hardened(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
