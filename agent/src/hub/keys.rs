//! The operator's CA key: it seals every online CA's private key at rest (AES-256-GCM, with the
//! collaboration id as associated data, so a sealed key moved to another collaboration does not
//! open). The key is 32 random bytes, base64url, in a file of its own (mode `0600`).
//!
//! `fedmesh hub --init` makes it at `--ca-key-file` (default `<data>/ca.key`). Keeping it
//! outside the data directory (a Kubernetes Secret, another disk, a file a KMS writes to
//! tmpfs) is recommended: then a copy of the data directory or of its backups holds no usable
//! CA key. Each sealed record names the key's id, so a wrong key is named at start, not
//! discovered at the first enrollment.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use fedmesh_certs::files;
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

use super::files::check_private;

/// A private key sealed with a [`CaKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sealed {
    /// [`CaKey::id`] of the key that sealed it.
    pub(crate) key_id: String,
    /// The 96-bit nonce, base64url.
    pub(crate) nonce: String,
    /// Ciphertext and tag, base64url.
    pub(crate) ciphertext: String,
}

/// The operator's key for online CA keys.
pub struct CaKey {
    key: LessSafeKey,
    id: String,
    path: PathBuf,
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaKey({} at {})", self.id, self.path.display())
    }
}

impl CaKey {
    /// Makes a new key file at `path` (mode `0600`; never replaces one).
    pub fn create(path: &Path) -> Result<()> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| anyhow!("the system random source failed"))?;
        files::create_secret(
            path,
            format!("{}\n", URL_SAFE_NO_PAD.encode(bytes)).as_bytes(),
        )
        .with_context(|| format!("creating the CA key file {}", path.display()))?;
        Ok(())
    }

    /// Loads the key file at `path`, refusing one other users can read.
    pub fn load(path: &Path) -> Result<Self> {
        check_private(path)?;
        let text = files::read_to_string(path)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .with_context(|| format!("{} is not a CA key (32 bytes, base64url)", path.display()))?;
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"fedmesh hub CA key\0".as_slice(), &bytes].concat(),
        );
        let id = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| anyhow!("AES key setup failed"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            id,
            path: path.to_owned(),
        })
    }

    /// A short public name of the key (a hash of it), recorded with what it seals.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `secret` for collaboration `collab`.
    pub(crate) fn seal(&self, collab: &str, secret: &[u8]) -> Result<Sealed> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow!("the system random source failed"))?;
        let mut data = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(collab.as_bytes()),
                &mut data,
            )
            .map_err(|_| anyhow!("sealing the CA key of {collab} failed"))?;
        Ok(Sealed {
            key_id: self.id.clone(),
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            ciphertext: URL_SAFE_NO_PAD.encode(data),
        })
    }

    /// Opens what [`CaKey::seal`] sealed for `collab`.
    pub(crate) fn open(&self, collab: &str, sealed: &Sealed) -> Result<Vec<u8>> {
        if sealed.key_id != self.id {
            bail!(
                "the online CA of {collab} is sealed with CA key {}, but {} is key {}: start \
                 the hub with the CA key file it was made with (--ca-key-file)",
                sealed.key_id,
                self.path.display(),
                self.id
            );
        }
        let nonce: [u8; NONCE_LEN] = URL_SAFE_NO_PAD
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .with_context(|| format!("the sealed CA key of {collab} has a malformed nonce"))?;
        let mut data = URL_SAFE_NO_PAD
            .decode(&sealed.ciphertext)
            .with_context(|| format!("the sealed CA key of {collab} is not base64url"))?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(collab.as_bytes()),
                &mut data,
            )
            .map_err(|_| {
                anyhow!(
                    "the sealed CA key of {collab} does not open with {} (altered, or sealed \
                     for another collaboration)",
                    self.path.display()
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_their_key_and_collaboration() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        CaKey::create(&a).unwrap();
        CaKey::create(&b).unwrap();
        assert!(CaKey::create(&a).is_err(), "never replaced");
        let (ka, kb) = (CaKey::load(&a).unwrap(), CaKey::load(&b).unwrap());
        let sealed = ka.seal("collab-x", b"secret key").unwrap();
        assert!(!sealed.ciphertext.contains("secret"));
        assert_eq!(ka.open("collab-x", &sealed).unwrap(), b"secret key");
        let err = kb.open("collab-x", &sealed).unwrap_err().to_string();
        assert!(err.contains(ka.id()) && err.contains("b.key"), "{err}");
        let err = ka.open("collab-y", &sealed).unwrap_err().to_string();
        assert!(err.contains("does not open"), "{err}");
        std::fs::write(&a, "short").unwrap();
        assert!(CaKey::load(&a).is_err());
    }
}
