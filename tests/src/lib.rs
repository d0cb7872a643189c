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
    let out = Command::new(fedmesh_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run fedmesh (build the workspace first: cargo build --workspace)");
    (
        out.status.success(),
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
    task: tokio::task::JoinHandle<()>,
    _data: tempfile::TempDir,
}

impl TestHub {
    /// Starts a hub.
    pub async fn start() -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let cert =
            fedmesh_agent::hub::tls::HubCert::load_or_create(data.path(), &["localhost".into()])
                .expect("hub cert");
        let hub = fedmesh_agent::hub::Hub::open(data.path()).expect("hub store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let config = Arc::new(cert.server_config().expect("tls config"));
        let task = tokio::spawn(async move {
            let _ = fedmesh_agent::hub::run(listener, hub, config, std::future::pending()).await;
        });
        Self {
            url,
            pin: cert.pin(),
            task,
            _data: data,
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

/// The repository's root directory.
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

/// Mesh options whose loopback addresses no other test in any process on this machine uses at
/// the same time (tests run in parallel threads and, under nextest, parallel processes).
pub fn mesh_options() -> fedmesh_agent::mesh::MeshOptions {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 200 distinct second octets from 20 up, spread by process id.
    let octet = 20 + (std::process::id().wrapping_mul(7).wrapping_add(n * 13) % 200) as u8;
    fedmesh_agent::mesh::MeshOptions {
        loopback_octet: octet,
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
        let mut child = Command::new(bin)
            .args(["--log", "warn", "node", "--state"])
            .arg(state)
            .args([
                "--relay-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
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
