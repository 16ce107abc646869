//! `GET /echo`: answers each text frame `t` with `Echo: t` and each binary frame with itself.
//! It is upgraded with exactly the WebSocket settings of `/ws`, so diagnostics and conformance
//! runs see what chat clients get.
//!
//! `GET /echo?raw=1` (or `?raw=true`) is the exact-echo mode for conformance suites such as
//! Autobahn's fuzzingclient: text frames come back unchanged, without the `Echo: ` prefix.
//! Any other value of `raw`, or none, keeps the default.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use parley_protocol::CloseCode;
use tokio::time::{timeout, Instant};

use axum::extract::{ConnectInfo, Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::upgrade::Upgrade;
use crate::limits::ConnectionSlot;
use crate::serve::HeldSlot;
use crate::socket::{Message, Opcode, Socket};
use crate::validate;
use crate::App;

/// Query parameters of the echo upgrade.
#[derive(Debug, Deserialize)]
pub(super) struct EchoQuery {
    raw: Option<String>,
}

pub(super) async fn echo(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(held): Extension<HeldSlot>,
    Query(query): Query<EchoQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let admitted = match super::ws::admit(&app, peer, &headers, &held) {
        Ok(admitted) => admitted,
        Err(err) => return err.into_response(),
    };
    let raw = matches!(query.raw.as_deref(), Some("1" | "true"));
    upgrade.on_upgrade(&app.clone(), admitted, move |socket, slot| {
        echo_socket(socket, app, raw, slot)
    })
}

/// Echoes until the peer closes, goes silent or the server shuts down. The heartbeat is the
/// chat socket's: a ping every `heartbeat.interval_ms`, and a peer silent (no frame of any
/// kind) for `heartbeat.timeout_ms` is dropped, freeing its place under the connection caps.
async fn echo_socket(mut socket: Socket, app: App, raw: bool, _slot: ConnectionSlot) {
    let limits = &app.config.limits;
    let grace = Duration::from_millis(limits.close_grace_ms);
    let interval = Duration::from_millis(app.config.heartbeat.interval_ms);
    let silence = Duration::from_millis(app.config.heartbeat.timeout_ms);
    let write_limit = silence;
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + interval;
    let close_code = loop {
        let due = next_ping.min(last_heard + silence);
        let msg = tokio::select! {
            _ = app.shutdown.cancelled() => break Some(CloseCode::GoingAway),
            msg = socket.recv() => msg,
            _ = tokio::time::sleep_until(due) => {
                let now = Instant::now();
                if now >= last_heard + silence {
                    app.metrics.heartbeat_timeouts.inc();
                    break None;
                }
                if now >= next_ping {
                    next_ping = now + interval;
                    if !matches!(
                        timeout(write_limit, socket.send(Opcode::Ping, Bytes::new())).await,
                        Ok(Ok(()))
                    ) {
                        break None;
                    }
                }
                continue;
            }
        };
        last_heard = Instant::now();
        let (opcode, payload) = match msg {
            Some(Ok(Message::Text(text))) if raw => (Opcode::Text, Bytes::from(text)),
            Some(Ok(Message::Text(text))) => (
                Opcode::Text,
                Bytes::from(format!("Echo: {}", text.as_str())),
            ),
            Some(Ok(Message::Binary(data))) => (Opcode::Binary, data),
            Some(Ok(Message::Ping(data))) => (Opcode::Pong, data),
            // Answer the closing handshake with the client's code (RFC 6455 5.5.1).
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(CloseCode::Normal.code(), |f| u16::from(f.code));
                let code = if code == 1005 {
                    CloseCode::Normal.code()
                } else {
                    code
                };
                return socket.close(code, "", true, grace).await;
            }
            Some(Err(err)) => break validate::read_error(err).ok(),
            None => break None,
            Some(Ok(_)) => continue,
        };
        // Bounded like the chat socket's writes: a peer that stops reading is dropped.
        if !matches!(
            timeout(write_limit, socket.send(opcode, payload)).await,
            Ok(Ok(()))
        ) {
            break None;
        }
    };
    if let Some(code) = close_code {
        socket.close(code.code(), code.reason(), true, grace).await;
    }
}
