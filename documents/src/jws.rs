//! Signing and verifying documents as JWS (RFC 7515, compact form, ES256).
//!
//! The payload is the document's canonical JSON (object keys sorted, no whitespace), so the
//! same document always yields the same bytes. Two kinds of signer exist:
//!
//! - the **owner**: header `kid` = RFC 7638 thumbprint of the owner's P-256 key, verified
//!   against the key in the (pinned) collaboration document;
//! - a **node**: header `x5c` = its certificate chain, verified to the collaboration CA at the
//!   time the document says it was signed, and bound to the node the document speaks for.
//!
//! Signatures are canonical: an ECDSA signature `(r, s)` is equally valid as `(r, n - s)`, so
//! every signature made here carries the low `s` and verification refuses the high one. One
//! signed document has exactly one valid encoding, and a rewritten signature is not a new
//! document.

use std::time::{Duration, SystemTime};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_certs::{CertInfo, NodeKey, TrustBundle, verify::Usage};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls_pki_types::CertificateDer;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{Document, Error, PublicJwk, Result};

/// Largest signed document accepted anywhere (64 KiB).
pub const MAX_JWS_BYTES: usize = 64 * 1024;
/// How far in the future a signer's clock may be.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
const TYP: &str = "fedmesh+jws";

/// Canonical JSON: object keys sorted at every level, no insignificant whitespace.
pub fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    fn sort(v: Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sort).collect()),
            other => other,
        }
    }
    // Serializing our own types to a Value cannot fail: they have string keys only.
    let value = serde_json::to_value(value).unwrap_or(Value::Null);
    serde_json::to_vec(&sort(value)).unwrap_or_default()
}

/// The collaboration owner's signing key (ECDSA P-256).
pub struct OwnerKey {
    key: NodeKey,
}

impl OwnerKey {
    /// A fresh owner key.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            key: NodeKey::generate()?,
        })
    }

    /// Loads an owner key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Self> {
        Ok(Self {
            key: NodeKey::from_pem(pem)?,
        })
    }

    /// The private key, PKCS#8 PEM (write it `0600`).
    pub fn private_pem(&self) -> String {
        self.key.private_pem()
    }

    /// The public key as a JWK.
    pub fn public_jwk(&self) -> PublicJwk {
        jwk_from_point(&self.key.public_point())
    }
}

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnerKey({})", thumbprint(&self.public_jwk()))
    }
}

fn jwk_from_point(point: &[u8]) -> PublicJwk {
    let (x, y) = if point.len() == 65 && point[0] == 4 {
        (&point[1..33], &point[33..])
    } else {
        (&[][..], &[][..])
    };
    PublicJwk {
        kty: "EC".into(),
        crv: "P-256".into(),
        x: URL_SAFE_NO_PAD.encode(x),
        y: URL_SAFE_NO_PAD.encode(y),
    }
}

/// RFC 7638 thumbprint (SHA-256, base64url) of an EC JWK: the owner's key id and pin.
pub fn thumbprint(jwk: &PublicJwk) -> String {
    let members = format!(
        r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
        jwk.crv, jwk.kty, jwk.x, jwk.y
    );
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        members.as_bytes(),
    ))
}

/// A node's signing identity: its certificate chain and private key.
pub struct NodeSigner {
    chain: Vec<CertificateDer<'static>>,
    key: NodeKey,
}

impl NodeSigner {
    /// Pairs a node certificate chain (leaf first) with its key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: NodeKey) -> Self {
        Self { chain, key }
    }
}

/// Who signs a document.
pub enum Signer<'a> {
    /// The collaboration owner.
    Owner(&'a OwnerKey),
    /// A member node.
    Node(&'a NodeSigner),
}

/// Signs `doc` as a compact JWS.
pub fn sign(doc: &Document, signer: &Signer<'_>) -> Result<String> {
    sign_claims(doc, signer)
}

/// Signs any serializable claims (canonical JSON) as a compact JWS.
pub fn sign_claims<T: Serialize>(claims: &T, signer: &Signer<'_>) -> Result<String> {
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some(TYP.into());
    let key = match signer {
        Signer::Owner(owner) => {
            header.kid = Some(thumbprint(&owner.public_jwk()));
            EncodingKey::from_ec_der(&owner.key.private_der())
        }
        Signer::Node(node) => {
            header.x5c = Some(
                node.chain
                    .iter()
                    .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                    .collect(),
            );
            EncodingKey::from_ec_der(&node.key.private_der())
        }
    };
    // Hand jsonwebtoken the canonical bytes verbatim, so they are exactly what gets signed.
    let canonical =
        String::from_utf8(canonical(claims)).map_err(|e| Error::Malformed(e.to_string()))?;
    let payload = serde_json::value::RawValue::from_string(canonical)
        .map_err(|e| Error::Malformed(e.to_string()))?;
    let jws = jsonwebtoken::encode(&header, &payload, &key)
        .map_err(|e| Error::Signature(e.to_string()))?;
    low_s(&jws)
}

/// Rewrites `jws`'s signature `(r, s)` as the equally valid `(r, n - s)`: what an attacker
/// does to make one signed document look like a new one. For tests of the refusal.
#[cfg(any(test, feature = "test-util"))]
pub fn malleate(jws: &str) -> Result<String> {
    let sig = signature_of(jws)?;
    let (r, s) = sig.split_scalars();
    let flipped =
        p256::ecdsa::Signature::from_scalars(r, -s).map_err(|e| Error::Signature(e.to_string()))?;
    let (signed, _) = jws
        .rsplit_once('.')
        .ok_or_else(|| Error::Malformed("a compact JWS has three parts".into()))?;
    Ok(format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(flipped.to_bytes())
    ))
}

