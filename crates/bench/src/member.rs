//! The client engine every subcommand drives: one task per simulated member that connects,
//! joins its room, reads and tracks every event, and — depending on its [`Behaviour`] — posts
//! at a fixed or human rate, leaves and rejoins, reconnects with `since`, floods, stops
//! reading, or sends garbage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use parley_protocol::ClientFrame;

use crate::net::{encode, unix_nanos, Dialer, Incoming, JoinRequest, Joined, Ws};
use crate::recorder::Recorder;
use crate::track::{Acks, RoomTrack};

/// Highest latency the histograms hold, µs (values above are clamped).
pub const MAX_LATENCY_US: u64 = 120_000_000;

/// A new latency histogram (µs, 1 µs to 120 s, 2 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds")
}

/// How often a member posts.
#[derive(Debug, Clone, Copy)]
pub enum SendPlan {
    /// On an absolute schedule, one send every period from a random start: a late send does
    /// not move the ones after it (a publisher that fell behind sends back to back until it
    /// is on schedule again). Each message carries its *scheduled* time, so latency includes
    /// the publisher's own lateness, which is also recorded apart ([`Outcome::send_lag`]).
    Fixed(Duration),
    /// A uniformly random pause between the bounds (human rates).
    Random(Duration, Duration),
}

impl SendPlan {
    fn next(&self) -> Duration {
        match *self {
            SendPlan::Fixed(p) => p,
            SendPlan::Random(a, b) => random_between(a, b),
        }
    }
}

/// A uniformly random duration in `[a, b]`.
pub fn random_between(a: Duration, b: Duration) -> Duration {
    if b <= a {
        return a;
    }
    rand::thread_rng().gen_range(a..=b)
}

/// How a member behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Reads everything; posts per its [`SendPlan`], if any.
    Good,
    /// Sends as fast as it can (expects `rate_limited`, then close 4008), pauses, reconnects.
    Flood,
    /// Stops reading while posting big messages to its room (expects close 4009 once its
    /// outbound queue overflows), then reconnects with `since`.
    StopReading,
    /// Sends malformed frames (expects `error bad_request` for each).
    Garbage,
    /// Drops its TCP connection abruptly now and then and reconnects with `since`.
    Abrupt,
}

/// One simulated member.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// Picks the URL and source address.
    pub slot: usize,
    /// Its user id.
    pub user: String,
    /// Its room.
    pub room: String,
    /// How it behaves.
    pub behaviour: Behaviour,
    /// Whether (and how often) it posts.
    pub send: Option<SendPlan>,
    /// Content size in bytes.
    pub content_bytes: usize,
    /// Abrupt reconnects with `since`, every random pause in the bounds.
    pub reconnect_every: Option<(Duration, Duration)>,
    /// Leave and rejoin (without `since`), every random pause in the bounds.
    pub churn_every: Option<(Duration, Duration)>,
    /// Whether its losses count against the run.
    pub checked: bool,
}

/// Counters of one member's notable events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Messages posted.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// `error rate_limited` received.
    pub rate_limited: u64,
    /// `error bad_request` received.
    pub bad_request: u64,
    /// Other `error` frames.
    pub other_errors: u64,
    /// Garbage frames sent.
    pub garbage_sent: u64,
    /// Closes by the server, by code (`ended` when the stream ended without one).
    pub closes: BTreeMap<String, u64>,
    /// Reconnects that succeeded.
    pub reconnects: u64,
    /// Reconnects that failed.
    pub reconnect_failures: u64,
    /// Leaves that took effect.
    pub leaves: u64,
    /// Rejoins after a leave.
    pub rejoins: u64,
    /// Stall cycles that ended without any close from the server.
    pub stall_not_closed: u64,
    /// Live chat messages received.
    pub deliveries: u64,
}

impl Counts {
    /// Adds another member's counters.
    pub fn add(&mut self, o: &Counts) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.rate_limited += o.rate_limited;
        self.bad_request += o.bad_request;
        self.other_errors += o.other_errors;
        self.garbage_sent += o.garbage_sent;
        for (k, v) in &o.closes {
            *self.closes.entry(k.clone()).or_default() += v;
        }
        self.reconnects += o.reconnects;
        self.reconnect_failures += o.reconnect_failures;
        self.leaves += o.leaves;
        self.rejoins += o.rejoins;
        self.stall_not_closed += o.stall_not_closed;
        self.deliveries += o.deliveries;
    }
}

