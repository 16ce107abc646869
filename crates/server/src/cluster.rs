//! Cluster mode: what the Redis broker and the Redis presence share: the Redis servers
//! (shards), which room lives on which, the key names and the one Lua script that sequences
//! every room event.
//!
//! Keys of a room (hash-tagged, so a room's keys stay together on any Redis layout):
//! - `parley:{room}:seq` the latest seq, `parley:{room}:epoch` the log's incarnation;
//! - `parley:{room}:log` a stream of the room's events, ids `<seq>-0`, fields `f` (the
//!   encoded frame, byte for byte what members receive), `e` (the epoch) and `t` (Redis's
//!   clock in ms when it was appended), capped at `history.max_len` entries; with
//!   `history.ttl_s` > 0, entries older than that are trimmed and the key expires that long
//!   after the last write;
//! - `parley:{room}:dedup:<len(user)>:<user>:<id>` the seq of a client id (SET NX EX 600);
//! - `parley:{room}:users` user -> connections in the whole cluster;
//!   `parley:{room}:presence:<node>` user -> connections on one node;
//! - channel `parley:{room}`: `"<seq> <epoch> <frame>"` for every event.
//!
//! Keys of a shard: `parley:rooms` (every room it has seen), `parley:nodes` (every node that
//! has had members there), `parley:node:<node>:alive` (the node's heartbeat, TTL
//! `presence.ttl_ms`), `parley:node:<node>:rooms` (rooms where the node has presence entries).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Client;

/// How long a Redis call may take before it counts as failed (`error unavailable`).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One Redis server and the rooms that hash to it.
pub struct Shard {
    /// The URL it was configured with (for logs; may carry a password, so never shown raw).
    pub index: usize,
    /// For dedicated connections (pub/sub).
    pub client: Client,
    /// Multiplexed, reconnecting connection for commands and scripts.
    pub conn: ConnectionManager,
}

/// Every configured Redis server; rooms are spread over them by a stable hash of the name.
pub struct Shards {
    /// In configuration order: the order is part of the hash, so every node must list the
    /// same URLs in the same order.
    pub shards: Vec<Shard>,
}

impl Shards {
    /// Opens lazy, reconnecting connections to each URL (no I/O yet: a node starts while
    /// Redis is down and reports it on `/readyz`).
    pub fn open(urls: &[String]) -> anyhow::Result<Shards> {
        let mut shards = Vec::with_capacity(urls.len());
        for (index, url) in urls.iter().enumerate() {
            let client = Client::open(url.as_str())
                .map_err(|e| anyhow::anyhow!("redis URL #{}: {e}", index + 1))?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
            shards.push(Shard {
                index,
                client,
                conn,
            });
        }
        anyhow::ensure!(!shards.is_empty(), "no redis URL");
        Ok(Shards { shards })
    }

    /// The shard a room lives on.
    pub fn index_of(&self, room: &str) -> usize {
        (fnv1a(room.as_bytes()) % self.shards.len() as u64) as usize
    }

    /// The shard a room lives on.
    pub fn for_room(&self, room: &str) -> &Shard {
        &self.shards[self.index_of(room)]
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `parley:{room}`: the prefix of a room's keys and its pub/sub channel.
pub fn room_key(room: &str) -> String {
    format!("parley:{{{room}}}")
}

/// The room of a channel name, `parley:{room}`.
pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("parley:{")?.strip_suffix('}')
}

/// A seq placeholder no real event reaches; frames are encoded with it and split around it.
const SEQ_SENTINEL: u64 = u64::MAX;

/// Splits a frame encoded with `seq = u64::MAX` into the text before and after the seq, so
/// the script can put the real seq in between. `seq` is the third field of every sequenced
/// frame (after `type` and `room`, which cannot contain the digits), so the first match is it.
pub fn split_frame(encoded: &str) -> (String, String) {
    let marker = format!("\"seq\":{SEQ_SENTINEL}");
    let at = encoded
        .find(&marker)
        .expect("sequenced frames carry a seq field");
    let prefix = &encoded[..at + "\"seq\":".len()];
    let suffix = &encoded[at + marker.len()..];
    (prefix.to_owned(), suffix.to_owned())
}

/// The seq placeholder to encode frames with before [`split_frame`].
pub const fn seq_placeholder() -> u64 {
    SEQ_SENTINEL
}

/// A new random epoch, offered to the script for a room whose log does not exist yet.
pub fn new_epoch() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..8)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A node id for presence keys: unique per process run, readable in Redis.
pub fn node_id() -> String {
    format!("{}-{}", std::process::id(), new_epoch())
}

