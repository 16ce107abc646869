//! Frames the server sends. Fields borrow, so the server encodes an event once into shared
//! bytes and hands the same bytes to every member. Clients that want owned values parse frames
//! as `serde_json::Value` or their own types.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codes::ErrorCode;

/// One frame from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// Authentication succeeded.
    Authenticated {
        /// The token's `sub` (or the anonymous name).
        user_id: &'a str,
        /// Display name: the token's `name`, else the user id.
        name: &'a str,
        /// How often the server pings; a client may use it to size its own timeouts.
        heartbeat_ms: u64,
        /// The limits that apply to this connection.
        limits: &'a Limits,
        /// When the token expires, in unix seconds; absent in anonymous mode.
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// A `refresh` took effect.
    Refreshed {
        /// When the new token expires, in unix seconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// A join took effect.
    Joined {
        /// The room.
        room: &'a str,
        /// The room's latest seq, the joiner's own join event included.
        seq: u64,
        /// The incarnation of the room's log.
        epoch: &'a str,
        /// The people in the room; omitted past `presence.announce_max`.
        #[serde(skip_serializing_if = "Option::is_none")]
        users: Option<&'a [&'a str]>,
        /// How many people are in the room.
        user_count: usize,
        /// Stored events, oldest first, as the JSON array of their frames.
        history: &'a RawValue,
        /// More events remain after `history` (page forward with `after`).
        truncated: bool,
        /// Only with `since`: whether `history` continues exactly from it.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// The room's policy, where it departs from the defaults (`"publish":"api"`, ...).
        #[serde(flatten)]
        rules: RoomRules,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// A chat message.
    Message {
        /// The room.
        room: &'a str,
        /// Its place in the room's sequence.
        seq: u64,
        /// The sender's user id.
        user: &'a str,
        /// The sender's display name.
        name: &'a str,
        /// The text.
        content: &'a str,
        /// When the server stored it, RFC 3339 UTC with milliseconds.
        ts: &'a str,
        /// The sender's client id, when it gave one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// A join or leave event.
    System {
        /// The room.
        room: &'a str,
        /// Its place in the room's sequence.
        seq: u64,
        /// `join` or `leave`.
        event: &'a str,
        /// Who joined or left.
        user: &'a str,
        /// Their display name, as on their messages (the user id where the server does not
        /// know it: a leave announced for a node that died).
        name: &'a str,
        /// A human sentence, e.g. `bob joined the room`.
        content: &'a str,
        /// When the server stored it.
        ts: &'a str,
    },
    /// A leave took effect; nothing more of the room follows.
    Left {
        /// The room.
        room: &'a str,
        /// Why the server took the connection out when it did so unasked: `forbidden` (a
        /// refreshed token no longer allows the room).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// A message was stored durably.
    Ack {
        /// The client's id, when it gave one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// The room.
        room: &'a str,
        /// The message's seq.
        seq: u64,
        /// A resend of a stored message: `seq` is the original one and nothing was posted.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    /// An answer to `history`.
    History {
        /// The room.
        room: &'a str,
        /// Events oldest first, as the JSON array of their frames.
        messages: &'a RawValue,
        /// Further events remain in the direction of paging.
        more: bool,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// Someone is typing.
    Typing {
        /// The room.
        room: &'a str,
        /// Who.
        user: &'a str,
    },
    /// Answer to `ping`.
    Pong {
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// A request failed; the connection stays open unless a close follows.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human explanation.
        message: &'a str,
        /// The request's `id`, when it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// The room the request was about, when it named one.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        /// With `rate_limited`: when to try again.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// What a room's policy (the server's `[[rooms]]` configuration) means for its members, as
/// `joined` tells them. Each field appears only where the room departs from the default, so a
/// `joined` of an ordinary room is what it always was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoomRules {
    /// `"api"`: only the server's HTTP API posts; a `send` gets `error forbidden`. Absent:
    /// members post.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<&'static str>,
    /// `false`: joins and leaves are not announced as `system` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce: Option<bool>,
    /// `false`: members are not told who is in the room (`users` is absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
    /// `false`: `typing` notices are refused (`error forbidden`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typing: Option<bool>,
}

impl ServerFrame<'_> {
    /// The frame as JSON text. Serializing these types cannot fail (no maps with non-string
    /// keys, no failing `Serialize` impls), so this returns the string directly.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    /// An `error` frame without id, room or retry hint.
    pub fn error(code: ErrorCode, message: &str) -> String {
        ServerFrame::Error {
            code,
            message,
            id: None,
            room: None,
            retry_after_ms: None,
        }
        .encode()
    }
}

/// The limits that apply to a connection, sent in `authenticated` so a client need not
/// hard-code what an operator can change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest `send` content, in bytes of UTF-8.
    pub max_content_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Sends per second, sustained.
    pub send_rate: f64,
    /// Sends allowed in a burst.
    pub send_burst: u32,
    /// Joins and leaves per second, sustained.
    pub join_rate: f64,
    /// Joins and leaves allowed in a burst.
    pub join_burst: u32,
}

/// Joins already-encoded frames into one JSON array, for `history` fields.
pub fn json_array<'a>(frames: impl IntoIterator<Item = &'a str>) -> Box<RawValue> {
    let mut out = String::from("[");
    for (i, frame) in frames.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(frame);
    }
    out.push(']');
    RawValue::from_string(out).expect("stored frames are valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_protocol_page() {
        let frame = ServerFrame::Ack {
            id: Some("c-17"),
            room: "general",
            seq: 121,
            duplicate: false,
        };
        assert_eq!(
            frame.encode(),
            r#"{"type":"ack","id":"c-17","room":"general","seq":121}"#
        );
        let history = json_array([r#"{"a":1}"#, r#"{"b":2}"#]);
        let frame = ServerFrame::Joined {
            room: "g",
            seq: 2,
            epoch: "e",
            users: Some(&["alice"]),
            user_count: 1,
            history: &history,
            truncated: false,
            recovered: None,
            rules: RoomRules::default(),
            id: None,
        };
        assert_eq!(
            frame.encode(),
            r#"{"type":"joined","room":"g","seq":2,"epoch":"e","users":["alice"],"user_count":1,"history":[{"a":1},{"b":2}],"truncated":false}"#
        );
        let frame = ServerFrame::Joined {
            room: "news",
            seq: 0,
            epoch: "e",
            users: None,
            user_count: 1,
            history: &history,
            truncated: false,
            recovered: None,
            rules: RoomRules {
                publish: Some("api"),
                typing: Some(false),
                ..RoomRules::default()
            },
            id: Some("j"),
        };
        assert_eq!(
            frame.encode(),
            r#"{"type":"joined","room":"news","seq":0,"epoch":"e","user_count":1,"history":[{"a":1},{"b":2}],"truncated":false,"publish":"api","typing":false,"id":"j"}"#
        );
        assert_eq!(
            ServerFrame::Pong { id: None }.encode(),
            r#"{"type":"pong"}"#
        );
        assert_eq!(
            ServerFrame::Pong { id: Some("p1") }.encode(),
            r#"{"type":"pong","id":"p1"}"#
        );
    }
}
