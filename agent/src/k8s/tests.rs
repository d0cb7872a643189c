//! The controller against a scripted API server ([`super::fixtures`]).
//!
//! No Kubernetes API server can run here (no container engine and no cluster on the build
//! machine), so these tests check the requests themselves: method, path, `fieldManager=fedmesh`,
//! `force=true` and body, in order, for a collaboration where this node (`a/n1`) has two peers;
//! that a second pass over an unchanged cluster only reads; that revoked and vetoed links'
//! objects are pruned; that an edited PeerLink wakes the controller; that a budgeted link's
//! status shows its limits and the relay's use; and how Istio is told from its absence.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};

use fedmesh_documents::{Document, jws};
use fedmesh_mesh_config::{NodeView, Peer, RenderOptions};
use serde_json::{Value, json};

use super::{controller::veto_decision, desired::Memory, fixtures::*, *};

const IN: &str = "l-615f1874075b14fb"; // c/n1 -> a/n1, 9092:flower
const OUT_B: &str = "l-b6cd7c0a2f1be966"; // a/n1 -> b/n1, 11366:mpc
const OUT_C: &str = "l-1e857d573661ad11"; // a/n1 -> c/n1, 8080:http and 11367:mpc
const NOW: &str = "2027-01-15T08:00:00Z";
const EXPIRES: &str = "2027-01-15T09:00:00Z";

fn istio_collab() -> Collab {
    Collab::new(&[
        ("a/n1", "b/n1", &["11366:mpc"]),
        ("c/n1", "a/n1", &["9092:flower"]),
    ])
}

/// The Istio objects mesh-config renders for `a/n1`, from a view built by hand.
fn rendered(collab: &Collab) -> Vec<Value> {
    let (links, _) = collab
        .ledger
        .effective_links(&Collab::node(), collab.fx.now);
    let peer = |gw: &str| Peer {
        gateway: gw.parse().unwrap(),
    };
    let view = NodeView {
        collab: "c".into(),
        local: Collab::node(),
        members: ["a/n1", "b/n1", "c/n1"]
            .into_iter()
            .map(|m| m.parse().unwrap())
            .collect(),
        peers: BTreeMap::from([
            ("b/n1".parse().unwrap(), peer("gw.b.example:443")),
            ("c/n1".parse().unwrap(), peer("192.0.2.7:443")),
        ]),
        links,
        services: BTreeMap::new(),
        vips: BTreeMap::new(),
        credentials: Some(credentials()),
        carried: BTreeMap::new(),
    };
    fedmesh_mesh_config::render(&view, &RenderOptions::default(), collab.fx.now)
        .unwrap()
        .objects
}

fn peerlink(id: &str, peer: &str, direction: &str, ports: &str) -> (String, Value) {
    let path = format!("{PEERLINKS}/{id}");
    let body = json!({
        "apiVersion": "fedmesh.io/v1alpha1",
        "kind": "PeerLink",
        "metadata": {
            "name": id,
            "namespace": "fedmesh",
            "labels": {
                "app.kubernetes.io/managed-by": "fedmesh",
                "fedmesh.io/collaboration": "c",
                "fedmesh.io/peer": peer.replace('/', "."),
                "fedmesh.io/direction": direction,
            },
        },
        "spec": {
            "linkId": id,
            "peer": peer,
            "direction": direction,
            "ports": ports,
            "expires": EXPIRES,
            "approvedBy": "owner@example.org",
        },
    });
    (path, body)
}

/// A status apply: the state and the six conditions as (status, reason, message).
fn status(id: &str, state: &str, conditions: [(&str, &str, &str); 6]) -> Call {
    let types = [
        "Approved",
        "Consented",
        "Active",
        "Expired",
        "Revoked",
        "Applied",
    ];
    let conditions: Vec<Value> = types
        .iter()
        .zip(conditions)
        .map(|(t, (status, reason, message))| {
            json!({"type": t, "status": status, "reason": reason, "message": message,
                   "lastTransitionTime": NOW})
        })
        .collect();
    Call::ApplyStatus(
        format!("{PEERLINKS}/{id}"),
        json!({
            "apiVersion": "fedmesh.io/v1alpha1",
            "kind": "PeerLink",
            "metadata": {"name": id},
            "status": {"state": state, "conditions": conditions},
        }),
    )
}

