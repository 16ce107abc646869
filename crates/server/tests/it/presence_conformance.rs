//! The `Presence` contract, checked through the paths production takes: on one node the
//! sequencer changes [`MemoryPresence`] directly; in a cluster the `join`/`leave` scripts change
//! the Redis counts (here two "nodes" over one `redis-server` run them through the typed
//! script structs, as the broker does). Either way the read side, [`Presence`], must answer the
//! same: two tabs are one user, rooms count people.

use crate::redis_server;

use std::sync::Arc;

use parley::cluster::script::{self, Join, Leave};
use parley::cluster::Shards;
use parley::presence::{MemoryPresence, Presence, RedisPresence};
use redis_server::RedisServer;

/// Where presence changes, as production changes it.
enum Writer {
    Memory(Arc<MemoryPresence>),
    Redis(Arc<Shards>),
}

const NODES: [&str; 2] = ["node-1", "node-2"];
const ANNOUNCE_MAX: usize = 1000;

impl Writer {
    /// One more connection of `user` in `room` on node `node`; whether it was the user's first.
    async fn join(&self, node: usize, room: &str, user: &str) -> bool {
        match self {
            Writer::Memory(p) => p.add(room, &Arc::from(user)).transition,
            Writer::Redis(shards) => {
                let op = Join {
                    room,
                    user,
                    node: NODES[node],
                    since: None,
                    on_join: 0,
                    max_replay: 0,
                    announce_max: ANNOUNCE_MAX,
                    users_max: ANNOUNCE_MAX,
                    prefix: "{\"seq\":".into(),
                    suffix: "}".into(),
                    max_len: 100,
                    ttl_s: 0,
                    epoch_candidate: "e".into(),
                    presence_ttl_ms: 10_000,
                };
                let reply = script::run(shards.for_room(room), &op)
                    .await
                    .unwrap()
                    .unwrap();
                reply.announced
            }
        }
    }

    /// One connection of `user` fewer in `room` on node `node`; whether it was the user's last.
    async fn leave(&self, node: usize, room: &str, user: &str) -> bool {
        match self {
            Writer::Memory(p) => p.remove(room, user).transition,
            Writer::Redis(shards) => {
                let op = Leave {
                    room,
                    user,
                    node: NODES[node],
                    announce_max: ANNOUNCE_MAX,
                    prefix: "{\"seq\":".into(),
                    suffix: "}".into(),
                    max_len: 100,
                    ttl_s: 0,
                };
                let reply = script::run(shards.for_room(room), &op)
                    .await
                    .unwrap()
                    .unwrap();
                reply.leave_seq.is_some()
            }
        }
    }
}

/// Two tabs (here on two nodes in a cluster) are one user; rooms count people.
async fn conformance(w: &Writer, p: &dyn Presence) {
    let alice: Arc<str> = "alice".into();
    let bob: Arc<str> = "bob".into();
    assert!(w.join(0, "r", "alice").await, "alice appears");
    assert!(!w.join(1, "r", "alice").await, "a second tab is no change");
    assert!(w.join(1, "r", "bob").await);
    assert_eq!(
        p.users("r").await.unwrap(),
        vec![alice.clone(), bob.clone()]
    );
    assert!(w.join(1, "s", "bob").await);
    assert_eq!(
        p.rooms().await.unwrap(),
        vec![("r".into(), 2), ("s".into(), 1)]
    );
    assert!(!w.leave(0, "r", "alice").await, "one tab left");
    assert_eq!(
        p.users("r").await.unwrap(),
        vec![alice.clone(), bob.clone()]
    );
    assert!(w.leave(1, "r", "alice").await, "the last tab");
    assert_eq!(p.users("r").await.unwrap(), vec![bob.clone()]);
    assert!(w.leave(1, "r", "bob").await);
    assert!(w.leave(1, "s", "bob").await);
    assert!(p.users("r").await.unwrap().is_empty());
    assert!(p.rooms().await.unwrap().is_empty());
    // Removing someone absent changes nothing.
    assert!(!w.leave(0, "r", "nobody").await);
    assert!(p.rooms().await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_presence_conforms() {
    let p = Arc::new(MemoryPresence::default());
    conformance(&Writer::Memory(p.clone()), &*p).await;
}

#[tokio::test]
async fn redis_presence_conforms_across_nodes() {
    let redis = RedisServer::start();
    let shards = Arc::new(Shards::open(&[redis.url()]).unwrap());
    let p = RedisPresence::new(shards.clone());
    conformance(&Writer::Redis(shards), &p).await;
}
