//! Rendezvous benchmark: the relayed path (both nodes `--outbound-only`, every datagram through
//! a `fedmesh rendezvous`) against the direct relay path, direct TCP and an stunnel TLS 1.3
//! tunnel, between two sites in network namespaces at 1500-byte MTU, in one run.
//!
//! ```text
//!  site A (org-a's agent, iperf3/echo clients, stunnel client)
//!    │  LAN: veth 10.77.1.0/24        WAN: TUN 10.77.2.0/24 through the link emulator
//!  router R: forwards A ⇄ B, and runs the hub and the rendezvous (udp/443)
//!    │  veth 10.77.3.0/24 (LAN) and 10.77.4.0/24 (WAN)
//!  site B (org-b's agent, iperf3 and echo servers, stunnel server)
//! ```
//!
//! The rendezvous sits on the router between the sites, so every path (direct TCP, stunnel, the
//! relay direct, the relay through the rendezvous) crosses the same two links and the same
//! emulated delay: what differs is only the rendezvous's forwarding. A rendezvous elsewhere
//! on the internet would add its own detour to the relayed path's round trip; that detour is a
//! property of where it is deployed, not of the forwarder, and is not modelled here.
//!
//! Profiles: LAN (veth, no shaping: CPU-bound) and WAN (20 ms RTT, 1 Gbit/s bottleneck on
//! the A–R link through `wanlink.c`, the user-space emulator: this kernel has no `sch_netem`).
//!
//! Printed per profile: iperf3 throughput (one stream, 10 s), CPU-seconds per GB of each
//! tunnel's two processes, the rendezvous's CPU per Gbit/s forwarded (utime+stime from `/proc`
//! against the bytes its metrics say it forwarded), 1 KiB ping-pong p50/p90/p99, first byte of
//! a new connection, and ratios. With the LAN profile also the rendezvous's RSS idle, after
//! the throughput run, and with 100 connected nodes: 100 carrier connections (the QUIC
//! connection a node's carrier makes, real member certificates enrolled through the hub, one
//! UDP socket each) held by a separate process of this binary, not 100 agents.
//!
//! The rendezvous runs with `--rate-per-node` raised to 10 Gbit/s so that it is the forwarder
//! that is measured, not its per-node bound (64 MiB/s ≈ 0.54 Gbit/s by default);
//! `FEDMESH_RV_RATE` (bytes/s) sets it. `FEDMESH_RV_BASELINE_BIN=<another fedmesh binary>` adds a
//! relayed row with that build (its rendezvous and agents) for a same-run comparison;
//! `FEDMESH_RV_AGENT_FLAGS` passes flags to both agents, `FEDMESH_RV_LOG` sets their and the
//! rendezvous's log filter, `FEDMESH_RV_PERF=<dir>` records a `perf` profile of both agents
//! and the rendezvous during each relay throughput run (a diagnostic: it perturbs the figures).
//!
//! Run with `scripts/bench rendezvous` (root): it builds the agent and the emulator, makes the
//! three namespaces and their links, runs this in site A, and removes them afterwards.

#[path = "common/sites.rs"]
mod sites;

use fedmesh_tests::{
    KillOnDrop, cpu_seconds, enrolled_collab, first_bytes, link_a_to_b, pct, ping_pong,
    release_fedmesh, rss_mib,
};
use sites::{
    LinkCounters, QUEUE_BYTES, Shaper, drops_cell, iperf_received, print_drop_timeline, serve_echo,
    stunnel,
};
use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use fedmesh_agent::{
    enroll::NodeState,
    hub::tls::pinned_client_config,
    owner::{HubAddress, Owner},
    rendezvous::{ALPN, carrier_transport},
};
use fedmesh_documents::RendezvousServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: Duration = Duration::from_secs(1);
const COLLAB: &str = "rv";
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7100;
const RELAY_PORT: u16 = 4433;
const RV_PORT: u16 = 443;
const RV_HTTP_PORT: u16 = 9443;
/// Carrier connections held at once for the memory figure.
const LOAD_NODES: usize = 100;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} unset: run with `scripts/bench rendezvous`"))
}

