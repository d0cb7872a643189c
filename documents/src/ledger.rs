//! The ledger: what a node (or the hub) has verified so far, and the links that follow from it.
//!
//! Documents arrive in [`Envelope`]s from an untrusted mailbox. [`Ledger::ingest`] verifies each
//! one against the pinned owner key and the collaboration CA and either records it or returns a
//! [`Rejection`] naming the reason, leaving everything verified before untouched. Link states are
//! then computed on demand at a given `now` ([`Ledger::links`], [`Ledger::effective_links`]).
//!
//! Verification is done once per document: the SHA-256 of every verified JWS is remembered, and
//! the same document delivered again is known without any cryptography. A node's ledger
//! ([`Ledger::for_node`]) does not verify what cannot concern it: requests, approvals and
//! decisions of other nodes' links are skipped, and the advertisements of nodes it has no link
//! with are kept aside unverified until a link makes them matter. It decides this from the
//! documents themselves, not from anything the hub says, and it verifies every revocation and
//! checkpoint.
//!
//! ```text
//!  envelope ─▶ seen before (hash)? ──yes──▶ Unchanged
//!                 │ no
//!                 ▼
//!     cannot concern this node? ──yes──▶ Skipped (advertisements: kept aside)
//!                 │ no
//!                 ▼
//!     verify signature + authorship ─▶ record ─▶ advertisements kept aside that now matter
//! ```
//!
//! Revocations add up and are numbered 1, 2, 3, ... ([`Revocation`]); an approval and a
//! checkpoint name the highest number their signer had seen. A ledger that sees a number (or a
//! claim) above what it holds without a gap knows revocations are withheld from it
//! ([`Ledger::withheld`]), and then puts no link in force until they arrive.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::SystemTime,
};

use fedmesh_certs::{CertInfo, TrustBundle, id::TRUST_DOMAIN_SUFFIX};
use serde::{Deserialize, Serialize};

use crate::{
    Advertisement, Approval, Checkpoint, Collaboration, Decision, DocKind, Document, LinkRequest,
    LinkTerms, NodeRef, Revocation, Verdict,
    jws::{self, unix},
    runs::{
        self, LinkPolicy, MAX_LIFETIME_SECS, MAX_POLICIES, MAX_RUNS_PER_NODE, RunAnnouncement,
        RunEnd, run_key,
    },
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
    /// Not verified: it cannot concern this node's ledger (an advertisement is kept aside in
    /// case a link makes it matter later).
    Skipped,
}

/// Revocations withheld: an owner document names revocations this ledger does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withheld {
    /// Every revocation numbered up to this one is held.
    pub through: u64,
    /// The highest revocation number an owner document names.
    pub claimed: u64,
}

impl std::fmt::Display for Withheld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the hub withholds revocations: owner documents name revocations up to {}, but only \
             those up to {} arrived; no link is in force until they do",
            self.claimed, self.through
        )
    }
}

/// Which revocation numbers were seen, and the highest any owner document names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Numbers {
    /// Every number from 1 to this was seen (or folded into a checkpoint).
    through: u64,
    /// Numbers seen above `through`.
    above: BTreeSet<u64>,
    /// The highest number any verified owner document names.
    claimed: u64,
}

impl Numbers {
    fn has(&self, n: u64) -> bool {
        n <= self.through || self.above.contains(&n)
    }

    fn add(&mut self, n: u64) {
        if !self.has(n) {
            self.above.insert(n);
        }
        self.claim(n);
        self.advance();
    }

    fn fold(&mut self, through: u64) {
        self.through = self.through.max(through);
        self.above.retain(|&n| n > through);
        self.claim(through);
        self.advance();
    }

    fn claim(&mut self, n: u64) {
        self.claimed = self.claimed.max(n);
    }

    fn advance(&mut self) {
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
    }
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

/// SHA-256 of a JWS: what a verified document is remembered by.
type Digest = [u8; 32];

fn digest(jws: &str) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, jws.as_bytes()).as_ref());
    out
}

