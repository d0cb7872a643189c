//! The vantage6-compatible `GET /vpn/algorithm/addresses`, served by a running agent from the
//! links it verified, over HTTP and through the Python helper algorithms can use instead of the
//! vantage6 client.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_agent::{
    mesh::{LocalMesh, NodeSpec},
    node::Expose,
};
use fedmesh_documents::{NodeRef, TaskRef};
use fedmesh_tests::{python, repo_root};
use serde_json::{Value, json};

fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

/// A container token in vantage6 5's shape (claims under `sub`), unsigned.
fn token(task_id: u64, organization_id: u64) -> String {
    let claims = json!({"sub": {"task_id": task_id, "organization_id": organization_id}});
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// org-a runs task 10 (parent 5) with peers at org-b and org-c; task 5 ran at org-b; subtask 20
/// runs at org-c.
async fn mesh(dir: &std::path::Path) -> LocalMesh {
    fedmesh_tests::subscribe();
    let spec = |node: &str, id, exposes: Vec<Expose>| NodeSpec {
        node: n(node),
        organization_id: Some(id),
        exposes,
    };
    let mpc_at_a = Expose {
        port: 11365,
        label: Some("mpc".into()),
        target: "127.0.0.1:21365".into(),
    };
    let specs = [
        spec("org-a/n1", 1, vec![mpc_at_a]),
        spec("org-b/n1", 2, vec![]),
        spec("org-c/n1", 3, vec![]),
    ];
    let mesh = LocalMesh::start(dir, &fedmesh_tests::mesh_options(), &specs)
        .await
        .unwrap();
    let task = |task_id, parent_id| Some(TaskRef { task_id, parent_id });
    let hour = Duration::from_secs(3600);
    let links = [
        ("org-a/n1", "org-b/n1", "11366:mpc", task(10, Some(5))),
        ("org-a/n1", "org-c/n1", "11367:mpc", task(10, Some(5))),
        ("org-b/n1", "org-a/n1", "11365:mpc", task(10, Some(5))),
        ("org-a/n1", "org-b/n1", "8000:agg", task(5, None)),
        ("org-a/n1", "org-c/n1", "7000:child", task(20, Some(10))),
    ];
    for (from, to, port, task) in links {
        mesh.link(&n(from), &n(to), &[port.parse().unwrap()], hour, task)
            .await
            .unwrap();
    }
    for (to, port) in [
        ("org-b/n1", 11366),
        ("org-c/n1", 11367),
        ("org-b/n1", 8000),
        ("org-c/n1", 7000),
    ] {
        mesh.peer_addr(&n("org-a/n1"), &n(to), port, Duration::from_secs(10))
            .await
            .unwrap();
    }
    mesh
}

/// (ip:port, label, organization_id, task_id, parent_id) of each address, sorted.
fn summary(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}:{} {} org{} task{} parent{}",
                a["ip"].as_str().unwrap(),
                a["port"],
                a["label"].as_str().unwrap_or("-"),
                a["organization_id"],
                a["task_id"],
                a["parent_id"]
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_api_answers_every_flag_like_vantage6() {
    let tmp = tempfile::tempdir().unwrap();
    let mesh = mesh(tmp.path()).await;
    let a = mesh.node(&n("org-a/n1"));
    let snap = a.snapshot.borrow().clone();
    let ip = |org: &str| snap.peers[&n(org)].ip.to_string();
    let admin = a.admin_addr.unwrap();
    let http = reqwest::Client::new();
    let get = |query: &str, tok: Option<String>| {
        let mut req = http.get(format!("http://{admin}/vpn/algorithm/addresses{query}"));
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let ok = |query: &'static str| {
        let get = &get;
        async move {
            let (status, body) = get(query, Some(token(10, 1))).await;
            assert_eq!(status, 200, "{query}: {body}");
            summary(&body)
        }
    };
    let (b, c) = (ip("org-b/n1"), ip("org-c/n1"));
    let own = "127.0.0.1:21365 mpc org1 task10 parent5".to_owned();
    let sib_b = format!("{b}:11366 mpc org2 task10 parent5");
    let sib_c = format!("{c}:11367 mpc org3 task10 parent5");
    let parent = format!("{b}:8000 agg org2 task5 parentnull");
    let child = format!("{c}:7000 child org3 task20 parent10");
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    assert_eq!(
        ok("").await,
        sorted(vec![own.clone(), sib_b.clone(), sib_c.clone()])
    );
    assert_eq!(
        ok("?only_siblings=1").await,
        sorted(vec![sib_b.clone(), sib_c.clone()])
    );
    assert_eq!(ok("?only_self=1").await, vec![own.clone()]);
    assert_eq!(ok("?only_children=1").await, vec![child.clone()]);
    assert_eq!(ok("?only_parent=1").await, vec![parent.clone()]);
    assert_eq!(
        ok("?include_children=1").await,
        sorted(vec![
            own.clone(),
            sib_b.clone(),
            sib_c.clone(),
            child.clone()
        ])
    );
    assert_eq!(
        ok("?include_parent=1").await,
        sorted(vec![
            own.clone(),
            sib_b.clone(),
            sib_c.clone(),
            parent.clone()
        ])
    );
    assert_eq!(
        ok("?label=agg&include_parent=1").await,
        vec![parent.clone()]
    );
    assert_eq!(
        ok("?only_siblings=1&label=mpc").await,
        sorted(vec![sib_b.clone(), sib_c.clone()])
    );

    let (status, body) = get("?only_self=1&only_siblings=1", Some(token(10, 1))).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["msg"],
        "You can only specify one of the only_<...> parameters!"
    );
    let (status, body) = get("?only_parent=1&include_children=1", Some(token(10, 1))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get("", None).await;
    assert_eq!(status, 401);
    assert!(
        body["msg"].as_str().unwrap().contains("container token"),
        "{body}"
    );

    // The Python helper answers the same, from the environment vantage6 gives algorithms.
    let out = std::process::Command::new(python())
        .arg(repo_root().join("examples/vantage6/fedmesh_v6.py"))
        .env("HOST", format!("http://{}", admin.ip()))
        .env("PORT", admin.port().to_string())
        .env("API_PATH", "")
        .env("CONTAINER_TOKEN", token(10, 1))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_helper: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary(&json!({ "addresses": from_helper })), ok("").await);
    mesh.shutdown().await.unwrap();
}
