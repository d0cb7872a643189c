//! The collaboration file: a human-writable YAML description of a collaboration, for GitOps and
//! tests. It stands in for the signed documents: whoever controls the file is the approver.
//!
//! ```yaml
//! collaboration: collab-x          # id, a DNS label; trust domain collab-x.fedmesh
//! owner: Dr. Alice Owner           # shown as approver of links without `approved_by`
//! members:
//!   - org: org-b                   # DNS label
//!     node: n1                     # DNS label
//!     gateway: gw.org-b.example:443    # its fedmesh ingress gateway; leave out when the node
//!                                  # accepts no inbound connections (its agent carries links)
//!     organization_id: 2           # optional, vantage6's id
//!     exposes:                     # ports its algorithms listen on
//!       - {port: 11366, label: mpc}                  # Service fedmesh-mpc (default)
//!       - {port: 9092, label: flower, service: superlink}
//! links:
//!   - from: org-a/n1               # who dials
//!     to: org-b/n1                 # who accepts; every port must be in its `exposes`
//!     ports: ["11366:mpc"]         # <port>[:<label>]
//!     expires: 2099-01-01T00:00:00Z    # RFC 3339; not in force from then on
//!     approved_by: Dr. Alice Owner # optional, defaults to `owner`
//!     task: {task_id: 42, parent_id: 40}  # optional
//! vips:                            # optional pins, <org>/<node>: address in options.vip_pool
//!   org-b/n1: 240.241.0.12
//! options: {}                      # optional RenderOptions (mesh_namespace, vip_pool, ...)
//! ```
//!
//! Unknown fields are errors, and so is every bad value, with the field and value named.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{SystemTime, UNIX_EPOCH},
};

use fedmesh_certs::{id::validate_label, time::parse_rfc3339};
use fedmesh_documents::{EffectiveLink, LinkTerms, NodeRef, PortSpec, TaskRef};
use serde::Deserialize;

use crate::{
    Error, Result,
    addresses::{PortRange, allocate_ports},
    view::{GatewayAddr, NodeView, Peer, RenderOptions},
};

/// A parsed and fully validated collaboration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollabFile {
    /// The collaboration id.
    pub collab: String,
    /// The owner, and default approver.
    pub owner: String,
    /// The member nodes.
    pub members: BTreeMap<NodeRef, Member>,
    /// Every link, expired or not, with its derived id.
    pub links: Vec<FileLink>,
    /// Pinned VIPs.
    pub vips: BTreeMap<NodeRef, Ipv4Addr>,
    /// Render options.
    pub options: RenderOptions,
}

/// A member node as the file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its fedmesh ingress gateway; none for a node that accepts no inbound connections (its
    /// links are carried by the fedmesh agents, through a rendezvous).
    pub gateway: Option<GatewayAddr>,
    /// vantage6's organisation id, when given.
    pub organization_id: Option<u64>,
    /// Ports its algorithms listen on, with the Service that serves each.
    pub exposes: BTreeMap<u16, Exposure>,
}

/// One exposed port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    /// Its label.
    pub label: Option<String>,
    /// The Service in the algorithm namespace, when not the default.
    pub service: Option<String>,
}

/// A link of the file: its terms and who approved them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLink {
    /// The terms, id derived with [`LinkTerms::new`].
    pub terms: LinkTerms,
    /// The approver.
    pub approved_by: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    collaboration: String,
    owner: String,
    members: Vec<RawMember>,
    #[serde(default)]
    links: Vec<RawLink>,
    #[serde(default)]
    vips: BTreeMap<String, String>,
    #[serde(default)]
    options: RenderOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    org: String,
    node: String,
    gateway: Option<String>,
    organization_id: Option<u64>,
    #[serde(default)]
    exposes: Vec<RawExposure>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExposure {
    port: i64,
    label: Option<String>,
    service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    from: String,
    to: String,
    ports: Vec<String>,
    expires: String,
    approved_by: Option<String>,
    task: Option<RawTask>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    task_id: u64,
    parent_id: Option<u64>,
}

fn field(field: impl Into<String>, value: impl Into<String>, reason: impl ToString) -> Error {
    Error::Field {
        field: field.into(),
        value: value.into(),
        reason: reason.to_string(),
    }
}

