//! Signed documents as a node or the hub receives them, against a ledger that already holds a
//! collaboration with an active link. The first byte picks who is speaking:
//!
//! | byte % 6 | rest of the input |
//! |---|---|
//! | 0 | a compact JWS from a hostile hub: peeked, verified as owner and as node, ingested |
//! | 1 | JSON claims the owner signs (a careless owner): ingested |
//! | 2, 3, 4 | JSON claims member `org-a/n1`, `org-b/n1` or `org-c/n1` signs (a hostile member) |
//! | 5 | a page of envelopes (`DocsPage` JSON) from a hostile hub, ingested in order |
//!
//! Whatever is accepted, the ledger's link states are computed afterwards for every member.

use fedmesh_agent::hub::api::DocsPage;
use fedmesh_documents::{DocKind, Envelope, Ledger, Signer, jws};
use serde_json::Value;

use crate::fixed::{Fixed, fixed};

/// One input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixed();
    let mut ledger = f.ledger.clone();
    match mode % 6 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            raw(f, &mut ledger, text);
        }
        1 => {
            if let Some(jws) = sign(rest, &Signer::Owner(&f.owner)) {
                let _ = ledger.ingest_jws(&jws, f.now);
            }
        }
        m @ 2..=4 => {
            let signer = f
                .signers
                .values()
                .nth(usize::from(m - 2))
                .expect("three members");
            if let Some(jws) = sign(rest, &Signer::Node(signer)) {
                let _ = ledger.ingest_jws(&jws, f.now);
            }
        }
        _ => {
            let Ok(page) = serde_json::from_slice::<DocsPage>(rest) else {
                return;
            };
            let _ = ledger.ingest_jws(&page.collab_jws, f.now);
            for env in &page.docs {
                let _ = ledger.ingest(env, f.now);
            }
        }
    }
    links(f, &ledger);
}

fn raw(f: &Fixed, ledger: &mut Ledger, text: &str) {
    let _ = jws::peek(text);
    let _ = jws::verify_owner(text, &f.owner.public_jwk());
    let _ = jws::verify_node(text, &f.bundle, f.now);
    // Filed by what it says it is, and filed under a kind the hub made up.
    if let Ok(env) = Envelope::new(ledger.cursor() + 1, text.to_owned()) {
        let _ = ledger.clone().ingest(&env, f.now);
    }
    let misfiled = Envelope {
        seq: ledger.cursor() + 1,
        kind: DocKind::Approval,
        subject: "misfiled".into(),
        jws: text.to_owned(),
    };
    let _ = ledger.clone().ingest(&misfiled, f.now);
    let _ = ledger.ingest_jws(text, f.now);
}

fn sign(claims: &[u8], signer: &Signer<'_>) -> Option<String> {
    let claims: Value = serde_json::from_slice(claims).ok()?;
    jws::sign_claims(&claims, signer).ok()
}

fn links(f: &Fixed, ledger: &Ledger) {
    let _ = ledger.links(f.now);
    for node in f.signers.keys() {
        let _ = ledger.effective_links(node, f.now);
        let _ = ledger.advertisement(node);
    }
}
