//! Cluster node liveness, a presence concern: each node refreshes a heartbeat key on every
//! shard; a node whose key expired is dead, and one survivor (under a lock) removes its presence
//! entries, announcing the leaves of users who had no other connection. A node whose presence
//! changes may not have reached a shard (a script failed, or its heartbeat did, so survivors
//! may have reaped it) marks the shard dirty, and the heartbeat has the broker rewrite the
//! node's entries there from its local members once the shard answers again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::BrokerError;
use crate::cluster::script::{self, Reap};
use crate::cluster::{self, keys, Shards};
use crate::faults::Faults;
use crate::policy::Policies;

/// How soon the heartbeat retries a presence repair that could not run yet.
const REPAIR_RETRY: Duration = Duration::from_millis(250);

/// This node's liveness on every shard.
pub struct Nodes {
    shards: Arc<Shards>,
    /// This node's id.
    node: String,
    /// `presence.ttl_ms`: the heartbeat key lives this long unless refreshed.
    ttl: Duration,
    /// `presence.announce_max`, for the leaves a reap announces.
    announce_max: usize,
    /// Each room's retention and announcements, for the leaves a reap appends.
    policies: Arc<Policies>,
    /// Per shard: a presence change may have been lost; repair once the shard answers.
    dirty: Vec<AtomicBool>,
    /// Wakes the heartbeat early when a shard becomes dirty.
    repair: Notify,
    /// Test-only fault switches (a paused heartbeat).
    faults: Arc<Faults>,
}

