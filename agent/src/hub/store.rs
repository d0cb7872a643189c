//! The hub's durable store (redb). Every write is one transaction committed with fsync before
//! the hub acknowledges it, so an acknowledged document survives `kill -9`.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use fedmesh_documents::Envelope;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// collab id → latest collaboration JWS.
const COLLABS: TableDefinition<'_, &str, &str> = TableDefinition::new("collabs");
/// collab id → online CA (JSON [`CaRecord`]).
const CAS: TableDefinition<'_, &str, &str> = TableDefinition::new("cas");
/// (collab id, seq) → envelope (JSON).
const DOCS: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("docs");
/// (collab id, org/node) → join grant (JSON [`GrantRecord`]).
const GRANTS: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("grants");

/// An online CA the hub keeps for a collaboration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CaRecord {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

/// A join grant and whether it was used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct GrantRecord {
    /// The owner-signed grant.
    pub(crate) jws: String,
    /// When it was used (Unix seconds), if it was.
    pub(crate) used_at: Option<u64>,
}

/// Everything in the store, as loaded at start.
#[derive(Default)]
pub(crate) struct Snapshot {
    pub(crate) collabs: BTreeMap<String, String>,
    pub(crate) cas: BTreeMap<String, CaRecord>,
    pub(crate) docs: BTreeMap<String, Vec<Envelope>>,
    pub(crate) grants: BTreeMap<(String, String), GrantRecord>,
}

/// The redb database.
pub(crate) struct Store {
    db: Database,
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

impl Store {
    /// Opens (or creates) `<dir>/hub.redb`.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("hub.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(COLLABS)?;
        txn.open_table(CAS)?;
        txn.open_table(DOCS)?;
        txn.open_table(GRANTS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Reads everything.
    pub(crate) fn load(&self) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        let mut snap = Snapshot::default();
        for row in txn.open_table(COLLABS)?.iter()? {
            let (k, v) = row?;
            snap.collabs
                .insert(k.value().to_owned(), v.value().to_owned());
        }
        for row in txn.open_table(CAS)?.iter()? {
            let (k, v) = row?;
            snap.cas
                .insert(k.value().to_owned(), serde_json::from_str(v.value())?);
        }
        for row in txn.open_table(DOCS)?.iter()? {
            let (k, v) = row?;
            let (collab, _) = k.value();
            snap.docs
                .entry(collab.to_owned())
                .or_default()
                .push(serde_json::from_str(v.value())?);
        }
        for row in txn.open_table(GRANTS)?.iter()? {
            let (k, v) = row?;
            let (collab, node) = k.value();
            snap.grants.insert(
                (collab.to_owned(), node.to_owned()),
                serde_json::from_str(v.value())?,
            );
        }
        Ok(snap)
    }

    /// Stores an online CA.
    pub(crate) fn put_ca(&self, collab: &str, ca: &CaRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(CAS)?.insert(collab, json(ca)?.as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// Appends an envelope; for a collaboration document also records it as the latest.
    pub(crate) fn append(
        &self,
        collab: &str,
        env: &Envelope,
        collab_jws: Option<&str>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(DOCS)?
            .insert((collab, env.seq), json(env)?.as_str())?;
        if let Some(jws) = collab_jws {
            txn.open_table(COLLABS)?.insert(collab, jws)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a join grant (new, or marked used).
    pub(crate) fn put_grant(&self, collab: &str, node: &str, grant: &GrantRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(GRANTS)?
            .insert((collab, node), json(grant)?.as_str())?;
        txn.commit()?;
        Ok(())
    }
}
