//! Webhooks (docs/webhooks.md): every room event POSTed, signed, to a real HTTP receiver in
//! this process, at least once and in seq order per room, from the durable log. The receiver
//! verifies each signature, checks order as it goes, and de-duplicates by (room, epoch, seq);
//! the tests compare what it kept with the room's log read back through the HTTP API.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{watch, Notify};

use crate::common::{self, metric, Client, TestServer};
use crate::redis_server::RedisServer;

const SECRET: &str = "whsec-test-please-ignore";
const API_KEY: &str = "hooks-api-key";
/// How long a test waits for deliveries before it fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// How the receiver answers.
#[derive(Default)]
struct Behaviour {
    /// Answer 500 to every request whose number (from 1) is a multiple of this.
    fail_every: Option<u64>,
    /// Sleep this long before answering the next request (once).
    stall_once: Mutex<Option<Duration>>,
    /// While set, requests are not answered (they wait until it is cleared).
    hold: Option<watch::Receiver<bool>>,
    /// Answer the next request 429 with `Retry-After: <this many seconds>` (once).
    throttle_once: Mutex<Option<u64>>,
    /// Seqs may be skipped (`webhooks.events` leaves some out): only check they increase.
    sparse: bool,
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Every event of every accepted request, in arrival order (duplicates included).
    raw: Vec<Value>,
    /// Room events by (room, epoch, seq): what a de-duplicating backend keeps.
    kept: BTreeMap<(String, String, u64), Value>,
    /// Gap notices.
    gaps: Vec<Value>,
    /// Per room: the highest seq received so far.
    high: HashMap<String, u64>,
    /// Ordering violations: an event past the next expected seq.
    out_of_order: Vec<String>,
}

struct ReceiverState {
    behaviour: Behaviour,
    requests: AtomicU64,
    bad_signatures: AtomicU64,
    seen: Mutex<Seen>,
    changed: Notify,
    held: AtomicBool,
    /// Requests being answered now, and the most there were at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// When the 429 went out and for which room, and how long after it that room's next
    /// request came.
    throttled_at: Mutex<Option<(String, std::time::Instant)>>,
    after_throttle: Mutex<Option<Duration>>,
}

