//! The single-node durable log: a journal in front of SQLite (WAL mode). One [`LogWriter`],
//! driven by the broker's log-writer thread, assigns each room's next seq from the heads it
//! keeps and makes each group commit durable, before its ack, as one block of the [`Journal`];
//! the indexer (`store::indexer`), on a thread of its own, writes the blocks into SQLite and
//! commits them every `store.settle_ms`. Everything that reads the log (the writer's own
//! lookups, and readers on their own connections) adds the [`Unsettled`] view of what SQLite
//! does not hold yet, and never blocks the writer.
//!
//! Schema: `rooms(room, epoch, seq, active_ms)` holds the epoch of each room's log, its head
//! as of the last time expiry emptied it (the head itself is [`ROOM_HEAD`]) and when it was
//! last known in use (created, or left by its last member), for the sweep that forgets empty
//! rooms ([`LogWriter::sweep`]);
//! `events(room, seq, ts_ms, user, client_id, frame)` holds the encoded frame of every retained
//! event, so history is served without re-encoding.
//!
//! Checkpoints (copying the WAL back into the database file) run on a thread of their own with
//! its own connection (`store::indexer::Checkpointer`), not in the indexer's commits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_protocol::server::ServerFrame;
use rusqlite::{params, Connection, OptionalExtension};

use crate::broker::log::{
    cap_replay, system_event, JoinHistory, Page, PageQuery, StoredRoom, DEDUP_WINDOW,
};
use crate::config::{HistoryConfig, Synchronous};
use crate::policy::Policies;
use crate::store::indexer::{Block, Indexer, Shared, WAL_SIZE_LIMIT};
use crate::store::journal::Journal;
use crate::store::recent_ids::RecentIds;
use crate::store::unsettled::{Added, Event, Unsettled};

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The journal could not be written or read, or the checkpointer's thread could not
    /// start.
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    /// SQLite has not taken this many journaled records (`store.max_unsettled`): nothing more
    /// is acknowledged until it does.
    #[error("store: {0} records wait for SQLite")]
    Backlog(u64),
}

/// A room's head: its latest seq and the epoch of its log.
#[derive(Debug, Clone)]
pub struct RoomHead {
    /// Latest seq (0 for a new room).
    pub seq: u64,
    /// The log's incarnation; new and random when the room's log starts.
    pub epoch: Arc<str>,
}

/// One thing to write in a group commit.
#[derive(Debug)]
pub enum Draft {
    /// A chat message; with a client id it is de-duplicated.
    Message {
        /// The room.
        room: Arc<str>,
        /// Sender's user id.
        user: Arc<str>,
        /// Sender's display name.
        name: Arc<str>,
        /// The text.
        content: String,
        /// The client's id.
        client_id: Option<String>,
    },
    /// A `join` or `leave` system event.
    Presence {
        /// The room.
        room: Arc<str>,
        /// Who.
        user: Arc<str>,
        /// Their display name.
        name: Arc<str>,
        /// `true` for join, `false` for leave.
        joined: bool,
    },
    /// The room's last member left: it may be empty from now on (see [`LogWriter::sweep`]).
    Vacated {
        /// The room.
        room: Arc<str>,
    },
    /// Read the room's head (creating the room) and, for a join, the history it gets.
    Head {
        /// The room.
        room: Arc<str>,
        /// What history the joiner asked for; `None` reads only the head.
        window: Option<JoinWindow>,
    },
}

/// The history a `join` asks for.
#[derive(Debug, Clone)]
pub struct JoinWindow {
    /// `since` and `epoch` from the join frame.
    pub since: Option<(u64, String)>,
}

