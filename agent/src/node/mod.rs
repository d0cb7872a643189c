//! The node agent in relay mode.
//!
//! ```text
//!  hub ──long-poll──▶ follow ──Ledger──┐
//!                    (verify every     │   resolve: advertised relay host names
//!                     document, keep   ├──────────────────────────────────────┐
//!                     the last         ▼                                      ▼
//!                     verified state) plan (pure: links in force, addresses, names, relay config)
//!                                      │ on every input change and at the next link expiry
//!                                      ├──▶ relay: listeners, admission, open streams
//!                                      ├──▶ DNS names and peers.json (FEDMESH_PEERS)
//!                                      └──▶ snapshot: admin API, metrics, vantage6 API
//!  renew: at two thirds of the certificate's life, a new certificate on the identity channel
//!         (relay TLS, hub client, Istio credentials follow it)
//! ```
//!
//! Everything the agent decides comes from documents it verified itself; the hub only carries
//! them. What it decides is [`plan::plan`]'s, a pure function; this module only runs tasks,
//! writes files and hands the plan on.
//!
//! In Kubernetes ([`NodeOptions::kubernetes`]) a [`k8s::Controller`] runs beside the reconciler:
//! it applies the Istio objects (and no relay runs), or one Service per peer in
//! front of the pod, and publishes a [`Placement`]: the sysadmin's vetoes (left out of
//! everything), the peers' addresses (Service ClusterIPs or VIPs) and the pod ports the relay
//! listens on.

pub mod admin;
pub mod announce;
mod follow;
pub mod identity;
pub mod plan;
mod resolve;
pub mod selfcheck;
pub mod v6;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use fedmesh_certs::{NodeIdentity, TrustBundle, files, verify::Usage};
use fedmesh_documents::{
    Advertisement, Document, EffectiveLink, Endpoint, Exposure, Ledger, NodeRef, NodeSigner,
    PortSpec, Rejection, Signer, jws,
};
use fedmesh_mesh_config::addresses::Pool;
use futures::FutureExt;
use serde::Serialize;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::{
    identity::{Identity, IdentityWatch},
    plan::NodePlan,
};
use crate::{
    dns::{self, NameMap},
    enroll::NodeState,
    hub::client::HubClient,
    k8s::{self, Placement},
    metrics::Metrics,
    relay::{
        self, Budgets, Relay, RelayOptions, TlsMaterial,
        relayed::{Carrier, Paths},
    },
};

/// A port this node's algorithms expose to peers, and where inbound streams for it go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expose {
    /// The port peers dial.
    pub port: u16,
    /// Its label.
    pub label: Option<String>,
    /// The local target (`host:port`); default `127.0.0.1:<port>`.
    pub target: String,
}

impl FromStr for Expose {
    type Err = String;

    /// Parses `<port>[:<label>][=<host:port>]`, e.g. `11366:mpc=127.0.0.1:21366`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (spec, target) = match s.split_once('=') {
            Some((spec, target)) => (spec, Some(target.to_owned())),
            None => (s, None),
        };
        let port: PortSpec = spec.parse().map_err(|e| format!("--expose {s:?}: {e}"))?;
        let target = target.unwrap_or_else(|| format!("127.0.0.1:{}", port.port));
        if !target.contains(':') {
            return Err(format!(
                "--expose {s:?}: target {target:?} is not host:port"
            ));
        }
        Ok(Self {
            port: port.port,
            label: port.label,
            target,
        })
    }
}

/// How to run the agent.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The enrolled state directory.
    pub state: PathBuf,
    /// UDP address of the relay.
    pub relay_listen: SocketAddr,
    /// The `host:port` peers dial (default: the relay's bound address).
    pub advertise: Option<String>,
    /// Where peers' local addresses come from.
    pub loopback_pool: Pool,
    /// Ports exposed to peers.
    pub exposes: Vec<Expose>,
    /// DNS server address (none: no DNS).
    pub dns_listen: Option<SocketAddr>,
    /// Admin HTTP address (health, metrics, peers; none: no admin server).
    pub admin_listen: Option<SocketAddr>,
    /// The vantage6 address API (none: not served).
    pub v6: Option<V6Options>,
    /// Relay tuning.
    pub relay: RelayOptions,
    /// Run in Kubernetes (`None`: on a machine, peers on loopback addresses).
    pub kubernetes: Option<k8s::Options>,
    /// Accept no inbound connections: advertise no direct endpoint, and ask peers to reach this
    /// node through the collaboration's rendezvous servers.
    pub outbound_only: bool,
    /// How the relay reaches rendezvous servers (carrier, proxy).
    pub carrier: relay::relayed::tcp::CarrierOptions,
}

