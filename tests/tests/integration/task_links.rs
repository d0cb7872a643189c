//! Task-lifetime links end to end: a real hub, three real agents, the owner's signed link
//! policy, runs announced at each node's announce endpoint (as a vantage6 4 node's operator
//! wires it) and published by the agents as node-signed run announcements. The links they grant
//! come into force at every node, carry a real 3-party MPyC computation, and end when one run
//! ends (open streams reset, listeners closed). A run of an image the policy does not list gets
//! no link, and an announcement one node signs for another is refused by the hub.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use fedmesh_agent::{
    demo,
    mesh::LocalMesh,
    node::{Snapshot, identity::Identity},
};
use fedmesh_documents::{
    Document, NodeRef, NodeSigner, Signer, TaskRef, jws,
    runs::{LinkPolicy, RunAnnouncement},
};
use fedmesh_tests::{python, repo_root};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMG: &str = "sha256:5e1f0c3a9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f0a1c3e5b7d9f1a3c5e7b9d0f";
const SHORT: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
const OTHER: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000bad";
/// Generous bounds for a loaded machine; the times taken are printed.
const WAIT: Duration = Duration::from_secs(10);

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

/// Task links of `task` the policy `mpc` grants in force at a node.
fn task_links(s: &Snapshot, task: u64) -> Vec<(String, String)> {
    granted(s, task, "mpc")
}

/// Task links of `task` the policy `policy` grants in force at a node.
fn granted(s: &Snapshot, task: u64, policy: &str) -> Vec<(String, String)> {
    let mut v: Vec<_> = s
        .links
        .iter()
        .filter(|l| l.terms.task.as_ref().is_some_and(|t| t.task_id == task))
        .filter(|l| l.approved_by == format!("link policy {policy}"))
        .map(|l| (l.terms.from.to_string(), l.terms.to.to_string()))
        .collect();
    v.sort();
    v
}

async fn post(addr: SocketAddr, path: &str, body: serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{path}: {}",
        resp.text().await.unwrap()
    );
}

