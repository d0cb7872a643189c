//! The QUIC relay: carries algorithm TCP connections between nodes that have a link.
//!
//! ```text
//!  algorithm ──TCP──▶ 127.x.y.z:port (one IP per peer)          peer agent            target
//!                     │ outbound listener                        │ inbound stream
//!                     └── QUIC stream (mTLS, ALPN fedmesh/1) ───▶ admit(source, port) ──TCP──▶
//! ```
//!
//! One QUIC connection per peer node (dialled or accepted, reused both ways); one
//! bidirectional stream per TCP connection, opened with a small header ([`proto`]). The
//! receiving agent admits a stream only if an effective link covers (source SPIFFE ID, itself,
//! port) ([`policy`]), connects its target (retrying until a deadline) and only then answers;
//! the dialling agent holds its client connection until that answer. Bytes then flow through
//! [`pump`], which maps half-close and reset both ways. When a link is revoked or expires, the
//! listeners close and every open stream of that link is reset.
//!
//! The relay is a thin shell: what it may do comes in as a [`RelayConfig`] on a watch channel.

pub mod policy;
pub mod proto;
pub mod pump;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use fedmesh_certs::{NodeIdentity, TrustBundle, tls};
use fedmesh_documents::NodeRef;
use quinn::{Connection, Endpoint, TransportConfig, VarInt, crypto::rustls as qrustls};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, info, warn};

pub use self::policy::Policy;
use self::{
    proto::{Refusal, Request, Response},
    pump::{Counters, Ended},
};
use crate::metrics::{DirectionLabels, Metrics};

/// How long shutdown lets connection and stream tasks end by themselves.
const DRAIN: Duration = Duration::from_secs(2);
/// How long a stream header may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the dialling side waits for a peer connection before giving up on a client.
const DIAL_DEADLINE: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Everything the relay may do, recomputed by the node agent on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayConfig {
    /// Admission, from the effective links.
    pub policy: Policy,
    /// Peers' relay UDP addresses, from their signed advertisements.
    pub peers: BTreeMap<NodeRef, SocketAddr>,
    /// Where to listen for algorithms, and the (peer, port) each listener leads to: on a
    /// machine, one loopback address per peer with the algorithm's real port; in Kubernetes,
    /// one pod port per (peer, port) behind a per-peer Service. A listener whose (peer, port)
    /// the policy does not admit is not opened.
    pub listeners: BTreeMap<SocketAddr, (NodeRef, u16)>,
    /// Where inbound streams for a port go (`host:port`); unlisted ports go to
    /// `127.0.0.1:<port>`.
    pub targets: BTreeMap<u16, String>,
}

impl RelayConfig {
    fn target(&self, port: u16) -> String {
        self.targets
            .get(&port)
            .cloned()
            .unwrap_or_else(|| format!("127.0.0.1:{port}"))
    }
}

/// Datagrams quinn puts in one segmentation-offload send (its `MAX_TRANSMIT_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 10;
/// The most payload bytes Linux takes in one segmentation-offload send (one IPv4 packet).
const GSO_MAX_BYTES: usize = 65_535 - 20 - 8;

/// The QUIC transport parameters: many concurrent streams, windows large enough for a fast
/// path, keepalive well inside the idle timeout.
fn transport(max_udp_payload: u16) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(16_384))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(8 * 1024 * 1024))
        .receive_window(VarInt::from_u32(64 * 1024 * 1024))
        .send_window(64 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    // quinn hands the kernel up to 10 datagrams per segmentation-offload send, and Linux refuses
    // one above 64 KiB. Those refused sends look like loss, and black-hole detection then drops
    // the path to 1200 bytes for ten minutes. Datagrams that large gain nothing from batching.
    if usize::from(max_udp_payload) * GSO_MAX_SEGMENTS > GSO_MAX_BYTES {
        t.enable_segmentation_offload(false);
    }
    Arc::new(t)
}

