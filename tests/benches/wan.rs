//! Relay benchmark between two sites: two network namespaces joined by a 1500-byte-MTU link,
//! with direct TCP (Cubic and BBR), an stunnel TLS 1.3 tunnel and the relay (release agents)
//! measured in the same run, on three link profiles:
//!
//! | profile | link |
//! |---|---|
//! | LAN | a veth pair, no shaping (CPU-bound) |
//! | WAN | 20 ms RTT, 1 Gbit/s bottleneck |
//! | lossy | 40 ms RTT, 200 Mbit/s bottleneck, 0.5% random loss |
//!
//! This kernel has no `sch_netem`: the shaped profiles run over two TUN devices joined by a
//! user-space link emulator (`wanlink.c` beside this file: a drop-tail bottleneck queue of
//! 1,000 full-size packets, rate, random loss, one-way delay). The emulator itself costs CPU on
//! the same machine, so every path pays it alike.
//!
//! Printed per profile: throughput (iperf3, one stream, 10 s), CPU-seconds per GB of each
//! tunnel's two processes, bottleneck drops, 1 KiB ping-pong p50/p90/p99, and the first-byte
//! time of new connections (connect, 1-byte echo), with ratios against direct TCP and stunnel.
//! The ping-pong of each relay variant is taken in turns with direct TCP's and stunnel's (a
//! connection each, a thousand rounds at a time on the LAN), so that a noisy moment of the
//! machine falls on all three alike; direct TCP's and stunnel's rows pool their turns with
//! every variant.
//!
//! Run with `scripts/bench wan`: it builds the agent and the emulator, makes the namespaces and
//! links, runs this inside the first site's namespace, and removes them afterwards. Root only.

#[path = "common/sites.rs"]
mod sites;

use fedmesh_tests::{
    KillOnDrop, cpu_seconds, enrolled_collab, first_bytes, link_a_to_b, pct, ping_pong_in_turns,
    release_fedmesh,
};
use sites::{
    LinkCounters, QUEUE_BYTES, Shaper, drops_cell, iperf_received, print_drop_timeline, serve_echo,
    stunnel,
};
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use fedmesh_agent::owner::HubAddress;

const SECOND: Duration = Duration::from_secs(1);
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7100;
const RELAY_PORT: u16 = 4433;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: run with `scripts/bench wan`"))
}

/// A command run in the second site's namespace.
fn in_b(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &env("FEDMESH_WAN_NS_B")])
        .arg(program);
    c
}

#[derive(Clone, Copy)]
struct Profile {
    name: &'static str,
    /// (RTT µs, rate bit/s, loss ppm); `None`: the veth pair.
    shaped: Option<(u64, u64, u64)>,
    a: &'static str,
    b: &'static str,
    /// Ping-pong rounds per path, taken in turns of `turn` rounds with the other paths.
    pings: usize,
    turn: usize,
    first_bytes: usize,
}

const PROFILES: [Profile; 3] = [
    Profile {
        name: "LAN (veth, no shaping)",
        shaped: None,
        a: "10.77.1.1",
        b: "10.77.1.2",
        pings: 20_000,
        turn: 1000,
        first_bytes: 200,
    },
    Profile {
        name: "WAN (20 ms RTT, 1 Gbit/s)",
        shaped: Some((20_000, 1_000_000_000, 0)),
        a: "10.77.2.1",
        b: "10.77.2.2",
        pings: 200,
        turn: 50,
        first_bytes: 30,
    },
    Profile {
        name: "lossy (40 ms RTT, 200 Mbit/s, 0.5% loss)",
        shaped: Some((40_000, 200_000_000, 5_000)),
        a: "10.77.2.1",
        b: "10.77.2.2",
        pings: 100,
        turn: 25,
        first_bytes: 30,
    },
];

/// A hub in the second site, an owner and two enrolled nodes with a link for the iperf3 and
/// echo ports.
struct Site {
    _hub: KillOnDrop,
    dir: PathBuf,
}

