//! The pure pipeline: bytes of an original in, bytes of a variant out. Bounded (the pixel
//! limit is checked from the header before any pixel is allocated), upright (EXIF orientation
//! applied), stripped (nothing of the original's metadata is copied: GPS, camera, comments),
//! and synchronous: callers run it on the decode pool (`pool.rs`), never on async threads.
//!
//! JPEGs are decoded at a reduced scale when the variant is much smaller than the original
//! ("shrink on load": `jpeg-decoder` does the IDCT at 1/2, 1/4 or 1/8 scale), which is most of
//! the speed on a 12 MP photograph and bounds the memory of the decode to the reduced image.
//! Everything else is decoded by the `image` crate under `image::Limits`.

use std::io::Cursor;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::metadata::Orientation;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageEncoder, ImageFormat, ImageReader, Limits};

use super::jpeg_frame;
use super::spec::{AlphaFormat, Encoding, Geometry, VariantSpec};

/// A variant, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Why an original cannot give a variant. Every one is the image's own fault, final (retrying
/// gives the same answer), and its message is fit for clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("the image claims {width}x{height} pixels, over the limit of {limit}")]
    TooManyPixels { width: u64, height: u64, limit: u64 },
    #[error("decoding the image would take {needed} bytes, over the limit of {limit}")]
    TooMuchMemory { needed: u64, limit: u64 },
    #[error("the image's header cannot be read")]
    UnreadableHeader,
    #[error("the image cannot be decoded: {0}")]
    Decode(String),
    #[error("the variant cannot be encoded: {0}")]
    Encode(String),
}

/// Which library resizes. `Fast` is what the service uses; `ImageCrate` is kept for the
/// variants bench, which chose between them (BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeEngine {
    Fast,
    ImageCrate,
}

/// The pipeline's knobs.
#[derive(Debug, Clone, Copy)]
pub struct Pipeline {
    pub max_pixels: u64,
    pub encoding: Encoding,
    /// Decode JPEGs at a reduced scale when the variant allows it.
    pub shrink_on_load: bool,
    pub engine: ResizeEngine,
}

impl Pipeline {
    pub fn new(max_pixels: u64, encoding: Encoding) -> Self {
        Self { max_pixels, encoding, shrink_on_load: true, engine: ResizeEngine::Fast }
    }

    /// Makes `spec`'s variant of `source`.
    pub fn render(&self, source: &[u8], spec: &VariantSpec) -> Result<Rendered, RenderError> {
        let (width, height) = self.check_header(source)?;
        let decoded = self.decode(source, spec, width, height)?;
        let raw_spec = swaps(decoded.orientation).then(|| swapped(spec));
        let raw_spec = raw_spec.as_ref().unwrap_or(spec);
        // Geometry on the full-size source, so shrink-on-load never changes the output.
        let geometry = raw_spec.geometry(width, height);
        let scale = f64::from(decoded.image.width()) / f64::from(width.max(1));
        let mut output = self.resize(&decoded.image, &geometry, scale)?;
        drop(decoded.image);
        // Oriented after resizing: rotating the small output costs nothing, the original a copy.
        output.apply_orientation(decoded.orientation);
        encode(output, &self.encoding)
    }

    /// Dimensions from the header, refused above the pixel limit before anything is allocated.
    fn check_header(&self, source: &[u8]) -> Result<(u32, u32), RenderError> {
        let size = imagesize::blob_size(source).map_err(|_| RenderError::UnreadableHeader)?;
        let (width, height) = (size.width as u64, size.height as u64);
        if width == 0 || height == 0 || width.saturating_mul(height) > self.max_pixels {
            return Err(RenderError::TooManyPixels { width, height, limit: self.max_pixels });
        }
        let fits = |side: u64| u32::try_from(side).map_err(|_| RenderError::UnreadableHeader);
        Ok((fits(width)?, fits(height)?))
    }

    fn decode(&self, source: &[u8], spec: &VariantSpec, width: u32, height: u32) -> Result<Decoded, RenderError> {
        let is_jpeg = matches!(imagesize::image_type(source), Ok(imagesize::ImageType::Jpeg));
        if is_jpeg && let Some(decoded) = self.decode_jpeg_scaled(source, spec, width, height)? {
            return Ok(decoded);
        }
        self.decode_any(source)
    }

