//! The bodies of fedmesh's fuzz targets, one module each, over the parsers an attacker reaches:
//!
//! | target | input | reached through |
//! |---|---|---|
//! | [`stream_header`] | relay stream header and response | `relay::proto` |
//! | [`jws_document`] | signed documents, envelopes, pages | `documents::jws`, `Ledger::ingest` |
//! | [`vantage6_token`] | vantage6 query flags and container token | the node's admin router |
//! | [`csr`] | certificate signing requests | `CollabCa::sign_csr_*`, `IssuancePolicy::check` |
//! | [`certificate`] | certificates and chains | `CertInfo::parse`, `TrustBundle::verify` |
//! | [`hub_request`] | hub request bodies, query, owner token | the hub's router, `JoinToken::decode` |
//! | [`dns`] | DNS queries | hickory's request parsing, `dns::PeerDns` |
//!
//! `fuzz/` wraps each in a libFuzzer target (`scripts/fuzz` runs them); the `corpus` test replays
//! every committed corpus file and every [`seeds`] input through them in a normal test build.
//! A target panics only on a broken promise (a crash, or an assertion on what the code must
//! never do); refusing bad input is the expected outcome.

pub mod certificate;
pub mod csr;
mod der;
pub mod dns;
pub mod fixed;
pub mod hub_request;
pub mod jws_document;
pub mod seeds;
pub mod stream_header;
pub mod vantage6_token;

/// A target: one input in, a panic if a promise broke.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` wrapper and corpus directory.
pub const TARGETS: [(&str, Target); 7] = [
    ("stream_header", stream_header::run),
    ("jws_document", jws_document::run),
    ("vantage6_token", vantage6_token::run),
    ("csr", csr::run),
    ("certificate", certificate::run),
    ("hub_request", hub_request::run),
    ("dns", dns::run),
];
