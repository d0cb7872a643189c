//! The node agent in relay mode.
//!
//! ```text
//!  hub ──long-poll──▶ follow ──Ledger──▶ reconcile (every change, and every second for expiry)
//!                    (verify every            │ effective links at now
//!                     document, keep the      ├──▶ relay: listeners, admission, open streams
//!                     last verified state)    ├──▶ DNS names and peers.json (FEDMESH_PEERS)
//!                                             └──▶ snapshot: admin API, metrics, vantage6 API
//!  renew: at two thirds of the certificate's life, a new key and CSR → hub → relay TLS
//! ```
//!
//! Everything the agent decides comes from documents it verified itself; the hub only carries
//! them.
//!
//! In Kubernetes ([`NodeOptions::kubernetes`]) a [`k8s::Controller`] runs beside the reconciler:
//! it applies the Istio objects (and the relay then admits nothing), or one Service per peer in
//! front of the pod, and publishes a [`Placement`]: the sysadmin's vetoes (left out of
//! everything), the peers' addresses (Service ClusterIPs or VIPs) and the pod ports the relay
//! listens on.

pub mod admin;
mod follow;
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
use fedmesh_certs::{NodeKey, files, renew, verify::Usage};
use fedmesh_documents::{
    Advertisement, Document, EffectiveLink, Exposure, Ledger, NodeRef, PortSpec, Rejection, Signer,
    jws,
};
use fedmesh_mesh_config::addresses::{self, Pool};
use serde::Serialize;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    dns::{self, NameMap},
    enroll::NodeState,
    hub::client::HubClient,
    k8s::{self, Placement},
    metrics::Metrics,
    relay::{Policy, Relay, RelayConfig, RelayOptions, TlsMaterial},
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
    /// Admin HTTP address (health, metrics, peers, vantage6 API; none: no admin server).
    pub admin_listen: Option<SocketAddr>,
    /// Relay tuning.
    pub relay: RelayOptions,
    /// Run in Kubernetes (`None`: on a machine, peers on loopback addresses).
    pub kubernetes: Option<k8s::Options>,
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
}

/// What the agent currently knows.
#[derive(Clone, Debug, Default)]
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
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for view in self.peers.values() {
            let addrs: Vec<String> = view
                .ports
                .iter()
                .map(|p| SocketAddr::new(view.ip, p.port).to_string())
                .collect();
            for name in &view.names {
                map.entry(name.clone())
                    .or_default()
                    .extend(addrs.iter().cloned());
            }
        }
        for addrs in map.values_mut() {
            addrs.sort();
            addrs.dedup();
        }
        map
    }
}

/// A running agent.
pub struct NodeHandle {
    /// This node.
    pub node: NodeRef,
    /// The relay's UDP address.
    pub relay_addr: SocketAddr,
    /// The DNS server's address, if any.
    pub dns_addr: Option<SocketAddr>,
    /// The admin server's address, if any.
    pub admin_addr: Option<SocketAddr>,
    /// The current snapshot.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The addresses the relay listens on for peers.
    pub listening: watch::Receiver<Arc<BTreeSet<SocketAddr>>>,
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
    let state = NodeState::load(&opts.state)?;
    let node = state.config.node.clone();
    let controller = match &opts.kubernetes {
        Some(options) => Some(
            k8s::Controller::connect(options)
                .await
                .context("connecting to the Kubernetes API")?,
        ),
        None => None,
    };
    let istio = controller
        .as_ref()
        .is_some_and(|c| c.settings().mode == k8s::Mode::Istio);
    crate::enroll::ensure_valid_certificate(&state).await?;
    let identity = state.identity()?;
    let bundle = state.trust_bundle()?;
    let metrics = Arc::new(Metrics::default());
    let relay = Relay::bind(
        opts.relay_listen,
        node.clone(),
        &TlsMaterial {
            identity: &identity,
            bundle: &bundle,
        },
        opts.relay,
        metrics.clone(),
    )?;
    let relay_addr = relay.local_addr()?;
    let advertise = match &opts.advertise {
        Some(a) => a.clone(),
        None if relay_addr.ip().is_unspecified() => {
            bail!(
                "the relay listens on {relay_addr}; give --advertise <host:port> for peers to dial"
            )
        }
        None => relay_addr.to_string(),
    };
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let hub = state.hub_client()?;
    publish_advertisement(&state, &hub, &advertise, &opts.exposes, istio).await?;
    info!(%node, relay = %relay_addr, advertise = %advertise, "node agent started");

