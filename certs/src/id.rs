//! Trust domains and SPIFFE IDs.
//!
//! A collaboration `c` is the trust domain `c.fedmesh`; a node `n` of organisation `o` in it is
//! `spiffe://c.fedmesh/org/o/node/n`, with DNS name `n.o.c.fedmesh`. Every name is a lowercase
//! DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
//!
//! [`PeerNames`] is the one rule for the names algorithms dial, whoever serves them (the
//! relay's DNS and `FEDMESH_PEERS`, or Istio ServiceEntries): every node is
//! `<node>.<org>.<collab>.fedmesh`, and an organisation with exactly one node in the
//! collaboration is also `<org>.<collab>.fedmesh`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use crate::{Error, Result};

/// The suffix every fedmesh trust domain ends with.
pub const TRUST_DOMAIN_SUFFIX: &str = "fedmesh";

/// Checks that `value` is a lowercase DNS label; `kind` names it in the error.
pub fn validate_label(kind: &'static str, value: &str) -> Result<()> {
    let fail = |reason: String| Error::InvalidLabel {
        kind,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(fail("must not be empty".into()));
    }
    if value.len() > 63 {
        return Err(fail(format!(
            "is {} characters long; at most 63 are allowed",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(char::is_ascii_uppercase) {
        return Err(fail(format!("must be lowercase, found {c:?}")));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(fail(format!(
            "contains illegal character {c:?} (allowed: a-z, 0-9, '-')"
        )));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(fail("must not start or end with '-'".into()));
    }
    Ok(())
}

/// A collaboration's trust domain, `<collab>.fedmesh`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    collab: String,
}

impl TrustDomain {
    /// The trust domain of collaboration `collab` (a lowercase DNS label).
    pub fn new(collab: &str) -> Result<Self> {
        validate_label("collaboration", collab)?;
        Ok(Self {
            collab: collab.to_owned(),
        })
    }

    /// Parses the domain `<collab>.fedmesh`; `None` when it is not a fedmesh trust domain.
    pub fn from_domain(domain: &str) -> Option<Result<Self>> {
        let collab = domain
            .strip_suffix(TRUST_DOMAIN_SUFFIX)?
            .strip_suffix('.')?;
        Some(Self::new(collab))
    }

    /// The collaboration id.
    pub fn collab(&self) -> &str {
        &self.collab
    }

    /// `spiffe://<collab>.fedmesh`.
    pub fn uri(&self) -> String {
        format!("spiffe://{self}")
    }

    /// The SPIFFE ID of node `node` of organisation `org` in this trust domain.
    pub fn node(&self, org: &str, node: &str) -> Result<SpiffeId> {
        SpiffeId::new(&self.collab, org, node)
    }

    /// `<org>.<collab>.fedmesh`: the name of an organisation with one node (see [`PeerNames`]).
    pub fn org_name(&self, org: &str) -> String {
        format!("{org}.{self}")
    }
}

/// The DNS names algorithms use for the nodes of one collaboration.
///
/// A node is always `<node>.<org>.<collab>.fedmesh`. An organisation with exactly one node among
/// the collaboration's members is also `<org>.<collab>.fedmesh`, naming that node. An
/// organisation with several nodes has no organisation name: it would name no node in
/// particular (DNS would answer both nodes' addresses for one name, and two ServiceEntries
/// would claim one host), and a name that appeared and vanished as links come and go would
/// break the algorithms that use it. Membership, not links, decides, so a name is stable for as
/// long as the organisation's membership is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerNames {
    domain: TrustDomain,
    /// Organisations with exactly one member node.
    single: BTreeSet<String>,
}

impl PeerNames {
    /// The names in `domain` given every member node as `(org, node)` (the local one included).
    pub fn new<'a>(
        domain: TrustDomain,
        members: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut nodes: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (org, node) in members {
            nodes.entry(org).or_default().insert(node);
        }
        let single = nodes
            .into_iter()
            .filter(|(_, nodes)| nodes.len() == 1)
            .map(|(org, _)| org.to_owned())
            .collect();
        Self { domain, single }
    }

    /// The names of node `node` of organisation `org`: its node name first, then its
    /// organisation's name when that names it alone.
    pub fn of(&self, org: &str, node: &str) -> Vec<String> {
        let mut names = vec![format!("{node}.{org}.{}", self.domain)];
        if self.single.contains(org) {
            names.push(self.domain.org_name(org));
        }
        names
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{TRUST_DOMAIN_SUFFIX}", self.collab)
    }
}

/// A node identity: `spiffe://<collab>.fedmesh/org/<org>/node/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    collab: String,
    org: String,
    node: String,
}

