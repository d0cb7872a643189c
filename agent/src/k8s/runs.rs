//! Where vantage6 5 runs come from: a watch of the Pods and Jobs in the task namespace that
//! keeps the node's run [`Registry`] equal to the running algorithm pods.
//!
//! vantage6 5 (`vantage6-node` 5.0.3, `node/k8s/container_manager.py`) runs each algorithm run
//! as a Job in the task namespace (default `vantage6-tasks`). The Job carries the annotations
//! `task_id` and `task_parent_id` (empty for a top-level task); its pod template only the labels
//! `app` and `role`. A pod is a run of this node when
//!
//! - it is `Running`, has a pod IP and is not being deleted,
//! - it is not on the host network (its IP would be the host's, shared by every host process),
//! - its controlling owner is a Job in the same namespace whose `task_id` annotation is a
//!   number (and `task_parent_id`, when not empty, too).
//!
//! The run's ports are the pod's container ports, each labelled with the port's `name` when
//! that is a valid label. vantage6's own labels (the image's `LABEL p<port>=<label>`) are not
//! visible through the API server, and vantage6 5 itself declares no container ports, so a run
//! of an unmodified vantage6 5 node is a verified *caller* with no ports of its own: its peers'
//! ports still come from the links in force.
//!
//! Everything is read with `get`/`list`/`watch` on `pods` and `jobs` in the task namespace
//! (the chart's Role grants exactly that). The pure [`run_of`] and [`runs_of`] map the objects;
//! [`watch`] is the thin shell around kube-rs's watchers.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use futures::{StreamExt, stream};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use fedmesh_documents::PortSpec;

use crate::node::v6::{LocalRun, MAX_RUN_PORTS, Registry};

/// The vantage6 5 node's default task namespace.
pub const DEFAULT_TASK_NAMESPACE: &str = "vantage6-tasks";
/// The Job annotation holding the run's task id.
pub const TASK_ID: &str = "task_id";
/// The Job annotation holding the parent task id (empty for a top-level task).
pub const TASK_PARENT_ID: &str = "task_parent_id";

/// The run `pod` is, given its owning `job` (looked up by the pod's controlling owner), or
/// `None` when the pod is no running vantage6 algorithm pod (see the module doc).
pub fn run_of(pod: &Pod, job: Option<&Job>) -> Option<LocalRun> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let source: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let job = job?;
    let owner = owner_job(pod)?;
    if job.metadata.name.as_deref() != Some(owner.0)
        || job.metadata.uid.as_deref().is_some_and(|u| u != owner.1)
        || job.metadata.namespace != pod.metadata.namespace
    {
        return None;
    }
    let annotations = job.metadata.annotations.as_ref()?;
    let task_id = annotations.get(TASK_ID)?.trim().parse().ok()?;
    let parent_id = match annotations.get(TASK_PARENT_ID).map(|p| p.trim()) {
        None | Some("") => None,
        Some(p) => Some(p.parse().ok()?),
    };
    let mut ports: Vec<PortSpec> = Vec::new();
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(port) = u16::try_from(p.container_port) else {
                continue;
            };
            let labelled = p
                .name
                .as_deref()
                .and_then(|n| format!("{port}:{n}").parse::<PortSpec>().ok());
            let Some(spec) = labelled.or_else(|| port.to_string().parse().ok()) else {
                continue;
            };
            if !ports.iter().any(|q| q.port == spec.port) {
                ports.push(spec);
            }
        }
    }
    ports.truncate(MAX_RUN_PORTS);
    let image = spec
        .containers
        .first()
        .and_then(|c| image_digest(status, &c.name));
    Some(LocalRun {
        task_id,
        parent_id,
        source,
        ports,
        host: None,
        image,
    })
}

/// The manifest digest of the image container `name` runs, from its status's `imageID`
/// (`<repository>@sha256:<hex>`, as the runtime resolved what it pulled). A bare `sha256:...`
/// is the image's config digest on some runtimes, not the digest a policy names, so only the
/// `@sha256:` form counts.
fn image_digest(status: &k8s_openapi::api::core::v1::PodStatus, name: &str) -> Option<String> {
    let id = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == name)?
        .image_id
        .as_str();
    let (_, digest) = id.rsplit_once('@')?;
    fedmesh_documents::runs::validate_digest(digest)
        .is_ok()
        .then(|| digest.to_owned())
}

