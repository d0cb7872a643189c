//! The rendezvous: a blind, stateless forwarder for nodes that accept no inbound connections.
//!
//! ```text
//!  node A ──QUIC (mTLS: A's collaboration certificate; server pinned)──▶ rendezvous
//!     datagram [to B | opaque bytes]  ──▶  checks: A and B connected members, A within its rate
//!                                          ──▶ datagram [from A | the same bytes] ──▶ node B
//! ```
//!
//! Nodes dial out to the rendezvous with their collaboration client certificate. It accepts a
//! certificate only if its chain ends at the collaboration CA, its SPIFFE ID is of the
//! collaboration's trust domain and its standing (members, revoked nodes and serials from the
//! owner-signed documents) admits it; connections whose standing changes are closed. Each
//! QUIC datagram names the receiver; the rendezvous replaces the name with the sender's
//! verified name and passes the payload on unchanged. The payload is a datagram of the
//! end-to-end node-to-node QUIC session (mutual TLS between the two nodes, admission by
//! owner-signed links), so the rendezvous cannot read it, forge it or open a link.
//!
//! Why QUIC datagrams, not streams: the payload is itself QUIC, which retransmits and controls
//! congestion end to end; carrying it on a reliable stream would retransmit twice and make one
//! lost packet stall every flow behind it. Datagrams keep UDP's semantics: a datagram that does
//! not fit or finds a full queue is dropped and the end-to-end session recovers.
//!
//! Bounds: one connection per node (a new one replaces the old), at most
//! [`RendezvousOptions::max_nodes`] nodes, frames of at most [`RendezvousOptions::max_frame`]
//! bytes, a per-node token bucket of [`RendezvousOptions::rate`] bytes per second, and a
//! per-receiver send queue of [`RendezvousOptions::queue_bytes`] (quinn drops the oldest
//! datagram when it is full). No stream may be opened, nothing is written to disk.
//!
//! The same frames also travel over TLS/TCP (an HTTP/1.1 upgrade, through HTTP CONNECT proxies),
//! for sites that may open only TCP connections out: see [`tcp`]. Admission, bounds and
//! forwarding are the same whatever the carrier, and a node on one reaches a node on the other.
//!
//! A node whose carrier is QUIC over UDP also sends the end-to-end packets to the same port as
//! sealed datagrams, without a second QUIC packet around each: a header sealed with keys from
//! its carrier connection (see [`sealed`]), opened and resealed in the socket under the endpoint
//! (`fast`), with the same admission, rate and revocation as the connection they come from.

mod fast;
pub mod follow;
pub mod frame;
pub mod http;
pub mod mesh;
pub mod sealed;
pub mod tcp;
pub mod upgrade;

