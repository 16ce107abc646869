//! Abuse limits: connection caps before the upgrade, send rate limits, the abuse close.

use crate::common;

use common::{upgrade_status, Client, TestServer};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Upgrades with an `X-Forwarded-For` header; the HTTP status of a refusal.
async fn connect_forwarded(server: &TestServer, forwarded_for: &str) -> Result<(), u16> {
    let mut request = server.ws_url("/ws?user=p").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Forwarded-For", forwarded_for.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_answers_429_and_frees_places_on_close() {
    let server = TestServer::builder()
        .set("limits.max_connections_per_ip", 2)
        .start()
        .await;
    let a = server.user("a").await;
    let _b = server.user("b").await;
    let (status, body) = upgrade_status(&server.ws_url("/ws?user=c")).await;
    assert_eq!(status, 429, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "too_many_connections");
    // /echo counts too.
    let (status, _) = upgrade_status(&server.ws_url("/echo")).await;
    assert_eq!(status, 429);
    // So does plain HTTP: every TCP connection takes a place.
    let (status, _) = common::http_get(&server.http_url("/healthz")).await;
    assert_eq!(status, 429);
    a.close().await;
    // The place is freed once the server has seen the close.
    let mut c = None;
    for _ in 0..100 {
        if let Ok(client) = Client::connect(&server.ws_url("/ws?user=c")).await {
            c = Some(client);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut c = c.expect("a place is freed after a close");
    assert_eq!(c.recv_type("authenticated").await["user_id"], "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cap_answers_503() {
    let server = TestServer::builder()
        .set("limits.max_connections", 1)
        .start()
        .await;
    let _a = server.user("a").await;
    let (status, body) = upgrade_status(&server.ws_url("/ws?user=b")).await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    // 127.0.0.1 is a trusted proxy: the last X-Forwarded-For entry is the client.
    let server = TestServer::builder()
        .set("limits.max_connections_per_ip", 1)
        .set(
            "limits.trusted_proxies",
            toml::Value::Array(vec!["127.0.0.1".into()]),
        )
        .start()
        .await;
    let mut held = Vec::new();
    for ip in ["10.0.0.1", "10.0.0.2", "1.2.3.4, 10.0.0.3"] {
        let mut request = server.ws_url("/ws?user=p").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("X-Forwarded-For", ip.parse().unwrap());
        held.push(
            tokio_tungstenite::connect_async(request)
                .await
                .unwrap_or_else(|e| panic!("{ip}: {e:?}")),
        );
    }
    // A second connection for 10.0.0.3 (last entry) is over the cap.
    assert_eq!(
        connect_forwarded(&server, "9.9.9.9, 10.0.0.3").await.err(),
        Some(429)
    );

    // Without the proxy being trusted, the header is ignored: all share 127.0.0.1.
    let server = TestServer::builder()
        .set("limits.max_connections_per_ip", 1)
        .start()
        .await;
    let mut request = server.ws_url("/ws?user=p").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Forwarded-For", "10.0.0.1".parse().unwrap());
    let _first = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        connect_forwarded(&server, "10.0.0.2").await.err(),
        Some(429)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_past_the_burst_are_refused_with_an_honest_retry_after() {
    let server = TestServer::builder()
        .set("limits.send_rate", 1.0)
        .set("limits.send_burst", 3)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    alice.recv_type("system").await;
    for i in 0..3 {
        alice.post("r", "ok", &format!("m{i}")).await;
    }
    alice
        .send(json!({"type": "send", "room": "r", "content": "too fast", "id": "m3"}))
        .await;
    let err = alice.skip_until("error").await;
    assert_eq!(err["code"], "rate_limited", "{err}");
    assert_eq!(err["id"], "m3");
    let retry = err["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms is an integer");
    assert!(retry > 0 && retry <= 1000, "{retry}");
    // Bob saw exactly the three accepted messages.
    let mut last = 0;
    for i in 0..3 {
        let msg = bob.recv_type("message").await;
        assert_eq!(msg["id"], format!("m{i}"));
        last = msg["seq"].as_u64().unwrap();
    }
    // After waiting as told (the refill is the subject here), the same id is accepted: the
    // refusal did not count for dedup. Its seq follows the third at once: nothing was stored
    // for the refused one.
    tokio::time::sleep(std::time::Duration::from_millis(retry + 20)).await;
    let (ack, _) = alice.post("r", "now", "m3").await;
    let msg = bob.recv_type("message").await;
    assert_eq!(msg["content"], "now");
    assert_eq!(msg["seq"], ack["seq"]);
    assert_eq!(msg["seq"], last + 1, "the refused send took no seq: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_refusals_close_with_4008() {
    let server = TestServer::builder()
        .set("limits.send_rate", 0.1)
        .set("limits.send_burst", 1)
        .set("limits.abuse_refusals", 5)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    alice.join("r").await;
    for i in 0..6 {
        alice
            .send(json!({"type": "send", "room": "r", "content": "x", "id": format!("f{i}")}))
            .await;
    }
    // One accepted (ack + message), then four refusals, then the fifth refusal and 4008.
    let mut refusals = 0;
    loop {
        match alice.next_event().await {
            common::Event::Frame(f) if f["type"] == "error" => {
                assert_eq!(f["code"], "rate_limited");
                refusals += 1;
            }
            common::Event::Frame(_) => {}
            common::Event::Close(code) => {
                assert_eq!(code, 4008);
                break;
            }
            common::Event::Ended => panic!("ended without close"),
        }
    }
    assert_eq!(
        refusals, 5,
        "the refusal that trips the limit gets its error frame first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_past_its_bucket_is_dropped_silently() {
    let server = TestServer::builder()
        .set("limits.typing_rate", 0.1)
        .set("limits.typing_burst", 2)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    alice.recv_type("system").await;
    for _ in 0..5 {
        alice.send(json!({"type": "typing", "room": "r"})).await;
    }
    alice.send(json!({"type": "ping"})).await;
    // Alice gets no error for the dropped ones, only her pong.
    alice.recv_type("pong").await;
    bob.recv_type("typing").await;
    bob.recv_type("typing").await;
    // Anything alice's typing put in bob's queue is ahead of her next message: the message
    // coming next shows the dropped notices were not sent.
    let (ack, _) = alice.post("r", "after typing", "t1").await;
    let next = bob.recv().await;
    assert_eq!(
        (next["type"].as_str(), &next["seq"]),
        (Some("message"), &ack["seq"]),
        "{next}"
    );
}
