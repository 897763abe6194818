//! The account use cases, over the metadata store: authenticate a request's credentials,
//! register, log in, manage API keys, sign URLs, and check a quota before an upload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use uuid::Uuid;

use super::credentials::{self, IssuedKey};
use super::signed_url::{Signature, UrlSigner};
use super::tokens::{AccessToken, ExternalIdentity, ExternalIssuer, ExternalIssuerError, TokenIssuer};
use super::{AuthError, Caller, Identity};
use crate::config::AuthSettings;
use crate::metadata::{ApiKey, ImageOwner, MetadataError, MetadataStore, NewApiKey, NewUser, Quota, Role, User};

/// Most entries the credential cache keeps before it starts over (bounded memory whatever
/// the number of keys in use).
const CACHE_CAPACITY: usize = 10_000;
/// How old a checked credential may be and still be accepted while the database is down: an
/// admin can still read `/health` in full during an outage, and nothing else the database
/// would say can be acted on meanwhile.
const STALE_WHILE_UNAVAILABLE: Duration = Duration::from_secs(600);

/// A user's account as `GET /api/v1/auth/me` shows it: usage against the quota in force.
#[derive(Debug, Clone)]
pub struct Account {
    pub user: User,
    pub quota: Quota,
}

/// A signed URL and when it stops working.
#[derive(Debug, Clone)]
pub struct SignedUrl {
    pub expires: i64,
    pub signature: String,
}

