//! The agent's Prometheus metrics (prometheus-client), rendered as text at `/metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Labels of per-link byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// The link id.
    pub link: String,
    /// `sent` (TCP into the relay) or `received` (relay into TCP).
    pub direction: &'static str,
}

/// Labels of refused-stream counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The refusal reason (see `relay::proto::Refusal`), or a dial failure.
    pub reason: &'static str,
}

/// Labels of per-peer gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer node, `org/node`.
    pub peer: String,
}

/// Labels of stream counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` (this node dialled) or `inbound`.
    pub direction: &'static str,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Links in force that concern this node.
    pub links_active: Gauge,
    /// Streams currently open.
    pub streams_active: Gauge,
    /// Streams opened, by direction.
    pub streams_total: Family<DirectionLabels, Counter>,
    /// Bytes carried, by link and direction.
    pub bytes: Family<LinkLabels, Counter>,
    /// Streams refused, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// QUIC connections to peers currently open.
    pub peer_connections: Gauge,
    /// Seconds until the node certificate expires.
    pub cert_expiry_seconds: Gauge,
    /// Smoothed round-trip time to each peer, in microseconds.
    pub peer_rtt_us: Family<PeerLabels, Gauge>,
    /// Current path MTU (UDP payload bytes) to each peer.
    pub peer_path_mtu: Family<PeerLabels, Gauge>,
    /// Answers from the hub that an honest hub does not give, by kind (see
    /// `node::follow::Anomaly`).
    pub hub_anomalies: Family<ReasonLabels, Counter>,
    /// Peers whose advertised relay host name does not resolve.
    pub peers_unresolved: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let (links_active, streams_active, peer_connections, cert_expiry_seconds) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        let streams_total = Family::<DirectionLabels, Counter>::default();
        let bytes = Family::<LinkLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let peer_rtt_us = Family::<PeerLabels, Gauge>::default();
        let peer_path_mtu = Family::<PeerLabels, Gauge>::default();
        let hub_anomalies = Family::<ReasonLabels, Counter>::default();
        let peers_unresolved = Gauge::default();
        let mut registry = Registry::with_prefix("fedmesh");
        registry.register(
            "links_active",
            "Links in force that concern this node",
            links_active.clone(),
        );
        registry.register(
            "streams_active",
            "Relay streams currently open",
            streams_active.clone(),
        );
        registry.register("streams", "Relay streams opened", streams_total.clone());
        registry.register(
            "link_bytes",
            "Bytes carried per link and direction",
            bytes.clone(),
        );
        registry.register(
            "streams_refused",
            "Relay streams refused, by reason",
            refused.clone(),
        );
        registry.register(
            "peer_connections",
            "QUIC connections to peers",
            peer_connections.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the node certificate expires",
            cert_expiry_seconds.clone(),
        );
        registry.register(
            "peer_rtt_microseconds",
            "Smoothed round-trip time to each peer",
            peer_rtt_us.clone(),
        );
        registry.register(
            "peer_path_mtu_bytes",
            "Current path MTU to each peer",
            peer_path_mtu.clone(),
        );
        registry.register(
            "hub_anomalies",
            "Answers from the hub an honest hub does not give (the agent backs off), by kind",
            hub_anomalies.clone(),
        );
        registry.register(
            "peers_unresolved",
            "Peers whose advertised relay host name does not resolve",
            peers_unresolved.clone(),
        );
        Self {
            registry,
            hub_anomalies,
            peers_unresolved,
            peer_rtt_us,
            peer_path_mtu,
            links_active,
            streams_active,
            streams_total,
            bytes,
            refused,
            peer_connections,
            cert_expiry_seconds,
        }
    }
}

impl Metrics {
    /// The byte counter of `link` in `direction`.
    pub fn link_bytes(&self, link: &str, direction: &'static str) -> Counter {
        self.bytes
            .get_or_create(&LinkLabels {
                link: link.to_owned(),
                direction,
            })
            .clone()
    }

    /// Counts a refused stream.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a misbehaving answer from the hub.
    pub fn hub_anomaly(&self, reason: &'static str) {
        self.hub_anomalies
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
