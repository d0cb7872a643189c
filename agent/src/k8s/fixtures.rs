//! A scripted Kubernetes API server for the controller's tests, after kube-rs/controller-rs
//! `src/fixtures.rs`: `tower_test::mock::pair` behind a real [`kube::Client`], a [`Scenario`] of
//! the calls expected in order, and [`timeout_after_1s`].
//!
//! No Kubernetes API server runs on the build machine (no container engine, no cluster), so the
//! verifier plays one: it checks each request's method, path, query and body against the next
//! expected [`Call`], keeps what was applied (adding the fields a real server adds: `uid`,
//! `resourceVersion`, `managedFields`, a Service's `clusterIP`), and answers lists from that.
//! A request the scenario does not expect fails the test; so does an expected one that never
//! comes.

use std::collections::BTreeMap;

use axum::http::{Method, Request, Response};
use kube::{Client, client::Body};
use serde_json::{Value, json};

use super::{Mode, PortRange, Settings};
use fedmesh_mesh_config::RenderOptions;

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request.
#[derive(Clone, Debug)]
pub enum Call {
    /// `GET` of a collection (fedmesh's label selector in the query); answered from the store.
    List(String),
    /// A server-side apply (`fieldManager=fedmesh`, `force=true`) of exactly this body at this
    /// object path; stored with the server's fields added, and answered with the stored object.
    Apply(String, Value),
    /// A server-side apply of this body to the `status` subresource of the object at this path.
    ApplyStatus(String, Value),
    /// A `DELETE` of the object at this path.
    Delete(String),
}

/// What the API server is asked, in order.
#[derive(Clone, Debug)]
pub enum Scenario {
    /// `GET /apis`, answered with these groups (each serving `v1`).
    Discovery(Vec<&'static str>),
    /// One pass: exactly these calls, in this order, and nothing else.
    Pass(Vec<Call>),
    /// The PeerLink watch: its first list (answered empty, at `resourceVersion` 1), then one
    /// watch from there, answered with these events (`{"type": ..., "object": ...}`).
    PeerLinkWatch(Vec<Value>),
}

/// The fake API server's side of the mock pair, with what it holds.
pub struct ApiServerVerifier {
    handle: ApiServerHandle,
    /// Objects by path, as the server would return them.
    pub store: BTreeMap<String, Value>,
}

/// A client wired to a fresh verifier.
pub fn mock_client() -> (Client, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "fedmesh");
    (
        client,
        ApiServerVerifier {
            handle,
            store: BTreeMap::new(),
        },
    )
}

/// The settings every test uses: agent namespace `fedmesh`, algorithm pods in
/// `vantage6-tasks`, pod ports `20000-29999`.
pub fn settings(mode: Mode) -> Settings {
    Settings {
        mode,
        namespace: "fedmesh".into(),
        render: RenderOptions::default(),
        pod_labels: BTreeMap::from([("app.kubernetes.io/name".into(), "fedmesh-agent".into())]),
        pod_ports: PortRange::DEFAULT,
    }
}

