//! Prometheus metrics of one node, served at `GET /metrics` in the Prometheus text format.
//!
//! Every [`App`](crate::App) owns its own [`Registry`]: there is no global state, so several
//! servers in one process (the tests) never share a counter. The hot path pays one atomic add
//! per update: counters and gauges are atomics, the latency histogram gets one observation per
//! message (not per delivery), and fan-out is counted with one add per event of its member count.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::auth::AuthError;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why an authentication failed: the `reason` label of `parley_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No token where one is required.
    Missing,
    /// `exp` has passed.
    Expired,
    /// `nbf` or `iat` is in the future.
    NotYetValid,
    /// Wrong signature, key or algorithm.
    BadSignature,
    /// `iss` or `aud` not accepted.
    WrongIssuerOrAudience,
    /// Not a JWT, or a claim missing or malformed (also a token sent to an anonymous node).
    Malformed,
    /// No `auth` frame within `auth.timeout_ms`.
    Timeout,
    /// The first frame was not `auth`.
    NotAuthFrame,
    /// A `refresh` token for another `sub`.
    WrongUser,
    /// A missing or wrong HTTP API key.
    ApiKey,
    /// `exp` further ahead than `auth.max_token_ttl_s`.
    ExpTooFar,
}

impl AuthFailure {
    /// Every reason, so each series exists (at 0) from the start and a rate can be computed
    /// from the first scrape.
    const ALL: [AuthFailure; 11] = [
        AuthFailure::Missing,
        AuthFailure::Expired,
        AuthFailure::NotYetValid,
        AuthFailure::BadSignature,
        AuthFailure::WrongIssuerOrAudience,
        AuthFailure::Malformed,
        AuthFailure::Timeout,
        AuthFailure::NotAuthFrame,
        AuthFailure::WrongUser,
        AuthFailure::ApiKey,
        AuthFailure::ExpTooFar,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::WrongIssuerOrAudience => "wrong_issuer_or_audience",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Timeout => "timeout",
            AuthFailure::NotAuthFrame => "not_auth_frame",
            AuthFailure::WrongUser => "wrong_user",
            AuthFailure::ApiKey => "api_key",
            AuthFailure::ExpTooFar => "exp_too_far",
        }
    }
}

