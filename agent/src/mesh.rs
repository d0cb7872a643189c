//! A whole collaboration on one machine: an embedded hub, an owner, and enrolled node agents
//! in relay mode on loopback. The demo runs on it, and so do the integration tests.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use fedmesh_documents::{CollabPolicy, NodeRef, PortSpec, TaskRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    enroll::{self, NodeState},
    hub::{self, Hub, HubOptions, limits::Limits},
    node::{self, Expose, NodeHandle, NodeOptions},
    owner::{self, HubAddress, NewCollab, Owner},
    relay::RelayOptions,
};

/// A node to start in the mesh.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// `<org>/<node>`.
    pub node: NodeRef,
    /// Its vantage6 organisation id.
    pub organization_id: Option<u64>,
    /// Ports it exposes, and their targets.
    pub exposes: Vec<Expose>,
}

/// A running local collaboration.
pub struct LocalMesh {
    /// Where everything lives (hub data, owner, node states).
    pub dir: PathBuf,
    /// The hub's address.
    pub hub: HubAddress,
    /// The owner.
    pub owner: Owner,
    /// Running agents, by node.
    pub nodes: BTreeMap<NodeRef, NodeHandle>,
    /// Options each agent was started with (to restart it).
    pub options: BTreeMap<NodeRef, NodeOptions>,
    hub_stop: CancellationToken,
    hub_task: JoinHandle<()>,
}

/// Options for a local mesh.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Collaboration id.
    pub collab: String,
    /// Collaboration policy.
    pub policy: CollabPolicy,
    /// Relay tuning for every agent but those in `relay_of`.
    pub relay: RelayOptions,
    /// Relay tuning of particular agents.
    pub relay_of: BTreeMap<NodeRef, RelayOptions>,
    /// Serve DNS on loopback for every agent.
    pub dns: bool,
    /// Lifetime of the node certificates the embedded hub issues.
    pub cert_ttl: Duration,
    /// Second octet of the peers' loopback addresses: node `i` gets `127.<this>.<i+1>.0/24`.
    /// Meshes running side by side need different values.
    pub loopback_octet: u8,
    /// What the embedded hub bounds.
    pub hub_limits: Limits,
    /// Nodes that accept no inbound connections (reached through a rendezvous).
    pub outbound_only: std::collections::BTreeSet<NodeRef>,
    /// How nodes reach rendezvous servers (default: `auto`, no proxy).
    pub carrier: BTreeMap<NodeRef, crate::relay::relayed::tcp::CarrierOptions>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            collab: "collab-x".into(),
            policy: CollabPolicy::default(),
            relay: RelayOptions {
                // Loopback carries 64 KiB datagrams; let path MTU discovery find that.
                max_udp_payload: 65_000,
                ..RelayOptions::default()
            },
            relay_of: BTreeMap::new(),
            dns: true,
            cert_ttl: hub::DEFAULT_CERT_TTL,
            loopback_octet: 77,
            hub_limits: Limits::default(),
            outbound_only: std::collections::BTreeSet::new(),
            carrier: BTreeMap::new(),
        }
    }
}

