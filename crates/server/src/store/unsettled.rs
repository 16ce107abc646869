//! Acknowledged changes that SQLite's readers cannot see yet: the journal has them, and the
//! indexer (`store::indexer`) has not committed them. The log writer adds each group commit's
//! changes here, under the block's LSN, before it hands the batch on to be answered and before
//! the indexer gets the block; the indexer drops them once a settle has committed their LSN.
//! Every reader of the log (the writer's own lookups, history pages, the room list) adds them
//! to what SQLite gives, and takes this view *before* it reads SQLite: a change missing from
//! the view was settled before the view was taken, so SQLite's later read has it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An event that may not be settled.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its seq.
    pub seq: u64,
    /// Its frame.
    pub frame: String,
    /// Who sent it and with which client id (de-duplication).
    pub sender: Option<(Arc<str>, String)>,
    /// `events.ts_ms`.
    pub ts_ms: u64,
}

/// What one room has unsettled.
#[derive(Debug, Default)]
struct Room {
    /// Its epoch and head as the writer last left them; `None`: only touched (in use, or
    /// forgotten).
    head: Option<(Arc<str>, u64)>,
    /// The lowest seq its log keeps (`history_max_len`): older ones are gone, settled or not.
    floor: u64,
    /// Events with the LSN of their block, in seq order.
    events: Vec<(u64, Event)>,
    /// The LSN of the block that forgot the room, until it is settled: SQLite's rows of the
    /// room belong to an earlier life and must be ignored.
    forgotten: Option<u64>,
    /// The LSN of the newest block that touched the room: the entry goes once it is settled.
    lsn: u64,
}

/// The readers' view of what the indexer has not settled.
#[derive(Debug, Default)]
pub struct Unsettled {
    rooms: Mutex<HashMap<Arc<str>, Room>>,
}

/// One room's part of a group commit, for [`Unsettled::add`].
pub struct Added {
    /// The room.
    pub room: Arc<str>,
    /// Its epoch and head after the commit.
    pub head: (Arc<str>, u64),
    /// The lowest seq it keeps.
    pub floor: u64,
    /// Its new events, in seq order.
    pub events: Vec<Event>,
}

/// What [`Unsettled::original`] found.
#[derive(Debug, Default)]
pub struct Original {
    /// The message, `(seq, frame)`.
    pub found: Option<(u64, String)>,
    /// The lowest seq the room keeps.
    pub floor: u64,
    /// SQLite's rows of the room are of a forgotten life.
    pub forgotten: bool,
}

/// A room's unsettled part, as a reader sees it.
#[derive(Debug, Default)]
pub struct View {
    /// Events in the range asked for, `(seq, frame)`, in seq order.
    pub events: Vec<(u64, String)>,
    /// The lowest seq the room keeps.
    pub floor: u64,
    /// SQLite's rows of the room are of a forgotten life: ignore them.
    pub forgotten: bool,
}

impl Unsettled {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Room>> {
        self.rooms.lock().expect("unsettled lock")
    }

    /// A group commit's rooms, in block `lsn`.
    pub fn add(&self, lsn: u64, added: Vec<Added>) {
        let mut rooms = self.lock();
        for a in added {
            let room = rooms.entry(a.room).or_default();
            room.head = Some(a.head);
            room.floor = room.floor.max(a.floor);
            room.events.extend(a.events.into_iter().map(|e| (lsn, e)));
            room.lsn = lsn;
        }
    }

    /// `room` was in use in block `lsn`.
    pub fn touch(&self, lsn: u64, room: &Arc<str>) {
        self.lock().entry(room.clone()).or_default().lsn = lsn;
    }

    /// `room` was forgotten in block `lsn`: nothing of it counts any more.
    pub fn forget(&self, lsn: u64, room: &Arc<str>) {
        self.lock().insert(
            room.clone(),
            Room {
                forgotten: Some(lsn),
                lsn,
                ..Room::default()
            },
        );
    }

    /// Everything up to block `lsn` is in SQLite now.
    pub fn settled(&self, lsn: u64) {
        self.lock().retain(|_, room| {
            room.events.retain(|(at, _)| *at > lsn);
            if room.forgotten.is_some_and(|at| at <= lsn) {
                room.forgotten = None;
            }
            room.lsn > lsn
        });
    }

    /// `room`'s epoch and head, if the writer left them here; `Some(None)`: the room was
    /// forgotten and has not started again.
    pub fn head(&self, room: &str) -> Option<Option<(Arc<str>, u64)>> {
        let rooms = self.lock();
        let r = rooms.get(room)?;
        match (&r.head, r.forgotten) {
            (Some(head), _) => Some(Some(head.clone())),
            (None, Some(_)) => Some(None),
            (None, None) => None,
        }
    }

    /// `room`'s events with `after < seq < before`.
    pub fn view(&self, room: &str, after: u64, before: u64) -> View {
        let rooms = self.lock();
        let Some(r) = rooms.get(room) else {
            return View::default();
        };
        View {
            events: r
                .events
                .iter()
                .filter(|(_, e)| e.seq > after && e.seq < before && e.seq >= r.floor)
                .map(|(_, e)| (e.seq, e.frame.clone()))
                .collect(),
            floor: r.floor,
            forgotten: r.forgotten.is_some(),
        }
    }

    /// The unsettled message of `room` from `user` with `client_id`, not older than
    /// `since_ms`, with the room's floor and whether it was forgotten, in one look.
    pub fn original(&self, room: &str, user: &str, client_id: &str, since_ms: u64) -> Original {
        let rooms = self.lock();
        let Some(r) = rooms.get(room) else {
            return Original::default();
        };
        Original {
            found: r.events.iter().find_map(|(_, e)| {
                let (u, id) = e.sender.as_ref()?;
                (&**u == user && id == client_id && e.ts_ms >= since_ms)
                    .then(|| (e.seq, e.frame.clone()))
            }),
            floor: r.floor,
            forgotten: r.forgotten.is_some(),
        }
    }

    /// The rooms with something unsettled.
    pub fn rooms(&self) -> std::collections::HashSet<Arc<str>> {
        self.lock().keys().cloned().collect()
    }

    /// Every room with something here for the room list: `(room, head, forgotten)`; a
    /// forgotten room's SQLite row is of an earlier life.
    pub fn listed(&self) -> Vec<(String, Option<u64>, bool)> {
        let rooms = self.lock();
        rooms
            .iter()
            .filter(|(_, r)| r.head.is_some() || r.forgotten.is_some())
            .map(|(room, r)| {
                (
                    room.to_string(),
                    r.head.as_ref().map(|(_, seq)| *seq),
                    r.forgotten.is_some(),
                )
            })
            .collect()
    }
}
