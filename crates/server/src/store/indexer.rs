//! The indexer: the one writer of the SQLite log, on a thread of its own.
//!
//! The log writer (`store::sqlite::LogWriter`) acknowledges a group commit once its block is in
//! the journal, then hands the block here. The indexer keeps the blocks it gets and writes them
//! into SQLite in one transaction (it "settles" them) when the first is `store.settle_ms` old,
//! or they hold [`SETTLE_EVENTS`] events, or (while they are few, [`QUIET_EVENTS`]) when no
//! block came for [`QUIET`]: in rooms of two every event dirties a page of its own room, and a
//! settle writes each page once however many events dirtied it. A settle writes the records
//! room by room (each room's in LSN order: the rooms created, the events, the rooms in use or
//! forgotten), then each touched room's trim to `history_max_len`, expiry at most once a
//! second, and the LSN it reached (table `settled`, and with the newest event time in table
//! `newest`); then the readers' [`Unsettled`] view drops what it committed. A settle takes
//! hundreds of milliseconds under load, and nothing waits for it: acks depend on the journal
//! only.
//!
//! A transaction SQLite refuses (a locked or full database, an I/O error) is rolled back and its
//! blocks, kept in memory until they settle, are written again at the next attempt, a tenth of
//! a second later: nothing acknowledged waits on SQLite meanwhile.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};

use super::journal::Record;
use super::sqlite::{now_ms, open, StoreError, ROOM_HEAD};
use super::unsettled::Unsettled;
use crate::config::Synchronous;
use crate::policy::Policies;

/// Most events the indexer keeps before it settles them, however young.
const SETTLE_EVENTS: usize = 131_072;

/// How long the indexer waits for another block before it settles a few.
pub const QUIET: Duration = Duration::from_millis(10);

/// Blocks holding at least this many records wait for `store.settle_ms` (or
/// [`SETTLE_EVENTS`]) even in a pause: under load a settle writes each dirty page once however
/// many events dirtied it, and a busy machine pauses the writer often enough that settling on
/// every pause wrote about one page per event (dm25k in docs/BENCHMARKS.md).
const QUIET_EVENTS: usize = 1024;

/// How long after a failed settle the indexer tries again.
const RETRY: Duration = Duration::from_millis(100);

/// Called after each settle with its duration.
pub type OnSettle = Box<dyn Fn(Duration) + Send>;

/// A journal block for the indexer: its LSN and its records' bytes.
pub type Block = (u64, Vec<u8>);

/// What the log writer and the indexer share.
pub struct Shared {
    /// The LSN SQLite holds.
    pub settled: AtomicU64,
    /// The test-only switch `hold-settle`: no settle while set.
    pub hold: AtomicBool,
    /// Stop without settling (a test's crash).
    pub crash: AtomicBool,
    /// Settles SQLite refused (rolled back, to be written again).
    pub failures: AtomicU64,
    /// Records journaled and not settled yet.
    pub backlog: AtomicU64,
    /// `store.max_unsettled`: the writer refuses batches past it, so the indexer settles once
    /// the backlog reaches half of it, however young its blocks.
    pub max_unsettled: AtomicU64,
    /// Called after each settle with its duration (metrics, the webhook deliverer).
    pub on_settle: Mutex<Option<OnSettle>>,
    /// What readers see of the unsettled blocks.
    pub unsettled: Arc<Unsettled>,
}

/// The SQLite write side.
pub struct Indexer {
    conn: Connection,
    checkpointer: Checkpointer,
    policies: Arc<Policies>,
    /// Every age limit some room has; empty: nothing expires.
    ttls: Vec<u64>,
    /// When expiry last ran; 0 before the first time.
    last_expire_ms: u64,
    /// Commits keep `rooms.seq` equal to the head (webhooks read it).
    write_heads: bool,
    /// The blocks SQLite does not hold yet (kept until a settle commits them).
    open: Vec<(u64, Vec<Record>)>,
    /// When the first of `open` came; `None`: `open` is empty.
    opened: Option<Instant>,
    open_events: usize,
    /// The last settle failed: the next attempt is due then ([`RETRY`] later).
    retry_at: Option<Instant>,
    /// The LSN SQLite holds.
    settled: u64,
    /// Events settled since the checkpointer was last woken.
    unchecked: usize,
    settle_every: Duration,
    shared: Arc<Shared>,
}

