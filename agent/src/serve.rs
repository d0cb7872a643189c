//! Serving HTTP/1.1 with bounds, for the hub (TLS) and the node's admin server (plain). A slow
//! or flooding client holds at most a bounded share of the process, for a bounded time.
//!
//! ```text
//!  accept ─▶ caps: connections in all (fitted under the file limit) and per source IP
//!         ─▶ TLS handshake within handshake_timeout (hub)
//!         ─▶ http/1.1: request headers within header_timeout (an idle keep-alive
//!            connection too), the body within body_timeout and max_body_bytes,
//!            the connection closed gracefully after max_lifetime
//! ```
//!
//! On shutdown the listener closes first; every connection then finishes its request in flight
//! (a long poll is cut short) for at most [`DRAIN`], and the rest are closed, so nothing
//! outlives the server.
//!
//! A connection over a cap is accepted and closed at once, so the listen backlog never fills
//! and the process never runs out of file descriptors (`accept` failing with "Too many open
//! files" makes a server unreachable for everyone). Refusals are logged at WARN through a
//! [`Throttle`].

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::throttle::Throttle;

/// How long shutdown waits for open connections to finish their requests in flight.
pub const DRAIN: Duration = Duration::from_secs(2);

/// File descriptors kept for everything but client connections (store, listeners, logs).
pub const RESERVED_FDS: usize = 64;

/// How much one client may hold, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Connections open at once, in all (lowered to fit the process's file limit).
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a request's headers, and longest a keep-alive connection waits idle.
    pub header_timeout: Duration,
    /// Time to send a request's body.
    pub body_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Age after which a connection is closed once its request in flight is answered.
    pub max_lifetime: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_ip: 32,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 256 * 1024,
            max_lifetime: Duration::from_secs(600),
        }
    }
}

impl Bounds {
    /// `max_connections`, lowered so that it fits under the process's open-file limit.
    pub fn connection_cap(&self) -> usize {
        use nix::sys::resource::{Resource, getrlimit};
        match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, _)) => {
                let fit = usize::try_from(soft)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(RESERVED_FDS)
                    .max(1);
                self.max_connections.min(fit)
            }
            Err(_) => self.max_connections,
        }
    }
}

/// The connection a request came on (an extension on every request).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client certificate chain it presented over TLS, if any (not yet verified).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A counted connection; uncounted when dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Counts a connection from `ip`, or says which cap it is over.
fn admit(
    counts: &Arc<Mutex<Counts>>,
    ip: IpAddr,
    cap: usize,
    per_ip: usize,
) -> Result<Slot, &'static str> {
    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
    if c.total >= cap {
        return Err("connection cap reached");
    }
    let n = c.per_ip.entry(ip).or_default();
    if *n >= per_ip {
        return Err("per-IP connection cap reached");
    }
    *n += 1;
    c.total += 1;
    Ok(Slot {
        counts: counts.clone(),
        ip,
    })
}

/// Serves `app` on `listener` (over TLS with `tls`) within `bounds` until `shutdown` completes.
/// Each request carries the [`Peer`] it came from.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    bounds: Bounds,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let cap = bounds.connection_cap();
    debug!(
        cap,
        per_ip = bounds.max_connections_per_ip,
        "connection caps"
    );
    let throttle = Arc::new(Throttle::default());
    let app = app.layer(axum::middleware::from_fn_with_state(
        (bounds, throttle.clone()),
        bounded_body,
    ));
    let acceptor = tls.map(TlsAcceptor::from);
    let counts = Arc::new(Mutex::new(Counts::default()));
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Forget connections that have ended.
        while connections.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    if let Some(held_back) = throttle.admit("accept failed", "-", Instant::now()) {
                        warn!(%error, held_back, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match admit(&counts, remote.ip(), cap, bounds.max_connections_per_ip) {
            Ok(slot) => slot,
            Err(reason) => {
                if let Some(held_back) =
                    throttle.admit(reason, &remote.ip().to_string(), Instant::now())
                {
                    warn!(%remote, reason, cap, per_ip = bounds.max_connections_per_ip, held_back, "connection refused");
                }
                drop(tcp);
                continue;
            }
        };
        let (acceptor, app, throttle, stop) = (
            acceptor.clone(),
            app.clone(),
            throttle.clone(),
            stop.clone(),
        );
        connections.spawn(async move {
            let _slot = slot;
            let Some(acceptor) = acceptor else {
                let peer = Peer {
                    remote,
                    certs: None,
                };
                serve_connection(tcp, app, peer, &bounds, &stop).await;
                return;
            };
            let refused = |reason: &'static str, error: String| {
                if let Some(held_back) =
                    throttle.admit(reason, &remote.ip().to_string(), Instant::now())
                {
                    warn!(%remote, %error, held_back, "{reason}");
                }
            };
            let tls =
                match tokio::time::timeout(bounds.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => return refused("TLS handshake failed", error.to_string()),
                    Err(_) => {
                        return refused(
                            "TLS handshake timed out",
                            format!("not done within {:?}", bounds.handshake_timeout),
                        );
                    }
                };
            let certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            serve_connection(tls, app, Peer { remote, certs }, &bounds, &stop).await;
        });
    }
    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            open = connections.len(),
            "closing connections still busy at shutdown"
        );
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_connection<I>(
    io: I,
    app: Router,
    peer: Peer,
    bounds: &Bounds,
    stop: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote = peer.remote;
    let service = hyper_util::service::TowerToHyperService::new(app.layer(Extension(peer)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(bounds.header_timeout);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = tokio::time::sleep(bounds.max_lifetime) => {
            conn.as_mut().graceful_shutdown();
            // The request in flight (a long poll, at most a minute) gets its answer.
            match tokio::time::timeout(Duration::from_secs(120), conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(error) = result {
        debug!(%remote, %error, "connection ended with an error");
    }
}

/// Reads the whole request body within the body deadline and size bound before the handler
/// sees it.
async fn bounded_body(
    State((bounds, throttle)): State<(Bounds, Arc<Throttle>)>,
    Extension(peer): Extension<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let refuse = |status: StatusCode, error: String| {
        let reason = status.canonical_reason().unwrap_or("refused");
        if let Some(held_back) =
            throttle.admit(reason, &peer.remote.ip().to_string(), Instant::now())
        {
            warn!(remote = %peer.remote, %path, %error, held_back, "request refused");
        }
        (status, Json(serde_json::json!({ "error": error }))).into_response()
    };
    match tokio::time::timeout(
        bounds.body_timeout,
        axum::body::to_bytes(body, bounds.max_body_bytes),
    )
    .await
    {
        Err(_) => refuse(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?}",
                bounds.body_timeout
            ),
        ),
        Ok(Err(error)) => {
            let error = error.into_inner();
            if error.is::<http_body_util::LengthLimitError>() {
                refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is over {} bytes ({error})",
                        bounds.max_body_bytes
                    ),
                )
            } else {
                refuse(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {error}"),
                )
            }
        }
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}
