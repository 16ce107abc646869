//! Rooms over real sockets: joining and leaving, the `joined` frame, one contiguous sequence
//! per room under concurrent senders, acks and de-duplication, per-user presence (two tabs,
//! large rooms), typing, ping, and the per-connection limits.
//!
//! Negative checks ("nothing else arrived") use [`expect_pong_next`]: a `ping` sent after the
//! event that could have caused a frame is answered after any such frame was queued, so the
//! very next frame must be the `pong`. Where the cause is a disconnect (whose processing the
//! client cannot observe) a short [`Client::expect_silence`] is used instead.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{seq, seqs, upgrade_status, Client, TestServer};
use serde_json::{json, Value};

/// Sends `ping` and asserts the very next frame is the `pong`: nothing was queued before it.
async fn expect_pong_next(client: &mut Client, what: &str) {
    client.send(json!({"type": "ping"})).await;
    let frame = client.recv().await;
    assert_eq!(
        frame["type"], "pong",
        "{what}: expected nothing before the pong, got {frame}"
    );
}

/// Sends a request and expects an `error` frame with `code` as the next frame.
async fn expect_error(client: &mut Client, request: Value, code: &str) -> Value {
    client.send(request.clone()).await;
    let frame = client.recv().await;
    assert_eq!(frame["type"], "error", "{request} -> {frame}");
    assert_eq!(frame["code"], code, "{request} -> {frame}");
    assert!(frame["message"].is_string(), "{frame}");
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_frames_and_events() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("lobby").await;
    assert_eq!(joined["room"], "lobby", "{joined}");
    assert_eq!(
        joined["seq"], 1,
        "the joiner's own join is sequenced: {joined}"
    );
    let epoch = joined["epoch"]
        .as_str()
        .expect("epoch is a string")
        .to_owned();
    assert!(!epoch.is_empty(), "{joined}");
    assert_eq!(joined["users"], json!(["alice"]), "{joined}");
    assert_eq!(joined["user_count"], 1, "{joined}");
    assert_eq!(joined["truncated"], false, "{joined}");
    assert!(
        joined.get("recovered").is_none(),
        "recovered only with since: {joined}"
    );
    let history = joined["history"].as_array().expect("history is a list");
    assert!(history.len() <= 1, "{joined}");
    if let Some(last) = history.last() {
        assert_eq!(seq(last), 1, "{joined}");
    }
    expect_pong_next(
        &mut alice,
        "the joiner gets no separate frame for its own join",
    )
    .await;

    let mut bob = server.user("bob").await;
    let joined = bob.join("lobby").await;
    assert_eq!(joined["seq"], 2, "{joined}");
    assert_eq!(
        joined["epoch"],
        epoch.as_str(),
        "one epoch per room: {joined}"
    );
    assert_eq!(joined["users"], json!(["alice", "bob"]), "{joined}");
    assert_eq!(joined["user_count"], 2, "{joined}");
    let history = joined["history"].as_array().expect("history is a list");
    assert_eq!(seqs(history), vec![1, 2], "{joined}");
    assert_eq!(history[0]["event"], "join");
    assert_eq!(history[0]["user"], "alice");
    expect_pong_next(&mut bob, "bob's own join").await;

    let sys = alice.recv_type("system").await;
    assert_eq!(sys["room"], "lobby", "{sys}");
    assert_eq!(sys["event"], "join", "{sys}");
    assert_eq!(sys["user"], "bob", "{sys}");
    assert_eq!(seq(&sys), 2, "consecutive after alice's joined.seq: {sys}");
    assert!(sys["content"].is_string() && sys["ts"].is_string(), "{sys}");

    bob.send(json!({"type": "leave", "room": "lobby"})).await;
    let left = bob.recv_type("left").await;
    assert_eq!(left["room"], "lobby", "{left}");
    let sys = alice.recv_type("system").await;
    assert_eq!(sys["event"], "leave", "{sys}");
    assert_eq!(sys["user"], "bob", "{sys}");
    assert_eq!(seq(&sys), 3, "{sys}");

    // Nothing of the room reaches bob after `left`: not his own leave, not a message, not a
    // typing notice, not a join.
    let (ack, _) = alice.post("lobby", "bob is gone", "a-1").await;
    assert_eq!(seq(&ack), 4);
    alice.send(json!({"type": "typing", "room": "lobby"})).await;
    let mut carol = server.user("carol").await;
    assert_eq!(carol.join("lobby").await["seq"], 5);
    let sys = alice.skip_until("system").await;
    assert_eq!(
        (sys["event"].clone(), seq(&sys)),
        (json!("join"), 5),
        "{sys}"
    );
    expect_pong_next(&mut bob, "bob left the room").await;

    // Rejoining after a leave works and is announced again.
    let joined = bob.join("lobby").await;
    assert_eq!(joined["seq"], 6, "{joined}");
    assert_eq!(
        joined["users"],
        json!(["alice", "bob", "carol"]),
        "{joined}"
    );
    assert_eq!(joined["user_count"], 3, "{joined}");
    let sys = alice.recv_type("system").await;
    assert_eq!(
        (sys["event"].clone(), seq(&sys)),
        (json!("join"), 6),
        "{sys}"
    );
    let sys = carol.recv_type("system").await;
    assert_eq!((sys["user"].clone(), seq(&sys)), (json!("bob"), 6), "{sys}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_share_one_contiguous_order() {
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 50;
    const RECEIVERS: usize = 3;
    const TOTAL: usize = SENDERS * PER_SENDER;
    const ROOM: &str = "busy";
    const WINDOW: usize = 4;
    // Rate limiting is not what this test is about.
    let server = TestServer::builder()
        .set("limits.send_rate", 100_000.0)
        .set("limits.send_burst", 100_000)
        .start()
        .await;

    // Every client records its view: the room's sequenced frames after its `joined.seq`.
    let mut receivers = Vec::new();
    let mut epoch = String::new();
    for r in 0..RECEIVERS {
        let mut client = server.user(&format!("r{r}")).await;
        let joined = client.join(ROOM).await;
        epoch = joined["epoch"].as_str().expect("epoch").to_owned();
        receivers.push((client, seq(&joined)));
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = server.user(&format!("s{s}")).await;
        let start = seq(&client.join(ROOM).await);
        senders.push((client, start));
    }
    let head_after_joins = (RECEIVERS + SENDERS) as u64;
    let final_head = head_after_joins + TOTAL as u64;

    /// Reads sequenced frames until `TOTAL` chat messages have been seen in all.
    async fn read_rest(client: &mut Client, view: &mut Vec<Value>) {
        let mut messages = view.iter().filter(|f| f["type"] == "message").count();
        while messages < TOTAL {
            let frame = client.recv().await;
            match frame["type"].as_str() {
                Some("message") => messages += 1,
                Some("system") => {}
                _ => panic!("unexpected frame {frame}"),
            }
            view.push(frame);
        }
    }

    let receive_tasks: Vec<_> = receivers
        .into_iter()
        .map(|(mut client, start)| {
            tokio::spawn(async move {
                let mut view = Vec::new();
                read_rest(&mut client, &mut view).await;
                (client, start, view)
            })
        })
        .collect();
    // Two late joiners join while the messages flow, as second tabs of r0 and r1 (so their
    // joins are not announced and take no seq): one plainly, one resuming with `since`. What
    // `joined` carries and what follows live must fit together without gap or duplicate.
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut late_tasks = Vec::new();
    for (user, since) in [("r0", None), ("r1", Some(head_after_joins))] {
        let mut client = server.user(user).await;
        let mut go = go_rx.clone();
        let epoch = epoch.clone();
        late_tasks.push(tokio::spawn(async move {
            go.wait_for(|go| *go).await.expect("go signal");
            let request = match since {
                Some(since) => {
                    json!({"type": "join", "room": ROOM, "since": since, "epoch": epoch})
                }
                None => json!({"type": "join", "room": ROOM}),
            };
            client.send(request).await;
            let joined = client.recv_type("joined").await;
            let head = seq(&joined);
            let mut view = joined["history"].as_array().expect("history").clone();
            assert_eq!(view.last().map(seq), Some(head), "{joined}");
            if since.is_some() {
                assert_eq!(joined["recovered"], true, "{joined}");
                assert_eq!(joined["truncated"], false, "{joined}");
            }
            while view.last().map(seq) != Some(final_head) {
                view.push(client.recv().await);
            }
            (client, since, head, view)
        }));
    }

    let barrier = Arc::new(tokio::sync::Barrier::new(SENDERS));
    let send_tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(s, (mut client, start))| {
            let barrier = barrier.clone();
            let go = go_tx.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                // Pipelined, WINDOW sends in flight per sender, so the senders' requests
                // interleave in the sequencer's batches over a stretch of time.
                let request = |i: usize| {
                    json!({"type": "send", "room": ROOM, "id": format!("s{s}-{i}"),
                           "content": format!("message {i} from s{s}")})
                };
                let mut next = 0;
                while next < WINDOW {
                    client.send(request(next)).await;
                    next += 1;
                }
                let mut acks = Vec::new();
                let mut view = Vec::new();
                while acks.len() < PER_SENDER {
                    let frame = client.recv().await;
                    match frame["type"].as_str() {
                        Some("ack") => {
                            assert_eq!(frame["room"], ROOM, "{frame}");
                            let id = frame["id"].as_str().expect("ack id").to_owned();
                            acks.push((id, format!("s{s}"), seq(&frame)));
                            if s == 0 && acks.len() == PER_SENDER / 5 {
                                go.send_replace(true);
                            }
                            if next < PER_SENDER {
                                client.send(request(next)).await;
                                next += 1;
                            }
                        }
                        Some("error") if frame["code"] == "rate_limited" => {
                            let wait = frame["retry_after_ms"].as_u64().unwrap_or(100);
                            tokio::time::sleep(Duration::from_millis(wait.min(2000))).await;
                            let id = frame["id"].as_str().expect("error id");
                            let i: usize = id.rsplit('-').next().unwrap().parse().unwrap();
                            client.send(request(i)).await;
                        }
                        Some("message" | "system") => view.push(frame),
                        _ => panic!("unexpected frame {frame}"),
                    }
                }
                read_rest(&mut client, &mut view).await;
                (client, start, view, acks)
            })
        })
        .collect();

    let mut views = Vec::new();
    let mut acks = Vec::new();
    for task in send_tasks {
        let (client, start, view, sent) = task.await.expect("sender task");
        views.push((client, start, view));
        acks.extend(sent);
    }
    for task in receive_tasks {
        views.push(task.await.expect("receiver task"));
    }

    // Every view is contiguous from its joined.seq + 1 to the final head: no gap, no duplicate.
    for (_, start, view) in &views {
        let expected: Vec<u64> = (start + 1..=final_head).collect();
        assert_eq!(
            seqs(view),
            expected,
            "view of a member that joined at {start}"
        );
    }
    // Every member saw the same events under the same seqs.
    let key = |f: &Value| {
        (
            seq(f),
            f["type"].clone(),
            f["user"].clone(),
            f["id"].clone(),
            f["content"].clone(),
        )
    };
    let common_from = head_after_joins + 1;
    let reference: Vec<_> = views[0]
        .2
        .iter()
        .filter(|f| seq(f) >= common_from)
        .map(key)
        .collect();
    assert_eq!(reference.len(), TOTAL);
    for (_, start, view) in &views[1..] {
        let this: Vec<_> = view
            .iter()
            .filter(|f| seq(f) >= common_from)
            .map(key)
            .collect();
        assert!(
            this == reference,
            "member joined at {start} saw another order"
        );
    }
    for task in late_tasks {
        let (client, since, head, view) = task.await.expect("late joiner task");
        let first = view.first().map(seq).expect("late joiner saw something");
        assert_eq!(
            seqs(&view),
            (first..=final_head).collect::<Vec<_>>(),
            "late joiner (since {since:?}, joined at {head})"
        );
        if let Some(since) = since {
            assert_eq!(first, since + 1);
        }
        let this: Vec<_> = view
            .iter()
            .filter(|f| seq(f) >= common_from)
            .map(key)
            .collect();
        assert!(
            reference.ends_with(&this),
            "late joiner (since {since:?}, joined at {head}) saw another order"
        );
        client.close().await;
    }
    // Every ack names a distinct seq, and the event at that seq is the acked message.
    let distinct: HashSet<u64> = acks.iter().map(|(_, _, seq)| *seq).collect();
    assert_eq!(distinct.len(), TOTAL, "ack seqs must be distinct");
    let by_seq: std::collections::HashMap<u64, &Value> =
        views[0].2.iter().map(|f| (seq(f), f)).collect();
    for (id, user, seq) in &acks {
        let frame = by_seq
            .get(seq)
            .unwrap_or_else(|| panic!("ack {id} seq {seq} not delivered"));
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["id"], id.as_str(), "ack {id} seq {seq}: {frame}");
        assert_eq!(frame["user"], user.as_str(), "{frame}");
    }
    // Each sender's messages are in the order it sent them.
    for s in 0..SENDERS {
        let own: Vec<u64> = (0..PER_SENDER)
            .map(|i| {
                let id = format!("s{s}-{i}");
                let acked = acks.iter().filter(|(a, _, _)| *a == id).collect::<Vec<_>>();
                assert_eq!(acked.len(), 1, "{id} acked once: {acked:?}");
                acked[0].2
            })
            .collect();
        assert!(own.windows(2).all(|w| w[0] < w[1]), "s{s}: {own:?}");
    }
    for (client, _, _) in views {
        client.close().await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_gets_ack_and_its_own_copy() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("acks").await;
    let mut bob = server.user("bob").await;
    bob.join("acks").await;
    alice.recv_type("system").await;

    alice
        .send(json!({"type": "send", "room": "acks", "content": "hello", "id": "c-17"}))
        .await;
    let first = alice.recv().await;
    let second = alice.recv().await;
    let (ack, copy) = if first["type"] == "ack" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "c-17", "{ack}");
    assert_eq!(ack["room"], "acks", "{ack}");
    assert_eq!(seq(&ack), 3, "{ack}");
    assert_eq!(copy["type"], "message", "{copy}");
    assert_eq!(seq(&copy), 3, "{copy}");
    assert_eq!(copy["user"], "alice", "{copy}");
    assert_eq!(copy["name"], "alice", "{copy}");
    assert_eq!(copy["content"], "hello", "{copy}");
    assert_eq!(copy["id"], "c-17", "{copy}");
    assert!(copy["ts"].is_string(), "{copy}");
    let msg = bob.recv_type("message").await;
    assert_eq!(msg, copy, "every member gets the same frame");

    // Without an id: still an ack and a copy, neither carrying an id.
    alice
        .send(json!({"type": "send", "room": "acks", "content": "no id"}))
        .await;
    let mut frames = vec![alice.recv().await, alice.recv().await];
    frames.sort_by_key(|f| f["type"].as_str().map(str::to_owned));
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[1]["type"], "message", "{frames:?}");
    assert_eq!(seq(&frames[0]), 4);
    assert_eq!(seq(&frames[1]), 4);
    assert!(frames[0].get("id").is_none() && frames[1].get("id").is_none());
    let msg = bob.recv_type("message").await;
    assert_eq!(seq(&msg), 4);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_id_is_acked_again_and_posted_once() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("dedup").await;
    let mut bob = server.user("bob").await;
    bob.join("dedup").await;
    alice.recv_type("system").await;

    let (ack, _) = alice.post("dedup", "once", "x1").await;
    let original = seq(&ack);
    assert_eq!(original, 3);
    let msg = bob.recv_type("message").await;
    assert_eq!(seq(&msg), original);
    expect_pong_next(&mut alice, "alice's copy came with the ack").await;

    // A resend of the same id and content, even after another message (new content under a
    // used id is `id_conflict`: tests/conformance.rs).
    let (other, _) = bob.post("dedup", "in between", "b1").await;
    assert_eq!(seq(&other), 4);
    let msg = alice.recv_type("message").await;
    assert_eq!(seq(&msg), 4);
    let (again, extra) = alice.post("dedup", "once", "x1").await;
    assert_eq!(
        seq(&again),
        original,
        "the original ack comes back: {again}"
    );
    assert_eq!(again["room"], "dedup");
    assert!(extra.is_empty(), "no copy of a duplicate: {extra:?}");
    expect_pong_next(&mut alice, "no copy of a duplicate").await;
    expect_pong_next(&mut bob, "a duplicate is not delivered").await;

    // Two sends of one id in flight at once (a quick retry): both acked with one seq.
    for _ in 0..2 {
        alice
            .send(json!({"type": "send", "room": "dedup", "content": "twice", "id": "x2"}))
            .await;
    }
    let mut acked = Vec::new();
    let mut copies = Vec::new();
    while acked.len() < 2 || copies.is_empty() {
        let frame = alice.recv().await;
        match frame["type"].as_str() {
            Some("ack") => acked.push(seq(&frame)),
            Some("message") => copies.push(seq(&frame)),
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(acked, vec![5, 5], "one seq for both sends");
    assert_eq!(copies, vec![5]);
    expect_pong_next(&mut alice, "one copy of x2").await;
    assert_eq!(seq(&bob.recv_type("message").await), 5);
    expect_pong_next(&mut bob, "x2 delivered once").await;

    // The history holds it once.
    bob.send(json!({"type": "history", "room": "dedup", "after": 0, "limit": 200}))
        .await;
    let page = bob.recv_type("history").await;
    let messages = page["messages"].as_array().expect("messages");
    let x1: Vec<&Value> = messages.iter().filter(|m| m["id"] == "x1").collect();
    assert_eq!(x1.len(), 1, "{page}");
    assert_eq!(x1[0]["content"], "once", "{page}");
    assert_eq!(seqs(messages), vec![1, 2, 3, 4, 5], "{page}");

    // The same id from another user is another message.
    let (ack, _) = bob.post("dedup", "bob's x1", "x1").await;
    assert_eq!(seq(&ack), 6, "{ack}");
    let msg = alice.recv_type("message").await;
    assert_eq!((msg["user"].clone(), seq(&msg)), (json!("bob"), 6), "{msg}");

    // The same id in another room is another message.
    let joined = alice.join("dedup-2").await;
    let (ack, _) = alice.post("dedup-2", "elsewhere", "x1").await;
    assert_eq!(seq(&ack), seq(&joined) + 1, "{ack}");
    assert_eq!(ack["room"], "dedup-2");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_are_one_member() {
    let server = TestServer::start().await;
    let mut bob = server.user("bob").await;
    assert_eq!(bob.join("tabs").await["seq"], 1);

    let mut tab1 = server.user("alice").await;
    let joined = tab1.join("tabs").await;
    assert_eq!(joined["seq"], 2);
    let sys = bob.recv_type("system").await;
    assert_eq!(
        (sys["event"].clone(), sys["user"].clone()),
        (json!("join"), json!("alice"))
    );

    let mut tab2 = server.user("alice").await;
    let joined = tab2.join("tabs").await;
    assert_eq!(joined["seq"], 2, "a second tab takes no seq: {joined}");
    assert_eq!(
        joined["users"],
        json!(["alice", "bob"]),
        "alice listed once: {joined}"
    );
    assert_eq!(joined["user_count"], 2, "people, not connections: {joined}");
    expect_pong_next(&mut bob, "a second tab is not announced").await;

    // Both tabs receive the room's events.
    let (ack, _) = bob.post("tabs", "to both tabs", "b1").await;
    assert_eq!(seq(&ack), 3);
    assert_eq!(seq(&tab1.recv_type("message").await), 3);
    assert_eq!(seq(&tab2.recv_type("message").await), 3);

    // One tab leaving explicitly: alice is still there, nothing is announced.
    tab1.send(json!({"type": "leave", "room": "tabs"})).await;
    tab1.recv_type("left").await;
    expect_pong_next(&mut bob, "alice still has a tab in the room").await;
    let mut carol = server.user("carol").await;
    let joined = carol.join("tabs").await;
    assert_eq!(joined["seq"], 4, "{joined}");
    assert_eq!(
        joined["users"],
        json!(["alice", "bob", "carol"]),
        "{joined}"
    );
    assert_eq!(bob.recv_type("system").await["user"], "carol");
    assert_eq!(tab2.recv_type("system").await["user"], "carol");

    // Rejoin the first tab, then close both: one leave, only after the last one.
    tab1.join("tabs").await;
    expect_pong_next(&mut bob, "the first tab rejoining").await;
    tab1.close().await;
    bob.expect_silence(300).await;
    tab2.close().await;
    let sys = bob.recv_type("system").await;
    assert_eq!(sys["event"], "leave", "{sys}");
    assert_eq!(sys["user"], "alice", "{sys}");
    assert_eq!(seq(&sys), 5, "exactly one leave was sequenced: {sys}");
    bob.expect_silence(300).await;
    let (ack, _) = bob.post("tabs", "after", "b2").await;
    assert_eq!(seq(&ack), 6);
    let joined = carol.recv_type("system").await;
    assert_eq!(seq(&joined), 5);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rooms_do_not_announce_presence() {
    let server = TestServer::builder()
        .set("presence.announce_max", 2)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    assert_eq!(alice.join("big").await["seq"], 1);
    let mut bob = server.user("bob").await;
    let joined = bob.join("big").await;
    assert_eq!(
        joined["seq"], 2,
        "2 members is not over the limit: {joined}"
    );
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    assert_eq!(alice.recv_type("system").await["user"], "bob");

    let mut carol = server.user("carol").await;
    let joined = carol.join("big").await;
    assert_eq!(
        joined["seq"], 2,
        "an unannounced join takes no seq: {joined}"
    );
    assert!(joined.get("users").is_none(), "no users list: {joined}");
    assert_eq!(joined["user_count"], 3, "{joined}");
    expect_pong_next(&mut alice, "carol's join is not announced").await;
    expect_pong_next(&mut bob, "carol's join is not announced").await;
    // A second tab of a present user in a large room: also no users list.
    let mut bob2 = server.user("bob").await;
    let joined = bob2.join("big").await;
    assert!(joined.get("users").is_none(), "{joined}");
    assert_eq!(joined["user_count"], 3, "{joined}");

    let (ack, _) = carol.post("big", "hi all", "c1").await;
    assert_eq!(seq(&ack), 3, "the next event follows directly: {ack}");
    for member in [&mut alice, &mut bob, &mut bob2] {
        assert_eq!(seq(&member.recv_type("message").await), 3);
    }

    // 3 members > 2: the leave is not announced.
    carol.send(json!({"type": "leave", "room": "big"})).await;
    carol.recv_type("left").await;
    expect_pong_next(&mut alice, "a leave from a room over the limit").await;

    // dave makes 3 people again: his join and leave are not announced (checked by the pong
    // below). bob's last tab leaving a room of 2 people is announced.
    let mut dave = server.user("dave").await;
    let joined = dave.join("big").await;
    assert_eq!(joined["seq"], 3, "{joined}");
    assert!(joined.get("users").is_none(), "{joined}");
    assert_eq!(joined["user_count"], 3, "{joined}");
    dave.send(json!({"type": "leave", "room": "big"})).await;
    dave.recv_type("left").await;
    bob.send(json!({"type": "leave", "room": "big"})).await;
    bob.recv_type("left").await;
    expect_pong_next(&mut alice, "bob still has a tab").await;
    bob2.send(json!({"type": "leave", "room": "big"})).await;
    bob2.recv_type("left").await;
    let sys = alice.recv_type("system").await;
    assert_eq!(sys["event"], "leave", "{sys}");
    assert_eq!(sys["user"], "bob", "{sys}");
    assert_eq!(seq(&sys), 4, "{sys}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_others_unsequenced_and_ping_pongs() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("typing").await;
    let mut bob = server.user("bob").await;
    bob.join("typing").await;
    assert_eq!(seq(&alice.recv_type("system").await), 2);

    alice.send(json!({"type": "ping"})).await;
    assert_eq!(alice.recv().await, json!({"type": "pong"}));

    alice
        .send(json!({"type": "typing", "room": "typing"}))
        .await;
    let typing = bob.recv_type("typing").await;
    assert_eq!(
        typing,
        json!({"type": "typing", "room": "typing", "user": "alice"})
    );
    expect_pong_next(&mut alice, "typing does not echo to its sender").await;

    // Not sequenced: the next event follows the last one directly.
    let (ack, _) = bob.post("typing", "after typing", "b1").await;
    assert_eq!(seq(&ack), 3);
    assert_eq!(seq(&alice.recv_type("message").await), 3);
    // Not stored.
    bob.send(json!({"type": "history", "room": "typing", "after": 0}))
        .await;
    let page = bob.recv_type("history").await;
    let types: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["system", "system", "message"], "{page}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_rooms_not_joined_are_refused() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    bob.join("elsewhere").await;
    alice.join("mine").await;

    expect_error(
        &mut alice,
        json!({"type": "typing", "room": "elsewhere"}),
        "not_joined",
    )
    .await;
    let err = expect_error(
        &mut alice,
        json!({"type": "send", "room": "elsewhere", "content": "hi", "id": "n1"}),
        "not_joined",
    )
    .await;
    assert_eq!(err["id"], "n1", "the error echoes the request id: {err}");
    expect_error(
        &mut alice,
        json!({"type": "leave", "room": "elsewhere"}),
        "not_joined",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "leave", "room": "never-seen"}),
        "not_joined",
    )
    .await;
    // None of it reached the room.
    expect_pong_next(&mut bob, "requests of a non-member").await;
    bob.send(json!({"type": "history", "room": "elsewhere"}))
        .await;
    let page = bob.recv_type("history").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "{page}");
    // A left room is not joined any more.
    alice.send(json!({"type": "leave", "room": "mine"})).await;
    alice.recv_type("left").await;
    expect_error(
        &mut alice,
        json!({"type": "send", "room": "mine", "content": "hi"}),
        "not_joined",
    )
    .await;
    // The connection stays open.
    expect_pong_next(&mut alice, "after errors").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_limits_and_bad_requests() {
    let server = TestServer::builder()
        .set("limits.max_rooms_per_connection", 3)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    for room in ["r1", "r2", "r3"] {
        alice.join(room).await;
    }
    expect_error(
        &mut alice,
        json!({"type": "join", "room": "r4"}),
        "too_many_rooms",
    )
    .await;
    // The refused join did not take effect: r4 is still empty.
    alice.send(json!({"type": "history", "room": "r4"})).await;
    let page = alice.recv_type("history").await;
    assert_eq!(page["messages"], json!([]), "{page}");
    // Leaving one frees a slot.
    alice.send(json!({"type": "leave", "room": "r1"})).await;
    alice.recv_type("left").await;
    assert_eq!(alice.join("r4").await["room"], "r4");
    // The limit is per connection.
    let mut tab2 = server.user("alice").await;
    for room in ["r1", "r2", "r3"] {
        tab2.join(room).await;
    }

    expect_error(
        &mut tab2,
        json!({"type": "join", "room": "r4"}),
        "too_many_rooms",
    )
    .await;

    let mut carol = server.user("carol").await;
    let long = "a".repeat(65);
    for bad in ["-x", "a b", long.as_str(), "", "_x", "a/b", "é"] {
        expect_error(
            &mut carol,
            json!({"type": "join", "room": bad}),
            "bad_request",
        )
        .await;
    }
    let max = "b".repeat(64);
    assert_eq!(carol.join(&max).await["room"], max.as_str());
    assert_eq!(carol.join("A-z_0.9:x").await["room"], "A-z_0.9:x");
    expect_error(
        &mut carol,
        json!({"type": "join", "room": max}),
        "bad_request",
    )
    .await;
    expect_error(
        &mut carol,
        json!({"type": "join", "room": "fine", "since": 3}),
        "bad_request",
    )
    .await;
    expect_error(
        &mut carol,
        json!({"type": "join", "room": "fine", "epoch": "abc"}),
        "bad_request",
    )
    .await;
    expect_error(&mut carol, json!({"type": "join"}), "bad_request").await;
    // None of the refused joins took effect.
    carol.send(json!({"type": "typing", "room": "fine"})).await;
    let err = carol.recv_type("error").await;
    assert_eq!(err["code"], "not_joined", "{err}");
    expect_pong_next(&mut carol, "the connection stays open").await;

    let (status, _) = upgrade_status(&server.ws_url("/ws/bad%20room?user=a")).await;
    assert_eq!(status, 400);
    let (status, _) = upgrade_status(&server.ws_url("/ws/-x?user=a")).await;
    assert_eq!(status, 400);
    let (status, _) = upgrade_status(&server.ws_url(&format!("/ws/{long}?user=a"))).await;
    assert_eq!(status, 400);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_releases_presence() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("drop").await;
    alice.join("drop-2").await;
    let mut bob = server.user("bob").await;
    bob.join("drop").await;
    bob.join("drop-2").await;
    assert_eq!(alice.recv_type("system").await["room"], "drop");
    assert_eq!(alice.recv_type("system").await["room"], "drop-2");

    bob.drop_abruptly();
    let mut leaves = Vec::new();
    for _ in 0..2 {
        let sys = alice.recv_type("system").await;
        assert_eq!(sys["event"], "leave", "{sys}");
        assert_eq!(sys["user"], "bob", "{sys}");
        assert_eq!(seq(&sys), 3, "{sys}");
        leaves.push(sys["room"].as_str().unwrap_or("").to_owned());
    }
    leaves.sort();
    assert_eq!(leaves, ["drop", "drop-2"]);

    // bob is gone from presence: a new bob is announced again, and listed once.
    let mut bob = server.user("bob").await;
    let joined = bob.join("drop").await;
    assert_eq!(joined["users"], json!(["alice", "bob"]), "{joined}");
    assert_eq!(joined["seq"], 4, "{joined}");
    let sys = alice.recv_type("system").await;
    assert_eq!(
        (sys["event"].clone(), seq(&sys)),
        (json!("join"), 4),
        "{sys}"
    );
    server.shutdown().await.unwrap();
}

/// The empty-room sweep runs in the log writer's order, behind batches the sequencer planned
/// before it and ahead of those planned after; presence runs ahead of the log. A sweep queued
/// while two members were in a message-less room, run after both had left (their leaves
/// planned but not yet stored), used to read presence live, find the room empty and forget
/// it: the leaves were then stored as seqs 1 and 2 of a new epoch, and bob, still a member,
/// was shown alice's leave as seq 1 after the join he saw as seq 2. The sweep now sees the
/// rooms that had members when it was queued.
#[tokio::test]
async fn a_sweep_queued_before_the_last_leaves_keeps_the_room() {
    const KEY: &str = "sweep-key";
    let server = TestServer::builder()
        .set("api.key", KEY)
        .set("history.empty_room_ttl_s", 1)
        .start()
        .await;
    let users = || async {
        let body = common::api_json(&server.http_url("/api/rooms/quiet/users"), KEY).await;
        body["users"].as_array().unwrap().len()
    };
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let epoch = alice.join("quiet").await["epoch"].clone();
    let joined = bob.join("quiet").await;
    assert_eq!(seq(&joined), 2);
    assert_eq!(joined["epoch"], epoch);

    // Hold the next sweep in the writer; it was queued with both members present.
    server.fault("hold-sweep", true).await;
    while !server.fault_is_on("sweep-held").await {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Both leave; their leaves are planned (presence is empty) but wait behind the sweep.
    alice.send(json!({"type": "leave", "room": "quiet"})).await;
    while users().await != 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bob.send(json!({"type": "leave", "room": "quiet"})).await;
    while users().await != 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the room's last activity age past empty_room_ttl_s before the sweep reads it.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    server.fault("hold-sweep", false).await;

    let gone = bob.skip_until("system").await;
    assert_eq!(gone["event"], "leave", "{gone}");
    assert_eq!(gone["user"], "alice", "{gone}");
    assert_eq!(
        seq(&gone),
        3,
        "alice's leave follows the joins bob saw, in the same epoch: {gone}"
    );
    bob.skip_until("left").await;
    alice.skip_until("left").await;
    let mut carol = server.user("carol").await;
    let rejoined = carol.join("quiet").await;
    assert_eq!(seq(&rejoined), 5, "{rejoined}");
    assert_eq!(rejoined["epoch"], epoch, "{rejoined}");
}
