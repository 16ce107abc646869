//! Presence: who is in which room, per user rather than per connection. A user with two tabs
//! is one member; the first connection makes the user appear (a `join` event) and the last one
//! to go makes them disappear (a `leave` event).
//!
//! Guarantees every implementation gives: `add` and `remove` are counted per (room, user);
//! `transition` is true exactly once per appearance and once per disappearance.

mod memory;
mod redis;

pub use self::redis::RedisPresence;
pub use memory::MemoryPresence;

use std::sync::Arc;

use async_trait::async_trait;

/// The effect of one `add` or `remove`.
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

/// Per-user presence in rooms.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// One more connection of `user` in `room`.
    async fn add(&self, room: &str, user: &Arc<str>) -> Result<PresenceChange, PresenceError>;
    /// One connection of `user` fewer in `room`.
    async fn remove(&self, room: &str, user: &str) -> Result<PresenceChange, PresenceError>;
    /// The people in `room`, sorted.
    async fn users(&self, room: &str) -> Result<Vec<Arc<str>>, PresenceError>;
    /// Every room with people in it and how many (people, not connections), sorted by room.
    async fn rooms(&self) -> Result<Vec<(Arc<str>, usize)>, PresenceError>;
}
