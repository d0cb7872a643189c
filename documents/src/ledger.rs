//! The ledger: what a node (or the hub) has verified so far, and the links that follow from it.
//!
//! Documents arrive in [`Envelope`]s from an untrusted mailbox. [`Ledger::ingest`] verifies each
//! one against the pinned owner key and the collaboration CA and either records it or returns a
//! [`Rejection`] naming the reason, leaving everything verified before untouched. Link states are
//! then computed on demand at a given `now` ([`Ledger::links`], [`Ledger::effective_links`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use fedmesh_certs::{CertInfo, TrustBundle, id::TRUST_DOMAIN_SUFFIX};
use serde::{Deserialize, Serialize};

use crate::{
    Advertisement, Approval, Collaboration, Decision, DocKind, Document, LinkRequest, LinkTerms,
    NodeRef, Revocation, Verdict,
    jws::{self, unix},
};

/// A signed document as the hub delivers it: a sequence number, what the hub says it is, and
/// the JWS. Only the JWS is trusted, and only once verified; `kind` and `subject` must agree with
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The hub's sequence number (cursor).
    pub seq: u64,
    /// The kind the hub filed it under.
    pub kind: DocKind,
    /// The subject the hub filed it under (link id, node, number).
    pub subject: String,
    /// The compact JWS.
    pub jws: String,
}

impl Envelope {
    /// Wraps a JWS, filing it by its own (unverified) kind and subject.
    pub fn new(seq: u64, jws: String) -> crate::Result<Self> {
        let (_, doc) = jws::peek(&jws)?;
        Ok(Self {
            seq,
            kind: doc.kind(),
            subject: doc.subject(),
            jws,
        })
    }
}

/// The class of a rejection, for callers that map it to a status (the hub: HTTP codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The document cannot be parsed.
    Malformed,
    /// The signature is missing, wrong, or the signer may not say this.
    Forbidden,
    /// Well signed, but not valid under the collaboration's rules.
    Invalid,
    /// Older than what is already verified (a replay).
    Stale,
    /// Refers to something not known (no collaboration yet, an unknown link).
    Unknown,
}

/// A document that was not accepted, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The class of the reason.
    pub code: RejectCode,
    /// The envelope's sequence number, when it came in one.
    pub seq: Option<u64>,
    /// What the document claimed to be.
    pub kind: Option<DocKind>,
    /// What it claimed to be about.
    pub subject: String,
    /// Why it was not accepted.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.seq, self.kind) {
            (Some(seq), Some(kind)) => write!(f, "#{seq} {kind} {}: {}", self.subject, self.reason),
            (None, Some(kind)) => write!(f, "{kind} {}: {}", self.subject, self.reason),
            _ => write!(f, "{}: {}", self.subject, self.reason),
        }
    }
}

/// What happened to an accepted document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// It changed the ledger.
    Changed,
    /// It was already known (or superseded by something newer that is still valid).
    Unchanged,
}

/// The state of a link at some moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Asked for, not approved.
    Requested,
    /// Approved, waiting for the receiving node's consent.
    Approved,
    /// Refused by the receiving node.
    Vetoed,
    /// In force.
    Active,
    /// Past its `not_after`.
    Expired,
    /// Revoked by the owner.
    Revoked,
    /// Approved but not valid under the collaboration's rules (reason given).
    Invalid,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Requested => "requested",
            Self::Approved => "approved",
            Self::Vetoed => "vetoed",
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Invalid => "invalid",
        };
        f.write_str(s)
    }
}

/// A link, its state, and who did what when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The terms (from the approval when there is one, else from the request).
    pub terms: LinkTerms,
    /// Its state at the `now` it was computed for.
    pub state: LinkState,
    /// Who asked, and when.
    pub requested_by: Option<String>,
    /// Unix time of the request.
    pub requested_at: Option<u64>,
    /// The owner who approved.
    pub approved_by: Option<String>,
    /// Unix time of the approval.
    pub approved_at: Option<u64>,
    /// The receiving node's latest decision.
    pub decision: Option<Verdict>,
    /// Unix time of that decision.
    pub decided_at: Option<u64>,
    /// The revocation list number that revoked it.
    pub revoked_in: Option<u64>,
    /// Why it is invalid, when it is.
    pub reason: Option<String>,
}

/// A link in force that concerns the local node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EffectiveLink {
    /// What it allows.
    pub terms: LinkTerms,
    /// Who approved it.
    pub approved_by: String,
    /// When (Unix seconds).
    pub approved_at: u64,
}

