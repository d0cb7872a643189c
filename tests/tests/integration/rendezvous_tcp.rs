//! The rendezvous's TLS/TCP carrier on loopback: nodes on TCP (directly or through an HTTP
//! CONNECT proxy) and on QUIC link through one rendezvous byte-exact both ways; a node whose
//! UDP gets no answer falls back to TCP by itself; bad inputs to the TCP carrier (no client
//! certificate, a revoked node, garbage before and after the upgrade, an oversized head or
//! frame, a reader that never reads) are refused or bounded without disturbing other nodes.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use fedmesh_agent::{
    mesh::{LocalMesh, NodeSpec},
    node::Expose,
    relay::relayed::{
        proxy::{ProxySettings, ProxyUrl},
        tcp::{CarrierMode, CarrierOptions, TcpCarrier, open},
    },
    rendezvous::{
        Rendezvous, RendezvousMetrics, RendezvousOptions, ServerCert, frame,
        tcp::{StreamLink, TCP_ALPN},
        upgrade,
    },
};
use fedmesh_certs::NodeIdentity;
use fedmesh_documents::{NodeRef, RendezvousServer, fixtures::Fixture};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    relay::{SECOND, a, b, n},
    rendezvous::{
        Stop, assert_counted, carrier_client, carry_both_ways, connect_soon, counter, exchange,
        identity, list_rendezvous, load_revoking, load_revoking_c,
    },
    rendezvous_sealed::forward_udp,
};

fn c() -> NodeRef {
    n("org-c/n1")
}

/// A rendezvous on 127.0.0.1: QUIC on a free UDP port, TLS/TCP on the same port number.
async fn start_both(
    dir: &std::path::Path,
    options: RendezvousOptions,
) -> (Arc<Rendezvous>, Arc<RendezvousMetrics>, String, Stop) {
    let (socket, listener) = loop {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(listener) = TcpListener::bind(socket.local_addr().unwrap()).await {
            break (socket, listener);
        }
    };
    let cert = ServerCert::load_or_create(dir, &["localhost".to_owned()]).unwrap();
    let pin = cert.pin();
    let metrics = Arc::new(RendezvousMetrics::default());
    let server = Arc::new(Rendezvous::new(socket, cert, options, metrics.clone()).unwrap());
    let stop = Stop::new();
    let (s, c) = (server.clone(), stop.cancelled());
    tokio::spawn(async move { s.run(c).await.unwrap() });
    let (s, c) = (server.clone(), stop.cancelled());
    tokio::spawn(async move { s.run_tcp(listener, c).await.unwrap() });
    (server, metrics, pin, stop)
}

/// A small HTTP CONNECT proxy on loopback: tunnels to what it is asked for (or answers
/// `refuse`), counting the CONNECTs it served.
async fn connect_proxy(refuse: Option<&'static str>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let Ok((head, rest)) = upgrade::read_head(&mut client, 8192).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or_default()
                    .to_owned();
                if let Some(answer) = refuse {
                    let _ = client.write_all(answer.as_bytes()).await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = upstream.write_all(&rest).await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, served)
}

/// Outbound-only nodes with their carriers; the last one exposes `port` → `target`.
async fn outbound_only_mesh(
    dir: &std::path::Path,
    nodes: &[(NodeRef, CarrierOptions)],
    port: u16,
    target: SocketAddr,
) -> LocalMesh {
    fedmesh_tests::subscribe();
    let opts = fedmesh_agent::mesh::MeshOptions {
        outbound_only: nodes.iter().map(|(node, _)| node.clone()).collect(),
        carrier: nodes.iter().cloned().collect::<BTreeMap<_, _>>(),
        ..fedmesh_tests::mesh_options()
    };
    let specs: Vec<NodeSpec> = nodes
        .iter()
        .enumerate()
        .map(|(i, (node, _))| NodeSpec {
            node: node.clone(),
            organization_id: Some(i as u64 + 1),
            exposes: match i + 1 == nodes.len() {
                true => vec![Expose {
                    port,
                    label: None,
                    target: target.to_string(),
                }],
                false => vec![],
            },
        })
        .collect();
    LocalMesh::start(dir, &opts, &specs).await.unwrap()
}

fn carrier(mode: CarrierMode) -> CarrierOptions {
    CarrierOptions {
        mode,
        proxy: ProxySettings::none(),
        ..CarrierOptions::default()
    }
}

