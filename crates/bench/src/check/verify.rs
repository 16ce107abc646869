//! The checks, over what the clients recorded and the final logs read back over HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use parley_protocol::received::Event;
use serde::Serialize;

use super::client::{fingerprint, message_fp, AckRec, Segment};

/// One check's tally.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Cases that held.
    pub passed: u64,
    /// Cases that did not.
    pub failed: u64,
    /// Cases not judged (e.g. acks of an epoch a rollback replaced).
    pub exempt: u64,
    /// The first failures, explained.
    pub failures: Vec<String>,
}

/// The check results, by name, and the rooms involved in failures.
#[derive(Debug, Default)]
pub struct Verdicts {
    /// Check name -> tally.
    pub checks: BTreeMap<String, Tally>,
    /// Rooms named by a failure.
    pub bad_rooms: BTreeSet<String>,
}

impl Verdicts {
    fn tally(&mut self, check: &str) -> &mut Tally {
        self.checks.entry(check.to_owned()).or_default()
    }

    /// Counts a case of `check`; a failure names `room` and says why.
    pub fn case(&mut self, check: &str, room: &str, ok: bool, why: impl FnOnce() -> String) {
        let t = self.tally(check);
        if ok {
            t.passed += 1;
        } else {
            t.failed += 1;
            if t.failures.len() < 20 {
                t.failures.push(format!("room {room}: {}", why()));
            }
            self.bad_rooms.insert(room.to_owned());
        }
    }

    /// Counts a case not judged.
    pub fn exempt(&mut self, check: &str) {
        self.tally(check).exempt += 1;
    }

    /// Whether every check held.
    pub fn ok(&self) -> bool {
        self.checks.values().all(|t| t.failed == 0)
    }
}

/// A room's log as read back at the end.
#[derive(Debug, Clone)]
pub struct FinalLog {
    /// The epoch the clients' open streams were in (`None`: no open stream).
    pub epoch: Option<String>,
    /// Every event, oldest first.
    pub events: Vec<Event>,
}

/// `acked_in_log`: every ack's message is in the final log exactly once, at its acked seq
/// (acks of an earlier epoch are exempt only if a rollback was injected); two acks of one id
/// name one seq.
pub fn acked_in_log(
    v: &mut Verdicts,
    acks: &[AckRec],
    logs: &BTreeMap<String, FinalLog>,
    rollback: bool,
    retention: bool,
) {
    let mut by_id: HashMap<(&str, &str, &str, &str), u64> = HashMap::new();
    for a in acks {
        let key = (
            a.room.as_str(),
            a.epoch.as_str(),
            a.user.as_str(),
            a.id.as_str(),
        );
        if let Some(&seq) = by_id.get(&key) {
            v.case("acked_in_log", &a.room, seq == a.seq, || {
                format!("{} acked at seq {seq} and again at {}", a.id, a.seq)
            });
        }
        by_id.insert(key, a.seq);
        let Some(log) = logs.get(&a.room) else {
            v.case("acked_in_log", &a.room, false, || "no final log".into());
            continue;
        };
        if log.epoch.as_deref() != Some(a.epoch.as_str()) {
            if rollback {
                v.exempt("acked_in_log");
            } else {
                v.case("acked_in_log", &a.room, false, || {
                    format!(
                        "{} acked at seq {} in epoch {}, the room is now in epoch {:?} and no rollback was injected",
                        a.id, a.seq, a.epoch, log.epoch
                    )
                });
            }
            continue;
        }
        let first = log.events.first().map_or(u64::MAX, Event::seq);
        if retention && a.seq < first {
            // Dropped by the configured retention (a prefix of the log).
            v.exempt("acked_in_log");
            continue;
        }
        let found: Vec<u64> = log
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) if m.user == a.user && m.id.as_deref() == Some(&a.id) => {
                    Some(m.seq)
                }
                _ => None,
            })
            .collect();
        v.case("acked_in_log", &a.room, found == [a.seq], || {
            format!(
                "{} (c{}) acked at seq {} (duplicate: {}), found in the final log at {found:?}",
                a.id, a.client, a.seq, a.duplicate
            )
        });
    }
}

