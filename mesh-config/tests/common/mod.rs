//! Shared by the integration tests: the three-organisation example, rendered at a fixed time.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::SystemTime;

use fedmesh_certs::time;
use fedmesh_documents::NodeRef;
use fedmesh_mesh_config::{CollabFile, NodeView, Rendered, render};

/// `examples/collab-three-orgs.yaml`.
pub(crate) const EXAMPLE: &str = include_str!("../../../examples/collab-three-orgs.yaml");
/// The `--now` the goldens are rendered at.
pub(crate) const GOLDEN_NOW: &str = "2030-01-01T00:00:00Z";
/// The example's three nodes.
pub(crate) const NODES: [&str; 3] = ["org-a/n1", "org-b/n1", "org-c/n1"];

/// `examples/collab-rendezvous.yaml`: org-d has no gateway; the agents carry its links.
pub(crate) const RENDEZVOUS_EXAMPLE: &str =
    include_str!("../../../examples/collab-rendezvous.yaml");
/// The nodes its goldens are rendered for.
pub(crate) const RENDEZVOUS_NODES: [&str; 2] = ["org-a/n1", "org-d/n1"];

pub(crate) fn rendezvous_example() -> CollabFile {
    CollabFile::parse(RENDEZVOUS_EXAMPLE).unwrap()
}

pub(crate) fn now() -> SystemTime {
    time::from_unix(time::parse_rfc3339(GOLDEN_NOW).unwrap())
}

pub(crate) fn n(s: &str) -> NodeRef {
    s.parse().unwrap()
}

pub(crate) fn example() -> CollabFile {
    CollabFile::parse(EXAMPLE).unwrap()
}

pub(crate) fn view(node: &str) -> NodeView {
    example().view(&n(node), now()).unwrap()
}

pub(crate) fn rendered(view: &NodeView) -> Rendered {
    render(view, &example().options, now()).unwrap()
}
