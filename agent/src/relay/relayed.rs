//! Paths under the node-to-node QUIC session: direct UDP, or relayed through a rendezvous.
//!
//! ```text
//!  relay's quinn Endpoint (mTLS, admission, streams, revocation: unchanged)
//!        │ PathSocket (one quinn AsyncUdpSocket)
//!        ├── real address ──────────▶ direct UDP socket ──▶ peer's advertised QUIC endpoint
//!        └── 240.x.y.z (a peer) ────▶ Carrier: QUIC datagram [to peer | bytes] ──▶ rendezvous
//!                                                                              ──▶ peer's carrier
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
    task::{Context, Poll},
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
use crate::rendezvous::{self, frame};

/// Most peers one node maps to synthetic addresses.
const MAX_NAMES: u32 = 1 << 16;
/// Datagrams from the rendezvous waiting for the relay's endpoint.
const RECV_QUEUE: usize = 4096;
/// How long one rendezvous server may take to answer before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Peers reached through the rendezvous and their synthetic addresses, both ways.
#[derive(Default)]
struct Names {
    by_node: HashMap<NodeRef, SocketAddr>,
    by_addr: HashMap<SocketAddr, NodeRef>,
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
        self.by_node.insert(node.clone(), addr);
        self.by_addr.insert(addr, node.clone());
        Some(addr)
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
    endpoint: quinn::Endpoint,
    connected: watch::Sender<Option<String>>,
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
        Some(match self.v6 {
            true => SocketAddr::new(
                IpAddr::V6(match addr.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                }),
                addr.port(),
            ),
            false => addr,
        })
    }

    fn send(&self, destination: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let Some(node) = lock(&self.names).by_addr.get(&destination).cloned() else {
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
                    Ok(dialled) => {
                        let (link, carrier) = (dialled.link(), dialled.kind());
                        info!(rendezvous = %server.address, carrier, "connected to the rendezvous");
                        *lock(&self.conn) = Some(link.clone());
                        self.connected.send_replace(Some(server.address.clone()));
                        tokio::select! {
                            _ = stop.cancelled() => {
                                link.close(rendezvous::close::SHUTDOWN, b"shutdown");
                            }
                            reason = self.receive(dialled) => {
                                warn!(rendezvous = %server.address, carrier, %reason, "rendezvous connection lost");
                            }
                            _ = servers.changed() => {
                                link.close(rendezvous::close::SHUTDOWN, b"server list changed");
                            }
                        }
                        *lock(&self.conn) = None;
                        self.connected.send_replace(None);
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

    async fn connect(&self, server: &RendezvousServer) -> Result<Connection> {
        let addr = tokio::net::lookup_host(&server.address)
            .await
            .with_context(|| format!("resolving {}", server.address))?
            .find(|a| a.is_ipv4() || self.endpoint.local_addr().is_ok_and(|l| l.is_ipv6()))
            .with_context(|| format!("{} resolves to no usable address", server.address))?;
        let identity = lock(&self.identity).clone();
        let tls =
            crate::hub::tls::pinned_client_config(&server.pin_sha256, &identity, rendezvous::ALPN)?;
        let crypto = qrustls::QuicClientConfig::try_from(tls).context("QUIC client TLS")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(rendezvous::carrier_transport(1024 * 1024));
        let connecting = self
            .endpoint
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
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.direct.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match synthetic(transmit.destination) {
            Some(destination) => {
                self.carrier
                    .send(destination, transmit.contents, transmit.segment_size);
                Ok(())
            }
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
            return self.direct.poll_recv(cx, bufs, meta);
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
        let endpoint =
            super::carrier_socket::client_endpoint(carrier_bind).context("binding the carrier")?;
        let (tx, rx) = mpsc::channel(RECV_QUEUE);
        let carrier = Arc::new(Carrier {
            conn: Mutex::new(None),
            options: Mutex::new(tcp::CarrierOptions::default()),
            prefer_tcp: AtomicBool::new(false),
            names: Mutex::new(Names::default()),
            to_endpoint: tx,
            servers: watch::channel(Vec::new()).0,
            identity: Mutex::new(identity),
            v6,
            endpoint,
            connected: watch::channel(None).0,
        });
        let socket = Arc::new(PathSocket {
            direct: direct_socket,
            carrier: carrier.clone(),
            from_carrier: Mutex::new(rx),
            relayed_first: AtomicBool::new(false),
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
        assert_eq!(names.by_addr[&addr_a], a);
        assert_eq!(synthetic(addr_a), Some(addr_a));
        assert_eq!(
            synthetic("[::ffff:240.0.0.1]:1".parse().unwrap()),
            Some("240.0.0.1:1".parse().unwrap())
        );
        assert_eq!(synthetic("127.0.0.1:4433".parse().unwrap()), None);
        assert_eq!(synthetic("[::1]:4433".parse().unwrap()), None);
    }
}
