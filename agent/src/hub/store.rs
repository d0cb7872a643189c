//! The hub's durable store (redb). Every write is one transaction committed with fsync before
//! the hub acknowledges it, so an acknowledged document survives `kill -9`.
//!
//! Every record carries a SHA-256 over its table, key and value, checked when it is read: a
//! flipped bit is a start-up error naming the record, never a document served as it is. The
//! store is made only by [`Store::create`] (`fedmesh hub --init`); [`Store::open`] refuses a
//! missing, empty, foreign or exposed (group- or world-readable) file instead of starting
//! empty.
//!
//! ```text
//!  meta    format, hub pin,         collabs  id → collaboration JWS
//!          head/<id> (last seq)     docs     (id, seq) → envelope
//!  cas     id → sealed online CA    spent    (id, secret sha256) → when it was used or voided
//!  grants  (id, org/node) → grant   keys     (id, org/node) → the node's key and last serial
//! ```
//!
//! Documents no longer needed (see [`fedmesh_documents::Ledger::holds`]) are removed in the
//! transaction that stores what supersedes them; the last sequence number handed out is kept
//! apart, so a number is never handed out twice.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use fedmesh_documents::Envelope;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::files::check_private;

/// "format" → [`FORMAT`], "hub_pin" → the pin of the hub certificate the store was made with.
const META: TableDefinition<'_, &str, &str> = TableDefinition::new("meta");
/// collab id → latest collaboration JWS.
const COLLABS: TableDefinition<'_, &str, &str> = TableDefinition::new("collabs");
/// collab id → online CA (JSON [`CaRecord`]).
const CAS: TableDefinition<'_, &str, &str> = TableDefinition::new("cas");
/// (collab id, seq) → envelope (JSON).
const DOCS: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("docs");
/// (collab id, org/node) → join grant (JSON [`GrantRecord`]).
const GRANTS: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("grants");
/// (collab id, secret sha256) → a join token secret that can never be used again.
const SPENT: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("spent");
/// (collab id, org/node) → the node's enrolled key (JSON [`KeyRecord`]).
const KEYS: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("keys");

/// What this version of the hub writes and reads.
const FORMAT: &str = "fedmesh-hub-store/1";

/// An online CA the hub keeps for a collaboration; its key sealed with the operator's CA key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CaRecord {
    pub(crate) cert_pem: String,
    /// The sealed private key (see [`super::keys`]).
    pub(crate) key: super::keys::Sealed,
    /// Thumbprint of the owner key that asked for it: only that owner may use the id.
    pub(crate) owner: String,
    /// When it was made (Unix seconds); a CA whose collaboration never came expires.
    pub(crate) created_at: u64,
}

/// A join grant and whether it was used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GrantRecord {
    /// The owner-signed grant.
    pub(crate) jws: String,
    /// When it was used (Unix seconds), if it was.
    pub(crate) used_at: Option<u64>,
}

/// A join token secret that can never be used again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Spent {
    /// The node it was for.
    pub(crate) node: String,
    /// When it was used; `None`: a newer grant replaced it before it was used.
    pub(crate) used_at: Option<u64>,
}

/// The key a node enrolled with, and the last certificate issued for it: what a node whose
/// certificate expired proves possession of to be issued a new one ([`super::server`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyRecord {
    /// The public key, SEC1 uncompressed point, base64.
    pub(crate) key: String,
    /// Serial of the last certificate issued for it (hex).
    pub(crate) serial: String,
    /// When that certificate was issued (Unix seconds).
    pub(crate) issued_at: u64,
}

/// Everything in the store, as loaded at start.
#[derive(Default)]
pub(crate) struct Snapshot {
    pub(crate) collabs: BTreeMap<String, String>,
    pub(crate) cas: BTreeMap<String, CaRecord>,
    pub(crate) docs: BTreeMap<String, Vec<Envelope>>,
    /// The last sequence number handed out per collaboration.
    pub(crate) heads: BTreeMap<String, u64>,
    pub(crate) grants: BTreeMap<(String, String), GrantRecord>,
    pub(crate) spent: BTreeMap<(String, String), Spent>,
    pub(crate) keys: BTreeMap<(String, String), KeyRecord>,
}

/// The redb database.
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

/// `<sha256 of table, key and value> <value>`.
fn seal(table: &str, key: &str, json: &str) -> String {
    format!("{} {json}", checksum(table, key, json))
}

fn checksum(table: &str, key: &str, json: &str) -> String {
    fedmesh_certs::fingerprint(format!("{table}\0{key}\0{json}").as_bytes())
}

