//! The relay under attack, end to end on loopback: revoked and removed peers at the handshake
//! and on open connections, caps on connections and handshakes, idle connections without a
//! link, throttled refusal logs, per-link budgets at both ends, a foreign `ca.pem`, and a copied
//! state directory.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fedmesh_agent::{
    mesh::{LocalMesh, NodeSpec},
    node::Expose,
    relay::{
        Caps, RelayOptions,
        proto::{ALPN, Refusal, Request, Response},
    },
};
use fedmesh_certs::{NodeIdentity, NodeKey, SpiffeId, TrustBundle, files, tls};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::relay::{SECOND, a, ask, b, raw_client, two_nodes};

fn b_id() -> SpiffeId {
    SpiffeId::new("collab-x", "org-b", "n1").unwrap()
}

/// org-a's identity and CA, as a raw client would present them.
fn a_identity(mesh: &LocalMesh) -> (NodeIdentity, TrustBundle) {
    let state = mesh.state(&a()).unwrap();
    (state.identity().unwrap(), state.trust_bundle().unwrap())
}

/// A raw QUIC client bound to `bind`, presenting `identity`: the handshake's outcome in words
/// (`Ok` only once the server has accepted: in TLS 1.3 its verdict can arrive after the
/// client's).
async fn handshake_from(
    bind: &str,
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    to: SocketAddr,
) -> Result<quinn::Connection, String> {
    let rustls = tls::client_config(identity, bundle, &[ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls).unwrap();
    let mut endpoint = quinn::Endpoint::client(format!("{bind}:0").parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(to, &b_id().dns_name())
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // A stream round trip proves the server accepted us.
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Err(e.to_string()),
    };
    let _ = send
        .write_all(
            &Request {
                port: 1,
                label: None,
            }
            .encode(),
        )
        .await;
    let mut prefix = [0u8; 2];
    match tokio::time::timeout(5 * SECOND, recv.read_exact(&mut prefix)).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => Err(conn.close_reason().map_or(e.to_string(), |r| r.to_string())),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

fn metric(metrics: &str, line_prefix: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Opens a relayed echo stream as org-a through its agent and checks it works.
pub(super) async fn echo_stream(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(5 * SECOND, tcp.read_exact(&mut buf))
        .await
        .expect("no echo within 5 s")
        .unwrap();
    assert_eq!(&buf, b"ping");
    tcp
}

/// Waits for `tcp` to be closed or reset, for at most `within`; returns how long it took.
pub(super) async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(within, tcp.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => start.elapsed(),
        other => panic!("stream still open after {within:?}: {other:?}"),
    }
}

enum Cut {
    Serial,
    Node,
    Membership,
}

/// org-a holds a raw connection and a relayed stream to org-b; the owner cuts org-a off; both
/// close within 5 s, and org-a's certificate cannot complete a new handshake.
async fn cut_off(cut: Cut, reason: &str) {
    let target = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut mesh = two_nodes(tmp.path(), 7100, target, RelayOptions::default()).await;
    mesh.link(&a(), &b(), &["7100".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7100, 5 * SECOND).await.unwrap();
    let b_relay = mesh.node(&b()).relay_addr.unwrap();
    let (identity, bundle) = a_identity(&mesh);
    let raw = handshake_from("127.0.0.1", &identity, &bundle, b_relay)
        .await
        .expect("a member's handshake succeeds");
    let mut relayed = echo_stream(addr).await;

    let cut_at = Instant::now();
    match cut {
        Cut::Serial => {
            let serial = identity.info().serial.clone();
            mesh.owner.revoke(&[], &[], &[serial]).await.unwrap();
        }
        Cut::Node => {
            mesh.owner.revoke(&[], &[a()], &[]).await.unwrap();
        }
        Cut::Membership => mesh.owner.remove_member(&a()).await.unwrap(),
    }
    let closed = tokio::time::timeout(5 * SECOND, raw.closed()).await;
    assert!(
        closed.is_ok(),
        "the open connection outlived the cut by 5 s"
    );
    let took = closed_within(&mut relayed, 5 * SECOND - cut_at.elapsed().min(5 * SECOND)).await;
    assert!(cut_at.elapsed() < 5 * SECOND, "closed after {took:?}");

    // A new handshake with the same certificate is refused, with the reason in the metrics.
    let err = handshake_from("127.0.0.1", &identity, &bundle, b_relay)
        .await
        .expect_err("a cut-off certificate completes no handshake");
    assert!(
        err.contains("46") || err.to_lowercase().contains("certificate"),
        "{err}"
    );
    let metrics = mesh.node(&b()).metrics.render();
    let refused = metric(
        &metrics,
        &format!("fedmesh_peers_refused_total{{reason=\"{reason}\"}} "),
    );
    assert!(refused.is_some_and(|n| n >= 1), "{reason}: {metrics}");
    let closed = metric(
        &metrics,
        &format!("fedmesh_relay_connections_closed_total{{reason=\"{reason}\"}} "),
    );
    assert!(closed.is_some_and(|n| n >= 1), "{reason}: {metrics}");
    mesh.nodes.remove(&a()).unwrap().shutdown().await.unwrap();
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_serial_cannot_complete_a_handshake_and_its_streams_close_within_5s() {
    cut_off(Cut::Serial, "revoked_serial").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_cannot_complete_a_handshake_and_its_streams_close_within_5s() {
    cut_off(Cut::Node, "revoked_node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_no_longer_a_member_cannot_complete_a_handshake() {
    cut_off(Cut::Membership, "not_member").await;
}

fn capped(caps: Caps) -> RelayOptions {
    RelayOptions {
        caps,
        ..RelayOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_caps_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let caps = Caps {
        connections: 5,
        connections_per_source: 3,
        connections_per_peer: 4,
        ..Caps::default()
    };
    let mesh = two_nodes(
        tmp.path(),
        7101,
        fedmesh_tests::echo_server().await,
        capped(caps),
    )
    .await;
    mesh.node(&b())
        .wait_for(5 * SECOND, |s| s.synced)
        .await
        .unwrap();
    let b_relay = mesh.node(&b()).relay_addr.unwrap();
    let (a_id, a_ca) = a_identity(&mesh);
    // org-b's own certificate: another member, to fill the relay past one peer's cap.
    let b_state = mesh.state(&b()).unwrap();
    let (b_id_, b_ca) = (b_state.identity().unwrap(), b_state.trust_bundle().unwrap());
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            handshake_from("127.0.0.1", &a_id, &a_ca, b_relay)
                .await
                .unwrap(),
        );
    }
    let err = handshake_from("127.0.0.1", &a_id, &a_ca, b_relay)
        .await
        .expect_err("a fourth connection from one source");
    assert!(err.contains("refused"), "{err}");
    held.push(
        handshake_from("127.0.0.2", &a_id, &a_ca, b_relay)
            .await
            .expect("another source still gets in"),
    );
    // One peer node holds at most 4 connections, from whatever addresses.
    let err = handshake_from("127.0.0.3", &a_id, &a_ca, b_relay)
        .await
        .expect_err("a fifth connection of one peer node");
    assert!(err.contains("too many connections"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.push(
        handshake_from("127.0.0.3", &b_id_, &b_ca, b_relay)
            .await
            .expect("another peer node gets in"),
    );
    let err = handshake_from("127.0.0.4", &b_id_, &b_ca, b_relay)
        .await
        .expect_err("a sixth connection overall");
    assert!(err.contains("refused"), "{err}");
    // A slot freed is a slot to take.
    held.pop().unwrap().close(0u32.into(), b"done");
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.push(
        handshake_from("127.0.0.4", &b_id_, &b_ca, b_relay)
            .await
            .unwrap(),
    );
    let metrics = mesh.node(&b()).metrics.render();
    for reason in [
        "connections_per_source",
        "connections_per_peer",
        "connections",
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("fedmesh_relay_connections_refused_total{{reason=\"{reason}\"}} ")
            ),
            Some(1),
            "{reason}: {metrics}"
        );
    }
    mesh.shutdown().await.unwrap();
}

/// A client certificate verifier that takes `0` to decide: a client whose handshake stays in
/// flight at the server meanwhile.
#[derive(Debug)]
struct Stall(Duration);

impl rustls::client::danger::ServerCertVerifier for Stall {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        std::thread::sleep(self.0);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        tls::HandshakeSignatures::default().tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        tls::HandshakeSignatures::default().tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::HandshakeSignatures::default().schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_flight_beyond_the_caps_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let caps = Caps {
        handshakes: 3,
        handshakes_per_source: 2,
        ..Caps::default()
    };
    let mesh = two_nodes(
        tmp.path(),
        7102,
        fedmesh_tests::echo_server().await,
        capped(caps),
    )
    .await;
    mesh.node(&b())
        .wait_for(5 * SECOND, |s| s.synced)
        .await
        .unwrap();
    let b_relay = mesh.node(&b()).relay_addr.unwrap();
    let (identity, bundle) = a_identity(&mesh);
    let state = mesh.state(&a()).unwrap();
    let key = NodeKey::from_pem(&files::read_to_string(&state.key_path()).unwrap()).unwrap();

    // Clients that hold their handshakes open for 4 s, each on its own thread (the stall blocks
    // the thread).
    let stall = |bind: &'static str| {
        let chain = identity.chain().to_vec();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.private_der().into());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Stall(4 * SECOND)))
                    .with_client_auth_cert(chain, key)
                    .unwrap();
                config.alpn_protocols = vec![ALPN.to_vec()];
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
                let mut endpoint =
                    quinn::Endpoint::client(format!("{bind}:0").parse().unwrap()).unwrap();
                endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
                let _ = endpoint.connect(b_relay, &b_id().dns_name()).unwrap().await;
            });
        })
    };
    // Two in flight from 127.0.0.1: a third from there is refused, one from elsewhere is not.
    let mut stalled = vec![stall("127.0.0.1"), stall("127.0.0.1")];
    tokio::time::sleep(SECOND).await;
    let err = handshake_from("127.0.0.1", &identity, &bundle, b_relay)
        .await
        .expect_err("a third handshake in flight from one source");
    assert!(err.contains("refused"), "{err}");
    handshake_from("127.0.0.3", &identity, &bundle, b_relay)
        .await
        .expect("another source gets in");
    // A third in flight, from 127.0.0.2: now the overall cap refuses anyone.
    stalled.push(stall("127.0.0.2"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = handshake_from("127.0.0.3", &identity, &bundle, b_relay)
        .await
        .expect_err("a fourth handshake in flight overall");
    assert!(err.contains("refused"), "{err}");
    for t in stalled {
        t.join().unwrap();
    }
    // Once they are done, handshakes go through again.
    handshake_from("127.0.0.1", &identity, &bundle, b_relay)
        .await
        .unwrap();
    let metrics = mesh.node(&b()).metrics.render();
    for reason in ["handshakes_per_source", "handshakes"] {
        assert_eq!(
            metric(
                &metrics,
                &format!("fedmesh_relay_connections_refused_total{{reason=\"{reason}\"}} ")
            ),
            Some(1),
            "{reason}: {metrics}"
        );
    }
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_of_peers_without_a_link_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let options = RelayOptions {
        unlinked_idle: 2 * SECOND,
        ..RelayOptions::default()
    };
    let mesh = two_nodes(
        tmp.path(),
        7103,
        fedmesh_tests::echo_server().await,
        options,
    )
    .await;
    mesh.node(&b())
        .wait_for(5 * SECOND, |s| s.synced)
        .await
        .unwrap();
    let (identity, bundle) = a_identity(&mesh);
    let conn = handshake_from(
        "127.0.0.1",
        &identity,
        &bundle,
        mesh.node(&b()).relay_addr.unwrap(),
    )
    .await
    .unwrap();
    let opened = Instant::now();
    let reason = tokio::time::timeout(10 * SECOND, conn.closed())
        .await
        .expect("closed");
    assert!(
        opened.elapsed() >= 1500 * Duration::from_millis(1),
        "{reason}"
    );
    assert!(reason.to_string().contains("idle_without_link"), "{reason}");
    let metrics = mesh.node(&b()).metrics.render();
    assert_eq!(
        metric(
            &metrics,
            "fedmesh_relay_connections_closed_total{reason=\"idle_without_link\"} "
        ),
        Some(1),
        "{metrics}"
    );
    mesh.shutdown().await.unwrap();
}

/// A `tracing` writer that keeps every line.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything here runs on this test's one thread, so a thread-local subscriber sees every
/// line the agents log.
#[tokio::test]
async fn two_thousand_garbage_streams_log_a_handful_of_lines_and_count_exactly() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing_subscriber::util::SubscriberInitExt::set_default(subscriber);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(
        tmp.path(),
        7104,
        fedmesh_tests::echo_server().await,
        RelayOptions::default(),
    )
    .await;
    mesh.link(&a(), &b(), &["7104".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    mesh.peer_addr(&a(), &b(), 7104, 5 * SECOND).await.unwrap();
    let (identity, bundle) = a_identity(&mesh);
    let conn = raw_client(
        &identity,
        &bundle,
        mesh.node(&b()).relay_addr.unwrap(),
        &b_id(),
    )
    .await
    .unwrap();
    for _ in 0..2000 {
        assert!(matches!(
            ask(&conn, b"GET / HTTP/1.1\r\n\r\n").await,
            Response::Refused(Refusal::BadVersion, _)
        ));
    }
    let metrics = mesh.node(&b()).metrics.render();
    assert_eq!(
        metric(
            &metrics,
            "fedmesh_streams_refused_total{reason=\"bad_version\"} "
        ),
        Some(2000),
        "metrics stay exact"
    );
    mesh.shutdown().await.unwrap();
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("stream refused"))
        .collect();
    assert!(
        (1..=5).contains(&refused.len()),
        "{} lines for 2000 refusals:\n{text}",
        refused.len()
    );
    let serial = &identity.info().serial;
    assert!(
        refused[0].contains("spiffe://collab-x.fedmesh/org/org-a/node/n1")
            && refused[0].contains(serial.as_str()),
        "the line names the peer and its serial: {}",
        refused[0]
    );
}

/// The answer to a new raw stream on `conn` for `port`.
async fn open_raw(
    conn: &quinn::Connection,
    port: u16,
) -> (Response, quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Request { port, label: None }.encode())
        .await
        .unwrap();
    let mut prefix = [0u8; 2];
    recv.read_exact(&mut prefix).await.unwrap();
    let response = match Response::decode_prefix(prefix).unwrap() {
        None => Response::Connected,
        Some((refusal, len)) => {
            let mut reason = vec![0u8; len];
            recv.read_exact(&mut reason).await.unwrap();
            Response::Refused(refusal, String::from_utf8(reason).unwrap())
        }
    };
    (response, send, recv)
}

