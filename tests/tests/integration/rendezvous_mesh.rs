//! Rendezvous replicas behind one address: a load balancer (a user-space UDP double that pins
//! each client to a replica, round robin, and moves it when its replica is taken out) sends
//! org-a and org-b to different replicas, which forward to each other; a party without the
//! replicas' certificate cannot join the mesh or inject frames; `fedmesh rendezvous --hub`
//! processes follow the hub, so a revocation published there disconnects the node within
//! seconds; when a replica stops or is killed, nodes move to another and their link carries
//! again.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fedmesh_agent::rendezvous::{
    Rendezvous, RendezvousMetrics, RendezvousOptions, ServerCert, frame,
    mesh::{self, MESH_ALPN, MeshOptions},
};
use fedmesh_documents::{RendezvousServer, fixtures::Fixture};
use fedmesh_tests::KillOnDrop;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::{
    relay::{SECOND, a, b, n},
    rendezvous::{
        Stop, banner_address, carrier_client, carry_both_ways, connect_soon, counter, exchange,
        gauge_reaches, http_get, identity, list_rendezvous, load_revoking_c, outbound_only_pair,
    },
};

/// A UDP load balancer double: each client address is pinned to one live backend (round robin
/// over new clients); a client whose backend was taken out moves to a live one (what the old
/// backend still sends it, such as its goodbye, is still passed back).
struct LoadBalancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<(SocketAddr, bool)>>>,
    task: tokio::task::JoinHandle<()>,
    readers: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        self.task.abort();
        for reader in self.readers.lock().unwrap().drain(..) {
            reader.abort();
        }
    }
}

impl LoadBalancer {
    async fn start() -> Self {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let backends: Arc<Mutex<Vec<(SocketAddr, bool)>>> = Arc::default();
        let table = backends.clone();
        let readers: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let all_readers = readers.clone();
        let task = tokio::spawn(async move {
            // client → (backend, upstream socket, its reader task)
            type Flow = (
                SocketAddr,
                Arc<tokio::net::UdpSocket>,
                tokio::task::JoinHandle<()>,
            );
            let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
            let mut next = 0usize;
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((len, client)) = front.recv_from(&mut buf).await else {
                    return;
                };
                let live: Vec<SocketAddr> = table
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, alive)| *alive)
                    .map(|(a, _)| *a)
                    .collect();
                let stale = flows
                    .get(&client)
                    .is_some_and(|(backend, _, _)| !live.contains(backend));
                if stale {
                    flows.remove(&client);
                }
                if let std::collections::hash_map::Entry::Vacant(flow) = flows.entry(client) {
                    if live.is_empty() {
                        continue;
                    }
                    let backend = live[next % live.len()];
                    next += 1;
                    let up = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    up.connect(backend).await.unwrap();
                    let (up2, front2) = (up.clone(), front.clone());
                    let reader = tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_535];
                        while let Ok(len) = up2.recv(&mut buf).await {
                            let _ = front2.send_to(&buf[..len], client).await;
                        }
                    });
                    all_readers.lock().unwrap().push(reader.abort_handle());
                    flow.insert((backend, up, reader));
                }
                let _ = flows[&client].1.send(&buf[..len]).await;
            }
        });
        Self {
            addr,
            backends,
            task,
            readers,
        }
    }

    fn add(&self, backend: SocketAddr) {
        self.backends.lock().unwrap().push((backend, true));
    }

    /// Takes `backend` out (as a health check would when its replica dies).
    fn take_out(&self, backend: SocketAddr) {
        for (addr, alive) in self.backends.lock().unwrap().iter_mut() {
            if *addr == backend {
                *alive = false;
            }
        }
    }
}

/// A replica on 127.0.0.1:0 with the certificate in `dir` (shared by all replicas), meshed on
/// 0.0.0.0:0 (so that dialling 127.0.0.1 reaches it under another address: it must recognise
/// itself from the presence stream).
struct Replica {
    server: Arc<Rendezvous>,
    metrics: Arc<RendezvousMetrics>,
    mesh: Arc<mesh::Mesh>,
    stop: Stop,
}

