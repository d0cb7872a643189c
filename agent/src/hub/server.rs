//! The hub server: axum handlers over an in-memory view (one [`Ledger`] per collaboration) backed
//! by the redb [`Store`]. Every accepted document is checked the way a node would check it, plus
//! what only the hub can check (who submitted it, replayed join tokens, approvals of unknown
//! links), persisted, and only then acknowledged.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use fedmesh_certs::{CollabCa, IssuancePolicy, TrustBundle, verify::Usage};
use fedmesh_documents::{
    Collaboration, DocKind, Document, Envelope, JoinGrant, Ledger, NodeRef, RejectCode, Rejection,
    jws,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    api::{
        CaCreated, DocsPage, DocsQuery, EnrollRequest, Enrolled, ErrorBody, MAX_BODY_BYTES,
        MAX_PAGE, MAX_WAIT_SECS, OWNER_TOKEN_AUDIENCE, OwnerToken, RenewRequest, SubmitDoc,
        Submitted, secret_digest,
    },
    store::{CaRecord, GrantRecord, Store},
};

/// Default lifetime of certificates the online CA issues.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// An error answered to the client: a status and one line.
#[derive(Debug)]
pub(crate) struct HubError {
    status: StatusCode,
    message: String,
}

impl HubError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("hub storage failed: {e}"),
        )
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
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type HubResult<T> = Result<T, HubError>;

/// One collaboration as the hub holds it.
struct CollabState {
    ledger: Ledger,
    collab_jws: String,
    docs: Vec<Envelope>,
    ca: Option<CollabCa>,
    grants: BTreeMap<String, GrantRecord>,
    latest: watch::Sender<u64>,
}

impl CollabState {
    fn seq(&self) -> u64 {
        self.docs.last().map_or(0, |e| e.seq)
    }

    fn collab(&self) -> HubResult<&Collaboration> {
        self.ledger.collaboration().ok_or_else(|| {
            HubError::new(StatusCode::NOT_FOUND, "collaboration has no document yet")
        })
    }
}

struct Inner {
    store: Store,
    /// What the online CAs sign: lifetime cap and back-dating.
    policy: IssuancePolicy,
    /// Lifetime of the certificates they issue.
    cert_ttl: Duration,
    collabs: BTreeMap<String, CollabState>,
    /// Online CAs made before their collaboration document arrived.
    pending_cas: BTreeMap<String, CollabCa>,
}

/// The hub: shared state behind the handlers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
}

/// The client certificate chain of the connection a request came on, if any.
#[derive(Clone, Default)]
struct PeerCerts(Option<Arc<Vec<CertificateDer<'static>>>>);

impl Hub {
    /// Opens the store in `data_dir` and rebuilds every collaboration's view from it.
    pub fn open(data_dir: &std::path::Path) -> Result<Self> {
        Self::open_with(data_dir, DEFAULT_CERT_TTL)
    }

    /// Like [`Hub::open`], with online CAs issuing certificates valid for `cert_ttl` (at most
    /// 7 days). notBefore is set back a quarter of that, at most 5 minutes, for clock skew.
    pub fn open_with(data_dir: &std::path::Path, cert_ttl: Duration) -> Result<Self> {
        let policy = IssuancePolicy::with_max_ttl(cert_ttl)?
            .with_backdate((cert_ttl / 4).min(fedmesh_certs::policy::MAX_BACKDATE))?;
        let store = Store::open(data_dir)?;
        let snap = store.load()?;
        let now = SystemTime::now();
        let mut collabs = BTreeMap::new();
        let mut pending_cas = BTreeMap::new();
        for (id, record) in &snap.cas {
            let ca = CollabCa::from_pem(&record.cert_pem, &record.key_pem)?;
            pending_cas.insert(id.clone(), ca);
        }
        for (id, collab_jws) in &snap.collabs {
            let (_, doc) = jws::peek(collab_jws)?;
            let Document::Collaboration(c) = doc else {
                anyhow::bail!("stored collaboration {id} is not a collaboration document");
            };
            let mut ledger = Ledger::new(&jws::thumbprint(&c.owner_key));
            let docs = snap.docs.get(id).cloned().unwrap_or_default();
            for env in &docs {
                // Documents were verified on the way in; ones that no longer verify (for
                // instance signed by a now-revoked certificate) are kept but not applied.
                if let Err(r) = ledger.ingest(env, now) {
                    debug!(collab = %id, %r, "stored document not applied");
                }
            }
            let grants = snap
                .grants
                .iter()
                .filter(|((c, _), _)| c == id)
                .map(|((_, node), g)| (node.clone(), g.clone()))
                .collect();
            let seq = docs.last().map_or(0, |e| e.seq);
            collabs.insert(
                id.clone(),
                CollabState {
                    ledger,
                    collab_jws: collab_jws.clone(),
                    docs,
                    ca: pending_cas.remove(id),
                    grants,
                    latest: watch::channel(seq).0,
                },
            );
        }
        info!(collaborations = collabs.len(), "hub store loaded");
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                store,
                policy,
                cert_ttl,
                collabs,
                pending_cas,
            })),
        })
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
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    /// The routes as [`serve`] hands them one connection, whose client presented `peer` (its
    /// certificate chain) or nothing: for callers with no TLS connection (the fuzz targets).
    pub fn router_for_peer(&self, peer: Option<Vec<CertificateDer<'static>>>) -> Router {
        self.router()
            .layer(Extension(PeerCerts(peer.map(Arc::new))))
    }
}