/// Waits for the scenario, failing the test after a second (a call that never came).
pub async fn timeout_after_1s(
    handle: tokio::task::JoinHandle<ApiServerVerifier>,
) -> ApiServerVerifier {
    tokio::time::timeout(std::time::Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver")
        .expect("scenario succeeded")
}

impl ApiServerVerifier {
    /// Plays `scenario` in the background; returns the verifier (with its store) at the end.
    pub fn run(mut self, scenario: Scenario) -> tokio::task::JoinHandle<Self> {
        tokio::spawn(async move {
            match scenario {
                Scenario::Discovery(groups) => self.discovery(&groups).await,
                Scenario::Pass(calls) => {
                    for call in calls {
                        self.call(call).await;
                    }
                }
                Scenario::PeerLinkWatch(events) => self.peerlink_watch(&events).await,
            }
            self
        })
    }

    async fn next(
        &mut self,
    ) -> (
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        self.handle
            .next_request()
            .await
            .expect("service not called")
    }

    async fn discovery(&mut self, groups: &[&str]) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().to_string(), "/apis");
        let groups: Vec<Value> = groups
            .iter()
            .map(|g| {
                let v = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
                json!({"name": g, "versions": [v], "preferredVersion": v})
            })
            .collect();
        send.send_response(respond(&json!({
            "kind": "APIGroupList", "apiVersion": "v1", "groups": groups,
        })));
    }

    async fn peerlink_watch(&mut self, events: &[Value]) {
        const PATH: &str = "/apis/fedmesh.io/v1alpha1/namespaces/fedmesh/peerlinks?";
        const SELECTOR: &str = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfedmesh";
        let (request, send) = self.next().await;
        let uri = request.uri().to_string();
        assert_eq!(request.method(), Method::GET);
        assert!(uri.starts_with(PATH) && uri.contains(SELECTOR), "{uri}");
        assert!(!uri.contains("watch=true"), "the watch lists first: {uri}");
        send.send_response(respond(&json!({
            "kind": "PeerLinkList", "apiVersion": "fedmesh.io/v1alpha1",
            "metadata": {"resourceVersion": "1"}, "items": [],
        })));
        let (request, send) = self.next().await;
        let uri = request.uri().to_string();
        assert!(uri.starts_with(PATH) && uri.contains(SELECTOR), "{uri}");
        assert!(
            uri.contains("watch=true") && uri.contains("resourceVersion=1"),
            "{uri}"
        );
        let mut lines = Vec::new();
        for event in events {
            lines.extend(serde_json::to_vec(event).expect("JSON"));
            lines.push(b'\n');
        }
        send.send_response(
            Response::builder()
                .body(Body::from(lines))
                .expect("response"),
        );
    }

    async fn call(&mut self, call: Call) {
        let (request, send) = self.next().await;
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let body = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        match call {
            Call::List(path) => {
                assert_eq!((method, uri.as_str()), (Method::GET, path.as_str()), "list");
                let collection = path.split('?').next().unwrap_or_default();
                let items: Vec<Value> = self
                    .store
                    .iter()
                    .filter(|(p, _)| p.rsplit_once('/').is_some_and(|(c, _)| c == collection))
                    .filter(|(_, o)| {
                        o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "fedmesh"
                    })
                    .map(|(_, o)| listed(o))
                    .collect();
                send.send_response(respond(&json!({
                    "apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": "7"}, "items": items,
                })));
            }
            Call::Apply(path, expected) => {
                assert_eq!(
                    (method, uri.as_str()),
                    (
                        Method::PATCH,
                        format!("{path}?&force=true&fieldManager=fedmesh").as_str()
                    ),
                    "server-side apply"
                );
                let sent: Value = serde_json::from_slice(&body).expect("JSON body");
                assert_eq!(sent, expected, "body of the apply to {path}");
                let stored = self.served(&path, sent);
                send.send_response(respond(&stored));
            }
            Call::ApplyStatus(path, expected) => {
                assert_eq!(
                    (method, uri.as_str()),
                    (
                        Method::PATCH,
                        format!("{path}/status?&force=true&fieldManager=fedmesh").as_str()
                    ),
                    "server-side apply of a status"
                );
                let sent: Value = serde_json::from_slice(&body).expect("JSON body");
                assert_eq!(sent, expected, "body of the status apply to {path}");
                let object = self
                    .store
                    .get_mut(&path)
                    .expect("status of a stored object");
                object["status"] = sent["status"].clone();
                let object = object.clone();
                send.send_response(respond(&object));
            }
            Call::Delete(path) => {
                assert_eq!(
                    (method, uri.as_str()),
                    (Method::DELETE, format!("{path}?").as_str()),
                    "delete"
                );
                let object = self.store.remove(&path).expect("delete of a stored object");
                send.send_response(respond(&object));
            }
        }
    }

    /// Stores an applied object as a server would: its own fields added, earlier ones kept.
    fn served(&mut self, path: &str, sent: Value) -> Value {
        let n = self.store.len();
        let earlier = self.store.get(path).cloned();
        let mut object = sent;
        let meta = &mut object["metadata"];
        meta["uid"] = json!(format!("00000000-0000-0000-0000-{n:012}"));
        meta["resourceVersion"] = json!(format!("{}", 100 + n));
        meta["creationTimestamp"] = json!("2027-01-15T08:00:00Z");
        meta["managedFields"] = json!([{"manager": "fedmesh", "operation": "Apply"}]);
        if object["kind"] == "Service" {
            let ip = earlier.as_ref().map_or_else(
                || json!(format!("10.96.0.{}", 10 + n)),
                |e| e["spec"]["clusterIP"].clone(),
            );
            object["spec"]["clusterIP"] = ip.clone();
            object["spec"]["clusterIPs"] = json!([ip]);
            object["spec"]["sessionAffinity"] = json!("None");
            object["spec"]["ipFamilies"] = json!(["IPv4"]);
        }
        if let Some(status) = earlier.and_then(|e| e.get("status").cloned()) {
            object["status"] = status;
        }
        self.store.insert(path.to_owned(), object.clone());
        object
    }
}

/// An item of a list response: core kinds come without `apiVersion` and `kind`.
fn listed(object: &Value) -> Value {
    let mut item = object.clone();
    if item["apiVersion"] == "v1"
        && let Some(map) = item.as_object_mut()
    {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

fn respond(body: &Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(body).expect("JSON")))
        .expect("response")
}

/// A verified collaboration `c` of `a/n1` (this node), `b/n1` and `c/n1`, at the fixture's
/// `now` (2027-01-15T08:00:00Z), with peers' gateways advertised (`b/n1` by name, `c/n1` by
/// address).
pub struct Collab {
    /// The signing fixture.
    pub fx: fedmesh_documents::fixtures::Fixture,
    /// What this node verified.
    pub ledger: fedmesh_documents::Ledger,
    /// The approved links, in the order given.
    pub links: Vec<fedmesh_documents::LinkTerms>,
}

