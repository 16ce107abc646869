//! The broker's vocabulary, shared by both brokers, the session and the HTTP API: history pages
//! and their queries, room listings, the replay cap, the de-duplication window, the text of
//! join/leave events and the rule for announcing them. Storage modules use these types; nothing
//! here knows how a log is stored.

use std::time::Duration;

use parley_protocol::server::ServerFrame;

/// How long a client id keeps de-duplicating resends.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(600);

/// The `history`, `truncated` and `recovered` fields of a `joined` frame.
#[derive(Debug, Default)]
pub struct JoinHistory {
    /// Encoded frames, oldest first.
    pub frames: Vec<String>,
    /// More events follow the replayed ones.
    pub truncated: bool,
    /// With `since`: whether the history continues exactly from it.
    pub recovered: Option<bool>,
}

/// A page of a room's log.
#[derive(Debug, Default)]
pub struct Page {
    /// Encoded frames, oldest first.
    pub frames: Vec<String>,
    /// Further events remain in the direction of paging.
    pub more: bool,
}

/// A room the log knows, with its head, for the HTTP API's room list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRoom {
    /// The room.
    pub room: String,
    /// Its latest seq; 0 when it has had members but never an event.
    pub seq: u64,
}

/// Which page of history.
#[derive(Debug, Clone, Copy, Default)]
pub struct PageQuery {
    /// Events below this seq.
    pub before: Option<u64>,
    /// Events above this seq.
    pub after: Option<u64>,
    /// At most this many.
    pub limit: u32,
}

