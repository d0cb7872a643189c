//! The rendezvous's side of sealed datagrams ([`super::sealed`]): the sessions of nodes whose
//! carrier is QUIC, and the socket under the rendezvous's QUIC endpoint that takes sealed
//! datagrams off before quinn sees them and forwards them on the spot.
//!
//! ```text
//!  UDP socket ──▶ Demux::poll_recv ──▶ QUIC packets ──▶ quinn (carrier connections)
//!                      └─▶ sealed: open the header (sender's session) ──▶ rate ──▶ receiver
//!                            receiver has a live sealed path ──▶ reseal, batched GSO send
//!                            otherwise ──▶ its carrier connection, or the replica it is on
//! ```
//!
//! A session exists only while its node's carrier connection is admitted: the rendezvous
//! removes it when the connection ends, is replaced, or the node's standing changes, so a
//! revoked node's sealed datagrams are refused with the same promptness as its connection.
//! The sender's token bucket is the one its carrier connection uses: both paths share one rate.
//! A node's address for sealed datagrams is where its last authenticated one came from (it
//! probes every second); a path silent for [`LIVE`] is not used.

use std::{
    collections::HashMap,
    fmt,
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, Weak},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use fedmesh_documents::NodeRef;
use prometheus_client::metrics::counter::Counter;
use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{RecvMeta, Transmit},
};
use tracing::debug;

use super::{
    Bucket, DropLabels, FlowLabels, RendezvousMetrics, lock,
    sealed::{self, HEADER, Kind, Opener, Sealer, SessionKeys},
};

/// How long a node's sealed path stays in use after its last authenticated datagram.
pub(super) const LIVE: Duration = Duration::from_secs(3);
/// Most times one `poll_recv` reads the socket when every datagram was sealed (then it yields).
const ROUNDS: usize = 16;
/// The largest UDP payload one send may carry (a GSO batch included; IPv4 allows 65,507).
const MAX_SEND: usize = 65_000;

/// Where sealed datagrams that cannot take the sealed path go: the receiver's carrier
/// connection, or the replica it is connected to.
pub(super) trait Fallback: Send + Sync {
    fn forward_slow(
        &self,
        sender: &NodeRef,
        receiver: &NodeRef,
        payload: &[u8],
    ) -> Result<(), &'static str>;
}

struct Session {
    node: NodeRef,
    peer: u64,
    open: Opener,
    seal: Sealer,
    /// Where the node's last authenticated datagram came from, to which local address, when.
    at: Option<(SocketAddr, Option<IpAddr>, Instant)>,
    bucket: Arc<Mutex<Bucket>>,
}

impl Session {
    fn live(&self, now: Instant) -> Option<(SocketAddr, Option<IpAddr>)> {
        self.at
            .filter(|(_, _, seen)| now.saturating_duration_since(*seen) < LIVE)
            .map(|(to, src, _)| (to, src))
    }
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Session>,
    by_peer: HashMap<u64, u64>,
    by_node: HashMap<NodeRef, u64>,
}

impl State {
    fn remove(&mut self, session: u64) {
        if let Some(s) = self.sessions.remove(&session) {
            self.by_node.remove(&s.node);
            if self.by_peer.get(&s.peer) == Some(&session) {
                self.by_peer.remove(&s.peer);
            }
        }
    }
}

/// Forwarding counters of one collaboration, resolved once (for sealed datagrams and for each
/// carrier connection's forwarder).
pub(super) struct Counters {
    collab: String,
    pub(super) in_datagrams: Counter,
    pub(super) in_bytes: Counter,
    pub(super) out_datagrams: Counter,
    pub(super) out_bytes: Counter,
    sealed_in: Counter,
    sealed_out: Counter,
}

impl Counters {
    pub(super) fn new(metrics: &RendezvousMetrics, collab: &str) -> Self {
        let flow = |direction| FlowLabels {
            collab: collab.to_owned(),
            direction,
        };
        // One statement each: a family's guard lives to the end of its statement.
        let in_datagrams = metrics.datagrams.get_or_create(&flow("in")).clone();
        let in_bytes = metrics.bytes.get_or_create(&flow("in")).clone();
        let out_datagrams = metrics.datagrams.get_or_create(&flow("out")).clone();
        let out_bytes = metrics.bytes.get_or_create(&flow("out")).clone();
        let sealed_in = metrics.sealed.get_or_create(&flow("in")).clone();
        let sealed_out = metrics.sealed.get_or_create(&flow("out")).clone();
        Self {
            collab: collab.to_owned(),
            in_datagrams,
            in_bytes,
            out_datagrams,
            out_bytes,
            sealed_in,
            sealed_out,
        }
    }

