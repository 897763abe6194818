//! `/api/v1/images`: upload, batch upload, list, metadata, download, delete.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use uuid::Uuid;

use super::auth::json_body;
use super::error::{ApiError, ErrorBody};
use super::json::{
    BatchItem, BatchResult, Image, ImageBytes, ImageList, SignedUrlJson, SignedUrlRequest, VisibilityChange,
};
use super::multipart::{EXTRA_PARTS, FormLimits, FramingError, open_form};
use super::{AppState, UploadLimits};
use crate::accounts::signed_url::Signature;
use crate::accounts::{AuthError, Caller};
use crate::blob::BlobKey;
use crate::images::cut_through::PendingWrite;
use crate::images::error::ImageError;
use crate::images::filename::Filename;
use crate::images::spool::{SpoolError, SpoolLimits, SpooledBody, spool_body};
use crate::metadata::{ImageOwner, ImageRecord, Visibility};
use crate::observability::stages::{Purpose, Stage, StageClock};
use multer::{Field, Multipart};

/// Room for multipart boundaries and part headers on top of the file itself.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Images never change under an id, so clients and proxies may keep public ones for a year.
pub(super) const CACHE_FOREVER: &str = "public, max-age=31536000, immutable";
/// A private image is for its reader alone: no shared cache keeps it, and the reader's own
/// revalidates (a cheap 304) so that losing access takes effect.
pub(super) const CACHE_PRIVATE: &str = "private, no-cache";
/// Longest value of the `visibility` form field read.
const VISIBILITY_FIELD_MAX: usize = 16;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/images/upload", post(upload))
        .route("/api/v1/images/batch", post(batch))
        .route("/api/v1/images", get(list))
        .route("/api/v1/images/{id}", get(find).delete(remove).patch(change))
        .route("/api/v1/images/{id}/file", get(download).head(download_head))
        .route("/api/v1/images/{id}/signed-url", post(sign))
}

/// The bounds of a form carrying up to `files` files.
fn form_limits(limits: &UploadLimits, files: usize) -> FormLimits {
    let per_file = limits.spool.max_bytes.saturating_add(MULTIPART_OVERHEAD);
    FormLimits { body: per_file.saturating_mul(files as u64), parts: files.saturating_add(EXTRA_PARTS) }
}

#[utoipa::path(
    post, path = "/api/v1/images/upload", tag = "images", params(UploadParams, ChecksumHeader), security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", content = super::json::UploadForm),
    responses(
        (status = 201, description = "Stored, owned by the caller", body = Image),
        (status = 400, description = "INVALID_FILE_FORMAT (not JPEG/PNG/GIF/WebP, or truncated or corrupt), EMPTY_FILE, INVALID_MULTIPART, INVALID_VISIBILITY, INVALID_CHECKSUM (X-Checksum-SHA256 is not 64 hex digits) or CHECKSUM_MISMATCH (the file's SHA-256 is not the declared one; nothing stored)", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "QUOTA_EXCEEDED", body = ErrorBody),
        (status = 413, description = "FILE_TOO_LARGE (over server.max_upload_bytes) or IMAGE_TOO_LARGE (over server.max_pixels)", body = ErrorBody),
        (status = 422, description = "MISSING_FILE: no part named file, or not a multipart body", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let owner = state.accounts.upload_owner(&caller)?;
    let mut visibility = query_visibility(&query)?;
    let declared = declared_checksum(&headers)?;
    let limits = form_limits(&state.limits, 1);
    refuse_declared_oversize(&headers, limits.body, &state.limits.spool)?;
    let (mut multipart, offsets) =
        open_form(&headers, body, limits).ok_or(ImageError::MissingFile { field: "file" })?;
    // The whole form is read before anything is recorded, so that a `visibility` field counts
    // wherever it is; the file waits in the spool meanwhile (the form's size is bounded).
    let form_len = declared_length(&headers);
    let mut file = None;
    let mut part = 0;
    while let Some(field) = next_field(&mut multipart, &state.limits.spool, "file").await? {
        part += 1;
        match field.name() {
            Some("visibility") => visibility = read_visibility(field).await?,
            Some("file") if file.is_none() => {
                let filename = field.file_name().map(str::to_owned);
                let streamed = declared.as_ref().and_then(|key| {
                    let len = offsets.last_part_len(part - 1, form_len?)?;
                    state.images.start_cut_through(key, len)
                });
                // The form's declared length bounds the file's: a form of a few MiB may stay
                // in memory, on the budget's account.
                let (body, streamed) = spool_field(field, &state.limits.spool, form_len, streamed).await?;
                file = Some((filename, body, streamed));
            }
            _ => {} // Dropping a field skips the rest of it.
        }
    }
    if let Some((filename, body, streamed)) = file {
        check_declared_checksum(declared.as_ref(), &body)?;
        let upload = state.images.upload(filename.as_deref(), body, streamed, owner, visibility);
        let image = Image::from(upload.await?);
        let location =
            HeaderValue::from_str(&format!("/api/v1/images/{}", image.id)).expect("a UUID path is a valid header");
        return Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(image)).into_response());
    }
    Err(ImageError::MissingFile { field: "file" }.into())
}

