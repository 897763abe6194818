//! The facts the metadata store keeps, as the rest of the program sees them.

use std::fmt;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use super::MetadataError;
use crate::blob::BlobKey;

/// The state of one copy of a blob on one shard (invariant 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Intended but not yet written: replication will create it.
    Pending,
    /// Written and verified.
    Stored,
    /// Expected but found absent or corrupt: repair will restore it.
    Missing,
    /// The blob lost its last reference: this copy is waiting to be removed.
    Deleting,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Stored => "stored",
            ReplicaState::Missing => "missing",
            ReplicaState::Deleting => "deleting",
        }
    }

    pub fn parse(text: &str) -> Result<Self, MetadataError> {
        match text {
            "pending" => Ok(ReplicaState::Pending),
            "stored" => Ok(ReplicaState::Stored),
            "missing" => Ok(ReplicaState::Missing),
            "deleting" => Ok(ReplicaState::Deleting),
            other => Err(MetadataError::Corrupt(format!("unknown replica state {other:?}"))),
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One copy of a blob: which shard holds it, and in what state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub shard: String,
    pub state: ReplicaState,
}

/// One copy of one blob, as a unit of background work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRef {
    pub blob: BlobKey,
    pub shard: String,
}

/// An image about to be recorded. `created_at` must already be truncated to microseconds,
/// the precision both databases keep, so the record read back equals the one written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub id: Uuid,
    pub filename: String,
    pub content_type: String,
    pub file_size: u64,
    pub width: u32,
    pub height: u32,
    pub blob: BlobKey,
    pub created_at: DateTime<Utc>,
    /// Who uploads it, and the quota the upload must fit in; `None` with accounts off.
    pub owner: Option<ImageOwner>,
    pub visibility: Visibility,
    /// The variants to generate for it: one generation task each, queued in the same
    /// transaction as the image (`metadata/variants.rs`).
    pub variants: Vec<String>,
}

impl NewImage {
    /// The record a store reads back right after inserting this image with exactly these
    /// copies of its blob: times at the microsecond both databases keep, copies in shard-name
    /// order, no variants recorded yet. Spares a commit that created the blob's row the
    /// round trip of reading it back (no other copy of a blob without a row can exist).
    pub fn as_recorded(&self, copies: &[Replica]) -> ImageRecord {
        let mut replicas = copies.to_vec();
        replicas.sort_by(|a, b| a.shard.cmp(&b.shard));
        ImageRecord {
            id: self.id,
            filename: self.filename.clone(),
            content_type: self.content_type.clone(),
            file_size: self.file_size,
            width: self.width,
            height: self.height,
            blob: self.blob.clone(),
            created_at: self.created_at.trunc_subsecs(6),
            replicas,
            owner: self.owner.map(|owner| owner.user),
            visibility: self.visibility,
            variants: Vec::new(),
        }
    }
}

/// The owner of an image being recorded. Their usage grows in the transaction that records
/// the image, and only if it stays within their quota (their own, else `default_quota`), so
/// two concurrent uploads cannot both squeeze under the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOwner {
    pub user: Uuid,
    pub default_quota: super::Quota,
    /// An admin: no quota, so no early check (their usage is still counted).
    pub unlimited: bool,
}

/// Who may see an image besides its owner and admins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Anyone, signed in or not.
    #[default]
    Public,
    /// Its owner, an admin, or a signed URL.
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            _ => None,
        }
    }
}

/// A recorded image with the copies of its blob (in shard-name order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub id: Uuid,
    pub filename: String,
    pub content_type: String,
    pub file_size: u64,
    pub width: u32,
    pub height: u32,
    pub blob: BlobKey,
    pub created_at: DateTime<Utc>,
    pub replicas: Vec<Replica>,
    /// `None` for an image recorded with accounts off and not yet adopted.
    pub owner: Option<Uuid>,
    pub visibility: Visibility,
    /// Its variants: as recorded when read from the store (ready or failed, in name order);
    /// one per configured variant once the image service has presented it (see
    /// `variants::Catalog::present`).
    pub variants: Vec<VariantRecord>,
}

