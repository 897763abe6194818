//! A JPEG's frame header, read for the one cost of a decode that no decoder bounds: a
//! progressive JPEG's scans each refine every block of the image, so the decoder keeps every
//! coefficient of every component until the last scan (2 bytes each, 64 a block), whatever
//! scale it decodes at. That is 6 bytes a pixel at 4:4:4, more than the pixel limit's budget
//! of 4, and `jpeg-decoder` allocates it without consulting its buffer limit.
//!
//! Written here rather than taken from the decoder: `jpeg-decoder` parses the same header but
//! does not expose the components' sampling factors, and the walk to the frame header is a
//! few lines over bytes the upload already checked to be a JPEG.

/// The bytes a decoder holds in coefficients for a progressive JPEG; `None` for a sequential
/// one (decoded a row of blocks at a time) or one whose frame header cannot be read (the
/// decoder will refuse it).
pub fn progressive_coefficient_bytes(source: &[u8]) -> Option<u64> {
    let frame = frame_header(source)?;
    frame.progressive.then(|| frame.coefficient_bytes())
}

/// What the start-of-frame segment says.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    progressive: bool,
    width: u64,
    height: u64,
    /// Each component's (horizontal, vertical) sampling factors.
    sampling: Vec<(u64, u64)>,
}

impl Frame {
    /// Every component's blocks, padded to whole MCUs as the decoder lays them out.
    fn coefficient_bytes(&self) -> u64 {
        let h_max = self.sampling.iter().map(|&(h, _)| h).max().unwrap_or(1).max(1);
        let v_max = self.sampling.iter().map(|&(_, v)| v).max().unwrap_or(1).max(1);
        let mcus_across = self.width.div_ceil(8 * h_max);
        let mcus_down = self.height.div_ceil(8 * v_max);
        let blocks: u64 = self.sampling.iter().map(|&(h, v)| mcus_across * h * mcus_down * v).sum();
        blocks * 64 * 2
    }
}

/// Walks the marker segments from the start of image to the first start of frame, as the
/// decoder does: bytes between segments that are not a marker are skipped, not refused (a
/// parser stricter than the decoder would let a file it gives up on be decoded unchecked).
fn frame_header(source: &[u8]) -> Option<Frame> {
    let mut rest = source.strip_prefix(&[0xFF, 0xD8])?;
    loop {
        // Anything up to the next 0xFF, then fill bytes (any number of 0xFF), then a marker.
        let ff = rest.iter().position(|&byte| byte == 0xFF)?;
        rest = &rest[ff..];
        let start = rest.iter().position(|&byte| byte != 0xFF)?;
        let marker = rest[start];
        rest = &rest[start + 1..];
        match marker {
            0x00 | 0x01 | 0xD0..=0xD7 => continue, // A stuffed byte, or a marker with no segment.
            0xD8..=0xDA => return None,            // Another image start, its end or its data: no frame.
            _ => {}
        }
        let length = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let segment = rest.get(2..length)?;
        if is_start_of_frame(marker) {
            return parse_frame(marker, segment);
        }
        rest = &rest[length..];
    }
}

/// SOF0 to SOF15, without the three markers of that range that are not frames (DHT, JPG, DAC).
fn is_start_of_frame(marker: u8) -> bool {
    (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

fn parse_frame(marker: u8, segment: &[u8]) -> Option<Frame> {
    let height = u64::from(u16::from_be_bytes([*segment.get(1)?, *segment.get(2)?]));
    let width = u64::from(u16::from_be_bytes([*segment.get(3)?, *segment.get(4)?]));
    let count = usize::from(*segment.get(5)?);
    let components = segment.get(6..6 + 3 * count)?;
    let sampling = components.chunks_exact(3).map(|c| (u64::from(c[1] >> 4), u64::from(c[1] & 0x0F))).collect();
    // SOF2, SOF6, SOF10 and SOF14: progressive, with Huffman or arithmetic coding.
    let progressive = matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
    Some(Frame { progressive, width, height, sampling })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG's first segments: an APP0, then a frame header of `marker`.
    fn header(marker: u8, width: u16, height: u16, sampling: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, b'J', b'F'];
        let length = 8 + 3 * sampling.len() as u16;
        bytes.extend([0xFF, 0xFF, marker]); // With a fill byte, as encoders may write.
        bytes.extend(length.to_be_bytes());
        bytes.push(8);
        bytes.extend(height.to_be_bytes());
        bytes.extend(width.to_be_bytes());
        bytes.push(sampling.len() as u8);
        for (id, factors) in sampling.iter().enumerate() {
            bytes.extend([id as u8 + 1, *factors, 0]);
        }
        bytes.extend([0xFF, 0xDA]);
        bytes
    }

    #[test]
    fn a_progressive_frame_counts_every_block_of_every_component() {
        // 4:4:4: three full-size components, 2 bytes a coefficient: 6 bytes a pixel.
        let full = header(0xC2, 800, 600, &[0x11, 0x11, 0x11]);
        assert_eq!(progressive_coefficient_bytes(&full), Some(800 * 600 * 6));
        // 4:2:0: chroma at a quarter, padded to whole 16×16 MCUs: 3 bytes a pixel.
        let subsampled = header(0xC2, 800, 600, &[0x22, 0x11, 0x11]);
        assert_eq!(progressive_coefficient_bytes(&subsampled), Some(800 * 608 * 3));
        // Grey, with a partial block at the edge.
        assert_eq!(progressive_coefficient_bytes(&header(0xC2, 9, 9, &[0x11])), Some(16 * 16 * 2));
    }

    #[test]
    fn junk_between_segments_is_skipped_as_the_decoder_skips_it() {
        let mut bytes = header(0xC2, 800, 600, &[0x11, 0x11, 0x11]);
        bytes.insert(8, 0x42); // After the APP0 segment, before the frame header's fill byte.
        bytes.insert(8, 0x00);
        assert_eq!(progressive_coefficient_bytes(&bytes), Some(800 * 600 * 6));
    }

    #[test]
    fn a_sequential_or_unreadable_jpeg_has_no_coefficients_to_hold() {
        assert_eq!(progressive_coefficient_bytes(&header(0xC0, 800, 600, &[0x11, 0x11, 0x11])), None);
        assert_eq!(progressive_coefficient_bytes(&header(0xC1, 800, 600, &[0x11])), None);
        let truncated = header(0xC2, 800, 600, &[0x11, 0x11, 0x11]);
        assert_eq!(progressive_coefficient_bytes(&truncated[..truncated.len() - 6]), None);
        assert_eq!(progressive_coefficient_bytes(b"\x89PNG\r\n\x1a\n"), None);
        assert_eq!(progressive_coefficient_bytes(&[0xFF, 0xD8, 0xFF, 0xDA]), None);
    }
}
