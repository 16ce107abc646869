//! The background task that owns the socket and all client state. Handles talk to it over a
//! command channel; it answers through oneshot channels and room subscriptions. Every handler
//! is synchronous and queues outgoing frames; the loop writes them after each wake-up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use parley_protocol::client::ClientFrame;
use parley_protocol::codes::ErrorCode;
use parley_protocol::received::{self, Event, Joined, Received};
use parley_protocol::server::Limits;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Ack, Error, HistoryQuery, Options, Page, RoomEvent, Session, State, TokenSource};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply<T> = oneshot::Sender<Result<T, Error>>;
type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<(Box<Ws>, Option<String>), String>> + Send>>;

/// What handles ask the driver to do.
pub(crate) enum Command {
    Subscribe {
        room: String,
        tx: mpsc::UnboundedSender<RoomEvent>,
    },
    Join {
        room: String,
        reply: Reply<Joined>,
    },
    Send {
        room: String,
        content: String,
        reply: Reply<Ack>,
    },
    History {
        room: String,
        query: HistoryQuery,
        reply: Reply<Page>,
    },
    Typing {
        room: String,
    },
    Leave {
        room: String,
        reply: Reply<()>,
    },
    Reconnect,
    Close(oneshot::Sender<()>),
}

/// A refresh token fetched in the background, for connection number `conn`.
struct Refreshed {
    conn: u64,
    token: Result<String, String>,
}

enum Phase {
    Backoff(Instant),
    Connecting(ConnectFuture),
    Open(Box<Ws>),
    Closed,
}

enum Wake {
    Cmd(Option<Command>),
    Refresh(Option<Refreshed>),
    BackoffDone,
    Connected(Result<(Box<Ws>, Option<String>), String>),
    Ws(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Timer,
}

enum Kind {
    Join,
    Leave(Option<Reply<()>>),
    History(Option<Reply<Page>>),
    /// Paging forward after a truncated resume; `gen` is the room's page generation.
    Page {
        gen: u64,
    },
    Refresh,
}

struct Pending {
    kind: Kind,
    room: Option<String>,
    frame: ClientFrame,
    sent: bool,
    retry_at: Option<Instant>,
    order: u64,
}

struct OutSend {
    id: String,
    room: String,
    content: String,
    inflight: bool,
    retry_at: Option<Instant>,
    reply: Reply<Ack>,
}

/// A token bucket mirroring the server's, so the client does not get itself refused.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: u32) -> Bucket {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn fill(&mut self) {
        let now = Instant::now();
        let add = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + add).min(self.burst);
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Option<Duration> {
        self.fill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            let ms = ((1.0 - self.tokens) / self.rate * 1000.0).ceil() as u64 + 5;
            Some(Duration::from_millis(ms))
        }
    }

    /// After a refusal: nothing goes out before the server has a token again.
    fn drain(&mut self) {
        self.fill();
        self.tokens = self.tokens.min(0.0);
    }
}

#[derive(Default)]
struct RoomState {
    want: bool,
    joined: bool,
    join_id: Option<String>,
    waiters: Vec<Reply<Joined>>,
    epoch: Option<String>,
    /// Every event up to here was delivered.
    seq: u64,
    /// `joined.seq` of the current join.
    head: u64,
    catching_up: bool,
    page_gen: u64,
    /// Live events that arrived while catching up.
    buffer: BTreeMap<u64, Event>,
    members: BTreeSet<String>,
    users_known: bool,
    info: Option<Joined>,
    last_typing: Option<Instant>,
    subscribers: Vec<mpsc::UnboundedSender<RoomEvent>>,
}

impl RoomState {
    fn emit(&mut self, event: RoomEvent) {
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn emit_presence(&mut self) {
        let members = self.members.iter().cloned().collect();
        self.emit(RoomEvent::Presence(members));
    }

    fn reset(&mut self, epoch: Option<String>) {
        self.page_gen += 1;
        self.epoch = epoch;
        self.seq = 0;
        self.head = 0;
        self.catching_up = false;
        self.buffer.clear();
    }

    fn socket_gone(&mut self) {
        self.page_gen += 1;
        self.joined = false;
        self.catching_up = false;
        self.buffer.clear();
    }

    fn fail_waiters(&mut self, err: &Error) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(err.clone()));
        }
    }
}

/// Unique request ids: a random prefix and a counter.
struct Ids {
    prefix: String,
    n: u64,
}

impl Ids {
    fn new() -> Ids {
        let prefix: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(10)
            .map(char::from)
            .collect();
        Ids { prefix, n: 0 }
    }

    fn next(&mut self) -> String {
        self.n += 1;
        format!("{}-{}", self.prefix, self.n)
    }
}

fn set_id(frame: &mut ClientFrame, new: String) {
    match frame {
        ClientFrame::Auth { id, .. }
        | ClientFrame::Join { id, .. }
        | ClientFrame::Leave { id, .. }
        | ClientFrame::Send { id, .. }
        | ClientFrame::History { id, .. }
        | ClientFrame::Typing { id, .. }
        | ClientFrame::Refresh { id, .. }
        | ClientFrame::Ping { id } => *id = Some(new),
    }
}