    let (ledger_tx, ledger_rx) =
        watch::channel(Arc::new(Ledger::for_node(&state.config.owner_pin, &node)));
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (names_tx, names_rx) = watch::channel(Arc::new(NameMap::new()));

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
                node.clone(),
                snapshot_rx.clone(),
                metrics.clone(),
                async move { c.cancelled().await },
            ));
            Some(bound)
        }
        None => None,
    };

    let shared_state = Arc::new(state);
    {
        let c = cancel.clone();
        tasks.spawn(follow::follow(
            shared_state.clone(),
            hub,
            ledger_tx,
            snapshot_tx.clone(),
            metrics.clone(),
            c,
        ));
    }
    let placement = match (controller, &opts.kubernetes) {
        (Some(controller), Some(options)) => {
            let (tx, rx) = watch::channel(Arc::new(Placement::new(controller.settings().mode)));
            let c = cancel.clone();
            tasks.spawn(controller.run(
                shared_state.clone(),
                ledger_rx.clone(),
                tx,
                options.resync,
                c,
            ));
            Some(rx)
        }
        _ => None,
    };
    let listening = relay.listening();
    let relay = Arc::new(relay);
    {
        let reconciler = Reconciler {
            state: shared_state.clone(),
            node: node.clone(),
            pool: opts.loopback_pool,
            exposes: opts.exposes.clone(),
            relay: relay.clone(),
            names: names_tx,
            snapshot: snapshot_tx,
            metrics: metrics.clone(),
            addresses: load_addresses(&shared_state),
            peers_json: String::new(),
            placement,
        };
        let c = cancel.clone();
        tasks.spawn(reconciler.run(ledger_rx, c));
    }
    {
        let c = cancel.clone();
        let relay = relay.clone();
        tasks.spawn(async move { relay.run(c.cancelled()).await });
    }
    {
        let c = cancel.clone();
        tasks.spawn(renew_loop(shared_state, relay, metrics.clone(), c));
    }
    Ok(NodeHandle {
        node,
        relay_addr,
        dns_addr,
        admin_addr,
        snapshot: snapshot_rx,
        metrics,
        listening,
        cancel,
        tasks,
    })
}