/// An internal refusal: its class and its reason.
type Refusal = (RejectCode, String);

fn refuse<T>(code: RejectCode, reason: impl Into<String>) -> Result<T, Refusal> {
    Err((code, reason.into()))
}

/// Everything verified so far about one collaboration.
#[derive(Clone, Debug)]
pub struct Ledger {
    pin: String,
    collab: Option<(Collaboration, TrustBundle)>,
    requests: BTreeMap<String, LinkRequest>,
    approvals: BTreeMap<String, Approval>,
    decisions: BTreeMap<String, (Decision, String)>,
    adverts: BTreeMap<NodeRef, (Advertisement, String)>,
    revocation: Revocation,
    cursor: u64,
}

impl Ledger {
    /// An empty ledger that will trust only the collaboration signed by the owner key whose
    /// thumbprint is `pin` (from the join token).
    pub fn new(pin: &str) -> Self {
        Self {
            pin: pin.to_owned(),
            collab: None,
            requests: BTreeMap::new(),
            approvals: BTreeMap::new(),
            decisions: BTreeMap::new(),
            adverts: BTreeMap::new(),
            revocation: Revocation::default(),
            cursor: 0,
        }
    }

    /// The verified collaboration, once there is one.
    pub fn collaboration(&self) -> Option<&Collaboration> {
        self.collab.as_ref().map(|(c, _)| c)
    }

    /// The collaboration CA, once there is one.
    pub fn trust_bundle(&self) -> Option<&TrustBundle> {
        self.collab.as_ref().map(|(_, b)| b)
    }

    /// The owner key pin this ledger was created with.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The highest envelope sequence number ingested (accepted or not).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The latest verified revocation list.
    pub fn revocation(&self) -> &Revocation {
        &self.revocation
    }

    /// The latest verified advertisement of `node`, unless its signer was revoked.
    pub fn advertisement(&self, node: &NodeRef) -> Option<&Advertisement> {
        self.adverts
            .get(node)
            .filter(|(_, serial)| !self.serial_revoked(serial))
            .map(|(a, _)| a)
    }

    /// Whether a certificate serial (hex) is revoked.
    pub fn serial_revoked(&self, serial: &str) -> bool {
        self.revocation
            .serials
            .iter()
            .any(|s| s.eq_ignore_ascii_case(serial))
    }

    /// Whether a node is revoked.
    pub fn node_revoked(&self, node: &NodeRef) -> bool {
        self.revocation.nodes.contains(node)
    }

    /// Verifies one envelope and records it. On error nothing changes.
    pub fn ingest(&mut self, env: &Envelope, now: SystemTime) -> Result<Ingested, Rejection> {
        self.cursor = self.cursor.max(env.seq);
        let reject = |(code, reason): Refusal| Rejection {
            code,
            seq: Some(env.seq),
            kind: Some(env.kind),
            subject: env.subject.clone(),
            reason,
        };
        let (doc, signer) = self.verify(&env.jws, now).map_err(reject)?;
        if doc.kind() != env.kind || doc.subject() != env.subject {
            return Err(reject((
                RejectCode::Invalid,
                format!(
                    "delivered as {} {} but the signed document is {} {}",
                    env.kind,
                    env.subject,
                    doc.kind(),
                    doc.subject()
                ),
            )));
        }
        self.record(doc, signer).map_err(reject)
    }

    /// Verifies a bare JWS (not in an envelope) and records it.
    pub fn ingest_jws(&mut self, jws: &str, now: SystemTime) -> Result<Ingested, Rejection> {
        let (doc, signer) = self.verify(jws, now).map_err(|(code, reason)| Rejection {
            code,
            seq: None,
            kind: jws::peek(jws).ok().map(|(_, d)| d.kind()),
            subject: jws::peek(jws).map(|(_, d)| d.subject()).unwrap_or_default(),
            reason,
        })?;
        let (kind, subject) = (doc.kind(), doc.subject());
        self.record(doc, signer)
            .map_err(|(code, reason)| Rejection {
                code,
                seq: None,
                kind: Some(kind),
                subject,
                reason,
            })
    }

