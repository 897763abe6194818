//! Images: recording, reading, listing and deleting the rows clients see.

use async_trait::async_trait;
use uuid::Uuid;

use crate::blob::BlobKey;

use super::{DeletedImage, ImageRecord, ListPosition, MetaResult, NewImage, Visibility};

#[async_trait]
pub trait ImageStore: Send + Sync {
    /// The dedup path. If the image's blob is live (it has at least one reference and at least
    /// one `Stored` copy), adds a reference to it and records the image, in one transaction.
    /// Returns `None`, changing nothing, when the blob is absent or unreferenced, and
    /// [`MetadataError::QuotaExceeded`](super::MetadataError::QuotaExceeded), changing nothing,
    /// when the image would take its owner over their quota.
    async fn insert_image_for_live_blob(&self, image: &NewImage) -> MetaResult<Option<ImageRecord>>;

    /// Whether the blob is live (as [`Self::insert_image_for_live_blob`] means it), without a
    /// transaction. A hint for work a known blob makes needless (a cut-through upload's
    /// stream): it may change the next moment, and the dedup path decides again.
    async fn blob_is_live(&self, blob: &BlobKey) -> MetaResult<bool>;

    async fn find_image(&self, id: Uuid) -> MetaResult<Option<ImageRecord>>;

    /// Up to `limit` images, newest first (`created_at` then `id`, both descending), starting
    /// strictly after `after`; only `owner`'s when given.
    async fn list_images(
        &self,
        limit: u32,
        after: Option<&ListPosition>,
        owner: Option<Uuid>,
    ) -> MetaResult<Vec<ImageRecord>>;

    /// Changes who may see an image; `None` if no such image.
    async fn set_visibility(&self, id: Uuid, visibility: Visibility) -> MetaResult<Option<ImageRecord>>;

    /// Deletes the image, drops its reference to the blob, and takes it off its owner's usage.
    /// When that was the blob's last reference, every copy of the blob becomes `Deleting`, with
    /// a `Delete` task each, in the same transaction. `None` if no such image.
    async fn delete_image(&self, id: Uuid) -> MetaResult<Option<DeletedImage>>;
}
