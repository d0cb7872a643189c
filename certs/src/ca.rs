//! The collaboration CA: an ECDSA P-256 self-signed root, `CA:true, pathlen:0`, that signs only
//! node identities of its own trust domain.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};

use crate::{
    Error, IssuancePolicy, Result, SpiffeId, TrustDomain, csr, fingerprint, time,
    verify::{self, CertInfo},
};

/// Default lifetime of a collaboration CA.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A collaboration's certificate authority (certificate and signing key).
pub struct CollabCa {
    trust_domain: TrustDomain,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub pem: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// What it says (identity, serial, validity).
    pub info: CertInfo,
}

impl CollabCa {
    /// Creates a new CA for collaboration `collab`, valid from `now` for `validity`.
    pub fn generate(collab: &str, now: SystemTime, validity: Duration) -> Result<Self> {
        let trust_domain = TrustDomain::new(collab)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("fedmesh CA {trust_domain}"));
        dn.push(DnType::OrganizationName, "fedmesh");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(trust_domain.uri().try_into()?)];
        params.serial_number = Some(random_serial()?);
        params.not_before = time::to_offset(now);
        params.not_after = time::to_offset(now + validity);
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Self {
            trust_domain,
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            cert_der,
        })
    }

    /// Loads a CA from its certificate and private key (both PEM), checking they belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| Error::Pem {
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        let trust_domain = verify::ca_trust_domain(&cert_der)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::InvalidKey(e.to_string()))?;
        if verify::public_key_of(&cert_der)? != key.der_bytes() {
            return Err(Error::InvalidKey(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            trust_domain,
            cert_pem: cert_pem.to_owned(),
            cert_der: cert_der.into_owned(),
            issuer,
        })
    }

    /// The trust domain this CA anchors.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM. Write it only with [`crate::files::write_secret`].
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// SHA-256 of the CA certificate: the pin nodes use to trust this collaboration.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Checks a PEM CSR against `policy` and, if it passes, signs it for `ttl` from `now`.
    pub fn sign_csr_pem(
        &self,
        csr_pem: &str,
        policy: &IssuancePolicy,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let der =
            CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
                Error::Pem {
                    what: "CSR",
                    reason: e.to_string(),
                }
            })?;
        self.sign_csr_der(&der, policy, ttl, now)
    }

    /// Checks a DER CSR against `policy` and, if it passes, signs it for `ttl` from `now`.
    pub fn sign_csr_der(
        &self,
        csr_der: &[u8],
        policy: &IssuancePolicy,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let approved = policy.check(&self.trust_domain, csr_der, ttl)?;
        let key = CsrKey(approved.public_key);
        self.issue(&approved.id, &key, policy.backdate(), approved.ttl, now)
    }

    fn issue(
        &self,
        id: &SpiffeId,
        key: &impl PublicKeyData,
        backdate: Duration,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let mut params = CertificateParams::default();
        params.distinguished_name = csr::subject(id);
        params.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into()?),
            SanType::DnsName(id.dns_name().try_into()?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = time::to_offset(now - backdate);
        params.not_after = time::to_offset(now + ttl);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer)?;
        let der = cert.der().clone();
        let info = CertInfo::parse(&der)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            der,
            info,
        })
    }
}

impl std::fmt::Debug for CollabCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollabCa")
            .field("trust_domain", &self.trust_domain.to_string())
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A CSR's P-256 public key, as rcgen wants it for signing.
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// A positive 128-bit random serial (well over the 64 bits the policy demands).
fn random_serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::InvalidKey("the system random source failed".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, and a full 16 bytes long
    Ok(SerialNumber::from_slice(&bytes))
}
