//! The collaboration owner's side: the owner key, the collaboration document, join tokens,
//! approvals and revocations. Used by the `fedmesh collab|join-token|link` commands and by the
//! demo.
//!
//! The owner directory holds `owner-key.pem` (0600), `collab.json` (the current collaboration
//! document, re-signed on every change), `hub.json` (where the hub is and its pin) and, for an
//! offline CA, `ca.pem` and `ca-key.pem` (0600). The owner key never leaves it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_certs::{files, time::unix};
use fedmesh_documents::{
    Approval, CollabPolicy, Collaboration, Document, JoinGrant, Ledger, LinkRequest, LinkStatus,
    LinkTerms, Member, NodeRef, OwnerKey, PortSpec, Revocation, Signer, TaskRef, jws,
};
use serde::{Deserialize, Serialize};

use crate::hub::{
    api::{
        CA_REQUEST_AUDIENCE, CaRequest, JoinToken, OWNER_TOKEN_AUDIENCE, OwnerToken, secret_digest,
    },
    client::HubClient,
};

/// Where the hub is and how to recognise it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HubAddress {
    /// Base URL, e.g. `https://127.0.0.1:8443`.
    pub url: String,
    /// SHA-256 of its certificate.
    pub pin: String,
}

/// How to create a collaboration.
#[derive(Clone, Debug)]
pub struct NewCollab {
    /// Collaboration id.
    pub id: String,
    /// The owner's name, shown as approver.
    pub owner_name: String,
    /// Whether the hub keeps the CA (and issues certificates at enrollment).
    pub online_ca: bool,
    /// The collaboration's defaults.
    pub policy: CollabPolicy,
}

/// An owner directory, loaded.
pub struct Owner {
    dir: PathBuf,
    key: OwnerKey,
    /// The current collaboration document.
    pub collab: Collaboration,
    /// The hub.
    pub hub_address: HubAddress,
    hub: HubClient,
}

impl Owner {
    /// Creates a collaboration: owner key, CA (here or at the hub), the signed document, and
    /// uploads it.
    pub async fn create(dir: &Path, hub_address: HubAddress, new: NewCollab) -> Result<Self> {
        let key_path = dir.join("owner-key.pem");
        files::refuse_existing(&key_path).context("this directory already holds an owner key")?;
        let hub = HubClient::new(&hub_address.url, &hub_address.pin, None)?;
        let key = OwnerKey::generate()?;
        let ca_pem = if new.online_ca {
            hub.create_ca(&new.id, ca_request(&key, &new.id)?)
                .await?
                .ca_pem
        } else {
            files::init_ca(
                &new.id,
                dir,
                SystemTime::now(),
                fedmesh_certs::ca::DEFAULT_CA_VALIDITY,
            )?
            .cert_pem()
            .to_owned()
        };
        files::create_secret(&key_path, key.private_pem().as_bytes())?;
        let hub = hub.with_owner_token(session_token(&key, &new.id)?);
        let collab = Collaboration {
            id: new.id,
            version: 1,
            owner_name: new.owner_name,
            owner_key: key.public_jwk(),
            ca_pem,
            members: Vec::new(),
            policy: new.policy,
            issued_at: unix(SystemTime::now()),
            rendezvous: Vec::new(),
        };
        files::write_public(
            &dir.join("hub.json"),
            &serde_json::to_vec_pretty(&hub_address)?,
        )?;
        let owner = Self {
            dir: dir.to_owned(),
            key,
            collab,
            hub_address,
            hub,
        };
        owner.publish_collab().await?;
        Ok(owner)
    }