impl LocalMesh {
    /// Starts a hub in `dir`, creates the collaboration (online CA), enrolls every node with a
    /// join token and starts its agent. Node `i` gets peer addresses from
    /// `127.<loopback_octet>.<i+1>.0/24`.
    pub async fn start(dir: &Path, opts: &MeshOptions, nodes: &[NodeSpec]) -> Result<Self> {
        let hub_dir = dir.join("hub");
        let hub_options = HubOptions {
            cert_ttl: opts.cert_ttl,
            limits: opts.hub_limits,
            ..HubOptions::default()
        };
        Hub::init(
            &hub_dir,
            &["localhost".into(), "127.0.0.1".into()],
            &hub_options,
        )?;
        let hub_state = Hub::open(&hub_dir, hub_options)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = HubAddress {
            url: format!("https://{}", listener.local_addr()?),
            pin: hub_state.cert().pin(),
        };
        let config = Arc::new(hub_state.cert().server_config()?);
        let hub_stop = CancellationToken::new();
        let stopped = hub_stop.clone();
        let hub_task = tokio::spawn(async move {
            if let Err(error) = hub::run(listener, hub_state, config, stopped.cancelled()).await {
                tracing::error!(%error, "embedded hub stopped");
            }
        });
        let mut owner = Owner::create(
            &dir.join("owner"),
            address.clone(),
            NewCollab {
                id: opts.collab.clone(),
                owner_name: "owner@fedmesh.demo".into(),
                online_ca: true,
                policy: opts.policy.clone(),
            },
        )
        .await?;
        let mut mesh = Self {
            dir: dir.to_owned(),
            hub: address,
            owner: Owner::load(&dir.join("owner"))?,
            nodes: BTreeMap::new(),
            options: BTreeMap::new(),
            hub_stop,
            hub_task,
        };
        for (i, spec) in nodes.iter().enumerate() {
            let token = owner
                .join_token(&spec.node, spec.organization_id, Duration::from_secs(3600))
                .await?;
            let state_dir = mesh.state_dir(&spec.node);
            enroll::enroll(&token, &state_dir, None)
                .await
                .with_context(|| format!("enrolling {}", spec.node))?;
            let options = NodeOptions {
                state: state_dir,
                relay_listen: "127.0.0.1:0".parse()?,
                advertise: None,
                loopback_pool: format!("127.{}.{}.0/24", opts.loopback_octet, i + 1).parse()?,
                exposes: spec.exposes.clone(),
                dns_listen: opts.dns.then(|| "127.0.0.1:0".parse()).transpose()?,
                admin_listen: Some("127.0.0.1:0".parse()?),
                v6: Some(node::V6Options {
                    listen: "127.0.0.1:0".parse()?,
                    api_path: String::new(),
                    upstream: None,
                    announce_listen: Some("127.0.0.1:0".parse()?),
                    task_namespace: None,
                }),
                relay: opts.relay_of.get(&spec.node).copied().unwrap_or(opts.relay),
                kubernetes: None,
                outbound_only: opts.outbound_only.contains(&spec.node),
                carrier: opts.carrier.get(&spec.node).cloned().unwrap_or_default(),
            };
            let handle = node::start(options.clone()).await?;
            mesh.nodes.insert(spec.node.clone(), handle);
            mesh.options.insert(spec.node.clone(), options);
        }
        mesh.owner = owner;
        Ok(mesh)
    }

    /// Where a node's state lives.
    pub fn state_dir(&self, node: &NodeRef) -> PathBuf {
        self.dir
            .join("nodes")
            .join(format!("{}-{}", node.org, node.node))
    }

    /// A node's state.
    pub fn state(&self, node: &NodeRef) -> Result<NodeState> {
        NodeState::load(&self.state_dir(node))
    }

    /// A running agent.
    pub fn node(&self, node: &NodeRef) -> &NodeHandle {
        &self.nodes[node]
    }

    /// Requests and approves a link; returns its id.
    pub async fn link(
        &self,
        from: &NodeRef,
        to: &NodeRef,
        ports: &[PortSpec],
        ttl: Duration,
        task: Option<TaskRef>,
    ) -> Result<String> {
        let terms = owner::terms(&self.owner.collab.id, from, to, ports, ttl, task)?;
        let terms = self.owner.request(terms).await?;
        self.owner.approve(&terms.id).await?;
        Ok(terms.id)
    }

    /// Waits until `from`'s agent listens for `to` on `port`, and returns that address.
    pub async fn peer_addr(
        &self,
        from: &NodeRef,
        to: &NodeRef,
        port: u16,
        timeout: Duration,
    ) -> Result<SocketAddr> {
        let snap = self
            .node(from)
            .wait_for(timeout, |s| {
                s.peers
                    .get(to)
                    .is_some_and(|p| p.ports.iter().any(|p| p.port == port))
            })
            .await?;
        let addr = SocketAddr::new(snap.peers[to].ip, port);
        self.node(from).wait_listening(addr, timeout).await?;
        Ok(addr)
    }

    /// Stops every agent, then the hub, and waits until all of them have stopped.
    pub async fn shutdown(self) -> Result<()> {
        for (_, handle) in self.nodes {
            handle.shutdown().await?;
        }
        self.hub_stop.cancel();
        self.hub_task.await.context("the embedded hub panicked")?;
        Ok(())
    }
}
