//! What [`crate::render()`] takes: one node's view of its collaboration, and the options that
//! say where things live in the node's cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use fedmesh_certs::id::validate_label;
use fedmesh_documents::{EffectiveLink, NodeRef};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, addresses::Pool};

/// Istio's own automatic VIP range (`PILOT_IP_AUTOALLOCATE_IPV4_PREFIX`); our pool must not
/// overlap it.
pub const ISTIO_AUTO_ALLOCATE_POOL: &str = "240.240.0.0/16";
/// The default VIP pool.
pub const DEFAULT_VIP_POOL: &str = "240.241.0.0/16";

/// One node's view of its collaboration: everything that decides which objects it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The collaboration id (trust domain `<collab>.fedmesh`).
    pub collab: String,
    /// The node the objects are for.
    pub local: NodeRef,
    /// Every node of the collaboration, `local` included. It decides which organisations have a
    /// name of their own ([`fedmesh_certs::id::PeerNames`]).
    pub members: BTreeSet<NodeRef>,
    /// Where the other nodes can be reached. A node this one dials must be here.
    pub peers: BTreeMap<NodeRef, Peer>,
    /// The links in force that concern `local` (both directions). Links that have expired at the
    /// render's `now` are left out.
    pub links: Vec<EffectiveLink>,
    /// Which Service in the algorithm namespace serves each local port peers may reach. A port
    /// not listed goes to `fedmesh-<label>` (when every link names it alike) or `fedmesh-<port>`.
    pub services: BTreeMap<u16, String>,
    /// The VIPs assigned in earlier renders (persisted by the caller, or pinned in the
    /// collaboration file); kept while still in the pool.
    pub vips: BTreeMap<NodeRef, Ipv4Addr>,
    /// This node's gateway credentials. When given, a `kubernetes.io/tls` Secret is rendered
    /// into the mesh namespace; when not, something else must create it under the same name.
    pub credentials: Option<Credentials>,
    /// Peers whose links this node's fedmesh agent carries instead of the gateways (over its
    /// relay: through a rendezvous, or directly to the peer's relay), because this node or the
    /// peer accepts no inbound connections at a gateway. Each maps the ports this node dials
    /// the peer on to the pod port the agent listens on for it (empty when the links only come
    /// in). A peer here needs no entry in `peers`, and is rendered only this way.
    pub carried: BTreeMap<NodeRef, BTreeMap<u16, u16>>,
}

/// Another node of the collaboration, as far as this node needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its advertised Istio ingress gateway.
    pub gateway: GatewayAddr,
}

/// A gateway's public `host:port`. The host is a DNS name or an IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayAddr {
    /// DNS name or IPv4 address.
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
}

impl GatewayAddr {
    /// Whether the host is an IPv4 address (then the ServiceEntry resolves statically).
    pub fn is_ip(&self) -> bool {
        self.host.parse::<Ipv4Addr>().is_ok()
    }
}

impl fmt::Display for GatewayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for GatewayAddr {
    type Err = String;

    /// Parses `gw.example.org:443` or `192.0.2.10:443`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or("expected host:port, e.g. gw.hospital.example:443")?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("the port is not a number in 1..=65535")?;
        if host.parse::<Ipv4Addr>().is_err() {
            if host.len() > 253 {
                return Err("the host name is longer than 253 characters".into());
            }
            let labels: Vec<&str> = host.split('.').collect();
            if labels.len() < 2 || labels.iter().any(|l| validate_label("host", l).is_err()) {
                return Err(
                    "the host is neither an IPv4 address nor a lowercase DNS name with a dot"
                        .into(),
                );
            }
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for GatewayAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<GatewayAddr> for String {
    fn from(g: GatewayAddr) -> Self {
        g.to_string()
    }
}

/// This node's collaboration credentials (PEM), used by both fedmesh gateways: the egress
/// gateway presents the certificate when it dials, the ingress gateway when it accepts, and both
/// verify the other side against the collaboration CA.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The node certificate (and any intermediates), PEM.
    pub cert_chain_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The collaboration CA, PEM.
    pub ca_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("cert_chain_pem", &self.cert_chain_pem.len())
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem.len())
            .finish()
    }
}