/// Minimal percent-encoding for a query value.
fn encode_query(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(crate) struct Driver {
    url: String,
    opts: Options,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    refresh_tx: mpsc::UnboundedSender<Refreshed>,
    refresh_rx: mpsc::UnboundedReceiver<Refreshed>,
    state_tx: watch::Sender<State>,
    session_tx: watch::Sender<Option<Session>>,
    error: Arc<Mutex<Option<Error>>>,
    phase: Phase,
    /// Frames to write after this wake-up.
    out: Vec<ClientFrame>,
    authed: bool,
    terminal: bool,
    attempt: u32,
    conn: u64,
    ids: Ids,
    user_id: Option<String>,
    limits: Option<Limits>,
    exp: Option<u64>,
    pre_auth_error: Option<String>,
    rooms: HashMap<String, RoomState>,
    pending: HashMap<String, Pending>,
    order: u64,
    outbox: Vec<OutSend>,
    send_bucket: Option<Bucket>,
    join_bucket: Option<Bucket>,
    send_paused_until: Option<Instant>,
    pump_at: Option<Instant>,
    connect_deadline: Option<Instant>,
    heartbeat: Duration,
    heartbeat_at: Option<Instant>,
    last_frame_at: Instant,
    refresh_at: Option<Instant>,
}

async fn phase_next(phase: &mut Phase) -> Wake {
    match phase {
        Phase::Backoff(until) => {
            tokio::time::sleep_until(*until).await;
            Wake::BackoffDone
        }
        Phase::Connecting(fut) => Wake::Connected(fut.await),
        Phase::Open(ws) => Wake::Ws(ws.next().await),
        Phase::Closed => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    pub(crate) fn new(
        url: String,
        opts: Options,
        cmd_rx: mpsc::UnboundedReceiver<Command>,
        state_tx: watch::Sender<State>,
        session_tx: watch::Sender<Option<Session>>,
        error: Arc<Mutex<Option<Error>>>,
    ) -> Driver {
        let (refresh_tx, refresh_rx) = mpsc::unbounded_channel();
        Driver {
            url,
            opts,
            cmd_rx,
            refresh_tx,
            refresh_rx,
            state_tx,
            session_tx,
            error,
            phase: Phase::Backoff(Instant::now()),
            out: Vec::new(),
            authed: false,
            terminal: false,
            attempt: 0,
            conn: 0,
            ids: Ids::new(),
            user_id: None,
            limits: None,
            exp: None,
            pre_auth_error: None,
            rooms: HashMap::new(),
            pending: HashMap::new(),
            order: 0,
            outbox: Vec::new(),
            send_bucket: None,
            join_bucket: None,
            send_paused_until: None,
            pump_at: None,
            connect_deadline: None,
            heartbeat: Duration::from_secs(25),
            heartbeat_at: None,
            last_frame_at: Instant::now(),
            refresh_at: None,
        }
    }

    pub(crate) async fn run(mut self) {
        self.start_connect();
        let mut close_reply = None;
        loop {
            let deadline = self.next_deadline();
            let wake = tokio::select! {
                cmd = self.cmd_rx.recv() => Wake::Cmd(cmd),
                r = self.refresh_rx.recv() => Wake::Refresh(r),
                w = phase_next(&mut self.phase) => w,
                () = sleep_until_opt(deadline) => Wake::Timer,
            };
            match wake {
                Wake::Cmd(None) => {
                    self.finish(Error::Closed);
                }
                Wake::Cmd(Some(Command::Close(reply))) => {
                    self.finish(Error::Closed);
                    close_reply = Some(reply);
                }
                Wake::Cmd(Some(cmd)) => self.on_command(cmd),
                Wake::Refresh(Some(r)) => self.on_refresh_token(r),
                Wake::Refresh(None) => {}
                Wake::BackoffDone => self.start_connect(),
                Wake::Connected(result) => self.on_connected(result),
                Wake::Ws(msg) => self.on_ws(msg),
                Wake::Timer => {}
            }
            self.on_timers();
            self.flush().await;
            if self.terminal {
                break;
            }
        }
        if let Phase::Open(mut ws) = std::mem::replace(&mut self.phase, Phase::Closed) {
            let frame = CloseFrame {
                code: WsCloseCode::Normal,
                reason: "bye".into(),
            };
            let _ = WebSocketStream::close(&mut *ws, Some(frame)).await;
            // Read until the server's close answers ours, briefly.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
        // Later commands find the channel closed and answer `Closed` themselves.
    }

    fn set_state(&self, state: State) {
        self.state_tx.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    // ------------------------------------------------------------ connection

    fn start_connect(&mut self) {
        if self.terminal {
            return;
        }
        self.set_state(State::Connecting);
        let token = self.opts.token.clone();
        let mut url = self.url.clone();
        if token.is_none() {
            if let Some(user) = &self.opts.user {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str("user=");
                url.push_str(&encode_query(user));
                if let Some(name) = &self.opts.name {
                    url.push_str("&name=");
                    url.push_str(&encode_query(name));
                }
            }
        }
        let timeout = self.opts.connect_timeout;
        self.phase = Phase::Connecting(Box::pin(async move {
            let token = match token {
                Some(source) => Some(
                    source
                        .get()
                        .await
                        .map_err(|e| format!("getting a token failed: {e}"))?,
                ),
                None => None,
            };
            let (mut ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url))
                .await
                .map_err(|_| "connect timeout".to_owned())?
                .map_err(|e| format!("cannot connect: {e}"))?;
            // Without a token: in jwt mode any frame but auth gets close 4001 at once, which is
            // how a token-less client learns that the server wants one; in anonymous mode it is
            // a ping.
            let first = match &token {
                Some(token) => ClientFrame::Auth {
                    token: token.clone(),
                    id: None,
                },
                None => ClientFrame::Ping { id: None },
            };
            let text = serde_json::to_string(&first).expect("frames encode");
            ws.send(Message::text(text))
                .await
                .map_err(|e| format!("cannot send auth: {e}"))?;
            Ok((Box::new(ws), token))
        }));
    }

    fn on_connected(&mut self, result: Result<(Box<Ws>, Option<String>), String>) {
        match result {
            Ok((ws, _token)) => {
                self.phase = Phase::Open(ws);
                self.conn += 1;
                self.authed = false;
                self.pre_auth_error = None;
                self.last_frame_at = Instant::now();
                self.connect_deadline = Some(Instant::now() + self.opts.connect_timeout);
            }
            Err(_) => self.schedule_reconnect(),
        }
    }

    fn on_ws(&mut self, msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) {
        self.last_frame_at = Instant::now();
        match msg {
            Some(Ok(Message::Text(text))) => {
                if let Ok(frame) = received::parse(&text) {
                    self.on_frame(frame);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                self.on_close(code, reason);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => self.on_close(1006, String::new()),
        }
    }

    /// Forgets the socket and the per-connection state.
    fn detach(&mut self) -> Option<Box<Ws>> {
        let ws = match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Open(ws) => Some(ws),
            _ => None,
        };
        self.authed = false;
        self.out.clear();
        self.connect_deadline = None;
        self.heartbeat_at = None;
        self.refresh_at = None;
        self.pump_at = None;
        for room in self.rooms.values_mut() {
            room.socket_gone();
        }
        let ids: Vec<String> = self.pending.keys().cloned().collect();
        for id in ids {
            let p = self.pending.get_mut(&id).expect("listed");
            match &mut p.kind {
                // A new connection authenticates with a fresh token; internal paging restarts
                // from the rejoin.
                Kind::Refresh | Kind::Page { .. } => {
                    self.pending.remove(&id);
                }
                // The connection that was in the room is gone: the leave is done.
                Kind::Leave(reply) => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(()));
                    }
                    self.pending.remove(&id);
                }
                Kind::Join | Kind::History(_) => p.sent = false,
            }
        }
        for s in &mut self.outbox {
            s.inflight = false;
            s.retry_at = None;
        }
        ws
    }

    /// Ends the socket without ending the client: the reconnect path runs.
    fn drop_connection(&mut self) {
        // Dropping the stream closes the TCP connection.
        drop(self.detach());
        self.schedule_reconnect();
    }

    fn on_close(&mut self, code: u16, reason: String) {
        drop(self.detach());
        let static_token = !self
            .opts
            .token
            .as_ref()
            .is_some_and(TokenSource::is_callback);
        if code == 4001 || code == 4008 || (code == 4011 && static_token) {
            let what = match code {
                4001 => "the server refused the credentials",
                4008 => "closed for sending too fast (rate-limit abuse)",
                _ => "the token expired and there is no way to get a new one",
            };
            let detail = if reason.is_empty() {
                self.pre_auth_error.take().unwrap_or_default()
            } else {
                reason
            };
            let reason = if detail.is_empty() {
                what.to_owned()
            } else {
                format!("{what}: {detail}")
            };
            let err = Error::Terminated { code, reason };
            if let Ok(mut slot) = self.error.lock() {
                *slot = Some(err.clone());
            }
            self.finish(err);
            return;
        }
        if code == 4011 {
            self.attempt = 0; // a new token is all it takes
        }
        self.schedule_reconnect();
    }

    fn schedule_reconnect(&mut self) {
        if self.terminal {
            return;
        }
        self.set_state(State::Connecting);
        let base = self.opts.backoff_base.as_millis() as f64;
        let max = self.opts.backoff_max.as_millis() as f64;
        let exp = (base * 2f64.powi(self.attempt.min(16) as i32)).min(max);
        // "Equal jitter": half fixed, half random, so that a crowd of clients spreads out.
        let delay = exp / 2.0 + rand::thread_rng().gen::<f64>() * (exp / 2.0);
        self.attempt += 1;
        self.phase = Phase::Backoff(Instant::now() + Duration::from_millis(delay as u64));
    }

    /// Terminal: no reconnect; every pending request fails with `err`.
    fn finish(&mut self, err: Error) {
        if self.terminal {
            return;
        }
        self.terminal = true;
        let ws = self.detach();
        // Closed before anything fails, so a caller that sees the error sees the state too.
        self.set_state(State::Closed);
        // Keep the socket so `run` can close it politely.
        if let Some(ws) = ws {
            self.phase = Phase::Open(ws);
        }
        for (_, p) in self.pending.drain() {
            match p.kind {
                Kind::Leave(Some(reply)) => {
                    let _ = reply.send(Err(err.clone()));
                }
                Kind::History(Some(reply)) => {
                    let _ = reply.send(Err(err.clone()));
                }
                _ => {}
            }
        }
        for s in self.outbox.drain(..) {
            let _ = s.reply.send(Err(err.clone()));
        }
        for room in self.rooms.values_mut() {
            room.fail_waiters(&err);
            // Ending the subscriptions ends the event streams.
            room.subscribers.clear();
        }
    }

    /// Queues a frame for the current socket; false when there is none.
    fn push(&mut self, frame: ClientFrame) -> bool {
        if matches!(self.phase, Phase::Open(_)) {
            self.out.push(frame);
            true
        } else {
            false
        }
    }

    async fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut self.out);
        if let Phase::Open(ws) = &mut self.phase {
            for frame in frames {
                let text = serde_json::to_string(&frame).expect("frames encode");
                if ws.feed(Message::text(text)).await.is_err() {
                    return; // the read side sees the end and reconnects
                }
            }
            let _ = ws.flush().await;
        }
    }

    // ------------------------------------------------------------ timers

    fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.values().filter_map(|p| p.retry_at);
        let sends = self.outbox.iter().filter_map(|s| s.retry_at);
        [
            self.connect_deadline,
            self.heartbeat_at,
            self.refresh_at,
            self.pump_at,
        ]
        .into_iter()
        .flatten()
        .chain(pending)
        .chain(sends)
        .min()
    }

    fn on_timers(&mut self) {
        if self.terminal {
            return;
        }
        let now = Instant::now();
        if self.connect_deadline.is_some_and(|d| d <= now) && !self.authed {
            self.connect_deadline = None;
            self.drop_connection();
            return;
        }
        if self.heartbeat_at.is_some_and(|d| d <= now) && self.authed {
            let idle = now.duration_since(self.last_frame_at);
            // The network went away without telling us: drop and resume.
            if idle > self.heartbeat * 2 {
                self.drop_connection();
                return;
            }
            if idle > self.heartbeat.mul_f64(0.8) {
                let id = self.ids.next();
                self.push(ClientFrame::Ping { id: Some(id) });
            }
            self.heartbeat_at = Some(now + self.heartbeat / 4);
        }
        if self.refresh_at.is_some_and(|d| d <= now) {
            self.refresh_at = None;
            if let (Some(source), true) = (self.opts.token.clone(), self.authed) {
                let tx = self.refresh_tx.clone();
                let conn = self.conn;
                tokio::spawn(async move {
                    let token = source.get().await.map_err(|e| e.to_string());
                    let _ = tx.send(Refreshed { conn, token });
                });
            }
        }
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.retry_at.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(p) = self.pending.get_mut(&id) {
                p.retry_at = None;
            }
            self.transmit(&id);
        }
        let mut pump = self.pump_at.is_some_and(|d| d <= now);
        for s in &mut self.outbox {
            if s.retry_at.is_some_and(|d| d <= now) {
                s.retry_at = None;
                pump = true;
            }
        }
        if pump {
            self.pump();
        }
    }

    fn schedule_refresh(&mut self) {
        self.refresh_at = None;
        let callback = self
            .opts
            .token
            .as_ref()
            .is_some_and(TokenSource::is_callback);
        let Some(exp) = self.exp.filter(|_| callback) else {
            return;
        };
        let remaining = (exp as f64 - unix_now()).max(0.0);
        // 60 s before expiry, or at 80% of the remaining life when that is shorter.
        let delay = (remaining - (remaining * 0.2).min(60.0)).max(0.0);
        self.refresh_at = Some(Instant::now() + Duration::from_secs_f64(delay));
    }

    fn on_refresh_token(&mut self, r: Refreshed) {
        if r.conn != self.conn || !self.authed {
            return;
        }
        match r.token {
            Ok(token) => {
                self.request(
                    Kind::Refresh,
                    None,
                    ClientFrame::Refresh { token, id: None },
                );
            }
            // Try again shortly; at worst the server closes 4011 and the reconnect asks again.
            Err(_) => self.refresh_at = Some(Instant::now() + Duration::from_secs(5)),
        }
    }

    // ------------------------------------------------------------ requests

    fn request(&mut self, kind: Kind, room: Option<String>, mut frame: ClientFrame) -> String {
        let id = self.ids.next();
        set_id(&mut frame, id.clone());
        self.pending.insert(
            id.clone(),
            Pending {
                kind,
                room,
                frame,
                sent: false,
                retry_at: None,
                order: 0,
            },
        );
        self.transmit(&id);
        id
    }

    fn transmit(&mut self, id: &str) {
        if !self.authed {
            return;
        }
        let Some(p) = self.pending.get_mut(id) else {
            return;
        };
        if p.sent || p.retry_at.is_some() {
            return;
        }
        if matches!(p.kind, Kind::Join) {
            if let Some(wait) = self.join_bucket.as_mut().and_then(Bucket::take) {
                p.retry_at = Some(Instant::now() + wait);
                return;
            }
        }
        self.order += 1;
        p.order = self.order;
        let frame = p.frame.clone();
        let sent = self.push(frame);
        if let Some(p) = self.pending.get_mut(id) {
            p.sent = sent;
        }
    }

    fn settle(&mut self, id: &str) -> Option<Pending> {
        self.pending.remove(id)
    }

    /// The pending request an answer belongs to: by id, else (1.0 servers, which do not echo
    /// ids) the oldest sent request of the right kind and room.
    fn matching(
        &self,
        id: Option<&str>,
        room: Option<&str>,
        kind: fn(&Kind) -> bool,
    ) -> Option<String> {
        if let Some(id) = id {
            return self.pending.contains_key(id).then(|| id.to_owned());
        }
        self.pending
            .iter()
            .filter(|(_, p)| {
                p.sent && kind(&p.kind) && (room.is_none() || p.room.as_deref() == room)
            })
            .min_by_key(|(_, p)| p.order)
            .map(|(id, _)| id.clone())
    }

    // ------------------------------------------------------------ sends

    /// Puts unacknowledged sends on the wire, in order, within the send rate.
    fn pump(&mut self) {
        self.pump_at = None;
        if !self.authed {
            return;
        }
        let now = Instant::now();
        if let Some(until) = self.send_paused_until.filter(|u| *u > now) {
            self.pump_at = Some(until);
            return;
        }
        let mut frames = Vec::new();
        for s in &mut self.outbox {
            let joined = self.rooms.get(&s.room).is_some_and(|r| r.joined);
            if s.inflight || s.retry_at.is_some() || !joined {
                continue;
            }
            if let Some(wait) = self.send_bucket.as_mut().and_then(Bucket::take) {
                self.pump_at = Some(now + wait);
                break;
            }
            s.inflight = true;
            frames.push(ClientFrame::Send {
                room: s.room.clone(),
                content: s.content.clone(),
                id: Some(s.id.clone()),
            });
        }
        for frame in frames {
            self.push(frame);
        }
    }

    fn send_done(&mut self, id: &str, ack: Ack) {
        if let Some(i) = self.outbox.iter().position(|s| s.id == id) {
            let s = self.outbox.remove(i);
            let _ = s.reply.send(Ok(ack));
        }
    }

    fn send_failed(&mut self, id: &str, err: Error) {
        if let Some(i) = self.outbox.iter().position(|s| s.id == id) {
            let s = self.outbox.remove(i);
            let _ = s.reply.send(Err(err));
        }
    }

    fn drop_sends(&mut self, room: &str, err: &Error) {
        let ids: Vec<String> = self
            .outbox
            .iter()
            .filter(|s| s.room == room)
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            self.send_failed(&id, err.clone());
        }
    }

    // ------------------------------------------------------------ commands

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe { room, tx } => {
                self.rooms.entry(room).or_default().subscribers.push(tx);
            }
            Command::Join { room, reply } => {
                let r = self.rooms.entry(room.clone()).or_default();
                if r.want && r.joined {
                    if let Some(info) = &r.info {
                        let _ = reply.send(Ok(info.clone()));
                        return;
                    }
                }
                r.waiters.push(reply);
                if !r.want {
                    r.want = true;
                    self.rejoin(&room);
                }
            }
            Command::Send {
                room,
                content,
                reply,
            } => {
                let refuse = |code, message: String| Error::Refused {
                    code,
                    message,
                    retry_after_ms: None,
                };
                if content.is_empty() {
                    let _ = reply.send(Err(refuse(
                        ErrorCode::BadRequest,
                        "content must not be empty".into(),
                    )));
                    return;
                }
                if !self.rooms.get(&room).is_some_and(|r| r.want) {
                    let _ = reply.send(Err(refuse(
                        ErrorCode::NotJoined,
                        format!("join {room} before sending"),
                    )));
                    return;
                }
                if let Some(max) = self.limits.as_ref().map(|l| l.max_content_bytes) {
                    if content.len() > max {
                        let _ = reply.send(Err(refuse(
                            ErrorCode::TooLarge,
                            format!("content is over {max} bytes"),
                        )));
                        return;
                    }
                }
                let id = self.ids.next();
                self.outbox.push(OutSend {
                    id,
                    room,
                    content,
                    inflight: false,
                    retry_at: None,
                    reply,
                });
                self.pump();
            }
            Command::History { room, query, reply } => {
                let frame = ClientFrame::History {
                    room: room.clone(),
                    before: query.before,
                    after: query.after,
                    limit: query.limit,
                    id: None,
                };
                self.request(Kind::History(Some(reply)), Some(room), frame);
            }
            Command::Typing { room } => {
                let now = Instant::now();
                let interval = self.opts.typing_interval;
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                // A room whose `joined` said `"typing":false` refuses them: send none.
                let refused = r.info.as_ref().is_some_and(|j| j.typing == Some(false));
                if !r.joined
                    || refused
                    || r.last_typing
                        .is_some_and(|t| now.duration_since(t) < interval)
                {
                    return;
                }
                r.last_typing = Some(now);
                self.push(ClientFrame::Typing { room, id: None });
            }
            Command::Leave { room, reply } => self.leave(room, reply),
            Command::Reconnect => {
                if !self.terminal {
                    self.attempt = 0;
                    drop(self.detach());
                    self.start_connect();
                }
            }
            Command::Close(_) => unreachable!("handled in run"),
        }
    }

    fn leave(&mut self, room: String, reply: Reply<()>) {
        let left = Error::Left { reason: None };
        let authed = self.authed;
        let r = self.rooms.entry(room.clone()).or_default();
        let was_joined = r.joined;
        let join_id = r.join_id.take();
        r.want = false;
        r.joined = false;
        r.fail_waiters(&left);
        r.reset(None);
        let joining = join_id.is_some_and(|id| self.settle(&id).is_some());
        self.drop_sends(&room, &left);
        if !authed || !was_joined || joining {
            // A `joined` still on its way is answered with a leave (see on_joined).
            let _ = reply.send(Ok(()));
            return;
        }
        let frame = ClientFrame::Leave {
            room: room.clone(),
            id: None,
        };
        self.request(Kind::Leave(Some(reply)), Some(room), frame);
    }

    fn rejoin(&mut self, room: &str) {
        if !self.authed {
            return;
        }
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        if !r.want || r.joined {
            return;
        }
        if let Some(id) = r.join_id.clone() {
            if self.pending.contains_key(&id) {
                self.transmit(&id);
                return;
            }
        }
        let frame = ClientFrame::Join {
            room: room.to_owned(),
            since: r.epoch.as_ref().map(|_| r.seq),
            epoch: r.epoch.clone(),
            id: None,
        };
        let id = self.request(Kind::Join, Some(room.to_owned()), frame);
        if let Some(r) = self.rooms.get_mut(room) {
            r.join_id = Some(id);
        }
    }

    // ------------------------------------------------------------ frames

    fn on_frame(&mut self, frame: Received) {
        match frame {
            Received::Authenticated {
                user_id,
                name,
                heartbeat_ms,
                limits,
                exp,
            } => self.on_authenticated(
                Session {
                    user_id,
                    name,
                    limits,
                    exp,
                },
                heartbeat_ms,
            ),
            Received::Joined(joined) => self.on_joined(joined),
            Received::Message(m) => self.on_event(Event::Message(m)),
            Received::System(s) => self.on_event(Event::System(s)),
            Received::Typing { room, user } => {
                if self.user_id.as_deref() == Some(user.as_str()) {
                    return;
                }
                if let Some(r) = self.rooms.get_mut(&room).filter(|r| r.joined) {
                    r.emit(RoomEvent::Typing { user });
                }
            }
            Received::Left { room, reason, id } => self.on_left(room, reason, id),
            Received::Ack {
                id: Some(id),
                seq,
                duplicate,
                ..
            } => self.send_done(
                &id,
                Ack {
                    seq,
                    id: id.clone(),
                    duplicate,
                },
            ),
            Received::Ack { id: None, .. } => {}
            Received::History {
                room,
                messages,
                more,
                id,
            } => self.on_history(room, messages, more, id),
            Received::Refreshed { exp, id } => {
                let key = self.matching(id.as_deref(), None, |k| matches!(k, Kind::Refresh));
                if let Some(key) = key {
                    self.settle(&key);
                }
                if exp.is_some() {
                    self.exp = exp;
                    self.schedule_refresh();
                }
            }
            Received::Pong { .. } => {}
            Received::Error {
                code,
                message,
                id,
                room,
                retry_after_ms,
            } => self.on_error(code, message, id, room, retry_after_ms),
        }
    }

    fn on_authenticated(&mut self, session: Session, heartbeat_ms: u64) {
        self.authed = true;
        self.attempt = 0;
        self.connect_deadline = None;
        self.user_id = Some(session.user_id.clone());
        self.heartbeat = Duration::from_millis(heartbeat_ms.max(1000));
        self.heartbeat_at = Some(Instant::now() + self.heartbeat / 4);
        self.limits = session.limits.clone();
        let l = session.limits.as_ref();
        // A 1.0 server does not announce its limits: assume the documented defaults (10/s,
        // burst 20) rather than a flood of refusals that would count towards close 4008.
        self.send_bucket = self.opts.pace_sends.then(|| match l {
            Some(l) if l.send_rate > 0.0 => Bucket::new(l.send_rate, l.send_burst),
            _ => Bucket::new(10.0, 20),
        });
        self.join_bucket = l
            .filter(|l| l.join_rate > 0.0)
            .map(|l| Bucket::new(l.join_rate, l.join_burst));
        self.send_paused_until = None;
        self.exp = session.exp;
        self.schedule_refresh();
        self.session_tx.send_replace(Some(session));
        self.set_state(State::Open);
        // Rooms first (their joins carry since/epoch), then whatever else was waiting.
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.rejoin(&room);
        }
        let mut others: Vec<(u64, String)> = self
            .pending
            .iter()
            .filter(|(_, p)| !matches!(p.kind, Kind::Join))
            .map(|(id, p)| (p.order, id.clone()))
            .collect();
        others.sort();
        for (_, id) in others {
            self.transmit(&id);
        }
        self.pump();
    }

    fn on_joined(&mut self, j: Joined) {
        let key = self.matching(j.id.as_deref(), Some(&j.room), |k| matches!(k, Kind::Join));
        if let Some(key) = &key {
            self.settle(key);
        }
        let wanted = self.rooms.get(&j.room).is_some_and(|r| r.want);
        if !wanted {
            // Left (or never wanted) while the join was in flight.
            let id = self.ids.next();
            self.push(ClientFrame::Leave {
                room: j.room.clone(),
                id: Some(id),
            });
            return;
        }
        let page_limit = self.opts.history_page_limit;
        // The room is joined now: another join still pending for it (a join, leave, join
        // sequence whose first join took effect) is moot; its "already joined" error is ignored.
        let moot = self
            .rooms
            .get_mut(&j.room)
            .and_then(|r| r.join_id.take())
            .filter(|id| Some(id) != key.as_ref());
        if let Some(moot) = moot {
            self.settle(&moot);
        }
        let r = self.rooms.get_mut(&j.room).expect("wanted");
        let resumed = r.epoch.as_deref() == Some(j.epoch.as_str()) && j.recovered == Some(true);
        if r.epoch.is_some() && !resumed {
            // The log could not be resumed (new epoch, or since too old): start afresh.
            let previous_epoch = r.epoch.clone();
            r.reset(Some(j.epoch.clone()));
            r.emit(RoomEvent::Reset {
                epoch: j.epoch.clone(),
                previous_epoch,
                seq: j.seq,
            });
        }
        r.epoch = Some(j.epoch.clone());
        r.joined = true;
        r.head = j.seq;
        if !resumed {
            r.seq = j
                .history
                .first()
                .map_or(j.seq, |e| e.seq().saturating_sub(1));
        }
        r.users_known = j.users.is_some();
        r.members = j.users.iter().flatten().cloned().collect();
        r.catching_up = resumed && j.truncated;
        r.info = Some(j.clone());
        r.emit_presence();
        let user_id = self.user_id.clone();
        let mut own = Vec::new();
        for ev in &j.history {
            if let Some(o) = deliver(r, ev.clone(), user_id.as_deref()) {
                own.push(o);
            }
        }
        for w in r.waiters.drain(..) {
            let _ = w.send(Ok(j.clone()));
        }
        let page = r.catching_up.then_some((r.seq, r.page_gen));
        for (id, ack) in own {
            self.send_done(&id, ack);
        }
        if let Some((after, gen)) = page {
            self.page_forward(&j.room, after, gen, page_limit);
        }
        self.pump();
    }

    fn page_forward(&mut self, room: &str, after: u64, gen: u64, limit: u32) {
        let frame = ClientFrame::History {
            room: room.to_owned(),
            before: None,
            after: Some(after),
            limit: Some(limit),
            id: None,
        };
        self.request(Kind::Page { gen }, Some(room.to_owned()), frame);
    }

    fn on_event(&mut self, ev: Event) {
        let user_id = self.user_id.clone();
        let Some(r) = self.rooms.get_mut(ev.room()) else {
            return;
        };
        if !r.joined {
            return;
        }
        if r.catching_up && ev.seq() > r.head {
            r.buffer.insert(ev.seq(), ev);
            return;
        }
        if let Some((id, ack)) = deliver(r, ev, user_id.as_deref()) {
            self.send_done(&id, ack);
        }
    }

    fn on_history(&mut self, room: String, messages: Vec<Event>, more: bool, id: Option<String>) {
        let key = self.matching(id.as_deref(), Some(&room), |k| {
            matches!(k, Kind::History(_) | Kind::Page { .. })
        });
        let Some(p) = key.and_then(|k| self.settle(&k)) else {
            return;
        };
        match p.kind {
            Kind::History(Some(reply)) => {
                let _ = reply.send(Ok(Page { messages, more }));
            }
            Kind::Page { gen } => {
                let user_id = self.user_id.clone();
                let limit = self.opts.history_page_limit;
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                if gen != r.page_gen || !r.catching_up {
                    return;
                }
                let empty = messages.is_empty();
                let mut own = Vec::new();
                for ev in messages {
                    own.extend(deliver(r, ev, user_id.as_deref()));
                }
                let next = (more && !empty && r.seq < r.head).then_some(r.seq);
                if next.is_none() {
                    r.catching_up = false;
                    let live = std::mem::take(&mut r.buffer);
                    for ev in live.into_values() {
                        own.extend(deliver(r, ev, user_id.as_deref()));
                    }
                }
                for (id, ack) in own {
                    self.send_done(&id, ack);
                }
                if let Some(after) = next {
                    self.page_forward(&room, after, gen, limit);
                }
            }
            _ => {}
        }
    }

    fn on_left(&mut self, room: String, reason: Option<String>, id: Option<String>) {
        let key = self.matching(id.as_deref(), Some(&room), |k| matches!(k, Kind::Leave(_)));
        let p = key.and_then(|k| self.settle(&k));
        let asked = p.is_some();
        if let Some(Pending {
            kind: Kind::Leave(Some(reply)),
            ..
        }) = p
        {
            let _ = reply.send(Ok(()));
        }
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if reason.is_some() || (!asked && r.want) {
            // Unprompted: the server took us out (e.g. a refreshed token no longer allows it).
            let err = Error::Left {
                reason: reason.clone(),
            };
            r.want = false;
            r.joined = false;
            r.join_id = None;
            r.fail_waiters(&err);
            r.reset(None);
            r.emit(RoomEvent::Left { reason });
            self.drop_sends(&room, &err);
        } else if !r.want {
            r.joined = false;
        }
    }

    fn on_error(
        &mut self,
        code: ErrorCode,
        message: String,
        id: Option<String>,
        room: Option<String>,
        retry_after_ms: Option<u64>,
    ) {
        if !self.authed {
            // Before `authenticated` an error means the credentials were refused; close 4001
            // follows, and its terminal error carries this message.
            self.pre_auth_error = Some(message);
            return;
        }
        let err = Error::Refused {
            code,
            message: message.clone(),
            retry_after_ms,
        };
        if let Some(id) = &id {
            if let Some(s) = self.outbox.iter_mut().find(|s| &s.id == id) {
                match code {
                    ErrorCode::RateLimited => {
                        let wait = Duration::from_millis(retry_after_ms.unwrap_or(1000).max(1));
                        s.inflight = false;
                        let until = Instant::now() + wait;
                        self.send_paused_until =
                            Some(self.send_paused_until.map_or(until, |u| u.max(until)));
                        if let Some(b) = self.send_bucket.as_mut() {
                            b.drain();
                        }
                        self.pump();
                    }
                    ErrorCode::Unavailable => {
                        s.inflight = false;
                        s.retry_at = Some(Instant::now() + self.opts.retry_unavailable);
                    }
                    ErrorCode::NotJoined => {
                        // A rejoin is under way (or the room was taken away): sent again after
                        // `joined`.
                        s.inflight = false;
                        let room = s.room.clone();
                        if !self.rooms.get(&room).is_some_and(|r| r.want) {
                            self.send_failed(&id.clone(), err);
                        }
                    }
                    _ => self.send_failed(&id.clone(), err),
                }
                return;
            }
        }
        let key = match &id {
            Some(id) => self.pending.contains_key(id).then(|| id.clone()),
            // A 1.0 server does not echo ids: the oldest unanswered request (of the room).
            None => self.matching(None, room.as_deref(), |k| !matches!(k, Kind::Refresh)),
        };
        let Some(key) = key else {
            return;
        };
        if matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable) {
            // Not done: the same request again after the server's hint.
            let wait = match code {
                ErrorCode::RateLimited => {
                    Duration::from_millis(retry_after_ms.unwrap_or(1000).max(1))
                }
                _ => self.opts.retry_unavailable,
            };
            if let Some(p) = self.pending.get_mut(&key) {
                p.sent = false;
                p.retry_at = Some(Instant::now() + wait);
            }
            return;
        }
        let is_join = self
            .pending
            .get(&key)
            .is_some_and(|p| matches!(p.kind, Kind::Join));
        if is_join && code == ErrorCode::BadRequest && message.contains("already") {
            return; // the `joined` of the earlier join is on its way
        }
        let Some(p) = self.settle(&key) else {
            return;
        };
        match p.kind {
            Kind::Join => {
                if let Some(room) = p.room {
                    if let Some(r) = self.rooms.get_mut(&room) {
                        r.want = false;
                        r.join_id = None;
                        r.fail_waiters(&err);
                        // A rejoin after a reconnect was refused (e.g. the new token no longer
                        // allows the room): tell the subscribers they are out.
                        if r.info.take().is_some() {
                            r.reset(None);
                            r.emit(RoomEvent::Left {
                                reason: Some(code.as_str().to_owned()),
                            });
                        }
                    }
                    self.drop_sends(&room, &err);
                }
            }
            Kind::Leave(Some(reply)) => {
                let _ = reply.send(Err(err));
            }
            Kind::History(Some(reply)) => {
                let _ = reply.send(Err(err));
            }
            Kind::Page { gen } => {
                // Paging failed: reconnect; the rejoin resumes from what was delivered.
                let current = p
                    .room
                    .and_then(|room| self.rooms.get(&room))
                    .is_some_and(|r| r.page_gen == gen);
                if current {
                    self.drop_connection();
                }
            }
            _ => {}
        }
    }
}