/// What a draft became.
#[derive(Debug)]
pub enum Written {
    /// A stored event with its seq and encoded frame.
    Event {
        /// Its seq.
        seq: u64,
        /// Its frame, as delivered and as stored.
        frame: String,
    },
    /// A resent message (same client id, same content): the original's seq; nothing was
    /// stored.
    Duplicate {
        /// The original's seq.
        seq: u64,
    },
    /// The client id is taken by a stored message with other content; nothing was stored.
    Conflict,
    /// A [`Draft::Vacated`] was noted.
    Noted,
    /// The room head, with the join history when asked for.
    Head {
        /// Head and epoch after everything before it in the batch.
        head: RoomHead,
        /// The history for the joiner.
        history: Option<JoinHistory>,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    active_ms INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    user TEXT,
    client_id TEXT,
    frame TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_client_id ON events (room, user, client_id)
    WHERE client_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS settled (lsn INTEGER NOT NULL, db INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS newest (ms INTEGER NOT NULL, lsn INTEGER NOT NULL);
INSERT INTO newest SELECT 0, -1 WHERE NOT EXISTS (SELECT 1 FROM newest);
";

/// `(room, seq)` is unique, and every read of a room's events walks it in seq order. A log made
/// before this index has `events` `WITHOUT ROWID` with that primary key, which serves the same
/// queries and keeps its layout; a new log appends its events in settle order (a rowid table)
/// and indexes them here. In thousands of small rooms the old layout wrote each busy room's last
/// page at every settle and split it every other one; appended rows fill their pages and only
/// the small index entries land in the rooms' pages (docs/BENCHMARKS.md, round 7).
const ROOM_SEQ_INDEX: &str =
    "CREATE UNIQUE INDEX IF NOT EXISTS events_room_seq ON events (room, seq)";

/// Whether `events` is a table of the old layout, keyed by `(room, seq)` itself.
fn events_keyed_by_room(conn: &Connection) -> Result<bool, StoreError> {
    Ok(conn
        .prepare("SELECT 1 FROM pragma_index_list('events') WHERE origin = 'pk'")?
        .exists([])?)
}

/// The tables of a new log, or what an existing log lacks of them.
fn create_schema(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    if !events_keyed_by_room(conn)? {
        conn.execute_batch(ROOM_SEQ_INDEX)?;
    }
    Ok(())
}

/// A page of a room's events between two seqs, oldest first or newest first.
const EVENTS_PAGE: &str = "SELECT seq, frame FROM events WHERE room = ?1 AND seq > ?2 \
     AND seq < ?3 ORDER BY seq LIMIT ?4";
const EVENTS_PAGE_NEWEST: &str = "SELECT seq, frame FROM events WHERE room = ?1 AND seq > ?2 \
     AND seq < ?3 ORDER BY seq DESC LIMIT ?4";

/// The row of `settled` of a new log (after [`migrate`]; a log written before the journal has
/// events and no row).
const SETTLED_ROW: &str = "INSERT INTO settled (lsn, db)
    SELECT 0, random() WHERE NOT EXISTS (SELECT 1 FROM settled)";

/// `newest.ms` is the newest event time SQLite holds as of LSN `newest.lsn` (the indexer writes
/// both with every settle; `RecentIds` knows every write after it). When `settled.lsn` differs
/// (a log from before the table, or written meanwhile by an older version, which keeps only
/// `settled`), it is read from the events once. A table of its own: an older version still opens
/// the log.
const NEWEST_CHECKED: &str = "UPDATE newest SET
    ms = MAX(ms, COALESCE((SELECT MAX(ts_ms) FROM events), 0)),
    lsn = (SELECT lsn FROM settled)
    WHERE lsn != (SELECT lsn FROM settled)";

/// The index [`expire`] reads, kept only while some room has an age limit: without one it
/// would be one more b-tree insert per event that nothing reads. With the room beside the time
/// it answers [`NEWLY_EXPIRED`] alone (an index of the time only did so for the old layout,
/// whose every index holds the primary key; a log that has one keeps it).
const EXPIRY_INDEX: &str = "CREATE INDEX IF NOT EXISTS events_ts ON events (ts_ms, room)";

/// A room's head seq, in a query over `rooms AS r`. Commits do not rewrite `rooms.seq` (unless
/// webhooks read it, [`LogWriter::keep_heads_written`]): in rooms of two that was one more page
/// written per event (7% of the writer's CPU). The head is the highest stored seq, which every
/// commit leaves in place (the trim keeps at least one event); `rooms.seq` holds it from before
/// and is written when expiry deletes every event of a room, so a head never goes back.
pub const ROOM_HEAD: &str =
    "MAX(r.seq, COALESCE((SELECT MAX(e.seq) FROM events AS e WHERE e.room = r.room), 0))";

/// Whether a stored frame is a chat message (not a join/leave event): a room whose log holds
/// none and that has no member is empty. Frames are encoded with `type` first.
const IS_MESSAGE: &str = "frame LIKE '{\"type\":\"message\"%'";

/// Adds `rooms.active_ms` to a log created before it existed; such rooms count as in use
/// from now.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_active: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('rooms') WHERE name = 'active_ms'")?
        .exists([])?;
    if !has_active {
        conn.execute_batch("ALTER TABLE rooms ADD COLUMN active_ms INTEGER NOT NULL DEFAULT 0")?;
        conn.execute("UPDATE rooms SET active_ms = ?1", params![now_ms() as i64])?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS rooms_active ON rooms (active_ms)")?;
    Ok(())
}

/// The original seq of a client id. INDEXED BY: without statistics SQLite prefers the primary
/// key's `room` prefix and would scan the room's whole log for every message with an id (a soak
/// run found it: p99 latency of 44 s once one room held 35 MB).
const DEDUP_LOOKUP: &str = "SELECT seq, frame FROM events INDEXED BY events_client_id \
     WHERE room = ?1 AND user = ?2 AND client_id = ?3 AND ts_ms >= ?4 LIMIT 1";

pub(super) fn open(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // 16 MiB of page cache (the default is 2 MiB): joins read recent history on the writer's
    // connection, and re-reading pages from the OS cache showed up as the top cost under churn.
    conn.pragma_update(None, "cache_size", -16_384)?;
    Ok(conn)
}

/// Opens (creating when needed) the log at `path`: the writer for the sequencer and a pool of
/// readers for history. The journal's blocks that SQLite lacks (acknowledged, never settled:
/// the process died) are written into it first.
pub fn open_log(
    path: &Path,
    synchronous: Synchronous,
    history: &HistoryConfig,
    policies: Arc<Policies>,
) -> Result<(LogWriter, LogReader), StoreError> {
    let conn = open(path, synchronous)?;
    create_schema(&conn)?;
    migrate(&conn)?;
    conn.execute_batch(SETTLED_ROW)?;
    conn.execute_batch(NEWEST_CHECKED)?;
    // Built once when an age limit is set on an existing log; dropped when none is left.
    conn.execute_batch(if policies.ttls().is_empty() {
        "DROP INDEX IF EXISTS events_ts"
    } else {
        EXPIRY_INDEX
    })?;
    // Checkpoints are the checkpointer's (see the module docs).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The indexer touches the last page of every busy room (in the log and in the client-id
    // index): with thousands of small rooms that is tens of MiB, and a page that fell out of
    // the cache is read back from the OS with a system call. 128 MiB, used only as the log grows.
    conn.pragma_update(None, "cache_size", -131_072)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    let (settled, db): (i64, i64) = conn.query_row("SELECT lsn, db FROM settled", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    let settled = settled as u64;
    let mut journal = Journal::open(path, matches!(synchronous, Synchronous::Full), db as u64)?;
    let blocks = journal.replay(settled)?;
    let unsettled = Arc::new(Unsettled::default());
    let shared = Arc::new(Shared {
        settled: AtomicU64::new(settled),
        hold: AtomicBool::new(false),
        crash: AtomicBool::new(false),
        failures: AtomicU64::new(0),
        backlog: AtomicU64::new(0),
        max_unsettled: AtomicU64::new(crate::config::DEFAULT_MAX_UNSETTLED),
        on_settle: Mutex::new(None),
        unsettled: unsettled.clone(),
    });
    let mut indexer = Indexer::new(
        conn,
        path,
        synchronous,
        policies.clone(),
        settled,
        shared.clone(),
    )?;
    let lsn = blocks.last().map_or(settled, |(lsn, _)| *lsn);
    // The journal continues exactly where SQLite stops, or this database and journal do not
    // belong together (a backup of one without the other, a lost file).
    if let Some(gap) = blocks
        .iter()
        .zip(settled + 1..)
        .find(|((lsn, _), want)| lsn != want)
    {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the journal does not continue the database: it holds LSN {} where {} was due \
                 (SQLite holds up to {settled})",
                gap.0 .0, gap.1
            ),
        )));
    }
    if !blocks.is_empty() {
        let events: usize = blocks.iter().map(|(_, records)| records.len()).sum();
        shared.backlog.fetch_add(events as u64, Ordering::SeqCst);
        for (lsn, records) in blocks {
            indexer.add(lsn, records);
        }
        indexer.settle()?;
        tracing::info!(records = events, "read back from the journal");
    }
    let conn = open(path, synchronous)?;
    let newest_ms: i64 = conn.query_row("SELECT ms FROM newest", [], |r| r.get(0))?;
    let writer = LogWriter {
        conn,
        journal,
        lsn,
        heads: HashMap::new(),
        recent: RecentIds::new(DEDUP_WINDOW, newest_ms.max(0) as u64, Instant::now()),
        unsettled: unsettled.clone(),
        shared,
        indexer: Some(indexer),
        blocks: None,
        thread: None,
        policies,
        on_join: history.on_join,
        max_replay: history.max_replay,
        max_replay_bytes: history.max_replay_bytes,
        empty_room_ttl: Duration::from_secs(history.empty_room_ttl_s),
    };
    let reader = LogReader {
        path: path.to_owned(),
        synchronous,
        pool: Mutex::new(Vec::new()),
        unsettled,
    };
    Ok((writer, reader))
}

/// How long the indexer gathers journal blocks before it settles them, by default
/// (`store.settle_ms`).
pub const DEFAULT_SETTLE_EVERY: Duration = Duration::from_millis(crate::config::DEFAULT_SETTLE_MS);

/// The write side of the log. Not shared: the broker's log-writer thread owns it for the
/// node's life.
///
/// It writes no SQLite: each group commit's changes go into one block of the [`Journal`],
/// durable before the batch is answered, then to the [`Unsettled`] view and to the indexer
/// (`store::indexer`), which writes them into SQLite. Its own connection only reads, adding
/// the unsettled view to what it reads.
pub struct LogWriter {
    /// Reads only.
    conn: Connection,
    journal: Journal,
    /// The last block written.
    lsn: u64,
    heads: HashMap<Arc<str>, RoomHead>,
    /// The client ids written lately, to skip the de-duplication lookup of a new one.
    recent: RecentIds,
    unsettled: Arc<Unsettled>,
    shared: Arc<Shared>,
    /// The indexer, until its thread starts (with the first block).
    indexer: Option<Indexer>,
    blocks: Option<SyncSender<Block>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Each room's retention (`history_max_len`, `history_ttl_s`).
    policies: Arc<Policies>,
    on_join: usize,
    max_replay: usize,
    max_replay_bytes: usize,
    empty_room_ttl: Duration,
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn new_epoch() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..8)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A batch's changes, before its block is written.
#[derive(Default)]
struct Changes {
    /// Per room: its new events (a room new to the log with none is here too).
    rooms: HashMap<Arc<str>, Vec<Event>>,
    /// Rooms found in use.
    touched: Vec<Arc<str>>,
    /// Rooms forgotten.
    forgotten: Vec<Arc<str>>,
}

