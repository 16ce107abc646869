//! The broker: where a room's events are sequenced, stored and handed to the hub for fan-out.
//!
//! Guarantees every implementation gives:
//! - one sequence per room, shared by messages and join/leave events, starting at 1 and
//!   increasing by exactly 1, assigned where the event is stored;
//! - storing an event and delivering it are one ordered step: events reach the hub in seq order
//!   and only after they are stored, so an `ack` (sent after the store returns) means durable;
//! - a joiner is registered with the hub exactly after its `joined.seq`: it receives every later
//!   event live and none of the earlier ones twice;
//! - a resend of a client id (same user, same room, within [`log::DEDUP_WINDOW`]) with the same
//!   content returns the original seq (`duplicate`) and posts nothing; with different content it
//!   is refused ([`BrokerError::IdConflict`]) and posts nothing.
//!
//! [`sqlite::SqliteBroker`] is the single-node implementation over the SQLite log;
//! [`redis::RedisBroker`] the cluster one over Redis.

pub mod log;
pub mod redis;
pub mod sqlite;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::oneshot;

use axum::extract::ws::Utf8Bytes;
use parley_protocol::server::ServerFrame;
use parley_protocol::ErrorCode;

use crate::hub::ConnId;
use crate::outbound::{Batch, InFlight, Outbound};
pub use log::announce;
use log::{Page, PageQuery, StoredRoom};

/// Why a broker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The store cannot take the request now; nothing was stored. The client may retry. The
    /// text is the driver's reason, for the log and `/readyz`; clients read the fixed message.
    #[error("storage unavailable; the request had no effect, retry")]
    Unavailable(String),
    /// The broker has shut down.
    #[error("server shutting down")]
    Closed,
    /// A message with this client id and different content is stored; nothing was posted.
    #[error("this id was used for a different message; use a new id for new content")]
    IdConflict,
}

impl BrokerError {
    /// The error code a client sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::Unavailable(_) | BrokerError::Closed => ErrorCode::Unavailable,
            BrokerError::IdConflict => ErrorCode::IdConflict,
        }
    }
}

/// A stored message: its seq, and whether it was stored before (a resend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted {
    /// The message's seq.
    pub seq: u64,
    /// The message was already stored under this client id; nothing was posted now.
    pub duplicate: bool,
}

/// A connection joining a room.
pub struct JoinRequest {
    /// The room.
    pub room: Arc<str>,
    /// The joiner's user id.
    pub user: Arc<str>,
    /// The joiner's display name, for the join event.
    pub name: Arc<str>,
    /// The joining connection.
    pub conn: ConnId,
    /// Where `joined` and then the room's live events go.
    pub outbound: Arc<Outbound>,
    /// `since` and `epoch` from the join frame.
    pub since: Option<(u64, String)>,
    /// The request's id, echoed on `joined`.
    pub request_id: Option<Box<str>>,
}

/// A connection leaving a room (by request or by disconnecting).
pub struct LeaveRequest {
    /// The room.
    pub room: Arc<str>,
    /// The leaver's user id.
    pub user: Arc<str>,
    /// The leaver's display name, for the leave event.
    pub name: Arc<str>,
    /// The leaving connection.
    pub conn: ConnId,
    /// Where to queue `left`; `None` when the connection is gone.
    pub outbound: Option<Arc<Outbound>>,
    /// The request's id, echoed on `left`.
    pub request_id: Option<Box<str>>,
    /// Why the server takes the connection out unasked (`forbidden`), for `left`.
    pub reason: Option<&'static str>,
}

impl LeaveRequest {
    /// The `left` frame for the leaver.
    pub fn left_frame(&self) -> Utf8Bytes {
        Utf8Bytes::from(
            ServerFrame::Left {
                room: &self.room,
                reason: self.reason,
                id: self.request_id.as_deref(),
            }
            .encode(),
        )
    }
}

/// A chat message to post.
pub struct PublishRequest {
    /// The room.
    pub room: Arc<str>,
    /// Sender's user id.
    pub user: Arc<str>,
    /// Sender's display name.
    pub name: Arc<str>,
    /// The text.
    pub content: String,
    /// The client's id, for the ack and de-duplication.
    pub client_id: Option<String>,
    /// When the message was accepted, for the send-to-ack latency metric.
    pub received: Instant,
}

/// Where the outcome of a publish goes.
pub enum PublishReply {
    /// Queue an `ack` or `error` frame to the sending connection.
    Connection(InFlight),
    /// Hand the outcome to a waiting caller (the HTTP API).
    Caller(oneshot::Sender<Result<Posted, BrokerError>>),
}

impl PublishReply {
    /// Answers `request`: an `ack` (or the error) to the connection, queued in `batch` when one
    /// is given, or the outcome to the caller.
    pub fn answer(
        self,
        request: &PublishRequest,
        outcome: Result<Posted, BrokerError>,
        batch: Option<&mut Batch>,
    ) {
        match self {
            PublishReply::Connection(outbound) => {
                let frame = match &outcome {
                    Ok(posted) => ServerFrame::Ack {
                        id: request.client_id.as_deref(),
                        room: &request.room,
                        seq: posted.seq,
                        duplicate: posted.duplicate,
                    }
                    .encode(),
                    Err(err) => ServerFrame::Error {
                        code: err.code(),
                        message: &err.to_string(),
                        id: request.client_id.as_deref(),
                        room: Some(&request.room),
                        retry_after_ms: None,
                    }
                    .encode(),
                };
                match batch {
                    Some(batch) => {
                        outbound.push_in(Utf8Bytes::from(frame), batch);
                    }
                    None => {
                        outbound.push(Utf8Bytes::from(frame));
                    }
                }
            }
            PublishReply::Caller(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// Sequencing, storage, history and fan-out of room events.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Joins a room. On success `joined` is already queued to the connection, ahead of every
    /// live event that follows it.
    async fn join(&self, request: JoinRequest) -> Result<(), BrokerError>;

    /// Leaves a room; a `leave` event is announced if this was the user's last connection there.
    async fn leave(&self, request: LeaveRequest) -> Result<(), BrokerError>;

    /// Posts a message. Returns once the request is queued; the outcome goes to `reply`.
    async fn publish(
        &self,
        request: PublishRequest,
        reply: PublishReply,
    ) -> Result<(), BrokerError>;

    /// Reads a page of a room's log.
    async fn history(&self, room: &str, query: PageQuery) -> Result<Page, BrokerError>;

    /// Every room the log knows with its latest seq, sorted by name (the HTTP API's list).
    async fn rooms(&self) -> Result<Vec<StoredRoom>, BrokerError>;

    /// Whether the store answers, for `/readyz`: `Err` carries the reason.
    async fn check(&self) -> Result<(), String>;

    /// Relays an ephemeral frame (typing) to the room's members on other nodes; the local
    /// ones already have it. Best effort: nothing is stored or sequenced.
    fn typing(&self, _room: &str, _frame: &axum::extract::ws::Utf8Bytes) {}

    /// The name of [`Broker::check`] in `/readyz`'s `checks`: `store`, or `redis` in a cluster.
    fn check_name(&self) -> &'static str {
        "store"
    }

    /// Finishes every queued write and stops. Later calls fail with [`BrokerError::Closed`].
    async fn close(&self);
}
