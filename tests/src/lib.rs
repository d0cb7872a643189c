//! Support for the workspace integration tests (`tests/integration/`): paths to the built
//! binary, temporary collaborations, and a test subscriber.
//!
//! The tests run real processes and real TLS on loopback only.

use std::{path::PathBuf, sync::Once};

/// Installs a `tracing` subscriber that writes through the test harness, once.
pub fn subscribe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// The `fedmesh` binary built for this test run.
pub fn fedmesh_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("fedmesh")
}
