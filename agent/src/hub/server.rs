//! The hub server: axum handlers over an in-memory view (one [`Ledger`] per collaboration) backed
//! by the redb [`Store`]. Every accepted document is checked the way a node would check it, plus
//! what only the hub can check (who submitted it, replayed join tokens, approvals of unknown
//! links, quotas), persisted, and only then acknowledged.
//!
//! A document the hub already holds (the same signed payload, or one that changes nothing a
//! node would compute) is answered with the sequence number it has and stores nothing. Every
//! refusal is logged at WARN with its reason and who asked (SPIFFE ID and certificate serial
//! over mutual TLS, else the address), one line per reason and identity per interval.
//!
//! The history stays small: a document is dropped, in the transaction that stores what
//! supersedes it, once the collaboration's ledger no longer rests on it (an older collaboration
//! version, advertisement or decision; after an owner's checkpoint, the revocations it folds and
//! the links that can never be in force again). Readers below the checkpoint get it first.
//!
//! A node whose certificate expired while it was down is issued a new one when it proves,
//! with a request signed by the key the hub recorded at its enrollment, that it still holds
//! that key, and neither the node nor the last certificate issued for that key is revoked
//! (`POST .../reattest`; the trust argument is in the README).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    path::{Path as FsPath, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use axum::{
    Extension, Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header::RETRY_AFTER},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_certs::{CertInfo, CollabCa, IssuancePolicy, IssuedCert, TrustBundle, verify::Usage};
use fedmesh_documents::{
    Checkpoint, Collaboration, DocKind, Document, Envelope, Ingested, JoinGrant, Ledger, NodeRef,
    RejectCode, Rejection, jws,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
};
use tracing::{debug, info, warn};

use super::{
    api::{
        CA_REQUEST_AUDIENCE, CaCreated, CaRequest, DocsPage, DocsQuery, EnrollRequest, Enrolled,
        ErrorBody, MAX_PAGE, MAX_WAIT_SECS, OWNER_TOKEN_AUDIENCE, OwnerToken, REATTEST_AUDIENCE,
        ReattestClaims, RenewRequest, SubmitDoc, Submitted, secret_digest,
    },
    files::private_dir,
    keys::CaKey,
    limits::{Limiter, Limits, StorageQuota},
    store::{CaRecord, GrantRecord, KeyRecord, Spent, Store},
    tls::HubCert,
};
use crate::{serve::Peer, throttle::Throttle};

/// Default lifetime of certificates the online CA issues.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The store's file name in the data directory.
pub const STORE_FILE: &str = "hub.redb";
/// The CA key file's name when `--ca-key-file` is not given.
pub const DEFAULT_CA_KEY_FILE: &str = "ca.key";
/// Longest an owner's signed CA request may be valid for.
const MAX_CA_REQUEST_TTL: u64 = 600;

/// How a hub runs.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Lifetime of the node certificates online CAs issue (at most 7 days).
    pub cert_ttl: Duration,
    /// The key online CA keys are sealed with; default `<data>/ca.key`.
    pub ca_key_file: Option<PathBuf>,
    /// Thumbprints of the owner keys that may create collaborations (empty: any owner).
    pub allowed_owners: BTreeSet<String>,
    /// What is bounded.
    pub limits: Limits,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            cert_ttl: DEFAULT_CERT_TTL,
            ca_key_file: None,
            allowed_owners: BTreeSet::new(),
            limits: Limits::default(),
        }
    }
}

impl HubOptions {
    fn ca_key_path(&self, data: &FsPath) -> PathBuf {
        self.ca_key_file
            .clone()
            .unwrap_or_else(|| data.join(DEFAULT_CA_KEY_FILE))
    }
}

/// An error answered to the client: a status and one line.
#[derive(Debug)]
pub(crate) struct HubError {
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
}

/// A refusal, attached to its response for the log.
#[derive(Clone, Debug)]
struct Refused(String);

impl HubError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("hub storage failed: {e}"),
        )
    }

    fn too_many(what: String, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{what}; try again in {}s", wait.as_secs().max(1)),
            )
        }
    }
}

impl From<Rejection> for HubError {
    fn from(r: Rejection) -> Self {
        let status = match r.code {
            RejectCode::Malformed => StatusCode::BAD_REQUEST,
            RejectCode::Forbidden => StatusCode::FORBIDDEN,
            RejectCode::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            RejectCode::Stale => StatusCode::CONFLICT,
            RejectCode::Unknown => StatusCode::NOT_FOUND,
        };
        Self::new(status, r.reason)
    }
}

impl From<JsonRejection> for HubError {
    fn from(r: JsonRejection) -> Self {
        Self::new(r.status(), r.body_text())
    }
}

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message.clone(),
            }),
        )
            .into_response();
        if let Some(wait) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
        {
            response.headers_mut().insert(RETRY_AFTER, v);
        }
        response.extensions_mut().insert(Refused(self.message));
        response
    }
}

type HubResult<T> = Result<T, HubError>;

/// Documents and bytes stored.
#[derive(Clone, Copy, Debug, Default)]
struct Stored {
    docs: usize,
    bytes: usize,
}

impl Stored {
    fn add(&mut self, bytes: usize) {
        self.docs += 1;
        self.bytes += bytes;
    }

    fn sub(&mut self, bytes: usize) {
        self.docs = self.docs.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Why storing `bytes` more would break `quota`, if it would.
    fn over(&self, bytes: usize, quota: StorageQuota) -> Option<String> {
        (self.docs + 1 > quota.docs || self.bytes + bytes > quota.bytes).then(|| {
            format!(
                "{} documents, {} bytes stored; the quota is {} documents, {} bytes",
                self.docs, self.bytes, quota.docs, quota.bytes
            )
        })
    }
}

/// One collaboration as the hub holds it.
struct CollabState {
    ledger: Ledger,
    collab_jws: String,
    /// Stored envelopes by sequence number (compacted ones removed).
    docs: BTreeMap<u64, Envelope>,
    /// The last sequence number handed out (never handed out again).
    head: u64,
    ca: Option<CollabCa>,
    grants: BTreeMap<String, GrantRecord>,
    /// Join token secrets (SHA-256) that can never be used again.
    spent: BTreeMap<String, Spent>,
    /// Each node's enrolled key and the last certificate issued for it.
    keys: BTreeMap<String, KeyRecord>,
    latest: watch::Sender<u64>,
    /// SHA-256 of each stored JWS → its sequence number (exact replays).
    stored: HashMap<String, u64>,
    /// (kind, subject) → the latest sequence number stored for it.
    subjects: HashMap<(DocKind, String), u64>,
    /// Storage per signer (`org/node`, or `owner`), and in all.
    usage: HashMap<String, Stored>,
    total: Stored,
}

impl CollabState {
    fn new(ledger: Ledger, collab_jws: String) -> Self {
        Self {
            ledger,
            collab_jws,
            docs: BTreeMap::new(),
            head: 0,
            ca: None,
            grants: BTreeMap::new(),
            spent: BTreeMap::new(),
            keys: BTreeMap::new(),
            latest: watch::channel(0).0,
            stored: HashMap::new(),
            subjects: HashMap::new(),
            usage: HashMap::new(),
            total: Stored::default(),
        }
    }

