//! Secrets a user holds: API keys and passwords, and how each is checked.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::AuthError;

/// Every API key starts with this, so a leaked one is easy to recognise (and to scan for).
pub const KEY_PREFIX: &str = "chm_";
/// Random bytes in a key.
const KEY_BYTES: usize = 32;
/// How much of a key its listing shows.
const SHOWN_PREFIX_LEN: usize = 12;

/// A new API key: the secret goes to its creator once; only the hash is kept.
pub struct IssuedKey {
    pub secret: String,
    pub hash: String,
    pub prefix: String,
}

fn random_bytes<const N: usize>(context: &'static str) -> Result<[u8; N], AuthError> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(|e| AuthError::Internal { context, source: Box::new(e) })?;
    Ok(bytes)
}

pub fn issue_key() -> Result<IssuedKey, AuthError> {
    let bytes: [u8; KEY_BYTES] = random_bytes("drawing a random key")?;
    let secret = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    Ok(IssuedKey { hash: key_hash(&secret), prefix: secret[..SHOWN_PREFIX_LEN].to_owned(), secret })
}

/// SHA-256 of a key, hex. A key has 256 random bits, so a fast hash is enough: no one can
/// guess one, unlike a password.
pub fn key_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn looks_like_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

/// Random bytes for a secret, base64url.
pub fn random_secret() -> Result<String, AuthError> {
    let bytes: [u8; 32] = random_bytes("drawing a random secret")?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn new_salt() -> Result<SaltString, String> {
    let bytes: [u8; 16] = random_bytes("drawing a salt").map_err(|e| e.to_string())?;
    SaltString::encode_b64(&bytes).map_err(|e| e.to_string())
}

pub fn check_password_rules(password: &str) -> Result<(), AuthError> {
    // The upper bound keeps a megabyte "password" from costing a megabyte of hashing.
    if (8..=1024).contains(&password.len()) { Ok(()) } else { Err(AuthError::InvalidPassword) }
}

/// Argon2 runs (hashes and checks) at once in the process; the rest wait their turn. Each
/// takes 19 MiB: without a bound, a burst of logins under different usernames (each has its
/// own rate-limit bucket) would take that much memory apiece.
const ARGON2_AT_ONCE: usize = 4;
static ARGON2_SLOTS: Semaphore = Semaphore::const_new(ARGON2_AT_ONCE);

/// Runs `work` (an Argon2 run) on the blocking pool once a slot is free.
async fn run_argon2<T: Send + 'static>(
    context: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AuthError> {
    let _slot = ARGON2_SLOTS.acquire().await.expect("the slots are never closed");
    tokio::task::spawn_blocking(work).await.map_err(|e| AuthError::Internal { context, source: Box::new(e) })
}

/// Argon2id (the crate's defaults: 19 MiB, two passes), off the async threads.
pub async fn hash_password(password: String) -> Result<String, AuthError> {
    let hashed = run_argon2("hashing a password", move || {
        let salt = new_salt()?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| e.to_string())
    })
    .await?;
    hashed.map_err(|e| AuthError::Internal { context: "hashing a password", source: e.into() })
}

/// A hash of nothing anyone knows, verified when the user does not exist or has no password,
/// so that such a login costs what a wrong password costs.
static DECOY_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = new_salt().expect("the system has randomness");
    Argon2::default()
        .hash_password(b"decoy: this password is never anyone's", &salt)
        .map(|hash| hash.to_string())
        .expect("Argon2 with default parameters hashes")
});

/// Whether `password` matches `hash`. With no hash, the decoy is checked (and fails) in the
/// same time.
pub async fn verify_password(password: String, hash: Option<String>) -> Result<bool, AuthError> {
    run_argon2("checking a password", move || {
        let known = hash.is_some();
        let stored = hash.unwrap_or_else(|| DECOY_HASH.clone());
        let matches = PasswordHash::new(&stored)
            .is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok());
        known && matches
    })
    .await
}

/// Computes the decoy hash ahead of the first login, so that login is not the slow one.
pub fn warm_up() {
    LazyLock::force(&DECOY_HASH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_random_and_hashed() {
        let a = issue_key().unwrap();
        let b = issue_key().unwrap();
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 43, "32 bytes of base64url");
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, key_hash(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert!(a.secret.starts_with(&a.prefix));
        assert!(!a.hash.contains(&a.secret[4..]));
    }

    #[tokio::test]
    async fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), Some(hash.clone())).await.unwrap());
        assert!(!verify_password("wrong horse".into(), Some(hash)).await.unwrap());
        assert!(!verify_password("decoy: this password is never anyone's".into(), None).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_checks_runs_a_few_at_a_time_and_each_gets_its_answer() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        let checks: Vec<_> = (0..12)
            .map(|i| {
                let (guess, hash) = (if i % 2 == 0 { "correct horse" } else { "wrong horse" }, hash.clone());
                tokio::spawn(verify_password(guess.into(), Some(hash)))
            })
            .collect();
        // While twelve wait on four slots, every slot is taken.
        let taken = async {
            while ARGON2_SLOTS.available_permits() != 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), taken).await.expect("the slots are taken");
        for (i, check) in checks.into_iter().enumerate() {
            assert_eq!(check.await.unwrap().unwrap(), i % 2 == 0);
        }
        // (Other tests of this process hash too: wait for theirs.)
        let back = async {
            while ARGON2_SLOTS.available_permits() != ARGON2_AT_ONCE {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), back).await.expect("all come back");
    }

    #[test]
    fn password_length_is_bounded() {
        assert!(check_password_rules("short").is_err());
        assert!(check_password_rules("long enough").is_ok());
        assert!(check_password_rules(&"x".repeat(1025)).is_err());
    }
}
