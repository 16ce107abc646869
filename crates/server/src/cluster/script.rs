//! Calling the Lua scripts that sequence every room event: one script per operation
//! (`lua/lib.lua`, shared, followed by `lua/<op>.lua`), each with a typed argument struct and a
//! typed reply.
//!
//! The contract with the Lua side: the script names `KEYS` in the order of
//! [`ScriptKeys`] and its `ARGV` in the order [`Op::args`] returns
//! them (the Lua reads them by these names through `args{...}`, and fails on a count
//! mismatch); a reply is an array in the field order of the reply struct. A unit test below
//! compares the name lists of both sides; `tests/cluster_scripts.rs` runs every op against a
//! real `redis-server` through these structs and checks every reply field.
//!
//! Every script also takes, as its last `ARGV`, the most events this node has seen the shard
//! hold, and answers `{reply, events now}` (the op file runs as a function): the shard's
//! [`Shard::saw_events`] keeps the count, and `lua/lib.lua` renews the epochs of a shard that
//! comes back with fewer.

use std::sync::LazyLock;

use redis::{FromRedisValue, RedisResult, Script, Value};

use super::keys::{ScriptKeys, BATCH_ROOM_KEYS};
use super::Shard;

macro_rules! op_script {
    ($file:literal) => {
        op_script!($file, "false")
    };
    ($file:literal, $batch:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                "local BATCH = ",
                $batch,
                "\n",
                include_str!("lua/lib.lua"),
                "local function op()\n",
                include_str!(concat!("lua/", $file, ".lua")),
                "\nend\nreturn {op(), events_now()}\n"
            ))
        })
    };
}

static MSG: LazyLock<Script> = op_script!("msg");
static MSGS: LazyLock<Script> = op_script!("msgs", "true");
static JOIN: LazyLock<Script> = op_script!("join");
static LEAVE: LazyLock<Script> = op_script!("leave");
static REAP: LazyLock<Script> = op_script!("reap");
static SYNC: LazyLock<Script> = op_script!("sync");
static TRIM: LazyLock<Script> = op_script!("trim");
static SWEEP: LazyLock<Script> = op_script!("sweep");

/// One script operation: its arguments, keys and reply.
pub trait Op {
    /// What the script answers.
    type Reply;
    /// The script.
    fn script(&self) -> &'static Script;
    /// `KEYS`, in the order `lua/lib.lua` names them.
    fn keys(&self) -> ScriptKeys;
    /// `ARGV` with their names, in the order the op's Lua file names them.
    fn args(&self) -> Vec<(&'static str, String)>;
    /// Reads the reply.
    fn reply(value: Value) -> RedisResult<Self::Reply>;
}

fn flag(n: u8) -> bool {
    n == 1
}

fn seq_or_none(seq: u64) -> Option<u64> {
    (seq > 0).then_some(seq)
}

/// `msg`: a chat message. `prefix`/`suffix`: the frame around its seq.
pub struct Msg<'a> {
    pub room: &'a str,
    pub user: &'a str,
    /// The client id; `""` for none (no de-duplication).
    pub client_id: &'a str,
    pub content: &'a str,
    pub prefix: String,
    pub suffix: String,
    pub max_len: u64,
    pub ttl_s: u64,
    /// The epoch to create when the room has none.
    pub epoch_candidate: String,
    /// How long the client id de-duplicates (`broker::log::DEDUP_WINDOW`).
    pub dedup_window_s: u64,
    pub node: &'a str,
}

/// What became of a `msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgOutcome {
    /// Stored now.
    Stored,
    /// A resend with the same content: `seq` is the original's; nothing stored.
    Duplicate,
    /// The client id holds other content: nothing stored.
    Conflict,
}

/// The reply of `msg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgReply {
    /// The message's seq (0 on a conflict).
    pub seq: u64,
    /// The room's epoch (`""` when a duplicate outlived it).
    pub epoch: String,
    pub outcome: MsgOutcome,
}

