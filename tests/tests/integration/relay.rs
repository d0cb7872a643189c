//! The relay on loopback, end to end: an embedded hub, agents in relay mode, real TCP clients
//! and targets, real QUIC between the agents.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use fedmesh_agent::{
    mesh::{LocalMesh, MeshOptions, NodeSpec},
    node::Expose,
    relay::{
        RelayOptions,
        proto::{ALPN, Refusal, Request, Response},
        tuning::{Congestion, PathEstimate},
    },
};
use fedmesh_certs::{CollabCa, IssuancePolicy, NodeIdentity, NodeKey, SpiffeId, TrustBundle, tls};
use fedmesh_documents::NodeRef;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub(super) const SECOND: Duration = Duration::from_secs(1);

pub(super) fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

pub(super) fn a() -> NodeRef {
    n("org-a/n1")
}

pub(super) fn b() -> NodeRef {
    n("org-b/n1")
}

/// org-a and org-b, org-b exposing `port` → `target`.
pub(super) async fn two_nodes(
    dir: &std::path::Path,
    port: u16,
    target: SocketAddr,
    relay: RelayOptions,
) -> LocalMesh {
    let opts = MeshOptions {
        relay,
        ..fedmesh_tests::mesh_options()
    };
    pair(dir, port, target, &opts).await
}

/// org-a and org-b under `opts`, org-b exposing `port` → `target`.
pub(super) async fn pair(
    dir: &std::path::Path,
    port: u16,
    target: SocketAddr,
    opts: &MeshOptions,
) -> LocalMesh {
    fedmesh_tests::subscribe();
    let specs = [
        NodeSpec {
            node: a(),
            organization_id: Some(1),
            exposes: vec![],
        },
        NodeSpec {
            node: b(),
            organization_id: Some(2),
            exposes: vec![Expose {
                port,
                label: Some("test".into()),
                target: target.to_string(),
            }],
        },
    ];
    LocalMesh::start(dir, opts, &specs).await.unwrap()
}

fn fast_refusals() -> RelayOptions {
    RelayOptions {
        max_udp_payload: 65_000,
        target_deadline: SECOND,
        ..RelayOptions::default()
    }
}

/// A deterministic byte stream: xorshift64 from `seed`.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `total` pattern bytes to `w` and returns their SHA-256.
pub(super) async fn send_pattern(
    w: &mut (impl AsyncWriteExt + Unpin),
    seed: u64,
    total: usize,
) -> Vec<u8> {
    let mut pattern = Pattern(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let len = left.min(buf.len());
        pattern.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        w.write_all(&buf[..len]).await.unwrap();
        left -= len;
    }
    hash.finalize().to_vec()
}

/// Reads `r` to EOF; returns (bytes, SHA-256).
pub(super) async fn read_hash(r: &mut (impl AsyncReadExt + Unpin)) -> (usize, Vec<u8>) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let len = r.read(&mut buf).await.unwrap();
        if len == 0 {
            return (total, hash.finalize().to_vec());
        }
        total += len;
        hash.update(&buf[..len]);
    }
}