    fn seq(&self) -> u64 {
        self.head
    }

    fn collab(&self) -> HubResult<&Collaboration> {
        self.ledger.collaboration().ok_or_else(|| {
            HubError::new(StatusCode::NOT_FOUND, "collaboration has no document yet")
        })
    }

    /// Indexes a stored envelope.
    fn index(&mut self, env: Envelope) {
        self.stored.insert(digest(&env.jws), env.seq);
        self.subjects
            .insert((env.kind, env.subject.clone()), env.seq);
        self.usage
            .entry(signer_of(&env.jws))
            .or_default()
            .add(env.jws.len());
        self.total.add(env.jws.len());
        self.head = self.head.max(env.seq);
        self.docs.insert(env.seq, env);
    }

    /// Forgets a removed envelope.
    fn unindex(&mut self, seq: u64) {
        let Some(env) = self.docs.remove(&seq) else {
            return;
        };
        self.stored.remove(&digest(&env.jws));
        let subject = (env.kind, env.subject.clone());
        if self.subjects.get(&subject) == Some(&seq) {
            self.subjects.remove(&subject);
        }
        if let Some(usage) = self.usage.get_mut(&signer_of(&env.jws)) {
            usage.sub(env.jws.len());
        }
        self.total.sub(env.jws.len());
    }

    /// The stored envelope of the latest checkpoint.
    fn checkpoint(&self) -> Option<&Envelope> {
        let number = self.ledger.checkpoint()?.number.to_string();
        let seq = self.subjects.get(&(DocKind::Checkpoint, number))?;
        self.docs.get(seq)
    }

    /// The stored envelopes `ledger` no longer rests on: all of them (`sweep`), or the one the
    /// newest document of `(kind, subject)` replaces.
    fn obsolete(
        &self,
        ledger: &Ledger,
        sweep: bool,
        replaced: Option<&(DocKind, String)>,
    ) -> Vec<u64> {
        let rests_on = |env: &Envelope| {
            jws::peek(&env.jws)
                .map(|(_, doc)| ledger.holds(&doc))
                .unwrap_or(false)
        };
        if sweep {
            return self
                .docs
                .values()
                .filter(|env| !rests_on(env))
                .map(|env| env.seq)
                .collect();
        }
        let Some((kind, subject)) = replaced else {
            return Vec::new();
        };
        // A newer document of the same subject replaces the old one; a run's end replaces its
        // announcement.
        let candidates: &[DocKind] = match kind {
            DocKind::Collaboration
            | DocKind::Advertisement
            | DocKind::Decision
            | DocKind::LinkPolicy
            | DocKind::RunAnnouncement => &[*kind],
            DocKind::RunEnd => &[DocKind::RunEnd, DocKind::RunAnnouncement],
            _ => &[],
        };
        candidates
            .iter()
            .filter_map(|k| self.subjects.get(&(*k, subject.clone())))
            .filter_map(|seq| self.docs.get(seq))
            .filter(|env| !rests_on(env))
            .map(|env| env.seq)
            .collect()
    }
}

fn digest(jws: &str) -> String {
    fedmesh_certs::fingerprint(jws.as_bytes())
}

/// Who a stored document counts against: the signing node (`org/node`), or `owner`.
fn signer_of(jws: &str) -> String {
    jws::peek(jws)
        .ok()
        .and_then(|(header, _)| header.x5c_der().ok().flatten())
        .and_then(|chain| chain.into_iter().next())
        .and_then(|der| CertInfo::parse(&der).ok())
        .map_or_else(
            || "owner".to_owned(),
            |info| NodeRef::from(&info.spiffe_id).to_string(),
        )
}

/// An online CA made before its collaboration document arrived.
struct PendingCa {
    ca: CollabCa,
    owner: String,
    created_at: u64,
}

struct Inner {
    store: Store,
    /// What the online CAs sign: lifetime cap and back-dating.
    policy: IssuancePolicy,
    /// Lifetime of the certificates they issue.
    cert_ttl: Duration,
    collabs: BTreeMap<String, CollabState>,
    pending_cas: BTreeMap<String, PendingCa>,
    /// Seals online CA keys; without it the hub keeps no online CAs.
    ca_key: Option<CaKey>,
    ca_key_path: PathBuf,
}

impl Inner {
    /// Forgets online CAs whose collaboration did not come within `ttl` seconds.
    fn drop_expired_cas(&mut self, now: u64, ttl: u64) -> HubResult<()> {
        let expired: Vec<String> = self
            .pending_cas
            .iter()
            .filter(|(_, p)| p.created_at + ttl <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if !expired.is_empty() {
            self.store
                .remove_cas(&expired)
                .map_err(HubError::internal)?;
            for id in &expired {
                self.pending_cas.remove(id);
            }
            info!(collabs = ?expired, "online CAs whose collaboration never came were dropped");
        }
        Ok(())
    }
}

/// What the handlers share besides the state behind the lock.
struct Shared {
    options: HubOptions,
    per_ip: Limiter,
    per_identity: Limiter,
    throttle: Throttle,
}

/// The hub: shared state behind the handlers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
    shared: Arc<Shared>,
    cert: Arc<HubCert>,
}

/// Whether `dir` holds nothing (or is not there).
fn is_empty_dir(dir: &FsPath) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

impl Hub {
    /// Makes a new hub in `data`, which must be absent or empty: the directory (`0700`), the
    /// store, the hub certificate and key (SANs `names`), and the CA key file if it is not
    /// there. Never replaces anything.
    pub fn init(data: &FsPath, names: &[String], options: &HubOptions) -> Result<()> {
        if !is_empty_dir(data)? {
            bail!(
                "{} is not empty: --init makes a new hub only in an empty data directory",
                data.display()
            );
        }
        private_dir(data)?;
        let cert = HubCert::create(data, names)?;
        let ca_key = options.ca_key_path(data);
        if !ca_key.exists() {
            CaKey::create(&ca_key)?;
        }
        Store::create(&data.join(STORE_FILE), &cert.pin())?;
        warn!(
            data = %data.display(),
            pin = %cert.pin(),
            ca_key = %ca_key.display(),
            "initialised a new hub: owners and nodes trust it by this pin"
        );
        Ok(())
    }

