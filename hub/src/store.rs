//! The hub's durable state in one redb file (`hub.db` in the data directory).
//!
//! Who drives it: [`crate::Hub`]. What it must not do: decide policy. It
//! stores and fetches records; every multi-step change (consuming a token and
//! pinning the spoke's key, say) is one write transaction so it is all or
//! nothing, and two-phase commit is on for this security state.
//!
//! # Tables
//! | table    | key                          | value |
//! |----------|------------------------------|-------|
//! | `meta`   | `&str` name                  | UTF-8 bytes: `trust_domain`, `schema` |
//! | `tokens` | `&[u8]` SHA-256 of the secret| postcard [`TokenRecord`] |
//! | `spokes` | `&str` node SPIFFE ID        | postcard [`SpokeRecord`] |
//! | `audit`  | `u64` sequence (from 1)      | JSON [`AuditEntry`] |
//! | `node_cas` | `&str` node SPIFFE ID      | postcard `Vec<`[`NodeCaRecord`]`>`: node CAs issued to it and not yet expired |
//! | `revocations` | `&str` `"list"`         | postcard `tidemesh_identity::RevocationList` (unsigned; signed when sent) |
//!
//! Times are milliseconds since the Unix epoch (u64). postcard field order is
//! the format: append fields only with a schema bump.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const SPOKES: TableDefinition<&str, &[u8]> = TableDefinition::new("spokes");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const NODE_CAS: TableDefinition<&str, &[u8]> = TableDefinition::new("node_cas");
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");
const LIST_KEY: &str = "list";

/// Current schema version of `hub.db`.
pub const SCHEMA: &str = "1";

/// A join token waiting to be used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// The spoke ID the token is bound to.
    pub spoke: String,
    /// When the token was created.
    pub created_ms: u64,
    /// When it stops being valid.
    pub expires_ms: u64,
}

/// An enrolled spoke.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpokeRecord {
    /// The node key pinned at enrollment (uncompressed P-256 point).
    pub pinned_key: Vec<u8>,
    /// When it enrolled.
    pub enrolled_ms: u64,
    /// not_after of the last node SVID issued to it.
    pub cert_not_after_ms: u64,
    /// Last authenticated contact.
    pub last_seen_ms: u64,
    /// Set when an operator revoked it.
    pub revoked_ms: Option<u64>,
}

/// A node CA the hub issued to a spoke.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeCaRecord {
    /// SHA-256 of the CA's public key.
    pub key_fingerprint: [u8; 32],
    /// When it was issued.
    pub issued_ms: u64,
    /// When it expires.
    pub not_after_ms: u64,
}

/// One audit log entry: every issuance, renewal, refusal and revocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// When.
    pub at_ms: u64,
    /// What: `enrolled`, `renewed`, `workload_issued`, `reestablished`,
    /// `refused`, `revoked`, `token_created`.
    pub event: String,
    /// The spoke (or requested ID) concerned.
    pub subject: Option<String>,
    /// Details for people.
    pub detail: String,
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// A stored value did not decode: the file is damaged or from another version.
    #[error("corrupt record in table {table}: {reason}")]
    Corrupt {
        /// Which table.
        table: &'static str,
        /// Why.
        reason: String,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
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

/// What consuming a token found.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenUse {
    /// The token was valid and bound to the given spoke: the spoke is now enrolled.
    Enrolled,
    /// No such token, or already used.
    Invalid,
    /// The token had expired; it was burned.
    Expired,
    /// The token is bound to another spoke ID; it was burned.
    Mismatch {
        /// The ID it is bound to.
        bound: String,
    },
}

/// The hub database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn decode<T: for<'de> Deserialize<'de>>(table: &'static str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard encoding of these plain structs into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

