//! Relay benchmark: two `fedmesh node` processes (release build) carrying TCP over QUIC on
//! loopback, measured against baselines in the same run.
//!
//! - single-stream throughput (iperf3, 5 s): direct TCP, an stunnel TLS tunnel, the relay with
//!   Internet-sized datagrams (the default), with loopback-sized ones, and with streams over
//!   TLS (`--streams-over tls`);
//! - 1 KiB ping-pong latency p50/p90/p99: direct, stunnel, relay over QUIC and over TLS (and
//!   what each adds), taken in turns of 1,000 rounds so that a noisy moment falls on all alike;
//! - new connections per second (connect, 1-byte echo, close; 32 in flight): direct, relay
//!   over QUIC and over TLS;
//! - agent RSS idle and with 1,000 concurrent streams open.
//!
//! Run with `scripts/bench` (builds the release binary first). iperf3 and stunnel4 come from
//! apt; without them their rows are skipped.

use fedmesh_tests::{
    KillOnDrop, echo_server, enrolled_collab, link_a_to_b, pct, ping_pong_in_turns, release_fedmesh,
};
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fedmesh_agent::owner::HubAddress;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: Duration = Duration::from_secs(1);

/// What the relay's UDP payload may grow to: what fits a 1500-byte Ethernet MTU (the agent's
/// default, as between real sites), and what loopback carries (its MTU is 64 KiB, like the
/// segments of the loopback TCP that stunnel and direct TCP use).
const INTERNET_PAYLOAD: u16 = 1452;
const LOOPBACK_PAYLOAD: u16 = 65_000;

/// A port free for TCP and UDP, below the ephemeral range: the connection-rate run leaves
/// thousands of ephemeral ports in TIME_WAIT, where a listener cannot bind.
fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 9_000;
        let port = 21_000 + (std::process::id() as u16 % 97) * 7 % 1_000 + offset;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
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

/// Fields drop in order: the agents before the hub, the directory last.
struct Setup {
    a: KillOnDrop,
    a_admin: SocketAddr,
    b: KillOnDrop,
    _hub: KillOnDrop,
    relay_iperf: SocketAddr,
    relay_echo: SocketAddr,
    iperf_port: u16,
    echo: SocketAddr,
    _tmp: tempfile::TempDir,
}

