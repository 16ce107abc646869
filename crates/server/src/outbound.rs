//! One connection's write side: a bounded queue of frames in front of the socket, written by
//! whoever has a frame for it.
//!
//! A frame for an idle connection is written at once, from the task that produced it (the
//! sequencer delivering a room's event, a session answering its client): one `writev` of a 2-10
//! byte header and the shared payload, no wake-up of the connection's task, no copy. Only what
//! the kernel does not take waits in the queue; the connection's own task then waits until the
//! socket is writable and finishes it ([`Outbound::ready`], [`Outbound::write_pending`]).
//! Writes happen under the queue's lock, always from the front, so frames leave in the order
//! they were queued whoever writes them.
//!
//! Pushing never waits. A connection whose backlog passes `limits.outbound_queue_frames` or
//! `limits.outbound_queue_bytes` is closed with 4009 and the room goes on.
//!
//! A [`Batch`] defers the writes of many pushes: the sequencer queues a whole batch of events,
//! acks and answers, then writes each touched connection once, so a member that gets several
//! frames in a batch gets them in one system call.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use parley_protocol::CloseCode;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The queue bounds, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct QueueBounds {
    /// Most frames waiting.
    pub frames: usize,
    /// Most bytes waiting.
    pub bytes: usize,
}

/// The frame kinds parley writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// A UTF-8 text message.
    Text = 0x1,
    /// A binary message (only `/echo` sends these).
    Binary = 0x2,
    /// Close, with a code and reason.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong, echoing a ping's payload.
    Pong = 0xA,
}

/// A connection's write side. Shared by its session, the hub and the broker.
pub struct Outbound {
    stream: TcpStream,
    state: Mutex<State>,
    /// Woken when the connection's task has something to do: a backlog the kernel did not
    /// take, a close (4009 on overflow) or a failed write.
    ready: Notify,
    bounds: QueueBounds,
    /// Requests of this connection handed on (sends to the broker) whose answer is not queued
    /// yet; see [`InFlight`].
    in_flight: AtomicU32,
}

/// A request of the connection whose answer (an `ack` or `error`) someone else will queue:
/// counted from creation until it is dropped, after the answer is queued or when the request
/// is lost. The session waits for none to be left ([`Outbound::settled`]) before a join, a
/// leave or a close it decides on, so they take effect after every earlier request.
pub struct InFlight(Arc<Outbound>);

impl InFlight {
    /// Counts a request of `outbound`'s connection.
    pub fn new(outbound: Arc<Outbound>) -> InFlight {
        outbound.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(outbound)
    }
}

impl std::ops::Deref for InFlight {
    type Target = Arc<Outbound>;

    fn deref(&self) -> &Arc<Outbound> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Every waiter: the serving loop's own wait on `ready` may be registered first
            // (it is pinned across turns) and would take a single notification.
            self.0.ready.notify_waiters();
        }
    }
}

struct Frame {
    opcode: Opcode,
    payload: Bytes,
    /// What the frame added to [`State::bytes`] (its payload length, or 0 for a frame queued
    /// unbounded): exactly this is taken off again when it leaves the queue.
    counted: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    /// Payload bytes waiting that count towards the byte bound: the sum of the frames'
    /// `counted` (the front frame's in full, even when partly written).
    bytes: usize,
    /// How much of the front frame (header and payload) is already written.
    written: usize,
    closed: Option<CloseCode>,
    /// A write failed: the peer is gone.
    failed: bool,
    /// The last write would have blocked: writes wait for the connection's task to see the
    /// socket writable again.
    blocked: bool,
    /// Queued in a [`Batch`] that has not written yet.
    in_batch: bool,
    /// [`Outbound::flush`] waits for that batch: its write wakes the connection's task.
    flush_waits: bool,
}

impl State {
    /// Drops the frames waiting, but a partly written one: a close frame must not land inside
    /// it.
    fn drop_waiting(&mut self) {
        let keep = usize::from(self.written > 0);
        self.frames.truncate(keep);
        self.bytes = self.frames.iter().map(|f| f.counted).sum();
    }

    /// The front frame went out in full: it leaves the queue, and what it added to `bytes`
    /// (nothing for a frame queued unbounded) is taken off.
    fn pop_sent(&mut self) {
        if let Some(front) = self.frames.pop_front() {
            self.bytes -= front.counted;
        }
    }

    /// The peer is gone: nothing more is written.
    fn fail(&mut self) {
        self.failed = true;
        self.frames = VecDeque::new();
        self.bytes = 0;
    }
}

