//! Following the hub: long-poll for documents after the ledger's cursor and verify each one into
//! the ledger. A document that does not verify is reported and skipped; everything verified
//! before stays. The hub is untrusted: it can withhold or garble, but not forge, and it cannot
//! keep the agent busy either.
//!
//! ```text
//!  page ──▶ collaboration, checkpoint (when below it) ──verify (once: known by hash)──▶ ledger
//!    │
//!    └─triage──▶ fresh envelopes (seq above everything seen) ──verify──▶ ledger
//!          │                       (a node's ledger skips what cannot concern it)
//!          └─▶ anomalies: cursor went back, old envelopes served again, more than asked for,
//!              nothing new at once (the long poll did not wait), only forgeries, an answer
//!              over the size bound ──▶ metric + throttled WARN + back off (1 s .. 60 s)
//!  ledger says revocations are withheld ──▶ metric + throttled WARN (no link is in force)
//! ```
//!
//! Old envelopes are skipped without being verified again, a page holds at most [`PAGE_LIMIT`]
//! envelopes and is read only up to what that many of the largest size take, so one answer
//! costs bounded CPU and memory, and a misbehaving hub is asked at most about once a minute.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use fedmesh_documents::{Envelope, Ingested, Ledger};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Snapshot, identity::IdentityWatch};
use crate::{
    enroll::NodeState,
    hub::{
        api::DocsPage,
        client::{ClientError, HubClient},
    },
    metrics::Metrics,
    throttle::Throttle,
};

/// How long one long-poll waits at the hub.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// Most envelopes asked for in one page.
pub(crate) const PAGE_LIMIT: usize = 100;
/// An answer with nothing new sooner than this did not wait for news: the hub is not long
/// polling.
const QUICK: Duration = Duration::from_secs(1);
/// The first and the longest pause after a misbehaving answer.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The first and the longest pause after the hub could not be reached (a restart is over soon).
const MIN_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Something a hub did that an honest hub does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Anomaly {
    /// The page's cursor is below the one asked from.
    CursorRegression,
    /// Envelopes at or below what was already seen, served again.
    Replayed,
    /// More envelopes than asked for, or an answer over the size bound.
    OversizedPage,
    /// Nothing new, answered at once instead of after the long poll.
    NotAdvancing,
    /// New envelopes, none of which verified.
    OnlyForgeries,
    /// Owner documents name revocations that were not served.
    WithheldRevocations,
}

impl Anomaly {
    /// The metric label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::CursorRegression => "cursor_regression",
            Self::Replayed => "replayed_documents",
            Self::OversizedPage => "oversized_page",
            Self::NotAdvancing => "not_advancing",
            Self::OnlyForgeries => "only_forgeries",
            Self::WithheldRevocations => "withheld_revocations",
        }
    }
}

/// The envelopes of `page` worth verifying (above `cursor`, in increasing order, at most
/// `limit`), and what was wrong with the page.
pub(crate) fn triage(
    page: &DocsPage,
    cursor: u64,
    limit: usize,
) -> (Vec<&Envelope>, BTreeSet<Anomaly>) {
    let mut anomalies = BTreeSet::new();
    if page.docs.len() > limit {
        anomalies.insert(Anomaly::OversizedPage);
    }
    if page.cursor < cursor {
        anomalies.insert(Anomaly::CursorRegression);
    }
    let mut seen = cursor;
    let mut fresh = Vec::new();
    for env in page.docs.iter().take(limit) {
        if env.seq <= seen {
            anomalies.insert(Anomaly::Replayed);
            continue;
        }
        seen = env.seq;
        fresh.push(env);
    }
    (fresh, anomalies)
}