/// The signature segment of a compact JWS, decoded: `r || s` for ES256.
fn signature_of(jws: &str) -> Result<p256::ecdsa::Signature> {
    let encoded = jws
        .rsplit_once('.')
        .map(|(_, sig)| sig)
        .ok_or_else(|| Error::Malformed("a compact JWS has three parts".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| Error::Malformed(format!("signature is not base64url: {e}")))?;
    p256::ecdsa::Signature::from_slice(&bytes).map_err(|_| {
        Error::Signature(format!(
            "an ES256 signature is 64 bytes, not {}",
            bytes.len()
        ))
    })
}

/// `jws` with its signature in low-`s` form (the same signature when it already is).
fn low_s(jws: &str) -> Result<String> {
    match signature_of(jws)?.normalize_s() {
        None => Ok(jws.to_owned()),
        Some(low) => {
            let (signed, _) = jws
                .rsplit_once('.')
                .ok_or_else(|| Error::Malformed("a compact JWS has three parts".into()))?;
            Ok(format!(
                "{signed}.{}",
                URL_SAFE_NO_PAD.encode(low.to_bytes())
            ))
        }
    }
}

/// Refuses a signature whose `s` is in the upper half of the group order: the same signature
/// rewritten as `(r, n - s)`, which fedmesh never makes.
fn require_low_s(jws: &str) -> Result<()> {
    if signature_of(jws)?.normalize_s().is_some() {
        return Err(Error::Signature(
            "signature is not canonical (high s; rewritten as (r, n-s)?)".into(),
        ));
    }
    Ok(())
}

/// Signs `claims` with a bare node key (no certificate): a proof that the signer holds the key
/// whose public point the verifier already has on record.
pub fn sign_with_key<T: Serialize>(claims: &T, key: &NodeKey) -> Result<String> {
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some(TYP.into());
    let canonical =
        String::from_utf8(canonical(claims)).map_err(|e| Error::Malformed(e.to_string()))?;
    let payload = serde_json::value::RawValue::from_string(canonical)
        .map_err(|e| Error::Malformed(e.to_string()))?;
    let jws = jsonwebtoken::encode(
        &header,
        &payload,
        &EncodingKey::from_ec_der(&key.private_der()),
    )
    .map_err(|e| Error::Signature(e.to_string()))?;
    low_s(&jws)
}

/// Verifies claims signed with [`sign_with_key`] against the public key `point` (SEC1,
/// uncompressed) on record.
pub fn verify_with_key<T: DeserializeOwned>(jws: &str, point: &[u8]) -> Result<T> {
    if jws.len() > MAX_JWS_BYTES {
        return Err(Error::TooLarge {
            size: jws.len(),
            max: MAX_JWS_BYTES,
        });
    }
    let data = jsonwebtoken::decode::<T>(jws, &DecodingKey::from_ec_der(point), &validation())
        .map_err(|e| {
            Error::Signature(format!(
                "signature by the recorded key does not verify: {e}"
            ))
        })?;
    require_low_s(jws)?;
    Ok(data.claims)
}

/// Who signed a verified document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignedBy {
    /// The owner key with this thumbprint.
    Owner(String),
    /// A node certificate.
    Node(CertInfo),
}

