//! Rendezvous replicas that forward to each other, so that two nodes meet whichever replica a
//! load balancer sent each of them to.
//!
//! ```text
//!  node A ──▶ replica 1                                   replica 2 ◀── node B
//!               │  dials every peer replica (QUIC, mutual TLS: the replicas' shared
//!               │  server certificate on both sides, nothing else is accepted)
//!               ├────────────── mesh connection 1 → 2 ──────────────▶│
//!               │◀── presence stream: HELLO(id 2), HERE B, GONE … ───│ (what 2 has connected)
//!               │─── datagram [to B | from A | opaque bytes] ───────▶│ checks: from a mesh peer,
//!               │                                                    │ A stands, B is local
//!                                                                    └──▶ [from A | bytes] ──▶ B
//! ```
//!
//! Each replica dials every address its `--peer` names resolve to (a headless Service name
//! resolves to every replica; re-resolved every few seconds). Both ends of a mesh connection
//! then do the same, so one side naming the other is enough: each opens a stream announcing
//! which nodes are connected to it (a snapshot, then every change) and learns the other's. A
//! datagram for a node that is not connected locally goes to the replica that announced it, as
//! a mesh frame naming the receiver and the sender. The replica that receives a mesh frame
//! delivers it to a node connected to itself or drops it: one hop, never forwarded again, so no
//! loop can form. A replica that dials itself (its own name resolves to it) learns so from the
//! random id in the first message and stops dialling that address.
//!
//! Who may join: the replicas of one rendezvous present one server certificate (nodes pin it,
//! and a load balancer may send a node to any replica, so they share it anyway: one Kubernetes
//! Secret). A mesh connection is accepted only when the other side proves it holds that
//! certificate's key, in both directions, so the mesh needs no second secret, and a party that
//! could join it could already impersonate the rendezvous to nodes. A node's certificate, or any
//! other, is refused; the mesh listens on its own UDP port, never exposed to nodes.
//!
//! The sender's name stays authoritative: the replica the sender is connected to writes it from
//! the sender's verified certificate (and checked its serial); the receiving replica accepts
//! mesh frames only from authenticated replicas and checks again that the sender's node stands
//! under its own verified documents. Every replica verifies the same owner-signed documents, so
//! a revocation closes the node's connection on whichever replica holds it, and that replica
//! announces it gone.
//!
//! Bounds: at most [`MeshOptions::max_peers`] peer addresses, [`MeshOptions::max_nodes`] nodes
//! learned from one peer, a token bucket of [`MeshOptions::rate`] bytes per second per peer on
//! what it sends us, a datagram queue of [`MeshOptions::queue_bytes`] per mesh connection
//! (quinn drops the oldest when full), frames of at most the node frame bound plus one name.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use fedmesh_documents::NodeRef;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use quinn::{Connection, Endpoint, TransportConfig, VarInt, crypto::rustls as qrustls};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Bucket, CARRIER_MTU, DropLabels, FlowLabels, ServerCert, frame, lock};
use crate::throttle::Throttle;

/// The ALPN of replica↔replica connections.
pub const MESH_ALPN: &[u8] = b"fedmesh-rendezvous-mesh/1";

/// How often peer names are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(3);
/// How long a peer may take to answer a dial.
const DIAL_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a peer may take to open its presence stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Presence changes buffered per peer before it is sent a fresh snapshot instead.
const PRESENCE_BACKLOG: usize = 4096;

/// Application close codes of mesh connections.
pub mod close {
    use quinn::VarInt;
    /// The replica is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The dialed replica is the dialer itself.
    pub const SELF: VarInt = VarInt::from_u32(6);
    /// The peer broke the presence protocol.
    pub const PROTOCOL: VarInt = VarInt::from_u32(7);
    /// The address is no longer a peer.
    pub const REMOVED: VarInt = VarInt::from_u32(8);
}

