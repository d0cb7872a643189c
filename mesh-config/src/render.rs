//! One node's view in, the Kubernetes and Istio objects it needs out.
//!
//! Cross-organisation TLS starts and ends at the fedmesh gateways in the mesh namespace, which
//! alone hold the collaboration credentials; inside the cluster every hop is Istio mTLS.
//!
//! ```text
//!  outbound (this node dials peer P on port N)
//!  algorithm pod ──VIP:N──► sidecar ──ISTIO_MUTUAL, SNI s──► egress gateway
//!      ──MUTUAL (our cert, SNI s, peer's SPIFFE ID checked)──► P's ingress gateway
//!
//!  inbound (peer Q dials this node on port N)
//!  Q's egress gateway ──MUTUAL──► ingress gateway (collab CA; Q's SPIFFE ID; SNI s)
//!      ──ISTIO_MUTUAL──► Service in the algorithm namespace, port N
//!
//!  s = <src-node>.<src-org>.p<N>.<dst-node>.<dst-org>.<collab>.fedmesh
//! ```
//!
//! The SNI names both ends and the port, because a gateway sees one TCP port for all of them:
//! it is what lets the receiving gateway route each connection to the right port, and lets its
//! AuthorizationPolicy tie each principal to exactly the (port, destination) its link approves.
//!
//! A peer in [`NodeView::carried`] (it, or this node, takes no inbound connections at a
//! gateway) is reached through the local fedmesh agent instead, which carries the traffic over
//! its relay: its ServiceEntry's endpoints are the agent pod's ports (Istio mTLS from the
//! sidecar), and inbound the agent dials the algorithm's Service through its own sidecar, under
//! an AuthorizationPolicy that admits only the agent's principal on the approved ports.
//!
//! Objects come per peer and direction, labelled `fedmesh.io/peer: <org>.<node>` and
//! `fedmesh.io/direction: outbound|inbound`, so removing a peer's last link in one direction
//! prunes exactly those objects. Collaboration-wide objects (default deny, mTLS, the Sidecar,
//! the NetworkPolicy, the credentials Secret) carry `fedmesh.io/peer: baseline` (a value with no
//! dot, so it never equals an `<org>.<node>`).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::Ipv4Addr,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use fedmesh_certs::{
    SpiffeId, TrustDomain,
    id::{PeerNames, TRUST_DOMAIN_SUFFIX, validate_label},
    time::rfc3339_unix as rfc3339,
};
use fedmesh_documents::{EffectiveLink, NodeRef};
use serde_json::{Map, Value, json};

use crate::{
    Error, Result,
    addresses::{assign, fnv1a},
    view::{NodeView, Peer, RenderOptions},
};

/// `networking.istio.io/v1`.
pub const NETWORKING_V1: &str = "networking.istio.io/v1";
/// `security.istio.io/v1`.
pub const SECURITY_V1: &str = "security.istio.io/v1";
/// Label on every object fedmesh renders: `app.kubernetes.io/managed-by: fedmesh`.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming the collaboration.
pub const COLLABORATION: &str = "fedmesh.io/collaboration";
/// Label naming the peer, `<org>.<node>`, or [`BASELINE`].
pub const PEER: &str = "fedmesh.io/peer";
/// Label saying `outbound`, `inbound` or [`BASELINE`].
pub const DIRECTION: &str = "fedmesh.io/direction";
/// The [`PEER`] and [`DIRECTION`] value of collaboration-wide objects.
pub const BASELINE: &str = "baseline";
/// Annotation: the ids of the links an object serves, comma-separated.
pub const LINKS: &str = "fedmesh.io/links";
/// Annotation: who approved those links.
pub const APPROVED_BY: &str = "fedmesh.io/approved-by";
/// Annotation: the earliest expiry (RFC 3339) among those links; the object changes or goes
/// away by then.
pub const EXPIRES: &str = "fedmesh.io/expires";
/// Annotation: what the object is for, in a sentence.
pub const PURPOSE: &str = "fedmesh.io/purpose";

/// The longest object name rendered; longer names are shortened and end in a hash.
const MAX_NAME: usize = 63;

/// What [`render`] produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// Full Kubernetes objects, in a fixed order: baseline, then per peer (sorted) outbound and
    /// inbound.
    pub objects: Vec<Value>,
    /// The VIP of every peer this node dials. Persist it and pass it back as
    /// [`NodeView::vips`] so peers keep their VIPs.
    pub vips: BTreeMap<NodeRef, Ipv4Addr>,
    /// Peers this node may dial but has no gateway address for, with the reason; nothing
    /// outbound is rendered for them.
    pub skipped: BTreeMap<NodeRef, String>,
}

impl Rendered {
    /// The objects as one YAML stream, each document introduced by `---`.
    pub fn to_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for object in &self.objects {
            out.push_str("---\n");
            out.push_str(&to_yaml(object)?);
        }
        Ok(out)
    }
}

/// One object as YAML, keys sorted (so output never depends on map ordering features).
pub fn to_yaml(object: &Value) -> Result<String> {
    let mut sorted = object.clone();
    sorted.sort_all_objects();
    serde_saphyr::to_string(&sorted).map_err(|e| Error::Serialize(e.to_string()))
}

/// What identifies an object in a cluster: two renders are compared (and pruned) by this.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// The key of `object`, when it has all four fields.
    pub fn of(object: &Value) -> Option<Self> {
        let s = |v: &Value| v.as_str().map(str::to_owned);
        Some(Self {
            api_version: s(&object["apiVersion"])?,
            kind: s(&object["kind"])?,
            namespace: s(&object["metadata"]["namespace"])?,
            name: s(&object["metadata"]["name"])?,
        })
    }

    /// A file name for the object: `<kind>-<namespace>-<name>.yaml`, lowercase.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-{}.yaml",
            self.kind.to_lowercase(),
            self.namespace,
            self.name
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The name of the Secret holding `local`'s collaboration credentials in the mesh namespace;
/// rendered when [`NodeView::credentials`] is given, referenced by the gateways either way.
pub fn credential_secret_name(collab: &str, local: &NodeRef) -> String {
    short_name(&["fm", collab, &local.org, &local.node, "tls"])
}

