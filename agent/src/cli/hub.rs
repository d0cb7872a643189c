//! `fedmesh hub`: run the hub.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::TcpListener;
use tracing::info;

use crate::hub::{self, Hub, tls::HubCert};

/// `fedmesh hub`
#[derive(Debug, Args)]
pub struct HubArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Data directory (store, TLS key 0600).
    #[arg(long)]
    data: PathBuf,
    /// Lifetime of the node certificates online CAs issue (at most 7d).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    cert_ttl: std::time::Duration,
    /// DNS names and IP addresses for the hub certificate (first start only).
    #[arg(long = "name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
    names: Vec<String>,
}

pub(crate) async fn run(args: HubArgs) -> Result<()> {
    let HubArgs {
        listen,
        data,
        cert_ttl,
        names,
    } = args;
    let cert = HubCert::load_or_create(&data, &names)?;
    let hub = Hub::open_with(&data, cert_ttl)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    // Printed on stdout so scripts can read the address and pin.
    println!("hub listening on https://{addr}\nhub pin {}", cert.pin());
    info!(%addr, pin = %cert.pin(), "hub started");
    hub::run(
        listener,
        hub,
        Arc::new(cert.server_config()?),
        shutdown_signal(),
    )
    .await
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
