//! `/api/v1/images/{id}/variants/{name}`: a variant's bytes, made on demand if needed.

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::images::{Access, CACHE_FOREVER, CACHE_PRIVATE, if_none_match, readable_by_id};
use super::json::ImageBytes;
use crate::accounts::Caller;
use crate::images::error::ImageError;
use crate::metadata::{VariantRecord, VariantState};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/images/{id}/variants/{name}", get(variant).head(variant_head))
}

/// The `{id}` and `{name}` of the path, as the OpenAPI document describes them.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct VariantPath {
    /// The image's id (a UUID; anything else names no image: 404).
    id: String,
    /// A configured variant's name (`thumb` and `preview` by default).
    name: String,
}

/// The query of a variant's URL besides a signed URL's, as the OpenAPI document describes it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct VersionParam {
    /// The version of the variant's spec, as the image's JSON gives it in the variant's `url`.
    /// With the current one a public variant may be cached for good; without it, or with an
    /// older one, it is revalidated (the ETag changes when the spec does).
    #[param(nullable = false)]
    v: Option<String>,
}

/// A public variant without the current version in its URL may be stored, but is checked
/// again each time: its spec (size, quality) may change under the same path.
const CACHE_REVALIDATE: &str = "public, no-cache";

/// The version tag of a variant's spec, for its URL: a changed spec gives a new URL, so a
/// variant can be cached for good under it.
pub(super) fn version_tag(fingerprint: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(fingerprint.as_bytes()))
}

/// How long the variant may be kept: for good only when public and asked for by the URL of
/// the spec it was made with.
fn cache_control(record: &VariantRecord, access: Access, query: &[(String, String)]) -> HeaderValue {
    let asked = query.iter().rev().find(|(key, _)| key == "v").map(|(_, value)| value.as_str());
    HeaderValue::from_static(match access {
        Access::Private => CACHE_PRIVATE,
        Access::Public if asked == Some(version_tag(&record.fingerprint).as_str()) => CACHE_FOREVER,
        Access::Public => CACHE_REVALIDATE,
    })
}

#[utoipa::path(
    get, path = "/api/v1/images/{id}/variants/{name}", tag = "images", params(VariantPath, VersionParam, super::images::SignedParams),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The variant's bytes: JPEG for opaque images, PNG or WebP with transparency. Made now (once, however many ask) if it was not yet",
            content((ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp"))),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 400, description = "INVALID_SIGNED_URL", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "SIGNED_URL_EXPIRED", body = ErrorBody),
        (status = 404, description = "VARIANT_NOT_FOUND (no variant of this name is configured) or IMAGE_NOT_FOUND (also for an id that is not a UUID, and for another user's private image)", body = ErrorBody),
        (status = 422, description = "VARIANT_FAILED: the image cannot be decoded (the message says why); its original is still served", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn variant(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (id, name) = variant_path(path)?;
    // A variant is seen by whoever may see its image (a signed URL of the image included).
    let (_, access) = readable_by_id(&state, &caller, &id, &query).await?;
    let record = ready(state.variants.find(&id, &name).await?)?;
    if if_none_match(&headers, &etag(&record)) {
        return Ok(not_modified(&record, cache_control(&record, access, &query)));
    }
    let file = state.variants.open(record).await?;
    let mut response = Body::from_stream(file.stream).into_response();
    *response.headers_mut() = variant_headers(&file.record, cache_control(&file.record, access, &query));
    Ok(response)
}

/// HEAD answers from metadata once the variant exists (it is made first if needed).
#[utoipa::path(
    head, path = "/api/v1/images/{id}/variants/{name}", tag = "images", params(VariantPath, VersionParam, super::images::SignedParams),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The headers of the variant: Content-Type, Content-Length, ETag; no body"),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 400, description = "INVALID_SIGNED_URL"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "SIGNED_URL_EXPIRED", body = ErrorBody),
        (status = 404, description = "VARIANT_NOT_FOUND or IMAGE_NOT_FOUND", body = ErrorBody),
        (status = 422, description = "VARIANT_FAILED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn variant_head(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (id, name) = variant_path(path)?;
    // A variant is seen by whoever may see its image (a signed URL of the image included).
    let (_, access) = readable_by_id(&state, &caller, &id, &query).await?;
    let record = ready(state.variants.find(&id, &name).await?)?;
    if if_none_match(&headers, &etag(&record)) {
        return Ok(not_modified(&record, cache_control(&record, access, &query)));
    }
    let mut response = StatusCode::OK.into_response();
    *response.headers_mut() = variant_headers(&record, cache_control(&record, access, &query));
    Ok(response)
}

/// A path that is not even valid percent-encoded UTF-8 names no image.
fn variant_path(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ImageError> {
    path.map(|Path(parts)| parts).map_err(|_| ImageError::NotFound)
}

/// A failed variant is the image's fault: 422 with the reason.
fn ready(record: VariantRecord) -> Result<VariantRecord, ImageError> {
    match record.state {
        VariantState::Ready if record.blob.is_some() => Ok(record),
        _ => Err(ImageError::VariantFailed(record.reason.unwrap_or_else(|| "unknown".to_owned()))),
    }
}

/// The variant's blob checksum: content-addressed, so equal bytes have equal tags.
fn etag(record: &VariantRecord) -> HeaderValue {
    let blob = record.blob.as_ref().map(|blob| blob.as_str()).unwrap_or_default();
    HeaderValue::from_str(&format!("\"{blob}\"")).expect("hex is a valid header value")
}

fn not_modified(record: &VariantRecord, cache: HeaderValue) -> Response {
    let headers = [(header::ETAG, etag(record)), (header::CACHE_CONTROL, cache)];
    (StatusCode::NOT_MODIFIED, headers).into_response()
}

fn variant_headers(record: &VariantRecord, cache: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let content_type =
        HeaderValue::from_str(&record.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.file_size));
    headers.insert(header::ETAG, etag(record));
    headers.insert(header::CACHE_CONTROL, cache);
    super::images::confine_served_bytes(&mut headers);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_spec_is_a_new_url() {
        let (thumb, smaller) = ("v1:256x256:cover:q82:png", "v1:128x128:cover:q82:png");
        assert_eq!(version_tag(thumb), version_tag(thumb), "stable");
        assert_ne!(version_tag(thumb), version_tag(smaller));
        assert_eq!(version_tag(thumb).len(), 16);
        assert!(version_tag(thumb).bytes().all(|b| b.is_ascii_hexdigit()), "safe in a URL as it is");
    }
}