/// Where and how the vantage6 address API is served.
#[derive(Clone, Debug)]
pub struct V6Options {
    /// Where algorithms reach it (never the admin address).
    pub listen: SocketAddr,
    /// vantage6's `API_PATH` (empty on vantage6 4 nodes); the API answers under it and at `/`.
    pub api_path: String,
    /// The vantage6 node proxy every other request is forwarded to (`http://host:port`).
    pub upstream: Option<String>,
    /// Where the node's operator announces and ends runs (loopback; none: not served).
    pub announce_listen: Option<SocketAddr>,
    /// vantage6 5's task namespace, whose running algorithm pods become runs (Kubernetes only;
    /// none: no watch).
    pub task_namespace: Option<String>,
}

/// A peer as algorithms see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// The peer's local address.
    pub ip: IpAddr,
    /// The ports this node may reach it on.
    pub ports: Vec<PortSpec>,
    /// Its DNS names.
    pub names: Vec<String>,
    /// Why the relay cannot dial it (its advertised address does not resolve, or it has
    /// advertised none), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

/// What the agent currently knows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Links in force that concern this node.
    pub links: Vec<EffectiveLink>,
    /// Peers this node may dial, with their local addresses.
    pub peers: BTreeMap<NodeRef, PeerView>,
    /// Documents and links refused, with reasons (most recent last).
    pub rejections: Vec<Rejection>,
    /// Whether the agent has synced with the hub at least once.
    pub synced: bool,
    /// Members' vantage6 organisation ids.
    pub organization_ids: BTreeMap<String, u64>,
    /// Ports this node exposes.
    pub exposes: Vec<Expose>,
    /// End of the node certificate's validity.
    pub cert_not_after: Option<SystemTime>,
}

impl Snapshot {
    /// The `FEDMESH_PEERS` map: every peer name → `IP:port`s.
    pub fn peer_map(&self) -> BTreeMap<String, Vec<String>> {
        plan::peer_map(&self.peers)
    }
}

/// A running agent.
pub struct NodeHandle {
    /// This node.
    pub node: NodeRef,
    /// The relay's UDP address (none in Istio mode: Istio carries the links).
    pub relay_addr: Option<SocketAddr>,
    /// The DNS server's address, if any.
    pub dns_addr: Option<SocketAddr>,
    /// The admin server's address, if any.
    pub admin_addr: Option<SocketAddr>,
    /// The vantage6 address API's address, if any.
    pub v6_addr: Option<SocketAddr>,
    /// The run announce listener's address, if any.
    pub announce_addr: Option<SocketAddr>,
    /// The runs of this node.
    pub runs: v6::Registry,
    /// The current snapshot.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The addresses the relay listens on for peers.
    pub listening: watch::Receiver<Arc<BTreeSet<SocketAddr>>>,
    /// Whether the relay (and its rendezvous carrier) runs: from the start in relay mode; in
    /// Istio mode once a peer needs it (or at once when this node is outbound only).
    pub relay_running: watch::Receiver<bool>,
    /// The node's current certificate and key.
    pub identity: IdentityWatch,
    cancel: CancellationToken,
    tasks: JoinSet<Result<()>>,
}

