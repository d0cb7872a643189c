//! Well-formed inputs for every target, made from the fixed credentials: the starting corpus
//! (`cargo test -p fedmesh-fuzz-targets -- --ignored write_seeds` writes them to
//! `fuzz/corpus/<target>/seed-*`), and replayed on their own by the corpus test.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_agent::{
    hub::api::{
        DocsPage, EnrollRequest, JoinToken, OWNER_TOKEN_AUDIENCE, OwnerToken, RenewRequest,
        SubmitDoc,
    },
    relay::proto::{Refusal, Request, Response},
};
use fedmesh_certs::{NodeKey, SpiffeId};
use fedmesh_documents::{Verdict, jws};
use hickory_server::proto::{
    op::{Edns, Message, Query},
    rr::{Name, RecordType},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::{
    der,
    fixed::{self, COLLAB},
};

/// One seed: the target it is for, its name, its bytes.
pub type Seed = (&'static str, String, Vec<u8>);

fn with(mode: u8, rest: impl AsRef<[u8]>) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(rest.as_ref());
    out
}

fn json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_owned(), bytes));
    };
    let f = fixed::fixture();
    let day = Duration::from_secs(86_400);

    // stream_header
    let request = |port, label: Option<&str>| {
        Request {
            port,
            label: label.map(str::to_owned),
        }
        .encode()
    };
    add("stream_header", "labelled", request(11365, Some("mpc")));
    add("stream_header", "plain", request(80, None));
    add(
        "stream_header",
        "longest-label",
        request(65535, Some(&"x".repeat(63))),
    );
    add("stream_header", "connected", Response::Connected.encode());
    add(
        "stream_header",
        "refused",
        Response::Refused(Refusal::NoLink, "no link covers org-a/n1 port 80".into()).encode(),
    );

    // jws_document
    let terms = f.terms("org-a/n1", "org-c/n1", &["11365:mpc", "9000"], day);
    let docs = [
        ("collab", f.collab_jws()),
        ("request", f.request(&terms)),
        ("approval", f.approval(&terms)),
        ("decision", f.decision(&terms, Verdict::Veto)),
        ("revocation", f.revocation(2, &[&terms.id])),
        (
            "advertisement",
            f.advertisement("org-c/n1", "127.0.0.1:4435"),
        ),
    ];
    for (name, doc) in &docs {
        add("jws_document", &format!("raw-{name}"), with(0, doc));
        let (_, claims) = jws::peek(doc).expect("fixture document");
        let mode = match *name {
            "collab" | "approval" | "revocation" => 1,
            "decision" => 4,
            _ => 2,
        };
        add(
            "jws_document",
            &format!("claims-{name}"),
            with(mode, json(&claims)),
        );
    }
    let page = DocsPage {
        collab_jws: f.collab_jws(),
        docs: docs[1..]
            .iter()
            .map(|(_, d)| f.envelope(d.clone()))
            .collect(),
        cursor: 5,
        checkpoint: None,
    };
    add("jws_document", "page", with(5, json(&page)));

    // vantage6_token
    let token = |claims: &str| format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(claims));
    add(
        "vantage6_token",
        "siblings",
        with(
            0,
            format!("only_siblings=1&label=mpc\n{}", token(r#"{"task_id":10}"#)),
        ),
    );
    add(
        "vantage6_token",
        "v5-sub",
        with(
            1,
            "include_parent=1&include_children=1\n{\"sub\":{\"task_id\":10,\"organization_id\":1}}",
        ),
    );
    add(
        "vantage6_token",
        "conflict",
        with(1, "only_self=1&only_parent=1\n{\"task_id\":5}"),
    );

    // csr
    let key = NodeKey::from_pem(&f.nodes[&"org-a/n1".parse().expect("node")].key_pem).expect("key");
    let csr = key
        .csr(&SpiffeId::new(COLLAB, "org-a", "n1").expect("id"))
        .expect("csr");
    let csr_der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.pem.as_bytes())
            .expect("csr der");
    add("csr", "pem", with(0, &csr.pem));
    add("csr", "der", with(1, csr_der.as_ref()));
    add(
        "csr",
        "body",
        with(2, der::signed_body(csr_der.as_ref()).expect("csr body")),
    );
    let other = key
        .csr(&SpiffeId::new("collab-y", "org-a", "n1").expect("id"))
        .expect("csr");
    add("csr", "other-collab", with(0, &other.pem));

    // certificate
    let node_pem = &f.nodes[&"org-b/n1".parse().expect("node")].cert_pem;
    let node = CertificateDer::from_pem_slice(node_pem.as_bytes()).expect("cert");
    add("certificate", "node", with(0, node.as_ref()));
    add(
        "certificate",
        "pem-chain",
        with(1, format!("{node_pem}{}", f.ca.cert_pem())),
    );
    add("certificate", "ca", with(2, f.ca.cert_der().as_ref()));
    add(
        "certificate",
        "node-body",
        with(3, der::signed_body(&node).expect("body")),
    );
    add(
        "certificate",
        "ca-body",
        with(3, der::signed_body(f.ca.cert_der()).expect("body")),
    );

    // hub_request
    let submit = |jws: String| json(&SubmitDoc { jws });
    add(
        "hub_request",
        "create-collab",
        with(0, submit(f.collab_jws())),
    );
    add(
        "hub_request",
        "owner-doc",
        with(1, submit(f.revocation(1, &[]))),
    );
    add(
        "hub_request",
        "node-doc",
        with(6, submit(f.request(&terms))),
    );
    let enroll = EnrollRequest {
        node: "org-c/n1".parse().expect("node"),
        secret: crate::hub_request::GRANT_SECRET.into(),
        csr_pem: Some(csr.pem.clone()),
        cert_pem: None,
    };
    add("hub_request", "enroll-csr", with(2, json(&enroll)));
    let enroll = EnrollRequest {
        csr_pem: None,
        cert_pem: Some(node_pem.clone()),
        ..enroll
    };
    add("hub_request", "enroll-cert", with(2, json(&enroll)));
    add(
        "hub_request",
        "renew",
        with(
            8,
            json(&RenewRequest {
                csr_pem: csr.pem.clone(),
            }),
        ),
    );
    let owner_token = jws::sign_claims(
        &OwnerToken {
            collab: COLLAB.into(),
            aud: OWNER_TOKEN_AUDIENCE.into(),
            exp: 4_102_444_800,
        },
        &fedmesh_documents::Signer::Owner(&f.owner),
    )
    .expect("owner token");
    add(
        "hub_request",
        "docs-owner",
        with(4, format!("since=0&wait=1\n{owner_token}")),
    );
    add("hub_request", "docs-member", with(9, "since=1"));
    let join = JoinToken {
        hub: "https://hub.example.org:8443".into(),
        hub_pin: "00".repeat(32),
        collab: COLLAB.into(),
        owner_pin: f.pin(),
        node: "org-c/n1".parse().expect("node"),
        secret: crate::hub_request::GRANT_SECRET.into(),
    };
    add("hub_request", "join-token", with(0, join.encode()));

    // dns
    let query = |name: &str, rtype, edns: bool| {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().expect("dns message")
    };
    add(
        "dns",
        "org-a",
        query("org-b.collab-x.fedmesh.", RecordType::A, false),
    );
    add(
        "dns",
        "node-aaaa",
        query("n1.org-b.collab-x.fedmesh.", RecordType::AAAA, true),
    );
    add(
        "dns",
        "any",
        query("ORG-B.Collab-X.fedmesh.", RecordType::ANY, false),
    );
    add(
        "dns",
        "unknown",
        query("org-z.collab-x.fedmesh.", RecordType::A, false),
    );
    add(
        "dns",
        "outside",
        query("example.com.", RecordType::MX, true),
    );
    out
}