    /// Checks signature and authorship; returns the document and the signer's serial for node
    /// documents (empty for owner documents).
    fn verify(&self, jws: &str, now: SystemTime) -> Result<(Document, String), Refusal> {
        use RejectCode::{Forbidden, Invalid, Malformed, Unknown};
        let (header, claimed) = jws::peek(jws).map_err(|e| (Malformed, e.to_string()))?;
        if let Document::Collaboration(c) = &claimed {
            if jws::thumbprint(&c.owner_key) != self.pin {
                return refuse(
                    Forbidden,
                    format!(
                        "collaboration is signed by owner key {}, not the pinned {}",
                        jws::thumbprint(&c.owner_key),
                        self.pin
                    ),
                );
            }
            let doc =
                jws::verify_owner(jws, &c.owner_key).map_err(|e| (Forbidden, e.to_string()))?;
            return Ok((doc, String::new()));
        }
        let Some((collab, bundle)) = self.collab.as_ref() else {
            return refuse(Unknown, "no verified collaboration yet");
        };
        if claimed.collab() != collab.id {
            return refuse(
                Invalid,
                format!(
                    "belongs to collaboration {:?}, not {:?}",
                    claimed.collab(),
                    collab.id
                ),
            );
        }
        if header.x5c.is_some() {
            let (doc, info) =
                jws::verify_node(jws, bundle, now).map_err(|e| (Forbidden, e.to_string()))?;
            self.check_node_signer(&doc, &info)
                .map_err(|reason| (Forbidden, reason))?;
            Ok((doc, info.serial))
        } else {
            let doc = jws::verify_owner(jws, &collab.owner_key)
                .map_err(|e| (Forbidden, e.to_string()))?;
            Ok((doc, String::new()))
        }
    }

    fn check_node_signer(&self, doc: &Document, info: &CertInfo) -> Result<(), String> {
        let signer = NodeRef::from(&info.spiffe_id);
        if self.serial_revoked(&info.serial) {
            return Err(format!("signer certificate {} is revoked", info.serial));
        }
        if self.node_revoked(&signer) {
            return Err(format!("signer {signer} is revoked"));
        }
        let collab = self
            .collaboration()
            .map(|c| c.id.as_str())
            .unwrap_or_default();
        if info.spiffe_id.collab() != collab {
            return Err(format!(
                "signer {} is not in this collaboration",
                info.spiffe_id
            ));
        }
        if self
            .collaboration()
            .and_then(|c| c.member(&signer))
            .is_none()
        {
            return Err(format!("signer {signer} is not a member"));
        }
        let speaks_for = match doc {
            Document::Advertisement(a) => a.node.to_string(),
            Document::LinkRequest(r) => r.requested_by.clone(),
            Document::Decision(d) => d.by.to_string(),
            other => return Err(format!("a {} must be signed by the owner", other.kind())),
        };
        if speaks_for != signer.to_string() {
            return Err(format!("signed by {signer} but speaks for {speaks_for}"));
        }
        Ok(())
    }

    fn record(&mut self, doc: Document, serial: String) -> Result<Ingested, Refusal> {
        use RejectCode::{Forbidden, Invalid, Stale, Unknown};
        match doc {
            Document::Collaboration(c) => self.record_collab(c),
            Document::Advertisement(a) => {
                a.validate_shape().map_err(|e| (Invalid, e.to_string()))?;
                let newer = self
                    .adverts
                    .get(&a.node)
                    .is_none_or(|(old, _)| a.issued_at > old.issued_at);
                if !newer {
                    return Ok(Ingested::Unchanged);
                }
                self.adverts.insert(a.node.clone(), (a, serial));
                Ok(Ingested::Changed)
            }
            Document::LinkRequest(r) => {
                r.terms
                    .validate_shape()
                    .map_err(|e| (Invalid, e.to_string()))?;
                self.check_members(&r.terms).map_err(|e| (Invalid, e))?;
                if let Some(a) = self.approvals.get(&r.terms.id)
                    && a.terms != r.terms
                {
                    return refuse(Invalid, "request terms differ from the approved terms");
                }
                Ok(insert_new(&mut self.requests, r.terms.id.clone(), r))
            }
            Document::Approval(a) => {
                a.terms
                    .validate_shape()
                    .map_err(|e| (Invalid, e.to_string()))?;
                if let Some(r) = self.requests.get(&a.terms.id)
                    && r.terms != a.terms
                {
                    return refuse(
                        Invalid,
                        format!(
                            "approval terms differ from the request {} it names",
                            a.terms.id
                        ),
                    );
                }
                Ok(insert_new(&mut self.approvals, a.terms.id.clone(), a))
            }
            Document::Decision(d) => {
                let terms = self
                    .approvals
                    .get(&d.link_id)
                    .map(|a| &a.terms)
                    .or_else(|| self.requests.get(&d.link_id).map(|r| &r.terms))
                    .ok_or_else(|| (Unknown, format!("decision on unknown link {}", d.link_id)))?;
                if terms.to != d.by {
                    return refuse(
                        Forbidden,
                        format!(
                            "only the receiving node {} may decide on link {}, not {}",
                            terms.to, d.link_id, d.by
                        ),
                    );
                }
                let newer = self
                    .decisions
                    .get(&d.link_id)
                    .is_none_or(|(old, _)| d.at > old.at);
                if !newer {
                    return Ok(Ingested::Unchanged);
                }
                self.decisions.insert(d.link_id.clone(), (d, serial));
                Ok(Ingested::Changed)
            }
            Document::Revocation(r) => {
                let current = &self.revocation;
                if r.number < current.number || (r.number == current.number && r != *current) {
                    return refuse(
                        Stale,
                        format!(
                            "revocation list {} is older than list {} already verified (replay?)",
                            r.number, current.number
                        ),
                    );
                }
                if r == *current {
                    return Ok(Ingested::Unchanged);
                }
                self.revocation = r;
                Ok(Ingested::Changed)
            }
            // Join grants matter to the hub only.
            Document::JoinGrant(_) => Ok(Ingested::Unchanged),
        }
    }

