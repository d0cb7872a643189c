//! The vantage6 address API (`GET {API_PATH}/vpn/algorithm/addresses` on the agent's own
//! `--v6-listen` listener), driven by vantage6 4's own algorithm client (vantage6-algorithm-tools
//! 4.15.2, unmodified, in `.venv-v6`) for a three-organisation task with a parent run and child
//! runs; callers that are no known run, or hold a forged, unsigned, expired or other-task token,
//! are turned away; other paths get JSON errors or are forwarded to the vantage6 node proxy.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_agent::{
    mesh::{LocalMesh, NodeSpec},
    node::{Expose, v6::LocalRun},
};
use fedmesh_documents::{NodeRef, TaskRef};
use fedmesh_tests::{python_v6, repo_root};
use serde_json::{Value, json};

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

const ORGS: [&str; 3] = ["org-a/n1", "org-b/n1", "org-c/n1"];
/// The parent task: one central run at org-a, port 8000 "agg".
const PARENT: u64 = 5;
/// Its subtask: a run at every organisation, port 11366 "mpc".
const CHILD: u64 = 10;

/// A container token in vantage6 4's shape: HS256, claims under `sub`. The signature is
/// made up: only the vantage6 server could check it, and the agent does not rely on it.
fn token(header: &str, claims: Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-checkable-by-the-node")
    )
}

fn container_token(task_id: u64, organization_id: u64) -> String {
    token(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        json!({"sub": {"task_id": task_id, "organization_id": organization_id,
                       "node_id": organization_id, "collaboration_id": 1,
                       "image": "harbor2.vantage6.ai/demo/mpc"}}),
    )
}

struct Layout {
    mesh: LocalMesh,
    /// The source address of each run: (org index, task) → address.
    sources: BTreeMap<(usize, u64), IpAddr>,
}