const APPROVED: (&str, &str, &str) = (
    "True",
    "OwnerApproved",
    "approved by owner@example.org at 2027-01-15T08:00:00Z",
);
const NO_CONSENT_NEEDED: (&str, &str, &str) = (
    "True",
    "ConsentNotRequired",
    "the collaboration does not ask receiving nodes to consent",
);
const NOT_EXPIRED: (&str, &str, &str) =
    ("False", "BeforeExpiry", "expires at 2027-01-15T09:00:00Z");
const NOT_REVOKED: (&str, &str, &str) =
    ("False", "NotRevoked", "not on the owner's revocation list");
const NOTHING_APPLIED: (&str, &str, &str) = (
    "False",
    "NothingApplied",
    "nothing is applied for a link that is not in force here",
);

fn active(id: &str) -> Call {
    status(
        id,
        "active",
        [
            APPROVED,
            NO_CONSENT_NEEDED,
            (
                "True",
                "InForce",
                "approved, consented, not expired and not revoked",
            ),
            NOT_EXPIRED,
            NOT_REVOKED,
            (
                "True",
                "ObjectsApplied",
                "the objects that carry this link are applied",
            ),
        ],
    )
}

fn revoked(id: &str) -> Call {
    status(
        id,
        "revoked",
        [
            APPROVED,
            NO_CONSENT_NEEDED,
            ("False", "NotInForce", "revoked"),
            NOT_EXPIRED,
            (
                "True",
                "OnRevocationList",
                "revoked by the owner in revocation list 1",
            ),
            NOTHING_APPLIED,
        ],
    )
}

fn peerlink_calls(links: &[(&str, &str, &str, &str)]) -> Vec<Call> {
    links
        .iter()
        .flat_map(|(id, peer, direction, ports)| {
            let (path, body) = peerlink(id, peer, direction, ports);
            [Call::Apply(path, body), active(id)]
        })
        .collect()
}

fn deletes(paths: &[&str]) -> Vec<Call> {
    paths
        .iter()
        .map(|p| Call::Delete((*p).to_owned()))
        .collect()
}

fn calls(parts: impl IntoIterator<Item = Vec<Call>>) -> Scenario {
    Scenario::Pass(parts.into_iter().flatten().collect())
}

/// The first Istio pass for the two-peer collaboration, run on `server`.
async fn first_istio_pass(
    collab: &Collab,
    ctl: &Controller,
    server: ApiServerVerifier,
) -> (Outcome, ApiServerVerifier) {
    let objects = rendered(collab);
    let applies = objects
        .iter()
        .map(|o| Call::Apply(path_of(o), o.clone()))
        .collect();
    let scenario = calls([
        istio_lists(),
        applies,
        peerlink_calls(&[
            (IN, "c/n1", "inbound", "9092:flower"),
            (OUT_B, "b/n1", "outbound", "11366:mpc"),
        ]),
    ]);
    let server = server.run(scenario);
    let outcome = pass(ctl, collab, Some(&credentials()), &Memory::default()).await;
    (outcome, timeout_after_1s(server).await)
}

use controller::Outcome;