    fn sent(&self, bytes: usize) {
        self.out_datagrams.inc();
        self.out_bytes.inc_by(bytes as u64);
        self.sealed_out.inc();
    }
}

/// The sessions of sealed datagrams and the socket they are sent on.
pub(super) struct Plane {
    state: Mutex<State>,
    socket: Arc<dyn AsyncUdpSocket>,
    metrics: Arc<RendezvousMetrics>,
    counters: Mutex<Arc<Counters>>,
    fallback: OnceLock<Weak<dyn Fallback>>,
}

impl Plane {
    pub(super) fn new(socket: Arc<dyn AsyncUdpSocket>, metrics: Arc<RendezvousMetrics>) -> Self {
        let counters = Arc::new(Counters::new(&metrics, ""));
        Self {
            state: Mutex::default(),
            socket,
            metrics,
            counters: Mutex::new(counters),
            fallback: OnceLock::new(),
        }
    }

    pub(super) fn set_fallback(&self, fallback: Weak<dyn Fallback>) {
        let _ = self.fallback.set(fallback);
    }

    /// The collaboration the counters are labelled with.
    pub(super) fn set_collab(&self, collab: &str) {
        let mut counters = lock(&self.counters);
        if counters.collab != collab {
            *counters = Arc::new(Counters::new(&self.metrics, collab));
        }
    }

    /// Opens a session for `node`'s admitted carrier connection (replacing its previous one).
    pub(super) fn insert(&self, node: &NodeRef, keys: &SessionKeys, bucket: Arc<Mutex<Bucket>>) {
        let mut state = lock(&self.state);
        if let Some(old) = state.by_node.get(node).copied() {
            state.remove(old);
        }
        let peer = sealed::peer_id(node);
        if state.by_peer.contains_key(&peer) || state.sessions.contains_key(&keys.session) {
            // Two names with one 64-bit id (or a repeated session id): this node keeps its
            // carrier connection only.
            debug!(node = %node, "no sealed path: its id is taken");
            return;
        }
        let (open, seal) = keys.rendezvous();
        state.by_peer.insert(peer, keys.session);
        state.by_node.insert(node.clone(), keys.session);
        state.sessions.insert(
            keys.session,
            Session {
                node: node.clone(),
                peer,
                open,
                seal,
                at: None,
                bucket,
            },
        );
    }

    /// Ends `node`'s session `session` (only that one: a newer may have replaced it).
    pub(super) fn remove(&self, node: &NodeRef, session: u64) {
        let mut state = lock(&self.state);
        if state.by_node.get(node) == Some(&session) {
            state.remove(session);
        }
    }

    /// Ends `node`'s session, whichever it is.
    pub(super) fn remove_node(&self, node: &NodeRef) {
        let mut state = lock(&self.state);
        if let Some(session) = state.by_node.get(node).copied() {
            state.remove(session);
        }
    }

    /// Ends every session.
    pub(super) fn clear(&self) {
        *lock(&self.state) = State::default();
    }

    /// Sends `payload` from `sender` to `receiver` as a sealed datagram if `receiver` has a live
    /// sealed path; false if not (the caller uses its carrier connection).
    pub(super) fn send_sealed(&self, sender: &NodeRef, receiver: &NodeRef, payload: &[u8]) -> bool {
        let now = Instant::now();
        let mut packet = Vec::with_capacity(HEADER + payload.len());
        let to = {
            let mut state = lock(&self.state);
            let Some(session) = state.by_node.get(receiver).copied() else {
                return false;
            };
            let Some(s) = state.sessions.get_mut(&session) else {
                return false;
            };
            let Some(to) = s.live(now) else {
                return false;
            };
            s.seal
                .seal_into(Kind::Data, sealed::peer_id(sender), payload, &mut packet);
            to
        };
        let counters = lock(&self.counters).clone();
        if send(&*self.socket, to, &packet, None) {
            counters.sent(packet.len());
        } else {
            self.dropped(&counters.collab, "send_buffer_full");
        }
        true
    }