#[utoipa::path(
    post, path = "/api/v1/images/batch", tag = "images", params(UploadParams), security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", content = super::json::BatchForm),
    responses(
        (status = 200, description = "One result per file, each with the status and code the file would have had alone; a bad file does not fail the others", body = BatchResult),
        (status = 400, description = "INVALID_MULTIPART (the form is malformed before its first file), INVALID_VISIBILITY or INVALID_CHECKSUM (X-Checksum-SHA256 is for single uploads)", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),

        (status = 413, description = "FILE_TOO_LARGE: the request as a whole is too large", body = ErrorBody),
        (status = 422, description = "MISSING_FILE: no part named files, or not a multipart body", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR", body = ErrorBody),
        (status = 503, description = "STORAGE_UNAVAILABLE or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchResult>, ApiError> {
    let owner = state.accounts.upload_owner(&caller)?;
    let mut visibility = query_visibility(&query)?;
    if headers.contains_key(CHECKSUM_HEADER) {
        return Err(ImageError::InvalidChecksum.into());
    }
    let limits = &state.limits;
    let form = form_limits(limits, limits.max_batch_files);
    refuse_declared_oversize(&headers, form.body, &limits.spool)?;
    let (mut multipart, _) = open_form(&headers, body, form).ok_or(ImageError::MissingFile { field: "files" })?;
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
        if field.name() == Some("visibility") {
            // Files are stored as they arrive: the field applies to those after it.
            match read_visibility(field).await {
                Ok(chosen) => visibility = chosen,
                Err(error) if !results.is_empty() => {
                    results.push(batch_item(String::new(), Err(error.into())));
                    break;
                }
                Err(error) => return Err(error.into()),
            }
            continue;
        }
        if field.name() != Some("files") {
            continue;
        }
        let filename = field.file_name().unwrap_or_default().to_owned();
        let outcome = if results.len() >= limits.max_batch_files {
            Err(ImageError::TooManyFiles { limit: limits.max_batch_files }.into())
        } else {
            store_one(&state, &filename, field, owner, visibility).await
        };
        // The name as it is stored and served, not the raw one (paths, control characters).
        results.push(batch_item(Filename::sanitise(Some(&filename)).as_str().to_owned(), outcome));
    }
    if results.is_empty() {
        return Err(ImageError::MissingFile { field: "files" }.into());
    }
    let succeeded = results.iter().filter(|item| item.image.is_some()).count();
    Ok(Json(BatchResult { failed: results.len() - succeeded, succeeded, results }))
}

async fn store_one(
    state: &AppState,
    filename: &str,
    field: Field<'static>,
    owner: Option<ImageOwner>,
    visibility: Visibility,
) -> Result<ImageRecord, ApiError> {
    // A batch's declared length is the whole form's, not a file's: its files spool.
    let (body, _) = spool_field(field, &state.limits.spool, None, None).await?;
    Ok(state.images.upload(Some(filename), body, None, owner, visibility).await?)
}

/// `?visibility=` of an upload (the default: public).
fn query_visibility(query: &[(String, String)]) -> Result<Visibility, ImageError> {
    match query.iter().rev().find(|(key, _)| key == "visibility") {
        Some((_, value)) => Visibility::parse(value).ok_or(ImageError::InvalidVisibility),
        None => Ok(Visibility::default()),
    }
}

/// The `visibility` form field; it applies to the files after it in the form.
async fn read_visibility(mut field: Field<'static>) -> Result<Visibility, ImageError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.next().await {
        let chunk = chunk.map_err(|error| ImageError::InvalidMultipart(error.to_string()))?;
        if text.len() + chunk.len() > VISIBILITY_FIELD_MAX {
            return Err(ImageError::InvalidVisibility);
        }
        text.extend_from_slice(&chunk);
    }
    std::str::from_utf8(&text).ok().and_then(|text| Visibility::parse(text.trim())).ok_or(ImageError::InvalidVisibility)
}

