//! `fedmesh rendezvous`: run a rendezvous server (see [`crate::rendezvous`]) for a
//! collaboration whose nodes accept no inbound connections.
//!
//! The first start makes the server certificate and key in `--dir` and prints the pin the owner
//! lists (`fedmesh collab rendezvous`); later starts reuse them. What the rendezvous admits comes
//! from the collaboration's signed documents, verified against the owner key `--owner-pin`:
//! followed at the hub (`--hub`, `--hub-pin`, `--collab`; the hub lets a rendezvous the owner
//! lists read them with its certificate) or read from `--documents` (one JWS per line, re-read
//! when the file changes).
//!
//! Replicas: several processes sharing the certificate and key (copy `--dir`, or mount one
//! Secret) serve one collaboration behind one or several addresses; `--peer host:port` (a name
//! may resolve to every replica, e.g. a headless Service) makes them forward to each other, see
//! [`crate::rendezvous::mesh`].
//!
//! Nodes reach it over QUIC/UDP, or over TLS/TCP (an HTTP/1.1 upgrade, also through HTTP
//! CONNECT proxies) on the same port number unless `--tcp-listen` or `--no-tcp` says otherwise.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::rendezvous::{
    self, Rendezvous, RendezvousMetrics, RendezvousOptions, ServerCert, config_of,
    ledger_from_lines,
};

/// Largest documents file read.
const MAX_DOCUMENTS_BYTES: u64 = 16 * 1024 * 1024;

/// `fedmesh rendezvous`
#[derive(Debug, Args)]
pub struct RendezvousArgs {
    /// UDP address nodes connect to (QUIC).
    #[arg(long, default_value = "0.0.0.0:443")]
    listen: SocketAddr,
    /// TCP address of the TLS/TCP carrier (an HTTP/1.1 upgrade; passes HTTP CONNECT proxies
    /// and TCP load balancers) for sites that may not send UDP; default: the address and port
    /// UDP is bound to (nodes dial the listed host:port on either).
    #[arg(long, conflicts_with = "no_tcp")]
    tcp_listen: Option<SocketAddr>,
    /// Serve no TLS/TCP carrier (QUIC/UDP only).
    #[arg(long)]
    no_tcp: bool,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, default_value = "127.0.0.1:9443")]
    http: SocketAddr,
    /// Directory of the server certificate and key (made on the first start; keep it: the
    /// owner lists the certificate's pin).
    #[arg(long)]
    dir: PathBuf,
    /// DNS names and IP addresses for the certificate (first start only).
    #[arg(long = "name", default_values_t = ["localhost".to_owned()])]
    names: Vec<String>,
    /// Print the certificate pin and exit.
    #[arg(long)]
    print_pin: bool,
    /// The collaboration's signed documents, one JWS per line (the collaboration document and
    /// the latest revocation list); re-read when it changes.
    #[arg(long, required_unless_present_any = ["print_pin", "hub"], conflicts_with = "hub")]
    documents: Option<PathBuf>,
    /// Follow the collaboration's documents at this hub (`https://host:port`) instead of a
    /// file; the rendezvous authenticates with its own certificate, which the owner lists.
    #[arg(long, requires_all = ["hub_pin", "collab"])]
    hub: Option<String>,
    /// SHA-256 pin of the hub's certificate.
    #[arg(long)]
    hub_pin: Option<String>,
    /// The collaboration id to follow at the hub.
    #[arg(long)]
    collab: Option<String>,
    /// A peer replica (`host:port` of its `--mesh-listen`), repeatable; a name resolving to
    /// several addresses (a headless Service) names them all, this replica may be among them.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// UDP address peer replicas connect to; the mesh runs when this or `--peer` is given
    /// (default with `--peer`: 0.0.0.0:8444). One side naming the other is enough.
    #[arg(long)]
    mesh_listen: Option<SocketAddr>,
    /// Thumbprint of the owner key the collaboration document must be signed with.
    #[arg(long, required_unless_present = "print_pin")]
    owner_pin: Option<String>,
    /// Bytes per second one node may send through the rendezvous.
    #[arg(long, default_value_t = RendezvousOptions::default().rate)]
    rate_per_node: u64,
    /// Most nodes connected at once.
    #[arg(long, default_value_t = RendezvousOptions::default().max_nodes)]
    max_nodes: usize,
}

