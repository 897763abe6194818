//! The image use cases, over the metadata store and the storage router.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use super::cursor;
use super::cut_through::PendingWrite;
use super::eager::EagerReplicator;
use super::error::{ImageError, Result};
use super::filename::Filename;
use super::format::{self, ImageInfo};
use super::resume::{self, OpenHolder};
use super::spool::SpooledBody;
use super::store::{BlobWriter, Commit};
use super::verify::{self, ReadError};
use crate::blob::BlobKey;
use crate::maintenance::deletion;
use crate::maintenance::suspicion::{self, Finding};
use crate::metadata::{
    CopyRef, ImageOwner, ImageRecord, MetadataStore, NewImage, Replica, ReplicaState, Role, Visibility,
};
use crate::observability::names;
use crate::observability::stages::{Purpose, Stage, StageClock};
use crate::storage::router::{RouterError, StorageRouter};
use crate::storage::{BlobBody, BlobReader, ByteStream, StorageError};
use crate::variants::Catalog;
use tracing::Instrument;

/// Largest and default page of the image list.
pub const MAX_PAGE: u32 = 100;
pub const DEFAULT_PAGE: u32 = 20;
/// The pixel limit unless configured: 100 MP.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// A page of images, and the cursor of the next page when there is one.
#[derive(Debug)]
pub struct ImagePage {
    pub items: Vec<ImageRecord>,
    pub next_cursor: Option<String>,
}

/// An image's bytes, opened for streaming from one of its holders.
#[derive(Debug)]
pub struct ImageFile {
    pub record: ImageRecord,
    pub reader: BlobReader,
}

pub struct ImageService {
    metadata: Arc<dyn MetadataStore>,
    router: Arc<StorageRouter>,
    writer: BlobWriter,
    /// Most pixels an accepted image may claim (`server.max_pixels`).
    max_pixels: u64,
    /// The configured variants: queued at upload, presented in every record.
    variants: Arc<Catalog>,
    /// Makes an upload's other copies from its own bytes right after the commit; `None` leaves
    /// them to the replication workers alone.
    eager: Option<Arc<EagerReplicator>>,
}

impl ImageService {
    pub fn new(metadata: Arc<dyn MetadataStore>, router: Arc<StorageRouter>, write_quorum: usize) -> Self {
        let writer = BlobWriter::new(metadata.clone(), router.clone(), write_quorum);
        Self { metadata, router, writer, max_pixels: DEFAULT_MAX_PIXELS, variants: Arc::default(), eager: None }
    }

    pub fn with_eager_replication(self, eager: Arc<EagerReplicator>) -> Self {
        Self { eager: Some(eager), ..self }
    }

    /// The eager replicator, when uploads make their own copies (stopped with the server).
    pub fn eager_replication(&self) -> Option<&Arc<EagerReplicator>> {
        self.eager.as_ref()
    }

    pub fn with_max_pixels(self, max_pixels: u64) -> Self {
        Self { max_pixels, ..self }
    }

    pub fn with_variants(self, variants: Arc<Catalog>) -> Self {
        Self { variants, ..self }
    }

    /// Writes new bytes as a blob (shared with the variants use case).
    pub fn writer(&self) -> &BlobWriter {
        &self.writer
    }

    /// Validates and stores an upload, and records it for `owner` (none with accounts off).
    /// The image is visible only once its bytes are stored on a shard and its row is
    /// committed (DESIGN invariant 1).
    ///
    /// `streamed` is the upload's cut-through write, opened with [`Self::start_cut_through`]
    /// before its body arrived: it completes only if the upload is accepted as new bytes, and
    /// is given up (the shard stores nothing) on every other outcome.
    pub async fn upload(
        &self,
        raw_filename: Option<&str>,
        upload: SpooledBody,
        streamed: Option<PendingWrite>,
        owner: Option<ImageOwner>,
        visibility: Visibility,
    ) -> Result<ImageRecord> {
        if upload.len == 0 {
            return Err(ImageError::EmptyFile);
        }
        let mut clock = StageClock::start(Purpose::Upload);
        // Format, dimensions and completeness, before anything is written anywhere.
        let info = inspect(&upload, self.max_pixels).await?;
        clock.finish(Stage::Check);
        if let Some(owner) = &owner {
            self.ensure_room(owner, upload.len).await?;
        }
        let image = NewImage {
            id: Uuid::now_v7(),
            filename: Filename::sanitise(raw_filename).into_string(),
            content_type: info.format.mime_type().to_owned(),
            file_size: upload.len,
            width: info.width,
            height: info.height,
            blob: upload.key.clone(),
            created_at: now_in_micros(),
            owner,
            visibility,
            variants: self.variants.names(),
        };
        let existing =
            self.metadata.insert_image_for_live_blob(&image).instrument(query("insert_image_for_live_blob")).await?;
        clock.finish(Stage::Lookup);
        if let Some(record) = existing {
            tracing::info!(id = %record.id, blob = %record.blob, "stored as a reference to an existing blob");
            metrics::counter!(names::DEDUP_HITS).increment(1);
            return Ok(self.variants.present(record));
        }
        let record = self.store_new_blob(&image, &upload.body, streamed).await?;
        metrics::counter!(names::NEW_BLOBS).increment(1);
        if let Some(eager) = &self.eager {
            eager.start(upload, pending_copies(&record));
        }
        Ok(self.variants.present(record))
    }

