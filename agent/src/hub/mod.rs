//! The hub: an HTTPS mailbox that stores the collaboration's signed documents durably and hands
//! them to nodes. It is not a trust anchor: it checks what it can so that garbage is refused
//! early, but every node verifies every signature again.
//!
//! ```text
//!  owner CLI ──signed docs──▶ hub (redb) ◀──mTLS, long-poll──  node agents
//! ```

pub mod api;
pub mod client;
mod server;
mod store;
pub mod tls;

pub use server::{DEFAULT_CERT_TTL, Hub, run, serve};
