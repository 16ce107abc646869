//! The single-node durable log in SQLite (WAL mode). One [`LogWriter`] owns the write
//! connection and is driven by the broker's log-writer thread: it assigns each room's next seq
//! in its open transaction, which stores the events of every group commit and commits (settles)
//! every `store.settle_ms`; each group commit is made durable before its ack by one block of
//! the [`Journal`], from which a crash's unsettled events are read back. Readers use their own
//! connections (with the [`Unsettled`] view of the open transaction) and never block the
//! writer.
//!
//! Schema: `rooms(room, epoch, seq, active_ms)` holds the epoch of each room's log, its head
//! as of the last time expiry emptied it (the head itself is [`ROOM_HEAD`]) and when it was
//! last known in use (created, or left by its last member), for the sweep that forgets empty
//! rooms ([`LogWriter::sweep`]);
//! `events(room, seq, ts_ms, user, client_id, frame)` holds the encoded frame of every retained
//! event, so history is served without re-encoding.
//!
//! Checkpoints (copying the WAL back into the database file) run on a thread of their own with
//! its own connection (`Checkpointer`), not in the writer's commits: in rooms of two each
//! message dirties pages all over the file, and a checkpoint every 1,000 pages inside a commit
//! (SQLite's default) made one commit in five take 50-400 ms on a busy disk, which stalled
//! every room behind it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_protocol::server::ServerFrame;
use rusqlite::{params, Connection, OptionalExtension};

use crate::broker::log::{
    cap_replay, system_event, JoinHistory, Page, PageQuery, StoredRoom, DEDUP_WINDOW,
};
use crate::config::{HistoryConfig, Synchronous};
use crate::policy::Policies;
use crate::store::journal::{Journal, Record};
use crate::store::unsettled::{Added, Unsettled};

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
    frame TEXT NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_client_id ON events (room, user, client_id)
    WHERE client_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS settled (generation INTEGER NOT NULL);
INSERT INTO settled SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM settled);
";

/// Most events one open transaction gathers before it settles, however young: their dirty
/// pages stay well within the writer's page cache.
const SETTLE_EVENTS: usize = 32_768;

/// The index [`expire`] reads, kept only while some room has an age limit: without one it
/// would be one more b-tree insert per event that nothing reads.
const EXPIRY_INDEX: &str = "CREATE INDEX IF NOT EXISTS events_ts ON events (ts_ms)";

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

fn open(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
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

/// WAL frames past which the writer stops to checkpoint itself (a `RESTART` checkpoint, which
/// finishes the copy and makes the next commit start the WAL over): 65,536 pages of 4 KiB,
/// 256 MiB. A passive checkpoint that never quite catches up with a busy writer leaves the WAL
/// growing; this bounds it.
const MAX_WAL_FRAMES: u64 = 65_536;

/// Events written between two wake-ups of the checkpointer. A pass copies each page once, in
/// its latest version, however often the commits since the last pass rewrote it: in rooms of
/// two every event dirties a page of its own room, and one room's last page takes a dozen
/// events, so passes far apart copy far fewer pages. At 1,000 the checkpointer read and wrote
/// 1.2 pages per event; at 8,192, 0.44 (`examples/store_load.rs`, docs/BENCHMARKS.md). Passes
/// still come every third of a second at 25,000 events a second, and the WAL stays far below
/// [`MAX_WAL_FRAMES`].
const CHECKPOINT_EVERY: usize = 8_192;

/// After a checkpoint, SQLite truncates a WAL file larger than this: just above the largest
/// the WAL grows to ([`MAX_WAL_FRAMES`] frames of a 4 KiB page and its 24-byte header), so a
/// busy log reuses its WAL's blocks instead of truncating them and writing into new ones (a
/// write into a new block costs the kernel a block allocation and zeroing the page: 10% of the
/// node's CPU at 25,000 messages a second).
const WAL_SIZE_LIMIT: i64 = 288 << 20;

/// Copies the WAL back into the database file, on its own thread and connection, after every
/// [`CHECKPOINT_EVERY`] events and after each sweep (a `PASSIVE` checkpoint: it never blocks
/// the writer or readers). Once
/// everything is copied back, the writer's next transaction starts the WAL over. The thread
/// ends when the writer is dropped.
struct Checkpointer {
    wake: SyncSender<()>,
    /// Frames in the WAL, as of the last checkpoint.
    frames: Arc<AtomicU64>,
}

impl Checkpointer {
    fn start(path: &Path, synchronous: Synchronous) -> Result<Checkpointer, StoreError> {
        let conn = open(path, synchronous)?;
        let (wake, woken) = sync_channel::<()>(1);
        let frames = Arc::new(AtomicU64::new(0));
        let seen = frames.clone();
        std::thread::Builder::new()
            .name("parley-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let result = conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
                    match result {
                        Ok(log) => seen.store(log.max(0) as u64, Ordering::Relaxed),
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                    }
                }
            })?;
        Ok(Checkpointer { wake, frames })
    }

    /// Asks for a checkpoint (one that is already asked for covers this commit too).
    fn wake(&self) {
        // Full: one is pending already. Disconnected: the thread is gone with the writer.
        let _ = self.wake.try_send(());
    }
}

