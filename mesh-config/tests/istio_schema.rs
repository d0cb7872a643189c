//! Everything fedmesh renders validates strictly against Istio's CRD schemas, and deliberately
//! broken objects are refused with messages that name the path.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeSet, sync::OnceLock};

use common::{NODES, RENDEZVOUS_NODES, example, n, now, rendered, rendezvous_example, view};
use fedmesh_istio_schema::{Error, Schemas};
use fedmesh_mesh_config::{Credentials, RenderOptions, render};
use serde_json::{Value, json};

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| Schemas::istio().unwrap())
}

/// Every object of every node's render, with credentials, so the Secret is there too.
fn all_objects() -> Vec<Value> {
    let mut objects = Vec::new();
    for node in NODES {
        let mut v = view(node);
        v.credentials = Some(Credentials {
            cert_chain_pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\n...\n".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
        });
        let options = RenderOptions {
            sidecar_egress_namespaces: vec!["vantage6-node".into()],
            ..example().options
        };
        objects.extend(render(&v, &options, now()).unwrap().objects);
    }
    // A member without a gateway: links the agents carry, from both ends.
    let example = rendezvous_example();
    for node in RENDEZVOUS_NODES {
        let v = example.view(&n(node), now()).unwrap();
        objects.extend(render(&v, &example.options, now()).unwrap().objects);
    }
    objects
}

fn messages(object: &Value) -> Vec<String> {
    let violations = schemas().check(object).unwrap();
    violations.iter().map(ToString::to_string).collect()
}

fn first(kind: &str, namespace: &str) -> Value {
    rendered(&view("org-a/n1"))
        .objects
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["namespace"] == namespace)
        .unwrap()
}

#[test]
fn every_rendered_object_validates_strictly() {
    let objects = all_objects();
    schemas().validate_all(&objects).unwrap();
    let kinds: BTreeSet<(String, String)> = objects
        .iter()
        .map(|o| {
            (
                o["apiVersion"].as_str().unwrap().into(),
                o["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    let istio: Vec<&(String, String)> = kinds
        .iter()
        .filter(|(v, k)| schemas().knows(v, k))
        .collect();
    assert_eq!(istio.len(), 7, "{kinds:?}");
    for object in &objects {
        if schemas().knows(
            object["apiVersion"].as_str().unwrap(),
            object["kind"].as_str().unwrap(),
        ) {
            assert_eq!(messages(object), Vec::<String>::new(), "{object:#}");
        }
    }
    assert!(kinds.contains(&("v1".into(), "Secret".into())));
    assert!(kinds.contains(&("networking.k8s.io/v1".into(), "NetworkPolicy".into())));
}

#[test]
fn every_rule_of_rendered_kinds_is_supported() {
    for kind in [
        "ServiceEntry",
        "DestinationRule",
        "Gateway",
        "VirtualService",
        "Sidecar",
    ] {
        let unchecked = schemas().unsupported_rules("networking.istio.io/v1", kind);
        assert_eq!(unchecked, Vec::<String>::new(), "{kind}");
    }
    for kind in ["AuthorizationPolicy", "PeerAuthentication"] {
        let unchecked = schemas().unsupported_rules("security.istio.io/v1", kind);
        assert_eq!(unchecked, Vec::<String>::new(), "{kind}");
    }
    // Every rule of the whole bundle compiles (kinds fedmesh does not render included); a
    // newer bundle with a rule this CEL environment cannot run would be listed here.
    let unsupported: Vec<String> = schemas()
        .kinds()
        .flat_map(|(api_version, kind)| schemas().unsupported_rules(api_version, kind))
        .collect();
    assert_eq!(unsupported, Vec::<String>::new());
}

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let mut se = first("ServiceEntry", "fedmesh");
    se["spec"]["ports"][0]["bogus"] = json!(1);
    se["spec"]["colour"] = json!("blue");
    se["status"] = json!({"addresses": [{"value": "240.241.0.1", "host": "h"}]});
    assert_eq!(
        messages(&se),
        [
            "spec.colour: unknown field",
            "spec.ports[0].bogus: unknown field"
        ]
    );
    let err = schemas().validate(&se).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }));
    assert!(
        err.to_string()
            .starts_with("ServiceEntry fedmesh/fm-collab-x-out-org-b-n1-"),
        "{err}"
    );
}