impl LogWriter {
    /// From now on every settle also writes each touched room's head to `rooms.seq`, and the
    /// heads of a log written without it are brought up to date first. The webhook scan
    /// (`webhooks::sqlite`) reads `rooms.seq` for every room several times a second, where
    /// [`ROOM_HEAD`]'s lookup per room cost 6 times as much; without webhooks nothing needs it.
    /// Before the first commit only.
    pub fn keep_heads_written(&mut self) -> Result<(), StoreError> {
        self.indexer
            .as_mut()
            .expect("keep_heads_written before the first commit")
            .keep_heads_written()
    }

    /// How long the indexer gathers journal blocks before it settles them (`store.settle_ms`).
    /// Before the first commit only.
    pub fn set_settle_every(&mut self, every: Duration) {
        self.indexer
            .as_mut()
            .expect("set_settle_every before the first commit")
            .set_settle_every(every);
    }

    /// Called after every settle with its duration (metrics, the webhook deliverer).
    pub fn on_settle(&self, f: impl Fn(Duration) + Send + 'static) {
        *self.shared.on_settle.lock().expect("on_settle lock") = Some(Box::new(f));
    }

    /// At most this many journaled records wait for SQLite (`store.max_unsettled`); past it,
    /// batches fail.
    pub fn set_max_unsettled(&mut self, max: u64) {
        self.shared.max_unsettled.store(max, Ordering::SeqCst);
    }

    /// The test-only switch `hold-settle`: while on, the indexer settles nothing.
    pub fn hold_settles(&self, on: bool) {
        self.shared.hold.store(on, Ordering::SeqCst);
    }

    /// The LSN SQLite holds.
    pub fn settled(&self) -> u64 {
        self.shared.settled.load(Ordering::SeqCst)
    }

    /// Whether SQLite holds every block written so far.
    pub fn is_settled(&self) -> bool {
        self.settled() >= self.lsn
    }

    /// Stores a batch and returns one [`Written`] per draft, in order: its changes as one
    /// block of the journal (durable with `store.synchronous = full`), so what is returned is
    /// acknowledged and survives a crash. On error nothing of the batch is stored and no seq
    /// is consumed.
    pub fn commit(&mut self, drafts: &[Draft]) -> Result<Vec<Written>, StoreError> {
        let backlog = self.shared.backlog.load(Ordering::SeqCst);
        if backlog >= self.shared.max_unsettled.load(Ordering::SeqCst) {
            return Err(StoreError::Backlog(backlog));
        }
        // Nothing noted by an earlier failure may ride along.
        self.journal.discard();
        let mut changes = Changes::default();
        let result = self
            .plan(drafts, &mut changes)
            .and_then(|out| self.write(changes).map(|()| out));
        if result.is_err() {
            self.journal.discard();
            // The cached heads may include seqs of the failed batch.
            self.heads.clear();
        }
        result
    }

    /// Starts the indexer's thread, if it has not started yet (settings such as
    /// [`LogWriter::keep_heads_written`] are made before).
    fn start_indexer(&mut self) -> Result<(), StoreError> {
        if self.blocks.is_none() {
            let Some(indexer) = self.indexer.take() else {
                return Err(StoreError::Io(std::io::Error::other(
                    "the indexer could not start",
                )));
            };
            let (blocks, thread) = indexer.start()?;
            self.blocks = Some(blocks);
            self.thread = Some(thread);
        }
        Ok(())
    }

    /// Writes the noted records as the next block, then tells the unsettled view and the
    /// indexer.
    fn write(&mut self, changes: Changes) -> Result<(), StoreError> {
        if self.journal.is_empty() {
            return Ok(());
        }
        let lsn = self.lsn + 1;
        let noted = self.journal.noted();
        let records = self.journal.write(lsn, self.settled())?;
        self.lsn = lsn;
        self.shared
            .backlog
            .fetch_add(noted as u64, Ordering::SeqCst);
        let added = changes
            .rooms
            .into_iter()
            .map(|(room, events)| {
                let head = &self.heads[&room];
                let max_len = self.policies.for_room(&room).history_max_len;
                Added {
                    floor: (head.seq + 1).saturating_sub(max_len),
                    head: (head.epoch.clone(), head.seq),
                    room,
                    events,
                }
            })
            .collect();
        self.unsettled.add(lsn, added);
        for room in &changes.touched {
            self.unsettled.touch(lsn, room);
        }
        for room in &changes.forgotten {
            self.unsettled.forget(lsn, room);
        }
        self.start_indexer()?;
        let sent = self.blocks.as_ref().map(|b| b.send((lsn, records)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(StoreError::Io(std::io::Error::other(
                "the indexer stopped; the journal keeps the batch",
            )));
        }
        Ok(())
    }

    /// What each draft becomes, with the journal's records and the batch's changes noted.
    fn plan(
        &mut self,
        drafts: &[Draft],
        changes: &mut Changes,
    ) -> Result<Vec<Written>, StoreError> {
        let now = now_ms();
        let ts =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(now)).to_string();
        let conn = &self.conn;
        let journal = &mut self.journal;
        let unsettled = &*self.unsettled;
        let recent = &mut self.recent;
        let clock = Instant::now();
        let mut out = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let written = match draft {
                Draft::Message {
                    room,
                    user,
                    name,
                    content,
                    client_id,
                } => {
                    if let Some(id) = client_id {
                        let since = now.saturating_sub(DEDUP_WINDOW.as_millis() as u64);
                        let found = if recent.may_hold(room, user, id, since) {
                            let pending = changes.rooms.get(room).map_or(&[][..], Vec::as_slice);
                            original(conn, unsettled, pending, room, user, id, since)?
                        } else {
                            None
                        };
                        if let Some((seq, frame)) = found {
                            out.push(if same_content(&frame, content) {
                                Written::Duplicate { seq }
                            } else {
                                Written::Conflict
                            });
                            continue;
                        }
                    }
                    let head = head_of(conn, unsettled, &mut self.heads, journal, changes, room)?;
                    head.seq += 1;
                    let seq = head.seq;
                    let frame = ServerFrame::Message {
                        room,
                        seq,
                        user,
                        name,
                        content,
                        ts: &ts,
                        id: client_id.as_deref(),
                    }
                    .encode();
                    journal.event(room, seq, now, Some(user), client_id.as_deref(), &frame);
                    if let Some(id) = client_id {
                        recent.insert(room, user, id, now, clock);
                    }
                    events_of(changes, room).push(Event {
                        seq,
                        frame: frame.clone(),
                        sender: client_id.as_ref().map(|id| (user.clone(), id.clone())),
                        ts_ms: now,
                    });
                    Written::Event { seq, frame }
                }
                Draft::Presence {
                    room,
                    user,
                    name,
                    joined,
                } => {
                    let head = head_of(conn, unsettled, &mut self.heads, journal, changes, room)?;
                    head.seq += 1;
                    let seq = head.seq;
                    let frame = system_event(room, seq, user, name, *joined, &ts);
                    journal.event(room, seq, now, Some(user), None, &frame);
                    events_of(changes, room).push(Event {
                        seq,
                        frame: frame.clone(),
                        sender: None,
                        ts_ms: now,
                    });
                    Written::Event { seq, frame }
                }
                Draft::Vacated { room } => {
                    journal.active(room, now);
                    changes.touched.push(room.clone());
                    Written::Noted
                }
                Draft::Head { room, window } => {
                    let head =
                        head_of(conn, unsettled, &mut self.heads, journal, changes, room)?.clone();
                    let history = match window {
                        Some(window) => {
                            // This batch's own events so far count too; its trim comes after.
                            let log = Log {
                                conn,
                                unsettled,
                                pending: changes.rooms.get(room).map_or(&[][..], Vec::as_slice),
                                floor: 0,
                            };
                            Some(join_history(
                                &log,
                                room,
                                &head,
                                window,
                                (self.on_join, self.max_replay, self.max_replay_bytes),
                            )?)
                        }
                        None => None,
                    };
                    Written::Head { head, history }
                }
            };
            out.push(written);
        }
        Ok(out)
    }

    /// How often the sequencer calls [`LogWriter::sweep`]: a quarter of
    /// `history.empty_room_ttl_s`, between 1 and 5 seconds.
    pub fn sweep_every(&self) -> Duration {
        crate::broker::log::sweep_every(self.empty_room_ttl)
    }

    /// The retention sweep that needs no traffic: forgets every room that has been empty for
    /// `history.empty_room_ttl_s` (no member, `occupied` says, and no `message` event in its
    /// log): its row and its join/leave events go, so it is no longer listed, and a later join
    /// starts it afresh with a new epoch. A room found in use (members, or messages) counts as
    /// in use from now. A room with unsettled changes was in use just now. Returns how many
    /// rooms were forgotten. (Expiry by age is the indexer's, once a second.)
    pub fn sweep(&mut self, occupied: impl Fn(&str) -> bool) -> Result<usize, StoreError> {
        // The indexer runs expiry, also while nothing is written.
        self.start_indexer()?;
        let mut changes = Changes::default();
        let result = self.sweep_plan(occupied, &mut changes).and_then(|()| {
            let forgotten = changes.forgotten.len();
            self.write(changes).map(|()| forgotten)
        });
        if result.is_err() {
            self.journal.discard();
            self.heads.clear();
        }
        result
    }

    fn sweep_plan(
        &mut self,
        occupied: impl Fn(&str) -> bool,
        changes: &mut Changes,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(self.empty_room_ttl.as_millis() as u64);
        // First the unsettled view, then SQLite (see `store::unsettled`): a room whose last
        // change settles in between is still seen as in use.
        let unsettled = self.unsettled.rooms();
        let candidates: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT room FROM rooms WHERE active_ms <= ?1")?;
            let rows = stmt.query_map(params![cutoff as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for room in candidates {
            if unsettled.contains(room.as_str()) {
                continue;
            }
            let in_use = occupied(&room)
                || self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT 1 FROM events WHERE room = ?1 AND {IS_MESSAGE} LIMIT 1"
                    ))?
                    .exists(params![&room])?;
            let room: Arc<str> = room.into();
            if in_use {
                self.journal.active(&room, now);
                changes.touched.push(room);
            } else {
                self.journal.forget(&room);
                self.heads.remove(&room);
                changes.forgotten.push(room);
            }
        }
        Ok(())
    }

    /// Ends the writer as SIGKILL would: the indexer stops without settling, and nothing is
    /// settled on the way out.
    #[cfg(test)]
    fn crash(self) {
        self.shared.crash.store(true, Ordering::SeqCst);
    }
}

