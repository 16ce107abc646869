//! One connection, from upgrade to close: the state machine of the protocol.
//!
//! A single task owns the socket and `select!`s over: server shutdown, its outbound queue, the
//! next client frame, the heartbeat timer and the auth/expiry deadline. Frames for the client
//! (answers, acks, room events) all go through the bounded [`Outbound`] queue and are written in
//! batches with one flush. Requests are handled one at a time, in the order they arrive.
//!
//! States: *unauthenticated* (only an `auth` frame is accepted, until `auth.timeout_ms`), then
//! *authenticated* (everything else). The session ends on a client close, a dead peer, a
//! protocol violation, a full queue (4009), an expired token (4011) or shutdown (1001); on the
//! way out it leaves every room it joined.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use parley_protocol::client::{decode, ClientFrame};
use parley_protocol::server::{json_array, Limits, ServerFrame};
use parley_protocol::{CloseCode, ErrorCode};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth::{now_unix, Identity};
use crate::broker::log::cap_page;
use crate::broker::{BrokerError, JoinRequest, LeaveRequest, PublishReply, PublishRequest};
use crate::config::Publish;
use crate::hub::ConnId;
use crate::limits::{AbuseCounter, Bucket, ConnectionSlot};
use crate::metrics::AuthFailure;
use crate::outbound::{InFlight, Outbound, Progress};
use crate::socket::{Message, Opcode, Socket};
use crate::validate::{self, Refusal};
use crate::App;
use bytes::Bytes;

/// A room to join as soon as the client is authenticated (`/ws/{room}`), with `since`/`epoch`.
pub type AutoJoin = (String, Option<(u64, String)>);

/// How a connection starts: what the upgrade request already settled.
pub struct Start {
    /// The identity from `?token=` or anonymous mode; `None` waits for an `auth` frame.
    pub identity: Option<Identity>,
    /// The room of `/ws/{room}`, with `since`/`epoch` from the query.
    pub auto_join: Option<AutoJoin>,
    /// The peer, for the log.
    pub peer: SocketAddr,
}

/// What a turn of the serving loop leaves to do once its `select!` is over.
enum Turn {
    /// Nothing more.
    Done,
    /// The write side asked for attention.
    Write,
    /// A text frame to handle.
    Text(tungstenite::Utf8Bytes),
    /// The client closed with this code: answer and end.
    Closed(u16),
}

