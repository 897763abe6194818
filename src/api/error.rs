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

use crate::accounts::AuthError;
use crate::images::error::ImageError;
use crate::images::format::FormatError;
use crate::metadata::MetadataError;
use crate::telemetry::error_chain;

/// An error as the API reports it.
#[derive(Debug)]
pub enum ApiError {
    Image(ImageError),
    Auth(AuthError),
    /// 400 `INVALID_BODY`: a JSON body that is not what the route takes.
    InvalidBody(String),
    /// 429 `RATE_LIMITED`, with `Retry-After` (whole seconds).
    RateLimited {
        retry_after_secs: u64,
    },
}

impl<E: Into<ImageError>> From<E> for ApiError {
    fn from(error: E) -> Self {
        ApiError::Image(error.into())
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::Auth(error)
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
        match self {
            ApiError::Image(error) => image_parts(error),
            ApiError::Auth(error) => auth_parts(error),
            ApiError::InvalidBody(reason) => {
                (StatusCode::BAD_REQUEST, "INVALID_BODY", format!("the request body is not valid: {reason}"))
            }
            ApiError::RateLimited { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                format!("too many requests: retry in {retry_after_secs} s"),
            ),
        }
    }

    /// The error inside, for the log.
    pub fn source_chain(&self) -> String {
        match self {
            ApiError::Image(error) => error_chain(error),
            ApiError::Auth(error) => error_chain(error),
            other => other.parts().2,
        }
    }
}

fn auth_parts(error: &AuthError) -> (StatusCode, &'static str, String) {
    use AuthError::*;
    let client = |status, code| (status, code, error.to_string());
    match error {
        MissingCredentials | InvalidCredentials { .. } => client(StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        WrongPassword => client(StatusCode::UNAUTHORIZED, "INVALID_CREDENTIALS"),
        Forbidden(_) => client(StatusCode::FORBIDDEN, "FORBIDDEN"),
        SignedUrlExpired => client(StatusCode::FORBIDDEN, "SIGNED_URL_EXPIRED"),
        RegistrationClosed => client(StatusCode::FORBIDDEN, "REGISTRATION_CLOSED"),
        UsernameTaken(_) => client(StatusCode::CONFLICT, "USERNAME_TAKEN"),
        InvalidUsername => client(StatusCode::BAD_REQUEST, "INVALID_USERNAME"),
        InvalidPassword => client(StatusCode::BAD_REQUEST, "INVALID_PASSWORD"),
        InvalidKeyName => client(StatusCode::BAD_REQUEST, "INVALID_KEY_NAME"),
        InvalidExpiry { .. } => client(StatusCode::BAD_REQUEST, "INVALID_EXPIRY"),
        KeyNotFound => client(StatusCode::NOT_FOUND, "KEY_NOT_FOUND"),
        UserNotFound(_) => client(StatusCode::NOT_FOUND, "USER_NOT_FOUND"),
        Metadata(error) => metadata_parts(error),
        Internal { .. } => internal(),
    }
}

fn metadata_parts(error: &MetadataError) -> (StatusCode, &'static str, String) {
    if error.is_unavailable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
            "the metadata database is unavailable; retry later".to_owned(),
        )
    } else {
        internal()
    }
}

fn internal() -> (StatusCode, &'static str, String) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL_ERROR",
        "an internal error occurred; the server log has the cause".to_owned(),
    )
}

fn image_parts(error: &ImageError) -> (StatusCode, &'static str, String) {
    use crate::images::error::Outage;
    use ImageError::*;
    let client = |status, code| (status, code, error.to_string());
    match error {
        InvalidFormat(FormatError::TooManyPixels { .. }) => client(StatusCode::PAYLOAD_TOO_LARGE, "IMAGE_TOO_LARGE"),
        InvalidFormat(_) => client(StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT"),
        EmptyFile => client(StatusCode::BAD_REQUEST, "EMPTY_FILE"),
        FileTooLarge { .. } => client(StatusCode::PAYLOAD_TOO_LARGE, "FILE_TOO_LARGE"),
        MissingFile { .. } => client(StatusCode::UNPROCESSABLE_ENTITY, "MISSING_FILE"),
        InvalidMultipart(_) => client(StatusCode::BAD_REQUEST, "INVALID_MULTIPART"),
        TooManyFiles { .. } => client(StatusCode::BAD_REQUEST, "TOO_MANY_FILES"),
        InvalidChecksum => client(StatusCode::BAD_REQUEST, "INVALID_CHECKSUM"),
        ChecksumMismatch { .. } => client(StatusCode::BAD_REQUEST, "CHECKSUM_MISMATCH"),
        NotFound => client(StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"),
        InvalidCursor => client(StatusCode::BAD_REQUEST, "INVALID_CURSOR"),
        InvalidLimit => client(StatusCode::BAD_REQUEST, "INVALID_LIMIT"),
        VariantNotFound => client(StatusCode::NOT_FOUND, "VARIANT_NOT_FOUND"),
        VariantFailed(_) => client(StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED"),
        VariantGeneration { outage: Outage::Database, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
            "the metadata database is unavailable; retry later".to_owned(),
        ),
        VariantGeneration { outage: Outage::None, .. } => internal(),
        StorageUnavailable(_) | VariantGeneration { outage: Outage::Storage, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "STORAGE_UNAVAILABLE",
            "no storage shard can serve this request right now; retry later".to_owned(),
        ),
        QuotaExceeded { .. } => client(StatusCode::FORBIDDEN, "QUOTA_EXCEEDED"),
        InvalidVisibility => client(StatusCode::BAD_REQUEST, "INVALID_VISIBILITY"),
        InvalidSignedUrl => client(StatusCode::BAD_REQUEST, "INVALID_SIGNED_URL"),
        Metadata(error) => metadata_parts(error),
        Internal { .. } => internal(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        if status.is_server_error() {
            tracing::error!(code, error = %self.source_chain(), "request failed");
        } else if let ApiError::Auth(AuthError::InvalidCredentials { reason }) = &self {
            tracing::info!(reason, "refused credentials");
        }
        let mut response = error_body(status, code, &message);
        let headers = response.headers_mut();
        match (&self, status) {
            (ApiError::RateLimited { retry_after_secs }, _) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from(*retry_after_secs));
            }
            (_, StatusCode::SERVICE_UNAVAILABLE) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            }
            (ApiError::Auth(AuthError::InvalidCredentials { .. }), _) => {
                let challenge = header::HeaderValue::from_static("Bearer error=\"invalid_token\"");
                headers.insert(header::WWW_AUTHENTICATE, challenge);
            }
            (_, StatusCode::UNAUTHORIZED) => {
                headers.insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// The code of an error answer, kept on the response for the request metrics.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// An error response with the given code.
pub fn error_body(status: StatusCode, code: &'static str, message: &str) -> Response {
    let body = ErrorBody { detail: ErrorDetail { code: code.to_owned(), message: message.to_owned() } };
    let mut response = (status, Json(body)).into_response();
    response.extensions_mut().insert(ErrorCode(code));
    response
}

/// A handler that panicked still answers in the error format.
pub fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    error_body(
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL_ERROR",
        "an internal error occurred; the server log has the cause",
    )
}
