//! The browser client: `GET /` (the page), `/app.js`, `/app.css` and `/parley-client.js` (the
//! JavaScript client library, `clients/js/src/index.js`, which `app.js` imports as an ES
//! module), embedded in the binary so a node needs no files beside it.
//!
//! The page links the assets as `/app.js?v=HASH` (and `app.js` imports
//! `/parley-client.js?v=HASH`), HASH being a digest of their text, so a new
//! build is picked up at once while browsers may cache the assets for a day. The page itself is
//! revalidated on every load (`no-cache` with an `ETag`).

use std::sync::LazyLock;

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

const INDEX_TEMPLATE: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");
const CLIENT_JS: &str = include_str!("../../../../clients/js/src/index.js");

/// What the page may load and connect to: only its own origin (plus its WebSocket).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// FNV-1a, 64 bits: a stable digest of the embedded text for cache busting and ETags.
fn digest(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

struct Asset {
    body: String,
    etag: String,
}

impl Asset {
    fn new(body: String) -> Asset {
        let etag = format!("\"{}\"", digest(&[&body]));
        Asset { body, etag }
    }
}

static VERSION: LazyLock<String> =
    LazyLock::new(|| digest(&[APP_JS, APP_CSS, CLIENT_JS])[..12].to_owned());
static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(INDEX_TEMPLATE.replace("__VERSION__", &VERSION)));
static JS: LazyLock<Asset> = LazyLock::new(|| Asset::new(APP_JS.replace("__VERSION__", &VERSION)));
static CLIENT: LazyLock<Asset> = LazyLock::new(|| Asset::new(CLIENT_JS.to_owned()));
static CSS: LazyLock<Asset> = LazyLock::new(|| Asset::new(APP_CSS.to_owned()));

fn serve(
    asset: &'static Asset,
    content_type: &'static str,
    cache: &'static str,
    req: &HeaderMap,
) -> Response {
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(etag) = HeaderValue::from_str(&asset.etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    (headers, asset.body.as_str()).into_response()
}

/// `GET /`: the chat page.
pub(super) async fn index(req: HeaderMap) -> Response {
    let mut resp = serve(&INDEX, "text/html; charset=utf-8", "no-cache", &req);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /app.js`: the client's script.
pub(super) async fn app_js(req: HeaderMap) -> Response {
    serve(
        &JS,
        "text/javascript; charset=utf-8",
        "public, max-age=86400",
        &req,
    )
}

/// `GET /app.css`: the client's stylesheet.
pub(super) async fn app_css(req: HeaderMap) -> Response {
    serve(
        &CSS,
        "text/css; charset=utf-8",
        "public, max-age=86400",
        &req,
    )
}

/// `GET /parley-client.js`: the client library the page's script imports. Pages on other
/// origins may import it too (a module script from another origin needs CORS): it is public.
pub(super) async fn client_js(req: HeaderMap) -> Response {
    let mut resp = serve(
        &CLIENT,
        "text/javascript; charset=utf-8",
        "public, max-age=86400",
        &req,
    );
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}
