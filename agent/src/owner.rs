//! The collaboration owner's side: the owner key, the collaboration document, join tokens,
//! approvals and revocations. Used by the `fedmesh collab|join-token|link` commands and by the
//! demo.
//!
//! The owner directory holds `owner-key.pem` (0600), `collab.json` (the current collaboration
//! document, re-signed on every change), `hub.json` (where the hub is and its pin),
//! `ledger.json` (0600: everything verified so far and the hub cursor it was verified up to)
//! and, for an offline CA, `ca.pem` and `ca-key.pem` (0600). The owner key never leaves it.
//!
//! Every command starts from `ledger.json` and asks the hub only for what came after its
//! cursor, so a command costs the same however long the history is. Owner commands running at
//! the same time do not conflict: revocations add up (each is its own document), and a
//! collaboration change another command made first is read back and the change applied on top.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_certs::{files, time::unix};
use fedmesh_documents::{
    Approval, Checkpoint, CollabPolicy, Collaboration, Document, JoinGrant, Ledger, LinkRequest,
    LinkStatus, LinkTerms, Member, NodeRef, OwnerKey, PortSpec, Revocation, Signer, TaskRef, jws,
};
use serde::{Deserialize, Serialize};

use crate::hub::{
    api::{
        CA_REQUEST_AUDIENCE, CaRequest, JoinToken, OWNER_TOKEN_AUDIENCE, OwnerToken, secret_digest,
    },
    client::{ClientError, HubClient},
};

