//! The `fedmesh` command line (clap derive). Each group of subcommands lives in its own module;
//! this one only parses and dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod audit;
pub mod certs;
pub mod demo;
pub mod hub;
pub mod node;
pub mod owner;
pub mod render;

/// fedmesh: per-collaboration mTLS peer links for federated analytics.
#[derive(Debug, Parser)]
#[command(name = "fedmesh", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax); default `info`, `warn` for the demo.
    #[arg(long, global = true, env = "FEDMESH_LOG")]
    pub log: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Every `fedmesh` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage a collaboration CA (offline).
    #[command(subcommand)]
    Ca(certs::CaCommand),
    /// Make a node key (if absent) and a CSR for a node identity.
    Csr(certs::CsrArgs),
    /// Inspect certificates.
    #[command(subcommand)]
    Cert(certs::CertCommand),
    /// Run the hub: the mailbox that carries signed documents between organisations.
    Hub(hub::HubArgs),
    /// Manage a collaboration (owner).
    #[command(subcommand)]
    Collab(owner::CollabCommand),
    /// Admit a node and issue its one-time join token (owner).
    JoinToken(owner::JoinTokenArgs),
    /// Request, approve, veto, revoke and list peer links.
    #[command(subcommand)]
    Link(owner::LinkCommand),
    /// Enroll a node, or run the node agent.
    Node(node::NodeArgs),
    /// Run a whole collaboration on this machine: embedded hub, three organisations, real
    /// links, real traffic.
    Demo(demo::DemoArgs),
    /// Render the Istio and Kubernetes objects a node needs, from a collaboration file.
    Render(render::RenderArgs),
    /// Compare the objects in the cluster with what the verified links want (exit 0: they match).
    Audit(audit::AuditArgs),
}

impl Cli {
    /// The log filter to use.
    pub fn log_filter(&self) -> &str {
        match (&self.log, &self.command) {
            (Some(filter), _) => filter,
            (None, Command::Demo(_)) => "warn",
            (None, _) => "info",
        }
    }

    /// Runs the parsed command.
    pub async fn run(self) -> Result<()> {
        match self.command {
            Command::Ca(cmd) => certs::run_ca(cmd),
            Command::Csr(args) => certs::run_csr(args),
            Command::Cert(cmd) => certs::run_cert(cmd),
            Command::Hub(args) => hub::run(args).await,
            Command::Collab(cmd) => owner::run_collab(cmd).await,
            Command::JoinToken(args) => owner::run_join_token(args).await,
            Command::Link(cmd) => owner::run_link(cmd).await,
            Command::Node(args) => node::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Render(args) => render::run_render(args),
            Command::Audit(args) => audit::run_audit(args).await,
        }
    }
}