    /// Loads an owner directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let key = OwnerKey::from_pem(&files::read_to_string(&dir.join("owner-key.pem"))?)
            .with_context(|| format!("{} holds no usable owner key", dir.display()))?;
        let collab: Collaboration =
            serde_json::from_str(&files::read_to_string(&dir.join("collab.json"))?)
                .context("collab.json is malformed")?;
        let hub_address: HubAddress =
            serde_json::from_str(&files::read_to_string(&dir.join("hub.json"))?)
                .context("hub.json is malformed")?;
        let token = session_token(&key, &collab.id)?;
        let hub = HubClient::new(&hub_address.url, &hub_address.pin, None)?.with_owner_token(token);
        Ok(Self {
            dir: dir.to_owned(),
            key,
            collab,
            hub_address,
            hub,
        })
    }

    /// Thumbprint of the owner key: the pin every node trusts the collaboration by.
    pub fn pin(&self) -> String {
        jws::thumbprint(&self.key.public_jwk())
    }

    fn sign(&self, doc: &Document) -> Result<String> {
        Ok(jws::sign(doc, &Signer::Owner(&self.key))?)
    }

    async fn publish_collab(&self) -> Result<()> {
        let jws = self.sign(&Document::Collaboration(self.collab.clone()))?;
        self.hub.submit_collab(jws).await?;
        files::write_public(
            &self.dir.join("collab.json"),
            &serde_json::to_vec_pretty(&self.collab)?,
        )?;
        Ok(())
    }

    /// Admits `node` (if it is not yet a member) and issues a one-time join token for it.
    pub async fn join_token(
        &mut self,
        node: &NodeRef,
        organization_id: Option<u64>,
        ttl: Duration,
    ) -> Result<JoinToken> {
        if self.collab.member(node).is_none() {
            self.collab.members.push(Member {
                org: node.org.clone(),
                node: node.node.clone(),
                organization_id,
            });
            self.collab.version += 1;
            self.collab.issued_at = unix(SystemTime::now());
            self.publish_collab().await?;
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        let secret = URL_SAFE_NO_PAD.encode(secret);
        let grant = Document::JoinGrant(JoinGrant {
            collab: self.collab.id.clone(),
            node: node.clone(),
            secret_sha256: secret_digest(&secret),
            not_after: unix(SystemTime::now() + ttl),
        });
        self.hub.submit(&self.collab.id, self.sign(&grant)?).await?;
        Ok(JoinToken {
            hub: self.hub_address.url.clone(),
            hub_pin: self.hub_address.pin.clone(),
            collab: self.collab.id.clone(),
            owner_pin: self.pin(),
            node: node.clone(),
            secret,
        })
    }

    /// Removes `node` from the collaboration's members (its certificates stop being accepted
    /// anywhere once the new collaboration document reaches the nodes).
    pub async fn remove_member(&mut self, node: &NodeRef) -> Result<()> {
        let before = self.collab.members.len();
        self.collab.members.retain(|m| m.node_ref() != *node);
        if self.collab.members.len() == before {
            bail!("{node} is not a member of {}", self.collab.id);
        }
        self.collab.version += 1;
        self.collab.issued_at = unix(SystemTime::now());
        self.publish_collab().await
    }

    /// Lists the rendezvous servers nodes without inbound connections meet at (replacing the
    /// list), in a new collaboration version.
    pub async fn set_rendezvous(
        &mut self,
        servers: Vec<fedmesh_documents::RendezvousServer>,
    ) -> Result<()> {
        let mut next = self.collab.clone();
        next.rendezvous = servers;
        next.validate_rendezvous()?;
        next.version += 1;
        next.issued_at = unix(SystemTime::now());
        self.collab = next;
        self.publish_collab().await
    }

    /// What a rendezvous server needs, one signed document per line: the collaboration
    /// document (signed here) and the latest revocation list the hub holds.
    pub async fn rendezvous_documents(&self) -> Result<String> {
        let mut out = self.sign(&Document::Collaboration(self.collab.clone()))?;
        out.push('\n');
        let ledger = self.ledger().await?;
        if ledger.revocation().number > 0 {
            out.push_str(&self.sign(&Document::Revocation(ledger.revocation().clone()))?);
            out.push('\n');
        }
        Ok(out)
    }

    /// Everything the hub holds, verified here against the owner's own key.
    pub async fn ledger(&self) -> Result<Ledger> {
        fetch_ledger(&self.hub, &self.collab.id, &self.pin()).await
    }

    /// Requests a link in the owner's name.
    pub async fn request(&self, terms: LinkTerms) -> Result<LinkTerms> {
        let doc = Document::LinkRequest(LinkRequest {
            terms: terms.clone(),
            requested_by: self.collab.owner_name.clone(),
            requested_at: unix(SystemTime::now()),
        });
        self.hub.submit(&self.collab.id, self.sign(&doc)?).await?;
        Ok(terms)
    }

    /// Approves the requested link `id`, exactly as requested.
    pub async fn approve(&self, id: &str) -> Result<LinkTerms> {
        self.approve_with_budget(id, None, None).await
    }

    /// Approves the requested link `id` with a budget: `max_bytes` and `max_streams` replace
    /// what the request asked for where given. A budget other than the requested one makes other
    /// terms, so the approved link has its own id (returned); the request stays unapproved.
    pub async fn approve_with_budget(
        &self,
        id: &str,
        max_bytes: Option<u64>,
        max_streams: Option<u32>,
    ) -> Result<LinkTerms> {
        let ledger = self.ledger().await?;
        let status = ledger
            .status(id, SystemTime::now())
            .with_context(|| format!("no link {id} is known to the hub"))?;
        let requested = status.terms;
        let terms = match (max_bytes, max_streams) {
            (None, None) => requested,
            _ => {
                let max_bytes = max_bytes.or(requested.max_bytes);
                let max_streams = max_streams.or(requested.max_streams);
                requested.with_budget(max_bytes, max_streams)?
            }
        };
        let doc = Document::Approval(Approval {
            terms: terms.clone(),
            approved_by: self.collab.owner_name.clone(),
            approved_at: unix(SystemTime::now()),
        });
        self.hub.submit(&self.collab.id, self.sign(&doc)?).await?;
        Ok(terms)
    }

    /// Revokes link `id` (and everything already revoked) in a new, higher-numbered list.
    pub async fn revoke(
        &self,
        links: &[String],
        nodes: &[NodeRef],
        serials: &[String],
    ) -> Result<u64> {
        let ledger = self.ledger().await?;
        let mut list: Revocation = ledger.revocation().clone();
        for id in links {
            if ledger.status(id, SystemTime::now()).is_none() {
                bail!("no link {id} is known to the hub");
            }
        }
        list.collab = self.collab.id.clone();
        list.number += 1;
        list.links.extend(links.iter().cloned());
        list.nodes.extend(nodes.iter().cloned());
        list.serials.extend(serials.iter().cloned());
        for v in [&mut list.links, &mut list.serials] {
            v.sort();
            v.dedup();
        }
        list.nodes.sort();
        list.nodes.dedup();
        list.issued_at = unix(SystemTime::now());
        let number = list.number;
        self.hub
            .submit(&self.collab.id, self.sign(&Document::Revocation(list))?)
            .await?;
        Ok(number)
    }

    /// Every link and its state now.
    pub async fn links(&self) -> Result<Vec<LinkStatus>> {
        Ok(self.ledger().await?.links(SystemTime::now()))
    }
}

