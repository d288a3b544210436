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
//! | `used_tokens` | `&[u8]` SHA-256 of the secret | postcard [`UsedToken`]: a consumed or burned token's tombstone |
//! | `node_cas` | `&str` node SPIFFE ID      | postcard `Vec<`[`NodeCaRecord`]`>`: node CAs issued to it and not yet expired |
//! | `revocations` | `&str` `"list"`         | postcard `tidemesh_identity::RevocationList` (unsigned; signed when sent) |
//!
//! Times are milliseconds since the Unix epoch (u64). postcard field order is
//! the format: append fields only with a schema bump.
//!
//! Only operator actions and authenticated callers add rows: a token, a
//! spoke, a node CA, a revocation, and their audit entries. A token that
//! is used or burned leaves a tombstone in `used_tokens` (one per token the
//! operator created, kept like its `token_created` audit entry), so that a
//! real token presented again is recognised and audited once
//! ([`Store::note_replay`]); every other refused anonymous request is only
//! counted in memory (`crate::refusals`). The audit log is read in pages
//! ([`Store::audit_page`], [`read_audit_page`] on a stopped hub's file).

use std::path::Path;

use redb::{
    Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const SPOKES: TableDefinition<&str, &[u8]> = TableDefinition::new("spokes");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const NODE_CAS: TableDefinition<&str, &[u8]> = TableDefinition::new("node_cas");
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");
const USED_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("used_tokens");
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

/// What became of a join token.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum TokenOutcome {
    /// It enrolled the spoke it was bound to.
    Enrolled,
    /// It was presented after its expiry and burned.
    Expired,
    /// It was presented for another spoke ID and burned.
    Mismatch,
}

/// The tombstone of a join token that was used or burned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsedToken {
    /// The spoke ID the token was bound to.
    pub spoke: String,
    /// When it was used or burned.
    pub used_ms: u64,
    /// What became of it.
    pub outcome: TokenOutcome,
    /// When it was first presented again (that presentation is audited;
    /// later ones are only counted).
    pub replay_ms: Option<u64>,
}

/// A join token as an Enroll finds it, before anything is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// Unused, unexpired and bound to the spoke ID asked for.
    Valid,
    /// Unused but expired.
    Expired,
    /// Unused but bound to another spoke ID.
    Mismatch {
        /// The ID it is bound to.
        bound: String,
    },
    /// Used or burned before.
    Used(UsedToken),
    /// Never issued (or not by this hub).
    Unknown,
}

/// Which audit entries to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only entries with a sequence number below this.
    pub before: Option<u64>,
    /// Only entries with a sequence number above this; the page is then the
    /// oldest `limit` of them (tailing forward), otherwise the newest.
    pub after: Option<u64>,
    /// At most this many (capped at [`MAX_AUDIT_PAGE`]).
    pub limit: usize,
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            before: None,
            after: None,
            limit: DEFAULT_AUDIT_PAGE,
        }
    }
}

/// Entries one audit page holds unless told otherwise.
pub const DEFAULT_AUDIT_PAGE: usize = 1_000;
/// Most entries one audit page holds.
pub const MAX_AUDIT_PAGE: usize = 10_000;