/// A command run in namespace `which` (`A`, `B` or `R`); `ip` execs the program, so the
/// child's pid is the program's.
fn in_ns(which: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &env(&format!("FEDMESH_RV_NS_{which}"))])
        .arg(program);
    c
}

#[derive(Clone, Copy)]
struct Profile {
    name: &'static str,
    /// (RTT µs, rate bit/s); `None`: veth pairs.
    shaped: Option<(u64, u64)>,
    a: &'static str,
    b: &'static str,
    /// The router's address on A's side: the hub and the rendezvous.
    rv: &'static str,
    pings: usize,
    first_bytes: usize,
    /// Whether to measure the rendezvous's memory with 100 connected nodes.
    load: bool,
}

const PROFILES: [Profile; 2] = [
    Profile {
        name: "LAN (veth, no shaping)",
        shaped: None,
        a: "10.77.1.1",
        b: "10.77.3.2",
        rv: "10.77.1.2",
        pings: 5000,
        first_bytes: 100,
        load: true,
    },
    Profile {
        name: "WAN (20 ms RTT, 1 Gbit/s)",
        shaped: Some((20_000, 1_000_000_000)),
        a: "10.77.2.1",
        b: "10.77.4.2",
        rv: "10.77.2.2",
        pings: 200,
        first_bytes: 20,
        load: false,
    },
];

/// `count` carrier connections to the rendezvous at `rv` (pinned by `pin`), one per enrolled
/// node state directory in `dirs`, each from its own UDP socket, as a node's carrier makes
/// them; prints how many are open and how many were refused, and holds them until stdin
/// closes.
async fn hold_carriers(rv: SocketAddr, pin: &str, dirs: &[String]) {
    let mut held = Vec::new();
    let mut refused = 0;
    for dir in dirs {
        let identity = NodeState::load(Path::new(dir))
            .and_then(|s| s.identity())
            .expect("enrolled identity");
        let tls = pinned_client_config(pin, &identity, ALPN).expect("TLS");
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(carrier_transport(1024 * 1024));
        let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("addr")).expect("bind");
        match endpoint
            .connect_with(config, rv, "rendezvous.fedmesh")
            .expect("connect")
            .await
        {
            Ok(conn) => held.push((endpoint, conn)),
            Err(_) => refused += 1,
        }
    }
    // A refusal by the rendezvous's certificate check surfaces just after the handshake.
    tokio::time::sleep(SECOND / 2).await;
    let open = held
        .iter()
        .filter(|(_, c)| c.close_reason().is_none())
        .count();
    println!("{open} {}", refused + held.len() - open);
    tokio::task::spawn_blocking(|| {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
    })
    .await
    .expect("stdin");
    drop(held);
}

/// One HTTP GET (the rendezvous's `/readyz` or `/metrics`); the whole response.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The hub, the owner, the enrolled nodes and the rendezvous, all of one profile.
struct Site {
    _hub: KillOnDrop,
    rendezvous: Option<KillOnDrop>,
    dir: PathBuf,
    http: SocketAddr,
    pin: String,
    owner_pin: String,
    load_dirs: Vec<String>,
}

