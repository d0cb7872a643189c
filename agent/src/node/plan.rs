//! What the node agent does, decided in one pure function: the verified ledger, what the
//! cluster side placed (Kubernetes), the loopback pool, the addresses remembered from earlier,
//! the peers' resolved relay addresses and `now` go in; the relay's configuration, the DNS
//! names, the peer map, the snapshot and what to remember come out.
//!
//! ```text
//!  ledger ──links_in_force(node, vetoes, now)──► links ──► Policy (who may dial whom, on what port)
//!  placement (Kubernetes) or pool + remembered ──► one address per peer this node dials
//!  collaboration members ──PeerNames──► <node>.<org>.<collab>.fedmesh [, <org>.<collab>.fedmesh]
//!  advertisements + resolutions ──► peers' relay addresses (or why a peer cannot be dialled)
//!                                         │
//!                                         ▼
//!        NodePlan { relay, names, snapshot (links, peers, rejections), remember, next_change }
//! ```
//!
//! The async shell ([`super`]) only writes `addresses.json` and `peers.json`, hands the relay
//! its configuration and publishes the snapshot; it runs this again when an input changes and
//! at `next_change` (the next link expiry), not on a timer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::SystemTime,
};

use fedmesh_certs::{TrustDomain, id::PeerNames};
use fedmesh_documents::{Endpoint, Ledger, NodeRef, PortSpec, Rejection};
use fedmesh_mesh_config::addresses::{self, Pool};

use super::{Expose, PeerView, Snapshot};
use crate::{
    dns::NameMap,
    k8s::Placement,
    relay::{self, Policy, RelayConfig},
};

/// A peer's advertised relay address (`host:port`) and what it resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The advertised `host:port` this answers for.
    pub advertised: String,
    /// The address, or why the name did not resolve.
    pub addr: Result<SocketAddr, String>,
}

/// What one plan starts from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Everything verified so far.
    pub ledger: &'a Ledger,
    /// This node.
    pub node: &'a NodeRef,
    /// In Kubernetes, what the controller placed (`None` on a machine).
    pub placement: Option<&'a Placement>,
    /// On a machine, where peers' loopback addresses come from.
    pub pool: &'a Pool,
    /// On a machine, the addresses peers had before (`addresses.json`).
    pub remembered: &'a BTreeMap<NodeRef, Ipv4Addr>,
    /// Peers' advertised relay host names and what they resolved to.
    pub resolved: &'a BTreeMap<NodeRef, Resolution>,
    /// The ports this node exposes, and their local targets.
    pub exposes: &'a [Expose],
    /// The time the plan is for.
    pub now: SystemTime,
}

/// What the node agent should do now.
#[derive(Clone, Debug, PartialEq)]
pub struct NodePlan {
    /// The relay's listeners, admission, peers and targets.
    pub relay: RelayConfig,
    /// DNS: every peer name and its local address.
    pub names: NameMap,
    /// The snapshot (links in force, peers, this plan's rejections; `cert_not_after` is the
    /// shell's to fill in).
    pub snapshot: Snapshot,
    /// On a machine, every peer address ever assigned, to keep in `addresses.json` (a peer
    /// keeps its address when its links come back).
    pub remember: BTreeMap<NodeRef, Ipv4Addr>,
    /// When the plan changes by itself: the next expiry of a link in force.
    pub next_change: Option<SystemTime>,
}

