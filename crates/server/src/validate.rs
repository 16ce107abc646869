//! The one validation layer: every rule on what a client may ask, with the error code and the
//! message it gets, used alike by the WebSocket session, the HTTP API, the upgrade routes and
//! `/echo`. A [`Refusal`] becomes an `error` frame on a socket and a JSON error with the
//! matching status over HTTP (`http::error`).

use std::borrow::Cow;

use parley_protocol::client::MAX_CLIENT_ID;
use parley_protocol::{valid_room_name, CloseCode, ErrorCode};

pub use crate::auth::MAX_USER_ID;
use crate::broker::log::{PageQuery, DEFAULT_PAGE, MAX_PAGE};

/// The room-name rule, as clients read it.
pub const ROOM_RULE: &str =
    "invalid room name: 1 to 64 of A-Z a-z 0-9 _ . : -, starting with a letter or digit";

/// Longest display name a minted token may carry, in characters.
pub const MAX_TOKEN_NAME: usize = 128;

/// A request refused before it reached the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error code.
    pub code: ErrorCode,
    /// What the client reads.
    pub message: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with a fixed message.
    pub const fn new(code: ErrorCode, message: &'static str) -> Refusal {
        Refusal {
            code,
            message: Cow::Borrowed(message),
        }
    }

    /// `bad_request` with `message`.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

/// A room name.
pub fn room(name: &str) -> Result<(), Refusal> {
    if valid_room_name(name) {
        Ok(())
    } else {
        Err(Refusal::bad_request(ROOM_RULE))
    }
}

/// A message's content: not empty, at most `max` bytes.
pub fn content(content: &str, max: usize) -> Result<(), Refusal> {
    if content.len() > max {
        return Err(Refusal {
            code: ErrorCode::TooLarge,
            message: format!("content is {} bytes; the limit is {max}", content.len()).into(),
        });
    }
    if content.is_empty() {
        return Err(Refusal::bad_request("content is empty"));
    }
    Ok(())
}

/// A client's message id: 1 to [`MAX_CLIENT_ID`] characters.
pub fn client_id(id: &str) -> Result<(), Refusal> {
    if (1..=MAX_CLIENT_ID).contains(&id.chars().count()) {
        Ok(())
    } else {
        Err(Refusal::bad_request(format!(
            "id must be 1 to {MAX_CLIENT_ID} characters"
        )))
    }
}

/// A user id or display name from a client: 1 (0 with `may_be_empty`) to `max` printable
/// characters. `what` names the field in the message.
pub fn user_text(what: &str, text: &str, may_be_empty: bool, max: usize) -> Result<(), Refusal> {
    let len = text.chars().count();
    let min = usize::from(!may_be_empty);
    if len < min || len > max || text.chars().any(char::is_control) {
        let range = if may_be_empty { "at most" } else { "1 to" };
        return Err(Refusal::bad_request(format!(
            "{what} must be {range} {max} printable characters"
        )));
    }
    Ok(())
}

/// `since` and `epoch` of a resume: both or neither.
pub fn resume(since: Option<u64>, epoch: Option<String>) -> Result<Option<(u64, String)>, Refusal> {
    match (since, epoch) {
        (Some(since), Some(epoch)) => Ok(Some((since, epoch))),
        (None, None) => Ok(None),
        _ => Err(Refusal::bad_request("`since` and `epoch` go together")),
    }
}

/// A history page request: `limit` 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
pub fn page(
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
) -> Result<PageQuery, Refusal> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Refusal::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    Ok(PageQuery {
        before,
        after,
        limit,
    })
}

/// The close code a WebSocket read error calls for, or why there is no one to send it to:
/// oversize frames close with 1009, invalid UTF-8 with 1007 (RFC 6455); anything else means
/// the peer is gone. `/ws` and `/echo` both answer bad frames through this.
pub fn read_error(err: tungstenite::Error) -> Result<CloseCode, &'static str> {
    use tungstenite::Error;
    match err {
        Error::Capacity(_) => Ok(CloseCode::TooBig),
        Error::Utf8(_) => Ok(CloseCode::InvalidPayload),
        Error::Protocol(_) => Err("protocol violation"),
        _ => Err("read failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_their_codes() {
        assert!(room("general").is_ok());
        assert_eq!(room("-x").unwrap_err().message, ROOM_RULE);
        assert_eq!(content("", 10).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(content("hello", 4).unwrap_err().code, ErrorCode::TooLarge);
        assert!(content("hi", 4).is_ok());
        assert!(resume(Some(1), None).is_err());
        assert_eq!(
            resume(Some(1), Some("e".into())).unwrap(),
            Some((1, "e".into()))
        );
        assert_eq!(page(None, None, None).unwrap().limit, DEFAULT_PAGE);
        assert!(page(None, None, Some(0)).is_err());
        assert!(page(None, None, Some(MAX_PAGE + 1)).is_err());
        assert!(client_id(&"i".repeat(MAX_CLIENT_ID)).is_ok());
        assert!(client_id(&"i".repeat(MAX_CLIENT_ID + 1)).is_err());
        assert!(user_text("name", "", true, MAX_USER_ID).is_ok());
        assert!(user_text("user", "", false, MAX_USER_ID).is_err());
        assert!(user_text("user", "a\u{7}", false, MAX_USER_ID).is_err());
        assert!(user_text(
            "name",
            &"n".repeat(MAX_TOKEN_NAME + 1),
            true,
            MAX_TOKEN_NAME
        )
        .is_err());
    }
}
