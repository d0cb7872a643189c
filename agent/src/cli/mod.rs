//! The `fedmesh` command line (clap derive). Each group of subcommands lives in its own module;
//! this one only parses and dispatches, and holds the contract every command keeps:
//!
//! - commands that print state take `--output text|json|yaml` ([`crate::output::Format`]);
//! - the exit status is 0 on success, 1 when the command found a difference (`audit`: the
//!   cluster differs from the verified links; `cert inspect --ca`: the certificate does not
//!   verify), 2 on an error (bad input, a file or hub that cannot be read, usage errors);
//! - an error is one line on stderr, each cause in it once ([`error_line`]);
//! - logs go to stderr, filtered by `--log`, `FEDMESH_LOG` or `RUST_LOG`, as text or JSON.
// The argument docs are `--help` text, where `<placeholder>` is the convention, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

pub mod audit;
pub mod certs;
pub mod demo;
pub mod hub;
pub mod node;
pub mod owner;
pub mod render;
pub mod rendezvous;

/// How the exit status reads; printed under `fedmesh --help`.
pub const EXIT_STATUS: &str = "\
Exit status:
  0  success
  1  a difference was found: `audit` (the cluster differs from the verified links) or
     `cert inspect --ca` (the certificate does not verify)
  2  an error: bad input or usage, a file, hub or cluster that cannot be read";

/// fedmesh: per-collaboration mTLS peer links for federated analytics.
#[derive(Debug, Parser)]
#[command(
    name = "fedmesh",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_STATUS
)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax); default: RUST_LOG if set, else `info` (`warn` for the
    /// demo).
    #[arg(long, global = true, env = "FEDMESH_LOG")]
    pub log: Option<String>,
    /// Log format on stderr: human-readable text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "FEDMESH_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    /// Worker threads of the async runtime. Default: 1 for `node` (its relay moves a stream at
    /// line rate on one thread, and one thread saves the cross-thread wake-ups that cost a
    /// quarter of its CPU on a small VM; raise it on nodes carrying many fast streams at once),
    /// the machine's CPUs for everything else.
    #[arg(long, global = true, env = "FEDMESH_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
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
    /// Run a rendezvous server: forwards end-to-end encrypted datagrams between members of a
    /// collaboration that accept no inbound connections.
    Rendezvous(rendezvous::RendezvousArgs),
    /// Render the Istio and Kubernetes objects a node needs, from a collaboration file.
    Render(render::RenderArgs),
    /// Compare the objects in the cluster with what the verified links want (exit 0: they
    /// match, 1: they differ).
    Audit(audit::AuditArgs),
}

/// What a command found: its exit status, unless it failed (exit 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Exit 0.
    Success,
    /// Exit 1: what differs, in one line for stderr.
    Differs(String),
}

impl Status {
    /// The exit code.
    pub fn code(&self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Differs(_) => 1,
        }
    }
}

/// The exit code of a command that failed.
pub const ERROR: u8 = 2;

impl Cli {
    /// The log filter to use: `--log` (or `FEDMESH_LOG`), else `RUST_LOG`, else the default.
    pub fn log_filter(&self) -> String {
        if let Some(filter) = &self.log {
            return filter.clone();
        }
        if let Ok(filter) = std::env::var("RUST_LOG")
            && !filter.is_empty()
        {
            return filter;
        }
        match &self.command {
            Command::Demo(_) => "warn".into(),
            _ => "info".into(),
        }
    }

    /// The async runtime's worker threads: `--threads`, else the command's default (none: the
    /// machine's CPUs).
    pub fn worker_threads(&self) -> Option<usize> {
        match (self.threads, &self.command) {
            (Some(n), _) => Some(usize::from(n)),
            (None, Command::Node(_)) => Some(1),
            (None, _) => None,
        }
    }

    /// Runs the parsed command.
    pub async fn run(self) -> Result<Status> {
        let done = |r: Result<()>| r.map(|()| Status::Success);
        match self.command {
            Command::Ca(cmd) => done(certs::run_ca(cmd)),
            Command::Csr(args) => done(certs::run_csr(args)),
            Command::Cert(cmd) => certs::run_cert(cmd),
            Command::Hub(args) => done(hub::run(args).await),
            Command::Collab(cmd) => done(owner::run_collab(cmd).await),
            Command::JoinToken(args) => done(owner::run_join_token(args).await),
            Command::Link(cmd) => done(owner::run_link(cmd).await),
            Command::Node(args) => done(node::run(args).await),
            Command::Demo(args) => done(demo::run(args).await),
            Command::Render(args) => done(render::run_render(args)),
            Command::Rendezvous(args) => done(rendezvous::run(args).await),
            Command::Audit(args) => audit::run_audit(args).await,
        }
    }
}

/// An error as one line: its message and each cause, each said once (a cause whose text the
/// line already holds, as when an error repeats its source in its own message, is skipped).
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        // clap's own checks: no clashing flags, defaults that parse, valid value enums.
        Cli::command().debug_assert();
    }

    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let certs = fedmesh_certs::Error::Io {
            path: "ca/ca.pem".into(),
            source: io,
        };
        let error = anyhow::Error::new(certs).context("loading the CA");
        assert_eq!(
            error_line(&error),
            "loading the CA: ca/ca.pem: no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_line(&plain), "outer: inner");
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(Status::Success.code(), 0);
        assert_eq!(Status::Differs("x".into()).code(), 1);
        assert_eq!(ERROR, 2);
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
    }
}