/// The journal of the log at `path`: `<path>-acks`.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-acks");
    PathBuf::from(name)
}

/// Opens (creating when needed) the log at `path`: the writer for the sequencer and a pool of
/// readers for history. What the journal holds of the last generation (acknowledged, never
/// settled: the process died) is settled first.
pub fn open_log(
    path: &Path,
    synchronous: Synchronous,
    history: &HistoryConfig,
    policies: Arc<Policies>,
) -> Result<(LogWriter, LogReader), StoreError> {
    let conn = open(path, synchronous)?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    // Built once when an age limit is set on an existing log; dropped when none is left.
    let ttls = policies.ttls();
    conn.execute_batch(if ttls.is_empty() {
        "DROP INDEX IF EXISTS events_ts"
    } else {
        EXPIRY_INDEX
    })?;
    // Checkpoints are the checkpointer's (see the module docs).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The writer touches the last page of every busy room (in the log and in the client-id
    // index): with thousands of small rooms that is tens of MiB, and a page that fell out of
    // the cache is read back from the OS with a system call. 128 MiB, used only as the log grows.
    conn.pragma_update(None, "cache_size", -131_072)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    let checkpointer = Checkpointer::start(path, synchronous)?;
    let generation: i64 = conn.query_row("SELECT generation FROM settled", [], |r| r.get(0))?;
    let journal = Journal::open(
        &journal_path(path),
        matches!(synchronous, Synchronous::Full),
    )?;
    let unsettled = Arc::new(Unsettled::default());
    let mut writer = LogWriter {
        conn,
        checkpointer,
        journal,
        generation: generation as u64,
        opened: None,
        open_events: 0,
        lost: true,
        settle_every: DEFAULT_SETTLE_EVERY,
        unsettled: unsettled.clone(),
        unchecked: 0,
        heads: HashMap::new(),
        ttls,
        policies,
        last_sweep_ms: 0,
        on_join: history.on_join,
        max_replay: history.max_replay,
        max_replay_bytes: history.max_replay_bytes,
        empty_room_ttl: Duration::from_secs(history.empty_room_ttl_s),
        write_heads: false,
    };
    // `lost`: the open transaction is the journal's, read back now.
    writer.settle()?;
    let reader = LogReader {
        path: path.to_owned(),
        synchronous,
        pool: Mutex::new(Vec::new()),
        unsettled,
    };
    Ok((writer, reader))
}

/// How long the writer's transaction stays open by default (`store.settle_ms`).
pub const DEFAULT_SETTLE_EVERY: Duration = Duration::from_millis(200);

/// The write side of the log. Not shared: the broker's log-writer thread owns it for the
/// node's life.
///
/// Its connection keeps one transaction open across group commits: each commit is a
/// savepoint in it, made durable by the [`Journal`] before it is answered, and the
/// transaction itself commits (*settles*) every `store.settle_ms` ([`LogWriter::settle`]).
pub struct LogWriter {
    conn: Connection,
    checkpointer: Checkpointer,
    journal: Journal,
    /// The generation SQLite holds: the journal's blocks of it are not settled yet.
    generation: u64,
    /// When the open transaction began; `None`: none is open.
    opened: Option<Instant>,
    /// Events in the open transaction.
    open_events: usize,
    /// SQLite rolled the open transaction back on an error (a full disk, an I/O error):
    /// what it held is read back from the journal before anything else.
    lost: bool,
    settle_every: Duration,
    /// What readers see of the open transaction.
    unsettled: Arc<Unsettled>,
    /// Events written since the checkpointer was last woken.
    unchecked: usize,
    heads: HashMap<Arc<str>, RoomHead>,
    /// Each room's retention (`history_max_len`, `history_ttl_s`).
    policies: Arc<Policies>,
    /// Every age limit some room has ([`Policies::ttls`]); empty: nothing expires.
    ttls: Vec<u64>,
    /// When expired events were last dropped ([`expire`]); 0 before the first time.
    last_sweep_ms: u64,
    on_join: usize,
    max_replay: usize,
    max_replay_bytes: usize,
    empty_room_ttl: Duration,
    /// Whether commits keep `rooms.seq` equal to the head ([`LogWriter::keep_heads_written`]).
    write_heads: bool,
}

