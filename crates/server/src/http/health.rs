//! `/healthz` (the process serves) and `/readyz` (the store answers).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::App;

pub(super) async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub(super) async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let name = app.broker.check_name();
    match app.broker.check().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "checks": { name: "ok" } })),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unready", "checks": { name: reason } })),
        ),
    }
}
