//! The room actor: one task per room in use on this node, the room's one ordered path. It runs
//! the room's requests (join, leave, publish, presence repair) in arrival order, handing
//! consecutive publishes as one run to the shard's message writer, and feeds the room's events from pub/sub to the
//! hub strictly by seq: an event that skips ahead makes it XRANGE the missing seqs from the
//! stream first, and when it cannot (trimmed, another epoch, Redis away) the room's local
//! members are closed with 4009 so they resume with `since`. The hub owns the members and the
//! next seq they expect; the actor keeps only the epoch they are on.
//!
//! A join subscribes first, then runs the script (presence, the join event, head and history
//! in one atomic step), catches the local members up to that head, then queues `joined` and
//! registers the member, so it receives exactly the seqs after `joined.seq`. A leave catches
//! up to just before its own leave event, then removes the member and queues `left`. A
//! catch-up never goes past its target: an event beyond it, or a resync (pub/sub came back
//! and Redis may be further on), is held back and handled right after the join or leave.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use parley_protocol::server::{json_array, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::subscriber::SubCmd;
use super::writer::Run;
use super::{entry_seq, field, script_outcome, unavailable, Entries, Inner, Publish};
use crate::broker::log::{cap_replay, DEDUP_WINDOW};
use crate::broker::{BrokerError, JoinRequest, LeaveRequest, Posted};
use crate::cluster::script::{self, Join, JoinReply, Leave, Msg, MsgOutcome, Sync};
use crate::cluster::{self, keys, split_frame};
use crate::faults::Faults;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::outbound::Batch;
use crate::policy::RoomPolicy;

/// Most publishes one run carries.
const MAX_BATCH: usize = 256;
/// How long the actor waits for pub/sub to bring an event it knows exists before it reads the
/// stream instead.
const CATCH_UP_WAIT: Duration = Duration::from_millis(200);

/// How the broker reaches a room's actor.
#[derive(Clone)]
pub(super) struct RoomHandle {
    pub(super) cmds: mpsc::UnboundedSender<RoomCmd>,
    pub(super) events: mpsc::UnboundedSender<RoomEvent>,
}

/// A request on the room, run in arrival order.
pub(super) enum RoomCmd {
    Join(JoinRequest, oneshot::Sender<Result<(), BrokerError>>),
    Leave(
        LeaveRequest,
        Option<oneshot::Sender<Result<(), BrokerError>>>,
    ),
    Publish(Publish),
    /// Make this node's presence entries of the room match its local members.
    Reconcile(oneshot::Sender<Result<(), BrokerError>>),
}

/// What the subscriber hands the actor.
pub(super) enum RoomEvent {
    /// An event from pub/sub.
    Event(Event),
    /// The subscriber reconnected: anything may have been missed.
    Resync,
}

/// A sequenced event as published.
pub(super) struct Event {
    pub(super) seq: u64,
    pub(super) epoch: String,
    pub(super) frame: Utf8Bytes,
}

/// Starts the actor of `room`.
pub(super) fn spawn(inner: Arc<Inner>, room: Arc<str>) -> RoomHandle {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let policy = inner.parts.policies.for_room(&room);
    let actor = RoomActor {
        inner: inner.clone(),
        room,
        cmds: cmd_rx,
        events: ev_rx,
        pending: None,
        held: VecDeque::new(),
        policy,
        epoch: String::new(),
        subscribed: false,
        writes: Batch::default(),
    };
    let (health, room) = (inner.parts.health.clone(), actor.room.clone());
    let guarded = inner.clone();
    inner.tasks.spawn(async move {
        let what = format!("the actor of room {room}");
        health.guard(what, actor.run()).await;
        // After a panic the actor is still in the map; a clean exit removed it already.
        let mut rooms = guarded.rooms.lock().expect("rooms lock");
        if rooms.get(&room).is_some_and(|h| h.cmds.is_closed()) {
            rooms.remove(&room);
        }
    });
    RoomHandle {
        cmds: cmd_tx,
        events: ev_tx,
    }
}

struct RoomActor {
    inner: Arc<Inner>,
    room: Arc<str>,
    cmds: mpsc::UnboundedReceiver<RoomCmd>,
    events: mpsc::UnboundedReceiver<RoomEvent>,
    /// A command taken from the queue while gathering publishes, to run next.
    pending: Option<RoomCmd>,
    /// Events a catch-up took from the queue but could not handle without passing its target,
    /// to handle next, before the queue.
    held: VecDeque<RoomEvent>,
    /// The room's policy: its retention, announcements and member list.
    policy: RoomPolicy,
    /// The epoch the members' stream belongs to; meaningful only while there are members.
    epoch: String,
    subscribed: bool,
    /// Events delivered but not yet written: everything that arrived together is written to
    /// each member at once.
    writes: Batch,
}

