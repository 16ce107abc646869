//! `GET /`: the page embedded in the binary, so a node needs no files beside it.

use axum::response::Html;

const INDEX: &str = include_str!("../../web/index.html");

pub(super) async fn index() -> Html<&'static str> {
    Html(INDEX)
}
