//! Overload: join storms, and slow consumers that are cut off (4009) and then recover
//! everything with `since`/`epoch`.

use crate::common;

use std::time::Duration;

use common::{Event, TestServer, FRAME_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_disconnects_nobody() {
    const CLIENTS: usize = 1000;
    const ANNOUNCE_MAX: usize = 100;
    let server = TestServer::builder()
        .set("limits.max_connections_per_ip", 10_000)
        .set("presence.announce_max", ANNOUNCE_MAX as i64)
        // The poster joins and leaves until everyone is in: not what the join limit is for.
        .set("limits.join_rate", 1000.0)
        .start()
        .await;
    // Everyone connects and joins at once; each keeps reading until the final message.
    let mut tasks = Vec::new();
    let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    for i in 0..CLIENTS {
        let url = server.ws_url(&format!("/ws/storm?user=u{i}"));
        let mut go = go_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut client = common::Client::connect(&url).await.expect("connect");
            assert_eq!(client.recv().await["type"], "authenticated");
            let joined = client.recv_type("joined").await;
            let _ = go.recv().await;
            let mut system = 0usize;
            loop {
                match client.next_event().await {
                    Event::Frame(f) if f["type"] == "message" => {
                        assert_eq!(f["content"], "after the storm");
                        return (joined, system);
                    }
                    Event::Frame(f) if f["type"] == "system" => system += 1,
                    Event::Frame(_) => {}
                    other => panic!("u{i} was disconnected: {other:?}"),
                }
            }
        }));
    }
    // Wait until every client is in, then post once.
    let mut poster = server.user("poster").await;
    for _ in 0..200 {
        let joined = poster.join("storm").await;
        if joined["user_count"].as_u64() == Some(CLIENTS as u64 + 1) {
            break;
        }
        poster.send(json!({"type": "leave", "room": "storm"})).await;
        poster.skip_until("left").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = go_tx.send(());
    poster.post("storm", "after the storm", "final").await;
    let mut announced_to_first = None;
    for task in tasks {
        let (joined, system) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("client finished")
            .unwrap();
        assert_eq!(joined["type"], "joined");
        if joined["user_count"] == 1 {
            announced_to_first = Some(system);
        }
    }
    // Past announce_max joins cost no frame: the first member saw at most ANNOUNCE_MAX - 1
    // join events (plus the poster's rejoins, each below the limit only if it was small).
    let first = announced_to_first.expect("someone joined first");
    assert!(
        first < ANNOUNCE_MAX + 2,
        "first member saw {first} system events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_and_recovers_everything_with_since() {
    const POSTS: usize = 200;
    let server = TestServer::builder()
        .set("limits.outbound_queue_frames", 16)
        .set("limits.max_content_bytes", 20_000)
        .set("limits.send_rate", 100_000.0)
        .set("limits.send_burst", 100_000)
        .set("store.synchronous", "normal")
        .start()
        .await;

    // The slow member has a small receive buffer so the kernel cannot hold the backlog.
    let mut slow = server.slow_reader("/ws?user=slow").await;
    let read_json = |msg: Message| -> Option<Value> {
        match msg {
            Message::Text(t) => Some(serde_json::from_str(&t).unwrap()),
            _ => None,
        }
    };
    let mut joined = None;
    slow.send(Message::text(
        json!({"type": "join", "room": "busy"}).to_string(),
    ))
    .await
    .unwrap();
    while joined.is_none() {
        let msg = slow.next().await.unwrap().unwrap();
        if let Some(frame) = read_json(msg) {
            if frame["type"] == "joined" {
                joined = Some(frame);
            }
        }
    }
    let joined = joined.unwrap();
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut last_seen = joined["seq"].as_u64().unwrap();

    let mut poster = server.user("poster").await;
    poster.join("busy").await;
    let mut acked = Vec::new();
    for i in 0..POSTS {
        let content = format!("{i:05}-{}", "y".repeat(16_000));
        let (ack, _) = poster.post("busy", &content, &format!("p{i}")).await;
        acked.push(ack["seq"].as_u64().unwrap());
    }

    // Resume reading: in-order frames, then 4009.
    let code = loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, slow.next())
            .await
            .expect("slow member got nothing")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            Message::Text(t) => {
                let frame: Value = serde_json::from_str(&t).unwrap();
                if let Some(seq) = frame["seq"].as_u64() {
                    assert_eq!(seq, last_seen + 1, "gap before the cut-off");
                    last_seen = seq;
                }
            }
            _ => {}
        }
    };
    assert_eq!(code, Some(4009));
    assert!(
        last_seen < *acked.last().unwrap(),
        "the slow member was not behind"
    );

    // Reconnect and resume: exactly the rest, once each.
    let mut again = server.user("slow").await;
    again
        .send(json!({"type": "join", "room": "busy", "since": last_seen, "epoch": epoch}))
        .await;
    let rejoined = again.recv_type("joined").await;
    assert_eq!(rejoined["recovered"], true, "{}", rejoined["recovered"]);
    let mut replayed: Vec<u64> = rejoined["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let head = rejoined["seq"].as_u64().unwrap();
    // A replay past history.max_replay_bytes is truncated: page forward for the rest.
    let mut more = rejoined["truncated"] == true;
    while more {
        let after = *replayed.last().unwrap();
        again
            .send(json!({"type": "history", "room": "busy", "after": after, "limit": 200}))
            .await;
        let page = again.skip_until("history").await;
        for event in page["messages"].as_array().unwrap() {
            let seq = event["seq"].as_u64().unwrap();
            if seq <= head {
                replayed.push(seq);
            }
        }
        more = page["more"] == true && *replayed.last().unwrap() < head;
    }
    assert_eq!(replayed, ((last_seen + 1)..=head).collect::<Vec<_>>());
    for seq in &acked {
        assert!(
            *seq <= last_seen || replayed.contains(seq),
            "acked {seq} was lost"
        );
    }
}
