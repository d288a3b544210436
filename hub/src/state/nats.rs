//! The hub's control-plane state on a NATS JetStream cluster
//! (`tidemesh-hub init|serve --store nats://HOST:PORT[,HOST:PORT...]`), a
//! preview: several hub replicas can share it; each watches the config
//! and revocation buckets (KV watches, re-created with backoff when a
//! server is lost) so that a change made through one replica reaches the
//! spokes of all ([`crate::HubState::watch_changes`]). Each replica holds a
//! copy of the hub's CA files, checked against the fingerprint recorded
//! at init ([`super::HubState::check_ca`]).
//!
//! Who drives it: [`crate::Hub`] through [`super::HubState`], from the
//! blocking pool. What it must not do: hold the CA key (it stays in the
//! hub's data directory), decide policy, or block the caller's runtime: the
//! client connection lives on a runtime of this backend's own (one worker
//! thread); every call hands its steps to it and waits, at most
//! [`OP_DEADLINE`] in all, retrying steps that failed for a lost server or
//! leader (a NATS node killed) until then.
//!
//! # Layout
//! Buckets and the stream get `min(3, number of --store addresses)`
//! replicas, file storage, one value per key (history 1); a bucket is the
//! stream `KV_<bucket>` on subjects `$KV.<bucket>.>` (the KV convention,
//! so the `nats kv` tools read it), made without direct gets.
//!
//! | bucket / stream          | key                             | value |
//! |--------------------------|---------------------------------|-------|
//! | KV `tidemesh_meta`       | `trust_domain`, `schema`, `ca_fingerprint` (SHA-256 of the CA certificate, hex) | UTF-8 |
//! | KV `tidemesh_tokens`     | lowercase hex SHA-256 of the secret | postcard [`TokenSlot`]: the token, then its tombstone |
//! | KV `tidemesh_spokes`     | lowercase hex of the node SPIFFE ID | postcard [`SpokeRecord`] (pinned key, revoked mark) |
//! | KV `tidemesh_node_cas`   | lowercase hex of the node SPIFFE ID | postcard `Vec<`[`NodeCaRecord`]`>` |
//! | KV `tidemesh_revocations`| `list`                          | postcard `RevocationList` |
//! | KV `tidemesh_config`     | version number, decimal (from 1)| JSON [`ConfigVersion`] |
//! | stream `TIDEMESH_AUDIT`  | subject `tidemesh.audit`, sequence = audit number | JSON [`AuditEntry`] |
//!
//! Keys are hex because SPIFFE IDs hold characters NATS subjects do not.
//! The records are the redb backend's types, encoded the same way.
//!
//! # Single use and compare-and-set
//! Every change reads the bucket's last sequence and then the key (from
//! the stream leader, not a direct-get replica), and writes with that
//! sequence as the expected last one (`Nats-Expected-Last-Sequence`; see
//! [`NatsState::write`] for why not the key's revision). A writer that
//! loses reads again and decides again. A join token is consumed by turning its
//! [`TokenSlot::Pending`] into [`TokenSlot::Used`] that way: of two hubs
//! presenting one token, exactly one write lands; the other reads the
//! tombstone and refuses. A write whose answer is lost (the server died)
//! is recognised on the re-read by its bytes: each tombstone carries a
//! random claim number. A config version is written only while its
//! number's key is absent, so two appends never share a version. Audit entries are
//! published with a `Nats-Msg-Id`, so a retried publish is stored once
//! (within JetStream's duplicate window).
//!
//! What is not atomic here (one redb transaction there) is described in
//! [`super`]: the deciding compare-and-set comes first, idempotent steps
//! and the audit entry follow.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};
use tidemesh_identity::{revocation::RevokedKey, RevocationList, SpiffeId};
use tidemesh_policy::MeshConfig;
use tokio_stream::StreamExt as _;

use super::{Changed, HubState, OnChange};
use crate::config::{ConfigVersion, VersionMeta};
use crate::store::{
    AuditEntry, AuditPage, AuditQuery, NodeCaRecord, SpokeRecord, StoreError, TokenOutcome,
    TokenRecord, TokenState, TokenUse, UsedToken, MAX_AUDIT_PAGE, SCHEMA,
};

/// How long one operation may take in all, retries included.
pub const OP_DEADLINE: Duration = Duration::from_secs(30);
/// One request to the cluster (a retry follows a timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between retries of a failed step.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// First pause before re-creating a failed KV watch; doubles up to
/// [`WATCH_RETRY_MAX`] while it keeps failing.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts to re-create a KV watch.
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

const AUDIT_STREAM: &str = "TIDEMESH_AUDIT";
const AUDIT_SUBJECT: &str = "tidemesh.audit";
const LIST_KEY: &str = "list";
/// `tidemesh_meta` key of the CA certificate's fingerprint.
const CA_KEY: &str = "ca_fingerprint";

/// A join token's key in `tidemesh_tokens`: waiting, then its tombstone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum TokenSlot {
    /// Created by the operator, not yet presented.
    Pending(TokenRecord),
    /// Used or burned.
    Used {
        /// The tombstone.
        used: UsedToken,
        /// Random number of the write that consumed it (recognises a
        /// write whose answer was lost).
        claim: u64,
    },
}

