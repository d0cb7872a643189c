//! Paths under the node-to-node QUIC session: direct UDP, or relayed through a rendezvous.
//!
//! ```text
//!  relay's quinn Endpoint (mTLS, admission, streams, revocation: unchanged)
//!        │ PathSocket (one quinn AsyncUdpSocket)
//!        ├── real address ──────────▶ direct UDP socket ──▶ peer's advertised QUIC endpoint
//!        └── 240.x.y.z (a peer) ─┬──▶ sealed datagram [header | bytes] (the same socket) ─┐
//!                                └──▶ Carrier: QUIC datagram [to peer | bytes] ───────────┴▶ rendezvous
//!                                     (until the sealed path answers; TLS/TCP carriers)  ──▶ peer
//! ```
//!
//! A peer reached through a rendezvous gets a synthetic address in 240.0.0.0/4 (reserved, never
//! a real host); the carrier maps it to the peer's name and back. quinn sees an ordinary UDP
//! socket, so the end-to-end session is the same TLS, the same admission and the same
//! revocation whatever the path; the rendezvous sees only (sender, receiver, opaque bytes).
//!
//! The carrier keeps one connection to the first rendezvous server of the collaboration's
//! owner-signed list that answers, pinned by the certificate hash the owner signed, and moves
//! to the next one when it is lost (a lost server is noticed within 2 s of silence, a server
//! that does not answer is given 1.5 s). Datagrams that find no carrier connection are dropped, as
//! UDP would; the end-to-end session retransmits.
//!
//! The carrier connection is QUIC over UDP, or TLS over TCP (an HTTP/1.1 upgrade, through an
//! HTTP CONNECT proxy when one applies) for sites that may open only TCP connections out: see
//! [`tcp`] and [`proxy`].
//!
//! The carrier connection is dialled from the relay's own endpoint (its socket), and when it is
//! QUIC, the relay's socket also sends the end-to-end packets straight to the rendezvous's port
//! as sealed datagrams ([`rendezvous::sealed`]: a 41-byte header sealed
//! with keys from the carrier connection, no second QUIC packet around them), and takes the
//! rendezvous's sealed datagrams off its own reads before quinn sees them. It probes every
//! [`PROBE_EVERY`]; the sealed path is used while the rendezvous's answers are at most
//! [`SEALED_LIVE`] old, and the carrier connection's datagrams otherwise.

pub mod proxy;
pub mod tcp;

use std::{
    collections::HashMap,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use fedmesh_certs::NodeIdentity;
use fedmesh_documents::{Endpoint, NodeRef, RendezvousServer};
use futures::future::BoxFuture;
use quinn::{
    AsyncUdpSocket, Connection, UdpPoller,
    crypto::rustls as qrustls,
    udp::{RecvMeta, Transmit},
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::transport::{DirectUdp, Transport};
use crate::rendezvous::{
    self, frame,
    sealed::{self, HEADER, Kind, Opener, Sealer},
};

/// Most peers one node maps to synthetic addresses.
const MAX_NAMES: u32 = 1 << 16;
/// Datagrams from the rendezvous waiting for the relay's endpoint.
const RECV_QUEUE: usize = 4096;
/// How long one rendezvous server may take to answer before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often the sealed path is probed (also what keeps a NAT's mapping for it).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How old the rendezvous's last answer to a probe may be for the sealed path to be used.
pub const SEALED_LIVE: Duration = Duration::from_secs(3);
/// The largest UDP payload one send of sealed datagrams may carry (a GSO batch included).
const MAX_SEND: usize = 65_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Peers reached through the rendezvous and their synthetic addresses, both ways, and their
/// sealed-datagram ids.
#[derive(Default)]
struct Names {
    by_node: HashMap<NodeRef, SocketAddr>,
    by_addr: HashMap<SocketAddr, (NodeRef, u64)>,
    by_id: HashMap<u64, SocketAddr>,
    /// The collaboration's members by id, for senders not yet given an address.
    members: HashMap<u64, NodeRef>,
}

impl Names {
    fn assign(&mut self, node: &NodeRef) -> Option<SocketAddr> {
        if let Some(addr) = self.by_node.get(node) {
            return Some(*addr);
        }
        let index = u32::try_from(self.by_node.len()).ok()?;
        if index >= MAX_NAMES {
            return None;
        }
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xF000_0000 | index)), 1);
        let id = sealed::peer_id(node);
        self.by_node.insert(node.clone(), addr);
        self.by_addr.insert(addr, (node.clone(), id));
        self.by_id.insert(id, addr);
        Some(addr)
    }

    /// The synthetic address of the sender of a sealed datagram, by its id.
    fn of_id(&mut self, id: u64) -> Option<SocketAddr> {
        if let Some(addr) = self.by_id.get(&id) {
            return Some(*addr);
        }
        let node = self.members.get(&id)?.clone();
        self.assign(&node)
    }
}

