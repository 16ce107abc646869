//! Authentication end to end, through real sockets: HS256 / RS256 / ES256 tokens on the query
//! path (refused with HTTP 401 before the upgrade) and on the first-message path (error frame,
//! then close 4001), `iss`/`aud`, the auth timeout, the `rooms` claim, token expiry (4011) and
//! `refresh`, anonymous mode, and the binary's startup guard and `parley token`.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{fixture, sign, token, upgrade_status, Builder, Client, TestServer, SECRET};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

/// How long a spawned `parley` process may take to exit or to start listening.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Signs exactly `claims` (no defaults added), so tests can leave out `exp` or `sub`.
fn sign_claims(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(SECRET.as_bytes())
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn rsa_key(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&pem(name)).unwrap()
}

fn ec_key(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&pem(name)).unwrap()
}

/// base64url without padding, for hand-built tokens.
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned `alg: none` token.
fn alg_none_token(sub: &str) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(
        json!({"sub": sub, "exp": now() + 3600})
            .to_string()
            .as_bytes(),
    );
    format!("{header}.{payload}.")
}

/// The header and signature of a genuine token for `alice`, with the payload of one for
/// `mallory`: a token whose signature does not match its claims.
fn spliced_token() -> String {
    let genuine = token("alice", 3600, json!({}));
    let other = token("mallory", 3600, json!({"name": "Mallory"}));
    let g: Vec<&str> = genuine.split('.').collect();
    let o: Vec<&str> = other.split('.').collect();
    assert_ne!(g[1], o[1]);
    format!("{}.{}.{}", g[0], o[1], g[2])
}

fn rsa_server() -> Builder {
    TestServer::builder().set(
        "auth.jwt_public_key",
        fixture("rsa_public.pem").display().to_string(),
    )
}

fn ec_server() -> Builder {
    TestServer::builder().set(
        "auth.jwt_public_key",
        fixture("ec_public.pem").display().to_string(),
    )
}

/// A `?token=` that the server must refuse before the upgrade with 401 and the JSON body.
async fn assert_refused_on_query(server: &TestServer, path: &str, token: &str, label: &str) {
    let (status, body) = upgrade_status(&server.ws_url(&format!("{path}?token={token}"))).await;
    assert_eq!(status, 401, "{label}: status, body {body}");
    let body: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{label}: 401 body is not JSON ({e}): {body:?}"));
    assert_eq!(body["error"], "unauthorized", "{label}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{label}: message should be a non-empty string: {body}"
    );
}

/// An `auth` frame that the server must answer with `error unauthorized`, then close 4001.
async fn assert_refused_on_first_message(server: &TestServer, token: &str, label: &str) {
    let mut client = server.connect("/ws").await;
    client.send(json!({"type": "auth", "token": token})).await;
    let frame = client.recv().await;
    assert_eq!(frame["type"], "error", "{label}: {frame}");
    assert_eq!(frame["code"], "unauthorized", "{label}: {frame}");
    assert_eq!(client.expect_close().await, 4001, "{label}: close code");
}

async fn assert_refused(server: &TestServer, token: &str, label: &str) {
    assert_refused_on_query(server, "/ws", token, label).await;
    assert_refused_on_first_message(server, token, label).await;
}

/// Connects with `?token=` and returns the client and its `authenticated` frame.
async fn connect_with_token(server: &TestServer, token: &str) -> (Client, Value) {
    let mut client = server.connect(&format!("/ws?token={token}")).await;
    let frame = client.recv_type("authenticated").await;
    (client, frame)
}

/// Connects to `/ws`, authenticates with an `auth` frame and returns the `authenticated` frame.
async fn connect_with_auth_frame(server: &TestServer, token: &str) -> (Client, Value) {
    let mut client = server.connect("/ws").await;
    client.send(json!({"type": "auth", "token": token})).await;
    let frame = client.recv_type("authenticated").await;
    (client, frame)
}

