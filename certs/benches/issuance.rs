//! Issuance and verification throughput: CSR checks + signing per second, and chain
//! verification per second, each next to the raw ECDSA P-256 operation it is built on (the
//! baseline, measured in the same run), so the ratio shows what the policy and X.509 work cost
//! on top of the crypto.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop loudly

use std::{
    hint::black_box,
    time::{Duration, Instant, SystemTime},
};

use criterion::Criterion;
use fedmesh_certs::{CollabCa, IssuancePolicy, NodeKey, SpiffeId, verify};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    },
};
use rustls_pki_types::CertificateDer;

/// Everything the operations need, made once.
struct Fixture {
    now: SystemTime,
    ca: CollabCa,
    csr_pem: String,
    policy: IssuancePolicy,
    chain: [CertificateDer<'static>; 1],
    rng: SystemRandom,
    raw: EcdsaKeyPair,
    message: [u8; 300],
    signature: Vec<u8>,
    public: UnparsedPublicKey<Vec<u8>>,
}

const TTL: Duration = Duration::from_secs(3600);

impl Fixture {
    fn new() -> Self {
        let now = SystemTime::now();
        let ca = CollabCa::generate(
            "bench",
            now - Duration::from_secs(60),
            Duration::from_secs(86_400),
        )
        .unwrap();
        let key = NodeKey::generate().unwrap();
        let csr_pem = key
            .csr(&SpiffeId::new("bench", "org-a", "n1").unwrap())
            .unwrap()
            .pem;
        let policy = IssuancePolicy::default();
        let chain = [ca.sign_csr_pem(&csr_pem, &policy, TTL, now).unwrap().der];
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let raw = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let message = [7u8; 300];
        let signature = raw.sign(&rng, &message).unwrap().as_ref().to_vec();
        let public =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, raw.public_key().as_ref().to_vec());
        Self {
            now,
            ca,
            csr_pem,
            policy,
            chain,
            rng,
            raw,
            message,
            signature,
            public,
        }
    }

    fn sign(&self) {
        black_box(self.raw.sign(&self.rng, black_box(&self.message)).unwrap());
    }

    fn issue(&self) {
        black_box(
            self.ca
                .sign_csr_pem(black_box(&self.csr_pem), &self.policy, TTL, self.now)
                .unwrap(),
        );
    }

    fn verify(&self) {
        self.public
            .verify(black_box(&self.message), &self.signature)
            .unwrap();
    }

    fn verify_chain(&self) {
        black_box(
            verify::verify_chain(
                &self.chain,
                self.ca.cert_der(),
                self.now,
                verify::Usage::Client,
            )
            .unwrap(),
        );
    }
}

/// Operations per second of `f` over about a second.
fn rate(f: impl Fn()) -> f64 {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(1) {
        f();
        n += 1;
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

fn main() {
    let f = Fixture::new();
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("issuance");
    g.bench_function("baseline: ECDSA P-256 sign", |b| b.iter(|| f.sign()));
    g.bench_function("CSR check + sign", |b| b.iter(|| f.issue()));
    g.finish();
    let mut g = c.benchmark_group("verification");
    g.bench_function("baseline: ECDSA P-256 verify", |b| b.iter(|| f.verify()));
    g.bench_function("chain verify + SPIFFE ID", |b| b.iter(|| f.verify_chain()));
    g.finish();
    c.final_summary();

    let (sign, issue) = (rate(|| f.sign()), rate(|| f.issue()));
    let (verify, chain) = (rate(|| f.verify()), rate(|| f.verify_chain()));
    println!("\n| operation | per second | baseline per second | time vs baseline |");
    println!("|---|---:|---:|---:|");
    println!(
        "| CSR check + sign (vs ECDSA P-256 sign) | {issue:.0} | {sign:.0} | {:.2}x |",
        sign / issue
    );
    println!(
        "| chain verify + SPIFFE ID (vs ECDSA P-256 verify) | {chain:.0} | {verify:.0} | {:.2}x |",
        verify / chain
    );
}
