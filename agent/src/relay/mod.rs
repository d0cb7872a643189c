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
//! port) ([`policy`]) and the link's budget allows it ([`budget`]), connects its target
//! (retrying until a deadline) and only then answers; the dialling agent holds its client
//! connection until that answer. Bytes then flow through [`pump`], which maps half-close and
//! reset both ways. When a link is revoked or expires, or its byte budget is spent, the
//! listeners close and every open stream of that link is reset.
//!
//! Certificates renew under open streams: new streams go to a connection made with both ends'
//! current certificates (dialled anew when the slot's connection was made with a certificate of
//! ours since renewed, or a peer certificate past its renewal point); a connection made with
//! older ones keeps its open streams and closes when the last one ends. No new stream goes on a
//! connection once a certificate it was made with has expired (the receiving end refuses it,
//! [`proto::Refusal::Expired`], and the dialling end opens it again elsewhere). Keepalives and
//! the idle timeout reset a dead peer's streams within 7.5 s (1.5 s keepalive, 6 s idle); until
//! it is reached again, new streams to it fail fast with the reason instead of being held.
//!
//! Who may connect at all is the peer's [`Standing`]: the TLS verifiers refuse a revoked serial
//! or node and a non-member at the handshake, and open connections whose standing changes are
//! closed with their streams. What a connection may hold follows the links its peer has: few
//! streams and a small receive window until it has one, what its links need once it does, and it
//! is closed after [`RelayOptions::unlinked_idle`] without one. Unauthenticated sources are
//! bounded by [`limits`]. Refusals are logged through the shared [`Throttle`], one line per
//! reason and peer per interval, each naming the peer's SPIFFE ID and certificate serial;
//! metrics count every one.
//!
//! The relay is a thin shell: what it may do comes in as a [`RelayConfig`] on a watch channel;
//! where its datagrams travel is its [`Transport`].

pub mod budget;
pub mod carrier_socket;
pub mod cubic;
pub mod limits;
pub mod policy;
pub mod proto;
pub mod pump;
pub mod relayed;
pub mod tls_streams;
pub mod transport;
pub mod tuning;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use fedmesh_certs::{CertInfo, NodeIdentity, PeerGate, SpiffeId, Standing, TrustBundle, tls};
use fedmesh_documents::{Endpoint as Advertised, Ledger, NodeRef};
use quinn::{Connection, Endpoint, TransportConfig, VarInt, crypto::rustls as qrustls};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::{
    budget::Budgets,
    limits::Caps,
    policy::Policy,
    tls_streams::StreamsOver,
    transport::{DirectUdp, Transport},
    tuning::{Congestion, PathEstimate},
};
use self::{
    budget::Ticket,
    limits::Limits,
    proto::{Refusal, Request, Response},
    pump::{Counters, Ended, FromPeer, ToPeer},
    tuning::Windows,
};
use crate::{
    metrics::{Metrics, StreamLabels},
    throttle::Throttle,
};

/// How long shutdown lets connection and stream tasks end by themselves.
const DRAIN: Duration = Duration::from_secs(2);
/// How long a stream header may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer's handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the dialling side waits for a peer connection before giving up on a client.
const DIAL_DEADLINE: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Streams a peer may open at once without an inbound link (enough to be told why not).
const UNLINKED_STREAMS: u32 = 8;
/// Streams a peer may open at once under inbound links without a stream budget.
const MAX_STREAMS: u32 = fedmesh_documents::MAX_LINK_STREAMS;
/// A connection's receive window while its peer has no link.
const UNLINKED_WINDOW: u32 = 128 * 1024;
/// How often open connections are checked when nothing changed (idle peers without a link).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often a connection sends a keepalive when nothing else travels.
const KEEPALIVE: Duration = Duration::from_millis(1500);
/// How long a connection lives without hearing from its peer (four keepalives missed). The
/// first packet sent after the last one heard restarts the clock, so a dead peer's streams are
/// reset at most [`KEEPALIVE`] + this after its last packet: 7.5 s.
const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// How long a dial may take to a peer known to be down before its client is failed.
const DOWN_DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long before either certificate's end a connection stops taking new streams of ours (the
/// peer refuses them at the end itself; this leaves room for clock skew and the round trip).
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);
/// How often a connection whose peer certificate is past its renewal point is replaced by a new
/// dial while the peer still presents that certificate (it has not renewed yet).
const STALE_REDIAL_EVERY: Duration = Duration::from_secs(5);
/// How many times a stream is opened again when the peer refused it for an expired connection
/// or closed the connection as rotated meanwhile.
const ROTATION_RETRIES: usize = 3;

/// Application close codes of peer connections.
mod close {
    use quinn::VarInt;
    /// The relay is shutting down.
    pub(super) const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The peer's certificate is unusable.
    pub(super) const IDENTITY: VarInt = VarInt::from_u32(1);
    /// The peer's standing no longer admits it (revoked, not a member).
    pub(super) const REFUSED: VarInt = VarInt::from_u32(2);
    /// The peer has no link with this node.
    pub(super) const NO_LINK: VarInt = VarInt::from_u32(3);
    /// The peer holds too many connections.
    pub(super) const TOO_MANY: VarInt = VarInt::from_u32(4);
    /// The connection was made with certificates since renewed or expired, and its last stream
    /// ended.
    pub(super) const ROTATED: VarInt = VarInt::from_u32(5);
}

/// Everything the relay may do, recomputed by the node agent on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayConfig {
    /// Admission, from the effective links.
    pub policy: Policy,
    /// Who may connect at all: the members, and the revoked nodes and serials.
    pub standing: Standing,
    /// Peers' advertised endpoints (the transport picks the one it can dial).
    pub peers: BTreeMap<NodeRef, Vec<Advertised>>,
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

/// The standing of peers under `ledger`: its members, revoked nodes and revoked serials. Before
/// a collaboration is verified, nobody stands.
pub fn standing(ledger: &Ledger) -> Standing {
    let Some(collab) = ledger.collaboration() else {
        return Standing::default();
    };
    let revoked = ledger.revocation();
    Standing::new(
        collab
            .members
            .iter()
            .map(|m| (m.org.clone(), m.node.clone())),
        revoked
            .nodes
            .iter()
            .map(|n| (n.org.clone(), n.node.clone())),
        revoked.serials.iter().cloned(),
    )
}

/// Datagrams quinn puts in one segmentation-offload send (its `MAX_TRANSMIT_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 10;
/// The most payload bytes Linux takes in one segmentation-offload send (one IPv4 packet).
const GSO_MAX_BYTES: usize = 65_535 - 20 - 8;