/// One pass of `ctl` for this node over `collab` at the fixture's `now`; the collaboration is
/// verified, so the pass has an outcome.
async fn pass(
    ctl: &Controller,
    collab: &Collab,
    credentials: Option<&fedmesh_mesh_config::Credentials>,
    memory: &Memory,
) -> Outcome {
    ctl.reconcile(
        &collab.ledger,
        &Collab::node(),
        credentials,
        memory,
        collab.fx.now,
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn istio_applies_exactly_the_render_then_nothing_when_unchanged() {
    let collab = istio_collab();
    let (client, server) = mock_client();
    let ctl = Controller::new(client, settings(Mode::Istio));
    let paths: Vec<String> = rendered(&collab).iter().map(path_of).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/fedmesh/secrets/fm-c-a-n1-tls",
            "/apis/security.istio.io/v1/namespaces/fedmesh/authorizationpolicies/fm-c-ingress",
            "/apis/security.istio.io/v1/namespaces/vantage6-tasks/authorizationpolicies/fm-c",
            "/apis/security.istio.io/v1/namespaces/vantage6-tasks/peerauthentications/fm-c",
            "/apis/networking.istio.io/v1/namespaces/vantage6-tasks/sidecars/fm-c",
            "/apis/networking.k8s.io/v1/namespaces/vantage6-tasks/networkpolicies/fm-c",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/serviceentries/fm-c-out-b-n1-387b4674",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices/fm-c-out-b-n1-387b4674",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/destinationrules/fm-c-out-b-n1-387b4674",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/gateways/fm-c-egress-b-n1-e15a430f",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/destinationrules/fm-c-egress-b-n1-e15a430f",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices/fm-c-egress-b-n1-p11366-15945d97",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/gateways/fm-c-in-c-n1-18342d76",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices/fm-c-in-c-n1-p9092-28b629b3",
            "/apis/security.istio.io/v1/namespaces/fedmesh/authorizationpolicies/fm-c-in-c-n1-18342d76",
            "/apis/security.istio.io/v1/namespaces/vantage6-tasks/authorizationpolicies/fm-c-in-c-n1-18342d76",
            "/apis/networking.k8s.io/v1/namespaces/vantage6-tasks/networkpolicies/fm-c-in-c-n1-18342d76",
        ]
    );

    let (outcome, server) = first_istio_pass(&collab, &ctl, server).await;
    assert_eq!(outcome.writes, 17 + 4);
    assert_eq!(
        server.store["/api/v1/namespaces/fedmesh/secrets/fm-c-a-n1-tls"]["data"],
        json!({"tls.crt": "Q0VSVA==", "tls.key": "S0VZ", "ca.crt": "Q0E="}),
        "the node's credentials, in the agent's namespace only"
    );
    let se = &server.store["/apis/networking.istio.io/v1/namespaces/fedmesh/serviceentries/fm-c-out-b-n1-387b4674"];
    assert_eq!(
        se["spec"],
        json!({
            "hosts": ["n1.b.c.fedmesh", "b.c.fedmesh"],
            "addresses": ["240.241.197.112"],
            "ports": [{"number": 11366, "name": "tcp-mpc", "protocol": "TCP"}],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "endpoints": [{"address": "gw.b.example", "ports": {"tcp-mpc": 443}}],
            "exportTo": [".", "vantage6-tasks"],
        })
    );
    assert_eq!(
        outcome.placement,
        Placement {
            mode: Mode::Istio,
            synced: true,
            vetoed: Default::default(),
            addresses: BTreeMap::from([(
                "b/n1".parse().unwrap(),
                "240.241.197.112".parse().unwrap()
            )]),
            listeners: BTreeMap::new(),
            carried: Default::default(),
        }
    );

    // Nothing changed: the second pass reads and writes nothing.
    let server = server.run(Scenario::Pass(istio_lists()));
    let again = pass(&ctl, &collab, Some(&credentials()), &outcome.memory).await;
    timeout_after_1s(server).await;
    assert_eq!(again.writes, 0);
    assert_eq!(again.placement, outcome.placement);
    assert_eq!(again.memory, outcome.memory);
}

