//! Checks a node makes of itself: its `ca.pem` is its own collaboration's CA, and no other agent
//! advertises this node (a copy of its state directory started elsewhere).
//!
//! ```text
//!  start ──▶ check_ca(ca.pem, node.json, node certificate) ──▶ refuse to start | go on
//!        ──▶ Instance::start: a fresh random instance id, signed into the advertisement
//!  ledger ──▶ watch_instances: this node's latest advertisement carries another instance id
//!             (not this agent's, not its predecessor's on this machine) ──▶ WARN + metrics
//! ```
//!
//! A copied state directory holds the same key and certificate, so nothing but the instance id
//! tells the two agents apart; the owner revokes the node (or its serial) once told.

use std::sync::Arc;

use anyhow::{Result, bail};
use fedmesh_certs::{NodeIdentity, TrustBundle, files, verify::Usage};
use fedmesh_documents::{Ledger, NodeRef};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{enroll::NodeState, metrics::Metrics};

/// The file holding the instance id of the last agent started from this state directory.
const INSTANCE_FILE: &str = "instance";

/// Refuses a `ca.pem` that is not the CA of this node's collaboration (`node.json`), or that did
/// not issue the node's certificate. The chain is checked at the certificate's own start, so an
/// expired certificate is not mistaken for another CA's.
pub fn check_ca(state: &NodeState, identity: &NodeIdentity, bundle: &TrustBundle) -> Result<()> {
    let collab = &state.config.collab;
    let ca = state.ca_path();
    if bundle.trust_domain().collab() != collab {
        bail!(
            "{} is the CA of collaboration {:?} (trust domain {}), but this node belongs to {collab:?}: \
             the state directory holds another collaboration's CA; enroll again with a join token for {collab:?}",
            ca.display(),
            bundle.trust_domain().collab(),
            bundle.trust_domain()
        );
    }
    let info = identity.info();
    if let Err(error) = bundle.verify(identity.chain(), info.not_before, Usage::Client) {
        bail!(
            "{} did not issue this node's certificate {} ({error}): the state directory holds \
             another CA named {collab:?}; enroll again with a join token for this collaboration",
            ca.display(),
            info.serial
        );
    }
    Ok(())
}

/// This agent's instance id, and the one the previous agent on this state directory used.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Drawn at random at this start.
    pub id: String,
    /// The previous agent's (a restart is not a second instance).
    pub previous: Option<String>,
}

impl Instance {
    /// Draws a new instance id and records it in the state directory.
    pub fn start(state: &NodeState) -> Result<Self> {
        let path = state.dir.join(INSTANCE_FILE);
        let previous = files::read_to_string(&path)
            .ok()
            .map(|s| s.trim().to_owned());
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        files::write_public(&path, id.as_bytes())?;
        Ok(Self { id, previous })
    }

    /// Whether `other` is an instance id of another agent.
    fn foreign(&self, other: &str) -> bool {
        other != self.id && self.previous.as_deref() != Some(other)
    }
}

/// Watches the ledger for advertisements of `node` signed by another agent instance, until
/// `cancel`: each new one is reported once (WARN and `fedmesh_node_foreign_instances_total`);
/// `fedmesh_node_advertised_by_another_instance` is 1 while the latest one is foreign.
pub async fn watch_instances(
    node: NodeRef,
    instance: Instance,
    mut ledger: watch::Receiver<Arc<Ledger>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut reported = std::collections::BTreeSet::new();
    loop {
        {
            let current = ledger.borrow_and_update();
            let other = current
                .advertisement(&node)
                .and_then(|ad| ad.instance.clone().map(|id| (id, ad.issued_at)))
                .filter(|(id, _)| instance.foreign(id));
            metrics
                .advertised_by_another_instance
                .set(i64::from(other.is_some()));
            if let Some((other, issued_at)) = other
                && reported.insert(other.clone())
            {
                metrics.foreign_instances.inc();
                warn!(
                    %node,
                    instance = %other,
                    this_instance = %instance.id,
                    advertised_at_unix = issued_at,
                    "another agent advertises this node: a copy of its state directory runs \
                     elsewhere; if it is not yours, ask the owner to revoke this node"
                );
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = ledger.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}
