//! A rendezvous following the hub: long-polls the collaboration's documents and keeps what the
//! rendezvous admits in step with the owner-signed collaboration document and revocations, so a
//! revocation published to the hub closes the node's rendezvous connection within moments.
//!
//! ```text
//!  hub ──GET /v1/collabs/{id}/docs (mutual TLS: the rendezvous certificate the owner lists)──▶
//!    page ──▶ collaboration, checkpoint, revocations ──verify against the owner pin──▶ ledger
//!                                                       (other documents: skipped unread)
//!    ledger changed ──▶ Rendezvous::update (members, revoked nodes and serials, the CA)
//! ```
//!
//! The hub is not trusted: it can withhold documents but not forge them (everything is verified
//! against `--owner-pin`, exactly as a documents file is), revocations only add up, and an
//! answer is read up to a bound. When the hub is unreachable or misbehaves the rendezvous keeps
//! the last verified state and asks again later; before the first verified collaboration it
//! admits nobody.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use fedmesh_documents::{DocKind, Ingested, Ledger};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Rendezvous, config_of};
use crate::{
    hub::{
        api::DocsPage,
        client::{ClientError, HubClient},
    },
    throttle::Throttle,
};

/// How long one long-poll waits at the hub.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// Most envelopes asked for in one page (the answer is read up to what that many take).
const PAGE_LIMIT: usize = 100;
/// The first and the longest pause after the hub could not be reached or misbehaved.
const MIN_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// An answer with nothing new sooner than this did not wait for news.
const QUICK: Duration = Duration::from_secs(1);

/// What one page did to the ledger.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// A verified document changed what the rendezvous admits.
    pub changed: bool,
    /// Envelopes above the cursor in the page (verified or skipped).
    pub fresh: usize,
    /// Documents refused (not signed by the owner, malformed, stale), with why.
    pub refused: Vec<String>,
}

/// Folds one page of the hub into `ledger` (pure): the collaboration, the checkpoint when it
/// is newer, and the collaboration documents, checkpoints and revocations above the cursor, in
/// order, at most `limit`; other documents (advertisements, links) only move the cursor. What
/// does not verify is refused and changes nothing.
pub fn apply_page(ledger: &mut Ledger, page: &DocsPage, limit: usize, now: SystemTime) -> Applied {
    let mut applied = Applied::default();
    let cursor = ledger.cursor();
    let mut outcomes = vec![ledger.ingest_jws(&page.collab_jws, now)];
    if let Some(cp) = page.checkpoint.as_ref().filter(|cp| cp.seq > cursor) {
        outcomes.push(ledger.ingest(cp, now));
    }
    let mut seen = cursor;
    for env in page.docs.iter().take(limit) {
        if env.seq <= seen {
            continue;
        }
        seen = env.seq;
        applied.fresh += 1;
        match env.kind {
            DocKind::Collaboration | DocKind::Revocation | DocKind::Checkpoint => {
                outcomes.push(ledger.ingest(env, now));
            }
            _ => ledger.advance_cursor(env.seq),
        }
    }
    if page.docs.is_empty() && page.cursor > cursor {
        // What lay between was compacted away.
        ledger.advance_cursor(page.cursor);
    }
    for outcome in outcomes {
        match outcome {
            Ok(Ingested::Changed) => applied.changed = true,
            Ok(_) => {}
            Err(rejection) => applied.refused.push(rejection.to_string()),
        }
    }
    applied
}