#[tokio::test]
async fn a_revoked_link_is_pruned() {
    let mut collab = istio_collab();
    let (client, server) = mock_client();
    let ctl = Controller::new(client, settings(Mode::Istio));
    let (outcome, server) = first_istio_pass(&collab, &ctl, server).await;

    let revocation = collab.fx.revocation(1, &[OUT_B]);
    collab.ingest(&revocation);
    let server = server.run(calls([
        istio_lists(),
        deletes(&[
            "/apis/networking.istio.io/v1/namespaces/fedmesh/destinationrules/fm-c-egress-b-n1-e15a430f",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/destinationrules/fm-c-out-b-n1-387b4674",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/gateways/fm-c-egress-b-n1-e15a430f",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/serviceentries/fm-c-out-b-n1-387b4674",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices/fm-c-egress-b-n1-p11366-15945d97",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices/fm-c-out-b-n1-387b4674",
        ]),
        vec![revoked(OUT_B)],
    ]));
    let pruned = pass(&ctl, &collab, Some(&credentials()), &outcome.memory).await;
    let server = timeout_after_1s(server).await;
    assert_eq!(pruned.writes, 7);
    assert!(pruned.placement.addresses.is_empty());
    assert_eq!(
        server.store.len(),
        17 - 6 + 2,
        "the rest stays, with both PeerLinks"
    );
}

#[tokio::test]
async fn a_vetoed_link_is_refused_pruned_and_reported() {
    let mut collab = istio_collab();
    let (client, server) = mock_client();
    let ctl = Controller::new(client, settings(Mode::Istio));
    let (outcome, mut server) = first_istio_pass(&collab, &ctl, server).await;

    // The sysadmin: kubectl patch peerlink <id> --type merge -p '{"spec":{"veto":true,...}}'
    let live = server.store.get_mut(&format!("{PEERLINKS}/{IN}")).unwrap();
    live["spec"]["veto"] = json!(true);
    live["spec"]["vetoReason"] = json!("not this week");
    let vetoed_here = |consented: (&'static str, &'static str, &'static str)| {
        status(
            IN,
            "vetoed",
            [
                APPROVED,
                consented,
                ("False", "NotInForce", "vetoed by this node's sysadmin"),
                NOT_EXPIRED,
                NOT_REVOKED,
                NOTHING_APPLIED,
            ],
        )
    };
    let server = server.run(calls([
        istio_lists(),
        deletes(&[
            "/apis/networking.istio.io/v1/namespaces/fedmesh/gateways/fm-c-in-c-n1-18342d76",
            "/apis/networking.istio.io/v1/namespaces/fedmesh/virtualservices/fm-c-in-c-n1-p9092-28b629b3",
            "/apis/networking.k8s.io/v1/namespaces/vantage6-tasks/networkpolicies/fm-c-in-c-n1-18342d76",
            "/apis/security.istio.io/v1/namespaces/fedmesh/authorizationpolicies/fm-c-in-c-n1-18342d76",
            "/apis/security.istio.io/v1/namespaces/vantage6-tasks/authorizationpolicies/fm-c-in-c-n1-18342d76",
        ]),
        vec![vetoed_here((
            "False",
            "Vetoed",
            "vetoed by this node's sysadmin (spec.veto)",
        ))],
    ]));
    let refused = pass(&ctl, &collab, Some(&credentials()), &outcome.memory).await;
    let server = timeout_after_1s(server).await;
    assert_eq!(refused.writes, 6);
    assert_eq!(refused.placement.vetoed, [IN.to_owned()].into());
    assert_eq!(
        refused.to_report,
        [(IN.to_owned(), Some("not this week".to_owned()))],
        "an inbound link: the node signs a veto for the hub"
    );

    // The agent's signed decision comes back through the hub: nothing left to report.
    let decision = veto_decision(
        "c",
        &Collab::node(),
        IN,
        Some("not this week".into()),
        collab.fx.now,
    );
    let signed = collab.fx.node_sign("a/n1", &Document::Decision(decision));
    collab.ingest(&signed);
    assert_eq!(
        collab.ledger.status(IN, collab.fx.now).unwrap().state,
        fedmesh_documents::LinkState::Vetoed
    );
    let server = server.run(calls([
        istio_lists(),
        vec![vetoed_here(("False", "Vetoed", "a/n1 vetoed it"))],
    ]));
    let settled = pass(&ctl, &collab, Some(&credentials()), &refused.memory).await;
    timeout_after_1s(server).await;
    assert!(settled.to_report.is_empty());
    assert_eq!(settled.writes, 1);
}