impl Drop for LogWriter {
    /// The indexer settles what it has and stops (the journal would bring it back at the next
    /// start anyway); a log reopened after this sees everything.
    fn drop(&mut self) {
        self.blocks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The original of a resend: the message of `room` from `user` with `client_id` since
/// `since_ms`, in this batch so far (`pending`), unsettled or in SQLite.
fn original(
    conn: &Connection,
    unsettled: &Unsettled,
    pending: &[Event],
    room: &str,
    user: &str,
    client_id: &str,
    since_ms: u64,
) -> Result<Option<(u64, String)>, StoreError> {
    let in_batch = pending.iter().find(|e| {
        e.sender
            .as_ref()
            .is_some_and(|(u, id)| &**u == user && id == client_id)
    });
    if let Some(e) = in_batch {
        return Ok(Some((e.seq, e.frame.clone())));
    }
    // A message retention dropped (below the floor, settled or not) no longer counts.
    let view = unsettled.original(room, user, client_id, since_ms);
    let kept = |found: &(u64, String)| found.0 >= view.floor;
    if let Some(found) = view.found.filter(kept) {
        return Ok(Some(found));
    }
    if view.forgotten {
        return Ok(None);
    }
    let found: Option<(i64, String)> = conn
        .prepare_cached(DEDUP_LOOKUP)?
        .query_row(params![room, user, client_id, since_ms as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(found.map(|(seq, frame)| (seq as u64, frame)).filter(kept))
}

/// Where a room's log is read from: SQLite, the unsettled view and, for the writer, the events
/// of the batch it is planning (`pending`, with the room's `floor` after them).
pub(super) struct Log<'a> {
    /// A connection for SQLite's part.
    pub conn: &'a Connection,
    /// The unsettled view.
    pub unsettled: &'a Unsettled,
    /// The planned batch's events of the room.
    pub pending: &'a [Event],
    /// The lowest seq kept, as of the planned batch (0: the view's own).
    pub floor: u64,
}

/// A room's retained events with `after < seq < before`, oldest first: the `take` nearest
/// `after` (`newest_first`: nearest `before`).
pub(super) fn merged(
    log: &Log<'_>,
    room: &str,
    (after, before): (u64, u64),
    take: usize,
    newest_first: bool,
) -> Result<Vec<(u64, String)>, StoreError> {
    // First the unsettled view, then SQLite (see `store::unsettled`).
    let view = log.unsettled.view(room, after, before);
    let floor = view.floor.max(log.floor);
    // SQLite may still hold rows below the floor (their trim is not settled): the query starts
    // at the floor, or a page would fill up with rows that are then dropped.
    let after = after.max(floor.saturating_sub(1));
    let mut events = view.events;
    events.extend(
        log.pending
            .iter()
            .filter(|e| e.seq > after && e.seq < before)
            .map(|e| (e.seq, e.frame.clone())),
    );
    if !view.forgotten {
        events.extend(select_events(
            log.conn,
            if newest_first {
                EVENTS_PAGE_NEWEST
            } else {
                EVENTS_PAGE
            },
            params![room, sql_seq(after), sql_seq(before), take as i64],
        )?);
    }
    events.retain(|(seq, _)| *seq >= floor);
    events.sort_unstable_by_key(|(seq, _)| *seq);
    events.dedup_by_key(|(seq, _)| *seq);
    if newest_first {
        events.drain(..events.len().saturating_sub(take));
    } else {
        events.truncate(take);
    }
    Ok(events)
}

/// The oldest seq a room's log keeps.
fn oldest(log: &Log<'_>, room: &str) -> Result<Option<u64>, StoreError> {
    let view = log.unsettled.view(room, 0, u64::MAX);
    let floor = view.floor.max(log.floor);
    let mut oldest = view
        .events
        .iter()
        .map(|(seq, _)| *seq)
        .chain(log.pending.iter().map(|e| e.seq))
        .filter(|seq| *seq >= floor)
        .min();
    if !view.forgotten {
        let stored: Option<i64> = log
            .conn
            .prepare_cached("SELECT MIN(seq) FROM events WHERE room = ?1 AND seq >= ?2")?
            .query_row(params![room, sql_seq(floor)], |r| r.get(0))?;
        if let Some(stored) = stored {
            oldest = Some(oldest.map_or(stored as u64, |o| o.min(stored as u64)));
        }
    }
    Ok(oldest)
}

/// The history for a joiner: after `since` when it continues the retained log in the same
/// epoch (at most `max_replay`), otherwise the latest `on_join` events.
fn join_history(
    log: &Log<'_>,
    room: &str,
    head: &RoomHead,
    window: &JoinWindow,
    (on_join, max_replay, max_replay_bytes): (usize, usize, usize),
) -> Result<JoinHistory, StoreError> {
    if let Some((since, epoch)) = &window.since {
        let continuous = match oldest(log, room)? {
            // `since` comes from the client: u64::MAX must not overflow.
            Some(oldest) => since.saturating_add(1) >= oldest,
            None => *since == head.seq,
        };
        if epoch.as_str() == &*head.epoch && *since <= head.seq && continuous {
            let limit = max_replay;
            let mut frames: Vec<String> = merged(log, room, (*since, u64::MAX), limit + 1, false)?
                .into_iter()
                .map(|(_, frame)| frame)
                .collect();
            let truncated = frames.len() > limit;
            frames.truncate(limit);
            let truncated = cap_replay(&mut frames, max_replay_bytes) || truncated;
            return Ok(JoinHistory {
                frames,
                truncated,
                recovered: Some(true),
            });
        }
    }
    let frames = merged(log, room, (0, u64::MAX), on_join, true)?
        .into_iter()
        .map(|(_, frame)| frame)
        .collect();
    Ok(JoinHistory {
        frames,
        truncated: false,
        recovered: window.since.as_ref().map(|_| false),
    })
}

/// A room's new events in this batch (adding the room when it is new to the batch).
fn events_of<'a>(changes: &'a mut Changes, room: &Arc<str>) -> &'a mut Vec<Event> {
    if !changes.rooms.contains_key(room) {
        changes.rooms.insert(room.clone(), Vec::new());
    }
    changes.rooms.get_mut(room).expect("just inserted")
}

/// A room's head from the cache, the unsettled view or SQLite; a room new to the log is
/// created (and journaled).
fn head_of<'a>(
    conn: &Connection,
    unsettled: &Unsettled,
    heads: &'a mut HashMap<Arc<str>, RoomHead>,
    journal: &mut Journal,
    changes: &mut Changes,
    room: &Arc<str>,
) -> Result<&'a mut RoomHead, StoreError> {
    if !heads.contains_key(room) {
        let found = match unsettled.head(room) {
            Some(Some((epoch, seq))) => Some((epoch.to_string(), seq as i64)),
            // Forgotten, and not started again.
            Some(None) => None,
            None => conn
                .prepare_cached(&format!(
                    "SELECT epoch, {ROOM_HEAD} FROM rooms AS r WHERE r.room = ?1"
                ))?
                .query_row(params![&**room], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()?,
        };
        let head = match found {
            Some((epoch, seq)) => RoomHead {
                seq: seq as u64,
                epoch: epoch.into(),
            },
            None => {
                let epoch = new_epoch();
                journal.room(room, &epoch, now_ms());
                // Listed from now on, with or without events.
                events_of(changes, room);
                RoomHead {
                    seq: 0,
                    epoch: epoch.into(),
                }
            }
        };
        heads.insert(room.clone(), head);
    }
    Ok(heads.get_mut(room).expect("just inserted"))
}