/// Both paths accept `token` as `user`.
async fn assert_accepted(server: &TestServer, token: &str, user: &str, label: &str) {
    let (client, frame) = connect_with_token(server, token).await;
    assert_eq!(frame["user_id"], user, "{label} (query): {frame}");
    client.close().await;
    let (client, frame) = connect_with_auth_frame(server, token).await;
    assert_eq!(frame["user_id"], user, "{label} (auth frame): {frame}");
    client.close().await;
}

/// The connection is open and serving: an application ping gets its pong next.
async fn assert_open(client: &mut Client) {
    client.send(json!({"type": "ping"})).await;
    client.recv_type("pong").await;
}

async fn assert_error(client: &mut Client, code: &str) -> Value {
    let frame = client.recv_type("error").await;
    assert_eq!(frame["code"], code, "{frame}");
    frame
}

/// A `parley` command with a clean environment: no inherited `PARLEY_*` settings, info logs.
fn parley() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PARLEY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn db_arg(dir: &Path) -> String {
    dir.join("parley.db").display().to_string()
}

// ---------------------------------------------------------------------------------------------
// HS256: what is accepted
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_query_token_authenticates_with_name_and_heartbeat() {
    let server = TestServer::builder()
        .jwt()
        .set("heartbeat.interval_ms", 7000)
        .start()
        .await;
    let (mut client, frame) =
        connect_with_token(&server, &token("alice", 3600, json!({"name": "Alice"}))).await;
    assert_eq!(frame["user_id"], "alice", "{frame}");
    assert_eq!(frame["name"], "Alice", "{frame}");
    assert_eq!(frame["heartbeat_ms"], 7000, "{frame}");
    assert_open(&mut client).await;
    // The name travels with messages too.
    client.join("general").await;
    let (_, others) = client.post("general", "hi", "c1").await;
    let own = match others.into_iter().find(|f| f["type"] == "message") {
        Some(own) => own,
        None => client.recv_type("message").await,
    };
    assert_eq!(own["user"], "alice", "{own}");
    assert_eq!(own["name"], "Alice", "{own}");

    // Without a `name` claim the display name is the user id.
    let (_, frame) = connect_with_token(&server, &token("bob", 3600, json!({}))).await;
    assert_eq!(frame["user_id"], "bob", "{frame}");
    assert_eq!(frame["name"], "bob", "{frame}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_first_message_auth_authenticates_and_ignores_user_param() {
    let server = TestServer::builder()
        .jwt()
        .set("auth.timeout_ms", 300)
        .start()
        .await;
    // In jwt mode `?user=` is not an identity: the connection waits for an auth frame.
    let mut client = server.connect("/ws?user=mallory").await;
    client
        .send(json!({"type": "auth", "token": token("alice", 3600, json!({"name": "Alice"}))}))
        .await;
    let frame = client.recv_type("authenticated").await;
    assert_eq!(frame["user_id"], "alice", "{frame}");
    assert_eq!(frame["name"], "Alice", "{frame}");
    assert!(frame["heartbeat_ms"].is_u64(), "{frame}");
    // Authenticated in time: the auth timeout no longer applies.
    client.expect_silence(800).await;
    assert_open(&mut client).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_token_connection_is_not_subject_to_auth_timeout() {
    let server = TestServer::builder()
        .jwt()
        .set("auth.timeout_ms", 300)
        .start()
        .await;
    let (mut client, _) = connect_with_token(&server, &token("alice", 3600, json!({}))).await;
    client.expect_silence(800).await;
    assert_open(&mut client).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_of_64_characters_is_accepted() {
    let server = TestServer::builder().jwt().start().await;
    let sub = "u".repeat(64);
    assert_accepted(&server, &token(&sub, 3600, json!({})), &sub, "64-char sub").await;
    // Characters, not bytes: 64 two-byte characters are fine too.
    let sub = "é".repeat(64);
    let (_, frame) = connect_with_auth_frame(&server, &token(&sub, 3600, json!({}))).await;
    assert_eq!(frame["user_id"], sub.as_str(), "{frame}");
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// HS256: what is refused, on both paths
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_server_refuses_bad_tokens_on_both_paths() {
    let server = TestServer::builder().jwt().start().await;
    let hs = hs_key();
    let t = now();
    let cases: Vec<(&str, String)> = vec![
        ("bad signature (spliced payload)", spliced_token()),
        (
            "wrong secret",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"some-other-secret"),
                "alice",
                3600,
                json!({}),
            ),
        ),
        ("expired", token("alice", -30, json!({}))),
        ("malformed: not a jwt", "not-a-jwt".to_owned()),
        ("malformed: three garbage parts", "aaa.bbb.ccc".to_owned()),
        ("alg none", alg_none_token("alice")),
        (
            "missing exp",
            sign_claims(Algorithm::HS256, &hs, &json!({"sub": "alice", "iat": t})),
        ),
        (
            "missing sub",
            sign_claims(Algorithm::HS256, &hs, &json!({"exp": t + 3600, "iat": t})),
        ),
        ("empty sub", token("", 3600, json!({}))),
        ("65-char sub", token(&"u".repeat(65), 3600, json!({}))),
        (
            "nbf in the future",
            token("alice", 3600, json!({"nbf": t + 600})),
        ),
        (
            "iat in the future",
            token("alice", 3600, json!({"iat": t + 600})),
        ),
        (
            "wrong algorithm: RS256 token",
            sign(
                Algorithm::RS256,
                &rsa_key("rsa_private.pem"),
                "alice",
                3600,
                json!({}),
            ),
        ),
        (
            "wrong algorithm: HS384 token with the right secret",
            sign(Algorithm::HS384, &hs, "alice", 3600, json!({})),
        ),
    ];
    for (label, token) in &cases {
        assert_refused(&server, token, label).await;
    }
    // A missing token on the query path (`?token=` empty) is refused before the upgrade too.
    assert_refused_on_query(&server, "/ws", "", "empty ?token=").await;
    // And so is a bad token on a path route.
    assert_refused_on_query(
        &server,
        "/ws/general",
        &cases[2].1,
        "expired on /ws/general",
    )
    .await;
    // The server still works for a good token afterwards.
    assert_accepted(&server, &token("alice", 3600, json!({})), "alice", "good").await;
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// RS256 and ES256
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_server_accepts_its_key_and_refuses_others() {
    let server = rsa_server().start().await;
    let good = sign(
        Algorithm::RS256,
        &rsa_key("rsa_private.pem"),
        "alice",
        3600,
        json!({"name": "Alice"}),
    );
    assert_accepted(&server, &good, "alice", "RS256 with the matching key").await;
    let (_, frame) = connect_with_token(&server, &good).await;
    assert_eq!(frame["name"], "Alice", "{frame}");

    let cases: Vec<(&str, String)> = vec![
        (
            "RS256 signed with another RSA key",
            sign(
                Algorithm::RS256,
                &rsa_key("rsa_other_private.pem"),
                "alice",
                3600,
                json!({}),
            ),
        ),
        (
            "HS256 signed with the public key bytes (algorithm confusion)",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&pem("rsa_public.pem")),
                "alice",
                3600,
                json!({}),
            ),
        ),
        (
            "HS256 with the test secret",
            token("alice", 3600, json!({})),
        ),
        (
            "ES256 token",
            sign(
                Algorithm::ES256,
                &ec_key("ec_private.pem"),
                "alice",
                3600,
                json!({}),
            ),
        ),
        (
            "RS256 expired",
            sign(
                Algorithm::RS256,
                &rsa_key("rsa_private.pem"),
                "alice",
                -30,
                json!({}),
            ),
        ),
        ("alg none", alg_none_token("alice")),
    ];
    for (label, token) in &cases {
        assert_refused(&server, token, label).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_server_accepts_its_key_and_refuses_others() {
    let server = ec_server().start().await;
    let good = sign(
        Algorithm::ES256,
        &ec_key("ec_private.pem"),
        "alice",
        3600,
        json!({"name": "Alice"}),
    );
    assert_accepted(&server, &good, "alice", "ES256 with the matching key").await;
    let (_, frame) = connect_with_auth_frame(&server, &good).await;
    assert_eq!(frame["name"], "Alice", "{frame}");

    let cases: Vec<(&str, String)> = vec![
        (
            "RS256 token",
            sign(
                Algorithm::RS256,
                &rsa_key("rsa_private.pem"),
                "alice",
                3600,
                json!({}),
            ),
        ),
        (
            "HS256 signed with the public key bytes (algorithm confusion)",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&pem("ec_public.pem")),
                "alice",
                3600,
                json!({}),
            ),
        ),
        (
            "ES256 expired",
            sign(
                Algorithm::ES256,
                &ec_key("ec_private.pem"),
                "alice",
                -30,
                json!({}),
            ),
        ),
        ("ES256 with a spliced payload", {
            let genuine = good.split('.').collect::<Vec<_>>();
            let other = sign(
                Algorithm::ES256,
                &ec_key("ec_private.pem"),
                "mallory",
                3600,
                json!({}),
            );
            let other = other.split('.').collect::<Vec<_>>();
            format!("{}.{}.{}", genuine[0], other[1], genuine[2])
        }),
    ];
    for (label, token) in &cases {
        assert_refused(&server, token, label).await;
    }
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// iss / aud
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = TestServer::builder()
        .jwt()
        .set("auth.issuer", "parley-tests")
        .set("auth.audience", "chat")
        .start()
        .await;
    let right = token("alice", 3600, json!({"iss": "parley-tests", "aud": "chat"}));
    assert_accepted(&server, &right, "alice", "right iss and aud").await;
    let cases = [
        ("wrong iss", json!({"iss": "someone-else", "aud": "chat"})),
        ("missing iss", json!({"aud": "chat"})),
        (
            "wrong aud",
            json!({"iss": "parley-tests", "aud": "other-app"}),
        ),
        ("missing aud", json!({"iss": "parley-tests"})),
        ("neither", json!({})),
    ];
    for (label, extra) in cases {
        assert_refused(&server, &token("alice", 3600, extra), label).await;
    }
    server.shutdown().await.unwrap();

    // Without iss/aud configured, tokens carrying them are still accepted.
    let server = TestServer::builder().jwt().start().await;
    assert_accepted(&server, &right, "alice", "iss/aud not configured").await;
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The first-message path
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_that_is_not_auth_closes_with_4001() {
    let server = TestServer::builder().jwt().start().await;
    let first_frames: Vec<(&str, Message)> = vec![
        (
            "join",
            Message::text(json!({"type": "join", "room": "general"}).to_string()),
        ),
        ("ping", Message::text(json!({"type": "ping"}).to_string())),
        (
            "refresh",
            Message::text(
                json!({"type": "refresh", "token": token("alice", 3600, json!({}))}).to_string(),
            ),
        ),
        ("malformed JSON", Message::text("{not json")),
        (
            "auth without token",
            Message::text(json!({"type": "auth"}).to_string()),
        ),
        ("binary", Message::binary(b"{\"type\":\"auth\"}".to_vec())),
    ];
    for (label, msg) in first_frames {
        let mut client = server.connect("/ws").await;
        client.send_message(msg).await;
        let frame = client.recv().await;
        assert_eq!(frame["type"], "error", "{label}: {frame}");
        assert_eq!(frame["code"], "unauthorized", "{label}: {frame}");
        assert_eq!(client.expect_close().await, 4001, "{label}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_frame_within_timeout_closes_with_4001() {
    let server = TestServer::builder()
        .jwt()
        .set("auth.timeout_ms", 300)
        .start()
        .await;
    let mut client = server.connect("/ws").await;
    let frame = client.recv().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], "unauthorized", "{frame}");
    assert_eq!(client.expect_close().await, 4001);

    // The same on a path route.
    let mut client = server.connect("/ws/general").await;
    assert_error(&mut client, "unauthorized").await;
    assert_eq!(client.expect_close().await, 4001);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_auth_frame_is_bad_request_and_connection_stays() {
    let server = TestServer::builder().jwt().start().await;
    let (mut client, _) = connect_with_auth_frame(&server, &token("alice", 3600, json!({}))).await;
    client
        .send(json!({"type": "auth", "token": token("bob", 3600, json!({}))}))
        .await;
    assert_error(&mut client, "bad_request").await;
    assert_open(&mut client).await;
    // The identity did not change: messages still come from alice.
    client.join("general").await;
    let (_, others) = client.post("general", "still me", "c1").await;
    let own = match others.into_iter().find(|f| f["type"] == "message") {
        Some(own) => own,
        None => client.recv_type("message").await,
    };
    assert_eq!(own["user"], "alice", "{own}");

    // Same after a query-token authentication.
    let (mut client, _) = connect_with_token(&server, &token("carol", 3600, json!({}))).await;
    client
        .send(json!({"type": "auth", "token": token("carol", 3600, json!({}))}))
        .await;
    assert_error(&mut client, "bad_request").await;
    assert_open(&mut client).await;
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The rooms claim
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_claim_limits_joins() {
    let server = TestServer::builder().jwt().start().await;
    let tok = token("alice", 3600, json!({"rooms": ["team-*", "general"]}));
    let (mut client, _) = connect_with_token(&server, &tok).await;
    let joined = client.join("team-a").await;
    assert_eq!(joined["room"], "team-a", "{joined}");
    let joined = client.join("general").await;
    assert_eq!(joined["room"], "general", "{joined}");
    for room in ["other", "teams", "general2"] {
        client.send(json!({"type": "join", "room": room})).await;
        let err = assert_error(&mut client, "forbidden").await;
        assert!(err["message"].is_string(), "{err}");
    }
    // Reading a forbidden room's history is refused too.
    client
        .send(json!({"type": "history", "room": "other"}))
        .await;
    assert_error(&mut client, "forbidden").await;
    // The connection stays and allowed rooms still work.
    assert_open(&mut client).await;
    let joined = client.join("team-b").await;
    assert_eq!(joined["room"], "team-b", "{joined}");

    // Without the claim any room is allowed.
    let (mut client, _) = connect_with_token(&server, &token("bob", 3600, json!({}))).await;
    client.join("other").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_claim_applies_to_path_routes() {
    let server = TestServer::builder().jwt().start().await;
    let tok = token("alice", 3600, json!({"rooms": ["general"]}));

    // Query token, forbidden room.
    let mut client = server.connect(&format!("/ws/secret?token={tok}")).await;
    client.recv_type("authenticated").await;
    assert_error(&mut client, "forbidden").await;
    assert_open(&mut client).await;

    // Query token, allowed room: joined right away.
    let mut client = server.connect(&format!("/ws/general?token={tok}")).await;
    client.recv_type("authenticated").await;
    let joined = client.recv_type("joined").await;
    assert_eq!(joined["room"], "general", "{joined}");

    // First-message auth on a path route: the join follows the auth frame.
    let mut client = server.connect("/ws/secret").await;
    client.send(json!({"type": "auth", "token": tok})).await;
    client.recv_type("authenticated").await;
    assert_error(&mut client, "forbidden").await;
    assert_open(&mut client).await;

    let mut client = server.connect("/ws/general").await;
    client.send(json!({"type": "auth", "token": tok})).await;
    client.recv_type("authenticated").await;
    let joined = client.recv_type("joined").await;
    assert_eq!(joined["room"], "general", "{joined}");
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Expiry and refresh
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_with_4011() {
    let server = TestServer::builder().jwt().start().await;
    let (mut client, _) = connect_with_token(&server, &token("alice", 2, json!({}))).await;
    assert_eq!(client.expect_close().await, 4011, "query-token connection");

    let (mut client, _) = connect_with_auth_frame(&server, &token("bob", 2, json!({}))).await;
    assert_eq!(client.expect_close().await, 4011, "auth-frame connection");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_before_expiry_keeps_the_connection_open() {
    let server = TestServer::builder().jwt().start().await;
    let (mut client, _) = connect_with_token(&server, &token("alice", 2, json!({}))).await;
    client
        .send(json!({"type": "refresh", "token": token("alice", 6, json!({}))}))
        .await;
    // A successful refresh is answered `refreshed` with the new expiry.
    let refreshed = client.recv_type("refreshed").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(refreshed["exp"].as_u64().unwrap() >= now + 5, "{refreshed}");
    assert_open(&mut client).await;
    // Past the old expiry, nothing arrives (no close 4011)...
    client.expect_silence(3000).await;
    assert_open(&mut client).await;
    // ...and the new token's expiry still applies.
    assert_eq!(client.expect_close().await, 4011);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_refresh_is_refused_and_old_token_still_expires() {
    let server = TestServer::builder().jwt().start().await;
    let (mut client, _) = connect_with_auth_frame(&server, &token("alice", 2, json!({}))).await;
    let bad_refreshes = [
        ("garbage", "not-a-jwt".to_owned()),
        ("another sub", token("mallory", 3600, json!({}))),
        ("expired", token("alice", -30, json!({}))),
        (
            "wrong secret",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"other-secret"),
                "alice",
                3600,
                json!({}),
            ),
        ),
    ];
    for (label, bad) in bad_refreshes {
        client.send(json!({"type": "refresh", "token": bad})).await;
        let frame = client.recv().await;
        assert_eq!(frame["type"], "error", "{label}: {frame}");
        assert_eq!(frame["code"], "unauthorized", "{label}: {frame}");
        assert_open(&mut client).await;
    }
    // The connection kept its old token: it still expires at the old `exp`, although the
    // refused tokens for `mallory` and with the wrong secret ran for an hour.
    assert_eq!(client.expect_close().await, 4011);
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Anonymous mode and the seed-style route
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_mode_takes_identity_from_the_query() {
    let server = TestServer::start().await;
    let mut client = server.connect("/ws?user=alice&name=Alice").await;
    let frame = client.recv_type("authenticated").await;
    assert_eq!(frame["user_id"], "alice", "{frame}");
    assert_eq!(frame["name"], "Alice", "{frame}");
    assert!(frame["heartbeat_ms"].is_u64(), "{frame}");
    assert_open(&mut client).await;

    let mut client = server.connect("/ws?user=bob").await;
    let frame = client.recv_type("authenticated").await;
    assert_eq!(frame["user_id"], "bob", "{frame}");
    assert_eq!(frame["name"], "bob", "{frame}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_room_user_route_joins_as_that_user() {
    let server = TestServer::start().await;
    let mut alice = server.connect("/ws/lobby/alice").await;
    let frame = alice.recv_type("authenticated").await;
    assert_eq!(frame["user_id"], "alice", "{frame}");
    let joined = alice.recv_type("joined").await;
    assert_eq!(joined["room"], "lobby", "{joined}");
    assert_eq!(joined["users"], json!(["alice"]), "{joined}");

    let mut bob = server.connect("/ws/lobby/bob").await;
    bob.recv_type("authenticated").await;
    let joined = bob.recv_type("joined").await;
    assert_eq!(joined["users"], json!(["alice", "bob"]), "{joined}");
    let sys = alice.recv_type("system").await;
    assert_eq!(sys["event"], "join", "{sys}");
    assert_eq!(sys["user"], "bob", "{sys}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_refuses_room_user_route() {
    let server = TestServer::builder().jwt().start().await;
    let (status, body) = upgrade_status(&server.ws_url("/ws/general/alice")).await;
    assert_eq!(status, 404, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["error"], "not_found", "{body}");
    assert!(body["message"].is_string(), "{body}");
    // Even with a valid token: the route does not exist in jwt mode.
    let tok = token("alice", 3600, json!({}));
    let (status, _) =
        upgrade_status(&server.ws_url(&format!("/ws/general/alice?token={tok}"))).await;
    assert_eq!(status, 404);
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_refuses_anonymous_mode_on_non_loopback_bind() {
    let dir = tempfile::tempdir().unwrap();
    let child = parley()
        .args(["--bind", "0.0.0.0:0", "--db", &db_arg(dir.path())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn parley");
    let output = tokio::time::timeout(PROCESS_TIMEOUT, child.wait_with_output())
        .await
        .expect("parley should exit instead of serving")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exit status {:?}, stderr {stderr}",
        output.status
    );
    assert!(stderr.contains("anonymous"), "stderr: {stderr}");
    assert!(stderr.contains("--allow-anonymous"), "stderr: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_allow_anonymous_starts_on_non_loopback_bind() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = parley()
        .args([
            "--bind",
            "0.0.0.0:0",
            "--db",
            &db_arg(dir.path()),
            "--allow-anonymous",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn parley");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let listening = tokio::time::timeout(PROCESS_TIMEOUT, async {
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let line = tokio::select! {
                line = stdout.next_line(), if out_open => {
                    let line = line.unwrap();
                    out_open = line.is_some();
                    line
                }
                line = stderr.next_line(), if err_open => {
                    let line = line.unwrap();
                    err_open = line.is_some();
                    line
                }
            };
            if let Some(line) = line {
                let found = line.contains("parley listening");
                seen.push(line);
                if found {
                    return true;
                }
            }
        }
        false
    })
    .await;
    let exited = child.try_wait().unwrap();
    child.kill().await.unwrap();
    assert_eq!(
        listening,
        Ok(true),
        "parley did not report listening; exit {exited:?}; output:\n{}",
        seen.join("\n")
    );
    assert!(exited.is_none(), "parley exited: {exited:?}");
    let line = seen.last().unwrap();
    assert!(line.contains("anonymous"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_token_subcommand_mints_an_accepted_token() {
    const CLI_SECRET: &str = "cli-secret-for-the-token-test";
    let output = tokio::time::timeout(
        PROCESS_TIMEOUT,
        parley()
            .args([
                "token",
                "--jwt-secret",
                CLI_SECRET,
                "--sub",
                "alice",
                "--name",
                "Alice",
                "--ttl",
                "1h",
            ])
            .output(),
    )
    .await
    .expect("parley token should exit")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let minted = stdout.trim();
    assert_eq!(minted.split('.').count(), 3, "not a JWT: {stdout:?}");

    // Its claims: sub, name and a one-hour lifetime.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Value>(
        minted,
        &DecodingKey::from_secret(CLI_SECRET.as_bytes()),
        &validation,
    )
    .expect("token verifies with the secret");
    let claims = data.claims;
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["name"], "Alice", "{claims}");
    let exp = claims["exp"].as_i64().unwrap();
    let lifetime = exp - now();
    assert!((3500..=3600).contains(&lifetime), "exp {exp}: {claims}");

    // A server with that secret accepts it, on both paths.
    let server = TestServer::builder()
        .set("auth.jwt_secret", CLI_SECRET)
        .start()
        .await;
    let (_, frame) = connect_with_token(&server, minted).await;
    assert_eq!(frame["user_id"], "alice", "{frame}");
    assert_eq!(frame["name"], "Alice", "{frame}");
    let (_, frame) = connect_with_auth_frame(&server, minted).await;
    assert_eq!(frame["user_id"], "alice", "{frame}");
    server.shutdown().await.unwrap();
    // A server with another secret does not.
    let server = TestServer::builder().jwt().start().await;
    assert_refused(&server, minted, "minted token, other secret").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_token_subcommand_honours_issuer_and_audience() {
    const CLI_SECRET: &str = "cli-secret-for-the-iss-test";
    let output = tokio::time::timeout(
        PROCESS_TIMEOUT,
        parley()
            .args([
                "token",
                "--jwt-secret",
                CLI_SECRET,
                "--set",
                "auth.issuer=chat-backend",
                "--set",
                "auth.audience=parley",
                "--sub",
                "carol",
            ])
            .output(),
    )
    .await
    .expect("parley token should exit")
    .unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    let minted = String::from_utf8(output.stdout).unwrap();
    // A node that requires that issuer and audience accepts what it minted.
    let server = TestServer::builder()
        .set("auth.jwt_secret", CLI_SECRET)
        .set("auth.issuer", "chat-backend")
        .set("auth.audience", "parley")
        .start()
        .await;
    let (_, frame) = connect_with_token(&server, minted.trim()).await;
    assert_eq!(frame["user_id"], "carol", "{frame}");
    server.shutdown().await.unwrap();
}
