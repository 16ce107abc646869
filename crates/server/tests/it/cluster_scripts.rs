//! The Lua scripts against a real `redis-server`, called through the typed argument and reply
//! structs the broker uses: every op, every reply field. A change to one side of the contract
//! (an argument's position, a reply field) that the other side does not follow fails here.
//! Also the announce rule: the Lua version runs the same table as `broker::log::announce`.

use crate::redis_server;

use parley::broker::log::{announce, ANNOUNCE_CASES, DEDUP_WINDOW};
use parley::cluster::keys;
use parley::cluster::script::{
    self, Announced, Join, JoinReply, Leave, LeaveReply, Msg, MsgOutcome, MsgReply, Reap, Sweep,
    Sync, Trim,
};
use parley::cluster::{Shard, Shards};
use redis::aio::ConnectionManager;
use redis_server::RedisServer;

const NODE: &str = "node-1";

fn parts(tag: &str) -> (String, String) {
    (format!("{{\"tag\":\"{tag}\",\"seq\":"), "}".to_owned())
}

fn join<'a>(room: &'a str, user: &'a str, node: &'a str, announce_max: usize) -> Join<'a> {
    let (prefix, suffix) = parts(&format!("join {user}"));
    Join {
        room,
        user,
        node,
        since: None,
        on_join: 10,
        max_replay: 100,
        announce_max,
        users_max: announce_max,
        prefix,
        suffix,
        max_len: 1000,
        ttl_s: 0,
        epoch_candidate: "ep0".into(),
        presence_ttl_ms: 10_000,
    }
}

fn leave<'a>(room: &'a str, user: &'a str, node: &'a str, announce_max: usize) -> Leave<'a> {
    let (prefix, suffix) = parts(&format!("leave {user}"));
    Leave {
        room,
        user,
        node,
        announce_max,
        prefix,
        suffix,
        max_len: 1000,
        ttl_s: 0,
    }
}

fn msg<'a>(room: &'a str, user: &'a str, id: &'a str, content: &'a str) -> Msg<'a> {
    let prefix = format!("{{\"content\":{},\"seq\":", serde_json::json!(content));
    Msg {
        room,
        user,
        client_id: id,
        content,
        prefix,
        suffix: "}".into(),
        max_len: 1000,
        ttl_s: 0,
        epoch_candidate: "ep0".into(),
        dedup_window_s: DEDUP_WINDOW.as_secs(),
        node: NODE,
    }
}

async fn run<O: script::Op>(shard: &Shard, op: &O) -> O::Reply {
    script::run(shard, op).await.unwrap().unwrap()
}

async fn cmd<T: redis::FromRedisValue>(conn: &ConnectionManager, args: &[&str]) -> T {
    let mut conn = conn.clone();
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(&mut conn).await.unwrap()
}