/// One page of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The entries, oldest first.
    pub entries: Vec<(u64, AuditEntry)>,
    /// Set when older entries match the query: pass it as `before` for
    /// the page before this one.
    pub older: Option<u64>,
    /// Set when newer entries match the query: pass it as `after` for
    /// the page after this one.
    pub newer: Option<u64>,
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
    /// `refused`, `revoked`, `token_created`, `config_applied`,
    /// `config_deleted`, `config_rolled_back`.
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
    /// The NATS JetStream store failed or did not answer in time
    /// ([`crate::state::nats`]).
    #[error("nats jetstream: {op}: {reason}")]
    Nats {
        /// The operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The CA in this hub's data directory is not the CA the shared state
    /// was initialized with (a hub replica needs the first hub's CA files).
    #[error(
        "the CA in --data-dir (sha256:{local}) is not this hub's CA, recorded in the state at init (sha256:{recorded}): a hub replica needs the first replica's ca.pem and ca_key.pem in its data directory (install -m 600)"
    )]
    CaMismatch {
        /// Fingerprint recorded in the state (hex).
        recorded: String,
        /// Fingerprint of the CA in the data directory (hex).
        local: String,
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
        Self::create_in(Database::create(path)?, trust_domain)
    }

    /// [`Store::create`] on a redb storage backend instead of a file
    /// (tests: a simulated disk with slow syncs or faults).
    pub fn create_with_backend(
        backend: impl redb::StorageBackend,
        trust_domain: &str,
    ) -> Result<Store, StoreError> {
        Self::create_in(
            redb::Builder::new().create_with_backend(backend)?,
            trust_domain,
        )
    }

    fn create_in(db: Database, trust_domain: &str) -> Result<Store, StoreError> {
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
            tx.open_table(USED_TOKENS)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// Creates the tables later versions added (idempotent).
    fn ensure_tables(&self) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.open_table(NODE_CAS)?;
        tx.open_table(REVOCATIONS)?;
        tx.open_table(USED_TOKENS)?;
        tx.commit()?;
        Ok(())
    }

    /// Opens an existing database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_in(Database::open(path)?)
    }

    /// [`Store::open`] on a redb storage backend instead of a file.
    pub fn open_with_backend(backend: impl redb::StorageBackend) -> Result<Store, StoreError> {
        Self::open_in(redb::Builder::new().create_with_backend(backend)?)
    }

    fn open_in(db: Database) -> Result<Store, StoreError> {
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

    pub(crate) fn append_audit(
        tx: &redb::WriteTransaction,
        e: &AuditEntry,
    ) -> Result<(), StoreError> {
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

    /// One page of the audit log (see [`AuditQuery`]); reads no more than
    /// the page.
    pub fn audit_page(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        audit_page_in(&self.db, q)
    }

    /// Number of audit entries.
    pub fn audit_len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(AUDIT)?.len()?)
    }

    /// The whole audit log, oldest first: for tests and small tools; the
    /// admin command and the CLI read [`Store::audit_page`].
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

    /// What an Enroll presenting the token hashed to `hash` for `spoke`
    /// finds at `now_ms`. Reads only.
    pub fn token_state(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
    ) -> Result<TokenState, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TOKENS)?;
        if let Some(v) = t.get(hash.as_slice())? {
            let tok: TokenRecord = decode("tokens", v.value())?;
            return Ok(if tok.expires_ms <= now_ms {
                TokenState::Expired
            } else if tok.spoke != spoke {
                TokenState::Mismatch { bound: tok.spoke }
            } else {
                TokenState::Valid
            });
        }
        let u = tx.open_table(USED_TOKENS)?;
        let used = u.get(hash.as_slice())?;
        match used {
            Some(v) => Ok(TokenState::Used(decode("used_tokens", v.value())?)),
            None => Ok(TokenState::Unknown),
        }
    }

    fn tombstone(
        tx: &redb::WriteTransaction,
        hash: &[u8; 32],
        tok: &TokenRecord,
        now_ms: u64,
        outcome: TokenOutcome,
    ) -> Result<(), StoreError> {
        let rec = UsedToken {
            spoke: tok.spoke.clone(),
            used_ms: now_ms,
            outcome,
            replay_ms: None,
        };
        tx.open_table(USED_TOKENS)?
            .insert(hash.as_slice(), encode(&rec).as_slice())?;
        Ok(())
    }

    /// Burns an unused token (expired, or presented for another ID): removes
    /// it, leaves its tombstone and appends `audit`, in one transaction.
    /// Returns `false` (and writes nothing) if the token is gone meanwhile.
    pub fn burn_token(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        outcome: TokenOutcome,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let tx = self.write()?;
        let found = {
            let mut t = tx.open_table(TOKENS)?;
            let removed = t.remove(hash.as_slice())?;
            match removed {
                None => None,
                Some(v) => Some(decode::<TokenRecord>("tokens", v.value())?),
            }
        };
        let Some(tok) = found else {
            tx.abort()?;
            return Ok(false);
        };
        Self::tombstone(&tx, hash, &tok, now_ms, outcome)?;
        Self::append_audit(&tx, audit)?;
        tx.commit()?;
        Ok(true)
    }

    /// Notes the first time a used or burned token is presented again:
    /// marks its tombstone and appends `audit`, in one transaction. Returns
    /// `false` (and writes nothing) if it was noted before or there is no
    /// tombstone: at most one row per token, whatever the number of replays.
    pub fn note_replay(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let tx = self.write()?;
        let noted = {
            let mut t = tx.open_table(USED_TOKENS)?;
            let cur = match t.get(hash.as_slice())? {
                None => None,
                Some(v) => Some(decode::<UsedToken>("used_tokens", v.value())?),
            };
            match cur {
                Some(mut u) if u.replay_ms.is_none() => {
                    u.replay_ms = Some(now_ms);
                    t.insert(hash.as_slice(), encode(&u).as_slice())?;
                    true
                }
                _ => false,
            }
        };
        if !noted {
            tx.abort()?;
            return Ok(false);
        }
        Self::append_audit(&tx, audit)?;
        tx.commit()?;
        Ok(true)
    }

    /// Consumes a token and, if it is valid for `spoke`, enrolls the spoke
    /// with `record`, all in one write transaction: of two racers exactly one
    /// wins. Expired and mismatched tokens are burned too (without an audit
    /// entry: the caller checked the token with [`Store::token_state`]
    /// first, so this is a race it reports itself). Every consumed token
    /// leaves its tombstone.
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
            Some(tok) if tok.expires_ms <= now_ms => {
                Self::tombstone(&tx, hash, &tok, now_ms, TokenOutcome::Expired)?;
                TokenUse::Expired
            }
            Some(tok) if tok.spoke != spoke => {
                Self::tombstone(&tx, hash, &tok, now_ms, TokenOutcome::Mismatch)?;
                TokenUse::Mismatch { bound: tok.spoke }
            }
            Some(tok) => {
                Self::tombstone(&tx, hash, &tok, now_ms, TokenOutcome::Enrolled)?;
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

/// One page of the audit log of a hub database that no hub has open (a
/// stopped hub's `hub.db`), read-only.
pub fn read_audit_page(path: &Path, q: &AuditQuery) -> Result<AuditPage, StoreError> {
    let db = ReadOnlyDatabase::open(path)?;
    audit_page_in(&db, q)
}

fn audit_page_in(db: &impl ReadableDatabase, q: &AuditQuery) -> Result<AuditPage, StoreError> {
    let limit = q.limit.min(MAX_AUDIT_PAGE);
    let lo = match q.after {
        Some(a) => a.saturating_add(1),
        None => 0,
    };
    let hi = q.before.unwrap_or(u64::MAX);
    let mut page = AuditPage {
        entries: Vec::new(),
        older: None,
        newer: None,
    };
    if lo >= hi || limit == 0 {
        return Ok(page);
    }
    let tx = db.begin_read()?;
    let t = tx.open_table(AUDIT)?;
    let row = |k: u64, v: &[u8]| -> Result<(u64, AuditEntry), StoreError> {
        let e: AuditEntry = serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
            table: "audit",
            reason: e.to_string(),
        })?;
        Ok((k, e))
    };
    if q.after.is_some() {
        for r in t.range(lo..hi)?.take(limit) {
            let (k, v) = r?;
            page.entries.push(row(k.value(), v.value())?);
        }
    } else {
        for r in t.range(lo..hi)?.rev().take(limit) {
            let (k, v) = r?;
            page.entries.push(row(k.value(), v.value())?);
        }
        page.entries.reverse();
    }
    if let (Some((first, _)), Some((last, _))) = (page.entries.first(), page.entries.last()) {
        if t.range(lo..*first)?.next().is_some() {
            page.older = Some(*first);
        }
        if t.range(last.saturating_add(1)..hi)?.next().is_some() {
            page.newer = Some(*last);
        }
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            at_ms: i,
            event: "token_created".into(),
            subject: Some(format!("s{i}")),
            detail: String::new(),
        }
    }

    fn seqs(p: &AuditPage) -> Vec<u64> {
        p.entries.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn audit_reads_in_pages() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("hub.db");
        let store = Store::create(&path, "td").expect("create");
        for i in 1..=25 {
            store.audit(&entry(i)).expect("audit");
        }
        let q = |before, after, limit| AuditQuery {
            before,
            after,
            limit,
        };
        // newest first page, printed oldest first
        let p = store.audit_page(&q(None, None, 10)).expect("page");
        assert_eq!(seqs(&p), (16..=25).collect::<Vec<_>>());
        assert_eq!((p.older, p.newer), (Some(16), None));
        // walking back with the cursor (cursors stay within the query's
        // bounds: nothing newer than 15 is below 16)
        let p = store.audit_page(&q(Some(16), None, 10)).expect("page");
        assert_eq!(seqs(&p), (6..=15).collect::<Vec<_>>());
        assert_eq!((p.older, p.newer), (Some(6), None));
        let p = store.audit_page(&q(Some(6), None, 10)).expect("page");
        assert_eq!(seqs(&p), (1..=5).collect::<Vec<_>>());
        assert_eq!((p.older, p.newer), (None, None));
        // tailing forward
        let p = store.audit_page(&q(None, Some(20), 3)).expect("page");
        assert_eq!(seqs(&p), vec![21, 22, 23]);
        assert_eq!((p.older, p.newer), (None, Some(23)));
        // a window, empty and absurd cursors
        let p = store.audit_page(&q(Some(9), Some(3), 100)).expect("page");
        assert_eq!(seqs(&p), (4..=8).collect::<Vec<_>>());
        assert!(store
            .audit_page(&q(Some(1), None, 10))
            .expect("page")
            .entries
            .is_empty());
        assert!(store
            .audit_page(&q(None, Some(u64::MAX), 10))
            .expect("page")
            .entries
            .is_empty());
        assert!(store
            .audit_page(&q(Some(5), Some(5), 10))
            .expect("page")
            .entries
            .is_empty());
        assert!(store
            .audit_page(&q(None, None, 0))
            .expect("page")
            .entries
            .is_empty());
        assert_eq!(store.audit_len().expect("len"), 25);
        // a stopped hub's file reads the same, read-only
        drop(store);
        let p = read_audit_page(&path, &q(None, None, 10)).expect("page");
        assert_eq!(seqs(&p), (16..=25).collect::<Vec<_>>());
    }

    #[test]
    fn a_token_is_burned_once_and_its_replay_noted_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::create(&tmp.path().join("hub.db"), "td").expect("create");
        let h = [7u8; 32];
        let rec = TokenRecord {
            spoke: "a".into(),
            created_ms: 0,
            expires_ms: 100,
        };
        store.put_token(&h, &rec, &entry(0)).expect("put");
        assert_eq!(
            store.token_state(&h, "a", 50).expect("state"),
            TokenState::Valid
        );
        assert_eq!(
            store.token_state(&h, "b", 50).expect("state"),
            TokenState::Mismatch { bound: "a".into() }
        );
        assert_eq!(
            store.token_state(&h, "a", 100).expect("state"),
            TokenState::Expired
        );
        assert_eq!(
            store.token_state(&[0; 32], "a", 50).expect("state"),
            TokenState::Unknown
        );
        assert!(store
            .burn_token(&h, 150, TokenOutcome::Expired, &entry(1))
            .expect("burn"));
        assert!(!store
            .burn_token(&h, 160, TokenOutcome::Expired, &entry(2))
            .expect("burn"));
        let TokenState::Used(u) = store.token_state(&h, "a", 170).expect("state") else {
            panic!("tombstone expected");
        };
        assert_eq!(
            (u.outcome, u.used_ms, u.replay_ms),
            (TokenOutcome::Expired, 150, None)
        );
        assert!(store.note_replay(&h, 200, &entry(3)).expect("note"));
        for t in 201..210 {
            assert!(!store.note_replay(&h, t, &entry(4)).expect("note"));
        }
        assert!(!store.note_replay(&[0; 32], 300, &entry(5)).expect("note"));
        // token_created, burned, first replay: nothing else
        assert_eq!(store.audit_len().expect("len"), 3);
    }
}