/// Publishes where peers reach this node: the relay, or (Istio mode) the ingress gateway.
async fn publish_advertisement(
    state: &NodeState,
    hub: &HubClient,
    address: &str,
    exposes: &[Expose],
    istio: bool,
) -> Result<()> {
    let doc = Document::Advertisement(Advertisement {
        collab: state.config.collab.clone(),
        node: state.config.node.clone(),
        relay: (!istio).then(|| address.to_owned()),
        gateway: istio.then(|| address.to_owned()),
        exposes: exposes
            .iter()
            .map(|e| Exposure {
                port: e.port,
                label: e.label.clone(),
            })
            .collect(),
        issued_at: jws::unix(SystemTime::now()),
    });
    let signed = jws::sign(&doc, &Signer::Node(&state.signer()?))?;
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

/// Turns the ledger into relay config, DNS names, `peers.json` and the snapshot.
struct Reconciler {
    state: Arc<NodeState>,
    node: NodeRef,
    pool: Pool,
    exposes: Vec<Expose>,
    relay: Arc<Relay>,
    names: watch::Sender<Arc<NameMap>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    addresses: BTreeMap<NodeRef, Ipv4Addr>,
    peers_json: String,
    /// In Kubernetes: what the controller placed.
    placement: Option<watch::Receiver<Arc<Placement>>>,
}

impl Reconciler {
    async fn run(
        mut self,
        mut ledger: watch::Receiver<Arc<Ledger>>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = ledger.borrow_and_update().clone();
            if let Err(error) = self.reconcile(&current, SystemTime::now()) {
                warn!(%error, "reconcile failed");
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                changed = ledger.changed() => if changed.is_err() { return Ok(()) },
                _ = tick.tick() => {}
            }
        }
    }

    fn reconcile(&mut self, ledger: &Ledger, now: SystemTime) -> Result<()> {
        let Some(collab) = ledger.collaboration() else {
            return Ok(());
        };
        let (mut links, rejections) = ledger.effective_links(&self.node, now);
        let placement = self.placement.as_ref().map(|p| p.borrow().clone());
        match &placement {
            Some(placement) if !placement.synced => links.clear(),
            Some(placement) => links.retain(|l| !placement.vetoed.contains(&l.terms.id)),
            None => {}
        }
        let mut policy = Policy::new(&self.node, &links);
        let mut ports: BTreeMap<NodeRef, BTreeSet<PortSpec>> = BTreeMap::new();
        for (peer, port, grant) in policy.outbound() {
            ports.entry(peer.clone()).or_default().insert(PortSpec {
                port,
                label: grant.label.clone(),
            });
        }
        let assigned: BTreeMap<NodeRef, IpAddr> = match &placement {
            None => self.loopback_addresses(&ports)?,
            Some(placement) => placement
                .addresses
                .iter()
                .filter(|(peer, _)| ports.contains_key(*peer))
                .map(|(peer, ip)| (peer.clone(), *ip))
                .collect(),
        };
        if placement
            .as_ref()
            .is_some_and(|p| p.mode == k8s::Mode::Istio)
        {
            // Istio carries the links; the relay admits nothing.
            policy = Policy::new(&self.node, &[]);
        }

        // Org names are shared by an org's nodes; node names are unique.
        let mut peers = BTreeMap::new();
        for (peer, ip) in &assigned {
            let names = vec![
                format!("{}.{}.{}.fedmesh", peer.node, peer.org, collab.id),
                format!("{}.{}.fedmesh", peer.org, collab.id),
            ];
            peers.insert(
                peer.clone(),
                PeerView {
                    ip: *ip,
                    ports: ports[peer].iter().cloned().collect(),
                    names,
                },
            );
        }
        let relay_config = RelayConfig {
            policy,
            peers: ports
                .keys()
                .filter_map(|peer| {
                    let relay = ledger.advertisement(peer)?.relay.as_deref()?;
                    Some((peer.clone(), resolve(relay).ok()?))
                })
                .collect(),
            listeners: match &placement {
                Some(placement) => placement.listeners.clone(),
                None => peers
                    .iter()
                    .flat_map(|(peer, view)| {
                        view.ports
                            .iter()
                            .map(|p| (SocketAddr::new(view.ip, p.port), (peer.clone(), p.port)))
                    })
                    .collect(),
            },
            targets: self
                .exposes
                .iter()
                .map(|e| (e.port, e.target.clone()))
                .collect(),
        };
        self.relay.update(relay_config);

        let mut names = NameMap::new();
        for view in peers.values() {
            for name in &view.names {
                names.entry(name.clone()).or_default().push(view.ip);
            }
        }
        self.names.send_if_modified(|current| {
            if **current == names {
                return false;
            }
            *current = Arc::new(names);
            true
        });
        self.metrics.links_active.set(links.len() as i64);

        let organization_ids = collab
            .members
            .iter()
            .filter_map(|m| m.organization_id.map(|id| (m.org.clone(), id)))
            .collect();
        let cert_not_after = self.state.identity().ok().map(|i| i.info().not_after);
        let next = Snapshot {
            rejections: merge_rejections(&self.snapshot.borrow().rejections, &rejections),
            links,
            peers,
            synced: true,
            organization_ids,
            exposes: self.exposes.clone(),
            cert_not_after,
        };
        // The file first: whoever sees the new snapshot finds the file already written.
        let peers_json = serde_json::to_string_pretty(&next.peer_map())?;
        if peers_json != self.peers_json {
            files::write_public(&self.state.dir.join("peers.json"), peers_json.as_bytes())?;
            self.peers_json = peers_json;
        }
        self.snapshot.send_if_modified(|s| {
            let same = s.synced
                && s.links == next.links
                && s.peers == next.peers
                && s.rejections == next.rejections
                && s.cert_not_after == next.cert_not_after;
            if !same {
                *s = Arc::new(next);
            }
            !same
        });
        Ok(())
    }

    /// On a machine: one loopback address per peer from the pool, remembered in
    /// `addresses.json` so a peer keeps its address.
    fn loopback_addresses(
        &mut self,
        ports: &BTreeMap<NodeRef, BTreeSet<PortSpec>>,
    ) -> Result<BTreeMap<NodeRef, IpAddr>> {
        let assigned = addresses::assign(&self.pool, &self.addresses, ports.keys().cloned())?;
        let mut remembered = self.addresses.clone();
        remembered.extend(assigned.iter().map(|(k, v)| (k.clone(), *v)));
        if remembered != self.addresses {
            let text: BTreeMap<String, Ipv4Addr> = remembered
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect();
            files::write_public(
                &self.state.dir.join("addresses.json"),
                &serde_json::to_vec_pretty(&text)?,
            )?;
            self.addresses = remembered;
        }
        Ok(assigned
            .into_iter()
            .map(|(peer, ip)| (peer, IpAddr::V4(ip)))
            .collect())
    }
}

