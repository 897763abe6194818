//! What an upload is, judged by its bytes (magic numbers), never by the client's Content-Type.

use std::io::{BufReader, Seek};
use std::path::Path;

use imagesize::ImageType;

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
}

/// Inspects an image held in memory.
pub fn inspect_bytes(bytes: &[u8]) -> Result<ImageInfo, FormatError> {
    let format = ImageFormat::sniff(bytes).ok_or(FormatError::Unsupported)?;
    let size = imagesize::blob_size(bytes).map_err(|_| FormatError::CorruptHeader(format))?;
    checked_info(format, size)
}

/// Inspects an image spooled to a file, reading only as far as its header. Blocking.
pub fn inspect_file(head: &[u8], path: &Path) -> Result<ImageInfo, FormatError> {
    let format = ImageFormat::sniff(head).ok_or(FormatError::Unsupported)?;
    let size = std::fs::File::open(path).map_err(|_| FormatError::CorruptHeader(format)).and_then(|file| {
        let mut reader = BufReader::new(file);
        reader.rewind().map_err(|_| FormatError::CorruptHeader(format))?;
        imagesize::reader_size(reader).map_err(|_| FormatError::CorruptHeader(format))
    })?;
    checked_info(format, size)
}

fn checked_info(format: ImageFormat, size: imagesize::ImageSize) -> Result<ImageInfo, FormatError> {
    let width = u32::try_from(size.width).map_err(|_| FormatError::CorruptHeader(format))?;
    let height = u32::try_from(size.height).map_err(|_| FormatError::CorruptHeader(format))?;
    if width == 0 || height == 0 {
        return Err(FormatError::CorruptHeader(format));
    }
    Ok(ImageInfo { format, width, height })
}

#[cfg(test)]
pub(crate) mod samples {
    //! Minimal valid headers, built by hand so tests need no fixture files.

    /// A PNG signature and IHDR chunk for a `width × height` image (no pixel data: the
    /// header is all Chitram reads).
    pub fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        bytes
    }

    /// A baseline JPEG: SOI, an APP0 segment, and a SOF0 frame header.
    pub fn jpeg(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        bytes.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
        bytes.extend_from_slice(&[0xFF, 0xD9]);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_png_and_jpeg_dimensions() {
        let png = inspect_bytes(&samples::png(640, 480)).unwrap();
        assert_eq!(png, ImageInfo { format: ImageFormat::Png, width: 640, height: 480 });
        let jpeg = inspect_bytes(&samples::jpeg(33, 17)).unwrap();
        assert_eq!(jpeg, ImageInfo { format: ImageFormat::Jpeg, width: 33, height: 17 });
    }

    #[test]
    fn reads_gif_dimensions() {
        let gif = b"GIF89a\x0a\x00\x05\x00\x80\x00\x00";
        assert_eq!(inspect_bytes(gif).unwrap(), ImageInfo { format: ImageFormat::Gif, width: 10, height: 5 });
    }

    #[test]
    fn rejects_other_formats_whatever_their_name() {
        assert_eq!(inspect_bytes(b"%PDF-1.7 not an image"), Err(FormatError::Unsupported));
        assert_eq!(inspect_bytes(b"BM\x00\x00 a bitmap"), Err(FormatError::Unsupported));
    }

    #[test]
    fn rejects_truncated_headers() {
        let png = samples::png(10, 10);
        assert_eq!(inspect_bytes(&png[..14]), Err(FormatError::CorruptHeader(ImageFormat::Png)));
        let jpeg = samples::jpeg(10, 10);
        assert_eq!(inspect_bytes(&jpeg[..12]), Err(FormatError::CorruptHeader(ImageFormat::Jpeg)));
    }

    #[test]
    fn rejects_zero_dimensions() {
        assert_eq!(inspect_bytes(&samples::png(0, 10)), Err(FormatError::CorruptHeader(ImageFormat::Png)));
    }

    #[test]
    fn inspects_a_spooled_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let mut bytes = samples::jpeg(1200, 800);
        bytes.resize(3 << 20, 0);
        std::fs::write(&path, &bytes).unwrap();
        let info = inspect_file(&bytes[..64], &path).unwrap();
        assert_eq!((info.width, info.height), (1200, 800));
    }
}
