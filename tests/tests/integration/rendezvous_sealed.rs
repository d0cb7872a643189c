//! Sealed datagrams, the rendezvous's fast path beside carrier connections, on loopback: raw
//! clients holding a carrier connection's exporter keys probe, exchange and are refused when
//! what they send is not sealed by a connected member's current session; a network between the
//! nodes and the rendezvous that tampers with sealed datagrams cannot alter what a link carries.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use fedmesh_agent::rendezvous::{
    RendezvousOptions, frame,
    sealed::{self, HEADER, Kind, Opener, Sealer},
};
use fedmesh_documents::fixtures::Fixture;
use tokio::net::UdpSocket;

use super::{
    relay::{SECOND, a, b, n},
    rendezvous::{
        Tampering, assert_counted, carrier_client, carry_both_ways, counter, http_get, identity,
        list_rendezvous, load_revoking, load_revoking_c, outbound_only_pair, start_rendezvous,
    },
};

/// Forwards UDP arriving at `front` to `to` (one upstream socket per client) and the answers
/// back; with `tamper`, sealed datagrams either way go through [`Tampering::apply`].
pub(super) fn forward_udp(
    front: std::net::UdpSocket,
    to: SocketAddr,
    tamper: Option<Arc<Tampering>>,
) {
    front.set_nonblocking(true).unwrap();
    let front = Arc::new(UdpSocket::from_std(front).unwrap());
    let pass = move |packet: Vec<u8>| match &tamper {
        Some(t) if sealed::is_sealed(&packet) => t.apply(packet),
        _ => vec![packet],
    };
    tokio::spawn(async move {
        let mut upstream: BTreeMap<SocketAddr, Arc<UdpSocket>> = BTreeMap::new();
        let mut buf = vec![0; 65_536];
        while let Ok((len, client)) = front.recv_from(&mut buf).await {
            let up = match upstream.get(&client) {
                Some(up) => up.clone(),
                None => {
                    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    up.connect(to).await.unwrap();
                    let (back, front, pass) = (up.clone(), front.clone(), pass.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0; 65_536];
                        while let Ok(len) = back.recv(&mut buf).await {
                            for p in pass(buf[..len].to_vec()) {
                                let _ = front.send_to(&p, client).await;
                            }
                        }
                    });
                    upstream.insert(client, up.clone());
                    up
                }
            };
            for p in pass(buf[..len].to_vec()) {
                let _ = up.send(&p).await;
            }
        }
    });
}

/// A raw node: its carrier connection and, beside it, its sealed path's socket and keys.
struct Raw {
    conn: quinn::Connection,
    socket: UdpSocket,
    seal: Sealer,
    open: Opener,
    rendezvous: SocketAddr,
}

impl Raw {
    async fn connect(rendezvous: SocketAddr, pin: &str, fx: &Fixture, node: &str) -> Self {
        let conn = carrier_client(rendezvous, pin, Some(&identity(fx, node)), 1400)
            .await
            .unwrap();
        let mut secret = [0; sealed::SECRET_LEN];
        conn.export_keying_material(&mut secret, sealed::LABEL, b"")
            .unwrap();
        let (seal, open) = sealed::SessionKeys::new(&secret).node();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut raw = Self {
            conn,
            socket,
            seal,
            open,
            rendezvous,
        };
        raw.probe().await;
        raw
    }

    fn datagram(&mut self, kind: Kind, peer: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal
            .seal_into(kind, sealed::peer_id(&n(peer)), payload, &mut out);
        out
    }

    async fn send(&self, datagram: &[u8]) {
        self.socket
            .send_to(datagram, self.rendezvous)
            .await
            .unwrap();
    }

    /// The next sealed datagram that opens: its kind, sender id and payload.
    async fn receive(&mut self) -> (Kind, u64, Vec<u8>) {
        let mut buf = vec![0; 65_536];
        loop {
            let (len, _) = tokio::time::timeout(2 * SECOND, self.socket.recv_from(&mut buf))
                .await
                .expect("a sealed datagram within 2 s")
                .unwrap();
            if let Ok((kind, peer)) = self.open.open(&buf[..len]) {
                return (kind, peer, buf[HEADER..len].to_vec());
            }
        }
    }