/// Renders everything `view.local` needs for the links in force at `now`.
///
/// Pure: the same inputs give the same objects in the same order. Links that have expired at
/// `now` are left out; a link that does not concern the local node, belongs to another
/// collaboration or whose id does not match its terms is an error.
pub fn render(view: &NodeView, options: &RenderOptions, now: SystemTime) -> Result<Rendered> {
    options.validate()?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let links = check_view(view, now)?;

    let mut outbound: BTreeMap<&NodeRef, Vec<&EffectiveLink>> = BTreeMap::new();
    let mut inbound: BTreeMap<&NodeRef, Vec<&EffectiveLink>> = BTreeMap::new();
    for link in links {
        if link.terms.from == view.local {
            outbound.entry(&link.terms.to).or_default().push(link);
        } else {
            inbound.entry(&link.terms.from).or_default().push(link);
        }
    }
    let mut skipped = BTreeMap::new();
    outbound.retain(|peer, _| {
        let known = view.peers.contains_key(*peer) || view.carried.contains_key(*peer);
        if !known {
            skipped.insert(
                (*peer).clone(),
                "no gateway address is known for it".to_owned(),
            );
        }
        known
    });
    let vips = assign(
        &options.vip_pool,
        &view.vips,
        outbound.keys().map(|p| (*p).clone()),
    )?;

    let r = Renderer {
        view,
        options,
        secret: credential_secret_name(&view.collab, &view.local),
    };
    let mut objects = r.baseline()?;
    // Growing a large Vec frees large blocks, which is costly with some allocators.
    objects.reserve(6 * outbound.len() + 5 * inbound.len());
    let names = PeerNames::new(
        TrustDomain::new(&view.collab)?,
        view.members
            .iter()
            .map(|m| (m.org.as_str(), m.node.as_str())),
    );
    let services = default_services(&inbound, &view.services);
    let peers: BTreeSet<&NodeRef> = outbound.keys().chain(inbound.keys()).copied().collect();
    for peer in peers {
        if let Some(pod_ports) = view.carried.get(peer) {
            if let (Some(links), Some(vip)) = (outbound.get(peer), vips.get(peer)) {
                let hosts = names.of(&peer.org, &peer.node);
                objects.extend(r.carried_outbound(peer, *vip, hosts, links, pod_ports)?);
            }
            if let Some(links) = inbound.get(peer) {
                objects.extend(r.carried_inbound(peer, links)?);
            }
            continue;
        }
        if let (Some(links), Some(info), Some(vip)) =
            (outbound.get(peer), view.peers.get(peer), vips.get(peer))
        {
            let hosts = names.of(&peer.org, &peer.node);
            objects.extend(r.outbound(peer, info, *vip, hosts, links)?);
        }
        if let Some(links) = inbound.get(peer) {
            objects.extend(r.inbound(peer, links, &services)?);
        }
    }

    let mut seen = HashSet::with_capacity(objects.len());
    for object in &objects {
        let meta = &object["metadata"];
        let (kind, namespace, name) = (
            as_text(&object["kind"]),
            as_text(&meta["namespace"]),
            as_text(&meta["name"]),
        );
        if !seen.insert((kind, namespace, name)) {
            return Err(Error::View(format!(
                "two {kind} objects would be named {namespace}/{name}; rename an organisation or node"
            )));
        }
    }
    Ok(Rendered {
        objects,
        vips,
        skipped,
    })
}

/// Checks the view and returns the links in force at `now`.
fn check_view(view: &NodeView, now: u64) -> Result<Vec<&EffectiveLink>> {
    validate_label("collaboration", &view.collab)?;
    NodeRef::new(&view.local.org, &view.local.node)?;
    for service in view.services.values() {
        validate_label("service", service)?;
    }
    let mut links = Vec::with_capacity(view.links.len());
    for link in &view.links {
        let terms = &link.terms;
        terms.validate_shape()?;
        if terms.collab != view.collab {
            return Err(Error::View(format!(
                "link {} belongs to collaboration {:?}, not {:?}",
                terms.id, terms.collab, view.collab
            )));
        }
        if !terms.concerns(&view.local) {
            return Err(Error::View(format!(
                "link {} ({} -> {}) does not concern {}",
                terms.id, terms.from, terms.to, view.local
            )));
        }
        if now < terms.not_after {
            links.push(link);
        }
    }
    links.sort_by(|a, b| a.terms.id.cmp(&b.terms.id));
    links.dedup_by(|a, b| a.terms.id == b.terms.id);
    Ok(links)
}

/// The Service each inbound port goes to: the view's choice, else `fedmesh-<label>` when all
/// links agree on the port's label, else `fedmesh-<port>`.
fn default_services(
    inbound: &BTreeMap<&NodeRef, Vec<&EffectiveLink>>,
    explicit: &BTreeMap<u16, String>,
) -> BTreeMap<u16, String> {
    let mut labels: BTreeMap<u16, BTreeSet<Option<&str>>> = BTreeMap::new();
    for link in inbound.values().flatten() {
        for p in &link.terms.ports {
            labels.entry(p.port).or_default().insert(p.label.as_deref());
        }
    }
    labels
        .into_iter()
        .map(|(port, labels)| {
            let name = match (explicit.get(&port), labels.first()) {
                (Some(service), _) => service.clone(),
                (None, Some(Some(label))) if labels.len() == 1 => format!("fedmesh-{label}"),
                _ => format!("fedmesh-{port}"),
            };
            (port, name)
        })
        .collect()
}

/// The ports a group of links allows, with their ServiceEntry port names and the links that
/// allow each.
struct Ports<'a> {
    by_port: BTreeMap<u16, (String, Vec<&'a EffectiveLink>)>,
}

