//! rustls configs for mutual TLS inside one collaboration.
//!
//! Both ends present their node certificate and accept only peers whose chain ends at the
//! collaboration CA and whose URI SAN is a SPIFFE ID of its trust domain. A client additionally
//! checks that the server is the node it dialled: the TLS server name is the node's DNS name
//! (`<node>.<org>.<collab>.fedmesh`) and must match the SPIFFE ID in the certificate.
//!
//! A [`PeerGate`] adds the peer's [`Standing`]: a revoked serial or node, or a node that is not
//! a member, cannot complete a handshake. The gate's owner replaces the standing whenever its
//! verified ledger changes; every later handshake sees the new one.
//!
//! ```text
//!  handshake ──▶ chain to the CA, SPIFFE ID of the trust domain ──▶ gate: Standing::check
//!                      │ refused                                        │ refused
//!                      └──────────────▶ gate's observer (logs, metrics) ◀┘
//! ```
//!
//! Only TLS 1.3 and the *ring* provider are used.

use std::{
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject,
};

use crate::{
    CertInfo, Error, NodeKey, Result, SpiffeId, TrustDomain,
    standing::Standing,
    verify::{self, Usage},
};

/// The crypto provider fedmesh uses everywhere: *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handshake-signature checks every fedmesh verifier shares: TLS 1.3 only, with *ring*'s
/// algorithms. Verifiers delegate their three signature methods here.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeSignatures(WebPkiSupportedAlgorithms);

impl Default for HandshakeSignatures {
    fn default() -> Self {
        Self(provider().signature_verification_algorithms)
    }
}

impl HandshakeSignatures {
    /// TLS 1.2 is never offered, so its signatures are never checked.
    pub fn tls12(&self) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    /// Checks a TLS 1.3 `CertificateVerify` signature.
    pub fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    /// The signature schemes offered.
    pub fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A collaboration's trust anchor: its CA certificate.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    ca: CertificateDer<'static>,
    trust_domain: TrustDomain,
}

impl TrustBundle {
    /// Reads a CA certificate (PEM) and checks it is a fedmesh collaboration CA.
    pub fn from_pem(ca_pem: &str) -> Result<Self> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| Error::Pem {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        Self::from_der(ca)
    }

    /// Wraps a DER CA certificate.
    pub fn from_der(ca: CertificateDer<'static>) -> Result<Self> {
        let trust_domain = verify::ca_trust_domain(&ca)?;
        Ok(Self { ca, trust_domain })
    }

    /// The trust domain the CA anchors.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Verifies a node certificate chain at `now`.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<CertInfo> {
        verify::verify_chain(chain, &self.ca, now, usage)
    }
}

/// A node's certificate and private key: what it presents in handshakes.
pub struct NodeIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    info: CertInfo,
}

impl NodeIdentity {
    /// Loads a certificate (PEM, leaf first) and its private key (PKCS#8 PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Pem {
                what: "certificate",
                reason: e.to_string(),
            })?;
        let key = NodeKey::from_pem(key_pem)?;
        Self::new(chain, &key)
    }

    /// Pairs a certificate chain with the key it certifies.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: &NodeKey) -> Result<Self> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Chain("empty certificate chain".into()))?;
        let info = CertInfo::parse(leaf)?;
        if verify::public_key_of(leaf)? != key.public_point() {
            return Err(Error::InvalidKey(
                "the private key does not match the certificate".into(),
            ));
        }
        Ok(Self {
            chain,
            key: PrivatePkcs8KeyDer::from(key.private_der()),
            info,
        })
    }

    /// The identity's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.info.spiffe_id
    }

    /// What the certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key (PKCS#8 DER), for TLS configs.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("spiffe_id", &self.info.spiffe_id.to_string())
            .field("serial", &self.info.serial)
            .finish_non_exhaustive()
    }
}

/// Called with every refusal a gated verifier makes: the error, and what the peer's leaf
/// certificate claims when it parses (unverified when the chain was the problem).
pub type RefusalObserver = Arc<dyn Fn(&Error, Option<&CertInfo>) + Send + Sync>;

/// The standing every handshake of a config is checked against, shared with whoever keeps it
/// current. Cloning shares the same gate.
#[derive(Clone)]
pub struct PeerGate {
    standing: Option<Arc<RwLock<Arc<Standing>>>>,
    observer: Option<RefusalObserver>,
}

impl PeerGate {
    /// A gate holding `standing`, to be replaced with [`PeerGate::set`].
    pub fn new(standing: Standing) -> Self {
        Self {
            standing: Some(Arc::new(RwLock::new(Arc::new(standing)))),
            observer: None,
        }
    }

    /// No check beyond the chain and the trust domain (tools and tests that hold no ledger).
    pub fn chain_only() -> Self {
        Self {
            standing: None,
            observer: None,
        }
    }

