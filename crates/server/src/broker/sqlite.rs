//! The single-node broker: a pipeline of three stages that owns the SQLite [`LogWriter`].
//!
//! 1. The **sequencer** task takes requests from a channel and plans everything that arrived
//!    together as one batch: presence changes decide which joins and leaves are announced, and
//!    each request becomes its [`Draft`]s.
//! 2. The **log writer**, a thread of its own, commits each planned batch in one transaction:
//!    it assigns each room's next seqs from its in-memory heads, de-duplicates client ids,
//!    stores the events and reads joiners' history (group commit). It is the one writer of the
//!    log and does nothing but SQLite work.
//! 3. The **deliverer** task takes committed batches in commit order and, in request order,
//!    hands stored events to the hub, registers joiners (after queueing their `joined`),
//!    unregisters leavers and answers every request; then it writes every touched connection
//!    once.
//!
//! The stages overlap: while the writer commits batch N, the sequencer gathers and plans batch
//! N+1 (which grows with the load: a busier node commits bigger batches, not more of them; after
//! a busy batch that was not full the next is gathered no sooner than [`BATCH_SPACING`] after it)
//! and the deliverer writes batch N-1 to the sockets. Each stage handles batches one at a time and
//! in the order the sequencer planned them, so the hub still sees each room's events in seq
//! order and only after their commit, a joiner's membership starts exactly after its
//! `joined.seq`, an ack always follows the commit, and one connection's requests are answered
//! in the order they were sent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::store::sqlite::{Draft, JoinWindow, LogReader, LogWriter, StoreError, Written};

/// Requests waiting for the sequencer; past this, callers wait (backpressure).
const QUEUE_DEPTH: usize = 65_536;

/// A batch of at least this many requests means a busy node: the next batch is gathered
/// [`BATCH_SPACING`] after it, not as soon as a request arrives. Every batch costs the same
/// whatever it carries (a journal write and its `fdatasync`, a wake-up of the writer thread and
/// of the deliverer and of the indexer), so under load fewer, bigger batches cost less
/// CPU per message: in rooms of two, a third less at 6,600 messages a second and a seventh less
/// at 13,300, for 2 ms more to the ack (`compare.sh dm`, docs/BENCHMARKS.md round 10). A node
/// under lighter load, whose batches are smaller, commits each as soon as it arrives (but the
/// one batch after a busy one), and so does one whose last batch was full (`store.max_batch`:
/// more requests are waiting) and a close.
const BUSY_BATCH: usize = 8;

/// How long after a busy batch the next is gathered; see [`BUSY_BATCH`]. tokio's timer rounds
/// up to its millisecond ticks, so the wait ends 2-3 ms after the busy batch was gathered.
const BATCH_SPACING: Duration = Duration::from_millis(2);

/// Committed batches waiting for the deliverer; past this, the writer waits.
const COMMITTED_DEPTH: usize = 64;

/// Most committed batches the deliverer queues before it writes the sockets: a writer that
/// refills the channel as fast as the deliverer empties it must not hold every write back
/// (members' queues would fill and close with 4009 while their sockets are writable).
const BATCHES_PER_WRITE: usize = COMMITTED_DEPTH;

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
    /// Notified after every settle of the log (the webhook deliverer reads what it settled).
    pub committed: Arc<tokio::sync::Notify>,
}

