//! Test images: valid headers built by hand, made unique by a seed so each upload is a new blob.

/// A PNG of `width × height` whose trailing bytes depend on `seed`. Only the header is read by
/// Chitram, so no pixel data is needed.
pub fn png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes
}

/// A PNG of about `len` bytes (the header, then deterministic noise).
pub fn large_png(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = png(4000, 3000, seed);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    while bytes.len() < len {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// A baseline JPEG header (SOI, APP0, SOF0) of `width × height`.
pub fn jpeg(width: u16, height: u16, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
    bytes.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(&[0xFF, 0xD9]);
    bytes
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
