//! Acknowledged events that SQLite's readers cannot see yet: the log writer's open
//! transaction holds them (and the journal keeps them durable) until the next settle. The
//! writer adds each group commit's events here before it hands the batch on to be answered,
//! and clears them once the settle has committed; the readers' connections (history pages,
//! the room list) add them to what SQLite gives. A reader takes this view *before* it reads
//! SQLite: an event missing from the view was settled before the view was taken, so SQLite's
//! later read has it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What one room has unsettled.
#[derive(Debug, Default)]
struct Room {
    /// Its head after the latest group commit.
    head: u64,
    /// The lowest seq its log keeps (`history_max_len`, expiry): older ones, settled or not,
    /// are gone in the open transaction.
    floor: u64,
    /// `(seq, frame)`, in seq order.
    events: Vec<(u64, String)>,
}

/// The readers' view of the writer's open transaction.
#[derive(Debug, Default)]
pub struct Unsettled {
    rooms: Mutex<HashMap<Arc<str>, Room>>,
}

/// One room's part of a group commit (or of an expiry pass), for [`Unsettled::add`]: heads
/// and floors only ever rise.
pub struct Added {
    /// The room.
    pub room: Arc<str>,
    /// Its head after the commit.
    pub head: u64,
    /// The lowest seq it keeps.
    pub floor: u64,
    /// Its new events, `(seq, frame)` in seq order.
    pub events: Vec<(u64, String)>,
}

impl Unsettled {
    /// A group commit's rooms, after it was journaled.
    pub fn add(&self, added: Vec<Added>) {
        if added.is_empty() {
            return;
        }
        let mut rooms = self.rooms.lock().expect("unsettled lock");
        for a in added {
            let room = rooms.entry(a.room).or_default();
            room.head = room.head.max(a.head);
            room.floor = room.floor.max(a.floor);
            room.events.extend(a.events);
        }
    }

    /// Everything was settled (or is read back from the journal into SQLite anew).
    pub fn clear(&self) {
        self.rooms.lock().expect("unsettled lock").clear();
    }

    /// `room`'s unsettled events with `after < seq < before`, and the lowest seq its log
    /// keeps (0: no limit known here).
    pub fn events(&self, room: &str, after: u64, before: u64) -> (Vec<(u64, String)>, u64) {
        let rooms = self.rooms.lock().expect("unsettled lock");
        let Some(r) = rooms.get(room) else {
            return (Vec::new(), 0);
        };
        let events = r
            .events
            .iter()
            .filter(|(seq, _)| *seq > after && *seq < before)
            .cloned()
            .collect();
        (events, r.floor)
    }

    /// Every room with something unsettled, with its head.
    pub fn heads(&self) -> Vec<(String, u64)> {
        let rooms = self.rooms.lock().expect("unsettled lock");
        rooms
            .iter()
            .map(|(room, r)| (room.to_string(), r.head))
            .collect()
    }
}
