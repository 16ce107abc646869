//! Which client ids the log writer stored lately: a Bloom filter over `(room, user, client id)`
//! of every message this process wrote in the last de-duplication window, so that a message
//! with a new id (nearly all of them) is known to be new without a lookup in SQLite. A filter
//! says "maybe" for some ids it never saw, never "no" for one it did; a "maybe" costs the
//! lookup, as every message did before.
//!
//! The filter knows only this process's writes. Older events (before a restart) count from
//! `covers_from`, the newest event time the log held when it was opened: while a message's
//! window reaches back before it, the answer is "maybe".
//!
//! Ids age out by generation: the current one takes inserts; once it is a window old it becomes
//! the previous one and the one before goes, so the two always cover at least the last window
//! by the monotonic clock. (SQLite's window is in wall time: after the wall clock stepped back,
//! a resend of a message older than the window by the monotonic clock counts as new.) A generation is a chain of filters: when the newest fills up, a
//! bigger one follows it, so the false-positive rate stays near [`FALSE_POSITIVE`] whatever the
//! rate of messages.

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

/// The ids this process stored in the last window (see the module docs).
pub struct RecentIds {
    window: Duration,
    covers_from_ms: u64,
    seed: u128,
    /// When the current generation started.
    started: Instant,
    current: Vec<Filter>,
    previous: Vec<Filter>,
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
            started: now,
            current: vec![Filter::new(FIRST_CAPACITY, seed)],
            previous: Vec::new(),
        }
    }

    fn age(&mut self, now: Instant) {
        if now.saturating_duration_since(self.started) >= self.window {
            self.previous = std::mem::replace(
                &mut self.current,
                vec![Filter::new(FIRST_CAPACITY, self.seed)],
            );
            self.started = now;
        }
    }

    /// Notes that a message of `user` in `room` with `client_id` was stored.
    pub fn insert(&mut self, room: &str, user: &str, client_id: &str, now: Instant) {
        self.age(now);
        let last = self.current.last_mut().expect("a generation has a filter");
        if last.held >= last.capacity {
            let capacity = last.capacity * 4;
            self.current.push(Filter::new(capacity, self.seed));
        }
        let last = self.current.last_mut().expect("a generation has a filter");
        last.bloom.insert(&(room, user, client_id));
        last.held += 1;
    }

    /// Whether a message of `user` in `room` with `client_id` stored at or after wall time
    /// `since_ms` may exist; `false` means it does not.
    pub fn may_hold(
        &mut self,
        room: &str,
        user: &str,
        client_id: &str,
        since_ms: u64,
        now: Instant,
    ) -> bool {
        if since_ms <= self.covers_from_ms {
            return true;
        }
        self.age(now);
        let key = (room, user, client_id);
        self.current
            .iter()
            .chain(&self.previous)
            .any(|filter| filter.bloom.contains(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);

    fn absent_and_maybe(recent: &mut RecentIds, since_ms: u64, now: Instant) -> usize {
        (0..1000)
            .filter(|i| recent.may_hold("r", "u", &format!("never-{i}"), since_ms, now))
            .count()
    }

    /// Every stored id is "maybe" for a window; ids never stored are mostly "no", also past
    /// the first filter's capacity.
    #[test]
    fn stored_ids_are_held_for_a_window_and_new_ones_are_not() {
        let t0 = Instant::now();
        let mut recent = RecentIds::seeded(WINDOW, 0, t0, 7);
        let n = FIRST_CAPACITY * 3;
        for i in 0..n {
            recent.insert("r", "u", &format!("id-{i}"), t0);
        }
        assert_eq!(
            recent.current.len(),
            2,
            "a second, bigger filter followed the first"
        );
        let later = t0 + WINDOW - Duration::from_millis(1);
        assert!((0..n).all(|i| recent.may_hold("r", "u", &format!("id-{i}"), 1, later)));
        let false_positives = absent_and_maybe(&mut recent, 1, later);
        assert!(
            false_positives < 50,
            "{false_positives} of 1000 absent ids were maybe"
        );
        // One generation later they are still held (the previous generation)...
        let next = t0 + WINDOW;
        assert!((0..n).all(|i| recent.may_hold("r", "u", &format!("id-{i}"), 1, next)));
        assert_eq!(recent.previous.len(), 2);
        // ...and after two windows they are gone.
        let gone = next + WINDOW;
        assert!(!recent.may_hold("r", "u", "id-1", 1, gone));
        assert!(recent.previous.iter().all(|f| f.held == 0));
    }

    /// Before `covers_from`, the filter knows nothing: the answer is always "maybe".
    #[test]
    fn windows_that_reach_before_the_opening_are_maybe() {
        let t0 = Instant::now();
        let mut recent = RecentIds::seeded(WINDOW, 5_000, t0, 7);
        assert_eq!(absent_and_maybe(&mut recent, 5_000, t0), 1000);
        assert!(absent_and_maybe(&mut recent, 5_001, t0) < 50);
    }
}
