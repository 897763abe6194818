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
use super::images::{Access, cache_control, if_none_match, readable_by_id};
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

#[utoipa::path(
    get, path = "/api/v1/images/{id}/variants/{name}", tag = "images", params(VariantPath, super::images::SignedParams),
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
        return Ok(not_modified(&record, access));
    }
    let file = state.variants.open(record).await?;
    let mut response = Body::from_stream(file.stream).into_response();
    *response.headers_mut() = variant_headers(&file.record, access);
    Ok(response)
}

/// HEAD answers from metadata once the variant exists (it is made first if needed).
#[utoipa::path(
    head, path = "/api/v1/images/{id}/variants/{name}", tag = "images", params(VariantPath, super::images::SignedParams),
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
        return Ok(not_modified(&record, access));
    }
    let mut response = StatusCode::OK.into_response();
    *response.headers_mut() = variant_headers(&record, access);
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

fn not_modified(record: &VariantRecord, access: Access) -> Response {
    let headers = [(header::ETAG, etag(record)), (header::CACHE_CONTROL, cache_control(access))];
    (StatusCode::NOT_MODIFIED, headers).into_response()
}

fn variant_headers(record: &VariantRecord, access: Access) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let content_type =
        HeaderValue::from_str(&record.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.file_size));
    headers.insert(header::ETAG, etag(record));
    headers.insert(header::CACHE_CONTROL, cache_control(access));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers
}
