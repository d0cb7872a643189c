//! The thin async shell around the Kubernetes API: detect Istio, list what fedmesh manages,
//! apply what differs, delete what is no longer wanted, write PeerLinks. Everything it decides
//! comes from the pure [`desired`] and [`plan`] modules.
//!
//! One pass:
//!
//! 1. list the PeerLinks (the sysadmin's vetoes are in their `spec.veto`);
//! 2. compute what is desired from the verified ledger without the vetoed links;
//! 3. list every kind fedmesh writes, in every namespace it writes it, by its labels;
//! 4. server-side apply (field manager `fedmesh`, forced) each desired object the live one does
//!    not match, and delete each live object no link wants;
//! 5. apply PeerLinks and their status where they differ, delete the ones no longer shown.
//!
//! A pass over an unchanged cluster only reads. Passes run on every ledger change, when a
//! PeerLink changes (a sysadmin's veto acts at once), at each link's expiry, and at `resync`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use fedmesh_certs::files;
use fedmesh_documents::{Decision, Document, Ledger, NodeRef, Signer, Verdict, jws};
use fedmesh_mesh_config::{Credentials, ObjectKey};
use futures::{FutureExt, Stream, StreamExt};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Error, FIELD_MANAGER, Mode, Options, Result, Settings,
    desired::{self, Desired, Inputs, Memory},
    managed_selector,
    peerlink::{self, PeerLinkStatus},
    plan,
    resources::{PEERLINK, Scope},
    selector,
};
use crate::{enroll::NodeState, node::identity::IdentityWatch};

/// What the node agent's relay, DNS and snapshot need from the cluster side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The mode.
    pub mode: Mode,
    /// Whether a pass has read the cluster; until then the agent carries no link (a vetoed
    /// one must not slip through at start).
    pub synced: bool,
    /// Links the sysadmin vetoed: never carried, whatever the ledger says.
    pub vetoed: BTreeSet<String>,
    /// Where algorithm pods reach each peer: its Service's ClusterIP (relay) or VIP (Istio).
    pub addresses: BTreeMap<NodeRef, IpAddr>,
    /// The pod ports to listen on, and the (peer, port) each leads to (relay mode; Istio mode
    /// for the peers the agent carries).
    pub listeners: BTreeMap<SocketAddr, (NodeRef, u16)>,
    /// Istio mode: the peers whose links the agent's relay carries, because they or this node
    /// take no inbound connections at a gateway.
    pub carried: BTreeSet<NodeRef>,
}

impl Placement {
    /// Nothing placed yet.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            synced: false,
            vetoed: BTreeSet::new(),
            addresses: BTreeMap::new(),
            listeners: BTreeMap::new(),
            carried: BTreeSet::new(),
        }
    }
}

/// What one pass saw.
#[derive(Clone, Debug)]
pub struct Observed {
    /// What the verified links want.
    pub desired: Desired,
    /// The live objects fedmesh manages (PeerLinks aside).
    pub live: Vec<Value>,
    /// The live PeerLinks.
    pub peerlinks: Vec<Value>,
    /// Vetoed link ids, with the sysadmin's reason.
    pub vetoed: BTreeMap<String, Option<String>>,
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// For the node agent.
    pub placement: Placement,
    /// To persist.
    pub memory: Memory,
    /// Inbound links vetoed here that the ledger does not show vetoed yet, with the reason:
    /// report each to the hub as a node-signed decision.
    pub to_report: Vec<(String, Option<String>)>,
    /// How many PATCH and DELETE requests the pass sent.
    pub writes: usize,
    /// When the next link in force expires.
    pub next_expiry: Option<SystemTime>,
}

/// The backend the cluster supports, from the API groups it serves ([`Mode::detect`]).
pub async fn detect(client: &Client) -> Result<Mode> {
    let groups: Vec<(String, Vec<String>)> = client
        .list_api_groups()
        .await?
        .groups
        .into_iter()
        .map(|g| (g.name, g.versions.into_iter().map(|v| v.version).collect()))
        .collect();
    Ok(Mode::detect(&groups))
}

/// The Kubernetes side of the agent.
#[derive(Clone)]
pub struct Controller {
    client: Client,
    settings: Settings,
    /// The relay's link budgets, whose use PeerLink status reports (relay mode).
    budgets: Option<Arc<crate::relay::Budgets>>,
}

impl Controller {
    /// Connects to the cluster the pod runs in (or the kubeconfig's) and resolves `options`.
    pub async fn connect(options: &Options) -> Result<Self> {
        let client = Client::try_default().await?;
        Self::resolve(client, options).await
    }

