//! The spoke's last-known-good replica of its config slice, in `spoke.db`
//! (redb) in the data directory, so a spoke restarted during a partition
//! serves with the config it last applied.
//!
//! Who drives it: the config sync in the control session. What it must not
//! do: accept a snapshot it has not validated; the caller decodes and checks
//! the slice first, then [`Replica::apply`] stores it in one write
//! transaction, so the replica is the old version or the new one, never a mix.
//!
//! # Table
//! `config`: `&str` key → bytes. Key `lkg`: postcard [`Applied`].

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");
const LKG: &str = "lkg";

/// An applied config version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The hub's config version.
    pub version: u64,
    /// When the hub made that version (ms since the Unix epoch).
    pub hub_applied_ms: u64,
    /// When this spoke applied it (ms since the Unix epoch).
    pub applied_ms: u64,
    /// The validated slice, as the hub sent it (postcard).
    pub snapshot: Vec<u8>,
}

/// Replica errors.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// redb failed.
    #[error("spoke.db: {0}")]
    Db(#[from] redb::Error),
    /// The stored replica does not decode.
    #[error("spoke.db: corrupt last-known-good config: {0}")]
    Corrupt(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for ReplicaError {
            fn from(e: $t) -> Self { ReplicaError::Db(e.into()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The replica database.
#[derive(Debug)]
pub struct Replica {
    db: Database,
}

impl Replica {
    /// Opens (or creates) `spoke.db` in `dir`.
    pub fn open(dir: &Path) -> Result<Replica, ReplicaError> {
        let db = Database::create(dir.join("spoke.db"))?;
        let tx = db.begin_write()?;
        tx.open_table(CONFIG)?;
        tx.commit()?;
        Ok(Replica { db })
    }

    /// The last-known-good config, if any.
    pub fn last_known_good(&self) -> Result<Option<Applied>, ReplicaError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CONFIG)?;
        let v = t.get(LKG)?;
        match v {
            None => Ok(None),
            Some(b) => postcard::from_bytes(b.value())
                .map(Some)
                .map_err(|e| ReplicaError::Corrupt(e.to_string())),
        }
    }

    /// Stores a validated version as the new last-known-good, atomically.
    pub fn apply(&self, applied: &Applied) -> Result<(), ReplicaError> {
        let bytes =
            postcard::to_allocvec(applied).map_err(|e| ReplicaError::Corrupt(e.to_string()))?;
        let mut tx = self.db.begin_write()?;
        tx.set_two_phase_commit(true);
        {
            let mut t = tx.open_table(CONFIG)?;
            t.insert(LKG, bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Replica::open(dir.path()).expect("open");
        assert_eq!(r.last_known_good().expect("read"), None);
        let a = Applied {
            version: 3,
            hub_applied_ms: 10,
            applied_ms: 11,
            snapshot: vec![1, 2, 3],
        };
        r.apply(&a).expect("apply");
        drop(r);
        let r = Replica::open(dir.path()).expect("reopen");
        assert_eq!(r.last_known_good().expect("read"), Some(a));
    }
}
