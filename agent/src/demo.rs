//! `fedmesh demo`: a whole collaboration on one machine. An embedded hub, three organisations
//! enrolled with join tokens, links requested and approved, relay mode on loopback; then proof
//! that bytes cross every link, and optionally a command per organisation with that
//! organisation's peer map in its environment.
//!
//! The links are what an MPyC computation and a Flower federation need:
//!
//! ```text
//!  MPyC   party 0 (org-a) ─▶ party 1 (org-b, port 11366)    org-a ─▶ org-c (11367)
//!         party 1 (org-b) ─▶ party 2 (org-c, port 11367)
//!  Flower clients org-b, org-c ─▶ server at org-a (port 8080)
//! ```
//!
//! Each organisation's algorithms listen on a port of their own (a free one, picked at start,
//! because all three share one machine with whatever else runs there; FEDMESH_LISTEN says which);
//! peers reach them at `<org>.collab-x.fedmesh:<port>`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_documents::{NodeRef, PortSpec, TaskRef};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

use crate::{
    mesh::{LocalMesh, MeshOptions, NodeSpec},
    node::Expose,
    output::table,
};

/// The demo's vantage6 task id (every demo link serves it).
pub const TASK_ID: u64 = 1;

/// One organisation of the demo.
#[derive(Clone, Debug)]
pub struct Org {
    /// Its node.
    pub node: NodeRef,
    /// Its index: MPyC party index, vantage6 organisation id minus one.
    pub index: usize,
    /// Ports it exposes (its algorithms listen on free ports picked at start).
    pub exposes: Vec<PortSpec>,
}

/// A link the demo opens.
#[derive(Clone, Debug)]
pub struct DemoLink {
    /// Dialling organisation (index).
    pub from: usize,
    /// Accepting organisation (index).
    pub to: usize,
    /// The port and label.
    pub port: PortSpec,
}

/// The demo's organisations.
pub fn orgs() -> Vec<Org> {
    let expose = |port: u16, label: &str| PortSpec {
        port,
        label: Some(label.to_owned()),
    };
    vec![
        Org {
            node: node("org-a/n1"),
            index: 0,
            exposes: vec![expose(8080, "flower")],
        },
        Org {
            node: node("org-b/n1"),
            index: 1,
            exposes: vec![expose(11366, "mpc")],
        },
        Org {
            node: node("org-c/n1"),
            index: 2,
            exposes: vec![expose(11367, "mpc")],
        },
    ]
}

fn node(s: &str) -> NodeRef {
    s.parse()
        .unwrap_or_else(|_| unreachable!("literal node names are valid"))
}

/// The demo's links: MPyC's full mesh (lower party dials higher) and Flower's spokes.
pub fn links() -> Vec<DemoLink> {
    let mpc = |from, to, port| DemoLink {
        from,
        to,
        port: PortSpec {
            port,
            label: Some("mpc".into()),
        },
    };
    let flower = |from| DemoLink {
        from,
        to: 0,
        port: PortSpec {
            port: 8080,
            label: Some("flower".into()),
        },
    };
    vec![
        mpc(0, 1, 11366),
        mpc(0, 2, 11367),
        mpc(1, 2, 11367),
        flower(1),
        flower(2),
    ]
}

/// Starts the demo collaboration in `dir` with `links` approved.
pub async fn start(dir: &Path, opts: &MeshOptions, links: &[DemoLink]) -> Result<LocalMesh> {
    let orgs = orgs();
    let mut specs = Vec::new();
    for o in &orgs {
        let mut exposes = Vec::new();
        for p in &o.exposes {
            exposes.push(Expose {
                port: p.port,
                label: p.label.clone(),
                target: format!("127.0.0.1:{}", free_port()?),
            });
        }
        specs.push(NodeSpec {
            node: o.node.clone(),
            organization_id: Some(o.index as u64 + 1),
            exposes,
        });
    }
    let mesh = LocalMesh::start(dir, opts, &specs).await?;
    for l in links {
        mesh.link(
            &orgs[l.from].node,
            &orgs[l.to].node,
            std::slice::from_ref(&l.port),
            Duration::from_secs(12 * 3600),
            Some(TaskRef {
                task_id: TASK_ID,
                parent_id: None,
            }),
        )
        .await?;
    }
    for l in links {
        mesh.peer_addr(
            &orgs[l.from].node,
            &orgs[l.to].node,
            l.port.port,
            Duration::from_secs(10),
        )
        .await?;
    }
    Ok(mesh)
}

