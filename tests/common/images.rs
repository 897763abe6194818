//! Test images: complete, valid files built by hand (every chunk, segment and block in place,
//! PNG CRCs right), made unique by a seed so each upload is a new blob. Chitram walks a file's
//! structure to its end but never decodes pixels, so the image data itself is filler.

/// Appends a PNG chunk: length, type, data, CRC-32 of type and data.
pub fn png_chunk(bytes: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(kind);
    bytes.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    bytes.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// The signature, the IHDR of a `width × height` image, and a tEXt chunk holding `seed`.
fn png_head(width: u32, height: u32, seed: u64) -> Vec<u8> {
    png_head_of_depth(width, height, 8, seed)
}

/// As [`png_head`], RGBA of `depth` bits a channel.
fn png_head_of_depth(width: u32, height: u32, depth: u8, seed: u64) -> Vec<u8> {
    let mut header = width.to_be_bytes().to_vec();
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[depth, 6, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    png_chunk(&mut bytes, b"IHDR", &header);
    let mut text = b"seed\0".to_vec();
    text.extend_from_slice(seed.to_string().as_bytes());
    png_chunk(&mut bytes, b"tEXt", &text);
    bytes
}

/// Bytes of a PNG chunk besides its data.
const CHUNK_FRAME: usize = 12;

/// A complete PNG of `width × height` whose bytes depend on `seed`.
pub fn png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    png_of_depth(width, height, 8, seed)
}

/// As [`png`], of `depth` (8 or 16) bits a channel.
pub fn png_of_depth(width: u32, height: u32, depth: u8, seed: u64) -> Vec<u8> {
    let mut bytes = png_head_of_depth(width, height, depth, seed);
    png_chunk(&mut bytes, b"IDAT", b"\x78\x9c\x63\x00\x00\x00\x01\x00\x01");
    png_chunk(&mut bytes, b"IEND", b"");
    bytes
}

/// A complete PNG of exactly `len` bytes (at least a few hundred), its IDAT chunks filled with
/// deterministic noise, produced a piece at a time (at most 64 KiB each) so that a test can
/// stream a large one without holding it whole.
pub fn png_pieces(len: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    const PIECE: usize = 64 * 1024;
    let head = png_head(4000, 3000, seed);
    assert!(len > head.len() + 2 * CHUNK_FRAME, "a PNG of {len} bytes is too short");
    let mut remaining = len - head.len() - CHUNK_FRAME; // What the IDAT chunks take, framing included.
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let idat = move || {
        if remaining == 0 {
            return None;
        }
        // A last chunk must have room for its frame: never leave less than one frame behind.
        let mut take = remaining.min(PIECE);
        if remaining - take > 0 && remaining - take <= CHUNK_FRAME {
            take -= CHUNK_FRAME + 1;
        }
        remaining -= take;
        let data: Vec<u8> = (0..take - CHUNK_FRAME)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let mut chunk = Vec::with_capacity(take);
        png_chunk(&mut chunk, b"IDAT", &data);
        Some(chunk)
    };
    let mut end = Vec::new();
    png_chunk(&mut end, b"IEND", b"");
    std::iter::once(head).chain(std::iter::from_fn(idat)).chain(std::iter::once(end))
}

/// A complete PNG of exactly `len` bytes.
pub fn large_png(len: usize, seed: u64) -> Vec<u8> {
    let bytes = png_pieces(len, seed).collect::<Vec<_>>().concat();
    assert_eq!(bytes.len(), len);
    bytes
}

/// A complete baseline JPEG of `width × height`: SOI, APP0, a comment holding `seed`, SOF0,
/// one scan, EOI.
pub fn jpeg(width: u16, height: u16, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
    bytes.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    bytes.extend_from_slice(&[0xFF, 0xFE, 0x00, 0x0A]);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
    bytes.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x0C, 0x03, 0x01, 0x00, 0x02, 0x11, 0x03, 0x11, 0x00, 0x3F, 0x00]);
    bytes.extend_from_slice(&[0xF0, 0x0F, 0x55, 0xFF, 0x00, 0x12]);
    bytes.extend_from_slice(&[0xFF, 0xD9]);
    bytes
}

/// A complete GIF89a of `width × height`: a two-colour table, one image, the trailer; `seed`
/// in a comment extension.
pub fn gif(width: u16, height: u16, seed: u64) -> Vec<u8> {
    let mut bytes = b"GIF89a".to_vec();
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&height.to_le_bytes());
    bytes.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF]);
    bytes.extend_from_slice(&[0x21, 0xFE, 8]);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(&[0, 0x2C, 0, 0, 0, 0]);
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&height.to_le_bytes());
    bytes.extend_from_slice(&[0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3B]);
    bytes
}

/// A complete lossless WebP of `width × height` (each at most 16384), `seed` in an EXIF chunk.
pub fn webp(width: u16, height: u16, seed: u64) -> Vec<u8> {
    let bits = u32::from(width - 1) | (u32::from(height - 1) << 14);
    let mut vp8l = vec![0x2F];
    vp8l.extend_from_slice(&bits.to_le_bytes());
    vp8l.extend_from_slice(&[0, 0, 0]);
    let mut chunks = b"VP8L".to_vec();
    chunks.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
    chunks.extend_from_slice(&vp8l);
    chunks.extend_from_slice(b"EXIF\x08\0\0\0");
    chunks.extend_from_slice(&seed.to_le_bytes());
    let mut bytes = b"RIFF".to_vec();
    bytes.extend_from_slice(&(4 + chunks.len() as u32).to_le_bytes());
    bytes.extend_from_slice(b"WEBP");
    bytes.extend_from_slice(&chunks);
    bytes
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A JPEG whose pixels really decode (the files above only have to satisfy the upload's
/// checks), for tests that make variants: `width × height` of one colour chosen by `seed`.
pub fn decodable_jpeg(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let colour = image::Rgb([(seed % 251) as u8, (seed / 251 % 251) as u8, 128]);
    let pixels = image::RgbImage::from_pixel(width, height, colour);
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut bytes).encode_image(&pixels).expect("a JPEG encodes");
    bytes
}
