//! A server-side WebSocket connection with no per-connection write buffer.
//!
//! tungstenite parses what the client sends (framing, masking, fragmentation, UTF-8, control
//! frames, size limits) from the read half; parley writes its own frames to the write half:
//! a 2 to 10 byte header and the shared payload bytes, with one vectored write per batch. A
//! frame encoded once for a room is therefore never copied per member, and an idle connection
//! keeps no output buffer (tungstenite's grows to the largest batch ever sent and keeps it).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

pub use tungstenite::Message;

type Io = TokioIo<Upgraded>;

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

/// The read limits of a socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    /// Largest frame and message accepted (bigger: tungstenite's capacity error, close 1009).
    pub max_frame_bytes: usize,
    /// Initial read buffer; it grows only while a bigger frame is being read.
    pub read_buffer_bytes: usize,
}

/// One upgraded connection.
pub struct Socket {
    reader: WebSocketStream<ReadOnly>,
    writer: WriteHalf<Io>,
}

impl Socket {
    /// Wraps an upgraded connection (the handshake response has been sent).
    pub async fn new(upgraded: Upgraded, limits: SocketLimits) -> Socket {
        let (read, writer) = tokio::io::split(TokioIo::new(upgraded));
        let config = WebSocketConfig::default()
            .read_buffer_size(limits.read_buffer_bytes)
            .max_message_size(Some(limits.max_frame_bytes))
            .max_frame_size(Some(limits.max_frame_bytes));
        let reader =
            WebSocketStream::from_raw_socket(ReadOnly(read), Role::Server, Some(config)).await;
        Socket { reader, writer }
    }

    /// The next message from the client. Pings and closes are returned too: answering them is
    /// the caller's job (tungstenite's automatic answers go nowhere, see [`ReadOnly`]).
    pub async fn recv(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        self.reader.next().await
    }

    /// Writes frames of one kind, in order, with as few system calls as the kernel allows.
    pub async fn send_all<'a>(
        &mut self,
        opcode: Opcode,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<()> {
        let payloads: Vec<&[u8]> = payloads.into_iter().collect();
        let headers: Vec<([u8; 10], usize)> =
            payloads.iter().map(|p| header(opcode, p.len())).collect();
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(payloads.len() * 2);
        for (payload, (head, len)) in payloads.iter().zip(&headers) {
            pieces.push(&head[..*len]);
            if !payload.is_empty() {
                pieces.push(payload);
            }
        }
        write_pieces(&mut self.writer, &pieces).await?;
        self.writer.flush().await
    }

    /// Writes one frame.
    pub async fn send(&mut self, opcode: Opcode, payload: &[u8]) -> io::Result<()> {
        self.send_all(opcode, [payload]).await
    }

    /// Writes a close frame with `code` and `reason`.
    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.send(Opcode::Close, &payload).await
    }

    /// Ends the connection politely after a close frame was sent: no more writes (FIN), then
    /// read and discard whatever the client still sends until it closes too, for at most
    /// `grace`. Dropping a socket with unread input would make the kernel reset it, and the
    /// client could lose the close frame (and the frames before it) it had not read yet.
    pub async fn finish(mut self, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            let _ = self.writer.shutdown().await;
            let raw = &mut self.reader.get_mut().0;
            let mut sink = [0u8; 1024];
            while let Ok(n) = raw.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// A WebSocket frame header for a server frame (FIN set, no mask): its bytes and length.
fn header(opcode: Opcode, len: usize) -> ([u8; 10], usize) {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode as u8;
    if len < 126 {
        head[1] = len as u8;
        (head, 2)
    } else if len <= u16::MAX as usize {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (head, 4)
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (head, 10)
    }
}

/// Writes every piece, in order, with vectored writes of at most 64 pieces each.
async fn write_pieces(writer: &mut WriteHalf<Io>, pieces: &[&[u8]]) -> io::Result<()> {
    let (mut index, mut offset) = (0usize, 0usize);
    while index < pieces.len() {
        let slices: Vec<IoSlice<'_>> = pieces[index..]
            .iter()
            .take(64)
            .enumerate()
            .map(|(k, piece)| IoSlice::new(if k == 0 { &piece[offset..] } else { piece }))
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let left = pieces[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}

/// The read half, as the stream tungstenite parses. tungstenite also wants to write (its
/// automatic pong and close replies, into its own buffer): those bytes are accepted and dropped
/// here, because the session writes its own answers.
pub struct ReadOnly(ReadHalf<Io>);

impl AsyncRead for ReadOnly {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadOnly {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_by_length() {
        assert_eq!(&header(Opcode::Text, 5).0[..2], &[0x81, 5]);
        let (h, n) = header(Opcode::Text, 126);
        assert_eq!(&h[..n], &[0x81, 126, 0, 126]);
        let (h, n) = header(Opcode::Binary, 70_000);
        assert_eq!(&h[..n], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(&header(Opcode::Close, 2).0[..2], &[0x88, 2]);
    }
}
