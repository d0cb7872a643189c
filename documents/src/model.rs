//! The documents a collaboration is made of, as plain data.
//!
//! Times are Unix seconds. Every document names its collaboration, and is signed as a whole
//! (see [`crate::jws`]); nothing here is trusted until [`crate::Ledger`] has verified it.

use std::{collections::BTreeSet, fmt, str::FromStr};

use fedmesh_certs::id::validate_label;
use serde::{Deserialize, Serialize};

use crate::{
    Error, Result,
    runs::{LinkPolicy, RunAnnouncement, RunEnd},
};

/// Most ports one link may carry.
pub const MAX_PORTS_PER_LINK: usize = 32;
/// Most concurrent streams a link's budget may allow (the relay's per-connection ceiling).
pub const MAX_LINK_STREAMS: u32 = 16_384;
/// Most endpoints one advertisement may list.
pub const MAX_ENDPOINTS: usize = 8;
/// Most rendezvous servers a collaboration may list.
pub const MAX_RENDEZVOUS: usize = 8;
/// Default cap on a link's lifetime.
pub const DEFAULT_MAX_LINK_TTL_SECS: u64 = 7 * 24 * 3600;

/// A node of the collaboration: `<org>/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeRef {
    /// The organisation.
    pub org: String,
    /// The node within the organisation.
    pub node: String,
}

impl NodeRef {
    /// Builds a node reference, checking both labels.
    pub fn new(org: &str, node: &str) -> Result<Self> {
        validate_label("organisation", org)?;
        validate_label("node", node)?;
        Ok(Self {
            org: org.to_owned(),
            node: node.to_owned(),
        })
    }
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.node)
    }
}

impl FromStr for NodeRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (org, node) = s.split_once('/').ok_or_else(|| Error::Invalid {
            what: "node",
            reason: format!("{s:?} is not <org>/<node>"),
        })?;
        Self::new(org, node)
    }
}

