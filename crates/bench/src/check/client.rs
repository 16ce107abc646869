//! The workload: one task per client connection. It connects to a random node, joins its
//! rooms (resuming with `since`/`epoch` when it has seen the room before), sends messages with
//! unique ids (and resends unanswered ones with the same id and content after a reconnect),
//! leaves and rejoins, reconnects, and drops its socket when the nemesis says so. It records
//! every frame and, per joined stream (a [`Segment`]), what it saw, for the checks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::received::{self, Event, Received};
use parley_protocol::ClientFrame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{Dialer, Ws};

/// What the clients are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Random actions.
    Run,
    /// Stay connected, be joined to every room of the client, get every send acked.
    Settle,
    /// Close and hand back.
    Stop,
}

/// One client connection's identity and rooms.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Index (and name `c<index>`).
    pub index: usize,
    /// Its user (two clients may share one).
    pub user: String,
    /// The rooms it joins.
    pub rooms: Vec<String>,
    /// Its random seed.
    pub seed: u64,
}

/// One joined stream: from a `joined` frame to its end.
#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    /// The client.
    pub client: usize,
    /// The node it was connected to.
    pub node: usize,
    /// The connection's number within the client.
    pub conn: u64,
    /// The room.
    pub room: String,
    /// `since` and `epoch` of the join, if it resumed.
    pub since: Option<(u64, String)>,
    /// `joined.epoch`.
    pub epoch: String,
    /// `joined.seq`.
    pub joined_seq: u64,
    /// `joined.recovered`.
    pub recovered: Option<bool>,
    /// `joined.truncated`.
    pub truncated: bool,
    /// `joined.history`: seq and fingerprint.
    pub history: Vec<(u64, String)>,
    /// Live events: seq and fingerprint.
    pub live: Vec<(u64, String)>,
    /// How it ended (`None`: still open).
    pub end: Option<String>,
}

impl Segment {
    /// The last seq the stream saw.
    pub fn last_seen(&self) -> u64 {
        self.live.last().map_or(self.joined_seq, |e| e.0)
    }
}

/// An ack as the sender got it.
#[derive(Debug, Clone, Serialize)]
pub struct AckRec {
    /// The client.
    pub client: usize,
    /// The sender.
    pub user: String,
    /// The room.
    pub room: String,
    /// The message id.
    pub id: String,
    /// Its content.
    pub content: String,
    /// The acked seq.
    pub seq: u64,
    /// The epoch of the stream the client was in when it was acked.
    pub epoch: String,
    /// `duplicate: true`.
    pub duplicate: bool,
}

/// A frame a client saw, or a note, with its time.
#[derive(Debug, Clone)]
pub struct Line {
    /// Milliseconds since the run started.
    pub ms: u64,
    /// The room it is about, if any.
    pub room: Option<String>,
    /// `c3 n1 < {...}` style text.
    pub text: String,
}

/// Counters of one client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Connections opened.
    pub connects: u64,
    /// Connects that failed.
    pub connect_failures: u64,
    /// `send` frames written (resends included).
    pub sends: u64,
    /// Acks.
    pub acks: u64,
    /// Acks with `duplicate: true`.
    pub duplicate_acks: u64,
    /// Live events.
    pub events: u64,
    /// Leaves sent.
    pub leaves: u64,
    /// Joins sent.
    pub joins: u64,
    /// Joins with `since`.
    pub resumes: u64,
    /// `recovered: false` answers.
    pub not_recovered: u64,
    /// `error` frames, by code.
    pub errors: BTreeMap<String, u64>,
    /// Closes by the server, by code.
    pub closes: BTreeMap<String, u64>,
    /// Sockets dropped on the nemesis's order.
    pub dropped: u64,
}

/// What one client recorded.
#[derive(Debug, Default)]
pub struct Record {
    /// Its streams.
    pub segments: Vec<Segment>,
    /// Its acks.
    pub acks: Vec<AckRec>,
    /// Leaves sent with sends of the room unanswered (checked by `order`).
    pub order_checked: u64,
    /// `left` before the ack of an earlier send.
    pub order_violations: Vec<(String, String)>,
    /// Frames it could not make sense of, and errors that must not happen (`id_conflict`...).
    pub protocol_errors: Vec<(Option<String>, String)>,
    /// Every frame and note.
    pub lines: Vec<Line>,
    /// Counters.
    pub counts: Counts,
}