impl NodeHandle {
    /// Waits until the snapshot satisfies `f` or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        f: impl Fn(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>> {
        let mut rx = self.snapshot.clone();
        let result = tokio::time::timeout(timeout, rx.wait_for(|s| f(s))).await;
        match result {
            Ok(Ok(s)) => Ok(s.clone()),
            _ => bail!(
                "{} did not reach the expected state within {timeout:?}",
                self.node
            ),
        }
    }

    /// Waits until the relay listens on `addr` (or `timeout` passes).
    pub async fn wait_listening(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let mut rx = self.listening.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|open| open.contains(&addr))).await {
            Ok(Ok(_)) => Ok(()),
            _ => bail!("{} does not listen on {addr} after {timeout:?}", self.node),
        }
    }

    /// Stops the agent and waits for its tasks.
    pub async fn shutdown(mut self) -> Result<()> {
        self.cancel.cancel();
        while let Some(res) = self.tasks.join_next().await {
            if let Ok(Err(error)) = res {
                warn!(%error, "agent task failed");
            }
        }
        Ok(())
    }

    /// Runs until `cancel` fires or a task fails.
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            () = stop => {}
            Some(res) = self.tasks.join_next() => {
                self.cancel.cancel();
                match res {
                    Ok(Err(e)) => return Err(e),
                    Err(e) => bail!("agent task panicked: {e}"),
                    Ok(Ok(())) => {}
                }
            }
        }
        self.shutdown().await
    }
}

/// Binds the agent's sockets, publishes its advertisement and starts its tasks.
pub async fn start(opts: NodeOptions) -> Result<NodeHandle> {
    let controller = match &opts.kubernetes {
        Some(options) => Some(
            k8s::Controller::connect(options)
                .await
                .context("connecting to the Kubernetes API")?,
        ),
        None => None,
    };
    start_with(opts, controller).await
}

