//! Frames a client sends, and their decoding. Unknown fields are ignored; anything else that
//! does not fit is a [`DecodeError`] the server answers with `error bad_request`.

use serde::{Deserialize, Serialize};

/// Longest client-chosen message id, in characters.
pub const MAX_CLIENT_ID: usize = 64;

/// One frame from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First-message authentication.
    Auth {
        /// The JWT.
        token: String,
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Join a room, optionally resuming after `since` in `epoch`.
    Join {
        /// The room.
        room: String,
        /// The last seq the client saw; only together with `epoch`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The room epoch `since` belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: String,
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Post a message.
    Send {
        /// The room; the connection must have joined it.
        room: String,
        /// The text.
        content: String,
        /// The client's id for the ack and de-duplication: unique per user and room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Page through a room's log.
    History {
        /// The room.
        room: String,
        /// Events with seq below this, newest page first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Events with seq above this, oldest first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Page size, 1 to 200 (default 50).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Ephemeral typing notice.
    Typing {
        /// The room.
        room: String,
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Replace the connection's token.
    Refresh {
        /// The new JWT, for the same `sub`.
        token: String,
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Application-level ping; answered with `pong`.
    Ping {
        /// The request's id, echoed on its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl ClientFrame {
    /// The request's `id`, when it carries one; every answer to the request echoes it.
    pub fn id(&self) -> Option<&str> {
        match self {
            ClientFrame::Auth { id, .. }
            | ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::Refresh { id, .. }
            | ClientFrame::Ping { id } => id.as_deref(),
        }
    }

    /// The room the request is about, when it names one; an error about it names it too.
    pub fn room(&self) -> Option<&str> {
        match self {
            ClientFrame::Join { room, .. }
            | ClientFrame::Leave { room, .. }
            | ClientFrame::Send { room, .. }
            | ClientFrame::History { room, .. }
            | ClientFrame::Typing { room, .. } => Some(room),
            ClientFrame::Auth { .. } | ClientFrame::Refresh { .. } | ClientFrame::Ping { .. } => {
                None
            }
        }
    }
}

/// Why a text frame is not a valid client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// What is wrong, for the `error` frame's `message`.
    pub message: String,
    /// The request's `id`, when one could be read, so the error can echo it.
    pub id: Option<String>,
    /// The request's `room`, when one could be read, so the error can name it.
    pub room: Option<String>,
}

/// Decodes one text frame. Every failure says what is wrong: malformed JSON, not an object,
/// missing or unknown `type`, a missing or mistyped field, or an over-long `id`.
pub fn decode(text: &str) -> Result<ClientFrame, DecodeError> {
    match serde_json::from_str::<ClientFrame>(text) {
        // serde's internally tagged enums also take a sequence with the tag first
        // (`["ping"]`, `["send","room","hi"]`); a frame is an object. Leading characters of
        // valid JSON are JSON whitespace, which `trim_start` covers.
        Ok(_) if !text.trim_start().starts_with('{') => Err(DecodeError {
            message: "a frame must be a JSON object".to_owned(),
            id: None,
            room: None,
        }),
        Ok(frame) => {
            if let Some(id) = frame.id() {
                if id.chars().count() > MAX_CLIENT_ID || id.is_empty() {
                    return Err(DecodeError {
                        message: format!("id must be 1 to {MAX_CLIENT_ID} characters"),
                        id: None,
                        room: frame.room().map(str::to_owned),
                    });
                }
            }
            Ok(frame)
        }
        Err(err) => {
            let (id, room) = salvage(text);
            Err(DecodeError {
                message: describe(text, &err),
                id,
                room,
            })
        }
    }
}

fn describe(text: &str, err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => format!("malformed JSON: {err}"),
        Category::Data => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => match map.get("type") {
                None => "missing field `type`".to_owned(),
                Some(serde_json::Value::String(t)) => {
                    let err = err.to_string();
                    if err.starts_with("unknown variant") {
                        format!("unknown type `{t}`")
                    } else {
                        format!("invalid `{t}` frame: {err}")
                    }
                }
                Some(_) => "field `type` must be a string".to_owned(),
            },
            _ => "a frame must be a JSON object".to_owned(),
        },
    }
}

/// The `id` and `room` of a frame that did not decode, when they are strings (and the id is
/// not over-long), so the error can still echo them.
fn salvage(text: &str) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return (None, None);
    };
    let string = |key: &str| value.get(key)?.as_str().map(str::to_owned);
    let id = string("id").filter(|id| (1..=MAX_CLIENT_ID).contains(&id.chars().count()));
    (id, string("room"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_frame() {
        assert_eq!(
            decode(r#"{"type":"join","room":"g","since":4,"epoch":"e","extra":1}"#).unwrap(),
            ClientFrame::Join {
                room: "g".into(),
                since: Some(4),
                epoch: Some("e".into()),
                id: None,
            }
        );
        assert_eq!(
            decode(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping { id: None }
        );
        let join = decode(r#"{"type":"join","room":"g","id":"j1"}"#).unwrap();
        assert_eq!((join.id(), join.room()), (Some("j1"), Some("g")));
        assert!(matches!(
            decode(r#"{"type":"send","room":"g","content":"hi","id":"c1"}"#).unwrap(),
            ClientFrame::Send { .. }
        ));
    }

    #[test]
    fn explains_failures() {
        assert!(decode("{")
            .unwrap_err()
            .message
            .starts_with("malformed JSON"));
        assert_eq!(
            decode("[1]").unwrap_err().message,
            "a frame must be a JSON object"
        );
        assert_eq!(decode("{}").unwrap_err().message, "missing field `type`");
        assert_eq!(
            decode(r#"{"type":"nope"}"#).unwrap_err().message,
            "unknown type `nope`"
        );
        let err = decode(r#"{"type":"send","room":"g","id":"c9"}"#).unwrap_err();
        assert!(err.message.contains("content"), "{}", err.message);
        assert_eq!(err.id.as_deref(), Some("c9"));
        assert_eq!(err.room.as_deref(), Some("g"));
        let long = format!(
            r#"{{"type":"send","room":"g","content":"x","id":"{}"}}"#,
            "i".repeat(65)
        );
        assert!(decode(&long).unwrap_err().message.starts_with("id must be"));
    }

    #[test]
    fn refuses_arrays_with_the_tag_first() {
        // Found while fuzzing: serde accepted these as `ping`, `join` and `send` frames.
        for text in [
            r#"["ping"]"#,
            r#" ["join","g",5,"e"]"#,
            r#"["send","g","hi","c1"]"#,
        ] {
            assert_eq!(
                decode(text).unwrap_err(),
                DecodeError {
                    message: "a frame must be a JSON object".into(),
                    id: None,
                    room: None,
                },
                "{text}"
            );
        }
        assert_eq!(
            decode(" \n\t{\"type\":\"ping\"}").unwrap(),
            ClientFrame::Ping { id: None }
        );
    }
}