/// Follows the hub: long-polls for documents and verifies each into the ledger. A document that
/// does not verify is reported and skipped; everything verified before stays. The ledger is
/// published only when a document changed it (a long-poll that returns empty wakes nobody).
pub(super) async fn follow(
    state: Arc<NodeState>,
    mut hub: HubClient,
    mut identity: IdentityWatch,
    ledger_tx: watch::Sender<Arc<Ledger>>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut ledger = (**ledger_tx.borrow()).clone();
    let mut backoff = MIN_BACKOFF;
    let mut retry = MIN_RETRY;
    let throttle = Throttle::default();
    let report = |anomaly: Anomaly, detail: &str| {
        metrics.hub_anomaly(anomaly.name());
        if let Some(held_back) = throttle.admit(anomaly.name(), "hub", Instant::now()) {
            warn!(
                anomaly = anomaly.name(),
                detail, held_back, "the hub misbehaves; backing off"
            );
        }
    };
    loop {
        // After a renewal, talk to the hub with the new certificate.
        if identity.has_changed().unwrap_or(false) {
            hub = identity.borrow_and_update().hub_client(&state)?;
        }
        let cursor = ledger.cursor();
        let asked = Instant::now();
        let page = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            page = hub.docs_limited(&state.config.collab, cursor, POLL_WAIT, PAGE_LIMIT) => page,
        };
        let pause = match page {
            Ok(page) => {
                let (fresh, mut anomalies) = triage(&page, cursor, PAGE_LIMIT);
                let now = SystemTime::now();
                let mut rejected = Vec::new();
                let mut changed = false;
                let mut refused = 0;
                // The collaboration and, below it, the checkpoint come before the documents;
                // both are known by hash after the first time.
                let mut outcomes = vec![ledger.ingest_jws(&page.collab_jws, now)];
                if let Some(cp) = page.checkpoint.as_ref().filter(|cp| cp.seq > cursor) {
                    outcomes.push(ledger.ingest(cp, now));
                }
                let first = outcomes.len();
                outcomes.extend(fresh.iter().map(|env| ledger.ingest(env, now)));
                for (i, outcome) in outcomes.into_iter().enumerate() {
                    match outcome {
                        Ok(Ingested::Changed) => changed = true,
                        Ok(_) => {}
                        Err(rejection) => {
                            warn!(%rejection, "document refused; keeping the last verified state");
                            rejected.push(rejection);
                            refused += usize::from(i >= first);
                        }
                    }
                }
                for rejection in ledger.take_late_rejections() {
                    warn!(%rejection, "document refused; keeping the last verified state");
                    rejected.push(rejection);
                }
                if page.docs.is_empty() && page.cursor > cursor {
                    // What lay between was compacted away.
                    ledger.advance_cursor(page.cursor);
                } else if fresh.is_empty() && asked.elapsed() < QUICK {
                    anomalies.insert(Anomaly::NotAdvancing);
                }
                if !fresh.is_empty() && refused == fresh.len() {
                    anomalies.insert(Anomaly::OnlyForgeries);
                }
                if let Some(withheld) = ledger.withheld() {
                    // Backing off would not bring them; the ledger keeps every link down.
                    report(Anomaly::WithheldRevocations, &withheld.to_string());
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
                    ledger_tx.send_replace(Arc::new(ledger.view()));
                }
                for &anomaly in &anomalies {
                    let detail = format!(
                        "asked after {cursor}, got {} envelopes ({} new) and cursor {}",
                        page.docs.len(),
                        fresh.len(),
                        page.cursor
                    );
                    report(anomaly, &detail);
                }
                retry = MIN_RETRY;
                (!anomalies.is_empty()).then(|| next(&mut backoff, MAX_BACKOFF))
            }
            Err(ClientError::TooLarge { max }) => {
                report(
                    Anomaly::OversizedPage,
                    &format!("an answer over {max} bytes"),
                );
                Some(next(&mut backoff, MAX_BACKOFF))
            }
            Err(error) => {
                if let Some(held_back) = throttle.admit("unreachable", "hub", Instant::now()) {
                    warn!(%error, retry_in = ?retry, held_back, "cannot fetch documents from the hub");
                }
                Some(next(&mut retry, MAX_RETRY))
            }
        };
        match pause {
            Some(pause) => tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            },
            None => backoff = MIN_BACKOFF,
        }
    }
}

/// The pause to take now; the next one is twice as long, up to `max`.
fn next(pause: &mut Duration, max: Duration) -> Duration {
    let now = *pause;
    *pause = (now * 2).min(max);
    now
}

#[cfg(test)]
mod tests {
    use fedmesh_documents::DocKind;

    use super::*;

    fn page(seqs: &[u64], cursor: u64) -> DocsPage {
        DocsPage {
            collab_jws: String::new(),
            checkpoint: None,
            docs: seqs
                .iter()
                .map(|&seq| Envelope {
                    seq,
                    kind: DocKind::Advertisement,
                    subject: String::new(),
                    jws: String::new(),
                })
                .collect(),
            cursor,
        }
    }

    fn seqs(fresh: &[&Envelope]) -> Vec<u64> {
        fresh.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn an_honest_page_has_no_anomaly() {
        let p = page(&[6, 7, 8], 8);
        let (fresh, anomalies) = triage(&p, 5, 10);
        assert_eq!(seqs(&fresh), [6, 7, 8]);
        assert!(anomalies.is_empty());
    }

    #[test]
    fn old_envelopes_are_skipped_and_reported() {
        let p = page(&[1, 2, 6, 6, 3, 7], 7);
        let (fresh, anomalies) = triage(&p, 5, 10);
        assert_eq!(
            seqs(&fresh),
            [6, 7],
            "nothing at or below the cursor is verified again"
        );
        assert_eq!(anomalies, BTreeSet::from([Anomaly::Replayed]));
    }

    #[test]
    fn a_cursor_going_back_and_an_oversized_page_are_reported() {
        let p = page(&[], 2);
        assert_eq!(
            triage(&p, 5, 10).1,
            BTreeSet::from([Anomaly::CursorRegression])
        );
        let p = page(&(6..30).collect::<Vec<_>>(), 29);
        let (fresh, anomalies) = triage(&p, 5, 10);
        assert_eq!(fresh.len(), 10, "at most the limit is verified");
        assert_eq!(anomalies, BTreeSet::from([Anomaly::OversizedPage]));
    }
}
