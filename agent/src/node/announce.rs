//! Publishing this node's runs: a signed [`RunAnnouncement`] when the local run registry
//! ([`super::v6::Registry`]) gains a run of a task, a signed [`RunEnd`] when it loses the last
//! run of that task. Owner-signed link policies turn announced runs into task-lifetime links
//! (see [`fedmesh_documents::runs`]).
//!
//! ```text
//!  registry (announce endpoint / Kubernetes watch) ──changed──► plan(published, runs, now)
//!                                                                   │ announcements, ends
//!                                                                   ▼
//!                                          sign with the node key ──► hub (retried with backoff)
//! ```
//!
//! A run without an image digest is not announced (a policy names images by digest, so no
//! link could name it) and is logged once; the address API still serves it. At start the runs
//! this node announced before (in the ledger, not ended) and no longer has are ended.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use fedmesh_documents::{
    Document, Ledger, NodeRef, NodeSigner, Signer, TaskRef, jws,
    runs::{RunAnnouncement, RunEnd},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    NodeState,
    identity::Identity,
    v6::{LocalRun, Registry},
};

/// The first and the longest pause before publishing again after the hub refused or was away.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// What to publish so the hub holds exactly `runs`' tasks as this node's runs, given what was
/// `published`: announcements of tasks new or changed (image, parent, ports) and ends of tasks
/// gone. Runs without an image digest are left out (returned, to log). A run of one task at
/// several addresses is one announcement (the first by address that has a digest).
pub fn plan(
    collab: &str,
    node: &NodeRef,
    published: &BTreeMap<u64, RunAnnouncement>,
    runs: &[LocalRun],
    now: u64,
) -> (Vec<RunAnnouncement>, Vec<RunEnd>, Vec<u64>) {
    let mut want: BTreeMap<u64, &LocalRun> = BTreeMap::new();
    let mut no_digest = BTreeSet::new();
    for run in runs {
        if run.image.is_some() {
            want.entry(run.task_id).or_insert(run);
        } else {
            no_digest.insert(run.task_id);
        }
    }
    let mut announce = Vec::new();
    for (task, run) in &want {
        let mut ports = run.ports.clone();
        ports.sort();
        let a = RunAnnouncement {
            collab: collab.to_owned(),
            node: node.clone(),
            task: TaskRef {
                task_id: *task,
                parent_id: run.parent_id,
            },
            image: run.image.clone().unwrap_or_default(),
            ports,
            started_at: now,
        };
        let same = published
            .get(task)
            .is_some_and(|p| p.image == a.image && p.task == a.task && p.ports == a.ports);
        if !same {
            announce.push(a);
        }
    }
    let ends = published
        .keys()
        .filter(|t| !want.contains_key(t))
        .map(|t| RunEnd {
            collab: collab.to_owned(),
            node: node.clone(),
            task_id: *t,
            ended_at: now,
        })
        .collect();
    let skipped = no_digest
        .into_iter()
        .filter(|t| !want.contains_key(t))
        .collect();
    (announce, ends, skipped)
}