    fn dropped(&self, collab: &str, reason: &'static str) {
        self.metrics
            .dropped
            .get_or_create(&DropLabels {
                collab: collab.to_owned(),
                reason,
            })
            .inc();
    }

    /// Handles the sealed datagrams of one socket read (`segments` of `stride` bytes from
    /// `from`, received on `dst`).
    fn receive(
        &self,
        run: &mut Run,
        from: SocketAddr,
        dst: Option<IpAddr>,
        data: &[u8],
        stride: usize,
    ) {
        let mut state = lock(&self.state);
        for packet in data.chunks(stride.max(1)) {
            run.counters.in_datagrams.inc();
            run.counters.in_bytes.inc_by(packet.len() as u64);
            run.counters.sealed_in.inc();
            if let Err(reason) = self.forward(&mut state, run, from, dst, packet) {
                run.drops.push(reason);
            }
        }
    }

    fn forward(
        &self,
        state: &mut State,
        run: &mut Run,
        from: SocketAddr,
        dst: Option<IpAddr>,
        packet: &[u8],
    ) -> Result<(), &'static str> {
        let session = sealed::session_of(packet).ok_or("sealed_short")?;
        let sender = state.sessions.get_mut(&session).ok_or("unknown_session")?;
        let (kind, receiver) = sender.open.open(packet).map_err(|e| e.as_str())?;
        sender.at = Some((from, dst, run.now));
        match kind {
            Kind::Ping => {
                let mut header = [0; HEADER];
                sender.seal.seal(Kind::Pong, 0, &mut header);
                run.push(&*self.socket, (from, dst), &header, &[]);
                return Ok(());
            }
            Kind::Pong => return Err("sealed_kind"),
            Kind::Data => {}
        }
        let payload = &packet[HEADER..];
        if payload.is_empty() {
            return Err("empty");
        }
        if !lock(&sender.bucket).take(packet.len(), run.now) {
            return Err("rate");
        }
        let from_peer = sender.peer;
        if receiver == from_peer {
            return Err("to_self");
        }
        let to_session = state.by_peer.get(&receiver).copied();
        if let Some(to) = to_session.and_then(|s| state.sessions.get_mut(&s))
            && let Some(at) = to.live(run.now)
        {
            let mut header = [0; HEADER];
            to.seal.seal(Kind::Data, from_peer, &mut header);
            run.push(&*self.socket, at, &header, payload);
            return Ok(());
        }
        // The receiver is connected but its sealed path is not (yet) live: its carrier
        // connection. Not here with a session: a node on the TLS/TCP carrier, or on another
        // replica; only the peers' ids travel, so its name is looked up among the members this
        // replica admits.
        let receiver = match to_session.and_then(|s| state.sessions.get(&s)) {
            Some(to) => to.node.clone(),
            None => run.names.get(&receiver).cloned().ok_or("unknown_peer")?,
        };
        let sender = state.sessions.get(&session).map(|s| s.node.clone());
        run.slow
            .push((sender.ok_or("unknown_session")?, receiver, payload.to_vec()));
        Ok(())
    }

    /// Sends what a run collected, then hands the rest to the fallback.
    fn finish(&self, mut run: Run) {
        run.flush(&*self.socket);
        for reason in run.drops.drain(..) {
            self.dropped(&run.counters.collab, reason);
        }
        let fallback = self.fallback.get().and_then(Weak::upgrade);
        for (sender, receiver, payload) in run.slow.drain(..) {
            let result = match &fallback {
                Some(f) => f.forward_slow(&sender, &receiver, &payload),
                None => Err("unknown_peer"),
            };
            if let Err(reason) = result {
                self.dropped(&run.counters.collab, reason);
            }
        }
    }
}

/// Sends one datagram (or a GSO batch of `segment`-byte datagrams); false when the socket's
/// buffer is full or the send failed (the datagram is dropped, as UDP would).
fn send(
    socket: &dyn AsyncUdpSocket,
    (to, src): (SocketAddr, Option<IpAddr>),
    contents: &[u8],
    segment: Option<usize>,
) -> bool {
    socket
        .try_send(&Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: src,
        })
        .is_ok()
}

