//! The Helm charts (`charts/fedmesh-agent`, `charts/fedmesh-hub`), checked offline: `helm lint
//! --strict`, `helm template`, the rendered objects validated against Kubernetes 1.30's schemas
//! (`kubernetes-validate --strict`), Istio objects against Istio's CRD schemas (fedmesh-istio-schema),
//! the agent's RBAC against a literal table, its pod's lock-down, and its arguments against the
//! `fedmesh` command line.
//!
//! helm comes from `<repo>/.tools/bin/helm` and kubernetes-validate from `<repo>/.venv/bin/`;
//! `scripts/test-deps` installs both.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use clap::Parser;
use fedmesh_istio_schema::Schemas;
use fedmesh_mesh_config::RenderOptions;
use serde_json::{Value, json};

const ADVERTISE: &str = "advertise=relay.hospital-a.example:4433";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(path: &str) -> PathBuf {
    let tool = repo().join(path);
    assert!(
        tool.exists(),
        "{} is missing: run scripts/test-deps to install helm and kubernetes-validate",
        tool.display()
    );
    tool
}

fn run(mut command: Command, stdin: Option<&str>) -> String {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{shown} failed:\n{stdout}\n{stderr}");
    stdout
}

fn helm(args: &[&str]) -> String {
    let mut command = Command::new(tool(".tools/bin/helm"));
    command.args(args).current_dir(repo());
    run(command, None)
}

/// `helm template` of a chart with `--set` values, as YAML.
fn template(chart: &str, sets: &[&str]) -> String {
    let mut args = vec![
        "template",
        "r",
        chart,
        "--namespace",
        "fedmesh",
        "--include-crds",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args)
}

/// The documents of a YAML stream (comment-only documents left out).
fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// Validates Kubernetes objects offline (kinds without a schema, such as Istio's, are skipped
/// and checked by [`validate_istio`]).
fn validate_kubernetes(yaml: &str) {
    let mut command = Command::new(tool(".venv/bin/kubernetes-validate"));
    command.args(["--strict", "-k", "1.30.0", "-"]);
    let out = run(command, Some(yaml));
    assert!(!out.contains("ERROR"), "{out}");
}

