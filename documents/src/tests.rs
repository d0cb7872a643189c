//! Ledger tests: the happy path, every tampering a hub could try, and the time rules.

use std::time::Duration;

use crate::{
    Document, Envelope, Ingested, Ledger, LinkState, NodeRef, OwnerKey, Verdict, fixtures::Fixture,
    jws,
};

const HOUR: Duration = Duration::from_secs(3600);

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

fn fixture() -> Fixture {
    Fixture::new("collab-x", &["org-a/n1", "org-b/n1", "org-c/n1"])
}

fn ledger(f: &Fixture) -> Ledger {
    let mut l = Ledger::new(&f.pin());
    l.ingest_jws(&f.collab_jws(), f.now).unwrap();
    l
}

/// Ingests and expects acceptance.
fn accept(l: &mut Ledger, f: &Fixture, jws: String) {
    let env = f.envelope(jws);
    l.ingest(&env, f.now).unwrap();
}

/// Ingests and returns the rejection reason.
fn reject(l: &mut Ledger, env: &Envelope, f: &Fixture) -> String {
    l.ingest(env, f.now).unwrap_err().reason
}

#[test]
fn approved_link_is_effective_for_both_ends_only() {
    let f = fixture();
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365:mpc"], 2 * HOUR);
    accept(&mut l, &f, f.request(&terms));
    assert_eq!(
        l.status(&terms.id, f.now).unwrap().state,
        LinkState::Requested
    );
    accept(&mut l, &f, f.approval(&terms));

    for node in ["org-a/n1", "org-b/n1"] {
        let (links, rejections) = l.effective_links(&n(node), f.now);
        assert_eq!(links.len(), 1, "{node}");
        assert_eq!(links[0].terms, terms);
        assert_eq!(links[0].approved_by, "owner@example.org");
        assert!(rejections.is_empty());
    }
    assert!(l.effective_links(&n("org-c/n1"), f.now).0.is_empty());
}

#[test]
fn pure_entry_point_matches_the_ledger() {
    let f = fixture();
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    let docs = vec![
        f.envelope(f.request(&terms)),
        f.envelope(f.approval(&terms)),
    ];
    let (links, rejections) =
        crate::effective_links(&f.collab_jws(), &f.pin(), &docs, &n("org-b/n1"), f.now);
    assert_eq!(links.len(), 1);
    assert!(rejections.is_empty());
    // Under another pin nothing is trusted.
    let other = OwnerKey::generate().unwrap();
    let (links, rejections) = crate::effective_links(
        &f.collab_jws(),
        &jws::thumbprint(&other.public_jwk()),
        &docs,
        &n("org-b/n1"),
        f.now,
    );
    assert!(links.is_empty());
    assert!(
        rejections[0].reason.contains("not the pinned"),
        "{:?}",
        rejections
    );
}

#[test]
fn expiry_and_revocation_end_a_link() {
    let f = fixture();
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    accept(&mut l, &f, f.approval(&terms));
    assert_eq!(l.status(&terms.id, f.now).unwrap().state, LinkState::Active);
    assert_eq!(
        l.status(&terms.id, f.now + HOUR).unwrap().state,
        LinkState::Expired
    );

    accept(&mut l, &f, f.revocation(1, &[&terms.id]));
    let status = l.status(&terms.id, f.now).unwrap();
    assert_eq!(status.state, LinkState::Revoked);
    assert_eq!(status.revoked_in, Some(1));
    assert!(l.effective_links(&n("org-a/n1"), f.now).0.is_empty());
}

#[test]
fn flipped_byte_is_detected_and_state_kept() {
    let f = fixture();
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    accept(&mut l, &f, f.approval(&terms));
    let revocation = f.revocation(1, &[&terms.id]);
    // Flip one character of the signature part.
    let mut bytes = revocation.into_bytes();
    let last = bytes.len() - 5;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    let env = f.envelope(String::from_utf8(bytes).unwrap());
    let reason = reject(&mut l, &env, &f);
    assert!(
        reason.contains("owner signature does not verify"),
        "{reason}"
    );
    assert_eq!(
        l.effective_links(&n("org-a/n1"), f.now).0.len(),
        1,
        "last state kept"
    );
}

#[test]
fn approval_signed_by_another_key_is_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    let mallory = OwnerKey::generate().unwrap();
    let forged = jws::sign(
        &Document::Approval(crate::Approval {
            terms: terms.clone(),
            approved_by: "owner@example.org".into(),
            approved_at: jws::unix(f.now),
        }),
        &crate::Signer::Owner(&mallory),
    )
    .unwrap();
    let env = f.envelope(forged);
    let reason = reject(&mut l, &env, &f);
    assert!(reason.contains("not the owner key"), "{reason}");
    assert!(l.effective_links(&n("org-a/n1"), f.now).0.is_empty());
}

