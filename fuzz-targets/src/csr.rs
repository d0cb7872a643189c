//! Certificate signing requests as the CA receives them (the hub's online CA, `fedmesh ca
//! sign`): parsed, checked against the issuance policy, and signed by the collaboration CA.
//!
//! | byte % 3 | rest of the input |
//! |---|---|
//! | 0 | a PEM CSR |
//! | 1 | a DER CSR |
//! | 2 | a CSR body (`CertificationRequestInfo`) that a member signs with its own key: what a hostile member can send |
//!
//! Whatever the CA signs must chain to it, be an end-entity certificate, and name exactly one
//! SPIFFE ID inside the collaboration's trust domain.

use std::time::Duration;

use fedmesh_certs::{IssuancePolicy, IssuedCert, verify::Usage};

use crate::{der, fixed::fixed};

/// One input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixed();
    let policy = IssuancePolicy::default();
    let ttl = Duration::from_secs(3600);
    let issued = match mode % 3 {
        0 => {
            let Ok(pem) = std::str::from_utf8(rest) else {
                return;
            };
            f.ca.sign_csr_pem(pem, &policy, ttl, f.now)
        }
        1 => {
            // Over the cap, and zero, are refused before anything is parsed.
            assert!(
                policy
                    .check(f.ca.trust_domain(), rest, Duration::ZERO)
                    .is_err()
            );
            let over = policy.max_ttl() + Duration::from_secs(1);
            assert!(policy.check(f.ca.trust_domain(), rest, over).is_err());
            f.ca.sign_csr_der(rest, &policy, ttl, f.now)
        }
        _ => {
            let Some(csr) = der::sign(rest, &f.node_signer) else {
                return;
            };
            f.ca.sign_csr_der(&csr, &policy, ttl, f.now)
        }
    };
    if let Ok(issued) = issued {
        check_issued(&issued);
    }
}

fn check_issued(issued: &IssuedCert) {
    let f = fixed();
    let info = f
        .bundle
        .verify(std::slice::from_ref(&issued.der), f.now, Usage::Client)
        .unwrap_or_else(|e| panic!("the CA issued a certificate that does not verify: {e}"));
    assert_eq!(info, issued.info);
    assert_eq!(&info.spiffe_id.trust_domain(), f.bundle.trust_domain());
    // An end-entity certificate cannot act as a CA.
    assert!(fedmesh_certs::verify::ca_trust_domain(&issued.der).is_err());
}
