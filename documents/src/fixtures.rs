//! Test fixtures: a collaboration with an owner, a CA and enrolled nodes, all in memory.
//!
//! Compiled for this crate's tests and, with the `test-util` feature, for other crates' tests.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fedmesh_certs::{CollabCa, IssuancePolicy, NodeKey, SpiffeId};
use rustls_pki_types::CertificateDer;

use crate::{
    Advertisement, Approval, CollabPolicy, Collaboration, Decision, Document, Envelope,
    LinkRequest, LinkTerms, Member, NodeRef, NodeSigner, OwnerKey, PortSpec, Revocation, Signer,
    Verdict, jws,
};

/// A collaboration with its secrets, for tests.
pub struct Fixture {
    /// The owner's key.
    pub owner: OwnerKey,
    /// The CA.
    pub ca: CollabCa,
    /// The collaboration document.
    pub collab: Collaboration,
    /// Enrolled nodes' signing identities (certificate PEM and key PEM kept alongside).
    pub nodes: BTreeMap<NodeRef, EnrolledNode>,
    /// The fixture's clock.
    pub now: SystemTime,
    seq: std::cell::Cell<u64>,
}

/// A node's credentials.
pub struct EnrolledNode {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
    /// Serial (hex).
    pub serial: String,
}

impl EnrolledNode {
    /// The node's document signer.
    pub fn signer(&self) -> NodeSigner {
        use rustls_pki_types::pem::PemObject;
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("fixture certificate");
        NodeSigner::new(
            chain,
            NodeKey::from_pem(&self.key_pem).expect("fixture key"),
        )
    }
}

impl Fixture {
    /// Collaboration `collab` with the given `org/node` members, all enrolled, at a fixed time.
    pub fn new(collab: &str, members: &[&str]) -> Self {
        Self::at(
            collab,
            members,
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )
    }

    /// [`Fixture::new`] at `now` (tests with real TLS handshakes need the real time).
    pub fn at(collab: &str, members: &[&str], now: SystemTime) -> Self {
        let owner = OwnerKey::generate().expect("owner key");
        let ca = CollabCa::generate(
            collab,
            now - Duration::from_secs(3600),
            Duration::from_secs(365 * 86_400),
        )
        .expect("CA");
        let mut nodes = BTreeMap::new();
        let mut member_list = Vec::new();
        for m in members {
            let node: NodeRef = m.parse().expect("member org/node");
            let key = NodeKey::generate().expect("node key");
            let id = SpiffeId::new(collab, &node.org, &node.node).expect("id");
            let csr = key.csr(&id).expect("csr");
            let issued = ca
                .sign_csr_pem(
                    &csr.pem,
                    &IssuancePolicy::default(),
                    Duration::from_secs(86_400),
                    now,
                )
                .expect("issue");
            member_list.push(Member {
                org: node.org.clone(),
                node: node.node.clone(),
                organization_id: Some(member_list.len() as u64 + 1),
            });
            nodes.insert(
                node,
                EnrolledNode {
                    cert_pem: issued.pem,
                    key_pem: key.private_pem(),
                    serial: issued.info.serial,
                },
            );
        }
        let collab = Collaboration {
            id: collab.to_owned(),
            version: 1,
            owner_name: "owner@example.org".into(),
            owner_key: owner.public_jwk(),
            ca_pem: ca.cert_pem().to_owned(),
            members: member_list,
            policy: CollabPolicy::default(),
            issued_at: jws::unix(now),
            rendezvous: Vec::new(),
        };
        Self {
            owner,
            ca,
            collab,
            nodes,
            now,
            seq: std::cell::Cell::new(0),
        }
    }

    /// The owner key pin.
    pub fn pin(&self) -> String {
        jws::thumbprint(&self.owner.public_jwk())
    }

    /// The collaboration, signed by the owner.
    pub fn collab_jws(&self) -> String {
        self.owner_sign(&Document::Collaboration(self.collab.clone()))
    }

    /// Signs with the owner key.
    pub fn owner_sign(&self, doc: &Document) -> String {
        jws::sign(doc, &Signer::Owner(&self.owner)).expect("owner signs")
    }

    /// Signs as node `node`.
    pub fn node_sign(&self, node: &str, doc: &Document) -> String {
        let node: NodeRef = node.parse().expect("org/node");
        let signer = self.nodes[&node].signer();
        jws::sign(doc, &Signer::Node(&signer)).expect("node signs")
    }

    /// Wraps a JWS in the next envelope.
    pub fn envelope(&self, jws: String) -> Envelope {
        self.seq.set(self.seq.get() + 1);
        Envelope::new(self.seq.get(), jws).expect("envelope")
    }

    /// Link terms from `from` to `to` on `ports` (e.g. `["11365:mpc"]`) for `ttl` from now.
    pub fn terms(&self, from: &str, to: &str, ports: &[&str], ttl: Duration) -> LinkTerms {
        let ports: Vec<PortSpec> = ports.iter().map(|p| p.parse().expect("port")).collect();
        LinkTerms::new(
            &self.collab.id,
            from.parse().expect("from"),
            to.parse().expect("to"),
            ports,
            jws::unix(self.now + ttl),
            None,
        )
        .expect("terms")
    }

    /// A request for `terms`, signed by `terms.from`.
    pub fn request(&self, terms: &LinkTerms) -> String {
        let doc = Document::LinkRequest(LinkRequest {
            terms: terms.clone(),
            requested_by: terms.from.to_string(),
            requested_at: jws::unix(self.now),
        });
        self.node_sign(&terms.from.to_string(), &doc)
    }

    /// The owner's approval of `terms`.
    pub fn approval(&self, terms: &LinkTerms) -> String {
        self.owner_sign(&Document::Approval(Approval {
            terms: terms.clone(),
            approved_by: self.collab.owner_name.clone(),
            approved_at: jws::unix(self.now),
            revocations: 0,
        }))
    }

    /// The receiving node's decision on `terms`.
    pub fn decision(&self, terms: &LinkTerms, verdict: Verdict) -> String {
        let doc = Document::Decision(Decision {
            collab: self.collab.id.clone(),
            link_id: terms.id.clone(),
            by: terms.to.clone(),
            verdict,
            reason: None,
            at: jws::unix(self.now),
        });
        self.node_sign(&terms.to.to_string(), &doc)
    }

    /// Revocation list `number` revoking `links`.
    pub fn revocation(&self, number: u64, links: &[&str]) -> String {
        self.owner_sign(&Document::Revocation(Revocation {
            collab: self.collab.id.clone(),
            number,
            links: links.iter().map(|s| (*s).to_owned()).collect(),
            serials: Vec::new(),
            nodes: Vec::new(),
            issued_at: jws::unix(self.now),
        }))
    }

    /// `node`'s advertisement of its relay address.
    pub fn advertisement(&self, node: &str, relay: &str) -> String {
        self.node_sign(
            node,
            &Document::Advertisement(Advertisement {
                collab: self.collab.id.clone(),
                node: node.parse().expect("org/node"),
                endpoints: vec![crate::Endpoint::Quic {
                    address: relay.to_owned(),
                }],
                exposes: Vec::new(),
                instance: None,
                issued_at: jws::unix(self.now),
            }),
        )
    }
}