/// Where things live in the node's cluster. The defaults fit the fedmesh Helm chart and a
/// vantage6 v5 node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenderOptions {
    /// Namespace of the fedmesh gateways and credentials (Secrets never leave it).
    pub mesh_namespace: String,
    /// Namespace the algorithm pods run in (vantage6 `node.taskNamespace`).
    pub algorithm_namespace: String,
    /// Where peers' VIPs come from; must not overlap Istio's auto-allocation range.
    pub vip_pool: Pool,
    /// The ingress gateway: its `istio=` label value, Service name and ServiceAccount name.
    pub ingress_gateway: String,
    /// The port the ingress gateway terminates peers' TLS on (the pod's port).
    pub ingress_port: u16,
    /// The egress gateway: its `istio=` label value, Service name and ServiceAccount name.
    pub egress_gateway: String,
    /// The port sidecars reach the egress gateway on (the pod's port).
    pub egress_port: u16,
    /// The local mesh's trust domain (for the ingress gateway's in-mesh principal).
    pub mesh_trust_domain: String,
    /// The cluster DNS domain (`<svc>.<ns>.svc.<cluster_domain>`).
    pub cluster_domain: String,
    /// Where istiod runs (algorithm pods' sidecars must reach it on 15012).
    pub istio_namespace: String,
    /// Further namespaces whose Services algorithm pods may reach through their sidecar, e.g.
    /// the vantage6 node's (its own NetworkPolicies still decide what is allowed).
    pub sidecar_egress_namespaces: Vec<String>,
    /// The `role` label values of the algorithm pods that take part (vantage6 5 labels each
    /// algorithm pod `role: <action>`): the NetworkPolicies fedmesh renders select only these,
    /// never every pod, so the other roles keep vantage6's default deny.
    pub algorithm_roles: Vec<String>,
    /// The labels that select the fedmesh agent pod (in the mesh namespace): the endpoints of
    /// the ServiceEntries of peers the agent carries.
    pub agent_labels: BTreeMap<String, String>,
    /// The agent's ServiceAccount (in the mesh namespace): the in-mesh principal algorithm pods
    /// accept the links the agent carries from.
    pub agent_service_account: String,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            mesh_namespace: "fedmesh".into(),
            algorithm_namespace: "vantage6-tasks".into(),
            vip_pool: Pool::DEFAULT_VIPS,
            ingress_gateway: "fedmesh-ingress".into(),
            ingress_port: 443,
            egress_gateway: "fedmesh-egress".into(),
            egress_port: 15443,
            mesh_trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            istio_namespace: "istio-system".into(),
            sidecar_egress_namespaces: Vec::new(),
            algorithm_roles: vec!["central_compute".into(), "federated_compute".into()],
            // The fedmesh-agent chart installed as release `agent`.
            agent_labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "fedmesh-agent".into()),
                ("app.kubernetes.io/instance".into(), "agent".into()),
            ]),
            agent_service_account: "agent-fedmesh-agent".into(),
        }
    }
}

