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

/// An owner's link policy `name` for runs of `image` on `ports` among `orgs`, each link for
/// at most `lifetime_secs`, in force for a day.
fn policy(
    name: &str,
    image: &str,
    ports: &[&str],
    orgs: &[&str],
    lifetime_secs: u64,
) -> LinkPolicy {
    LinkPolicy {
        collab: String::new(),
        name: name.into(),
        images: vec![image.into()],
        ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        orgs: orgs.iter().map(|&o| o.into()).collect(),
        max_lifetime_secs: lifetime_secs,
        not_after: jws::unix(std::time::SystemTime::now()) + 86_400,
        issued_at: 0,
    }
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
        .link_policy(policy(
            "mpc",
            IMG,
            &["11366:mpc", "11367:mpc"],
            &["org-a", "org-b", "org-c"],
            7200,
        ))
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
        .link_policy(policy(
            "short",
            SHORT,
            &["11366:mpc"],
            &["org-a", "org-b"],
            3,
        ))
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

/// An agent restarted without the runs it announced before (its registry starts empty) ends
/// them at start: their links end at the peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_ends_the_runs_it_no_longer_has() {
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let mut mesh = demo::start(tmp.path(), &fedmesh_tests::mesh_options(), &[])
        .await
        .unwrap();
    let [a, b] = ["org-a/n1", "org-b/n1"];
    mesh.owner
        .link_policy(policy(
            "mpc",
            IMG,
            &["11366:mpc"],
            &["org-a", "org-b"],
            7200,
        ))
        .await
        .unwrap();
    for node in [a, b] {
        announce(&mesh, node, 9, "127.0.0.19", IMG).await;
    }
    let want = vec![(a.to_owned(), b.to_owned())];
    mesh.node(&n(a))
        .wait_for(WAIT, |s| task_links(s, 9) == want)
        .await
        .unwrap();
    let handle = mesh.nodes.remove(&n(b)).unwrap();
    handle.shutdown().await.unwrap();
    // Stopped, its run is still announced: the link stands at org-a.
    assert_eq!(task_links(&mesh.node(&n(a)).snapshot.borrow(), 9), want);
    let restarted = Instant::now();
    let handle = fedmesh_agent::node::start(mesh.options[&n(b)].clone())
        .await
        .unwrap();
    mesh.nodes.insert(n(b), handle);
    mesh.node(&n(a))
        .wait_for(WAIT, |s| task_links(s, 9).is_empty())
        .await
        .unwrap();
    println!(
        "agent restarted without its run -> its links ended: {:?}",
        restarted.elapsed()
    );
    mesh.shutdown().await.unwrap();
}

/// A mocked Kubernetes API server for one node's task namespace (kube-rs's `tower-test`
/// client: there is no API server here): lists the pods and Jobs given, holds watches open,
/// and answers them with the event batches sent later.
mod kube_mock {
    use std::collections::{BTreeMap, VecDeque};

    use axum::http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    pub(super) const PODS: &str = "/api/v1/namespaces/vantage6-tasks/pods?";
    pub(super) const JOBS: &str = "/apis/batch/v1/namespaces/vantage6-tasks/jobs?";

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
    type Send = tower_test::mock::SendResponse<Response<Body>>;

    /// A vantage6 5 algorithm Job of `task` (its annotations, as vantage6-node 5 sets them).
    pub(super) fn job(name: &str, task: u64) -> Value {
        json!({
            "metadata": {
                "name": name, "namespace": "vantage6-tasks", "uid": format!("uid-{name}"),
                "resourceVersion": "1",
                "annotations": {"run_id": "3", "task_id": task.to_string(),
                                "task_parent_id": "", "action": "compute"},
            },
        })
    }