use std::{
    collections::HashMap,
    future::Future,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use fedmesh_certs::{CertInfo, PeerGate, Standing, TrustBundle, files, fingerprint, tls};
use fedmesh_documents::NodeRef;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use quinn::{Connection, Endpoint, TransportConfig, VarInt, crypto::rustls as qrustls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::throttle::Throttle;

/// The ALPN of the node↔rendezvous connection.
pub const ALPN: &[u8] = b"fedmesh-rendezvous/1";

/// The UDP payload size the carrier connection starts at and never goes below: room for a
/// 1200-byte end-to-end QUIC datagram, its frame header and the carrier's own QUIC overhead.
/// Fits a 1500-byte Ethernet MTU (IPv4 and IPv6).
pub const CARRIER_MTU: u16 = 1400;

/// Application close codes of rendezvous connections.
pub mod close {
    use quinn::VarInt;
    /// The rendezvous is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The node's standing no longer admits it (revoked, not a member).
    pub const REFUSED: VarInt = VarInt::from_u32(2);
    /// A newer connection of the same node replaced this one.
    pub const REPLACED: VarInt = VarInt::from_u32(5);
    /// The rendezvous serves as many nodes as it may.
    pub const FULL: VarInt = VarInt::from_u32(4);
}

/// Bounds of the rendezvous.
#[derive(Clone, Copy, Debug)]
pub struct RendezvousOptions {
    /// Bytes per second one node may send through the rendezvous (a token bucket).
    pub rate: u64,
    /// Bytes one node may send at once above its rate.
    pub burst: u64,
    /// Bytes queued towards one receiver before the oldest datagram is dropped.
    pub queue_bytes: usize,
    /// The largest frame accepted.
    pub max_frame: usize,
    /// Most nodes connected at once.
    pub max_nodes: usize,
}

impl Default for RendezvousOptions {
    fn default() -> Self {
        Self {
            rate: 64 * 1024 * 1024,
            burst: 4 * 1024 * 1024,
            queue_bytes: 1024 * 1024,
            max_frame: 1 + frame::MAX_NODE_LEN + usize::from(crate::relay::DEFAULT_MAX_UDP_PAYLOAD),
            max_nodes: 10_000,
        }
    }
}

/// What the rendezvous admits, from the collaboration's verified documents.
#[derive(Clone, Debug)]
pub struct RendezvousConfig {
    /// The collaboration CA.
    pub bundle: TrustBundle,
    /// Members and revocations.
    pub standing: Standing,
}

/// The rendezvous server's own certificate and key (self-signed; nodes pin its SHA-256).
pub struct ServerCert {
    cert: CertificateDer<'static>,
    key_pem: String,
}

impl ServerCert {
    /// Loads `<dir>/rendezvous-cert.pem` and `<dir>/rendezvous-key.pem`, making them (key
    /// `0600`, certificate for `names`) when neither exists. The pin the owner lists is the
    /// certificate's: keep the files across restarts.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self> {
        let cert_path = dir.join("rendezvous-cert.pem");
        let key_path = dir.join("rendezvous-key.pem");
        if !cert_path.exists() && !key_path.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = rcgen::CertificateParams::new(names.to_vec())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "fedmesh rendezvous");
            let now = SystemTime::now();
            params.not_before = now.into();
            params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
            let cert = params.self_signed(&key)?;
            files::create_secret(&key_path, key.serialize_pem().as_bytes())?;
            files::write_public(&cert_path, cert.pem().as_bytes())?;
        }
        let cert_pem = files::read_to_string(&cert_path)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?;
        let key_pem = files::read_to_string(&key_path)?;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
        Ok(Self { cert, key_pem })
    }

    /// Lower-case hex SHA-256 of the certificate: what the owner lists as its pin.
    pub fn pin(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The certificate (DER).
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The private key (to present the certificate as a client: to the hub, to peer replicas).
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>> {
        self.key()
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("rendezvous key")
    }

    /// The QUIC server config: this certificate, client certificates of `bundle`'s trust
    /// domain that pass `gate`, the carrier transport with `queue_bytes` per connection.
    pub fn quic_server_config(
        &self,
        bundle: &TrustBundle,
        gate: &PeerGate,
        queue_bytes: usize,
    ) -> Result<quinn::ServerConfig> {
        let rustls = tls::server_config_for_members(
            vec![self.cert.clone()],
            self.key()?,
            bundle,
            &[ALPN],
            gate,
        )?;
        let crypto = qrustls::QuicServerConfig::try_from(rustls).context("QUIC server TLS")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(carrier_transport(queue_bytes));
        server.max_incoming(1024);
        Ok(server)
    }
}

/// Labels: the collaboration and a direction (`in`: from nodes, `out`: to nodes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// The collaboration id.
    pub collab: String,
    /// `in` or `out`.
    pub direction: &'static str,
}

/// Labels: the collaboration and why a datagram was dropped or a node refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// The collaboration id.
    pub collab: String,
    /// Why.
    pub reason: &'static str,
}

/// Labels: the collaboration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollabLabels {
    /// The collaboration id.
    pub collab: String,
}