/// [`start`] with a controller already connected (to the cluster of [`NodeOptions::kubernetes`],
/// whose options it was resolved with).
pub async fn start_with(
    opts: NodeOptions,
    controller: Option<k8s::Controller>,
) -> Result<NodeHandle> {
    let state = NodeState::load(&opts.state)?;
    let node = state.config.node.clone();
    let relay_carries = controller
        .as_ref()
        .is_none_or(|c| c.settings().mode.relay_carries());
    crate::enroll::ensure_valid_certificate(&state).await?;
    let identity = Arc::new(Identity::load(&state)?);
    let bundle = state.trust_bundle()?;
    selfcheck::check_ca(&state, &identity.tls, &bundle)?;
    let instance = selfcheck::Instance::start(&state)?;
    let metrics = Arc::new(Metrics::default());
    // The relay runs only where it carries links: not when a mesh backend (Istio) does.
    let mut carrier = None;
    let relay = match relay_carries {
        false => None,
        true => {
            let budgets = Budgets::load(&state.dir.join("budgets.json"), metrics.clone())?;
            let paths = Paths::bind(
                opts.relay_listen,
                Arc::new(NodeIdentity::from_pem(
                    &identity.cert_pem,
                    &identity.key_pem,
                )?),
            )?;
            paths.carrier().set_options(opts.carrier.clone());
            carrier = Some(paths.carrier());
            Some(Arc::new(Relay::new(
                Arc::new(paths),
                node.clone(),
                &TlsMaterial {
                    identity: &identity.tls,
                    bundle: &bundle,
                },
                opts.relay,
                metrics.clone(),
                Arc::new(budgets),
            )?))
        }
    };
    let relay_addr = relay.as_ref().map(|r| r.local_addr()).transpose()?;
    let advertise = match (&opts.advertise, relay_addr) {
        (Some(a), _) => a.clone(),
        (None, Some(addr)) if opts.outbound_only => addr.to_string(),
        (None, None) if opts.outbound_only => String::new(),
        (None, None) => bail!("in Istio mode give --advertise <host:port> of the ingress gateway"),
        (None, Some(addr)) if addr.ip().is_unspecified() => {
            bail!("the relay listens on {addr}; give --advertise <host:port> for peers to dial")
        }
        (None, Some(addr)) => addr.to_string(),
    };
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let hub = identity.hub_client(&state)?;
    let endpoints = match relay_carries {
        true if opts.outbound_only => vec![Endpoint::Rendezvous],
        true => vec![Endpoint::Quic {
            address: advertise.clone(),
        }],
        // Istio mode: the gateway for peers with a gateway of their own, and the agent through
        // the rendezvous for the others (and for all when no inbound connection is taken).
        false if opts.outbound_only => vec![Endpoint::Rendezvous],
        false => vec![
            Endpoint::IstioGateway {
                address: advertise.clone(),
            },
            Endpoint::Rendezvous,
        ],
    };
    publish_advertisement(
        &state,
        &identity,
        &hub,
        endpoints,
        &opts.exposes,
        &instance.id,
    )
    .await?;
    info!(%node, relay = ?relay_addr, advertise = %advertise, instance = %instance.id, "node agent started");

    let (identity_tx, identity_rx) = watch::channel(identity);
    let (ledger_tx, ledger_rx) =
        watch::channel(Arc::new(Ledger::for_node(&state.config.owner_pin, &node)));
    let ledger_rx_for_carrier = ledger_rx.clone();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (names_tx, names_rx) = watch::channel(Arc::new(NameMap::new()));
    let (resolved_tx, resolved_rx) = watch::channel(Arc::new(resolve::Resolved::new()));

    let dns_addr = match opts.dns_listen {
        Some(addr) => {
            let sockets = dns::bind(addr).await?;
            let bound = sockets.0.local_addr()?;
            let c = cancel.clone();
            tasks.spawn(dns::serve(sockets, names_rx, async move {
                c.cancelled().await;
            }));
            Some(bound)
        }
        None => None,
    };
    let admin_addr = match opts.admin_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin server on {addr}"))?;
            let bound = listener.local_addr()?;
            let c = cancel.clone();
            tasks.spawn(admin::serve(
                listener,
                snapshot_rx.clone(),
                metrics.clone(),
                async move { c.cancelled().await },
            ));
            Some(bound)
        }
        None => None,
    };
    let runs = v6::Registry::new();
    let (v6_addr, announce_addr) = match &opts.v6 {
        Some(o) => {
            let listener = tokio::net::TcpListener::bind(o.listen)
                .await
                .with_context(|| format!("binding the vantage6 address API on {}", o.listen))?;
            let bound = listener.local_addr()?;
            let state = v6::V6State {
                node: node.clone(),
                snapshot: snapshot_rx.clone(),
                registry: runs.clone(),
                upstream: o.upstream.clone(),
                http: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?,
            };
            let c = cancel.clone();
            tasks.spawn(v6::serve(listener, state, o.api_path.clone(), async move {
                c.cancelled().await;
            }));
            if let (Some(ns), Some(controller)) = (&o.task_namespace, &controller) {
                let (client, ns, runs, c) = (
                    controller.client(),
                    ns.clone(),
                    runs.clone(),
                    cancel.clone(),
                );
                tasks.spawn(async move {
                    k8s::runs::watch(client, &ns, runs, c).await;
                    Ok(())
                });
            }
            let announce = match o.announce_listen {
                Some(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the run announce listener on {addr}"))?;
                    let a = listener.local_addr()?;
                    let c = cancel.clone();
                    tasks.spawn(v6::serve_announce(listener, runs.clone(), async move {
                        c.cancelled().await;
                    }));
                    Some(a)
                }
                None => None,
            };
            (Some(bound), announce)
        }
        None => (None, None),
    };

    let shared_state = Arc::new(state);
    tasks.spawn(announce::run(
        shared_state.clone(),
        runs.clone(),
        identity_rx.clone(),
        ledger_rx.clone(),
        cancel.clone(),
    ));
    tasks.spawn(follow::follow(
        shared_state.clone(),
        hub,
        identity_rx.clone(),
        ledger_tx,
        snapshot_tx.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    {
        let (node, ledger, metrics, c) = (
            node.clone(),
            ledger_rx.clone(),
            metrics.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            resolve::run(node, ledger, resolved_tx, metrics, c).await;
            Ok(())
        });
    }
    {
        let c = cancel.clone();
        tasks.spawn(selfcheck::watch_instances(
            node.clone(),
            instance,
            ledger_rx.clone(),
            metrics.clone(),
            c,
        ));
    }
    // Istio mode: the relay starts once a peer needs it (one the gateways cannot reach), or at
    // once when this node takes no inbound connections.
    let (relay_wanted, relay_running) = watch::channel(relay.is_some());
    let (lazy_relay, lazy_budgets) = match &relay {
        Some(_) => (None, None),
        None => {
            let budgets = Arc::new(Budgets::load(
                &shared_state.dir.join("budgets.json"),
                metrics.clone(),
            )?);
            let (tx, rx) = watch::channel(None);
            (Some((tx, rx)), Some(budgets))
        }
    };
    let (listening_tx, lazy_listening) = watch::channel(Arc::new(BTreeSet::new()));
    let placement = match (controller, &opts.kubernetes) {
        (Some(controller), Some(options)) => {
            let controller = match (&relay, &lazy_budgets) {
                (Some(relay), _) => controller.with_budgets(relay.budgets()),
                (None, Some(budgets)) => controller.with_budgets(budgets.clone()),
                (None, None) => controller,
            };
            let (tx, rx) = watch::channel(Arc::new(Placement::new(controller.settings().mode)));
            tasks.spawn(controller.run(
                shared_state.clone(),
                ledger_rx.clone(),
                identity_rx.clone(),
                tx,
                options.resync,
                cancel.clone(),
            ));
            Some(rx)
        }
        _ => None,
    };
    let listening = match &relay {
        Some(relay) => relay.listening(),
        None => lazy_listening,
    };
    if let (Some((_, configs)), Some(budgets)) = (&lazy_relay, lazy_budgets) {
        tasks.spawn(
            LazyRelay {
                node: node.clone(),
                listen: opts.relay_listen,
                bundle: bundle.clone(),
                options: opts.relay,
                metrics: metrics.clone(),
                budgets,
                listening: listening_tx,
                running: relay_wanted,
            }
            .run(
                configs.clone(),
                ledger_rx.clone(),
                identity_rx.clone(),
                cancel.clone(),
            ),
        );
    }
    {
        let reconciler = Reconciler {
            node: node.clone(),
            dir: shared_state.dir.clone(),
            pool: opts.loopback_pool,
            exposes: opts.exposes.clone(),
            relay: relay.clone(),
            lazy_relay: lazy_relay.map(|(tx, _)| tx),
            outbound_only: opts.outbound_only,
            names: names_tx,
            snapshot: snapshot_tx,
            metrics: metrics.clone(),
            addresses: load_addresses(&shared_state),
            peers_json: String::new(),
        };
        tasks.spawn(reconciler.run(
            Inputs {
                ledger: ledger_rx,
                placement,
                identity: identity_rx.clone(),
                resolved: resolved_rx,
            },
            cancel.clone(),
        ));
    }
    if let Some(relay) = relay.clone() {
        let c = cancel.clone();
        tasks.spawn(async move { relay.run(c.cancelled()).await });
    }
    if let Some(carrier) = carrier {
        tasks.spawn(carrier.clone().run(cancel.clone()).map(Ok));
        tasks.spawn(follow_rendezvous(
            carrier,
            ledger_rx_for_carrier,
            identity_rx.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(follow_identity(
        relay,
        bundle,
        identity_rx.clone(),
        cancel.clone(),
    ));
    tasks.spawn(renew_loop(shared_state, identity_tx, cancel.clone()));
    Ok(NodeHandle {
        node,
        relay_addr,
        dns_addr,
        admin_addr,
        v6_addr,
        announce_addr,
        runs,
        snapshot: snapshot_rx,
        metrics,
        listening,
        relay_running,
        identity: identity_rx,
        cancel,
        tasks,
    })
}

/// Istio mode's relay, built and run only once the reconciler hands it a configuration (a peer
/// the gateways cannot reach, or this node is outbound only); then the same relay, rendezvous
/// carrier and identity following as in relay mode.
struct LazyRelay {
    node: NodeRef,
    listen: SocketAddr,
    bundle: TrustBundle,
    options: RelayOptions,
    metrics: Arc<Metrics>,
    budgets: Arc<Budgets>,
    listening: watch::Sender<Arc<BTreeSet<SocketAddr>>>,
    running: watch::Sender<bool>,
}

impl LazyRelay {
    async fn run(
        self,
        mut configs: watch::Receiver<Option<Arc<relay::RelayConfig>>>,
        ledger: watch::Receiver<Arc<Ledger>>,
        identity: IdentityWatch,
        cancel: CancellationToken,
    ) -> Result<()> {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            wanted = configs.wait_for(Option::is_some) => if wanted.is_err() { return Ok(()) },
        }
        let current = identity.borrow().clone();
        let paths = Paths::bind(
            self.listen,
            Arc::new(NodeIdentity::from_pem(&current.cert_pem, &current.key_pem)?),
        )?;
        let carrier = paths.carrier();
        let relay = Arc::new(Relay::new(
            Arc::new(paths),
            self.node.clone(),
            &TlsMaterial {
                identity: &current.tls,
                bundle: &self.bundle,
            },
            self.options,
            self.metrics,
            self.budgets,
        )?);
        info!(node = %self.node, addr = ?relay.local_addr().ok(), "a peer needs the relay: started in Istio mode");
        self.running.send_replace(true);
        let forward = {
            let (mut from, to) = (relay.listening(), self.listening);
            let cancel = cancel.clone();
            async move {
                loop {
                    to.send_replace(from.borrow_and_update().clone());
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        changed = from.changed() => if changed.is_err() { return },
                    }
                }
            }
        };
        let update = {
            let (relay, cancel) = (relay.clone(), cancel.clone());
            async move {
                loop {
                    if let Some(config) = configs.borrow_and_update().clone() {
                        relay.update((*config).clone());
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        changed = configs.changed() => if changed.is_err() { return },
                    }
                }
            }
        };
        let c = cancel.clone();
        let results = tokio::join!(
            relay.run(c.cancelled()),
            carrier
                .clone()
                .run(cancel.clone())
                .map(Ok::<(), anyhow::Error>),
            follow_rendezvous(carrier, ledger, identity.clone(), cancel.clone()),
            follow_identity(Some(relay.clone()), self.bundle, identity, cancel.clone()),
            forward,
            update,
        );
        results.0?;
        results.2?;
        results.3
    }
}

/// Publishes where peers reach this node (the relay, or in Istio mode the ingress gateway), and
/// which agent instance says so.
async fn publish_advertisement(
    state: &NodeState,
    identity: &Identity,
    hub: &HubClient,
    endpoints: Vec<Endpoint>,
    exposes: &[Expose],
    instance: &str,
) -> Result<()> {
    let doc = Document::Advertisement(Advertisement {
        collab: state.config.collab.clone(),
        node: state.config.node.clone(),
        endpoints,
        instance: Some(instance.to_owned()),
        exposes: exposes
            .iter()
            .map(|e| Exposure {
                port: e.port,
                label: e.label.clone(),
            })
            .collect(),
        issued_at: jws::unix(SystemTime::now()),
    });
    let signer = NodeSigner::new(identity.tls.chain().to_vec(), identity.key()?);
    let signed = jws::sign(&doc, &Signer::Node(&signer))?;
    hub.submit(&state.config.collab, signed)
        .await
        .context("publishing this node's advertisement")?;
    Ok(())
}

fn load_addresses(state: &NodeState) -> BTreeMap<NodeRef, Ipv4Addr> {
    files::read_to_string(&state.dir.join("addresses.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<BTreeMap<String, Ipv4Addr>>(&s).ok())
        .map(|m| {
            m.into_iter()
                .filter_map(|(k, v)| k.parse().ok().map(|k| (k, v)))
                .collect()
        })
        .unwrap_or_default()
}

/// What the reconciler follows.
struct Inputs {
    ledger: watch::Receiver<Arc<Ledger>>,
    /// In Kubernetes: what the controller placed.
    placement: Option<watch::Receiver<Arc<Placement>>>,
    identity: IdentityWatch,
    resolved: watch::Receiver<Arc<resolve::Resolved>>,
}

/// Hands the [`plan`] to the relay, DNS, `peers.json`, `addresses.json` and the snapshot.
struct Reconciler {
    node: NodeRef,
    dir: PathBuf,
    pool: Pool,
    exposes: Vec<Expose>,
    relay: Option<Arc<Relay>>,
    /// Istio mode: where the relay's configuration goes once a peer needs the relay.
    lazy_relay: Option<watch::Sender<Option<Arc<relay::RelayConfig>>>>,
    outbound_only: bool,
    names: watch::Sender<Arc<NameMap>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    addresses: BTreeMap<NodeRef, Ipv4Addr>,
    peers_json: String,
}

impl Reconciler {
    /// Plans on every change of an input and at the next link expiry, until `cancel`.
    async fn run(mut self, mut inputs: Inputs, cancel: CancellationToken) -> Result<()> {
        loop {
            let now = SystemTime::now();
            let ledger = inputs.ledger.borrow_and_update().clone();
            let placement = inputs
                .placement
                .as_mut()
                .map(|p| p.borrow_and_update().clone());
            let resolved = inputs.resolved.borrow_and_update().clone();
            let cert_not_after = inputs.identity.borrow_and_update().info().not_after;
            let next = match self.reconcile(
                &ledger,
                placement.as_deref(),
                &resolved,
                cert_not_after,
                now,
            ) {
                Ok(next) => next,
                Err(error) => {
                    warn!(%error, "reconcile failed; retrying at the next change");
                    None
                }
            };
            let until_next = async {
                match next.map(|at| at.duration_since(SystemTime::now()).unwrap_or_default()) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            };
            let placement_changed = async {
                match inputs.placement.as_mut() {
                    Some(p) => p.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                changed = inputs.ledger.changed() => if changed.is_err() { return Ok(()) },
                changed = placement_changed => if changed.is_err() { return Ok(()) },
                changed = inputs.identity.changed() => if changed.is_err() { return Ok(()) },
                changed = inputs.resolved.changed() => if changed.is_err() { return Ok(()) },
                () = until_next => {}
            }
        }
    }

    /// Plans and hands the plan on; returns when the plan changes by itself.
    fn reconcile(
        &mut self,
        ledger: &Ledger,
        placement: Option<&Placement>,
        resolved: &resolve::Resolved,
        cert_not_after: SystemTime,
        now: SystemTime,
    ) -> Result<Option<SystemTime>> {
        let Some(plan) = plan::plan(&plan::Inputs {
            ledger,
            node: &self.node,
            placement,
            pool: &self.pool,
            remembered: &self.addresses,
            resolved,
            exposes: &self.exposes,
            now,
        })?
        else {
            return Ok(None);
        };
        let NodePlan {
            relay,
            names,
            mut snapshot,
            remember,
            next_change,
        } = plan;
        if placement.is_none() && remember != self.addresses {
            let text: BTreeMap<String, Ipv4Addr> =
                remember.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            files::write_public(
                &self.dir.join("addresses.json"),
                &serde_json::to_vec_pretty(&text)?,
            )?;
            self.addresses = remember;
        }
        if let Some(r) = &self.relay {
            r.update(relay);
        } else if let Some(lazy) = &self.lazy_relay {
            let needed = self.outbound_only || placement.is_some_and(|p| !p.carried.is_empty());
            lazy.send_if_modified(|current| {
                // Once started, the relay keeps its configuration current (admitting nothing
                // when no peer needs it any more).
                if current.is_none() && !needed {
                    return false;
                }
                if current.as_deref() == Some(&relay) {
                    return false;
                }
                *current = Some(Arc::new(relay));
                true
            });
        }
        self.names.send_if_modified(|current| {
            if **current == names {
                return false;
            }
            *current = Arc::new(names);
            true
        });
        self.metrics
            .links_active
            .set(i64::try_from(snapshot.links.len()).unwrap_or(i64::MAX));
        snapshot.rejections =
            plan::merge_rejections(&self.snapshot.borrow().rejections, &snapshot.rejections);
        snapshot.cert_not_after = Some(cert_not_after);
        // The file first: whoever sees the new snapshot finds the file already written.
        let peers_json = serde_json::to_string_pretty(&snapshot.peer_map())?;
        if peers_json != self.peers_json {
            files::write_public(&self.dir.join("peers.json"), peers_json.as_bytes())?;
            self.peers_json = peers_json;
        }
        self.snapshot.send_if_modified(|s| {
            let same = s.synced
                && s.links == snapshot.links
                && s.peers == snapshot.peers
                && s.rejections == snapshot.rejections
                && s.cert_not_after == snapshot.cert_not_after;
            if !same {
                *s = Arc::new(snapshot);
            }
            !same
        });
        Ok(next_change)
    }
}

/// Gives the relay each renewed certificate, for new connections both ways.
async fn follow_identity(
    relay: Option<Arc<Relay>>,
    bundle: TrustBundle,
    mut identity: IdentityWatch,
    cancel: CancellationToken,
) -> Result<()> {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = identity.changed() => if changed.is_err() { return Ok(()) },
        }
        let current = identity.borrow_and_update().clone();
        if let Some(relay) = &relay {
            relay.set_tls(&TlsMaterial {
                identity: &current.tls,
                bundle: &bundle,
            })?;
            info!(serial = %current.info().serial, "relay presents the renewed certificate");
        }
    }
}

/// Keeps the rendezvous carrier's server list (from the verified collaboration) and identity
/// (across renewals) current.
async fn follow_rendezvous(
    carrier: Arc<Carrier>,
    mut ledger: watch::Receiver<Arc<Ledger>>,
    mut identity: IdentityWatch,
    cancel: CancellationToken,
) -> Result<()> {
    loop {
        let (servers, members) = ledger
            .borrow_and_update()
            .collaboration()
            .map(|c| {
                let members: Vec<NodeRef> = c.members.iter().map(|m| m.node_ref()).collect();
                (c.rendezvous.clone(), members)
            })
            .unwrap_or_default();
        carrier.set_members(members);
        carrier.set_servers(servers);
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = ledger.changed() => if changed.is_err() { return Ok(()) },
            changed = identity.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let current = identity.borrow_and_update().clone();
                carrier.set_identity(Arc::new(NodeIdentity::from_pem(
                    &current.cert_pem,
                    &current.key_pem,
                )?));
            }
        }
    }
}

