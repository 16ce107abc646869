//! One pub/sub connection per shard: subscribes to the channels of rooms with local members,
//! hands each event to its room actor and each typing notice from another node to the hub, and
//! reconnects with backoff when the connection drops (resubscribing, and telling every room to
//! resynchronise from its stream, since anything may have been published meanwhile).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::room::{Event, RoomEvent};
use super::Inner;
use crate::cluster::{self, keys};
use crate::faults::Faults;
use crate::hub::ConnId;

/// Reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What a room actor asks of its shard's subscriber.
pub(super) enum SubCmd {
    /// Subscribe to the room's channel; answered once Redis confirmed.
    Subscribe(Arc<str>, oneshot::Sender<Result<(), String>>),
    Unsubscribe(Arc<str>),
}

/// The subscriber task of shard `shard`.
pub(super) async fn run(
    inner: Arc<Inner>,
    shard: usize,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let mut wanted: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = BACKOFF_MIN;
    let client = inner.shards.shards[shard].client.clone();
    let set_down = |why: Option<String>| {
        *inner.sub_down[shard].lock().expect("status lock") = why;
    };
    'outer: loop {
        let connected = tokio::select! {
            r = tokio::time::timeout(cluster::CONNECT_TIMEOUT, client.get_async_pubsub()) => r,
            _ = inner.stop.cancelled() => break,
        };
        let pubsub = match connected {
            Ok(Ok(pubsub)) => Some(pubsub),
            Ok(Err(e)) => {
                set_down(Some(cluster::reason(&e)));
                None
            }
            Err(_) => {
                set_down(Some("timed out".to_owned()));
                None
            }
        };
        let Some(pubsub) = pubsub else {
            // Refuse subscriptions while down, then retry.
            let until = tokio::time::sleep(backoff);
            tokio::pin!(until);
            loop {
                tokio::select! {
                    _ = &mut until => break,
                    _ = inner.stop.cancelled() => break 'outer,
                    cmd = cmds.recv() => match cmd {
                        None => break 'outer,
                        Some(SubCmd::Subscribe(_, done)) => {
                            let _ = done.send(Err("pub/sub connection is down".to_owned()));
                        }
                        Some(SubCmd::Unsubscribe(room)) => {
                            wanted.remove(&room);
                        }
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        };
        while Faults::on(&inner.parts.faults.hold_resubscribe) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = inner.stop.cancelled() => break 'outer,
            }
        }
        let (mut sink, mut stream) = pubsub.split();
        if !wanted.is_empty() {
            let channels: Vec<String> = wanted.iter().map(|r| keys::channel(r)).collect();
            let done = tokio::time::timeout(cluster::RESPONSE_TIMEOUT, sink.subscribe(&channels));
            if !matches!(done.await, Ok(Ok(()))) {
                set_down(Some("resubscribe failed".to_owned()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            info!(shard, rooms = wanted.len(), "redis pub/sub reconnected");
        }
        // Whatever was published while the connection was away is in the streams. (The rooms
        // are told before the shard counts as up again.)
        for room in &wanted {
            inner.event(room, RoomEvent::Resync);
        }
        set_down(None);
        backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                _ = inner.stop.cancelled() => break 'outer,
                cmd = cmds.recv() => match cmd {
                    None => break 'outer,
                    Some(SubCmd::Subscribe(room, done)) => {
                        let r = tokio::time::timeout(
                            cluster::RESPONSE_TIMEOUT,
                            sink.subscribe(keys::channel(&room)),
                        )
                        .await;
                        if matches!(r, Ok(Ok(()))) {
                            wanted.insert(room);
                            let _ = done.send(Ok(()));
                        } else {
                            let _ = done.send(Err("subscribe failed".to_owned()));
                            set_down(Some("connection lost".to_owned()));
                            break;
                        }
                    }
                    Some(SubCmd::Unsubscribe(room)) => {
                        wanted.remove(&room);
                        let _ = tokio::time::timeout(
                            cluster::RESPONSE_TIMEOUT,
                            sink.unsubscribe(keys::channel(&room)),
                        )
                        .await;
                    }
                },
                msg = stream.next() => match msg {
                    None => {
                        set_down(Some("connection lost".to_owned()));
                        warn!(shard, "redis pub/sub connection lost; reconnecting");
                        break;
                    }
                    Some(msg) => {
                        if Faults::take(&inner.parts.faults.panic_subscriber) {
                            panic!("fault injected: a subscriber");
                        }
                        let Some(room) = keys::room_of_channel(msg.get_channel_name()) else {
                            continue;
                        };
                        if let Some(rest) = msg.get_payload_bytes().strip_prefix(b"T ") {
                            relay_typing(&inner, room, rest);
                            continue;
                        }
                        match parse_event(msg.get_payload_bytes()) {
                            Some(event) => inner.event(room, RoomEvent::Event(event)),
                            None => warn!(room, "malformed pub/sub payload"),
                        }
                    }
                },
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A typing notice from another node: `<node> <frame>`; this node's own are already local.
fn relay_typing(inner: &Inner, room: &str, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let Some((node, frame)) = text.split_once(' ') else {
        return;
    };
    if node != inner.parts.node {
        let frame = Utf8Bytes::from(frame.to_owned());
        inner.parts.hub.broadcast_except(room, ConnId::MAX, &frame);
    }
}

/// `"<seq> <epoch> <frame>"`.
fn parse_event(payload: &[u8]) -> Option<Event> {
    let text = std::str::from_utf8(payload).ok()?;
    let (seq, rest) = text.split_once(' ')?;
    let (epoch, frame) = rest.split_once(' ')?;
    Some(Event {
        seq: seq.parse().ok()?,
        epoch: epoch.to_owned(),
        frame: Utf8Bytes::from(frame.to_owned()),
    })
}