fn merge_rejections(old: &[Rejection], new: &[Rejection]) -> Vec<Rejection> {
    let mut out = old.to_vec();
    for r in new {
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    out
}

/// Resolves an advertised `host:port` (an IP address, or a name via the system resolver).
fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, addr.to_owned()))
}

/// Renews the node certificate at two thirds of its life (online CA): a CSR for the node's key,
/// the hub's signature, then the relay's TLS. The key stays; only the certificate file is
/// replaced (atomically), so a crash never leaves a key without its certificate.
async fn renew_loop(
    state: Arc<NodeState>,
    relay: Arc<Relay>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        // Look again at the renewal time, or in 10 s (also after a failed renewal).
        wait = Duration::from_secs(10);
        let identity = state.identity()?;
        let info = identity.info();
        let now = SystemTime::now();
        let left = info.not_after.duration_since(now).unwrap_or_default();
        metrics.cert_expiry_seconds.set(left.as_secs() as i64);
        if !renew::needs_renewal(info.not_before, info.not_after, now) {
            let until = info.renew_at().duration_since(now).unwrap_or_default();
            wait = wait.min(until).max(Duration::from_millis(200));
            continue;
        }
        match renew_once(&state).await {
            Ok(()) => {
                let identity = state.identity()?;
                let bundle = state.trust_bundle()?;
                relay.set_tls(&TlsMaterial {
                    identity: &identity,
                    bundle: &bundle,
                })?;
                info!(serial = %identity.info().serial, "certificate renewed");
            }
            Err(error) => warn!(%error, "certificate renewal failed; will retry"),
        }
    }
}

async fn renew_once(state: &NodeState) -> Result<()> {
    if state.identity()?.info().not_after <= SystemTime::now() {
        return crate::enroll::reattest(state).await;
    }
    let key = NodeKey::from_pem(&files::read_to_string(&state.key_path())?)?;
    let csr = key.csr(&state.spiffe_id()?)?;
    let renewed = state
        .hub_client()?
        .renew(&state.config.collab, csr.pem)
        .await?;
    let bundle = state.trust_bundle()?;
    let chain = rustls::pki_types::pem::PemObject::pem_slice_iter(renewed.cert_pem.as_bytes())
        .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()?;
    let info = bundle.verify(&chain, SystemTime::now(), Usage::Client)?;
    if info.spiffe_id != state.spiffe_id()? {
        bail!("the hub renewed the wrong identity: {}", info.spiffe_id);
    }
    state.save_cert(&renewed.cert_pem)?;
    Ok(())
}
