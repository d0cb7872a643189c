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

/// Labels of per-link budget gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// The link id.
    pub link: String,
    /// `bytes_limit`, `bytes_spent`, `streams_limit` or `streams_active`.
    pub measure: &'static str,
}

/// Labels of per-peer gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer node, `org/node`.
    pub peer: String,
}

/// Labels of stream counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `outbound` (this node dialled) or `inbound`.
    pub direction: &'static str,
    /// What carried it: `quic` (a stream of the peer's QUIC connection) or `tls` (a TLS
    /// connection of its own).
    pub over: &'static str,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Links in force that concern this node.
    pub links_active: Gauge,
    /// Streams currently open.
    pub streams_active: Gauge,
    /// Streams opened, by direction and what carried them.
    pub streams_total: Family<StreamLabels, Counter>,
    /// Bytes carried, by link and direction.
    pub bytes: Family<LinkLabels, Counter>,
    /// Streams refused, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Peers refused at the TLS handshake, by reason (revoked, not a member, untrusted).
    pub peers_refused: Family<ReasonLabels, Counter>,
    /// Connection attempts refused before the handshake, by the cap that refused them.
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Open peer connections the relay closed, by reason.
    pub connections_closed: Family<ReasonLabels, Counter>,
    /// Open streams the relay reset, by reason (revoked link, spent budget).
    pub streams_reset: Family<ReasonLabels, Counter>,
    /// Links' budgets: limits and use.
    pub link_budgets: Family<BudgetLabels, Gauge>,
    /// Times another instance of this node was seen advertising it (a copied state directory).
    pub foreign_instances: Counter,
    /// 1 while this node's latest advertisement is another instance's.
    pub advertised_by_another_instance: Gauge,
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
        let streams_total = Family::<StreamLabels, Counter>::default();
        let bytes = Family::<LinkLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let peers_refused = Family::<ReasonLabels, Counter>::default();
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        let streams_reset = Family::<ReasonLabels, Counter>::default();
        let link_budgets = Family::<BudgetLabels, Gauge>::default();
        let foreign_instances = Counter::default();
        let advertised_by_another_instance = Gauge::default();
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
            "peers_refused",
            "Peers refused at the relay's TLS handshake, by reason",
            peers_refused.clone(),
        );
        registry.register(
            "relay_connections_refused",
            "Relay connection attempts refused before the handshake, by cap",
            connections_refused.clone(),
        );
        registry.register(
            "relay_connections_closed",
            "Open relay connections closed by the relay, by reason",
            connections_closed.clone(),
        );
        registry.register(
            "streams_reset",
            "Open relay streams reset by the relay, by reason",
            streams_reset.clone(),
        );
        registry.register(
            "link_budget",
            "Link budgets: bytes_limit, bytes_spent, streams_limit, streams_active",
            link_budgets.clone(),
        );
        registry.register(
            "node_foreign_instances",
            "Other agents seen advertising this node (a copy of its state directory)",
            foreign_instances.clone(),
        );
        registry.register(
            "node_advertised_by_another_instance",
            "1 while this node's latest advertisement comes from another agent",
            advertised_by_another_instance.clone(),
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
            peers_refused,
            connections_refused,
            connections_closed,
            streams_reset,
            link_budgets,
            foreign_instances,
            advertised_by_another_instance,
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

    /// Counts a peer refused at the handshake.
    pub fn refuse_peer(&self, reason: &'static str) {
        self.peers_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a connection attempt refused by a cap.
    pub fn refuse_connection(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an open connection the relay closed.
    pub fn close_connection(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an open stream the relay reset.
    pub fn reset_stream(&self, reason: &'static str) {
        self.streams_reset
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// One measure of `link`'s budget.
    pub fn link_budget(&self, link: &str, measure: &'static str) -> Gauge {
        self.link_budgets
            .get_or_create(&BudgetLabels {
                link: link.to_owned(),
                measure,
            })
            .clone()
    }

    /// Drops an expired link's budget gauges.
    pub fn forget_link_budget(&self, link: &str) {
        for measure in [
            "bytes_limit",
            "bytes_spent",
            "streams_limit",
            "streams_active",
        ] {
            self.link_budgets.remove(&BudgetLabels {
                link: link.to_owned(),
                measure,
            });
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
