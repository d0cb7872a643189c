//! A node's state directory, enrollment, and coming back after an outage.
//!
//! The state directory holds `node.json` (hub address, collaboration, owner pin, node name),
//! `node-key.pem` (0600, made here and never sent), `node-cert.pem` and `ca.pem`. Enrollment
//! trades a one-time join token and a CSR (or a certificate the owner signed offline) for a
//! certificate, and pins the collaboration to the owner key named in the token.
//!
//! A node whose certificate expired (it was down longer than the certificate's life) cannot
//! renew over mutual TLS. It re-attests instead ([`reattest`]): a CSR for its identity and
//! enrolled key, in a short-lived request signed with that key; the hub issues a certificate
//! only for the key it recorded for the node, and not to a revoked node or key.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use fedmesh_certs::{NodeIdentity, NodeKey, SpiffeId, TrustBundle, files, verify::Usage};
use fedmesh_documents::{Ledger, NodeRef, NodeSigner, jws};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Serialize};

use crate::{
    hub::{
        api::{EnrollRequest, Enrolled, JoinToken, REATTEST_AUDIENCE, ReattestClaims},
        client::HubClient,
    },
    owner::HubAddress,
};

/// What `node.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The hub.
    pub hub: HubAddress,
    /// The collaboration.
    pub collab: String,
    /// Thumbprint of the owner key the collaboration must be signed with.
    pub owner_pin: String,
    /// This node.
    pub node: NodeRef,
}

/// A node's state directory, loaded.
#[derive(Debug)]
pub struct NodeState {
    /// The directory.
    pub dir: PathBuf,
    /// `node.json`.
    pub config: NodeConfig,
}

impl NodeState {
    /// Loads a state directory made by [`enroll`].
    pub fn load(dir: &Path) -> Result<Self> {
        let config: NodeConfig =
            serde_json::from_str(&files::read_to_string(&dir.join("node.json"))?)
                .with_context(|| format!("{}/node.json is malformed", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            config,
        })
    }

    /// Path of the node key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("node-key.pem")
    }

    /// Path of the node certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("node-cert.pem")
    }

    /// Path of the collaboration CA.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The node's SPIFFE ID.
    pub fn spiffe_id(&self) -> Result<SpiffeId> {
        Ok(SpiffeId::new(
            &self.config.collab,
            &self.config.node.org,
            &self.config.node.node,
        )?)
    }

    /// The node's TLS identity (certificate and key).
    pub fn identity(&self) -> Result<NodeIdentity> {
        Ok(NodeIdentity::from_pem(
            &files::read_to_string(&self.cert_path())?,
            &files::read_to_string(&self.key_path())?,
        )?)
    }

    /// The node's document signer.
    pub fn signer(&self) -> Result<NodeSigner> {
        let pem = files::read_to_string(&self.cert_path())?;
        let chain =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = NodeKey::from_pem(&files::read_to_string(&self.key_path())?)?;
        Ok(NodeSigner::new(chain, key))
    }

    /// The collaboration CA.
    pub fn trust_bundle(&self) -> Result<TrustBundle> {
        Ok(TrustBundle::from_pem(&files::read_to_string(
            &self.ca_path(),
        )?)?)
    }

    /// A hub client authenticating as this node.
    pub fn hub_client(&self) -> Result<HubClient> {
        let identity = self.identity()?;
        let key = files::read_to_string(&self.key_path())?;
        Ok(HubClient::new(
            &self.config.hub.url,
            &self.config.hub.pin,
            Some((&identity, &key)),
        )?)
    }

    /// Replaces the node certificate (after renewal).
    pub fn save_cert(&self, pem: &str) -> Result<()> {
        files::write_public(&self.cert_path(), pem.as_bytes())?;
        Ok(())
    }
}

/// A re-attestation request is valid this long.
const REATTEST_TTL: Duration = Duration::from_secs(300);

