//! Presence: who is in which room, per user rather than per connection. A user with two tabs
//! is one member; the first connection makes the user appear (a `join` event) and the last one
//! to go makes them disappear (a `leave` event).
//!
//! Presence changes where the join or leave event is decided, so each mode has its own write
//! side: on one node the sequencer calls [`MemoryPresence::add`]/[`MemoryPresence::remove`]; in
//! a cluster the broker's `join`/`leave` scripts change the Redis counts in the same atomic step
//! as the event. What varies behind one interface is the read side, [`Presence`], which the
//! HTTP API asks. The cluster's node liveness (heartbeats, reaping dead nodes' entries) is in
//! [`nodes`].

mod memory;
pub mod nodes;
mod redis;

pub use self::redis::RedisPresence;
pub use memory::MemoryPresence;

use std::sync::Arc;

use async_trait::async_trait;

/// The effect of one [`MemoryPresence::add`] or [`MemoryPresence::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceChange {
    /// For `add`: this was the user's first connection in the room. For `remove`: the last.
    pub transition: bool,
    /// People in the room after the change.
    pub users: usize,
}

/// Failure of a presence backend that lives outside the process.
#[derive(Debug, thiserror::Error)]
#[error("presence unavailable: {0}")]
pub struct PresenceError(pub String);

/// Who is in which room, per user: the read side (the HTTP API's).
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The people in `room`, sorted.
    async fn users(&self, room: &str) -> Result<Vec<Arc<str>>, PresenceError>;
    /// Every room with people in it and how many (people, not connections), sorted by room.
    async fn rooms(&self) -> Result<Vec<(Arc<str>, usize)>, PresenceError>;
}
