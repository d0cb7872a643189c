//! The fedmesh agent: everything behind the `fedmesh` binary.
//!
//! # Layout
//!
//! - [`cli`]: the command line, one module per group of subcommands.
//! - [`owner`]: the collaboration owner's key, collaboration document, join tokens, approvals
//!   and revocations.
//! - [`hub`]: the HTTPS mailbox for signed documents (server, redb store, client, pinned TLS).
//! - [`enroll`]: a node's state directory and enrollment with a join token.
//! - [`node`]: the node agent: follows the hub, verifies, reconciles; admin and vantage6 APIs.
//! - [`relay`]: the QUIC relay: admission, listeners, streams, byte pumping.
//! - [`dns`]: peer names over DNS.
//! - [`k8s`]: the node agent in Kubernetes (Istio objects or relay Services, PeerLinks, audit).
//! - [`mesh`], [`demo`]: a whole collaboration on one machine, and the demo built on it.
//! - [`metrics`], [`telemetry`], [`throttle`]: Prometheus metrics, logging, and throttled
//!   reports of refusals.
//! - [`serve`]: HTTP/1.1 with bounds (connection caps, header and body deadlines) for the hub
//!   and the admin server.
//! - [`output`]: `--output text|json|yaml` and the text tables commands print.
//!
//! ```text
//!  owner ──signed docs──▶ hub ◀──long-poll (mTLS)── node ──▶ relay / Istio objects / DNS
//! ```
//!
//! Pure logic lives in the library crates (`fedmesh-certs`, `fedmesh-documents`,
//! `fedmesh-mesh-config`); this crate is the thin async shell around them: sockets, files,
//! processes and the Kubernetes API.

pub mod cli;
pub mod demo;
pub mod dns;
pub mod enroll;
pub mod hub;
pub mod k8s;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod output;
pub mod owner;
pub mod relay;
pub mod rendezvous;
pub mod serve;
pub mod telemetry;
pub mod throttle;

#[cfg(test)]
mod layering {
    //! The command line sits on top: library modules never import [`cli`](crate::cli), so
    //! everything they do is reachable without it (tests, the demo, other front ends).

    use std::{fs, path::Path};

    /// Every `.rs` file under `dir`, with its path relative to `src/`.
    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).expect("source file");
                let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
                let rel = path.strip_prefix(&src).expect("under src/");
                out.push((rel.display().to_string(), text));
            }
        }
    }

    /// A line without its comment and string literals.
    fn code_of(line: &str) -> String {
        let mut code = String::new();
        let mut in_string = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (in_string, c) {
                (false, '/') if chars.peek() == Some(&'/') => break,
                (_, '"') => in_string = !in_string,
                (true, '\\') => {
                    chars.next();
                }
                (false, c) => code.push(c),
                (true, _) => {}
            }
        }
        code
    }

    /// Whether a line of code names the `cli` module.
    fn names_cli(code: &str) -> bool {
        code.match_indices("cli").any(|(at, _)| {
            let before = code[..at].chars().next_back();
            let after = code[at + 3..].chars().next();
            let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !ident(before) && !ident(after)
        })
    }

    #[test]
    fn no_library_module_imports_cli() {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        assert!(files.len() > 20, "found the sources: {}", files.len());
        let mut offenders = Vec::new();
        for (path, text) in &files {
            if path.starts_with("cli/") || path == "cli.rs" || path == "main.rs" {
                continue;
            }
            for (n, line) in text.lines().enumerate() {
                let code = code_of(line);
                let declares = path == "lib.rs" && code.trim() == "pub mod cli;";
                if names_cli(&code) && !declares {
                    offenders.push(format!("src/{path}:{}: {}", n + 1, line.trim()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "library modules import the command line; move what they need out of cli:\n{}",
            offenders.join("\n")
        );
    }

    #[test]
    fn the_check_sees_imports() {
        assert!(names_cli("use crate::cli::certs::rfc3339;"));
        assert!(names_cli("    cli::owner::print_table,"));
        assert!(names_cli("use super::cli;"));
        assert!(!names_cli("let client = kube::Client::try_default();"));
        assert!(!names_cli("clippy::unwrap_used"));
        assert_eq!(code_of("let a = \"cli::x\"; // cli::y"), "let a = ; ");
    }
}
