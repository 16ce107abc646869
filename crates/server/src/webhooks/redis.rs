//! The webhook log of a cluster: each room's Redis stream (`parley:{room}:log`, entries
//! `<seq>-0` with the frame `f`, the epoch `e` and Redis's clock `t`), a cursor per room in
//! Redis (`parley:{room}:hook:cursor`), and a lease per room (`parley:{room}:hook:lease`,
//! `SET NX PX`): the node holding it is the only one that delivers the room, renews it before
//! every POST, and can move the cursor only while it holds it (a Lua check-and-set). A node
//! that dies stops renewing; once the lease expires another node takes the room over from
//! the shared cursor, so nothing is lost and at most the batch in flight is sent twice.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::Script;

use super::log::{Cursor, Entry, HookLog, LogError, Scan, Slice, Wanted};
use crate::cluster::{keys, Shards};

/// Takes the lease when free, renews it when ours: 1 if we hold it now.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
";

/// Moves the cursor only while the lease is ours: 1 if it moved.
const ADVANCE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'seq', ARGV[3])
return 1
";

/// Gives the lease back if it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
";

/// Stream entries as XRANGE returns them.
type Entries = Vec<(String, Vec<(String, String)>)>;

/// The cluster's webhook log.
pub struct RedisHookLog {
    shards: Arc<Shards>,
    node: String,
    lease: Duration,
    claim: Script,
    advance: Script,
    release: Script,
}

impl RedisHookLog {
    /// `lease`: how long a node that stops renewing keeps its rooms.
    pub fn new(shards: Arc<Shards>, node: String, lease: Duration) -> RedisHookLog {
        RedisHookLog {
            shards,
            node,
            lease,
            claim: Script::new(CLAIM),
            advance: Script::new(ADVANCE),
            release: Script::new(RELEASE),
        }
    }

    fn conn(&self, room: &str) -> redis::aio::ConnectionManager {
        self.shards.for_room(room).conn.clone()
    }
}

fn err(e: redis::RedisError) -> LogError {
    LogError(crate::cluster::reason(&e))
}

