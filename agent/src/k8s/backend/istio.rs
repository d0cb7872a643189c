//! The Istio backend: mesh-config's objects carry the links (ServiceEntry, DestinationRule,
//! Gateway, VirtualService, AuthorizationPolicy, PeerAuthentication, Sidecar, NetworkPolicy),
//! plus this node's credentials Secret for the fedmesh gateways, in the agent's namespace only.
//! Peers are reached at a stable VIP per peer. Links with a node that takes no inbound
//! connections at a gateway are carried by the agent's relay (see its render); the relay
//! admits nothing else.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use fedmesh_documents::NodeRef;
use fedmesh_mesh_config::{GatewayAddr, NodeView, Peer, RenderOptions};

use super::super::{
    Error, Result, Settings,
    desired::{Desired, Inputs, Memory},
    resources::{Kind, Place, kind},
};

/// The API groups (at version v1) whose presence means Istio.
pub const API_GROUPS: [&str; 2] = ["networking.istio.io", "security.istio.io"];

/// What the Istio backend writes, in the order it is listed.
pub const KINDS: &[Kind] = &[
    kind("v1", "Secret", "secrets", Place::Agent),
    kind(
        "networking.istio.io/v1",
        "ServiceEntry",
        "serviceentries",
        Place::Agent,
    ),
    kind(
        "networking.istio.io/v1",
        "DestinationRule",
        "destinationrules",
        Place::Agent,
    ),
    kind(
        "networking.istio.io/v1",
        "Gateway",
        "gateways",
        Place::Agent,
    ),
    kind(
        "networking.istio.io/v1",
        "VirtualService",
        "virtualservices",
        Place::Agent,
    ),
    kind(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        Place::Agent,
    ),
    kind(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        Place::Algorithm,
    ),
    kind(
        "security.istio.io/v1",
        "PeerAuthentication",
        "peerauthentications",
        Place::Algorithm,
    ),
    kind(
        "networking.istio.io/v1",
        "Sidecar",
        "sidecars",
        Place::Algorithm,
    ),
    kind(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        Place::Algorithm,
    ),
];

/// Whether the cluster serves Istio: every group of [`API_GROUPS`] at `v1`.
pub(super) fn served(groups: &[(String, Vec<String>)]) -> bool {
    API_GROUPS.iter().all(|name| {
        groups
            .iter()
            .any(|(group, versions)| group == name && versions.iter().any(|v| v == "v1"))
    })
}

/// The render options must be valid and put the gateways and credentials in the agent's
/// namespace.
pub(super) fn check(render: &RenderOptions, namespace: &str) -> Result<()> {
    render.validate()?;
    if render.mesh_namespace != namespace {
        return Err(Error::Options(format!(
            "the render options put the gateways and credentials in {:?}, but the agent \
             runs in {namespace:?}; set mesh_namespace: {namespace}",
            render.mesh_namespace
        )));
    }
    Ok(())
}

