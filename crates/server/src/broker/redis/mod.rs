//! The cluster broker: every node sequences through Redis and delivers what Redis publishes.
//!
//! - **One ordered path per room.** Every request on a room (join, leave, publish, presence
//!   repair) goes to the room's actor on this node (`room.rs`), which runs them in arrival
//!   order; consecutive publishes go as one run to the shard's message writer (`writer.rs`),
//!   which sends the runs of all rooms together in one script call (a group commit). So a
//!   `send` followed by a `leave` on one connection is sequenced first and acked first.
//! - **Sequencing.** The Lua scripts ([`crate::cluster::script`]) do the de-duplication check,
//!   create the room's epoch when missing, INCR the seq, build the frame from a node-computed
//!   prefix and suffix around the seq (so the stored frame is the delivered frame), XADD it to
//!   the room's capped stream, record the client id and PUBLISH `"<seq> <epoch> <frame>"`. The
//!   ack is queued after the script returns: nothing is acked that Redis did not store.
//! - **Delivery.** Every event, this node's own included, reaches members through pub/sub
//!   (`subscriber.rs`). A node subscribes to a room's channel only while it has local members
//!   there. The room actor feeds the hub, which owns the room's local members and the next seq
//!   they expect, strictly by seq; gaps are filled from the stream, and when they cannot be
//!   the local members are closed with 4009 so they resume with `since`.
//! - **Typing** goes out through one task per shard (`typing.rs`), dropped when it lags.
//! - **Node liveness** (heartbeat, reaping dead nodes) is presence's:
//!   [`crate::presence::nodes`]; it asks the room actors here to repair this node's entries.

mod room;
mod subscriber;
mod typing;
mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::log::{Page, PageQuery, StoredRoom};
use super::{Broker, BrokerError, JoinRequest, LeaveRequest, PublishReply, PublishRequest};
use crate::cluster::script::{self, Sweep, Trim};
use crate::cluster::{self, keys, Shards};
use crate::config::HistoryConfig;
use crate::faults::{Faults, Health};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::presence::nodes::Nodes;
use room::{RoomCmd, RoomEvent, RoomHandle};
use subscriber::SubCmd;

/// Publishes waiting per shard before callers wait.
const QUEUE_DEPTH: usize = 65_536;

/// What the broker needs besides Redis.
pub struct RedisParts {
    /// Fan-out target, and the owner of each room's local members.
    pub hub: Arc<Hub>,
    /// `presence.announce_max`.
    pub announce_max: usize,
    /// Retention and replay sizes.
    pub history: HistoryConfig,
    /// Each room's policy: its retention, announcements and member list.
    pub policies: Arc<Policies>,
    /// This node's id in presence keys.
    pub node: String,
    /// `presence.ttl_ms`: the node's heartbeat key lives this long unless refreshed.
    pub presence_ttl: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Told when a room actor, a subscriber or the heartbeat dies (the node stops serving).
    pub health: Arc<Health>,
    /// Test-only fault switches.
    pub faults: Arc<Faults>,
}

/// The cluster broker.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

/// What the broker's tasks share.
struct Inner {
    shards: Arc<Shards>,
    parts: RedisParts,
    nodes: Arc<Nodes>,
    rooms: Mutex<HashMap<Arc<str>, RoomHandle>>,
    subscribers: Vec<mpsc::UnboundedSender<SubCmd>>,
    /// Per shard: the message writer (`writer.rs`), which sends the rooms' runs of messages
    /// to Redis together.
    writers: Vec<mpsc::UnboundedSender<writer::Run>>,
    /// Per shard: room for this many publishes still waiting for Redis (backpressure).
    publish_slots: Vec<Arc<Semaphore>>,
    typing: Vec<mpsc::Sender<(Arc<str>, Utf8Bytes)>>,
    /// Per shard: why its subscriber connection is down, if it is.
    sub_down: Vec<Mutex<Option<String>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

/// A script's outcome as the broker reports it.
fn script_outcome<T>(result: redis::RedisResult<Result<T, String>>) -> Result<T, BrokerError> {
    match result {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(cluster::reason(&e))),
    }
}

