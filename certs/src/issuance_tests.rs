//! Issuance and verification, end to end in memory: good requests are signed with the right
//! extensions; every bad request is refused with its own reason.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, CustomExtension, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};

use crate::{
    CollabCa, Error, IssuancePolicy, NodeKey, SpiffeId,
    verify::{Usage, verify_chain},
};

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn ca() -> CollabCa {
    CollabCa::generate("collab-x", now() - HOUR, 365 * 24 * HOUR).unwrap()
}

fn good_csr(collab: &str) -> String {
    let key = NodeKey::generate().unwrap();
    key.csr(&SpiffeId::new(collab, "org-a", "n1").unwrap())
        .unwrap()
        .pem
}

/// A CSR with arbitrary SANs and options, bypassing the label checks `SpiffeId` applies.
fn raw_csr(
    key: &KeyPair,
    sans: Vec<SanType>,
    tweak: impl FnOnce(&mut CertificateParams),
) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    tweak(&mut params);
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

fn refuse(csr_pem: &str, ttl: Duration) -> String {
    ca().sign_csr_pem(csr_pem, &IssuancePolicy::default(), ttl, now())
        .unwrap_err()
        .to_string()
}

#[test]
fn signs_a_good_csr_with_the_required_profile() {
    let ca = ca();
    let issued = ca
        .sign_csr_pem(
            &good_csr("collab-x"),
            &IssuancePolicy::default(),
            24 * HOUR,
            now(),
        )
        .unwrap();
    let info = &issued.info;
    assert_eq!(
        info.spiffe_id.to_string(),
        "spiffe://collab-x.fedmesh/org/org-a/node/n1"
    );
    assert_eq!(info.not_after, now() + 24 * HOUR);
    assert_eq!(info.not_before, now() - Duration::from_secs(300));
    assert!(
        info.serial.len() >= 16,
        "serial {} is under 64 bits",
        info.serial
    );

    let (_, cert) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);

    let chain = [issued.der.clone()];
    let verified = verify_chain(&chain, ca.cert_der(), now(), Usage::Client).unwrap();
    assert_eq!(verified, issued.info);
}

#[test]
fn ca_is_a_constrained_root() {
    let ca = ca();
    let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert_eq!(ca.trust_domain().to_string(), "collab-x.fedmesh");
    // Reloading from PEM gives the same CA.
    let again = CollabCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(again.fingerprint(), ca.fingerprint());
}

#[test]
fn ca_key_must_match_certificate() {
    let a = ca();
    let b = ca();
    let err = CollabCa::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn refuses_identity_outside_trust_domain() {
    assert_eq!(
        refuse(&good_csr("other"), HOUR),
        "CSR identity spiffe://other.fedmesh/org/org-a/node/n1 is outside trust domain collab-x.fedmesh"
    );
}

#[test]
fn refuses_uppercase_labels() {
    let csr = raw_csr(
        &p256(),
        vec![uri("spiffe://collab-x.fedmesh/org/Org-A/node/n1")],
        |_| {},
    );
    assert_eq!(
        refuse(&csr, HOUR),
        r#"invalid organisation name "Org-A": must be lowercase, found 'O'"#
    );
}

#[test]
fn refuses_illegal_characters() {
    let csr = raw_csr(
        &p256(),
        vec![uri("spiffe://collab-x.fedmesh/org/org-a/node/n_1")],
        |_| {},
    );
    assert_eq!(
        refuse(&csr, HOUR),
        r#"invalid node name "n_1": contains illegal character '_' (allowed: a-z, 0-9, '-')"#
    );
}

#[test]
fn refuses_malformed_spiffe_path() {
    let csr = raw_csr(
        &p256(),
        vec![uri("spiffe://collab-x.fedmesh/ns/default/sa/x")],
        |_| {},
    );
    assert!(refuse(&csr, HOUR).contains("path must be /org/<org>/node/<node>"));
}

#[test]
fn refuses_ttl_over_cap() {
    assert_eq!(
        refuse(&good_csr("collab-x"), 25 * HOUR),
        "requested TTL 25h exceeds the cap of 24h"
    );
    let policy = IssuancePolicy::with_max_ttl(HOUR).unwrap();
    let err = ca()
        .sign_csr_pem(&good_csr("collab-x"), &policy, 2 * HOUR, now())
        .unwrap_err();
    assert_eq!(err.to_string(), "requested TTL 2h exceeds the cap of 1h");
}

#[test]
fn refuses_zero_ttl_and_caps_over_seven_days() {
    assert_eq!(
        refuse(&good_csr("collab-x"), Duration::ZERO),
        "certificate TTL must be positive"
    );
    assert_eq!(
        IssuancePolicy::with_max_ttl(8 * 24 * HOUR)
            .unwrap_err()
            .to_string(),
        "TTL cap 8d exceeds the hard maximum of 7d"
    );
    assert!(IssuancePolicy::with_max_ttl(7 * 24 * HOUR).is_ok());
    assert_eq!(
        IssuancePolicy::default()
            .with_backdate(Duration::from_secs(301))
            .unwrap_err()
            .to_string(),
        "notBefore back-dating 301s exceeds the maximum of 5m"
    );
}

#[test]
fn refuses_a_csr_asking_to_be_a_ca() {
    let csr = raw_csr(
        &p256(),
        vec![uri("spiffe://collab-x.fedmesh/org/org-a/node/n1")],
        |p| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
    );
    assert_eq!(
        refuse(&csr, HOUR),
        "CSR asks to be a CA (basicConstraints CA:TRUE); node identities cannot sign certificates"
    );
    let csr = raw_csr(
        &p256(),
        vec![uri("spiffe://collab-x.fedmesh/org/org-a/node/n1")],
        |p| p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign],
    );
    assert!(refuse(&csr, HOUR).contains("keyUsage keyCertSign"));
}

