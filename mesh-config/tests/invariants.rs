//! Properties of rendered sets: nothing is admitted without a link, pruning is exact, VIPs are
//! stable and never shared.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use common::{NODES, n, now, rendered, view};
use fedmesh_documents::{EffectiveLink, LinkTerms, NodeRef};
use fedmesh_mesh_config::{
    NodeView, ObjectKey, Peer, RenderOptions,
    render::{DIRECTION, PEER},
};
use serde_json::Value;

/// A collaboration of `orgs` organisations (node `n1` each, two nodes for org-1) with links
/// drawn by a fixed pseudo-random sequence, some with several ports, some parallel.
fn synthetic(orgs: usize) -> Vec<EffectiveLink> {
    let mut nodes: Vec<NodeRef> = (0..orgs).map(|i| n(&format!("org-{i}/n1"))).collect();
    nodes.push(n("org-1/n2"));
    let mut seed = 0x2545_f491_u64;
    let mut next = |m: usize| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        usize::try_from(seed >> 33).unwrap() % m
    };
    let mut links = BTreeMap::new();
    for _ in 0..orgs * 4 {
        let (a, b) = (next(nodes.len()), next(nodes.len()));
        if a == b {
            continue;
        }
        let mut ports: Vec<String> = (0..=next(3))
            .map(|_| format!("{}:p{}", 11000 + next(40), next(2)))
            .collect();
        ports.sort();
        ports.dedup_by(|x, y| x.split(':').next() == y.split(':').next());
        let ports = ports.iter().map(|p| p.parse().unwrap()).collect();
        let expiry = 4_000_000_000 + u64::try_from(next(1000)).unwrap();
        let terms = LinkTerms::new(
            "collab-x",
            nodes[a].clone(),
            nodes[b].clone(),
            ports,
            expiry,
            None,
        )
        .unwrap();
        let approved_by = format!("approver-{}", next(2));
        links.insert(
            terms.id.clone(),
            EffectiveLink {
                terms,
                approved_by,
                approved_at: 0,
            },
        );
    }
    links.into_values().collect()
}

