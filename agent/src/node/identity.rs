//! This node's certificate and key, read once at start and replaced in memory on renewal. Every
//! part of the agent that presents them (the relay's TLS, the hub client, the Istio credentials
//! Secret, the snapshot's expiry) follows one watch channel instead of reading files.
//!
//! ```text
//!  NodeState files ──load──► Identity ──watch──► relay TLS · hub client · controller · snapshot
//!                              ▲
//!  renew (two thirds of life) ─┘ (the new certificate is also written to node-cert.pem)
//! ```

use std::sync::Arc;

use anyhow::Result;
use fedmesh_certs::{CertInfo, NodeIdentity, NodeKey, files};
use fedmesh_mesh_config::Credentials;
use tokio::sync::watch;

use crate::{enroll::NodeState, hub::client::HubClient};

/// The node's current certificate and key.
pub struct Identity {
    /// For TLS.
    pub tls: NodeIdentity,
    /// The certificate chain, PEM.
    pub cert_pem: String,
    /// The private key, PEM (never sent anywhere but to the node's own cluster Secret).
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.info().spiffe_id)
            .field("serial", &self.info().serial)
            .finish_non_exhaustive()
    }
}

/// A live view of the node's identity.
pub type IdentityWatch = watch::Receiver<Arc<Identity>>;

impl Identity {
    /// Reads the certificate and key of the state directory.
    pub fn load(state: &NodeState) -> Result<Self> {
        Self::from_pem(
            files::read_to_string(&state.cert_path())?,
            files::read_to_string(&state.key_path())?,
        )
    }

    /// An identity from PEM text; fails unless the certificate is for the key.
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Self> {
        Ok(Self {
            tls: NodeIdentity::from_pem(&cert_pem, &key_pem)?,
            cert_pem,
            key_pem,
        })
    }

    /// What the certificate says.
    pub fn info(&self) -> &CertInfo {
        self.tls.info()
    }

    /// The key, for a renewal CSR.
    pub fn key(&self) -> Result<NodeKey> {
        Ok(NodeKey::from_pem(&self.key_pem)?)
    }

    /// A hub client authenticating with this identity.
    pub fn hub_client(&self, state: &NodeState) -> Result<HubClient> {
        Ok(HubClient::new(
            &state.config.hub.url,
            &state.config.hub.pin,
            Some((&self.tls, &self.key_pem)),
        )?)
    }

    /// The gateways' credentials: this certificate and key, and the collaboration CA.
    pub fn credentials(&self, ca_pem: &str) -> Credentials {
        Credentials {
            cert_chain_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            ca_pem: ca_pem.to_owned(),
        }
    }
}