#[derive(Debug, Clone, Copy)]
enum Bucket {
    Meta,
    Tokens,
    Spokes,
    NodeCas,
    Revocations,
    Config,
}

const BUCKETS: [(Bucket, &str); 6] = [
    (Bucket::Meta, "tidemesh_meta"),
    (Bucket::Tokens, "tidemesh_tokens"),
    (Bucket::Spokes, "tidemesh_spokes"),
    (Bucket::NodeCas, "tidemesh_node_cas"),
    (Bucket::Revocations, "tidemesh_revocations"),
    (Bucket::Config, "tidemesh_config"),
];

struct Conn {
    js: jetstream::Context,
    kvs: Vec<Arc<kv::Store>>,
}

/// The JetStream backend of [`HubState`].
pub struct NatsState {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    conn: Arc<Conn>,
    servers: Vec<String>,
}

impl std::fmt::Debug for NatsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsState")
            .field("servers", &self.servers)
            .finish()
    }
}

impl Drop for NatsState {
    fn drop(&mut self) {
        // may be dropped on an async worker: do not block there
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn err(op: &'static str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Nats {
        op,
        reason: reason.to_string(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
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

fn json_decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    b: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// A key's revision (its stream sequence) and value.
type Revision = (u64, Vec<u8>);

/// What a compare-and-set step decided.
enum Step<T> {
    /// Write these bytes (expecting the revision read), then return `T`.
    Write(Vec<u8>, T),
    /// Write nothing and return `T`.
    Done(T),
}

/// How a conditional write ended.
enum Written {
    Yes,
    /// Another writer got there first (wrong last revision, or exists).
    Lost,
}

impl NatsState {
    /// Connects to an initialized hub state.
    pub fn open(servers: &[String]) -> Result<NatsState, StoreError> {
        let s = Self::connect(servers)?;
        let until = Instant::now() + OP_DEADLINE;
        let schema = s.read(Bucket::Meta, "schema", until, "open")?;
        let schema = schema.map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
        if schema.as_deref() != Some(SCHEMA) {
            return Err(StoreError::Corrupt {
                table: "tidemesh_meta",
                reason: format!("schema {schema:?}, this build reads {SCHEMA}"),
            });
        }
        Ok(s)
    }

    /// Creates the buckets and the audit stream and records the trust
    /// domain; fails if the cluster already holds a hub's state.
    pub fn init(servers: &[String], trust_domain: &str) -> Result<NatsState, StoreError> {
        let s = Self::connect_or_create(servers, true)?;
        let until = Instant::now() + OP_DEADLINE;
        let td = trust_domain.as_bytes().to_vec();
        let created = s.cas(Bucket::Meta, "trust_domain", until, "init", |cur| {
            Ok(match cur {
                None => Step::Write(td.clone(), None),
                Some(v) => Step::Done(Some(String::from_utf8_lossy(v).into_owned())),
            })
        })?;
        if let Some(existing) = created {
            return Err(err(
                "init",
                format!(
                    "the cluster at nats://{} already holds a hub's state (trust domain {existing}); use it with `serve --store`, or remove its tidemesh_* buckets first",
                    servers.join(",")
                ),
            ));
        }
        let schema = SCHEMA.as_bytes().to_vec();
        s.cas(Bucket::Meta, "schema", until, "init", |_| {
            Ok(Step::Write(schema.clone(), ()))
        })?;
        Ok(s)
    }

    fn connect(servers: &[String]) -> Result<NatsState, StoreError> {
        Self::connect_or_create(servers, false)
    }

    fn connect_or_create(servers: &[String], create: bool) -> Result<NatsState, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tidemesh-nats")
            .enable_all()
            .build()
            .map_err(|e| err("connect", format!("cannot start the client runtime: {e}")))?;
        let handle = rt.handle().clone();
        let list = servers.join(",");
        let addrs = servers
            .iter()
            .map(|s| {
                format!("nats://{s}")
                    .parse::<async_nats::ServerAddr>()
                    .map_err(|e| err("connect", format!("{s}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let replicas = servers.len().clamp(1, 3);
        let connect = async move {
            let client = async_nats::ConnectOptions::new()
                .name("tidemesh-hub")
                .connection_timeout(REQUEST_TIMEOUT)
                .reconnect_delay_callback(|n| Duration::from_millis(100 * n.min(10) as u64))
                .connect(addrs)
                .await
                .map_err(|e| format!("cannot connect to nats://{list}: {e}"))?;
            let mut js = jetstream::new(client);
            js.set_timeout(REQUEST_TIMEOUT);
            let mut kvs = Vec::new();
            for (_, name) in BUCKETS {
                if create {
                    // the bucket's stream made here, not by
                    // `create_key_value`: that asks for account info this
                    // client cannot parse from a 2.9 server; and without
                    // direct gets, so every read goes to the leader
                    js.get_or_create_stream(stream::Config {
                        name: format!("KV_{name}"),
                        subjects: vec![format!("$KV.{name}.>")],
                        max_messages_per_subject: 1,
                        storage: stream::StorageType::File,
                        num_replicas: replicas,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: false,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("create bucket {name}: {e}"))?;
                }
                let kv = js.get_key_value(name).await.map_err(|e| {
                    format!("bucket {name}: {e}: no hub state at nats://{list}? run `tidemesh-hub init --store nats://{list}` first")
                })?;
                kvs.push(Arc::new(kv));
            }
            if create {
                js.get_or_create_stream(stream::Config {
                    name: AUDIT_STREAM.to_owned(),
                    subjects: vec![AUDIT_SUBJECT.to_owned()],
                    num_replicas: replicas,
                    storage: stream::StorageType::File,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create stream {AUDIT_STREAM}: {e}"))?;
            }
            Ok::<_, String>(Conn { js, kvs })
        };
        let conn = Self::run_on(&handle, Instant::now() + OP_DEADLINE, connect)
            .map_err(|e| err("connect", e))?;
        Ok(NatsState {
            rt: Some(rt),
            handle,
            conn: Arc::new(conn),
            servers: servers.to_vec(),
        })
    }

    /// Runs `f` on the client runtime and waits for it, until `until`.
    fn run_on<T: Send + 'static>(
        handle: &tokio::runtime::Handle,
        until: Instant,
        f: impl Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        let left = until.saturating_duration_since(Instant::now());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        handle.spawn(async move {
            let r = match tokio::time::timeout(left, f).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {}s", left.as_secs_f32())),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| "the client runtime stopped".to_owned())?
    }

    fn run<T: Send + 'static>(
        &self,
        until: Instant,
        f: impl Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        Self::run_on(&self.handle, until, f)
    }

    fn kv(&self, b: Bucket) -> Arc<kv::Store> {
        self.conn.kvs[b as usize].clone()
    }

    /// Retries `step` until it succeeds or `until` passes.
    fn retrying<T>(
        &self,
        until: Instant,
        op: &'static str,
        mut step: impl FnMut() -> Result<T, String>,
    ) -> Result<T, StoreError> {
        loop {
            match step() {
                Ok(t) => return Ok(t),
                Err(e) if Instant::now() + RETRY_PAUSE >= until => return Err(err(op, e)),
                Err(e) => {
                    tracing::debug!(op, error = %e, "nats step failed; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    /// The key's value and revision, read from the stream leader.
    fn read(
        &self,
        b: Bucket,
        key: &str,
        until: Instant,
        op: &'static str,
    ) -> Result<Option<Revision>, StoreError> {
        self.retrying(until, op, || {
            let kv = self.kv(b);
            let subject = format!("{}{key}", kv.prefix);
            self.run(until, async move {
                match kv.stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => {
                        let deleted = m
                            .headers
                            .get("KV-Operation")
                            .is_some_and(|v| v.as_str() != "PUT");
                        Ok((!deleted).then(|| (m.sequence, m.payload.to_vec())))
                    }
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                        Ok(None)
                    }
                    Err(e) => Err(format!("read {subject}: {e}")),
                }
            })
        })
    }

    /// The bucket's last stream sequence and then the key's value and
    /// revision: a revision not above that sequence is the key's value as
    /// of it (a write in between would show in the key's read).
    fn snapshot(
        &self,
        b: Bucket,
        key: &str,
        until: Instant,
        op: &'static str,
    ) -> Result<(u64, Option<Revision>), StoreError> {
        loop {
            let last = self.retrying(until, op, || {
                let name = self.kv(b).stream_name.clone();
                let js = self.conn.js.clone();
                self.run(until, async move {
                    let s = js
                        .get_stream(&name)
                        .await
                        .map_err(|e| format!("stream {name}: {e}"))?;
                    Ok(s.cached_info().state.last_sequence)
                })
            })?;
            let cur = self.read(b, key, until, op)?;
            if cur.as_ref().is_none_or(|(rev, _)| *rev <= last) {
                return Ok((last, cur));
            }
            if Instant::now() >= until {
                return Err(err(op, "the bucket kept changing under a read"));
            }
        }
    }

    /// Writes `value` if the bucket's last sequence is still `last`.
    ///
    /// The condition is on the bucket's stream, not the key's revision:
    /// nats-server before 2.9.21 (Debian ships 2.9.10) checks a key's
    /// expected revision outside the replicated log in a cluster, so two
    /// concurrent updates of one revision may both land (nats-server
    /// issue 4320); the stream's expected last sequence is checked
    /// against the proposals in flight. The cost: any write to the bucket
    /// makes a concurrent one retry.
    fn write(
        &self,
        b: Bucket,
        key: &str,
        value: Vec<u8>,
        last: u64,
        until: Instant,
    ) -> Result<Written, String> {
        let kv = self.kv(b);
        let js = self.conn.js.clone();
        let subject = format!("{}{key}", kv.prefix);
        self.run(until, async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Expected-Stream", kv.stream_name.as_str());
            h.insert("Nats-Expected-Last-Sequence", last.to_string().as_str());
            let ack = js
                .publish_with_headers(subject.clone(), h, value.into())
                .await
                .map_err(|e| format!("write {subject}: {e}"))?
                .await;
            match ack {
                Ok(_) => Ok(Written::Yes),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    Ok(Written::Lost)
                }
                Err(e) => Err(format!("write {subject}: {e}")),
            }
        })
    }

    /// Read, decide, compare-and-set, until a decision lands. A write
    /// whose answer was lost counts as landed when the re-read finds its
    /// bytes.
    fn cas<T>(
        &self,
        b: Bucket,
        key: &str,
        until: Instant,
        op: &'static str,
        decide: impl FnMut(Option<&[u8]>) -> Result<Step<T>, StoreError>,
    ) -> Result<T, StoreError> {
        self.cas_with(b, key, until, op, |written, cur| written == cur, decide)
    }

    /// [`Self::cas`], with `landed(written, current)` telling whether the
    /// key still shows a write whose answer was lost (a later change on
    /// top of it, a replay noted on a tombstone, say, must not hide it).
    fn cas_with<T>(
        &self,
        b: Bucket,
        key: &str,
        until: Instant,
        op: &'static str,
        landed: impl Fn(&[u8], &[u8]) -> bool,
        mut decide: impl FnMut(Option<&[u8]>) -> Result<Step<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let mut pending: Option<(Vec<u8>, T)> = None;
        loop {
            let (last, cur) = self.snapshot(b, key, until, op)?;
            if let Some((bytes, t)) = pending.take() {
                if cur.as_ref().is_some_and(|(_, v)| landed(&bytes, v)) {
                    return Ok(t);
                }
            }
            match decide(cur.as_ref().map(|(_, v)| v.as_slice()))? {
                Step::Done(t) => return Ok(t),
                Step::Write(bytes, t) => match self.write(b, key, bytes.clone(), last, until) {
                    Ok(Written::Yes) => return Ok(t),
                    Ok(Written::Lost) => {
                        // another writer of this bucket got in first: read
                        // again after a short jittered pause, so writers
                        // racing on one bucket do not spin
                        std::thread::sleep(Duration::from_millis(5 + rand::random::<u64>() % 45));
                        continue;
                    }
                    Err(e) => {
                        if Instant::now() + RETRY_PAUSE >= until {
                            return Err(err(op, e));
                        }
                        tracing::debug!(op, error = %e, "nats write unanswered; re-reading");
                        pending = Some((bytes, t));
                        std::thread::sleep(RETRY_PAUSE);
                    }
                },
            }
        }
    }

    /// Writes `value` whatever the key holds.
    fn put(
        &self,
        b: Bucket,
        key: &str,
        value: Vec<u8>,
        until: Instant,
        op: &'static str,
    ) -> Result<(), StoreError> {
        self.cas(b, key, until, op, |_| Ok(Step::Write(value.clone(), ())))
    }

    fn keys(&self, b: Bucket, until: Instant, op: &'static str) -> Result<Vec<String>, StoreError> {
        self.retrying(until, op, || {
            let kv = self.kv(b);
            self.run(until, async move {
                let mut keys = kv.keys().await.map_err(|e| format!("list keys: {e}"))?;
                let mut out = Vec::new();
                while let Some(k) = keys.next().await {
                    out.push(k.map_err(|e| format!("list keys: {e}"))?);
                }
                Ok(out)
            })
        })
    }

    fn publish_audit(&self, e: &AuditEntry, until: Instant) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(e).unwrap_or_default();
        let id = format!("{:032x}", rand::random::<u128>());
        self.retrying(until, "audit", || {
            let js = self.conn.js.clone();
            let payload = payload.clone();
            let id = id.clone();
            self.run(until, async move {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", id.as_str());
                js.publish_with_headers(AUDIT_SUBJECT, h, payload.into())
                    .await
                    .map_err(|e| format!("publish: {e}"))?
                    .await
                    .map_err(|e| format!("publish ack: {e}"))?;
                Ok(())
            })
        })
    }

    /// The audit stream's (first, last) sequence.
    fn audit_bounds(&self, until: Instant) -> Result<(u64, u64), StoreError> {
        self.retrying(until, "audit", || {
            let js = self.conn.js.clone();
            self.run(until, async move {
                let s = js
                    .get_stream(AUDIT_STREAM)
                    .await
                    .map_err(|e| format!("stream {AUDIT_STREAM}: {e}"))?;
                let st = &s.cached_info().state;
                Ok((st.first_sequence, st.last_sequence))
            })
        })
    }

    fn audit_entry(&self, seq: u64, until: Instant) -> Result<AuditEntry, StoreError> {
        let bytes = self.retrying(until, "audit", || {
            let js = self.conn.js.clone();
            self.run(until, async move {
                let s = js
                    .get_stream(AUDIT_STREAM)
                    .await
                    .map_err(|e| format!("stream {AUDIT_STREAM}: {e}"))?;
                let m = s
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| format!("audit entry {seq}: {e}"))?;
                Ok(m.payload.to_vec())
            })
        })?;
        json_decode("audit", &bytes)
    }

    fn audit_range(
        &self,
        lo: u64,
        hi: u64,
        until: Instant,
    ) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        (lo..=hi)
            .map(|s| Ok((s, self.audit_entry(s, until)?)))
            .collect()
    }

    fn spoke_at(
        &self,
        id: &str,
        until: Instant,
        op: &'static str,
    ) -> Result<Option<SpokeRecord>, StoreError> {
        match self.read(Bucket::Spokes, &hex(id.as_bytes()), until, op)? {
            None => Ok(None),
            Some((_, v)) => Ok(Some(decode("spokes", &v)?)),
        }
    }

    fn node_cas_at(
        &self,
        id: &str,
        until: Instant,
        op: &'static str,
    ) -> Result<Vec<NodeCaRecord>, StoreError> {
        match self.read(Bucket::NodeCas, &hex(id.as_bytes()), until, op)? {
            None => Ok(Vec::new()),
            Some((_, v)) => decode("node_cas", &v),
        }
    }

    /// Changes the revocation list with compare-and-set; `f` returns
    /// whether it changed anything (then the version is bumped).
    fn change_list(
        &self,
        now_ms: u64,
        until: Instant,
        op: &'static str,
        mut f: impl FnMut(&mut RevocationList) -> bool,
    ) -> Result<RevocationList, StoreError> {
        self.cas(Bucket::Revocations, LIST_KEY, until, op, |cur| {
            let mut list: RevocationList = match cur {
                None => RevocationList::default(),
                Some(v) => decode("revocations", v)?,
            };
            if !f(&mut list) {
                return Ok(Step::Done(list));
            }
            list.version += 1;
            list.issued_ms = now_ms;
            Ok(Step::Write(encode(&list), list))
        })
    }

    fn token_op(
        &self,
        hash: &[u8; 32],
        until: Instant,
        op: &'static str,
        mut decide: impl FnMut(Option<TokenSlot>) -> Step<TokenUse>,
    ) -> Result<TokenUse, StoreError> {
        self.cas_with(Bucket::Tokens, &hex(hash), until, op, same_claim, |cur| {
            let slot = cur.map(|v| decode::<TokenSlot>("tokens", v)).transpose()?;
            Ok(decide(slot))
        })
    }
}

/// Follows one bucket with a KV watch (new writes only), calling
/// `on_change` for each and once after every (re)start of the watch: a
/// write made while no watch ran is not replayed, so the caller re-reads.
/// A failed or ended watch (a NATS server lost, its consumer gone) is
/// re-created after a pause that doubles from [`WATCH_RETRY_MIN`] to
/// [`WATCH_RETRY_MAX`] while it keeps failing. Runs until the backend's
/// runtime stops.
async fn watch_bucket(kv: Arc<kv::Store>, what: Changed, on_change: OnChange) {
    let bucket = kv.name.clone();
    let mut pause = WATCH_RETRY_MIN;
    loop {
        match kv.watch_all().await {
            Ok(mut w) => {
                tracing::debug!(bucket = %bucket, "watching for changes by other hub replicas");
                on_change(what);
                pause = WATCH_RETRY_MIN;
                loop {
                    match w.next().await {
                        Some(Ok(_)) => on_change(what),
                        Some(Err(e)) => {
                            tracing::warn!(bucket = %bucket, error = %e, "KV watch failed; re-creating it");
                            break;
                        }
                        None => {
                            tracing::warn!(bucket = %bucket, "KV watch ended; re-creating it");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(bucket = %bucket, error = %e, retry_in = ?pause, "cannot watch the bucket; retrying");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(WATCH_RETRY_MAX);
    }
}

/// Whether the token slot `cur` is the tombstone `written` put there: the
/// same claim number, whatever was noted on it since (a replay).
fn same_claim(written: &[u8], cur: &[u8]) -> bool {
    match (
        postcard::from_bytes::<TokenSlot>(written),
        postcard::from_bytes::<TokenSlot>(cur),
    ) {
        (Ok(TokenSlot::Used { claim: a, .. }), Ok(TokenSlot::Used { claim: b, .. })) => a == b,
        _ => written == cur,
    }
}

fn deadline() -> Instant {
    Instant::now() + OP_DEADLINE
}

fn tombstone(tok: &TokenRecord, now_ms: u64, outcome: TokenOutcome, claim: u64) -> Vec<u8> {
    encode(&TokenSlot::Used {
        used: UsedToken {
            spoke: tok.spoke.clone(),
            used_ms: now_ms,
            outcome,
            replay_ms: None,
        },
        claim,
    })
}

impl HubState for NatsState {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    fn watch_changes(&self, on_change: OnChange) -> bool {
        for (b, what) in [
            (Bucket::Config, Changed::Config),
            (Bucket::Revocations, Changed::Revocations),
        ] {
            self.handle
                .spawn(watch_bucket(self.kv(b), what, on_change.clone()));
        }
        true
    }

    fn check_ca(&self, fingerprint: &str) -> Result<(), StoreError> {
        // init records it; a state made before this check records the
        // first CA that serves it
        let mine = fingerprint.as_bytes().to_vec();
        let recorded = self.cas(Bucket::Meta, CA_KEY, deadline(), "check_ca", |cur| {
            Ok(match cur {
                None => Step::Write(mine.clone(), None),
                Some(v) => Step::Done(Some(String::from_utf8_lossy(v).into_owned())),
            })
        })?;
        match recorded {
            Some(r) if r != fingerprint => Err(StoreError::CaMismatch {
                recorded: r,
                local: fingerprint.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(Bucket::Meta, key, deadline(), "meta")?
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
    }

    fn audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        self.publish_audit(e, deadline())
    }

    fn audit_page(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        let until = deadline();
        let mut page = AuditPage {
            entries: Vec::new(),
            older: None,
            newer: None,
        };
        let limit = q.limit.min(MAX_AUDIT_PAGE) as u64;
        let (first, last) = self.audit_bounds(until)?;
        // sequences are contiguous: the stream never removes entries
        let lo = q.after.map_or(0, |a| a.saturating_add(1)).max(first.max(1));
        let hi = q.before.unwrap_or(u64::MAX).min(last.saturating_add(1));
        if lo >= hi || limit == 0 || last == 0 {
            return Ok(page);
        }
        let (a, b) = if q.after.is_some() {
            (lo, (lo + limit - 1).min(hi - 1))
        } else {
            (hi.saturating_sub(limit).max(lo), hi - 1)
        };
        page.entries = self.audit_range(a, b, until)?;
        if a > lo {
            page.older = Some(a);
        }
        if b + 1 < hi {
            page.newer = Some(b);
        }
        Ok(page)
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        let (first, last) = self.audit_bounds(deadline())?;
        Ok(if last == 0 || first > last {
            0
        } else {
            last - first + 1
        })
    }

    fn audit_log(&self) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        let until = deadline();
        let (first, last) = self.audit_bounds(until)?;
        if last == 0 {
            return Ok(Vec::new());
        }
        self.audit_range(first.max(1), last, until)
    }

    fn put_token(
        &self,
        hash: &[u8; 32],
        rec: &TokenRecord,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let until = deadline();
        self.put(
            Bucket::Tokens,
            &hex(hash),
            encode(&TokenSlot::Pending(rec.clone())),
            until,
            "put_token",
        )?;
        self.publish_audit(audit, until)
    }

    fn token_state(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
    ) -> Result<TokenState, StoreError> {
        let Some((_, v)) = self.read(Bucket::Tokens, &hex(hash), deadline(), "token_state")? else {
            return Ok(TokenState::Unknown);
        };
        Ok(match decode::<TokenSlot>("tokens", &v)? {
            TokenSlot::Pending(tok) if tok.expires_ms <= now_ms => TokenState::Expired,
            TokenSlot::Pending(tok) if tok.spoke != spoke => {
                TokenState::Mismatch { bound: tok.spoke }
            }
            TokenSlot::Pending(_) => TokenState::Valid,
            TokenSlot::Used { used, .. } => TokenState::Used(used),
        })
    }

    fn burn_token(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        outcome: TokenOutcome,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let until = deadline();
        let claim = rand::random::<u64>();
        let burned = self.token_op(hash, until, "burn_token", |slot| match slot {
            Some(TokenSlot::Pending(tok)) => {
                Step::Write(tombstone(&tok, now_ms, outcome, claim), TokenUse::Expired)
            }
            _ => Step::Done(TokenUse::Invalid),
        })? != TokenUse::Invalid;
        if burned {
            self.publish_audit(audit, until)?;
        }
        Ok(burned)
    }

    fn note_replay(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let until = deadline();
        let noted = self.token_op(hash, until, "note_replay", |slot| match slot {
            Some(TokenSlot::Used { mut used, claim }) if used.replay_ms.is_none() => {
                used.replay_ms = Some(now_ms);
                Step::Write(encode(&TokenSlot::Used { used, claim }), TokenUse::Enrolled)
            }
            _ => Step::Done(TokenUse::Invalid),
        })? != TokenUse::Invalid;
        if noted {
            self.publish_audit(audit, until)?;
        }
        Ok(noted)
    }

    fn consume_token(
        &self,
        hash: &[u8; 32],
        spoke: &str,
        now_ms: u64,
        record: &SpokeRecord,
        audit_ok: &AuditEntry,
    ) -> Result<TokenUse, StoreError> {
        let until = deadline();
        let claim = rand::random::<u64>();
        // the deciding step: the token's compare-and-set
        let outcome = self.token_op(hash, until, "consume_token", |slot| match slot {
            None | Some(TokenSlot::Used { .. }) => Step::Done(TokenUse::Invalid),
            Some(TokenSlot::Pending(tok)) if tok.expires_ms <= now_ms => Step::Write(
                tombstone(&tok, now_ms, TokenOutcome::Expired, claim),
                TokenUse::Expired,
            ),
            Some(TokenSlot::Pending(tok)) if tok.spoke != spoke => Step::Write(
                tombstone(&tok, now_ms, TokenOutcome::Mismatch, claim),
                TokenUse::Mismatch {
                    bound: tok.spoke.clone(),
                },
            ),
            Some(TokenSlot::Pending(tok)) => Step::Write(
                tombstone(&tok, now_ms, TokenOutcome::Enrolled, claim),
                TokenUse::Enrolled,
            ),
        })?;
        if outcome != TokenUse::Enrolled {
            return Ok(outcome);
        }
        // the winner alone gets here: enroll (idempotent steps)
        let key = hex(spoke.as_bytes());
        self.put(Bucket::Spokes, &key, encode(record), until, "consume_token")?;
        self.put(
            Bucket::NodeCas,
            &key,
            encode(&Vec::<NodeCaRecord>::new()),
            until,
            "consume_token",
        )?;
        self.change_list(now_ms, until, "consume_token", |list| {
            let before = list.nodes.len();
            list.nodes.retain(|n| n.to_string() != spoke);
            list.nodes.len() != before
        })?;
        self.publish_audit(audit_ok, until)?;
        Ok(TokenUse::Enrolled)
    }

    fn spoke(&self, id: &str) -> Result<Option<SpokeRecord>, StoreError> {
        self.spoke_at(id, deadline(), "spoke")
    }

    fn spokes(&self) -> Result<Vec<(String, SpokeRecord)>, StoreError> {
        let until = deadline();
        let mut out = Vec::new();
        for k in self.keys(Bucket::Spokes, until, "spokes")? {
            let Some(id) = unhex(&k).and_then(|b| String::from_utf8(b).ok()) else {
                return Err(StoreError::Corrupt {
                    table: "tidemesh_spokes",
                    reason: format!("key {k:?} is not hex of a SPIFFE ID"),
                });
            };
            if let Some(rec) = self.spoke_at(&id, until, "spokes")? {
                out.push((id, rec));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn update_spoke(
        &self,
        id: &str,
        audit: Option<&AuditEntry>,
        f: &mut dyn FnMut(&mut SpokeRecord),
    ) -> Result<Option<SpokeRecord>, StoreError> {
        let until = deadline();
        let updated = self.cas(
            Bucket::Spokes,
            &hex(id.as_bytes()),
            until,
            "update_spoke",
            |cur| {
                let Some(v) = cur else {
                    return Ok(Step::Done(None));
                };
                let mut rec: SpokeRecord = decode("spokes", v)?;
                f(&mut rec);
                Ok(Step::Write(encode(&rec), Some(rec)))
            },
        )?;
        if let Some(a) = audit {
            self.publish_audit(a, until)?;
        }
        Ok(updated)
    }

    fn revocation_list(&self) -> Result<RevocationList, StoreError> {
        match self.read(Bucket::Revocations, LIST_KEY, deadline(), "revocation_list")? {
            None => Ok(RevocationList::default()),
            Some((_, v)) => decode("revocations", &v),
        }
    }

    fn revoke_spoke(
        &self,
        id: &SpiffeId,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<Option<(SpokeRecord, RevocationList)>, StoreError> {
        let until = deadline();
        let sid = id.to_string();
        // mark the record first: a crash before the list is written is
        // repaired by reconcile_revocations
        let rec = self.cas(
            Bucket::Spokes,
            &hex(sid.as_bytes()),
            until,
            "revoke",
            |cur| {
                let Some(v) = cur else {
                    return Ok(Step::Done(None));
                };
                let mut r: SpokeRecord = decode("spokes", v)?;
                if r.revoked_ms.is_some() {
                    return Ok(Step::Done(Some(r)));
                }
                r.revoked_ms = Some(now_ms);
                Ok(Step::Write(encode(&r), Some(r)))
            },
        )?;
        let Some(rec) = rec else {
            return Ok(None);
        };
        let cas = self.node_cas_at(&sid, until, "revoke")?;
        let list = self.change_list(now_ms, until, "revoke", |list| {
            list.keys.retain(|k| k.until_ms > now_ms);
            list.nodes.insert(id.clone());
            list.keys.insert(RevokedKey {
                fingerprint: tidemesh_identity::svid::sha256(&rec.pinned_key),
                until_ms: rec.cert_not_after_ms.max(now_ms),
            });
            for ca in &cas {
                if ca.not_after_ms > now_ms {
                    list.keys.insert(RevokedKey {
                        fingerprint: ca.key_fingerprint,
                        until_ms: ca.not_after_ms,
                    });
                }
            }
            true
        })?;
        self.publish_audit(audit, until)?;
        Ok(Some((rec, list)))
    }

    fn add_node_ca(
        &self,
        id: &str,
        ca: NodeCaRecord,
        now_ms: u64,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let until = deadline();
        let live = |s: &Self| -> Result<bool, StoreError> {
            Ok(s.spoke_at(id, until, "add_node_ca")?
                .is_some_and(|r| r.revoked_ms.is_none()))
        };
        if !live(self)? {
            return Ok(false);
        }
        self.cas(
            Bucket::NodeCas,
            &hex(id.as_bytes()),
            until,
            "add_node_ca",
            |cur| {
                let mut cas: Vec<NodeCaRecord> = match cur {
                    None => Vec::new(),
                    Some(v) => decode("node_cas", v)?,
                };
                cas.retain(|c| c.not_after_ms > now_ms);
                cas.push(ca);
                Ok(Step::Write(encode(&cas), ()))
            },
        )?;
        // A revocation that raced this write may have read the node CAs
        // before it: put this CA's key on the list ourselves and refuse.
        if !live(self)? {
            self.change_list(now_ms, until, "add_node_ca", |list| {
                list.keys.insert(RevokedKey {
                    fingerprint: ca.key_fingerprint,
                    until_ms: ca.not_after_ms,
                })
            })?;
            return Ok(false);
        }
        self.publish_audit(audit, until)?;
        Ok(true)
    }

    fn node_cas(&self, id: &str, now_ms: u64) -> Result<Vec<NodeCaRecord>, StoreError> {
        let mut cas = self.node_cas_at(id, deadline(), "node_cas")?;
        cas.retain(|c| c.not_after_ms > now_ms);
        Ok(cas)
    }

    fn reconcile_revocations(&self, now_ms: u64) -> Result<RevocationList, StoreError> {
        let revoked: Vec<(SpiffeId, SpokeRecord)> = self
            .spokes()?
            .into_iter()
            .filter(|(_, r)| r.revoked_ms.is_some())
            .filter_map(|(k, r)| SpiffeId::parse(&k).ok().map(|id| (id, r)))
            .collect();
        self.change_list(now_ms, deadline(), "reconcile_revocations", |list| {
            let mut changed = false;
            for (id, rec) in &revoked {
                if list.nodes.insert(id.clone()) {
                    list.keys.insert(RevokedKey {
                        fingerprint: tidemesh_identity::svid::sha256(&rec.pinned_key),
                        until_ms: rec.cert_not_after_ms.max(now_ms),
                    });
                    changed = true;
                }
            }
            changed
        })
    }

    fn config_latest(&self) -> Result<Option<ConfigVersion>, StoreError> {
        let until = deadline();
        let Some(v) = self.config_versions(until)?.into_iter().max() else {
            return Ok(None);
        };
        self.config_at(v, until)
    }

    fn config_get(&self, version: u64) -> Result<Option<ConfigVersion>, StoreError> {
        self.config_at(version, deadline())
    }

    fn config_history(&self) -> Result<Vec<VersionMeta>, StoreError> {
        let until = deadline();
        let mut versions = self.config_versions(until)?;
        versions.sort_unstable();
        let mut out = Vec::new();
        for v in versions {
            if let Some((_, b)) = self.read(Bucket::Config, &v.to_string(), until, "config")? {
                out.push(json_decode("config_versions", &b)?);
            }
        }
        Ok(out)
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
        let until = deadline();
        let mut c = ConfigVersion {
            meta: VersionMeta {
                version: 0,
                at_ms,
                uid,
                summary,
                rollback_of,
            },
            config,
        };
        loop {
            c.meta.version = self.config_versions(until)?.into_iter().max().unwrap_or(0) + 1;
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt {
                table: "config_versions",
                reason: e.to_string(),
            })?;
            // create on the next number: of two appends one gets it, the
            // other takes the number after
            let key = c.meta.version.to_string();
            let landed = self.cas(Bucket::Config, &key, until, "config_append", |cur| {
                Ok(match cur {
                    None => Step::Write(bytes.clone(), true),
                    Some(v) => Step::Done(v == bytes.as_slice()),
                })
            })?;
            if landed {
                break;
            }
            if Instant::now() >= until {
                return Err(err("config_append", "kept losing the next version number"));
            }
        }
        self.publish_audit(
            &AuditEntry {
                at_ms,
                event: event.to_owned(),
                subject: uid.map(|u| format!("uid {u}")),
                detail: format!("version {}: {}", c.meta.version, c.meta.summary),
            },
            until,
        )?;
        Ok(c)
    }
}

impl NatsState {
    fn config_versions(&self, until: Instant) -> Result<Vec<u64>, StoreError> {
        self.keys(Bucket::Config, until, "config")?
            .iter()
            .map(|k| {
                k.parse::<u64>().map_err(|_| StoreError::Corrupt {
                    table: "tidemesh_config",
                    reason: format!("key {k:?} is not a version number"),
                })
            })
            .collect()
    }

    fn config_at(&self, v: u64, until: Instant) -> Result<Option<ConfigVersion>, StoreError> {
        match self.read(Bucket::Config, &v.to_string(), until, "config")? {
            None => Ok(None),
            Some((_, b)) => Ok(Some(json_decode("config_versions", &b)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(claim: u64, replay_ms: Option<u64>) -> Vec<u8> {
        encode(&TokenSlot::Used {
            used: UsedToken {
                spoke: "spiffe://td/store/s/node/n".into(),
                used_ms: 1,
                outcome: TokenOutcome::Enrolled,
                replay_ms,
            },
            claim,
        })
    }

    /// A consume whose answer was lost is still recognised after a replay
    /// was noted on its tombstone; another hub's tombstone is not it.
    #[test]
    fn a_lost_consume_is_recognised_by_its_claim_after_a_replay_note() {
        let written = used(7, None);
        assert!(same_claim(&written, &used(7, None)));
        assert!(
            same_claim(&written, &used(7, Some(5))),
            "replay noted since"
        );
        assert!(!same_claim(&written, &used(8, None)), "another hub won");
        let pending = encode(&TokenSlot::Pending(TokenRecord {
            spoke: "s".into(),
            created_ms: 1,
            expires_ms: 2,
        }));
        assert!(!same_claim(&written, &pending), "never landed");
        assert!(same_claim(&pending, &pending));
        assert!(!same_claim(&written, b"junk"));
    }
}
