//! Accounts: who is calling, and what they may do (DESIGN, "Accounts, keys and ownership").
//!
//! - [`credentials`]: API keys (`chm_…`, kept as SHA-256) and Argon2id passwords;
//! - [`tokens`]: this store's HS256 access tokens, and an external issuer's tokens;
//! - [`signed_url`]: HMAC-signed, expiring links to private images;
//! - [`caller`]: the caller of a request and the ownership rules, as pure functions;
//! - [`service`]: the use cases (register, login, keys, authenticate), over the metadata store;
//! - [`bootstrap`]: the first admin's key on first start.
//!
//! Nothing here knows HTTP: `api::auth` maps requests to these calls and `api::error` maps
//! [`AuthError`] to status codes.

pub mod bootstrap;
pub mod caller;
pub mod credentials;
pub mod error;
pub mod service;
pub mod signed_url;
pub mod tokens;

pub use caller::{Caller, Identity};
pub use error::AuthError;
pub use service::Accounts;