/// TLS material for the endpoint (rebuilt on certificate renewal).
pub struct TlsMaterial<'a> {
    /// This node's identity.
    pub identity: &'a NodeIdentity,
    /// The collaboration CA.
    pub bundle: &'a TrustBundle,
}

/// The largest UDP payload MTU discovery reaches without the operator's word: fits a 1500-byte
/// Ethernet MTU.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1452;

/// Options of the relay endpoint.
#[derive(Clone, Copy, Debug)]
pub struct RelayOptions {
    /// Largest UDP payload MTU discovery may reach (1452 suits the Internet; loopback and
    /// jumbo-frame networks can go far higher).
    pub max_udp_payload: u16,
    /// How long the receiving agent keeps retrying its local target before refusing a stream
    /// (the dialling client is held meanwhile).
    pub target_deadline: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            target_deadline: Duration::from_secs(30),
        }
    }
}

fn server_config(
    tls_material: &TlsMaterial<'_>,
    options: RelayOptions,
) -> Result<quinn::ServerConfig> {
    let rustls = tls::server_config(tls_material.identity, tls_material.bundle, &[proto::ALPN])?;
    let crypto = qrustls::QuicServerConfig::try_from(rustls).context("QUIC server TLS")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(options.max_udp_payload));
    Ok(config)
}

fn client_config(
    tls_material: &TlsMaterial<'_>,
    options: RelayOptions,
) -> Result<quinn::ClientConfig> {
    let rustls = tls::client_config(tls_material.identity, tls_material.bundle, &[proto::ALPN])?;
    let crypto = qrustls::QuicClientConfig::try_from(rustls).context("QUIC client TLS")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(options.max_udp_payload));
    Ok(config)
}

/// Shared state of the relay's tasks.
struct Shared {
    local: NodeRef,
    listening: watch::Sender<Arc<BTreeSet<SocketAddr>>>,
    collab: String,
    endpoint: Endpoint,
    config: watch::Receiver<Arc<RelayConfig>>,
    peers: std::sync::Mutex<HashMap<NodeRef, Arc<tokio::sync::Mutex<Slot>>>>,
    /// TLS for the connections this relay dials (replaced on renewal).
    client_config: std::sync::Mutex<quinn::ClientConfig>,
    metrics: Arc<Metrics>,
    options: RelayOptions,
    /// Every connection and stream task, so shutdown can wait for them and end them.
    tasks: std::sync::Mutex<JoinSet<()>>,
}

/// One peer's connection, and when to try again after a failed dial.
#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    backoff: Duration,
    next_attempt: Option<Instant>,
}

/// The relay: a QUIC endpoint (server and client on one UDP socket) plus its tasks.
pub struct Relay {
    shared: Arc<Shared>,
    config: watch::Sender<Arc<RelayConfig>>,
    listening: watch::Receiver<Arc<BTreeSet<SocketAddr>>>,
    options: RelayOptions,
}