impl TryFrom<String> for NodeRef {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<NodeRef> for String {
    fn from(n: NodeRef) -> Self {
        n.to_string()
    }
}

impl From<&fedmesh_certs::SpiffeId> for NodeRef {
    fn from(id: &fedmesh_certs::SpiffeId) -> Self {
        Self {
            org: id.org().to_owned(),
            node: id.node().to_owned(),
        }
    }
}

/// One TCP port of a link, with an optional label (`mpc`, `flower`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSpec {
    /// The port the algorithm listens on, 1..=65535.
    pub port: u16,
    /// What it is for; a lowercase DNS label of at most 15 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl PortSpec {
    /// The name Istio and Kubernetes use for this port: `tcp-<label>` or `tcp-<port>`.
    pub fn name(&self) -> String {
        match &self.label {
            Some(l) => format!("tcp-{l}"),
            None => format!("tcp-{}", self.port),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.port == 0 {
            return Err(Error::Invalid {
                what: "port",
                reason: "port 0 is not a port; use 1..=65535".into(),
            });
        }
        if let Some(label) = &self.label {
            validate_label("port label", label)?;
            if label.len() > 15 {
                return Err(Error::Invalid {
                    what: "port label",
                    reason: format!("{label:?} is longer than 15 characters"),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for PortSpec {
    /// `11365` or `11365:mpc`, as [`FromStr`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.label {
            Some(label) => write!(f, "{}:{label}", self.port),
            None => write!(f, "{}", self.port),
        }
    }
}

impl FromStr for PortSpec {
    type Err = Error;

    /// Parses `11365` or `11365:mpc`.
    fn from_str(s: &str) -> Result<Self> {
        let (port, label) = match s.split_once(':') {
            Some((p, l)) => (p, Some(l.to_owned())),
            None => (s, None),
        };
        let port: u32 = port.parse().map_err(|_| Error::Invalid {
            what: "port",
            reason: format!("{port:?} is not a number"),
        })?;
        let port = u16::try_from(port).map_err(|_| Error::Invalid {
            what: "port",
            reason: format!("{port} is out of range 1..=65535"),
        })?;
        let spec = Self { port, label };
        spec.validate()?;
        Ok(spec)
    }
}

/// The task a link serves (vantage6 task ids), so peers can be looked up per task.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskRef {
    /// The task id.
    pub task_id: u64,
    /// The parent task, for subtasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<u64>,
}

/// What a link allows: `from` may open TCP connections to `to` on `ports` until `not_after`,
/// within an optional budget (bytes carried, concurrent streams).
///
/// The id is derived from everything else ([`LinkTerms::derive_id`]), so an approval names
/// exactly the terms it approves, budget included. A link without a budget serializes exactly as
/// it did before budgets existed, so its id is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkTerms {
    /// `l-` and 16 hex digits of the terms' hash.
    pub id: String,
    /// The collaboration.
    pub collab: String,
    /// The node that dials.
    pub from: NodeRef,
    /// The node that accepts.
    pub to: NodeRef,
    /// The ports `from` may reach at `to`.
    pub ports: Vec<PortSpec>,
    /// Unix time after which the link is no longer in force.
    pub not_after: u64,
    /// The task the link serves, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
    /// Most bytes the link may carry over its life, both directions together; none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most streams (TCP connections) the link may carry at once; none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
}

impl LinkTerms {
    /// New terms with their derived id. Ports are sorted, so the same request gets the same id.
    pub fn new(
        collab: &str,
        from: NodeRef,
        to: NodeRef,
        mut ports: Vec<PortSpec>,
        not_after: u64,
        task: Option<TaskRef>,
    ) -> Result<Self> {
        ports.sort();
        let mut terms = Self {
            id: String::new(),
            collab: collab.to_owned(),
            from,
            to,
            ports,
            not_after,
            task,
            max_bytes: None,
            max_streams: None,
        };
        terms.validate_shape()?;
        terms.id = terms.derive_id();
        Ok(terms)
    }

    /// The same terms with a budget: at most `max_bytes` carried (both directions together) and
    /// at most `max_streams` streams at once. The id changes with the budget.
    pub fn with_budget(mut self, max_bytes: Option<u64>, max_streams: Option<u32>) -> Result<Self> {
        self.max_bytes = max_bytes;
        self.max_streams = max_streams;
        self.id = String::new();
        self.validate_shape()?;
        self.id = self.derive_id();
        Ok(self)
    }

    /// The id these terms must carry: a hash over their canonical JSON without the id.
    pub fn derive_id(&self) -> String {
        let mut unnamed = self.clone();
        unnamed.id = String::new();
        let digest = ring::digest::digest(&ring::digest::SHA256, &crate::jws::canonical(&unnamed));
        let hex: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("l-{hex}")
    }

    /// Whether `node` is one of the two ends.
    pub fn concerns(&self, node: &NodeRef) -> bool {
        self.from == *node || self.to == *node
    }

    /// Checks what can be checked without the collaboration: ports, labels, self-links, id.
    pub fn validate_shape(&self) -> Result<()> {
        if self.from == self.to {
            return Err(Error::Invalid {
                what: "link",
                reason: format!("a link from {} to itself is not a peer link", self.from),
            });
        }
        if self.ports.is_empty() {
            return Err(Error::Invalid {
                what: "link",
                reason: "a link needs at least one port".into(),
            });
        }
        if self.ports.len() > MAX_PORTS_PER_LINK {
            return Err(Error::Invalid {
                what: "link",
                reason: format!("{} ports; at most {MAX_PORTS_PER_LINK}", self.ports.len()),
            });
        }
        let mut seen = BTreeSet::new();
        for p in &self.ports {
            p.validate()?;
            if !seen.insert(p.port) {
                return Err(Error::Invalid {
                    what: "link",
                    reason: format!("port {} is listed twice", p.port),
                });
            }
        }
        if self.max_bytes == Some(0) {
            return Err(Error::Invalid {
                what: "link budget",
                reason: "a byte budget of 0 allows nothing; leave it out for no limit".into(),
            });
        }
        if let Some(streams) = self.max_streams
            && !(1..=MAX_LINK_STREAMS).contains(&streams)
        {
            return Err(Error::Invalid {
                what: "link budget",
                reason: format!(
                    "{streams} concurrent streams; allowed 1..={MAX_LINK_STREAMS} (leave it out for no limit)"
                ),
            });
        }
        if !self.id.is_empty() && self.id != self.derive_id() {
            return Err(Error::Invalid {
                what: "link",
                reason: format!(
                    "id {} does not match its terms (expected {})",
                    self.id,
                    self.derive_id()
                ),
            });
        }
        Ok(())
    }
}

/// An organisation's node admitted to the collaboration.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// The organisation.
    pub org: String,
    /// The node.
    pub node: String,
    /// The organisation's numeric id in vantage6, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<u64>,
}

impl Member {
    /// The member as a node reference.
    pub fn node_ref(&self) -> NodeRef {
        NodeRef {
            org: self.org.clone(),
            node: self.node.clone(),
        }
    }
}

/// Defaults the owner sets for the whole collaboration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollabPolicy {
    /// Longest a link may be approved for, in seconds.
    pub max_link_ttl_secs: u64,
    /// Whether a link is in force only once the receiving node consented.
    pub require_consent: bool,
}

impl Default for CollabPolicy {
    fn default() -> Self {
        Self {
            max_link_ttl_secs: DEFAULT_MAX_LINK_TTL_SECS,
            require_consent: false,
        }
    }
}

/// An EC P-256 public key as a JWK (RFC 7517), the form owners' keys travel in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    /// Always `EC`.
    pub kty: String,
    /// Always `P-256`.
    pub crv: String,
    /// X coordinate, base64url.
    pub x: String,
    /// Y coordinate, base64url.
    pub y: String,
}