impl Indexer {
    /// The indexer on the log's write connection, which holds LSN `settled`.
    pub fn new(
        conn: Connection,
        path: &Path,
        synchronous: Synchronous,
        policies: Arc<Policies>,
        settled: u64,
        shared: Arc<Shared>,
    ) -> Result<Indexer, StoreError> {
        Ok(Indexer {
            conn,
            checkpointer: Checkpointer::start(path, synchronous)?,
            ttls: policies.ttls(),
            policies,
            last_expire_ms: 0,
            write_heads: false,
            open: Vec::new(),
            opened: None,
            open_events: 0,
            retry_at: None,
            settled,
            unchecked: 0,
            settle_every: super::sqlite::DEFAULT_SETTLE_EVERY,
            shared,
        })
    }

    /// See `LogWriter::set_settle_every`.
    pub fn set_settle_every(&mut self, every: Duration) {
        self.settle_every = every;
    }

    /// See `LogWriter::keep_heads_written`.
    pub fn keep_heads_written(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute(&format!("UPDATE rooms AS r SET seq = {ROOM_HEAD}"), [])?;
        self.write_heads = true;
        Ok(())
    }

    /// The write connection, for tests that arrange a fault on it.
    #[cfg(test)]
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Takes block `lsn`: SQLite gets it at the next settle.
    pub fn add(&mut self, lsn: u64, records: Vec<Record>) {
        self.open_events += records.len();
        self.open.push((lsn, records));
        self.opened.get_or_insert_with(Instant::now);
    }

    /// Whether expiry is due (at most once a second, and only while some room has an age
    /// limit).
    fn expiry_due(&self, now: u64) -> bool {
        !self.ttls.is_empty() && now >= self.last_expire_ms + 1000
    }

