//! The vantage6-compatible address API, `GET {API_PATH}/vpn/algorithm/addresses`, on a listener
//! of its own (`--v6-listen`, never the admin one), and the run registry it trusts.
//!
//! vantage6 4 algorithms ask the node proxy for the addresses of the other runs of their task;
//! the proxy forwards to the server's `VPNAddress` resource (`vantage6-server` 4.15.2,
//! `server/resource/port.py`, `VPNAddress.get`). vantage6 5 removed the endpoint with the VPN.
//! The node agent answers it with the server's semantics:
//!
//! - every run of the selected tasks, at every organisation, that exposes a port — the same
//!   list at every node; `ip` is the address the *calling* node dials for that run (the stable
//!   per-peer address), and a run of this node is listed with the local address its algorithm
//!   listens on and the port peers dial;
//! - flags count when non-empty (`True if args.get(..) else False`); more than one `only_*` is a
//!   400, anything else is answered: `only_*` wins over `include_*` of the same level (the
//!   server's second 400 check cannot fire), `include_parent` with `only_children` lists the
//!   children and the parent, `only_parent` on a top-level task falls back to the caller's own
//!   task; an empty `label` filters nothing.
//!
//! Runs come from two places: links in force that name a task (the owner's, or those computed
//! from run announcements) give the runs this node may reach, and the **run registry** holds the
//! runs of this node, announced by the node's operator (`POST /runs` on the announce listener,
//! loopback by default) or the Kubernetes run watcher (pods of vantage6 5 task Jobs), each with
//! the address its container connects from.
//!
//! # Verified callers
//!
//! A vantage6 4 container token is an HS256 JWT signed with the server's secret: the node
//! cannot check its signature, so a token proves nothing by itself (anyone can write one, with
//! `alg: none` or any claims). The agent therefore trusts the **source address** of the
//! connection, which the container runtime assigns and the caller cannot choose on the node's
//! network: the caller must connect from the address of a run in the registry (else 403, and
//! nothing about any task is said), and its token must be a well-formed, unexpired, signed-alg
//! JWT (else 401) whose task (and organisation, when the node knows its own id) is that run's
//! (else 403). The answer then covers that run's task only. A forged token from a registered
//! container learns no more than that container's own task, which it may already read.
//!
//! vantage6 5 gives a token only to central containers, so the token cannot be required there.
//! Runs the Kubernetes run watcher registered (`crate::k8s::runs`, [`Origin::Cluster`]) are
//! verified by the source address alone: it is the IP the API server reports for a *running*
//! pod, in the task namespace, owned by a Job that carries vantage6's `task_id` annotation, and
//! not on the host network (whose IP every host process shares). Only the vantage6 node can
//! create Jobs there; the pod network assigns the IP (a pod cannot send from another pod's IP
//! on a CNI with anti-spoofing, which this relies on); and the address API's NetworkPolicy lets
//! only algorithm pods reach it. A token adds nothing the node could check (it cannot verify
//! the signature), so none is asked; one that is sent must still name the run's task.
//!
//! Every other path is answered with a JSON error body, or — with `--v6-upstream` — forwarded
//! unchanged to the vantage6 node proxy, so an algorithm can keep `HOST`/`PORT` as the node set
//! them.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Query, Request, State},
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

use fedmesh_documents::{NodeRef, PortSpec};

use super::Snapshot;
use crate::serve::Peer;

/// Most runs the registry holds at once.
pub const MAX_RUNS: usize = 4096;
/// Most ports one run may expose.
pub const MAX_RUN_PORTS: usize = 32;
/// Longest container token accepted.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// One reachable run's port, as vantage6 returns it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address {
    /// Where to connect.
    pub ip: String,
    /// The port.
    pub port: u16,
    /// The port's label.
    pub label: Option<String>,
    /// The run's organisation id.
    pub organization_id: Option<u64>,
    /// The run's task.
    pub task_id: u64,
    /// The task's parent.
    pub parent_id: Option<u64>,
}