/// The handle the run keeps on a client.
pub struct ClientCtl {
    /// Its spec.
    pub spec: ClientSpec,
    /// Drop the socket now (nemesis).
    pub drop_now: Notify,
    /// In [`Phase::Settle`]: connected, joined to all its rooms, nothing unacked.
    pub settled: AtomicBool,
    /// What it recorded.
    pub record: Mutex<Record>,
}

/// What every client shares.
pub struct Shared {
    /// Connects to the nodes (slot = node index).
    pub dialer: Dialer,
    /// Number of nodes.
    pub nodes: usize,
    /// The phase.
    pub phase: watch::Receiver<Phase>,
    /// The run's start.
    pub origin: Instant,
}

/// A message's fingerprint: what two observers of one (room, epoch, seq) must agree on.
pub fn fingerprint(e: &Event) -> String {
    match e {
        Event::Message(m) => message_fp(&m.user, m.id.as_deref().unwrap_or(""), &m.content),
        Event::System(s) => format!("system {} {}", s.event, s.user),
    }
}

/// The fingerprint of a message by its parts.
pub fn message_fp(user: &str, id: &str, content: &str) -> String {
    format!("message {user} id={id} {content:?}")
}

enum RoomState {
    Joining {
        id: String,
        since: Option<(u64, String)>,
    },
    Joined {
        seg: usize,
    },
    Leaving {
        id: String,
        seg: usize,
        unanswered: Vec<String>,
    },
}

enum End {
    Reconnect,
    Stop,
}

struct Client {
    ctl: Arc<ClientCtl>,
    shared: Arc<Shared>,
    rng: StdRng,
    /// Last (seq, epoch) seen per room, for `since`.
    resume: HashMap<String, (u64, String)>,
    /// Sends not acked yet: id -> (room, content).
    pending: BTreeMap<String, (String, String)>,
    next: u64,
    conn: u64,
    node: usize,
    rooms: HashMap<String, RoomState>,
    /// Sends written on this connection and not answered: id -> room.
    inflight: HashMap<String, String>,
}