/// Why a session ended: a close frame to send, or a peer already gone.
enum End {
    Close(CloseCode),
    Gone(&'static str),
}

struct Session {
    app: App,
    conn: ConnId,
    outbound: Arc<Outbound>,
    identity: Option<Identity>,
    rooms: Vec<Arc<str>>,
    /// Next instant the auth timeout or the token expiry fires.
    deadline: Option<Instant>,
    /// `limits.send_rate` / `limits.send_burst`.
    sends: Bucket,
    /// `limits.join_rate` / `limits.join_burst`, for joins and leaves.
    joins: Bucket,
    /// `limits.typing_rate` / `limits.typing_burst`.
    typing: Bucket,
    /// Rate-limit refusals; too many in the window close with 4008.
    abuse: AbuseCounter,
    /// This connection's place under the connection caps.
    _slot: ConnectionSlot,
}

/// Runs one connection to its end; `slot` (its place under the connection caps) is given back
/// when it ends.
///
/// Not an `async fn`: the arguments of one are kept in its future twice (as arguments and as
/// the locals they are moved into) for the connection's whole life. Here the session is built
/// first and the future below owns each piece once.
pub fn run(
    ws: Socket,
    app: App,
    start: Start,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> + Send + 'static {
    let conn = app.next_conn_id();
    let limits = &app.config.limits;
    let mut session = Session {
        conn,
        outbound: ws.outbound().clone(),
        sends: Bucket::new(limits.send_rate, limits.send_burst),
        joins: Bucket::new(limits.join_rate, limits.join_burst),
        typing: Bucket::new(limits.typing_rate, limits.typing_burst),
        abuse: AbuseCounter::default(),
        identity: None,
        rooms: Vec::new(),
        deadline: Some(Instant::now() + Duration::from_millis(app.config.auth.timeout_ms)),
        _slot: slot,
        app,
    };
    let Start {
        identity,
        auto_join,
        peer,
    } = start;
    let opened = Instant::now();
    let open = session.app.metrics.connection_opened();
    info!(conn, %peer, "connection open");
    if let Some(identity) = identity {
        session.authenticated(identity);
    }
    // Boxed: it is kept (as 8 bytes) until the client authenticates, usually for no time at all.
    let mut auto_join = auto_join.map(Box::new);
    let mut ws = ws;
    async move {
        // Counted in `parley_connections` until this future ends (or is dropped unpolled).
        // This line is what makes the future own the guard: without it the block would not
        // capture `open`, and the count would drop as soon as `run` returned.
        let _ = &open;
        // Unboxed only into the join's own box: the room and resume point are not kept in
        // this future across the join.
        {
            let joining = match auto_join.take() {
                Some(join) if session.identity.is_some() => {
                    let (room, since) = *join;
                    Some(Box::pin(session.join(room, since, None)))
                }
                kept => {
                    auto_join = kept;
                    None
                }
            };
            if let Some(joining) = joining {
                // An auto-join is the connection's first: no rate limit can refuse it.
                let _ = joining.await;
            }
        }

        // The serving loop lives as long as the connection, so it is part of this future (one
        // allocation, the task's). Shorter phases are boxed in a statement of their own and
        // awaited in the next: a temporary in the statement that awaits would keep its space
        // in this future for the connection's whole life, even after it was moved into the box.
        let end = session.serve(&mut ws, &mut auto_join).await;
        let ending = Box::pin(session.end(ws, end, peer, opened));
        ending.await;
    }
}

impl Session {
    async fn serve(&mut self, ws: &mut Socket, auto_join: &mut Option<Box<AutoJoin>>) -> End {
        // The heartbeat's interval and timeout are read from the settings where they are used:
        // locals would be kept in this future, for the connection's whole life.
        let shutdown = self.app.shutdown.clone();
        let mut last_heard = Instant::now();
        let mut next_ping = last_heard + self.heartbeat().0;
        // One timer for the heartbeat and the deadline (auth timeout, token expiry): it fires
        // at the earlier of the two, and the branch sorts out which it was.
        let due = |timeout: Duration,
                   next_ping: Instant,
                   last_heard: Instant,
                   deadline: Option<Instant>| {
            let beat = next_ping.min(last_heard + timeout);
            deadline.map_or(beat, |d| d.min(beat))
        };
        let mut armed_deadline = self.deadline;
        let timer = tokio::time::sleep_until(due(
            self.heartbeat().1,
            next_ping,
            last_heard,
            armed_deadline,
        ));
        tokio::pin!(timer);
        let outbound = self.outbound.clone();
        // Both waits are made once and polled in place: re-creating them on every turn would
        // register and unregister a waiter per frame.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let ready = outbound.ready();
        tokio::pin!(ready);
        loop {
            // The branches only look; what takes time (writing a backlog, handling a request,
            // answering a close) happens after the `select!`. A value alive across an await
            // inside a branch (the branch's output, the frame) would be kept in this future in
            // every state, idle included: 168 bytes per connection.
            let turn = tokio::select! {
                biased;
                _ = &mut cancelled => return End::Close(CloseCode::GoingAway),
                _ = &mut ready => {
                    ready.set(outbound.ready());
                    Turn::Write
                }
                msg = ws.recv() => {
                    last_heard = Instant::now();
                    match msg {
                        None => return End::Gone("peer disconnected"),
                        Some(Err(err)) => return classify(err),
                        Some(Ok(Message::Text(text))) => Turn::Text(text),
                        Some(Ok(Message::Binary(_))) => {
                            if self.identity.is_none() {
                                self.app.metrics.auth_failure(AuthFailure::NotAuthFrame, self.outbound.stream().peer_addr().ok());
                                self.reply_error(ErrorCode::Unauthorized, "authenticate first", Req::none());
                                return End::Close(CloseCode::Unauthorized);
                            }
                            self.reply_error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text frames", Req::none());
                            Turn::Done
                        }
                        Some(Ok(Message::Ping(data))) => {
                            outbound.push_frame(Opcode::Pong, data);
                            Turn::Done
                        }
                        Some(Ok(Message::Pong(_) | Message::Frame(_))) => Turn::Done,
                        // Answer the closing handshake with the client's own code (RFC 6455 5.5.1).
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map_or(CloseCode::Normal.code(), |f| u16::from(f.code));
                            Turn::Closed(if code == 1005 { CloseCode::Normal.code() } else { code })
                        }
                    }
                }
                _ = &mut timer => {
                    let (interval, timeout) = self.heartbeat();
                    let now = Instant::now();
                    if self.deadline.is_some_and(|d| now >= d) {
                        if self.identity.is_none() {
                            self.app.metrics.auth_failure(AuthFailure::Timeout, self.outbound.stream().peer_addr().ok());
                            self.reply_error(ErrorCode::Unauthorized, "no auth frame within the auth timeout", Req::none());
                            return End::Close(CloseCode::Unauthorized);
                        }
                        return End::Close(CloseCode::TokenExpired);
                    }
                    if now >= last_heard + timeout {
                        self.app.metrics.heartbeat_timeouts.inc();
                        return End::Gone("heartbeat timeout");
                    }
                    if now >= next_ping {
                        outbound.push_frame(Opcode::Ping, Bytes::new());
                        next_ping = now + interval;
                    }
                    timer.as_mut().reset(due(timeout, next_ping, last_heard, self.deadline));
                    Turn::Done
                }
            };
            // `turn` is moved whole into `work`: a `match` that moved only its frame out
            // would keep its 40 bytes in this future across the await, in every state.
            if let Some(work) = self.work(turn, auto_join) {
                if let Some(end) = work.await {
                    return end;
                }
            }
            // Authenticated or refreshed: the deadline moved.
            if self.deadline != armed_deadline {
                armed_deadline = self.deadline;
                timer.as_mut().reset(due(
                    self.heartbeat().1,
                    next_ping,
                    last_heard,
                    self.deadline,
                ));
            }
        }
    }

