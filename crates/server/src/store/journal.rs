//! The journal: what the log writer has acknowledged and SQLite may not hold yet.
//!
//! Every group commit is appended as one checksummed block, numbered with its *LSN* (log
//! sequence number, one more than the last), and (with `store.synchronous = full`) made durable
//! with one `fdatasync` before anything of it is acknowledged. The indexer thread
//! (`store::indexer`) writes the same blocks into SQLite and commits them every
//! `store.settle_ms`, storing the LSN it reached in the same transaction. At open, the blocks
//! above that LSN are exactly the acknowledged events SQLite lacks.
//!
//! Two files, `<db>-acks-a` and `<db>-acks-b`: the writer appends to one and, once it is past
//! [`SWITCH_BYTES`] and the other holds nothing unsettled, starts the other over from its first
//! byte. In each file the blocks' LSNs rise; a torn block (the process died while writing it,
//! before its ack), or an older block left behind the new end, ends the file.
//!
//! Block: `len: u32` (bytes after `crc`), `crc: u32` (CRC-32 of those bytes), `lsn: u64`, `db:
//! u64` (the database's random id, table `settled`: a journal left beside a new database is not
//! its own), then records; little-endian, strings as `u32` length and UTF-8 bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One change to replay into SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A room's log started (its row in `rooms`).
    Room {
        /// The room.
        room: String,
        /// Its epoch.
        epoch: String,
        /// `rooms.active_ms`.
        active_ms: u64,
    },
    /// A stored event.
    Event {
        /// The room.
        room: String,
        /// Its seq.
        seq: u64,
        /// `events.ts_ms`.
        ts_ms: u64,
        /// Who sent it, for the de-duplication index.
        user: Option<String>,
        /// The client's id.
        client_id: Option<String>,
        /// The encoded frame.
        frame: String,
    },
    /// The room was in use at `active_ms` (its last member left, or the sweep found it in
    /// use).
    Active {
        /// The room.
        room: String,
        /// `rooms.active_ms`.
        active_ms: u64,
    },
    /// The sweep forgot the room: its row and events go.
    Forget {
        /// The room.
        room: String,
    },
}

impl Record {
    /// The room it concerns.
    pub fn room(&self) -> &str {
        match self {
            Record::Room { room, .. }
            | Record::Event { room, .. }
            | Record::Active { room, .. }
            | Record::Forget { room } => room,
        }
    }
}

const ROOM: u8 = 1;
const EVENT: u8 = 2;
const ACTIVE: u8 = 3;
const FORGET: u8 = 4;

/// Size past which the writer moves to the other file (when that one is settled).
const SWITCH_BYTES: u64 = 8 << 20;

/// Bytes before a block's records: `len`, `crc`, `lsn` and `db`.
const HEADER: usize = 24;

/// The journal's two files, written by the log writer only.
pub struct Journal {
    files: [File; 2],
    /// The file being appended to.
    current: usize,
    /// Where the next block goes in it.
    end: u64,
    /// The highest LSN in each file (0: none).
    last: [u64; 2],
    /// The block being built: header space, then records.
    block: Vec<u8>,
    /// `fdatasync` after each block (`store.synchronous = full`).
    sync: bool,
    /// Records in the block being built.
    noted: usize,
    /// The database's id.
    db: u64,
}

/// The journal files of the log at `path`.
pub fn paths(path: &Path) -> [std::path::PathBuf; 2] {
    ["-acks-a", "-acks-b"].map(|suffix| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    })
}

impl Journal {
    /// Opens (creating when needed) the journal of the log at `path`. Nothing is read until
    /// [`Journal::replay`].
    pub fn open(path: &Path, sync: bool, db: u64) -> io::Result<Journal> {
        let [a, b] = paths(path);
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let created = !a.exists() || !b.exists();
        let files = [open(&a)?, open(&b)?];
        // One process per journal: a second node on the same database would write over the
        // first one's blocks.
        files[0].try_lock().map_err(|_| {
            io::Error::other(format!(
                "{} is in use by another process (one node per database)",
                a.display()
            ))
        })?;
        if created {
            // A new file's name must survive a power cut too.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
        }
        let mut block = Vec::with_capacity(64 << 10);
        block.resize(HEADER, 0);
        Ok(Journal {
            files,
            current: 0,
            end: 0,
            last: [0, 0],
            block,
            sync,
            noted: 0,
            db,
        })
    }

