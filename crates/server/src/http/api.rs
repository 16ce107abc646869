//! The server-side HTTP API under `/api` (docs/protocol.md "HTTP API", docs/openapi.yaml).
//!
//! Every route sits behind `Authorization: Bearer <api.key>`; without a configured key the whole
//! of `/api` answers 404, so a node never lets anyone post as any user by accident. Every answer,
//! errors included, is JSON: the extractors below turn axum's plain-text rejections (malformed
//! JSON, wrong content type, bad query) into `400 bad_request` and an oversized body into
//! `413 too_large`.
//!
//! A posted message takes the same path as a WebSocket `send`: the broker sequences, stores and
//! delivers it, and the handler answers once it is stored, so `seq` in the answer means durable.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parley_protocol::server::json_array;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;

use super::ApiError;
use crate::auth::mint_for_node;
use crate::broker::log::cap_page;
use crate::broker::{BrokerError, PublishReply, PublishRequest};
use crate::metrics::AuthFailure;
use crate::validate::{self, MAX_TOKEN_NAME, MAX_USER_ID};
use crate::App;

/// Lifetime of a minted token when the request gives none (as `parley token`).
const DEFAULT_TOKEN_TTL_S: u64 = 3600;
/// Longest lifetime a minted token may have: a year. Longer-lived credentials belong in a
/// key-management system, not in a chat token.
const MAX_TOKEN_TTL_S: u64 = 366 * 86_400;

/// The `/api` routes, to be nested under `/api`.
pub(super) fn router(app: &App) -> Router<App> {
    // A body may hold `max_content_bytes` of content escaped as JSON (up to 6 bytes per byte
    // for `\u00XX`) plus the other fields; past that it is refused unread with 413.
    let body_limit = app
        .config
        .limits
        .max_content_bytes
        .saturating_mul(6)
        .saturating_add(16 * 1024);
    Router::new()
        .route("/rooms", get(list_rooms))
        .route("/rooms/{room}/users", get(room_users))
        .route("/rooms/{room}/messages", post(post_message).get(history))
        .route("/tokens", post(mint_token))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
}

/// Lets a request through only with the configured bearer key. Runs before routing inside
/// `/api`, so an unknown path is 401 to a stranger and 404 only to a key holder.
async fn authorize(State(app): State<App>, request: Request, next: Next) -> Response {
    let Some(key) = app.config.api.key.as_deref() else {
        return ApiError::not_found("the HTTP API is off on this node: no api.key is configured")
            .into_response();
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let refusal = match given {
        Some(token) if constant_time_eq(token.as_bytes(), key.as_bytes()) => {
            return next.run(request).await
        }
        Some(_) => "wrong API key",
        None => "missing `Authorization: Bearer <api key>` header",
    };
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    app.metrics.auth_failure(AuthFailure::ApiKey, peer);
    let mut response = ApiError::unauthorized(refusal).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"parley\""),
    );
    response
}

/// Compares without stopping at the first difference, so response time does not tell an
/// attacker how much of a guessed key is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such API route; see docs/openapi.yaml")
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed("this API route does not take that method")
}

/// A JSON body whose rejections are JSON errors: 400 for a missing or wrong `Content-Type`,
/// malformed JSON, a missing or mistyped field; 413 for a body over the limit.
pub(super) struct ApiJson<T>(pub(super) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::bad_request(
            "the body must be JSON, sent with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(err) => {
            let text = err.body_text();
            let at = position(&text)
                .map(|at| format!(" ({at})"))
                .unwrap_or_default();
            ApiError::bad_request(format!("malformed JSON: the body is not valid JSON{at}"))
        }
        JsonRejection::JsonDataError(err) => {
            ApiError::bad_request(plain_field_error(&err.body_text(), "field"))
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::too_large("the request body is too large")
        }
        other => ApiError::bad_request(other.body_text()),
    }
}

/// `line N column M` at the end of a serde_json message, as `line N, column M`.
fn position(text: &str) -> Option<String> {
    let (_, at) = text.rsplit_once(" at line ")?;
    let (line, column) = at.split_once(" column ")?;
    Some(format!("line {line}, column {column}"))
}