/// Requests and approves a link from org-a to org-b on `port` with a budget; returns its id.
async fn budgeted_link(
    mesh: &LocalMesh,
    port: u16,
    bytes: Option<u64>,
    streams: Option<u32>,
) -> String {
    let terms = fedmesh_agent::owner::terms(
        "collab-x",
        &a(),
        &b(),
        &[port.to_string().parse().unwrap()],
        3600 * SECOND,
        None,
    )
    .unwrap()
    .with_budget(bytes, streams)
    .unwrap();
    let terms = mesh.owner.request(terms).await.unwrap();
    mesh.owner.approve(&terms.id).await.unwrap();
    terms.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiving_end_enforces_a_links_budget_and_remembers_it_across_a_restart() {
    let target = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    fedmesh_tests::subscribe();
    let specs = [
        NodeSpec {
            node: a(),
            organization_id: None,
            exposes: vec![],
        },
        NodeSpec {
            node: b(),
            organization_id: None,
            exposes: ["7105", "7106"]
                .map(|p| Expose {
                    port: p.parse().unwrap(),
                    label: None,
                    target: target.to_string(),
                })
                .to_vec(),
        },
    ];
    let mut mesh = LocalMesh::start(tmp.path(), &fedmesh_tests::mesh_options(), &specs)
        .await
        .unwrap();
    const BUDGET: u64 = 256 * 1024;
    let bytes_link = budgeted_link(&mesh, 7105, Some(BUDGET), None).await;
    let streams_link = budgeted_link(&mesh, 7106, None, Some(2)).await;
    mesh.peer_addr(&a(), &b(), 7106, 5 * SECOND).await.unwrap();
    let (identity, bundle) = a_identity(&mesh);
    let conn = raw_client(
        &identity,
        &bundle,
        mesh.node(&b()).relay_addr.unwrap(),
        &b_id(),
    )
    .await
    .unwrap();

    // Streams: two at once, not three (the raw client does not hold back as an agent would).
    let (first, _s1, _r1) = open_raw(&conn, 7106).await;
    let (second, _s2, _r2) = open_raw(&conn, 7106).await;
    assert_eq!((first, second), (Response::Connected, Response::Connected));
    match open_raw(&conn, 7106).await.0 {
        Response::Refused(Refusal::StreamLimit, reason) => assert_eq!(
            reason,
            format!("link {streams_link} already carries its 2 concurrent streams")
        ),
        other => panic!("{other:?}"),
    }

    // Bytes: 1 MiB sent into an echo; the stream is reset when 256 KiB have been carried.
    let (connected, mut send, mut recv) = open_raw(&conn, 7105).await;
    assert_eq!(connected, Response::Connected);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        for _ in 0..64 {
            if send.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut echoed = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match tokio::time::timeout(10 * SECOND, recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => echoed += n as u64,
            Ok(Ok(None)) => break "finished".to_owned(),
            Ok(Err(e)) => break e.to_string(),
            Err(_) => panic!("the stream outlived its budget"),
        }
    };
    writer.abort();
    assert!(end.contains("reset by peer: error 3"), "{end}");
    assert!(echoed < BUDGET, "echoed {echoed} bytes");
    let metrics = mesh.node(&b()).metrics.render();
    let spent = format!("fedmesh_link_budget{{link=\"{bytes_link}\",measure=\"bytes_spent\"}} ");
    assert_eq!(metric(&metrics, &spent), Some(BUDGET), "{metrics}");
    let limit = format!("fedmesh_link_budget{{link=\"{bytes_link}\",measure=\"bytes_limit\"}} ");
    assert_eq!(metric(&metrics, &limit), Some(BUDGET));
    match open_raw(&conn, 7105).await.0 {
        Response::Refused(Refusal::BudgetSpent, reason) => assert_eq!(
            reason,
            format!("link {bytes_link} has spent its budget of {BUDGET} bytes")
        ),
        other => panic!("{other:?}"),
    }

    // Spent bytes survive a restart: the budgets file is 0600 and the link stays spent.
    conn.close(0u32.into(), b"restart");
    mesh.nodes.remove(&b()).unwrap().shutdown().await.unwrap();
    let path = mesh.state_dir(&b()).join("budgets.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let restarted = fedmesh_agent::node::start(mesh.options[&b()].clone())
        .await
        .unwrap();
    restarted
        .wait_for(5 * SECOND, |s| s.links.len() == 2)
        .await
        .unwrap();
    let b_relay = restarted.relay_addr.unwrap();
    mesh.nodes.insert(b(), restarted);
    let conn = raw_client(&identity, &bundle, b_relay, &b_id())
        .await
        .unwrap();
    assert!(matches!(
        open_raw(&conn, 7105).await.0,
        Response::Refused(Refusal::BudgetSpent, _)
    ));
    mesh.shutdown().await.unwrap();
}

/// A target that reads and discards; sends the byte count of each connection when it ends,
/// after telling that it accepted one.
async fn sink() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Option<u64>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            let _ = tx.send(None);
            tokio::spawn(async move {
                let mut total = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = tx.send(Some(total));
            });
        }
    });
    (addr, rx)
}

