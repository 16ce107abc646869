//! A server-side WebSocket connection on a raw TCP socket.
//!
//! tungstenite parses what the client sends (framing, masking, fragmentation, UTF-8, control
//! frames, size limits); parley writes its own frames through the connection's [`Outbound`]:
//! a 2 to 10 byte header and the shared payload bytes. A frame encoded once for a room is
//! therefore never copied per member, and an idle connection keeps no output buffer
//! (tungstenite's grows to the largest batch ever sent and keeps it).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::WebSocket;

pub use crate::outbound::Opcode;
use crate::outbound::{Outbound, QueueBounds};
pub use tungstenite::Message;

/// The limits of a socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    /// Largest frame and message accepted (bigger: tungstenite's capacity error, close 1009).
    pub max_frame_bytes: usize,
    /// Initial read buffer; it grows only while a bigger frame is being read.
    pub read_buffer_bytes: usize,
    /// The outbound queue's bounds.
    pub queue: QueueBounds,
}

/// One upgraded connection.
pub struct Socket {
    reader: WebSocket<ReadOnly>,
    out: Arc<Outbound>,
}

impl Socket {
    /// Wraps an upgraded connection (the handshake response has been sent). `pre` is what the
    /// client sent after its handshake request and the HTTP server already read.
    pub fn new(stream: TcpStream, pre: Bytes, limits: SocketLimits) -> Socket {
        let out = Arc::new(Outbound::new(stream, limits.queue));
        let config = WebSocketConfig::default()
            .read_buffer_size(limits.read_buffer_bytes)
            .max_message_size(Some(limits.max_frame_bytes))
            .max_frame_size(Some(limits.max_frame_bytes));
        let read = ReadOnly {
            out: out.clone(),
            pre: (!pre.is_empty()).then_some(pre),
        };
        let reader = WebSocket::from_raw_socket(read, Role::Server, Some(config));
        Socket { reader, out }
    }

    /// The connection's write side.
    pub fn outbound(&self) -> &Arc<Outbound> {
        &self.out
    }

    /// The next message from the client. Pings and closes are returned too: answering them is
    /// the caller's job (tungstenite's automatic answers go nowhere, see [`ReadOnly`]).
    ///
    /// tungstenite parses from the non-blocking socket; when it has read everything there is
    /// this waits for more. Dropping this future loses nothing: a partly read frame stays in
    /// tungstenite's buffer. The future is a reference and nothing more (a `readable().await`
    /// would keep a ~200-byte readiness future in every idle connection's task).
    pub fn recv(
        &mut self,
    ) -> impl Future<Output = Option<Result<Message, tungstenite::Error>>> + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, tungstenite::Error>>> {
        loop {
            match self.reader.read() {
                Ok(message) => return Poll::Ready(Some(Ok(message))),
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The failed read cleared the socket's readiness: this registers the waker.
                    if let Err(e) = ready!(self.out.stream().poll_read_ready(cx)) {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Poll::Ready(None)
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    /// Writes one frame and everything queued before it.
    pub async fn send(&mut self, opcode: Opcode, payload: Bytes) -> io::Result<()> {
        if !self.out.push_frame(opcode, payload) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.out.flush().await
    }

    /// Writes a close frame with `code` and `reason` after what is queued (or, unless
    /// `keep_queued`, after only a partly written frame), then ends the connection politely
    /// (`finish`). Each step gets at most `grace`.
    pub async fn close(self, code: u16, reason: &str, keep_queued: bool, grace: Duration) {
        self.out.close_with(code, reason, keep_queued);
        if let Ok(Ok(())) = tokio::time::timeout(grace, self.out.flush()).await {
            self.finish(grace).await;
        }
    }

    /// Ends the connection politely after a close frame was written: no more writes (FIN),
    /// then read and discard whatever the client still sends until it closes too, for at most
    /// `grace`. Dropping a socket with unread input would make the kernel reset it, and the
    /// client could lose the close frame (and the frames before it) it had not read yet.
    async fn finish(self, grace: Duration) {
        self.out.shutdown_write();
        let stream = self.out.stream();
        let _ = tokio::time::timeout(grace, async {
            let mut sink = [0u8; 1024];
            loop {
                if stream.readable().await.is_err() {
                    break;
                }
                match stream.try_read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        })
        .await;
        self.out.shutdown();
    }
}

impl Drop for Socket {
    /// The hub or a broker request may still hold the write side for a moment: the
    /// connection ends now all the same.
    fn drop(&mut self) {
        self.out.shutdown();
    }
}

/// Whether a short read means the socket is empty: mio's epoll and kqueue back ends (tokio's
/// `poll_read` uses the same test).
const SHORT_READ_EMPTIES: bool = cfg!(any(
    target_os = "linux",
    target_os = "android",
    target_os = "illumos",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
));

/// The read side, as the stream tungstenite parses: first the bytes the HTTP server read past
/// the handshake, then the socket. tungstenite also wants to write (its automatic pong and
/// close replies, into its own buffer): those bytes are accepted and dropped here, because the
/// session writes its own answers.
pub struct ReadOnly {
    out: Arc<Outbound>,
    pre: Option<Bytes>,
}

impl io::Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(pre) = &mut self.pre {
            let n = pre.len().min(buf.len());
            buf[..n].copy_from_slice(&pre.split_to(n));
            if pre.is_empty() {
                self.pre = None;
            }
            return Ok(n);
        }
        // With epoll or kqueue a short read leaves the socket empty (tokio's own `poll_read`
        // reasons the same way, on the same platforms), so it clears the socket's readiness as
        // of before the read: the next read then waits for the next arrival, instead of asking
        // the kernel once more for nothing (a second `recvfrom` for every message a client
        // sends). Data that arrives after the read raises the readiness again. Elsewhere (mio's
        // emulated readiness) only `WouldBlock` may clear it.
        let stream = self.out.stream();
        let mut got = 0;
        let read = stream.try_io(Interest::READABLE, || {
            got = (&*SockRef::from(stream)).read(buf)?;
            if SHORT_READ_EMPTIES && got > 0 && got < buf.len() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        match read {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            read => read,
        }
    }
}

impl io::Write for ReadOnly {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
