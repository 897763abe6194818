//! The JSON shapes of the API.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::metadata::{ImageRecord, ReplicaState, VariantRecord, VariantState, Visibility};

/// An image, as every endpoint returns it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Image {
    pub id: Uuid,
    /// The client's filename, sanitised.
    pub filename: String,
    /// Detected from the bytes, not from the client's Content-Type.
    pub content_type: String,
    pub file_size: u64,
    pub width: u32,
    pub height: u32,
    /// SHA-256 of the bytes, hex.
    pub checksum: String,
    /// The blob's key on its shards (identical uploads share one blob).
    pub storage_key: String,
    /// Where the bytes are served.
    pub url: String,
    pub created_at: DateTime<Utc>,
    /// Every recorded copy of the bytes.
    pub replicas: Vec<ReplicaJson>,
    /// The id of the user who uploaded it (`null` for an image uploaded with accounts off).
    pub owner: Option<Uuid>,
    /// `public`: anyone may fetch it; `private`: its owner, an admin, or a signed URL.
    pub visibility: Visibility,
    /// One entry per configured variant (thumbnails, previews), by name.
    pub variants: BTreeMap<String, VariantJson>,
}

/// A variant of an image, as the image's JSON shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct VariantJson {
    /// Where the variant is served (made on demand if it is still pending), with the version of
    /// its spec (`?v=`): under it a public variant may be cached for good.
    pub url: String,
    /// Its size once ready; while pending, the size it will have.
    pub width: u32,
    pub height: u32,
    pub state: VariantState,
    /// Why the variant failed (only when `state` is `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
}

impl From<VariantRecord> for VariantJson {
    fn from(variant: VariantRecord) -> Self {
        VariantJson {
            // The spec's version in the URL: a changed spec is a new URL, never stale in a cache.
            url: format!(
                "/api/v1/images/{}/variants/{}?v={}",
                variant.image,
                variant.name,
                super::variants::version_tag(&variant.fingerprint)
            ),
            width: variant.width,
            height: variant.height,
            state: variant.state,
            reason: variant.reason,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaJson {
    pub shard: String,
    pub state: ReplicaState,
}

impl From<ImageRecord> for Image {
    fn from(record: ImageRecord) -> Self {
        Image {
            url: format!("/api/v1/images/{}/file", record.id),
            id: record.id,
            filename: record.filename,
            content_type: record.content_type,
            file_size: record.file_size,
            width: record.width,
            height: record.height,
            checksum: record.blob.to_string(),
            storage_key: record.blob.to_string(),
            created_at: record.created_at,
            replicas: record.replicas.into_iter().map(|r| ReplicaJson { shard: r.shard, state: r.state }).collect(),
            owner: record.owner,
            visibility: record.visibility,
            variants: record.variants.into_iter().map(|v| (v.name.clone(), VariantJson::from(v))).collect(),
        }
    }
}

/// A page of the image list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageList {
    pub items: Vec<Image>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The outcome of one file of a batch upload.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    pub filename: String,
    /// The HTTP status this file would have had on its own: 201, or the error's status.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::api::error::ErrorDetail>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    pub results: Vec<BatchItem>,
    pub succeeded: usize,
    pub failed: usize,
}

/// The form of `POST /api/v1/images/upload`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// `public` (default) or `private` (or the `visibility` query parameter).
    #[schema(nullable = false)]
    pub visibility: Option<Visibility>,
    /// The image (JPEG, PNG, GIF or WebP, complete), not empty.
    #[schema(value_type = String, format = Binary, min_length = 1)]
    pub file: Vec<u8>,
}

/// The form of `POST /api/v1/images/batch`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BatchForm {
    /// `public` (default) or `private`, for the files after it in the form.
    #[schema(nullable = false)]
    pub visibility: Option<Visibility>,
    /// The images, at least one; repeat the field once per file.
    #[schema(value_type = Vec<String>, format = Binary, min_items = 1)]
    pub files: Vec<Vec<u8>>,
}

/// An image file's bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct ImageBytes(Vec<u8>);

/// The body of `PATCH /api/v1/images/{id}`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VisibilityChange {
    pub visibility: Visibility,
}

/// The body of `POST /api/v1/images/{id}/signed-url`.
#[derive(Debug, Default, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedUrlRequest {
    /// Seconds the link works, from 1 to `auth.signed_url_max_secs` (default 3600).
    #[schema(minimum = 1)]
    pub expires_in: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SignedUrlJson {
    /// The file's path with `expires` and `signature`; it needs no credentials.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}
