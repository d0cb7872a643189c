//! Logging: `tracing` with an env-filter, to stderr.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `filter` uses `RUST_LOG` syntax. A second call is a no-op.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
