//! Frames as a client receives them: owned and deserializable, the mirror image of
//! [`crate::server::ServerFrame`] (which borrows, for the server to encode once). Clients, the
//! bench tool and the tests parse what the server sends with [`parse`].
//!
//! A test in this module encodes every [`ServerFrame`](crate::server::ServerFrame) and parses it
//! back, so the two sides cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::server::Limits;

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Received {
    /// Authentication succeeded.
    Authenticated {
        /// The user id.
        user_id: String,
        /// The display name.
        name: String,
        /// The server's ping interval.
        heartbeat_ms: u64,
        /// The connection's limits (absent from servers older than protocol 1.1).
        #[serde(default)]
        limits: Option<Limits>,
        /// The token's expiry in unix seconds; absent in anonymous mode.
        #[serde(default)]
        exp: Option<u64>,
    },
    /// A `refresh` took effect.
    Refreshed {
        /// The new token's expiry.
        #[serde(default)]
        exp: Option<u64>,
        /// The request's id.
        #[serde(default)]
        id: Option<String>,
    },
    /// A join took effect.
    Joined(Joined),
    /// A chat message.
    Message(MessageEvent),
    /// A join or leave event.
    System(SystemEvent),
    /// A leave took effect.
    Left {
        /// The room.
        room: String,
        /// Why, when the server took the connection out unasked (`forbidden`).
        #[serde(default)]
        reason: Option<String>,
        /// The request's id.
        #[serde(default)]
        id: Option<String>,
    },
    /// A message was stored.
    Ack {
        /// The client's id.
        #[serde(default)]
        id: Option<String>,
        /// The room.
        room: String,
        /// The message's seq.
        seq: u64,
        /// A resend of a stored message.
        #[serde(default)]
        duplicate: bool,
    },
    /// An answer to `history`.
    History {
        /// The room.
        room: String,
        /// Events, oldest first.
        messages: Vec<Event>,
        /// More remain in the direction of paging.
        more: bool,
        /// The request's id.
        #[serde(default)]
        id: Option<String>,
    },
    /// Someone is typing.
    Typing {
        /// The room.
        room: String,
        /// Who.
        user: String,
    },
    /// Answer to `ping`.
    Pong {
        /// The request's id.
        #[serde(default)]
        id: Option<String>,
    },
    /// A request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human explanation.
        message: String,
        /// The request's id.
        #[serde(default)]
        id: Option<String>,
        /// The request's room.
        #[serde(default)]
        room: Option<String>,
        /// With `rate_limited`: when to try again.
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
}

/// The `joined` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    /// The room.
    pub room: String,
    /// The room's latest seq.
    pub seq: u64,
    /// The incarnation of the room's log.
    pub epoch: String,
    /// The people in the room; absent past `presence.announce_max`.
    #[serde(default)]
    pub users: Option<Vec<String>>,
    /// How many people are in the room.
    pub user_count: usize,
    /// Stored events, oldest first.
    pub history: Vec<Event>,
    /// More events remain after `history`.
    pub truncated: bool,
    /// Only with `since`: whether `history` continues exactly from it.
    #[serde(default)]
    pub recovered: Option<bool>,
    /// `"api"` when only the server's HTTP API posts in the room (a `send` is refused with
    /// `forbidden`); absent when members post.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<String>,
    /// `false` when joins and leaves are not announced; absent when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<bool>,
    /// `false` when the room shows no member list; absent when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
    /// `false` when `typing` notices are refused; absent when they are taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typing: Option<bool>,
    /// The request's id.
    #[serde(default)]
    pub id: Option<String>,
}

impl Joined {
    /// Whether members may post in the room (`publish` is not `"api"`).
    pub fn members_post(&self) -> bool {
        self.publish.as_deref() != Some("api")
    }
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    /// The room.
    pub room: String,
    /// Its seq.
    pub seq: u64,
    /// The sender's user id.
    pub user: String,
    /// The sender's display name.
    pub name: String,
    /// The text.
    pub content: String,
    /// When it was stored.
    pub ts: String,
    /// The sender's client id.
    #[serde(default)]
    pub id: Option<String>,
}

/// A join or leave event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemEvent {
    /// The room.
    pub room: String,
    /// Its seq.
    pub seq: u64,
    /// `join` or `leave`.
    pub event: String,
    /// Who.
    pub user: String,
    /// Their display name (absent from events stored before protocol 1.1).
    #[serde(default)]
    pub name: Option<String>,
    /// A human sentence.
    pub content: String,
    /// When it was stored.
    pub ts: String,
}

