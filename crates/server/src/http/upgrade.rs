//! The WebSocket handshake (RFC 6455 section 4.2), done here rather than by axum's
//! `WebSocketUpgrade` so the upgraded connection becomes a [`Socket`] that writes its own
//! frames. The checks are the RFC's: `GET`, `Connection: upgrade`, `Upgrade: websocket`,
//! `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`; a request that fails them gets a JSON
//! 400 (426 for a wrong version, with the version we speak).

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto::upgrade::downcast;
use tracing::{debug, error};

use super::ws::Admitted;
use super::ApiError;
use crate::limits::ConnectionSlot;
use crate::outbound::QueueBounds;
use crate::serve::ConnIo;
use crate::socket::{Socket, SocketLimits};
use crate::App;

/// A valid upgrade request, not yet answered.
pub(super) struct Upgrade {
    accept: String,
    on_upgrade: OnUpgrade,
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let bad = |m: &str| ApiError::bad_request(m).into_response();
        if parts.method != Method::GET {
            return Err(bad("a WebSocket upgrade must be a GET request"));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade")
            || !header_has_token(&parts.headers, header::UPGRADE, "websocket")
        {
            return Err(bad(
                "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket)",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            let mut response = (
                StatusCode::UPGRADE_REQUIRED,
                axum::Json(serde_json::json!({
                    "error": "bad_request",
                    "message": "unsupported WebSocket version; this server speaks version 13",
                })),
            )
                .into_response();
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return Err(response);
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(bad("missing Sec-WebSocket-Key"));
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(bad("this connection cannot be upgraded"));
        };
        Ok(Upgrade { accept, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and runs `serve` on the socket once the upgrade completes, as a task the
    /// server tracks (shutdown waits for it). The connection's place under the caps goes with
    /// the socket.
    pub(super) fn on_upgrade<F, Fut>(self, app: &App, admitted: Admitted, serve: F) -> Response
    where
        F: FnOnce(Socket, ConnectionSlot) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let limits = SocketLimits {
            max_frame_bytes: app.config.limits.max_frame_bytes,
            read_buffer_bytes: READ_BUFFER_BYTES,
            queue: QueueBounds {
                frames: app.config.limits.outbound_queue_frames,
                bytes: app.config.limits.outbound_queue_bytes,
            },
        };
        let on_upgrade = self.on_upgrade;
        let slot = admitted.into_slot();
        let sessions = app.sessions.clone();
        app.sessions.spawn(async move {
            if let Some(socket) = upgraded_socket(on_upgrade.await, limits) {
                // A task of its own, so the connection does not carry this one's state (the
                // closure's captures stay reserved in a future even after they are moved out).
                sessions.spawn(serve(socket, slot));
            }
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&self.accept).expect("base64 is a valid header value"),
        );
        response
    }
}

/// The raw TCP socket back from hyper, as a [`Socket`]: parley reads and writes it itself.
fn upgraded_socket(upgraded: hyper::Result<Upgraded>, limits: SocketLimits) -> Option<Socket> {
    let upgraded = upgraded
        .map_err(|err| debug!(error = %err, "upgrade failed"))
        .ok()?;
    match downcast::<TokioIo<ConnIo>>(upgraded) {
        Ok(parts) => Some(Socket::new(
            parts.io.into_inner().into_stream(),
            parts.read_buf,
            limits,
        )),
        Err(_) => {
            error!("an upgraded connection that is not a TCP socket");
            None
        }
    }
}

/// The read buffer a connection starts with. Chat frames are small; a bigger frame grows the
/// buffer while it is read. Small on purpose: every connection holds one for its whole life (256
/// bytes fit most chat frames; a bigger one takes a few more reads), and tungstenite
/// zero-fills it before each read.
const READ_BUFFER_BYTES: usize = 256;