/// Bounds of the mesh.
#[derive(Clone, Copy, Debug)]
pub struct MeshOptions {
    /// Bytes per second one peer replica may hand us.
    pub rate: u64,
    /// Bytes one peer may hand us at once above its rate.
    pub burst: u64,
    /// Bytes queued towards one peer replica before the oldest datagram is dropped.
    pub queue_bytes: usize,
    /// Most nodes learned from one peer.
    pub max_nodes: usize,
    /// Most peer addresses dialled.
    pub max_peers: usize,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            rate: 1024 * 1024 * 1024,
            burst: 16 * 1024 * 1024,
            queue_bytes: 4 * 1024 * 1024,
            max_nodes: 10_000,
            max_peers: 64,
        }
    }
}

/// The mesh's Prometheus metrics (registered with the rendezvous's).
pub struct MeshMetrics {
    /// Datagrams passed between replicas, by collaboration and direction (`to_replica`,
    /// `from_replica`).
    pub datagrams: Family<FlowLabels, Counter>,
    /// Their bytes.
    pub bytes: Family<FlowLabels, Counter>,
    /// Mesh datagrams dropped and presence entries refused, by collaboration and reason.
    pub dropped: Family<DropLabels, Counter>,
    /// Peer replicas connected (dialed and announcing).
    pub peers: Gauge,
    /// Nodes known to be connected at peer replicas.
    pub remote_nodes: Gauge,
}

impl MeshMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            datagrams: Family::default(),
            bytes: Family::default(),
            dropped: Family::default(),
            peers: Gauge::default(),
            remote_nodes: Gauge::default(),
        };
        registry.register(
            "fedmesh_rendezvous_mesh_datagrams",
            "Datagrams passed between rendezvous replicas, by collaboration and direction",
            metrics.datagrams.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_mesh_bytes",
            "Bytes passed between rendezvous replicas, by collaboration and direction",
            metrics.bytes.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_mesh_dropped",
            "Mesh datagrams and announcements dropped, by collaboration and reason",
            metrics.dropped.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_mesh_peers",
            "Peer replicas connected",
            metrics.peers.clone(),
        );
        registry.register(
            "fedmesh_rendezvous_mesh_remote_nodes",
            "Nodes known to be connected at peer replicas",
            metrics.remote_nodes.clone(),
        );
        metrics
    }
}

/// What the mesh needs from the local rendezvous.
pub(super) trait Local: Send + Sync {
    /// The collaboration id (metric label).
    fn collab(&self) -> String;
    /// The nodes connected here.
    fn nodes(&self) -> Vec<NodeRef>;
    /// Whether `node` stands under this replica's verified documents.
    fn admits(&self, node: &NodeRef) -> bool;
    /// Hands `payload` from `sender` to `receiver` if it is connected here.
    fn deliver(
        &self,
        sender: &NodeRef,
        receiver: &NodeRef,
        payload: &[u8],
    ) -> Result<(), &'static str>;
}

/// A change of the nodes connected to this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Presence {
    /// Connected.
    Here(NodeRef),
    /// Gone.
    Gone(NodeRef),
}

// The presence stream: HELLO (16-byte replica id) first, then HERE/GONE (1-byte length and
// `org/node`) and RESET (forget what this peer announced; a snapshot follows).
const HELLO: u8 = 1;
const HERE: u8 = 2;
const GONE: u8 = 3;
const RESET: u8 = 4;

fn put_presence(out: &mut BytesMut, tag: u8, node: &NodeRef) {
    let name = node.to_string();
    out.put_u8(tag);
    out.put_u8(name.len() as u8);
    out.put_slice(name.as_bytes());
}

/// A mesh frame: `[receiver frame [sender frame payload]]`.
pub fn encode(receiver: &NodeRef, sender: &NodeRef, payload: &[u8]) -> Bytes {
    frame::encode(receiver, &frame::encode(sender, payload))
}

/// Reads a mesh frame whose payload is at most `max` bytes of node frame: receiver, sender and
/// payload.
pub fn decode(
    datagram: &Bytes,
    max: usize,
) -> Result<(NodeRef, NodeRef, Bytes), frame::FrameError> {
    let (receiver, inner) = frame::decode(datagram, max + 1 + frame::MAX_NODE_LEN)?;
    let (sender, payload) = frame::decode(&inner, max)?;
    Ok((receiver, sender, payload))
}

/// A peer replica (dialed or accepted), and the nodes it announced.
struct Route {
    conn: Connection,
    /// The peer's replica id (two replicas that name each other share two connections).
    peer: [u8; 16],
    nodes: HashSet<NodeRef>,
}

