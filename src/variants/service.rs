//! The variants use case: make a variant once, store it as a blob on the ring, record it;
//! open a variant for serving, making it first if needed.
//!
//! Making a variant is single-flight per process: however many requests (and the worker)
//! want the same (image, variant) at once, one generation runs and all of them get its
//! result. Across processes two generations may race; both produce the same bytes (the same
//! blob) and the second record replaces the first, so the race costs work, never correctness.
//! The durable task queued at upload makes generation happen even if no one asks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Catalog;
use super::pipeline::{Pipeline, RenderError, Rendered};
use super::pool::DecodePool;
use super::spec::VariantSpec;
use crate::blob::BlobKey;
use crate::images::error::{ImageError, Outage};
use crate::images::service::ImageService;
use crate::images::store::Commit;
use crate::metadata::{
    ImageRecord, MetadataError, MetadataStore, NewVariant, VariantRecord, VariantRecorded, VariantState,
};
use crate::observability::stages::Purpose;
use crate::storage::{BlobBody, ByteStream};

/// Why a variant could not be made now. A decode failure is not one of these: it is recorded
/// as the variant's `failed` state.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the image was deleted")]
    ImageGone,
    #[error("reading the original or storing the variant failed")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("the decode pool has shut down")]
    PoolClosed,
}

impl GenerateError {
    /// Whether a retry later may succeed (the worker retries these with backoff).
    pub fn is_transient(&self) -> bool {
        !matches!(self, GenerateError::ImageGone)
    }

    fn outage(&self) -> Outage {
        match self {
            GenerateError::Image(ImageError::StorageUnavailable(_)) => Outage::Storage,
            GenerateError::Image(ImageError::Metadata(e)) | GenerateError::Metadata(e) if e.is_unavailable() => {
                Outage::Database
            }
            _ => Outage::None,
        }
    }
}

/// What a request gets when generation fails: the image's absence is a 404, an outage a 503.
/// Runs a render, a panic in it (a codec bug on this input) becoming a decode error: final,
/// like any other, since a retry would panic again (and each request meanwhile would get 500).
fn failing_on_panic<T>(render: impl FnOnce() -> Result<T, RenderError>) -> Result<T, RenderError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(render))
        .unwrap_or_else(|_| Err(RenderError::Decode("the decoder failed on this image".to_owned())))
}

fn to_image_error(error: Arc<GenerateError>) -> ImageError {
    if matches!(*error, GenerateError::ImageGone) {
        return ImageError::NotFound;
    }
    ImageError::VariantGeneration { outage: error.outage(), source: error }
}

/// A variant's bytes, opened for streaming.
pub struct VariantFile {
    pub record: VariantRecord,
    pub stream: ByteStream,
}

type FlightKey = (Uuid, String);
type Flight = Shared<BoxFuture<'static, Result<VariantRecord, Arc<GenerateError>>>>;

pub struct VariantService {
    metadata: Arc<dyn MetadataStore>,
    images: Arc<ImageService>,
    catalog: Arc<Catalog>,
    pipeline: Pipeline,
    pool: DecodePool,
    flights: Mutex<HashMap<FlightKey, Flight>>,
    /// Generations that may hold an original in memory at once: the pool's threads plus as
    /// many waiting their turn, so a crowd of first requests for different images does not
    /// read every original into memory ahead of the decode pool.
    admission: tokio::sync::Semaphore,
    /// Pipeline runs in this process (each is a decode); tests and metrics read it.
    renders: AtomicU64,
}

