//! The agent's admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/peers`, and the
//! vantage6-compatible `/vpn/algorithm/addresses`.

use std::{future::Future, sync::Arc, time::SystemTime};

use anyhow::Result;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};

use fedmesh_documents::NodeRef;

use super::Snapshot;
use crate::metrics::Metrics;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub(super) node: NodeRef,
    pub(super) snapshot: watch::Receiver<Arc<Snapshot>>,
    pub(super) metrics: Arc<Metrics>,
}

/// The admin routes over a live snapshot.
pub fn router(
    node: NodeRef,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/peers", get(peers))
        .merge(super::v6::router())
        .with_state(AdminState {
            node,
            snapshot,
            metrics,
        })
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: NodeRef,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(node, snapshot, metrics))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
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
