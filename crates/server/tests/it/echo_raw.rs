//! `GET /echo?raw=1`: the exact-echo mode that conformance suites (Autobahn's fuzzingclient)
//! need. Text frames come back unchanged, fragmented messages come back whole, the default
//! `/echo` keeps its `Echo: ` prefix, and both answer a client's close frame.

use crate::common;

use common::{Client, TestServer, FRAME_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_echo_returns_text_unchanged() {
    let server = TestServer::start().await;
    let mut client = Client::connect(&server.ws_url("/echo?raw=1"))
        .await
        .expect("connect /echo?raw=1");

    for value in [
        json!({"type": "hello", "text": "hi"}),
        json!({"text": "héllo wörld ✓ 🚀", "n": 42}),
        json!({"big": "x".repeat(32 * 1024)}),
    ] {
        client.send_message(Message::text(value.to_string())).await;
        assert_eq!(client.recv().await, value);
    }

    // A message in three fragments is echoed as one unchanged text message.
    let whole = json!({"fragmented": true, "text": "ça va"});
    let bytes = whole.to_string().into_bytes();
    let (a, rest) = bytes.split_at(5);
    let (b, c) = rest.split_at(7);
    client
        .send_message(Message::Frame(Frame::message(
            a.to_vec(),
            OpCode::Data(Data::Text),
            false,
        )))
        .await;
    client
        .send_message(Message::Frame(Frame::message(
            b.to_vec(),
            OpCode::Data(Data::Continue),
            false,
        )))
        .await;
    client
        .send_message(Message::Frame(Frame::message(
            c.to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(client.recv().await, whole);

    client.close().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_raw_values_keep_the_prefix() {
    let server = TestServer::start().await;
    for path in ["/echo", "/echo?raw=0", "/echo?raw=no"] {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url(path))
            .await
            .expect("connect");
        ws.send(Message::text("{}")).await.unwrap();
        let reply = loop {
            match tokio::time::timeout(FRAME_TIMEOUT, ws.next())
                .await
                .expect("echo answered")
                .expect("stream open")
                .expect("read")
            {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => break other,
            }
        };
        assert_eq!(reply, Message::text("Echo: {}"), "{path}");
        ws.close(None).await.unwrap();
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_answers_the_closing_handshake() {
    let server = TestServer::start().await;
    for path in ["/echo?raw=1", "/echo"] {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url(path))
            .await
            .expect("connect");
        ws.close(None).await.unwrap();
        let reply = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .expect("echo answered the close");
        assert!(
            matches!(reply, Some(Ok(Message::Close(_)))),
            "{path}: expected a close frame back, got {reply:?}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_closes_like_the_chat_socket() {
    // An oversize frame: 1009, as on /ws.
    let server = TestServer::builder()
        .set("limits.max_frame_bytes", 2048)
        .start()
        .await;
    let mut client = Client::connect(&server.ws_url("/echo")).await.unwrap();
    client.send_text(&"z".repeat(3000)).await;
    assert_eq!(client.expect_close().await, 1009);

    // Shutdown: 1001, as on /ws.
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/echo"))
        .await
        .unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
        .await
        .unwrap();
    assert_eq!(echoed.unwrap().unwrap(), Message::text("Echo: still here"));
    let closing = tokio::spawn(server.shutdown());
    let close = loop {
        match tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    closing.await.unwrap().unwrap();
}
