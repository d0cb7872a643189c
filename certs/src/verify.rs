//! Verification of node certificates against one collaboration CA, at a given `now`.
//!
//! The chain is checked by webpki (signature, validity, CA constraints, EKU); the identity is
//! read with x509-parser. Each failure has its own [`Error`] variant, so a refused handshake says
//! exactly why.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::{Error, Result, SpiffeId, TrustDomain, time};

/// What a node certificate says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject distinguished name.
    pub subject: String,
    /// SHA-256 of the DER certificate.
    pub fingerprint: String,
}

impl CertInfo {
    /// Reads a node certificate without verifying it.
    pub fn parse(der: &[u8]) -> Result<Self> {
        let cert = parse(der)?;
        Ok(Self {
            spiffe_id: spiffe_id_of(&cert)?,
            serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
            not_before: time::from_x509(cert.validity().not_before.timestamp()),
            not_after: time::from_x509(cert.validity().not_after.timestamp()),
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            fingerprint: crate::fingerprint(der),
        })
    }

    /// The lifetime fraction after which to renew (see [`crate::renew`]).
    pub fn renew_at(&self) -> SystemTime {
        crate::renew::renew_at(self.not_before, self.not_after)
    }
}

/// Which end of a TLS connection the certificate authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (EKU serverAuth).
    Server,
    /// A TLS client (EKU clientAuth).
    Client,
}

/// The signature algorithms fedmesh accepts in chains (ECDSA P-256/P-384, via *ring*).
pub(crate) static SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
];

/// Reads and checks a collaboration CA certificate; returns its trust domain.
pub fn ca_trust_domain(ca_der: &[u8]) -> Result<TrustDomain> {
    let cert = parse(ca_der).map_err(|e| Error::InvalidCa(e.to_string()))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(Error::InvalidCa(
            "basicConstraints CA:TRUE is missing".into(),
        ));
    }
    let uri = uri_sans(&cert)
        .into_iter()
        .next()
        .ok_or_else(|| Error::InvalidCa("no spiffe://<collab>.fedmesh URI SAN".into()))?;
    uri.strip_prefix("spiffe://")
        .and_then(TrustDomain::from_domain)
        .ok_or_else(|| Error::InvalidCa(format!("URI SAN {uri} is not a fedmesh trust domain")))?
}

/// Verifies `chain` (end entity first) against the CA `ca_der` at `now`, for `usage`, and returns
/// what the end-entity certificate says.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    ca_der: &CertificateDer<'_>,
    now: SystemTime,
    usage: Usage,
) -> Result<CertInfo> {
    let trust_domain = ca_trust_domain(ca_der)?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| Error::Chain("no certificate presented".into()))?;
    let cert = parse(leaf)?;
    if is_self_signed(&cert) {
        return Err(Error::SelfSigned(trust_domain.to_string()));
    }
    let anchor: TrustAnchor<'_> =
        webpki::anchor_from_trusted_cert(ca_der).map_err(|e| Error::InvalidCa(format!("{e:?}")))?;
    let ee = EndEntityCert::try_from(leaf).map_err(|e| Error::MalformedCert(format!("{e:?}")))?;
    let key_usage = match usage {
        Usage::Server => KeyUsage::server_auth(),
        Usage::Client => KeyUsage::client_auth(),
    };
    ee.verify_for_usage(
        SIG_ALGS,
        &[anchor],
        intermediates,
        time::unix_time(now),
        key_usage,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => Error::Expired {
            not_after: time::rfc3339(time::from_x509(cert.validity().not_after.timestamp())),
            now: time::rfc3339(now),
        },
        webpki::Error::CertNotValidYet { .. } => Error::NotYetValid {
            not_before: time::rfc3339(time::from_x509(cert.validity().not_before.timestamp())),
            now: time::rfc3339(now),
        },
        // Another CA, or a forgery naming ours as issuer: either way not signed by our key.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            Error::UnknownIssuer(trust_domain.to_string())
        }
        other => Error::Chain(format!("{other:?}")),
    })?;
    let info = CertInfo::parse(leaf)?;
    if info.spiffe_id.trust_domain() != trust_domain {
        return Err(Error::OutsideTrustDomain {
            what: "certificate",
            id: info.spiffe_id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    Ok(info)
}

/// The SPIFFE ID of the first certificate of a peer's chain, as presented in a TLS handshake.
///
/// Call it on `peer_certificates()` after a handshake the [`crate::tls`] verifiers accepted.
pub fn peer_spiffe_id(chain: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId> {
    let leaf = chain
        .and_then(<[_]>::first)
        .ok_or_else(|| Error::Chain("peer presented no certificate".into()))?;
    spiffe_id_of(&parse(leaf)?)
}

/// The subject public key of a certificate (for EC keys, the SEC1 point).
pub fn public_key_of(der: &[u8]) -> Result<Vec<u8>> {
    Ok(parse(der)?.public_key().subject_public_key.data.to_vec())
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| Error::MalformedCert(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::MalformedCert(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect()
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId> {
    let uris = uri_sans(cert);
    match uris[..] {
        [] => Err(Error::NoSpiffeId),
        [uri] => SpiffeId::parse(uri),
        _ => Err(Error::InvalidSpiffeId {
            value: uris.join(", "),
            reason: "a certificate must carry exactly one SPIFFE ID".into(),
        }),
    }
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}