    /// Every block above LSN `settled`, oldest first, as `(lsn, records)`. New blocks go after
    /// the newest block of either file.
    pub fn replay(&mut self, settled: u64) -> io::Result<Vec<(u64, Vec<Record>)>> {
        let mut blocks = Vec::new();
        let mut ends = [0u64; 2];
        for (i, mut file) in self.files.iter().enumerate() {
            let mut bytes = Vec::new();
            file.seek(SeekFrom::Start(0))?;
            file.read_to_end(&mut bytes)?;
            let mut at = 0usize;
            let mut last = 0u64;
            while let Some(body) = block_at(&bytes, at) {
                let lsn = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                let db = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
                if lsn <= last || db != self.db {
                    break;
                }
                last = lsn;
                if lsn > settled {
                    let records = decode(&body[16..]).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "journal: a bad record")
                    })?;
                    blocks.push((lsn, records));
                }
                at += 8 + body.len();
            }
            self.last[i] = last;
            ends[i] = at as u64;
        }
        self.current = usize::from(self.last[1] > self.last[0]);
        self.end = ends[self.current];
        blocks.sort_by_key(|(lsn, _)| *lsn);
        Ok(blocks)
    }

    /// Notes a room's log starting.
    pub fn room(&mut self, room: &str, epoch: &str, active_ms: u64) {
        self.noted += 1;
        self.block.push(ROOM);
        put_str(&mut self.block, room);
        put_str(&mut self.block, epoch);
        self.block.extend_from_slice(&active_ms.to_le_bytes());
    }

    /// Notes a stored event.
    pub fn event(
        &mut self,
        room: &str,
        seq: u64,
        ts_ms: u64,
        user: Option<&str>,
        client_id: Option<&str>,
        frame: &str,
    ) {
        self.noted += 1;
        self.block.push(EVENT);
        put_str(&mut self.block, room);
        self.block.extend_from_slice(&seq.to_le_bytes());
        self.block.extend_from_slice(&ts_ms.to_le_bytes());
        put_opt(&mut self.block, user);
        put_opt(&mut self.block, client_id);
        put_str(&mut self.block, frame);
    }

    /// Notes a room in use at `active_ms`.
    pub fn active(&mut self, room: &str, active_ms: u64) {
        self.noted += 1;
        self.block.push(ACTIVE);
        put_str(&mut self.block, room);
        self.block.extend_from_slice(&active_ms.to_le_bytes());
    }

    /// Notes a room forgotten.
    pub fn forget(&mut self, room: &str) {
        self.noted += 1;
        self.block.push(FORGET);
        put_str(&mut self.block, room);
    }

    /// Whether records were noted since the last write or discard.
    pub fn is_empty(&self) -> bool {
        self.block.len() == HEADER
    }

    /// Writes the records noted since the last write or discard as block `lsn`, durably when
    /// `sync`, and returns their bytes (for [`decode`]). `settled`: the LSN SQLite holds, which
    /// says whether the other file may be started over.
    pub fn write(&mut self, lsn: u64, settled: u64) -> io::Result<Vec<u8>> {
        let other = 1 - self.current;
        if self.end >= SWITCH_BYTES && self.last[other] <= settled {
            self.current = other;
            self.end = 0;
        }
        self.block[8..16].copy_from_slice(&lsn.to_le_bytes());
        self.block[16..24].copy_from_slice(&self.db.to_le_bytes());
        let body = &self.block[8..];
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "journal: block too big"))?;
        let crc = crc32fast::hash(body);
        self.block[..4].copy_from_slice(&len.to_le_bytes());
        self.block[4..8].copy_from_slice(&crc.to_le_bytes());
        let file = &self.files[self.current];
        let written = file.write_all_at(&self.block, self.end).and_then(|()| {
            if self.sync {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        let records = written.map(|()| {
            self.end += self.block.len() as u64;
            self.last[self.current] = lsn;
            self.block[HEADER..].to_vec()
        });
        self.discard();
        records
    }

    /// Forgets the records noted since the last write (their batch failed).
    pub fn discard(&mut self) {
        self.block.truncate(HEADER);
        self.noted = 0;
    }

    /// How many records were noted since the last write or discard.
    pub fn noted(&self) -> usize {
        self.noted
    }
}

/// The body (LSN, database id and records) of an intact block at `at`, if there is one.
fn block_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let body = bytes.get(at + 8..at + 8 + len)?;
    (len >= HEADER - 8 && crc32fast::hash(body) == crc).then_some(body)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

/// Reads records out of a block's bytes.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn opt(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.string()?)),
            _ => None,
        }
    }
}