/// Plans the node; `None` until the collaboration is verified. Fails only when the loopback
/// pool cannot give every peer an address.
pub fn plan(inputs: &Inputs<'_>) -> fedmesh_mesh_config::Result<Option<NodePlan>> {
    let Some(collab) = inputs.ledger.collaboration() else {
        return Ok(None);
    };
    let no_vetoes = BTreeSet::new();
    let (links, rejections) = match inputs.placement {
        // Until the controller has read the PeerLinks, a vetoed link must not slip through.
        Some(placement) if !placement.synced => (Vec::new(), Vec::new()),
        Some(placement) => inputs
            .ledger
            .links_in_force(inputs.node, &placement.vetoed, inputs.now),
        None => inputs
            .ledger
            .links_in_force(inputs.node, &no_vetoes, inputs.now),
    };
    let policy = Policy::new(inputs.node, &links);
    let mut ports: BTreeMap<NodeRef, BTreeSet<PortSpec>> = BTreeMap::new();
    for (peer, port, grant) in policy.outbound() {
        ports.entry(peer.clone()).or_default().insert(PortSpec {
            port,
            label: grant.label.clone(),
        });
    }

    let mut remember = inputs.remembered.clone();
    let assigned: BTreeMap<NodeRef, IpAddr> = match inputs.placement {
        None => {
            let assigned =
                addresses::assign(inputs.pool, inputs.remembered, ports.keys().cloned())?;
            remember.extend(assigned.iter().map(|(k, v)| (k.clone(), *v)));
            assigned
                .into_iter()
                .map(|(peer, ip)| (peer, IpAddr::V4(ip)))
                .collect()
        }
        Some(placement) => placement
            .addresses
            .iter()
            .filter(|(peer, _)| ports.contains_key(*peer))
            .map(|(peer, ip)| (peer.clone(), *ip))
            .collect(),
    };
    let relay_carries = inputs.placement.is_none_or(|p| p.mode.relay_carries());
    // In Istio mode the relay carries only the peers the controller found no gateway path for.
    let carries = |peer: &NodeRef| {
        relay_carries || inputs.placement.is_some_and(|p| p.carried.contains(peer))
    };

    let names = PeerNames::new(
        TrustDomain::new(&collab.id)?,
        collab
            .members
            .iter()
            .map(|m| (m.org.as_str(), m.node.as_str())),
    );
    let mut relay_peers = BTreeMap::new();
    let mut peers = BTreeMap::new();
    for (peer, ip) in &assigned {
        let reach = if carries(peer) {
            relay_path(inputs, peer, collab)
        } else {
            Ok(None)
        };
        let unreachable = match reach {
            Ok(Some(endpoint)) => {
                relay_peers.insert(peer.clone(), vec![endpoint]);
                None
            }
            Ok(None) => None,
            Err(why) => Some(why),
        };
        peers.insert(
            peer.clone(),
            PeerView {
                ip: *ip,
                ports: ports[peer].iter().cloned().collect(),
                names: names.of(&peer.org, &peer.node),
                unreachable,
            },
        );
    }

    let listeners = match inputs.placement {
        Some(placement) => placement.listeners.clone(),
        None => peers
            .iter()
            .flat_map(|(peer, view)| {
                view.ports
                    .iter()
                    .map(|p| (SocketAddr::new(view.ip, p.port), (peer.clone(), p.port)))
            })
            .collect(),
    };
    let relay = RelayConfig {
        // Istio carries the links, but for the peers the relay carries; the relay admits
        // nothing else.
        policy: if relay_carries {
            policy
        } else {
            let carried: Vec<_> = links
                .iter()
                .filter(|l| {
                    carries(if l.terms.from == *inputs.node {
                        &l.terms.to
                    } else {
                        &l.terms.from
                    })
                })
                .cloned()
                .collect();
            Policy::new(inputs.node, &carried)
        },
        standing: relay::standing(inputs.ledger),
        peers: relay_peers,
        listeners,
        targets: inputs
            .exposes
            .iter()
            .map(|e| (e.port, e.target.clone()))
            .collect(),
    };

    let mut name_map = NameMap::new();
    for view in peers.values() {
        for name in &view.names {
            name_map.entry(name.clone()).or_default().push(view.ip);
        }
    }
    let next_change = Ledger::next_expiry(&links);
    let snapshot = Snapshot {
        links,
        peers,
        rejections,
        synced: true,
        organization_ids: collab
            .members
            .iter()
            .filter_map(|m| m.organization_id.map(|id| (m.org.clone(), id)))
            .collect(),
        exposes: inputs.exposes.to_vec(),
        cert_not_after: None,
    };
    Ok(Some(NodePlan {
        relay,
        names: name_map,
        snapshot,
        remember: if inputs.placement.is_none() {
            remember
        } else {
            BTreeMap::new()
        },
        next_change,
    }))
}