/// The pod's controlling owner when it is a Job: (name, uid).
fn owner_job(pod: &Pod) -> Option<(&str, &str)> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "Job" && o.api_version == "batch/v1")
        .map(|o| (o.name.as_str(), o.uid.as_str()))
}

/// Every run among `pods`, by source IP. Two running pods reporting one IP (which a pod
/// network never does) are both left out: neither can be told from the other.
pub fn runs_of<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    jobs: impl IntoIterator<Item = &'a Job>,
) -> BTreeMap<IpAddr, LocalRun> {
    let jobs: BTreeMap<(Option<&str>, &str), &Job> = jobs
        .into_iter()
        .filter_map(|j| {
            Some((
                (j.metadata.namespace.as_deref(), j.metadata.name.as_deref()?),
                j,
            ))
        })
        .collect();
    let mut out = BTreeMap::new();
    let mut clashes = Vec::new();
    for pod in pods {
        let job = owner_job(pod).and_then(|(name, _)| {
            jobs.get(&(pod.metadata.namespace.as_deref(), name))
                .copied()
        });
        if let Some(run) = run_of(pod, job)
            && out.insert(run.source, run.clone()).is_some()
        {
            clashes.push(run.source);
        }
    }
    for ip in clashes {
        out.remove(&ip);
    }
    out
}

/// Keeps `registry`'s cluster runs equal to the running algorithm pods of `namespace` until
/// `cancel`. The watches re-list and resume with backoff by themselves; the registry is only
/// synced from complete lists, so a restarting watch never ends runs that still run.
pub async fn watch(client: Client, namespace: &str, registry: Registry, cancel: CancellationToken) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let jobs: Api<Job> = Api::namespaced(client, namespace);
    let (pod_store, pod_writer) = reflector::store();
    let (job_store, job_writer) = reflector::store();
    let pod_events = reflector(pod_writer, watcher(pods, watcher::Config::default()))
        .default_backoff()
        .map(|e| e.map(|_| ()));
    let job_events = reflector(job_writer, watcher(jobs, watcher::Config::default()))
        .default_backoff()
        .map(|e| e.map(|_| ()));
    let mut events = stream::select(pod_events, job_events).boxed();
    info!(namespace, "watching vantage6 task pods and jobs");
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Err(error)) => warn!(%error, namespace, "watching task pods and jobs"),
            Some(Ok(())) => {
                // Both stores must have listed once, or a pod's job may just not be known yet.
                let (Some(pods), Some(jobs)) = (ready(&pod_store), ready(&job_store)) else {
                    continue;
                };
                let seen = runs_of(pods.iter().map(Arc::as_ref), jobs.iter().map(Arc::as_ref));
                debug!(runs = seen.len(), "task pods seen");
                for (run, error) in registry.sync_cluster(seen) {
                    warn!(%error, source = %run.source, task_id = run.task_id,
                          "a task pod's run was not registered");
                }
            }
        }
    }
}

