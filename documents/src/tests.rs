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
            revocations: 0,
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
fn revocations_add_up_and_replays_change_nothing() {
    let f = fixture();
    let mut l = ledger(&f);
    let t1 = f.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    let t2 = f.terms("org-a/n1", "org-c/n1", &["2"], HOUR);
    let t3 = f.terms("org-b/n1", "org-c/n1", &["3"], HOUR);
    for t in [&t1, &t2, &t3] {
        accept(&mut l, &f, f.approval(t));
    }
    // Two owner commands revoking at the same time sign the same number: both count.
    let first = f.revocation(1, &[&t1.id]);
    accept(&mut l, &f, first.clone());
    let env = f.envelope(f.revocation(1, &[&t2.id]));
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Changed);
    // A cumulative list of the old kind adds what it lists.
    accept(&mut l, &f, f.revocation(2, &[&t1.id, &t3.id]));
    for t in [&t1, &t2, &t3] {
        assert_eq!(l.status(&t.id, f.now).unwrap().state, LinkState::Revoked);
    }
    assert_eq!(l.status(&t2.id, f.now).unwrap().revoked_in, Some(1));
    assert_eq!(l.status(&t3.id, f.now).unwrap().revoked_in, Some(2));
    assert_eq!(l.revocation().links.len(), 3);
    // Replayed, or the same again under a known number: nothing changes, nothing is refused.
    let env = f.envelope(first);
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Unchanged);
    let env = f.envelope(f.revocation(2, &[&t3.id]));
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Unchanged);
    let env = f.envelope(f.revocation(0, &[]));
    assert!(reject(&mut l, &env, &f).contains("start at 1"));
    assert_eq!(l.withheld(), None);
}

#[test]
fn withheld_revocations_are_noticed_and_no_link_is_in_force() {
    let f = fixture();
    let mut l = ledger(&f);
    let t1 = f.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    let t2 = f.terms("org-a/n1", "org-c/n1", &["2"], HOUR);
    accept(&mut l, &f, f.approval(&t1));
    // Revocation 2 is signed by an owner who had seen 1: 1 exists and did not arrive.
    accept(&mut l, &f, f.revocation(2, &[&t2.id]));
    let withheld = l.withheld().unwrap();
    assert_eq!((withheld.through, withheld.claimed), (0, 2));
    let (links, rejections) = l.effective_links(&n("org-a/n1"), f.now);
    assert!(links.is_empty(), "fail closed");
    assert!(
        rejections[0].reason.contains("withholds revocations"),
        "{rejections:?}"
    );
    accept(&mut l, &f, f.revocation(1, &[]));
    assert_eq!(l.withheld(), None);
    assert_eq!(l.effective_links(&n("org-a/n1"), f.now).0.len(), 1);

    // An approval names the revocations its owner had seen.
    let mut doc = crate::Approval {
        terms: t2.clone(),
        approved_by: "owner@example.org".into(),
        approved_at: jws::unix(f.now),
        revocations: 3,
    };
    accept(&mut l, &f, f.owner_sign(&Document::Approval(doc.clone())));
    assert_eq!(l.withheld().map(|w| w.claimed), Some(3));
    assert!(l.effective_links(&n("org-b/n1"), f.now).0.is_empty());
    accept(&mut l, &f, f.revocation(3, &[]));
    assert_eq!(l.withheld(), None);
    doc.revocations = 0;
    assert_eq!(l.effective_links(&n("org-b/n1"), f.now).0.len(), 1);
}

#[test]
fn documents_are_verified_once() {
    let f = fixture();
    let mut l = ledger(&f);
    let advert = f.envelope(f.advertisement("org-a/n1", "127.0.0.1:1"));
    assert_eq!(l.ingest(&advert, f.now).unwrap(), Ingested::Changed);
    // Verified again, the same document would be refused (signed in this clock's future): known
    // by its hash, it is not verified again.
    let past = f.now - 2 * HOUR;
    assert_eq!(l.ingest(&advert, past).unwrap(), Ingested::Unchanged);
    assert_eq!(
        l.ingest_jws(&f.collab_jws(), past).unwrap(),
        Ingested::Unchanged
    );
    // Known, but filed under another subject: still refused.
    let mut mislabelled = advert.clone();
    mislabelled.subject = "org-b/n1".into();
    assert!(reject(&mut l, &mislabelled, &f).contains("delivered as advertisement org-b/n1"));
}

