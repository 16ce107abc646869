//! `allowed_origins`: browsers from other origins are refused before the upgrade.

use crate::common;

use common::{upgrade_status, Client, TestServer};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn connect_with_origin(
    server: &TestServer,
    path: &str,
    origin: Option<&str>,
) -> Result<(), (u16, String)> {
    let mut request = server.ws_url(path).into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_origins_may_connect() {
    let server = TestServer::builder()
        .set(
            "allowed_origins",
            toml::Value::Array(vec!["https://chat.example".into()]),
        )
        .start()
        .await;
    for path in ["/ws?user=a", "/ws/general?user=a", "/echo"] {
        connect_with_origin(&server, path, Some("https://chat.example"))
            .await
            .unwrap_or_else(|e| panic!("{path}: allowed origin refused: {e:?}"));
        let (status, body) = connect_with_origin(&server, path, Some("https://evil.example"))
            .await
            .expect_err("foreign origin must be refused");
        assert_eq!(status, 403, "{path}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "forbidden");
        // No Origin header: not a browser, allowed.
        connect_with_origin(&server, path, None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_list_allows_any_origin() {
    let server = TestServer::start().await;
    connect_with_origin(&server, "/ws?user=a", Some("https://anything.example"))
        .await
        .unwrap();
    // And a refused upgrade still explains itself as JSON (bad room name).
    let (status, _) = upgrade_status(&server.ws_url("/ws/-bad?user=a")).await;
    assert_eq!(status, 400);
    let _ = Client::connect(&server.ws_url("/ws?user=b")).await.unwrap();
}
