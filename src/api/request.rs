//! What happens around every request: its id (`x-request-id`, taken from the client when it
//! is acceptable, generated otherwise, echoed in the response), a tracing span carrying that
//! id, and the per-route metrics (`observability::names::HTTP_*`).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, histogram};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use super::error::ErrorCode;
use crate::observability::{names, request_id};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Route label of a request that matched no route.
const UNMATCHED: &str = "unmatched";

/// Drops a client's `x-request-id` that is too long or carries characters unfit for a log
/// line, so that [`SetRequestIdLayer`] generates one instead.
pub async fn refuse_unacceptable_id(mut request: Request, next: Next) -> Response {
    let acceptable = request.headers().get(&X_REQUEST_ID).map(|id| id.to_str().is_ok_and(request_id::is_acceptable));
    if acceptable == Some(false) {
        request.headers_mut().remove(&X_REQUEST_ID);
    }
    next.run(request).await
}

pub fn set_id() -> SetRequestIdLayer<MakeRequestUuid> {
    SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid)
}

pub fn propagate_id() -> PropagateRequestIdLayer {
    PropagateRequestIdLayer::new(X_REQUEST_ID)
}

/// A span per request, named `request`, with its method, route template, path and id: every
/// log line written while serving it carries them.
pub fn trace() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    fn(&Request) -> Span,
> {
    TraceLayer::new_for_http().make_span_with(request_span as fn(&Request) -> Span)
}

fn request_span(request: &Request) -> Span {
    let id = request.headers().get(&X_REQUEST_ID).and_then(|id| id.to_str().ok()).unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        route = route_of(request),
        path = %request.uri().path(),
        request_id = %id,
    )
}

/// Runs the request with its id in scope (for the tasks it queues) and records its metrics.
pub async fn observe(request: Request, next: Next) -> Response {
    let route = route_of(&request).to_owned();
    let method = method_label(request.method());
    let id = request.headers().get(&X_REQUEST_ID).and_then(|id| id.to_str().ok()).unwrap_or_default().to_owned();
    let started = Instant::now();
    let response = request_id::scope(id, next.run(request)).await;
    let status = response.status();
    histogram!(names::HTTP_DURATION, "method" => method, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    counter!(names::HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status.as_str().to_owned())
        .increment(1);
    if status.is_client_error() || status.is_server_error() {
        let code = response.extensions().get::<ErrorCode>().map_or("", |code| code.0);
        counter!(names::HTTP_ERRORS, "method" => method, "route" => route, "status" => status.as_str().to_owned(),
            "code" => code)
        .increment(1);
    }
    response
}

fn route_of(request: &Request) -> &str {
    request.extensions().get::<MatchedPath>().map_or(UNMATCHED, MatchedPath::as_str)
}

/// Methods as a bounded label: any other method is `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