/// The owner's kept ledger, in the owner directory.
const LEDGER_FILE: &str = "ledger.json";
/// Revocations not yet folded into a checkpoint after which a revoking command makes one.
pub const CHECKPOINT_EVERY: u64 = 64;
/// How often a collaboration change is tried again after another command changed it first.
const COLLAB_ATTEMPTS: usize = 8;
/// Longest an owner command waits in all for the hub's rate limits.
const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(30);

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

    /// Submits a signed document (waiting out the hub's rate limit, see [`patiently`]).
    async fn submit(&self, jws: String) -> Result<u64> {
        let submitted = patiently(|| self.hub.submit(&self.collab.id, jws.clone())).await?;
        Ok(submitted.seq)
    }

    async fn publish_collab(&self) -> Result<()> {
        let jws = self.sign(&Document::Collaboration(self.collab.clone()))?;
        patiently(|| self.hub.submit_collab(jws.clone())).await?;
        self.save_collab()
    }

    /// Admits `node` (if it is not yet a member) and issues a one-time join token for it.
    pub async fn join_token(
        &mut self,
        node: &NodeRef,
        organization_id: Option<u64>,
        ttl: Duration,
    ) -> Result<JoinToken> {
        if self.collab.member(node).is_none() {
            self.add_member(node, organization_id).await?;
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
        self.submit(self.sign(&grant)?).await?;
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

    /// Adds `node` to the members in a new collaboration version. When another command
    /// published a version first (the hub answers 409), that version is read back, verified,
    /// and the member added to it.
    async fn add_member(&mut self, node: &NodeRef, organization_id: Option<u64>) -> Result<()> {
        for _ in 0..COLLAB_ATTEMPTS {
            let mut next = self.collab.clone();
            next.members.push(Member {
                org: node.org.clone(),
                node: node.node.clone(),
                organization_id,
            });
            next.version += 1;
            next.issued_at = unix(SystemTime::now());
            let previous = std::mem::replace(&mut self.collab, next);
            match self.publish_collab().await {
                Ok(()) => return Ok(()),
                Err(e) if status_of(&e) == Some(409) => {
                    tracing::debug!(error = %e, "another command changed the collaboration first");
                    self.collab = previous;
                    let ledger = self.ledger().await?;
                    if let Some(latest) = ledger.collaboration() {
                        self.collab = latest.clone();
                    }
                    if self.collab.member(node).is_some() {
                        return self.save_collab();
                    }
                }
                Err(e) => {
                    self.collab = previous;
                    return Err(e);
                }
            }
        }
        bail!(
            "the collaboration kept changing under this command ({COLLAB_ATTEMPTS} attempts to \
             add {node}); try again"
        )
    }

    fn save_collab(&self) -> Result<()> {
        files::write_public(
            &self.dir.join("collab.json"),
            &serde_json::to_vec_pretty(&self.collab)?,
        )?;
        Ok(())
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

    /// Everything the hub holds, verified here against the owner's own key: the ledger kept in
    /// the owner directory, brought up to date with what the hub stored after its cursor.
    pub async fn ledger(&self) -> Result<Ledger> {
        let path = self.dir.join(LEDGER_FILE);
        let kept = match files::read_to_string(&path) {
            Ok(json) => match Ledger::from_json(&json) {
                Ok(ledger) if ledger.pin() == self.pin() => Some(ledger),
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(%error, file = %path.display(), "the kept ledger is unreadable; reading the hub's whole history");
                    None
                }
            },
            Err(_) => None,
        };
        let mut ledger = kept.unwrap_or_else(|| Ledger::new(&self.pin()));
        sync(&self.hub, &self.collab.id, &mut ledger).await?;
        files::write_secret(&path, ledger.to_json().as_bytes())?;
        if let Some(withheld) = ledger.withheld() {
            tracing::warn!(%withheld, "the hub misbehaves");
        }
        Ok(ledger)
    }

    /// Signs and publishes a link policy (a newer one of the same name replaces it); the
    /// collaboration and signing time are filled in. Returns the policy as signed.
    pub async fn link_policy(
        &self,
        mut policy: fedmesh_documents::runs::LinkPolicy,
    ) -> Result<fedmesh_documents::runs::LinkPolicy> {
        policy.collab = self.collab.id.clone();
        policy.validate()?;
        // Signed after the policy it replaces, even within the same second.
        let ledger = self.ledger().await?;
        let held = ledger.link_policies().find(|p| p.name == policy.name);
        policy.issued_at = unix(SystemTime::now()).max(held.map_or(0, |p| p.issued_at + 1));
        self.submit(self.sign(&Document::LinkPolicy(policy.clone()))?)
            .await?;
        Ok(policy)
    }

    /// Withdraws the link policy `name`: signs it again ending now. Returns it as signed.
    pub async fn withdraw_link_policy(
        &self,
        name: &str,
    ) -> Result<fedmesh_documents::runs::LinkPolicy> {
        let ledger = self.ledger().await?;
        let Some(held) = ledger.link_policies().find(|p| p.name == name) else {
            bail!("the hub holds no link policy named {name:?}");
        };
        let mut policy = held.clone();
        let now = unix(SystemTime::now());
        policy.not_after = now;
        // Signed after the policy it withdraws, even within the same second.
        policy.issued_at = now.max(held.issued_at + 1);
        self.submit(self.sign(&Document::LinkPolicy(policy.clone()))?)
            .await?;
        Ok(policy)
    }

    /// Requests a link in the owner's name.
    pub async fn request(&self, terms: LinkTerms) -> Result<LinkTerms> {
        let doc = Document::LinkRequest(LinkRequest {
            terms: terms.clone(),
            requested_by: self.collab.owner_name.clone(),
            requested_at: unix(SystemTime::now()),
        });
        self.submit(self.sign(&doc)?).await?;
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
        if let Some(withheld) = ledger.withheld() {
            bail!("not approving: {withheld}");
        }
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
            revocations: ledger.revocations_through(),
        });
        self.submit(self.sign(&doc)?).await?;
        Ok(terms)
    }

    /// Revokes `links`, `nodes` and `serials` in a revocation of their own, numbered one above
    /// the highest this owner has seen; returns its number. Revocations add up, so commands
    /// revoking at the same time never conflict. Every [`CHECKPOINT_EVERY`] revocations, a
    /// checkpoint folds them in.
    pub async fn revoke(
        &self,
        links: &[String],
        nodes: &[NodeRef],
        serials: &[String],
    ) -> Result<u64> {
        let ledger = self.ledger().await?;
        for id in links {
            if ledger.status(id, SystemTime::now()).is_none() {
                bail!("no link {id} is known to the hub");
            }
        }
        let number = ledger.revocation().number + 1;
        let list = Revocation {
            collab: self.collab.id.clone(),
            number,
            links: links.to_vec(),
            serials: serials.to_vec(),
            nodes: nodes.to_vec(),
            issued_at: unix(SystemTime::now()),
        };
        self.submit(self.sign(&Document::Revocation(list))?).await?;
        let folded = ledger.checkpoint().map_or(0, |c| c.revocations);
        if number.saturating_sub(folded) >= CHECKPOINT_EVERY {
            // Best effort: another command may be making one at the same time.
            if let Err(error) = self.checkpoint().await {
                tracing::debug!(%error, "no checkpoint made this time");
            }
        }
        Ok(number)
    }

    /// Signs and stores a checkpoint of everything revoked so far: the hub then drops the
    /// revocations it folds in and every link that can never be in force again.
    pub async fn checkpoint(&self) -> Result<Checkpoint> {
        let ledger = self.ledger().await?;
        if let Some(withheld) = ledger.withheld() {
            bail!("not making a checkpoint: {withheld}");
        }
        let now = unix(SystemTime::now());
        let revoked = ledger.revocation();
        let checkpoint = Checkpoint {
            collab: self.collab.id.clone(),
            number: ledger.checkpoint().map_or(0, |c| c.number) + 1,
            revocations: ledger.revocations_through(),
            links: revoked
                .links
                .iter()
                .filter(|id| ledger.terms(id).is_none_or(|t| t.not_after > now))
                .cloned()
                .collect(),
            serials: revoked.serials.clone(),
            nodes: revoked.nodes.clone(),
            issued_at: now,
        };
        let signed = self.sign(&Document::Checkpoint(checkpoint.clone()))?;
        if signed.len() > jws::MAX_JWS_BYTES {
            bail!(
                "a checkpoint of {} revoked links, {} serials and {} nodes would be {} bytes; \
                 documents are at most {}",
                checkpoint.links.len(),
                checkpoint.serials.len(),
                checkpoint.nodes.len(),
                signed.len(),
                jws::MAX_JWS_BYTES
            );
        }
        self.submit(signed).await?;
        Ok(checkpoint)
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
    sync(hub, collab, &mut ledger).await?;
    Ok(ledger)
}