fn synthetic_view(local: &NodeRef, links: &[EffectiveLink]) -> NodeView {
    let mut peers = BTreeMap::new();
    for l in links {
        for node in [&l.terms.from, &l.terms.to] {
            let gateway = format!("gw.{}.example:443", node.org).parse().unwrap();
            peers.insert(node.clone(), Peer { gateway });
        }
    }
    peers.remove(local);
    let mut members: BTreeSet<NodeRef> = peers.keys().cloned().collect();
    members.insert(local.clone());
    NodeView {
        collab: "collab-x".into(),
        local: local.clone(),
        members,
        peers,
        links: links
            .iter()
            .filter(|l| l.terms.concerns(local))
            .cloned()
            .collect(),
        services: BTreeMap::new(),
        vips: BTreeMap::new(),
        credentials: None,
        carried: BTreeMap::new(),
    }
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

fn keys_of(o: &Value) -> BTreeSet<&str> {
    o.as_object().unwrap().keys().map(String::as_str).collect()
}

/// `(src, port, dst)` from `<src-node>.<src-org>.p<port>.<dst-node>.<dst-org>.collab-x.fedmesh`.
fn parse_sni(sni: &str) -> (NodeRef, u16, NodeRef) {
    let labels: Vec<&str> = sni.split('.').collect();
    let [
        src_node,
        src_org,
        port,
        dst_node,
        dst_org,
        "collab-x",
        "fedmesh",
    ] = labels[..]
    else {
        panic!("unexpected SNI {sni}");
    };
    let port = port.strip_prefix('p').unwrap().parse().unwrap();
    (
        n(&format!("{src_org}/{src_node}")),
        port,
        n(&format!("{dst_org}/{dst_node}")),
    )
}

fn principal(node: &NodeRef) -> String {
    format!("collab-x.fedmesh/org/{}/node/{}", node.org, node.node)
}

/// Checks every AuthorizationPolicy and ingress Gateway server of `view`'s render against its
/// links: each admitted (principal, port, SNI) is approved, and each approved one is admitted.
fn audit(view: &NodeView) {
    let options = RenderOptions::default();
    let objects = fedmesh_mesh_config::render(view, &options, now())
        .unwrap()
        .objects;
    let local = &view.local;
    let approved: BTreeSet<(String, u16)> = view
        .links
        .iter()
        .filter(|l| l.terms.to == *local)
        .flat_map(|l| {
            l.terms
                .ports
                .iter()
                .map(|p| (principal(&l.terms.from), p.port))
        })
        .collect();
    let mut admitted = BTreeSet::new();
    let mut tls_admitted = BTreeSet::new();
    for o in &objects {
        let spec = &o["spec"];
        let ns = o["metadata"]["namespace"].as_str().unwrap();
        match o["kind"].as_str().unwrap() {
            "AuthorizationPolicy" => {
                assert!(spec.get("action").is_none_or(|a| a == "ALLOW"), "{o:#}");
                let Some(rules) = spec.get("rules") else {
                    continue; // ALLOW with no rules admits nothing.
                };
                for rule in rules.as_array().unwrap() {
                    // A missing from/to/when would be a wildcard: every rule must have all
                    // three (the algorithm namespace has no SNI: the gateway already checked).
                    let expected: BTreeSet<&str> = if ns == "fedmesh" {
                        BTreeSet::from(["from", "to", "when"])
                    } else {
                        BTreeSet::from(["from", "to"])
                    };
                    assert_eq!(keys_of(rule), expected, "{o:#}");
                    let principals: Vec<&str> = rule["from"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|f| {
                            assert_eq!(keys_of(&f["source"]), BTreeSet::from(["principals"]));
                            strs(&f["source"]["principals"])
                        })
                        .collect();
                    let ports: Vec<&str> = rule["to"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|t| {
                            assert_eq!(keys_of(&t["operation"]), BTreeSet::from(["ports"]));
                            strs(&t["operation"]["ports"])
                        })
                        .collect();
                    assert!(!principals.is_empty() && !ports.is_empty(), "{o:#}");
                    if ns == "vantage6-tasks" {
                        // Only the ingress gateway, only on ports approved for this peer.
                        assert_eq!(principals, ["cluster.local/ns/fedmesh/sa/fedmesh-ingress"]);
                        let peer = o["metadata"]["labels"][PEER].as_str().unwrap();
                        let (org, node) = peer.split_once('.').unwrap();
                        let peer = principal(&n(&format!("{org}/{node}")));
                        for p in ports {
                            let port: u16 = p.parse().unwrap();
                            assert!(approved.contains(&(peer.clone(), port)), "{o:#}");
                        }
                        continue;
                    }
                    let when = rule["when"].as_array().unwrap();
                    assert_eq!(when.len(), 1);
                    assert_eq!(when[0]["key"], "connection.sni");
                    assert_eq!(keys_of(&when[0]), BTreeSet::from(["key", "values"]));
                    for p in &principals {
                        for port in &ports {
                            for sni in strs(&when[0]["values"]) {
                                assert_eq!(*port, "443", "only the gateway's TLS port");
                                let (src, app_port, dst) = parse_sni(sni);
                                assert_eq!(dst, *local, "{sni}");
                                assert_eq!(*p, principal(&src), "principal must match SNI source");
                                assert!(
                                    approved.contains(&(p.to_string(), app_port)),
                                    "{p} admitted to {local}:{app_port} without a link"
                                );
                                admitted.insert((p.to_string(), app_port));
                            }
                        }
                    }
                }
            }
            "Gateway" if spec["selector"]["istio"] == "fedmesh-ingress" => {
                for server in spec["servers"].as_array().unwrap() {
                    assert_eq!(server["tls"]["mode"], "MUTUAL");
                    for san in strs(&server["tls"]["subjectAltNames"]) {
                        for sni in strs(&server["hosts"]) {
                            let (src, app_port, dst) = parse_sni(sni);
                            assert_eq!(dst, *local);
                            let p = san.strip_prefix("spiffe://").unwrap();
                            assert_eq!(p, principal(&src));
                            assert!(approved.contains(&(p.to_owned(), app_port)));
                            tls_admitted.insert((p.to_owned(), app_port));
                        }
                    }
                }
            }
            "NetworkPolicy" => {
                // Only the algorithm pods that take part, by vantage6's `role` label: a policy
                // selecting every pod (`podSelector: {}`) would open every role.
                assert_eq!(
                    spec["podSelector"],
                    serde_json::json!({"matchExpressions": [{
                        "key": "role", "operator": "In",
                        "values": ["central_compute", "federated_compute"],
                    }]}),
                    "{o:#}"
                );
            }
            _ => {}
        }
    }
    assert_eq!(
        admitted, approved,
        "every approved inbound link is admitted, nothing else"
    );
    assert_eq!(tls_admitted, approved);
}

#[test]
fn no_policy_admits_a_principal_without_an_approved_link() {
    for node in NODES {
        audit(&view(node));
    }
    let links = synthetic(12);
    assert!(links.len() > 30 && links.iter().any(|l| l.terms.ports.len() > 1));
    let locals: BTreeSet<&NodeRef> = links.iter().map(|l| &l.terms.to).collect();
    for local in locals {
        audit(&synthetic_view(local, &links));
    }
}

fn by_key(objects: &[Value]) -> BTreeMap<ObjectKey, &Value> {
    objects
        .iter()
        .map(|o| (ObjectKey::of(o).unwrap(), o))
        .collect()
}

/// What disappeared and what changed between two renders.
fn diff(before: &[Value], after: &[Value]) -> (BTreeSet<ObjectKey>, BTreeSet<ObjectKey>) {
    let (b, a) = (by_key(before), by_key(after));
    assert!(
        a.keys().all(|k| b.contains_key(k)),
        "removing a link adds nothing"
    );
    let removed = b.keys().filter(|k| !a.contains_key(*k)).cloned().collect();
    let changed = a
        .iter()
        .filter(|(k, o)| b[*k] != **o)
        .map(|(k, _)| k.clone())
        .collect();
    (removed, changed)
}

fn labelled(objects: &[Value], peer: &str, direction: &str) -> BTreeSet<ObjectKey> {
    objects
        .iter()
        .filter(|o| {
            o["metadata"]["labels"][PEER] == peer && o["metadata"]["labels"][DIRECTION] == direction
        })
        .map(|o| ObjectKey::of(o).unwrap())
        .collect()
}

#[test]
fn removing_a_peers_last_link_prunes_exactly_its_objects() {
    let full = view("org-a/n1");
    let before = rendered(&full).objects;
    for (from, to, peer, direction) in [
        ("org-a/n1", "org-c/n1", "org-c.n1", "outbound"),
        ("org-c/n1", "org-a/n1", "org-c.n1", "inbound"),
        ("org-a/n1", "org-b/n1", "org-b.n1", "outbound"),
    ] {
        let mut v = full.clone();
        v.links
            .retain(|l| !(l.terms.from == n(from) && l.terms.to == n(to)));
        assert_eq!(v.links.len(), full.links.len() - 1);
        let after = rendered(&v).objects;
        let (removed, changed) = diff(&before, &after);
        let expected = labelled(&before, peer, direction);
        assert_eq!(removed, expected, "{from} -> {to}");
        assert_eq!(
            changed,
            BTreeSet::new(),
            "{from} -> {to}: nothing else changes"
        );
        assert_eq!(expected.len(), if direction == "outbound" { 6 } else { 5 });
    }
}

#[test]
fn removing_one_of_a_peers_links_keeps_its_other_objects() {
    let mut full = view("org-a/n1");
    let extra = LinkTerms::new(
        "collab-x",
        n("org-a/n1"),
        n("org-b/n1"),
        vec!["11368:mpc2".parse().unwrap()],
        4_070_908_800,
        None,
    )
    .unwrap();
    full.links.push(EffectiveLink {
        terms: extra.clone(),
        approved_by: "X".into(),
        approved_at: 0,
    });
    let before = rendered(&full).objects;
    let mut v = full.clone();
    v.links.retain(|l| l.terms.id != extra.id);
    let after = rendered(&v).objects;
    let (removed, changed) = diff(&before, &after);
    let names = |keys: &BTreeSet<ObjectKey>| -> Vec<String> {
        keys.iter()
            .map(|k| format!("{} {}", k.kind, k.name))
            .collect()
    };
    let removed = names(&removed);
    assert_eq!(removed.len(), 1);
    assert!(removed[0].starts_with("VirtualService fm-collab-x-egress-org-b-n1-p11368-"));
    // The peer's shared objects lose the port; nothing of any other peer changes.
    let changed_peers: BTreeSet<&str> = changed
        .iter()
        .map(|k| {
            by_key(&after)[k]["metadata"]["labels"][PEER]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(changed_peers, BTreeSet::from(["org-b.n1"]));
    assert_eq!(
        changed.len(),
        5,
        "SE, VS, DR, egress Gateway and DR of org-b/n1"
    );
}

fn vip_of(objects: &[Value], peer: &str) -> Option<Ipv4Addr> {
    objects
        .iter()
        .find(|o| o["kind"] == "ServiceEntry" && o["metadata"]["labels"][PEER] == peer)
        .map(|o| o["spec"]["addresses"][0].as_str().unwrap().parse().unwrap())
}

#[test]
fn vips_are_stable_across_renders_reorderings_and_restarts() {
    let local = n("org-0/n1");
    let links: Vec<EffectiveLink> = (1..=300)
        .map(|i| {
            let port = vec!["11366:mpc".parse().unwrap()];
            let terms = LinkTerms::new(
                "collab-x",
                local.clone(),
                n(&format!("org-{i}/n1")),
                port,
                4e9 as u64,
                None,
            )
            .unwrap();
            EffectiveLink {
                terms,
                approved_by: "O".into(),
                approved_at: 0,
            }
        })
        .collect();
    let options = RenderOptions::default();
    let render = |v: &NodeView| fedmesh_mesh_config::render(v, &options, now()).unwrap();

    let v = synthetic_view(&local, &links);
    let first = render(&v);
    assert_eq!(first.vips.len(), 300);
    let unique: BTreeSet<&Ipv4Addr> = first.vips.values().collect();
    assert_eq!(unique.len(), 300, "never shared");
    assert!(
        first
            .vips
            .values()
            .all(|ip| options.vip_pool.is_usable(*ip))
    );
    for (peer, ip) in &first.vips {
        assert_eq!(
            vip_of(&first.objects, &format!("{}.{}", peer.org, peer.node)),
            Some(*ip)
        );
    }

    // Same inputs in another order: same VIPs, same objects.
    let mut reordered = v.clone();
    reordered.links.reverse();
    assert_eq!(render(&reordered), first);

    // A restart with the persisted map, and 100 peers more: nobody moves.
    let more: Vec<EffectiveLink> = (301..=400)
        .map(|i| {
            let port = vec!["11366:mpc".parse().unwrap()];
            let terms = LinkTerms::new(
                "collab-x",
                local.clone(),
                n(&format!("org-{i}/n1")),
                port,
                4e9 as u64,
                None,
            )
            .unwrap();
            EffectiveLink {
                terms,
                approved_by: "O".into(),
                approved_at: 0,
            }
        })
        .collect();
    let mut grown = synthetic_view(&local, &[more, links.clone()].concat());
    grown.vips = first.vips.clone();
    let second = render(&grown);
    assert_eq!(second.vips.len(), 400);
    for (peer, ip) in &first.vips {
        assert_eq!(second.vips[peer], *ip, "{peer} moved");
    }
    let unique: BTreeSet<&Ipv4Addr> = second.vips.values().collect();
    assert_eq!(unique.len(), 400);

    // Losing a peer frees its VIP for nobody else until the pool needs it: the others stay.
    let mut shrunk = synthetic_view(&local, &links[1..]);
    shrunk.vips = second.vips.clone();
    let third = render(&shrunk);
    for (peer, ip) in &third.vips {
        assert_eq!(second.vips[peer], *ip);
    }
}

#[test]
fn the_example_uses_its_pin_and_stable_hash_slots() {
    let a = rendered(&view("org-a/n1"));
    let b = rendered(&view("org-b/n1"));
    assert_eq!(a.vips[&n("org-c/n1")], Ipv4Addr::new(240, 241, 0, 30));
    assert_eq!(b.vips[&n("org-c/n1")], Ipv4Addr::new(240, 241, 0, 30));
    assert_eq!(a.vips[&n("org-b/n1")], Ipv4Addr::new(240, 241, 206, 99));
    let c = rendered(&view("org-c/n1"));
    assert_eq!(
        c.vips.keys().collect::<Vec<_>>(),
        [&n("org-a/n1")],
        "org-c dials only Flower"
    );
}