/// mesh-config's render of the links in force, with peers' gateways from their signed
/// advertisements and this node's credentials.
///
/// A pair of nodes links through the gateways only when both advertise one; a link with a
/// node that accepts no inbound connections at a gateway (it advertises only the rendezvous, or
/// only a relay address), or from this node when it advertises none, is carried by the fedmesh
/// agents instead: the peer's ServiceEntry leads to this agent's pod ports, and the agent's
/// relay carries the traffic (through the rendezvous, or directly to the peer's relay).
pub(super) fn render(
    settings: &Settings,
    inputs: &Inputs<'_>,
    memory: &Memory,
    desired: &mut Desired,
) -> Result<()> {
    let ledger = inputs.ledger;
    let members: BTreeSet<NodeRef> = ledger
        .collaboration()
        .into_iter()
        .flat_map(|c| &c.members)
        .map(fedmesh_documents::Member::node_ref)
        .collect();
    // Until this node's own advertisement is verified, it is taken to accept at its gateway.
    let local_accepts = ledger
        .advertisement(inputs.node)
        .is_none_or(|a| a.istio_gateway().is_some());
    let mut peers = BTreeMap::new();
    let mut carried_peers = BTreeSet::new();
    for m in members.iter().filter(|m| *m != inputs.node) {
        let Some(ad) = ledger.advertisement(m) else {
            continue;
        };
        match ad.istio_gateway() {
            Some(gateway) if local_accepts => {
                if let Ok(gateway) = gateway.parse::<GatewayAddr>() {
                    peers.insert(m.clone(), Peer { gateway });
                }
            }
            _ => {
                carried_peers.insert(m.clone());
            }
        }
    }
    let mut dialled = Vec::new();
    let mut carried: BTreeMap<NodeRef, BTreeMap<u16, u16>> = BTreeMap::new();
    for link in &desired.links {
        let (other, outbound) = match link.terms.from == *inputs.node {
            true => (&link.terms.to, true),
            false => (&link.terms.from, false),
        };
        if !carried_peers.contains(other) {
            continue;
        }
        carried.entry(other.clone()).or_default();
        if outbound {
            dialled.extend(link.terms.ports.iter().map(|p| (other.clone(), p.port)));
        }
    }
    let pod_ports = super::relay::allocate(settings.pod_ports, &memory.pod_ports, dialled)?;
    for (peer, ports) in &pod_ports {
        for (port, pod_port) in ports {
            desired.listeners.insert(
                SocketAddr::from(([0, 0, 0, 0], *pod_port)),
                (peer.clone(), *port),
            );
        }
    }
    carried.extend(pod_ports.clone());
    let view = NodeView {
        collab: desired.collab.clone(),
        local: inputs.node.clone(),
        members,
        peers,
        links: desired.links.clone(),
        services: BTreeMap::new(),
        vips: memory.vips.clone(),
        credentials: inputs.credentials.cloned(),
        carried,
    };
    let mut options = settings.render.clone();
    if !settings.pod_labels.is_empty() {
        // The labels the agent pod really has.
        options.agent_labels = settings.pod_labels.clone();
    }
    let rendered = fedmesh_mesh_config::render(&view, &options, inputs.now)?;
    for object in &rendered.objects {
        settings.scope_of(object)?;
    }
    desired.carried = view.carried.into_keys().collect();
    desired.objects = rendered.objects;
    desired.memory.vips = rendered.vips;
    desired.memory.pod_ports = pod_ports;
    Ok(())
}

