//! PEM files on disk. Private keys are written `0600`, atomically: a temporary file in the same
//! directory, created with that mode, synced, then renamed over the target.
//!
//! A CA directory holds `ca.pem` and `ca-key.pem` (0600); a node key is one PEM file (0600),
//! made where it is used.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::{CollabCa, Error, NodeKey, Result};

/// The CA certificate's path in a CA directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The CA key's path in a CA directory.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca-key.pem")
}

/// Loads the CA in `dir`.
pub fn load_ca(dir: &Path) -> Result<CollabCa> {
    let cert = read_to_string(&ca_cert_path(dir))?;
    let key = read_to_string(&ca_key_path(dir))?;
    CollabCa::from_pem(&cert, &key)
}

/// Creates a CA for `collab` in `dir`, valid from `now` for `validity`; refuses to overwrite
/// one ([`Error::Exists`]).
pub fn init_ca(collab: &str, dir: &Path, now: SystemTime, validity: Duration) -> Result<CollabCa> {
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    for p in [&cert_path, &key_path] {
        refuse_existing(p)?;
    }
    let ca = CollabCa::generate(collab, now, validity)?;
    create_secret(&key_path, ca.key_pem().as_bytes())?;
    write_public(&cert_path, ca.cert_pem().as_bytes())?;
    Ok(ca)
}

/// Loads the node key at `path`, or makes one there (0600).
pub fn load_or_create_key(path: &Path) -> Result<NodeKey> {
    if path.exists() {
        return NodeKey::from_pem(&read_to_string(path)?).map_err(|e| {
            Error::InvalidKey(format!("{} is not a usable node key ({e})", path.display()))
        });
    }
    let key = NodeKey::generate()?;
    create_secret(path, key.private_pem().as_bytes())?;
    Ok(key)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes secret material (a private key) with mode `0600`, atomically.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes public material (a certificate, a CSR) with mode `0644`, atomically.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic(path, contents, 0o644)
}

/// Like [`write_secret`], but refuses to replace an existing file.
pub fn create_secret(path: &Path, contents: &[u8]) -> Result<()> {
    refuse_existing(path)?;
    write_secret(path, contents)
}

/// Fails with [`Error::Exists`] if `path` exists.
pub fn refuse_existing(path: &Path) -> Result<()> {
    if path.exists() {
        return Err(Error::Exists(path.to_owned()));
    }
    Ok(())
}

/// Reads a text file, naming it in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(contents).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        // Make the rename itself durable.
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn secrets_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_secret(&path, b"one").unwrap();
        write_secret(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn ca_directories_and_node_keys() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca = init_ca("c", dir.path(), now, Duration::from_secs(3600)).unwrap();
        assert_eq!(load_ca(dir.path()).unwrap().cert_pem(), ca.cert_pem());
        let mode = fs::metadata(ca_key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = init_ca("c", dir.path(), now, Duration::from_secs(3600)).unwrap_err();
        assert!(matches!(again, Error::Exists(_)), "{again}");

        let path = dir.path().join("node-key.pem");
        let key = load_or_create_key(&path).unwrap();
        assert_eq!(
            load_or_create_key(&path).unwrap().private_pem(),
            key.private_pem()
        );
        fs::write(&path, "not a key").unwrap();
        let err = load_or_create_key(&path).unwrap_err().to_string();
        assert!(
            err.contains("node-key.pem is not a usable node key"),
            "{err}"
        );
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca-key.pem");
        create_secret(&path, b"k").unwrap();
        let err = create_secret(&path, b"other").unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"k");
    }
}