    /// What a turn leaves to do, boxed: an idle connection does not reserve the space of
    /// writing a backlog, handling a request or answering a close. `Some(end)` ends the
    /// session.
    fn work<'a>(
        &'a mut self,
        turn: Turn,
        auto_join: &'a mut Option<Box<AutoJoin>>,
    ) -> Option<Pin<Box<dyn Future<Output = Option<End>> + Send + 'a>>> {
        match turn {
            Turn::Done => None,
            Turn::Write => Some(Box::pin(async move { self.write_pending().await.err() })),
            Turn::Text(text) => Some(Box::pin(self.on_text(text, auto_join))),
            Turn::Closed(code) => Some(Box::pin(async move {
                self.outbound.close_with(code, "", true);
                let _ = tokio::time::timeout(self.heartbeat().1, self.outbound.flush()).await;
                Some(End::Gone("client closed"))
            })),
        }
    }

    /// Handles a text frame, then the auto-join once the frame authenticated the connection.
    async fn on_text(
        &mut self,
        text: tungstenite::Utf8Bytes,
        auto_join: &mut Option<Box<AutoJoin>>,
    ) -> Option<End> {
        if let Some(end) = self.handle(&text).await {
            return Some(end);
        }
        if self.identity.is_some() {
            if let Some((room, since)) = auto_join.take().map(|b| *b) {
                return self.join(room, since, None).await;
            }
        }
        None
    }

    /// `heartbeat.interval_ms` and `heartbeat.timeout_ms`.
    fn heartbeat(&self) -> (Duration, Duration) {
        let heartbeat = &self.app.config.heartbeat;
        (
            Duration::from_millis(heartbeat.interval_ms),
            Duration::from_millis(heartbeat.timeout_ms),
        )
    }

    /// Writes what the kernel did not take when it was queued, waiting for the socket as
    /// needed, until the queue is empty; ends the session when the queue was closed (4009),
    /// a write failed, or a peer that stopped reading kept the socket full for the heartbeat
    /// timeout.
    async fn write_pending(&mut self) -> Result<(), End> {
        let write_timeout = Duration::from_millis(self.app.config.heartbeat.timeout_ms);
        let stalled = tokio::time::sleep(write_timeout);
        tokio::pin!(stalled);
        loop {
            match self.outbound.write_pending() {
                Progress::Done => return Ok(()),
                Progress::Closed(code) => {
                    self.count_cut_off(code);
                    return Err(End::Close(code));
                }
                Progress::Failed => return Err(End::Gone("write failed")),
                Progress::Blocked => {}
            }
            tokio::select! {
                writable = self.outbound.writable() => {
                    if writable.is_err() {
                        return Err(End::Gone("write failed"));
                    }
                }
                // An overflow (4009) while waiting: the next turn sees it.
                _ = self.outbound.ready() => {}
                _ = self.app.shutdown.cancelled() => return Err(End::Close(CloseCode::GoingAway)),
                _ = &mut stalled => return Err(End::Gone("write timeout")),
            }
        }
    }

    /// Counts a slow consumer when it is cut off, not when its close is done (which can take
    /// the close grace).
    fn count_cut_off(&self, code: CloseCode) {
        if code == CloseCode::SlowConsumer {
            self.app.metrics.slow_consumer_closes.inc();
        }
    }

    fn push(&self, frame: String) {
        self.outbound.push(Utf8Bytes::from(frame));
    }

    fn reply_error(&self, code: ErrorCode, message: &str, req: Req<'_>) {
        self.push(
            ServerFrame::Error {
                code,
                message,
                id: req.id,
                room: req.room,
                retry_after_ms: None,
            }
            .encode(),
        );
    }

    fn refuse(&self, refusal: Refusal, req: Req<'_>) {
        self.reply_error(refusal.code, &refusal.message, req);
    }

    /// `error rate_limited` with when to retry; `Some` ends the session when this refusal
    /// reaches the abuse limit (4008).
    fn rate_limited(&mut self, wait: Duration, message: &str, req: Req<'_>) -> Option<End> {
        self.app.metrics.rate_limited.inc();
        // Rounded up, so a client that waits exactly this long finds a token.
        let retry_after_ms = wait.as_micros().div_ceil(1000).max(1) as u64;
        self.push(
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message,
                id: req.id,
                room: req.room,
                retry_after_ms: Some(retry_after_ms),
            }
            .encode(),
        );
        let limits = &self.app.config.limits;
        let window = Duration::from_millis(limits.abuse_window_ms);
        self.abuse
            .refuse(limits.abuse_refusals, window)
            .then_some(End::Close(CloseCode::RateLimitAbuse))
    }

    fn limits(&self) -> Limits {
        let limits = &self.app.config.limits;
        Limits {
            max_content_bytes: limits.max_content_bytes,
            max_rooms_per_connection: limits.max_rooms_per_connection,
            send_rate: limits.send_rate,
            send_burst: limits.send_burst,
            join_rate: limits.join_rate,
            join_burst: limits.join_burst,
        }
    }

    fn authenticated(&mut self, identity: Identity) {
        self.push(
            ServerFrame::Authenticated {
                user_id: &identity.user,
                name: &identity.name,
                heartbeat_ms: self.app.config.heartbeat.interval_ms,
                limits: &self.limits(),
                exp: identity.expires_at,
            }
            .encode(),
        );
        self.deadline = self.expiry(&identity);
        self.identity = Some(identity);
    }

    /// Handles one text frame; `Some` ends the session.
    async fn handle(&mut self, text: &str) -> Option<End> {
        let frame = match decode(text) {
            Ok(frame) => frame,
            Err(err) => {
                if self.identity.is_none() {
                    self.app.metrics.auth_failure(
                        AuthFailure::NotAuthFrame,
                        self.outbound.stream().peer_addr().ok(),
                    );
                    self.reply_error(
                        ErrorCode::Unauthorized,
                        "the first frame must be auth",
                        Req::none(),
                    );
                    return Some(End::Close(CloseCode::Unauthorized));
                }
                let req = Req {
                    id: err.id.as_deref(),
                    room: err.room.as_deref(),
                };
                self.reply_error(ErrorCode::BadRequest, &err.message, req);
                return None;
            }
        };
        let Some(identity) = self.identity.clone() else {
            let ClientFrame::Auth { token, id } = frame else {
                self.app.metrics.auth_failure(
                    AuthFailure::NotAuthFrame,
                    self.outbound.stream().peer_addr().ok(),
                );
                self.reply_error(
                    ErrorCode::Unauthorized,
                    "the first frame must be auth",
                    Req::of(frame.id(), None),
                );
                return Some(End::Close(CloseCode::Unauthorized));
            };
            return match self.app.auth.verify(&token) {
                Ok(identity) => {
                    self.authenticated(identity);
                    None
                }
                Err(err) => {
                    self.app
                        .metrics
                        .auth_failure(&err, self.outbound.stream().peer_addr().ok());
                    self.reply_error(
                        ErrorCode::Unauthorized,
                        &err.to_string(),
                        Req::of(id.as_deref(), None),
                    );
                    Some(End::Close(CloseCode::Unauthorized))
                }
            };
        };
        match frame {
            ClientFrame::Auth { id, .. } => self.reply_error(
                ErrorCode::BadRequest,
                "already authenticated",
                Req::of(id.as_deref(), None),
            ),
            ClientFrame::Refresh { token, id } => {
                return self.refresh(&identity, &token, id.as_deref()).await;
            }
            ClientFrame::Join {
                room,
                since,
                epoch,
                id,
            } => match validate::resume(since, epoch) {
                Ok(since) => return self.join(room, since, id).await,
                Err(refusal) => self.refuse(refusal, Req::of(id.as_deref(), Some(&room))),
            },
            ClientFrame::Leave { room, id } => return self.leave(&identity, &room, id).await,
            ClientFrame::Send { room, content, id } => {
                return self.send(&identity, &room, content, id).await;
            }
            ClientFrame::History {
                room,
                before,
                after,
                limit,
                id,
            } => {
                let req = Req::of(id.as_deref(), Some(&room));
                self.history(&identity, &room, before, after, limit, req)
                    .await
            }
            ClientFrame::Typing { room, id } => {
                self.typing(&identity, &room, Req::of(id.as_deref(), Some(&room)))
            }
            ClientFrame::Ping { id } => self.push(ServerFrame::Pong { id: id.as_deref() }.encode()),
        }
        None
    }

    fn typing(&mut self, identity: &Identity, room: &str, req: Req<'_>) {
        if let Err(refusal) = validate::room(room) {
            return self.refuse(refusal, req);
        }
        let Some(room) = self.joined(room) else {
            return self.reply_error(ErrorCode::NotJoined, "join the room first", req);
        };
        if !self.app.policies.for_room(&room).typing {
            return self.reply_error(ErrorCode::Forbidden, TYPING_OFF, req);
        }
        // Typing is ephemeral: past its bucket it is dropped without a word.
        if self.typing.take().is_err() {
            return;
        }
        let frame = ServerFrame::Typing {
            room: &room,
            user: &identity.user,
        }
        .encode();
        let frame = Utf8Bytes::from(frame);
        self.app.hub.broadcast_except(&room, self.conn, &frame);
        // In a cluster, members on other nodes see it too.
        self.app.broker.typing(&room, &frame);
    }

    /// Replaces the token. Rooms the new token's `rooms` claim no longer allows are left, each
    /// answered `left` with `reason: forbidden` and announced like any leave.
    async fn refresh(&mut self, identity: &Identity, token: &str, id: Option<&str>) -> Option<End> {
        let req = Req::of(id, None);
        let fresh = match self.app.auth.verify(token) {
            Ok(fresh) if fresh.user == identity.user => fresh,
            Ok(_) => {
                self.app.metrics.auth_failure(
                    AuthFailure::WrongUser,
                    self.outbound.stream().peer_addr().ok(),
                );
                self.reply_error(
                    ErrorCode::Unauthorized,
                    "the new token is for another user",
                    req,
                );
                return None;
            }
            Err(err) => {
                self.app
                    .metrics
                    .auth_failure(&err, self.outbound.stream().peer_addr().ok());
                self.reply_error(ErrorCode::Unauthorized, &err.to_string(), req);
                return None;
            }
        };
        self.deadline = self.expiry(&fresh);
        self.push(
            ServerFrame::Refreshed {
                exp: fresh.expires_at,
                id,
            }
            .encode(),
        );
        let (kept, excluded): (Vec<_>, Vec<_>) =
            self.rooms.drain(..).partition(|room| fresh.may_join(room));
        self.rooms = kept;
        self.identity = Some(fresh);
        for room in excluded {
            let mut request = self.leave_request(identity, room, None);
            request.reason = Some("forbidden");
            if let Err(err) = self.app.broker.leave(request).await {
                self.broker_error(err, req);
            }
        }
        None
    }

    /// When the connection's token stops being valid: `exp` plus the `auth.leeway_s` that
    /// verification tolerates (a token accepted within the leeway is not closed at once).
    fn expiry(&self, identity: &Identity) -> Option<Instant> {
        let leeway = self.app.config.auth.leeway_s;
        identity
            .expires_at
            .map(|exp| expiry_instant(exp.saturating_add(leeway)))
    }

    fn joined(&self, room: &str) -> Option<Arc<str>> {
        self.rooms.iter().find(|r| &***r == room).cloned()
    }

    /// Joins a room; `Some` ends the session (rate-limit abuse).
    async fn join(
        &mut self,
        room: String,
        since: Option<(u64, String)>,
        id: Option<String>,
    ) -> Option<End> {
        let identity = self.identity.clone().expect("join after auth");
        let req = Req::of(id.as_deref(), Some(&room));
        if let Err(refusal) = validate::room(&room) {
            self.refuse(refusal, req);
            return None;
        }
        if !identity.may_join(&room) {
            self.reply_error(ErrorCode::Forbidden, FORBIDDEN, req);
            return None;
        }
        if self.joined(&room).is_some() {
            self.reply_error(ErrorCode::BadRequest, "already joined", req);
            return None;
        }
        let max_rooms = self.app.config.limits.max_rooms_per_connection;
        if self.rooms.len() >= max_rooms {
            let message = format!("at most {max_rooms} rooms per connection");
            self.reply_error(ErrorCode::TooManyRooms, &message, req);
            return None;
        }
        if let Err(wait) = self.joins.take() {
            return self.rate_limited(wait, "too many joins and leaves; retry later", req);
        }
        // After every earlier request of this connection (its sends in other rooms included).
        self.outbound.settled().await;
        let room: Arc<str> = room.into();
        let request = JoinRequest {
            room: room.clone(),
            user: identity.user.clone(),
            name: identity.name.clone(),
            conn: self.conn,
            outbound: self.outbound.clone(),
            since,
            request_id: id.as_deref().map(Box::from),
        };
        match self.app.broker.join(request).await {
            Ok(()) => self.rooms.push(room),
            Err(err) => self.broker_error(err, Req::of(id.as_deref(), Some(&room))),
        }
        None
    }

    /// A leave of `room` by this connection, answered `left` on its queue.
    fn leave_request(&self, identity: &Identity, room: Arc<str>, id: Option<&str>) -> LeaveRequest {
        LeaveRequest {
            room,
            user: identity.user.clone(),
            name: identity.name.clone(),
            conn: self.conn,
            outbound: Some(self.outbound.clone()),
            request_id: id.map(Box::from),
            reason: None,
        }
    }

    /// Leaves a room; `Some` ends the session (rate-limit abuse).
    async fn leave(&mut self, identity: &Identity, room: &str, id: Option<String>) -> Option<End> {
        let req = Req::of(id.as_deref(), Some(room));
        if let Err(refusal) = validate::room(room) {
            self.refuse(refusal, req);
            return None;
        }
        let Some(at) = self.rooms.iter().position(|r| &**r == room) else {
            self.reply_error(ErrorCode::NotJoined, "not in this room", req);
            return None;
        };
        if let Err(wait) = self.joins.take() {
            return self.rate_limited(wait, "too many joins and leaves; retry later", req);
        }
        self.outbound.settled().await;
        let room = self.rooms.swap_remove(at);
        let request = self.leave_request(identity, room, id.as_deref());
        if let Err(err) = self.app.broker.leave(request).await {
            self.broker_error(err, req);
        }
        None
    }

    /// Posts a message; `Some` ends the session (rate-limit abuse).
    async fn send(
        &mut self,
        identity: &Identity,
        room: &str,
        content: String,
        id: Option<String>,
    ) -> Option<End> {
        let received = std::time::Instant::now();
        let req = Req::of(id.as_deref(), Some(room));
        if let Err(refusal) = validate::room(room) {
            self.refuse(refusal, req);
            return None;
        }
        let Some(room) = self.joined(room) else {
            self.reply_error(ErrorCode::NotJoined, "join the room first", req);
            return None;
        };
        if self.app.policies.for_room(&room).publish == Publish::Api {
            self.reply_error(ErrorCode::Forbidden, API_ONLY, req);
            return None;
        }
        if let Err(refusal) = validate::content(&content, self.app.config.limits.max_content_bytes)
        {
            self.refuse(refusal, req);
            return None;
        }
        if let Err(wait) = self.sends.take() {
            return self.rate_limited(wait, "too many messages; retry later", req);
        }
        let request = PublishRequest {
            room,
            user: identity.user.clone(),
            name: identity.name.clone(),
            content,
            client_id: id.clone(),
            received,
        };
        self.app.metrics.messages_in.inc();
        let reply = PublishReply::Connection(InFlight::new(self.outbound.clone()));
        if let Err(err) = self.app.broker.publish(request, reply).await {
            // The request went with the failed call; only its id and room are needed here.
            self.broker_error(err, req);
        }
        None
    }

    async fn history(
        &mut self,
        identity: &Identity,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
        req: Req<'_>,
    ) {
        if let Err(refusal) = validate::room(room) {
            return self.refuse(refusal, req);
        }
        if !identity.may_join(room) {
            return self.reply_error(ErrorCode::Forbidden, FORBIDDEN, req);
        }
        let query = match validate::page(before, after, limit) {
            Ok(query) => query,
            Err(refusal) => return self.refuse(refusal, req),
        };
        match self.app.broker.history(room, query).await {
            Ok(mut page) => {
                // history.max_page_bytes bounds the whole frame: what is left of it around the
                // events is theirs.
                let empty = json_array(std::iter::empty::<&str>());
                // `more: false`, the longer of the two.
                let envelope = ServerFrame::History {
                    room,
                    messages: &empty,
                    more: false,
                    id: req.id,
                }
                .encode()
                .len()
                    - 2;
                let budget = self
                    .app
                    .config
                    .history
                    .max_page_bytes
                    .saturating_sub(envelope);
                cap_page(&mut page, &query, budget);
                let messages = json_array(page.frames.iter().map(String::as_str));
                self.push(
                    ServerFrame::History {
                        room,
                        messages: &messages,
                        more: page.more,
                        id: req.id,
                    }
                    .encode(),
                );
            }
            Err(err) => self.broker_error(err, req),
        }
    }

    fn broker_error(&self, err: BrokerError, req: Req<'_>) {
        if let BrokerError::Unavailable(detail) = &err {
            warn!(
                conn = self.conn,
                room = req.room,
                detail,
                "request refused: store unavailable"
            );
        }
        self.reply_error(err.code(), &err.to_string(), req);
    }

    /// The way out, boxed by the caller (an idle connection does not reserve its space):
    /// the close frame (after what is queued, unless the peer is the reason it is full) and
    /// the polite close, then a leave of every room, then the log line.
    async fn end(mut self, ws: Socket, end: End, peer: SocketAddr, opened: Instant) {
        let reason = match &end {
            End::Close(code) => code.reason(),
            End::Gone(why) => why,
        };
        if let End::Close(code) = end {
            let grace = Duration::from_millis(self.app.config.limits.close_grace_ms);
            let keep_queued = code != CloseCode::SlowConsumer;
            if keep_queued {
                // A close a request caused (4008) comes after the answers to every earlier
                // request, such as the ack of a send still being stored.
                let _ = tokio::time::timeout(grace, self.outbound.settled()).await;
            }
            ws.close(code.code(), code.reason(), keep_queued, grace)
                .await;
        } else {
            drop(ws);
        }
        self.leave_all().await;
        info!(
            conn = self.conn,
            %peer,
            user = self.identity.as_ref().map(|i| &*i.user),
            reason,
            secs = opened.elapsed().as_secs_f32(),
            "connection closed"
        );
    }

    async fn leave_all(&mut self) {
        let Some(identity) = self.identity.clone() else {
            return;
        };
        for room in std::mem::take(&mut self.rooms) {
            let request = LeaveRequest {
                outbound: None,
                ..self.leave_request(&identity, room, None)
            };
            if let Err(err) = self.app.broker.leave(request).await {
                debug!(conn = self.conn, error = %err, "leave on close failed");
            }
        }
    }
}