impl Replica {
    fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, MeshOptions::default())
    }

    fn start_with(dir: &std::path::Path, options: MeshOptions) -> Self {
        let cert = ServerCert::load_or_create(dir, &["localhost".to_owned()]).unwrap();
        let metrics = Arc::new(RendezvousMetrics::default());
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = Arc::new(
            Rendezvous::new(socket, cert, RendezvousOptions::default(), metrics.clone()).unwrap(),
        );
        let mesh = server
            .start_mesh(UdpSocket::bind("0.0.0.0:0").unwrap(), options)
            .unwrap();
        let stop = Stop::new();
        let (s, c) = (server.clone(), stop.cancelled());
        tokio::spawn(async move { s.run(c).await.unwrap() });
        Self {
            server,
            metrics,
            mesh,
            stop,
        }
    }

    /// Where peers dial it.
    fn mesh_addr(&self) -> String {
        format!("127.0.0.1:{}", self.mesh.local_addr().unwrap().port())
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr().unwrap()
    }

    fn nodes(&self) -> u64 {
        counter(
            &self.metrics.render(),
            "fedmesh_rendezvous_nodes{collab=\"collab-x\"} ",
        )
    }
}

/// Waits until `check` holds, within `within`.
async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_different_replicas_meet_through_the_mesh_and_fail_over() {
    let tmp = tempfile::tempdir().unwrap();
    let rv_dir = tmp.path().join("rv");
    let (r1, r2) = (Replica::start(&rv_dir), Replica::start(&rv_dir));
    // Both name every replica, themselves included (as a headless Service name resolves).
    let peers = vec![r1.mesh_addr(), r2.mesh_addr()];
    r1.mesh.set_peers(peers.clone());
    r2.mesh.set_peers(peers);
    let lb = LoadBalancer::start().await;
    lb.add(r1.addr());
    lb.add(r2.addr());
    let pin = ServerCert::load_or_create(&rv_dir, &[]).unwrap().pin();

    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let mut mesh = outbound_only_pair(tmp.path(), 7111, target.local_addr().unwrap()).await;
    list_rendezvous(&mut mesh, &[&r1.server, &r2.server], lb.addr, &pin).await;
    mesh.link(&a(), &b(), &["7111".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7111, 10 * SECOND).await.unwrap();
    until("one node on each replica", 10 * SECOND, || {
        r1.nodes() == 1 && r2.nodes() == 1
    })
    .await;
    let started = Instant::now();
    carry_both_ways(addr, target.clone(), 4 * 1024 * 1024).await;
    eprintln!(
        "4 MiB each way across two replicas in {:?}",
        started.elapsed()
    );
    for (name, replica) in [("replica 1", &r1), ("replica 2", &r2)] {
        let text = replica.metrics.render();
        for direction in ["to_replica", "from_replica"] {
            let key = format!(
                "fedmesh_rendezvous_mesh_bytes_total{{collab=\"collab-x\",direction=\"{direction}\"}} "
            );
            assert!(
                counter(&text, &key) > 4 * 1024 * 1024,
                "{name} passed no {direction} traffic: {text}"
            );
        }
        assert!(text.contains("fedmesh_rendezvous_mesh_peers 1"), "{text}");
        assert!(
            text.contains("fedmesh_rendezvous_mesh_remote_nodes 1"),
            "{text}"
        );
    }

    // Replica 1 dies; the load balancer takes it out; its node reconnects (to replica 2).
    let lost = Instant::now();
    lb.take_out(r1.addr());
    r1.stop.cancel();
    carry_both_ways(addr, target, 256 * 1024).await;
    let elapsed = lost.elapsed();
    eprintln!("carried again {elapsed:?} after a replica died");
    assert!(elapsed < 5 * SECOND, "carried again after {elapsed:?}");
    assert_eq!(r2.nodes(), 2);
    mesh.shutdown().await.unwrap();
    r2.stop.cancel();
}

/// A raw mesh client presenting `cert` (a replica's, or another), for crafted frames.
async fn mesh_client(
    server: SocketAddr,
    pin: &str,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<quinn::Connection, String> {
    let tls = fedmesh_agent::hub::tls::pinned_client_config_presenting(pin, chain, key, MESH_ALPN)
        .unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(config, server, "rendezvous.fedmesh")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // The server's verdict on our certificate may arrive after the handshake completes here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    match conn.close_reason() {
        Some(reason) => Err(reason.to_string()),
        None => Ok(conn),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_without_the_replicas_certificate_cannot_join_the_mesh_or_inject() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let rv_dir = tmp.path().join("rv");
    // Tight bounds, to see them hold: 64 KiB/s (16 KiB at once) from a peer, one node learned
    // from it.
    let replica = Replica::start_with(
        &rv_dir,
        MeshOptions {
            rate: 64 * 1024,
            burst: 16 * 1024,
            max_nodes: 1,
            ..MeshOptions::default()
        },
    );
    let mesh_addr: SocketAddr = replica.mesh_addr().parse().unwrap();
    let cert = ServerCert::load_or_create(&rv_dir, &[]).unwrap();
    let pin = cert.pin();
    let fx = Fixture::at("c", &["a/n1", "b/n1", "c/n1"], std::time::SystemTime::now());
    load_revoking_c(&replica.server, &fx);
    let node_a = carrier_client(replica.addr(), &pin, Some(&identity(&fx, "a/n1")), 1400)
        .await
        .unwrap();
    let node_b = carrier_client(replica.addr(), &pin, Some(&identity(&fx, "b/n1")), 1400)
        .await
        .unwrap();

    // 1. A node's certificate (a member of the collaboration) is not a replica's.
    let member = identity(&fx, "a/n1");
    let refused = mesh_client(mesh_addr, &pin, member.chain().to_vec(), member.key_der()).await;
    assert!(refused.is_err(), "a node joined the mesh");
    // 2. Another rendezvous's certificate (self-signed the same way, another key).
    let other = ServerCert::load_or_create(&tmp.path().join("other"), &[]).unwrap();
    let refused = mesh_client(
        mesh_addr,
        &pin,
        vec![other.certificate()],
        other.private_key().unwrap(),
    )
    .await;
    assert!(refused.is_err(), "another rendezvous joined the mesh");
    // 3. A node cannot reach the mesh port with the node ALPN either (the carrier's TLS).
    assert!(
        carrier_client(mesh_addr, &pin, Some(&identity(&fx, "a/n1")), 1400)
            .await
            .is_err()
    );
    // (The server counts a refusal as the client learns of it.)
    until("three refused mesh handshakes counted", 2 * SECOND, || {
        counter(
            &replica.metrics.render(),
            "fedmesh_rendezvous_mesh_dropped_total{collab=\"c\",reason=\"peer_handshake\"} ",
        ) >= 3
    })
    .await;

    // A replica (the shared certificate) may hand over frames, but only for nodes connected
    // here, and only from senders that stand: 4. a revoked sender, 5. a non-member sender,
    // 6. a receiver not connected here (never forwarded further), 7. garbage, 8. sender ==
    // receiver; then a good frame arrives, from the named sender, byte for byte.
    let peer = mesh_client(
        mesh_addr,
        &pin,
        vec![cert.certificate()],
        cert.private_key().unwrap(),
    )
    .await
    .unwrap();
    // It speaks the presence protocol: HELLO with its replica id, no nodes.
    let mut announce = peer.open_uni().await.unwrap();
    let mut hello = vec![1u8];
    hello.extend_from_slice(&[0x42; 16]);
    announce.write_all(&hello).await.unwrap();
    peer.send_datagram(mesh::encode(&n("b/n1"), &n("c/n1"), b"revoked"))
        .unwrap();
    peer.send_datagram(mesh::encode(&n("b/n1"), &n("z/n9"), b"stranger"))
        .unwrap();
    peer.send_datagram(mesh::encode(&n("c/n1"), &n("a/n1"), b"elsewhere"))
        .unwrap();
    peer.send_datagram(frame::encode(&n("b/n1"), b"\x20ab"))
        .unwrap();
    peer.send_datagram(mesh::encode(&n("b/n1"), &n("b/n1"), b"me"))
        .unwrap();
    peer.send_datagram(mesh::encode(&n("b/n1"), &n("a/n1"), b"via the mesh"))
        .unwrap();
    let got = tokio::time::timeout(2 * SECOND, node_b.read_datagram())
        .await
        .expect("the good frame within 2 s")
        .unwrap();
    let (from, body) = frame::decode(&got, 65_535).unwrap();
    assert_eq!((from, &body[..]), (n("a/n1"), &b"via the mesh"[..]));
    let text = replica.metrics.render();
    for reason in ["sender_refused", "unknown_peer", "truncated", "to_self"] {
        let key =
            format!("fedmesh_rendezvous_mesh_dropped_total{{collab=\"c\",reason=\"{reason}\"}} ");
        assert!(counter(&text, &key) >= 1, "no {reason} drop: {text}");
    }
    assert_eq!(
        counter(
            &text,
            "fedmesh_rendezvous_mesh_dropped_total{collab=\"c\",reason=\"sender_refused\"} "
        ),
        2
    );
    // The replica announced its nodes to the peer: a and b, on the presence stream.
    let mut presence = tokio::time::timeout(2 * SECOND, peer.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let mut hello = [0u8; 17];
    presence.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello[0], 1, "HELLO first");
    let mut rest = vec![0u8; 2 * (2 + "a/n1".len())];
    presence.read_exact(&mut rest).await.unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("a/n1") && text.contains("b/n1"), "{text:?}");
    // The nodes still talk to each other.
    exchange(&node_a, &node_b, "b/n1", "a/n1").await;

    // 9. A peer beyond its rate: the excess is dropped. 10. More nodes announced than the
    // bound: the excess is not learned. 11. A malformed presence stream closes the connection.
    for _ in 0..200 {
        let _ = peer.send_datagram(mesh::encode(&n("b/n1"), &n("a/n1"), &[7u8; 1000]));
    }
    let mut presence = Vec::new();
    for node in ["x/n1", "y/n1"] {
        presence.extend_from_slice(&[2, node.len() as u8]);
        presence.extend_from_slice(node.as_bytes());
    }
    announce.write_all(&presence).await.unwrap();
    let dropped = |reason: &str| {
        counter(
            &replica.metrics.render(),
            &format!("fedmesh_rendezvous_mesh_dropped_total{{collab=\"c\",reason=\"{reason}\"}} "),
        )
    };
    until("the rate and node bounds hold", 2 * SECOND, || {
        dropped("mesh_rate") >= 100 && dropped("peer_nodes_full") == 1
    })
    .await;
    assert!(
        replica
            .metrics
            .render()
            .contains("fedmesh_rendezvous_mesh_remote_nodes 1")
    );
    announce.write_all(&[9, 9, 9]).await.unwrap();
    let reason = tokio::time::timeout(2 * SECOND, peer.closed())
        .await
        .unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, mesh::close::PROTOCOL, "{close:?}");
        }
        other => panic!("not closed as a protocol error: {other}"),
    }
    replica.stop.cancel();
}

