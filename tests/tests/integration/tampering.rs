//! A compromised hub: a test double that serves the genuine documents, then tampered ones. The
//! node agent must refuse each tampered document with its reason and keep what it verified.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    routing::get,
};
use fedmesh_agent::{
    enroll::NodeConfig,
    hub::{
        self,
        api::{DocsPage, DocsQuery, Submitted},
        tls::HubCert,
    },
    node::{self, NodeOptions},
    owner::{self, HubAddress},
    relay::RelayOptions,
};
use fedmesh_documents::{Approval, Document, Envelope, NodeRef, OwnerKey, Revocation, Signer, jws};

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

/// The double's mailbox: whatever the test puts in it, served like the hub would.
#[derive(Clone, Default)]
struct Mailbox {
    collab_jws: Arc<Mutex<String>>,
    docs: Arc<Mutex<Vec<Envelope>>>,
}

impl Mailbox {
    fn push(&self, mut env: Envelope) {
        let mut docs = self.docs.lock().unwrap();
        env.seq = docs.last().map_or(1, |e| e.seq + 1);
        docs.push(env);
    }
}

async fn docs(
    State(m): State<Mailbox>,
    Path(_): Path<String>,
    Query(q): Query<DocsQuery>,
) -> Json<DocsPage> {
    // A short poll is enough here: the node asks again at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let docs: Vec<Envelope> = m
        .docs
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.seq > q.since)
        .cloned()
        .collect();
    Json(DocsPage {
        collab_jws: m.collab_jws.lock().unwrap().clone(),
        cursor: docs.last().map_or(q.since, |e| e.seq),
        docs,
    })
}