/// A run of this node, as announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRun {
    /// The task.
    pub task_id: u64,
    /// The task's parent, for subtasks.
    #[serde(default)]
    pub parent_id: Option<u64>,
    /// The address the run's container connects from (its container or pod IP).
    pub source: IpAddr,
    /// The ports it listens on, `port[:label]` (vantage6: the image's `EXPOSE` and
    /// `LABEL p<port>=<label>`).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Where it listens, when not at `source` (default: `source`).
    #[serde(default)]
    pub host: Option<String>,
    /// The run's algorithm image digest (`sha256:<64 hex>`), which link policies name: from
    /// the pod's container status in Kubernetes, from the operator's announcement otherwise.
    /// A run without one is served by the address API but not announced to peers (no
    /// task-lifetime link can name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Why an announcement was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// The registry is full.
    Full,
    /// Too many ports.
    TooManyPorts(usize),
    /// Another run already announced this source address.
    SourceTaken { source: IpAddr, task_id: u64 },
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full => write!(f, "the run registry holds {MAX_RUNS} runs already"),
            Self::TooManyPorts(n) => write!(f, "{n} ports; a run may expose {MAX_RUN_PORTS}"),
            Self::SourceTaken { source, task_id } => write!(
                f,
                "{source} is the address of a run of task {task_id}; end that run first"
            ),
        }
    }
}

/// Where a registered run came from, which decides what its callers must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Announced by the node's operator (`POST /runs`): callers show the run's container token.
    Announced,
    /// Seen by the Kubernetes run watcher: a running pod of a vantage6 task Job, its IP read
    /// from the API server. Callers need no token (vantage6 5 gives non-central containers
    /// none); a token, when sent, must still be the run's.
    Cluster,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    run: LocalRun,
    origin: Origin,
}

/// The runs of this node, keyed by the address each connects from.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    runs: Arc<RwLock<BTreeMap<IpAddr, Entry>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a run (again: replaces it). An IPv4-mapped IPv6 source is kept as IPv4, as
    /// callers are looked up.
    pub fn announce(&self, run: LocalRun) -> Result<(), RegistryError> {
        let mut runs = self.runs.write().unwrap_or_else(|e| e.into_inner());
        insert(&mut runs, run, Origin::Announced)?;
        drop(runs);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Makes the runs the Kubernetes watcher saw ([`Origin::Cluster`]) exactly `seen`: cluster
    /// runs no longer seen (or changed) end, the others are recorded. An operator's
    /// announcement is never replaced by a different task's cluster run (that run is skipped
    /// and returned with why); one of the same task becomes a cluster run. Returns the refused.
    pub fn sync_cluster(&self, seen: BTreeMap<IpAddr, LocalRun>) -> Vec<(LocalRun, RegistryError)> {
        let seen: BTreeMap<IpAddr, LocalRun> = seen
            .into_values()
            .map(|mut r| {
                r.source = r.source.to_canonical();
                (r.source, r)
            })
            .collect();
        let mut refused = Vec::new();
        let mut runs = self.runs.write().unwrap_or_else(|e| e.into_inner());
        let before = runs.clone();
        runs.retain(|ip, e| {
            e.origin != Origin::Cluster || seen.get(ip).is_some_and(|r| *r == e.run)
        });
        for run in seen.into_values() {
            if runs
                .get(&run.source)
                .is_some_and(|e| e.origin == Origin::Cluster)
            {
                continue;
            }
            if let Err(e) = insert(&mut runs, run.clone(), Origin::Cluster) {
                refused.push((run, e));
            }
        }
        let changed = *runs != before;
        drop(runs);
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
        refused
    }

    /// Where the run at `source` came from, if there is one.
    pub fn origin(&self, source: IpAddr) -> Option<Origin> {
        self.runs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&source.to_canonical())
            .map(|e| e.origin)
    }

    /// Ends the run at `source`; returns it if there was one.
    pub fn end(&self, source: IpAddr) -> Option<LocalRun> {
        let old = self
            .runs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&source.to_canonical())
            .map(|e| e.run);
        if old.is_some() {
            self.changed.send_modify(|n| *n += 1);
        }
        old
    }

    /// Ends every run of `task`; returns how many.
    pub fn end_task(&self, task_id: u64) -> usize {
        let mut runs = self.runs.write().unwrap_or_else(|e| e.into_inner());
        let before = runs.len();
        runs.retain(|_, e| e.run.task_id != task_id);
        let n = before - runs.len();
        drop(runs);
        if n > 0 {
            self.changed.send_modify(|c| *c += 1);
        }
        n
    }

    /// The run connecting from `source`, if any.
    pub fn by_source(&self, source: IpAddr) -> Option<LocalRun> {
        self.runs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&source.to_canonical())
            .map(|e| e.run.clone())
    }

    /// Every run.
    pub fn all(&self) -> Vec<LocalRun> {
        self.runs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.run.clone())
            .collect()
    }

    /// A receiver that changes whenever the registry does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Records `run` in `runs` unless its source is another task's or the registry is full.