/// Brings `ledger` up to date with what the hub holds after its cursor: the collaboration and,
/// below the hub's latest checkpoint, that checkpoint first, then the documents in order.
pub async fn sync(hub: &HubClient, collab: &str, ledger: &mut Ledger) -> Result<()> {
    loop {
        let since = ledger.cursor();
        let page = patiently(|| hub.docs(collab, since, Duration::ZERO)).await?;
        if page.cursor < since {
            // The hub does not know this cursor (restored from a backup, or another hub):
            // start over from its whole history.
            tracing::warn!(
                since,
                hub_cursor = page.cursor,
                "the hub's history is shorter than the kept ledger's; reading it all again"
            );
            *ledger = Ledger::new(ledger.pin());
            continue;
        }
        let now = SystemTime::now();
        if let Err(r) = ledger.ingest_jws(&page.collab_jws, now) {
            tracing::warn!(rejection = %r, "collaboration document refused");
        }
        for env in page.checkpoint.iter().chain(&page.docs) {
            if let Err(r) = ledger.ingest(env, now) {
                tracing::warn!(rejection = %r, "document refused");
            }
        }
        ledger.advance_cursor(page.cursor);
        if page.docs.is_empty() || page.cursor <= since {
            break;
        }
    }
    if ledger.collaboration().is_none() {
        bail!(
            "the hub holds no collaboration document signed by the owner key {}",
            ledger.pin()
        );
    }
    Ok(())
}

/// Runs a hub request; when the hub says too many requests (429), waits and tries again, for
/// at most [`RATE_LIMIT_PATIENCE`] in all.
async fn patiently<T, F, Fut>(mut request: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut pause = Duration::from_millis(250);
    let mut waited = Duration::ZERO;
    loop {
        match request().await {
            Err(e) if e.status() == Some(429) && waited < RATE_LIMIT_PATIENCE => {
                tracing::debug!(error = %e, ?pause, "the hub limits this client's requests; waiting");
                tokio::time::sleep(pause).await;
                waited += pause;
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            result => return result,
        }
    }
}

/// The hub's HTTP status in `error`, if the hub answered.
fn status_of(error: &anyhow::Error) -> Option<u16> {
    error
        .downcast_ref::<ClientError>()
        .and_then(ClientError::status)
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
