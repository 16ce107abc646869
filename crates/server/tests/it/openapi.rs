//! docs/openapi.yaml against a running server: every operation it lists exists (it is not 404
//! with a key configured), and every status code it documents for an operation is produced
//! through real HTTP, with a JSON body that has the documented schema's required fields. The
//! spec must also list exactly the API's operations, so an undocumented route fails here too.

use crate::common;
use crate::common::resolve;

use std::collections::BTreeSet;

use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

const KEY: &str = "openapi-key";

/// The API's operations as the router defines them (crates/server/src/http/api.rs).
const OPERATIONS: &[(&str, &str)] = &[
    ("GET", "/api/rooms"),
    ("GET", "/api/rooms/{room}/users"),
    ("POST", "/api/rooms/{room}/messages"),
    ("GET", "/api/rooms/{room}/messages"),
    ("POST", "/api/tokens"),
];

/// Documented codes this test cannot produce without breaking the node, and why.
const NOT_PRODUCED: &[(&str, &str, &str, &str)] = &[
    (
        "GET",
        "/api/rooms",
        "503",
        "reads use their own connections, which a write lock does not block",
    ),
    (
        "GET",
        "/api/rooms/{room}/users",
        "503",
        "single-node presence is in memory; 503 is for a cluster's Redis",
    ),
    (
        "GET",
        "/api/rooms/{room}/messages",
        "503",
        "reads use their own connections, which a write lock does not block",
    ),
];

fn spec() -> Value {
    common::spec("openapi.yaml")
}

/// Every (method, path, status) the spec documents.
fn documented(spec: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let responses = operation["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} has no responses"));
            for status in responses.keys() {
                out.push((method.to_uppercase(), path.clone(), status.clone()));
            }
        }
    }
    out
}

/// The servers the checks need.
struct Servers {
    /// Anonymous mode with a key: most routes.
    keyed: TestServer,
    /// HS256 mode with a key: token minting.
    hs256: TestServer,
    /// No key: the API is off.
    off: TestServer,
}

/// One request to make and where.
struct Call<'a> {
    server: &'a TestServer,
    method: Method,
    path: String,
    auth: bool,
    body: Option<Value>,
}

impl Call<'_> {
    async fn run(&self) -> (u16, Value) {
        let mut request =
            reqwest::Client::new().request(self.method.clone(), self.server.http_url(&self.path));
        if self.auth {
            request = request.bearer_auth(KEY);
        }
        if let Some(body) = &self.body {
            request = request.json(body);
        }
        let response = request.send().await.expect("http");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!(
                "{} {}: {status} with a non-JSON body {text:?}",
                self.method, self.path
            )
        });
        (status, body)
    }
}

/// How to produce `status` for an operation, or `None` when this test has no way.
fn producer<'a>(servers: &'a Servers, method: &str, path: &str, status: &str) -> Option<Call<'a>> {
    let call = |server, path: &str, auth, body| Call {
        server,
        method: Method::from_bytes(method.as_bytes()).unwrap(),
        path: path.to_owned(),
        auth,
        body,
    };
    let good_room = path.replace("{room}", "general");
    let bad_room = path.replace("{room}", "-not-a-room");
    let message = json!({"user": "bot", "content": "hello"});
    let body_for = |m: &str| (m == "POST").then(|| message.clone());
    Some(match (method, path, status) {
        ("POST", "/api/tokens", "200") => {
            call(&servers.hs256, path, true, Some(json!({"sub": "alice"})))
        }
        ("POST", "/api/tokens", "400") => call(&servers.hs256, path, true, Some(json!({}))),
        ("POST", "/api/tokens", "404") => {
            call(&servers.keyed, path, true, Some(json!({"sub": "alice"})))
        }
        (_, _, "200") => call(&servers.keyed, &good_room, true, body_for(method)),
        (_, _, "401") => call(&servers.keyed, &good_room, false, body_for(method)),
        (_, _, "404") => call(&servers.off, &good_room, true, body_for(method)),
        ("POST", "/api/rooms/{room}/messages", "400") => call(
            &servers.keyed,
            &good_room,
            true,
            Some(json!({"user": "bot"})),
        ),
        ("POST", "/api/rooms/{room}/messages", "413") => call(
            &servers.keyed,
            &good_room,
            true,
            Some(json!({"user": "bot", "content": "x".repeat(4097)})),
        ),
        ("POST", "/api/rooms/{room}/messages", "409") => call(
            &servers.keyed,
            &good_room,
            true,
            Some(json!({"user": "bot", "content": "second", "id": "taken"})),
        ),
        ("GET", "/api/rooms/{room}/messages", "400") => {
            call(&servers.keyed, &format!("{good_room}?limit=0"), true, None)
        }
        (_, p, "400") if p.contains("{room}") => {
            call(&servers.keyed, &bad_room, true, body_for(method))
        }
        _ => return None,
    })
}