/// Runs `fedmesh rendezvous` until SIGTERM or Ctrl-C.
pub async fn run(args: RendezvousArgs) -> Result<()> {
    let cert = ServerCert::load_or_create(&args.dir, &args.names)?;
    if args.print_pin {
        println!("{}", cert.pin());
        return Ok(());
    }
    let Some(owner_pin) = args.owner_pin else {
        bail!("give --owner-pin");
    };
    let hub = match (&args.hub, &args.hub_pin) {
        (Some(url), Some(hub_pin)) => {
            let tls = crate::hub::tls::pinned_client_config_presenting(
                hub_pin,
                vec![cert.certificate()],
                cert.private_key()?,
                b"http/1.1",
            )?;
            Some(crate::hub::client::HubClient::with_tls(url, tls)?)
        }
        _ => None,
    };
    let pin = cert.pin();
    let mesh_listen = match (args.mesh_listen, args.peers.is_empty()) {
        (Some(addr), _) => Some(addr),
        (None, false) => Some(SocketAddr::from(([0, 0, 0, 0], 8444))),
        (None, true) => None,
    };
    let mesh_socket = match mesh_listen {
        Some(addr) => Some(
            std::net::UdpSocket::bind(addr)
                .with_context(|| format!("binding the rendezvous mesh on udp/{addr}"))?,
        ),
        None => None,
    };
    let socket = std::net::UdpSocket::bind(args.listen)
        .with_context(|| format!("binding the rendezvous on udp/{}", args.listen))?;
    let options = RendezvousOptions {
        rate: args.rate_per_node,
        burst: args.rate_per_node.clamp(64 * 1024, 4 * 1024 * 1024),
        max_nodes: args.max_nodes,
        ..RendezvousOptions::default()
    };
    let metrics = Arc::new(RendezvousMetrics::default());
    let server = Arc::new(Rendezvous::new(socket, cert, options, metrics.clone())?);
    let udp_addr = server.local_addr()?;
    let tcp = match (args.no_tcp, args.tcp_listen) {
        (true, _) => None,
        (false, listen) => {
            let listen = listen.unwrap_or(udp_addr);
            Some(TcpListener::bind(listen).await.with_context(|| {
                format!("binding the rendezvous TLS/TCP carrier on tcp/{listen} (--tcp-listen, --no-tcp)")
            })?)
        }
    };
    let tcp_addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
    let mesh = match mesh_socket {
        Some(socket) => {
            let mesh = server.start_mesh(socket, rendezvous::mesh::MeshOptions::default())?;
            mesh.set_peers(args.peers.clone());
            Some(mesh.local_addr()?)
        }
        None => None,
    };
    let http = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding the rendezvous HTTP server on {}", args.http))?;
    let http_addr = http.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let http_task = tokio::spawn(rendezvous::http::serve(
        http,
        server.ready(),
        metrics,
        stop.clone().cancelled_owned(),
    ));
    let watch_task = match (hub, args.collab, args.documents) {
        (Some(hub), Some(collab), _) => tokio::spawn(rendezvous::follow::follow_hub(
            server.clone(),
            hub,
            collab,
            owner_pin,
            stop.clone(),
        )),
        (_, _, Some(documents)) => tokio::spawn(follow_documents(
            server.clone(),
            documents,
            owner_pin,
            stop.clone(),
        )),
        _ => bail!("give --documents, or --hub, --hub-pin and --collab"),
    };
    let tcp_task = tcp.map(|listener| {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move { server.run_tcp(listener, stop.cancelled()).await })
    });
    let mesh = mesh.map(|m| format!(", mesh/{m}")).unwrap_or_default();
    println!(
        "rendezvous running: udp/{udp_addr}{} (certificate pin {pin}), http://{http_addr}{mesh}",
        tcp_addr.map(|a| format!(" tcp/{a}")).unwrap_or_default()
    );
    server.run(super::hub::shutdown_signal()).await?;
    stop.cancel();
    if let Some(task) = tcp_task {
        let _ = task.await;
    }
    let _ = http_task.await;
    let _ = watch_task.await;
    Ok(())
}

/// Re-reads `path` when it changes and hands the verified result to the rendezvous.
async fn follow_documents(
    server: Arc<Rendezvous>,
    path: PathBuf,
    owner_pin: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last: Option<Vec<u8>> = None;
    loop {
        match read_bounded(&path) {
            Ok(bytes) if last.as_ref() != Some(&bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let (ledger, problems) =
                    ledger_from_lines(&owner_pin, &text, std::time::SystemTime::now());
                for problem in &problems {
                    warn!(file = %path.display(), %problem, "document skipped");
                }
                match config_of(&ledger) {
                    Some(config) => match server.update(config) {
                        Ok(()) => info!(
                            file = %path.display(),
                            revocation = ledger.revocation().number,
                            "collaboration documents loaded"
                        ),
                        Err(error) => {
                            warn!(error = %format!("{error:#}"), "cannot apply the documents");
                        }
                    },
                    None => {
                        warn!(file = %path.display(), "no verified collaboration document in the file");
                    }
                }
                last = Some(bytes);
            }
            Ok(_) => {}
            Err(error) => {
                warn!(file = %path.display(), error = %format!("{error:#}"), "cannot read the documents");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

fn read_bounded(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_DOCUMENTS_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_DOCUMENTS_BYTES {
        bail!("larger than {MAX_DOCUMENTS_BYTES} bytes");
    }
    Ok(bytes)
}
