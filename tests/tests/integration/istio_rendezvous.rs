//! Istio mode with a peer that takes no inbound connections: the agent carries that peer's
//! links over its relay and the rendezvous, and starts no relay while every peer has a gateway.
//!
//! No Kubernetes API server can run here (no container engine, no cluster), so the agent's
//! controller talks to a small fake one over real HTTP on loopback: it keeps what is applied and
//! answers lists and watches from it. The objects it holds are what the agent would write.
//! Algorithm pods are played by loopback clients of the agent's pod ports (where the sidecar
//! sends what the ServiceEntry's `targetPort` names).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    http::{Method, StatusCode, Uri},
    response::Response,
};
use fedmesh_agent::{
    enroll,
    k8s::{self, Controller, Mode, PortRange},
    mesh::{LocalMesh, MeshOptions, NodeSpec},
    node::{self, Expose, NodeHandle, NodeOptions},
    relay::RelayOptions,
    rendezvous::{Rendezvous, RendezvousMetrics, RendezvousOptions, ServerCert},
};
use fedmesh_documents::NodeRef;
use serde_json::{Value, json};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{
    relay::{SECOND, a, b, n, read_hash, send_pattern},
    rendezvous::list_rendezvous,
};

type Store = Arc<Mutex<BTreeMap<String, Value>>>;

/// A fake API server on 127.0.0.1:0: server-side applies are stored (with the fields a server
/// adds), lists answered from the store, watches held open, deletes honoured.
async fn fake_api_server(stop: CancellationToken) -> (kube::Client, Store) {
    let store: Store = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = store.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let store = s.clone();
        async move { answer(&store, &method, &uri, &body) }
    });
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .unwrap();
    });
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.default_namespace = "fedmesh".into();
    (kube::Client::try_from(config).unwrap(), store)
}

fn answer(store: &Store, method: &Method, uri: &Uri, body: &[u8]) -> Response {
    let json = |status: StatusCode, value: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(value.to_string()))
            .unwrap()
    };
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default();
    let mut objects = store.lock().unwrap();
    match *method {
        Method::GET if query.contains("watch=") => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(futures::stream::pending::<
                Result<Bytes, std::io::Error>,
            >()))
            .unwrap(),
        Method::GET => {
            let prefix = format!("{path}/");
            let items: Vec<Value> = objects
                .iter()
                .filter(|(k, _)| k.strip_prefix(&prefix).is_some_and(|r| !r.contains('/')))
                .map(|(_, v)| v.clone())
                .collect();
            json(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        Method::PATCH => {
            let patch: Value = serde_json::from_slice(body).unwrap();
            if let Some(object_path) = path.strip_suffix("/status") {
                let object = objects
                    .entry(object_path.to_owned())
                    .or_insert_with(|| patch.clone());
                object["status"] = patch["status"].clone();
                return json(StatusCode::OK, object.clone());
            }
            let mut object = patch;
            object["metadata"]["uid"] = json!(format!("uid-{}", objects.len()));
            object["metadata"]["resourceVersion"] = json!("1");
            if object["kind"] == "Service" {
                object["spec"]["clusterIP"] = json!("10.96.0.10");
            }
            objects.insert(path, object.clone());
            json(StatusCode::OK, object)
        }
        Method::DELETE => {
            objects.remove(&path);
            json(
                StatusCode::OK,
                json!({"kind": "Status", "status": "Success"}),
            )
        }
        _ => json(StatusCode::METHOD_NOT_ALLOWED, json!({})),
    }
}

/// A rendezvous on 127.0.0.1:0 until `stop`.
fn start_rendezvous(
    dir: &Path,
    stop: &CancellationToken,
) -> (Arc<Rendezvous>, Arc<RendezvousMetrics>, String) {
    let cert = ServerCert::load_or_create(dir, &["localhost".to_owned()]).unwrap();
    let pin = cert.pin();
    let metrics = Arc::new(RendezvousMetrics::default());
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = Arc::new(
        Rendezvous::new(socket, cert, RendezvousOptions::default(), metrics.clone()).unwrap(),
    );
    let (s, c) = (server.clone(), stop.clone());
    tokio::spawn(async move { s.run(c.cancelled_owned()).await.unwrap() });
    (server, metrics, pin)
}

const NODES: &str = "fedmesh_rendezvous_nodes{collab=\"collab-x\"} ";
const BYTES_OUT: &str = "fedmesh_rendezvous_bytes_total{collab=\"collab-x\",direction=\"out\"} ";

