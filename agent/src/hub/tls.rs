//! TLS for the hub. The hub has its own self-signed certificate, pinned by its SHA-256 in join
//! tokens and the CLI (no public CA is involved). Clients may present a collaboration
//! certificate; the TLS layer only checks that they hold its key, and the handlers verify the
//! chain against the collaboration the request is about.

use std::{path::Path, sync::Arc, time::SystemTime};

use anyhow::{Context, Result};
use fedmesh_certs::{
    NodeIdentity, files, fingerprint,
    tls::{HandshakeSignatures, provider},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

/// The hub's TLS certificate and key.
pub struct HubCert {
    cert: CertificateDer<'static>,
    key_pem: String,
}

impl HubCert {
    /// Makes `<dir>/hub-cert.pem` and `<dir>/hub-key.pem` (self-signed, key `0600`) with the
    /// given DNS names and IP addresses as SANs. Refuses to replace either: the certificate's
    /// pin is what every node and owner trusts the hub by.
    pub fn create(dir: &Path, names: &[String]) -> Result<Self> {
        let (cert_path, key_path) = paths(dir);
        files::refuse_existing(&cert_path)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fedmesh hub");
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
        let cert = params.self_signed(&key)?;
        files::create_secret(&key_path, key.serialize_pem().as_bytes())?;
        files::write_public(&cert_path, cert.pem().as_bytes())?;
        Self::load(dir)
    }

    /// Loads `<dir>/hub-cert.pem` and `<dir>/hub-key.pem`. A missing one is an error naming
    /// it, never a new certificate: that would change the pin every node trusts.
    pub fn load(dir: &Path) -> Result<Self> {
        let (cert_path, key_path) = paths(dir);
        for path in [&cert_path, &key_path] {
            if !path.exists() {
                anyhow::bail!(
                    "{} is missing: restore it from a backup (a new hub certificate changes the \
                     pin every node and owner trusts; `fedmesh hub --init` makes a new hub in \
                     an empty data directory)",
                    path.display()
                );
            }
        }
        super::files::check_private(&key_path)?;
        let cert_pem = files::read_to_string(&cert_path)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?;
        let hub = Self {
            cert,
            key_pem: files::read_to_string(&key_path)?,
        };
        hub.server_config().with_context(|| {
            format!(
                "{} and {} do not make a usable TLS identity",
                cert_path.display(),
                key_path.display()
            )
        })?;
        Ok(hub)
    }

    /// SHA-256 of the certificate: the pin clients check.
    pub fn pin(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The server config: TLS 1.3, optional client certificates of any issuer.
    pub fn server_config(&self) -> Result<ServerConfig> {
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("hub key is not PEM")?;
        let verifier = Arc::new(ClientCerts {
            pin: None,
            signatures: HandshakeSignatures::default(),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn paths(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join("hub-cert.pem"), dir.join("hub-key.pem"))
}

/// A client config that trusts exactly the hub certificate with SHA-256 `pin`, optionally
/// presenting a node identity.
pub fn client_config(
    pin: &str,
    identity: Option<&NodeIdentity>,
    key_pem: Option<&str>,
) -> Result<ClientConfig> {
    let verifier = Arc::new(PinnedServer {
        pin: pin.trim_start_matches("sha256:").to_ascii_lowercase(),
        signatures: HandshakeSignatures::default(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (identity, key_pem) {
        (Some(id), Some(key_pem)) => {
            let key =
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("node key is not PEM")?;
            builder.with_client_auth_cert(id.chain().to_vec(), key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config that trusts exactly the server certificate with SHA-256 `pin` (a rendezvous
/// server's), presenting `identity` and offering `alpn`.
pub fn pinned_client_config(
    pin: &str,
    identity: &NodeIdentity,
    alpn: &[u8],
) -> Result<ClientConfig> {
    let verifier = Arc::new(PinnedServer {
        pin: pin.trim_start_matches("sha256:").to_ascii_lowercase(),
        signatures: HandshakeSignatures::default(),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain().to_vec(), identity.key_der())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A client config that trusts exactly the server certificate with SHA-256 `pin`, presenting
/// `chain` and `key` (any certificate: a rendezvous server's own) and offering `alpn`.
pub fn pinned_client_config_presenting(
    pin: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<ClientConfig> {
    let verifier = Arc::new(PinnedServer {
        pin: pin.trim_start_matches("sha256:").to_ascii_lowercase(),
        signatures: HandshakeSignatures::default(),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Accepts client certificates whose key signed the handshake: any (optional; chains are
/// checked later, per collaboration, by the hub's handlers), or, with `pin`, exactly the
/// certificate of that SHA-256 (mandatory).
#[derive(Debug)]
struct ClientCerts {
    pin: Option<String>,
    signatures: HandshakeSignatures,
}

/// A client-certificate verifier that demands exactly the certificate of SHA-256 `pin` (the
/// rendezvous replicas' shared certificate).
pub fn pinned_client_verifier(pin: &str) -> Arc<dyn ClientCertVerifier> {
    Arc::new(ClientCerts {
        pin: Some(pin.trim_start_matches("sha256:").to_ascii_lowercase()),
        signatures: HandshakeSignatures::default(),
    })
}

impl ClientCertVerifier for ClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.pin.is_some()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.pin {
            Some(pin) if fingerprint(end_entity) != *pin => Err(rustls::Error::General(
                "not the pinned client certificate".into(),
            )),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Trusts exactly one server certificate, by SHA-256.
#[derive(Debug)]
struct PinnedServer {
    pin: String,
    signatures: HandshakeSignatures,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = fingerprint(end_entity);
        if found == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate sha256:{found} does not match the pinned sha256:{}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}