/// What the connection's task should do after [`Outbound::write_pending`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything queued is written.
    Done,
    /// The kernel took what it could; wait for [`Outbound::writable`] and write again.
    Blocked,
    /// The queue was closed with this code (4009 on overflow); nothing more is accepted.
    Closed(CloseCode),
    /// A write failed: the peer is gone.
    Failed,
}

/// Pushes whose writes wait until [`Batch::write`]: each connection touched is written once.
/// A batch dropped without `write` (an early return, a panic) writes too: a connection it held
/// would otherwise keep its frames, and its flush would wait, for good.
#[derive(Default)]
pub struct Batch {
    touched: Vec<Arc<Outbound>>,
}

impl Batch {
    /// Writes every connection touched since the batch began, once each.
    pub fn write(self) {
        // `Drop` writes.
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for outbound in self.touched.drain(..) {
            let mut state = outbound.lock();
            state.in_batch = false;
            outbound.write_and_signal(&mut state);
            if std::mem::take(&mut state.flush_waits) {
                outbound.ready.notify_one();
            }
        }
    }
}

impl Outbound {
    /// The write side of `stream`. Allocates no queue until a frame has to wait.
    pub fn new(stream: TcpStream, bounds: QueueBounds) -> Outbound {
        Outbound {
            stream,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            bounds,
            in_flight: AtomicU32::new(0),
        }
    }