#[test]
fn bad_enums_and_types_are_errors_with_their_path() {
    let mut se = first("ServiceEntry", "fedmesh");
    se["spec"]["location"] = json!("MESH_SOMEWHERE");
    se["spec"]["ports"][0]["number"] = json!("11366");
    assert_eq!(
        messages(&se),
        [
            r#"spec.location: "MESH_SOMEWHERE" is not one of "MESH_EXTERNAL" or "MESH_INTERNAL""#,
            r#"spec.ports[0].number: "11366" is not of type "integer""#,
            "spec.ports[0].number: port must be between 1-65535",
        ]
    );
}

#[test]
fn service_entry_rules_are_enforced() {
    let se = first("ServiceEntry", "fedmesh");
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut o = se.clone();
        f(&mut o);
        messages(&o)
    };
    assert_eq!(
        broken(&|o| o["spec"]["workloadSelector"] = json!({"labels": {"app": "x"}})),
        ["spec: only one of WorkloadSelector or Endpoints can be set"]
    );
    assert_eq!(
        broken(&|o| o["spec"]["resolution"] = json!("NONE")),
        ["spec: NONE mode cannot set endpoints"]
    );
    assert_eq!(
        broken(&|o| o["spec"]["addresses"] = json!(["240.241.0.0/24"])),
        ["spec: CIDR addresses are allowed only for NONE/STATIC resolution types"]
    );
    assert_eq!(
        broken(&|o| o["spec"]["hosts"][1] = json!("*")),
        ["spec.hosts[1]: hostname cannot be wildcard"]
    );
    assert_eq!(
        broken(&|o| {
            let port = o["spec"]["ports"][0].clone();
            o["spec"]["ports"].as_array_mut().unwrap().push(port);
        }),
        ["spec.ports: port number cannot be duplicated"]
    );
    assert_eq!(
        broken(&|o| o["spec"]["ports"][0]["number"] = json!(70000)),
        ["spec.ports[0].number: port must be between 1-65535"]
    );
    assert_eq!(
        broken(&|o| o["spec"]["endpoints"][0]["ports"] = json!({"tcp_mpc": 443})),
        ["spec.endpoints[0].ports: port name must be valid"]
    );
}

#[test]
fn security_and_gateway_rules_are_enforced() {
    let mut ap = first("AuthorizationPolicy", "vantage6-tasks");
    ap["spec"] = json!({
        "targetRef": {"kind": "Service", "group": "", "name": "x"},
        "selector": {"matchLabels": {"app": "x"}},
        "rules": [{"from": [{"source": {"serviceAccounts": ["ns/sa"], "principals": ["p"]}}]}],
    });
    assert_eq!(
        messages(&ap),
        [
            "spec: only one of targetRefs or selector can be set",
            "spec.rules[0].from[0].source: Cannot set serviceAccounts with namespaces or principals",
        ]
    );

    let mut pa = first("PeerAuthentication", "vantage6-tasks");
    pa["spec"]["portLevelMtls"] = json!({"11366": {"mode": "DISABLE"}});
    assert_eq!(messages(&pa), ["spec: portLevelMtls requires selector"]);

    let gateways = rendered(&view("org-a/n1")).objects;
    let mut gw = gateways
        .into_iter()
        .find(|o| o["kind"] == "Gateway" && o["spec"]["servers"][0]["tls"]["mode"] == "MUTUAL")
        .unwrap();
    gw["spec"]["servers"][0]["tls"]["credentialNames"] = json!(["a", "b"]);
    assert_eq!(
        messages(&gw),
        ["spec.servers[0].tls: only one of credentialName or credentialNames can be set"]
    );

    let mut dr = first("DestinationRule", "fedmesh");
    dr["spec"]["trafficPolicy"]["connectionPool"] = json!({"tcp": {"connectTimeout": "500us"}});
    assert_eq!(
        messages(&dr),
        [
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout: must be a valid duration greater than 1ms"
        ]
    );
}

#[test]
fn metadata_is_checked_for_every_kind() {
    let mut np = first("NetworkPolicy", "vantage6-tasks");
    np["metadata"]["labels"]["fedmesh.io/peer"] = json!("org-a/n1");
    let err = schemas().validate_all([&np]).unwrap_err().to_string();
    assert!(
        err.contains("metadata.labels.fedmesh.io/peer: value \"org-a/n1\" must be at most 63"),
        "{err}"
    );
    let unknown =
        json!({"apiVersion": "example.io/v1", "kind": "Thing", "metadata": {"name": "x"}});
    let err = schemas().validate_all([&unknown]).unwrap_err();
    assert_eq!(err.to_string(), "no schema for example.io/v1 Thing");
}
