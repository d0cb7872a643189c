//! A peer that advertises its relay by host name (`--advertise relay.example:4433`, here
//! `localhost`) is dialled at what the name resolves to: the agent resolves it off its
//! reconciler's path, when the advertisement changes.

use std::time::Duration;

use fedmesh_agent::{
    mesh::{LocalMesh, NodeSpec},
    node::Expose,
};
use fedmesh_documents::NodeRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: Duration = Duration::from_secs(1);

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_advertised_by_host_name_is_dialled() {
    fedmesh_tests::subscribe();
    let target_addr = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
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
                port: 7200,
                label: None,
                target: target_addr.to_string(),
            }],
        },
    ];
    let mut mesh = LocalMesh::start(tmp.path(), &fedmesh_tests::mesh_options(), &specs)
        .await
        .unwrap();

    // Restart org-b advertising its relay as localhost:<the port it binds>.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    mesh.nodes.remove(&b).unwrap().shutdown().await.unwrap();
    // Advertisements are dated to the second, and only a later one replaces the last.
    let now = std::time::SystemTime::now();
    let next_second = fedmesh_certs::time::from_unix(fedmesh_certs::time::unix(now) + 1);
    tokio::time::sleep(next_second.duration_since(now).unwrap_or_default()).await;
    let options = mesh.options.get_mut(&b).unwrap();
    options.relay_listen = format!("127.0.0.1:{port}").parse().unwrap();
    options.advertise = Some(format!("localhost:{port}"));
    let restarted = fedmesh_agent::node::start(options.clone()).await.unwrap();
    mesh.nodes.insert(b.clone(), restarted);

    mesh.link(&a, &b, &["7200".parse().unwrap()], 3600 * SECOND, None)
        .await
        .unwrap();
    let addr = mesh.peer_addr(&a, &b, 7200, 10 * SECOND).await.unwrap();
    let snap = mesh
        .node(&a)
        .wait_for(10 * SECOND, |s| {
            s.peers.get(&b).is_some_and(|p| p.unreachable.is_none())
        })
        .await
        .unwrap();
    assert!(snap.peers[&b].unreachable.is_none());

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"by name").await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(10 * SECOND, tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"by name");
    assert!(
        mesh.node(&a)
            .metrics
            .render()
            .contains("fedmesh_peers_unresolved 0"),
        "the name resolved"
    );
    mesh.shutdown().await.unwrap();
}
