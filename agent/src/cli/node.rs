//! `fedmesh node`: enroll a node, run the node agent, or print its peer map.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use fedmesh_certs::files;
use fedmesh_mesh_config::addresses::Pool;

use super::{
    hub::shutdown_signal,
    owner::{self, EnrollArgs},
};
use crate::{
    node::{self, Expose, NodeOptions},
    relay::{DEFAULT_LOOPBACK_POOL, RelayOptions},
};

/// How the agent carries links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Carry the traffic with fedmesh's own QUIC relay.
    #[default]
    Relay,
}

/// `fedmesh node`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    #[command(flatten)]
    run: RunArgs,
}

/// `fedmesh node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Enroll with a join token: make the node key here, get a certificate.
    Enroll(EnrollArgs),
    /// Print this node's peer map (FEDMESH_PEERS: name -> IP:ports) as JSON.
    Peers {
        /// Node state directory.
        #[arg(long)]
        state: PathBuf,
    },
}

/// Running the agent.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Node state directory (made by `fedmesh node enroll`).
    #[arg(long, env = "FEDMESH_STATE")]
    state: Option<PathBuf>,
    /// How links are carried.
    #[arg(long, value_enum, default_value_t)]
    mode: Mode,
    /// UDP address of the QUIC relay.
    #[arg(long, default_value = "0.0.0.0:4433")]
    relay_listen: SocketAddr,
    /// The relay address peers dial (host:port); default: the bound address.
    #[arg(long)]
    advertise: Option<String>,
    /// Pool of local addresses for peers (one per peer).
    #[arg(long, default_value = DEFAULT_LOOPBACK_POOL)]
    loopback_pool: Pool,
    /// A port exposed to peers: <port>[:<label>][=<target host:port>] (repeatable).
    #[arg(long = "expose")]
    exposes: Vec<Expose>,
    /// DNS server for peer names (e.g. 127.0.0.1:5353).
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Admin HTTP server: /healthz, /readyz, /metrics, /peers, /vpn/algorithm/addresses.
    #[arg(long, default_value = "127.0.0.1:9464")]
    admin_listen: SocketAddr,
    /// Largest UDP payload for QUIC path MTU discovery.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
}

pub(crate) async fn run(args: NodeArgs) -> Result<()> {
    match args.command {
        Some(NodeCommand::Enroll(args)) => owner::run_enroll(args).await,
        Some(NodeCommand::Peers { state }) => {
            println!("{}", files::read_to_string(&state.join("peers.json"))?);
            Ok(())
        }
        None => run_agent(args.run).await,
    }
}

async fn run_agent(args: RunArgs) -> Result<()> {
    let RunArgs {
        state,
        mode: Mode::Relay,
        relay_listen,
        advertise,
        loopback_pool,
        exposes,
        dns_listen,
        admin_listen,
        max_udp_payload,
    } = args;
    let Some(state) = state else {
        anyhow::bail!("give --state <dir> (enroll first with `fedmesh node enroll`)");
    };
    let handle = node::start(NodeOptions {
        state,
        relay_listen,
        advertise,
        loopback_pool,
        exposes,
        dns_listen,
        admin_listen: Some(admin_listen),
        relay: RelayOptions {
            max_udp_payload,
            ..RelayOptions::default()
        },
    })
    .await?;
    println!(
        "node agent {} running: relay udp/{}, admin http://{}{}",
        handle.node,
        handle.relay_addr,
        handle.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        handle
            .dns_addr
            .map(|a| format!(", dns {a}"))
            .unwrap_or_default(),
    );
    handle.run_until(shutdown_signal()).await
}