/// The QUIC transport parameters every connection starts with: few streams and a small receive
/// window (quinn allocates state for every stream a peer may open, at once), a stream window
/// and a send window sized from the expected path's bandwidth-delay product, the configured
/// congestion controller, keepalive well inside the idle timeout, no datagrams. Once its peer
/// has links, a connection is raised to what they need ([`Shared::size`]).
fn transport(options: &RelayOptions) -> Arc<TransportConfig> {
    let windows = Windows::for_path(options.path);
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(UNLINKED_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(windows.stream))
        .receive_window(VarInt::from_u32(UNLINKED_WINDOW))
        .send_window(u64::from(windows.send))
        .congestion_controller_factory(options.congestion.factory(options.path))
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout in range"),
        ));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(options.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    // quinn hands the kernel up to 10 datagrams per segmentation-offload send, and Linux refuses
    // one above 64 KiB. Those refused sends look like loss, and black-hole detection then drops
    // the path to 1200 bytes for ten minutes. Datagrams that large gain nothing from batching.
    if usize::from(options.max_udp_payload) * GSO_MAX_SEGMENTS > GSO_MAX_BYTES {
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
    /// Caps on connections and handshakes, per source address and overall.
    pub caps: Caps,
    /// How long a connection is kept while its peer has no link with this node.
    pub unlinked_idle: Duration,
    /// The congestion controller of peer connections.
    pub congestion: Congestion,
    /// The path expected to peers: flow-control windows follow its bandwidth-delay product.
    pub path: PathEstimate,
    /// What carries streams to peers: QUIC, or TLS connections of their own where a peer takes
    /// them ([`tls_streams`]).
    pub streams_over: StreamsOver,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            target_deadline: Duration::from_secs(30),
            caps: Caps::default(),
            unlinked_idle: Duration::from_secs(15),
            congestion: Congestion::default(),
            path: PathEstimate::default(),
            streams_over: StreamsOver::default(),
        }
    }
}

fn server_config(
    tls_material: &TlsMaterial<'_>,
    options: RelayOptions,
    gate: &PeerGate,
) -> Result<quinn::ServerConfig> {
    let rustls = tls::server_config_gated(
        tls_material.identity,
        tls_material.bundle,
        &[proto::ALPN],
        gate,
    )?;
    let crypto = qrustls::QuicServerConfig::try_from(rustls).context("QUIC server TLS")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(&options));
    // quinn's own bound on connection attempts not yet accepted, beside the relay's caps.
    config.max_incoming(options.caps.handshakes.max(1) as usize);
    Ok(config)
}

fn client_config(
    tls_material: &TlsMaterial<'_>,
    options: RelayOptions,
    gate: &PeerGate,
) -> Result<quinn::ClientConfig> {
    let rustls = tls::client_config_gated(
        tls_material.identity,
        tls_material.bundle,
        &[proto::ALPN],
        gate,
    )?;
    let crypto = qrustls::QuicClientConfig::try_from(rustls).context("QUIC client TLS")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(&options));
    Ok(config)
}

/// Shared state of the relay's tasks.
struct Shared {
    local: NodeRef,
    listening: watch::Sender<Arc<BTreeSet<SocketAddr>>>,
    collab: String,
    endpoint: Endpoint,
    transport: Arc<dyn Transport>,
    config: watch::Receiver<Arc<RelayConfig>>,
    peers: std::sync::Mutex<HashMap<NodeRef, Arc<tokio::sync::Mutex<Slot>>>>,
    /// TLS for the connections this relay dials (replaced on renewal).
    client_config: std::sync::Mutex<quinn::ClientConfig>,
    /// The standing both verifiers check.
    gate: PeerGate,
    /// The certificate this relay presents to new connections (bumped on renewal).
    ours: std::sync::Mutex<Ours>,
    /// Every open peer connection, by quinn's stable id.
    conns: std::sync::Mutex<HashMap<usize, Tracked>>,
    limits: std::sync::Mutex<Limits>,
    budgets: Arc<Budgets>,
    throttle: Arc<Throttle>,
    metrics: Arc<Metrics>,
    options: RelayOptions,
    /// Every connection and stream task, so shutdown can wait for them and end them.
    tasks: std::sync::Mutex<JoinSet<()>>,
    /// TLS streams: its TLS for them (replaced on renewal), its listener until `run` takes it,
    /// and what it knows of peers'.
    tls: std::sync::Mutex<tls_streams::Configs>,
    tls_listener: std::sync::Mutex<Option<TcpListener>>,
    tls_book: std::sync::Mutex<tls_streams::Book>,
}

/// The certificate this relay presents: which one (counted from 0, one more per renewal) and
/// its end.
#[derive(Clone, Copy, Debug)]
struct Ours {
    generation: u64,
    not_after: SystemTime,
}

/// One open peer connection and what the relay last made of it.
struct Tracked {
    conn: Connection,
    peer: PeerId,
    /// Since when its peer has had no link (none: it has one).
    unlinked_since: Option<Instant>,
    /// The (streams, receive window) it was last given.
    sized: (u32, u32),
    /// The certificate of ours it was made with (or an older one: never a newer one).
    ours: Ours,
    /// Streams open on it, both ways.
    streams: usize,
    /// The peer refused a stream on it as expired (its clock runs ahead of ours).
    expired_by_peer: bool,
}

/// What a connection may still carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Usable {
    /// New streams: it was made with both ends' current certificates.
    Fresh,
    /// New streams while no fresher connection can be made: this relay renewed its certificate
    /// since, or the peer's certificate is past its renewal point.
    Stale,
    /// Nothing new: a certificate it was made with has expired (or is about to).
    Expired,
}

impl Tracked {
    /// What it may carry at `now`, given this relay's current certificate `ours` and `margin`
    /// before the certificates' end.
    fn usable(&self, ours: &Ours, now: SystemTime, margin: Duration) -> Usable {
        if self.expired_by_peer {
            return Usable::Expired;
        }
        usable(
            self.ours,
            (self.peer.renew_at, self.peer.not_after),
            ours,
            now,
            margin,
        )
    }

    /// Whether it is closed once it carries no stream: made with a certificate of ours since
    /// renewed, or with one that expired. (One made with a peer certificate past its renewal
    /// point is the peer's to retire.)
    fn retired(&self, ours: &Ours, now: SystemTime) -> bool {
        self.ours.generation != ours.generation
            || self.usable(ours, now, Duration::ZERO) == Usable::Expired
    }
}

/// What a connection made with our certificate `made_with` and a peer certificate due for
/// renewal and ending at `peer` = (renew at, not after) may carry at `now`, while this relay
/// presents `ours`; `margin` before either certificate's end counts as its end.
fn usable(
    made_with: Ours,
    peer: (SystemTime, SystemTime),
    ours: &Ours,
    now: SystemTime,
    margin: Duration,
) -> Usable {
    let (peer_renew_at, peer_not_after) = peer;
    if now + margin >= made_with.not_after.min(peer_not_after) {
        Usable::Expired
    } else if made_with.generation != ours.generation || now >= peer_renew_at {
        Usable::Stale
    } else {
        Usable::Fresh
    }
}

/// One peer's connection for new streams, when to try again after a failed dial, and whether
/// the peer is known to be down.
#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    backoff: Duration,
    next_attempt: Option<Instant>,
    /// Why the peer is known to be down: its last connection ended without it (timed out,
    /// reset, shut down) and no dial succeeded since. New streams then fail fast instead of
    /// being held for the dial deadline.
    down: Option<String>,
    /// No new dial to replace a stale connection before this.
    stale_redial_at: Option<Instant>,
}

/// Why no connection to a peer is at hand.
#[derive(Debug)]
enum Unreachable {
    /// A dial failed (and was logged); it is tried again (with backoff) until the client's
    /// deadline.
    Failed,
    /// The peer is known to be down: the client fails now.
    Down(String),
}

