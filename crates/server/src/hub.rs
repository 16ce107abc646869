//! This node's rooms and their local members, and the fan-out of pre-encoded frames to them.
//! The hub is the one owner of a room's delivery state on a node, whichever broker feeds it:
//! its local members (connection, user, queue) and the next seq it expects. The hub never
//! encodes, never blocks and never waits for a member: it pushes the same shared bytes into
//! each member's bounded [`Outbound`] queue, and the writes happen after its lock is released.
//! Membership changes come from the broker in the same order as the room's events, so a member
//! sees exactly the events after its join.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use parley_protocol::CloseCode;

use crate::outbound::{Batch, Outbound};

/// Identifies one connection for the lifetime of the process.
pub type ConnId = u64;

/// Local rooms and members.
#[derive(Default)]
pub struct Hub {
    rooms: RwLock<HashMap<Arc<str>, Room>>,
}

struct Member {
    user: Arc<str>,
    outbound: Arc<Outbound>,
}

struct Room {
    members: HashMap<ConnId, Member>,
    /// The seq the members expect next: every event below it has been delivered here.
    next: AtomicU64,
}

impl Hub {
    /// Adds a member whose `joined` carried `head`: it receives every event delivered from now
    /// on. The first member of a room sets the room's next expected seq to `head + 1`.
    pub fn add(
        &self,
        room: &Arc<str>,
        conn: ConnId,
        user: Arc<str>,
        outbound: Arc<Outbound>,
        head: u64,
    ) {
        let mut rooms = self.rooms.write().expect("hub lock");
        rooms
            .entry(room.clone())
            .or_insert_with(|| Room {
                members: HashMap::new(),
                next: AtomicU64::new(head + 1),
            })
            .members
            .insert(conn, Member { user, outbound });
    }

    /// Removes a member; the room is forgotten when its last member goes. Whether it was one.
    pub fn remove(&self, room: &str, conn: ConnId) -> bool {
        let mut rooms = self.rooms.write().expect("hub lock");
        let Some(entry) = rooms.get_mut(room) else {
            return false;
        };
        let was = entry.members.remove(&conn).is_some();
        if entry.members.is_empty() {
            rooms.remove(room);
        }
        was
    }

    /// Whether `conn` is a member of `room`.
    pub fn contains(&self, room: &str, conn: ConnId) -> bool {
        let rooms = self.rooms.read().expect("hub lock");
        rooms
            .get(room)
            .is_some_and(|r| r.members.contains_key(&conn))
    }

    /// The seq `room`'s members expect next; `None` when it has no local members.
    pub fn next_seq(&self, room: &str) -> Option<u64> {
        let rooms = self.rooms.read().expect("hub lock");
        rooms.get(room).map(|r| r.next.load(Ordering::Acquire))
    }

    /// Skips the members' expected seq ahead to `next` (events below it will not come).
    pub fn set_next(&self, room: &str, next: u64) {
        let rooms = self.rooms.read().expect("hub lock");
        if let Some(entry) = rooms.get(room) {
            entry.next.store(next, Ordering::Release);
        }
    }

    /// Connections per user among `room`'s local members.
    pub fn local_users(&self, room: &str) -> HashMap<Arc<str>, u64> {
        let rooms = self.rooms.read().expect("hub lock");
        let mut users: HashMap<Arc<str>, u64> = HashMap::new();
        if let Some(entry) = rooms.get(room) {
            for member in entry.members.values() {
                *users.entry(member.user.clone()).or_default() += 1;
            }
        }
        users
    }

    /// Queues a sequenced event for every local member in `batch`, which writes them once the
    /// hub's lock is released; the members now expect `seq + 1`. Returns how many received it.
    pub fn deliver_in(&self, room: &str, seq: u64, frame: &Utf8Bytes, batch: &mut Batch) -> usize {
        let rooms = self.rooms.read().expect("hub lock");
        let Some(entry) = rooms.get(room) else {
            return 0;
        };
        entry.next.store(seq + 1, Ordering::Release);
        for member in entry.members.values() {
            member.outbound.push_in(frame.clone(), batch);
        }
        entry.members.len()
    }

    /// Takes every local member out of `room` and closes them with 4009 (they rejoin with
    /// `since`). Returns how many there were.
    pub fn evict(&self, room: &str) -> usize {
        let removed = self.rooms.write().expect("hub lock").remove(room);
        let Some(entry) = removed else { return 0 };
        for member in entry.members.values() {
            member.outbound.close(CloseCode::SlowConsumer);
        }
        entry.members.len()
    }

    /// Sends an ephemeral frame (typing) to every local member but `except`.
    pub fn broadcast_except(&self, room: &str, except: ConnId, frame: &Utf8Bytes) {
        let mut batch = Batch::default();
        {
            let rooms = self.rooms.read().expect("hub lock");
            if let Some(entry) = rooms.get(room) {
                for (conn, member) in &entry.members {
                    if *conn != except {
                        member.outbound.push_in(frame.clone(), &mut batch);
                    }
                }
            }
        }
        batch.write();
    }
}