/// Everything verified so far about one collaboration.
///
/// It serializes (without what it can rebuild: the CA's trust bundle and the hashes of verified
/// documents) so an owner keeps it between commands ([`Ledger::to_json`],
/// [`Ledger::from_json`]); whoever can write that file holds the owner key anyway.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ledger {
    pin: String,
    /// A node's ledger: documents that cannot concern this node are not verified.
    focus: Option<NodeRef>,
    collab: Option<Collaboration>,
    #[serde(skip)]
    bundle: Option<TrustBundle>,
    requests: BTreeMap<String, LinkRequest>,
    approvals: BTreeMap<String, Approval>,
    decisions: BTreeMap<String, (Decision, String)>,
    adverts: BTreeMap<NodeRef, (Advertisement, String)>,
    /// Everything revoked, added up; `number` is the highest seen.
    revocation: Revocation,
    /// The revocation number that revoked each link.
    revoked_in: BTreeMap<String, u64>,
    numbers: Numbers,
    checkpoint: Option<Checkpoint>,
    /// Link policies by name (the latest signed of each).
    #[serde(default)]
    policies: BTreeMap<String, LinkPolicy>,
    /// Runs announced and not ended, by [`run_key`], with the signer's certificate serial.
    #[serde(default)]
    runs: BTreeMap<String, (RunAnnouncement, String)>,
    /// The latest end of each run, by [`run_key`]: an announcement it ended never comes back.
    #[serde(default)]
    ends: BTreeMap<String, RunEnd>,
    /// Advertisements of nodes this node has no link with, not verified (the latest each).
    deferred: BTreeMap<NodeRef, Envelope>,
    cursor: u64,
    /// Verified documents by hash, with the kind and subject they were verified as.
    #[serde(skip)]
    verified: HashMap<Digest, (DocKind, String)>,
    /// Advertisements kept aside that failed once they were verified.
    #[serde(skip)]
    late: Vec<Rejection>,
}

impl Ledger {
    /// An empty ledger that will trust only the collaboration signed by the owner key whose
    /// thumbprint is `pin` (from the join token).
    pub fn new(pin: &str) -> Self {
        Self {
            pin: pin.to_owned(),
            focus: None,
            collab: None,
            bundle: None,
            requests: BTreeMap::new(),
            approvals: BTreeMap::new(),
            decisions: BTreeMap::new(),
            adverts: BTreeMap::new(),
            revocation: Revocation::default(),
            revoked_in: BTreeMap::new(),
            numbers: Numbers::default(),
            checkpoint: None,
            policies: BTreeMap::new(),
            runs: BTreeMap::new(),
            ends: BTreeMap::new(),
            deferred: BTreeMap::new(),
            cursor: 0,
            verified: HashMap::new(),
            late: Vec::new(),
        }
    }

    /// A node's ledger: like [`Ledger::new`], but requests, approvals and decisions of links
    /// that do not concern `node` are skipped, and advertisements of nodes it has no link with
    /// are kept aside unverified until a link to them is recorded.
    pub fn for_node(pin: &str, node: &NodeRef) -> Self {
        Self {
            focus: Some(node.clone()),
            ..Self::new(pin)
        }
    }

    /// A copy for readers: everything verified, without what only further ingesting needs (the
    /// hashes of verified documents, advertisements kept aside), so publishing it after every
    /// change costs little however long the history was.
    pub fn view(&self) -> Self {
        Self {
            pin: self.pin.clone(),
            focus: self.focus.clone(),
            collab: self.collab.clone(),
            bundle: self.bundle.clone(),
            requests: self.requests.clone(),
            approvals: self.approvals.clone(),
            decisions: self.decisions.clone(),
            adverts: self.adverts.clone(),
            revocation: self.revocation.clone(),
            revoked_in: self.revoked_in.clone(),
            numbers: self.numbers.clone(),
            checkpoint: self.checkpoint.clone(),
            policies: self.policies.clone(),
            runs: self.runs.clone(),
            ends: self.ends.clone(),
            deferred: BTreeMap::new(),
            cursor: self.cursor,
            verified: HashMap::new(),
            late: Vec::new(),
        }
    }

