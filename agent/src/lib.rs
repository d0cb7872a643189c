//! The fedmesh agent: everything behind the `fedmesh` binary.
//!
//! # Layout
//!
//! - [`cli`]: the command line, one module per group of subcommands.
//! - [`telemetry`]: logging setup.
//! - [`k8s`]: the node agent in Kubernetes (Istio objects or relay Services, PeerLinks, audit).
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
pub mod telemetry;