impl Site {
    /// (Re)starts the rendezvous from `bin` (same certificate, documents and address) and waits
    /// until it is ready.
    async fn start_rendezvous(&mut self, bin: &Path) {
        self.rendezvous = None;
        let rate = std::env::var("FEDMESH_RV_RATE").unwrap_or_else(|_| "1250000000".into());
        let mut rendezvous = in_ns("R", bin)
            .args(["--log", &log_filter(), "rendezvous", "--listen"])
            .arg(format!("0.0.0.0:{RV_PORT}"))
            .arg("--http")
            .arg(self.http.to_string())
            .args(["--owner-pin", &self.owner_pin, "--rate-per-node", &rate])
            .arg("--dir")
            .arg(self.dir.join("rv"))
            .arg("--documents")
            .arg(self.dir.join("docs.jws"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the rendezvous");
        let mut banner = String::new();
        BufReader::new(rendezvous.stdout.take().expect("stdout"))
            .read_line(&mut banner)
            .expect("rendezvous banner");
        assert!(banner.contains(&self.pin), "rendezvous banner: {banner}");
        self.rendezvous = Some(KillOnDrop(rendezvous));
        let deadline = Instant::now() + 10 * SECOND;
        while !http_get(self.http, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            assert!(Instant::now() < deadline, "the rendezvous is not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "(rendezvous {} started; per-node rate bound {rate} bytes/s)",
            bin.display()
        );
    }

    fn rendezvous_pid(&self) -> u32 {
        self.rendezvous.as_ref().expect("rendezvous").pid()
    }

    /// A value of the rendezvous's metrics (`name{labels} value`), 0 when absent.
    async fn metric(&self, line_prefix: &str) -> f64 {
        http_get(self.http, "/metrics")
            .await
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    async fn forwarded_bytes(&self) -> f64 {
        self.metric(&format!(
            "fedmesh_rendezvous_bytes_total{{collab=\"{COLLAB}\",direction=\"out\"}} "
        ))
        .await
    }

    async fn nodes(&self) -> f64 {
        self.metric(&format!("fedmesh_rendezvous_nodes{{collab=\"{COLLAB}\"}} "))
            .await
    }
}

async fn site(p: &Profile, dir: &Path) -> Site {
    let mut hub = in_ns("R", release_fedmesh())
        .args(["--log", "error", "hub", "--init", "--listen"])
        .arg(format!("{}:0", p.rv))
        .arg("--data")
        .arg(dir.join("hub"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hub");
    let mut lines = BufReader::new(hub.stdout.take().expect("stdout")).lines();
    let mut banner = || lines.next().expect("banner").expect("banner");
    let url = banner().replace("hub listening on ", "");
    let hub_pin = banner().replace("hub pin ", "");
    let hub = KillOnDrop(hub);
    let load = if p.load { LOAD_NODES } else { 0 };
    let load_dirs: Vec<String> = (0..load)
        .map(|i| dir.join(format!("load-{i}")).display().to_string())
        .collect();
    let enrolled = Instant::now();
    let mut owner: Owner = enrolled_collab(
        &dir.join("owner"),
        HubAddress { url, pin: hub_pin },
        COLLAB,
        ["org-a/n1", "org-b/n1"]
            .map(|node| (node.to_owned(), dir.join(node.replace('/', "-"))))
            .into_iter()
            .chain(
                load_dirs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (format!("org-load/n{i}"), PathBuf::from(d))),
            ),
    )
    .await;
    if load > 0 {
        println!(
            "({} nodes enrolled through the hub in {:.1} s)",
            load + 2,
            enrolled.elapsed().as_secs_f64()
        );
    }
    link_a_to_b(&owner, COLLAB, &[IPERF_PORT, ECHO_PORT]).await;

    let rv_dir = dir.join("rv");
    let out = in_ns("R", release_fedmesh())
        .args(["rendezvous", "--print-pin", "--dir"])
        .arg(&rv_dir)
        .output()
        .expect("rendezvous --print-pin");
    let pin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    owner
        .set_rendezvous(vec![RendezvousServer {
            address: format!("{}:{RV_PORT}", p.rv),
            pin_sha256: pin.clone(),
        }])
        .await
        .expect("list the rendezvous");
    let docs = dir.join("docs.jws");
    std::fs::write(
        &docs,
        owner.rendezvous_documents().await.expect("documents"),
    )
    .expect("write documents");
    let mut site = Site {
        _hub: hub,
        rendezvous: None,
        dir: dir.to_owned(),
        http: format!("{}:{RV_HTTP_PORT}", p.rv).parse().expect("addr"),
        pin,
        owner_pin: owner.pin(),
        load_dirs,
    };
    site.start_rendezvous(&release_fedmesh()).await;
    site
}

/// The agents' and the rendezvous's log filter (`FEDMESH_RV_LOG`, default `warn`).
fn log_filter() -> String {
    std::env::var("FEDMESH_RV_LOG").unwrap_or_else(|_| "warn".into())
}

/// Extra flags for both agents (`FEDMESH_RV_AGENT_FLAGS`, e.g. `--congestion bbr`).
fn agent_flags() -> Vec<String> {
    std::env::var("FEDMESH_RV_AGENT_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Two agents, both `--outbound-only` when `relayed`; returns them and org-a's local addresses
/// for iperf3 and echo.
async fn agents(
    p: &Profile,
    s: &Site,
    relayed: bool,
    bin: &Path,
) -> (KillOnDrop, KillOnDrop, SocketAddr, SocketAddr) {
    let peers = s.dir.join("org-a-n1/peers.json");
    let _ = std::fs::remove_file(&peers);
    let start = |mut c: Command, name: &str, ip: &str, extra: &[String]| {
        // Outbound only, the relay's own socket is on another port: a stale direct
        // advertisement (of the direct run) finds nothing there and cannot carry the relayed
        // run. It is on the site's address, since it sends the sealed datagrams.
        let listen = match relayed {
            true => format!("{ip}:{}", RELAY_PORT + 1),
            false => format!("{ip}:{RELAY_PORT}"),
        };
        c.args(["--log", &log_filter(), "node", "--state"])
            .arg(s.dir.join(name))
            .args(["--relay-listen", &listen])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--loopback-pool", "127.99.1.0/24"])
            .args(if relayed {
                &["--outbound-only"][..]
            } else {
                &[]
            })
            .args(agent_flags())
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .expect("start node")
    };
    let b = start(
        in_ns("B", bin),
        "org-b-n1",
        p.b,
        &[
            "--expose".into(),
            format!("{IPERF_PORT}=127.0.0.1:{IPERF_PORT}"),
            "--expose".into(),
            format!("{ECHO_PORT}=127.0.0.1:{ECHO_PORT}"),
        ],
    );
    let a = start(Command::new(bin), "org-a-n1", p.a, &[]);
    let peer = format!("org-b.{COLLAB}.fedmesh");
    let (iperf, echo) = fedmesh_tests::relay_addresses(&peers, &peer, IPERF_PORT, ECHO_PORT).await;
    (a, b, iperf, echo)
}

/// One throughput run's figures.
#[derive(Clone, Default)]
struct Run {
    gbits: f64,
    cpu_per_gb: Option<f64>,
    /// What the link emulator counted during the run (shaped profile).
    link: Option<LinkCounters>,
    /// The rendezvous: (CPU-seconds, bytes it forwarded) during the run.
    rendezvous: Option<(f64, f64)>,
}

/// iperf3 (one stream, 10 s) from site A to `to`; CPU of `pids`; the rendezvous's CPU and
/// forwarded bytes when `site` is given.
async fn iperf(
    to: SocketAddr,
    pids: &[u32],
    shaper: &mut Option<Shaper>,
    site: Option<&Site>,
) -> Run {
    let _server = in_ns("B", "iperf3")
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .expect("iperf3 server");
    tokio::time::sleep(SECOND / 2).await;
    if let Some(s) = shaper.as_mut() {
        s.counters();
    }
    let rv_before = match site {
        Some(s) => Some((
            cpu_seconds(&[s.rendezvous_pid()]),
            s.forwarded_bytes().await,
        )),
        None => None,
    };
    let cpu = cpu_seconds(pids);
    let out = tokio::process::Command::new("iperf3")
        .args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(["-t", "10", "-J"])
        .output()
        .await
        .expect("iperf3");
    let cpu = cpu_seconds(pids) - cpu;
    let rendezvous = match (site, rv_before) {
        (Some(s), Some((cpu0, bytes0))) => Some((
            cpu_seconds(&[s.rendezvous_pid()]) - cpu0,
            s.forwarded_bytes().await - bytes0,
        )),
        _ => None,
    };
    let link = shaper.as_mut().map(Shaper::counters);
    let (bytes, gbits) = iperf_received(to, &out.stdout);
    Run {
        gbits,
        cpu_per_gb: (!pids.is_empty() && bytes > 0.0).then(|| cpu / (bytes / 1e9)),
        link,
        rendezvous,
    }
}

struct Row {
    name: &'static str,
    run: Run,
    pings: Vec<f64>,
    first: Vec<f64>,
}

const DIRECT_TCP: &str = "direct TCP";
const STUNNEL: &str = "stunnel (TLS 1.3)";
const RELAY_DIRECT: &str = "relay, direct path";
const RELAY_RELAYED: &str = "relay, relayed path (rendezvous)";
const RELAY_BASELINE: &str = "relay, relayed path, comparison build";

/// The rendezvous's memory and CPU with `LOAD_NODES` carrier connections held by another
/// process.
async fn load(s: &Site, p: &Profile, idle_rss: f64) {
    let pid = s.rendezvous_pid();
    let rv: SocketAddr = format!("{}:{RV_PORT}", p.rv).parse().expect("addr");
    let started = Instant::now();
    let mut holder = Command::new(std::env::current_exe().expect("self"))
        .args(["hold-carriers", &rv.to_string(), &s.pin])
        .args(&s.load_dirs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("carrier holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("holder output");
    let connected = started.elapsed();
    let counts: Vec<usize> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let holder_pid = holder.id();
    let holder = KillOnDrop(holder);
    tokio::time::sleep(2 * SECOND).await;
    let nodes = s.nodes().await;
    let rss = rss_mib(pid);
    let cpu = cpu_seconds(&[pid]);
    tokio::time::sleep(10 * SECOND).await;
    let idle_cpu = (cpu_seconds(&[pid]) - cpu) / 10.0;
    let rss_after = rss_mib(pid);
    let holder_rss = rss_mib(holder_pid);
    drop(holder);
    tokio::time::sleep(3 * SECOND).await;
    let nodes_after = s.nodes().await;
    let rss_left = rss_mib(pid);
    println!(
        "\n### Rendezvous with {LOAD_NODES} connected nodes\n\
         Carrier connections held by one separate process of this benchmark (one UDP socket and \
         one QUIC connection each, real member certificates enrolled through the hub; not 100 \
         agents): {} open, {} refused, connected in {:.2} s; the rendezvous's node gauge: {nodes}.\n\n\
         | rendezvous | RSS MiB |\n|---|---:|\n\
         | idle (documents loaded, no node) | {idle_rss:.1} |\n\
         | {LOAD_NODES} nodes connected (2 s after) | {rss:.1} |\n\
         | {LOAD_NODES} nodes connected (12 s after) | {rss_after:.1} |\n\
         | after they left (gauge {nodes_after}) | {rss_left:.1} |\n\n\
         Rendezvous CPU with {LOAD_NODES} idle nodes (keep-alives every 500 ms): {:.2}% of one \
         core over 10 s. The holder process: {holder_rss:.1} MiB RSS.",
        counts.first().copied().unwrap_or(0),
        counts.get(1).copied().unwrap_or(0),
        connected.as_secs_f64(),
        idle_cpu * 100.0,
    );
}

async fn profile(p: &Profile) {
    println!("\n## {}", p.name);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut shaper = p.shaped.map(|(rtt_us, rate)| {
        Shaper::start(
            &env("FEDMESH_RV_LINK"),
            &env("FEDMESH_RV_NS_A"),
            &env("FEDMESH_RV_NS_R"),
            (rtt_us, rate, 0),
        )
    });
    let echo = in_ns("B", std::env::current_exe().expect("self"))
        .args(["serve-echo", &ECHO_PORT.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .expect("echo server");
    tokio::time::sleep(SECOND / 2).await;
    let direct_iperf: SocketAddr = format!("{}:{IPERF_PORT}", p.b).parse().expect("addr");
    let direct_echo: SocketAddr = format!("{}:{ECHO_PORT}", p.b).parse().expect("addr");
    let mut rows: Vec<Row> = Vec::new();

    rows.push(Row {
        name: DIRECT_TCP,
        run: iperf(direct_iperf, &[], &mut shaper, None).await,
        pings: ping_pong(direct_echo, p.pings).await,
        first: first_bytes(direct_echo, p.first_bytes).await,
    });
    {
        let (srv, cli) = stunnel(tmp.path(), in_ns("B", "stunnel4"), p.b, IPERF_PORT, 6000);
        let pids = [srv.pid(), cli.pid()];
        let run = iperf(
            "127.0.0.1:6000".parse().expect("addr"),
            &pids,
            &mut shaper,
            None,
        )
        .await;
        let (_esrv, _ecli) = stunnel(tmp.path(), in_ns("B", "stunnel4"), p.b, ECHO_PORT, 6100);
        let to = "127.0.0.1:6100".parse().expect("addr");
        rows.push(Row {
            name: STUNNEL,
            run,
            pings: ping_pong(to, p.pings).await,
            first: first_bytes(to, p.first_bytes).await,
        });
    }
    let mut s = site(p, tmp.path()).await;
    tokio::time::sleep(SECOND).await;
    let idle_rss = rss_mib(s.rendezvous_pid());
    let mut after_run_rss = None;
    let release = release_fedmesh();
    let baseline = std::env::var_os("FEDMESH_RV_BASELINE_BIN").map(PathBuf::from);
    let mut variants = vec![
        (RELAY_DIRECT, false, release.clone()),
        (RELAY_RELAYED, true, release.clone()),
    ];
    if let Some(bin) = &baseline {
        variants.push((RELAY_BASELINE, true, bin.clone()));
    }
    for (name, relayed, bin) in variants {
        if name == RELAY_BASELINE {
            s.start_rendezvous(&bin).await;
        }
        let (a, b, iperf_at, echo_at) = agents(p, &s, relayed, &bin).await;
        let perf = std::env::var_os("FEDMESH_RV_PERF").map(|dir| {
            let out = PathBuf::from(dir).join(format!(
                "{}-{}.data",
                p.name.split_whitespace().next().unwrap_or("p"),
                if relayed { "relayed" } else { "direct" }
            ));
            let pids = [a.pid(), b.pid(), s.rendezvous_pid()].map(|p| p.to_string());
            Command::new("perf")
                .args(["record", "-q", "-F", "999", "-p", &pids.join(","), "-o"])
                .arg(&out)
                .args(["--", "sleep", "8"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf")
        });
        let run = iperf(iperf_at, &[a.pid(), b.pid()], &mut shaper, Some(&s)).await;
        if let Some(mut perf) = perf {
            let _ = perf.wait();
        }
        rows.push(Row {
            name,
            run,
            pings: ping_pong(echo_at, p.pings).await,
            first: first_bytes(echo_at, p.first_bytes).await,
        });
        if name == RELAY_RELAYED {
            after_run_rss = Some((rss_mib(s.rendezvous_pid()), s.nodes().await));
            let metrics = http_get(s.http, "/metrics").await.unwrap_or_default();
            let dropped: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("fedmesh_rendezvous_dropped_total"))
                .collect();
            println!("(rendezvous drops since its start: {dropped:?})");
        }
    }
    drop(echo);
    if baseline.is_some() {
        s.start_rendezvous(&release).await;
    }

    let gbits = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.run.gbits)
            .filter(|g| *g > 0.0)
    };
    let (tcp, st, direct) = (gbits(DIRECT_TCP), gbits(STUNNEL), gbits(RELAY_DIRECT));
    let ratio = |v: f64, b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2}x", v / b));
    println!(
        "\n### Throughput, one stream, iperf3 10 s\n\
         | path | Gbit/s | vs direct TCP | vs stunnel | vs relay direct | tunnel CPU s/GB | rendezvous GB forwarded | rendezvous CPU-s per Gbit | bottleneck drops |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        let (fwd, per_gbit) = match r.run.rendezvous {
            Some((cpu, bytes)) => (
                format!("{:.2}", bytes / 1e9),
                if bytes > 1e8 {
                    format!("{:.2}", cpu / (bytes * 8.0 / 1e9))
                } else {
                    "-".into()
                },
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.3} | {} | {} | {} | {} | {fwd} | {per_gbit} | {} |",
            r.name,
            r.run.gbits,
            ratio(r.run.gbits, tcp),
            ratio(r.run.gbits, st),
            ratio(r.run.gbits, direct),
            r.run.cpu_per_gb.map_or("-".into(), |c| format!("{c:.2}")),
            drops_cell(r.run.link.as_ref()),
        );
    }
    print_drop_timeline(
        rows.iter()
            .filter_map(|r| Some((r.name, r.run.link.as_ref()?))),
    );
    let base = &rows[0];
    println!(
        "\n### 1 KiB ping-pong ({} rounds, µs) and first byte of a new connection ({} connections, ms)\n\
         | path | p50 | p90 | p99 | p90 added | first byte p50 | p90 | p50 added |\n|---|---:|---:|---:|---:|---:|---:|---:|",
        p.pings, p.first_bytes
    );
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            r.name,
            pct(&r.pings, 0.5),
            pct(&r.pings, 0.9),
            pct(&r.pings, 0.99),
            pct(&r.pings, 0.9) - pct(&base.pings, 0.9),
            pct(&r.first, 0.5) / 1e3,
            pct(&r.first, 0.9) / 1e3,
            (pct(&r.first, 0.5) - pct(&base.first, 0.5)) / 1e3,
        );
    }
    let relayed = rows
        .iter()
        .find(|r| r.name == RELAY_RELAYED)
        .expect("relayed");
    let vs = |b: Option<f64>| b.map_or(f64::NAN, |b| relayed.run.gbits / b);
    println!(
        "\nrelayed / relay direct: {:.2}x (target ≥ 0.5x: {}); relayed / stunnel: {:.2}x; \
         relayed / direct TCP: {:.2}x",
        vs(direct),
        if vs(direct) >= 0.5 { "met" } else { "missed" },
        vs(st),
        vs(tcp),
    );
    if let Some(base) = gbits(RELAY_BASELINE) {
        println!(
            "relayed, this build / the comparison build (FEDMESH_RV_BASELINE_BIN, same run): {:.2}x",
            relayed.run.gbits / base
        );
    }
    if let Some((cpu, bytes)) = relayed.run.rendezvous {
        println!(
            "rendezvous during the relayed run: {:.2} GB forwarded (its metrics, both directions), \
             {cpu:.2} CPU-s over 10 s, {:.2} CPU-s per Gbit forwarded (= cores busy per Gbit/s)",
            bytes / 1e9,
            cpu / (bytes * 8.0 / 1e9),
        );
    }
    if let Some((rss, nodes)) = after_run_rss {
        println!(
            "rendezvous RSS: idle {idle_rss:.1} MiB; after the relayed run, {nodes} nodes \
             connected: {rss:.1} MiB"
        );
    }
    if p.load {
        load(&s, p, idle_rss).await;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _ = rustls::crypto::ring::default_provider().install_default();
    match args.get(1).map(String::as_str) {
        Some("serve-echo") => {
            rt.block_on(serve_echo(args[2].parse().expect("port")));
            return;
        }
        Some("hold-carriers") => {
            rt.block_on(hold_carriers(
                args[2].parse().expect("rendezvous address"),
                &args[3],
                &args[4..],
            ));
            return;
        }
        _ => {}
    }
    let only = std::env::var("FEDMESH_RV_PROFILES").unwrap_or_default();
    println!(
        "fedmesh rendezvous benchmark: sites A and B in network namespaces, the hub and the \
         rendezvous on router R between them, 1500-byte MTU; the WAN profile through a user-space \
         link emulator (no sch_netem on this kernel) on the A-R link, bottleneck queue {} packets",
        QUEUE_BYTES / 1500
    );
    for p in PROFILES
        .iter()
        .filter(|p| only.is_empty() || only.split(',').any(|o| p.name.starts_with(o)))
    {
        rt.block_on(profile(p));
    }
}