/// Validates Istio objects with Istio's CRD schemas; returns their kinds.
fn validate_istio(docs: &[Value]) -> Vec<String> {
    let schemas = Schemas::istio().unwrap();
    docs.iter()
        .filter(|d| d["apiVersion"].as_str().unwrap_or("").contains("istio.io"))
        .map(|d| {
            schemas.validate(d).unwrap();
            d["kind"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Every value set the tests render the agent chart with.
fn agent_value_sets() -> Vec<Vec<&'static str>> {
    vec![
        vec![ADVERTISE],
        vec![
            ADVERTISE,
            "mode=relay",
            "state.persistence=false",
            "relay.streamsOver=auto",
            "relay.linkBandwidthMbps=200",
            "relay.linkRtt=40ms",
        ],
        vec![
            ADVERTISE,
            "mode=istio",
            "istio.gateways.enabled=true",
            "istio.hubServiceEntry.enabled=true",
            "enrollment.joinTokenSecret=fedmesh-join",
            "dns.enabled=true",
            "exposes={11366:mpc=fedmesh-mpc.vantage6-tasks.svc:11366}",
        ],
        vec!["mode=istio", "outboundOnly=true"],
        vec![
            ADVERTISE,
            "vantage6.enabled=true",
            "vantage6.apiPath=/api",
            "dns.enabled=true",
        ],
    ]
}

#[test]
fn charts_lint_strictly() {
    let out = helm(&[
        "lint",
        "--strict",
        "charts/fedmesh-agent",
        "--set",
        ADVERTISE,
    ]);
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
    let out = helm(&["lint", "--strict", "charts/fedmesh-hub"]);
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
}

#[test]
fn the_agent_chart_needs_an_advertised_address() {
    let mut command = Command::new(tool(".tools/bin/helm"));
    command
        .args(["template", "r", "charts/fedmesh-agent"])
        .current_dir(repo());
    let out = command.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set advertise to the host:port"));
}

#[test]
fn agent_chart_renders_valid_objects() {
    for sets in agent_value_sets() {
        let yaml = template("charts/fedmesh-agent", &sets);
        validate_kubernetes(&yaml);
        let docs = documents(&yaml);
        let istio = validate_istio(&docs);
        let expected: &[&str] = if sets.contains(&"istio.hubServiceEntry.enabled=true") {
            &["ServiceEntry"]
        } else {
            &[]
        };
        assert_eq!(istio, expected, "{sets:?}");
        // The CRD is the committed, generated one.
        let crd = find(&docs, "CustomResourceDefinition", "peerlinks.fedmesh.io");
        let committed: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(
                repo().join("charts/fedmesh-agent/crds/peerlinks.fedmesh.io.yaml"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(crd, &committed);
    }
}

#[test]
fn hub_chart_renders_valid_objects() {
    let yaml = template("charts/fedmesh-hub", &["names={hub.example.org,192.0.2.1}"]);
    validate_kubernetes(&yaml);
    let docs = documents(&yaml);
    let hub = find(&docs, "Deployment", "r-fedmesh-hub");
    let args = &hub["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(
        args,
        &json!([
            "hub",
            "--listen=0.0.0.0:8443",
            "--data=/var/lib/fedmesh-hub/data",
            "--init",
            "--name=hub.example.org",
            "--name=192.0.2.1"
        ])
    );
    let argv: Vec<String> = std::iter::once("fedmesh".to_owned())
        .chain(
            args.as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        )
        .collect();
    fedmesh_agent::cli::Cli::try_parse_from(argv).unwrap();
    assert_eq!(
        find(&docs, "ServiceAccount", "r-fedmesh-hub")["automountServiceAccountToken"],
        false
    );
}

#[test]
fn hub_chart_renders_rendezvous_replicas() {
    let pin = "a".repeat(64);
    let hub_pin = format!("rendezvous.hubPin={pin}");
    let sets = [
        "rendezvous.enabled=true",
        "rendezvous.replicas=3",
        "rendezvous.collab=collab-x",
        "rendezvous.ownerPin=owner-thumbprint",
        hub_pin.as_str(),
        "rendezvous.certificateSecret=rv-cert",
    ];
    let out = helm(&[
        "lint",
        "--strict",
        "charts/fedmesh-hub",
        "--set",
        &sets.join(","),
    ]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let yaml = template("charts/fedmesh-hub", &sets);
    validate_kubernetes(&yaml);
    let docs = documents(&yaml);
    let rv = find(&docs, "Deployment", "r-fedmesh-hub-rendezvous");
    assert_eq!(rv["spec"]["replicas"], 3);
    let pod = &rv["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = &container["args"];
    assert_eq!(
        args,
        &json!([
            "rendezvous",
            "--listen=0.0.0.0:4433",
            "--http=0.0.0.0:9443",
            "--dir=/etc/fedmesh-rendezvous",
            "--hub=https://r-fedmesh-hub.fedmesh.svc:8443",
            format!("--hub-pin={pin}"),
            "--collab=collab-x",
            "--owner-pin=owner-thumbprint",
            "--mesh-listen=0.0.0.0:8444",
            "--peer=r-fedmesh-hub-rendezvous-mesh.fedmesh.svc:8444",
            "--rate-per-node=67108864"
        ])
    );
    let argv: Vec<String> = std::iter::once("fedmesh".to_owned())
        .chain(
            args.as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        )
        .collect();
    fedmesh_agent::cli::Cli::try_parse_from(argv).unwrap();
    // Least privilege: no API token, non-root, read-only root, no capabilities, the
    // certificate read-only and readable by the group only.
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["volumeMounts"][0]["readOnly"], true);
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "rv-cert");
    assert_eq!(pod["volumes"][0]["secret"]["defaultMode"], 288);
    // The mesh is found through a headless Service; nodes reach the replicas over UDP, or TCP on
    // the same port (the TLS/TCP carrier); the hub's Service does not select rendezvous pods.
    let mesh = find(&docs, "Service", "r-fedmesh-hub-rendezvous-mesh");
    assert_eq!(mesh["spec"]["clusterIP"], "None");
    assert_eq!(mesh["spec"]["ports"][0]["protocol"], "UDP");
    let nodes = find(&docs, "Service", "r-fedmesh-hub-rendezvous");
    assert_eq!(
        nodes["spec"]["ports"][0],
        json!({"name": "quic", "protocol": "UDP", "port": 443, "targetPort": "quic"})
    );
    assert_eq!(
        nodes["spec"]["ports"][1],
        json!({"name": "tls", "protocol": "TCP", "port": 443, "targetPort": "tls"})
    );
    let tls_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tls")
        .expect("a tls container port");
    assert_eq!(tls_port["containerPort"], 4433);
    assert_eq!(tls_port["protocol"], "TCP");
    let hub_selector = &find(&docs, "Service", "r-fedmesh-hub")["spec"]["selector"];
    let pod_labels = &rv["spec"]["template"]["metadata"]["labels"];
    assert_ne!(
        hub_selector["app.kubernetes.io/name"],
        pod_labels["app.kubernetes.io/name"]
    );
    // Off by default; on, it needs what it cannot guess.
    let off = documents(&template("charts/fedmesh-hub", &[]));
    assert!(
        !off.iter()
            .any(|d| d["metadata"]["name"] == "r-fedmesh-hub-rendezvous")
    );
    let mut command = Command::new(tool(".tools/bin/helm"));
    command
        .args([
            "template",
            "r",
            "charts/fedmesh-hub",
            "--set",
            "rendezvous.enabled=true",
        ])
        .current_dir(repo());
    let out = command.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set rendezvous."));
}

/// Every (role kind, namespace, API group, resource) and its verbs, from the rendered Roles
/// and ClusterRoles.
fn permissions(docs: &[Value]) -> BTreeSet<(String, String, String, String)> {
    let mut table = BTreeSet::new();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or("");
        if kind != "Role" && kind != "ClusterRole" {
            continue;
        }
        let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("*cluster*");
        for rule in doc["rules"].as_array().unwrap() {
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let verbs = verbs.join(",");
            let groups = rule["apiGroups"].as_array().cloned().unwrap_or_default();
            let targets = rule["resources"]
                .as_array()
                .or(rule["nonResourceURLs"].as_array())
                .unwrap();
            for target in targets {
                let target = target.as_str().unwrap();
                let group_names: Vec<&str> = if groups.is_empty() {
                    vec!["-"]
                } else {
                    groups.iter().map(|g| g.as_str().unwrap()).collect()
                };
                for group in group_names {
                    table.insert((
                        format!("{kind} {namespace}"),
                        group.to_owned(),
                        target.to_owned(),
                        verbs.clone(),
                    ));
                }
            }
        }
    }
    table
}

fn table(rows: &[(&str, &str, &str, &str)]) -> BTreeSet<(String, String, String, String)> {
    rows.iter()
        .map(|(a, b, c, d)| ((*a).into(), (*b).into(), (*c).into(), (*d).into()))
        .collect()
}

const WRITE: &str = "create,delete,list,patch";
const WRITE_AND_WATCH: &str = "create,delete,list,patch,watch";

#[test]
fn rbac_is_exactly_what_the_agent_writes() {
    let auto = documents(&template("charts/fedmesh-agent", &[ADVERTISE]));
    assert_eq!(
        permissions(&auto),
        table(&[
            ("Role fedmesh", "", "secrets", WRITE),
            ("Role fedmesh", "", "services", WRITE),
            ("Role fedmesh", "fedmesh.io", "peerlinks", WRITE_AND_WATCH),
            ("Role fedmesh", "fedmesh.io", "peerlinks/status", "patch"),
            (
                "Role fedmesh",
                "networking.istio.io",
                "destinationrules",
                WRITE
            ),
            ("Role fedmesh", "networking.istio.io", "gateways", WRITE),
            (
                "Role fedmesh",
                "networking.istio.io",
                "serviceentries",
                WRITE
            ),
            (
                "Role fedmesh",
                "networking.istio.io",
                "virtualservices",
                WRITE
            ),
            (
                "Role fedmesh",
                "security.istio.io",
                "authorizationpolicies",
                WRITE
            ),
            (
                "Role vantage6-tasks",
                "networking.istio.io",
                "sidecars",
                WRITE
            ),
            (
                "Role vantage6-tasks",
                "networking.k8s.io",
                "networkpolicies",
                WRITE
            ),
            (
                "Role vantage6-tasks",
                "security.istio.io",
                "authorizationpolicies",
                WRITE
            ),
            (
                "Role vantage6-tasks",
                "security.istio.io",
                "peerauthentications",
                WRITE
            ),
            ("ClusterRole *cluster*", "-", "/apis", "get"),
        ])
    );
    let relay = documents(&template(
        "charts/fedmesh-agent",
        &[ADVERTISE, "mode=relay"],
    ));
    assert_eq!(
        permissions(&relay),
        table(&[
            ("Role fedmesh", "", "services", WRITE),
            ("Role fedmesh", "fedmesh.io", "peerlinks", WRITE_AND_WATCH),
            ("Role fedmesh", "fedmesh.io", "peerlinks/status", "patch"),
        ])
    );
    for docs in [&auto, &relay] {
        let text = serde_json::to_string(docs).unwrap();
        assert!(!text.contains("\"*\""), "no wildcards anywhere");
        assert!(!text.contains("cluster-admin"));
        // Every binding names the agent's ServiceAccount and a role of this chart.
        for binding in docs
            .iter()
            .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
        {
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": "r-fedmesh-agent", "namespace": "fedmesh"}])
            );
            assert!(docs.iter().any(|r| r["kind"] == binding["roleRef"]["kind"]
                && r["metadata"]["name"] == binding["roleRef"]["name"]));
        }
    }
}

/// With the vantage6 address API on, the agent reads exactly pods and jobs in the task
/// namespace, and its NetworkPolicies select only algorithm pods by `role` there.
#[test]
fn vantage6_runs_are_read_only_and_policies_select_roles() {
    let off = documents(&template(
        "charts/fedmesh-agent",
        &[ADVERTISE, "mode=relay"],
    ));
    let on = documents(&template(
        "charts/fedmesh-agent",
        &[
            ADVERTISE,
            "mode=relay",
            "vantage6.enabled=true",
            "vantage6.taskNamespace=v6-tasks",
        ],
    ));
    let added: BTreeSet<_> = permissions(&on)
        .difference(&permissions(&off))
        .cloned()
        .collect();
    assert_eq!(
        added,
        table(&[
            ("Role v6-tasks", "", "pods", "get,list,watch"),
            ("Role v6-tasks", "batch", "jobs", "get,list,watch"),
        ])
    );
    assert!(off.iter().all(|d| d["kind"] != "NetworkPolicy"));
    let egress = find(&on, "NetworkPolicy", "r-fedmesh-agent-v6-egress");
    assert_eq!(egress["metadata"]["namespace"], "v6-tasks");
    let roles = json!([{"key": "role", "operator": "In",
                        "values": ["central_compute", "federated_compute"]}]);
    assert_eq!(egress["spec"]["podSelector"]["matchExpressions"], roles);
    assert_eq!(egress["spec"]["policyTypes"], json!(["Egress"]));
    assert_eq!(
        egress["spec"]["egress"],
        json!([{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fedmesh"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "fedmesh-agent",
                                                         "app.kubernetes.io/instance": "r"}}}],
                "ports": [{"port": 7655, "protocol": "TCP"}]}])
    );
    let ingress = find(&on, "NetworkPolicy", "r-fedmesh-agent-v6-ingress");
    let rules = ingress["spec"]["ingress"].as_array().unwrap();
    // The address API port only from the algorithm pods; every other rule leaves it out.
    assert_eq!(
        rules[0]["from"][0]["podSelector"]["matchExpressions"],
        roles
    );
    assert_eq!(
        rules[0]["ports"],
        json!([{"port": 7655, "protocol": "TCP"}])
    );
    for rule in &rules[1..] {
        assert!(
            rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["port"] != 7655)
        );
    }
    let agent =
        &find(&on, "Deployment", "r-fedmesh-agent")["spec"]["template"]["spec"]["containers"][0];
    let argv = argv(agent);
    assert!(
        argv.contains(&"--v6-listen=0.0.0.0:7655".to_owned()),
        "{argv:?}"
    );
    assert!(
        argv.contains(&"--v6-task-namespace=v6-tasks".to_owned()),
        "{argv:?}"
    );
    let service = find(&on, "Service", "r-fedmesh-agent-v6");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "v6");
}