/// What a member hands back when the run ends.
#[derive(Debug)]
pub struct Outcome {
    /// Its spec.
    pub spec: MemberSpec,
    /// Whether its first connect and join succeeded.
    pub connected: bool,
    /// What it saw of its room.
    pub track: RoomTrack,
    /// Live send-to-deliver latencies, µs.
    pub latency: Option<Histogram<u64>>,
    /// For a [`SendPlan::Fixed`] publisher: how late each send was against its schedule, µs.
    pub send_lag: Option<Histogram<u64>>,
    /// For a [`SendPlan::Fixed`] publisher: sends that were due before sending stopped but
    /// were not made.
    pub unsent: u64,
    /// Its counters.
    pub counts: Counts,
}

/// State shared by every member of a run and the driver.
pub struct Ctx {
    /// Opens connections.
    pub dialer: Dialer,
    /// Acked seqs per room.
    pub acks: Acks,
    /// Members may start posting (and misbehaving).
    pub go: CancellationToken,
    /// Members stop posting, churning and reconnecting; they keep reading.
    pub stop_send: CancellationToken,
    /// Members close and hand back their outcome.
    pub stop: CancellationToken,
    /// Members whose first join succeeded.
    pub joined: AtomicU64,
    /// Members whose first connect or join failed.
    pub failed: AtomicU64,
    /// Live message deliveries, all members.
    pub deliveries: AtomicU64,
    /// Sends not yet answered by an ack or error.
    pub pending: AtomicI64,
    /// Members in the middle of a reconnect or rejoin.
    pub busy: AtomicI64,
    /// When the latest first join completed, ns after `origin`.
    pub last_join_ns: AtomicU64,
    /// When the latest delivery arrived, unix ns.
    pub last_delivery_ns: AtomicU64,
    /// Connect failures by category.
    pub failures: Mutex<BTreeMap<String, u64>>,
    /// The run's time origin.
    pub origin: Instant,
    /// The same origin, unix ns (to line up figures of several processes).
    pub origin_unix_ns: u64,
}

impl Ctx {
    /// A context for a run over `dialer`.
    pub fn new(dialer: Dialer) -> Arc<Ctx> {
        Arc::new(Ctx {
            dialer,
            acks: Acks::default(),
            go: CancellationToken::new(),
            stop_send: CancellationToken::new(),
            stop: CancellationToken::new(),
            joined: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            pending: AtomicI64::new(0),
            busy: AtomicI64::new(0),
            last_join_ns: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            origin: Instant::now(),
            origin_unix_ns: unix_nanos(),
        })
    }

    fn fail(&self, why: String) {
        *self
            .failures
            .lock()
            .expect("failures lock")
            .entry(why)
            .or_default() += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Joined,
    Leaving,
    Out,
    Rejoining,
}

struct Member {
    ctx: Arc<Ctx>,
    spec: MemberSpec,
    track: RoomTrack,
    latency: Option<Recorder>,
    send_lag: Option<Histogram<u64>>,
    unsent: u64,
    counts: Counts,
    seq_no: u64,
    padding: String,
    /// Sends of this member not yet answered (mirrored in `ctx.pending`).
    pending: i64,
}

const FAR: Duration = Duration::from_secs(86_400 * 365);

impl Member {
    /// `<stamp>:<padding>`, `stamp` the send time in unix ns.
    fn content(&self, stamp: u64) -> String {
        let mut s = stamp.to_string();
        s.push(':');
        let pad = self.spec.content_bytes.saturating_sub(s.len()).max(1);
        s.push_str(&self.padding[..pad.min(self.padding.len())]);
        s
    }

    fn send_frame(&mut self) -> Message {
        self.send_frame_at(unix_nanos())
    }

    /// A `send` frame whose content carries `stamp` (unix ns) as its send time.
    fn send_frame_at(&mut self, stamp: u64) -> Message {
        self.seq_no += 1;
        self.counts.sent += 1;
        self.pending += 1;
        self.ctx.pending.fetch_add(1, Ordering::Relaxed);
        let frame = ClientFrame::Send {
            room: self.spec.room.clone(),
            content: self.content(stamp),
            id: Some(format!("{}-{}", self.spec.user, self.seq_no)),
        };
        Message::text(encode(&frame))
    }