/// Bytes flow one way (into a sink), so the dialling end always counts them first and is the
/// end that cuts the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialling_end_enforces_a_links_budget_before_the_peer_sees_a_stream() {
    let (target, mut events) = sink().await;
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(tmp.path(), 7107, target, RelayOptions::default()).await;
    const BUDGET: u64 = 64 * 1024;
    let link = budgeted_link(&mesh, 7107, Some(BUDGET), Some(1)).await;
    let addr = mesh.peer_addr(&a(), &b(), 7107, 5 * SECOND).await.unwrap();

    let mut first = TcpStream::connect(addr).await.unwrap();
    let accepted = tokio::time::timeout(10 * SECOND, events.recv())
        .await
        .unwrap();
    assert_eq!(accepted, Some(None), "the first stream reached the target");
    // A second stream while the first is open: org-a closes it itself.
    let mut second = TcpStream::connect(addr).await.unwrap();
    closed_within(&mut second, 5 * SECOND).await;
    // The first carries its budget's worth, then is reset.
    let chunk = vec![1u8; 8 * 1024];
    for _ in 0..32 {
        if first.write_all(&chunk).await.is_err() {
            break;
        }
    }
    closed_within(&mut first, 10 * SECOND).await;
    let carried = tokio::time::timeout(10 * SECOND, events.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(carried <= BUDGET, "the target got {carried} bytes");
    let mut third = TcpStream::connect(addr).await.unwrap();
    closed_within(&mut third, 5 * SECOND).await;
    let metrics = mesh.node(&a()).metrics.render();
    for (line, value) in [
        (
            "fedmesh_streams_refused_total{reason=\"stream_limit\"} ".to_owned(),
            1,
        ),
        (
            "fedmesh_streams_refused_total{reason=\"budget_spent\"} ".to_owned(),
            1,
        ),
        (
            "fedmesh_streams_reset_total{reason=\"budget_spent\"} ".to_owned(),
            1,
        ),
        (
            format!("fedmesh_link_budget{{link=\"{link}\",measure=\"bytes_spent\"}} "),
            BUDGET,
        ),
        (
            format!("fedmesh_link_budget{{link=\"{link}\",measure=\"streams_limit\"}} "),
            1,
        ),
    ] {
        assert_eq!(metric(&metrics, &line), Some(value), "{line}: {metrics}");
    }
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_another_collaborations_ca_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut mesh = two_nodes(
        tmp.path(),
        7108,
        fedmesh_tests::echo_server().await,
        RelayOptions::default(),
    )
    .await;
    mesh.nodes.remove(&a()).unwrap().shutdown().await.unwrap();
    let ca = mesh.state_dir(&a()).join("ca.pem");
    let start = std::time::SystemTime::now() - 60 * SECOND;
    for (collab, expected) in [
        ("collab-y", "holds another collaboration's CA"),
        ("collab-x", "did not issue this node's certificate"),
    ] {
        let other = fedmesh_certs::CollabCa::generate(collab, start, 3600 * SECOND).unwrap();
        std::fs::write(&ca, other.cert_pem()).unwrap();
        let err = match fedmesh_agent::node::start(mesh.options[&a()].clone()).await {
            Ok(_) => panic!("started with {collab}'s CA"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(expected), "{err}");
    }
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_nodes_state_started_elsewhere_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut mesh = two_nodes(
        tmp.path(),
        7109,
        fedmesh_tests::echo_server().await,
        RelayOptions::default(),
    )
    .await;
    // A restart (at once, likely within the same second) is not a copy.
    mesh.nodes.remove(&a()).unwrap().shutdown().await.unwrap();
    let restarted = fedmesh_agent::node::start(mesh.options[&a()].clone())
        .await
        .unwrap();
    mesh.nodes.insert(a(), restarted);
    let original = mesh.node(&a());
    original.wait_for(5 * SECOND, |s| s.synced).await.unwrap();
    tokio::time::sleep(SECOND).await;
    assert!(
        original
            .metrics
            .render()
            .contains("fedmesh_node_foreign_instances_total 0")
    );
    // The copy's advertisement must be newer than the original's (signed in whole seconds).
    tokio::time::sleep(1100 * Duration::from_millis(1)).await;
    let copy_dir = tmp.path().join("copy");
    std::fs::create_dir(&copy_dir).unwrap();
    for entry in std::fs::read_dir(mesh.state_dir(&a())).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy_dir.join(entry.file_name())).unwrap();
    }
    let mut options = mesh.options[&a()].clone();
    options.state = copy_dir;
    options.dns_listen = None;
    options.admin_listen = None;
    options.loopback_pool = "127.99.1.0/24".parse().unwrap();
    let copy = fedmesh_agent::node::start(options).await.unwrap();
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let metrics = original.metrics.render();
        if metrics.contains("fedmesh_node_foreign_instances_total 1")
            && metrics.contains("fedmesh_node_advertised_by_another_instance 1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not reported:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    copy.shutdown().await.unwrap();
    mesh.shutdown().await.unwrap();
}