/// Each mode's Roles grant exactly what its mesh backend says it writes (plus the PeerLinks
/// every mode writes): the RBAC rows sit beside the backends, and the chart follows them.
#[test]
fn each_backend_s_kinds_are_its_rbac() {
    use fedmesh_agent::k8s::{
        Mode,
        backend::{self, VERBS},
        resources::Place,
    };
    for mode in Mode::ALL {
        let docs = documents(&template(
            "charts/fedmesh-agent",
            &[ADVERTISE, &format!("mode={mode}")],
        ));
        let mut expected = table(&[
            ("Role fedmesh", "fedmesh.io", "peerlinks", WRITE_AND_WATCH),
            ("Role fedmesh", "fedmesh.io", "peerlinks/status", "patch"),
        ]);
        for rule in backend::rules(mode) {
            let namespace = match rule.place {
                Place::Agent => "fedmesh",
                Place::Algorithm => "vantage6-tasks",
            };
            for resource in &rule.resources {
                expected.insert((
                    format!("Role {namespace}"),
                    rule.group.to_owned(),
                    (*resource).to_owned(),
                    VERBS.join(","),
                ));
            }
        }
        assert_eq!(permissions(&docs), expected, "{mode}");
    }
}

#[test]
fn the_agent_pod_is_locked_down() {
    let docs = documents(&template("charts/fedmesh-agent", &[ADVERTISE]));
    let pod = &find(&docs, "Deployment", "r-fedmesh-agent")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let agent = &pod["containers"][0];
    assert_eq!(
        agent["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    for key in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                agent["resources"][key][resource].is_string(),
                "{key}.{resource}"
            );
        }
    }
    assert_eq!(
        agent["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "admin"})
    );
    assert_eq!(
        agent["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin"})
    );
    assert_eq!(
        agent["ports"],
        json!([
            {"name": "relay", "containerPort": 4433, "protocol": "UDP"},
            {"name": "admin", "containerPort": 9464, "protocol": "TCP"},
        ])
    );
    assert_eq!(
        pod["volumes"][0],
        json!({"name": "state", "persistentVolumeClaim": {"claimName": "r-fedmesh-agent-state"}})
    );
    let relay = find(&docs, "Service", "r-fedmesh-agent-relay");
    assert_eq!(
        relay["spec"]["ports"],
        json!([{"name": "relay", "protocol": "UDP", "port": 4433, "targetPort": "relay"}])
    );
}

