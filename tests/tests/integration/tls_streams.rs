//! Streams over TLS (`--streams-over tls|auto`), end to end on loopback: the bytes, the header,
//! admission and revocation of QUIC streams, on mTLS TCP connections of their own; QUIC where a
//! peer takes none.

use std::{net::SocketAddr, sync::Arc};

use fedmesh_agent::{
    mesh::MeshOptions,
    metrics::Metrics,
    relay::{
        Caps, RelayOptions, StreamsOver,
        proto::{Refusal, Request, Response},
        tls_streams::ALPN,
    },
};
use fedmesh_certs::{NodeIdentity, SpiffeId, TrustBundle, tls};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    relay::{
        SECOND, a, assert_refused_once, b, carry_both_ways, pair, read_answer, stranger, two_nodes,
    },
    relay_security::{closed_within, echo_stream},
};

fn over(streams_over: StreamsOver) -> RelayOptions {
    RelayOptions {
        streams_over,
        ..fedmesh_tests::mesh_options().relay
    }
}

/// Streams opened in `direction` over `carrier`, from the agent's metrics.
fn opened(metrics: &Metrics, direction: &str, carrier: &str) -> u64 {
    let line = format!("fedmesh_streams_total{{direction=\"{direction}\",over=\"{carrier}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_streams_carry_bytes_exactly_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    // Each side shuts down writing after its bytes: a half-close each way, then the other
    // direction's bytes still flow.
    let mesh = carry_both_ways(tmp.path(), over(StreamsOver::Tls), 32 * 1024 * 1024).await;
    assert_eq!(opened(&mesh.node(&a()).metrics, "outbound", "tls"), 1);
    assert_eq!(opened(&mesh.node(&a()).metrics, "outbound", "quic"), 0);
    assert_eq!(opened(&mesh.node(&b()).metrics, "inbound", "tls"), 1);
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_moves_streams_to_tls_once_the_peer_measures_close() {
    let target_addr = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(tmp.path(), 7301, target_addr, over(StreamsOver::Auto)).await;
    mesh.link(&a(), &b(), &["7301".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7301, 5 * SECOND).await.unwrap();
    // No round trip is known before the first stream: it goes over QUIC, whose connection then
    // measures loopback's. (On a busy machine a round trip may read over 2 ms for a while.)
    drop(echo_stream(addr).await);
    let metrics = &mesh.node(&a()).metrics;
    assert_eq!(opened(metrics, "outbound", "quic"), 1);
    for _ in 0..20 {
        if opened(metrics, "outbound", "tls") > 0 {
            break;
        }
        drop(echo_stream(addr).await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        opened(metrics, "outbound", "tls") > 0,
        "{}",
        metrics.render()
    );
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_takes_no_tls_streams_gets_quic() {
    let target_addr = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let opts = MeshOptions {
        relay: over(StreamsOver::Tls),
        relay_of: [(b(), over(StreamsOver::Quic))].into(),
        ..fedmesh_tests::mesh_options()
    };
    let mesh = pair(tmp.path(), 7302, target_addr, &opts).await;
    mesh.link(&a(), &b(), &["7302".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7302, 5 * SECOND).await.unwrap();
    // org-b takes no TCP on its QUIC port: the stream goes over QUIC, and so does the next
    // one (without another try, for a while).
    drop(echo_stream(addr).await);
    drop(echo_stream(addr).await);
    let metrics = &mesh.node(&a()).metrics;
    assert_eq!(opened(metrics, "outbound", "quic"), 2);
    assert_eq!(opened(metrics, "outbound", "tls"), 0);
    mesh.shutdown().await.unwrap();
}

/// Opens a TLS stream through a new link, revokes the link (`serial` false) or the dialling
/// node's certificate serial (a standing the link itself outlives), and checks the stream ends.
async fn revocation_resets_tls_streams(serial: bool) {
    let target_addr = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let mesh = two_nodes(tmp.path(), 7303, target_addr, over(StreamsOver::Tls)).await;
    let link = mesh
        .link(&a(), &b(), &["7303".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7303, 5 * SECOND).await.unwrap();
    let mut tcp = echo_stream(addr).await;
    assert_eq!(opened(&mesh.node(&b()).metrics, "inbound", "tls"), 1);
    if serial {
        let serial = mesh
            .state(&a())
            .unwrap()
            .identity()
            .unwrap()
            .info()
            .serial
            .clone();
        mesh.owner.revoke(&[], &[], &[serial]).await.unwrap();
        closed_within(&mut tcp, 5 * SECOND).await;
    } else {
        mesh.owner.revoke(&[link], &[], &[]).await.unwrap();
        closed_within(&mut tcp, 5 * SECOND).await;
    }
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_link_resets_tls_streams() {
    revocation_resets_tls_streams(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_dialling_certificate_resets_tls_streams() {
    revocation_resets_tls_streams(true).await;
}

/// A bare TLS stream client with `identity`, to `to` (a relay's QUIC address: TLS streams take
/// TCP on the same port).
async fn raw_tls(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    to: SocketAddr,
    server: &SpiffeId,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = tls::client_config(identity, bundle, &[ALPN]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(to).await?;
    let mut stream = connector
        .connect(ServerName::try_from(server.dns_name()).unwrap(), tcp)
        .await?;
    // In TLS 1.3 the client finishes first: a refused client certificate arrives as an alert
    // on the first read.
    stream.flush().await?;
    Ok(stream)
}

/// Sends `header` on a new TLS stream and reads the answer.
async fn try_ask(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    to: SocketAddr,
    server: &SpiffeId,
    header: &[u8],
) -> std::io::Result<Response> {
    let mut stream = raw_tls(identity, bundle, to, server).await?;
    stream.write_all(header).await?;
    stream.flush().await?;
    read_answer(&mut stream).await
}

async fn ask(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    to: SocketAddr,
    server: &SpiffeId,
    header: &[u8],
) -> Response {
    try_ask(identity, bundle, to, server, header).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_streams_refuse_strangers_unlinked_ports_and_bad_headers() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let target_addr = target.local_addr().unwrap();
    let mesh = two_nodes(tmp.path(), 7304, target_addr, over(StreamsOver::Tls)).await;
    mesh.link(&a(), &b(), &["7304".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    mesh.peer_addr(&a(), &b(), 7304, 5 * SECOND).await.unwrap();
    let a_state = mesh.state(&a()).unwrap();
    let (identity, bundle) = (a_state.identity().unwrap(), a_state.trust_bundle().unwrap());
    let to = mesh.node(&b()).relay_addr.unwrap();
    let server = SpiffeId::new("collab-x", "org-b", "n1").unwrap();

    let no_link = Request {
        port: 22,
        label: None,
    }
    .encode();
    match ask(&identity, &bundle, to, &server, &no_link).await {
        Response::Refused(Refusal::NoLink, reason) => assert_eq!(
            reason,
            "no link allows org-a/n1 to reach org-b/n1 on port 22"
        ),
        other => panic!("{other:?}"),
    }
    let garbage = b"GET / HTTP/1.1\r\n\r\n";
    assert!(matches!(
        ask(&identity, &bundle, to, &server, garbage).await,
        Response::Refused(Refusal::BadVersion, _)
    ));
    let oversized = [1u8, 0xff, 0xff];
    assert!(matches!(
        ask(&identity, &bundle, to, &server, &oversized).await,
        Response::Refused(Refusal::HeaderTooLarge, _)
    ));
    tokio::spawn(async move { target.accept().await });
    let link_port = Request {
        port: 7304,
        label: None,
    }
    .encode();
    assert_eq!(
        ask(&identity, &bundle, to, &server, &link_port).await,
        Response::Connected
    );

    // An identity from collab-y, whose CA org-b does not trust: the handshake fails.
    let stranger = stranger();
    let refused = match raw_tls(&stranger, &bundle, to, &server).await {
        Err(e) => e.to_string(),
        Ok(mut stream) => {
            let mut buf = [0u8; 1];
            match tokio::time::timeout(5 * SECOND, stream.read(&mut buf))
                .await
                .unwrap()
            {
                Err(e) => e.to_string(),
                Ok(n) => panic!("a stranger's TLS stream was served ({n} bytes read)"),
            }
        }
    };
    assert!(
        refused.to_lowercase().contains("certificate") || refused.contains("alert"),
        "{refused}"
    );
    let metrics = fedmesh_tests::metrics_until(&mesh.node(&b()).metrics, 5 * SECOND, |m| {
        m.contains("fedmesh_streams_refused_total{reason=\"handshake\"} 1")
    })
    .await;
    assert_refused_once(&metrics, &["no_link", "bad_version", "header_too_large"]);
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tcp_connections_are_bounded_by_the_source_caps() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayOptions {
        caps: Caps {
            handshakes_per_source: 2,
            ..Caps::default()
        },
        ..over(StreamsOver::Tls)
    };
    let target = fedmesh_tests::echo_server().await;
    let mesh = two_nodes(tmp.path(), 7305, target, relay).await;
    let to = mesh.node(&b()).relay_addr.unwrap();
    // Two connections that never start a handshake hold the source's two slots...
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(TcpStream::connect(to).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ...so a third from the same source is closed before its handshake, and counted.
    let mut third = TcpStream::connect(to).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(5 * SECOND, third.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a third stalled connection was held: {closed:?}"
    );
    let metrics = fedmesh_tests::metrics_until(&mesh.node(&b()).metrics, 5 * SECOND, |m| {
        m.contains("fedmesh_relay_connections_refused_total{reason=\"handshakes_per_source\"} 1")
    })
    .await;
    // The two stalled ones are still held (until the handshake timeout), not served.
    for tcp in &mut stalled {
        let held = tokio::time::timeout(std::time::Duration::from_millis(200), tcp.read(&mut buf));
        assert!(held.await.is_err(), "{metrics}");
    }
    // Once they go, a peer's TLS stream gets through again.
    drop(stalled);
    let a_state = mesh.state(&a()).unwrap();
    let (identity, bundle) = (a_state.identity().unwrap(), a_state.trust_bundle().unwrap());
    let server = SpiffeId::new("collab-x", "org-b", "n1").unwrap();
    let deadline = std::time::Instant::now() + 5 * SECOND;
    loop {
        let no_link = Request {
            port: 22,
            label: None,
        }
        .encode();
        match raw_tls(&identity, &bundle, to, &server).await {
            Ok(mut stream) => {
                stream.write_all(&no_link).await.unwrap();
                stream.flush().await.unwrap();
                assert!(matches!(
                    read_answer(&mut stream).await.unwrap(),
                    Response::Refused(Refusal::NoLink, _)
                ));
                break;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no handshake once the stalled connections went: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_link_holds_only_a_few_tls_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fedmesh_tests::echo_server().await;
    let mesh = two_nodes(tmp.path(), 7306, target, over(StreamsOver::Tls)).await;
    let to = mesh.node(&b()).relay_addr.unwrap();
    let a_state = mesh.state(&a()).unwrap();
    let (identity, bundle) = (a_state.identity().unwrap(), a_state.trust_bundle().unwrap());
    let server = SpiffeId::new("collab-x", "org-b", "n1").unwrap();
    let header = Request {
        port: 7306,
        label: None,
    }
    .encode();
    // Until org-b has the collaboration's members, it refuses every certificate.
    let deadline = std::time::Instant::now() + 10 * SECOND;
    while try_ask(&identity, &bundle, to, &server, &header)
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "org-b never took org-a's certificate"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // org-a has no link with org-b: it may hold 8 streams (to be told why not), as on QUIC.
    // Eight authenticated streams that send no header hold them...
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(raw_tls(&identity, &bundle, to, &server).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ...and a ninth is refused at once, whatever it asks.
    match ask(&identity, &bundle, to, &server, &header).await {
        Response::Refused(Refusal::StreamLimit, reason) => {
            assert_eq!(reason, "org-a/n1 already holds 8 TLS streams (at most 8)");
        }
        other => panic!("{other:?}"),
    }
    // The held ones are told why not once they ask.
    let stream = &mut held[0];
    stream.write_all(&header).await.unwrap();
    stream.flush().await.unwrap();
    assert!(matches!(
        read_answer(stream).await.unwrap(),
        Response::Refused(Refusal::NoLink, _)
    ));
    mesh.shutdown().await.unwrap();
}
