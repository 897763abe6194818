//! Walking an image's container structure to its end without decoding pixels, so a file whose
//! header is intact but whose data is cut off or damaged is refused: PNG chunks with their CRCs
//! up to `IEND`, JPEG segments and entropy-coded data up to `EOI`, GIF blocks up to the trailer,
//! WebP's RIFF chunks up to the length the RIFF header declares.
//!
//! Reads through `BufRead`, a window at a time: memory stays flat whatever the file's size.
//! Blocking when the reader is a file.

use std::io::{BufRead, ErrorKind};

use super::format::ImageFormat;

/// Why a file is not a complete image of its format: said to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Incomplete(pub String);

type Walk<T = ()> = Result<T, Incomplete>;

/// Checks that `reader` holds a whole `format` file of `len` bytes.
pub fn check_complete(format: ImageFormat, reader: impl BufRead, len: u64) -> Walk {
    let mut reader = Counted { inner: reader, read: 0 };
    match format {
        ImageFormat::Png => walk_png(&mut reader),
        ImageFormat::Jpeg => walk_jpeg(&mut reader),
        ImageFormat::Gif => walk_gif(&mut reader),
        ImageFormat::Webp => walk_webp(&mut reader, len),
    }
}

fn incomplete<T>(reason: impl Into<String>) -> Walk<T> {
    Err(Incomplete(reason.into()))
}

/// A reader that knows how far it got, for messages.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: BufRead> Counted<R> {
    fn array<const N: usize>(&mut self, what: &str) -> Walk<[u8; N]> {
        let mut bytes = [0; N];
        self.inner.read_exact(&mut bytes).map_err(|error| cut(what, error))?;
        self.read += N as u64;
        Ok(bytes)
    }

    fn byte(&mut self, what: &str) -> Walk<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Passes over `len` bytes, handing each window to `see`.
    fn skip(&mut self, mut len: u64, what: &str, mut see: impl FnMut(&[u8])) -> Walk {
        while len > 0 {
            let window = self.inner.fill_buf().map_err(|error| cut(what, error))?;
            if window.is_empty() {
                return incomplete(format!("the file ends inside {what}"));
            }
            let take = window.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            see(&window[..take]);
            self.inner.consume(take);
            self.read += take as u64;
            len -= take as u64;
        }
        Ok(())
    }
}

fn cut(what: &str, error: std::io::Error) -> Incomplete {
    match error.kind() {
        ErrorKind::UnexpectedEof => Incomplete(format!("the file ends inside {what}")),
        _ => Incomplete(format!("reading {what} failed: {error}")),
    }
}

// PNG (ISO/IEC 15948): signature, then chunks of length, type, data and CRC-32 of type+data.

fn walk_png<R: BufRead>(reader: &mut Counted<R>) -> Walk {
    reader.array::<8>("the signature")?;
    let mut first = true;
    let mut image_data = false;
    loop {
        let len = u32::from_be_bytes(reader.array("a chunk's length")?);
        if len > i32::MAX as u32 {
            return incomplete(format!("a chunk at byte {} claims {len} bytes", reader.read - 4));
        }
        let kind: [u8; 4] = reader.array("a chunk's type")?;
        let name = String::from_utf8_lossy(&kind).into_owned();
        if first && &kind != b"IHDR" {
            return incomplete(format!("the first chunk is {name}, not IHDR"));
        }
        first = false;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&kind);
        reader.skip(u64::from(len), &format!("the {name} chunk"), |window| crc.update(window))?;
        let stored = u32::from_be_bytes(reader.array(&format!("the {name} chunk's CRC"))?);
        if stored != crc.finalize() {
            return incomplete(format!("the {name} chunk's CRC does not match its bytes"));
        }
        match &kind {
            b"IDAT" => image_data = true,
            b"IEND" if image_data => return Ok(()),
            b"IEND" => return incomplete("the file has no image data (IDAT)"),
            _ => {}
        }
    }
}

// JPEG (ITU T.81, Annex B): SOI, marker segments, entropy-coded data after each SOS, EOI.

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;

