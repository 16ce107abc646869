//! The single-node broker: a sequencer task that owns the SQLite [`LogWriter`], takes requests
//! from a channel, and handles everything that arrived together as one batch:
//!
//! 1. presence changes decide which joins and leaves are announced;
//! 2. one transaction assigns seqs, stores events and reads joiners' history (group commit);
//! 3. in request order: deliver stored events to the hub, register joiners (after queueing
//!    their `joined`), unregister leavers, and answer every request.
//!
//! Because one task does all three steps in order, the hub sees each room's events in seq
//! order, a joiner's membership starts exactly after its `joined.seq`, and an ack always
//! follows the commit.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use parley_protocol::server::{json_array, RoomRules, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use super::log::{Page, PageQuery, StoredRoom};
use super::{
    announce, Broker, BrokerError, JoinRequest, LeaveRequest, Posted, PublishReply, PublishRequest,
};
use crate::faults::{Faults, Health};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::outbound::Batch;
use crate::policy::Policies;
use crate::presence::{MemoryPresence, Presence};
use crate::store::sqlite::{Draft, JoinWindow, LogReader, LogWriter, Written};

/// Requests waiting for the sequencer; past this, callers wait (backpressure).
const QUEUE_DEPTH: usize = 65_536;

enum Op {
    Join(JoinRequest, oneshot::Sender<Result<(), BrokerError>>),
    Leave(
        LeaveRequest,
        Option<oneshot::Sender<Result<(), BrokerError>>>,
    ),
    Publish(PublishRequest, PublishReply),
    Close(oneshot::Sender<()>),
}

/// The single-node broker.
pub struct SqliteBroker {
    ops: mpsc::Sender<Op>,
    reader: Arc<LogReader>,
}

/// What the sequencer needs besides the log.
pub struct SequencerParts {
    /// Fan-out target.
    pub hub: Arc<Hub>,
    /// Who is in which room: the sequencer is its only writer.
    pub presence: Arc<MemoryPresence>,
    /// `presence.announce_max`.
    pub announce_max: usize,
    /// Each room's policy: whether it announces joins and leaves and lists its people.
    pub policies: Arc<Policies>,
    /// `store.max_batch`.
    pub max_batch: usize,
    /// Commit time, fan-out count, memberships and send-to-ack latency are measured here,
    /// where they happen, once per batch or event.
    pub metrics: Arc<Metrics>,
    /// Told when the sequencer task dies (the node then stops serving).
    pub health: Arc<Health>,
    /// Test-only fault switches.
    pub faults: Arc<Faults>,
    /// Notified after every commit that stored events (the webhook deliverer reads them).
    pub committed: Arc<tokio::sync::Notify>,
}

impl SqliteBroker {
    /// Starts the sequencer task on the current runtime.
    pub fn start(writer: LogWriter, reader: LogReader, parts: SequencerParts) -> SqliteBroker {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let health = parts.health.clone();
        tokio::spawn(health.guard("the sequencer task".into(), sequencer(rx, writer, parts)));
        SqliteBroker {
            ops: tx,
            reader: Arc::new(reader),
        }
    }

    async fn submit(&self, op: Op) -> Result<(), BrokerError> {
        self.ops.send(op).await.map_err(|_| BrokerError::Closed)
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn join(&self, request: JoinRequest) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Join(request, tx)).await?;
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    async fn leave(&self, request: LeaveRequest) -> Result<(), BrokerError> {
        if request.outbound.is_none() {
            return self.submit(Op::Leave(request, None)).await;
        }
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Leave(request, Some(tx))).await?;
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    async fn publish(
        &self,
        request: PublishRequest,
        reply: PublishReply,
    ) -> Result<(), BrokerError> {
        self.submit(Op::Publish(request, reply)).await
    }

    async fn history(&self, room: &str, query: PageQuery) -> Result<Page, BrokerError> {
        let reader = self.reader.clone();
        let room = room.to_owned();
        tokio::task::spawn_blocking(move || reader.page(&room, query))
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    async fn rooms(&self) -> Result<Vec<StoredRoom>, BrokerError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || reader.rooms())
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    async fn check(&self) -> Result<(), String> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || reader.check())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// What step 1 decided for one request.
enum Plan {
    Join {
        announced: bool,
        users: Option<Vec<Arc<str>>>,
        user_count: usize,
        rules: RoomRules,
    },
    Leave {
        announced: bool,
        /// The room's last member left: the store notes when (a [`Draft::Vacated`]).
        vacated: bool,
    },
    Publish,
}