impl SqliteBroker {
    /// Starts the pipeline: the sequencer and deliverer tasks on the current runtime, the log
    /// writer on a blocking thread of its own.
    pub fn start(writer: LogWriter, reader: LogReader, parts: SequencerParts) -> SqliteBroker {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let parts = Arc::new(parts);
        let health = parts.health.clone();
        // One planned batch waits while one commits: a writer that falls behind holds the
        // sequencer back, so requests gather in its queue and the next batch is bigger. The
        // deliverer takes the batches committed while it was writing together (at most
        // `BATCHES_PER_WRITE`).
        let (jobs, job_rx) = mpsc::channel(1);
        let (committed, committed_rx) = mpsc::channel(COMMITTED_DEPTH);
        let (finished, finished_rx) = oneshot::channel();
        let sweep_every = writer.sweep_every();
        let log = {
            let parts = parts.clone();
            tokio::task::spawn_blocking(move || write_log(writer, job_rx, committed, &parts))
        };
        tokio::spawn(health.clone().guard("the log writer".into(), async move {
            if let Err(e) = log.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }));
        tokio::spawn(health.clone().guard(
            "the deliverer task".into(),
            deliverer(committed_rx, parts.clone(), finished),
        ));
        tokio::spawn(health.guard(
            "the sequencer task".into(),
            sequencer(rx, jobs, parts, sweep_every, finished_rx),
        ));
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

/// What the sequencer decided for one request.
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

/// A batch on its way through the pipeline: the requests, what the sequencer planned for
/// each, and what the log writer made of their drafts.
struct Planned {
    ops: Vec<Op>,
    plans: Vec<Plan>,
    drafts: Vec<Draft>,
}

/// Work for the log writer, in the sequencer's order.
enum Job {
    Commit(Planned),
    /// The retention sweep that needs no traffic (empty rooms), between two batches, with
    /// the rooms that had members when it was queued: presence runs ahead of the log (batches
    /// planned after the sweep are not committed yet), so the sweep must not read it live: a
    /// room whose last members' leaves are planned behind it would look empty and be
    /// forgotten before those leaves are stored under a new epoch.
    Sweep(HashSet<Arc<str>>),
}

/// A batch after its commit, for the deliverer.
struct Committed {
    ops: Vec<Op>,
    plans: Vec<Plan>,
    result: Result<Vec<Written>, StoreError>,
}

/// Stage 1: gathers requests into batches and plans them. Ends when every handle is gone or
/// on `close`, which it answers once the batches before it are delivered.
async fn sequencer(
    mut rx: mpsc::Receiver<Op>,
    jobs: mpsc::Sender<Job>,
    parts: Arc<SequencerParts>,
    sweep_every: Duration,
    finished: oneshot::Receiver<()>,
) {
    let mut closing: Vec<oneshot::Sender<()>> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    // The sweep runs between batches, so it sees presence as the batches before it left it.
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.tick().await;
    // After a busy batch, when the next may be gathered (see `BUSY_BATCH`).
    let mut gather_at: Option<tokio::time::Instant> = None;
    while closing.is_empty() {
        let first = tokio::select! {
            op = rx.recv() => op,
            _ = sweep.tick() => {
                let occupied = parts.presence.occupied_rooms();
                if jobs.send(Job::Sweep(occupied)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        // A close does not wait for the spacing: it takes what is queued and stops.
        let wait = !matches!(first, Op::Close(_));
        ops.push(first);
        if let Some(at) = gather_at.filter(|at| wait && *at > tokio::time::Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
        let gathered = tokio::time::Instant::now();
        while ops.len() < parts.max_batch {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        // A full batch left requests waiting: the next is gathered at once.
        let full = ops.len() >= parts.max_batch;
        let mut batch = Vec::with_capacity(ops.len());
        for op in ops.drain(..) {
            match op {
                Op::Close(done) => closing.push(done),
                op => batch.push(op),
            }
        }
        if !closing.is_empty() {
            // Take whatever else was queued before the close, then stop.
            rx.close();
            while let Ok(op) = rx.try_recv() {
                match op {
                    Op::Close(done) => closing.push(done),
                    op => batch.push(op),
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        gather_at = (batch.len() >= BUSY_BATCH && !full).then(|| gathered + BATCH_SPACING);
        if Faults::take(&parts.faults.panic_sequencer) {
            panic!("fault injected: the sequencer");
        }
        let planned = plan(batch, &parts).await;
        if jobs.send(Job::Commit(planned)).await.is_err() {
            return;
        }
    }
    // The writer finishes what it was given and stops; the deliverer then delivers the last
    // batch and says so.
    drop(jobs);
    let _ = finished.await;
    for done in closing {
        let _ = done.send(());
    }
}

/// Presence decides announcements; every request becomes its drafts.
async fn plan(mut batch: Vec<Op>, parts: &SequencerParts) -> Planned {
    let mut plans = Vec::with_capacity(batch.len());
    let mut drafts = Vec::with_capacity(batch.len() + 1);
    for op in &mut batch {
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
                    // The answer needs only the id and the room: the text moves to the log.
                    content: std::mem::take(&mut req.content),
                    client_id: req.client_id.clone(),
                });
                Plan::Publish
            }
            Op::Close(_) => unreachable!("close is taken out of batches"),
        };
        plans.push(plan);
    }
    Planned {
        ops: batch,
        plans,
        drafts,
    }
}

/// Stage 2, on a blocking thread: commits each batch in one transaction and runs the sweep,
/// in the sequencer's order. Ends when the sequencer is gone (after its last batch) or the
/// deliverer is (the runtime is shutting down).
fn write_log(
    mut writer: LogWriter,
    mut jobs: mpsc::Receiver<Job>,
    committed: mpsc::Sender<Committed>,
    parts: &SequencerParts,
) {
    {
        // Settles are the indexer's: the time they take and the webhook deliverer's wake-up.
        let metrics = parts.metrics.clone();
        let committed = parts.committed.clone();
        writer.on_settle(move |took| {
            Metrics::observe(&metrics.store_settle, took);
            committed.notify_one();
        });
    }
    while let Some(job) = jobs.blocking_recv() {
        writer.hold_settles(Faults::on(&parts.faults.hold_settle));
        match job {
            Job::Commit(Planned { ops, plans, drafts }) => {
                let started = Instant::now();
                let result = writer.commit(&drafts);
                Metrics::observe(&parts.metrics.store_commit, started.elapsed());
                let batch = Committed { ops, plans, result };
                if committed.blocking_send(batch).is_err() {
                    break;
                }
            }
            Job::Sweep(occupied) => {
                Faults::hold(&parts.faults.hold_sweep, &parts.faults.sweep_held);
                match writer.sweep(|room| occupied.contains(room)) {
                    Ok(0) => {}
                    Ok(forgotten) => debug!(forgotten, "empty rooms forgotten"),
                    Err(e) => error!(error = %e, "retention sweep failed"),
                }
            }
        }
    }
    // The log is closed (and settled) before the deliverer hears that nothing more comes.
    drop(writer);
    drop(committed);
}

/// Stage 3: delivers and answers each committed batch, in order, then writes every touched
/// connection once. The batches committed while the last writes went out (at most
/// [`BATCHES_PER_WRITE`]) are taken together: a member of a busy room gets all of them in one
/// system call. Says `finished` when the
/// writer has stopped and everything is delivered.
async fn deliverer(
    mut committed: mpsc::Receiver<Committed>,
    parts: Arc<SequencerParts>,
    finished: oneshot::Sender<()>,
) {
    while let Some(first) = committed.recv().await {
        let mut writes = Batch::default();
        deliver_batch(first, &parts, &mut writes);
        for _ in 1..BATCHES_PER_WRITE {
            let Ok(next) = committed.try_recv() else {
                break;
            };
            deliver_batch(next, &parts, &mut writes);
        }
        writes.write();
    }
    let _ = finished.send(());
}

/// Queues what one committed batch delivers and answers, in request order, in `writes`.
fn deliver_batch(batch: Committed, parts: &SequencerParts, writes: &mut Batch) {
    let Committed { ops, plans, result } = batch;
    match result {
        Ok(written) => {
            let mut written = written.into_iter();
            for (op, plan) in ops.into_iter().zip(plans) {
                finish(op, plan, &mut written, parts, writes);
            }
        }
        Err(e) => {
            error!(error = %e, "group commit failed");
            let err = BrokerError::Unavailable("the store cannot take writes now; retry".into());
            for (op, plan) in ops.into_iter().zip(plans) {
                fail(op, plan, &err, parts, writes);
            }
        }
    }
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

fn fail(op: Op, plan: Plan, err: &BrokerError, parts: &SequencerParts, writes: &mut Batch) {
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
                outbound.push_in(req.left_frame(), writes);
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
        (Op::Publish(req, reply), _) => reply.answer(&req, Err(err.clone()), Some(writes)),
        (Op::Close(_), _) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MAX_BATCH: usize = 2 * BUSY_BATCH;

    fn parts() -> Arc<SequencerParts> {
        Arc::new(SequencerParts {
            hub: Arc::new(Hub::default()),
            presence: Arc::new(MemoryPresence::default()),
            announce_max: 100,
            policies: Arc::new(Policies::from_config(&Config::default()).unwrap()),
            max_batch: MAX_BATCH,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            faults: Arc::new(Faults::default()),
            committed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    fn publish() -> Op {
        let (tx, _) = oneshot::channel();
        Op::Publish(
            PublishRequest {
                room: "r".into(),
                user: "u".into(),
                name: "u".into(),
                content: "hi".into(),
                client_id: None,
                received: Instant::now(),
            },
            PublishReply::Caller(tx),
        )
    }

    /// The sequencer alone, on tokio's paused clock: its requests in, its planned batches out,
    /// and the deliverer's "finished" (held, never sent: no batch is delivered).
    fn sequencer_alone() -> (mpsc::Sender<Op>, mpsc::Receiver<Job>, oneshot::Sender<()>) {
        let (ops, ops_rx) = mpsc::channel(QUEUE_DEPTH);
        let (jobs, jobs_rx) = mpsc::channel(1);
        let (finished, finished_rx) = oneshot::channel();
        let sweep_every = Duration::from_secs(3600);
        tokio::spawn(sequencer(ops_rx, jobs, parts(), sweep_every, finished_rx));
        (ops, jobs_rx, finished)
    }

    async fn batch_len(jobs: &mut mpsc::Receiver<Job>) -> usize {
        match jobs.recv().await {
            Some(Job::Commit(planned)) => planned.ops.len(),
            Some(Job::Sweep(_)) => panic!("a sweep, not a batch"),
            None => panic!("the sequencer stopped"),
        }
    }

    /// Sends `BUSY_BATCH` requests at once and takes their batch; returns when they were sent.
    async fn busy_batch(
        ops: &mpsc::Sender<Op>,
        jobs: &mut mpsc::Receiver<Job>,
    ) -> tokio::time::Instant {
        for _ in 0..BUSY_BATCH {
            ops.send(publish()).await.unwrap();
        }
        let sent = tokio::time::Instant::now();
        assert_eq!(batch_len(jobs).await, BUSY_BATCH);
        sent
    }

    /// After a busy batch the sequencer gathers the next one `BATCH_SPACING` later, so the
    /// requests that arrive meanwhile go in one batch (one commit) instead of the first alone.
    #[tokio::test(start_paused = true)]
    async fn after_a_busy_batch_the_next_is_gathered_a_spacing_later() {
        let (ops, mut jobs, _finished) = sequencer_alone();
        let started = busy_batch(&ops, &mut jobs).await;
        ops.send(publish()).await.unwrap();
        // The sequencer takes that request and waits; three more arrive while it waits.
        tokio::task::yield_now().await;
        for _ in 0..3 {
            ops.send(publish()).await.unwrap();
        }
        assert_eq!(batch_len(&mut jobs).await, 4, "one batch of the four");
        assert!(
            started.elapsed() >= BATCH_SPACING,
            "{:?}",
            started.elapsed()
        );
    }

    /// A full batch (`store.max_batch`) left requests waiting: the next goes at once.
    #[tokio::test(start_paused = true)]
    async fn after_a_full_batch_the_next_is_gathered_at_once() {
        let (ops, mut jobs, _finished) = sequencer_alone();
        for _ in 0..MAX_BATCH + 1 {
            ops.send(publish()).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        assert_eq!(batch_len(&mut jobs).await, MAX_BATCH);
        assert_eq!(batch_len(&mut jobs).await, 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A close after a busy batch does not wait for the spacing: the sequencer stops at once
    /// (it hands the writer nothing more).
    #[tokio::test(start_paused = true)]
    async fn a_close_after_a_busy_batch_goes_at_once() {
        let (ops, mut jobs, _finished) = sequencer_alone();
        let started = busy_batch(&ops, &mut jobs).await;
        let (done, _) = oneshot::channel();
        ops.send(Op::Close(done)).await.unwrap();
        assert!(
            jobs.recv().await.is_none(),
            "the sequencer let the writer go"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A node under light load commits each batch as soon as it arrives.
    #[tokio::test(start_paused = true)]
    async fn after_a_small_batch_the_next_is_gathered_at_once() {
        let (ops, mut jobs, _finished) = sequencer_alone();
        for _ in 0..BUSY_BATCH - 1 {
            ops.send(publish()).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        assert_eq!(batch_len(&mut jobs).await, BUSY_BATCH - 1);
        ops.send(publish()).await.unwrap();
        tokio::task::yield_now().await;
        ops.send(publish()).await.unwrap();
        assert_eq!(
            batch_len(&mut jobs).await,
            1,
            "the first request went alone"
        );
        assert_eq!(batch_len(&mut jobs).await, 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
