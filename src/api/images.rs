//! `/api/v1/images`: upload, batch upload, list, metadata, download, delete.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::error::{ApiError, ErrorBody};
use super::json::{BatchItem, BatchResult, Image, ImageBytes, ImageList};
use super::multipart::{EXTRA_PARTS, FormLimits, FramingError, open_form};
use super::{AppState, UploadLimits};
use crate::images::error::ImageError;
use crate::images::spool::{SpoolError, SpoolLimits, SpooledBody, spool_body};
use crate::metadata::ImageRecord;
use multer::{Field, Multipart};

/// Room for multipart boundaries and part headers on top of the file itself.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Images never change under an id, so clients and proxies may keep them for a year.
pub(super) const CACHE_FOREVER: &str = "public, max-age=31536000, immutable";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/images/upload", post(upload))
        .route("/api/v1/images/batch", post(batch))
        .route("/api/v1/images", get(list))
        .route("/api/v1/images/{id}", get(find).delete(remove))
        .route("/api/v1/images/{id}/file", get(download).head(download_head))
}

/// The bounds of a form carrying up to `files` files.
fn form_limits(limits: &UploadLimits, files: usize) -> FormLimits {
    let per_file = limits.spool.max_bytes.saturating_add(MULTIPART_OVERHEAD);
    FormLimits { body: per_file.saturating_mul(files as u64), parts: files.saturating_add(EXTRA_PARTS) }
}

#[utoipa::path(
    post, path = "/api/v1/images/upload", tag = "images",
    request_body(content_type = "multipart/form-data", content = super::json::UploadForm),
    responses(
        (status = 201, description = "Stored", body = Image),
        (status = 400, description = "INVALID_FILE_FORMAT (not JPEG/PNG/GIF/WebP, or truncated or corrupt), EMPTY_FILE or INVALID_MULTIPART", body = ErrorBody),
        (status = 413, description = "FILE_TOO_LARGE (over server.max_upload_bytes) or IMAGE_TOO_LARGE (over server.max_pixels)", body = ErrorBody),
        (status = 422, description = "MISSING_FILE: no part named file, or not a multipart body", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn upload(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let limits = form_limits(&state.limits, 1);
    refuse_declared_oversize(&headers, limits.body, &state.limits.spool)?;
    let mut multipart = open_form(&headers, body, limits).ok_or(ImageError::MissingFile { field: "file" })?;
    while let Some(field) = next_field(&mut multipart, &state.limits.spool, "file").await? {
        if field.name() != Some("file") {
            continue; // Dropping a field skips the rest of it.
        }
        let filename = field.file_name().map(str::to_owned);
        let body = spool_field(field, &state.limits.spool).await?;
        let image = Image::from(state.images.upload(filename.as_deref(), body).await?);
        let location =
            HeaderValue::from_str(&format!("/api/v1/images/{}", image.id)).expect("a UUID path is a valid header");
        return Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(image)).into_response());
    }
    Err(ImageError::MissingFile { field: "file" }.into())
}