async fn sequencer(mut rx: mpsc::Receiver<Op>, mut writer: LogWriter, parts: SequencerParts) {
    let mut closing: Vec<oneshot::Sender<()>> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    // The retention sweep that needs no traffic (empty rooms): between batches, so it sees
    // presence as the batches before it left it.
    let mut sweep = tokio::time::interval(writer.sweep_every());
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.tick().await;
    while closing.is_empty() {
        let first = tokio::select! {
            op = rx.recv() => op,
            _ = sweep.tick() => {
                match run_sweep(writer, &parts).await {
                    Some(back) => writer = back,
                    None => return,
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        ops.push(first);
        while ops.len() < parts.max_batch {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(ops.len());
        for op in ops.drain(..) {
            match op {
                Op::Close(done) => closing.push(done),
                op => batch.push(op),
            }
        }
        if closing.is_empty() {
            match run_batch(writer, batch, &parts).await {
                Some(back) => writer = back,
                None => return,
            }
        } else {
            // Take whatever else was queued before the close, then stop.
            rx.close();
            while let Ok(op) = rx.try_recv() {
                match op {
                    Op::Close(done) => closing.push(done),
                    op => batch.push(op),
                }
            }
            match run_batch(writer, batch, &parts).await {
                Some(back) => writer = back,
                None => return,
            }
        }
    }
    drop(writer);
    for done in closing {
        let _ = done.send(());
    }
}

/// Runs the store's sweep ([`LogWriter::sweep`]) with this node's presence; `None` when the
/// blocking task was lost (the runtime is shutting down).
async fn run_sweep(mut writer: LogWriter, parts: &SequencerParts) -> Option<LogWriter> {
    let presence = parts.presence.clone();
    let (writer, result) = tokio::task::spawn_blocking(move || {
        let result = writer.sweep(|room| presence.occupied(room));
        (writer, result)
    })
    .await
    .map_err(|e| error!(error = %e, "the log writer task was lost"))
    .ok()?;
    match result {
        Ok(0) => {}
        Ok(forgotten) => debug!(forgotten, "empty rooms forgotten"),
        Err(e) => error!(error = %e, "retention sweep failed"),
    }
    Some(writer)
}

/// Runs one batch; `None` when the blocking commit task was lost (the runtime is shutting
/// down), which ends the sequencer: callers then get [`BrokerError::Closed`].
async fn run_batch(
    mut writer: LogWriter,
    batch: Vec<Op>,
    parts: &SequencerParts,
) -> Option<LogWriter> {
    if batch.is_empty() {
        return Some(writer);
    }
    if Faults::take(&parts.faults.panic_sequencer) {
        panic!("fault injected: the sequencer");
    }
    // Step 1: presence decides announcements.
    let mut plans = Vec::with_capacity(batch.len());
    let mut drafts = Vec::with_capacity(batch.len() + 1);
    for op in &batch {
        let plan = match op {
            Op::Join(req, _) => plan_join(req, parts, &mut drafts).await,
            Op::Leave(req, _) => {
                let change = parts.presence.remove(&req.room, &req.user);
                let announce_max = parts
                    .policies
                    .for_room(&req.room)
                    .announce_max(parts.announce_max);
                let announced = announce(change.transition, false, change.users, announce_max);
                if announced {
                    drafts.push(Draft::Presence {
                        room: req.room.clone(),
                        user: req.user.clone(),
                        name: req.name.clone(),
                        joined: false,
                    });
                }
                let vacated = change.users == 0;
                if vacated {
                    drafts.push(Draft::Vacated {
                        room: req.room.clone(),
                    });
                }
                Plan::Leave { announced, vacated }
            }
            Op::Publish(req, _) => {
                drafts.push(Draft::Message {
                    room: req.room.clone(),
                    user: req.user.clone(),
                    name: req.name.clone(),
                    content: req.content.clone(),
                    client_id: req.client_id.clone(),
                });
                Plan::Publish
            }
            Op::Close(_) => unreachable!("close is taken out of batches"),
        };
        plans.push(plan);
    }

    // Step 2: one transaction.
    let metrics = parts.metrics.clone();
    let (writer_back, result) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let result = writer.commit(&drafts);
        Metrics::observe(&metrics.store_commit, started.elapsed());
        (writer, result)
    })
    .await
    .map_err(|e| error!(error = %e, "the log writer task was lost"))
    .ok()?;
    writer = writer_back;

    // Step 3: deliver and answer, in order.
    match result {
        Ok(written) => {
            parts.committed.notify_one();
            // Every frame of the batch is queued first and each connection is written once:
            // a member that gets several events (and its ack) gets them in one system call.
            let mut writes = Batch::default();
            let mut written = written.into_iter();
            for (op, plan) in batch.into_iter().zip(plans) {
                finish(op, plan, &mut written, parts, &mut writes);
            }
            writes.write();
        }
        Err(e) => {
            error!(error = %e, "group commit failed");
            let err = BrokerError::Unavailable("the store cannot take writes now; retry".into());
            for (op, plan) in batch.into_iter().zip(plans) {
                fail(op, plan, &err, parts).await;
            }
        }
    }
    Some(writer)
}

async fn plan_join(req: &JoinRequest, parts: &SequencerParts, drafts: &mut Vec<Draft>) -> Plan {
    let policy = parts.policies.for_room(&req.room);
    let change = parts.presence.add(&req.room, &req.user);
    let announce_max = policy.announce_max(parts.announce_max);
    let announced = announce(change.transition, true, change.users, announce_max);
    let user_count = change.users;
    let users = if user_count <= policy.users_max(parts.announce_max) {
        parts.presence.users(&req.room).await.ok()
    } else {
        None
    };
    if announced {
        drafts.push(Draft::Presence {
            room: req.room.clone(),
            user: req.user.clone(),
            name: req.name.clone(),
            joined: true,
        });
    }
    drafts.push(Draft::Head {
        room: req.room.clone(),
        window: Some(JoinWindow {
            since: req.since.clone(),
        }),
    });
    Plan::Join {
        announced,
        users,
        user_count,
        rules: policy.rules(),
    }
}

fn deliver(parts: &SequencerParts, room: &str, written: Option<Written>, writes: &mut Batch) {
    if let Some(Written::Event { seq, frame }) = written {
        let members = parts
            .hub
            .deliver_in(room, seq, &Utf8Bytes::from(frame), writes);
        parts.metrics.messages_out.inc_by(members as u64);
    }
}

fn finish(
    op: Op,
    plan: Plan,
    written: &mut impl Iterator<Item = Written>,
    parts: &SequencerParts,
    writes: &mut Batch,
) {
    match (op, plan) {
        (
            Op::Join(req, reply),
            Plan::Join {
                announced,
                users,
                user_count,
                rules,
            },
        ) => {
            if announced {
                deliver(parts, &req.room, written.next(), writes);
            }
            let Some(Written::Head { head, history }) = written.next() else {
                unreachable!("a join has a head");
            };
            let history = history.unwrap_or_default();
            let array = json_array(history.frames.iter().map(String::as_str));
            let names: Option<Vec<&str>> = users.as_ref().map(|u| u.iter().map(|s| &**s).collect());
            let frame = ServerFrame::Joined {
                room: &req.room,
                seq: head.seq,
                epoch: &head.epoch,
                users: names.as_deref(),
                user_count,
                history: &array,
                truncated: history.truncated,
                recovered: history.recovered,
                rules,
                id: req.request_id.as_deref(),
            }
            .encode();
            req.outbound
                .push_unbounded_in(Utf8Bytes::from(frame), writes);
            parts.hub.add(
                &req.room,
                req.conn,
                req.user.clone(),
                req.outbound.clone(),
                head.seq,
            );
            parts.metrics.memberships.inc();
            let _ = reply.send(Ok(()));
        }
        (Op::Leave(req, reply), Plan::Leave { announced, vacated }) => {
            parts.hub.remove(&req.room, req.conn);
            parts.metrics.memberships.dec();
            if announced {
                deliver(parts, &req.room, written.next(), writes);
            }
            if vacated {
                written.next();
            }
            if let Some(outbound) = &req.outbound {
                outbound.push_in(req.left_frame(), writes);
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
        (Op::Publish(req, reply), Plan::Publish) => {
            let outcome = match written.next() {
                Some(Written::Event { seq, frame }) => {
                    deliver(
                        parts,
                        &req.room,
                        Some(Written::Event { seq, frame }),
                        writes,
                    );
                    Ok(Posted {
                        seq,
                        duplicate: false,
                    })
                }
                Some(Written::Duplicate { seq }) => Ok(Posted {
                    seq,
                    duplicate: true,
                }),
                Some(Written::Conflict) => Err(BrokerError::IdConflict),
                _ => unreachable!("a publish is stored, a duplicate or a conflict"),
            };
            if outcome.is_ok() {
                Metrics::observe(&parts.metrics.send_latency, req.received.elapsed());
            }
            reply.answer(&req, outcome, Some(writes));
        }
        _ => unreachable!("plans follow their requests"),
    }
}

async fn fail(op: Op, plan: Plan, err: &BrokerError, parts: &SequencerParts) {
    match (op, plan) {
        (Op::Join(req, reply), _) => {
            parts.presence.remove(&req.room, &req.user);
            let _ = reply.send(Err(err.clone()));
        }
        (Op::Leave(req, reply), _) => {
            // The member goes regardless; only its announcement was lost.
            parts.hub.remove(&req.room, req.conn);
            parts.metrics.memberships.dec();
            if let Some(outbound) = &req.outbound {
                outbound.push(req.left_frame());
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
        (Op::Publish(req, reply), _) => reply.answer(&req, Err(err.clone()), None),
        (Op::Close(_), _) => {}
    }
}