/// An owner-signed session token for reading from the hub (valid 5 minutes).
fn session_token(key: &OwnerKey, collab: &str) -> Result<String> {
    let claims = OwnerToken {
        collab: collab.to_owned(),
        aud: OWNER_TOKEN_AUDIENCE.to_owned(),
        exp: unix(SystemTime::now() + Duration::from_secs(300)),
    };
    Ok(jws::sign_claims(&claims, &Signer::Owner(key))?)
}

/// The owner's signed request for an online CA for `collab` (valid 5 minutes): it reserves the
/// id for this owner key.
fn ca_request(key: &OwnerKey, collab: &str) -> Result<String> {
    let claims = CaRequest {
        collab: collab.to_owned(),
        aud: CA_REQUEST_AUDIENCE.to_owned(),
        exp: unix(SystemTime::now() + Duration::from_secs(300)),
        owner_key: key.public_jwk(),
    };
    Ok(jws::sign_claims(&claims, &Signer::Owner(key))?)
}

/// Fetches every document of `collab` and verifies it, in order, into a ledger pinned to `pin`.
pub async fn fetch_ledger(hub: &HubClient, collab: &str, pin: &str) -> Result<Ledger> {
    let mut ledger = Ledger::new(pin);
    loop {
        let since = ledger.cursor();
        let page = hub.docs(collab, since, Duration::ZERO).await?;
        for env in &page.docs {
            if let Err(r) = ledger.ingest(env, SystemTime::now()) {
                tracing::warn!(rejection = %r, "document refused");
            }
        }
        if page.docs.is_empty() {
            break;
        }
    }
    if ledger.collaboration().is_none() {
        bail!("the hub holds no collaboration document signed by the owner key {pin}");
    }
    Ok(ledger)
}

/// Parses `--port` values and builds link terms.
pub fn terms(
    collab: &str,
    from: &NodeRef,
    to: &NodeRef,
    ports: &[PortSpec],
    ttl: Duration,
    task: Option<TaskRef>,
) -> Result<LinkTerms> {
    Ok(LinkTerms::new(
        collab,
        from.clone(),
        to.clone(),
        ports.to_vec(),
        unix(SystemTime::now() + ttl),
        task,
    )?)
}