impl From<&AuthError> for AuthFailure {
    fn from(err: &AuthError) -> AuthFailure {
        match err {
            AuthError::Missing => AuthFailure::Missing,
            AuthError::Expired => AuthFailure::Expired,
            AuthError::NotYetValid => AuthFailure::NotYetValid,
            AuthError::BadSignature => AuthFailure::BadSignature,
            AuthError::WrongIssuerOrAudience => AuthFailure::WrongIssuerOrAudience,
            AuthError::Malformed(_) => AuthFailure::Malformed,
            AuthError::ExpTooFar(_) => AuthFailure::ExpTooFar,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The node's metrics. Fields are cheap handles (an `Arc` around an atomic); update them
/// directly.
pub struct Metrics {
    registry: Registry,
    /// Open chat WebSocket connections (`/ws...`, not `/echo`).
    pub connections: Gauge,
    /// Connection-room memberships on this node: a connection in three rooms counts three.
    pub memberships: Gauge,
    /// Messages accepted for posting: WebSocket sends past validation and the rate limit, and
    /// HTTP API posts.
    pub messages_in: Counter,
    /// Frames of sequenced events pushed into members' outbound queues (fan-out).
    pub messages_out: Counter,
    /// From a message being accepted to its ack: stored, delivered, answered.
    pub send_latency: Histogram,
    /// Duration of one group commit of the log (its statements and its journal block, with
    /// one fsync), failed or not.
    pub store_commit: Histogram,
    /// Duration of one settle of the log (the SQLite commit of the group commits since the
    /// last), failed or not: the batches behind it wait.
    pub store_settle: Histogram,
    /// Sends refused by the per-connection rate limit.
    pub rate_limited: Counter,
    /// Connections closed with 4009 because they could not keep up.
    pub slow_consumer_closes: Counter,
    /// Connections dropped for silence past `heartbeat.timeout_ms`.
    pub heartbeat_timeouts: Counter,
    auth_failures: Family<ReasonLabel, Counter>,
    /// Webhook POSTs by result (`delivered`, `timeout`, `throttled`, `http_error`,
    /// `unreachable`).
    webhook_deliveries: Family<ResultLabel, Counter>,
    /// Webhook POSTs that failed and are retried.
    pub webhook_retries: Counter,
    /// Room events delivered by webhook (gap notices not counted).
    pub webhook_events: Counter,
    /// Gap notices delivered: ranges retention dropped before delivery, or a restarted log.
    pub webhook_gaps: Counter,
    /// Undelivered events of the room furthest behind.
    pub webhook_lag_events: Gauge,
    /// Age of the oldest undelivered event, in seconds.
    pub webhook_lag_seconds: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("parley");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open chat WebSocket connections",
            connections.clone(),
        );
        let memberships = Gauge::default();
        registry.register(
            "room_memberships",
            "Connection-room memberships on this node",
            memberships.clone(),
        );
        let messages_in = Counter::default();
        registry.register(
            "messages_in",
            "Messages accepted for posting (WebSocket sends and HTTP API posts)",
            messages_in.clone(),
        );
        let messages_out = Counter::default();
        registry.register(
            "messages_out",
            "Sequenced event frames pushed to members' outbound queues (fan-out deliveries)",
            messages_out.clone(),
        );
        // 100 µs to ~13 s: a commit with fsync is milliseconds; seconds mean trouble.
        let send_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "send_latency",
            "Time from a message being accepted to its ack (stored and delivered)",
            Unit::Seconds,
            send_latency.clone(),
        );
        let store_commit = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "store_commit",
            "Duration of one group commit of the log, failed ones included",
            Unit::Seconds,
            store_commit.clone(),
        );
        let store_settle = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "store_settle",
            "Duration of one settle of the log (its SQLite commit), failed ones included",
            Unit::Seconds,
            store_settle.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Sends refused by the per-connection rate limit",
            rate_limited.clone(),
        );
        let slow_consumer_closes = Counter::default();
        registry.register(
            "slow_consumer_closes",
            "Connections closed with 4009 (slow consumer)",
            slow_consumer_closes.clone(),
        );
        let heartbeat_timeouts = Counter::default();
        registry.register(
            "heartbeat_timeouts",
            "Connections dropped for silence past heartbeat.timeout_ms",
            heartbeat_timeouts.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        for reason in AuthFailure::ALL {
            drop(auth_failures.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        registry.register(
            "auth_failures",
            "Refused authentications, by reason",
            auth_failures.clone(),
        );
        let webhook_deliveries = Family::<ResultLabel, Counter>::default();
        for result in crate::webhooks::post::Outcome::ALL {
            drop(webhook_deliveries.get_or_create(&ResultLabel {
                result: result.as_str(),
            }));
        }
        registry.register(
            "webhook_deliveries",
            "Webhook POSTs, by result",
            webhook_deliveries.clone(),
        );
        let webhook_retries = Counter::default();
        registry.register(
            "webhook_retries",
            "Webhook POSTs that failed and are retried",
            webhook_retries.clone(),
        );
        let webhook_events = Counter::default();
        registry.register(
            "webhook_events",
            "Room events delivered by webhook",
            webhook_events.clone(),
        );
        let webhook_gaps = Counter::default();
        registry.register(
            "webhook_gaps",
            "Webhook gap notices delivered (events retention dropped first, or a restarted log)",
            webhook_gaps.clone(),
        );
        let webhook_lag_events = Gauge::default();
        registry.register(
            "webhook_lag_events",
            "Undelivered webhook events of the room furthest behind",
            webhook_lag_events.clone(),
        );
        let webhook_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "webhook_lag",
            "Age of the oldest event not yet delivered by webhook",
            Unit::Seconds,
            webhook_lag_seconds.clone(),
        );
        Metrics {
            registry,
            webhook_deliveries,
            webhook_retries,
            webhook_events,
            webhook_gaps,
            webhook_lag_events,
            webhook_lag_seconds,
            connections,
            memberships,
            messages_in,
            messages_out,
            send_latency,
            store_commit,
            store_settle,
            rate_limited,
            slow_consumer_closes,
            heartbeat_timeouts,
            auth_failures,
        }
    }

    /// Counts an open connection until the guard is dropped, however the session ends.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections.inc();
        OpenConnection(self.connections.clone())
    }

    /// Counts one refused authentication and logs it (info) with its reason and the peer.
    pub fn auth_failure(&self, reason: impl Into<AuthFailure>, peer: Option<SocketAddr>) {
        let reason = reason.into().as_str();
        match peer {
            Some(peer) => tracing::info!(reason, %peer, "authentication refused"),
            None => tracing::info!(reason, "authentication refused"),
        }
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one webhook POST by its result.
    pub fn webhook_delivery(&self, result: &'static str) {
        self.webhook_deliveries
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Records a duration in a seconds histogram.
    pub fn observe(histogram: &Histogram, elapsed: Duration) {
        histogram.observe(elapsed.as_secs_f64());
    }

    /// The whole registry in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// One open connection in `parley_connections`; dropping it takes the connection off.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed() {
        let metrics = Metrics::new();
        metrics.messages_in.inc();
        metrics.auth_failure(AuthFailure::Expired, None);
        Metrics::observe(&metrics.send_latency, Duration::from_millis(3));
        let text = metrics.encode();
        for line in [
            "parley_messages_in_total 1",
            "parley_auth_failures_total{reason=\"expired\"} 1",
            "parley_auth_failures_total{reason=\"api_key\"} 0",
            "parley_send_latency_seconds_count 1",
            "parley_connections 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }
}