/// A short human reason for a Redis error, for `/readyz` and logs.
pub fn reason(err: &redis::RedisError) -> String {
    if err.is_connection_refusal() {
        "connection refused".to_owned()
    } else if err.is_timeout() {
        "timed out".to_owned()
    } else if err.is_connection_dropped() || err.is_io_error() {
        "connection lost".to_owned()
    } else {
        err.to_string()
    }
}

/// The one script every sequenced event goes through. `KEYS[1]` is the room's key prefix
/// `parley:{room}`; `ARGV[1]` the operation:
///
/// - `msg` room user client_id prefix suffix max_len ttl_s epoch_candidate
///   -> `{seq, epoch, duplicate(0/1)}`: de-duplication check, epoch (created when missing),
///   INCR seq, frame = prefix..seq..suffix, XADD, SET dedup, PUBLISH.
/// - `join` room user node since since_epoch on_join max_replay announce_max prefix suffix
///   max_len ttl_s epoch_candidate presence_ttl_ms -> `{head, epoch, announced, people, users, history,
///   truncated, recovered(-1 none/0/1)}`: presence +1 on the node and in the cluster, the
///   `join` event when this is the user's first connection anywhere (and the room is small),
///   then the head and the joiner's history, all in one atomic step.
/// - `leave` room user node announce_max prefix suffix max_len ttl_s -> `{leave_seq or 0,
///   head}`: presence -1, the `leave` event after the user's last connection anywhere.
/// - `reap` room user dead_node count announce_max prefix suffix max_len ttl_s -> leave seq
///   or 0: removes a dead node's connections of one user, announcing the leave if they were
///   the user's last.
/// - `sync` room user node target announce_max join_prefix join_suffix leave_prefix
///   leave_suffix max_len ttl_s -> seq of the announced event or 0: sets the node's count of
///   the user to `target` (the node's real local connections), announcing the join (count was
///   0 in the cluster) or the leave (now 0 in the cluster) this makes. Presence repair after
///   Redis trouble.
/// - `trim` ttl_s -> 0: drops the room's events older than `ttl_s` (before a history read).
/// - `padd` / `prem` room user node -> `{transition, people}`: presence only, no event.
///
/// Every appended event's stream entry also carries `t`, Redis's clock in ms: with
/// `history.ttl_s` > 0 each append (and each join and `trim`) drops the entries older than
/// that, so a busy room keeps its recent events; an idle room's stream expires as a whole
/// `ttl_s` after its last event (by then every event in it is older than that).
pub const SCRIPT: &str = r#"
local p = KEYS[1]
local op = ARGV[1]
local function fmt(n) return string.format('%d', n) end
local function epoch_of(candidate)
  local e = redis.call('GET', p .. ':epoch')
  if not e then
    e = candidate
    redis.call('SET', p .. ':epoch', e)
    redis.call('SET', p .. ':seq', 0)
  end
  return e
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function entry_seq(id) return tonumber(string.match(id, '^(%d+)')) end
-- history.ttl_s: drops the events appended more than ttl seconds ago. They are the oldest
-- entries of the stream (`t` is Redis's clock when each was appended), so this finds the
-- first younger entry and trims everything below it (XTRIM MINID). Bounded work per call.
local function trim(ttl)
  ttl = tonumber(ttl)
  if not ttl or ttl <= 0 then return end
  local log = p .. ':log'
  local cutoff = now_ms() - ttl * 1000
  local last, start = nil, '-'
  for _ = 1, 100 do
    local got = redis.call('XRANGE', log, start, '+', 'COUNT', 100)
    local young = false
    for _, ent in ipairs(got) do
      local t = nil
      local fields = ent[2]
      for j = 1, #fields, 2 do
        if fields[j] == 't' then t = tonumber(fields[j + 1]) end
      end
      if not t or t >= cutoff then young = true; break end
      last = ent[1]
    end
    if young or #got < 100 then break end
    start = '(' .. last
  end
  if last then redis.call('XTRIM', log, 'MINID', fmt(entry_seq(last) + 1) .. '-0') end
end
-- Retention, as one node applies it at the end of a commit: history.max_len, history.ttl_s.
local function retain(max_len, ttl)
  redis.call('XTRIM', p .. ':log', 'MAXLEN', max_len)
  trim(ttl)
end
-- Sequences, stores and publishes one event; retention is the caller's.
local function add_event(e, prefix, suffix, ttl)
  local seq = redis.call('INCR', p .. ':seq')
  local frame = prefix .. fmt(seq) .. suffix
  redis.call('XADD', p .. ':log', fmt(seq) .. '-0', 'f', frame, 'e', e, 't', fmt(now_ms()))
  if tonumber(ttl) > 0 then
    -- Every event is older than ttl once the room has been idle that long.
    redis.call('EXPIRE', p .. ':log', ttl)
  end
  redis.call('PUBLISH', p, fmt(seq) .. ' ' .. e .. ' ' .. frame)
  return seq
end
local function append(e, prefix, suffix, max_len, ttl)
  local seq = add_event(e, prefix, suffix, ttl)
  retain(max_len, ttl)
  return seq
end
local function frames(entries)
  local out = {}
  for _, ent in ipairs(entries) do
    local fields = ent[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'f' then out[#out + 1] = fields[j + 1] end
    end
  end
  return out
end
local function add(room, user, node, count)
  redis.call('HINCRBY', p .. ':presence:' .. node, user, count)
  local c = redis.call('HINCRBY', p .. ':users', user, count)
  redis.call('SADD', 'parley:node:' .. node .. ':rooms', room)
  redis.call('SADD', 'parley:nodes', node)
  redis.call('SADD', 'parley:rooms', room)
  return c, redis.call('HLEN', p .. ':users')
end
local function remove(room, user, node, count)
  local nkey = p .. ':presence:' .. node
  local n = tonumber(redis.call('HGET', nkey, user) or '0')
  if n <= 0 then return false, redis.call('HLEN', p .. ':users') end
  count = math.min(count, n)
  if n == count then redis.call('HDEL', nkey, user) else redis.call('HINCRBY', nkey, user, -count) end
  if redis.call('HLEN', nkey) == 0 then
    redis.call('SREM', 'parley:node:' .. node .. ':rooms', room)
  end
  local c = redis.call('HINCRBY', p .. ':users', user, -count)
  if c > 0 then return false, redis.call('HLEN', p .. ':users') end
  redis.call('HDEL', p .. ':users', user)
  return true, redis.call('HLEN', p .. ':users')
end

if op == 'msg' then
  local dkey = nil
  if ARGV[4] ~= '' then
    dkey = p .. ':dedup:' .. fmt(string.len(ARGV[3])) .. ':' .. ARGV[3] .. ':' .. ARGV[4]
    local orig = redis.call('GET', dkey)
    -- Like one node: a message dropped by retention no longer de-duplicates.
    if orig and #redis.call('XRANGE', p .. ':log', orig .. '-0', orig .. '-0') > 0 then
      return {tonumber(orig), redis.call('GET', p .. ':epoch') or '', 1}
    end
  end
  local e = epoch_of(ARGV[9])
  local seq = append(e, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
  if dkey then redis.call('SET', dkey, seq, 'EX', 600) end
  redis.call('SADD', 'parley:rooms', ARGV[2])
  return {seq, e, 0}
elseif op == 'join' then
  local room, user, node = ARGV[2], ARGV[3], ARGV[4]
  local e = epoch_of(ARGV[14])
  local c, people = add(room, user, node, 1)
  -- The node is alive as of now, even if its heartbeat has not run since Redis came back.
  redis.call('SET', 'parley:node:' .. node .. ':alive', 1, 'PX', ARGV[15])
  local announce_max = tonumber(ARGV[9])
  local announced = 0
  if c == 1 and people <= announce_max then
    -- Retention after the history is read, as one node does it (at the end of the commit).
    add_event(e, ARGV[10], ARGV[11], ARGV[13])
    announced = 1
  end
  local head = tonumber(redis.call('GET', p .. ':seq') or '0')
  local users = {}
  if people <= announce_max then users = redis.call('HKEYS', p .. ':users') end
  local hist, truncated, recovered = nil, 0, -1
  if ARGV[5] ~= '' then
    recovered = 0
    local since = tonumber(ARGV[5])
    if since and ARGV[6] == e and since <= head then
      local first = redis.call('XRANGE', p .. ':log', '-', '+', 'COUNT', 1)
      local ok
      if #first > 0 then
        ok = since + 1 >= tonumber(string.match(first[1][1], '^(%d+)'))
      else
        ok = since == head
      end
      if ok then
        local max_replay = tonumber(ARGV[8])
        local got = redis.call('XRANGE', p .. ':log', '(' .. fmt(since) .. '-0', '+',
          'COUNT', max_replay + 1)
        hist = frames(got)
        if #hist > max_replay then hist[#hist] = nil; truncated = 1 end
        recovered = 1
      end
    end
  end
  if not hist then
    hist = {}
    local on_join = tonumber(ARGV[7])
    if on_join > 0 then
      local f = frames(redis.call('XREVRANGE', p .. ':log', '+', '-', 'COUNT', on_join))
      for i = #f, 1, -1 do hist[#hist + 1] = f[i] end
    end
  end
  retain(ARGV[12], ARGV[13])
  return {head, e, announced, people, users, hist, truncated, recovered}
elseif op == 'leave' then
  local room, user, node = ARGV[2], ARGV[3], ARGV[4]
  local last, after = remove(room, user, node, 1)
  local head = tonumber(redis.call('GET', p .. ':seq') or '0')
  if last and after < tonumber(ARGV[5]) then
    local e = redis.call('GET', p .. ':epoch')
    if e then
      local seq = append(e, ARGV[6], ARGV[7], ARGV[8], ARGV[9])
      return {seq, seq}
    end
  end
  return {0, head}
elseif op == 'reap' then
  -- A dead node's connections of one user: remove them all, announce the leave if it was
  -- the user's last connection anywhere.
  local room, user, node = ARGV[2], ARGV[3], ARGV[4]
  local last, after = remove(room, user, node, tonumber(ARGV[5]))
  if last and after < tonumber(ARGV[6]) then
    local e = redis.call('GET', p .. ':epoch')
    if e then return append(e, ARGV[7], ARGV[8], ARGV[9], ARGV[10]) end
  end
  return 0
elseif op == 'sync' then
  -- Sets this node's connection count of one user to what the node really has (after Redis
  -- trouble lost a leave or a join's answer, or a survivor reaped a node that was only cut
  -- off), announcing the join or leave that the change makes, by the usual rules.
  local room, user, node = ARGV[2], ARGV[3], ARGV[4]
  local target = tonumber(ARGV[5])
  local announce_max = tonumber(ARGV[6])
  local n = tonumber(redis.call('HGET', p .. ':presence:' .. node, user) or '0')
  local e = redis.call('GET', p .. ':epoch')
  if target > n then
    local c, people = add(room, user, node, target - n)
    if c == target - n and people <= announce_max and e then
      return append(e, ARGV[7], ARGV[8], ARGV[11], ARGV[12])
    end
  elseif target < n then
    local last, after = remove(room, user, node, n - target)
    if last and after < announce_max and e then
      return append(e, ARGV[9], ARGV[10], ARGV[11], ARGV[12])
    end
  end
  return 0
elseif op == 'trim' then
  trim(ARGV[2])
  return 0
elseif op == 'padd' then
  local c, people = add(ARGV[2], ARGV[3], ARGV[4], 1)
  if c == 1 then return {1, people} end
  return {0, people}
elseif op == 'prem' then
  local last, after = remove(ARGV[2], ARGV[3], ARGV[4], 1)
  if last then return {1, after} end
  return {0, after}
end
return redis.error_reply('unknown op ' .. tostring(op))
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::server::ServerFrame;

    #[test]
    fn frames_split_around_the_seq() {
        let encoded = ServerFrame::Message {
            room: "r",
            seq: seq_placeholder(),
            user: "u",
            name: "n",
            content: "\"seq\":18446744073709551615",
            ts: "t",
            id: None,
        }
        .encode();
        let (prefix, suffix) = split_frame(&encoded);
        let rebuilt = format!("{prefix}7{suffix}");
        let direct = ServerFrame::Message {
            room: "r",
            seq: 7,
            user: "u",
            name: "n",
            content: "\"seq\":18446744073709551615",
            ts: "t",
            id: None,
        }
        .encode();
        assert_eq!(rebuilt, direct);
    }

    #[test]
    fn channels_name_rooms() {
        assert_eq!(room_of_channel(&room_key("a:b")), Some("a:b"));
        assert_eq!(fnv1a(b"general"), fnv1a(b"general"));
    }
}
