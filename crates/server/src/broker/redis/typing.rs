//! Typing notices to the other nodes: one long-lived task per shard PUBLISHes them in arrival
//! order from a small bounded queue. Typing is ephemeral, so a notice that finds the queue full
//! (Redis slow or away) is dropped rather than held or given a task of its own.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::Inner;
use crate::cluster::keys;

/// Notices waiting per shard; past this they are dropped.
pub(super) const QUEUE: usize = 64;

/// Queues a typing notice for the other nodes; drops it when the shard's queue is full.
pub(super) fn relay(inner: &Inner, room: &str, frame: &Utf8Bytes) {
    let index = inner.shards.index_of(room);
    if inner.typing[index]
        .try_send((Arc::from(room), frame.clone()))
        .is_err()
    {
        debug!(room, "typing notice dropped: the shard's queue is full");
    }
}

/// The typing task of shard `shard`.
pub(super) async fn run(
    inner: Arc<Inner>,
    shard: usize,
    mut rx: mpsc::Receiver<(Arc<str>, Utf8Bytes)>,
) {
    let mut conn = inner.shards.shards[shard].conn.clone();
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = inner.stop.cancelled() => None,
        };
        let Some((room, frame)) = next else { return };
        let payload = format!("T {} {}", inner.parts.node, frame.as_str());
        let _: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(keys::channel(&room))
            .arg(payload)
            .query_async(&mut conn)
            .await;
    }
}