/// The collaboration itself: its CA, its owner's key, its members and policy.
/// Signed by the owner; a newer `version` replaces an older one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collaboration {
    /// The collaboration id (a DNS label); its trust domain is `<id>.fedmesh`.
    pub id: String,
    /// Increases with every change.
    pub version: u64,
    /// Who owns it (shown as the approver of links).
    pub owner_name: String,
    /// The owner's signing key.
    pub owner_key: PublicJwk,
    /// The collaboration CA certificate, PEM.
    pub ca_pem: String,
    /// The admitted nodes.
    pub members: Vec<Member>,
    /// Defaults.
    pub policy: CollabPolicy,
    /// When this version was signed.
    pub issued_at: u64,
    /// Rendezvous servers its nodes meet at when a peer accepts no inbound connections, in order
    /// of preference. Absent from documents signed before rendezvous servers existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rendezvous: Vec<RendezvousServer>,
}

/// A rendezvous server the owner lists: where nodes that accept no inbound connections meet.
/// It forwards opaque datagrams between members and cannot read, forge or widen a link; nodes
/// trust it only by the pin the owner signed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RendezvousServer {
    /// Its `host:port`: QUIC on UDP, and the TLS/TCP carrier on the same TCP port.
    pub address: String,
    /// Lower-case hex SHA-256 of its server certificate (DER).
    pub pin_sha256: String,
}

impl RendezvousServer {
    /// Checks the shape: a `host:port` address and a 64-digit lower-case hex pin.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Error::Invalid {
            what: "rendezvous server",
            reason,
        };
        if !is_host_port(&self.address) {
            return Err(invalid(format!(
                "address {:?} is not host:port",
                self.address
            )));
        }
        if self.pin_sha256.len() != 64
            || !self
                .pin_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(format!(
                "pin {:?} of {} is not 64 lower-case hex digits (SHA-256 of its certificate)",
                self.pin_sha256, self.address
            )));
        }
        Ok(())
    }
}

/// Whether `address` is `host:port` with a port in 1..=65535 and a non-empty host.
fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && matches!(port.parse::<u16>(), Ok(p) if p > 0),
        None => false,
    }
}

impl Collaboration {
    /// Checks the rendezvous list: bounded, each server well formed, none listed twice.
    pub fn validate_rendezvous(&self) -> Result<()> {
        if self.rendezvous.len() > MAX_RENDEZVOUS {
            return Err(Error::Invalid {
                what: "collaboration",
                reason: format!(
                    "{} rendezvous servers; at most {MAX_RENDEZVOUS}",
                    self.rendezvous.len()
                ),
            });
        }
        let mut seen = BTreeSet::new();
        for r in &self.rendezvous {
            r.validate()?;
            if !seen.insert(r.address.as_str()) {
                return Err(Error::Invalid {
                    what: "collaboration",
                    reason: format!("rendezvous server {} is listed twice", r.address),
                });
            }
        }
        Ok(())
    }

    /// The member for `node`, if admitted.
    pub fn member(&self, node: &NodeRef) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.org == node.org && m.node == node.node)
    }
}

/// One port a node exposes to its peers, as the node announces it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Exposure {
    /// The port.
    pub port: u16,
    /// Its label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// One way to reach a node, as it advertises it. Kinds this agent does not know (a newer