impl RoomActor {
    fn hub(&self) -> &Hub {
        &self.inner.parts.hub
    }

    /// The seq the local members expect next; `None` when there are none.
    fn next(&self) -> Option<u64> {
        self.hub().next_seq(&self.room)
    }

    async fn run(mut self) {
        loop {
            if let Some(cmd) = self.pending.take() {
                self.command(cmd).await;
            } else if let Some(ev) = self.held.pop_front() {
                self.room_event(ev).await;
            } else {
                tokio::select! {
                    biased;
                    cmd = self.cmds.recv() => match cmd {
                        Some(cmd) => self.command(cmd).await,
                        None => break,
                    },
                    ev = self.events.recv() => match ev {
                        Some(ev) => self.room_event(ev).await,
                        None => break,
                    },
                    _ = self.inner.stop.cancelled() => break,
                }
            }
            self.write();
            if self.next().is_none() && self.try_exit() {
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

    /// Handles an event from pub/sub (or held back by a catch-up), and whatever else has
    /// arrived with it: one write per member, so the busier the room, the more events per
    /// system call.
    async fn room_event(&mut self, ev: RoomEvent) {
        match ev {
            RoomEvent::Event(event) => {
                self.on_event(event).await;
                while let Some(next) = self
                    .held
                    .pop_front()
                    .or_else(|| self.events.try_recv().ok())
                {
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
            RoomEvent::Resync => self.resync().await,
        }
    }

    /// Leaves the map if no command is waiting; `false` when one is (go on serving).
    fn try_exit(&mut self) -> bool {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        if self.pending.is_some() || !self.cmds.is_empty() {
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
        if Faults::take(&self.inner.parts.faults.panic_room) {
            panic!("fault injected: a room actor");
        }
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
            RoomCmd::Publish(first) => {
                // The publishes queued right behind this one go in the same run; the
                // first other request waits for them, in its place.
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match self.cmds.try_recv() {
                        Ok(RoomCmd::Publish(next)) => batch.push(next),
                        Ok(other) => {
                            self.pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                self.publish(batch).await;
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

    /// Stores a run of messages (through the shard's writer, with other rooms' runs), in order,
    /// and answers each: the ack (or the error) is queued once Redis has stored it. Delivery
    /// follows through pub/sub.
    async fn publish(&mut self, batch: Vec<Publish>) {
        let inner = self.inner.clone();
        let parts = &inner.parts;
        let policy = self.policy;
        let ts = cluster::now_ts();
        let ops: Vec<Msg> = batch
            .iter()
            .map(|p| {
                let r = &p.request;
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
                Msg {
                    room: &r.room,
                    user: &r.user,
                    client_id: r.client_id.as_deref().unwrap_or(""),
                    content: &r.content,
                    prefix,
                    suffix,
                    max_len: policy.history_max_len,
                    ttl_s: policy.history_ttl_s,
                    epoch_candidate: cluster::new_epoch(),
                    dedup_window_s: DEDUP_WINDOW.as_secs(),
                    node: &parts.node,
                }
            })
            .collect();
        let msgs = ops.iter().map(Msg::prepare).collect();
        drop(ops);
        let started = Instant::now();
        // The shard's writer sends this run with other rooms' in one script call.
        let (done, answer) = oneshot::channel();
        let index = self.inner.shards.index_of(&self.room);
        let _ = self.inner.writers[index].send(Run { msgs, done });
        let result = answer.await.unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the message writer stopped",
            )))
        });
        Metrics::observe(&parts.metrics.store_commit, started.elapsed());
        // Stored in the room's new epoch (Redis came back with less) while the members here
        // are in the old one, where that seq may name another event: they are closed with 4009
        // before any answer (an ack to a closed connection is dropped), resume in the new epoch
        // and resend, acked then as duplicates.
        let other_epoch = self.next().is_some()
            && result.as_ref().is_ok_and(|replies| {
                replies.iter().any(|r| {
                    r.as_ref()
                        .is_ok_and(|r| r.outcome != MsgOutcome::Conflict && r.epoch != self.epoch)
                })
            });
        if other_epoch {
            self.evict("the room's log was replaced");
        }
        let outcomes: Vec<Result<Posted, BrokerError>> = match result {
            Ok(replies) => replies
                .into_iter()
                .map(|reply| match reply {
                    Ok(reply) => match reply.outcome {
                        MsgOutcome::Stored => Ok(Posted {
                            seq: reply.seq,
                            duplicate: false,
                        }),
                        MsgOutcome::Duplicate => Ok(Posted {
                            seq: reply.seq,
                            duplicate: true,
                        }),
                        MsgOutcome::Conflict => Err(BrokerError::IdConflict),
                    },
                    Err(e) => Err(unavailable(e)),
                })
                .collect(),
            Err(e) => {
                warn!(room = %self.room, error = %e, "redis send batch failed");
                let err = unavailable(format!(
                    "{}; the message may not have been stored, retry (with its id it is not stored twice)",
                    cluster::reason(&e)
                ));
                batch.iter().map(|_| Err(err.clone())).collect()
            }
        };
        for (publish, outcome) in batch.into_iter().zip(outcomes) {
            let Publish { request, reply, .. } = publish;
            if outcome.is_ok() {
                Metrics::observe(&parts.metrics.send_latency, request.received.elapsed());
            }
            reply.answer(&request, outcome, None);
        }
    }

    async fn join(&mut self, req: JoinRequest) -> Result<(), BrokerError> {
        // Subscribe first: every event after the script's head is then published to us.
        self.subscribe().await?;
        let parts = &self.inner.parts;
        let policy = self.policy;
        let (prefix, suffix) = cluster::system_parts(&req.room, &req.user, &req.name, true);
        let op = Join {
            room: &req.room,
            user: &req.user,
            node: &parts.node,
            since: req.since.as_ref().map(|(s, e)| (*s, e.as_str())),
            on_join: parts.history.on_join,
            max_replay: parts.history.max_replay,
            announce_max: policy.announce_max(parts.announce_max),
            users_max: policy.users_max(parts.announce_max),
            prefix,
            suffix,
            max_len: policy.history_max_len,
            ttl_s: policy.history_ttl_s,
            epoch_candidate: cluster::new_epoch(),
            presence_ttl_ms: parts.presence_ttl.as_millis() as u64,
        };
        let shard = self.inner.shards.for_room(&self.room);
        let reply = script_outcome(script::run(shard, &op).await);
        // The script may have run even though its answer was lost.
        let JoinReply {
            head,
            epoch,
            people,
            users,
            mut history,
            truncated,
            recovered,
            ..
        } = reply.inspect_err(|_| self.inner.nodes.presence_dirty(&self.room))?;
        let truncated = (recovered == Some(true)
            && cap_replay(&mut history, parts.history.max_replay_bytes))
            || truncated;
        // Bring the present members to `head` so the joiner starts exactly after it. When
        // that fails they are evicted, and the joiner starts the room afresh at `head`.
        if self.next().is_none() || epoch != self.epoch {
            self.evict("the room's log was replaced");
            self.epoch = epoch;
        } else if !self.catch_up(head).await {
            self.evict("missed events could not be recovered");
        }
        let parts = &self.inner.parts;
        let users = (people <= policy.users_max(parts.announce_max)).then(|| {
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
            recovered,
            rules: policy.rules(),
            id: req.request_id.as_deref(),
        }
        .encode();
        req.outbound.push_unbounded(Utf8Bytes::from(frame));
        parts.hub.add(
            &req.room,
            req.conn,
            req.user.clone(),
            req.outbound.clone(),
            head,
        );
        parts.metrics.memberships.inc();
        Ok(())
    }

    async fn leave(&mut self, req: LeaveRequest) {
        let parts = &self.inner.parts;
        let policy = self.policy;
        let (prefix, suffix) = cluster::system_parts(&req.room, &req.user, &req.name, false);
        let op = Leave {
            room: &req.room,
            user: &req.user,
            node: &parts.node,
            announce_max: policy.announce_max(parts.announce_max),
            prefix,
            suffix,
            max_len: policy.history_max_len,
            ttl_s: policy.history_ttl_s,
        };
        let shard = self.inner.shards.for_room(&self.room);
        match script_outcome(script::run(shard, &op).await) {
            Ok(reply) if self.hub().contains(&self.room, req.conn) => {
                // Everything sequenced before the leave reaches the leaver; its own leave
                // event does not.
                let target = reply.leave_seq.map_or(reply.head, |seq| seq - 1);
                if !self.catch_up(target).await {
                    self.evict("missed events could not be recovered");
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Redis still counts this connection: the node rewrites its presence entries
                // from its local members once Redis answers again (announcing the leave then).
                debug!(room = %req.room, error = %e, "leave not recorded yet");
                self.inner.nodes.presence_dirty(&req.room);
            }
        }
        let parts = &self.inner.parts;
        parts.hub.remove(&req.room, req.conn);
        parts.metrics.memberships.dec();
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
        let shard = self.inner.shards.for_room(&self.room);
        let mut conn = shard.conn.clone();
        let stored: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(keys::presence(&self.room, node))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(cluster::reason(&e)))?;
        let local = self.hub().local_users(&self.room);
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
                .filter(|(user, _)| !stored.contains_key(&***user))
                .map(|(user, &count)| (user.to_string(), count)),
        );
        if stored.is_empty() && local.is_empty() {
            // Nothing of this node here: drop the room from the node's set.
            let _: () = redis::cmd("SREM")
                .arg(keys::node_rooms(node))
                .arg(&*self.room)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(cluster::reason(&e)))?;
        }
        for (user, target) in changes {
            // A repair knows the user, not the display name: the user id stands in.
            let (join_prefix, join_suffix) = cluster::system_parts(&self.room, &user, &user, true);
            let (leave_prefix, leave_suffix) =
                cluster::system_parts(&self.room, &user, &user, false);
            let op = Sync {
                room: &self.room,
                user: &user,
                node,
                target,
                announce_max: self.policy.announce_max(parts.announce_max),
                join_prefix,
                join_suffix,
                leave_prefix,
                leave_suffix,
                max_len: self.policy.history_max_len,
                ttl_s: self.policy.history_ttl_s,
            };
            let announced = script_outcome(script::run(shard, &op).await)?;
            info!(room = %self.room, user, connections = target, announced = ?announced.seq, "presence repaired");
        }
        Ok(())
    }

    /// Delivers every event up to `target` and none after it: from pub/sub when it comes
    /// soon, else from the stream. `false` when that is impossible. An event beyond `target`,
    /// or a resync (Redis may be past `target` by now), is held back for after the caller: a
    /// joiner starts at `target + 1` and must receive what follows it.
    async fn catch_up(&mut self, target: u64) -> bool {
        let mut deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        while self.next().is_some_and(|next| next <= target) {
            let ev = match self.held.pop_front() {
                Some(ev) => Ok(Some(ev)),
                None => tokio::time::timeout_at(deadline, self.events.recv()).await,
            };
            match ev {
                Ok(Some(RoomEvent::Event(event)))
                    if event.seq > target && event.epoch == self.epoch =>
                {
                    self.held.push_front(RoomEvent::Event(event));
                    return self.fill(target).await;
                }
                Ok(Some(RoomEvent::Event(event))) => self.on_event(event).await,
                Ok(Some(RoomEvent::Resync)) => {
                    self.held.push_front(RoomEvent::Resync);
                    return self.fill(target).await;
                }
                Ok(None) => return false,
                Err(_) if Faults::on(&self.inner.parts.faults.hold_catch_up) => {
                    deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
                }
                Err(_) => return self.fill(target).await,
            }
        }
        true
    }

    async fn on_event(&mut self, event: Event) {
        let Some(next) = self.next() else { return };
        if event.epoch != self.epoch {
            self.evict("the room's log was replaced");
            return;
        }
        if event.seq < next {
            return;
        }
        if event.seq > next && !self.fill(event.seq - 1).await {
            self.evict("missed events could not be recovered");
            return;
        }
        if self.next().is_some_and(|next| event.seq >= next) {
            self.deliver(event.seq, &event.frame);
        }
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
    }

    /// Reads `next..=target` from the stream and delivers it; `false` when the stream no
    /// longer holds all of it (trimmed, expired, another epoch) or Redis does not answer.
    async fn fill(&mut self, target: u64) -> bool {
        let Some(next) = self.next() else { return true };
        if next > target {
            return true;
        }
        // What was delivered before the gap is not held back while the stream is read.
        self.write();
        let mut conn = self.inner.shards.for_room(&self.room).conn.clone();
        let got: redis::RedisResult<Entries> = redis::cmd("XRANGE")
            .arg(keys::log(&self.room))
            .arg(format!("{next}-0"))
            .arg(format!("{target}-0"))
            .query_async(&mut conn)
            .await;
        let Ok(entries) = got else { return false };
        let mut frames = Vec::with_capacity(entries.len());
        let mut expect = next;
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
        for (seq, frame) in (next..).zip(frames) {
            self.deliver(seq, &Utf8Bytes::from(frame));
        }
        true
    }

    /// After a pub/sub reconnect: compare with the room's head and fill what was missed.
    async fn resync(&mut self) {
        if self.next().is_none() {
            return;
        }
        let mut conn = self.inner.shards.for_room(&self.room).conn.clone();
        let got: redis::RedisResult<(Option<u64>, Option<String>)> = redis::cmd("MGET")
            .arg(keys::seq(&self.room))
            .arg(keys::epoch(&self.room))
            .query_async(&mut conn)
            .await;
        match got {
            Ok((Some(head), Some(epoch))) if epoch == self.epoch => {
                if self.next().is_some_and(|next| next > head + 1) {
                    // Redis came back with less than the members have seen: the room gets a
                    // new epoch with its next write (see `room_epoch` in lua/lib.lua).
                    self.evict("the room's log went back");
                } else if !self.fill(head).await {
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
        let members = self.inner.parts.hub.evict(&self.room);
        if members > 0 {
            warn!(room = %self.room, members, why, "closing local members with 4009");
        }
    }
}
