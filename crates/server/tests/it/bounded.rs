//! Issue #12, part A: nothing one client does over HTTP can hold a node's connections, files or
//! memory without limit. Raw TCP sockets play the half-open clients.

use crate::common;

use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any bound a test sets: a socket still open after this was held open.
const PATIENCE: Duration = Duration::from_secs(10);

/// Half a request head: a slowloris client that never finishes it.
const PARTIAL_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";

/// Reads until the server closes the connection; what it sent, or a panic after [`PATIENCE`].
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server held the connection open for {PATIENCE:?}; it sent {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP response (head and `content-length` body) off a keep-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed before a whole response: {text:?}");
        out.extend_from_slice(&buf[..n]);
    }
}

async fn get_healthz(server: &TestServer) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// Half-open HTTP connections count toward `limits.max_connections_per_ip`: past it a new
/// connection gets a 429 and is closed at once; closing one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tcp_connection_counts_toward_the_per_ip_cap() {
    let server = TestServer::builder()
        .set("limits.max_connections_per_ip", 3)
        .start()
        .await;
    let mut held = Vec::new();
    for i in 0..3 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        if i > 0 {
            // One sends nothing at all, the others half a request head.
            stream.write_all(PARTIAL_HEAD).await.unwrap();
        }
        held.push(stream);
    }
    // The kernel hands connections over in order: this one comes after the three.
    let mut over = get_healthz(&server).await;
    let answer = String::from_utf8_lossy(&read_to_close(&mut over).await).to_string();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    assert!(answer.contains("too_many_connections"), "{answer:?}");

    // A closed connection frees its place once the server has seen the close.
    drop(held.pop());
    let mut served = false;
    for _ in 0..200 {
        let mut stream = get_healthz(&server).await;
        if read_response(&mut stream).await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the place of a closed connection was not freed");
}

/// `limits.max_connections` counts every TCP connection of the node: 503 past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tcp_connection_counts_toward_the_node_cap() {
    let server = TestServer::builder()
        .set("limits.max_connections", 2)
        .start()
        .await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first.write_all(PARTIAL_HEAD).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    let mut over = get_healthz(&server).await;
    let answer = String::from_utf8_lossy(&read_to_close(&mut over).await).to_string();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("\"unavailable\""), "{answer:?}");
}

/// A WebSocket holds exactly one place, its TCP connection's: with a cap of one per IP, one
/// socket connects, and a second connection from the same IP is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_holds_exactly_one_place() {
    let server = TestServer::builder()
        .set("limits.max_connections_per_ip", 1)
        .start()
        .await;
    let mut alice = server.user("alice").await;
    alice.join("r").await;
    let mut over = get_healthz(&server).await;
    let answer = String::from_utf8_lossy(&read_to_close(&mut over).await).to_string();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    // Alice's socket still works: the refusal took nothing from her.
    alice
        .send(serde_json::json!({"type": "ping", "id": "p"}))
        .await;
    assert_eq!(alice.recv_type("pong").await["id"], "p");
}

/// A connection that does not complete a request head within `server.header_read_timeout_ms`
/// (half a head, or nothing at all) is closed; so is one that sends no next request within it
/// after a response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_missing_request_heads_are_closed() {
    let server = TestServer::builder()
        .set("server.header_read_timeout_ms", 300)
        .start()
        .await;
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial.write_all(PARTIAL_HEAD).await.unwrap();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut kept = get_healthz(&server).await;
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));

    let started = std::time::Instant::now();
    let sent = read_to_close(&mut partial).await;
    // hyper may answer 408 before it closes; nothing else.
    let sent = String::from_utf8_lossy(&sent);
    assert!(
        sent.is_empty() || sent.starts_with("HTTP/1.1 408"),
        "{sent:?}"
    );
    assert!(read_to_close(&mut silent).await.is_empty());
    assert!(read_to_close(&mut kept).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// An idle keep-alive connection is closed after `server.http_idle_timeout_ms`, even when the
/// header timeout is longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let server = TestServer::builder()
        .set("server.header_read_timeout_ms", 60_000)
        .set("server.http_idle_timeout_ms", 300)
        .start()
        .await;
    let mut kept = get_healthz(&server).await;
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    assert!(read_to_close(&mut kept).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// `/echo` follows the heartbeat of `/ws`: it pings every `heartbeat.interval_ms` and drops a
/// peer silent for `heartbeat.timeout_ms`, which frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_echo_socket_is_pinged_then_dropped() {
    let server = TestServer::builder()
        .set("heartbeat.interval_ms", 100)
        .set("heartbeat.timeout_ms", 400)
        .set("limits.max_connections_per_ip", 1)
        .start()
        .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let sent = read_to_close(&mut stream).await;
    let head_end = sent
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a handshake answer");
    let head = String::from_utf8_lossy(&sent[..head_end]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let frames = &sent[head_end + 4..];
    assert!(
        frames.starts_with(&[0x89, 0x00]),
        "expected pings before the drop, got {frames:?}"
    );
    // The place is free again: a new echo socket connects.
    let mut echo = None;
    for _ in 0..200 {
        if let Ok(client) = common::Client::connect(&server.ws_url("/echo")).await {
            echo = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        echo.is_some(),
        "the dropped echo socket's place was not freed"
    );
}
