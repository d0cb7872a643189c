//! The relay backend: fedmesh's own QUIC relay carries the links, and algorithm pods reach
//! each peer through one `Service` per peer in front of the agent pod. Each of the peer's ports
//! is the algorithm's real port and leads to a pod port the relay listens on, allocated from a
//! [`PortRange`] deterministically (the `<org>/<node>:<port>` hash picks the first choice) and
//! stably (an allocation is kept while the (peer, port) is wanted).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use fedmesh_documents::{EffectiveLink, NodeRef};
use fedmesh_mesh_config::{
    ObjectKey,
    render::{APPROVED_BY, COLLABORATION, DIRECTION, EXPIRES, LINKS, MANAGED_BY, PEER, PURPOSE},
};
use serde_json::{Value, json};

use super::super::{
    FIELD_MANAGER, Result, Settings,
    desired::{Desired, Memory},
    fnv1a, peerlink,
    resources::{Kind, Place, kind},
};

/// What the relay backend writes.
pub const KINDS: &[Kind] = &[kind("v1", "Service", "services", Place::Agent)];

pub use fedmesh_mesh_config::addresses::PortRange;

/// One Service per peer this node dials, each port leading to a pod port the relay listens on.
pub(super) fn render(
    settings: &Settings,
    memory: &Memory,
    local: &NodeRef,
    desired: &mut Desired,
) -> Result<()> {
    let mut outbound: BTreeMap<&NodeRef, Vec<&EffectiveLink>> = BTreeMap::new();
    for link in &desired.links {
        if link.terms.from == *local {
            outbound.entry(&link.terms.to).or_default().push(link);
        }
    }
    let wanted = outbound.iter().flat_map(|(peer, links)| {
        links
            .iter()
            .flat_map(|l| &l.terms.ports)
            .map(|p| ((*peer).clone(), p.port))
    });
    let pod_ports = allocate(settings.pod_ports, &memory.pod_ports, wanted)?;
    let mut objects = Vec::new();
    for (peer, links) in &outbound {
        let ports = &pod_ports[*peer];
        let name = service_name(&desired.collab, peer);
        objects.push(service(
            settings,
            &desired.collab,
            &name,
            peer,
            ports,
            links,
        ));
        desired.services.insert(name, (*peer).clone());
        for (port, pod_port) in ports {
            desired.listeners.insert(
                SocketAddr::from(([0, 0, 0, 0], *pod_port)),
                ((*peer).clone(), *port),
            );
        }
    }
    desired.objects = objects;
    desired.memory.pod_ports = pod_ports;
    Ok(())
}

/// The ClusterIP of each peer's Service, from the apply responses or the live objects.
pub(super) fn addresses(
    desired: &Desired,
    served: &BTreeMap<ObjectKey, Value>,
) -> BTreeMap<NodeRef, IpAddr> {
    served
        .iter()
        .filter(|(key, _)| key.kind == "Service")
        .filter_map(|(key, object)| {
            let peer = desired.services.get(&key.name)?;
            let ip = object["spec"]["clusterIP"].as_str()?.parse().ok()?;
            Some((peer.clone(), ip))
        })
        .collect()
}

/// Gives every wanted (peer, port) a pod port of `range`, keeping `previous` allocations
/// ([`fedmesh_mesh_config::addresses::allocate_ports`]).
pub fn allocate(
    range: PortRange,
    previous: &BTreeMap<NodeRef, BTreeMap<u16, u16>>,
    wanted: impl IntoIterator<Item = (NodeRef, u16)>,
) -> Result<BTreeMap<NodeRef, BTreeMap<u16, u16>>> {
    Ok(fedmesh_mesh_config::addresses::allocate_ports(
        range, previous, wanted,
    )?)
}

