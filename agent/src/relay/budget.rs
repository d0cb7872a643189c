//! Per-link budgets: the bytes a link may carry over its life (both directions together) and the
//! streams it may carry at once, as the owner signed them into its terms. Each end of a link
//! enforces them on what it carries itself.
//!
//! ```text
//!  stream opens ──Budgets::open(grant)──▶ Ticket (counts the stream) | refused: budget_spent,
//!                                                                     stream_limit
//!  pump moves n bytes ──LinkBudget::spend(n)──▶ n, or what is left; 0 ⇒ the stream is reset
//!  spent reaches max ──▶ every open stream of the link is reset (RESET_BUDGET)
//!  every 2 s and at shutdown ──▶ <state>/budgets.json (0600): spent bytes by link
//! ```
//!
//! Spent bytes survive a restart: the file lists each budgeted link's spent bytes and expiry,
//! rewritten atomically when they changed (at most every [`FLUSH_EVERY`], and at shutdown). A
//! crash loses at most the bytes of the last interval. The file is bounded: only links with a
//! byte budget that have not expired, at most [`MAX_LINKS`] of them, at most [`MAX_FILE`] bytes
//! to read. A file that cannot be read is a start-up error, never a silent reset.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use fedmesh_certs::files;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{policy::Grant, proto::Refusal};
use crate::metrics::Metrics;

/// How often spent bytes are written to the state directory when they changed.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Most budgeted links remembered.
pub const MAX_LINKS: usize = 4096;
/// Largest budgets file read.
pub const MAX_FILE: u64 = 1024 * 1024;

/// One link's budget and what this node has used of it.
#[derive(Debug)]
pub struct LinkBudget {
    link: String,
    max_bytes: Option<u64>,
    max_streams: Option<u32>,
    not_after: u64,
    spent: AtomicU64,
    streams: AtomicU32,
    spent_gauge: Gauge,
    streams_gauge: Gauge,
    exhausted: watch::Sender<bool>,
}

impl LinkBudget {
    /// Takes up to `n` bytes from the budget; returns how many may pass (all of them for a link
    /// without a byte budget).
    pub fn spend(&self, n: u64) -> u64 {
        let Some(max) = self.max_bytes else {
            return n;
        };
        let mut current = self.spent.load(Ordering::Relaxed);
        loop {
            let allowed = n.min(max.saturating_sub(current));
            if allowed == 0 {
                return 0;
            }
            match self.spent.compare_exchange_weak(
                current,
                current + allowed,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let spent = current + allowed;
                    self.spent_gauge
                        .set(i64::try_from(spent).unwrap_or(i64::MAX));
                    if spent >= max {
                        self.exhausted.send_replace(true);
                    }
                    return allowed;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Completes once the byte budget is spent (never for a link without one).
    pub async fn exhausted(&self) {
        let mut rx = self.exhausted.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = rx.wait_for(|spent| *spent).await;
    }

    /// The link id.
    pub fn link(&self) -> &str {
        &self.link
    }

    fn is_spent(&self) -> bool {
        self.max_bytes
            .is_some_and(|max| self.spent.load(Ordering::Acquire) >= max)
    }
}

/// A stream counted against its link's concurrent-stream budget, until dropped.
#[derive(Debug)]
pub struct Ticket(Arc<LinkBudget>);

impl Ticket {
    /// The link's budget, for the pump.
    pub fn budget(&self) -> Arc<LinkBudget> {
        self.0.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let before = self.0.streams.fetch_sub(1, Ordering::AcqRel);
        self.0
            .streams_gauge
            .set(i64::from(before.saturating_sub(1)));
    }
}

/// What a link has used, for PeerLink status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes carried so far (both directions).
    pub bytes: u64,
    /// Streams open now.
    pub streams: u32,
}

/// What `budgets.json` holds per link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Spent {
    spent_bytes: u64,
    not_after: u64,
}

/// Every budgeted link's budget on this node.
pub struct Budgets {
    links: Mutex<HashMap<String, Arc<LinkBudget>>>,
    /// Spent bytes read at start for links not (yet) in force.
    restored: Mutex<BTreeMap<String, Spent>>,
    /// What the file holds now (written only when this changes).
    written: tokio::sync::Mutex<BTreeMap<String, Spent>>,
    store: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Budgets {
    /// Budgets kept in memory only (tests, tools).
    pub fn in_memory(metrics: Arc<Metrics>) -> Self {
        Self::with(None, BTreeMap::new(), metrics)
    }

    /// Budgets persisted at `path`, with the spent bytes it already holds.
    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<Self> {
        let restored = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            Ok(meta) if meta.len() > MAX_FILE => bail!(
                "{} is {} bytes, over the {MAX_FILE} a budgets file may hold; it is corrupted \
                 (delete it to forget what links with a byte budget have spent)",
                path.display(),
                meta.len()
            ),
            Ok(_) => {
                let text = files::read_to_string(path)?;
                let map: BTreeMap<String, Spent> =
                    serde_json::from_str(&text).with_context(|| {
                        format!(
                            "{} is corrupted (delete it to forget what links with a byte budget \
                         have spent)",
                            path.display()
                        )
                    })?;
                map
            }
        };
        Ok(Self::with(Some(path.to_owned()), restored, metrics))
    }