/// Serves the hub on `listener` with TLS `config` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    hub: Hub,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    serve(listener, hub.router(), config, shutdown).await
}

/// Serves `app` over TLS on `listener`, handing each request the connection's client
/// certificates, until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(config);
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        debug!(%remote, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            let service = hyper_util::service::TowerToHyperService::new(
                app.layer(Extension(PeerCerts(peer))),
            );
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                debug!(%remote, %error, "connection ended with an error");
            }
        });
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn not_found(id: &str) -> HubError {
    HubError::new(
        StatusCode::NOT_FOUND,
        format!("unknown collaboration {id:?}"),
    )
}

async fn create_ca(State(hub): State<Hub>, Path(id): Path<String>) -> HubResult<Json<CaCreated>> {
    let mut inner = hub.inner.lock().await;
    if inner.collabs.contains_key(&id) {
        return Err(HubError::new(
            StatusCode::CONFLICT,
            format!("collaboration {id:?} already exists"),
        ));
    }
    if let Some(ca) = inner.pending_cas.get(&id) {
        return Ok(Json(CaCreated {
            ca_pem: ca.cert_pem().to_owned(),
        }));
    }
    let ca = CollabCa::generate(&id, now(), fedmesh_certs::ca::DEFAULT_CA_VALIDITY)
        .map_err(|e| HubError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    inner
        .store
        .put_ca(
            &id,
            &CaRecord {
                cert_pem: ca.cert_pem().to_owned(),
                key_pem: ca.key_pem(),
            },
        )
        .map_err(HubError::internal)?;
    let ca_pem = ca.cert_pem().to_owned();
    inner.pending_cas.insert(id.clone(), ca);
    info!(collab = %id, "online CA created");
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
    let mut inner = hub.inner.lock().await;
    let inner = &mut *inner;
    if let Some(state) = inner.collabs.get_mut(&c.id) {
        let seq = accept(&inner.store, &c.id, state, doc_jws, now())?;
        return Ok((StatusCode::OK, Json(Submitted { seq })));
    }
    if let Some(ca) = inner.pending_cas.get(&c.id)
        && ca.cert_pem().trim() != c.ca_pem.trim()
    {
        return Err(HubError::new(
            StatusCode::CONFLICT,
            "the collaboration's CA is not the online CA the hub made for it",
        ));
    }
    let mut state = CollabState {
        ledger: Ledger::new(&jws::thumbprint(&c.owner_key)),
        collab_jws: doc_jws.clone(),
        docs: Vec::new(),
        ca: None,
        grants: BTreeMap::new(),
        latest: watch::channel(0).0,
    };
    let seq = accept(&inner.store, &c.id, &mut state, doc_jws, now())?;
    state.ca = inner.pending_cas.remove(&c.id);
    inner.collabs.insert(c.id.clone(), state);
    info!(collab = %c.id, online_ca = inner.collabs[&c.id].ca.is_some(), "collaboration created");
    Ok((StatusCode::CREATED, Json(Submitted { seq })))
}

/// Checks `doc_jws` against a copy of the collaboration's ledger, persists it, then applies it.
fn accept(
    store: &Store,
    id: &str,
    state: &mut CollabState,
    doc_jws: String,
    now: SystemTime,
) -> HubResult<u64> {
    let env = Envelope::new(state.seq() + 1, doc_jws)
        .map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut next = state.ledger.clone();
    next.ingest(&env, now)?;
    let (_, doc) =
        jws::peek(&env.jws).map_err(|e| HubError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    check_hub_rules(&state.ledger, &doc, now)?;
    let collab_jws = (env.kind == DocKind::Collaboration).then_some(env.jws.as_str());
    store
        .append(id, &env, collab_jws)
        .map_err(HubError::internal)?;
    if let Some(jws) = collab_jws {
        state.collab_jws = jws.to_owned();
    }
    state.ledger = next;
    let seq = env.seq;
    debug!(collab = %id, seq, kind = %env.kind, subject = %env.subject, "document accepted");
    state.docs.push(env);
    state.latest.send_replace(seq);
    Ok(seq)
}

/// Verifies the connection's client certificate as a current, unrevoked member of `state`'s
/// collaboration and returns who it is.
fn member(peer: &PeerCerts, state: &CollabState, now: SystemTime) -> HubResult<NodeRef> {
    let chain = peer.0.as_ref().ok_or_else(|| {
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
    Extension(peer): Extension<PeerCerts>,
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
            .and_then(|der| fedmesh_certs::CertInfo::parse(&der).ok())
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
        return store_grant(&inner.store, state, grant, doc_jws)
            .map(|()| (StatusCode::CREATED, Json(Submitted { seq: state.seq() })));
    }
    let seq = accept(&inner.store, &id, state, doc_jws, now)?;
    Ok((StatusCode::CREATED, Json(Submitted { seq })))
}

/// What only the hub checks: links must not be born expired, approvals need a request.
fn check_hub_rules(ledger: &Ledger, doc: &Document, now: SystemTime) -> HubResult<()> {
    let unix_now = jws::unix(now);
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
        _ => Ok(()),
    }
}

fn store_grant(
    store: &Store,
    state: &mut CollabState,
    grant: &JoinGrant,
    doc_jws: String,
) -> HubResult<()> {
    let collab = state.collab()?;
    jws::verify_owner(&doc_jws, &collab.owner_key)
        .map_err(|e| HubError::new(StatusCode::FORBIDDEN, e.to_string()))?;
    if collab.member(&grant.node).is_none() {
        return Err(HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{} is not a member of {}; add it to the collaboration first",
                grant.node, collab.id
            ),
        ));
    }
    let record = GrantRecord {
        jws: doc_jws,
        used_at: None,
    };
    store
        .put_grant(&collab.id, &grant.node.to_string(), &record)
        .map_err(HubError::internal)?;
    state.grants.insert(grant.node.to_string(), record);
    Ok(())
}

