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
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use parley_protocol::client::{decode, ClientFrame};
use parley_protocol::server::{json_array, ServerFrame};
use parley_protocol::{valid_room_name, CloseCode, ErrorCode};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::auth::{now_unix, Identity};
use crate::broker::{BrokerError, JoinRequest, LeaveRequest, PublishReply, PublishRequest};
use crate::hub::ConnId;
use crate::limits::{AbuseCounter, Bucket, ConnectionSlot};
use crate::metrics::AuthFailure;
use crate::outbound::{Outbound, Progress};
use crate::socket::{Message, Opcode, Socket};
use crate::store::sqlite::PageQuery;
use crate::App;
use bytes::Bytes;

/// Largest history page.
pub const MAX_PAGE: u32 = 200;
/// History page when the request gives no limit.
pub const DEFAULT_PAGE: u32 = 50;

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
        typing: Bucket::new(limits.typing_rate, limits.typing_burst),
        abuse: AbuseCounter::new(
            limits.abuse_refusals,
            Duration::from_millis(limits.abuse_window_ms),
        ),
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
        let _open = open;
        if session.identity.is_some() {
            if let Some((room, since)) = auto_join.take().map(|b| *b) {
                let joining = Box::pin(session.join(room, since));
                joining.await;
            }
        }

        // The serving loop lives as long as the connection, so it is part of this future (one
        // allocation, the task's). Shorter phases are boxed in a statement of their own and
        // awaited in the next: a temporary in the statement that awaits would keep its space
        // in this future for the connection's whole life, even after it was moved into the box.
        let end = session.serve(&mut ws, &mut auto_join).await;
        let reason = match &end {
            End::Close(code) => code.reason(),
            End::Gone(why) => why,
        };
        if let End::Close(code) = end {
            // After what is queued, unless the peer is the reason it is full.
            let grace = Duration::from_millis(session.app.config.limits.close_grace_ms);
            let keep_queued = code != CloseCode::SlowConsumer;
            let closing = Box::pin(ws.close(code.code(), code.reason(), keep_queued, grace));
            closing.await;
        } else {
            drop(ws);
        }
        let leaving = Box::pin(session.leave_all());
        leaving.await;
        info!(
            conn,
            %peer,
            user = session.identity.as_ref().map(|i| &*i.user),
            reason,
            secs = opened.elapsed().as_secs_f32(),
            "connection closed"
        );
    }
}

