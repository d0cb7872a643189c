//! Streams over TLS: a relayed TCP connection carried on an mTLS TCP connection of its own
//! instead of a stream of the peer's QUIC connection (`--streams-over tls|auto`).
//!
//! ```text
//!  algorithm ──TCP──▶ agent ══ TLS 1.3 over TCP, mTLS, ALPN fedmesh-tcp/1 ══▶ agent ──TCP──▶ target
//!                             (the port number of the peer's QUIC endpoint)
//! ```
//!
//! Why: on a fast LAN the relay is bound by CPU, not by the path, and kernel TCP with
//! segmentation offload moves 16 KB TLS records for about half the CPU per byte that QUIC spends
//! on 1,452-byte packets (BENCHMARKS.md). Across a WAN a new connection costs handshake
//! round trips that QUIC's warm connection does not, and the kernel's loss-based congestion
//! control collapses under random loss where the relay's holds: there streams stay on QUIC.
//! `auto` chooses per stream from the round trip the peer's QUIC connection measures.
//!
//! Everything else is the QUIC stream's: the identities and verifiers (the dialler's certificate
//! is checked against the collaboration's standing at the handshake, the receiver's against the
//! SPIFFE ID dialled), the header ([`super::proto`]), admission, budgets, and the reset of the
//! stream when its link, or the peer's standing, ends. The source caps ([`super::limits`])
//! bound handshakes per source address; once a peer is authenticated, its TLS streams are
//! bounded as its QUIC streams are, by what its links allow. What differs: a reset carries no
//! code (the peer sees a TCP reset), and a peer that takes no TLS stream (it runs QUIC only, or
//! a firewall drops TCP) gets QUIC streams, and TLS again after [`RETRY_AFTER`], doubling with
//! each failure in a row.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::AsFd,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use fedmesh_certs::{PeerGate, SpiffeId, tls};
use fedmesh_documents::NodeRef;
use quinn::VarInt;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tracing::{debug, info, warn};

use super::{
    HANDSHAKE_TIMEOUT, PeerId, Shared, SourceSlot, TlsMaterial, UNLINKED_STREAMS, lock,
    pump::{BATCH, CHUNK, FromPeer, ToPeer},
};

