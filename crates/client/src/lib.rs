//! `parley-client`: a client for the parley chat server (wire protocol 1.1, `docs/protocol.md`),
//! over tokio. The Rust twin of the JS library in `clients/js`, with the same semantics:
//!
//! - it keeps a connection up: exponential backoff with jitter, application pings when the
//!   socket is quiet, token refresh before `exp` when the token comes from a callback, a new
//!   token and a reconnect on close 4011; close 4001 (unauthorized) and 4008 (rate-limit abuse)
//!   are terminal;
//! - it rejoins the rooms you joined after every reconnect with `since`/`epoch`, pages forward
//!   with `history{after}` when a resume is `truncated`, and tells you with
//!   [`RoomEvent::Reset`] when the log could not be resumed (new epoch, or `since` too old);
//! - it keeps every [`Room::send`] until its `ack` arrives and resends it with the same id across
//!   reconnects (the server de-duplicates), pacing sends at the connection's announced rate and
//!   honouring `retry_after_ms`;
//! - it hands every room event to [`Room::events`] exactly once, in seq order.
//!
//! Every frame is built and parsed with the `parley-protocol` crate's types
//! ([`ClientFrame`](parley_protocol::ClientFrame) and
//! [`received::Received`](parley_protocol::received::Received)).
//!
//! ```no_run
//! use parley_client::{Client, Options, RoomEvent};
//!
//! # async fn demo() -> Result<(), parley_client::Error> {
//! let client = Client::connect(
//!     "ws://127.0.0.1:3000/ws",
//!     Options { token: Some("eyJ...".into()), ..Options::default() },
//! );
//! let room = client.room("general");
//! let mut events = room.events(); // subscribe before joining: the join's history comes here
//! room.join().await?;
//! let ack = room.send("hello").await?;
//! println!("stored as #{}", ack.seq);
//! while let Some(event) = events.recv().await {
//!     match event {
//!         RoomEvent::Message(m) => println!("{}: {}", m.name, m.content),
//!         RoomEvent::Reset { .. } => println!("(history was reset; reload your view)"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Only `ws://` URLs work out of the box; for `wss://` enable one of tokio-tungstenite's TLS
//! features in your application (it is unified with this crate's dependency).

#![deny(missing_docs)]

mod driver;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

pub use parley_protocol::codes::{CloseCode, ErrorCode};
pub use parley_protocol::received::{Event, Joined, MessageEvent, SystemEvent};
pub use parley_protocol::server::Limits;

use driver::Command;

/// The error a token callback may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future a token callback returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

/// Where the client gets its JWT.
#[derive(Clone)]
pub enum TokenSource {
    /// One token for the client's whole life; when it expires (close 4011) the client stops.
    Static(String),
    /// Called before every (re)connect and before the current token's `exp`, so the client can
    /// refresh and reconnect by itself. Build one with [`TokenSource::callback`].
    Callback(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl TokenSource {
    /// A token source from an async closure, e.g. one that asks your backend for a token.
    pub fn callback<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        TokenSource::Callback(Arc::new(move || Box::pin(f())))
    }

    pub(crate) async fn get(&self) -> Result<String, BoxError> {
        match self {
            TokenSource::Static(token) => Ok(token.clone()),
            TokenSource::Callback(f) => f().await,
        }
    }

    pub(crate) fn is_callback(&self) -> bool {
        matches!(self, TokenSource::Callback(_))
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Static(_) => f.write_str("TokenSource::Static(..)"),
            TokenSource::Callback(_) => f.write_str("TokenSource::Callback(..)"),
        }
    }
}

impl From<String> for TokenSource {
    fn from(token: String) -> Self {
        TokenSource::Static(token)
    }
}

impl From<&str> for TokenSource {
    fn from(token: &str) -> Self {
        TokenSource::Static(token.to_owned())
    }
}