fn insert(
    runs: &mut BTreeMap<IpAddr, Entry>,
    mut run: LocalRun,
    origin: Origin,
) -> Result<(), RegistryError> {
    run.source = run.source.to_canonical();
    if run.ports.len() > MAX_RUN_PORTS {
        return Err(RegistryError::TooManyPorts(run.ports.len()));
    }
    match runs.get(&run.source) {
        Some(old) if old.run.task_id != run.task_id => {
            return Err(RegistryError::SourceTaken {
                source: run.source,
                task_id: old.run.task_id,
            });
        }
        None if runs.len() >= MAX_RUNS => return Err(RegistryError::Full),
        _ => {}
    }
    runs.insert(run.source, Entry { run, origin });
    Ok(())
}

/// A run's port known to this node: its organisation and the address the caller dials.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KnownRun {
    /// The run's organisation.
    pub org: String,
    /// The address.
    pub address: Address,
}

/// Every run's port this node knows: runs of peers it may reach (through links naming a task,
/// at the peers' local addresses), and its own runs (from links to it and from the registry).
pub fn runs(snap: &Snapshot, own_org: &str, local: &[LocalRun]) -> Vec<KnownRun> {
    // Keyed by (org, task, port) so a run listed by a link and by the registry appears once.
    let mut out: BTreeMap<(String, u64, u16), KnownRun> = BTreeMap::new();
    let own_id = snap.organization_ids.get(own_org).copied();
    for link in &snap.links {
        let t = &link.terms;
        let Some(task) = &t.task else {
            continue;
        };
        let ip = if t.to.org == own_org {
            None
        } else {
            match snap.peers.get(&t.to) {
                Some(view) => Some(view.ip.to_string()),
                None => continue,
            }
        };
        for p in &t.ports {
            let ip = ip.clone().unwrap_or_else(|| {
                snap.exposes
                    .iter()
                    .find(|e| e.port == p.port)
                    .and_then(|e| e.target.rsplit_once(':').map(|(h, _)| h.to_owned()))
                    .unwrap_or_else(|| "127.0.0.1".to_owned())
            });
            out.insert(
                (t.to.org.clone(), task.task_id, p.port),
                KnownRun {
                    org: t.to.org.clone(),
                    address: Address {
                        ip,
                        port: p.port,
                        label: p.label.clone(),
                        organization_id: snap.organization_ids.get(&t.to.org).copied(),
                        task_id: task.task_id,
                        parent_id: task.parent_id,
                    },
                },
            );
        }
    }
    for run in local {
        for p in &run.ports {
            let ip = run.host.clone().unwrap_or_else(|| run.source.to_string());
            out.entry((own_org.to_owned(), run.task_id, p.port))
                .or_insert_with(|| KnownRun {
                    org: own_org.to_owned(),
                    address: Address {
                        ip,
                        port: p.port,
                        label: p.label.clone(),
                        organization_id: own_id,
                        task_id: run.task_id,
                        parent_id: run.parent_id,
                    },
                });
        }
    }
    out.into_values().collect()
}

/// The query flags; a flag is on when its value is non-empty (`True if args.get(..) else False`
/// in vantage6's resource).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Flags {
    #[serde(default)]
    only_children: Option<String>,
    #[serde(default)]
    only_parent: Option<String>,
    #[serde(default)]
    only_siblings: Option<String>,
    #[serde(default)]
    only_self: Option<String>,
    #[serde(default)]
    include_children: Option<String>,
    #[serde(default)]
    include_parent: Option<String>,
    #[serde(default)]
    label: Option<String>,
}

fn on(flag: &Option<String>) -> bool {
    flag.as_deref().is_some_and(|v| !v.is_empty())
}

/// The caller: a run of `task_id` (child of `parent_id`) at organisation `org`.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Its organisation.
    pub org: String,
    /// Its task.
    pub task_id: u64,
    /// Its task's parent.
    pub parent_id: Option<u64>,
}