/// The path to `peer`: direct to its advertised QUIC endpoint (the resolved address, so the
/// transport looks no name up when it dials) when it has one, else through the collaboration's
/// rendezvous servers when it asks for that; `Ok(None)` while a name is being resolved; `Err`
/// says why the peer cannot be dialled.
fn relay_path(
    inputs: &Inputs<'_>,
    peer: &NodeRef,
    collab: &fedmesh_documents::Collaboration,
) -> Result<Option<Endpoint>, String> {
    if let Some(ad) = inputs.ledger.advertisement(peer)
        && ad.quic().is_none()
        && ad.via_rendezvous()
    {
        if collab.rendezvous.is_empty() {
            return Err(
                "accepts no inbound connections, and the collaboration lists no rendezvous server"
                    .to_owned(),
            );
        }
        return Ok(Some(Endpoint::Rendezvous));
    }
    Ok(relay_address(inputs, peer)?.map(|addr| Endpoint::Quic {
        address: addr.to_string(),
    }))
}

/// Where the relay dials `peer`: its advertised address, literally or as resolved; `Ok(None)`
/// while a name is being resolved; `Err` says why the peer cannot be dialled.
fn relay_address(inputs: &Inputs<'_>, peer: &NodeRef) -> Result<Option<SocketAddr>, String> {
    let advertised = inputs
        .ledger
        .advertisement(peer)
        .and_then(|a| a.quic())
        .ok_or_else(|| "has not advertised a relay address".to_owned())?;
    if let Ok(addr) = advertised.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    match inputs.resolved.get(peer) {
        Some(r) if r.advertised == advertised => match &r.addr {
            Ok(addr) => Ok(Some(*addr)),
            Err(error) => Err(format!(
                "its relay address {advertised} does not resolve: {error}"
            )),
        },
        _ => Ok(None),
    }
}

/// The `FEDMESH_PEERS` map of `peers`: every peer name → its `IP:port`s.
pub fn peer_map(peers: &BTreeMap<NodeRef, PeerView>) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for view in peers.values() {
        let addrs: Vec<String> = view
            .ports
            .iter()
            .map(|p| SocketAddr::new(view.ip, p.port).to_string())
            .collect();
        for name in &view.names {
            map.entry(name.clone())
                .or_default()
                .extend(addrs.iter().cloned());
        }
    }
    for addrs in map.values_mut() {
        addrs.sort();
        addrs.dedup();
    }
    map
}

