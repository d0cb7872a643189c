/// Everything that can be wrong with a document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field has a value the model does not allow.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which field or document.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The signature is missing, from the wrong key, or does not verify.
    #[error("bad signature: {0}")]
    Signature(String),
    /// The JWS or its payload cannot be parsed.
    #[error("malformed document: {0}")]
    Malformed(String),
    /// The document is over the size bound.
    #[error("document is {size} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// An identity or certificate problem (bad label, chain not to the collaboration CA, ...).
    #[error(transparent)]
    Certs(#[from] fedmesh_certs::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
