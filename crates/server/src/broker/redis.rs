//! The cluster broker: every node sequences through Redis and delivers what Redis publishes.
//!
//! - **Sequencing.** One Lua script ([`crate::cluster::SCRIPT`]) per event does the
//!   de-duplication check, creates the room's epoch when missing, INCRs the seq, builds the
//!   frame from a node-computed prefix and suffix around the seq (so the stored frame is the
//!   delivered frame), XADDs it to the room's capped stream, records the client id and
//!   PUBLISHes `"<seq> <epoch> <frame>"`. The ack is queued after the script returns: nothing
//!   is acked that Redis did not store. Sends are batched per shard in one pipeline (a group
//!   commit, in arrival order, so one connection's messages keep their order).
//! - **Delivery.** Every event, this node's own included, reaches members through pub/sub. A
//!   node subscribes to a room's channel only while it has local members there. Each room with
//!   local members has a task (its "room actor") that delivers strictly by seq: an event that
//!   skips ahead makes it XRANGE the missing seqs from the stream first, and when it cannot
//!   (trimmed, another epoch, Redis away) it closes the room's local members with 4009 so they
//!   resume with `since`. A subscriber connection that drops is reconnected with backoff, its
//!   rooms resubscribed and each room resynchronised from the stream.
//! - **Joins and leaves** go through the room actor: subscribe first, then the script (presence,
//!   the join event, head and history in one atomic step), then catch the local members up to
//!   that head, then queue `joined` and register the member, so it receives exactly the seqs
//!   after `joined.seq`. A leave catches up to just before its own leave event, then removes
//!   the member and queues `left`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use parley_protocol::server::{json_array, ServerFrame};
use parley_protocol::CloseCode;
use redis::{FromRedisValue, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::log::{cap_replay, Page, PageQuery, StoredRoom};
use super::{Broker, BrokerError, JoinRequest, LeaveRequest, Posted, PublishReply, PublishRequest};
use crate::cluster::{self, room_key, room_of_channel, split_frame, Shards};
use crate::config::HistoryConfig;
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;
use crate::outbound::{Batch, Outbound};

/// Most sends one pipeline carries.
const MAX_BATCH: usize = 256;
/// Sends waiting per shard before callers wait.
const QUEUE_DEPTH: usize = 65_536;
/// How long a room actor waits for pub/sub to bring an event it knows exists before it reads
/// the stream instead.
const CATCH_UP_WAIT: Duration = Duration::from_millis(200);
/// How soon the heartbeat retries a presence repair that could not run yet.
const REPAIR_RETRY: Duration = Duration::from_millis(250);
/// Reconnect backoff of a subscriber connection.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What the broker needs besides Redis.
pub struct RedisParts {
    /// Fan-out target.
    pub hub: Arc<Hub>,
    /// `presence.announce_max`.
    pub announce_max: usize,
    /// Retention and replay sizes.
    pub history: HistoryConfig,
    /// This node's id in presence keys.
    pub node: String,
    /// `presence.ttl_ms`: the node's heartbeat key lives this long unless refreshed.
    pub presence_ttl: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The cluster broker.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Arc<Shards>,
    parts: RedisParts,
    script: redis::Script,
    rooms: Mutex<HashMap<Arc<str>, RoomHandle>>,
    subscribers: Vec<mpsc::UnboundedSender<SubCmd>>,
    publishers: Vec<mpsc::Sender<Publish>>,
    /// Per shard: why its subscriber connection is down, if it is.
    sub_down: Vec<Mutex<Option<String>>>,
    /// Per shard: a presence change may have been lost (a join or leave script failed, or the
    /// heartbeat did, so survivors may have reaped this node): rewrite this node's presence
    /// entries from its local members once Redis answers again.
    dirty: Vec<AtomicBool>,
    /// Wakes the heartbeat task early when a shard becomes dirty.
    repair: Notify,
    stop: CancellationToken,
    tasks: TaskTracker,
}

struct Publish {
    request: PublishRequest,
    reply: PublishReply,
}

#[derive(Clone)]
struct RoomHandle {
    cmds: mpsc::UnboundedSender<RoomCmd>,
    events: mpsc::UnboundedSender<RoomEvent>,
}

enum RoomCmd {
    Join(JoinRequest, oneshot::Sender<Result<(), BrokerError>>),
    Leave(
        LeaveRequest,
        Option<oneshot::Sender<Result<(), BrokerError>>>,
    ),
    /// Make this node's presence entries of the room match its local members.
    Reconcile(oneshot::Sender<Result<(), BrokerError>>),
}

/// A local member of a room.
struct Member {
    user: Arc<str>,
    outbound: Arc<Outbound>,
}

enum RoomEvent {
    /// An event from pub/sub.
    Event(Event),
    /// The subscriber reconnected: anything may have been missed.
    Resync,
}

struct Event {
    seq: u64,
    epoch: String,
    frame: Utf8Bytes,
}

enum SubCmd {
    Subscribe(Arc<str>, oneshot::Sender<Result<(), String>>),
    Unsubscribe(Arc<str>),
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

impl RedisBroker {
    /// Starts the per-shard subscriber and publisher tasks on the current runtime.
    pub fn start(shards: Arc<Shards>, parts: RedisParts) -> RedisBroker {
        let n = shards.shards.len();
        let mut sub_rx = Vec::with_capacity(n);
        let mut pub_rx = Vec::with_capacity(n);
        let mut subscribers = Vec::with_capacity(n);
        let mut publishers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            subscribers.push(tx);
            sub_rx.push(rx);
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            publishers.push(tx);
            pub_rx.push(rx);
        }
        let inner = Arc::new(Inner {
            shards,
            parts,
            script: redis::Script::new(cluster::SCRIPT),
            rooms: Mutex::new(HashMap::new()),
            subscribers,
            publishers,
            sub_down: (0..n)
                .map(|_| Mutex::new(Some("connecting".to_owned())))
                .collect(),
            dirty: (0..n).map(|_| AtomicBool::new(false)).collect(),
            repair: Notify::new(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        for (index, rx) in sub_rx.into_iter().enumerate() {
            inner.tasks.spawn(subscriber(inner.clone(), index, rx));
        }
        for (index, rx) in pub_rx.into_iter().enumerate() {
            inner.tasks.spawn(publisher(inner.clone(), index, rx));
        }
        inner.tasks.spawn(heartbeat(inner.clone()));
        RedisBroker { inner }
    }

    fn room_cmd(&self, room: &Arc<str>, cmd: RoomCmd) {
        Inner::room_cmd(&self.inner, room, cmd);
    }
}

impl Inner {
    /// Hands a command to the room's actor, starting one when the room has none.
    fn room_cmd(inner: &Arc<Inner>, room: &Arc<str>, cmd: RoomCmd) {
        let mut rooms = inner.rooms.lock().expect("rooms lock");
        let handle = match rooms.get(room) {
            Some(handle) => handle.clone(),
            None => {
                let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
                let (ev_tx, ev_rx) = mpsc::unbounded_channel();
                let handle = RoomHandle {
                    cmds: cmd_tx,
                    events: ev_tx,
                };
                rooms.insert(room.clone(), handle.clone());
                let actor = RoomActor {
                    inner: inner.clone(),
                    room: room.clone(),
                    cmds: cmd_rx,
                    events: ev_rx,
                    members: HashMap::new(),
                    next: 0,
                    epoch: String::new(),
                    subscribed: false,
                    writes: Batch::default(),
                };
                inner.tasks.spawn(actor.run());
                handle
            }
        };
        // The actor removes itself from the map only under this lock and after finding its
        // queue empty, so a command sent here is always received.
        let _ = handle.cmds.send(cmd);
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn join(&self, request: JoinRequest) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        let room = request.room.clone();
        self.room_cmd(&room, RoomCmd::Join(request, tx));
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    async fn leave(&self, request: LeaveRequest) -> Result<(), BrokerError> {
        let room = request.room.clone();
        if request.outbound.is_none() {
            self.room_cmd(&room, RoomCmd::Leave(request, None));
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.room_cmd(&room, RoomCmd::Leave(request, Some(tx)));
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    async fn publish(
        &self,
        request: PublishRequest,
        reply: PublishReply,
    ) -> Result<(), BrokerError> {
        let index = self.inner.shards.index_of(&request.room);
        self.inner.publishers[index]
            .send(Publish { request, reply })
            .await
            .map_err(|_| BrokerError::Closed)
    }

    async fn history(&self, room: &str, query: PageQuery) -> Result<Page, BrokerError> {
        if query.before == Some(0) {
            // Nothing is below seq 1 (and `(0-0` is no valid exclusive bound).
            return Ok(Page::default());
        }
        let ttl_s = self.inner.parts.history.ttl_s;
        if ttl_s > 0 {
            // Events older than history.ttl_s are gone for readers too, however idle the room.
            let args = Args::new(room, "trim").arg(ttl_s).0;
            eval_one::<u64>(&self.inner, room, args).await?;
        }
        let mut conn = self.inner.shards.for_room(room).conn.clone();
        let log = format!("{}:log", room_key(room));
        let take = query.limit as usize + 1;
        // Stream ids are `<seq>-0`; clamp client bounds so the ids stay valid.
        let clamp = |s: u64| s.min(i64::MAX as u64);
        let (entries, descending): (Vec<(String, Vec<(String, String)>)>, bool) =
            match (query.before, query.after) {
                (before, Some(after)) => {
                    let end = match before {
                        Some(b) => format!("({}-0", clamp(b)),
                        None => "+".to_owned(),
                    };
                    let start = format!("({}-0", clamp(after));
                    let got = redis::cmd("XRANGE")
                        .arg(&log)
                        .arg(start)
                        .arg(end)
                        .arg("COUNT")
                        .arg(take)
                        .query_async(&mut conn)
                        .await;
                    (range_or_empty(got)?, false)
                }
                (before, None) => {
                    let end = match before {
                        Some(b) => format!("({}-0", clamp(b)),
                        None => "+".to_owned(),
                    };
                    let got = redis::cmd("XREVRANGE")
                        .arg(&log)
                        .arg(end)
                        .arg("-")
                        .arg("COUNT")
                        .arg(take)
                        .query_async(&mut conn)
                        .await;
                    (range_or_empty(got)?, true)
                }
            };
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
                .arg("parley:rooms")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if names.is_empty() {
                continue;
            }
            let keys: Vec<String> = names
                .iter()
                .map(|r| format!("{}:seq", room_key(r)))
                .collect();
            let seqs: Vec<Option<u64>> = redis::cmd("MGET")
                .arg(&keys)
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
        let mut conn = self.inner.shards.for_room(room).conn.clone();
        let channel = room_key(room);
        let payload = format!("T {} {}", self.inner.parts.node, frame.as_str());
        tokio::spawn(async move {
            let _: redis::RedisResult<()> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async(&mut conn)
                .await;
        });
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

type Entries = Vec<(String, Vec<(String, String)>)>;

fn range_or_empty(got: redis::RedisResult<Entries>) -> Result<Entries, BrokerError> {
    got.map_err(unavailable)
}

fn field(fields: Vec<(String, String)>) -> Option<String> {
    fields.into_iter().find(|(k, _)| k == "f").map(|(_, v)| v)
}

fn entry_seq(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// Runs the script once per invocation in one pipeline (EVALSHA; on NOSCRIPT the script is
/// loaded and those invocations retried). One result per invocation, in order.
async fn eval_batch(
    inner: &Inner,
    shard: usize,
    invocations: &[Vec<Vec<u8>>],
) -> Result<Vec<Value>, redis::RedisError> {
    let mut conn = inner.shards.shards[shard].conn.clone();
    let build = |hash: &str| {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for args in invocations {
            pipe.cmd("EVALSHA").arg(hash).arg(1).arg(&args[0]);
            for arg in &args[1..] {
                pipe.arg(arg);
            }
        }
        pipe
    };
    let hash = inner.script.get_hash().to_owned();
    let values: Vec<Value> = build(&hash).query_async(&mut conn).await?;
    let noscript = values
        .iter()
        .any(|v| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT"));
    if !noscript {
        return Ok(values);
    }
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(cluster::SCRIPT)
        .query_async(&mut conn)
        .await?;
    // A NOSCRIPT invocation did nothing, so running it again is safe; the others stand.
    let mut retry = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT") {
            retry.push(i);
        }
    }
    let again: Vec<Vec<Vec<u8>>> = retry.iter().map(|&i| invocations[i].clone()).collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for args in &again {
        pipe.cmd("EVALSHA").arg(&hash).arg(1).arg(&args[0]);
        for arg in &args[1..] {
            pipe.arg(arg);
        }
    }
    let fresh: Vec<Value> = pipe.query_async(&mut conn).await?;
    let mut values = values;
    for (i, v) in retry.into_iter().zip(fresh) {
        values[i] = v;
    }
    Ok(values)
}

async fn eval_one<T: FromRedisValue>(
    inner: &Inner,
    room: &str,
    args: Vec<Vec<u8>>,
) -> Result<T, BrokerError> {
    let shard = inner.shards.index_of(room);
    let mut values = eval_batch(inner, shard, &[args])
        .await
        .map_err(|e| unavailable(cluster::reason(&e)))?;
    let value = values.pop().ok_or_else(|| unavailable("no reply"))?;
    if let Value::ServerError(e) = &value {
        return Err(unavailable(e.details().unwrap_or(e.code())));
    }
    T::from_redis_value(value).map_err(unavailable)
}

/// Builds the invocation: key first, then the arguments.
struct Args(Vec<Vec<u8>>);

impl Args {
    fn new(room: &str, op: &str) -> Args {
        Args(vec![room_key(room).into_bytes(), op.as_bytes().to_vec()])
    }
    fn arg(mut self, value: impl ToString) -> Args {
        self.0.push(value.to_string().into_bytes());
        self
    }
}

fn now_ts() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Prefix and suffix of a `join`/`leave` system event.
fn system_parts(room: &str, user: &str, joined: bool) -> (String, String) {
    let (event, verb) = if joined {
        ("join", "joined")
    } else {
        ("leave", "left")
    };
    let content = format!("{user} {verb} the room");
    let ts = now_ts();
    split_frame(
        &ServerFrame::System {
            room,
            seq: cluster::seq_placeholder(),
            event,
            user,
            content: &content,
            ts: &ts,
        }
        .encode(),
    )
}

async fn publisher(inner: Arc<Inner>, shard: usize, mut rx: mpsc::Receiver<Publish>) {
    let mut batch: Vec<Publish> = Vec::new();
    loop {
        let first = tokio::select! {
            op = rx.recv() => op,
            _ = inner.stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let history = &inner.parts.history;
        let ts = now_ts();
        let invocations: Vec<Vec<Vec<u8>>> = batch
            .iter()
            .map(|op| {
                let r = &op.request;
                let (prefix, suffix) = split_frame(
                    &ServerFrame::Message {
                        room: &r.room,
                        seq: cluster::seq_placeholder(),
                        user: &r.user,
                        name: &r.name,
                        content: &r.content,
                        ts: &ts,
                        id: r.client_id.as_deref(),
                    }
                    .encode(),
                );
                Args::new(&r.room, "msg")
                    .arg(&r.room)
                    .arg(&r.user)
                    .arg(r.client_id.as_deref().unwrap_or(""))
                    .arg(prefix)
                    .arg(suffix)
                    .arg(history.max_len)
                    .arg(history.ttl_s)
                    .arg(cluster::new_epoch())
                    .0
            })
            .collect();
        let started = Instant::now();
        let result = eval_batch(&inner, shard, &invocations).await;
        Metrics::observe(&inner.parts.metrics.store_commit, started.elapsed());
        match result {
            Ok(values) => {
                for (op, value) in batch.drain(..).zip(values) {
                    let outcome = match value {
                        Value::ServerError(e) => {
                            Err(unavailable(e.details().unwrap_or(e.code()).to_owned()))
                        }
                        value => <(u64, String, u8)>::from_redis_value(value)
                            .map(|(seq, _, dup)| Posted {
                                seq,
                                duplicate: dup == 1,
                            })
                            .map_err(unavailable),
                    };
                    answer(&inner, op, outcome);
                }
            }
            Err(e) => {
                warn!(shard, error = %e, "redis send batch failed");
                let err = unavailable(format!(
                    "{}; the message was not stored, retry",
                    cluster::reason(&e)
                ));
                for op in batch.drain(..) {
                    answer(&inner, op, Err(err.clone()));
                }
            }
        }
    }
}

fn answer(inner: &Inner, op: Publish, outcome: Result<Posted, BrokerError>) {
    let Publish { request, reply } = op;
    if outcome.is_ok() {
        Metrics::observe(
            &inner.parts.metrics.send_latency,
            request.received.elapsed(),
        );
    }
    reply.answer(&request, outcome, None);
}

async fn subscriber(inner: Arc<Inner>, shard: usize, mut cmds: mpsc::UnboundedReceiver<SubCmd>) {
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
        let (mut sink, mut stream) = pubsub.split();
        if !wanted.is_empty() {
            let channels: Vec<String> = wanted.iter().map(|r| room_key(r)).collect();
            let done = tokio::time::timeout(cluster::RESPONSE_TIMEOUT, sink.subscribe(&channels));
            if !matches!(done.await, Ok(Ok(()))) {
                set_down(Some("resubscribe failed".to_owned()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            info!(shard, rooms = wanted.len(), "redis pub/sub reconnected");
        }
        set_down(None);
        backoff = BACKOFF_MIN;
        // Whatever was published while the connection was away is in the streams.
        for room in &wanted {
            inner.event(room, RoomEvent::Resync);
        }
        loop {
            tokio::select! {
                _ = inner.stop.cancelled() => break 'outer,
                cmd = cmds.recv() => match cmd {
                    None => break 'outer,
                    Some(SubCmd::Subscribe(room, done)) => {
                        let r = tokio::time::timeout(
                            cluster::RESPONSE_TIMEOUT,
                            sink.subscribe(room_key(&room)),
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
                            sink.unsubscribe(room_key(&room)),
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
                        let Some(room) = room_of_channel(msg.get_channel_name()) else { continue };
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

/// Refreshes this node's heartbeat key on every shard, three times per `presence.ttl_ms`;
/// repairs this node's presence entries on a shard where a change may have been lost (see
/// [`reconcile`]) once that shard answers again; and reaps nodes whose heartbeat expired.
async fn heartbeat(inner: Arc<Inner>) {
    let ttl = inner.parts.presence_ttl;
    let key = format!("parley:node:{}:alive", inner.parts.node);
    // Per shard: since when this node's heartbeats there have succeeded without a break.
    let mut up_since: Vec<Option<Instant>> = vec![None; inner.shards.shards.len()];
    loop {
        for (index, shard) in inner.shards.shards.iter().enumerate() {
            let mut conn = shard.conn.clone();
            let r: redis::RedisResult<()> = redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .ignore()
                .cmd("SADD")
                .arg("parley:nodes")
                .arg(&inner.parts.node)
                .ignore()
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                debug!(shard = shard.index, error = %e, "heartbeat failed");
                up_since[index] = None;
                // If this lasts, survivors reap this node: its entries are rewritten when the
                // shard answers again.
                inner.dirty[index].store(true, Ordering::Release);
                continue;
            }
            let up = *up_since[index].get_or_insert_with(Instant::now);
            if inner.dirty[index].swap(false, Ordering::AcqRel) {
                if let Err(e) = reconcile(&inner, index).await {
                    debug!(shard = shard.index, error = %e, "presence repair failed; retrying");
                    inner.dirty[index].store(true, Ordering::Release);
                }
            }
            // A node can tell a dead peer from one that has not refreshed yet only after it has
            // itself been refreshing for a whole ttl (at start, and after Redis was away, every
            // live node's key may be missing for a moment).
            if up.elapsed() >= ttl {
                if let Err(e) = reap_dead(&inner, index).await {
                    debug!(shard = shard.index, error = %e, "reaping dead nodes failed");
                }
            }
        }
        let pause = if inner.dirty.iter().any(|d| d.load(Ordering::Acquire)) {
            (ttl / 3).min(REPAIR_RETRY)
        } else {
            ttl / 3
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = inner.repair.notified() => {}
            _ = inner.stop.cancelled() => return,
        }
    }
}

/// Rewrites this node's presence entries on one shard from its local members: every room
/// where Redis has entries of this node, and every room where it has local members, is
/// reconciled by its room actor (serialised with the room's joins and leaves).
async fn reconcile(inner: &Arc<Inner>, shard: usize) -> Result<(), BrokerError> {
    let mut conn = inner.shards.shards[shard].conn.clone();
    let stored: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("parley:node:{}:rooms", inner.parts.node))
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
        Inner::room_cmd(inner, room, RoomCmd::Reconcile(tx));
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

/// Finds nodes on a shard whose heartbeat key expired and, under a lock only one survivor
/// gets, removes their presence entries and announces the leaves they leave behind.
async fn reap_dead(inner: &Inner, shard: usize) -> redis::RedisResult<()> {
    let mut conn = inner.shards.shards[shard].conn.clone();
    let nodes: Vec<String> = redis::cmd("SMEMBERS")
        .arg("parley:nodes")
        .query_async(&mut conn)
        .await?;
    for dead in nodes.iter().filter(|n| **n != inner.parts.node) {
        let alive: bool = redis::cmd("EXISTS")
            .arg(format!("parley:node:{dead}:alive"))
            .query_async(&mut conn)
            .await?;
        if alive {
            continue;
        }
        let lock: Option<String> = redis::cmd("SET")
            .arg(format!("parley:node:{dead}:reaper"))
            .arg(&inner.parts.node)
            .arg("NX")
            .arg("PX")
            .arg(inner.parts.presence_ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if lock.is_none() {
            continue;
        }
        let rooms_key = format!("parley:node:{dead}:rooms");
        let rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&rooms_key)
            .query_async(&mut conn)
            .await?;
        for room in &rooms {
            let users: Vec<(String, u64)> = redis::cmd("HGETALL")
                .arg(format!("{}:presence:{dead}", room_key(room)))
                .query_async(&mut conn)
                .await?;
            for (user, count) in users {
                let (prefix, suffix) = system_parts(room, &user, false);
                let args = Args::new(room, "reap")
                    .arg(room)
                    .arg(&user)
                    .arg(dead)
                    .arg(count)
                    .arg(inner.parts.announce_max)
                    .arg(prefix)
                    .arg(suffix)
                    .arg(inner.parts.history.max_len)
                    .arg(inner.parts.history.ttl_s)
                    .0;
                if let Err(e) = eval_one::<u64>(inner, room, args).await {
                    warn!(room, user, error = %e, "reaping a dead node's user failed");
                }
            }
        }
        let remaining: usize = redis::cmd("SCARD")
            .arg(&rooms_key)
            .query_async(&mut conn)
            .await?;
        if remaining == 0 {
            let _: () = redis::pipe()
                .cmd("SREM")
                .arg("parley:nodes")
                .arg(dead)
                .ignore()
                .cmd("DEL")
                .arg(&rooms_key)
                .ignore()
                .query_async(&mut conn)
                .await?;
        }
        info!(node = %dead, rooms = rooms.len(), "reaped a dead node's presence");
    }
    Ok(())
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

impl Inner {
    /// A presence change in `room` may not have reached Redis: repair the room's shard.
    fn presence_dirty(&self, room: &str) {
        self.dirty[self.shards.index_of(room)].store(true, Ordering::Release);
        self.repair.notify_one();
    }

    fn event(&self, room: &str, event: RoomEvent) {
        let rooms = self.rooms.lock().expect("rooms lock");
        if let Some(handle) = rooms.get(room) {
            let _ = handle.events.send(event);
        }
    }
}

/// One room with local members: delivers its events to the hub strictly by seq.
struct RoomActor {
    inner: Arc<Inner>,
    room: Arc<str>,
    cmds: mpsc::UnboundedReceiver<RoomCmd>,
    events: mpsc::UnboundedReceiver<RoomEvent>,
    members: HashMap<ConnId, Member>,
    /// The next seq to deliver; meaningful only while there are members.
    next: u64,
    /// The epoch the members' stream belongs to.
    epoch: String,
    subscribed: bool,
    /// Events delivered but not yet written: everything that arrived together is written to
    /// each member at once.
    writes: Batch,
}

/// What the join script answers.
type JoinReply = (u64, String, u8, usize, Vec<String>, Vec<String>, u8, i8);

impl RoomActor {
    async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                ev = self.events.recv() => match ev {
                    Some(RoomEvent::Event(event)) => {
                        self.on_event(event).await;
                        // Whatever else has arrived goes out with it, one write per member:
                        // the busier the room, the more events per system call.
                        while let Ok(next) = self.events.try_recv() {
                            match next {
                                RoomEvent::Event(event) => self.on_event(event).await,
                                RoomEvent::Resync => {
                                    self.write();
                                    self.resync().await;
                                    break;
                                }
                            }
                        }
                    }
                    Some(RoomEvent::Resync) => self.resync().await,
                    None => break,
                },
                _ = self.inner.stop.cancelled() => break,
            }
            self.write();
            if self.members.is_empty() && self.try_exit() {
                return;
            }
        }
        self.write();
        self.inner
            .rooms
            .lock()
            .expect("rooms lock")
            .remove(&self.room);
    }

    /// Leaves the map if no command is waiting; `false` when one is (go on serving).
    fn try_exit(&mut self) -> bool {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        if !self.cmds.is_empty() {
            return false;
        }
        rooms.remove(&self.room);
        drop(rooms);
        if self.subscribed {
            let index = self.inner.shards.index_of(&self.room);
            let _ = self.inner.subscribers[index].send(SubCmd::Unsubscribe(self.room.clone()));
        }
        true
    }

    async fn command(&mut self, cmd: RoomCmd) {
        match cmd {
            RoomCmd::Join(req, reply) => {
                let result = self.join(req).await;
                let _ = reply.send(result);
            }
            RoomCmd::Leave(req, reply) => {
                self.leave(req).await;
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            RoomCmd::Reconcile(reply) => {
                let result = self.reconcile().await;
                let _ = reply.send(result);
            }
        }
    }

    async fn subscribe(&mut self) -> Result<(), BrokerError> {
        if self.subscribed {
            return Ok(());
        }
        let index = self.inner.shards.index_of(&self.room);
        let (tx, rx) = oneshot::channel();
        self.inner.subscribers[index]
            .send(SubCmd::Subscribe(self.room.clone(), tx))
            .map_err(|_| BrokerError::Closed)?;
        rx.await
            .map_err(|_| BrokerError::Closed)?
            .map_err(unavailable)?;
        self.subscribed = true;
        Ok(())
    }

    async fn join(&mut self, req: JoinRequest) -> Result<(), BrokerError> {
        // Subscribe first: every event after the script's head is then published to us.
        self.subscribe().await?;
        let parts = &self.inner.parts;
        let (prefix, suffix) = system_parts(&req.room, &req.user, true);
        let (since, since_epoch) = match &req.since {
            Some((s, e)) => (s.to_string(), e.clone()),
            None => (String::new(), String::new()),
        };
        let args = Args::new(&req.room, "join")
            .arg(&req.room)
            .arg(&req.user)
            .arg(&parts.node)
            .arg(since)
            .arg(since_epoch)
            .arg(parts.history.on_join)
            .arg(parts.history.max_replay)
            .arg(parts.announce_max)
            .arg(prefix)
            .arg(suffix)
            .arg(parts.history.max_len)
            .arg(parts.history.ttl_s)
            .arg(cluster::new_epoch())
            .arg(parts.presence_ttl.as_millis() as u64)
            .0;
        let reply: Result<JoinReply, BrokerError> = eval_one(&self.inner, &req.room, args).await;
        // The script may have run even though its answer was lost.
        let (head, epoch, _announced, people, users, mut history, truncated, recovered) =
            reply.inspect_err(|_| self.inner.presence_dirty(&self.room))?;
        let truncated = (recovered == 1
            && cap_replay(&mut history, self.inner.parts.history.max_replay_bytes))
            || truncated == 1;
        // Bring the present members to `head` so the joiner starts exactly after it.
        if self.members.is_empty() || epoch != self.epoch {
            if !self.members.is_empty() {
                self.evict("the room's log was replaced");
            }
            self.next = head + 1;
            self.epoch = epoch;
        } else if !self.catch_up(head).await {
            self.evict("missed events could not be recovered");
            self.next = head + 1;
        }
        let users = (people <= self.inner.parts.announce_max).then(|| {
            let mut users = users;
            users.sort();
            users
        });
        let names: Option<Vec<&str>> = users.as_ref().map(|u| u.iter().map(|s| &**s).collect());
        let array = json_array(history.iter().map(String::as_str));
        let frame = ServerFrame::Joined {
            room: &req.room,
            seq: head,
            epoch: &self.epoch,
            users: names.as_deref(),
            user_count: people,
            history: &array,
            truncated,
            recovered: match recovered {
                -1 => None,
                r => Some(r == 1),
            },
            id: req.request_id.as_deref(),
        }
        .encode();
        req.outbound.push_unbounded(Utf8Bytes::from(frame));
        self.inner
            .parts
            .hub
            .add(&req.room, req.conn, req.outbound.clone());
        self.members.insert(
            req.conn,
            Member {
                user: req.user.clone(),
                outbound: req.outbound,
            },
        );
        self.inner.parts.metrics.memberships.inc();
        Ok(())
    }

    async fn leave(&mut self, req: LeaveRequest) {
        let parts = &self.inner.parts;
        let (prefix, suffix) = system_parts(&req.room, &req.user, false);
        let args = Args::new(&req.room, "leave")
            .arg(&req.room)
            .arg(&req.user)
            .arg(&parts.node)
            .arg(parts.announce_max)
            .arg(prefix)
            .arg(suffix)
            .arg(parts.history.max_len)
            .arg(parts.history.ttl_s)
            .0;
        let outcome: Result<(u64, u64), BrokerError> = eval_one(&self.inner, &req.room, args).await;
        match outcome {
            Ok((leave_seq, head)) if self.members.contains_key(&req.conn) => {
                // Everything sequenced before the leave reaches the leaver; its own leave
                // event does not.
                let target = if leave_seq > 0 { leave_seq - 1 } else { head };
                if !self.catch_up(target).await {
                    self.evict("missed events could not be recovered");
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Redis still counts this connection: the node rewrites its presence entries
                // from its local members once Redis answers again (announcing the leave then).
                debug!(room = %req.room, error = %e, "leave not recorded yet");
                self.inner.presence_dirty(&req.room);
            }
        }
        self.members.remove(&req.conn);
        self.inner.parts.hub.remove(&req.room, req.conn);
        self.inner.parts.metrics.memberships.dec();
        if let Some(outbound) = &req.outbound {
            outbound.push(req.left_frame());
        }
    }

    /// Makes this node's presence entries of the room (`:presence:<node>`, and through it
    /// `:users`) match the local members: a user whose leave Redis never recorded (it was away)
    /// leaves now, announced if that was their last connection in the cluster; a user the
    /// cluster lost while this node was cut off (reaped by a survivor) is counted again and
    /// announced as joining.
    async fn reconcile(&mut self) -> Result<(), BrokerError> {
        let parts = &self.inner.parts;
        let node = &parts.node;
        let mut conn = self.inner.shards.for_room(&self.room).conn.clone();
        let stored: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(format!("{}:presence:{node}", room_key(&self.room)))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(cluster::reason(&e)))?;
        let mut local: HashMap<&str, u64> = HashMap::new();
        for member in self.members.values() {
            *local.entry(&member.user).or_default() += 1;
        }
        let mut changes: Vec<(String, u64)> = stored
            .iter()
            .filter_map(|(user, &count)| {
                let want = local.get(user.as_str()).copied().unwrap_or(0);
                (want != count).then(|| (user.clone(), want))
            })
            .collect();
        changes.extend(
            local
                .iter()
                .filter(|(user, _)| !stored.contains_key(**user))
                .map(|(user, &count)| ((*user).to_owned(), count)),
        );
        if stored.is_empty() && local.is_empty() {
            // Nothing of this node here: drop the room from the node's set.
            let _: () = redis::cmd("SREM")
                .arg(format!("parley:node:{node}:rooms"))
                .arg(&*self.room)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(cluster::reason(&e)))?;
        }
        for (user, target) in changes {
            let (join_prefix, join_suffix) = system_parts(&self.room, &user, true);
            let (leave_prefix, leave_suffix) = system_parts(&self.room, &user, false);
            let args = Args::new(&self.room, "sync")
                .arg(&self.room)
                .arg(&user)
                .arg(node)
                .arg(target)
                .arg(parts.announce_max)
                .arg(join_prefix)
                .arg(join_suffix)
                .arg(leave_prefix)
                .arg(leave_suffix)
                .arg(parts.history.max_len)
                .arg(parts.history.ttl_s)
                .0;
            let seq: u64 = eval_one(&self.inner, &self.room, args).await?;
            info!(room = %self.room, user, connections = target, announced = seq, "presence repaired");
        }
        Ok(())
    }

    /// Delivers every event up to `target`: from pub/sub when it comes soon, else from the
    /// stream. `false` when that is impossible.
    async fn catch_up(&mut self, target: u64) -> bool {
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        while self.next <= target && !self.members.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(RoomEvent::Event(event))) => self.on_event(event).await,
                Ok(Some(RoomEvent::Resync)) => self.resync().await,
                Ok(None) => return false,
                Err(_) => return self.fill(target).await,
            }
        }
        true
    }

    async fn on_event(&mut self, event: Event) {
        if self.members.is_empty() {
            return;
        }
        if event.epoch != self.epoch {
            self.evict("the room's log was replaced");
            return;
        }
        if event.seq < self.next {
            return;
        }
        if event.seq > self.next && !self.fill(event.seq - 1).await {
            self.evict("missed events could not be recovered");
            return;
        }
        if self.members.is_empty() || event.seq < self.next {
            return;
        }
        self.deliver(event.seq, &event.frame);
    }

    /// Writes what was delivered since the last write.
    fn write(&mut self) {
        std::mem::take(&mut self.writes).write();
    }

    fn deliver(&mut self, seq: u64, frame: &Utf8Bytes) {
        let members = self
            .inner
            .parts
            .hub
            .deliver_in(&self.room, seq, frame, &mut self.writes);
        self.inner.parts.metrics.messages_out.inc_by(members as u64);
        self.next = seq + 1;
    }

    /// Reads `next..=target` from the stream and delivers it; `false` when the stream no
    /// longer holds all of it (trimmed, expired, another epoch) or Redis does not answer.
    async fn fill(&mut self, target: u64) -> bool {
        if self.next > target {
            return true;
        }
        // What was delivered before the gap is not held back while the stream is read.
        self.write();
        let mut conn = self.inner.shards.for_room(&self.room).conn.clone();
        let log = format!("{}:log", room_key(&self.room));
        let got: redis::RedisResult<Entries> = redis::cmd("XRANGE")
            .arg(&log)
            .arg(format!("{}-0", self.next))
            .arg(format!("{target}-0"))
            .query_async(&mut conn)
            .await;
        let Ok(entries) = got else { return false };
        let mut frames = Vec::with_capacity(entries.len());
        let mut expect = self.next;
        for (id, fields) in entries {
            let epoch_ok = fields.iter().any(|(k, v)| k == "e" && *v == self.epoch);
            if entry_seq(&id) != Some(expect) || !epoch_ok {
                return false;
            }
            let Some(frame) = field(fields) else {
                return false;
            };
            frames.push(frame);
            expect += 1;
        }
        if expect != target + 1 {
            return false;
        }
        for frame in frames {
            let seq = self.next;
            self.deliver(seq, &Utf8Bytes::from(frame));
        }
        true
    }

    /// After a pub/sub reconnect: compare with the room's head and fill what was missed.
    async fn resync(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let mut conn = self.inner.shards.for_room(&self.room).conn.clone();
        let key = room_key(&self.room);
        let got: redis::RedisResult<(Option<u64>, Option<String>)> = redis::cmd("MGET")
            .arg(format!("{key}:seq"))
            .arg(format!("{key}:epoch"))
            .query_async(&mut conn)
            .await;
        match got {
            Ok((Some(head), Some(epoch))) if epoch == self.epoch => {
                if !self.fill(head).await {
                    self.evict("missed events could not be recovered");
                }
            }
            Ok(_) => self.evict("the room's log was replaced"),
            Err(e) => {
                warn!(room = %self.room, error = %e, "resync failed");
                self.evict("missed events could not be recovered");
            }
        }
    }

    /// Closes every local member with 4009: they rejoin with `since` and learn from
    /// `recovered` whether their log continues.
    fn evict(&mut self, why: &str) {
        if self.members.is_empty() {
            return;
        }
        warn!(room = %self.room, members = self.members.len(), why, "closing local members with 4009");
        for (conn, member) in self.members.drain() {
            self.inner.parts.hub.remove(&self.room, conn);
            member.outbound.close(CloseCode::SlowConsumer);
        }
    }
}
