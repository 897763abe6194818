//! Signed URLs: a link to one private image that works without credentials until it expires.
//! The signature is HMAC-SHA256 over the image id and the expiry, with a key derived from the
//! store's token secret, so every instance checks what any instance signed.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Separates this key from the token key derived from the same secret.
const PURPOSE: &[u8] = b"chitram signed URL v1";

/// What a signature says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    Valid,
    /// Ours, for this image, but past its expiry.
    Expired,
    /// Not ours, or not for this image or expiry: as if there were none.
    Invalid,
}

pub struct UrlSigner {
    key: Vec<u8>,
}

impl UrlSigner {
    pub fn new(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(PURPOSE);
        Self { key: mac.finalize().into_bytes().to_vec() }
    }

    /// The signature of `image` until `expires` (Unix seconds), hex.
    pub fn sign(&self, image: Uuid, expires: i64) -> String {
        hex::encode(self.mac(image, expires).finalize().into_bytes())
    }

    /// Whether `signature` is this store's for `image` until `expires`, and whether that is
    /// past. The comparison takes the same time wherever the signature differs.
    pub fn verify(&self, image: Uuid, expires: i64, signature: &str, now: DateTime<Utc>) -> Signature {
        let Ok(signature) = hex::decode(signature) else { return Signature::Invalid };
        if self.mac(image, expires).verify_slice(&signature).is_err() {
            Signature::Invalid
        } else if expires < now.timestamp() {
            Signature::Expired
        } else {
            Signature::Valid
        }
    }

    fn mac(&self, image: Uuid, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(image.as_bytes());
        mac.update(&expires.to_be_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_image_until_its_expiry() {
        let signer = UrlSigner::new(b"a secret of some length, for tests");
        let (image, other) = (Uuid::now_v7(), Uuid::now_v7());
        let now = Utc::now();
        let expires = now.timestamp() + 60;
        let signature = signer.sign(image, expires);
        assert_eq!(signer.verify(image, expires, &signature, now), Signature::Valid);
        assert_eq!(signer.verify(other, expires, &signature, now), Signature::Invalid, "another image");
        assert_eq!(signer.verify(image, expires + 1, &signature, now), Signature::Invalid, "a longer expiry");
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(signer.verify(image, expires, &signature, later), Signature::Expired);
        assert_eq!(signer.verify(image, expires, "zz", now), Signature::Invalid, "not hex");
        let stranger = UrlSigner::new(b"another store's secret, for tests");
        assert_eq!(stranger.verify(image, expires, &signature, now), Signature::Invalid, "another store's key");
    }
}