/// The ALPN of TLS streams (QUIC's is [`super::proto::ALPN`]).
pub const ALPN: &[u8] = b"fedmesh-tcp/1";
/// How long a TCP connection to a peer may take before its stream goes over QUIC (a firewall
/// that drops TCP costs the first stream this much, then QUIC carries the peer's streams).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a peer that took no TLS stream gets QUIC streams before TLS is tried again; each
/// failure in a row doubles it, up to [`MAX_RETRY_AFTER`].
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The longest wait before TLS is tried again with a peer that takes none.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What carries a relayed connection to its peer (`--streams-over`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamsOver {
    /// A stream of the peer's QUIC connection: no handshake per connection, the relay's own
    /// congestion control, and the only way through a rendezvous.
    #[default]
    Quic,
    /// An mTLS TCP connection per stream, where the peer takes them (QUIC where it does not).
    Tls,
    /// TLS where the peer's QUIC connection measures a round trip under [`AUTO_TLS_BELOW`] (a
    /// LAN, where CPU and not the path bounds a stream); QUIC elsewhere.
    Auto,
}

/// In `auto`, the round trip under which streams go over TLS.
pub const AUTO_TLS_BELOW: Duration = Duration::from_millis(2);

impl StreamsOver {
    /// Whether a stream to a peer whose QUIC connection measures `rtt` (none yet: `None`) goes
    /// over TLS.
    pub fn tls_for(self, rtt: Option<Duration>) -> bool {
        match self {
            Self::Quic => false,
            Self::Tls => true,
            Self::Auto => rtt.is_some_and(|rtt| rtt < AUTO_TLS_BELOW),
        }
    }
}

/// The TLS configurations of TLS streams, both ways (rebuilt on certificate renewal).
pub(super) struct Configs {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl Configs {
    pub(super) fn new(material: &TlsMaterial<'_>, gate: &PeerGate) -> anyhow::Result<Self> {
        let server = tls::server_config_gated(material.identity, material.bundle, &[ALPN], gate)?;
        let client = tls::client_config_gated(material.identity, material.bundle, &[ALPN], gate)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The TLS streams' state in the relay: open inbound streams by peer, and peers that took none.
#[derive(Default)]
pub(super) struct Book {
    inbound: HashMap<NodeRef, u32>,
    inbound_total: u32,
    declined: HashMap<NodeRef, Declined>,
}

/// A peer that took no TLS stream: when to try again, and the wait after that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Declined {
    retry_at: Instant,
    next_wait: Duration,
}

impl Declined {
    /// After a failed TLS dial at `now`, following `before` (the previous failure in a row).
    fn after(before: Option<Self>, now: Instant) -> Self {
        let wait = before.map_or(RETRY_AFTER, |d| d.next_wait);
        Self {
            retry_at: now + wait,
            next_wait: (wait * 2).min(MAX_RETRY_AFTER),
        }
    }
}

/// Counts one inbound TLS stream of a peer while it lives.
struct Counted {
    shared: Arc<Shared>,
    peer: NodeRef,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut book = lock(&self.shared.tls_book);
        book.inbound_total = book.inbound_total.saturating_sub(1);
        if let Some(n) = book.inbound.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                book.inbound.remove(&self.peer);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The two halves the pump moves bytes through

type Stream = TlsStream<TcpStream>;

/// The half of a TLS stream towards the peer. It keeps its own handle on the socket, so a reset
/// can set zero linger on it: the last close then sends a TCP reset.
pub struct TlsSend {
    half: WriteHalf<Stream>,
    socket: socket2::Socket,
}

/// The half of a TLS stream from the peer.
pub struct TlsRecv {
    half: ReadHalf<Stream>,
    buf: BytesMut,
}

fn halves(stream: Stream) -> io::Result<(TlsSend, TlsRecv)> {
    let socket = socket2::Socket::from(stream.get_ref().0.as_fd().try_clone_to_owned()?);
    let (half_r, half_w) = tokio::io::split(stream);
    Ok((
        TlsSend {
            half: half_w,
            socket,
        },
        TlsRecv {
            half: half_r,
            buf: BytesMut::new(),
        },
    ))
}

impl ToPeer for TlsSend {
    const OVER: &'static str = "tls";

    async fn send(&mut self, chunk: Bytes) -> bool {
        // The flush hands what TLS buffered to the socket: the next read may wait for long.
        self.half.write_all(&chunk).await.is_ok() && self.half.flush().await.is_ok()
    }

    async fn finish(&mut self) {
        // `close_notify`, then a FIN: the peer reads a clean end.
        let _ = self.half.shutdown().await;
    }

    fn reset(&mut self, _code: VarInt) {
        let _ = self.socket.set_linger(Some(Duration::ZERO));
    }
}

impl FromPeer for TlsRecv {
    async fn recv(&mut self, chunks: &mut [Bytes; BATCH]) -> Result<Option<usize>, ()> {
        if self.buf.capacity() < CHUNK / 2 {
            self.buf.reserve(CHUNK);
        }
        // A FIN without `close_notify` is an error here (rustls): a truncation is a reset.
        match self.half.read_buf(&mut self.buf).await {
            Ok(0) => Ok(None),
            Ok(_) => {
                chunks[0] = self.buf.split().freeze();
                Ok(Some(1))
            }
            Err(_) => Err(()),
        }
    }

    fn stop(&mut self, _code: VarInt) {}
}

impl AsyncWrite for TlsSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.half).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_shutdown(cx)
    }
}

impl AsyncRead for TlsRecv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_read(cx, buf)
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound

/// Accepts TLS streams within the source caps.
pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "TLS stream accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = shared.admit_source(remote) else {
            continue;
        };
        shared.spawn(accept_one(shared.clone(), tcp, remote, slot));
    }
}

async fn accept_one(shared: Arc<Shared>, tcp: TcpStream, remote: SocketAddr, slot: SourceSlot) {
    let _ = tcp.set_nodelay(true);
    let acceptor = lock(&shared.tls).acceptor.clone();
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            shared.metrics.refuse("handshake");
            // Certificates the verifiers refuse are reported by the handshake observer.
            shared.handshake_failed(remote, &error.to_string(), is_certificate_error(&error));
            return;
        }
        Err(_) => {
            shared.metrics.refuse("handshake_timeout");
            debug!(%remote, "TLS stream handshake timed out");
            return;
        }
    };
    // The source caps bound what unauthenticated sources hold; past the handshake, what the
    // peer's links allow does.
    drop(slot);
    let certs = stream.get_ref().1.peer_certificates().unwrap_or_default();
    let peer = match PeerId::from_certs(certs) {
        Ok(peer) => peer,
        Err(error) => {
            warn!(%remote, peer = "(unusable certificate)", serial = "(unusable certificate)", %error, "TLS stream without a usable identity");
            return;
        }
    };
    let (send, recv) = match halves(stream.into()) {
        Ok(halves) => halves,
        Err(error) => return debug!(%remote, %error, "TLS stream socket unusable"),
    };
    let counted = shared.count_inbound(&peer);
    let over = counted.as_ref().err().cloned();
    super::inbound_stream(shared, peer, send, recv, over).await;
    drop(counted);
}

