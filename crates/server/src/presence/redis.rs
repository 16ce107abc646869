//! Cluster presence in Redis: per room, `parley:{room}:users` counts each user's connections in
//! the whole cluster and `parley:{room}:presence:<node>` those on one node, so a user with tabs
//! on two nodes is one member, announced once. The broker changes presence inside the same
//! script that sequences the join/leave event (`cluster/lua/join.lua`, `leave.lua`); this type
//! answers the HTTP API's questions.

use std::sync::Arc;

use async_trait::async_trait;
use redis::FromRedisValue;

use super::{Presence, PresenceError};
use crate::cluster::{self, keys, Shards};

/// Presence shared by the nodes of a cluster.
pub struct RedisPresence {
    shards: Arc<Shards>,
}

impl RedisPresence {
    /// Presence over `shards`.
    pub fn new(shards: Arc<Shards>) -> RedisPresence {
        RedisPresence { shards }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn users(&self, room: &str) -> Result<Vec<Arc<str>>, PresenceError> {
        let mut conn = self.shards.for_room(room).conn.clone();
        let users: Vec<String> = redis::cmd("HKEYS")
            .arg(keys::users(room))
            .query_async(&mut conn)
            .await
            .map_err(|e| PresenceError(cluster::reason(&e)))?;
        let mut users: Vec<Arc<str>> = users.into_iter().map(Arc::from).collect();
        users.sort();
        Ok(users)
    }

    async fn rooms(&self) -> Result<Vec<(Arc<str>, usize)>, PresenceError> {
        let mut out = Vec::new();
        for shard in &self.shards.shards {
            let mut conn = shard.conn.clone();
            let err = |e: redis::RedisError| PresenceError(cluster::reason(&e));
            let names: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys::ROOMS)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            if names.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for room in &names {
                pipe.cmd("HLEN").arg(keys::users(room));
            }
            let counts: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(err)?;
            for (room, count) in names.into_iter().zip(counts) {
                let count = usize::from_redis_value(count).unwrap_or(0);
                if count > 0 {
                    out.push((Arc::from(room), count));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