/// A webhook receiver on 127.0.0.1: verifies `Parley-Signature`, records the events.
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `header` is a valid `t=..,v1=..` signature of `body` under [`SECRET`], made within
/// the last five minutes.
fn signature_ok(header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = Some(value.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(t) > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == v1
}

/// Takes a request off `in_flight` when its handler ends (answered or dropped).
struct InFlight(Arc<ReceiverState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let signature = headers
        .get("parley-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !signature_ok(signature, &body) {
        state.bad_signatures.fetch_add(1, Ordering::SeqCst);
        state.changed.notify_waiters();
        return StatusCode::BAD_REQUEST.into_response();
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _leaving = InFlight(state.clone());
    if let Some(hold) = &state.behaviour.hold {
        let mut hold = hold.clone();
        state.held.store(true, Ordering::SeqCst);
        state.changed.notify_waiters();
        let _ = hold.wait_for(|held| !held).await;
    }
    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
    let room = body["events"][0]["room"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some((throttled, at)) = &*state.throttled_at.lock().unwrap() {
        if *throttled == room {
            let mut after = state.after_throttle.lock().unwrap();
            after.get_or_insert(at.elapsed());
        }
    }
    let throttle = state.behaviour.throttle_once.lock().unwrap().take();
    if let Some(seconds) = throttle {
        *state.throttled_at.lock().unwrap() = Some((room, std::time::Instant::now()));
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", seconds.to_string())],
        )
            .into_response();
    }
    if state
        .behaviour
        .fail_every
        .is_some_and(|every| n % every == 0)
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let stall = state.behaviour.stall_once.lock().unwrap().take();
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    }
    let mut seen = state.seen.lock().unwrap();
    for event in body["events"].as_array().expect("events").iter().cloned() {
        seen.raw.push(event.clone());
        if event["type"] == "gap" {
            seen.gaps.push(event);
            continue;
        }
        let room = event["room"].as_str().unwrap().to_owned();
        let seq = event["seq"].as_u64().unwrap();
        let high = seen.high.get(&room).copied().unwrap_or(0);
        let gap_covers = seen.gaps.iter().any(|g| {
            g["room"] == room.as_str()
                && g["from_seq"].as_u64() == Some(high + 1)
                && g["to_seq"].as_u64().is_some_and(|to| to + 1 >= seq)
        });
        if seq > high + 1 && !gap_covers && !state.behaviour.sparse {
            seen.out_of_order
                .push(format!("{room}: seq {seq} after {high}"));
        }
        seen.high.insert(room.clone(), high.max(seq));
        let epoch = event["epoch"].as_str().expect("epoch").to_owned();
        seen.kept.insert((room, epoch, seq), event);
    }
    drop(seen);
    state.changed.notify_waiters();
    StatusCode::NO_CONTENT.into_response()
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, behaviour)
    }

    /// Listens on `addr` (where parley has been failing to connect), retrying the bind.
    async fn start_at(addr: SocketAddr, behaviour: Behaviour) -> Receiver {
        for _ in 0..100 {
            if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
                return Self::serve(listener, behaviour);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot bind the receiver to {addr}");
    }

    fn serve(listener: tokio::net::TcpListener, behaviour: Behaviour) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ReceiverState {
            behaviour,
            requests: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
            changed: Notify::new(),
            held: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            throttled_at: Mutex::new(None),
            after_throttle: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Waits until `check` holds for what the receiver has seen.
    async fn wait_until(&self, what: &str, check: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if check(&self.state.seen.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen = self.state.seen.lock().unwrap();
                panic!(
                    "timed out waiting for {what}; kept {} events, high {:?}, gaps {:?}",
                    seen.kept.len(),
                    seen.high,
                    seen.gaps
                );
            }
        }
    }

    /// Waits until every seq up to `head` of each room was received.
    async fn wait_for_heads(&self, heads: &[(&str, u64)]) {
        self.wait_until("every event", |seen| {
            heads
                .iter()
                .all(|(room, head)| seen.high.get(*room).copied().unwrap_or(0) >= *head)
        })
        .await;
    }

    /// Waits until a request is being held.
    async fn wait_held(&self) {
        self.wait_state(|state| state.held.load(Ordering::SeqCst))
            .await;
    }

    /// Waits until `check` holds for the receiver's counters.
    async fn wait_state(&self, check: impl Fn(&ReceiverState) -> bool) {
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if check(&self.state) {
                return;
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .expect("a held request");
        }
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.state.seen.lock().unwrap())
    }

    /// The events kept for `room`, as `(seq, type, content)`, in seq order.
    fn kept(&self, room: &str) -> Vec<(u64, String, String)> {
        self.seen(|seen| {
            seen.kept
                .iter()
                .filter(|((r, _, _), _)| r == room)
                .map(|((_, _, seq), e)| {
                    (
                        *seq,
                        e["type"].as_str().unwrap().to_owned(),
                        e["content"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
    }

    fn assert_clean(&self) {
        assert_eq!(
            self.state.bad_signatures.load(Ordering::SeqCst),
            0,
            "every request carries a valid signature"
        );
        self.seen(|seen| assert!(seen.out_of_order.is_empty(), "{:?}", seen.out_of_order));
    }
}

/// A port nobody listens on right now (parley's POSTs to it are refused).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Posts a message through the HTTP API; returns its seq.
async fn api_post(base: &str, room: &str, content: &str) -> u64 {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/rooms/{room}/messages"))
        .bearer_auth(API_KEY)
        .json(&json!({"user": "bot", "content": content}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// A room's whole log through the HTTP API, as `(seq, type, content)`.
async fn api_log(base: &str, room: &str) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = crate::common::api_json(
            &format!("{base}/api/rooms/{room}/messages?after={after}&limit=200"),
            API_KEY,
        )
        .await;
        for m in page["messages"].as_array().unwrap() {
            after = m["seq"].as_u64().unwrap();
            out.push((
                after,
                m["type"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        if page["more"] != true {
            return out;
        }
    }
}

/// Waits until the node at `base` no longer lists `room` (forgotten as empty).
async fn wait_forgotten(base: &str, room: &str) {
    let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let rooms = crate::common::api_json(&format!("{base}/api/rooms"), API_KEY).await;
        if !rooms["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["room"] == room)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "room {room} forgotten"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A single node with webhooks to `url`.
fn hooked(url: &str) -> crate::common::Builder {
    TestServer::builder()
        .set("api.key", API_KEY)
        .set("webhooks.url", url)
        .set("webhooks.secret", SECRET)
}

#[tokio::test]
async fn members_frames_arrive_signed_with_their_epoch() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let server = hooked(&receiver.url()).start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut bob = server.user("bob").await;
    bob.join("r").await;
    let (ack, _) = alice.post("r", "hello", "c-1").await;
    let mut frame = bob.skip_until("message").await;
    bob.send(json!({"type": "leave", "room": "r"})).await;
    bob.recv_type("left").await;
    let head = crate::common::seq(&ack) + 1;
    receiver.wait_for_heads(&[("r", head)]).await;
    receiver.assert_clean();

    let events = receiver.seen(|s| s.raw.clone());
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["event"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("system", "join"),
            ("system", "join"),
            ("message", ""),
            ("system", "leave")
        ]
    );
    let message = &events[2];
    // The member frame, field for field, plus the epoch.
    frame["epoch"] = epoch.clone().into();
    assert_eq!(message, &frame);
    assert_eq!(message["id"], "c-1");
    assert_eq!(message["user"], "alice");
    assert!(events.iter().all(|e| e["epoch"] == epoch.as_str()));
    assert_eq!(events[3]["user"], "bob");
    assert!(events[1]["ts"].is_string() && events[1]["name"] == "bob");
    let base = server.http_url("");
    assert!(
        metric(
            &base,
            "parley_webhook_deliveries_total{result=\"delivered\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(metric(&base, "parley_webhook_events_total").await, 4.0);
}

#[tokio::test]
async fn events_and_rooms_settings_choose_what_is_sent() {
    let receiver = Receiver::start(Behaviour {
        sparse: true,
        ..Behaviour::default()
    })
    .await;
    let server = hooked(&receiver.url())
        .set(
            "webhooks.events",
            toml::Value::Array(vec!["message".into()]),
        )
        .set("webhooks.rooms", toml::Value::Array(vec!["news.*".into()]))
        .start()
        .await;
    let mut alice = server.user("alice").await;
    alice.join("news.today").await;
    alice.join("chat").await;
    alice.post("chat", "not for the backend", "c-1").await;
    let (ack, _) = alice.post("news.today", "headline", "c-2").await;
    receiver
        .wait_for_heads(&[("news.today", crate::common::seq(&ack))])
        .await;
    receiver.assert_clean();
    let raw = receiver.seen(|s| s.raw.clone());
    assert_eq!(raw.len(), 1, "only the message of a matching room: {raw:?}");
    assert_eq!(raw[0]["content"], "headline");
    assert_eq!(
        raw[0]["seq"], 2,
        "the join before it took seq 1 and was left out"
    );
}

#[tokio::test]
async fn retried_through_failures_a_429_and_a_stall_in_order_and_complete() {
    let receiver = Receiver::start(Behaviour {
        fail_every: Some(3),
        stall_once: Mutex::new(Some(Duration::from_millis(1500))),
        throttle_once: Mutex::new(Some(1)),
        ..Behaviour::default()
    })
    .await;
    let server = hooked(&receiver.url())
        .set("webhooks.timeout_ms", 500)
        .set("webhooks.batch_max", 4)
        .start()
        .await;
    let base = server.http_url("");
    let rooms = ["a", "b", "c"];
    let mut posts = Vec::new();
    for room in rooms {
        let base = base.clone();
        posts.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..30 {
                last = api_post(&base, room, &format!("{room}{i}")).await;
            }
            last
        }));
    }
    let mut heads = Vec::new();
    for (room, post) in rooms.iter().zip(posts) {
        heads.push((*room, post.await.unwrap()));
    }
    receiver.wait_for_heads(&heads).await;
    receiver.assert_clean();
    for room in rooms {
        assert_eq!(
            receiver.kept(room),
            api_log(&base, room).await,
            "room {room}"
        );
    }
    assert!(
        metric(
            &base,
            "parley_webhook_deliveries_total{result=\"http_error\"}"
        )
        .await
            >= 1.0
    );
    assert!(metric(&base, "parley_webhook_deliveries_total{result=\"timeout\"}").await >= 1.0);
    assert_eq!(
        metric(
            &base,
            "parley_webhook_deliveries_total{result=\"throttled\"}"
        )
        .await,
        1.0
    );
    // The 429 asked for a second; the first backoff alone would be 0.2 s.
    let waited = receiver
        .state
        .after_throttle
        .lock()
        .unwrap()
        .expect("a retry");
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After honoured: {waited:?}"
    );
    assert!(metric(&base, "parley_webhook_retries_total").await >= 2.0);
    // Every message at least once (a timed-out batch may have been recorded too).
    assert!(metric(&base, "parley_webhook_events_total").await >= 90.0);
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_everything_once_back() {
    let addr = free_addr();
    let url = format!("http://{addr}/hook");
    let server = hooked(&url).start().await;
    let base = server.http_url("");
    let mut heads = Vec::new();
    for room in ["x", "y"] {
        let mut last = 0;
        for i in 0..20 {
            last = api_post(&base, room, &format!("{room}{i}")).await;
        }
        heads.push((room, last));
    }
    // Refused, retried, and the backlog stays in the log: the lag shows it.
    let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
    while metric(
        &base,
        "parley_webhook_deliveries_total{result=\"unreachable\"}",
    )
    .await
        < 2.0
        || metric(&base, "parley_webhook_lag_events").await < 20.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused deliveries counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let receiver = Receiver::start_at(addr, Behaviour::default()).await;
    receiver.wait_for_heads(&heads).await;
    receiver.assert_clean();
    for (room, _) in &heads {
        assert_eq!(receiver.kept(room), api_log(&base, room).await);
    }
    assert!(receiver.seen(|s| s.gaps.is_empty()));
}

#[tokio::test]
async fn what_retention_dropped_first_is_reported_as_a_gap() {
    let addr = free_addr();
    let url = format!("http://{addr}/hook");
    let server = hooked(&url).set("history.max_len", 5).start().await;
    let base = server.http_url("");
    let mut last = 0;
    for i in 0..12 {
        last = api_post(&base, "g", &format!("g{i}")).await;
    }
    let receiver = Receiver::start_at(addr, Behaviour::default()).await;
    receiver.wait_for_heads(&[("g", last)]).await;
    receiver.assert_clean();
    // The batch read before the receiver came back may still hold the first events; what
    // retention dropped after it is a gap. Together they account for every seq exactly once.
    let gaps = receiver.seen(|s| s.gaps.clone());
    assert!(!gaps.is_empty());
    let mut covered: Vec<u64> = receiver.kept("g").iter().map(|e| e.0).collect();
    for gap in &gaps {
        assert_eq!(
            (&gap["room"], &gap["reason"]),
            (&json!("g"), &json!("retention"))
        );
        assert!(gap["epoch"].is_string());
        let (from, to) = (
            gap["from_seq"].as_u64().unwrap(),
            gap["to_seq"].as_u64().unwrap(),
        );
        covered.extend(from..=to);
    }
    covered.sort_unstable();
    assert_eq!(covered, (1..=last).collect::<Vec<_>>(), "{gaps:?}");
    let kept: Vec<u64> = receiver.kept("g").iter().map(|e| e.0).collect();
    assert!(
        kept.ends_with(&(last - 4..=last).collect::<Vec<_>>()),
        "{kept:?}"
    );
    assert_eq!(
        metric(&base, "parley_webhook_gaps_total").await,
        gaps.len() as f64
    );
}

/// A `parley` process, so it can be SIGKILLed.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    async fn start(args: &[String]) -> Node {
        let addr = free_addr();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PARLEY_") {
                cmd.env_remove(&key);
            }
        }
        let child = cmd
            .args(["--bind", &addr.to_string(), "--api-key", API_KEY])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start parley");
        let node = Node {
            child,
            base: format!("http://{addr}"),
        };
        common::wait_ready(&node.base, Duration::from_secs(30)).await;
        node
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hook_args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--set".to_owned(),
        format!("webhooks.url={url}"),
        "--set".to_owned(),
        format!("webhooks.secret={SECRET}"),
        "--set".to_owned(),
        "webhooks.timeout_ms=1000".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test]
async fn a_killed_node_loses_nothing_and_its_cursor_survives() {
    let (release, hold) = watch::channel(true);
    let receiver = Receiver::start(Behaviour {
        hold: Some(hold),
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("parley.db").display().to_string();
    let args = hook_args(
        &receiver.url(),
        &["--db", &db, "--set", "webhooks.batch_max=5"],
    );
    let first = Node::start(&args).await;
    let mut last = 0;
    for i in 0..20 {
        last = api_post(&first.base, "k", &format!("k{i}")).await;
    }
    // The first batch is in flight, unanswered: SIGKILL.
    receiver.wait_held().await;
    first.kill();
    release.send(false).unwrap();
    let second = Node::start(&args).await;
    receiver.wait_for_heads(&[("k", last)]).await;
    receiver.assert_clean();
    assert_eq!(receiver.kept("k"), api_log(&second.base, "k").await);
    // Delivered means recorded: a third run sends only what is new.
    second.kill();
    let delivered = receiver.seen(|s| s.raw.len());
    let third = Node::start(&args).await;
    let next = api_post(&third.base, "k", "after the restarts").await;
    receiver.wait_for_heads(&[("k", next)]).await;
    let raw = receiver.seen(|s| s.raw[delivered..].to_vec());
    assert_eq!(raw.len(), 1, "only the new event: {raw:?}");
    assert_eq!(raw[0]["content"], "after the restarts");
}

#[tokio::test]
async fn in_a_cluster_a_killed_node_rooms_are_taken_over() {
    let redis = RedisServer::start();
    let (release, hold) = watch::channel(true);
    let receiver = Receiver::start(Behaviour {
        hold: Some(hold),
        ..Behaviour::default()
    })
    .await;
    let args = hook_args(
        &receiver.url(),
        &["--redis", &redis.url(), "--set", "webhooks.batch_max=5"],
    );
    let doomed = Node::start(&args).await;
    let mut heads = Vec::new();
    for room in ["m", "n"] {
        let mut last = 0;
        for i in 0..15 {
            last = api_post(&doomed.base, room, &format!("{room}{i}")).await;
        }
        heads.push((room, last));
    }
    receiver.wait_held().await;
    let survivor = hooked(&receiver.url())
        .set("redis.urls", toml::Value::Array(vec![redis.url().into()]))
        .set("webhooks.timeout_ms", 1000)
        .set("webhooks.batch_max", 5)
        .start()
        .await;
    doomed.kill();
    release.send(false).unwrap();
    receiver.wait_for_heads(&heads).await;
    receiver.assert_clean();
    let base = survivor.http_url("");
    for (room, _) in &heads {
        assert_eq!(
            receiver.kept(room),
            api_log(&base, room).await,
            "room {room}"
        );
    }
}

#[tokio::test]
async fn in_a_cluster_each_room_is_delivered_by_one_node_in_order() {
    let redis = RedisServer::start();
    let receiver = Receiver::start(Behaviour {
        fail_every: Some(3),
        ..Behaviour::default()
    })
    .await;
    let node = |redis: &RedisServer| {
        hooked(&receiver.url())
            .set("redis.urls", toml::Value::Array(vec![redis.url().into()]))
            .set("webhooks.batch_max", 3)
            .start()
    };
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut heads = Vec::new();
    for room in ["p", "q", "r"] {
        let mut last = 0;
        for i in 0..12 {
            let via = if i % 2 == 0 { &a } else { &b };
            last = api_post(&via.http_url(""), room, &format!("{room}{i}")).await;
        }
        heads.push((room, last));
    }
    receiver.wait_for_heads(&heads).await;
    receiver.assert_clean();
    for (room, _) in &heads {
        assert_eq!(receiver.kept(room), api_log(&a.http_url(""), room).await);
    }
    // Failed requests (500) are not recorded, so two nodes sending one room's batch would
    // show as duplicates: there are none.
    let (raw, kept) = receiver.seen(|s| (s.raw.len(), s.kept.len()));
    assert_eq!(raw, kept, "each event arrived once");
}

#[test]
fn bad_webhook_settings_are_refused_with_their_name() {
    use parley::config::{Config, Overrides};
    let load = |pairs: &[(&str, toml::Value)]| {
        Config::load(&Overrides {
            config_file: None,
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        })
    };
    let err = load(&[("webhooks.url", "http://127.0.0.1:9/h".into())]).unwrap_err();
    assert!(err.to_string().contains("webhooks.secret"), "{err}");
    let err = load(&[
        ("webhooks.url", "ftp://x/".into()),
        ("webhooks.secret", "s".into()),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("webhooks.url"), "{err}");
    let err = load(&[("webhooks.events", "message,typing".into())]).unwrap_err();
    assert!(err.to_string().contains("typing"), "{err}");
    let err = load(&[("webhooks.rooms", toml::Value::Array(vec!["a[".into()]))]).unwrap_err();
    assert!(err.to_string().contains("webhooks.rooms"), "{err}");
    let err = load(&[("webhooks.batch_max", 0.into())]).unwrap_err();
    assert!(err.to_string().contains("webhooks.batch_max"), "{err}");
    let ok = load(&[("webhooks.events", "message, join".into())]).unwrap();
    assert_eq!(ok.webhooks.events.len(), 2);
}

#[tokio::test]
async fn a_room_made_afresh_is_announced_by_an_epoch_gap() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let server = hooked(&receiver.url())
        .set("history.empty_room_ttl_s", 1)
        .start()
        .await;
    let base = server.http_url("");
    let mut alice = server.user("alice").await;
    let first = alice.join("t").await["epoch"].as_str().unwrap().to_owned();
    alice.send(json!({"type": "leave", "room": "t"})).await;
    alice.recv_type("left").await;
    receiver.wait_for_heads(&[("t", 2)]).await;
    // Only join/leave events and nobody in it: the room is forgotten.
    wait_forgotten(&base, "t").await;
    let second = alice.join("t").await["epoch"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    let key = ("t".to_owned(), second.clone(), 1);
    receiver
        .wait_until("the new epoch's join", |seen| seen.kept.contains_key(&key))
        .await;
    receiver.assert_clean();
    let raw = receiver.seen(|s| s.raw.clone());
    let gap = &raw[2];
    assert_eq!(gap["type"], "gap", "{raw:?}");
    assert_eq!(
        (&gap["epoch"], &gap["from_seq"], &gap["reason"]),
        (&json!(first), &json!(3), &json!("epoch"))
    );
    assert!(gap.get("to_seq").is_none());
    assert_eq!(
        (&raw[3]["epoch"], &raw[3]["seq"]),
        (&json!(second), &json!(1))
    );
}

#[tokio::test]
async fn a_stuck_receiver_holds_at_most_the_bounded_rooms_in_flight() {
    let (release, hold) = watch::channel(true);
    let receiver = Receiver::start(Behaviour {
        hold: Some(hold),
        ..Behaviour::default()
    })
    .await;
    let server = hooked(&receiver.url()).start().await;
    let base = server.http_url("");
    let bound = parley::webhooks::ROOMS_IN_FLIGHT as u64;
    let rooms: Vec<String> = (0..bound * 3).map(|i| format!("many-{i}")).collect();
    for room in &rooms {
        api_post(&base, room, "one").await;
    }
    // The receiver answers nothing: the deliverer fills its rooms in flight and stops there;
    // the other rooms' events wait in the log.
    receiver
        .wait_state(|state| state.in_flight.load(Ordering::SeqCst) == bound)
        .await;
    release.send(false).unwrap();
    let heads: Vec<(&str, u64)> = rooms.iter().map(|r| (r.as_str(), 1)).collect();
    receiver.wait_for_heads(&heads).await;
    receiver.assert_clean();
    assert_eq!(receiver.state.max_in_flight.load(Ordering::SeqCst), bound);
}

/// In a cluster a forgotten room's webhook cursor outlives it (it reports the epoch gap). When
/// the room's new life has already passed the old cursor's seq by the time a deliverer looks
/// (here: no node with webhooks ran meanwhile), the new epoch is still delivered from seq 1;
/// before, the deliverer read after the old cursor's seq and skipped the new life's first
/// events without a word.
#[tokio::test]
async fn in_a_cluster_a_room_made_afresh_past_its_old_cursor_is_delivered_from_seq_1() {
    let redis = RedisServer::start();
    let receiver = Receiver::start(Behaviour::default()).await;
    let node = |hooks: bool| {
        let builder = if hooks {
            hooked(&receiver.url())
        } else {
            TestServer::builder().set("api.key", API_KEY)
        };
        builder
            .set("redis.urls", toml::Value::Array(vec![redis.url().into()]))
            .set("history.empty_room_ttl_s", 1)
            .start()
    };
    // A process, so that its deliverer is gone for good when it is killed.
    let first = Node::start(&hook_args(
        &receiver.url(),
        &[
            "--redis",
            &redis.url(),
            "--set",
            "history.empty_room_ttl_s=1",
        ],
    ))
    .await;
    let ws = first.base.replacen("http", "ws", 1);
    let mut alice = Client::connect(&format!("{ws}/ws?user=alice"))
        .await
        .unwrap();
    alice.recv_type("authenticated").await;
    let old = alice.join("t").await["epoch"].as_str().unwrap().to_owned();
    alice.send(json!({"type": "leave", "room": "t"})).await;
    alice.recv_type("left").await;
    receiver.wait_for_heads(&[("t", 2)]).await;
    let cursor = parley::cluster::keys::hook_cursor("t");
    let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
    while redis.cli(&["HGET", &cursor, "seq"]).trim() != "2" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cursor moves to seq 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(alice);
    first.kill();

    // A node without webhooks forgets the room, and its new life outgrows the old one.
    let plain = node(false).await;
    let base = plain.http_url("");
    wait_forgotten(&base, "t").await;
    let mut bob = plain.user("bob").await;
    let new = bob.join("t").await["epoch"].as_str().unwrap().to_owned();
    assert_ne!(old, new);
    let mut head = 1;
    for i in 0..3 {
        let (ack, _) = bob.post("t", &format!("new {i}"), &format!("n{i}")).await;
        head = ack["seq"].as_u64().unwrap();
    }
    assert_eq!(head, 4, "the new life is past the old cursor (seq 2)");

    let _hooked = node(true).await;
    let keys: Vec<_> = (1..=head)
        .map(|seq| ("t".to_owned(), new.clone(), seq))
        .collect();
    receiver
        .wait_until("the new epoch from seq 1", |seen| {
            keys.iter().all(|key| seen.kept.contains_key(key))
        })
        .await;
    receiver.assert_clean();
    let gaps = receiver.seen(|s| s.gaps.clone());
    assert!(
        gaps.iter()
            .any(|g| g["epoch"] == old.as_str() && g["reason"] == "epoch"),
        "the old epoch's end is announced: {gaps:?} {:?}",
        receiver.seen(|s| s.raw.clone())
    );
}