    /// Opens the hub in `data` and rebuilds every collaboration's view from it. Refuses a
    /// missing, empty, corrupted or exposed store, a missing hub certificate or key, a
    /// certificate that is not the one the store was made with, and sealed CA keys without
    /// their key.
    pub fn open(data: &FsPath, options: HubOptions) -> Result<Self> {
        if !data.exists() {
            bail!(
                "the hub data directory {} is missing: restore it from a backup, or start \
                 with --init to make a new hub",
                data.display()
            );
        }
        private_dir(data)?;
        let cert = HubCert::load(data)?;
        let store = Store::open(&data.join(STORE_FILE))?;
        let pin = store.hub_pin()?;
        if pin != cert.pin() {
            bail!(
                "{} (pin {}) is not the certificate this hub's store was made with (pin \
                 {pin}): restore the original hub-cert.pem and hub-key.pem",
                data.join("hub-cert.pem").display(),
                cert.pin()
            );
        }
        let snap = store.load()?;
        let ca_key_path = options.ca_key_path(data);
        let ca_key = if ca_key_path.exists() {
            Some(CaKey::load(&ca_key_path)?)
        } else if let Some(collab) = snap.cas.keys().next() {
            bail!(
                "the CA key file {} is missing, and the store holds sealed online CA keys \
                 (of {collab}, ...): give the key they were sealed with (--ca-key-file)",
                ca_key_path.display()
            );
        } else {
            warn!(ca_key = %ca_key_path.display(), "no CA key file: this hub keeps no online CAs");
            None
        };
        let policy = IssuancePolicy::with_max_ttl(options.cert_ttl)?
            .with_backdate((options.cert_ttl / 4).min(fedmesh_certs::policy::MAX_BACKDATE))?;
        let now = SystemTime::now();
        let mut collabs = BTreeMap::new();
        let mut pending_cas = BTreeMap::new();
        for (id, record) in &snap.cas {
            let key = ca_key.as_ref().context("unreachable: no CA key")?;
            let key_pem = String::from_utf8(key.open(id, &record.key)?)
                .with_context(|| format!("the sealed CA key of {id} is not PEM"))?;
            let ca = CollabCa::from_pem(&record.cert_pem, &key_pem)?;
            pending_cas.insert(
                id.clone(),
                PendingCa {
                    ca,
                    owner: record.owner.clone(),
                    created_at: record.created_at,
                },
            );
        }
        for (id, collab_jws) in &snap.collabs {
            let (_, doc) = jws::peek(collab_jws)?;
            let Document::Collaboration(c) = doc else {
                bail!("stored collaboration {id} is not a collaboration document");
            };
            let mut state = CollabState::new(
                Ledger::new(&jws::thumbprint(&c.owner_key)),
                collab_jws.clone(),
            );
            if let Err(r) = state.ledger.ingest_jws(collab_jws, now) {
                bail!("the stored collaboration {id} does not verify: {r}");
            }
            let docs = snap.docs.get(id).cloned().unwrap_or_default();
            // Readers take the latest checkpoint first; so does the hub.
            let checkpoint = docs
                .iter()
                .filter(|env| env.kind == DocKind::Checkpoint)
                .max_by_key(|env| env.subject.parse::<u64>().unwrap_or(0));
            if let Some(env) = checkpoint
                && let Err(r) = state.ledger.ingest(env, now)
            {
                debug!(collab = %id, %r, "stored checkpoint not applied");
            }
            for env in docs {
                // Documents were verified on the way in; ones that no longer verify (for
                // instance signed by a now-revoked certificate) can never count again.
                if let Err(r) = state.ledger.ingest(&env, now) {
                    debug!(collab = %id, %r, "stored document not applied");
                }
                state.index(env);
            }
            state.head = state.head.max(snap.heads.get(id).copied().unwrap_or(0));
            let obsolete = state.obsolete(&state.ledger, true, None);
            if !obsolete.is_empty() {
                store.remove_docs(id, &obsolete)?;
                info!(collab = %id, removed = obsolete.len(), "documents no longer needed were removed");
                for seq in obsolete {
                    state.unindex(seq);
                }
            }
            state.keys = snap
                .keys
                .iter()
                .filter(|((c, _), _)| c == id)
                .map(|((_, node), k)| (node.clone(), k.clone()))
                .collect();
            state.grants = snap
                .grants
                .iter()
                .filter(|((c, _), _)| c == id)
                .map(|((_, node), g)| (node.clone(), g.clone()))
                .collect();
            state.spent = snap
                .spent
                .iter()
                .filter(|((c, _), _)| c == id)
                .map(|((_, digest), s)| (digest.clone(), s.clone()))
                .collect();
            state.latest.send_replace(state.seq());
            state.ca = pending_cas.remove(id).map(|p| p.ca);
            collabs.insert(id.clone(), state);
        }
        info!(collaborations = collabs.len(), pin = %cert.pin(), "hub store loaded");
        let limits = options.limits;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                store,
                policy,
                cert_ttl: options.cert_ttl,
                collabs,
                pending_cas,
                ca_key,
                ca_key_path,
            })),
            shared: Arc::new(Shared {
                per_ip: Limiter::new(limits.requests_per_ip),
                per_identity: Limiter::new(limits.writes_per_identity),
                throttle: Throttle::default(),
                options,
            }),
            cert: Arc::new(cert),
        })
    }

    /// The hub's TLS certificate (checked against the store).
    pub fn cert(&self) -> &HubCert {
        &self.cert
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/health", get(|| async { "ok" }))
            .route("/v1/collabs", post(create_collab))
            .route("/v1/collabs/{id}/ca", post(create_ca))
            .route("/v1/collabs/{id}/docs", post(submit_doc).get(list_docs))
            .route("/v1/collabs/{id}/enroll", post(enroll))
            .route("/v1/collabs/{id}/renew", post(renew))
            .route("/v1/collabs/{id}/reattest", post(reattest))
            .layer(axum::middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone())
    }

    /// Counts a stored document against `who`'s write rate.
    fn charge(&self, who: &str) -> HubResult<()> {
        self.shared.per_identity.check(who).map_err(|wait| {
            HubError::too_many(format!("{who} is storing documents too fast"), wait)
        })
    }

    /// The routes as [`serve`] hands them one connection, whose client presented `peer` (its
    /// certificate chain) or nothing: for callers with no TLS connection (the fuzz targets).
    pub fn router_for_peer(&self, peer: Option<Vec<CertificateDer<'static>>>) -> Router {
        self.router().layer(Extension(Peer {
            remote: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            certs: peer.map(Arc::new),
        }))
    }
}

