//! The `Presence` contract, checked against both implementations: in memory (one node) and in
//! Redis (a cluster; here two "nodes" over one `redis-server` share the counts).

mod redis_server;

use std::sync::Arc;

use parley::cluster::Shards;
use parley::presence::{MemoryPresence, Presence, PresenceChange, RedisPresence};
use redis_server::RedisServer;

fn change(transition: bool, users: usize) -> PresenceChange {
    PresenceChange { transition, users }
}

/// Two tabs are one user; rooms count people. `p1` and `p2` may be the same presence or two
/// nodes of one cluster: the contract is the same.
async fn conformance(p1: &dyn Presence, p2: &dyn Presence) {
    let alice: Arc<str> = "alice".into();
    let bob: Arc<str> = "bob".into();
    assert_eq!(p1.add("r", &alice).await.unwrap(), change(true, 1));
    assert_eq!(p2.add("r", &alice).await.unwrap(), change(false, 1));
    assert_eq!(p2.add("r", &bob).await.unwrap(), change(true, 2));
    assert_eq!(
        p1.users("r").await.unwrap(),
        vec![alice.clone(), bob.clone()]
    );
    assert_eq!(p2.add("s", &bob).await.unwrap(), change(true, 1));
    assert_eq!(
        p1.rooms().await.unwrap(),
        vec![("r".into(), 2), ("s".into(), 1)]
    );
    assert_eq!(p1.remove("r", "alice").await.unwrap(), change(false, 2));
    assert_eq!(p2.remove("r", "alice").await.unwrap(), change(true, 1));
    assert_eq!(p2.remove("r", "bob").await.unwrap(), change(true, 0));
    assert_eq!(p2.remove("s", "bob").await.unwrap(), change(true, 0));
    assert!(p1.users("r").await.unwrap().is_empty());
    assert!(p2.rooms().await.unwrap().is_empty());
    // Removing someone absent changes nothing.
    assert_eq!(p1.remove("r", "nobody").await.unwrap(), change(false, 0));
}

#[tokio::test]
async fn memory_presence_conforms() {
    let p = MemoryPresence::default();
    conformance(&p, &p).await;
}

#[tokio::test]
async fn redis_presence_conforms_across_nodes() {
    let redis = RedisServer::start();
    let shards = Arc::new(Shards::open(&[redis.url()]).unwrap());
    let n1 = RedisPresence::new(shards.clone(), "node-1".into());
    let n2 = RedisPresence::new(shards, "node-2".into());
    conformance(&n1, &n2).await;
}
