//! What the cluster should hold for this node. Pure: the verified ledger, the sysadmin's vetoes,
//! what was allocated before and `now` go in; objects, PeerLinks and peer addresses come out.
//! The links in force are the ledger's ([`Ledger::links_in_force`]); the objects that carry
//! them are the mesh backend's ([`super::backend`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    time::SystemTime,
};

use fedmesh_documents::{EffectiveLink, Ledger, NodeRef};
use fedmesh_mesh_config::Credentials;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Result, Settings, peerlink};

/// What earlier passes allocated; persisted by the caller so peers keep their addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// ServiceEntry VIPs (Istio mode).
    #[serde(default)]
    pub vips: BTreeMap<NodeRef, Ipv4Addr>,
    /// Pod ports: peer → (its port → the pod port the relay listens on) (relay mode; Istio mode
    /// for the peers the agent carries).
    #[serde(default)]
    pub pod_ports: BTreeMap<NodeRef, BTreeMap<u16, u16>>,
}

/// What a pass starts from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Everything verified so far.
    pub ledger: &'a Ledger,
    /// This node.
    pub node: &'a NodeRef,
    /// Link ids the sysadmin vetoed (`PeerLink` `spec.veto: true`).
    pub vetoed: &'a BTreeSet<String>,
    /// This node's credentials, for the gateways' Secret (Istio mode).
    pub credentials: Option<&'a Credentials>,
    /// The time the pass is for.
    pub now: SystemTime,
}

/// A PeerLink as the agent wants it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredPeerLink {
    /// The object to apply (only the fields the agent owns).
    pub object: Value,
    /// Its status, with fresh transition times.
    pub status: peerlink::PeerLinkStatus,
}

/// What the cluster should hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// The collaboration.
    pub collab: String,
    /// Istio objects and the credentials Secret, or relay Services.
    pub objects: Vec<Value>,
    /// One per link that concerns this node.
    pub peerlinks: Vec<DesiredPeerLink>,
    /// The links in force here (vetoed ones left out).
    pub links: Vec<EffectiveLink>,
    /// Relay mode: which peer each Service is for, by Service name.
    pub services: BTreeMap<String, NodeRef>,
    /// The pod's listeners and the (peer, port) each leads to (relay mode; Istio mode for the
    /// peers the agent carries).
    pub listeners: BTreeMap<SocketAddr, (NodeRef, u16)>,
    /// Istio mode: the peers whose links the agent's relay carries (not the gateways).
    pub carried: BTreeSet<NodeRef>,
    /// What to remember for the next pass.
    pub memory: Memory,
}

/// Computes what the cluster should hold; `None` until the collaboration is verified.
pub fn compute(
    settings: &Settings,
    inputs: &Inputs<'_>,
    memory: &Memory,
) -> Result<Option<Desired>> {
    let Some(collab) = inputs.ledger.collaboration() else {
        return Ok(None);
    };
    let (links, _) = inputs
        .ledger
        .links_in_force(inputs.node, inputs.vetoed, inputs.now);
    let mut desired = Desired {
        collab: collab.id.clone(),
        objects: Vec::new(),
        peerlinks: peerlinks(settings, inputs),
        links,
        services: BTreeMap::new(),
        listeners: BTreeMap::new(),
        carried: BTreeSet::new(),
        memory: Memory::default(),
    };
    settings
        .mode
        .render(settings, inputs, memory, &mut desired)?;
    Ok(Some(desired))
}

fn peerlinks(settings: &Settings, inputs: &Inputs<'_>) -> Vec<DesiredPeerLink> {
    let ledger = inputs.ledger;
    let Some(collab) = ledger.collaboration() else {
        return Vec::new();
    };
    ledger
        .links(inputs.now)
        .into_iter()
        .filter(|l| l.terms.concerns(inputs.node) && peerlink::shown(l, inputs.now))
        .map(|l| {
            let spec = peerlink::spec(&l, inputs.node);
            let veto_here = inputs.vetoed.contains(&l.terms.id);
            DesiredPeerLink {
                object: peerlink::object(&settings.namespace, &collab.id, &spec),
                status: peerlink::status(&l, collab.policy.require_consent, veto_here, inputs.now),
            }
        })
        .collect()
}
