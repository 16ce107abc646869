//! Issue #12, part A, items 4 to 7: credentials, the text an operator or a client reads, and the
//! logs, through the binary and real sockets.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::{upgrade_status, TestServer, SECRET};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);
/// Long enough for any bind address.
const LONG_SECRET: &str = "a-long-enough-secret-for-hs256-0123456789";

/// A `parley` command with a clean environment: no inherited `PARLEY_*` or log settings.
fn parley() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("PARLEY_") || key == "RUST_LOG" || key == "NO_COLOR" {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn temp_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("p.db").display().to_string();
    (dir, db)
}

/// Reads stdout lines of `child` until one contains `needle`; every line read so far.
async fn lines_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    needle: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(PROCESS_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no line with {needle:?} in {seen:#?}");
    seen
}

fn spawn(
    cmd: &mut Command,
) -> (
    Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_secret_is_refused_off_loopback_and_warned_about_on_it() {
    let (_dir, db) = temp_db();
    let output = tokio::time::timeout(
        PROCESS_TIMEOUT,
        parley()
            .args([
                "--bind",
                "0.0.0.0:0",
                "--db",
                &db,
                "--jwt-secret",
                "change-me",
            ])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("auth.jwt_secret is 9 bytes") && stderr.contains("at least 32"),
        "{stderr}"
    );
    // A long one starts there.
    let (mut child, mut lines) = spawn(parley().args([
        "--bind",
        "0.0.0.0:0",
        "--db",
        &db,
        "--jwt-secret",
        LONG_SECRET,
    ]));
    lines_until(&mut lines, "parley listening").await;
    child.kill().await.unwrap();
    // On loopback a short one is a warning.
    let (mut child, mut lines) = spawn(parley().args([
        "--bind",
        "127.0.0.1:0",
        "--db",
        &db,
        "--jwt-secret",
        "change-me",
    ]));
    let seen = lines_until(&mut lines, "parley listening").await;
    assert!(
        seen.iter()
            .any(|l| l.contains("WARN") && l.contains("auth.jwt_secret is 9 bytes")),
        "{seen:#?}"
    );
    child.kill().await.unwrap();
}

/// `exp` in milliseconds (JavaScript's `Date.now()`) is a token for 50,000 years: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_too_far_ahead_is_refused() {
    let server = TestServer::builder().jwt().start().await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "exp": now_ms}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (status, body) = upgrade_status(&server.ws_url(&format!("/ws?token={token}"))).await;
    assert_eq!(status, 401, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unauthorized");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("seconds") && message.contains("31536000"),
        "{message}"
    );
    // Within auth.max_token_ttl_s it is accepted.
    let server = TestServer::builder()
        .jwt()
        .set("auth.max_token_ttl_s", 7200)
        .start()
        .await;
    let mut ok = server
        .connect(&format!(
            "/ws?token={}",
            common::token("bob", 3600, json!({}))
        ))
        .await;
    assert_eq!(ok.recv_type("authenticated").await["user_id"], "bob");
    let (status, _) = upgrade_status(&server.ws_url(&format!(
        "/ws?token={}",
        common::token("bob", 7300, json!({}))
    )))
    .await;
    assert_eq!(status, 401);
}

/// Token and API errors are sentences for people, not library internals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_problem_without_library_internals() {
    let server = TestServer::builder()
        .jwt()
        .set("api.key", "k")
        .start()
        .await;
    let (status, body) = upgrade_status(&server.ws_url("/ws?token=not-a-jwt")).await;
    assert_eq!(status, 401);
    assert!(body.contains("malformed token: not a JWT"), "{body}");
    assert!(!body.contains("InvalidToken"), "{body}");

    let http = reqwest::Client::new();
    for (body, expected) in [
        (
            json!({"user": "u", "content": 7}),
            "field `content` has the wrong type: expected a string, got integer `7`",
        ),
        (json!({"content": "hi"}), "missing field `user`"),
    ] {
        let answer: Value = http
            .post(server.http_url("/api/rooms/r/messages"))
            .bearer_auth("k")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let message = answer["message"].as_str().unwrap();
        assert_eq!(message, expected, "{answer}");
    }
    let answer: Value = http
        .post(server.http_url("/api/rooms/r/messages"))
        .bearer_auth("k")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.starts_with("malformed JSON: the body is not valid JSON (line 1"),
        "{message}"
    );
    assert!(!message.contains("Failed to"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_help_lists_only_the_flags_token_uses() {
    let output = parley().args(["token", "--help"]).output().await.unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--sub",
        "--name",
        "--ttl",
        "--rooms",
        "--jwt-secret",
        "--config",
        "--set",
    ] {
        assert!(help.contains(flag), "{flag} missing: {help}");
    }
    for flag in [
        "--bind",
        "--db",
        "--redis",
        "--api-key",
        "--allow-anonymous",
        "--jwt-public-key",
    ] {
        assert!(!help.contains(flag), "{flag} listed: {help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_takes_a_host_name_or_says_what_it_takes() {
    let (_dir, db) = temp_db();
    let (mut child, mut lines) = spawn(parley().args(["--bind", "localhost:0", "--db", &db]));
    lines_until(&mut lines, "parley listening").await;
    child.kill().await.unwrap();
    let output = parley()
        .args(["--bind", "localhost", "--db", &db])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("server.bind") && stderr.contains("HOST:PORT"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("invalid socket address syntax"),
        "{stderr}"
    );
    assert!(!stderr.contains("global."), "{stderr}");
}

/// `log.format = "json"`: one JSON object a line; no colours off a terminal; a refused
/// authentication is logged with its reason and peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_refused_authentications_with_reason_and_peer() {
    let (_dir, db) = temp_db();
    let (mut child, mut lines) = spawn(parley().args([
        "--bind",
        "127.0.0.1:0",
        "--db",
        &db,
        "--jwt-secret",
        LONG_SECRET,
        "--set",
        "log.format=json",
    ]));
    let seen = lines_until(&mut lines, "parley listening").await;
    let listening: Value = serde_json::from_str(seen.last().unwrap()).expect("a JSON line");
    let addr = listening["fields"]["addr"].as_str().unwrap().to_owned();
    let (status, _) = upgrade_status(&format!("ws://{addr}/ws?token=bad")).await;
    assert_eq!(status, 401);
    let seen = lines_until(&mut lines, "authentication refused").await;
    let line: Value = serde_json::from_str(seen.last().unwrap()).expect("a JSON line");
    assert_eq!(line["fields"]["reason"], "malformed", "{line}");
    assert!(
        line["fields"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );
    child.kill().await.unwrap();

    // Text, with RUST_LOG winning over log.level, and no colour codes into a pipe.
    let (mut child, mut lines) = spawn(
        parley()
            .args([
                "--bind",
                "127.0.0.1:0",
                "--db",
                &db,
                "--set",
                "log.level=error",
            ])
            .env("RUST_LOG", "info"),
    );
    let seen = lines_until(&mut lines, "parley listening").await;
    assert!(seen.iter().all(|l| !l.contains('\u{1b}')), "{seen:#?}");
    child.kill().await.unwrap();
}