/// Announces a run of `task` at `node` through its announce endpoint.
async fn announce(mesh: &LocalMesh, node: &str, task: u64, source: &str, image: &str) {
    let org = demo::orgs()
        .into_iter()
        .find(|o| o.node == n(node))
        .unwrap();
    let ports: Vec<String> = org.exposes.iter().map(ToString::to_string).collect();
    let addr = mesh.node(&n(node)).announce_addr.unwrap();
    post(
        addr,
        "/runs",
        json!({"task_id": task, "source": source, "ports": ports, "image": image}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_links_follow_announced_runs_through_a_real_hub() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = demo::start(tmp.path(), &fedmesh_tests::mesh_options(), &[])
        .await
        .unwrap();
    let [a, b, c] = ["org-a/n1", "org-b/n1", "org-c/n1"];
    mesh.owner
        .link_policy(LinkPolicy {
            collab: String::new(),
            name: "mpc".into(),
            images: vec![IMG.into()],
            ports: vec!["11366:mpc".parse().unwrap(), "11367:mpc".parse().unwrap()],
            orgs: vec!["org-a".into(), "org-b".into(), "org-c".into()],
            max_lifetime_secs: 7200,
            not_after: jws::unix(std::time::SystemTime::now()) + 86_400,
            issued_at: 0,
        })
        .await
        .unwrap();

    // The demo task's runs start at the three nodes: MPyC's links (lower party dials higher,
    // on the receiving run's ports the policy lists) come into force everywhere.
    let started = Instant::now();
    for node in [a, b, c] {
        announce(&mesh, node, demo::TASK_ID, "127.0.0.11", IMG).await;
    }
    let expected = [
        (a, vec![(a, b), (a, c)]),
        (b, vec![(a, b), (b, c), (c, b)]),
        (c, vec![(a, c), (b, c), (c, b)]),
    ];
    for (node, links) in &expected {
        let want: Vec<(String, String)> = links
            .iter()
            .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
            .collect();
        mesh.node(&n(node))
            .wait_for(WAIT, |s| task_links(s, demo::TASK_ID) == want)
            .await
            .unwrap();
    }
    for (from, to, port) in [(a, b, 11366), (a, c, 11367), (b, c, 11367)] {
        mesh.peer_addr(&n(from), &n(to), port, WAIT).await.unwrap();
    }
    let in_force = started.elapsed();
    println!("announce -> task links in force and listening at all three nodes: {in_force:?}");

    // A real 3-party MPyC computation through them.
    let script = format!(
        "{} {}",
        python().display(),
        repo_root().join("examples/mpyc/party.py").display()
    );
    let outcomes = demo::exec(&mesh, &script, Duration::from_secs(120), true)
        .await
        .unwrap();
    let mut sums: Vec<&str> = outcomes
        .iter()
        .flat_map(|o| o.output.iter())
        .filter(|l| l.contains("sum="))
        .map(String::as_str)
        .collect();
    sums.sort_unstable();
    for o in &outcomes {
        assert_eq!(o.code, Some(0), "{}: {:?}", o.node, o.output);
    }
    assert_eq!(
        sums,
        [
            "party 0: sum=67 argmax=1",
            "party 1: sum=67 argmax=1",
            "party 2: sum=67 argmax=1"
        ]
    );

    // A run of an image the policy does not list gets no link; a listed one beside it does.
    for node in [a, b] {
        announce(&mesh, node, 2, "127.0.0.12", OTHER).await;
        announce(&mesh, node, 3, "127.0.0.13", IMG).await;
    }
    let snap = mesh
        .node(&n(a))
        .wait_for(WAIT, |s| !task_links(s, 3).is_empty())
        .await
        .unwrap();
    assert_eq!(task_links(&snap, 3), [(a.to_owned(), b.to_owned())]);
    assert!(task_links(&snap, 2).is_empty(), "{:?}", snap.links);
    let snap = mesh.node(&n(b)).snapshot.borrow().clone();
    assert!(task_links(&snap, 2).is_empty(), "{:?}", snap.links);

    // A policy with a short lifetime: its link ends when the lifetime passes, with no new
    // document (the node plans for the earliest end).
    mesh.owner
        .link_policy(LinkPolicy {
            collab: String::new(),
            name: "short".into(),
            images: vec![SHORT.into()],
            ports: vec!["11366:mpc".parse().unwrap()],
            orgs: vec!["org-a".into(), "org-b".into()],
            max_lifetime_secs: 3,
            not_after: jws::unix(std::time::SystemTime::now()) + 86_400,
            issued_at: 0,
        })
        .await
        .unwrap();
    for node in [a, b] {
        announce(&mesh, node, 5, "127.0.0.15", SHORT).await;
    }
    let snap = mesh
        .node(&n(a))
        .wait_for(WAIT, |s| !granted(s, 5, "short").is_empty())
        .await
        .unwrap();
    let not_after = snap
        .links
        .iter()
        .find(|l| l.approved_by == "link policy short")
        .unwrap()
        .terms
        .not_after;
    mesh.node(&n(a))
        .wait_for(WAIT, |s| granted(s, 5, "short").is_empty())
        .await
        .unwrap();
    let late = std::time::SystemTime::now()
        .duration_since(fedmesh_certs::time::from_unix(not_after))
        .unwrap_or_default();
    println!("lifetime passed -> task link ended {late:?} after its end time");

    // A run org-c signs in org-b's name is refused by the hub.
    let state = mesh.state(&n(c)).unwrap();
    let identity = Identity::load(&state).unwrap();
    let forged = Document::RunAnnouncement(RunAnnouncement {
        collab: mesh.owner.collab.id.clone(),
        node: n(b),
        task: TaskRef {
            task_id: 4,
            parent_id: None,
        },
        image: IMG.into(),
        ports: vec!["11366:mpc".parse().unwrap()],
        started_at: jws::unix(std::time::SystemTime::now()),
    });
    let signer = NodeSigner::new(identity.tls.chain().to_vec(), identity.key().unwrap());
    let jws = jws::sign(&forged, &Signer::Node(&signer)).unwrap();
    let err = identity
        .hub_client(&state)
        .unwrap()
        .submit(&mesh.owner.collab.id, jws)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(
        err.to_string()
            .contains("signed by org-c/n1 but speaks for org-b/n1"),
        "{err}"
    );

    // An open stream from org-a to org-c's run, through the task link.
    let target = mesh.options[&n(c)]
        .exposes
        .iter()
        .find(|e| e.port == 11367)
        .unwrap()
        .target
        .clone();
    let echo = tokio::net::TcpListener::bind(&target).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let via = mesh.peer_addr(&n(a), &n(c), 11367, WAIT).await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(via).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // org-c's run ends: its links end at every node, the open stream is reset and the
    // listener for org-c closes; org-a and org-b keep theirs.
    let ended = Instant::now();
    post(
        mesh.node(&n(c)).announce_addr.unwrap(),
        "/runs/end",
        json!({"task_id": demo::TASK_ID}),
    )
    .await;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the open stream outlived the run's end");
    let stream_closed = ended.elapsed();
    for (node, left) in [
        (a, vec![(a.to_owned(), b.to_owned())]),
        (b, vec![(a.to_owned(), b.to_owned())]),
        (c, vec![]),
    ] {
        mesh.node(&n(node))
            .wait_for(WAIT, |s| task_links(s, demo::TASK_ID) == left)
            .await
            .unwrap();
    }
    let links_ended = ended.elapsed();
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(via).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener for org-c stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener_closed = ended.elapsed();
    println!(
        "run end -> open stream closed: {stream_closed:?}, links ended at all three nodes: \
         {links_ended:?}, listener closed: {listener_closed:?}"
    );
    let snap = mesh.node(&n(a)).snapshot.borrow().clone();
    assert!(
        !snap
            .peers
            .get(&n(c))
            .is_some_and(|p| p.ports.iter().any(|p| p.port == 11367)),
        "{:?}",
        snap.peers
    );
    mesh.shutdown().await.unwrap();
}
