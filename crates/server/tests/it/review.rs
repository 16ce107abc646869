//! Regression tests from a review of the sequencer, the store, the session and shutdown: each
//! one reproduced a bug through real sockets before its fix.

use crate::common;

use std::time::Duration;

use common::{seq, seqs, token, Client, TestServer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn history(client: &mut Client, request: Value) -> Value {
    client.send(request).await;
    client.recv_type("history").await
}

/// A `join` with `since` = u64::MAX (and the query-string form on `/ws/{room}`) overflowed
/// `since + 1` inside the log writer: the sequencer task panicked and every later join, send
/// and leave on the node failed.
#[tokio::test]
async fn join_with_since_u64_max_is_not_recovered_and_the_node_keeps_working() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    alice.post("r", "first", "a1").await;

    let mut bob = server.user("bob").await;
    bob.send(json!({"type": "join", "room": "r", "since": u64::MAX, "epoch": epoch}))
        .await;
    let joined = bob.recv_type("joined").await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(seq(&joined), 3, "{joined}");

    let mut carol = server
        .connect(&format!(
            "/ws/r?user=carol&since={}&epoch={epoch}",
            u64::MAX
        ))
        .await;
    carol.recv_type("authenticated").await;
    let joined = carol.recv_type("joined").await;
    assert_eq!(joined["recovered"], false, "{joined}");

    // The sequencer is still alive: a message is acked and delivered.
    let (ack, _) = alice.post("r", "still here", "a2").await;
    assert_eq!(seq(&ack), 5, "{ack}");
    let message = bob.skip_until("message").await;
    assert_eq!(message["content"], "still here", "{message}");
}

/// `before`/`after` above i64::MAX were cast to negative SQLite integers: `before` = u64::MAX
/// gave an empty page instead of the newest events, `after` = u64::MAX gave the oldest events
/// instead of an empty page.
#[tokio::test]
async fn history_with_huge_before_or_after_pages_correctly() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("r").await;
    for i in 0..3 {
        alice.post("r", &format!("m{i}"), &format!("id{i}")).await;
    }

    let page = history(
        &mut alice,
        json!({"type": "history", "room": "r", "before": u64::MAX, "limit": 2}),
    )
    .await;
    let frames = page["messages"].as_array().unwrap().clone();
    assert_eq!(seqs(&frames), vec![3, 4], "{page}");
    assert_eq!(page["more"], true, "{page}");

    let page = history(
        &mut alice,
        json!({"type": "history", "room": "r", "after": u64::MAX}),
    )
    .await;
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["more"], false, "{page}");

    let page = history(
        &mut alice,
        json!({"type": "history", "room": "r", "after": 1, "before": u64::MAX}),
    )
    .await;
    let frames = page["messages"].as_array().unwrap().clone();
    assert_eq!(seqs(&frames), vec![2, 3, 4], "{page}");
}

