//! Control-plane benchmark: one hub and N node agents, each its own `fedmesh` process (release
//! build), on loopback; the owner in this process (its commands also as `fedmesh` processes).
//!
//! For each N (default 10, 50, 100; `FEDMESH_BENCH_NODES=10,50`), links in a ring (node i →
//! node i+1, so every agent has two), then:
//!
//! - start-up: all agents started at once; wall time until every agent has both links in
//!   force, and the CPU each used until then (and the hub's);
//! - idle: CPU per agent and for the hub over 30 s, and RSS;
//! - approve and revoke to both ends: from the owner's submission until both agents' link
//!   counts moved (polling their `/metrics` every 2 ms), 10 of each;
//! - with N = 10 only: owner command time (`fedmesh link approve` and `fedmesh link revoke`, as
//!   processes) against the hub's history grown to 1,000 and 10,000 documents (pending link
//!   requests), with the owner's kept ledger and without it, and the CPU the agents spent
//!   following those documents.
//!
//! Run with `scripts/bench control` (builds the release binary first).

use fedmesh_tests::{KillOnDrop, enrolled_collab, release_fedmesh};
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use fedmesh_agent::owner::{self, HubAddress, Owner};
use fedmesh_documents::{Document, LinkRequest, NodeRef, OwnerKey, Signer, jws};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: Duration = Duration::from_secs(1);
const COLLAB: &str = "bench";

fn n(s: &str) -> NodeRef {
    s.parse().expect("node name")
}

fn node_name(i: usize) -> String {
    format!("org-{i}/n1")
}