/// agent's) are kept as [`Endpoint::Unknown`] and never dialled, so an advertisement stays
/// readable across versions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Endpoint {
    /// The node's QUIC relay, accepting connections directly: UDP `host:port`.
    Quic {
        /// `host:port`.
        address: String,
    },
    /// The node's Istio ingress gateway: TCP `host:port`.
    IstioGateway {
        /// `host:port`.
        address: String,
    },
    /// The node accepts no inbound connections: peers reach it through the collaboration's
    /// rendezvous servers (listed in the owner-signed [`Collaboration`]).
    Rendezvous,
    /// A kind this agent does not know.
    #[serde(other)]
    Unknown,
}

/// Where a node can be reached, signed by the node itself.
///
/// Documents signed before endpoints were typed carried `relay` and `gateway` fields; they are
/// still read (as a [`Endpoint::Quic`] and an [`Endpoint::IstioGateway`]) and never written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AdvertisementWire")]
pub struct Advertisement {
    /// The collaboration.
    pub collab: String,
    /// The node advertising.
    pub node: NodeRef,
    /// Where peers reach it, one entry per transport.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Ports its algorithms expose.
    #[serde(default)]
    pub exposes: Vec<Exposure>,
    /// A random id the agent draws at every start: two instances advertising one node (a copied
    /// state directory) show up as two instance ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// When it was signed; a newer advertisement replaces an older one.
    pub issued_at: u64,
}

impl Advertisement {
    /// The QUIC relay address, if it advertises one.
    pub fn quic(&self) -> Option<&str> {
        self.endpoints.iter().find_map(|e| match e {
            Endpoint::Quic { address } => Some(address.as_str()),
            _ => None,
        })
    }

    /// The Istio ingress gateway address, if it advertises one.
    pub fn istio_gateway(&self) -> Option<&str> {
        self.endpoints.iter().find_map(|e| match e {
            Endpoint::IstioGateway { address } => Some(address.as_str()),
            _ => None,
        })
    }

    /// Whether it asks peers to reach it through a rendezvous server.
    pub fn via_rendezvous(&self) -> bool {
        self.endpoints.contains(&Endpoint::Rendezvous)
    }

    /// Checks the shape: a bounded number of endpoints, each a `host:port`. An advertisement may
    /// list no direct endpoint (a node that only dials out).
    pub fn validate_shape(&self) -> Result<()> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(Error::Invalid {
                what: "advertisement",
                reason: format!(
                    "{} endpoints; at most {MAX_ENDPOINTS}",
                    self.endpoints.len()
                ),
            });
        }
        for e in &self.endpoints {
            if let Endpoint::Quic { address } | Endpoint::IstioGateway { address } = e
                && !is_host_port(address)
            {
                return Err(Error::Invalid {
                    what: "advertisement",
                    reason: format!("endpoint address {address:?} is not host:port"),
                });
            }
        }
        Ok(())
    }
}

/// What an advertisement may look like on the wire: today's typed endpoints, or the
/// `relay`/`gateway` fields of documents signed before them.
#[derive(Deserialize)]
struct AdvertisementWire {
    collab: String,
    node: NodeRef,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    relay: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    exposes: Vec<Exposure>,
    #[serde(default)]
    instance: Option<String>,
    issued_at: u64,
}

impl From<AdvertisementWire> for Advertisement {
    fn from(w: AdvertisementWire) -> Self {
        let mut endpoints = w.endpoints;
        endpoints.extend(w.relay.map(|address| Endpoint::Quic { address }));
        endpoints.extend(w.gateway.map(|address| Endpoint::IstioGateway { address }));
        Self {
            collab: w.collab,
            node: w.node,
            endpoints,
            exposes: w.exposes,
            instance: w.instance,
            issued_at: w.issued_at,
        }
    }
}

/// A request for a link, by a member node or the owner. Not in force by itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequest {
    /// The terms asked for.
    pub terms: LinkTerms,
    /// Who asked (`org/node` or the owner's name).
    pub requested_by: String,
    /// When.
    pub requested_at: u64,
}

/// The owner's signature on a link's terms: the link is in force until it expires or is revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The terms approved, in full.
    pub terms: LinkTerms,
    /// The owner's name.
    pub approved_by: String,
    /// When.
    pub approved_at: u64,
    /// The highest revocation number the owner had seen when approving (0: none). A node that
    /// has seen fewer knows revocations are being withheld from it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revocations: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The receiving node's consent or veto.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The node accepts the link.
    Consent,
    /// The node refuses the link; it is not in force however it was approved.
    Veto,
}

