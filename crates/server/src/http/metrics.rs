//! `GET /metrics`: the node's [`Metrics`](crate::metrics::Metrics) in the Prometheus text
//! format. Open like `/healthz`: a scraper has no API key, and the numbers name no user.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;

use crate::metrics::CONTENT_TYPE;
use crate::App;

pub(super) async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        app.metrics.encode(),
    )
}
