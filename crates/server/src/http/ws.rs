//! The chat socket routes. Everything that can be checked before the upgrade is: the room name
//! of path routes (HTTP 400), a `?token=` (HTTP 401) and the anonymous identity. Only then is
//! the connection upgraded and handed to a [`session`](crate::session).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::upgrade::Upgrade;
use super::ApiError;
use crate::auth::{anonymous_identity, Identity};
use crate::limits::{CapRefusal, ConnectionSlot};
use crate::session::{self, Start};
use crate::validate;
use crate::App;

/// Query parameters of the upgrade request.
#[derive(Debug, Deserialize, Default)]
pub(super) struct ConnectQuery {
    token: Option<String>,
    user: Option<String>,
    name: Option<String>,
    since: Option<u64>,
    epoch: Option<String>,
}

/// Refuses a browser whose `Origin` is not in `allowed_origins` (HTTP 403). An empty list
/// allows any origin; a request without `Origin` is not from a browser and is allowed.
fn check_origin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let allowed = &app.config.allowed_origins;
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if allowed.is_empty() {
        return Ok(());
    }
    let origin = origin.to_str().unwrap_or("");
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "origin `{origin}` is not allowed"
        )))
    }
}

/// The client's IP: the socket peer, or the last `X-Forwarded-For` entry when the peer is a
/// trusted proxy.
fn client_ip(app: &App, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let peer_ip = peer.ip();
    if !app.config.limits.trusted_proxies.contains(&peer_ip) {
        return peer_ip;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .last()
        .and_then(|ip| ip.trim().parse().ok())
        .unwrap_or(peer_ip)
}

/// Everything checked before any WebSocket upgrade (`/ws...` and `/echo`): the `Origin`, then a
/// place under the per-node and per-IP connection caps, held until the socket closes.
pub(super) fn admit(
    app: &App,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<ConnectionSlot, ApiError> {
    check_origin(app, headers)?;
    let ip = client_ip(app, peer, headers);
    app.caps.acquire(ip).map_err(|refusal| match refusal {
        CapRefusal::PerIp => ApiError::too_many_connections(format!(
            "at most {} connections per client address",
            app.config.limits.max_connections_per_ip
        )),
        CapRefusal::Node => {
            ApiError::unavailable("this node is at its connection limit; try another")
        }
    })
}

pub(super) async fn root(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<ConnectQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    connect(app, peer, query, None, &headers, upgrade)
}

pub(super) async fn room(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    Query(query): Query<ConnectQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    connect(app, peer, query, Some(room), &headers, upgrade)
}

pub(super) async fn room_user(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((room, user)): Path<(String, String)>,
    Query(mut query): Query<ConnectQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    if !app.auth.is_anonymous() {
        return ApiError::not_found(
            "/ws/{room}/{user} exists only in anonymous mode; use /ws/{room} with a token",
        )
        .into_response();
    }
    query.user = Some(user);
    connect(app, peer, query, Some(room), &headers, upgrade)
}

fn connect(
    app: App,
    peer: SocketAddr,
    query: ConnectQuery,
    room: Option<String>,
    headers: &HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let slot = match admit(&app, peer, headers) {
        Ok(slot) => slot,
        Err(err) => return err.into_response(),
    };
    let auto_join = match room {
        Some(room) => {
            let checked = validate::room(&room)
                .and_then(|()| validate::resume(query.since, query.epoch.clone()));
            match checked {
                Ok(since) => Some((room, since)),
                Err(refusal) => return ApiError::from(refusal).into_response(),
            }
        }
        None => None,
    };
    let identity = match identify(&app, &query) {
        Ok(identity) => identity,
        Err(err) => return err.into_response(),
    };
    let start = Start {
        identity,
        auto_join,
        peer,
    };
    upgrade.on_upgrade(&app.clone(), move |socket| {
        session::run(socket, app, start, slot)
    })
}

/// The identity settled before the upgrade: a verified `?token=`, an anonymous user, or
/// `None` when the client will authenticate with its first frame.
fn identify(app: &App, query: &ConnectQuery) -> Result<Option<Identity>, ApiError> {
    if app.auth.is_anonymous() {
        return anonymous_identity(query.user.as_deref(), query.name.as_deref())
            .map(Some)
            .map_err(|e| ApiError::bad_request(e.to_string()));
    }
    match &query.token {
        Some(token) => app.auth.verify(token).map(Some).map_err(|e| {
            app.metrics.auth_failure(&e);
            ApiError::unauthorized(e.to_string())
        }),
        None => Ok(None),
    }
}