    /// Waits until every [`InFlight`] request of the connection has its answer queued. Only
    /// the connection's own task calls this, while it is not waiting on [`Outbound::ready`].
    pub async fn settled(&self) {
        loop {
            // Registered before the check, so a last answer between the two is not missed.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The socket, for reading.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The queue's state. A lock poisoned by a panic while it was held (a bug) fails the
    /// connection instead of panicking again: the queue may hold half a frame, so nothing
    /// more is written and the socket is shut; the connection's task hears `Failed`. A panic
    /// here instead would reach every holder, and one in a [`Batch`] dropped while unwinding
    /// would abort the node.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| {
            self.state.clear_poison();
            let mut state = poisoned.into_inner();
            self.end(&mut state);
            self.ready.notify_one();
            state
        })
    }

    /// Ends the connection in both directions and fails its queue: nothing more is written.
    fn end(&self, state: &mut State) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(Shutdown::Both);
        state.fail();
    }

    /// Queues a text frame and writes what the socket takes now. Past either bound the queue
    /// closes with 4009 and the frame is dropped (the client recovers it with `since`). One
    /// frame bigger than the byte bound is accepted into an empty queue. Returns whether the
    /// frame was queued.
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        self.push_now(Opcode::Text, frame.into(), false)
    }

    /// Queues a frame that must not trip the bounds and writes what the socket takes now; see
    /// [`push_unbounded_in`](Self::push_unbounded_in).
    pub fn push_unbounded(&self, frame: Utf8Bytes) -> bool {
        self.push_now(Opcode::Text, frame.into(), true)
    }

    /// Like [`push`](Self::push), but the write waits until `batch` is written.
    pub fn push_in(self: &Arc<Self>, frame: Utf8Bytes, batch: &mut Batch) -> bool {
        self.push_in_inner(frame, false, batch)
    }

    /// Queues a frame that must not trip the bounds, in `batch`: the `joined` answer, which can
    /// carry a thousand events of history. It counts as one frame but not towards the byte
    /// bound, so the live events that follow it in a busy room do not trip 4009 because of it.
    pub fn push_unbounded_in(self: &Arc<Self>, frame: Utf8Bytes, batch: &mut Batch) -> bool {
        self.push_in_inner(frame, true, batch)
    }

    fn push_in_inner(
        self: &Arc<Self>,
        frame: Utf8Bytes,
        unbounded: bool,
        batch: &mut Batch,
    ) -> bool {
        let mut state = self.lock();
        if !self.enqueue(&mut state, Opcode::Text, frame.into(), unbounded) {
            return false;
        }
        if !state.in_batch {
            state.in_batch = true;
            batch.touched.push(self.clone());
        }
        true
    }

    /// Queues a control or binary frame (ping, pong, `/echo`'s answers) and writes what the
    /// socket takes now. Bounded like text frames.
    pub fn push_frame(&self, opcode: Opcode, payload: Bytes) -> bool {
        self.push_now(opcode, payload, false)
    }

    fn push_now(&self, opcode: Opcode, payload: Bytes, unbounded: bool) -> bool {
        let mut state = self.lock();
        if !self.enqueue(&mut state, opcode, payload, unbounded) {
            return false;
        }
        self.write_and_signal(&mut state);
        true
    }

    /// Ends the stream with a close frame: closes the queue to further frames, keeps what is
    /// queued when `keep_queued` (otherwise only a partly written frame, which must be
    /// finished), and queues the close frame after it. The caller then writes it out with
    /// [`write_pending`](Self::write_pending).
    pub fn close_with(&self, code: u16, reason: &str, keep_queued: bool) {
        let mut state = self.lock();
        if !keep_queued {
            state.drop_waiting();
        }
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        state.frames.push_back(Frame {
            opcode: Opcode::Close,
            payload: payload.into(),
            counted: 0,
        });
        state.closed.get_or_insert(CloseCode::Normal);
    }

    /// Closes the queue with `code`; later pushes are dropped. The first close wins.
    pub fn close(&self, code: CloseCode) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(code);
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Whether the queue has been closed, and with which code.
    pub fn closed(&self) -> Option<CloseCode> {
        self.lock().closed
    }

    /// Waits until the connection's task has something to do (see [`Outbound::ready`]'s
    /// field). A wake-up that arrives while nobody waits is kept, so none is missed.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Waits until the socket can take more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }

    /// Writes what is queued, as far as the socket takes it, and says what is left to do.
    /// Called by the connection's own task; a closed queue reports [`Progress::Closed`] before
    /// writing, so a slow consumer is cut off rather than waited for.
    pub fn write_pending(&self) -> Progress {
        let mut state = self.lock();
        if state.failed {
            return Progress::Failed;
        }
        if let Some(code) = state.closed {
            return Progress::Closed(code);
        }
        if state.in_batch {
            // A batch holds the writes and writes them ([`Batch::write`]), waking this task
            // if the socket is full then. Reporting `Blocked` here made the task wait for a
            // socket that is writable, at once, again and again, for as long as the batch was
            // held (a cluster room actor awaiting Redis holds one): a core spent spinning.
            return Progress::Done;
        }
        state.blocked = false;
        self.write_locked(&mut state);
        progress(&state)
    }

    /// Writes what is queued, including a close frame after a close, waiting for the socket
    /// as needed. Used to finish a connection ([`close_with`](Self::close_with)) and by
    /// `/echo`.
    /// While a batch holds the writes, it waits for the batch to write them: the socket is
    /// writable then, and waiting for that would come back at once without yielding, again
    /// and again, keeping the batch's own task from running on that worker.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            let held = {
                let mut state = self.lock();
                if state.in_batch {
                    state.flush_waits = true;
                    true
                } else {
                    state.blocked = false;
                    self.write_locked(&mut state);
                    if state.failed {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    }
                    if state.frames.is_empty() {
                        return Ok(());
                    }
                    false
                }
            };
            if held {
                // `Batch::write` wakes it (a permit if it comes first, so no wake-up is lost).
                self.ready.notified().await;
            } else {
                self.writable().await?;
            }
        }
    }

    /// Stops sending (FIN); the peer reads what was written, then end of stream.
    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(Shutdown::Write);
    }

    /// Ends the connection in both directions; later writes fail.
    pub fn shutdown(&self) {
        self.end(&mut self.lock());
    }

    /// Appends a frame, enforcing the bounds; `false` when the queue is closed or just
    /// overflowed (and closed with 4009).
    fn enqueue(&self, state: &mut State, opcode: Opcode, payload: Bytes, unbounded: bool) -> bool {
        if state.closed.is_some() || state.failed {
            return false;
        }
        let len = payload.len();
        let fits = state.frames.is_empty()
            || (state.frames.len() < self.bounds.frames && state.bytes + len <= self.bounds.bytes);
        if !fits && !unbounded {
            state.closed = Some(CloseCode::SlowConsumer);
            state.drop_waiting();
            self.ready.notify_one();
            return false;
        }
        let counted = if unbounded { 0 } else { len };
        state.frames.push_back(Frame {
            opcode,
            payload,
            counted,
        });
        state.bytes += counted;
        true
    }

    /// [`write_locked`](Self::write_locked) for a producer: when the socket stopped taking
    /// bytes or failed, the connection's task is woken to take over.
    fn write_and_signal(&self, state: &mut State) {
        if self.write_locked(state) {
            self.ready.notify_one();
        }
    }

    /// Writes from the front of the queue until it is empty or the socket would block. Not
    /// while a batch holds the writes back, nor while a previous write is waiting for the
    /// socket (the connection's task resumes it). Returns whether this call found the socket
    /// full or broken (the connection's task must take over); the connection's own task does
    /// not signal itself, or its wait for the socket would wake at once, again and again.
    fn write_locked(&self, state: &mut State) -> bool {
        if state.in_batch || state.blocked || state.failed {
            return false;
        }
        while !state.frames.is_empty() {
            match self.write_once(state) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    state.blocked = true;
                    return true;
                }
                Err(_) => {
                    state.fail();
                    return true;
                }
            }
        }
        // An idle connection keeps no queue: the allocation is one per write that emptied
        // it, against 176 bytes kept by every one of thousands of idle connections.
        if state.frames.capacity() > 0 {
            state.frames = VecDeque::new();
        }
        false
    }

    /// One vectored write of up to [`MAX_FRAMES_PER_WRITE`] frames from the front.
    fn write_once(&self, state: &mut State) -> io::Result<()> {
        let mut headers = [[0u8; 10]; MAX_FRAMES_PER_WRITE];
        let mut slices: [IoSlice<'_>; 2 * MAX_FRAMES_PER_WRITE] =
            [IoSlice::new(&[]); 2 * MAX_FRAMES_PER_WRITE];
        let count = state.frames.len().min(MAX_FRAMES_PER_WRITE);
        let mut lens = [0usize; MAX_FRAMES_PER_WRITE];
        for (k, frame) in state.frames.iter().take(count).enumerate() {
            lens[k] = header(&mut headers[k], frame.opcode, frame.payload.len());
        }
        let mut used = 0;
        let mut skip = state.written;
        for (k, frame) in state.frames.iter().take(count).enumerate() {
            for piece in [&headers[k][..lens[k]], &frame.payload[..]] {
                if skip >= piece.len() {
                    skip -= piece.len();
                    continue;
                }
                slices[used] = IoSlice::new(&piece[skip..]);
                skip = 0;
                used += 1;
            }
        }
        let mut written = self.stream.try_write_vectored(&slices[..used])?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Pop what went out in full; remember how far into the next frame it got.
        while written > 0 {
            let Some(front) = state.frames.front() else {
                break;
            };
            let size = header_len(front.payload.len()) + front.payload.len();
            let left = size - state.written;
            if written >= left {
                written -= left;
                state.written = 0;
                state.pop_sent();
            } else {
                state.written += written;
                written = 0;
            }
        }
        Ok(())
    }
}