/// The one 400 vantage6's resource can return.
pub const TWO_ONLY: &str = "You can only specify one of the only_<...> parameters!";

/// Selects what `VPNAddress.get` returns for `caller`, step by step as the resource does.
pub fn select(runs: &[KnownRun], caller: &Caller, flags: &Flags) -> Result<Vec<Address>, String> {
    let (include_children, include_parent) =
        (on(&flags.include_children), on(&flags.include_parent));
    let only_children = on(&flags.only_children);
    let only_parent = on(&flags.only_parent);
    let only_siblings = on(&flags.only_siblings);
    let only_self = on(&flags.only_self);
    if [only_children, only_parent, only_siblings, only_self]
        .iter()
        .filter(|f| **f)
        .count()
        > 1
    {
        return Err(TWO_ONLY.into());
    }
    // The resource's second check (`combined_args.count(True) > 1`) needs two only_* flags, which
    // the first check has refused already: it never fires.
    let task = caller.task_id;
    let mut task_ids: BTreeSet<u64> = BTreeSet::from([task]);
    if include_children || only_children {
        let subtasks: BTreeSet<u64> = runs
            .iter()
            .filter(|r| r.address.parent_id == Some(task))
            .map(|r| r.address.task_id)
            .collect();
        if only_children {
            task_ids = subtasks;
        } else {
            task_ids.extend(subtasks);
        }
    }
    if (include_parent || only_parent)
        && let Some(parent) = caller.parent_id
    {
        if only_parent {
            task_ids = BTreeSet::from([parent]);
        } else {
            task_ids.insert(parent);
        }
    }
    if only_siblings || only_self {
        task_ids = BTreeSet::from([task]);
    }
    let label = flags.label.as_deref().filter(|l| !l.is_empty());
    Ok(runs
        .iter()
        .filter(|r| task_ids.contains(&r.address.task_id))
        .filter(|r| {
            if only_siblings {
                r.org != caller.org
            } else if only_self {
                r.org == caller.org
            } else {
                true
            }
        })
        .filter(|r| label.is_none_or(|l| r.address.label.as_deref() == Some(l)))
        .map(|r| r.address.clone())
        .collect())
}

/// Why a caller was turned away.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// 401 or 403.
    pub status: StatusCode,
    /// What to say (never anything about a task).
    pub msg: &'static str,
}

fn refused(status: StatusCode, msg: &'static str) -> Refused {
    Refused { status, msg }
}

/// Checks a caller: its source address must be a registered run, its token a well-formed,
/// unexpired JWT with a signing algorithm whose task (and organisation, if `own_org_id` is
/// known) is that run's. A run the Kubernetes watcher registered ([`Origin::Cluster`]) may
/// send no token. Returns the run.
pub fn verify(
    registry: &Registry,
    source: IpAddr,
    authorization: Option<&str>,
    own_org_id: Option<u64>,
    now: SystemTime,
) -> Result<LocalRun, Refused> {
    let (Some(run), Some(origin)) = (registry.by_source(source), registry.origin(source)) else {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "this address is no algorithm run of this node",
        ));
    };
    // A run the Kubernetes watcher saw is verified by its pod IP alone (see the module doc);
    // a token it sends anyway must still be its own.
    if origin == Origin::Cluster && authorization.is_none() {
        return Ok(run);
    }
    let unauthorized = |msg| refused(StatusCode::UNAUTHORIZED, msg);
    let token = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| t.len() <= MAX_TOKEN_BYTES)
        .ok_or_else(|| unauthorized("missing container token (Authorization: Bearer)"))?;
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("container token is not a JWT"));
    };
    let decode = |part: &str| -> Option<serde_json::Value> {
        let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let (Some(header), Some(claims)) = (decode(header), decode(payload)) else {
        return Err(unauthorized("container token is not a JWT"));
    };
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("none");
    if alg.eq_ignore_ascii_case("none") || signature.is_empty() {
        return Err(unauthorized("container token is unsigned"));
    }
    if let Some(exp) = claims.get("exp") {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        match exp.as_u64() {
            Some(exp) if exp > now => {}
            _ => return Err(unauthorized("container token has expired")),
        }
    }
    let claim = |name: &str| {
        claims
            .get("sub")
            .and_then(|s| s.get(name))
            .or_else(|| claims.get(name))
            .and_then(serde_json::Value::as_u64)
    };
    if claim("task_id") != Some(run.task_id) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "the container token is not for the run at this address",
        ));
    }
    if let (Some(own), Some(claimed)) = (own_org_id, claim("organization_id"))
        && own != claimed
    {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "the container token is not for the run at this address",
        ));
    }
    Ok(run)
}