/// A hub and two agents whose UDP payload may grow to `udp_payload`; org-a's peer addresses
/// come from `127.99.<pool>.0/24`.
/// A hub and two agents (`flags` added to both), org-a linked to org-b's iperf and echo.
async fn setup(udp_payload: u16, pool: u8, flags: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let mut hub = Command::new(release_fedmesh())
        .args([
            "--log",
            "warn",
            "hub",
            "--init",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.join("hub"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hub");
    let mut lines = BufReader::new(hub.stdout.take().expect("stdout")).lines();
    let url = lines
        .next()
        .expect("banner")
        .expect("banner")
        .replace("hub listening on ", "");
    let pin = lines
        .next()
        .expect("banner")
        .expect("banner")
        .replace("hub pin ", "");
    let hub = KillOnDrop(hub);
    let owner = enrolled_collab(
        &dir.join("owner"),
        HubAddress { url, pin },
        "bench",
        ["org-a/n1", "org-b/n1"].map(|node| (node.to_owned(), dir.join(node.replace('/', "-")))),
    )
    .await;
    let iperf_port = free_port();
    let echo = echo_server().await;
    // Returns the process and its admin address (from its banner).
    let start_node = |name: &str, extra: Vec<String>| {
        let relay = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(release_fedmesh())
            .args(["--log", "warn", "node", "--state"])
            .arg(dir.join(name))
            .args(["--relay-listen", &relay, "--admin-listen", "127.0.0.1:0"])
            .args([
                "--max-udp-payload",
                &udp_payload.to_string(),
                "--loopback-pool",
                &format!("127.99.{pool}.0/24"),
            ])
            .args(flags)
            .args(extra)
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
            .expect("admin address in the banner");
        (KillOnDrop(child), admin)
    };
    let (a, a_admin) = start_node("org-a-n1", vec![]);
    let (b, _) = start_node(
        "org-b-n1",
        vec![
            "--expose".into(),
            format!("5201=127.0.0.1:{iperf_port}"),
            "--expose".into(),
            format!("7100={echo}"),
        ],
    );
    link_a_to_b(&owner, "bench", &[5201, 7100]).await;

    let (relay_iperf, relay_echo) = fedmesh_tests::relay_addresses(
        &dir.join("org-a-n1/peers.json"),
        "org-b.bench.fedmesh",
        5201,
        7100,
    )
    .await;
    Setup {
        _tmp: tmp,
        _hub: hub,
        a,
        a_admin,
        b,
        relay_iperf,
        relay_echo,
        iperf_port,
        echo,
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A one-off iperf3 server on `port`, then an iperf3 client → `to` for 5 s; receiver Gbit/s.
fn iperf(port: u16, to: SocketAddr) -> Option<f64> {
    let _server = Command::new("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .ok()?;
    std::thread::sleep(SECOND / 2);
    let out = Command::new("iperf3")
        .args([
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            "5",
            "-J",
        ])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let gbits = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9);
    if gbits.is_none() {
        eprintln!("iperf3 to {to} (server port {port}) failed: {}", v["error"]);
        let ss = Command::new("ss").args(["-ltnp"]).output().ok()?;
        eprintln!("{}", String::from_utf8_lossy(&ss.stdout));
    }
    gbits
}

/// An stunnel client+server pair: TLS 1.3 with a verified self-signed certificate, like a
/// classic TLS tunnel between two sites. Returns the client's accept address.
fn stunnel(dir: &Path, target_port: u16) -> Option<(KillOnDrop, KillOnDrop, SocketAddr)> {
    let key = rcgen::KeyPair::generate().ok()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .ok()?
        .self_signed(&key)
        .ok()?;
    std::fs::write(dir.join("st-cert.pem"), cert.pem()).ok()?;
    std::fs::write(dir.join("st-key.pem"), key.serialize_pem()).ok()?;
    let (server_port, client_port) = (free_port(), free_port());
    let conf = |name: &str, body: String| {
        let path = dir.join(name);
        std::fs::write(&path, format!("foreground = yes\npid =\n{body}")).ok()?;
        Command::new("stunnel4")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(KillOnDrop)
    };
    let d = dir.display();
    let server = conf(
        "st-server.conf",
        format!(
            "[s]\naccept = 127.0.0.1:{server_port}\nconnect = 127.0.0.1:{target_port}\ncert = {d}/st-cert.pem\nkey = {d}/st-key.pem\n"
        ),
    )?;
    let client = conf(
        "st-client.conf",
        format!(
            "[c]\nclient = yes\naccept = 127.0.0.1:{client_port}\nconnect = 127.0.0.1:{server_port}\nverifyChain = yes\nCAfile = {d}/st-cert.pem\ncheckHost = localhost\n"
        ),
    )?;
    std::thread::sleep(SECOND);
    Some((
        server,
        client,
        format!("127.0.0.1:{client_port}").parse().ok()?,
    ))
}

/// Completed connect / 1-byte echo / close cycles per second, `parallel` at a time.
async fn conn_rate(to: SocketAddr, parallel: usize, for_: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + for_;
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let Ok(mut tcp) = TcpStream::connect(to).await else {
                        continue;
                    };
                    let mut b = [1u8];
                    if tcp.write_all(&b).await.is_ok() && tcp.read_exact(&mut b).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for w in workers {
        let _ = w.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// iperf3 through `s`'s relay, printing the dialling agent's path gauges afterwards; with
/// `FEDMESH_BENCH_PROFILE` set (and perf installed), samples both agents meanwhile and prints
/// where their CPU time went.
async fn relay_iperf(s: &Setup) -> Option<f64> {
    let profile = std::env::var_os("FEDMESH_BENCH_PROFILE").is_some() && have("perf");
    let perf_data = s._tmp.path().join("perf.data");
    let recorder = profile.then(|| {
        Command::new("perf")
            .args(["record", "-F", "999", "-g", "-o"])
            .arg(&perf_data)
            .args([
                "-p",
                &format!("{},{}", s.a.0.id(), s.b.0.id()),
                "--",
                "sleep",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop)
    });
    let gbits = iperf(s.iperf_port, s.relay_iperf);
    let metrics = reqwest::get(format!("http://{}/metrics", s.a_admin))
        .await
        .expect("metrics");
    for line in metrics
        .text()
        .await
        .expect("metrics")
        .lines()
        .filter(|l| l.starts_with("fedmesh_peer_"))
    {
        println!("{line}");
    }
    if let Some(Ok(mut rec)) = recorder {
        let _ = rec.0.wait();
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--sort",
                "dso,symbol",
                "-i",
            ])
            .arg(&perf_data)
            .output();
        if let Ok(out) = report {
            println!("\n### Where the relay's CPU time goes (perf, both agents)\n```");
            for line in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains('%') && !l.starts_with('#'))
                .take(25)
            {
                println!("{line}");
            }
            println!("```");
        }
    }
    gbits
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!(
        "fedmesh relay benchmark (release agents, loopback, {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let s = setup(INTERNET_PAYLOAD, 1, &[]).await;
    // Agents whose streams go over TLS connections of their own.
    let t = setup(INTERNET_PAYLOAD, 3, &["--streams-over", "tls"]).await;
    tokio::time::sleep(2 * SECOND).await;
    let (rss_a_idle, rss_b_idle) = (rss_kib(s.a.0.id()), rss_kib(s.b.0.id()));

    println!("\n## Throughput, one TCP stream, iperf3 5 s (Gbit/s, receiver)");
    if have("iperf3") {
        let direct = iperf(
            s.iperf_port,
            format!("127.0.0.1:{}", s.iperf_port).parse().expect("addr"),
        );
        let tunnel = if have("stunnel4") {
            stunnel(s._tmp.path(), s.iperf_port)
                .and_then(|(_srv, _cli, addr)| iperf(s.iperf_port, addr))
        } else {
            None
        };
        println!("relay, datagrams up to {INTERNET_PAYLOAD} bytes:");
        let relay = relay_iperf(&s).await;
        // A second pair of agents whose path MTU discovery may climb to loopback's.
        let loopback = {
            let l = setup(LOOPBACK_PAYLOAD, 2, &[]).await;
            tokio::time::sleep(SECOND).await;
            println!("relay, datagrams up to {LOOPBACK_PAYLOAD} bytes:");
            relay_iperf(&l).await
        };
        println!("relay, streams over TLS:");
        let over_tls = relay_iperf(&t).await;
        let show = |v: Option<f64>| v.map_or("skipped".into(), |g| format!("{g:.2}"));
        println!("| path | Gbit/s | vs direct | vs stunnel |\n|---|---:|---:|---:|");
        for (name, v) in [
            ("direct TCP".to_owned(), direct),
            ("stunnel TLS tunnel".to_owned(), tunnel),
            (
                format!("fedmesh relay, datagrams ≤ {INTERNET_PAYLOAD} B (default)"),
                relay,
            ),
            (
                format!("fedmesh relay, datagrams ≤ {LOOPBACK_PAYLOAD} B (loopback MTU)"),
                loopback,
            ),
            ("fedmesh relay, streams over TLS".to_owned(), over_tls),
        ] {
            let ratio = |base: Option<f64>| match (v, base) {
                (Some(v), Some(b)) => format!("{:.2}x", v / b),
                _ => "-".into(),
            };
            println!(
                "| {name} | {} | {} | {} |",
                show(v),
                ratio(direct),
                ratio(tunnel)
            );
        }
    } else {
        println!("skipped: iperf3 is not installed (apt-get install iperf3 stunnel4)");
    }

    println!("\n## Latency, 1 KiB ping-pong, 20,000 rounds per path in turns of 1,000 (µs)");
    let stunnel_echo = have("stunnel4")
        .then(|| stunnel(s._tmp.path(), s.echo.port()))
        .flatten();
    let mut paths = vec![s.echo, s.relay_echo, t.relay_echo];
    paths.extend(stunnel_echo.as_ref().map(|(_srv, _cli, addr)| *addr));
    let mut rtts = ping_pong_in_turns(&paths, 20_000, 1_000).await.into_iter();
    let mut next = || rtts.next().expect("one per path");
    let (direct, relay, relay_tls) = (next(), next(), next());
    let tunnel = stunnel_echo.map(|_| next());
    println!("| path | p50 | p90 | p99 |\n|---|---:|---:|---:|");
    let row = |name: &str, v: &[f64]| {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99)
        );
    };
    let added = |name: &str, v: &[f64]| {
        println!(
            "| added by {name} | {:.1} | {:.1} | {:.1} |",
            pct(v, 0.5) - pct(&direct, 0.5),
            pct(v, 0.9) - pct(&direct, 0.9),
            pct(v, 0.99) - pct(&direct, 0.99)
        );
    };
    row("direct TCP", &direct);
    if let Some(tunnel) = &tunnel {
        row("stunnel TLS tunnel", tunnel);
    }
    row("fedmesh relay", &relay);
    row("fedmesh relay, streams over TLS", &relay_tls);
    if let Some(tunnel) = &tunnel {
        added("stunnel", tunnel);
    }
    added("the relay", &relay);
    added("the relay over TLS", &relay_tls);

    println!("\n## New connections per second (connect, 1-byte echo, close; 32 in flight; 5 s)");
    let direct = conn_rate(s.echo, 32, 5 * SECOND).await;
    let relay = conn_rate(s.relay_echo, 32, 5 * SECOND).await;
    let relay_tls = conn_rate(t.relay_echo, 32, 5 * SECOND).await;
    println!("| path | conn/s | vs direct |\n|---|---:|---:|");
    println!("| direct TCP | {direct:.0} | 1.00x |");
    println!("| fedmesh relay | {relay:.0} | {:.2}x |", relay / direct);
    println!(
        "| fedmesh relay, streams over TLS | {relay_tls:.0} | {:.2}x |",
        relay_tls / direct
    );
    drop(t);

    println!("\n## Agent memory (RSS, MiB)");
    let mut held = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut tcp = TcpStream::connect(s.relay_echo).await.expect("connect");
        let mut b = [7u8];
        tcp.write_all(&b).await.expect("write");
        tcp.read_exact(&mut b).await.expect("echo");
        held.push(tcp);
    }
    tokio::time::sleep(SECOND).await;
    let (rss_a, rss_b) = (rss_kib(s.a.0.id()), rss_kib(s.b.0.id()));
    let mib = |k: u64| k as f64 / 1024.0;
    println!("| agent | idle | 1,000 open streams |\n|---|---:|---:|");
    println!(
        "| dialling (org-a) | {:.1} | {:.1} |",
        mib(rss_a_idle),
        mib(rss_a)
    );
    println!(
        "| accepting (org-b) | {:.1} | {:.1} |",
        mib(rss_b_idle),
        mib(rss_b)
    );
    drop(held);
}