/// Who is asking, for the log: the certificate's SPIFFE ID and serial (not yet verified) over
/// mutual TLS, else the IP address.
fn who(peer: &Peer) -> String {
    let cert = peer
        .certs
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|der| CertInfo::parse(der).ok());
    match cert {
        Some(info) => format!("{} serial {}", info.spiffe_id, info.serial),
        None => peer.remote.ip().to_string(),
    }
}

/// Every request: the per-address rate, then the handler; every refusal is logged.
async fn guard(
    State(hub): State<Hub>,
    Extension(peer): Extension<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let response = match hub.shared.per_ip.check(&peer.remote.ip().to_string()) {
        Err(wait) => {
            HubError::too_many(format!("too many requests from {}", peer.remote.ip()), wait)
                .into_response()
        }
        Ok(()) => next.run(req).await,
    };
    if let Some(Refused(reason)) = response.extensions().get::<Refused>() {
        let status = response.status();
        let class = status.canonical_reason().unwrap_or("refused");
        let who = who(&peer);
        if let Some(held_back) = hub.shared.throttle.admit(class, &who, Instant::now()) {
            warn!(
                %who, remote = %peer.remote, %method, %path, status = status.as_u16(), %reason,
                held_back, "request refused"
            );
        }
    }
    response
}

/// Serves the hub on `listener` with TLS `config` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    hub: Hub,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let bounds = hub.shared.options.limits.connections;
    crate::serve::serve(listener, hub.router(), Some(config), bounds, shutdown).await
}

/// Serves `app` over TLS on `listener` with the default bounds, handing each request the
/// [`Peer`] it came from, until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    crate::serve::serve(
        listener,
        app,
        Some(config),
        crate::serve::Bounds::default(),
        shutdown,
    )
    .await
}

fn now() -> SystemTime {
    SystemTime::now()
}

/// The collaboration's online CA, for renewing a certificate; an offline CA's owner renews.
fn online_ca(state: &CollabState) -> HubResult<&CollabCa> {
    state.ca.as_ref().ok_or_else(|| {
        HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this collaboration's CA is offline: the owner renews certificates",
        )
    })
}

fn not_found(id: &str) -> HubError {
    HubError::new(
        StatusCode::NOT_FOUND,
        format!("unknown collaboration {id:?}"),
    )
}

/// The owner a collaboration id is reserved for may create it; anyone else may not.
fn check_allowed(options: &HubOptions, owner: &str, id: &str) -> HubResult<()> {
    if !options.allowed_owners.is_empty() && !options.allowed_owners.contains(owner) {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!(
                "owner key {owner} may not create collaborations on this hub (not in its \
                 --allow-owner list; creating {id:?})"
            ),
        ));
    }
    Ok(())
}

/// Reads and verifies an owner's signed request to make the online CA of `id`; returns the
/// owner key's thumbprint.
fn verify_ca_request(body: Option<Json<SubmitDoc>>, id: &str, now: u64) -> HubResult<String> {
    let unauthorized = |m: String| HubError::new(StatusCode::UNAUTHORIZED, m);
    let Some(Json(SubmitDoc { jws: request })) = body else {
        return Err(unauthorized(
            "creating an online CA needs a request signed by the collaboration owner".into(),
        ));
    };
    let claims: CaRequest = request
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or_else(|| unauthorized("the CA request is not an owner-signed JWS".into()))?;
    let verified: CaRequest = jws::verify_owner_claims(&request, &claims.owner_key)
        .map_err(|e| unauthorized(format!("the CA request is refused: {e}")))?;
    if verified.collab != id || verified.aud != CA_REQUEST_AUDIENCE {
        return Err(unauthorized(format!(
            "the CA request is for {:?} ({}), not {id:?}",
            verified.collab, verified.aud
        )));
    }
    if verified.exp <= now || verified.exp > now + MAX_CA_REQUEST_TTL {
        return Err(unauthorized(format!(
            "the CA request expires at {}; it must be valid now ({now}) and for at most \
             {MAX_CA_REQUEST_TTL}s",
            verified.exp
        )));
    }
    Ok(jws::thumbprint(&verified.owner_key))
}

async fn create_ca(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    body: Result<Json<SubmitDoc>, JsonRejection>,
) -> HubResult<Json<CaCreated>> {
    let now = jws::unix(now());
    let owner = verify_ca_request(body.ok(), &id, now)?;
    let options = &hub.shared.options;
    check_allowed(options, &owner, &id)?;
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    if inner.collabs.contains_key(&id) {
        return Err(HubError::new(
            StatusCode::CONFLICT,
            format!("collaboration {id:?} already exists"),
        ));
    }
    // CAs whose collaboration never came are forgotten.
    let ttl = options.limits.pending_ca_ttl.as_secs();
    let expired: Vec<String> = inner
        .pending_cas
        .iter()
        .filter(|(_, p)| p.created_at + ttl <= now)
        .map(|(id, _)| id.clone())
        .collect();
    if !expired.is_empty() {
        inner
            .store
            .remove_cas(&expired)
            .map_err(HubError::internal)?;
        for id in &expired {
            inner.pending_cas.remove(id);
        }
        info!(collabs = ?expired, "online CAs whose collaboration never came were dropped");
    }
    if let Some(pending) = inner.pending_cas.get(&id) {
        if pending.owner != owner {
            return Err(HubError::new(
                StatusCode::CONFLICT,
                format!(
                    "collaboration id {id:?} is reserved by another owner key until {}",
                    pending.created_at + ttl
                ),
            ));
        }
        return Ok(Json(CaCreated {
            ca_pem: pending.ca.cert_pem().to_owned(),
        }));
    }
    if inner.pending_cas.len() >= options.limits.max_pending_cas {
        return Err(HubError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} online CAs are waiting for their collaboration document; try again later",
                inner.pending_cas.len()
            ),
        ));
    }
    let Some(key) = &inner.ca_key else {
        return Err(HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "this hub keeps no online CAs (it has no CA key file {}); use an offline CA",
                inner.ca_key_path.display()
            ),
        ));
    };
    let ca = CollabCa::generate(
        &id,
        SystemTime::now(),
        fedmesh_certs::ca::DEFAULT_CA_VALIDITY,
    )
    .map_err(|e| HubError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let record = CaRecord {
        cert_pem: ca.cert_pem().to_owned(),
        key: key
            .seal(&id, ca.key_pem().as_bytes())
            .map_err(HubError::internal)?,
        owner: owner.clone(),
        created_at: now,
    };
    inner
        .store
        .put_ca(&id, &record)
        .map_err(HubError::internal)?;
    let ca_pem = ca.cert_pem().to_owned();
    inner.pending_cas.insert(
        id.clone(),
        PendingCa {
            ca,
            owner: owner.clone(),
            created_at: now,
        },
    );
    info!(collab = %id, %owner, "online CA created");
    Ok(Json(CaCreated { ca_pem }))
}

