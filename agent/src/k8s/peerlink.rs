//! The `PeerLink` custom resource (`fedmesh.io/v1alpha1`): one object per link that concerns
//! this node, so `kubectl get peerlinks` is a table of who may talk to whom, and the one place a
//! sysadmin vetoes a link for their node (`spec.veto: true`).
//!
//! The agent owns `spec` (except `veto` and `vetoReason`, which only the sysadmin sets) and
//! `status`; the signed documents stay the truth, the object only reports them. Conditions
//! follow linkerd2's habit: type and reason strings are constants in [`conditions`] and
//! [`reasons`], and every condition has one constructor.

use std::time::SystemTime;

use fedmesh_certs::time::{self, unix};
use fedmesh_documents::{LinkState, LinkStatus, NodeRef, PortSpec, Verdict};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::FIELD_MANAGER;
use fedmesh_mesh_config::render::{COLLABORATION, DIRECTION, MANAGED_BY, PEER};

/// A link that concerns this node, as the agent last verified it.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "PeerLink",
    namespaced,
    status = "PeerLinkStatus",
    shortname = "pl",
    category = "fedmesh",
    doc = "A peer link that concerns this node: who may talk to whom, on which ports, until when, \
           approved by whom. Written by the fedmesh agent from owner-signed documents; set \
           spec.veto to true to refuse the link for this node.",
    printcolumn = r#"{"name": "Peer", "type": "string", "jsonPath": ".spec.peer"}"#,
    printcolumn = r#"{"name": "Direction", "type": "string", "jsonPath": ".spec.direction"}"#,
    printcolumn = r#"{"name": "Ports", "type": "string", "jsonPath": ".spec.ports"}"#,
    printcolumn = r#"{"name": "State", "type": "string", "jsonPath": ".status.state"}"#,
    printcolumn = r#"{"name": "Expires", "type": "string", "jsonPath": ".spec.expires"}"#,
    printcolumn = r#"{"name": "Approved-By", "type": "string", "jsonPath": ".spec.approvedBy"}"#,
    printcolumn = r#"{"name": "Veto", "type": "boolean", "jsonPath": ".spec.veto"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerLinkSpec {
    /// The link id (`l-` and 16 hex digits of the hash of its signed terms).
    pub link_id: String,
    /// The other end of the link, `<org>/<node>`.
    pub peer: String,
    /// `outbound`: this node dials the peer; `inbound`: the peer dials this node.
    pub direction: Direction,
    /// The ports the link allows, `<port>[:<label>]`, comma-separated.
    pub ports: String,
    /// When the link stops being in force (RFC 3339, UTC).
    pub expires: String,
    /// Who approved the link, when someone did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// Set by the sysadmin: refuse this link for this node. The agent stops carrying it, removes
    /// its objects and, for an inbound link, reports a node-signed veto to the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veto: Option<bool>,
    /// Set by the sysadmin: why (recorded in the signed veto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veto_reason: Option<String>,
}

/// Which way a link goes, seen from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This node dials the peer.
    Outbound,
    /// The peer dials this node.
    Inbound,
}

/// What the agent reports about a link.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerLinkStatus {
    /// `requested`, `approved`, `vetoed`, `active`, `expired`, `revoked` or `invalid`.
    pub state: String,
    /// Approved, Consented, Active, Expired, Revoked and Applied.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Condition types.
pub mod conditions {
    /// The collaboration owner signed the link.
    pub const APPROVED: &str = "Approved";
    /// The receiving node consented (or the collaboration does not ask it to).
    pub const CONSENTED: &str = "Consented";
    /// The link is in force at this node.
    pub const ACTIVE: &str = "Active";
    /// The link is past its expiry.
    pub const EXPIRED: &str = "Expired";
    /// The owner revoked the link.
    pub const REVOKED: &str = "Revoked";
    /// The objects that carry the link are applied in this cluster.
    pub const APPLIED: &str = "Applied";
}