/// The sealed path to the rendezvous of the current QUIC carrier connection.
struct SealedPath {
    /// The rendezvous's address, in the relay socket's family.
    rendezvous: SocketAddr,
    seal: Mutex<Sealer>,
    open: Mutex<Opener>,
    started: std::time::Instant,
    /// Milliseconds after `started` of the last answer to a probe, plus one (0: none yet).
    answered: std::sync::atomic::AtomicU64,
}

impl SealedPath {
    fn live(&self) -> bool {
        let answered = self.answered.load(Ordering::Relaxed);
        answered > 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(answered - 1)
                < SEALED_LIVE.as_millis() as u64
    }

    fn answer(&self) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.answered.store(now, Ordering::Relaxed);
    }
}

/// Whether `addr` is a synthetic (relayed) address, and its canonical IPv4 form.
fn synthetic(addr: SocketAddr) -> Option<SocketAddr> {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
    };
    (ip.octets()[0] & 0xF0 == 0xF0).then(|| SocketAddr::new(IpAddr::V4(ip), addr.port()))
}

/// The connection to a rendezvous server, and the peers' names.
pub struct Carrier {
    conn: Mutex<Option<rendezvous::tcp::Link>>,
    options: Mutex<tcp::CarrierOptions>,
    /// In `auto`, whether TLS/TCP won the last time (it then starts first).
    prefer_tcp: AtomicBool,
    names: Mutex<Names>,
    to_endpoint: mpsc::Sender<(SocketAddr, Bytes)>,
    servers: watch::Sender<Vec<RendezvousServer>>,
    identity: Mutex<Arc<NodeIdentity>>,
    /// The address family of the relay's socket (synthetic addresses are reported in it).
    v6: bool,
    /// The relay's own endpoint: carrier connections dial from the relay's socket, so a
    /// rendezvous behind a load balancer sees the carrier connection and the sealed datagrams
    /// as one flow (one replica, one NAT mapping).
    relay_endpoint: std::sync::OnceLock<quinn::Endpoint>,
    /// A socket of its own, for a relay bound to loopback and a rendezvous elsewhere.
    own_endpoint: quinn::Endpoint,
    connected: watch::Sender<Option<String>>,
    /// The relay's own socket, which sealed datagrams travel on.
    direct: Arc<dyn AsyncUdpSocket>,
    sealed: Mutex<Option<Arc<SealedPath>>>,
}

impl std::fmt::Debug for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Carrier")
            .field("connected", &*self.connected.borrow())
            .finish_non_exhaustive()
    }
}

impl Carrier {
    /// The rendezvous servers to use, in order (from the owner-signed collaboration).
    pub fn set_servers(&self, servers: Vec<RendezvousServer>) {
        self.servers.send_if_modified(|current| {
            let changed = *current != servers;
            *current = servers.clone();
            changed
        });
    }

    /// Which carrier (QUIC/UDP, TLS/TCP or the first that answers) and proxy to use from the
    /// next connection on.
    pub fn set_options(&self, options: tcp::CarrierOptions) {
        *lock(&self.options) = options;
    }