    /// Handles one text frame. Returns whether a `left` arrived.
    fn on_text(&mut self, text: &str, live: bool) -> bool {
        let Some(frame) = Incoming::parse(text) else {
            self.counts.other_errors += 1;
            return false;
        };
        if frame.room.as_deref().is_some_and(|r| r != self.spec.room) {
            return false;
        }
        match &*frame.ty {
            "message" | "system" => {
                if let Some(seq) = frame.seq {
                    self.track.record(seq, true);
                }
                if frame.ty == "message" {
                    if let Some(sent) = frame.sent_nanos() {
                        let now = unix_nanos();
                        self.counts.deliveries += 1;
                        self.ctx.deliveries.fetch_add(1, Ordering::Relaxed);
                        self.ctx.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
                        if live {
                            if let Some(recorder) = &mut self.latency {
                                recorder.record(now.saturating_sub(sent) / 1000);
                            }
                        }
                    }
                }
            }
            "ack" => {
                self.counts.acked += 1;
                self.answered();
                if let Some(seq) = frame.seq {
                    self.ctx.acks.record(&self.spec.room, seq);
                }
            }
            "error" => {
                if frame.id.is_some() {
                    self.answered();
                }
                match frame.code.as_deref() {
                    Some("rate_limited") => self.counts.rate_limited += 1,
                    Some("bad_request") => self.counts.bad_request += 1,
                    _ => self.counts.other_errors += 1,
                }
            }
            "left" => {
                self.track.on_left();
                self.counts.leaves += 1;
                return true;
            }
            "joined" => {
                let joined = Joined::from_frame(&frame);
                self.track.on_joined(&joined, false);
                self.counts.rejoins += 1;
            }
            _ => {}
        }
        false
    }

    async fn connect(&mut self, resume: bool) -> Option<Ws> {
        let join = JoinRequest {
            room: self.spec.room.clone(),
            resume: (resume && !self.track.intervals.is_empty())
                .then(|| (self.track.last, self.track.epoch.clone())),
        };
        let rcvbuf = (self.spec.behaviour == Behaviour::StopReading).then_some(4096);
        match self
            .ctx
            .dialer
            .connect(self.spec.slot, &self.spec.user, Some(&join), rcvbuf)
            .await
        {
            Ok((ws, joined)) => {
                if let Some(joined) = joined {
                    self.track.on_joined(&joined, join.resume.is_some());
                }
                Some(ws)
            }
            Err(why) => {
                self.ctx.fail(why);
                None
            }
        }
    }