impl Collab {
    /// The collaboration with `links` (from, to, ports) approved for an hour.
    pub fn new(links: &[(&str, &str, &[&str])]) -> Self {
        use fedmesh_documents::{Advertisement, Document, Ledger, jws};
        let fx = fedmesh_documents::fixtures::Fixture::new("c", &["a/n1", "b/n1", "c/n1"]);
        let mut ledger = Ledger::new(&fx.pin());
        ledger
            .ingest_jws(&fx.collab_jws(), fx.now)
            .expect("collaboration");
        let mut collab = Self {
            links: Vec::new(),
            ledger,
            fx,
        };
        for (node, gateway) in [("b/n1", "gw.b.example:443"), ("c/n1", "192.0.2.7:443")] {
            let doc = Document::Advertisement(Advertisement {
                collab: "c".into(),
                node: node.parse().expect("node"),
                endpoints: vec![fedmesh_documents::Endpoint::IstioGateway {
                    address: gateway.into(),
                }],
                exposes: Vec::new(),
                instance: None,
                issued_at: jws::unix(collab.fx.now),
            });
            collab.ingest(&collab.fx.node_sign(node, &doc));
        }
        for (from, to, ports) in links {
            let terms = collab
                .fx
                .terms(from, to, ports, std::time::Duration::from_secs(3600));
            collab.ingest(&collab.fx.approval(&terms));
            collab.links.push(terms);
        }
        collab
    }

    /// Verifies one more document.
    pub fn ingest(&mut self, jws: &str) {
        let envelope = self.fx.envelope(jws.to_owned());
        self.ledger
            .ingest(&envelope, self.fx.now)
            .expect("document verifies");
    }

    /// This node.
    pub fn node() -> fedmesh_documents::NodeRef {
        "a/n1".parse().expect("node")
    }
}

/// The credentials every Istio test uses.
pub fn credentials() -> fedmesh_mesh_config::Credentials {
    fedmesh_mesh_config::Credentials {
        cert_chain_pem: "CERT".into(),
        key_pem: "KEY".into(),
        ca_pem: "CA".into(),
    }
}

/// The API path of an object (`/api/v1/...` for the core group, `/apis/<group>/<version>/...`).
pub fn path_of(object: &Value) -> String {
    let plural = match object["kind"].as_str().unwrap_or_default() {
        "Secret" => "secrets",
        "Service" => "services",
        "ServiceEntry" => "serviceentries",
        "DestinationRule" => "destinationrules",
        "Gateway" => "gateways",
        "VirtualService" => "virtualservices",
        "Sidecar" => "sidecars",
        "AuthorizationPolicy" => "authorizationpolicies",
        "PeerAuthentication" => "peerauthentications",
        "NetworkPolicy" => "networkpolicies",
        "PeerLink" => "peerlinks",
        other => panic!("no path for {other}"),
    };
    let api = match object["apiVersion"].as_str().unwrap_or_default() {
        "v1" => "/api/v1".to_owned(),
        group_version => format!("/apis/{group_version}"),
    };
    format!(
        "{api}/namespaces/{}/{plural}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Where PeerLinks live in the tests.
pub const PEERLINKS: &str = "/apis/fedmesh.io/v1alpha1/namespaces/fedmesh/peerlinks";

/// A list of `collection` with fedmesh's label selector for collaboration `c`.
pub fn list(collection: &str) -> Call {
    Call::List(format!(
        "{collection}?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfedmesh%2C\
         fedmesh.io%2Fcollaboration%3Dc"
    ))
}

/// What every Istio pass reads, in order: PeerLinks, then each kind in each namespace.
pub fn istio_lists() -> Vec<Call> {
    [
        PEERLINKS,
        "/api/v1/namespaces/fedmesh/secrets",
        "/apis/networking.istio.io/v1/namespaces/fedmesh/serviceentries",
        "/apis/networking.istio.io/v1/namespaces/fedmesh/destinationrules",
        "/apis/networking.istio.io/v1/namespaces/fedmesh/gateways",
        "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices",
        "/apis/security.istio.io/v1/namespaces/fedmesh/authorizationpolicies",
        "/apis/security.istio.io/v1/namespaces/vantage6-tasks/authorizationpolicies",
        "/apis/security.istio.io/v1/namespaces/vantage6-tasks/peerauthentications",
        "/apis/networking.istio.io/v1/namespaces/vantage6-tasks/sidecars",
        "/apis/networking.k8s.io/v1/namespaces/vantage6-tasks/networkpolicies",
    ]
    .into_iter()
    .map(list)
    .collect()
}

/// What every relay pass reads, in order.
pub fn relay_lists() -> Vec<Call> {
    [PEERLINKS, "/api/v1/namespaces/fedmesh/services"]
        .into_iter()
        .map(list)
        .collect()
}