#[test]
fn approval_delivered_for_a_different_link_is_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let asked = f.terms("org-a/n1", "org-c/n1", &["22"], HOUR);
    let approved = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    accept(&mut l, &f, f.request(&asked));
    let mut env = f.envelope(f.approval(&approved));
    env.subject = asked.id.clone();
    let reason = reject(&mut l, &env, &f);
    assert!(
        reason.contains("but the signed document is approval"),
        "{reason}"
    );
    assert_eq!(
        l.status(&asked.id, f.now).unwrap().state,
        LinkState::Requested
    );
}

#[test]
fn approval_whose_terms_differ_from_the_request_is_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    accept(&mut l, &f, f.request(&terms));
    // The owner signs terms with the same id but another port: the id no longer derives.
    let mut widened = terms.clone();
    widened.ports[0].port = 22;
    let env = f.envelope(f.approval(&widened));
    let reason = reject(&mut l, &env, &f);
    assert!(reason.contains("does not match its terms"), "{reason}");
}

#[test]
fn replayed_old_revocation_list_is_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    accept(&mut l, &f, f.approval(&terms));
    let old = f.revocation(1, &[]);
    accept(&mut l, &f, old.clone());
    accept(&mut l, &f, f.revocation(2, &[&terms.id]));
    let env = f.envelope(old);
    let reason = reject(&mut l, &env, &f);
    assert!(reason.contains("older than list 2"), "{reason}");
    assert_eq!(
        l.status(&terms.id, f.now).unwrap().state,
        LinkState::Revoked
    );
}

#[test]
fn consent_and_veto_by_the_receiving_node() {
    let mut f = fixture();
    f.collab.policy.require_consent = true;
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    accept(&mut l, &f, f.approval(&terms));
    assert_eq!(
        l.status(&terms.id, f.now).unwrap().state,
        LinkState::Approved
    );

    // Only the receiving node may decide.
    let doc = Document::Decision(crate::Decision {
        collab: "collab-x".into(),
        link_id: terms.id.clone(),
        by: n("org-a/n1"),
        verdict: Verdict::Consent,
        reason: None,
        at: jws::unix(f.now),
    });
    let env = f.envelope(f.node_sign("org-a/n1", &doc));
    assert!(reject(&mut l, &env, &f).contains("only the receiving node org-b/n1"));
    // Nor may a node sign for another.
    let env = f.envelope(f.node_sign("org-c/n1", &doc));
    assert!(reject(&mut l, &env, &f).contains("signed by org-c/n1 but speaks for org-a/n1"));

    accept(&mut l, &f, f.decision(&terms, Verdict::Consent));
    assert_eq!(l.status(&terms.id, f.now).unwrap().state, LinkState::Active);
    f.now += Duration::from_secs(1);
    accept(&mut l, &f, f.decision(&terms, Verdict::Veto));
    assert_eq!(l.status(&terms.id, f.now).unwrap().state, LinkState::Vetoed);
}

#[test]
fn approvals_over_the_ttl_cap_are_invalid() {
    let mut f = fixture();
    f.collab.policy.max_link_ttl_secs = 3600;
    let mut l = ledger(&f);
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], 2 * HOUR);
    accept(&mut l, &f, f.approval(&terms));
    let (links, rejections) = l.effective_links(&n("org-a/n1"), f.now);
    assert!(links.is_empty());
    assert!(
        rejections[0]
            .reason
            .contains("over the collaboration's maximum"),
        "{rejections:?}"
    );
}

#[test]
fn documents_of_other_collaborations_and_non_members_are_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let other = Fixture::new("collab-y", &["org-a/n1", "org-b/n1"]);
    let terms = other.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    let env = other.envelope(other.approval(&terms));
    assert!(reject(&mut l, &env, &f).contains("belongs to collaboration \"collab-y\""));

    let stranger = f.terms("org-a/n1", "org-z/n1", &["1"], HOUR);
    let env = f.envelope(f.request(&stranger));
    assert!(reject(&mut l, &env, &f).contains("org-z/n1 is not a member"));
}

#[test]
fn node_documents_from_revoked_certificates_are_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let serial = f.nodes[&n("org-a/n1")].serial.clone();
    let doc = Document::Revocation(crate::Revocation {
        collab: "collab-x".into(),
        number: 1,
        serials: vec![serial],
        issued_at: jws::unix(f.now),
        ..Default::default()
    });
    accept(&mut l, &f, f.owner_sign(&doc));
    let env = f.envelope(f.advertisement("org-a/n1", "127.0.0.1:4433"));
    assert!(reject(&mut l, &env, &f).contains("is revoked"));
}