#[tokio::test]
async fn relay_mode_puts_one_service_per_peer_in_front_of_the_pod() {
    let mut collab = Collab::new(&[
        ("a/n1", "b/n1", &["11366:mpc"]),
        ("a/n1", "c/n1", &["11367:mpc", "8080:http"]),
    ]);
    let (client, server) = mock_client();
    let ctl = Controller::new(client, settings(Mode::Relay));
    let service = |name: &str, peer: &str, id: &str, ports: Value| {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": "fedmesh",
                "labels": {
                    "app.kubernetes.io/managed-by": "fedmesh",
                    "fedmesh.io/collaboration": "c",
                    "fedmesh.io/peer": peer.replace('/', "."),
                    "fedmesh.io/direction": "outbound",
                },
                "annotations": {
                    "fedmesh.io/purpose": format!("relay: algorithm pods reach {peer} here, on its approved ports"),
                    "fedmesh.io/links": id,
                    "fedmesh.io/approved-by": "owner@example.org",
                    "fedmesh.io/expires": EXPIRES,
                },
            },
            "spec": {
                "type": "ClusterIP",
                "selector": {"app.kubernetes.io/name": "fedmesh-agent"},
                "ports": ports,
            },
        })
    };
    let svc_b = service(
        "fm-c-b-n1-a9a6710d",
        "b/n1",
        OUT_B,
        json!([{"name": "tcp-11366", "protocol": "TCP", "port": 11366, "targetPort": 24374}]),
    );
    let svc_c = service(
        "fm-c-c-n1-ac234908",
        "c/n1",
        OUT_C,
        json!([
            {"name": "tcp-8080", "protocol": "TCP", "port": 8080, "targetPort": 29052},
            {"name": "tcp-11367", "protocol": "TCP", "port": 11367, "targetPort": 20744},
        ]),
    );
    let server = server.run(calls([
        relay_lists(),
        vec![
            Call::Apply(
                "/api/v1/namespaces/fedmesh/services/fm-c-b-n1-a9a6710d".into(),
                svc_b,
            ),
            Call::Apply(
                "/api/v1/namespaces/fedmesh/services/fm-c-c-n1-ac234908".into(),
                svc_c,
            ),
        ],
        peerlink_calls(&[
            (OUT_C, "c/n1", "outbound", "8080:http,11367:mpc"),
            (OUT_B, "b/n1", "outbound", "11366:mpc"),
        ]),
    ]));
    let outcome = pass(&ctl, &collab, None, &Memory::default()).await;
    let server = timeout_after_1s(server).await;
    let (b, c) = ("b/n1".parse().unwrap(), "c/n1".parse().unwrap());
    let listener = |port: u16| std::net::SocketAddr::from(([0, 0, 0, 0], port));
    assert_eq!(
        outcome.placement,
        Placement {
            mode: Mode::Relay,
            synced: true,
            vetoed: Default::default(),
            addresses: BTreeMap::from([
                (b, "10.96.0.10".parse().unwrap()),
                (c, "10.96.0.11".parse().unwrap()),
            ]),
            listeners: BTreeMap::from([
                (listener(24374), ("b/n1".parse().unwrap(), 11366)),
                (listener(29052), ("c/n1".parse().unwrap(), 8080)),
                (listener(20744), ("c/n1".parse().unwrap(), 11367)),
            ]),
            carried: Default::default(),
        }
    );

    // Nothing changed: reads only, and the ClusterIPs come from the live Services.
    let server = server.run(Scenario::Pass(relay_lists()));
    let again = pass(&ctl, &collab, None, &outcome.memory).await;
    let server = timeout_after_1s(server).await;
    assert_eq!((again.writes, &again.placement), (0, &outcome.placement));

    // The owner revokes the link to c/n1: its Service goes, b/n1's keeps its ClusterIP.
    let revocation = collab.fx.revocation(1, &[OUT_C]);
    collab.ingest(&revocation);
    let server = server.run(calls([
        relay_lists(),
        deletes(&["/api/v1/namespaces/fedmesh/services/fm-c-c-n1-ac234908"]),
        vec![revoked(OUT_C)],
    ]));
    let pruned = pass(&ctl, &collab, None, &again.memory).await;
    timeout_after_1s(server).await;
    assert_eq!(pruned.writes, 2);
    assert_eq!(
        pruned.placement.addresses,
        BTreeMap::from([("b/n1".parse().unwrap(), "10.96.0.10".parse().unwrap())])
    );
    assert_eq!(pruned.placement.listeners.len(), 1);
}

