//! Sites that accept no inbound connections, for real: each site in its own network namespace
//! behind a NAT router (iptables MASQUERADE) that drops every new inbound connection, the hub
//! and the rendezvous in another namespace. Three `--outbound-only` nodes (real processes) link
//! through the rendezvous in three cases of what the router lets out: (a) anything (QUIC/UDP
//! carrier), (b) only TCP to port 443 of the rendezvous and the hub's port (the nodes fall
//! back to the TLS/TCP carrier by themselves), (c) nothing but an HTTP CONNECT proxy (tinyproxy
//! on the router, from `HTTPS_PROXY`). In each: 100 MB cross byte-exact (sha256) both ways; a
//! 3-party MPyC job (the example, unmodified) completes; revoking a link closes its open
//! connection within 5 s while the other links carry on. The hub, rendezvous, enrollment and
//! the sites' servers are set up once; the nodes restart for each case. The test first proves
//! the NAT drops a direct dial (TCP and UDP) from one site to another and from the public side.
//!
//! Everything runs as real processes (`ip netns exec`): hub, rendezvous, owner commands,
//! enrollment, nodes, and the Python peers (`nat_peer.py` beside this file) that send and hash.
//! Addresses and ports are fixed inside the namespaces (each run has its own), never in the
//! host's.
//!
//! Root only, with `ip`, `iptables` and `tinyproxy`; otherwise it says why and passes without
//! running.
//! Every name is unique to this process and everything is removed on drop, also on failure.

