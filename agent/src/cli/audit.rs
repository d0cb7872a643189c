//! `fedmesh audit`: does the cluster hold exactly the objects the verified links want?
//!
//! The desired side is built from nothing but verified documents: the node's state directory →
//! the hub → a [`Ledger`] that checks every signature → the links in force (minus the
//! sysadmin's vetoes) → mesh-config's render (or the relay's Services). The live side is every
//! object carrying fedmesh's labels, per kind and namespace. Objects missing, extra or modified
//! by hand are reported; the exit code is 0 only when nothing differs. Run it where the agent
//! runs (`kubectl exec deploy/<release>-fedmesh-agent -- fedmesh audit`), with its state and
//! its ServiceAccount's read access.

use std::{path::PathBuf, time::SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use fedmesh_certs::files;
use fedmesh_documents::{Ledger, NodeRef};
use fedmesh_mesh_config::Credentials;

use super::{Status, node::KubeArgs};
use crate::{
    enroll::NodeState,
    k8s::{
        Controller,
        controller::read_credentials,
        desired::Memory,
        plan::{self, Report},
    },
    output::{Format, table},
    owner,
};

/// `fedmesh audit`
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Node state directory.
    #[arg(long, env = "FEDMESH_STATE")]
    state: PathBuf,
    #[command(flatten)]
    kube: KubeArgs,
    /// Output format: text (one row per object that differs, and a summary line), or the
    /// whole report as JSON or YAML.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

/// Exit 1 when the cluster differs from what the verified links want.
pub(crate) async fn run_audit(args: AuditArgs) -> Result<Status> {
    let AuditArgs {
        state,
        kube,
        output,
    } = args;
    let node = NodeState::load(&state)?;
    let ledger = owner::fetch_ledger(
        &node.hub_client()?,
        &node.config.collab,
        &node.config.owner_pin,
    )
    .await
    .context("fetching and verifying the collaboration's documents")?;
    let controller = Controller::connect(&kube.options()?).await?;
    let memory: Memory = files::read_to_string(&state.join("kubernetes.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let credentials = if controller.settings().mode.needs_credentials() {
        Some(read_credentials(&node)?)
    } else {
        None
    };
    let report = audit(
        &controller,
        &ledger,
        &node.config.node,
        credentials.as_ref(),
        &memory,
        SystemTime::now(),
    )
    .await?;
    print!("{}", format(&report, output)?);
    Ok(status(&report))
}

/// The exit status of a report.
pub fn status(report: &Report) -> Status {
    if report.matches {
        Status::Success
    } else {
        Status::Differs("the cluster differs from what the verified links want".into())
    }
}

/// Compares the cluster with what the verified links want.
pub async fn audit(
    controller: &Controller,
    ledger: &Ledger,
    node: &NodeRef,
    credentials: Option<&Credentials>,
    memory: &Memory,
    now: SystemTime,
) -> Result<Report> {
    let observed = controller
        .observe(ledger, node, credentials, memory, now)
        .await?
        .context("no verified collaboration yet")?;
    Ok(plan::diff(&observed.desired.objects, &observed.live).report())
}

/// The report as text.
pub fn format(report: &Report, output: Format) -> Result<String> {
    if let Some(text) = output.render(report)? {
        return Ok(text);
    }
    let mut out = String::new();
    if !report.differences.is_empty() {
        let rows: Vec<[String; 5]> = report
            .differences
            .iter()
            .map(|r| {
                [
                    r.status.to_owned(),
                    r.kind.clone(),
                    r.namespace.clone(),
                    r.name.clone(),
                    r.detail.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["STATUS", "KIND", "NAMESPACE", "NAME", "DETAIL"],
            &rows,
        ));
    }
    let count = |status: &str| {
        report
            .differences
            .iter()
            .filter(|r| r.status == status)
            .count()
    };
    if report.matches {
        out.push_str(&format!(
            "all {} objects match the verified links\n",
            report.desired
        ));
    } else {
        out.push_str(&format!(
            "the cluster differs from the verified links: {} missing, {} modified, {} extra \
             (of {} wanted)\n",
            count("missing"),
            count("modified"),
            count("extra"),
            report.desired
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! `fedmesh audit` against a scripted API server (no cluster can run here): the cluster as
    //! the agent left it, then changed by hand.

    use serde_json::json;

    use super::*;
    use crate::k8s::{
        Mode,
        desired::{self, Inputs},
        fixtures::*,
    };

    #[tokio::test]
    async fn reports_missing_extra_and_modified_objects() {
        let collab = Collab::new(&[
            ("a/n1", "b/n1", &["11366:mpc"]),
            ("c/n1", "a/n1", &["9092:flower"]),
        ]);
        let (client, mut server) = mock_client();
        let controller = Controller::new(client, settings(Mode::Istio));
        let credentials = credentials();
        let inputs = Inputs {
            ledger: &collab.ledger,
            node: &Collab::node(),
            vetoed: &Default::default(),
            credentials: Some(&credentials),
            now: collab.fx.now,
        };
        let applied = desired::compute(controller.settings(), &inputs, &Memory::default())
            .unwrap()
            .unwrap();
        for object in &applied.objects {
            server.store.insert(path_of(object), object.clone());
        }
        // Someone deleted the algorithm namespace's Sidecar,
        let sidecar = "/apis/networking.istio.io/v1/namespaces/vantage6-tasks/sidecars/fm-c";
        assert!(server.store.remove(sidecar).is_some());
        // opened a second port at the ingress gateway for c/n1,
        let policy = "/apis/security.istio.io/v1/namespaces/fedmesh/authorizationpolicies/\
                      fm-c-in-c-n1-18342d76";
        server.store.get_mut(policy).unwrap()["spec"]["rules"][0]["to"][0]["operation"]["ports"] =
            json!(["443", "8443"]);
        // and added a ServiceEntry that looks like fedmesh's.
        server.store.insert(
            "/apis/networking.istio.io/v1/namespaces/fedmesh/serviceentries/fm-c-out-z-n1".into(),
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "fm-c-out-z-n1", "namespace": "fedmesh", "labels": {
                    "app.kubernetes.io/managed-by": "fedmesh", "fedmesh.io/collaboration": "c"}},
                "spec": {"hosts": ["n1.z.c.fedmesh"]},
            }),
        );

        let server = server.run(Scenario::Pass(istio_lists()));
        let report = audit(
            &controller,
            &collab.ledger,
            &Collab::node(),
            Some(&credentials),
            &Memory::default(),
            collab.fx.now,
        )
        .await
        .unwrap();
        timeout_after_1s(server).await;

        assert!(!report.matches);
        assert_eq!(
            format(&report, Format::Text).unwrap(),
            "\
STATUS    KIND                 NAMESPACE       NAME                   DETAIL
missing   Sidecar              vantage6-tasks  fm-c                   wanted by a verified link
modified  AuthorizationPolicy  fedmesh         fm-c-in-c-n1-18342d76  spec.rules[0].to[0].operation.ports
extra     ServiceEntry         fedmesh         fm-c-out-z-n1          wanted by no verified link
the cluster differs from the verified links: 1 missing, 1 modified, 1 extra (of 17 wanted)
"
        );
        let json: serde_json::Value =
            serde_json::from_str(&format(&report, Format::Json).unwrap()).unwrap();
        assert_eq!(json["matches"], false);
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&format(&report, Format::Yaml).unwrap()).unwrap();
        assert_eq!(yaml, json, "YAML says what JSON says");
        assert_eq!(status(&report).code(), 1, "drift exits 1");
        assert_eq!(
            json["differences"][1],
            json!({
                "status": "modified", "kind": "AuthorizationPolicy", "namespace": "fedmesh",
                "name": "fm-c-in-c-n1-18342d76", "detail": "spec.rules[0].to[0].operation.ports",
            })
        );
    }

    #[test]
    fn a_matching_cluster_says_so() {
        let report = Report {
            matches: true,
            desired: 17,
            differences: vec![],
        };
        assert_eq!(
            format(&report, Format::Text).unwrap(),
            "all 17 objects match the verified links\n"
        );
        assert_eq!(status(&report), Status::Success);
    }
}
