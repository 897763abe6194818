//! Who is calling: the `Authorization` header checked once per request, by a middleware,
//! into a [`Caller`] that handlers take as an extractor. Also the client's address, which
//! anonymous rate limits and login limits are keyed by.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::error::ApiError;
use crate::accounts::{AuthError, Caller};

/// The client's address as rate limits see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub Option<IpAddr>);

impl ClientAddress {
    /// The name of the address's rate-limit buckets: the address itself, except that an IPv6
    /// address stands for its /64, which one host commonly holds whole (limits per address
    /// would give it one bucket per address it cares to use).
    pub fn bucket_name(&self) -> String {
        match self.0 {
            Some(IpAddr::V6(ip)) if ip.to_ipv4_mapped().is_none() => {
                let network = u128::from(ip) & !((1u128 << 64) - 1);
                format!("{}/64", std::net::Ipv6Addr::from(network))
            }
            Some(IpAddr::V6(ip)) => ip.to_ipv4_mapped().map_or_else(|| ip.to_string(), |v4| v4.to_string()),
            _ => self.to_string(),
        }
    }
}

impl std::fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// Authenticates the request and records its caller and address for the handlers. Refused
/// credentials end the request here (401), whatever the route: a client with a bad key learns
/// it at once rather than being served as anonymous. The refusal is charged to the address's
/// rate limit, as an anonymous request would be.
pub async fn identify(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let address = client_address(&request, state.trust_forwarded_for);
    request.extensions_mut().insert(address);
    let caller = match bearer_token(request.headers()) {
        Ok(token) => state.accounts.authenticate(token).await,
        Err(error) => Err(error),
    };
    match caller {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => super::ratelimit::refuse(&state, request.uri().path(), address, ApiError::from(error)).await,
    }
}

/// The token of `Authorization: Bearer <token>`; `None` without the header.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let malformed = AuthError::InvalidCredentials { reason: "the Authorization header is not `Bearer <token>`" };
    let value = value.to_str().map_err(|_| malformed)?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthError::InvalidCredentials { reason: "the Authorization header is not `Bearer <token>`" })?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::InvalidCredentials { reason: "the Authorization header is not `Bearer <token>`" });
    }
    Ok(Some(token))
}

/// The peer's address, or behind a trusted proxy the last `X-Forwarded-For` entry (the one
/// the proxy itself added; earlier entries are whatever the client sent). The last entry of the
/// last header line: a proxy may append to the client's line or add a line of its own.
fn client_address(request: &Request, trust_forwarded_for: bool) -> ClientAddress {
    if trust_forwarded_for
        && let Some(forwarded) = request.headers().get_all("x-forwarded-for").iter().next_back()
        && let Ok(forwarded) = forwarded.to_str()
        && let Some(last) = forwarded.rsplit(',').next()
        && let Ok(ip) = last.trim().parse::<IpAddr>()
    {
        return ClientAddress(Some(ip));
    }
    ClientAddress(request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip()))
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    /// The caller [`identify`] recorded; without it (a router built without the middleware),
    /// anonymous: the least anyone can be.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or(Caller::Anonymous))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<ClientAddress>().copied().unwrap_or(ClientAddress(None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_address_shares_its_slash_64_bucket() {
        let bucket = |ip: &str| ClientAddress(Some(ip.parse().unwrap())).bucket_name();
        assert_eq!(bucket("2001:db8:1:2:aaaa::1"), bucket("2001:db8:1:2:bbbb::9"));
        assert_eq!(bucket("2001:db8:1:2::1"), "2001:db8:1:2::/64");
        assert_ne!(bucket("2001:db8:1:2::1"), bucket("2001:db8:1:3::1"));
        assert_eq!(bucket("192.0.2.7"), "192.0.2.7");
        assert_eq!(bucket("::ffff:192.0.2.7"), "192.0.2.7", "a mapped IPv4 address is its IPv4 address");
        assert_eq!(ClientAddress(None).bucket_name(), "unknown");
    }
}