/// The value of the metric line starting with `prefix` (0 when there is none).
fn gauge(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A free TCP port on loopback, for the agent's one pod port (the range is that port alone).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Enrolls `node` in `mesh`'s collaboration and starts its agent in Istio mode against a fake
/// API server; `advertise` is its ingress gateway (none: outbound only).
async fn istio_agent(
    mesh: &mut LocalMesh,
    node: &NodeRef,
    advertise: Option<&str>,
    exposes: Vec<Expose>,
    stop: &CancellationToken,
) -> (NodeHandle, Store, u16) {
    let token = mesh
        .owner
        .join_token(node, None, 3600 * SECOND)
        .await
        .unwrap();
    let state = mesh.dir.join(format!("istio-{}", node.org));
    enroll::enroll(&token, &state, None).await.unwrap();
    let pod_port = free_port();
    let options = k8s::Options {
        mode: Some(Mode::Istio),
        namespace: Some("fedmesh".into()),
        render: Default::default(),
        pod_labels: BTreeMap::from([("app.kubernetes.io/name".into(), "fedmesh-agent".into())]),
        pod_ports: format!("{pod_port}-{pod_port}")
            .parse::<PortRange>()
            .unwrap(),
        resync: SECOND,
    };
    let (client, store) = fake_api_server(stop.clone()).await;
    let controller = Controller::resolve(client, &options).await.unwrap();
    let handle = node::start_with(
        NodeOptions {
            state,
            relay_listen: "127.0.0.1:0".parse().unwrap(),
            advertise: advertise.map(str::to_owned),
            loopback_pool: "127.0.0.0/8".parse().unwrap(),
            exposes,
            dns_listen: None,
            admin_listen: None,
            v6: None,
            relay: RelayOptions {
                max_udp_payload: 65_000,
                ..RelayOptions::default()
            },
            kubernetes: Some(options),
            outbound_only: advertise.is_none(),
            carrier: Default::default(),
        },
        Some(controller),
    )
    .await
    .unwrap();
    (handle, store, pod_port)
}

/// The applied object of `kind` for `peer` (`<org>.<node>`), once the controller wrote it.
async fn applied(store: &Store, kind: &str, peer: &str) -> Value {
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let found = store
            .lock()
            .unwrap()
            .values()
            .find(|o| o["kind"] == kind && o["metadata"]["labels"]["fedmesh.io/peer"] == peer)
            .cloned();
        if let Some(object) = found {
            return object;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} for {peer} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `total` bytes each way between a client of `addr` and the one connection `target`
/// accepts; both directions byte-exact.
async fn both_ways(addr: SocketAddr, target: &TcpListener, total: usize) {
    let deadline = Instant::now() + 10 * SECOND;
    let tcp = loop {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            break tcp;
        }
        assert!(Instant::now() < deadline, "{addr} not usable within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (accepted, _) = tokio::time::timeout(10 * SECOND, target.accept())
        .await
        .expect("the stream reached the target")
        .unwrap();
    let (mut tr, mut tw) = accepted.into_split();
    let (mut cr, mut cw) = tcp.into_split();
    let client_sent = tokio::spawn(async move {
        let h = send_pattern(&mut cw, 1, total).await;
        cw.shutdown().await.unwrap();
        h
    });
    let target_sent = tokio::spawn(async move {
        let h = send_pattern(&mut tw, 2, total).await;
        tw.shutdown().await.unwrap();
        h
    });
    let (at_target, at_client) = tokio::join!(read_hash(&mut tr), read_hash(&mut cr));
    assert_eq!(
        at_target,
        (total, client_sent.await.unwrap()),
        "to the target"
    );
    assert_eq!(at_client, (total, target_sent.await.unwrap()), "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_only_peer_in_istio_mode_is_reached_through_the_agent_and_the_rendezvous() {
    istio_node_and_outbound_only_peer(Some("gw.org-a.example:443")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_only_istio_node_carries_its_links_through_the_agent_and_the_rendezvous() {
    istio_node_and_outbound_only_peer(None).await;
}

/// org-a in Istio mode (with an ingress gateway at `gateway`, or outbound only) and org-b in
/// relay mode, outbound only: a link each way, carried by the agents through the rendezvous.
async fn istio_node_and_outbound_only_peer(gateway: Option<&str>) {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (server, metrics, pin) = start_rendezvous(&tmp.path().join("rv"), &stop);
    // org-b: relay mode, outbound only; its MPyC party listens on `b_target`.
    let b_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = MeshOptions {
        outbound_only: BTreeSet::from([b()]),
        ..fedmesh_tests::mesh_options()
    };
    let spec = NodeSpec {
        node: b(),
        organization_id: Some(2),
        exposes: vec![Expose {
            port: 7311,
            label: Some("mpc".into()),
            target: b_target.local_addr().unwrap().to_string(),
        }],
    };
    let mut mesh = LocalMesh::start(tmp.path(), &opts, &[spec]).await.unwrap();
    // org-a: Istio mode with an ingress gateway; its Flower SuperLink listens on `a_target`.
    let a_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (agent_a, store, pod_port) = istio_agent(
        &mut mesh,
        &a(),
        gateway,
        vec![Expose {
            port: 9092,
            label: Some("flower".into()),
            target: a_target.local_addr().unwrap().to_string(),
        }],
        &stop,
    )
    .await;
    let ledger = list_rendezvous(&mut mesh, &[&server], server.local_addr().unwrap(), &pin).await;
    let ad = ledger.advertisement(&a()).unwrap();
    assert!(ad.via_rendezvous() && ad.quic().is_none(), "{ad:?}");
    assert_eq!(ad.istio_gateway(), gateway, "{ad:?}");
    mesh.link(
        &a(),
        &b(),
        &["7311:mpc".parse().unwrap()],
        3600 * SECOND,
        None,
    )
    .await
    .unwrap();
    mesh.link(
        &b(),
        &a(),
        &["9092:flower".parse().unwrap()],
        3600 * SECOND,
        None,
    )
    .await
    .unwrap();

    // The agent writes org-b's ServiceEntry with the agent pod as its endpoint.
    let se = applied(&store, "ServiceEntry", "org-b.n1").await;
    assert_eq!(se["spec"]["location"], "MESH_INTERNAL", "{se:#}");
    assert_eq!(
        se["spec"]["ports"],
        json!([{"number": 7311, "name": "tcp-mpc", "protocol": "TCP", "targetPort": pod_port}])
    );
    assert_eq!(
        se["spec"]["workloadSelector"]["labels"],
        json!({"app.kubernetes.io/name": "fedmesh-agent"})
    );
    let deny = applied(&store, "AuthorizationPolicy", "org-b.n1").await;
    assert_eq!(deny["spec"]["action"], "DENY", "{deny:#}");
    // ... and the relay, started for it, listens on that pod port.
    agent_a
        .wait_for(10 * SECOND, |s| s.peers.contains_key(&b()))
        .await
        .unwrap();
    let pod_addr = SocketAddr::from(([0, 0, 0, 0], pod_port));
    agent_a.wait_listening(pod_addr, 10 * SECOND).await.unwrap();
    assert!(*agent_a.relay_running.borrow());

    // An algorithm pod of org-a (its sidecar, at the pod port) reaches org-b's party.
    both_ways(
        SocketAddr::from(([127, 0, 0, 1], pod_port)),
        &b_target,
        1024 * 1024,
    )
    .await;
    // org-b's party reaches org-a's SuperLink: org-a's agent receives it over the rendezvous.
    let to_a = mesh.peer_addr(&b(), &a(), 9092, 10 * SECOND).await.unwrap();
    both_ways(to_a, &a_target, 1024 * 1024).await;
    let text = metrics.render();
    assert_eq!(
        gauge(&text, NODES),
        2,
        "both agents hold a carrier connection"
    );
    assert!(
        gauge(&text, BYTES_OUT) >= 4 * 1024 * 1024,
        "both links' bytes went through the rendezvous: {text}"
    );
    // Algorithm pods in org-a may reach org-b only through the agent: mTLS to it, and no
    // gateway objects for org-b.
    let dr = applied(&store, "DestinationRule", "org-b.n1").await;
    assert_eq!(dr["spec"]["trafficPolicy"]["tls"]["mode"], "ISTIO_MUTUAL");
    assert!(!store.lock().unwrap().values().any(
        |o| o["kind"] == "Gateway" && o["metadata"]["labels"]["fedmesh.io/peer"] == "org-b.n1"
    ));

    agent_a.shutdown().await.unwrap();
    mesh.shutdown().await.unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mode_with_only_gateway_peers_starts_no_relay_and_no_carrier() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (server, metrics, pin) = start_rendezvous(&tmp.path().join("rv"), &stop);
    let mut mesh = LocalMesh::start(tmp.path(), &fedmesh_tests::mesh_options(), &[])
        .await
        .unwrap();
    let c = n("org-c/n1");
    let (agent_a, store, _) =
        istio_agent(&mut mesh, &a(), Some("gw.org-a.example:443"), vec![], &stop).await;
    let expose = vec![Expose {
        port: 7312,
        label: None,
        target: "127.0.0.1:7312".into(),
    }];
    let (agent_c, _, _) =
        istio_agent(&mut mesh, &c, Some("gw.org-c.example:443"), expose, &stop).await;
    // The collaboration lists a rendezvous: nothing but need keeps the agents away from it.
    list_rendezvous(&mut mesh, &[&server], server.local_addr().unwrap(), &pin).await;
    mesh.link(&a(), &c, &["7312".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();

    // The link is carried by the gateways: org-c's ServiceEntry points at its gateway.
    let se = applied(&store, "ServiceEntry", "org-c.n1").await;
    assert_eq!(se["spec"]["location"], "MESH_EXTERNAL", "{se:#}");
    assert_eq!(se["spec"]["endpoints"][0]["address"], "gw.org-c.example");
    agent_a
        .wait_for(10 * SECOND, |s| s.peers.contains_key(&c))
        .await
        .unwrap();
    // A few more passes of both agents (resync every second), then: no relay, no listener,
    // no carrier connection.
    tokio::time::sleep(2 * SECOND).await;
    for agent in [&agent_a, &agent_c] {
        assert!(!*agent.relay_running.borrow(), "{}", agent.node);
        assert!(agent.listening.borrow().is_empty(), "{}", agent.node);
        assert_eq!(agent.relay_addr, None);
    }
    let text = metrics.render();
    assert_eq!(gauge(&text, NODES), 0, "no agent connected: {text}");
    assert_eq!(gauge(&text, BYTES_OUT), 0, "{text}");

    agent_a.shutdown().await.unwrap();
    agent_c.shutdown().await.unwrap();
    mesh.shutdown().await.unwrap();
    stop.cancel();
}
