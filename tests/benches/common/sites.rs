//! What the two between-namespace benchmarks (`wan`, `rendezvous`) share: the user-space link
//! emulator, the echo server and the stunnel baseline.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::Path,
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use fedmesh_tests::KillOnDrop;
use tokio::net::TcpListener;

/// The emulator's bottleneck queue: 1,000 full-size packets (netem's default limit).
pub(crate) const QUEUE_BYTES: u64 = 1000 * 1500;

/// The link emulator (`wanlink.c`) between the TUN devices `fmtun` of two namespaces, and its
/// counters.
pub(crate) struct Shaper {
    _proc: KillOnDrop,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Shaper {
    /// Starts `link` between namespaces `ns_a` and `ns_b` with the one-way-delay-derived RTT
    /// (µs), rate (bit/s) and random loss (parts per million).
    pub(crate) fn start(
        link: &str,
        ns_a: &str,
        ns_b: &str,
        (rtt_us, rate, loss_ppm): (u64, u64, u64),
    ) -> Self {
        let mut child = Command::new(link)
            .args([ns_a, "fmtun", ns_b, "fmtun"])
            .args([rtt_us, rate, loss_ppm, QUEUE_BYTES].map(|v| v.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the link emulator");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut ready = String::new();
        stdout.read_line(&mut ready).expect("emulator banner");
        assert_eq!(ready.trim(), "ready", "link emulator did not start");
        Self {
            _proc: KillOnDrop(child),
            stdin,
            stdout,
        }
    }

    /// The emulator's counters since the last call.
    pub(crate) fn counters(&mut self) -> LinkCounters {
        writeln!(self.stdin).expect("emulator stdin");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("emulator counters");
        let (totals, timeline) = line.split_once('|').unwrap_or((&line, ""));
        let numbers = |s: &str| -> Vec<u64> {
            s.split_whitespace()
                .map(|x| x.parse().expect("emulator counter"))
                .collect()
        };
        let v = numbers(totals);
        LinkCounters {
            drops: v[0],
            losses: v[1],
            timeline: numbers(timeline),
        }
    }
}

/// What the link emulator counted over one interval.
#[derive(Clone, Debug, Default)]
pub(crate) struct LinkCounters {
    /// Packets dropped at a full bottleneck queue.
    pub(crate) drops: u64,
    /// Packets lost at random (the profile's loss rate).
    pub(crate) losses: u64,
    /// Bottleneck drops in each 500 ms of the interval, up to the last with a drop.
    pub(crate) timeline: Vec<u64>,
}

/// A table cell with a run's bottleneck drops ("-" on an unshaped link).
pub(crate) fn drops_cell(link: Option<&LinkCounters>) -> String {
    link.map_or("-".into(), |l| l.drops.to_string())
}

/// Prints when each named run's bottleneck drops happened (nothing when no run was shaped).
pub(crate) fn print_drop_timeline<'a>(runs: impl IntoIterator<Item = (&'a str, &'a LinkCounters)>) {
    let mut runs = runs.into_iter().peekable();
    if runs.peek().is_none() {
        return;
    }
    println!(
        "\n### Bottleneck drops over time (per 500 ms from iperf3's start) and random losses\n\
         | path | drops per 500 ms | random losses |\n|---|---|---:|"
    );
    for (name, l) in runs {
        let bins: Vec<String> = l.timeline.iter().map(u64::to_string).collect();
        println!("| {name} | {} | {} |", bins.join(" "), l.losses);
    }
}

/// Echo server for the latency runs (started in the far site by re-running the benchmark).
pub(crate) async fn serve_echo(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .await
        .expect("bind echo");
    println!("ready");
    while let Ok((mut tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// An stunnel pair across the sites, both TLS 1.3 with a verified self-signed certificate: the
/// server started by `server` (a command in the far site's namespace) on
/// `server_host:client_port + 1`, forwarding to its `127.0.0.1:target`; the client here on
/// `127.0.0.1:client_port`.
pub(crate) fn stunnel(
    dir: &Path,
    server: Command,
    server_host: &str,
    target: u16,
    client_port: u16,
) -> (KillOnDrop, KillOnDrop) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("st-cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("st-key.pem"), key.serialize_pem()).expect("write");
    let server_port = client_port + 1;
    let d = dir.display();
    let conf = |name: &str, body: String, mut c: Command| {
        let path = dir.join(name);
        std::fs::write(&path, format!("foreground = yes\npid =\n{body}")).expect("write");
        c.arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .expect("stunnel4")
    };
    let server = conf(
        &format!("st-server-{target}.conf"),
        format!(
            "[s]\naccept = {server_host}:{server_port}\nconnect = 127.0.0.1:{target}\ncert = {d}/st-cert.pem\nkey = {d}/st-key.pem\nsslVersionMin = TLSv1.3\n"
        ),
        server,
    );
    let client = conf(
        &format!("st-client-{target}.conf"),
        format!(
            "[c]\nclient = yes\naccept = 127.0.0.1:{client_port}\nconnect = {server_host}:{server_port}\nverifyChain = yes\nCAfile = {d}/st-cert.pem\ncheckHost = localhost\nsslVersionMin = TLSv1.3\n"
        ),
        Command::new("stunnel4"),
    );
    std::thread::sleep(Duration::from_secs(1));
    (server, client)
}

/// (bytes received, Gbit/s) from iperf3's `-J` output of a run to `to`; says so when it failed.
pub(crate) fn iperf_received(to: SocketAddr, json: &[u8]) -> (f64, f64) {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let gbits = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    if bytes == 0.0 {
        eprintln!("iperf3 to {to} failed: {}", v["error"]);
    }
    (bytes, gbits)
}