/// A token whose `exp` is far beyond what an `Instant` can hold made `Instant + Duration`
/// panic: the session task died without a close frame and without leaving its rooms (the
/// others never saw the leave; the hub and presence kept the member forever). Since #12 such a
/// token is refused (`auth.max_token_ttl_s`); the longest lifetime that setting accepts still
/// works, and a refused far-future refresh leaves the session as it was.
#[tokio::test]
async fn a_far_future_exp_does_not_crash_the_session() {
    // Ten years: the most auth.max_token_ttl_s takes.
    const MAX_TTL_S: i64 = 316_224_000;
    let server = TestServer::builder()
        .jwt()
        .set("auth.max_token_ttl_s", MAX_TTL_S)
        .start()
        .await;
    let far = json!({"exp": u64::MAX});

    // On the upgrade request: refused before the upgrade.
    let (status, body) = common::upgrade_status(
        &server.ws_url(&format!("/ws?token={}", token("carol", 3600, far.clone()))),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // The longest accepted lifetime works.
    let mut carol = server
        .connect(&format!(
            "/ws?token={}",
            token("carol", MAX_TTL_S, json!({}))
        ))
        .await;
    carol.recv_type("authenticated").await;
    carol.send(json!({"type": "ping"})).await;
    carol.recv_type("pong").await;

    // By refresh, while in a room.
    let mut alice = server
        .connect(&format!("/ws?token={}", token("alice", 3600, json!({}))))
        .await;
    alice.recv_type("authenticated").await;
    alice.join("r").await;
    let mut bob = server
        .connect(&format!("/ws?token={}", token("bob", 3600, json!({}))))
        .await;
    bob.recv_type("authenticated").await;
    bob.join("r").await;
    alice.skip_until("system").await;

    bob.send(json!({"type": "refresh", "token": token("bob", 3600, far)}))
        .await;
    let refused = bob.recv_type("error").await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    bob.send(json!({"type": "refresh", "token": token("bob", MAX_TTL_S, json!({}))}))
        .await;
    bob.recv_type("refreshed").await;
    bob.send(json!({"type": "ping"})).await;
    bob.recv_type("pong").await;
    bob.close().await;
    let leave = alice.skip_until("system").await;
    assert_eq!(leave["event"], "leave", "{leave}");
    assert_eq!(leave["user"], "bob", "{leave}");
}

/// Writes outside the outbound queue (the pong tungstenite queues for a client's ping, the
/// heartbeat ping, the close reply) were awaited without a bound: a peer that sends pings but
/// never reads filled the socket buffers and the session blocked forever in `flush`. It never
/// noticed the silence, a full queue or shutdown, and never left its rooms.
#[tokio::test]
async fn a_peer_that_pings_but_never_reads_is_dropped() {
    let server = TestServer::builder()
        .set("heartbeat.interval_ms", 300)
        .set("heartbeat.timeout_ms", 2_000)
        .start()
        .await;
    let mut bob = server.user("bob").await;
    bob.join("r").await;
    let mut alice = server.user("alice").await;
    alice.join("r").await;
    bob.skip_until("system").await;

    // Fill both directions: every ping makes the server flush a pong nobody reads. Bob keeps
    // reading (and answering the heartbeat) meanwhile.
    let flood = tokio::spawn(async move {
        let payload = vec![7u8; 125];
        for _ in 0..2_000_000 {
            let ping = Message::Ping(payload.clone().into());
            let sent = tokio::time::timeout(Duration::from_millis(500), alice.send_message(ping));
            if sent.await.is_err() {
                break;
            }
        }
        alice
    });

    // Bob's pings reset the client's per-frame timeout, so bound the whole wait.
    let leave = tokio::time::timeout(Duration::from_secs(15), bob.skip_until("system"))
        .await
        .expect("alice's session never ended: blocked writing to a peer that does not read");
    assert_eq!(leave["event"], "leave", "{leave}");
    assert_eq!(leave["user"], "alice", "{leave}");
    drop(flood.await.unwrap());
}

/// A token `auth.leeway_s` tolerates (its `exp` just passed) was accepted, and then the
/// session closed it at once with 4011: the expiry deadline ignored the leeway.
#[tokio::test]
async fn a_token_accepted_within_the_leeway_is_not_closed_at_once() {
    let server = TestServer::builder()
        .jwt()
        .set("auth.leeway_s", 30)
        .start()
        .await;
    let mut alice = server
        .connect(&format!("/ws?token={}", token("alice", -5, json!({}))))
        .await;
    alice.recv_type("authenticated").await;
    alice.send(json!({"type": "ping"})).await;
    alice.recv_type("pong").await;
    alice.expect_silence(500).await;

    let mut bob = server.connect("/ws").await;
    bob.send(json!({"type": "auth", "token": token("bob", -5, json!({}))}))
        .await;
    bob.recv_type("authenticated").await;
    bob.send(json!({"type": "ping"})).await;
    bob.recv_type("pong").await;
    bob.expect_silence(500).await;
}