/// A receiving node's decision on a link, signed by that node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The collaboration.
    pub collab: String,
    /// The link decided on.
    pub link_id: String,
    /// The deciding node (must be the link's `to`).
    pub by: NodeRef,
    /// Consent or veto.
    pub verdict: Verdict,
    /// Why, in the sysadmin's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When; the latest decision counts.
    pub at: u64,
}

/// The owner's revocation of links, certificate serials and nodes. Revocations add up: what one
/// lists stays revoked, so two owner commands revoking at the same time never conflict.
///
/// Each is numbered one above the highest number its signer had seen (two made at the same time
/// may share a number), so the numbers a node sees run 1, 2, 3, ... without a gap: a gap, or an
/// owner document naming a higher number than a node has seen, means revocations are being
/// withheld from it. (Lists signed before revocations added up were cumulative; read as
/// additions they mean the same.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The collaboration.
    pub collab: String,
    /// One above the highest revocation number the signer had seen; at least 1.
    pub number: u64,
    /// Revoked link ids.
    #[serde(default)]
    pub links: Vec<String>,
    /// Revoked certificate serials (hex).
    #[serde(default)]
    pub serials: Vec<String>,
    /// Revoked nodes: no link to or from them is in force.
    #[serde(default)]
    pub nodes: Vec<NodeRef>,
    /// When.
    pub issued_at: u64,
}

/// The owner's grant of a one-time join token for one node (the hub stores only its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    /// The collaboration.
    pub collab: String,
    /// The node that may enroll with it.
    pub node: NodeRef,
    /// Hex SHA-256 of the token's secret.
    pub secret_sha256: String,
    /// Unix time after which it is void.
    pub not_after: u64,
}

/// The owner's checkpoint: everything revoked so far, folded into one document, so the
/// revocations it covers (and the links they ended) can be dropped from the history.
///
/// Links in force are not restated: their approvals are already the smallest owner-signed form
/// of them, and stay. A newer checkpoint (higher `number`) replaces an older one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The collaboration.
    pub collab: String,
    /// One above the latest checkpoint the owner had seen.
    pub number: u64,
    /// Revocations numbered 1 to this are folded in.
    pub revocations: u64,
    /// Revoked link ids (links that expired are left out: they can never be in force again).
    #[serde(default)]
    pub links: Vec<String>,
    /// Revoked certificate serials (hex).
    #[serde(default)]
    pub serials: Vec<String>,
    /// Revoked nodes.
    #[serde(default)]
    pub nodes: Vec<NodeRef>,
    /// When.
    pub issued_at: u64,
}

impl Checkpoint {
    /// What of `r` this checkpoint leaves out, if anything: a revoked link that is neither
    /// listed nor `expired`, a serial or a node. A checkpoint that folds `r` in must leave out
    /// nothing, or dropping `r` would lose a revocation.
    pub fn omits(&self, r: &Revocation, expired: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(link) = r
            .links
            .iter()
            .find(|l| !self.links.contains(l) && !expired(l))
        {
            return Some(format!("link {link}"));
        }
        if let Some(serial) = r
            .serials
            .iter()
            .find(|s| !self.serials.iter().any(|c| c.eq_ignore_ascii_case(s)))
        {
            return Some(format!("certificate serial {serial}"));
        }
        r.nodes
            .iter()
            .find(|n| !self.nodes.contains(n))
            .map(|n| format!("node {n}"))
    }
}

/// Any signed document, tagged with its kind inside the signed payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum Document {
    /// [`Collaboration`].
    Collaboration(Collaboration),
    /// [`Advertisement`].
    Advertisement(Advertisement),
    /// [`LinkRequest`].
    LinkRequest(LinkRequest),
    /// [`Approval`].
    Approval(Approval),
    /// [`Decision`].
    Decision(Decision),
    /// [`Revocation`].
    Revocation(Revocation),
    /// [`JoinGrant`].
    JoinGrant(JoinGrant),
    /// [`Checkpoint`].
    Checkpoint(Checkpoint),
    /// [`LinkPolicy`] (owner-signed).
    LinkPolicy(LinkPolicy),
    /// [`RunAnnouncement`] (signed by the node the run is at).
    RunAnnouncement(RunAnnouncement),
    /// [`RunEnd`] (signed by the node the run was at).
    RunEnd(RunEnd),
}