/// The container's arguments, plus its `FEDMESH_*` settings as the flags they stand for.
fn argv(container: &Value) -> Vec<String> {
    let flag = |env: &str| match env {
        "FEDMESH_STATE" => Some("--state"),
        "FEDMESH_MODE" => Some("--mode"),
        "FEDMESH_RENDER_OPTIONS" => Some("--render-options"),
        "FEDMESH_POD_SELECTOR" => Some("--pod-selector"),
        "FEDMESH_POD_PORTS" => Some("--pod-ports"),
        "FEDMESH_RESYNC" => Some("--resync"),
        "FEDMESH_LOG" => Some("--log"),
        "FEDMESH_LOG_FORMAT" => Some("--log-format"),
        "FEDMESH_V6_TASK_NAMESPACE" => Some("--v6-task-namespace"),
        _ => None,
    };
    let mut argv = vec!["fedmesh".to_owned()];
    argv.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    for env in container["env"].as_array().unwrap() {
        if let (Some(flag), Some(value)) =
            (flag(env["name"].as_str().unwrap()), env["value"].as_str())
        {
            argv.push(format!("{flag}={value}"));
        }
    }
    argv
}

#[test]
fn the_agent_is_configured_with_flags_it_has() {
    for sets in agent_value_sets() {
        let docs = documents(&template("charts/fedmesh-agent", &sets));
        let agent = &find(&docs, "Deployment", "r-fedmesh-agent")["spec"]["template"]["spec"]["containers"]
            [0];
        let argv = argv(agent);
        fedmesh_agent::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let audit = ["fedmesh", "audit"].into_iter().map(str::to_owned).chain(
            argv.iter()
                .filter(|a| {
                    [
                        "--state",
                        "--mode",
                        "--render-options",
                        "--pod-selector",
                        "--pod-ports",
                    ]
                    .iter()
                    .any(|f| a.starts_with(&format!("{f}=")))
                })
                .cloned(),
        );
        fedmesh_agent::cli::Cli::try_parse_from(audit).unwrap();
        // The render options parse, and put credentials in the agent's namespace.
        let config = find(&docs, "ConfigMap", "r-fedmesh-agent");
        let options: RenderOptions =
            serde_saphyr::from_str(config["data"]["render-options.yaml"].as_str().unwrap())
                .unwrap();
        options.validate().unwrap();
        assert_eq!(options.mesh_namespace, "fedmesh");
        assert!(
            argv.contains(
                &"--pod-selector=app.kubernetes.io/instance=r,app.kubernetes.io/name=fedmesh-agent"
                    .to_owned()
            )
        );
    }
}

