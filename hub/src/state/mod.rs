//! The hub's control-plane state behind one narrow interface,
//! [`HubState`]: join tokens and their tombstones, enrolled spokes and
//! their pinned keys, node CAs, the revocation list, config versions, the
//! audit log and two meta values. Two backends implement it:
//!
//! - **redb** ([`crate::store::Store`]): today's `hub.db` in the data
//!   directory, unchanged (same tables, same schema `1`); the default.
//! - **NATS JetStream** ([`nats::NatsState`], `--store nats://...`): KV
//!   buckets and an audit stream on a JetStream cluster, so that several
//!   hub replicas can share the state later (the layout is documented in
//!   [`nats`]). A preview: replicas of one hub (the same CA files in
//!   each data directory, [`HubState::check_ca`]) share it and see each
//!   other's config versions and revocations ([`HubState::watch_changes`])
//!   and evidence; the spoke registry is still per hub process.
//!
//! Who drives it: [`crate::Hub`], from its durable slots
//! ([`crate::durable`]) and from `spawn_blocking`. What it must not do:
//! decide policy (which token is valid for whom, what a renewal may do);
//! it stores and fetches records and keeps each change's invariant (a
//! token is consumed once, a revocation list version is never lost).
//! Evidence has its own interface, [`crate::evidence::EvidenceBackend`]
//! (`evidence.db`, or the JetStream stream of [`crate::evidence::nats`]).
//!
//! # Blocking, deliberately
//! The trait is synchronous. The writes already run on tokio's blocking
//! pool (a durable slot or `spawn_blocking`) because redb commits block on
//! fsync. Some reads do not yet: the gateway's and the config long poll's
//! `latest_config` while no config is cached, `config get`, and the
//! `spokes` listing call the store from async code. With redb those are
//! short reads; with JetStream each can hold a tokio worker for a round
//! trip to the cluster (up to [`nats::OP_DEADLINE`] when it is down),
//! which is one reason the backend is a preview. An async trait would have pushed `async` through
//! `authority`, `sync` and the admin commands for no gain to the default
//! backend. The JetStream backend owns a small runtime of its own (one
//! worker thread) where its client connection lives; a call spawns the
//! operation there and waits for the answer on a channel, with a deadline
//! ([`nats::OP_DEADLINE`]). So a call never needs the caller's runtime,
//! cannot deadlock it, and the NATS connection keeps its pings and
//! reconnects going while hub threads wait.
//!
//! # Atomicity
//! redb runs each operation as one write transaction (record, tombstone,
//! revocation list and audit entry together). JetStream has no
//! multi-key transactions: each operation's deciding step is one
//! compare-and-set on a revision (the token's state, the spoke record, the
//! revocation list), the steps after it are idempotent, and the audit
//! entry is appended last. A hub that dies between steps leaves a state
//! that fails safe: a token burned but its spoke not enrolled (the
//! operator creates a new token), a spoke marked revoked before the list
//! names it (the list is reconciled from the spoke records when a hub
//! opens the state), or a missing audit entry.

pub mod nats;

use std::path::Path;
use std::sync::Arc;

use tidemesh_identity::{RevocationList, SpiffeId};
use tidemesh_policy::MeshConfig;

use crate::config::{ConfigVersion, VersionMeta};
use crate::store::{
    AuditEntry, AuditPage, AuditQuery, NodeCaRecord, SpokeRecord, Store, StoreError, TokenOutcome,
    TokenRecord, TokenState, TokenUse,
};

/// What another process sharing the state may have changed (see
/// [`HubState::watch_changes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// The config versions (a new one appended).
    Config,
    /// The revocation list.
    Revocations,
}

/// Called by a backend's watcher; must return at once (it runs on the
/// backend's own threads).
pub type OnChange = Arc<dyn Fn(Changed) + Send + Sync>;