/// The records of a block's bytes (as [`Journal::write`] returns them); `None`: not records.
pub fn decode(bytes: &[u8]) -> Option<Vec<Record>> {
    let mut out = Vec::new();
    let mut r = Reader(bytes);
    while !r.0.is_empty() {
        let record = match r.u8()? {
            ROOM => Record::Room {
                room: r.string()?,
                epoch: r.string()?,
                active_ms: r.u64()?,
            },
            EVENT => Record::Event {
                room: r.string()?,
                seq: r.u64()?,
                ts_ms: r.u64()?,
                user: r.opt()?,
                client_id: r.opt()?,
                frame: r.string()?,
            },
            ACTIVE => Record::Active {
                room: r.string()?,
                active_ms: r.u64()?,
            },
            FORGET => Record::Forget { room: r.string()? },
            _ => return None,
        };
        out.push(record);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(room: &str, seq: u64) -> Record {
        Record::Event {
            room: room.into(),
            seq,
            ts_ms: 7,
            user: Some("u".into()),
            client_id: seq.is_multiple_of(2).then(|| format!("c{seq}")),
            frame: format!("{{\"seq\":{seq}}}"),
        }
    }

    fn note(journal: &mut Journal, record: &Record) {
        match record {
            Record::Room {
                room,
                epoch,
                active_ms,
            } => journal.room(room, epoch, *active_ms),
            Record::Event {
                room,
                seq,
                ts_ms,
                user,
                client_id,
                frame,
            } => journal.event(
                room,
                *seq,
                *ts_ms,
                user.as_deref(),
                client_id.as_deref(),
                frame,
            ),
            Record::Active { room, active_ms } => journal.active(room, *active_ms),
            Record::Forget { room } => journal.forget(room),
        }
    }

    fn write(journal: &mut Journal, lsn: u64, settled: u64, records: &[Record]) {
        for r in records {
            note(journal, r);
        }
        let bytes = journal.write(lsn, settled).unwrap();
        assert_eq!(decode(&bytes).unwrap(), records);
    }

    /// The blocks above the settled LSN come back in order, from both files; a discarded
    /// batch, a torn tail and the blocks left behind a file's new start do not.
    #[test]
    fn replay_gives_back_the_unsettled_blocks_up_to_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let mut journal = Journal::open(&path, true, 7).unwrap();
        assert!(journal.replay(0).unwrap().is_empty());
        let first = vec![
            Record::Room {
                room: "r".into(),
                epoch: "e1".into(),
                active_ms: 5,
            },
            event("r", 1),
            event("r", 2),
        ];
        write(&mut journal, 1, 0, &first);
        note(&mut journal, &event("r", 99));
        journal.discard();
        let second = vec![
            Record::Active {
                room: "r".into(),
                active_ms: 6,
            },
            event("r", 3),
            Record::Forget { room: "q".into() },
        ];
        write(&mut journal, 2, 0, &second);
        assert!(
            Journal::open(&path, true, 7).is_err(),
            "one process per journal"
        );
        drop(journal);
        let mut again = Journal::open(&path, true, 7).unwrap();
        assert_eq!(
            again.replay(0).unwrap(),
            vec![(1, first.clone()), (2, second.clone())]
        );
        assert_eq!(again.replay(1).unwrap(), vec![(2, second.clone())]);
        assert!(again.replay(2).unwrap().is_empty(), "all settled");

        // A third block torn half way: the two before it still count.
        write(&mut again, 3, 0, &[event("r", 4)]);
        drop(again);
        let [a, _] = paths(&path);
        let len = std::fs::metadata(&a).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&a)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut again = Journal::open(&path, true, 7).unwrap();
        assert_eq!(again.replay(0).unwrap().len(), 2);

        // Past the switch size, with the other file settled, the writer moves there; once
        // everything in the first file is settled it starts that one over, and its old blocks
        // behind the new one are not read.
        again.end = SWITCH_BYTES;
        write(&mut again, 3, 2, &[event("s", 1)]);
        write(&mut again, 4, 2, &[event("s", 2)]);
        drop(again);
        let mut after = Journal::open(&path, true, 7).unwrap();
        assert_eq!(
            after.replay(2).unwrap(),
            vec![(3, vec![event("s", 1)]), (4, vec![event("s", 2)])]
        );
        after.end = SWITCH_BYTES;
        write(&mut after, 5, 4, &[event("s", 3)]);
        drop(after);
        let mut last = Journal::open(&path, true, 7).unwrap();
        assert_eq!(last.replay(4).unwrap(), vec![(5, vec![event("s", 3)])]);
        assert_eq!(last.current, 0, "back in the first file");
        drop(last);
        // Beside another database (the first one lost), none of it is read.
        let mut other = Journal::open(&path, true, 8).unwrap();
        assert!(other.replay(0).unwrap().is_empty());
    }
}
