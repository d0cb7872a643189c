//! Signed collaboration documents, and the pure policy that turns them into effective links.
//!
//! A peer link is in force only while the collaboration owner's signature on its terms is
//! valid, it has not expired, it is not revoked, and (where the collaboration asks for it) the
//! receiving node consented. Every node checks all of this itself: the hub that carries the
//! documents is a mailbox, not a trust anchor.
//!
//! # Layout
//!
//! - [`model`]: the documents as plain data ([`Collaboration`], [`Advertisement`],
//!   [`LinkRequest`], [`Approval`], [`Decision`], [`Revocation`], [`JoinGrant`]).
//! - [`jws`]: signing and verification (JWS ES256 over canonical JSON; owner by key thumbprint,
//!   nodes by `x5c` chains to the collaboration CA).
//! - [`ledger`]: what has been verified so far, and link states at a given `now`.
//! - [`runs`]: task-lifetime links from an owner's link policy and nodes' run announcements.
//!
//! ```text
//!  hub (untrusted) ──Envelope{seq, kind, subject, jws}──► Ledger::ingest(env, now)
//!                                                             │ verify signature + authorship
//!                                                             ▼
//!                          Ledger::effective_links(local, now) ──► links in force + rejections
//! ```
//!
//! Nothing here does I/O or reads the clock.
#![warn(missing_docs)]

pub mod jws;
pub mod ledger;
pub mod model;
pub mod runs;

mod error;
#[cfg(any(test, feature = "test-util"))]
pub mod fixtures;
#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use jws::{NodeSigner, OwnerKey, Signer};
pub use ledger::{
    EffectiveLink, Envelope, Ingested, Ledger, LinkState, LinkStatus, RejectCode, Rejection,
    effective_links,
};
pub use model::*;
