//! The node agent in Kubernetes: Istio mode, in-cluster relay mode, `PeerLink` status, audit.
//!
//! ```text
//!  ledger (verified documents) ──┐
//!  PeerLinks (sysadmin's veto) ──┴─► desired::compute (pure) ──► Desired { objects, peerlinks }
//!                                                                     │
//!  live objects, listed per kind and namespace by label ──────────────┴─► plan::diff (pure)
//!                                                                     │   Diff { missing, modified, extra }
//!                                                                     ▼
//!                     controller: server-side apply (fieldManager=fedmesh, force) of what is missing
//!                     or modified, delete what is extra, PeerLink spec and status; nothing when equal
//! ```
//!
//! With Istio (the cluster serves `networking.istio.io` and `security.istio.io`), the objects
//! are mesh-config's render of the links in force, plus this node's credentials Secret in the
//! agent's namespace. Without Istio, the relay carries the links and the objects are one
//! `Service` per peer in front of the agent pod (the peer's real ports, each leading to a pod
//! port the relay listens on). Each is a [`backend`].
//!
//! # Layout
//!
//! - [`backend`]: the mesh backends (Istio; relay Services), each the kinds it writes and its
//!   render, and the one [`Mode`] enum that picks one.
//! - [`resources`]: the kinds fedmesh writes, and the namespaces it writes them in.
//! - [`desired`]: the pure computation of what the cluster should hold.
//! - [`plan`]: the pure comparison of desired and live objects.
//! - [`peerlink`]: the `PeerLink` custom resource, its conditions and reasons.
//! - [`controller`]: the thin async shell around the Kubernetes API.
//! - [`runs`]: vantage6 5 runs, from the Pods and Jobs of the task namespace, into the node's
//!   run registry.

pub mod backend;
pub mod controller;
pub mod desired;
pub mod peerlink;
pub mod plan;
pub mod resources;
pub mod runs;

#[cfg(test)]
pub mod fixtures;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, time::Duration};

use fedmesh_mesh_config::RenderOptions;

pub use self::{
    backend::{Mode, relay::PortRange},
    controller::{Controller, Placement},
    peerlink::PeerLink,
    plan::{Diff, Plan},
};

/// The one field manager of every write fedmesh makes.
pub const FIELD_MANAGER: &str = "fedmesh";

/// How to run in a cluster, as given on the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// The mode; `None` detects it (Istio when its API groups are served).
    pub mode: Option<Mode>,
    /// The agent's namespace; `None` is the pod's own.
    pub namespace: Option<String>,
    /// Where things live in the cluster (Istio mode); `mesh_namespace` must be the agent's.
    pub render: RenderOptions,
    /// The agent pod's labels, selected by the per-peer Services (relay mode).
    pub pod_labels: BTreeMap<String, String>,
    /// The pod ports the relay listens on, one per (peer, port) (relay mode).
    pub pod_ports: PortRange,
    /// How often the cluster is compared with the links even when nothing changed.
    pub resync: Duration,
}

/// [`Options`] resolved against the cluster: what the pure code and the controller work with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The mode.
    pub mode: Mode,
    /// The agent's namespace: credentials, Services, PeerLinks and gateway objects go here.
    pub namespace: String,
    /// Render options (Istio mode).
    pub render: RenderOptions,
    /// The agent pod's labels (relay mode).
    pub pod_labels: BTreeMap<String, String>,
    /// The relay's pod ports (relay mode).
    pub pod_ports: PortRange,
}

/// What can go wrong in Kubernetes mode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The API server refused or could not be reached; the next pass retries.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// mesh-config refused the view or the options.
    #[error("rendering the Istio objects: {0}")]
    Render(#[from] fedmesh_mesh_config::Error),
    /// An object would be written where fedmesh must not write it.
    #[error("{0}")]
    Placement(String),
    /// The options do not fit the cluster.
    #[error("{0}")]
    Options(String),
    /// A live object could not be read back.
    #[error("reading {what}: {source}")]
    Json {
        /// What was read.
        what: String,
        /// Why it failed.
        #[source]
        source: serde_json::Error,
    },
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The label selector of everything fedmesh manages, in any collaboration.
pub fn managed_selector() -> String {
    use fedmesh_mesh_config::render::MANAGED_BY;
    format!("{MANAGED_BY}={FIELD_MANAGER}")
}

/// The label selector of everything fedmesh manages for `collab`.
pub fn selector(collab: &str) -> String {
    use fedmesh_mesh_config::render::COLLABORATION;
    format!("{},{COLLABORATION}={collab}", managed_selector())
}

/// 64-bit FNV-1a (the hash mesh-config names objects with): stable everywhere.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