    /// Its pod in `phase`, listening on `ports`, running image `digest` (as the runtime
    /// reports what it pulled).
    pub(super) fn pod(
        job: &str,
        ip: &str,
        phase: &str,
        ports: &[(u16, &str)],
        digest: &str,
    ) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(p, name)| json!({"containerPort": p, "name": name}))
            .collect();
        json!({
            "metadata": {
                "name": format!("{job}-pod"), "namespace": "vantage6-tasks",
                "resourceVersion": "1",
                "labels": {"app": job, "role": "compute"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job,
                                     "uid": format!("uid-{job}"), "controller": true}],
            },
            "spec": {"containers": [{"name": "algorithm", "image": "registry.example/mpc",
                                     "ports": ports}]},
            "status": {"phase": phase, "podIP": ip,
                       "containerStatuses": [{"name": "algorithm", "image": "registry.example/mpc",
                           "imageID": format!("registry.example/mpc@{digest}"),
                           "ready": true, "restartCount": 0}]},
        })
    }

    fn lines(events: &[Value]) -> Body {
        let mut out = Vec::new();
        for e in events {
            out.extend(serde_json::to_vec(e).unwrap());
            out.push(b'\n');
        }
        Body::from(out)
    }

    /// Plays the API server until the client or the batches go away.
    pub(super) async fn serve(
        mut handle: Handle,
        pods: Vec<Value>,
        jobs: Vec<Value>,
        mut batches: mpsc::UnboundedReceiver<(&'static str, Vec<Value>)>,
    ) {
        let mut waiting: BTreeMap<&str, Send> = BTreeMap::new();
        let mut queued: BTreeMap<&str, VecDeque<Vec<Value>>> = BTreeMap::new();
        loop {
            tokio::select! {
                req = handle.next_request() => {
                    let Some((req, send)) = req else { return };
                    let uri = req.uri().to_string();
                    assert_eq!(req.method(), Method::GET, "read-only: {uri}");
                    let (kind, list, items) = if uri.starts_with(PODS) {
                        (PODS, "PodList", &pods)
                    } else if uri.starts_with(JOBS) {
                        (JOBS, "JobList", &jobs)
                    } else {
                        panic!("unexpected request {uri}");
                    };
                    if !uri.contains("watch=true") {
                        let body = json!({"kind": list, "apiVersion": "v1",
                                          "metadata": {"resourceVersion": "1"},
                                          "items": items});
                        send.send_response(Response::new(Body::from(
                            serde_json::to_vec(&body).unwrap(),
                        )));
                    } else if let Some(b) = queued.get_mut(kind).and_then(VecDeque::pop_front) {
                        send.send_response(Response::new(lines(&b)));
                    } else {
                        waiting.insert(kind, send);
                    }
                }
                batch = batches.recv() => {
                    let Some((kind, events)) = batch else { return };
                    match waiting.remove(kind) {
                        Some(send) => send.send_response(Response::new(lines(&events))),
                        None => queued.entry(kind).or_default().push_back(events),
                    }
                }
            }
        }
    }
}

/// vantage6 5: the runs come from each node's watch of algorithm pods and Jobs (through a
/// mocked Kubernetes API), with the image digest the runtime reports and, as vantage6 5 makes
/// them, no container ports (the policy's ports apply); a pod that finishes ends its node's
/// run, and its links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_links_follow_vantage6_5_pods() {
    use kube_mock::{PODS, job, pod, serve};
    fedmesh_tests::subscribe();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = demo::start(tmp.path(), &fedmesh_tests::mesh_options(), &[])
        .await
        .unwrap();
    let [a, b, c] = ["org-a/n1", "org-b/n1", "org-c/n1"];
    mesh.owner
        .link_policy(policy(
            "mpc",
            IMG,
            &["11366:mpc", "11367:mpc"],
            &["org-a", "org-b", "org-c"],
            7200,
        ))
        .await
        .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut batches = Vec::new();
    let started = Instant::now();
    // vantage6 5 declares no container ports on its algorithm pods: the policy's ports apply.
    for (i, node) in [a, b, c].into_iter().enumerate() {
        let (service, handle) = tower_test::mock::pair::<
            axum::http::Request<kube::client::Body>,
            axum::http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "vantage6-tasks");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let ip = format!("10.42.0.{}", i + 1);
        tokio::spawn(serve(
            handle,
            vec![pod("algo", &ip, "Running", &[], IMG)],
            vec![job("algo", demo::TASK_ID)],
            rx,
        ));
        let (registry, cancel) = (mesh.node(&n(node)).runs.clone(), cancel.clone());
        tokio::spawn(async move {
            fedmesh_agent::k8s::runs::watch(client, "vantage6-tasks", registry, cancel).await;
        });
        batches.push((tx, ip));
    }
    let expected = [
        (a, vec![(a, b), (a, c), (b, a), (c, a)]),
        (b, vec![(a, b), (b, a), (b, c), (c, b)]),
        (c, vec![(a, c), (b, c), (c, a), (c, b)]),
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
    let via = mesh.peer_addr(&n(a), &n(c), 11367, WAIT).await.unwrap();
    println!(
        "pods running -> task links in force at all three nodes: {:?}",
        started.elapsed()
    );

    // org-c's pod finishes.
    let ended = Instant::now();
    let (tx, ip) = &batches[2];
    let mut done = pod("algo", ip, "Succeeded", &[], IMG);
    done["metadata"]["resourceVersion"] = json!("2");
    tx.send((PODS, vec![json!({"type": "MODIFIED", "object": done})]))
        .unwrap();
    let ab = vec![(a.to_owned(), b.to_owned()), (b.to_owned(), a.to_owned())];
    for (node, left) in [(a, ab.clone()), (b, ab.clone()), (c, vec![])] {
        mesh.node(&n(node))
            .wait_for(WAIT, |s| task_links(s, demo::TASK_ID) == left)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(via).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener for org-c stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "pod finished -> its links ended, listener closed: {:?}",
        ended.elapsed()
    );
    cancel.cancel();
    mesh.shutdown().await.unwrap();
}