fn walk_jpeg<R: BufRead>(reader: &mut Counted<R>) -> Walk {
    if reader.array::<2>("the start of image")? != [0xFF, SOI] {
        return incomplete("no start-of-image marker");
    }
    let (mut frame, mut scan) = (false, false);
    let mut marker = next_marker(reader)?;
    loop {
        match marker {
            EOI if scan => return Ok(()),
            EOI => return incomplete("the file ends before any scan"),
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => {
                marker = next_marker(reader)?;
                continue;
            }
            SOI => return incomplete("a second start-of-image marker"),
            // SOF0–SOF15, less DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => frame = true,
            _ => {}
        }
        let what = format!("the segment of marker FF{marker:02X}");
        let len = u16::from_be_bytes(reader.array(&what)?);
        if len < 2 {
            return incomplete(format!("{what} has a length of {len}"));
        }
        reader.skip(u64::from(len - 2), &what, |_| {})?;
        if marker == SOS {
            if !frame {
                return incomplete("a scan comes before any frame header");
            }
            scan = true;
            marker = skip_entropy_coded_data(reader)?;
        } else {
            marker = next_marker(reader)?;
        }
    }
}

/// The next marker, where one must stand (fill bytes `FF` may precede it).
fn next_marker<R: BufRead>(reader: &mut Counted<R>) -> Walk<u8> {
    if reader.byte("a marker")? != 0xFF {
        return incomplete(format!("no marker at byte {}", reader.read - 1));
    }
    loop {
        match reader.byte("a marker")? {
            0xFF => continue,
            0x00 => return incomplete(format!("no marker at byte {}", reader.read - 2)),
            marker => return Ok(marker),
        }
    }
}

/// Passes over a scan's entropy-coded data, where `FF 00` is a stuffed `FF` and `FF D0`–`FF D7`
/// are restart markers, and returns the marker that ends it.
fn skip_entropy_coded_data<R: BufRead>(reader: &mut Counted<R>) -> Walk<u8> {
    const WHAT: &str = "the entropy-coded data";
    loop {
        let window = reader.inner.fill_buf().map_err(|error| cut(WHAT, error))?;
        if window.is_empty() {
            return incomplete(format!("the file ends inside {WHAT}"));
        }
        match memchr::memchr(0xFF, window) {
            None => {
                let len = window.len();
                reader.inner.consume(len);
                reader.read += len as u64;
            }
            Some(at) => {
                reader.inner.consume(at + 1);
                reader.read += at as u64 + 1;
                let mut next = reader.byte(WHAT)?;
                while next == 0xFF {
                    next = reader.byte(WHAT)?;
                }
                match next {
                    0x00 | 0xD0..=0xD7 => {}
                    marker => return Ok(marker),
                }
            }
        }
    }
}

// GIF (GIF89a): header, logical screen descriptor, optional global colour table, then image
// descriptors and extensions, each followed by data sub-blocks, up to the trailer 0x3B.

fn walk_gif<R: BufRead>(reader: &mut Counted<R>) -> Walk {
    reader.array::<6>("the header")?;
    let screen: [u8; 7] = reader.array("the logical screen descriptor")?;
    skip_colour_table(reader, screen[4], "the global colour table")?;
    let mut images = 0;
    loop {
        match reader.byte("a block")? {
            0x2C => {
                let descriptor: [u8; 9] = reader.array("an image descriptor")?;
                skip_colour_table(reader, descriptor[8], "a local colour table")?;
                reader.byte("the LZW code size")?;
                skip_sub_blocks(reader, "the image data")?;
                images += 1;
            }
            0x21 => {
                reader.byte("an extension label")?;
                skip_sub_blocks(reader, "an extension")?;
            }
            0x3B if images > 0 => return Ok(()),
            0x3B => return incomplete("the file has no image"),
            other => return incomplete(format!("unknown block 0x{other:02X} at byte {}", reader.read - 1)),
        }
    }
}

fn skip_colour_table<R: BufRead>(reader: &mut Counted<R>, flags: u8, what: &str) -> Walk {
    if flags & 0x80 != 0 {
        reader.skip(3 << ((flags & 0x07) + 1), what, |_| {})?;
    }
    Ok(())
}

fn skip_sub_blocks<R: BufRead>(reader: &mut Counted<R>, what: &str) -> Walk {
    loop {
        match reader.byte(what)? {
            0 => return Ok(()),
            len => reader.skip(u64::from(len), what, |_| {})?,
        }
    }
}

