//! The command line's contract, through the real `fedmesh` binary: every command that prints
//! state takes `--output text|json|yaml` (the three say the same thing), and the exit status
//! is 0 on success, 1 when a difference was found, 2 on an error, with the error in one line,
//! each cause once. Where a new user is stuck, the error says what to do next. Logs honour
//! `RUST_LOG` and come as JSON with `--log-format json`.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use fedmesh_agent::owner::{NewCollab, Owner};
use fedmesh_documents::CollabPolicy;
use fedmesh_tests::{TestHub, fedmesh_bin, fedmesh_exit, fedmesh_ok as ok, repo_root};
use serde_json::Value;

/// Runs `args` with each `--output` and checks the three agree; returns the JSON.
fn outputs_agree(dir: &Path, args: &[&str], expect: i32) -> (String, Value) {
    let run = |format: &str| {
        let mut all = args.to_vec();
        all.extend(["--output", format]);
        let (code, stdout, stderr) = fedmesh_exit(dir, &all);
        assert_eq!(code, expect, "{all:?}: {stderr}");
        stdout
    };
    let text = run("text");
    let json: Value = serde_json::from_str(&run("json")).expect("--output json is JSON");
    let yaml: Value = serde_saphyr::from_str(&run("yaml")).expect("--output yaml is YAML");
    assert_eq!(yaml, json, "{args:?}: YAML and JSON say the same");
    assert_ne!(text.trim(), "", "{args:?}: text says something");
    (text, json)
}

/// An error exits 2 with one line on stderr, starting `error: `, each cause in it once.
fn fails(dir: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = fedmesh_exit(dir, args);
    assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
    let line = stderr.trim();
    assert_eq!(line.lines().count(), 1, "{args:?}: {stderr}");
    assert!(line.starts_with("error: "), "{line}");
    line.to_owned()
}

fn issue(dir: &Path) {
    ok(dir, &["ca", "init", "--collab", "c", "--ca-dir", "ca"]);
    ok(
        dir,
        &[
            "csr", "--collab", "c", "--org", "a", "--node", "n1", "--key", "k.pem", "--out",
            "n1.csr",
        ],
    );
    ok(
        dir,
        &[
            "ca", "sign", "--ca-dir", "ca", "--csr", "n1.csr", "--out", "n1.pem",
        ],
    );
}

#[test]
fn cert_inspect_outputs_and_exit_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    issue(dir);
    let (text, json) = outputs_agree(dir, &["cert", "inspect", "n1.pem", "--ca", "ca/ca.pem"], 0);
    assert!(text.contains("spiffe://c.fedmesh/org/a/node/n1"), "{text}");
    assert_eq!(json["verification"]["ok"], true);

    // A certificate that does not verify is a finding (1), not an error (2).
    ok(dir, &["ca", "init", "--collab", "c", "--ca-dir", "other"]);
    let (_, json) = outputs_agree(
        dir,
        &["cert", "inspect", "n1.pem", "--ca", "other/ca.pem"],
        1,
    );
    assert_eq!(json["verification"]["ok"], false);
    let (_, _, stderr) = fedmesh_exit(dir, &["cert", "inspect", "n1.pem", "--ca", "other/ca.pem"]);
    assert!(
        stderr.trim().starts_with("verification failed: ") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );

    // A missing file is an error, its cause said once.
    let line = fails(dir, &["cert", "inspect", "missing.pem"]);
    assert_eq!(
        line.matches("No such file or directory").count(),
        1,
        "{line}"
    );
    assert!(line.contains("missing.pem"), "{line}");
}

#[test]
fn render_outputs_and_exit_statuses() {
    let dir = repo_root();
    let args = [
        "render",
        "--collab-file",
        "examples/collab-three-orgs.yaml",
        "--node",
        "org-b/n1",
        "--now",
        "2030-01-01T00:00:00Z",
    ];
    let golden = std::fs::read_to_string(dir.join("mesh-config/tests/golden/org-b.yaml")).unwrap();
    let text = ok(&dir, &args);
    assert!(
        text == golden,
        "the default output is the golden YAML stream"
    );
    let mut yaml = args.to_vec();
    yaml.extend(["--output", "yaml"]);
    assert!(ok(&dir, &yaml) == golden);
    let mut json = args.to_vec();
    json.extend(["--output", "json"]);
    let objects: Vec<Value> = serde_json::from_str(&ok(&dir, &json)).unwrap();
    let streamed: Vec<Value> = serde_saphyr::from_multiple(&golden).unwrap();
    assert_eq!(
        objects,
        streamed
            .into_iter()
            .filter(|o| !o.is_null())
            .collect::<Vec<_>>()
    );

    let line = fails(
        &dir,
        &["render", "--collab-file", "missing.yaml", "--node", "a/n1"],
    );
    assert!(line.contains("missing.yaml"), "{line}");
}