/// How long to wait before trying a failed renewal again, at most.
const RENEW_RETRY: Duration = Duration::from_secs(10);
/// ... and at least.
const RENEW_RETRY_MIN: Duration = Duration::from_millis(500);

/// When to try a failed renewal again: after [`RENEW_RETRY`], or sooner as the certificate's
/// end nears (a quarter of what is left), so a short-lived certificate gets several tries.
fn renew_retry(now: SystemTime, not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    (left / 4).clamp(RENEW_RETRY_MIN, RENEW_RETRY)
}

/// Renews the node certificate at two thirds of its life (online CA): a CSR for the node's key,
/// the hub's signature, then the new certificate on the identity channel. The key stays; only
/// the certificate file is replaced (atomically), so a crash never leaves a key without its
/// certificate.
async fn renew_loop(
    state: Arc<NodeState>,
    identity: watch::Sender<Arc<Identity>>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut retry_at = None;
    loop {
        let current = identity.borrow().clone();
        let renew_at = retry_at.unwrap_or_else(|| current.info().renew_at());
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        match renew_once(&state, &current).await {
            Ok(renewed) => {
                info!(serial = %renewed.info().serial, "certificate renewed");
                identity.send_replace(Arc::new(renewed));
                retry_at = None;
            }
            Err(error) => {
                let now = SystemTime::now();
                let retry_in = renew_retry(now, current.info().not_after);
                warn!(error = %format!("{error:#}"), ?retry_in, "certificate renewal failed");
                retry_at = Some(now + retry_in);
            }
        }
    }
}