fn batch_item(filename: String, outcome: Result<ImageRecord, ApiError>) -> BatchItem {
    match outcome {
        Ok(record) => BatchItem { filename, status: 201, image: Some(record.into()), error: None },
        Err(error) => {
            let (status, code, message) = error.parts();
            if status.is_server_error() {
                tracing::error!(code, error = %error.source_chain(), "batch item failed");
            }
            let detail = super::error::ErrorDetail { code: code.to_owned(), message };
            BatchItem { filename, status: status.as_u16(), image: None, error: Some(detail) }
        }
    }
}

/// The request's `Content-Length`, when it has a valid one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// Refuses a body whose declared length is over the limit before reading any of it.
fn refuse_declared_oversize(headers: &HeaderMap, limit: u64, spool: &SpoolLimits) -> Result<(), ApiError> {
    match declared_length(headers) {
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

/// The header in which a client may declare the SHA-256 of an upload's file (64 hex digits).
const CHECKSUM_HEADER: &str = "x-checksum-sha256";

/// The upload's declared SHA-256, if it has one; `INVALID_CHECKSUM` if it is not one.
fn declared_checksum(headers: &HeaderMap) -> Result<Option<BlobKey>, ImageError> {
    let Some(value) = headers.get(CHECKSUM_HEADER) else { return Ok(None) };
    let text = value.to_str().map_err(|_| ImageError::InvalidChecksum)?.trim().to_ascii_lowercase();
    BlobKey::parse(&text).map(Some).map_err(|_| ImageError::InvalidChecksum)
}

/// A file whose bytes are not the ones declared is refused (and its cut-through write, if it
/// had one, given up: nothing is stored).
fn check_declared_checksum(declared: Option<&BlobKey>, body: &SpooledBody) -> Result<(), ImageError> {
    match declared {
        Some(declared) if declared != &body.key => {
            Err(ImageError::ChecksumMismatch { declared: declared.to_string(), actual: body.key.to_string() })
        }
        _ => Ok(()),
    }
}

/// Receives one file, passing its chunks on to its cut-through write (`streamed`) as they
/// arrive; the write is handed back with the received body.
async fn spool_field(
    field: Field<'static>,
    limits: &SpoolLimits,
    expected_len: Option<u64>,
    mut streamed: Option<PendingWrite>,
) -> Result<(SpooledBody, Option<PendingWrite>), ImageError> {
    let mut clock = StageClock::start(Purpose::Upload);
    let teed = futures::stream::unfold((field, streamed.as_mut()), |(mut field, mut pending)| async move {
        let item = field.next().await?;
        if let (Ok(chunk), Some(pending)) = (&item, pending.as_deref_mut()) {
            pending.forward(chunk).await;
        }
        Some((item, (field, pending)))
    });
    let received = spool_body(std::pin::pin!(teed), limits, expected_len).await;
    let spooled = received.map_err(|error| match error {
        SpoolError::Body(source) => match source.downcast_ref::<multer::Error>() {
            Some(multipart) => multipart_error(multipart, limits),
            None => ImageError::InvalidMultipart(source.to_string()),
        },
        other => other.into(),
    })?;
    clock.finish(Stage::Receive);
    Ok((spooled, streamed))
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
    /// Admins: whose images (a username, or `*` for everyone's). Default: the caller's own.
    #[param(nullable = false)]
    owner: Option<String>,
}

/// The query of an upload (documented; read as pairs).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct UploadParams {
    /// `public` (default) or `private`; a `visibility` form field before the file does the same.
    #[param(nullable = false)]
    visibility: Option<Visibility>,
}

/// The headers of a single upload.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct ChecksumHeader {
    /// The SHA-256 of the file, as 64 hex digits. A file whose SHA-256 differs is refused with
    /// `CHECKSUM_MISMATCH` and nothing is stored; a large file streams to its shard while it
    /// arrives (a cut-through upload) instead of after.
    #[param(rename = "X-Checksum-SHA256", nullable = false, pattern = "^[0-9a-fA-F]{64}$")]
    checksum: Option<String>,
}