#[tokio::test]
async fn every_op_through_its_typed_structs() {
    let redis = RedisServer::start();
    let shards = Shards::open(&[redis.url()]).unwrap();
    let shard = &shards.shards[0];
    let conn = &shard.conn;

    // join: a new room gets its epoch; the join event is seq 1 and in the history.
    let reply = run(shard, &join("r", "alice", NODE, 10)).await;
    assert_eq!(
        reply,
        JoinReply {
            head: 1,
            epoch: "ep0".into(),
            announced: true,
            people: 1,
            users: vec!["alice".into()],
            history: vec!["{\"tag\":\"join alice\",\"seq\":1}".into()],
            truncated: false,
            recovered: None,
        }
    );

    // msg: stored, then a duplicate, then a conflict (nothing stored).
    let stored = run(shard, &msg("r", "alice", "c-1", "hello")).await;
    assert_eq!(
        stored,
        MsgReply {
            seq: 2,
            epoch: "ep0".into(),
            outcome: MsgOutcome::Stored
        }
    );
    let ttl: i64 = cmd(conn, &["TTL", &keys::dedup("r", "alice", "c-1")]).await;
    assert!(
        ttl > DEDUP_WINDOW.as_secs() as i64 - 5 && ttl <= DEDUP_WINDOW.as_secs() as i64,
        "the dedup key lives DEDUP_WINDOW: {ttl}"
    );
    let dup = run(shard, &msg("r", "alice", "c-1", "hello")).await;
    assert_eq!(
        dup,
        MsgReply {
            seq: 2,
            epoch: "ep0".into(),
            outcome: MsgOutcome::Duplicate
        }
    );
    let conflict = run(shard, &msg("r", "alice", "c-1", "other")).await;
    assert_eq!(
        conflict,
        MsgReply {
            seq: 0,
            epoch: "ep0".into(),
            outcome: MsgOutcome::Conflict
        }
    );
    let len: u64 = cmd(conn, &["XLEN", &keys::log("r")]).await;
    assert_eq!(len, 2, "neither resend stored anything");
    let no_id = run(shard, &msg("r", "alice", "", "again")).await;
    assert_eq!((no_id.seq, no_id.outcome), (3, MsgOutcome::Stored));

    // join with since: recovered, the events after it; a second tab is not announced.
    let mut op = join("r", "alice", "node-2", 10);
    op.since = Some((1, "ep0"));
    let reply = run(shard, &op).await;
    assert_eq!(
        reply,
        JoinReply {
            head: 3,
            epoch: "ep0".into(),
            announced: false,
            people: 1,
            users: vec!["alice".into()],
            history: vec![
                "{\"content\":\"hello\",\"seq\":2}".into(),
                "{\"content\":\"again\",\"seq\":3}".into()
            ],
            truncated: false,
            recovered: Some(true),
        }
    );
    let mut op = join("r", "bob", NODE, 10);
    op.since = Some((0, "another"));
    op.max_replay = 1;
    op.on_join = 1;
    let reply = run(shard, &op).await;
    assert_eq!(reply.recovered, Some(false), "another epoch");
    assert_eq!(reply.history, vec!["{\"tag\":\"join bob\",\"seq\":4}"]);
    assert_eq!((reply.head, reply.people, reply.announced), (4, 2, true));

    // leave: one of alice's two tabs is no event; bob's last is.
    let reply = run(shard, &leave("r", "alice", "node-2", 10)).await;
    assert_eq!(
        reply,
        LeaveReply {
            leave_seq: None,
            head: 4
        }
    );
    let reply = run(shard, &leave("r", "bob", NODE, 10)).await;
    assert_eq!(
        reply,
        LeaveReply {
            leave_seq: Some(5),
            head: 5
        }
    );

    // sync: node-2 says it has alice twice again (no event: she is still here on node-1),
    // then node-1 none (no event: node-2 has her), then node-2 none (her leave).
    let sync = |node: &'static str, target: u64| {
        let (join_prefix, join_suffix) = parts("sync join");
        let (leave_prefix, leave_suffix) = parts("sync leave");
        Sync {
            room: "r",
            user: "alice",
            node,
            target,
            announce_max: 10,
            join_prefix,
            join_suffix,
            leave_prefix,
            leave_suffix,
            max_len: 1000,
            ttl_s: 0,
        }
    };
    assert_eq!(
        run(shard, &sync("node-2", 2)).await,
        Announced { seq: None }
    );
    assert_eq!(run(shard, &sync(NODE, 0)).await, Announced { seq: None });
    assert_eq!(
        run(shard, &sync("node-2", 0)).await,
        Announced { seq: Some(6) }
    );
    assert_eq!(run(shard, &sync(NODE, 1)).await, Announced { seq: Some(7) });

    // reap: a dead node's connections of a user go, announcing the leave.
    let (prefix, suffix) = parts("reaped");
    let reap = Reap {
        room: "r",
        user: "alice",
        node: NODE,
        count: 1,
        announce_max: 10,
        prefix,
        suffix,
        max_len: 1000,
        ttl_s: 0,
    };
    // A join refreshes the node's heartbeat key but never makes it: an expired key is the
    // heartbeat's to find (it then repairs the node's presence).
    let alive: u64 = cmd(conn, &["EXISTS", &keys::node_alive(NODE)]).await;
    assert_eq!(alive, 0, "no heartbeat ran, so no key");
    // Not while the node's heartbeat key is there: a node that came back during a long reap
    // keeps its users.
    let _: () = cmd(conn, &["SET", &keys::node_alive(NODE), "1", "PX", "10000"]).await;
    assert_eq!(
        run(shard, &reap).await,
        Announced { seq: None },
        "the node is alive"
    );
    let users: u64 = cmd(conn, &["HLEN", &keys::users("r")]).await;
    assert_eq!(users, 1, "alice stays");
    let _: u64 = cmd(conn, &["DEL", &keys::node_alive(NODE)]).await;
    assert_eq!(run(shard, &reap).await, Announced { seq: Some(8) });
    assert_eq!(
        run(shard, &reap).await,
        Announced { seq: None },
        "nothing left"
    );
    let users: u64 = cmd(conn, &["HLEN", &keys::users("r")]).await;
    assert_eq!(users, 0);

    // trim: with no age limit it keeps everything.
    run(
        shard,
        &Trim {
            room: "r",
            node: NODE,
            ttl_s: 0,
        },
    )
    .await;
    let len: u64 = cmd(conn, &["XLEN", &keys::log("r")]).await;
    assert_eq!(len, 8);

    // sweep: a room with a message stays, however long empty; one with only join/leave
    // events and nobody in it goes, keys and room-set entry; again, it is a no-op; a room
    // with someone in it stays.
    let sweep = |room| Sweep {
        room,
        node: NODE,
        empty_ttl_s: 0,
    };
    // A message is an event whose frame is a `message` (the encoder writes `type` first).
    let mut message = msg("m", "alice", "", "hello");
    message.prefix = "{\"type\":\"message\",\"seq\":".to_owned();
    run(shard, &message).await;
    assert!(!run(shard, &sweep("m")).await, "m holds a message");
    assert!(
        run(shard, &sweep("r")).await,
        "r holds join/leave events and test frames only"
    );
    run(shard, &join("e", "alice", NODE, 10)).await;
    assert!(!run(shard, &sweep("e")).await, "alice is in e");
    run(shard, &leave("e", "alice", NODE, 10)).await;
    assert!(run(shard, &sweep("e")).await, "e is empty");
    for key in [
        keys::seq("e"),
        keys::epoch("e"),
        keys::log("e"),
        keys::active("e"),
    ] {
        let exists: u64 = cmd(conn, &["EXISTS", &key]).await;
        assert_eq!(exists, 0, "{key}");
    }
    let member: u64 = cmd(conn, &["SISMEMBER", keys::ROOMS, "e"]).await;
    assert_eq!(member, 0);
    assert!(!run(shard, &sweep("e")).await, "already forgotten");
    let exists: u64 = cmd(conn, &["EXISTS", &keys::active("e")]).await;
    assert_eq!(exists, 0, "a repeated sweep leaves nothing behind");
    let member: u64 = cmd(conn, &["SISMEMBER", keys::ROOMS, "m"]).await;
    assert_eq!(member, 1);
}