#[test]
fn a_node_ledger_verifies_only_what_can_concern_it() {
    let f = fixture();
    let c = n("org-c/n1");
    let mut l = Ledger::for_node(&f.pin(), &c);
    l.ingest_jws(&f.collab_jws(), f.now).unwrap();
    let ab = f.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    for jws in [
        f.request(&ab),
        f.approval(&ab),
        f.decision(&ab, Verdict::Veto),
    ] {
        let env = f.envelope(jws);
        assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Skipped);
    }
    // A forgery about another link is not even looked at; one about this node's is refused.
    let mut forged = f.approval(&ab);
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert_eq!(
        l.ingest(&f.envelope(forged), f.now).unwrap(),
        Ingested::Skipped
    );
    let ac = f.terms("org-a/n1", "org-c/n1", &["2"], HOUR);
    let mut forged = f.approval(&ac);
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert!(l.ingest(&f.envelope(forged), f.now).is_err());

    // Advertisements of nodes without a link to this one wait unverified.
    let env = f.envelope(f.advertisement("org-a/n1", "127.0.0.1:1"));
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Skipped);
    let mut forged = f.advertisement("org-b/n1", "127.0.0.1:2");
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert_eq!(
        l.ingest(&f.envelope(forged), f.now).unwrap(),
        Ingested::Skipped
    );
    assert!(l.advertisement(&n("org-a/n1")).is_none());
    // A link makes org-a's advertisement matter: it is verified then.
    accept(&mut l, &f, f.approval(&ac));
    assert_eq!(
        l.advertisement(&n("org-a/n1")).unwrap().quic(),
        Some("127.0.0.1:1")
    );
    assert!(l.take_late_rejections().is_empty());
    let bc = f.terms("org-b/n1", "org-c/n1", &["3"], HOUR);
    accept(&mut l, &f, f.approval(&bc));
    let late = l.take_late_rejections();
    assert_eq!(
        late.len(),
        1,
        "the forged advertisement fails when it matters"
    );
    assert!(late[0].reason.contains("does not verify"), "{late:?}");
    assert!(l.advertisement(&n("org-b/n1")).is_none());
    assert_eq!(l.effective_links(&c, f.now).0.len(), 2);
    // Revocations always count, whatever they are about.
    accept(&mut l, &f, f.revocation(1, &[&ab.id]));
    assert_eq!(l.revocation().links, vec![ab.id.clone()]);
}

fn checkpoint(f: &Fixture, number: u64, revocations: u64, links: &[&str]) -> String {
    f.owner_sign(&Document::Checkpoint(crate::Checkpoint {
        collab: f.collab.id.clone(),
        number,
        revocations,
        links: links.iter().map(|s| (*s).to_owned()).collect(),
        serials: Vec::new(),
        nodes: Vec::new(),
        issued_at: jws::unix(f.now),
    }))
}

#[test]
fn a_checkpoint_folds_revocations_and_forgets_settled_links() {
    let f = fixture();
    let live = f.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    let revoked = f.terms("org-a/n1", "org-c/n1", &["2"], HOUR);
    let expired = f.terms("org-b/n1", "org-c/n1", &["3"], Duration::ZERO);
    let history: Vec<Envelope> = [
        f.request(&live),
        f.approval(&live),
        f.request(&revoked),
        f.approval(&revoked),
        f.request(&expired),
        f.revocation(1, &[&revoked.id]),
        f.revocation(2, &[&expired.id]),
    ]
    .into_iter()
    .map(|jws| f.envelope(jws))
    .collect();
    let mut l = ledger(&f);
    for env in &history {
        l.ingest(env, f.now).unwrap();
    }
    let cp = f.envelope(checkpoint(&f, 1, 2, &[&revoked.id]));
    assert_eq!(l.ingest(&cp, f.now).unwrap(), Ingested::Changed);
    let ids: Vec<String> = l.links(f.now).into_iter().map(|s| s.terms.id).collect();
    assert_eq!(
        ids,
        vec![live.id.clone()],
        "revoked and expired links are forgotten"
    );
    assert_eq!(l.revocation().links, vec![revoked.id.clone()]);
    // What the ledger still rests on: the live link's documents and the checkpoint.
    let held: Vec<bool> = history
        .iter()
        .map(|e| l.holds(&jws::peek(&e.jws).unwrap().1))
        .collect();
    assert_eq!(held, [true, true, false, false, false, false, false]);

    // A reader given the checkpoint first and then what is held computes the same.
    let mut fresh = ledger(&f);
    fresh.ingest(&cp, f.now).unwrap();
    for (env, keep) in history.iter().zip(&held) {
        if *keep {
            fresh.ingest(env, f.now).unwrap();
        }
    }
    assert_eq!(fresh.links(f.now), l.links(f.now));
    assert_eq!(fresh.revocation(), l.revocation());
    assert_eq!(fresh.withheld(), None);
    // A re-served approval of the revoked link stays revoked.
    fresh.ingest(&history[3], f.now).unwrap();
    assert_eq!(
        fresh.status(&revoked.id, f.now).unwrap().state,
        LinkState::Revoked
    );

    // Two checkpoints made at once: the second names the real cause.
    let env = f.envelope(checkpoint(&f, 1, 2, &[]));
    let reason = reject(&mut l, &env, &f);
    assert!(
        reason.contains("another owner command made one at the same time"),
        "{reason}"
    );
    assert_eq!(l.ingest(&cp, f.now).unwrap(), Ingested::Unchanged);
}

