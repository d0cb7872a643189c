//! `fedmesh hub`: run the hub.
//!
//! `--init` makes a new hub when the data directory is absent or empty (store, TLS key and
//! certificate, and the CA key file when it is not there yet); with anything in the directory
//! it only opens it, with every check. Without `--init`, a missing or empty data directory is
//! an error: a lost volume stops the hub instead of starting a new one with a new pin.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::TcpListener;
use tracing::info;

use crate::hub::{self, Hub, HubOptions, limits::Limits};

/// `fedmesh hub`
#[derive(Debug, Args)]
pub struct HubArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Data directory (mode 0700: store, TLS key; checked on every start).
    #[arg(long)]
    data: PathBuf,
    /// Make a new hub when the data directory is absent or empty (opens it otherwise).
    #[arg(long)]
    init: bool,
    /// The key that seals online CA keys at rest (made by --init when absent); default
    /// `<data>/ca.key`. Keep it outside the data directory, so copies of the data hold no
    /// usable CA key.
    #[arg(long, env = "FEDMESH_HUB_CA_KEY_FILE")]
    ca_key_file: Option<PathBuf>,
    /// Lifetime of the node certificates online CAs issue (at most 7d).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    cert_ttl: std::time::Duration,
    /// DNS names and IP addresses for the hub certificate (--init only).
    #[arg(long = "name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
    names: Vec<String>,
    /// Only these owner keys (thumbprints) may create collaborations (repeatable; default: any
    /// owner). Set it on a hub strangers can reach, so nobody takes your collaboration's id.
    #[arg(
        long = "allow-owner",
        env = "FEDMESH_HUB_ALLOW_OWNERS",
        value_delimiter = ','
    )]
    allow_owners: Vec<String>,
    /// Connections open at once (lowered to fit the process's open-file limit).
    #[arg(long, default_value_t = Limits::default().connections.max_connections)]
    max_connections: usize,
    /// Connections open at once from one IP address (raise it when many nodes share one
    /// address, e.g. behind SNAT).
    #[arg(long, default_value_t = Limits::default().connections.max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Requests one IP address may make at once (then 50 a second); raise it with
    /// --max-connections-per-ip when many nodes share one address.
    #[arg(long, default_value_t = Limits::default().requests_per_ip.burst)]
    requests_per_ip_burst: u32,
    /// Documents one identity (a node, or the owner) may store at once (then 2 a second).
    #[arg(long, default_value_t = Limits::default().writes_per_identity.burst)]
    writes_per_identity_burst: u32,
    /// Documents one member node may have stored.
    #[arg(long, default_value_t = Limits::default().member_quota.docs)]
    member_quota_docs: usize,
    /// Bytes of documents one member node may have stored.
    #[arg(long, default_value_t = Limits::default().member_quota.bytes)]
    member_quota_bytes: usize,
    /// Documents one collaboration may have stored.
    #[arg(long, default_value_t = Limits::default().collab_quota.docs)]
    collab_quota_docs: usize,
    /// Bytes of documents one collaboration may have stored.
    #[arg(long, default_value_t = Limits::default().collab_quota.bytes)]
    collab_quota_bytes: usize,
}

pub(crate) async fn run(args: HubArgs) -> Result<()> {
    let HubArgs {
        listen,
        data,
        init,
        ca_key_file,
        cert_ttl,
        names,
        allow_owners,
        max_connections,
        max_connections_per_ip,
        requests_per_ip_burst,
        writes_per_identity_burst,
        member_quota_docs,
        member_quota_bytes,
        collab_quota_docs,
        collab_quota_bytes,
    } = args;
    let mut limits = Limits::default();
    limits.connections.max_connections = max_connections;
    limits.connections.max_connections_per_ip = max_connections_per_ip;
    limits.requests_per_ip.burst = requests_per_ip_burst;
    limits.writes_per_identity.burst = writes_per_identity_burst;
    limits.member_quota.docs = member_quota_docs;
    limits.member_quota.bytes = member_quota_bytes;
    limits.collab_quota.docs = collab_quota_docs;
    limits.collab_quota.bytes = collab_quota_bytes;
    let options = HubOptions {
        cert_ttl,
        ca_key_file,
        allowed_owners: allow_owners
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect::<BTreeSet<_>>(),
        limits,
    };
    let empty = std::fs::read_dir(&data).map_or(true, |mut d| d.next().is_none());
    if init && empty {
        Hub::init(&data, &names, &options)?;
    }
    let hub = Hub::open(&data, options)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let pin = hub.cert().pin();
    let config = Arc::new(hub.cert().server_config()?);
    // Printed on stdout so scripts can read the address and pin.
    println!("hub listening on https://{addr}\nhub pin {pin}");
    info!(%addr, %pin, "hub started");
    hub::run(listener, hub, config, shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