    /// The collaboration's members (senders of sealed datagrams are named by id only).
    pub fn set_members(&self, members: impl IntoIterator<Item = NodeRef>) {
        lock(&self.names).members = members
            .into_iter()
            .map(|node| (sealed::peer_id(&node), node))
            .collect();
    }

    /// The identity to present to rendezvous servers from the next connection on.
    pub fn set_identity(&self, identity: Arc<NodeIdentity>) {
        *lock(&self.identity) = identity;
    }

    /// The rendezvous server connected to (`host:port`), if any.
    pub fn connected(&self) -> watch::Receiver<Option<String>> {
        self.connected.subscribe()
    }

    fn address_of(&self, node: &NodeRef) -> Option<SocketAddr> {
        let addr = lock(&self.names).assign(node)?;
        Some(self.in_family(addr))
    }

    /// `addr` in the relay socket's address family.
    fn in_family(&self, addr: SocketAddr) -> SocketAddr {
        match self.v6 {
            true => SocketAddr::new(
                IpAddr::V6(match addr.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                }),
                addr.port(),
            ),
            false => SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        }
    }

    fn send(&self, destination: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let Some((node, _)) = lock(&self.names).by_addr.get(&destination).cloned() else {
            return;
        };
        let Some(link) = lock(&self.conn).clone() else {
            return;
        };
        for datagram in contents.chunks(segment.unwrap_or(contents.len()).max(1)) {
            // Dropped when it does not fit or the queue is full: UDP semantics.
            let _ = link.send(frame::encode(&node, datagram));
        }
    }

    /// Keeps a connection to the first rendezvous server that answers until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut servers = self.servers.subscribe();
        let mut pause = Duration::from_millis(100);
        let mut start = 0;
        loop {
            let list = servers.borrow_and_update().clone();
            if list.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = servers.changed() => continue,
                }
            }
            let mut served = false;
            // After losing a server, the next one is tried first (failover), then the rest in
            // order, back to the one lost.
            for k in 0..list.len() {
                let index = (start + k) % list.len();
                let server = &list[index];
                if stop.is_cancelled() {
                    return;
                }
                match self.dial(server).await {
                    Ok(mut dialled) => {
                        // One server: its carrier connection, replaced by QUIC when a node on
                        // TLS/TCP in `auto` finds UDP answering again.
                        loop {
                            let (link, carrier) = (dialled.link(), dialled.kind());
                            info!(rendezvous = %server.address, carrier, "connected to the rendezvous");
                            let sealed = match &dialled {
                                tcp::Dialled::Quic(conn) => self.sealed_path(conn),
                                tcp::Dialled::Tcp(_) => None,
                            };
                            *lock(&self.sealed) = sealed.clone();
                            *lock(&self.conn) = Some(link.clone());
                            self.connected.send_replace(Some(server.address.clone()));
                            let on_tcp = matches!(dialled, tcp::Dialled::Tcp(_));
                            let next = tokio::select! {
                                () = self.probe(sealed) => None,
                                _ = stop.cancelled() => {
                                    link.close(rendezvous::close::SHUTDOWN, b"shutdown");
                                    None
                                }
                                reason = self.receive(dialled) => {
                                    warn!(rendezvous = %server.address, carrier, %reason, "rendezvous connection lost");
                                    None
                                }
                                _ = servers.changed() => {
                                    link.close(rendezvous::close::SHUTDOWN, b"server list changed");
                                    None
                                }
                                quic = self.quic_again(server, on_tcp) => Some(quic),
                            };
                            *lock(&self.conn) = None;
                            *lock(&self.sealed) = None;
                            self.connected.send_replace(None);
                            match next {
                                Some(quic) => {
                                    info!(rendezvous = %server.address, "QUIC/UDP answers again: leaving the TLS/TCP carrier");
                                    link.close(rendezvous::close::SHUTDOWN, b"moving to QUIC");
                                    dialled = tcp::Dialled::Quic(quic);
                                }
                                None => break,
                            }
                        }
                        served = true;
                        start = (index + 1) % list.len();
                        pause = Duration::from_millis(100);
                        break;
                    }
                    Err(error) => {
                        warn!(rendezvous = %server.address, error = %format!("{error:#}"), "cannot reach the rendezvous");
                    }
                }
            }
            if !served {
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The sealed path beside QUIC carrier connection `conn`: its keys from the connection's
    /// TLS exporter.
    fn sealed_path(&self, conn: &Connection) -> Option<Arc<SealedPath>> {
        let rendezvous = self.in_family(conn.remote_address());
        let local = self.direct.local_addr().ok()?;
        if local.ip().is_loopback() && !rendezvous.ip().to_canonical().is_loopback() {
            info!(relay = %local, "the relay's socket is on loopback: no sealed path to the rendezvous, its carrier connection (from a socket of its own) carries everything");
            return None;
        }
        let mut secret = [0; sealed::SECRET_LEN];
        conn.export_keying_material(&mut secret, sealed::LABEL, b"")
            .ok()?;
        let (seal, open) = sealed::SessionKeys::new(&secret).node();
        Some(Arc::new(SealedPath {
            rendezvous,
            seal: Mutex::new(seal),
            open: Mutex::new(open),
            started: std::time::Instant::now(),
            answered: 0.into(),
        }))
    }

    /// Probes the sealed path every [`PROBE_EVERY`] from the relay's socket (never returns).
    async fn probe(&self, path: Option<Arc<SealedPath>>) {
        let Some(path) = path else {
            return std::future::pending().await;
        };
        // Until the first answer, probes follow quickly: the rendezvous opens the session only
        // once its side of the handshake is done, which may be after the first probe arrives.
        let mut pause = Duration::from_millis(50);
        loop {
            let mut header = [0; HEADER];
            lock(&path.seal).seal(Kind::Ping, 0, &mut header);
            // A probe that finds a full buffer is simply not sent: the next one follows.
            let sent = self.direct.try_send(&Transmit {
                destination: path.rendezvous,
                ecn: None,
                contents: &header,
                segment_size: None,
                src_ip: None,
            });
            if let Err(error) = sent {
                debug!(to = %path.rendezvous, %error, "sealed path probe not sent");
            }
            tokio::time::sleep(pause).await;
            pause = match path.answered.load(Ordering::Relaxed) {
                0 => (pause * 2).min(PROBE_EVERY),
                _ => PROBE_EVERY,
            };
        }
    }

    /// The sealed path, if the rendezvous answered its probes lately.
    fn live_sealed(&self) -> Option<Arc<SealedPath>> {
        lock(&self.sealed).clone().filter(|p| p.live())
    }

    /// The endpoint to dial `rendezvous` from: the relay's, unless its socket is on loopback
    /// and the rendezvous is not.
    fn endpoint_for(&self, rendezvous: IpAddr) -> Result<&quinn::Endpoint> {
        let relay = self
            .relay_endpoint
            .get()
            .context("the relay's endpoint is not up yet")?;
        let on_loopback = relay.local_addr().is_ok_and(|l| l.ip().is_loopback());
        Ok(
            match on_loopback && !rendezvous.to_canonical().is_loopback() {
                true => &self.own_endpoint,
                false => relay,
            },
        )
    }

    async fn connect(&self, server: &RendezvousServer) -> Result<Connection> {
        let v6 = self.v6;
        let addr = tokio::net::lookup_host(&server.address)
            .await
            .with_context(|| format!("resolving {}", server.address))?
            .find(|a| a.is_ipv4() || v6)
            .with_context(|| format!("{} resolves to no usable address", server.address))?;
        let endpoint = self.endpoint_for(addr.ip())?;
        // The relay's socket may be dual-stack: an IPv4 rendezvous as a mapped address.
        let addr = match endpoint.local_addr().is_ok_and(|l| l.is_ipv6()) {
            true => self.in_family(addr),
            false => addr,
        };
        let identity = lock(&self.identity).clone();
        let tls =
            crate::hub::tls::pinned_client_config(&server.pin_sha256, &identity, rendezvous::ALPN)?;
        let crypto = qrustls::QuicClientConfig::try_from(tls).context("QUIC client TLS")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(rendezvous::carrier_transport(1024 * 1024));
        let connecting = endpoint
            .connect_with(config, addr, "rendezvous.fedmesh")
            .context("dialling the rendezvous")?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .context("no answer")?
            .context("handshake")?;
        super::carrier_socket::log_stats(&conn, "node".into());
        Ok(conn)
    }

    /// Passes datagrams from the rendezvous to the relay's endpoint until the connection ends.
    async fn receive(&self, dialled: tcp::Dialled) -> String {
        match dialled {
            tcp::Dialled::Quic(conn) => loop {
                match conn.read_datagram().await {
                    Ok(datagram) => self.deliver(datagram),
                    Err(e) => return e.to_string(),
                }
            },
            tcp::Dialled::Tcp(tcp) => {
                let tcp::TcpCarrier {
                    link,
                    stream,
                    leftover,
                } = *tcp;
                link.run(stream, leftover, |datagram| self.deliver(datagram))
                    .await
            }
        }
    }

    fn deliver(&self, datagram: Bytes) {
        let Ok((sender, payload)) = frame::decode(&datagram, usize::from(u16::MAX)) else {
            debug!("malformed datagram from the rendezvous dropped");
            return;
        };
        let Some(addr) = self.address_of(&sender) else {
            return;
        };
        // A full queue drops, as a full socket buffer would.
        let _ = self.to_endpoint.try_send((addr, payload));
    }
}