    /// The ledger as JSON, to keep between runs.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A ledger kept with [`Ledger::to_json`].
    pub fn from_json(json: &str) -> crate::Result<Self> {
        let mut ledger: Self =
            serde_json::from_str(json).map_err(|e| crate::Error::Malformed(e.to_string()))?;
        if let Some(c) = &ledger.collab {
            ledger.bundle = Some(TrustBundle::from_pem(&c.ca_pem)?);
        }
        Ok(ledger)
    }

    /// The verified collaboration, once there is one.
    pub fn collaboration(&self) -> Option<&Collaboration> {
        self.collab.as_ref()
    }

    /// The collaboration CA, once there is one.
    pub fn trust_bundle(&self) -> Option<&TrustBundle> {
        self.bundle.as_ref()
    }

    /// The latest verified checkpoint.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }

    /// Every revocation numbered up to this one is held (seen or folded into a checkpoint).
    pub fn revocations_through(&self) -> u64 {
        self.numbers.through
    }

    /// Whether revocations are withheld from this ledger: an owner document names a revocation
    /// number it does not hold (with every number below). No link is then in force.
    pub fn withheld(&self) -> Option<Withheld> {
        (self.numbers.claimed > self.numbers.through).then_some(Withheld {
            through: self.numbers.through,
            claimed: self.numbers.claimed,
        })
    }

