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
    let check = match app.health.failure() {
        Some(reason) => Err(reason),
        None => app.broker.check().await,
    };
    match check {
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

/// `GET /_faults/{name}`: reads a test-only fault switch (`{"on": bool}`; feature
/// `fault-hooks`).
#[cfg(feature = "fault-hooks")]
pub(super) async fn fault_state(
    State(app): State<App>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> axum::response::Response {
    match app.faults.get(&name) {
        Some(on) => Json(json!({ "on": on })).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `POST /_faults/{name}?on=true|false`: flips a test-only fault switch (feature
/// `fault-hooks`).
#[cfg(feature = "fault-hooks")]
pub(super) async fn fault(
    State(app): State<App>,
    axum::extract::Path(name): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> impl IntoResponse {
    let on = query.get("on").is_none_or(|v| v != "false");
    if app.faults.set(&name, on) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}