// WebP: a RIFF container: "RIFF", the length of what follows, "WEBP", then chunks of FourCC,
// length and data (padded to an even length), ending exactly where the RIFF length says.

fn walk_webp<R: BufRead>(reader: &mut Counted<R>, len: u64) -> Walk {
    reader.array::<4>("the RIFF header")?;
    let riff = u64::from(u32::from_le_bytes(reader.array("the RIFF length")?));
    if riff + 8 != len {
        return incomplete(format!("the RIFF header says {} bytes, the file has {len}", riff + 8));
    }
    reader.array::<4>("the WebP signature")?;
    let mut image = false;
    while reader.read < len {
        let kind: [u8; 4] = reader.array("a chunk's type")?;
        let name = String::from_utf8_lossy(&kind).into_owned();
        let size = u64::from(u32::from_le_bytes(reader.array(&format!("the {name} chunk's length"))?));
        reader.skip(size + (size & 1), &format!("the {name} chunk"), |_| {})?;
        image |= matches!(&kind, b"VP8 " | b"VP8L" | b"VP8X");
    }
    if reader.read != len {
        return incomplete("the last chunk runs past the RIFF length");
    }
    if !image {
        return incomplete("the file has no VP8, VP8L or VP8X chunk");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::format::samples;
    use super::*;

    fn check(format: ImageFormat, bytes: &[u8]) -> Walk {
        // A small buffer, so chunks and segments straddle refills.
        check_complete(format, std::io::BufReader::with_capacity(7, bytes), bytes.len() as u64)
    }

    fn every_truncation_fails(format: ImageFormat, bytes: &[u8]) {
        for cut in 0..bytes.len() {
            assert!(check(format, &bytes[..cut]).is_err(), "{format:?} cut at {cut} of {} passed", bytes.len());
        }
    }

    #[test]
    fn png_whole_truncated_and_with_a_bad_crc() {
        let png = samples::png(640, 480);
        assert_eq!(check(ImageFormat::Png, &png), Ok(()));
        every_truncation_fails(ImageFormat::Png, &png);
        // Cut right after IHDR: the header is intact, the image data is not there.
        let error = check(ImageFormat::Png, &png[..33]).unwrap_err();
        assert!(error.0.contains("ends inside"), "{error}");
        let mut bad = png.clone();
        bad[40] ^= 1; // A byte of the IDAT data.
        assert!(check(ImageFormat::Png, &bad).unwrap_err().0.contains("CRC"));
    }

    #[test]
    fn jpeg_whole_truncated_and_corrupt() {
        let jpeg = samples::jpeg(33, 17);
        assert_eq!(check(ImageFormat::Jpeg, &jpeg), Ok(()));
        every_truncation_fails(ImageFormat::Jpeg, &jpeg);
        let mut corrupt = jpeg.clone();
        let sof = corrupt.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        corrupt[sof + 3] = 0xFF; // The frame header claims more bytes than there are.
        assert!(check(ImageFormat::Jpeg, &corrupt).is_err());
    }

    #[test]
    fn jpeg_entropy_coded_data_may_hold_stuffed_bytes_and_restarts() {
        let mut jpeg = samples::jpeg(8, 8);
        let eoi = jpeg.len() - 2;
        jpeg.splice(eoi..eoi, [0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56, 0xFF, 0xFF, 0xD4, 0x78]);
        assert_eq!(check(ImageFormat::Jpeg, &jpeg), Ok(()));
    }

    #[test]
    fn gif_whole_and_truncated() {
        let gif = samples::gif(10, 5);
        assert_eq!(check(ImageFormat::Gif, &gif), Ok(()));
        every_truncation_fails(ImageFormat::Gif, &gif);
    }

    #[test]
    fn webp_whole_truncated_and_with_a_wrong_length() {
        let webp = samples::webp(10, 5);
        assert_eq!(check(ImageFormat::Webp, &webp), Ok(()));
        every_truncation_fails(ImageFormat::Webp, &webp);
        let mut long = webp.clone();
        long.extend_from_slice(b"junk");
        assert!(check(ImageFormat::Webp, &long).is_err());
    }
}