impl<'a> Ports<'a> {
    /// Port names are `tcp-<label>` ([`fedmesh_documents::PortSpec::name`]); a port whose links
    /// disagree on its label, or whose name another port also wants, is named `tcp-<port>`.
    fn of(links: &[&'a EffectiveLink]) -> Self {
        let mut labels: BTreeMap<u16, (BTreeSet<Option<&str>>, Vec<&'a EffectiveLink>)> =
            BTreeMap::new();
        for link in links {
            for p in &link.terms.ports {
                let entry = labels.entry(p.port).or_default();
                entry.0.insert(p.label.as_deref());
                entry.1.push(link);
            }
        }
        let mut names: BTreeMap<u16, String> = labels
            .iter()
            .map(|(port, (labels, _))| {
                let name = match labels.first() {
                    Some(Some(label)) if labels.len() == 1 => format!("tcp-{label}"),
                    _ => format!("tcp-{port}"),
                };
                (*port, name)
            })
            .collect();
        // Fall back to `tcp-<port>` until every name is unique; each round renames at least
        // one port, and `tcp-<port>` names are unique among themselves, so this ends.
        loop {
            let mut count: BTreeMap<&str, usize> = BTreeMap::new();
            for name in names.values() {
                *count.entry(name.as_str()).or_default() += 1;
            }
            let clash: Vec<u16> = names
                .iter()
                .filter(|(port, name)| count[name.as_str()] > 1 && **name != format!("tcp-{port}"))
                .map(|(port, _)| *port)
                .collect();
            if clash.is_empty() {
                break;
            }
            for port in clash {
                names.insert(port, format!("tcp-{port}"));
            }
        }
        let by_port = labels
            .into_iter()
            .map(|(port, (_, links))| (port, (names.remove(&port).unwrap_or_default(), links)))
            .collect();
        Self { by_port }
    }
}

struct Renderer<'a> {
    view: &'a NodeView,
    options: &'a RenderOptions,
    secret: String,
}

impl Renderer<'_> {
    fn collab(&self) -> &str {
        &self.view.collab
    }