/// The Lua announce rule on the same cases as `broker::log::announce`: each case sets up a
/// fresh room with the people it needs, then joins or leaves the subject with `announce_max`.
/// From `INFO commandstats`: how many times `command` ran since the last `CONFIG RESETSTAT`.
fn calls(info: &str, command: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_batch_of_messages_of_several_rooms_is_one_call_with_one_run_id_check() {
    let redis = RedisServer::start();
    let shards = Shards::open(&[redis.url()]).unwrap();
    let shard = &shards.shards[0];
    let conn = &shard.conn;
    // Load the script (a first call meets NOSCRIPT), then count from zero.
    let warm = script::run_msgs(shard, &[msg("warm", "u", "", "x").prepare()])
        .await
        .unwrap();
    assert_eq!(warm[0].as_ref().unwrap().seq, 1);
    let _: () = cmd(conn, &["CONFIG", "RESETSTAT"]).await;
    // Room "c" holds a key of the wrong type where its log goes: its message fails alone.
    let _: () = cmd(conn, &["SET", &keys::log("c"), "not a stream"]).await;

    let batch = [
        msg("a", "alice", "c-1", "hello"),
        msg("b", "alice", "c-1", "hi"),
        msg("a", "alice", "c-1", "hello"),
        msg("c", "carol", "", "lost"),
        msg("a", "alice", "c-1", "other"),
        msg("b", "bob", "", "no id"),
    ];
    let prepared: Vec<_> = batch.iter().map(Msg::prepare).collect();
    let replies = script::run_msgs(shard, &prepared).await.unwrap();
    let stored = |seq| {
        Ok(MsgReply {
            seq,
            epoch: "ep0".into(),
            outcome: MsgOutcome::Stored,
        })
    };
    assert_eq!(replies[0], stored(1));
    assert_eq!(
        replies[1],
        stored(1),
        "another room, its own seqs and client ids"
    );
    assert_eq!(
        replies[2],
        Ok(MsgReply {
            seq: 1,
            epoch: "ep0".into(),
            outcome: MsgOutcome::Duplicate
        }),
        "a resend in the same batch"
    );
    assert!(
        replies[3].as_ref().is_err_and(|e| e.contains("WRONGTYPE")),
        "{:?}",
        replies[3]
    );
    assert_eq!(
        replies[4],
        Ok(MsgReply {
            seq: 0,
            epoch: "ep0".into(),
            outcome: MsgOutcome::Conflict
        }),
        "the messages after a failed one still run"
    );
    assert_eq!(replies[5], stored(2));
    let frames: Vec<(String, Vec<(String, String)>)> =
        cmd(conn, &["XRANGE", &keys::log("b"), "-", "+"]).await;
    let frame = |i: usize| {
        frames[i]
            .1
            .iter()
            .find(|(k, _)| k == "f")
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(frames.len(), 2);
    assert_eq!(frame(0), "{\"content\":\"hi\",\"seq\":1}");
    assert_eq!(frame(1), "{\"content\":\"no id\",\"seq\":2}");
    let a_len: u64 = cmd(conn, &["XLEN", &keys::log("a")]).await;
    assert_eq!(a_len, 1);
    // One script call for the six; the run id (INFO) and the clock (TIME) read once.
    let info: String = cmd(conn, &["INFO", "commandstats"]).await;
    assert_eq!(calls(&info, "evalsha"), 1);
    assert_eq!(calls(&info, "info"), 1);
    assert_eq!(calls(&info, "time"), 1);
    // The shard's event count: the warm-up's and the three stored here.
    let events: u64 = cmd(conn, &["GET", keys::EVENTS]).await;
    assert_eq!(events, 4);
    assert_eq!(shard.events_seen(), 4);
}

#[tokio::test]
async fn the_lua_announce_rule_matches_announce() {
    let redis = RedisServer::start();
    let shards = Shards::open(&[redis.url()]).unwrap();
    let shard = &shards.shards[0];
    for (i, &(transition, joined, users_after, announce_max, want)) in
        ANNOUNCE_CASES.iter().enumerate()
    {
        assert_eq!(
            announce(transition, joined, users_after, announce_max),
            want
        );
        let room = format!("case-{i}");
        // People in the room besides the subject, before the change.
        let (others, subject_tabs) = match (joined, transition) {
            (true, true) => (users_after - 1, 0),
            (true, false) => (users_after - 1, 1),
            (false, true) => (users_after, 1),
            (false, false) => (users_after - 1, 2),
        };
        for o in 0..others {
            run(shard, &join(&room, &format!("other-{o}"), NODE, 1000)).await;
        }
        for _ in 0..subject_tabs {
            run(shard, &join(&room, "subject", NODE, 1000)).await;
        }
        let announced = if joined {
            let reply = run(shard, &join(&room, "subject", NODE, announce_max)).await;
            assert_eq!(reply.people, users_after, "case {i}");
            reply.announced
        } else {
            run(shard, &leave(&room, "subject", NODE, announce_max))
                .await
                .leave_seq
                .is_some()
        };
        assert_eq!(
            announced,
            want,
            "case {i}: {:?}",
            (transition, joined, users_after, announce_max)
        );
    }
}