#[test]
fn a_ledger_round_trips_through_json() {
    let f = fixture();
    let mut l = Ledger::for_node(&f.pin(), &n("org-a/n1"));
    l.ingest_jws(&f.collab_jws(), f.now).unwrap();
    let t = f.terms("org-a/n1", "org-b/n1", &["1"], HOUR);
    accept(&mut l, &f, f.approval(&t));
    accept(&mut l, &f, f.revocation(1, &[]));
    let back = Ledger::from_json(&l.to_json()).unwrap();
    assert_eq!(back.links(f.now), l.links(f.now));
    assert_eq!(back.cursor(), l.cursor());
    assert!(back.trust_bundle().is_some());
    assert_eq!(back.revocations_through(), 1);
    assert!(Ledger::from_json("{").is_err());
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
    // The same old version again is known and changes nothing; another old one is refused.
    let env = f.envelope(v1);
    assert_eq!(l.ingest(&env, f.now).unwrap(), Ingested::Unchanged);
    f.collab.version = 1;
    f.collab.issued_at += 1;
    let env = f.envelope(f.collab_jws());
    assert!(reject(&mut l, &env, &f).contains("older than version 2"));
    assert_eq!(l.collaboration().unwrap().members.len(), 2);
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

mod task_links {
    use super::*;
    use crate::{
        RejectCode, TaskRef,
        runs::{LinkPolicy, RunAnnouncement, RunEnd},
    };

    const IMG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn policy(f: &Fixture, issued_at: u64, not_after: u64) -> String {
        f.owner_sign(&Document::LinkPolicy(LinkPolicy {
            collab: f.collab.id.clone(),
            name: "mpc".into(),
            images: vec![IMG.into()],
            ports: vec!["11365:mpc".parse().unwrap()],
            orgs: vec!["org-a".into(), "org-b".into(), "org-c".into()],
            max_lifetime_secs: 3600,
            not_after,
            issued_at,
        }))
    }

    fn announce(f: &Fixture, node: &str, task: u64, image: &str, started_at: u64) -> String {
        announce_as(f, node, node, task, image, started_at)
    }

    fn announce_as(
        f: &Fixture,
        signer: &str,
        node: &str,
        task: u64,
        image: &str,
        started_at: u64,
    ) -> String {
        f.node_sign(
            signer,
            &Document::RunAnnouncement(RunAnnouncement {
                collab: f.collab.id.clone(),
                node: n(node),
                task: TaskRef {
                    task_id: task,
                    parent_id: None,
                },
                image: image.into(),
                ports: vec!["11365:mpc".parse().unwrap()],
                started_at,
            }),
        )
    }

    fn end(f: &Fixture, node: &str, task: u64, ended_at: u64) -> String {
        f.node_sign(
            node,
            &Document::RunEnd(RunEnd {
                collab: f.collab.id.clone(),
                node: n(node),
                task_id: task,
                ended_at,
            }),
        )
    }

    fn peers(l: &Ledger, node: &str, f: &Fixture) -> Vec<String> {
        let mut v: Vec<String> = l
            .effective_links(&n(node), f.now)
            .0
            .iter()
            .map(|l| format!("{}>{}", l.terms.from, l.terms.to))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn announced_runs_link_under_a_policy_until_one_ends() {
        let f = fixture();
        let now = jws::unix(f.now);
        let mut l = ledger(&f);
        accept(&mut l, &f, policy(&f, now, now + 7200));
        accept(&mut l, &f, announce(&f, "org-a/n1", 7, IMG, now));
        assert!(
            peers(&l, "org-a/n1", &f).is_empty(),
            "one run links to nobody"
        );
        accept(&mut l, &f, announce(&f, "org-b/n1", 7, IMG, now));
        accept(&mut l, &f, announce(&f, "org-c/n1", 7, OTHER, now));
        assert_eq!(
            peers(&l, "org-a/n1", &f),
            ["org-a/n1>org-b/n1", "org-b/n1>org-a/n1"],
            "an unlisted image gets no link"
        );
        let links = l.effective_links(&n("org-a/n1"), f.now).0;
        assert_eq!(
            links[0].terms.not_after,
            now + 3600,
            "the lifetime bounds it"
        );
        assert_eq!(links[0].approved_by, "link policy mpc");

        // The end withdraws the run; a replay of the announcement is refused.
        accept(&mut l, &f, end(&f, "org-b/n1", 7, now));
        assert!(peers(&l, "org-a/n1", &f).is_empty());
        // (The same bytes again are known by their hash and change nothing; a ledger that has
        // the end but never saw the announcement refuses it.)
        let replay = f.envelope(announce(&f, "org-b/n1", 7, IMG, now));
        assert_eq!(l.ingest(&replay, f.now).unwrap(), Ingested::Unchanged);
        assert!(peers(&l, "org-a/n1", &f).is_empty());
        let mut fresh = ledger(&f);
        accept(&mut fresh, &f, end(&f, "org-b/n1", 7, now));
        let r = fresh.ingest(&replay, f.now).unwrap_err();
        assert_eq!(r.code, RejectCode::Stale, "{r}");
        // A later run of the task at the node links again.
        accept(&mut l, &f, announce(&f, "org-b/n1", 7, IMG, now + 1));
        assert_eq!(peers(&l, "org-b/n1", &f).len(), 2);

        // What the store may drop: the ended announcement, not the end.
        let doc = |jws: &str| jws::peek(jws).unwrap().1;
        assert!(!l.holds(&doc(&announce(&f, "org-b/n1", 7, IMG, now))));
        assert!(l.holds(&doc(&end(&f, "org-b/n1", 7, now))));
        assert!(l.holds(&doc(&announce(&f, "org-b/n1", 7, IMG, now + 1))));

        // Withdrawing the policy (signed again, ending now) ends every task link.
        accept(&mut l, &f, policy(&f, now + 1, now));
        assert!(peers(&l, "org-a/n1", &f).is_empty());
        // An older policy of the same name changes nothing.
        let old = f.envelope(policy(&f, now, now + 7200));
        assert_eq!(l.ingest(&old, f.now).unwrap(), Ingested::Unchanged);
        assert!(peers(&l, "org-a/n1", &f).is_empty());
    }

    /// A node's ledger keeps aside the advertisements of nodes it has no link with; a run
    /// announcement under a policy makes the announcing node's advertisement matter.
    #[test]
    fn a_node_ledger_verifies_the_advertisement_of_a_node_with_a_run() {
        let f = fixture();
        let now = jws::unix(f.now);
        let mut l = Ledger::for_node(&f.pin(), &n("org-a/n1"));
        l.ingest_jws(&f.collab_jws(), f.now).unwrap();
        let ad = f.envelope(f.advertisement("org-b/n1", "127.0.0.1:4433"));
        assert_eq!(l.ingest(&ad, f.now).unwrap(), Ingested::Skipped);
        accept(&mut l, &f, policy(&f, now, now + 7200));
        accept(&mut l, &f, announce(&f, "org-b/n1", 7, IMG, now));
        assert!(l.advertisement(&n("org-b/n1")).is_some());
        assert!(l.take_late_rejections().is_empty());
    }

    #[test]
    fn only_the_node_itself_announces_and_revocation_applies() {
        let f = fixture();
        let now = jws::unix(f.now);
        let mut l = ledger(&f);
        accept(&mut l, &f, policy(&f, now, now + 7200));
        let forged = f.envelope(announce_as(&f, "org-c/n1", "org-b/n1", 7, IMG, now));
        let r = l.ingest(&forged, f.now).unwrap_err();
        assert_eq!(r.code, RejectCode::Forbidden);
        assert!(
            r.reason
                .contains("signed by org-c/n1 but speaks for org-b/n1"),
            "{r}"
        );
        // An owner-signed announcement is not a node's.
        let owner =
            f.envelope(f.owner_sign(&jws::peek(&announce(&f, "org-b/n1", 7, IMG, now)).unwrap().1));
        assert!(
            l.ingest(&owner, f.now)
                .unwrap_err()
                .reason
                .contains("must be signed by the node")
        );

        accept(&mut l, &f, announce(&f, "org-a/n1", 7, IMG, now));
        accept(&mut l, &f, announce(&f, "org-b/n1", 7, IMG, now));
        assert_eq!(peers(&l, "org-a/n1", &f).len(), 2);
        let id = l.effective_links(&n("org-a/n1"), f.now).0[0]
            .terms
            .id
            .clone();
        accept(&mut l, &f, f.revocation(1, &[&id]));
        assert_eq!(
            peers(&l, "org-a/n1", &f).len(),
            1,
            "the revoked direction is out"
        );
    }
}