impl Op for Msg<'_> {
    type Reply = MsgReply;
    fn script(&self) -> &'static Script {
        &MSG
    }
    fn keys(&self) -> ScriptKeys {
        let dedup = (!self.client_id.is_empty()).then_some((self.user, self.client_id));
        ScriptKeys::new(self.room, self.node, dedup)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        vec![
            ("room", self.room.to_owned()),
            ("client_id", self.client_id.to_owned()),
            ("content", self.content.to_owned()),
            ("prefix", self.prefix.clone()),
            ("suffix", self.suffix.clone()),
            ("max_len", self.max_len.to_string()),
            ("ttl_s", self.ttl_s.to_string()),
            ("epoch_candidate", self.epoch_candidate.clone()),
            ("dedup_window_s", self.dedup_window_s.to_string()),
        ]
    }
    fn reply(value: Value) -> RedisResult<MsgReply> {
        let (seq, epoch, outcome): (u64, String, u8) = FromRedisValue::from_redis_value(value)?;
        let outcome = match outcome {
            0 => MsgOutcome::Stored,
            1 => MsgOutcome::Duplicate,
            _ => MsgOutcome::Conflict,
        };
        Ok(MsgReply {
            seq,
            epoch,
            outcome,
        })
    }
}

impl Msg<'_> {
    /// The message's keys and arguments, owned, for a batch ([`run_msgs`]).
    pub fn prepare(&self) -> PreparedMsg {
        PreparedMsg {
            keys: self.keys().keys.into_iter().map(|(_, key)| key).collect(),
            args: self.args().into_iter().map(|(_, value)| value).collect(),
        }
    }
}

/// A [`Msg`] ready to go to Redis with others in one call of `lua/msgs.lua`: its keys in
/// [`ScriptKeys`] order and its arguments in [`Msg`]'s order.
pub struct PreparedMsg {
    keys: Vec<String>,
    args: Vec<String>,
}

impl PreparedMsg {
    /// The bytes of its keys and arguments: what it adds to a call.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.args).map(String::len).sum()
    }
}

/// Where each of [`BATCH_ROOM_KEYS`] is in [`ScriptKeys`].
static BATCH_ROOM_INDEX: LazyLock<Vec<usize>> = LazyLock::new(|| {
    let names: Vec<&str> = ScriptKeys::new("r", "n", None)
        .keys
        .iter()
        .map(|(name, _)| *name)
        .collect();
    BATCH_ROOM_KEYS
        .iter()
        .map(|k| {
            names
                .iter()
                .position(|n| n == k)
                .expect("a ScriptKeys name")
        })
        .collect()
});

/// One `EVALSHA` of `lua/msgs.lua` carrying every message of `msgs` (not empty): KEYS are the
/// first message's keys, then each further message's [`BATCH_ROOM_KEYS`]; ARGV each message's
/// arguments in turn, then the events this node has seen the shard hold.
fn msgs_command(msgs: &[PreparedMsg], events_seen: u64) -> redis::Cmd {
    let first = &msgs[0];
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(MSGS.get_hash())
        .arg(first.keys.len() + (msgs.len() - 1) * BATCH_ROOM_KEYS.len());
    for key in &first.keys {
        cmd.arg(key);
    }
    for msg in &msgs[1..] {
        for &i in BATCH_ROOM_INDEX.iter() {
            cmd.arg(&msg.keys[i]);
        }
    }
    for msg in msgs {
        for value in &msg.args {
            cmd.arg(value);
        }
    }
    cmd.arg(events_seen);
    cmd
}