fn entry_seq(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The seq delivery reads after: the cursor's, unless the room's log restarted (its seq went
/// below the cursor under a new epoch: the room was forgotten and made afresh). A restarted
/// log whose head has already passed the cursor is told by its first entry (`read`).
fn read_after(cursor: Option<&Cursor>, epoch: &str, head: u64) -> u64 {
    match cursor {
        Some(c) if c.epoch == epoch || head >= c.seq => c.seq,
        _ => 0,
    }
}

#[async_trait]
impl HookLog for RedisHookLog {
    async fn scan(&self, wanted: &Wanted<'_>) -> Result<Scan, LogError> {
        let mut scan = Scan::default();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for shard in &self.shards.shards {
            let mut conn = shard.conn.clone();
            let rooms: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys::ROOMS)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            let rooms: Vec<String> = rooms.into_iter().filter(|r| wanted(r)).collect();
            if rooms.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for room in &rooms {
                pipe.cmd("GET").arg(keys::seq(room));
                pipe.cmd("GET").arg(keys::epoch(room));
                pipe.cmd("HMGET")
                    .arg(keys::hook_cursor(room))
                    .arg("epoch")
                    .arg("seq");
            }
            type Heads = Vec<(Option<u64>, Option<String>, (Option<String>, Option<u64>))>;
            let heads: Heads = pipe.query_async(&mut conn).await.map_err(err)?;
            let mut pending = Vec::new();
            for (room, (head, epoch, cursor)) in rooms.into_iter().zip(heads) {
                let (head, epoch) = (head.unwrap_or(0), epoch.unwrap_or_default());
                let cursor = match cursor {
                    (Some(epoch), Some(seq)) => Some(Cursor { epoch, seq }),
                    _ => None,
                };
                let due = match &cursor {
                    None => head > 0,
                    Some(c) => c.epoch != epoch || c.seq < head,
                };
                if due && !epoch.is_empty() {
                    let after = read_after(cursor.as_ref(), &epoch, head);
                    scan.lag_events = scan.lag_events.max(head.saturating_sub(after));
                    pending.push((room, after));
                }
            }
            if pending.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for (room, after) in &pending {
                pipe.cmd("XRANGE")
                    .arg(keys::log(room))
                    .arg(format!("({after}-0"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(1);
            }
            let oldest: Vec<Entries> = pipe.query_async(&mut conn).await.map_err(err)?;
            for entries in oldest {
                let t = entries
                    .first()
                    .and_then(|(_, f)| field(f, "t")?.parse::<u64>().ok());
                if let Some(t) = t {
                    let age = now_ms.saturating_sub(t) as f64 / 1000.0;
                    scan.lag_seconds = scan.lag_seconds.max(age);
                }
            }
            scan.pending
                .extend(pending.into_iter().map(|(room, _)| room));
        }
        Ok(scan)
    }

    async fn claim(&self, room: &str) -> Result<bool, LogError> {
        let held: i64 = self
            .claim
            .key(keys::hook_lease(room))
            .arg(&self.node)
            .arg(self.lease.as_millis() as u64)
            .invoke_async(&mut self.conn(room))
            .await
            .map_err(err)?;
        Ok(held == 1)
    }

    async fn release(&self, room: &str) {
        let _: Result<i64, _> = self
            .release
            .key(keys::hook_lease(room))
            .arg(&self.node)
            .invoke_async(&mut self.conn(room))
            .await;
    }

    async fn cursor(&self, room: &str) -> Result<Option<Cursor>, LogError> {
        let (epoch, seq): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(keys::hook_cursor(room))
            .arg("epoch")
            .arg("seq")
            .query_async(&mut self.conn(room))
            .await
            .map_err(err)?;
        Ok(match (epoch, seq) {
            (Some(epoch), Some(seq)) => Some(Cursor { epoch, seq }),
            _ => None,
        })
    }

    async fn read(
        &self,
        room: &str,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Slice, LogError> {
        let mut conn = self.conn(room);
        let (head, epoch): (Option<u64>, Option<String>) = redis::pipe()
            .cmd("GET")
            .arg(keys::seq(room))
            .cmd("GET")
            .arg(keys::epoch(room))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let (head, epoch) = (head.unwrap_or(0), epoch.unwrap_or_default());
        let mut after = read_after(cursor, &epoch, head);
        if let Some(c) = cursor.filter(|c| c.epoch != epoch && after == c.seq) {
            // A new epoch whose head has passed the cursor: either the seqs went on (Redis lost
            // events and the room was renewed: the cursor's epoch is below the new entries) or
            // the room was forgotten and made afresh and its new life already outgrew the old
            // one. Then the stream starts with another epoch at or below the cursor's seq.
            let first: Entries = redis::cmd("XRANGE")
                .arg(keys::log(room))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            if let Some((id, fields)) = first.first() {
                let restarted = field(fields, "e").is_some_and(|e| e != c.epoch)
                    && entry_seq(id).is_some_and(|seq| seq <= c.seq);
                if restarted {
                    after = 0;
                }
            }
        }
        let got: Entries = redis::cmd("XRANGE")
            .arg(keys::log(room))
            .arg(format!("({after}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let entries = got
            .into_iter()
            .filter_map(|(id, fields)| {
                Some(Entry {
                    seq: entry_seq(&id)?,
                    epoch: field(&fields, "e").unwrap_or(&epoch).to_owned(),
                    frame: field(&fields, "f")?.to_owned(),
                })
            })
            .collect();
        Ok(Slice {
            epoch,
            head,
            after,
            entries,
        })
    }

    async fn advance(&self, room: &str, to: &Cursor) -> Result<bool, LogError> {
        let moved: i64 = self
            .advance
            .key(keys::hook_lease(room))
            .key(keys::hook_cursor(room))
            .arg(&self.node)
            .arg(&to.epoch)
            .arg(to.seq)
            .invoke_async(&mut self.conn(room))
            .await
            .map_err(err)?;
        Ok(moved == 1)
    }
}