/// Follows `collab` at `hub` until `stop`, handing every verified change to `server`.
pub async fn follow_hub(
    server: Arc<Rendezvous>,
    hub: HubClient,
    collab: String,
    owner_pin: String,
    stop: CancellationToken,
) {
    let mut ledger = Ledger::new(&owner_pin);
    let mut retry = MIN_RETRY;
    let throttle = Throttle::default();
    loop {
        let asked = Instant::now();
        let page = tokio::select! {
            () = stop.cancelled() => return,
            page = hub.docs_limited(&collab, ledger.cursor(), POLL_WAIT, PAGE_LIMIT) => page,
        };
        let pause = match page {
            Ok(page) => {
                let applied = apply_page(&mut ledger, &page, PAGE_LIMIT, SystemTime::now());
                for problem in &applied.refused {
                    if let Some(held_back) = throttle.admit("refused", problem, Instant::now()) {
                        warn!(%problem, held_back, "hub document refused; keeping the last verified state");
                    }
                }
                if applied.changed {
                    match config_of(&ledger) {
                        Some(config) => match server.update(config) {
                            Ok(()) => info!(
                                %collab,
                                revocation = ledger.revocation().number,
                                "collaboration documents from the hub applied"
                            ),
                            Err(error) => {
                                warn!(error = %format!("{error:#}"), "cannot apply the documents");
                            }
                        },
                        None => warn!(%collab, "the hub holds no verified collaboration document"),
                    }
                }
                match applied.fresh == 0 && asked.elapsed() < QUICK {
                    // Not long-polling (or nothing but forgeries): ask again later.
                    true => Some(next(&mut retry)),
                    false => {
                        retry = MIN_RETRY;
                        None
                    }
                }
            }
            Err(error) => {
                let what = match &error {
                    ClientError::TooLarge { .. } => "oversized",
                    _ => "unreachable",
                };
                if let Some(held_back) = throttle.admit(what, "hub", Instant::now()) {
                    warn!(%error, retry_in = ?retry, held_back, "cannot fetch documents from the hub; keeping the last verified state");
                }
                Some(next(&mut retry))
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// The pause to take now; the next one is twice as long, up to the longest.
fn next(pause: &mut Duration) -> Duration {
    let now = *pause;
    *pause = (now * 2).min(MAX_RETRY);
    now
}

#[cfg(test)]
mod tests {
    use fedmesh_documents::{Document, Envelope, Revocation, fixtures::Fixture, jws};

    use super::*;

    fn env(seq: u64, jws: String) -> Envelope {
        Envelope::new(seq, jws).unwrap()
    }

    #[test]
    fn owner_documents_apply_and_forgeries_change_nothing() {
        let now = SystemTime::now();
        let fx = Fixture::at("c", &["a/n1", "b/n1"], now);
        let mut ledger = Ledger::new(&fx.pin());
        let revoke = |number: u64, node: &str| {
            fx.owner_sign(&Document::Revocation(Revocation {
                collab: "c".into(),
                number,
                nodes: vec![node.parse().unwrap()],
                issued_at: jws::unix(now),
                ..Revocation::default()
            }))
        };
        let page = DocsPage {
            collab_jws: fx.collab_jws(),
            checkpoint: None,
            docs: vec![env(1, revoke(1, "b/n1"))],
            cursor: 1,
        };
        let applied = apply_page(&mut ledger, &page, 100, now);
        assert!(applied.changed && applied.refused.is_empty(), "{applied:?}");
        assert!(ledger.node_revoked(&"b/n1".parse().unwrap()));

        // Another owner's collaboration and revocation (a hostile hub): refused, and b stays
        // revoked.
        let other = Fixture::at("c", &["a/n1", "b/n1", "z/n1"], now);
        let forged = other.owner_sign(&Document::Revocation(Revocation {
            collab: "c".into(),
            number: 2,
            nodes: vec![],
            issued_at: jws::unix(now),
            ..Revocation::default()
        }));
        let page = DocsPage {
            collab_jws: other.collab_jws(),
            checkpoint: None,
            docs: vec![env(2, forged)],
            cursor: 2,
        };
        let applied = apply_page(&mut ledger, &page, 100, now);
        assert!(!applied.changed);
        assert_eq!(applied.refused.len(), 2, "{applied:?}");
        assert!(ledger.node_revoked(&"b/n1".parse().unwrap()));
        assert!(
            ledger
                .collaboration()
                .unwrap()
                .members
                .iter()
                .all(|m| m.org != "z"),
            "the forged collaboration did not widen the members"
        );
        // Replayed envelopes are not verified again; more than the limit is cut off.
        let page = DocsPage {
            collab_jws: fx.collab_jws(),
            checkpoint: None,
            docs: vec![env(1, revoke(1, "b/n1")), env(3, revoke(2, "a/n1"))],
            cursor: 3,
        };
        let applied = apply_page(&mut ledger, &page, 1, now);
        assert_eq!(applied.fresh, 0, "only the replayed one fits the limit");
        let applied = apply_page(&mut ledger, &page, 100, now);
        assert_eq!((applied.fresh, applied.changed), (1, true));
        assert!(ledger.node_revoked(&"a/n1".parse().unwrap()));
    }
}