/// A sysadmin's veto wakes the controller at once instead of at the next resync: the PeerLink
/// watch yields once its first list is done, then for the edited object.
#[tokio::test]
async fn a_peerlink_edit_wakes_the_controller() {
    let (client, server) = mock_client();
    let ctl = Controller::new(client, settings(Mode::Relay));
    let vetoed = json!({
        "apiVersion": "fedmesh.io/v1alpha1",
        "kind": "PeerLink",
        "metadata": {
            "name": IN,
            "namespace": "fedmesh",
            "resourceVersion": "2",
            "labels": {"app.kubernetes.io/managed-by": "fedmesh"},
        },
        "spec": {"veto": true, "vetoReason": "not during the audit"},
    });
    let server = server.run(Scenario::PeerLinkWatch(vec![
        json!({"type": "MODIFIED", "object": vetoed}),
    ]));
    let mut changes = std::pin::pin!(ctl.peerlink_changes());
    for what in ["the first list", "the veto"] {
        let woke = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
        assert_eq!(woke, Ok(Some(())), "no wake-up for {what}");
    }
    timeout_after_1s(server).await;
    // Nothing else happened: no further wake-up is pending.
    assert!(changes.next().now_or_never().flatten().is_none());
}

#[tokio::test]
async fn istio_is_detected_by_its_api_groups() {
    for (groups, mode) in [
        (
            vec!["apps", "networking.istio.io", "security.istio.io"],
            Mode::Istio,
        ),
        (vec!["apps", "networking.istio.io"], Mode::Relay),
        (vec!["apps", "networking.k8s.io"], Mode::Relay),
    ] {
        let (client, server) = mock_client();
        let server = server.run(Scenario::Discovery(groups));
        assert_eq!(controller::detect(&client).await.unwrap(), mode);
        timeout_after_1s(server).await;
    }
}

#[tokio::test]
async fn options_resolve_against_the_cluster() {
    let options = |mode| Options {
        mode,
        namespace: Some("fedmesh".into()),
        render: RenderOptions::default(),
        pod_labels: BTreeMap::new(),
        pod_ports: PortRange::DEFAULT,
        resync: Duration::from_secs(10),
    };
    // auto: one discovery request decides.
    let (client, server) = mock_client();
    let server = server.run(Scenario::Discovery(vec![
        "networking.istio.io",
        "security.istio.io",
    ]));
    let ctl = Controller::resolve(client, &options(None)).await.unwrap();
    timeout_after_1s(server).await;
    assert_eq!(ctl.settings().mode, Mode::Istio);

    // A mode given on the command line asks nothing.
    let (client, server) = mock_client();
    let server = server.run(Scenario::Pass(vec![]));
    let ctl = Controller::resolve(client, &options(Some(Mode::Relay)))
        .await
        .unwrap();
    timeout_after_1s(server).await;
    assert_eq!(ctl.settings().mode, Mode::Relay);

    // Credentials never go to another namespace than the agent's.
    let (client, _server) = mock_client();
    let mut elsewhere = options(Some(Mode::Istio));
    elsewhere.namespace = Some("other".into());
    let err = Controller::resolve(client, &elsewhere).await.err().unwrap();
    assert_eq!(
        err.to_string(),
        "the render options put the gateways and credentials in \"fedmesh\", but the agent runs \
         in \"other\"; set mesh_namespace: other"
    );
}

