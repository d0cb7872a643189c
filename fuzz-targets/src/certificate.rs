//! Certificates as fedmesh receives them (TLS handshakes at the relay and hub, `x5c` chains in
//! node documents, offline-signed certificates at enrollment, a collaboration document's CA):
//! parsed, and verified to the collaboration CA.
//!
//! | byte % 4 | rest of the input |
//! |---|---|
//! | 0 | a DER certificate: read, and verified alone and as a chain with a real node certificate |
//! | 1 | PEM certificates, as `fedmesh enroll --cert` sends them: verified as a chain |
//! | 2 | a DER CA certificate (a collaboration document's `ca_pem`): a real node certificate verified to it |
//! | 3 | a certificate body (`TBSCertificate`) signed with the CA's key: what a CA would have to sign to get it past verification |
//!
//! A chain that verifies names exactly one SPIFFE ID inside the CA's trust domain.

use fedmesh_certs::{CertInfo, TrustBundle, verify::Usage};
use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::{der, fixed::fixed};

/// One input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixed();
    match mode % 4 {
        0 => {
            let _ = CertInfo::parse(rest);
            let _ = fedmesh_certs::verify::public_key_of(rest);
            let cert = CertificateDer::from(rest);
            let _ = fedmesh_certs::verify::peer_spiffe_id(Some(std::slice::from_ref(&cert)));
            verify(&f.bundle, std::slice::from_ref(&cert));
            verify(&f.bundle, &[f.node_cert.clone(), cert.clone()]);
            verify(&f.bundle, &[cert, f.node_cert.clone()]);
        }
        1 => {
            let Ok(chain) = CertificateDer::pem_slice_iter(rest).collect::<Result<Vec<_>, _>>()
            else {
                return;
            };
            verify(&f.bundle, &chain);
        }
        2 => {
            if let Ok(bundle) = TrustBundle::from_der(CertificateDer::from(rest.to_vec())) {
                verify(&bundle, std::slice::from_ref(&f.node_cert));
            }
        }
        _ => {
            if let Some(cert) = der::sign(rest, &f.ca_signer) {
                verify(&f.bundle, &[CertificateDer::from(cert)]);
            }
        }
    }
}

fn verify(bundle: &TrustBundle, chain: &[CertificateDer<'_>]) {
    let now = fixed().now;
    for usage in [Usage::Client, Usage::Server] {
        if let Ok(info) = bundle.verify(chain, now, usage) {
            assert_eq!(&info.spiffe_id.trust_domain(), bundle.trust_domain());
            assert_eq!(CertInfo::parse(&chain[0]).ok(), Some(info));
        }
    }
}