/// Condition reasons.
pub mod reasons {
    /// Signed by the owner.
    pub const OWNER_APPROVED: &str = "OwnerApproved";
    /// Requested, not approved yet.
    pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
    /// The receiving node consented.
    pub const NODE_CONSENTED: &str = "NodeConsented";
    /// The collaboration does not ask for consent.
    pub const CONSENT_NOT_REQUIRED: &str = "ConsentNotRequired";
    /// The receiving node has not decided yet.
    pub const AWAITING_CONSENT: &str = "AwaitingConsent";
    /// Vetoed (by the receiving node, or by this node's sysadmin).
    pub const VETOED: &str = "Vetoed";
    /// Approved, consented, not expired, not revoked.
    pub const IN_FORCE: &str = "InForce";
    /// Not in force; the message says why.
    pub const NOT_IN_FORCE: &str = "NotInForce";
    /// Past `expires`.
    pub const PAST_EXPIRY: &str = "PastExpiry";
    /// Before `expires`.
    pub const BEFORE_EXPIRY: &str = "BeforeExpiry";
    /// On the owner's revocation list.
    pub const ON_REVOCATION_LIST: &str = "OnRevocationList";
    /// Not revoked.
    pub const NOT_REVOKED: &str = "NotRevoked";
    /// The objects are applied.
    pub const OBJECTS_APPLIED: &str = "ObjectsApplied";
    /// Nothing is applied for a link that is not in force.
    pub const NOTHING_APPLIED: &str = "NothingApplied";
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, now: &Time) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: now.clone(),
        observed_generation: None,
    }
}

/// `Approved`.
pub fn approved(link: &LinkStatus, now: &Time) -> Condition {
    match (&link.approved_by, link.approved_at) {
        (Some(by), at) => condition(
            conditions::APPROVED,
            true,
            reasons::OWNER_APPROVED,
            format!("approved by {by} at {}", rfc3339(at.unwrap_or_default())),
            now,
        ),
        (None, _) => condition(
            conditions::APPROVED,
            false,
            reasons::AWAITING_APPROVAL,
            "requested; the collaboration owner has not approved it".into(),
            now,
        ),
    }
}

/// `Consented`.
pub fn consented(
    link: &LinkStatus,
    consent_required: bool,
    veto_here: bool,
    now: &Time,
) -> Condition {
    let (ok, reason, message) = match (link.decision, veto_here) {
        (Some(Verdict::Veto), _) => (
            false,
            reasons::VETOED,
            format!("{} vetoed it", link.terms.to),
        ),
        (_, true) => (
            false,
            reasons::VETOED,
            "vetoed by this node's sysadmin (spec.veto)".into(),
        ),
        (Some(Verdict::Consent), false) => (
            true,
            reasons::NODE_CONSENTED,
            format!("{} consented", link.terms.to),
        ),
        (None, false) if !consent_required => (
            true,
            reasons::CONSENT_NOT_REQUIRED,
            "the collaboration does not ask receiving nodes to consent".into(),
        ),
        (None, false) => (
            false,
            reasons::AWAITING_CONSENT,
            format!("waiting for {} to consent", link.terms.to),
        ),
    };
    condition(conditions::CONSENTED, ok, reason, message, now)
}

/// `Active`: in force at this node (a local veto takes it out of force here at once).
pub fn active(link: &LinkStatus, veto_here: bool, now: &Time) -> Condition {
    if link.state == LinkState::Active && !veto_here {
        return condition(
            conditions::ACTIVE,
            true,
            reasons::IN_FORCE,
            "approved, consented, not expired and not revoked".into(),
            now,
        );
    }
    let why = if veto_here {
        "vetoed by this node's sysadmin".to_owned()
    } else {
        match &link.reason {
            Some(reason) => format!("{}: {reason}", link.state),
            None => link.state.to_string(),
        }
    };
    condition(conditions::ACTIVE, false, reasons::NOT_IN_FORCE, why, now)
}

/// `Expired`.
pub fn expired(link: &LinkStatus, at: SystemTime, now: &Time) -> Condition {
    let expires = rfc3339(link.terms.not_after);
    if unix(at) >= link.terms.not_after {
        condition(
            conditions::EXPIRED,
            true,
            reasons::PAST_EXPIRY,
            format!("expired at {expires}"),
            now,
        )
    } else {
        condition(
            conditions::EXPIRED,
            false,
            reasons::BEFORE_EXPIRY,
            format!("expires at {expires}"),
            now,
        )
    }
}

/// `Revoked`.
pub fn revoked(link: &LinkStatus, now: &Time) -> Condition {
    match link.revoked_in {
        Some(number) => condition(
            conditions::REVOKED,
            true,
            reasons::ON_REVOCATION_LIST,
            format!("revoked by the owner in revocation list {number}"),
            now,
        ),
        None => condition(
            conditions::REVOKED,
            false,
            reasons::NOT_REVOKED,
            "not on the owner's revocation list".into(),
            now,
        ),
    }
}