/// A signed URL's query, on the metadata and file of a private image: both or neither.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct SignedParams {
    /// Unix time the signed URL stops working.
    #[param(nullable = false, minimum = 0)]
    expires: Option<i64>,
    /// From `POST /api/v1/images/{id}/signed-url`: 64 hex digits.
    #[param(nullable = false, pattern = "^[0-9a-fA-F]{64}$")]
    signature: Option<String>,
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
    get, path = "/api/v1/images", tag = "images", params(ListParams), security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's images (an admin's `owner=`), newest first", body = ImageList),
        (status = 400, description = "INVALID_CURSOR or INVALID_LIMIT", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: `owner` names someone else and the caller is no admin", body = ErrorBody),
        (status = 404, description = "USER_NOT_FOUND: `owner` names no user", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),

        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ImageList>, ApiError> {
    // Read as pairs, which cannot fail to parse: a repeated parameter counts once (the last),
    // so the answer is INVALID_LIMIT or INVALID_CURSOR rather than a bare parse error.
    let param = |name: &str| pairs.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    let owner = list_owner(&state, &caller, param("owner")).await?;
    let page = state.images.list(param("limit"), param("cursor"), owner).await?;
    Ok(Json(ImageList { items: page.items.into_iter().map(Image::from).collect(), next_cursor: page.next_cursor }))
}

/// Whose images a list shows: a user's own; an admin's own, or `owner`'s (`*`: everyone's);
/// with accounts off, everyone's unless `owner` names someone.
async fn list_owner(state: &AppState, caller: &Caller, owner: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    caller.require_signed_in()?;
    match (owner, caller) {
        (Some(name), Caller::User(identity)) if name == identity.username => Ok(Some(identity.user)),
        (Some(_), _) if !caller.is_admin() => {
            Err(AuthError::Forbidden("only an admin may list another user's images").into())
        }
        (Some("*"), _) => Ok(None),
        (Some(name), _) => Ok(Some(state.accounts.user_named(name).await?.id)),
        (None, Caller::User(identity)) => Ok(Some(identity.user)),
        (None, _) => Ok(None),
    }
}

/// How a reader came to see an image, which decides how it may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Public,
    Private,
}

/// The image if the caller may see it (or the query carries a valid signed URL for it). Who
/// may not see a private image gets 404, as for an unknown id: its existence is not theirs to
/// learn.
async fn readable(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
    query: &[(String, String)],
) -> Result<(ImageRecord, Access), ApiError> {
    readable_by_id(state, caller, &image_id(id)?, query).await
}