    /// Probes until the rendezvous answers (it opens the session once its handshake is done).
    async fn probe(&mut self) {
        for _ in 0..20 {
            let ping = self.datagram(Kind::Ping, "a/n1", &[]);
            self.send(&ping).await;
            let mut buf = [0; 2048];
            if let Ok(Ok((len, _))) =
                tokio::time::timeout(Duration::from_millis(100), self.socket.recv_from(&mut buf))
                    .await
            {
                assert_eq!(self.open.open(&buf[..len]).unwrap().0, Kind::Pong);
                return;
            }
        }
        panic!("no answer to probes");
    }

    /// Sends `payload` sealed to `to` and expects it there from `me`, exactly.
    async fn exchange(&mut self, to: &mut Self, to_node: &str, me: &str) {
        let payload = format!("sealed from {me} to {to_node}").into_bytes();
        let datagram = self.datagram(Kind::Data, to_node, &payload);
        self.send(&datagram).await;
        assert_eq!(
            to.receive().await,
            (Kind::Data, sealed::peer_id(&n(me)), payload)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_datagrams_pass_only_when_sealed_by_a_connected_members_session() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let (server, metrics, pin, stop) = start_rendezvous(tmp.path(), RendezvousOptions::default());
    let addr = server.local_addr().unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    tokio::spawn(fedmesh_agent::rendezvous::http::serve(
        http,
        server.ready(),
        metrics.clone(),
        stop.cancelled(),
    ));
    let fx = Fixture::at(
        "c",
        &["a/n1", "b/n1", "c/n1", "e/n1"],
        std::time::SystemTime::now(),
    );
    load_revoking_c(&server, &fx);
    let mut a = Raw::connect(addr, &pin, &fx, "a/n1").await;
    let mut b = Raw::connect(addr, &pin, &fx, "b/n1").await;
    let e = carrier_client(addr, &pin, Some(&identity(&fx, "e/n1")), 1400)
        .await
        .unwrap();
    a.exchange(&mut b, "b/n1", "a/n1").await;
    b.exchange(&mut a, "a/n1", "b/n1").await;
    // A node on its carrier connection only reaches a node on the sealed path, sealed.
    e.send_datagram(frame::encode(&n("b/n1"), b"from e's carrier"))
        .unwrap();
    assert_eq!(
        b.receive().await,
        (
            Kind::Data,
            sealed::peer_id(&n("e/n1")),
            b"from e's carrier".to_vec()
        )
    );

    // 1. A replay of a datagram that passed.
    let once = a.datagram(Kind::Data, "b/n1", b"once");
    a.send(&once).await;
    assert_eq!(b.receive().await.2, b"once");
    a.send(&once).await;
    // 2. A forged header (the counter changed, the tag kept).
    let mut forged = a.datagram(Kind::Data, "b/n1", b"forged");
    forged[12] ^= 0x40;
    a.send(&forged).await;
    // 3. An unknown session.
    let mut unknown = a.datagram(Kind::Data, "b/n1", b"whose?");
    unknown[1..9].copy_from_slice(&[0x5a; 8]);
    a.send(&unknown).await;
    // 4. Too short to name a session, 5. a kind only the rendezvous sends.
    a.send(&[0x10, 1, 2]).await;
    let pong = a.datagram(Kind::Pong, "b/n1", &[]);
    a.send(&pong).await;
    // 6. For a peer that is not a member, 7. for itself, 8. for the revoked node.
    for (to, what) in [("z/n9", "who?"), ("a/n1", "me"), ("c/n1", "revoked")] {
        let datagram = a.datagram(Kind::Data, to, what.as_bytes());
        a.send(&datagram).await;
    }
    // 9. a's datagram again, from another address: refused all the same (the counter was
    //    seen; what a datagram may do follows from its keys, not its address).
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(&once, addr).await.unwrap();
    // None of the above reached b: the next datagram b opens is a's well-formed one.
    a.exchange(&mut b, "b/n1", "a/n1").await;

    let text = http_get(http_addr, "/metrics").await;
    assert_counted(
        &text,
        "fedmesh_rendezvous_dropped_total",
        &[
            "sealed_replayed",
            "sealed_forged",
            "unknown_session",
            "sealed_short",
            "sealed_kind",
            "unknown_peer",
            "to_self",
        ],
    );
    assert!(
        counter(
            &text,
            "fedmesh_rendezvous_dropped_total{collab=\"c\",reason=\"sealed_replayed\"} "
        ) >= 2,
        "the replay from the stranger's address counts too: {text}"
    );

    // 10. Revoking b ends its session with its connection: its sealed datagrams are refused at
    //     once and nothing more reaches it.
    load_revoking(&server, &fx, 2, &["c/n1", "b/n1"]);
    tokio::time::timeout(SECOND, b.conn.closed()).await.unwrap();
    let before = counter(
        &http_get(http_addr, "/metrics").await,
        "fedmesh_rendezvous_dropped_total{collab=\"c\",reason=\"unknown_session\"} ",
    );
    let late = b.datagram(Kind::Data, "a/n1", b"revoked now");
    b.send(&late).await;
    let to_b = a.datagram(Kind::Data, "b/n1", b"to the revoked");
    a.send(&to_b).await;
    let mut buf = [0; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.socket.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing reaches a revoked node"
    );
    let text = http_get(http_addr, "/metrics").await;
    assert!(
        counter(
            &text,
            "fedmesh_rendezvous_dropped_total{collab=\"c\",reason=\"unknown_session\"} "
        ) > before,
        "{text}"
    );
    // a still probes and is answered.
    a.probe().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_tampers_with_sealed_datagrams_cannot_alter_what_a_link_carries() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, metrics, pin, stop) =
        start_rendezvous(&tmp.path().join("rv"), RendezvousOptions::default());
    // The nodes reach the rendezvous only through a network that drops, duplicates, corrupts
    // (the payload, which the sealed header does not cover), replays, reorders and injects
    // sealed datagrams both ways (one in three is subject to it, so that the transfer's
    // congestion control is not what the test measures); QUIC passes untouched.
    let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let listed = front.local_addr().unwrap();
    let tampering = Arc::new(Tampering::keeping(HEADER, 3));
    forward_udp(front, server.local_addr().unwrap(), Some(tampering.clone()));
    let target = Arc::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let mut mesh = outbound_only_pair(tmp.path(), 7104, target.local_addr().unwrap()).await;
    list_rendezvous(&mut mesh, &[&server], listed, &pin).await;
    mesh.link(&a(), &b(), &["7104".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a(), &b(), 7104, 10 * SECOND).await.unwrap();
    carry_both_ways(addr, target, 1024 * 1024).await;
    tampering.assert_each_done();
    let text = metrics.render();
    let of = |key: &str| counter(&text, key);
    let (sealed, all) = (
        of("fedmesh_rendezvous_sealed_datagrams_total{collab=\"collab-x\",direction=\"out\"} "),
        of("fedmesh_rendezvous_datagrams_total{collab=\"collab-x\",direction=\"out\"} "),
    );
    assert!(
        sealed > 0 && sealed * 10 >= all * 9,
        "{sealed} of {all} datagrams sealed: {text}"
    );
    // What the header protects, the rendezvous refused; what it does not (the payload), the
    // end-to-end session did: the transfer above is byte-exact.
    assert!(
        of("fedmesh_rendezvous_dropped_total{collab=\"collab-x\",reason=\"sealed_replayed\"} ") > 0,
        "{text}"
    );
    mesh.shutdown().await.unwrap();
    stop.cancel();
}