/// `Applied`: whether the objects carrying the link are in the cluster (the status is written
/// only after a pass applied everything).
pub fn applied(in_force: bool, now: &Time) -> Condition {
    if in_force {
        condition(
            conditions::APPLIED,
            true,
            reasons::OBJECTS_APPLIED,
            "the objects that carry this link are applied".into(),
            now,
        )
    } else {
        condition(
            conditions::APPLIED,
            false,
            reasons::NOTHING_APPLIED,
            "nothing is applied for a link that is not in force here".into(),
            now,
        )
    }
}

/// The spec the agent writes for `link`, seen from `local`.
pub fn spec(link: &LinkStatus, local: &NodeRef) -> PeerLinkSpec {
    let t = &link.terms;
    let (peer, direction) = if t.from == *local {
        (&t.to, Direction::Outbound)
    } else {
        (&t.from, Direction::Inbound)
    };
    PeerLinkSpec {
        link_id: t.id.clone(),
        peer: peer.to_string(),
        direction,
        ports: ports(&t.ports),
        expires: rfc3339(t.not_after),
        approved_by: link.approved_by.clone(),
        veto: None,
        veto_reason: None,
    }
}

/// The status the agent writes for `link` at `at`, once a pass applied everything.
/// `veto_here`: the sysadmin set `spec.veto`.
pub fn status(
    link: &LinkStatus,
    consent_required: bool,
    veto_here: bool,
    at: SystemTime,
) -> PeerLinkStatus {
    let now =
        Time(Timestamp::from_second(i64::try_from(unix(at)).unwrap_or(0)).unwrap_or_default());
    let in_force = link.state == LinkState::Active && !veto_here;
    let state = if veto_here && matches!(link.state, LinkState::Active | LinkState::Approved) {
        LinkState::Vetoed
    } else {
        link.state
    };
    PeerLinkStatus {
        state: state.to_string(),
        conditions: vec![
            approved(link, &now),
            consented(link, consent_required, veto_here, &now),
            active(link, veto_here, &now),
            expired(link, at, &now),
            revoked(link, &now),
            applied(in_force, &now),
        ],
    }
}

