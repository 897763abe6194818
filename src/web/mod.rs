//! The web pages: a gallery for people at `/` and an operator dashboard at `/admin`.
//!
//! Plain HTML, CSS and JavaScript modules, embedded in the binary (no CDN, no network, no
//! Node.js to build). The pages only call the public JSON API (`/api/v1/…`, `/health`), with
//! the same credentials a client sends. Every answer carries a strict Content-Security-Policy:
//! no inline script or style, so whatever a filename holds is never run.
//!
//! Assets are served under `/assets/{version}/{name}`, where the version is a hash of every
//! asset: the HTML names the current one, so an asset may be cached for a year; a request for
//! another version gets the current bytes without that promise. Every answer has an ETag.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::AppState;
use crate::api::error::error_body;

/// What the pages may load: their own scripts, styles and images (uploaded images shown from
/// object URLs), and nothing inline. They may not be framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; \
     style-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// An asset's path under the versioned prefix, its media type and its bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", body: include_str!("assets/style.css") },
    Asset { name: "api.js", content_type: "text/javascript; charset=utf-8", body: include_str!("assets/api.js") },
    Asset { name: "signin.js", content_type: "text/javascript; charset=utf-8", body: include_str!("assets/signin.js") },
    Asset {
        name: "gallery.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/gallery.js"),
    },
    Asset { name: "admin.js", content_type: "text/javascript; charset=utf-8", body: include_str!("assets/admin.js") },
    Asset { name: "icon.svg", content_type: "image/svg+xml", body: include_str!("assets/icon.svg") },
];

const GALLERY_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_HTML: &str = include_str!("assets/admin.html");

/// Assets are never cached beyond revalidation unless their path names the current version.
const CACHE_VERSIONED: &str = "public, max-age=31536000, immutable";
const CACHE_REVALIDATE: &str = "no-cache";

/// A hash of every asset: the path segment that changes whenever one of them does.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut all = Vec::new();
    for asset in ASSETS {
        all.extend_from_slice(asset.name.as_bytes());
        all.push(0);
        all.extend_from_slice(asset.body.as_bytes());
    }
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&all))
});

/// Each asset's ETag, in the order of [`ASSETS`]: hashed once, not on every request.
static ASSET_TAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| ASSETS.iter().map(|a| entity_tag(a.body)).collect());

/// The pages, with `{{assets}}` replaced by the versioned prefix.
static GALLERY: LazyLock<Page> = LazyLock::new(|| Page::new(GALLERY_HTML));
static DASHBOARD: LazyLock<Page> = LazyLock::new(|| Page::new(DASHBOARD_HTML));

struct Page {
    html: String,
    etag: HeaderValue,
}

impl Page {
    fn new(template: &str) -> Self {
        let html = template.replace("{{assets}}", &format!("/assets/{}", *VERSION));
        let etag = entity_tag(&html);
        Self { html, etag }
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(gallery))
        .route("/admin", get(dashboard))
        .route("/assets/{version}/{name}", get(asset))
        .route("/favicon.ico", get(favicon))
}

async fn gallery(headers: HeaderMap) -> Response {
    page(&GALLERY, &headers)
}

/// The dashboard's shell holds no data: every figure it shows comes from admin-only routes.
async fn dashboard(headers: HeaderMap) -> Response {
    page(&DASHBOARD, &headers)
}

fn page(page: &'static Page, headers: &HeaderMap) -> Response {
    respond(headers, &page.etag, "text/html; charset=utf-8", CACHE_REVALIDATE, &page.html)
}

async fn asset(Path((version, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|asset| asset.name == name) else {
        return error_body(StatusCode::NOT_FOUND, "NOT_FOUND", "no such asset");
    };
    let cache = if version == *VERSION { CACHE_VERSIONED } else { CACHE_REVALIDATE };
    serve_asset(index, cache, &headers)
}

/// Browsers ask for `/favicon.ico` whatever the page says: the icon.
async fn favicon(headers: HeaderMap) -> Response {
    let icon = ASSETS.iter().position(|asset| asset.name == "icon.svg").expect("the icon is an asset");
    serve_asset(icon, CACHE_REVALIDATE, &headers)
}

fn serve_asset(index: usize, cache: &'static str, headers: &HeaderMap) -> Response {
    let asset = &ASSETS[index];
    respond(headers, &ASSET_TAGS[index], asset.content_type, cache, asset.body)
}

fn entity_tag(body: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(body.as_bytes())))
        .expect("hex is a valid header value")
}

fn respond(
    headers: &HeaderMap,
    etag: &HeaderValue,
    content_type: &'static str,
    cache: &'static str,
    body: &'static str,
) -> Response {
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| tag.trim().trim_start_matches("W/") == etag.to_str().unwrap_or_default() || tag.trim() == "*");
    let mut response = if not_modified { StatusCode::NOT_MODIFIED.into_response() } else { body.into_response() };
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.insert(header::ETAG, etag.clone());
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    out.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    out.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if not_modified {
        out.remove(header::CONTENT_TYPE);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_name_the_current_assets_and_have_no_inline_script_or_style() {
        for page in [&*GALLERY, &*DASHBOARD] {
            assert!(page.html.contains(&format!("/assets/{}/", *VERSION)));
            assert!(!page.html.contains("{{assets}}"));
            assert!(!page.html.contains("style=\""), "no inline style attribute");
            assert!(!page.html.contains("<script>"), "no inline script");
            assert!(!page.html.contains("<style"), "no inline style element");
            let handler = page.html.split_whitespace().find(|token| token.starts_with("on") && token.contains('='));
            assert_eq!(handler, None, "no inline event handler");
        }
    }

    #[test]
    fn scripts_never_write_html_from_strings() {
        for asset in ASSETS.iter().filter(|asset| asset.name.ends_with(".js")) {
            for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
                assert!(!asset.body.contains(sink), "{} uses {sink}", asset.name);
            }
        }
    }
}