impl Nodes {
    /// Liveness of node `node` over `shards`.
    pub fn new(
        shards: Arc<Shards>,
        node: String,
        ttl: Duration,
        announce_max: usize,
        policies: Arc<Policies>,
        faults: Arc<Faults>,
    ) -> Nodes {
        let dirty = (0..shards.shards.len())
            .map(|_| AtomicBool::new(false))
            .collect();
        Nodes {
            shards,
            node,
            ttl,
            announce_max,
            policies,
            dirty,
            repair: Notify::new(),
            faults,
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A presence change in `room` may not have reached Redis: repair the room's shard.
    pub fn presence_dirty(&self, room: &str) {
        self.dirty[self.shards.index_of(room)].store(true, Ordering::Release);
        self.repair.notify_one();
    }

    /// Refreshes this node's heartbeat key on every shard, three times per `ttl`; has
    /// `repair(shard)` rewrite this node's presence entries on a dirty shard once it answers;
    /// and reaps nodes whose heartbeat expired. Runs until `stop`.
    pub async fn run<F, R>(self: Arc<Self>, repair: R, stop: CancellationToken)
    where
        R: Fn(usize) -> F,
        F: Future<Output = Result<(), BrokerError>>,
    {
        let key = keys::node_alive(&self.node);
        // Per shard: since when this node's heartbeats there have succeeded without a break.
        let mut up_since: Vec<Option<Instant>> = vec![None; self.shards.shards.len()];
        loop {
            // A paused process (SIGSTOP) beats for no shard; the test hook does the same.
            let paused = Faults::on(&self.faults.pause_heartbeat);
            for (index, shard) in self.shards.shards.iter().enumerate().filter(|_| !paused) {
                let mut conn = shard.conn.clone();
                // GET: whether the key was still there. If it had expired (this process was
                // paused, e.g. SIGSTOP, or starved past the ttl while Redis answered),
                // survivors may have reaped this node: its entries are rewritten below. And the
                // shard's event count, which the scripts check (see `Shard::events_seen`).
                let r: redis::RedisResult<(Option<String>, Option<u64>)> = redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64)
                    .arg("GET")
                    .cmd("SADD")
                    .arg(keys::NODES)
                    .arg(&self.node)
                    .ignore()
                    .cmd("GET")
                    .arg(keys::EVENTS)
                    .query_async(&mut conn)
                    .await;
                if let Ok((_, Some(events))) = r {
                    shard.saw_events(events);
                }
                match r {
                    Err(e) => {
                        debug!(shard = shard.index, error = %e, "heartbeat failed");
                        up_since[index] = None;
                        // If this lasts, survivors reap this node: its entries are rewritten
                        // when the shard answers again.
                        self.dirty[index].store(true, Ordering::Release);
                        continue;
                    }
                    Ok((None, _)) if up_since[index].is_some() => {
                        warn!(
                            shard = shard.index,
                            "this node's heartbeat had expired (was it paused?); repairing its presence"
                        );
                        self.dirty[index].store(true, Ordering::Release);
                    }
                    Ok(_) => {}
                }
                if let Err(e) = mark_durable(&mut conn).await {
                    debug!(shard = shard.index, error = %e, "durability check failed");
                }
                let up = *up_since[index].get_or_insert_with(Instant::now);
                if self.dirty[index].swap(false, Ordering::AcqRel) {
                    if let Err(e) = repair(index).await {
                        debug!(shard = shard.index, error = %e, "presence repair failed; retrying");
                        self.dirty[index].store(true, Ordering::Release);
                    }
                }
                // A node can tell a dead peer from one that has not refreshed yet only after
                // it has itself been refreshing for a whole ttl (at start, and after Redis was
                // away, every live node's key may be missing for a moment).
                if up.elapsed() >= self.ttl {
                    if let Err(e) = self.reap_dead(index).await {
                        debug!(shard = shard.index, error = %e, "reaping dead nodes failed");
                    }
                }
            }
            let pause = if self.dirty.iter().any(|d| d.load(Ordering::Acquire)) {
                (self.ttl / 3).min(REPAIR_RETRY)
            } else {
                self.ttl / 3
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.repair.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Finds nodes on a shard whose heartbeat key expired and, under a lock only one survivor
    /// gets, removes their presence entries and announces the leaves they leave behind.
    async fn reap_dead(&self, shard: usize) -> redis::RedisResult<()> {
        let manager = &self.shards.shards[shard];
        let mut conn = manager.conn.clone();
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::NODES)
            .query_async(&mut conn)
            .await?;
        for dead in nodes.iter().filter(|n| **n != self.node) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(keys::node_alive(dead))
                .query_async(&mut conn)
                .await?;
            if alive {
                continue;
            }
            let lock: Option<String> = redis::cmd("SET")
                .arg(keys::node_reaper(dead))
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if lock.is_none() {
                continue;
            }
            let rooms_key = keys::node_rooms(dead);
            let rooms: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&rooms_key)
                .query_async(&mut conn)
                .await?;
            for room in &rooms {
                let users: Vec<(String, u64)> = redis::cmd("HGETALL")
                    .arg(keys::presence(room, dead))
                    .query_async(&mut conn)
                    .await?;
                for (user, count) in users {
                    // The dead node's display names are gone with it: the user id stands in.
                    let (prefix, suffix) = cluster::system_parts(room, &user, &user, false);
                    let policy = self.policies.for_room(room);
                    let reap = Reap {
                        room,
                        user: &user,
                        node: dead,
                        count,
                        announce_max: policy.announce_max(self.announce_max),
                        prefix,
                        suffix,
                        max_len: policy.history_max_len,
                        ttl_s: policy.history_ttl_s,
                    };
                    match script::run(manager, &reap).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            warn!(room, user, error = %e, "reaping a dead node's user failed")
                        }
                        Err(e) => {
                            warn!(room, user, error = %e, "reaping a dead node's user failed")
                        }
                    }
                }
            }
            let remaining: usize = redis::cmd("SCARD")
                .arg(&rooms_key)
                .query_async(&mut conn)
                .await?;
            if remaining == 0 {
                let _: () = redis::pipe()
                    .cmd("SREM")
                    .arg(keys::NODES)
                    .arg(dead)
                    .ignore()
                    .cmd("DEL")
                    .arg(&rooms_key)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
            }
            info!(node = %dead, rooms = rooms.len(), "reaped a dead node's presence");
        }
        Ok(())
    }
}

/// Records whether the Redis process behind `conn` loses nothing it acknowledged, even when
/// killed: the append-only file with `appendfsync always`, and a master without replicas (a
/// failover could promote one that lags). The scripts keep the rooms' epochs across a restart
/// only after such a run (`keys::DURABLE`); after any other, every room gets a new epoch.
async fn mark_durable(conn: &mut redis::aio::ConnectionManager) -> redis::RedisResult<()> {
    let info: String = redis::cmd("INFO").query_async(conn).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let Some(run) = field("run_id").map(str::to_owned) else {
        return Ok(());
    };
    let replicated = field("role") != Some("master") || field("connected_slaves") != Some("0");
    let aof = field("aof_enabled") == Some("1");
    // CONFIG may be disabled (managed Redis): then the run counts as not durable.
    let fsync: Option<(String, String)> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async(conn)
        .await
        .ok();
    let always = fsync.is_some_and(|(_, v)| v == "always");
    let verb = if aof && always && !replicated {
        "SADD"
    } else {
        "SREM"
    };
    redis::cmd(verb)
        .arg(keys::DURABLE)
        .arg(run)
        .query_async(conn)
        .await
}