/// The store's objects once it has listed, else `None`.
fn ready<K>(store: &reflector::Store<K>) -> Option<Vec<Arc<K>>>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    // `wait_until_ready` resolves once the first list is in; polling it once tells.
    use futures::FutureExt;
    store.wait_until_ready().now_or_never()?.ok()?;
    Some(store.state())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    pub(crate) fn job(name: &str, task: &str, parent: &str) -> Value {
        json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {
                "name": name, "namespace": "vantage6-tasks", "uid": format!("uid-{name}"),
                "labels": {"node_id": "n1"},
                "annotations": {"run_id": "3", "task_id": task, "task_parent_id": parent,
                                "action": "compute"},
            },
        })
    }

    pub(crate) fn pod(name: &str, job: &str, ip: &str, phase: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": "vantage6-tasks",
                "labels": {"app": job, "role": "compute"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job,
                                     "uid": format!("uid-{job}"), "controller": true}],
            },
            "spec": {"containers": [{"name": "algorithm", "image": "algo@sha256:00",
                                     "ports": [{"containerPort": 8888, "name": "mpc"},
                                               {"containerPort": 9000},
                                               {"containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": phase, "podIP": ip,
                       "containerStatuses": [{"name": "algorithm", "image": "algo",
                           "imageID": format!("docker.io/library/algo@{IMAGE}"),
                           "ready": true, "restartCount": 0}]},
        })
    }

    /// The digest the pod fixture's container runs.
    pub(crate) const IMAGE: &str =
        "sha256:00000000000000000000000000000000000000000000000000000000000000aa";

    fn of(pod: &Value, job: &Value) -> Option<LocalRun> {
        let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
        let job: Job = serde_json::from_value(job.clone()).unwrap();
        run_of(&pod, Some(&job))
    }

    #[test]
    fn a_running_task_pod_is_a_run_with_its_container_ports() {
        let run = of(&pod("p", "j", "10.42.0.9", "Running"), &job("j", "10", "5")).unwrap();
        assert_eq!(
            run,
            LocalRun {
                task_id: 10,
                parent_id: Some(5),
                source: "10.42.0.9".parse().unwrap(),
                ports: vec!["8888:mpc".parse().unwrap(), "9000".parse().unwrap()],
                host: None,
                image: Some(IMAGE.into()),
            }
        );
        // No digest the policy could name: a bare config digest, or no status yet.
        let mut bare = pod("p", "j", "10.42.0.9", "Running");
        bare["status"]["containerStatuses"][0]["imageID"] = json!(IMAGE);
        assert_eq!(of(&bare, &job("j", "10", "5")).unwrap().image, None);
        bare["status"]["containerStatuses"] = json!([]);
        assert_eq!(of(&bare, &job("j", "10", "5")).unwrap().image, None);
        // A top-level task: the parent annotation is empty.
        let top = of(&pod("p", "j", "10.42.0.9", "Running"), &job("j", "5", "")).unwrap();
        assert_eq!((top.task_id, top.parent_id), (5, None));
    }

    #[test]
    fn pods_that_do_not_run_or_cannot_be_told_apart_are_no_runs() {
        let j = job("j", "10", "5");
        for phase in ["Pending", "Succeeded", "Failed"] {
            assert_eq!(of(&pod("p", "j", "10.42.0.9", phase), &j), None, "{phase}");
        }
        let mut p = pod("p", "j", "10.42.0.9", "Running");
        p["spec"]["hostNetwork"] = json!(true);
        assert_eq!(of(&p, &j), None, "host network");
        let mut p = pod("p", "j", "10.42.0.9", "Running");
        p["metadata"]["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
        assert_eq!(of(&p, &j), None, "being deleted");
        let mut p = pod("p", "j", "10.42.0.9", "Running");
        p["status"]["podIP"] = Value::Null;
        assert_eq!(of(&p, &j), None, "no IP");
        // Another job's name or uid, another namespace, no or bad annotations.
        assert_eq!(of(&pod("p", "k", "10.42.0.9", "Running"), &j), None);
        let mut other = j.clone();
        other["metadata"]["uid"] = json!("uid-recreated");
        assert_eq!(of(&pod("p", "j", "10.42.0.9", "Running"), &other), None);
        let mut other = j.clone();
        other["metadata"]["namespace"] = json!("default");
        assert_eq!(of(&pod("p", "j", "10.42.0.9", "Running"), &other), None);
        let p = pod("p", "j", "10.42.0.9", "Running");
        assert_eq!(of(&p, &job("j", "x", "")), None);
        assert_eq!(of(&p, &job("j", "10", "y")), None);
        let mut bare = j.clone();
        bare["metadata"]["annotations"] = json!({});
        assert_eq!(of(&p, &bare), None);
        // Owned by a Job, but not as its controller (e.g. adopted by hand).
        let mut p = pod("p", "j", "10.42.0.9", "Running");
        p["metadata"]["ownerReferences"][0]["controller"] = json!(false);
        assert_eq!(of(&p, &j), None);
    }

    #[test]
    fn runs_are_keyed_by_ip_and_clashing_ips_are_dropped() {
        let parse = |v: Value| -> Pod { serde_json::from_value(v).unwrap() };
        let pods = [
            parse(pod("a", "ja", "10.42.0.1", "Running")),
            parse(pod("b", "jb", "10.42.0.2", "Running")),
            parse(pod("c", "jc", "10.42.0.3", "Running")),
            parse(pod("d", "jd", "10.42.0.3", "Running")),
            parse(pod("e", "missing", "10.42.0.5", "Running")),
        ];
        let jobs: Vec<Job> = [("ja", "1"), ("jb", "2"), ("jc", "3"), ("jd", "4")]
            .into_iter()
            .map(|(n, t)| serde_json::from_value(job(n, t, "")).unwrap())
            .collect();
        let runs = runs_of(&pods, &jobs);
        let got: Vec<(String, u64)> = runs
            .values()
            .map(|r| (r.source.to_string(), r.task_id))
            .collect();
        assert_eq!(got, vec![("10.42.0.1".into(), 1), ("10.42.0.2".into(), 2)]);
    }

    /// The watch against a scripted API server (no Kubernetes API server runs here:
    /// `tower_test`'s mock pair behind a real [`kube::Client`]). It answers the Pod and Job
    /// lists of `vantage6-tasks`, then each watch with the next batch of events the test sends
    /// for that kind, holding the watch open until then.
    mod watched {
        use std::{collections::VecDeque, time::Duration};

        use axum::http::{Method, Request, Response};
        use kube::client::Body;
        use tokio::sync::mpsc;

        use super::*;
        use crate::node::v6::{Origin, verify};

        type Send = tower_test::mock::SendResponse<Response<Body>>;

        const PODS: &str = "/api/v1/namespaces/vantage6-tasks/pods?";
        const JOBS: &str = "/apis/batch/v1/namespaces/vantage6-tasks/jobs?";

        fn item(mut v: Value) -> Value {
            let m = v.as_object_mut().unwrap();
            m.remove("apiVersion");
            m.remove("kind");
            v
        }

        fn lines(events: &[Value]) -> Body {
            let mut out = Vec::new();
            for e in events {
                out.extend(serde_json::to_vec(e).unwrap());
                out.push(b'\n');
            }
            Body::from(out)
        }

        /// Plays the API server until the client goes away; returns every request's URI.
        async fn serve(
            mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
            pods: Vec<Value>,
            jobs: Vec<Value>,
            mut batches: mpsc::UnboundedReceiver<(&'static str, Vec<Value>)>,
        ) -> Vec<String> {
            let mut seen = Vec::new();
            let mut waiting: BTreeMap<&str, Send> = BTreeMap::new();
            let mut queued: BTreeMap<&str, VecDeque<Vec<Value>>> = BTreeMap::new();
            loop {
                tokio::select! {
                    req = handle.next_request() => {
                        let Some((req, send)) = req else { return seen };
                        let uri = req.uri().to_string();
                        assert_eq!(req.method(), Method::GET, "read-only: {uri}");
                        seen.push(uri.clone());
                        let (kind, list) = if uri.starts_with(PODS) {
                            (PODS, ("PodList", &pods))
                        } else if uri.starts_with(JOBS) {
                            (JOBS, ("JobList", &jobs))
                        } else {
                            panic!("unexpected request {uri}");
                        };
                        if !uri.contains("watch=true") {
                            let items: Vec<Value> = list.1.iter().cloned().map(item).collect();
                            let body = json!({"kind": list.0, "apiVersion": "v1",
                                              "metadata": {"resourceVersion": "1"},
                                              "items": items});
                            send.send_response(Response::new(Body::from(
                                serde_json::to_vec(&body).unwrap(),
                            )));
                        } else if let Some(b) = queued.get_mut(kind).and_then(VecDeque::pop_front) {
                            send.send_response(Response::new(lines(&b)));
                        } else {
                            waiting.insert(kind, send);
                        }
                    }
                    batch = batches.recv() => {
                        let Some((kind, events)) = batch else { return seen };
                        match waiting.remove(kind) {
                            Some(send) => send.send_response(Response::new(lines(&events))),
                            None => queued.entry(kind).or_default().push_back(events),
                        }
                    }
                }
            }
        }

        fn event(kind: &str, mut object: Value, rv: u32) -> Value {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            json!({"type": kind, "object": object})
        }

        /// Waits (at most 2 s) until `registry` satisfies `done`.
        async fn until(registry: &Registry, done: impl Fn(&Registry) -> bool) {
            let mut changed = registry.subscribe();
            tokio::time::timeout(Duration::from_secs(2), async {
                while !done(registry) {
                    changed.changed().await.unwrap();
                }
            })
            .await
            .expect("the registry never got there");
        }

        fn tasks(registry: &Registry) -> Vec<(String, u64)> {
            let mut t: Vec<_> = registry
                .all()
                .iter()
                .map(|r| (r.source.to_string(), r.task_id))
                .collect();
            t.sort();
            t
        }

        #[tokio::test]
        async fn running_task_pods_come_and_go_in_the_registry() {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(service, "vantage6-tasks");
            let (batches, rx) = mpsc::unbounded_channel();
            let server = tokio::spawn(serve(
                handle,
                vec![
                    pod("a", "ja", "10.42.0.1", "Running"),
                    pod("b", "jb", "10.42.0.2", "Pending"),
                ],
                vec![job("ja", "10", "5"), job("jb", "11", "")],
                rx,
            ));
            let registry = Registry::new();
            // An operator's announcement is the watch's to leave alone.
            registry
                .announce(LocalRun {
                    task_id: 7,
                    parent_id: None,
                    source: "172.17.0.5".parse().unwrap(),
                    ports: vec![],
                    host: None,
                    image: None,
                })
                .unwrap();
            let cancel = CancellationToken::new();
            let watching = tokio::spawn(watch(
                client,
                "vantage6-tasks",
                registry.clone(),
                cancel.clone(),
            ));

            until(&registry, |r| r.all().len() == 2).await;
            assert_eq!(
                tasks(&registry),
                vec![("10.42.0.1".into(), 10), ("172.17.0.5".into(), 7)]
            );
            let a = "10.42.0.1".parse().unwrap();
            assert_eq!(registry.origin(a), Some(Origin::Cluster));
            assert_eq!(
                registry.by_source(a).unwrap().ports,
                vec!["8888:mpc".parse().unwrap(), "9000".parse().unwrap()]
            );
            // The digest the runtime pulled, which the node announces and policies name.
            assert_eq!(registry.by_source(a).unwrap().image.as_deref(), Some(IMAGE));
            // A pod of the watch needs no token; the operator's run still does.
            let now = std::time::SystemTime::now();
            assert_eq!(verify(&registry, a, None, None, now).unwrap().task_id, 10);
            let announced = "172.17.0.5".parse().unwrap();
            assert_eq!(
                verify(&registry, announced, None, None, now)
                    .unwrap_err()
                    .status,
                axum::http::StatusCode::UNAUTHORIZED
            );

            // b starts running; a finishes, then is deleted.
            let mut a_done = pod("a", "ja", "10.42.0.1", "Succeeded");
            a_done["status"]["podIP"] = json!("10.42.0.1");
            batches
                .send((
                    PODS,
                    vec![
                        event("MODIFIED", pod("b", "jb", "10.42.0.2", "Running"), 2),
                        event("MODIFIED", a_done.clone(), 3),
                    ],
                ))
                .unwrap();
            until(&registry, |r| {
                tasks(r) == [("10.42.0.2".into(), 11), ("172.17.0.5".into(), 7)]
            })
            .await;
            assert_eq!(
                registry
                    .by_source("10.42.0.2".parse().unwrap())
                    .unwrap()
                    .parent_id,
                None
            );
            assert_eq!(
                verify(&registry, a, None, None, now).unwrap_err().status,
                axum::http::StatusCode::FORBIDDEN
            );

            // The IP comes back for a pod of another task: no clash with the ended run.
            batches
                .send((JOBS, vec![event("ADDED", job("jc", "12", "10"), 4)]))
                .unwrap();
            batches
                .send((
                    PODS,
                    vec![
                        event("DELETED", a_done, 5),
                        event("ADDED", pod("c", "jc", "10.42.0.1", "Running"), 6),
                    ],
                ))
                .unwrap();
            until(&registry, |r| {
                r.by_source(a).is_some_and(|r| r.task_id == 12)
            })
            .await;
            assert_eq!(registry.by_source(a).unwrap().parent_id, Some(10));

            // Its Job deleted (e.g. the node killed the run): the pod is no run any more.
            batches
                .send((JOBS, vec![event("DELETED", job("jc", "12", "10"), 7)]))
                .unwrap();
            until(&registry, |r| r.by_source(a).is_none()).await;
            assert_eq!(
                tasks(&registry),
                vec![("10.42.0.2".into(), 11), ("172.17.0.5".into(), 7)]
            );

            cancel.cancel();
            watching.await.unwrap();
            drop(batches);
            let uris = server.await.unwrap();
            // Exactly pods and jobs in the task namespace, listed then watched.
            assert!(
                uris.iter()
                    .any(|u| u.starts_with(PODS) && !u.contains("watch=true"))
            );
            assert!(
                uris.iter()
                    .any(|u| u.starts_with(JOBS) && !u.contains("watch=true"))
            );
            assert!(
                uris.iter()
                    .any(|u| u.starts_with(PODS) && u.contains("watch=true"))
            );
        }
    }
}