/// A seq bound from a client as an SQLite integer: seqs never pass `i64::MAX`, so a larger
/// bound means the same as `i64::MAX` (a plain cast would turn it negative).
fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn select_events(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(u64, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The read side of the log: a small pool of connections used from blocking threads.
pub struct LogReader {
    path: PathBuf,
    synchronous: Synchronous,
    pool: Mutex<Vec<Connection>>,
    /// What the indexer has not settled yet, which these connections cannot see.
    unsettled: Arc<Unsettled>,
}

impl LogReader {
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.pool.lock().expect("reader pool").pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open(&self.path, self.synchronous)?,
        };
        let result = f(&conn);
        let mut pool = self.pool.lock().expect("reader pool");
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }

    /// One page of a room's log, oldest first. A room with no events gives an empty page.
    pub fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        let limit = query.limit as usize;
        let range = (query.after.unwrap_or(0), query.before.unwrap_or(u64::MAX));
        // The events nearest the page's origin: the newest paging back, the oldest forward.
        let newest_first = query.after.is_none();
        let events = self.with_conn(|conn| {
            let log = Log {
                conn,
                unsettled: &self.unsettled,
                pending: &[],
                floor: 0,
            };
            merged(&log, room, range, limit + 1, newest_first)
        })?;
        let more = events.len() > limit;
        let mut frames: Vec<String> = events.into_iter().map(|(_, frame)| frame).collect();
        if newest_first {
            frames.drain(..frames.len().saturating_sub(limit));
        } else {
            frames.truncate(limit);
        }
        Ok(Page { frames, more })
    }

    /// Every room the log knows (it has had an event or a member), sorted by name, with its
    /// head: the `rooms` table and one index lookup per room, and the unsettled rooms.
    pub fn rooms(&self) -> Result<Vec<StoredRoom>, StoreError> {
        // First the unsettled view, then SQLite (see `store::unsettled`).
        let listed = self.unsettled.listed();
        let rooms: Vec<StoredRoom> = self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT r.room, {ROOM_HEAD} FROM rooms AS r ORDER BY r.room"
            ))?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredRoom {
                    room: r.get(0)?,
                    seq: r.get::<_, i64>(1)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        if listed.is_empty() {
            return Ok(rooms);
        }
        let mut heads: std::collections::BTreeMap<String, u64> =
            rooms.into_iter().map(|r| (r.room, r.seq)).collect();
        for (room, head, forgotten) in listed {
            if forgotten {
                heads.remove(&room);
            }
            if let Some(seq) = head {
                let at = heads.entry(room).or_insert(0);
                *at = (*at).max(seq);
            }
        }
        Ok(heads
            .into_iter()
            .map(|(room, seq)| StoredRoom { room, seq })
            .collect())
    }

    /// Whether the database answers.
    pub fn check(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.query_row("SELECT COUNT(*) FROM rooms WHERE 0", [], |_| Ok(()))?;
            Ok(())
        })
    }
}