    /// Opens the cut-through write of an upload that declared its key, before its body is
    /// read; `None` when the upload is to store and forward (see [`BlobWriter::start_cut_through`]).
    pub fn start_cut_through(&self, declared: &BlobKey, len: u64) -> Option<PendingWrite> {
        self.writer.start_cut_through(declared.clone(), len)
    }

    /// Refuses an upload that would take its owner over their quota before any byte is
    /// written. The check that counts is the one made as the image is recorded (atomic with
    /// it); this one spares the shards the writes of an upload bound to be refused.
    async fn ensure_room(&self, owner: &ImageOwner, size: u64) -> Result<()> {
        if owner.unlimited {
            return Ok(());
        }
        let Some(user) = self.metadata.find_user(owner.user).instrument(query("find_user")).await? else {
            return Err(ImageError::QuotaExceeded("the uploader no longer exists".into()));
        };
        if user.role == Role::Admin {
            return Ok(());
        }
        let quota = user.quota.effective(owner.default_quota);
        if let Some(limit) = quota.bytes
            && user.usage.bytes.saturating_add(size) > limit
        {
            return Err(ImageError::QuotaExceeded(format!(
                "{} of {limit} bytes used, and this file has {size}",
                user.usage.bytes
            )));
        }
        if let Some(limit) = quota.images
            && user.usage.images >= limit
        {
            return Err(ImageError::QuotaExceeded(format!("{} of {limit} images stored", user.usage.images)));
        }
        Ok(())
    }

    /// Changes who may see an image (the caller's right to is the route's to check).
    pub async fn set_visibility(&self, id: Uuid, visibility: Visibility) -> Result<ImageRecord> {
        let record = self.metadata.set_visibility(id, visibility).await?.ok_or(ImageError::NotFound)?;
        Ok(self.variants.present(record))
    }

    /// Writes the bytes, then records them and the image under the blob's lock
    /// ([`BlobWriter::store`]).
    async fn store_new_blob(
        &self,
        image: &NewImage,
        body: &BlobBody,
        streamed: Option<PendingWrite>,
    ) -> Result<ImageRecord> {
        let to_commit = image.clone();
        let commit: Commit<ImageRecord> = Box::new(move |guard, copies| {
            let image = to_commit.clone();
            Box::pin(async move { guard.commit(&image, &copies).instrument(query("commit_upload")).await })
        });
        let record = self.writer.store(Purpose::Upload, &image.blob, image.file_size, body, streamed, commit).await?;
        tracing::info!(id = %record.id, blob = %record.blob, "stored a new blob");
        Ok(record)
    }

    pub async fn find(&self, id: &str) -> Result<ImageRecord> {
        // Any id that is not a UUID names no image: 404, like an unknown UUID.
        let id = Uuid::try_parse(id).map_err(|_| ImageError::NotFound)?;
        let record = self.metadata.find_image(id).instrument(query("find_image")).await?.ok_or(ImageError::NotFound)?;
        Ok(self.variants.present(record))
    }