/// Runs one client until [`Phase::Stop`].
pub async fn run(ctl: Arc<ClientCtl>, shared: Arc<Shared>) {
    let mut c = Client {
        rng: StdRng::seed_from_u64(ctl.spec.seed),
        ctl,
        shared,
        resume: HashMap::new(),
        pending: BTreeMap::new(),
        next: 0,
        conn: 0,
        node: 0,
        rooms: HashMap::new(),
        inflight: HashMap::new(),
    };
    loop {
        if *c.shared.phase.borrow() == Phase::Stop {
            return;
        }
        let node = c.rng.gen_range(0..c.shared.nodes);
        let user = c.ctl.spec.user.clone();
        // The dialer's slot picks the URL (slot mod nodes) and then the source address (the
        // client's own, with `--source-ips`).
        let slot = c.ctl.spec.index * c.shared.nodes + node;
        let attempt = timeout(
            Duration::from_secs(3),
            c.shared.dialer.connect(slot, &user, None, None),
        )
        .await;
        let ws = match attempt {
            Ok(Ok((ws, _))) => ws,
            other => {
                let why = match other {
                    Ok(Err(e)) => e,
                    _ => "timeout".to_owned(),
                };
                c.note(None, format!("connect to n{node} failed: {why}"));
                c.rec().counts.connect_failures += 1;
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        c.conn += 1;
        c.node = node;
        c.rec().counts.connects += 1;
        c.note(
            None,
            format!("connected to n{node} (connection {})", c.conn),
        );
        match c.session(ws).await {
            End::Stop => return,
            End::Reconnect => {
                let pause = c.rng.gen_range(20..300);
                sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

impl Client {
    fn rec(&self) -> std::sync::MutexGuard<'_, Record> {
        self.ctl.record.lock().expect("record lock")
    }

    fn ms(&self) -> u64 {
        self.shared.origin.elapsed().as_millis() as u64
    }

    fn note(&self, room: Option<&str>, text: String) {
        let line = Line {
            ms: self.ms(),
            room: room.map(str::to_owned),
            text: format!("c{} n{} # {text}", self.ctl.spec.index, self.node),
        };
        self.rec().lines.push(line);
    }

    fn protocol_error(&self, room: Option<&str>, text: String) {
        self.note(room, format!("PROTOCOL ERROR: {text}"));
        self.rec()
            .protocol_errors
            .push((room.map(str::to_owned), text));
    }

    async fn write(&mut self, ws: &mut Ws, frame: &ClientFrame) -> bool {
        let text = serde_json::to_string(frame).expect("frame encodes");
        let line = Line {
            ms: self.ms(),
            room: frame.room().map(str::to_owned),
            text: format!("c{} n{} > {text}", self.ctl.spec.index, self.node),
        };
        self.rec().lines.push(line);
        timeout(Duration::from_secs(2), ws.send(Message::text(text)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn ends_all(&mut self, why: &str) {
        let segs: Vec<usize> = self
            .rooms
            .values()
            .filter_map(|s| match s {
                RoomState::Joined { seg } | RoomState::Leaving { seg, .. } => Some(*seg),
                RoomState::Joining { .. } => None,
            })
            .collect();
        let mut rec = self.rec();
        for seg in segs {
            rec.segments[seg].end = Some(why.to_owned());
        }
        drop(rec);
        self.rooms.clear();
        self.inflight.clear();
    }

    async fn join(&mut self, ws: &mut Ws, room: &str) -> bool {
        self.next += 1;
        let id = format!("j{}", self.next);
        let since = if self.rng.gen_bool(0.85) {
            self.resume.get(room).cloned()
        } else {
            None
        };
        let frame = ClientFrame::Join {
            room: room.to_owned(),
            since: since.as_ref().map(|s| s.0),
            epoch: since.as_ref().map(|s| s.1.clone()),
            id: Some(id.clone()),
        };
        {
            let mut rec = self.rec();
            rec.counts.joins += 1;
            if since.is_some() {
                rec.counts.resumes += 1;
            }
        }
        self.rooms
            .insert(room.to_owned(), RoomState::Joining { id, since });
        self.write(ws, &frame).await
    }

    /// Sends (or resends) a message to `room`; returns false if the socket failed.
    async fn send(&mut self, ws: &mut Ws, room: &str) -> bool {
        // An unanswered earlier message of the room first, with its id and content.
        let retry = self
            .pending
            .iter()
            .find(|(id, (r, _))| r == room && !self.inflight.contains_key(*id))
            .map(|(id, (_, content))| (id.clone(), content.clone()));
        let (id, content) = match retry {
            Some(x) => x,
            None => {
                self.next += 1;
                let id = format!("c{}-m{}", self.ctl.spec.index, self.next);
                let salt: u32 = self.rng.gen();
                let content = format!("{id} {salt:08x}");
                self.pending
                    .insert(id.clone(), (room.to_owned(), content.clone()));
                (id, content)
            }
        };
        self.inflight.insert(id.clone(), room.to_owned());
        self.rec().counts.sends += 1;
        let frame = ClientFrame::Send {
            room: room.to_owned(),
            content,
            id: Some(id),
        };
        self.write(ws, &frame).await
    }

    fn joined_rooms(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, s)| matches!(s, RoomState::Joined { .. }))
            .map(|(r, _)| r.clone())
            .collect();
        v.sort();
        v
    }

    async fn session(&mut self, mut ws: Ws) -> End {
        let rooms = self.ctl.spec.rooms.clone();
        for room in &rooms {
            if !self.join(&mut ws, room).await {
                self.ends_all("write failed");
                return End::Reconnect;
            }
        }
        let mut phase_rx = self.shared.phase.clone();
        let mut next_action = Instant::now() + Duration::from_millis(self.rng.gen_range(50..400));
        loop {
            let phase = *phase_rx.borrow_and_update();
            if phase == Phase::Stop {
                let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                self.ends_all("client closed (end of run)");
                return End::Stop;
            }
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_text(&text),
                    Some(Ok(Message::Close(close))) => {
                        let code = close.map_or(1005, |f| u16::from(f.code));
                        self.note(None, format!("closed by the server: {code}"));
                        *self.rec().counts.closes.entry(code.to_string()).or_default() += 1;
                        self.ends_all(&format!("close {code}"));
                        return End::Reconnect;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        self.note(None, format!("socket error: {e}"));
                        self.ends_all("socket error");
                        return End::Reconnect;
                    }
                    None => {
                        self.note(None, "socket ended".into());
                        self.ends_all("socket ended");
                        return End::Reconnect;
                    }
                },
                () = self.ctl.drop_now.notified() => {
                    self.note(None, "NEMESIS: socket dropped".into());
                    self.rec().counts.dropped += 1;
                    self.ends_all("dropped by the nemesis");
                    return End::Reconnect;
                }
                _ = phase_rx.changed() => {}
                () = tokio::time::sleep_until(next_action) => {
                    let ok = match phase {
                        Phase::Run => {
                            next_action = Instant::now()
                                + Duration::from_millis(self.rng.gen_range(150..700));
                            match self.act(&mut ws).await {
                                Some(ok) => ok,
                                None => {
                                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                                    self.note(None, "reconnecting (client's choice)".into());
                                    self.ends_all("client closed (reconnect)");
                                    return End::Reconnect;
                                }
                            }
                        }
                        Phase::Settle | Phase::Stop => {
                            next_action = Instant::now() + Duration::from_millis(100);
                            self.settle(&mut ws).await
                        }
                    };
                    if !ok {
                        self.note(None, "write failed".into());
                        self.ends_all("write failed");
                        return End::Reconnect;
                    }
                }
            }
        }
    }

    /// One random action. `None`: reconnect.
    async fn act(&mut self, ws: &mut Ws) -> Option<bool> {
        let roll = self.rng.gen_range(0..100);
        let joined = self.joined_rooms();
        let missing: Vec<String> = self
            .ctl
            .spec
            .rooms
            .iter()
            .filter(|r| !self.rooms.contains_key(*r))
            .cloned()
            .collect();
        if roll < 3 {
            return None;
        }
        if !missing.is_empty() && (roll < 15 || joined.is_empty()) {
            let room = missing[self.rng.gen_range(0..missing.len())].clone();
            return Some(self.join(ws, &room).await);
        }
        if joined.is_empty() {
            return Some(true);
        }
        let room = joined[self.rng.gen_range(0..joined.len())].clone();
        if roll < 22 {
            let Some(RoomState::Joined { seg }) = self.rooms.remove(&room) else {
                return Some(true);
            };
            // Often send right before the leave, to check the ack comes before `left`.
            if self.rng.gen_bool(0.7) && !self.send(ws, &room).await {
                // Still joined: the stream ends with the connection (`ends_all`), not open.
                self.rooms.insert(room, RoomState::Joined { seg });
                return Some(false);
            }
            self.next += 1;
            let id = format!("l{}", self.next);
            let unanswered: Vec<String> = self
                .inflight
                .iter()
                .filter(|(_, r)| **r == room)
                .map(|(id, _)| id.clone())
                .collect();
            self.rooms.insert(
                room.clone(),
                RoomState::Leaving {
                    id: id.clone(),
                    seg,
                    unanswered,
                },
            );
            self.rec().counts.leaves += 1;
            let frame = ClientFrame::Leave { room, id: Some(id) };
            return Some(self.write(ws, &frame).await);
        }
        Some(self.send(ws, &room).await)
    }

    /// Settling: join every room, resend what is unacked; mark settled when done.
    async fn settle(&mut self, ws: &mut Ws) -> bool {
        let missing: Vec<String> = self
            .ctl
            .spec
            .rooms
            .iter()
            .filter(|r| !self.rooms.contains_key(*r))
            .cloned()
            .collect();
        for room in &missing {
            if !self.join(ws, room).await {
                return false;
            }
        }
        let retry: BTreeSet<String> = self
            .pending
            .iter()
            .filter(|(id, (room, _))| {
                !self.inflight.contains_key(*id)
                    && matches!(self.rooms.get(room), Some(RoomState::Joined { .. }))
            })
            .map(|(_, (room, _))| room.clone())
            .collect();
        for room in retry {
            if !self.send(ws, &room).await {
                return false;
            }
        }
        let all_joined = self
            .ctl
            .spec
            .rooms
            .iter()
            .all(|r| matches!(self.rooms.get(r), Some(RoomState::Joined { .. })));
        self.ctl
            .settled
            .store(all_joined && self.pending.is_empty(), Ordering::SeqCst);
        true
    }

    fn seg_of(&self, room: &str) -> Option<usize> {
        match self.rooms.get(room)? {
            RoomState::Joined { seg } | RoomState::Leaving { seg, .. } => Some(*seg),
            RoomState::Joining { .. } => None,
        }
    }

    fn on_text(&mut self, text: &str) {
        let frame = match received::parse(text) {
            Ok(f) => f,
            Err(e) => {
                self.protocol_error(None, format!("unparsable frame {text}: {e}"));
                return;
            }
        };
        let room = match &frame {
            Received::Joined(j) => Some(j.room.clone()),
            Received::Message(m) => Some(m.room.clone()),
            Received::System(s) => Some(s.room.clone()),
            Received::Left { room, .. }
            | Received::Ack { room, .. }
            | Received::History { room, .. }
            | Received::Typing { room, .. } => Some(room.clone()),
            Received::Error { room, .. } => room.clone(),
            _ => None,
        };
        let line = Line {
            ms: self.ms(),
            room: room.clone(),
            text: format!("c{} n{} < {text}", self.ctl.spec.index, self.node),
        };
        self.rec().lines.push(line);
        match frame {
            Received::Joined(j) => self.on_joined(j),
            Received::Message(m) => {
                let fp = message_fp(&m.user, m.id.as_deref().unwrap_or(""), &m.content);
                self.on_event(&m.room, m.seq, fp);
            }
            Received::System(s) => {
                let fp = format!("system {} {}", s.event, s.user);
                self.on_event(&s.room, s.seq, fp);
            }
            Received::Ack {
                id,
                room,
                seq,
                duplicate,
            } => {
                let Some(id) = id else {
                    self.protocol_error(Some(&room), "ack without id".into());
                    return;
                };
                self.inflight.remove(&id);
                let Some((_, content)) = self.pending.remove(&id) else {
                    self.protocol_error(Some(&room), format!("ack for unknown id {id}"));
                    return;
                };
                let epoch = match self.seg_of(&room) {
                    Some(seg) => self.rec().segments[seg].epoch.clone(),
                    None => self
                        .resume
                        .get(&room)
                        .map(|r| r.1.clone())
                        .unwrap_or_default(),
                };
                let ack = AckRec {
                    client: self.ctl.spec.index,
                    user: self.ctl.spec.user.clone(),
                    room,
                    id,
                    content,
                    seq,
                    epoch,
                    duplicate,
                };
                let mut rec = self.rec();
                rec.counts.acks += 1;
                if duplicate {
                    rec.counts.duplicate_acks += 1;
                }
                rec.acks.push(ack);
            }
            Received::Left { room, id, .. } => match self.rooms.remove(&room) {
                Some(RoomState::Leaving {
                    id: want,
                    seg,
                    unanswered,
                }) => {
                    if id.as_deref() != Some(want.as_str()) {
                        self.protocol_error(
                            Some(&room),
                            format!("left with id {id:?}, want {want}"),
                        );
                    }
                    let checked = !unanswered.is_empty();
                    let late: Vec<String> = unanswered
                        .into_iter()
                        .filter(|i| self.inflight.contains_key(i))
                        .collect();
                    let mut rec = self.rec();
                    rec.segments[seg].end = Some("left".into());
                    if checked {
                        rec.order_checked += 1;
                    }
                    for i in late {
                        rec.order_violations.push((
                            room.clone(),
                            format!("c{}: left before the ack of {i}", self.ctl.spec.index),
                        ));
                    }
                }
                other => {
                    if let Some(s) = other {
                        self.rooms.insert(room.clone(), s);
                    }
                    self.protocol_error(Some(&room), "left for a room not being left".into());
                }
            },
            Received::Error { code, id, room, .. } => {
                let code_s = serde_json::to_value(code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{code:?}"));
                *self.rec().counts.errors.entry(code_s.clone()).or_default() += 1;
                let Some(id) = id else {
                    self.protocol_error(room.as_deref(), format!("error {code_s} without id"));
                    return;
                };
                if self.inflight.remove(&id).is_some() {
                    // A send: unavailable / rate_limited / not_joined are retried with the same
                    // id; anything else must not happen to this workload.
                    if !matches!(
                        code_s.as_str(),
                        "unavailable" | "rate_limited" | "not_joined"
                    ) {
                        self.pending.remove(&id);
                        self.protocol_error(room.as_deref(), format!("send {id}: error {code_s}"));
                    }
                    return;
                }
                let Some(room) = room else {
                    self.protocol_error(None, format!("error {code_s} for {id} names no room"));
                    return;
                };
                match self.rooms.get(&room) {
                    Some(RoomState::Joining { id: want, .. }) if *want == id => {
                        // The join did not happen (unavailable while Redis is away): retry later.
                        self.rooms.remove(&room);
                        if code_s != "unavailable" && code_s != "rate_limited" {
                            self.protocol_error(Some(&room), format!("join {id}: error {code_s}"));
                        }
                    }
                    Some(RoomState::Leaving { id: want, .. }) if *want == id => {
                        self.protocol_error(Some(&room), format!("leave {id}: error {code_s}"));
                    }
                    _ => self.protocol_error(
                        Some(&room),
                        format!("error {code_s} for unknown request {id}"),
                    ),
                }
            }
            Received::History { .. }
            | Received::Typing { .. }
            | Received::Pong { .. }
            | Received::Authenticated { .. }
            | Received::Refreshed { .. } => {}
        }
    }

    fn on_joined(&mut self, j: received::Joined) {
        let since = match self.rooms.get(&j.room) {
            Some(RoomState::Joining { id, since }) if j.id.as_deref() == Some(id.as_str()) => {
                since.clone()
            }
            _ => {
                self.protocol_error(Some(&j.room), "joined for a room not being joined".into());
                return;
            }
        };
        let seg = Segment {
            client: self.ctl.spec.index,
            node: self.node,
            conn: self.conn,
            room: j.room.clone(),
            since,
            epoch: j.epoch.clone(),
            joined_seq: j.seq,
            recovered: j.recovered,
            truncated: j.truncated,
            history: j
                .history
                .iter()
                .map(|e| (e.seq(), fingerprint(e)))
                .collect(),
            live: Vec::new(),
            end: None,
        };
        if j.truncated {
            self.resume.remove(&j.room);
        } else {
            self.resume.insert(j.room.clone(), (j.seq, j.epoch.clone()));
        }
        let mut rec = self.rec();
        if j.recovered == Some(false) {
            rec.counts.not_recovered += 1;
        }
        rec.segments.push(seg);
        let index = rec.segments.len() - 1;
        drop(rec);
        self.rooms.insert(j.room, RoomState::Joined { seg: index });
    }

    fn on_event(&mut self, room: &str, seq: u64, fp: String) {
        let Some(seg) = self.seg_of(room) else {
            self.protocol_error(Some(room), format!("event {seq} of a room not joined"));
            return;
        };
        let mut rec = self.rec();
        rec.counts.events += 1;
        let s = &mut rec.segments[seg];
        s.live.push((seq, fp));
        let epoch = s.epoch.clone();
        let truncated = s.truncated;
        drop(rec);
        if !truncated {
            self.resume.insert(room.to_owned(), (seq, epoch));
        }
    }
}