/// Takes whatever is submitted (the node's advertisement) without looking.
async fn submit() -> Json<Submitted> {
    Json(Submitted { seq: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_documents_are_refused_and_the_last_verified_state_kept() {
    fedmesh_tests::subscribe();
    // A real hub for the setup: collaboration, enrollment, one approved link.
    let tmp = tempfile::tempdir().unwrap();
    let opts = fedmesh_tests::mesh_options();
    let mut mesh = fedmesh_agent::mesh::LocalMesh::start(
        tmp.path(),
        &opts,
        &[
            fedmesh_agent::mesh::NodeSpec {
                node: n("org-a/n1"),
                organization_id: None,
                exposes: vec![],
            },
            fedmesh_agent::mesh::NodeSpec {
                node: n("org-b/n1"),
                organization_id: None,
                exposes: vec![],
            },
            fedmesh_agent::mesh::NodeSpec {
                node: n("org-c/n1"),
                organization_id: None,
                exposes: vec![],
            },
        ],
    )
    .await
    .unwrap();
    let hour = Duration::from_secs(3600);
    let good = mesh
        .link(
            &n("org-a/n1"),
            &n("org-b/n1"),
            &["7000".parse().unwrap()],
            hour,
            None,
        )
        .await
        .unwrap();
    mesh.owner.revoke(&[], &[], &[]).await.unwrap(); // list 1
    mesh.owner.revoke(&[], &[], &[]).await.unwrap(); // list 2
    let genuine = mesh.owner.ledger().await.unwrap();
    let owner_key =
        OwnerKey::from_pem(&std::fs::read_to_string(mesh.dir.join("owner/owner-key.pem")).unwrap())
            .unwrap();

    // Everything the real hub holds, replayed by the double.
    let mailbox = Mailbox::default();
    let owner_hub = hub::client::HubClient::new(&mesh.hub.url, &mesh.hub.pin, None)
        .unwrap()
        .with_owner_token(owner_token(&owner_key));
    let page = owner_hub.docs("collab-x", 0, Duration::ZERO).await.unwrap();
    *mailbox.collab_jws.lock().unwrap() = page.collab_jws.clone();
    for env in page.docs {
        mailbox.push(env);
    }

    // The double, with its own certificate; org-b's agent is pointed at it.
    let double_dir = tempfile::tempdir().unwrap();
    let cert = HubCert::create(double_dir.path(), &["localhost".into()]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/collabs/{id}/docs", get(docs).post(submit))
        .with_state(mailbox.clone());
    tokio::spawn(hub::serve(
        listener,
        app,
        Arc::new(cert.server_config().unwrap()),
        std::future::pending(),
    ));
    // org-b's agent moves from the real hub to the double.
    mesh.nodes
        .remove(&n("org-b/n1"))
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let state = mesh.state_dir(&n("org-b/n1"));
    let mut config: NodeConfig =
        serde_json::from_str(&std::fs::read_to_string(state.join("node.json")).unwrap()).unwrap();
    config.hub = HubAddress {
        url,
        pin: cert.pin(),
    };
    std::fs::write(
        state.join("node.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let agent = node::start(NodeOptions {
        state,
        relay_listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        loopback_pool: format!("127.{}.9.0/24", opts.loopback_octet)
            .parse()
            .unwrap(),
        exposes: vec![],
        dns_listen: None,
        admin_listen: None,
        relay: RelayOptions::default(),
        kubernetes: None,
    })
    .await
    .unwrap();
    agent
        .wait_for(Duration::from_secs(10), |s| {
            s.links.iter().any(|l| l.terms.id == good)
        })
        .await
        .unwrap();

    let now = jws::unix(SystemTime::now());
    let sign = |doc: &Document, key: &OwnerKey| jws::sign(doc, &Signer::Owner(key)).unwrap();
    let revoke_good = Document::Revocation(Revocation {
        collab: "collab-x".into(),
        number: 3,
        links: vec![good.clone()],
        issued_at: now,
        ..Default::default()
    });

    // 1. A flipped byte: the genuine revocation of the link, one signature byte changed.
    let mut flipped = sign(&revoke_good, &owner_key).into_bytes();
    let at = flipped.len() - 10;
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    mailbox.push(Envelope::new(0, String::from_utf8(flipped).unwrap()).unwrap());
    // 2. An approval of a new link, re-signed with another key.
    let other_terms = owner::terms(
        "collab-x",
        &n("org-c/n1"),
        &n("org-b/n1"),
        &["22".parse().unwrap()],
        hour,
        None,
    )
    .unwrap();
    let approval = |terms: &fedmesh_documents::LinkTerms| {
        Document::Approval(Approval {
            terms: terms.clone(),
            approved_by: "owner@fedmesh.demo".into(),
            approved_at: now,
        })
    };
    let mallory = OwnerKey::generate().unwrap();
    mailbox.push(Envelope::new(0, sign(&approval(&other_terms), &mallory)).unwrap());
    // 3. A genuine approval of one link, delivered as the approval of another.
    let mut misfiled = Envelope::new(0, sign(&approval(&other_terms), &owner_key)).unwrap();
    misfiled.subject = good.clone();
    mailbox.push(misfiled);
    // 4. A replayed old revocation list (number 1, after 2).
    let old = genuine.revocation().clone();
    assert_eq!(old.number, 2);
    let replay = Document::Revocation(Revocation { number: 1, ..old });
    mailbox.push(Envelope::new(0, sign(&replay, &owner_key)).unwrap());

    let snap = agent
        .wait_for(Duration::from_secs(10), |s| s.rejections.len() >= 4)
        .await
        .unwrap();
    let reasons: Vec<String> = snap.rejections.iter().map(ToString::to_string).collect();
    let expect = [
        "owner signature does not verify",
        "not the owner key",
        "delivered as approval",
        "older than list 2",
    ];
    for (reason, want) in reasons.iter().zip(expect) {
        assert!(
            reason.contains(want),
            "{reason:?} should say {want:?}; all: {reasons:#?}"
        );
    }
    // The last verified state stands: the link is still in force, the forged one is not.
    assert_eq!(snap.links.len(), 1, "{:?}", snap.links);
    assert_eq!(snap.links[0].terms.id, good);

    // And the node still follows: the genuine revocation takes the link down.
    mailbox.push(Envelope::new(0, sign(&revoke_good, &owner_key)).unwrap());
    agent
        .wait_for(Duration::from_secs(10), |s| s.links.is_empty())
        .await
        .unwrap();
    agent.shutdown().await.unwrap();
    mesh.shutdown().await.unwrap();
}

fn owner_token(key: &OwnerKey) -> String {
    let claims = hub::api::OwnerToken {
        collab: "collab-x".into(),
        aud: hub::api::OWNER_TOKEN_AUDIENCE.into(),
        exp: jws::unix(SystemTime::now()) + 300,
    };
    jws::sign_claims(&claims, &Signer::Owner(key)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_from_the_hub_is_refused() {
    fedmesh_tests::subscribe();
    let dir = tempfile::tempdir().unwrap();
    let cert = HubCert::create(dir.path(), &["localhost".into()]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    // A page padded past the client's bound with whitespace (valid JSON, just too much of it).
    let huge = " ".repeat(hub::client::MAX_RESPONSE_BYTES + 1);
    let app = Router::new().route(
        "/v1/collabs/{id}/docs",
        get(move || {
            let huge = huge.clone();
            async move { format!(r#"{{"collab_jws":"","docs":[],"cursor":0}}{huge}"#) }
        }),
    );
    tokio::spawn(hub::serve(
        listener,
        app,
        Arc::new(cert.server_config().unwrap()),
        std::future::pending(),
    ));
    let client = hub::client::HubClient::new(&url, &cert.pin(), None).unwrap();
    let err = client
        .docs("collab-x", 0, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}