    /// A page of the list, of `owner`'s images only when given.
    pub async fn list(&self, limit: Option<&str>, cursor: Option<&str>, owner: Option<Uuid>) -> Result<ImagePage> {
        let limit = parse_limit(limit)?;
        let after = cursor.map(cursor::decode).transpose().map_err(|_| ImageError::InvalidCursor)?;
        // One extra row tells whether another page follows, without a count query.
        let mut items: Vec<ImageRecord> =
            self.metadata.list_images(limit + 1, after.as_ref(), owner).instrument(query("list_images")).await?;
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items
                .last()
                .map(|last| cursor::encode(&crate::metadata::ListPosition { created_at: last.created_at, id: last.id }))
        } else {
            None
        };
        let items = items.into_iter().map(|record| self.variants.present(record)).collect();
        Ok(ImagePage { items, next_cursor })
    }

    /// Opens the image's bytes from the first stored copy that answers, in read order, and
    /// checks them against the blob's SHA-256. A holder that lacks the blob or serves wrong
    /// bytes is recorded `Missing` with a repair queued (read repair), and the next one is tried.
    ///
    /// Reads are hedged (DESIGN invariant 5): a holder slower than its usual latency gets a
    /// second read sent to the next holder; the first checked copy wins and the other read is
    /// cancelled.
    pub async fn open_file(&self, record: ImageRecord) -> Result<ImageFile> {
        let stream = self.open_blob(&record.blob, record.file_size, &record.replicas).await?;
        Ok(ImageFile { reader: BlobReader { len: record.file_size, stream }, record })
    }

    /// Opens any blob's bytes (an original's, a variant's) from its stored copies, as
    /// [`ImageService::open_file`] does.
    pub async fn open_blob(&self, blob: &BlobKey, size: u64, replicas: &[Replica]) -> Result<ByteStream> {
        let holders: Vec<&str> =
            replicas.iter().filter(|r| r.state == ReplicaState::Stored).map(|r| r.shard.as_str()).collect();
        let mut attempts = Vec::new();
        let order = self.router.read_order(blob, &holders);
        let fallbacks = order.clone();
        let mut reads = self.router.hedged_reads(order, |shard| self.open_checked(blob, size, shard, &fallbacks));
        let mut served = None;
        while let Some((shard, result)) = reads.next().await {
            match result {
                Ok(stream) => {
                    served = Some(stream);
                    break;
                }
                Err(HolderFailure::Bad(finding, problem)) => {
                    tracing::warn!(%shard, %blob, %problem, "bad copy; reading the next holder");
                    self.report_bad_copy(blob, size, shard, finding);
                    attempts.push((shard.to_owned(), StorageError::Other { reason: problem, source: None }));
                }
                Err(HolderFailure::Unreachable(error)) => {
                    tracing::warn!(%shard, %blob, %error, "holder failed; reading the next one");
                    attempts.push((shard.to_owned(), error));
                }
            }
        }
        drop(reads); // cancels a read still running
        if let Some(stream) = served {
            return Ok(stream);
        }
        let error = RouterError::NoShardAvailable { operation: "read", key: blob.clone(), attempts };
        Err(ImageError::StorageUnavailable(error))
    }

    /// Opens one holder's copy: small blobs are read and checked whole, large ones are checked
    /// as they stream (a bad one then ends the response with an error, and is queued for repair)
    /// and go on from the other holders in `order` if this one fails mid-body.
    async fn open_checked(
        &self,
        blob: &BlobKey,
        size: u64,
        shard: &str,
        order: &[&str],
    ) -> Result<ByteStream, HolderFailure> {
        let reader = self.router.open_on(shard, blob).await.map_err(|error| match error {
            RouterError::Shard { source, .. } if source.is_not_found() => {
                HolderFailure::Bad(Finding::Absent, "the object is absent".into())
            }
            RouterError::Shard { source, .. } => HolderFailure::Unreachable(source),
            other => HolderFailure::Unreachable(StorageError::Other { reason: other.to_string(), source: None }),
        })?;
        if size <= verify::CHECK_BEFORE_SENDING {
            return match verify::read_checked(reader, blob, size).await {
                Ok(bytes) => Ok(Box::pin(futures::stream::once(async move { Ok(bytes) }))),
                Err(ReadError::Corrupt(problem)) => Err(HolderFailure::Bad(Finding::WrongBytes, problem)),
                Err(ReadError::Io(error)) => {
                    Err(HolderFailure::Unreachable(StorageError::other("reading the copy", error)))
                }
            };
        }
        let others = order.iter().filter(|holder| **holder != shard).map(|holder| (*holder).to_owned()).collect();
        let stream = resume::resuming(reader.stream, others, self.holder_opener(blob));
        let report = self.bad_copy_reporter(blob, size, shard, Finding::WrongBytes);
        Ok(verify::checked_stream(stream, blob.clone(), size, move |problem| {
            tracing::warn!(%problem, "a streamed copy was bad");
            report();
        }))
    }

    /// Opens `blob` on a holder by name, for a read that goes on from there (`resume`).
    fn holder_opener(&self, blob: &BlobKey) -> OpenHolder {
        let (router, blob) = (self.router.clone(), blob.clone());
        Arc::new(move |shard| {
            let (router, blob) = (router.clone(), blob.clone());
            Box::pin(async move { Ok(router.open_on(&shard, &blob).await.map_err(std::io::Error::other)?.stream) })
        })
    }

    /// Re-checks a bad copy under its blob's lock and records it missing if it is (read
    /// repair), in the background: the read goes on with the next holder meanwhile.
    fn report_bad_copy(&self, blob: &BlobKey, size: u64, shard: &str, finding: Finding) {
        self.bad_copy_reporter(blob, size, shard, finding)();
    }

    fn bad_copy_reporter(
        &self,
        blob: &BlobKey,
        size: u64,
        shard: &str,
        finding: Finding,
    ) -> impl FnOnce() + Send + 'static {
        let (metadata, router) = (self.metadata.clone(), self.router.clone());
        let copy = CopyRef { blob: blob.clone(), shard: shard.to_owned() };
        move || {
            tokio::spawn(async move {
                suspicion::report_bad_copy(metadata.as_ref(), &router, &copy, size, finding).await;
            });
        }
    }

    /// Deletes the image. When it held the blob's last reference every copy is deleted now;
    /// copies on shards that are down stay `Deleting` until the background sweep removes them.
    ///
    /// The copies are deleted in a task of their own, which the request awaits: a client that
    /// hangs up must not cut a DELETE short between sending it and fencing its copy (see
    /// `maintenance/deletion.rs`), since the shard may still carry it out.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let id = Uuid::try_parse(id).map_err(|_| ImageError::NotFound)?;
        let deleted = self.metadata.delete_image(id).await?.ok_or(ImageError::NotFound)?;
        let unreferenced: Vec<BlobKey> = deleted
            .blob_unreferenced
            .then_some(deleted.blob)
            .into_iter()
            .chain(deleted.unreferenced_variant_blobs)
            .collect();
        if unreferenced.is_empty() {
            return Ok(());
        }
        let (metadata, router) = (self.metadata.clone(), self.router.clone());
        let deletion = self.router.spawn_detached(async move {
            for blob in &unreferenced {
                deletion::delete_copies_of(metadata.as_ref(), &router, blob).await;
            }
        });
        // A panic in it is the workers' to finish: the copies stay `deleting`, their tasks queued.
        if let Err(error) = deletion.await {
            tracing::warn!(%error, "deleting the copies stopped; they are left for the replication workers");
        }
        Ok(())
    }
}