/// Lists the rendezvous at `address`, hands it the collaboration, links `from` → `to` on
/// `port`; returns the link ids.
async fn list_and_link(
    mesh: &mut LocalMesh,
    server: &Rendezvous,
    address: SocketAddr,
    pin: &str,
    links: &[(NodeRef, NodeRef)],
    port: u16,
) -> Vec<String> {
    list_rendezvous(mesh, &[server], address, pin).await;
    let mut ids = Vec::new();
    for (from, to) in links {
        ids.push(
            mesh.link(
                from,
                to,
                &[port.to_string().parse().unwrap()],
                3600 * SECOND,
                None,
            )
            .await
            .unwrap(),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_either_carrier_link_through_the_rendezvous() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, metrics, pin, stop) =
        start_both(&tmp.path().join("rv"), RendezvousOptions::default()).await;
    let (proxy, connects) = connect_proxy(None).await;
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    // a: TLS/TCP through the proxy; c: QUIC/UDP; b (the target's node): TLS/TCP directly.
    let through_proxy = CarrierOptions {
        mode: CarrierMode::Tcp,
        proxy: ProxySettings::through(ProxyUrl::parse(&proxy.to_string(), "test").unwrap()),
        ..CarrierOptions::default()
    };
    let mut mesh = outbound_only_mesh(
        tmp.path(),
        &[
            (a(), through_proxy),
            (c(), carrier(CarrierMode::Udp)),
            (b(), carrier(CarrierMode::Tcp)),
        ],
        7201,
        target.local_addr().unwrap(),
    )
    .await;
    let ids = list_and_link(
        &mut mesh,
        &server,
        server.local_addr().unwrap(),
        &pin,
        &[(a(), b()), (c(), b())],
        7201,
    )
    .await;

    // TCP (through a proxy) ⇄ TCP, byte-exact both ways.
    let ab = mesh.peer_addr(&a(), &b(), 7201, 10 * SECOND).await.unwrap();
    assert_eq!(ab.port(), 7201);
    carry_both_ways(ab, target.clone(), 8 * 1024 * 1024).await;
    // UDP ⇄ TCP: a node on either carrier reaches a node on the other.
    let cb = mesh.peer_addr(&c(), &b(), 7201, 10 * SECOND).await.unwrap();
    carry_both_ways(cb, target.clone(), 4 * 1024 * 1024).await;
    let text = metrics.render();
    assert_eq!(
        counter(&text, "fedmesh_rendezvous_nodes{collab=\"collab-x\"} "),
        3,
        "{text}"
    );
    assert_eq!(
        counter(&text, "fedmesh_rendezvous_tcp_nodes{collab=\"collab-x\"} "),
        2,
        "a and b on TCP, c on UDP: {text}"
    );
    assert!(
        counter(
            &text,
            "fedmesh_rendezvous_bytes_total{collab=\"collab-x\",direction=\"out\"} "
        ) > 24 * 1024 * 1024,
        "{text}"
    );
    assert!(
        connects.load(Ordering::Relaxed) >= 1,
        "a went through the proxy"
    );

    // Revoking a → b closes its open connection within 5 s; c → b still carries.
    let mut tcp = connect_soon(ab).await;
    tcp.write_all(b"ping").await.unwrap();
    // The stream reached the target before the revocation (else the accept below could wait
    // for a connection the revocation stopped).
    let (mut held, _) = tokio::time::timeout(10 * SECOND, target.accept())
        .await
        .expect("a → b reached the target within 10 s")
        .unwrap();
    let mut ping = [0u8; 4];
    held.read_exact(&mut ping).await.unwrap();
    assert_eq!(&ping, b"ping");
    let revoked = Instant::now();
    mesh.owner
        .revoke(&[ids[0].clone()], &[], &[])
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    match tokio::time::timeout(5 * SECOND, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("stream still open after revocation: {other:?}"),
    }
    assert!(revoked.elapsed() < 5 * SECOND, "{:?}", revoked.elapsed());
    // The accepted side of the revoked connection goes, then c → b again.
    drop(held);
    carry_both_ways(cb, target.clone(), 64 * 1024).await;
    mesh.shutdown().await.unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_gets_no_answer_and_returns_when_it_does() {
    let tmp = tempfile::tempdir().unwrap();
    // The listed port: UDP to it is never answered (a socket nobody reads), TCP to it is the
    // rendezvous's TLS/TCP carrier (its QUIC listens elsewhere).
    let (silent, listener) = loop {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(listener) = TcpListener::bind(socket.local_addr().unwrap()).await {
            break (socket, listener);
        }
    };
    let listed = silent.local_addr().unwrap();
    let cert = ServerCert::load_or_create(&tmp.path().join("rv"), &[]).unwrap();
    let pin = cert.pin();
    let metrics = Arc::new(RendezvousMetrics::default());
    let server = Arc::new(
        Rendezvous::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            cert,
            RendezvousOptions::default(),
            metrics.clone(),
        )
        .unwrap(),
    );
    let stop = Stop::new();
    let (s, st) = (server.clone(), stop.cancelled());
    tokio::spawn(async move { s.run(st).await.unwrap() });
    let (s, st) = (server.clone(), stop.cancelled());
    tokio::spawn(async move { s.run_tcp(listener, st).await.unwrap() });

    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let auto = CarrierOptions {
        quic_retry: Duration::from_millis(500),
        ..CarrierOptions::default()
    };
    let mut mesh = outbound_only_mesh(
        tmp.path(),
        &[(a(), auto.clone()), (b(), auto)],
        7202,
        target.local_addr().unwrap(),
    )
    .await;
    let started = Instant::now();
    list_and_link(&mut mesh, &server, listed, &pin, &[(a(), b())], 7202).await;
    let addr = mesh.peer_addr(&a(), &b(), 7202, 10 * SECOND).await.unwrap();
    carry_both_ways(addr, target.clone(), 1024 * 1024).await;
    eprintln!(
        "carried over the TCP fallback {:?} after listing",
        started.elapsed()
    );
    assert!(started.elapsed() < 10 * SECOND, "{:?}", started.elapsed());
    let gauge = |name: &str| {
        counter(
            &metrics.render(),
            &format!("{name}{{collab=\"collab-x\"}} "),
        )
    };
    assert_eq!(gauge("fedmesh_rendezvous_tcp_nodes"), 2);

    // UDP to the listed port answers from now on: both nodes move to QUIC by themselves (they
    // retry every 500 ms here, 30 s by default) and their packets take the sealed path.
    forward_udp(silent, server.local_addr().unwrap(), None);
    let opened = Instant::now();
    while gauge("fedmesh_rendezvous_tcp_nodes") > 0 || gauge("fedmesh_rendezvous_nodes") < 2 {
        assert!(
            opened.elapsed() < 10 * SECOND,
            "still on TLS/TCP: {}",
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("back on QUIC/UDP {:?} after UDP answered", opened.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = || {
        let text = metrics.render();
        let of = |family: &str| {
            counter(
                &text,
                &format!("{family}_total{{collab=\"collab-x\",direction=\"out\"}} "),
            )
        };
        (
            of("fedmesh_rendezvous_sealed_datagrams"),
            of("fedmesh_rendezvous_datagrams"),
        )
    };
    let (sealed_before, all_before) = out();
    carry_both_ways(addr, target, 1024 * 1024).await;
    let (sealed, all) = out();
    let (sealed, all) = (sealed - sealed_before, all - all_before);
    assert!(
        sealed > 0 && sealed * 10 >= all * 9,
        "{sealed} of {all} datagrams sealed: {}",
        metrics.render()
    );
    mesh.shutdown().await.unwrap();
    stop.cancel();
}

/// A node on the TCP carrier (the node's own code): its link and the frames it receives.
async fn tcp_node(
    server: SocketAddr,
    pin: &str,
    identity: &NodeIdentity,
    proxy: &ProxySettings,
) -> Result<(Arc<StreamLink>, mpsc::UnboundedReceiver<Bytes>), String> {
    let listed = RendezvousServer {
        address: server.to_string(),
        pin_sha256: pin.to_owned(),
    };
    let TcpCarrier {
        link,
        stream,
        leftover,
    } = open(&listed, identity, proxy)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let runner = link.clone();
    tokio::spawn(async move {
        runner
            .run(stream, leftover, |f| {
                let _ = tx.send(f);
            })
            .await
    });
    Ok((link, rx))
}

async fn expect_frame(rx: &mut mpsc::UnboundedReceiver<Bytes>, sender: &str, payload: &[u8]) {
    let deadline = Instant::now() + 2 * SECOND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = tokio::time::timeout(left, rx.recv())
            .await
            .expect("frame within 2 s")
            .expect("link open");
        let (from, body) = frame::decode(&got, 65_535).unwrap();
        if (from.to_string().as_str(), &body[..]) == (sender, payload) {
            return;
        }
    }
}

/// A TLS session to the TCP carrier presenting `identity` (or none), before any HTTP.
async fn raw_tls(
    server: SocketAddr,
    pin: &str,
    identity: Option<&NodeIdentity>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = match identity {
        Some(id) => fedmesh_agent::hub::tls::pinned_client_config(pin, id, TCP_ALPN).unwrap(),
        None => fedmesh_agent::hub::tls::client_config(pin, None, None).unwrap(),
    };
    config.alpn_protocols = vec![TCP_ALPN.to_vec()];
    let tcp = TcpStream::connect(server).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("rendezvous.fedmesh".try_into().unwrap(), tcp)
        .await
}

/// Everything the other end sends until it closes (at most 2 s, 64 KiB).
async fn answer(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(2 * SECOND, async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || out.len() > 65_536 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_to_the_tcp_carrier_are_refused_without_disturbing_others() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let options = RendezvousOptions {
        rate: 1 << 30,
        burst: 64 << 20,
        ..RendezvousOptions::default()
    };
    let (server, metrics, pin, stop) = start_both(tmp.path(), options).await;
    let addr = server.local_addr().unwrap();
    let mut fx = Fixture::at(
        "c",
        &["a/n1", "b/n1", "c/n1", "e/n1", "f/n1"],
        std::time::SystemTime::now(),
    );
    fx.collab.version = 2;
    load_revoking_c(&server, &fx);

    // a on TCP, b on QUIC: frames both ways.
    let none = ProxySettings::none();
    let (node_a, mut a_rx) = tcp_node(addr, &pin, &identity(&fx, "a/n1"), &none)
        .await
        .unwrap();
    let node_b = carrier_client(addr, &pin, Some(&identity(&fx, "b/n1")), 1400)
        .await
        .unwrap();
    let a_to_b = |payload: &[u8]| node_a.send(frame::encode(&n("b/n1"), payload)).unwrap();
    let b_reads = |node_b: quinn::Connection, payload: Vec<u8>| async move {
        let got = tokio::time::timeout(2 * SECOND, node_b.read_datagram())
            .await
            .expect("datagram within 2 s")
            .unwrap();
        let (from, body) = frame::decode(&got, 65_535).unwrap();
        assert_eq!((from, &body[..]), (n("a/n1"), &payload[..]));
    };
    a_to_b(b"tcp to quic");
    b_reads(node_b.clone(), b"tcp to quic".to_vec()).await;
    node_b
        .send_datagram(frame::encode(&n("a/n1"), b"quic to tcp"))
        .unwrap();
    expect_frame(&mut a_rx, "b/n1", b"quic to tcp").await;

    // 1. No client certificate: the TLS handshake or the upgrade fails.
    if let Ok(mut tls) = raw_tls(addr, &pin, None).await {
        let _ = tls
            .write_all(upgrade::upgrade_request("x").as_bytes())
            .await;
        let got = answer(&mut tls).await;
        assert!(!got.contains(" 101 "), "{got}");
    }
    // 2. A revoked node, 3. another collaboration's certificate: refused, with the reason.
    let revoked = tcp_node(addr, &pin, &identity(&fx, "c/n1"), &none).await;
    assert!(revoked.is_err());
    let other = Fixture::at("other", &["a/n1"], std::time::SystemTime::now());
    let err = tcp_node(addr, &pin, &identity(&other, "a/n1"), &none)
        .await
        .unwrap_err();
    eprintln!("another collaboration: {err}");
    // 4. Plain HTTP (no TLS) on the carrier port: closed.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /fedmesh/rendezvous HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert!(!answer(&mut plain).await.contains("101"));
    // 5. Garbage instead of the upgrade request, 6. the wrong upgrade: 400.
    let e = identity(&fx, "e/n1");
    let mut tls = raw_tls(addr, &pin, Some(&e)).await.unwrap();
    tls.write_all(b"\x00\x01\x02 garbage\r\n\r\n")
        .await
        .unwrap();
    assert!(answer(&mut tls).await.starts_with("HTTP/1.1 400"));
    let mut tls = raw_tls(addr, &pin, Some(&e)).await.unwrap();
    tls.write_all(
        upgrade::upgrade_request("x")
            .replace("fedmesh-rendezvous/1", "websocket")
            .as_bytes(),
    )
    .await
    .unwrap();
    let got = answer(&mut tls).await;
    assert!(
        got.starts_with("HTTP/1.1 400") && got.contains("Upgrade"),
        "{got}"
    );
    // 7. An oversized head: 431, closed.
    let mut tls = raw_tls(addr, &pin, Some(&e)).await.unwrap();
    let mut long = b"GET /fedmesh/rendezvous HTTP/1.1\r\n".to_vec();
    for _ in 0..200 {
        long.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let _ = tls.write_all(&long).await;
    let got = answer(&mut tls).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    // 8. Garbage after the upgrade (bad names, keep-alives, a frame for an unknown peer, one
    // to itself) and 9. an oversized frame: dropped; a's next good frame reaches b.
    let mut tls = raw_tls(addr, &pin, Some(&e)).await.unwrap();
    let mut opening = upgrade::upgrade_request("x").into_bytes();
    let mut framed = |f: &[u8]| {
        opening.extend_from_slice(&(f.len() as u16).to_be_bytes());
        opening.extend_from_slice(f);
    };
    framed(b"\xff\xffgarbage");
    framed(b"");
    framed(&frame::encode(&n("z/n9"), b"who?"));
    framed(&frame::encode(&n("e/n1"), b"me"));
    framed(&frame::encode(&n("b/n1"), &vec![7u8; 3000]));
    tls.write_all(&opening).await.unwrap();
    let (head, _) = upgrade::read_head(&mut tls, 8192).await.unwrap();
    assert_eq!(upgrade::parse_response(&head).unwrap().code, 101);
    node_a
        .send(frame::encode(&n("b/n1"), &vec![7u8; 3000]))
        .unwrap();
    a_to_b(b"after the garbage");
    b_reads(node_b.clone(), b"after the garbage".to_vec()).await;
    let text = metrics.render();
    assert_counted(
        &text,
        "fedmesh_rendezvous_dropped_total",
        &["oversized", "unknown_peer", "bad_node", "to_self"],
    );
    assert_counted(
        &text,
        "fedmesh_rendezvous_refused_total",
        &["head_malformed", "not_upgrade", "head_too_large"],
    );

    // 10. A reader that never reads (e, upgraded above, reads nothing): b floods it; the
    // rendezvous queues a bounded amount and drops the rest; a and b still talk; memory flat.
    let rss_before = rss_kib();
    let out_key = "fedmesh_rendezvous_bytes_total{collab=\"c\",direction=\"out\"} ";
    let out_before = counter(&metrics.render(), out_key);
    let flood = {
        let node_b = node_b.clone();
        tokio::spawn(async move {
            let payload = vec![9u8; 1200];
            let mut sent = 0usize;
            while sent < 48 << 20 {
                for _ in 0..32 {
                    if node_b
                        .send_datagram_wait(frame::encode(&n("e/n1"), &payload))
                        .await
                        .is_ok()
                    {
                        sent += payload.len();
                    }
                }
                tokio::task::yield_now().await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_to_b(b"during the flood");
    b_reads(node_b.clone(), b"during the flood".to_vec()).await;
    let flooded = flood.await.unwrap();
    let text = metrics.render();
    let queued = counter(&text, out_key) - out_before;
    assert!(
        counter(
            &text,
            "fedmesh_rendezvous_dropped_total{collab=\"c\",reason=\"queue_full\"} "
        ) > 0,
        "{text}"
    );
    assert!(
        queued < 24 << 20,
        "{queued} of {flooded} bytes passed towards a reader that never reads"
    );
    let grew = rss_kib().saturating_sub(rss_before);
    eprintln!(
        "flooded {flooded} bytes at a reader that never reads: {queued} passed, RSS +{grew} KiB"
    );
    // Only meaningful with one test per process (nextest); other tests share it otherwise.
    if std::env::var_os("NEXTEST").is_some() {
        assert!(grew < 32 * 1024, "RSS grew {grew} KiB");
    }
    a_to_b(b"after the flood");
    b_reads(node_b.clone(), b"after the flood".to_vec()).await;
    drop(tls);

    // 11. Revoking a node on TCP closes its link at once; b stays.
    load_revoking(&server, &fx, 2, &["c/n1", "a/n1"]);
    let closed = tokio::time::timeout(SECOND, async { while a_rx.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "a's TCP link still open after revocation");
    assert!(node_a.is_closed());
    let node_f = carrier_client(addr, &pin, Some(&identity(&fx, "f/n1")), 1400)
        .await
        .unwrap();
    exchange(&node_b, &node_f, "f/n1", "b/n1").await;

    // 12. A proxy that refuses CONNECT: the error names the proxy and its answer.
    let (refusing, _) = connect_proxy(Some("HTTP/1.1 403 Forbidden by policy\r\n\r\n")).await;
    let through = ProxySettings::through(ProxyUrl::parse(&refusing.to_string(), "test").unwrap());
    let err = tcp_node(addr, &pin, &identity(&fx, "b/n1"), &through)
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!("the proxy http://{refusing} refused CONNECT"))
            && err.contains("403 Forbidden by policy"),
        "{err}"
    );
    stop.cancel();
}