async fn renew_once(state: &NodeState, current: &Identity) -> Result<Identity> {
    if current.info().not_after <= SystemTime::now() {
        // Past its end (the machine slept, or the hub was away that long): no mutual TLS.
        crate::enroll::reattest(state).await?;
        return Identity::load(state);
    }
    let csr = current.key()?.csr(&state.spiffe_id()?)?;
    let renewed = current
        .hub_client(state)?
        .renew(&state.config.collab, csr.pem)
        .await?;
    let bundle = state.trust_bundle()?;
    let chain = rustls::pki_types::pem::PemObject::pem_slice_iter(renewed.cert_pem.as_bytes())
        .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()?;
    let info = bundle.verify(&chain, SystemTime::now(), Usage::Client)?;
    if info.spiffe_id != state.spiffe_id()? {
        bail!("the hub renewed the wrong identity: {}", info.spiffe_id);
    }
    let identity = Identity::from_pem(renewed.cert_pem, current.key_pem.clone())?;
    state.save_cert(&identity.cert_pem)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A day-long certificate waits the full retry; one seconds from its end is tried again
    /// several times before it expires; an expired one still waits a little.
    #[test]
    fn failed_renewals_are_retried_sooner_as_the_end_nears() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hours = |h: u64| now + Duration::from_secs(h * 3600);
        assert_eq!(renew_retry(now, hours(8)), RENEW_RETRY);
        assert_eq!(
            renew_retry(now, now + Duration::from_millis(2_500)),
            Duration::from_millis(625)
        );
        assert_eq!(renew_retry(now, now), RENEW_RETRY_MIN);
        assert_eq!(
            renew_retry(now, now - Duration::from_secs(5)),
            RENEW_RETRY_MIN
        );
    }
}
