//! Real rustls handshakes over loopback with the fedmesh configs: a good peer is accepted and
//! each kind of bad client certificate is refused with its own reason.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use fedmesh_certs::{
    CollabCa, IssuancePolicy, NodeIdentity, NodeKey, PeerGate, SpiffeId, Standing, TrustBundle,
    tls::{self, certificate_error},
};
use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOUR: Duration = Duration::from_secs(3600);
const ALPN: &[&[u8]] = &[b"fedmesh/1"];

struct Collab {
    ca: CollabCa,
    bundle: TrustBundle,
}

impl Collab {
    fn new(id: &str) -> Self {
        let ca = CollabCa::generate(id, SystemTime::now() - 72 * HOUR, 365 * 24 * HOUR).unwrap();
        let bundle = TrustBundle::from_pem(ca.cert_pem()).unwrap();
        Self { ca, bundle }
    }

    /// A node identity issued at `issued` for `ttl`.
    fn node_at(&self, org: &str, issued: SystemTime, ttl: Duration) -> NodeIdentity {
        let key = NodeKey::generate().unwrap();
        let id = SpiffeId::new(self.ca.trust_domain().collab(), org, "n1").unwrap();
        let csr = key.csr(&id).unwrap();
        let cert = self
            .ca
            .sign_csr_pem(&csr.pem, &IssuancePolicy::default(), ttl, issued)
            .unwrap();
        NodeIdentity::new(vec![cert.der], &key).unwrap()
    }

    fn node(&self, org: &str) -> NodeIdentity {
        self.node_at(org, SystemTime::now(), HOUR)
    }

    /// A certificate signed by this CA's key with arbitrary SANs, bypassing the issuance policy
    /// (what a compromised or sloppy CA could produce).
    fn forged(&self, sans: Vec<SanType>) -> (Vec<CertificateDer<'static>>, NodeKey) {
        let ca_key = KeyPair::from_pem(&self.ca.key_pem()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(self.ca.cert_pem(), ca_key).unwrap();
        let key = NodeKey::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(key.key_pair(), &issuer).unwrap();
        (vec![cert.der().clone()], key)
    }
}

/// Runs one handshake: a server presenting `server`, a client presenting `client` (or none),
/// dialling `dial`. Returns the server's and the client's results; on success the server sees
/// the client's SPIFFE ID and the bytes echo.
async fn handshake(
    bundle: &TrustBundle,
    server: &NodeIdentity,
    client: Option<rustls::ClientConfig>,
    dial: &SpiffeId,
) -> (Result<SpiffeId, rustls::Error>, Result<(), String>) {
    let config = tls::server_config(server, bundle, ALPN).unwrap();
    handshake_with(config, client, dial).await
}

/// [`handshake`] against a server with `config`.
async fn handshake_with(
    config: rustls::ServerConfig,
    client: Option<rustls::ClientConfig>,
    dial: &SpiffeId,
) -> (Result<SpiffeId, rustls::Error>, Result<(), String>) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let peer =
                    fedmesh_certs::verify::peer_spiffe_id(tls.get_ref().1.peer_certificates())
                        .expect("peer id");
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(&buf).await.unwrap();
                tls.shutdown().await.unwrap();
                Ok(peer)
            }
            Err(e) => Err(e
                .into_inner()
                .and_then(|inner| inner.downcast::<rustls::Error>().ok())
                .map(|b| *b)
                .unwrap_or(rustls::Error::General("unknown".into()))),
        }
    });
    let config = client.unwrap_or_else(|| {
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth()
    });
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_result = async {
        let mut tls = connector
            .connect(tls::server_name(dial), tcp)
            .await
            .map_err(
                |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(tls_err) => tls::describe(tls_err),
                    None => e.to_string(),
                },
            )?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }
    .await;
    (server_task.await.unwrap(), client_result)
}

/// The server's refusal, as fedmesh's own typed reason.
fn server_reason(result: Result<SpiffeId, rustls::Error>) -> String {
    let err = result.expect_err("server must refuse the client");
    match certificate_error(&err) {
        Some(e) => e.to_string(),
        None => panic!("not a fedmesh certificate error: {err}"),
    }
}

#[tokio::test]
async fn good_peers_see_each_others_spiffe_ids() {
    let c = Collab::new("collab-x");
    let (a, b) = (c.node("org-a"), c.node("org-b"));
    let client = tls::client_config(&a, &c.bundle, ALPN).unwrap();
    let (server, client) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    client.unwrap();
    assert_eq!(server.unwrap(), *a.spiffe_id());
}

#[tokio::test]
async fn refuses_a_cert_from_another_collaboration() {
    let (c, other) = (Collab::new("collab-x"), Collab::new("collab-y"));
    let b = c.node("org-b");
    let stranger = other.node("org-a");
    let client = tls::client_config(&stranger, &c.bundle, ALPN).unwrap();
    let (server, _) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    assert_eq!(
        server_reason(server),
        "certificate was not issued by the collab-x.fedmesh collaboration CA"
    );
}

#[tokio::test]
async fn refuses_an_expired_cert() {
    let c = Collab::new("collab-x");
    let b = c.node("org-b");
    let old = c.node_at("org-a", SystemTime::now() - 48 * HOUR, HOUR);
    let client = tls::client_config(&old, &c.bundle, ALPN).unwrap();
    let (server, _) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    assert!(server_reason(server).contains("certificate expired at"));
}