    /// Collaboration-wide objects.
    fn baseline(&self) -> Result<Vec<Value>> {
        let o = self.options;
        let (mesh, algo) = (o.mesh_namespace.as_str(), o.algorithm_namespace.as_str());
        let name = short_name(&["fm", self.collab()]);
        let meta = Meta::new(self.collab(), None, BASELINE, &[])?;
        let mut objects = Vec::new();
        if let Some(c) = &self.view.credentials {
            let mut secret = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "data": {
                    "tls.crt": BASE64.encode(&c.cert_chain_pem),
                    "tls.key": BASE64.encode(&c.key_pem),
                    "ca.crt": BASE64.encode(&c.ca_pem),
                },
            });
            secret["metadata"] = meta.of(
                mesh,
                &self.secret,
                "this node's collaboration certificate, key and CA, for the fedmesh gateways only",
            );
            objects.push(secret);
        }
        objects.push(object(
            SECURITY_V1,
            "AuthorizationPolicy",
            meta.of(
                mesh,
                &short_name(&["fm", self.collab(), "ingress"]),
                "deny peers at the ingress gateway unless a per-peer policy allows them",
            ),
            json!({
                "selector": {"matchLabels": {"istio": o.ingress_gateway}},
                "action": "ALLOW",
            }),
        ));
        objects.push(object(
            SECURITY_V1,
            "AuthorizationPolicy",
            meta.of(
                algo,
                &name,
                "deny all traffic to algorithm pods unless a per-peer policy allows it",
            ),
            json!({}),
        ));
        objects.push(object(
            SECURITY_V1,
            "PeerAuthentication",
            meta.of(algo, &name, "algorithm pods accept mesh mTLS only"),
            json!({"mtls": {"mode": "STRICT"}}),
        ));
        let mut hosts = vec![
            "./*".to_owned(),
            format!("{mesh}/*"),
            format!("{}/*", o.istio_namespace),
        ];
        hosts.extend(
            o.sidecar_egress_namespaces
                .iter()
                .map(|ns| format!("{ns}/*")),
        );
        objects.push(object(
            NETWORKING_V1,
            "Sidecar",
            meta.of(
                algo,
                &name,
                "algorithm pods see only registered services; unknown destinations are refused",
            ),
            json!({
                "egress": [{"hosts": hosts}],
                "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
            }),
        ));
        let mut egress = json!([
            {"ports": [{"protocol": "TCP", "port": o.egress_port}]},
            {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            {"ports": [{"protocol": "TCP", "port": 15012}]},
        ]);
        egress[0]["to"] = Value::Array(vec![pods_in(mesh, "istio", &o.egress_gateway)]);
        egress[1]["to"] = Value::Array(vec![pods_in("kube-system", "k8s-app", "kube-dns")]);
        egress[2]["to"] = Value::Array(vec![pods_in(&o.istio_namespace, "app", "istiod")]);
        let mut spec = json!({"policyTypes": ["Ingress", "Egress"]});
        spec["podSelector"] = algorithm_pods(o);
        spec["egress"] = egress;
        objects.push(object(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            meta.of(
                algo,
                &name,
                "algorithm pods may reach only the fedmesh egress gateway, DNS and istiod, \
                 and nothing may reach them unless a per-peer policy allows it",
            ),
            spec,
        ));
        Ok(objects)
    }

    /// The objects that let the local node dial `peer`.
    fn outbound(
        &self,
        peer: &NodeRef,
        info: &Peer,
        vip: Ipv4Addr,
        hosts: Vec<String>,
        links: &[&EffectiveLink],
    ) -> Result<Vec<Value>> {
        let o = self.options;
        let mesh = o.mesh_namespace.as_str();
        let collab = self.collab();
        let id = SpiffeId::new(collab, &peer.org, &peer.node)?;
        let host = id.dns_name();
        let ports = Ports::of(links);
        let out = peer_name(collab, "out", peer, None);
        let egress = peer_name(collab, "egress", peer, None);
        let egress_host = o.mesh_service(&o.egress_gateway);
        let gateway_ref = format!("{mesh}/{egress}");
        let meta = Meta::new(collab, Some(peer), "outbound", links)?;

        let mut se_ports = Vec::new();
        let mut endpoint_ports = Map::new();
        let mut mesh_routes = Vec::new();
        let mut originate = Vec::new();
        let mut servers = Vec::new();
        let mut subsets = Vec::new();
        let mut gateway_routes = Vec::new();
        for (port, (port_name, port_links)) in &ports.by_port {
            let sni = sni(collab, &self.view.local, *port, peer)?;
            let subset = peer_name(collab, "egress", peer, Some(*port));
            se_ports.push(json!({"number": port, "name": port_name, "protocol": "TCP"}));
            endpoint_ports.insert(port_name.clone(), info.gateway.port.into());
            mesh_routes.push(json!({
                "match": [{"gateways": ["mesh"], "port": port}],
                "route": [{"destination": {
                    "host": egress_host, "subset": subset, "port": {"number": o.egress_port},
                }}],
            }));
            originate.push(json!({
                "port": {"number": port},
                "tls": {
                    "mode": "MUTUAL",
                    "credentialName": self.secret,
                    "sni": sni,
                    "subjectAltNames": [id.to_string()],
                },
            }));
            servers.push(json!({
                "port": {"number": o.egress_port, "name": format!("tls-p{port}"), "protocol": "TLS"},
                "hosts": [sni],
                "tls": {"mode": "ISTIO_MUTUAL"},
            }));
            subsets.push(json!({
                "name": subset,
                "trafficPolicy": {"portLevelSettings": [{
                    "port": {"number": o.egress_port},
                    "tls": {"mode": "ISTIO_MUTUAL", "sni": sni},
                }]},
            }));
            let purpose = format!("egress gateway: forward {sni} to {host}:{port}");
            gateway_routes.push(object(
                NETWORKING_V1,
                "VirtualService",
                Meta::new(collab, Some(peer), "outbound", port_links)?.of(mesh, &subset, &purpose),
                json!({
                    "hosts": [sni],
                    "gateways": [gateway_ref],
                    "exportTo": ["."],
                    "tcp": [{
                        "match": [{"gateways": [gateway_ref], "port": o.egress_port}],
                        "route": [{"destination": {"host": host, "port": {"number": port}}}],
                    }],
                }),
            ));
        }

        let mut se = json!({
            "hosts": hosts,
            "addresses": [vip.to_string()],
            "location": "MESH_EXTERNAL",
            "resolution": if info.gateway.is_ip() { "STATIC" } else { "DNS" },
            "endpoints": [{"address": info.gateway.host}],
            "exportTo": [".", o.algorithm_namespace],
        });
        se["ports"] = Value::Array(se_ports);
        se["endpoints"][0]["ports"] = Value::Object(endpoint_ports);
        let mut vs = json!({
            "hosts": hosts,
            "gateways": ["mesh"],
            "exportTo": [".", o.algorithm_namespace],
        });
        vs["tcp"] = Value::Array(mesh_routes);
        let mut dr = json!({"host": host, "exportTo": ["."]});
        dr["trafficPolicy"] = json!({});
        dr["trafficPolicy"]["portLevelSettings"] = Value::Array(originate);
        let mut gw = json!({"selector": {"istio": o.egress_gateway}});
        gw["servers"] = Value::Array(servers);
        let mut subset_rule =
            json!({"host": egress_host, "exportTo": [".", o.algorithm_namespace]});
        subset_rule["subsets"] = Value::Array(subsets);

        let se_meta = meta
            .clone()
            .label("networking.istio.io/enable-autoallocate-ip", "false");
        let mut objects = vec![
            object(
                NETWORKING_V1,
                "ServiceEntry",
                se_meta.of(
                    mesh,
                    &out,
                    &format!("{host}: VIP and approved ports of {peer}"),
                ),
                se,
            ),
            object(
                NETWORKING_V1,
                "VirtualService",
                meta.of(
                    mesh,
                    &out,
                    &format!("send algorithm traffic for {host} through the egress gateway"),
                ),
                vs,
            ),
            object(
                NETWORKING_V1,
                "DestinationRule",
                meta.of(
                    mesh,
                    &out,
                    &format!("egress gateway: mutual TLS to {peer} with this node's credentials"),
                ),
                dr,
            ),
            object(
                NETWORKING_V1,
                "Gateway",
                meta.of(
                    mesh,
                    &egress,
                    &format!("egress gateway: accept sidecar traffic for {peer}"),
                ),
                gw,
            ),
            object(
                NETWORKING_V1,
                "DestinationRule",
                meta.of(
                    mesh,
                    &egress,
                    &format!("sidecars: reach the egress gateway for {peer} by SNI"),
                ),
                subset_rule,
            ),
        ];
        objects.extend(gateway_routes);
        Ok(objects)
    }

    /// The objects that let `peer` dial the local node.
    fn inbound(
        &self,
        peer: &NodeRef,
        links: &[&EffectiveLink],
        services: &BTreeMap<u16, String>,
    ) -> Result<Vec<Value>> {
        let o = self.options;
        let (mesh, algo) = (o.mesh_namespace.as_str(), o.algorithm_namespace.as_str());
        let collab = self.collab();
        let id = SpiffeId::new(collab, &peer.org, &peer.node)?;
        let principal = id.to_string().trim_start_matches("spiffe://").to_owned();
        let ports = Ports::of(links);
        let name = peer_name(collab, "in", peer, None);
        let gateway_ref = format!("{mesh}/{name}");
        let meta = Meta::new(collab, Some(peer), "inbound", links)?;

        let mut servers = Vec::new();
        let mut routes = Vec::new();
        let mut rules = Vec::new();
        let mut algo_ports = Vec::new();
        let mut np_ports = Vec::new();
        for (port, (_, port_links)) in &ports.by_port {
            let sni = sni(collab, peer, *port, &self.view.local)?;
            let service = services
                .get(port)
                .cloned()
                .unwrap_or_else(|| format!("fedmesh-{port}"));
            let target = o.service_fqdn(&service, algo);
            servers.push(json!({
                "port": {"number": o.ingress_port, "name": format!("tls-p{port}"), "protocol": "TLS"},
                "hosts": [sni],
                "tls": {
                    "mode": "MUTUAL",
                    "credentialName": self.secret,
                    "subjectAltNames": [id.to_string()],
                    "minProtocolVersion": "TLSV1_2",
                },
            }));
            let purpose = format!("ingress gateway: forward {sni} to {target}:{port}");
            routes.push(object(
                NETWORKING_V1,
                "VirtualService",
                Meta::new(collab, Some(peer), "inbound", port_links)?.of(
                    mesh,
                    &peer_name(collab, "in", peer, Some(*port)),
                    &purpose,
                ),
                json!({
                    "hosts": [sni],
                    "gateways": [gateway_ref],
                    "exportTo": ["."],
                    "tcp": [{
                        "match": [{"port": o.ingress_port}],
                        "route": [{"destination": {"host": target, "port": {"number": port}}}],
                    }],
                }),
            ));
            rules.push(json!({
                "from": [{"source": {"principals": [principal]}}],
                "to": [{"operation": {"ports": [o.ingress_port.to_string()]}}],
                "when": [{"key": "connection.sni", "values": [sni]}],
            }));
            algo_ports.push(Value::String(port.to_string()));
            np_ports.push(json!({"protocol": "TCP", "port": port}));
        }

        let mut gw = json!({"selector": {"istio": o.ingress_gateway}});
        gw["servers"] = Value::Array(servers);
        let mut gw_policy = json!({
            "selector": {"matchLabels": {"istio": o.ingress_gateway}},
            "action": "ALLOW",
        });
        gw_policy["rules"] = Value::Array(rules);
        let mut algo_policy = json!({
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": [o.ingress_principal()]}}],
                "to": [{"operation": {}}],
            }],
        });
        algo_policy["rules"][0]["to"][0]["operation"]["ports"] = Value::Array(algo_ports);
        let mut np = json!({"policyTypes": ["Ingress"], "ingress": [{}]});
        np["podSelector"] = algorithm_pods(o);
        np["ingress"][0]["from"] = Value::Array(vec![pods_in(mesh, "istio", &o.ingress_gateway)]);
        np["ingress"][0]["ports"] = Value::Array(np_ports);

        let mut objects = vec![object(
            NETWORKING_V1,
            "Gateway",
            meta.of(
                mesh,
                &name,
                &format!("ingress gateway: accept {peer} (collaboration CA, its SPIFFE ID) by SNI"),
            ),
            gw,
        )];
        objects.extend(routes);
        objects.push(object(
            SECURITY_V1,
            "AuthorizationPolicy",
            meta.of(
                mesh,
                &name,
                &format!("ingress gateway: allow {peer} only on its approved ports"),
            ),
            gw_policy,
        ));
        objects.push(object(
            SECURITY_V1,
            "AuthorizationPolicy",
            meta.of(
                algo,
                &name,
                &format!("allow the ingress gateway to reach the ports approved for {peer}"),
            ),
            algo_policy,
        ));
        objects.push(object(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            meta.of(
                algo,
                &name,
                &format!("let the ingress gateway reach the ports approved for {peer}"),
            ),
            np,
        ));
        Ok(objects)
    }
}