async fn create_collab(
    State(hub): State<Hub>,
    body: Result<Json<SubmitDoc>, JsonRejection>,
) -> HubResult<(StatusCode, Json<Submitted>)> {
    let Json(SubmitDoc { jws: doc_jws }) = body?;
    let (_, doc) =
        jws::peek(&doc_jws).map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let Document::Collaboration(c) = doc else {
        return Err(HubError::new(
            StatusCode::BAD_REQUEST,
            format!("expected a collaboration document, got a {}", doc.kind()),
        ));
    };
    let owner = jws::thumbprint(&c.owner_key);
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    if let Some(state) = inner.collabs.get_mut(&c.id) {
        return accept(&hub, &inner.store, &c.id, state, doc_jws, now());
    }
    check_allowed(&hub.shared.options, &owner, &c.id)?;
    let ttl = hub.shared.options.limits.pending_ca_ttl.as_secs();
    inner.drop_expired_cas(jws::unix(now()), ttl)?;
    if let Some(pending) = inner.pending_cas.get(&c.id) {
        if pending.owner != owner {
            return Err(HubError::new(
                StatusCode::CONFLICT,
                format!(
                    "collaboration id {:?} is reserved for another owner key",
                    c.id
                ),
            ));
        }
        if pending.ca.cert_pem().trim() != c.ca_pem.trim() {
            return Err(HubError::new(
                StatusCode::CONFLICT,
                "the collaboration's CA is not the online CA the hub made for it",
            ));
        }
    }
    let mut state = CollabState::new(Ledger::new(&owner), doc_jws.clone());
    let created = accept(&hub, &inner.store, &c.id, &mut state, doc_jws, now())?;
    state.ca = inner.pending_cas.remove(&c.id).map(|p| p.ca);
    info!(collab = %c.id, online_ca = state.ca.is_some(), "collaboration created");
    inner.collabs.insert(c.id.clone(), state);
    Ok(created)
}

/// Checks `doc_jws` against a copy of the collaboration's ledger and the hub's rules and
/// quotas, persists it, then applies it. A document that changes nothing (an exact replay, the
/// same document signed again, an older version) is answered with the sequence number the hub
/// already has for it (200) and stores nothing.
fn accept(
    hub: &Hub,
    store: &Store,
    id: &str,
    state: &mut CollabState,
    doc_jws: String,
    now: SystemTime,
) -> HubResult<(StatusCode, Json<Submitted>)> {
    let env = Envelope::new(state.seq() + 1, doc_jws)
        .map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    // An exact replay of a stored document needs no second look.
    if let Some(&seq) = state.stored.get(&digest(&env.jws)) {
        return Ok((StatusCode::OK, Json(Submitted { seq })));
    }
    let mut next = state.ledger.clone();
    if next.ingest(&env, now)? == Ingested::Unchanged {
        // A run announcement the ledger does not hold was ended (or announced again later):
        // refused rather than answered as if stored.
        if env.kind == DocKind::RunAnnouncement
            && let Ok((_, doc)) = jws::peek(&env.jws)
            && !next.holds(&doc)
        {
            return Err(HubError::new(
                StatusCode::CONFLICT,
                format!(
                    "the run {} has ended, or was announced again since",
                    env.subject
                ),
            ));
        }
        let seq = state
            .subjects
            .get(&(env.kind, env.subject.clone()))
            .copied()
            .unwrap_or_else(|| state.seq());
        return Ok((StatusCode::OK, Json(Submitted { seq })));
    }
    let (header, doc) =
        jws::peek(&env.jws).map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let chain: Option<Vec<CertificateDer<'static>>> = header
        .x5c_der()
        .ok()
        .flatten()
        .map(|c| c.into_iter().map(CertificateDer::from).collect());
    check_hub_rules(&state.ledger, chain.as_deref(), &doc, now)?;
    let limits = &hub.shared.options.limits;
    let signer = signer_of(&env.jws);
    let size = env.jws.len();
    if signer != "owner"
        && let Some(why) = state
            .usage
            .get(&signer)
            .copied()
            .unwrap_or_default()
            .over(size, limits.member_quota)
    {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!("storage quota per member exceeded: {signer} has {why}"),
        ));
    }
    if let Some(why) = state.total.over(size, limits.collab_quota) {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!("storage quota per collaboration exceeded: {id} has {why}"),
        ));
    }
    let subject = (env.kind, env.subject.clone());
    let obsolete = state.obsolete(&next, env.kind == DocKind::Checkpoint, Some(&subject));
    if let Document::Checkpoint(cp) = &doc {
        check_folds(state, cp, &obsolete)?;
    }
    hub.charge(&format!("{id}/{signer}"))?;
    let collab_jws = (env.kind == DocKind::Collaboration).then_some(env.jws.as_str());
    store
        .append(id, &env, collab_jws, &obsolete)
        .map_err(HubError::internal)?;
    if let Some(jws) = collab_jws {
        state.collab_jws = jws.to_owned();
    }
    state.ledger = next;
    let seq = env.seq;
    debug!(
        collab = %id, seq, kind = %env.kind, subject = %env.subject, removed = obsolete.len(),
        "document accepted"
    );
    for old in obsolete {
        state.unindex(old);
    }
    state.index(env);
    state.latest.send_replace(seq);
    Ok((StatusCode::CREATED, Json(Submitted { seq })))
}

/// Refuses a checkpoint that leaves out something a revocation it folds in (and whose document
/// would be dropped) revokes: the revocation would be lost.
fn check_folds(state: &CollabState, cp: &Checkpoint, obsolete: &[u64]) -> HubResult<()> {
    let expired = |id: &str| {
        state
            .ledger
            .terms(id)
            .is_some_and(|t| t.not_after <= cp.issued_at)
    };
    for seq in obsolete {
        let Some(Ok((_, Document::Revocation(r)))) = state.docs.get(seq).map(|e| jws::peek(&e.jws))
        else {
            continue;
        };
        if let Some(what) = cp.omits(&r, expired) {
            return Err(HubError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "checkpoint {} folds in revocation {} but leaves out {what}, which it \
                     revokes: list it (or make the checkpoint from everything the hub holds)",
                    cp.number, r.number
                ),
            ));
        }
    }
    Ok(())
}

