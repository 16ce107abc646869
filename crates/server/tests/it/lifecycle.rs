//! The process from outside: health endpoints, the echo socket, graceful shutdown (library and
//! real binary under SIGTERM), durability across SIGKILL, configuration layering, `--help`
//! and the connection log lines.

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{http_get, Client, TestServer, FRAME_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for the binary to listen or to exit before it fails.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// A `parley` process started by a test; killed when dropped.
struct Parley {
    child: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

/// A loopback address nobody listens on right now.
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `parley` with a clean environment: no inherited `PARLEY_*` settings, logs at info.
fn parley_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PARLEY_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Collects a pipe into a shared string on a thread.
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut sink = sink.lock().unwrap();
            sink.push_str(&line);
            sink.push('\n');
        }
    });
    out
}

/// Removes ANSI colour sequences, in case the log is coloured anyway.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `--set` arguments that lift the send rate limit, where the build has one, so tests that post
/// a burst measure what they mean to.
fn no_rate_limit_args() -> Vec<String> {
    let mut args = Vec::new();
    for (name, _, _) in parley::config::SETTINGS {
        if *name == "limits.send_rate" || *name == "limits.send_burst" {
            args.push("--set".to_owned());
            args.push(format!("{name}=1000000"));
        }
    }
    args
}