/// A sequenced event of a room's log, as in `history` arrays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A chat message.
    Message(MessageEvent),
    /// A join or leave.
    System(SystemEvent),
}

impl Event {
    /// The event's seq.
    pub fn seq(&self) -> u64 {
        match self {
            Event::Message(m) => m.seq,
            Event::System(s) => s.seq,
        }
    }

    /// The event's room.
    pub fn room(&self) -> &str {
        match self {
            Event::Message(m) => &m.room,
            Event::System(s) => &s.room,
        }
    }
}

/// Parses one text frame from the server.
pub fn parse(text: &str) -> Result<Received, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{json_array, ServerFrame};

    fn round_trip(frame: ServerFrame<'_>) -> Received {
        let text = frame.encode();
        parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn every_server_frame_parses_back() {
        let limits = Limits {
            max_content_bytes: 4096,
            max_rooms_per_connection: 100,
            send_rate: 10.0,
            send_burst: 20,
            join_rate: 5.0,
            join_burst: 20,
        };
        assert!(matches!(
            round_trip(ServerFrame::Authenticated {
                user_id: "a",
                name: "A",
                heartbeat_ms: 1,
                limits: &limits,
                exp: Some(9),
            }),
            Received::Authenticated { limits: Some(l), exp: Some(9), .. } if l == limits
        ));
        assert_eq!(
            round_trip(ServerFrame::Refreshed {
                exp: Some(5),
                id: Some("r")
            }),
            Received::Refreshed {
                exp: Some(5),
                id: Some("r".into())
            }
        );
        let message = ServerFrame::Message {
            room: "g",
            seq: 3,
            user: "a",
            name: "A",
            content: "hi",
            ts: "t",
            id: Some("c"),
        }
        .encode();
        let system = ServerFrame::System {
            room: "g",
            seq: 4,
            event: "join",
            user: "b",
            name: "B",
            content: "b joined the room",
            ts: "t",
        }
        .encode();
        let history = json_array([message.as_str(), system.as_str()]);
        let Received::Joined(joined) = round_trip(ServerFrame::Joined {
            room: "g",
            seq: 4,
            epoch: "e",
            users: Some(&["a", "b"]),
            user_count: 2,
            history: &history,
            truncated: false,
            recovered: Some(true),
            rules: crate::server::RoomRules {
                publish: Some("api"),
                ..Default::default()
            },
            id: Some("j"),
        }) else {
            panic!("not joined")
        };
        assert_eq!(
            joined.history.iter().map(Event::seq).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(joined.id.as_deref(), Some("j"));
        assert!(!joined.members_post());
        assert_eq!(joined.typing, None);
        assert!(
            matches!(parse(&message).unwrap(), Received::Message(m) if m.id.as_deref() == Some("c"))
        );
        assert!(matches!(parse(&system).unwrap(), Received::System(s) if s.event == "join"));
        assert!(matches!(
            round_trip(ServerFrame::Left { room: "g", reason: Some("forbidden"), id: None }),
            Received::Left { reason: Some(r), .. } if r == "forbidden"
        ));
        assert!(matches!(
            round_trip(ServerFrame::Ack {
                id: Some("c"),
                room: "g",
                seq: 3,
                duplicate: true
            }),
            Received::Ack {
                duplicate: true,
                seq: 3,
                ..
            }
        ));
        assert!(matches!(
            round_trip(ServerFrame::History { room: "g", messages: &history, more: true, id: Some("h") }),
            Received::History { more: true, messages, id: Some(h), .. } if messages.len() == 2 && h == "h"
        ));
        assert!(matches!(
            round_trip(ServerFrame::Typing {
                room: "g",
                user: "a"
            }),
            Received::Typing { .. }
        ));
        assert_eq!(
            round_trip(ServerFrame::Pong { id: Some("p") }),
            Received::Pong {
                id: Some("p".into())
            }
        );
        assert!(matches!(
            round_trip(ServerFrame::Error {
                code: ErrorCode::IdConflict,
                message: "m",
                id: Some("c"),
                room: Some("g"),
                retry_after_ms: None,
            }),
            Received::Error { code: ErrorCode::IdConflict, room: Some(r), .. } if r == "g"
        ));
    }
}