impl RenderOptions {
    /// Checks every option: namespaces and gateway names are DNS labels, ports are not 0, the
    /// pool does not overlap [`ISTIO_AUTO_ALLOCATE_POOL`].
    pub fn validate(&self) -> Result<()> {
        let label = |option: &'static str, value: &str| {
            validate_label(option, value).map_err(|e| Error::Option {
                option,
                reason: e.to_string(),
            })
        };
        label("mesh_namespace", &self.mesh_namespace)?;
        label("algorithm_namespace", &self.algorithm_namespace)?;
        label("ingress_gateway", &self.ingress_gateway)?;
        label("egress_gateway", &self.egress_gateway)?;
        label("istio_namespace", &self.istio_namespace)?;
        label("agent_service_account", &self.agent_service_account)?;
        if self.agent_labels.is_empty() {
            return Err(Error::Option {
                option: "agent_labels",
                reason: "name the labels of the fedmesh agent pod (an empty selector would \
                         select every pod of the mesh namespace)"
                    .into(),
            });
        }
        for (key, value) in &self.agent_labels {
            if key.is_empty() || key.len() > 253 || value.len() > 63 || value.contains('*') {
                return Err(Error::Option {
                    option: "agent_labels",
                    reason: format!("{key}={value} is not a Kubernetes label"),
                });
            }
        }
        for ns in &self.sidecar_egress_namespaces {
            label("sidecar_egress_namespaces", ns)?;
        }
        if self.algorithm_roles.is_empty() {
            return Err(Error::Option {
                option: "algorithm_roles",
                reason: "name at least one role (e.g. federated_compute)".into(),
            });
        }
        for role in &self.algorithm_roles {
            let ok = !role.is_empty()
                && role.len() <= 63
                && role
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && role.starts_with(|c: char| c.is_ascii_alphanumeric())
                && role.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(Error::Option {
                    option: "algorithm_roles",
                    reason: format!("{role:?} is not a Kubernetes label value"),
                });
            }
        }
        if self.mesh_namespace == self.algorithm_namespace {
            return Err(Error::Option {
                option: "algorithm_namespace",
                reason: format!(
                    "must differ from mesh_namespace {:?}: credentials never share a namespace \
                     with algorithm pods",
                    self.mesh_namespace
                ),
            });
        }
        for (option, port) in [
            ("ingress_port", self.ingress_port),
            ("egress_port", self.egress_port),
        ] {
            if port == 0 {
                return Err(Error::Option {
                    option,
                    reason: "port 0 is not a port; use 1..=65535".into(),
                });
            }
        }
        for (option, domain) in [
            ("mesh_trust_domain", &self.mesh_trust_domain),
            ("cluster_domain", &self.cluster_domain),
        ] {
            if domain
                .split('.')
                .any(|l| validate_label(option, l).is_err())
            {
                return Err(Error::Option {
                    option,
                    reason: format!("{domain:?} is not a lowercase DNS name"),
                });
            }
        }
        let istio: Pool = ISTIO_AUTO_ALLOCATE_POOL.parse()?;
        if self.vip_pool.overlaps(&istio) {
            return Err(Error::Option {
                option: "vip_pool",
                reason: format!(
                    "{} overlaps Istio's automatic VIP range {istio}; pick a range outside it, \
                     e.g. {DEFAULT_VIP_POOL}",
                    self.vip_pool
                ),
            });
        }
        Ok(())
    }

    /// `<name>.<mesh namespace>.svc.<cluster domain>`.
    pub(crate) fn mesh_service(&self, name: &str) -> String {
        self.service_fqdn(name, &self.mesh_namespace)
    }

    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub(crate) fn service_fqdn(&self, name: &str, namespace: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.cluster_domain)
    }

    /// The agent's identity inside the local mesh, as an Istio principal.
    pub(crate) fn agent_principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.mesh_trust_domain, self.mesh_namespace, self.agent_service_account
        )
    }

    /// The ingress gateway's identity inside the local mesh, as an Istio principal.
    pub(crate) fn ingress_principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.mesh_trust_domain, self.mesh_namespace, self.ingress_gateway
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_addresses_parse_and_refuse() {
        let g: GatewayAddr = "gw.org-b.example:443".parse().unwrap();
        assert_eq!(
            (g.host.as_str(), g.port, g.is_ip()),
            ("gw.org-b.example", 443, false)
        );
        assert!("192.0.2.7:8443".parse::<GatewayAddr>().unwrap().is_ip());
        for (bad, why) in [
            ("gw.example", "expected host:port"),
            ("gw.example:0", "1..=65535"),
            ("gw.example:x", "1..=65535"),
            ("GW.example:443", "lowercase DNS name"),
            ("gateway:443", "lowercase DNS name"),
        ] {
            let err = bad.parse::<GatewayAddr>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn default_options_are_valid_and_overlap_is_refused() {
        RenderOptions::default().validate().unwrap();
        assert_eq!(Pool::DEFAULT_VIPS, DEFAULT_VIP_POOL.parse().unwrap());
        let opts = RenderOptions {
            vip_pool: "240.0.0.0/8".parse().unwrap(),
            ..RenderOptions::default()
        };
        assert_eq!(
            opts.validate().unwrap_err().to_string(),
            "option vip_pool: 240.0.0.0/8 overlaps Istio's automatic VIP range 240.240.0.0/16; \
             pick a range outside it, e.g. 240.241.0.0/16"
        );
        let same = RenderOptions {
            algorithm_namespace: "fedmesh".into(),
            ..RenderOptions::default()
        };
        assert!(
            same.validate()
                .unwrap_err()
                .to_string()
                .contains("must differ")
        );
    }

    #[test]
    fn credentials_debug_hides_the_key() {
        let c = Credentials {
            cert_chain_pem: "C".into(),
            key_pem: "SECRET".into(),
            ca_pem: "A".into(),
        };
        assert!(!format!("{c:?}").contains("SECRET"));
    }
}