impl Store {
    /// Creates a new database; fails if the file exists.
    pub fn create(path: &Path, trust_domain: &str) -> Result<Store, StoreError> {
        let db = Database::create(path)?;
        let mut tx = db.begin_write()?;
        tx.set_two_phase_commit(true);
        {
            let mut meta = tx.open_table(META)?;
            meta.insert("trust_domain", trust_domain.as_bytes())?;
            meta.insert("schema", SCHEMA.as_bytes())?;
            tx.open_table(TOKENS)?;
            tx.open_table(SPOKES)?;
            tx.open_table(AUDIT)?;
            tx.open_table(NODE_CAS)?;
            tx.open_table(REVOCATIONS)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// Creates the tables later versions added (idempotent).
    fn ensure_tables(&self) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.open_table(NODE_CAS)?;
        tx.open_table(REVOCATIONS)?;
        tx.commit()?;
        Ok(())
    }

    /// Opens an existing database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::open(path)?;
        let store = Store { db };
        store.config().ensure()?;
        store.ensure_tables()?;
        let schema = store.meta("schema")?;
        if schema.as_deref() != Some(SCHEMA) {
            return Err(StoreError::Corrupt {
                table: "meta",
                reason: format!("schema {schema:?}, this build reads {SCHEMA}"),
            });
        }
        Ok(store)
    }

