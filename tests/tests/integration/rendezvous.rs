//! The rendezvous on loopback: two nodes that advertise no direct endpoint link through it
//! (byte-exact both ways, revocation ends the link), bad inputs to it are refused without
//! disturbing other nodes, and a hostile rendezvous that tampers with datagrams cannot break
//! or alter the end-to-end session.

use std::{
    collections::BTreeSet,
    future::Future,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fedmesh_agent::{
    hub::tls::pinned_client_config,
    mesh::LocalMesh,
    rendezvous::{
        self, ALPN, Rendezvous, RendezvousMetrics, RendezvousOptions, ServerCert,
        carrier_transport, config_of, frame, ledger_from_lines,
    },
};
use fedmesh_certs::NodeIdentity;
use fedmesh_documents::{Document, RendezvousServer, Revocation, fixtures::Fixture, jws};
use fedmesh_tests::KillOnDrop;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::relay::{SECOND, a, b, n, pair, read_hash, send_pattern};

/// Ends what it was handed to when cancelled (or dropped).
#[derive(Clone)]
pub(super) struct Stop(Arc<tokio::sync::watch::Sender<bool>>);

impl Stop {
    pub(super) fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }

    pub(super) fn cancel(&self) {
        self.0.send_replace(true);
    }

    pub(super) fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

/// A rendezvous on 127.0.0.1:0, running until the returned token is cancelled.
pub(super) fn start_rendezvous(
    dir: &std::path::Path,
    options: RendezvousOptions,
) -> (Arc<Rendezvous>, Arc<RendezvousMetrics>, String, Stop) {
    let cert = ServerCert::load_or_create(dir, &["localhost".to_owned()]).unwrap();
    let pin = cert.pin();
    let metrics = Arc::new(RendezvousMetrics::default());
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = Arc::new(Rendezvous::new(socket, cert, options, metrics.clone()).unwrap());
    let stop = Stop::new();
    let (s, c) = (server.clone(), stop.cancelled());
    tokio::spawn(async move { s.run(c).await.unwrap() });
    (server, metrics, pin, stop)
}

/// Lists the rendezvous at `address` (pinned `pin`) in the collaboration and hands the owner's
/// documents to `servers`; returns the owner's ledger.
pub(super) async fn list_rendezvous(
    mesh: &mut LocalMesh,
    servers: &[&Rendezvous],
    address: SocketAddr,
    pin: &str,
) -> fedmesh_documents::Ledger {
    mesh.owner
        .set_rendezvous(vec![RendezvousServer {
            address: address.to_string(),
            pin_sha256: pin.to_owned(),
        }])
        .await
        .unwrap();
    let ledger = mesh.owner.ledger().await.unwrap();
    let config = config_of(&ledger).unwrap();
    for server in servers {
        server.update(config.clone()).unwrap();
    }
    ledger
}

/// org-a and org-b, both outbound only, org-b exposing `port` → `target`.
pub(super) async fn outbound_only_pair(
    dir: &std::path::Path,
    port: u16,
    target: SocketAddr,
) -> LocalMesh {
    let opts = fedmesh_agent::mesh::MeshOptions {
        outbound_only: BTreeSet::from([a(), b()]),
        ..fedmesh_tests::mesh_options()
    };
    pair(dir, port, target, &opts).await
}

/// Connects to `addr` until it answers (the link is being set up), within 10 s.
pub(super) async fn connect_soon(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            return tcp;
        }
        assert!(Instant::now() < deadline, "link not usable within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Carries `total` pattern bytes each way between a client of `addr` and the one connection
/// `target` accepts; asserts both directions byte for byte.
pub(super) async fn carry_both_ways(addr: SocketAddr, target: Arc<TcpListener>, total: usize) {
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
    let tcp = connect_soon(addr).await;
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
}

/// Asserts that `metrics` counted `family{collab="c",reason=...}` at least once for each of
/// `reasons`.
pub(super) fn assert_counted(metrics: &str, family: &str, reasons: &[&str]) {
    for reason in reasons {
        let key = format!("{family}{{collab=\"c\",reason=\"{reason}\"}} ");
        assert!(
            counter(metrics, &key) >= 1,
            "no {family} {reason} counted: {metrics}"
        );
    }
}

pub(super) fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_only_nodes_link_through_the_rendezvous_and_revocation_ends_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, metrics, pin, stop) =
        start_rendezvous(&tmp.path().join("rv"), RendezvousOptions::default());
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let mut mesh = outbound_only_pair(tmp.path(), 7101, target.local_addr().unwrap()).await;
    let ledger = list_rendezvous(&mut mesh, &[&server], server.local_addr().unwrap(), &pin).await;
    for node in [a(), b()] {
        let ad = ledger.advertisement(&node).unwrap();
        assert!(ad.quic().is_none() && ad.via_rendezvous(), "{ad:?}");
    }

    let id = mesh
        .link(&a(), &b(), &["7101".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7101, 10 * SECOND).await.unwrap();
    // Algorithms keep the same kind of address and port whatever the path.
    assert_eq!(addr.port(), 7101);
    carry_both_ways(addr, target.clone(), 8 * 1024 * 1024).await;
    let text = metrics.render();
    assert!(
        counter(
            &text,
            "fedmesh_rendezvous_bytes_total{collab=\"collab-x\",direction=\"out\"} "
        ) > 16 * 1024 * 1024,
        "the bytes went through the rendezvous: {text}"
    );
    assert!(
        text.contains("fedmesh_rendezvous_nodes{collab=\"collab-x\"} 2"),
        "{text}"
    );
    // Both carriers are QUIC, so the link's packets took the sealed path (no second QUIC
    // packet around each), all but the first few while its probes were unanswered.
    let out = |family: &str| {
        counter(
            &text,
            &format!("{family}_total{{collab=\"collab-x\",direction=\"out\"}} "),
        )
    };
    let (sealed, all) = (
        out("fedmesh_rendezvous_sealed_datagrams"),
        out("fedmesh_rendezvous_datagrams"),
    );
    assert!(
        sealed * 10 >= all * 9,
        "{sealed} of {all} datagrams sealed: {text}"
    );

    // A new connection over the link (the target's backlog completes it), then the owner
    // revokes the link: the connection is closed within 5 s.
    let mut tcp = connect_soon(addr).await;
    tcp.write_all(b"ping").await.unwrap();
    let revoked = Instant::now();
    mesh.owner.revoke(&[id], &[], &[]).await.unwrap();
    let mut buf = [0u8; 4];
    let closed = tokio::time::timeout(5 * SECOND, tcp.read(&mut buf)).await;
    match closed {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("stream still open after revocation: {other:?}"),
    }
    assert!(
        revoked.elapsed() < 5 * SECOND,
        "closed after {:?}",
        revoked.elapsed()
    );
    mesh.shutdown().await.unwrap();
    stop.cancel();
}

/// A raw carrier client: the connection a node's carrier makes, for sending crafted frames.
pub(super) async fn carrier_client(
    server: SocketAddr,
    pin: &str,
    identity: Option<&NodeIdentity>,
    mtu: u16,
) -> Result<quinn::Connection, String> {
    let tls = match identity {
        Some(identity) => pinned_client_config(pin, identity, ALPN).unwrap(),
        None => {
            let mut c = fedmesh_agent::hub::tls::client_config(pin, None, None).unwrap();
            c.alpn_protocols = vec![ALPN.to_vec()];
            c
        }
    };
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = Arc::try_unwrap(carrier_transport(1 << 20)).unwrap();
    transport.initial_mtu(mtu).min_mtu(mtu);
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(server, "rendezvous.fedmesh")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // A refusal by the client verifier may surface only after the handshake: the server
    // closes at once. Give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    match conn.close_reason() {
        Some(reason) => Err(reason.to_string()),
        None => Ok(conn),
    }
}