    fn answered(&mut self) {
        if self.pending > 0 {
            self.pending -= 1;
            self.ctx.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets sends that the lost connection will never answer.
    fn abandon_pending(&mut self) {
        self.ctx.pending.fetch_sub(self.pending, Ordering::Relaxed);
        self.pending = 0;
    }

    fn closed(&mut self, code: Option<u16>) {
        let key = code.map_or("ended".to_owned(), |c| c.to_string());
        *self.counts.closes.entry(key).or_default() += 1;
    }

    async fn run(mut self) -> Outcome {
        let Some(mut ws) = self.connect(false).await else {
            self.ctx.failed.fetch_add(1, Ordering::Relaxed);
            return self.outcome(false);
        };
        self.ctx.joined.fetch_add(1, Ordering::Relaxed);
        self.ctx.last_join_ns.fetch_max(
            self.ctx.origin.elapsed().as_nanos() as u64,
            Ordering::Relaxed,
        );
        let mut go = false;
        let mut sending = false;
        let mut membership = Membership::Joined;
        let far = Instant::now() + FAR;
        let (mut next_send, mut next_reconnect, mut next_churn) = (far, far, far);
        // Stop-reading cycle: while `stall_until` is set the member does not read.
        let mut stall_until: Option<Instant> = None;
        let mut close_deadline: Option<Instant> = None;
        let mut stall_burst = false;
        let mut alive = true;
        // The select below runs once per received frame, so its futures live across turns:
        // a fresh `sleep_until` or `cancelled()` per turn registers and deregisters a timer or
        // waiter each time (most of the bench's CPU per delivery before this).
        let ctx = self.ctx.clone();
        let (stop, go_now, stop_sending) = (
            ctx.stop.cancelled(),
            ctx.go.cancelled(),
            ctx.stop_send.cancelled(),
        );
        tokio::pin!(stop, go_now, stop_sending);
        let (send_timer, close_timer, reconnect_timer, churn_timer) = (
            sleep_until(far),
            sleep_until(far),
            sleep_until(far),
            sleep_until(far),
        );
        tokio::pin!(send_timer, close_timer, reconnect_timer, churn_timer);
        loop {
            let reading = alive && stall_until.is_none();
            for (timer, at) in [
                (send_timer.as_mut(), next_send),
                (close_timer.as_mut(), close_deadline.unwrap_or(far)),
                (reconnect_timer.as_mut(), next_reconnect),
                (churn_timer.as_mut(), next_churn),
            ] {
                if timer.deadline() != at {
                    timer.reset(at);
                }
            }
            // Biased: timers before the socket, so a member with a backlog to read still posts
            // on time. Each cancellation future completes once: `go` and `sending` turn its
            // branch off after it fires.
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = &mut go_now, if !go => {
                    go = true;
                    sending = true;
                    let now = Instant::now();
                    if self.spec.behaviour == Behaviour::StopReading {
                        // Stalled readers start together so each sees the others' posts.
                        next_send = now + Duration::from_secs(1);
                    } else if let Some(plan) = self.spec.send {
                        next_send = now + match plan {
                            SendPlan::Fixed(p) => random_between(Duration::ZERO, p),
                            SendPlan::Random(_, b) => random_between(Duration::ZERO, b),
                        };
                    }
                    if let Some((a, b)) = self.spec.reconnect_every {
                        next_reconnect = now + random_between(a, b);
                    }
                    if let Some((a, b)) = self.spec.churn_every {
                        next_churn = now + random_between(a, b);
                    }
                }
                _ = &mut stop_sending, if sending => {
                    sending = false;
                    if let (Some(SendPlan::Fixed(p)), Behaviour::Good) = (self.spec.send, self.spec.behaviour) {
                        let now = Instant::now();
                        if next_send <= now && !p.is_zero() {
                            self.unsent += ((now - next_send).as_nanos() / p.as_nanos()) as u64 + 1;
                        }
                    }
                    (next_send, next_reconnect) = (far, far);
                    if membership == Membership::Joined || membership == Membership::Leaving {
                        next_churn = far;
                    } else {
                        next_churn = Instant::now();
                    }
                    if stall_until.take().is_some() {
                        // Read again: the server's close (or the backlog) follows.
                        close_deadline = Some(Instant::now() + Duration::from_secs(8));
                    }
                }
                _ = &mut send_timer, if sending && alive && membership == Membership::Joined => {
                    let plan = self.spec.send.expect("a send time implies a plan");
                    match self.spec.behaviour {
                        Behaviour::Flood => {
                            for _ in 0..30 {
                                let m = self.send_frame();
                                if ws.feed(m).await.is_err() { break; }
                            }
                            if ws.flush().await.is_err() { alive = false; }
                        }
                        Behaviour::Garbage => {
                            let garbage = match self.counts.garbage_sent % 4 {
                                0 => Message::text("{not json"),
                                1 => Message::text(r#"{"type":"nope"}"#),
                                2 => Message::text(r#"{"type":"send","room":"x"}"#),
                                _ => Message::binary(vec![1u8, 2, 3]),
                            };
                            self.counts.garbage_sent += 1;
                            if ws.send(garbage).await.is_err() { alive = false; }
                        }
                        Behaviour::StopReading => {
                            let now = Instant::now();
                            if stall_until.is_none() {
                                stall_burst = true;
                            }
                            let until = *stall_until.get_or_insert(now + Duration::from_secs(8));
                            if now >= until {
                                stall_until = None;
                                close_deadline = Some(now + Duration::from_secs(8));
                                next_send = far;
                            } else {
                                // Post big messages to the shared slow room without reading:
                                // the burst, then under the rate limit.
                                let n = if self.counts.sent == 0 || stall_burst { 15 } else { 1 };
                                stall_burst = false;
                                for _ in 0..n {
                                    let m = self.send_frame();
                                    if ws.feed(m).await.is_err() { break; }
                                }
                                if ws.flush().await.is_err() {
                                    stall_until = None;
                                    alive = false;
                                }
                                next_send = now + Duration::from_millis(125);
                            }
                        }
                        Behaviour::Good | Behaviour::Abrupt => {
                            let m = match (plan, &mut self.send_lag) {
                                (SendPlan::Fixed(_), Some(lag)) => {
                                    // Stamp the scheduled time: lateness counts as latency.
                                    let late = Instant::now().saturating_duration_since(next_send);
                                    let _ = lag.record((late.as_micros() as u64).clamp(1, MAX_LATENCY_US));
                                    self.send_frame_at(unix_nanos().saturating_sub(late.as_nanos() as u64))
                                }
                                _ => self.send_frame(),
                            };
                            if ws.send(m).await.is_err() { alive = false; }
                        }
                    }
                    if self.spec.behaviour != Behaviour::StopReading {
                        next_send += plan.next();
                    }
                    if self.send_lag.is_none() && next_send < Instant::now() - Duration::from_secs(1) {
                        // Far behind (overloaded client): do not burst to catch up.
                        next_send = Instant::now();
                    }
                }
                _ = &mut close_timer, if close_deadline.is_some() && alive => {
                    self.counts.stall_not_closed += 1;
                    close_deadline = None;
                    if let Some(plan) = self.spec.send {
                        next_send = Instant::now() + plan.next();
                    }
                }
                _ = &mut reconnect_timer, if sending && alive => {
                    // Abrupt: drop the TCP connection without a close handshake.
                    drop(ws);
                    self.abandon_pending();
                    self.ctx.busy.fetch_add(1, Ordering::Relaxed);
                    let reconnected = self.connect(true).await;
                    self.ctx.busy.fetch_sub(1, Ordering::Relaxed);
                    match reconnected {
                        Some(new) => { ws = new; self.counts.reconnects += 1; }
                        None => {
                            self.counts.reconnect_failures += 1;
                            self.ctx.joined.fetch_sub(1, Ordering::Relaxed);
                            return self.outcome(true);
                        }
                    }
                    membership = Membership::Joined;
                    if let Some((a, b)) = self.spec.reconnect_every {
                        next_reconnect = Instant::now() + random_between(a, b);
                    }
                }
                _ = &mut churn_timer, if alive && go && matches!(membership, Membership::Joined | Membership::Out) => {
                    let frame = if membership == Membership::Joined {
                        membership = Membership::Leaving;
                        self.ctx.busy.fetch_add(1, Ordering::Relaxed);
                        ClientFrame::Leave { room: self.spec.room.clone(), id: None }
                    } else {
                        membership = Membership::Rejoining;
                        ClientFrame::Join {
                            room: self.spec.room.clone(),
                            since: None,
                            epoch: None,
                            id: None,
                        }
                    };
                    next_churn = far;
                    if ws.send(Message::text(encode(&frame))).await.is_err() { alive = false; }
                }
                msg = ws.next(), if reading => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if self.on_text(&text, true) {
                            membership = Membership::Out;
                            if let Some((a, b)) = self.spec.churn_every {
                                let pause = random_between(a / 10, b / 10);
                                next_churn = if sending { Instant::now() + pause } else { Instant::now() };
                            }
                        } else if membership == Membership::Rejoining && self.track.intervals.last().is_some_and(|i| i.1.is_none()) {
                            membership = Membership::Joined;
                            self.ctx.busy.fetch_sub(1, Ordering::Relaxed);
                            if let (Some((a, b)), true) = (self.spec.churn_every, sending) {
                                next_churn = Instant::now() + random_between(a, b);
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        self.closed(Some(frame.map_or(1005, |f| u16::from(f.code))));
                        alive = false;
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => {
                        self.closed(None);
                        alive = false;
                    }
                },
            }
            if !alive {
                if self.ctx.stop.is_cancelled() {
                    break;
                }
                close_deadline = None;
                stall_until = None;
                self.abandon_pending();
                if membership != Membership::Joined {
                    self.ctx.busy.fetch_sub(1, Ordering::Relaxed);
                    membership = Membership::Joined;
                }
                // Misbehaving clients pause before coming back (4008 is terminal for a while).
                if self.spec.behaviour == Behaviour::Flood {
                    tokio::select! {
                        _ = self.ctx.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                    }
                }
                self.ctx.busy.fetch_add(1, Ordering::Relaxed);
                let reconnected = self.connect(true).await;
                self.ctx.busy.fetch_sub(1, Ordering::Relaxed);
                match reconnected {
                    Some(new) => {
                        ws = new;
                        alive = true;
                        self.counts.reconnects += 1;
                        if let (Some(plan), true) = (self.spec.send, sending) {
                            next_send = Instant::now() + plan.next();
                        }
                    }
                    None => {
                        self.counts.reconnect_failures += 1;
                        return self.outcome(true);
                    }
                }
            }
        }
        if alive {
            let _ = ws.close(None).await;
        }
        self.outcome(true)
    }

    fn outcome(mut self, connected: bool) -> Outcome {
        self.abandon_pending();
        Outcome {
            spec: self.spec,
            connected,
            track: self.track,
            latency: self.latency.map(Recorder::finish),
            send_lag: self.send_lag,
            unsent: self.unsent,
            counts: self.counts,
        }
    }
}

/// Runs one member until `ctx.stop`; latencies are recorded when `record_latency`.
pub async fn run_member(ctx: Arc<Ctx>, spec: MemberSpec, record_latency: bool) -> Outcome {
    let padding = "x".repeat(spec.content_bytes.max(1));
    let scheduled = matches!(
        (spec.send, spec.behaviour),
        (Some(SendPlan::Fixed(_)), Behaviour::Good)
    );
    Member {
        ctx,
        spec,
        track: RoomTrack::default(),
        latency: record_latency.then(Recorder::default),
        send_lag: scheduled.then(new_histogram),
        unsent: 0,
        counts: Counts::default(),
        seq_no: 0,
        padding,
        pending: 0,
    }
    .run()
    .await
}