/// Re-attests the node after its certificate expired: a CSR for its identity and key, signed
/// with that key, for the hub to check against the key it recorded. Saves the new certificate.
pub async fn reattest(state: &NodeState) -> Result<()> {
    let key = NodeKey::from_pem(&files::read_to_string(&state.key_path())?)?;
    let id = state.spiffe_id()?;
    let claims = ReattestClaims {
        collab: state.config.collab.clone(),
        node: state.config.node.clone(),
        aud: REATTEST_AUDIENCE.to_owned(),
        exp: jws::unix(SystemTime::now() + REATTEST_TTL),
        csr_pem: key.csr(&id)?.pem,
    };
    let proof = jws::sign_with_key(&claims, &key)?;
    let hub = HubClient::new(&state.config.hub.url, &state.config.hub.pin, None)?;
    let renewed = hub
        .reattest(&state.config.collab, proof)
        .await
        .context("re-attesting with the enrolled node key (the certificate expired)")?;
    save_checked(state, &key, &renewed)?;
    tracing::info!(node = %state.config.node, "certificate expired while down; re-attested with the enrolled key");
    Ok(())
}

/// Re-attests when the node's certificate is no longer valid (it expired while the node was
/// down); does nothing otherwise.
pub async fn ensure_valid_certificate(state: &NodeState) -> Result<()> {
    if state.identity()?.info().not_after > SystemTime::now() {
        return Ok(());
    }
    reattest(state).await
}

/// Saves a certificate the hub issued, once it chains to the collaboration CA, names this node
/// and is for its key.
pub fn save_checked(state: &NodeState, key: &NodeKey, issued: &Enrolled) -> Result<()> {
    let bundle = state.trust_bundle()?;
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the hub sent a malformed certificate")?;
    let info = bundle.verify(&chain, SystemTime::now(), Usage::Client)?;
    if info.spiffe_id != state.spiffe_id()? {
        bail!("the hub issued a certificate for {}", info.spiffe_id);
    }
    NodeIdentity::new(chain, key).context("the certificate is not for this node's key")?;
    state.save_cert(&issued.cert_pem)
}

/// Enrolls with `token` into state directory `dir`. With `offline_cert` (a certificate the
/// owner signed for the key already in `dir/node-key.pem`), no CSR is sent.
pub async fn enroll(
    token: &JoinToken,
    dir: &Path,
    offline_cert: Option<String>,
) -> Result<NodeState> {
    let config = NodeConfig {
        hub: HubAddress {
            url: token.hub.clone(),
            pin: token.hub_pin.clone(),
        },
        collab: token.collab.clone(),
        owner_pin: token.owner_pin.clone(),
        node: token.node.clone(),
    };
    let state = NodeState {
        dir: dir.to_owned(),
        config,
    };
    let id = state.spiffe_id()?;
    let key = files::load_or_create_key(&state.key_path())?;
    let (csr_pem, cert_pem) = match offline_cert {
        Some(cert) => (None, Some(cert)),
        None => (Some(key.csr(&id)?.pem), None),
    };
    let hub = HubClient::new(&token.hub, &token.hub_pin, None)?;
    let enrolled = hub
        .enroll(
            &token.collab,
            &EnrollRequest {
                node: token.node.clone(),
                secret: token.secret.clone(),
                csr_pem,
                cert_pem,
            },
        )
        .await?;

    // Trust nothing the hub said until it checks out against the owner pin from the token.
    let mut ledger = Ledger::new(&token.owner_pin);
    ledger
        .ingest_jws(&enrolled.collab_jws, SystemTime::now())
        .map_err(|r| anyhow::anyhow!("the hub's collaboration document is refused: {r}"))?;
    let collab = ledger.collaboration().context("no collaboration")?;
    if collab.ca_pem.trim() != enrolled.ca_pem.trim() {
        bail!("the hub sent a CA that is not the collaboration's");
    }
    let bundle = TrustBundle::from_pem(&collab.ca_pem)?;
    let chain = CertificateDer::pem_slice_iter(enrolled.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the hub sent a malformed certificate")?;
    let info = bundle.verify(&chain, SystemTime::now(), Usage::Client)?;
    if info.spiffe_id != id {
        bail!(
            "the hub issued a certificate for {}, not {id}",
            info.spiffe_id
        );
    }
    NodeIdentity::new(chain, &key).context("the certificate is not for this node's key")?;

    files::write_public(&state.ca_path(), collab.ca_pem.as_bytes())?;
    files::write_public(&state.cert_path(), enrolled.cert_pem.as_bytes())?;
    files::write_public(
        &dir.join("node.json"),
        &serde_json::to_vec_pretty(&state.config)?,
    )?;
    Ok(state)
}
