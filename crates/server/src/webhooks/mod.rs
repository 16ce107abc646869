//! Webhooks: every room event, POSTed to the app's backend at least once, in seq order per
//! room, from the durable log (docs/webhooks.md is the receiver's side of this).
//!
//! - **From the log, not from memory.** A dispatcher scans the log for rooms whose head is past
//!   their webhook cursor ([`log::HookLog::scan`]); it is woken after every commit (single node)
//!   and by a short poll (a cluster's other nodes write too). Each such room gets a task that
//!   reads up to `webhooks.batch_max` events after the cursor, POSTs them, and moves the cursor
//!   on a 2xx; then reads the next batch. A receiver that is down costs no memory: the backlog
//!   stays in the log, and at most [`ROOMS_IN_FLIGHT`] rooms hold a batch at once.
//! - **Retries hold the room back.** Anything but a 2xx (timeout, 5xx, 429, no connection) is
//!   retried with the same events after an exponential backoff ([`BACKOFF_FIRST`] doubling up
//!   to [`BACKOFF_MAX`]; a 429's `Retry-After` when it gives one); the room's later events wait,
//!   other rooms go on.
//! - **Nothing skipped silently.** Events retention dropped before they were delivered, and a
//!   log that restarted under a new epoch, become `gap` notices ([`batch::gap`]).
//! - **One node per room.** In a cluster a room is delivered by the node holding its lease
//!   ([`redis`]); the cursor moves only under the lease.
//!
//! Files: [`log`] the log as the deliverer needs it, [`sqlite`] and [`redis`] its two stores,
//! [`batch`] what one read becomes, [`post`] the signed POST.

pub mod batch;
pub mod log;
pub mod post;
pub mod redis;
pub mod sqlite;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{HookEvent, WebhooksConfig};
use crate::metrics::Metrics;
use log::HookLog;
use post::Outcome;

/// Rooms whose batch may be in flight (or waiting to be retried) at once: the bound on the
/// memory a slow or dead receiver can make the deliverer hold.
pub const ROOMS_IN_FLIGHT: usize = 64;
/// The first retry's delay.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest delay between retries (a `Retry-After` may ask for more).
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Shortest time between two scans of the log, however often commits wake the dispatcher.
const SCAN_GAP: Duration = Duration::from_millis(10);

/// What every room task shares.
struct Deliverer {
    log: Arc<dyn HookLog>,
    client: reqwest::Client,
    url: String,
    secret: String,
    events: Vec<HookEvent>,
    batch_max: usize,
    rooms: Option<GlobSet>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// How often a room's lease is renewed while its task waits to retry.
    renew_every: Duration,
}

impl Deliverer {
    fn wanted(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|set| set.is_match(room))
    }
}

/// How long a cluster node keeps a room it stopped renewing: past a POST's whole timeout, so a
/// live holder always renews in time.
pub fn lease_for(config: &WebhooksConfig) -> Duration {
    Duration::from_millis(config.timeout_ms * 2 + 2000)
}

/// Starts the deliverer when `webhooks.url` is set: it runs until `shutdown`. `wake` is
/// notified after the log gains events; `poll` is how often it looks anyway.
pub fn start(
    config: &WebhooksConfig,
    log: Arc<dyn HookLog>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    poll: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (Some(url), Some(secret)) = (&config.url, &config.secret) else {
        return Ok(());
    };
    let rooms = if config.rooms.is_empty() {
        None
    } else {
        let mut set = GlobSetBuilder::new();
        for pattern in &config.rooms {
            set.add(Glob::new(pattern)?);
        }
        Some(set.build()?)
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.timeout_ms))
        .user_agent(concat!("parley-webhooks/", env!("CARGO_PKG_VERSION")))
        // A redirect is an answer that is not a 2xx: retried, never followed (a POST turned
        // into a GET elsewhere would count as delivered).
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let deliverer = Arc::new(Deliverer {
        log,
        client,
        url: url.clone(),
        secret: secret.clone(),
        events: config.events.clone(),
        batch_max: config.batch_max,
        rooms,
        metrics,
        shutdown,
        renew_every: lease_for(config) / 3,
    });
    info!(rooms = ?config.rooms, events = ?config.events, "webhooks on");
    tokio::spawn(dispatch(deliverer, wake, poll));
    Ok(())
}

