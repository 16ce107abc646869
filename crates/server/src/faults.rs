//! What keeps the node honest when one of its own tasks dies, and test-only fault hooks.
//!
//! [`Health`]: the sequencer task (one node), a room actor, a subscriber or the heartbeat
//! (cluster) that panics cannot be replaced without losing track of what its members were
//! delivered, so the node stops serving: `/readyz` answers 503 with the reason, the sockets
//! are closed with 1001 (clients reconnect elsewhere and resume with `since`) and the process
//! exits non-zero, for its supervisor to restart it.
//!
//! [`Faults`]: switches the tests flip through `POST /_faults/{name}` (only with the cargo
//! feature `fault-hooks`, which the server's own tests enable) to make a task panic or the
//! heartbeat stop, as a crash or a SIGSTOP would, or to hold a task at a racy moment.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Whether every task the node needs is still running.
#[derive(Default)]
pub struct Health {
    failed: Mutex<Option<String>>,
    fatal: CancellationToken,
}

impl Health {
    /// Records that a vital task died; the node then stops serving.
    pub fn fail(&self, why: String) {
        error!(reason = %why, "a vital task died: the node stops serving");
        let mut failed = self.failed.lock().expect("health lock");
        failed.get_or_insert(why);
        self.fatal.cancel();
    }

    /// Why the node is broken, if it is.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("health lock").clone()
    }

    /// Completes once a vital task died.
    pub async fn failed(&self) {
        self.fatal.cancelled().await;
    }

    /// Runs `task`; if it panics, the node is broken (`what` names the task in the reason).
    pub async fn guard(self: Arc<Self>, what: String, task: impl Future<Output = ()>) {
        if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            self.fail(format!("{what} panicked: {detail}"));
        }
    }
}

/// Test-only fault switches (see the module docs); inert without the `fault-hooks` feature.
#[doc(hidden)]
#[derive(Default)]
pub struct Faults {
    /// The heartbeat skips its beats (a node paused with SIGSTOP).
    pub pause_heartbeat: AtomicBool,
    /// The single-node sequencer panics on its next batch.
    pub panic_sequencer: AtomicBool,
    /// The next room actor to run a command panics.
    pub panic_room: AtomicBool,
    /// A subscriber panics on its next pub/sub message.
    pub panic_subscriber: AtomicBool,
    /// A subscriber whose connection dropped stays away (does not resubscribe) while set.
    pub hold_resubscribe: AtomicBool,
    /// A room actor bringing its members up to a head waits for pub/sub while set, instead of
    /// reading the stream after a moment.
    pub hold_catch_up: AtomicBool,
    /// The single-node log writer holds each retention sweep it takes while set (before the
    /// sweep reads anything), saying so in `sweep_held`.
    pub hold_sweep: AtomicBool,
    /// Set while the log writer holds a sweep (read it with `GET /_faults/sweep-held`).
    pub sweep_held: AtomicBool,
    /// The single-node log writer does not settle while set: what it acknowledges stays in
    /// its journal and the indexer's memory only, as in the moment before a settle.
    pub hold_settle: AtomicBool,
}

impl Faults {
    /// The switch called `name` (`pause-heartbeat`, `panic-sequencer`, `panic-room`,
    /// `panic-subscriber`, `hold-resubscribe`, `hold-catch-up`, `hold-sweep`, `sweep-held`,
    /// `hold-settle`).
    fn switch(&self, name: &str) -> Option<&AtomicBool> {
        Some(match name {
            "pause-heartbeat" => &self.pause_heartbeat,
            "panic-sequencer" => &self.panic_sequencer,
            "panic-room" => &self.panic_room,
            "panic-subscriber" => &self.panic_subscriber,
            "hold-resubscribe" => &self.hold_resubscribe,
            "hold-catch-up" => &self.hold_catch_up,
            "hold-sweep" => &self.hold_sweep,
            "sweep-held" => &self.sweep_held,
            "hold-settle" => &self.hold_settle,
            _ => return None,
        })
    }

    /// Sets the switch `name`; `false` for an unknown name.
    pub fn set(&self, name: &str, on: bool) -> bool {
        self.switch(name)
            .map(|switch| switch.store(on, Ordering::SeqCst))
            .is_some()
    }

    /// Reads the switch `name`; `None` for an unknown name.
    pub fn get(&self, name: &str) -> Option<bool> {
        self.switch(name)
            .map(|switch| switch.load(Ordering::SeqCst))
    }

    /// While `hold` is on, waits (a blocking thread's fault hook), with `held` set meanwhile.
    pub fn hold(hold: &AtomicBool, held: &AtomicBool) {
        if !Faults::on(hold) {
            return;
        }
        held.store(true, Ordering::SeqCst);
        while Faults::on(hold) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        held.store(false, Ordering::SeqCst);
    }

    /// Whether `switch` is on (always `false` without the `fault-hooks` feature).
    pub fn on(switch: &AtomicBool) -> bool {
        cfg!(feature = "fault-hooks") && switch.load(Ordering::SeqCst)
    }

    /// Takes a one-shot switch: `true` once after it was set (never without the feature).
    pub fn take(switch: &AtomicBool) -> bool {
        cfg!(feature = "fault-hooks") && switch.swap(false, Ordering::SeqCst)
    }
}
