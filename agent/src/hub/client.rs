//! A client of the hub API, used by the owner CLI and the node agent. It trusts exactly the
//! pinned hub certificate and, for nodes, presents the node's collaboration certificate.

use std::time::Duration;

use fedmesh_certs::NodeIdentity;
use serde::{Serialize, de::DeserializeOwned};

use super::api::{
    CaCreated, DocsPage, DocsQuery, EnrollRequest, Enrolled, ErrorBody, MAX_PAGE, RenewRequest,
    SubmitDoc, Submitted,
};

/// Largest answer read from a hub: a full page of documents of the largest size, and room to
/// spare.
pub const MAX_RESPONSE_BYTES: usize = page_bytes(MAX_PAGE);

/// Largest answer read for a page of `limit` documents.
pub const fn page_bytes(limit: usize) -> usize {
    limit * fedmesh_documents::jws::MAX_JWS_BYTES + 1024 * 1024
}

/// What went wrong talking to the hub.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub answered with an error status.
    #[error("hub refused ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The hub's message.
        message: String,
    },
    /// The hub could not be reached or answered garbage.
    #[error("hub unreachable: {0}")]
    Transport(String),
    /// The hub's answer is over the bound it is read up to.
    #[error("the hub's answer exceeds {max} bytes")]
    TooLarge {
        /// The bound.
        max: usize,
    },
    /// The client could not be built.
    #[error("hub client setup failed: {0}")]
    Setup(String),
}

impl ClientError {
    /// The HTTP status, when the hub answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A hub client.
#[derive(Clone, Debug)]
pub struct HubClient {
    base: String,
    http: reqwest::Client,
    owner_token: Option<String>,
}

fn transport(e: reqwest::Error) -> ClientError {
    // reqwest's Display drops the cause (the interesting part for TLS pin failures).
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    ClientError::Transport(msg)
}

impl HubClient {
    /// A client for the hub at `base` (e.g. `https://127.0.0.1:8443`) whose certificate has
    /// SHA-256 `pin`, optionally authenticating as a node.
    pub fn new(
        base: &str,
        pin: &str,
        node: Option<(&NodeIdentity, &str)>,
    ) -> Result<Self, ClientError> {
        let tls = super::tls::client_config(pin, node.map(|n| n.0), node.map(|n| n.1))
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(90))
            .http1_only()
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            owner_token: None,
        })
    }

    /// A client for the hub at `base` speaking TLS with `tls` (which pins the hub and may present
    /// any client certificate, e.g. a rendezvous server's own).
    pub fn with_tls(base: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(90))
            .http1_only()
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            owner_token: None,
        })
    }

    /// Sends `token` (an owner-signed session token) as `Authorization: Bearer` on reads.
    pub fn with_owner_token(mut self, token: String) -> Self {
        self.owner_token = Some(token);
        self
    }

    async fn parse<R: DeserializeOwned>(resp: reqwest::Response) -> Result<R, ClientError> {
        Self::parse_within(resp, MAX_RESPONSE_BYTES).await
    }

    async fn parse_within<R: DeserializeOwned>(
        mut resp: reqwest::Response,
        max: usize,
    ) -> Result<R, ClientError> {
        let status = resp.status();
        // A hub is not trusted with our memory either: answers are read up to a bound.
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > max {
                return Err(ClientError::TooLarge { max });
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                ClientError::Transport(format!("the hub's answer is malformed: {e}"))
            });
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        Err(ClientError::Refused {
            status: status.as_u16(),
            message,
        })
    }

    async fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, ClientError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        Self::parse(resp).await
    }

    /// Posts raw bytes (for tests of the hub's input handling).
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        Self::parse(resp).await
    }

    /// Whether the hub answers its health check.
    pub async fn health(&self) -> Result<(), ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/health", self.base))
            .send()
            .await
            .map_err(transport)?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(ClientError::Refused {
            status: resp.status().as_u16(),
            message: resp.text().await.unwrap_or_default(),
        })
    }

    /// Asks the hub to make and keep a CA for `collab` (online CA), with the owner's signed
    /// [`super::api::CaRequest`].
    pub async fn create_ca(&self, collab: &str, request: String) -> Result<CaCreated, ClientError> {
        self.post(
            &format!("/v1/collabs/{collab}/ca"),
            &SubmitDoc { jws: request },
        )
        .await
    }

    /// Creates or updates a collaboration.
    pub async fn submit_collab(&self, jws: String) -> Result<Submitted, ClientError> {
        self.post("/v1/collabs", &SubmitDoc { jws }).await
    }

    /// Submits a signed document.
    pub async fn submit(&self, collab: &str, jws: String) -> Result<Submitted, ClientError> {
        self.post(&format!("/v1/collabs/{collab}/docs"), &SubmitDoc { jws })
            .await
    }

    /// Documents after `since`, waiting up to `wait` for news.
    pub async fn docs(
        &self,
        collab: &str,
        since: u64,
        wait: Duration,
    ) -> Result<DocsPage, ClientError> {
        self.docs_limited(collab, since, wait, MAX_PAGE).await
    }

    /// At most `limit` documents after `since`, waiting up to `wait` for news. The answer is
    /// read only up to what `limit` documents of the largest size take.
    pub async fn docs_limited(
        &self,
        collab: &str,
        since: u64,
        wait: Duration,
        limit: usize,
    ) -> Result<DocsPage, ClientError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut req = self
            .http
            .get(format!("{}/v1/collabs/{collab}/docs", self.base))
            .query(&DocsQuery {
                since,
                wait: wait.as_secs(),
                limit,
            });
        if let Some(token) = &self.owner_token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(transport)?;
        Self::parse_within(resp, page_bytes(limit)).await
    }

    /// Enrolls with a join token.
    pub async fn enroll(&self, collab: &str, req: &EnrollRequest) -> Result<Enrolled, ClientError> {
        self.post(&format!("/v1/collabs/{collab}/enroll"), req)
            .await
    }

    /// Re-attests a node whose certificate expired: `proof` is its signed
    /// [`super::api::ReattestClaims`].
    pub async fn reattest(&self, collab: &str, proof: String) -> Result<Enrolled, ClientError> {
        self.post(
            &format!("/v1/collabs/{collab}/reattest"),
            &SubmitDoc { jws: proof },
        )
        .await
    }

    /// Renews the node's certificate (online CA).
    pub async fn renew(&self, collab: &str, csr_pem: String) -> Result<Enrolled, ClientError> {
        self.post(
            &format!("/v1/collabs/{collab}/renew"),
            &RenewRequest { csr_pem },
        )
        .await
    }
}