/// Whether a stored message frame carries `content`: a resend, or new text under a used id.
fn same_content(frame: &str, content: &str) -> bool {
    matches!(
        parley_protocol::received::parse(frame),
        Ok(parley_protocol::received::Received::Message(m)) if m.content == content
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::indexer::{expire, insert, CHECKPOINT_EVERY, FIRST_YOUNG, NEWLY_EXPIRED};

    fn message(room: &str, content: &str) -> Draft {
        Draft::Message {
            room: room.into(),
            user: "u".into(),
            name: "u".into(),
            content: content.into(),
            client_id: Some(format!("id-{content}")),
        }
    }

    fn stored_seqs(written: Vec<Written>) -> Vec<u64> {
        written
            .into_iter()
            .map(|w| match w {
                Written::Event { seq, .. } => seq,
                other => panic!("not stored: {other:?}"),
            })
            .collect()
    }

    fn head(writer: &mut LogWriter, room: &str) -> RoomHead {
        let written = writer
            .commit(&[Draft::Head {
                room: room.into(),
                window: None,
            }])
            .unwrap();
        match written.into_iter().next() {
            Some(Written::Head { head, .. }) => head,
            other => panic!("no head: {other:?}"),
        }
    }

    /// Waits (a bounded while) until SQLite holds every block written.
    fn wait_settled(writer: &LogWriter) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !writer.is_settled() {
            assert!(std::time::Instant::now() < deadline, "never settled");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The default settings with one age limit: `ttl_s` for the rooms matching `pattern`.
    fn ttl_config(pattern: &str, ttl_s: u64) -> crate::config::Config {
        crate::config::Config {
            rooms: vec![crate::config::RoomSection {
                pattern: pattern.into(),
                history_ttl_s: Some(ttl_s),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The log at `path` with the default settings.
    fn open_default(path: &Path) -> (LogWriter, LogReader) {
        open_with(path, &crate::config::Config::default())
    }

    /// The log at `path` with `config`'s history settings and room policies.
    fn open_with(path: &Path, config: &crate::config::Config) -> (LogWriter, LogReader) {
        let policies = Arc::new(Policies::from_config(config).unwrap());
        open_log(path, Synchronous::Full, &config.history, policies).unwrap()
    }

    /// Whether the log has the index `name`.
    fn has_index(conn: &Connection, name: &str) -> bool {
        conn.prepare("SELECT 1 FROM sqlite_master WHERE name = ?1")
            .unwrap()
            .exists([name])
            .unwrap()
    }

    /// A write connection of the test's own (the log's indexer idle).
    fn write_conn(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    fn contents(reader: &LogReader, room: &str) -> Vec<String> {
        let page = reader
            .page(
                room,
                PageQuery {
                    limit: 50,
                    ..PageQuery::default()
                },
            )
            .unwrap();
        page.frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f).unwrap();
                format!("{}:{}", v["seq"], v["content"].as_str().unwrap_or(""))
            })
            .collect()
    }

    /// What group commits acknowledged comes back from the journal when the process dies
    /// before the indexer settles it (SQLite itself never had it): the same seqs under the
    /// same epoch, and the next message takes the next seq. Readers see it before the settle
    /// too.
    #[test]
    fn acknowledged_batches_outlive_a_crash_before_the_settle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let open = || {
            let (writer, reader) = open_default(&path);
            writer.hold_settles(true);
            (writer, reader)
        };
        let (mut writer, reader) = open();
        let epoch = head(&mut writer, "r").epoch;
        assert_eq!(
            stored_seqs(
                writer
                    .commit(&[message("r", "a"), message("r", "b")])
                    .unwrap()
            ),
            [1, 2]
        );
        assert_eq!(
            stored_seqs(writer.commit(&[message("r", "c")]).unwrap()),
            [3]
        );
        let want = ["1:a", "2:b", "3:c"];
        assert_eq!(
            contents(&reader, "r"),
            want,
            "readers see what is not settled"
        );
        assert_eq!(reader.rooms().unwrap()[0].seq, 3);
        let in_sqlite = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(in_sqlite(&path), 0, "nothing is settled yet");

        writer.crash();
        drop(reader);
        assert_eq!(in_sqlite(&path), 0, "the crash settled nothing");
        let (mut writer, reader) = open();
        assert_eq!(
            in_sqlite(&path),
            3,
            "read back from the journal and settled"
        );
        assert_eq!(contents(&reader, "r"), want);
        let after = head(&mut writer, "r");
        assert_eq!((after.seq, after.epoch), (3, epoch));
        assert_eq!(
            stored_seqs(writer.commit(&[message("r", "d")]).unwrap()),
            [4]
        );
        // A resend of an acknowledged message is still known.
        assert!(matches!(
            writer.commit(&[message("r", "b")]).unwrap()[0],
            Written::Duplicate { seq: 2 }
        ));
    }

    /// A message with a new client id skips the lookup (`RecentIds`), but a resend of one
    /// stored before the log was opened is still found: in a log written by this version, by
    /// one before table `newest`, by one before the journal (no `settled`), and in a log that
    /// an older version wrote to after this one (it moves `settled.lsn`, not `newest`).
    #[test]
    fn resends_of_messages_stored_before_the_opening_are_duplicates() {
        let long_ago = now_ms() - 3 * DEDUP_WINDOW.as_millis() as u64;
        let frame = |seq: u64, content: &str| {
            ServerFrame::Message {
                room: "r",
                seq,
                user: "u",
                name: "u",
                content,
                ts: "t",
                id: Some(&format!("id-{content}")),
            }
            .encode()
        };
        let older_version_wrote = format!(
            "UPDATE newest SET ms = {long_ago};
             INSERT INTO events (room, seq, ts_ms, user, client_id, frame)
                 VALUES ('r', 3, {}, 'u', 'id-x', '{}');
             UPDATE settled SET lsn = lsn + 1;",
            now_ms(),
            frame(3, "x")
        );
        for older in [
            "",
            "DROP TABLE newest",
            "DROP TABLE settled; DROP TABLE newest",
            &older_version_wrote,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.db");
            let (mut writer, _reader) = open_default(&path);
            assert_eq!(
                stored_seqs(
                    writer
                        .commit(&[message("r", "a"), message("r", "b")])
                        .unwrap()
                ),
                [1, 2]
            );
            wait_settled(&writer);
            drop(writer);
            write_conn(&path).execute_batch(older).unwrap();

            let (mut writer, _reader) = open_default(&path);
            let resent = if older.contains("id-x") {
                ("x", 3)
            } else {
                ("b", 2)
            };
            let again = writer
                .commit(&[message("r", resent.0), message("r", "c"), message("r", "c")])
                .unwrap();
            let next = if older.contains("id-x") { 4 } else { 3 };
            assert!(
                matches!(again[..], [Written::Duplicate { seq }, Written::Event { seq: n, .. }, Written::Duplicate { seq: d }] if seq == resent.1 && n == next && d == next),
                "{older:?}: {again:?}"
            );
        }
    }

    /// The indexer settles once half of `store.max_unsettled` waits, however young its
    /// transaction: the writer refuses batches past the bound, and SQLite is healthy.
    #[test]
    fn the_backlog_settles_before_it_reaches_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _reader) = open_default(&dir.path().join("b.db"));
        writer.set_settle_every(Duration::from_secs(600));
        writer.set_max_unsettled(4_000);
        let batch: Vec<Draft> = (0..2_000).map(|i| message("r", &format!("m{i}"))).collect();
        writer.commit(&batch).unwrap();
        wait_settled(&writer);
        writer.commit(&batch[..1_000]).unwrap();
    }

    /// SQLite refusing the indexer's writes (here a trigger, as a full disk would) loses
    /// nothing acknowledged: the writer goes on, readers see every event, and once SQLite takes
    /// writes again the indexer writes the blocks again and settles them.
    #[test]
    fn acknowledged_batches_wait_for_a_failing_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let (mut writer, reader) = open_default(&path);
        writer
            .indexer
            .as_ref()
            .unwrap()
            .conn()
            .execute_batch(
                "CREATE TABLE fail (x); INSERT INTO fail VALUES (1); \
                 CREATE TEMP TRIGGER boom BEFORE INSERT ON events \
                 WHEN EXISTS (SELECT 1 FROM main.fail) BEGIN SELECT RAISE(ABORT, 'boom'); END;",
            )
            .unwrap();
        assert_eq!(
            stored_seqs(
                writer
                    .commit(&[message("r", "a"), message("r", "b")])
                    .unwrap()
            ),
            [1, 2]
        );
        assert_eq!(
            stored_seqs(writer.commit(&[message("r", "c")]).unwrap()),
            [3]
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while writer.shared.failures.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the indexer never failed"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(writer.settled(), 0, "nothing settled while SQLite refuses");
        assert_eq!(contents(&reader, "r"), ["1:a", "2:b", "3:c"]);
        assert_eq!(
            stored_seqs(writer.commit(&[message("r", "d")]).unwrap()),
            [4]
        );

        write_conn(&path).execute("DELETE FROM fail", []).unwrap();
        wait_settled(&writer);
        let in_sqlite: i64 = write_conn(&path)
            .query_row("SELECT COUNT(*) FROM events WHERE room = 'r'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(in_sqlite, 4);
        assert_eq!(contents(&reader, "r"), ["1:a", "2:b", "3:c", "4:d"]);
        assert_eq!(
            writer.shared.backlog.load(Ordering::SeqCst),
            0,
            "nothing waits for SQLite"
        );
    }

    /// A page starts at the lowest seq the room keeps even while SQLite still holds rows below
    /// it (their trim is not settled): it must not fill up with rows that are then dropped and
    /// skip the kept ones.
    #[test]
    fn pages_start_at_the_kept_events_while_a_trim_is_unsettled() {
        use crate::config::Config;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut config = Config::default();
        config.history.max_len = 5;
        let policies = Arc::new(Policies::from_config(&config).unwrap());
        let (mut writer, reader) =
            open_log(&path, Synchronous::Normal, &config.history, policies).unwrap();
        let names: Vec<String> = (1..=11).map(|n| format!("m{n}")).collect();
        let batch = |from: usize, to: usize| -> Vec<Draft> {
            names[from - 1..to]
                .iter()
                .map(|c| message("r", c))
                .collect()
        };
        writer.commit(&batch(1, 8)).unwrap();
        wait_settled(&writer);
        // SQLite holds 4..=8; the next three move the floor to 7, unsettled.
        writer.hold_settles(true);
        writer.commit(&batch(9, 11)).unwrap();
        let page = reader
            .page(
                "r",
                PageQuery {
                    before: None,
                    after: Some(0),
                    limit: 2,
                },
            )
            .unwrap();
        let seqs: Vec<u64> = page
            .frames
            .iter()
            .map(|f| {
                serde_json::from_str::<serde_json::Value>(f).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!((seqs, page.more), (vec![7, 8], true));
        assert_eq!(
            contents(&reader, "r"),
            ["7:m7", "8:m8", "9:m9", "10:m10", "11:m11"]
        );
    }

    /// Age limits per room: each room loses what is older than its own limit, one pass after
    /// another (each reading only what expired since the previous one), and never a hole.
    #[test]
    fn expiry_follows_each_rooms_own_age_limit() {
        use crate::config::{Config, RoomSection};
        let config = Config {
            rooms: vec![
                RoomSection {
                    pattern: "fast-*".into(),
                    history_ttl_s: Some(10),
                    ..RoomSection::default()
                },
                RoomSection {
                    pattern: "slow-*".into(),
                    history_ttl_s: Some(100),
                    ..RoomSection::default()
                },
            ],
            ..Config::default()
        };
        let policies = Policies::from_config(&config).unwrap();
        let ttls = policies.ttls();
        assert_eq!(ttls, [10, 100]);
        for old in [false, true] {
            let conn = Connection::open_in_memory().unwrap();
            if old {
                conn.execute_batch(OLD_EVENTS).unwrap();
            }
            create_schema(&conn).unwrap();
            conn.execute_batch(EXPIRY_INDEX).unwrap();
            expiry_by_age_limit(&conn, &policies, &ttls);
        }
    }

    /// [`expire`] on `conn` (either layout), with `fast-*` at 10 s and `slow-*` at 100 s.
    fn expiry_by_age_limit(conn: &Connection, policies: &Policies, ttls: &[u64]) {
        let add = |room: &str, seq: u64, ts_s: u64| {
            insert(conn, room, seq, ts_s * 1000, None, None, "{}").unwrap();
        };
        let kept = |room: &str| -> Vec<u64> {
            let mut stmt = conn
                .prepare("SELECT seq FROM events WHERE room = ?1 ORDER BY seq")
                .unwrap();
            let rows = stmt
                .query_map(params![room], |r| r.get::<_, i64>(0))
                .unwrap();
            rows.map(|r| r.unwrap() as u64).collect()
        };
        for room in ["fast-1", "slow-1", "other"] {
            add(room, 1, 1000);
            add(room, 2, 1050);
        }
        // A clock that stepped back: seq 4 is older than seq 3.
        add("fast-1", 3, 1095);
        add("fast-1", 4, 1060);
        expire(conn, policies, ttls, 0, 1_070_000).unwrap();
        assert_eq!(
            kept("fast-1"),
            [3, 4],
            "older than 10 s, below the first young one"
        );
        assert_eq!(kept("slow-1"), [1, 2]);
        assert_eq!(kept("other"), [1, 2], "no age limit");
        // The next pass reads what expired since: seq 3 now, and seq 4 above it with it.
        expire(conn, policies, ttls, 1_070_000, 1_106_000).unwrap();
        assert_eq!(kept("fast-1"), Vec::<u64>::new());
        assert_eq!(kept("slow-1"), [2], "seq 1 is older than 100 s");
        expire(conn, policies, ttls, 1_106_000, 1_140_000).unwrap();
        assert_eq!(kept("slow-1"), [2], "seq 2 is not");
        expire(conn, policies, ttls, 1_140_000, 1_151_000).unwrap();
        assert_eq!(kept("slow-1"), Vec::<u64>::new());
        assert_eq!(kept("other"), [1, 2]);
    }

    /// An idle node whose rooms have an age limit still expires (once a second, in a settle of
    /// its own when no block is waiting), and that settle is reported like any other: the
    /// webhook deliverer and the settle metric hear of it.
    #[test]
    fn an_idle_log_with_age_limits_settles_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _reader) = open_with(&dir.path().join("e.db"), &ttl_config("fast-*", 10));
        let settles = Arc::new(AtomicU64::new(0));
        let seen = settles.clone();
        writer.on_settle(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        // The room's creation is the one block, settled first; every settle after it is
        // expiry's alone.
        head(&mut writer, "fast-1");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while settles.load(Ordering::SeqCst) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "no settle reported on an idle log with age limits"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Commits do not write `rooms.seq` (the head is [`ROOM_HEAD`]): a room whose every event
    /// expired keeps its head across a restart, and the next event takes the next seq, never
    /// one already shown.
    #[test]
    fn a_room_emptied_by_expiry_keeps_its_head_across_a_restart() {
        use crate::config::Config;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let mut config = Config::default();
        config.history.ttl_s = 60;
        let policies = Arc::new(Policies::from_config(&config).unwrap());
        let open = || {
            open_log(
                &path,
                Synchronous::Normal,
                &config.history,
                policies.clone(),
            )
            .unwrap()
        };
        let message = |n: usize| Draft::Message {
            room: "r".into(),
            user: "u".into(),
            name: "u".into(),
            content: format!("m{n}"),
            client_id: None,
        };
        let seqs = |written: Vec<Written>| -> Vec<u64> {
            written
                .into_iter()
                .map(|w| match w {
                    Written::Event { seq, .. } => seq,
                    other => panic!("not stored: {other:?}"),
                })
                .collect()
        };
        let (mut writer, reader) = open();
        assert_eq!(
            seqs(
                writer
                    .commit(&[message(1), message(2), message(3)])
                    .unwrap()
            ),
            [1, 2, 3]
        );
        let head = |reader: &LogReader| reader.rooms().unwrap()[0].seq;
        assert_eq!(head(&reader), 3, "the head is the highest stored seq");
        // An hour later every event has expired.
        wait_settled(&writer);
        let later = now_ms() + 3_600_000;
        let conn = write_conn(&path);
        expire(&conn, &policies, &policies.ttls(), 0, later).unwrap();
        let left: i64 = conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "expiry emptied the room");
        assert_eq!(head(&reader), 3, "the head outlives the events");
        drop(writer);
        drop(reader);
        let (mut writer, reader) = open();
        assert_eq!(head(&reader), 3);
        assert_eq!(
            seqs(writer.commit(&[message(4)]).unwrap()),
            [4],
            "seq 4, not seq 1 again"
        );
    }

    /// The writer never checkpoints (`wal_autocheckpoint = 0`); the checkpointer copies the WAL
    /// back into the database file once [`CHECKPOINT_EVERY`] events are written, so the file
    /// grows while the writer goes on.
    #[test]
    fn the_checkpointer_copies_the_wal_back() {
        let dir = std::env::temp_dir().join(format!("parley-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.db");
        let config = crate::config::Config::default();
        let (mut writer, _) = open_log(
            &path,
            Synchronous::Normal,
            &config.history,
            Arc::new(Policies::from_config(&config).unwrap()),
        )
        .unwrap();
        let auto: i64 = writer
            .indexer
            .as_ref()
            .unwrap()
            .conn()
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            auto, 0,
            "the indexer leaves checkpoints to the checkpointer"
        );
        let before = std::fs::metadata(&path).unwrap().len();
        let room: Arc<str> = "r".into();
        let user: Arc<str> = "u".into();
        for chunk in 0..CHECKPOINT_EVERY.div_ceil(100) {
            let drafts: Vec<Draft> = (0..100)
                .map(|i| Draft::Message {
                    room: room.clone(),
                    user: user.clone(),
                    name: user.clone(),
                    content: format!("message {chunk}-{i} {}", "x".repeat(200)),
                    client_id: Some(format!("c{chunk}-{i}")),
                })
                .collect();
            writer.commit(&drafts).unwrap();
        }
        // The checkpointer is woken by settles.
        wait_settled(&writer);
        // The checkpointer works on its own thread: wait for the file to take the pages.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file never grew: no checkpoint ran"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Without webhooks `rooms.seq` is not written per commit; [`LogWriter::keep_heads_written`]
    /// brings every head up to date and keeps it so, for the webhook scan that reads it.
    #[test]
    fn heads_are_written_for_the_webhook_scan_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::default();
        let policies = Arc::new(Policies::from_config(&config).unwrap());
        let open = || {
            open_log(
                &dir.path().join("w.db"),
                Synchronous::Normal,
                &config.history,
                policies.clone(),
            )
            .unwrap()
            .0
        };
        let mut writer = open();
        let message = |room: &str| Draft::Message {
            room: room.into(),
            user: "u".into(),
            name: "u".into(),
            content: "hi".into(),
            client_id: None,
        };
        let stored = |writer: &LogWriter, room: &str| -> i64 {
            writer
                .conn
                .query_row("SELECT seq FROM rooms WHERE room = ?1", [room], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        writer.commit(&[message("a"), message("a")]).unwrap();
        wait_settled(&writer);
        assert_eq!(stored(&writer, "a"), 0, "not written without webhooks");
        drop(writer);
        let mut writer = open();
        writer.keep_heads_written().unwrap();
        assert_eq!(stored(&writer, "a"), 2, "brought up to date");
        writer.commit(&[message("a"), message("b")]).unwrap();
        wait_settled(&writer);
        assert_eq!((stored(&writer, "a"), stored(&writer, "b")), (3, 1));
    }

    /// `events_ts` exists only while some room has an age limit: without one it is not
    /// written at every event; setting one later builds it, and expiry works on the old events.
    #[test]
    fn the_expiry_index_follows_the_age_limits() {
        use crate::config::Config;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let open = |config: &Config| {
            let policies = Arc::new(Policies::from_config(config).unwrap());
            open_log(&path, Synchronous::Normal, &config.history, policies).unwrap()
        };
        let plain = Config::default();
        let (mut writer, _) = open(&plain);
        assert!(
            !has_index(&writer.conn, "events_ts"),
            "no age limit: no index"
        );
        let draft = Draft::Message {
            room: "old-1".into(),
            user: "u".into(),
            name: "u".into(),
            content: "hello".into(),
            client_id: None,
        };
        writer.commit(&[draft]).unwrap();
        drop(writer);
        let limited = ttl_config("old-*", 60);
        let (writer, reader) = open(&limited);
        assert!(
            has_index(&writer.conn, "events_ts"),
            "a room has an age limit: the index is built"
        );
        let later = now_ms() + 3_600_000;
        expire(
            &write_conn(&path),
            &writer.policies,
            &writer.policies.ttls(),
            0,
            later,
        )
        .unwrap();
        assert_eq!(
            reader
                .page(
                    "old-1",
                    PageQuery {
                        before: None,
                        after: None,
                        limit: 10
                    }
                )
                .unwrap()
                .frames
                .len(),
            0,
            "the event older than the limit went"
        );
        drop(writer);
        let (writer, _) = open(&plain);
        assert!(
            !has_index(&writer.conn, "events_ts"),
            "the limit is gone: so is the index"
        );
    }

    #[test]
    fn dedup_lookup_and_expiry_use_their_indexes() {
        let dir = std::env::temp_dir().join(format!("parley-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = crate::config::Config::default();
        config.history.ttl_s = 3600;
        let (writer, _) = open_log(
            &dir.join("p.db"),
            Synchronous::Normal,
            &config.history,
            Arc::new(Policies::from_config(&config).unwrap()),
        )
        .unwrap();
        let plan_of = |sql| plan(&writer.conn, sql);
        let plan = plan_of(DEDUP_LOOKUP);
        assert!(plan.contains("events_client_id"), "{plan}");
        let plan = plan_of(NEWLY_EXPIRED);
        assert!(plan.contains("events_ts"), "{plan}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `events` as logs made before `events_room_seq` have it.
    const OLD_EVENTS: &str = "CREATE TABLE events (room TEXT NOT NULL, seq INTEGER NOT NULL, \
         ts_ms INTEGER NOT NULL, user TEXT, client_id TEXT, frame TEXT NOT NULL, \
         PRIMARY KEY (room, seq)) WITHOUT ROWID";

    /// SQLite's plan for `sql`, every step's detail on one line.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let n = stmt.parameter_count();
        let args = (0..n).map(|i| {
            if i == 0 {
                "r".to_owned()
            } else {
                "1".to_owned()
            }
        });
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
    }

    /// A new log appends its events (a rowid table) and indexes them by `(room, seq)`; a log
    /// of the old layout keeps its `(room, seq)` primary key and gets no second index. Either
    /// way every read of one room's events searches it by room, never scans the table, and
    /// both serve the same pages, across a reopening too.
    #[test]
    fn both_layouts_read_a_room_s_events_by_room_and_seq() {
        for (old, ttl_s) in [(false, 0), (true, 0), (false, 60), (true, 60)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("l.db");
            if old {
                write_conn(&path).execute_batch(OLD_EVENTS).unwrap();
            }
            // With an age limit `events_ts` exists, which the room's reads must not take.
            let config = if ttl_s > 0 {
                ttl_config("*", ttl_s)
            } else {
                crate::config::Config::default()
            };
            let (mut writer, reader) = open_with(&path, &config);
            assert_eq!(events_keyed_by_room(&writer.conn).unwrap(), old);
            assert_eq!(
                has_index(&writer.conn, "events_room_seq"),
                !old,
                "old layout: {old}"
            );
            let by_room = if old {
                "PRIMARY KEY (room=?"
            } else {
                "INDEX events_room_seq (room=?"
            };
            let head = format!("SELECT {ROOM_HEAD} FROM rooms AS r WHERE r.room = ?1");
            for sql in [EVENTS_PAGE, EVENTS_PAGE_NEWEST, FIRST_YOUNG, &head] {
                let plan = plan(&writer.conn, sql);
                let steps: Vec<&str> = plan
                    .split("; ")
                    .filter(|step| step.starts_with("SEARCH e") || step.starts_with("SCAN e"))
                    .collect();
                assert!(
                    !steps.is_empty()
                        && steps
                            .iter()
                            .all(|step| step.starts_with("SEARCH") && step.contains(by_room)),
                    "old layout: {old}: {sql}: {plan}"
                );
            }
            writer
                .commit(&[message("r", "a"), message("s", "b"), message("r", "c")])
                .unwrap();
            wait_settled(&writer);
            assert_eq!(contents(&reader, "r"), ["1:a", "2:c"]);
            if ttl_s > 0 {
                let plan = plan(&writer.conn, NEWLY_EXPIRED);
                assert!(
                    plan.contains("COVERING INDEX events_ts"),
                    "old layout: {old}: {plan}"
                );
            }
            drop((writer, reader));
            let (mut writer, reader) = open_with(&path, &config);
            assert_eq!(events_keyed_by_room(&writer.conn).unwrap(), old);
            writer.commit(&[message("r", "d")]).unwrap();
            wait_settled(&writer);
            assert_eq!(contents(&reader, "r"), ["1:a", "2:c", "3:d"]);
            assert_eq!(contents(&reader, "s"), ["1:b"]);
        }
    }
}