#[utoipa::path(
    post, path = "/api/v1/images/batch", tag = "images",
    request_body(content_type = "multipart/form-data", content = super::json::BatchForm),
    responses(
        (status = 200, description = "One result per file, each with the status and code the file would have had alone; a bad file does not fail the others", body = BatchResult),
        (status = 400, description = "INVALID_MULTIPART: the form is malformed before its first file", body = ErrorBody),
        (status = 413, description = "FILE_TOO_LARGE: the request as a whole is too large", body = ErrorBody),
        (status = 422, description = "MISSING_FILE: no part named files, or not a multipart body", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn batch(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<BatchResult>, ApiError> {
    let limits = &state.limits;
    let form = form_limits(limits, limits.max_batch_files);
    refuse_declared_oversize(&headers, form.body, &limits.spool)?;
    let mut multipart = open_form(&headers, body, form).ok_or(ImageError::MissingFile { field: "files" })?;
    let mut results = Vec::new();
    loop {
        let field = match next_field(&mut multipart, &limits.spool, "files").await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            // Files already stored stay stored: report them, and the failure, rather than
            // hiding what happened behind one error.
            Err(error) if !results.is_empty() => {
                results.push(batch_item(String::new(), Err(error)));
                break;
            }
            Err(error) => return Err(error),
        };
        if field.name() != Some("files") {
            continue;
        }
        let filename = field.file_name().unwrap_or_default().to_owned();
        let outcome = if results.len() >= limits.max_batch_files {
            Err(ImageError::TooManyFiles { limit: limits.max_batch_files }.into())
        } else {
            store_one(&state, &filename, field).await
        };
        results.push(batch_item(filename, outcome));
    }
    if results.is_empty() {
        return Err(ImageError::MissingFile { field: "files" }.into());
    }
    let succeeded = results.iter().filter(|item| item.image.is_some()).count();
    Ok(Json(BatchResult { failed: results.len() - succeeded, succeeded, results }))
}

async fn store_one(state: &AppState, filename: &str, field: Field<'static>) -> Result<ImageRecord, ApiError> {
    let body = spool_field(field, &state.limits.spool).await?;
    Ok(state.images.upload(Some(filename), body).await?)
}

fn batch_item(filename: String, outcome: Result<ImageRecord, ApiError>) -> BatchItem {
    match outcome {
        Ok(record) => BatchItem { filename, status: 201, image: Some(record.into()), error: None },
        Err(error) => {
            let (status, code, message) = error.parts();
            if status.is_server_error() {
                tracing::error!(code, error = %crate::telemetry::error_chain(&error.0), "batch item failed");
            }
            let detail = super::error::ErrorDetail { code: code.to_owned(), message };
            BatchItem { filename, status: status.as_u16(), image: None, error: Some(detail) }
        }
    }
}

/// Refuses a body whose declared length is over the limit before reading any of it.
fn refuse_declared_oversize(headers: &HeaderMap, limit: u64, spool: &SpoolLimits) -> Result<(), ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(ImageError::FileTooLarge { limit: spool.max_bytes }.into()),
        _ => Ok(()),
    }
}

/// The next part of the form. A body with no part at all (not even a valid first boundary)
/// has no file: `MISSING_FILE`, like a form without the expected field.
async fn next_field(
    multipart: &mut Multipart<'static>,
    spool: &SpoolLimits,
    expected: &'static str,
) -> Result<Option<Field<'static>>, ApiError> {
    multipart.next_field().await.map_err(|error| match error {
        multer::Error::IncompleteStream => ImageError::MissingFile { field: expected }.into(),
        other => multipart_error(&other, spool).into(),
    })
}

async fn spool_field(field: Field<'static>, limits: &SpoolLimits) -> Result<SpooledBody, ImageError> {
    spool_body(field, limits).await.map_err(|error| match error {
        SpoolError::Body(source) => match source.downcast_ref::<multer::Error>() {
            Some(multipart) => multipart_error(multipart, limits),
            None => ImageError::InvalidMultipart(source.to_string()),
        },
        other => other.into(),
    })
}

/// A body over the request limit is `FILE_TOO_LARGE`; bad framing (`FramingGuard`) and
/// anything else multer refuses is `INVALID_MULTIPART`.
fn multipart_error(error: &multer::Error, spool: &SpoolLimits) -> ImageError {
    match error {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ImageError::FileTooLarge { limit: spool.max_bytes }
        }
        multer::Error::StreamReadFailed(source) => match source.downcast_ref::<FramingError>() {
            Some(framing) => ImageError::InvalidMultipart(framing.to_string()),
            None => ImageError::InvalidMultipart(format!("reading the body failed: {source}")),
        },
        other => ImageError::InvalidMultipart(other.to_string()),
    }
}

/// The query of `GET /api/v1/images` (documented; read as pairs by [`list`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ListParams {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, nullable = false)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(nullable = false)]
    cursor: Option<String>,
}

