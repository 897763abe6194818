//! What a variant is: a name, a box and a fit, plus how its bytes are encoded. Parsed once
//! from the config; the rest of the program only sees checked values.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest side a variant may ask for: variants are for galleries and previews, never for
/// re-encoding originals at full size.
pub const MAX_SIDE: u32 = 8192;

/// How the image meets the variant's box. Neither ever upscales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Fills the box, cropping the overflow around the centre.
    Cover,
    /// Fits inside the box, keeping the whole image.
    Contain,
}

impl Fit {
    pub fn as_str(self) -> &'static str {
        match self {
            Fit::Cover => "cover",
            Fit::Contain => "contain",
        }
    }
}

/// The format of variants of images with alpha (opaque ones are always JPEG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlphaFormat {
    Png,
    /// Lossless WebP (the encoder available without a C library).
    Webp,
}

/// How variants are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// JPEG quality, 1 to 100.
    pub jpeg_quality: u8,
    pub alpha_format: AlphaFormat,
}

impl Default for Encoding {
    fn default() -> Self {
        Self { jpeg_quality: 82, alpha_format: AlphaFormat::Png }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0:?} must be 1-32 lowercase letters, digits, '-' or '_'")]
    BadName(String),
    #[error("width and height must be between 1 and {MAX_SIDE}")]
    BadSize,
    #[error("jpeg_quality must be between 1 and 100")]
    BadQuality,
}

/// A checked variant name: it appears in URLs and in the JSON of every image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VariantName(String);

impl VariantName {
    pub fn parse(name: &str) -> Result<Self, SpecError> {
        let valid = (1..=32).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if valid { Ok(Self(name.to_owned())) } else { Err(SpecError::BadName(name.to_owned())) }
    }
}

impl AsRef<str> for VariantName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VariantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One configured variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantSpec {
    pub name: VariantName,
    pub width: u32,
    pub height: u32,
    pub fit: Fit,
}

/// Bumped when the pipeline's output changes for the same spec (filter, orientation rules),
/// so existing variants count as stale and are made again.
const PIPELINE_VERSION: u32 = 1;

impl VariantSpec {
    pub fn new(name: &str, width: u32, height: u32, fit: Fit) -> Result<Self, SpecError> {
        if !(1..=MAX_SIDE).contains(&width) || !(1..=MAX_SIDE).contains(&height) {
            return Err(SpecError::BadSize);
        }
        Ok(Self { name: VariantName::parse(name)?, width, height, fit })
    }

    /// The default set, used when the config names none: `thumb` 256×256 cover and
    /// `preview` 1280×1280 contain.
    pub fn default_set() -> Vec<VariantSpec> {
        vec![
            VariantSpec::new("thumb", 256, 256, Fit::Cover).expect("a valid default"),
            VariantSpec::new("preview", 1280, 1280, Fit::Contain).expect("a valid default"),
        ]
    }

    /// Names everything that decides a variant's bytes. A stored variant whose fingerprint
    /// differs from this was made under another config and is made again.
    pub fn fingerprint(&self, encoding: &Encoding) -> String {
        let alpha = match encoding.alpha_format {
            AlphaFormat::Png => "png",
            AlphaFormat::Webp => "webp",
        };
        format!(
            "v{PIPELINE_VERSION}:{}x{}:{}:q{}:{alpha}",
            self.width,
            self.height,
            self.fit.as_str(),
            encoding.jpeg_quality
        )
    }

    /// The output size for a source of `width` × `height` (already oriented upright), and
    /// for `cover` the region of the source to crop first (left, top, width, height).
    pub fn geometry(&self, width: u32, height: u32) -> Geometry {
        let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
        let (bw, bh) = (f64::from(self.width), f64::from(self.height));
        match self.fit {
            Fit::Contain => {
                let scale = (bw / w).min(bh / h).min(1.0);
                let out = ((w * scale).round().max(1.0) as u32, (h * scale).round().max(1.0) as u32);
                Geometry { output: out, crop: None }
            }
            Fit::Cover => {
                // Never upscale: a source smaller than the box gives a smaller variant with
                // the box's aspect ratio.
                let scale = (bw / w).max(bh / h).min(1.0);
                let out_w = (bw.min(w * scale)).round().max(1.0);
                let out_h = (bh.min(h * scale)).round().max(1.0);
                let (crop_w, crop_h) = (out_w / scale, out_h / scale);
                let crop = ((w - crop_w) / 2.0, (h - crop_h) / 2.0, crop_w.min(w), crop_h.min(h));
                Geometry { output: (out_w as u32, out_h as u32), crop: Some(crop) }
            }
        }
    }