/// Publishes the registry's runs until `cancel`.
pub async fn run(
    state: Arc<NodeState>,
    registry: Registry,
    identity: watch::Receiver<Arc<Identity>>,
    mut ledger: watch::Receiver<Arc<Ledger>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (collab, node) = (state.config.collab.clone(), state.config.node.clone());
    // What this node announced before and did not end: from the ledger once it has the
    // collaboration (it is then caught up with the hub's first page).
    let mut published: BTreeMap<u64, RunAnnouncement> = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        l = ledger.wait_for(|l| l.collaboration().is_some()) => match l {
            Ok(l) => l
                .live_runs()
                .into_iter()
                .filter(|a| a.node == node)
                .map(|a| (a.task.task_id, a.clone()))
                .collect(),
            Err(_) => return Ok(()),
        },
    };
    let mut changed = registry.subscribe();
    let mut logged: BTreeSet<u64> = BTreeSet::new();
    // The last second a run end was signed for each task: a new run starts after it.
    let mut ended: BTreeMap<u64, u64> = BTreeMap::new();
    let mut retry = RETRY.0;
    loop {
        changed.borrow_and_update();
        let now = jws::unix(SystemTime::now());
        let (announce, ends, skipped) = plan(&collab, &node, &published, &registry.all(), now);
        for task in skipped {
            if logged.insert(task) {
                warn!(
                    task,
                    "a run without an image digest is not announced: no link policy can name it"
                );
            }
        }
        let mut failed = false;
        for end in ends {
            let task = end.task_id;
            match submit(&state, &identity, Document::RunEnd(end)).await {
                Ok(()) => {
                    info!(task, "run end published");
                    published.remove(&task);
                    ended.insert(task, now);
                }
                Err(e) => {
                    warn!(task, error = %format!("{e:#}"), "publishing a run end");
                    failed = true;
                }
            }
        }
        for mut a in announce {
            let task = a.task.task_id;
            if let Some(at) = ended.get(&task) {
                a.started_at = a.started_at.max(at + 1);
            }
            match submit(&state, &identity, Document::RunAnnouncement(a.clone())).await {
                Ok(()) => {
                    info!(task, image = %a.image, "run announcement published");
                    logged.remove(&task);
                    published.insert(task, a);
                }
                Err(e) => {
                    warn!(task, error = %format!("{e:#}"), "publishing a run announcement");
                    failed = true;
                }
            }
        }
        let pause = if failed {
            let p = retry;
            retry = (retry * 2).min(RETRY.1);
            Some(p)
        } else {
            retry = RETRY.0;
            None
        };
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = changed.changed() => if r.is_err() { return Ok(()) },
            () = async { tokio::time::sleep(pause.unwrap_or_default()).await }, if pause.is_some() => {}
        }
    }
}

/// Signs `doc` with the node's current key and submits it.
async fn submit(
    state: &NodeState,
    identity: &watch::Receiver<Arc<Identity>>,
    doc: Document,
) -> anyhow::Result<()> {
    let identity = identity.borrow().clone();
    let signer = NodeSigner::new(identity.tls.chain().to_vec(), identity.key()?);
    let signed = jws::sign(&doc, &Signer::Node(&signer))?;
    identity
        .hub_client(state)?
        .submit(&state.config.collab, signed)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn run(task: u64, ip: &str, image: Option<&str>) -> LocalRun {
        LocalRun {
            task_id: task,
            parent_id: Some(1),
            source: ip.parse().unwrap(),
            ports: vec!["11365:mpc".parse().unwrap()],
            host: None,
            image: image.map(str::to_owned),
        }
    }

    #[test]
    fn runs_are_announced_once_and_ended_when_gone() {
        let node: NodeRef = "a/n1".parse().unwrap();
        let mut published = BTreeMap::new();
        let runs = [
            run(7, "10.0.0.1", Some(IMG)),
            run(7, "10.0.0.2", Some(IMG)),
            run(8, "10.0.0.3", None),
        ];
        let (announce, ends, skipped) = plan("c", &node, &published, &runs, 100);
        assert_eq!(announce.len(), 1, "one announcement per task");
        assert_eq!((announce[0].task.task_id, announce[0].started_at), (7, 100));
        assert!(ends.is_empty());
        assert_eq!(skipped, vec![8], "no digest: not announced");
        published.insert(7, announce[0].clone());
        // Nothing changed: nothing to publish.
        let (announce, ends, _) = plan("c", &node, &published, &runs, 200);
        assert!(announce.is_empty() && ends.is_empty());
        // The task's runs are gone: its end.
        let (announce, ends, _) = plan("c", &node, &published, &runs[2..], 300);
        assert!(announce.is_empty());
        assert_eq!((ends[0].task_id, ends[0].ended_at), (7, 300));
    }
}