impl CollabFile {
    /// Parses and validates a collaboration file.
    pub fn parse(yaml: &str) -> Result<Self> {
        let raw: RawFile = serde_saphyr::from_str(yaml).map_err(|e| Error::Yaml(e.to_string()))?;
        validate_label("collaboration", &raw.collaboration)
            .map_err(|e| field("collaboration", &raw.collaboration, e))?;
        if raw.owner.trim().is_empty() {
            return Err(field("owner", &raw.owner, "must name the owner"));
        }
        raw.options.validate()?;

        let mut members = BTreeMap::new();
        for (i, m) in raw.members.into_iter().enumerate() {
            let at = |f: &str| format!("members[{i}].{f}");
            validate_label("organisation", &m.org).map_err(|e| field(at("org"), &m.org, e))?;
            validate_label("node", &m.node).map_err(|e| field(at("node"), &m.node, e))?;
            let node = NodeRef::new(&m.org, &m.node)?;
            let gateway: Option<GatewayAddr> = m
                .gateway
                .as_ref()
                .map(|g| g.parse().map_err(|e| field(at("gateway"), g, e)))
                .transpose()?;
            let mut exposes = BTreeMap::new();
            for (j, e) in m.exposes.into_iter().enumerate() {
                let at = |f: &str| format!("members[{i}].exposes[{j}].{f}");
                let port = u16::try_from(e.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| field(at("port"), e.port.to_string(), "not in 1..=65535"))?;
                if let Some(label) = &e.label {
                    let spec = format!("{port}:{label}");
                    spec.parse::<PortSpec>()
                        .map_err(|err| field(at("label"), label, err))?;
                }
                if let Some(service) = &e.service {
                    validate_label("service", service)
                        .map_err(|err| field(at("service"), service, err))?;
                }
                let exposure = Exposure {
                    label: e.label,
                    service: e.service,
                };
                if exposes.insert(port, exposure).is_some() {
                    return Err(field(at("port"), port.to_string(), "is listed twice"));
                }
            }
            let member = Member {
                gateway,
                organization_id: m.organization_id,
                exposes,
            };
            if members.insert(node.clone(), member).is_some() {
                return Err(field(at("node"), node.to_string(), "is listed twice"));
            }
        }

        let mut links = Vec::new();
        let mut ids = BTreeMap::new();
        for (i, l) in raw.links.into_iter().enumerate() {
            let at = |f: &str| format!("links[{i}].{f}");
            let member = |f: &str, v: &str| -> Result<NodeRef> {
                let node: NodeRef = v.parse().map_err(|e| field(at(f), v, e))?;
                if !members.contains_key(&node) {
                    return Err(field(at(f), v, "is not one of the members"));
                }
                Ok(node)
            };
            let from = member("from", &l.from)?;
            let to = member("to", &l.to)?;
            let exposed = &members[&to].exposes;
            let mut ports = Vec::new();
            for (j, p) in l.ports.iter().enumerate() {
                let at = format!("links[{i}].ports[{j}]");
                let spec: PortSpec = p.parse().map_err(|e| field(&at, p, e))?;
                let Some(exposure) = exposed.get(&spec.port) else {
                    let reason = format!("port {} is not in the exposes of {to}", spec.port);
                    return Err(field(at, p, reason));
                };
                if spec.label.is_some() && spec.label != exposure.label {
                    let exposed_as = exposure.label.as_deref().unwrap_or("<no label>");
                    let reason = format!("{to} exposes port {} as {exposed_as:?}", spec.port);
                    return Err(field(at, p, reason));
                }
                ports.push(spec);
            }
            let not_after =
                parse_rfc3339(&l.expires).map_err(|e| field(at("expires"), &l.expires, e))?;
            let task = l.task.map(|t| TaskRef {
                task_id: t.task_id,
                parent_id: t.parent_id,
            });
            let terms = LinkTerms::new(&raw.collaboration, from, to, ports, not_after, task)
                .map_err(|e| field(format!("links[{i}]"), format!("{} -> {}", l.from, l.to), e))?;
            if let Some(first) = ids.insert(terms.id.clone(), i) {
                return Err(field(
                    format!("links[{i}]"),
                    format!("{} -> {}", l.from, l.to),
                    format!("repeats links[{first}]"),
                ));
            }
            let approved_by = l.approved_by.unwrap_or_else(|| raw.owner.clone());
            links.push(FileLink { terms, approved_by });
        }

        let mut vips = BTreeMap::new();
        let mut taken = BTreeSet::new();
        for (node, ip) in raw.vips {
            let at = format!("vips.{node}");
            let key: NodeRef = node.parse().map_err(|e| field(&at, &node, e))?;
            if !members.contains_key(&key) {
                return Err(field(at, &node, "is not one of the members"));
            }
            let addr: Ipv4Addr = ip
                .parse()
                .map_err(|_| field(&at, &ip, "is not an IPv4 address"))?;
            if !raw.options.vip_pool.is_usable(addr) {
                let reason = format!(
                    "is not a usable address of vip_pool {}",
                    raw.options.vip_pool
                );
                return Err(field(at, &ip, reason));
            }
            if !taken.insert(addr) {
                return Err(field(at, &ip, "is pinned for another node too"));
            }
            vips.insert(key, addr);
        }

        Ok(Self {
            collab: raw.collaboration,
            owner: raw.owner,
            members,
            links,
            vips,
            options: raw.options,
        })
    }