/// [`readable`], for a route that has the id already (the variants').
pub(super) async fn readable_by_id(
    state: &AppState,
    caller: &Caller,
    id: &str,
    query: &[(String, String)],
) -> Result<(ImageRecord, Access), ApiError> {
    let signed = signed_params(query)?;
    let record = state.images.find(id).await?;
    if record.visibility == Visibility::Public {
        return Ok((record, Access::Public));
    }
    if caller.may_read(&record) {
        return Ok((record, Access::Private));
    }
    if let Some((expires, signature)) = signed {
        match state.accounts.check_signature(record.id, expires, signature) {
            Signature::Valid => return Ok((record, Access::Private)),
            Signature::Expired => return Err(AuthError::SignedUrlExpired.into()),
            Signature::Invalid => {}
        }
    }
    Err(ImageError::NotFound.into())
}

/// The `expires` and `signature` of a signed URL: both or neither, well formed.
fn signed_params(query: &[(String, String)]) -> Result<Option<(i64, &str)>, ApiError> {
    let param = |name: &str| query.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    match (param("expires"), param("signature")) {
        (None, None) => Ok(None),
        (Some(expires), Some(signature)) => {
            let expires = expires.parse::<i64>().ok().filter(|expires| *expires >= 0);
            let hex = signature.len() == 64 && signature.bytes().all(|b| b.is_ascii_hexdigit());
            match expires {
                Some(expires) if hex => Ok(Some((expires, signature))),
                _ => Err(ImageError::InvalidSignedUrl.into()),
            }
        }
        _ => Err(ImageError::InvalidSignedUrl.into()),
    }
}

