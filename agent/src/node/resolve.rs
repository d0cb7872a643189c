//! Peers' advertised relay host names, resolved off the reconciler's path: when an
//! advertisement changes, again after a failure (with backoff), and now and then while it
//! resolves (an address behind a name may move). A name that does not resolve is reported
//! (a WARN once per failure, the `fedmesh_peers_unresolved` gauge, and the peer's
//! `unreachable` in the snapshot), never dropped silently. Addresses given as IP literals need
//! no lookup ([`super::plan`] reads them directly).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use fedmesh_documents::{Ledger, NodeRef};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::plan::Resolution;
use crate::metrics::Metrics;

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry after a failed lookup; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(60);
/// How often a name that resolves is looked up again.
const REFRESH: Duration = Duration::from_secs(300);

/// Resolved peer addresses, by peer.
pub(super) type Resolved = BTreeMap<NodeRef, Resolution>;

/// One peer's lookup state.
struct Entry {
    resolution: Resolution,
    next: Instant,
    retry: Duration,
}

/// Host names (not IP literals) advertised by the collaboration's other nodes.
fn advertised_names(ledger: &Ledger, local: &NodeRef) -> BTreeMap<NodeRef, String> {
    let Some(collab) = ledger.collaboration() else {
        return BTreeMap::new();
    };
    collab
        .members
        .iter()
        .map(fedmesh_documents::Member::node_ref)
        .filter(|m| m != local)
        .filter_map(|m| {
            let relay = ledger.advertisement(&m)?.relay.clone()?;
            relay.parse::<SocketAddr>().is_err().then_some((m, relay))
        })
        .collect()
}

/// The address `advertised` (`host:port`) names: an IPv4 one when there is one (the relay's
/// socket is IPv4 unless it was bound to an IPv6 address), else the first.
async fn lookup(advertised: &str) -> Result<SocketAddr, String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(advertised)).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| "no address".to_owned())
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
    }
}

/// Keeps `out` holding the resolution of every advertised relay host name until `cancel`.
pub(super) async fn run(
    local: NodeRef,
    mut ledger: watch::Receiver<Arc<Ledger>>,
    out: watch::Sender<Arc<Resolved>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut entries: BTreeMap<NodeRef, Entry> = BTreeMap::new();
    loop {
        let wanted = advertised_names(&ledger.borrow_and_update(), &local);
        entries.retain(|peer, _| wanted.contains_key(peer));
        let now = Instant::now();
        for (peer, advertised) in wanted {
            let due = entries
                .get(&peer)
                .is_none_or(|e| e.resolution.advertised != advertised || e.next <= now);
            if !due {
                continue;
            }
            let addr = lookup(&advertised).await;
            let previous = entries.remove(&peer);
            let was_ok = previous.as_ref().is_some_and(|e| {
                e.resolution.advertised == advertised && e.resolution.addr.is_ok()
            });
            let (next, retry) = match &addr {
                Ok(resolved) => {
                    if !was_ok {
                        info!(%peer, %advertised, %resolved, "peer relay address resolved");
                    }
                    (Instant::now() + REFRESH, FIRST_RETRY)
                }
                Err(error) => {
                    let retry = previous
                        .filter(|e| e.resolution.addr.is_err())
                        .map_or(FIRST_RETRY, |e| (e.retry * 2).min(MAX_RETRY));
                    if retry == FIRST_RETRY {
                        warn!(%peer, %advertised, %error, "peer relay address does not resolve; retrying");
                    }
                    (Instant::now() + retry, retry)
                }
            };
            entries.insert(
                peer,
                Entry {
                    resolution: Resolution { advertised, addr },
                    next,
                    retry,
                },
            );
        }
        let current: Resolved = entries
            .iter()
            .map(|(peer, e)| (peer.clone(), e.resolution.clone()))
            .collect();
        let failing = current.values().filter(|r| r.addr.is_err()).count();
        metrics
            .peers_unresolved
            .set(i64::try_from(failing).unwrap_or(i64::MAX));
        out.send_if_modified(|published| {
            let changed = **published != current;
            if changed {
                *published = Arc::new(current);
            }
            changed
        });
        let wake = entries.values().map(|e| e.next).min();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = ledger.changed() => if changed.is_err() { return },
            () = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lookups_answer_or_say_why() {
        assert_eq!(
            lookup("localhost:4433").await,
            Ok("127.0.0.1:4433".parse().unwrap()),
            "IPv4 first"
        );
        let error = lookup("localhost").await.unwrap_err();
        assert!(error.contains("invalid socket address"), "{error}");
    }

    /// Names that resolve are published; one that does not is published with why, counted in
    /// the gauge, and looked up again; literals are left to the plan.
    #[tokio::test]
    async fn advertised_names_are_resolved_and_failures_reported() {
        use fedmesh_documents::{Advertisement, Document, fixtures::Fixture, jws};

        let fx = Fixture::new("c", &["a/n1", "b/n1", "c/n1", "d/n1"]);
        let mut ledger = Ledger::new(&fx.pin());
        ledger.ingest_jws(&fx.collab_jws(), fx.now).unwrap();
        for (node, relay) in [
            ("b/n1", "localhost:4433"),
            ("c/n1", "localhost"),
            ("d/n1", "192.0.2.4:4433"),
        ] {
            let doc = Document::Advertisement(Advertisement {
                collab: "c".into(),
                node: node.parse().unwrap(),
                relay: Some(relay.into()),
                gateway: None,
                exposes: Vec::new(),
                issued_at: jws::unix(fx.now),
            });
            let env = fx.envelope(fx.node_sign(node, &doc));
            ledger.ingest(&env, fx.now).unwrap();
        }
        let (_ledger_tx, ledger_rx) = watch::channel(Arc::new(ledger));
        let (out_tx, mut out_rx) = watch::channel(Arc::new(Resolved::new()));
        let metrics = Arc::new(Metrics::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            "a/n1".parse().unwrap(),
            ledger_rx,
            out_tx,
            metrics.clone(),
            cancel.clone(),
        ));
        let resolved =
            tokio::time::timeout(Duration::from_secs(10), out_rx.wait_for(|r| r.len() == 2))
                .await
                .unwrap()
                .unwrap()
                .clone();
        let b = &resolved[&"b/n1".parse().unwrap()];
        assert_eq!(b.advertised, "localhost:4433");
        assert_eq!(b.addr, Ok("127.0.0.1:4433".parse().unwrap()));
        let c = &resolved[&"c/n1".parse().unwrap()];
        assert!(
            c.addr
                .as_ref()
                .is_err_and(|e| e.contains("invalid socket address")),
            "{c:?}"
        );
        assert!(
            !resolved.contains_key(&"d/n1".parse().unwrap()),
            "a literal needs no lookup"
        );
        assert!(
            metrics.render().contains("fedmesh_peers_unresolved 1"),
            "{}",
            metrics.render()
        );
        cancel.cancel();
        task.await.unwrap();
    }
}
