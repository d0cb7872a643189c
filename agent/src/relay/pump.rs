//! Moving bytes between a TCP connection and a stream to the peer, both ways, with TCP's
//! half-close and reset mapped onto the stream's finish and reset. The stream is a QUIC stream or
//! a TLS connection of its own ([`super::tls_streams`]); [`ToPeer`] and [`FromPeer`] are what the
//! pump needs of either half:
//!
//! | event | mapped to |
//! |---|---|
//! | TCP read EOF (peer shut down writing) | QUIC `finish` |
//! | QUIC stream finished | TCP `shutdown(Write)` |
//! | TCP reset | QUIC `reset` + `stop` |
//! | QUIC stream reset or stopped | TCP reset (zero linger) |
//! | `cancel` completes with a code (link revoked, budget spent) | both: QUIC reset + TCP reset |
//! | the link's byte budget runs out mid-chunk | what fits passes, then both are reset |
//!
//! Over TLS, finish is TLS's `close_notify` and a TCP FIN; a reset is a TCP reset (it carries no
//! code: the peer sees a reset, whatever its cause).
//!
//! TCP → peer holds at most one buffer of [`CHUNK`] bytes; peer → TCP holds at most 32
//! received chunks (already inside the stream's flow-control window) until one `writev` takes
//! them. Everything else is flow control and TCP windows, so a slow reader slows the writer
//! instead of growing a queue.

use std::{future::Future, io::IoSlice, sync::Arc};

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::budget::LinkBudget;

/// Largest chunk moved at once, per direction (under glibc's mmap threshold, so buffers come
/// from the heap instead of fresh pages).
pub const CHUNK: usize = 64 * 1024;
/// Received chunks written to TCP in one `writev`.
pub const BATCH: usize = 32;
/// Spare room below which a new buffer is taken (the previous chunks are still in flight).
const MIN_SPARE: usize = 8 * 1024;

/// Stream error code: the TCP side reset.
pub const RESET_TCP: VarInt = VarInt::from_u32(1);
/// Stream error code: the link was revoked or expired.
pub const RESET_REVOKED: VarInt = VarInt::from_u32(2);
/// Stream error code: the link's byte budget is spent.
pub const RESET_BUDGET: VarInt = VarInt::from_u32(3);

/// The name of a stream error code, for logs.
pub fn reset_reason(code: VarInt) -> &'static str {
    match code.into_inner() {
        1 => "tcp_reset",
        2 => "revoked",
        3 => "budget_spent",
        _ => "unknown",
    }
}

/// The half of a stream that carries bytes to the peer.
pub trait ToPeer: Send {
    /// What carries the stream, for metrics: `quic` or `tls`.
    const OVER: &'static str;
    /// Sends `chunk`; false once the peer stopped or reset the stream.
    fn send(&mut self, chunk: Bytes) -> impl Future<Output = bool> + Send;
    /// Ends this direction cleanly: the peer reads its end.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
    /// Cuts the stream with `code`.
    fn reset(&mut self, code: VarInt);
}

/// The half of a stream that carries the peer's bytes here.
pub trait FromPeer: Send {
    /// Fills the front of `chunks` with what has arrived: how many, `None` at the peer's clean
    /// end, an error when the stream was reset.
    fn recv(
        &mut self,
        chunks: &mut [Bytes; BATCH],
    ) -> impl Future<Output = Result<Option<usize>, ()>> + Send;
    /// Tells the peer to stop sending, with `code`.
    fn stop(&mut self, code: VarInt);
}

impl ToPeer for SendStream {
    const OVER: &'static str = "quic";

    async fn send(&mut self, chunk: Bytes) -> bool {
        self.write_chunk(chunk).await.is_ok()
    }

    async fn finish(&mut self) {
        let _ = Self::finish(self);
    }

    fn reset(&mut self, code: VarInt) {
        let _ = Self::reset(self, code);
    }
}

impl FromPeer for RecvStream {
    async fn recv(&mut self, chunks: &mut [Bytes; BATCH]) -> Result<Option<usize>, ()> {
        self.read_chunks(chunks).await.map_err(|_| ())
    }

    fn stop(&mut self, code: VarInt) {
        let _ = Self::stop(self, code);
    }
}

/// Byte counters of one stream (the link's metric counters, shared), and its link's budget.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Bytes from TCP into the stream.
    pub sent: Counter,
    /// Bytes from the stream into TCP.
    pub received: Counter,
    /// The link's budget, when it has one.
    pub budget: Option<Arc<LinkBudget>>,
}

/// How a pumped stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished cleanly.
    Closed,
    /// One side reset; the reset was passed on.
    Reset,
    /// Cut short here with this stream error code (`cancel`, or the budget); both sides were
    /// reset.
    Cancelled(VarInt),
}

