//! `GET /echo`: answers each text frame `t` with `Echo: t` and each binary frame with itself.
//! It is upgraded with exactly the WebSocket settings of `/ws`, so diagnostics and conformance
//! runs see what chat clients get.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::App;

pub(super) async fn echo(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let slot = match super::ws::admit(&app, peer, &headers) {
        Ok(slot) => slot,
        Err(err) => return err.into_response(),
    };
    let sessions = app.sessions.clone();
    super::ws::configure(upgrade, &app).on_upgrade(move |socket| {
        sessions.track_future(async move {
            echo_socket(socket, app).await;
            drop(slot);
        })
    })
}

async fn echo_socket(mut socket: WebSocket, app: App) {
    loop {
        let msg = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            msg = socket.recv() => msg,
        };
        let reply = match msg {
            Some(Ok(Message::Text(text))) => {
                Message::Text(format!("Echo: {}", text.as_str()).into())
            }
            Some(Ok(Message::Binary(data))) => Message::Binary(data),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}