use std::{
    io::{BufRead, BufReader, Lines},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

const SECOND: Duration = Duration::from_secs(1);
/// The public side (hub and rendezvous) and the router's address on it.
const PUBLIC: &str = "198.51.100.2";
const ROUTER_PUBLIC: &str = "198.51.100.1";
const SITES: [&str; 3] = ["a", "b", "c"];
const MB: usize = 1_000_000;

fn site_ip(i: usize) -> String {
    format!("10.1.{}.2", i + 1)
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root (network namespaces and iptables need root)".into());
    }
    for tool in ["ip", "iptables", "tinyproxy"] {
        let found = Command::new(tool)
            .arg(match tool {
                "ip" => "-V",
                "tinyproxy" => "-v",
                _ => "--version",
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` is missing (apt-get install iproute2 iptables tinyproxy)"
            ));
        }
    }
    None
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test run: removed (with whatever still runs in them) when dropped.
struct Net {
    names: Vec<String>,
}

impl Net {
    fn ns(&self, which: &str) -> &str {
        self.names
            .iter()
            .find(|n| n.ends_with(&format!("-{which}")))
            .expect("namespace")
    }

    /// `ip netns exec <ns> ...`: the program itself runs in the namespace (`ip` execs it).
    fn exec(&self, which: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(which)]).arg(program);
        c
    }

    fn sh(&self, which: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", self.ns(which)];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// pub (hub, rendezvous) ── router (NAT) ── site a, b, c.
    fn build() -> Self {
        let tag = format!("fmnat{}", std::process::id());
        let mut net = Self { names: Vec::new() };
        for which in ["pub", "rtr", "a", "b", "c"] {
            let name = format!("{tag}-{which}");
            run("ip", &["netns", "add", &name]);
            net.names.push(name);
        }
        for which in ["pub", "rtr", "a", "b", "c"] {
            net.sh(which, &["ip", "link", "set", "lo", "up"]);
        }
        // Both ends of each pair are created inside the namespaces: no names in the host's.
        let pair = |a: &str, a_if: &str, b: &str, b_if: &str| {
            run(
                "ip",
                &[
                    "link",
                    "add",
                    a_if,
                    "netns",
                    net.ns(a),
                    "mtu",
                    "1500",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    b_if,
                    "netns",
                    net.ns(b),
                    "mtu",
                    "1500",
                ],
            );
        };
        pair("rtr", "pub0", "pub", "eth0");
        net.sh(
            "rtr",
            &[
                "ip",
                "addr",
                "add",
                &format!("{ROUTER_PUBLIC}/24"),
                "dev",
                "pub0",
            ],
        );
        net.sh("rtr", &["ip", "link", "set", "pub0", "up"]);
        net.sh(
            "pub",
            &["ip", "addr", "add", &format!("{PUBLIC}/24"), "dev", "eth0"],
        );
        net.sh("pub", &["ip", "link", "set", "eth0", "up"]);
        // The public side can route to the sites' private ranges: only the NAT stops it.
        net.sh(
            "pub",
            &["ip", "route", "add", "10.1.0.0/16", "via", ROUTER_PUBLIC],
        );
        for (i, site) in SITES.iter().enumerate() {
            let inside = format!("s{site}0");
            pair("rtr", &inside, site, "eth0");
            net.sh(
                "rtr",
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.1.{}.1/24", i + 1),
                    "dev",
                    &inside,
                ],
            );
            net.sh("rtr", &["ip", "link", "set", &inside, "up"]);
            net.sh(
                site,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", site_ip(i)),
                    "dev",
                    "eth0",
                ],
            );
            net.sh(site, &["ip", "link", "set", "eth0", "up"]);
            net.sh(
                site,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.1.{}.1", i + 1),
                ],
            );
            // The site itself accepts nothing new from outside either.
            net.sh(
                site,
                &["iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
            );
            net.sh(
                site,
                &[
                    "iptables",
                    "-A",
                    "INPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ],
            );
            net.sh(site, &["iptables", "-P", "INPUT", "DROP"]);
        }
        // The router: forwards only what a site opened towards the public side (and its
        // replies), and hides the sites behind its public address. The egress rules below
        // apply to every outgoing packet, not only a flow's first: a flow the previous case
        // allowed (the relay's socket keeps its port) does not outlive a rule that now drops it.
        net.sh("rtr", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        net.sh("rtr", &["iptables", "-P", "FORWARD", "DROP"]);
        net.sh(
            "rtr",
            &[
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                "pub0",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        );
        net.sh(
            "rtr",
            &["iptables", "-A", "FORWARD", "-o", "pub0", "-j", "ACCEPT"],
        );
        net.sh(
            "rtr",
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "pub0",
                "-j",
                "MASQUERADE",
            ],
        );
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in &self.names {
            // Anything of ours still running in it (each process was started in it by us).
            if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_lines(mut c: Command) -> (Proc, Lines<BufReader<ChildStdout>>) {
    let mut child = c.stdout(Stdio::piped()).spawn().expect("spawn");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (Proc(child), lines)
}

fn next_line(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> String {
    lines
        .next()
        .unwrap_or_else(|| panic!("{what}: no output"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn output(mut c: Command) -> String {
    let out = c.output().expect("run");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helper() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/integration/nat_peer.py")
}

/// The owner's CLI, run on the public side.
fn owner(net: &Net, dir: &Path, args: &[&str]) -> String {
    let mut c = net.exec("pub", fedmesh_tests::fedmesh_bin());
    c.args(args).arg("--owner-dir").arg(dir.join("owner"));
    output(c)
}

/// `from`'s address for `to` on `port`, from its peer map, within 20 s.
fn peer_addr(dir: &Path, from: &str, to: &str, port: u16) -> SocketAddr {
    let peers = dir.join(format!("org-{from}/peers.json"));
    let key = format!("org-{to}.nat.fedmesh");
    let deadline = Instant::now() + 20 * SECOND;
    loop {
        if let Some(v) = std::fs::read_to_string(&peers)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            && let Some(found) = v[&key].as_array().and_then(|list| {
                list.iter()
                    .filter_map(|a| a.as_str()?.parse::<SocketAddr>().ok())
                    .find(|a| a.port() == port)
            })
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "org-{from} has no address for org-{to}:{port} in {}",
            peers.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `up` bytes from `from` to `addr` and asks for `down` back; asserts both directions
/// byte for byte against what the server in `to` printed.
fn transfer(
    net: &Net,
    from: &str,
    addr: SocketAddr,
    server: &mut Lines<BufReader<ChildStdout>>,
    up: usize,
    down: usize,
) {
    let mut c = net.exec(from, "python3");
    c.arg(helper())
        .args(["send", &addr.ip().to_string(), &addr.port().to_string()])
        .args([up.to_string(), down.to_string()]);
    let client = output(c);
    let client: Vec<&str> = client.split_whitespace().collect();
    let served = next_line(server, "server");
    let served: Vec<&str> = served.split_whitespace().collect();
    // client: sent <sha> recv <n> <sha>; server: recv <n> <sha> sent <sha>
    assert_eq!(client.len(), 5, "{client:?}");
    assert_eq!(served.len(), 5, "{served:?}");
    assert_eq!(
        (served[1], served[2]),
        (up.to_string().as_str(), client[1]),
        "org-{from} → server"
    );
    assert_eq!(
        (client[3], client[4]),
        (down.to_string().as_str(), served[4]),
        "server → org-{from}"
    );
}

#[test]
fn outbound_only_sites_behind_nat_link_through_the_rendezvous() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED rendezvous_nat: {why}");
        return;
    }
    let bin = fedmesh_tests::fedmesh_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let net = Net::build();

    // The NAT drops every new inbound connection: b listens on TCP and UDP 9000; neither
    // another site nor the public side reaches it, while b's own outbound dial to the public
    // side works.
    let (listener, mut heard) = spawn_lines({
        let mut c = net.exec("b", "python3");
        c.arg(helper()).args(["listen", "9000"]);
        c
    });
    assert_eq!(next_line(&mut heard, "listener"), "listening");
    let (public_listener, mut public_heard) = spawn_lines({
        let mut c = net.exec("pub", "python3");
        c.arg(helper()).args(["listen", "9000"]);
        c
    });
    assert_eq!(next_line(&mut public_heard, "public listener"), "listening");
    let dial = |from: &str, host: &str| {
        net.exec(from, "python3")
            .arg(helper())
            .args(["dial", host, "9000"])
            .status()
            .unwrap()
            .success()
    };
    let b_ip = site_ip(1);
    assert!(dial("b", "127.0.0.1"), "b's listener is up");
    assert!(dial("b", PUBLIC), "a site can dial out");
    assert!(!dial("a", &b_ip), "site a reached site b directly");
    assert!(
        !dial("pub", &b_ip),
        "the public side reached site b directly"
    );
    for from in ["a", "pub"] {
        let mut c = net.exec(from, "python3");
        c.arg(helper()).args(["udp", &b_ip, "9000"]);
        output(c);
    }
    let mut c = net.exec("b", "python3");
    c.arg(helper()).args(["udp", "127.0.0.1", "9000"]);
    output(c);
    // Site b's own three datagrams arrive (however busy the machine), then nothing more: the
    // outside ones were sent first.
    let (lines, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || heard.map_while(Result::ok).try_for_each(|l| lines.send(l)));
    let mut heard = Vec::new();
    while heard.len() < 3 {
        match got.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => heard.push(line),
            Err(_) => panic!("site b heard only {heard:?} of its own three datagrams"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(listener);
    heard.extend(got.iter());
    assert_eq!(
        heard.len(),
        3,
        "site b heard {heard:?}: its own three datagrams and nothing from outside expected"
    );
    drop(public_listener);

    // The public side: a hub and a rendezvous.
    let (_hub, mut hub_out) = spawn_lines({
        let mut c = net.exec("pub", &bin);
        c.args(["--log", "warn", "hub", "--init", "--listen"])
            .arg(format!("{PUBLIC}:8443"))
            .arg("--data")
            .arg(dir.join("hub"));
        c
    });
    let url = next_line(&mut hub_out, "hub").replace("hub listening on ", "");
    let hub_pin = next_line(&mut hub_out, "hub").replace("hub pin ", "");
    let created = {
        let mut c = net.exec("pub", &bin);
        c.args([
            "collab",
            "create",
            "--id",
            "nat",
            "--online-ca",
            "--hub",
            &url,
        ])
        .args(["--hub-pin", &hub_pin, "--owner-dir"])
        .arg(dir.join("owner"));
        output(c)
    };
    let owner_pin = created
        .lines()
        .find_map(|l| l.strip_prefix("owner pin "))
        .expect("owner pin")
        .trim()
        .to_owned();
    let rv_pin = {
        let mut c = net.exec("pub", &bin);
        c.args(["rendezvous", "--print-pin", "--dir"])
            .arg(dir.join("rv"));
        output(c).trim().to_owned()
    };
    owner(
        &net,
        dir,
        &[
            "collab",
            "rendezvous",
            "--server",
            &format!("{PUBLIC}:443={rv_pin}"),
        ],
    );
    let docs = dir.join("docs.jws");
    owner(
        &net,
        dir,
        &["collab", "documents", "--out", docs.to_str().unwrap()],
    );
    let (_rendezvous, mut rv_out) = spawn_lines({
        let mut c = net.exec("pub", &bin);
        c.args(["--log", "warn", "rendezvous", "--listen"])
            .arg(format!("{PUBLIC}:443"))
            .args([
                "--http",
                &format!("{PUBLIC}:9443"),
                "--owner-pin",
                &owner_pin,
            ])
            .arg("--dir")
            .arg(dir.join("rv"))
            .arg("--documents")
            .arg(&docs);
        c
    });
    let banner = next_line(&mut rv_out, "rendezvous");
    assert!(banner.contains(&rv_pin), "{banner}");

    // Three sites enroll (dialling out to the hub through their NAT) and run outbound only.
    for site in SITES {
        let token = owner(
            &net,
            dir,
            &["join-token", "--node", &format!("org-{site}/n1")],
        );
        let token_file = dir.join(format!("token-{site}"));
        std::fs::write(&token_file, token.trim()).unwrap();
        let mut c = net.exec(site, &bin);
        c.args(["node", "enroll", "--token-file"])
            .arg(&token_file)
            .arg("--state")
            .arg(dir.join(format!("org-{site}")));
        output(c);
    }
    // The members the rendezvous admits are in the collaboration document: hand it the one
    // that lists the three (it re-reads the file when it changes).
    owner(
        &net,
        dir,
        &["collab", "documents", "--out", docs.to_str().unwrap()],
    );
    // Links: b → c and c → a with a → b (a ring: every site dials and is dialled) on 7101;
    // the MPyC parties' ports: party 0 (a) dials 1 (b, 11366) and 2 (c, 11367), 1 dials 2.
    // a → b (the 100 MB and MPyC's 11366) is made afresh in each case and revoked at its end.
    for (from, to, ports) in [
        ("b", "c", &["7101", "11367"][..]),
        ("c", "a", &["7101"][..]),
        ("a", "c", &["11367"][..]),
    ] {
        link(&net, dir, from, to, ports);
    }
    let mut servers = Vec::new();
    for site in SITES {
        let (server, mut lines) = spawn_lines({
            let mut c = net.exec(site, "python3");
            c.arg(helper()).args(["serve", "9101"]);
            c
        });
        assert_eq!(next_line(&mut lines, "server"), "serving");
        servers.push((server, lines));
    }
    // The same sites, hub, rendezvous and enrolled nodes in each case; only the way out changes.
    let mut forwarded = 0;
    for case in [Egress::Udp, Egress::Tcp443, Egress::Proxy] {
        let started = Instant::now();
        forwarded = run_case(&net, dir, case, &mut servers, forwarded);
        eprintln!("case {case:?} in {:?}", started.elapsed());
    }
    drop(servers);
    drop(_rendezvous);
    drop(_hub);
    drop(net);
}

/// What the sites' router lets out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Egress {
    /// (a) Everything a site opens (UDP too): the nodes carry over QUIC/UDP.
    Udp,
    /// (b) Only TCP to the rendezvous's 443 (and the hub's port): no UDP at all; the nodes
    /// (carrier `auto`) fall back to TLS/TCP by themselves.
    Tcp443,
    /// (c) Nothing but an HTTP CONNECT proxy (tinyproxy on the router); the nodes use it from
    /// `HTTPS_PROXY`, for the hub and the TLS/TCP carrier.
    Proxy,
}

const PROXY_PORT: u16 = 8888;

/// Sets the router's egress rules for `case` (the FORWARD chain after its first rule, which
/// lets replies of open connections through). Starts tinyproxy for [`Egress::Proxy`].
fn set_egress(net: &Net, dir: &Path, case: Egress) -> Option<Proc> {
    // Keep rule 1 (ESTABLISHED,RELATED); drop the rest.
    while output({
        let mut c = net.exec("rtr", "iptables");
        c.args(["-S", "FORWARD"]);
        c
    })
    .lines()
    .filter(|l| l.starts_with("-A FORWARD"))
    .count()
        > 1
    {
        net.sh("rtr", &["iptables", "-D", "FORWARD", "2"]);
    }
    let hub_port = "8443";
    match case {
        Egress::Udp => {
            net.sh(
                "rtr",
                &["iptables", "-A", "FORWARD", "-o", "pub0", "-j", "ACCEPT"],
            );
            None
        }
        Egress::Tcp443 => {
            for port in ["443", hub_port] {
                net.sh(
                    "rtr",
                    &[
                        "iptables", "-A", "FORWARD", "-o", "pub0", "-p", "tcp", "-d", PUBLIC,
                        "--dport", port, "-j", "ACCEPT",
                    ],
                );
            }
            None
        }
        Egress::Proxy => {
            // Nothing is forwarded: the proxy on the router dials out itself.
            let conf = dir.join("tinyproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "Port {PROXY_PORT}\nListen 0.0.0.0\nTimeout 600\nMaxClients 64\n\
                     Allow 10.1.0.0/16\nConnectPort 443\nConnectPort {hub_port}\n\
                     LogLevel Warning\n"
                ),
            )
            .unwrap();
            let mut c = net.exec("rtr", "tinyproxy");
            c.arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let proxy = Proc(c.spawn().expect("start tinyproxy"));
            // Up when a site reaches it.
            let deadline = Instant::now() + 5 * SECOND;
            while !dial(net, "a", "10.1.1.1", PROXY_PORT) {
                assert!(Instant::now() < deadline, "tinyproxy did not come up");
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(proxy)
        }
    }
}

fn dial(net: &Net, from: &str, host: &str, port: u16) -> bool {
    net.exec(from, "python3")
        .arg(helper())
        .args(["dial", host, &port.to_string()])
        .status()
        .unwrap()
        .success()
}

/// Requests and approves a link; returns its id.
fn link(net: &Net, dir: &Path, from: &str, to: &str, ports: &[&str]) -> String {
    let mut args = vec![
        "link".to_owned(),
        "request".into(),
        "--from".into(),
        format!("org-{from}/n1"),
        "--to".into(),
        format!("org-{to}/n1"),
    ];
    for port in ports {
        args.extend(["--port".to_owned(), (*port).to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = owner(net, dir, &args).trim().to_owned();
    let mut c = net.exec("pub", fedmesh_tests::fedmesh_bin());
    c.args(["link", "approve", &id, "--owner-dir"])
        .arg(dir.join("owner"));
    assert!(!output(c).is_empty());
    id
}

fn rendezvous_metric(net: &Net, name: &str) -> u64 {
    let metrics = output({
        let mut c = net.exec("pub", "python3");
        c.args(["-c", &format!(
            "import urllib.request;print(urllib.request.urlopen('http://{PUBLIC}:9443/metrics').read().decode())"
        )]);
        c
    });
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One case: the egress rules, the three nodes started, the ring exercised, 100 MB each way
/// a ⇄ b, a 3-party MPyC job, a → b revoked under an open connection. Returns the bytes the
/// rendezvous has forwarded so far.
fn run_case(
    net: &Net,
    dir: &Path,
    case: Egress,
    servers: &mut [(Proc, Lines<BufReader<ChildStdout>>)],
    forwarded_before: u64,
) -> u64 {
    let bin = fedmesh_tests::fedmesh_bin();
    let _proxy = set_egress(net, dir, case);
    match case {
        Egress::Udp => assert!(dial(net, "a", PUBLIC, 443), "a reaches tcp/443"),
        Egress::Tcp443 => assert!(dial(net, "a", PUBLIC, 443), "a reaches tcp/443"),
        Egress::Proxy => assert!(!dial(net, "a", PUBLIC, 443), "a reached tcp/443 directly"),
    }
    let ab = link(net, dir, "a", "b", &["7101", "11366"]);
    let mut nodes = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let state = dir.join(format!("org-{site}"));
        let _ = std::fs::remove_file(state.join("peers.json"));
        let mut c = net.exec(site, &bin);
        c.args(["--log", "warn", "node", "--outbound-only", "--state"])
            .arg(&state)
            .args([
                "--relay-listen",
                "0.0.0.0:4433",
                "--admin-listen",
                "127.0.0.1:9464",
            ])
            .args(["--expose", "7101=127.0.0.1:9101"])
            .args(match *site {
                "b" => &["--expose", "11366=127.0.0.1:11366"][..],
                "c" => &["--expose", "11367=127.0.0.1:11367"][..],
                _ => &[][..],
            })
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdout(Stdio::null());
        if case == Egress::Proxy {
            // The site's proxy is its gateway; the hub client and the carrier both use it.
            c.env(
                "HTTPS_PROXY",
                format!("http://10.1.{}.1:{PROXY_PORT}", i + 1),
            );
        }
        nodes.push(c.spawn().map(Proc).expect("start node"));
    }

    // The ring: a small exchange over each link.
    let linked = Instant::now();
    for (i, (from, to)) in [("a", "b"), ("b", "c"), ("c", "a")].into_iter().enumerate() {
        let to_index = SITES.iter().position(|s| *s == to).unwrap();
        let addr = peer_addr(dir, from, to, 7101);
        assert!(addr.ip().is_loopback(), "{addr}");
        transfer(
            net,
            from,
            addr,
            &mut servers[to_index].1,
            64 * 1024,
            64 * 1024 + i,
        );
    }
    eprintln!(
        "{case:?}: three links carried {:?} after the nodes started",
        linked.elapsed()
    );
    let tcp_nodes = rendezvous_metric(net, "fedmesh_rendezvous_tcp_nodes{collab=\"nat\"}");
    let expected = match case {
        Egress::Udp => 0,
        Egress::Tcp443 | Egress::Proxy => 3,
    };
    assert_eq!(
        tcp_nodes, expected,
        "{case:?}: nodes on the TLS/TCP carrier"
    );

    // 100 MB each way over a → b, byte-exact.
    let a_b = peer_addr(dir, "a", "b", 7101);
    let sealed_metric =
        "fedmesh_rendezvous_sealed_datagrams_total{collab=\"nat\",direction=\"out\"}";
    let sealed_before = rendezvous_metric(net, sealed_metric);
    let started = Instant::now();
    transfer(net, "a", a_b, &mut servers[1].1, 100 * MB, 100 * MB);
    eprintln!("{case:?}: 100 MB each way a ⇄ b in {:?}", started.elapsed());
    // With UDP out, the relays' own sockets reach the rendezvous through the NAT: the
    // packets take the sealed path; without, the carrier connections carry them all.
    let sealed = rendezvous_metric(net, sealed_metric) - sealed_before;
    match case {
        Egress::Udp => assert!(sealed > 100_000, "{case:?}: {sealed} sealed datagrams"),
        Egress::Tcp443 | Egress::Proxy => assert_eq!(sealed, 0, "{case:?}: sealed datagrams"),
    }
    let forwarded = rendezvous_metric(
        net,
        "fedmesh_rendezvous_bytes_total{collab=\"nat\",direction=\"out\"}",
    );
    assert!(
        forwarded - forwarded_before > 200 * MB as u64,
        "{case:?}: the bytes went through the rendezvous ({forwarded_before} → {forwarded})"
    );

    // A 3-party MPyC job, unmodified, each party in its own site, with the addresses its
    // node hands out (its peers.json as FEDMESH_PEERS).
    for (from, to, port) in [("a", "b", 11366), ("a", "c", 11367), ("b", "c", 11367)] {
        peer_addr(dir, from, to, port);
    }
    let started = Instant::now();
    let parties: Vec<_> = SITES
        .iter()
        .enumerate()
        .map(|(i, site)| {
            let peers = std::fs::read_to_string(dir.join(format!("org-{site}/peers.json")))
                .expect("peers.json");
            let mut c = net.exec(site, fedmesh_tests::python());
            c.arg(fedmesh_tests::repo_root().join("examples/mpyc/party.py"))
                .env("FEDMESH_PARTY_INDEX", i.to_string())
                .env("FEDMESH_PARTIES", "org-a,org-b,org-c")
                .env("FEDMESH_COLLAB", "nat")
                .env("FEDMESH_PEERS", peers)
                .env("FEDMESH_MPC_START_TIMEOUT", "30")
                .env("FEDMESH_MPC_TIMEOUT", "30");
            std::thread::spawn(move || c.output().expect("run an MPyC party"))
        })
        .collect();
    for (i, party) in parties.into_iter().enumerate() {
        let out = party.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("party {i}: sum=67 argmax=1")),
            "{case:?}: MPyC party {i}: {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("{case:?}: 3-party MPyC job in {:?}", started.elapsed());

    // An open connection over a → b; the owner revokes the link; it is closed within 5 s.
    let (_hold, mut hold) = spawn_lines({
        let mut c = net.exec("a", "python3");
        c.arg(helper())
            .args(["hold", &a_b.ip().to_string(), &a_b.port().to_string()]);
        c
    });
    assert_eq!(next_line(&mut hold, "hold"), "open");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(hold.next());
    });
    // Still open before the revocation.
    assert!(
        matches!(
            rx.recv_timeout(SECOND),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        ),
        "{case:?}: the held connection ended before the revocation"
    );
    let revoked = Instant::now();
    let mut c = net.exec("pub", &bin);
    c.args(["link", "revoke", &ab, "--owner-dir"])
        .arg(dir.join("owner"));
    output(c);
    let closed = rx.recv_timeout(5 * SECOND);
    let elapsed = revoked.elapsed();
    assert!(
        matches!(closed, Ok(Some(Ok(ref l))) if l == "closed") && elapsed < 5 * SECOND,
        "{case:?}: the connection over the revoked link was not closed within 5 s: {closed:?} after {elapsed:?}"
    );
    eprintln!("{case:?}: revoked link closed after {elapsed:?}");
    // a's peer map drops org-b (its only link to it is gone) within 5 s.
    loop {
        let peers = std::fs::read_to_string(dir.join("org-a/peers.json")).unwrap_or_default();
        if !peers.contains("org-b.nat.fedmesh") {
            break;
        }
        assert!(
            revoked.elapsed() < 5 * SECOND,
            "{case:?}: org-a still lists org-b after the revocation: {peers}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The other links still carry.
    let bc = peer_addr(dir, "b", "c", 7101);
    transfer(net, "b", bc, &mut servers[2].1, 1024, 1024);
    // The server side of the held connection reports its end.
    let _ = next_line(&mut servers[1].1, "held connection");
    drop(nodes);
    forwarded
}
