//! The offline certificate workflow through the real `fedmesh` binary, checked by an independent
//! parser: `openssl verify` and `openssl x509 -text`.

use std::{path::Path, process::Command};

use fedmesh_tests::{fedmesh, fedmesh_ok as ok};

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn issue(dir: &Path) {
    ok(dir, &["ca", "init", "--collab", "collab-x", "--dir", "ca"]);
    ok(
        dir,
        &[
            "csr",
            "--collab",
            "collab-x",
            "--org",
            "org-a",
            "--node",
            "n1",
            "--key",
            "n1-key.pem",
            "--out",
            "n1.csr",
        ],
    );
    ok(
        dir,
        &[
            "ca", "sign", "--dir", "ca", "--csr", "n1.csr", "--out", "n1.pem", "--ttl", "12h",
        ],
    );
}

#[test]
fn openssl_verifies_what_fedmesh_issues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    issue(dir);

    assert_eq!(
        openssl(dir, &["verify", "-CAfile", "ca/ca.pem", "n1.pem"]).trim(),
        "n1.pem: OK"
    );
    let text = openssl(dir, &["x509", "-in", "n1.pem", "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://collab-x.fedmesh/org/org-a/node/n1"),
        "{text}"
    );
    assert!(text.contains("DNS:n1.org-a.collab-x.fedmesh"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    let ca_text = openssl(dir, &["x509", "-in", "ca/ca.pem", "-noout", "-text"]);
    assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
    assert!(ca_text.contains("Certificate Sign, CRL Sign"), "{ca_text}");
    assert!(ca_text.contains("ASN1 OID: prime256v1"), "{ca_text}");
}

#[test]
fn keys_are_private_and_inspect_reports_identity() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    issue(dir);
    for key in ["ca/ca-key.pem", "n1-key.pem"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let json = ok(
        dir,
        &[
            "cert",
            "inspect",
            "n1.pem",
            "--ca",
            "ca/ca.pem",
            "--output",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["spiffe_id"],
        "spiffe://collab-x.fedmesh/org/org-a/node/n1"
    );
    assert_eq!(v["org"], "org-a");
    assert_eq!(v["node"], "n1");
    assert_eq!(v["verification"]["ok"], true);
    assert_eq!(v["serial"].as_str().unwrap().len(), 32);
}

#[test]
fn cli_errors_are_one_line_and_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    issue(dir);

    let (success, _, stderr) = fedmesh(dir, &["ca", "init", "--collab", "collab-x", "--dir", "ca"]);
    assert!(!success);
    assert!(
        stderr.contains("already exists; refusing to overwrite it"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    ok(
        dir,
        &[
            "csr",
            "--collab",
            "other",
            "--org",
            "org-a",
            "--node",
            "n1",
            "--key",
            "o-key.pem",
            "--out",
            "o.csr",
        ],
    );
    let (success, _, stderr) = fedmesh(
        dir,
        &[
            "ca", "sign", "--dir", "ca", "--csr", "o.csr", "--out", "o.pem",
        ],
    );
    assert!(!success);
    assert_eq!(
        stderr.trim(),
        "error: CSR identity spiffe://other.fedmesh/org/org-a/node/n1 is outside trust domain collab-x.fedmesh"
    );
    assert!(!dir.join("o.pem").exists());

    let (success, _, stderr) = fedmesh(
        dir,
        &[
            "ca", "sign", "--dir", "ca", "--csr", "n1.csr", "--out", "x.pem", "--ttl", "8d",
        ],
    );
    assert!(!success);
    assert_eq!(
        stderr.trim(),
        "error: requested TTL 8d exceeds the cap of 24h"
    );

    let (success, _, stderr) = fedmesh(
        dir,
        &[
            "csr", "--collab", "collab-x", "--org", "Org-A", "--node", "n1", "--key", "k.pem",
            "--out", "k.csr",
        ],
    );
    assert!(!success);
    assert!(stderr.contains("must be lowercase"), "{stderr}");

    // A certificate from another CA fails inspection against ours.
    ok(dir, &["ca", "init", "--collab", "collab-x", "--dir", "ca2"]);
    let (success, stdout, stderr) =
        fedmesh(dir, &["cert", "inspect", "n1.pem", "--ca", "ca2/ca.pem"]);
    assert!(!success);
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(
        stderr.contains("not issued by the collab-x.fedmesh collaboration CA"),
        "{stderr}"
    );
}
