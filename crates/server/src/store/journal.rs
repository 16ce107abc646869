//! The journal: what the log writer has acknowledged but not yet settled into SQLite.
//!
//! Every group commit is appended here as one checksummed block and (with `store.synchronous =
//! full`) made durable with one `fdatasync` before anything of it is acknowledged. SQLite's
//! own commit, which writes every page the events dirtied, then runs only every
//! `store.settle_ms` (`LogWriter::settle`): in rooms of two each event dirties a page of its
//! own room, and a transaction that gathers a fifth of a second of events writes each page
//! once instead of once per group commit.
//!
//! Each settle raises the log's *generation* in the same SQLite transaction and starts the
//! journal over from its first byte under the new one. At open, the blocks of the generation
//! SQLite holds are exactly the acknowledged events it may lack; older blocks (left behind
//! the current end, or from before a settle whose commit went through) are ignored, and a
//! torn block (the process died while writing it, before its ack) ends the journal.
//!
//! Block: `len: u32` (bytes after `crc`), `crc: u32` (CRC-32 of those bytes), `generation: u64`,
//! then records; little-endian, strings as `u32` length and UTF-8 bytes.

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
    /// The room's last member left at `active_ms`.
    Vacated {
        /// The room.
        room: String,
        /// `rooms.active_ms`.
        active_ms: u64,
    },
}

const ROOM: u8 = 1;
const EVENT: u8 = 2;
const VACATED: u8 = 3;

/// Bytes before a block's records: `len`, `crc` and `generation`.
const HEADER: usize = 16;

/// The journal file, written by the log writer only.
pub struct Journal {
    file: File,
    /// Where the next block goes.
    end: u64,
    generation: u64,
    /// The block being built: header space, then records.
    block: Vec<u8>,
    /// `fdatasync` after each block (`store.synchronous = full`).
    sync: bool,
}

impl Journal {
    /// Opens (creating when needed) the journal at `path`. Nothing is read until
    /// [`Journal::replay`].
    pub fn open(path: &Path, sync: bool) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut block = Vec::with_capacity(64 << 10);
        block.resize(HEADER, 0);
        Ok(Journal {
            file,
            end: 0,
            generation: 0,
            block,
            sync,
        })
    }

    /// The records of every block of `generation`, oldest first, from the start of the file
    /// up to the first block that is torn or of another generation. New blocks go after them.
    pub fn replay(&mut self, generation: u64) -> io::Result<Vec<Record>> {
        let mut bytes = Vec::new();
        (&self.file).seek(SeekFrom::Start(0))?;
        (&self.file).read_to_end(&mut bytes)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while let Some(body) = block_at(&bytes, at) {
            if u64::from_le_bytes(body[..8].try_into().expect("8 bytes")) != generation {
                break;
            }
            decode(&body[8..], &mut records).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "journal: a bad record")
            })?;
            at += HEADER + body.len() - 8;
        }
        self.generation = generation;
        self.end = at as u64;
        Ok(records)
    }

    /// Starts the journal over under `generation`, whose settle has committed everything
    /// written so far. The old bytes stay until overwritten; [`Journal::replay`] ignores them.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.end = 0;
    }

    /// Notes a room's log starting.
    pub fn room(&mut self, room: &str, epoch: &str, active_ms: u64) {
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
        self.block.push(EVENT);
        put_str(&mut self.block, room);
        self.block.extend_from_slice(&seq.to_le_bytes());
        self.block.extend_from_slice(&ts_ms.to_le_bytes());
        put_opt(&mut self.block, user);
        put_opt(&mut self.block, client_id);
        put_str(&mut self.block, frame);
    }

    /// Notes a room's last member leaving.
    pub fn vacated(&mut self, room: &str, active_ms: u64) {
        self.block.push(VACATED);
        put_str(&mut self.block, room);
        self.block.extend_from_slice(&active_ms.to_le_bytes());
    }

    /// Writes the records noted since the last write or discard as one block, durably when
    /// `sync`. Nothing noted: nothing written.
    pub fn write(&mut self) -> io::Result<()> {
        if self.block.len() == HEADER {
            return Ok(());
        }
        self.block[8..16].copy_from_slice(&self.generation.to_le_bytes());
        let body = &self.block[8..];
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "journal: block too big"))?;
        let crc = crc32fast::hash(body);
        self.block[..4].copy_from_slice(&len.to_le_bytes());
        self.block[4..8].copy_from_slice(&crc.to_le_bytes());
        let written = self
            .file
            .write_all_at(&self.block, self.end)
            .and_then(|()| {
                if self.sync {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            });
        if written.is_ok() {
            self.end += self.block.len() as u64;
        }
        self.discard();
        written
    }

    /// Forgets the records noted since the last write (their batch failed).
    pub fn discard(&mut self) {
        self.block.truncate(HEADER);
    }
}

/// The body (generation and records) of an intact block at `at`, if there is one.
fn block_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let body = bytes.get(at + 8..at + 8 + len)?;
    (len >= 8 && crc32fast::hash(body) == crc).then_some(body)
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

fn decode(bytes: &[u8], out: &mut Vec<Record>) -> Option<()> {
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
            VACATED => Record::Vacated {
                room: r.string()?,
                active_ms: r.u64()?,
            },
            _ => return None,
        };
        out.push(record);
    }
    Some(())
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
            Record::Vacated { room, active_ms } => journal.vacated(room, *active_ms),
        }
    }

    /// Blocks of the current generation come back in order; a discarded batch, a torn tail
    /// and the blocks of a generation that was settled do not.
    #[test]
    fn replay_gives_back_the_current_generations_blocks_up_to_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut journal = Journal::open(&path, true).unwrap();
        assert!(journal.replay(1).unwrap().is_empty());
        let first = vec![
            Record::Room {
                room: "r".into(),
                epoch: "e1".into(),
                active_ms: 5,
            },
            event("r", 1),
            event("r", 2),
        ];
        for r in &first {
            note(&mut journal, r);
        }
        journal.write().unwrap();
        note(&mut journal, &event("r", 99));
        journal.discard();
        let second = vec![
            Record::Vacated {
                room: "r".into(),
                active_ms: 6,
            },
            event("r", 3),
        ];
        for r in &second {
            note(&mut journal, r);
        }
        journal.write().unwrap();
        let all: Vec<Record> = first.iter().chain(&second).cloned().collect();
        let mut again = Journal::open(&path, true).unwrap();
        assert_eq!(again.replay(1).unwrap(), all);
        assert!(again.replay(2).unwrap().is_empty(), "another generation");

        // A third block torn half way: the two before it still count.
        note(&mut journal, &event("r", 4));
        journal.write().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        let mut again = Journal::open(&path, true).unwrap();
        assert_eq!(again.replay(1).unwrap(), all);

        // A settle starts generation 2 over the old bytes: only the new block counts, and
        // the old ones behind it are not read as the new generation's.
        again.restart(2);
        note(&mut again, &event("s", 1));
        again.write().unwrap();
        let mut after = Journal::open(&path, true).unwrap();
        assert_eq!(after.replay(2).unwrap(), vec![event("s", 1)]);
    }
}