async fn list_docs(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    Extension(peer): Extension<PeerCerts>,
    headers: HeaderMap,
    query: Result<Query<DocsQuery>, axum::extract::rejection::QueryRejection>,
) -> HubResult<Json<DocsPage>> {
    let Query(DocsQuery { since, wait }) =
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
    let start = state.docs.partition_point(|e| e.seq <= since);
    let docs: Vec<Envelope> = state.docs[start..].iter().take(MAX_PAGE).cloned().collect();
    let cursor = docs.last().map_or(since, |e| e.seq);
    Ok(Json(DocsPage {
        collab_jws: state.collab_jws.clone(),
        docs,
        cursor,
    }))
}

/// A reader is a member node (mutual TLS) or the owner (a short-lived owner-signed token).
fn authorize_reader(
    peer: &PeerCerts,
    headers: &HeaderMap,
    state: &CollabState,
    now: SystemTime,
) -> HubResult<()> {
    if peer.0.is_some() {
        return member(peer, state, now).map(|_| ());
    }
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            HubError::new(
                StatusCode::UNAUTHORIZED,
                "reading documents needs a member certificate (mutual TLS) or an owner token",
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
    if record.used_at.is_some() {
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
    let cert_pem = match (&req.csr_pem, &req.cert_pem, &state.ca) {
        (Some(csr), None, Some(ca)) => {
            issue_for((&inner.policy, inner.cert_ttl), ca, csr, &req.node, now)?
        }
        (None, Some(cert), _) => {
            check_offline_cert(&bundle, cert, &req.node, now)?;
            cert.clone()
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
    let used = GrantRecord {
        jws: record.jws,
        used_at: Some(jws::unix(now)),
    };
    inner
        .store
        .put_grant(&id, &node_key, &used)
        .map_err(HubError::internal)?;
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
    Extension(peer): Extension<PeerCerts>,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> HubResult<Json<Enrolled>> {
    let Json(req) = body?;
    let now = now();
    let inner = hub.inner.lock().await;
    let state = inner.collabs.get(&id).ok_or_else(|| not_found(&id))?;
    let node = member(&peer, state, now)?;
    let ca = state.ca.as_ref().ok_or_else(|| {
        HubError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this collaboration's CA is offline: the owner renews certificates",
        )
    })?;
    let cert_pem = issue_for(
        (&inner.policy, inner.cert_ttl),
        ca,
        &req.csr_pem,
        &node,
        now,
    )?;
    Ok(Json(Enrolled {
        cert_pem,
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
) -> HubResult<String> {
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
    Ok(issued.pem)
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