    /// Resolves `options` with `client`: the namespace, and the mode (detected when not given).
    pub async fn resolve(client: Client, options: &Options) -> Result<Self> {
        let namespace = options
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let mode = match options.mode {
            Some(mode) => mode,
            None => detect(&client).await?,
        };
        mode.check(&options.render, &namespace)?;
        let settings = Settings {
            mode,
            namespace,
            render: options.render.clone(),
            pod_labels: options.pod_labels.clone(),
            pod_ports: options.pod_ports,
        };
        Ok(Self::new(client, settings))
    }

    /// The client it talks to the API server with.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A controller with settings already resolved.
    pub fn new(client: Client, settings: Settings) -> Self {
        Self {
            client,
            settings,
            budgets: None,
        }
    }

    /// The same controller, reporting what the relay's links have used of their budgets in
    /// PeerLink status.
    pub fn with_budgets(mut self, budgets: Arc<crate::relay::Budgets>) -> Self {
        self.budgets = Some(budgets);
        self
    }

    /// The resolved settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn api(&self, scope: &Scope) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &scope.namespace,
            &scope.kind.resource(),
        )
    }

    fn peerlinks_api(&self) -> Api<DynamicObject> {
        self.api(&Scope {
            kind: PEERLINK,
            namespace: self.settings.namespace.clone(),
        })
    }

    /// A wake-up each time a PeerLink fedmesh manages changes or goes (a sysadmin's veto, an
    /// edit, a deletion), and once the watch has listed them. The watch re-lists and resumes with
    /// backoff by itself; the periodic resync covers the time it is down.
    pub fn peerlink_changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let config = watcher::Config::default().labels(&managed_selector());
        watcher(self.peerlinks_api(), config)
            .default_backoff()
            .filter_map(|event| {
                std::future::ready(match event {
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Some(()),
                    Ok(watcher::Event::InitDone) => Some(()),
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                    Err(error) => {
                        debug!(%error, "PeerLink watch interrupted; it resumes by itself");
                        None
                    }
                })
            })
    }

    /// Lists the objects of `scope` carrying `selector`, with `apiVersion` and `kind` filled in
    /// (list items may lack them).
    async fn list(&self, scope: &Scope, selector: &str) -> Result<Vec<Value>> {
        let list = self
            .api(scope)
            .list(&ListParams::default().labels(selector))
            .await?;
        list.items
            .into_iter()
            .map(|item| {
                let mut value = serde_json::to_value(item).map_err(|source| Error::Json {
                    what: format!("a listed {}", scope.kind.kind),
                    source,
                })?;
                value["apiVersion"] = scope.kind.api_version.into();
                value["kind"] = scope.kind.kind.into();
                Ok(value)
            })
            .collect()
    }

    /// Reads the cluster and computes what the links want; `None` until the collaboration is
    /// verified.
    pub async fn observe(
        &self,
        ledger: &Ledger,
        node: &NodeRef,
        credentials: Option<&Credentials>,
        memory: &Memory,
        now: SystemTime,
    ) -> Result<Option<Observed>> {
        let Some(collab) = ledger.collaboration() else {
            return Ok(None);
        };
        let selector = selector(&collab.id);
        let peerlinks = self
            .list(
                &Scope {
                    kind: PEERLINK,
                    namespace: self.settings.namespace.clone(),
                },
                &selector,
            )
            .await?;
        let vetoed: BTreeMap<String, Option<String>> = peerlinks
            .iter()
            .filter(|p| p["spec"]["veto"] == true)
            .filter_map(|p| {
                let id = p["metadata"]["name"].as_str()?.to_owned();
                Some((id, p["spec"]["vetoReason"].as_str().map(str::to_owned)))
            })
            .collect();
        let ids: BTreeSet<String> = vetoed.keys().cloned().collect();
        let inputs = Inputs {
            ledger,
            node,
            vetoed: &ids,
            credentials,
            now,
        };
        let Some(desired) = desired::compute(&self.settings, &inputs, memory)? else {
            return Ok(None);
        };
        let mut live = Vec::new();
        for scope in self.settings.scopes() {
            live.extend(self.list(&scope, &selector).await?);
        }
        Ok(Some(Observed {
            desired,
            live,
            peerlinks,
            vetoed,
        }))
    }

    /// One pass: observe, then write what differs. `None` until the collaboration is verified.
    pub async fn reconcile(
        &self,
        ledger: &Ledger,
        node: &NodeRef,
        credentials: Option<&Credentials>,
        memory: &Memory,
        now: SystemTime,
    ) -> Result<Option<Outcome>> {
        let Some(observed) = self.observe(ledger, node, credentials, memory, now).await? else {
            return Ok(None);
        };
        let Observed {
            desired,
            live,
            peerlinks,
            vetoed,
        } = observed;
        let diff = plan::diff(&desired.objects, &live);
        let plan = diff.plan(&desired.objects);
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let mut writes = 0;
        let mut served: BTreeMap<ObjectKey, Value> = live
            .into_iter()
            .filter_map(|o| Some((ObjectKey::of(&o)?, o)))
            .collect();
        for object in &plan.apply {
            let scope = self.settings.scope_of(object)?;
            let key = ObjectKey::of(object)
                .ok_or_else(|| Error::Placement("an object without a name".into()))?;
            let back = self
                .api(&scope)
                .patch(&key.name, &apply, &Patch::Apply(object))
                .await?;
            writes += 1;
            served.insert(key, serde_json::to_value(back).unwrap_or_default());
        }
        for key in &plan.delete {
            let scope = self.settings.scope_of(&key_object(key))?;
            self.api(&scope)
                .delete(&key.name, &DeleteParams::default())
                .await?;
            writes += 1;
        }
        writes += self.write_peerlinks(&desired, &peerlinks).await?;

        let addresses = self.settings.mode.addresses(&desired, &served);
        let to_report = vetoed
            .iter()
            .filter(|(id, _)| {
                ledger
                    .status(id, now)
                    .is_some_and(|s| s.terms.to == *node && s.decision != Some(Verdict::Veto))
            })
            .map(|(id, reason)| (id.clone(), reason.clone()))
            .collect();
        Ok(Some(Outcome {
            placement: Placement {
                mode: self.settings.mode,
                synced: true,
                vetoed: vetoed.into_keys().collect(),
                addresses,
                listeners: desired.listeners.clone(),
                carried: desired.carried.clone(),
            },
            next_expiry: Ledger::next_expiry(&desired.links),
            memory: desired.memory,
            to_report,
            writes,
        }))
    }

    /// Applies PeerLinks whose spec differs, their status where it differs, and deletes the ones
    /// no longer shown. Returns the number of writes.
    async fn write_peerlinks(&self, desired: &Desired, live: &[Value]) -> Result<usize> {
        let api = self.peerlinks_api();
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let live: BTreeMap<&str, &Value> = live
            .iter()
            .filter_map(|p| Some((p["metadata"]["name"].as_str()?, p)))
            .collect();
        let mut writes = 0;
        for want in &desired.peerlinks {
            let name = want.object["metadata"]["name"].as_str().unwrap_or_default();
            let current = live.get(name);
            if current.is_none_or(|c| !plan::mismatches(&want.object, c).is_empty()) {
                api.patch(name, &apply, &Patch::Apply(&want.object)).await?;
                writes += 1;
            }
            let current_status: Option<PeerLinkStatus> =
                current.and_then(|c| serde_json::from_value(c["status"].clone()).ok());
            let mut status =
                peerlink::keep_transition_times(want.status.clone(), current_status.as_ref());
            if let (Some(budget), Some(budgets)) = (&mut status.budget, &self.budgets) {
                let usage = budgets.usage(name);
                budget.bytes_spent = usage.map(|u| u.bytes);
                budget.streams_active = usage.map(|u| u.streams);
            }
            if current_status.as_ref() != Some(&status) {
                api.patch_status(
                    name,
                    &apply,
                    &Patch::Apply(peerlink::status_object(name, &status)),
                )
                .await?;
                writes += 1;
            }
        }
        let shown: BTreeSet<&str> = desired
            .peerlinks
            .iter()
            .filter_map(|p| p.object["metadata"]["name"].as_str())
            .collect();
        for name in live.keys().filter(|n| !shown.contains(*n)) {
            api.delete(name, &DeleteParams::default()).await?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Runs passes until `cancel`: on every ledger change, when a PeerLink changes, at
    /// `resync`, and when a link expires.
    /// Reports vetoes to the hub, persists allocations in the state directory, and publishes
    /// the [`Placement`] for the relay and the snapshot.
    pub async fn run(
        self,
        state: Arc<NodeState>,
        mut ledger: watch::Receiver<Arc<Ledger>>,
        mut identity: IdentityWatch,
        placement: watch::Sender<Arc<Placement>>,
        resync: Duration,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let node = state.config.node.clone();
        let memory_path = state.dir.join("kubernetes.json");
        let mut memory: Memory = files::read_to_string(&memory_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let ca_pem = files::read_to_string(&state.ca_path())?;
        let mut reported = BTreeSet::new();
        let mut peerlink_changes = std::pin::pin!(self.peerlink_changes());
        info!(mode = %self.settings.mode, namespace = %self.settings.namespace, "Kubernetes controller started");
        loop {
            let current = ledger.borrow_and_update().clone();
            let now = SystemTime::now();
            let mut wake = resync;
            let credentials = self
                .settings
                .mode
                .needs_credentials()
                .then(|| identity.borrow_and_update().credentials(&ca_pem));
            let pass = self
                .reconcile(&current, &node, credentials.as_ref(), &memory, now)
                .await;
            match pass {
                Ok(Some(outcome)) => {
                    if outcome.writes > 0 {
                        info!(writes = outcome.writes, "cluster reconciled");
                    }
                    if outcome.memory != memory {
                        files::write_public(
                            &memory_path,
                            &serde_json::to_vec_pretty(&outcome.memory)?,
                        )?;
                        memory = outcome.memory;
                    }
                    for (id, reason) in outcome.to_report {
                        if reported.insert(id.clone()) {
                            if let Err(error) = report_veto(&state, &id, reason).await {
                                warn!(%error, link = %id, "cannot report the veto to the hub; will retry");
                                reported.remove(&id);
                            } else {
                                info!(link = %id, "veto reported to the hub");
                            }
                        }
                    }
                    if let Some(at) = outcome.next_expiry {
                        let until = at.duration_since(now).unwrap_or_default();
                        wake = wake.min(until + Duration::from_secs(1));
                    }
                    let next = Arc::new(outcome.placement);
                    placement.send_if_modified(|p| {
                        let changed = **p != *next;
                        if changed {
                            *p = next;
                        }
                        changed
                    });
                }
                Ok(None) => {}
                Err(error) => warn!(%error, "Kubernetes reconcile failed; will retry"),
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                changed = ledger.changed() => if changed.is_err() { return Ok(()) },
                // A renewed certificate goes into the credentials Secret.
                changed = identity.changed() => if changed.is_err() { return Ok(()) },
                Some(()) = peerlink_changes.next() => {
                    // One pass for a burst of changes (kubectl applying several, this agent's
                    // own status writes).
                    tokio::time::sleep(PEERLINK_SETTLE).await;
                    while let Some(Some(())) = peerlink_changes.next().now_or_never() {}
                }
                () = tokio::time::sleep(wake) => {}
            }
        }
    }
}

/// How long the controller lets a burst of PeerLink changes settle before its pass.
const PEERLINK_SETTLE: Duration = Duration::from_millis(200);

fn key_object(key: &ObjectKey) -> Value {
    serde_json::json!({
        "apiVersion": key.api_version,
        "kind": key.kind,
        "metadata": {"name": key.name, "namespace": key.namespace},
    })
}

/// This node's certificate, key and collaboration CA, for the gateways' Secret.
pub fn read_credentials(state: &NodeState) -> anyhow::Result<Credentials> {
    Ok(Credentials {
        cert_chain_pem: files::read_to_string(&state.cert_path())?,
        key_pem: files::read_to_string(&state.key_path())?,
        ca_pem: files::read_to_string(&state.ca_path())?,
    })
}

/// The decision a sysadmin's veto becomes: `node` (the receiving end) refuses `link_id`.
pub fn veto_decision(
    collab: &str,
    node: &NodeRef,
    link_id: &str,
    reason: Option<String>,
    at: SystemTime,
) -> Decision {
    Decision {
        collab: collab.to_owned(),
        link_id: link_id.to_owned(),
        by: node.clone(),
        verdict: Verdict::Veto,
        reason: Some(
            reason.unwrap_or_else(|| "vetoed by the node's sysadmin (PeerLink spec.veto)".into()),
        ),
        at: jws::unix(at),
    }
}

/// Signs the veto with the node's key and submits it to the hub.
async fn report_veto(
    state: &NodeState,
    link_id: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let decision = veto_decision(
        &state.config.collab,
        &state.config.node,
        link_id,
        reason,
        SystemTime::now(),
    );
    let signed = jws::sign(
        &Document::Decision(decision),
        &Signer::Node(&state.signer()?),
    )?;
    state
        .hub_client()?
        .submit(&state.config.collab, signed)
        .await?;
    Ok(())
}