/// Checks a body against the required fields of the documented response's schema.
fn check_body(spec: &Value, method: &str, path: &str, status: &str, body: &Value) {
    let operation = &spec["paths"][path][method.to_lowercase()];
    let response = resolve(spec, &operation["responses"][status]);
    let Some(schema) = response.pointer("/content/application~1json/schema") else {
        panic!("{method} {path} {status}: no application/json schema");
    };
    let schema = resolve(spec, schema);
    for field in schema["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        assert!(
            body.get(field).is_some(),
            "{method} {path} {status}: `{field}` missing from {body}"
        );
    }
    if let Some(codes) = schema.pointer("/properties/error/enum") {
        assert!(
            codes.as_array().unwrap().contains(&body["error"]),
            "{method} {path} {status}: undocumented error code in {body}"
        );
    }
}

#[tokio::test]
async fn every_documented_operation_and_status_is_real() {
    let spec = spec();
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0")),
        "OpenAPI 3.0"
    );
    let listed: BTreeSet<(String, String)> = documented(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let known: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(listed, known, "the spec and the router disagree");

    let servers = Servers {
        keyed: TestServer::builder().set("api.key", KEY).start().await,
        hs256: TestServer::builder()
            .jwt()
            .set("api.key", KEY)
            .start()
            .await,
        off: TestServer::start().await,
    };
    // The id a 409 reuses, stored once with other content.
    let (status, _) = Call {
        server: &servers.keyed,
        method: Method::POST,
        path: "/api/rooms/general/messages".to_owned(),
        auth: true,
        body: Some(json!({"user": "bot", "content": "first", "id": "taken"})),
    }
    .run()
    .await;
    assert_eq!(status, 200);
    for (method, path, status) in documented(&spec) {
        if NOT_PRODUCED
            .iter()
            .any(|(m, p, s, _)| (*m, *p, *s) == (method.as_str(), path.as_str(), status.as_str()))
        {
            continue;
        }
        if (method.as_str(), path.as_str(), status.as_str())
            == ("POST", "/api/rooms/{room}/messages", "503")
        {
            continue; // produced below, with a database lock
        }
        let call = producer(&servers, &method, &path, &status).unwrap_or_else(|| {
            panic!(
                "no way to produce {status} for {method} {path}: add one to `producer` or list \
                 it in NOT_PRODUCED with the reason"
            )
        });
        let (got, body) = call.run().await;
        assert_eq!(
            got.to_string(),
            status,
            "{method} {} answered {got} {body}",
            call.path
        );
        check_body(&spec, &method, &path, &status, &body);
    }

    // Every documented operation exists: with the key it is not a 404 of the router.
    for (method, path) in OPERATIONS {
        let server = if *path == "/api/tokens" {
            &servers.hs256
        } else {
            &servers.keyed
        };
        let call = Call {
            server,
            method: Method::from_bytes(method.as_bytes()).unwrap(),
            path: path.replace("{room}", "general"),
            auth: true,
            body: Some(json!({})),
        };
        let (status, body) = call.run().await;
        assert_ne!(status, 404, "{method} {path}: {body}");
        assert_ne!(status, 405, "{method} {path}: {body}");
    }
}

#[tokio::test]
async fn a_post_the_store_cannot_take_is_the_documented_503() {
    let spec = spec();
    let (method, path) = ("POST", "/api/rooms/{room}/messages");
    assert!(documented(&spec).contains(&(method.into(), path.into(), "503".into())));
    let server = TestServer::builder()
        .set("api.key", KEY)
        .set("store.max_unsettled", 1)
        .start()
        .await;
    // The node has opened its log (and set up WAL mode) before anyone else locks it.
    let (status, _) = common::http_get(&server.http_url("/readyz")).await;
    assert_eq!(status, 200);
    // Another process holds the write lock: one post waits in the journal for SQLite, and
    // with `store.max_unsettled = 1` the next is refused.
    let lock = common::hold_write_lock(&server.db).await;
    let call = Call {
        server: &server,
        method: Method::POST,
        path: "/api/rooms/general/messages".into(),
        auth: true,
        body: Some(json!({"user": "bot", "content": "hello"})),
    };
    let (status, body) = call.run().await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call.run().await;
    lock.execute_batch("ROLLBACK").unwrap();
    assert_eq!(status, 503, "{body}");
    check_body(&spec, method, path, "503", &body);
}