    /// The view of node `local` at `now`: its peers, the links in force that concern it, the
    /// Services of its exposed ports, and the pinned VIPs. No credentials.
    pub fn view(&self, local: &NodeRef, now: SystemTime) -> Result<NodeView> {
        let me = self.members.get(local).ok_or_else(|| {
            let known: Vec<String> = self.members.keys().map(NodeRef::to_string).collect();
            Error::View(format!(
                "{local} is not a member of {}; members are {}",
                self.collab,
                known.join(", ")
            ))
        })?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let links = self
            .links
            .iter()
            .filter(|l| l.terms.concerns(local) && now < l.terms.not_after)
            .map(|l| EffectiveLink {
                terms: l.terms.clone(),
                approved_by: l.approved_by.clone(),
                // The file records no approval time.
                approved_at: 0,
            })
            .collect();
        // A pair whose ends both have a gateway links through the gateways; any other pair
        // through the fedmesh agents (and a rendezvous), each agent on pod ports of its own.
        let peers = self
            .members
            .iter()
            .filter(|(node, _)| *node != local)
            .filter_map(|(node, m)| {
                let gateway = me.gateway.as_ref().and(m.gateway.clone())?;
                Some((node.clone(), Peer { gateway }))
            })
            .collect::<BTreeMap<_, _>>();
        let carried_peers: BTreeSet<&NodeRef> = self
            .members
            .keys()
            .filter(|node| *node != local && !peers.contains_key(*node))
            .collect();
        let links: Vec<EffectiveLink> = links;
        let dialled = links
            .iter()
            .filter(|l| l.terms.from == *local && carried_peers.contains(&l.terms.to))
            .flat_map(|l| l.terms.ports.iter().map(|p| (l.terms.to.clone(), p.port)));
        let mut carried = allocate_ports(PortRange::DEFAULT, &BTreeMap::new(), dialled)?;
        for link in &links {
            let other = match link.terms.from == *local {
                true => &link.terms.to,
                false => &link.terms.from,
            };
            if carried_peers.contains(other) {
                carried.entry(other.clone()).or_default();
            }
        }
        let services = me
            .exposes
            .iter()
            .filter_map(|(port, e)| e.service.clone().map(|s| (*port, s)))
            .collect();
        Ok(NodeView {
            collab: self.collab.clone(),
            local: local.clone(),
            members: self.members.keys().cloned().collect(),
            peers,
            links,
            services,
            vips: self.vips.clone(),
            credentials: None,
            carried,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
collaboration: c
owner: Owner
members:
  - {org: a, node: n1, gateway: gw.a.example:443}
  - org: b
    node: n1
    gateway: gw.b.example:443
    exposes: [{port: 11366, label: mpc}, {port: 9092, service: superlink}]
links:
  - {from: a/n1, to: b/n1, ports: ['11366:mpc'], expires: '2099-01-01T00:00:00Z'}
  - {from: a/n1, to: b/n1, ports: ['9092'], expires: 2000-01-01T00:00:00Z, approved_by: Bob}
vips:
  b/n1: 240.241.0.12
";

    fn err(yaml: &str) -> String {
        CollabFile::parse(yaml).unwrap_err().to_string()
    }

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    #[test]
    fn a_good_file_parses_and_views_filter_expiry() {
        let f = CollabFile::parse(GOOD).unwrap();
        assert_eq!(f.links.len(), 2);
        assert_eq!(f.links[0].terms.not_after, 4_070_908_800);
        assert_eq!(f.links[0].approved_by, "Owner");
        assert_eq!(f.links[1].approved_by, "Bob");
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let v = f.view(&n("b/n1"), now).unwrap();
        assert_eq!(v.links.len(), 1, "the 2000 link has expired");
        assert_eq!(v.services, BTreeMap::from([(9092, "superlink".to_owned())]));
        assert_eq!(v.peers.keys().collect::<Vec<_>>(), [&n("a/n1")]);
        assert_eq!(v.vips[&n("b/n1")], Ipv4Addr::new(240, 241, 0, 12));
        let err = f.view(&n("z/n1"), now).unwrap_err().to_string();
        assert_eq!(
            err,
            "node view: z/n1 is not a member of c; members are a/n1, b/n1"
        );
    }

    #[test]
    fn bad_files_name_the_field_and_value() {
        let cases = [
            (
                GOOD.replace("owner: Owner", "owner: Owner\nowners: x"),
                "unknown field `owners`",
            ),
            (
                GOOD.replace("{org: a,", "{org: Org-A,"),
                r#"members[0].org = "Org-A": invalid organisation name "Org-A": must be lowercase, found 'O'"#,
            ),
            (
                GOOD.replace("gw.a.example:443", "gw.a.example"),
                r#"members[0].gateway = "gw.a.example": expected host:port"#,
            ),
            (
                GOOD.replace("port: 11366, label: mpc", "port: 70000, label: mpc"),
                r#"members[1].exposes[0].port = "70000": not in 1..=65535"#,
            ),
            (
                GOOD.replace("label: mpc}", "label: MPC}"),
                r#"members[1].exposes[0].label = "MPC""#,
            ),
            (
                GOOD.replace("['11366:mpc']", "['11366:mpc', 'x']"),
                r#"links[0].ports[1] = "x": invalid port: "x" is not a number"#,
            ),
            (
                GOOD.replace("['9092']", "['9093']"),
                r#"links[1].ports[0] = "9093": port 9093 is not in the exposes of b/n1"#,
            ),
            (
                GOOD.replace("['11366:mpc']", "['11366:flower']"),
                r#"links[0].ports[0] = "11366:flower": b/n1 exposes port 11366 as "mpc""#,
            ),
            (
                GOOD.replace("'2099-01-01T00:00:00Z'", "2099-13-01"),
                r#"links[0].expires = "2099-13-01": not an RFC 3339 time"#,
            ),
            (
                GOOD.replace(
                    "{from: a/n1, to: b/n1, ports: ['11366",
                    "{from: a/n9, to: b/n1, ports: ['11366",
                ),
                r#"links[0].from = "a/n9": is not one of the members"#,
            ),
            (
                GOOD.replace(
                    "{from: a/n1, to: b/n1, ports: ['11366",
                    "{from: b/n1, to: b/n1, ports: ['11366",
                ),
                "links[0] = \"b/n1 -> b/n1\": invalid link: a link from b/n1 to itself is not a peer link",
            ),
            (
                GOOD.replace("240.241.0.12", "240.240.0.12"),
                r#"vips.b/n1 = "240.240.0.12": is not a usable address of vip_pool 240.241.0.0/16"#,
            ),
            (
                format!("{GOOD}options: {{vip_pool: 240.241.0.0/12}}\n"),
                "address pool 240.241.0.0/12: host bits are set; did you mean 240.240.0.0/12?",
            ),
            (
                format!("{GOOD}options: {{vip_pool: 240.0.0.0/8}}\n"),
                "option vip_pool: 240.0.0.0/8 overlaps Istio's automatic VIP range",
            ),
            (
                format!("{GOOD}options: {{mesh_namespace: fedmesh, colour: blue}}\n"),
                "unknown field `colour`",
            ),
        ];
        for (yaml, expected) in cases {
            let got = err(&yaml);
            assert!(
                got.contains(expected),
                "expected {expected:?}\n got {got:?}"
            );
        }
    }

    #[test]
    fn repeated_links_and_members_are_refused() {
        let twice = GOOD.replace(
            "links:\n",
            "links:\n  - {from: a/n1, to: b/n1, ports: ['11366:mpc'], expires: '2099-01-01T00:00:00Z'}\n",
        );
        assert_eq!(
            err(&twice),
            r#"links[1] = "a/n1 -> b/n1": repeats links[0]"#
        );
        let member = GOOD.replace(
            "members:\n",
            "members:\n  - {org: a, node: n1, gateway: gw.a.example:443}\n",
        );
        assert_eq!(err(&member), r#"members[1].node = "a/n1": is listed twice"#);
    }
}