#[test]
fn node_peers_outputs_and_hints() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let s = state.to_str().unwrap();

    // Not enrolled: say how to enroll.
    let line = fails(tmp.path(), &["node", "peers", "--state", s]);
    assert!(line.contains("fedmesh node enroll"), "{line}");

    // Enrolled, but the agent has not run: say how to start it.
    std::fs::write(state.join("node.json"), "{}").unwrap();
    let line = fails(tmp.path(), &["node", "peers", "--state", s]);
    assert!(
        line.contains(&format!("fedmesh node --state {s}")),
        "{line}"
    );

    let map = r#"{"n1.b.c.fedmesh": ["127.77.1.2:11366"], "b.c.fedmesh": ["127.77.1.2:11366"]}"#;
    std::fs::write(state.join("peers.json"), map).unwrap();
    let (text, json) = outputs_agree(tmp.path(), &["node", "peers", "--state", s], 0);
    assert_eq!(json, serde_json::from_str::<Value>(map).unwrap());
    assert_eq!(
        text,
        "PEER NAME       ADDRESS\nb.c.fedmesh     127.77.1.2:11366\nn1.b.c.fedmesh  127.77.1.2:11366\n"
    );
}

#[test]
fn audit_without_a_cluster_is_an_error_and_takes_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    fails(tmp.path(), &["audit", "--state", "nowhere"]);
    let (code, help, _) = fedmesh_exit(tmp.path(), &["audit", "--help"]);
    assert_eq!(code, 0);
    for format in ["text", "json", "yaml"] {
        assert!(help.contains(format), "{help}");
    }
}