fn is_noscript_error(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Sequences `msgs` (of any rooms of the shard) in one script call, in order: one Redis
/// round trip and one run-id check for all of them. One reply per message: `Err` with the
/// script's error text for a message that failed on its own; the outer `Err` when the call
/// did not go through at all (then it did nothing, or its answer was lost). On `NOSCRIPT` the
/// script is loaded and the call made again (a call that met NOSCRIPT did nothing).
pub async fn run_msgs(
    shard: &Shard,
    msgs: &[PreparedMsg],
) -> RedisResult<Vec<Result<MsgReply, String>>> {
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = shard.conn.clone();
    let value: Value = match msgs_command(msgs, shard.events_seen())
        .query_async(&mut conn)
        .await
    {
        Err(e) if is_noscript_error(&e) => {
            MSGS.load_async(&mut conn).await?;
            msgs_command(msgs, shard.events_seen())
                .query_async(&mut conn)
                .await?
        }
        other => other?,
    };
    let (replies, events): (Vec<Value>, u64) = FromRedisValue::from_redis_value(value)?;
    shard.saw_events(events);
    if replies.len() != msgs.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "msgs: one reply per message expected",
        )));
    }
    Ok(replies
        .into_iter()
        .map(|value| match value {
            // `{0, '', 3, error}`: this message failed on its own.
            Value::Array(ref fields) if fields.len() == 4 => {
                let (_, _, _, why): (u64, String, u8, String) =
                    FromRedisValue::from_redis_value(value).map_err(|e| e.to_string())?;
                Err(why)
            }
            value => Msg::reply(value).map_err(|e| e.to_string()),
        })
        .collect())
}

/// `join`: a connection joins; presence, the join event, head and history in one step.
pub struct Join<'a> {
    pub room: &'a str,
    pub user: &'a str,
    pub node: &'a str,
    /// `since` and `epoch` of the join frame, if given.
    pub since: Option<(u64, &'a str)>,
    pub on_join: usize,
    pub max_replay: usize,
    /// Most people for whom a join is announced (0: the room does not announce).
    pub announce_max: usize,
    /// Most people for whom the reply lists `users` (0: the room has no presence).
    pub users_max: usize,
    pub prefix: String,
    pub suffix: String,
    pub max_len: u64,
    pub ttl_s: u64,
    pub epoch_candidate: String,
    pub presence_ttl_ms: u64,
}

/// The reply of `join`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReply {
    /// The room's latest seq, the joiner's own join event included.
    pub head: u64,
    pub epoch: String,
    /// A `join` event was sequenced.
    pub announced: bool,
    /// People in the room.
    pub people: usize,
    /// Their names (unsorted) when `people <= users_max`, else empty.
    pub users: Vec<String>,
    /// The joiner's history, oldest first.
    pub history: Vec<String>,
    /// The replay was cut at `max_replay`.
    pub truncated: bool,
    /// With `since`: whether the history continues exactly from it.
    pub recovered: Option<bool>,
}

impl Op for Join<'_> {
    type Reply = JoinReply;
    fn script(&self) -> &'static Script {
        &JOIN
    }
    fn keys(&self) -> ScriptKeys {
        ScriptKeys::new(self.room, self.node, None)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        let (since, since_epoch) = match self.since {
            Some((s, e)) => (s.to_string(), e.to_owned()),
            None => (String::new(), String::new()),
        };
        vec![
            ("room", self.room.to_owned()),
            ("user", self.user.to_owned()),
            ("node", self.node.to_owned()),
            ("since", since),
            ("since_epoch", since_epoch),
            ("on_join", self.on_join.to_string()),
            ("max_replay", self.max_replay.to_string()),
            ("announce_max", self.announce_max.to_string()),
            ("users_max", self.users_max.to_string()),
            ("prefix", self.prefix.clone()),
            ("suffix", self.suffix.clone()),
            ("max_len", self.max_len.to_string()),
            ("ttl_s", self.ttl_s.to_string()),
            ("epoch_candidate", self.epoch_candidate.clone()),
            ("presence_ttl_ms", self.presence_ttl_ms.to_string()),
        ]
    }
    fn reply(value: Value) -> RedisResult<JoinReply> {
        type Raw = (u64, String, u8, usize, Vec<String>, Vec<String>, u8, i8);
        let (head, epoch, announced, people, users, history, truncated, recovered): Raw =
            FromRedisValue::from_redis_value(value)?;
        Ok(JoinReply {
            head,
            epoch,
            announced: flag(announced),
            people,
            users,
            history,
            truncated: flag(truncated),
            recovered: match recovered {
                -1 => None,
                r => Some(r == 1),
            },
        })
    }
}

/// `leave`: a connection leaves; presence, and the leave event after the user's last one.
pub struct Leave<'a> {
    pub room: &'a str,
    pub user: &'a str,
    pub node: &'a str,
    pub announce_max: usize,
    pub prefix: String,
    pub suffix: String,
    pub max_len: u64,
    pub ttl_s: u64,
}