/// Counts one stream on a tracked connection while it lives; the last one to end closes a
/// retired connection.
struct StreamGuard {
    shared: Arc<Shared>,
    id: usize,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ours = *lock(&self.shared.ours);
        let mut conns = lock(&self.shared.conns);
        let Some(t) = conns.get_mut(&self.id) else {
            return;
        };
        t.streams = t.streams.saturating_sub(1);
        if t.streams == 0 && t.retired(&ours, SystemTime::now()) {
            let (conn, peer) = (t.conn.clone(), t.peer.clone());
            drop(conns);
            self.shared.close_rotated(&conn, &peer);
        }
    }
}

/// A peer as its certificate names it: every log line about a peer carries both.
#[derive(Clone, Debug)]
struct PeerId {
    node: NodeRef,
    id: SpiffeId,
    serial: String,
    /// When the certificate is due for renewal, and when it ends.
    renew_at: SystemTime,
    not_after: SystemTime,
}

impl PeerId {
    fn of(conn: &Connection) -> Result<Self, String> {
        let certs = conn
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .ok_or("no peer certificate")?;
        Self::from_certs(&certs)
    }

    fn from_certs(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Result<Self, String> {
        let leaf = certs.first().ok_or("no peer certificate")?;
        let info = CertInfo::parse(leaf).map_err(|e| e.to_string())?;
        Ok(Self {
            node: NodeRef::from(&info.spiffe_id),
            renew_at: info.renew_at(),
            not_after: info.not_after,
            id: info.spiffe_id,
            serial: info.serial,
        })
    }
}

/// The relay: a QUIC endpoint (server and client on one socket) plus its tasks.
pub struct Relay {
    shared: Arc<Shared>,
    config: watch::Sender<Arc<RelayConfig>>,
    listening: watch::Receiver<Arc<BTreeSet<SocketAddr>>>,
    options: RelayOptions,
}

impl Relay {
    /// A relay whose datagrams travel over `transport`. Until [`Relay::update`] brings a
    /// standing, every peer is refused.
    pub fn new(
        transport: Arc<dyn Transport>,
        local: NodeRef,
        tls_material: &TlsMaterial<'_>,
        options: RelayOptions,
        metrics: Arc<Metrics>,
        budgets: Arc<Budgets>,
    ) -> Result<Self> {
        let throttle = Arc::new(Throttle::default());
        let gate = PeerGate::new(Standing::default())
            .observed(handshake_observer(metrics.clone(), throttle.clone()));
        // What this endpoint accepts from peers bounds how far their path MTU discovery climbs.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(options.max_udp_payload)
            .context("--max-udp-payload")?
            // The rendezvous's sealed datagrams share this socket: no peer may clear QUIC's
            // fixed bit towards it (see `rendezvous::sealed`).
            .grease_quic_bit(false);
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config(tls_material, options, &gate)?),
            transport.socket(),
            Arc::new(quinn::TokioRuntime),
        )?;
        transport.attach(&endpoint);
        // TLS streams take TCP on the QUIC socket's address.
        let tls_listener = if options.streams_over != StreamsOver::Quic {
            let addr = endpoint.local_addr()?;
            let listener = bind_listener(addr)
                .with_context(|| format!("binding TCP {addr} for TLS streams (--streams-over)"))?;
            Some(listener)
        } else {
            None
        };
        let (config, rx) = watch::channel(Arc::new(RelayConfig::default()));
        let (listening_tx, listening) = watch::channel(Arc::new(BTreeSet::new()));
        let client_config = client_config(tls_material, options, &gate)?;
        let tls = tls_streams::Configs::new(tls_material, &gate)?;
        Ok(Self {
            listening,
            shared: Arc::new(Shared {
                listening: listening_tx,
                collab: tls_material.identity.spiffe_id().collab().to_owned(),
                local,
                endpoint,
                transport,
                config: rx,
                peers: std::sync::Mutex::new(HashMap::new()),
                client_config: std::sync::Mutex::new(client_config),
                gate,
                ours: std::sync::Mutex::new(Ours {
                    generation: 0,
                    not_after: tls_material.identity.info().not_after,
                }),
                conns: std::sync::Mutex::new(HashMap::new()),
                limits: std::sync::Mutex::new(Limits::new(options.caps)),
                budgets,
                throttle,
                metrics,
                options,
                tasks: std::sync::Mutex::new(JoinSet::new()),
                tls: std::sync::Mutex::new(tls),
                tls_listener: std::sync::Mutex::new(tls_listener),
                tls_book: std::sync::Mutex::default(),
            }),
            config,
            options,
        })
    }

    /// The address the relay's socket is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.endpoint.local_addr()?)
    }

    /// The addresses the relay currently listens on for peers.
    pub fn listening(&self) -> watch::Receiver<Arc<BTreeSet<SocketAddr>>> {
        self.listening.clone()
    }

    /// The links' budgets (limits and use), for status reports.
    pub fn budgets(&self) -> Arc<Budgets> {
        self.shared.budgets.clone()
    }

    /// Replaces what the relay may do. New handshakes see the new standing at once; open
    /// connections and listeners follow within a moment; streams no longer admitted are reset.
    pub fn update(&self, config: RelayConfig) {
        self.shared.gate.set(config.standing.clone());
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
    /// New streams then go to connections made with it; connections made with the previous one
    /// keep their open streams and close when the last one ends.
    pub fn set_tls(&self, tls_material: &TlsMaterial<'_>) -> Result<()> {
        let gate = &self.shared.gate;
        let server = server_config(tls_material, self.options, gate)?;
        let client = client_config(tls_material, self.options, gate)?;
        let tls = tls_streams::Configs::new(tls_material, gate)?;
        // Both configs first, then the generation: a connection is never credited with a newer
        // certificate than the one it was made with.
        self.shared.endpoint.set_server_config(Some(server));
        *lock(&self.shared.client_config) = client;
        *lock(&self.shared.tls) = tls;
        let mut ours = lock(&self.shared.ours);
        ours.generation += 1;
        ours.not_after = tls_material.identity.info().not_after;
        Ok(())
    }

    /// Runs the relay until `shutdown` completes.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let accept = tokio::spawn(accept_loop(self.shared.clone()));
        let accept_tls = lock(&self.shared.tls_listener)
            .take()
            .map(|listener| tokio::spawn(tls_streams::accept_loop(self.shared.clone(), listener)));
        let stop = CancellationToken::new();
        let listeners = tokio::spawn(listen_loop(self.shared.clone(), stop.clone()));
        let sweeper = tokio::spawn(sweep_loop(self.shared.clone(), stop.clone()));
        let flusher = {
            let (budgets, stop) = (self.shared.budgets.clone(), stop.clone());
            tokio::spawn(async move { budgets.keep_flushed(stop.cancelled()).await })
        };
        shutdown.await;
        accept.abort();
        if let Some(accept_tls) = accept_tls {
            accept_tls.abort();
        }
        // Wait for the listeners to close, so the addresses are free when this returns, and
        // for the last write of spent budgets.
        stop.cancel();
        let _ = listeners.await;
        let _ = sweeper.await;
        let _ = flusher.await;
        self.shared.endpoint.close(close::SHUTDOWN, b"shutdown");
        // Closing the endpoint ends every connection and stream; let their tasks finish, and end
        // whatever has not within a moment, so no task outlives the relay.
        let mut tasks = std::mem::take(&mut *lock(&self.shared.tasks));
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

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts and logs (throttled) every peer the verifiers refuse at the handshake, naming the
/// identity and serial its certificate presents.
fn handshake_observer(metrics: Arc<Metrics>, throttle: Arc<Throttle>) -> tls::RefusalObserver {
    Arc::new(move |error, presented| {
        let reason = match error {
            fedmesh_certs::Error::PeerRefused { why, .. } => why.as_str(),
            _ => "untrusted",
        };
        metrics.refuse_peer(reason);
        let (peer, serial) = presented.map_or_else(
            || ("unknown".to_owned(), "unknown".to_owned()),
            |i| (i.spiffe_id.to_string(), i.serial.clone()),
        );
        if let Some(held_back) = throttle.admit(reason, &peer, Instant::now()) {
            warn!(%peer, %serial, reason, %error, held_back, "peer refused at the handshake");
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Connections

impl Shared {
    /// Runs `task` as one of the relay's tasks (see [`Relay::run`]'s drain).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        // Forget tasks that have ended.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    fn slot(&self, peer: &NodeRef) -> Arc<tokio::sync::Mutex<Slot>> {
        lock(&self.peers).entry(peer.clone()).or_default().clone()
    }

    /// A connection to `peer` for one new stream, counted on it until the guard drops: the slot's
    /// connection while it is fresh; a new dial (with backoff) when there is none, or it was made
    /// with certificates since renewed or expired. A stale connection still serves while no
    /// fresher one can be made; an expired one never does.
    async fn connection(
        self: &Arc<Self>,
        peer: &NodeRef,
    ) -> Result<(Connection, StreamGuard), Unreachable> {
        let slot = self.slot(peer);
        let mut s = slot.lock().await;
        let mut fallback = None;
        if let Some(conn) = s.conn.clone()
            && conn.close_reason().is_none()
        {
            match self.usable(&conn) {
                Usable::Fresh => {
                    if let Some(guard) = self.stream_guard(&conn) {
                        return Ok((conn, guard));
                    }
                }
                Usable::Stale => {
                    let now = Instant::now();
                    if s.stale_redial_at.is_some_and(|at| now < at)
                        && let Some(guard) = self.stream_guard(&conn)
                    {
                        return Ok((conn, guard));
                    }
                    s.stale_redial_at = Some(now + STALE_REDIAL_EVERY);
                    fallback = Some(conn);
                }
                Usable::Expired => {}
            }
        }
        match self.dial(peer, &mut s).await {
            Ok(conn) => match self.stream_guard(&conn) {
                Some(guard) => Ok((conn, guard)),
                None => Err(Unreachable::Failed),
            },
            Err(error) => {
                // A stale connection serves while no fresher one can be made.
                if let Some(conn) = fallback
                    && self.usable(&conn) != Usable::Expired
                    && let Some(guard) = self.stream_guard(&conn)
                {
                    return Ok((conn, guard));
                }
                Err(error)
            }
        }
    }

    /// Dials `peer` into its slot `s`. After a failure, the next dial waits for a backoff; while
    /// the peer is known to be down, a dial is bounded by [`DOWN_DIAL_TIMEOUT`] and a backoff
    /// fails the stream at once.
    async fn dial(
        self: &Arc<Self>,
        peer: &NodeRef,
        s: &mut Slot,
    ) -> Result<Connection, Unreachable> {
        if let Some(at) = s.next_attempt {
            if let Some(why) = &s.down
                && Instant::now() < at
            {
                return Err(Unreachable::Down(why.clone()));
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let id =
            SpiffeId::new(&self.collab, &peer.org, &peer.node).map_err(|_| Unreachable::Failed)?;
        let endpoints = self.config.borrow().peers.get(peer).cloned();
        // The certificate first, then the config: a connection is never credited with a newer
        // certificate than the one it was made with (see `Relay::set_tls`).
        let ours = *lock(&self.ours);
        let client_config = lock(&self.client_config).clone();
        let attempt = async {
            let endpoints =
                endpoints.ok_or_else(|| format!("{peer} has not advertised an endpoint"))?;
            let addr = self.transport.locate(peer, &endpoints).await?;
            self.endpoint
                .connect_with(client_config, addr, &id.dns_name())
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| describe_connection_error(&e))
        };
        let attempt = async {
            if s.down.is_some() {
                tokio::time::timeout(DOWN_DIAL_TIMEOUT, attempt)
                    .await
                    .unwrap_or_else(|_| Err(format!("no handshake within {DOWN_DIAL_TIMEOUT:?}")))
            } else {
                attempt.await
            }
        };
        let dialled = attempt.await.and_then(|conn| {
            let who = PeerId::of(&conn)?;
            Ok((conn, who))
        });
        let dialled = dialled.and_then(|(conn, who)| match self.track(&conn, &who, ours) {
            Ok(()) => Ok((conn, who)),
            Err(detail) => {
                conn.close(close::TOO_MANY, b"too many connections");
                Err(detail)
            }
        });
        match dialled {
            Ok((conn, who)) => {
                info!(peer = %who.id, serial = %who.serial, remote = %conn.remote_address(), "connected to peer");
                s.conn = Some(conn.clone());
                s.backoff = Duration::ZERO;
                s.next_attempt = None;
                s.down = None;
                self.spawn(serve_connection(self.clone(), conn.clone(), who, None));
                Ok(conn)
            }
            Err(error) => {
                s.backoff = (s.backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
                s.next_attempt = Some(Instant::now() + s.backoff);
                self.metrics.refuse("peer_unreachable");
                let who = id.to_string();
                if let Some(held_back) = self.throttle.admit("unreachable", &who, Instant::now()) {
                    warn!(peer = %who, serial = "(no handshake)", %error, retry_in = ?s.backoff, held_back, "cannot reach peer");
                }
                match &s.down {
                    Some(why) => Err(Unreachable::Down(format!("{why}; dialling again: {error}"))),
                    None => Err(Unreachable::Failed),
                }
            }
        }
    }

    /// The round trip `peer`'s QUIC connection measures, when one is up (and its slot is not
    /// busy dialling).
    fn peer_rtt(&self, peer: &NodeRef) -> Option<Duration> {
        let slot = self.slot(peer);
        let s = slot.try_lock().ok()?;
        s.conn
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .map(Connection::rtt)
    }

    /// What `conn` may still carry of ours (untracked: nothing).
    fn usable(&self, conn: &Connection) -> Usable {
        let ours = *lock(&self.ours);
        lock(&self.conns)
            .get(&conn.stable_id())
            .map_or(Usable::Expired, |t| {
                t.usable(&ours, SystemTime::now(), EXPIRY_MARGIN)
            })
    }

    /// The peer of the tracked connection `id`.
    fn peer_of(&self, id: usize) -> Option<PeerId> {
        lock(&self.conns).get(&id).map(|t| t.peer.clone())
    }

    /// Counts a stream the peer opened on `conn`, unless a certificate of it has expired.
    fn usable_inbound(self: &Arc<Self>, conn: &Connection) -> Option<StreamGuard> {
        let ours = *lock(&self.ours);
        let expired = lock(&self.conns)
            .get(&conn.stable_id())
            .is_none_or(|t| t.usable(&ours, SystemTime::now(), Duration::ZERO) == Usable::Expired);
        if expired {
            return None;
        }
        self.stream_guard(conn)
    }

    /// Counts one more stream on `conn`, unless it is closed or no longer tracked.
    fn stream_guard(self: &Arc<Self>, conn: &Connection) -> Option<StreamGuard> {
        let id = conn.stable_id();
        let mut conns = lock(&self.conns);
        let t = conns.get_mut(&id)?;
        if conn.close_reason().is_some() {
            return None;
        }
        t.streams += 1;
        Some(StreamGuard {
            shared: self.clone(),
            id,
        })
    }

    /// Closes a connection made with certificates since renewed or expired, whose last stream
    /// ended.
    fn close_rotated(&self, conn: &Connection, peer: &PeerId) {
        conn.close(close::ROTATED, b"rotated");
        self.metrics.close_connection("rotated");
        debug!(peer = %peer.id, serial = %peer.serial, "connection made with earlier certificates closed after its last stream");
    }

    /// A refusal of a stream on `conn` because a certificate of it expired (the peer's clock is
    /// ahead): no new stream of ours goes on it.
    fn expired_by_peer(&self, conn: &Connection) {
        if let Some(t) = lock(&self.conns).get_mut(&conn.stable_id()) {
            t.expired_by_peer = true;
        }
    }

    /// Keeps an accepted connection for outbound use too, unless a fresh one exists.
    async fn register(&self, peer: &NodeRef, conn: &Connection) {
        let slot = self.slot(peer);
        let mut s = slot.lock().await;
        let replace = match &s.conn {
            None => true,
            Some(c) => c.close_reason().is_some() || self.usable(c) != Usable::Fresh,
        };
        if replace && self.usable(conn) != Usable::Expired {
            s.conn = Some(conn.clone());
            s.backoff = Duration::ZERO;
            s.next_attempt = None;
            s.down = None;
        }
    }

    /// Records that `conn`, a connection to `peer`, ended with `error`: when the peer died,
    /// restarted or shut down, and no other connection to it lives, it is known to be down.
    async fn ended(&self, peer: &PeerId, conn: &Connection, error: &quinn::ConnectionError) {
        use quinn::ConnectionError as E;
        let why = match error {
            E::TimedOut => format!("no answer for {IDLE_TIMEOUT:?}"),
            E::Reset => "it restarted (connection reset)".to_owned(),
            E::ApplicationClosed(c) if c.error_code == close::SHUTDOWN => "it shut down".to_owned(),
            _ => return,
        };
        let reason = if matches!(error, E::TimedOut) {
            "peer_timed_out"
        } else {
            "peer_gone"
        };
        self.metrics.close_connection(reason);
        let slot = self.slot(&peer.node);
        let mut s = slot.lock().await;
        let other_alive = s
            .conn
            .as_ref()
            .is_some_and(|c| c.stable_id() != conn.stable_id() && c.close_reason().is_none());
        if other_alive {
            return;
        }
        s.conn = None;
        s.backoff = Duration::ZERO;
        s.next_attempt = None;
        let what =
            "peer connection lost with its streams; new streams to it fail fast until it is back";
        if matches!(error, E::ApplicationClosed(_)) {
            info!(peer = %peer.id, serial = %peer.serial, reason, detail = %why, "{what}");
        } else {
            self.warn_throttled(reason, peer, what, &why);
        }
        s.down = Some(format!("{} is down: {why}", peer.node));
    }

    /// Logs a refusal about `peer` at most once per reason and peer per interval.
    fn warn_throttled(&self, reason: &'static str, peer: &PeerId, what: &str, detail: &str) {
        if let Some(held_back) = self
            .throttle
            .admit(reason, &peer.id.to_string(), Instant::now())
        {
            warn!(peer = %peer.id, serial = %peer.serial, reason, detail, held_back, "{what}");
        }
    }

    /// Starts tracking `conn`, made with our certificate `ours`, unless its peer already holds
    /// too many connections.
    fn track(&self, conn: &Connection, peer: &PeerId, ours: Ours) -> Result<(), String> {
        let mut conns = lock(&self.conns);
        let held = conns.values().filter(|t| t.peer.node == peer.node).count();
        let max = self.options.caps.connections_per_peer as usize;
        if held >= max {
            return Err(format!(
                "{} already holds {held} connections (at most {max})",
                peer.node
            ));
        }
        conns.insert(
            conn.stable_id(),
            Tracked {
                conn: conn.clone(),
                peer: peer.clone(),
                unlinked_since: None,
                sized: (UNLINKED_STREAMS, UNLINKED_WINDOW),
                ours,
                streams: 0,
                expired_by_peer: false,
            },
        );
        Ok(())
    }

    /// Checks every open connection against `config`: closes the ones whose standing no longer
    /// admits them, and the ones whose peer has had no link for `unlinked_idle`; sizes the rest
    /// for the links their peer has.
    fn sweep(&self, config: &RelayConfig, now: Instant) {
        let mut closing = Vec::new();
        let mut rotated = Vec::new();
        let ours = *lock(&self.ours);
        let wall = SystemTime::now();
        {
            let mut conns = lock(&self.conns);
            for t in conns.values_mut() {
                if let Err(error) = config.standing.check(&t.peer.id, &t.peer.serial) {
                    let reason = match &error {
                        fedmesh_certs::Error::PeerRefused { why, .. } => why.as_str(),
                        _ => "refused",
                    };
                    closing.push((t.conn.clone(), t.peer.clone(), reason, error.to_string()));
                    continue;
                }
                if t.streams == 0 && t.retired(&ours, wall) {
                    rotated.push((t.conn.clone(), t.peer.clone()));
                    continue;
                }
                let expired = t.usable(&ours, wall, Duration::ZERO) == Usable::Expired;
                match config.policy.inbound_streams(&t.peer.node, MAX_STREAMS) {
                    // Expired: the peer is given no new stream (those already granted are
                    // refused as they arrive).
                    Some(_) if expired => {
                        size(t, 0, Windows::for_path(self.options.path).connection);
                    }
                    Some(streams) => {
                        t.unlinked_since = None;
                        size(
                            t,
                            streams.max(UNLINKED_STREAMS),
                            Windows::for_path(self.options.path).connection,
                        );
                    }
                    None => {
                        let since = *t.unlinked_since.get_or_insert(now);
                        if now.saturating_duration_since(since) >= self.options.unlinked_idle {
                            closing.push((
                                t.conn.clone(),
                                t.peer.clone(),
                                "idle_without_link",
                                format!(
                                    "no link with {} for {:?}",
                                    t.peer.node, self.options.unlinked_idle
                                ),
                            ));
                        } else {
                            size(t, UNLINKED_STREAMS, UNLINKED_WINDOW);
                        }
                    }
                }
            }
        }
        for (conn, peer) in rotated {
            self.close_rotated(&conn, &peer);
        }
        for (conn, peer, reason, detail) in closing {
            let code = if reason == "idle_without_link" {
                close::NO_LINK
            } else {
                close::REFUSED
            };
            conn.close(code, reason.as_bytes());
            self.metrics.close_connection(reason);
            if reason == "idle_without_link" {
                debug!(peer = %peer.id, serial = %peer.serial, reason, %detail, "peer connection closed");
            } else {
                self.warn_throttled(
                    reason,
                    &peer,
                    "peer connection closed with its streams",
                    &detail,
                );
            }
        }
    }
}

/// Gives a connection `streams` concurrent peer streams and a receive window of `window` bytes,
/// when that changes what it has.
fn size(t: &mut Tracked, streams: u32, window: u32) {
    if t.sized == (streams, window) {
        return;
    }
    t.conn
        .set_max_concurrent_bi_streams(VarInt::from_u32(streams));
    t.conn.set_receive_window(VarInt::from_u32(window));
    t.sized = (streams, window);
}

/// Applies every config change (and, every [`SWEEP_EVERY`], the passing of time) to the open
/// connections and the budgets, until `stop`.
async fn sweep_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut config = shared.config.clone();
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let current = config.borrow_and_update().clone();
        let unix = fedmesh_documents::jws::unix(SystemTime::now());
        shared.budgets.sync(current.policy.grants(), unix);
        shared.sweep(&current, Instant::now());
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
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

/// Holds a source's slot in the [`Limits`] from its first packet until its connection closes.
struct SourceSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
    established: bool,
}

impl SourceSlot {
    fn established(&mut self) {
        lock(&self.shared.limits).established(self.ip);
        self.established = true;
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut limits = lock(&self.shared.limits);
        if self.established {
            limits.closed(self.ip);
        } else {
            limits.failed(self.ip);
        }
    }
}

impl Shared {
    /// A slot in the source caps for a new connection from `remote`, or none (counted and
    /// logged) when a cap refuses it.
    fn admit_source(self: &Arc<Self>, remote: SocketAddr) -> Option<SourceSlot> {
        if let Err(over) = lock(&self.limits).begin(remote.ip()) {
            self.metrics.refuse_connection(over.as_str());
            let who = remote.ip().to_string();
            if let Some(held_back) = self.throttle.admit(over.as_str(), &who, Instant::now()) {
                warn!(source = %remote, peer = "(before the handshake)", serial = "(before the handshake)", reason = over.as_str(), held_back, "connection refused: over the relay's cap");
            }
            return None;
        }
        Some(SourceSlot {
            shared: self.clone(),
            ip: remote.ip(),
            established: false,
        })
    }

    /// Reports a failed handshake from `remote`. Certificates the verifiers refuse
    /// (`by_verifier`) are reported, with the identity they name, by the handshake observer;
    /// other failures are reported here.
    fn handshake_failed(&self, remote: SocketAddr, error: &str, by_verifier: bool) {
        let who = remote.ip().to_string();
        if by_verifier {
            debug!(%remote, %error, "peer handshake refused");
        } else if let Some(held_back) = self.throttle.admit("handshake", &who, Instant::now()) {
            warn!(source = %remote, peer = "(no certificate)", serial = "(no certificate)", %error, held_back, "peer handshake failed");
        }
    }
}

/// Accepts incoming QUIC connections within the caps and serves their streams.
async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
        let Some(slot) = shared.admit_source(remote) else {
            incoming.refuse();
            continue;
        };
        // Past half the handshake cap, sources must first prove they own their address.
        let busy = lock(&shared.limits).handshakes() > shared.options.caps.handshakes / 2;
        if busy && !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        shared.spawn(accept_one(shared.clone(), incoming, slot));
    }
}

async fn accept_one(shared: Arc<Shared>, incoming: quinn::Incoming, mut slot: SourceSlot) {
    let remote = incoming.remote_address();
    // The certificate before the handshake that presents it (see `Relay::set_tls`).
    let ours = *lock(&shared.ours);
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            debug!(%remote, error = %describe_connection_error(&e), "connection attempt dropped");
            return;
        }
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            shared.metrics.refuse("handshake");
            let by_verifier = matches!(&e, quinn::ConnectionError::TransportError(t)
                if t.code == quinn::TransportErrorCode::crypto(46));
            shared.handshake_failed(remote, &describe_connection_error(&e), by_verifier);
            return;
        }
        Err(_) => {
            shared.metrics.refuse("handshake_timeout");
            debug!(%remote, "peer handshake timed out");
            return;
        }
    };
    slot.established();
    let peer = match PeerId::of(&conn) {
        Ok(peer) => peer,
        Err(error) => {
            warn!(%remote, peer = "(unusable certificate)", serial = "(unusable certificate)", %error, "peer without a usable identity");
            conn.close(close::IDENTITY, b"identity");
            return;
        }
    };
    debug!(peer = %peer.id, serial = %peer.serial, %remote, "peer connected");
    if let Err(detail) = shared.track(&conn, &peer, ours) {
        conn.close(close::TOO_MANY, b"too many connections");
        shared.metrics.refuse_connection("connections_per_peer");
        shared.warn_throttled(
            "connections_per_peer",
            &peer,
            "peer connection refused",
            &detail,
        );
        return;
    }
    shared.register(&peer.node, &conn).await;
    serve_connection(shared, conn, peer, Some(slot)).await;
}

