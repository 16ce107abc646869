//! `GET /echo`: answers each text frame `t` with `Echo: t` and each binary frame with itself.
//! It is upgraded with exactly the WebSocket settings of `/ws`, so diagnostics and conformance
//! runs see what chat clients get.
//!
//! `GET /echo?raw=1` (or `?raw=true`) is the exact-echo mode for conformance suites such as
//! Autobahn's fuzzingclient: text frames come back unchanged, without the `Echo: ` prefix.
//! Any other value of `raw`, or none, keeps the default.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use futures_util::SinkExt;
use parley_protocol::CloseCode;
use tokio::time::timeout;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::session::close_code_for;
use crate::App;

/// Query parameters of the echo upgrade.
#[derive(Debug, Deserialize)]
pub(super) struct EchoQuery {
    raw: Option<String>,
}

pub(super) async fn echo(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<EchoQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let slot = match super::ws::admit(&app, peer, &headers) {
        Ok(slot) => slot,
        Err(err) => return err.into_response(),
    };
    let raw = matches!(query.raw.as_deref(), Some("1" | "true"));
    let sessions = app.sessions.clone();
    super::ws::configure(upgrade, &app).on_upgrade(move |socket| {
        sessions.track_future(async move {
            echo_socket(socket, app, raw).await;
            drop(slot);
        })
    })
}

async fn echo_socket(mut socket: WebSocket, app: App, raw: bool) {
    let limits = &app.config.limits;
    let write_limit = Duration::from_millis(app.config.heartbeat.timeout_ms);
    let close_code = loop {
        let msg = tokio::select! {
            _ = app.shutdown.cancelled() => break Some(CloseCode::GoingAway),
            msg = socket.recv() => msg,
        };
        let reply = match msg {
            Some(Ok(Message::Text(text))) if raw => Message::Text(text),
            Some(Ok(Message::Text(text))) => {
                Message::Text(format!("Echo: {}", text.as_str()).into())
            }
            Some(Ok(Message::Binary(data))) => Message::Binary(data),
            // tungstenite queues the reply to a close frame; flushing sends it (RFC 6455 5.5.1).
            Some(Ok(Message::Close(_))) => {
                let _ = timeout(write_limit, socket.flush()).await;
                break None;
            }
            Some(Err(err)) => break close_code_for(err).ok(),
            None => break None,
            Some(Ok(_)) => continue,
        };
        // Bounded like the chat socket's writes: a peer that stops reading is dropped.
        if !matches!(timeout(write_limit, socket.send(reply)).await, Ok(Ok(()))) {
            break None;
        }
    };
    if let Some(code) = close_code {
        let close = Message::Close(Some(CloseFrame {
            code: code.code(),
            reason: Utf8Bytes::from_static(code.reason()),
        }));
        let _ = timeout(
            Duration::from_millis(limits.close_grace_ms),
            socket.send(close),
        )
        .await;
    }
}