/// The reply of `leave`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveReply {
    /// The seq of the `leave` event, when one was announced.
    pub leave_seq: Option<u64>,
    /// The room's latest seq.
    pub head: u64,
}

impl Op for Leave<'_> {
    type Reply = LeaveReply;
    fn script(&self) -> &'static Script {
        &LEAVE
    }
    fn keys(&self) -> ScriptKeys {
        ScriptKeys::new(self.room, self.node, None)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        vec![
            ("room", self.room.to_owned()),
            ("user", self.user.to_owned()),
            ("announce_max", self.announce_max.to_string()),
            ("prefix", self.prefix.clone()),
            ("suffix", self.suffix.clone()),
            ("max_len", self.max_len.to_string()),
            ("ttl_s", self.ttl_s.to_string()),
        ]
    }
    fn reply(value: Value) -> RedisResult<LeaveReply> {
        let (leave_seq, head): (u64, u64) = FromRedisValue::from_redis_value(value)?;
        Ok(LeaveReply {
            leave_seq: seq_or_none(leave_seq),
            head,
        })
    }
}

/// `reap`: removes a dead node's connections of one user.
pub struct Reap<'a> {
    pub room: &'a str,
    pub user: &'a str,
    /// The dead node.
    pub node: &'a str,
    /// Its connections of the user.
    pub count: u64,
    pub announce_max: usize,
    pub prefix: String,
    pub suffix: String,
    pub max_len: u64,
    pub ttl_s: u64,
}

/// The reply of `reap` and `sync`: the seq of the announced event, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    pub seq: Option<u64>,
}

impl Op for Reap<'_> {
    type Reply = Announced;
    fn script(&self) -> &'static Script {
        &REAP
    }
    fn keys(&self) -> ScriptKeys {
        ScriptKeys::new(self.room, self.node, None)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        vec![
            ("room", self.room.to_owned()),
            ("user", self.user.to_owned()),
            ("count", self.count.to_string()),
            ("announce_max", self.announce_max.to_string()),
            ("prefix", self.prefix.clone()),
            ("suffix", self.suffix.clone()),
            ("max_len", self.max_len.to_string()),
            ("ttl_s", self.ttl_s.to_string()),
        ]
    }
    fn reply(value: Value) -> RedisResult<Announced> {
        Ok(Announced {
            seq: seq_or_none(u64::from_redis_value(value)?),
        })
    }
}

/// `sync`: sets this node's connection count of one user to `target`.
pub struct Sync<'a> {
    pub room: &'a str,
    pub user: &'a str,
    pub node: &'a str,
    pub target: u64,
    pub announce_max: usize,
    pub join_prefix: String,
    pub join_suffix: String,
    pub leave_prefix: String,
    pub leave_suffix: String,
    pub max_len: u64,
    pub ttl_s: u64,
}

impl Op for Sync<'_> {
    type Reply = Announced;
    fn script(&self) -> &'static Script {
        &SYNC
    }
    fn keys(&self) -> ScriptKeys {
        ScriptKeys::new(self.room, self.node, None)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        vec![
            ("room", self.room.to_owned()),
            ("user", self.user.to_owned()),
            ("node", self.node.to_owned()),
            ("target", self.target.to_string()),
            ("announce_max", self.announce_max.to_string()),
            ("join_prefix", self.join_prefix.clone()),
            ("join_suffix", self.join_suffix.clone()),
            ("leave_prefix", self.leave_prefix.clone()),
            ("leave_suffix", self.leave_suffix.clone()),
            ("max_len", self.max_len.to_string()),
            ("ttl_s", self.ttl_s.to_string()),
        ]
    }
    fn reply(value: Value) -> RedisResult<Announced> {
        Ok(Announced {
            seq: seq_or_none(u64::from_redis_value(value)?),
        })
    }
}

/// `trim`: drops the room's events older than `ttl_s`.
pub struct Trim<'a> {
    pub room: &'a str,
    pub node: &'a str,
    pub ttl_s: u64,
}

