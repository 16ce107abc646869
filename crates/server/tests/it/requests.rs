//! Protocol 1.1 on one node: every answer echoes its request's `id`, errors name their room,
//! `authenticated` carries the limits and `exp`, `refresh` is answered `refreshed`, ids are not
//! silently reused, joins and leaves are rate limited, and a narrower refreshed claim leaves
//! the rooms it no longer allows.

use crate::common;

use common::{token, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_and_error_echoes_the_request_id() {
    let server = TestServer::builder()
        .set("limits.max_rooms_per_connection", 2)
        .start()
        .await;
    let mut alice = server.user("alice").await;

    // Answers.
    alice
        .send(json!({"type": "join", "room": "r1", "id": "j1"}))
        .await;
    let joined = alice.recv_type("joined").await;
    assert_eq!(joined["id"], "j1", "{joined}");
    alice.send(json!({"type": "ping", "id": "p1"})).await;
    assert_eq!(alice.recv_type("pong").await["id"], "p1");
    alice
        .send(json!({"type": "history", "room": "r1", "id": "h1"}))
        .await;
    let history = alice.recv_type("history").await;
    assert_eq!(history["id"], "h1", "{history}");
    let (ack, _) = alice.post("r1", "hello", "s1").await;
    assert_eq!(ack["id"], "s1");
    alice
        .send(json!({"type": "leave", "room": "r1", "id": "l1"}))
        .await;
    let left = alice.recv_type("left").await;
    assert_eq!(
        (left["id"].as_str(), left["room"].as_str()),
        (Some("l1"), Some("r1"))
    );

    // Errors: each names its request's id and, when it has one, its room.
    let cases = [
        (
            json!({"type": "join", "room": "-bad", "id": "e1"}),
            "bad_request",
            Some("-bad"),
        ),
        (
            json!({"type": "leave", "room": "r9", "id": "e2"}),
            "not_joined",
            Some("r9"),
        ),
        (
            json!({"type": "send", "room": "r9", "content": "x", "id": "e3"}),
            "not_joined",
            Some("r9"),
        ),
        (
            json!({"type": "history", "room": "r1", "limit": 0, "id": "e4"}),
            "bad_request",
            Some("r1"),
        ),
        (
            json!({"type": "typing", "room": "r9", "id": "e5"}),
            "not_joined",
            Some("r9"),
        ),
        (
            json!({"type": "join", "room": "r1", "since": 3, "id": "e6"}),
            "bad_request",
            Some("r1"),
        ),
        (
            json!({"type": "send", "room": "r1", "id": "e7"}),
            "bad_request",
            Some("r1"),
        ),
        (
            json!({"type": "auth", "token": "x", "id": "e8"}),
            "bad_request",
            None,
        ),
        (
            json!({"type": "refresh", "token": "x", "id": "e9"}),
            "unauthorized",
            None,
        ),
    ];
    for (request, code, room) in cases {
        alice.send(request.clone()).await;
        let error = alice.recv_type("error").await;
        assert_eq!(error["code"], code, "{request} -> {error}");
        assert_eq!(error["id"], request["id"], "{request} -> {error}");
        assert_eq!(error["room"].as_str(), room, "{request} -> {error}");
    }
    alice.join("r1").await;
    alice.join("r2").await;
    alice
        .send(json!({"type": "join", "room": "r3", "id": "e10"}))
        .await;
    let error = alice.recv_type("error").await;
    assert_eq!(
        (
            error["code"].as_str(),
            error["id"].as_str(),
            error["room"].as_str()
        ),
        (Some("too_many_rooms"), Some("e10"), Some("r3")),
        "{error}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_carries_the_limits_and_the_expiry() {
    let server = TestServer::builder()
        .jwt()
        .set("limits.max_content_bytes", 1000)
        .set("limits.join_burst", 7)
        .start()
        .await;
    let mut client = server.connect("/ws").await;
    let jwt = token("alice", 600, json!({}));
    client.send(json!({"type": "auth", "token": jwt})).await;
    let frame = client.recv_type("authenticated").await;
    let limits = &frame["limits"];
    assert_eq!(limits["max_content_bytes"], 1000, "{frame}");
    assert_eq!(limits["max_rooms_per_connection"], 100, "{frame}");
    assert_eq!(limits["send_rate"], 10.0, "{frame}");
    assert_eq!(limits["send_burst"], 20, "{frame}");
    assert_eq!(limits["join_rate"], 5.0, "{frame}");
    assert_eq!(limits["join_burst"], 7, "{frame}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = frame["exp"].as_u64().expect("exp in jwt mode");
    assert!((now + 590..=now + 610).contains(&exp), "{frame}");

    client
        .send(json!({"type": "refresh", "token": token("alice", 1200, json!({})), "id": "r1"}))
        .await;
    let refreshed = client.recv_type("refreshed").await;
    assert_eq!(refreshed["id"], "r1");
    assert!(
        refreshed["exp"].as_u64().unwrap() >= exp + 590,
        "{refreshed}"
    );
    server.shutdown().await.unwrap();

    // Anonymous mode has no token, so no `exp`.
    let server = TestServer::start().await;
    let mut bob = server.connect("/ws?user=bob").await;
    let frame = bob.recv_type("authenticated").await;
    assert!(frame.get("exp").is_none(), "{frame}");
    assert_eq!(frame["limits"]["max_content_bytes"], 4096, "{frame}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_id_is_a_duplicate_only_for_the_same_content() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("room").await;
    let (first, _) = alice.post("room", "hello", "m1").await;
    assert!(first.get("duplicate").is_none(), "{first}");

    // The same content under the same id: the original ack, marked duplicate.
    let (again, _) = alice.post("room", "hello", "m1").await;
    assert_eq!(again["seq"], first["seq"], "{again}");
    assert_eq!(again["duplicate"], true, "{again}");

    // New content under a used id: refused, nothing stored.
    alice
        .send(json!({"type": "send", "room": "room", "content": "something else", "id": "m1"}))
        .await;
    let error = alice.skip_until("error").await;
    assert_eq!(
        (
            error["code"].as_str(),
            error["id"].as_str(),
            error["room"].as_str()
        ),
        (Some("id_conflict"), Some("m1"), Some("room")),
        "{error}"
    );
    let (next, _) = alice.post("room", "new text", "m2").await;
    assert_eq!(
        next["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 1,
        "the conflicting message took no seq: {next}"
    );
    alice
        .send(json!({"type": "history", "room": "room", "id": "h"}))
        .await;
    let history = alice.skip_until("history").await;
    let contents: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["hello", "new text"], "{history}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_rate_limited_and_count_toward_4008() {
    let server = TestServer::builder()
        .set("limits.join_rate", 0.01)
        .set("limits.join_burst", 4)
        .set("limits.abuse_refusals", 3)
        .start()
        .await;
    let mut mallory = server.user("mallory").await;
    // Four tokens: join, leave, join, leave.
    for round in 0..2 {
        mallory.join(&format!("fresh-{round}")).await;
        mallory
            .send(json!({"type": "leave", "room": format!("fresh-{round}")}))
            .await;
        mallory.recv_type("left").await;
    }
    // The fifth is refused and has no effect: the room is not joined, nothing is stored.
    mallory
        .send(json!({"type": "join", "room": "fresh-9", "id": "j9"}))
        .await;
    let error = mallory.recv_type("error").await;
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert_eq!(error["id"], "j9", "{error}");
    assert!(error["retry_after_ms"].as_u64().unwrap() > 0, "{error}");
    mallory
        .send(json!({"type": "send", "room": "fresh-9", "content": "x"}))
        .await;
    assert_eq!(mallory.recv_type("error").await["code"], "not_joined");
    // Two more refusals make three: the third gets its error, then close 4008.
    mallory
        .send(json!({"type": "join", "room": "fresh-9"}))
        .await;
    assert_eq!(mallory.recv_type("error").await["code"], "rate_limited");
    mallory
        .send(json!({"type": "join", "room": "fresh-9"}))
        .await;
    assert_eq!(mallory.recv_type("error").await["code"], "rate_limited");
    assert_eq!(mallory.expect_close().await, 4008);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrower_refresh_leaves_the_rooms_it_excludes() {
    let server = TestServer::builder().jwt().start().await;
    let both = token("alice", 600, json!({"rooms": ["r1", "r2"]}));
    let mut alice = server.connect(&format!("/ws?token={both}")).await;
    alice.recv_type("authenticated").await;
    let mut bob = server
        .connect(&format!("/ws?token={}", token("bob", 600, json!({}))))
        .await;
    bob.recv_type("authenticated").await;
    bob.join("r2").await;
    alice.join("r1").await;
    alice.join("r2").await;
    bob.recv_type("system").await; // alice joined r2

    let narrower = token("alice", 600, json!({"rooms": ["r1"]}));
    alice
        .send(json!({"type": "refresh", "token": narrower, "id": "r"}))
        .await;
    assert_eq!(alice.recv_type("refreshed").await["id"], "r");
    let left = alice.recv_type("left").await;
    assert_eq!(
        (left["room"].as_str(), left["reason"].as_str()),
        (Some("r2"), Some("forbidden")),
        "{left}"
    );
    // The leave is announced to the room like any other.
    let leave = bob.recv_type("system").await;
    assert_eq!(
        (leave["event"].as_str(), leave["user"].as_str()),
        (Some("leave"), Some("alice"))
    );
    // Sends to the excluded room are refused; the kept room still works.
    alice
        .send(json!({"type": "send", "room": "r2", "content": "still here?", "id": "x"}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "not_joined");
    alice.post("r1", "fine", "y").await;
    // Bob's next frame in r2 is his own message: nothing of alice's reached r2.
    let (ack, _) = bob.post("r2", "check", "b1").await;
    assert_eq!(ack["seq"], leave["seq"].as_u64().unwrap() + 1, "{ack}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4008_close_comes_after_the_ack_of_an_accepted_send() {
    const BURST: usize = 20;
    let server = TestServer::builder()
        .set("limits.send_rate", 0.01)
        .set("limits.send_burst", BURST as i64)
        .set("limits.abuse_refusals", 1)
        .start()
        .await;
    for trial in 0..10 {
        let mut mallory = server.user(&format!("m{trial}")).await;
        mallory.join("flood").await;
        // The burst is accepted (and stored), the next one refused, which reaches the abuse
        // limit at once: every accepted send is acked before the close.
        for i in 0..=BURST {
            mallory
                .send(
                    json!({"type": "send", "room": "flood", "content": "x", "id": format!("s{i}")}),
                )
                .await;
        }
        let mut acked = 0;
        loop {
            match mallory.next_event().await {
                common::Event::Frame(frame) if frame["type"] == "ack" => acked += 1,
                common::Event::Frame(_) => {}
                common::Event::Close(code) => {
                    assert_eq!(code, 4008);
                    break;
                }
                other => panic!("trial {trial}: {other:?}"),
            }
        }
        assert_eq!(
            acked, BURST,
            "trial {trial}: the close came before the acks of stored messages"
        );
    }
    server.shutdown().await.unwrap();
}

/// The same answers, sent and read as the protocol crate's types: what a typed client sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_parse_as_protocol_types_and_echo_ids() {
    use parley_protocol::client::ClientFrame;
    use parley_protocol::received::Received;

    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice
        .send_frame(&ClientFrame::Join {
            room: "typed".into(),
            since: None,
            epoch: None,
            id: Some("j1".into()),
        })
        .await;
    let Received::Joined(joined) = alice.recv_received().await else {
        panic!("expected joined")
    };
    assert_eq!(
        (joined.id.as_deref(), joined.room.as_str()),
        (Some("j1"), "typed")
    );
    alice
        .send_frame(&ClientFrame::Ping {
            id: Some("p1".into()),
        })
        .await;
    assert_eq!(
        alice.recv_received().await,
        Received::Pong {
            id: Some("p1".into())
        }
    );
    alice
        .send_frame(&ClientFrame::Send {
            room: "typed".into(),
            content: "hi".into(),
            id: Some("s1".into()),
        })
        .await;
    // The ack and the sender's own copy, in either order.
    let (mut acked, mut copied) = (None, None);
    while acked.is_none() || copied.is_none() {
        match alice.recv_received().await {
            Received::Ack {
                id, seq, duplicate, ..
            } => {
                assert_eq!((id.as_deref(), duplicate), (Some("s1"), false));
                acked = Some(seq);
            }
            Received::Message(m) => copied = Some((m.seq, m.id)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(copied, Some((joined.seq + 1, Some("s1".into()))));
    assert_eq!(acked, Some(joined.seq + 1));
    alice
        .send_frame(&ClientFrame::History {
            room: "typed".into(),
            before: None,
            after: Some(joined.seq),
            limit: Some(10),
            id: Some("h1".into()),
        })
        .await;
    let Received::History {
        messages, more, id, ..
    } = alice.recv_received().await
    else {
        panic!("expected history")
    };
    assert_eq!(
        (id.as_deref(), more, messages.len()),
        (Some("h1"), false, 1)
    );
    alice
        .send_frame(&ClientFrame::Send {
            room: "nowhere".into(),
            content: "x".into(),
            id: Some("e1".into()),
        })
        .await;
    assert!(matches!(
        alice.recv_received().await,
        Received::Error { code: parley_protocol::ErrorCode::NotJoined, id: Some(id), room: Some(room), .. }
            if id == "e1" && room == "nowhere"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_events_carry_the_display_name() {
    let server = TestServer::builder().jwt().start().await;
    let connect = |sub: &str, name: &str| {
        let url = format!("/ws?token={}", token(sub, 600, json!({"name": name})));
        let server = &server;
        async move {
            let mut client = server.connect(&url).await;
            client.recv_type("authenticated").await;
            client
        }
    };
    let mut bob = connect("bob", "Bob").await;
    bob.join("hall").await;
    let mut alice = connect("alice", "Alice Liddell").await;
    alice.join("hall").await;
    let join = bob.recv_type("system").await;
    assert_eq!(
        (
            join["event"].as_str(),
            join["user"].as_str(),
            join["name"].as_str()
        ),
        (Some("join"), Some("alice"), Some("Alice Liddell")),
        "{join}"
    );
    alice.close().await;
    let leave = bob.recv_type("system").await;
    assert_eq!(
        (leave["event"].as_str(), leave["name"].as_str()),
        (Some("leave"), Some("Alice Liddell")),
        "{leave}"
    );
    // Stored as sent: history has the name too.
    bob.send(json!({"type": "history", "room": "hall"})).await;
    let page = bob.recv_type("history").await;
    let names: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["Bob", "Alice Liddell", "Alice Liddell"], "{page}");
    server.shutdown().await.unwrap();
}