/// What the address API serves from.
#[derive(Clone)]
pub struct V6State {
    /// This node.
    pub node: NodeRef,
    /// The links and peers in force.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The runs of this node.
    pub registry: Registry,
    /// The vantage6 node proxy every other request goes to, if any (`http://host:port`).
    pub upstream: Option<String>,
    /// The client that forwards.
    pub http: reqwest::Client,
}

#[derive(Serialize)]
struct Addresses {
    addresses: Vec<Address>,
}

fn msg(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "msg": msg.into() }))).into_response()
}

async fn addresses(
    State(s): State<V6State>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    query: Result<Query<Flags>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let snap = s.snapshot.borrow().clone();
    let own_id = snap.organization_ids.get(&s.node.org).copied();
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let run = match verify(
        &s.registry,
        peer.remote.ip().to_canonical(),
        auth,
        own_id,
        SystemTime::now(),
    ) {
        Ok(run) => run,
        Err(r) => {
            debug!(remote = %peer.remote, reason = r.msg, "address request refused");
            return msg(r.status, r.msg);
        }
    };
    let Ok(Query(flags)) = query else {
        return msg(StatusCode::BAD_REQUEST, "malformed query string");
    };
    let caller = Caller {
        org: s.node.org.clone(),
        task_id: run.task_id,
        parent_id: run.parent_id,
    };
    let all = runs(&snap, &s.node.org, &s.registry.all());
    match select(&all, &caller, &flags) {
        Ok(addresses) => Json(Addresses { addresses }).into_response(),
        Err(m) => msg(StatusCode::BAD_REQUEST, m),
    }
}

/// Other requests: forwarded unchanged to the vantage6 node proxy, or a JSON 404.
async fn other(State(s): State<V6State>, req: Request) -> Response {
    let Some(upstream) = &s.upstream else {
        return msg(
            StatusCode::NOT_FOUND,
            format!(
                "{} is not served here: this is fedmesh's vantage6 address API \
                 (GET /vpn/algorithm/addresses)",
                req.uri().path()
            ),
        );
    };
    match forward(&s.http, upstream, req).await {
        Ok(resp) => resp,
        Err(error) => {
            warn!(%error, "forwarding to the vantage6 node proxy failed");
            msg(
                StatusCode::BAD_GATEWAY,
                "the vantage6 node proxy did not answer",
            )
        }
    }
}

async fn forward(http: &reqwest::Client, upstream: &str, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", upstream.trim_end_matches('/'));
    // The body was bounded by the server already.
    let body = axum::body::to_bytes(body, usize::MAX).await?;
    let mut headers = parts.headers.clone();
    headers.remove(axum::http::header::HOST);
    let resp = http
        .request(parts.method, url)
        .headers(headers)
        .body(body)
        .send()
        .await?;
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if k != axum::http::header::TRANSFER_ENCODING && k != axum::http::header::CONNECTION {
            out = out.header(k, v);
        }
    }
    Ok(out.body(Body::from(resp.bytes().await?))?)
}

/// The address API's routes: `/vpn/algorithm/addresses` under `api_path` (vantage6's
/// `API_PATH`, empty on vantage6 4 nodes) and at the root.
pub fn router(state: V6State, api_path: &str) -> Router {
    let mut r = Router::new().route("/vpn/algorithm/addresses", get(addresses));
    let api_path = api_path.trim_end_matches('/');
    if !api_path.is_empty() {
        r = r.route(
            &format!("{api_path}/vpn/algorithm/addresses"),
            get(addresses),
        );
    }
    r.fallback(other).with_state(state)
}

/// Serves the address API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: V6State,
    api_path: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    crate::serve::serve(
        listener,
        router(state, &api_path),
        None,
        crate::serve::Bounds::default(),
        shutdown,
    )
    .await
}

/// An announcement as the announce listener takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Announce {
    task_id: u64,
    #[serde(default)]
    parent_id: Option<u64>,
    source: IpAddr,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    image: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    #[serde(default)]
    source: Option<IpAddr>,
    #[serde(default)]
    task_id: Option<u64>,
}