impl Store {
    /// Makes a new store at `path` (mode `0600`; the file must not exist) for the hub whose
    /// certificate has `hub_pin`.
    pub(crate) fn create(path: &Path, hub_pin: &str) -> Result<Self> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating the hub store {}", path.display()))?;
        let db = Database::create(path)
            .with_context(|| format!("initialising the hub store {}", path.display()))?;
        let store = Self {
            db,
            path: path.to_owned(),
        };
        let txn = store.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            for (k, v) in [("format", FORMAT), ("hub_pin", hub_pin)] {
                meta.insert(k, seal("meta", k, v).as_str())?;
            }
        }
        txn.open_table(COLLABS)?;
        txn.open_table(CAS)?;
        txn.open_table(DOCS)?;
        txn.open_table(GRANTS)?;
        txn.open_table(SPENT)?;
        txn.open_table(KEYS)?;
        txn.commit()?;
        Ok(store)
    }

    /// Opens the existing store at `path`: it must be there, non-empty, readable by its owner
    /// only, and a fedmesh hub store of this version.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        let restore = "restore it from a backup; `fedmesh hub --init` makes a new, empty hub \
                       in an empty data directory (every node then enrolls again)";
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("the hub store {shown} is missing: {restore}")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {shown}")),
        };
        if meta.len() == 0 {
            bail!("the hub store {shown} is empty (0 bytes): {restore}");
        }
        check_private(path)?;
        let db = Database::open(path)
            .with_context(|| format!("the hub store {shown} cannot be opened ({restore})"))?;
        let store = Self {
            db,
            path: path.to_owned(),
        };
        let format = store.meta("format")?;
        if format.as_deref() != Some(FORMAT) {
            bail!(
                "{shown} is not a hub store of format {FORMAT} (it says {}): {restore}",
                format.as_deref().unwrap_or("nothing")
            );
        }
        Ok(store)
    }

    /// The pin of the hub certificate the store was made with.
    pub(crate) fn hub_pin(&self) -> Result<String> {
        self.meta("hub_pin")?
            .with_context(|| format!("{} records no hub certificate pin", self.path.display()))
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let value = table.get(key)?;
        value
            .map(|v| self.unseal("meta", key, v.value()).map(str::to_owned))
            .transpose()
    }

    /// The value of a sealed record, once its checksum matches.
    fn unseal<'a>(&self, table: &str, key: &str, stored: &'a str) -> Result<&'a str> {
        let (sum, json) = stored.split_once(' ').unwrap_or(("", stored));
        if sum != checksum(table, key, json) {
            bail!(
                "the hub store {} is corrupted: record {table}/{key} does not match its \
                 checksum; restore the store from a backup",
                self.path.display()
            );
        }
        Ok(json)
    }

    fn parse<T: DeserializeOwned>(&self, table: &str, key: &str, stored: &str) -> Result<T> {
        serde_json::from_str(self.unseal(table, key, stored)?).with_context(|| {
            format!(
                "the hub store {} holds a malformed record {table}/{key}",
                self.path.display()
            )
        })
    }

    /// Reads everything, checking every record.
    pub(crate) fn load(&self) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        let mut snap = Snapshot::default();
        for row in txn.open_table(COLLABS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let jws = self.unseal("collabs", id, v.value())?;
            snap.collabs.insert(id.to_owned(), jws.to_owned());
        }
        for row in txn.open_table(CAS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            snap.cas
                .insert(id.to_owned(), self.parse("cas", id, v.value())?);
        }
        for row in txn.open_table(DOCS)?.iter()? {
            let (k, v) = row?;
            let (collab, seq) = k.value();
            let env: Envelope = self.parse("docs", &format!("{collab}/{seq}"), v.value())?;
            snap.docs.entry(collab.to_owned()).or_default().push(env);
        }
        for row in txn.open_table(GRANTS)?.iter()? {
            let (k, v) = row?;
            let (collab, node) = k.value();
            let grant = self.parse("grants", &format!("{collab}/{node}"), v.value())?;
            snap.grants
                .insert((collab.to_owned(), node.to_owned()), grant);
        }
        for row in txn.open_table(SPENT)?.iter()? {
            let (k, v) = row?;
            let (collab, digest) = k.value();
            let spent = self.parse("spent", &format!("{collab}/{digest}"), v.value())?;
            snap.spent
                .insert((collab.to_owned(), digest.to_owned()), spent);
        }
        // Stores made before keys were recorded have no such table.
        match txn.open_table(KEYS) {
            Ok(table) => {
                for row in table.iter()? {
                    let (k, v) = row?;
                    let (collab, node) = k.value();
                    let key = self.parse("keys", &format!("{collab}/{node}"), v.value())?;
                    snap.keys.insert((collab.to_owned(), node.to_owned()), key);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        for row in txn.open_table(META)?.iter()? {
            let (k, v) = row?;
            if let Some(collab) = k.value().strip_prefix("head/") {
                let head = self.unseal("meta", k.value(), v.value())?;
                let head = head.parse().with_context(|| {
                    format!(
                        "the hub store {} holds a malformed {}",
                        self.path.display(),
                        k.value()
                    )
                })?;
                snap.heads.insert(collab.to_owned(), head);
            }
        }
        Ok(snap)
    }

    /// Stores an online CA.
    pub(crate) fn put_ca(&self, collab: &str, ca: &CaRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        let json = serde_json::to_string(ca)?;
        txn.open_table(CAS)?
            .insert(collab, seal("cas", collab, &json).as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// Forgets online CAs whose collaboration never came.
    pub(crate) fn remove_cas(&self, collabs: &[String]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CAS)?;
            for id in collabs {
                table.remove(id.as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Appends an envelope (its sequence number becomes the collaboration's last one), removes
    /// the envelopes `obsolete` names, and for a collaboration document also records it as the
    /// latest: one transaction.
    pub(crate) fn append(
        &self,
        collab: &str,
        env: &Envelope,
        collab_jws: Option<&str>,
        obsolete: &[u64],
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let json = serde_json::to_string(env)?;
            let key = format!("{collab}/{}", env.seq);
            let mut docs = txn.open_table(DOCS)?;
            docs.insert((collab, env.seq), seal("docs", &key, &json).as_str())?;
            for seq in obsolete {
                docs.remove((collab, *seq))?;
            }
            let head = format!("head/{collab}");
            txn.open_table(META)?.insert(
                head.as_str(),
                seal("meta", &head, &env.seq.to_string()).as_str(),
            )?;
            if let Some(jws) = collab_jws {
                txn.open_table(COLLABS)?
                    .insert(collab, seal("collabs", collab, jws).as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes envelopes no longer needed.
    pub(crate) fn remove_docs(&self, collab: &str, obsolete: &[u64]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut docs = txn.open_table(DOCS)?;
            for seq in obsolete {
                docs.remove((collab, *seq))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Records the key a node holds and the certificate just issued for it.
    pub(crate) fn put_key(&self, collab: &str, node: &str, record: &KeyRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let json = serde_json::to_string(record)?;
            let key = format!("{collab}/{node}");
            txn.open_table(KEYS)?
                .insert((collab, node), seal("keys", &key, &json).as_str())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a join grant (new, or marked used) and, in the same transaction, the secrets
    /// that may never be used again and the key the node enrolled with.
    pub(crate) fn put_grant(
        &self,
        collab: &str,
        node: &str,
        grant: &GrantRecord,
        spent: &[(&str, &Spent)],
        key: Option<&KeyRecord>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            if let Some(record) = key {
                let json = serde_json::to_string(record)?;
                let k = format!("{collab}/{node}");
                txn.open_table(KEYS)?
                    .insert((collab, node), seal("keys", &k, &json).as_str())?;
            }
            let json = serde_json::to_string(grant)?;
            let key = format!("{collab}/{node}");
            txn.open_table(GRANTS)?
                .insert((collab, node), seal("grants", &key, &json).as_str())?;
            let mut table = txn.open_table(SPENT)?;
            for (digest, s) in spent {
                let json = serde_json::to_string(s)?;
                let key = format!("{collab}/{digest}");
                table.insert((collab, *digest), seal("spent", &key, &json).as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_bit_is_found_by_the_record_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let store = Store::create(&path, "pin").unwrap();
        let env = Envelope {
            seq: 1,
            kind: fedmesh_documents::DocKind::Revocation,
            subject: "1".into(),
            jws: "eyJhbGciOiJFUzI1NiJ9.eyJudW1iZXIiOjF9.c2lnbmF0dXJlLXNpZ25hdHVyZQ".into(),
        };
        store.append("collab-x", &env, None, &[]).unwrap();
        drop(store);
        let mut bytes = std::fs::read(&path).unwrap();
        let needle = b"eyJudW1iZXIiOjF9";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        bytes[at + 3] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let err = match Store::open(&path).and_then(|s| s.load()) {
            Ok(_) => panic!("a flipped bit went unnoticed"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("record docs/collab-x/1 does not match its checksum"),
            "{err}"
        );
    }

    #[test]
    fn records_are_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let store = Store::create(&path, "pin").unwrap();
        assert_eq!(store.hub_pin().unwrap(), "pin");
        let good = seal("docs", "c/1", r#"{"x":1}"#);
        assert_eq!(store.unseal("docs", "c/1", &good).unwrap(), r#"{"x":1}"#);
        let flipped = good.replace("1}", "2}");
        let err = store.unseal("docs", "c/1", &flipped).unwrap_err();
        assert!(err.to_string().contains("record docs/c/1"), "{err}");
        // A record moved under another key fails too.
        assert!(store.unseal("docs", "c/2", &good).is_err());
        drop(store);
        assert!(Store::create(&path, "pin").is_err(), "never overwritten");
        assert_eq!(Store::open(&path).unwrap().hub_pin().unwrap(), "pin");
    }
}