/// `fm-<collab>-<org>-<node>-<hash>`, at most 63 characters; the hash tells `org-a/n1` from
/// `org/a-n1`.
pub fn service_name(collab: &str, peer: &NodeRef) -> String {
    let parts = ["fm", collab, &peer.org, &peer.node];
    let hash = fnv1a(parts.join("/").as_bytes()) & 0xffff_ffff;
    let readable = parts.join("-");
    let head = readable.get(..54).unwrap_or(&readable);
    format!("{}-{hash:08x}", head.trim_end_matches('-'))
}

fn service(
    settings: &Settings,
    collab: &str,
    name: &str,
    peer: &NodeRef,
    ports: &BTreeMap<u16, u16>,
    links: &[&EffectiveLink],
) -> Value {
    let ids: BTreeSet<&str> = links.iter().map(|l| l.terms.id.as_str()).collect();
    let approvers: BTreeSet<&str> = links.iter().map(|l| l.approved_by.as_str()).collect();
    let expires = links.iter().map(|l| l.terms.not_after).min().unwrap_or(0);
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port, pod)| {
            json!({"name": format!("tcp-{port}"), "protocol": "TCP", "port": port, "targetPort": pod})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {
                MANAGED_BY: FIELD_MANAGER,
                COLLABORATION: collab,
                PEER: format!("{}.{}", peer.org, peer.node),
                DIRECTION: "outbound",
            },
            "annotations": {
                PURPOSE: format!("relay: algorithm pods reach {peer} here, on its approved ports"),
                LINKS: ids.into_iter().collect::<Vec<_>>().join(", "),
                APPROVED_BY: approvers.into_iter().collect::<Vec<_>>().join(", "),
                EXPIRES: peerlink::rfc3339(expires),
            },
        },
        "spec": {
            "type": "ClusterIP",
            "selector": settings.pod_labels,
            "ports": ports,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    #[test]
    fn port_ranges_parse_and_refuse() {
        assert_eq!(
            "20000-29999".parse::<PortRange>().unwrap(),
            PortRange::DEFAULT
        );
        assert_eq!(PortRange::DEFAULT.to_string(), "20000-29999");
        for bad in ["80-90", "3000-2000", "x-1", "20000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_ports_are_deterministic_and_stable() {
        let range: PortRange = "30000-30003".parse().unwrap();
        let first = allocate(
            range,
            &BTreeMap::new(),
            [(n("b/n1"), 11366), (n("c/n1"), 11366)],
        )
        .unwrap();
        assert_eq!(
            first,
            allocate(
                range,
                &BTreeMap::new(),
                [(n("c/n1"), 11366), (n("b/n1"), 11366)]
            )
            .unwrap(),
            "the same wish gives the same answer, whatever the order"
        );
        // A newcomer never moves an existing allocation.
        let more = allocate(
            range,
            &first,
            [
                (n("a/n1"), 1),
                (n("b/n1"), 11366),
                (n("c/n1"), 11366),
                (n("d/n1"), 2),
            ],
        )
        .unwrap();
        assert_eq!(more[&n("b/n1")], first[&n("b/n1")]);
        assert_eq!(more[&n("c/n1")], first[&n("c/n1")]);
        let all: BTreeSet<u16> = more.values().flat_map(|m| m.values().copied()).collect();
        assert_eq!(all, BTreeSet::from([30000, 30001, 30002, 30003]));
        assert!(
            allocate(
                range,
                &more,
                [
                    (n("e/n1"), 1),
                    (n("a/n1"), 1),
                    (n("b/n1"), 11366),
                    (n("c/n1"), 11366),
                    (n("d/n1"), 2)
                ]
            )
            .is_err()
        );
    }

    #[test]
    fn service_names_are_labels_and_unambiguous() {
        assert_eq!(service_name("c", &n("org-b/n1")), "fm-c-org-b-n1-ae08affc");
        assert_ne!(
            service_name("c", &n("org-b/n1")),
            service_name("c", &n("org/b-n1"))
        );
        let long = "x".repeat(63);
        assert_eq!(service_name(&long, &n("b/n1")).len(), 63);
    }
}
