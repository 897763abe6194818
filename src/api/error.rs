//! The one place where errors become HTTP responses:
//! `{"detail": {"code": "…", "message": "…"}}`.
//!
//! Clients get a stable code and a message meant for them; internal causes are logged with
//! their whole chain inside the request's span and never sent.

use std::any::Any;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::images::error::ImageError;
use crate::images::format::FormatError;
use crate::telemetry::error_chain;

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError(pub ImageError);

impl<E: Into<ImageError>> From<E> for ApiError {
    fn from(error: E) -> Self {
        ApiError(error.into())
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub detail: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema, Clone, Debug, PartialEq)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `INVALID_FILE_FORMAT`, `IMAGE_NOT_FOUND`, …
    pub code: String,
    /// For people; may change between versions.
    pub message: String,
}

impl ApiError {
    /// The status, code and client-facing message of this error.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        use crate::images::error::Outage;
        use ImageError::*;
        let client = |status, code| (status, code, self.0.to_string());
        match &self.0 {
            InvalidFormat(FormatError::TooManyPixels { .. }) => {
                client(StatusCode::PAYLOAD_TOO_LARGE, "IMAGE_TOO_LARGE")
            }
            InvalidFormat(_) => client(StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT"),
            EmptyFile => client(StatusCode::BAD_REQUEST, "EMPTY_FILE"),
            FileTooLarge { .. } => client(StatusCode::PAYLOAD_TOO_LARGE, "FILE_TOO_LARGE"),
            MissingFile { .. } => client(StatusCode::UNPROCESSABLE_ENTITY, "MISSING_FILE"),
            InvalidMultipart(_) => client(StatusCode::BAD_REQUEST, "INVALID_MULTIPART"),
            TooManyFiles { .. } => client(StatusCode::BAD_REQUEST, "TOO_MANY_FILES"),
            NotFound => client(StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"),
            InvalidCursor => client(StatusCode::BAD_REQUEST, "INVALID_CURSOR"),
            InvalidLimit => client(StatusCode::BAD_REQUEST, "INVALID_LIMIT"),
            VariantNotFound => client(StatusCode::NOT_FOUND, "VARIANT_NOT_FOUND"),
            VariantFailed(_) => client(StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED"),
            StorageUnavailable(_) | VariantGeneration { outage: Outage::Storage, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "STORAGE_UNAVAILABLE",
                "no storage shard can serve this request right now; retry later".to_owned(),
            ),
            VariantGeneration { outage: Outage::Database, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
                "the metadata database is unavailable; retry later".to_owned(),
            ),
            Metadata(error) if error.is_unavailable() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
                "the metadata database is unavailable; retry later".to_owned(),
            ),
            Metadata(_) | Internal { .. } | VariantGeneration { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "an internal error occurred; the server log has the cause".to_owned(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        if status.is_server_error() {
            tracing::error!(code, error = %error_chain(&self.0), "request failed");
        }
        let mut response = error_body(status, code, &message).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        response
    }
}

/// An error response with the given code.
pub fn error_body(status: StatusCode, code: &str, message: &str) -> (StatusCode, Json<ErrorBody>) {
    (status, Json(ErrorBody { detail: ErrorDetail { code: code.to_owned(), message: message.to_owned() } }))
}

/// A handler that panicked still answers in the error format.
pub fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    error_body(
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL_ERROR",
        "an internal error occurred; the server log has the cause",
    )
    .into_response()
}