/// How the client connects and behaves. Start from [`Options::default`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The JWT (jwt mode). Sent in the first-message `auth` frame, never in the URL.
    pub token: Option<TokenSource>,
    /// Anonymous mode (development servers): the user id, sent as `?user=`.
    pub user: Option<String>,
    /// Anonymous mode: the display name, sent as `?name=`.
    pub name: Option<String>,
    /// The first reconnect delay; it doubles per failed attempt (with "equal jitter").
    pub backoff_base: Duration,
    /// The longest reconnect delay.
    pub backoff_max: Duration,
    /// How long a connection may take to be authenticated before it is dropped and retried.
    pub connect_timeout: Duration,
    /// At most one `typing` notice per room per this interval.
    pub typing_interval: Duration,
    /// Page size when paging forward after a truncated resume (1 to 200).
    pub history_page_limit: u32,
    /// How long to wait before retrying a request the server answered `unavailable`.
    pub retry_unavailable: Duration,
    /// Pace sends with a token bucket mirroring the server's (`authenticated.limits`), so the
    /// client never gets itself refused. Turning it off is for tests of the server's limits.
    pub pace_sends: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: None,
            user: None,
            name: None,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            typing_interval: Duration::from_secs(2),
            history_page_limit: 200,
            retry_unavailable: Duration::from_secs(1),
            pace_sends: true,
        }
    }
}

/// The connection's state, watched with [`Client::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting, authenticating, or waiting to reconnect.
    Connecting,
    /// Authenticated: requests go out.
    Open,
    /// Closed for good ([`Client::close`], or a terminal close; see [`Client::error`]).
    Closed,
}

/// Who the server says we are, from the latest `authenticated` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The user id (the token's `sub`, or the anonymous name).
    pub user_id: String,
    /// The display name.
    pub name: String,
    /// The connection's limits (absent from 1.0 servers).
    pub limits: Option<Limits>,
    /// The token's expiry in unix seconds (absent in anonymous mode).
    pub exp: Option<u64>,
}

/// Why a request failed, or why the client stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The server (or the client's own check of the same rule) refused the request.
    #[error("{}: {message}", code.as_str())]
    Refused {
        /// The protocol's error code.
        code: ErrorCode,
        /// A human explanation.
        message: String,
        /// With `rate_limited`: when the server has a token again.
        retry_after_ms: Option<u64>,
    },
    /// The client was closed with [`Client::close`] (or every handle was dropped).
    #[error("the client is closed")]
    Closed,
    /// The server closed the connection with a terminal code (4001 unauthorized, 4008
    /// rate-limit abuse, or 4011 with a static token): the client does not reconnect.
    #[error("closed by the server with {code}: {reason}")]
    Terminated {
        /// The WebSocket close code.
        code: u16,
        /// What the server (or the client) said about it.
        reason: String,
    },
    /// The room was left (by [`Room::leave`], or the server took the connection out, e.g.
    /// `forbidden` after a narrower token) before the request completed.
    #[error("left the room{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Left {
        /// The server's reason, when it took the connection out.
        reason: Option<String>,
    },
}

/// A stored message's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The message's seq in its room.
    pub seq: u64,
    /// The client id the message was sent with.
    pub id: String,
    /// The server had already stored this message (a resend after a lost ack).
    pub duplicate: bool,
}

/// Which page of a room's log [`Room::history`] asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Events with seq below this (newest such page).
    pub before: Option<u64>,
    /// Events with seq above this (oldest such page).
    pub after: Option<u64>,
    /// Page size, 1 to 200 (server default 50).
    pub limit: Option<u32>,
}

/// One page of a room's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Events, oldest first.
    pub messages: Vec<Event>,
    /// Further events remain in the direction of paging.
    pub more: bool,
}

/// What happens in a room, as [`Room::events`] delivers it.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomEvent {
    /// A chat message (each exactly once, in seq order, across reconnects).
    Message(MessageEvent),
    /// A join or leave (sequenced like messages).
    System(SystemEvent),
    /// Someone else is typing.
    Typing {
        /// Their user id.
        user: String,
    },
    /// The member list changed (user ids, sorted); empty past `presence.announce_max`.
    Presence(Vec<String>),
    /// The room's log could not be resumed (a new epoch, or the last seen seq is no longer
    /// kept): events restart from `joined`'s history; drop what you showed of this room.
    Reset {
        /// The room's new epoch.
        epoch: String,
        /// The epoch the client had before.
        previous_epoch: Option<String>,
        /// The room's latest seq.
        seq: u64,
    },
    /// The server took the connection out of the room unasked (e.g. `forbidden`).
    Left {
        /// The server's reason.
        reason: Option<String>,
    },
}

/// A room's events, from [`Room::events`]. Also a [`futures_util::Stream`].
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<RoomEvent>,
}

impl Events {
    /// The next event; `None` once the client is gone.
    pub async fn recv(&mut self) -> Option<RoomEvent> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<RoomEvent> {
        self.rx.try_recv().ok()
    }
}

