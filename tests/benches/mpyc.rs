//! MPyC wall time through the relay versus direct loopback: the same 3-party job
//! (`examples/mpyc/party.py`: a secure sum and a secure argmax), run alternately both ways.
//! Target: at most 1.3x. Run with `scripts/bench mpyc`.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use fedmesh_agent::demo;

const RUNS: usize = 7;

/// The direct baseline: the three parties dial each other's real ports on 127.0.0.1.
async fn direct(script: &str, python: &str) -> Duration {
    let orgs = ["org-a", "org-b", "org-c"];
    let base = 31_365;
    let peers: BTreeMap<String, Vec<String>> = orgs
        .iter()
        .enumerate()
        .map(|(i, org)| {
            (
                format!("{org}.collab-x.fedmesh"),
                vec![format!("127.0.0.1:{}", base + i)],
            )
        })
        .collect();
    let start = Instant::now();
    let mut children = Vec::new();
    for (i, org) in orgs.iter().enumerate() {
        let listen =
            serde_json::json!({ (base + i).to_string(): format!("127.0.0.1:{}", base + i) });
        children.push(
            tokio::process::Command::new(python)
                .arg(script)
                .env("FEDMESH_ORG", org)
                .env("FEDMESH_COLLAB", "collab-x")
                .env("FEDMESH_PARTY_INDEX", i.to_string())
                .env("FEDMESH_PARTIES", orgs.join(","))
                .env(
                    "FEDMESH_PEERS",
                    serde_json::to_string(&peers).expect("json"),
                )
                .env("FEDMESH_LISTEN", listen.to_string())
                .env("FEDMESH_MPC_BASE_PORT", base.to_string())
                .stdout(Stdio::null())
                .spawn()
                .expect("python"),
        );
    }
    for mut c in children {
        assert!(
            c.wait().await.expect("wait").success(),
            "direct MPyC run failed"
        );
    }
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let python = fedmesh_tests::python();
    let script = fedmesh_tests::repo_root().join("examples/mpyc/party.py");
    let tmp = tempfile::tempdir().expect("tmp");
    let mesh = demo::start(tmp.path(), &fedmesh_tests::mesh_options(), &demo::links())
        .await
        .expect("mesh");
    let command = format!("{} {}", python.display(), script.display());
    let (py, sc) = (
        python.to_string_lossy().into_owned(),
        script.to_string_lossy().into_owned(),
    );
    let (mut d, mut r) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        d.push(direct(&sc, &py).await);
        let start = Instant::now();
        let outcomes = demo::exec(&mesh, &command, Duration::from_secs(120), true)
            .await
            .expect("exec");
        assert!(
            outcomes.iter().all(|o| o.code == Some(0)),
            "relay MPyC run failed: {outcomes:?}"
        );
        r.push(start.elapsed());
    }
    let (d, r) = (median(d), median(r));
    println!("## MPyC 3-party job (secure sum + argmax), median of {RUNS} runs");
    println!("| path | wall time | vs direct |\n|---|---:|---:|");
    println!(
        "| direct loopback | {:.0} ms | 1.00x |",
        d.as_secs_f64() * 1e3
    );
    println!(
        "| fedmesh relay | {:.0} ms | {:.2}x |",
        r.as_secs_f64() * 1e3,
        r.as_secs_f64() / d.as_secs_f64()
    );
    mesh.shutdown().await.expect("shutdown");
}