/// The hub's control-plane records, whatever holds them. Every method
/// blocks; call it from the blocking pool (see the module doc).
pub trait HubState: Send + Sync + std::fmt::Debug {
    /// Which backend: `redb` or `jetstream`.
    fn backend(&self) -> &'static str;

    /// Starts following changes that other processes sharing this state
    /// (hub replicas) make to the config versions and the revocation
    /// list: `on_change` is called after each such change (ours too), and
    /// once whenever the watch is (re)established, since a change made
    /// while it was down is not replayed; the caller re-reads the latest
    /// and compares. Returns `false`, watching nothing, when no other
    /// process can change the state (redb: one hub owns `hub.db`).
    fn watch_changes(&self, on_change: OnChange) -> bool {
        let _ = on_change;
        false
    }

    /// A meta value (`trust_domain`, `schema`).
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Checks that the CA certificate with SHA-256 `fingerprint` (lowercase
    /// hex) is the one this state belongs to, recording it if the state
    /// holds none yet; [`StoreError::CaMismatch`] otherwise. redb: always
    /// fine (`hub.db` and the CA share one data directory). JetStream: the
    /// state is shared by replicas, each with its own copy of the CA.
    fn check_ca(&self, fingerprint: &str) -> Result<(), StoreError> {
        let _ = fingerprint;
        Ok(())
    }

    /// Appends an audit entry on its own.
    fn audit(&self, e: &AuditEntry) -> Result<(), StoreError>;
    /// One page of the audit log.
    fn audit_page(&self, q: &AuditQuery) -> Result<AuditPage, StoreError>;
    /// Number of audit entries.
    fn audit_len(&self) -> Result<u64, StoreError>;
    /// The whole audit log, oldest first (tests and small tools).
    fn audit_log(&self) -> Result<Vec<(u64, AuditEntry)>, StoreError>;

    /// Stores a new token (by the hash of its secret) with its audit entry.
    fn put_token(
        &self,
        hash: &[u8; 32],
        rec: &TokenRecord,
        audit: &AuditEntry,
    ) -> Result<(), StoreError>;
    /// What an Enroll presenting the token hashed to `hash` for `spoke`
    /// finds at `now_ms`. Reads only.
    fn token_state(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
    ) -> Result<TokenState, StoreError>;
    /// Burns an unused token, leaving its tombstone; `false` if it was
    /// used or burned meanwhile.
    fn burn_token(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        outcome: TokenOutcome,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError>;
    /// Notes the first replay of a used token; `false` after the first or
    /// without a tombstone.
    fn note_replay(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError>;
    /// Consumes a token and, if it is valid for `spoke`, enrolls the spoke
    /// with `record`: of two racers (even on two hubs sharing the state)
    /// exactly one gets [`TokenUse::Enrolled`].
    fn consume_token(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
        record: &SpokeRecord,
        audit_ok: &AuditEntry,
    ) -> Result<TokenUse, StoreError>;

    /// One spoke's record.
    fn spoke(&self, id: &str) -> Result<Option<SpokeRecord>, StoreError>;
    /// Every spoke, ordered by ID.
    fn spokes(&self) -> Result<Vec<(String, SpokeRecord)>, StoreError>;
    /// Read-modify-write of one spoke record with an optional audit entry;
    /// `f` may run more than once (on a lost compare-and-set). Returns the
    /// updated record, or `None` if the spoke is unknown.
    fn update_spoke(
        &self,
        id: &str,
        audit: Option<&AuditEntry>,
        f: &mut dyn FnMut(&mut SpokeRecord),
    ) -> Result<Option<SpokeRecord>, StoreError>;

    /// The revocation list in force.
    fn revocation_list(&self) -> Result<RevocationList, StoreError>;
    /// Revokes a spoke: marks its record and makes a new revocation list
    /// version naming it, its pinned key and its node CAs.
    fn revoke_spoke(
        &self,
        id: &SpiffeId,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<Option<(SpokeRecord, RevocationList)>, StoreError>;
    /// Records a node CA issued to `id`; `false` if the spoke is unknown or
    /// revoked.
    fn add_node_ca(
        &self,
        id: &str,
        ca: NodeCaRecord,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError>;
    /// The node CAs issued to `id` that have not expired by `now_ms`.
    fn node_cas(&self, id: &str, now_ms: u64) -> Result<Vec<NodeCaRecord>, StoreError>;
    /// Makes the revocation list name every spoke marked revoked.
    fn reconcile_revocations(&self, now_ms: u64) -> Result<RevocationList, StoreError>;

    /// The newest config version, if any.
    fn config_latest(&self) -> Result<Option<ConfigVersion>, StoreError>;
    /// One config version.
    fn config_get(&self, version: u64) -> Result<Option<ConfigVersion>, StoreError>;
    /// Every config version's metadata, oldest first.
    fn config_history(&self) -> Result<Vec<VersionMeta>, StoreError>;
    /// Appends a new config version (latest + 1) and its audit entry.
    fn config_append(
        &self,
        event: &str,
        at_ms: u64,
        uid: Option<u32>,
        summary: String,
        rollback_of: Option<u64>,
        config: MeshConfig,
    ) -> Result<ConfigVersion, StoreError>;
}

/// Where the hub's state lives (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// `hub.db` in the data directory (the default).
    Redb,
    /// A NATS JetStream cluster: `host:port` of one or more of its servers.
    Nats(Vec<String>),
}

impl StateLocation {
    /// Parses `--store`: `redb` (or nothing) or
    /// `nats://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(s: Option<&str>) -> Result<StateLocation, String> {
        let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(StateLocation::Redb);
        };
        if s == "redb" {
            return Ok(StateLocation::Redb);
        }
        let Some(rest) = s.strip_prefix("nats://") else {
            return Err(format!(
                "--store {s:?}: unknown store; use `redb` (hub.db in --data-dir, the default) or nats://HOST:PORT[,HOST:PORT...]"
            ));
        };
        let mut servers = Vec::new();
        for part in rest.split(',') {
            let part = part.trim().trim_start_matches("nats://");
            if part.contains(['@', '/', '?']) {
                return Err(format!(
                    "--store: {:?} has credentials, a path or a query; the NATS connection takes none (HOST:PORT only; see README: plaintext, no credentials in this preview)",
                    part.split('@').next_back().unwrap_or_default()
                ));
            }
            let ok = part
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok {
                return Err(format!(
                    "--store {s:?}: {part:?} is not HOST:PORT (expected nats://HOST:PORT[,HOST:PORT...])"
                ));
            }
            servers.push(part.to_owned());
        }
        Ok(StateLocation::Nats(servers))
    }

    /// Opens the state of an initialized hub.
    pub fn open(&self, data_dir: &Path) -> Result<Arc<dyn HubState>, StoreError> {
        Ok(match self {
            StateLocation::Redb => Arc::new(Store::open(&data_dir.join(crate::HUB_DB))?),
            StateLocation::Nats(servers) => Arc::new(nats::NatsState::open(servers)?),
        })
    }
}

impl HubState for Store {
    fn backend(&self) -> &'static str {
        "redb"
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Store::meta(self, key)
    }
    fn audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        Store::audit(self, e)
    }
    fn audit_page(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        Store::audit_page(self, q)
    }
    fn audit_len(&self) -> Result<u64, StoreError> {
        Store::audit_len(self)
    }
    fn audit_log(&self) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        Store::audit_log(self)
    }
    fn put_token(
        &self,
        hash: &[u8; 32],
        rec: &TokenRecord,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        Store::put_token(self, hash, rec, audit)
    }
    fn token_state(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
    ) -> Result<TokenState, StoreError> {
        Store::token_state(self, hash, spoke, now_ms)
    }
    fn burn_token(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        outcome: TokenOutcome,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        Store::burn_token(self, hash, now_ms, outcome, audit)
    }
    fn note_replay(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        Store::note_replay(self, hash, now_ms, audit)
    }
    fn consume_token(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
        record: &SpokeRecord,
        audit_ok: &AuditEntry,
    ) -> Result<TokenUse, StoreError> {
        Store::consume_token(self, hash, spoke, now_ms, record, audit_ok)
    }
    fn spoke(&self, id: &str) -> Result<Option<SpokeRecord>, StoreError> {
        Store::spoke(self, id)
    }
    fn spokes(&self) -> Result<Vec<(String, SpokeRecord)>, StoreError> {
        Store::spokes(self)
    }
    fn update_spoke(
        &self,
        id: &str,
        audit: Option<&AuditEntry>,
        f: &mut dyn FnMut(&mut SpokeRecord),
    ) -> Result<Option<SpokeRecord>, StoreError> {
        Store::update_spoke(self, id, audit, f)
    }
    fn revocation_list(&self) -> Result<RevocationList, StoreError> {
        Store::revocation_list(self)
    }
    fn revoke_spoke(
        &self,
        id: &SpiffeId,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<Option<(SpokeRecord, RevocationList)>, StoreError> {
        Store::revoke_spoke(self, id, now_ms, audit)
    }
    fn add_node_ca(
        &self,
        id: &str,
        ca: NodeCaRecord,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        Store::add_node_ca(self, id, ca, now_ms, audit)
    }
    fn node_cas(&self, id: &str, now_ms: u64) -> Result<Vec<NodeCaRecord>, StoreError> {
        Store::node_cas(self, id, now_ms)
    }
    fn reconcile_revocations(&self, now_ms: u64) -> Result<RevocationList, StoreError> {
        Store::reconcile_revocations(self, now_ms)
    }
    fn config_latest(&self) -> Result<Option<ConfigVersion>, StoreError> {
        self.config().latest()
    }
    fn config_get(&self, version: u64) -> Result<Option<ConfigVersion>, StoreError> {
        self.config().get(version)
    }
    fn config_history(&self) -> Result<Vec<VersionMeta>, StoreError> {
        self.config().history()
    }
    fn config_append(
        &self,
        event: &str,
        at_ms: u64,
        uid: Option<u32>,
        summary: String,
        rollback_of: Option<u64>,
        config: MeshConfig,
    ) -> Result<ConfigVersion, StoreError> {
        self.config()
            .append(event, at_ms, uid, summary, rollback_of, config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations_parse_and_unknown_schemes_are_refused() {
        assert_eq!(StateLocation::parse(None), Ok(StateLocation::Redb));
        assert_eq!(StateLocation::parse(Some("redb")), Ok(StateLocation::Redb));
        assert_eq!(
            StateLocation::parse(Some("nats://10.0.0.1:4222,b.example:4223")),
            Ok(StateLocation::Nats(vec![
                "10.0.0.1:4222".into(),
                "b.example:4223".into()
            ]))
        );
        let e = StateLocation::parse(Some("etcd://x:2379")).expect_err("unknown scheme");
        assert!(e.contains("unknown store"), "{e}");
        for bad in [
            "nats://",
            "nats://host",
            "nats://h:0",
            "nats://:4222",
            "nats://h:x",
            "nats://h:1/path",
        ] {
            let e = StateLocation::parse(Some(bad)).expect_err(bad);
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
        // credentials are refused, and not echoed in the error
        for bad in ["nats://user:secret@h:4222", "nats://a:1,u:secret@b:2"] {
            let e = StateLocation::parse(Some(bad)).expect_err(bad);
            assert!(!e.contains("secret"), "{bad}: {e}");
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
        let e = StateLocation::parse(Some("nats://h:1?x=1")).expect_err("a query");
        assert!(e.contains("HOST:PORT"), "{e}");
    }
}