/// The rendezvous's Prometheus metrics: per collaboration and direction, never per content.
pub struct RendezvousMetrics {
    registry: Registry,
    /// Datagrams forwarded, by collaboration and direction.
    pub datagrams: Family<FlowLabels, Counter>,
    /// Payload bytes forwarded, by collaboration and direction.
    pub bytes: Family<FlowLabels, Counter>,
    /// Datagrams dropped, by collaboration and reason.
    pub dropped: Family<DropLabels, Counter>,
    /// Handshakes and connections refused, by collaboration and reason.
    pub refused: Family<DropLabels, Counter>,
    /// Nodes connected.
    pub nodes: Family<CollabLabels, Gauge>,
    /// Nodes connected over the TLS/TCP carrier (of [`RendezvousMetrics::nodes`]).
    pub tcp_nodes: Family<CollabLabels, Gauge>,
    /// Sealed datagrams (of [`RendezvousMetrics::datagrams`]), by collaboration and direction.
    pub sealed: Family<FlowLabels, Counter>,
    /// Between replicas.
    pub mesh: mesh::MeshMetrics,
}

impl Default for RendezvousMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let datagrams = Family::<FlowLabels, Counter>::default();
        let bytes = Family::<FlowLabels, Counter>::default();
        let dropped = Family::<DropLabels, Counter>::default();
        let refused = Family::<DropLabels, Counter>::default();
        let nodes = Family::<CollabLabels, Gauge>::default();
        let tcp_nodes = Family::<CollabLabels, Gauge>::default();
        let sealed = Family::<FlowLabels, Counter>::default();
        registry.register(
            "fedmesh_rendezvous_datagrams",
            "Datagrams forwarded, by collaboration and direction",
            datagrams.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_bytes",
            "Payload bytes forwarded, by collaboration and direction",
            bytes.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_dropped",
            "Datagrams dropped, by collaboration and reason",
            dropped.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_refused",
            "Nodes refused or disconnected, by collaboration and reason",
            refused.clone(),
        );
        registry.register("fedmesh_rendezvous_nodes", "Nodes connected", nodes.clone());
        registry.register(
            "fedmesh_rendezvous_tcp_nodes",
            "Nodes connected over the TLS/TCP carrier",
            tcp_nodes.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_sealed_datagrams",
            "Datagrams forwarded as sealed datagrams (the fast path beside carrier connections), by collaboration and direction",
            sealed.clone(),
        );
        let mesh = mesh::MeshMetrics::register(&mut registry);
        Self {
            registry,
            datagrams,
            bytes,
            dropped,
            refused,
            nodes,
            tcp_nodes,
            sealed,
            mesh,
        }
    }
}

impl RendezvousMetrics {
    /// OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// One connected node.
struct Client {
    conn: tcp::Link,
    serial: String,
    info: CertInfo,
}

struct Shared {
    endpoint: Endpoint,
    collab: watch::Sender<Option<RendezvousConfig>>,
    gate: PeerGate,
    server: ServerCert,
    clients: Mutex<HashMap<NodeRef, Client>>,
    metrics: Arc<RendezvousMetrics>,
    throttle: Throttle,
    options: RendezvousOptions,
    mesh: std::sync::OnceLock<Arc<mesh::Mesh>>,
    plane: Arc<fast::Plane>,
    demux: Arc<fast::Demux>,
}

impl Shared {
    /// Counts a refused connection of `collab` for `reason`.
    fn count_refused(&self, collab: &str, reason: &'static str) {
        self.metrics
            .refused
            .get_or_create(&DropLabels {
                collab: collab.to_owned(),
                reason,
            })
            .inc();
    }

    fn announce(&self, change: mesh::Presence) {
        if let Some(mesh) = self.mesh.get() {
            mesh.announce(change);
        }
    }
}

impl mesh::Local for Shared {
    fn collab(&self) -> String {
        collab_of(self)
    }

    fn nodes(&self) -> Vec<NodeRef> {
        lock(&self.clients).keys().cloned().collect()
    }

    fn admits(&self, node: &NodeRef) -> bool {
        self.gate
            .standing()
            .is_some_and(|s| s.check_node(&node.org, &node.node).is_ok())
    }

    fn deliver(
        &self,
        sender: &NodeRef,
        receiver: &NodeRef,
        payload: &[u8],
    ) -> std::result::Result<(), &'static str> {
        if self.plane.send_sealed(sender, receiver, payload) {
            return Ok(());
        }
        let to = lock(&self.clients)
            .get(receiver)
            .map(|c| c.conn.clone())
            .ok_or("unknown_peer")?;
        let out = frame::encode(sender, payload);
        let len = out.len() as u64;
        to.send(out)?;
        let flow = FlowLabels {
            collab: collab_of(self),
            direction: "out",
        };
        self.metrics.datagrams.get_or_create(&flow).inc();
        self.metrics.bytes.get_or_create(&flow).inc_by(len);
        Ok(())
    }
}