impl Renderer<'_> {
    /// The objects that let algorithm pods dial `peer` through the local fedmesh agent, which
    /// carries the traffic over its relay (the peer, or this node, takes no inbound connection
    /// at a gateway). The sidecar's `REGISTRY_ONLY` still applies: the peer's names and VIP are
    /// a ServiceEntry whose endpoints are the agent pod's ports for this peer, reached with
    /// Istio mTLS; only algorithm pods may use those ports.
    fn carried_outbound(
        &self,
        peer: &NodeRef,
        vip: Ipv4Addr,
        hosts: Vec<String>,
        links: &[&EffectiveLink],
        pod_ports: &BTreeMap<u16, u16>,
    ) -> Result<Vec<Value>> {
        let o = self.options;
        let (mesh, algo) = (o.mesh_namespace.as_str(), o.algorithm_namespace.as_str());
        let collab = self.collab();
        let host = SpiffeId::new(collab, &peer.org, &peer.node)?.dns_name();
        let ports = Ports::of(links);
        let out = peer_name(collab, "out", peer, None);
        let meta = Meta::new(collab, Some(peer), "outbound", links)?;
        let mut se_ports = Vec::new();
        let mut agent_ports = Vec::new();
        let mut np_ports = Vec::new();
        for (port, (port_name, _)) in &ports.by_port {
            let pod = pod_ports.get(port).ok_or_else(|| {
                Error::View(format!(
                    "the agent carries {peer} but has no pod port for its port {port}"
                ))
            })?;
            se_ports.push(json!({
                "number": port, "name": port_name, "protocol": "TCP", "targetPort": pod,
            }));
            agent_ports.push(Value::String(pod.to_string()));
            np_ports.push(json!({"protocol": "TCP", "port": pod}));
        }
        let mut se = json!({
            "hosts": hosts,
            "addresses": [vip.to_string()],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "workloadSelector": {"labels": o.agent_labels},
            "exportTo": [".", algo],
        });
        se["ports"] = Value::Array(se_ports);
        let dr = json!({
            "host": host,
            "exportTo": [".", algo],
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
        });
        let mut deny = json!({
            "selector": {"matchLabels": o.agent_labels},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"notNamespaces": [algo]}}],
                "to": [{"operation": {}}],
            }],
        });
        deny["rules"][0]["to"][0]["operation"]["ports"] = Value::Array(agent_ports);
        let mut np = json!({"policyTypes": ["Egress"], "egress": [{}]});
        np["podSelector"] = algorithm_pods(o);
        np["egress"][0]["to"] = Value::Array(vec![pods_labelled(mesh, &o.agent_labels)]);
        np["egress"][0]["ports"] = Value::Array(np_ports);
        let se_meta = meta
            .clone()
            .label("networking.istio.io/enable-autoallocate-ip", "false");
        Ok(vec![
            object(
                NETWORKING_V1,
                "ServiceEntry",
                se_meta.of(
                    mesh,
                    &out,
                    &format!(
                        "{host}: VIP and approved ports of {peer}, carried by the fedmesh agent \
                         (its relay), not the gateways"
                    ),
                ),
                se,
            ),
            object(
                NETWORKING_V1,
                "DestinationRule",
                meta.of(
                    mesh,
                    &out,
                    &format!("sidecars: mesh mTLS to the fedmesh agent for {peer}"),
                ),
                dr,
            ),
            object(
                SECURITY_V1,
                "AuthorizationPolicy",
                meta.of(
                    mesh,
                    &out,
                    &format!(
                        "fedmesh agent: only algorithm pods may use the ports that carry {peer}"
                    ),
                ),
                deny,
            ),
            object(
                "networking.k8s.io/v1",
                "NetworkPolicy",
                meta.of(
                    algo,
                    &out,
                    &format!("let algorithm pods reach the fedmesh agent's ports for {peer}"),
                ),
                np,
            ),
        ])
    }

    /// The objects that let the local fedmesh agent, which receives `peer`'s links over its
    /// relay (admitting each stream by the owner-signed link), reach the approved ports of
    /// algorithm pods, through its own sidecar: the algorithm namespace's default deny still
    /// applies, and allows the agent's principal on exactly those ports.
    fn carried_inbound(&self, peer: &NodeRef, links: &[&EffectiveLink]) -> Result<Vec<Value>> {
        let o = self.options;
        let (mesh, algo) = (o.mesh_namespace.as_str(), o.algorithm_namespace.as_str());
        let collab = self.collab();
        let ports = Ports::of(links);
        let name = peer_name(collab, "in", peer, None);
        let meta = Meta::new(collab, Some(peer), "inbound", links)?;
        let algo_ports: Vec<Value> = ports
            .by_port
            .keys()
            .map(|p| Value::String(p.to_string()))
            .collect();
        let np_ports: Vec<Value> = ports
            .by_port
            .keys()
            .map(|p| json!({"protocol": "TCP", "port": p}))
            .collect();
        let mut policy = json!({
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": [o.agent_principal()]}}],
                "to": [{"operation": {}}],
            }],
        });
        policy["rules"][0]["to"][0]["operation"]["ports"] = Value::Array(algo_ports);
        let mut np = json!({"policyTypes": ["Ingress"], "ingress": [{}]});
        np["podSelector"] = algorithm_pods(o);
        np["ingress"][0]["from"] = Value::Array(vec![pods_labelled(mesh, &o.agent_labels)]);
        np["ingress"][0]["ports"] = Value::Array(np_ports);
        Ok(vec![
            object(
                SECURITY_V1,
                "AuthorizationPolicy",
                meta.of(
                    algo,
                    &name,
                    &format!(
                        "allow the fedmesh agent (which carries {peer}) to reach its approved ports"
                    ),
                ),
                policy,
            ),
            object(
                "networking.k8s.io/v1",
                "NetworkPolicy",
                meta.of(
                    algo,
                    &name,
                    &format!(
                        "let the fedmesh agent reach the ports approved for {peer}, which it carries"
                    ),
                ),
                np,
            ),
        ])
    }
}