impl Parley {
    /// Starts the binary on a free loopback port with `--db db` and waits until it accepts.
    async fn start(db: &Path, args: &[&str], envs: &[(&str, &str)]) -> Parley {
        let addr = free_addr();
        let mut cmd = parley_command();
        cmd.arg("--bind")
            .arg(addr.to_string())
            .arg("--db")
            .arg(db)
            .args(args);
        for (key, value) in envs {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().expect("spawn parley");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let mut parley = Parley {
            child,
            addr,
            stdout,
            stderr,
        };
        let deadline = tokio::time::Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(status) = parley.child.try_wait().unwrap() {
                panic!(
                    "parley exited with {status} before listening\nstdout:\n{}\nstderr:\n{}",
                    parley.stdout(),
                    parley.stderr()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return parley;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "parley did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Connects anonymously as `user` and reads `authenticated`.
    async fn user(&self, user: &str) -> Client {
        let mut client = Client::connect(&self.ws_url(&format!("/ws?user={user}")))
            .await
            .expect("connect to parley");
        client.recv_type("authenticated").await;
        client
    }

    fn stdout(&self) -> String {
        strip_ansi(&self.stdout.lock().unwrap())
    }

    fn stderr(&self) -> String {
        strip_ansi(&self.stderr.lock().unwrap())
    }

    /// Sends SIGTERM.
    fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit.
    async fn wait(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the pipe threads catch up with the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "parley did not exit\nstdout:\n{}",
                self.stdout()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the log has a line containing `needle`, and returns that line.
    async fn log_line(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
        loop {
            let out = self.stdout();
            if let Some(line) = out.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {needle:?}; stdout:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Parley {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `parley` with `args` to completion (it must exit on its own) and returns the status
/// and both outputs.
async fn run_to_exit(cmd: &mut Command) -> (ExitStatus, String, String) {
    let mut child = cmd.spawn().expect("spawn parley");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let mut parley = Parley {
        child,
        addr: free_addr(),
        stdout,
        stderr,
    };
    let status = parley.wait().await;
    (status, parley.stdout(), parley.stderr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer() {
    let server = TestServer::start().await;
    let (status, _) = http_get(&server.http_url("/healthz")).await;
    assert_eq!(status, 200);
    let (status, body) = http_get(&server.http_url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(body, json!({"status": "ready", "checks": {"store": "ok"}}));
    server.shutdown().await.unwrap();
}

/// The next data frame of the echo socket.
async fn echo_next(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Message {
    loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .expect("echo answered")
            .expect("stream open")
            .expect("read");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_answers_text_and_binary() {
    let server = TestServer::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/echo"))
        .await
        .expect("connect /echo");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(echo_next(&mut ws).await, Message::text("Echo: hi"));
    let bytes = vec![0u8, 1, 2, 0xff, 0xfe];
    ws.send(Message::binary(bytes.clone())).await.unwrap();
    assert_eq!(echo_next(&mut ws).await, Message::binary(bytes));
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(echo_next(&mut ws).await, Message::text("Echo: again"));
    ws.close(None).await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_shutdown_closes_sockets_with_1001() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let mut alice = server.user("alice").await;
    alice.join("general").await;
    alice.post("general", "before shutdown", "m1").await;
    let closer = tokio::spawn(async move { alice.expect_close().await });
    server.shutdown().await.expect("shutdown returns Ok");
    assert_eq!(closer.await.unwrap(), 1001);
    // The listener is gone once run() has returned.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_shuts_down_gracefully_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let mut parley = Parley::start(&dir.path().join("p.db"), &[], &[]).await;
    let mut alice = parley.user("alice").await;
    alice.join("general").await;
    let (ack, _) = alice.post("general", "hello", "m1").await;
    assert_eq!(ack["seq"], 2, "{ack}");
    let closer = tokio::spawn(async move { alice.expect_close().await });
    parley.sigterm();
    assert_eq!(closer.await.unwrap(), 1001);
    let status = parley.wait().await;
    assert!(
        status.success(),
        "exit status {status}\nstderr:\n{}",
        parley.stderr()
    );
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkill() {
    const POSTS: usize = 60;
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("p.db");
    let extra = no_rate_limit_args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut parley = Parley::start(&db, &extra, &[]).await;
    let mut alice = parley.user("alice").await;
    alice.join("durable").await;
    // Pipeline the sends so the log commits them in groups, then collect every ack.
    for i in 0..POSTS {
        alice
            .send(json!({"type": "send", "room": "durable", "content": format!("message {i}"), "id": format!("d{i}")}))
            .await;
    }
    let mut acked = Vec::new();
    while acked.len() < POSTS {
        let frame = alice.recv().await;
        match frame["type"].as_str() {
            Some("ack") => acked.push((
                frame["id"].as_str().unwrap().to_owned(),
                frame["seq"].as_u64().unwrap(),
            )),
            Some("message") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    // Kill at once, with no chance to flush anything.
    parley.child.kill().unwrap();
    let status = parley.wait().await;
    assert!(
        !status.success(),
        "SIGKILL should not look like a clean exit"
    );
    drop(parley);

    let parley = Parley::start(&db, &extra, &[]).await;
    let mut bob = parley.user("bob").await;
    bob.send(json!({"type": "history", "room": "durable", "after": 0, "limit": 200}))
        .await;
    let page = bob.recv_type("history").await;
    let messages = page["messages"].as_array().expect("messages");
    for (id, seq) in &acked {
        let found = messages
            .iter()
            .find(|m| m["id"] == id.as_str())
            .unwrap_or_else(|| panic!("acked message {id} (seq {seq}) lost: {page}"));
        assert_eq!(found["seq"], *seq, "{found}");
        let n = id.trim_start_matches('d');
        assert_eq!(found["content"], format!("message {n}"), "{found}");
        assert_eq!(found["user"], "alice", "{found}");
    }
    // The room's sequence goes on after the restart without reusing a seq.
    let last = acked.iter().map(|(_, seq)| *seq).max().unwrap();
    let joined = bob.join("durable").await;
    assert!(joined["seq"].as_u64().unwrap() > last, "{joined}");
    bob.close().await;
}

/// Sends `content` with `id` and returns the first `ack` or `error` answering it.
async fn send_and_answer(client: &mut Client, room: &str, content: &str, id: &str) -> Value {
    client
        .send(json!({"type": "send", "room": room, "content": content, "id": id}))
        .await;
    loop {
        let frame = client.recv().await;
        if matches!(frame["type"].as_str(), Some("ack" | "error")) && frame["id"] == id {
            return frame;
        }
    }
}

/// Checks the effective `limits.max_content_bytes` of a running binary is `limit`: `limit`
/// bytes are posted, one more is `too_large`.
async fn assert_content_limit(parley: &Parley, limit: usize) {
    let mut alice = parley.user("alice").await;
    alice.join("cfg").await;
    let id = format!("fits-{limit}");
    let answer = send_and_answer(&mut alice, "cfg", &"a".repeat(limit), &id).await;
    assert_eq!(answer["type"], "ack", "{limit} bytes refused: {answer}");
    let id = format!("over-{limit}");
    let answer = send_and_answer(&mut alice, "cfg", &"b".repeat(limit + 1), &id).await;
    assert_eq!(answer["type"], "error", "limit should be {limit}: {answer}");
    assert_eq!(
        answer["code"], "too_large",
        "limit should be {limit}: {answer}"
    );
    alice.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_layers_file_then_env_then_flags() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("p.db");
    let file = dir.path().join("parley.toml");
    std::fs::write(&file, "[limits]\nmax_content_bytes = 10\n").unwrap();
    let file_arg = file.to_str().unwrap();

    // The file alone.
    let parley = Parley::start(&db, &["--config", file_arg], &[]).await;
    assert_content_limit(&parley, 10).await;
    drop(parley);

    // The environment beats the file.
    let env = [("PARLEY_LIMITS__MAX_CONTENT_BYTES", "20")];
    let parley = Parley::start(&db, &["--config", file_arg], &env).await;
    assert_content_limit(&parley, 20).await;
    drop(parley);

    // A flag beats the environment.
    let args = ["--config", file_arg, "--set", "limits.max_content_bytes=30"];
    let parley = Parley::start(&db, &args, &env).await;
    assert_content_limit(&parley, 30).await;
    drop(parley);

    // PARLEY_CONFIG names the file too.
    let parley = Parley::start(&db, &[], &[("PARLEY_CONFIG", file_arg)]).await;
    assert_content_limit(&parley, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_the_config_file_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("parley.toml");
    std::fs::write(&file, "[limits]\nmax_content_byts = 10\n").unwrap();
    let mut cmd = parley_command();
    cmd.arg("--bind")
        .arg(free_addr().to_string())
        .arg("--db")
        .arg(dir.path().join("p.db"))
        .arg("--config")
        .arg(&file);
    let (status, stdout, stderr) = run_to_exit(&mut cmd).await;
    assert!(!status.success(), "started with a typo: {status}");
    assert!(
        stderr.contains("max_content_byts") || stdout.contains("max_content_byts"),
        "the error does not name the key\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_setting() {
    let (status, stdout, stderr) = run_to_exit(parley_command().arg("--help")).await;
    assert!(status.success(), "{status}\n{stderr}");
    for (name, _, _) in parley::config::SETTINGS {
        assert!(
            stdout.contains(name),
            "--help does not list {name}:\n{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_records_connections_opening_and_closing() {
    let dir = TempDir::new().unwrap();
    let mut parley = Parley::start(&dir.path().join("p.db"), &[], &[]).await;
    let alice = parley.user("logger").await;
    alice.close().await;

    let open = parley.log_line("connection open").await;
    assert!(open.contains("peer="), "{open}");
    let closed = parley.log_line("connection closed").await;
    assert!(closed.contains("reason="), "no reason: {closed}");
    assert!(closed.contains("client closed"), "{closed}");
    assert!(closed.contains("logger"), "no user: {closed}");
    // Both lines name the same connection.
    let conn = open
        .split_whitespace()
        .find(|w| w.starts_with("conn="))
        .unwrap_or_else(|| panic!("no conn id: {open}"));
    assert!(
        closed.split_whitespace().any(|w| w == conn),
        "{open}\n{closed}"
    );

    parley.sigterm();
    let status = parley.wait().await;
    assert!(status.success(), "{status}");
}

/// Issue #11 item 4: when the single-node sequencer task dies (a panic, injected through the
/// test-only fault switch), the node does not go on serving while broken: `/readyz` answers
/// 503 with the reason, every socket is closed with 1001 (clients reconnect and resume), and
/// `run` fails, so the process exits non-zero for its supervisor to restart it.
#[tokio::test]
async fn a_dead_sequencer_makes_the_node_unready_and_exit_non_zero() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    alice.join("r").await;
    server.fault("panic-sequencer", true).await;
    alice
        .send(json!({"type": "send", "room": "r", "content": "boom", "id": "b1"}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = http_get(&server.http_url("/readyz")).await;
        if status != 200 || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "readyz while the sequencer is dead: {body}");
    assert!(body.contains("sequencer"), "{body}");
    assert_eq!(alice.expect_close().await, 1001);
    let err = server.shutdown().await.expect_err("run fails");
    assert!(err.to_string().contains("sequencer"), "{err}");
}
