//! parley: a real-time chat server. Clients connect once over a WebSocket, join named rooms and
//! receive every message the moment it is posted, in order, with durable history and lossless
//! resume after a reconnect. See `docs/protocol.md` for the wire contract and
//! `docs/ARCHITECTURE.md` for the design.
//!
//! # Layout
//! - [`config`]: settings, layered defaults < TOML < `PARLEY_*` env < flags.
//! - [`auth`]: JWT verification (HS256/RS256/ES256), anonymous mode, token minting.
//! - [`http`]: the routes: WebSocket upgrades (auth before upgrade), echo, health, the HTTP
//!   API under `/api`, `/metrics`.
//! - [`session`]: one connection's state machine.
//! - [`socket`]: a WebSocket connection that writes its own frames (no write buffer).
//! - [`outbound`]: a connection's bounded outbound queue.
//! - [`limits`]: token buckets, the abuse counter, connection caps.
//! - [`serve`]: the accept loop: connection caps, header and idle timeouts, graceful shutdown.
//! - [`hub`]: this node's rooms and the fan-out of pre-encoded frames.
//! - [`broker`]: sequencing, storage and delivery of room events ([`broker::Broker`]).
//! - [`presence`]: who is in which room, per user ([`presence::Presence`]).
//! - [`policy`]: per-room policies (`[[rooms]]`): who posts, retention, announcements,
//!   presence, typing; resolved per room for the session, the API and both brokers.
//! - [`store`]: the SQLite log.
//! - [`metrics`]: the node's Prometheus metrics, one registry per [`App`].
//! - [`webhooks`]: every room event POSTed to the app's backend, from the log.
//!
//! Data flows one way: socket -> session -> broker (sequence, store) -> hub -> each member's
//! outbound queue -> their socket.

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod faults;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod presence;
pub mod serve;
pub mod session;
pub mod socket;
pub mod store;
pub mod validate;
pub mod webhooks;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::broker::sqlite::{SequencerParts, SqliteBroker};
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::presence::{MemoryPresence, Presence};

/// Everything a request handler or a session needs, cheap to clone.
#[derive(Clone)]
pub struct App(Arc<AppInner>);