/// The one path every sequenced event takes: at most once, in seq order, per epoch. Returns
/// the ack of an own message whose `ack` was lost with a connection (it is stored, so the send
/// is settled).
fn deliver(r: &mut RoomState, ev: Event, user_id: Option<&str>) -> Option<(String, Ack)> {
    if ev.seq() <= r.seq {
        return None;
    }
    r.seq = ev.seq();
    match ev {
        Event::Message(m) => {
            let own = match (&m.id, user_id) {
                (Some(id), Some(me)) if me == m.user => Some((
                    id.clone(),
                    Ack {
                        seq: m.seq,
                        id: id.clone(),
                        duplicate: false,
                    },
                )),
                _ => None,
            };
            r.emit(RoomEvent::Message(m));
            own
        }
        Event::System(s) => {
            // `joined.users` is the member list as of `joined.seq`: events up to it (the join's
            // history, pages of a catch-up) are already in it and must not change it again.
            let live = s.seq > r.head;
            let changed = match s.event.as_str() {
                "join" if r.users_known && live => r.members.insert(s.user.clone()),
                "leave" if r.users_known && live => r.members.remove(&s.user),
                _ => false,
            };
            r.emit(RoomEvent::System(s));
            if changed {
                r.emit_presence();
            }
            None
        }
    }
}