/// Verifies the connection's client certificate as a current, unrevoked member of `state`'s
/// collaboration and returns who it is.
fn member(peer: &Peer, state: &CollabState, now: SystemTime) -> HubResult<NodeRef> {
    let chain = peer.certs.as_ref().ok_or_else(|| {
        HubError::new(
            StatusCode::UNAUTHORIZED,
            "this request needs the node's collaboration certificate (mutual TLS)",
        )
    })?;
    let bundle = state
        .ledger
        .trust_bundle()
        .ok_or_else(|| HubError::new(StatusCode::NOT_FOUND, "collaboration has no document yet"))?;
    let info = bundle.verify(chain, now, Usage::Client).map_err(|e| {
        HubError::new(
            StatusCode::UNAUTHORIZED,
            format!("client certificate refused: {e}"),
        )
    })?;
    let node = NodeRef::from(&info.spiffe_id);
    if state.ledger.serial_revoked(&info.serial) || state.ledger.node_revoked(&node) {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!("{node} (certificate {}) is revoked", info.serial),
        ));
    }
    if state.collab()?.member(&node).is_none() {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!("{node} is not a member of {}", state.collab()?.id),
        ));
    }
    Ok(node)
}

async fn submit_doc(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    Extension(peer): Extension<Peer>,
    body: Result<Json<SubmitDoc>, JsonRejection>,
) -> HubResult<(StatusCode, Json<Submitted>)> {
    let Json(SubmitDoc { jws: doc_jws }) = body?;
    let (header, doc) =
        jws::peek(&doc_jws).map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if doc.collab() != id {
        return Err(HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "document belongs to collaboration {:?}, not {id:?}",
                doc.collab()
            ),
        ));
    }
    let now = now();
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    let state = inner.collabs.get_mut(&id).ok_or_else(|| not_found(&id))?;

    // Node documents must come from the node that signed them, over mutual TLS.
    if header.x5c.is_some() {
        let submitter = member(&peer, state, now)?;
        let signer = header
            .x5c_der()
            .ok()
            .flatten()
            .and_then(|c| c.into_iter().next())
            .and_then(|der| CertInfo::parse(&der).ok())
            .map(|info| NodeRef::from(&info.spiffe_id));
        if signer.as_ref() != Some(&submitter) {
            return Err(HubError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "document signed by {} but submitted by {submitter}",
                    signer
                        .map_or_else(|| "an unreadable certificate".to_owned(), |s| s.to_string())
                ),
            ));
        }
    }
    if let Document::JoinGrant(grant) = &doc {
        return store_grant(&hub, &inner.store, state, grant, doc_jws);
    }
    accept(&hub, &inner.store, &id, state, doc_jws, now)
}

/// What only the hub checks: links must not be born expired, approvals need a request, a node
/// signs with a certificate valid now (nodes reading history later check the signing time).
fn check_hub_rules(
    ledger: &Ledger,
    chain: Option<&[CertificateDer<'static>]>,
    doc: &Document,
    now: SystemTime,
) -> HubResult<()> {
    if let (Some(bundle), Some(chain)) = (ledger.trust_bundle(), chain) {
        bundle.verify(chain, now, Usage::Client).map_err(|e| {
            HubError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("signed with a certificate that is not valid now: {e}"),
            )
        })?;
    }
    let unix_now = jws::unix(now);
    // Revocation numbers run without a gap, and an owner document names only revocations the
    // hub holds: otherwise every node would take the hub for one that withholds revocations.
    let through = ledger.revocations_through();
    let names = match doc {
        Document::Revocation(r) => Some((r.number.saturating_sub(1), "revocation", r.number)),
        Document::Approval(a) => Some((a.revocations, "approval of", 0)),
        Document::Checkpoint(c) => Some((c.revocations, "checkpoint", c.number)),
        _ => None,
    };
    if let Some((named, what, number)) = names
        && named > through
    {
        let what = match number {
            0 => format!("{what} {}", doc.subject()),
            n => format!("{what} {n}"),
        };
        return Err(HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{what} names revocations up to {named}, but this hub holds them only up to \
                 {through}: fetch what the hub holds and sign it again"
            ),
        ));
    }
    match doc {
        Document::LinkRequest(r) if r.terms.not_after <= unix_now => Err(HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "link {} expired at {} (now {unix_now})",
                r.terms.id, r.terms.not_after
            ),
        )),
        Document::Approval(a) => {
            if ledger.status(&a.terms.id, now).is_none() {
                return Err(HubError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no request for link {}; a link is requested before it is approved",
                        a.terms.id
                    ),
                ));
            }
            if a.terms.not_after <= unix_now {
                return Err(HubError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("link {} has already expired", a.terms.id),
                ));
            }
            Ok(())
        }
        // A run announced longer ago than any policy's lifetime grants nothing: refused, so a
        // replay of one whose end was compacted away is not stored either.
        Document::RunAnnouncement(a)
            if a.started_at
                .saturating_add(fedmesh_documents::runs::MAX_LIFETIME_SECS)
                <= unix_now =>
        {
            Err(HubError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the run of task {} started at {}, longer ago than any link lifetime",
                    a.task.task_id, a.started_at
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Stores the owner's grant of a join token. The same signed grant again changes nothing (its
/// used mark stays); a grant whose secret was used or replaced is refused; a new grant for the
/// node voids the secret of the grant it replaces.
fn store_grant(
    hub: &Hub,
    store: &Store,
    state: &mut CollabState,
    grant: &JoinGrant,
    doc_jws: String,
) -> HubResult<(StatusCode, Json<Submitted>)> {
    let collab = state.collab()?;
    jws::verify_owner(&doc_jws, &collab.owner_key)
        .map_err(|e| HubError::new(StatusCode::FORBIDDEN, e.to_string()))?;
    let node = grant.node.to_string();
    let seq = state.seq();
    if state.grants.get(&node).is_some_and(|g| g.jws == doc_jws) {
        return Ok((StatusCode::OK, Json(Submitted { seq })));
    }
    if collab.member(&grant.node).is_none() {
        return Err(HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{} is not a member of {}; add it to the collaboration first",
                grant.node, collab.id
            ),
        ));
    }
    if let Some(spent) = state.spent.get(&grant.secret_sha256) {
        return Err(HubError::new(
            StatusCode::CONFLICT,
            match spent.used_at {
                Some(at) => format!(
                    "the join token secret for {} was already used (at {at}); issue a new token",
                    spent.node
                ),
                None => format!(
                    "the join token secret for {} was replaced by a newer grant; issue a new \
                     token",
                    spent.node
                ),
            },
        ));
    }
    let collab_id = collab.id.clone();
    let replaced = state
        .grants
        .get(&node)
        .filter(|old| old.used_at.is_none())
        .and_then(|old| jws::peek(&old.jws).ok())
        .and_then(|(_, d)| match d {
            Document::JoinGrant(g) => Some(g.secret_sha256),
            _ => None,
        })
        .filter(|digest| *digest != grant.secret_sha256);
    let voided = Spent {
        node: node.clone(),
        used_at: None,
    };
    let spent: Vec<(&str, &Spent)> = replaced.iter().map(|d| (d.as_str(), &voided)).collect();
    hub.charge(&format!("{collab_id}/owner"))?;
    let record = GrantRecord {
        jws: doc_jws,
        used_at: None,
    };
    store
        .put_grant(&collab_id, &node, &record, &spent, None)
        .map_err(HubError::internal)?;
    if let Some(digest) = replaced {
        state.spent.insert(digest, voided.clone());
    }
    state.grants.insert(node, record);
    Ok((StatusCode::CREATED, Json(Submitted { seq })))
}

