//! parley-client's token handling against a real jwt-mode server: a callback token is
//! refreshed before `exp` on the open connection; a 4011 (the refresh was refused) reconnects
//! with a new token and rejoins; a refused token (4001) is terminal.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Server, TIMEOUT};
use parley_client::{Client, Error, Options, State, TokenSource};
use tokio::sync::mpsc;

const SECRET: &str = "client-test-secret";

fn token(sub: &str, ttl_s: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"sub": sub, "exp": now + ttl_s, "iat": now});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn jwt_server() -> Server {
    Server::start(&[("auth.jwt_secret", toml::Value::from(SECRET))]).await
}

/// A token callback that answers call `n` (from 1) with `make(n)` and reports each call.
fn counting(
    make: impl Fn(usize) -> String + Send + Sync + 'static,
) -> (TokenSource, mpsc::UnboundedReceiver<usize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let source = TokenSource::callback(move || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let token = make(n);
        let _ = tx.send(n);
        async move { Ok(token) }
    });
    (source, rx)
}

/// Records every state the client passes through.
fn record_states(client: &Client) -> mpsc::UnboundedReceiver<State> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut state = client.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let s = *state.borrow_and_update();
            if tx.send(s).is_err() {
                break;
            }
        }
    });
    rx
}

async fn call(calls: &mut mpsc::UnboundedReceiver<usize>) -> usize {
    tokio::time::timeout(TIMEOUT, calls.recv())
        .await
        .expect("a token call within the timeout")
        .expect("callback alive")
}

fn fast(token: TokenSource) -> Options {
    Options {
        token: Some(token),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_token_is_refreshed_on_the_open_connection() {
    let server = jwt_server().await;
    // Two-second tokens: without a refresh the server closes 4011 at the first one's exp.
    let (source, mut calls) = counting(|_| token("alice", 2));
    let client = Client::connect(server.url(), fast(source));
    let mut states = record_states(&client);
    assert_eq!(client.wait_for(State::Open).await, State::Open);
    let room = client.room("r");
    room.join().await.unwrap();
    assert_eq!(call(&mut calls).await, 1);
    // The second and third calls are refreshes, the third after the first token's exp.
    assert_eq!(call(&mut calls).await, 2);
    assert_eq!(call(&mut calls).await, 3);
    let ack = room.send("still here").await.unwrap();
    assert!(ack.seq > 0);
    // The connection never dropped: the only state change was the first Open.
    let mut seen = Vec::new();
    while let Ok(s) = states.try_recv() {
        seen.push(s);
    }
    assert_eq!(seen, [State::Open], "no reconnect while refreshing");
    assert!(client.session().unwrap().exp.is_some());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_4011_reconnects_with_a_new_token_and_rejoins() {
    let server = jwt_server().await;
    // Call 1: a short token. Call 2 (the refresh): another user's, which the server refuses,
    // so the connection is closed 4011 at exp. Call 3 (the reconnect): a good long token.
    let (source, mut calls) = counting(|n| match n {
        1 => token("alice", 2),
        2 => token("mallory", 3600),
        _ => token("alice", 3600),
    });
    let client = Client::connect(server.url(), fast(source));
    let mut states = record_states(&client);
    let room = client.room("r");
    let mut events = room.events();
    let first = room.join().await.unwrap();
    assert_eq!(call(&mut calls).await, 1);
    assert_eq!(call(&mut calls).await, 2);
    assert_eq!(call(&mut calls).await, 3);
    // Open, then Connecting (the 4011), then Open again.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let s = tokio::time::timeout(TIMEOUT, states.recv())
            .await
            .expect("state change")
            .unwrap();
        seen.push(s);
    }
    assert_eq!(seen, [State::Open, State::Connecting, State::Open]);
    assert_eq!(client.error(), None);
    // Rejoined and resumed: a send goes through and arrives once, after the first join.
    let ack = room.send("after 4011").await.unwrap();
    let (m, _) = common::until(&mut events, |e| match e {
        parley_client::RoomEvent::Message(m) => Some(m.clone()),
        parley_client::RoomEvent::Reset { .. } => panic!("same server: no reset"),
        _ => None,
    })
    .await;
    assert_eq!((m.seq, m.content.as_str()), (ack.seq, "after 4011"));
    assert!(m.seq > first.seq);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_terminal() {
    let server = jwt_server().await;
    let (source, mut calls) = counting(|_| "not-a-jwt".to_owned());
    let client = Client::connect(server.url(), fast(source));
    let room = client.room("r");
    let err = tokio::time::timeout(TIMEOUT, room.join())
        .await
        .expect("answered")
        .unwrap_err();
    assert!(matches!(err, Error::Terminated { code: 4001, .. }), "{err}");
    assert_eq!(*client.state().borrow(), State::Closed);
    assert!(matches!(
        client.error(),
        Some(Error::Terminated { code: 4001, .. })
    ));
    // Terminal: the callback was asked once, and never again.
    assert_eq!(call(&mut calls).await, 1);
    assert!(calls.try_recv().is_err(), "no reconnect after 4001");
}
