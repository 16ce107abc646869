//! What the deliverer needs from the durable log, whichever stores it: which rooms have events
//! past their webhook cursor, a slice of a room's log after the cursor, and the cursor itself.
//! [`super::sqlite`] implements it over the single node's SQLite file, [`super::redis`] over the
//! cluster's Redis streams (with a lease per room, so one node at a time delivers a room).

use async_trait::async_trait;

/// A room's webhook cursor: the last event delivered (or skipped by the `webhooks.events`
/// filter, or reported in a gap), as `(epoch, seq)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The epoch of the log the seq belongs to.
    pub epoch: String,
    /// Every event up to this seq is done.
    pub seq: u64,
}

/// One stored event, as members received it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its seq.
    pub seq: u64,
    /// The epoch it was stored under (in a cluster a room's epoch may change between events).
    pub epoch: String,
    /// The encoded frame, byte for byte what members received.
    pub frame: String,
}

/// A read of a room's log past its cursor.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    /// The room's current epoch.
    pub epoch: String,
    /// The room's latest seq.
    pub head: u64,
    /// The seq the entries were read after: the cursor's, or 0 when the room's log restarted
    /// (a new epoch whose seqs start again from 1).
    pub after: u64,
    /// Up to `webhooks.batch_max` retained events after `after`, in seq order.
    pub entries: Vec<Entry>,
}

/// Rooms with events past their cursor, and how far behind the slowest is.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Rooms (matching `webhooks.rooms`) with something to deliver.
    pub pending: Vec<String>,
    /// The most undelivered events of any room (by seq).
    pub lag_events: u64,
    /// The age of the oldest undelivered event, in seconds.
    pub lag_seconds: f64,
}

/// A failed log operation (the deliverer retries it later).
#[derive(Debug, thiserror::Error)]
#[error("webhook log: {0}")]
pub struct LogError(pub String);

/// Which rooms' events are sent (`webhooks.rooms`).
pub type Wanted<'a> = dyn for<'r> Fn(&'r str) -> bool + Send + Sync + 'a;

/// The durable log as the deliverer sees it.
#[async_trait]
pub trait HookLog: Send + Sync + 'static {
    /// Rooms whose log has events (or a new epoch) past their cursor; `wanted` filters names.
    async fn scan(&self, wanted: &Wanted<'_>) -> Result<Scan, LogError>;

    /// Takes or renews this node's right to deliver `room` (always granted on one node).
    async fn claim(&self, room: &str) -> Result<bool, LogError>;

    /// Gives the right to deliver `room` back, so another node may take it at once.
    async fn release(&self, room: &str);

    /// The room's cursor; `None` before its first delivery.
    async fn cursor(&self, room: &str) -> Result<Option<Cursor>, LogError>;

    /// Up to `limit` events of `room` after `cursor` (see [`Slice::after`]).
    async fn read(
        &self,
        room: &str,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Slice, LogError>;

    /// Moves the cursor to `to`, if this node still holds the room. Whether it did.
    async fn advance(&self, room: &str, to: &Cursor) -> Result<bool, LogError>;
}