impl RedisBroker {
    /// Starts the per-shard subscriber and typing tasks and the heartbeat on the current
    /// runtime.
    pub fn start(shards: Arc<Shards>, parts: RedisParts) -> RedisBroker {
        let n = shards.shards.len();
        let mut sub_rx = Vec::with_capacity(n);
        let mut subscribers = Vec::with_capacity(n);
        let mut typing_rx = Vec::with_capacity(n);
        let mut typing = Vec::with_capacity(n);
        let mut writer_rx = Vec::with_capacity(n);
        let mut writers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            writers.push(tx);
            writer_rx.push(rx);
            let (tx, rx) = mpsc::unbounded_channel();
            subscribers.push(tx);
            sub_rx.push(rx);
            let (tx, rx) = mpsc::channel(typing::QUEUE);
            typing.push(tx);
            typing_rx.push(rx);
        }
        let nodes = Arc::new(Nodes::new(
            shards.clone(),
            parts.node.clone(),
            parts.presence_ttl,
            parts.announce_max,
            parts.policies.clone(),
            parts.faults.clone(),
        ));
        let inner = Arc::new(Inner {
            shards,
            parts,
            nodes: nodes.clone(),
            rooms: Mutex::new(HashMap::new()),
            subscribers,
            writers,
            publish_slots: (0..n)
                .map(|_| Arc::new(Semaphore::new(QUEUE_DEPTH)))
                .collect(),
            typing,
            sub_down: (0..n)
                .map(|_| Mutex::new(Some("connecting".to_owned())))
                .collect(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let health = &inner.parts.health;
        for (index, rx) in sub_rx.into_iter().enumerate() {
            inner.tasks.spawn(health.clone().guard(
                format!("the pub/sub subscriber of shard {}", index + 1),
                subscriber::run(inner.clone(), index, rx),
            ));
        }
        for (index, rx) in writer_rx.into_iter().enumerate() {
            inner.tasks.spawn(health.clone().guard(
                format!("the message writer of shard {}", index + 1),
                writer::run(inner.clone(), index, rx),
            ));
        }
        for (index, rx) in typing_rx.into_iter().enumerate() {
            inner.tasks.spawn(health.clone().guard(
                format!("the typing relay of shard {}", index + 1),
                typing::run(inner.clone(), index, rx),
            ));
        }
        for index in 0..n {
            inner.tasks.spawn(sweeper(inner.clone(), index));
        }
        let repairer = inner.clone();
        inner.tasks.spawn(health.clone().guard(
            "the heartbeat".into(),
            nodes.run(
                move |shard| Inner::reconcile(repairer.clone(), shard),
                inner.stop.clone(),
            ),
        ));
        RedisBroker { inner }
    }
}

/// Forgets empty rooms on one shard: every [`sweep_every`](super::log::sweep_every) of
/// `history.empty_room_ttl_s`, one pass of `lua/sweep.lua` over the shard's room set. Every
/// node runs one per shard; the script is idempotent, so passes may overlap.
async fn sweeper(inner: Arc<Inner>, shard: usize) {
    let ttl_s = inner.parts.history.empty_room_ttl_s;
    let mut tick = tokio::time::interval(super::log::sweep_every(Duration::from_secs(ttl_s)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inner.sweep(shard, ttl_s).await {
            Ok(0) => {}
            Ok(forgotten) => tracing::debug!(shard, forgotten, "empty rooms forgotten"),
            Err(e) => tracing::debug!(shard, error = %cluster::reason(&e), "sweep failed"),
        }
    }
}

impl Inner {
    /// One sweep pass over a shard's rooms (SSCAN, then the script on each page of them);
    /// returns how many rooms were forgotten.
    async fn sweep(&self, shard: usize, empty_ttl_s: u64) -> redis::RedisResult<usize> {
        let shard = &self.shards.shards[shard];
        let mut scan = shard.conn.clone();
        let mut cursor: u64 = 0;
        let mut forgotten = 0;
        loop {
            let (next, rooms): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(keys::ROOMS)
                .arg(cursor)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut scan)
                .await?;
            // A room with people is kept, and the script would only find that out: one
            // pipeline of EXISTS leaves those out (the script checks again, atomically, for the
            // rest). With thousands of busy rooms, a script call per room and pass cost Redis
            // more than the messages of some of them.
            let mut exists = redis::pipe();
            for room in &rooms {
                exists.cmd("EXISTS").arg(keys::users(room));
            }
            let occupied: Vec<bool> = if rooms.is_empty() {
                Vec::new()
            } else {
                exists.query_async(&mut scan).await?
            };
            let ops: Vec<Sweep<'_>> = rooms
                .iter()
                .zip(&occupied)
                .filter(|(_, occupied)| !**occupied)
                .map(|(room, _)| Sweep {
                    room,
                    node: &self.parts.node,
                    empty_ttl_s,
                })
                .collect();
            if !ops.is_empty() {
                let refs: Vec<&Sweep<'_>> = ops.iter().collect();
                let replies = script::run_batch(shard, &refs).await?;
                forgotten += replies.into_iter().filter(|r| r == &Ok(true)).count();
            }
            cursor = next;
            if cursor == 0 {
                return Ok(forgotten);
            }
        }
    }

    /// Hands a command to the room's actor, starting one when the room has none.
    fn room_cmd(inner: &Arc<Inner>, room: &Arc<str>, cmd: RoomCmd) {
        let mut rooms = inner.rooms.lock().expect("rooms lock");
        let handle = match rooms.get(room) {
            Some(handle) => handle.clone(),
            None => {
                let handle = room::spawn(inner.clone(), room.clone());
                rooms.insert(room.clone(), handle.clone());
                handle
            }
        };
        // The actor removes itself from the map only under this lock and after finding its
        // queue empty, so a command sent here is always received.
        let _ = handle.cmds.send(cmd);
    }

    /// Hands a pub/sub event to the room's actor, if the room has one.
    fn event(&self, room: &str, event: RoomEvent) {
        let rooms = self.rooms.lock().expect("rooms lock");
        if let Some(handle) = rooms.get(room) {
            let _ = handle.events.send(event);
        }
    }

    /// Rewrites this node's presence entries on one shard from its local members: every room
    /// where Redis has entries of this node, and every room where it has local members, is
    /// reconciled by its room actor (serialised with the room's joins and leaves).
    async fn reconcile(inner: Arc<Inner>, shard: usize) -> Result<(), BrokerError> {
        let mut conn = inner.shards.shards[shard].conn.clone();
        let stored: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::node_rooms(&inner.parts.node))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(cluster::reason(&e)))?;
        let mut rooms: HashSet<Arc<str>> = stored.into_iter().map(Arc::from).collect();
        rooms.extend(
            inner
                .rooms
                .lock()
                .expect("rooms lock")
                .keys()
                .filter(|room| inner.shards.index_of(room) == shard)
                .cloned(),
        );
        let mut waiting = Vec::with_capacity(rooms.len());
        for room in &rooms {
            let (tx, rx) = oneshot::channel();
            Inner::room_cmd(&inner, room, RoomCmd::Reconcile(tx));
            waiting.push(rx);
        }
        let mut result = Ok(());
        for rx in waiting {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(BrokerError::Closed),
            }
        }
        result
    }
}