/// What one socket read produced: datagrams to send (batched per receiver for GSO), drops,
/// and datagrams for the fallback.
struct Run {
    now: Instant,
    counters: Arc<Counters>,
    names: Arc<HashMap<u64, NodeRef>>,
    batch: Vec<u8>,
    to: Option<(SocketAddr, Option<IpAddr>)>,
    segment: usize,
    count: usize,
    short: bool,
    max_segments: usize,
    drops: Vec<&'static str>,
    slow: Vec<(NodeRef, NodeRef, Vec<u8>)>,
}

impl Run {
    /// Appends one datagram (header and payload) for `to`, sending the batch first when it
    /// cannot take it (another receiver, another size, full).
    fn push(
        &mut self,
        socket: &dyn AsyncUdpSocket,
        to: (SocketAddr, Option<IpAddr>),
        header: &[u8; HEADER],
        payload: &[u8],
    ) {
        let len = HEADER + payload.len();
        if self.count > 0
            && (self.to != Some(to)
                || self.short
                || len > self.segment
                || self.count >= self.max_segments
                || self.batch.len() + len > MAX_SEND)
        {
            self.flush(socket);
        }
        if self.count == 0 {
            self.to = Some(to);
            self.segment = len;
        }
        self.short = len < self.segment;
        self.batch.extend_from_slice(header);
        self.batch.extend_from_slice(payload);
        self.count += 1;
    }

    fn flush(&mut self, socket: &dyn AsyncUdpSocket) {
        if let Some(to) = self.to.take()
            && self.count > 0
        {
            let segment = (self.count > 1).then_some(self.segment);
            if send(socket, to, &self.batch, segment) {
                self.counters.out_datagrams.inc_by(self.count as u64);
                self.counters.sealed_out.inc_by(self.count as u64);
                self.counters.out_bytes.inc_by(self.batch.len() as u64);
            } else {
                self.drops.push("send_buffer_full");
            }
        }
        self.batch.clear();
        self.count = 0;
        self.short = false;
    }
}

/// The rendezvous endpoint's socket: sealed datagrams go to the [`Plane`], QUIC to quinn.
pub(super) struct Demux {
    inner: Arc<dyn AsyncUdpSocket>,
    plane: Arc<Plane>,
    /// Peer ids of the members this replica admits, for receivers without a session here.
    names: Mutex<Arc<HashMap<u64, NodeRef>>>,
}

impl fmt::Debug for Demux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Demux")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Demux {
    pub(super) fn new(inner: Arc<dyn AsyncUdpSocket>, plane: Arc<Plane>) -> Self {
        Self {
            inner,
            plane,
            names: Mutex::default(),
        }
    }

    /// The members (by peer id) this replica forwards between.
    pub(super) fn set_members(&self, members: impl IntoIterator<Item = NodeRef>) {
        let names = members
            .into_iter()
            .map(|node| (sealed::peer_id(&node), node))
            .collect();
        *lock(&self.names) = Arc::new(names);
    }

    fn run(&self) -> Run {
        let max_segments = self.inner.max_transmit_segments().clamp(1, 64);
        Run {
            now: Instant::now(),
            counters: lock(&self.plane.counters).clone(),
            names: lock(&self.names).clone(),
            batch: Vec::new(),
            to: None,
            segment: 0,
            count: 0,
            short: false,
            max_segments,
            drops: Vec::new(),
            slow: Vec::new(),
        }
    }
}

impl AsyncUdpSocket for Demux {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..ROUNDS {
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let mut run: Option<Run> = None;
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                if sealed::is_sealed(&bufs[i][..m.len.min(1)]) {
                    let run = run.get_or_insert_with(|| self.run());
                    self.plane
                        .receive(run, m.addr, m.dst_ip, &bufs[i][..m.len], m.stride);
                    continue;
                }
                if kept != i {
                    let (to, from) = bufs.split_at_mut(i);
                    to[kept][..m.len].copy_from_slice(&from[0][..m.len]);
                    meta[kept] = m;
                }
                kept += 1;
            }
            if let Some(run) = run {
                self.plane.finish(run);
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
        // Every read was sealed datagrams: let quinn's driver yield, then read again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
