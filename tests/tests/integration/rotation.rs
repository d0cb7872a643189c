//! Certificates that renew under open streams, and peers that die: a stream outlives every
//! renewal (and the certificates its connection was made with) byte-exact while new streams go
//! to connections made with current certificates; a stream offered on a connection whose
//! certificate expired is refused; a peer agent killed with SIGKILL has its streams reset within
//! the idle timeout, new streams to it fail fast with a reason, and its restart restores the link.
//!
//! Time is scaled down: the 30 s certificates and 3-minute stream become 6 s
//! certificates (the hub back-dates them by a quarter of their life, so each lives 7.5 s and is
//! renewed every ~3.5 s at two thirds of it) and a 20 s stream: the same five-odd renewals, and
//! the first certificates expire under the stream.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use fedmesh_agent::{
    mesh::{LocalMesh, MeshOptions, NodeSpec},
    node::Expose,
    relay::proto::{ALPN, Refusal, Request, Response},
};
use fedmesh_certs::{NodeIdentity, SpiffeId, TrustBundle, tls};
use fedmesh_documents::NodeRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: Duration = Duration::from_secs(1);

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

/// Sends `payload` through `tcp` and expects it back, within 10 s.
async fn echoed(tcp: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    tcp.write_all(payload).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(10 * SECOND, tcp.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    if back == payload {
        Ok(())
    } else {
        Err("the echo differs from what was sent".into())
    }
}

/// A connection to `addr` and one echoed message on it.
async fn round_trip(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    echoed(&mut tcp, payload).await
}

/// Deterministic bytes that differ from chunk to chunk, so a lost, repeated or reordered chunk
/// shows.
fn chunk(i: u64) -> Vec<u8> {
    (0..16 * 1024u64)
        .map(|j| ((i.wrapping_mul(2_654_435_761) ^ j.wrapping_mul(40_503)) % 251) as u8)
        .collect()
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_outlive_renewals_and_expired_connections_carry_nothing_new() {
    fedmesh_tests::subscribe();
    let target = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let opts = MeshOptions {
        cert_ttl: 6 * SECOND,
        ..fedmesh_tests::mesh_options()
    };
    let (a, b) = (n("org-a/n1"), n("org-b/n1"));
    let specs = [
        NodeSpec {
            node: a.clone(),
            organization_id: None,
            exposes: vec![],
        },
        NodeSpec {
            node: b.clone(),
            organization_id: None,
            exposes: vec![Expose {
                port: 7301,
                label: None,
                target: target.to_string(),
            }],
        },
    ];
    let mesh = LocalMesh::start(tmp.path(), &opts, &specs).await.unwrap();
    mesh.link(&a, &b, &["7301".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a, &b, 7301, 10 * SECOND).await.unwrap();
    let first = mesh.state(&a).unwrap().identity().unwrap().info().clone();

    // A raw peer presenting a's first certificate: a stream opened while it is valid, and one
    // offered on the same connection once it has expired.
    let a_state = mesh.state(&a).unwrap();
    let raw = raw_connection(
        &a_state.identity().unwrap(),
        &a_state.trust_bundle().unwrap(),
        mesh.node(&b).relay_addr.unwrap(),
        &SpiffeId::new("collab-x", "org-b", "n1").unwrap(),
    )
    .await;
    let (mut raw_send, mut raw_recv) = raw_stream(&raw, 7301).await.expect("admitted");

    // One stream carries 16 KiB every 100 ms for 20 s (about 3 MiB) while a new connection is
    // made every 500 ms.
    let mut long = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut i = 0u64;
    let mut short = 0;
    while started.elapsed() < 20 * SECOND {
        echoed(&mut long, &chunk(i))
            .await
            .unwrap_or_else(|e| panic!("long stream, chunk {i}: {e}"));
        i += 1;
        if i.is_multiple_of(5) {
            round_trip(addr, format!("short {short}").as_bytes())
                .await
                .unwrap_or_else(|e| panic!("short stream {short}: {e}"));
            short += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = mesh.state(&a).unwrap().identity().unwrap().info().clone();
    eprintln!(
        "long stream: {i} chunks of 16 KiB echoed byte-exact over {:?}, {short} short streams",
        started.elapsed()
    );
    assert!(
        first.not_after < SystemTime::now(),
        "the first certificate expired"
    );
    assert_ne!(now.serial, first.serial, "renewed");

    // The raw stream, made with a's first certificate, still runs past its expiry; a new one
    // on that connection is refused for it.
    raw_send.write_all(b"after expiry").await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(5 * SECOND, raw_recv.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"after expiry");
    let refused = raw_stream(&raw, 7301).await.unwrap_err();
    assert!(
        refused.contains("certificate_expired") && refused.contains("expired"),
        "{refused}"
    );

    // Connections made with renewed-away certificates closed once idle (by whichever end
    // renewed first); they do not pile up.
    let mut rotated = 0.0;
    for node in [&a, &b] {
        let metrics = mesh.node(node).metrics.render();
        let closed = counter(
            &metrics,
            "fedmesh_relay_connections_closed_total{reason=\"rotated\"}",
        );
        eprintln!("{node}: {closed} connections closed as rotated");
        rotated += closed;
        let open = counter(&metrics, "fedmesh_peer_connections ");
        assert!(open <= 4.0, "{node}: {open} open connections\n{metrics}");
    }
    assert!(rotated >= 2.0, "{rotated} connections closed as rotated");
    drop((raw_send, raw_recv));
    raw.close(0u32.into(), b"done");
    mesh.shutdown().await.unwrap();
}

/// A QUIC connection to the relay at `to` (node `server`) presenting `identity`.
async fn raw_connection(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    to: SocketAddr,
    server: &SpiffeId,
) -> quinn::Connection {
    let rustls = tls::client_config(identity, bundle, &[ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(SECOND));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
        .connect(to, &server.dns_name())
        .unwrap()
        .await
        .unwrap()
}

/// Opens a stream for `port` on `conn`: the streams once the relay answers that its target is
/// connected, or the refusal in words.
async fn raw_stream(
    conn: &quinn::Connection,
    port: u16,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&Request { port, label: None }.encode())
            .await
            .map_err(|e| e.to_string())?;
        let mut prefix = [0u8; 2];
        recv.read_exact(&mut prefix)
            .await
            .map_err(|e| e.to_string())?;
        match Response::decode_prefix(prefix)? {
            None => Ok((send, recv)),
            Some((refusal, len)) => {
                let mut reason = vec![0u8; len];
                let _ = recv.read_exact(&mut reason).await;
                Err(format!(
                    "{}: {}",
                    Refusal::as_str(refusal),
                    String::from_utf8_lossy(&reason)
                ))
            }
        }
    };
    tokio::time::timeout(10 * SECOND, attempt)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_resets_its_streams_fails_new_ones_fast_and_comes_back() {
    fedmesh_tests::subscribe();
    let target = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (n("org-a/n1"), n("org-b/n1"));
    let specs = [NodeSpec {
        node: a.clone(),
        organization_id: None,
        exposes: vec![],
    }];
    let mut mesh = LocalMesh::start(tmp.path(), &fedmesh_tests::mesh_options(), &specs)
        .await
        .unwrap();
    let token = mesh
        .owner
        .join_token(&b, None, 3600 * SECOND)
        .await
        .unwrap();
    let b_state = fedmesh_agent::enroll::enroll(&token, &tmp.path().join("org-b"), None)
        .await
        .unwrap();
    let bin = fedmesh_tests::fedmesh_bin();
    let extra = ["--expose".to_owned(), format!("7302={target}")];
    let agent = fedmesh_tests::AgentProcess::start(&bin, &b_state.dir, &extra);
    let relay = agent.relay;
    mesh.link(&a, &b, &["7302".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a, &b, 7302, 20 * SECOND).await.unwrap();
    let mut open = TcpStream::connect(addr).await.unwrap();
    echoed(&mut open, b"before the kill").await.unwrap();

    // SIGKILL: no close frame, nothing but silence.
    drop(agent);
    let killed = Instant::now();
    let mut buf = [0u8; 1];
    let ended = tokio::time::timeout(20 * SECOND, open.read(&mut buf)).await;
    let reset_after = killed.elapsed();
    eprintln!("open stream ended {reset_after:?} after the kill");
    assert!(
        matches!(ended, Ok(Ok(0) | Err(_))),
        "the open stream did not end: {ended:?}"
    );
    assert!(
        reset_after < 10 * SECOND,
        "the open stream ended {reset_after:?} after the kill"
    );

    // New streams to the peer known to be down are closed at once with a reason, not held.
    for attempt in 0..3 {
        let began = Instant::now();
        let result = round_trip(addr, b"anyone there?").await;
        assert!(result.is_err(), "a stream to a dead peer was echoed");
        let took = began.elapsed();
        eprintln!("new stream {attempt} to the dead peer closed after {took:?}");
        assert!(
            took < 5 * SECOND,
            "attempt {attempt}: closed only after {took:?}"
        );
    }
    let metrics = mesh.node(&a).metrics.render();
    assert!(
        counter(
            &metrics,
            "fedmesh_streams_refused_total{reason=\"peer_down\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        counter(
            &metrics,
            "fedmesh_relay_connections_closed_total{reason=\"peer_timed_out\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // Restarted (same address), the peer carries traffic again.
    let _agent = fedmesh_tests::AgentProcess::start_at(&bin, &b_state.dir, relay, &extra);
    let restarted = Instant::now();
    let deadline = restarted + 20 * SECOND;
    loop {
        match round_trip(addr, b"back again").await {
            Ok(()) => {
                eprintln!("link restored {:?} after the restart", restarted.elapsed());
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "link not restored: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mesh.shutdown().await.unwrap();
}
