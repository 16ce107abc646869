//! docs/asyncapi.yaml against the protocol crate: every `ClientFrame` variant is a `publish`
//! message and every `Received` variant a `subscribe` message of the `/ws` channel, with every
//! field the Rust types serialize (nested ones too: `limits`, history events); the spec lists no
//! frame the types lack; every example in the spec parses with `client::decode` or
//! `received::parse`; and clients/js/index.d.ts names each server frame the JS library surfaces.

use std::collections::BTreeSet;

use crate::common;
use crate::common::resolve;
use parley_protocol::client::{self, ClientFrame};
use parley_protocol::received::{self, Event, Joined, MessageEvent, Received, SystemEvent};
use parley_protocol::server::Limits;
use parley_protocol::ErrorCode;
use serde_json::Value;

fn spec() -> Value {
    common::spec("asyncapi.yaml")
}

/// The messages of the `/ws` channel's `publish` (client to server) or `subscribe` operation.
fn messages<'a>(spec: &'a Value, operation: &str) -> Vec<&'a Value> {
    let one_of = spec["channels"]["/ws"][operation]["message"]["oneOf"]
        .as_array()
        .unwrap_or_else(|| panic!("channels./ws.{operation}.message.oneOf"));
    one_of.iter().map(|m| resolve(spec, m)).collect()
}

fn payload<'a>(spec: &'a Value, message: &'a Value) -> &'a Value {
    resolve(spec, &message["payload"])
}

fn frame_type(payload: &Value) -> &str {
    payload["properties"]["type"]["const"]
        .as_str()
        .unwrap_or_else(|| panic!("payload without a `type` const: {payload}"))
}

fn properties(schema: &Value) -> BTreeSet<String> {
    schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema without properties: {schema}"))
        .keys()
        .cloned()
        .collect()
}

/// The message of `operation` whose payload has `type: ty`.
fn message_for<'a>(spec: &'a Value, operation: &str, ty: &str) -> &'a Value {
    messages(spec, operation)
        .into_iter()
        .find(|m| frame_type(payload(spec, m)) == ty)
        .unwrap_or_else(|| panic!("no {operation} message with type `{ty}` in the spec"))
}