/// Serves the streams a peer opens on `conn` (whichever side dialled, tracked by then); `_slot`
/// holds the source's place in the caps for as long as the connection lives. A stream arriving
/// once a certificate of the connection expired is refused: the peer opens it again on a
/// connection made with current certificates.
async fn serve_connection(
    shared: Arc<Shared>,
    conn: Connection,
    peer: PeerId,
    _slot: Option<SourceSlot>,
) {
    // Size it for the peer's links now, not at the next sweep.
    let config = shared.config.borrow().clone();
    shared.sweep(&config, Instant::now());
    shared.metrics.peer_connections.inc();
    let path = tokio::spawn(report_path(shared.clone(), conn.clone(), peer.node.clone()));
    loop {
        match conn.accept_bi().await {
            Ok((mut send, recv)) => {
                let Some(guard) = shared.usable_inbound(&conn) else {
                    let (shared, peer) = (shared.clone(), peer.clone());
                    shared.clone().spawn(async move {
                        let detail = format!(
                            "a certificate of this connection with {} expired: open the stream on a new connection",
                            peer.node
                        );
                        refuse(&shared, &mut send, &peer, Refusal::Expired, detail).await;
                        drop(recv);
                    });
                    continue;
                };
                let task = inbound_stream(shared.clone(), peer.clone(), send, recv, None);
                shared.spawn(async move {
                    task.await;
                    drop(guard);
                });
            }
            Err(e) => {
                debug!(peer = %peer.id, serial = %peer.serial, error = %describe_connection_error(&e), "peer connection ended");
                shared.ended(&peer, &conn, &e).await;
                break;
            }
        }
    }
    lock(&shared.conns).remove(&conn.stable_id());
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

async fn read_request(recv: &mut (impl AsyncRead + Unpin)) -> Result<Request, Refusal> {
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
    send: &mut (impl ToPeer + AsyncWrite + Unpin),
    peer: &PeerId,
    refusal: Refusal,
    detail: String,
) {
    shared.metrics.refuse(refusal.as_str());
    shared.warn_throttled(refusal.as_str(), peer, "stream refused", &detail);
    let _ = send
        .write_all(&Response::Refused(refusal, detail).encode())
        .await;
    send.finish().await;
}

/// Serves one stream `peer` opened (on QUIC or TLS): reads its header, admits it or refuses it
/// with the reason, and pumps it. `over` refuses it first: the peer holds too many streams.
async fn inbound_stream(
    shared: Arc<Shared>,
    peer: PeerId,
    mut send: impl ToPeer + AsyncWrite + Unpin + 'static,
    mut recv: impl FromPeer + AsyncRead + Unpin + 'static,
    over: Option<String>,
) {
    if let Some(detail) = over {
        return refuse(&shared, &mut send, &peer, Refusal::StreamLimit, detail).await;
    }
    let request = match tokio::time::timeout(HEADER_TIMEOUT, read_request(&mut recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(refusal)) => {
            let detail = format!("stream header from {} refused: {refusal}", peer.node);
            return refuse(&shared, &mut send, &peer, refusal, detail).await;
        }
        Err(_) => {
            let detail = "header timed out".to_owned();
            return refuse(&shared, &mut send, &peer, Refusal::BadHeader, detail).await;
        }
    };
    let port = request.port;
    let (grant, target) = {
        let config = shared.config.borrow();
        (
            config.policy.admits_inbound(&peer.node, port).cloned(),
            config.target(port),
        )
    };
    let Some(grant) = grant else {
        let detail = format!(
            "no link allows {} to reach {} on port {port}",
            peer.node, shared.local
        );
        return refuse(&shared, &mut send, &peer, Refusal::NoLink, detail).await;
    };
    let ticket = match shared.budgets.open(&grant) {
        Ok(ticket) => ticket,
        Err((refusal, detail)) => return refuse(&shared, &mut send, &peer, refusal, detail).await,
    };
    let tcp = match connect_target(&target, shared.options.target_deadline).await {
        Ok(tcp) => tcp,
        Err(error) => {
            let detail = format!("target {target} for port {port} unreachable: {error}");
            let refusal = Refusal::TargetUnreachable;
            return refuse(&shared, &mut send, &peer, refusal, detail).await;
        }
    };
    let answered = send.write_all(&Response::Connected.encode()).await;
    if answered.is_err() || send.flush().await.is_err() {
        return;
    }
    debug!(peer = %peer.id, serial = %peer.serial, port, link = %grant.link_id, "inbound stream connected");
    let cancel = until_cut(
        shared.config.clone(),
        &peer,
        port,
        Direction::Inbound,
        ticket.as_ref(),
    );
    let counters = counters(&shared, &grant, ticket.as_ref());
    run_stream(&shared, "inbound", &peer, tcp, send, recv, counters, cancel).await;
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

fn counters(shared: &Shared, grant: &policy::Grant, ticket: Option<&Ticket>) -> Counters {
    Counters {
        sent: shared.metrics.link_bytes(&grant.link_id, "sent"),
        received: shared.metrics.link_bytes(&grant.link_id, "received"),
        budget: ticket.map(Ticket::budget),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_stream<S: ToPeer>(
    shared: &Shared,
    direction: &'static str,
    peer: &PeerId,
    tcp: TcpStream,
    send: S,
    recv: impl FromPeer,
    counters: Counters,
    cancel: impl Future<Output = VarInt>,
) {
    shared
        .metrics
        .streams_total
        .get_or_create(&StreamLabels {
            direction,
            over: S::OVER,
        })
        .inc();
    shared.metrics.streams_active.inc();
    let ended = pump::pump(tcp, send, recv, counters, cancel).await;
    shared.metrics.streams_active.dec();
    if let Ended::Cancelled(code) = ended {
        let reason = pump::reset_reason(code);
        shared.metrics.reset_stream(reason);
        let who = peer.id.to_string();
        if let Some(held_back) = shared.throttle.admit(reason, &who, Instant::now()) {
            info!(direction, peer = %peer.id, serial = %peer.serial, reason, held_back, "stream reset: its link is no longer in force or its budget is spent");
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Inbound,
    Outbound,
}

/// Completes, with the stream error code to reset with, once (peer, port) is no longer admitted
/// in `direction`, the peer's standing no longer admits it, or the link's byte budget is spent.
fn until_cut(
    config: watch::Receiver<Arc<RelayConfig>>,
    peer: &PeerId,
    port: u16,
    direction: Direction,
    ticket: Option<&Ticket>,
) -> impl Future<Output = VarInt> + use<> {
    let budget = ticket.map(Ticket::budget);
    let peer = peer.clone();
    async move {
        let spent = async {
            match &budget {
                Some(b) => b.exhausted().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = until_not_admitted(config, peer, port, direction) => pump::RESET_REVOKED,
            () = spent => pump::RESET_BUDGET,
        }
    }
}

/// Completes once (peer, port) is no longer admitted in `direction`, or the peer's certificate
/// no longer stands (a QUIC stream's connection is closed then too; a TLS stream has only this).
async fn until_not_admitted(
    mut config: watch::Receiver<Arc<RelayConfig>>,
    peer: PeerId,
    port: u16,
    direction: Direction,
) {
    loop {
        {
            let c = config.borrow_and_update();
            let admitted = match direction {
                Direction::Inbound => c.policy.admits_inbound(&peer.node, port).is_some(),
                Direction::Outbound => c.policy.admits_outbound(&peer.node, port).is_some(),
            } && c.standing.check(&peer.id, &peer.serial).is_ok();
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
async fn listen_loop(shared: Arc<Shared>, stop: CancellationToken) {
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
    let Ok(id) = SpiffeId::new(&shared.collab, &peer.org, &peer.node) else {
        return;
    };
    let who = id.to_string();
    let refused = |reason: &'static str, serial: &str, detail: &str| {
        shared.metrics.refuse(reason);
        if let Some(held_back) = shared.throttle.admit(reason, &who, Instant::now()) {
            warn!(peer = %who, serial, port, reason, detail, held_back, "stream refused; closing the client connection");
        }
    };
    // The budget is enforced here as well as at the peer: a spent link costs the peer nothing.
    let ticket = match shared.budgets.open(&grant) {
        Ok(ticket) => ticket,
        Err((refusal, detail)) => return refused(refusal.as_str(), "(not dialled)", &detail),
    };
    let result = tokio::time::timeout(DIAL_DEADLINE, open_patiently(&shared, &peer, port, &grant));
    // Dropping `tcp` on a refusal closes the client connection.
    let opened = match result.await {
        Ok(Ok(opened)) => opened,
        Ok(Err((reason, serial, detail))) => return refused(reason, &serial, &detail),
        Err(_) => {
            let detail = "peer unreachable before the deadline";
            return refused("peer_unreachable", "(no handshake)", detail);
        }
    };
    let counters = counters(&shared, &grant, ticket.as_ref());
    let carry = |peer: &PeerId| {
        debug!(peer = %peer.id, serial = %peer.serial, port, link = %grant.link_id, "outbound stream connected");
        until_cut(
            shared.config.clone(),
            peer,
            port,
            Direction::Outbound,
            ticket.as_ref(),
        )
    };
    match opened {
        Opened::Quic(send, recv, serial, guard) => {
            // The connection's record of the peer (this stream's logs name the same
            // certificate).
            let peer = shared.peer_of(guard.id).unwrap_or(PeerId {
                node: peer,
                id,
                serial,
                renew_at: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::UNIX_EPOCH,
            });
            let cancel = carry(&peer);
            run_stream(
                &shared, "outbound", &peer, tcp, send, recv, counters, cancel,
            )
            .await;
            drop(guard);
        }
        Opened::Tls(send, recv, peer) => {
            let cancel = carry(&peer);
            run_stream(
                &shared, "outbound", &peer, tcp, send, recv, counters, cancel,
            )
            .await;
        }
    }
}

/// An open stream to a peer, answered: on QUIC, its two halves, the serial of the peer's
/// certificate and its count on the connection; on TLS, its two halves and the peer.
enum Opened {
    Quic(quinn::SendStream, quinn::RecvStream, String, StreamGuard),
    Tls(tls_streams::TlsSend, tls_streams::TlsRecv, PeerId),
}
/// Why a stream could not be opened: the reason, the peer's serial, and the detail.
type NotOpened = (&'static str, String, String);
/// The reason of a stream opened on a connection the peer closed as rotated meanwhile.
const ROTATED_REASON: &str = "rotated";

/// [`open`], asked again while the peer answers that no link allows the stream but this node's
/// links still do: each end learns of a link from the hub on its own schedule, so a peer that has
/// not seen a new link yet holds the client a moment instead of failing it. Asked again, a few
/// times, when the stream met a connection the peer retired (expired or rotated): nothing
/// reached the target yet, and the next connection is made with current certificates.
async fn open_patiently(
    shared: &Arc<Shared>,
    peer: &NodeRef,
    port: u16,
    grant: &policy::Grant,
) -> Result<Opened, NotOpened> {
    let mut delay = Duration::from_millis(50);
    let mut rotations = 0;
    loop {
        match open(shared, peer, port, grant).await {
            Err((reason, ..))
                if (reason == Refusal::Expired.as_str() || reason == ROTATED_REASON)
                    && rotations < ROTATION_RETRIES =>
            {
                rotations += 1;
            }
            Err((reason, ..))
                if reason == Refusal::NoLink.as_str()
                    && shared
                        .config
                        .borrow()
                        .policy
                        .admits_outbound(peer, port)
                        .is_some() =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Opens a stream to `peer` for `port` (over TLS where [`tls_streams::chosen`], else QUIC) and
/// waits for the peer's answer; returns the stream, or the refusal's reason, the serial of the
/// peer's certificate and the detail.
async fn open(
    shared: &Arc<Shared>,
    peer: &NodeRef,
    port: u16,
    grant: &policy::Grant,
) -> Result<Opened, NotOpened> {
    let request = Request {
        port,
        label: grant.label.clone(),
    };
    if tls_streams::chosen(shared, peer)
        && let Ok((mut send, mut recv, who)) = tls_streams::dial(shared, peer).await
    {
        let fail = |reason: &'static str, detail: String| (reason, who.serial.clone(), detail);
        match ask(&mut send, &mut recv, &request).await {
            Ok(()) => return Ok(Opened::Tls(send, recv, who)),
            // Nothing answered (in TLS 1.3 a peer that refuses our certificate says so only
            // after our handshake ends): QUIC dials it as patiently as ever.
            Err(Asked::Lost(detail)) => {
                debug!(%peer, %detail, "TLS stream lost before an answer; opening it over QUIC");
            }
            Err(Asked::Bad(detail)) => return Err(fail("bad_response", detail)),
            Err(Asked::Refused(refusal, detail)) => return Err(fail(refusal.as_str(), detail)),
        }
    }
    open_quic(shared, peer, &request).await
}

/// What a peer answered a stream's header with, when not `Connected`.
enum Asked {
    /// The stream broke before an answer came.
    Lost(String),
    /// The answer could not be read.
    Bad(String),
    /// The peer refused the stream.
    Refused(Refusal, String),
}

/// Sends a stream's header and reads the peer's answer.
async fn ask(
    send: &mut (impl AsyncWrite + Unpin),
    recv: &mut (impl AsyncRead + Unpin),
    request: &Request,
) -> Result<(), Asked> {
    let lost = |e: std::io::Error| Asked::Lost(e.to_string());
    send.write_all(&request.encode()).await.map_err(lost)?;
    send.flush().await.map_err(lost)?;
    let mut prefix = [0u8; 2];
    recv.read_exact(&mut prefix).await.map_err(lost)?;
    match Response::decode_prefix(prefix).map_err(Asked::Bad)? {
        None => Ok(()),
        Some((refusal, len)) => {
            let mut reason = vec![0u8; len];
            let _ = recv.read_exact(&mut reason).await;
            Err(Asked::Refused(
                refusal,
                String::from_utf8_lossy(&reason).into_owned(),
            ))
        }
    }
}

/// Opens a stream to `peer` on its QUIC connection (dialled when there is none fresh).
async fn open_quic(
    shared: &Arc<Shared>,
    peer: &NodeRef,
    request: &Request,
) -> Result<Opened, NotOpened> {
    // Retry the dial (with backoff) until the deadline around this call cuts it short, unless
    // the peer is known to be down: then the client fails now, with the reason.
    let (conn, guard) = loop {
        match shared.connection(peer).await {
            Ok(found) => break found,
            Err(Unreachable::Down(why)) => {
                return Err(("peer_down", "(no handshake)".to_owned(), why));
            }
            Err(Unreachable::Failed) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let serial = PeerId::of(&conn).map(|p| p.serial).unwrap_or_default();
    let fail = |reason: &'static str, detail: String| (reason, serial.clone(), detail);
    // A connection the peer closed as rotated while this stream was being opened.
    let lost = |detail: String| {
        let rotated = matches!(conn.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::ROTATED);
        fail(
            if rotated {
                ROTATED_REASON
            } else {
                "peer_unreachable"
            },
            detail,
        )
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| lost(describe_connection_error(&e)))?;
    match ask(&mut send, &mut recv, request).await {
        Ok(()) => Ok(Opened::Quic(send, recv, serial, guard)),
        Err(Asked::Lost(detail)) => Err(lost(detail)),
        Err(Asked::Bad(detail)) => Err(fail("bad_response", detail)),
        Err(Asked::Refused(refusal, detail)) => {
            if refusal == Refusal::Expired {
                shared.expired_by_peer(&conn);
            }
            Err(fail(refusal.as_str(), detail))
        }
    }
}

/// Local loopback addresses for peers: the default pool.
pub const DEFAULT_LOOPBACK_POOL: &str = "127.77.0.0/16";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_fresh_until_a_renewal_and_carries_nothing_new_once_expired() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs;
        let first = Ours {
            generation: 0,
            not_after: t0 + s(60),
        };
        let renewed = Ours {
            generation: 1,
            not_after: t0 + s(100),
        };
        // The peer's certificate: renewal due at +40 s, ends at +50 s.
        let peer = (t0 + s(40), t0 + s(50));
        let at = |secs| t0 + s(secs);
        let zero = Duration::ZERO;
        assert_eq!(usable(first, peer, &first, at(10), zero), Usable::Fresh);
        // This relay renewed: the connection still serves while no fresher one can be made.
        assert_eq!(usable(first, peer, &renewed, at(10), zero), Usable::Stale);
        // The peer's certificate is due for renewal.
        assert_eq!(usable(first, peer, &first, at(40), zero), Usable::Stale);
        // Either certificate's end (the peer's here) ends new streams; the margin comes first.
        assert_eq!(usable(first, peer, &first, at(50), zero), Usable::Expired);
        assert_eq!(usable(first, peer, &first, at(49), s(1)), Usable::Expired);
        assert_eq!(usable(first, peer, &first, at(48), s(1)), Usable::Stale);
        // Our own certificate's end, with a peer certificate that lives longer.
        let long_peer = (t0 + s(400), t0 + s(500));
        assert_eq!(
            usable(first, long_peer, &renewed, at(60), zero),
            Usable::Expired
        );
        assert_eq!(
            usable(renewed, long_peer, &renewed, at(60), zero),
            Usable::Fresh
        );
    }
}
