//! Cluster mode: what the Redis broker and Redis presence share: the Redis servers (shards)
//! and which room lives on which, the key names ([`keys`]), the Lua scripts that sequence every
//! room event ([`script`], sources in `cluster/lua/`), and frame splitting around the seq.

pub mod keys;
pub mod script;

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The most events this node has seen the shard hold stored (`keys::EVENTS`, in every
    /// script's reply and the heartbeat's): a shard that answers with fewer lost some, and
    /// the scripts renew its rooms' epochs (see `lua/lib.lua`).
    pub events_seen: AtomicU64,
}

impl Shard {
    /// Records that the shard held `events` stored events.
    pub fn saw_events(&self, events: u64) {
        self.events_seen.fetch_max(events, Ordering::AcqRel);
    }

    /// The most events the shard was seen to hold.
    pub fn events_seen(&self) -> u64 {
        self.events_seen.load(Ordering::Acquire)
    }
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
                events_seen: AtomicU64::new(0),
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

/// Now, as frames carry it.
pub fn now_ts() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Prefix and suffix of a `join`/`leave` system event of `user` (display name `name`),
/// stamped now.
pub fn system_parts(room: &str, user: &str, name: &str, joined: bool) -> (String, String) {
    split_frame(&crate::broker::log::system_event(
        room,
        SEQ_SENTINEL,
        user,
        name,
        joined,
        &now_ts(),
    ))
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
    fn the_shard_hash_is_stable() {
        assert_eq!(fnv1a(b"general"), 0x9e27_5796_a0d9_a90b);
    }
}