/// The socket the relay's endpoint runs on: direct UDP, or relayed by synthetic address.
#[derive(Debug)]
pub struct PathSocket {
    direct: Arc<dyn AsyncUdpSocket>,
    carrier: Arc<Carrier>,
    from_carrier: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    relayed_first: AtomicBool,
    /// Where sealed datagrams are assembled before a send.
    scratch: Mutex<Vec<u8>>,
}

impl PathSocket {
    /// Sends `transmit` (for the peer at synthetic `destination`) as sealed datagrams.
    fn send_sealed(
        &self,
        path: &SealedPath,
        destination: SocketAddr,
        transmit: &Transmit<'_>,
    ) -> io::Result<()> {
        let Some(peer) = lock(&self.carrier.names)
            .by_addr
            .get(&destination)
            .map(|(_, id)| *id)
        else {
            return Ok(());
        };
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let per_send = (MAX_SEND / (segment + HEADER)).max(1);
        let mut buf = lock(&self.scratch);
        for group in transmit.contents.chunks(segment * per_send) {
            buf.clear();
            {
                let mut seal = lock(&path.seal);
                for datagram in group.chunks(segment) {
                    seal.seal_into(Kind::Data, peer, datagram, &mut buf);
                }
            }
            let sent = self.direct.try_send(&Transmit {
                destination: path.rendezvous,
                ecn: None,
                contents: &buf,
                segment_size: (group.len() > segment).then_some(segment + HEADER),
                src_ip: None,
            });
            match sent {
                // quinn tries the whole transmit again later (sealed anew).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // Anything else is a lost datagram, as UDP would have it.
                _ => {}
            }
        }
        Ok(())
    }

