//! The parley wire protocol, version 1.1: every frame of `docs/protocol.md` as a serde type,
//! the error codes and the close codes. No I/O lives here, so the server, the client library,
//! the bench tool and the tests build and parse frames with the same types.
//!
//! # Layout
//! - [`client`]: frames a client sends, and [`client::decode`] which turns any text into a frame
//!   or a `bad_request` explanation.
//! - [`server`]: frames the server sends, with borrowed fields so one event is encoded once.
//! - [`received`]: the same frames owned and deserializable, as a client parses them.
//! - [`codes`]: [`ErrorCode`] and [`CloseCode`], one enum each, with their documented meanings.
//! - [`room`]: the room-name rule.

pub mod client;
pub mod codes;
pub mod received;
pub mod room;
pub mod server;

pub use client::ClientFrame;
pub use codes::{CloseCode, ErrorCode};
pub use room::valid_room_name;