impl Relay {
    /// Binds the relay's UDP socket on `addr`.
    pub fn bind(
        addr: SocketAddr,
        local: NodeRef,
        tls_material: &TlsMaterial<'_>,
        options: RelayOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let socket = udp_socket(addr)?;
        // What this endpoint accepts from peers bounds how far their path MTU discovery climbs.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(options.max_udp_payload)
            .context("--max-udp-payload")?;
        let endpoint = Endpoint::new(
            endpoint_config,
            Some(server_config(tls_material, options)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let (config, rx) = watch::channel(Arc::new(RelayConfig::default()));
        let (listening_tx, listening) = watch::channel(Arc::new(BTreeSet::new()));
        Ok(Self {
            listening,
            shared: Arc::new(Shared {
                listening: listening_tx,
                collab: tls_material.identity.spiffe_id().collab().to_owned(),
                local,
                endpoint,
                config: rx,
                peers: std::sync::Mutex::new(HashMap::new()),
                client_config: std::sync::Mutex::new(client_config(tls_material, options)?),
                metrics,
                options,
                tasks: std::sync::Mutex::new(JoinSet::new()),
            }),
            config,
            options,
        })
    }

    /// The UDP address the relay listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.endpoint.local_addr()?)
    }

    /// The addresses the relay currently listens on for peers.
    pub fn listening(&self) -> watch::Receiver<Arc<BTreeSet<SocketAddr>>> {
        self.listening.clone()
    }

    /// Replaces what the relay may do. Listeners follow within a moment; streams that are no
    /// longer admitted are reset.
    pub fn update(&self, config: RelayConfig) {
        self.config.send_if_modified(|current| {
            if **current == config {
                return false;
            }
            *current = Arc::new(config);
            true
        });
    }

    /// Swaps in a renewed certificate for new connections, both ways. (The client config is
    /// kept here, not as the endpoint's default: that default belongs to one endpoint handle.)
    pub fn set_tls(&self, tls_material: &TlsMaterial<'_>) -> Result<()> {
        self.shared
            .endpoint
            .set_server_config(Some(server_config(tls_material, self.options)?));
        *self
            .shared
            .client_config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            client_config(tls_material, self.options)?;
        Ok(())
    }

    /// Runs the relay until `shutdown` completes.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let accept = tokio::spawn(accept_loop(self.shared.clone()));
        let stop = tokio_util::sync::CancellationToken::new();
        let listeners = tokio::spawn(listen_loop(self.shared.clone(), stop.clone()));
        shutdown.await;
        accept.abort();
        // Wait for the listeners to close, so the addresses are free when this returns.
        stop.cancel();
        let _ = listeners.await;
        self.shared.endpoint.close(VarInt::from_u32(0), b"shutdown");
        // Closing the endpoint ends every connection and stream; let their tasks finish, and end
        // whatever has not within a moment, so no task outlives the relay.
        let mut tasks = std::mem::take(
            &mut *self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let drained =
            tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            debug!(
                open = tasks.len(),
                "ending relay tasks still busy at shutdown"
            );
            tasks.shutdown().await;
        }
        Ok(())
    }
}

/// A UDP socket with large buffers (a fast relay needs them).
fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(8 * 1024 * 1024);
    let _ = socket.set_send_buffer_size(8 * 1024 * 1024);
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding the relay's UDP socket {addr}"))?;
    Ok(socket.into())
}

// ---------------------------------------------------------------------------------------------
// Connections

impl Shared {
    /// Runs `task` as one of the relay's tasks (see [`Relay::run`]'s drain).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget tasks that have ended.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    fn slot(&self, peer: &NodeRef) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        peers.entry(peer.clone()).or_default().clone()
    }

    /// The live connection to `peer`, dialling (with backoff) when there is none.
    async fn connection(self: &Arc<Self>, peer: &NodeRef) -> Result<Connection, String> {
        let slot = self.slot(peer);
        let mut s = slot.lock().await;
        if let Some(conn) = &s.conn
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        if let Some(at) = s.next_attempt {
            tokio::time::sleep_until(at.into()).await;
        }
        let addr = self
            .config
            .borrow()
            .peers
            .get(peer)
            .copied()
            .ok_or_else(|| format!("{peer} has not advertised a relay address"))?;
        let id = fedmesh_certs::SpiffeId::new(&self.collab, &peer.org, &peer.node)
            .map_err(|e| e.to_string())?;
        let client_config = self
            .client_config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let attempt = async {
            self.endpoint
                .connect_with(client_config, addr, &id.dns_name())
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| describe_connection_error(&e))
        };
        match attempt.await {
            Ok(conn) => {
                info!(%peer, %addr, "connected to peer");
                s.conn = Some(conn.clone());
                s.backoff = Duration::ZERO;
                s.next_attempt = None;
                self.spawn(serve_connection(self.clone(), conn.clone(), peer.clone()));
                Ok(conn)
            }
            Err(error) => {
                s.backoff = (s.backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
                s.next_attempt = Some(Instant::now() + s.backoff);
                warn!(%peer, %addr, %error, retry_in = ?s.backoff, "cannot reach peer");
                Err(error)
            }
        }
    }

    /// Keeps an accepted connection for outbound use too, unless a live one exists.
    async fn register(&self, peer: &NodeRef, conn: &Connection) {
        let slot = self.slot(peer);
        let mut s = slot.lock().await;
        if s.conn.as_ref().is_none_or(|c| c.close_reason().is_some()) {
            s.conn = Some(conn.clone());
            s.backoff = Duration::ZERO;
            s.next_attempt = None;
        }
    }
}

fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TransportError(t) => t.to_string(),
        quinn::ConnectionError::ConnectionClosed(c) => format!("closed by peer: {c}"),
        other => other.to_string(),
    }
}

/// Accepts incoming QUIC connections and serves their streams.
async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let task = shared.clone();
        shared.spawn(async move {
            let shared = task;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(%remote, error = %describe_connection_error(&e), "peer handshake refused");
                    shared.metrics.refuse("handshake");
                    return;
                }
            };
            let peer = match peer_of(&conn) {
                Ok(peer) => peer,
                Err(error) => {
                    warn!(%remote, %error, "peer without a usable identity");
                    conn.close(VarInt::from_u32(1), b"identity");
                    return;
                }
            };
            debug!(%peer, %remote, "peer connected");
            shared.register(&peer, &conn).await;
            serve_connection(shared, conn, peer).await;
        });
    }
}

fn peer_of(conn: &Connection) -> Result<NodeRef, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("no peer certificate")?;
    let id = fedmesh_certs::verify::peer_spiffe_id(Some(&certs)).map_err(|e| e.to_string())?;
    Ok(NodeRef::from(&id))
}

/// Serves the streams a peer opens on `conn` (whichever side dialled).
async fn serve_connection(shared: Arc<Shared>, conn: Connection, peer: NodeRef) {
    shared.metrics.peer_connections.inc();
    let path = tokio::spawn(report_path(shared.clone(), conn.clone(), peer.clone()));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                shared.spawn(inbound_stream(shared.clone(), peer.clone(), send, recv));
            }
            Err(e) => {
                debug!(%peer, error = %describe_connection_error(&e), "peer connection ended");
                break;
            }
        }
    }
    path.abort();
    shared.metrics.peer_connections.dec();
}

