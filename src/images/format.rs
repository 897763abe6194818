//! What an upload is, judged by its bytes (magic numbers), never by the client's Content-Type.

use std::io::{BufReader, Seek};
use std::path::Path;

use imagesize::ImageType;

use super::container::{self, Incomplete};

/// The largest width or height recorded: the databases keep them as signed 32-bit integers.
pub const MAX_DIMENSION: u32 = i32::MAX as u32;

/// The image formats Chitram accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Gif,
    Webp,
}

impl ImageFormat {
    pub fn mime_type(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// Recognises a format from the first bytes of a file.
    fn sniff(head: &[u8]) -> Option<Self> {
        match imagesize::image_type(head).ok()? {
            ImageType::Jpeg => Some(ImageFormat::Jpeg),
            ImageType::Png => Some(ImageFormat::Png),
            ImageType::Gif => Some(ImageFormat::Gif),
            ImageType::Webp => Some(ImageFormat::Webp),
            _ => None,
        }
    }
}

/// An accepted image's format and dimensions, read from its header without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("the file is not a JPEG, PNG, GIF or WebP image")]
    Unsupported,
    #[error("the {} header is truncated or corrupt", .0.mime_type())]
    CorruptHeader(ImageFormat),
    #[error("the {} file is truncated or corrupt: {}", .0.mime_type(), .1)]
    Incomplete(ImageFormat, Incomplete),
    #[error("the image is {width}×{height} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
}

/// Inspects an image held in memory: its header, then its structure to the end.
pub fn inspect_bytes(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, FormatError> {
    let format = ImageFormat::sniff(bytes).ok_or(FormatError::Unsupported)?;
    let size = imagesize::blob_size(bytes).map_err(|_| FormatError::CorruptHeader(format))?;
    let info = checked_info(format, size, max_pixels)?;
    container::check_complete(format, bytes, bytes.len() as u64).map_err(|why| FormatError::Incomplete(format, why))?;
    Ok(info)
}

/// Inspects an image spooled to a file of `len` bytes: its header, then its structure to the
/// end, a window at a time. Blocking.
pub fn inspect_file(head: &[u8], path: &Path, len: u64, max_pixels: u64) -> Result<ImageInfo, FormatError> {
    let format = ImageFormat::sniff(head).ok_or(FormatError::Unsupported)?;
    let open = || -> std::io::Result<BufReader<std::fs::File>> {
        let mut reader = BufReader::with_capacity(64 * 1024, std::fs::File::open(path)?);
        reader.rewind()?;
        Ok(reader)
    };
    let corrupt = |_| FormatError::CorruptHeader(format);
    let size = imagesize::reader_size(open().map_err(corrupt)?).map_err(|_| FormatError::CorruptHeader(format))?;
    let info = checked_info(format, size, max_pixels)?;
    let reader = open().map_err(corrupt)?;
    container::check_complete(format, reader, len).map_err(|why| FormatError::Incomplete(format, why))?;
    Ok(info)
}

/// Dimensions an image may have: above zero, within what the database records, and within
/// the pixel limit.
fn checked_info(format: ImageFormat, size: imagesize::ImageSize, max_pixels: u64) -> Result<ImageInfo, FormatError> {
    let dimension = |value: usize| {
        u32::try_from(value).ok().filter(|v| (1..=MAX_DIMENSION).contains(v)).ok_or(FormatError::CorruptHeader(format))
    };
    let (width, height) = (dimension(size.width)?, dimension(size.height)?);
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(FormatError::TooManyPixels { width, height, limit: max_pixels });
    }
    Ok(ImageInfo { format, width, height })
}

#[cfg(test)]
pub(crate) mod samples {
    //! Minimal valid headers, built by hand so tests need no fixture files.

    /// A complete `width × height` PNG: signature, IHDR, one IDAT, IEND, with their CRCs.
    /// The IDAT holds no real pixels: nothing in Chitram decodes them.
    pub fn png(width: u32, height: u32) -> Vec<u8> {
        let mut header = width.to_be_bytes().to_vec();
        header.extend_from_slice(&height.to_be_bytes());
        header.extend_from_slice(&[8, 6, 0, 0, 0]);
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        png_chunk(&mut bytes, b"IHDR", &header);
        png_chunk(&mut bytes, b"IDAT", b"\x78\x9c\x63\x00\x00\x00\x01\x00\x01");
        png_chunk(&mut bytes, b"IEND", b"");
        bytes
    }

    fn png_chunk(bytes: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(kind);
        bytes.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        bytes.extend_from_slice(&crc.finalize().to_be_bytes());
    }