    /// The versioned mesh configuration.
    pub fn config(&self) -> crate::config::ConfigStore<'_> {
        crate::config::ConfigStore { db: &self.db }
    }

    /// A meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(key)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    fn write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_two_phase_commit(true);
        Ok(tx)
    }

    fn append_audit(tx: &redb::WriteTransaction, e: &AuditEntry) -> Result<(), StoreError> {
        let mut t = tx.open_table(AUDIT)?;
        let next = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
        let bytes = serde_json::to_vec(e).unwrap_or_default();
        t.insert(next, bytes.as_slice())?;
        Ok(())
    }

    /// Appends an audit entry on its own.
    pub fn audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let tx = self.write()?;
        Self::append_audit(&tx, e)?;
        tx.commit()?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut out = Vec::with_capacity(t.len()? as usize);
        for row in t.iter()? {
            let (k, v) = row?;
            let e: AuditEntry =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    table: "audit",
                    reason: e.to_string(),
                })?;
            out.push((k.value(), e));
        }
        Ok(out)
    }

    /// Stores a new token (by the hash of its secret) with its audit entry.
    pub fn put_token(
        &self,
        hash: &[u8; 32],
        rec: &TokenRecord,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(TOKENS)?;
            t.insert(hash.as_slice(), encode(rec).as_slice())?;
        }
        Self::append_audit(&tx, audit)?;
        tx.commit()?;
        Ok(())
    }

    /// Consumes a token and, if it is valid for `spoke`, enrolls the spoke
    /// with `record`, all in one write transaction: of two racers exactly one
    /// wins. Expired and mismatched tokens are burned too.
    ///
    /// A spoke enrolled again after a revocation leaves the revocation
    /// list's node IDs in the same transaction (a new version); the keys the
    /// list names stay, so the old node key and node CAs are never revived.
    pub fn consume_token(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
        record: &SpokeRecord,
        audit_ok: &AuditEntry,
    ) -> Result<TokenUse, StoreError> {
        let tx = self.write()?;
        let found = {
            let mut t = tx.open_table(TOKENS)?;
            let removed = t.remove(hash.as_slice())?;
            match removed {
                None => None,
                Some(v) => Some(decode::<TokenRecord>("tokens", v.value())?),
            }
        };
        let outcome = match found {
            None => TokenUse::Invalid,
            Some(tok) if tok.expires_ms <= now_ms => TokenUse::Expired,
            Some(tok) if tok.spoke != spoke => TokenUse::Mismatch { bound: tok.spoke },
            Some(_) => {
                let mut s = tx.open_table(SPOKES)?;
                s.insert(spoke, encode(record).as_slice())?;
                drop(s);
                tx.open_table(NODE_CAS)?.remove(spoke)?;
                let mut list = Self::read_list(&tx)?;
                if list.nodes.iter().any(|n| n.to_string() == spoke) {
                    list.nodes.retain(|n| n.to_string() != spoke);
                    list.version += 1;
                    list.issued_ms = now_ms;
                    Self::write_list(&tx, &list)?;
                }
                Self::append_audit(&tx, audit_ok)?;
                TokenUse::Enrolled
            }
        };
        if outcome != TokenUse::Invalid {
            tx.commit()?;
        } else {
            tx.abort()?;
        }
        Ok(outcome)
    }

    /// One spoke's record.
    pub fn spoke(&self, id: &str) -> Result<Option<SpokeRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SPOKES)?;
        match t.get(id)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode("spokes", v.value())?)),
        }
    }

    /// Every spoke, ordered by ID.
    pub fn spokes(&self) -> Result<Vec<(String, SpokeRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SPOKES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), decode("spokes", v.value())?));
        }
        Ok(out)
    }

    /// Read-modify-write of one spoke record with an optional audit entry.
    /// Returns the updated record, or `None` if the spoke is unknown.
    pub fn update_spoke(
        &self,
        id: &str,
        audit: Option<&AuditEntry>,
        f: impl FnOnce(&mut SpokeRecord),
    ) -> Result<Option<SpokeRecord>, StoreError> {
        let tx = self.write()?;
        let updated = {
            let mut t = tx.open_table(SPOKES)?;
            let cur = match t.get(id)? {
                None => None,
                Some(v) => Some(decode::<SpokeRecord>("spokes", v.value())?),
            };
            match cur {
                None => None,
                Some(mut rec) => {
                    f(&mut rec);
                    t.insert(id, encode(&rec).as_slice())?;
                    Some(rec)
                }
            }
        };
        if let Some(a) = audit {
            Self::append_audit(&tx, a)?;
        }
        tx.commit()?;
        Ok(updated)
    }

    fn read_list(
        tx: &redb::WriteTransaction,
    ) -> Result<tidemesh_identity::RevocationList, StoreError> {
        let t = tx.open_table(REVOCATIONS)?;
        let v = t.get(LIST_KEY)?;
        match v {
            None => Ok(Default::default()),
            Some(v) => decode("revocations", v.value()),
        }
    }

    fn write_list(
        tx: &redb::WriteTransaction,
        list: &tidemesh_identity::RevocationList,
    ) -> Result<(), StoreError> {
        tx.open_table(REVOCATIONS)?
            .insert(LIST_KEY, encode(list).as_slice())?;
        Ok(())
    }

    /// The revocation list in force (version 0 and empty before the first
    /// revocation).
    pub fn revocation_list(&self) -> Result<tidemesh_identity::RevocationList, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REVOCATIONS)?;
        let v = t.get(LIST_KEY)?;
        match v {
            None => Ok(Default::default()),
            Some(v) => decode("revocations", v.value()),
        }
    }

    /// Revokes a spoke in one transaction: marks its record, and makes a new
    /// revocation list version naming its node ID, its pinned node key
    /// (until `key_until_ms`: the last node SVID's expiry) and the key of
    /// every node CA issued to it (until each CA's expiry); entries whose
    /// time has passed are dropped. Returns the record and the new list, or
    /// `None` if the spoke is unknown.
    pub fn revoke_spoke(
        &self,
        id: &tidemesh_identity::SpiffeId,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<Option<(SpokeRecord, tidemesh_identity::RevocationList)>, StoreError> {
        use tidemesh_identity::revocation::RevokedKey;
        let sid = id.to_string();
        let tx = self.write()?;
        let rec = {
            let mut t = tx.open_table(SPOKES)?;
            let cur = match t.get(sid.as_str())? {
                None => None,
                Some(v) => Some(decode::<SpokeRecord>("spokes", v.value())?),
            };
            match cur {
                None => None,
                Some(mut r) => {
                    r.revoked_ms.get_or_insert(now_ms);
                    t.insert(sid.as_str(), encode(&r).as_slice())?;
                    Some(r)
                }
            }
        };
        let Some(rec) = rec else {
            tx.abort()?;
            return Ok(None);
        };
        let cas: Vec<NodeCaRecord> = {
            let t = tx.open_table(NODE_CAS)?;
            let v = t.get(sid.as_str())?;
            match v {
                None => Vec::new(),
                Some(v) => decode("node_cas", v.value())?,
            }
        };
        let mut list = Self::read_list(&tx)?;
        list.keys.retain(|k| k.until_ms > now_ms);
        list.nodes.insert(id.clone());
        list.keys.insert(RevokedKey {
            fingerprint: tidemesh_identity::svid::sha256(&rec.pinned_key),
            until_ms: rec.cert_not_after_ms.max(now_ms),
        });
        for ca in cas {
            if ca.not_after_ms > now_ms {
                list.keys.insert(RevokedKey {
                    fingerprint: ca.key_fingerprint,
                    until_ms: ca.not_after_ms,
                });
            }
        }
        list.version += 1;
        list.issued_ms = now_ms;
        Self::write_list(&tx, &list)?;
        Self::append_audit(&tx, audit)?;
        tx.commit()?;
        Ok(Some((rec, list)))
    }

    /// Records a node CA issued to `id` (dropping expired ones) with its
    /// audit entry, in one transaction. Refuses (returns `false`) if the
    /// spoke is unknown or revoked meanwhile.
    pub fn add_node_ca(
        &self,
        id: &str,
        ca: NodeCaRecord,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let tx = self.write()?;
        let live = {
            let t = tx.open_table(SPOKES)?;
            let v = t.get(id)?;
            match v {
                None => false,
                Some(v) => decode::<SpokeRecord>("spokes", v.value())?
                    .revoked_ms
                    .is_none(),
            }
        };
        if !live {
            tx.abort()?;
            return Ok(false);
        }
        {
            let mut t = tx.open_table(NODE_CAS)?;
            let mut cas: Vec<NodeCaRecord> = match t.get(id)? {
                None => Vec::new(),
                Some(v) => decode("node_cas", v.value())?,
            };
            cas.retain(|c| c.not_after_ms > now_ms);
            cas.push(ca);
            t.insert(id, encode(&cas).as_slice())?;
        }
        Self::append_audit(&tx, audit)?;
        tx.commit()?;
        Ok(true)
    }

    /// The node CAs issued to `id` that have not expired by `now_ms`.
    pub fn node_cas(&self, id: &str, now_ms: u64) -> Result<Vec<NodeCaRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(NODE_CAS)?;
        let v = t.get(id)?;
        let mut cas: Vec<NodeCaRecord> = match v {
            None => Vec::new(),
            Some(v) => decode("node_cas", v.value())?,
        };
        cas.retain(|c| c.not_after_ms > now_ms);
        Ok(cas)
    }

    /// Makes the revocation list name every spoke whose record is marked
    /// revoked (a data directory from before revocation lists): returns the
    /// list, bumped if anything was added.
    pub fn reconcile_revocations(
        &self,
        now_ms: u64,
    ) -> Result<tidemesh_identity::RevocationList, StoreError> {
        let tx = self.write()?;
        let mut list = Self::read_list(&tx)?;
        let mut changed = false;
        {
            let t = tx.open_table(SPOKES)?;
            for row in t.iter()? {
                let (k, v) = row?;
                let rec: SpokeRecord = decode("spokes", v.value())?;
                if rec.revoked_ms.is_none() {
                    continue;
                }
                if let Ok(id) = tidemesh_identity::SpiffeId::parse(k.value()) {
                    if list.nodes.insert(id) {
                        list.keys.insert(tidemesh_identity::revocation::RevokedKey {
                            fingerprint: tidemesh_identity::svid::sha256(&rec.pinned_key),
                            until_ms: rec.cert_not_after_ms.max(now_ms),
                        });
                        changed = true;
                    }
                }
            }
        }
        if changed {
            list.version += 1;
            list.issued_ms = now_ms;
            Self::write_list(&tx, &list)?;
            tx.commit()?;
        } else {
            tx.abort()?;
        }
        Ok(list)
    }
}
