//! Shutdown drains: stopping an agent ends its relay's connections and streams (their tasks
//! are the relay's and end with it), and stopping the hub ends its connections, a long-poll in
//! flight included, instead of leaving them to outlive it.

use std::time::{Duration, Instant};

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
async fn stopping_drains_streams_and_hub_connections() {
    fedmesh_tests::subscribe();
    // An echo target at org-b.
    let target_addr = fedmesh_tests::echo_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let specs = [
        NodeSpec {
            node: n("org-a/n1"),
            organization_id: None,
            exposes: vec![],
        },
        NodeSpec {
            node: n("org-b/n1"),
            organization_id: None,
            exposes: vec![Expose {
                port: 7100,
                label: None,
                target: target_addr.to_string(),
            }],
        },
    ];
    let mut mesh = LocalMesh::start(tmp.path(), &fedmesh_tests::mesh_options(), &specs)
        .await
        .unwrap();
    mesh.link(
        &n("org-a/n1"),
        &n("org-b/n1"),
        &["7100".parse().unwrap()],
        3600 * SECOND,
        None,
    )
    .await
    .unwrap();
    let addr = mesh
        .peer_addr(&n("org-a/n1"), &n("org-b/n1"), 7100, 10 * SECOND)
        .await
        .unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();

    // A long-poll in flight at the hub, as a node keeps one.
    let state = mesh.state(&n("org-a/n1")).unwrap();
    let hub = state.hub_client().unwrap();
    let collab = state.config.collab.clone();
    let cursor = fedmesh_agent::owner::fetch_ledger(&hub, &collab, &state.config.owner_pin)
        .await
        .unwrap()
        .cursor();
    let poll = tokio::spawn(async move { hub.docs(&collab, cursor, 25 * SECOND).await });

    // Stopping org-b's agent ends the stream through it at once: its tasks end with the relay.
    let stopped = Instant::now();
    mesh.nodes
        .remove(&n("org-b/n1"))
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let read = tokio::time::timeout(10 * SECOND, tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the stream ended: {read:?}"
    );
    assert!(stopped.elapsed() < 10 * SECOND, "{:?}", stopped.elapsed());

    // Stopping the hub returns promptly and ends the long-poll, not 25 s later.
    let stopped = Instant::now();
    mesh.shutdown().await.unwrap();
    let answered = tokio::time::timeout(10 * SECOND, poll).await;
    assert!(answered.is_ok(), "the long-poll outlived the hub");
    assert!(
        stopped.elapsed() < 10 * SECOND,
        "the hub took {:?} to stop",
        stopped.elapsed()
    );
}
