//! The `fedmesh` command line (clap derive). Each group of subcommands lives in its own module;
//! this one only parses and dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod certs;

/// fedmesh: per-collaboration mTLS peer links for federated analytics.
#[derive(Debug, Parser)]
#[command(name = "fedmesh", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax).
    #[arg(long, global = true, env = "FEDMESH_LOG", default_value = "info")]
    pub log: String,
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
}

impl Cli {
    /// Runs the parsed command.
    pub async fn run(self) -> Result<()> {
        match self.command {
            Command::Ca(cmd) => certs::run_ca(cmd),
            Command::Csr(args) => certs::run_csr(args),
            Command::Cert(cmd) => certs::run_cert(cmd),
        }
    }
}