/// The shared state behind [`App`].
pub struct AppInner {
    /// The effective configuration.
    pub config: Config,
    /// Token verification or anonymous mode.
    pub auth: Authenticator,
    /// Where events are sequenced and stored.
    pub broker: Arc<dyn Broker>,
    /// Each room's policy (`[[rooms]]`).
    pub policies: Arc<Policies>,
    /// This node's rooms and members.
    pub hub: Arc<Hub>,
    /// Cancelled when the server shuts down; sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Open TCP connections per IP and per node.
    pub caps: Arc<limits::ConnectionCaps>,
    /// Who is in which room, per user: the HTTP API reads it (the sequencer writes it).
    pub presence: Arc<dyn Presence>,
    /// This node's Prometheus metrics; its own registry, so servers in one process do not mix.
    pub metrics: Arc<Metrics>,
    /// Whether the node's vital tasks still run; when one died the node stops serving.
    pub health: Arc<faults::Health>,
    /// Test-only fault switches (feature `fault-hooks`).
    #[doc(hidden)]
    pub faults: Arc<faults::Faults>,
    next_conn: AtomicU64,
}

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    /// Opens the store and starts the broker for `config`.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let policies = Arc::new(Policies::from_config(&config)?);
        if !config.redis.urls.is_empty() {
            return Self::start_cluster(config, policies);
        }
        let auth = Authenticator::from_config(&config.auth)?;
        let (writer, reader) = {
            let path = config.store.db.clone();
            let sync = config.store.synchronous;
            let history = config.history.clone();
            let policies = policies.clone();
            let webhooks = config.webhooks.url.is_some();
            let settle_every = Duration::from_millis(config.store.settle_ms);
            let max_unsettled = config.store.max_unsettled;
            tokio::task::spawn_blocking(move || {
                let (mut writer, reader) =
                    store::sqlite::open_log(&path, sync, &history, policies)?;
                writer.set_settle_every(settle_every);
                writer.set_max_unsettled(max_unsettled);
                if webhooks {
                    writer.keep_heads_written()?;
                }
                Ok::<_, store::sqlite::StoreError>((writer, reader))
            })
            .await??
        };
        let hub = Arc::new(Hub::default());
        let presence = Arc::new(MemoryPresence::default());
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(faults::Health::default());
        let faults = Arc::new(faults::Faults::default());
        let committed = Arc::new(tokio::sync::Notify::new());
        let broker = SqliteBroker::start(
            writer,
            reader,
            SequencerParts {
                hub: hub.clone(),
                presence: presence.clone(),
                announce_max: config.presence.announce_max,
                policies: policies.clone(),
                max_batch: config.store.max_batch,
                metrics: metrics.clone(),
                health: health.clone(),
                faults: faults.clone(),
                committed: committed.clone(),
            },
        );
        let app = App::assemble(
            config,
            auth,
            (Arc::new(broker), policies),
            (hub, presence, metrics),
            (health, faults),
        );
        if app.config.webhooks.url.is_some() {
            let hooks = webhooks::sqlite::SqliteHookLog::open(&app.config.store.db)?;
            webhooks::start(
                &app.config.webhooks,
                Arc::new(hooks),
                app.metrics.clone(),
                committed,
                HOOK_POLL_SINGLE,
                app.shutdown.clone(),
            )?;
        }
        Ok(app)
    }

    /// Cluster mode: sequencing, history and presence in Redis (`redis.urls`); no SQLite.
    fn start_cluster(config: Config, policies: Arc<Policies>) -> anyhow::Result<App> {
        let auth = Authenticator::from_config(&config.auth)?;
        let shards = Arc::new(cluster::Shards::open(&config.redis.urls)?);
        let node = cluster::node_id();
        let hub = Arc::new(Hub::default());
        let presence: Arc<dyn Presence> = Arc::new(presence::RedisPresence::new(shards.clone()));
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(faults::Health::default());
        let faults = Arc::new(faults::Faults::default());
        let hooks = webhooks::redis::RedisHookLog::new(
            shards.clone(),
            node.clone(),
            webhooks::lease_for(&config.webhooks),
        );
        let broker = broker::redis::RedisBroker::start(
            shards,
            broker::redis::RedisParts {
                hub: hub.clone(),
                announce_max: config.presence.announce_max,
                history: config.history.clone(),
                policies: policies.clone(),
                node,
                presence_ttl: Duration::from_millis(config.presence.ttl_ms),
                metrics: metrics.clone(),
                health: health.clone(),
                faults: faults.clone(),
            },
        );
        let app = App::assemble(
            config,
            auth,
            (Arc::new(broker), policies),
            (hub, presence, metrics),
            (health, faults),
        );
        webhooks::start(
            &app.config.webhooks,
            Arc::new(hooks),
            app.metrics.clone(),
            Arc::new(tokio::sync::Notify::new()),
            HOOK_POLL_CLUSTER,
            app.shutdown.clone(),
        )?;
        Ok(app)
    }

    /// The shared state around a started broker, the same in both modes.
    fn assemble(
        config: Config,
        auth: Authenticator,
        (broker, policies): (Arc<dyn Broker>, Arc<Policies>),
        (hub, presence, metrics): (Arc<Hub>, Arc<dyn Presence>, Arc<Metrics>),
        (health, faults): (Arc<faults::Health>, Arc<faults::Faults>),
    ) -> App {
        let caps = limits::ConnectionCaps::new(
            config.limits.max_connections_per_ip,
            config.limits.max_connections,
        );
        App(Arc::new(AppInner {
            caps,
            config,
            auth,
            broker,
            policies,
            hub,
            presence,
            metrics,
            health,
            faults,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            next_conn: AtomicU64::new(1),
        }))
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// How often a single node's webhook deliverer looks at the log when no commit woke it.
const HOOK_POLL_SINGLE: Duration = Duration::from_secs(1);
/// How often a cluster node's webhook deliverer looks at the log: other nodes' events wake
/// nothing here.
const HOOK_POLL_CLUSTER: Duration = Duration::from_millis(100);

/// How long a node whose vital task died keeps answering `/readyz` (503) before it stops.
const FATAL_GRACE: Duration = Duration::from_secs(1);

/// Serves `listener` until `shutdown` completes, then shuts down gracefully: stop accepting,
/// close every socket with 1001, finish every pending write to the log.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    config.check_anonymous_bind(addr)?;
    if let Some(warning) = config.check_secret_bind(addr)? {
        warn!("{warning}");
    }
    let app = App::start(config).await?;
    let mode = if app.auth.is_anonymous() {
        "anonymous"
    } else {
        "jwt"
    };
    if app.config.redis.urls.is_empty() {
        info!(%addr, mode, db = %app.config.store.db.display(), "parley listening");
    } else {
        info!(%addr, mode, redis_shards = app.config.redis.urls.len(), "parley listening (cluster)");
    }

    let token = app.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        token.cancel();
    });
    // A vital task died: `/readyz` says so at once; a moment later (for a probe to see the
    // reason) the node closes its sockets and `run` fails, so the process exits non-zero.
    let (token, health) = (app.shutdown.clone(), app.health.clone());
    tokio::spawn(async move {
        health.failed().await;
        tokio::time::sleep(FATAL_GRACE).await;
        token.cancel();
    });
    serve::serve(listener, app.clone()).await;

    info!("shutting down: closing sockets");
    app.sessions.close();
    let grace = Duration::from_millis(app.config.server.shutdown_grace_ms);
    if tokio::time::timeout(grace, app.sessions.wait())
        .await
        .is_err()
    {
        warn!(
            left = app.sessions.len(),
            "some sockets did not close in time"
        );
    }
    app.broker.close().await;
    if let Some(reason) = app.health.failure() {
        anyhow::bail!("stopped because a vital task died: {reason}");
    }
    info!("shutdown complete");
    Ok(())
}