impl fast::Fallback for Shared {
    fn forward_slow(
        &self,
        sender: &NodeRef,
        receiver: &NodeRef,
        payload: &[u8],
    ) -> std::result::Result<(), &'static str> {
        if lock(&self.clients).contains_key(receiver) {
            return mesh::Local::deliver(self, sender, receiver, payload);
        }
        match self.mesh.get() {
            Some(mesh) => mesh.forward(&collab_of(self), sender, receiver, payload),
            None => Err("unknown_peer"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The rendezvous server: a QUIC endpoint and its tasks.
pub struct Rendezvous {
    shared: Arc<Shared>,
}

impl Rendezvous {
    /// A rendezvous on `socket`, presenting `server`. It refuses every node until
    /// [`Rendezvous::update`] brings a verified collaboration.
    pub fn new(
        socket: UdpSocket,
        server: ServerCert,
        options: RendezvousOptions,
        metrics: Arc<RendezvousMetrics>,
    ) -> Result<Self> {
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Bounds what a node's path MTU discovery may reach; frames are bounded separately.
        endpoint_config
            .max_udp_payload_size(8192)
            .context("rendezvous UDP payload")?;
        // Sealed datagrams share the port: no peer may clear QUIC's fixed bit (see `sealed`).
        endpoint_config.grease_quic_bit(false);
        crate::relay::carrier_socket::size_socket((&socket).into());
        let socket = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
        let plane = Arc::new(fast::Plane::new(socket.clone(), metrics.clone()));
        let demux = Arc::new(fast::Demux::new(socket, plane.clone()));
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config,
            None,
            demux.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        let (collab, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            endpoint,
            collab,
            gate: PeerGate::new(Standing::default()),
            server,
            clients: Mutex::new(HashMap::new()),
            metrics,
            throttle: Throttle::default(),
            options,
            mesh: std::sync::OnceLock::new(),
            plane,
            demux,
        });
        let fallback: Arc<dyn fast::Fallback> = shared.clone();
        shared.plane.set_fallback(Arc::downgrade(&fallback));
        Ok(Self { shared })
    }

    /// Makes this server a replica that forwards to its peer replicas (see [`mesh`]) over
    /// `socket`; [`Rendezvous::run`] runs the mesh too. Call once, before `run`.
    pub fn start_mesh(
        &self,
        socket: UdpSocket,
        options: mesh::MeshOptions,
    ) -> Result<Arc<mesh::Mesh>> {
        let local: Arc<dyn mesh::Local> = self.shared.clone();
        let mesh = Arc::new(mesh::Mesh::new(
            socket,
            &self.shared.server,
            options,
            self.shared.options.max_frame,
            Arc::downgrade(&local),
            self.shared.metrics.clone(),
        )?);
        self.shared
            .mesh
            .set(mesh.clone())
            .map_err(|_| anyhow::anyhow!("the mesh is already started"))?;
        Ok(mesh)
    }

    /// The address the rendezvous listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.endpoint.local_addr()?)
    }

    /// Whether a verified collaboration is known (ready to serve).
    pub fn ready(&self) -> watch::Receiver<Option<RendezvousConfig>> {
        self.shared.collab.subscribe()
    }

    /// Replaces what the rendezvous admits: new handshakes see the new standing at once, and
    /// connected nodes it no longer admits are disconnected.
    pub fn update(&self, config: RendezvousConfig) -> Result<()> {
        let shared = &self.shared;
        shared.gate.set(config.standing.clone());
        let ca_changed = shared
            .collab
            .borrow()
            .as_ref()
            .is_none_or(|old| old.bundle.ca_der() != config.bundle.ca_der());
        if ca_changed {
            let server = shared.server.quic_server_config(
                &config.bundle,
                &shared.gate,
                shared.options.queue_bytes,
            )?;
            shared.endpoint.set_server_config(Some(server));
        }
        let collab = config.bundle.trust_domain().collab().to_owned();
        shared.plane.set_collab(&collab);
        shared.demux.set_members(
            config
                .standing
                .members()
                .filter_map(|(org, node)| format!("{org}/{node}").parse().ok()),
        );
        let mut clients = lock(&shared.clients);
        clients.retain(|node, client| {
            let same_ca = !ca_changed || shared.collab.borrow().is_none();
            let standing = config.standing.check(&client.info.spiffe_id, &client.serial);
            match (same_ca, standing) {
                (true, Ok(())) => true,
                (_, result) => {
                    let why = result.err().map_or("the CA changed".to_owned(), |e| e.to_string());
                    info!(node = %node, serial = %client.serial, reason = %why, "disconnecting node");
                    shared
                        .metrics
                        .refused
                        .get_or_create(&DropLabels {
                            collab: collab.clone(),
                            reason: "standing_changed",
                        })
                        .inc();
                    client.conn.close(close::REFUSED, b"refused");
                    shared.plane.remove_node(node);
                    shared.announce(mesh::Presence::Gone(node.clone()));
                    false
                }
            }
        });
        count_nodes(shared, &clients, &collab);
        drop(clients);
        shared.collab.send_replace(Some(config));
        Ok(())
    }

    /// Serves QUIC until `shutdown` completes, then closes every node's connection (also the
    /// TCP carrier's; see [`Rendezvous::run_tcp`]).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let accept = tokio::spawn(accept_loop(self.shared.clone()));
        let stop_mesh = tokio_util::sync::CancellationToken::new();
        let mesh = self
            .shared
            .mesh
            .get()
            .map(|m| tokio::spawn(m.clone().run(stop_mesh.clone())));
        shutdown.await;
        accept.abort();
        stop_mesh.cancel();
        if let Some(mesh) = mesh {
            let _ = mesh.await;
        }
        self.shared.endpoint.close(close::SHUTDOWN, b"shutdown");
        for (_, client) in lock(&self.shared.clients).drain() {
            client.conn.close(close::SHUTDOWN, b"shutdown");
        }
        self.shared.plane.clear();
        Ok(())
    }
}