impl Session {
    async fn serve(&mut self, ws: &mut Socket, auto_join: &mut Option<Box<AutoJoin>>) -> End {
        let heartbeat = &self.app.config.heartbeat;
        let interval = Duration::from_millis(heartbeat.interval_ms);
        let timeout = Duration::from_millis(heartbeat.timeout_ms);
        let shutdown = self.app.shutdown.clone();
        let mut last_heard = Instant::now();
        let mut next_ping = last_heard + interval;
        // One timer for the heartbeat and the deadline (auth timeout, token expiry): it fires
        // at the earlier of the two, and the branch sorts out which it was.
        let due = |next_ping: Instant, last_heard: Instant, deadline: Option<Instant>| {
            let beat = next_ping.min(last_heard + timeout);
            deadline.map_or(beat, |d| d.min(beat))
        };
        let mut armed_deadline = self.deadline;
        let timer = tokio::time::sleep_until(due(next_ping, last_heard, armed_deadline));
        tokio::pin!(timer);
        let outbound = self.outbound.clone();
        // Both waits are made once and polled in place: re-creating them on every turn would
        // register and unregister a waiter per frame.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let ready = outbound.ready();
        tokio::pin!(ready);
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => return End::Close(CloseCode::GoingAway),
                _ = &mut ready => {
                    ready.set(outbound.ready());
                    let writing = Box::pin(self.write_pending());
                    if let Err(end) = writing.await {
                        return end;
                    }
                }
                msg = ws.recv() => {
                    last_heard = Instant::now();
                    let frame = match msg {
                        None => return End::Gone("peer disconnected"),
                        Some(Err(err)) => return classify(err),
                        Some(Ok(frame)) => frame,
                    };
                    match frame {
                        Message::Text(text) => {
                            // Boxed: request handling is the biggest state of this future,
                            // and an idle connection should not carry it.
                            let handling = Box::pin(self.handle(&text));
                            if let Some(end) = handling.await {
                                return end;
                            }
                            if self.identity.is_some() {
                                if let Some((room, since)) = auto_join.take().map(|b| *b) {
                                    let joining = Box::pin(self.join(room, since));
                                    joining.await;
                                }
                            }
                        }
                        Message::Binary(_) => {
                            if self.identity.is_none() {
                                self.app.metrics.auth_failure(AuthFailure::NotAuthFrame);
                                self.reply_error(ErrorCode::Unauthorized, "authenticate first", None);
                                return End::Close(CloseCode::Unauthorized);
                            }
                            self.reply_error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text frames", None);
                        }
                        Message::Ping(data) => {
                            outbound.push_frame(Opcode::Pong, data);
                        }
                        Message::Pong(_) | Message::Frame(_) => {}
                        // Answer the closing handshake with the client's own code (RFC 6455 5.5.1).
                        Message::Close(frame) => {
                            let code = frame.map_or(CloseCode::Normal.code(), |f| u16::from(f.code));
                            let code = if code == 1005 { CloseCode::Normal.code() } else { code };
                            outbound.close_with(code, "", true);
                            let flushing = Box::pin(tokio::time::timeout(timeout, outbound.flush()));
                            let _ = flushing.await;
                            return End::Gone("client closed");
                        }
                    }
                    // Authenticated or refreshed: the deadline moved.
                    if self.deadline != armed_deadline {
                        armed_deadline = self.deadline;
                        timer.as_mut().reset(due(next_ping, last_heard, self.deadline));
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if self.deadline.is_some_and(|d| now >= d) {
                        if self.identity.is_none() {
                            self.app.metrics.auth_failure(AuthFailure::Timeout);
                            self.reply_error(ErrorCode::Unauthorized, "no auth frame within the auth timeout", None);
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
                    timer.as_mut().reset(due(next_ping, last_heard, self.deadline));
                }
            }
        }
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

    fn reply_error(&self, code: ErrorCode, message: &str, id: Option<&str>) {
        self.push(
            ServerFrame::Error {
                code,
                message,
                id,
                retry_after_ms: None,
            }
            .encode(),
        );
    }

    fn authenticated(&mut self, identity: Identity) {
        self.push(
            ServerFrame::Authenticated {
                user_id: &identity.user,
                name: &identity.name,
                heartbeat_ms: self.app.config.heartbeat.interval_ms,
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
                    self.app.metrics.auth_failure(AuthFailure::NotAuthFrame);
                    self.reply_error(
                        ErrorCode::Unauthorized,
                        "the first frame must be auth",
                        None,
                    );
                    return Some(End::Close(CloseCode::Unauthorized));
                }
                self.reply_error(ErrorCode::BadRequest, &err.message, err.id.as_deref());
                return None;
            }
        };
        let Some(identity) = self.identity.clone() else {
            let ClientFrame::Auth { token } = frame else {
                self.app.metrics.auth_failure(AuthFailure::NotAuthFrame);
                self.reply_error(
                    ErrorCode::Unauthorized,
                    "the first frame must be auth",
                    None,
                );
                return Some(End::Close(CloseCode::Unauthorized));
            };
            return match self.app.auth.verify(&token) {
                Ok(identity) => {
                    self.authenticated(identity);
                    None
                }
                Err(err) => {
                    self.app.metrics.auth_failure(&err);
                    self.reply_error(ErrorCode::Unauthorized, &err.to_string(), None);
                    Some(End::Close(CloseCode::Unauthorized))
                }
            };
        };
        match frame {
            ClientFrame::Auth { .. } => {
                self.reply_error(ErrorCode::BadRequest, "already authenticated", None)
            }
            ClientFrame::Refresh { token } => self.refresh(&identity, &token),
            ClientFrame::Join { room, since, epoch } => {
                let since = match (since, epoch) {
                    (Some(since), Some(epoch)) => Some((since, epoch)),
                    (None, None) => None,
                    _ => {
                        self.reply_error(
                            ErrorCode::BadRequest,
                            "`since` and `epoch` go together",
                            None,
                        );
                        return None;
                    }
                };
                self.join(room, since).await;
            }
            ClientFrame::Leave { room } => self.leave(&identity, &room).await,
            ClientFrame::Send { room, content, id } => {
                return self.send(&identity, &room, content, id).await;
            }
            ClientFrame::History {
                room,
                before,
                after,
                limit,
            } => self.history(&identity, &room, before, after, limit).await,
            ClientFrame::Typing { room } => {
                if !self.check_room(&room, None) {
                    return None;
                }
                let Some(room) = self.joined(&room) else {
                    self.reply_error(ErrorCode::NotJoined, "join the room first", None);
                    return None;
                };
                // Typing is ephemeral: past its bucket it is dropped without a word.
                if self.typing.take().is_err() {
                    return None;
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
            ClientFrame::Ping => self.push(ServerFrame::Pong.encode()),
        }
        None
    }

    fn refresh(&mut self, identity: &Identity, token: &str) {
        match self.app.auth.verify(token) {
            Ok(fresh) if fresh.user == identity.user => {
                self.deadline = self.expiry(&fresh);
                self.identity = Some(fresh);
            }
            Ok(_) => {
                self.app.metrics.auth_failure(AuthFailure::WrongUser);
                self.reply_error(
                    ErrorCode::Unauthorized,
                    "the new token is for another user",
                    None,
                )
            }
            Err(err) => {
                self.app.metrics.auth_failure(&err);
                self.reply_error(ErrorCode::Unauthorized, &err.to_string(), None)
            }
        }
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

    fn check_room(&self, room: &str, id: Option<&str>) -> bool {
        if !valid_room_name(room) {
            self.reply_error(
                ErrorCode::BadRequest,
                "invalid room name: 1 to 64 of A-Z a-z 0-9 _ . : -, starting with a letter or digit",
                id,
            );
            return false;
        }
        true
    }

    async fn join(&mut self, room: String, since: Option<(u64, String)>) {
        let identity = self.identity.clone().expect("join after auth");
        if !self.check_room(&room, None) {
            return;
        }
        if !identity.may_join(&room) {
            self.reply_error(
                ErrorCode::Forbidden,
                "your token does not allow this room",
                None,
            );
            return;
        }
        if self.joined(&room).is_some() {
            self.reply_error(ErrorCode::BadRequest, "already joined", None);
            return;
        }
        if self.rooms.len() >= self.app.config.limits.max_rooms_per_connection {
            self.reply_error(
                ErrorCode::TooManyRooms,
                &format!(
                    "at most {} rooms per connection",
                    self.app.config.limits.max_rooms_per_connection
                ),
                None,
            );
            return;
        }
        let room: Arc<str> = room.into();
        let request = JoinRequest {
            room: room.clone(),
            user: identity.user.clone(),
            conn: self.conn,
            outbound: self.outbound.clone(),
            since,
        };
        match self.app.broker.join(request).await {
            Ok(()) => self.rooms.push(room),
            Err(err) => self.broker_error(err, None),
        }
    }

    async fn leave(&mut self, identity: &Identity, room: &str) {
        if !self.check_room(room, None) {
            return;
        }
        let Some(at) = self.rooms.iter().position(|r| &**r == room) else {
            self.reply_error(ErrorCode::NotJoined, "not in this room", None);
            return;
        };
        let room = self.rooms.swap_remove(at);
        let request = LeaveRequest {
            room,
            user: identity.user.clone(),
            conn: self.conn,
            outbound: Some(self.outbound.clone()),
        };
        if let Err(err) = self.app.broker.leave(request).await {
            self.broker_error(err, None);
        }
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
        let id_ref = id.as_deref();
        if !self.check_room(room, id_ref) {
            return None;
        }
        let Some(room) = self.joined(room) else {
            self.reply_error(ErrorCode::NotJoined, "join the room first", id_ref);
            return None;
        };
        let max = self.app.config.limits.max_content_bytes;
        if content.len() > max {
            self.reply_error(
                ErrorCode::TooLarge,
                &format!("content is {} bytes; the limit is {max}", content.len()),
                id_ref,
            );
            return None;
        }
        if content.is_empty() {
            self.reply_error(ErrorCode::BadRequest, "content is empty", id_ref);
            return None;
        }
        if let Err(wait) = self.sends.take() {
            self.app.metrics.rate_limited.inc();
            // Rounded up, so a client that waits exactly this long finds a token.
            let retry_after_ms = wait.as_micros().div_ceil(1000).max(1) as u64;
            self.push(
                ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    message: "too many messages; retry later",
                    id: id_ref,
                    retry_after_ms: Some(retry_after_ms),
                }
                .encode(),
            );
            if self.abuse.refuse() {
                return Some(End::Close(CloseCode::RateLimitAbuse));
            }
            return None;
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
        let reply = PublishReply::Connection(self.outbound.clone());
        if let Err(err) = self.app.broker.publish(request, reply).await {
            self.broker_error(err, id.as_deref());
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
    ) {
        if !self.check_room(room, None) {
            return;
        }
        if !identity.may_join(room) {
            self.reply_error(
                ErrorCode::Forbidden,
                "your token does not allow this room",
                None,
            );
            return;
        }
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            self.reply_error(
                ErrorCode::BadRequest,
                &format!("limit must be 1 to {MAX_PAGE}"),
                None,
            );
            return;
        }
        let query = PageQuery {
            before,
            after,
            limit,
        };
        match self.app.broker.history(room, query).await {
            Ok(page) => {
                let messages = json_array(page.frames.iter().map(String::as_str));
                self.push(
                    ServerFrame::History {
                        room,
                        messages: &messages,
                        more: page.more,
                    }
                    .encode(),
                );
            }
            Err(err) => self.broker_error(err, None),
        }
    }

    fn broker_error(&self, err: BrokerError, id: Option<&str>) {
        let code = match err {
            BrokerError::Unavailable(_) | BrokerError::Closed => ErrorCode::Unavailable,
        };
        self.reply_error(code, &err.to_string(), id);
    }

    async fn leave_all(&mut self) {
        let Some(identity) = &self.identity else {
            return;
        };
        for room in self.rooms.drain(..) {
            let request = LeaveRequest {
                room,
                user: identity.user.clone(),
                conn: self.conn,
                outbound: None,
            };
            if let Err(err) = self.app.broker.leave(request).await {
                debug!(conn = self.conn, error = %err, "leave on close failed");
            }
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

/// Maps a read error to how the session ends: oversize frames close with 1009, invalid UTF-8
/// with 1007 (RFC 6455), anything else means the peer is gone.
fn classify(err: tungstenite::Error) -> End {
    match close_code_for(err) {
        Ok(code) => End::Close(code),
        Err(why) => End::Gone(why),
    }
}

/// The close code a read error calls for, or why there is no one to send it to. Shared with
/// `/echo`, so both sockets answer bad frames alike.
pub(crate) fn close_code_for(err: tungstenite::Error) -> Result<CloseCode, &'static str> {
    use tungstenite::Error;
    match err {
        Error::Capacity(_) => Ok(CloseCode::TooBig),
        Error::Utf8(_) => Ok(CloseCode::InvalidPayload),
        Error::Protocol(_) => Err("protocol violation"),
        _ => Err("read failed"),
    }
}
