//! The hub's HTTP API: paths, request and response bodies, and the join token format. Shared
//! by the server and [`super::client`].
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | GET | `/v1/health` | anyone | liveness |
//! | POST | `/v1/collabs/{id}/ca` | owner (online CA), signed [`CaRequest`] | hub makes and keeps the CA; returns its certificate |
//! | POST | `/v1/collabs` | owner | create or update the collaboration (owner-signed) |
//! | POST | `/v1/collabs/{id}/docs` | owner, or the signing node over mTLS | submit a signed document |
//! | GET | `/v1/collabs/{id}/docs?since=N&wait=S&limit=L` | member node (mTLS), a rendezvous server the collaboration lists (mTLS with its pinned certificate) or owner token | at most L documents after cursor N, long-polling up to S seconds; the latest checkpoint first when N is below it |
//! | POST | `/v1/collabs/{id}/enroll` | node with a join token | certificate (online CA) or registration (offline CA) |
//! | POST | `/v1/collabs/{id}/renew` | member node (mTLS) | a fresh certificate for the same identity (online CA) |
//! | POST | `/v1/collabs/{id}/reattest` | node whose certificate expired, signed [`ReattestClaims`] | a fresh certificate for the key it enrolled (online CA), unless revoked |

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_documents::{Envelope, NodeRef, PublicJwk};
use serde::{Deserialize, Serialize};

/// Largest request body the hub reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest a `GET .../docs` waits for news.
pub const MAX_WAIT_SECS: u64 = 60;
/// Most envelopes one page returns.
pub const MAX_PAGE: usize = 1000;
/// The audience of owner session tokens.
pub const OWNER_TOKEN_AUDIENCE: &str = "fedmesh-hub";
/// The audience of owners' requests for an online CA.
pub const CA_REQUEST_AUDIENCE: &str = "fedmesh-hub/create-ca";
/// The audience of nodes' re-attestation requests.
pub const REATTEST_AUDIENCE: &str = "fedmesh-hub/reattest";

/// A signed document to store.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitDoc {
    /// The compact JWS.
    pub jws: String,
}

/// What the hub stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submitted {
    /// Its sequence number.
    pub seq: u64,
}

/// Query of `GET .../docs`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocsQuery {
    /// Return documents after this sequence number.
    #[serde(default)]
    pub since: u64,
    /// Seconds to wait when there is nothing new (at most [`MAX_WAIT_SECS`]).
    #[serde(default)]
    pub wait: u64,
    /// Most documents to return (0: [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: usize,
}

/// A page of documents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocsPage {
    /// The latest collaboration document (owner-signed).
    pub collab_jws: String,
    /// The latest checkpoint, when the cursor asked from is below it: read it before `docs`
    /// (what it folds in is no longer among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Envelope>,
    /// Envelopes after the cursor asked for, in order.
    pub docs: Vec<Envelope>,
    /// The cursor to ask from next.
    pub cursor: u64,
}

/// An enrollment: a join token's secret plus a CSR (online CA) or a certificate the owner signed
/// offline.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The node enrolling.
    pub node: NodeRef,
    /// The join token's secret.
    pub secret: String,
    /// A CSR for the hub's online CA to sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr_pem: Option<String>,
    /// A certificate the owner already signed (offline CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_pem: Option<String>,
}

/// The result of an enrollment or renewal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enrolled {
    /// The node's certificate (PEM).
    pub cert_pem: String,
    /// The collaboration CA (PEM).
    pub ca_pem: String,
    /// The collaboration document (owner-signed).
    pub collab_jws: String,
}

/// A renewal: a CSR for the same identity, sent over mTLS with the current certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The new CSR.
    pub csr_pem: String,
}

/// Claims of a node's re-attestation request: signed (JWS ES256, no certificate) with the node
/// key the hub recorded when it enrolled, sent as [`SubmitDoc`]. The hub issues a certificate
/// for the CSR's key, which must be that key, to a member that is not revoked.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReattestClaims {
    /// The collaboration.
    pub collab: String,
    /// The node.
    pub node: NodeRef,
    /// Always [`REATTEST_AUDIENCE`].
    pub aud: String,
    /// Unix expiry (at most 10 minutes ahead).
    pub exp: u64,
    /// A CSR for the node's identity and enrolled key.
    pub csr_pem: String,
}

/// Claims of an owner's request for an online CA (owner-signed JWS, sent as
/// [`SubmitDoc`]): it binds the collaboration id to the owner key, so only that owner can
/// create the collaboration the CA is for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaRequest {
    /// The collaboration.
    pub collab: String,
    /// Always [`CA_REQUEST_AUDIENCE`].
    pub aud: String,
    /// Unix expiry (at most 10 minutes ahead).
    pub exp: u64,
    /// The owner's public key; the request is signed with it.
    pub owner_key: PublicJwk,
}

/// The CA the hub made for a collaboration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaCreated {
    /// The CA certificate (PEM).
    pub ca_pem: String,
}

/// Every error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
}

/// Claims of an owner session token (owner-signed JWS, sent as `Authorization: Bearer`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OwnerToken {
    /// The collaboration.
    pub collab: String,
    /// Always [`OWNER_TOKEN_AUDIENCE`].
    pub aud: String,
    /// Unix expiry.
    pub exp: u64,
}

const TOKEN_PREFIX: &str = "fmjoin1.";

/// Everything a node needs to enroll: where the hub is, how to recognise it, which
/// collaboration owner to trust, which node it is, and the one-time secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// The hub's base URL.
    pub hub: String,
    /// SHA-256 of the hub's TLS certificate (hex).
    pub hub_pin: String,
    /// The collaboration.
    pub collab: String,
    /// Thumbprint of the owner key: the collaboration's trust anchor.
    pub owner_pin: String,
    /// The node the token is for.
    pub node: NodeRef,
    /// The one-time secret (the hub stores only its SHA-256).
    pub secret: String,
}

impl JoinToken {
    /// `fmjoin1.<base64url(JSON)>`.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses a token string.
    pub fn decode(s: &str) -> Result<Self, String> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| format!("a join token starts with {TOKEN_PREFIX}"))?;
        if body.len() > 4096 {
            return Err("join token is too long".into());
        }
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| format!("join token is not base64url: {e}"))?;
        serde_json::from_slice(&json).map_err(|e| format!("join token is malformed: {e}"))
    }
}

/// Hex SHA-256 of a join token secret, as stored in the owner's grant.
pub fn secret_digest(secret: &str) -> String {
    fedmesh_certs::fingerprint(secret.as_bytes())
}
