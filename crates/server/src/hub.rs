//! This node's rooms and their local members, and the fan-out of pre-encoded frames to them.
//! The hub never encodes, never blocks and never waits for a member: it pushes the same shared
//! bytes into each member's bounded [`Outbound`] queue, and the writes happen after its lock is
//! released. Membership changes come from the broker
//! in the same order as the room's events, so a member sees exactly the events after its join.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;

use crate::outbound::{Batch, Outbound};

/// Identifies one connection for the lifetime of the process.
pub type ConnId = u64;

/// Local rooms and members.
#[derive(Default)]
pub struct Hub {
    rooms: RwLock<HashMap<Arc<str>, Room>>,
}

#[derive(Default)]
struct Room {
    members: HashMap<ConnId, Arc<Outbound>>,
    /// The last seq delivered here; events arrive in order, so the next one is `last_seq + 1`.
    last_seq: AtomicU64,
}

impl Hub {
    /// Adds a member; it receives every event delivered from now on.
    pub fn add(&self, room: &Arc<str>, conn: ConnId, outbound: Arc<Outbound>) {
        let mut rooms = self.rooms.write().expect("hub lock");
        rooms
            .entry(room.clone())
            .or_default()
            .members
            .insert(conn, outbound);
    }

    /// Removes a member; the room is forgotten when its last member goes.
    pub fn remove(&self, room: &str, conn: ConnId) {
        let mut rooms = self.rooms.write().expect("hub lock");
        if let Some(entry) = rooms.get_mut(room) {
            entry.members.remove(&conn);
            if entry.members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Queues a sequenced event for every local member in `batch`, which writes them once the
    /// hub's lock is released. Returns how many received it.
    pub fn deliver_in(&self, room: &str, seq: u64, frame: &Utf8Bytes, batch: &mut Batch) -> usize {
        let rooms = self.rooms.read().expect("hub lock");
        let Some(entry) = rooms.get(room) else {
            return 0;
        };
        let last = entry.last_seq.swap(seq, Ordering::Relaxed);
        debug_assert!(
            last == 0 || seq == last + 1,
            "room {room}: seq {seq} after {last}"
        );
        for outbound in entry.members.values() {
            outbound.push_in(frame.clone(), batch);
        }
        entry.members.len()
    }

    /// Sends an ephemeral frame (typing) to every local member but `except`.
    pub fn broadcast_except(&self, room: &str, except: ConnId, frame: &Utf8Bytes) {
        let mut batch = Batch::default();
        {
            let rooms = self.rooms.read().expect("hub lock");
            if let Some(entry) = rooms.get(room) {
                for (conn, outbound) in &entry.members {
                    if *conn != except {
                        outbound.push_in(frame.clone(), &mut batch);
                    }
                }
            }
        }
        batch.write();
    }

    /// Local connections in `room`.
    pub fn member_count(&self, room: &str) -> usize {
        let rooms = self.rooms.read().expect("hub lock");
        rooms.get(room).map_or(0, |r| r.members.len())
    }
}