/// This replica's side of the mesh.
pub struct Mesh {
    endpoint: Endpoint,
    id: [u8; 16],
    client: quinn::ClientConfig,
    local: Weak<dyn Local>,
    presence: broadcast::Sender<Presence>,
    routes: Mutex<HashMap<usize, Route>>,
    selves: Mutex<HashSet<SocketAddr>>,
    peers: watch::Sender<Vec<String>>,
    metrics: Arc<super::RendezvousMetrics>,
    throttle: Throttle,
    options: MeshOptions,
    max_frame: usize,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// The mesh connection's transport: datagrams and one stream from the other side (its presence
/// stream), a bounded datagram queue, quick loss detection.
fn mesh_transport(queue_bytes: usize) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(1))
        .datagram_receive_buffer_size(Some(queue_bytes))
        .datagram_send_buffer_size(queue_bytes)
        .initial_mtu(CARRIER_MTU)
        .min_mtu(CARRIER_MTU)
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .max_idle_timeout(Some(VarInt::from_u32(2_000).into()));
    Arc::new(t)
}

/// Why a dialed connection ended.
enum Ended {
    /// It was this replica.
    ItsMe,
    /// Lost, closed or refused: dial again.
    Lost(String),
}

impl Mesh {
    pub(super) fn new(
        socket: UdpSocket,
        cert: &ServerCert,
        options: MeshOptions,
        max_frame: usize,
        local: Weak<dyn Local>,
        metrics: Arc<super::RendezvousMetrics>,
    ) -> Result<Self> {
        // Exactly the replicas' shared certificate, both ways.
        let verifier = crate::hub::tls::pinned_client_verifier(&cert.pin());
        let mut server_tls =
            rustls::ServerConfig::builder_with_provider(fedmesh_certs::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(vec![cert.cert.clone()], cert.key()?)?;
        server_tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
        let crypto = qrustls::QuicServerConfig::try_from(server_tls).context("mesh server TLS")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(mesh_transport(options.queue_bytes));
        server.max_incoming(options.max_peers * 2);
        let client_tls = crate::hub::tls::pinned_client_config_presenting(
            &cert.pin(),
            vec![cert.cert.clone()],
            cert.key()?,
            MESH_ALPN,
        )?;
        let crypto = qrustls::QuicClientConfig::try_from(client_tls).context("mesh client TLS")?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(mesh_transport(options.queue_bytes));
        // Replica links carry relayed traffic too: the same buffers as the node carriers.
        crate::relay::carrier_socket::size_socket((&socket).into());
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| anyhow::anyhow!("no randomness for the replica id"))?;
        Ok(Self {
            endpoint,
            id,
            client,
            local,
            presence: broadcast::channel(PRESENCE_BACKLOG).0,
            routes: Mutex::new(HashMap::new()),
            selves: Mutex::new(HashSet::new()),
            peers: watch::channel(Vec::new()).0,
            metrics,
            throttle: Throttle::default(),
            options,
            max_frame,
        })
    }

    /// The UDP address peer replicas dial.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The peer replicas, as `host:port` names resolved every few seconds (a name may resolve
    /// to several replicas, this one among them).
    pub fn set_peers(&self, peers: Vec<String>) {
        self.peers.send_replace(peers);
    }

    /// Tells every peer replica that a node connected here or left.
    pub(super) fn announce(&self, change: Presence) {
        // No receiver (no peer yet) is not an error.
        let _ = self.presence.send(change);
    }

    fn collab(&self) -> String {
        self.local.upgrade().map(|l| l.collab()).unwrap_or_default()
    }

    fn drop_reason(&self, collab: &str, reason: &'static str) {
        self.metrics
            .mesh
            .dropped
            .get_or_create(&DropLabels {
                collab: collab.to_owned(),
                reason,
            })
            .inc();
        if let Some(held_back) = self.throttle.admit(reason, "mesh", Instant::now()) {
            debug!(reason, held_back, "mesh datagram dropped");
        }
    }

