//! The message writer of a shard: one task per shard that takes the runs of messages the room
//! actors hand it and sends them to Redis together, as one call of `lua/msgs.lua` (a group
//! commit across rooms). A room actor hands over one run at a time and waits for its answer, so
//! each room's messages stay in order; while one call is out, the next runs gather. One call
//! for many rooms costs Redis one script invocation, one run-id check and one round trip,
//! instead of one of each per message.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Inner;
use crate::cluster::script::{self, MsgReply, PreparedMsg};

/// Most messages one call carries (a room's run is never split, so one call may carry a little
/// more).
pub(super) const MAX_MESSAGES: usize = 512;

/// Most bytes of keys and arguments one call gathers from several rooms: a room's own run may
/// be bigger (it is never split), but big messages of many rooms never pile up into one huge
/// call that passes Redis's query buffer limit or the response timeout, which would fail every
/// room in it.
pub(super) const MAX_BYTES: usize = 1 << 20;

/// What a call answers: a reply per message, or why the call did not go through.
pub(super) type Replies = redis::RedisResult<Vec<Result<MsgReply, String>>>;

/// One room's run of messages, in order, and where to answer.
pub(super) struct Run {
    pub(super) msgs: Vec<PreparedMsg>,
    pub(super) done: oneshot::Sender<Replies>,
}

/// The writer of shard `shard`: until `stop`, or until every sender is gone.
pub(super) async fn run(inner: Arc<Inner>, shard: usize, mut runs: mpsc::UnboundedReceiver<Run>) {
    loop {
        let first = tokio::select! {
            _ = inner.stop.cancelled() => return,
            run = runs.recv() => match run {
                Some(run) => run,
                None => return,
            },
        };
        let gathered = gather(first, &mut runs);
        let count = gathered.iter().map(|run| run.msgs.len()).sum();
        let mut msgs = Vec::with_capacity(count);
        let mut answers = Vec::with_capacity(gathered.len());
        for run in gathered {
            answers.push((run.msgs.len(), run.done));
            msgs.extend(run.msgs);
        }
        match script::run_msgs(&inner.shards.shards[shard], &msgs).await {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                for (len, done) in answers {
                    let _ = done.send(Ok(replies.by_ref().take(len).collect()));
                }
            }
            Err(e) => {
                for (_, done) in answers {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// `first` and the runs already waiting behind it, up to [`MAX_MESSAGES`] messages or
/// [`MAX_BYTES`] bytes (a run is taken whole; the first always goes).
fn gather(first: Run, runs: &mut mpsc::UnboundedReceiver<Run>) -> Vec<Run> {
    let size = |run: &Run| run.msgs.iter().map(PreparedMsg::bytes).sum::<usize>();
    let mut count = first.msgs.len();
    let mut bytes = size(&first);
    let mut gathered = vec![first];
    while count < MAX_MESSAGES && bytes < MAX_BYTES {
        match runs.try_recv() {
            Ok(run) => {
                count += run.msgs.len();
                bytes += size(&run);
                gathered.push(run);
            }
            Err(_) => break,
        }
    }
    gathered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::script::Msg;

    fn run(room: &str, content: &str, n: usize) -> Run {
        let msg = Msg {
            room,
            user: "u",
            client_id: "",
            content,
            prefix: String::new(),
            suffix: String::new(),
            max_len: 100,
            ttl_s: 0,
            epoch_candidate: "e".into(),
            dedup_window_s: 600,
            node: "n",
        };
        Run {
            msgs: (0..n).map(|_| msg.prepare()).collect(),
            done: oneshot::channel().0,
        }
    }

    /// Small messages gather up to the count; big ones stop at the byte bound, never inside a
    /// run.
    #[test]
    fn a_call_gathers_runs_up_to_a_count_and_a_size() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..10 {
            tx.send(run(&format!("r{i}"), "hi", 100)).unwrap();
        }
        let first = run("first", "hi", 100);
        let taken = gather(first, &mut rx);
        let counted: usize = taken.iter().map(|r| r.msgs.len()).sum();
        assert_eq!(
            (taken.len(), counted),
            (6, 600),
            "stops once 512 are gathered"
        );

        let (tx, mut rx) = mpsc::unbounded_channel();
        let big = "x".repeat(300_000);
        for i in 0..10 {
            tx.send(run(&format!("r{i}"), &big, 1)).unwrap();
        }
        let taken = gather(run("first", &big, 1), &mut rx);
        assert_eq!(
            taken.len(),
            4,
            "300 KB each: the fourth passes 1 MiB and the call goes"
        );

        let (_tx, mut rx) = mpsc::unbounded_channel();
        let taken = gather(run("alone", &big, 5), &mut rx);
        assert_eq!(taken[0].msgs.len(), 5, "a run is never split");
    }
}
