//! The broker: where a room's events are sequenced, stored and handed to the hub for fan-out.
//!
//! Guarantees every implementation gives:
//! - one sequence per room, shared by messages and join/leave events, starting at 1 and
//!   increasing by exactly 1, assigned where the event is stored;
//! - storing an event and delivering it are one ordered step: events reach the hub in seq order
//!   and only after they are stored, so an `ack` (sent after the store returns) means durable;
//! - a joiner is registered with the hub exactly after its `joined.seq`: it receives every later
//!   event live and none of the earlier ones twice;
//! - a resend of a client id (same user, same room, within [`crate::store::sqlite::DEDUP_WINDOW`])
//!   returns the original seq and posts nothing.
//!
//! [`memory::MemoryBroker`] is the single-node implementation over the SQLite log;
//! [`redis::RedisBroker`] the cluster one over Redis.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::hub::ConnId;
use crate::outbound::Outbound;
use crate::store::sqlite::{Page, PageQuery, StoredRoom};

/// Cuts a `since` replay to at most `max_bytes` of frames (keeping at least one, oldest first).
/// Returns whether anything was cut, i.e. whether `truncated` must be set.
pub fn cap_replay(frames: &mut Vec<String>, max_bytes: usize) -> bool {
    let mut total = 0usize;
    let keep = frames
        .iter()
        .position(|f| {
            total += f.len();
            total > max_bytes
        })
        .map_or(frames.len(), |at| at.max(1));
    let cut = keep < frames.len();
    frames.truncate(keep);
    cut
}

/// Why a broker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The store cannot take the request now; nothing was stored. The client may retry.
    #[error("{0}")]
    Unavailable(String),
    /// The broker has shut down.
    #[error("server shutting down")]
    Closed,
}

/// A connection joining a room.
pub struct JoinRequest {
    /// The room.
    pub room: Arc<str>,
    /// The joiner's user id.
    pub user: Arc<str>,
    /// The joining connection.
    pub conn: ConnId,
    /// Where `joined` and then the room's live events go.
    pub outbound: Arc<Outbound>,
    /// `since` and `epoch` from the join frame.
    pub since: Option<(u64, String)>,
}

/// A connection leaving a room (by request or by disconnecting).
pub struct LeaveRequest {
    /// The room.
    pub room: Arc<str>,
    /// The leaver's user id.
    pub user: Arc<str>,
    /// The leaving connection.
    pub conn: ConnId,
    /// Where to queue `left`; `None` when the connection is gone.
    pub outbound: Option<Arc<Outbound>>,
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
    Connection(Arc<Outbound>),
    /// Hand the outcome to a waiting caller (the HTTP API).
    Caller(oneshot::Sender<Result<u64, BrokerError>>),
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

#[cfg(test)]
mod tests {
    use super::cap_replay;

    #[test]
    fn replays_are_capped_by_bytes_keeping_at_least_one() {
        let frame = |n: usize| "x".repeat(n);
        let mut frames = vec![frame(10), frame(10), frame(10)];
        assert!(cap_replay(&mut frames, 25));
        assert_eq!(frames.len(), 2);
        let mut frames = vec![frame(100), frame(1)];
        assert!(cap_replay(&mut frames, 10));
        assert_eq!(frames.len(), 1, "one frame always goes, however big");
        let mut frames = vec![frame(5), frame(5)];
        assert!(!cap_replay(&mut frames, 10));
        assert_eq!(frames.len(), 2);
    }
}
