//! The `fedmesh` binary: installs the *ring* crypto provider, parses the command line, runs it,
//! and turns an error into one line on stderr and a non-zero exit.

use clap::Parser;
use fedmesh_agent::{cli::Cli, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // One crypto provider for the whole process: ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    telemetry::init(cli.log_filter());
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
