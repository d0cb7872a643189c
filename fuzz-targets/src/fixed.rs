//! Fixed test credentials: one collaboration (`collab-x`, owner, CA, nodes `org-a/n1`,
//! `org-b/n1`, `org-c/n1`) whose keys are committed in `keys/`, so that signed inputs in the
//! committed corpus keep verifying from one run to the next. They are test keys and protect
//! nothing. `cargo test -p fedmesh-fuzz-targets -- --ignored write_keys` makes new ones (the
//! signed corpus files then stop verifying and should be regenerated with `write_seeds`).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use fedmesh_certs::{CertInfo, CollabCa, NodeKey, TrustBundle};
use fedmesh_documents::{
    Ledger, NodeRef, NodeSigner, OwnerKey, Verdict,
    fixtures::{EnrolledNode, Fixture},
};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};

/// The collaboration.
pub const COLLAB: &str = "collab-x";
/// Its members.
pub const NODES: [&str; 3] = ["org-a/n1", "org-b/n1", "org-c/n1"];

const OWNER_KEY: &str = include_str!("../keys/owner-key.pem");
const CA_CERT: &str = include_str!("../keys/ca.pem");
const CA_KEY: &str = include_str!("../keys/ca-key.pem");
const NODE_FILES: [(&str, &str); 3] = [
    (
        include_str!("../keys/org-a-n1.pem"),
        include_str!("../keys/org-a-n1-key.pem"),
    ),
    (
        include_str!("../keys/org-b-n1.pem"),
        include_str!("../keys/org-b-n1-key.pem"),
    ),
    (
        include_str!("../keys/org-c-n1.pem"),
        include_str!("../keys/org-c-n1-key.pem"),
    ),
];

/// The documents fixture with the committed keys in place of fresh ones.
pub fn fixture() -> Fixture {
    let mut f = Fixture::new(COLLAB, &NODES);
    f.owner = OwnerKey::from_pem(OWNER_KEY).expect("committed owner key");
    f.ca = CollabCa::from_pem(CA_CERT, CA_KEY).expect("committed CA");
    f.collab.owner_key = f.owner.public_jwk();
    f.collab.ca_pem = CA_CERT.to_owned();
    for (name, (cert_pem, key_pem)) in NODES.iter().zip(NODE_FILES) {
        let serial = CertInfo::parse(&first_cert(cert_pem))
            .expect("committed node certificate")
            .serial;
        let node: NodeRef = name.parse().expect("member name");
        f.nodes.insert(
            node,
            EnrolledNode {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
                serial,
            },
        );
    }
    f
}

/// What the targets share, made once per process.
pub struct Fixed {
    /// The fixture's clock: every verification happens at this time.
    pub now: SystemTime,
    /// The owner's key.
    pub owner: OwnerKey,
    /// Node document signers.
    pub signers: BTreeMap<NodeRef, NodeSigner>,
    /// The CA's trust bundle.
    pub bundle: TrustBundle,
    /// The CA, for issuing.
    pub ca: CollabCa,
    /// The CA's key, for signing arbitrary certificate bodies.
    pub ca_signer: EcdsaKeyPair,
    /// `org-a/n1`'s key, for signing arbitrary CSR bodies.
    pub node_signer: EcdsaKeyPair,
    /// `org-a/n1`'s certificate.
    pub node_cert: CertificateDer<'static>,
    /// A ledger with the collaboration, an active link org-a/n1 → org-b/n1, advertisements and
    /// a first revocation list.
    pub ledger: Ledger,
}

/// The shared state.
pub fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let f = fixture();
        let mut ledger = Ledger::new(&f.pin());
        let terms = f.terms(
            "org-a/n1",
            "org-b/n1",
            &["11365:mpc"],
            Duration::from_secs(3600),
        );
        for jws in [
            f.collab_jws(),
            f.request(&terms),
            f.approval(&terms),
            f.decision(&terms, Verdict::Consent),
            f.advertisement("org-a/n1", "127.0.0.1:4433"),
            f.advertisement("org-b/n1", "127.0.0.1:4434"),
            f.revocation(1, &[]),
        ] {
            ledger
                .ingest(&f.envelope(jws), f.now)
                .expect("fixture document");
        }
        let signers = f
            .nodes
            .iter()
            .map(|(node, enrolled)| (node.clone(), enrolled.signer()))
            .collect();
        let (org_a_cert, org_a_key) = NODE_FILES[0];
        Fixed {
            now: f.now,
            owner: OwnerKey::from_pem(OWNER_KEY).expect("committed owner key"),
            signers,
            bundle: TrustBundle::from_pem(CA_CERT).expect("committed CA"),
            ca: CollabCa::from_pem(CA_CERT, CA_KEY).expect("committed CA"),
            ca_signer: signing_key(CA_KEY),
            node_signer: signing_key(org_a_key),
            node_cert: first_cert(org_a_cert),
            ledger,
        }
    })
}

fn signing_key(pem: &str) -> EcdsaKeyPair {
    let der = NodeKey::from_pem(pem).expect("committed key").private_der();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &SystemRandom::new())
        .expect("committed key is P-256 PKCS#8")
}

/// The first certificate of a PEM bundle.
pub fn first_cert(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("committed certificate")
}

/// Writes fresh credentials into `dir` (the `keys/` directory).
pub fn write_keys(dir: &Path) -> std::io::Result<()> {
    let f = Fixture::new(COLLAB, &NODES);
    let mut files = vec![
        ("owner-key.pem".to_owned(), f.owner.private_pem()),
        ("ca.pem".to_owned(), f.ca.cert_pem().to_owned()),
        ("ca-key.pem".to_owned(), f.ca.key_pem()),
    ];
    for (node, enrolled) in &f.nodes {
        let stem = format!("{}-{}", node.org, node.node);
        files.push((format!("{stem}.pem"), enrolled.cert_pem.clone()));
        files.push((format!("{stem}-key.pem"), enrolled.key_pem.clone()));
    }
    std::fs::create_dir_all(dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}
