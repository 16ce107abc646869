//! A reconnect/resume scenario driven by the Rust client library (`parley-client`) against a
//! real server: the server restarts on the same database while the client is held back (its
//! token callback waits), others post more than `history.max_replay` events meanwhile, and the
//! client's rejoin with `since`/`epoch` is truncated, so it must page forward with `history`
//! `after` to deliver every missed message exactly once and in order.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{token, TestServer, FRAME_TIMEOUT};
use parley_client::{Client, Options, RoomEvent, State, TokenSource};
use serde_json::json;
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pages_forward_after_a_truncated_resume_across_a_restart() {
    let mut server = TestServer::builder()
        .jwt()
        .set("history.max_replay", 2)
        .start()
        .await;
    let _dir = server.keep_dir();
    let (addr, db) = (server.addr, server.db.clone());

    // Every (re)connect asks for a token; the test hands out one permit per connect.
    let permits = Arc::new(Semaphore::new(1));
    let gate = permits.clone();
    let source = TokenSource::callback(move || {
        let gate = gate.clone();
        async move {
            gate.acquire().await?.forget();
            Ok(token("alice", 3600, json!({})))
        }
    });
    let alice = Client::connect(
        server.ws_url("/ws"),
        Options {
            token: Some(source),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..Options::default()
        },
    );
    let room = alice.room("resume");
    let mut events = room.events();
    let joined = tokio::time::timeout(FRAME_TIMEOUT, room.join())
        .await
        .expect("joined in time")
        .expect("join");

    server.shutdown().await.expect("clean shutdown");
    let reached = tokio::time::timeout(FRAME_TIMEOUT, alice.wait_for(State::Connecting)).await;
    assert_eq!(reached.expect("alice notices"), State::Connecting);
    let server = TestServer::builder()
        .jwt()
        .set("history.max_replay", 2)
        .db(&db)
        .start_at(addr)
        .await;

    // Bob posts five messages while alice is held back.
    let mut bob = server
        .connect(&format!("/ws?token={}", token("bob", 3600, json!({}))))
        .await;
    bob.recv_type("authenticated").await;
    bob.join("resume").await;
    let mut posted = Vec::new();
    for i in 0..5 {
        let (ack, _) = bob
            .post("resume", &format!("missed {i}"), &format!("b{i}"))
            .await;
        posted.push((ack["seq"].as_u64().unwrap(), format!("missed {i}")));
    }
    permits.add_permits(1);

    // Alice resumes: every missed message, once, in order, and no reset (same epoch).
    let mut got = Vec::new();
    let mut last = 0;
    while got.len() < posted.len() {
        let event = tokio::time::timeout(FRAME_TIMEOUT, events.recv())
            .await
            .expect("an event in time")
            .expect("client running");
        match event {
            RoomEvent::Message(m) => {
                assert!(m.seq > last, "in seq order: {} after {last}", m.seq);
                last = m.seq;
                got.push((m.seq, m.content));
            }
            RoomEvent::System(s) => {
                assert!(s.seq > last, "in seq order: {} after {last}", s.seq);
                last = s.seq;
            }
            RoomEvent::Reset { .. } => panic!("same database: the resume must not reset"),
            _ => {}
        }
    }
    assert_eq!(got, posted);
    assert!(last > joined.seq + 2, "more was missed than max_replay");
    alice.close().await;
}
