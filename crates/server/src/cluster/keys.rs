//! Every Redis key and channel name parley uses: the one place they are spelled. The Lua
//! scripts receive theirs in `KEYS` (see [`ScriptKeys`]) and never build one.
//!
//! Keys of a room (hash-tagged, so a room's keys stay together on any Redis layout):
//! - `parley:{room}:seq` the latest seq, `parley:{room}:epoch` the log's incarnation;
//! - `parley:{room}:log` a stream of the room's events, ids `<seq>-0`, fields `f` (the
//!   encoded frame, byte for byte what members receive), `e` (the epoch) and `t` (Redis's
//!   clock in ms when it was appended);
//! - `parley:{room}:dedup:<len(user)>:<user>:<id>` the seq of a client id, for
//!   [`crate::broker::log::DEDUP_WINDOW`];
//! - `parley:{room}:active` when the room was last known in use (Redis's clock in ms: set
//!   when its last member leaves, or by a sweep that finds it in use), for forgetting empty
//!   rooms (`lua/sweep.lua`);
//! - `parley:{room}:users` user -> connections in the whole cluster;
//!   `parley:{room}:presence:<node>` user -> connections on one node;
//! - channel `parley:{room}`: `"<seq> <epoch> <frame>"` for every event, and
//!   `"T <node> <frame>"` for a typing notice.
//!
//! - `parley:{room}:hook:cursor` the webhook cursor (hash `epoch`, `seq`) and
//!   `parley:{room}:hook:lease` the node delivering the room's webhooks (see
//!   `crate::webhooks::redis`);
//! - `parley:{room}:gen` the shard generation the room's epoch belongs to (see [`GEN`]).
//!
//! Keys of a shard: `parley:rooms` (every room it has seen), `parley:nodes` (every node that
//! has had members there), `parley:run` (the Redis run id its data was last written under),
//! `parley:durable` (run ids a node found durable), `parley:gen` (the data-loss generation), `parley:events` (events stored on the shard), `parley:node:<node>:alive` (the node's heartbeat),
//! `parley:node:<node>:rooms` (rooms where the node has presence entries),
//! `parley:node:<node>:reaper` (the lock of the survivor reaping a dead node).

/// `parley:{room}`: the prefix of a room's keys and its pub/sub channel.
pub fn room(room: &str) -> String {
    format!("parley:{{{room}}}")
}

/// The room of a channel name, `parley:{room}`.
pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("parley:{")?.strip_suffix('}')
}

/// The room's pub/sub channel.
pub fn channel(room_name: &str) -> String {
    room(room_name)
}

/// The room's latest seq.
pub fn seq(room_name: &str) -> String {
    format!("{}:seq", room(room_name))
}

/// The room's epoch.
pub fn epoch(room_name: &str) -> String {
    format!("{}:epoch", room(room_name))
}

/// The room's event stream.
pub fn log(room_name: &str) -> String {
    format!("{}:log", room(room_name))
}

/// When the room was last known in use (ms), for the sweep of empty rooms.
pub fn active(room_name: &str) -> String {
    format!("{}:active", room(room_name))
}

/// The room's people in the whole cluster (user -> connections).
pub fn users(room_name: &str) -> String {
    format!("{}:users", room(room_name))
}

/// One node's connections in the room (user -> connections).
pub fn presence(room_name: &str, node: &str) -> String {
    format!("{}:presence:{node}", room(room_name))
}

/// The seq a user's client id was posted at.
pub fn dedup(room_name: &str, user: &str, id: &str) -> String {
    format!("{}:dedup:{}:{user}:{id}", room(room_name), user.len())
}

/// The shard generation a room's epoch belongs to: when it is below [`GEN`], Redis may have
/// lost some of the room's events since, and the room gets a new epoch.
pub fn room_gen(room_name: &str) -> String {
    format!("{}:gen", room(room_name))
}

/// The room's webhook cursor: a hash `epoch`, `seq` (the last event delivered).
pub fn hook_cursor(room_name: &str) -> String {
    format!("{}:hook:cursor", room(room_name))
}

/// The lease of the node delivering the room's webhooks (its node id, with an expiry).
pub fn hook_lease(room_name: &str) -> String {
    format!("{}:hook:lease", room(room_name))
}

/// The Redis run id (`INFO server`) the shard's data was last written under; another one
/// means Redis restarted or failed over.
pub const RUN: &str = "parley:run";

/// Run ids a node found durable (AOF with `appendfsync always`, a master without replicas):
/// a restart after one of them lost nothing it acknowledged.
pub const DURABLE: &str = "parley:durable";

/// The shard's data-loss generation: goes up when Redis comes back from a run that was not
/// durable, so every room's epoch is renewed.
pub const GEN: &str = "parley:gen";

/// How many events the shard has stored, all rooms together: nodes remember the most they
/// saw, and a shard that answers with fewer lost some (an older snapshot restored).
pub const EVENTS: &str = "parley:events";

/// Every room a shard has seen.
pub const ROOMS: &str = "parley:rooms";

/// Every node that has had members on a shard.
pub const NODES: &str = "parley:nodes";

/// A node's heartbeat.
pub fn node_alive(node: &str) -> String {
    format!("parley:node:{node}:alive")
}

/// Rooms where a node has presence entries.
pub fn node_rooms(node: &str) -> String {
    format!("parley:node:{node}:rooms")
}

/// The lock of the survivor reaping a dead node.
pub fn node_reaper(node: &str) -> String {
    format!("parley:node:{node}:reaper")
}

/// In a batch of messages (`lua/msgs.lua`), the keys each message after the first passes: its
/// room's, by their [`ScriptKeys`] names, in this order (the first message passes all of its
/// [`ScriptKeys`]; the others are the shard's, the same for every message of a node).
pub const BATCH_ROOM_KEYS: [&str; 6] = ["seq", "epoch", "log", "channel", "dedup", "room_gen"];

/// The keys every script receives, in this order (`KEYS[1]`..): the Lua names them with the
/// same list (`lua/lib.lua`, checked by a test).
pub struct ScriptKeys {
    /// `KEYS` in order, with their names.
    pub keys: Vec<(&'static str, String)>,
}

impl ScriptKeys {
    /// The keys of `room` as node `node` acts on it (its own node, or a dead one being reaped);
    /// `dedup`: the user and client id of a message, if it has one.
    pub fn new(room_name: &str, node: &str, dedup_of: Option<(&str, &str)>) -> ScriptKeys {
        ScriptKeys {
            keys: vec![
                ("seq", seq(room_name)),
                ("epoch", epoch(room_name)),
                ("log", log(room_name)),
                ("users", users(room_name)),
                ("channel", channel(room_name)),
                ("rooms", ROOMS.to_owned()),
                ("nodes", NODES.to_owned()),
                ("presence", presence(room_name, node)),
                ("node_rooms", node_rooms(node)),
                ("alive", node_alive(node)),
                (
                    "dedup",
                    dedup_of.map_or_else(String::new, |(user, id)| dedup(room_name, user, id)),
                ),
                ("room_gen", room_gen(room_name)),
                ("run", RUN.to_owned()),
                ("durable", DURABLE.to_owned()),
                ("gen", GEN.to_owned()),
                ("active", active(room_name)),
                ("events", EVENTS.to_owned()),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_rooms() {
        assert_eq!(room_of_channel(&channel("a:b")), Some("a:b"));
        assert_eq!(seq("r"), "parley:{r}:seq");
        assert_eq!(dedup("r", "al:ice", "x"), "parley:{r}:dedup:6:al:ice:x");
    }
}
