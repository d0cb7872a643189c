//! The hub's files on disk are its owner's alone: the data directory `0700`, the store and keys
//! `0600`, checked on every start (any group or world permission is refused, naming the fix).

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result, bail};

/// Refuses `path` when its group or others have any permission on it.
pub(crate) fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let want = if meta.is_dir() { "700" } else { "600" };
        bail!(
            "{} is open to other users (mode {mode:03o}); it holds keys: `chmod {want} {}` \
             and check who could have read it",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// Makes `dir` (and missing parents) with mode `0700`; an existing one is checked.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    check_private(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_modes_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        private_dir(&data).unwrap();
        let file = data.join("hub.redb");
        std::fs::write(&file, b"x").unwrap();
        for (mode, ok) in [(0o600, true), (0o640, false), (0o604, false), (0o400, true)] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = check_private(&file);
            assert_eq!(result.is_ok(), ok, "{mode:o}");
            if let Err(e) = result {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = private_dir(&data).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
