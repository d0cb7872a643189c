//! The short smoke run of every fuzz target: each committed corpus file
//! (`fuzz/corpus/<target>/*`) and each built-in seed goes through its target once, in a normal
//! test build. A file that crashes a target names itself.

use std::path::{Path, PathBuf};

use fedmesh_fuzz_targets::{TARGETS, seeds::seeds};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn run_named(target: &str, name: &str, bytes: &[u8]) {
    let (_, run) = TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .unwrap_or_else(|| panic!("no target {target}"));
    let outcome = std::panic::catch_unwind(|| run(bytes));
    assert!(outcome.is_ok(), "{target}: input {name} crashed the target");
}

#[test]
fn every_committed_corpus_file_runs_clean() {
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{target} has no committed corpus");
        for path in files {
            let bytes = std::fs::read(&path).expect("corpus file");
            run_named(target, &path.display().to_string(), &bytes);
        }
    }
}

#[test]
fn every_seed_runs_clean() {
    for (target, name, bytes) in seeds() {
        run_named(target, &name, &bytes);
    }
}

#[test]
#[ignore = "writes fuzz/corpus/<target>/seed-*"]
fn write_seeds() {
    for (target, name, bytes) in seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
    }
}

#[test]
#[ignore = "writes fuzz-targets/keys/"]
fn write_keys() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("keys");
    fedmesh_fuzz_targets::fixed::write_keys(&dir).expect("keys written");
}
