//! One connection's outbound queue: bounded in frames and bytes, filled by the hub (fan-out)
//! and the broker (acks, `joined`, `left`), drained by the connection's own task. Pushing never
//! waits: when a connection cannot keep up its queue closes with 4009 and the room goes on.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::extract::ws::Utf8Bytes;
use parley_protocol::CloseCode;
use tokio::sync::Notify;

/// The queue bounds, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct QueueBounds {
    /// Most frames waiting.
    pub frames: usize,
    /// Most bytes waiting.
    pub bytes: usize,
}

/// A bounded, non-blocking queue of encoded frames for one connection.
pub struct Outbound {
    state: Mutex<State>,
    /// Woken when the queue goes from empty to non-empty, or closes.
    ready: Notify,
    bounds: QueueBounds,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: Option<CloseCode>,
}

/// What a drain found: the frames to write, and whether the queue was closed.
pub struct Drained {
    /// Frames in the order they were queued.
    pub frames: VecDeque<Utf8Bytes>,
    /// Set once the queue is closed; no further frames will be accepted.
    pub closed: Option<CloseCode>,
}

impl Outbound {
    /// An empty queue. Allocates nothing until the first frame.
    pub fn new(bounds: QueueBounds) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            bounds,
        }
    }

    /// Queues a frame. Past either bound the queue closes with 4009 and the frame is dropped
    /// (the client recovers it with `since`). One frame bigger than the byte bound is accepted
    /// into an empty queue. Returns whether the frame was queued.
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        self.push_inner(frame, false)
    }

    /// Queues a frame that must not trip the bounds: the `joined` answer, which can carry a
    /// thousand events of history. It counts as one frame but not towards the byte bound, so
    /// the live events that follow it in a busy room do not trip 4009 because of it.
    pub fn push_unbounded(&self, frame: Utf8Bytes) -> bool {
        self.push_inner(frame, true)
    }

    fn push_inner(&self, frame: Utf8Bytes, unbounded: bool) -> bool {
        let mut state = self.state.lock().expect("outbound lock");
        if state.closed.is_some() {
            return false;
        }
        let len = frame.as_str().len();
        let fits = state.frames.is_empty()
            || (state.frames.len() < self.bounds.frames && state.bytes + len <= self.bounds.bytes);
        if !fits && !unbounded {
            state.closed = Some(CloseCode::SlowConsumer);
            state.frames = VecDeque::new();
            state.bytes = 0;
            drop(state);
            self.ready.notify_one();
            return false;
        }
        let was_empty = state.frames.is_empty();
        state.frames.push_back(frame);
        if !unbounded {
            state.bytes += len;
        }
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        true
    }

    /// Closes the queue with `code`; later pushes are dropped. The first close wins.
    pub fn close(&self, code: CloseCode) {
        let mut state = self.state.lock().expect("outbound lock");
        if state.closed.is_none() {
            state.closed = Some(code);
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Takes everything queued.
    pub fn drain(&self) -> Drained {
        let mut state = self.state.lock().expect("outbound lock");
        state.bytes = 0;
        Drained {
            frames: std::mem::take(&mut state.frames),
            closed: state.closed,
        }
    }

    /// Whether the queue has been closed, and with which code.
    pub fn closed(&self) -> Option<CloseCode> {
        self.state.lock().expect("outbound lock").closed
    }

    /// Waits until there is something to drain or the queue closes. A wake-up that arrives
    /// while nobody waits is kept, so none is missed between a drain and the next wait.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[test]
    fn overflow_closes_with_4009() {
        let q = Outbound::new(QueueBounds {
            frames: 2,
            bytes: 100,
        });
        assert!(q.push(frame(10)));
        assert!(q.push(frame(10)));
        assert!(!q.push(frame(10)));
        assert_eq!(q.closed(), Some(CloseCode::SlowConsumer));
        assert!(!q.push(frame(1)));
    }

    #[test]
    fn one_big_frame_fits_an_empty_queue() {
        let q = Outbound::new(QueueBounds {
            frames: 10,
            bytes: 100,
        });
        assert!(q.push(frame(500)));
        assert!(!q.push(frame(1)));
        let q = Outbound::new(QueueBounds {
            frames: 10,
            bytes: 100,
        });
        assert!(q.push(frame(50)));
        assert!(q.push_unbounded(frame(500)));
        // The big frame does not count towards the byte bound of the frames after it.
        assert!(q.push(frame(50)));
        assert!(!q.push(frame(1)));
        assert_eq!(q.closed(), Some(CloseCode::SlowConsumer));
    }
}