#[test]
fn streams_over_tls_opens_the_relay_port_for_tcp_too() {
    for (mode, tcp) in [("quic", false), ("tls", true), ("auto", true)] {
        let set = format!("relay.streamsOver={mode}");
        let docs = documents(&template("charts/fedmesh-agent", &[ADVERTISE, &set]));
        let service = find(&docs, "Service", "r-fedmesh-agent-relay");
        let protocols: Vec<&str> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["protocol"].as_str().unwrap())
            .collect();
        let expected: &[&str] = if tcp { &["UDP", "TCP"] } else { &["UDP"] };
        assert_eq!(protocols, expected, "{mode}");
        let agent = &find(&docs, "Deployment", "r-fedmesh-agent")["spec"]["template"]["spec"]["containers"]
            [0];
        let flag = format!("--streams-over={mode}");
        assert_eq!(argv(agent).contains(&flag), tcp, "{mode}");
    }
}

#[test]
fn the_expected_path_reaches_the_agent_only_when_set() {
    let agent_args = |sets: &[&str]| {
        let docs = documents(&template("charts/fedmesh-agent", sets));
        let deployment = find(&docs, "Deployment", "r-fedmesh-agent");
        argv(&deployment["spec"]["template"]["spec"]["containers"][0])
    };
    let set = agent_args(&[
        ADVERTISE,
        "relay.linkBandwidthMbps=200",
        "relay.linkRtt=40ms",
    ]);
    assert!(set.contains(&"--link-bandwidth=200".to_owned()), "{set:?}");
    assert!(set.contains(&"--link-rtt=40ms".to_owned()), "{set:?}");
    let unset = agent_args(&[ADVERTISE]);
    assert!(
        !unset.iter().any(|a| a.starts_with("--link-")),
        "the agent's defaults: {unset:?}"
    );
}

#[test]
fn every_value_is_documented() {
    for chart in ["charts/fedmesh-agent", "charts/fedmesh-hub"] {
        let values = std::fs::read_to_string(repo().join(chart).join("values.yaml")).unwrap();
        let mut previous = "";
        for line in values.lines() {
            let trimmed = line.trim_start();
            let is_key = trimmed
                .split_once(':')
                .is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_alphanumeric()));
            if is_key && !trimmed.starts_with('#') && !trimmed.starts_with('-') {
                assert!(
                    previous.trim_start().starts_with('#'),
                    "{chart}/values.yaml: {trimmed:?} has no comment above it"
                );
            }
            previous = line;
        }
    }
}