    /// A baseline JPEG: SOI, APP0, a SOF0 frame header, one scan (SOS and a few bytes of
    /// entropy-coded data), EOI.
    pub fn jpeg(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        bytes.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
        bytes.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x0C, 0x03, 0x01, 0x00, 0x02, 0x11, 0x03, 0x11, 0x00, 0x3F, 0x00]);
        bytes.extend_from_slice(&[0xF0, 0x0F, 0x55]);
        bytes.extend_from_slice(&[0xFF, 0xD9]);
        bytes
    }

    /// A GIF89a: a two-colour global table, one image with two bytes of LZW data, the trailer.
    pub fn gif(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = b"GIF89a".to_vec();
        bytes.extend_from_slice(&width.to_le_bytes());
        bytes.extend_from_slice(&height.to_le_bytes());
        bytes.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF]);
        bytes.extend_from_slice(&[0x2C, 0, 0, 0, 0]);
        bytes.extend_from_slice(&width.to_le_bytes());
        bytes.extend_from_slice(&height.to_le_bytes());
        bytes.extend_from_slice(&[0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3B]);
        bytes
    }

    /// A lossless WebP: RIFF, VP8L with its 14-bit dimensions, and a few bytes of stream.
    pub fn webp(width: u16, height: u16) -> Vec<u8> {
        let bits = u32::from(width - 1) | (u32::from(height - 1) << 14);
        let mut vp8l = vec![0x2F];
        vp8l.extend_from_slice(&bits.to_le_bytes());
        vp8l.extend_from_slice(&[0, 0, 0]);
        let mut bytes = b"RIFF".to_vec();
        bytes.extend_from_slice(&(4 + 8 + vp8l.len() as u32).to_le_bytes());
        bytes.extend_from_slice(b"WEBPVP8L");
        bytes.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&vp8l);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 100_000_000;

    fn inspect(bytes: &[u8]) -> Result<ImageInfo, FormatError> {
        inspect_bytes(bytes, LIMIT)
    }

    #[test]
    fn reads_the_dimensions_of_every_format() {
        let png = inspect(&samples::png(640, 480)).unwrap();
        assert_eq!(png, ImageInfo { format: ImageFormat::Png, width: 640, height: 480 });
        let jpeg = inspect(&samples::jpeg(33, 17)).unwrap();
        assert_eq!(jpeg, ImageInfo { format: ImageFormat::Jpeg, width: 33, height: 17 });
        assert_eq!(
            inspect(&samples::gif(10, 5)).unwrap(),
            ImageInfo { format: ImageFormat::Gif, width: 10, height: 5 }
        );
        let webp = inspect(&samples::webp(300, 200)).unwrap();
        assert_eq!(webp, ImageInfo { format: ImageFormat::Webp, width: 300, height: 200 });
    }

    #[test]
    fn rejects_other_formats_whatever_their_name() {
        assert_eq!(inspect(b"%PDF-1.7 not an image"), Err(FormatError::Unsupported));
        assert_eq!(inspect(b"BM\x00\x00 a bitmap"), Err(FormatError::Unsupported));
    }

    #[test]
    fn rejects_truncated_headers() {
        let png = samples::png(10, 10);
        assert_eq!(inspect(&png[..14]), Err(FormatError::CorruptHeader(ImageFormat::Png)));
        let jpeg = samples::jpeg(10, 10);
        assert_eq!(inspect(&jpeg[..12]), Err(FormatError::CorruptHeader(ImageFormat::Jpeg)));
    }

    #[test]
    fn rejects_files_cut_after_an_intact_header() {
        let png = samples::png(10, 10);
        assert!(matches!(inspect(&png[..33]), Err(FormatError::Incomplete(ImageFormat::Png, _))));
        let jpeg = samples::jpeg(10, 10);
        assert!(matches!(inspect(&jpeg[..jpeg.len() - 2]), Err(FormatError::Incomplete(ImageFormat::Jpeg, _))));
    }

    #[test]
    fn rejects_zero_and_unrecordable_dimensions() {
        assert_eq!(inspect(&samples::png(0, 10)), Err(FormatError::CorruptHeader(ImageFormat::Png)));
        let wide = samples::png(1 << 31, 1);
        assert_eq!(inspect_bytes(&wide, u64::MAX), Err(FormatError::CorruptHeader(ImageFormat::Png)));
    }

    #[test]
    fn rejects_images_over_the_pixel_limit_before_walking_them() {
        assert_eq!(inspect_bytes(&samples::png(100, 100), 10_000).unwrap().width, 100);
        let error = inspect_bytes(&samples::png(100, 101), 10_000).unwrap_err();
        assert_eq!(error, FormatError::TooManyPixels { width: 100, height: 101, limit: 10_000 });
        // The limit is checked from the header alone: the rest need not even be there.
        assert!(matches!(
            inspect_bytes(&samples::png(100_000, 100_000)[..33], LIMIT),
            Err(FormatError::TooManyPixels { .. })
        ));
    }

    #[test]
    fn inspects_a_spooled_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let mut bytes = samples::jpeg(1200, 800);
        let eoi = bytes.len() - 2;
        bytes.splice(eoi..eoi, std::iter::repeat_n(0x5A, 3 << 20));
        std::fs::write(&path, &bytes).unwrap();
        let info = inspect_file(&bytes[..64], &path, bytes.len() as u64, LIMIT).unwrap();
        assert_eq!((info.width, info.height), (1200, 800));
        std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
        let cut = inspect_file(&bytes[..64], &path, bytes.len() as u64 - 1000, LIMIT);
        assert!(matches!(cut, Err(FormatError::Incomplete(ImageFormat::Jpeg, _))), "{cut:?}");
    }
}
