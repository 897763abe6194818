//! Accounts: users, their API keys and usage, and the secret that signs this store's tokens.
//! The rules (who may do what, hashing, tokens) live in `crate::accounts`; this is what they
//! need kept.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{MetaResult, MetadataError};

/// What a user may do beyond their own images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    /// Every image, the operator endpoints, and no quota.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Self, MetadataError> {
        match text {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(MetadataError::Corrupt(format!("unknown role {other:?}"))),
        }
    }
}

/// Limits on what one user stores; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    pub bytes: Option<u64>,
    pub images: Option<u64>,
}

/// A user's own quota as set by an admin: for each limit, `None` follows the configured default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaOverride {
    pub bytes: Option<Limit>,
    pub images: Option<Limit>,
}

/// One limit a user may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    At(u64),
    Unlimited,
}

impl QuotaOverride {
    /// The limits in force, given the configured defaults.
    pub fn effective(&self, defaults: Quota) -> Quota {
        let pick = |own: Option<Limit>, default: Option<u64>| match own {
            Some(Limit::At(limit)) => Some(limit),
            Some(Limit::Unlimited) => None,
            None => default,
        };
        Quota { bytes: pick(self.bytes, defaults.bytes), images: pick(self.images, defaults.images) }
    }
}

/// What a user stores now: the sum over their images (a duplicate counts for each uploader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub bytes: u64,
    pub images: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub role: Role,
    pub disabled: bool,
    pub quota: QuotaOverride,
    pub usage: Usage,
    /// `issuer|subject` for a user an external issuer's token made.
    pub external_subject: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A user with the hash their password is checked against (`None`: no password sign-in).
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub user: User,
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: Uuid,
    pub username: String,
    pub password_hash: Option<String>,
    pub role: Role,
    pub external_subject: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An API key as it is listed: never the key itself, which only its creator saw once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// SHA-256 of the key, hex.
    pub key_hash: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
}

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Records a user; `None`, changing nothing, when the username (or external subject) is taken.
    async fn create_user(&self, user: &NewUser) -> MetaResult<Option<User>>;

    async fn find_user(&self, id: Uuid) -> MetaResult<Option<User>>;

    async fn find_user_by_name(&self, username: &str) -> MetaResult<Option<UserCredentials>>;

    async fn find_user_by_external_subject(&self, subject: &str) -> MetaResult<Option<User>>;

    /// Every user, by username.
    async fn list_users(&self) -> MetaResult<Vec<User>>;

    /// Whether any admin exists (bootstrap creates the first one otherwise).
    async fn first_admin(&self) -> MetaResult<Option<User>>;

    /// Sets a user's own quota; false if there is no such user.
    async fn set_quota(&self, username: &str, quota: QuotaOverride) -> MetaResult<bool>;

    /// Disables or re-enables a user; false if there is no such user.
    async fn set_disabled(&self, username: &str, disabled: bool) -> MetaResult<bool>;

    async fn create_api_key(&self, key: &NewApiKey) -> MetaResult<ApiKey>;

    /// The live (not revoked) key with this hash, and its user.
    async fn find_api_key(&self, key_hash: &str) -> MetaResult<Option<(ApiKey, User)>>;

    /// Records that a key was just used.
    async fn touch_api_key(&self, id: Uuid) -> MetaResult<()>;

    /// A user's keys, revoked ones included, newest first.
    async fn list_api_keys(&self, user_id: Uuid) -> MetaResult<Vec<ApiKey>>;

    /// Revokes a live key, of `user_id` only when given (an admin's CLI revokes any); false if
    /// there is no such live key.
    async fn revoke_api_key(&self, user_id: Option<Uuid>, key_id: Uuid) -> MetaResult<bool>;

    /// The secret signing this store's tokens: `candidate` if none was kept yet, else the one
    /// kept (concurrent first starts agree on the first written).
    async fn auth_secret(&self, candidate: &str) -> MetaResult<String>;

    /// Gives every image without an owner (uploaded before accounts, or with them off) to
    /// `owner`, and counts them in its usage. Returns how many it gave.
    async fn adopt_unowned_images(&self, owner: Uuid) -> MetaResult<u64>;
}