/// axum's "Failed to deserialize ...: path: serde message at line N column M" as a sentence
/// naming the field (or query parameter, `what`): `missing field `user``, `field `content`
/// has the wrong type: expected a string, got integer `7``.
fn plain_field_error(text: &str, what: &str) -> String {
    let text = text.split_once(": ").map_or(text, |(_, rest)| rest);
    let text = text.rsplit_once(" at line ").map_or(text, |(msg, _)| msg);
    if let Some(rest) = text.find("missing field `").map(|i| &text[i..]) {
        return rest.replacen("field", what, 1);
    }
    let (path, message) = match text.split_once(": ") {
        Some((path, message)) if !path.contains(' ') => (Some(path), message),
        _ => (None, text),
    };
    let message = match message.strip_prefix("invalid type: ") {
        Some(types) => match types.split_once(", expected ") {
            Some((got, expected)) => format!("has the wrong type: expected {expected}, got {got}"),
            None => format!("has the wrong type: {types}"),
        },
        None => format!("is not valid: {message}"),
    };
    match path {
        Some(path) if path != "." => format!("{what} `{path}` {message}"),
        _ => format!("the body {message}"),
    }
}

/// A room name from the path, checked against the room-name rule (400 otherwise).
pub(super) struct RoomPath(pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for RoomPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(room) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        validate::room(&room)?;
        Ok(RoomPath(room))
    }
}

/// Query parameters whose rejection (a non-number `limit`, say) is a JSON 400.
pub(super) struct ApiQuery<T>(pub(super) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|e| {
                ApiError::bad_request(plain_field_error(&e.body_text(), "query parameter"))
            })
    }
}

fn broker_error(err: BrokerError) -> ApiError {
    if let BrokerError::Unavailable(detail) = &err {
        tracing::warn!(detail, "API request refused: store unavailable");
    }
    ApiError::from_code(err.code(), err.to_string())
}

fn presence_error(err: impl std::fmt::Display) -> ApiError {
    tracing::warn!(detail = %err, "API request refused: presence unavailable");
    ApiError::unavailable("presence unavailable; retry")
}

/// `POST /api/rooms/{room}/messages`.
#[derive(Debug, Deserialize)]
struct PostMessage {
    /// The sender's user id, as a token's `sub` would be.
    user: String,
    content: String,
    /// Display name; the user id when absent.
    #[serde(default)]
    name: Option<String>,
    /// The caller's id for de-duplication, as a WebSocket `send`'s `id`.
    #[serde(default)]
    id: Option<String>,
}

async fn post_message(
    State(app): State<App>,
    RoomPath(room): RoomPath,
    ApiJson(body): ApiJson<PostMessage>,
) -> Result<Response, ApiError> {
    let received = std::time::Instant::now();
    validate::user_text("user", &body.user, false, MAX_USER_ID)?;
    if let Some(id) = &body.id {
        validate::client_id(id)?;
    }
    if let Some(name) = &body.name {
        validate::user_text("name", name, true, MAX_USER_ID)?;
    }
    let name = match body.name {
        Some(name) if !name.is_empty() => name,
        _ => body.user.clone(),
    };
    validate::content(&body.content, app.config.limits.max_content_bytes)?;
    let (tx, rx) = oneshot::channel();
    let request = PublishRequest {
        room: room.as_str().into(),
        user: body.user.into(),
        name: name.into(),
        content: body.content,
        client_id: body.id,
        received,
    };
    app.metrics.messages_in.inc();
    app.broker
        .publish(request, PublishReply::Caller(tx))
        .await
        .map_err(broker_error)?;
    let posted = rx
        .await
        .map_err(|_| broker_error(BrokerError::Closed))?
        .map_err(broker_error)?;
    let body = if posted.duplicate {
        json!({ "room": room, "seq": posted.seq, "duplicate": true })
    } else {
        json!({ "room": room, "seq": posted.seq })
    };
    Ok(Json(body).into_response())
}

/// One entry of `GET /api/rooms`.
#[derive(Debug, Serialize, Default)]
struct RoomEntry {
    room: String,
    users: usize,
    seq: u64,
}