/// The kinds of [`Document`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    /// [`Collaboration`].
    Collaboration,
    /// [`Advertisement`].
    Advertisement,
    /// [`LinkRequest`].
    LinkRequest,
    /// [`Approval`].
    Approval,
    /// [`Decision`].
    Decision,
    /// [`Revocation`].
    Revocation,
    /// [`JoinGrant`].
    JoinGrant,
    /// [`Checkpoint`].
    Checkpoint,
    /// [`LinkPolicy`].
    LinkPolicy,
    /// [`RunAnnouncement`].
    RunAnnouncement,
    /// [`RunEnd`].
    RunEnd,
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Collaboration => "collaboration",
            Self::Advertisement => "advertisement",
            Self::LinkRequest => "link request",
            Self::Approval => "approval",
            Self::Decision => "decision",
            Self::Revocation => "revocation",
            Self::JoinGrant => "join grant",
            Self::Checkpoint => "checkpoint",
            Self::LinkPolicy => "link policy",
            Self::RunAnnouncement => "run announcement",
            Self::RunEnd => "run end",
        };
        f.write_str(s)
    }
}

impl Document {
    /// The document's kind.
    pub fn kind(&self) -> DocKind {
        match self {
            Self::Collaboration(_) => DocKind::Collaboration,
            Self::Advertisement(_) => DocKind::Advertisement,
            Self::LinkRequest(_) => DocKind::LinkRequest,
            Self::Approval(_) => DocKind::Approval,
            Self::Decision(_) => DocKind::Decision,
            Self::Revocation(_) => DocKind::Revocation,
            Self::JoinGrant(_) => DocKind::JoinGrant,
            Self::Checkpoint(_) => DocKind::Checkpoint,
            Self::LinkPolicy(_) => DocKind::LinkPolicy,
            Self::RunAnnouncement(_) => DocKind::RunAnnouncement,
            Self::RunEnd(_) => DocKind::RunEnd,
        }
    }

    /// The collaboration it belongs to.
    pub fn collab(&self) -> &str {
        match self {
            Self::Collaboration(c) => &c.id,
            Self::Advertisement(a) => &a.collab,
            Self::LinkRequest(r) => &r.terms.collab,
            Self::Approval(a) => &a.terms.collab,
            Self::Decision(d) => &d.collab,
            Self::Revocation(r) => &r.collab,
            Self::JoinGrant(g) => &g.collab,
            Self::Checkpoint(c) => &c.collab,
            Self::LinkPolicy(p) => &p.collab,
            Self::RunAnnouncement(a) => &a.collab,
            Self::RunEnd(e) => &e.collab,
        }
    }