#[test]
fn node_documents_dated_in_the_future_are_refused() {
    let mut f = fixture();
    let mut l = ledger(&f);
    f.now += HOUR;
    let future = f.advertisement("org-a/n1", "127.0.0.1:1");
    f.now -= HOUR;
    let env = f.envelope(future);
    assert!(reject(&mut l, &env, &f).contains("in the future"));
}

#[test]
fn newer_collaboration_versions_replace_older_ones() {
    let mut f = fixture();
    let mut l = ledger(&f);
    let v1 = f.collab_jws();
    f.collab.version = 2;
    f.collab.members.pop();
    let env = f.envelope(f.collab_jws());
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Changed);
    assert_eq!(l.collaboration().unwrap().members.len(), 2);
    let env = f.envelope(v1);
    assert!(reject(&mut l, &env, &f).contains("older than version 2"));
}

#[test]
fn rendezvous_servers_are_checked_at_ingest() {
    let mut f = fixture();
    let mut l = ledger(&f);
    f.collab.version = 2;
    f.collab.rendezvous = vec![crate::RendezvousServer {
        address: "rv.example".into(),
        pin_sha256: "ab".repeat(32),
    }];
    let env = f.envelope(f.collab_jws());
    let why = reject(&mut l, &env, &f);
    assert!(
        why.contains("address \"rv.example\" is not host:port"),
        "{why}"
    );
    f.collab.version = 3;
    f.collab.rendezvous[0].address = "rv.example:443".into();
    let env = f.envelope(f.collab_jws());
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Changed);
    assert_eq!(l.collaboration().unwrap().rendezvous.len(), 1);
}

#[test]
fn oversized_and_garbage_documents_are_refused() {
    let f = fixture();
    let mut l = ledger(&f);
    let err = l
        .ingest_jws(&"a".repeat(jws::MAX_JWS_BYTES + 1), f.now)
        .unwrap_err();
    assert!(err.reason.contains("at most 65536"), "{err}");
    let err = l.ingest_jws("not.a.jws", f.now).unwrap_err();
    assert!(err.reason.starts_with("malformed document"), "{err}");
}

#[test]
fn signatures_are_low_s_and_a_rewritten_signature_is_refused() {
    let f = fixture();
    let terms = f.terms("org-a/n1", "org-b/n1", &["11365"], HOUR);
    // ECDSA yields a high s half of the time; every signature made here is low.
    for _ in 0..16 {
        let owner = f.approval(&terms);
        let node = f.request(&terms);
        for jws in [&owner, &node] {
            assert_eq!(jws::malleate(jws).unwrap().len(), jws.len());
            let mut l = ledger(&f);
            if jws == &owner {
                accept(&mut l, &f, f.request(&terms));
            }
            let env = f.envelope(jws::malleate(jws).unwrap());
            let reason = reject(&mut l, &env, &f);
            assert!(reason.contains("not canonical"), "{reason}");
            accept(&mut l, &f, jws.clone());
        }
    }
}

#[test]
fn links_in_force_leave_out_local_vetoes_and_end_at_expiry() {
    let f = fixture();
    let mut l = ledger(&f);
    let short = f.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    let long = f.terms("org-c/n1", "org-a/n1", &["2"], 2 * HOUR);
    for t in [&short, &long] {
        accept(&mut l, &f, f.request(t));
        accept(&mut l, &f, f.approval(t));
    }
    let a = n("org-a/n1");
    let none = std::collections::BTreeSet::new();
    let (links, _) = l.links_in_force(&a, &none, f.now);
    assert_eq!(links.len(), 2);
    assert_eq!(
        Ledger::next_expiry(&links),
        Some(fedmesh_certs::time::from_unix(short.not_after))
    );

    let vetoed = std::collections::BTreeSet::from([long.id.clone()]);
    let (links, _) = l.links_in_force(&a, &vetoed, f.now);
    assert_eq!(links.len(), 1, "a local veto leaves the link out");
    assert_eq!(links[0].terms, short);

    let at_expiry = fedmesh_certs::time::from_unix(short.not_after);
    let (links, _) = l.links_in_force(&a, &none, at_expiry);
    assert_eq!(links.len(), 1, "in force until not_after, not at it");
    assert_eq!(links[0].terms, long);
    assert_eq!(Ledger::next_expiry(&[]), None);
}
