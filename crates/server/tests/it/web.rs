//! The embedded browser client over plain HTTP: `/` is the chat page and links the app's
//! script and stylesheet, the script imports the client library (`/parley-client.js`), and
//! each answers with its content type and cache headers.

use crate::common;

use common::TestServer;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

/// The value of the first `attr="..."` after `marker` in `html`.
fn attr_after(html: &str, marker: &str, attr: &str) -> String {
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in page"));
    let rest = &html[at..];
    let key = format!("{attr}=\"");
    let start = rest.find(&key).expect("attribute") + key.len();
    let end = rest[start..].find('"').expect("closing quote");
    rest[start..start + end].to_owned()
}

fn header(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> String {
    resp.headers()
        .get(&name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn index_links_the_app_and_assets_have_content_types() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();

    let resp = http.get(server.http_url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, CONTENT_TYPE).starts_with("text/html"));
    assert_eq!(header(&resp, CACHE_CONTROL), "no-cache");
    let csp = header(&resp, reqwest::header::CONTENT_SECURITY_POLICY);
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let page_etag = header(&resp, ETAG);
    let html = resp.text().await.unwrap();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(
        html.contains("id=\"messages\""),
        "the chat UI is in the page"
    );
    assert!(
        !html.contains("__VERSION__"),
        "the version placeholder is filled in"
    );

    let js = attr_after(&html, "<script", "src");
    let css = attr_after(&html, "<link rel=\"stylesheet\"", "href");
    assert!(js.starts_with("/app.js?v="), "{js}");
    assert!(css.starts_with("/app.css?v="), "{css}");

    // app.js is an ES module that imports the library, versioned like the page's assets.
    let (_, app) = common::http_get(&server.http_url(&js)).await;
    assert!(
        !app.contains("__VERSION__"),
        "the import's version is filled in"
    );
    let lib = app
        .split('"')
        .find(|s| s.starts_with("/parley-client.js?v="))
        .expect("app.js imports /parley-client.js?v=...")
        .to_owned();

    for (path, ty, needle) in [
        (lib.as_str(), "text/javascript", "export class Parley"),
        (
            "/parley-client.js",
            "text/javascript",
            "export class Parley",
        ),
        (js.as_str(), "text/javascript", "window.parley"),
        ("/app.js", "text/javascript", "window.parley"),
        (css.as_str(), "text/css", ".messages"),
        ("/app.css", "text/css", ".messages"),
    ] {
        let resp = http.get(server.http_url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let content_type = header(&resp, CONTENT_TYPE);
        assert!(content_type.starts_with(ty), "{path}: {content_type}");
        assert!(header(&resp, CACHE_CONTROL).contains("max-age="), "{path}");
        assert_eq!(
            header(&resp, "x-content-type-options".parse().unwrap()),
            "nosniff"
        );
        let etag = header(&resp, ETAG);
        let body = resp.text().await.unwrap();
        assert!(body.contains(needle), "{path} holds {needle}");

        // A revalidation with the ETag is answered 304 without a body.
        let again = http
            .get(server.http_url(path))
            .header(IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }

    let again = http
        .get(server.http_url("/"))
        .header(IF_NONE_MATCH, &page_etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // The client renders text as text: no innerHTML anywhere in the script.
    let (_, script) = common::http_get(&server.http_url("/app.js")).await;
    assert!(
        !script.contains("innerHTML"),
        "app.js must not use innerHTML"
    );
    assert!(!script.contains("insertAdjacentHTML"));
}