async fn list_docs(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    query: Result<Query<DocsQuery>, axum::extract::rejection::QueryRejection>,
) -> HubResult<Json<DocsPage>> {
    let Query(DocsQuery { since, wait, limit }) =
        query.map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut latest = {
        let inner = hub.inner.lock().await;
        let state = inner.collabs.get(&id).ok_or_else(|| not_found(&id))?;
        authorize_reader(&peer, &headers, state, now())?;
        state.latest.subscribe()
    };
    if *latest.borrow_and_update() <= since && wait > 0 {
        let wait = Duration::from_secs(wait.min(MAX_WAIT_SECS));
        let _ = tokio::time::timeout(wait, latest.wait_for(|seq| *seq > since)).await;
    }
    let inner = hub.inner.lock().await;
    let state = inner.collabs.get(&id).ok_or_else(|| not_found(&id))?;
    // A cursor from the future (the hub lost data, or another hub) starts over from the top.
    let since = if since > state.seq() { 0 } else { since };
    let limit = match limit {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    };
    let docs: Vec<Envelope> = state
        .docs
        .range(since + 1..)
        .take(limit)
        .map(|(_, e)| e.clone())
        .collect();
    // Past the stored documents the cursor is the last number handed out: the documents in
    // between were compacted away.
    let cursor = match docs.last() {
        Some(last) => last.seq,
        None => state.seq(),
    };
    let checkpoint = state.checkpoint().filter(|cp| cp.seq > since).cloned();
    Ok(Json(DocsPage {
        collab_jws: state.collab_jws.clone(),
        checkpoint,
        docs,
        cursor,
    }))
}

/// A reader is a member node (mutual TLS), a rendezvous server the owner lists (mutual TLS with
/// the certificate whose pin the collaboration document holds: it follows the collaboration
/// and its revocations) or the owner (a short-lived owner-signed token).
fn authorize_reader(
    peer: &Peer,
    headers: &HeaderMap,
    state: &CollabState,
    now: SystemTime,
) -> HubResult<()> {
    if let Some(chain) = &peer.certs {
        if let (Some(leaf), Ok(collab)) = (chain.first(), state.collab()) {
            let pin = fedmesh_certs::fingerprint(leaf);
            if collab.rendezvous.iter().any(|r| r.pin_sha256 == pin) {
                return Ok(());
            }
        }
        return member(peer, state, now).map(|_| ());
    }
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            HubError::new(
                StatusCode::UNAUTHORIZED,
                "reading documents needs a member certificate or the certificate of a listed rendezvous \
                 server (mutual TLS), or an owner token",
            )
        })?;
    let collab = state.collab()?;
    let claims: OwnerToken = jws::verify_owner_claims(token, &collab.owner_key).map_err(|e| {
        HubError::new(
            StatusCode::UNAUTHORIZED,
            format!("owner token refused: {e}"),
        )
    })?;
    if claims.collab != collab.id || claims.aud != OWNER_TOKEN_AUDIENCE {
        return Err(HubError::new(
            StatusCode::UNAUTHORIZED,
            "owner token is for another audience",
        ));
    }
    if claims.exp <= jws::unix(now) {
        return Err(HubError::new(
            StatusCode::UNAUTHORIZED,
            "owner token has expired",
        ));
    }
    Ok(())
}

async fn enroll(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> HubResult<Json<Enrolled>> {
    let Json(req) = body?;
    let now = now();
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    let state = inner.collabs.get_mut(&id).ok_or_else(|| not_found(&id))?;
    let node_key = req.node.to_string();
    let unauthorized = |m: String| HubError::new(StatusCode::UNAUTHORIZED, m);
    let record = state
        .grants
        .get(&node_key)
        .ok_or_else(|| unauthorized(format!("no join token was issued for {}", req.node)))?
        .clone();
    let collab = state.collab()?.clone();
    let Ok(Document::JoinGrant(grant)) = jws::verify_owner(&record.jws, &collab.owner_key) else {
        return Err(unauthorized(format!(
            "the join grant for {} does not verify",
            req.node
        )));
    };
    if !constant_time_eq(&secret_digest(&req.secret), &grant.secret_sha256) {
        return Err(unauthorized(format!(
            "wrong join token secret for {}",
            req.node
        )));
    }
    if record.used_at.is_some() || state.spent.contains_key(&grant.secret_sha256) {
        return Err(HubError::new(
            StatusCode::CONFLICT,
            format!("the join token for {} was already used", req.node),
        ));
    }
    if grant.not_after <= jws::unix(now) {
        return Err(unauthorized(format!(
            "the join token for {} has expired",
            req.node
        )));
    }
    let bundle = state
        .ledger
        .trust_bundle()
        .cloned()
        .ok_or_else(|| not_found(&id))?;
    let (cert_pem, key) = match (&req.csr_pem, &req.cert_pem, &state.ca) {
        (Some(csr), None, Some(ca)) => {
            let issued = issue_for((&inner.policy, inner.cert_ttl), ca, csr, &req.node, now)?;
            let key = key_record(&issued, now)?;
            (issued.pem, Some(key))
        }
        (None, Some(cert), _) => {
            check_offline_cert(&bundle, cert, &req.node, now)?;
            (cert.clone(), None)
        }
        (Some(_), None, None) => {
            return Err(HubError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this collaboration's CA is offline: enroll with a certificate the owner signed (--cert)",
            ));
        }
        _ => {
            return Err(HubError::new(
                StatusCode::BAD_REQUEST,
                "send exactly one of csr_pem (online CA) and cert_pem (offline CA)",
            ));
        }
    };
    let used_at = jws::unix(now);
    let used = GrantRecord {
        jws: record.jws,
        used_at: Some(used_at),
    };
    let spent = Spent {
        node: node_key.clone(),
        used_at: Some(used_at),
    };
    inner
        .store
        .put_grant(
            &id,
            &node_key,
            &used,
            &[(&grant.secret_sha256, &spent)],
            key.as_ref(),
        )
        .map_err(HubError::internal)?;
    state.spent.insert(grant.secret_sha256, spent);
    if let Some(key) = key {
        state.keys.insert(node_key.clone(), key);
    }
    state.grants.insert(node_key, used);
    info!(collab = %id, node = %req.node, "node enrolled");
    Ok(Json(Enrolled {
        cert_pem,
        ca_pem: collab.ca_pem.clone(),
        collab_jws: state.collab_jws.clone(),
    }))
}

