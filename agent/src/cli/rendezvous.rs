//! `fedmesh rendezvous`: run a rendezvous server (see [`crate::rendezvous`]) for a
//! collaboration whose nodes accept no inbound connections.
//!
//! The first start makes the server certificate and key in `--dir` and prints the pin the owner
//! lists (`fedmesh collab rendezvous`); later starts reuse them. What the rendezvous admits comes
//! from the collaboration's signed documents in `--documents` (one JWS per line), verified
//! against the owner key `--owner-pin` and re-read when the file changes.
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
    #[arg(long, required_unless_present = "print_pin")]
    documents: Option<PathBuf>,
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
    let (Some(documents), Some(owner_pin)) = (args.documents, args.owner_pin) else {
        bail!("give --documents and --owner-pin");
    };
    let pin = cert.pin();
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
    let watch_task = tokio::spawn(follow_documents(
        server.clone(),
        documents,
        owner_pin,
        stop.clone(),
    ));
    let tcp_task = tcp.map(|listener| {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move { server.run_tcp(listener, stop.cancelled()).await })
    });
    println!(
        "rendezvous running: udp/{udp_addr}{} (certificate pin {pin}), http://{http_addr}",
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
