//! The rendezvous's HTTP side: `/healthz` (the process answers), `/readyz` (a verified
//! collaboration is known, so nodes can be admitted) and `/metrics` (OpenMetrics).

use std::{future::Future, sync::Arc};

use anyhow::Result;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};

use super::{RendezvousConfig, RendezvousMetrics};

#[derive(Clone)]
struct Http {
    ready: watch::Receiver<Option<RendezvousConfig>>,
    metrics: Arc<RendezvousMetrics>,
}

/// Serves the three endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    ready: watch::Receiver<Option<RendezvousConfig>>,
    metrics: Arc<RendezvousMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Http { ready, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn readyz(State(http): State<Http>) -> impl IntoResponse {
    match http.ready.borrow().is_some() {
        true => (StatusCode::OK, "ready\n"),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no verified collaboration document yet\n",
        ),
    }
}

async fn metrics_text(State(http): State<Http>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        http.metrics.render(),
    )
}
