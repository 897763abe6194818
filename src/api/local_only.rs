//! With accounts off (`auth.enabled = false`) every caller is the admin, which the config allows
//! only on a loopback bind. A loopback bind keeps the network out, but not a browser on the same
//! machine: any web page the operator opens can post a form to `http://127.0.0.1:8000`
//! (cross-site request forgery: an upload, a delete), and a page whose name is made to resolve
//! to 127.0.0.1 can read the answers as well (DNS rebinding). So in that mode a request must
//! name the machine itself in `Host` (`localhost`, a `*.localhost` name, a loopback address,
//! any port), and a request that changes something must not come from another origin (its
//! `Origin`, which browsers send on cross-origin writes, must name the same host). Clients
//! that are not browsers send no `Origin` and a loopback `Host`, and pass.
//!
//! With accounts on, or with `auth.allow_anonymous_network = true` (the operator chose to serve
//! the network without accounts), this guard stands aside.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::error_body;

/// Refuses, in local-only mode, a request for another host or a write from another origin.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.local_only {
        return next.run(request).await;
    }
    if let Some(problem) = refusal(request.method(), request.headers()) {
        return error_body(StatusCode::FORBIDDEN, "LOCAL_ONLY", problem).into_response();
    }
    next.run(request).await
}

fn refusal(method: &Method, headers: &HeaderMap) -> Option<&'static str> {
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or("");
    if !is_loopback_host(host_name(host)) {
        return Some(
            "with accounts off this instance answers only requests for localhost or a loopback address; \
             turn accounts on (auth.enabled) to serve other names",
        );
    }
    let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let origin = headers.get(header::ORIGIN).and_then(|value| value.to_str().ok());
    match origin {
        Some(origin) if writes && !same_host(origin, host) => {
            Some("with accounts off a change may come only from this instance's own pages, not from another site's")
        }
        _ => None,
    }
}

/// The host of a `Host` header value, without its port: `[::1]:8000` gives `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(name, _)| &host[..=name.len()]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn is_loopback_host(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    let address = name.trim_start_matches('[').trim_end_matches(']');
    address.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether an `Origin` (`http://localhost:8000`) names the host and port of the request.
fn same_host(origin: &str, host: &str) -> bool {
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    authority.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    #[test]
    fn loopback_names_pass_and_other_names_do_not() {
        for host in ["localhost:8000", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000", "app.localhost", "LOCALHOST."] {
            assert_eq!(refusal(&Method::GET, &headers(host, None)), None, "{host}");
        }
        for host in ["attacker.example:8000", "192.168.1.5:8000", "", "localhost.attacker.example", "[::2]:80"] {
            assert!(refusal(&Method::GET, &headers(host, None)).is_some(), "{host}");
        }
    }

    #[test]
    fn a_write_from_another_origin_is_refused() {
        let host = "127.0.0.1:8000";
        assert_eq!(refusal(&Method::POST, &headers(host, None)), None, "a client that is not a browser");
        assert_eq!(refusal(&Method::POST, &headers(host, Some("http://127.0.0.1:8000"))), None, "its own page");
        assert!(refusal(&Method::POST, &headers(host, Some("https://attacker.example"))).is_some());
        assert!(refusal(&Method::DELETE, &headers(host, Some("http://localhost:8000"))).is_some(), "another name");
        assert!(refusal(&Method::POST, &headers(host, Some("null"))).is_some(), "a sandboxed page");
        assert_eq!(refusal(&Method::GET, &headers(host, Some("https://attacker.example"))), None, "a read");
    }
}
