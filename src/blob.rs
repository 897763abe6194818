//! The vocabulary every layer shares: a blob's identity.
//!
//! A blob is the stored bytes of one or more images. It is content-addressed: its key is the
//! lowercase hex SHA-256 of its bytes, so identical uploads share one blob (DESIGN invariant 7).

use std::fmt;

/// The SHA-256 of a blob's bytes, as 64 lowercase hex characters. Also the blob's storage key.
///
/// Parsing is the only way to build one from text, so a `BlobKey` can never hold a path
/// separator or `..`: backends may use it in paths and object names without escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a blob key is 64 lowercase hex characters (a SHA-256), got {0:?}")]
pub struct InvalidBlobKey(String);

impl BlobKey {
    /// Parses a key from text: exactly 64 lowercase hex digits.
    pub fn parse(text: &str) -> Result<Self, InvalidBlobKey> {
        let well_formed = text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if well_formed { Ok(Self(text.to_owned())) } else { Err(InvalidBlobKey(text.chars().take(80).collect())) }
    }

    /// The key of a finished SHA-256 digest.
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        Self(hex::encode(digest))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for BlobKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_sha256_hex_digest() {
        let key = BlobKey::from_digest(&[0xab; 32]);
        assert_eq!(BlobKey::parse(key.as_str()), Ok(key));
    }

    #[test]
    fn rejects_anything_that_could_escape_a_directory() {
        for bad in ["", "../etc/passwd", &"A".repeat(64), &"a".repeat(63), &format!("{}/", "a".repeat(63))] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