fn progress(state: &State) -> Progress {
    if state.failed {
        Progress::Failed
    } else if let Some(code) = state.closed {
        Progress::Closed(code)
    } else if state.frames.is_empty() {
        Progress::Done
    } else {
        Progress::Blocked
    }
}

/// Frames per `writev`: two slices each, well under the kernel's `IOV_MAX` (1024).
const MAX_FRAMES_PER_WRITE: usize = 64;

fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Writes a server frame's header (FIN set, no mask) into `head`; returns its length.
fn header(head: &mut [u8; 10], opcode: Opcode, len: usize) -> usize {
    head[0] = 0x80 | opcode as u8;
    match header_len(len) {
        2 => head[1] = len as u8,
        4 => {
            head[1] = 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
    header_len(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn frame(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    /// A connected pair: the server side's write side, and the client socket.
    async fn pair(bounds: QueueBounds) -> (Arc<Outbound>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Arc::new(Outbound::new(server, bounds)), client)
    }

    #[test]
    fn headers_by_length() {
        let mut h = [0u8; 10];
        assert_eq!(header(&mut h, Opcode::Text, 5), 2);
        assert_eq!(&h[..2], &[0x81, 5]);
        assert_eq!(header(&mut h, Opcode::Text, 126), 4);
        assert_eq!(&h[..4], &[0x81, 126, 0, 126]);
        assert_eq!(header(&mut h, Opcode::Binary, 70_000), 10);
        assert_eq!(&h[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(header(&mut h, Opcode::Close, 2), 2);
        assert_eq!(&h[..2], &[0x88, 2]);
    }

    #[tokio::test]
    async fn a_frame_for_an_idle_connection_is_written_at_once() {
        let (out, mut client) = pair(QueueBounds {
            frames: 2,
            bytes: 100,
        })
        .await;
        assert!(out.push(Utf8Bytes::from("hi")));
        assert_eq!(out.write_pending(), Progress::Done);
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, &[0x81, 2, b'h', b'i']);
    }

    /// A connection (10 frames, 100 bytes) whose frame "a" a batch holds.
    /// A read of the client socket that must finish: 10 s is far past any real wait, so the
    /// test fails with `what` instead of hanging.
    async fn in_time<T>(read: impl std::future::Future<Output = io::Result<T>>, what: &str) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect(what)
            .unwrap()
    }

    async fn held_in_a_batch() -> (Arc<Outbound>, TcpStream, Batch) {
        let (out, client) = pair(QueueBounds {
            frames: 10,
            bytes: 100,
        })
        .await;
        let mut batch = Batch::default();
        assert!(out.push_in(Utf8Bytes::from("a"), &mut batch));
        (out, client, batch)
    }

    /// While a batch holds a connection's writes, its own task has nothing to do: `Done`, not
    /// `Blocked` (which sent it to wait for a writable socket, in a loop that never waited).
    #[tokio::test]
    async fn frames_held_by_a_batch_are_the_batchs_to_write() {
        let (out, mut client, batch) = held_in_a_batch().await;
        assert_eq!(out.write_pending(), Progress::Done, "the batch writes it");
        batch.write();
        assert_eq!(out.write_pending(), Progress::Done);
        let mut buf = [0u8; 3];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, &[0x81, 1, b'a']);
    }

    /// A batch dropped without `write` (a holder that returned early or panicked) still
    /// writes what it held; before, the frames stayed queued and the connection's writes
    /// stayed the batch's.
    #[tokio::test]
    async fn a_dropped_batch_writes_what_it_held() {
        let (out, mut client, batch) = held_in_a_batch().await;
        drop(batch);
        assert_eq!(out.write_pending(), Progress::Done);
        let mut buf = [0u8; 3];
        in_time(
            client.read_exact(&mut buf),
            "the dropped batch wrote its frame",
        )
        .await;
        assert_eq!(&buf, &[0x81, 1, b'a']);
    }

    /// A panic while a connection's queue was locked (a bug) poisons its lock. The connection
    /// then fails: the batch that held it drops without a panic (a panic there, during the
    /// unwinding of the panic that dropped it, would abort the whole node), its task hears
    /// `Failed`, and the peer sees the stream end rather than half a frame. Before, every
    /// later lock panicked.
    #[tokio::test]
    async fn a_poisoned_queue_fails_its_connection_instead_of_panicking() {
        let (out, mut client, batch) = held_in_a_batch().await;
        let poisoner = out.clone();
        let poisoned = std::thread::spawn(move || {
            let _state = poisoner.state.lock().unwrap();
            panic!("a bug while the queue is locked");
        })
        .join();
        assert!(poisoned.is_err() && out.state.is_poisoned());
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(batch)));
        assert!(dropped.is_ok(), "dropping the batch panicked");
        assert_eq!(out.write_pending(), Progress::Failed);
        assert!(
            !out.push(Utf8Bytes::from("b")),
            "a failed queue takes nothing"
        );
        let mut rest = Vec::new();
        in_time(
            client.read_to_end(&mut rest),
            "the peer sees the stream end",
        )
        .await;
        assert!(
            rest.is_empty(),
            "nothing was written after the panic: {rest:?}"
        );
    }

    /// A close while a batch holds the connection's writes (a cluster room actor awaiting
    /// Redis holds one): the flush waits for the batch to write the frames, then writes the
    /// close. It spun before: the socket was writable, the batch's frames were not its to
    /// write, and its wait for a writable socket never yielded, so the task that holds the
    /// batch could not run on that worker. Two such closes stopped a node for good (every
    /// worker spinning; `parley-bench check --mode cluster --clients 2000 --rooms 1000
    /// --rooms-per-client 1 --seed 10 --faults redis-restart,rollback,kill`). Run on a thread
    /// of its own, so that spinning fails the test instead of hanging it.
    #[test]
    fn a_flush_waits_for_the_batch_that_holds_the_writes() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (out, mut client, batch) = held_in_a_batch().await;
                out.close_with(1000, "", true);
                let flushing = tokio::spawn({
                    let out = out.clone();
                    async move { out.flush().await }
                });
                // One thread: the flush runs until it waits, and the batch still holds "a".
                tokio::task::yield_now().await;
                assert!(!flushing.is_finished(), "nothing can be written yet");
                batch.write();
                flushing.await.unwrap().unwrap();
                let mut buf = [0u8; 7];
                client.read_exact(&mut buf).await.unwrap();
                assert_eq!(
                    &buf,
                    &[0x81, 1, b'a', 0x88, 2, 0x03, 0xe8],
                    "the frame, then the close"
                );
            });
            done_tx.send(()).unwrap();
        });
        match done_rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the flush never gave its thread back (it spins)")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the test's thread failed (its panic is above)")
            }
        }
    }

    #[tokio::test]
    async fn a_batch_writes_once_in_order() {
        let (out, mut client) = pair(QueueBounds {
            frames: 10,
            bytes: 100,
        })
        .await;
        let mut batch = Batch::default();
        assert!(out.push_in(Utf8Bytes::from("a"), &mut batch));
        assert!(out.push_in(Utf8Bytes::from("b"), &mut batch));
        // A direct push while the batch holds the writes queues behind it.
        assert!(out.push(Utf8Bytes::from("c")));
        batch.write();
        let mut buf = [0u8; 9];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, &[0x81, 1, b'a', 0x81, 1, b'b', 0x81, 1, b'c']);
    }

    #[tokio::test]
    async fn overflow_closes_with_4009() {
        let (out, _client) = pair(QueueBounds {
            frames: 2,
            bytes: 100,
        })
        .await;
        // Held in a batch, so nothing is written and the queue fills.
        let mut batch = Batch::default();
        assert!(out.push_in(frame(10), &mut batch));
        assert!(out.push_in(frame(10), &mut batch));
        assert!(!out.push_in(frame(10), &mut batch));
        assert_eq!(out.closed(), Some(CloseCode::SlowConsumer));
        assert!(!out.push(frame(1)));
        assert_eq!(
            out.write_pending(),
            Progress::Closed(CloseCode::SlowConsumer)
        );
    }

    #[tokio::test]
    async fn one_big_frame_fits_an_empty_queue() {
        let bounds = QueueBounds {
            frames: 10,
            bytes: 100,
        };
        let (out, _client) = pair(bounds).await;
        let mut batch = Batch::default();
        assert!(out.push_in(frame(500), &mut batch));
        assert!(!out.push_in(frame(1), &mut batch));
        let (out, _client) = pair(bounds).await;
        let mut batch = Batch::default();
        assert!(out.push_in(frame(50), &mut batch));
        assert!(out.push_unbounded_in(frame(500), &mut batch));
        // The big frame does not count towards the byte bound of the frames after it.
        assert!(out.push_in(frame(50), &mut batch));
        assert!(!out.push_in(frame(1), &mut batch));
        assert_eq!(out.closed(), Some(CloseCode::SlowConsumer));
    }

    #[tokio::test]
    async fn the_byte_count_takes_off_exactly_what_it_added() {
        let (out, _client) = pair(QueueBounds {
            frames: 100,
            bytes: 100,
        })
        .await;
        // Held in a batch, so nothing is written: a big `joined` queued unbounded, then live
        // events behind it.
        let mut batch = Batch::default();
        assert!(out.push_unbounded_in(frame(500), &mut batch));
        assert!(out.push_in(frame(60), &mut batch));
        assert_eq!(out.lock().bytes, 60, "the unbounded frame adds nothing");
        // The big frame goes out: the 60 bytes behind it still count.
        out.lock().pop_sent();
        assert_eq!(out.lock().bytes, 60, "what leaves is what was added");
        // So the bound still holds at 100 bytes: 40 more fit, one more byte does not.
        assert!(out.push_in(frame(40), &mut batch));
        assert!(!out.push_in(frame(1), &mut batch));
        assert_eq!(out.closed(), Some(CloseCode::SlowConsumer));
        let mut state = out.lock();
        state.in_batch = false;
        // 4009 dropped the waiting frames; nothing is left counted.
        assert_eq!(state.bytes, 0);
    }

    #[tokio::test]
    async fn a_stalled_reader_backs_up_then_overflows() {
        let (out, mut client) = pair(QueueBounds {
            frames: 1_000_000,
            bytes: 1 << 20,
        })
        .await;
        // Nobody reads: the kernel's buffers fill, then the queue, then it closes.
        let big = Utf8Bytes::from("y".repeat(64 * 1024));
        let mut pushed = 0;
        while out.push(big.clone()) {
            pushed += 1;
            assert!(pushed < 10_000, "never overflowed");
        }
        assert_eq!(out.closed(), Some(CloseCode::SlowConsumer));
        // What was written is whole frames: the first one arrives intact.
        let mut head = [0u8; 10];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(&head[..2], &[0x81, 127]);
        assert_eq!(
            u64::from_be_bytes(head[2..10].try_into().unwrap()),
            64 * 1024
        );
    }
}