fn now_ms() -> u64 {
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

impl LogWriter {
    /// From now on every commit also writes each touched room's head to `rooms.seq`, and the
    /// heads of a log written without it are brought up to date first. The webhook scan
    /// (`webhooks::sqlite`) reads `rooms.seq` for every room several times a second, where
    /// [`ROOM_HEAD`]'s lookup per room cost 6 times as much; without webhooks nothing needs it.
    pub fn keep_heads_written(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute(&format!("UPDATE rooms AS r SET seq = {ROOM_HEAD}"), [])?;
        self.write_heads = true;
        Ok(())
    }

    /// How long the transaction stays open before it settles (`store.settle_ms`).
    pub fn set_settle_every(&mut self, every: Duration) {
        self.settle_every = every;
    }

    /// Stores a batch and returns one [`Written`] per draft, in order: its statements in the
    /// open transaction, then one block of the journal (durable with `store.synchronous =
    /// full`), so what is returned is acknowledged and survives a crash. On error nothing of
    /// the batch is stored and no seq is consumed: the open transaction is rolled back, and
    /// what earlier batches put in it is read back from the journal before the next batch.
    /// (A savepoint per batch would spare that rare replay, but it copies every page a batch
    /// changes into a statement journal first: 15% of the writer's time.)
    pub fn commit(&mut self, drafts: &[Draft]) -> Result<Vec<Written>, StoreError> {
        if self.lost {
            self.recover()?;
        }
        if self.opened.is_none() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.opened = Some(Instant::now());
        }
        let result = self.commit_inner(drafts).and_then(|done| {
            self.journal.write()?;
            Ok(done)
        });
        match result {
            Ok((out, added, expired)) => {
                if let Some(now) = expired {
                    self.last_sweep_ms = now;
                }
                self.open_events += drafts.len();
                self.unsettled.add(added);
                Ok(out)
            }
            Err(e) => {
                self.journal.discard();
                self.abandon();
                Err(e)
            }
        }
    }

    /// Whether the open transaction is due to settle (or a lost one to be read back).
    pub fn settle_due(&self) -> bool {
        self.lost
            || self.opened.is_some_and(|at| {
                at.elapsed() >= self.settle_every || self.open_events >= SETTLE_EVENTS
            })
    }

    /// When the open transaction is due to settle; `None`: nothing is open.
    pub fn settle_at(&self) -> Option<Instant> {
        if self.lost {
            return Some(Instant::now());
        }
        self.opened.map(|at| at + self.settle_every)
    }

    /// Commits the open transaction, with the next generation: from then on SQLite holds
    /// everything acknowledged, and the journal starts over. Returns whether anything was
    /// settled (readers can see new events).
    pub fn settle(&mut self) -> Result<bool, StoreError> {
        if self.lost {
            self.recover()?;
        }
        if self.opened.is_none() {
            return Ok(false);
        }
        let next = self.generation + 1;
        let result = self
            .conn
            .execute("UPDATE settled SET generation = ?1", params![next as i64])
            .and_then(|_| self.conn.execute_batch("COMMIT"));
        if let Err(e) = result {
            self.abandon();
            return Err(e.into());
        }
        self.opened = None;
        self.generation = next;
        self.journal.restart(next);
        self.unsettled.clear();
        self.unchecked += std::mem::take(&mut self.open_events);
        if self.unchecked >= CHECKPOINT_EVERY {
            self.checkpoint();
        }
        Ok(true)
    }

    /// Gives the open transaction up (as a crash would): the journal still has it, and the
    /// next commit or settle reads it back.
    fn abandon(&mut self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback failed");
            }
        }
        self.heads.clear();
        self.opened = None;
        self.lost = true;
    }

    /// Reads the journal's blocks of the current generation back into a new open
    /// transaction: at open, what a dead process acknowledged; later, what a transaction
    /// SQLite rolled back held.
    fn recover(&mut self) -> Result<(), StoreError> {
        self.abandon();
        // Expired events the lost transaction deleted are found again by a first full pass.
        self.last_sweep_ms = 0;
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = self
            .journal
            .replay(self.generation)
            .map_err(StoreError::from)
            .and_then(|records| self.apply(&records).map(|()| records.len()));
        match result {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(records = n, "read back from the journal");
                }
                self.opened = Some(Instant::now());
                self.open_events = n;
                self.lost = false;
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Replays journal records on the open transaction, with the trim of each room they
    /// touched.
    fn apply(&self, records: &[Record]) -> Result<(), StoreError> {
        let mut heads: HashMap<&str, u64> = HashMap::new();
        for record in records {
            match record {
                Record::Room {
                    room,
                    epoch,
                    active_ms,
                } => {
                    self.conn
                        .prepare_cached(
                            "INSERT INTO rooms (room, epoch, seq, active_ms) VALUES (?1, ?2, 0, ?3)",
                        )?
                        .execute(params![room, epoch, *active_ms as i64])?;
                }
                Record::Event {
                    room,
                    seq,
                    ts_ms,
                    user,
                    client_id,
                    frame,
                } => {
                    insert(
                        &self.conn,
                        room,
                        *seq,
                        *ts_ms,
                        user.as_deref(),
                        client_id.as_deref(),
                        frame,
                    )?;
                    heads.insert(room, *seq);
                }
                Record::Vacated { room, active_ms } => {
                    self.conn
                        .prepare_cached("UPDATE rooms SET active_ms = ?2 WHERE room = ?1")?
                        .execute(params![room, *active_ms as i64])?;
                }
            }
        }
        for (room, seq) in heads {
            if self.write_heads {
                self.conn
                    .prepare_cached("UPDATE rooms SET seq = ?2 WHERE room = ?1")?
                    .execute(params![room, seq as i64])?;
            }
            trim(&self.conn, &self.policies, room, seq)?;
        }
        Ok(())
    }

    /// Hands the WAL to the checkpointer; past [`MAX_WAL_FRAMES`] checkpoints here and waits.
    fn checkpoint(&mut self) {
        self.unchecked = 0;
        if self.checkpointer.frames.load(Ordering::Relaxed) > MAX_WAL_FRAMES {
            match self
                .conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
            {
                // The first column is 1 when the checkpoint could not finish (a reader, or
                // the checkpointer's own PASSIVE pass, held it): the WAL is still long.
                Ok(0) => self.checkpointer.frames.store(0, Ordering::Relaxed),
                Ok(_) => tracing::warn!("WAL checkpoint busy; retried after the next commits"),
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
            }
        }
        self.checkpointer.wake();
    }

    /// A batch's statements, on the open transaction, with its journal records: what each
    /// draft became, each touched room's part for the readers, and when expiry ran.
    #[allow(clippy::type_complexity)]
    fn commit_inner(
        &mut self,
        drafts: &[Draft],
    ) -> Result<(Vec<Written>, Vec<Added>, Option<u64>), StoreError> {
        let now = now_ms();
        let ts =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(now)).to_string();
        let conn = &self.conn;
        let journal = &mut self.journal;
        let mut out = Vec::with_capacity(drafts.len());
        let mut touched: HashMap<Arc<str>, Vec<(u64, String)>> = HashMap::new();
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
                        let original: Option<(i64, String)> = conn
                            .prepare_cached(DEDUP_LOOKUP)?
                            .query_row(params![&**room, &**user, id, since as i64], |r| {
                                Ok((r.get(0)?, r.get(1)?))
                            })
                            .optional()?;
                        if let Some((seq, frame)) = original {
                            out.push(if same_content(&frame, content) {
                                Written::Duplicate { seq: seq as u64 }
                            } else {
                                Written::Conflict
                            });
                            continue;
                        }
                    }
                    let head = head_of(conn, &mut self.heads, journal, room)?;
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
                    insert(
                        conn,
                        room,
                        seq,
                        now,
                        Some(user),
                        client_id.as_deref(),
                        &frame,
                    )?;
                    journal.event(room, seq, now, Some(user), client_id.as_deref(), &frame);
                    events_of(&mut touched, room).push((seq, frame.clone()));
                    Written::Event { seq, frame }
                }
                Draft::Presence {
                    room,
                    user,
                    name,
                    joined,
                } => {
                    let head = head_of(conn, &mut self.heads, journal, room)?;
                    head.seq += 1;
                    let seq = head.seq;
                    let frame = system_event(room, seq, user, name, *joined, &ts);
                    insert(conn, room, seq, now, Some(user), None, &frame)?;
                    journal.event(room, seq, now, Some(user), None, &frame);
                    events_of(&mut touched, room).push((seq, frame.clone()));
                    Written::Event { seq, frame }
                }
                Draft::Vacated { room } => {
                    conn.prepare_cached("UPDATE rooms SET active_ms = ?2 WHERE room = ?1")?
                        .execute(params![&**room, now as i64])?;
                    journal.vacated(room, now);
                    Written::Noted
                }
                Draft::Head { room, window } => {
                    let head = head_of(conn, &mut self.heads, journal, room)?.clone();
                    // A new room is listed from now on.
                    events_of(&mut touched, room);
                    let history = match window {
                        Some(window) => Some(join_history(
                            conn,
                            room,
                            &head,
                            window,
                            (self.on_join, self.max_replay, self.max_replay_bytes),
                        )?),
                        None => None,
                    };
                    Written::Head { head, history }
                }
            };
            out.push(written);
        }
        // `rooms.seq` is written only for the webhook scan (see [`ROOM_HEAD`]): the trim keeps
        // the latest `history_max_len` (at least 1) events, so the highest stored seq stays
        // the head.
        let mut added = Vec::with_capacity(touched.len());
        for (room, events) in touched {
            let seq = self.heads[&room].seq;
            if !events.is_empty() {
                if self.write_heads {
                    conn.prepare_cached("UPDATE rooms SET seq = ?2 WHERE room = ?1")?
                        .execute(params![&*room, seq as i64])?;
                }
                trim(conn, &self.policies, &room, seq)?;
            }
            let max_len = self.policies.for_room(&room).history_max_len;
            added.push(Added {
                floor: (seq + 1).saturating_sub(max_len),
                head: seq,
                room,
                events,
            });
        }
        let expiring = !self.ttls.is_empty() && now >= self.last_sweep_ms + 1000;
        if expiring {
            added.extend(expire(
                conn,
                &self.policies,
                &self.ttls,
                self.last_sweep_ms,
                now,
            )?);
        }
        Ok((out, added, expiring.then_some(now)))
    }

    /// How often the sequencer calls [`LogWriter::sweep`]: a quarter of
    /// `history.empty_room_ttl_s`, between 1 and 5 seconds.
    pub fn sweep_every(&self) -> Duration {
        crate::broker::log::sweep_every(self.empty_room_ttl)
    }

    /// The retention sweep that needs no traffic: drops events older than `history.ttl_s`
    /// and forgets every room that has been empty for `history.empty_room_ttl_s` (no member,
    /// `occupied` says, and no `message` event in its log): its row and its join/leave events
    /// go, so it is no longer listed, and a later join starts it afresh with a new epoch. A
    /// room found in use (members, or messages) counts as in use from now. Returns how many
    /// rooms were forgotten.
    ///
    /// It runs in the open transaction, which settles at once when a room was forgotten: the
    /// journal must never hold a room's events from before the sweep forgot it beside those
    /// of its next life. (A crash before that settle loses the sweep only, which runs again.)
    pub fn sweep(&mut self, occupied: impl Fn(&str) -> bool) -> Result<usize, StoreError> {
        if self.lost {
            self.recover()?;
        }
        if self.opened.is_none() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.opened = Some(Instant::now());
        }
        let now = now_ms();
        let result = self.sweep_inner(occupied, now);
        // Forgotten rooms must not live on in the cache of heads.
        self.heads.clear();
        match result {
            Ok(forgotten) => {
                self.last_sweep_ms = now;
                if forgotten > 0 {
                    self.settle()?;
                }
                Ok(forgotten)
            }
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    fn sweep_inner(
        &mut self,
        occupied: impl Fn(&str) -> bool,
        now: u64,
    ) -> Result<usize, StoreError> {
        let tx = &self.conn;
        let cut = expire(tx, &self.policies, &self.ttls, self.last_sweep_ms, now)?;
        self.unsettled.add(cut);
        let cutoff = now.saturating_sub(self.empty_room_ttl.as_millis() as u64);
        let candidates: Vec<String> = {
            let mut stmt = tx.prepare_cached("SELECT room FROM rooms WHERE active_ms <= ?1")?;
            let rows = stmt.query_map(params![cutoff as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut forgotten = 0;
        for room in candidates {
            let has_message = occupied(&room)
                || tx
                    .prepare_cached(&format!(
                        "SELECT 1 FROM events WHERE room = ?1 AND {IS_MESSAGE} LIMIT 1"
                    ))?
                    .exists(params![&room])?;
            if has_message {
                tx.prepare_cached("UPDATE rooms SET active_ms = ?2 WHERE room = ?1")?
                    .execute(params![&room, now as i64])?;
            } else {
                tx.prepare_cached("DELETE FROM events WHERE room = ?1")?
                    .execute(params![&room])?;
                tx.prepare_cached("DELETE FROM rooms WHERE room = ?1")?
                    .execute(params![&room])?;
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }
}

impl LogWriter {
    /// Ends the writer as SIGKILL would: the open transaction never commits and nothing is
    /// settled on the way out.
    #[cfg(test)]
    fn crash(self) {
        let _ = self.conn.execute_batch("ROLLBACK");
        std::mem::forget(self);
    }
}

impl Drop for LogWriter {
    /// A node that stops settles what it acknowledged (the journal would bring it back at
    /// the next start anyway).
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            tracing::warn!(error = %e, "the last settle failed; the journal keeps it");
        }
    }
}

/// The rooms with an event whose time lies in a range: one pass of [`expire`] over one age
/// limit reads the range of `events_ts` that expired since the previous pass, never the
/// events that rooms with a longer limit (or none) keep.
const NEWLY_EXPIRED: &str = "SELECT DISTINCT room FROM events WHERE ts_ms >= ?1 AND ts_ms < ?2";

/// Drops the events that outlived their room's `history_ttl_s`, one age limit `T` at a time
/// (rooms have their own, from their policy): the rooms with an event that turned older than
/// `T` since the previous pass at `last_ms` (an index range over `events.ts_ms` as wide as the
/// time between passes; everything older at the first pass) and whose limit is `T`. Per room,
/// only the events below its first young one in seq order go: a clock that stepped back must
/// not cut a hole (the oldest kept seq decides `recovered`), and an old event kept above a
/// young one goes when that one expires. The walk in seq order (NOT INDEXED: the primary key)
/// reads about what it deletes.
///
/// Returns each room it cut with the lowest seq left (`u64::MAX`: none), for the readers
/// ([`Unsettled`]) until the cut settles.
fn expire(
    tx: &Connection,
    policies: &Policies,
    ttls: &[u64],
    last_ms: u64,
    now: u64,
) -> Result<Vec<Added>, StoreError> {
    let mut cut = Vec::new();
    for &ttl_s in ttls {
        let ttl_ms = ttl_s.saturating_mul(1000);
        let cutoff = now.saturating_sub(ttl_ms);
        let from = last_ms.saturating_sub(ttl_ms);
        let rooms: Vec<String> = {
            let mut stmt = tx.prepare_cached(NEWLY_EXPIRED)?;
            let rows = stmt.query_map(params![from as i64, cutoff as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for room in rooms
            .iter()
            .filter(|room| policies.for_room(room).history_ttl_s == ttl_s)
        {
            let young: Option<i64> = tx
                .prepare_cached(
                    "SELECT seq FROM events NOT INDEXED WHERE room = ?1 AND ts_ms >= ?2 \
                     ORDER BY seq LIMIT 1",
                )?
                .query_row(params![room, cutoff as i64], |r| r.get(0))
                .optional()?;
            if young.is_none() {
                // Every event goes: the head must outlive them (see [`ROOM_HEAD`]).
                tx.prepare_cached(&format!(
                    "UPDATE rooms AS r SET seq = {ROOM_HEAD} WHERE r.room = ?1"
                ))?
                .execute(params![room])?;
            }
            let gone = tx
                .prepare_cached("DELETE FROM events WHERE room = ?1 AND seq < ?2")?
                .execute(params![room, young.unwrap_or(i64::MAX)])?;
            if gone > 0 {
                cut.push(Added {
                    room: room.as_str().into(),
                    head: 0,
                    floor: young.map_or(u64::MAX, |seq| seq as u64),
                    events: Vec::new(),
                });
            }
        }
    }
    Ok(cut)
}

/// The history for a joiner: after `since` when it continues the retained log in the same
/// epoch (at most `max_replay`), otherwise the latest `on_join` events.
fn join_history(
    tx: &Connection,
    room: &str,
    head: &RoomHead,
    window: &JoinWindow,
    (on_join, max_replay, max_replay_bytes): (usize, usize, usize),
) -> Result<JoinHistory, StoreError> {
    if let Some((since, epoch)) = &window.since {
        let oldest: Option<i64> = tx
            .prepare_cached("SELECT MIN(seq) FROM events WHERE room = ?1")?
            .query_row(params![room], |r| r.get(0))?;
        let continuous = match oldest {
            // `since` comes from the client: u64::MAX must not overflow.
            Some(oldest) => since.saturating_add(1) >= oldest as u64,
            None => *since == head.seq,
        };
        if epoch.as_str() == &*head.epoch && *since <= head.seq && continuous {
            let limit = max_replay;
            let frames = select_frames(
                tx,
                "SELECT frame FROM events WHERE room = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                params![room, *since as i64, (limit + 1) as i64],
            )?;
            let mut frames = frames;
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
    let mut frames = select_frames(
        tx,
        "SELECT frame FROM events WHERE room = ?1 ORDER BY seq DESC LIMIT ?2",
        params![room, on_join as i64],
    )?;
    frames.reverse();
    Ok(JoinHistory {
        frames,
        truncated: false,
        recovered: window.since.as_ref().map(|_| false),
    })
}

/// A touched room's new events (adding the room when it is new to the batch).
fn events_of<'a>(
    touched: &'a mut HashMap<Arc<str>, Vec<(u64, String)>>,
    room: &Arc<str>,
) -> &'a mut Vec<(u64, String)> {
    if !touched.contains_key(room) {
        touched.insert(room.clone(), Vec::new());
    }
    touched.get_mut(room).expect("just inserted")
}

/// Drops what `room`'s `history_max_len` no longer keeps below its head `seq`.
fn trim(conn: &Connection, policies: &Policies, room: &str, seq: u64) -> Result<(), StoreError> {
    let max_len = policies.for_room(room).history_max_len;
    if seq > max_len {
        conn.prepare_cached("DELETE FROM events WHERE room = ?1 AND seq <= ?2")?
            .execute(params![room, (seq - max_len) as i64])?;
    }
    Ok(())
}

/// A room's head from the cache, or from SQLite; a room new to the log is created (and
/// journaled).
fn head_of<'a>(
    tx: &Connection,
    heads: &'a mut HashMap<Arc<str>, RoomHead>,
    journal: &mut Journal,
    room: &Arc<str>,
) -> Result<&'a mut RoomHead, StoreError> {
    if !heads.contains_key(room) {
        let found = tx
            .prepare_cached(&format!(
                "SELECT epoch, {ROOM_HEAD} FROM rooms AS r WHERE r.room = ?1"
            ))?
            .query_row(params![&**room], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()?;
        let head = match found {
            Some((epoch, seq)) => RoomHead {
                seq: seq as u64,
                epoch: epoch.into(),
            },
            None => {
                let epoch = new_epoch();
                let now = now_ms();
                tx.prepare_cached(
                    "INSERT INTO rooms (room, epoch, seq, active_ms) VALUES (?1, ?2, 0, ?3)",
                )?
                .execute(params![&**room, &epoch, now as i64])?;
                journal.room(room, &epoch, now);
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

fn insert(
    tx: &Connection,
    room: &str,
    seq: u64,
    ts_ms: u64,
    user: Option<&str>,
    client_id: Option<&str>,
    frame: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO events (room, seq, ts_ms, user, client_id, frame) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        room,
        seq as i64,
        ts_ms as i64,
        user,
        client_id,
        frame
    ])?;
    Ok(())
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

fn select_frames(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The read side of the log: a small pool of connections used from blocking threads.
pub struct LogReader {
    path: PathBuf,
    synchronous: Synchronous,
    pool: Mutex<Vec<Connection>>,
    /// The writer's open transaction, which these connections cannot see.
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
        let take = (limit + 1) as i64;
        let before = query.before.unwrap_or(u64::MAX);
        let after = query.after.unwrap_or(0);
        // First the unsettled view, then SQLite (see `store::unsettled`).
        let (mut events, floor) = self.unsettled.events(room, after, before);
        let descending = query.after.is_none();
        let stored = self.with_conn(|conn| {
            select_events(
                conn,
                if descending {
                    "SELECT seq, frame FROM events WHERE room = ?1 AND seq > ?2 AND seq < ?3 \
                     ORDER BY seq DESC LIMIT ?4"
                } else {
                    "SELECT seq, frame FROM events WHERE room = ?1 AND seq > ?2 AND seq < ?3 \
                     ORDER BY seq LIMIT ?4"
                },
                params![room, sql_seq(after), sql_seq(before), take],
            )
        })?;
        events.extend(stored);
        events.retain(|(seq, _)| *seq >= floor);
        events.sort_unstable_by_key(|(seq, _)| *seq);
        events.dedup_by_key(|(seq, _)| *seq);
        // The events nearest the page's origin: the newest paging back, the oldest forward.
        let more = events.len() > limit;
        if descending {
            events.drain(..events.len().saturating_sub(limit));
        } else {
            events.truncate(limit);
        }
        Ok(Page {
            frames: events.into_iter().map(|(_, frame)| frame).collect(),
            more,
        })
    }

    /// Every room the log knows (it has had an event or a member), sorted by name, with its
    /// head: the `rooms` table and one index lookup per room, and the unsettled rooms.
    pub fn rooms(&self) -> Result<Vec<StoredRoom>, StoreError> {
        let unsettled = self.unsettled.heads();
        let mut rooms: Vec<StoredRoom> = self.with_conn(|conn| {
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
        if !unsettled.is_empty() {
            let mut heads: HashMap<String, u64> =
                rooms.drain(..).map(|r| (r.room, r.seq)).collect();
            for (room, seq) in unsettled {
                let head = heads.entry(room).or_insert(0);
                *head = (*head).max(seq);
            }
            rooms = heads
                .into_iter()
                .map(|(room, seq)| StoredRoom { room, seq })
                .collect();
            rooms.sort_unstable_by(|a, b| a.room.cmp(&b.room));
        }
        Ok(rooms)
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
    /// before the open transaction settles (SQLite itself never had it): the same seqs under
    /// the same epoch, and the next message takes the next seq. Readers see it before the
    /// settle too.
    #[test]
    fn acknowledged_batches_outlive_a_crash_before_the_settle() {
        use crate::config::Config;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let config = Config::default();
        let policies = Arc::new(Policies::from_config(&config).unwrap());
        let open = || {
            let (mut writer, reader) =
                open_log(&path, Synchronous::Full, &config.history, policies.clone()).unwrap();
            writer.set_settle_every(Duration::from_secs(3600));
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
            "readers see the open transaction"
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
        assert_eq!(in_sqlite(&path), 0, "the crash took the open transaction");
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

    /// A batch that fails takes the open transaction down with it, but not the batches
    /// acknowledged before it in that transaction: they are read back from the journal, and
    /// the failed batch used no seq.
    #[test]
    fn a_failed_batch_leaves_the_batches_before_it_stored() {
        use crate::config::Config;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let config = Config::default();
        let policies = Arc::new(Policies::from_config(&config).unwrap());
        let (mut writer, reader) =
            open_log(&path, Synchronous::Full, &config.history, policies).unwrap();
        writer.set_settle_every(Duration::from_secs(3600));
        writer
            .conn
            .execute_batch(
                "CREATE TEMP TRIGGER boom BEFORE INSERT ON events \
                 WHEN NEW.frame LIKE '%boom%' BEGIN SELECT RAISE(ABORT, 'boom'); END;",
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
        assert!(writer
            .commit(&[message("r", "c"), message("r", "boom")])
            .is_err());
        assert_eq!(
            stored_seqs(writer.commit(&[message("r", "d")]).unwrap()),
            [3]
        );
        assert_eq!(contents(&reader, "r"), ["1:a", "2:b", "3:d"]);
        assert!(writer.settle().unwrap());
        assert_eq!(contents(&reader, "r"), ["1:a", "2:b", "3:d"]);
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
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(EXPIRY_INDEX).unwrap();
        let add = |room: &str, seq: u64, ts_s: u64| {
            insert(&conn, room, seq, ts_s * 1000, None, None, "{}").unwrap();
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
        expire(&conn, &policies, &ttls, 0, 1_070_000).unwrap();
        assert_eq!(
            kept("fast-1"),
            [3, 4],
            "older than 10 s, below the first young one"
        );
        assert_eq!(kept("slow-1"), [1, 2]);
        assert_eq!(kept("other"), [1, 2], "no age limit");
        // The next pass reads what expired since: seq 3 now, and seq 4 above it with it.
        expire(&conn, &policies, &ttls, 1_070_000, 1_106_000).unwrap();
        assert_eq!(kept("fast-1"), Vec::<u64>::new());
        assert_eq!(kept("slow-1"), [2], "seq 1 is older than 100 s");
        expire(&conn, &policies, &ttls, 1_106_000, 1_140_000).unwrap();
        assert_eq!(kept("slow-1"), [2], "seq 2 is not");
        expire(&conn, &policies, &ttls, 1_140_000, 1_151_000).unwrap();
        assert_eq!(kept("slow-1"), Vec::<u64>::new());
        assert_eq!(kept("other"), [1, 2]);
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
        let later = now_ms() + 3_600_000;
        expire(&writer.conn, &policies, &policies.ttls(), 0, later).unwrap();
        let left: i64 = writer
            .conn
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
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 0, "the writer leaves checkpoints to the checkpointer");
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
        assert!(writer.settle().unwrap());
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
        let (mut writer, _) = open_log(
            &dir.path().join("w.db"),
            Synchronous::Normal,
            &config.history,
            policies,
        )
        .unwrap();
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
        assert_eq!(stored(&writer, "a"), 0, "not written without webhooks");
        writer.keep_heads_written().unwrap();
        assert_eq!(stored(&writer, "a"), 2, "brought up to date");
        writer.commit(&[message("a"), message("b")]).unwrap();
        assert_eq!((stored(&writer, "a"), stored(&writer, "b")), (3, 1));
    }

    /// `events_ts` exists only while some room has an age limit: without one it is not
    /// written at every event; setting one later builds it, and expiry works on the old events.
    #[test]
    fn the_expiry_index_follows_the_age_limits() {
        use crate::config::{Config, RoomSection};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let has_index = |writer: &LogWriter| -> bool {
            writer
                .conn
                .prepare("SELECT 1 FROM sqlite_master WHERE name = 'events_ts'")
                .unwrap()
                .exists([])
                .unwrap()
        };
        let open = |config: &Config| {
            let policies = Arc::new(Policies::from_config(config).unwrap());
            open_log(&path, Synchronous::Normal, &config.history, policies).unwrap()
        };
        let plain = Config::default();
        let (mut writer, _) = open(&plain);
        assert!(!has_index(&writer), "no age limit: no index");
        let draft = Draft::Message {
            room: "old-1".into(),
            user: "u".into(),
            name: "u".into(),
            content: "hello".into(),
            client_id: None,
        };
        writer.commit(&[draft]).unwrap();
        drop(writer);
        let limited = Config {
            rooms: vec![RoomSection {
                pattern: "old-*".into(),
                history_ttl_s: Some(60),
                ..RoomSection::default()
            }],
            ..Config::default()
        };
        let (writer, reader) = open(&limited);
        assert!(
            has_index(&writer),
            "a room has an age limit: the index is built"
        );
        let later = now_ms() + 3_600_000;
        expire(&writer.conn, &writer.policies, &writer.ttls, 0, later).unwrap();
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
        assert!(!has_index(&writer), "the limit is gone: so is the index");
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
        let plan: String = writer
            .conn
            .query_row(
                &format!("EXPLAIN QUERY PLAN {DEDUP_LOOKUP}"),
                params!["r", "u", "c", 0],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("events_client_id"), "{plan}");
        let plan: String = writer
            .conn
            .query_row(
                &format!("EXPLAIN QUERY PLAN {NEWLY_EXPIRED}"),
                params![0, 1],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("events_ts"), "{plan}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
