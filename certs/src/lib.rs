//! Per-collaboration identities for fedmesh.
//!
//! Every collaboration is its own trust domain, `spiffe://<collab>.fedmesh`, with its own
//! certificate authority. A node makes its key pair where it runs and sends only a CSR; the
//! collaboration CA signs it under a strict [`IssuancePolicy`] and returns a short-lived X.509
//! SVID whose URI SAN is `spiffe://<collab>.fedmesh/org/<org>/node/<node>`.
//!
//! # Layout
//!
//! - [`id`]: trust domains, SPIFFE IDs and the label rules they obey.
//! - [`ca`]: the collaboration CA: creation, loading, signing CSRs.
//! - [`csr`]: node key pairs and certificate signing requests.
//! - [`policy`]: what the CA will sign, checked over a parsed CSR (pure).
//! - [`verify`]: chain verification to the collaboration CA at a given `now` (pure).
//! - [`tls`]: rustls server and client configs for mutual TLS pinned to one collaboration.
//! - [`renew`]: when to renew (two thirds of the lifetime).
//! - [`files`]: PEM files, private keys written `0600` atomically.
//! - [`time`]: Unix seconds and RFC 3339, the one place time is converted.
//!
//! ```text
//!  node                                  collaboration CA
//!  ----                                  ----------------
//!  KeyPair::generate ──► Csr ──(PEM)──►  IssuancePolicy::check ──► sign ──► cert (PEM)
//!  (key never leaves)                                                          │
//!  tls::server_config / client_config ◄────────────────────────────────────────┘
//! ```
//!
//! Time is always an argument (`now: SystemTime`): nothing in this crate reads the clock except
//! the rustls verifiers, which receive the handshake time from rustls.
#![warn(missing_docs)]

pub mod ca;
pub mod csr;
pub mod files;
pub mod id;
pub mod policy;
pub mod renew;
pub mod time;
pub mod tls;
pub mod verify;

mod error;
#[cfg(test)]
mod issuance_tests;

pub use ca::{CollabCa, IssuedCert};
pub use csr::{Csr, NodeKey};
pub use error::{Error, Result};
pub use id::{SpiffeId, TrustDomain};
pub use policy::IssuancePolicy;
pub use tls::{NodeIdentity, TrustBundle};
pub use verify::CertInfo;

/// Lower-case hex SHA-256 of DER bytes: how fedmesh names certificates and keys in tokens.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
