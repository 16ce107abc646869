//! The webhook log of a single node: the SQLite file the sequencer writes, read on a
//! connection of its own, and the cursors in a table of the same file
//! (`webhook_cursors(room, epoch, seq)`), so they survive restarts with the log they point
//! into. One node delivers every room: [`HookLog::claim`] always grants.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::log::{Cursor, Entry, HookLog, LogError, Scan, Slice, Wanted};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS webhook_cursors (
    room TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Rooms whose log has gone past their cursor (or restarted under a new epoch), with the
/// time of their oldest undelivered event. The store's `rooms` and `events` tables are read
/// as `store::sqlite` writes them: with webhooks on, its writer keeps `rooms.seq` equal to each
/// room's head (`LogWriter::keep_heads_written`), so this reads one row per room.
const PENDING: &str = "
SELECT r.room, r.seq, CASE WHEN c.epoch = r.epoch THEN c.seq ELSE 0 END AS done,
    (SELECT e.ts_ms FROM events e WHERE e.room = r.room
        AND e.seq > (CASE WHEN c.epoch = r.epoch THEN c.seq ELSE 0 END)
        ORDER BY e.seq LIMIT 1)
FROM rooms r LEFT JOIN webhook_cursors c ON c.room = r.room
WHERE (c.room IS NULL AND r.seq > 0) OR c.epoch != r.epoch OR c.seq < r.seq
";

/// The single node's webhook log.
pub struct SqliteHookLog {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteHookLog {
    /// Opens the log's file (the store has created it) and the cursor table.
    pub fn open(path: &Path) -> Result<SqliteHookLog, LogError> {
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        // No fsync per cursor move: a power cut that loses the last moves only sends those
        // batches again (at least once), and the sequencer never waits behind our fsync.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(SqliteHookLog {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LogError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().expect("hook log lock")))
            .await
            .map_err(|e| LogError(e.to_string()))?
            .map_err(err)
    }
}

fn err(e: rusqlite::Error) -> LogError {
    LogError(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl HookLog for SqliteHookLog {
    async fn scan(&self, wanted: &Wanted<'_>) -> Result<Scan, LogError> {
        let rows: Vec<(String, i64, i64, Option<i64>)> = self
            .with(|conn| {
                let mut stmt = conn.prepare_cached(PENDING)?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.collect()
            })
            .await?;
        let now = now_ms();
        let mut scan = Scan::default();
        for (room, head, done, oldest_ms) in rows {
            if !wanted(&room) {
                continue;
            }
            scan.lag_events = scan.lag_events.max(head.saturating_sub(done) as u64);
            if let Some(ts) = oldest_ms {
                let age = now.saturating_sub(ts as u64) as f64 / 1000.0;
                scan.lag_seconds = scan.lag_seconds.max(age);
            }
            scan.pending.push(room);
        }
        Ok(scan)
    }

    async fn claim(&self, _room: &str) -> Result<bool, LogError> {
        Ok(true)
    }

    async fn release(&self, _room: &str) {}

    async fn cursor(&self, room: &str) -> Result<Option<Cursor>, LogError> {
        let room = room.to_owned();
        self.with(move |conn| {
            conn.prepare_cached("SELECT epoch, seq FROM webhook_cursors WHERE room = ?1")?
                .query_row(params![room], |r| {
                    Ok(Cursor {
                        epoch: r.get(0)?,
                        seq: r.get::<_, i64>(1)? as u64,
                    })
                })
                .optional()
        })
        .await
    }

    async fn read(
        &self,
        room: &str,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Slice, LogError> {
        let room = room.to_owned();
        let cursor = cursor.cloned();
        self.with(move |conn| {
            // One read transaction: the head, the epoch and the events agree.
            let tx = conn.transaction()?;
            let head: Option<(String, i64)> = tx
                .prepare_cached("SELECT epoch, seq FROM rooms WHERE room = ?1")?
                .query_row(params![room], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((epoch, head)) = head else {
                // Forgotten meanwhile: nothing to read.
                return Ok(Slice {
                    epoch: cursor.as_ref().map(|c| c.epoch.clone()).unwrap_or_default(),
                    head: cursor.as_ref().map_or(0, |c| c.seq),
                    after: cursor.as_ref().map_or(0, |c| c.seq),
                    entries: Vec::new(),
                });
            };
            // A room's events in the file all belong to its current epoch: a forgotten room's
            // go with it, and a new epoch starts again from seq 1.
            let after = match &cursor {
                Some(c) if c.epoch == epoch => c.seq,
                _ => 0,
            };
            let entries = {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, frame FROM events WHERE room = ?1 AND seq > ?2 \
                     ORDER BY seq LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![room, after as i64, limit as i64], |r| {
                    Ok(Entry {
                        seq: r.get::<_, i64>(0)? as u64,
                        epoch: epoch.clone(),
                        frame: r.get(1)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(Slice {
                epoch,
                head: head.max(0) as u64,
                after,
                entries,
            })
        })
        .await
    }

    async fn advance(&self, room: &str, to: &Cursor) -> Result<bool, LogError> {
        let (room, to) = (room.to_owned(), to.clone());
        self.with(move |conn| {
            conn.prepare_cached(
                "INSERT INTO webhook_cursors (room, epoch, seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (room) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
            )?
            .execute(params![room, to.epoch, to.seq as i64])?;
            Ok(true)
        })
        .await
    }
}
