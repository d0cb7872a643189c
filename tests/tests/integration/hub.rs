//! The hub on loopback: enrollment with join tokens, requests, approvals through the CLI,
//! revocation, bad input, and durability across `kill -9`.

use std::{
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use fedmesh_agent::{
    enroll::{self, NodeState},
    hub::{api::JoinToken, client::ClientError},
    owner::{self, NewCollab, Owner},
};
use fedmesh_documents::{CollabPolicy, Document, EffectiveLink, LinkRequest, NodeRef, Signer, jws};
use fedmesh_tests::{TestHub, fedmesh_bin};

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

fn new_collab(online_ca: bool) -> NewCollab {
    NewCollab {
        id: "collab-x".into(),
        owner_name: "alice@org-a".into(),
        online_ca,
        policy: CollabPolicy::default(),
    }
}

/// An owner with two enrolled nodes.
struct World {
    _tmp: tempfile::TempDir,
    owner_dir: std::path::PathBuf,
    owner: Owner,
    a: NodeState,
    b: NodeState,
    tokens: Vec<JoinToken>,
}

async fn world(hub: &TestHub) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let owner_dir = tmp.path().join("owner");
    let mut owner = Owner::create(&owner_dir, hub.address(), new_collab(true))
        .await
        .unwrap();
    let mut nodes = Vec::new();
    let mut tokens = Vec::new();
    for name in ["org-a/n1", "org-b/n1"] {
        let token = owner
            .join_token(&n(name), None, Duration::from_secs(600))
            .await
            .unwrap();
        // The token survives its string form.
        let token = JoinToken::decode(&token.encode()).unwrap();
        let dir = tmp.path().join(name.replace('/', "-"));
        nodes.push(enroll::enroll(&token, &dir, None).await.unwrap());
        tokens.push(token);
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    World {
        _tmp: tmp,
        owner_dir,
        owner,
        a,
        b,
        tokens,
    }
}

async fn effective(node: &NodeState) -> Vec<EffectiveLink> {
    let ledger = owner::fetch_ledger(
        &node.hub_client().unwrap(),
        "collab-x",
        &node.config.owner_pin,
    )
    .await
    .unwrap();
    ledger
        .effective_links(&node.config.node, SystemTime::now())
        .0
}

/// A link request from org-a/n1 to org-b/n1, signed by org-a/n1 and submitted over mTLS.
async fn node_request(w: &World, port: &str) -> String {
    let terms = owner::terms(
        "collab-x",
        &n("org-a/n1"),
        &n("org-b/n1"),
        &[port.parse().unwrap()],
        Duration::from_secs(3600),
        None,
    )
    .unwrap();
    let doc = Document::LinkRequest(LinkRequest {
        terms: terms.clone(),
        requested_by: "org-a/n1".into(),
        requested_at: jws::unix(SystemTime::now()),
    });
    let signed = jws::sign(&doc, &Signer::Node(&w.a.signer().unwrap())).unwrap();
    w.a.hub_client()
        .unwrap()
        .submit("collab-x", signed)
        .await
        .unwrap();
    terms.id
}

fn cli(args: &[&str]) -> String {
    fedmesh_tests::fedmesh_ok(&std::env::temp_dir(), args)
}

#[tokio::test(flavor = "multi_thread")]
async fn enroll_request_approve_revoke() {
    let hub = TestHub::start().await;
    let w = world(&hub).await;
    let id = node_request(&w, "11365:mpc").await;
    assert!(
        effective(&w.a).await.is_empty(),
        "requested is not in force"
    );

    let owner_dir = w.owner_dir.to_str().unwrap();
    let out = cli(&["link", "approve", &id, "--dir", owner_dir]);
    assert!(out.contains(&id), "{out}");
    let (la, lb) = (effective(&w.a).await, effective(&w.b).await);
    assert_eq!(la.len(), 1);
    assert_eq!(la, lb, "both ends compute the same link");
    assert_eq!(la[0].terms.id, id);
    assert_eq!(la[0].approved_by, "alice@org-a");

    let table = cli(&["link", "list", "--dir", owner_dir]);
    assert!(table.contains(&id) && table.contains("active"), "{table}");

    cli(&["link", "revoke", &id, "--dir", owner_dir]);
    assert!(effective(&w.a).await.is_empty());
    assert!(effective(&w.b).await.is_empty());
    let json = cli(&[
        "link",
        "list",
        "--state",
        w.b.dir.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["state"], "revoked");
    assert_eq!(v[0]["revoked_in"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_ca_enrollment_uses_owner_signed_certs() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner_dir = tmp.path().join("owner");
    let mut owner = Owner::create(&owner_dir, hub.address(), new_collab(false))
        .await
        .unwrap();
    assert!(
        owner_dir.join("ca-key.pem").exists(),
        "the CA stays with the owner"
    );
    let token = owner
        .join_token(&n("org-a/n1"), None, Duration::from_secs(600))
        .await
        .unwrap();
    let state = tmp.path().join("a");
    std::fs::create_dir_all(&state).unwrap();

    // Without a certificate the hub has nothing to sign with.
    let err = enroll::enroll(&token, &state, None).await.unwrap_err();
    assert!(err.to_string().contains("CA is offline"), "{err}");

    // The node makes its key and CSR; the owner signs offline; the node enrolls with the cert.
    let (o, s) = (owner_dir.to_str().unwrap(), state.to_str().unwrap());
    cli(&[
        "csr",
        "--collab",
        "collab-x",
        "--org",
        "org-a",
        "--node",
        "n1",
        "--key",
        &format!("{s}/node-key.pem"),
        "--out",
        &format!("{s}/n1.csr"),
    ]);
    cli(&[
        "ca",
        "sign",
        "--dir",
        o,
        "--csr",
        &format!("{s}/n1.csr"),
        "--out",
        &format!("{s}/signed.pem"),
    ]);
    let cert = std::fs::read_to_string(state.join("signed.pem")).unwrap();
    let node = enroll::enroll(&token, &state, Some(cert)).await.unwrap();
    assert_eq!(
        node.identity().unwrap().spiffe_id().to_string(),
        "spiffe://collab-x.fedmesh/org/org-a/node/n1"
    );
}

/// Submits raw bytes as a document body and returns (status, message).
async fn raw(
    client: &fedmesh_agent::hub::client::HubClient,
    path: &str,
    body: Vec<u8>,
) -> (u16, String) {
    match client.post_raw(path, body).await {
        Err(ClientError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_4xx_and_loses_nothing() {
    let hub = TestHub::start().await;
    let w = world(&hub).await;
    let good = node_request(&w, "11365:mpc").await;
    w.owner.approve(&good).await.unwrap();
    let before = effective(&w.a).await;
    assert_eq!(before.len(), 1);

    let a = w.a.hub_client().unwrap();
    let anonymous = fedmesh_agent::hub::client::HubClient::new(&hub.url, &hub.pin, None).unwrap();
    let f = fedmesh_documents::fixtures::Fixture::new("collab-x", &["org-a/n1", "org-b/n1"]);
    let submit = |c: &fedmesh_agent::hub::client::HubClient, jws: String| {
        let c = c.clone();
        async move {
            match c.submit("collab-x", jws.clone()).await {
                Err(ClientError::Refused { status, message }) => (status, message),
                other => panic!(
                    "expected a refusal, got {other:?} for {:?}",
                    jws::peek(&jws)
                ),
            }
        }
    };
    let terms = |from: &str, to: &str, port: &str, ttl: i64| {
        let not_after = (jws::unix(SystemTime::now()) as i64 + ttl) as u64;
        fedmesh_documents::LinkTerms::new(
            "collab-x",
            n(from),
            n(to),
            vec![port.parse().unwrap()],
            not_after,
            None,
        )
    };
    let node_signed =
        |doc: &Document| jws::sign(doc, &Signer::Node(&w.a.signer().unwrap())).unwrap();
    let request_doc = |t: fedmesh_documents::LinkTerms| {
        Document::LinkRequest(LinkRequest {
            terms: t,
            requested_by: "org-a/n1".into(),
            requested_at: jws::unix(SystemTime::now()),
        })
    };
    let mut cases: Vec<(&str, (u16, String), u16, &str)> = Vec::new();

    // 1. A forged approval: signed by a key that is not the owner's.
    let t = terms("org-a/n1", "org-b/n1", "9000", 3600).unwrap();
    let forged = f.approval(&t);
    cases.push((
        "forged approval",
        submit(&anonymous, forged).await,
        403,
        "not the owner key",
    ));
    // 2. An approval (correctly owner-signed) for a link nobody requested.
    let t2 = terms("org-a/n1", "org-b/n1", "9001", 3600).unwrap();
    let doc = Document::Approval(fedmesh_documents::Approval {
        terms: t2.clone(),
        approved_by: "alice@org-a".into(),
        approved_at: jws::unix(SystemTime::now()),
        revocations: 0,
    });
    let owner_key = fedmesh_documents::OwnerKey::from_pem(
        &std::fs::read_to_string(w.owner_dir.join("owner-key.pem")).unwrap(),
    )
    .unwrap();
    let unknown = jws::sign(&doc, &Signer::Owner(&owner_key)).unwrap();
    cases.push((
        "approval for unknown link",
        submit(&anonymous, unknown).await,
        404,
        "no request for link",
    ));
    // 3. A replayed join token.
    let again = tempfile::tempdir().unwrap();
    let replay = enroll::enroll(&w.tokens[0], again.path(), None)
        .await
        .unwrap_err();
    let replay = replay.downcast::<ClientError>().unwrap();
    cases.push((
        "replayed join token",
        (replay.status().unwrap(), replay.to_string()),
        409,
        "already used",
    ));
    // 4. An expired link.
    let expired = node_signed(&request_doc(
        terms("org-a/n1", "org-b/n1", "9002", -10).unwrap(),
    ));
    cases.push(("expired link", submit(&a, expired).await, 422, "expired at"));
    // 5. A link to self.
    let mut selfish = terms("org-a/n1", "org-b/n1", "9003", 3600).unwrap();
    selfish.to = n("org-a/n1");
    selfish.id = selfish.derive_id();
    cases.push((
        "link to self",
        submit(&a, node_signed(&request_doc(selfish))).await,
        422,
        "to itself",
    ));
    // 6. An unknown organisation.
    let stranger = terms("org-a/n1", "org-z/n1", "9004", 3600).unwrap();
    cases.push((
        "unknown organisation",
        submit(&a, node_signed(&request_doc(stranger))).await,
        422,
        "org-z/n1 is not a member",
    ));
    // 7. Port 0.
    let mut zero = terms("org-a/n1", "org-b/n1", "9005", 3600).unwrap();
    zero.ports[0].port = 0;
    zero.id = zero.derive_id();
    cases.push((
        "port 0",
        submit(&a, node_signed(&request_doc(zero))).await,
        422,
        "port 0",
    ));
    // 8. Port 65536: does not even parse as a port.
    let big = node_signed(&request_doc(
        terms("org-a/n1", "org-b/n1", "9006", 3600).unwrap(),
    ));
    let (h, rest) = big.split_once('.').unwrap();
    let (payload, sig) = rest.split_once('.').unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let text = String::from_utf8(b64.decode(payload).unwrap())
        .unwrap()
        .replace("9006", "65536");
    let big = format!("{h}.{}.{sig}", b64.encode(text));
    cases.push(("port 65536", submit(&a, big).await, 400, "65536"));
    // 9. An oversized body.
    let huge = format!("{{\"jws\":\"{}\"}}", "a".repeat(300 * 1024)).into_bytes();
    cases.push((
        "oversized body",
        raw(&a, "/v1/collabs/collab-x/docs", huge).await,
        413,
        "length limit",
    ));
    // 10. Malformed JSON.
    cases.push((
        "malformed JSON",
        raw(&a, "/v1/collabs/collab-x/docs", b"{\"jws\": ".to_vec()).await,
        400,
        "EOF",
    ));
    // 11. Unknown fields in the request body.
    cases.push((
        "unknown field",
        raw(
            &a,
            "/v1/collabs/collab-x/docs",
            br#"{"jws":"x","extra":1}"#.to_vec(),
        )
        .await,
        422,
        "unknown field",
    ));
    // 12. The wrong collaboration.
    let mut other = terms("org-a/n1", "org-b/n1", "9007", 3600).unwrap();
    other.collab = "collab-y".into();
    other.id = other.derive_id();
    let other_doc = other.clone();
    cases.push((
        "wrong collaboration",
        submit(&a, node_signed(&request_doc(other_doc))).await,
        422,
        "not \"collab-x\"",
    ));
    // 13. A node document without mutual TLS.
    let t13 = node_signed(&request_doc(
        terms("org-a/n1", "org-b/n1", "9008", 3600).unwrap(),
    ));
    cases.push((
        "node document without client cert",
        submit(&anonymous, t13).await,
        401,
        "mutual TLS",
    ));
    // 14. A node document submitted by another node.
    let t14 = node_signed(&request_doc(
        terms("org-a/n1", "org-b/n1", "9009", 3600).unwrap(),
    ));
    cases.push((
        "submitted by another node",
        submit(&w.b.hub_client().unwrap(), t14).await,
        403,
        "submitted by org-b/n1",
    ));
    // 15. A veto by the dialling node instead of the receiving one.
    let veto = Document::Decision(fedmesh_documents::Decision {
        collab: "collab-x".into(),
        link_id: good.clone(),
        by: n("org-a/n1"),
        verdict: fedmesh_documents::Verdict::Veto,
        reason: None,
        at: jws::unix(SystemTime::now()),
    });
    cases.push((
        "veto by the wrong node",
        submit(&a, node_signed(&veto)).await,
        403,
        "only the receiving node",
    ));
    // 16. An unknown collaboration.
    let unknown_collab = match a.submit("collab-y", node_signed(&request_doc(other))).await {
        Err(ClientError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    cases.push((
        "unknown collaboration",
        unknown_collab,
        404,
        "unknown collaboration \"collab-y\"",
    ));
    // 17. Reading without credentials.
    let unauth = anonymous
        .docs("collab-x", 0, Duration::ZERO)
        .await
        .unwrap_err();
    cases.push((
        "read without credentials",
        (unauth.status().unwrap(), unauth.to_string()),
        401,
        "mutual TLS",
    ));
    // 18. Garbage instead of a JWS.
    cases.push((
        "garbage JWS",
        submit(&a, "not-a-jws".into()).await,
        400,
        "malformed document",
    ));
    // 19. A revocation numbered past one the hub does not hold (revocations add up, so an
    // older one signed again is no error: see revocations_made_at_once_all_count).
    w.owner.revoke(&[], &[], &[]).await.unwrap();
    w.owner.revoke(&[], &[], &[]).await.unwrap();
    let skipping = jws::sign(
        &Document::Revocation(fedmesh_documents::Revocation {
            collab: "collab-x".into(),
            number: 5,
            issued_at: jws::unix(SystemTime::now()),
            ..Default::default()
        }),
        &Signer::Owner(&owner_key),
    )
    .unwrap();
    cases.push((
        "revocation past a number the hub does not hold",
        submit(&anonymous, skipping).await,
        422,
        "names revocations up to 4, but this hub holds them only up to 2",
    ));
    // 20. A request from a revoked node.
    let serial = w.b.identity().unwrap().info().serial.clone();
    w.owner.revoke(&[], &[], &[serial]).await.unwrap();
    let from_b = jws::sign(
        &Document::LinkRequest(LinkRequest {
            terms: terms("org-b/n1", "org-a/n1", "9010", 3600).unwrap(),
            requested_by: "org-b/n1".into(),
            requested_at: jws::unix(SystemTime::now()),
        }),
        &Signer::Node(&w.b.signer().unwrap()),
    )
    .unwrap();
    cases.push((
        "request from a revoked node",
        submit(&w.b.hub_client().unwrap(), from_b).await,
        403,
        "revoked",
    ));

    let mut failures = Vec::new();
    for (name, (status, message), want_status, want_text) in &cases {
        if status != want_status || !message.contains(want_text) {
            failures.push(format!(
                "{name}: got {status} {message:?}, want {want_status} containing {want_text:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(cases.len() >= 15);

    // Nothing accepted before was lost.
    assert_eq!(effective(&w.a).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_documents_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let mut hub = spawn_hub(&data, "127.0.0.1:0");
    let (url, pin) = read_banner(&mut hub);
    let listen = url.trim_start_matches("https://").to_owned();
    let address = owner::HubAddress {
        url: url.clone(),
        pin: pin.clone(),
    };
    let mut owner = Owner::create(&tmp.path().join("owner"), address, new_collab(true))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for peer in ["org-b/n1", "org-c/n1"] {
        owner
            .join_token(&n(peer), None, Duration::from_secs(600))
            .await
            .unwrap();
    }
    owner
        .join_token(&n("org-a/n1"), None, Duration::from_secs(600))
        .await
        .unwrap();
    for (i, peer) in ["org-b/n1", "org-c/n1"].iter().enumerate() {
        let t = owner::terms(
            "collab-x",
            &n("org-a/n1"),
            &n(peer),
            &[format!("{}", 11366 + i).parse().unwrap()],
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
        let t = owner.request(t).await.unwrap();
        owner.approve(&t.id).await.unwrap();
        ids.push(t.id);
    }
    // Kill the hub the instant the last approval was acknowledged.
    let pid = hub.id();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    hub.wait().unwrap();

    let mut hub = spawn_hub(&data, &listen);
    let (_, pin_after) = read_banner(&mut hub);
    assert_eq!(pin_after, pin, "the hub keeps its identity");
    let links = owner.links().await.unwrap();
    for id in &ids {
        let l = links
            .iter()
            .find(|l| &l.terms.id == id)
            .expect("link survived");
        assert_eq!(l.state, fedmesh_documents::LinkState::Active, "{id}");
    }
    assert_eq!(
        owner
            .ledger()
            .await
            .unwrap()
            .collaboration()
            .unwrap()
            .members
            .len(),
        3
    );
    let _ = hub.kill();
    let _ = hub.wait();
}

fn spawn_hub(data: &std::path::Path, listen: &str) -> std::process::Child {
    Command::new(fedmesh_bin())
        .args([
            "hub",
            "--init",
            "--listen",
            listen,
            "--data",
            data.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fedmesh hub")
}

/// Reads "hub listening on <url>" and "hub pin <pin>" from the hub's stdout.
fn read_banner(hub: &mut std::process::Child) -> (String, String) {
    use std::io::BufRead;
    let stdout = hub.stdout.as_mut().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let url = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("hub listening on ")
        .to_owned();
    let pin = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("hub pin ")
        .to_owned();
    (url, pin)
}
