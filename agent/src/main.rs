//! The `fedmesh` binary: installs the *ring* crypto provider, parses the command line, runs it
//! on a runtime of `--threads` workers, and turns the outcome into an exit status (0 success, 1
//! a difference found, 2 an error; see `fedmesh --help`), an error into one line on stderr.

use std::process::ExitCode;

use clap::Parser;
use fedmesh_agent::{
    cli::{self, Cli, Status},
    telemetry,
};

fn main() -> ExitCode {
    // One crypto provider for the whole process: ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    telemetry::init(&cli.log_filter(), cli.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads() {
        runtime.worker_threads(threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(cli::ERROR);
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(status) => {
            if let Status::Differs(what) = &status {
                eprintln!("{what}");
            }
            ExitCode::from(status.code())
        }
        Err(error) => {
            eprintln!("error: {}", cli::error_line(&error));
            ExitCode::from(cli::ERROR)
        }
    }
}