    /// Rejections of advertisements that were kept aside and failed when a link made them
    /// matter; each is returned once.
    pub fn take_late_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.late)
    }

    /// The owner key pin this ledger was created with.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The highest envelope sequence number ingested (accepted or not).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Moves the cursor up to `seq` (the hub's cursor after a page: documents in between were
    /// compacted away).
    pub fn advance_cursor(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
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
            .binary_search(&serial.to_ascii_lowercase())
            .is_ok()
    }

    /// Whether a node is revoked.
    pub fn node_revoked(&self, node: &NodeRef) -> bool {
        self.revocation.nodes.binary_search(node).is_ok()
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
        let hash = digest(&env.jws);
        if let Some((kind, subject)) = self.verified.get(&hash) {
            if (*kind, subject.as_str()) != (env.kind, env.subject.as_str()) {
                return Err(reject(mislabelled(env, *kind, subject)));
            }
            return Ok(Ingested::Unchanged);
        }
        if self.set_aside(env) {
            return Ok(Ingested::Skipped);
        }
        let (doc, signer) = self.verify(&env.jws, now).map_err(reject)?;
        if doc.kind() != env.kind || doc.subject() != env.subject {
            return Err(reject(mislabelled(env, doc.kind(), &doc.subject())));
        }
        let ingested = self.record(doc, signer).map_err(reject)?;
        self.verified.insert(hash, (env.kind, env.subject.clone()));
        self.verify_set_aside(now);
        Ok(ingested)
    }

    /// Verifies a bare JWS (not in an envelope) and records it.
    pub fn ingest_jws(&mut self, jws: &str, now: SystemTime) -> Result<Ingested, Rejection> {
        let hash = digest(jws);
        if self.verified.contains_key(&hash) {
            return Ok(Ingested::Unchanged);
        }
        let (doc, signer) = self.verify(jws, now).map_err(|(code, reason)| Rejection {
            code,
            seq: None,
            kind: jws::peek(jws).ok().map(|(_, d)| d.kind()),
            subject: jws::peek(jws).map(|(_, d)| d.subject()).unwrap_or_default(),
            reason,
        })?;
        let (kind, subject) = (doc.kind(), doc.subject());
        let ingested = self
            .record(doc, signer)
            .map_err(|(code, reason)| Rejection {
                code,
                seq: None,
                kind: Some(kind),
                subject: subject.clone(),
                reason,
            })?;
        self.verified.insert(hash, (kind, subject));
        self.verify_set_aside(now);
        Ok(ingested)
    }

    /// For a node's ledger: whether `env` cannot concern the node (judged from the signed
    /// payload itself, unverified: a hub that alters it only withholds it). Advertisements of
    /// nodes without a link to this one are kept aside (the latest delivered for each).
    fn set_aside(&mut self, env: &Envelope) -> bool {
        let Some(focus) = &self.focus else {
            return false;
        };
        if self.collab.is_none() {
            return false;
        }
        let Ok((_, doc)) = jws::peek(&env.jws) else {
            return false;
        };
        match &doc {
            Document::Advertisement(a) if a.node != *focus && !self.is_peer(&a.node) => {
                if self
                    .deferred
                    .get(&a.node)
                    .is_none_or(|old| env.seq >= old.seq)
                {
                    self.deferred.insert(a.node.clone(), env.clone());
                }
                true
            }
            Document::LinkRequest(r) => !r.terms.concerns(focus),
            Document::Approval(a) => !a.terms.concerns(focus),
            Document::Decision(d) => {
                d.by != *focus
                    && !self.requests.contains_key(&d.link_id)
                    && !self.approvals.contains_key(&d.link_id)
            }
            _ => false,
        }
    }

    /// Whether some known link has `node` at one end, or `node` announced a run (a link
    /// policy may link it to this node while the run lasts).
    fn is_peer(&self, node: &NodeRef) -> bool {
        self.requests.values().any(|r| r.terms.concerns(node))
            || self.approvals.values().any(|a| a.terms.concerns(node))
            || (!self.policies.is_empty() && self.runs.values().any(|(a, _)| a.node == *node))
    }

    /// Verifies the advertisements kept aside whose node a link now concerns.
    fn verify_set_aside(&mut self, now: SystemTime) {
        if self.deferred.is_empty() {
            return;
        }
        let due: Vec<NodeRef> = self
            .deferred
            .keys()
            .filter(|n| self.is_peer(n))
            .cloned()
            .collect();
        for node in due {
            if let Some(env) = self.deferred.remove(&node)
                && let Err(r) = self.ingest(&env, now)
            {
                self.late.push(r);
            }
        }
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
        let (Some(collab), Some(bundle)) = (self.collab.as_ref(), self.bundle.as_ref()) else {
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
            if matches!(claimed, Document::RunAnnouncement(_) | Document::RunEnd(_)) {
                return refuse(
                    Forbidden,
                    format!(
                        "a {} must be signed by the node it is about",
                        claimed.kind()
                    ),
                );
            }
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
            Document::RunAnnouncement(a) => a.node.to_string(),
            Document::RunEnd(e) => e.node.to_string(),
            other => return Err(format!("a {} must be signed by the owner", other.kind())),
        };
        if speaks_for != signer.to_string() {
            return Err(format!("signed by {signer} but speaks for {speaks_for}"));
        }
        Ok(())
    }

    fn record(&mut self, doc: Document, serial: String) -> Result<Ingested, Refusal> {
        use RejectCode::{Forbidden, Invalid, Unknown};
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
                self.numbers.claim(a.revocations);
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
            Document::Revocation(r) => self.record_revocation(r),
            Document::Checkpoint(cp) => self.record_checkpoint(cp),
            Document::LinkPolicy(p) => self.record_policy(p),
            Document::RunAnnouncement(a) => self.record_run(a, serial),
            Document::RunEnd(e) => Ok(self.record_run_end(e)),
            // Join grants matter to the hub only.
            Document::JoinGrant(_) => Ok(Ingested::Unchanged),
        }
    }

    /// Records a link policy unless one of its name signed later is held.
    fn record_policy(&mut self, p: LinkPolicy) -> Result<Ingested, Refusal> {
        p.validate()
            .map_err(|e| (RejectCode::Invalid, e.to_string()))?;
        match self.policies.get(&p.name) {
            Some(old) if old.issued_at >= p.issued_at => return Ok(Ingested::Unchanged),
            None if self.policies.len() >= MAX_POLICIES => {
                return refuse(
                    RejectCode::Invalid,
                    format!("the collaboration holds {MAX_POLICIES} link policies already"),
                );
            }
            _ => {}
        }
        self.policies.insert(p.name.clone(), p);
        Ok(Ingested::Changed)
    }

    /// Records a run announcement: refused when an end of the run at or after its start is
    /// held (a replay of an ended run), or when its node has too many runs; unchanged when a
    /// later start of the same run is held.
    fn record_run(&mut self, a: RunAnnouncement, serial: String) -> Result<Ingested, Refusal> {
        a.validate()
            .map_err(|e| (RejectCode::Invalid, e.to_string()))?;
        let key = run_key(&a.node, a.task.task_id);
        if let Some(end) = self.ends.get(&key)
            && end.ended_at >= a.started_at
        {
            return refuse(
                RejectCode::Stale,
                format!(
                    "the run of task {} at {} started at {} ended at {}",
                    a.task.task_id, a.node, a.started_at, end.ended_at
                ),
            );
        }
        match self.runs.get(&key) {
            Some((old, _)) if old.started_at >= a.started_at => return Ok(Ingested::Unchanged),
            Some(_) => {}
            None => {
                let live = self.runs.values().filter(|(r, _)| r.node == a.node).count();
                if live >= MAX_RUNS_PER_NODE {
                    return refuse(
                        RejectCode::Invalid,
                        format!(
                            "{} has {live} runs announced and not ended; at most \
                             {MAX_RUNS_PER_NODE}",
                            a.node
                        ),
                    );
                }
            }
        }
        self.runs.insert(key, (a, serial));
        Ok(Ingested::Changed)
    }

    /// Records the end of a run: the announcement it ends (started at or before it) is
    /// withdrawn.
    fn record_run_end(&mut self, e: RunEnd) -> Ingested {
        let key = run_key(&e.node, e.task_id);
        if self
            .ends
            .get(&key)
            .is_some_and(|old| old.ended_at >= e.ended_at)
        {
            return Ingested::Unchanged;
        }
        if self
            .runs
            .get(&key)
            .is_some_and(|(a, _)| a.started_at <= e.ended_at)
        {
            self.runs.remove(&key);
        }
        self.ends.insert(key, e);
        Ingested::Changed
    }

    /// The runs announced and not ended, less those whose signer's certificate was revoked.
    pub fn live_runs(&self) -> Vec<&RunAnnouncement> {
        self.runs
            .values()
            .filter(|(_, serial)| !self.serial_revoked(serial))
            .map(|(a, _)| a)
            .collect()
    }

    /// The link policies held (withdrawn and expired ones included).
    pub fn link_policies(&self) -> impl Iterator<Item = &LinkPolicy> {
        self.policies.values()
    }

    /// Adds what `r` revokes to what is revoked.
    fn record_revocation(&mut self, r: Revocation) -> Result<Ingested, Refusal> {
        if r.number == 0 {
            return refuse(RejectCode::Invalid, "revocation numbers start at 1");
        }
        let serials: Vec<String> = r.serials.iter().map(|s| s.to_ascii_lowercase()).collect();
        let adds = r.links.iter().any(|l| !self.revoked_in.contains_key(l))
            || serials.iter().any(|s| !self.serial_revoked(s))
            || r.nodes.iter().any(|n| !self.node_revoked(n));
        if !adds && self.numbers.has(r.number) {
            return Ok(Ingested::Unchanged);
        }
        self.numbers.add(r.number);
        self.revoke(&r.links, &serials, &r.nodes, r.number);
        self.revocation.number = self.revocation.number.max(r.number);
        self.revocation.issued_at = self.revocation.issued_at.max(r.issued_at);
        Ok(Ingested::Changed)
    }

    /// Adds links, serials and nodes to what is revoked; links remember `number`.
    fn revoke(&mut self, links: &[String], serials: &[String], nodes: &[NodeRef], number: u64) {
        let list = &mut self.revocation;
        list.collab = self
            .collab
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        for link in links {
            self.revoked_in.entry(link.clone()).or_insert(number);
            insert_sorted(&mut list.links, link.clone());
        }
        for serial in serials {
            insert_sorted(&mut list.serials, serial.to_ascii_lowercase());
        }
        for node in nodes {
            insert_sorted(&mut list.nodes, node.clone());
        }
    }

    /// Folds a checkpoint in: what it revokes is added, revocations up to its number count as
    /// held, and links that can never be in force again (revoked, or expired when it was
    /// signed) are forgotten with their requests and decisions.
    fn record_checkpoint(&mut self, cp: Checkpoint) -> Result<Ingested, Refusal> {
        if let Some(current) = &self.checkpoint {
            if cp == *current {
                return Ok(Ingested::Unchanged);
            }
            if cp.number <= current.number {
                return refuse(
                    RejectCode::Stale,
                    format!(
                        "checkpoint {} is not newer than checkpoint {} already held: another \
                         owner command made one at the same time (nothing is lost; make a new \
                         one if it is still wanted)",
                        cp.number, current.number
                    ),
                );
            }
        }
        self.numbers.fold(cp.revocations);
        self.revoke(&cp.links, &cp.serials, &cp.nodes, cp.revocations);
        self.revocation.number = self.revocation.number.max(cp.revocations);
        self.revocation.issued_at = self.revocation.issued_at.max(cp.issued_at);
        let mut dead = BTreeSet::new();
        let mut expired = BTreeSet::new();
        let known = self.requests.values().map(|r| &r.terms);
        for terms in known.chain(self.approvals.values().map(|a| &a.terms)) {
            if terms.not_after <= cp.issued_at {
                expired.insert(terms.id.clone());
                dead.insert(terms.id.clone());
            } else if self.link_revoked(terms) {
                dead.insert(terms.id.clone());
            }
        }
        for id in &dead {
            self.requests.remove(id);
            self.approvals.remove(id);
            self.decisions.remove(id);
        }
        // An expired link stays out of force without being listed as revoked.
        for id in &expired {
            if self.revoked_in.remove(id).is_some() {
                self.revocation.links.retain(|l| l != id);
            }
        }
        let revoked_nodes = self.revocation.nodes.clone();
        self.adverts.retain(|node, _| !revoked_nodes.contains(node));
        // Runs and their ends matter for at most the longest lifetime after they happened: a
        // replayed announcement that old grants nothing (and the hub refuses it).
        let horizon = cp.issued_at.saturating_sub(MAX_LIFETIME_SECS);
        self.runs.retain(|_, (a, _)| a.started_at > horizon);
        self.ends.retain(|_, e| e.ended_at > horizon);
        // Policies stay, withdrawn ones too: dropping a withdrawal would let a replay of the
        // policy it withdrew count again.
        self.checkpoint = Some(cp);
        Ok(Ingested::Changed)
    }

    fn record_collab(&mut self, c: Collaboration) -> Result<Ingested, Refusal> {
        use RejectCode::{Invalid, Stale};
        if let Some(old) = &self.collab {
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
        self.collab = Some(c);
        self.bundle = Some(bundle);
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

    /// The terms of a known link (approved, else requested).
    pub fn terms(&self, id: &str) -> Option<&LinkTerms> {
        self.approvals
            .get(id)
            .map(|a| &a.terms)
            .or_else(|| self.requests.get(id).map(|r| &r.terms))
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
        status.state = if self.link_revoked(terms) {
            status.revoked_in = Some(
                self.revoked_in
                    .get(id)
                    .copied()
                    .unwrap_or(self.revocation.number),
            );
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

    /// Whether the link, or a node at either end, is revoked.
    fn link_revoked(&self, terms: &LinkTerms) -> bool {
        self.revoked_in.contains_key(&terms.id)
            || self.node_revoked(&terms.from)
            || self.node_revoked(&terms.to)
    }

    /// Whether this ledger's state still rests on `doc`: it is the collaboration version, the
    /// advertisement, request, approval or decision held, a revocation not folded into the
    /// checkpoint, or the checkpoint. A store may drop every stored document this is false for
    /// once the ledger has taken in everything stored: nothing a reader computes changes.
    pub fn holds(&self, doc: &Document) -> bool {
        match doc {
            Document::Collaboration(c) => self.collab.as_ref() == Some(c),
            Document::Advertisement(a) => self.adverts.get(&a.node).is_some_and(|(x, _)| x == a),
            Document::LinkRequest(r) => self.requests.get(&r.terms.id) == Some(r),
            Document::Approval(a) => self.approvals.get(&a.terms.id) == Some(a),
            Document::Decision(d) => self.decisions.get(&d.link_id).is_some_and(|(x, _)| x == d),
            Document::Revocation(r) => self
                .checkpoint
                .as_ref()
                .is_none_or(|cp| r.number > cp.revocations),
            Document::Checkpoint(cp) => self.checkpoint.as_ref() == Some(cp),
            Document::JoinGrant(_) => true,
            Document::LinkPolicy(p) => self.policies.get(&p.name) == Some(p),
            Document::RunAnnouncement(a) => self
                .runs
                .get(&run_key(&a.node, a.task.task_id))
                .is_some_and(|(x, _)| x == a),
            Document::RunEnd(e) => self.ends.get(&run_key(&e.node, e.task_id)) == Some(e),
        }
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
        if let Some(withheld) = self.withheld() {
            rejections.push(Rejection {
                code: RejectCode::Unknown,
                seq: None,
                kind: Some(DocKind::Revocation),
                subject: withheld.claimed.to_string(),
                reason: withheld.to_string(),
            });
            return (links, rejections);
        }
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
        let owner_signed: BTreeSet<String> = links.iter().map(|l| l.terms.id.clone()).collect();
        links.extend(
            self.task_links(now)
                .into_iter()
                .filter(|l| l.terms.concerns(local) && !owner_signed.contains(&l.terms.id)),
        );
        (links, rejections)
    }

    /// The task-lifetime links the link policies grant at `now` between the runs announced and
    /// not ended ([`runs::task_links`]), less those revoked (by link id, or a node at either
    /// end) or with an end that is no longer a member. The receiving node consented by
    /// announcing its run; its local veto (by link id) still applies downstream.
    pub fn task_links(&self, now: SystemTime) -> Vec<EffectiveLink> {
        if self.collab.is_none() || self.policies.is_empty() {
            return Vec::new();
        }
        let live = self.live_runs();
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for policy in self.policies.values() {
            for link in runs::task_links(policy, &live, now) {
                if self.link_revoked(&link.terms)
                    || self.check_members(&link.terms).is_err()
                    || !seen.insert(link.terms.id.clone())
                {
                    continue;
                }
                out.push(link);
            }
        }
        out
    }
}

/// Inserts `item` into the sorted `list` unless it is there.
fn insert_sorted<T: Ord>(list: &mut Vec<T>, item: T) {
    if let Err(at) = list.binary_search(&item) {
        list.insert(at, item);
    }
}

/// The refusal of a document the hub filed as something it is not.
fn mislabelled(env: &Envelope, kind: DocKind, subject: &str) -> Refusal {
    (
        RejectCode::Invalid,
        format!(
            "delivered as {} {} but the signed document is {kind} {subject}",
            env.kind, env.subject
        ),
    )
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

#[cfg(test)]
mod run_bounds {
    use super::*;
    use crate::{TaskRef, fixtures::Fixture};

    const IMG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn run(node: &str, task_id: u64) -> RunAnnouncement {
        RunAnnouncement {
            collab: "c".into(),
            node: node.parse().unwrap(),
            task: TaskRef {
                task_id,
                parent_id: None,
            },
            image: IMG.into(),
            ports: Vec::new(),
            started_at: 10,
        }
    }

    /// A node may hold at most `MAX_RUNS_PER_NODE` runs not ended; ending one makes room.
    /// (Recorded without signatures: the bound is what is tested here.)
    #[test]
    fn runs_per_node_are_bounded() {
        let f = Fixture::new("c", &["a/n1", "b/n1"]);
        let mut l = Ledger::new(&f.pin());
        l.ingest_jws(&f.collab_jws(), f.now).unwrap();
        for task in 0..MAX_RUNS_PER_NODE as u64 {
            l.record_run(run("a/n1", task), String::new()).unwrap();
        }
        let (code, reason) = l.record_run(run("a/n1", 9999), String::new()).unwrap_err();
        assert_eq!(code, RejectCode::Invalid);
        assert!(
            reason.contains("runs announced and not ended; at most 1024"),
            "{reason}"
        );
        // Another node is not held back, and an end makes room.
        l.record_run(run("b/n1", 9999), String::new()).unwrap();
        l.record_run_end(RunEnd {
            collab: "c".into(),
            node: "a/n1".parse().unwrap(),
            task_id: 0,
            ended_at: 10,
        });
        l.record_run(run("a/n1", 9999), String::new()).unwrap();
    }
}
