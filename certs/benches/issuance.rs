//! Issuance and verification throughput: CSR checks + signing per second, and chain
//! verification per second, each next to the raw ECDSA P-256 operation it is built on (the
//! baseline), so the ratio shows what the policy and X.509 work cost on top of the crypto.

use std::{
    hint::black_box,
    time::{Duration, SystemTime},
};

use criterion::{Criterion, criterion_group, criterion_main};
use fedmesh_certs::{CollabCa, IssuancePolicy, NodeKey, SpiffeId, verify};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair},
};

fn bench(c: &mut Criterion) {
    let now = SystemTime::now();
    let ca = CollabCa::generate(
        "bench",
        now - Duration::from_secs(60),
        Duration::from_secs(86_400),
    )
    .unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key
        .csr(&SpiffeId::new("bench", "org-a", "n1").unwrap())
        .unwrap();
    let policy = IssuancePolicy::default();
    let ttl = Duration::from_secs(3600);
    let issued = ca.sign_csr_pem(&csr.pem, &policy, ttl, now).unwrap();
    let chain = [issued.der.clone()];

    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let raw =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let message = [7u8; 300];
    let signature = raw.sign(&rng, &message).unwrap();
    let public = ring::signature::UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        raw.public_key().as_ref().to_vec(),
    );

    let mut g = c.benchmark_group("issuance");
    g.bench_function("baseline: ECDSA P-256 sign", |b| {
        b.iter(|| raw.sign(&rng, black_box(&message)).unwrap())
    });
    g.bench_function("CSR check + sign", |b| {
        b.iter(|| {
            ca.sign_csr_pem(black_box(&csr.pem), &policy, ttl, now)
                .unwrap()
        })
    });
    g.finish();
    let mut g = c.benchmark_group("verification");
    g.bench_function("baseline: ECDSA P-256 verify", |b| {
        b.iter(|| {
            public
                .verify(black_box(&message), signature.as_ref())
                .unwrap()
        })
    });
    g.bench_function("chain verify + SPIFFE ID", |b| {
        b.iter(|| {
            verify::verify_chain(black_box(&chain), ca.cert_der(), now, verify::Usage::Client)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
