//! A compromised hub: a test double that serves the genuine documents, then tampered ones, then
//! misbehaves (a cursor that never advances or goes back, old documents served again, floods of
//! forgeries, oversized answers). The node agent must refuse each tampered document with its
//! reason, keep what it verified, and spend bounded requests, CPU and memory on a bad hub.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
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

/// How the double answers `GET .../docs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mode {
    /// Like the hub (after a short wait).
    #[default]
    Honest,
    /// At once, nothing new, the cursor asked for: a cursor that never advances.
    Stuck,
    /// At once, every document from the start, cursor 0: old documents again, cursor back.
    Replay,
    /// At once, 300 new envelopes (more than the agent asks for) of one forged document.
    Flood,
    /// At once, an answer over the size bound the agent reads.
    Huge,
}

/// The double's mailbox: whatever the test puts in it, served like the hub would.
#[derive(Clone, Default)]
struct Mailbox {
    collab_jws: Arc<Mutex<String>>,
    docs: Arc<Mutex<Vec<Envelope>>>,
    mode: Arc<Mutex<Mode>>,
    /// A forged envelope (for [`Mode::Flood`]).
    forged: Arc<Mutex<Option<Envelope>>>,
    requests: Arc<AtomicUsize>,
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
) -> axum::response::Response {
    use axum::response::IntoResponse;
    m.requests.fetch_add(1, Ordering::Relaxed);
    let collab_jws = m.collab_jws.lock().unwrap().clone();
    let mode = *m.mode.lock().unwrap();
    let page = |docs: Vec<Envelope>, cursor| {
        Json(DocsPage {
            collab_jws: collab_jws.clone(),
            checkpoint: None,
            docs,
            cursor,
        })
        .into_response()
    };
    match mode {
        Mode::Honest => {
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
            let cursor = docs.last().map_or(q.since, |e| e.seq);
            page(docs, cursor)
        }
        Mode::Stuck => page(Vec::new(), q.since),
        Mode::Replay => page(m.docs.lock().unwrap().clone(), 0),
        Mode::Flood => {
            let forged = m.forged.lock().unwrap().clone().unwrap();
            let docs = (1..=300)
                .map(|i| Envelope {
                    seq: q.since + i,
                    ..forged.clone()
                })
                .collect();
            page(docs, q.since + 300)
        }
        Mode::Huge => format!(
            r#"{{"collab_jws":"","docs":[],"cursor":0}}{}"#,
            " ".repeat(hub::client::page_bytes(100) + 1)
        )
        .into_response(),
    }
}

/// Takes whatever is submitted (the node's advertisement) without looking.
async fn submit() -> Json<Submitted> {
    Json(Submitted { seq: 0 })
}

/// A collaboration on a real hub with one approved link (org-a → org-b) and two revocation
/// lists, whose org-b agent follows a double of the hub serving the same documents.
struct Setup {
    mesh: fedmesh_agent::mesh::LocalMesh,
    mailbox: Mailbox,
    agent: node::NodeHandle,
    options: NodeOptions,
    good: String,
    genuine: fedmesh_documents::Ledger,
    owner_key: OwnerKey,
    _tmp: tempfile::TempDir,
    _double_dir: tempfile::TempDir,
}

/// Starts org-b's agent and waits until it has the approved link.
async fn start_synced(options: &NodeOptions, good: &str) -> node::NodeHandle {
    let agent = node::start(options.clone()).await.unwrap();
    agent
        .wait_for(Duration::from_secs(10), |s| {
            s.links.iter().any(|l| l.terms.id == good)
        })
        .await
        .unwrap();
    agent
}

