//! Test support: a real parley server on 127.0.0.1:0 with a temporary SQLite file and config
//! overrides, a WebSocket test client, and token helpers. Every integration test goes through
//! the front door with these.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parley::config::{Config, Overrides};
use parley_protocol::client::ClientFrame;
use parley_protocol::received::Received;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The HS256 secret the jwt-mode tests use.
pub const SECRET: &str = "test-secret-please-ignore";

/// How long a test waits for any single frame before it fails.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`TestServer`] with setting overrides.
pub struct Builder {
    values: Vec<(String, toml::Value)>,
    dir: Option<TempDir>,
    db: Option<PathBuf>,
}

impl Builder {
    /// Sets one setting by its dotted name.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.values.push((key.to_owned(), value.into()));
        self
    }

    /// jwt mode with the HS256 [`SECRET`].
    pub fn jwt(self) -> Self {
        self.set("auth.jwt_secret", SECRET)
    }

    /// Uses an existing database file (to restart on the same log).
    pub fn db(mut self, path: &Path) -> Self {
        self.db = Some(path.to_owned());
        self
    }

    /// The effective configuration this builder describes.
    pub fn config(&mut self) -> Config {
        let db = match &self.db {
            Some(db) => db.clone(),
            None => {
                let dir = self.dir.get_or_insert_with(|| TempDir::new().unwrap());
                dir.path().join("parley.db")
            }
        };
        let mut values = vec![(
            "store.db".to_owned(),
            toml::Value::from(db.display().to_string()),
        )];
        values.extend(self.values.iter().cloned());
        Config::load(&Overrides {
            config_file: None,
            values,
        })
        .expect("test config")
    }

    /// Starts the server on 127.0.0.1:0.
    pub async fn start(self) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.start_with(listener)
    }

    /// Starts the server on `addr` (e.g. a stopped server's, so that its clients' reconnects
    /// find the new one), retrying the bind briefly.
    pub async fn start_at(self, addr: SocketAddr) -> TestServer {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        self.start_with(listener)
    }

    fn start_with(mut self, listener: tokio::net::TcpListener) -> TestServer {
        let config = self.config();
        let db = config.store.db.clone();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(parley::run(listener, config, async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            db,
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: self.dir,
        }
    }
}

/// A running server.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its SQLite file.
    pub db: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<TempDir>,
}

impl TestServer {
    /// A builder for a server in anonymous mode.
    pub fn builder() -> Builder {
        Builder {
            values: Vec::new(),
            dir: None,
            db: None,
        }
    }

    /// A server with default settings, anonymous mode.
    pub async fn start() -> TestServer {
        Self::builder().start().await
    }

    /// `ws://addr{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// `http://addr{path}`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Connects a client to `path` (e.g. `/ws?user=alice`), failing the test on refusal.
    pub async fn connect(&self, path: &str) -> Client {
        Client::connect(&self.ws_url(path))
            .await
            .expect("websocket connect")
    }

    /// Connects anonymously as `user` and reads the `authenticated` frame.
    pub async fn user(&self, user: &str) -> Client {
        let mut client = self.connect(&format!("/ws?user={user}")).await;
        let frame = client.recv().await;
        assert_eq!(frame["type"], "authenticated", "{frame}");
        client
    }