    /// What it is about, as the hub indexes it: a link id, a node, a number, the collaboration.
    pub fn subject(&self) -> String {
        match self {
            Self::Collaboration(c) => c.id.clone(),
            Self::Advertisement(a) => a.node.to_string(),
            Self::LinkRequest(r) => r.terms.id.clone(),
            Self::Approval(a) => a.terms.id.clone(),
            Self::Decision(d) => d.link_id.clone(),
            Self::Revocation(r) => r.number.to_string(),
            Self::JoinGrant(g) => g.node.to_string(),
            Self::Checkpoint(c) => c.number.to_string(),
            Self::LinkPolicy(p) => p.name.clone(),
            Self::RunAnnouncement(a) => crate::runs::run_key(&a.node, a.task.task_id),
            Self::RunEnd(e) => crate::runs::run_key(&e.node, e.task_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeRef {
        s.parse().unwrap()
    }

    #[test]
    fn port_specs_parse_and_refuse() {
        assert_eq!(
            "11365:mpc".parse::<PortSpec>().unwrap(),
            PortSpec {
                port: 11365,
                label: Some("mpc".into())
            }
        );
        assert_eq!("8080".parse::<PortSpec>().unwrap().name(), "tcp-8080");
        assert!(
            "0".parse::<PortSpec>()
                .unwrap_err()
                .to_string()
                .contains("port 0")
        );
        assert!(
            "65536"
                .parse::<PortSpec>()
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        assert!(
            "x".parse::<PortSpec>()
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
        assert!("1:MPC".parse::<PortSpec>().is_err());
        for text in ["11365:mpc", "8080"] {
            assert_eq!(text.parse::<PortSpec>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn link_ids_are_derived_from_terms() {
        let ports = vec!["2:b".parse().unwrap(), "1:a".parse().unwrap()];
        let t = LinkTerms::new("c", n("a/n1"), n("b/n1"), ports, 100, None).unwrap();
        assert_eq!(t.ports[0].port, 1, "ports are sorted");
        assert!(t.id.starts_with("l-") && t.id.len() == 18, "{}", t.id);
        let mut altered = t.clone();
        altered.ports[0].port = 3;
        assert!(
            altered
                .validate_shape()
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
    }

    #[test]
    fn self_links_and_duplicate_ports_are_refused() {
        let p = || vec!["1".parse().unwrap()];
        let err = LinkTerms::new("c", n("a/n1"), n("a/n1"), p(), 1, None).unwrap_err();
        assert!(err.to_string().contains("to itself"), "{err}");
        let dup = vec!["1".parse().unwrap(), "1:x".parse().unwrap()];
        let err = LinkTerms::new("c", n("a/n1"), n("b/n1"), dup, 1, None).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[test]
    fn budgets_change_the_id_and_are_validated() {
        let p = || vec!["1".parse().unwrap()];
        let plain = LinkTerms::new("c", n("a/n1"), n("b/n1"), p(), 100, None).unwrap();
        let json = serde_json::to_value(&plain).unwrap();
        assert!(
            json.get("max_bytes").is_none() && json.get("max_streams").is_none(),
            "a link without a budget serializes as before: {json}"
        );
        let budgeted = plain.clone().with_budget(Some(1 << 20), Some(4)).unwrap();
        assert_ne!(budgeted.id, plain.id);
        assert_eq!(budgeted.id, budgeted.derive_id());
        let json = serde_json::to_value(&budgeted).unwrap();
        assert_eq!(
            (json["max_bytes"].as_u64(), json["max_streams"].as_u64()),
            (Some(1 << 20), Some(4))
        );
        assert_eq!(
            serde_json::from_value::<LinkTerms>(json).unwrap(),
            budgeted,
            "round-trips"
        );
        assert_eq!(
            plain.clone().with_budget(None, None).unwrap(),
            plain,
            "no budget is the plain link"
        );
        let err = plain.clone().with_budget(Some(0), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid link budget: a byte budget of 0 allows nothing; leave it out for no limit"
        );
        let err = plain.clone().with_budget(None, Some(0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("0 concurrent streams; allowed 1..=16384"),
            "{err}"
        );
        assert!(plain.with_budget(None, Some(MAX_LINK_STREAMS + 1)).is_err());
    }

    /// The id of a link without a budget, fixed (the hash of the canonical JSON of its terms as
    /// they were before budgets existed): adding budgets must not move it.
    #[test]
    fn ids_of_links_without_a_budget_are_unchanged() {
        let t = LinkTerms::new(
            "collab-x",
            n("org-a/n1"),
            n("org-b/n1"),
            vec!["11365:mpc".parse().unwrap()],
            1_900_000_000,
            None,
        )
        .unwrap();
        assert_eq!(t.id, "l-68b77a1b0b241e85");
    }

    #[test]
    fn advertisements_list_typed_endpoints_and_read_the_old_fields() {
        let ad = Advertisement {
            collab: "c".into(),
            node: n("a/n1"),
            endpoints: vec![
                Endpoint::Quic {
                    address: "relay.a.example:4433".into(),
                },
                Endpoint::IstioGateway {
                    address: "gw.a.example:443".into(),
                },
            ],
            exposes: Vec::new(),
            instance: Some("i-1".into()),
            issued_at: 7,
        };
        let json = serde_json::to_value(&ad).unwrap();
        assert_eq!(
            json["endpoints"],
            serde_json::json!([
                {"kind": "quic", "address": "relay.a.example:4433"},
                {"kind": "istio_gateway", "address": "gw.a.example:443"},
            ])
        );
        assert!(json.get("relay").is_none() && json.get("gateway").is_none());
        assert_eq!(serde_json::from_value::<Advertisement>(json).unwrap(), ad);
        assert_eq!(ad.quic(), Some("relay.a.example:4433"));
        assert_eq!(ad.istio_gateway(), Some("gw.a.example:443"));

        // Signed before typed endpoints: still readable, same meaning.
        let old: Advertisement = serde_json::from_str(
            r#"{"collab":"c","node":"a/n1","relay":"127.0.0.1:4433","exposes":[],"issued_at":7}"#,
        )
        .unwrap();
        assert_eq!(old.quic(), Some("127.0.0.1:4433"));
        assert_eq!(old.istio_gateway(), None);
        assert_eq!(old.instance, None);

        // A newer agent's kind of endpoint is kept as unknown, and the rest still counts.
        let newer: Advertisement = serde_json::from_str(
            r#"{"collab":"c","node":"a/n1","endpoints":[{"kind":"carrier_pigeon","loft":"rv.example:443"},{"kind":"quic","address":"10.0.0.1:4433"}],"issued_at":7}"#,
        )
        .unwrap();
        assert_eq!(newer.endpoints[0], Endpoint::Unknown);
        assert_eq!(newer.quic(), Some("10.0.0.1:4433"));
    }

    #[test]
    fn advertisement_shapes_are_checked() {
        let mut ad = Advertisement {
            collab: "c".into(),
            node: n("a/n1"),
            endpoints: vec![Endpoint::Quic {
                address: "relay.a.example".into(),
            }],
            exposes: Vec::new(),
            instance: None,
            issued_at: 7,
        };
        assert!(
            ad.validate_shape()
                .unwrap_err()
                .to_string()
                .contains("\"relay.a.example\" is not host:port")
        );
        ad.endpoints = vec![Endpoint::Unknown; MAX_ENDPOINTS + 1];
        assert!(
            ad.validate_shape()
                .unwrap_err()
                .to_string()
                .contains("at most 8")
        );
    }

    #[test]
    fn rendezvous_servers_and_endpoints_are_checked() {
        let ad = Advertisement {
            collab: "c".into(),
            node: n("a/n1"),
            endpoints: vec![Endpoint::Rendezvous],
            exposes: Vec::new(),
            instance: None,
            issued_at: 7,
        };
        ad.validate_shape().unwrap();
        let json = serde_json::to_value(&ad).unwrap();
        assert_eq!(
            json["endpoints"],
            serde_json::json!([{"kind": "rendezvous"}])
        );
        let back: Advertisement = serde_json::from_value(json).unwrap();
        assert!(back.via_rendezvous() && back.quic().is_none());
        let no_endpoint = Advertisement {
            endpoints: Vec::new(),
            ..ad
        };
        no_endpoint.validate_shape().unwrap();

        let pin = "ab".repeat(32);
        let server = |address: &str, pin: &str| RendezvousServer {
            address: address.into(),
            pin_sha256: pin.into(),
        };
        server("rv.example:443", &pin).validate().unwrap();
        let err = |r: RendezvousServer| r.validate().unwrap_err().to_string();
        assert_eq!(
            err(server("rv.example", &pin)),
            "invalid rendezvous server: address \"rv.example\" is not host:port"
        );
        assert!(err(server(":443", &pin)).contains("is not host:port"));
        assert!(err(server("rv.example:0", &pin)).contains("is not host:port"));
        assert!(
            err(server("rv.example:443", &"AB".repeat(32)))
                .contains("is not 64 lower-case hex digits")
        );
        assert!(err(server("rv.example:443", "abc")).contains("is not 64 lower-case hex"));

        let fx = crate::fixtures::Fixture::new("c", &["a/n1"]);
        let mut collab = fx.collab.clone();
        assert!(
            !serde_json::to_string(&collab)
                .unwrap()
                .contains("rendezvous"),
            "a collaboration without rendezvous servers serializes as before"
        );
        collab.rendezvous = vec![
            server("rv.example:443", &pin),
            server("rv.example:443", &pin),
        ];
        assert!(
            collab
                .validate_rendezvous()
                .unwrap_err()
                .to_string()
                .contains("rv.example:443 is listed twice")
        );
        collab.rendezvous = vec![server("rv.example:443", &pin); MAX_RENDEZVOUS + 1];
        assert!(
            collab
                .validate_rendezvous()
                .unwrap_err()
                .to_string()
                .contains("at most 8")
        );
    }

    #[test]
    fn documents_are_tagged_by_kind() {
        let d = Document::Revocation(Revocation {
            collab: "c".into(),
            number: 2,
            ..Revocation::default()
        });
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["kind"], "revocation");
        assert_eq!(d.subject(), "2");
    }
}
