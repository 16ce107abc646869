//! A member's latency histogram, written in batches.
//!
//! Every member has its own histogram (about 20 KB: µs from 1 to 120 s at two significant
//! digits), and a fan-out run has thousands of members each recording a delivery in turn: every
//! record was a cache miss, 7% of the bench's CPU at 5,000 × 100 msg/s. Values wait in a small
//! buffer and go into the histogram together, so its few busy lines are loaded once per batch.

use hdrhistogram::Histogram;

use crate::member::{new_histogram, MAX_LATENCY_US};

/// Values held before they go into the histogram.
const BATCH: usize = 256;

/// A latency histogram (µs) that takes values in batches of [`BATCH`].
pub struct Recorder {
    histogram: Histogram<u64>,
    pending: Vec<u32>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder {
            histogram: new_histogram(),
            pending: Vec::with_capacity(BATCH),
        }
    }
}

impl Recorder {
    /// Records `us`, clamped to 1..=[`MAX_LATENCY_US`].
    pub fn record(&mut self, us: u64) {
        // MAX_LATENCY_US fits in a u32.
        self.pending.push(us.clamp(1, MAX_LATENCY_US) as u32);
        if self.pending.len() >= BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for us in self.pending.drain(..) {
            let _ = self.histogram.record(u64::from(us));
        }
    }

    /// The histogram of every value recorded.
    pub fn finish(mut self) -> Histogram<u64> {
        self.flush();
        self.histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reaches_the_histogram() {
        let mut recorder = Recorder::default();
        for us in 0..1000u64 {
            recorder.record(us * 1000);
        }
        recorder.record(u64::MAX);
        let h = recorder.finish();
        assert_eq!(h.len(), 1001, "a partial batch is flushed too");
        assert_eq!(h.min(), 1, "clamped to 1 µs");
        assert!(h.max() >= MAX_LATENCY_US * 99 / 100 && h.max() <= MAX_LATENCY_US * 101 / 100);
        assert!((h.value_at_quantile(0.5) as i64 - 499_000).abs() < 5_000);
    }
}