/// A publish on its way through the room actor, holding its shard's queue slot.
pub(super) struct Publish {
    request: PublishRequest,
    reply: PublishReply,
    _slot: OwnedSemaphorePermit,
}

#[async_trait]
impl Broker for RedisBroker {
    async fn join(&self, request: JoinRequest) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        let room = request.room.clone();
        Inner::room_cmd(&self.inner, &room, RoomCmd::Join(request, tx));
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    async fn leave(&self, request: LeaveRequest) -> Result<(), BrokerError> {
        let room = request.room.clone();
        if request.outbound.is_none() {
            Inner::room_cmd(&self.inner, &room, RoomCmd::Leave(request, None));
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        Inner::room_cmd(&self.inner, &room, RoomCmd::Leave(request, Some(tx)));
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    async fn publish(
        &self,
        request: PublishRequest,
        reply: PublishReply,
    ) -> Result<(), BrokerError> {
        let index = self.inner.shards.index_of(&request.room);
        let slot = self.inner.publish_slots[index]
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BrokerError::Closed)?;
        if self.inner.stop.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        let room = request.room.clone();
        let publish = Publish {
            request,
            reply,
            _slot: slot,
        };
        Inner::room_cmd(&self.inner, &room, RoomCmd::Publish(publish));
        Ok(())
    }

    async fn history(&self, room: &str, query: PageQuery) -> Result<Page, BrokerError> {
        if query.before == Some(0) {
            // Nothing is below seq 1 (and `(0-0` is no valid exclusive bound).
            return Ok(Page::default());
        }
        let shard = self.inner.shards.for_room(room);
        let ttl_s = self.inner.parts.policies.for_room(room).history_ttl_s;
        if ttl_s > 0 {
            // Events older than the room's history_ttl_s are gone for readers too, however idle the room.
            let trim = Trim {
                room,
                node: &self.inner.parts.node,
                ttl_s,
            };
            script_outcome(script::run(shard, &trim).await)?;
        }
        let mut conn = shard.conn.clone();
        let log = keys::log(room);
        let take = query.limit as usize + 1;
        // Stream ids are `<seq>-0`; clamp client bounds so the ids stay valid.
        let clamp = |s: u64| s.min(i64::MAX as u64);
        let end = match query.before {
            Some(b) => format!("({}-0", clamp(b)),
            None => "+".to_owned(),
        };
        let (got, descending) = match query.after {
            Some(after) => {
                let start = format!("({}-0", clamp(after));
                let got = redis::cmd("XRANGE")
                    .arg(&log)
                    .arg(start)
                    .arg(end)
                    .arg("COUNT")
                    .arg(take)
                    .query_async(&mut conn)
                    .await;
                (got, false)
            }
            None => {
                let got = redis::cmd("XREVRANGE")
                    .arg(&log)
                    .arg(end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(take)
                    .query_async(&mut conn)
                    .await;
                (got, true)
            }
        };
        let entries: Entries = got.map_err(unavailable)?;
        let mut frames: Vec<String> = entries.into_iter().filter_map(|(_, f)| field(f)).collect();
        let more = frames.len() > query.limit as usize;
        frames.truncate(query.limit as usize);
        if descending {
            frames.reverse();
        }
        Ok(Page { frames, more })
    }

    async fn rooms(&self) -> Result<Vec<StoredRoom>, BrokerError> {
        let mut out = Vec::new();
        for shard in &self.inner.shards.shards {
            let mut conn = shard.conn.clone();
            let names: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys::ROOMS)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if names.is_empty() {
                continue;
            }
            let seq_keys: Vec<String> = names.iter().map(|r| keys::seq(r)).collect();
            let seqs: Vec<Option<u64>> = redis::cmd("MGET")
                .arg(&seq_keys)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for (room, seq) in names.into_iter().zip(seqs) {
                out.push(StoredRoom {
                    room,
                    seq: seq.unwrap_or(0),
                });
            }
        }
        out.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(out)
    }

    async fn check(&self) -> Result<(), String> {
        for (index, shard) in self.inner.shards.shards.iter().enumerate() {
            let mut conn = shard.conn.clone();
            let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
            if let Err(e) = ping {
                return Err(shard_reason(&self.inner.shards, index, cluster::reason(&e)));
            }
            if let Some(why) = self.inner.sub_down[index]
                .lock()
                .expect("status lock")
                .clone()
            {
                return Err(shard_reason(
                    &self.inner.shards,
                    index,
                    format!("pub/sub {why}"),
                ));
            }
        }
        Ok(())
    }

    fn check_name(&self) -> &'static str {
        "redis"
    }

    fn typing(&self, room: &str, frame: &Utf8Bytes) {
        typing::relay(&self.inner, room, frame);
    }

    async fn close(&self) {
        // Sessions have left their rooms by now; let the actors finish, then stop the tasks.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.inner.rooms.lock().expect("rooms lock").is_empty() && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.stop.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await;
    }
}

fn shard_reason(shards: &Shards, index: usize, reason: String) -> String {
    if shards.shards.len() > 1 {
        format!("shard {}: {reason}", index + 1)
    } else {
        reason
    }
}

/// Stream entries as XRANGE returns them.
type Entries = Vec<(String, Vec<(String, String)>)>;

/// The frame field of a stream entry.
fn field(fields: Vec<(String, String)>) -> Option<String> {
    fields.into_iter().find(|(k, _)| k == "f").map(|(_, v)| v)
}

fn entry_seq(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}
