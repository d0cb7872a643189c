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

/// What validation can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
}

fn join(violations: &[Violation]) -> String {
    let parts: Vec<String> = violations.iter().map(Violation::to_string).collect();
    parts.join("; ")
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
