//! Bad input and resource limits, through real sockets: malformed frames, oversize content and
//! frames, invalid UTF-8, heartbeats and the outbound queue bound.

use crate::common;

use std::time::Duration;

use common::{Client, TestServer, FRAME_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type RawWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Proves the connection is still open and that nothing else was queued before: an
/// application ping must be answered by the very next frame.
async fn assert_alive(client: &mut Client) {
    client.send(json!({"type": "ping"})).await;
    let frame = client.recv().await;
    assert_eq!(frame["type"], "pong", "expected pong, got {frame}");
}

/// Sends `text` and expects exactly one `error bad_request` (echoing `id` when given), with the
/// connection still open afterwards.
async fn expect_bad_request(client: &mut Client, text: &str, id: Option<&str>) {
    client.send_text(text).await;
    let frame = client.recv().await;
    assert_eq!(frame["type"], "error", "for {text}: {frame}");
    assert_eq!(frame["code"], "bad_request", "for {text}: {frame}");
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "for {text}: error without a message: {frame}"
    );
    if let Some(id) = id {
        assert_eq!(frame["id"], id, "for {text}: id not echoed: {frame}");
    }
    assert_alive(client).await;
}

/// Reads the next text frame of a raw stream as JSON, answering pings on the way.
async fn raw_recv(ws: &mut RawWs) -> Value {
    loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .expect("no frame within the timeout")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Connects anonymously as `user` with a raw stream and reads `authenticated`.
async fn raw_user(server: &TestServer, user: &str) -> RawWs {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url(&format!("/ws?user={user}")))
        .await
        .expect("connect");
    let frame = raw_recv(&mut ws).await;
    assert_eq!(frame["type"], "authenticated", "{frame}");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_bad_request_and_the_connection_stays() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("general").await;

    // Invalid JSON.
    expect_bad_request(&mut alice, "this is not json", None).await;
    expect_bad_request(&mut alice, r#"{"type":"send","room":"#, None).await;
    // Valid JSON, but not an object.
    expect_bad_request(&mut alice, "[1,2,3]", None).await;
    expect_bad_request(&mut alice, r#""ping""#, None).await;
    expect_bad_request(&mut alice, "42", None).await;
    // Missing type, type of the wrong kind, unknown type.
    expect_bad_request(&mut alice, "{}", None).await;
    expect_bad_request(&mut alice, r#"{"type":5}"#, None).await;
    expect_bad_request(&mut alice, r#"{"type":"shout","room":"general"}"#, None).await;
    // Missing required fields; the send's id is echoed.
    expect_bad_request(
        &mut alice,
        r#"{"type":"send","room":"general","id":"c-missing"}"#,
        Some("c-missing"),
    )
    .await;
    expect_bad_request(&mut alice, r#"{"type":"join"}"#, None).await;
    expect_bad_request(&mut alice, r#"{"type":"leave"}"#, None).await;
    // Wrong field types.
    expect_bad_request(&mut alice, r#"{"type":"join","room":42}"#, None).await;
    expect_bad_request(
        &mut alice,
        r#"{"type":"send","room":"general","content":7,"id":"c-type"}"#,
        Some("c-type"),
    )
    .await;
    expect_bad_request(
        &mut alice,
        r#"{"type":"history","room":"general","limit":"ten"}"#,
        None,
    )
    .await;
    // An id over 64 characters: refused, and nothing is posted (the pong comes right after).
    let long_id = "i".repeat(65);
    expect_bad_request(
        &mut alice,
        &json!({"type": "send", "room": "general", "content": "x", "id": long_id}).to_string(),
        None,
    )
    .await;
    // A well-formed send to an invalid room name echoes its id.
    expect_bad_request(
        &mut alice,
        r#"{"type":"send","room":"no spaces!","content":"x","id":"c-room"}"#,
        Some("c-room"),
    )
    .await;
    // A binary frame.
    alice
        .send_message(Message::binary(br#"{"type":"ping"}"#.to_vec()))
        .await;
    let frame = alice.recv().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], "bad_request", "{frame}");
    assert_alive(&mut alice).await;

    // After all that the connection still works, and an id of exactly 64 chars is fine.
    let id64 = "j".repeat(64);
    let (ack, _) = alice.post("general", "still here", &id64).await;
    assert_eq!(ack["seq"], 2, "{ack}");
    alice.close().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_over_the_limit_is_too_large_and_not_posted() {
    let server = TestServer::builder()
        .set("limits.max_content_bytes", 10)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    alice.join("room1").await;
    let mut bob = server.user("bob").await;
    let joined = bob.join("room1").await;
    let bob_join_seq = joined["seq"].as_u64().unwrap();
    alice.recv_type("system").await; // bob's join

    // 11 ASCII bytes.
    alice
        .send(json!({"type": "send", "room": "room1", "content": "12345678901", "id": "big-1"}))
        .await;
    let err = alice.recv_type("error").await;
    assert_eq!(err["code"], "too_large", "{err}");
    assert_eq!(err["id"], "big-1", "{err}");
    assert_alive(&mut alice).await;

    // 6 characters but 11 bytes: the limit counts bytes.
    alice
        .send(json!({"type": "send", "room": "room1", "content": "ééééé!", "id": "big-2"}))
        .await;
    let err = alice.recv_type("error").await;
    assert_eq!(err["code"], "too_large", "{err}");
    assert_eq!(err["id"], "big-2", "{err}");

    // Empty content.
    alice
        .send(json!({"type": "send", "room": "room1", "content": "", "id": "empty-1"}))
        .await;
    let err = alice.recv_type("error").await;
    assert_eq!(err["code"], "bad_request", "{err}");
    assert_eq!(err["id"], "empty-1", "{err}");
    assert_alive(&mut alice).await;

    // Exactly 10 bytes is accepted, and it is the first thing bob sees after his join.
    let (ack, _) = alice.post("room1", "ééééé", "ok-1").await;
    assert_eq!(
        ack["seq"],
        bob_join_seq + 1,
        "refused sends took a seq: {ack}"
    );
    let msg = bob.recv_type("message").await;
    assert_eq!(msg["content"], "ééééé", "{msg}");
    assert_eq!(msg["id"], "ok-1", "{msg}");

    // The history holds the joins and the accepted message only.
    bob.send(json!({"type": "history", "room": "room1", "after": 0, "limit": 200}))
        .await;
    let page = bob.recv_type("history").await;
    let messages = page["messages"].as_array().expect("messages");
    let posted: Vec<&Value> = messages.iter().filter(|m| m["type"] == "message").collect();
    assert_eq!(posted.len(), 1, "{page}");
    assert_eq!(posted[0]["content"], "ééééé", "{page}");
    alice.close().await;
    bob.close().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_max_frame_bytes_closes_1009() {
    let server = TestServer::builder()
        .set("limits.max_frame_bytes", 2048)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    alice.join("general").await;
    // Just under the frame limit is fine.
    let content = "a".repeat(1900);
    let (ack, _) = alice.post("general", &content, "under").await;
    assert_eq!(ack["seq"], 2, "{ack}");
    // Over it closes the connection with 1009.
    let content = "b".repeat(3000);
    alice
        .send(json!({"type": "send", "room": "general", "content": content, "id": "over"}))
        .await;
    assert_eq!(alice.expect_close().await, 1009);

    // Nothing of the oversize frame was posted.
    let mut bob = server.user("bob").await;
    let joined = bob.join("general").await;
    let history = joined["history"].as_array().unwrap();
    assert!(
        history.iter().all(|e| e["id"] != "over"),
        "oversize message was posted: {joined}"
    );
    bob.close().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_with_invalid_utf8_closes_1007() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    assert_alive(&mut alice).await;
    // A ping frame whose string value holds bytes that are not UTF-8.
    let mut payload = br#"{"type":"ping","x":""#.to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    payload.extend_from_slice(br#""}"#);
    assert!(std::str::from_utf8(&payload).is_err());
    alice
        .send_message(Message::Frame(Frame::message(
            payload,
            OpCode::Data(Data::Text),
            true,
        )))
        .await;
    assert_eq!(alice.expect_close().await, 1007);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_pings_keep_readers_and_drop_silent_peers() {
    let server = TestServer::builder()
        .set("heartbeat.interval_ms", 100)
        .set("heartbeat.timeout_ms", 400)
        .start()
        .await;

    // A peer that joins and then never reads again (so never answers a ping).
    let mut ghost = raw_user(&server, "ghost").await;
    ghost
        .send(Message::text(
            json!({"type": "join", "room": "hb"}).to_string(),
        ))
        .await
        .unwrap();
    let joined = raw_recv(&mut ghost).await;
    assert_eq!(joined["type"], "joined", "{joined}");

    // A reader in the same room: it sees the ghost's leave once the heartbeat gives up on it.
    let mut watcher = server.user("watcher").await;
    let joined = watcher.join("hb").await;
    assert_eq!(joined["users"], json!(["ghost", "watcher"]), "{joined}");
    let leave = watcher.recv_type("system").await;
    assert_eq!(leave["event"], "leave", "{leave}");
    assert_eq!(leave["user"], "ghost", "{leave}");
    assert_eq!(leave["seq"], joined["seq"].as_u64().unwrap() + 1, "{leave}");
    drop(ghost);

    // The watcher keeps reading (and so answering pings) for 1.2 s, three timeouts' worth,
    // and is still connected after.
    let watcher_task = tokio::spawn(async move {
        watcher.expect_silence(1200).await;
        assert_alive(&mut watcher).await;
        watcher
    });

    // Meanwhile a raw reader sees the WebSocket pings themselves, answers them (tungstenite
    // does so while reading) and stays connected across many timeouts' worth of pings.
    let mut reader = raw_user(&server, "reader").await;
    let mut pings = 0;
    while pings < 12 {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, reader.next())
            .await
            .expect("the server sent no ping")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Ping(_) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    reader
        .send(Message::text(json!({"type": "ping"}).to_string()))
        .await
        .unwrap();
    assert_eq!(raw_recv(&mut reader).await["type"], "pong");

    let watcher = watcher_task.await.expect("watcher stayed connected");
    watcher.close().await;
    drop(reader);
    server.shutdown().await.unwrap();
}

/// Raises `limits.send_rate`/`send_burst` where those settings exist, so a test that posts a
/// lot measures the queue bound and not the rate limiter.
fn without_rate_limit(mut builder: common::Builder) -> common::Builder {
    let names: Vec<&str> = parley::config::SETTINGS.iter().map(|s| s.0).collect();
    if names.contains(&"limits.send_rate") {
        builder = builder.set("limits.send_rate", 1_000_000);
    }
    if names.contains(&"limits.send_burst") {
        builder = builder.set("limits.send_burst", 1_000_000);
    }
    builder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_stops_reading_is_closed_4009_and_others_get_everything() {
    const POSTS: usize = 300;
    const CONTENT_BYTES: usize = 32 * 1024;
    let builder = TestServer::builder()
        .set("limits.outbound_queue_frames", 20)
        .set("limits.max_content_bytes", 40_000)
        .set("limits.close_grace_ms", 60_000)
        .set("store.synchronous", "normal");
    let server = without_rate_limit(builder).start().await;

    // The slow member: a small receive buffer so the kernel does not soak up the backlog.
    let mut slow = server.slow_reader("/ws?user=slow").await;
    assert_eq!(raw_recv(&mut slow).await["type"], "authenticated");
    slow.send(Message::text(
        json!({"type": "join", "room": "flood"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(raw_recv(&mut slow).await["type"], "joined");

    // A member that keeps reading, on its own task.
    let mut reader = server.user("reader").await;
    reader.join("flood").await;
    let reader_task = tokio::spawn(async move {
        let mut messages = Vec::new();
        while messages.len() < POSTS {
            let frame = reader.recv().await;
            if frame["type"] == "message" {
                messages.push(frame);
            }
        }
        (reader, messages)
    });

    // The poster.
    let mut poster = server.user("poster").await;
    poster.join("flood").await;
    let mut acks = Vec::new();
    for i in 0..POSTS {
        let mut content = format!("{i:06}-");
        content.push_str(&"x".repeat(CONTENT_BYTES - content.len()));
        let (ack, _) = poster.post("flood", &content, &format!("m{i}")).await;
        acks.push(ack["seq"].as_u64().expect("ack seq"));
    }

    // The reader got every message, in order, with the acked seqs.
    let (reader, messages) = tokio::time::timeout(Duration::from_secs(60), reader_task)
        .await
        .expect("reader finished")
        .unwrap();
    for (i, (msg, seq)) in messages.iter().zip(&acks).enumerate() {
        assert_eq!(msg["id"], format!("m{i}"), "out of order at {i}");
        assert_eq!(msg["seq"], *seq, "wrong seq at {i}");
        assert!(
            msg["content"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{i:06}-")),
            "wrong content at {i}"
        );
    }

    // The slow member, once it reads again, finds a 4009 close after some of the backlog.
    let mut frames = 0usize;
    let code = loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, slow.next())
            .await
            .expect("slow member: nothing within the timeout");
        match msg {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(Message::Text(_))) => frames += 1,
            Some(Ok(_)) => {}
            Some(Err(err)) => panic!("slow member: read error {err} after {frames} frames"),
            None => panic!("slow member: ended without a close frame after {frames} frames"),
        }
    };
    // Keep reading so tungstenite sends the close reply and the server can let go.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(FRAME_TIMEOUT, slow.next()).await {}
    assert_eq!(code, Some(4009), "after {frames} frames");
    assert!(
        frames < POSTS,
        "the slow member received all {frames} messages: it was never behind"
    );
    reader.close().await;
    poster.close().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_with_a_bad_room_name_is_bad_request() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    for frame in [
        json!({"type": "join", "room": "-bad"}),
        json!({"type": "leave", "room": "-bad"}),
        json!({"type": "typing", "room": "-bad"}),
        json!({"type": "history", "room": "-bad"}),
        json!({"type": "send", "room": "-bad", "content": "x", "id": "b1"}),
    ] {
        expect_bad_request(&mut alice, &frame.to_string(), frame["id"].as_str()).await;
    }
}

/// A masked client text frame (mask key 1, 2, 3, 4) holding `text`.
fn masked_text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    assert!(payload.len() < 126, "a short frame");
    let key = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// The next text frame the server writes on `stream` (unmasked, as servers send), parsed.
async fn read_text_frame(stream: &mut TcpStream) -> Value {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x81, "a final text frame");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).await.unwrap();
            u16::from_be_bytes(ext) as usize
        }
        127 => panic!("no frame here is that long"),
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    serde_json::from_slice(&payload).unwrap()
}

/// Reads after a short read: the server stops reading once a read returns fewer bytes than it
/// asked for (the socket is empty), and must wake for what arrives later. Every write here
/// holds the end of one frame and the start of the next; the answer to the first is the event
/// that says the server read that write (a short read) before the next one is sent. The first
/// frame starts in the same write as the upgrade request. A wake-up
/// lost after a short read leaves a frame unanswered, and the test times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_split_across_writes_are_each_read_and_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = "GET /ws?user=alice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|i| masked_text_frame(&format!(r#"{{"type":"ping","id":"p{i}"}}"#)))
        .collect();
    // The first frame's first 5 bytes go with the request: the HTTP server may read them
    // with it, and the socket must go on from them.
    stream
        .write_all(&[request.as_bytes(), &frames[0][..5]].concat())
        .await
        .unwrap();
    // The response head, byte by byte: nothing after it may be taken from the frames.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let first = read_text_frame(&mut stream).await;
    assert_eq!(first["type"], "authenticated", "{first}");

    // Each next write ends the frame before it and starts the next one, cut at a different
    // place each time.
    let mut pending = Vec::new();
    let mut rest = frames[0][5..].to_vec();
    for (i, next) in frames.iter().enumerate().skip(1) {
        stream.write_all(&pending).await.unwrap();
        if i > 1 {
            let pong = tokio::time::timeout(FRAME_TIMEOUT, read_text_frame(&mut stream))
                .await
                .unwrap_or_else(|_| panic!("no answer to ping p{}", i - 2));
            assert_eq!(pong["type"], "pong", "{pong}");
            assert_eq!(pong["id"], format!("p{}", i - 2), "{pong}");
        }
        let cut = 1 + i % (next.len() - 1);
        pending = [&rest[..], &next[..cut]].concat();
        rest = next[cut..].to_vec();
    }
    stream.write_all(&pending).await.unwrap();
    stream.write_all(&rest).await.unwrap();
    for i in frames.len() - 2..frames.len() {
        let pong = tokio::time::timeout(FRAME_TIMEOUT, read_text_frame(&mut stream))
            .await
            .unwrap_or_else(|_| panic!("no answer to ping p{i}"));
        assert_eq!(pong["id"], format!("p{i}"), "{pong}");
    }
    drop(stream);
    server.shutdown().await.unwrap();
}