/// Starts `fedmesh rendezvous` with `args` and a mesh listener; returns the child and its
/// `udp/`, `http://` and `mesh/` addresses.
async fn rendezvous_process(
    dir: &std::path::Path,
    args: &[String],
) -> (KillOnDrop, SocketAddr, SocketAddr, SocketAddr) {
    let mut all = vec!["--mesh-listen".to_owned(), "127.0.0.1:0".to_owned()];
    all.extend_from_slice(args);
    let (child, line) = super::rendezvous::rendezvous_process(dir, &all).await;
    let at = |prefix| banner_address(&line, prefix);
    (child, at("udp/"), at("http://"), at("mesh/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_processes_follow_the_hub_fail_over_when_one_is_killed_and_apply_revocations_in_seconds()
 {
    let tmp = tempfile::tempdir().unwrap();
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let mut mesh = outbound_only_pair(tmp.path(), 7112, target.local_addr().unwrap()).await;
    // One certificate for both replicas (one Secret): made by the first, copied to the second.
    let (d1, d2) = (tmp.path().join("rv1"), tmp.path().join("rv2"));
    let pin = fedmesh_tests::fedmesh_ok(
        tmp.path(),
        &["rendezvous", "--dir", d1.to_str().unwrap(), "--print-pin"],
    )
    .trim()
    .to_owned();
    std::fs::create_dir_all(&d2).unwrap();
    for file in ["rendezvous-cert.pem", "rendezvous-key.pem"] {
        std::fs::copy(d1.join(file), d2.join(file)).unwrap();
    }
    let lb = LoadBalancer::start().await;
    // The owner lists the rendezvous (the load balancer's address, the replicas' pin): from
    // now on the hub lets the replicas read the collaboration's documents.
    mesh.owner
        .set_rendezvous(vec![RendezvousServer {
            address: lb.addr.to_string(),
            pin_sha256: pin,
        }])
        .await
        .unwrap();
    // The hub lets the listed certificate read the documents, and no other self-signed one.
    let reader = |dir: &std::path::Path| {
        let cert = ServerCert::load_or_create(dir, &[]).unwrap();
        let tls = fedmesh_agent::hub::tls::pinned_client_config_presenting(
            &mesh.hub.pin,
            vec![cert.certificate()],
            cert.private_key().unwrap(),
            b"http/1.1",
        )
        .unwrap();
        fedmesh_agent::hub::client::HubClient::with_tls(&mesh.hub.url, tls).unwrap()
    };
    let page = reader(&d1)
        .docs("collab-x", 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(!page.collab_jws.is_empty());
    let refused = reader(&tmp.path().join("unlisted"))
        .docs("collab-x", 0, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(401), "{refused}");
    let follow = |extra: &[String]| {
        let mut args = vec![
            "--hub".to_owned(),
            mesh.hub.url.clone(),
            "--hub-pin".to_owned(),
            mesh.hub.pin.clone(),
            "--collab".to_owned(),
            "collab-x".to_owned(),
            "--owner-pin".to_owned(),
            mesh.owner.pin(),
        ];
        args.extend_from_slice(extra);
        args
    };
    let (mut p1, udp1, http1, mesh1) = rendezvous_process(&d1, &follow(&[])).await;
    let (_p2, udp2, http2, _) =
        rendezvous_process(&d2, &follow(&["--peer".to_owned(), mesh1.to_string()])).await;
    lb.add(udp1);
    lb.add(udp2);
    for http in [http1, http2] {
        let deadline = Instant::now() + 10 * SECOND;
        while !http_get(http, "/readyz").await.starts_with("HTTP/1.1 200") {
            assert!(
                Instant::now() < deadline,
                "not ready from the hub's documents"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    mesh.link(&a(), &b(), &["7112".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7112, 10 * SECOND).await.unwrap();
    carry_both_ways(addr, target.clone(), 1024 * 1024).await;
    let nodes = "fedmesh_rendezvous_nodes{collab=\"collab-x\"} ";
    let (t1, t2) = (
        http_get(http1, "/metrics").await,
        http_get(http2, "/metrics").await,
    );
    assert_eq!(
        (counter(&t1, nodes), counter(&t2, nodes)),
        (1, 1),
        "{t1}\n{t2}"
    );
    // Through the load balancer each node's carrier connection and sealed datagrams are one
    // flow (both from the relay's socket), so they reach the same replica: both replicas took
    // sealed datagrams in and handed them out sealed.
    for direction in ["in", "out"] {
        let sealed = format!(
            "fedmesh_rendezvous_sealed_datagrams_total{{collab=\"collab-x\",direction=\"{direction}\"}} "
        );
        assert!(
            counter(&t1, &sealed) > 0 && counter(&t2, &sealed) > 0,
            "sealed {direction}: {t1}\n{t2}"
        );
    }
    let mesh_out =
        "fedmesh_rendezvous_mesh_datagrams_total{collab=\"collab-x\",direction=\"to_replica\"} ";
    assert!(
        counter(&t1, mesh_out) > 0 && counter(&t2, mesh_out) > 0,
        "{t1}\n{t2}"
    );

    // Replica 1 is killed (no goodbye: its nodes notice the silence); the load balancer's
    // health check takes it out; its node reconnects to replica 2 and the link carries again.
    lb.take_out(udp1);
    p1.0.kill().unwrap();
    let killed = Instant::now();
    carry_both_ways(addr, target.clone(), 256 * 1024).await;
    let failover = killed.elapsed();
    eprintln!("carried again {failover:?} after a replica process was killed");
    assert!(failover < 5 * SECOND, "carried again after {failover:?}");
    assert_eq!(counter(&http_get(http2, "/metrics").await, nodes), 2);

    // The owner revokes org-b at the hub, and nothing else: the replica holding it drops it,
    // and a connection over the link ends, within 5 s.
    let mut tcp = connect_soon(addr).await;
    tcp.write_all(b"ping").await.unwrap();
    let revoked = Instant::now();
    mesh.owner.revoke(&[], &[b()], &[]).await.unwrap();
    let dropped = gauge_reaches(http2, nodes, 1, revoked, "org-b still connected").await;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(5 * SECOND, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("stream still open after revocation: {other:?}"),
    }
    eprintln!(
        "revocation at the hub: rendezvous dropped the node after {dropped:?}, link closed after {:?}",
        revoked.elapsed()
    );
    assert!(revoked.elapsed() < 5 * SECOND);
    mesh.shutdown().await.unwrap();
}