/// A full object. `metadata` and `spec` are moved in: `json!` would deep-copy them.
fn object(api_version: &str, kind: &str, metadata: Value, spec: Value) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), api_version.into());
    m.insert("kind".into(), kind.into());
    m.insert("metadata".into(), metadata);
    m.insert("spec".into(), spec);
    Value::Object(m)
}

/// Labels and link annotations shared by a group of objects (one peer, one direction).
#[derive(Clone)]
struct Meta {
    labels: Map<String, Value>,
    annotations: Map<String, Value>,
}

impl Meta {
    fn new(
        collab: &str,
        peer: Option<&NodeRef>,
        direction: &str,
        links: &[&EffectiveLink],
    ) -> Result<Self> {
        let mut labels = Map::new();
        labels.insert(MANAGED_BY.into(), "fedmesh".into());
        labels.insert(COLLABORATION.into(), collab.into());
        let peer = peer.map_or_else(|| BASELINE.to_owned(), |p| format!("{}.{}", p.org, p.node));
        labels.insert(PEER.into(), peer.into());
        labels.insert(DIRECTION.into(), direction.into());
        let mut annotations = Map::new();
        if !links.is_empty() {
            let ids: BTreeSet<&str> = links.iter().map(|l| l.terms.id.as_str()).collect();
            let approvers: BTreeSet<&str> = links.iter().map(|l| l.approved_by.as_str()).collect();
            let expiry = links.iter().map(|l| l.terms.not_after).min().unwrap_or(0);
            let expires = rfc3339(expiry).ok_or_else(|| {
                Error::View(format!(
                    "link {} expires at {expiry}, which cannot be written as RFC 3339",
                    join(ids.iter().copied())
                ))
            })?;
            annotations.insert(LINKS.into(), join(ids).into());
            annotations.insert(APPROVED_BY.into(), join(approvers).into());
            annotations.insert(EXPIRES.into(), expires.into());
        }
        Ok(Self {
            labels,
            annotations,
        })
    }

    /// With one more label.
    fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// `metadata` of an object: the shared labels and annotations, plus what it is for.
    fn of(&self, namespace: &str, name: &str, purpose: &str) -> Value {
        let mut annotations = self.annotations.clone();
        annotations.insert(PURPOSE.into(), purpose.into());
        let mut m = Map::new();
        m.insert("name".into(), name.into());
        m.insert("namespace".into(), namespace.into());
        m.insert("labels".into(), Value::Object(self.labels.clone()));
        m.insert("annotations".into(), Value::Object(annotations));
        Value::Object(m)
    }
}

/// The algorithm pods that take part, by their vantage6 `role` label (never `{}`: a policy
/// selecting every pod would open vantage6's per-role default deny for all roles).
fn algorithm_pods(o: &RenderOptions) -> Value {
    json!({"matchExpressions": [{"key": "role", "operator": "In", "values": o.algorithm_roles}]})
}

/// A NetworkPolicy peer: pods carrying every label of `labels` in namespace `ns`.
fn pods_labelled(ns: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
        "podSelector": {"matchLabels": labels},
    })
}

/// A NetworkPolicy peer: pods labelled `key=value` in namespace `ns`.
fn pods_in(ns: &str, key: &str, value: &str) -> Value {
    json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
        "podSelector": {"matchLabels": {key: value}},
    })
}

/// The SNI of connections from `src` to `dst`'s port `port`:
/// `<src-node>.<src-org>.p<port>.<dst-node>.<dst-org>.<collab>.fedmesh`.
pub fn sni(collab: &str, src: &NodeRef, port: u16, dst: &NodeRef) -> Result<String> {
    let name = format!(
        "{}.{}.p{port}.{}.{}.{collab}.{TRUST_DOMAIN_SUFFIX}",
        src.node, src.org, dst.node, dst.org
    );
    if name.len() > 253 {
        return Err(Error::View(format!(
            "the SNI {name} is longer than 253 characters; use shorter organisation or node names"
        )));
    }
    Ok(name)
}

/// `fm-<collab>-<direction>-<org>-<node>[-p<port>]-<hash>`, at most 63 characters. The hash is
/// over the parts with an unambiguous separator, so `org-a/n1` and `org/a-n1` differ.
fn peer_name(collab: &str, direction: &str, peer: &NodeRef, port: Option<u16>) -> String {
    let port = port.map(|p| format!("p{p}"));
    let mut parts = vec!["fm", collab, direction, &peer.org, &peer.node];
    parts.extend(port.as_deref());
    let hash = fnv1a(parts.join("/").as_bytes()) & 0xffff_ffff;
    fit(&parts.join("-"), hash)
}