#[test]
fn the_veto_is_a_decision_of_the_receiving_node() {
    let collab = istio_collab();
    let decision = veto_decision("c", &Collab::node(), IN, None, collab.fx.now);
    assert_eq!(decision.verdict, fedmesh_documents::Verdict::Veto);
    assert_eq!(decision.by, Collab::node());
    assert_eq!(
        decision.reason.as_deref(),
        Some("vetoed by the node's sysadmin (PeerLink spec.veto)")
    );
    assert_eq!(decision.at, jws::unix(collab.fx.now));
}

/// A link with a budget: its PeerLink status shows the signed limits and what this node's relay
/// has used of them.
#[tokio::test]
async fn peerlink_status_shows_a_links_budget_and_what_the_relay_used() {
    let mut collab = Collab::new(&[]);
    let terms = collab
        .fx
        .terms("a/n1", "b/n1", &["11366:mpc"], Duration::from_secs(3600))
        .with_budget(Some(1_000_000), Some(4))
        .unwrap();
    let approval = collab.fx.approval(&terms);
    collab.ingest(&approval);
    let id = terms.id.clone();
    // The relay has carried 300 bytes on the link and holds one stream open.
    let budgets = Arc::new(crate::relay::Budgets::in_memory(Arc::new(
        crate::metrics::Metrics::default(),
    )));
    let grant = crate::relay::policy::Grant {
        link_id: id.clone(),
        label: Some("mpc".into()),
        not_after: terms.not_after,
        max_bytes: terms.max_bytes,
        max_streams: terms.max_streams,
    };
    let stream = budgets.open(&grant).unwrap().unwrap();
    assert_eq!(stream.budget().spend(300), 300);

    let (client, server) = mock_client();
    let ctl = Controller::new(client, settings(Mode::Relay)).with_budgets(budgets);
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "fm-c-b-n1-a9a6710d",
            "namespace": "fedmesh",
            "labels": {
                "app.kubernetes.io/managed-by": "fedmesh",
                "fedmesh.io/collaboration": "c",
                "fedmesh.io/peer": "b.n1",
                "fedmesh.io/direction": "outbound",
            },
            "annotations": {
                "fedmesh.io/purpose": "relay: algorithm pods reach b/n1 here, on its approved ports",
                "fedmesh.io/links": id,
                "fedmesh.io/approved-by": "owner@example.org",
                "fedmesh.io/expires": EXPIRES,
            },
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": "fedmesh-agent"},
            "ports": [{"name": "tcp-11366", "protocol": "TCP", "port": 11366, "targetPort": 24374}],
        },
    });
    let Call::ApplyStatus(path, mut status) = active(&id) else {
        unreachable!("active() is a status apply")
    };
    status["status"]["budget"] = json!({
        "maxBytes": 1_000_000,
        "bytesSpent": 300,
        "maxStreams": 4,
        "streamsActive": 1,
    });
    let (peerlink_path, peerlink_body) = peerlink(&id, "b/n1", "outbound", "11366:mpc");
    let server = server.run(calls([
        relay_lists(),
        vec![
            Call::Apply(
                "/api/v1/namespaces/fedmesh/services/fm-c-b-n1-a9a6710d".into(),
                service,
            ),
            Call::Apply(peerlink_path, peerlink_body),
            Call::ApplyStatus(path, status),
        ],
    ]));
    pass(&ctl, &collab, None, &Memory::default()).await;
    timeout_after_1s(server).await;
    drop(stream);
}