/// The carrier connection's transport: datagrams only (no streams), a bounded datagram send
/// queue per connection, an MTU that fits an end-to-end QUIC datagram from the start.
pub fn carrier_transport(queue_bytes: usize) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(queue_bytes))
        .datagram_send_buffer_size(queue_bytes)
        .initial_mtu(CARRIER_MTU)
        .min_mtu(CARRIER_MTU)
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .max_idle_timeout(Some(VarInt::from_u32(2_000).into()));
    Arc::new(t)
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        tokio::spawn(serve(shared.clone(), incoming));
    }
}

fn collab_of(shared: &Shared) -> String {
    shared
        .collab
        .borrow()
        .as_ref()
        .map(|c| c.bundle.trust_domain().collab().to_owned())
        .unwrap_or_default()
}

async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let collab = collab_of(&shared);
    let refused = |reason: &'static str| shared.count_refused(&collab, reason);
    let conn = match tokio::time::timeout(Duration::from_secs(10), async { incoming.await }).await {
        Ok(Ok(conn)) => {
            crate::relay::carrier_socket::log_stats(&conn, format!("rendezvous, node at {remote}"));
            conn
        }
        Ok(Err(e)) => {
            refused("handshake");
            if let Some(held_back) =
                shared
                    .throttle
                    .admit("handshake", &remote.ip().to_string(), Instant::now())
            {
                warn!(%remote, error = %e, held_back, "rendezvous handshake refused");
            }
            return;
        }
        Err(_) => {
            refused("handshake_timeout");
            return;
        }
    };
    let Some(info) = peer_info(&conn) else {
        refused("no_certificate");
        conn.close(close::REFUSED, b"no certificate");
        return;
    };
    let node = NodeRef::from(&info.spiffe_id);
    let link = tcp::Link::Quic(conn.clone());
    if let Err((reason, code)) = admit(&shared, &node, &link, &info, &collab) {
        refused(reason);
        let text: &[u8] = if code == close::FULL {
            b"full"
        } else {
            b"refused"
        };
        conn.close(code, text);
        return;
    }
    info!(node = %node, serial = %info.serial, %remote, "node connected to the rendezvous");
    let bucket = Arc::new(Mutex::new(Bucket::new(
        shared.options.rate,
        shared.options.burst,
    )));
    // The sealed path's keys: this connection's, so they end with it.
    let mut secret = [0; sealed::SECRET_LEN];
    let session = conn
        .export_keying_material(&mut secret, sealed::LABEL, b"")
        .ok()
        .map(|()| {
            let keys = sealed::SessionKeys::new(&secret);
            shared.plane.insert(&node, &keys, bucket.clone());
            keys.session
        });
    let mut forwarder = Forwarder::new(&shared, &node, &collab, bucket);
    while let Ok(datagram) = conn.read_datagram().await {
        forwarder.forward(datagram);
    }
    if let Some(session) = session {
        shared.plane.remove(&node, session);
    }
    leave(&shared, &node, &link, &collab);
    debug!(node = %node, reason = ?conn.close_reason(), "node left the rendezvous");
}