/// Asserts that every key of `value` is a property of `schema`.
fn assert_fields(schema: &Value, value: &Value, what: &str) {
    let documented = properties(schema);
    for key in value.as_object().expect("an object").keys() {
        assert!(
            documented.contains(key),
            "{what}: field `{key}` is not in the spec (documented: {documented:?})"
        );
    }
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

/// One of each client frame, every optional field set. The match below makes a new variant
/// a compile error here until it is added.
fn client_samples() -> Vec<ClientFrame> {
    let samples = vec![
        ClientFrame::Auth {
            token: "t".into(),
            id: some("a"),
        },
        ClientFrame::Join {
            room: "g".into(),
            since: Some(1),
            epoch: some("e"),
            id: some("j"),
        },
        ClientFrame::Leave {
            room: "g".into(),
            id: some("l"),
        },
        ClientFrame::Send {
            room: "g".into(),
            content: "hi".into(),
            id: some("s"),
        },
        ClientFrame::History {
            room: "g".into(),
            before: Some(9),
            after: Some(1),
            limit: Some(5),
            id: some("h"),
        },
        ClientFrame::Typing {
            room: "g".into(),
            id: some("t"),
        },
        ClientFrame::Refresh {
            token: "t".into(),
            id: some("r"),
        },
        ClientFrame::Ping { id: some("p") },
    ];
    for frame in &samples {
        match frame {
            ClientFrame::Auth { .. }
            | ClientFrame::Join { .. }
            | ClientFrame::Leave { .. }
            | ClientFrame::Send { .. }
            | ClientFrame::History { .. }
            | ClientFrame::Typing { .. }
            | ClientFrame::Refresh { .. }
            | ClientFrame::Ping { .. } => {}
        }
    }
    samples
}

fn limits() -> Limits {
    Limits {
        max_content_bytes: 4096,
        max_rooms_per_connection: 100,
        send_rate: 10.0,
        send_burst: 20,
        join_rate: 5.0,
        join_burst: 20,
    }
}

fn message_event() -> MessageEvent {
    MessageEvent {
        room: "g".into(),
        seq: 3,
        user: "a".into(),
        name: "A".into(),
        content: "hi".into(),
        ts: "t".into(),
        id: some("c"),
    }
}

fn system_event() -> SystemEvent {
    SystemEvent {
        room: "g".into(),
        seq: 4,
        event: "join".into(),
        user: "b".into(),
        name: some("B"),
        content: "b joined the room".into(),
        ts: "t".into(),
    }
}

/// One of each server frame, every optional field set; exhaustive like [`client_samples`].
fn received_samples() -> Vec<Received> {
    let events = vec![
        Event::Message(message_event()),
        Event::System(system_event()),
    ];
    let samples = vec![
        Received::Authenticated {
            user_id: "a".into(),
            name: "A".into(),
            heartbeat_ms: 25000,
            limits: Some(limits()),
            exp: Some(9),
        },
        Received::Refreshed {
            exp: Some(9),
            id: some("r"),
        },
        Received::Joined(Joined {
            room: "g".into(),
            seq: 4,
            epoch: "e".into(),
            users: Some(vec!["a".into(), "b".into()]),
            user_count: 2,
            history: events.clone(),
            truncated: false,
            recovered: Some(true),
            publish: some("api"),
            announce: Some(false),
            presence: Some(false),
            typing: Some(false),
            id: some("j"),
        }),
        Received::Message(message_event()),
        Received::System(system_event()),
        Received::Left {
            room: "g".into(),
            reason: some("forbidden"),
            id: some("l"),
        },
        Received::Ack {
            id: some("c"),
            room: "g".into(),
            seq: 3,
            duplicate: true,
        },
        Received::History {
            room: "g".into(),
            messages: events,
            more: true,
            id: some("h"),
        },
        Received::Typing {
            room: "g".into(),
            user: "a".into(),
        },
        Received::Pong { id: some("p") },
        Received::Error {
            code: ErrorCode::RateLimited,
            message: "m".into(),
            id: some("c"),
            room: some("g"),
            retry_after_ms: Some(5),
        },
    ];
    for frame in &samples {
        match frame {
            Received::Authenticated { .. }
            | Received::Refreshed { .. }
            | Received::Joined(_)
            | Received::Message(_)
            | Received::System(_)
            | Received::Left { .. }
            | Received::Ack { .. }
            | Received::History { .. }
            | Received::Typing { .. }
            | Received::Pong { .. }
            | Received::Error { .. } => {}
        }
    }
    samples
}

/// Every error code; exhaustive like the samples.
fn error_codes() -> Vec<ErrorCode> {
    let codes = vec![
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotJoined,
        ErrorCode::TooLarge,
        ErrorCode::TooManyRooms,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::IdConflict,
    ];
    for code in &codes {
        match code {
            ErrorCode::BadRequest
            | ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::NotJoined
            | ErrorCode::TooLarge
            | ErrorCode::TooManyRooms
            | ErrorCode::RateLimited
            | ErrorCode::Unavailable
            | ErrorCode::IdConflict => {}
        }
    }
    codes
}

fn types_of(spec: &Value, operation: &str) -> BTreeSet<String> {
    messages(spec, operation)
        .into_iter()
        .map(|m| frame_type(payload(spec, m)).to_owned())
        .collect()
}

#[test]
fn every_client_frame_and_field_is_in_the_spec() {
    let spec = spec();
    let mut types = BTreeSet::new();
    for frame in client_samples() {
        let value = serde_json::to_value(&frame).unwrap();
        let ty = value["type"].as_str().unwrap().to_owned();
        let schema = payload(&spec, message_for(&spec, "publish", &ty));
        assert_fields(schema, &value, &format!("client frame `{ty}`"));
        types.insert(ty);
    }
    assert_eq!(
        types_of(&spec, "publish"),
        types,
        "the spec's client frames are exactly ClientFrame's variants"
    );
}

#[test]
fn every_received_frame_and_field_is_in_the_spec() {
    let spec = spec();
    let mut types = BTreeSet::new();
    for frame in received_samples() {
        let value = serde_json::to_value(&frame).unwrap();
        let ty = value["type"].as_str().unwrap().to_owned();
        let schema = payload(&spec, message_for(&spec, "subscribe", &ty));
        assert_fields(schema, &value, &format!("server frame `{ty}`"));
        // Nested objects: the limits and the events of history lists.
        if let Some(limits) = value.get("limits") {
            let limits_schema = resolve(&spec, &schema["properties"]["limits"]);
            assert_fields(limits_schema, limits, "authenticated.limits");
            let required: BTreeSet<&str> = limits_schema["required"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            for key in limits.as_object().unwrap().keys() {
                assert!(required.contains(key.as_str()), "limits.{key} is required");
            }
        }
        for list in ["history", "messages"] {
            let Some(events) = value.get(list).and_then(Value::as_array) else {
                continue;
            };
            let items = resolve(&spec, &schema["properties"][list]["items"]);
            let variants: Vec<&Value> = items["oneOf"]
                .as_array()
                .unwrap_or_else(|| panic!("{ty}.{list} items are a oneOf of events"))
                .iter()
                .map(|v| resolve(&spec, v))
                .collect();
            for event in events {
                let event_type = event["type"].as_str().unwrap();
                let variant = variants
                    .iter()
                    .find(|v| frame_type(v) == event_type)
                    .unwrap_or_else(|| panic!("{ty}.{list}: no `{event_type}` event schema"));
                assert_fields(variant, event, &format!("{ty}.{list}[] `{event_type}`"));
            }
        }
        types.insert(ty);
    }
    assert_eq!(
        types_of(&spec, "subscribe"),
        types,
        "the spec's server frames are exactly Received's variants"
    );
    let documented: BTreeSet<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let codes: BTreeSet<&str> = error_codes().into_iter().map(ErrorCode::as_str).collect();
    assert_eq!(documented, codes, "the spec's error codes are ErrorCode's");
}

#[test]
fn every_example_parses_with_the_protocol_types() {
    let spec = spec();
    for (operation, client_side) in [("publish", true), ("subscribe", false)] {
        for message in messages(&spec, operation) {
            let schema = payload(&spec, message);
            let ty = frame_type(schema);
            let examples = message["examples"]
                .as_array()
                .unwrap_or_else(|| panic!("`{ty}` has no examples"));
            assert!(!examples.is_empty(), "`{ty}` has no examples");
            for example in examples {
                let example = &example["payload"];
                assert_eq!(example["type"], ty, "an example of `{ty}` has its type");
                assert_fields(schema, example, &format!("example of `{ty}`"));
                let text = example.to_string();
                if client_side {
                    let frame =
                        client::decode(&text).unwrap_or_else(|e| panic!("{text}: {}", e.message));
                    // Nothing in the example is lost on the way: it encodes back the same.
                    assert_eq!(&serde_json::to_value(&frame).unwrap(), example);
                } else {
                    received::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
                }
            }
        }
    }
}

/// Server frames the JS library handles inside the client without naming them in its types,
/// and what it does with them instead.
const INTERNAL_TO_JS: &[(&str, &str)] = &[];

/// The words of a TypeScript file: identifiers split at camelCase humps, lowercased.
fn words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for token in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        let mut word = String::new();
        let mut prev_lower = false;
        for c in token.chars() {
            if c.is_ascii_uppercase() && prev_lower && !word.is_empty() {
                out.insert(std::mem::take(&mut word));
            }
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            word.push(c.to_ascii_lowercase());
        }
        if !word.is_empty() {
            out.insert(word);
        }
    }
    out
}

#[test]
fn the_js_types_name_every_server_frame_they_surface() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/index.d.ts");
    let text = std::fs::read_to_string(path).expect("clients/js/index.d.ts");
    let words = words(&text);
    for frame in received_samples() {
        let value = serde_json::to_value(&frame).unwrap();
        let ty = value["type"].as_str().unwrap();
        match INTERNAL_TO_JS.iter().find(|(t, _)| *t == ty) {
            None => assert!(
                words.contains(ty),
                "clients/js/index.d.ts does not name the `{ty}` server frame"
            ),
            // Keeps the exception list honest: once the types name it, drop the exception.
            Some((_, why)) => assert!(
                !words.contains(ty),
                "index.d.ts now names `{ty}` ({why}): remove it from INTERNAL_TO_JS"
            ),
        }
    }
}
