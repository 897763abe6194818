//! `/api/v1/auth/…`: register, log in, the caller's account, and their API keys.

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::caller::ClientAddress;
use super::error::{ApiError, ErrorBody};
use super::ratelimit::add_headers;
use crate::accounts::service::Account;
use crate::accounts::{AuthError, Caller};
use crate::metadata::{ApiKey, Role, User};
use crate::ratelimit::{Class, whole_seconds};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/me", get(me))
        .route("/api/v1/auth/keys", post(create_key).get(list_keys))
        .route("/api/v1/auth/keys/{id}", delete(revoke_key))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// 3 to 64 letters, digits, `.`, `-`, `_` or `@`.
    pub username: String,
    /// 8 to 1024 bytes.
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserJson {
    pub id: Uuid,
    pub username: String,
    pub role: Role,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<User> for UserJson {
    fn from(user: User) -> Self {
        UserJson { id: user.id, username: user.username, role: user.role, created_at: user.created_at }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenJson {
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountJson {
    #[serde(flatten)]
    pub user: UserJson,
    pub usage: UsageJson,
    /// The limits in force (`null`: unlimited; admins have none).
    pub quota: QuotaJson,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageJson {
    pub bytes: u64,
    pub images: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaJson {
    pub bytes: Option<u64>,
    pub images: Option<u64>,
}

impl From<Account> for AccountJson {
    fn from(account: Account) -> Self {
        AccountJson {
            usage: UsageJson { bytes: account.user.usage.bytes, images: account.user.usage.images },
            quota: QuotaJson { bytes: account.quota.bytes, images: account.quota.images },
            user: account.user.into(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    /// What the key is for, to tell keys apart (1 to 100 characters).
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyJson {
    pub id: Uuid,
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<ApiKey> for ApiKeyJson {
    fn from(key: ApiKey) -> Self {
        ApiKeyJson {
            id: key.id,
            name: key.name,
            prefix: key.prefix,
            created_at: key.created_at,
            last_used_at: key.last_used_at,
            revoked_at: key.revoked_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewKeyJson {
    #[serde(flatten)]
    pub info: ApiKeyJson,
    /// The key itself: shown now and never again. Send it as `Authorization: Bearer <key>`.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKeyJson>,
}

/// A JSON body, or `INVALID_BODY` naming what is wrong with it.
pub fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|rejection| ApiError::InvalidBody(rejection.body_text()))
}

#[utoipa::path(
    post, path = "/api/v1/auth/register", tag = "accounts", request_body = Credentials,
    responses(
        (status = 201, description = "Registered; log in for a token", body = UserJson),
        (status = 400, description = "INVALID_BODY, INVALID_USERNAME or INVALID_PASSWORD", body = ErrorBody),
        (status = 403, description = "REGISTRATION_CLOSED (auth.open_registration is off)", body = ErrorBody),
        (status = 409, description = "USERNAME_TAKEN", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn register(
    State(state): State<AppState>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Result<(StatusCode, Json<UserJson>), ApiError> {
    if !state.accounts.open_registration() || !state.accounts.enabled() {
        return Err(AuthError::RegistrationClosed.into());
    }
    let credentials = json_body(body)?;
    let user = state.accounts.register(&credentials.username, &credentials.password).await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

#[utoipa::path(
    post, path = "/api/v1/auth/login", tag = "accounts", request_body = Credentials,
    responses(
        (status = 200, description = "A short-lived access token", body = TokenJson),
        (status = 400, description = "INVALID_BODY", body = ErrorBody),
        (status = 401, description = "INVALID_CREDENTIALS: an unknown user and a wrong password get the same answer", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED (per username and address)", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn login(
    State(state): State<AppState>,
    address: ClientAddress,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let credentials = json_body(body)?;
    let decision = state.limiter.check(Class::Login, &login_subject(&credentials.username, address)).await;
    if let Some(decision) = decision.filter(|decision| !decision.allowed) {
        metrics::counter!(crate::observability::names::RATE_LIMITED, "class" => Class::Login.as_str()).increment(1);
        let mut response =
            ApiError::RateLimited { retry_after_secs: whole_seconds(decision.retry_after) }.into_response();
        add_headers(response.headers_mut(), &decision);
        return Ok(response);
    }
    let token = state.accounts.login(&credentials.username, &credentials.password).await?;
    let body = TokenJson { access_token: token.token, token_type: "bearer", expires_in: token.expires_in.as_secs() };
    Ok(Json(body).into_response())
}

/// The bucket a login attempt draws on: the username and the address's bucket. A name no
/// account can have (too long, or with characters a username cannot hold) shares one bucket per
/// address, so that a name of megabytes cannot make a bucket of its own per request.
fn login_subject(username: &str, address: ClientAddress) -> String {
    let name = if crate::accounts::service::check_username(username).is_ok() { username } else { "(not a username)" };
    format!("{name}|{}", address.bucket_name())
}

#[utoipa::path(
    get, path = "/api/v1/auth/me", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's account, usage and quota", body = AccountJson),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<AccountJson>, ApiError> {
    Ok(Json(state.accounts.account(&caller).await?.into()))
}

#[utoipa::path(
    post, path = "/api/v1/auth/keys", tag = "accounts", request_body = NewKeyRequest, security(("bearer" = [])),
    responses(
        (status = 201, description = "The new key, shown this once", body = NewKeyJson),
        (status = 400, description = "INVALID_BODY or INVALID_KEY_NAME", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NewKeyRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<NewKeyJson>), ApiError> {
    caller.user().ok_or(AuthError::MissingCredentials)?;
    let request = json_body(body)?;
    let (key, secret) = state.accounts.create_key(&caller, &request.name).await?;
    Ok((StatusCode::CREATED, Json(NewKeyJson { info: key.into(), key: secret })))
}

#[utoipa::path(
    get, path = "/api/v1/auth/keys", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's keys, revoked ones included, newest first", body = ApiKeyList),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn list_keys(State(state): State<AppState>, caller: Caller) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state.accounts.list_keys(&caller).await?;
    Ok(Json(ApiKeyList { items: keys.into_iter().map(ApiKeyJson::from).collect() }))
}

/// The `{id}` of a key.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct KeyId {
    /// The key's id (not the key).
    id: String,
}

#[utoipa::path(
    delete, path = "/api/v1/auth/keys/{id}", tag = "accounts", params(KeyId), security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked: it stops working with the next request"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "KEY_NOT_FOUND (also for an id that is not a UUID)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "DATABASE_UNAVAILABLE", body = ErrorBody),
    )
)]
async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.user().ok_or(AuthError::MissingCredentials)?;
    let id = id.ok().and_then(|Path(id)| Uuid::try_parse(&id).ok()).ok_or(AuthError::KeyNotFound)?;
    state.accounts.revoke_key(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_no_account_can_have_shares_one_login_bucket_per_address() {
        let address = ClientAddress(Some("192.0.2.7".parse().unwrap()));
        assert_eq!(login_subject("alice", address), "alice|192.0.2.7");
        let huge = "x".repeat(2 << 20);
        assert_eq!(login_subject(&huge, address), login_subject("bad\\nname", address));
        assert!(login_subject(&huge, address).len() < 64);
    }
}