async fn setup() -> Setup {
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
    let options = NodeOptions {
        state,
        relay_listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        loopback_pool: format!("127.{}.9.0/24", opts.loopback_octet)
            .parse()
            .unwrap(),
        exposes: vec![],
        dns_listen: None,
        admin_listen: None,
        v6: None,
        relay: RelayOptions::default(),
        outbound_only: false,
        carrier: Default::default(),
        kubernetes: None,
    };
    let agent = start_synced(&options, &good).await;
    Setup {
        mesh,
        mailbox,
        agent,
        options,
        good,
        genuine,
        owner_key,
        _tmp: tmp,
        _double_dir: double_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_documents_are_refused_and_the_last_verified_state_kept() {
    let Setup {
        mesh,
        mailbox,
        agent,
        good,
        genuine,
        owner_key,
        _tmp,
        _double_dir,
        ..
    } = setup().await;
    let hour = Duration::from_secs(3600);
    let now = jws::unix(SystemTime::now());
    let sign = |doc: &Document, key: &OwnerKey| jws::sign(doc, &Signer::Owner(key)).unwrap();
    let revocation = |number: u64, links: Vec<String>| {
        Document::Revocation(Revocation {
            collab: "collab-x".into(),
            number,
            links,
            issued_at: now,
            ..Default::default()
        })
    };
    let revoke_good = revocation(5, vec![good.clone()]);

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
            revocations: 0,
        })
    };
    let mallory = OwnerKey::generate().unwrap();
    mailbox.push(Envelope::new(0, sign(&approval(&other_terms), &mallory)).unwrap());
    // 3. A genuine approval of one link, delivered as the approval of another.
    let mut misfiled = Envelope::new(0, sign(&approval(&other_terms), &owner_key)).unwrap();
    misfiled.subject = good.clone();
    mailbox.push(misfiled);
    // A replayed old revocation adds nothing and is not refused: revocations add up.
    let old = genuine.revocation().clone();
    assert_eq!(old.number, 2);
    let replay = Document::Revocation(Revocation { number: 1, ..old });
    mailbox.push(Envelope::new(0, sign(&replay, &owner_key)).unwrap());

    let snap = agent
        .wait_for(Duration::from_secs(10), |s| s.rejections.len() >= 3)
        .await
        .unwrap();
    let reasons: Vec<String> = snap.rejections.iter().map(ToString::to_string).collect();
    let expect = [
        "owner signature does not verify",
        "not the owner key",
        "delivered as approval",
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

    // 4. A withheld revocation: the owner's revocation 4 is served, 3 (which it follows) is
    // not. The node notices, reports it and puts no link in force until 3 arrives.
    mailbox.push(Envelope::new(0, sign(&revocation(4, vec![]), &owner_key)).unwrap());
    let snap = agent
        .wait_for(Duration::from_secs(10), |s| s.links.is_empty())
        .await
        .unwrap();
    assert!(
        snap.rejections
            .iter()
            .any(|r| r.reason.contains("withholds revocations")),
        "{:#?}",
        snap.rejections
    );
    assert!(
        agent
            .metrics
            .render()
            .contains("fedmesh_hub_anomalies_total{reason=\"withheld_revocations\"}")
    );
    mailbox.push(Envelope::new(0, sign(&revocation(3, vec![]), &owner_key)).unwrap());
    agent
        .wait_for(Duration::from_secs(10), |s| s.links.len() == 1)
        .await
        .unwrap();

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

/// CPU time this process has used.
fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_hub_gets_few_requests_little_cpu_and_nothing_forged_in() {
    let Setup {
        mesh,
        mailbox,
        agent,
        good,
        owner_key,
        options,
        _tmp,
        _double_dir,
        ..
    } = setup().await;
    // A forged approval of a link org-c -> org-b: the owner's key id, a broken signature.
    let terms = owner::terms(
        "collab-x",
        &n("org-c/n1"),
        &n("org-b/n1"),
        &["23".parse().unwrap()],
        Duration::from_secs(3600),
        None,
    )
    .unwrap();
    let approval = Document::Approval(Approval {
        terms: terms.clone(),
        approved_by: "owner@fedmesh.demo".into(),
        approved_at: jws::unix(SystemTime::now()),
        revocations: 0,
    });
    let mut forged = jws::sign(&approval, &Signer::Owner(&owner_key))
        .unwrap()
        .into_bytes();
    let at = forged.len() - 10;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    *mailbox.forged.lock().unwrap() =
        Some(Envelope::new(0, String::from_utf8(forged).unwrap()).unwrap());

    // Each way of misbehaving against a fresh agent (so that none inherits another's back-off):
    // synced with the honest double first, then 15 s of the hostile one.
    agent.shutdown().await.unwrap();
    let window = Duration::from_secs(15);
    let mut report = Vec::new();
    for (mode, kinds) in [
        (Mode::Stuck, &["not_advancing"][..]),
        (
            Mode::Replay,
            &["replayed_documents", "cursor_regression"][..],
        ),
        (Mode::Flood, &["oversized_page", "only_forgeries"][..]),
        (Mode::Huge, &["oversized_page"][..]),
    ] {
        *mailbox.mode.lock().unwrap() = Mode::Honest;
        let agent = start_synced(&options, &good).await;
        *mailbox.mode.lock().unwrap() = mode;
        let (requests, cpu, started) = (
            mailbox.requests.load(Ordering::Relaxed),
            cpu_time(),
            Instant::now(),
        );
        tokio::time::sleep(window).await;
        let requests = mailbox.requests.load(Ordering::Relaxed) - requests;
        let cpu = cpu_time() - cpu;
        report.push(format!(
            "{mode:?}: {requests} requests, {cpu:?} CPU in {:?}",
            started.elapsed()
        ));
        // An agent asking at once again and again makes hundreds of requests and holds a core.
        assert!((1..=12).contains(&requests), "{report:?}");
        assert!(cpu < Duration::from_secs(5), "{report:?}");
        let snap = agent.snapshot.borrow().clone();
        assert_eq!(snap.links.len(), 1, "{mode:?}: {:?}", snap.links);
        assert_eq!(snap.links[0].terms.id, good, "nothing forged is in force");
        let metrics = agent.metrics.render();
        for kind in kinds {
            assert!(
                metrics.contains(&format!("fedmesh_hub_anomalies_total{{reason=\"{kind}\"}}")),
                "{mode:?}: {kind} not reported:\n{metrics}"
            );
        }
        agent.shutdown().await.unwrap();
    }
    eprintln!("{report:#?}");
    mesh.shutdown().await.unwrap();
}