async fn announce(State(registry): State<Registry>, body: axum::body::Bytes) -> Response {
    let a: Announce = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return msg(StatusCode::BAD_REQUEST, format!("run announcement: {e}")),
    };
    let mut ports = Vec::with_capacity(a.ports.len().min(MAX_RUN_PORTS));
    for p in a.ports.iter().take(MAX_RUN_PORTS + 1) {
        match p.parse::<PortSpec>() {
            Ok(p) => ports.push(p),
            Err(e) => return msg(StatusCode::BAD_REQUEST, format!("port {p:?}: {e}")),
        }
    }
    if let Some(h) = &a.host
        && (h.is_empty() || h.len() > 253 || h.contains(['/', ' ', ':']))
    {
        return msg(StatusCode::BAD_REQUEST, format!("host {h:?} is not a host"));
    }
    if let Some(image) = &a.image
        && let Err(e) = fedmesh_documents::runs::validate_digest(image)
    {
        return msg(StatusCode::BAD_REQUEST, e.to_string());
    }
    let run = LocalRun {
        task_id: a.task_id,
        parent_id: a.parent_id,
        source: a.source,
        ports,
        host: a.host,
        image: a.image,
    };
    match registry.announce(run) {
        Ok(()) => msg(StatusCode::CREATED, "run announced"),
        Err(e) => msg(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn end(State(registry): State<Registry>, body: axum::body::Bytes) -> Response {
    let e: End = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return msg(StatusCode::BAD_REQUEST, format!("run end: {e}")),
    };
    let n = match (e.source, e.task_id) {
        (Some(source), _) => usize::from(registry.end(source).is_some()),
        (None, Some(task)) => registry.end_task(task),
        (None, None) => return msg(StatusCode::BAD_REQUEST, "name a source or a task_id"),
    };
    msg(StatusCode::OK, format!("{n} run(s) ended"))
}

async fn list(State(registry): State<Registry>) -> Json<Vec<LocalRun>> {
    Json(registry.all())
}

/// The announce routes (for the node's operator only: bind them to loopback):
/// `POST /runs` `{task_id, parent_id?, source, ports: ["8888:mpc"], host?, image?}` (`image`:
/// `sha256:<64 hex>`, the algorithm image digest; without it the run is not announced to peers),
/// `POST /runs/end` `{source}` or `{task_id}`, `GET /runs`.
pub fn announce_router(registry: Registry) -> Router {
    Router::new()
        .route("/runs", post(announce).get(list))
        .route("/runs/end", post(end))
        .fallback(|uri: Uri| async move {
            msg(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
        })
        .with_state(registry)
}

/// Serves the announce routes on `listener` until `shutdown` completes.
pub async fn serve_announce(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    crate::serve::serve(
        listener,
        announce_router(registry),
        None,
        crate::serve::Bounds {
            max_body_bytes: 16 * 1024,
            ..Default::default()
        },
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(org: &str, port: u16, label: &str, task_id: u64, parent_id: Option<u64>) -> KnownRun {
        KnownRun {
            org: org.to_owned(),
            address: Address {
                ip: format!("10.0.0.{}", port % 250),
                port,
                label: Some(label.to_owned()),
                organization_id: Some(u64::from(org.as_bytes()[4] - b'a' + 1)),
                task_id,
                parent_id,
            },
        }
    }

    /// Task 5 (top level) ran at org-b; its subtask 10 runs at org-a, org-b and org-c; task 20
    /// is a subtask of 10 at org-c.
    fn fixture() -> Vec<KnownRun> {
        vec![
            run("org-a", 21366, "mpc", 10, Some(5)),
            run("org-b", 11366, "mpc", 10, Some(5)),
            run("org-c", 11367, "mpc", 10, Some(5)),
            run("org-b", 9000, "other", 10, Some(5)),
            run("org-b", 8000, "agg", 5, None),
            run("org-c", 7000, "child", 20, Some(10)),
        ]
    }

    fn flags(query: &str) -> Flags {
        serde_json::from_value(
            query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, "1"));
                    (k.to_owned(), serde_json::Value::String(v.to_owned()))
                })
                .collect(),
        )
        .unwrap()
    }

    fn ports_for(caller: &Caller, query: &str) -> Result<Vec<u16>, String> {
        let mut ports: Vec<u16> = select(&fixture(), caller, &flags(query))?
            .iter()
            .map(|a| a.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    fn ports(query: &str) -> Result<Vec<u16>, String> {
        let caller = Caller {
            org: "org-a".into(),
            task_id: 10,
            parent_id: Some(5),
        };
        ports_for(&caller, query)
    }

    #[test]
    fn every_flag_selects_what_vantage6_does() {
        assert_eq!(ports(""), Ok(vec![9000, 11366, 11367, 21366]));
        assert_eq!(ports("only_siblings=1"), Ok(vec![9000, 11366, 11367]));
        assert_eq!(ports("only_self=1"), Ok(vec![21366]));
        assert_eq!(ports("only_children=1"), Ok(vec![7000]));
        assert_eq!(ports("only_parent=1"), Ok(vec![8000]));
        assert_eq!(
            ports("include_children=1"),
            Ok(vec![7000, 9000, 11366, 11367, 21366])
        );
        assert_eq!(
            ports("include_parent=1"),
            Ok(vec![8000, 9000, 11366, 11367, 21366])
        );
        assert_eq!(
            ports("include_children=1&include_parent=1"),
            Ok(vec![7000, 8000, 9000, 11366, 11367, 21366])
        );
        // Any non-empty value is true; an empty one is not.
        assert_eq!(ports("only_self=yes"), Ok(vec![21366]));
        assert_eq!(ports("only_self="), Ok(vec![9000, 11366, 11367, 21366]));
    }

    #[test]
    fn only_wins_over_include_and_mixed_levels_are_answered() {
        assert_eq!(ports("only_children=1&include_children=1"), Ok(vec![7000]));
        assert_eq!(ports("only_parent=1&include_parent=1"), Ok(vec![8000]));
        // only_siblings/only_self reset the tasks to the caller's own, whatever was included.
        assert_eq!(
            ports("only_siblings=1&include_parent=1&include_children=1"),
            Ok(vec![9000, 11366, 11367])
        );
        // include_parent with only_children: the children, then the parent appended.
        assert_eq!(
            ports("only_children=1&include_parent=1"),
            Ok(vec![7000, 8000])
        );
        // include_children with only_parent: the parent replaces everything.
        assert_eq!(ports("only_parent=1&include_children=1"), Ok(vec![8000]));
    }

    #[test]
    fn only_parent_of_a_top_level_task_is_the_callers_task() {
        let top = Caller {
            org: "org-b".into(),
            task_id: 5,
            parent_id: None,
        };
        assert_eq!(ports_for(&top, "only_parent=1"), Ok(vec![8000]));
        assert_eq!(
            ports_for(&top, "only_children=1"),
            Ok(vec![9000, 11366, 11367, 21366])
        );
        assert_eq!(ports_for(&top, "only_siblings=1"), Ok(vec![]));
    }

    #[test]
    fn label_filters_and_an_empty_label_does_not() {
        assert_eq!(ports("label=mpc"), Ok(vec![11366, 11367, 21366]));
        assert_eq!(ports("only_siblings=1&label=other"), Ok(vec![9000]));
        assert_eq!(ports("label=nothing"), Ok(vec![]));
        assert_eq!(ports("label="), Ok(vec![9000, 11366, 11367, 21366]));
    }

    #[test]
    fn two_only_flags_are_the_one_400() {
        assert_eq!(ports("only_self=1&only_siblings=1"), Err(TWO_ONLY.into()));
        assert_eq!(ports("only_children=1&only_parent=1"), Err(TWO_ONLY.into()));
    }

    fn jwt(header: &str, claims: serde_json::Value, sig: &str) -> String {
        format!(
            "Bearer {}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[test]
    fn callers_are_checked_by_address_then_token() {
        let reg = Registry::new();
        let src: IpAddr = "10.1.0.7".parse().unwrap();
        reg.announce(LocalRun {
            task_id: 10,
            parent_id: Some(5),
            source: src,
            ports: vec!["8888:mpc".parse().unwrap()],
            host: None,
            image: None,
        })
        .unwrap();
        let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
        let now = SystemTime::now();
        let good = jwt(
            hs,
            serde_json::json!({"sub": {"task_id": 10, "organization_id": 1}}),
            "c2ln",
        );
        let check = |src: &str, tok: &str| {
            verify(&reg, src.parse().unwrap(), Some(tok), Some(1), now).map(|r| r.task_id)
        };
        assert_eq!(check("10.1.0.7", &good), Ok(10));
        // Unknown address: 403 whatever the token says.
        assert_eq!(
            check("10.1.0.8", &good).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        let status = |tok: &str| check("10.1.0.7", tok).unwrap_err().status;
        let none = jwt(
            r#"{"alg":"none"}"#,
            serde_json::json!({"sub": {"task_id": 10}}),
            "",
        );
        assert_eq!(status(&none), StatusCode::UNAUTHORIZED);
        let expired = jwt(
            hs,
            serde_json::json!({"exp": 1, "sub": {"task_id": 10}}),
            "c2ln",
        );
        assert_eq!(status(&expired), StatusCode::UNAUTHORIZED);
        let other_task = jwt(hs, serde_json::json!({"sub": {"task_id": 11}}), "c2ln");
        assert_eq!(status(&other_task), StatusCode::FORBIDDEN);
        let other_org = jwt(
            hs,
            serde_json::json!({"sub": {"task_id": 10, "organization_id": 2}}),
            "c2ln",
        );
        assert_eq!(status(&other_org), StatusCode::FORBIDDEN);
        assert_eq!(status("Bearer x.y"), StatusCode::UNAUTHORIZED);
        assert_eq!(status("Basic abc"), StatusCode::UNAUTHORIZED);
        // A source address cannot be taken over by another task's run.
        let clash = reg.announce(LocalRun {
            task_id: 11,
            parent_id: None,
            source: src,
            ports: vec![],
            host: None,
            image: None,
        });
        assert!(matches!(clash, Err(RegistryError::SourceTaken { .. })));
        assert!(reg.end(src).is_some());
        assert_eq!(
            check("10.1.0.7", &good).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn cluster_runs_need_no_token_and_never_replace_another_tasks_announcement() {
        let reg = Registry::new();
        let run = |task_id, ip: &str| LocalRun {
            task_id,
            parent_id: None,
            source: ip.parse().unwrap(),
            ports: vec![],
            host: None,
            image: None,
        };
        reg.announce(run(7, "10.42.0.7")).unwrap();
        reg.announce(run(8, "10.42.0.8")).unwrap();
        let seen = |runs: &[LocalRun]| runs.iter().map(|r| (r.source, r.clone())).collect();
        let refused = reg.sync_cluster(seen(&[
            run(9, "10.42.0.7"),
            run(8, "10.42.0.8"),
            run(10, "::ffff:10.42.0.10"),
        ]));
        // Another task's cluster run at an announced address is refused and said so.
        assert_eq!(refused.len(), 1);
        assert!(matches!(
            refused[0].1,
            RegistryError::SourceTaken { task_id: 7, .. }
        ));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(reg.origin(ip("10.42.0.7")), Some(Origin::Announced));
        // The same task's becomes a cluster run; a mapped IPv6 source is kept as IPv4.
        assert_eq!(reg.origin(ip("10.42.0.8")), Some(Origin::Cluster));
        assert_eq!(reg.origin(ip("10.42.0.10")), Some(Origin::Cluster));
        let now = SystemTime::now();
        assert_eq!(
            verify(&reg, ip("10.42.0.10"), None, None, now).map(|r| r.task_id),
            Ok(10)
        );
        assert_eq!(
            verify(&reg, ip("10.42.0.7"), None, None, now)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
        // A token a cluster run sends anyway must be its own.
        let other = jwt(
            r#"{"alg":"HS256"}"#,
            serde_json::json!({"sub": {"task_id": 11}}),
            "c2ln",
        );
        assert_eq!(
            verify(&reg, ip("10.42.0.10"), Some(&other), None, now)
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        // Unchanged input changes nothing; an empty one ends the cluster runs only.
        let rx = reg.subscribe();
        assert!(
            reg.sync_cluster(seen(&[run(8, "10.42.0.8"), run(10, "10.42.0.10")]))
                .is_empty()
        );
        assert!(!rx.has_changed().unwrap());
        assert!(reg.sync_cluster(BTreeMap::new()).is_empty());
        assert!(rx.has_changed().unwrap());
        let left: Vec<u64> = reg.all().iter().map(|r| r.task_id).collect();
        assert_eq!(left, vec![7]);
    }
}