/// Admits a node that completed a handshake (either carrier): within the node bound, its
/// standing still good; a previous connection of the same node is replaced. On refusal: the
/// metrics reason and the QUIC close code.
fn admit(
    shared: &Shared,
    node: &NodeRef,
    link: &tcp::Link,
    info: &CertInfo,
    collab: &str,
) -> Result<(), (&'static str, VarInt)> {
    let mut clients = lock(&shared.clients);
    if !clients.contains_key(node) && clients.len() >= shared.options.max_nodes {
        return Err(("full", close::FULL));
    }
    // The standing may have changed between the handshake and now.
    if let Some(standing) = shared.gate.standing()
        && let Err(e) = standing.check(&info.spiffe_id, &info.serial)
    {
        debug!(node = %node, error = %e, "refused after handshake");
        return Err(("standing", close::REFUSED));
    }
    if let Some(old) = clients.insert(
        node.clone(),
        Client {
            conn: link.clone(),
            serial: info.serial.clone(),
            info: info.clone(),
        },
    ) {
        old.conn.close(close::REPLACED, b"replaced");
    }
    shared.announce(mesh::Presence::Here(node.clone()));
    count_nodes(shared, &clients, collab);
    Ok(())
}

fn count_nodes(shared: &Shared, clients: &HashMap<NodeRef, Client>, collab: &str) {
    let labels = CollabLabels {
        collab: collab.to_owned(),
    };
    shared
        .metrics
        .nodes
        .get_or_create(&labels)
        .set(clients.len() as i64);
    let tcp = clients
        .values()
        .filter(|c| matches!(c.conn, tcp::Link::Stream(_)))
        .count();
    shared
        .metrics
        .tcp_nodes
        .get_or_create(&labels)
        .set(tcp as i64);
}

/// Forgets `node`'s connection `link` (unless a newer one replaced it).
fn leave(shared: &Shared, node: &NodeRef, link: &tcp::Link, collab: &str) {
    let mut clients = lock(&shared.clients);
    if clients.get(node).is_some_and(|c| c.conn.same(link)) {
        clients.remove(node);
        shared.announce(mesh::Presence::Gone(node.clone()));
    }
    count_nodes(shared, &clients, collab);
}

fn peer_info(conn: &Connection) -> Option<CertInfo> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    CertInfo::parse(certs.first()?).ok()
}

/// A token bucket of bytes.
pub(super) struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Self {
        Self {
            tokens: burst as f64,
            at: Instant::now(),
            rate: rate as f64,
            burst: burst as f64,
        }
    }

    pub(super) fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let cost = bytes.max(64) as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Passes one sender's frames on to the nodes they name, whichever carrier either is on.
struct Forwarder<'a> {
    shared: &'a Shared,
    sender: &'a NodeRef,
    collab: &'a str,
    bucket: Arc<Mutex<Bucket>>,
    counters: fast::Counters,
}

impl<'a> Forwarder<'a> {
    fn new(
        shared: &'a Shared,
        sender: &'a NodeRef,
        collab: &'a str,
        bucket: Arc<Mutex<Bucket>>,
    ) -> Self {
        Self {
            shared,
            sender,
            collab,
            bucket,
            counters: fast::Counters::new(&shared.metrics, collab),
        }
    }

