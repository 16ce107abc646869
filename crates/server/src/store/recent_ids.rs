//! Which client ids the log writer stored lately: a Bloom filter over `(room, user, client id)`
//! of every message this process wrote in the last de-duplication window, so that a message
//! with a new id (nearly all of them) is known to be new without a lookup in SQLite. A filter
//! says "maybe" for some ids it never saw, never "no" for one it did; a "maybe" costs the
//! lookup, as every message did before.
//!
//! The filter knows only this process's writes. Older events (before a restart) count from
//! `covers_from`, the newest event time the log held when it was opened (table `newest`): while
//! a message's window reaches back to it, the answer is "maybe".
//!
//! Ids are kept in generations: a new one starts once the current one is a window old (by the
//! monotonic clock), and a generation goes once the newest event time it holds is older than a
//! message's window (by the wall clock, as SQLite's lookup reads `ts_ms`), so a wall clock that
//! steps back keeps them longer rather than losing any. A generation is a chain of filters: when
//! the newest fills up, a bigger one follows it, so the false-positive rate stays near
//! [`FALSE_POSITIVE`] whatever the rate of messages.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fastbloom::BloomFilter;

/// Each filter's false-positive rate at its capacity.
const FALSE_POSITIVE: f64 = 0.01;

/// The first filter's capacity in a generation; each next one holds four times as many.
const FIRST_CAPACITY: usize = 1 << 16;

/// One filter of a generation and how many ids it holds.
struct Filter {
    bloom: BloomFilter,
    capacity: usize,
    held: usize,
}

impl Filter {
    fn new(capacity: usize, seed: u128) -> Filter {
        Filter {
            bloom: BloomFilter::with_false_pos(FALSE_POSITIVE)
                .seed(&seed)
                .expected_items(capacity),
            capacity,
            held: 0,
        }
    }
}

/// The ids inserted from `started` on.
struct Generation {
    started: Instant,
    /// The newest event time inserted (wall clock, ms).
    newest_ms: u64,
    filters: Vec<Filter>,
}

impl Generation {
    fn new(started: Instant, seed: u128) -> Generation {
        Generation {
            started,
            newest_ms: 0,
            filters: vec![Filter::new(FIRST_CAPACITY, seed)],
        }
    }
}

/// The ids this process stored in the last window (see the module docs).
pub struct RecentIds {
    window: Duration,
    covers_from_ms: u64,
    seed: u128,
    /// Oldest first; the last takes inserts.
    generations: VecDeque<Generation>,
}

impl RecentIds {
    /// Ids of the last `window`, for messages written from now on; the log held events up to
    /// wall time `covers_from_ms` before (0: none).
    pub fn new(window: Duration, covers_from_ms: u64, now: Instant) -> RecentIds {
        RecentIds::seeded(window, covers_from_ms, now, rand::random())
    }

    fn seeded(window: Duration, covers_from_ms: u64, now: Instant, seed: u128) -> RecentIds {
        RecentIds {
            window,
            covers_from_ms,
            seed,
            generations: VecDeque::from([Generation::new(now, seed)]),
        }
    }

    /// Notes that a message of `user` in `room` with `client_id` was stored at wall time
    /// `ts_ms`.
    pub fn insert(&mut self, room: &str, user: &str, client_id: &str, ts_ms: u64, now: Instant) {
        let current = self.generations.back().expect("a generation");
        if now.saturating_duration_since(current.started) >= self.window {
            self.generations.push_back(Generation::new(now, self.seed));
        }
        let current = self.generations.back_mut().expect("a generation");
        current.newest_ms = current.newest_ms.max(ts_ms);
        let last = current.filters.last().expect("a generation has a filter");
        if last.held >= last.capacity {
            let capacity = last.capacity * 4;
            current.filters.push(Filter::new(capacity, self.seed));
        }
        let last = current
            .filters
            .last_mut()
            .expect("a generation has a filter");
        last.bloom.insert(&(room, user, client_id));
        last.held += 1;
    }

