//! Versioned mesh configuration on the hub: every apply or rollback is a new,
//! monotonically increasing version holding the complete resource set, with
//! an audit entry (who, when, what changed).
//!
//! Who drives it: the admin API (`apply`, `config history|get|rollback`) and
//! the config sync that serves each spoke its slice. What it must not do:
//! interpret resources; parsing and validation belong to `tidemesh-policy`.
//!
//! # Table
//! `config_versions`: `u64` version (from 1) → JSON [`ConfigVersion`]. A
//! version stores the whole resource set, so `get --version V` and
//! `rollback --to V` need no replay.

use std::collections::BTreeMap;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::StoreError;

const VERSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("config_versions");

/// One config version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigVersion {
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
    /// The complete resource set (Istio and tidemesh documents as JSON).
    pub resources: Vec<Value>,
}

/// A resource's identity: kind, namespace, name.
pub fn resource_key(v: &Value) -> (String, String, String) {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let ns = s("/metadata/namespace");
    (
        s("/kind"),
        if ns.is_empty() { "default".into() } else { ns },
        s("/metadata/name"),
    )
}

fn label((kind, ns, name): &(String, String, String)) -> String {
    format!("{kind} {ns}/{name}")
}

/// Merges `docs` into `current` by (kind, namespace, name), as `kubectl
/// apply` does; returns the new set and a summary of the changes.
pub fn merge(current: &[Value], docs: &[Value]) -> (Vec<Value>, String) {
    let mut set: BTreeMap<_, Value> = current
        .iter()
        .map(|v| (resource_key(v), v.clone()))
        .collect();
    let mut changes = Vec::new();
    for d in docs {
        let k = resource_key(d);
        match set.insert(k.clone(), d.clone()) {
            None => changes.push(format!("created {}", label(&k))),
            Some(old) if old != *d => changes.push(format!("configured {}", label(&k))),
            Some(_) => {}
        }
    }
    let summary = if changes.is_empty() {
        "no changes".to_owned()
    } else {
        changes.join("; ")
    };
    (set.into_values().collect(), summary)
}

/// Summary of the difference between two resource sets.
pub fn diff(from: &[Value], to: &[Value]) -> String {
    let a: BTreeMap<_, _> = from.iter().map(|v| (resource_key(v), v)).collect();
    let b: BTreeMap<_, _> = to.iter().map(|v| (resource_key(v), v)).collect();
    let mut out = Vec::new();
    for (k, v) in &b {
        match a.get(k) {
            None => out.push(format!("created {}", label(k))),
            Some(o) if o != v => out.push(format!("configured {}", label(k))),
            _ => {}
        }
    }
    for k in a.keys().filter(|k| !b.contains_key(*k)) {
        out.push(format!("deleted {}", label(k)));
    }
    if out.is_empty() {
        "no changes".into()
    } else {
        out.join("; ")
    }
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

    fn decode(b: &[u8]) -> Result<ConfigVersion, StoreError> {
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

    /// Every version, oldest first, without their resources.
    pub fn history(&self) -> Result<Vec<ConfigVersion>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VERSIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            let mut c = Self::decode(v.value())?;
            c.resources.clear();
            out.push(c);
        }
        Ok(out)
    }

    /// Appends a new version (number = latest + 1) in one write transaction.
    pub fn append(
        &self,
        at_ms: u64,
        uid: Option<u32>,
        summary: String,
        rollback_of: Option<u64>,
        resources: Vec<Value>,
    ) -> Result<ConfigVersion, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_two_phase_commit(true);
        let c = {
            let mut t = tx.open_table(VERSIONS)?;
            let version = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            let c = ConfigVersion {
                version,
                at_ms,
                uid,
                summary,
                rollback_of,
                resources,
            };
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt {
                table: "config_versions",
                reason: e.to_string(),
            })?;
            t.insert(version, bytes.as_slice())?;
            c
        };
        tx.commit()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_upserts_by_kind_namespace_name() {
        let a = json!({"kind": "VirtualService", "metadata": {"name": "r"}, "spec": {"x": 1}});
        let b = json!({"kind": "VirtualService", "metadata": {"name": "r"}, "spec": {"x": 2}});
        let c = json!({"kind": "DestinationRule", "metadata": {"name": "r", "namespace": "prod"}, "spec": {}});
        let (set, s) = merge(std::slice::from_ref(&a), &[b.clone(), c]);
        assert_eq!(set.len(), 2);
        assert!(s.contains("configured VirtualService default/r"), "{s}");
        assert!(s.contains("created DestinationRule prod/r"), "{s}");
        let (_, s) = merge(&set, &[b]);
        assert_eq!(s, "no changes");
        assert!(diff(&set, &[a]).contains("deleted DestinationRule prod/r"));
    }
}
