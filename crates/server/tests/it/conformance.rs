//! One contract, two brokers: every scenario here runs once against a single node (the SQLite
//! sequencer) and once against a cluster (two nodes over one `redis-server`, the Redis broker
//! and Redis presence). Where a scenario has two connections they sit on two different nodes
//! of the cluster; on one node they share the server. Real servers, real WebSocket clients,
//! a real `redis-server` child process.
//!
//! `conformance!` at the bottom turns each scenario into `single_node::<name>` and
//! `cluster::<name>`.

use crate::common;
use crate::redis_server;

use std::time::Duration;

use common::{seqs, Client, TestServer};
use redis_server::RedisServer;
use serde_json::{json, Value};

/// Which broker a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One node, SQLite.
    Single,
    /// Two nodes sharing one Redis.
    Cluster,
}

const API_KEY: &str = "conformance-key";

/// The servers of one scenario.
struct Nodes {
    servers: Vec<TestServer>,
    _redis: Option<RedisServer>,
}

impl Nodes {
    /// One node, or two cluster nodes over a fresh `redis-server`, with `settings` on each
    /// (and generous send limits: these scenarios are about order, not rate limits).
    async fn start(mode: Mode, settings: &[(&str, toml::Value)]) -> Nodes {
        let redis = (mode == Mode::Cluster).then(RedisServer::start);
        let count = if redis.is_some() { 2 } else { 1 };
        let mut servers = Vec::with_capacity(count);
        for _ in 0..count {
            let mut builder = TestServer::builder()
                .set("limits.send_rate", 10_000)
                .set("limits.send_burst", 10_000)
                .set("api.key", API_KEY);
            if let Some(redis) = &redis {
                builder = builder.set("redis.urls", toml::Value::Array(vec![redis.url().into()]));
            }
            for (key, value) in settings {
                builder = builder.set(key, value.clone());
            }
            servers.push(builder.start().await);
        }
        Nodes {
            servers,
            _redis: redis,
        }
    }

    /// Node `i`: in a cluster, 0 and 1 are different nodes; alone, both are the one server.
    fn node(&self, i: usize) -> &TestServer {
        &self.servers[i % self.servers.len()]
    }

    /// `GET path` of the HTTP API on node `i`, with the key.
    async fn api_get(&self, i: usize, path: &str) -> Value {
        common::api_json(&self.node(i).http_url(path), API_KEY).await
    }

