//! The rate-limit middleware: one token per request from the caller's bucket (uploads and
//! other requests apart), `RateLimit-*` headers on every limited answer, 429 when empty.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::caller::ClientAddress;
use super::error::ApiError;
use crate::accounts::Caller;
use crate::observability::names;
use crate::ratelimit::bucket::Decision;
use crate::ratelimit::{Class, whole_seconds};

/// Paths a load balancer or the health checks of an orchestrator call: never limited.
const UNLIMITED: [&str; 3] = ["/health", "/health/live", "/health/ready"];

pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if UNLIMITED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let class = if is_upload(&request) { Class::Upload } else { Class::Request };
    let subject = subject(&request);
    let Some(decision) = state.limiter.check(class, &subject).await else { return next.run(request).await };
    let mut response = if decision.allowed {
        next.run(request).await
    } else {
        tracing::info!(subject, ?class, "rate limited");
        metrics::counter!(names::RATE_LIMITED, "class" => class.as_str()).increment(1);
        ApiError::RateLimited { retry_after_secs: whole_seconds(decision.retry_after) }.into_response()
    };
    // A handler that applied a bucket of its own (login) reported that one: keep it.
    if !response.headers().contains_key("ratelimit-limit") {
        add_headers(response.headers_mut(), &decision);
    }
    response
}

fn is_upload(request: &Request) -> bool {
    request.method() == Method::POST && matches!(request.uri().path(), "/api/v1/images/upload" | "/api/v1/images/batch")
}

/// Answers a request whose credentials were refused, after charging its address's bucket:
/// otherwise a client sending bad keys (each a database lookup) would never meet a limit.
pub async fn refuse(state: &AppState, path: &str, address: ClientAddress, refusal: ApiError) -> Response {
    if UNLIMITED.contains(&path) {
        return refusal.into_response();
    }
    let Some(decision) = state.limiter.check(Class::Request, &address_subject(address)).await else {
        return refusal.into_response();
    };
    let mut response = if decision.allowed {
        refusal.into_response()
    } else {
        metrics::counter!(names::RATE_LIMITED, "class" => Class::Request.as_str()).increment(1);
        ApiError::RateLimited { retry_after_secs: whole_seconds(decision.retry_after) }.into_response()
    };
    add_headers(response.headers_mut(), &decision);
    response
}

fn address_subject(address: ClientAddress) -> String {
    format!("ip:{}", address.bucket_name())
}

/// Whose bucket: the API key's, else the user's, else the client address's.
fn subject(request: &Request) -> String {
    match request.extensions().get::<Caller>() {
        Some(Caller::User(identity)) => match identity.key {
            Some(key) => format!("key:{key}"),
            None => format!("user:{}", identity.user),
        },
        _ => address_subject(request.extensions().get::<ClientAddress>().copied().unwrap_or(ClientAddress(None))),
    }
}

/// The `RateLimit-Limit`, `-Remaining` and `-Reset` fields of the IETF draft.
pub fn add_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(whole_seconds(decision.reset)));
}
