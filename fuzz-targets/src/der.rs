//! Just enough DER to re-sign a fuzzed certificate or CSR body: the outer
//! `SEQUENCE { body, ecdsa-with-SHA256, BIT STRING signature }` of both, and reading the body
//! back out of a real one (for seeds).

use ring::{rand::SystemRandom, signature::EcdsaKeyPair};

/// AlgorithmIdentifier ecdsa-with-SHA256 (1.2.840.10045.4.3.2), no parameters.
const ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

/// One DER element: tag, definite length, content.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// `body` signed with `key` (ECDSA P-256, SHA-256) in the shape certificates and CSRs share.
pub(crate) fn sign(body: &[u8], key: &EcdsaKeyPair) -> Option<Vec<u8>> {
    let signature = key.sign(&SystemRandom::new(), body).ok()?;
    let mut bits = vec![0u8];
    bits.extend_from_slice(signature.as_ref());
    let mut content = body.to_vec();
    content.extend_from_slice(ECDSA_SHA256);
    content.extend_from_slice(&tlv(0x03, &bits));
    Some(tlv(0x30, &content))
}

/// The first element inside a DER SEQUENCE: the signed body of a certificate or CSR.
pub(crate) fn signed_body(der: &[u8]) -> Option<&[u8]> {
    let (_, inner) = element(der)?;
    let (first, _) = element(inner)?;
    Some(first)
}

/// Splits one element off `der`: (the whole element, its content).
fn element(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let first = *der.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        let bytes = der.get(2..2 + n)?;
        (
            2 + n,
            bytes
                .iter()
                .fold(0usize, |acc, b| acc << 8 | usize::from(*b)),
        )
    };
    let whole = der.get(..header.checked_add(len)?)?;
    Some((whole, &whole[header..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_body_round_trips() {
        let body = tlv(0x30, &[0x02, 0x01, 0x05]);
        let key = &crate::fixed::fixed().node_signer;
        let signed = sign(&body, key).unwrap();
        assert_eq!(signed_body(&signed), Some(&body[..]));
        let long = tlv(0x30, &[0u8; 300]);
        assert_eq!(signed_body(&sign(&long, key).unwrap()), Some(&long[..]));
    }
}
