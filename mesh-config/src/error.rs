use std::fmt;

/// One way an object breaks its schema: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Kubernetes-style field path, e.g. `spec.ports[0].name`; empty for the object itself.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "<object>: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything that can go wrong while reading a collaboration file, rendering or validating.
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
    /// The CRD bundle cannot be read or compiled into validators.
    #[error("CRD bundle: {0}")]
    Crd(String),
    /// There is no schema for this kind of object.
    #[error("no schema for {api_version} {kind}")]
    NoSchema {
        /// The object's `apiVersion`.
        api_version: String,
        /// The object's `kind`.
        kind: String,
    },
    /// An object breaks its schema.
    #[error("{object} is invalid: {}", join(violations))]
    Invalid {
        /// `Kind namespace/name`.
        object: String,
        /// Every violation found, in document order.
        violations: Vec<Violation>,
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

fn join(violations: &[Violation]) -> String {
    let parts: Vec<String> = violations.iter().map(Violation::to_string).collect();
    parts.join("; ")
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
