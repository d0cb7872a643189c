//! Support for the workspace integration tests (`tests/integration/`): paths to the built
//! binary, temporary collaborations, and a test subscriber.
//!
//! The tests run real processes and real TLS on loopback only.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Once},
    time::Duration,
};

/// Installs the *ring* crypto provider and a `tracing` subscriber that writes through the test
/// harness, once per test binary.
pub fn subscribe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// Runs the built `fedmesh` with `args` in `dir`; returns (success, stdout, stderr).
pub fn fedmesh(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = fedmesh_exit(dir, args);
    (code == 0, stdout, stderr)
}

/// Runs the built `fedmesh` with `args` in `dir` (logs filtered by `RUST_LOG` only as the
/// caller's environment says); returns (exit code, stdout, stderr).
pub fn fedmesh_exit(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(fedmesh_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run fedmesh (build the workspace first: cargo build --workspace)");
    (
        out.status.code().expect("fedmesh exits with a code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `fedmesh` like [`fedmesh`], failing the test unless it succeeds; returns its stdout.
pub fn fedmesh_ok(dir: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = fedmesh(dir, args);
    assert!(success, "fedmesh {args:?} failed: {stderr}");
    stdout
}

/// The `fedmesh` binary built for this test run.
pub fn fedmesh_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("fedmesh")
}

/// A hub running in this process on `127.0.0.1:0` with a temporary data directory.
pub struct TestHub {
    /// Its base URL.
    pub url: String,
    /// Its certificate pin.
    pub pin: String,
    /// Its data directory.
    pub dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
    _data: tempfile::TempDir,
}

impl TestHub {
    /// Starts a hub.
    pub async fn start() -> Self {
        Self::start_with(fedmesh_agent::hub::HubOptions::default()).await
    }

    /// Starts a hub with `options`.
    pub async fn start_with(options: fedmesh_agent::hub::HubOptions) -> Self {
        use fedmesh_agent::hub::Hub;
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("hub");
        Hub::init(&dir, &["localhost".into()], &options).expect("hub init");
        let hub = Hub::open(&dir, options).expect("hub store");
        let cert = hub.cert();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let config = Arc::new(cert.server_config().expect("tls config"));
        let pin = cert.pin();
        let task = tokio::spawn(async move {
            let _ = fedmesh_agent::hub::run(listener, hub, config, std::future::pending()).await;
        });
        Self {
            url,
            pin,
            task,
            dir,
            _data: tmp,
        }
    }

    /// The hub's address for owners and nodes.
    pub fn address(&self) -> fedmesh_agent::owner::HubAddress {
        fedmesh_agent::owner::HubAddress {
            url: self.url.clone(),
            pin: self.pin.clone(),
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the agent's metrics text satisfies `f` (checked every 50 ms), failing the test
/// with the metrics after `within`; returns the text. For gauges a task refreshes on its own
/// schedule: the test waits for the value, not for a guessed time.
pub async fn metrics_until(
    metrics: &fedmesh_agent::metrics::Metrics,
    within: Duration,
    f: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = metrics.render();
        if f(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the metrics did not reach the expected state within {within:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The repository's root directory.
/// A collaboration with an online CA made by an owner in `owner_dir` at `hub`, and `nodes`
/// (name, state directory) enrolled with one-time tokens: the benchmarks' common start.
pub async fn enrolled_collab(
    owner_dir: &Path,
    hub: fedmesh_agent::owner::HubAddress,
    id: &str,
    nodes: impl IntoIterator<Item = (String, PathBuf)>,
) -> fedmesh_agent::owner::Owner {
    use fedmesh_agent::owner::{NewCollab, Owner};
    let mut owner = Owner::create(
        owner_dir,
        hub,
        NewCollab {
            id: id.into(),
            owner_name: "bench".into(),
            online_ca: true,
            policy: fedmesh_documents::CollabPolicy::default(),
        },
    )
    .await
    .expect("collaboration");
    for (node, state) in nodes {
        let token = owner
            .join_token(
                &node.parse().expect("node name"),
                None,
                Duration::from_secs(3600),
            )
            .await
            .expect("token");
        fedmesh_agent::enroll::enroll(&token, &state, None)
            .await
            .expect("enroll");
    }
    owner
}

/// Has `owner` request and approve a link of collaboration `collab` from org-a/n1 to
/// org-b/n1 on `ports`, for an hour (the benchmarks' link).
pub async fn link_a_to_b(owner: &fedmesh_agent::owner::Owner, collab: &str, ports: &[u16]) {
    let node = |name: &str| name.parse().expect("node name");
    let ports: Vec<_> = ports
        .iter()
        .map(|p| p.to_string().parse().expect("port"))
        .collect();
    let terms = fedmesh_agent::owner::terms(
        collab,
        &node("org-a/n1"),
        &node("org-b/n1"),
        &ports,
        Duration::from_secs(3600),
        None,
    )
    .expect("terms");
    let terms = owner.request(terms).await.expect("request");
    owner.approve(&terms.id).await.expect("approve");
}

/// The release `fedmesh` binary the benchmarks run (`scripts/bench` builds it).
pub fn release_fedmesh() -> PathBuf {
    let bin = repo_root().join("target/release/fedmesh");
    assert!(
        bin.exists(),
        "{} missing: cargo build --release -p fedmesh-agent",
        bin.display()
    );
    bin
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the agent's peers file lists `peer`'s two addresses, then brings the QUIC
/// connection up with a first echo: (the address on `iperf_port`, the one on `echo_port`).
pub async fn relay_addresses(
    peers: &Path,
    peer: &str,
    iperf_port: u16,
    echo_port: u16,
) -> (SocketAddr, SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addrs: Vec<SocketAddr> = loop {
        if let Some(v) = std::fs::read_to_string(peers)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            && let Some(list) = v[peer].as_array()
            && list.len() == 2
        {
            break list
                .iter()
                .filter_map(|a| a.as_str()?.parse().ok())
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let iperf = *addrs
        .iter()
        .find(|a| a.port() == iperf_port)
        .expect("iperf");
    let echo = *addrs.iter().find(|a| a.port() == echo_port).expect("echo");
    // The first stream also brings the QUIC connection up.
    loop {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(echo).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut b = [1u8];
            if tcp.write_all(&b).await.is_ok() && tcp.read_exact(&mut b).await.is_ok() {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay listener did not open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (iperf, echo)
}

/// A TCP echo server on loopback (`TCP_NODELAY` on every connection); returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The Python interpreter of the test virtual environment (`scripts/test-deps` makes it).
pub fn python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test-deps (the README's test command does)",
        python.display()
    );
    python
}

/// The Python interpreter of the venv holding vantage6's own algorithm client
/// (`.venv-v6`, from `requirements-v6.txt`).
pub fn python_v6() -> PathBuf {
    let python = repo_root().join(".venv-v6/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test-deps (the README's test command does)",
        python.display()
    );
    python
}

/// Mesh options whose loopback addresses nothing else on this machine uses while this test
/// process runs: a second octet claimed with an exclusive lock (tests run in parallel threads
/// and, under nextest, parallel processes; a claim ends with its process). The demo's own
/// octet ([`MeshOptions::default`](fedmesh_agent::mesh::MeshOptions), 77) is never claimed,
/// so the tests pass beside a running `fedmesh demo --keep`.
pub fn mesh_options() -> fedmesh_agent::mesh::MeshOptions {
    fedmesh_agent::mesh::MeshOptions {
        loopback_octet: claim_loopback_octet(),
        ..Default::default()
    }
}

/// A `fedmesh node` process, killed when dropped.
pub struct AgentProcess {
    child: Child,
    /// Its relay's UDP address (from its banner).
    pub relay: SocketAddr,
}

impl AgentProcess {
    /// Starts `bin node --state <state>` with its relay and admin server on loopback port 0
    /// and `extra` flags; returns once it printed its banner.
    pub fn start(bin: &Path, state: &Path, extra: &[String]) -> Self {
        Self::start_at(bin, state, "127.0.0.1:0".parse().expect("addr"), extra)
    }

    /// [`AgentProcess::start`] with its relay on `relay` (a restarted agent takes its old
    /// address again).
    pub fn start_at(bin: &Path, state: &Path, relay: SocketAddr, extra: &[String]) -> Self {
        let mut child = Command::new(bin)
            .args(["--log", "warn", "node", "--state"])
            .arg(state)
            .arg("--relay-listen")
            .arg(relay.to_string())
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let banner = BufReader::new(child.stdout.take().expect("stdout"))
            .lines()
            .next()
            .expect("banner")
            .expect("banner");
        let relay = banner
            .split("relay udp/")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no relay address in {banner:?}"));
        Self { child, relay }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU time (user + system, from `/proc/<pid>/stat`) of `pids`, in seconds; a process that
/// is gone counts nothing.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|s| {
            // Fields after the command name (which may hold spaces): utime is the 12th.
            let ticks: u64 = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum();
            ticks as f64 / 100.0
        })
        .sum()
}

/// 1 KiB ping-pong round trips over one connection to the echo server at `to` (`TCP_NODELAY`,
/// a tenth more rounds first as warm-up), in microseconds, sorted.
pub async fn ping_pong(to: SocketAddr, rounds: usize) -> Vec<f64> {
    ping_pong_in_turns(&[to], rounds, rounds)
        .await
        .pop()
        .expect("one path")
}

/// 1 KiB ping-pong round trips to each echo server of `to` (one connection each, as
/// [`ping_pong`]), taken in turns of `turn` rounds per path, so that every path sees the same
/// moments of a noisy machine; per path, in microseconds, sorted.
pub async fn ping_pong_in_turns(to: &[SocketAddr], rounds: usize, turn: usize) -> Vec<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut paths = Vec::with_capacity(to.len());
    for &addr in to {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        paths.push((tcp, Vec::with_capacity(rounds)));
    }
    let msg = [0x5au8; 1024];
    let mut back = [0u8; 1024];
    let warm = rounds / 10;
    let turn = turn.max(1);
    let mut done = 0;
    while done < warm + rounds {
        let n = turn.min(warm + rounds - done);
        for (tcp, rtts) in &mut paths {
            for i in done..done + n {
                let t = std::time::Instant::now();
                tcp.write_all(&msg).await.expect("write");
                tcp.read_exact(&mut back).await.expect("read");
                if i >= warm {
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        done += n;
    }
    paths
        .into_iter()
        .map(|(_, mut rtts)| {
            rtts.sort_by(f64::total_cmp);
            rtts
        })
        .collect()
}

/// Times from connect to the first echoed byte of `count` new connections to the echo server
/// at `to`, in microseconds, sorted.
pub async fn first_bytes(to: SocketAddr, count: usize) -> Vec<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let t = std::time::Instant::now();
        let mut tcp = tokio::net::TcpStream::connect(to).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let mut b = [1u8];
        tcp.write_all(&b).await.expect("write");
        tcp.read_exact(&mut b).await.expect("echo");
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times
}

/// The `p` quantile (0..=1) of `sorted` (nearest rank).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Opens `count` relay connections to `to` (the node `server`) as `identity`, each proven
/// accepted by one stream's answer; returns the accepted ones (held open) and how many were
/// refused.
pub async fn connect_many(
    identity: &fedmesh_certs::NodeIdentity,
    bundle: &fedmesh_certs::TrustBundle,
    to: SocketAddr,
    server: &fedmesh_certs::SpiffeId,
    count: usize,
) -> (Vec<quinn::Connection>, usize) {
    use fedmesh_agent::relay::proto::{ALPN, Request};
    let rustls = fedmesh_certs::tls::client_config(identity, bundle, &[ALPN]).expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls).expect("quic tls");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..count {
        let Ok(conn) = endpoint
            .connect(to, &server.dns_name())
            .expect("connect")
            .await
        else {
            refused += 1;
            continue;
        };
        let answered = async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            send.write_all(
                &Request {
                    port: 1,
                    label: None,
                }
                .encode(),
            )
            .await
            .ok()?;
            let mut prefix = [0u8; 2];
            recv.read_exact(&mut prefix).await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(5), answered).await {
            Ok(Some(())) => held.push(conn),
            _ => refused += 1,
        }
    }
    (held, refused)
}

/// Claims a second octet `x` for `127.x.0.0/16`, held until this process exits.
pub fn claim_loopback_octet() -> u8 {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let demo = fedmesh_agent::mesh::MeshOptions::default().loopback_octet;
    let dir = std::env::temp_dir().join("fedmesh-test-loopback");
    std::fs::create_dir_all(&dir).expect("lock directory");
    // Start where this process's id points, so parallel processes rarely contend.
    let start = std::process::id() as usize;
    let octets: Vec<u8> = (20..=250).filter(|o| *o != demo).collect();
    for step in 0..octets.len() {
        let octet = octets[(start + step) % octets.len()];
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("127.{octet}.lock")))
            .expect("lock file");
        if file.try_lock().is_ok() {
            HELD.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(file);
            return octet;
        }
    }
    panic!("every loopback range 127.20-250.0.0/16 is taken by other test processes");
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_claims_are_exclusive_and_leave_the_demo_alone() {
        let (a, b) = (super::claim_loopback_octet(), super::claim_loopback_octet());
        assert_ne!(a, b);
        assert!(![a, b].contains(&77));
    }
}