/// Why one holder could not serve a read.
enum HolderFailure {
    /// The copy is absent or its bytes are wrong: repair it.
    Bad(Finding, String),
    /// The shard did not answer.
    Unreachable(StorageError),
}

/// Reads the format and dimensions and walks the file to its end, off the async threads when
/// the body is on disk (in memory it is at most `spool::MEMORY_THRESHOLD` bytes).
async fn inspect(upload: &SpooledBody, max_pixels: u64) -> Result<ImageInfo> {
    match &upload.body {
        BlobBody::Bytes(bytes) => Ok(format::inspect_bytes(bytes, max_pixels)?),
        BlobBody::File { path, len } => {
            let (head, path, len) = (upload.head.clone(), path.clone(), *len);
            let inspected = tokio::task::spawn_blocking(move || format::inspect_file(&head, &path, len, max_pixels))
                .await
                .map_err(|join| ImageError::Internal { context: "inspecting the upload", source: Box::new(join) })?;
            Ok(inspected?)
        }
    }
}

/// The shards of a just-recorded blob that still wait for their copy.
fn pending_copies(record: &ImageRecord) -> Vec<String> {
    record.replicas.iter().filter(|r| r.state == ReplicaState::Pending).map(|r| r.shard.clone()).collect()
}

fn parse_limit(limit: Option<&str>) -> Result<u32> {
    let Some(text) = limit else { return Ok(DEFAULT_PAGE) };
    match text.parse::<u32>() {
        Ok(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
        _ => Err(ImageError::InvalidLimit),
    }
}

/// Both databases keep microseconds; truncating here makes the record read back equal the
/// one written, and keeps the list order identical on both.
fn now_in_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A span around one metadata call on the request path, for traces (`[telemetry] otlp_endpoint`).
fn query(operation: &'static str) -> tracing::Span {
    tracing::info_span!("metadata_query", operation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_outside_one_to_a_hundred_are_rejected() {
        assert_eq!(parse_limit(None).unwrap(), DEFAULT_PAGE);
        assert_eq!(parse_limit(Some("100")).unwrap(), 100);
        for bad in ["0", "101", "-1", "ten", ""] {
            assert!(matches!(parse_limit(Some(bad)), Err(ImageError::InvalidLimit)), "{bad:?}");
        }
    }
}