/// 250 idle connections from one member's certificate, against a real agent process whose
/// caps let them all in: each costs tens of KiB (QUIC state for few streams and a small
/// window), not the 1.36 MB each cost when every connection got 16,384 streams up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_memory_stays_bounded_under_250_idle_connections_from_one_certificate() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let specs = [NodeSpec {
        node: a(),
        organization_id: None,
        exposes: vec![],
    }];
    let mut mesh = LocalMesh::start(tmp.path(), &fedmesh_tests::mesh_options(), &specs)
        .await
        .unwrap();
    let token = mesh
        .owner
        .join_token(&b(), None, 3600 * SECOND)
        .await
        .unwrap();
    let b_state = fedmesh_agent::enroll::enroll(&token, &tmp.path().join("org-b"), None)
        .await
        .unwrap();
    let extra = [
        "--relay-max-connections-per-source",
        "1000",
        "--relay-max-connections-per-peer",
        "1000",
        "--relay-unlinked-idle",
        "1h",
    ]
    .map(String::from);
    let agent =
        fedmesh_tests::AgentProcess::start(&fedmesh_tests::fedmesh_bin(), &b_state.dir, &extra);
    let (identity, bundle) = a_identity(&mesh);
    // Once the agent knows its members, org-a gets in.
    let deadline = Instant::now() + 20 * SECOND;
    while handshake_from("127.0.0.1", &identity, &bundle, agent.relay)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the agent never admitted org-a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(SECOND).await;
    let idle = fedmesh_tests::rss_mib(agent.pid());
    let (held, refused) =
        fedmesh_tests::connect_many(&identity, &bundle, agent.relay, &b_id(), 250).await;
    assert_eq!((held.len(), refused), (250, 0));
    tokio::time::sleep(2 * SECOND).await;
    let grown = fedmesh_tests::rss_mib(agent.pid()) - idle;
    assert!(
        grown < 64.0,
        "{grown:.1} MiB for 250 idle connections (340 MiB before connections were sized)"
    );
    drop(held);
    drop(agent);
    mesh.shutdown().await.unwrap();
}