/// Keeps the peer's path gauges (round-trip time, path MTU) current while `conn` lives.
async fn report_path(shared: Arc<Shared>, conn: Connection, peer: NodeRef) {
    let labels = crate::metrics::PeerLabels {
        peer: peer.to_string(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while conn.close_reason().is_none() {
        tick.tick().await;
        let stats = conn.stats();
        shared
            .metrics
            .peer_rtt_us
            .get_or_create(&labels)
            .set(i64::try_from(stats.path.rtt.as_micros()).unwrap_or(i64::MAX));
        shared
            .metrics
            .peer_path_mtu
            .get_or_create(&labels)
            .set(i64::from(stats.path.current_mtu));
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound

async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, Refusal> {
    let mut prefix = [0u8; 3];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|_| Refusal::BadHeader)?;
    let len = Request::body_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|_| Refusal::BadHeader)?;
    Request::decode_body(&body)
}

async fn refuse(
    shared: &Shared,
    send: &mut quinn::SendStream,
    peer: &NodeRef,
    refusal: Refusal,
    reason: String,
) {
    warn!(%peer, reason = %refusal, detail = %reason, "stream refused");
    shared.metrics.refuse(refusal.as_str());
    let _ = send
        .write_all(&Response::Refused(refusal, reason).encode())
        .await;
    let _ = send.finish();
}

async fn inbound_stream(
    shared: Arc<Shared>,
    peer: NodeRef,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request = match tokio::time::timeout(HEADER_TIMEOUT, read_request(&mut recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(refusal)) => {
            let detail = format!("stream header from {peer} refused: {refusal}");
            return refuse(&shared, &mut send, &peer, refusal, detail).await;
        }
        Err(_) => {
            return refuse(
                &shared,
                &mut send,
                &peer,
                Refusal::BadHeader,
                "header timed out".into(),
            )
            .await;
        }
    };
    let port = request.port;
    let (grant, target) = {
        let config = shared.config.borrow();
        (
            config.policy.admits_inbound(&peer, port).cloned(),
            config.target(port),
        )
    };
    let Some(grant) = grant else {
        let detail = format!(
            "no link allows {peer} to reach {} on port {port}",
            shared.local
        );
        return refuse(&shared, &mut send, &peer, Refusal::NoLink, detail).await;
    };
    let tcp = match connect_target(&target, shared.options.target_deadline).await {
        Ok(tcp) => tcp,
        Err(error) => {
            let detail = format!("target {target} for port {port} unreachable: {error}");
            return refuse(
                &shared,
                &mut send,
                &peer,
                Refusal::TargetUnreachable,
                detail,
            )
            .await;
        }
    };
    if send.write_all(&Response::Connected.encode()).await.is_err() {
        return;
    }
    debug!(%peer, port, link = %grant.link_id, "inbound stream connected");
    let counters = Counters {
        sent: shared.metrics.link_bytes(&grant.link_id, "sent"),
        received: shared.metrics.link_bytes(&grant.link_id, "received"),
    };
    let cancel = until_not_admitted(
        shared.config.clone(),
        peer.clone(),
        port,
        Direction::Inbound,
    );
    run_stream(&shared, "inbound", tcp, send, recv, counters, cancel).await;
}

/// Connects the local target, retrying until `within` has passed: the peer's client is held
/// meanwhile, so an algorithm that starts late is not mistaken for one that refuses.
async fn connect_target(target: &str, within: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + within;
    let mut delay = Duration::from_millis(20);
    loop {
        match TcpStream::connect(target).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(delay.min(deadline - now)).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

async fn run_stream(
    shared: &Shared,
    direction: &'static str,
    tcp: TcpStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    counters: Counters,
    cancel: impl Future<Output = ()>,
) {
    shared
        .metrics
        .streams_total
        .get_or_create(&DirectionLabels { direction })
        .inc();
    shared.metrics.streams_active.inc();
    let ended = pump::pump(tcp, send, recv, counters, cancel).await;
    shared.metrics.streams_active.dec();
    if ended == Ended::Cancelled {
        info!(direction, "stream closed: its link is no longer in force");
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Inbound,
    Outbound,
}

/// Completes once (peer, port) is no longer admitted in `direction`.
async fn until_not_admitted(
    mut config: watch::Receiver<Arc<RelayConfig>>,
    peer: NodeRef,
    port: u16,
    direction: Direction,
) {
    loop {
        {
            let c = config.borrow_and_update();
            let admitted = match direction {
                Direction::Inbound => c.policy.admits_inbound(&peer, port).is_some(),
                Direction::Outbound => c.policy.admits_outbound(&peer, port).is_some(),
            };
            if !admitted {
                return;
            }
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outbound

/// Keeps one listener per configured address whose (peer, port) this node may dial.
async fn listen_loop(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut config = shared.config.clone();
    let mut listeners: BTreeMap<SocketAddr, JoinHandle<()>> = BTreeMap::new();
    loop {
        let desired: BTreeMap<SocketAddr, (NodeRef, u16)> = {
            let c = config.borrow_and_update();
            c.listeners
                .iter()
                .filter(|(_, (peer, port))| c.policy.admits_outbound(peer, *port).is_some())
                .map(|(addr, target)| (*addr, target.clone()))
                .collect()
        };
        listeners.retain(|addr, task| {
            let keep = desired.contains_key(addr) && !task.is_finished();
            if !keep {
                task.abort();
                info!(%addr, "peer listener closed");
            }
            keep
        });
        for (addr, (peer, port)) in desired {
            if listeners.contains_key(&addr) {
                continue;
            }
            match bind_listener(addr) {
                Ok(listener) => {
                    info!(%addr, %peer, port, "peer listener open");
                    let task = tokio::spawn(accept_clients(shared.clone(), listener, peer, port));
                    listeners.insert(addr, task);
                }
                Err(error) => warn!(%addr, %peer, %error, "cannot open peer listener"),
            }
        }
        let open: BTreeSet<SocketAddr> = listeners.keys().copied().collect();
        shared.listening.send_if_modified(|current| {
            if **current == open {
                return false;
            }
            *current = Arc::new(open);
            true
        });
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    for task in listeners.values() {
        task.abort();
    }
    for task in listeners.into_values() {
        let _ = task.await;
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_clients(shared: Arc<Shared>, listener: TcpListener, peer: NodeRef, port: u16) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                shared.spawn(outbound_stream(shared.clone(), tcp, peer.clone(), port));
            }
            Err(error) => {
                warn!(%peer, port, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn outbound_stream(shared: Arc<Shared>, tcp: TcpStream, peer: NodeRef, port: u16) {
    let Some(grant) = shared
        .config
        .borrow()
        .policy
        .admits_outbound(&peer, port)
        .cloned()
    else {
        return;
    };
    let result = tokio::time::timeout(DIAL_DEADLINE, open(&shared, &peer, port, &grant)).await;
    let (send, recv) = match result {
        Ok(Ok(streams)) => streams,
        Ok(Err((refusal, detail))) => {
            warn!(%peer, port, reason = refusal, %detail, "stream refused; closing the client connection");
            shared.metrics.refuse(refusal);
            return; // dropping `tcp` closes the client connection
        }
        Err(_) => {
            warn!(%peer, port, "peer unreachable before the deadline; closing the client connection");
            shared.metrics.refuse("peer_unreachable");
            return;
        }
    };
    let counters = Counters {
        sent: shared.metrics.link_bytes(&grant.link_id, "sent"),
        received: shared.metrics.link_bytes(&grant.link_id, "received"),
    };
    let cancel = until_not_admitted(shared.config.clone(), peer, port, Direction::Outbound);
    run_stream(&shared, "outbound", tcp, send, recv, counters, cancel).await;
}

/// Opens a stream to `peer` for `port` and waits for the peer's answer.
async fn open(
    shared: &Arc<Shared>,
    peer: &NodeRef,
    port: u16,
    grant: &policy::Grant,
) -> Result<(quinn::SendStream, quinn::RecvStream), (&'static str, String)> {
    // Retry the dial (with backoff) until the deadline around this call cuts it short.
    let conn = loop {
        match shared.connection(peer).await {
            Ok(conn) => break conn,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| ("peer_unreachable", describe_connection_error(&e)))?;
    let request = Request {
        port,
        label: grant.label.clone(),
    };
    send.write_all(&request.encode())
        .await
        .map_err(|e| ("peer_unreachable", e.to_string()))?;
    let mut prefix = [0u8; 2];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| ("peer_unreachable", e.to_string()))?;
    match Response::decode_prefix(prefix).map_err(|e| ("bad_response", e))? {
        None => Ok((send, recv)),
        Some((refusal, len)) => {
            let mut reason = vec![0u8; len];
            let _ = recv.read_exact(&mut reason).await;
            Err((
                refusal.as_str(),
                String::from_utf8_lossy(&reason).into_owned(),
            ))
        }
    }
}

/// Local loopback addresses for peers: the default pool.
pub const DEFAULT_LOOPBACK_POOL: &str = "127.77.0.0/16";