#[tokio::test]
async fn refuses_a_not_yet_valid_cert() {
    let c = Collab::new("collab-x");
    let b = c.node("org-b");
    let future = c.node_at("org-a", SystemTime::now() + 2 * HOUR, HOUR);
    let client = tls::client_config(&future, &c.bundle, ALPN).unwrap();
    let (server, _) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    assert!(server_reason(server).contains("certificate is not valid before"));
}

#[tokio::test]
async fn refuses_a_san_outside_the_trust_domain() {
    let c = Collab::new("collab-x");
    let b = c.node("org-b");
    let (chain, key) = c.forged(vec![SanType::URI(
        "spiffe://collab-y.fedmesh/org/org-a/node/n1"
            .try_into()
            .unwrap(),
    )]);
    let forged = NodeIdentity::new(chain, &key).unwrap();
    let client = tls::client_config(&forged, &c.bundle, ALPN).unwrap();
    let (server, _) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    assert!(
        server_reason(server)
            .contains("identity spiffe://collab-y.fedmesh/org/org-a/node/n1 is outside trust domain collab-x.fedmesh")
    );
}

#[tokio::test]
async fn refuses_a_cert_without_a_spiffe_id() {
    let c = Collab::new("collab-x");
    let b = c.node("org-b");
    let (chain, key) = c.forged(vec![SanType::DnsName(
        "n1.org-a.collab-x.fedmesh".try_into().unwrap(),
    )]);
    // NodeIdentity itself refuses such a certificate; build the client config by hand.
    let client = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_client_auth_cert(
            chain,
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.private_der().into()),
        )
        .unwrap();
    let (server, _) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    assert!(server_reason(server).contains("carries no SPIFFE ID"));
}

#[tokio::test]
async fn refuses_a_self_signed_cert() {
    let c = Collab::new("collab-x");
    let b = c.node("org-b");
    let key = NodeKey::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://collab-x.fedmesh/org/org-a/node/n1"
            .try_into()
            .unwrap(),
    )];
    let cert = params.self_signed(key.key_pair()).unwrap();
    let me = NodeIdentity::new(vec![cert.der().clone()], &key).unwrap();
    let client = tls::client_config(&me, &c.bundle, ALPN).unwrap();
    let (server, _) = handshake(&c.bundle, &b, Some(client), b.spiffe_id()).await;
    assert!(server_reason(server).contains("is self-signed"));
}

#[tokio::test]
async fn refuses_a_client_without_a_cert() {
    let c = Collab::new("collab-x");
    let b = c.node("org-b");
    let (server, _) = handshake(&c.bundle, &b, None, b.spiffe_id()).await;
    let err = server.expect_err("server must require a client certificate");
    assert!(
        matches!(err, rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_refuses_a_server_that_is_not_the_node_dialled() {
    let c = Collab::new("collab-x");
    let (a, b, cc) = (c.node("org-a"), c.node("org-b"), c.node("org-c"));
    let client = tls::client_config(&a, &c.bundle, ALPN).unwrap();
    // Dial org-b, but org-c answers.
    let (_, client) = handshake(&c.bundle, &cc, Some(client), b.spiffe_id()).await;
    let err = client.unwrap_err();
    assert!(
        err.contains("peer presented spiffe://collab-x.fedmesh/org/org-c/node/n1, expected spiffe://collab-x.fedmesh/org/org-b/node/n1"),
        "{err}"
    );
}

/// Accepts any server certificate: for the tests that exercise the server side only.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn a_gate_refuses_revoked_serials_revoked_nodes_and_non_members_and_reports_each() {
    let c = Collab::new("collab-x");
    let server = c.node("org-s");
    let a = c.node("org-a");
    let serial = a.info().serial.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let observer = {
        let seen = seen.clone();
        Arc::new(
            move |e: &fedmesh_certs::Error, info: Option<&fedmesh_certs::CertInfo>| {
                let who = info.map(|i| format!("{} {}", i.spiffe_id, i.serial));
                seen.lock()
                    .unwrap()
                    .push(format!("{} | {e}", who.unwrap_or_default()));
            },
        )
    };
    let gate = PeerGate::new(Standing::default()).observed(observer);
    let pair = |org: &str| (org.to_owned(), "n1".to_owned());
    let cases = [
        (Standing::new([pair("org-s"), pair("org-a")], [], []), None),
        (
            Standing::new([pair("org-s"), pair("org-a")], [], [serial.clone()]),
            Some("its certificate serial is revoked"),
        ),
        (
            Standing::new([pair("org-s"), pair("org-a")], [pair("org-a")], []),
            Some("its node is revoked"),
        ),
        (
            Standing::new([pair("org-s")], [], []),
            Some("its node is not a member of the collaboration"),
        ),
        (Standing::default(), Some("members are not known yet")),
    ];
    for (standing, refused) in cases {
        gate.set(standing);
        let config = tls::server_config_gated(&server, &c.bundle, ALPN, &gate).unwrap();
        let client = tls::client_config(&a, &c.bundle, ALPN).unwrap();
        let (result, _) = handshake_with(config, Some(client), server.spiffe_id()).await;
        match refused {
            None => assert_eq!(result.unwrap(), *a.spiffe_id()),
            Some(why) => {
                let reason = server_reason(result);
                assert!(
                    reason.starts_with(&format!(
                        "peer spiffe://collab-x.fedmesh/org/org-a/node/n1 (certificate serial {serial}) is refused"
                    )) && reason.contains(why),
                    "{reason}"
                );
            }
        }
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen.iter().all(|line| line.starts_with(&format!(
            "spiffe://collab-x.fedmesh/org/org-a/node/n1 {serial} |"
        ))),
        "{seen:?}"
    );
}
