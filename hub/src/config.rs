//! Versioned mesh configuration on the hub: every apply, delete or rollback
//! is a new, monotonically increasing version holding the complete resource
//! set, with an audit entry (who, when, what changed) written to the `audit`
//! table in the same transaction.
//!
//! Who drives it: the admin API (`apply`, `config history|get|rollback`) and
//! the config sync that serves each spoke its slice. What it must not do:
//! parse or validate; that belongs to `tidemesh-policy`, and only a
//! `MeshConfig` that passed it is stored.
//!
//! # Table
//! `config_versions`: `u64` version (from 1) → JSON [`ConfigVersion`]. A
//! version stores the whole validated config, so `get --version V` and
//! `rollback --to V` need no replay.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tidemesh_policy::MeshConfig;

use crate::store::StoreError;

const VERSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("config_versions");

/// One config version: who made it, when, what changed, and the whole config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigVersion {
    /// The version's metadata.
    #[serde(flatten)]
    pub meta: VersionMeta,
    /// The complete, validated mesh config.
    pub config: MeshConfig,
}

/// A version's metadata (`config history`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionMeta {
    /// The version number.
    pub version: u64,
    /// When it was made (ms since the Unix epoch).
    pub at_ms: u64,
    /// The admin socket peer's uid.
    pub uid: Option<u32>,
    /// What changed, for people.
    pub summary: String,
    /// Set when this version is a rollback to an earlier one.
    pub rollback_of: Option<u64>,
}

/// The version table.
pub struct ConfigStore<'a> {
    pub(crate) db: &'a Database,
}

impl ConfigStore<'_> {
    /// Creates the table if missing.
    pub fn ensure(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(VERSIONS)?;
        tx.commit()?;
        Ok(())
    }

    fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(b).map_err(|e| StoreError::Corrupt {
            table: "config_versions",
            reason: e.to_string(),
        })
    }

    /// The newest version, if any.
    pub fn latest(&self) -> Result<Option<ConfigVersion>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(VERSIONS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let last = t.last()?;
        let out = match last {
            None => None,
            Some((_, v)) => Some(Self::decode(v.value())?),
        };
        Ok(out)
    }

    /// One version.
    pub fn get(&self, version: u64) -> Result<Option<ConfigVersion>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VERSIONS)?;
        match t.get(version)? {
            None => Ok(None),
            Some(v) => Ok(Some(Self::decode(v.value())?)),
        }
    }

    /// Every version's metadata, oldest first.
    pub fn history(&self) -> Result<Vec<VersionMeta>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VERSIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(Self::decode(v.value())?);
        }
        Ok(out)
    }

    /// Appends a new version (number = latest + 1) and its audit entry
    /// (`event`, detail `version N: SUMMARY`) in one write transaction.
    pub fn append(
        &self,
        event: &str,
        at_ms: u64,
        uid: Option<u32>,
        summary: String,
        rollback_of: Option<u64>,
        config: MeshConfig,
    ) -> Result<ConfigVersion, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_two_phase_commit(true);
        let c = {
            let mut t = tx.open_table(VERSIONS)?;
            let version = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            let c = ConfigVersion {
                meta: VersionMeta {
                    version,
                    at_ms,
                    uid,
                    summary,
                    rollback_of,
                },
                config,
            };
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt {
                table: "config_versions",
                reason: e.to_string(),
            })?;
            t.insert(version, bytes.as_slice())?;
            c
        };
        crate::store::Store::append_audit(
            &tx,
            &crate::store::AuditEntry {
                at_ms,
                event: event.to_owned(),
                subject: uid.map(|u| format!("uid {u}")),
                detail: format!("version {}: {}", c.meta.version, c.meta.summary),
            },
        )?;
        tx.commit()?;
        Ok(c)
    }
}