enum Dir {
    Done,
    Reset,
    /// The budget ran out.
    Spent,
}

/// How many of `n` bytes the budget lets through.
fn allowance(budget: Option<&LinkBudget>, n: usize) -> usize {
    match budget {
        None => n,
        Some(b) => usize::try_from(b.spend(n as u64)).unwrap_or(n),
    }
}

async fn tcp_to_peer(
    tcp: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut impl ToPeer,
    counter: &Counter,
    budget: Option<&LinkBudget>,
) -> Dir {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        if buf.capacity() - buf.len() < MIN_SPARE {
            buf.reserve(CHUNK);
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) => {
                send.finish().await;
                return Dir::Done;
            }
            Ok(n) => {
                let allowed = allowance(budget, n);
                counter.inc_by(allowed as u64);
                let mut chunk = buf.split().freeze();
                chunk.truncate(allowed);
                if !chunk.is_empty() && !send.send(chunk).await {
                    // The peer stopped or reset the stream.
                    return Dir::Reset;
                }
                if allowed < n {
                    return Dir::Spent;
                }
            }
            Err(_) => {
                send.reset(RESET_TCP);
                return Dir::Reset;
            }
        }
    }
}

async fn peer_to_tcp(
    recv: &mut impl FromPeer,
    tcp: &mut tokio::net::tcp::WriteHalf<'_>,
    counter: &Counter,
    budget: Option<&LinkBudget>,
) -> Dir {
    // Every received QUIC packet's stream data is its own chunk (~1.4 KB at Internet MTU);
    // taking all the ready ones at once and handing them to one `writev` saves a syscall per
    // packet.
    let mut chunks: [Bytes; BATCH] = Default::default();
    loop {
        match recv.recv(&mut chunks).await {
            Ok(Some(k)) => {
                let n: usize = chunks[..k].iter().map(Bytes::len).sum();
                let allowed = allowance(budget, n);
                counter.inc_by(allowed as u64);
                let mut left = allowed;
                let mut used = 0;
                for c in &mut chunks[..k] {
                    if left == 0 {
                        break;
                    }
                    c.truncate(left);
                    left -= c.len();
                    used += 1;
                }
                let written = write_all_vectored(tcp, &mut chunks[..used]).await;
                chunks[..k].fill(Bytes::new());
                if written.is_err() {
                    recv.stop(RESET_TCP);
                    return Dir::Reset;
                }
                if allowed < n {
                    return Dir::Spent;
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

/// Writes every byte of `chunks` to `tcp`, as few `writev` calls as the socket takes.
async fn write_all_vectored(
    tcp: &mut tokio::net::tcp::WriteHalf<'_>,
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let rest = &chunks[first..];
        let slices: [IoSlice<'_>; BATCH] =
            std::array::from_fn(|i| IoSlice::new(rest.get(i).map_or(&[][..], |c| &c[..])));
        let mut n = tcp.write_vectored(&slices[..rest.len()]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let c = &mut chunks[first];
            let take = n.min(c.len());
            c.advance(take);
            n -= take;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

/// Pumps `tcp` ⇄ (`send`, `recv`) until both directions end, a reset travels, the budget runs
/// out, or `cancel` completes with the stream error code to reset both sides with.
pub async fn pump(
    mut tcp: TcpStream,
    mut send: impl ToPeer,
    mut recv: impl FromPeer,
    counters: Counters,
    cancel: impl Future<Output = VarInt>,
) -> Ended {
    let _ = tcp.set_nodelay(true);
    let budget = counters.budget.as_deref();
    let ended = {
        let (mut tr, mut tw) = tcp.split();
        let up = tcp_to_peer(&mut tr, &mut send, &counters.sent, budget);
        let down = peer_to_tcp(&mut recv, &mut tw, &counters.received, budget);
        tokio::pin!(up, down, cancel);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                d = &mut up, if !up_done => match d {
                    Dir::Done => up_done = true,
                    Dir::Reset => break Ended::Reset,
                    Dir::Spent => break Ended::Cancelled(RESET_BUDGET),
                },
                d = &mut down, if !down_done => match d {
                    Dir::Done => down_done = true,
                    Dir::Reset => break Ended::Reset,
                    Dir::Spent => break Ended::Cancelled(RESET_BUDGET),
                },
                code = &mut cancel => break Ended::Cancelled(code),
            }
            if up_done && down_done {
                break Ended::Closed;
            }
        }
    };
    if ended != Ended::Closed {
        let code = match ended {
            Ended::Cancelled(code) => code,
            _ => RESET_TCP,
        };
        send.reset(code);
        recv.stop(code);
        // Dropping the socket with zero linger sends a TCP reset.
        let _ = tcp.set_zero_linger();
    }
    ended
}