/// `desired` with every condition whose status did not change keeping its live
/// `lastTransitionTime`, so an unchanged link compares equal and is not written again.
pub fn keep_transition_times(
    mut desired: PeerLinkStatus,
    live: Option<&PeerLinkStatus>,
) -> PeerLinkStatus {
    let Some(live) = live else {
        return desired;
    };
    for c in &mut desired.conditions {
        if let Some(old) = live
            .conditions
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    desired
}

/// The object to apply for `spec` (only the fields the agent owns).
pub fn object(namespace: &str, collab: &str, spec: &PeerLinkSpec) -> Value {
    let peer = spec.peer.replace('/', ".");
    json!({
        "apiVersion": "fedmesh.io/v1alpha1",
        "kind": "PeerLink",
        "metadata": {
            "name": spec.link_id,
            "namespace": namespace,
            "labels": {
                MANAGED_BY: FIELD_MANAGER,
                COLLABORATION: collab,
                PEER: peer,
                DIRECTION: spec.direction,
            },
        },
        "spec": spec,
    })
}

/// The status patch for the `status` subresource.
pub fn status_object(name: &str, status: &PeerLinkStatus) -> Value {
    json!({
        "apiVersion": "fedmesh.io/v1alpha1",
        "kind": "PeerLink",
        "metadata": {"name": name},
        "status": status,
    })
}

/// Whether a link's PeerLink is still shown: until a day after it expired.
pub fn shown(link: &LinkStatus, at: SystemTime) -> bool {
    unix(at) < link.terms.not_after.saturating_add(86_400)
}

fn ports(ports: &[PortSpec]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// RFC 3339 in UTC.
pub(crate) fn rfc3339(secs: u64) -> String {
    time::rfc3339(time::from_unix(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_documents::LinkTerms;

    fn link(state: LinkState, decision: Option<Verdict>) -> LinkStatus {
        let terms = LinkTerms::new(
            "c",
            "a/n1".parse().unwrap(),
            "b/n1".parse().unwrap(),
            vec!["11366:mpc".parse().unwrap(), "8080".parse().unwrap()],
            1_900_000_000,
            None,
        )
        .unwrap();
        LinkStatus {
            terms,
            state,
            requested_by: Some("a/n1".into()),
            requested_at: Some(1_800_000_000),
            approved_by: Some("Owner".into()),
            approved_at: Some(1_800_000_000),
            decision,
            decided_at: None,
            revoked_in: None,
            reason: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        time::from_unix(secs)
    }

    fn summary(s: &PeerLinkStatus) -> Vec<(String, String, String)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn rows(rows: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        rows.iter()
            .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
            .collect()
    }

    #[test]
    fn spec_reads_like_a_table_row() {
        let l = link(LinkState::Active, None);
        let outbound = spec(&l, &"a/n1".parse().unwrap());
        assert_eq!(
            outbound,
            PeerLinkSpec {
                link_id: l.terms.id.clone(),
                peer: "b/n1".into(),
                direction: Direction::Outbound,
                ports: "8080,11366:mpc".into(),
                expires: "2030-03-17T17:46:40Z".into(),
                approved_by: Some("Owner".into()),
                veto: None,
                veto_reason: None,
            }
        );
        let inbound = spec(&l, &"b/n1".parse().unwrap());
        assert_eq!(
            (inbound.peer.as_str(), inbound.direction),
            ("a/n1", Direction::Inbound)
        );
        let obj = object("fedmesh", "c", &inbound);
        assert_eq!(obj["metadata"]["labels"]["fedmesh.io/peer"], "a.n1");
        assert_eq!(obj["metadata"]["labels"]["fedmesh.io/direction"], "inbound");
        assert!(
            obj["spec"].get("veto").is_none(),
            "the sysadmin owns spec.veto"
        );
    }

    #[test]
    fn conditions_of_an_active_link() {
        let s = status(
            &link(LinkState::Active, None),
            false,
            false,
            at(1_800_000_100),
        );
        assert_eq!(s.state, "active");
        assert_eq!(
            summary(&s),
            rows(&[
                ("Approved", "True", "OwnerApproved"),
                ("Consented", "True", "ConsentNotRequired"),
                ("Active", "True", "InForce"),
                ("Expired", "False", "BeforeExpiry"),
                ("Revoked", "False", "NotRevoked"),
                ("Applied", "True", "ObjectsApplied"),
            ])
        );
        assert_eq!(
            s.conditions[0].message,
            "approved by Owner at 2027-01-15T08:00:00Z"
        );
    }

    #[test]
    fn a_local_veto_takes_the_link_out_of_force_at_once() {
        let s = status(
            &link(LinkState::Active, None),
            false,
            true,
            at(1_800_000_100),
        );
        assert_eq!(s.state, "vetoed");
        assert_eq!(
            summary(&s)[1..3],
            rows(&[
                ("Consented", "False", "Vetoed"),
                ("Active", "False", "NotInForce"),
            ])
        );
        assert_eq!(s.conditions[5].reason, reasons::NOTHING_APPLIED);
    }

    #[test]
    fn revoked_expired_and_awaiting_consent() {
        let mut r = link(LinkState::Revoked, None);
        r.revoked_in = Some(3);
        let s = status(&r, true, false, at(1_800_000_100));
        assert_eq!(s.state, "revoked");
        assert_eq!(
            s.conditions[4].message,
            "revoked by the owner in revocation list 3"
        );
        assert_eq!(s.conditions[1].reason, reasons::AWAITING_CONSENT);
        assert_eq!(s.conditions[2].message, "revoked");
        let e = status(
            &link(LinkState::Expired, None),
            false,
            false,
            at(1_900_000_000),
        );
        assert_eq!(
            summary(&e)[3],
            rows(&[("Expired", "True", "PastExpiry")])[0]
        );
        assert!(shown(&link(LinkState::Expired, None), at(1_900_086_399)));
        assert!(!shown(&link(LinkState::Expired, None), at(1_900_086_400)));
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let l = link(LinkState::Active, None);
        let first = status(&l, false, false, at(1_800_000_100));
        let later = status(&l, false, false, at(1_800_000_900));
        assert_ne!(first, later);
        assert_eq!(keep_transition_times(later, Some(&first)), first);
        let vetoed =
            keep_transition_times(status(&l, false, true, at(1_800_000_900)), Some(&first));
        assert_eq!(vetoed.conditions[0], first.conditions[0]);
        assert_ne!(
            vetoed.conditions[2].last_transition_time,
            first.conditions[2].last_transition_time
        );
    }
}