/// How often empty rooms are swept for `history.empty_room_ttl_s`: a quarter of it, between 1
/// and 5 seconds, so an empty room is forgotten within its TTL plus at most 5 seconds.
pub fn sweep_every(empty_room_ttl: Duration) -> Duration {
    (empty_room_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Largest history page.
pub const MAX_PAGE: u32 = 200;
/// History page when the request gives no limit.
pub const DEFAULT_PAGE: u32 = 50;

/// Cuts a `since` replay to at most `max_bytes` of frames (keeping at least one, oldest first).
/// Returns whether anything was cut, i.e. whether `truncated` must be set.
pub fn cap_replay(frames: &mut Vec<String>, max_bytes: usize) -> bool {
    let mut total = 0usize;
    let keep = frames
        .iter()
        .position(|f| {
            total += f.len();
            total > max_bytes
        })
        .map_or(frames.len(), |at| at.max(1));
    let cut = keep < frames.len();
    frames.truncate(keep);
    cut
}

/// Cuts a history page so that its events, encoded as the JSON array `[f1,f2,...]`, take at
/// most `max_array_bytes` (keeping at least one event); sets `more` when anything was cut. The
/// events kept are those nearest the paging origin, so the next page continues without a hole:
/// for `before` or no bounds (paging back from the newest) the newest are kept and the oldest
/// dropped, and the client's next `before=<oldest seq returned>` finds them; for `after` (with
/// or without `before`) the oldest are kept and the next `after=<newest seq returned>` finds
/// the rest. Both brokers' pages pass through here, for the `history` frame and the HTTP API.
pub fn cap_page(page: &mut Page, query: &PageQuery, max_array_bytes: usize) {
    let newest_first = query.after.is_none();
    let n = page.frames.len();
    let mut total = 2usize; // `[` and `]`
    let mut keep = 0usize;
    for i in 0..n {
        let frame = if newest_first {
            &page.frames[n - 1 - i]
        } else {
            &page.frames[i]
        };
        let add = frame.len() + usize::from(keep > 0); // a comma before every later one
        if keep > 0 && total + add > max_array_bytes {
            break;
        }
        total += add;
        keep += 1;
    }
    if keep < n {
        if newest_first {
            page.frames.drain(..n - keep);
        } else {
            page.frames.truncate(keep);
        }
        page.more = true;
    }
}

/// The `system` frame of a join (`joined`) or leave event: the one place its text is written.
pub fn system_event(
    room: &str,
    seq: u64,
    user: &str,
    name: &str,
    joined: bool,
    ts: &str,
) -> String {
    let (event, verb) = if joined {
        ("join", "joined")
    } else {
        ("leave", "left")
    };
    let content = format!("{user} {verb} the room");
    ServerFrame::System {
        room,
        seq,
        event,
        user,
        name,
        content: &content,
        ts,
    }
    .encode()
}

/// The announce rule: whether a presence change is broadcast as a sequenced `join`/`leave`
/// event. Only a user's first connection joining, or last leaving, is a change (`transition`);
/// and only while the room, counted in people after the change and including a joiner, has at
/// most `announce_max` of them. The cluster's Lua script applies the same rule and its test
/// checks the two agree.
pub fn announce(transition: bool, joined: bool, users_after: usize, announce_max: usize) -> bool {
    // A leaver is counted as still present: a room of `announce_max` announces both the
    // join that made it so and the leave that undoes it.
    let counted = if joined { users_after } else { users_after + 1 };
    transition && counted <= announce_max
}

/// Cases of the announce rule, `(transition, joined, users_after, announce_max, announced)`:
/// [`announce`] is tested against them here, and the cluster's Lua version against the same
/// table on a real Redis (`tests/cluster_scripts.rs`).
pub const ANNOUNCE_CASES: &[(bool, bool, usize, usize, bool)] = &[
    // Joins: the first connection, while the room (joiner included) stays within the limit.
    (true, true, 1, 0, false),
    (true, true, 1, 1, true),
    (true, true, 2, 1, false),
    (true, true, 2, 2, true),
    (true, true, 3, 2, false),
    // A second tab is no change.
    (false, true, 1, 5, false),
    (false, true, 2, 2, false),
    // Leaves: the last connection, counting the leaver as still present.
    (true, false, 0, 0, false),
    (true, false, 0, 1, true),
    (true, false, 1, 1, false),
    (true, false, 1, 2, true),
    (true, false, 2, 2, false),
    // One tab of two leaving is no change.
    (false, false, 1, 5, false),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announce_rule_follows_its_table() {
        for &(transition, joined, users_after, announce_max, want) in ANNOUNCE_CASES {
            assert_eq!(
                announce(transition, joined, users_after, announce_max),
                want,
                "{:?}",
                (transition, joined, users_after, announce_max)
            );
        }
    }

    #[test]
    fn pages_are_capped_keeping_the_events_nearest_their_origin() {
        let page = |sizes: &[usize]| Page {
            frames: sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| format!("{i}{}", "x".repeat(n - 1)))
                .collect(),
            more: false,
        };
        let back = PageQuery {
            before: Some(10),
            after: None,
            limit: 50,
        };
        let forward = PageQuery {
            before: None,
            after: Some(1),
            limit: 50,
        };
        // `[` + 10 + `,` + 10 + `]` = 23 bytes.
        let mut p = page(&[10, 10, 10]);
        cap_page(&mut p, &back, 23);
        assert_eq!(p.frames.len(), 2);
        assert!(p.more);
        assert!(
            p.frames[0].starts_with('1'),
            "the oldest went: {:?}",
            p.frames
        );
        let mut p = page(&[10, 10, 10]);
        cap_page(&mut p, &forward, 23);
        assert_eq!(p.frames.len(), 2);
        assert!(p.frames[0].starts_with('0') && p.frames[1].starts_with('1'));
        assert!(p.more);
        let mut p = page(&[10, 10, 10]);
        cap_page(&mut p, &forward, 22);
        assert_eq!(p.frames.len(), 1);
        let mut p = page(&[100, 1]);
        cap_page(&mut p, &forward, 10);
        assert_eq!(p.frames.len(), 1, "one event always goes, however big");
        let mut p = page(&[5, 5]);
        cap_page(&mut p, &back, 13);
        assert_eq!(p.frames.len(), 2);
        assert!(!p.more, "nothing cut, nothing added to `more`");
    }

    #[test]
    fn replays_are_capped_by_bytes_keeping_at_least_one() {
        let frame = |n: usize| "x".repeat(n);
        let mut frames = vec![frame(10), frame(10), frame(10)];
        assert!(cap_replay(&mut frames, 25));
        assert_eq!(frames.len(), 2);
        let mut frames = vec![frame(100), frame(1)];
        assert!(cap_replay(&mut frames, 10));
        assert_eq!(frames.len(), 1, "one frame always goes, however big");
        let mut frames = vec![frame(5), frame(5)];
        assert!(!cap_replay(&mut frames, 10));
        assert_eq!(frames.len(), 2);
    }
}