/// Each peer's VIP.
pub(super) fn addresses(desired: &Desired) -> BTreeMap<NodeRef, IpAddr> {
    desired
        .memory
        .vips
        .iter()
        .map(|(peer, ip)| (peer.clone(), IpAddr::V4(*ip)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fedmesh_documents::{Advertisement, Document, Endpoint, Ledger, fixtures::Fixture, jws};

    use super::*;
    use crate::k8s::{
        Mode, desired,
        fixtures::{credentials, settings},
    };

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    /// a/n1 (this node) dials b/n1 and d/n1; d/n1 dials a/n1. Each node advertises `endpoints`.
    fn ledger(endpoints: &[(&str, Vec<Endpoint>)]) -> (Fixture, Ledger) {
        let fx = Fixture::new("c", &["a/n1", "b/n1", "d/n1"]);
        let mut ledger = Ledger::new(&fx.pin());
        ledger.ingest_jws(&fx.collab_jws(), fx.now).unwrap();
        let mut ingest = |jws: String| {
            let env = fx.envelope(jws);
            ledger.ingest(&env, fx.now).unwrap();
        };
        for (node, endpoints) in endpoints {
            let doc = Document::Advertisement(Advertisement {
                collab: "c".into(),
                node: n(node),
                endpoints: endpoints.clone(),
                instance: None,
                exposes: Vec::new(),
                issued_at: jws::unix(fx.now),
            });
            ingest(fx.node_sign(node, &doc));
        }
        let hour = Duration::from_secs(3600);
        for (from, to, port) in [
            ("a/n1", "b/n1", "11366:mpc"),
            ("a/n1", "d/n1", "11367:mpc"),
            ("d/n1", "a/n1", "9092"),
        ] {
            ingest(fx.approval(&fx.terms(from, to, &[port], hour)));
        }
        (fx, ledger)
    }

    fn gateway(address: &str) -> Vec<Endpoint> {
        vec![
            Endpoint::IstioGateway {
                address: address.into(),
            },
            Endpoint::Rendezvous,
        ]
    }

    fn compute(fx: &Fixture, ledger: &Ledger) -> Desired {
        desired::compute(
            &settings(Mode::Istio),
            &Inputs {
                ledger,
                node: &n("a/n1"),
                vetoed: &BTreeSet::new(),
                credentials: Some(&credentials()),
                now: fx.now,
            },
            &Memory::default(),
        )
        .unwrap()
        .unwrap()
    }

    fn service_entry<'a>(d: &'a Desired, peer: &str) -> &'a serde_json::Value {
        d.objects
            .iter()
            .find(|o| {
                o["kind"] == "ServiceEntry" && o["metadata"]["labels"]["fedmesh.io/peer"] == peer
            })
            .unwrap_or_else(|| panic!("no ServiceEntry for {peer}"))
    }

    #[test]
    fn an_outbound_only_peer_is_carried_by_the_agent_and_a_gateway_peer_is_not() {
        let (fx, ledger) = ledger(&[
            ("a/n1", gateway("gw.a.example:443")),
            ("b/n1", gateway("gw.b.example:443")),
            ("d/n1", vec![Endpoint::Rendezvous]),
        ]);
        let d = compute(&fx, &ledger);
        assert_eq!(d.carried, BTreeSet::from([n("d/n1")]));
        let pod = d.memory.pod_ports[&n("d/n1")][&11367];
        assert_eq!(
            d.listeners,
            BTreeMap::from([(SocketAddr::from(([0, 0, 0, 0], pod)), (n("d/n1"), 11367))]),
            "the agent listens for d/n1 alone"
        );
        let se = service_entry(&d, "d.n1");
        assert_eq!(se["spec"]["location"], "MESH_INTERNAL");
        assert_eq!(se["spec"]["ports"][0]["targetPort"], pod);
        assert_eq!(
            se["spec"]["workloadSelector"]["labels"],
            serde_json::json!({"app.kubernetes.io/name": "fedmesh-agent"}),
            "the agent pod's own labels"
        );
        let b = service_entry(&d, "b.n1");
        assert_eq!(b["spec"]["endpoints"][0]["address"], "gw.b.example");
        assert!(d.memory.vips.contains_key(&n("d/n1")));
        assert!(addresses(&d).contains_key(&n("d/n1")));
    }

    #[test]
    fn when_this_node_takes_no_inbound_connections_the_agent_carries_every_peer() {
        let (fx, ledger) = ledger(&[
            ("a/n1", vec![Endpoint::Rendezvous]),
            ("b/n1", gateway("gw.b.example:443")),
            ("d/n1", vec![Endpoint::Rendezvous]),
        ]);
        let d = compute(&fx, &ledger);
        assert_eq!(d.carried, BTreeSet::from([n("b/n1"), n("d/n1")]));
        assert_eq!(d.listeners.len(), 2);
        assert!(
            !d.objects.iter().any(|o| o["kind"] == "Gateway"),
            "no gateway object for any peer"
        );
    }

    #[test]
    fn with_only_gateway_peers_the_agent_carries_nothing() {
        let (fx, ledger) = ledger(&[
            ("a/n1", gateway("gw.a.example:443")),
            ("b/n1", gateway("gw.b.example:443")),
            ("d/n1", gateway("192.0.2.4:443")),
        ]);
        let d = compute(&fx, &ledger);
        assert!(d.carried.is_empty() && d.listeners.is_empty());
        assert!(d.memory.pod_ports.is_empty());
    }
}