    fn record_collab(&mut self, c: Collaboration) -> Result<Ingested, Refusal> {
        use RejectCode::{Invalid, Stale};
        if let Some((old, _)) = &self.collab {
            if old.id != c.id {
                return refuse(
                    Invalid,
                    format!("collaboration {:?} is not {:?}", c.id, old.id),
                );
            }
            if c.version < old.version || (c.version == old.version && c != *old) {
                return refuse(
                    Stale,
                    format!(
                        "collaboration version {} is older than version {} already verified",
                        c.version, old.version
                    ),
                );
            }
            if c == *old {
                return Ok(Ingested::Unchanged);
            }
        }
        let bundle = TrustBundle::from_pem(&c.ca_pem).map_err(|e| (Invalid, e.to_string()))?;
        if bundle.trust_domain().collab() != c.id {
            return refuse(
                Invalid,
                format!(
                    "CA is for trust domain {}, not {}.{TRUST_DOMAIN_SUFFIX}",
                    bundle.trust_domain(),
                    c.id
                ),
            );
        }
        for m in &c.members {
            NodeRef::new(&m.org, &m.node).map_err(|e| (Invalid, e.to_string()))?;
        }
        c.validate_rendezvous()
            .map_err(|e| (Invalid, e.to_string()))?;
        self.collab = Some((c, bundle));
        Ok(Ingested::Changed)
    }

    fn check_members(&self, terms: &LinkTerms) -> Result<(), String> {
        let collab = self
            .collaboration()
            .ok_or("no verified collaboration yet")?;
        for end in [&terms.from, &terms.to] {
            if collab.member(end).is_none() {
                return Err(format!("{end} is not a member of {}", collab.id));
            }
        }
        Ok(())
    }

    /// Every known link and its state at `now`, ordered by id.
    pub fn links(&self, now: SystemTime) -> Vec<LinkStatus> {
        let ids: BTreeSet<&String> = self.requests.keys().chain(self.approvals.keys()).collect();
        ids.into_iter()
            .filter_map(|id| self.status(id, now))
            .collect()
    }

    /// The state of one link at `now`.
    pub fn status(&self, id: &str, now: SystemTime) -> Option<LinkStatus> {
        let request = self.requests.get(id);
        let approval = self.approvals.get(id);
        let terms = approval
            .map(|a| a.terms.clone())
            .or_else(|| request.map(|r| r.terms.clone()))?;
        let decision = self
            .decisions
            .get(id)
            .filter(|(_, serial)| !self.serial_revoked(serial))
            .map(|(d, _)| d);
        let mut status = LinkStatus {
            state: LinkState::Requested,
            requested_by: request.map(|r| r.requested_by.clone()),
            requested_at: request.map(|r| r.requested_at),
            approved_by: approval.map(|a| a.approved_by.clone()),
            approved_at: approval.map(|a| a.approved_at),
            decision: decision.map(|d| d.verdict),
            decided_at: decision.map(|d| d.at),
            revoked_in: None,
            reason: None,
            terms,
        };
        let now = unix(now);
        let terms = &status.terms;
        let revoked = self.revocation.links.iter().any(|l| l == id)
            || self.node_revoked(&terms.from)
            || self.node_revoked(&terms.to);
        status.state = if revoked {
            status.revoked_in = Some(self.revocation.number);
            LinkState::Revoked
        } else if now >= terms.not_after {
            LinkState::Expired
        } else if let Some(approval) = approval {
            match self.invalidity(approval) {
                Some(reason) => {
                    status.reason = Some(reason);
                    LinkState::Invalid
                }
                None => match decision.map(|d| d.verdict) {
                    Some(Verdict::Veto) => LinkState::Vetoed,
                    Some(Verdict::Consent) => LinkState::Active,
                    None if self.consent_required() => LinkState::Approved,
                    None => LinkState::Active,
                },
            }
        } else {
            LinkState::Requested
        };
        Some(status)
    }

