//! The control plane over time: a node that was down longer than its certificate's life comes
//! back by itself (re-attesting with its enrolled key) unless it or its key was revoked, and
//! revocations made at the same time by many owner commands all count and reach both ends.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use fedmesh_agent::{
    enroll::{self, NodeState},
    hub::{
        api::{REATTEST_AUDIENCE, ReattestClaims},
        client::{ClientError, HubClient},
        limits::Limits,
    },
    mesh::{LocalMesh, MeshOptions, NodeSpec},
    node::{self, Expose},
    owner::{self, NewCollab, Owner},
};
use fedmesh_certs::{NodeKey, files};
use fedmesh_documents::{CollabPolicy, NodeRef, jws};
use fedmesh_tests::{TestHub, fedmesh_bin};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: Duration = Duration::from_secs(1);

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

/// Sends a few bytes through `addr` and expects them back.
async fn round_trip(addr: SocketAddr) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"back again").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(10 * SECOND, tcp.read_exact(&mut buf))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(&buf, b"back again");
}

fn spec(node: &str, exposes: Vec<Expose>) -> NodeSpec {
    NodeSpec {
        node: n(node),
        organization_id: None,
        exposes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_past_its_certificate_comes_back_by_itself_unless_revoked() {
    fedmesh_tests::subscribe();
    let target = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    // Certificates of 6 s (+1.5 s back-dated).
    let opts = MeshOptions {
        cert_ttl: 6 * SECOND,
        ..fedmesh_tests::mesh_options()
    };
    let (a, b, c) = (n("org-a/n1"), n("org-b/n1"), n("org-c/n1"));
    let exposes = vec![Expose {
        port: 7101,
        label: None,
        target: target.to_string(),
    }];
    let specs = [
        spec("org-a/n1", vec![]),
        spec("org-b/n1", exposes),
        spec("org-c/n1", vec![]),
    ];
    let mut mesh = LocalMesh::start(tmp.path(), &opts, &specs).await.unwrap();
    let hour = 3600 * SECOND;
    for from in [&a, &c] {
        mesh.link(from, &b, &["7101".parse().unwrap()], hour, None)
            .await
            .unwrap();
    }
    round_trip(mesh.peer_addr(&a, &b, 7101, 10 * SECOND).await.unwrap()).await;

    // a and c stop; the owner revokes c while it is down.
    let first = mesh.state(&a).unwrap().identity().unwrap().info().clone();
    let life = first.not_after.duration_since(first.not_before).unwrap();
    for node in [&a, &c] {
        mesh.nodes.remove(node).unwrap().shutdown().await.unwrap();
    }
    mesh.owner
        .revoke(&[], std::slice::from_ref(&c), &[])
        .await
        .unwrap();
    tokio::time::sleep(3 * life).await;
    for node in [&a, &c] {
        let info = mesh.state(node).unwrap().identity().unwrap().info().clone();
        assert!(
            info.not_after < SystemTime::now(),
            "{node} expired while down"
        );
    }

    // a restarts without anyone's help, and carries traffic again.
    let restarted = node::start(mesh.options[&a].clone()).await.unwrap();
    mesh.nodes.insert(a.clone(), restarted);
    let now = mesh.state(&a).unwrap().identity().unwrap().info().clone();
    assert_ne!(now.serial, first.serial, "a new certificate");
    assert!(now.not_after > SystemTime::now());
    round_trip(mesh.peer_addr(&a, &b, 7101, 10 * SECOND).await.unwrap()).await;

    // c, revoked while it was down, cannot.
    let error = match node::start(mesh.options[&c].clone()).await {
        Ok(_) => panic!("a revoked node came back"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("re-attesting") && error.contains("org-c/n1 is revoked"),
        "{error}"
    );
    mesh.shutdown().await.unwrap();
}

/// A re-attestation request for `state`'s node, signed with `key`, for a CSR of `csr_key`.
fn proof(
    state: &NodeState,
    key: &NodeKey,
    csr_key: &NodeKey,
    edit: impl FnOnce(&mut ReattestClaims),
) -> String {
    let mut claims = ReattestClaims {
        collab: state.config.collab.clone(),
        node: state.config.node.clone(),
        aud: REATTEST_AUDIENCE.into(),
        exp: jws::unix(SystemTime::now()) + 120,
        csr_pem: csr_key.csr(&state.spiffe_id().unwrap()).unwrap().pem,
    };
    edit(&mut claims);
    jws::sign_with_key(&claims, key).unwrap()
}

fn node_key(state: &NodeState) -> NodeKey {
    NodeKey::from_pem(&files::read_to_string(&state.key_path()).unwrap()).unwrap()
}

fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattestation_needs_the_enrolled_key_and_a_standing_node() {
    fedmesh_tests::subscribe();
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut owner = Owner::create(
        &tmp.path().join("owner"),
        hub.address(),
        NewCollab {
            id: "collab-x".into(),
            owner_name: "alice@org-a".into(),
            online_ca: true,
            policy: CollabPolicy::default(),
        },
    )
    .await
    .unwrap();
    let mut nodes = Vec::new();
    for name in ["org-a/n1", "org-b/n1", "org-c/n1"] {
        let token = owner
            .join_token(&n(name), None, 600 * SECOND)
            .await
            .unwrap();
        let dir = tmp.path().join(name.replace('/', "-"));
        nodes.push(enroll::enroll(&token, &dir, None).await.unwrap());
    }
    // Admitted but never enrolled: no key on record.
    owner
        .join_token(&n("org-d/n1"), None, 600 * SECOND)
        .await
        .unwrap();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let anonymous = HubClient::new(&hub.url, &hub.pin, None).unwrap();
    let reattest = |proof: String| anonymous.reattest("collab-x", proof);

    // The enrolled key gets a new certificate for itself.
    let before = a.identity().unwrap().info().serial.clone();
    enroll::reattest(a).await.unwrap();
    assert_ne!(a.identity().unwrap().info().serial, before);

    let (key, stranger) = (node_key(a), NodeKey::generate().unwrap());
    let mut cases: Vec<(&str, (u16, String), u16, &str)> = vec![
        (
            "signed by another key",
            refusal(reattest(proof(a, &stranger, &stranger, |_| {})).await),
            401,
            "not signed by its enrolled key",
        ),
        (
            "a CSR for another key",
            refusal(reattest(proof(a, &key, &stranger, |_| {})).await),
            403,
            "another key than the one org-a/n1 enrolled with",
        ),
        (
            "expired",
            refusal(reattest(proof(a, &key, &key, |c| c.exp -= 600)).await),
            401,
            "must be valid now",
        ),
        (
            "valid for too long",
            refusal(reattest(proof(a, &key, &key, |c| c.exp += 3600)).await),
            401,
            "for at most 600s",
        ),
        (
            "another audience",
            refusal(reattest(proof(a, &key, &key, |c| c.aud = "x".into())).await),
            401,
            "not org-a/n1",
        ),
        (
            "another node's name",
            refusal(reattest(proof(a, &key, &key, |c| c.node = n("org-b/n1"))).await),
            401,
            "not signed by its enrolled key",
        ),
        (
            "never enrolled",
            refusal(reattest(proof(a, &key, &key, |c| c.node = n("org-d/n1"))).await),
            401,
            "no enrolled key is recorded for org-d/n1",
        ),
        (
            "not a request",
            refusal(reattest("garbage".into()).await),
            401,
            "signed with the node key",
        ),
    ];
    // Revoked: b's current certificate (and with it its key), and node c.
    let b_serial = b.identity().unwrap().info().serial.clone();
    owner.revoke(&[], &[], &[b_serial]).await.unwrap();
    owner.revoke(&[], &[n("org-c/n1")], &[]).await.unwrap();
    cases.push((
        "the key's last certificate revoked",
        refusal(reattest(proof(b, &node_key(b), &node_key(b), |_| {})).await),
        403,
        "the last certificate issued for org-b/n1's key",
    ));
    cases.push((
        "a revoked node",
        refusal(reattest(proof(c, &node_key(c), &node_key(c), |_| {})).await),
        403,
        "org-c/n1 is revoked",
    ));
    let failures: Vec<String> = cases
        .iter()
        .filter(|(_, (status, message), want, text)| status != want || !message.contains(text))
        .map(|(name, got, want, text)| format!("{name}: got {got:?}, want {want} with {text:?}"))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    // a, still in good standing, re-attests again.
    enroll::reattest(a).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_made_at_once_all_count_and_reach_both_ends() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let mut limits = Limits::default();
    // The owner writes 135 documents here within seconds, and every agent is on one address:
    // what is tested is conflicts, not rates (owner commands wait out a 429 by themselves).
    limits.writes_per_identity.burst = 400;
    limits.requests_per_ip.burst = 100_000;
    limits.connections.max_connections_per_ip = 1024;
    let opts = MeshOptions {
        dns: false,
        hub_limits: limits,
        ..fedmesh_tests::mesh_options()
    };
    let names: Vec<String> = (0..10).map(|i| format!("org-{i}/n1")).collect();
    let specs: Vec<NodeSpec> = names.iter().map(|s| spec(s, vec![])).collect();
    let mesh = LocalMesh::start(tmp.path(), &opts, &specs).await.unwrap();
    // A full mesh: 45 links.
    let mut ids = Vec::new();
    for (i, from) in names.iter().enumerate() {
        for to in &names[i + 1..] {
            let id = mesh
                .link(
                    &n(from),
                    &n(to),
                    &["9000".parse().unwrap()],
                    3600 * SECOND,
                    None,
                )
                .await
                .unwrap();
            ids.push(id);
        }
    }
    assert_eq!(ids.len(), 45);
    for node in mesh.nodes.values() {
        node.wait_for(30 * SECOND, |s| s.links.len() == 9)
            .await
            .unwrap();
    }

    // 45 owner commands at once, one per link.
    let owner_dir = tmp.path().join("owner");
    let started = Instant::now();
    let children: Vec<_> = ids
        .iter()
        .map(|id| {
            Command::new(fedmesh_bin())
                .args(["link", "revoke", id, "--dir"])
                .arg(&owner_dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let commands_took = started.elapsed();
    let failed: Vec<String> = outputs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(failed.is_empty(), "{} failed: {failed:#?}", failed.len());

    // Both ends of every link drop it.
    let finished = Instant::now();
    for node in mesh.nodes.values() {
        node.wait_for(5 * SECOND, |s| s.links.is_empty())
            .await
            .unwrap();
    }
    let converged = finished.elapsed();
    eprintln!(
        "45 revocations at once: commands done after {commands_took:?}, every end converged \
         {converged:?} later"
    );
    assert!(converged < 5 * SECOND, "{converged:?}");

    // Nothing was lost, and the owner's kept ledger says what a fresh read says.
    let kept = mesh.owner.ledger().await.unwrap();
    let fresh = owner::fetch_ledger(
        &mesh.state(&n("org-0/n1")).unwrap().hub_client().unwrap(),
        "collab-x",
        &mesh.owner.pin(),
    )
    .await
    .unwrap();
    let mut revoked = kept.revocation().links.clone();
    revoked.sort();
    ids.sort();
    assert_eq!(revoked, ids);
    assert_eq!(fresh.revocation().links, kept.revocation().links);
    assert_eq!(
        fresh.links(SystemTime::now()),
        kept.links(SystemTime::now())
    );
    assert_eq!(fresh.withheld(), None);
    mesh.shutdown().await.unwrap();
}