/// A TCP port free on every address now (the kernel's pick; it stays free unless something
/// else takes it before the algorithm binds it).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Where `node`'s algorithms listen for `port`.
fn target(mesh: &LocalMesh, node: &NodeRef, port: u16) -> Result<String> {
    mesh.options
        .get(node)
        .and_then(|o| o.exposes.iter().find(|e| e.port == port))
        .map(|e| e.target.clone())
        .with_context(|| format!("{node} exposes no port {port}"))
}

/// Prints the links and each organisation's peer table.
pub async fn print_overview(mesh: &LocalMesh) -> Result<()> {
    println!(
        "collaboration {} · hub {} (embedded) · {} organisations, relay mode on loopback\n",
        mesh.owner.collab.id,
        mesh.hub.url,
        mesh.nodes.len()
    );
    let links = mesh.owner.links().await?;
    let rows: Vec<[String; 5]> = links
        .iter()
        .map(|l| {
            [
                l.terms.id.clone(),
                l.terms.from.to_string(),
                l.terms.to.to_string(),
                l.terms
                    .ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                l.state.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["LINK", "FROM", "TO", "PORTS", "STATE"], &rows)
    );
    for (node, handle) in &mesh.nodes {
        let snap = handle.snapshot.borrow().clone();
        println!("\n{node} sees (FEDMESH_PEERS):");
        let rows: Vec<[String; 2]> = snap
            .peer_map()
            .into_iter()
            .map(|(name, addrs)| [name, addrs.join(", ")])
            .collect();
        if rows.is_empty() {
            println!("  (no peers it may dial)");
        } else {
            print!("{}", table(&["PEER NAME", "ADDRESS"], &rows));
        }
    }
    Ok(())
}

/// Sends 64 KiB through every link to an echo server at the target and checks it comes back.
pub async fn prove_traffic(mesh: &LocalMesh, links: &[DemoLink]) -> Result<()> {
    let orgs = orgs();
    println!("\ntraffic through every link:");
    for l in links {
        let (from, to) = (&orgs[l.from], &orgs[l.to]);
        let target = target(mesh, &to.node, l.port.port)?;
        let echo = TcpListener::bind(&target)
            .await
            .with_context(|| format!("binding a test echo server on {target}"))?;
        let server = tokio::spawn(async move {
            if let Ok((mut tcp, _)) = echo.accept().await {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let addr = mesh
            .peer_addr(&from.node, &to.node, l.port.port, Duration::from_secs(10))
            .await?;
        let started = Instant::now();
        let result = echo_roundtrip(addr, 64 * 1024).await;
        server.abort();
        let elapsed = started.elapsed();
        match result {
            Ok(n) => println!(
                "  {} -> {} {:<12} via {addr:<20} {n} bytes echoed intact in {:.1} ms",
                from.node,
                to.node,
                l.port.to_string(),
                elapsed.as_secs_f64() * 1e3
            ),
            Err(e) => bail!("{} -> {} port {}: {e:#}", from.node, to.node, l.port.port),
        }
    }
    Ok(())
}

async fn echo_roundtrip(addr: SocketAddr, size: usize) -> Result<usize> {
    let mut payload = vec![0u8; size];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut payload)
        .map_err(|_| anyhow::anyhow!("random source failed"))?;
    let mut tcp = TcpStream::connect(addr).await?;
    let (mut r, mut w) = tcp.split();
    let write = async {
        w.write_all(&payload).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(size);
    let read = r.read_to_end(&mut back);
    let (written, read) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
            .await
            .context("echo timed out")?;
    written?;
    read?;
    if back != payload {
        bail!(
            "{} bytes came back, {} differ",
            back.len(),
            back.iter().zip(&payload).filter(|(a, b)| a != b).count()
        );
    }
    Ok(back.len())
}

/// The environment a command of organisation `org` gets.
pub fn environment(mesh: &LocalMesh, org: &Org) -> Result<BTreeMap<String, String>> {
    let handle = mesh.node(&org.node);
    let snap = handle.snapshot.borrow().clone();
    let listen: BTreeMap<String, String> = org
        .exposes
        .iter()
        .map(|p| Ok((p.port.to_string(), target(mesh, &org.node, p.port)?)))
        .collect::<Result<_>>()?;
    let v6 = handle
        .v6_addr
        .context("demo agents serve the vantage6 address API")?;
    // The demo's commands connect from 127.0.0.1: that is the run the address API trusts.
    if let Err(e) = handle.runs.announce(crate::node::v6::LocalRun {
        task_id: TASK_ID,
        parent_id: None,
        source: std::net::Ipv4Addr::LOCALHOST.into(),
        ports: org.exposes.clone(),
        host: None,
        image: None,
    }) {
        bail!("announcing the demo run: {e}");
    }
    let claims = serde_json::json!({
        "sub": {"task_id": TASK_ID, "organization_id": org.index + 1, "node": org.node.to_string()}
    });
    // A container token in vantage6's shape (HS256, signed with a secret the node never sees:
    // here a placeholder signature, as the node cannot check it either way).
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"signed-by-the-vantage6-server")
    );
    Ok(BTreeMap::from([
        ("FEDMESH_ORG".into(), org.node.org.clone()),
        ("FEDMESH_NODE".into(), org.node.to_string()),
        ("FEDMESH_COLLAB".into(), mesh.owner.collab.id.clone()),
        ("FEDMESH_PARTY_INDEX".into(), org.index.to_string()),
        (
            "FEDMESH_PARTIES".into(),
            orgs()
                .iter()
                .map(|o| o.node.org.clone())
                .collect::<Vec<_>>()
                .join(","),
        ),
        (
            "FEDMESH_PEERS".into(),
            serde_json::to_string(&snap.peer_map())?,
        ),
        ("FEDMESH_LISTEN".into(), serde_json::to_string(&listen)?),
        ("HOST".into(), format!("http://{}", v6.ip())),
        ("PORT".into(), v6.port().to_string()),
        ("API_PATH".into(), String::new()),
        ("CONTAINER_TOKEN".into(), token),
    ]))
}

/// What one organisation's command did.
#[derive(Debug)]
pub struct Outcome {
    /// The organisation's node.
    pub node: NodeRef,
    /// Its exit code; `None` when killed at the timeout.
    pub code: Option<i32>,
    /// Everything it printed (stdout and stderr, interleaved by line).
    pub output: Vec<String>,
}

/// Runs `command` (via `sh -c`) once per organisation, all at once. Their output is echoed with
/// an `[org]` prefix (unless `quiet`) and kept.
pub async fn exec(
    mesh: &LocalMesh,
    command: &str,
    timeout: Duration,
    quiet: bool,
) -> Result<Vec<Outcome>> {
    let mut running = Vec::new();
    for org in orgs() {
        let env = environment(mesh, &org)?;
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .envs(&env)
            // Its own process group, so a timeout kills everything the command started.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let streams: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for stream in streams.into_iter().flatten() {
            let (lines, org_name) = (lines.clone(), org.node.org.clone());
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if !quiet {
                        println!("  [{org_name}] {line}");
                    }
                    lines
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(line);
                }
            }));
        }
        running.push((org.node, child, lines, readers));
    }
    let mut outcomes = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    for (node, mut child, lines, readers) in running {
        let code = match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => None,
        };
        // Whatever the command left behind (it may have exited while its children run on)
        // goes with it: its output pipes close and the readers finish.
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::SIGKILL,
            );
        }
        let _ = child.wait().await;
        for reader in readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
        let output = std::mem::take(&mut *lines.lock().unwrap_or_else(PoisonError::into_inner));
        outcomes.push(Outcome { node, code, output });
    }
    Ok(outcomes)
}