impl Op for Trim<'_> {
    type Reply = ();
    fn script(&self) -> &'static Script {
        &TRIM
    }
    fn keys(&self) -> ScriptKeys {
        ScriptKeys::new(self.room, self.node, None)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        vec![("ttl_s", self.ttl_s.to_string())]
    }
    fn reply(value: Value) -> RedisResult<()> {
        u64::from_redis_value(value)?;
        Ok(())
    }
}

/// `sweep`: forgets the room if it has been empty (no member, no message) for
/// `empty_ttl_s`. Idempotent; any node may run it on any room.
pub struct Sweep<'a> {
    pub room: &'a str,
    pub node: &'a str,
    pub empty_ttl_s: u64,
}

impl Op for Sweep<'_> {
    /// Whether the room was forgotten.
    type Reply = bool;
    fn script(&self) -> &'static Script {
        &SWEEP
    }
    fn keys(&self) -> ScriptKeys {
        ScriptKeys::new(self.room, self.node, None)
    }
    fn args(&self) -> Vec<(&'static str, String)> {
        vec![
            ("room", self.room.to_owned()),
            ("empty_ttl_s", self.empty_ttl_s.to_string()),
        ]
    }
    fn reply(value: Value) -> RedisResult<bool> {
        Ok(flag(u8::from_redis_value(value)?))
    }
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

fn pipeline<O: Op>(ops: &[&O], events_seen: u64) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for op in ops {
        let keys = op.keys().keys;
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(op.script().get_hash())
            .arg(keys.len());
        for (_, key) in keys {
            cmd.arg(key);
        }
        for (_, value) in op.args() {
            cmd.arg(value);
        }
        cmd.arg(events_seen);
    }
    pipe
}

/// `{reply, events}`: records the shard's event count, reads the op's reply.
fn read_reply<O: Op>(shard: &Shard, value: Value) -> RedisResult<O::Reply> {
    let (reply, events): (Value, u64) = FromRedisValue::from_redis_value(value)?;
    shard.saw_events(events);
    O::reply(reply)
}

/// Runs `ops` in one pipeline (EVALSHA; on NOSCRIPT the script is loaded and those ops run
/// again: an op that met NOSCRIPT did nothing). One reply per op, in order: `Err` with the
/// script's error text for an op that failed on its own; the outer `Err` when the pipeline
/// did not go through at all.
pub async fn run_batch<O: Op>(
    shard: &Shard,
    ops: &[&O],
) -> RedisResult<Vec<Result<O::Reply, String>>> {
    let mut conn = shard.conn.clone();
    let mut values: Vec<Value> = pipeline(ops, shard.events_seen())
        .query_async(&mut conn)
        .await?;
    let retry: Vec<usize> = (0..values.len())
        .filter(|&i| is_noscript(&values[i]))
        .collect();
    if let Some(&first) = retry.first() {
        ops[first].script().load_async(&mut conn).await?;
        let again: Vec<&O> = retry.iter().map(|&i| ops[i]).collect();
        let fresh: Vec<Value> = pipeline(&again, shard.events_seen())
            .query_async(&mut conn)
            .await?;
        for (i, v) in retry.into_iter().zip(fresh) {
            values[i] = v;
        }
    }
    Ok(values
        .into_iter()
        .map(|value| match value {
            Value::ServerError(e) => Err(e.details().unwrap_or(e.code()).to_owned()),
            value => read_reply::<O>(shard, value).map_err(|e| e.to_string()),
        })
        .collect())
}

