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
pub mod owner;
pub mod relay;
pub mod serve;
pub mod telemetry;
pub mod throttle;