    fn with(
        store: Option<PathBuf>,
        restored: BTreeMap<String, Spent>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            links: Mutex::new(HashMap::new()),
            written: tokio::sync::Mutex::new(restored.clone()),
            restored: Mutex::new(restored),
            store,
            metrics,
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LinkBudget>>> {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tracks every budgeted link of `grants`, and forgets links expired before `now` (Unix).
    pub fn sync<'a>(&self, grants: impl IntoIterator<Item = &'a Grant>, now: u64) {
        for g in grants {
            self.entry(g);
        }
        let mut restored = self
            .restored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut links = self.links();
        links.retain(|id, b| {
            let keep = b.not_after > now;
            if !keep {
                self.metrics.forget_link_budget(id);
            }
            keep
        });
        restored.retain(|_, s| s.not_after > now);
    }

    /// The budget of `g`'s link, tracked from now on (`None`: the link has no budget, or
    /// [`MAX_LINKS`] are tracked already).
    fn entry(&self, g: &Grant) -> Option<Arc<LinkBudget>> {
        if g.max_bytes.is_none() && g.max_streams.is_none() {
            return None;
        }
        let mut restored = self
            .restored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut links = self.links();
        if let Some(b) = links.get(&g.link_id) {
            return Some(b.clone());
        }
        if links.len() >= MAX_LINKS {
            return None;
        }
        let spent = restored.remove(&g.link_id).map_or(0, |s| s.spent_bytes);
        let budget = Arc::new(self.budget(g, spent));
        links.insert(g.link_id.clone(), budget.clone());
        Some(budget)
    }

    fn budget(&self, g: &Grant, spent: u64) -> LinkBudget {
        let m = &self.metrics;
        if let Some(max) = g.max_bytes {
            m.link_budget(&g.link_id, "bytes_limit")
                .set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        if let Some(max) = g.max_streams {
            m.link_budget(&g.link_id, "streams_limit")
                .set(i64::from(max));
        }
        let spent_gauge = m.link_budget(&g.link_id, "bytes_spent");
        spent_gauge.set(i64::try_from(spent).unwrap_or(i64::MAX));
        let exhausted = g.max_bytes.is_some_and(|max| spent >= max);
        LinkBudget {
            link: g.link_id.clone(),
            max_bytes: g.max_bytes,
            max_streams: g.max_streams,
            not_after: g.not_after,
            spent: AtomicU64::new(spent),
            streams: AtomicU32::new(0),
            spent_gauge,
            streams_gauge: m.link_budget(&g.link_id, "streams_active"),
            exhausted: watch::Sender::new(exhausted),
        }
    }

    /// Counts a new stream of `grant`'s link, unless its budget refuses it. `None` for a link
    /// without a budget.
    pub fn open(&self, grant: &Grant) -> Result<Option<Ticket>, (Refusal, String)> {
        if grant.max_bytes.is_none() && grant.max_streams.is_none() {
            return Ok(None);
        }
        let budget = self.entry(grant).ok_or_else(|| {
            (
                Refusal::BudgetSpent,
                format!(
                    "link {}: this node already tracks {MAX_LINKS} budgeted links",
                    grant.link_id
                ),
            )
        })?;
        if budget.is_spent() {
            let max = budget.max_bytes.unwrap_or_default();
            return Err((
                Refusal::BudgetSpent,
                format!("link {} has spent its budget of {max} bytes", grant.link_id),
            ));
        }
        let max = budget.max_streams.unwrap_or(u32::MAX);
        let opened = budget
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match opened {
            Ok(before) => {
                budget.streams_gauge.set(i64::from(before + 1));
                Ok(Some(Ticket(budget)))
            }
            Err(_) => Err((
                Refusal::StreamLimit,
                format!(
                    "link {} already carries its {max} concurrent streams",
                    grant.link_id
                ),
            )),
        }
    }

    /// What `link` has used, when it has a budget this node tracks.
    pub fn usage(&self, link: &str) -> Option<Usage> {
        self.links().get(link).map(|b| Usage {
            bytes: b.spent.load(Ordering::Acquire),
            streams: b.streams.load(Ordering::Acquire),
        })
    }

    /// Writes spent bytes to the state directory if they changed since the last write.
    pub async fn flush(&self) -> Result<()> {
        let Some(path) = &self.store else {
            return Ok(());
        };
        let mut now: BTreeMap<String, Spent> = self
            .restored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        now.extend(
            self.links()
                .values()
                .filter(|b| b.max_bytes.is_some())
                .map(|b| {
                    (
                        b.link.clone(),
                        Spent {
                            spent_bytes: b.spent.load(Ordering::Acquire),
                            not_after: b.not_after,
                        },
                    )
                }),
        );
        let mut written = self.written.lock().await;
        if *written == now {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(&now)?;
        let path = path.clone();
        tokio::task::spawn_blocking(move || files::write_secret(&path, &text)).await??;
        *written = now;
        Ok(())
    }

    /// Flushes every [`FLUSH_EVERY`] until `stop`, then once more.
    pub async fn keep_flushed(&self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot save spent link budgets; will retry"
                );
            }
        }
        if let Err(error) = self.flush().await {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot save spent link budgets"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, max_bytes: Option<u64>, max_streams: Option<u32>) -> Grant {
        Grant {
            link_id: id.into(),
            label: None,
            not_after: 2_000_000_000,
            max_bytes,
            max_streams,
        }
    }

    fn budgets() -> Budgets {
        Budgets::in_memory(Arc::new(Metrics::default()))
    }

    #[test]
    fn bytes_are_spent_up_to_the_budget_and_no_further() {
        let b = budgets();
        let g = grant("l-1", Some(100), None);
        b.sync([&g], 0);
        let t = b.open(&g).unwrap().unwrap();
        let budget = t.budget();
        assert_eq!(budget.spend(60), 60);
        assert_eq!(budget.spend(60), 40, "only what is left passes");
        assert_eq!(budget.spend(1), 0);
        assert_eq!(
            b.usage("l-1"),
            Some(Usage {
                bytes: 100,
                streams: 1
            })
        );
        let (refusal, reason) = b.open(&g).unwrap_err();
        assert_eq!(refusal, Refusal::BudgetSpent);
        assert_eq!(reason, "link l-1 has spent its budget of 100 bytes");
    }

    #[test]
    fn concurrent_streams_are_counted_until_dropped() {
        let b = budgets();
        let g = grant("l-2", None, Some(2));
        b.sync([&g], 0);
        let one = b.open(&g).unwrap().unwrap();
        let _two = b.open(&g).unwrap().unwrap();
        let (refusal, reason) = b.open(&g).unwrap_err();
        assert_eq!(refusal, Refusal::StreamLimit);
        assert_eq!(reason, "link l-2 already carries its 2 concurrent streams");
        drop(one);
        assert!(b.open(&g).unwrap().is_some());
        assert!(
            b.open(&grant("l-free", None, None)).unwrap().is_none(),
            "links without a budget are not tracked"
        );
    }

    #[tokio::test]
    async fn spent_bytes_survive_a_restart_and_expired_links_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.json");
        let metrics = Arc::new(Metrics::default());
        let g = grant("l-3", Some(1000), None);
        let mut old = grant("l-old", Some(10), None);
        old.not_after = 50;
        {
            let b = Budgets::load(&path, metrics.clone()).unwrap();
            b.sync([&g, &old], 0);
            b.open(&g).unwrap().unwrap().budget().spend(700);
            b.flush().await.unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Budgets::load(&path, metrics.clone()).unwrap();
        b.sync([&g], 100);
        assert_eq!(b.usage("l-3").unwrap().bytes, 700);
        assert_eq!(b.open(&g).unwrap().unwrap().budget().spend(500), 300);
        b.flush().await.unwrap();
        let saved: BTreeMap<String, Spent> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["l-3"], "l-old expired");
        assert_eq!(saved["l-3"].spent_bytes, 1000);
    }

    #[test]
    fn a_corrupted_budgets_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.json");
        std::fs::write(&path, b"{\"l-1\": {\"spent_bytes\": \"many\"").unwrap();
        let err = Budgets::load(&path, Arc::new(Metrics::default())).unwrap_err();
        assert!(
            format!("{err:#}").contains("budgets.json is corrupted"),
            "{err:#}"
        );
    }
}