/// `same_event`: every observer of one (room, epoch, seq) — live streams, joined histories,
/// acks, the final log — saw the same event.
pub fn same_event(
    v: &mut Verdicts,
    segments: &[Segment],
    acks: &[AckRec],
    logs: &BTreeMap<String, FinalLog>,
) {
    // (room, epoch, seq) -> fingerprint -> first observer
    let mut seen: BTreeMap<(String, String, u64), BTreeMap<String, String>> = BTreeMap::new();
    let mut put = |room: &str, epoch: &str, seq: u64, fp: String, who: String| {
        seen.entry((room.to_owned(), epoch.to_owned(), seq))
            .or_default()
            .entry(fp)
            .or_insert(who);
    };
    for s in segments {
        for (seq, fp) in &s.history {
            put(
                &s.room,
                &s.epoch,
                *seq,
                fp.clone(),
                format!("c{} history (conn {})", s.client, s.conn),
            );
        }
        for (seq, fp) in &s.live {
            put(
                &s.room,
                &s.epoch,
                *seq,
                fp.clone(),
                format!("c{} live on n{} (conn {})", s.client, s.node, s.conn),
            );
        }
    }
    for a in acks {
        put(
            &a.room,
            &a.epoch,
            a.seq,
            message_fp(&a.user, &a.id, &a.content),
            format!("c{} ack", a.client),
        );
    }
    for (room, log) in logs {
        if let Some(epoch) = &log.epoch {
            for e in &log.events {
                put(room, epoch, e.seq(), fingerprint(e), "final log".into());
            }
        }
    }
    for ((room, epoch, seq), fps) in seen {
        v.case("same_event", &room, fps.len() == 1, || {
            let list: Vec<String> = fps
                .iter()
                .map(|(fp, who)| format!("[{who}] {fp}"))
                .collect();
            format!(
                "epoch {epoch} seq {seq} names {} events: {}",
                fps.len(),
                list.join(" / ")
            )
        });
    }
}

/// `contiguous`: a `joined` history is consecutive and ends at `joined.seq` (unless truncated);
/// live events run `joined.seq + 1`, `+ 2`, … with no gap and no duplicate.
pub fn contiguous(v: &mut Verdicts, segments: &[Segment]) {
    for s in segments {
        let who = || format!("c{} conn {} on n{}", s.client, s.conn, s.node);
        let hist: Vec<u64> = s.history.iter().map(|e| e.0).collect();
        let hist_ok = hist.windows(2).all(|w| w[1] == w[0] + 1)
            && (s.truncated || hist.last().is_none_or(|&l| l == s.joined_seq));
        let mut bad = None;
        for (i, (seq, _)) in s.live.iter().enumerate() {
            if *seq != s.joined_seq + 1 + i as u64 {
                bad = Some((i, *seq));
                break;
            }
        }
        v.case("contiguous", &s.room, hist_ok && bad.is_none(), || match bad {
            Some((i, seq)) => format!(
                "{}: joined at {} (epoch {}), live event #{i} has seq {seq}, want {} (stream ended: {:?})",
                who(),
                s.joined_seq,
                s.epoch,
                s.joined_seq + 1 + i as u64,
                s.end
            ),
            None => format!("{}: joined at {} with history seqs {hist:?}", who(), s.joined_seq),
        });
    }
}

/// `recovered`: a join with `since` answered `recovered: true` is in the asked epoch and its
/// history continues exactly from `since` (to `joined.seq` unless truncated).
pub fn recovered(v: &mut Verdicts, segments: &[Segment]) {
    for s in segments {
        let Some((since, epoch)) = &s.since else {
            continue;
        };
        if s.recovered != Some(true) {
            v.case("recovered", &s.room, s.recovered == Some(false), || {
                format!(
                    "c{} conn {}: join with since gave recovered {:?}",
                    s.client, s.conn, s.recovered
                )
            });
            continue;
        }
        let hist: Vec<u64> = s.history.iter().map(|e| e.0).collect();
        let want_first = since + 1;
        let ok = *epoch == s.epoch
            && s.joined_seq >= *since
            && hist
                .iter()
                .enumerate()
                .all(|(i, &seq)| seq == want_first + i as u64)
            && (s.truncated || since + hist.len() as u64 == s.joined_seq);
        v.case("recovered", &s.room, ok, || {
            format!(
                "c{} conn {} on n{}: since {since} epoch {epoch}, recovered true in epoch {} at seq {}, history {hist:?} (truncated {})",
                s.client, s.conn, s.node, s.epoch, s.joined_seq, s.truncated
            )
        });
    }
}

