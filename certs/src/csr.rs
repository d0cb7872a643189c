//! Node key pairs and certificate signing requests.
//!
//! The key is made on the node and never leaves it; only the CSR (public key plus requested
//! identity, self-signed) travels to the collaboration CA.

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::{Error, Result, SpiffeId};

/// A node's ECDSA P-256 key pair.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    /// Generates a fresh P-256 key pair.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Loads a PKCS#8 PEM private key; only ECDSA P-256 keys are accepted.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(pem).map_err(|e| Error::InvalidKey(e.to_string()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(Error::KeyType {
                found: format!("{:?}", key.algorithm()),
            });
        }
        Ok(Self { key })
    }

    /// The private key as PKCS#8 PEM. Handle with care: write it with
    /// [`files::write_secret`](crate::files::write_secret) and never log it.
    pub fn private_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The private key as PKCS#8 DER.
    pub fn private_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn public_pem(&self) -> String {
        self.key.public_key_pem()
    }

    /// The public key as an uncompressed SEC1 point (`04 || X || Y`).
    pub fn public_point(&self) -> Vec<u8> {
        rcgen::PublicKeyData::der_bytes(&self.key).to_vec()
    }

    /// The underlying rcgen key pair.
    pub fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// Builds a CSR asking for `id`: URI SAN = the SPIFFE ID, DNS SAN = the node name.
    pub fn csr(&self, id: &SpiffeId) -> Result<Csr> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(id);
        params.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into()?),
            SanType::DnsName(id.dns_name().try_into()?),
        ];
        let csr = params.serialize_request(&self.key)?;
        Ok(Csr { pem: csr.pem()? })
    }
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("NodeKey(ECDSA P-256, redacted)")
    }
}

/// The subject DN fedmesh puts in CSRs and certificates: `CN=<dns name>, O=<org>`.
pub(crate) fn subject(id: &SpiffeId) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.dns_name());
    dn.push(DnType::OrganizationName, id.org());
    dn
}

/// A PEM-encoded PKCS#10 certificate signing request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Csr {
    /// The `CERTIFICATE REQUEST` PEM block.
    pub pem: String,
}