pub(super) fn identity(fx: &Fixture, node: &str) -> NodeIdentity {
    let e = &fx.nodes[&n(node)];
    NodeIdentity::from_pem(&e.cert_pem, &e.key_pem).unwrap()
}

/// Sends `payload` from `from` to `to` and expects it at `to` from `sender`, exactly.
pub(super) async fn exchange(
    from: &quinn::Connection,
    to: &quinn::Connection,
    to_node: &str,
    sender: &str,
) {
    let payload = format!("datagram from {sender} to {to_node}").into_bytes();
    from.send_datagram(frame::encode(&n(to_node), &payload))
        .unwrap();
    let got = tokio::time::timeout(2 * SECOND, to.read_datagram())
        .await
        .expect("datagram forwarded within 2 s")
        .unwrap();
    let (named, body) = frame::decode(&got, 65_535).unwrap();
    assert_eq!((named, &body[..]), (n(sender), &payload[..]));
}

/// Polls the metrics at `http` until the gauge `prefix` reads `want`, for at most 5 s from
/// `since` (what it waits for: `what`); returns how long that took from `since`.
pub(super) async fn gauge_reaches(
    http: SocketAddr,
    prefix: &str,
    want: u64,
    since: Instant,
    what: &str,
) -> Duration {
    loop {
        let text = http_get(http, "/metrics").await;
        if counter(&text, prefix) == want {
            return since.elapsed();
        }
        assert!(since.elapsed() < 5 * SECOND, "{what}: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_to_the_rendezvous_are_refused_without_disturbing_others() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let options = RendezvousOptions {
        rate: 256 * 1024,
        burst: 64 * 1024,
        ..RendezvousOptions::default()
    };
    let (server, metrics, pin, stop) = start_rendezvous(tmp.path(), options);
    let addr = server.local_addr().unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    tokio::spawn(rendezvous::http::serve(
        http,
        server.ready(),
        metrics.clone(),
        stop.cancelled(),
    ));
    assert!(
        http_get(http_addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let not_ready = http_get(http_addr, "/readyz").await;
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");

    // Members a, b, e (good), c (to be revoked), d (enrolled, then removed from the members).
    let mut fx = Fixture::at(
        "c",
        &["a/n1", "b/n1", "c/n1", "d/n1", "e/n1"],
        std::time::SystemTime::now(),
    );
    // Before any collaboration is known, nobody is admitted.
    assert!(
        carrier_client(addr, &pin, Some(&identity(&fx, "a/n1")), 1400)
            .await
            .is_err()
    );
    fx.collab.version = 2;
    fx.collab.members.retain(|m| m.org != "d");
    load_revoking_c(&server, &fx);
    assert!(
        http_get(http_addr, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );

    let node_a = carrier_client(addr, &pin, Some(&identity(&fx, "a/n1")), 4000)
        .await
        .unwrap();
    let node_b = carrier_client(addr, &pin, Some(&identity(&fx, "b/n1")), 1400)
        .await
        .unwrap();
    let node_e = carrier_client(addr, &pin, Some(&identity(&fx, "e/n1")), 1400)
        .await
        .unwrap();
    exchange(&node_a, &node_b, "b/n1", "a/n1").await;
    exchange(&node_b, &node_a, "a/n1", "b/n1").await;

    // 1. No client certificate.
    assert!(carrier_client(addr, &pin, None, 1400).await.is_err());
    // 2. Another collaboration's certificate (same node name, another CA).
    let other = Fixture::at("other", &["a/n1"], std::time::SystemTime::now());
    assert!(
        carrier_client(addr, &pin, Some(&identity(&other, "a/n1")), 1400)
            .await
            .is_err()
    );
    // 3. Not a member (a valid certificate of this CA; the owner removed the node).
    assert!(
        carrier_client(addr, &pin, Some(&identity(&fx, "d/n1")), 1400)
            .await
            .is_err()
    );
    // 4. A revoked node.
    assert!(
        carrier_client(addr, &pin, Some(&identity(&fx, "c/n1")), 1400)
            .await
            .is_err()
    );
    // 5. Oversized frame, 6. a frame for an unknown peer, 7. a garbage frame, 8. a frame to
    // oneself, 9. a frame for a peer that is not connected (the revoked one).
    node_a
        .send_datagram(frame::encode(&n("b/n1"), &vec![7u8; 3000]))
        .unwrap();
    node_a
        .send_datagram(frame::encode(&n("z/n9"), b"who?"))
        .unwrap();
    node_a
        .send_datagram(b"\xff\xffgarbage".to_vec().into())
        .unwrap();
    node_a
        .send_datagram(frame::encode(&n("a/n1"), b"me"))
        .unwrap();
    node_a
        .send_datagram(frame::encode(&n("c/n1"), b"revoked"))
        .unwrap();
    // The next datagram b sees is a's well-formed one, not any of the above.
    exchange(&node_a, &node_b, "b/n1", "a/n1").await;

    // 10. A flood beyond a's rate: dropped at the rendezvous; b and e still talk.
    let flood = {
        let node_a = node_a.clone();
        tokio::spawn(async move {
            let until = Instant::now() + SECOND;
            while Instant::now() < until {
                for _ in 0..64 {
                    let _ = node_a.send_datagram(frame::encode(&n("e/n1"), &[1u8; 1200]));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // e reads whatever of the flood passed its bound, then b's datagram.
    let payload = b"from b during the flood".to_vec();
    node_b
        .send_datagram(frame::encode(&n("e/n1"), &payload))
        .unwrap();
    let deadline = Instant::now() + 3 * SECOND;
    loop {
        let got = tokio::time::timeout(3 * SECOND, node_e.read_datagram())
            .await
            .unwrap()
            .unwrap();
        let (from, body) = frame::decode(&got, 65_535).unwrap();
        if from == n("b/n1") {
            assert_eq!(&body[..], &payload[..]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b's datagram did not get through the flood"
        );
    }
    flood.await.unwrap();

    let text = http_get(http_addr, "/metrics").await;
    assert_counted(
        &text,
        "fedmesh_rendezvous_dropped_total",
        &["oversized", "unknown_peer", "bad_node", "to_self", "rate"],
    );
    assert!(
        counter(
            &text,
            "fedmesh_rendezvous_refused_total{collab=\"c\",reason=\"handshake\"} "
        ) >= 4,
        "{text}"
    );

    // 11. Revoking a connected node disconnects it at once; the others stay.
    load_revoking(&server, &fx, 2, &["c/n1", "b/n1"]);
    let reason = tokio::time::timeout(SECOND, node_b.closed()).await.unwrap();
    assert!(reason.to_string().contains("refused"), "{reason}");
    exchange(&node_e, &node_a, "a/n1", "e/n1").await;
    stop.cancel();
}

/// Starts org-a and org-b (outbound only) with a rendezvous at `rendezvous` (pinned `pin`), a
/// link a → b on `port`; returns the mesh, the link id and the peer address.
async fn linked_through(
    dir: &std::path::Path,
    target: &TcpListener,
    port: u16,
    rendezvous: SocketAddr,
    pin: String,
) -> (LocalMesh, String, SocketAddr) {
    let mut mesh = outbound_only_pair(dir, port, target.local_addr().unwrap()).await;
    mesh.owner
        .set_rendezvous(vec![RendezvousServer {
            address: rendezvous.to_string(),
            pin_sha256: pin,
        }])
        .await
        .unwrap();
    let id = mesh
        .link(
            &a(),
            &b(),
            &[port.to_string().parse().unwrap()],
            3600 * SECOND,
            None,
        )
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), port, 10 * SECOND).await.unwrap();
    (mesh, id, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_carry_again_soon_after_the_rendezvous_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let rv_dir = tmp.path().join("rv");
    let (server, _, pin, stop) = start_rendezvous(&rv_dir, RendezvousOptions::default());
    let rv_addr = server.local_addr().unwrap();
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (mesh, _, addr) = linked_through(tmp.path(), &target, 7102, rv_addr, pin.clone()).await;
    let config = config_of(&mesh.owner.ledger().await.unwrap()).unwrap();
    server.update(config.clone()).unwrap();
    carry_both_ways(addr, target.clone(), 1024 * 1024).await;

    // Stop it (every carrier connection is closed), start it again on the same port with the
    // same certificate (the pin the owner signed).
    stop.cancel();
    drop(server);
    let restarted = Instant::now();
    let socket = loop {
        match UdpSocket::bind(rv_addr) {
            Ok(socket) => break socket,
            Err(_) if restarted.elapsed() < 2 * SECOND => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {rv_addr} again: {e}"),
        }
    };
    let cert = ServerCert::load_or_create(&rv_dir, &[]).unwrap();
    assert_eq!(cert.pin(), pin, "the pin survives a restart");
    let metrics = Arc::new(RendezvousMetrics::default());
    let server =
        Arc::new(Rendezvous::new(socket, cert, RendezvousOptions::default(), metrics).unwrap());
    server.update(config).unwrap();
    let stop = Stop::new();
    let (s, c) = (server.clone(), stop.cancelled());
    tokio::spawn(async move { s.run(c).await.unwrap() });
    let back = Instant::now();
    carry_both_ways(addr, target.clone(), 1024 * 1024).await;
    assert!(
        back.elapsed() < 5 * SECOND,
        "carried again after {:?}",
        back.elapsed()
    );
    mesh.shutdown().await.unwrap();
    stop.cancel();
}

/// What a tampering party (a hostile rendezvous, or a network) did to the datagrams it carried,
/// and its schedule: of the datagrams in order, every 17th dropped, every 11th corrupted (after
/// the first `keep` bytes, which it leaves intact), every 23rd held back behind the next, every
/// 13th duplicated, every 7th followed by a replay of an earlier one, every 19th by 1,200 bytes
/// of noise. With `every` above 1 only one datagram in `every` is subject to it (the rest pass).
#[derive(Default, Debug)]
pub(super) struct Tampering {
    keep: usize,
    every: u64,
    passed: AtomicU64,
    seen: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    corrupted: AtomicU64,
    replayed: AtomicU64,
    reordered: AtomicU64,
    injected: AtomicU64,
    /// Datagrams seen, for replays.
    kept: std::sync::Mutex<Vec<Vec<u8>>>,
    /// One datagram held back, sent after the next (reordered).
    held: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Tampering {
    /// A schedule that leaves each datagram's first `keep` bytes (a header) intact, for one
    /// datagram in `every`; noise starts with the first byte of the datagram it follows.
    pub(super) fn keeping(keep: usize, every: u64) -> Self {
        Self {
            keep,
            every,
            ..Self::default()
        }
    }

    /// What to send for one datagram on its way (none, it, or more).
    pub(super) fn apply(&self, packet: Vec<u8>) -> Vec<Vec<u8>> {
        if !(self.passed.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(self.every.max(1)) {
            return vec![packet];
        }
        let i = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let mut kept = self.kept.lock().unwrap();
        let mut held = self.held.lock().unwrap();
        if i.is_multiple_of(17) {
            count(&self.dropped);
            return Vec::new();
        }
        let mut p = packet;
        if i.is_multiple_of(11) && p.len() > self.keep {
            let at = self.keep + (p.len() - self.keep) / 2;
            p[at] ^= 0x5a;
            count(&self.corrupted);
        }
        if i.is_multiple_of(23) && held.is_none() {
            *held = Some(p);
            count(&self.reordered);
            return Vec::new();
        }
        let mut out = vec![p.clone()];
        out.extend(held.take());
        if i.is_multiple_of(13) {
            out.push(p.clone());
            count(&self.duplicated);
        }
        if i.is_multiple_of(7) && !kept.is_empty() {
            out.push(kept[(i as usize / 7) % kept.len()].clone());
            count(&self.replayed);
        }
        if i.is_multiple_of(19) {
            let mut noise: Vec<u8> = (0..1200).map(|k| (k * 31 + i as usize) as u8).collect();
            if self.keep > 0 {
                noise[0] = p[0];
            }
            out.push(noise);
            count(&self.injected);
        }
        if kept.len() < 64 {
            kept.push(p);
        }
        out
    }

    /// Asserts it did each of its six things at least once.
    pub(super) fn assert_each_done(&self) {
        for (what, count) in [
            ("dropped", &self.dropped),
            ("duplicated", &self.duplicated),
            ("corrupted", &self.corrupted),
            ("replayed", &self.replayed),
            ("reordered", &self.reordered),
            ("injected", &self.injected),
        ] {
            assert!(
                count.load(Ordering::Relaxed) > 0,
                "nothing {what}: {self:?}"
            );
        }
    }
}

/// A rendezvous that forwards between any two certificates of the collaboration's CA, and
/// drops, duplicates, corrupts, replays, reorders and injects datagrams on the way.
async fn hostile_rendezvous(
    dir: &std::path::Path,
    bundle: fedmesh_certs::TrustBundle,
) -> (SocketAddr, String, Arc<Tampering>) {
    let cert = ServerCert::load_or_create(dir, &[]).unwrap();
    let pin = cert.pin();
    let config = cert
        .quic_server_config(&bundle, &fedmesh_certs::PeerGate::chain_only(), 1 << 20)
        .unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let tampered = Arc::new(Tampering::default());
    let clients: Arc<std::sync::Mutex<std::collections::HashMap<String, quinn::Connection>>> =
        Arc::default();
    let t = tampered.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let certs = conn
                .peer_identity()
                .unwrap()
                .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .unwrap();
            let info = fedmesh_certs::CertInfo::parse(&certs[0]).unwrap();
            let me = format!("{}/{}", info.spiffe_id.org(), info.spiffe_id.node());
            clients.lock().unwrap().insert(me.clone(), conn.clone());
            let (clients, t) = (clients.clone(), t.clone());
            tokio::spawn(async move {
                let sender = n(&me);
                while let Ok(d) = conn.read_datagram().await {
                    let Ok((to, payload)) = frame::decode(&d, 65_535) else {
                        continue;
                    };
                    let Some(out) = clients.lock().unwrap().get(&to.to_string()).cloned() else {
                        continue;
                    };
                    for p in t.apply(payload.to_vec()) {
                        let _ = out.send_datagram(frame::encode(&sender, &p));
                    }
                }
            });
        }
    });
    (addr, pin, tampered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_rendezvous_cannot_alter_what_a_link_carries() {
    let tmp = tempfile::tempdir().unwrap();
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    // The double needs the collaboration CA to accept the nodes: start the mesh first, with a
    // placeholder list, then list the double.
    let mut mesh = outbound_only_pair(tmp.path(), 7103, target.local_addr().unwrap()).await;
    let bundle = mesh
        .owner
        .ledger()
        .await
        .unwrap()
        .trust_bundle()
        .unwrap()
        .clone();
    let (rv_addr, pin, tampered) = hostile_rendezvous(&tmp.path().join("rv"), bundle).await;
    mesh.owner
        .set_rendezvous(vec![RendezvousServer {
            address: rv_addr.to_string(),
            pin_sha256: pin,
        }])
        .await
        .unwrap();
    mesh.link(&a(), &b(), &["7103".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7103, 10 * SECOND).await.unwrap();
    carry_both_ways(addr, target, 1024 * 1024).await;
    tampered.assert_each_done();
    mesh.shutdown().await.unwrap();
}

/// Loads `fx`'s collaboration document into `server` with a revocation (number 1) of `c/n1`.
pub(super) fn load_revoking_c(server: &Rendezvous, fx: &Fixture) {
    load_revoking(server, fx, 1, &["c/n1"]);
}

/// Loads `fx`'s collaboration document into `server` with revocation `number` of `nodes`.
pub(super) fn load_revoking(server: &Rendezvous, fx: &Fixture, number: u64, nodes: &[&str]) {
    let revocation = fx.owner_sign(&Document::Revocation(Revocation {
        collab: "c".into(),
        number,
        nodes: nodes.iter().map(|node| n(node)).collect(),
        issued_at: jws::unix(fx.now),
        ..Revocation::default()
    }));
    let documents = format!("{revocation}\n{}\n", fx.collab_jws());
    let (ledger, problems) = ledger_from_lines(&fx.pin(), &documents, fx.now);
    assert!(problems.is_empty(), "{problems:?}");
    server.update(config_of(&ledger).unwrap()).unwrap();
}

/// Starts `fedmesh rendezvous` on free loopback ports with `--dir dir` and `args`; returns the
/// child and its start-up banner ("rendezvous running: udp/<addr> tcp/<addr> (certificate pin
/// <pin>), http://<addr>[, mesh/<addr>]"). Its TCP carrier gets a port of its own (the default,
/// the UDP port's number, may be taken by another test's TCP socket); a process that prints no
/// banner fails the test with what it said on stderr.
pub(super) async fn rendezvous_process(
    dir: &std::path::Path,
    args: &[String],
) -> (KillOnDrop, String) {
    use std::io::BufRead;
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(fedmesh_tests::fedmesh_bin())
            .args([
                "rendezvous",
                "--listen",
                "127.0.0.1:0",
                "--tcp-listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    if line.is_empty() {
        let _ = child.0.wait();
        let said = std::fs::read_to_string(stderr.path()).unwrap_or_default();
        panic!("the rendezvous printed no banner; stderr: {said}");
    }
    (child, line)
}

/// The address after `prefix` (`udp/`, `http://`, `mesh/`) in a rendezvous banner.
pub(super) fn banner_address(line: &str, prefix: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {line:?}"))
        .trim_end_matches([',', ')'])
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendezvous_command_serves_the_owners_documents_and_follows_revocations() {
    let tmp = tempfile::tempdir().unwrap();
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let mut mesh = outbound_only_pair(tmp.path(), 7104, target.local_addr().unwrap()).await;
    let docs = tmp.path().join("docs.jws");
    std::fs::write(&docs, mesh.owner.rendezvous_documents().await.unwrap()).unwrap();
    // The process lives until the end of the test.
    let (_child, line) = rendezvous_process(
        &tmp.path().join("rv"),
        &[
            "--documents".into(),
            docs.display().to_string(),
            "--owner-pin".into(),
            mesh.owner.pin(),
        ],
    )
    .await;
    let udp = banner_address(&line, "udp/");
    let http = banner_address(&line, "http://");
    let pin = line
        .split("certificate pin ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap()
        .to_owned();
    mesh.owner
        .set_rendezvous(vec![RendezvousServer {
            address: udp.to_string(),
            pin_sha256: pin,
        }])
        .await
        .unwrap();
    std::fs::write(&docs, mesh.owner.rendezvous_documents().await.unwrap()).unwrap();
    mesh.link(&a(), &b(), &["7104".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7104, 10 * SECOND).await.unwrap();
    carry_both_ways(addr, target, 1024 * 1024).await;
    assert!(http_get(http, "/readyz").await.starts_with("HTTP/1.1 200"));
    let nodes = "fedmesh_rendezvous_nodes{collab=\"collab-x\"} ";
    assert_eq!(counter(&http_get(http, "/metrics").await, nodes), 2);

    // The owner revokes org-b; the new documents reach the rendezvous, which drops it.
    mesh.owner.revoke(&[], &[b()], &[]).await.unwrap();
    let revoked = Instant::now();
    std::fs::write(&docs, mesh.owner.rendezvous_documents().await.unwrap()).unwrap();
    gauge_reaches(http, nodes, 1, revoked, "org-b still connected").await;
    mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fail_over_to_the_next_listed_rendezvous() {
    let tmp = tempfile::tempdir().unwrap();
    // The first listed server never answers (a bound socket nobody reads); two real ones
    // (one certificate, as replicas would share) follow.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rv_dir = tmp.path().join("rv");
    let (first, _, pin, stop_first) = start_rendezvous(&rv_dir, RendezvousOptions::default());
    let (second, second_metrics, _, stop_second) =
        start_rendezvous(&rv_dir, RendezvousOptions::default());
    let target = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let mut mesh = outbound_only_pair(tmp.path(), 7105, target.local_addr().unwrap()).await;
    let listed = Instant::now();
    let server = |addr: SocketAddr| RendezvousServer {
        address: addr.to_string(),
        pin_sha256: pin.clone(),
    };
    mesh.owner
        .set_rendezvous(vec![
            server(silent.local_addr().unwrap()),
            server(first.local_addr().unwrap()),
            server(second.local_addr().unwrap()),
        ])
        .await
        .unwrap();
    let config = config_of(&mesh.owner.ledger().await.unwrap()).unwrap();
    first.update(config.clone()).unwrap();
    second.update(config).unwrap();
    mesh.link(&a(), &b(), &["7105".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7105, 10 * SECOND).await.unwrap();
    carry_both_ways(addr, target.clone(), 256 * 1024).await;
    // One silent server costs the carriers one connect timeout (1.5 s), well inside 5 s.
    assert!(
        listed.elapsed() < 5 * SECOND,
        "carried after {:?}",
        listed.elapsed()
    );
    let nodes = "fedmesh_rendezvous_nodes{collab=\"collab-x\"} ";
    assert_eq!(
        counter(&second_metrics.render(), nodes),
        0,
        "both on the first"
    );

    // The server in use goes away: the carriers move to the next one listed.
    let lost = Instant::now();
    stop_first.cancel();
    carry_both_ways(addr, target, 256 * 1024).await;
    let elapsed = lost.elapsed();
    eprintln!("carried again {elapsed:?} after the rendezvous in use went away");
    assert!(elapsed < 5 * SECOND, "carried again after {elapsed:?}");
    assert_eq!(counter(&second_metrics.render(), nodes), 2);
    mesh.shutdown().await.unwrap();
    stop_second.cancel();
}
