//! History over real sockets: recovery with `since`/`epoch` after a reconnect, the limits on
//! what `joined` carries (`history.on_join`, `history.max_replay`), paging with `history`
//! frames, retention (`history.max_len`), and durability across a graceful restart.

use crate::common;

use common::{seq, seqs, Client, TestServer};
use serde_json::{json, Value};

/// The frames of a `joined.history` or `history.messages` list.
fn list<'a>(frame: &'a Value, field: &str) -> &'a [Value] {
    frame[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} list in {frame}"))
}

/// Posts `n` messages `{prefix}-{i}` and returns their acked seqs, which must be consecutive.
async fn post_many(client: &mut Client, room: &str, prefix: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let (ack, _) = client
            .post(room, &format!("{prefix} message {i}"), &id)
            .await;
        out.push(seq(&ack));
    }
    if let (Some(first), Some(last)) = (out.first(), out.last()) {
        assert_eq!(
            out,
            (*first..=*last).collect::<Vec<_>>(),
            "no one else posts"
        );
    }
    out
}

/// Sends a `history` request and returns the answer.
async fn history(client: &mut Client, request: Value) -> Value {
    let mut request = request;
    request["type"] = json!("history");
    client.send(request.clone()).await;
    let page = client.recv().await;
    assert_eq!(page["type"], "history", "{request} -> {page}");
    assert_eq!(page["room"], request["room"], "{page}");
    assert!(page["more"].is_boolean(), "{page}");
    page
}