impl futures_util::Stream for Events {
    type Item = RoomEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RoomEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// A connection to a parley server that keeps itself up. Cheap to clone; the connection ends
/// with [`Client::close`] or when the last handle (clients and rooms) is dropped.
#[derive(Clone)]
pub struct Client {
    cmd: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<State>,
    session: watch::Receiver<Option<Session>>,
    error: Arc<Mutex<Option<Error>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts connecting to `url` (e.g. `ws://127.0.0.1:3000/ws`) in a background task and
    /// returns at once; requests made before the connection is open wait for it. Must be
    /// called within a tokio runtime.
    pub fn connect(url: impl Into<String>, options: Options) -> Client {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(State::Connecting);
        let (session_tx, session) = watch::channel(None);
        let error = Arc::new(Mutex::new(None));
        let driver = driver::Driver::new(
            url.into(),
            options,
            cmd_rx,
            state_tx,
            session_tx,
            error.clone(),
        );
        tokio::spawn(driver.run());
        Client {
            cmd: cmd_tx,
            state,
            session,
            error,
        }
    }

    /// The connection state, as a watch: `borrow()` for now, `changed()` to wait.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Waits until the state is `state` (or the client closes); returns the state reached.
    pub async fn wait_for(&self, state: State) -> State {
        let mut rx = self.state.clone();
        let reached = rx
            .wait_for(|s| *s == state || *s == State::Closed)
            .await
            .map(|s| *s)
            .unwrap_or(State::Closed);
        reached
    }

    /// Who the server says we are (after the first `authenticated`).
    pub fn session(&self) -> Option<Session> {
        self.session.borrow().clone()
    }

    /// Why the client stopped, when a terminal close (4001, 4008, 4011 without a callback)
    /// ended it.
    pub fn error(&self) -> Option<Error> {
        self.error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    /// A handle on the room `name`. Handles are cheap; every handle of a name is the same room.
    pub fn room(&self, name: impl Into<String>) -> Room {
        Room {
            name: name.into(),
            cmd: self.cmd.clone(),
        }
    }

    /// Skips the backoff wait: drops the current socket (if any) and reconnects at once.
    pub fn reconnect(&self) {
        let _ = self.cmd.send(Command::Reconnect);
    }

    /// Closes for good (close 1000); pending requests fail with [`Error::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A room of a [`Client`]. Joins are remembered: after a reconnect the client rejoins and
/// resumes by itself.
#[derive(Clone)]
pub struct Room {
    name: String,
    cmd: mpsc::UnboundedSender<Command>,
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Room").field("name", &self.name).finish()
    }
}

impl Room {
    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).map_err(|_| Error::Closed)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// A new subscription to the room's events, from now on. Subscribe before [`Room::join`]
    /// to get the join's history too. Every subscription gets every event.
    pub fn events(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.cmd.send(Command::Subscribe {
            room: self.name.clone(),
            tx,
        });
        Events { rx }
    }

    /// Joins (and stays joined across reconnects); returns the `joined` frame. Joining a room
    /// already joined returns its latest `joined` at once.
    pub async fn join(&self) -> Result<Joined, Error> {
        self.ask(|reply| Command::Join {
            room: self.name.clone(),
            reply,
        })
        .await
    }

    /// Posts `content`; returns once it is stored. Kept and resent with the same id across
    /// reconnects until the `ack` comes. The room must be joined.
    pub async fn send(&self, content: impl Into<String>) -> Result<Ack, Error> {
        self.ask(|reply| Command::Send {
            room: self.name.clone(),
            content: content.into(),
            reply,
        })
        .await
    }

    /// One page of the room's log (no membership needed).
    pub async fn history(&self, query: HistoryQuery) -> Result<Page, Error> {
        self.ask(|reply| Command::History {
            room: self.name.clone(),
            query,
            reply,
        })
        .await
    }

    /// Tells the others you are typing; throttled to one notice per
    /// [`Options::typing_interval`], dropped when not joined or where the room takes none
    /// (`joined.typing` is `false`).
    pub fn typing(&self) {
        let _ = self.cmd.send(Command::Typing {
            room: self.name.clone(),
        });
    }

    /// Leaves; unacknowledged sends of the room fail with [`Error::Left`].
    pub async fn leave(&self) -> Result<(), Error> {
        self.ask(|reply| Command::Leave {
            room: self.name.clone(),
            reply,
        })
        .await
    }
}