    /// After a failed settle: a COMMIT that reported an error may have committed after all, so
    /// what SQLite holds is dropped from the open blocks. A transaction a failed ROLLBACK left
    /// open is rolled back first: its uncommitted LSN must not count as settled.
    fn drop_settled(&mut self) -> Result<(), StoreError> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        let stored: i64 = self
            .conn
            .query_row("SELECT lsn FROM settled", [], |r| r.get(0))?;
        let stored = stored as u64;
        if stored > self.settled {
            self.advance(stored);
        }
        Ok(())
    }

    /// SQLite holds everything up to `lsn`: its blocks are dropped. Returns how many records
    /// they held.
    fn advance(&mut self, lsn: u64) -> usize {
        let done: usize = self
            .open
            .iter()
            .filter(|(block, _)| *block <= lsn)
            .map(|(_, records)| records.len())
            .sum();
        self.open.retain(|(block, _)| *block > lsn);
        self.open_events -= done;
        if self.open.is_empty() {
            self.opened = None;
        }
        self.shared.backlog.fetch_sub(done as u64, Ordering::SeqCst);
        self.settled = lsn;
        self.shared.settled.store(lsn, Ordering::SeqCst);
        self.shared.unsettled.settled(lsn);
        done
    }

    /// Whether the open blocks are due to settle (after a failure: whether the retry is).
    fn due(&self) -> bool {
        if let Some(at) = self.retry_at {
            return Instant::now() >= at;
        }
        self.opened.is_some_and(|at| {
            at.elapsed() >= self.settle_every
                || self.open_events >= SETTLE_EVENTS
                || self.shared.backlog.load(Ordering::SeqCst) * 2
                    >= self.shared.max_unsettled.load(Ordering::SeqCst)
        })
    }

    /// Writes the open blocks into SQLite in one transaction, with expiry when it is due, and
    /// the LSN of the last block. Returns whether any block was settled. A transaction SQLite
    /// refuses is rolled back; its blocks stay open for the next attempt.
    pub fn settle(&mut self) -> Result<bool, StoreError> {
        if self.retry_at.is_some() {
            if let Err(e) = self.drop_settled() {
                self.retry_at = Some(Instant::now() + RETRY);
                return Err(e);
            }
        }
        let now = now_ms();
        let expire_now = self.expiry_due(now);
        if self.open.is_empty() && !expire_now {
            self.retry_at = None;
            return Ok(false);
        }
        let started = Instant::now();
        let lsn = self.open.last().map_or(self.settled, |(lsn, _)| *lsn);
        let newest = self
            .open
            .iter()
            .flat_map(|(_, records)| records)
            .filter_map(|record| match record {
                Record::Event { ts_ms, .. } => Some(*ts_ms),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let result = (|| -> Result<(), StoreError> {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            write_blocks(&self.conn, &self.policies, self.write_heads, &self.open)?;
            if expire_now {
                expire(
                    &self.conn,
                    &self.policies,
                    &self.ttls,
                    self.last_expire_ms,
                    now,
                )?;
            }
            if !self.open.is_empty() {
                self.conn
                    .execute("UPDATE settled SET lsn = ?1", params![lsn as i64])?;
                self.conn.execute(
                    "UPDATE newest SET ms = MAX(ms, ?2), lsn = ?1",
                    params![lsn as i64, newest as i64],
                )?;
            }
            self.conn.execute_batch("COMMIT")?;
            Ok(())
        })();
        if let Err(e) = result {
            if !self.conn.is_autocommit() {
                if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                    tracing::warn!(error = %e, "rollback failed");
                }
            }
            self.retry_at = Some(Instant::now() + RETRY);
            self.shared.failures.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        self.retry_at = None;
        if expire_now {
            self.last_expire_ms = now;
        }
        let settled_blocks = !self.open.is_empty();
        if settled_blocks {
            self.unchecked += self.advance(lsn);
            if self.unchecked >= CHECKPOINT_EVERY {
                self.checkpoint();
            }
        }
        if let Some(on_settle) = &*self.shared.on_settle.lock().expect("on_settle lock") {
            on_settle(started.elapsed());
        }
        Ok(settled_blocks)
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
                Ok(_) => tracing::warn!("WAL checkpoint busy; retried after the next settles"),
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
            }
        }
        self.checkpointer.wake();
    }

    /// Starts the indexer's thread; blocks come through the returned channel, and the thread
    /// settles and ends when it is dropped.
    pub fn start(self) -> Result<(SyncSender<Block>, std::thread::JoinHandle<()>), StoreError> {
        let (tx, rx) = sync_channel(4096);
        let thread = std::thread::Builder::new()
            .name("parley-indexer".into())
            .spawn(move || self.run(rx))?;
        Ok((tx, thread))
    }

    fn run(mut self, blocks: Receiver<Block>) {
        loop {
            let held = self.shared.hold.load(Ordering::SeqCst);
            let wait = if let Some(at) = self.retry_at {
                Some(at.saturating_duration_since(Instant::now()))
            } else if let Some(at) = self.opened.filter(|_| !held) {
                let due = (at + self.settle_every).saturating_duration_since(Instant::now());
                Some(if self.open_events < QUIET_EVENTS {
                    due.min(QUIET)
                } else {
                    due
                })
            } else if !self.ttls.is_empty() {
                Some(Duration::from_secs(1))
            } else {
                None
            };
            let next = match wait {
                Some(wait) => blocks.recv_timeout(wait),
                None => blocks.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok((lsn, bytes)) => {
                    let Some(records) = super::journal::decode(&bytes) else {
                        tracing::error!(lsn, "a journal block that is not records; skipped");
                        continue;
                    };
                    self.add(lsn, records);
                    if self.due() && !self.shared.hold.load(Ordering::SeqCst) {
                        self.try_settle();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !self.shared.hold.load(Ordering::SeqCst) {
                        self.try_settle();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if self.shared.crash.load(Ordering::SeqCst) {
            return;
        }
        // The writer is gone: settle what is left, trying a few times if SQLite refuses (each
        // try may wait out the busy timeout; the journal keeps everything anyway).
        for _ in 0..3 {
            match self.settle() {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "the last settle failed; retrying");
                    std::thread::sleep(RETRY);
                }
            }
        }
        tracing::error!("the last settle failed; the journal keeps what it held");
    }

    fn try_settle(&mut self) {
        if let Err(e) = self.settle() {
            tracing::error!(error = %e, "settling the log failed; the journal keeps it");
        }
    }
}

/// Writes the open blocks' records room by room, each room's in LSN order, then the trim (and
/// head, for webhooks) of each room they added events to. Room by room, each room's last pages
/// are fetched once per settle instead of once per event: in rooms of two the events of a
/// settle touch thousands of rooms, whose pages were out of the processor's caches by the next
/// event of the same room (the page lookups and B-tree descents were about a quarter of the
/// indexer's samples at 25,000 messages a second, 2-3% afterwards: docs/BENCHMARKS.md round 6).
fn write_blocks(
    conn: &Connection,
    policies: &Policies,
    write_heads: bool,
    blocks: &[(u64, Vec<Record>)],
) -> Result<(), StoreError> {
    let mut records: Vec<&Record> = blocks.iter().flat_map(|(_, records)| records).collect();
    // Stable: a room's records keep their order.
    records.sort_by(|a, b| a.room().cmp(b.room()));
    // The room whose events are being written, and its highest seq so far.
    let mut head: Option<(&str, u64)> = None;
    for record in records {
        if let Some((room, seq)) = head.filter(|(room, _)| *room != record.room()) {
            finish_room(conn, policies, write_heads, room, seq)?;
            head = None;
        }
        match record {
            Record::Room {
                room,
                epoch,
                active_ms,
            } => {
                conn.prepare_cached(
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
                    conn,
                    room,
                    *seq,
                    *ts_ms,
                    user.as_deref(),
                    client_id.as_deref(),
                    frame,
                )?;
                head = Some((room, *seq));
            }
            Record::Active { room, active_ms } => {
                conn.prepare_cached("UPDATE rooms SET active_ms = ?2 WHERE room = ?1")?
                    .execute(params![room, *active_ms as i64])?;
            }
            Record::Forget { room } => {
                conn.prepare_cached("DELETE FROM events WHERE room = ?1")?
                    .execute(params![room])?;
                conn.prepare_cached("DELETE FROM rooms WHERE room = ?1")?
                    .execute(params![room])?;
                head = None;
            }
        }
    }
    if let Some((room, seq)) = head {
        finish_room(conn, policies, write_heads, room, seq)?;
    }
    Ok(())
}

/// After a room's events: its head for webhooks, and its trim.
fn finish_room(
    conn: &Connection,
    policies: &Policies,
    write_heads: bool,
    room: &str,
    seq: u64,
) -> Result<(), StoreError> {
    if write_heads {
        conn.prepare_cached("UPDATE rooms SET seq = ?2 WHERE room = ?1")?
            .execute(params![room, seq as i64])?;
    }
    trim(conn, policies, room, seq)
}

/// WAL frames past which the writer stops to checkpoint itself (a `RESTART` checkpoint, which
/// finishes the copy and makes the next commit start the WAL over): 65,536 pages of 4 KiB,
/// 256 MiB. A passive checkpoint that never quite catches up with a busy writer leaves the WAL
/// growing; this bounds it.
pub(super) const MAX_WAL_FRAMES: u64 = 65_536;

/// Events written between two wake-ups of the checkpointer. A pass copies each page once, in
/// its latest version, however often the commits since the last pass rewrote it: in rooms of
/// two every event dirties a page of its own room, and one room's last page takes a dozen
/// events, so passes far apart copy far fewer pages. At 1,000 the checkpointer read and wrote
/// 1.2 pages per event; at 8,192, 0.44 (`examples/store_load.rs`, docs/BENCHMARKS.md). Passes
/// still come every third of a second at 25,000 events a second, and the WAL stays far below
/// [`MAX_WAL_FRAMES`].
pub(super) const CHECKPOINT_EVERY: usize = 8_192;

/// After a checkpoint, SQLite truncates a WAL file larger than this: just above the largest
/// the WAL grows to ([`MAX_WAL_FRAMES`] frames of a 4 KiB page and its 24-byte header), so a
/// busy log reuses its WAL's blocks instead of truncating them and writing into new ones (a
/// write into a new block costs the kernel a block allocation and zeroing the page: 10% of the
/// node's CPU at 25,000 messages a second).
pub(super) const WAL_SIZE_LIMIT: i64 = 288 << 20;

/// Copies the WAL back into the database file, on its own thread and connection, after every
/// [`CHECKPOINT_EVERY`] events and after each sweep (a `PASSIVE` checkpoint: it never blocks
/// the writer or readers). Once
/// everything is copied back, the writer's next transaction starts the WAL over. The thread
/// ends when the writer is dropped.
pub(super) struct Checkpointer {
    wake: SyncSender<()>,
    /// Frames in the WAL, as of the last checkpoint.
    frames: Arc<AtomicU64>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path, synchronous: Synchronous) -> Result<Checkpointer, StoreError> {
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

/// The rooms with an event whose time lies in a range: one pass of [`expire`] over one age
/// limit reads the range of `events_ts` that expired since the previous pass, never the
/// events that rooms with a longer limit (or none) keep.
pub(super) const NEWLY_EXPIRED: &str =
    "SELECT DISTINCT room FROM events WHERE ts_ms >= ?1 AND ts_ms < ?2";

/// A room's first event in seq order whose time is not before a cutoff (see [`expire`]).
pub(super) const FIRST_YOUNG: &str =
    "SELECT seq FROM events WHERE room = ?1 AND +ts_ms >= ?2 ORDER BY seq LIMIT 1";

/// Drops the events that outlived their room's `history_ttl_s`, one age limit `T` at a time
/// (rooms have their own, from their policy): the rooms with an event that turned older than
/// `T` since the previous pass at `last_ms` (an index range over `events.ts_ms` as wide as the
/// time between passes; everything older at the first pass) and whose limit is `T`. Per room,
/// only the events below its first young one in seq order go: a clock that stepped back must
/// not cut a hole (the oldest kept seq decides `recovered`), and an old event kept above a
/// young one goes when that one expires. The walk in seq order (`+ts_ms`: not through
/// `events_ts`, but the room's `(room, seq)` index, or the primary key of a log of the old
/// layout) reads about what it deletes.
///
/// Returns how many events it dropped.
pub(super) fn expire(
    tx: &Connection,
    policies: &Policies,
    ttls: &[u64],
    last_ms: u64,
    now: u64,
) -> Result<usize, StoreError> {
    let mut dropped = 0;
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
                .prepare_cached(FIRST_YOUNG)?
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
            dropped += gone;
        }
    }
    Ok(dropped)
}

/// Drops what `room`'s `history_max_len` no longer keeps below its head `seq`.
pub(super) fn trim(
    conn: &Connection,
    policies: &Policies,
    room: &str,
    seq: u64,
) -> Result<(), StoreError> {
    let max_len = policies.for_room(room).history_max_len;
    if seq > max_len {
        conn.prepare_cached("DELETE FROM events WHERE room = ?1 AND seq <= ?2")?
            .execute(params![room, (seq - max_len) as i64])?;
    }
    Ok(())
}

pub(super) fn insert(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn room(room: &str, epoch: &str) -> Record {
        Record::Room {
            room: room.into(),
            epoch: epoch.into(),
            active_ms: 1,
        }
    }

    fn event(room: &str, seq: u64, content: &str) -> Record {
        Record::Event {
            room: room.into(),
            seq,
            ts_ms: 1,
            user: Some("u".into()),
            client_id: Some(format!("{room}-{content}")),
            frame: content.into(),
        }
    }

    fn rows(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    /// A settle writes room by room, not in LSN order; what SQLite ends with must be what
    /// writing every record in LSN order leaves: a room forgotten and started again within
    /// the settle keeps only its new life, and the trim keeps the last `history.max_len`
    /// events of the whole settle. Sorting by room and seq, or not keeping each room's order,
    /// puts the new life's first event before the forget that deletes it.
    #[test]
    fn a_settle_leaves_what_writing_in_lsn_order_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.db");
        let mut config = Config::default();
        config.history.max_len = 2;
        let policies = Policies::from_config(&config).unwrap();
        drop(crate::store::sqlite::open_log(
            &path,
            Synchronous::Full,
            &config.history,
            Arc::new(policies.clone()),
        ));
        let conn = open(&path, Synchronous::Full).unwrap();
        let blocks = vec![
            (
                1,
                vec![room("a", "a1"), event("a", 1, "old-1"), room("b", "b1")],
            ),
            (2, vec![event("b", 1, "b-1"), event("a", 2, "old-2")]),
            (
                3,
                vec![
                    Record::Forget { room: "a".into() },
                    room("a", "a2"),
                    event("a", 1, "new-1"),
                    event("b", 2, "b-2"),
                ],
            ),
            (4, vec![event("b", 3, "b-3"), event("a", 2, "new-2")]),
            (5, vec![event("a", 3, "new-3")]),
        ];
        conn.execute_batch("BEGIN").unwrap();
        write_blocks(&conn, &policies, false, &blocks).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        assert_eq!(
            rows(&conn, "SELECT epoch FROM rooms WHERE room = 'a'"),
            ["a2"]
        );
        assert_eq!(
            rows(
                &conn,
                "SELECT frame FROM events WHERE room = 'a' ORDER BY seq"
            ),
            ["new-2", "new-3"]
        );
        assert_eq!(
            rows(
                &conn,
                "SELECT frame FROM events WHERE room = 'b' ORDER BY seq"
            ),
            ["b-2", "b-3"]
        );
    }
}