    /// The same gate, with `observer` called on every refusal.
    pub fn observed(mut self, observer: RefusalObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Replaces the standing; handshakes from now on are checked against it.
    pub fn set(&self, standing: Standing) {
        if let Some(lock) = &self.standing {
            *lock
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(standing);
        }
    }

    /// The current standing (`None` for a chain-only gate).
    pub fn standing(&self) -> Option<Arc<Standing>> {
        self.standing.as_ref().map(|lock| {
            lock.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    fn check(&self, info: &CertInfo) -> Result<()> {
        match self.standing() {
            Some(standing) => standing.check(&info.spiffe_id, &info.serial),
            None => Ok(()),
        }
    }

    fn observe(&self, error: &Error, end_entity: &CertificateDer<'_>) {
        if let Some(observer) = &self.observer {
            observer(error, CertInfo::parse(end_entity).ok().as_ref());
        }
    }
}

impl std::fmt::Debug for PeerGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGate")
            .field("standing", &self.standing())
            .field("observed", &self.observer.is_some())
            .finish()
    }
}

/// A server config: presents `identity`, requires a client certificate of `bundle`'s trust
/// domain. `alpn` is set as given (e.g. `fedmesh/1`). Checks only the chain: see
/// [`server_config_gated`].
pub fn server_config(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    alpn: &[&[u8]],
) -> Result<ServerConfig> {
    server_config_gated(identity, bundle, alpn, &PeerGate::chain_only())
}

/// [`server_config`] whose client certificates must also pass `gate`.
pub fn server_config_gated(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    alpn: &[&[u8]],
    gate: &PeerGate,
) -> Result<ServerConfig> {
    server_config_for_members(
        identity.chain.clone(),
        identity.key_der(),
        bundle,
        alpn,
        gate,
    )
}

/// A server config presenting a certificate of its own (`chain`, `key`: a rendezvous server's,
/// not a node's) that requires a client certificate of `bundle`'s trust domain passing `gate`.
pub fn server_config_for_members(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: &TrustBundle,
    alpn: &[&[u8]],
    gate: &PeerGate,
) -> Result<ServerConfig> {
    let verifier = Arc::new(SpiffeVerifier::new(bundle.clone(), gate.clone()));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config: presents `identity`, accepts only servers of `bundle`'s trust domain whose
/// SPIFFE ID matches the server name dialled (the node's DNS name). Checks only the chain: see
/// [`client_config_gated`].
pub fn client_config(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    alpn: &[&[u8]],
) -> Result<ClientConfig> {
    client_config_gated(identity, bundle, alpn, &PeerGate::chain_only())
}

/// [`client_config`] whose server certificates must also pass `gate`.
pub fn client_config_gated(
    identity: &NodeIdentity,
    bundle: &TrustBundle,
    alpn: &[&[u8]],
    gate: &PeerGate,
) -> Result<ClientConfig> {
    let verifier = Arc::new(SpiffeVerifier::new(bundle.clone(), gate.clone()));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key_der())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The TLS server name to dial a node by.
pub fn server_name(id: &SpiffeId) -> ServerName<'static> {
    // A SPIFFE ID's DNS name is made of validated labels, so it is always a valid DNS name.
    ServerName::try_from(id.dns_name()).unwrap_or_else(|_| unreachable!("validated labels"))
}

/// Verifies peers against one collaboration CA and its SPIFFE trust domain, both directions,
/// then against the gate's standing.
#[derive(Debug)]
struct SpiffeVerifier {
    bundle: TrustBundle,
    gate: PeerGate,
    signatures: HandshakeSignatures,
    root_hints: Vec<DistinguishedName>,
}

impl SpiffeVerifier {
    fn new(bundle: TrustBundle, gate: PeerGate) -> Self {
        let root_hints = x509_parser::parse_x509_certificate(bundle.ca_der())
            .map(|(_, c)| vec![DistinguishedName::from(c.subject().as_raw().to_vec())])
            .unwrap_or_default();
        Self {
            bundle,
            gate,
            signatures: HandshakeSignatures::default(),
            root_hints,
        }
    }

    /// The chain, the identity `check` asks for, then the standing; every refusal goes to the
    /// gate's observer.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
        check: impl FnOnce(&CertInfo) -> Result<()>,
    ) -> Result<CertInfo, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
        let verified = self.bundle.verify(&chain, now, usage).and_then(|info| {
            check(&info)?;
            self.gate.check(&info)?;
            Ok(info)
        });
        verified.map_err(|e| {
            self.gate.observe(&e, end_entity);
            to_rustls(e)
        })
    }
}

/// Keeps our typed reason inside the rustls error, so logs and tests see exactly why.
fn to_rustls(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Usage::Client, |_| Ok(()))?;
        Ok(ClientCertVerified::assertion())
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

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let dialled = |info: &CertInfo| {
            let expected = match server_name {
                ServerName::DnsName(name) => SpiffeId::from_dns_name(name.as_ref())?,
                other => {
                    return Err(Error::InvalidSpiffeId {
                        value: format!("{other:?}"),
                        reason: "dial a node by its DNS name <node>.<org>.<collab>.fedmesh".into(),
                    });
                }
            };
            if info.spiffe_id != expected {
                return Err(Error::UnexpectedPeer {
                    expected: expected.to_string(),
                    found: info.spiffe_id.to_string(),
                });
            }
            Ok(())
        };
        self.verify(end_entity, intermediates, now, Usage::Server, dialled)?;
        Ok(ServerCertVerified::assertion())
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

/// Finds fedmesh's own typed reason inside a rustls error, if there is one.
pub fn certificate_error(err: &rustls::Error) -> Option<&Error> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<Error>()
        }
        _ => None,
    }
}

/// A rustls error in words, with fedmesh's own reason when it carries one (rustls prints
/// custom certificate errors with `Debug`).
pub fn describe(err: &rustls::Error) -> String {
    match certificate_error(err) {
        Some(e) => format!("invalid peer certificate: {e}"),
        None => err.to_string(),
    }
}