    /// Decodes a JPEG with `jpeg-decoder`, at the smallest DCT scale that still leaves the
    /// resize shrinking. `None` for pixel formats it hands over unconverted (CMYK, 16-bit
    /// grey), which the general decoder handles.
    fn decode_jpeg_scaled(
        &self,
        source: &[u8],
        spec: &VariantSpec,
        width: u32,
        height: u32,
    ) -> Result<Option<Decoded>, RenderError> {
        let mut decoder = jpeg_decoder::Decoder::new(source);
        decoder.set_max_decoding_buffer_size(self.max_alloc() as usize);
        decoder.read_info().map_err(|e| RenderError::Decode(e.to_string()))?;
        let orientation =
            decoder.exif_data().and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
        let mut output = (width, height);
        if self.shrink_on_load {
            let raw_spec = swaps(orientation).then(|| swapped(spec));
            let (target_w, target_h) = raw_spec.as_ref().unwrap_or(spec).decode_target(width, height);
            let clamp = |side: u32| u16::try_from(side.max(1)).unwrap_or(u16::MAX);
            let scaled =
                decoder.scale(clamp(target_w), clamp(target_h)).map_err(|e| RenderError::Decode(e.to_string()))?;
            output = (u32::from(scaled.0), u32::from(scaled.1));
        }
        // The decoder bounds its output buffer, but not a progressive JPEG's coefficients.
        let pixel_bytes = decoder.info().map_or(4, |info| info.pixel_format.pixel_bytes()) as u64;
        let output_bytes = u64::from(output.0) * u64::from(output.1) * pixel_bytes;
        self.check_decode_memory(jpeg_frame::progressive_coefficient_bytes(source).unwrap_or(0) + output_bytes)?;
        let pixels = decoder.decode().map_err(|e| RenderError::Decode(e.to_string()))?;
        let info = decoder.info().ok_or_else(|| RenderError::Decode("no frame header".into()))?;
        let (w, h) = (u32::from(info.width), u32::from(info.height));
        let image = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 => ImageBuffer::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
            jpeg_decoder::PixelFormat::RGB24 => ImageBuffer::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
            jpeg_decoder::PixelFormat::L16 | jpeg_decoder::PixelFormat::CMYK32 => return Ok(None),
        };
        let image = image.ok_or_else(|| RenderError::Decode("the decoder returned a short buffer".into()))?;
        Ok(Some(Decoded { image, orientation }))
    }

    /// Any accepted format, with `image`'s own limits as a second fence. Animated GIF and
    /// WebP give their first frame.
    fn decode_any(&self, source: &[u8]) -> Result<Decoded, RenderError> {
        let decode_error = |e: image::ImageError| RenderError::Decode(e.to_string());
        let mut reader = ImageReader::new(Cursor::new(source))
            .with_guessed_format()
            .map_err(|e| RenderError::Decode(e.to_string()))?;
        if reader.format().is_none_or(|format| !ACCEPTED.contains(&format)) {
            return Err(RenderError::UnreadableHeader);
        }
        let mut limits = Limits::default();
        limits.max_alloc = Some(self.max_alloc());
        reader.limits(limits.clone());
        let mut decoder = reader.into_decoder().map_err(decode_error)?;
        // `from_decoder` does not count the image's own buffer against the limits (only
        // `ImageReader::decode` does, which gives no access to the orientation): count it here,
        // so that a 16-bit image within the pixel limit cannot allocate 8 bytes a pixel.
        limits.reserve(decoder.total_bytes()).map_err(decode_error)?;
        // A progressive JPEG's coefficients are held besides (CMYK and 16-bit JPEGs come here).
        if let Some(coefficients) = jpeg_frame::progressive_coefficient_bytes(source) {
            self.check_decode_memory(coefficients + decoder.total_bytes())?;
        }
        decoder.set_limits(limits).map_err(decode_error)?;
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        let image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
        Ok(Decoded { image, orientation })
    }

    /// Refuses a decode that would need more than [`Self::max_alloc`], before it allocates.
    fn check_decode_memory(&self, needed: u64) -> Result<(), RenderError> {
        let limit = self.max_alloc();
        if needed > limit {
            return Err(RenderError::TooMuchMemory { needed, limit });
        }
        Ok(())
    }

    /// The most a decode may allocate: the pixel limit at 4 bytes a pixel, the widest format
    /// the service keeps in memory, plus a margin for the decoder's own buffers.
    fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(4).saturating_add(16 << 20)
    }

    /// Resizes (cropping first for `cover`) into a new image of the output size. `scale` maps
    /// full-size coordinates to the decoded image's (below 1 after shrink-on-load).
    fn resize(&self, source: &DynamicImage, geometry: &Geometry, scale: f64) -> Result<DynamicImage, RenderError> {
        let source = normalise(source);
        let source: &DynamicImage = &source;
        let (full_w, full_h) = (f64::from(source.width()), f64::from(source.height()));
        let (left, top, w, h) = geometry.crop.map_or((0.0, 0.0, full_w, full_h), |(l, t, w, h)| {
            (l * scale, t * scale, (w * scale).min(full_w), (h * scale).min(full_h))
        });
        let (out_w, out_h) = geometry.output;
        match self.engine {
            ResizeEngine::Fast => {
                let mut output = DynamicImage::new(out_w, out_h, source.color());
                let options =
                    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)).crop(left, top, w, h);
                Resizer::new().resize(source, &mut output, &options).map_err(|e| RenderError::Encode(e.to_string()))?;
                Ok(output)
            }
            ResizeEngine::ImageCrate => {
                let cropped = source.crop_imm(left as u32, top as u32, w as u32, h as u32);
                Ok(cropped.resize_exact(out_w, out_h, image::imageops::FilterType::Lanczos3))
            }
        }
    }
}