    /// A raw client with a 4 KiB receive buffer, so the kernel cannot soak up a backlog: the
    /// member that stops reading in slow-consumer tests.
    pub async fn slow_reader(&self, path: &str) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(self.ws_url(path), MaybeTlsStream::Plain(stream))
                .await
                .expect("connect the slow reader");
        ws
    }

    /// Flips a test-only fault switch (feature `fault-hooks`, `POST /_faults/{name}`).
    pub async fn fault(&self, name: &str, on: bool) {
        flip_fault(&self.http_url(""), name, on).await;
    }

    /// Reads a test-only fault switch (`GET /_faults/{name}`).
    pub async fn fault_is_on(&self, name: &str) -> bool {
        let url = self.http_url(&format!("/_faults/{name}"));
        let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        body["on"] == true
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop().await
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(handle) => tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("shutdown within 30 s")
                .expect("server task"),
            None => Ok(()),
        }
    }

    /// Takes the temp dir so it outlives this server (to restart on the same db).
    pub fn keep_dir(&mut self) -> Option<TempDir> {
        self._dir.take()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A WebSocket test client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the client saw when it read.
#[derive(Debug)]
pub enum Event {
    /// A JSON text frame.
    Frame(Value),
    /// A close frame with its code (or 1005 when none was given).
    Close(u16),
    /// The stream ended without a close frame.
    Ended,
}

impl Client {
    /// Connects to a full `ws://` URL.
    pub async fn connect(url: &str) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Client { ws })
    }

    /// Sends a JSON value as a text frame.
    pub async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends a protocol frame, encoded with the protocol crate.
    pub async fn send_frame(&mut self, frame: &ClientFrame) {
        let text = serde_json::to_string(frame).expect("client frames encode");
        self.send_text(&text).await;
    }

    /// Reads the next frame and parses it with the protocol crate's
    /// [`received::parse`](parley_protocol::received::parse); fails on close, end, or a frame
    /// the protocol types do not describe.
    pub async fn recv_received(&mut self) -> Received {
        let frame = self.recv().await;
        parley_protocol::received::parse(&frame.to_string())
            .unwrap_or_else(|e| panic!("not a protocol frame ({e}): {frame}"))
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends a raw message (binary, ping, close...).
    pub async fn send_message(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Reads the next frame, close or end, skipping pings and pongs. Fails after
    /// [`FRAME_TIMEOUT`].
    pub async fn next_event(&mut self) -> Event {
        loop {
            let msg = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("no frame within the timeout");
            match msg {
                None => return Event::Ended,
                Some(Err(_)) => return Event::Ended,
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).expect("server sent JSON");
                    return Event::Frame(value);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Event::Close(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads the next JSON frame; fails on close or end.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(value) => value,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Reads the next frame and checks its type.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], ty, "expected a {ty} frame, got {frame}");
        frame
    }

    /// Reads frames until one of type `ty`, returning it and dropping the rest.
    pub async fn skip_until(&mut self, ty: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == ty {
                return frame;
            }
        }
    }

    /// Reads until the server closes; returns the close code. Frames before it are dropped.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.next_event().await {
                Event::Frame(_) => continue,
                Event::Close(code) => return code,
                Event::Ended => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Asserts that nothing but pings arrives within `ms`.
    pub async fn expect_silence(&mut self, ms: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Joins a room and returns the `joined` frame.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        self.recv_type("joined").await
    }

    /// Sends a message with a client id and waits for its ack, collecting the frames that
    /// arrive meanwhile (its own message copy among them). A `rate_limited` refusal is retried
    /// after `retry_after_ms` with the same id (it was not posted and does not count for
    /// de-duplication); any other error for this id fails the test.
    pub async fn post(&mut self, room: &str, content: &str, id: &str) -> (Value, Vec<Value>) {
        let request = json!({"type": "send", "room": room, "content": content, "id": id});
        self.send(request.clone()).await;
        let mut others = Vec::new();
        loop {
            let frame = self.recv().await;
            match frame["type"].as_str() {
                Some("ack") if frame["id"] == id => return (frame, others),
                Some("error") if frame["id"] == id && frame["code"] == "rate_limited" => {
                    let wait = frame["retry_after_ms"].as_u64().unwrap_or(100).min(2000);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    self.send(request.clone()).await;
                }
                Some("error") if frame["id"] == id => panic!("send {id} to {room} failed: {frame}"),
                _ => others.push(frame),
            }
        }
    }

    /// Closes from the client side with 1000.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: WsCloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next()).await {}
    }

    /// Drops the TCP connection without a close handshake.
    pub fn drop_abruptly(self) {
        drop(self);
    }
}

