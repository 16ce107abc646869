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
        let mut count = first.msgs.len();
        let mut gathered = vec![first];
        while count < MAX_MESSAGES {
            match runs.try_recv() {
                Ok(run) => {
                    count += run.msgs.len();
                    gathered.push(run);
                }
                Err(_) => break,
            }
        }
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
