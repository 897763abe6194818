//! What can go wrong in an account use case. Each variant's doc names its HTTP answer in
//! `api::error`.

use crate::metadata::MetadataError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// 401 `UNAUTHORIZED` (with `WWW-Authenticate: Bearer`): no credentials where they are needed.
    #[error("this request needs credentials: send Authorization: Bearer <API key or access token>")]
    MissingCredentials,
    /// 401 `UNAUTHORIZED`: credentials that are malformed, unknown, expired, revoked or of a
    /// disabled user. The reason is for the log; the client sees one message for all.
    #[error("the credentials are not valid ({reason})")]
    InvalidCredentials { reason: &'static str },
    /// 401 `INVALID_CREDENTIALS`: a login with an unknown user or a wrong password (one answer
    /// for both).
    #[error("wrong username or password")]
    WrongPassword,
    /// 403 `FORBIDDEN`
    #[error("{0}")]
    Forbidden(&'static str),
    /// 403 `SIGNED_URL_EXPIRED`: a signed URL this store issued, past its expiry.
    #[error("this signed URL has expired: ask the image's owner for a new one")]
    SignedUrlExpired,
    /// 409 `USERNAME_TAKEN`
    #[error("the username {0:?} is taken")]
    UsernameTaken(String),
    /// 403 `REGISTRATION_CLOSED`
    #[error("registration is closed on this server: ask an admin for an account")]
    RegistrationClosed,
    /// 400 `INVALID_USERNAME`
    #[error("a username is 3 to 64 letters, digits, '.', '-' or '_'")]
    InvalidUsername,
    /// 400 `INVALID_PASSWORD`
    #[error("a password is 8 to 1024 bytes long")]
    InvalidPassword,
    /// 400 `INVALID_KEY_NAME`
    #[error("a key name is 1 to 100 characters, none of them control characters")]
    InvalidKeyName,
    /// 404 `KEY_NOT_FOUND`
    #[error("no live API key of yours has this id")]
    KeyNotFound,
    /// 404 `USER_NOT_FOUND`
    #[error("no user is called {0:?}")]
    UserNotFound(String),
    /// 400 `INVALID_EXPIRY`
    #[error("expires_in must be from 1 to {max} seconds")]
    InvalidExpiry { max: u64 },
    /// 503 `DATABASE_UNAVAILABLE`, or 500.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// 500 `INTERNAL_ERROR`
    #[error("{context}")]
    Internal {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