/// Runs one op. The outer `Err` is the connection's; the inner the script's.
pub async fn run<O: Op>(shard: &Shard, op: &O) -> RedisResult<Result<O::Reply, String>> {
    let mut replies = run_batch(shard, &[op]).await?;
    Ok(replies.pop().unwrap_or_else(|| Err("no reply".to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the list that `opening` starts in a Lua source: a table,
    /// `<binding>{'a', 'b', ...}` (`K = keys{`, `a = args{`), or a function's parameters,
    /// `<function>(a, b, ...)`.
    fn lua_names(source: &str, opening: &str) -> Vec<String> {
        let close = if opening.ends_with('(') { ')' } else { '}' };
        let start = source
            .find(opening)
            .unwrap_or_else(|| panic!("no {opening}...{close}"))
            + opening.len();
        let end = start + source[start..].find(close).expect("closing bracket");
        source[start..end]
            .split(',')
            .map(|s| s.trim().trim_matches('\'').to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn names(args: Vec<(&'static str, String)>) -> Vec<String> {
        args.into_iter().map(|(n, _)| n.to_owned()).collect()
    }

    #[test]
    fn keys_are_named_in_the_same_order_on_both_sides() {
        let lua = lua_names(include_str!("lua/lib.lua"), "local K = keys{");
        let rust: Vec<String> = ScriptKeys::new("r", "n", None)
            .keys
            .into_iter()
            .map(|(n, _)| n.to_owned())
            .collect();
        assert_eq!(lua, rust);
    }

    #[test]
    fn every_op_reads_its_arguments_in_the_struct_order() {
        let s = String::new;
        let msg = Msg {
            room: "r",
            user: "u",
            client_id: "",
            content: "",
            prefix: s(),
            suffix: s(),
            max_len: 0,
            ttl_s: 0,
            epoch_candidate: s(),
            dedup_window_s: 0,
            node: "n",
        };
        let join = Join {
            room: "r",
            user: "u",
            node: "n",
            since: None,
            on_join: 0,
            max_replay: 0,
            announce_max: 0,
            users_max: 0,
            prefix: s(),
            suffix: s(),
            max_len: 0,
            ttl_s: 0,
            epoch_candidate: s(),
            presence_ttl_ms: 0,
        };
        let leave = Leave {
            room: "r",
            user: "u",
            node: "n",
            announce_max: 0,
            prefix: s(),
            suffix: s(),
            max_len: 0,
            ttl_s: 0,
        };
        let reap = Reap {
            room: "r",
            user: "u",
            node: "n",
            count: 0,
            announce_max: 0,
            prefix: s(),
            suffix: s(),
            max_len: 0,
            ttl_s: 0,
        };
        let sync = Sync {
            room: "r",
            user: "u",
            node: "n",
            target: 0,
            announce_max: 0,
            join_prefix: s(),
            join_suffix: s(),
            leave_prefix: s(),
            leave_suffix: s(),
            max_len: 0,
            ttl_s: 0,
        };
        let trim = Trim {
            room: "r",
            node: "n",
            ttl_s: 0,
        };
        let sweep = Sweep {
            room: "r",
            node: "n",
            empty_ttl_s: 0,
        };
        let cases = [
            (include_str!("lua/msg.lua"), names(msg.args())),
            (include_str!("lua/join.lua"), names(join.args())),
            (include_str!("lua/leave.lua"), names(leave.args())),
            (include_str!("lua/reap.lua"), names(reap.args())),
            (include_str!("lua/sync.lua"), names(sync.args())),
            (include_str!("lua/trim.lua"), names(trim.args())),
            (include_str!("lua/sweep.lua"), names(sweep.args())),
        ];
        for (source, rust) in cases {
            assert_eq!(lua_names(source, "local a = args{"), rust);
        }
        // A batch passes each message's arguments to lib.lua's `message` in the order msg.lua
        // names them.
        assert_eq!(
            lua_names(include_str!("lua/msgs.lua"), "local names = {"),
            names(msg.args())
        );
        assert_eq!(
            lua_names(include_str!("lua/lib.lua"), "local function message("),
            names(msg.args())
        );
    }

    #[test]
    fn a_batch_names_each_further_message_s_room_keys_in_the_same_order() {
        let msgs = include_str!("lua/msgs.lua");
        assert_eq!(lua_names(msgs, "local room_keys = {"), BATCH_ROOM_KEYS);
        let all = ScriptKeys::new("r", "n", None).keys.len();
        assert!(
            msgs.contains(&format!("#KEYS ~= {all} + (n - 1)"))
                && msgs.contains(&format!("local at = {all} + ")),
            "msgs.lua counts the first message's {all} keys"
        );
    }
}
