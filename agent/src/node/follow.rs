//! Following the hub: long-poll for documents after the ledger's cursor and verify each one into
//! the ledger. A document that does not verify is reported and skipped; everything verified
//! before stays. The hub is untrusted: it can withhold or garble, but not forge.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use fedmesh_documents::{Ingested, Ledger};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Snapshot, identity::IdentityWatch};
use crate::{enroll::NodeState, hub::client::HubClient};

/// How long one long-poll waits at the hub.
const POLL_WAIT: Duration = Duration::from_secs(25);

/// Follows the hub: long-polls for documents and verifies each into the ledger. A document that
/// does not verify is reported and skipped; everything verified before stays. The ledger is
/// published only when a document changed it (a long-poll that returns empty wakes nobody).
pub(super) async fn follow(
    state: Arc<NodeState>,
    mut hub: HubClient,
    mut identity: IdentityWatch,
    ledger_tx: watch::Sender<Arc<Ledger>>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut ledger = (**ledger_tx.borrow()).clone();
    let mut backoff = Duration::from_millis(200);
    loop {
        // After a renewal, talk to the hub with the new certificate.
        if identity.has_changed().unwrap_or(false) {
            hub = identity.borrow_and_update().hub_client(&state)?;
        }
        let page = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            page = hub.docs(&state.config.collab, ledger.cursor(), POLL_WAIT) => page,
        };
        match page {
            Ok(page) => {
                backoff = Duration::from_millis(200);
                let mut rejected = Vec::new();
                let mut changed = false;
                for env in &page.docs {
                    match ledger.ingest(env, SystemTime::now()) {
                        Ok(Ingested::Changed) => changed = true,
                        Ok(Ingested::Unchanged) => {}
                        Err(rejection) => {
                            warn!(%rejection, "document refused; keeping the last verified state");
                            rejected.push(rejection);
                        }
                    }
                }
                if !rejected.is_empty() {
                    snapshot_tx.send_modify(|s| {
                        let s = Arc::make_mut(s);
                        s.rejections.extend(rejected);
                        let excess = s
                            .rejections
                            .len()
                            .saturating_sub(super::plan::MAX_REJECTIONS);
                        s.rejections.drain(..excess);
                    });
                }
                if changed {
                    ledger_tx.send_replace(Arc::new(ledger.clone()));
                }
            }
            Err(error) => {
                warn!(%error, retry_in = ?backoff, "cannot fetch documents from the hub");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
