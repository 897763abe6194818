//! Variants: thumbnails and previews of images, generated durably and stored on the ring.
//!
//! - `spec.rs`: what a variant is (name, box, fit, encoding), parsed once from the config;
//! - `pipeline.rs`: original bytes in, variant bytes out (bounded, upright, stripped);
//! - `pool.rs`: the fixed pool of decode threads the pipeline runs on;
//! - `service.rs`: the use case: make a variant once (single flight), store it as a blob,
//!   record it; open a variant for serving;
//! - `worker.rs`: the durable generation queue's workers;
//! - `backfill.rs`: `chitram variants backfill`.
//!
//! [`Catalog`] is the configured set, which both uploads (to queue tasks) and every image's
//! JSON (to present one entry per configured variant) need.

pub mod backfill;
pub mod pipeline;
pub mod pool;
pub mod service;
pub mod spec;
pub mod worker;

use crate::metadata::{ImageRecord, VariantRecord, VariantState};
use spec::{Encoding, VariantSpec};

/// The configured variants and how they are encoded.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    specs: Vec<VariantSpec>,
    encoding: Encoding,
}

impl Catalog {
    pub fn new(specs: Vec<VariantSpec>, encoding: Encoding) -> Self {
        Self { specs, encoding }
    }

    pub fn specs(&self) -> &[VariantSpec] {
        &self.specs
    }

    pub fn encoding(&self) -> &Encoding {
        &self.encoding
    }

    pub fn get(&self, name: &str) -> Option<&VariantSpec> {
        self.specs.iter().find(|spec| spec.name.as_ref() == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|spec| spec.name.to_string()).collect()
    }

    pub fn fingerprint(&self, spec: &VariantSpec) -> String {
        spec.fingerprint(&self.encoding)
    }

    /// Whether a recorded variant was made under the current config (otherwise it is stale:
    /// pending until made again).
    pub fn is_current(&self, record: &VariantRecord) -> bool {
        self.get(&record.name).is_some_and(|spec| self.fingerprint(spec) == record.fingerprint)
    }

    /// The image with one variant per configured name: the recorded one when it is current,
    /// otherwise a pending one with the size it will have. Variants of names no longer
    /// configured are not shown (and not served).
    pub fn present(&self, mut image: ImageRecord) -> ImageRecord {
        let recorded = std::mem::take(&mut image.variants);
        image.variants = self
            .specs
            .iter()
            .map(|spec| match recorded.iter().find(|r| r.name == spec.name.as_ref() && self.is_current(r)) {
                Some(current) => current.clone(),
                None => self.pending(&image, spec),
            })
            .collect();
        image
    }

    fn pending(&self, image: &ImageRecord, spec: &VariantSpec) -> VariantRecord {
        let (width, height) = spec.geometry(image.width, image.height).output;
        VariantRecord {
            image: image.id,
            name: spec.name.to_string(),
            fingerprint: self.fingerprint(spec),
            state: VariantState::Pending,
            blob: None,
            content_type: String::new(),
            width,
            height,
            file_size: 0,
            reason: None,
        }
    }
}