    fn consent_required(&self) -> bool {
        self.collaboration()
            .is_some_and(|c| c.policy.require_consent)
    }

    /// Why an owner-signed approval still cannot be in force under the collaboration's rules.
    fn invalidity(&self, approval: &Approval) -> Option<String> {
        let collab = self.collaboration()?;
        if let Err(e) = self.check_members(&approval.terms) {
            return Some(e);
        }
        let max = collab.policy.max_link_ttl_secs;
        if approval.terms.not_after > approval.approved_at.saturating_add(max) {
            return Some(format!(
                "approved for {}s, over the collaboration's maximum of {max}s",
                approval
                    .terms
                    .not_after
                    .saturating_sub(approval.approved_at)
            ));
        }
        None
    }

    /// The links in force at `now` that concern `local`, and why the others touching it are not.
    pub fn effective_links(
        &self,
        local: &NodeRef,
        now: SystemTime,
    ) -> (Vec<EffectiveLink>, Vec<Rejection>) {
        let mut links = Vec::new();
        let mut rejections = Vec::new();
        for status in self.links(now) {
            if !status.terms.concerns(local) {
                continue;
            }
            match (status.state, status.approved_by, status.approved_at) {
                (LinkState::Active, Some(approved_by), Some(approved_at)) => {
                    links.push(EffectiveLink {
                        terms: status.terms,
                        approved_by,
                        approved_at,
                    });
                }
                (LinkState::Invalid, ..) => rejections.push(Rejection {
                    code: RejectCode::Invalid,
                    seq: None,
                    kind: Some(DocKind::Approval),
                    subject: status.terms.id.clone(),
                    reason: status.reason.unwrap_or_default(),
                }),
                _ => {}
            }
        }
        (links, rejections)
    }
}

impl Ledger {
    /// The links `local` carries at `now`: those in force ([`Ledger::effective_links`]) less
    /// the ones its sysadmin vetoed locally (by link id), with why the others touching it are
    /// not in force. The node agent and its Kubernetes controller both start from this.
    pub fn links_in_force(
        &self,
        local: &NodeRef,
        vetoed: &BTreeSet<String>,
        now: SystemTime,
    ) -> (Vec<EffectiveLink>, Vec<Rejection>) {
        let (mut links, rejections) = self.effective_links(local, now);
        links.retain(|l| !vetoed.contains(&l.terms.id));
        (links, rejections)
    }

    /// When the first of `links` stops being in force (the links in force change then).
    pub fn next_expiry(links: &[EffectiveLink]) -> Option<SystemTime> {
        links
            .iter()
            .map(|l| fedmesh_certs::time::from_unix(l.terms.not_after))
            .min()
    }
}

/// Records the first verified document per link id; later ones change nothing.
fn insert_new<V>(map: &mut BTreeMap<String, V>, key: String, value: V) -> Ingested {
    if map.contains_key(&key) {
        return Ingested::Unchanged;
    }
    map.insert(key, value);
    Ingested::Changed
}

/// The pure entry point: verifies `collab_jws` against `pin`, then every envelope in order, and
/// returns the links in force for `local` at `now`, with every rejected document and its reason.
pub fn effective_links(
    collab_jws: &str,
    pin: &str,
    documents: &[Envelope],
    local: &NodeRef,
    now: SystemTime,
) -> (Vec<EffectiveLink>, Vec<Rejection>) {
    let mut ledger = Ledger::new(pin);
    let mut rejections = Vec::new();
    if let Err(r) = ledger.ingest_jws(collab_jws, now) {
        rejections.push(r);
        return (Vec::new(), rejections);
    }
    for env in documents {
        if let Err(r) = ledger.ingest(env, now) {
            rejections.push(r);
        }
    }
    let (links, more) = ledger.effective_links(local, now);
    rejections.extend(more);
    (links, rejections)
}