async fn renew(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    Extension(peer): Extension<Peer>,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> HubResult<Json<Enrolled>> {
    let Json(req) = body?;
    let now = now();
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    let state = inner.collabs.get_mut(&id).ok_or_else(|| not_found(&id))?;
    let node = member(&peer, state, now)?;
    let ca = online_ca(state)?;
    let issued = issue_for(
        (&inner.policy, inner.cert_ttl),
        ca,
        &req.csr_pem,
        &node,
        now,
    )?;
    // The key of the newest certificate is the one the node re-attests with after an outage.
    record_key(&inner.store, &id, state, &node, key_record(&issued, now)?)?;
    Ok(Json(Enrolled {
        cert_pem: issued.pem,
        ca_pem: state.collab()?.ca_pem.clone(),
        collab_jws: state.collab_jws.clone(),
    }))
}

/// Signs `csr` with the online CA, only for `node`'s own identity.
fn issue_for(
    (policy, ttl): (&IssuancePolicy, Duration),
    ca: &CollabCa,
    csr: &str,
    node: &NodeRef,
    now: SystemTime,
) -> HubResult<IssuedCert> {
    let issued = ca
        .sign_csr_pem(csr, policy, ttl, now)
        .map_err(|e| HubError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    if NodeRef::from(&issued.info.spiffe_id) != *node {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!(
                "CSR is for {}, but the token is for {node}",
                issued.info.spiffe_id
            ),
        ));
    }
    Ok(issued)
}

/// What the hub records of a certificate it issued: its key and serial.
fn key_record(issued: &IssuedCert, now: SystemTime) -> HubResult<KeyRecord> {
    let point = fedmesh_certs::verify::public_key_of(&issued.der).map_err(HubError::internal)?;
    Ok(KeyRecord {
        key: URL_SAFE_NO_PAD.encode(point),
        serial: issued.info.serial.clone(),
        issued_at: jws::unix(now),
    })
}

/// Stores `record` as `node`'s key and keeps it in `state`.
fn record_key(
    store: &Store,
    id: &str,
    state: &mut CollabState,
    node: &NodeRef,
    record: KeyRecord,
) -> HubResult<()> {
    let node = node.to_string();
    store
        .put_key(id, &node, &record)
        .map_err(HubError::internal)?;
    state.keys.insert(node, record);
    Ok(())
}

async fn reattest(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    body: Result<Json<SubmitDoc>, JsonRejection>,
) -> HubResult<Json<Enrolled>> {
    let Json(SubmitDoc { jws: proof }) = body?;
    let unauthorized = |m: String| HubError::new(StatusCode::UNAUTHORIZED, m);
    let forbidden = |m: String| HubError::new(StatusCode::FORBIDDEN, m);
    // Who it claims to be, to find the key to check the claim with.
    let claimed: ReattestClaims = proof
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or_else(|| {
            unauthorized("a re-attestation is a request signed with the node key".into())
        })?;
    let node = claimed.node;
    let now = now();
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    let state = inner.collabs.get_mut(&id).ok_or_else(|| not_found(&id))?;
    let record = state.keys.get(&node.to_string()).cloned().ok_or_else(|| {
        unauthorized(format!(
            "no enrolled key is recorded for {node} (an offline CA, or it never enrolled here): \
             the owner issues a new join token"
        ))
    })?;
    let point = URL_SAFE_NO_PAD
        .decode(&record.key)
        .map_err(HubError::internal)?;
    let claims: ReattestClaims = jws::verify_with_key(&proof, &point).map_err(|e| {
        unauthorized(format!(
            "re-attestation of {node} refused: not signed by its enrolled key ({e})"
        ))
    })?;
    let unix_now = jws::unix(now);
    if claims.collab != id || claims.aud != REATTEST_AUDIENCE || claims.node != node {
        return Err(unauthorized(format!(
            "the re-attestation is for {} in {:?} ({}), not {node} in {id:?}",
            claims.node, claims.collab, claims.aud
        )));
    }
    if claims.exp <= unix_now || claims.exp > unix_now + MAX_CA_REQUEST_TTL {
        return Err(unauthorized(format!(
            "the re-attestation expires at {}; it must be valid now ({unix_now}) and for at most \
             {MAX_CA_REQUEST_TTL}s",
            claims.exp
        )));
    }
    if state.collab()?.member(&node).is_none() {
        return Err(forbidden(format!("{node} is no longer a member of {id}")));
    }
    if state.ledger.node_revoked(&node) {
        return Err(forbidden(format!("{node} is revoked")));
    }
    if state.ledger.serial_revoked(&record.serial) {
        return Err(forbidden(format!(
            "the last certificate issued for {node}'s key (serial {}) is revoked, and so is \
             the key: the owner issues a new join token",
            record.serial
        )));
    }
    let ca = online_ca(state)?;
    let issued = issue_for(
        (&inner.policy, inner.cert_ttl),
        ca,
        &claims.csr_pem,
        &node,
        now,
    )?;
    let renewed = key_record(&issued, now)?;
    if renewed.key != record.key {
        return Err(forbidden(format!(
            "the CSR is for another key than the one {node} enrolled with"
        )));
    }
    hub.charge(&format!("{id}/{node}"))?;
    record_key(&inner.store, &id, state, &node, renewed)?;
    info!(collab = %id, %node, serial = %issued.info.serial, "node re-attested with its enrolled key");
    Ok(Json(Enrolled {
        cert_pem: issued.pem,
        ca_pem: state.collab()?.ca_pem.clone(),
        collab_jws: state.collab_jws.clone(),
    }))
}

fn check_offline_cert(
    bundle: &TrustBundle,
    cert_pem: &str,
    node: &NodeRef,
    now: SystemTime,
) -> HubResult<()> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            HubError::new(
                StatusCode::BAD_REQUEST,
                format!("certificate is not PEM: {e}"),
            )
        })?;
    let info = bundle
        .verify(&chain, now, Usage::Client)
        .map_err(|e| HubError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    if NodeRef::from(&info.spiffe_id) != *node {
        return Err(HubError::new(
            StatusCode::FORBIDDEN,
            format!(
                "certificate is for {}, but the token is for {node}",
                info.spiffe_id
            ),
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
