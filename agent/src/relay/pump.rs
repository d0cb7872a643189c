//! Moving bytes between a TCP connection and a QUIC stream, both ways, with TCP's half-close and
//! reset mapped onto the stream's finish and reset:
//!
//! | event | mapped to |
//! |---|---|
//! | TCP read EOF (peer shut down writing) | QUIC `finish` |
//! | QUIC stream finished | TCP `shutdown(Write)` |
//! | TCP reset | QUIC `reset` + `stop` |
//! | QUIC stream reset or stopped | TCP reset (zero linger) |
//! | `cancel` completes (link revoked) | both: QUIC reset + TCP reset |
//!
//! Each direction holds at most one chunk of [`CHUNK`] bytes; everything else is QUIC flow
//! control and TCP windows, so a slow reader slows the writer instead of growing a queue.

use std::future::Future;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Largest chunk moved at once, per direction (under glibc's mmap threshold, so buffers come
/// from the heap instead of fresh pages).
pub const CHUNK: usize = 64 * 1024;
/// Spare room below which a new buffer is taken (the previous chunks are still in flight).
const MIN_SPARE: usize = 8 * 1024;

/// Stream error code: the TCP side reset.
pub const RESET_TCP: VarInt = VarInt::from_u32(1);
/// Stream error code: the link was revoked or expired.
pub const RESET_REVOKED: VarInt = VarInt::from_u32(2);

/// Byte counters of one stream (the link's metric counters, shared).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Bytes from TCP into the stream.
    pub sent: Counter,
    /// Bytes from the stream into TCP.
    pub received: Counter,
}

/// How a pumped stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished cleanly.
    Closed,
    /// One side reset; the reset was passed on.
    Reset,
    /// `cancel` fired; both sides were reset.
    Cancelled,
}

enum Dir {
    Done,
    Reset,
}

async fn tcp_to_quic(
    tcp: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream,
    counter: &Counter,
) -> Dir {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        if buf.capacity() - buf.len() < MIN_SPARE {
            buf.reserve(CHUNK);
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = send.finish();
                return Dir::Done;
            }
            Ok(n) => {
                counter.inc_by(n as u64);
                if send.write_chunk(buf.split().freeze()).await.is_err() {
                    // The peer stopped or reset the stream.
                    return Dir::Reset;
                }
            }
            Err(_) => {
                let _ = send.reset(RESET_TCP);
                return Dir::Reset;
            }
        }
    }
}

async fn quic_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut tokio::net::tcp::WriteHalf<'_>,
    counter: &Counter,
) -> Dir {
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                counter.inc_by(chunk.bytes.len() as u64);
                if tcp.write_all(&chunk.bytes).await.is_err() {
                    let _ = recv.stop(RESET_TCP);
                    return Dir::Reset;
                }
            }
            Ok(None) => {
                let _ = tcp.shutdown().await;
                return Dir::Done;
            }
            Err(_) => return Dir::Reset,
        }
    }
}

/// Pumps `tcp` ⇄ (`send`, `recv`) until both directions end, a reset travels, or `cancel`
/// completes.
pub async fn pump(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    counters: Counters,
    cancel: impl Future<Output = ()>,
) -> Ended {
    let _ = tcp.set_nodelay(true);
    let ended = {
        let (mut tr, mut tw) = tcp.split();
        let up = tcp_to_quic(&mut tr, &mut send, &counters.sent);
        let down = quic_to_tcp(&mut recv, &mut tw, &counters.received);
        tokio::pin!(up, down, cancel);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                d = &mut up, if !up_done => match d {
                    Dir::Done => up_done = true,
                    Dir::Reset => break Ended::Reset,
                },
                d = &mut down, if !down_done => match d {
                    Dir::Done => down_done = true,
                    Dir::Reset => break Ended::Reset,
                },
                () = &mut cancel => break Ended::Cancelled,
            }
            if up_done && down_done {
                break Ended::Closed;
            }
        }
    };
    if ended != Ended::Closed {
        let code = if ended == Ended::Cancelled {
            RESET_REVOKED
        } else {
            RESET_TCP
        };
        let _ = send.reset(code);
        let _ = recv.stop(code);
        // Dropping the socket with zero linger sends a TCP reset.
        let _ = tcp.set_zero_linger();
    }
    ended
}