/// `caught_up`: at the end, with no fault left, every open stream has seen the room's head.
pub fn caught_up(v: &mut Verdicts, segments: &[Segment], logs: &BTreeMap<String, FinalLog>) {
    for s in segments.iter().filter(|s| s.end.is_none()) {
        let head = logs
            .get(&s.room)
            .and_then(|l| l.events.last().map(Event::seq))
            .unwrap_or(0);
        let same_epoch = logs.get(&s.room).and_then(|l| l.epoch.as_deref()) == Some(&s.epoch);
        // Past the head is fine: the clients' own closes at the end add leave events.
        v.case("caught_up", &s.room, same_epoch && s.last_seen() >= head, || {
            format!(
                "c{} conn {} on n{}: open stream (epoch {}) stopped at seq {}, the log's head is {head}",
                s.client,
                s.conn,
                s.node,
                s.epoch,
                s.last_seen()
            )
        });
    }
}

/// `log_contiguous`: the final log is one run of consecutive seqs (retention drops a prefix,
/// never events in the middle), and without retention it starts at 1.
pub fn log_contiguous(v: &mut Verdicts, logs: &BTreeMap<String, FinalLog>, retention: bool) {
    for (room, log) in logs {
        let seqs: Vec<u64> = log.events.iter().map(Event::seq).collect();
        let gap = seqs.windows(2).find(|w| w[1] != w[0] + 1);
        let start_ok = retention || seqs.first().is_none_or(|&f| f == 1);
        v.case(
            "log_contiguous",
            room,
            gap.is_none() && start_ok,
            || match gap {
                Some(w) => format!("the final log jumps from seq {} to {}", w[0], w[1]),
                None => format!(
                    "the final log starts at seq {:?} with no retention configured",
                    seqs.first()
                ),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(room: &str, epoch: &str, joined: u64, live: &[(u64, &str)]) -> Segment {
        Segment {
            client: 0,
            node: 0,
            conn: 1,
            room: room.into(),
            since: None,
            epoch: epoch.into(),
            joined_seq: joined,
            recovered: None,
            truncated: false,
            history: Vec::new(),
            live: live.iter().map(|(s, f)| (*s, (*f).to_owned())).collect(),
            end: None,
        }
    }

    #[test]
    fn two_events_under_one_seq_fail() {
        let mut v = Verdicts::default();
        let a = seg("r", "e", 4, &[(5, "x"), (6, "y")]);
        let b = seg("r", "e", 4, &[(5, "x"), (6, "z")]);
        same_event(&mut v, &[a.clone(), b], &[], &BTreeMap::new());
        assert_eq!(v.checks["same_event"].failed, 1);
        assert_eq!(v.checks["same_event"].passed, 1);
        let mut v = Verdicts::default();
        let c = seg("r", "other", 4, &[(5, "q")]);
        same_event(&mut v, &[a, c], &[], &BTreeMap::new());
        assert!(v.ok(), "another epoch may reuse seqs");
    }

    #[test]
    fn gaps_and_duplicates_fail() {
        let mut v = Verdicts::default();
        contiguous(&mut v, &[seg("r", "e", 4, &[(5, "a"), (6, "b")])]);
        contiguous(&mut v, &[seg("r", "e", 4, &[(5, "a"), (7, "b")])]);
        contiguous(&mut v, &[seg("r", "e", 4, &[(5, "a"), (5, "a")])]);
        assert_eq!(v.checks["contiguous"].passed, 1);
        assert_eq!(v.checks["contiguous"].failed, 2);
    }
}