    /// `POST /api/rooms/{room}/messages` on node `i` as `user`; returns the status and body.
    async fn api_post(&self, i: usize, room: &str, user: &str, content: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(
                self.node(i)
                    .http_url(&format!("/api/rooms/{room}/messages")),
            )
            .bearer_auth(API_KEY)
            .json(&json!({"user": user, "content": content}))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The people in `room` as `GET /api/rooms/{room}/users` on node `i` reports them.
    async fn users(&self, i: usize, room: &str) -> Vec<String> {
        let body = self.api_get(i, &format!("/api/rooms/{room}/users")).await;
        body["users"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"))
            .iter()
            .map(|u| u.as_str().unwrap().to_owned())
            .collect()
    }
}

/// `(event, user)` of the system frames among `frames`.
fn events(frames: &[Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter(|f| f["type"] == "system")
        .map(|f| {
            (
                f["event"].as_str().unwrap().to_owned(),
                f["user"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn ev(event: &str, user: &str) -> (String, String) {
    (event.to_owned(), user.to_owned())
}

fn contents(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Posts a marker and returns every frame that arrived before the marker's own copy and ack
/// (both consumed). Events are delivered in seq order, so everything sequenced before the
/// marker is among them.
async fn until_marker(client: &mut Client, room: &str, marker: &str) -> Vec<Value> {
    mark(client, room, marker).await.1
}

/// [`until_marker`], also returning the marker's seq.
async fn mark(client: &mut Client, room: &str, marker: &str) -> (u64, Vec<Value>) {
    client
        .send(json!({"type": "send", "room": room, "content": marker, "id": marker}))
        .await;
    let mut before = Vec::new();
    let (mut acked, mut seen) = (None, false);
    while !(acked.is_some() && seen) {
        let frame = client.recv().await;
        if frame["type"] == "ack" && frame["id"] == marker {
            acked = frame["seq"].as_u64();
        } else if frame["type"] == "message" && frame["id"] == marker {
            seen = true;
        } else {
            before.push(frame);
        }
    }
    (acked.unwrap(), before)
}

/// Reads until the system event `event` of `user`; returns it.
async fn wait_event(client: &mut Client, event: &str, user: &str) -> Value {
    loop {
        let frame = client.skip_until("system").await;
        if frame["event"] == event && frame["user"] == user {
            // Anonymous users' display name is their id; both brokers say so on the event.
            assert_eq!(frame["name"], user, "{frame}");
            return frame;
        }
    }
}

/// Joins `room` (skipping frames of other rooms still queued); returns `joined`.
async fn join(client: &mut Client, room: &str) -> Value {
    client.send(json!({"type": "join", "room": room})).await;
    client.skip_until("joined").await
}

async fn send_n(client: &mut Client, who: &str, n: usize) {
    for i in 0..n {
        client
            .send(json!({"type": "send", "room": "r", "content": format!("{who} {i}"), "id": format!("{who}-{i}")}))
            .await;
    }
}

/// Reads until a sequenced frame (message or system) with `seq` arrives; returns the sequenced
/// frames read, that one included.
async fn read_to_seq(client: &mut Client, seq: u64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let frame = client.recv().await;
        if frame["seq"].is_u64() && frame["type"] != "ack" {
            let s = frame["seq"].as_u64().unwrap();
            out.push(frame);
            if s >= seq {
                return out;
            }
        }
    }
}

/// A `history` request; returns the page's events and `more`.
async fn history(client: &mut Client, room: &str, query: Value) -> (Vec<Value>, bool) {
    let mut request = json!({"type": "history", "room": room});
    request
        .as_object_mut()
        .unwrap()
        .extend(query.as_object().unwrap().clone());
    client.send(request).await;
    let page = client.skip_until("history").await;
    (
        page["messages"].as_array().unwrap().clone(),
        page["more"].as_bool().unwrap(),
    )
}

/// A join with `since` and `epoch`; returns the `joined` frame.
async fn join_since(client: &mut Client, room: &str, since: u64, epoch: &str) -> Value {
    client
        .send(json!({"type": "join", "room": room, "since": since, "epoch": epoch}))
        .await;
    client.skip_until("joined").await
}

fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// Concurrent senders on both nodes: every member sees one contiguous sequence, the same frames
/// byte for byte, each sender's messages in the order sent; each ack names the seq its message
/// was delivered with; history is what was delivered.
async fn one_order_for_concurrent_senders(mode: Mode) {
    let nodes = Nodes::start(mode, &[]).await;
    let mut alice = nodes.node(0).user("alice").await;
    let mut bob = nodes.node(1).user("bob").await;
    let mut carol = nodes.node(0).user("carol").await;
    let mut dave = nodes.node(1).user("dave").await;
    for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
        c.join("r").await;
    }
    // Everyone reads up to a marker, past the join events.
    let (start, _) = mark(&mut alice, "r", "start").await;
    for c in [&mut bob, &mut carol, &mut dave] {
        read_to_seq(c, start).await;
    }

    const N: usize = 30;
    tokio::join!(send_n(&mut alice, "alice", N), send_n(&mut bob, "bob", N));

    // Each reads 2N messages; the senders also their N acks.
    let mut seen = Vec::new();
    let mut acks = Vec::new();
    for (c, sender) in [
        (&mut alice, true),
        (&mut bob, true),
        (&mut carol, false),
        (&mut dave, false),
    ] {
        let (mut messages, mut acked) = (Vec::new(), Vec::new());
        while messages.len() < 2 * N || (sender && acked.len() < N) {
            let frame = c.recv().await;
            match frame["type"].as_str() {
                Some("message") => messages.push(frame),
                Some("ack") => acked.push(frame),
                other => panic!("unexpected {other:?}: {frame}"),
            }
        }
        seen.push(messages);
        acks.push(acked);
    }
    let first = seqs(&seen[0]);
    assert_eq!(first, range(start + 1, start + 2 * N as u64), "contiguous");
    for other in &seen[1..] {
        assert_eq!(
            other, &seen[0],
            "every member sees the same frames in the same order"
        );
    }
    for who in ["alice", "bob"] {
        let mine = common::contents_by(&seen[0], who);
        let sent: Vec<String> = (0..N).map(|i| format!("{who} {i}")).collect();
        assert_eq!(mine, sent, "{who}'s messages keep their order");
    }
    // Acks come in send order and name the seq each message was delivered with.
    for acked in &acks[..2] {
        let mut last = 0;
        for ack in acked {
            let seq = ack["seq"].as_u64().unwrap();
            assert!(seq > last, "acks in send order: {acked:?}");
            last = seq;
            let delivered = seen[0].iter().find(|f| f["id"] == ack["id"]).unwrap();
            assert_eq!(delivered["seq"], ack["seq"], "{ack}");
        }
    }
    // The log, read through the other node, is what was delivered.
    let mut eve = nodes.node(1).user("eve").await;
    let (page, more) = history(&mut eve, "r", json!({"after": start, "limit": 200})).await;
    assert!(!more);
    assert_eq!(page, seen[0], "history equals what was delivered");
}

/// An ack is sent after the store: the message is readable through another node as soon as
/// the ack arrives. A resend of the same `id` by the same user, from any tab on any node,
/// answers the original seq and posts nothing; ids are per user and per room.
async fn acks_follow_the_store_and_resends_are_deduplicated(mode: Mode) {
    let nodes = Nodes::start(mode, &[]).await;
    let mut tab1 = nodes.node(0).user("alice").await;
    tab1.join("r").await;
    let mut tab2 = nodes.node(1).user("alice").await;
    tab2.join("r").await;
    let mut bob = nodes.node(1).user("bob").await;
    bob.join("r").await;
    let mut reader = nodes.node(1).user("reader").await;

    let (ack, _) = tab1.post("r", "hello", "c-1").await;
    let seq = ack["seq"].as_u64().unwrap();
    let (page, _) = history(&mut reader, "r", json!({"after": seq - 1, "limit": 1})).await;
    assert_eq!(page.len(), 1, "acked means stored: {page:?}");
    assert_eq!(
        (&page[0]["seq"], &page[0]["id"], &page[0]["content"]),
        (&json!(seq), &json!("c-1"), &json!("hello"))
    );
    let got = read_to_seq(&mut bob, seq).await;
    assert_eq!(got.last().unwrap()["id"], "c-1");

    // The same id and text again, from the other tab on the other node: the original seq,
    // flagged as a duplicate, nothing posted.
    let (again, _) = tab2.post("r", "hello", "c-1").await;
    assert_eq!(again["seq"], seq, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    let before = until_marker(&mut bob, "r", "m1").await;
    assert!(before.is_empty(), "a resend posts nothing: {before:?}");

    // Another user's id is theirs; the same id in another room is another message.
    let (theirs, _) = bob.post("r", "hello", "c-1").await;
    assert!(theirs["seq"].as_u64().unwrap() > seq);
    join(&mut tab1, "r2").await;
    let (other_room, _) = tab1.post("r2", "hello", "c-1").await;
    assert_eq!(other_room["room"], "r2");
    let (page, _) = history(&mut reader, "r2", json!({})).await;
    assert_eq!(contents(&page), ["hello"]);

    let (page, _) = history(&mut reader, "r", json!({"limit": 200})).await;
    let ids: Vec<(&Value, &Value)> = page
        .iter()
        .filter(|f| f["id"] == "c-1")
        .map(|f| (&f["user"], &f["seq"]))
        .collect();
    assert_eq!(
        ids,
        [
            (&json!("alice"), &json!(seq)),
            (&json!("bob"), &theirs["seq"])
        ]
    );
}

/// `joined` carries the latest `history.on_join` events (the joiner's own join last); a
/// rejoin on another node with `since`/`epoch` gets exactly the events it missed
/// (`recovered: true`) and then the live stream without a gap or a duplicate; a wrong epoch,
/// or a `since` beyond the head, gives `recovered: false` and the latest events instead.
async fn joined_history_and_since_recovery(mode: Mode) {
    let nodes = Nodes::start(mode, &[("history.on_join", 5.into())]).await;
    let mut alice = nodes.node(0).user("alice").await;
    let joined = alice.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    assert_eq!(joined["seq"], 1);
    assert_eq!(
        events(joined["history"].as_array().unwrap()),
        [ev("join", "alice")]
    );
    assert!(
        joined.get("recovered").is_none(),
        "only with since: {joined}"
    );
    for i in 0..10 {
        alice.post("r", &format!("m{i}"), &format!("c{i}")).await;
    }

    let mut bob = nodes.node(1).user("bob").await;
    let joined = bob.join("r").await;
    let head = joined["seq"].as_u64().unwrap();
    assert_eq!(head, 12);
    assert_eq!(joined["epoch"], epoch.as_str(), "one epoch per room");
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    assert_eq!(joined["user_count"], 2);
    let history = joined["history"].as_array().unwrap();
    assert_eq!(seqs(history), range(head - 4, head), "the latest on_join");
    assert_eq!(events(&history[4..]), [ev("join", "bob")]);
    assert_eq!(contents(history), ["m6", "m7", "m8", "m9"]);

    // Bob goes away; meanwhile his leave and three messages are sequenced.
    bob.close().await;
    let leave = wait_event(&mut alice, "leave", "bob").await;
    assert_eq!(leave["seq"], head + 1);
    for i in 10..13 {
        alice.post("r", &format!("m{i}"), &format!("c{i}")).await;
    }

    // He comes back through the other node.
    let mut bob = nodes.node(0).user("bob").await;
    let joined = join_since(&mut bob, "r", head, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["truncated"], false);
    let now = joined["seq"].as_u64().unwrap();
    let missed = joined["history"].as_array().unwrap();
    assert_eq!(seqs(missed), range(head + 1, now), "exactly what he missed");
    assert_eq!(contents(missed), ["m10", "m11", "m12"]);
    assert_eq!(
        events(missed),
        [ev("leave", "bob"), ev("join", "bob")],
        "his own join ends it"
    );
    // The live stream continues right after `joined.seq`.
    let (ack, _) = alice.post("r", "live", "live").await;
    assert_eq!(ack["seq"], now + 1);
    let live = read_to_seq(&mut bob, now + 1).await;
    assert_eq!(seqs(&live), [now + 1], "no gap, no duplicate");

    // A wrong epoch, or a since beyond the head: not recovered, the latest events instead.
    for (since, epoch) in [(head, "not-the-epoch"), (now + 100, epoch.as_str())] {
        let mut carol = nodes.node(1).user("carol").await;
        let joined = join_since(&mut carol, "r", since, epoch).await;
        assert_eq!(joined["recovered"], false, "{joined}");
        let seq = joined["seq"].as_u64().unwrap();
        assert_eq!(
            seqs(joined["history"].as_array().unwrap()),
            range(seq - 4, seq)
        );
        carol.close().await;
        wait_event(&mut alice, "leave", "carol").await;
    }
    // since = the head: recovered, with only what came since (the joiner's own join).
    let (ack, _) = alice.post("r", "last", "last").await;
    let last = ack["seq"].as_u64().unwrap();
    let mut dave = nodes.node(1).user("dave").await;
    let joined = join_since(&mut dave, "r", last, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(
        events(joined["history"].as_array().unwrap()),
        [ev("join", "dave")]
    );
    assert_eq!(joined["seq"], last + 1);
}

/// `history` paging with `before`, `after` and `limit`, and its `more` flag, on the same log.
async fn history_pages(mode: Mode) {
    let nodes = Nodes::start(mode, &[]).await;
    let mut alice = nodes.node(0).user("alice").await;
    alice.join("r").await;
    for i in 2..=31 {
        alice.post("r", &format!("m{i}"), &format!("c{i}")).await;
    }
    // The log: seq 1 is alice's join, 2..=31 her messages. Read from the other node.
    let mut bob = nodes.node(1).user("bob").await;
    let max = u64::MAX;
    let cases: Vec<(Value, Vec<u64>, bool)> = vec![
        (json!({}), range(1, 31), false),
        (json!({"limit": 7}), range(25, 31), true),
        (json!({"limit": 31}), range(1, 31), false),
        (json!({"before": 20, "limit": 5}), range(15, 19), true),
        (json!({"before": 3}), range(1, 2), false),
        (json!({"before": 1}), vec![], false),
        (json!({"before": 0}), vec![], false),
        (json!({"before": max, "limit": 2}), range(30, 31), true),
        (json!({"after": 28}), range(29, 31), false),
        (json!({"after": 5, "limit": 3}), range(6, 8), true),
        (json!({"after": 0, "limit": 31}), range(1, 31), false),
        (json!({"after": 31}), vec![], false),
        (json!({"after": max}), vec![], false),
        (json!({"after": 10, "before": 16}), range(11, 15), false),
        (
            json!({"after": 10, "before": 30, "limit": 4}),
            range(11, 14),
            true,
        ),
        (json!({"after": 10, "before": 11}), vec![], false),
    ];
    for (query, want, more) in cases {
        let (page, got_more) = history(&mut bob, "r", query.clone()).await;
        assert_eq!((seqs(&page), got_more), (want, more), "history {query}");
    }
    let (page, more) = history(&mut bob, "never-used", json!({})).await;
    assert!(page.is_empty() && !more);
    for limit in [0, 201] {
        bob.send(json!({"type": "history", "room": "r", "limit": limit}))
            .await;
        let error = bob.recv_type("error").await;
        assert_eq!(error["code"], "bad_request", "{error}");
    }
}

/// `history.max_page_bytes` caps every history answer, WebSocket and HTTP alike: fewer events,
/// `more: true`, at least one event, and the events kept are those nearest the paging origin,
/// so paging on from the answer finds every event once, without a hole.
async fn history_pages_are_capped_by_bytes(mode: Mode) {
    const CAP: usize = 8192;
    let nodes = Nodes::start(mode, &[("history.max_page_bytes", (CAP as i64).into())]).await;
    let mut alice = nodes.node(0).user("alice").await;
    alice.join("r").await;
    // 600 control characters encode to 3,600 bytes each (`\u0001`): two fit a page, not three.
    let big = "\u{1}".repeat(600);
    for i in 2..=21 {
        alice.post("r", &big, &format!("c{i}")).await;
    }
    // seq 1 is alice's join, 2..=21 her messages. Read from the other node.
    let mut bob = nodes.node(1).user("bob").await;
    let frame_len = |page: &[Value], more: bool| {
        serde_json::to_string(
            &json!({"type": "history", "room": "r", "messages": page, "more": more}),
        )
        .unwrap()
        .len()
    };
    // Paging back from the newest: each page ends where the last one began.
    let mut seen = Vec::new();
    let mut query = json!({"limit": 200});
    loop {
        let (page, more) = history(&mut bob, "r", query.clone()).await;
        assert!(!page.is_empty(), "{query}");
        assert!(
            frame_len(&page, more) <= CAP,
            "{query}: {} bytes",
            frame_len(&page, more)
        );
        let got = seqs(&page);
        if let Some(&oldest_seen) = seen.first() {
            assert_eq!(*got.last().unwrap() + 1, oldest_seen, "no hole: {query}");
        } else {
            assert_eq!(*got.last().unwrap(), 21, "the newest are kept");
        }
        seen.splice(0..0, got.iter().copied());
        if !more {
            break;
        }
        query = json!({"before": got[0], "limit": 200});
    }
    assert_eq!(seen, range(1, 21));
    // Paging forward: the oldest are kept.
    let mut seen = Vec::new();
    let mut query = json!({"after": 0, "limit": 200});
    loop {
        let (page, more) = history(&mut bob, "r", query.clone()).await;
        assert!(!page.is_empty(), "{query}");
        assert!(frame_len(&page, more) <= CAP, "{query}");
        let got = seqs(&page);
        assert_eq!(got[0], seen.last().map_or(1, |s| s + 1), "no hole: {query}");
        seen.extend(got.iter().copied());
        if !more {
            break;
        }
        query = json!({"after": got.last().unwrap(), "before": 100, "limit": 200});
    }
    assert_eq!(seen, range(1, 21));
    // One event bigger than the cap still goes, alone.
    let huge = "\u{1}".repeat(2000);
    alice.post("r", &huge, "c22").await;
    let (page, more) = history(&mut bob, "r", json!({})).await;
    assert_eq!((seqs(&page), more), (vec![22], true));
    // The HTTP API: the same cap on its body, the newest kept.
    let response = reqwest::Client::new()
        .get(
            nodes
                .node(1)
                .http_url("/api/rooms/r/messages?before=22&limit=200"),
        )
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    assert!(body.len() <= CAP, "{} bytes", body.len());
    let body: Value = serde_json::from_str(&body).unwrap();
    let page = body["messages"].as_array().unwrap();
    assert_eq!(seqs(page), range(20, 21));
    assert_eq!(body["more"], true);
}

/// `history.empty_room_ttl_s`: a room with no message and no member is forgotten (not listed,
/// nothing of it in SQLite or Redis) soon after the TTL; a later join starts it afresh with a
/// new epoch. Rooms with a message, or with someone in them, stay; a room whose messages were
/// all dropped by retention is empty too.
async fn empty_rooms_are_forgotten(mode: Mode) {
    const CYCLES: usize = 300;
    let nodes = Nodes::start(
        mode,
        &[
            ("history.empty_room_ttl_s", 1.into()),
            ("history.max_len", 2.into()),
            ("limits.join_rate", 100_000.into()),
            ("limits.join_burst", 100_000.into()),
        ],
    )
    .await;
    let mut alice = nodes.node(0).user("alice").await;
    let mut bob = nodes.node(1).user("bob").await;
    async fn leave(client: &mut Client, room: &str) {
        client.send(json!({"type": "leave", "room": room})).await;
        client.skip_until("left").await;
    }
    let listed = |i: usize| {
        let nodes = &nodes;
        async move {
            let body = nodes.api_get(i, "/api/rooms").await;
            body["rooms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["room"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    // Churn over fresh names: join/leave events only.
    let first_epoch = join(&mut alice, "e-0").await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    leave(&mut alice, "e-0").await;
    assert!(
        listed(1).await.contains(&"e-0".to_owned()),
        "listed until its TTL passes"
    );
    for i in 1..CYCLES {
        let room = format!("e-{i}");
        join(&mut alice, &room).await;
        leave(&mut alice, &room).await;
    }
    // A room with a message stays; one whose message retention dropped (max_len 2) does not.
    join(&mut alice, "kept").await;
    alice.post("kept", "hello", "k1").await;
    leave(&mut alice, "kept").await;
    join(&mut alice, "dropped").await;
    alice.post("dropped", "hello", "d1").await;
    leave(&mut alice, "dropped").await;
    for _ in 0..2 {
        join(&mut alice, "dropped").await;
        leave(&mut alice, "dropped").await;
    }
    // A room with someone in it stays, message or not.
    join(&mut bob, "occupied").await;

    // The TTL is 1 s and the sweep runs every second: all gone within a few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rooms = listed(1).await;
        if rooms == ["kept", "occupied"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still listed after 20 s: {} rooms, e.g. {:?}",
            rooms.len(),
            &rooms[..rooms.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(listed(0).await, ["kept", "occupied"]);
    // Nothing of them is kept on disk or in Redis.
    match &nodes._redis {
        None => {
            let db = rusqlite::Connection::open(&nodes.node(0).db).unwrap();
            // The list above already leaves them out; SQLite drops them when the sweep's
            // block settles, a moment later.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let rooms: Vec<String> = db
                    .prepare("SELECT room FROM rooms ORDER BY room")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                if rooms == ["kept", "occupied"] {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still in SQLite after 20 s: {} rooms",
                    rooms.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let stray: i64 = db
                .query_row(
                    "SELECT COUNT(*) FROM events WHERE room NOT IN ('kept', 'occupied')",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(stray, 0);
        }
        Some(redis) => {
            let client = redis::Client::open(redis.url()).unwrap();
            let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
            let mut members: Vec<String> = redis::cmd("SMEMBERS")
                .arg("parley:rooms")
                .query_async(&mut conn)
                .await
                .unwrap();
            members.sort();
            assert_eq!(members, ["kept", "occupied"]);
            let mut stray: Vec<String> = Vec::new();
            for pattern in ["parley:{e-*", "parley:{dropped}*"] {
                let found: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                stray.extend(found);
            }
            // A message's de-duplication key outlives it by at most the window, then expires
            // by itself.
            for key in stray.iter().filter(|k| k.contains(":dedup:")) {
                let ttl: i64 = redis::cmd("TTL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(ttl > 0, "{key} expires");
            }
            stray.retain(|k| !k.contains(":dedup:"));
            assert!(stray.is_empty(), "{stray:?}");
        }
    }
    // Joining a forgotten room starts it afresh.
    let joined = join(&mut bob, "e-0").await;
    assert_ne!(joined["epoch"].as_str().unwrap(), first_epoch);
    assert_eq!(joined["seq"], 1, "{joined}");
    let joined = join_since(&mut alice, "e-0", CYCLES as u64, &first_epoch).await;
    assert_eq!(joined["recovered"], false, "{joined}");
}

/// `history.max_len`: a room keeps its latest events only, `since` older than what is kept
/// gives `recovered: false`, and a message dropped by retention no longer de-duplicates.
async fn retention_keeps_the_latest_max_len(mode: Mode) {
    let nodes = Nodes::start(
        mode,
        &[
            ("history.max_len", 10.into()),
            ("history.on_join", 50.into()),
        ],
    )
    .await;
    let mut alice = nodes.node(0).user("alice").await;
    let joined = alice.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    for i in 0..25 {
        alice.post("r", &format!("m{i}"), &format!("c{i}")).await;
    }
    // seq 1 (join) + 25 messages: 26 events, the last 10 kept.
    let mut reader = nodes.node(1).user("reader").await;
    let (page, more) = history(&mut reader, "r", json!({"limit": 200})).await;
    assert_eq!((seqs(&page), more), (range(17, 26), false));
    let (page, more) = history(&mut reader, "r", json!({"before": 18})).await;
    assert_eq!((seqs(&page), more), (vec![17], false));

    // A joiner without since: what is kept (its own join included; retention applies after).
    let mut bob = nodes.node(1).user("bob").await;
    let joined = bob.join("r").await;
    assert_eq!(joined["seq"], 27);
    assert_eq!(seqs(joined["history"].as_array().unwrap()), range(17, 27));
    let (page, _) = history(&mut reader, "r", json!({"limit": 200})).await;
    assert_eq!(seqs(&page), range(18, 27), "trimmed to max_len");

    // since just below the oldest kept event continues the log; older does not.
    let mut carol = nodes.node(0).user("carol").await;
    let joined = join_since(&mut carol, "r", 16, &epoch).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(seqs(joined["history"].as_array().unwrap()), range(18, 28));
    carol.close().await;
    wait_event(&mut alice, "leave", "carol").await;
    let mut carol = nodes.node(0).user("carol").await;
    let (page, _) = history(&mut reader, "r", json!({"limit": 200})).await;
    let oldest = page[0]["seq"].as_u64().unwrap();
    let joined = join_since(&mut carol, "r", oldest - 1, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let head = joined["seq"].as_u64().unwrap();
    assert_eq!(
        seqs(joined["history"].as_array().unwrap()),
        range(oldest, head)
    );

    // c0 (seq 2) is gone: sending it again posts a new message; c24 is kept: a resend of it
    // is a duplicate.
    let (ack, _) = alice.post("r", "m0 again", "c0").await;
    assert!(ack["seq"].as_u64().unwrap() > head, "{ack}");
    let (ack, _) = alice.post("r", "m24", "c24").await;
    assert_eq!(
        (&ack["seq"], &ack["duplicate"]),
        (&json!(26), &json!(true)),
        "{ack}"
    );
}

/// `history.ttl_s`: events older than the age limit are dropped while a busy room (never idle
/// for that long) keeps its recent ones; `since` inside what was dropped gives
/// `recovered: false`, just after it `recovered: true`.
async fn retention_drops_events_older_than_ttl(mode: Mode) {
    const TTL: Duration = Duration::from_secs(3);
    let nodes = Nodes::start(
        mode,
        &[
            ("history.ttl_s", (TTL.as_secs() as i64).into()),
            ("history.on_join", 50.into()),
        ],
    )
    .await;
    let mut alice = nodes.node(0).user("alice").await;
    let joined = alice.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    // Time passing is what this scenario is about. At 0 s: seqs 2..=4; at 2/3 of the ttl: 5
    // (the room is never idle for a whole ttl); at 4/3 of it: 6..=8, whose commits drop what
    // is older than the ttl (one node sweeps at most once a second, at a commit): 1..=4 only.
    for i in 0..3 {
        alice.post("r", &format!("old{i}"), &format!("o{i}")).await;
    }
    tokio::time::sleep(TTL * 2 / 3).await;
    alice.post("r", "middle", "middle").await;
    tokio::time::sleep(TTL * 2 / 3).await;
    for i in 0..3 {
        alice.post("r", &format!("new{i}"), &format!("n{i}")).await;
    }
    let mut reader = nodes.node(1).user("reader").await;
    let (page, more) = history(&mut reader, "r", json!({"limit": 200})).await;
    assert_eq!(
        (seqs(&page), contents(&page), more),
        (
            range(5, 8),
            ["middle", "new0", "new1", "new2"]
                .map(String::from)
                .to_vec(),
            false
        ),
        "the old events are gone, the recent ones kept"
    );
    let mut bob = nodes.node(1).user("bob").await;
    let joined = join_since(&mut bob, "r", 4, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(
        contents(joined["history"].as_array().unwrap()),
        ["middle", "new0", "new1", "new2"]
    );
    let mut carol = nodes.node(0).user("carol").await;
    let joined = join_since(&mut carol, "r", 2, &epoch).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(
        seqs(joined["history"].as_array().unwrap()),
        range(5, 10),
        "what is kept, the joins of bob and carol last"
    );
    // The sequence goes on.
    let (ack, _) = alice.post("r", "next", "next").await;
    assert_eq!(ack["seq"], 11);
}

/// Presence is per user: a second tab (on the other node) announces nothing, closing one of
/// two tabs announces nothing, closing the last announces one leave; the people listed follow.
async fn presence_counts_people_not_tabs(mode: Mode) {
    let nodes = Nodes::start(mode, &[]).await;
    let mut alice = nodes.node(0).user("alice").await;
    assert_eq!(alice.join("r").await["users"], json!(["alice"]));

    let mut bob1 = nodes.node(0).user("bob").await;
    let joined = bob1.join("r").await;
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    let mut bob2 = nodes.node(1).user("bob").await;
    let joined = bob2.join("r").await;
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    assert_eq!(joined["user_count"], 2);
    let before = until_marker(&mut alice, "r", "m1").await;
    assert_eq!(
        events(&before),
        [ev("join", "bob")],
        "one join for two tabs"
    );
    for i in [0, 1] {
        assert_eq!(nodes.users(i, "r").await, ["alice", "bob"]);
    }

    bob1.close().await;
    let before = until_marker(&mut alice, "r", "m2").await;
    assert!(events(&before).is_empty(), "a tab remains: {before:?}");
    assert_eq!(nodes.users(1, "r").await, ["alice", "bob"]);

    // The last tab goes abruptly (no close handshake): one leave all the same.
    bob2.drop_abruptly();
    wait_event(&mut alice, "leave", "bob").await;
    let before = until_marker(&mut alice, "r", "m3").await;
    assert!(events(&before).is_empty(), "one leave: {before:?}");
    for i in [0, 1] {
        assert_eq!(nodes.users(i, "r").await, ["alice"]);
    }
    let mut carol = nodes.node(1).user("carol").await;
    let joined = carol.join("r").await;
    assert_eq!(joined["users"], json!(["alice", "carol"]));
    assert_eq!(
        events(joined["history"].as_array().unwrap()),
        [
            ev("join", "alice"),
            ev("join", "bob"),
            ev("leave", "bob"),
            ev("join", "carol")
        ]
    );
}

/// An explicit leave: `left` after every event sequenced before the leave, then nothing of
/// the room; the others see the leave; a rejoin is a new join, with the live stream again.
async fn leave_and_rejoin(mode: Mode) {
    let nodes = Nodes::start(mode, &[]).await;
    let mut alice = nodes.node(0).user("alice").await;
    alice.join("r").await;
    let mut bob = nodes.node(1).user("bob").await;
    bob.join("r").await;
    let (ack, _) = alice.post("r", "before", "b1").await;
    let before = ack["seq"].as_u64().unwrap();

    bob.send(json!({"type": "leave", "room": "r"})).await;
    let mut got = Vec::new();
    loop {
        let frame = bob.recv().await;
        if frame["type"] == "left" {
            assert_eq!(frame["room"], "r");
            break;
        }
        got.push(frame);
    }
    assert_eq!(
        seqs(&got).last(),
        Some(&before),
        "everything before the leave: {got:?}"
    );
    let leave = wait_event(&mut alice, "leave", "bob").await;
    assert_eq!(leave["seq"], before + 1);
    assert_eq!(nodes.users(1, "r").await, ["alice"]);
    // Nothing more of the room reaches him; sending there is refused.
    alice.post("r", "while away", "w1").await;
    bob.send(json!({"type": "send", "room": "r", "content": "x", "id": "x"}))
        .await;
    let error = bob.recv_type("error").await;
    assert_eq!(
        (&error["code"], &error["id"]),
        (&json!("not_joined"), &json!("x"))
    );
    bob.send(json!({"type": "leave", "room": "r"})).await;
    assert_eq!(bob.recv_type("error").await["code"], "not_joined");

    let joined = bob.join("r").await;
    let seq = joined["seq"].as_u64().unwrap();
    assert_eq!(seq, before + 3, "leave, a message, his join");
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    let join = wait_event(&mut alice, "join", "bob").await;
    assert_eq!(join["seq"], seq);
    let (ack, _) = alice.post("r", "after", "a1").await;
    let live = read_to_seq(&mut bob, ack["seq"].as_u64().unwrap()).await;
    assert_eq!(seqs(&live), [seq + 1]);
    assert_eq!(contents(&live), ["after"]);
}

/// A resend under a used id: the same content is acked again with the original seq and
/// `"duplicate": true`; different content is refused with `id_conflict` (the id echoed, the
/// room named) and nothing is stored.
async fn resends_are_duplicates_and_new_content_is_an_id_conflict(mode: Mode) {
    let nodes = Nodes::start(mode, &[]).await;
    let mut alice = nodes.node(0).user("alice").await;
    join(&mut alice, "r").await;
    let mut reader = nodes.node(1).user("reader").await;

    let (ack, _) = alice.post("r", "hello", "c-1").await;
    let seq = ack["seq"].as_u64().unwrap();
    assert_ne!(
        ack["duplicate"], true,
        "a first post is no duplicate: {ack}"
    );
    let (before, _) = history(&mut reader, "r", json!({"limit": 200})).await;

    let (again, _) = alice.post("r", "hello", "c-1").await;
    assert_eq!(
        (&again["seq"], &again["duplicate"], &again["room"]),
        (&json!(seq), &json!(true), &json!("r")),
        "{again}"
    );

    alice
        .send(json!({"type": "send", "room": "r", "content": "other text", "id": "c-1"}))
        .await;
    let refused = loop {
        let frame = alice.recv().await;
        if frame["type"] == "error" || frame["type"] == "ack" {
            break frame;
        }
    };
    assert_eq!(
        (
            &refused["type"],
            &refused["code"],
            &refused["id"],
            &refused["room"]
        ),
        (
            &json!("error"),
            &json!("id_conflict"),
            &json!("c-1"),
            &json!("r")
        ),
        "{refused}"
    );

    // Nothing was stored by either resend: the log is what it was (the marker aside).
    let (mark_seq, _) = mark(&mut alice, "r", "m1").await;
    assert_eq!(mark_seq, seq + 1, "no seq was used in between");
    let (after, _) = history(&mut reader, "r", json!({"before": mark_seq, "limit": 200})).await;
    assert_eq!(after, before, "history unchanged");
}

// ---------------------------------------------------------------------------------------------
// Per-room policies (`[[rooms]]`)
// ---------------------------------------------------------------------------------------------

/// `[[rooms]]` sections as `--set rooms=[...]` gives them: an array of tables.
fn rooms(sections: &[Value]) -> toml::Value {
    toml::Value::try_from(sections).unwrap()
}

/// The `typing` frames among `frames`, as `(room, user)`.
fn typings(frames: &[Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter(|f| f["type"] == "typing")
        .map(|f| {
            (
                f["room"].as_str().unwrap().to_owned(),
                f["user"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `publish = "api"`: members join and read, `joined` says `"publish":"api"` (and no typing),
/// a client `send` is `error forbidden` and stores nothing, the HTTP API posts and members get
/// it live. `typing = false` elsewhere: `typing` is `error forbidden` and relayed to no one,
/// while a room without a section takes typing as before. The first matching section wins.
async fn publish_api_and_typing_policies(mode: Mode) {
    let nodes = Nodes::start(
        mode,
        &[(
            "rooms",
            rooms(&[
                json!({"match": "news.*", "publish": "api"}),
                json!({"match": "news.*", "history_max_len": 1}),
                json!({"match": "calm-*", "typing": false}),
            ]),
        )],
    )
    .await;
    let mut alice = nodes.node(0).user("alice").await;
    let mut bob = nodes.node(1).user("bob").await;
    let joined = alice.join("news.today").await;
    assert_eq!(
        (&joined["publish"], &joined["typing"], &joined["users"]),
        (&json!("api"), &json!(false), &json!(["alice"])),
        "{joined}"
    );
    assert!(
        joined.get("announce").is_none(),
        "defaults are not named: {joined}"
    );
    let joined = bob.join("news.today").await;
    assert_eq!(joined["publish"], "api", "{joined}");
    let head = joined["seq"].as_u64().unwrap();

    alice
        .send(json!({"type": "send", "room": "news.today", "content": "mine", "id": "s-1"}))
        .await;
    let refused = alice.skip_until("error").await;
    assert_eq!(
        (&refused["code"], &refused["id"], &refused["room"]),
        (&json!("forbidden"), &json!("s-1"), &json!("news.today")),
        "{refused}"
    );
    let (status, body) = nodes.api_post(1, "news.today", "newsdesk", "extra!").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["seq"],
        head + 1,
        "the refused send took no seq: {body}"
    );
    for member in [&mut alice, &mut bob] {
        let live = read_to_seq(member, head + 1).await;
        assert_eq!(contents(&live), ["extra!"], "{live:?}");
        assert_eq!(live.last().unwrap()["user"], "newsdesk");
    }
    let (page, _) = history(&mut bob, "news.today", json!({})).await;
    assert_eq!(contents(&page), ["extra!"], "only the API's post is stored");
    // The second news.* section never applies (the first match wins): history is not cut to 1.
    nodes.api_post(0, "news.today", "newsdesk", "more").await;
    let (page, _) = history(&mut bob, "news.today", json!({})).await;
    assert_eq!(contents(&page), ["extra!", "more"]);

    // Typing: refused in calm-*, relayed in a room without a section.
    for room in ["calm-1", "r"] {
        let joined = join(&mut alice, room).await;
        assert_eq!(joined.get("publish"), None, "{joined}");
        join(&mut bob, room).await;
    }
    assert_eq!(join(&mut alice, "calm-2").await["typing"], false);
    alice
        .send(json!({"type": "typing", "room": "calm-1", "id": "t-1"}))
        .await;
    let refused = alice.skip_until("error").await;
    assert_eq!(
        (&refused["code"], &refused["id"], &refused["room"]),
        (&json!("forbidden"), &json!("t-1"), &json!("calm-1")),
        "{refused}"
    );
    alice
        .send(json!({"type": "typing", "room": "news.today"}))
        .await;
    assert_eq!(alice.skip_until("error").await["code"], "forbidden");
    alice.send(json!({"type": "typing", "room": "r"})).await;
    assert_eq!(
        typings(&[bob.skip_until("typing").await]),
        [("r".to_owned(), "alice".to_owned())]
    );
    // Bob heard nothing of calm-1 or news.today: the typing of r came first and alone.
    alice
        .send(json!({"type": "typing", "room": "calm-1"}))
        .await;
    assert_eq!(alice.skip_until("error").await["code"], "forbidden");
    let before = until_marker(&mut bob, "r", "m1").await;
    assert!(typings(&before).is_empty(), "{before:?}");
}

/// `history_max_len` and `history_ttl_s` per room: a room with a section keeps what its
/// section says, a room without one the top-level settings, in the same server.
async fn retention_per_room(mode: Mode) {
    const TTL: Duration = Duration::from_secs(2);
    let nodes = Nodes::start(
        mode,
        &[
            ("history.max_len", 100.into()),
            (
                "rooms",
                rooms(&[
                    json!({"match": "short-*", "history_max_len": 3}),
                    json!({"match": "brief-*", "history_ttl_s": TTL.as_secs()}),
                ]),
            ),
        ],
    )
    .await;
    let mut alice = nodes.node(0).user("alice").await;
    for room in ["short-1", "brief-1", "r"] {
        join(&mut alice, room).await;
        for i in 0..5 {
            alice
                .post(room, &format!("{room} {i}"), &format!("{room}-{i}"))
                .await;
        }
    }
    let mut reader = nodes.node(1).user("reader").await;
    let (page, _) = history(&mut reader, "short-1", json!({"limit": 200})).await;
    assert_eq!(seqs(&page), range(4, 6), "short-1 keeps its latest 3");
    let (page, _) = history(&mut reader, "r", json!({"limit": 200})).await;
    assert_eq!(seqs(&page), range(1, 6), "r keeps all of its 6");

    // Time passing is what the age limit is about: past it, brief-1's events are gone (one
    // node drops them at a commit or its sweep, at most a second apart; a cluster when the
    // room is read), while the other rooms keep theirs.
    tokio::time::sleep(TTL + Duration::from_millis(1200)).await;
    alice.post("brief-1", "fresh", "fresh").await;
    alice.post("r", "fresh", "fresh-r").await;
    let (page, _) = history(&mut reader, "brief-1", json!({"limit": 200})).await;
    assert_eq!(
        (seqs(&page), contents(&page)),
        (vec![7], vec!["fresh".to_owned()]),
        "brief-1 kept only what is younger than its ttl"
    );
    let (page, _) = history(&mut reader, "r", json!({"limit": 200})).await;
    assert_eq!(seqs(&page), range(1, 7), "r has no age limit");
    let (page, _) = history(&mut reader, "short-1", json!({"limit": 200})).await;
    assert_eq!(seqs(&page), range(4, 6), "short-1 has no age limit either");
}

/// `announce = false`: joins and leaves take no seq and reach no one, yet `joined.users` and
/// the HTTP API list the people. `presence = false`: no `users` (only `user_count`), and no
/// join/leave events either; the HTTP API (the backend's) still lists them.
async fn announce_and_presence_policies(mode: Mode) {
    let nodes = Nodes::start(
        mode,
        &[(
            "rooms",
            rooms(&[
                json!({"match": "quiet-*", "announce": false}),
                json!({"match": "hidden-*", "presence": false}),
            ]),
        )],
    )
    .await;
    let mut alice = nodes.node(0).user("alice").await;
    let mut bob = nodes.node(1).user("bob").await;

    let joined = alice.join("quiet-1").await;
    assert_eq!(
        (&joined["announce"], &joined["users"], &joined["seq"]),
        (&json!(false), &json!(["alice"]), &json!(0)),
        "no join event: {joined}"
    );
    assert!(joined.get("presence").is_none(), "{joined}");
    let joined = bob.join("quiet-1").await;
    assert_eq!(
        (&joined["users"], &joined["user_count"], &joined["seq"]),
        (&json!(["alice", "bob"]), &json!(2), &json!(0)),
        "{joined}"
    );
    for i in [0, 1] {
        assert_eq!(nodes.users(i, "quiet-1").await, ["alice", "bob"]);
    }
    bob.send(json!({"type": "leave", "room": "quiet-1"})).await;
    bob.recv_type("left").await;
    for i in [0, 1] {
        assert_eq!(nodes.users(i, "quiet-1").await, ["alice"]);
    }
    let (seq, before) = mark(&mut alice, "quiet-1", "q1").await;
    assert_eq!(seq, 1, "joins and leaves took no seq");
    assert!(events(&before).is_empty(), "{before:?}");

    let joined = alice.join("hidden-1").await;
    assert_eq!(
        (
            &joined["presence"],
            &joined["announce"],
            &joined["user_count"]
        ),
        (&json!(false), &json!(false), &json!(1)),
        "{joined}"
    );
    assert!(joined.get("users").is_none(), "no member list: {joined}");
    let joined = bob.join("hidden-1").await;
    assert!(joined.get("users").is_none(), "{joined}");
    assert_eq!(
        (&joined["user_count"], &joined["seq"]),
        (&json!(2), &json!(0))
    );
    bob.send(json!({"type": "leave", "room": "hidden-1"})).await;
    bob.recv_type("left").await;
    let (seq, before) = mark(&mut alice, "hidden-1", "h1").await;
    assert_eq!(seq, 1, "no join or leave event");
    assert!(events(&before).is_empty(), "{before:?}");
    assert_eq!(
        nodes.users(1, "hidden-1").await,
        ["alice"],
        "the API lists them"
    );
    let (page, _) = history(&mut alice, "hidden-1", json!({})).await;
    assert_eq!(contents(&page), ["h1"]);
    assert!(events(&page).is_empty());
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod single_node {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Mode::Single).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Mode::Cluster).await;
                }
            )*
        }
    };
}

conformance!(
    one_order_for_concurrent_senders,
    acks_follow_the_store_and_resends_are_deduplicated,
    joined_history_and_since_recovery,
    history_pages,
    history_pages_are_capped_by_bytes,
    empty_rooms_are_forgotten,
    retention_keeps_the_latest_max_len,
    retention_drops_events_older_than_ttl,
    presence_counts_people_not_tabs,
    leave_and_rejoin,
    resends_are_duplicates_and_new_content_is_an_id_conflict,
    publish_api_and_typing_policies,
    retention_per_room,
    announce_and_presence_policies,
);
