//! Relay memory per idle QUIC connection: an agent process (`FEDMESH_BIN`, default the release
//! build) accepting N connections from one member's certificate, held idle, then the same from a
//! revoked node's certificate. Prints the agent's RSS before, while held, and after they closed.
//!
//! `FEDMESH_BENCH_ARGS` adds flags to the agent (e.g. raised `--relay-max-*` caps, to measure
//! what each admitted connection costs); `FEDMESH_BENCH_CONNECTIONS` sets N (default 250).
//! Run with `cargo bench -p fedmesh-tests --bench relay_memory` after a release build.

use std::{path::PathBuf, time::Duration};

use fedmesh_agent::{enroll, owner::Owner};
use fedmesh_documents::{CollabPolicy, NodeRef};
use fedmesh_tests::{AgentProcess, connect_many};

const SECOND: Duration = Duration::from_secs(1);

fn n(s: &str) -> NodeRef {
    s.parse().expect("node name")
}

#[tokio::main]
async fn main() {
    fedmesh_tests::subscribe();
    let bin = std::env::var_os("FEDMESH_BIN").map_or_else(
        || fedmesh_tests::repo_root().join("target/release/fedmesh"),
        PathBuf::from,
    );
    let extra: Vec<String> = std::env::var("FEDMESH_BENCH_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let count: usize = std::env::var("FEDMESH_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let tmp = tempfile::tempdir().expect("tmp");
    let hub = fedmesh_tests::TestHub::start().await;
    let mut owner = Owner::create(
        &tmp.path().join("owner"),
        hub.address(),
        fedmesh_agent::owner::NewCollab {
            id: "bench".into(),
            owner_name: "bench".into(),
            online_ca: true,
            policy: CollabPolicy::default(),
        },
    )
    .await
    .expect("collaboration");
    let mut states = Vec::new();
    for node in ["org-a/n1", "org-b/n1"] {
        let token = owner
            .join_token(&n(node), None, 3600 * SECOND)
            .await
            .expect("token");
        states.push(
            enroll::enroll(&token, &tmp.path().join(node.replace('/', "-")), None)
                .await
                .expect("enroll"),
        );
    }
    let agent = AgentProcess::start(&bin, &states[1].dir, &extra);
    let relay = agent.relay;
    // Let it sync with the hub and settle.
    tokio::time::sleep(3 * SECOND).await;
    let pid = agent.pid();
    let identity = states[0].identity().expect("identity");
    let bundle = states[0].trust_bundle().expect("bundle");

    println!(
        "# relay memory, {} ({count} connections from one certificate)",
        bin.display()
    );
    println!("agent flags: {extra:?}\n");
    println!(
        "| connections from | accepted | refused | RSS idle (MiB) | RSS held (MiB) | per accepted connection (KiB) | RSS 5 s after closing (MiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for case in ["a member without a link", "a revoked node"] {
        if case == "a revoked node" {
            owner
                .revoke(&[], &[n("org-a/n1")], &[])
                .await
                .expect("revoke");
            tokio::time::sleep(3 * SECOND).await;
        }
        let idle = fedmesh_tests::rss_mib(pid);
        let server = fedmesh_certs::SpiffeId::new("bench", "org-b", "n1").expect("id");
        let (held, refused) = connect_many(&identity, &bundle, relay, &server, count).await;
        tokio::time::sleep(3 * SECOND).await;
        let loaded = fedmesh_tests::rss_mib(pid);
        let accepted = held.len();
        for c in &held {
            c.close(0u32.into(), b"done");
        }
        drop(held);
        tokio::time::sleep(5 * SECOND).await;
        let after = fedmesh_tests::rss_mib(pid);
        let per = if accepted > 0 {
            format!("{:.0}", (loaded - idle) * 1024.0 / accepted as f64)
        } else {
            "-".into()
        };
        println!(
            "| {case} | {accepted} | {refused} | {idle:.1} | {loaded:.1} | {per} | {after:.1} |"
        );
    }
}
