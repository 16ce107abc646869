//! The HTTP API under `/api`, through real HTTP against a real server: posting (delivered in the
//! room's sequence), the room list (people, not connections), users, history paging, token
//! minting, and every error answer (401, 404, 400, 413, 503), each with its JSON body.

use crate::common;

use common::{TestServer, SECRET};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde_json::{json, Value};

const KEY: &str = "test-api-key";

async fn server() -> TestServer {
    TestServer::builder().set("api.key", KEY).start().await
}

/// A request with the API key, answered as (status, JSON body).
struct Api<'a> {
    server: &'a TestServer,
    http: reqwest::Client,
}

impl<'a> Api<'a> {
    fn new(server: &'a TestServer) -> Api<'a> {
        Api {
            server,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("http");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.server.http_url(path)).bearer_auth(KEY))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .post(self.server.http_url(path))
                .bearer_auth(KEY)
                .json(&body),
        )
        .await
    }

    async fn post_raw(&self, path: &str, content_type: Option<&str>, body: &str) -> (u16, Value) {
        let mut request = self
            .http
            .post(self.server.http_url(path))
            .bearer_auth(KEY)
            .body(body.to_owned());
        if let Some(ct) = content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        self.send(request).await
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Every API operation, for the checks that apply to all of them.
const OPERATIONS: &[(&str, &str)] = &[
    ("GET", "/api/rooms"),
    ("GET", "/api/rooms/general/users"),
    ("GET", "/api/rooms/general/messages"),
    ("POST", "/api/rooms/general/messages"),
    ("POST", "/api/tokens"),
];

fn request(
    http: &reqwest::Client,
    server: &TestServer,
    method: &str,
    path: &str,
) -> reqwest::RequestBuilder {
    let url = server.http_url(path);
    match method {
        "GET" => http.get(url),
        "POST" => http
            .post(url)
            .json(&json!({"user": "bot", "content": "hi", "sub": "bot"})),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_posted_message_is_delivered_in_the_room_sequence() {
    let server = server().await;
    let api = Api::new(&server);
    let mut alice = server.user("alice").await;
    let joined = alice.join("general").await;
    let head = joined["seq"].as_u64().unwrap();

    // `post` returns the frames that arrived before the ack (its own copy among them).
    let mut frames = Vec::new();
    let (ack, others) = alice.post("general", "one", "c1").await;
    assert_eq!(ack["seq"], head + 1);
    frames.extend(others);

    let (status, body) = api
        .post(
            "/api/rooms/general/messages",
            json!({"user": "deploy-bot", "content": "deploying v2"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"room": "general", "seq": head + 2}));

    let (ack, others) = alice.post("general", "two", "c2").await;
    assert_eq!(ack["seq"], head + 3);
    frames.extend(others);

    // Every event reaches the member once, in seq order; the API's message looks like any
    // other, with `name` defaulting to the user id.
    while frames.iter().filter(|f| f["type"] == "message").count() < 3 {
        frames.push(alice.recv().await);
    }
    let seen: Vec<&Value> = frames.iter().filter(|f| f["type"] == "message").collect();
    assert_eq!(seen.len(), frames.len(), "only messages: {frames:?}");
    let seqs: Vec<u64> = seen.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![head + 1, head + 2, head + 3]);
    assert_eq!(seen[1]["user"], "deploy-bot");
    assert_eq!(seen[1]["name"], "deploy-bot");
    assert_eq!(seen[1]["content"], "deploying v2");
    assert_eq!(seen[1]["room"], "general");
    assert!(seen[1]["ts"].is_string());
    assert!(seen[1].get("id").is_none());

    // `name` and `id` are honoured; a resend with the same id gets the same seq and posts
    // nothing.
    let post = json!({"user": "ci", "name": "CI", "content": "green", "id": "build-7"});
    let (status, first) = api.post("/api/rooms/general/messages", post.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = api.post("/api/rooms/general/messages", post).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(first["seq"], again["seq"]);
    let frame = alice.recv_type("message").await;
    assert_eq!(frame["seq"], first["seq"]);
    assert_eq!(frame["name"], "CI");
    assert_eq!(frame["id"], "build-7");
    let (ack, others) = alice.post("general", "three", "c3").await;
    assert_eq!(ack["seq"], first["seq"].as_u64().unwrap() + 1);
    assert!(
        others.iter().all(|f| f["seq"] != first["seq"]),
        "the resend was delivered again: {others:?}"
    );
}

#[tokio::test]
async fn posting_creates_a_room_and_survives_in_history() {
    let server = server().await;
    let api = Api::new(&server);
    let (status, body) = api
        .post(
            "/api/rooms/fresh/messages",
            json!({"user": "bot", "content": "first"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seq"], 1);
    let (_, rooms) = api.get("/api/rooms").await;
    assert_eq!(
        rooms,
        json!({"rooms": [{"room": "fresh", "users": 0, "seq": 1}]})
    );
    let mut bob = server.user("bob").await;
    let joined = bob.join("fresh").await;
    assert_eq!(joined["history"][0]["content"], "first");
    assert_eq!(joined["history"][0]["user"], "bot");
}

#[tokio::test]
async fn rooms_count_people_not_connections() {
    let server = server().await;
    let api = Api::new(&server);
    let (_, empty) = api.get("/api/rooms").await;
    assert_eq!(empty, json!({"rooms": []}));

    let mut tab1 = server.user("alice").await;
    let mut tab2 = server.user("alice").await;
    let mut bob = server.user("bob").await;
    tab1.join("lobby").await;
    tab2.join("lobby").await;
    let joined = bob.join("lobby").await;
    bob.join("side").await;
    let lobby_seq = joined["seq"].as_u64().unwrap();

    let (status, rooms) = api.get("/api/rooms").await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(
        rooms,
        json!({"rooms": [
            {"room": "lobby", "users": 2, "seq": lobby_seq},
            {"room": "side", "users": 1, "seq": 1},
        ]})
    );
    let (status, users) = api.get("/api/rooms/lobby/users").await;
    assert_eq!(status, 200, "{users}");
    assert_eq!(users, json!({"room": "lobby", "users": ["alice", "bob"]}));
    let (_, nobody) = api.get("/api/rooms/nowhere/users").await;
    assert_eq!(nobody, json!({"room": "nowhere", "users": []}));

    // One of alice's tabs goes: she is still there. Bob leaves side: it stays listed (it has
    // events) with nobody in it.
    tab2.close().await;
    bob.send(json!({"type": "leave", "room": "side"})).await;
    bob.skip_until("left").await;
    // The close is handled asynchronously; a join by a third user is sequenced after it.
    let mut carol = server.user("carol").await;
    carol.join("lobby").await;
    let (_, users) = api.get("/api/rooms/lobby/users").await;
    assert_eq!(users["users"], json!(["alice", "bob", "carol"]));
    let (_, rooms) = api.get("/api/rooms").await;
    assert_eq!(rooms["rooms"][0]["users"], 3);
    assert_eq!(
        rooms["rooms"][1],
        json!({"room": "side", "users": 0, "seq": 2})
    );
    tab1.close().await;
}

#[tokio::test]
async fn history_pages_like_the_socket() {
    let server = server().await;
    let api = Api::new(&server);
    for n in 1..=5 {
        let (status, body) = api
            .post(
                "/api/rooms/log/messages",
                json!({"user": "bot", "content": format!("m{n}")}),
            )
            .await;
        assert_eq!((status, body["seq"].as_u64()), (200, Some(n)));
    }
    let page = |body: &Value| -> (Vec<u64>, bool) {
        let seqs = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        (seqs, body["more"].as_bool().unwrap())
    };
    let (status, all) = api.get("/api/rooms/log/messages").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(page(&all), (vec![1, 2, 3, 4, 5], false));
    assert_eq!(all["messages"][0]["content"], "m1");
    assert_eq!(all["messages"][0]["type"], "message");
    let (_, newest) = api.get("/api/rooms/log/messages?limit=2").await;
    assert_eq!(page(&newest), (vec![4, 5], true));
    let (_, older) = api.get("/api/rooms/log/messages?before=4&limit=2").await;
    assert_eq!(page(&older), (vec![2, 3], true));
    let (_, oldest) = api.get("/api/rooms/log/messages?before=2&limit=2").await;
    assert_eq!(page(&oldest), (vec![1], false));
    let (_, newer) = api.get("/api/rooms/log/messages?after=3").await;
    assert_eq!(page(&newer), (vec![4, 5], false));
    let (_, forward) = api.get("/api/rooms/log/messages?after=1&limit=2").await;
    assert_eq!(page(&forward), (vec![2, 3], true));
    let (_, between) = api.get("/api/rooms/log/messages?after=1&before=5").await;
    assert_eq!(page(&between), (vec![2, 3, 4], false));
    let (_, max) = api.get("/api/rooms/log/messages?limit=200").await;
    assert_eq!(page(&max).0.len(), 5);
    let (status, none) = api.get("/api/rooms/never-used/messages").await;
    assert_eq!(status, 200);
    assert_eq!(page(&none), (vec![], false));
}

#[tokio::test]
async fn minted_tokens_are_accepted_on_the_socket() {
    let server = TestServer::builder()
        .jwt()
        .set("api.key", KEY)
        .set("auth.issuer", "parley-test")
        .start()
        .await;
    let api = Api::new(&server);
    let (status, body) = api
        .post(
            "/api/tokens",
            json!({"sub": "carol", "name": "Carol", "ttl_s": 600, "rooms": ["team-*"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let minted = body["token"].as_str().unwrap();
    assert!(body["exp"].as_u64().is_some(), "{body}");

    let mut carol = server.connect(&format!("/ws?token={minted}")).await;
    let hello = carol.recv_type("authenticated").await;
    assert_eq!(hello["user_id"], "carol");
    assert_eq!(hello["name"], "Carol");
    carol.join("team-a").await;
    carol.send(json!({"type": "join", "room": "general"})).await;
    let refused = carol.recv_type("error").await;
    assert_eq!(refused["code"], "forbidden");

    // Defaults: no name (the user id is shown), an hour, any room; also in an `auth` frame.
    let (status, body) = api.post("/api/tokens", json!({"sub": "dave"})).await;
    assert_eq!(status, 200, "{body}");
    let mut dave = server.connect("/ws").await;
    dave.send(json!({"type": "auth", "token": body["token"]}))
        .await;
    let hello = dave.recv_type("authenticated").await;
    assert_eq!(hello["name"], "dave");
    dave.join("general").await;
    let ttl = body["exp"].as_u64().unwrap() - now();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn token_minting_needs_hs256() {
    let anonymous = server().await;
    let (status, body) = Api::new(&anonymous)
        .post("/api/tokens", json!({"sub": "carol"}))
        .await;
    assert_error(status, &body, 404, "not_found");
    assert!(
        body["message"].as_str().unwrap().contains("HS256"),
        "{body}"
    );

    let rs256 = TestServer::builder()
        .set(
            "auth.jwt_public_key",
            common::fixture("rsa_public.pem").display().to_string(),
        )
        .set("api.key", KEY)
        .start()
        .await;
    let (status, body) = Api::new(&rs256)
        .post("/api/tokens", json!({"sub": "carol"}))
        .await;
    assert_error(status, &body, 404, "not_found");
}

#[tokio::test]
async fn token_requests_are_checked() {
    let server = TestServer::builder()
        .jwt()
        .set("api.key", KEY)
        .start()
        .await;
    let api = Api::new(&server);
    for bad in [
        json!({}),
        json!({"sub": ""}),
        json!({"sub": "x".repeat(65)}),
        json!({"sub": 5}),
        json!({"sub": "a", "ttl_s": 0}),
        json!({"sub": "a", "ttl_s": -1}),
        json!({"sub": "a", "ttl_s": 400 * 86_400}),
        json!({"sub": "a", "rooms": [""]}),
        json!({"sub": "a", "rooms": "general"}),
    ] {
        let (status, body) = api.post("/api/tokens", bad.clone()).await;
        assert_error(status, &body, 400, "bad_request");
    }
    // A token minted for another secret is refused by this node, so the test above is not
    // vacuous: the minted one is signed with SECRET.
    let (_, body) = api.post("/api/tokens", json!({"sub": "eve"})).await;
    let minted = body["token"].as_str().unwrap();
    let header = jsonwebtoken::decode::<Value>(
        minted,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .expect("signed with the node's secret");
    assert_eq!(header.claims["sub"], "eve");
}

#[tokio::test]
async fn every_route_needs_the_key() {
    let server = server().await;
    let http = reqwest::Client::new();
    for (method, path) in OPERATIONS {
        for auth in [
            None,
            Some("Bearer wrong-key"),
            Some("Basic dGVzdA=="),
            Some(KEY),
        ] {
            let mut req = request(&http, &server, method, path);
            if let Some(auth) = auth {
                req = req.header(AUTHORIZATION, auth);
            }
            let response = req.send().await.unwrap();
            let status = response.status().as_u16();
            let www = response.headers().get(WWW_AUTHENTICATE).cloned();
            let body: Value = response.json().await.expect("JSON body");
            assert_error(status, &body, 401, "unauthorized");
            assert!(www.is_some(), "{method} {path}: no WWW-Authenticate");
        }
    }
    // The scheme is case-insensitive; the right key passes.
    let (status, _) = Api::new(&server)
        .send(
            http.get(server.http_url("/api/rooms"))
                .header(AUTHORIZATION, format!("bearer {KEY}")),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_a_key_the_api_is_404() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    for (method, path) in OPERATIONS.iter().chain(&[("GET", "/api/nope")]) {
        for auth in [None, Some(format!("Bearer {KEY}"))] {
            let mut req = request(&http, &server, method, path);
            if let Some(auth) = auth {
                req = req.header(AUTHORIZATION, auth);
            }
            let response = req.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("JSON body");
            assert_error(status, &body, 404, "not_found");
        }
    }
    // The rest of the node is unaffected.
    let (status, _) = common::http_get(&server.http_url("/healthz")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let server = server().await;
    let api = Api::new(&server);
    let (status, body) = api.get("/api/nope").await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = api.get("/api/rooms/general").await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = api
        .send(
            api.http
                .delete(server.http_url("/api/rooms"))
                .bearer_auth(KEY),
        )
        .await;
    assert_error(status, &body, 405, "method_not_allowed");
    // A stranger learns nothing about which paths exist.
    let (status, body) = api.send(api.http.get(server.http_url("/api/nope"))).await;
    assert_error(status, &body, 401, "unauthorized");
}

#[tokio::test]
async fn bad_requests_are_400_json() {
    let server = server().await;
    let api = Api::new(&server);
    let post = json!({"user": "bot", "content": "hi"});
    for room in [
        "-dash",
        "has%20space",
        "a%2Fb",
        &"r".repeat(65),
        "%C3%A9t%C3%A9",
    ] {
        let (status, body) = api
            .post(&format!("/api/rooms/{room}/messages"), post.clone())
            .await;
        assert_error(status, &body, 400, "bad_request");
        assert!(body["message"].as_str().unwrap().contains("room"), "{body}");
        let (status, body) = api.get(&format!("/api/rooms/{room}/messages")).await;
        assert_error(status, &body, 400, "bad_request");
        let (status, body) = api.get(&format!("/api/rooms/{room}/users")).await;
        assert_error(status, &body, 400, "bad_request");
    }

    let path = "/api/rooms/general/messages";
    for (content_type, body) in [
        (Some("application/json"), "{"),
        (Some("application/json"), "not json"),
        (Some("application/json"), "[1,2]"),
        (Some("application/json"), ""),
        (Some("text/plain"), r#"{"user":"bot","content":"hi"}"#),
        (None, r#"{"user":"bot","content":"hi"}"#),
    ] {
        let (status, answer) = api.post_raw(path, content_type, body).await;
        assert_error(status, &answer, 400, "bad_request");
    }
    for bad in [
        json!({"content": "hi"}),
        json!({"user": "bot"}),
        json!({"user": "bot", "content": 5}),
        json!({"user": "", "content": "hi"}),
        json!({"user": "x".repeat(65), "content": "hi"}),
        json!({"user": "bo\u{7}t", "content": "hi"}),
        json!({"user": "bot", "content": ""}),
        json!({"user": "bot", "content": "hi", "id": ""}),
        json!({"user": "bot", "content": "hi", "id": "i".repeat(65)}),
        json!({"user": "bot", "content": "hi", "name": "n".repeat(65)}),
    ] {
        let (status, body) = api.post(path, bad.clone()).await;
        assert_error(status, &body, 400, "bad_request");
    }
    let (status, body) = api.post(path, json!({"user": "bot"})).await;
    assert_error(status, &body, 400, "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("content"),
        "{body}"
    );

    for query in [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=abc",
        "before=x",
        "after=-3",
    ] {
        let (status, body) = api.get(&format!("{path}?{query}")).await;
        assert_error(status, &body, 400, "bad_request");
    }
    // Nothing above was posted.
    let (_, page) = api.get(path).await;
    assert_eq!(page["messages"], json!([]));
}

#[tokio::test]
async fn oversized_content_is_413() {
    let server = TestServer::builder()
        .set("api.key", KEY)
        .set("limits.max_content_bytes", 100)
        .start()
        .await;
    let api = Api::new(&server);
    let path = "/api/rooms/general/messages";
    let (status, body) = api
        .post(path, json!({"user": "bot", "content": "x".repeat(101)}))
        .await;
    assert_error(status, &body, 413, "too_large");
    // Bytes, not characters: 34 three-byte characters are 102 bytes.
    let (status, body) = api
        .post(path, json!({"user": "bot", "content": "€".repeat(34)}))
        .await;
    assert_error(status, &body, 413, "too_large");
    // A body far past any valid request is refused unread, still as JSON.
    let (status, body) = api
        .post(path, json!({"user": "bot", "content": "x".repeat(200_000)}))
        .await;
    assert_error(status, &body, 413, "too_large");
    let (status, body) = api
        .post(path, json!({"user": "bot", "content": "x".repeat(100)}))
        .await;
    assert_eq!((status, body["seq"].as_u64()), (200, Some(1)), "{body}");
}

/// While SQLite cannot take writes (another process holds its write lock), posts are still
/// acknowledged from the journal, up to `store.max_unsettled` records waiting; past that a post
/// is refused with 503 and takes no seq, and once SQLite takes writes again posts go through.
#[tokio::test]
async fn a_store_that_cannot_write_is_503_and_nothing_is_posted() {
    let server = TestServer::builder()
        .set("api.key", KEY)
        .set("store.max_unsettled", 1)
        .start()
        .await;
    let api = Api::new(&server);
    let path = "/api/rooms/general/messages";
    // With one record allowed to wait, a request right after another may find it still
    // waiting: it is refused, and asked again.
    let post = |content: &'static str| {
        let api = &api;
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let (status, body) = api
                    .post(path, json!({"user": "bot", "content": content}))
                    .await;
                if status == 200 {
                    return body;
                }
                assert_error(status, &body, 503, "unavailable");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "SQLite never caught up"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let mut watcher = server.user("watcher").await;
    let head = watcher.join("general").await["seq"].as_u64().unwrap();
    let head = post("1").await["seq"].as_u64().unwrap().max(head);
    assert_eq!(watcher.recv_type("message").await["content"], "1");
    // Another process takes the database's write lock (once the node's indexer has settled).
    let lock = common::hold_write_lock(&server.db).await;
    // The journal takes one post; the next finds one record waiting for SQLite and is refused.
    let (status, body) = api.post(path, json!({"user": "bot", "content": "2"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seq"], head + 1);
    let (status, body) = api
        .post(path, json!({"user": "bot", "content": "refused"}))
        .await;
    assert_error(status, &body, 503, "unavailable");
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // SQLite takes the waiting record in its next attempt; until then posts are refused.
    let body = post("3").await;
    assert_eq!(body["seq"], head + 2, "the refused posts took no seq");
    for (seq, content) in [(head + 1, "2"), (head + 2, "3")] {
        let frame = watcher.recv_type("message").await;
        assert_eq!(
            (frame["seq"].as_u64(), &frame["content"]),
            (Some(seq), &json!(content))
        );
    }
}

#[tokio::test]
async fn minted_token_names_and_subs_are_checked() {
    let server = TestServer::builder()
        .jwt()
        .set("api.key", KEY)
        .start()
        .await;
    let api = Api::new(&server);
    let long = "n".repeat(129);
    for (body, field) in [
        (json!({"sub": "eve", "name": "Eve\u{0}"}), "name"),
        (json!({"sub": "eve", "name": "a\nb"}), "name"),
        (json!({"sub": "eve", "name": long}), "name"),
        (json!({"sub": "e\u{7}ve"}), "sub"),
    ] {
        let (status, answer) = api.post("/api/tokens", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"], "bad_request", "{answer}");
        assert!(
            answer["message"].as_str().unwrap().starts_with(field),
            "{answer}"
        );
    }
    let (status, answer) = api
        .post(
            "/api/tokens",
            json!({"sub": "eve", "name": "n".repeat(128)}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_reused_id_with_other_content_is_a_conflict_over_http() {
    let server = TestServer::builder().set("api.key", KEY).start().await;
    let api = Api::new(&server);
    let post = |content: &str| json!({"user": "bot", "content": content, "id": "deploy-1"});
    let (status, first) = api.post("/api/rooms/ops/messages", post("v1 out")).await;
    assert_eq!(status, 200, "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    let (status, again) = api.post("/api/rooms/ops/messages", post("v1 out")).await;
    assert_eq!(
        (status, &again["seq"], &again["duplicate"]),
        (200, &first["seq"], &json!(true))
    );
    let (status, conflict) = api.post("/api/rooms/ops/messages", post("v2 out")).await;
    assert_eq!(
        (status, conflict["error"].as_str()),
        (409, Some("id_conflict")),
        "{conflict}"
    );
}