/// The `{id}` of a path, as the OpenAPI document describes it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct IdParam {
    /// The image's id (a UUID; anything else names no image: 404).
    id: String,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/images", tag = "images", params(ListParams),
    responses(
        (status = 200, description = "Newest first", body = ImageList),
        (status = 400, description = "INVALID_CURSOR or INVALID_LIMIT", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn list(
    State(state): State<AppState>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ImageList>, ApiError> {
    // Read as pairs, which cannot fail to parse: a repeated parameter counts once (the last),
    // so the answer is INVALID_LIMIT or INVALID_CURSOR rather than a bare parse error.
    let param = |name: &str| pairs.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    let page = state.images.list(param("limit"), param("cursor")).await?;
    Ok(Json(ImageList { items: page.items.into_iter().map(Image::from).collect(), next_cursor: page.next_cursor }))
}

#[utoipa::path(
    get, path = "/api/v1/images/{id}", tag = "images", params(IdParam),
    responses(
        (status = 200, description = "The image", body = Image),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID)", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn find(State(state): State<AppState>, id: Result<Path<String>, PathRejection>) -> Result<Json<Image>, ApiError> {
    Ok(Json(state.images.find(&image_id(id)?).await?.into()))
}

#[utoipa::path(
    delete, path = "/api/v1/images/{id}", tag = "images", params(IdParam),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID)", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn remove(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    state.images.delete(&image_id(id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get, path = "/api/v1/images/{id}/file", tag = "images", params(IdParam),
    responses(
        (status = 200, description = "The bytes, as the type their magic bytes showed at upload",
            content((ImageBytes = "image/png"), (ImageBytes = "image/jpeg"), (ImageBytes = "image/gif"), (ImageBytes = "image/webp"))),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID)", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE (no copy could be read) or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn download(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = state.images.find(&image_id(id)?).await?;
    // The ETag is the checksum, so a revalidation is answered from metadata alone.
    if etag_matches(&headers, &record) {
        return Ok(not_modified(&record));
    }
    let file = state.images.open_file(record).await?;
    let mut response = Body::from_stream(file.reader.stream).into_response();
    *response.headers_mut() = file_headers(&file.record);
    Ok(response)
}

/// HEAD answers from metadata: no shard is read.
#[utoipa::path(
    head, path = "/api/v1/images/{id}/file", tag = "images", params(IdParam),
    responses(
        (status = 200, description = "The headers of the file: Content-Type, Content-Length, ETag; no body"),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID)", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn download_head(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = state.images.find(&image_id(id)?).await?;
    if etag_matches(&headers, &record) {
        return Ok(not_modified(&record));
    }
    let mut response = StatusCode::OK.into_response();
    *response.headers_mut() = file_headers(&record);
    Ok(response)
}

/// The `{id}` of a path. One that is not even valid percent-encoded UTF-8 names no image.
pub(super) fn image_id(id: Result<Path<String>, PathRejection>) -> Result<String, ImageError> {
    id.map(|Path(id)| id).map_err(|_| ImageError::NotFound)
}

fn etag(record: &ImageRecord) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\"", record.blob)).expect("hex is a valid header value")
}

/// `If-None-Match`: a list of (possibly weak) entity tags, or `*`.
fn etag_matches(headers: &HeaderMap, record: &ImageRecord) -> bool {
    if_none_match(headers, &etag(record))
}

/// Whether `If-None-Match` names `ours` (or is `*`).
pub(super) fn if_none_match(headers: &HeaderMap, ours: &HeaderValue) -> bool {
    let Some(ours) = ours.to_str().ok() else { return false };
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|value| value.to_str().ok()).any(|value| {
        value.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == ours)
    })
}

fn not_modified(record: &ImageRecord) -> Response {
    let headers = [(header::ETAG, etag(record)), (header::CACHE_CONTROL, HeaderValue::from_static(CACHE_FOREVER))];
    (StatusCode::NOT_MODIFIED, headers).into_response()
}

fn file_headers(record: &ImageRecord) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let content_type =
        HeaderValue::from_str(&record.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.file_size));
    headers.insert(header::ETAG, etag(record));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_FOREVER));
    // Uploaded bytes are served as the type their magic bytes showed, and never sniffed
    // into something a browser would run.
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    let disposition = format!("inline; filename*=UTF-8''{}", percent_encode(&record.filename));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers
}

/// RFC 5987 encoding of a filename: unreserved characters stay, every other byte is `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