/// `parts` joined by `-`; shortened and hashed only when longer than 63 characters.
fn short_name(parts: &[&str]) -> String {
    let name = parts.join("-");
    if name.len() <= MAX_NAME {
        return name;
    }
    fit(&name, fnv1a(parts.join("/").as_bytes()) & 0xffff_ffff)
}

fn fit(readable: &str, hash: u64) -> String {
    let keep = MAX_NAME - 9;
    let head = readable.get(..keep.min(readable.len())).unwrap_or(readable);
    format!("{}-{hash:08x}", head.trim_end_matches('-'))
}

fn join<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}

fn as_text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_documents::LinkTerms;

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    fn link(from: &str, to: &str, ports: &[&str], not_after: u64) -> EffectiveLink {
        let ports = ports.iter().map(|p| p.parse().unwrap()).collect();
        EffectiveLink {
            terms: LinkTerms::new("c", n(from), n(to), ports, not_after, None).unwrap(),
            approved_by: "Owner".into(),
            approved_at: 0,
        }
    }

    fn view(links: Vec<EffectiveLink>) -> NodeView {
        let peer = |gw: &str| Peer {
            gateway: gw.parse().unwrap(),
        };
        NodeView {
            collab: "c".into(),
            local: n("a/n1"),
            members: ["a/n1", "b/n1", "b/n2"].into_iter().map(n).collect(),
            peers: BTreeMap::from([
                (n("b/n1"), peer("gw.b.example:443")),
                (n("b/n2"), peer("192.0.2.1:8443")),
            ]),
            links,
            services: BTreeMap::new(),
            vips: BTreeMap::new(),
            credentials: None,
            carried: BTreeMap::new(),
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    fn find<'a>(r: &'a Rendered, kind: &str, name: &str) -> &'a Value {
        r.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn names_are_short_unambiguous_and_stable() {
        let a = peer_name("c", "out", &n("org-a/n1"), None);
        let b = peer_name("c", "out", &n("org/a-n1"), None);
        assert!(a.starts_with("fm-c-out-org-a-n1-") && b.starts_with("fm-c-out-org-a-n1-"));
        assert_ne!(a, b);
        assert_eq!(a, peer_name("c", "out", &n("org-a/n1"), None));
        let long = "x".repeat(63);
        let name = peer_name(&long, "in", &n(&format!("{long}/{long}")), Some(65535));
        assert_eq!(name.len(), 63);
        assert_eq!(short_name(&["fm", "c"]), "fm-c");
        assert_eq!(short_name(&["fm", &long]).len(), 63);
    }

    #[test]
    fn port_names_stay_unique() {
        let l1 = link("a/n1", "b/n1", &["1:x", "2:x", "3:y"], 10);
        let l2 = link("a/n1", "b/n1", &["3:z", "4:5"], 10);
        let l3 = link("a/n1", "b/n1", &["5"], 10);
        let ports = Ports::of(&[&l1, &l2, &l3]);
        let names: Vec<(u16, &str)> = ports
            .by_port
            .iter()
            .map(|(p, (name, _))| (*p, name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                (1, "tcp-1"),
                (2, "tcp-2"),
                (3, "tcp-3"),
                (4, "tcp-4"),
                (5, "tcp-5")
            ]
        );
        let ok = link("a/n1", "b/n1", &["11366:mpc", "8080:flower"], 10);
        let names: Vec<String> = Ports::of(&[&ok])
            .by_port
            .into_values()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["tcp-flower", "tcp-mpc"]);
    }

    #[test]
    fn expired_links_render_nothing_and_foreign_links_are_errors() {
        let v = view(vec![link("a/n1", "b/n1", &["11366:mpc"], 100)]);
        let live = render(&v, &RenderOptions::default(), at(99)).unwrap();
        let expired = render(&v, &RenderOptions::default(), at(100)).unwrap();
        assert_eq!(live.objects.len(), 5 + 6);
        assert_eq!(expired.objects.len(), 5, "baseline only");
        assert!(expired.vips.is_empty());

        let foreign = view(vec![link("b/n1", "b/n2", &["1"], 100)]);
        let err = render(&foreign, &RenderOptions::default(), at(0)).unwrap_err();
        assert!(err.to_string().contains("does not concern a/n1"), "{err}");
    }

    #[test]
    fn peers_without_gateway_are_skipped_not_fatal() {
        let v = view(vec![
            link("a/n1", "z/n1", &["1"], 100),
            link("a/n1", "b/n1", &["1"], 100),
        ]);
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        assert_eq!(
            r.skipped,
            BTreeMap::from([(n("z/n1"), "no gateway address is known for it".into())])
        );
        assert_eq!(r.vips.keys().collect::<Vec<_>>(), [&n("b/n1")]);
    }

    #[test]
    fn outbound_objects_carry_the_link() {
        let l = link("a/n1", "b/n2", &["11366:mpc"], 4_102_444_800);
        let id = l.terms.id.clone();
        let mut v = view(vec![l]);
        v.vips.insert(n("b/n2"), Ipv4Addr::new(240, 241, 0, 9));
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        let name = peer_name("c", "out", &n("b/n2"), None);
        let se = find(&r, "ServiceEntry", &name);
        assert_eq!(
            se["spec"],
            json!({
                "hosts": ["n2.b.c.fedmesh"],
                "addresses": ["240.241.0.9"],
                "ports": [{"number": 11366, "name": "tcp-mpc", "protocol": "TCP"}],
                "location": "MESH_EXTERNAL",
                "resolution": "STATIC",
                "endpoints": [{"address": "192.0.2.1", "ports": {"tcp-mpc": 8443}}],
                "exportTo": [".", "vantage6-tasks"],
            })
        );
        let meta = &se["metadata"];
        assert_eq!(meta["labels"][PEER], "b.n2");
        assert_eq!(
            meta["labels"]["networking.istio.io/enable-autoallocate-ip"],
            "false"
        );
        assert_eq!(meta["annotations"][LINKS], id.as_str());
        assert_eq!(meta["annotations"][APPROVED_BY], "Owner");
        assert_eq!(meta["annotations"][EXPIRES], "2100-01-01T00:00:00Z");
        let dr = find(&r, "DestinationRule", &name);
        assert_eq!(
            dr["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"],
            json!({
                "mode": "MUTUAL",
                "credentialName": "fm-c-a-n1-tls",
                "sni": "n1.a.p11366.n2.b.c.fedmesh",
                "subjectAltNames": ["spiffe://c.fedmesh/org/b/node/n2"],
            })
        );
    }

    #[test]
    fn inbound_policy_binds_principal_port_and_sni() {
        let v = view(vec![link("b/n1", "a/n1", &["9092:flower"], 100)]);
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        let name = peer_name("c", "in", &n("b/n1"), None);
        let ap = r
            .objects
            .iter()
            .find(|o| {
                o["kind"] == "AuthorizationPolicy"
                    && o["metadata"]["name"] == name.as_str()
                    && o["metadata"]["namespace"] == "fedmesh"
            })
            .unwrap();
        assert_eq!(
            ap["spec"]["rules"],
            json!([{
                "from": [{"source": {"principals": ["c.fedmesh/org/b/node/n1"]}}],
                "to": [{"operation": {"ports": ["443"]}}],
                "when": [{"key": "connection.sni", "values": ["n1.b.p9092.n1.a.c.fedmesh"]}],
            }])
        );
        let vs = find(
            &r,
            "VirtualService",
            &peer_name("c", "in", &n("b/n1"), Some(9092)),
        );
        assert_eq!(
            vs["spec"]["tcp"][0]["route"][0]["destination"],
            json!({"host": "fedmesh-flower.vantage6-tasks.svc.cluster.local", "port": {"number": 9092}})
        );
    }

    #[test]
    fn secrets_only_with_credentials_and_only_in_the_mesh_namespace() {
        let mut v = view(vec![]);
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        assert!(r.objects.iter().all(|o| o["kind"] != "Secret"));
        v.credentials = Some(crate::Credentials {
            cert_chain_pem: "CERT".into(),
            key_pem: "KEY".into(),
            ca_pem: "CA".into(),
        });
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        let secret = find(&r, "Secret", "fm-c-a-n1-tls");
        assert_eq!(secret["metadata"]["namespace"], "fedmesh");
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(
            secret["data"],
            json!({"tls.crt": "Q0VSVA==", "tls.key": "S0VZ", "ca.crt": "Q0E="})
        );
    }

    #[test]
    fn a_peer_the_agent_carries_is_reached_through_the_agent_pod_under_mesh_policy() {
        let out = link("a/n1", "z/n1", &["11366:mpc"], 100);
        let inb = link("z/n1", "a/n1", &["9092:flower"], 100);
        let mut v = view(vec![out, inb]);
        // z/n1 has no gateway: not in `peers`, only carried.
        v.carried
            .insert(n("z/n1"), BTreeMap::from([(11366, 20_001)]));
        v.vips.insert(n("z/n1"), Ipv4Addr::new(240, 241, 0, 26));
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let out = peer_name("c", "out", &n("z/n1"), None);
        let agent = json!({
            "app.kubernetes.io/name": "fedmesh-agent",
            "app.kubernetes.io/instance": "agent",
        });
        assert_eq!(
            find(&r, "ServiceEntry", &out)["spec"],
            json!({
                "hosts": ["n1.z.c.fedmesh"],
                "addresses": ["240.241.0.26"],
                "ports": [{"number": 11366, "name": "tcp-mpc", "protocol": "TCP", "targetPort": 20001}],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "workloadSelector": {"labels": agent},
                "exportTo": [".", "vantage6-tasks"],
            })
        );
        assert_eq!(
            find(&r, "DestinationRule", &out)["spec"]["trafficPolicy"],
            json!({"tls": {"mode": "ISTIO_MUTUAL"}})
        );
        let policies: Vec<&Value> = r
            .objects
            .iter()
            .filter(|o| {
                o["kind"] == "AuthorizationPolicy" && o["metadata"]["labels"][PEER] == "z.n1"
            })
            .collect();
        assert_eq!(policies.len(), 2, "one per direction");
        assert_eq!(
            policies[0]["spec"],
            json!({
                "selector": {"matchLabels": agent},
                "action": "DENY",
                "rules": [{
                    "from": [{"source": {"notNamespaces": ["vantage6-tasks"]}}],
                    "to": [{"operation": {"ports": ["20001"]}}],
                }],
            }),
            "only algorithm pods may use the agent's ports for z/n1"
        );
        assert_eq!(
            policies[1]["spec"]["rules"],
            json!([{
                "from": [{"source": {"principals": ["cluster.local/ns/fedmesh/sa/agent-fedmesh-agent"]}}],
                "to": [{"operation": {"ports": ["9092"]}}],
            }]),
            "the agent, and only on the approved port, may reach algorithm pods"
        );
        assert_eq!(policies[1]["metadata"]["namespace"], "vantage6-tasks");
        // Nothing of the gateways for z/n1: no Gateway, no VirtualService.
        assert!(!r.objects.iter().any(|o| {
            matches!(o["kind"].as_str(), Some("Gateway" | "VirtualService"))
                && o["metadata"]["labels"][PEER] == "z.n1"
        }));

        // A dialled port without a pod port is a clear error.
        v.carried.insert(n("z/n1"), BTreeMap::new());
        let err = render(&v, &RenderOptions::default(), at(0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("has no pod port for its port 11366"),
            "{err}"
        );
    }

    #[test]
    fn yaml_is_deterministic_and_quotes_strings() {
        let v = view(vec![link("a/n1", "b/n1", &["11366:mpc"], 100)]);
        let r = render(&v, &RenderOptions::default(), at(0)).unwrap();
        let yaml = r.to_yaml().unwrap();
        assert_eq!(yaml, r.to_yaml().unwrap());
        assert!(
            yaml.starts_with("---\napiVersion: security.istio.io/v1\n"),
            "{yaml}"
        );
        assert!(yaml.contains("networking.istio.io/enable-autoallocate-ip: \"false\""));
        let back: Vec<Value> = yaml
            .split("---\n")
            .filter(|d| !d.is_empty())
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        assert_eq!(back, r.objects);
    }
}