/// The snapshot's rejections: the ones kept so far, then new ones (each once, the last 100).
pub fn merge_rejections(old: &[Rejection], new: &[Rejection]) -> Vec<Rejection> {
    let mut out = old.to_vec();
    for r in new {
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    let excess = out.len().saturating_sub(MAX_REJECTIONS);
    out.drain(..excess);
    out
}

/// How many rejections the snapshot keeps.
pub const MAX_REJECTIONS: usize = 100;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fedmesh_documents::{
        Advertisement, Document, EffectiveLink, LinkTerms, fixtures::Fixture, jws,
    };
    use serde_json::Value;

    use super::*;
    use crate::k8s::{
        Mode,
        desired::{self, Memory},
        fixtures::{credentials, settings},
    };

    const HOUR: Duration = Duration::from_secs(3600);

    fn quic(address: &str) -> Vec<Endpoint> {
        vec![Endpoint::Quic {
            address: address.into(),
        }]
    }

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    /// Collaboration `c`: a/n1 (this node), b/n1 and b/n2 (one organisation, two nodes), c/n1.
    /// a/n1 dials b/n1 (11366:mpc, 1 h) and c/n1 (8080, 2 h); c/n1 dials a/n1 (9092, 2 h).
    struct World {
        fx: Fixture,
        ledger: Ledger,
        to_b: LinkTerms,
        to_c: LinkTerms,
        from_c: LinkTerms,
        remembered: BTreeMap<NodeRef, Ipv4Addr>,
    }

    impl World {
        fn new() -> Self {
            let fx = Fixture::new("c", &["a/n1", "b/n1", "b/n2", "c/n1"]);
            let mut ledger = Ledger::new(&fx.pin());
            ledger.ingest_jws(&fx.collab_jws(), fx.now).unwrap();
            let mut world = Self {
                to_b: fx.terms("a/n1", "b/n1", &["11366:mpc"], HOUR),
                to_c: fx.terms("a/n1", "c/n1", &["8080"], 2 * HOUR),
                from_c: fx.terms("c/n1", "a/n1", &["9092"], 2 * HOUR),
                fx,
                ledger,
                remembered: BTreeMap::from([(n("z/n1"), Ipv4Addr::new(127, 77, 1, 9))]),
            };
            for (node, relay, gateway) in [
                ("b/n1", "relay.b.example:4433", "gw.b.example:443"),
                ("b/n2", "192.0.2.2:4433", "192.0.2.2:443"),
                ("c/n1", "192.0.2.3:4433", "192.0.2.3:443"),
            ] {
                world.advertise(node, relay, Some(gateway));
            }
            for terms in [world.to_b.clone(), world.to_c.clone(), world.from_c.clone()] {
                world.ingest(&world.fx.approval(&terms));
            }
            world
        }

        fn ingest(&mut self, jws: &str) {
            let env = self.fx.envelope(jws.to_owned());
            self.ledger.ingest(&env, self.fx.now).unwrap();
        }

        fn advertise(&mut self, node: &str, relay: &str, gateway: Option<&str>) {
            let doc = Document::Advertisement(Advertisement {
                collab: "c".into(),
                node: n(node),
                endpoints: std::iter::once(Endpoint::Quic {
                    address: relay.into(),
                })
                .chain(gateway.map(|g| Endpoint::IstioGateway { address: g.into() }))
                .collect(),
                instance: None,
                exposes: Vec::new(),
                issued_at: jws::unix(self.fx.now),
            });
            let signed = self.fx.node_sign(node, &doc);
            self.ingest(&signed);
        }

        fn plan(&self, placement: Option<&Placement>, resolved: &[(&str, Resolution)]) -> NodePlan {
            self.plan_at(placement, resolved, self.fx.now)
        }

        fn plan_at(
            &self,
            placement: Option<&Placement>,
            resolved: &[(&str, Resolution)],
            now: SystemTime,
        ) -> NodePlan {
            let resolved = resolved.iter().map(|(p, r)| (n(p), r.clone())).collect();
            let exposes = [Expose {
                port: 9092,
                label: None,
                target: "127.0.0.1:19092".into(),
            }];
            plan(&Inputs {
                ledger: &self.ledger,
                node: &n("a/n1"),
                placement,
                pool: &"127.77.1.0/24".parse().unwrap(),
                remembered: &self.remembered,
                resolved: &resolved,
                exposes: &exposes,
                now,
            })
            .unwrap()
            .unwrap()
        }
    }

    fn resolved(advertised: &str, addr: Result<&str, &str>) -> Resolution {
        Resolution {
            advertised: advertised.into(),
            addr: addr.map(|a| a.parse().unwrap()).map_err(str::to_owned),
        }
    }

    #[test]
    fn a_peer_without_inbound_is_reached_through_the_rendezvous() {
        let mut world = World::new();
        // Advertising a direct endpoint, it is dialled directly.
        assert_eq!(
            world.plan(None, &[]).relay.peers[&n("c/n1")],
            quic("192.0.2.3:4433")
        );
        let doc = Document::Advertisement(Advertisement {
            collab: "c".into(),
            node: n("c/n1"),
            endpoints: vec![Endpoint::Rendezvous],
            instance: None,
            exposes: Vec::new(),
            issued_at: jws::unix(world.fx.now) + 1,
        });
        let signed = world.fx.node_sign("c/n1", &doc);
        world.ingest(&signed);
        let p = world.plan(None, &[]);
        assert_eq!(
            p.snapshot.peers[&n("c/n1")].unreachable.as_deref(),
            Some(
                "accepts no inbound connections, and the collaboration lists no rendezvous server"
            )
        );
        assert!(!p.relay.peers.contains_key(&n("c/n1")));

        world.fx.collab.version = 2;
        world.fx.collab.rendezvous = vec![fedmesh_documents::RendezvousServer {
            address: "rv.example:443".into(),
            pin_sha256: "ab".repeat(32),
        }];
        let collab = world.fx.collab_jws();
        world.ingest(&collab);
        let p = world.plan(None, &[]);
        assert_eq!(p.snapshot.peers[&n("c/n1")].unreachable, None);
        assert_eq!(p.relay.peers[&n("c/n1")], vec![Endpoint::Rendezvous]);
    }

    fn link_ids(plan: &NodePlan) -> BTreeSet<&str> {
        plan.snapshot
            .links
            .iter()
            .map(|l: &EffectiveLink| l.terms.id.as_str())
            .collect()
    }

    #[test]
    fn on_a_machine_every_peer_gets_a_loopback_address_names_and_listeners() {
        let w = World::new();
        let b_addr = resolved("relay.b.example:4433", Ok("198.51.100.7:4433"));
        let p = w.plan(None, &[("b/n1", b_addr)]);
        let (b, c) = (&p.snapshot.peers[&n("b/n1")], &p.snapshot.peers[&n("c/n1")]);
        assert_eq!(
            p.snapshot.peers.len(),
            2,
            "peers this node dials, nothing else"
        );
        assert_eq!(
            b.names,
            ["n1.b.c.fedmesh"],
            "b has two nodes: no name of its own"
        );
        assert_eq!(c.names, ["n1.c.c.fedmesh", "c.c.fedmesh"]);
        assert_eq!(b.ports, ["11366:mpc".parse().unwrap()]);
        assert!(b.unreachable.is_none() && c.unreachable.is_none());
        for view in [b, c] {
            assert!(
                matches!(view.ip, IpAddr::V4(ip) if ip.octets()[..3] == [127, 77, 1]),
                "{view:?}"
            );
        }
        assert_eq!(
            p.relay.listeners,
            BTreeMap::from([
                (SocketAddr::new(b.ip, 11366), (n("b/n1"), 11366)),
                (SocketAddr::new(c.ip, 8080), (n("c/n1"), 8080)),
            ])
        );
        assert_eq!(
            p.relay.peers,
            BTreeMap::from([
                (n("b/n1"), quic("198.51.100.7:4433")),
                (n("c/n1"), quic("192.0.2.3:4433")),
            ])
        );
        assert!(p.relay.policy.admits_inbound(&n("c/n1"), 9092).is_some());
        assert!(p.relay.policy.admits_outbound(&n("b/n1"), 11366).is_some());
        assert_eq!(
            p.relay.targets,
            BTreeMap::from([(9092, "127.0.0.1:19092".into())])
        );
        assert_eq!(
            p.names,
            NameMap::from([
                ("n1.b.c.fedmesh".into(), vec![b.ip]),
                ("n1.c.c.fedmesh".into(), vec![c.ip]),
                ("c.c.fedmesh".into(), vec![c.ip]),
            ])
        );
        assert_eq!(
            peer_map(&p.snapshot.peers)["c.c.fedmesh"],
            [format!("{}:8080", c.ip)]
        );
        // Addresses are remembered, the old ones kept; the plan changes at the first expiry.
        let IpAddr::V4(b_ip) = b.ip else { panic!() };
        assert_eq!(p.remember[&n("b/n1")], b_ip);
        assert_eq!(p.remember[&n("z/n1")], Ipv4Addr::new(127, 77, 1, 9));
        assert_eq!(
            p.next_change,
            Some(fedmesh_certs::time::from_unix(w.to_b.not_after))
        );
        assert_eq!(
            link_ids(&p),
            BTreeSet::from([w.to_b.id.as_str(), w.to_c.id.as_str(), w.from_c.id.as_str()])
        );
        // The same inputs give the same plan.
        let again = w.plan(
            None,
            &[(
                "b/n1",
                resolved("relay.b.example:4433", Ok("198.51.100.7:4433")),
            )],
        );
        assert_eq!(again, p);
    }

    #[test]
    fn an_expired_link_leaves_at_its_expiry() {
        let mut w = World::new();
        let at = fedmesh_certs::time::from_unix(w.to_b.not_after);
        let before = w.plan_at(None, &[], at - Duration::from_secs(1));
        w.remembered = before.remember.clone();
        let after = w.plan_at(None, &[], at);
        assert!(before.snapshot.peers.contains_key(&n("b/n1")));
        assert!(!after.snapshot.peers.contains_key(&n("b/n1")));
        assert!(!link_ids(&after).contains(w.to_b.id.as_str()));
        assert_eq!(
            after.next_change,
            Some(fedmesh_certs::time::from_unix(w.to_c.not_after))
        );
        assert_eq!(
            after.remember, before.remember,
            "the peer keeps its address for when a link comes back"
        );
    }

    #[test]
    fn vetoes_and_an_unread_cluster_leave_links_out() {
        let w = World::new();
        let mut placement = Placement::new(Mode::Relay);
        let unsynced = w.plan(Some(&placement), &[]);
        assert!(
            unsynced.snapshot.links.is_empty() && unsynced.relay.policy == Policy::default(),
            "nothing is carried before the controller has read the vetoes"
        );
        placement.synced = true;
        placement.vetoed.insert(w.from_c.id.clone());
        let vetoed = w.plan(Some(&placement), &[]);
        assert!(!link_ids(&vetoed).contains(w.from_c.id.as_str()));
        assert!(
            vetoed
                .relay
                .policy
                .admits_inbound(&n("c/n1"), 9092)
                .is_none()
        );
        assert!(
            vetoed
                .relay
                .policy
                .admits_outbound(&n("c/n1"), 8080)
                .is_some()
        );
        assert!(
            vetoed.remember.is_empty(),
            "the cluster keeps its own memory"
        );
    }

    #[test]
    fn in_a_cluster_addresses_and_listeners_are_placed() {
        let w = World::new();
        let mut placement = Placement::new(Mode::Relay);
        placement.synced = true;
        let service_ip: IpAddr = "10.96.0.7".parse().unwrap();
        placement.addresses = BTreeMap::from([(n("c/n1"), service_ip), (n("z/n1"), service_ip)]);
        let pod_port: SocketAddr = "0.0.0.0:20001".parse().unwrap();
        placement.listeners = BTreeMap::from([(pod_port, (n("c/n1"), 8080))]);
        let p = w.plan(Some(&placement), &[]);
        assert_eq!(p.snapshot.peers.keys().collect::<Vec<_>>(), [&n("c/n1")]);
        assert_eq!(p.snapshot.peers[&n("c/n1")].ip, service_ip);
        assert_eq!(p.relay.listeners, placement.listeners);
        assert!(p.relay.policy.admits_outbound(&n("c/n1"), 8080).is_some());

        placement.mode = Mode::Istio;
        let istio = w.plan(Some(&placement), &[]);
        assert_eq!(
            istio.relay.policy,
            Policy::default(),
            "Istio carries the links"
        );
        assert!(istio.relay.peers.is_empty());
        assert_eq!(
            istio.snapshot.links.len(),
            3,
            "the links are still in force"
        );

        // A peer Istio cannot reach through the gateways is carried by the relay, and only it.
        placement.carried.insert(n("c/n1"));
        let carried = w.plan(Some(&placement), &[]);
        assert_eq!(
            carried.relay.peers,
            BTreeMap::from([(n("c/n1"), quic("192.0.2.3:4433"))])
        );
        assert!(
            carried
                .relay
                .policy
                .admits_outbound(&n("c/n1"), 8080)
                .is_some()
        );
        assert!(
            carried
                .relay
                .policy
                .admits_inbound(&n("c/n1"), 9092)
                .is_some()
        );
        assert!(
            carried
                .relay
                .policy
                .admits_outbound(&n("b/n1"), 11366)
                .is_none(),
            "b/n1 goes through the gateways"
        );
        assert_eq!(carried.relay.listeners, placement.listeners);
    }

    #[test]
    fn a_name_that_does_not_resolve_is_reported() {
        let w = World::new();
        let pending = w.plan(None, &[]);
        assert!(
            !pending.relay.peers.contains_key(&n("b/n1")),
            "not dialled yet"
        );
        assert_eq!(pending.snapshot.peers[&n("b/n1")].unreachable, None);

        let failed = w.plan(
            None,
            &[(
                "b/n1",
                resolved("relay.b.example:4433", Err("no such host")),
            )],
        );
        assert!(!failed.relay.peers.contains_key(&n("b/n1")));
        assert_eq!(
            failed.snapshot.peers[&n("b/n1")].unreachable.as_deref(),
            Some("its relay address relay.b.example:4433 does not resolve: no such host")
        );

        // A resolution of an older advertisement is not used.
        let stale = w.plan(
            None,
            &[(
                "b/n1",
                resolved("old.b.example:4433", Ok("198.51.100.1:4433")),
            )],
        );
        assert!(!stale.relay.peers.contains_key(&n("b/n1")));
    }

    #[test]
    fn a_two_node_organisation_is_named_alike_by_relay_dns_peer_map_and_istio() {
        let mut w = World::new();
        let to_b2 = w.fx.terms("a/n1", "b/n2", &["11366:mpc"], HOUR);
        w.ingest(&w.fx.approval(&to_b2));
        let b_addr = resolved("relay.b.example:4433", Ok("198.51.100.7:4433"));
        let relay = w.plan(None, &[("b/n1", b_addr)]);
        let istio = desired::compute(
            &settings(Mode::Istio),
            &desired::Inputs {
                ledger: &w.ledger,
                node: &n("a/n1"),
                vetoed: &BTreeSet::new(),
                credentials: Some(&credentials()),
                now: w.fx.now,
            },
            &Memory::default(),
        )
        .unwrap()
        .unwrap();
        let hosts = |peer: &str| -> Vec<String> {
            let label = peer.replace('/', ".");
            let se = istio
                .objects
                .iter()
                .find(|o| {
                    o["kind"] == "ServiceEntry"
                        && o["metadata"]["labels"]["fedmesh.io/peer"] == label.as_str()
                })
                .unwrap_or_else(|| panic!("no ServiceEntry for {peer}"));
            se["spec"]["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| Value::as_str(h).unwrap().to_owned())
                .collect()
        };
        let peer_map = peer_map(&relay.snapshot.peers);
        let mut all = BTreeSet::new();
        for (peer, expected) in [
            ("b/n1", vec!["n1.b.c.fedmesh"]),
            ("b/n2", vec!["n2.b.c.fedmesh"]),
            ("c/n1", vec!["n1.c.c.fedmesh", "c.c.fedmesh"]),
        ] {
            let view = &relay.snapshot.peers[&n(peer)];
            assert_eq!(view.names, expected, "relay: {peer}");
            assert_eq!(hosts(peer), expected, "Istio: {peer}");
            for name in &expected {
                assert_eq!(relay.names[*name], [view.ip], "DNS: {name}");
                assert!(peer_map.contains_key(*name), "FEDMESH_PEERS: {name}");
            }
            all.extend(expected.iter().map(|s| (*s).to_owned()));
        }
        assert!(
            !peer_map.contains_key("b.c.fedmesh"),
            "no organisation name for b"
        );
        assert_eq!(relay.names.keys().cloned().collect::<BTreeSet<_>>(), all);
        assert_eq!(peer_map.keys().cloned().collect::<BTreeSet<_>>(), all);
    }
}
