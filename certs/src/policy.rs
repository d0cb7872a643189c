//! The issuance policy: what the collaboration CA agrees to sign.
//!
//! [`IssuancePolicy::check`] reads a CSR with x509-parser (an independent parser from the one
//! that signs) and returns the identity to issue, or the first reason to refuse. It is pure:
//! the TTL and the trust domain are arguments.

use std::time::Duration;

use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519, Oid,
    },
    prelude::FromDer,
};

use crate::{Error, Result, SpiffeId, TrustDomain};

/// Longest lifetime any fedmesh certificate may have.
pub const HARD_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default cap on a node certificate's lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most a certificate's notBefore may be set back to absorb clock skew.
pub const MAX_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// What the CA signs: identity inside its trust domain, ECDSA P-256 keys, TTL at most the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssuancePolicy {
    max_ttl: Duration,
    backdate: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            max_ttl: DEFAULT_MAX_TTL,
            backdate: MAX_BACKDATE,
        }
    }
}

/// An identity the policy agreed to issue, with the public key to certify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approved {
    /// The SPIFFE ID to put in the certificate.
    pub id: SpiffeId,
    /// The CSR's subject public key (uncompressed EC point).
    pub public_key: Vec<u8>,
    /// The lifetime to issue.
    pub ttl: Duration,
}

impl IssuancePolicy {
    /// A policy with cap `max_ttl` (at most 7 days).
    pub fn with_max_ttl(max_ttl: Duration) -> Result<Self> {
        if max_ttl > HARD_MAX_TTL {
            return Err(Error::CapOverHardMax(max_ttl));
        }
        if max_ttl.is_zero() {
            return Err(Error::ZeroTtl);
        }
        Ok(Self {
            max_ttl,
            ..Self::default()
        })
    }

    /// Sets how far notBefore is back-dated (at most 5 minutes).
    pub fn with_backdate(self, backdate: Duration) -> Result<Self> {
        if backdate > MAX_BACKDATE {
            return Err(Error::BackdateTooLarge(backdate));
        }
        Ok(Self { backdate, ..self })
    }

    /// The TTL cap.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// How far notBefore is set back.
    pub fn backdate(&self) -> Duration {
        self.backdate
    }

    /// Checks a DER CSR against this policy for trust domain `td`, asking for lifetime `ttl`.
    pub fn check(&self, td: &TrustDomain, csr_der: &[u8], ttl: Duration) -> Result<Approved> {
        if ttl.is_zero() {
            return Err(Error::ZeroTtl);
        }
        if ttl > self.max_ttl {
            return Err(Error::TtlOverCap {
                requested: ttl,
                cap: self.max_ttl,
            });
        }
        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| Error::MalformedCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::MalformedCsr(format!(
                "{} trailing bytes after the request",
                rest.len()
            )));
        }
        let public_key = check_key_type(&csr)?;
        csr.verify_signature().map_err(|_| Error::CsrSignature)?;
        let id = check_extensions(td, &csr)?;
        Ok(Approved {
            id,
            public_key,
            ttl,
        })
    }
}

fn check_key_type(csr: &X509CertificationRequest<'_>) -> Result<Vec<u8>> {
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm;
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| Error::KeyType {
                found: "EC key without a named curve".into(),
            })?;
        if curve == OID_EC_P256 {
            return Ok(spki.subject_public_key.data.to_vec());
        }
        return Err(Error::KeyType {
            found: format!("EC key on curve {}", oid_name(&curve)),
        });
    }
    Err(Error::KeyType {
        found: oid_name(&alg.algorithm),
    })
}

fn oid_name(oid: &Oid<'_>) -> String {
    match oid {
        o if *o == OID_PKCS1_RSAENCRYPTION => "RSA".into(),
        o if *o == OID_SIG_ED25519 => "Ed25519".into(),
        o => o.to_id_string(),
    }
}

fn check_extensions(td: &TrustDomain, csr: &X509CertificationRequest<'_>) -> Result<SpiffeId> {
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                        GeneralName::IPAddress(_) => {
                            return Err(Error::DisallowedSan("IP address".into()));
                        }
                        GeneralName::RFC822Name(_) => {
                            return Err(Error::DisallowedSan("email".into()));
                        }
                        other => return Err(Error::DisallowedSan(format!("{other:?}"))),
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(Error::CsrRequestsCa("basicConstraints CA:TRUE"));
            }
            ParsedExtension::BasicConstraints(_) => {}
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(Error::CsrRequestsCa("keyUsage keyCertSign/cRLSign"));
            }
            // Usages are set by the CA regardless of what is asked; plain requests are fine.
            ParsedExtension::KeyUsage(_) | ParsedExtension::ExtendedKeyUsage(_) => {}
            ParsedExtension::NameConstraints(_) => {
                return Err(Error::CsrRequestsCa("nameConstraints"));
            }
            other => return Err(Error::DisallowedExtension(extension_name(other))),
        }
    }
    if uris.len() != 1 {
        return Err(Error::UriSanCount(uris.len()));
    }
    let uri = &uris[0];
    let in_domain = uri
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|domain| domain == td.to_string());
    if !in_domain {
        return Err(Error::OutsideTrustDomain {
            what: "CSR",
            id: uri.clone(),
            trust_domain: td.to_string(),
        });
    }
    let id = SpiffeId::parse(uri)?;
    let expected = id.dns_name();
    if let Some(found) = dns.into_iter().find(|d| *d != expected) {
        return Err(Error::DnsSanMismatch { found, expected });
    }
    Ok(id)
}

fn extension_name(ext: &ParsedExtension<'_>) -> String {
    match ext {
        ParsedExtension::UnsupportedExtension { oid } => oid.to_id_string(),
        ParsedExtension::ParseError { error } => format!("(unparseable: {error})"),
        other => format!("{other:?}")
            .split(['(', ' ', '{'])
            .next()
            .unwrap_or("unknown")
            .to_owned(),
    }
}