/// Carries `total` pattern bytes each way through org-a's relay to a target at org-b and checks
/// both directions byte for byte (count and SHA-256); returns the mesh, still running.
pub(super) async fn carry_both_ways(
    dir: &std::path::Path,
    relay: RelayOptions,
    total: usize,
) -> LocalMesh {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let mesh = two_nodes(dir, 7001, target_addr, relay).await;
    mesh.link(
        &a(),
        &b(),
        &["7001:test".parse().unwrap()],
        3600 * SECOND,
        None,
    )
    .await
    .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7001, 5 * SECOND).await.unwrap();

    let server = tokio::spawn(async move {
        let (tcp, _) = target.accept().await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        let sent = tokio::spawn(async move {
            let h = send_pattern(&mut w, 2, total).await;
            w.shutdown().await.unwrap();
            h
        });
        let received = read_hash(&mut r).await;
        (received, sent.await.unwrap())
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let sent = tokio::spawn(async move {
        let h = send_pattern(&mut w, 1, total).await;
        w.shutdown().await.unwrap();
        h
    });
    let client_received = read_hash(&mut r).await;
    let client_sent = sent.await.unwrap();
    let (server_received, server_sent) = server.await.unwrap();
    assert_eq!(server_received, (total, client_sent), "org-a → org-b");
    assert_eq!(client_received, (total, server_sent), "org-b → org-a");
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mesh = carry_both_ways(tmp.path(), RelayOptions::default(), 100 * 1024 * 1024).await;
    let metrics = mesh.node(&a()).metrics.render();
    assert!(
        metrics.contains("fedmesh_streams_total{direction=\"outbound\",over=\"quic\"} 1"),
        "{metrics}"
    );
    mesh.shutdown().await.unwrap();
}

/// Loopback-sized datagrams (as the demo uses) carry bulk data without losing the path MTU:
/// batching several ~64 KiB datagrams into one segmentation-offload send exceeds what Linux
/// accepts, and the refused sends used to drive the path down to 1200 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_sized_datagrams_keep_their_path_mtu_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayOptions {
        max_udp_payload: 65_000,
        ..RelayOptions::default()
    };
    let mesh = carry_both_ways(tmp.path(), relay, 32 * 1024 * 1024).await;
    // Clear the path gauge, then read the first value the relay reports after the load.
    let metrics = &mesh.node(&a()).metrics;
    let peer = fedmesh_agent::metrics::PeerLabels {
        peer: "org-b/n1".into(),
    };
    metrics.peer_path_mtu.get_or_create(&peer).set(0);
    let mtu = |text: &str| -> u32 {
        text.lines()
            .find_map(|l| l.strip_prefix("fedmesh_peer_path_mtu_bytes{peer=\"org-b/n1\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let text = fedmesh_tests::metrics_until(metrics, 10 * SECOND, |t| mtu(t) > 0).await;
    let mtu = mtu(&text);
    assert!(
        mtu > 1452,
        "path MTU fell to {mtu} bytes while carrying data"
    );
    mesh.shutdown().await.unwrap();
}

/// Every congestion controller a node may pick carries bytes exactly, with flow-control windows
/// sized from a small path (the windows' floor) and from the default one (the default
/// controller, `cubic-tolerant`, carries every other test's bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_congestion_controller_and_sized_windows_carry_bytes_exactly() {
    for (congestion, path) in [
        (
            Congestion::Bbr,
            PathEstimate {
                bits_per_second: 10_000_000,
                rtt: Duration::from_millis(10),
            },
        ),
        (Congestion::NewReno, PathEstimate::default()),
        (Congestion::Cubic, PathEstimate::default()),
        (Congestion::CubicHystart, PathEstimate::default()),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let relay = RelayOptions {
            congestion,
            path,
            ..RelayOptions::default()
        };
        let mesh = carry_both_ways(tmp.path(), relay, 8 * 1024 * 1024).await;
        mesh.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_reply_path_open() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(tmp.path(), 7002, target_addr, RelayOptions::default()).await;
    mesh.link(&a(), &b(), &["7002".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7002, 5 * SECOND).await.unwrap();

    // The server reads to EOF, then answers: it only works if the client's FIN arrives as a
    // FIN and the way back stays open.
    tokio::spawn(async move {
        let (mut tcp, _) = target.accept().await.unwrap();
        let mut request = Vec::new();
        tcp.read_to_end(&mut request).await.unwrap();
        let reply = format!(
            "got {} bytes: {}",
            request.len(),
            String::from_utf8_lossy(&request)
        );
        tcp.write_all(reply.as_bytes()).await.unwrap();
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"hello").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(5 * SECOND, tcp.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "got 5 bytes: hello");
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_closes_the_client_cleanly_with_a_reason() {
    // Nothing listens at the target; the receiving agent retries for a second, then refuses.
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = unused.local_addr().unwrap();
    drop(unused);
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(tmp.path(), 7003, target_addr, fast_refusals()).await;
    mesh.link(&a(), &b(), &["7003".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7003, 5 * SECOND).await.unwrap();

    let start = Instant::now();
    let mut tcp = TcpStream::connect(addr)
        .await
        .expect("the listener accepts: no accept-then-reset");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(10 * SECOND, tcp.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(read.unwrap(), 0, "a clean close (EOF), not a reset");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "held while the target was retried"
    );
    let metrics = mesh.node(&a()).metrics.render();
    assert!(
        metrics.contains("fedmesh_streams_refused_total{reason=\"target_unreachable\"} 1"),
        "{metrics}"
    );
    mesh.shutdown().await.unwrap();
}

/// org-a/n1's identity in collab-y, whose CA the test meshes (collab-x) do not trust.
pub(super) fn stranger() -> NodeIdentity {
    let other =
        CollabCa::generate("collab-y", SystemTime::now() - 60 * SECOND, 3600 * SECOND).unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key
        .csr(&SpiffeId::new("collab-y", "org-a", "n1").unwrap())
        .unwrap();
    let cert = other
        .sign_csr_pem(
            &csr.pem,
            &IssuancePolicy::default(),
            3600 * SECOND,
            SystemTime::now(),
        )
        .unwrap();
    NodeIdentity::new(vec![cert.der], &key).unwrap()
}

/// A bare QUIC client speaking the relay protocol with `identity`.
pub(super) async fn raw_client(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    to: SocketAddr,
    server: &SpiffeId,
) -> Result<quinn::Connection, String> {
    let rustls = tls::client_config(identity, bundle, &[ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
        .connect(to, &server.dns_name())
        .unwrap()
        .await
        .map_err(|e| e.to_string())
}

/// Sends `header` on a new stream and reads the answer.
pub(super) async fn ask(conn: &quinn::Connection, header: &[u8]) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(header).await.unwrap();
    read_answer(&mut recv).await.unwrap()
}

/// Reads a relay's answer to a stream header.
pub(super) async fn read_answer(
    recv: &mut (impl AsyncReadExt + Unpin),
) -> std::io::Result<Response> {
    let mut prefix = [0u8; 2];
    recv.read_exact(&mut prefix).await?;
    Ok(match Response::decode_prefix(prefix).unwrap() {
        None => Response::Connected,
        Some((refusal, len)) => {
            let mut reason = vec![0u8; len];
            recv.read_exact(&mut reason).await?;
            Response::Refused(refusal, String::from_utf8(reason).unwrap())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_a_link_and_bad_headers_are_refused() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(
        tmp.path(),
        7004,
        target.local_addr().unwrap(),
        RelayOptions::default(),
    )
    .await;
    mesh.link(&a(), &b(), &["7004".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    mesh.peer_addr(&a(), &b(), 7004, 5 * SECOND).await.unwrap();
    let a_state = mesh.state(&a()).unwrap();
    let conn = raw_client(
        &a_state.identity().unwrap(),
        &a_state.trust_bundle().unwrap(),
        mesh.node(&b()).relay_addr.unwrap(),
        &SpiffeId::new("collab-x", "org-b", "n1").unwrap(),
    )
    .await
    .unwrap();

    let no_link = Request {
        port: 22,
        label: None,
    }
    .encode();
    match ask(&conn, &no_link).await {
        Response::Refused(Refusal::NoLink, reason) => {
            assert_eq!(
                reason,
                "no link allows org-a/n1 to reach org-b/n1 on port 22"
            );
        }
        other => panic!("{other:?}"),
    }
    let garbage = b"GET / HTTP/1.1\r\n\r\n";
    assert!(matches!(
        ask(&conn, garbage).await,
        Response::Refused(Refusal::BadVersion, _)
    ));
    let oversized = [1u8, 0xff, 0xff];
    assert!(matches!(
        ask(&conn, &oversized).await,
        Response::Refused(Refusal::HeaderTooLarge, _)
    ));
    let lying = [1u8, 0, 9, 0x1b, 0x64, 200];
    assert!(matches!(
        ask(&conn, &lying).await,
        Response::Refused(Refusal::BadHeader, _)
    ));
    // The link's own port works on the same connection.
    tokio::spawn(async move { target.accept().await });
    assert_eq!(
        ask(
            &conn,
            &Request {
                port: 7004,
                label: None
            }
            .encode()
        )
        .await,
        Response::Connected
    );

    let metrics = mesh.node(&b()).metrics.render();
    assert_refused_once(
        &metrics,
        &["no_link", "bad_version", "header_too_large", "bad_header"],
    );
    mesh.shutdown().await.unwrap();
}

/// Asserts that `metrics` count exactly one refused stream for each of `reasons`.
pub(super) fn assert_refused_once(metrics: &str, reasons: &[&str]) {
    for reason in reasons {
        assert!(
            metrics.contains(&format!(
                "fedmesh_streams_refused_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_collaboration_fails_the_handshake() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(
        tmp.path(),
        7005,
        target.local_addr().unwrap(),
        RelayOptions::default(),
    )
    .await;
    let b_bundle = mesh.state(&b()).unwrap().trust_bundle().unwrap();

    let stranger = stranger();
    // Trusting collab-x's CA for the server side, so only the server's check can fail.
    // In TLS 1.3 the client finishes first; the server's verdict arrives as the close.
    let err = match raw_client(
        &stranger,
        &b_bundle,
        mesh.node(&b()).relay_addr.unwrap(),
        &SpiffeId::new("collab-x", "org-b", "n1").unwrap(),
    )
    .await
    {
        Err(e) => e,
        Ok(conn) => tokio::time::timeout(5 * SECOND, conn.closed())
            .await
            .unwrap()
            .to_string(),
    };
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("alert"),
        "{err}"
    );
    fedmesh_tests::metrics_until(&mesh.node(&b()).metrics, 5 * SECOND, |m| {
        m.contains("fedmesh_streams_refused_total{reason=\"handshake\"} 1")
    })
    .await;
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_open_and_revocation_closes_streams_within_five_seconds() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(tmp.path(), 7006, target_addr, RelayOptions::default()).await;

    // Echo server.
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = target.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let approved = Instant::now();
    let id = mesh
        .link(&a(), &b(), &["7006".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7006, 5 * SECOND).await.unwrap();
    let mut tcp = loop {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            break tcp;
        }
        assert!(
            approved.elapsed() < 5 * SECOND,
            "link not usable within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert!(
        approved.elapsed() < 5 * SECOND,
        "link usable after {:?}",
        approved.elapsed()
    );

    let revoked = Instant::now();
    mesh.owner.revoke(&[id], &[], &[]).await.unwrap();
    let closed = tokio::time::timeout(5 * SECOND, tcp.read(&mut buf)).await;
    let elapsed = revoked.elapsed();
    match closed {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("stream still open after revocation: {other:?}"),
    }
    assert!(elapsed < 5 * SECOND, "closed after {elapsed:?}");
    // And the listener is gone.
    let deadline = Instant::now() + 5 * SECOND;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still open after revocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_peer_map_health_and_metrics() {
    use hickory_server::proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{Name, RData, RecordType},
        serialize::binary::{BinDecodable, BinEncodable},
    };
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(
        tmp.path(),
        7007,
        target.local_addr().unwrap(),
        RelayOptions::default(),
    )
    .await;
    mesh.link(
        &a(),
        &b(),
        &["7007:test".parse().unwrap()],
        3600 * SECOND,
        None,
    )
    .await
    .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7007, 5 * SECOND).await.unwrap();

    let dns = mesh.node(&a()).dns_addr.unwrap();
    let query = |name: &str| {
        let name = name.to_owned();
        async move {
            let mut msg = Message::new(7, MessageType::Query, OpCode::Query);
            msg.add_query(Query::query(
                Name::from_ascii(&name).unwrap(),
                RecordType::A,
            ));
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            socket.send_to(&msg.to_bytes().unwrap(), dns).await.unwrap();
            let mut buf = [0u8; 512];
            let len = tokio::time::timeout(SECOND, socket.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            Message::from_bytes(&buf[..len]).unwrap()
        }
    };
    for name in ["org-b.collab-x.fedmesh.", "n1.org-b.collab-x.fedmesh."] {
        let answer = query(name).await;
        let ips: Vec<_> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec![addr.ip()], "{name}");
    }
    assert_eq!(
        query("org-z.collab-x.fedmesh.")
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );

    // The same map as FEDMESH_PEERS, in the state directory and on the admin API.
    let peers: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(mesh.state_dir(&a()).join("peers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peers["org-b.collab-x.fedmesh"][0], addr.to_string());
    let admin = mesh.node(&a()).admin_addr.unwrap();
    let get = |path: &str| {
        let url = format!("http://{admin}{path}");
        async move {
            let resp = reqwest::get(url).await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok".into()));
    assert_eq!(get("/readyz").await.0, 200);
    let (_, peers_api) = get("/peers").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&peers_api).unwrap(),
        peers
    );
    let (_, metrics) = get("/metrics").await;
    assert!(metrics.contains("fedmesh_links_active 1"), "{metrics}");
    assert!(
        metrics.contains("fedmesh_certificate_expiry_seconds"),
        "{metrics}"
    );
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_and_links_outlive_the_first_certificate() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = target.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    // Certificates of 6 s (+1.5 s back-dated): renewed after ~5 s, at two thirds of their life.
    let opts = MeshOptions {
        cert_ttl: 6 * SECOND,
        ..fedmesh_tests::mesh_options()
    };
    let specs = [
        NodeSpec {
            node: a(),
            organization_id: None,
            exposes: vec![],
        },
        NodeSpec {
            node: b(),
            organization_id: None,
            exposes: vec![Expose {
                port: 7008,
                label: None,
                target: target_addr.to_string(),
            }],
        },
    ];
    let mesh = LocalMesh::start(tmp.path(), &opts, &specs).await.unwrap();
    let first = mesh.state(&a()).unwrap().identity().unwrap().info().clone();
    mesh.link(&a(), &b(), &["7008".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7008, 5 * SECOND).await.unwrap();

    // The agent renews (its identity channel says so), and outlives the first certificate.
    let mut identity = mesh.node(&a()).identity.clone();
    tokio::time::timeout(
        10 * SECOND,
        identity.wait_for(|i| i.info().serial != first.serial),
    )
    .await
    .expect("renewed within the certificate's life")
    .unwrap();
    let until = first.not_after + SECOND;
    tokio::time::sleep(until.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let now = mesh.state(&a()).unwrap().identity().unwrap().info().clone();
    assert_ne!(now.serial, first.serial, "renewed");
    assert!(now.not_after > first.not_after);
    assert!(
        now.not_after > SystemTime::now(),
        "the current certificate is valid"
    );
    // The node still follows the hub with its new certificate, and traffic still flows.
    let snap = mesh.node(&a()).snapshot.borrow().clone();
    assert_eq!(snap.links.len(), 1);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(5 * SECOND, tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"still here");
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_keeps_its_address_across_restarts() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut mesh = two_nodes(
        tmp.path(),
        7009,
        target.local_addr().unwrap(),
        RelayOptions::default(),
    )
    .await;
    mesh.link(&a(), &b(), &["7009".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let before = mesh.peer_addr(&a(), &b(), 7009, 5 * SECOND).await.unwrap();

    mesh.nodes.remove(&a()).unwrap().shutdown().await.unwrap();
    let restarted = fedmesh_agent::node::start(mesh.options[&a()].clone())
        .await
        .unwrap();
    mesh.nodes.insert(a(), restarted);
    let after = mesh.peer_addr(&a(), &b(), 7009, 5 * SECOND).await.unwrap();
    assert_eq!(after, before, "same address after a restart");
    mesh.shutdown().await.unwrap();
}