async fn site(p: &Profile, dir: &Path) -> Site {
    let mut hub = in_b(release_fedmesh())
        .args([
            "--log",
            "warn",
            "hub",
            "--init",
            "--listen",
            &format!("{}:0", p.b),
            "--data",
        ])
        .arg(dir.join("hub"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hub");
    let mut lines = BufReader::new(hub.stdout.take().expect("stdout")).lines();
    let mut banner = || lines.next().expect("banner").expect("banner");
    let url = banner().replace("hub listening on ", "");
    let pin = banner().replace("hub pin ", "");
    let hub = KillOnDrop(hub);
    let owner = enrolled_collab(
        &dir.join("owner"),
        HubAddress { url, pin },
        "wan",
        ["org-a/n1", "org-b/n1"].map(|node| (node.to_owned(), dir.join(node.replace('/', "-")))),
    )
    .await;
    link_a_to_b(&owner, "wan", &[IPERF_PORT, ECHO_PORT]).await;
    Site {
        _hub: hub,
        dir: dir.to_owned(),
    }
}

/// Two agents (with `flags`); returns them and org-a's local addresses for iperf3 and echo.
async fn agents(
    p: &Profile,
    s: &Site,
    flags: &[String],
) -> (KillOnDrop, KillOnDrop, SocketAddr, SocketAddr) {
    let peers = s.dir.join("org-a-n1/peers.json");
    let _ = std::fs::remove_file(&peers);
    let start = |mut c: Command, name: &str, ip: &str, extra: &[String]| {
        c.args(["--log", "warn", "node", "--state"])
            .arg(s.dir.join(name))
            .args(["--relay-listen", &format!("{ip}:{RELAY_PORT}")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--loopback-pool", "127.99.1.0/24"])
            .args(flags)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .expect("start node")
    };
    let b = start(
        in_b(release_fedmesh()),
        "org-b-n1",
        p.b,
        &[
            "--expose".into(),
            format!("{IPERF_PORT}=127.0.0.1:{IPERF_PORT}"),
            "--expose".into(),
            format!("{ECHO_PORT}=127.0.0.1:{ECHO_PORT}"),
        ],
    );
    let a = start(Command::new(release_fedmesh()), "org-a-n1", p.a, &[]);
    let (iperf, echo) =
        fedmesh_tests::relay_addresses(&peers, "org-b.wan.fedmesh", IPERF_PORT, ECHO_PORT).await;
    (a, b, iperf, echo)
}

/// One throughput run's figures.
#[derive(Clone, Default)]
struct Run {
    gbits: f64,
    cpu_per_gb: Option<f64>,
    /// What the link emulator counted during the run (shaped profiles).
    link: Option<LinkCounters>,
}

/// iperf3 (one stream, 10 s, `cc` on the sending socket) from site A to `to`; CPU of `pids`.
fn iperf(to: SocketAddr, cc: &str, pids: &[u32], shaper: &mut Option<Shaper>) -> Run {
    let _server = in_b("iperf3")
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .expect("iperf3 server");
    std::thread::sleep(SECOND / 2);
    if let Some(s) = shaper.as_mut() {
        s.counters();
    }
    let cpu = cpu_seconds(pids);
    let out = Command::new("iperf3")
        .args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(["-t", "10", "-J", "-C", cc])
        .output()
        .expect("iperf3");
    let cpu = cpu_seconds(pids) - cpu;
    let link = shaper.as_mut().map(Shaper::counters);
    let (bytes, gbits) = iperf_received(to, &out.stdout);
    Run {
        gbits,
        cpu_per_gb: (!pids.is_empty() && bytes > 0.0).then(|| cpu / (bytes / 1e9)),
        link,
    }
}

/// Relay variants from `FEDMESH_WAN_RELAY`: each word a congestion controller (`bbr`,
/// `cubic-tolerant`, ...) or `flag=value` (`streams-over=auto`, `threads=2`), several joined by
/// `+`, each with the agent's defaults for the rest.
fn relay_variants() -> Vec<(String, Vec<String>)> {
    let help = Command::new(release_fedmesh())
        .args(["node", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let wanted = std::env::var("FEDMESH_WAN_RELAY")
        .unwrap_or_else(|_| "cubic-tolerant streams-over=auto".into());
    wanted
        .split_whitespace()
        .filter_map(|word| {
            let mut flags = Vec::new();
            for part in word.split('+') {
                let (flag, value) = part.split_once('=').unwrap_or(("congestion", part));
                if !help.contains(&format!("--{flag}")) {
                    return None;
                }
                flags.extend([format!("--{flag}"), value.to_owned()]);
            }
            Some((format!("fedmesh relay, {word}"), flags))
        })
        .collect()
}

struct Row {
    name: String,
    run: Run,
    pings: Vec<f64>,
    first: Vec<f64>,
}

async fn profile(p: &Profile) {
    println!("\n## {}", p.name);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut shaper = p.shaped.map(|link| {
        Shaper::start(
            &env("FEDMESH_WAN_LINK"),
            &env("FEDMESH_WAN_NS_A"),
            &env("FEDMESH_WAN_NS_B"),
            link,
        )
    });
    let echo = in_b(std::env::current_exe().expect("self"))
        .args(["serve-echo", &ECHO_PORT.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .expect("echo server");
    std::thread::sleep(SECOND / 2);
    let direct_iperf: SocketAddr = format!("{}:{IPERF_PORT}", p.b).parse().expect("addr");
    let direct_echo: SocketAddr = format!("{}:{ECHO_PORT}", p.b).parse().expect("addr");
    let mut rows: Vec<Row> = Vec::new();

    for cc in ["cubic", "bbr"] {
        let run = iperf(direct_iperf, cc, &[], &mut shaper);
        let first = if cc == "cubic" {
            first_bytes(direct_echo, p.first_bytes).await
        } else {
            vec![]
        };
        rows.push(Row {
            name: format!("direct TCP, {cc}"),
            run,
            pings: vec![],
            first,
        });
    }
    // The echo tunnel stays up: its ping-pong is taken in turns with each relay variant's.
    let (_esrv, _ecli) = stunnel(tmp.path(), in_b("stunnel4"), p.b, ECHO_PORT, 6100);
    let stunnel_echo: SocketAddr = "127.0.0.1:6100".parse().expect("addr");
    {
        let (srv, cli) = stunnel(tmp.path(), in_b("stunnel4"), p.b, IPERF_PORT, 6000);
        let pids = [srv.0.id(), cli.0.id()];
        let run = iperf(
            "127.0.0.1:6000".parse().expect("addr"),
            "cubic",
            &pids,
            &mut shaper,
        );
        rows.push(Row {
            name: "stunnel (TLS 1.3; the system default congestion control between sites)".into(),
            run,
            pings: vec![],
            first: first_bytes(stunnel_echo, p.first_bytes).await,
        });
    }
    let (direct_row, stunnel_row) = (0, rows.len() - 1);
    let in_turns = |rows: &mut Vec<Row>, mut rtts: Vec<Vec<f64>>| {
        for row in [stunnel_row, direct_row] {
            rows[row].pings.extend(rtts.remove(0));
        }
        rtts.pop()
    };
    let s = site(p, tmp.path()).await;
    let variants = relay_variants();
    for (name, flags) in &variants {
        let (a, b, iperf_at, echo_at) = agents(p, &s, flags).await;
        let run = iperf(iperf_at, "cubic", &[a.0.id(), b.0.id()], &mut shaper);
        let first = first_bytes(echo_at, p.first_bytes).await;
        let paths = [stunnel_echo, direct_echo, echo_at];
        let rtts = ping_pong_in_turns(&paths, p.pings, p.turn).await;
        let pings = in_turns(&mut rows, rtts).expect("relay");
        rows.push(Row {
            name: name.clone(),
            run,
            pings,
            first,
        });
    }
    if variants.is_empty() {
        let rtts = ping_pong_in_turns(&[stunnel_echo, direct_echo], p.pings, p.turn).await;
        in_turns(&mut rows, rtts);
    }
    for row in &mut rows {
        row.pings.sort_by(f64::total_cmp);
    }
    drop(echo);

    let base = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .map(|r| r.run.gbits)
    };
    let (cubic, bbr, st) = (
        base("direct TCP, cubic"),
        base("direct TCP, bbr"),
        base("stunnel"),
    );
    let ratio = |v: f64, b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2}x", v / b));
    println!(
        "\n### Throughput, one stream, iperf3 10 s\n| path | Gbit/s | vs TCP cubic | vs TCP bbr | vs stunnel | tunnel CPU s/GB | bottleneck drops |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        println!(
            "| {} | {:.3} | {} | {} | {} | {} | {} |",
            r.name,
            r.run.gbits,
            ratio(r.run.gbits, cubic),
            ratio(r.run.gbits, bbr),
            ratio(r.run.gbits, st),
            r.run.cpu_per_gb.map_or("-".into(), |c| format!("{c:.2}")),
            drops_cell(r.run.link.as_ref()),
        );
    }
    print_drop_timeline(
        rows.iter()
            .filter_map(|r| Some((r.name.as_str(), r.run.link.as_ref()?))),
    );
    let direct = rows.iter().find(|r| !r.pings.is_empty()).expect("direct");
    let (dp, df) = (direct.pings.clone(), direct.first.clone());
    println!(
        "\n### 1 KiB ping-pong ({} rounds per path, µs; direct, stunnel and each relay variant in turns of {}) and first byte of a new connection ({} connections, ms)\n| path | p50 | p90 | p99 | p90 added | first byte p50 | p90 | p50 added |\n|---|---:|---:|---:|---:|---:|---:|---:|",
        p.pings, p.turn, p.first_bytes
    );
    for r in rows.iter().filter(|r| !r.pings.is_empty()) {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            r.name,
            pct(&r.pings, 0.5),
            pct(&r.pings, 0.9),
            pct(&r.pings, 0.99),
            pct(&r.pings, 0.9) - pct(&dp, 0.9),
            pct(&r.first, 0.5) / 1e3,
            pct(&r.first, 0.9) / 1e3,
            (pct(&r.first, 0.5) - pct(&df, 0.5)) / 1e3,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if args.get(1).map(String::as_str) == Some("serve-echo") {
        rt.block_on(serve_echo(args[2].parse().expect("port")));
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let only = std::env::var("FEDMESH_WAN_PROFILES").unwrap_or_default();
    println!(
        "fedmesh WAN benchmark: two sites in network namespaces, 1500-byte MTU; shaped profiles \
         through a user-space link emulator (no sch_netem on this kernel), bottleneck queue {} \
         packets",
        QUEUE_BYTES / 1500
    );
    for p in PROFILES
        .iter()
        .filter(|p| only.is_empty() || only.split(',').any(|o| p.name.starts_with(o)))
    {
        rt.block_on(profile(p));
    }
}
