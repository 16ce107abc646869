//! One POST's worth of a room's log: the events past the cursor that `webhooks.events` keeps,
//! each the member frame with `epoch` added, and `gap` notices where the log cannot give what
//! the receiver has not had. Pure: the deliverer reads, this decides, the deliverer posts.

use serde::Deserialize;

use super::log::{Cursor, Slice};
use crate::config::HookEvent;

/// What one read of the log becomes.
#[derive(Debug, Default, PartialEq)]
pub struct Batch {
    /// The JSON objects of `{"events":[...]}`, in order.
    pub events: Vec<String>,
    /// Where the cursor goes once they are delivered.
    pub cursor: Option<Cursor>,
    /// How many of `events` are gap notices.
    pub gaps: u64,
}

impl Batch {
    /// The request body.
    pub fn body(&self) -> String {
        let len = self.events.iter().map(|e| e.len() + 1).sum::<usize>() + 12;
        let mut body = String::with_capacity(len);
        body.push_str("{\"events\":[");
        for (i, event) in self.events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(event);
        }
        body.push_str("]}");
        body
    }
}

/// The member frame with `"epoch"` added as its last field (the frame is a JSON object; its
/// bytes are kept as they are).
pub fn with_epoch(frame: &str, epoch: &str) -> String {
    let body = frame.trim_end();
    let body = body.strip_suffix('}').unwrap_or(body);
    let epoch = serde_json::to_string(epoch).expect("a string encodes");
    format!("{body},\"epoch\":{epoch}}}")
}

/// A `gap` notice: events `from_seq..=to_seq` of `epoch` will never be delivered (retention
/// dropped them before they were); without `to_seq`, whatever followed `from_seq - 1` in
/// `epoch` (the room's log restarted under a new epoch).
pub fn gap(room: &str, epoch: &str, from_seq: u64, to_seq: Option<u64>) -> String {
    let mut value = serde_json::json!({
        "type": "gap",
        "room": room,
        "epoch": epoch,
        "from_seq": from_seq,
    });
    match to_seq {
        Some(to) => {
            value["to_seq"] = to.into();
            value["reason"] = "retention".into();
        }
        None => value["reason"] = "epoch".into(),
    }
    value.to_string()
}

/// Which [`HookEvent`] a stored frame is; `None` for anything else.
fn kind(frame: &str) -> Option<HookEvent> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(rename = "type", borrow)]
        ty: &'a str,
        #[serde(borrow)]
        event: Option<&'a str>,
    }
    let head: Head<'_> = serde_json::from_str(frame).ok()?;
    match (head.ty, head.event) {
        ("message", _) => Some(HookEvent::Message),
        ("system", Some("join")) => Some(HookEvent::Join),
        ("system", Some("leave")) => Some(HookEvent::Leave),
        _ => None,
    }
}

