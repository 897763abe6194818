//! What can go wrong in an image use case. Each variant's doc names the HTTP answer it gets in
//! `api::error`, the one place errors become responses.

use crate::images::format::FormatError;
use crate::images::spool::SpoolError;
use crate::metadata::MetadataError;
use crate::storage::router::RouterError;

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// 400 `INVALID_FILE_FORMAT`; 413 `IMAGE_TOO_LARGE` for `FormatError::TooManyPixels`
    #[error(transparent)]
    InvalidFormat(#[from] FormatError),
    /// 400 `EMPTY_FILE`
    #[error("the file is empty")]
    EmptyFile,
    /// 413 `FILE_TOO_LARGE`
    #[error("the file exceeds the limit of {limit} bytes")]
    FileTooLarge { limit: u64 },
    /// 422 `MISSING_FILE`
    #[error("the request has no multipart field named {field:?}")]
    MissingFile { field: &'static str },
    /// 400 `INVALID_MULTIPART`
    #[error("the multipart body is malformed: {0}")]
    InvalidMultipart(String),
    /// 400 `INVALID_CHECKSUM`: the `X-Checksum-SHA256` header is not 64 hex digits, or was
    /// sent with a batch (whose files each have their own).
    #[error("X-Checksum-SHA256 must be the file's SHA-256 as 64 hex digits, and is for single uploads only")]
    InvalidChecksum,
    /// 400 `CHECKSUM_MISMATCH`: the file's SHA-256 is not the one the client declared.
    #[error("the file's SHA-256 is {actual}, not the {declared} declared in X-Checksum-SHA256; nothing was stored")]
    ChecksumMismatch { declared: String, actual: String },
    /// 400 `TOO_MANY_FILES`
    #[error("a batch holds at most {limit} files")]
    TooManyFiles { limit: usize },
    /// 404 `IMAGE_NOT_FOUND`
    #[error("no image has this id")]
    NotFound,
    /// 400 `INVALID_CURSOR`
    #[error("the cursor is not one this server issued")]
    InvalidCursor,
    /// 400 `INVALID_LIMIT`
    #[error("limit must be an integer from 1 to 100")]
    InvalidLimit,
    /// 403 `QUOTA_EXCEEDED`
    #[error("this upload would exceed your quota ({0}); delete images or ask an admin for more room")]
    QuotaExceeded(String),
    /// 400 `INVALID_SIGNED_URL`
    #[error("a signed URL carries `expires` (Unix seconds) and `signature` (64 hex digits), both unchanged")]
    InvalidSignedUrl,
    /// 400 `INVALID_VISIBILITY`
    #[error("visibility must be \"public\" or \"private\"")]
    InvalidVisibility,
    /// 503 `STORAGE_UNAVAILABLE`
    #[error("no shard could serve the request")]
    StorageUnavailable(#[source] RouterError),
    /// 503 `DATABASE_UNAVAILABLE` when the database cannot be reached, else 500 `INTERNAL_ERROR`.
    #[error(transparent)]
    Metadata(MetadataError),
    /// 404 `VARIANT_NOT_FOUND`: no variant of this name is configured.
    #[error("no variant of this name is configured")]
    VariantNotFound,
    /// 422 `VARIANT_FAILED`: the image cannot be decoded; the reason says why.
    #[error("this variant cannot be made from the image: {0}")]
    VariantFailed(String),
    /// 503 `STORAGE_UNAVAILABLE` or `DATABASE_UNAVAILABLE` by `outage`, else 500 `INTERNAL_ERROR`.
    #[error("generating the variant failed")]
    VariantGeneration {
        outage: Outage,
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// 500 `INTERNAL_ERROR`: a fault of the server (its spool directory, a shard misbehaving).
    #[error("{context}")]
    Internal {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which dependency an error says is down, for errors that carry their cause shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    Storage,
    Database,
    None,
}

impl From<SpoolError> for ImageError {
    fn from(error: SpoolError) -> Self {
        match error {
            SpoolError::TooLarge { limit } => ImageError::FileTooLarge { limit },
            SpoolError::Body(source) => ImageError::InvalidMultipart(source.to_string()),
            SpoolError::Io(source) => ImageError::Internal { context: "spooling the upload", source: Box::new(source) },
        }
    }
}

impl From<MetadataError> for ImageError {
    fn from(error: MetadataError) -> Self {
        match error {
            // Found where the image is recorded, after the early check (a concurrent upload).
            MetadataError::QuotaExceeded => ImageError::QuotaExceeded("checked as the image was recorded".into()),
            other => ImageError::Metadata(other),
        }
    }
}
