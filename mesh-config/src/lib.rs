//! Pure rendering of one node's effective peer links into the Istio and Kubernetes objects that
//! carry them. The tests validate every rendered object against Istio's own CRD schemas
//! (`fedmesh-istio-schema`, a dev-dependency: the validator is not part of the product).
//!
//! A sysadmin audits the result with `kubectl`: every object is labelled
//! `app.kubernetes.io/managed-by: fedmesh`, `fedmesh.io/collaboration`, `fedmesh.io/peer` and
//! `fedmesh.io/direction`, and annotated with the link ids, approver and expiry it serves, so
//! `kubectl get serviceentries,authorizationpolicies -A -l app.kubernetes.io/managed-by=fedmesh`
//! lists what is open and why.
//!
//! # Layout
//!
//! - [`view`]: the input: a node's view of its collaboration ([`NodeView`]) and where things
//!   live in its cluster ([`RenderOptions`]).
//! - [`render`](mod@render): the pure function [`render()`] and its output ([`Rendered`]).
//! - [`addresses`]: the stable VIP allocator ([`addresses::assign`]), shared with the relay,
//!   and the agent's pod-port allocator ([`addresses::allocate_ports`]).
//! - [`collab_file`]: the human-writable collaboration file ([`CollabFile`]) for GitOps and
//!   tests, parsed and validated into views.
//!
//! ```text
//!  collaboration file ──CollabFile::parse──► CollabFile ──view(node, now)──┐
//!  ledger (signed documents) ──effective links──────────────────────────► NodeView
//!                                                                            │ render(view, options, now)
//!                                                                            ▼
//!                                      Rendered { objects, vips } ──────────────────────► apply / prune
//! ```
//!
//! Nothing here does I/O, reads the clock or talks to a cluster: time is an argument.
#![warn(missing_docs)]

pub mod addresses;
pub mod collab_file;
pub mod render;
pub mod view;

mod error;

pub use collab_file::CollabFile;
pub use error::{Error, Result};
pub use render::{ObjectKey, Rendered, render};
pub use view::{Credentials, GatewayAddr, NodeView, Peer, RenderOptions};
