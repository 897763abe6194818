//! Variants: thumbnails and previews of images, generated durably and stored on the ring.
//!
//! - `spec.rs`: what a variant is (name, box, fit, encoding), parsed once from the config;
//! - `pipeline.rs`: original bytes in, variant bytes out (bounded, upright, stripped);
//! - `jpeg_frame.rs`: the memory a progressive JPEG's decode holds, read from its header;
//! - `pool.rs`: the fixed pool of decode threads the pipeline runs on;
//! - `service.rs`: the use case: make a variant once (single flight), store it as a blob,
//!   record it; open a variant for serving;
//! - `worker.rs`: the durable generation queue's workers;
//! - `backfill.rs`: `chitram variants backfill`.
//!
//! [`Catalog`] is the configured set, which both uploads (to queue tasks) and every image's
//! JSON (to present one entry per configured variant) need.

pub mod backfill;
mod jpeg_frame;
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
    /// `variants.max_pixels`: not part of what a variant's bytes are, but of why one failed.
    max_pixels: u64,
}

impl Catalog {
    pub fn new(specs: Vec<VariantSpec>, encoding: Encoding, max_pixels: u64) -> Self {
        Self { specs, encoding, max_pixels }
    }

    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
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

    /// The fingerprint a failure is recorded under: the spec's, and the pixel limit it failed
    /// under. Raising (or lowering) `variants.max_pixels` makes every failed variant stale, so
    /// an original that was too large is tried again; a ready variant's bytes do not depend on
    /// the limit, so it stays current.
    pub fn failure_fingerprint(&self, spec: &VariantSpec) -> String {
        format!("{}:px{}", self.fingerprint(spec), self.max_pixels)
    }

    /// Whether a recorded variant was made under the current config (otherwise it is stale:
    /// pending until made again).
    pub fn is_current(&self, record: &VariantRecord) -> bool {
        self.get(&record.name).is_some_and(|spec| {
            let current = match record.state {
                VariantState::Failed => self.failure_fingerprint(spec),
                _ => self.fingerprint(spec),
            };
            current == record.fingerprint
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(catalog: &Catalog, state: VariantState, fingerprint: String) -> VariantRecord {
        VariantRecord {
            image: uuid::Uuid::nil(),
            name: catalog.specs()[0].name.to_string(),
            fingerprint,
            state,
            blob: None,
            content_type: String::new(),
            width: 256,
            height: 256,
            file_size: 0,
            reason: None,
        }
    }

    #[test]
    fn a_failure_is_current_only_under_the_pixel_limit_it_failed_under() {
        let at = |max_pixels| Catalog::new(VariantSpec::default_set(), Encoding::default(), max_pixels);
        let (low, high) = (at(100_000), at(1_000_000));
        let thumb = &low.specs()[0];
        let failed = recorded(&low, VariantState::Failed, low.failure_fingerprint(thumb));
        assert!(low.is_current(&failed));
        assert!(!high.is_current(&failed), "a raised limit tries a failed variant again");
        let ready = recorded(&low, VariantState::Ready, low.fingerprint(thumb));
        assert!(low.is_current(&ready) && high.is_current(&ready), "a made variant does not depend on the limit");
        let failed_before_limits_counted = recorded(&low, VariantState::Failed, low.fingerprint(thumb));
        assert!(!low.is_current(&failed_before_limits_counted));
    }
}