/// The message of `error forbidden`.
const FORBIDDEN: &str = "your token does not allow this room";
/// The message of `error forbidden` for a `send` where only the HTTP API posts.
const API_ONLY: &str = "only the server posts in this room (publish = api)";
/// The message of `error forbidden` for a `typing` where typing is off.
const TYPING_OFF: &str = "typing notices are off in this room";

/// What an answer needs of its request: the `id` to echo and the `room` an error names.
#[derive(Clone, Copy)]
struct Req<'a> {
    id: Option<&'a str>,
    room: Option<&'a str>,
}

impl<'a> Req<'a> {
    fn of(id: Option<&'a str>, room: Option<&'a str>) -> Req<'a> {
        Req { id, room }
    }

    fn none() -> Req<'static> {
        Req {
            id: None,
            room: None,
        }
    }
}

fn expiry_instant(exp_unix: u64) -> Instant {
    let now = Instant::now();
    let left = Duration::from_secs(exp_unix.saturating_sub(now_unix()));
    // An `exp` beyond what an `Instant` can hold (u64::MAX) never fires rather than panic.
    now.checked_add(left)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

/// Maps a read error to how the session ends.
fn classify(err: tungstenite::Error) -> End {
    match validate::read_error(err) {
        Ok(code) => End::Close(code),
        Err(why) => End::Gone(why),
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns, without calling it.
    fn returned_size<F, A, B, C, D, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// tokio allocates a task as one cell, aligned to 128 bytes: a 32-byte header, the future
    /// with 32 bytes of its own (the task tracker's token, the scheduler, the id, the stage's
    /// tag), a 48-byte trailer. A future of at most 1,168 bytes makes a 1,280-byte cell, one
    /// of jemalloc's size classes; a byte more makes a 1,408-byte cell, allocated as 1,536.
    /// Every idle connection holds one (docs/ARCHITECTURE.md, "Memory per connection"). The debug
    /// build this runs in lays the future out as the release build does (1,128 bytes in both,
    /// `-Zprint-type-sizes`); should they ever differ, measure the release build.
    #[test]
    fn a_connection_task_fits_the_1280_byte_size_class() {
        let size = returned_size(super::run);
        assert!(
            size <= 1168,
            "the connection's future is {size} bytes: its task no longer fits 1,280 bytes"
        );
    }
}