    fn dropped(&self, reason: &'static str) {
        self.shared
            .metrics
            .dropped
            .get_or_create(&DropLabels {
                collab: self.collab.to_owned(),
                reason,
            })
            .inc();
        if let Some(held_back) =
            self.shared
                .throttle
                .admit(reason, &self.sender.to_string(), Instant::now())
        {
            debug!(node = %self.sender, reason, held_back, "datagram dropped");
        }
    }

    /// Checks the sender's rate and the frame, then passes the payload on, named by the sender.
    fn forward(&mut self, datagram: Bytes) {
        self.counters.in_datagrams.inc();
        self.counters.in_bytes.inc_by(datagram.len() as u64);
        if !lock(&self.bucket).take(datagram.len(), Instant::now()) {
            return self.dropped("rate");
        }
        let (receiver, payload) = match frame::decode(&datagram, self.shared.options.max_frame) {
            Ok(decoded) => decoded,
            Err(e) => return self.dropped(e.as_str()),
        };
        if receiver == *self.sender {
            return self.dropped("to_self");
        }
        let Some(to) = lock(&self.shared.clients)
            .get(&receiver)
            .map(|c| c.conn.clone())
        else {
            // Not here: the replica that has it, if any (one hop).
            return match self
                .shared
                .mesh
                .get()
                .map(|m| m.forward(self.collab, self.sender, &receiver, &payload))
            {
                Some(Ok(())) => {}
                Some(Err(reason)) => self.dropped(reason),
                None => self.dropped("unknown_peer"),
            };
        };
        if self
            .shared
            .plane
            .send_sealed(self.sender, &receiver, &payload)
        {
            return;
        }
        let out = frame::encode(self.sender, &payload);
        let len = out.len();
        match to.send(out) {
            Ok(()) => {
                self.counters.out_datagrams.inc();
                self.counters.out_bytes.inc_by(len as u64);
            }
            Err(reason) => self.dropped(reason),
        }
    }
}

/// Reads a bounded collaboration document set: one signed document (JWS) per line, the owner's
/// collaboration document among them; what does not verify is skipped and reported.
pub fn ledger_from_lines(
    owner_pin: &str,
    text: &str,
    now: SystemTime,
) -> (fedmesh_documents::Ledger, Vec<String>) {
    let mut ledger = fedmesh_documents::Ledger::new(owner_pin);
    let mut problems = Vec::new();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // The collaboration document first, whatever the order in the file.
    for pass in 0..2 {
        for (i, line) in lines.iter().enumerate() {
            let is_collab = matches!(
                fedmesh_documents::jws::peek(line),
                Ok((_, fedmesh_documents::Document::Collaboration(_)))
            );
            if is_collab != (pass == 0) {
                continue;
            }
            if let Err(e) = ledger.ingest_jws(line, now) {
                problems.push(format!("line {}: {e}", i + 1));
            }
        }
    }
    (ledger, problems)
}

/// The rendezvous's config from a verified ledger, once it holds a collaboration.
pub fn config_of(ledger: &fedmesh_documents::Ledger) -> Option<RendezvousConfig> {
    Some(RendezvousConfig {
        bundle: ledger.trust_bundle()?.clone(),
        standing: crate::relay::standing(ledger),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refuses_beyond_its_rate() {
        let start = Instant::now();
        let mut b = Bucket::new(1000, 2000);
        assert!(b.take(1500, start));
        assert!(!b.take(1000, start), "burst spent");
        // 500 left, 600 refilled, 1000 taken: 100 left.
        assert!(b.take(1000, start + Duration::from_millis(600)), "refilled");
        let at = start + Duration::from_millis(600);
        assert!(b.take(10, at));
        assert!(!b.take(10, at), "small datagrams cost 64: 36 left");
        assert!(b.take(10, start + Duration::from_millis(700)));
        // Refill is capped at the burst.
        let later = start + Duration::from_secs(100);
        assert!(b.take(2000, later));
        assert!(!b.take(64, later));
    }
}
