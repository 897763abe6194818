//! Variants of images (thumbnails, previews) and the durable queue that generates them.
//!
//! A ready variant is a blob like any other: a `blobs` row whose reference count counts the
//! variant's row, copies in `replicas`, replication tasks. So rebalance, drain and scrub
//! handle variants with no special case, and identical originals (whose variants are
//! identical too) share one stored variant blob. Deleting an image drops its variants'
//! references in the same transaction ([`ImageStore::delete_image`](super::ImageStore::delete_image)).
//!
//! Generation tasks live in `variant_tasks`, a sibling of the replication queue claimed the
//! same way (a lease; `FOR UPDATE SKIP LOCKED` on Postgres; retries with backoff). Uploads
//! queue one per configured variant in their own transaction ([`NewImage::variants`](super::NewImage)).
//! A new variant's bytes are recorded through [`UploadGuard::commit_variant`](super::UploadGuard::commit_variant)
//! (new bytes) or [`VariantStore::record_variant_for_live_blob`] (bytes already stored).

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{MetaResult, NewVariant, VariantRecord, VariantTask};

/// What recording a variant found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantRecorded {
    Recorded,
    /// The image was deleted meanwhile: nothing was recorded.
    ImageGone,
    /// (Dedup path only.) The blob is not live: store its bytes and record through the guard.
    BlobNotLive,
}

#[async_trait]
pub trait VariantStore: Send + Sync {
    /// The recorded variant (ready or failed) of an image, if any.
    async fn find_variant(&self, image: Uuid, name: &str) -> MetaResult<Option<VariantRecord>>;

    /// The dedup path of a variant: if its blob is live (referenced, with a stored copy), adds
    /// a reference and records the variant (replacing, and releasing, an older one), in one
    /// transaction.
    async fn record_variant_for_live_blob(&self, variant: &NewVariant) -> MetaResult<VariantRecorded>;

    /// Records that a variant cannot be made from its image (a decode error), releasing the
    /// blob of an older variant of that name if there was one.
    async fn record_variant_failure(
        &self,
        image: Uuid,
        name: &str,
        fingerprint: &str,
        reason: &str,
    ) -> MetaResult<VariantRecorded>;

    /// Claims the due generation task that has waited longest, for `lease`.
    async fn claim_variant_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<VariantTask>>;

    /// Extends the caller's claim. `false` if it was lost.
    async fn extend_variant_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool>;

    /// Removes a task that is done (or moot).
    async fn finish_variant_task(&self, task: i64, worker: &str) -> MetaResult<bool>;

    /// Records a failed attempt (storage or database trouble): due again after `retry_after`.
    async fn fail_variant_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool>;

    /// Releases every claim `worker` holds (graceful shutdown).
    async fn release_variant_claims(&self, worker: &str) -> MetaResult<u64>;

    /// Generation tasks in the queue.
    async fn variant_queue_depth(&self) -> MetaResult<u64>;

    /// Up to `limit` image ids in id order, strictly after `after` (for backfill).
    async fn image_ids_after(&self, after: Option<Uuid>, limit: u32) -> MetaResult<Vec<Uuid>>;

    async fn count_images(&self) -> MetaResult<u64>;

    /// Where `chitram variants backfill` stopped (`None`: not started, or finished).
    async fn load_backfill_cursor(&self) -> MetaResult<Option<Uuid>>;

    async fn save_backfill_cursor(&self, cursor: Option<Uuid>) -> MetaResult<()>;
}
