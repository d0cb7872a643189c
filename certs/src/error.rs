use std::{path::PathBuf, time::Duration};

/// Everything that can go wrong creating, issuing or verifying a collaboration identity.
///
/// Each variant names the input that was wrong, so the message alone tells an operator what to
/// fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A collaboration, organisation or node name is not a lowercase DNS label.
    #[error("invalid {kind} name {value:?}: {reason}")]
    InvalidLabel {
        /// Which name: `collaboration`, `organisation` or `node`.
        kind: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A string is not a fedmesh SPIFFE ID.
    #[error("invalid SPIFFE ID {value:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The identity in a CSR or certificate belongs to another trust domain.
    #[error("{what} identity {id} is outside trust domain {trust_domain}")]
    OutsideTrustDomain {
        /// `CSR` or `certificate`.
        what: &'static str,
        /// The identity found.
        id: String,
        /// The trust domain expected.
        trust_domain: String,
    },
    /// Input is not the PEM it should be.
    #[error("{what} is not valid PEM: {reason}")]
    Pem {
        /// What was being read, e.g. `CSR`.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The CSR parses as PEM but not as a PKCS#10 request.
    #[error("CSR is malformed: {0}")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify with its own public key.
    #[error("CSR self-signature is invalid (the request was altered or not signed by its key)")]
    CsrSignature,
    /// The CSR asks for CA powers.
    #[error("CSR asks to be a CA ({0}); node identities cannot sign certificates")]
    CsrRequestsCa(&'static str),
    /// The CSR's key is of a type the CA does not sign.
    #[error("key type {found} is not allowed (allowed: ECDSA P-256)")]
    KeyType {
        /// The key type found.
        found: String,
    },
    /// The CSR does not carry exactly one URI SAN.
    #[error("CSR must carry exactly one URI SAN (the SPIFFE ID), found {0}")]
    UriSanCount(usize),
    /// The CSR's DNS SAN is not the node name that goes with its SPIFFE ID.
    #[error("CSR DNS SAN {found} does not match the identity's name {expected}")]
    DnsSanMismatch {
        /// The DNS SAN requested.
        found: String,
        /// The DNS name that belongs to the SPIFFE ID.
        expected: String,
    },
    /// The CSR asks for a subject alternative name the CA never grants.
    #[error(
        "CSR asks for a {0} subject alternative name; only the SPIFFE URI and node DNS name are allowed"
    )]
    DisallowedSan(String),
    /// The CSR asks for an extension the CA never grants.
    #[error("CSR asks for extension {0}, which the CA does not grant")]
    DisallowedExtension(String),
    /// The requested lifetime is zero.
    #[error("certificate TTL must be positive")]
    ZeroTtl,
    /// The requested lifetime is over the CA's cap.
    #[error("requested TTL {requested} exceeds the cap of {cap}", requested = humantime_like(*requested), cap = humantime_like(*cap))]
    TtlOverCap {
        /// TTL asked for.
        requested: Duration,
        /// The policy's cap.
        cap: Duration,
    },
    /// A policy's TTL cap is above the hard maximum.
    #[error("TTL cap {} exceeds the hard maximum of 7d", humantime_like(*.0))]
    CapOverHardMax(Duration),
    /// A policy's back-dating is above five minutes.
    #[error("notBefore back-dating {} exceeds the maximum of 5m", humantime_like(*.0))]
    BackdateTooLarge(Duration),
    /// The certificate is not valid yet at `now`.
    #[error("certificate is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// Certificate's notBefore (RFC 3339).
        not_before: String,
        /// The verification time (RFC 3339).
        now: String,
    },
    /// The certificate has expired at `now`.
    #[error("certificate expired at {not_after} (now {now})")]
    Expired {
        /// Certificate's notAfter (RFC 3339).
        not_after: String,
        /// The verification time (RFC 3339).
        now: String,
    },
    /// The certificate signs itself instead of chaining to the collaboration CA.
    #[error("certificate is self-signed, not issued by the {0} collaboration CA")]
    SelfSigned(String),
    /// The certificate was signed by some other CA.
    #[error("certificate was not issued by the {0} collaboration CA")]
    UnknownIssuer(String),
    /// Chain verification failed for another reason.
    #[error("certificate chain is invalid: {0}")]
    Chain(String),
    /// The certificate carries no SPIFFE URI SAN.
    #[error("certificate carries no SPIFFE ID (no URI SAN)")]
    NoSpiffeId,
    /// The peer presented a different identity than the one dialled.
    #[error("peer presented {found}, expected {expected}")]
    UnexpectedPeer {
        /// Identity expected.
        expected: String,
        /// Identity presented.
        found: String,
    },
    /// A peer with a valid chain whose standing refuses it (revoked, or not a member).
    #[error("peer {id} (certificate serial {serial}) is refused: {why}")]
    PeerRefused {
        /// The peer's SPIFFE ID.
        id: String,
        /// Its certificate's serial (hex).
        serial: String,
        /// Why.
        why: crate::standing::Refused,
    },
    /// A certificate meant as a collaboration CA is not one.
    #[error("not a collaboration CA certificate: {0}")]
    InvalidCa(String),
    /// A certificate could not be parsed.
    #[error("certificate is malformed: {0}")]
    MalformedCert(String),
    /// A private key could not be used.
    #[error("private key is invalid: {0}")]
    InvalidKey(String),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file that must not be overwritten exists.
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    /// rcgen failed to build a certificate or CSR.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats a duration the way operators write it (`24h`, `7d`, `90m`, `45s`).
pub(crate) fn humantime_like(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 && s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