/// The contents of `user`'s messages among `frames`, in the order they appear.
pub fn contents_by(frames: &[Value], user: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["user"] == user)
        .map(|f| f["content"].as_str().unwrap().to_owned())
        .collect()
}

/// The `seq` of an event frame.
pub fn seq(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without seq: {frame}"))
}

/// The seqs of a list of event frames, in order.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(seq).collect()
}

/// An HS256 token for `sub` expiring in `ttl_s` seconds, with extra claims merged in.
pub fn token(sub: &str, ttl_s: i64, extra: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        sub,
        ttl_s,
        extra,
    )
}

/// Signs claims for `sub` with any key and algorithm.
pub fn sign(alg: Algorithm, key: &EncodingKey, sub: &str, ttl_s: i64, extra: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut claims = json!({"sub": sub, "exp": now + ttl_s, "iat": now});
    if let (Some(map), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        map.extend(extra);
    }
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

/// A test fixture file under tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// An HTTP API GET with the bearer `key`, its JSON body.
pub async fn api_json(url: &str, key: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("http get")
        .json()
        .await
        .expect("a JSON body")
}

/// Waits (at most `within`) until the node at `base` (`http://host:port`) answers `/readyz`
/// with 200: a node in a process of its own, just started.
pub async fn wait_ready(base: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while reqwest::get(format!("{base}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{base} not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plain HTTP GET returning status and body.
pub async fn http_get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("http get");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Tries an upgrade and returns the HTTP status of a refusal (panics if it upgraded).
pub async fn upgrade_status(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("upgrade to {url} succeeded; expected a refusal"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (status, body)
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

/// One of the project's YAML specs under docs/ (`openapi.yaml`, `asyncapi.yaml`), as JSON.
pub fn spec(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("docs/{name}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("docs/{name} is not valid YAML: {e}"))
}

/// Follows local `$ref`s in `spec` until a value without one.
pub fn resolve<'a>(spec: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs: {reference}"));
        value = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    value
}

/// A parley node in a process of its own (the binary cargo built), so a test can SIGKILL it;
/// `args` come after `--bind`. Killed when dropped.
pub struct ChildNode {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The process.
    pub child: std::process::Child,
}

impl ChildNode {
    /// Starts the node and waits for `/readyz`.
    pub async fn start(args: &[&std::ffi::OsStr]) -> ChildNode {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start parley");
        let node = ChildNode { port, child };
        wait_ready(&format!("http://127.0.0.1:{port}"), Duration::from_secs(10)).await;
        node
    }

    /// An anonymous user's connection, authenticated.
    pub async fn user(&self, user: &str) -> Client {
        let mut c = Client::connect(&format!("ws://127.0.0.1:{}/ws?user={user}", self.port))
            .await
            .unwrap();
        c.recv_type("authenticated").await;
        c
    }

    /// Flips a test-only fault switch (`POST /_faults/{name}`).
    pub async fn fault(&self, name: &str, on: bool) {
        flip_fault(&format!("http://127.0.0.1:{}", self.port), name, on).await;
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST {base}/_faults/{name}?on={on}`: a test-only fault switch of a node.
async fn flip_fault(base: &str, name: &str, on: bool) {
    let url = format!("{base}/_faults/{name}?on={on}");
    let status = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 204, "fault switch {name}");
}

/// Takes the database's write lock from a connection of the test's own, as another process
/// would: on a blocking thread (the wait must not stop a node running on the test's runtime),
/// once the node's indexer has settled. `ROLLBACK` releases it.
pub async fn hold_write_lock(db: &Path) -> rusqlite::Connection {
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || {
        let lock = rusqlite::Connection::open(db).unwrap();
        lock.busy_timeout(Duration::from_secs(10)).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        lock
    })
    .await
    .unwrap()
}

/// One value of the node's `/metrics`, 0 when absent.
pub async fn metric(base: &str, line_start: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}