/// Joins with `since` and `epoch` and returns the `joined` frame.
async fn join_since(client: &mut Client, room: &str, since: u64, epoch: &str) -> Value {
    client
        .send(json!({"type": "join", "room": room, "since": since, "epoch": epoch}))
        .await;
    client.recv_type("joined").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_since_recovers_exactly_what_was_missed() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("resume").await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_owned();
    let mut bob = server.user("bob").await;
    bob.join("resume").await;
    assert_eq!(seq(&alice.recv_type("system").await), 2);
    let (ack, _) = alice.post("resume", "before the break", "a-0").await;
    let last_seen = seq(&ack);
    assert_eq!(last_seen, 3);
    assert_eq!(seq(&bob.recv_type("message").await), 3);
    alice.drop_abruptly();

    // What bob sees live while alice is away is what she must get back.
    let mut live = vec![bob.recv_type("system").await];
    assert_eq!(live[0]["event"], "leave");
    for i in 0..6 {
        let (_, mut frames) = bob
            .post("resume", &format!("missed {i}"), &format!("b-{i}"))
            .await;
        live.append(&mut frames);
    }

    let mut alice = server.user("alice").await;
    let joined = join_since(&mut alice, "resume", last_seen, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["truncated"], false, "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str(), "{joined}");
    let head = seq(&joined);
    assert_eq!(head, 11, "leave + 6 messages + her own join: {joined}");
    let recovered = list(&joined, "history");
    assert_eq!(
        seqs(recovered),
        (last_seen + 1..=head).collect::<Vec<_>>(),
        "exactly the missed seqs, in order: {joined}"
    );
    // Bob sees alice's join live; with it his view covers the same range.
    // Bob's own message copies may trail his last ack.
    let mut sys = bob.recv().await;
    while sys["type"] == "message" {
        live.push(sys);
        sys = bob.recv().await;
    }
    assert_eq!(
        (sys["event"].clone(), seq(&sys)),
        (json!("join"), head),
        "{sys}"
    );
    live.push(sys);
    assert_eq!(recovered, &live[..], "the history is what bob saw live");

    // Live delivery continues right after joined.seq.
    let (ack, _) = bob.post("resume", "welcome back", "b-back").await;
    assert_eq!(seq(&ack), head + 1);
    let msg = alice.recv_type("message").await;
    assert_eq!(seq(&msg), head + 1, "{msg}");
    assert_eq!(msg["content"], "welcome back");

    // Nothing missed: since = head gives an empty, recovered history.
    let mut carol = server.user("carol").await;
    let joined = join_since(&mut carol, "resume", head + 1, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(
        seqs(list(&joined, "history")),
        vec![head + 2],
        "only her join"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_epoch_or_future_since_is_not_recovered() {
    let server = TestServer::builder()
        .set("history.on_join", 3)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let epoch = alice.join("epochs").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    post_many(&mut alice, "epochs", "a", 6).await; // seqs 2..=7

    let mut bob = server.user("bob").await;
    let joined = join_since(&mut bob, "epochs", 2, "not-the-epoch").await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(
        joined["epoch"],
        epoch.as_str(),
        "the room's real epoch: {joined}"
    );
    assert_eq!(joined["truncated"], false, "{joined}");
    let head = seq(&joined);
    assert_eq!(head, 8);
    assert_eq!(
        seqs(list(&joined, "history")),
        vec![6, 7, 8],
        "the latest on_join events, oldest first: {joined}"
    );

    // A since beyond the head is not something the room can continue from.
    let mut carol = server.user("carol").await;
    let joined = join_since(&mut carol, "epochs", 100, &epoch).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(seqs(list(&joined, "history")), vec![7, 8, 9], "{joined}");

    // The right epoch and a retained since: recovered, more than on_join events.
    let mut dave = server.user("dave").await;
    let joined = join_since(&mut dave, "epochs", 2, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(
        seqs(list(&joined, "history")),
        (3..=10).collect::<Vec<_>>(),
        "{joined}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_retained_is_not_recovered() {
    let server = TestServer::builder()
        .set("history.max_len", 5)
        .set("history.on_join", 50)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let epoch = alice.join("short").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    post_many(&mut alice, "short", "a", 9).await; // seqs 2..=10; 6..=10 kept

    let mut bob = server.user("bob").await;
    let joined = join_since(&mut bob, "short", 2, &epoch).await;
    assert_eq!(
        joined["recovered"], false,
        "events 3..=5 are gone: {joined}"
    );
    let got = seqs(list(&joined, "history"));
    assert_eq!(got.last(), Some(&11), "{joined}");
    assert!(got.len() <= 6 && got[0] >= 6, "{joined}");

    // The oldest retained event directly follows since: recovered.
    let mut carol = server.user("carol").await;
    let head = seq(&alice.recv_type("system").await);
    assert_eq!(head, 11);
    let kept = history(&mut carol, json!({"room": "short", "after": 0})).await;
    let oldest = seq(&list(&kept, "messages")[0]);
    let joined = join_since(&mut carol, "short", oldest - 1, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(
        seqs(list(&joined, "history")),
        (oldest..=12).collect::<Vec<_>>(),
        "{joined}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_replay_truncates_and_paging_forward_completes() {
    let server = TestServer::builder()
        .set("history.max_replay", 3)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let epoch = alice.join("replay").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    post_many(&mut alice, "replay", "a", 9).await; // seqs 2..=10

    let mut bob = server.user("bob").await;
    let joined = join_since(&mut bob, "replay", 2, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["truncated"], true, "{joined}");
    let head = seq(&joined);
    assert_eq!(head, 11);
    let first = list(&joined, "history").to_vec();
    assert_eq!(seqs(&first), vec![3, 4, 5], "{joined}");

    // Page forward from the last replayed event to joined.seq.
    let mut got = first;
    loop {
        let after = seq(got.last().expect("something replayed"));
        let page = history(
            &mut bob,
            json!({"room": "replay", "after": after, "limit": 4}),
        )
        .await;
        let frames = list(&page, "messages");
        got.extend_from_slice(frames);
        let reached = got.last().map(seq) == Some(head);
        assert_eq!(page["more"], !reached, "{page}");
        if !page["more"].as_bool().unwrap_or(false) {
            break;
        }
    }
    assert_eq!(seqs(&got), (3..=head).collect::<Vec<_>>());
    assert_eq!(got[0]["id"], "a-1", "{:?}", got[0]);

    // Exactly max_replay events to replay: not truncated.
    let mut carol = server.user("carol").await;
    let joined = join_since(&mut carol, "replay", head - 2, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["truncated"], false, "{joined}");
    assert_eq!(
        seqs(list(&joined, "history")),
        vec![head - 1, head, head + 1]
    );

    // Without since, max_replay does not apply and nothing is truncated.
    let mut dave = server.user("dave").await;
    let joined = dave.join("replay").await;
    assert_eq!(joined["truncated"], false, "{joined}");
    assert!(joined.get("recovered").is_none(), "{joined}");
    assert_eq!(
        seqs(list(&joined, "history")),
        (1..=head + 2).collect::<Vec<_>>(),
        "{joined}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_join_limits_the_history_in_joined() {
    let server = TestServer::builder()
        .set("history.on_join", 3)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("recent").await;
    assert_eq!(seqs(list(&joined, "history")), vec![1]);
    post_many(&mut alice, "recent", "a", 5).await; // seqs 2..=6

    let mut bob = server.user("bob").await;
    let joined = bob.join("recent").await;
    assert!(joined.get("recovered").is_none(), "{joined}");
    assert_eq!(joined["truncated"], false, "{joined}");
    assert_eq!(seq(&joined), 7);
    let history = list(&joined, "history");
    assert_eq!(
        seqs(history),
        vec![5, 6, 7],
        "the latest 3, oldest first: {joined}"
    );
    assert_eq!(history[0]["content"], "a message 3");
    assert_eq!(history[1]["content"], "a message 4");
    assert_eq!(history[2]["event"], "join");
    assert_eq!(history[2]["user"], "bob");

    // The default without a setting is 50.
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("recent").await;
    post_many(&mut alice, "recent", "a", 20).await;
    let mut bob = server.user("bob").await;
    let joined = bob.join("recent").await;
    assert_eq!(seqs(list(&joined, "history")), (1..=22).collect::<Vec<_>>());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_before_after_and_between() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("pages").await;
    post_many(&mut alice, "pages", "a", 10).await; // seqs 2..=11
    let range = |a: u64, b: u64| (a..=b).collect::<Vec<u64>>();

    // bob has not joined the room: history works for him.
    let mut bob = server.user("bob").await;
    let cases: Vec<(Value, Vec<u64>, bool)> = vec![
        (json!({}), range(1, 11), false),
        (json!({"limit": 3}), range(9, 11), true),
        (json!({"limit": 11}), range(1, 11), false),
        (json!({"limit": 10}), range(2, 11), true),
        (json!({"before": 9, "limit": 3}), range(6, 8), true),
        (json!({"before": 4, "limit": 3}), range(1, 3), false),
        (json!({"before": 3, "limit": 5}), range(1, 2), false),
        (json!({"before": 1}), vec![], false),
        (json!({"before": 100, "limit": 2}), range(10, 11), true),
        (json!({"after": 7, "limit": 3}), range(8, 10), true),
        (json!({"after": 8, "limit": 3}), range(9, 11), false),
        (json!({"after": 0, "limit": 200}), range(1, 11), false),
        (json!({"after": 11}), vec![], false),
        (
            json!({"after": 2, "before": 7, "limit": 2}),
            range(3, 4),
            true,
        ),
        (
            json!({"after": 2, "before": 7, "limit": 4}),
            range(3, 6),
            false,
        ),
        (json!({"after": 2, "before": 7}), range(3, 6), false),
        (json!({"after": 5, "before": 6}), vec![], false),
    ];
    for (mut query, expected, more) in cases {
        query["room"] = json!("pages");
        let page = history(&mut bob, query.clone()).await;
        let frames = list(&page, "messages");
        assert_eq!(seqs(frames), expected, "{query} -> {page}");
        assert_eq!(page["more"], more, "{query} -> {page}");
        assert!(frames.iter().all(|f| f["room"] == "pages"), "{page}");
    }
    let page = history(&mut bob, json!({"room": "pages", "after": 1, "limit": 1})).await;
    let first = &list(&page, "messages")[0];
    assert_eq!(first["type"], "message");
    assert_eq!(first["id"], "a-0");
    assert_eq!(first["content"], "a message 0");
    assert_eq!(first["user"], "alice");

    // Bad limits are refused; the connection stays.
    for limit in [0, 201] {
        bob.send(json!({"type": "history", "room": "pages", "limit": limit}))
            .await;
        let err = bob.recv_type("error").await;
        assert_eq!(err["code"], "bad_request", "limit {limit}: {err}");
    }
    bob.send(json!({"type": "history", "room": "bad room"}))
        .await;
    let err = bob.recv_type("error").await;
    assert_eq!(err["code"], "bad_request", "{err}");
    let page = history(&mut bob, json!({"room": "pages", "limit": 200})).await;
    assert_eq!(list(&page, "messages").len(), 11);

    // A room with no events: an empty list.
    for query in [
        json!({"room": "never-used"}),
        json!({"room": "never-used", "before": 10}),
        json!({"room": "never-used", "after": 0}),
    ] {
        let page = history(&mut bob, query.clone()).await;
        assert_eq!(page["messages"], json!([]), "{query} -> {page}");
        assert_eq!(page["more"], false, "{query} -> {page}");
    }
    // Asking did not create anything: the room starts at seq 1.
    assert_eq!(seq(&bob.join("never-used").await), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_latest_max_len_events() {
    let server = TestServer::builder()
        .set("history.max_len", 5)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    alice.join("kept").await;
    post_many(&mut alice, "kept", "a", 10).await; // seqs 2..=11

    let mut bob = server.user("bob").await;
    let page = history(&mut bob, json!({"room": "kept", "after": 0, "limit": 200})).await;
    assert_eq!(
        seqs(list(&page, "messages")),
        vec![7, 8, 9, 10, 11],
        "{page}"
    );
    assert_eq!(page["more"], false);
    let page = history(&mut bob, json!({"room": "kept"})).await;
    assert_eq!(
        seqs(list(&page, "messages")),
        vec![7, 8, 9, 10, 11],
        "{page}"
    );
    assert_eq!(page["more"], false, "nothing older is kept: {page}");
    let page = history(&mut bob, json!({"room": "kept", "before": 7})).await;
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["more"], false, "{page}");

    // Numbering continues; the window moves.
    let (ack, _) = alice.post("kept", "twelve", "a-x").await;
    assert_eq!(seq(&ack), 12);
    let page = history(&mut bob, json!({"room": "kept"})).await;
    assert_eq!(
        seqs(list(&page, "messages")),
        vec![8, 9, 10, 11, 12],
        "{page}"
    );

    // A joiner without since gets only what is kept.
    let joined = bob.join("kept").await;
    assert_eq!(seq(&joined), 13);
    let history = seqs(list(&joined, "history"));
    assert!(history.len() <= 6 && history[0] >= 8, "{joined}");
    assert_eq!(history.last(), Some(&13), "{joined}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_graceful_restart() {
    let mut server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("durable").await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_owned();
    let mut before = Vec::new();
    for i in 0..5 {
        let (ack, mut frames) = alice
            .post("durable", &format!("kept {i}"), &format!("k-{i}"))
            .await;
        assert_eq!(seq(&ack), i + 2);
        before.append(&mut frames);
    }
    // The last copy may trail its ack.
    while before.len() < 5 {
        before.push(alice.recv_type("message").await);
    }
    assert_eq!(seqs(&before), vec![2, 3, 4, 5, 6]);

    let db = server.db.clone();
    let dir = server.keep_dir();
    // Alice reads her close frame while the server shuts down.
    let closing = tokio::spawn(async move { alice.expect_close().await });
    server.shutdown().await.unwrap();
    assert_eq!(closing.await.unwrap(), 1001, "server going away");

    let server = TestServer::builder().db(&db).start().await;
    let mut alice = server.user("alice").await;
    let joined = join_since(&mut alice, "durable", 1, &epoch).await;
    assert_eq!(
        joined["epoch"],
        epoch.as_str(),
        "the epoch survives: {joined}"
    );
    assert_eq!(joined["recovered"], true, "{joined}");
    let history = list(&joined, "history");
    assert_eq!(&history[..5], &before[..], "the same messages: {joined}");
    // Then alice's leave at shutdown (if it was stored) and her join now, contiguously.
    let head = seq(&joined);
    assert_eq!(seqs(history), (2..=head).collect::<Vec<_>>(), "{joined}");
    assert!(head == 7 || head == 8, "{joined}");
    let own = history.last().expect("own join");
    assert_eq!(
        (own["event"].clone(), own["user"].clone()),
        (json!("join"), json!("alice"))
    );

    // The acked de-duplication ids and the numbering carry over too.
    let (ack, extra) = alice.post("durable", "kept 4", "k-4").await;
    assert_eq!(
        seq(&ack),
        6,
        "a resend after the restart is still a duplicate"
    );
    assert!(extra.is_empty(), "{extra:?}");
    let (ack, _) = alice.post("durable", "after restart", "k-new").await;
    assert_eq!(seq(&ack), head + 1);
    server.shutdown().await.unwrap();
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_replay_bytes_truncates_a_replay_of_big_messages() {
    // Each message frame is a little over 1,000 bytes; a 3,500-byte budget replays three.
    let server = TestServer::builder()
        .set("history.max_replay_bytes", 3500)
        .set("limits.send_rate", 1000.0)
        .set("limits.send_burst", 1000)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("big").await;
    let (since, epoch) = (seq(&joined), joined["epoch"].as_str().unwrap().to_owned());
    let mut acked = Vec::new();
    for i in 0..10 {
        let (ack, _) = alice
            .post(
                "big",
                &format!("{i:03}{}", "b".repeat(1000)),
                &format!("b{i}"),
            )
            .await;
        acked.push(seq(&ack));
    }
    let mut bob = server.user("bob").await;
    let rejoined = join_since(&mut bob, "big", since, &epoch).await;
    assert_eq!(rejoined["recovered"], true, "{rejoined}");
    assert_eq!(rejoined["truncated"], true, "{}", rejoined["truncated"]);
    let replayed = seqs(list(&rejoined, "history"));
    assert_eq!(replayed, acked[..3].to_vec());
    // Paging forward with `after` completes the rest, in order.
    let page = history(
        &mut bob,
        json!({"room": "big", "after": acked[2], "limit": 200}),
    )
    .await;
    let rest = seqs(list(&page, "messages"));
    assert_eq!(rest[..7].to_vec(), acked[3..].to_vec());
}

/// Issue #11 item 5: age retention (`history.ttl_s`) on one node removes only a prefix of a
/// room's seqs, even when the wall clock stepped back between events: an old event above a
/// young one stays, so the oldest kept seq tells `recovered` the truth (no hole behind it).
#[tokio::test]
async fn age_retention_removes_only_a_prefix_when_the_clock_stepped_back() {
    let mut server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let acked = post_many(&mut alice, "r", "m", 5).await;
    assert_eq!(acked, [2, 3, 4, 5, 6]);
    let db = server.db.clone();
    let dir = server.keep_dir();
    drop(alice);
    server.shutdown().await.unwrap();

    // The clock as the stopped server's log recorded it: seqs 1-3 are two hours old, seq 4
    // young, seq 5 two hours old again (the clock stepped back), 6 and later young.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let old = now - 2 * 3600 * 1000;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE events SET ts_ms = ?1 WHERE room = 'r' AND seq IN (1, 2, 3, 5)",
        [old],
    )
    .unwrap();
    drop(conn);

    let server = TestServer::builder()
        .db(&db)
        .set("history.ttl_s", 3600)
        .start()
        .await;
    let mut bob = server.user("bob").await;
    // The indexer runs the age sweep once a second; readers see it once it settles.
    bob.join("other").await;
    let (ack, _) = bob.post("other", "tick", "t1").await;
    assert!(seq(&ack) >= 1);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let (page, kept) = loop {
        let page = history(&mut bob, json!({"room": "r", "after": 0, "limit": 50})).await;
        let kept = seqs(list(&page, "messages"));
        if kept[0] != 1 {
            break (page, kept);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing expired: {page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        kept[..3],
        [4, 5, 6],
        "only a prefix of the seqs went: {page}"
    );
    // since = 3: everything after it is kept, so it is recovered, with no hole.
    let joined = join_since(&mut bob, "r", 3, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let replay = seqs(list(&joined, "history"));
    assert_eq!(replay[..3], [4, 5, 6], "{joined}");
    // since = 2: seq 3 is gone, so it is not.
    let mut carol = server.user("carol").await;
    let joined = join_since(&mut carol, "r", 2, &epoch).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    server.shutdown().await.unwrap();
    drop(dir);
}

/// A node in a process of its own on `db`, so it can die by SIGKILL.
async fn killable_node(db: &std::path::Path) -> common::ChildNode {
    let args: [&std::ffi::OsStr; 4] = [
        "--db".as_ref(),
        db.as_os_str(),
        "--set".as_ref(),
        "api.key=journal-test-key".as_ref(),
    ];
    common::ChildNode::start(&args).await
}

/// Acknowledged messages outlive a SIGKILL that comes before SQLite ever committed them (the
/// writer is held from settling): the
/// node reads them back from its journal at the next start, under the same seqs and epoch,
/// and `since` recovers them. Before the kill, the HTTP API (a reader on its own connection)
/// already serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_outlive_a_sigkill_before_the_log_settles() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("journal.db");
    let mut node = killable_node(&db).await;
    node.fault("hold-settle", true).await;
    let mut alice = node.user("alice").await;
    let joined = alice.join("kept").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let since = seq(&joined);
    let acked = post_many(&mut alice, "kept", "before-kill", 5).await;
    let page = common::api_json(
        &format!(
            "http://127.0.0.1:{}/api/rooms/kept/messages?after={since}",
            node.port
        ),
        "journal-test-key",
    )
    .await;
    assert_eq!(seqs(list(&page, "messages")), acked, "{page}");

    // The fault: SIGKILL, with nothing settled into SQLite.
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let in_sqlite: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM events WHERE room = 'kept'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(in_sqlite, 0, "SQLite never had them: only the journal did");
    drop(node);

    let node = killable_node(&db).await;
    let mut bob = node.user("bob").await;
    let joined = join_since(&mut bob, "kept", since, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let replayed: Vec<u64> = list(&joined, "history")
        .iter()
        .filter(|f| f["type"] == "message")
        .map(seq)
        .collect();
    assert_eq!(replayed, acked, "{joined}");
    let (ack, _) = bob.post("kept", "after the restart", "after-1").await;
    assert!(seq(&ack) > *acked.last().unwrap(), "{ack}");
}