/// `GET /api/rooms`: rooms with people in them or with events in their log, sorted by name.
async fn list_rooms(State(app): State<App>) -> Result<Response, ApiError> {
    let stored = app.broker.rooms().await.map_err(broker_error)?;
    let people = app.presence.rooms().await.map_err(presence_error)?;
    let mut rooms: BTreeMap<String, RoomEntry> = BTreeMap::new();
    for head in stored {
        rooms.entry(head.room.clone()).or_default().seq = head.seq;
    }
    for (room, users) in people {
        rooms.entry(room.to_string()).or_default().users = users;
    }
    let rooms: Vec<RoomEntry> = rooms
        .into_iter()
        .filter(|(_, entry)| entry.users > 0 || entry.seq > 0)
        .map(|(room, entry)| RoomEntry { room, ..entry })
        .collect();
    Ok(Json(json!({ "rooms": rooms })).into_response())
}

/// `GET /api/rooms/{room}/users`: the people in the room, sorted; empty for an unknown room.
async fn room_users(
    State(app): State<App>,
    RoomPath(room): RoomPath,
) -> Result<Response, ApiError> {
    let users = app.presence.users(&room).await.map_err(presence_error)?;
    let users: Vec<&str> = users.iter().map(|u| &**u).collect();
    Ok(Json(json!({ "room": room, "users": users })).into_response())
}

/// `GET /api/rooms/{room}/messages` parameters, as the WebSocket `history` frame.
#[derive(Debug, Deserialize)]
struct HistoryParams {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
}

/// `GET /api/rooms/{room}/messages`: a page of the log with the paging rules of the WebSocket
/// `history` frame. The stored frames are sent as they are, never re-encoded.
async fn history(
    State(app): State<App>,
    RoomPath(room): RoomPath,
    ApiQuery(params): ApiQuery<HistoryParams>,
) -> Result<Response, ApiError> {
    let query = validate::page(params.before, params.after, params.limit)?;
    let mut page = app
        .broker
        .history(&room, query)
        .await
        .map_err(broker_error)?;
    let room = serde_json::to_string(&room).expect("a string encodes");
    // history.max_page_bytes bounds the whole body, as it bounds the `history` frame.
    let envelope = format!(r#"{{"room":{room},"messages":,"more":false}}"#).len();
    let budget = app.config.history.max_page_bytes.saturating_sub(envelope);
    cap_page(&mut page, &query, budget);
    let messages = json_array(page.frames.iter().map(String::as_str));
    let body = format!(
        r#"{{"room":{room},"messages":{messages},"more":{}}}"#,
        page.more
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// `POST /api/tokens`.
#[derive(Debug, Deserialize)]
struct MintToken {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// `POST /api/tokens`: an HS256 token signed with `auth.jwt_secret`. A node without the secret
/// (anonymous, or verifying RS256/ES256 with only a public key) cannot sign: 404, like a route
/// that does not exist in this configuration.
async fn mint_token(
    State(app): State<App>,
    ApiJson(body): ApiJson<MintToken>,
) -> Result<Response, ApiError> {
    let auth = &app.config.auth;
    let Some(secret) = auth.jwt_secret.as_deref() else {
        return Err(ApiError::not_found(
            "token minting needs HS256 mode (auth.jwt_secret); this node has no secret to sign with",
        ));
    };
    validate::user_text("sub", &body.sub, false, MAX_USER_ID)?;
    if let Some(name) = &body.name {
        validate::user_text("name", name, true, MAX_TOKEN_NAME)?;
    }
    let ttl = body.ttl_s.unwrap_or(DEFAULT_TOKEN_TTL_S);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_S {
        return Err(ApiError::bad_request(format!(
            "ttl_s must be 1 to {MAX_TOKEN_TTL_S}"
        )));
    }
    if let Some(rooms) = &body.rooms {
        if rooms.iter().any(|r| r.is_empty()) {
            return Err(ApiError::bad_request(
                "rooms entries must be room names or *-patterns, not empty",
            ));
        }
    }
    let name = body.name.filter(|n| !n.is_empty());
    let (token, exp) = mint_for_node(auth, secret, body.sub, name, ttl, body.rooms);
    Ok(Json(json!({ "token": token, "exp": exp })).into_response())
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
