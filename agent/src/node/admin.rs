//! The agent's admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/peers` (the vantage6
//! address API has a listener of its own, [`super::v6`]).
//!
//! Everything here is read-only and holds no secret: health, counters, and the peers' names
//! and local addresses (what DNS and `FEDMESH_PEERS` give algorithms anyway). It is served with
//! [`crate::serve`]'s bounds (header and body deadlines, connection caps), so a slow or
//! flooding client cannot keep the probes from being answered.

use std::{future::Future, sync::Arc, time::SystemTime};

use anyhow::Result;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};

use super::Snapshot;
use crate::metrics::Metrics;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub(super) snapshot: watch::Receiver<Arc<Snapshot>>,
    pub(super) metrics: Arc<Metrics>,
}

/// The admin routes over a live snapshot.
pub fn router(snapshot: watch::Receiver<Arc<Snapshot>>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/peers", get(peers))
        .with_state(AdminState { snapshot, metrics })
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    crate::serve::serve(
        listener,
        router(snapshot, metrics),
        None,
        crate::serve::Bounds::default(),
        shutdown,
    )
    .await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let snap = s.snapshot.borrow().clone();
    if !snap.synced {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not yet synced with the hub".to_owned(),
        );
    }
    match snap.cert_not_after {
        Some(t) if t > SystemTime::now() => (StatusCode::OK, "ready".to_owned()),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "node certificate expired or missing".to_owned(),
        ),
    }
}

/// The content type of `/metrics`: the body is OpenMetrics text (it ends in `# EOF`).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    // A countdown is current when it is read, not when the agent last looked at its certificate.
    if let Some(not_after) = s.snapshot.borrow().cert_not_after {
        let left = match not_after.duration_since(SystemTime::now()) {
            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
        };
        s.metrics.cert_expiry_seconds.set(left);
    }
    (
        [(axum::http::header::CONTENT_TYPE, OPENMETRICS)],
        s.metrics.render(),
    )
}

async fn peers(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.snapshot.borrow().peer_map())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// `/metrics` says what it serves: OpenMetrics text, ending in `# EOF`, with the
    /// certificate countdown current at the time of the scrape.
    #[tokio::test]
    async fn metrics_are_openmetrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let snapshot = Snapshot {
            cert_not_after: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..Snapshot::default()
        };
        let (_tx, rx) = watch::channel(Arc::new(snapshot));
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            rx,
            Arc::new(Metrics::default()),
            stop.clone().cancelled_owned(),
        ));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {OPENMETRICS}")),
            "{head}"
        );
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let left: i64 = body
            .lines()
            .find_map(|l| l.strip_prefix("fedmesh_certificate_expiry_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((3590..=3600).contains(&left), "{left}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