#[test]
fn refuses_disallowed_key_types() {
    let id = "spiffe://collab-x.fedmesh/org/org-a/node/n1";
    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    assert_eq!(
        refuse(&raw_csr(&ed, vec![uri(id)], |_| {}), HOUR),
        "key type Ed25519 is not allowed (allowed: ECDSA P-256)"
    );
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    assert_eq!(
        refuse(&raw_csr(&p384, vec![uri(id)], |_| {}), HOUR),
        "key type EC key on curve 1.3.132.0.34 is not allowed (allowed: ECDSA P-256)"
    );
}

#[test]
fn refuses_garbage_pem_and_malformed_der() {
    assert!(refuse("hello, CA", HOUR).starts_with("CSR is not valid PEM"));
    let junk = "-----BEGIN CERTIFICATE REQUEST-----\nAAECAwQF\n-----END CERTIFICATE REQUEST-----\n";
    assert!(
        refuse(junk, HOUR).starts_with("CSR is malformed"),
        "{}",
        refuse(junk, HOUR)
    );
}

#[test]
fn refuses_an_altered_csr() {
    // Swap the node name inside the signed request: the self-signature no longer verifies.
    let pem = good_csr("collab-x");
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut der = der.as_ref().to_vec();
    let pos = der
        .windows(2)
        .rposition(|w| w == b"n1")
        .expect("node name in the request");
    der[pos + 1] = b'2';
    let err = ca()
        .sign_csr_der(&der, &IssuancePolicy::default(), HOUR, now())
        .unwrap_err();
    assert!(matches!(err, Error::CsrSignature), "{err}");
}

#[test]
fn refuses_wrong_san_sets() {
    let id = "spiffe://collab-x.fedmesh/org/org-a/node/n1";
    assert_eq!(
        refuse(
            &raw_csr(&p256(), vec![dns("n1.org-a.collab-x.fedmesh")], |_| {}),
            HOUR
        ),
        "CSR must carry exactly one URI SAN (the SPIFFE ID), found 0"
    );
    assert_eq!(
        refuse(
            &raw_csr(
                &p256(),
                vec![uri(id), uri("spiffe://collab-x.fedmesh/org/org-a/node/n2")],
                |_| {}
            ),
            HOUR
        ),
        "CSR must carry exactly one URI SAN (the SPIFFE ID), found 2"
    );
    assert_eq!(
        refuse(
            &raw_csr(&p256(), vec![uri(id), dns("evil.example.com")], |_| {}),
            HOUR
        ),
        "CSR DNS SAN evil.example.com does not match the identity's name n1.org-a.collab-x.fedmesh"
    );
    let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
    assert!(refuse(&raw_csr(&p256(), vec![uri(id), ip], |_| {}), HOUR).contains("IP address"));
}

#[test]
fn refuses_unknown_extensions() {
    let csr = raw_csr(
        &p256(),
        vec![uri("spiffe://collab-x.fedmesh/org/org-a/node/n1")],
        |p| {
            p.custom_extensions =
                vec![CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![5, 0])];
        },
    );
    assert_eq!(
        refuse(&csr, HOUR),
        "CSR asks for extension 1.2.3.4, which the CA does not grant"
    );
}

#[test]
fn verification_names_each_failure() {
    let ca = ca();
    let issued = ca
        .sign_csr_pem(
            &good_csr("collab-x"),
            &IssuancePolicy::default(),
            HOUR,
            now(),
        )
        .unwrap();
    let chain = [issued.der.clone()];
    let at = |t| verify_chain(&chain, ca.cert_der(), t, Usage::Server).unwrap_err();
    assert!(matches!(at(now() + 2 * HOUR), Error::Expired { .. }));
    assert!(matches!(at(now() - HOUR), Error::NotYetValid { .. }));

    let other = CollabCa::generate("collab-x", now() - HOUR, 24 * HOUR).unwrap();
    let err = verify_chain(&chain, other.cert_der(), now(), Usage::Server).unwrap_err();
    assert_eq!(
        err.to_string(),
        "certificate was not issued by the collab-x.fedmesh collaboration CA"
    );

    let self_signed = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
    let chain = [CertificateDer::from(self_signed.cert.der().to_vec())];
    let err = verify_chain(&chain, ca.cert_der(), now(), Usage::Server).unwrap_err();
    assert!(matches!(err, Error::SelfSigned(_)), "{err}");
}
