//! Error codes (in `error` frames) and close codes (in WebSocket close frames), each with the
//! meaning a client can rely on. The mapping from a failure to a code lives here and nowhere else.

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame. The connection stays open after every one of them, except
/// where a close follows (`unauthorized` before authentication, the abuse limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown type, missing or invalid field, binary frame, bad room name.
    BadRequest,
    /// No valid token: before authentication this is followed by close 4001.
    Unauthorized,
    /// The token's `rooms` claim does not cover the room; or the room's policy refuses the
    /// request: a `send` where only the HTTP API posts (`joined.publish` is `"api"`), a
    /// `typing` where typing is off (`joined.typing` is `false`).
    Forbidden,
    /// `send`, `typing` or `leave` for a room this connection has not joined.
    NotJoined,
    /// Content over `limits.max_content_bytes`.
    TooLarge,
    /// More rooms than `limits.max_rooms_per_connection` on one connection.
    TooManyRooms,
    /// Too many sends; `retry_after_ms` says when a token is next available.
    RateLimited,
    /// The store cannot take the write now: nothing was stored, retry.
    Unavailable,
    /// A `send` reused an `id` of a stored message with different content: nothing was stored.
    IdConflict,
}

impl ErrorCode {
    /// The wire spelling, e.g. `bad_request`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::IdConflict => "id_conflict",
        }
    }
}

/// Close codes the server uses. 1000-1015 are RFC 6455's; 4000-4999 are parley's own.
/// 4001 and 4008 are terminal: a client should not reconnect without a new token or a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// The connection ended normally.
    Normal = 1000,
    /// The server is shutting down: reconnect (elsewhere) and resume with `since`.
    GoingAway = 1001,
    /// A text frame was not valid UTF-8 (RFC 6455 section 8.1).
    InvalidPayload = 1007,
    /// A frame or message over `limits.max_frame_bytes`.
    TooBig = 1009,
    /// No valid authentication. Terminal.
    Unauthorized = 4001,
    /// Too many refused requests in a short window. Terminal.
    RateLimitAbuse = 4008,
    /// The connection could not keep up (or the node could not fill a gap): reconnect and
    /// rejoin with `since`/`epoch` to recover everything.
    SlowConsumer = 4009,
    /// The token expired and was not refreshed.
    TokenExpired = 4011,
}

impl CloseCode {
    /// The numeric code for the close frame.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// A short reason for the close frame and the log.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "server shutting down",
            CloseCode::InvalidPayload => "invalid utf-8",
            CloseCode::TooBig => "frame too big",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::RateLimitAbuse => "rate limit abuse",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::TokenExpired => "token expired",
        }
    }
}
