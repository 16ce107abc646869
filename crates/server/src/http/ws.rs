//! The chat socket routes. Everything that can be checked before the upgrade is: the room name
//! of path routes (HTTP 400), a `?token=` (HTTP 401) and the anonymous identity. Only then is
//! the connection upgraded and handed to a [`session`](crate::session).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Extension, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::upgrade::Upgrade;
use super::ApiError;
use crate::auth::{anonymous_identity, Identity};
use crate::limits::{CapRefusal, ConnectionSlot};
use crate::serve::HeldSlot;
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

/// The place of a connection about to be upgraded, taken from its TCP connection. Dropped
/// without an upgrade (the request was refused), it goes back to the connection, which counts
/// as before.
pub(super) struct Admitted {
    slot: Option<ConnectionSlot>,
    held: HeldSlot,
    /// The place was counted toward a forwarded client IP here (the peer is a trusted proxy).
    claimed: bool,
}

impl Admitted {
    /// The place, for the upgraded socket to hold until it closes.
    pub(super) fn into_slot(mut self) -> ConnectionSlot {
        self.slot
            .take()
            .expect("an admitted connection has its place")
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            if self.claimed {
                slot.unclaim_ip();
            }
            self.held.put_back(slot);
        }
    }
}

/// Everything checked before any WebSocket upgrade (`/ws...` and `/echo`): the `Origin`, then
/// the place the TCP connection already holds under the connection caps, which the socket keeps
/// until it closes. Behind a trusted proxy the place is also counted toward the forwarded client
/// IP here (HTTP 429 past `limits.max_connections_per_ip`).
pub(super) fn admit(
    app: &App,
    peer: SocketAddr,
    headers: &HeaderMap,
    held: &HeldSlot,
) -> Result<Admitted, ApiError> {
    check_origin(app, headers)?;
    let Some(slot) = held.take() else {
        return Err(ApiError::bad_request("this connection cannot be upgraded"));
    };
    let mut admitted = Admitted {
        slot: Some(slot),
        held: held.clone(),
        claimed: false,
    };
    let ip = client_ip(app, peer, headers);
    let slot = admitted.slot.as_mut().expect("just set");
    match slot.claim_ip(ip) {
        Ok(claimed) => admitted.claimed = claimed,
        Err(CapRefusal::PerIp | CapRefusal::Node) => {
            return Err(ApiError::too_many_connections(format!(
                "at most {} connections per client address",
                app.config.limits.max_connections_per_ip
            )))
        }
    }
    Ok(admitted)
}

pub(super) async fn root(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(held): Extension<HeldSlot>,
    Query(query): Query<ConnectQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    connect(app, peer, &held, query, None, &headers, upgrade)
}

pub(super) async fn room(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(held): Extension<HeldSlot>,
    Path(room): Path<String>,
    Query(query): Query<ConnectQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    connect(app, peer, &held, query, Some(room), &headers, upgrade)
}

pub(super) async fn room_user(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(held): Extension<HeldSlot>,
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
    connect(app, peer, &held, query, Some(room), &headers, upgrade)
}

fn connect(
    app: App,
    peer: SocketAddr,
    held: &HeldSlot,
    query: ConnectQuery,
    room: Option<String>,
    headers: &HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let admitted = match admit(&app, peer, headers, held) {
        Ok(admitted) => admitted,
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
    let identity = match identify(&app, peer, &query) {
        Ok(identity) => identity,
        Err(err) => return err.into_response(),
    };
    let start = Start {
        identity,
        auto_join,
        peer,
    };
    upgrade.on_upgrade(&app.clone(), admitted, move |socket, slot| {
        session::run(socket, app, start, slot)
    })
}

/// The identity settled before the upgrade: a verified `?token=`, an anonymous user, or
/// `None` when the client will authenticate with its first frame.
fn identify(
    app: &App,
    peer: SocketAddr,
    query: &ConnectQuery,
) -> Result<Option<Identity>, ApiError> {
    if app.auth.is_anonymous() {
        return anonymous_identity(query.user.as_deref(), query.name.as_deref())
            .map(Some)
            .map_err(|e| ApiError::bad_request(e.to_string()));
    }
    match &query.token {
        Some(token) => app.auth.verify(token).map(Some).map_err(|e| {
            app.metrics.auth_failure(&e, Some(peer));
            ApiError::unauthorized(e.to_string())
        }),
        None => Ok(None),
    }
}