/// Finds rooms with events past their cursor and starts a task for each that has none.
async fn dispatch(hooks: Arc<Deliverer>, wake: Arc<Notify>, poll: Duration) {
    let slots = Arc::new(Semaphore::new(ROOMS_IN_FLIGHT));
    let mut active: HashSet<String> = HashSet::new();
    // Rooms another node holds, and until when this one leaves them alone (a cluster): looking
    // again at once would spin on the other node's lease.
    let mut elsewhere: HashMap<String, tokio::time::Instant> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, bool)>();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = hooks.shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tick.tick() => {}
            Some(ended) = done_rx.recv() => ended_room(ended, &mut active, &mut elsewhere, hooks.renew_every),
        }
        while let Ok(ended) = done_rx.try_recv() {
            ended_room(ended, &mut active, &mut elsewhere, hooks.renew_every);
        }
        let now = tokio::time::Instant::now();
        elsewhere.retain(|_, until| *until > now);
        let wanted = |room: &str| hooks.wanted(room);
        match hooks.log.scan(&wanted).await {
            Ok(scan) => {
                if failing {
                    info!("webhooks: the log answers again");
                    failing = false;
                }
                hooks.metrics.webhook_lag_events.set(scan.lag_events as i64);
                hooks.metrics.webhook_lag_seconds.set(scan.lag_seconds);
                for room in scan.pending {
                    if active.contains(&room) || elsewhere.contains_key(&room) {
                        continue;
                    }
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    active.insert(room.clone());
                    tokio::spawn(deliver_room(hooks.clone(), room, slot, done_tx.clone()));
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "webhooks: cannot read the log; retrying");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(SCAN_GAP).await;
    }
}

/// Notes a room task's end: `ours` is false when another node holds the room.
fn ended_room(
    (room, ours): (String, bool),
    active: &mut HashSet<String>,
    elsewhere: &mut HashMap<String, tokio::time::Instant>,
    recheck: Duration,
) {
    active.remove(&room);
    if !ours {
        elsewhere.insert(room, tokio::time::Instant::now() + recheck);
    }
}

/// Delivers one room's events, batch after batch, until it has caught up with the log (or lost
/// its lease, or the node shuts down). Tells the dispatcher when it ends.
async fn deliver_room(
    hooks: Arc<Deliverer>,
    room: String,
    slot: OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<(String, bool)>,
) {
    let ours = match deliver_batches(&hooks, &room).await {
        Ok(()) => true,
        Err(Stop::NotOurs) => false,
        Err(e) => {
            debug!(room, error = %e, "webhooks: room paused");
            true
        }
    };
    if ours {
        hooks.log.release(&room).await;
    }
    // The place is free before the dispatcher hears of it, so its rescan can use it.
    drop(slot);
    let _ = done.send((room, ours));
}

/// Why a room's task stopped before it caught up.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error("another node delivers this room")]
    NotOurs,
    #[error("shutting down")]
    Shutdown,
}

async fn deliver_batches(hooks: &Deliverer, room: &str) -> Result<(), Stop> {
    if !hooks.log.claim(room).await? {
        return Err(Stop::NotOurs);
    }
    // Read once: while the room is ours nobody else moves it.
    let mut cursor = hooks.log.cursor(room).await?;
    loop {
        if hooks.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        let slice = hooks
            .log
            .read(room, cursor.as_ref(), hooks.batch_max)
            .await?;
        let batch = batch::build(room, cursor.as_ref(), &slice, &hooks.events);
        let Some(to) = batch.cursor.clone() else {
            return Ok(());
        };
        if !batch.events.is_empty() {
            post_until_delivered(hooks, room, &batch).await?;
        }
        if !hooks.log.advance(room, &to).await? {
            return Err(Stop::NotOurs);
        }
        cursor = Some(to);
        // Renew before the next batch (a long run of batches outlasts one lease).
        if !hooks.log.claim(room).await? {
            return Err(Stop::NotOurs);
        }
    }
}

/// POSTs `batch` until the receiver answers 2xx, backing off between attempts while keeping
/// the room's lease.
async fn post_until_delivered(
    hooks: &Deliverer,
    room: &str,
    batch: &batch::Batch,
) -> Result<(), Stop> {
    let body = batch.body();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let answer = tokio::select! {
            _ = hooks.shutdown.cancelled() => return Err(Stop::Shutdown),
            answer = post::send(&hooks.client, &hooks.url, &hooks.secret, body.clone()) => answer,
        };
        hooks.metrics.webhook_delivery(answer.outcome.as_str());
        if answer.outcome == Outcome::Delivered {
            let gaps = batch.gaps;
            hooks.metrics.webhook_gaps.inc_by(gaps);
            hooks
                .metrics
                .webhook_events
                .inc_by(batch.events.len() as u64 - gaps);
            if gaps > 0 {
                warn!(
                    room,
                    gaps,
                    "webhooks: delivered gap notices (events retention dropped before delivery)"
                );
            }
            return Ok(());
        }
        hooks.metrics.webhook_retries.inc();
        let wait = answer.retry_after.unwrap_or(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        warn!(
            room,
            result = answer.outcome.as_str(),
            detail = %answer.detail,
            retry_in_ms = wait.as_millis() as u64,
            "webhooks: delivery failed; retrying"
        );
        hold(hooks, room, wait).await?;
    }
}

/// Waits `wait`, renewing the room's lease meanwhile.
async fn hold(hooks: &Deliverer, room: &str, wait: Duration) -> Result<(), Stop> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            return Ok(());
        }
        let step = (until - now).min(hooks.renew_every);
        tokio::select! {
            _ = hooks.shutdown.cancelled() => return Err(Stop::Shutdown),
            _ = tokio::time::sleep(step) => {}
        }
        if !hooks.log.claim(room).await? {
            return Err(Stop::NotOurs);
        }
    }
}