    /// Opens the rendezvous's sealed datagrams among `n` received ones, in place: each becomes
    /// its payload from the sender's synthetic address (or is emptied, which quinn skips).
    fn unseal(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) {
        let Some(path) = lock(&self.carrier.sealed).clone() else {
            return;
        };
        let from_rendezvous = |addr: SocketAddr| {
            addr.port() == path.rendezvous.port()
                && addr.ip().to_canonical() == path.rendezvous.ip().to_canonical()
        };
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            if !from_rendezvous(m.addr) || !sealed::is_sealed(&buf[..m.len.min(1)]) {
                continue;
            }
            self.unseal_one(&path, buf, m);
        }
    }

    fn unseal_one(&self, path: &SealedPath, buf: &mut [u8], m: &mut RecvMeta) {
        let (len, stride) = (m.len, m.stride.max(1));
        let mut open = lock(&path.open);
        let mut names = lock(&self.carrier.names);
        let mut first: Option<SocketAddr> = None;
        let (mut written, mut start, mut refused) = (0, 0, 0);
        while start < len {
            let end = (start + stride).min(len);
            let opened = open.open(&buf[start..end]);
            match opened {
                Ok((Kind::Data, peer)) if end - start > HEADER => match names.of_id(peer) {
                    Some(addr) => {
                        let addr = self.carrier.in_family(addr);
                        if first.is_none_or(|f| f == addr) {
                            first = Some(addr);
                            buf.copy_within(start + HEADER..end, written);
                            written += end - start - HEADER;
                        } else {
                            // Another sender in the same read: through the queue.
                            let payload = Bytes::copy_from_slice(&buf[start + HEADER..end]);
                            let _ = self.carrier.to_endpoint.try_send((addr, payload));
                        }
                    }
                    None => refused += 1,
                },
                Ok((Kind::Pong, _)) => path.answer(),
                _ => refused += 1,
            }
            start = end;
        }
        if refused > 0 {
            debug!(refused, "sealed datagrams from the rendezvous refused");
        }
        m.len = written;
        m.stride = stride.saturating_sub(HEADER).max(1);
        m.ecn = None;
        if let Some(addr) = first {
            m.addr = addr;
        }
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.direct.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match synthetic(transmit.destination) {
            Some(destination) => match self.carrier.live_sealed() {
                Some(path) => self.send_sealed(&path, destination, transmit),
                None => {
                    self.carrier
                        .send(destination, transmit.contents, transmit.segment_size);
                    Ok(())
                }
            },
            None => self.direct.try_send(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Alternate which source goes first, so neither starves the other.
        let relayed_first = self.relayed_first.fetch_xor(true, Ordering::Relaxed);
        if !relayed_first && let Poll::Ready(r) = self.direct.poll_recv(cx, bufs, meta) {
            if let Ok(n) = r {
                self.unseal(bufs, meta, n);
            }
            return Poll::Ready(r);
        }
        let mut n = 0;
        {
            let mut rx = lock(&self.from_carrier);
            while n < bufs.len().min(meta.len()) {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some((addr, payload))) => {
                        let len = payload.len().min(bufs[n].len());
                        bufs[n][..len].copy_from_slice(&payload[..len]);
                        meta[n] = RecvMeta {
                            addr,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: None,
                        };
                        n += 1;
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        if relayed_first {
            let r = ready!(self.direct.poll_recv(cx, bufs, meta));
            if let Ok(n) = r {
                self.unseal(bufs, meta, n);
            }
            return Poll::Ready(r);
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.direct.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.direct.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.direct.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.direct.may_fragment()
    }
}

/// Direct UDP and the rendezvous carrier under one socket: the relay's [`Transport`] when the
/// collaboration lists rendezvous servers (or may).
#[derive(Debug)]
pub struct Paths {
    direct: DirectUdp,
    socket: Arc<PathSocket>,
    carrier: Arc<Carrier>,
}

impl Paths {
    /// Binds the direct UDP socket on `addr` and a client socket for the carrier, presenting
    /// `identity` to rendezvous servers.
    pub fn bind(addr: SocketAddr, identity: Arc<NodeIdentity>) -> Result<Self> {
        let direct = DirectUdp::bind(addr)?;
        let direct_socket = direct.socket();
        let v6 = direct_socket.local_addr()?.is_ipv6();
        let carrier_bind: SocketAddr = match v6 {
            true => (Ipv6Addr::UNSPECIFIED, 0).into(),
            false => (Ipv4Addr::UNSPECIFIED, 0).into(),
        };
        let own_endpoint =
            super::carrier_socket::client_endpoint(carrier_bind).context("binding the carrier")?;
        let (tx, rx) = mpsc::channel(RECV_QUEUE);
        let carrier = Arc::new(Carrier {
            direct: direct_socket.clone(),
            sealed: Mutex::new(None),
            conn: Mutex::new(None),
            options: Mutex::new(tcp::CarrierOptions::default()),
            prefer_tcp: AtomicBool::new(false),
            names: Mutex::new(Names::default()),
            to_endpoint: tx,
            servers: watch::channel(Vec::new()).0,
            identity: Mutex::new(identity),
            v6,
            relay_endpoint: std::sync::OnceLock::new(),
            own_endpoint,
            connected: watch::channel(None).0,
        });
        let socket = Arc::new(PathSocket {
            direct: direct_socket,
            carrier: carrier.clone(),
            from_carrier: Mutex::new(rx),
            relayed_first: AtomicBool::new(false),
            scratch: Mutex::new(Vec::new()),
        });
        Ok(Self {
            direct,
            socket,
            carrier,
        })
    }

    /// The rendezvous carrier (its servers, identity and task).
    pub fn carrier(&self) -> Arc<Carrier> {
        self.carrier.clone()
    }
}

impl Transport for Paths {
    fn socket(&self) -> Arc<dyn AsyncUdpSocket> {
        self.socket.clone()
    }

    fn attach(&self, endpoint: &quinn::Endpoint) {
        let _ = self.carrier.relay_endpoint.set(endpoint.clone());
    }

    fn reaches_directly(&self, addr: SocketAddr) -> bool {
        synthetic(addr).is_none()
    }

    /// Direct when the peer advertises a QUIC endpoint, else through the rendezvous when it
    /// asks for that (the node plan passes only the endpoint it chose).
    fn locate<'a>(
        &'a self,
        peer: &'a NodeRef,
        endpoints: &'a [Endpoint],
    ) -> BoxFuture<'a, Result<SocketAddr, String>> {
        Box::pin(async move {
            if endpoints.iter().any(|e| matches!(e, Endpoint::Quic { .. })) {
                return self.direct.locate(peer, endpoints).await;
            }
            if endpoints.contains(&Endpoint::Rendezvous) {
                return self
                    .carrier
                    .address_of(peer)
                    .ok_or_else(|| format!("too many peers to relay; {peer} left out"));
            }
            Err(format!("{peer} advertises no endpoint this node can reach"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_addresses_are_reserved_and_stable() {
        let mut names = Names::default();
        let a: NodeRef = "org-a/n1".parse().unwrap();
        let b: NodeRef = "org-b/n1".parse().unwrap();
        let addr_a = names.assign(&a).unwrap();
        assert_eq!(addr_a, "240.0.0.0:1".parse().unwrap());
        assert_eq!(names.assign(&b).unwrap(), "240.0.0.1:1".parse().unwrap());
        assert_eq!(names.assign(&a).unwrap(), addr_a, "stable");
        assert_eq!(names.by_addr[&addr_a], (a.clone(), sealed::peer_id(&a)));
        assert_eq!(names.of_id(sealed::peer_id(&a)), Some(addr_a));
        assert_eq!(names.of_id(sealed::peer_id(&b)), Some(names.by_node[&b]));
        let c: NodeRef = "org-c/n1".parse().unwrap();
        assert_eq!(names.of_id(sealed::peer_id(&c)), None, "not a member");
        names.members.insert(sealed::peer_id(&c), c.clone());
        assert_eq!(
            names.of_id(sealed::peer_id(&c)),
            Some("240.0.0.2:1".parse().unwrap())
        );
        assert_eq!(synthetic(addr_a), Some(addr_a));
        assert_eq!(
            synthetic("[::ffff:240.0.0.1]:1".parse().unwrap()),
            Some("240.0.0.1:1".parse().unwrap())
        );
        assert_eq!(synthetic("127.0.0.1:4433".parse().unwrap()), None);
        assert_eq!(synthetic("[::1]:4433".parse().unwrap()), None);
    }
}