/// The formats the service accepts (the upload checks magic bytes; this is a second fence).
const ACCEPTED: [ImageFormat; 4] = [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Gif, ImageFormat::WebP];

struct Decoded {
    image: DynamicImage,
    orientation: Orientation,
}

/// Whether the orientation turns the image a quarter, so width and height trade places.
fn swaps(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

/// The spec as seen from a source stored sideways.
fn swapped(spec: &VariantSpec) -> VariantSpec {
    VariantSpec { width: spec.height, height: spec.width, ..spec.clone() }
}

/// The pixel layouts the resizer and encoders handle without surprises: 8-bit grey, grey and
/// alpha, RGB and RGBA. 16-bit and float images are converted (a copy), 8-bit ones are not.
fn normalise(image: &DynamicImage) -> std::borrow::Cow<'_, DynamicImage> {
    use std::borrow::Cow;
    match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => Cow::Borrowed(image),
        other if other.color().has_alpha() => Cow::Owned(DynamicImage::ImageRgba8(other.to_rgba8())),
        other => Cow::Owned(DynamicImage::ImageRgb8(other.to_rgb8())),
    }
}

/// JPEG when every pixel is opaque (even if the source had an alpha channel), otherwise the
/// configured alpha format. Only pixels are written: no metadata of the original survives.
fn encode(image: DynamicImage, encoding: &Encoding) -> Result<Rendered, RenderError> {
    let (width, height) = (image.width(), image.height());
    let encode_error = |e: image::ImageError| RenderError::Encode(e.to_string());
    let mut bytes = Vec::new();
    let content_type = if has_transparency(&image) {
        let rgba =
            if image.color().channel_count() == 2 { image } else { DynamicImage::ImageRgba8(image.into_rgba8()) };
        match encoding.alpha_format {
            AlphaFormat::Png => {
                PngEncoder::new(&mut bytes)
                    .write_image(rgba.as_bytes(), width, height, rgba.color().into())
                    .map_err(encode_error)?;
                "image/png"
            }
            AlphaFormat::Webp => {
                let rgba = rgba.into_rgba8();
                WebPEncoder::new_lossless(&mut bytes)
                    .write_image(rgba.as_raw(), width, height, image::ExtendedColorType::Rgba8)
                    .map_err(encode_error)?;
                "image/webp"
            }
        }
    } else {
        let opaque = match image {
            DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => image,
            DynamicImage::ImageLumaA8(_) => DynamicImage::ImageLuma8(image.into_luma8()),
            other => DynamicImage::ImageRgb8(other.into_rgb8()),
        };
        JpegEncoder::new_with_quality(&mut bytes, encoding.jpeg_quality)
            .write_image(opaque.as_bytes(), width, height, opaque.color().into())
            .map_err(encode_error)?;
        "image/jpeg"
    };
    Ok(Rendered { bytes, content_type, width, height })
}

fn has_transparency(image: &DynamicImage) -> bool {
    match image {
        DynamicImage::ImageLumaA8(buffer) => buffer.pixels().any(|p| p.0[1] < u8::MAX),
        DynamicImage::ImageRgba8(buffer) => buffer.pixels().any(|p| p.0[3] < u8::MAX),
        other => other.color().has_alpha(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variants::spec::Fit;

    /// A small baseline JPEG whose frame header is rewritten to claim a progressive 10,000 ×
    /// 10,000 image at 4:4:4: within the pixel limit, but 600 MB of coefficients to decode.
    fn progressive_claim() -> Vec<u8> {
        let mut bytes = Vec::new();
        let image = DynamicImage::new_rgb8(64, 64);
        JpegEncoder::new(&mut bytes).write_image(image.as_bytes(), 64, 64, image.color().into()).unwrap();
        let sof = bytes.windows(2).position(|pair| pair == [0xFF, 0xC0]).expect("a baseline frame header");
        bytes[sof + 1] = 0xC2;
        bytes[sof + 5..sof + 9].copy_from_slice(&[0x27, 0x10, 0x27, 0x10]);
        for component in 0..3 {
            bytes[sof + 11 + 3 * component] = 0x11;
        }
        bytes
    }

    #[test]
    fn a_progressive_jpeg_whose_coefficients_exceed_the_limit_is_refused_before_decoding() {
        let pipeline = Pipeline::new(100_000_000, Encoding::default());
        let thumb = VariantSpec::new("thumb", 256, 256, Fit::Cover).unwrap();
        match pipeline.render(&progressive_claim(), &thumb) {
            Err(RenderError::TooMuchMemory { needed, limit }) => {
                assert!(needed >= 600_000_000, "{needed}");
                assert_eq!(limit, pipeline.max_alloc());
            }
            other => panic!("expected a refusal for memory, got {other:?}"),
        }
    }
}
