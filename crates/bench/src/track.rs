//! Per-member delivery tracking: which seqs of its room a member received, over which
//! membership intervals, with duplicates and gaps, so the report can say exactly what was lost.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::net::Joined;

/// What one member saw of one room.
#[derive(Debug, Clone, Default)]
pub struct RoomTrack {
    base: u64,
    bits: Vec<u64>,
    /// The highest seq seen.
    pub last: u64,
    /// The room's epoch.
    pub epoch: String,
    /// Membership intervals `(joined seq, last seq before leaving)`: events with seq in
    /// `(start, end]` must all have been received; `None` is open until the end of the run.
    pub intervals: Vec<(u64, Option<u64>)>,
    /// Events received twice.
    pub duplicates: u64,
    /// Seqs skipped by the live stream (a gap the protocol forbids).
    pub gaps: u64,
    /// Events that arrived below the highest seq seen.
    pub out_of_order: u64,
    /// Joins with `since` answered `recovered: true`.
    pub recovered: u64,
    /// Joins with `since` answered `recovered: false`.
    pub not_recovered: u64,
    /// Joins with `since` answered `truncated: true` (the tool does not page forward).
    pub truncated: u64,
}

impl RoomTrack {
    /// Applies a `joined` frame. `resumed` says whether the join gave `since`.
    pub fn on_joined(&mut self, joined: &Joined, resumed: bool) {
        if self.intervals.is_empty() {
            self.base = joined.seq;
            self.last = joined.seq;
            self.epoch = joined.epoch.clone();
            self.intervals.push((joined.seq, None));
            return;
        }
        if resumed {
            if joined.recovered == Some(true) && joined.epoch == self.epoch {
                self.recovered += 1;
                if joined.truncated {
                    self.truncated += 1;
                }
                for event in &joined.history {
                    self.record(event.seq, false);
                }
                if let Some(last) = self.intervals.last_mut() {
                    if last.1.is_none() && !joined.truncated {
                        // Continuous membership: everything up to the head is accounted for.
                        self.last = self.last.max(joined.seq);
                        return;
                    }
                }
            } else {
                self.not_recovered += 1;
            }
        }
        // A new interval: close an open one at what was seen.
        if let Some(last) = self.intervals.last_mut() {
            if last.1.is_none() {
                last.1 = Some(self.last);
            }
        }
        self.intervals.push((joined.seq, None));
        self.last = self.last.max(joined.seq);
        self.epoch = joined.epoch.clone();
    }

    /// Applies a `left` frame: nothing more of the room follows.
    pub fn on_left(&mut self) {
        if let Some(last) = self.intervals.last_mut() {
            if last.1.is_none() {
                last.1 = Some(self.last);
            }
        }
    }

    /// Records a sequenced event; `live` events are checked for gaps. Returns false for a
    /// duplicate.
    pub fn record(&mut self, seq: u64, live: bool) -> bool {
        if seq <= self.base {
            return true;
        }
        let off = (seq - self.base - 1) as usize;
        let (word, bit) = (off / 64, off % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.bits[word] |= 1 << bit;
        if seq < self.last {
            self.out_of_order += 1;
        } else {
            if live && seq > self.last + 1 {
                self.gaps += seq - self.last - 1;
            }
            self.last = seq;
        }
        true
    }

    /// Whether `seq` was received.
    pub fn has(&self, seq: u64) -> bool {
        if seq <= self.base {
            return false;
        }
        let off = (seq - self.base - 1) as usize;
        self.bits
            .get(off / 64)
            .is_some_and(|w| w & (1 << (off % 64)) != 0)
    }

    /// Whether `seq` falls inside a membership interval.
    fn member_at(&self, seq: u64) -> bool {
        self.intervals
            .iter()
            .any(|&(start, end)| seq > start && end.is_none_or(|e| seq <= e))
    }

    /// How many of `acked` (sorted seqs of the room's acknowledged messages) fall inside a
    /// membership interval and were not received.
    pub fn lost(&self, acked: &[u64]) -> u64 {
        acked
            .iter()
            .filter(|&&seq| self.member_at(seq) && !self.has(seq))
            .count() as u64
    }

    /// How many of `acked` fall inside a membership interval (what this member should get).
    pub fn expected(&self, acked: &[u64]) -> u64 {
        acked.iter().filter(|&&seq| self.member_at(seq)).count() as u64
    }
}

/// The seqs every room acknowledged, as publishers saw their acks.
#[derive(Debug, Default)]
pub struct Acks {
    rooms: Mutex<HashMap<String, Vec<u64>>>,
}

impl Acks {
    /// Records one ack.
    pub fn record(&self, room: &str, seq: u64) {
        let mut rooms = self.rooms.lock().expect("acks lock");
        match rooms.get_mut(room) {
            Some(list) => list.push(seq),
            None => {
                rooms.insert(room.to_owned(), vec![seq]);
            }
        }
    }

    /// Every room's acked seqs, sorted and de-duplicated.
    pub fn snapshot(&self) -> HashMap<String, Vec<u64>> {
        let mut rooms = self.rooms.lock().expect("acks lock").clone();
        for list in rooms.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        rooms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::HistoryEvent;

    fn joined(seq: u64, recovered: Option<bool>, history: &[u64]) -> Joined {
        Joined {
            seq,
            epoch: "e".into(),
            recovered,
            truncated: false,
            history: history
                .iter()
                .map(|&seq| HistoryEvent { seq, message: true })
                .collect(),
        }
    }

    #[test]
    fn counts_loss_dups_and_recovery() {
        let mut t = RoomTrack::default();
        t.on_joined(&joined(10, None, &[]), false);
        assert!(t.record(11, true));
        assert!(!t.record(11, true));
        assert!(t.record(13, true));
        assert_eq!((t.duplicates, t.gaps), (1, 1));
        assert_eq!(t.lost(&[5, 11, 12, 13, 14]), 2);
        // Reconnect with since=13 recovers 14.
        t.on_joined(&joined(14, Some(true), &[14]), true);
        assert_eq!(t.lost(&[11, 13, 14]), 0);
        // Leave, then a message while out, then rejoin.
        t.on_left();
        t.on_joined(&joined(16, None, &[]), false);
        assert_eq!(t.lost(&[15, 17]), 1);
        assert_eq!(t.expected(&[15, 17]), 1);
    }
}