pub struct Accounts {
    metadata: Arc<dyn MetadataStore>,
    enabled: bool,
    open_registration: bool,
    default_quota: Quota,
    signed_url_max: Duration,
    tokens: TokenIssuer,
    external: Option<ExternalIssuer>,
    signer: UrlSigner,
    cache: CredentialCache,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountsStartError {
    #[error("cannot read the token secret")]
    Secret(#[source] AuthError),
    #[error("auth.external is unusable")]
    External(#[from] ExternalIssuerError),
}

impl Accounts {
    pub async fn new(settings: &AuthSettings, metadata: Arc<dyn MetadataStore>) -> Result<Self, AccountsStartError> {
        let secret = match &settings.token_secret {
            Some(secret) => secret.clone(),
            None => shared_secret(metadata.as_ref()).await.map_err(AccountsStartError::Secret)?,
        };
        let external = settings.external.as_ref().map(ExternalIssuer::from_settings).transpose()?;
        let limit = |value: u64| (value > 0).then_some(value);
        credentials::warm_up();
        Ok(Self {
            metadata,
            enabled: settings.enabled,
            open_registration: settings.open_registration,
            default_quota: Quota {
                bytes: limit(settings.default_quota_bytes),
                images: limit(settings.default_quota_images),
            },
            signed_url_max: Duration::from_secs(settings.signed_url_max_secs),
            tokens: TokenIssuer::new(secret.as_bytes(), Duration::from_secs(settings.token_ttl_secs)),
            external,
            signer: UrlSigner::new(secret.as_bytes()),
            cache: CredentialCache::new(Duration::from_secs(settings.credential_cache_secs)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn open_registration(&self) -> bool {
        self.open_registration
    }

    /// The caller a request's bearer token names (`None`: the request carried none).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, AuthError> {
        if !self.enabled {
            return Ok(Caller::Open);
        }
        let Some(token) = bearer else { return Ok(Caller::Anonymous) };
        let cache_key = credentials::key_hash(token);
        let is_key = credentials::looks_like_key(token);
        // A token's signature and expiry are checked on every use, cached or not: it is local
        // work, and a cached entry must not outlive the token (nor does a stale one, below).
        let cached = self.cache.get(&cache_key).filter(|_| is_key || self.token_verifies(token));
        if let Some((caller, age)) = &cached
            && *age < self.cache.ttl
        {
            return Ok(caller.clone());
        }
        let identified = if is_key { self.identify_key(&cache_key).await } else { self.identify_token(token).await };
        let identity = match (identified, cached) {
            (Ok(identity), _) => identity,
            (Err(AuthError::Metadata(error)), Some((caller, age)))
                if error.is_unavailable() && age < STALE_WHILE_UNAVAILABLE =>
            {
                tracing::warn!(%error, "the database is unavailable: accepting a credential checked before");
                return Ok(caller);
            }
            (Err(error), _) => {
                // Refused now (revoked, disabled, expired): no outage later may bring it back.
                if !matches!(error, AuthError::Metadata(_)) {
                    self.cache.remove(&cache_key);
                }
                return Err(error);
            }
        };
        let caller = Caller::User(identity);
        // A token's cache entry never outlives the cache period; the token's own expiry is
        // checked again when it is next seen after that, and tokens live minutes.
        self.cache.put(cache_key, caller.clone());
        Ok(caller)
    }

    /// Whether a token (not an API key) still carries a valid signature and has not expired,
    /// as this store's own or the external issuer's.
    fn token_verifies(&self, token: &str) -> bool {
        self.tokens.verify(token).is_ok()
            || self.external.as_ref().is_some_and(|external| external.verify(token).is_ok())
    }

    async fn identify_key(&self, key_hash: &str) -> Result<Identity, AuthError> {
        let (key, user) = self
            .metadata
            .find_api_key(key_hash)
            .await?
            .ok_or(AuthError::InvalidCredentials { reason: "unknown or revoked API key" })?;
        live(&user)?;
        // Recorded once per cache period, not on every request.
        if let Err(error) = self.metadata.touch_api_key(key.id).await {
            tracing::warn!(key = %key.id, %error, "could not record an API key's use");
        }
        Ok(Identity { user: user.id, username: user.username, role: user.role, key: Some(key.id) })
    }

    async fn identify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let own = self.tokens.verify(token);
        let user = match (own, &self.external) {
            (Ok(id), _) => self.metadata.find_user(id).await?,
            (Err(own_error), Some(external)) => match external.verify(token) {
                Ok(identity) => Some(self.external_user(identity).await?),
                // Report the reason for this store's own tokens, the usual case.
                Err(_) => return Err(own_error),
            },
            (Err(error), None) => return Err(error),
        };
        let user = user.ok_or(AuthError::InvalidCredentials { reason: "the token's user no longer exists" })?;
        live(&user)?;
        Ok(Identity { user: user.id, username: user.username, role: user.role, key: None })
    }

    /// The local user of an external identity, created on first sight.
    async fn external_user(&self, identity: ExternalIdentity) -> Result<User, AuthError> {
        if let Some(user) = self.metadata.find_user_by_external_subject(&identity.subject).await? {
            return Ok(user);
        }
        // The username claim may be taken locally, or not be a name a user may have (any
        // length or character an issuer allows): fall back to a name derived from the subject.
        let claimed = check_username(&identity.username).is_ok().then(|| identity.username.clone());
        for username in claimed.into_iter().chain([format!("ext-{}", short_hash(&identity.subject))]) {
            let new = new_user(username, None, Role::User, Some(identity.subject.clone()));
            if let Some(user) = self.metadata.create_user(&new).await? {
                tracing::info!(user = %user.username, "created a user for an external identity");
                return Ok(user);
            }
            // Another request may have created it meanwhile.
            if let Some(user) = self.metadata.find_user_by_external_subject(&identity.subject).await? {
                return Ok(user);
            }
        }
        Err(AuthError::InvalidCredentials { reason: "no local username is free for the external identity" })
    }

    pub async fn register(&self, username: &str, password: &str) -> Result<User, AuthError> {
        if !self.enabled || !self.open_registration {
            return Err(AuthError::RegistrationClosed);
        }
        self.create_user(username, Some(password), Role::User).await
    }

    /// Creates a user (the CLI, and registration).
    pub async fn create_user(&self, username: &str, password: Option<&str>, role: Role) -> Result<User, AuthError> {
        check_username(username)?;
        let hash = match password {
            Some(password) => {
                credentials::check_password_rules(password)?;
                Some(credentials::hash_password(password.to_owned()).await?)
            }
            None => None,
        };
        self.metadata
            .create_user(&new_user(username.to_owned(), hash, role, None))
            .await?
            .ok_or_else(|| AuthError::UsernameTaken(username.to_owned()))
    }

    /// A token for a username and password. An unknown user, a user without a password and a
    /// wrong password get the same answer after the same work (one Argon2 verification).
    pub async fn login(&self, username: &str, password: &str) -> Result<AccessToken, AuthError> {
        let lookup = password.len() <= 1024 && could_name_a_user(username);
        let found = if lookup { self.metadata.find_user_by_name(username).await? } else { None };
        let hash = found.as_ref().and_then(|found| found.password_hash.clone());
        let matches = credentials::verify_password(password.to_owned(), hash).await?;
        match found {
            Some(found) if matches && !found.user.disabled => self.tokens.issue(&found.user),
            _ => Err(AuthError::WrongPassword),
        }
    }

    pub async fn account(&self, caller: &Caller) -> Result<Account, AuthError> {
        let identity = caller.user().ok_or(AuthError::MissingCredentials)?;
        let user = self
            .metadata
            .find_user(identity.user)
            .await?
            .ok_or(AuthError::InvalidCredentials { reason: "the user no longer exists" })?;
        Ok(self.account_of(user))
    }

    pub fn account_of(&self, user: User) -> Account {
        let quota = if user.role == Role::Admin { Quota::default() } else { user.quota.effective(self.default_quota) };
        Account { user, quota }
    }

    pub async fn create_key(&self, caller: &Caller, name: &str) -> Result<(ApiKey, String), AuthError> {
        let identity = caller.user().ok_or(AuthError::MissingCredentials)?;
        self.create_key_for(identity.user, name).await
    }

    /// Creates a key for a user; the secret is returned once and never kept.
    pub async fn create_key_for(&self, user: Uuid, name: &str) -> Result<(ApiKey, String), AuthError> {
        check_key_name(name)?;
        let IssuedKey { secret, hash, prefix } = credentials::issue_key()?;
        let key = NewApiKey {
            id: Uuid::now_v7(),
            user_id: user,
            name: name.to_owned(),
            key_hash: hash,
            prefix,
            created_at: Utc::now().trunc_subsecs(6),
        };
        Ok((self.metadata.create_api_key(&key).await?, secret))
    }

    pub async fn list_keys(&self, caller: &Caller) -> Result<Vec<ApiKey>, AuthError> {
        let identity = caller.user().ok_or(AuthError::MissingCredentials)?;
        Ok(self.metadata.list_api_keys(identity.user).await?)
    }

    /// Revokes one of the caller's keys. It stops working here at once; on other instances
    /// within `auth.credential_cache_secs`.
    pub async fn revoke_key(&self, caller: &Caller, key: Uuid) -> Result<(), AuthError> {
        let identity = caller.user().ok_or(AuthError::MissingCredentials)?;
        if !self.metadata.revoke_api_key(Some(identity.user), key).await? {
            return Err(AuthError::KeyNotFound);
        }
        self.cache.clear();
        Ok(())
    }

    /// The owner an upload by `caller` records, with the quota it must fit in; `None` with
    /// accounts off.
    pub fn upload_owner(&self, caller: &Caller) -> Result<Option<ImageOwner>, AuthError> {
        match caller {
            Caller::Open => Ok(None),
            Caller::Anonymous => Err(AuthError::MissingCredentials),
            Caller::User(identity) => Ok(Some(ImageOwner {
                user: identity.user,
                default_quota: self.default_quota,
                unlimited: identity.role == Role::Admin,
            })),
        }
    }

    /// A user by name, for an admin's `owner=` filter.
    pub async fn user_named(&self, username: &str) -> Result<User, AuthError> {
        if !could_name_a_user(username) {
            return Err(AuthError::UserNotFound(username.chars().take(64).collect()));
        }
        let found = self.metadata.find_user_by_name(username).await?;
        found.map(|found| found.user).ok_or_else(|| AuthError::UserNotFound(username.to_owned()))
    }

    pub fn sign_url(&self, image: Uuid, expires_in: Option<u64>) -> Result<SignedUrl, AuthError> {
        let max = self.signed_url_max.as_secs();
        let seconds = expires_in.unwrap_or(3600.min(max));
        if seconds == 0 || seconds > max {
            return Err(AuthError::InvalidExpiry { max });
        }
        let expires = Utc::now().timestamp().saturating_add(i64::try_from(seconds).unwrap_or(i64::MAX));
        Ok(SignedUrl { expires, signature: self.signer.sign(image, expires) })
    }

    pub fn check_signature(&self, image: Uuid, expires: i64, signature: &str) -> Signature {
        self.signer.verify(image, expires, signature, Utc::now())
    }

    /// Forgets every cached credential (after a key is revoked or a user disabled here).
    pub fn forget_cached_credentials(&self) {
        self.cache.clear();
    }
}

fn live(user: &User) -> Result<(), AuthError> {
    if user.disabled { Err(AuthError::InvalidCredentials { reason: "the user is disabled" }) } else { Ok(()) }
}

fn new_user(username: String, password_hash: Option<String>, role: Role, external: Option<String>) -> NewUser {
    NewUser {
        id: Uuid::now_v7(),
        username,
        password_hash,
        role,
        external_subject: external,
        created_at: Utc::now().trunc_subsecs(6),
    }
}

/// Whether a name could be a stored user's. None is longer than 256 bytes or holds a control
/// character, and looking one up would be a 500 on Postgres, which refuses a NUL in text.
fn could_name_a_user(username: &str) -> bool {
    username.len() <= 256 && !username.chars().any(char::is_control)
}

pub fn check_username(username: &str) -> Result<(), AuthError> {
    let valid = (3..=64).contains(&username.len())
        && username.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'));
    if valid { Ok(()) } else { Err(AuthError::InvalidUsername) }
}

fn check_key_name(name: &str) -> Result<(), AuthError> {
    let valid = !name.trim().is_empty() && name.chars().count() <= 100 && !name.chars().any(char::is_control);
    if valid { Ok(()) } else { Err(AuthError::InvalidKeyName) }
}

fn short_hash(text: &str) -> String {
    credentials::key_hash(text)[..12].to_owned()
}

/// The token secret every instance shares, created on first use.
async fn shared_secret(metadata: &dyn MetadataStore) -> Result<String, AuthError> {
    let candidate = credentials::random_secret()?;
    metadata.auth_secret(&candidate).await.map_err(AuthError::from)
}

/// Credentials checked recently, by the SHA-256 of the bearer token, so that a client's every
/// request does not cost a database lookup (the small-GET budget of issue 12 is 5%).
struct CredentialCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl CredentialCache {
    fn new(ttl: Duration) -> Self {
        Self { ttl, entries: Mutex::default() }
    }

    /// The caller this credential was found to be, and how long ago.
    fn get(&self, key: &str) -> Option<(Caller, Duration)> {
        let entries = self.entries.lock().expect("the credential cache lock is never poisoned");
        entries.get(key).map(|(caller, at)| (caller.clone(), at.elapsed()))
    }

    fn put(&self, key: String, caller: Caller) {
        let mut entries = self.entries.lock().expect("the credential cache lock is never poisoned");
        if entries.len() >= CACHE_CAPACITY {
            entries.retain(|_, (_, at)| at.elapsed() < STALE_WHILE_UNAVAILABLE);
            if entries.len() >= CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (caller, Instant::now()));
    }

    fn remove(&self, key: &str) {
        self.entries.lock().expect("the credential cache lock is never poisoned").remove(key);
    }

    fn clear(&self) {
        self.entries.lock().expect("the credential cache lock is never poisoned").clear();
    }
}

impl From<MetadataError> for AccountsStartError {
    fn from(error: MetadataError) -> Self {
        AccountsStartError::Secret(AuthError::Metadata(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_and_key_names_are_checked() {
        assert!(check_username("alice").is_ok());
        assert!(check_username("a.b-c_d@example.org").is_ok());
        for bad in ["", "ab", "has space", "ünï", "semi;colon", &"x".repeat(65)] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
        assert!(check_key_name("laptop").is_ok());
        assert!(check_key_name(" ").is_err());
        assert!(check_key_name("new\nline").is_err());
    }
}
