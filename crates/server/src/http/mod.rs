//! HTTP routes: the WebSocket upgrades, the echo socket, health checks and the embedded page.

mod echo;
mod error;
mod health;
mod web;
mod ws;

pub use error::ApiError;

use axum::routing::get;
use axum::Router;

use crate::App;

/// Every route of the node.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(web::index))
        .route("/ws", get(ws::root))
        .route("/ws/{room}", get(ws::room))
        .route("/ws/{room}/{user}", get(ws::room_user))
        .route("/echo", get(echo::echo))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(app)
}
