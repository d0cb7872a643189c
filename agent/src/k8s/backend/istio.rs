//! The Istio backend: mesh-config's objects carry the links (ServiceEntry, DestinationRule,
//! Gateway, VirtualService, AuthorizationPolicy, PeerAuthentication, Sidecar, NetworkPolicy),
//! plus this node's credentials Secret for the fedmesh gateways, in the agent's namespace only.
//! Peers are reached at a stable VIP per peer; the relay admits nothing.

use std::{collections::BTreeMap, net::IpAddr};

use fedmesh_documents::NodeRef;
use fedmesh_mesh_config::{GatewayAddr, NodeView, Peer, RenderOptions};

use super::super::{
    Error, Result, Settings,
    desired::{Desired, Inputs, Memory},
    resources::{Kind, Place, kind},
};

/// The API groups (at version v1) whose presence means Istio.
pub const API_GROUPS: [&str; 2] = ["networking.istio.io", "security.istio.io"];

/// What the Istio backend writes, in the order it is listed.
pub const KINDS: &[Kind] = &[
    kind("v1", "Secret", "secrets", Place::Agent),
    kind(
        "networking.istio.io/v1",
        "ServiceEntry",
        "serviceentries",
        Place::Agent,
    ),
    kind(
        "networking.istio.io/v1",
        "DestinationRule",
        "destinationrules",
        Place::Agent,
    ),
    kind(
        "networking.istio.io/v1",
        "Gateway",
        "gateways",
        Place::Agent,
    ),
    kind(
        "networking.istio.io/v1",
        "VirtualService",
        "virtualservices",
        Place::Agent,
    ),
    kind(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        Place::Agent,
    ),
    kind(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        Place::Algorithm,
    ),
    kind(
        "security.istio.io/v1",
        "PeerAuthentication",
        "peerauthentications",
        Place::Algorithm,
    ),
    kind(
        "networking.istio.io/v1",
        "Sidecar",
        "sidecars",
        Place::Algorithm,
    ),
    kind(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        Place::Algorithm,
    ),
];

/// Whether the cluster serves Istio: every group of [`API_GROUPS`] at `v1`.
pub(super) fn served(groups: &[(String, Vec<String>)]) -> bool {
    API_GROUPS.iter().all(|name| {
        groups
            .iter()
            .any(|(group, versions)| group == name && versions.iter().any(|v| v == "v1"))
    })
}

/// The render options must be valid and put the gateways and credentials in the agent's
/// namespace.
pub(super) fn check(render: &RenderOptions, namespace: &str) -> Result<()> {
    render.validate()?;
    if render.mesh_namespace != namespace {
        return Err(Error::Options(format!(
            "the render options put the gateways and credentials in {:?}, but the agent \
             runs in {namespace:?}; set mesh_namespace: {namespace}",
            render.mesh_namespace
        )));
    }
    Ok(())
}

/// mesh-config's render of the links in force, with peers' gateways from their signed
/// advertisements and this node's credentials.
pub(super) fn render(
    settings: &Settings,
    inputs: &Inputs<'_>,
    memory: &Memory,
    desired: &mut Desired,
) -> Result<()> {
    let ledger = inputs.ledger;
    let peers = ledger
        .collaboration()
        .into_iter()
        .flat_map(|c| &c.members)
        .map(fedmesh_documents::Member::node_ref)
        .filter(|m| m != inputs.node)
        .filter_map(|m| {
            let gateway: GatewayAddr =
                ledger.advertisement(&m)?.gateway.as_deref()?.parse().ok()?;
            Some((m, Peer { gateway }))
        })
        .collect();
    let view = NodeView {
        collab: desired.collab.clone(),
        local: inputs.node.clone(),
        members: ledger
            .collaboration()
            .into_iter()
            .flat_map(|c| &c.members)
            .map(fedmesh_documents::Member::node_ref)
            .collect(),
        peers,
        links: desired.links.clone(),
        services: BTreeMap::new(),
        vips: memory.vips.clone(),
        credentials: inputs.credentials.cloned(),
    };
    let rendered = fedmesh_mesh_config::render(&view, &settings.render, inputs.now)?;
    for object in &rendered.objects {
        settings.scope_of(object)?;
    }
    desired.objects = rendered.objects;
    desired.memory.vips = rendered.vips;
    Ok(())
}

/// Each peer's VIP.
pub(super) fn addresses(desired: &Desired) -> BTreeMap<NodeRef, IpAddr> {
    desired
        .memory
        .vips
        .iter()
        .map(|(peer, ip)| (peer.clone(), IpAddr::V4(*ip)))
        .collect()
}