/// The image if the caller may change it (its owner or an admin).
async fn changeable(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<ImageRecord, ApiError> {
    // Credentials first: without them, the answer is 401 whether the image exists or not.
    caller.require_signed_in()?;
    let record = state.images.find(&image_id(id)?).await?;
    match caller.may_change(&record) {
        Ok(()) => Ok(record),
        Err(Some(refusal)) => Err(refusal.into()),
        Err(None) => Err(ImageError::NotFound.into()),
    }
}

#[utoipa::path(
    get, path = "/api/v1/images/{id}", tag = "images", params(IdParam, SignedParams), security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The image", body = Image),
        (status = 400, description = "INVALID_SIGNED_URL: `expires` or `signature` malformed, or one without the other", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "SIGNED_URL_EXPIRED", body = ErrorBody),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID, and for another user's private image)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),

        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn find(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Image>, ApiError> {
    let (record, _) = readable(&state, &caller, id, &query).await?;
    Ok(Json(record.into()))
}

#[utoipa::path(
    delete, path = "/api/v1/images/{id}", tag = "images", params(IdParam), security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not the owner or an admin", body = ErrorBody),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),

        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let record = changeable(&state, &caller, id).await?;
    state.images.delete(&record.id.to_string()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    patch, path = "/api/v1/images/{id}", tag = "images", params(IdParam), request_body = VisibilityChange,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The image, with its new visibility", body = Image),
        (status = 400, description = "INVALID_BODY", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not the owner or an admin", body = ErrorBody),
        (status = 404, description = "IMAGE_NOT_FOUND", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn change(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<VisibilityChange>, JsonRejection>,
) -> Result<Json<Image>, ApiError> {
    let change = json_body(body)?;
    let record = changeable(&state, &caller, id).await?;
    Ok(Json(state.images.set_visibility(record.id, change.visibility).await?.into()))
}

#[utoipa::path(
    post, path = "/api/v1/images/{id}/signed-url", tag = "images", params(IdParam),
    request_body(content = Option<SignedUrlRequest>, description = "Optional; the default lifetime is one hour"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A link to the file that needs no credentials until it expires", body = SignedUrlJson),
        (status = 400, description = "INVALID_BODY or INVALID_EXPIRY", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not the owner or an admin", body = ErrorBody),
        (status = 404, description = "IMAGE_NOT_FOUND", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn sign(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Json<SignedUrlJson>, ApiError> {
    let record = changeable(&state, &caller, id).await?;
    let bytes = axum::body::to_bytes(body, 4096).await.map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    let request: SignedUrlRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        SignedUrlRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidBody(e.to_string()))?
    };
    let signed = state.accounts.sign_url(record.id, request.expires_in)?;
    let url = format!("/api/v1/images/{}/file?expires={}&signature={}", record.id, signed.expires, signed.signature);
    let expires_at = chrono::DateTime::from_timestamp(signed.expires, 0).unwrap_or_default();
    Ok(Json(SignedUrlJson { url, expires_at }))
}

#[utoipa::path(
    get, path = "/api/v1/images/{id}/file", tag = "images", params(IdParam, SignedParams), security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The bytes, as the type their magic bytes showed at upload",
            content((ImageBytes = "image/png"), (ImageBytes = "image/jpeg"), (ImageBytes = "image/gif"), (ImageBytes = "image/webp"))),
        (status = 400, description = "INVALID_SIGNED_URL: `expires` or `signature` malformed, or one without the other", body = ErrorBody),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "SIGNED_URL_EXPIRED", body = ErrorBody),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID, and for another user's private image)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),

        (status = 503, description = "STORAGE_UNAVAILABLE (no copy could be read) or DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn download(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Access first: a 304 to someone who may not see the image would confirm that it exists.
    let (record, access) = readable(&state, &caller, id, &query).await?;
    // The ETag is the checksum, so a revalidation is answered from metadata alone.
    if etag_matches(&headers, &record) {
        return Ok(not_modified(&record, access));
    }
    let file = state.images.open_file(record).await?;
    let mut response = Body::from_stream(file.reader.stream).into_response();
    *response.headers_mut() = file_headers(&file.record, access);
    Ok(response)
}

/// HEAD answers from metadata: no shard is read.
#[utoipa::path(
    head, path = "/api/v1/images/{id}/file", tag = "images", params(IdParam, SignedParams), security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The headers of the file: Content-Type, Content-Length, ETag; no body"),
        (status = 400, description = "INVALID_SIGNED_URL: `expires` or `signature` malformed, or one without the other"),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "SIGNED_URL_EXPIRED", body = ErrorBody),
        (status = 404, description = "IMAGE_NOT_FOUND (also for an id that is not a UUID, and for another user's private image)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),

        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn download_head(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (record, access) = readable(&state, &caller, id, &query).await?;
    if etag_matches(&headers, &record) {
        return Ok(not_modified(&record, access));
    }
    let mut response = StatusCode::OK.into_response();
    *response.headers_mut() = file_headers(&record, access);
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

pub(super) fn cache_control(access: Access) -> HeaderValue {
    HeaderValue::from_static(match access {
        Access::Public => CACHE_FOREVER,
        Access::Private => CACHE_PRIVATE,
    })
}

fn not_modified(record: &ImageRecord, access: Access) -> Response {
    let headers = [(header::ETAG, etag(record)), (header::CACHE_CONTROL, cache_control(access))];
    (StatusCode::NOT_MODIFIED, headers).into_response()
}

fn file_headers(record: &ImageRecord, access: Access) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let content_type =
        HeaderValue::from_str(&record.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.file_size));
    headers.insert(header::ETAG, etag(record));
    headers.insert(header::CACHE_CONTROL, cache_control(access));
    confine_served_bytes(&mut headers);
    let disposition = format!("inline; filename*=UTF-8''{}", percent_encode(&record.filename));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers
}

/// Uploaded bytes (an original, a variant) are served as the type their magic bytes showed and
/// never sniffed into something a browser would run; opened as a page, they are a sandboxed
/// document of an origin of their own, so nothing in them could run or reach this origin's
/// storage. (`sandbox` alone: `default-src 'none'` stops some browsers showing the image.)
pub(super) fn confine_served_bytes(headers: &mut HeaderMap) {
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
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