impl VariantService {
    pub fn new(
        metadata: Arc<dyn MetadataStore>,
        images: Arc<ImageService>,
        catalog: Arc<Catalog>,
        pool: DecodePool,
    ) -> Self {
        let pipeline = Pipeline::new(catalog.max_pixels(), *catalog.encoding());
        let admission = tokio::sync::Semaphore::new(pool.threads() * 2);
        Self {
            metadata,
            images,
            catalog,
            pipeline,
            pool,
            flights: Mutex::default(),
            admission,
            renders: AtomicU64::new(0),
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn metadata(&self) -> &Arc<dyn MetadataStore> {
        &self.metadata
    }

    /// Decodes that may run at once (the decode pool's threads).
    pub fn pool_threads(&self) -> usize {
        self.pool.threads()
    }

    /// How many times this process has run the pipeline (decoded an original).
    pub fn renders(&self) -> u64 {
        self.renders.load(Ordering::Relaxed)
    }

    /// The variant `name` of image `id`, current and ready or failed: made now (once, however
    /// many ask) if it is not. `VariantNotFound` for a name not configured.
    pub async fn find(self: &Arc<Self>, id: &str, name: &str) -> Result<VariantRecord, ImageError> {
        let spec = self.catalog.get(name).ok_or(ImageError::VariantNotFound)?.clone();
        let image = self.images.find(id).await?;
        self.ensure(&image, &spec).await.map_err(to_image_error)
    }

    /// Opens a ready variant's bytes (read like an original's: failover, hedging, checksums).
    pub async fn open(&self, record: VariantRecord) -> Result<VariantFile, ImageError> {
        let blob = match (&record.state, &record.blob) {
            (VariantState::Ready, Some(blob)) => blob.clone(),
            _ => return Err(ImageError::VariantFailed(record.reason.clone().unwrap_or_default())),
        };
        let copies = self.metadata.find_blob_copies(&blob).await?.ok_or_else(|| ImageError::Internal {
            context: "opening a variant",
            source: format!("the variant's blob {blob} has no record").into(),
        })?;
        let stream = self.images.open_blob(&blob, copies.size, &copies.replicas).await?;
        Ok(VariantFile { record, stream })
    }

    /// The image's current variant for `spec`, made first if it is missing or stale.
    pub async fn ensure(
        self: &Arc<Self>,
        image: &ImageRecord,
        spec: &VariantSpec,
    ) -> Result<VariantRecord, Arc<GenerateError>> {
        let current = image.variants.iter().find(|v| v.name == spec.name.as_ref() && self.catalog.is_current(v));
        match current {
            Some(variant) if variant.state != VariantState::Pending => Ok(variant.clone()),
            _ => self.generate(image.id, spec.clone()).await,
        }
    }

    /// Makes the variant, joining a generation of the same (image, variant) already running in
    /// this process. The generation runs in its own task: a request that gives up does not
    /// cancel it for the others.
    pub async fn generate(
        self: &Arc<Self>,
        image: Uuid,
        spec: VariantSpec,
    ) -> Result<VariantRecord, Arc<GenerateError>> {
        let key = (image, spec.name.to_string());
        let flight = {
            let mut flights = self.flights.lock().expect("the flights lock is never poisoned");
            match flights.get(&key) {
                Some(flight) => flight.clone(),
                None => {
                    let this = self.clone();
                    let task_key = key.clone();
                    let task = tokio::spawn(async move {
                        let result = this.generate_now(image, &spec).await.map_err(Arc::new);
                        this.flights.lock().expect("the flights lock is never poisoned").remove(&task_key);
                        result
                    });
                    let flight: BoxFuture<'static, _> =
                        Box::pin(
                            async move { task.await.unwrap_or_else(|_| Err(Arc::new(GenerateError::PoolClosed))) },
                        );
                    let flight = flight.shared();
                    flights.insert(key, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    /// One generation: read the original, render on the decode pool, store and record.
    async fn generate_now(&self, id: Uuid, spec: &VariantSpec) -> Result<VariantRecord, GenerateError> {
        let image = self.metadata.find_image(id).await?.ok_or(GenerateError::ImageGone)?;
        // Made meanwhile (by another instance, or a flight that just ended).
        if let Some(done) = image.variants.iter().find(|v| v.name == spec.name.as_ref() && self.catalog.is_current(v)) {
            return Ok(done.clone());
        }
        let _admitted = self.admission.acquire().await.map_err(|_| GenerateError::PoolClosed)?;
        let source = self.read_original(image).await?;
        let (pipeline, job_spec) = (self.pipeline, spec.clone());
        self.renders.fetch_add(1, Ordering::Relaxed);
        let rendered = self
            .pool
            .run(move || failing_on_panic(|| pipeline.render(&source, &job_spec)))
            .await
            .map_err(|_| GenerateError::PoolClosed)?;
        let recorded = match rendered {
            Ok(rendered) => self.store(id, spec, self.catalog.fingerprint(spec), rendered).await?,
            Err(error) => self.record_failure(id, spec, &self.catalog.failure_fingerprint(spec), &error).await?,
        };
        if recorded == VariantRecorded::ImageGone {
            return Err(GenerateError::ImageGone);
        }
        self.metadata.find_variant(id, spec.name.as_ref()).await?.ok_or(GenerateError::ImageGone)
    }

    /// The original's bytes, read through the router (failover, checksum verified). Their size
    /// is bounded by `server.max_upload_bytes`; the decode that follows by the pixel limit.
    async fn read_original(&self, image: ImageRecord) -> Result<Vec<u8>, GenerateError> {
        let size = image.file_size;
        let mut file = self.images.open_file(image).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(chunk) = file.reader.stream.next().await {
            let chunk =
                chunk.map_err(|e| ImageError::Internal { context: "reading an original", source: Box::new(e) })?;
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Stores a rendered variant as a content-addressed blob (or references the identical one
    /// already stored) and records it.
    async fn store(
        &self,
        image: Uuid,
        spec: &VariantSpec,
        fingerprint: String,
        rendered: Rendered,
    ) -> Result<VariantRecorded, GenerateError> {
        let blob = BlobKey::from_digest(&Sha256::digest(&rendered.bytes).into());
        let variant = NewVariant {
            image,
            name: spec.name.to_string(),
            fingerprint,
            blob: blob.clone(),
            content_type: rendered.content_type.to_owned(),
            width: rendered.width,
            height: rendered.height,
            file_size: rendered.bytes.len() as u64,
        };
        match self.metadata.record_variant_for_live_blob(&variant).await? {
            VariantRecorded::BlobNotLive => {}
            done => return Ok(done),
        }
        let size = variant.file_size;
        let body = BlobBody::Bytes(Bytes::from(rendered.bytes));
        let commit: Commit<VariantRecorded> = Box::new(move |guard, copies| {
            let variant = variant.clone();
            Box::pin(async move { guard.commit_variant(&variant, &copies).await })
        });
        let recorded = self.images.writer().store(Purpose::Variant, &blob, size, &body, None, commit).await?;
        if recorded == VariantRecorded::Recorded {
            tracing::info!(%image, variant = %spec.name, %blob, "stored a variant");
        }
        Ok(recorded)
    }

    async fn record_failure(
        &self,
        image: Uuid,
        spec: &VariantSpec,
        fingerprint: &str,
        error: &RenderError,
    ) -> Result<VariantRecorded, GenerateError> {
        tracing::warn!(%image, variant = %spec.name, %error, "the image cannot give this variant");
        let reason = error.to_string();
        Ok(self.metadata.record_variant_failure(image, spec.name.as_ref(), fingerprint, &reason).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_that_panics_is_a_final_decode_failure() {
        let failed = failing_on_panic::<()>(|| panic!("a codec bug"));
        assert!(
            matches!(failed, Err(RenderError::Decode(ref reason)) if reason.contains("decoder failed")),
            "{failed:?}"
        );
        assert!(matches!(failing_on_panic(|| Ok(7)), Ok(7)));
    }
}