/// Builds the batch that follows `cursor` from `slice`. The cursor always moves to the last
/// entry read (or the head, when retention kept nothing past the cursor): filtered events are
/// done without a POST, missing ones are announced by a gap notice.
pub fn build(room: &str, cursor: Option<&Cursor>, slice: &Slice, wanted: &[HookEvent]) -> Batch {
    let mut batch = Batch::default();
    // Where delivery stands: the cursor, or the start of the current epoch.
    let mut at = match cursor {
        Some(c) if slice.after == 0 && c.seq > 0 => {
            // The room's log restarted (a new epoch, seqs from 1 again).
            batch.events.push(gap(room, &c.epoch, c.seq + 1, None));
            batch.gaps += 1;
            Cursor {
                epoch: slice.epoch.clone(),
                seq: 0,
            }
        }
        Some(c) => c.clone(),
        None => Cursor {
            epoch: slice.epoch.clone(),
            seq: 0,
        },
    };
    let step = |at: &mut Cursor, epoch: &str, next_seq: u64, batch: &mut Batch| {
        if at.epoch != epoch {
            // A cluster's room got a new epoch (Redis may have lost some of its events) and
            // its seqs go on: what followed the cursor in the old epoch may be gone.
            batch.events.push(gap(room, &at.epoch, at.seq + 1, None));
            batch.gaps += 1;
            at.epoch = epoch.to_owned();
        }
        if next_seq > at.seq + 1 {
            batch
                .events
                .push(gap(room, epoch, at.seq + 1, Some(next_seq - 1)));
            batch.gaps += 1;
        }
    };
    for entry in &slice.entries {
        step(&mut at, &entry.epoch, entry.seq, &mut batch);
        if kind(&entry.frame).is_some_and(|k| wanted.contains(&k)) {
            batch.events.push(with_epoch(&entry.frame, &entry.epoch));
        }
        at.seq = entry.seq;
    }
    if slice.entries.is_empty() && (slice.head > at.seq || slice.epoch != at.epoch) {
        // Nothing retained past the cursor, yet the log went on: retention dropped it all.
        step(&mut at, &slice.epoch, slice.head + 1, &mut batch);
        at.seq = at.seq.max(slice.head);
    }
    if cursor != Some(&at) {
        batch.cursor = Some(at);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::log::Entry;

    const ALL: &[HookEvent] = &[HookEvent::Message, HookEvent::Join, HookEvent::Leave];

    fn message(seq: u64) -> String {
        format!(
            r#"{{"type":"message","room":"r","seq":{seq},"user":"u","name":"u","content":"c{seq}","ts":"t"}}"#
        )
    }

    fn join(seq: u64) -> String {
        format!(
            r#"{{"type":"system","room":"r","seq":{seq},"event":"join","user":"u","name":"u","content":"u joined the room","ts":"t"}}"#
        )
    }

    fn slice(epoch: &str, head: u64, after: u64, entries: &[(u64, &str, String)]) -> Slice {
        Slice {
            epoch: epoch.into(),
            head,
            after,
            entries: entries
                .iter()
                .map(|(seq, epoch, frame)| Entry {
                    seq: *seq,
                    epoch: (*epoch).into(),
                    frame: frame.clone(),
                })
                .collect(),
        }
    }

    fn at(epoch: &str, seq: u64) -> Cursor {
        Cursor {
            epoch: epoch.into(),
            seq,
        }
    }

    fn parsed(batch: &Batch) -> Vec<serde_json::Value> {
        let body: serde_json::Value = serde_json::from_str(&batch.body()).unwrap();
        body["events"].as_array().unwrap().clone()
    }

    #[test]
    fn events_are_the_member_frames_with_their_epoch() {
        let s = slice("e1", 2, 0, &[(1, "e1", join(1)), (2, "e1", message(2))]);
        let batch = build("r", None, &s, ALL);
        let events = parsed(&batch);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["content"], "c2");
        assert_eq!(events[1]["epoch"], "e1");
        assert_eq!(events[0]["event"], "join");
        assert_eq!(batch.cursor, Some(at("e1", 2)));
        assert_eq!(batch.gaps, 0);
    }

    #[test]
    fn filtered_events_move_the_cursor_without_being_sent() {
        let s = slice("e1", 3, 1, &[(2, "e1", join(2)), (3, "e1", message(3))]);
        let batch = build("r", Some(&at("e1", 1)), &s, &[HookEvent::Message]);
        let events = parsed(&batch);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["seq"], 3);
        assert_eq!(batch.cursor, Some(at("e1", 3)));
    }

    #[test]
    fn what_retention_dropped_is_a_gap() {
        let s = slice("e1", 9, 2, &[(8, "e1", message(8)), (9, "e1", message(9))]);
        let batch = build("r", Some(&at("e1", 2)), &s, ALL);
        let events = parsed(&batch);
        assert_eq!(events[0]["type"], "gap");
        assert_eq!(
            (&events[0]["from_seq"], &events[0]["to_seq"]),
            (&3.into(), &7.into())
        );
        assert_eq!(events[0]["epoch"], "e1");
        assert_eq!(batch.gaps, 1);
        // Nothing retained at all past the cursor.
        let s = slice("e1", 9, 2, &[]);
        let batch = build("r", Some(&at("e1", 2)), &s, ALL);
        let events = parsed(&batch);
        assert_eq!(
            (&events[0]["from_seq"], &events[0]["to_seq"]),
            (&3.into(), &9.into())
        );
        assert_eq!(batch.cursor, Some(at("e1", 9)));
    }

    #[test]
    fn a_restarted_log_is_announced_and_read_from_its_start() {
        let s = slice("e2", 1, 0, &[(1, "e2", message(1))]);
        let batch = build("r", Some(&at("e1", 5)), &s, ALL);
        let events = parsed(&batch);
        assert_eq!(events[0]["type"], "gap");
        assert_eq!(events[0]["epoch"], "e1");
        assert_eq!(events[0]["from_seq"], 6);
        assert!(events[0].get("to_seq").is_none());
        assert_eq!(
            (&events[1]["seq"], &events[1]["epoch"]),
            (&1.into(), &"e2".into())
        );
        assert_eq!(batch.cursor, Some(at("e2", 1)));
    }

    #[test]
    fn a_renewed_epoch_whose_seqs_go_on_is_announced() {
        let s = slice("e2", 7, 5, &[(6, "e1", message(6)), (7, "e2", message(7))]);
        let batch = build("r", Some(&at("e1", 5)), &s, ALL);
        let events = parsed(&batch);
        assert_eq!(events.len(), 3);
        assert_eq!(events[0]["epoch"], "e1");
        assert_eq!(events[1]["type"], "gap");
        assert_eq!(
            (&events[1]["epoch"], &events[1]["from_seq"]),
            (&"e1".into(), &7.into())
        );
        assert_eq!(events[2]["epoch"], "e2");
        assert_eq!(batch.cursor, Some(at("e2", 7)));
    }

    #[test]
    fn nothing_new_is_no_batch() {
        let s = slice("e1", 4, 4, &[]);
        let batch = build("r", Some(&at("e1", 4)), &s, ALL);
        assert_eq!(batch, Batch::default());
    }
}
