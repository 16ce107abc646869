//! `GET /metrics`: known actions move each metric by exactly that much. Each server has its own
//! registry, so the servers of this file (and of other tests in the process) never mix.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{token, Client, TestServer};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// One scrape: `name{labels}` -> value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series `{series}` in the scrape"))
    }

    fn auth(&self, reason: &str) -> f64 {
        self.get(&format!(
            "parley_auth_failures_total{{reason=\"{reason}\"}}"
        ))
    }
}

async fn scrape(server: &TestServer) -> Scrape {
    let response = reqwest::get(server.http_url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let mut series = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value {line:?}"));
        series.insert(name.to_owned(), value);
    }
    Scrape(series)
}

/// Polls until `done` holds for a scrape (the server acts on its own clock: a heartbeat
/// timeout, a slow consumer's cut-off). Bounded: fails after 20 s.
async fn scrape_until(server: &TestServer, done: impl Fn(&Scrape) -> bool) -> Scrape {
    for _ in 0..400 {
        let now = scrape(server).await;
        if done(&now) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the metric never reached the expected value");
}

const REASONS: &[&str] = &[
    "missing",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "wrong_issuer_or_audience",
    "malformed",
    "timeout",
    "not_auth_frame",
    "wrong_user",
    "api_key",
    "exp_too_far",
];

#[tokio::test]
async fn counters_move_by_exactly_the_known_actions() {
    const SENDS: u64 = 5;
    let server = TestServer::builder()
        .jwt()
        .set("api.key", "k")
        // A burst of exactly SENDS, then one token per 1000 s: send SENDS + 1 is refused.
        .set("limits.send_burst", SENDS as i64)
        .set("limits.send_rate", 0.001)
        .start()
        .await;
    let before = scrape(&server).await;
    for series in [
        "parley_connections",
        "parley_room_memberships",
        "parley_messages_in_total",
        "parley_messages_out_total",
        "parley_send_latency_seconds_count",
        "parley_store_commit_seconds_count",
        "parley_store_settle_seconds_count",
        "parley_rate_limited_total",
        "parley_slow_consumer_closes_total",
        "parley_heartbeat_timeouts_total",
    ] {
        assert_eq!(before.get(series), 0.0, "{series}");
    }
    for reason in REASONS {
        assert_eq!(before.auth(reason), 0.0, "{reason}");
    }

    // Three people connect and join `room`; the first also joins `other`.
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let mut client = server
            .connect(&format!("/ws?token={}", token(user, 600, json!({}))))
            .await;
        client.recv_type("authenticated").await;
        client.join("room").await;
        clients.push(client);
    }
    clients[0]
        .send(json!({"type": "join", "room": "other"}))
        .await;
    clients[0].skip_until("joined").await;
    let now = scrape(&server).await;
    assert_eq!(now.get("parley_connections"), 3.0);
    assert_eq!(now.get("parley_room_memberships"), 4.0);
    // Join events: u2's reaches u1, u3's reaches u1 and u2; u1's own reached nobody.
    assert_eq!(now.get("parley_messages_out_total"), 3.0);

    // SENDS messages are accepted, the next is refused by the rate limit.
    for i in 0..SENDS {
        clients[0].post("room", "hello", &format!("m{i}")).await;
    }
    clients[0]
        .send(json!({"type": "send", "room": "room", "content": "one too many", "id": "x"}))
        .await;
    let refused = clients[0].skip_until("error").await;
    assert_eq!(refused["code"], "rate_limited");
    // One HTTP API post, and one request with a wrong API key.
    let http = reqwest::Client::new();
    let posted: Value = http
        .post(server.http_url("/api/rooms/room/messages"))
        .bearer_auth("k")
        .json(&json!({"user": "bot", "content": "from the api"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(posted["seq"].is_u64(), "{posted}");
    let status = http
        .get(server.http_url("/api/rooms"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    // Two bad tokens: one refused before the upgrade, one in an `auth` frame (close 4001).
    let forged = common::sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(b"another secret"),
        "mallory",
        600,
        json!({}),
    );
    let (status, _) = common::upgrade_status(&server.ws_url(&format!("/ws?token={forged}"))).await;
    assert_eq!(status, 401);
    let mut late = server.connect("/ws").await;
    late.send(json!({"type": "auth", "token": token("late", -120, json!({}))}))
        .await;
    assert_eq!(late.expect_close().await, 4001);
    // Finish the closing handshake: the server has let go of the connection when the stream
    // ends.
    late.close().await;

    let now = scrape(&server).await;
    assert_eq!(now.get("parley_messages_in_total"), SENDS as f64 + 1.0);
    assert_eq!(now.get("parley_rate_limited_total"), 1.0);
    // Each of the SENDS + 1 messages reached the three members of `room`.
    assert_eq!(
        now.get("parley_messages_out_total"),
        3.0 + (SENDS as f64 + 1.0) * 3.0
    );
    // One latency observation per message, not per delivery.
    assert_eq!(
        now.get("parley_send_latency_seconds_count"),
        SENDS as f64 + 1.0
    );
    assert_eq!(
        now.get("parley_send_latency_seconds_bucket{le=\"+Inf\"}"),
        SENDS as f64 + 1.0
    );
    // Group commits: at least one, at most one per request (4 joins + the messages).
    let commits = now.get("parley_store_commit_seconds_count");
    assert!(
        (1.0..=4.0 + SENDS as f64 + 1.0).contains(&commits),
        "{commits}"
    );
    // Settles: the indexer's, after a quiet moment or every `store.settle_ms`; at most one
    // per group commit.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let settles = scrape(&server)
            .await
            .get("parley_store_settle_seconds_count");
        assert!(settles <= commits, "{settles} of {commits}");
        if settles >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for reason in REASONS {
        let want = match *reason {
            "bad_signature" | "expired" | "api_key" => 1.0,
            _ => 0.0,
        };
        assert_eq!(now.auth(reason), want, "{reason}");
    }
    assert_eq!(
        now.get("parley_connections"),
        3.0,
        "the refused ones are gone"
    );
    assert_eq!(now.get("parley_slow_consumer_closes_total"), 0.0);
    assert_eq!(now.get("parley_heartbeat_timeouts_total"), 0.0);

    // Everyone leaves; a later join is sequenced after their leaves.
    for client in clients {
        client.close().await;
    }
    let mut last = server
        .connect(&format!("/ws?token={}", token("u4", 600, json!({}))))
        .await;
    last.recv_type("authenticated").await;
    last.join("room").await;
    let now = scrape(&server).await;
    assert_eq!(now.get("parley_connections"), 1.0);
    assert_eq!(now.get("parley_room_memberships"), 1.0);
}

#[tokio::test]
async fn a_silent_peer_counts_one_heartbeat_timeout() {
    let server = TestServer::builder()
        .set("heartbeat.interval_ms", 100)
        .set("heartbeat.timeout_ms", 400)
        .start()
        .await;
    // This client never reads, so it never answers the server's pings.
    let silent = server.user("silent").await;
    let now = scrape_until(&server, |s| {
        s.get("parley_heartbeat_timeouts_total") >= 1.0 && s.get("parley_connections") == 0.0
    })
    .await;
    assert_eq!(now.get("parley_heartbeat_timeouts_total"), 1.0);
    assert_eq!(now.get("parley_connections"), 0.0);
    assert_eq!(now.get("parley_slow_consumer_closes_total"), 0.0);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_counts_one_4009() {
    let server = TestServer::builder()
        .set("limits.outbound_queue_frames", 16)
        .set("limits.max_content_bytes", 20_000)
        .set("limits.send_rate", 100_000.0)
        .set("limits.send_burst", 100_000)
        .set("store.synchronous", "normal")
        .start()
        .await;
    // A member with a small receive buffer that stops reading after `joined`.
    let mut slow = server.slow_reader("/ws?user=slow").await;
    slow.send(Message::text(
        json!({"type": "join", "room": "busy"}).to_string(),
    ))
    .await
    .unwrap();
    let mut poster: Client = server.user("poster").await;
    poster.join("busy").await;
    let content = "y".repeat(16_000);
    let mut closed = false;
    for i in 0..1000 {
        poster.post("busy", &content, &format!("p{i}")).await;
        if i % 10 == 9
            && scrape(&server)
                .await
                .get("parley_slow_consumer_closes_total")
                >= 1.0
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow member was never cut off");
    let now = scrape(&server).await;
    assert_eq!(now.get("parley_slow_consumer_closes_total"), 1.0);
    assert_eq!(now.get("parley_heartbeat_timeouts_total"), 0.0);
    drop(slow);
}