    /// The smallest size the decoder may hand over and still leave the resize only
    /// shrinking: what the crop needs at the output's scale (shrink-on-load aims at it).
    pub fn decode_target(&self, width: u32, height: u32) -> (u32, u32) {
        let geometry = self.geometry(width, height);
        let (out_w, out_h) = geometry.output;
        let (crop_w, crop_h) = geometry.crop.map_or((f64::from(width), f64::from(height)), |c| (c.2, c.3));
        let scale = (f64::from(out_w) / crop_w).max(f64::from(out_h) / crop_h);
        ((f64::from(width) * scale).ceil() as u32, (f64::from(height) * scale).ceil() as u32)
    }
}

/// Where a variant's pixels come from and what size they end up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub output: (u32, u32),
    /// `cover` only: the centred region of the source kept (left, top, width, height).
    pub crop: Option<(f64, f64, f64, f64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(VariantName::parse("thumb").is_ok());
        assert!(VariantName::parse("og-image_2").is_ok());
        for bad in ["", "Thumb", "a/b", "../x", "a b", &"x".repeat(33)] {
            assert!(VariantName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(VariantSpec::new("t", 0, 10, Fit::Cover), Err(SpecError::BadSize));
        assert_eq!(VariantSpec::new("t", 10, MAX_SIDE + 1, Fit::Cover), Err(SpecError::BadSize));
    }

    #[test]
    fn cover_fills_the_box_and_crops_the_centre() {
        let spec = VariantSpec::new("t", 256, 256, Fit::Cover).unwrap();
        let g = spec.geometry(4000, 3000);
        assert_eq!(g.output, (256, 256));
        let (left, top, w, h) = g.crop.unwrap();
        assert_eq!((w.round(), h.round()), (3000.0, 3000.0));
        assert_eq!((left.round(), top.round()), (500.0, 0.0));
    }

    #[test]
    fn contain_fits_inside_and_keeps_the_aspect_ratio() {
        let spec = VariantSpec::new("p", 1280, 1280, Fit::Contain).unwrap();
        assert_eq!(spec.geometry(4000, 3000).output, (1280, 960));
        assert_eq!(spec.geometry(3000, 4000).output, (960, 1280));
    }

    #[test]
    fn neither_fit_upscales() {
        let contain = VariantSpec::new("p", 1280, 1280, Fit::Contain).unwrap();
        assert_eq!(contain.geometry(100, 50).output, (100, 50));
        let cover = VariantSpec::new("t", 256, 256, Fit::Cover).unwrap();
        assert_eq!(cover.geometry(100, 50).output, (100, 50));
        assert_eq!(cover.geometry(400, 100).output, (256, 100));
    }

    #[test]
    fn the_decode_target_is_at_least_what_the_output_needs() {
        let cover = VariantSpec::new("t", 256, 256, Fit::Cover).unwrap();
        let (w, h) = cover.decode_target(4000, 3000);
        assert!(h >= 256 && (341..4000).contains(&w), "{w}x{h}");
        let contain = VariantSpec::new("p", 1280, 1280, Fit::Contain).unwrap();
        assert_eq!(contain.decode_target(4000, 3000), (1280, 960));
    }

    #[test]
    fn the_fingerprint_changes_with_anything_that_changes_the_bytes() {
        let spec = VariantSpec::new("t", 256, 256, Fit::Cover).unwrap();
        let encoding = Encoding::default();
        let base = spec.fingerprint(&encoding);
        assert_ne!(base, VariantSpec::new("t", 300, 256, Fit::Cover).unwrap().fingerprint(&encoding));
        assert_ne!(base, VariantSpec::new("t", 256, 256, Fit::Contain).unwrap().fingerprint(&encoding));
        assert_ne!(base, spec.fingerprint(&Encoding { jpeg_quality: 90, ..encoding }));
        assert_ne!(base, spec.fingerprint(&Encoding { alpha_format: AlphaFormat::Webp, ..encoding }));
    }
}