async fn layout(dir: &std::path::Path) -> Layout {
    fedmesh_tests::subscribe();
    let opts = fedmesh_tests::mesh_options();
    let expose = |s: &str| -> Expose { s.parse().unwrap() };
    let specs: Vec<NodeSpec> = ORGS
        .iter()
        .enumerate()
        .map(|(i, node)| NodeSpec {
            node: n(node),
            organization_id: Some(i as u64 + 1),
            exposes: if i == 0 {
                vec![expose("8000:agg"), expose("11366:mpc")]
            } else {
                vec![expose("11366:mpc")]
            },
        })
        .collect();
    let mesh = LocalMesh::start(dir, &opts, &specs).await.unwrap();
    let task = |task_id, parent_id| Some(TaskRef { task_id, parent_id });
    let hour = Duration::from_secs(3600);
    let mut links = vec![];
    for from in ORGS {
        for to in ORGS.iter().filter(|t| **t != from) {
            links.push((from, *to, "11366:mpc", task(CHILD, Some(PARENT))));
        }
    }
    links.push((ORGS[1], ORGS[0], "8000:agg", task(PARENT, None)));
    links.push((ORGS[2], ORGS[0], "8000:agg", task(PARENT, None)));
    for (from, to, port, task) in &links {
        mesh.link(
            &n(from),
            &n(to),
            &[port.parse().unwrap()],
            hour,
            task.clone(),
        )
        .await
        .unwrap();
    }
    for (from, to, port, _) in &links {
        let port: fedmesh_documents::PortSpec = port.parse().unwrap();
        mesh.peer_addr(&n(from), &n(to), port.port, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Runs announced at their nodes, each with the address its container connects from.
    let mut sources = BTreeMap::new();
    let runs = [
        (0, PARENT, None, "8000:agg"),
        (0, CHILD, Some(PARENT), "11366:mpc"),
        (1, CHILD, Some(PARENT), "11366:mpc"),
        (2, CHILD, Some(PARENT), "11366:mpc"),
    ];
    for (k, (org, task_id, parent_id, port)) in runs.into_iter().enumerate() {
        let source: IpAddr = format!("127.{}.250.{}", opts.loopback_octet, k + 1)
            .parse()
            .unwrap();
        mesh.node(&n(ORGS[org]))
            .runs
            .announce(LocalRun {
                task_id,
                parent_id,
                source,
                ports: vec![port.parse().unwrap()],
                host: None,
                image: None,
            })
            .unwrap();
        sources.insert((org, task_id), source);
    }
    Layout { mesh, sources }
}

/// One address as `(ip, port, label, organization_id, task_id, parent_id)`.
type Row = (String, u64, String, u64, u64, Option<u64>);

fn rows(v: &Value) -> Vec<Row> {
    let Some(list) = v.as_array() else {
        panic!("not a list of addresses: {v}");
    };
    let mut out: Vec<Row> = list
        .iter()
        .map(|a| {
            (
                a["ip"].as_str().unwrap().to_owned(),
                a["port"].as_u64().unwrap(),
                a["label"].as_str().unwrap_or("").to_owned(),
                a["organization_id"].as_u64().unwrap(),
                a["task_id"].as_u64().unwrap(),
                a["parent_id"].as_u64(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Runs vantage6's algorithm client (or, with `helper`, the fedmesh_v6 package) as the run of
/// `task` at organisation `org`.
fn client_or_helper(l: &Layout, org: usize, task: u64, helper: bool) -> Value {
    let node = l.mesh.node(&n(ORGS[org]));
    let api = node.v6_addr.unwrap();
    let out = std::process::Command::new(python_v6())
        .arg(repo_root().join("tests/py/v6_client.py"))
        .env("HOST", format!("http://{}", api.ip()))
        .env("PORT", api.port().to_string())
        .env("API_PATH", "")
        .env("TOKEN", container_token(task, org as u64 + 1))
        .env("SOURCE", l.sources[&(org, task)].to_string())
        .env("HELPER", if helper { "1" } else { "" })
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn client(l: &Layout, org: usize, task: u64) -> Value {
    client_or_helper(l, org, task, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vantage6s_own_client_gets_what_vantage6s_server_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path()).await;

    for (caller, org) in ORGS.iter().enumerate() {
        let snap = l.mesh.node(&n(org)).snapshot.borrow().clone();
        // `ip`: the address the calling node dials for a run (its stable per-peer address);
        // a run of the calling node: the address it listens on.
        let ip = |org: usize| {
            if org == caller {
                "127.0.0.1".to_owned()
            } else {
                snap.peers[&n(ORGS[org])].ip.to_string()
            }
        };
        let child = |org: usize| -> Row {
            (
                ip(org),
                11366,
                "mpc".into(),
                org as u64 + 1,
                CHILD,
                Some(PARENT),
            )
        };
        let parent: Row = (ip(0), 8000, "agg".into(), 1, PARENT, None);
        let sorted = |mut v: Vec<Row>| {
            v.sort();
            v
        };
        let all_children = sorted(vec![child(0), child(1), child(2)]);
        let others = sorted((0..3).filter(|o| *o != caller).map(child).collect());
        let with_parent = sorted(vec![child(0), child(1), child(2), parent.clone()]);
        let failed = json!({"message": "Obtaining VPN addresses failed!"});

        // Expectations for a child run (task 10, parent 5), step by step through
        // vantage6-server 4.15.2 `server/resource/port.py`, `VPNAddress.get`: task_ids starts
        // as [own task] (l.300); include/only_children add/replace subtasks (l.333; task 10 has
        // none); include/only_parent add/replace the parent (l.343-355); only_siblings/only_self
        // reset to [own task] (l.356) and filter by organisation (l.365/367); a non-empty label
        // filters (l.371); more than one only_* is the one 400 (l.321), which the client turns
        // into {"message": "Obtaining VPN addresses failed!"}.
        let got = client(&l, caller, CHILD);
        let expect: [(&str, Vec<Row>); 17] = [
            ("", all_children.clone()),
            ("only_children", vec![]),
            ("only_parent", vec![parent.clone()]),
            ("only_siblings", others.clone()),
            ("only_self", vec![child(caller)]),
            ("include_children", all_children.clone()),
            ("include_parent", with_parent.clone()),
            ("include_children+include_parent", with_parent.clone()),
            ("only_children+include_children", vec![]),
            ("only_parent+include_parent", vec![parent.clone()]),
            ("only_children+include_parent", vec![parent.clone()]),
            ("only_parent+include_children", vec![parent.clone()]),
            ("only_siblings+include_parent", others.clone()),
            ("label=mpc", all_children.clone()),
            ("label=agg", vec![]),
            ("label=", all_children.clone()),
            ("include_parent+label=agg", vec![parent.clone()]),
        ];
        for (flags, want) in expect {
            assert_eq!(
                rows(&got[flags]),
                want,
                "caller org {caller}, flags {flags}"
            );
        }
        assert_eq!(got["only_self+only_siblings"], failed);
        assert_eq!(rows(&got["get_parent_address"]), vec![parent.clone()]);
        assert_eq!(rows(&got["get_child_addresses"]), vec![]);
        assert_eq!(rows(&got["get_sibling_addresses"]), others);
        assert_eq!(rows(&got["get_own_address"]), vec![child(caller)]);
        // The fedmesh_v6 package (vantage6 5 algorithms' stand-in for client.vpn) answers every
        // call exactly as vantage6's client does.
        assert_eq!(client_or_helper(&l, caller, CHILD, true), got);

        if caller == 0 {
            // The parent run (task 5, top level) at org-a: its subtask's runs are its
            // children; only_parent falls back to its own task (l.349: no parent, task_ids
            // stays [own task]); it has no siblings.
            let got = client(&l, 0, PARENT);
            for (flags, want) in [
                ("", vec![parent.clone()]),
                ("only_children", all_children.clone()),
                ("only_parent", vec![parent.clone()]),
                ("only_siblings", vec![]),
                ("only_self", vec![parent.clone()]),
                ("include_children", with_parent.clone()),
                ("include_parent", vec![parent.clone()]),
                ("only_children+include_parent", all_children.clone()),
                ("label=mpc", vec![]),
            ] {
                assert_eq!(rows(&got[flags]), want, "parent run, flags {flags}");
            }
            assert_eq!(rows(&got["get_child_addresses"]), all_children);
            assert_eq!(rows(&got["get_parent_address"]), vec![parent.clone()]);
        }
    }
    l.mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_callers_and_bad_tokens_learn_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path()).await;
    let api = l.mesh.node(&n(ORGS[1])).v6_addr.unwrap();
    let registered = l.sources[&(1, CHILD)];
    let stranger: IpAddr = "127.0.0.1".parse().unwrap();
    let ask = |source: IpAddr, auth: Option<String>, path: &'static str| async move {
        let http = reqwest::Client::builder()
            .local_address(source)
            .build()
            .unwrap();
        let mut req = http.get(format!("http://{api}{path}"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        (status, body)
    };
    let path = "/vpn/algorithm/addresses";
    let good = format!("Bearer {}", container_token(CHILD, 2));
    let (status, body) = ask(registered, Some(good.clone()), path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["addresses"].as_array().unwrap().len(), 3);

    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let cases: Vec<(&str, IpAddr, Option<String>, u16)> = vec![
        (
            "a valid token from no known run",
            stranger,
            Some(good.clone()),
            403,
        ),
        ("no token", registered, None, 401),
        (
            "alg none",
            registered,
            Some(format!(
                "Bearer {}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
                URL_SAFE_NO_PAD.encode(json!({"sub": {"task_id": CHILD}}).to_string())
            )),
            401,
        ),
        (
            "expired",
            registered,
            Some(format!(
                "Bearer {}",
                token(hs, json!({"exp": 1_000_000, "sub": {"task_id": CHILD}}))
            )),
            401,
        ),
        (
            "another task's token",
            registered,
            Some(format!("Bearer {}", container_token(PARENT, 2))),
            403,
        ),
        (
            "another organisation's token",
            registered,
            Some(format!("Bearer {}", container_token(CHILD, 3))),
            403,
        ),
        ("garbage", registered, Some("Bearer a.b.c".into()), 401),
    ];
    for (what, source, auth, want) in cases {
        let (status, body) = ask(source, auth, path).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(body.get("addresses").is_none(), "{what}: {body}");
        assert!(body["msg"].is_string(), "{what}: {body}");
    }
    // Every other path: a JSON error body (vantage6's client parses every answer as JSON).
    let (status, body) = ask(registered, Some(good.clone()), "/task/1").await;
    assert_eq!(status, 404);
    assert!(body["msg"].as_str().unwrap().contains("/task/1"), "{body}");

    // The run ends: its address is no caller any more.
    l.mesh.node(&n(ORGS[1])).runs.end(registered).unwrap();
    let (status, _) = ask(registered, Some(good), path).await;
    assert_eq!(status, 403);
    l.mesh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_requests_go_unchanged_to_the_vantage6_node_proxy() {
    use axum::{body::Bytes, http::HeaderMap, http::Method, http::Uri};
    fedmesh_tests::subscribe();
    // A stand-in node proxy that echoes what it received.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let echo = axum::Router::new().fallback(
        |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
            (
                axum::http::StatusCode::ACCEPTED,
                [("x-from", "node-proxy")],
                axum::Json(json!({
                    "method": method.as_str(),
                    "uri": uri.to_string(),
                    "auth": headers.get("authorization").and_then(|v| v.to_str().ok()),
                    "body": String::from_utf8_lossy(&body),
                })),
            )
        },
    );
    tokio::spawn(async move { axum::serve(proxy, echo).await });

    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = api.local_addr().unwrap();
    let (_tx, snapshot) =
        tokio::sync::watch::channel(std::sync::Arc::new(fedmesh_agent::node::Snapshot::default()));
    let state = fedmesh_agent::node::v6::V6State {
        node: n("org-a/n1"),
        snapshot,
        registry: fedmesh_agent::node::v6::Registry::new(),
        upstream: Some(format!("http://{proxy_addr}")),
        http: reqwest::Client::new(),
    };
    tokio::spawn(fedmesh_agent::node::v6::serve(
        api,
        state,
        String::new(),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{api_addr}/task?page=2"))
        .bearer_auth("tok")
        .body("{\"input\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(resp.headers()["x-from"], "node-proxy");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"method": "POST", "uri": "/task?page=2", "auth": "Bearer tok",
               "body": "{\"input\": 1}"})
    );
    // The address API itself is never forwarded: an unknown caller is refused here.
    let resp = http
        .get(format!("http://{api_addr}/vpn/algorithm/addresses"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_announces_and_ends_runs_over_http() {
    fedmesh_tests::subscribe();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = fedmesh_agent::node::v6::Registry::new();
    tokio::spawn(fedmesh_agent::node::v6::serve_announce(
        listener,
        registry.clone(),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let post = |path: &'static str, body: Value| {
        let req = http.post(format!("http://{addr}{path}")).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let run = json!({"task_id": 10, "parent_id": 5, "source": "172.17.0.5",
                     "ports": ["8888:mpc"]});
    assert_eq!(post("/runs", run.clone()).await.0, 201);
    let src: IpAddr = "172.17.0.5".parse().unwrap();
    assert_eq!(registry.by_source(src).unwrap().task_id, 10);
    // Refused, with the reason: a bad port, too many ports, an unknown field, another task on
    // an address that is taken.
    for (body, want) in [
        (
            json!({"task_id": 1, "source": "172.17.0.6", "ports": ["0"]}),
            "port",
        ),
        (
            json!({"task_id": 1, "source": "172.17.0.6", "ports": vec!["1"; 33]}),
            "ports",
        ),
        (
            json!({"task_id": 1, "source": "172.17.0.6", "admin": true}),
            "unknown field",
        ),
        (json!({"task_id": 11, "source": "172.17.0.5"}), "task 10"),
    ] {
        let (status, resp) = post("/runs", body.clone()).await;
        assert!(status == 400 || status == 409, "{body}: {status} {resp}");
        assert!(
            resp["msg"].as_str().unwrap().contains(want),
            "{body}: {resp}"
        );
    }
    assert_eq!(registry.all().len(), 1);
    let (status, resp) = post("/runs/end", json!({"task_id": 10})).await;
    assert_eq!(status, 200, "{resp}");
    assert!(registry.by_source(src).is_none());
}