#[test]
fn usage_errors_exit_2_and_help_documents_the_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, stderr) = fedmesh_exit(tmp.path(), &["cert", "inspect", "--output", "xml", "x"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, help, _) = fedmesh_exit(tmp.path(), &["--help"]);
    assert_eq!(code, 0);
    assert!(
        help.contains("Exit status:") && help.contains("1  a difference"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_list_outputs_and_an_offline_ca_hint() {
    fedmesh_tests::subscribe();
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner_dir = tmp.path().join("owner");
    let mut owner = Owner::create(
        &owner_dir,
        hub.address(),
        NewCollab {
            id: "c".into(),
            owner_name: "owner".into(),
            online_ca: false,
            policy: CollabPolicy::default(),
        },
    )
    .await
    .unwrap();
    let token = owner
        .join_token(&"a/n1".parse().unwrap(), None, Duration::from_secs(600))
        .await
        .unwrap()
        .encode();
    owner
        .join_token(&"b/n1".parse().unwrap(), None, Duration::from_secs(600))
        .await
        .unwrap();
    let dir = tmp.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let o = dir.join("owner");
        let o = o.to_str().unwrap();
        ok(
            &dir,
            &[
                "link",
                "request",
                "--owner-dir",
                o,
                "--from",
                "a/n1",
                "--to",
                "b/n1",
                "--port",
                "11366:mpc",
            ],
        );
        let (text, json) = outputs_agree(&dir, &["link", "list", "--owner-dir", o], 0);
        assert!(text.starts_with("ID "), "{text}");
        assert_eq!(json[0]["terms"]["ports"][0]["port"], 11366);

        // The CA is offline: enrolling without a certificate says how to get one signed.
        let state = dir.join("a");
        let token_file = dir.join("a.token");
        std::fs::write(&token_file, &token).unwrap();
        let line = fails(
            &dir,
            &[
                "node",
                "enroll",
                "--token-file",
                token_file.to_str().unwrap(),
                "--state",
                state.to_str().unwrap(),
            ],
        );
        for step in ["fedmesh csr", "fedmesh ca sign", "--cert"] {
            assert!(line.contains(step), "{line}");
        }
        assert!(
            state.join("node-key.pem").exists(),
            "the key the CSR is for"
        );
    })
    .await
    .unwrap();
}

#[test]
fn logs_honour_rust_log_and_come_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = |rust_log: &str| {
        Command::new(fedmesh_bin())
            .args([
                "--log-format",
                "json",
                "hub",
                "--init",
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(tmp.path().join("hub"))
            .env("RUST_LOG", rust_log)
            .env_remove("FEDMESH_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut info = hub("info");
    let mut lines = BufReader::new(info.stderr.take().unwrap()).lines();
    let started = loop {
        let line = lines.next().expect("a log line").unwrap();
        let log: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        // RUST_LOG=info: nothing below INFO (a new hub's first start warns about its pin).
        assert!(
            ["INFO", "WARN"].contains(&log["level"].as_str().unwrap_or_default()),
            "{line}"
        );
        if log["message"] == "hub started" {
            break log;
        }
    };
    info.kill().unwrap();
    info.wait().unwrap();
    assert!(
        started["addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{started}"
    );

    // At RUST_LOG=warn the same start says nothing on stderr.
    let mut warn = hub("warn");
    let mut stdout = BufReader::new(warn.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("hub listening"), "{first}");
    std::thread::sleep(Duration::from_millis(300));
    warn.kill().unwrap();
    let out = warn.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("hub started"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_policy_signs_replaces_and_withdraws() {
    fedmesh_tests::subscribe();
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    Owner::create(
        &tmp.path().join("owner"),
        hub.address(),
        NewCollab {
            id: "c".into(),
            owner_name: "owner".into(),
            online_ca: false,
            policy: CollabPolicy::default(),
        },
    )
    .await
    .unwrap();
    let dir = tmp.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let image = format!("sha256:{}", "ab".repeat(32));
        let sign = |extra: &[&str]| {
            let mut args = vec![
                "collab",
                "link-policy",
                "--dir",
                "owner",
                "--name",
                "mpc",
                "--image",
                &image,
                "--port",
                "11365:mpc",
                "--org",
                "a",
                "--org",
                "b",
                "--org",
                "c",
            ];
            args.extend(extra);
            args.iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<String>>()
        };
        let args = sign(&["--lifetime", "2h", "--output", "json"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let json: Value = serde_json::from_str(&ok(&dir, &args)).unwrap();
        assert_eq!(json["name"], "mpc");
        assert_eq!(json["max_lifetime_secs"], 7200);
        assert_eq!(
            json["ports"],
            serde_json::json!([{"port": 11365, "label": "mpc"}])
        );
        let args = sign(&["--not-after", "2099-01-01T00:00:00Z"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = ok(&dir, &args);
        assert!(
            text.contains("link policy mpc: 1 image(s), ports 11365:mpc, organisations a,b,c")
                && text.contains("2099-01-01"),
            "{text}"
        );
        let json: Value = serde_json::from_str(&ok(
            &dir,
            &[
                "collab",
                "link-policy",
                "--dir",
                "owner",
                "--name",
                "mpc",
                "--withdraw",
                "--output",
                "json",
            ],
        ))
        .unwrap();
        assert!(
            json["not_after"].as_u64() < json["issued_at"].as_u64(),
            "{json}"
        );
        let line = fails(
            &dir,
            &[
                "collab",
                "link-policy",
                "--dir",
                "owner",
                "--name",
                "x",
                "--image",
                "latest",
                "--port",
                "1",
                "--org",
                "a",
                "--org",
                "b",
            ],
        );
        assert!(
            line.contains("\"latest\" is not sha256:<64 lowercase hex digits>"),
            "{line}"
        );
        let line = fails(
            &dir,
            &[
                "collab",
                "link-policy",
                "--dir",
                "owner",
                "--name",
                "none",
                "--withdraw",
            ],
        );
        assert!(line.contains("no link policy named \"none\""), "{line}");
    })
    .await
    .unwrap();
}

/// `fedmesh node announce` against a real run announce listener: announces (with the image
/// digest), ends, and reports a refusal in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_announce_reaches_the_run_registry() {
    use fedmesh_agent::node::v6;
    let registry = v6::Registry::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap().to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(v6::serve_announce(listener, registry.clone(), async move {
        stopped.cancelled().await;
    }));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let image = format!("sha256:{}", "ef".repeat(32));
    let (reg, img) = (registry.clone(), image.clone());
    tokio::task::spawn_blocking(move || {
        let text = ok(
            &dir,
            &[
                "node",
                "announce",
                "--at",
                &at,
                "--task",
                "10",
                "--parent",
                "5",
                "--source",
                "172.17.0.5",
                "--port",
                "11366:mpc",
                "--image",
                &img,
            ],
        );
        assert_eq!(text.trim(), "run announced");
        let runs = reg.all();
        assert_eq!(runs.len(), 1);
        assert_eq!(
            (runs[0].task_id, runs[0].parent_id, runs[0].image.as_deref()),
            (10, Some(5), Some(img.as_str()))
        );
        let line = fails(
            &dir,
            &[
                "node",
                "announce",
                "--at",
                &at,
                "--task",
                "11",
                "--source",
                "172.17.0.6",
                "--image",
                "latest",
            ],
        );
        assert!(
            line.contains("refused (400") && line.contains("\"latest\""),
            "{line}"
        );
        let text = ok(
            &dir,
            &["node", "announce", "--at", &at, "--task", "10", "--end"],
        );
        assert_eq!(text.trim(), "1 run(s) ended");
        assert!(reg.all().is_empty());
    })
    .await
    .unwrap();
    stop.cancel();
}