    fn count(&self, collab: &str, direction: &'static str, len: usize) {
        let labels = FlowLabels {
            collab: collab.to_owned(),
            direction,
        };
        self.metrics.mesh.datagrams.get_or_create(&labels).inc();
        self.metrics
            .mesh
            .bytes
            .get_or_create(&labels)
            .inc_by(len as u64);
    }

    /// Passes a datagram from `sender` (connected here, verified) to the replica where
    /// `receiver` is connected. `Err` names why it was dropped.
    pub(super) fn forward(
        &self,
        collab: &str,
        sender: &NodeRef,
        receiver: &NodeRef,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        let conn = lock(&self.routes)
            .values()
            .find(|r| r.nodes.contains(receiver))
            .map(|r| r.conn.clone())
            .ok_or("unknown_peer")?;
        let out = encode(receiver, sender, payload);
        let len = out.len();
        match conn.send_datagram(out) {
            Ok(()) => {
                self.count(collab, "to_replica", len);
                Ok(())
            }
            Err(quinn::SendDatagramError::TooLarge) => Err("too_large_for_mesh"),
            Err(_) => Err("replica_gone"),
        }
    }

    /// Accepts peer replicas and dials every peer address until `stop`.
    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let accept = tokio::spawn(self.clone().accept_loop());
        self.dial_peers(&stop).await;
        accept.abort();
        self.endpoint.close(close::SHUTDOWN, b"shutdown");
        lock(&self.routes).clear();
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let mesh = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match tokio::time::timeout(DIAL_TIMEOUT * 2, incoming).await {
                    Ok(Ok(conn)) => {
                        let _ = mesh.session(&conn).await;
                    }
                    Ok(Err(error)) => {
                        let collab = mesh.collab();
                        mesh.drop_reason(&collab, "peer_handshake");
                        if let Some(held_back) = mesh.throttle.admit(
                            "handshake",
                            &remote.ip().to_string(),
                            Instant::now(),
                        ) {
                            warn!(%remote, %error, held_back, "mesh handshake refused");
                        }
                    }
                    Err(_) => {}
                }
            });
        }
    }

    /// One mesh connection, dialed or accepted (both sides do the same): announce what is
    /// connected here, learn what is connected there, and deliver what the peer hands us to
    /// nodes connected here (never further). Returns when the connection ends.
    async fn session(self: &Arc<Self>, conn: &Connection) -> Ended {
        let publisher = tokio::spawn(self.clone().publish(conn.clone()));
        let receiver = tokio::spawn(self.clone().receive(conn.clone()));
        let ended = self.learn(conn).await;
        if conn.close_reason().is_none() {
            conn.close(close::PROTOCOL, b"presence stream ended");
        }
        publisher.abort();
        receiver.abort();
        if lock(&self.routes).remove(&conn.stable_id()).is_some() {
            self.gauges();
        }
        ended
    }

    /// Delivers what the peer hands us to nodes connected here (never further).
    async fn receive(self: Arc<Self>, conn: Connection) {
        let remote = conn.remote_address();
        let mut bucket = Bucket::new(self.options.rate, self.options.burst);
        let mut collab = String::new();
        while let Ok(datagram) = conn.read_datagram().await {
            if collab.is_empty() {
                // Known once a verified collaboration is.
                collab = self.collab();
            }
            if !bucket.take(datagram.len(), Instant::now()) {
                self.drop_reason(&collab, "mesh_rate");
                continue;
            }
            let (receiver, sender, payload) = match decode(&datagram, self.max_frame) {
                Ok(d) => d,
                Err(e) => {
                    self.drop_reason(&collab, e.as_str());
                    continue;
                }
            };
            let Some(local) = self.local.upgrade() else {
                break;
            };
            if receiver == sender {
                self.drop_reason(&collab, "to_self");
                continue;
            }
            if !local.admits(&sender) {
                self.drop_reason(&collab, "sender_refused");
                continue;
            }
            match local.deliver(&sender, &receiver, &payload) {
                Ok(()) => self.count(&collab, "from_replica", datagram.len()),
                Err(reason) => self.drop_reason(&collab, reason),
            }
        }
        debug!(%remote, reason = ?conn.close_reason(), "peer replica left");
    }

    /// Writes the presence stream: HELLO, the nodes connected here, then every change.
    async fn publish(self: Arc<Self>, conn: Connection) -> Result<()> {
        let mut events = self.presence.subscribe();
        let mut send = conn.open_uni().await?;
        let mut out = BytesMut::new();
        out.put_u8(HELLO);
        out.put_slice(&self.id);
        self.snapshot(&mut out);
        send.write_all(&out).await?;
        loop {
            out.clear();
            match events.recv().await {
                Ok(Presence::Here(node)) => put_presence(&mut out, HERE, &node),
                Ok(Presence::Gone(node)) => put_presence(&mut out, GONE, &node),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    out.put_u8(RESET);
                    self.snapshot(&mut out);
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
            // Whatever else is ready goes in the same write.
            while out.len() < 64 * 1024 {
                match events.try_recv() {
                    Ok(Presence::Here(node)) => put_presence(&mut out, HERE, &node),
                    Ok(Presence::Gone(node)) => put_presence(&mut out, GONE, &node),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => {
                        out.put_u8(RESET);
                        self.snapshot(&mut out);
                    }
                    Err(_) => break,
                }
            }
            send.write_all(&out).await?;
        }
    }

    fn snapshot(&self, out: &mut BytesMut) {
        if let Some(local) = self.local.upgrade() {
            for node in local.nodes() {
                put_presence(out, HERE, &node);
            }
        }
    }

    /// Resolves the peer names every few seconds (or when they change) and keeps one dialer
    /// per address, until `stop`.
    async fn dial_peers(self: &Arc<Self>, stop: &CancellationToken) {
        let mut names = self.peers.subscribe();
        let mut dialers: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        let own = self.endpoint.local_addr().ok();
        loop {
            let list = names.borrow_and_update().clone();
            let mut wanted = HashSet::new();
            for name in &list {
                match tokio::net::lookup_host(name.as_str()).await {
                    Ok(addrs) => wanted.extend(addrs),
                    Err(error) => {
                        if let Some(held_back) =
                            self.throttle.admit("resolve", name, Instant::now())
                        {
                            warn!(peer = %name, %error, held_back, "cannot resolve a peer replica");
                        }
                    }
                }
            }
            {
                let selves = lock(&self.selves);
                wanted.retain(|a| Some(*a) != own && !selves.contains(a));
            }
            dialers.retain(|addr, token| {
                let keep = wanted.contains(addr) && !token.is_cancelled();
                if !keep {
                    token.cancel();
                }
                keep
            });
            for addr in wanted {
                if dialers.len() >= self.options.max_peers {
                    break;
                }
                dialers.entry(addr).or_insert_with(|| {
                    let token = stop.child_token();
                    tokio::spawn(self.clone().dial_loop(addr, token.clone()));
                    token
                });
            }
            tokio::select! {
                () = stop.cancelled() => return,
                _ = names.changed() => {}
                () = tokio::time::sleep(RESOLVE_EVERY) => {}
            }
        }
    }

    /// Keeps a connection to the peer replica at `addr` and learns its nodes, until `stop`.
    async fn dial_loop(self: Arc<Self>, addr: SocketAddr, stop: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        loop {
            let ended = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.dial(addr, &stop) => ended,
            };
            match ended {
                Ended::ItsMe => {
                    lock(&self.selves).insert(addr);
                    stop.cancel();
                    return;
                }
                Ended::Lost(why) => {
                    if let Some(held_back) =
                        self.throttle
                            .admit("peer_lost", &addr.to_string(), Instant::now())
                    {
                        info!(peer = %addr, reason = %why, held_back, "no mesh connection to a peer replica");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn dial(self: &Arc<Self>, addr: SocketAddr, stop: &CancellationToken) -> Ended {
        let connecting =
            match self
                .endpoint
                .connect_with(self.client.clone(), addr, "rendezvous.fedmesh")
            {
                Ok(c) => c,
                Err(e) => return Ended::Lost(e.to_string()),
            };
        let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => return Ended::Lost("no answer".into()),
        };
        tokio::select! {
            () = stop.cancelled() => {
                conn.close(close::REMOVED, b"removed");
                if lock(&self.routes).remove(&conn.stable_id()).is_some() {
                    self.gauges();
                }
                Ended::Lost("removed".into())
            }
            ended = self.session(&conn) => ended,
        }
    }

    fn gauges(&self) {
        let mut by_peer: HashMap<[u8; 16], usize> = HashMap::new();
        for route in lock(&self.routes).values() {
            let nodes = by_peer.entry(route.peer).or_default();
            *nodes = (*nodes).max(route.nodes.len());
        }
        self.metrics.mesh.peers.set(by_peer.len() as i64);
        self.metrics
            .mesh
            .remote_nodes
            .set(by_peer.values().sum::<usize>() as i64);
    }

    /// Reads the peer's presence stream into its route until the connection ends.
    async fn learn(&self, conn: &Connection) -> Ended {
        let mut recv = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_uni()).await {
            Ok(Ok(recv)) => recv,
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => {
                conn.close(close::PROTOCOL, b"no presence");
                return Ended::Lost("no presence stream".into());
            }
        };
        let mut hello = [0u8; 17];
        if let Err(e) = recv.read_exact(&mut hello).await {
            return Ended::Lost(e.to_string());
        }
        if hello[0] != HELLO {
            conn.close(close::PROTOCOL, b"no hello");
            return Ended::Lost("no hello".into());
        }
        if hello[1..] == self.id {
            conn.close(close::SELF, b"self");
            return Ended::ItsMe;
        }
        let key = conn.stable_id();
        lock(&self.routes).insert(
            key,
            Route {
                conn: conn.clone(),
                peer: hello[1..].try_into().unwrap_or_default(),
                nodes: HashSet::new(),
            },
        );
        self.gauges();
        info!(peer = %conn.remote_address(), "meshed with a peer replica");
        let mut name = [0u8; frame::MAX_NODE_LEN];
        loop {
            let mut head = [0u8; 1];
            if let Err(e) = recv.read_exact(&mut head).await {
                return Ended::Lost(e.to_string());
            }
            if head[0] == RESET {
                if let Some(route) = lock(&self.routes).get_mut(&key) {
                    route.nodes.clear();
                }
                continue;
            }
            let mut len = [0u8; 1];
            if let Err(e) = recv.read_exact(&mut len).await {
                return Ended::Lost(e.to_string());
            }
            let len = usize::from(len[0]);
            let node = match (head[0], len) {
                (HERE | GONE, 1..=frame::MAX_NODE_LEN) => {
                    if let Err(e) = recv.read_exact(&mut name[..len]).await {
                        return Ended::Lost(e.to_string());
                    }
                    std::str::from_utf8(&name[..len])
                        .ok()
                        .and_then(|s| s.parse::<NodeRef>().ok())
                }
                _ => None,
            };
            let Some(node) = node else {
                conn.close(close::PROTOCOL, b"bad presence");
                return Ended::Lost("malformed presence stream".into());
            };
            {
                let mut routes = lock(&self.routes);
                let Some(route) = routes.get_mut(&key) else {
                    return Ended::Lost("route gone".into());
                };
                if head[0] == GONE {
                    route.nodes.remove(&node);
                } else if route.nodes.len() < self.options.max_nodes {
                    route.nodes.insert(node);
                } else {
                    drop(routes);
                    self.drop_reason(&self.collab(), "peer_nodes_full");
                }
            }
            self.gauges();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_frames_name_receiver_and_sender_within_bounds() {
        let (a, b): (NodeRef, NodeRef) = ("org-a/n1".parse().unwrap(), "org-b/n1".parse().unwrap());
        let frame = encode(&b, &a, b"quic bytes");
        let (receiver, sender, payload) = decode(&frame, 64).unwrap();
        assert_eq!(
            (receiver, sender, &payload[..]),
            (b.clone(), a.clone(), &b"quic bytes"[..])
        );
        // The node frame bound applies to what the receiver would get, plus one name.
        let big = encode(&b, &a, &[0u8; 100]);
        assert!(matches!(
            decode(&big, 50),
            Err(frame::FrameError::TooLarge { .. })
        ));
        assert_eq!(
            decode(&frame::encode(&b, b"\x00x"), 64),
            Err(frame::FrameError::BadNode),
            "the sender is checked too"
        );
    }
}