/// Where a page of the image list ends: the list is ordered by `(created_at, id)` descending,
/// and the next page starts strictly after this position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListPosition {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// What deleting an image did to its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedImage {
    pub blob: BlobKey,
    /// True when this was the blob's last reference: every copy is now `Deleting`.
    pub blob_unreferenced: bool,
    /// Blobs of its variants that lost their last reference with it (their copies are now
    /// `Deleting`, like the original's).
    pub unreferenced_variant_blobs: Vec<BlobKey>,
}

/// What a replication task does to its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// Create (or restore) the copy from a stored holder, verify it, and record it `Stored`.
    Copy,
    /// Remove the copy of a blob that lost its last reference (under the blob's lock).
    Delete,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Copy => "copy",
            TaskKind::Delete => "delete",
        }
    }

    pub fn parse(text: &str) -> Result<Self, MetadataError> {
        match text {
            "copy" => Ok(TaskKind::Copy),
            "delete" => Ok(TaskKind::Delete),
            other => Err(MetadataError::Corrupt(format!("unknown task kind {other:?}"))),
        }
    }
}

/// One unit of background replication work, as claimed by a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationTask {
    pub id: i64,
    pub kind: TaskKind,
    pub copy: CopyRef,
    /// Failed attempts so far (a claim that expired because its worker died is not counted).
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The `x-request-id` of the request that queued the task, if a request did.
    pub request_id: Option<String>,
}

/// The replication queue at a glance, for `/api/v1/admin/replication` and health.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    pub copy_tasks: u64,
    pub delete_tasks: u64,
    /// Age of the oldest task (by creation), measured on the database's clock.
    pub oldest_task_age: Option<std::time::Duration>,
    /// Per target shard: tasks that have failed at least once.
    pub failing: Vec<ShardFailures>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFailures {
    pub shard: String,
    /// Tasks for this shard with at least one failed attempt.
    pub failing_tasks: u64,
    /// Failed attempts summed over those tasks.
    pub failed_attempts: u64,
    /// The most recent error recorded for this shard.
    pub last_error: Option<String>,
}

/// A blob and every recorded copy of it, for workers and operator tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobCopies {
    pub blob: BlobKey,
    pub size: u64,
    pub ref_count: u64,
    /// Sorted by shard name.
    pub replicas: Vec<Replica>,
}

/// Copies and bytes on one shard, by state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardUsage {
    pub shard: String,
    pub state: ReplicaState,
    pub copies: u64,
    pub bytes: u64,
}

/// How many copies are in each state, for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    pub pending: u64,
    pub stored: u64,
    pub missing: u64,
    pub deleting: u64,
}

/// The state of one variant of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VariantState {
    /// Not generated yet (or made under another config): a task will make it, or the first
    /// request for it.
    Pending,
    /// Generated and stored.
    Ready,
    /// The original cannot be decoded; the reason says why. The original is still served.
    Failed,
}

impl VariantState {
    pub fn as_str(self) -> &'static str {
        match self {
            VariantState::Pending => "pending",
            VariantState::Ready => "ready",
            VariantState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Result<Self, MetadataError> {
        match text {
            "pending" => Ok(VariantState::Pending),
            "ready" => Ok(VariantState::Ready),
            "failed" => Ok(VariantState::Failed),
            other => Err(MetadataError::Corrupt(format!("unknown variant state {other:?}"))),
        }
    }
}

/// One variant of one image. Recorded ones are `Ready` (with their blob) or `Failed` (with the
/// reason); `Pending` ones are not recorded, only presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantRecord {
    pub image: Uuid,
    pub name: String,
    /// The spec and encoding it was made with (`VariantSpec::fingerprint`).
    pub fingerprint: String,
    pub state: VariantState,
    pub blob: Option<BlobKey>,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub file_size: u64,
    pub reason: Option<String>,
}

/// A generated variant about to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVariant {
    pub image: Uuid,
    pub name: String,
    pub fingerprint: String,
    pub blob: BlobKey,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub file_size: u64,
}

/// One variant to generate, as claimed by a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantTask {
    pub id: i64,
    pub image: Uuid,
    pub name: String,
    /// Failed attempts so far.
    pub attempts: u32,
}