    /// Whether a message of `user` in `room` with `client_id` stored at or after wall time
    /// `since_ms` may exist; `false` means it does not.
    pub fn may_hold(&mut self, room: &str, user: &str, client_id: &str, since_ms: u64) -> bool {
        if since_ms <= self.covers_from_ms {
            return true;
        }
        // Generations that hold nothing as young as `since_ms` are of no more use (windows only
        // move forward, unless the clock steps back, and then they are kept).
        while self.generations.len() > 1
            && self
                .generations
                .front()
                .is_some_and(|g| g.newest_ms < since_ms)
        {
            self.generations.pop_front();
        }
        let key = (room, user, client_id);
        self.generations
            .iter()
            .filter(|g| g.newest_ms >= since_ms)
            .flat_map(|g| &g.filters)
            .any(|filter| filter.bloom.contains(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);
    const W_MS: u64 = 600_000;

    fn absent_and_maybe(recent: &mut RecentIds, since_ms: u64) -> usize {
        (0..1000)
            .filter(|i| recent.may_hold("r", "u", &format!("never-{i}"), since_ms))
            .count()
    }

    /// Every stored id is "maybe" while its time is inside the window; ids never stored are
    /// mostly "no", also past the first filter's capacity; generations go once their newest
    /// time left the window.
    #[test]
    fn stored_ids_are_held_for_a_window_and_new_ones_are_not() {
        let t0 = Instant::now();
        let ms0 = 10 * W_MS;
        let mut recent = RecentIds::seeded(WINDOW, 0, t0, 7);
        let n = FIRST_CAPACITY * 3;
        for i in 0..n {
            recent.insert("r", "u", &format!("id-{i}"), ms0, t0);
        }
        assert_eq!(
            recent.generations[0].filters.len(),
            2,
            "a bigger filter followed"
        );
        let held = |recent: &mut RecentIds, since: u64| {
            (0..n).all(|i| recent.may_hold("r", "u", &format!("id-{i}"), since))
        };
        assert!(held(&mut recent, ms0));
        let false_positives = absent_and_maybe(&mut recent, ms0);
        assert!(
            false_positives < 50,
            "{false_positives} of 1000 absent ids were maybe"
        );
        // A window later a new generation starts; the first is kept while its ids count.
        recent.insert("r", "u", "late", ms0 + W_MS, t0 + WINDOW);
        assert_eq!(recent.generations.len(), 2);
        assert!(held(&mut recent, ms0));
        // Once the window starts after its newest id, the first generation goes.
        assert!(!recent.may_hold("r", "u", "id-1", ms0 + 1));
        assert_eq!(recent.generations.len(), 1);
        assert!(recent.may_hold("r", "u", "late", ms0 + 1));
    }

    /// A wall clock stepped back keeps ids that SQLite's window (wall time) still covers, however
    /// long ago they were stored by the monotonic clock.
    #[test]
    fn a_clock_stepped_back_keeps_the_ids_its_window_covers() {
        let t0 = Instant::now();
        let ms0 = 10 * W_MS;
        let mut recent = RecentIds::seeded(WINDOW, 0, t0, 7);
        recent.insert("r", "u", "a", ms0, t0);
        // Three windows later (monotonic), the wall clock reads an hour earlier than at "a".
        let later = t0 + 3 * WINDOW;
        recent.insert("r", "u", "b", ms0 - 6 * W_MS, later);
        let since = ms0 - 7 * W_MS;
        assert!(recent.may_hold("r", "u", "a", since));
        assert!(recent.may_hold("r", "u", "b", since));
    }

    /// Before `covers_from`, the filter knows nothing: the answer is always "maybe".
    #[test]
    fn windows_that_reach_before_the_opening_are_maybe() {
        let t0 = Instant::now();
        let mut recent = RecentIds::seeded(WINDOW, 5_000, t0, 7);
        recent.insert("r", "u", "x", 6_000, t0);
        assert_eq!(absent_and_maybe(&mut recent, 5_000), 1000);
        assert!(absent_and_maybe(&mut recent, 5_001) < 50);
    }
}
