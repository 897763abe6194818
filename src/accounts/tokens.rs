//! Access tokens: this store's own (HS256, short-lived, from `POST /api/v1/auth/login`), and
//! optionally an external issuer's (`[auth.external]`, a Supabase-style provider).
//!
//! Only the algorithms named here are accepted: `alg: none`, and an HS256 token passed off
//! against an RSA public key, fail validation before any claim is read.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AuthError;
use crate::config::ExternalIssuerSettings;
use crate::metadata::{Role, User};

/// The `iss` and `aud` of this store's tokens.
const ISSUER: &str = "chitram";
const AUDIENCE: &str = "chitram-api";
/// Clock skew tolerated on `exp` (between instances, or with an external issuer).
const LEEWAY_SECS: u64 = 5;
/// Algorithms a JWKS key may use: asymmetric only, so a public key never verifies an HMAC.
const JWKS_ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
}

/// A token as login returns it. Its `Debug` does not show the token.
#[derive(Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_in: Duration,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &crate::redact::MASK)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Issues and checks this store's tokens.
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl TokenIssuer {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation, ttl }
    }

    pub fn issue(&self, user: &User) -> Result<AccessToken, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let claims = Claims {
            sub: user.id.to_string(),
            role: user.role,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Internal { context: "signing an access token", source: Box::new(e) })?;
        Ok(AccessToken { token, expires_in: self.ttl })
    }

    /// The user a valid token names. Its role is read again from the database by the caller,
    /// so a demotion or a disabled account takes effect before the token expires.
    pub fn verify(&self, token: &str) -> Result<Uuid, AuthError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation).map_err(refusal)?;
        Uuid::parse_str(&data.claims.sub).map_err(|_| AuthError::InvalidCredentials { reason: "malformed subject" })
    }
}

/// Who an external issuer's token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIdentity {
    /// `issuer|sub`: stable, whatever the username claim says.
    pub subject: String,
    pub username: String,
}

/// Checks tokens signed by an external issuer.
pub struct ExternalIssuer {
    keys: Vec<ExternalKey>,
    validation: Validation,
    issuer: String,
    username_claim: String,
}

struct ExternalKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

impl ExternalIssuer {
    pub fn from_settings(settings: &ExternalIssuerSettings) -> Result<Self, ExternalIssuerError> {
        let keys = match (&settings.hs256_secret, &settings.jwks_file) {
            (Some(secret), _) => vec![ExternalKey {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithms: vec![Algorithm::HS256],
            }],
            (None, Some(file)) => load_jwks(file)?,
            (None, None) => return Err(ExternalIssuerError::NoKey),
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Ok(Self {
            keys,
            validation,
            issuer: settings.issuer.clone(),
            username_claim: settings.username_claim.clone().unwrap_or_else(|| "sub".to_owned()),
        })
    }

    pub fn verify(&self, token: &str) -> Result<ExternalIdentity, AuthError> {
        let header = decode_header(token).map_err(refusal)?;
        let key = self
            .keys
            .iter()
            .find(|key| key.algorithms.contains(&header.alg) && (key.kid.is_none() || key.kid == header.kid))
            .ok_or(AuthError::InvalidCredentials { reason: "no key of the external issuer fits the token" })?;
        let mut validation = self.validation.clone();
        validation.algorithms = key.algorithms.clone();
        let data =
            decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation).map_err(refusal)?;
        let claim = |name: &str| data.claims.get(name).and_then(|value| value.as_str()).map(str::to_owned);
        let sub = claim("sub").ok_or(AuthError::InvalidCredentials { reason: "no subject" })?;
        let username = claim(&self.username_claim).unwrap_or_else(|| sub.clone());
        Ok(ExternalIdentity { subject: format!("{}|{sub}", self.issuer), username })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalIssuerError {
    #[error("auth.external needs hs256_secret or jwks_file")]
    NoKey,
    #[error("cannot read the JWKS file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the JWKS file {path} is not a JSON Web Key Set: {reason}")]
    Parse { path: String, reason: String },
}

fn load_jwks(path: &Path) -> Result<Vec<ExternalKey>, ExternalIssuerError> {
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|source| ExternalIssuerError::Read { path: shown.clone(), source })?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| ExternalIssuerError::Parse { path: shown.clone(), reason: e.to_string() })?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| ExternalIssuerError::Parse { path: shown.clone(), reason: e.to_string() })?;
        let algorithms = match jwk.common.key_algorithm.and_then(|alg| alg.to_string().parse::<Algorithm>().ok()) {
            Some(alg) if JWKS_ALGORITHMS.contains(&alg) => vec![alg],
            Some(_) => continue,
            None => JWKS_ALGORITHMS.to_vec(),
        };
        keys.push(ExternalKey { kid: jwk.common.key_id.clone(), key, algorithms });
    }
    if keys.is_empty() {
        return Err(ExternalIssuerError::Parse { path: shown, reason: "it holds no usable asymmetric key".into() });
    }
    Ok(keys)
}

/// Why a token was refused, for the log; the client sees one answer whatever the reason.
fn refusal(error: jsonwebtoken::errors::Error) -> AuthError {
    let reason = match error.kind() {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::InvalidSignature => "wrong signature",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidAlgorithm => "algorithm not accepted",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        _ => "malformed token",
    };
    AuthError::InvalidCredentials { reason }
}