/// CPU time a process has used, summed over its threads (`/proc/<pid>/task/*/schedstat`,
/// nanoseconds; `/proc/<pid>/stat` counts in 10 ms ticks, too coarse for an agent's start-up).
/// Threads that already ended are not counted.
fn cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `GET path` over plain HTTP/1.0; the body.
async fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = tcp.read_to_string(&mut response).await;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// Links in force at the agent with admin address `addr` (none while it does not answer).
async fn links(addr: SocketAddr) -> Option<u64> {
    get(addr, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with("fedmesh_links_active "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Waits until both agents count `want` links; the time it took from `since`.
async fn both_at(admins: [SocketAddr; 2], want: [u64; 2], since: Instant) -> Duration {
    let deadline = since + 30 * SECOND;
    loop {
        let (a, b) = tokio::join!(links(admins[0]), links(admins[1]));
        if a == Some(want[0]) && b == Some(want[1]) {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "no convergence in 30 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn p90(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The hub process, its address, and the owner.
struct Collab {
    hub: KillOnDrop,
    owner: Owner,
    owner_dir: PathBuf,
}

async fn collab(dir: &Path, nodes: usize) -> Collab {
    let mut hub = Command::new(release_fedmesh())
        .args(["--log", "warn", "hub", "--init", "--listen", "127.0.0.1:0"])
        .args([
            "--max-connections",
            "8192",
            "--max-connections-per-ip",
            "8192",
        ])
        .args(["--requests-per-ip-burst", "1000000"])
        .args(["--writes-per-identity-burst", "1000000"])
        .arg("--data")
        .arg(dir.join("hub"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hub");
    let mut lines = BufReader::new(hub.stdout.take().expect("stdout")).lines();
    let mut line = || lines.next().expect("banner").expect("banner");
    let url = line().replace("hub listening on ", "");
    let pin = line().replace("hub pin ", "");
    let owner_dir = dir.join("owner");
    let owner = enrolled_collab(
        &owner_dir,
        HubAddress { url, pin },
        COLLAB,
        (0..nodes).map(|i| (node_name(i), dir.join(format!("node-{i}")))),
    )
    .await;
    Collab {
        hub: KillOnDrop(hub),
        owner,
        owner_dir,
    }
}

async fn link(owner: &Owner, from: usize, to: usize, port: u16) -> String {
    let terms = owner::terms(
        COLLAB,
        &n(&node_name(from)),
        &n(&node_name(to)),
        &[port.to_string().parse().expect("port")],
        3600 * SECOND,
        None,
    )
    .expect("terms");
    let terms = owner.request(terms).await.expect("request");
    owner.approve(&terms.id).await.expect("approve");
    terms.id
}

/// Starts agent `i`; returns it and its admin address (from its banner).
fn start_agent(dir: &Path, i: usize) -> (KillOnDrop, SocketAddr) {
    let mut child = Command::new(release_fedmesh())
        .args(["--log", "warn", "node", "--state"])
        .arg(dir.join(format!("node-{i}")))
        .args([
            "--relay-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--loopback-pool",
            &format!("127.{}.{}.0/24", 100 + i / 200, i % 200 + 1),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node");
    let mut banner = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut banner)
        .expect("banner");
    let admin = banner
        .split("admin http://")
        .nth(1)
        .and_then(|rest| rest.split([',', '\n']).next())
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no admin address in the banner {banner:?}"));
    (KillOnDrop(child), admin)
}

/// One row of the scale table.
struct Row {
    nodes: usize,
    startup_wall: Duration,
    startup_cpu_total: Duration,
    startup_cpu_max: Duration,
    hub_startup_cpu: Duration,
    idle_agent_mean: f64,
    idle_agent_max: f64,
    idle_hub: f64,
    rss_median_kib: u64,
    rss_max_kib: u64,
    hub_rss_kib: u64,
    approve: Vec<f64>,
    revoke: Vec<f64>,
}

async fn scale(nodes: usize, history: bool) -> Row {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let c = collab(dir, nodes).await;
    for i in 0..nodes {
        link(&c.owner, i, (i + 1) % nodes, 9000).await;
    }
    let hub_cpu_before = cpu(c.hub.pid());

    // Start-up: every agent at once, until each has its two links.
    let started = Instant::now();
    let handles: Vec<_> = (0..nodes)
        .map(|i| {
            let dir = dir.to_owned();
            std::thread::spawn(move || start_agent(&dir, i))
        })
        .collect();
    let agents: Vec<(KillOnDrop, SocketAddr)> = handles
        .into_iter()
        .map(|h| h.join().expect("agent started"))
        .collect();
    for (_, admin) in &agents {
        let deadline = started + 300 * SECOND;
        while links(*admin).await != Some(2) {
            assert!(Instant::now() < deadline, "agents did not sync in 300 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let startup_wall = started.elapsed();
    let startup: Vec<Duration> = agents.iter().map(|(p, _)| cpu(p.pid())).collect();
    let hub_startup_cpu = cpu(c.hub.pid()).saturating_sub(hub_cpu_before);

    // Idle.
    tokio::time::sleep(5 * SECOND).await;
    let window = 30 * SECOND;
    let before: Vec<Duration> = agents.iter().map(|(p, _)| cpu(p.pid())).collect();
    let hub_before = cpu(c.hub.pid());
    tokio::time::sleep(window).await;
    let share = |d: Duration| d.as_secs_f64() / window.as_secs_f64() * 100.0;
    let idle: Vec<f64> = agents
        .iter()
        .zip(&before)
        .map(|((p, _), b)| share(cpu(p.pid()).saturating_sub(*b)))
        .collect();
    let idle_hub = share(cpu(c.hub.pid()).saturating_sub(hub_before));
    let mut rss: Vec<u64> = agents.iter().map(|(p, _)| rss_kib(p.pid())).collect();
    rss.sort_unstable();

    // Approve and revoke to both ends: links between i and i+2 (not in the ring).
    let mut approve = Vec::new();
    let mut revoke = Vec::new();
    for k in 0..10 {
        let (from, to) = ((k * 7) % nodes, (k * 7 + 2) % nodes);
        let admins = [agents[from].1, agents[to].1];
        let terms = owner::terms(
            COLLAB,
            &n(&node_name(from)),
            &n(&node_name(to)),
            &["9100".parse().expect("port")],
            3600 * SECOND,
            None,
        )
        .expect("terms");
        c.owner.request(terms.clone()).await.expect("request");
        let t0 = Instant::now();
        c.owner.approve(&terms.id).await.expect("approve");
        approve.push(ms(both_at(admins, [3, 3], t0).await));
        let t0 = Instant::now();
        c.owner
            .revoke(std::slice::from_ref(&terms.id), &[], &[])
            .await
            .expect("revoke");
        revoke.push(ms(both_at(admins, [2, 2], t0).await));
    }

    if history {
        owner_commands(&c, &agents).await;
    }
    let row = Row {
        nodes,
        startup_wall,
        startup_cpu_total: startup.iter().sum(),
        startup_cpu_max: startup.iter().max().copied().unwrap_or_default(),
        hub_startup_cpu,
        idle_agent_mean: idle.iter().sum::<f64>() / idle.len() as f64,
        idle_agent_max: idle.iter().copied().fold(0.0, f64::max),
        idle_hub,
        rss_median_kib: rss[rss.len() / 2],
        rss_max_kib: rss[rss.len() - 1],
        hub_rss_kib: rss_kib(c.hub.pid()),
        approve,
        revoke,
    };
    drop(agents);
    drop(c);
    row
}

/// Runs `fedmesh <args>` and returns how long it took.
fn timed(args: &[&str]) -> Duration {
    let t0 = Instant::now();
    let out = Command::new(release_fedmesh())
        .args(["--log", "warn"])
        .args(args)
        .output()
        .expect("run fedmesh");
    assert!(
        out.status.success(),
        "fedmesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed()
}

/// `count` owner-signed link requests among the first ten nodes (pending, so they stay in the
/// history), submitted 16 at a time; returns their ids.
async fn grow(c: &Collab, key: &Arc<OwnerKey>, from: usize, count: usize) -> Vec<String> {
    let hub = hub_reader(c, key);
    let mut ids = Vec::with_capacity(count);
    let mut tasks = tokio::task::JoinSet::new();
    for k in from..from + count {
        let a = k % 10;
        let b = (a + 1 + (k / 10) % 9) % 10;
        let terms = owner::terms(
            COLLAB,
            &n(&node_name(a)),
            &n(&node_name(b)),
            &[(10_000 + k as u16).to_string().parse().expect("port")],
            3600 * SECOND,
            None,
        )
        .expect("terms");
        ids.push(terms.id.clone());
        let doc = Document::LinkRequest(LinkRequest {
            terms,
            requested_by: "bench".into(),
            requested_at: jws::unix(std::time::SystemTime::now()),
        });
        let (hub, key) = (hub.clone(), key.clone());
        tasks.spawn(async move {
            let signed = jws::sign(&doc, &Signer::Owner(&key)).expect("sign");
            hub.submit(COLLAB, signed).await.expect("submit");
        });
        while tasks.len() >= 16 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    ids
}

/// A hub client reading as the owner.
fn hub_reader(c: &Collab, key: &OwnerKey) -> fedmesh_agent::hub::client::HubClient {
    let claims = fedmesh_agent::hub::api::OwnerToken {
        collab: COLLAB.into(),
        aud: fedmesh_agent::hub::api::OWNER_TOKEN_AUDIENCE.into(),
        exp: jws::unix(std::time::SystemTime::now()) + 3600,
    };
    let token = jws::sign_claims(&claims, &Signer::Owner(key)).expect("token");
    fedmesh_agent::hub::client::HubClient::new(
        &c.owner.hub_address.url,
        &c.owner.hub_address.pin,
        None,
    )
    .expect("client")
    .with_owner_token(token)
}

/// Documents the hub holds now.
async fn stored(c: &Collab, key: &OwnerKey) -> usize {
    let hub = hub_reader(c, key);
    let (mut since, mut count) = (0, 0);
    loop {
        let page = hub.docs(COLLAB, since, Duration::ZERO).await.expect("docs");
        if page.docs.is_empty() {
            return count;
        }
        count += page.docs.len();
        since = page.cursor;
    }
}

async fn owner_commands(c: &Collab, agents: &[(KillOnDrop, SocketAddr)]) {
    let key = Arc::new(
        OwnerKey::from_pem(
            &std::fs::read_to_string(c.owner_dir.join("owner-key.pem")).expect("owner key"),
        )
        .expect("owner key"),
    );
    let dir = c.owner_dir.to_str().expect("utf-8 path");
    let ledger = c.owner_dir.join("ledger.json");
    println!(
        "\n| documents at the hub | `link approve` (kept ledger), median / p90 | `link revoke` (kept ledger), median / p90 | `link approve` without a kept ledger (median of 3) | agents' CPU to follow the documents added (10 agents) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let mut added = 0;
    for target in [0usize, 1_000, 10_000] {
        let now = stored(c, &key).await;
        let count = target.saturating_sub(now).max(16);
        let cpu_before: Duration = agents.iter().map(|(p, _)| cpu(p.pid())).sum();
        let mut pending = grow(c, &key, added, count).await;
        added += count;
        // Let the agents take them in before measuring the owner.
        tokio::time::sleep(5 * SECOND).await;
        let agents_cpu = agents
            .iter()
            .map(|(p, _)| cpu(p.pid()))
            .sum::<Duration>()
            .saturating_sub(cpu_before);
        let held = stored(c, &key).await;
        // The owner's kept ledger catches up once (as any first command after others would).
        c.owner.ledger().await.expect("ledger");
        let (mut approve, mut revoke, mut cold) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let id = pending.pop().expect("pending request");
            approve.push(ms(timed(&["link", "approve", &id, "--dir", dir])));
            revoke.push(ms(timed(&["link", "revoke", &id, "--dir", dir])));
        }
        for _ in 0..3 {
            let id = pending.pop().expect("pending request");
            let _ = std::fs::remove_file(&ledger);
            cold.push(ms(timed(&["link", "approve", &id, "--dir", dir])));
        }
        println!(
            "| {held} | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} ms | {:.2} s for {count} |",
            median(&mut approve),
            p90(&mut approve),
            median(&mut revoke),
            p90(&mut revoke),
            median(&mut cold),
            agents_cpu.as_secs_f64(),
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nodes: Vec<usize> = std::env::var("FEDMESH_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 50, 100]);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "control plane, {} CPUs, load average at start: {load}",
        num_cpus()
    );
    let mut rows = Vec::new();
    for &count in &nodes {
        let row = scale(count, count == 10).await;
        rows.push(row);
    }
    println!(
        "\n| N | start-up wall (all synced) | start-up CPU, all agents | per agent (mean / max) | hub start-up CPU | idle CPU per agent (mean / max) | idle CPU hub | RSS per agent (median / max) | hub RSS | approve → both ends (median / p90) | revoke → both ends (median / p90) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mut r in rows {
        println!(
            "| {} | {:.1} s | {:.2} s | {:.0} / {:.0} ms | {:.2} s | {:.3} / {:.3} % | {:.2} % | {:.1} / {:.1} MiB | {:.1} MiB | {:.0} / {:.0} ms | {:.0} / {:.0} ms |",
            r.nodes,
            r.startup_wall.as_secs_f64(),
            r.startup_cpu_total.as_secs_f64(),
            ms(r.startup_cpu_total) / r.nodes as f64,
            ms(r.startup_cpu_max),
            r.hub_startup_cpu.as_secs_f64(),
            r.idle_agent_mean,
            r.idle_agent_max,
            r.idle_hub,
            r.rss_median_kib as f64 / 1024.0,
            r.rss_max_kib as f64 / 1024.0,
            r.hub_rss_kib as f64 / 1024.0,
            median(&mut r.approve),
            p90(&mut r.approve),
            median(&mut r.revoke),
            p90(&mut r.revoke),
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at the end: {load}");
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