impl SpiffeId {
    /// Builds and validates an identity from its three labels.
    pub fn new(collab: &str, org: &str, node: &str) -> Result<Self> {
        validate_label("collaboration", collab)?;
        validate_label("organisation", org)?;
        validate_label("node", node)?;
        Ok(Self {
            collab: collab.to_owned(),
            org: org.to_owned(),
            node: node.to_owned(),
        })
    }

    /// Parses a SPIFFE URI.
    pub fn parse(uri: &str) -> Result<Self> {
        let fail = |reason: &str| Error::InvalidSpiffeId {
            value: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| fail("must start with spiffe://"))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| fail("has no path; expected /org/<org>/node/<node>"))?;
        let domain = TrustDomain::from_domain(domain)
            .ok_or_else(|| fail("trust domain must be <collab>.fedmesh"))??;
        let parts: Vec<&str> = path.split('/').collect();
        let [org_kw, org, node_kw, node] = parts[..] else {
            return Err(fail("path must be /org/<org>/node/<node>"));
        };
        if org_kw != "org" || node_kw != "node" {
            return Err(fail("path must be /org/<org>/node/<node>"));
        }
        Self::new(&domain.collab, org, node)
    }

    /// Parses the node DNS name `<node>.<org>.<collab>.fedmesh`.
    pub fn from_dns_name(name: &str) -> Result<Self> {
        let fail = || Error::InvalidSpiffeId {
            value: name.to_owned(),
            reason: "expected a node name <node>.<org>.<collab>.fedmesh".to_owned(),
        };
        let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
        match labels[..] {
            [node, org, collab, TRUST_DOMAIN_SUFFIX] => Self::new(collab, org, node),
            _ => Err(fail()),
        }
    }

    /// The collaboration id.
    pub fn collab(&self) -> &str {
        &self.collab
    }

    /// The organisation.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// The node within the organisation.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The trust domain this identity lives in.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            collab: self.collab.clone(),
        }
    }

    /// `<node>.<org>.<collab>.fedmesh`, the DNS SAN and TLS server name of the node.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.{}.{TRUST_DOMAIN_SUFFIX}",
            self.node, self.org, self.collab
        )
    }

    /// `<org>/<node>`, the short form operators type.
    pub fn short(&self) -> String {
        format!("{}/{}", self.org, self.node)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}.{TRUST_DOMAIN_SUFFIX}/org/{}/node/{}",
            self.collab, self.org, self.node
        )
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_uri_and_dns_name() {
        let id = SpiffeId::new("collab-x", "org-a", "n1").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://collab-x.fedmesh/org/org-a/node/n1"
        );
        assert_eq!(id.dns_name(), "n1.org-a.collab-x.fedmesh");
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(SpiffeId::from_dns_name(&id.dns_name()).unwrap(), id);
        assert_eq!(id.short(), "org-a/n1");
    }

    #[test]
    fn organisations_with_one_node_have_a_name() {
        let domain = TrustDomain::new("c").unwrap();
        let names = PeerNames::new(domain, [("a", "n1"), ("b", "n1"), ("b", "n2"), ("a", "n1")]);
        assert_eq!(names.of("a", "n1"), ["n1.a.c.fedmesh", "a.c.fedmesh"]);
        assert_eq!(names.of("b", "n1"), ["n1.b.c.fedmesh"]);
        assert_eq!(names.of("b", "n2"), ["n2.b.c.fedmesh"]);
        assert_eq!(TrustDomain::new("c").unwrap().org_name("a"), "a.c.fedmesh");
    }

    #[test]
    fn labels_are_strict() {
        let err = |v: &str| validate_label("node", v).unwrap_err().to_string();
        assert_eq!(
            err("Node"),
            r#"invalid node name "Node": must be lowercase, found 'N'"#
        );
        assert_eq!(
            err("a_b"),
            r#"invalid node name "a_b": contains illegal character '_' (allowed: a-z, 0-9, '-')"#
        );
        assert!(err("-a").contains("must not start or end with '-'"));
        assert!(err("").contains("must not be empty"));
        assert!(err(&"a".repeat(64)).contains("at most 63"));
        assert!(validate_label("node", "a-1").is_ok());
    }

    #[test]
    fn parse_rejects_foreign_shapes() {
        for bad in [
            "https://c.fedmesh/org/o/node/n",
            "spiffe://c.example/org/o/node/n",
            "spiffe://c.fedmesh/ns/o/sa/n",
            "spiffe://c.fedmesh/org/o/node/n/extra",
            "spiffe://c.fedmesh",
            "spiffe://C.fedmesh/org/o/node/n",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