fn is_certificate_error(error: &io::Error) -> bool {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

impl Shared {
    /// Counts an inbound TLS stream of `peer`, or says why it is one too many: its links allow
    /// as many streams at once as they do on QUIC (never fewer than a few, so a peer without an
    /// inbound link is told why not), and all peers together hold at most the relay's
    /// connection cap.
    fn count_inbound(self: &Arc<Self>, peer: &PeerId) -> Result<Counted, String> {
        let allowed = self
            .config
            .borrow()
            .policy
            .inbound_streams(&peer.node, super::MAX_STREAMS)
            .map_or(UNLINKED_STREAMS, |n| n.max(UNLINKED_STREAMS));
        let mut book = lock(&self.tls_book);
        let held = book.inbound.get(&peer.node).copied().unwrap_or(0);
        if held >= allowed {
            return Err(format!(
                "{} already holds {held} TLS streams (at most {allowed})",
                peer.node
            ));
        }
        let cap = self.options.caps.connections;
        if book.inbound_total >= cap {
            return Err(format!("the relay holds {cap} TLS streams (at most {cap})"));
        }
        *book.inbound.entry(peer.node.clone()).or_default() += 1;
        book.inbound_total += 1;
        Ok(Counted {
            shared: self.clone(),
            peer: peer.node.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Outbound

/// Whether a stream to `peer` goes over TLS: the choice of `--streams-over` (the peer's round
/// trip is looked up only for `auto`), for a peer not known to take none.
pub(super) fn chosen(shared: &Shared, peer: &NodeRef) -> bool {
    let over = shared.options.streams_over;
    let rtt = match over {
        StreamsOver::Quic => return false,
        StreamsOver::Tls => None,
        StreamsOver::Auto => shared.peer_rtt(peer),
    };
    if !over.tls_for(rtt) {
        return false;
    }
    let book = lock(&shared.tls_book);
    book.declined
        .get(peer)
        .is_none_or(|d| Instant::now() >= d.retry_at)
}

/// Dials a TLS stream to `peer`: its halves and the peer's identity, or why not (the stream then
/// goes over QUIC).
pub(super) async fn dial(
    shared: &Shared,
    peer: &NodeRef,
) -> Result<(TlsSend, TlsRecv, PeerId), String> {
    let dialled = async {
        let id = SpiffeId::new(&shared.collab, &peer.org, &peer.node).map_err(|e| e.to_string())?;
        let endpoints = shared
            .config
            .borrow()
            .peers
            .get(peer)
            .cloned()
            .unwrap_or_default();
        let addr = shared.transport.locate(peer, &endpoints).await?;
        if !shared.transport.reaches_directly(addr) {
            return Err("it is reached through a rendezvous".to_owned());
        }
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("no TCP connection to {addr} within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("TCP to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(id.dns_name()).map_err(|e| e.to_string())?;
        let connector = lock(&shared.tls).connector.clone();
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| format!("no TLS handshake with {addr} within {HANDSHAKE_TIMEOUT:?}"))?
            .map_err(|e| format!("TLS with {addr}: {e}"))?;
        let certs = stream.get_ref().1.peer_certificates().unwrap_or_default();
        let who = PeerId::from_certs(certs)?;
        let (send, recv) = halves(stream.into()).map_err(|e| e.to_string())?;
        Ok((send, recv, who))
    };
    let result = dialled.await;
    let mut book = lock(&shared.tls_book);
    match &result {
        Ok(_) => {
            book.declined.remove(peer);
        }
        Err(error) => {
            let before = book.declined.get(peer).copied();
            let declined = Declined::after(before, Instant::now());
            book.declined.insert(peer.clone(), declined);
            let retry_in = declined.retry_at.saturating_duration_since(Instant::now());
            if before.is_none() {
                info!(%peer, %error, ?retry_in, "peer takes no TLS streams; its streams go over QUIC");
            } else {
                debug!(%peer, %error, ?retry_in, "peer still takes no TLS streams");
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_tls_only_on_a_short_measured_round_trip() {
        let auto = StreamsOver::Auto;
        assert!(auto.tls_for(Some(Duration::from_micros(300))));
        assert!(!auto.tls_for(Some(AUTO_TLS_BELOW)));
        assert!(!auto.tls_for(Some(Duration::from_millis(20))));
        assert!(!auto.tls_for(None), "no measurement yet: QUIC");
        assert!(StreamsOver::Tls.tls_for(None));
        assert!(!StreamsOver::Quic.tls_for(Some(Duration::from_micros(1))));
        assert_eq!(StreamsOver::default(), StreamsOver::Quic);
    }

    #[test]
    fn a_peer_that_keeps_declining_is_tried_ever_less_often() {
        let now = Instant::now();
        let first = Declined::after(None, now);
        assert_eq!(first.retry_at, now + RETRY_AFTER);
        let second = Declined::after(Some(first), now);
        assert_eq!(second.retry_at, now + 2 * RETRY_AFTER);
        let mut d = second;
        for _ in 0..20 {
            d = Declined::after(Some(d), now);
        }
        assert_eq!(d.retry_at, now + MAX_RETRY_AFTER);
    }
}
