//! The agent's admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/peers`, and the
//! vantage6-compatible `/vpn/algorithm/addresses`.
//!
//! Everything here is read-only and holds no secret: health, counters, and the peers' names
//! and local addresses (what DNS and `FEDMESH_PEERS` give algorithms anyway). It is served with
//! [`crate::serve`]'s bounds (header and body deadlines, connection caps), so a slow or
//! flooding client cannot keep the probes from being answered.

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
    crate::serve::serve(
        listener,
        router(node, snapshot, metrics),
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

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn peers(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.snapshot.borrow().peer_map())
}
