/// Everything that can go wrong while reading a collaboration file or rendering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The collaboration file is not well-formed YAML, or has the wrong shape (an unknown field,
    /// a missing one, a string where a number belongs). The message carries line and column.
    #[error("collaboration file: {0}")]
    Yaml(String),
    /// A field of the collaboration file has a value that is not allowed.
    #[error("{field} = {value:?}: {reason}")]
    Field {
        /// Where, e.g. `links[2].ports[0]`.
        field: String,
        /// The offending value, as written.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A render option is not allowed.
    #[error("option {option}: {reason}")]
    Option {
        /// The option, as named in the collaboration file.
        option: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The node view handed to [`crate::render()`] is inconsistent.
    #[error("node view: {0}")]
    View(String),
    /// An address pool cannot be parsed or is not usable.
    #[error("address pool {pool}: {reason}")]
    Pool {
        /// The pool as given.
        pool: String,
        /// Why it is refused.
        reason: String,
    },
    /// An address pool has no free address left.
    #[error("address pool {pool} is full: {wanted} addresses wanted, {capacity} usable")]
    PoolFull {
        /// The pool.
        pool: String,
        /// How many keys wanted an address.
        wanted: usize,
        /// How many addresses the pool has.
        capacity: u64,
    },
    /// An object cannot be written as YAML.
    #[error("cannot write YAML: {0}")]
    Serialize(String),
    /// A document-model rule was broken (a bad label, a bad link).
    #[error(transparent)]
    Documents(#[from] fedmesh_documents::Error),
    /// An identity could not be built.
    #[error(transparent)]
    Certs(#[from] fedmesh_certs::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