/// Reads a JWS without verifying it: for routing and error messages only.
pub fn peek(jws: &str) -> Result<(Header, Document)> {
    if jws.len() > MAX_JWS_BYTES {
        return Err(Error::TooLarge {
            size: jws.len(),
            max: MAX_JWS_BYTES,
        });
    }
    let data = jsonwebtoken::dangerous::insecure_decode::<Document>(jws)
        .map_err(|e| Error::Malformed(e.to_string()))?;
    Ok((data.header, data.claims))
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

/// Verifies an owner-signed document against the owner's key.
pub fn verify_owner(jws: &str, owner: &PublicJwk) -> Result<Document> {
    peek(jws)?;
    verify_owner_claims(jws, owner)
}

/// Verifies any owner-signed claims against the owner's key.
pub fn verify_owner_claims<T: DeserializeOwned>(jws: &str, owner: &PublicJwk) -> Result<T> {
    if jws.len() > MAX_JWS_BYTES {
        return Err(Error::TooLarge {
            size: jws.len(),
            max: MAX_JWS_BYTES,
        });
    }
    let header = jsonwebtoken::decode_header(jws).map_err(|e| Error::Malformed(e.to_string()))?;
    let expected = thumbprint(owner);
    match header.kid.as_deref() {
        Some(kid) if kid == expected => {}
        Some(kid) => {
            return Err(Error::Signature(format!(
                "signed by key {kid}, not the owner key {expected}"
            )));
        }
        None => return Err(Error::Signature("not signed by the owner (no kid)".into())),
    }
    let key = DecodingKey::from_ec_components(&owner.x, &owner.y)
        .map_err(|e| Error::Signature(e.to_string()))?;
    let data = jsonwebtoken::decode::<T>(jws, &key, &validation())
        .map_err(|e| Error::Signature(format!("owner signature does not verify: {e}")))?;
    require_low_s(jws)?;
    Ok(data.claims)
}

/// Verifies a node-signed document: the `x5c` chain must lead to the collaboration CA at the
/// time the document claims, which may not be in the future of `now`.
pub fn verify_node(
    jws: &str,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<(Document, CertInfo)> {
    let (header, doc) = peek(jws)?;
    let chain: Vec<CertificateDer<'static>> = header
        .x5c_der()
        .map_err(|e| Error::Signature(format!("x5c is malformed: {e}")))?
        .ok_or_else(|| Error::Signature("not signed by a node (no x5c)".into()))?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    // Compared in seconds: a claimed time past what `SystemTime` holds is refused, not added.
    let (claimed, unix_now) = (signed_at(&doc), unix(now));
    if claimed > unix_now.saturating_add(MAX_CLOCK_SKEW.as_secs()) {
        return Err(Error::Signature(format!(
            "document claims to be signed {}s in the future",
            claimed - unix_now
        )));
    }
    let signed_at = fedmesh_certs::time::from_unix(claimed);
    let info = bundle.verify(&chain, signed_at, Usage::Client)?;
    let leaf = fedmesh_certs::verify::public_key_of(&chain[0])?;
    let key = DecodingKey::from_ec_der(&leaf);
    let data = jsonwebtoken::decode::<Document>(jws, &key, &validation())
        .map_err(|e| Error::Signature(format!("node signature does not verify: {e}")))?;
    require_low_s(jws)?;
    Ok((data.claims, info))
}

/// The time a document says it was signed.
pub fn signed_at(doc: &Document) -> u64 {
    match doc {
        Document::Collaboration(c) => c.issued_at,
        Document::Advertisement(a) => a.issued_at,
        Document::LinkRequest(r) => r.requested_at,
        Document::Approval(a) => a.approved_at,
        Document::Decision(d) => d.at,
        Document::Revocation(r) => r.issued_at,
        Document::JoinGrant(g) => g.not_after,
        Document::Checkpoint(c) => c.issued_at,
        Document::LinkPolicy(p) => p.issued_at,
        Document::RunAnnouncement(a) => a.started_at,
        Document::RunEnd(e) => e.ended_at,
    }
}

pub use fedmesh_certs::time::unix;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ledger, RejectCode, fixtures::Fixture};

    /// A node document claiming a signing time past what `SystemTime` holds (a `jws_document`
    /// fuzz input) is refused as from the future; it used to panic on overflow.
    #[test]
    fn signing_time_past_the_clock_range_is_refused() {
        let f = Fixture::new("collab-x", &["org-a/n1"]);
        let (_, doc) = peek(&f.advertisement("org-a/n1", "127.0.0.1:4433")).unwrap();
        let Document::Advertisement(advert) = doc else {
            unreachable!("an advertisement")
        };
        let bundle = TrustBundle::from_pem(&f.collab.ca_pem).unwrap();
        for claimed in [u64::MAX, i64::MAX as u64 + 1, unix(f.now) + 301] {
            let mut advert = advert.clone();
            advert.issued_at = claimed;
            let jws = f.node_sign("org-a/n1", &Document::Advertisement(advert));
            let err = verify_node(&jws, &bundle, f.now).unwrap_err();
            assert!(err.to_string().contains("in the future"), "{err}");
            let mut ledger = Ledger::new(&f.pin());
            ledger.ingest_jws(&f.collab_jws(), f.now).unwrap();
            let rejection = ledger.ingest_jws(&jws, f.now).unwrap_err();
            assert_eq!(rejection.code, RejectCode::Forbidden, "{rejection}");
        }
    }
}
