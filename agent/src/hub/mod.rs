//! The hub: an HTTPS mailbox that stores the collaboration's signed documents durably and hands
//! them to nodes. It is not a trust anchor: it checks what it can so that garbage is refused
//! early, but every node verifies every signature again.
//!
//! ```text
//!  owner CLI ──signed docs──▶ hub (redb) ◀──mTLS, long-poll──  node agents
//! ```
//!
//! The data directory (`0700`) holds the store (`hub.redb`, `0600`, a checksum per record),
//! the hub's TLS key and certificate (whose pin every node trusts), and by default the CA key
//! that seals online CA keys ([`keys`]). `fedmesh hub --init` makes them in an empty
//! directory; every later start checks them and refuses, naming the file, anything missing,
//! empty, corrupted or readable by others: a hub never starts over silently.

pub mod api;
pub mod client;
mod files;
pub mod keys;
pub mod limits;
mod server;
mod store;
pub mod tls;

pub use server::{DEFAULT_CA_KEY_FILE, DEFAULT_CERT_TTL, Hub, HubOptions, STORE_FILE, run, serve};
