//! The accept loop: hyper-util's HTTP/1 + HTTP/2 connection builder over every accepted TCP
//! connection, with the bounds one client could otherwise stretch:
//!
//! - every TCP connection takes a place under `limits.max_connections` and
//!   `limits.max_connections_per_ip` (a connection from a trusted proxy counts per node only,
//!   until an upgrade names its client); past a cap it gets a 503 or 429 and is closed at once;
//! - a request head must be complete within `server.header_read_timeout_ms` of the accept or of
//!   the previous response (hyper's own HTTP/1 header timer; before hyper has seen a byte, and
//!   for the first request over HTTP/2, this loop's timer does the same);
//! - a connection with nothing read or written for `server.http_idle_timeout_ms` is closed;
//! - on shutdown each connection finishes its request in flight and closes.
//!
//! A WebSocket upgrade takes the connection's place with it ([`HeldSlot`]): the socket holds
//! exactly one place, its TCP connection's, for its whole life.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::limits::{CapRefusal, ConnectionSlot};
use crate::App;

/// How long a refused connection is kept, at most: to read its request head, answer 429/503,
/// and read and drop what else it sends until the client closes.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// The place of the TCP connection a request came on, in the request's extensions. An upgrade
/// takes it; a plain request leaves it where it is.
#[derive(Clone)]
pub struct HeldSlot(Arc<Mutex<Option<ConnectionSlot>>>);

impl HeldSlot {
    /// Takes the place out (an upgrade moves it to the socket's task).
    pub fn take(&self) -> Option<ConnectionSlot> {
        self.0.lock().expect("slot lock").take()
    }

    /// Puts a place taken with [`HeldSlot::take`] back (the upgrade did not happen).
    pub fn put_back(&self, slot: ConnectionSlot) {
        *self.0.lock().expect("slot lock") = Some(slot);
    }
}

/// When a connection last read or wrote a byte, and whether a request head has arrived.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last_ms: AtomicU64,
    /// A complete request head was read (the first request reached the router).
    requested: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The accepted TCP stream as hyper sees it: every byte read or written is noted for the idle
/// timer. The upgrade takes the stream back out ([`ConnIo::into_stream`]).
pub struct ConnIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl ConnIo {
    /// The TCP stream, for a connection that was upgraded.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One connection's service: the router, with the peer address (`ConnectInfo`) and the
/// connection's place in every request's extensions.
#[derive(Clone)]
struct ConnService {
    router: Router,
    peer: SocketAddr,
    slot: HeldSlot,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        self.activity.requested.store(true, Ordering::Relaxed);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        request.extensions_mut().insert(self.slot.clone());
        let mut router = self.router.clone();
        let request = request.map(axum::body::Body::new);
        Box::pin(async move { tower_service::Service::call(&mut router, request).await })
    }
}

/// Accepts connections until the app's shutdown token is cancelled, then waits (at most
/// `server.shutdown_grace_ms`) for the connections in flight to finish their requests.
pub async fn serve(listener: TcpListener, app: App) {
    let config = &app.config.server;
    let header_timeout = Duration::from_millis(config.header_read_timeout_ms);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let router = crate::http::router(app.clone());
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    error!(error = %err, "accept failed");
                    tokio::select! {
                        _ = app.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        // TCP_NODELAY: a small frame (an ack, a pong) written right after a large one must not
        // wait for the peer's delayed ACK (Nagle), which stalls it by ~40 ms.
        let _ = stream.set_nodelay(true);
        let proxied = app.config.limits.trusted_proxies.contains(&peer.ip());
        match app.caps.acquire((!proxied).then_some(peer.ip())) {
            Ok(slot) => {
                connections.spawn(connection(
                    builder.clone(),
                    router.clone(),
                    app.clone(),
                    stream,
                    peer,
                    slot,
                ));
            }
            Err(refusal) => {
                debug!(%peer, ?refusal, "connection refused: over the connection caps");
                connections.spawn(refuse(stream, refusal, app.clone()));
            }
        }
    }
    drop(listener);
    connections.close();
    let grace = Duration::from_millis(app.config.server.shutdown_grace_ms);
    let _ = tokio::time::timeout(grace, connections.wait()).await;
}

/// Serves one connection until it ends, is upgraded, times out or is shut down.
async fn connection(
    builder: Arc<Builder<TokioExecutor>>,
    router: Router,
    app: App,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let server = &app.config.server;
    let header_timeout = Duration::from_millis(server.header_read_timeout_ms);
    let idle_timeout = Duration::from_millis(server.http_idle_timeout_ms);
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        requested: AtomicBool::new(false),
    });
    let service = ConnService {
        router,
        peer,
        // Dropped with this task unless an upgrade took it.
        slot: HeldSlot(Arc::new(Mutex::new(Some(slot)))),
        activity: activity.clone(),
    };
    let io = TokioIo::new(ConnIo {
        stream,
        activity: activity.clone(),
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let cancelled = app.shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut draining = false;
    loop {
        // The earlier of: the first request head's deadline (hyper's header timer covers every
        // later one, and this one too once it has seen a byte), and the idle deadline.
        let mut due = activity.last() + idle_timeout;
        if !activity.requested.load(Ordering::Relaxed) {
            due = due.min(activity.start + header_timeout);
        }
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(err) = served {
                    debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = &mut cancelled, if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(due) => {
                let now = Instant::now();
                if !activity.requested.load(Ordering::Relaxed)
                    && now >= activity.start + header_timeout
                {
                    debug!(%peer, "closed: no request head within server.header_read_timeout_ms");
                    return;
                }
                if now >= activity.last() + idle_timeout {
                    debug!(%peer, "closed: idle for server.http_idle_timeout_ms");
                    return;
                }
            }
        }
    }
}

/// Answers a connection over a cap with 429 or 503 and closes it. The answer follows the
/// request head (an HTTP client takes an answer before its request for a broken connection);
/// the head, the answer and the close all happen within [`REFUSAL_LINGER`], and whatever the
/// client sends meanwhile is dropped unread. Reading it rather than closing at once keeps the
/// kernel from resetting the connection before the client has read the answer.
async fn refuse(mut stream: TcpStream, refusal: CapRefusal, app: App) {
    let (status, code, message) = match refusal {
        CapRefusal::PerIp => (
            "429 Too Many Requests",
            "too_many_connections",
            format!(
                "at most {} connections per client address",
                app.config.limits.max_connections_per_ip
            ),
        ),
        CapRefusal::Node => (
            "503 Service Unavailable",
            "unavailable",
            "this node is at its connection limit; try another".to_owned(),
        ),
    };
    drop(app);
    let deadline = Instant::now() + REFUSAL_LINGER;
    // Up to the end of the request head: the last four bytes read, and how many in all.
    let mut tail = [0u8; 4];
    let mut total = 0usize;
    let head_read = tokio::time::timeout_at(deadline, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    for &b in &buf[..n] {
                        tail = [tail[1], tail[2], tail[3], b];
                        if &tail == b"\r\n\r\n" {
                            return true;
                        }
                    }
                    total += n;
                    if total > 16 * 1024 {
                        return false;
                    }
                }
            }
        }
    })
    .await;
    if head_read == Ok(true) {
        let body = serde_json::json!({ "error": code, "message": message }).to_string();
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        // The answer fits in an empty socket buffer: one non-blocking write, never a wait.
        let _ = stream.try_write(answer.as_bytes());
    }
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout_at(deadline, async {
        let mut sink = [0u8; 1024];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
