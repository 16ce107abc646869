//! HTTP routes: the WebSocket upgrades, the echo socket, health checks, metrics, the HTTP API
//! and the embedded page.

mod api;
mod echo;
mod error;
mod health;
mod metrics;
mod upgrade;
mod web;
mod ws;

pub use error::ApiError;

use axum::routing::get;
use axum::Router;

use crate::App;

/// Every route of the node.
pub fn router(app: App) -> Router {
    let router = Router::new();
    #[cfg(feature = "fault-hooks")]
    let router = router.route(
        "/_faults/{name}",
        axum::routing::post(health::fault).get(health::fault_state),
    );
    router
        .route("/", get(web::index))
        .route("/app.js", get(web::app_js))
        .route("/app.css", get(web::app_css))
        .route("/parley-client.js", get(web::client_js))
        .route("/ws", get(ws::root))
        .route("/ws/{room}", get(ws::room))
        .route("/ws/{room}/{user}", get(ws::room_user))
        .route("/echo", get(echo::echo))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .nest("/api", api::router(&app))
        .with_state(app)
}
