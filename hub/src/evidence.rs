//! The hub's durable evidence store: every spoke's evidence chain, as the
//! hub received it, in its own redb file (`evidence.db` in the hub data
//! directory, next to `hub.db`).
//!
//! Who drives it: the hub's sync handler hands it signature-checked batches
//! ([`EvidenceStore::ingest`]) and acks what it returns; the admin commands
//! (`evidence stats|query|verify|aggregates|prune`) read it. What it must
//! not do: check signatures (the caller does, [`VerifiedBatch`] proves it),
//! decide chain rules (those are `tidemesh_evidence`'s [`ChainVerifier`] and
//! [`resume_shed`]), read a clock (`now` is passed in), or paper over a gap:
//! a refused batch stores nothing, and every break is counted and kept.
//! Every call is blocking file I/O: call it from `spawn_blocking`.
//!
//! # Ingest
//! One write transaction per batch, durable on return (redb `Immediate`
//! durability, quick repair on so reopening a large file after a crash is
//! instant). Each spoke has a persisted **position** (next sequence number
//! and link: the high-water mark, no time window). For each record `r`:
//! * `r` ends before the position: a **duplicate**. If a stored row starts
//!   at `r.seq` its bytes must equal `r`'s, else the batch is refused as a
//!   **fork** ([`IngestError::Fork`]); where a shed record is involved on
//!   either side (the hub holds real records a spoke later shed, or the
//!   reverse), the links at the common end must agree. Duplicates of pruned
//!   rows or of records inside a declared gap are just counted.
//! * `r` is a shed record straddling the position: cut at the position with
//!   [`resume_shed`] (the batch row keeps the record as signed).
//! * `r` starts at the position: checked by a [`ChainVerifier`] started at
//!   the position ([`IngestError::Chain`] names the seq), stored, aggregated.
//! * `r` starts past the position: [`IngestError::Ahead`]; the sender must
//!   resend from `expected`. Nothing is stored or flagged.
//!
//! A refused batch commits nothing; `Chain` and `Fork` refusals are then
//! recorded in a separate transaction (rejected batch, chain break, last
//! error), so `stats` shows them and `chain_ok` turns false for good.
//! [`IngestOutcome::position`] is the hub's position after the commit: the
//! highest contiguous sequence number it may ack.
//!
//! # Tables
//! | table        | key                                   | value |
//! |--------------|---------------------------------------|-------|
//! | `meta`       | `&str`                                | UTF-8: `schema` = [`EVIDENCE_SCHEMA`], `kind` = `hub-evidence` |
//! | `spokes`     | `&str` spoke SPIFFE ID                | postcard `SpokeState` (below) |
//! | `records`    | `(&str spoke, u64 seq)`               | the record's postcard encoding, exactly as verified (record format v1, `tidemesh_evidence`); a shed record is keyed by the first seq it covers |
//! | `batches`    | `(&str spoke, u64 first stored seq)`  | postcard `BatchRow` (below) |
//! | `gaps`       | `(&str spoke, u64 first missing seq)` | postcard `GapRow` (below) |
//! | `aggregates` | `&str` `spoke 0x1F service 0x1F mode` | postcard `AggRow` (below) |
//!
//! postcard is not self-describing: field order is the format; append
//! fields only with a schema bump.
//! * `SpokeState`: `position: ChainPosition` (next seq, 32-byte link),
//!   `checkpoint: ChainPosition` (where verification starts: genesis, or
//!   after the last record retention pruned), `records`, `bytes` (sum of
//!   stored record encodings), `batches` (batches accepted), `duplicates`,
//!   `shed_records`, `dropped` (sum of stored shed records' `count`),
//!   `rejected_batches`, `chain_breaks` (Chain/Fork refusals and breaks
//!   retention pruned past), `gaps` (declared), `missing` (seqs inside
//!   declared gaps): all varint u64; `last_error: Option<String>`,
//!   `last_error_ms: Option<u64>`, `last_ingest_ms: Option<u64>`.
//! * `BatchRow` (one per accepted batch that stored records, proof of
//!   origin): `batch_first_seq: u64` (the batch as signed may start earlier
//!   than the key when it overlapped), `last_seq: u64` (last seq stored from
//!   it), `signature: Vec<u8>` (DER ECDSA P-256), `signer_cert_sha256:
//!   [u8; 32]`, `received_ms: u64`, `cut_shed: Option<Vec<u8>>` (the shed
//!   record as signed, when the hub cut it at its position). The other
//!   records as signed are the stored rows (duplicates are byte-equal).
//! * `GapRow`: `last_missing: u64`, `from_hash: ChainHash` (the hub's link
//!   before the gap), `resume: ChainPosition`, `reason: String`,
//!   `at_ms: u64`.
//! * `AggRow`: `requests`, `errors`, `latency_counts: [u64; 13]`,
//!   `latency_sum_us`, `authz_denials`, `breaker_open`, `rate_limited`,
//!   `drill`, `shed_records`, `dropped`.
//!
//! # Aggregates
//! Per `(spoke, service, mode)`, updated in the ingest transaction (a batch
//! is summed in memory, then each touched row is read and written once).
//! Over request records: `requests`; `errors` (HTTP status >= 500 or span
//! status `ERROR`); a latency histogram of `telemetry.duration_us` with
//! **per-bucket** (not cumulative) counts and upper bounds
//! [`LATENCY_BOUNDS_US`] plus `+Inf`, and their sum; `authz_denials`
//! (final decision `DENY`); `breaker_open` (breaker state `open`);
//! `rate_limited` (rate decision `limited`); `drill` (how many of the
//! requests carry a drill marker; they are counted in the others too).
//! Shed records have no service: each spoke's go to the row with service
//! `""` and mode `""` (`shed_records`, `dropped`), and to its stats.
//! Aggregates are cumulative: retention does not lower them.
//!
//! # Verification
//! [`EvidenceStore::verify`] reads a spoke's stored bytes as is from its
//! checkpoint, through [`ChainVerifier::push_encoded`]. Every break is
//! reported with the sequence number where it is (the first one exactly
//! as the verifier names it), then verification continues: after a damaged
//! record from that record's own stored link; after missing rows
//! (`missing`, named by the first missing seq) or an undecodable record,
//! the next record restarts the chain unchecked (the link before it is
//! unknown); at a declared gap (reported as a break) from the gap's resume
//! position. At the end the chain must arrive at the hub's position
//! (`tip_mismatch` otherwise).
//!
//! # Retention
//! [`EvidenceStore::prune`] deletes each spoke's oldest records while they
//! are older than `max_age` (record timestamp) or the spoke holds more than
//! `max_bytes_per_spoke`, in transactions of at most [`PRUNE_CHUNK`] rows.
//! It verifies what it deletes and moves the checkpoint to after the last
//! deleted record, so the rest keeps verifying; pruning past a break is
//! flagged like a refused batch. Batch rows wholly before the checkpoint and
//! declared gaps it passed go too. Stored rows always end before the hub's
//! position, so pruning never moves it and dedupe keeps working.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{
    Builder, Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tidemesh_evidence::record::{
    BreakerState, Decision, Mode, RateDecision, RequestEvidence, StatusCode,
};
use tidemesh_evidence::{
    resume_shed, ChainErrorKind, ChainHash, ChainPosition, ChainVerifier, EvidenceSeq, RecordBody,
    RecordHeader, RecordKind, SealedRecord, UnixMillis, VerifiedBatch,
};
use tidemesh_identity::SpiffeId;

pub mod nats;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SPOKES: TableDefinition<&str, &[u8]> = TableDefinition::new("spokes");
const RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("records");
const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("batches");
const GAPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("gaps");
const AGGREGATES: TableDefinition<&str, &[u8]> = TableDefinition::new("aggregates");

/// Every table of the file; `open` refuses a file holding any other.
const TABLES: [&str; 6] = ["meta", "spokes", "records", "batches", "gaps", "aggregates"];

/// Schema of `evidence.db`.
pub const EVIDENCE_SCHEMA: &str = "1";
/// The `kind` meta value that tells this file from a spoke's buffer.
const KIND: &str = "hub-evidence";
/// Most records deleted per retention transaction.
pub const PRUNE_CHUNK: usize = 10_000;
/// Most breaks a [`VerifyReport`] lists (all are counted).
pub const MAX_REPORTED_BREAKS: usize = 1000;
/// Upper bounds (inclusive, microseconds) of the latency buckets; a last
/// bucket, `+Inf`, takes the rest.
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];
/// Buckets of the latency histogram (the bounds and `+Inf`).
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;
/// redb page cache of `evidence.db`.
const CACHE_BYTES: usize = 64 << 20;
/// Separates the parts of an aggregate key.
const SEP: char = '\u{1f}';

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceStoreError {
    /// redb failed (I/O, a lock held by another process, a damaged file).
    #[error("evidence database: {0}")]
    Db(#[from] redb::Error),
    /// A stored value did not decode: the file is damaged or from another
    /// version.
    #[error("corrupt evidence database, table {table}: {reason}; run `evidence verify`")]
    Corrupt {
        /// Which table.
        table: &'static str,
        /// Why.
        reason: String,
    },
    /// The file was written by another schema version.
    #[error("evidence database schema {found:?}, this build reads {EVIDENCE_SCHEMA}")]
    Schema {
        /// The schema found.
        found: String,
    },
    /// The file holds tables this store never writes.
    #[error("not a hub evidence database: it holds table {table:?} (a spoke's evidence.db?)")]
    Foreign {
        /// The first unknown table.
        table: String,
    },
    /// [`EvidenceStore::declare_gap`] with a resume position not past the
    /// hub's: nothing would be missing.
    #[error("cannot declare a gap for {spoke}: resume seq {resume} is not past the hub's next seq {next}")]
    GapNotAhead {
        /// The spoke.
        spoke: String,
        /// The resume position's next seq.
        resume: EvidenceSeq,
        /// The hub's next seq.
        next: EvidenceSeq,
    },
    /// The database is closed after a write failed and has not been
    /// reopened yet ([`EvidenceStore::reopen`]).
    #[error(
        "the evidence database is closed after a write error and not reopened yet; retry later"
    )]
    Closed,
    /// Not available on this backend yet.
    #[error("{0} is not available on the JetStream evidence store yet")]
    Unsupported(&'static str),
    /// The NATS JetStream evidence store failed (no answer, no leader).
    #[error("evidence on JetStream, {op}: {reason}")]
    Nats {
        /// What it was doing.
        op: &'static str,
        /// Why.
        reason: String,
    },
}

/// What kind of storage failure an error is, if it is one a retry (after
/// [`EvidenceStore::reopen`]) may cure: the disk ran full, or a write or
/// sync failed. A damaged file or a broken invariant is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// No space left on the device (or quota exceeded).
    Full,
    /// Another I/O error (or redb refusing work after one).
    WriteFailed,
}

impl StorageFault {
    /// Classifies `e`; `None` for errors a retry cannot cure.
    pub fn of(e: &EvidenceStoreError) -> Option<StorageFault> {
        match e {
            EvidenceStoreError::Db(redb::Error::Io(io)) => Some(
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) {
                    StorageFault::Full
                } else {
                    StorageFault::WriteFailed
                },
            ),
            EvidenceStoreError::Db(redb::Error::PreviousIo | redb::Error::DatabaseClosed)
            | EvidenceStoreError::Closed
            | EvidenceStoreError::Nats { .. } => Some(StorageFault::WriteFailed),
            _ => None,
        }
    }

    /// The label used in metrics, stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageFault::Full => "disk_full",
            StorageFault::WriteFailed => "write_failed",
        }
    }
}

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The batch starts past the hub's position. Nothing was stored or
    /// flagged; the sender must resend from `expected`.
    #[error("batch starts at seq {found} but the hub holds the chain up to {expected} (exclusive): resend from {expected}")]
    Ahead {
        /// The hub's next sequence number.
        expected: EvidenceSeq,
        /// Where the batch went on.
        found: EvidenceSeq,
    },
    /// A record does not continue the hub's chain (bad link, hash or shed
    /// record). Batch refused and flagged.
    #[error("evidence chain broken at seq {seq}: {detail}; batch refused")]
    Chain {
        /// Where the chain breaks.
        seq: EvidenceSeq,
        /// How.
        detail: String,
    },
    /// A record at an already-stored seq differs from the stored one.
    /// Batch refused and flagged.
    #[error("record {seq} differs from the record the hub already holds (fork); batch refused")]
    Fork {
        /// The seq whose contents differ.
        seq: EvidenceSeq,
    },
    /// Storage failed; nothing was stored.
    #[error(transparent)]
    Store(#[from] EvidenceStoreError),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for EvidenceStoreError {
            fn from(e: $t) -> Self { EvidenceStoreError::Db(e.into()) }
        }
        impl From<$t> for IngestError {
            fn from(e: $t) -> Self { IngestError::Store(EvidenceStoreError::Db(e.into())) }
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

/// What [`EvidenceStore::ingest`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IngestOutcome {
    /// The hub's position after the commit: ack `position.last_seq()`.
    pub position: ChainPosition,
    /// Records stored (a cut shed record counts once).
    pub stored: u32,
    /// Records received again and skipped.
    pub duplicates: u32,
    /// The first sequence number this commit stored (`None`: it stored
    /// nothing); the batch's records from there on are new.
    pub first_stored: Option<u64>,
}

/// Which records [`EvidenceStore::query`] returns, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Only records with `timestamp >= since`.
    pub since: Option<UnixMillis>,
    /// Only records of this kind.
    pub kind: Option<RecordKind>,
    /// Only records keyed at or after this seq.
    pub from_seq: Option<u64>,
    /// At most this many records (0 returns none).
    pub limit: usize,
}

/// Retention policy: what [`EvidenceStore::prune`] deletes, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Delete records whose timestamp is older than this.
    pub max_age: Option<Duration>,
    /// Delete oldest records while a spoke holds more than this many bytes
    /// of record encodings.
    pub max_bytes_per_spoke: Option<u64>,
}

/// One spoke's evidence at the hub (`evidence stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpokeEvidenceStats {
    /// The spoke's SPIFFE ID.
    pub spoke: String,
    /// Record rows held.
    pub records: u64,
    /// Bytes of record encodings held.
    pub bytes: u64,
    /// Batches accepted (ever).
    pub batches: u64,
    /// Last seq the hub's chain covers (0: none yet): what it acks.
    pub high_water_mark: u64,
    /// Last seq before the checkpoint verification starts from (0: genesis).
    pub checkpoint_seq: u64,
    /// First seq held (0: none held).
    pub first_seq_held: u64,
    /// Declared gaps plus flagged chain breaks.
    pub gaps: u64,
    /// Declared gaps.
    pub declared_gaps: u64,
    /// Sequence numbers inside declared gaps.
    pub missing: u64,
    /// Flagged chain breaks: refused Chain/Fork batches, breaks pruned past.
    pub chain_breaks: u64,
    /// No gap and no chain break was ever flagged.
    pub chain_ok: bool,
    /// Records received again and skipped.
    pub duplicates: u64,
    /// Shed records stored.
    pub shed_records: u64,
    /// Records the spoke shed (sum of the shed records' counts).
    pub dropped: u64,
    /// Batches refused and flagged.
    pub rejected_batches: u64,
    /// The last flagged problem.
    pub last_error: Option<String>,
    /// When (RFC 3339).
    pub last_error_at: Option<String>,
    /// When the last batch was accepted (RFC 3339).
    pub last_ingest: Option<String>,
}

/// A declared gap ([`EvidenceStore::declare_gap`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapInfo {
    /// The spoke.
    pub spoke: String,
    /// First missing seq (the hub's next seq when declared).
    pub first_missing: u64,
    /// Last missing seq.
    pub last_missing: u64,
    /// How many.
    pub missing: u64,
    /// Where the chain continues.
    pub resume_seq: u64,
    /// Why, as the caller said.
    pub reason: String,
    /// When (RFC 3339).
    pub declared_at: String,
}

/// One break found by [`EvidenceStore::verify`] or pruned past.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakInfo {
    /// The sequence number where the chain breaks.
    pub seq: u64,
    /// `hash_mismatch`, `missing`, `out_of_order`, `bad_shed`, `malformed`,
    /// `key_mismatch`, `declared_gap` or `tip_mismatch`.
    pub kind: String,
    /// For people.
    pub detail: String,
}

/// The result of [`EvidenceStore::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The spoke.
    pub spoke: String,
    /// Stored rows read.
    pub records_checked: u64,
    /// The first seq checked (the checkpoint's next seq).
    pub from_seq: u64,
    /// The last seq covered.
    pub to_seq: u64,
    /// No break at all.
    pub ok: bool,
    /// The breaks, in chain order (at most [`MAX_REPORTED_BREAKS`]).
    pub breaks: Vec<BreakInfo>,
    /// All breaks found.
    pub breaks_total: u64,
}

/// One latency bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LatencyBucket {
    /// Upper bound, inclusive, µs; `null` for `+Inf`.
    pub le_us: Option<u64>,
    /// Requests in this bucket (not cumulative).
    pub count: u64,
}

/// Aggregated evidence of one `(spoke, service, mode)` (`evidence
/// aggregates`). The row with service `""` and mode `""` holds the spoke's
/// shed records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aggregate {
    /// The spoke.
    pub spoke: String,
    /// The service (`""`: shed records).
    pub service: String,
    /// `target`, `degraded`, `survival` or `recovery` (`""`: shed records).
    pub mode: String,
    /// Requests.
    pub requests: u64,
    /// Requests with HTTP status >= 500 or span status `ERROR`.
    pub errors: u64,
    /// `errors / requests` (0 without requests).
    pub error_rate: f64,
    /// Per-bucket latency counts, bounds [`LATENCY_BOUNDS_US`] then `+Inf`.
    pub latency_buckets: Vec<LatencyBucket>,
    /// Sum of the latencies, µs.
    pub latency_sum_us: u64,
    /// Upper bound of the bucket holding the median (`null`: none, `+Inf`).
    pub p50_le_us: Option<u64>,
    /// Upper bound of the bucket holding the 99th percentile.
    pub p99_le_us: Option<u64>,
    /// Authorization denials.
    pub authz_denials: u64,
    /// Requests that found the circuit breaker open.
    pub breaker_open: u64,
    /// Requests the rate limiter refused.
    pub rate_limited: u64,
    /// Requests made by drills (also counted above).
    pub drill: u64,
    /// Shed records.
    pub shed_records: u64,
    /// Records they stand for.
    pub dropped: u64,
}

/// What one spoke lost to [`EvidenceStore::prune`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpokePruned {
    /// The spoke.
    pub spoke: String,
    /// Records deleted.
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Batch rows deleted.
    pub batches: u64,
    /// The new checkpoint (last seq before it).
    pub checkpoint_seq: u64,
    /// Breaks found in what was deleted (flagged on the spoke).
    pub breaks: Vec<BreakInfo>,
}

/// The result of [`EvidenceStore::prune`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PruneReport {
    /// Records deleted.
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Batch rows deleted.
    pub batches: u64,
    /// Per spoke that lost something.
    pub spokes: Vec<SpokePruned>,
}

/// Per-spoke state row (see the module docs for the format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SpokeState {
    position: ChainPosition,
    checkpoint: ChainPosition,
    records: u64,
    bytes: u64,
    batches: u64,
    duplicates: u64,
    shed_records: u64,
    dropped: u64,
    rejected_batches: u64,
    chain_breaks: u64,
    gaps: u64,
    missing: u64,
    last_error: Option<String>,
    last_error_ms: Option<u64>,
    last_ingest_ms: Option<u64>,
}

impl SpokeState {
    fn genesis(spoke: &SpiffeId) -> SpokeState {
        let g = ChainPosition::genesis(spoke);
        SpokeState {
            position: g,
            checkpoint: g,
            records: 0,
            bytes: 0,
            batches: 0,
            duplicates: 0,
            shed_records: 0,
            dropped: 0,
            rejected_batches: 0,
            chain_breaks: 0,
            gaps: 0,
            missing: 0,
            last_error: None,
            last_error_ms: None,
            last_ingest_ms: None,
        }
    }

    fn flag(&mut self, reason: String, now: UnixMillis) {
        self.last_error = Some(reason);
        self.last_error_ms = Some(now.as_millis());
    }

    fn stats(&self, spoke: &str, first_seq_held: u64) -> SpokeEvidenceStats {
        SpokeEvidenceStats {
            spoke: spoke.to_owned(),
            records: self.records,
            bytes: self.bytes,
            batches: self.batches,
            high_water_mark: self.position.last_seq(),
            checkpoint_seq: self.checkpoint.last_seq(),
            first_seq_held,
            gaps: self.gaps + self.chain_breaks,
            declared_gaps: self.gaps,
            missing: self.missing,
            chain_breaks: self.chain_breaks,
            chain_ok: self.gaps == 0 && self.chain_breaks == 0,
            duplicates: self.duplicates,
            shed_records: self.shed_records,
            dropped: self.dropped,
            rejected_batches: self.rejected_batches,
            last_error: self.last_error.clone(),
            last_error_at: self.last_error_ms.map(|t| UnixMillis(t).to_rfc3339()),
            last_ingest: self.last_ingest_ms.map(|t| UnixMillis(t).to_rfc3339()),
        }
    }
}

/// The evidence store's narrow interface: what ingest and verification
/// need, whatever holds the records. Two backends: [`EvidenceStore`]
/// (`evidence.db`, redb, the default) and [`nats::NatsEvidence`] (a
/// JetStream stream shared by hub replicas, `--store nats://...`). Both
/// apply the same ingest rules (see "Ingest"); both are blocking.
pub trait EvidenceBackend: Send + Sync + std::fmt::Debug {
    /// `redb` or `jetstream`.
    fn backend(&self) -> &'static str;
    /// The high-water mark: where the stored chain of `spoke` ends.
    fn position(&self, spoke: &SpiffeId) -> Result<ChainPosition, EvidenceStoreError>;
    /// Accepts a signature-checked batch: stores the records past the
    /// high-water mark exactly once and returns the new position.
    fn ingest(
        &self,
        batch: &VerifiedBatch,
        signer_cert_sha256: [u8; 32],
        now: UnixMillis,
    ) -> Result<IngestOutcome, IngestError>;
    /// Flags a refusal the caller decided (see [`EvidenceStore::record_rejection`]).
    fn record_rejection(
        &self,
        spoke: &SpiffeId,
        reason: &str,
        now: UnixMillis,
    ) -> Result<(), EvidenceStoreError>;
    /// Stored records of `spoke` in sequence order, filtered by `q`.
    fn query(&self, spoke: &SpiffeId, q: &Query) -> Result<Vec<SealedRecord>, EvidenceStoreError>;
    /// Verifies the stored chain (see "Verification").
    fn verify(&self, spoke: &SpiffeId) -> Result<VerifyReport, EvidenceStoreError>;
    /// `spoke`'s counters.
    fn stats(&self, spoke: &SpiffeId) -> Result<SpokeEvidenceStats, EvidenceStoreError>;
    /// Every spoke with evidence, by ID.
    fn spokes(&self) -> Result<Vec<SpokeEvidenceStats>, EvidenceStoreError>;
    /// Records a gap the spoke declared (see [`EvidenceStore::declare_gap`]).
    fn declare_gap(
        &self,
        spoke: &SpiffeId,
        resume: &ChainPosition,
        reason: &str,
        now: UnixMillis,
    ) -> Result<GapInfo, EvidenceStoreError>;
    /// The aggregates (see "Aggregates").
    fn aggregates(&self, spoke: Option<&SpiffeId>) -> Result<Vec<Aggregate>, EvidenceStoreError>;
    /// Applies a retention policy (see "Retention").
    fn prune(&self, policy: &Retention, now: UnixMillis)
        -> Result<PruneReport, EvidenceStoreError>;
    /// Whether `e` is a storage failure a retry may cure.
    fn fault(&self, e: &EvidenceStoreError) -> Option<StorageFault> {
        StorageFault::of(e)
    }
    /// Reopens the store after a storage failure (a no-op where nothing
    /// needs reopening).
    fn reopen(&self) -> Result<(), EvidenceStoreError> {
        Ok(())
    }
}

impl EvidenceBackend for EvidenceStore {
    fn backend(&self) -> &'static str {
        "redb"
    }
    fn position(&self, spoke: &SpiffeId) -> Result<ChainPosition, EvidenceStoreError> {
        EvidenceStore::position(self, spoke)
    }
    fn ingest(
        &self,
        batch: &VerifiedBatch,
        signer_cert_sha256: [u8; 32],
        now: UnixMillis,
    ) -> Result<IngestOutcome, IngestError> {
        EvidenceStore::ingest(self, batch, signer_cert_sha256, now)
    }
    fn record_rejection(
        &self,
        spoke: &SpiffeId,
        reason: &str,
        now: UnixMillis,
    ) -> Result<(), EvidenceStoreError> {
        EvidenceStore::record_rejection(self, spoke, reason, now)
    }
    fn query(&self, spoke: &SpiffeId, q: &Query) -> Result<Vec<SealedRecord>, EvidenceStoreError> {
        EvidenceStore::query(self, spoke, q)
    }
    fn verify(&self, spoke: &SpiffeId) -> Result<VerifyReport, EvidenceStoreError> {
        EvidenceStore::verify(self, spoke)
    }
    fn stats(&self, spoke: &SpiffeId) -> Result<SpokeEvidenceStats, EvidenceStoreError> {
        EvidenceStore::stats(self, spoke)
    }
    fn spokes(&self) -> Result<Vec<SpokeEvidenceStats>, EvidenceStoreError> {
        EvidenceStore::spokes(self)
    }
    fn declare_gap(
        &self,
        spoke: &SpiffeId,
        resume: &ChainPosition,
        reason: &str,
        now: UnixMillis,
    ) -> Result<GapInfo, EvidenceStoreError> {
        EvidenceStore::declare_gap(self, spoke, resume, reason, now)
    }
    fn aggregates(&self, spoke: Option<&SpiffeId>) -> Result<Vec<Aggregate>, EvidenceStoreError> {
        EvidenceStore::aggregates(self, spoke)
    }
    fn prune(
        &self,
        policy: &Retention,
        now: UnixMillis,
    ) -> Result<PruneReport, EvidenceStoreError> {
        EvidenceStore::prune(self, policy, now)
    }
    fn fault(&self, e: &EvidenceStoreError) -> Option<StorageFault> {
        EvidenceStore::fault(self, e)
    }
    fn reopen(&self) -> Result<(), EvidenceStoreError> {
        EvidenceStore::reopen(self)
    }
}

/// Proof of origin of an accepted batch (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BatchRow {
    batch_first_seq: u64,
    last_seq: u64,
    signature: Vec<u8>,
    signer_cert_sha256: [u8; 32],
    received_ms: u64,
    cut_shed: Option<Vec<u8>>,
}

/// A declared gap (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GapRow {
    last_missing: u64,
    from_hash: ChainHash,
    resume: ChainPosition,
    reason: String,
    at_ms: u64,
}

/// Aggregate counters (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct AggRow {
    requests: u64,
    errors: u64,
    latency_counts: [u64; LATENCY_BUCKETS],
    latency_sum_us: u64,
    authz_denials: u64,
    breaker_open: u64,
    rate_limited: u64,
    drill: u64,
    shed_records: u64,
    dropped: u64,
}

impl AggRow {
    fn add_request(&mut self, r: &RequestEvidence) {
        let t = &r.telemetry;
        self.requests += 1;
        if t.status_code.is_some_and(|c| c >= 500) || t.status.code == StatusCode::Error {
            self.errors += 1;
        }
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&le| t.duration_us <= le)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        if let Some(c) = self.latency_counts.get_mut(bucket) {
            *c += 1;
        }
        self.latency_sum_us = self.latency_sum_us.saturating_add(t.duration_us);
        if r.policy_evaluation
            .as_ref()
            .is_some_and(|p| p.final_decision == Decision::Deny)
        {
            self.authz_denials += 1;
        }
        if r.reliability
            .as_ref()
            .is_some_and(|x| x.circuit_breaker.state == BreakerState::Open)
        {
            self.breaker_open += 1;
        }
        if r.rate_limit_check
            .as_ref()
            .is_some_and(|x| x.decision == RateDecision::Limited)
        {
            self.rate_limited += 1;
        }
        if r.drill.is_some() {
            self.drill += 1;
        }
    }

    fn merge(&mut self, o: &AggRow) {
        self.requests += o.requests;
        self.errors += o.errors;
        for (a, b) in self.latency_counts.iter_mut().zip(o.latency_counts) {
            *a += b;
        }
        self.latency_sum_us = self.latency_sum_us.saturating_add(o.latency_sum_us);
        self.authz_denials += o.authz_denials;
        self.breaker_open += o.breaker_open;
        self.rate_limited += o.rate_limited;
        self.drill += o.drill;
        self.shed_records += o.shed_records;
        self.dropped += o.dropped;
    }

    /// The upper bound of the bucket holding quantile `q` (per mille).
    fn quantile_le(&self, q_permille: u64) -> Option<u64> {
        let n: u64 = self.latency_counts.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = (n * q_permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (i, c) in self.latency_counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return LATENCY_BOUNDS_US.get(i).copied();
            }
        }
        None
    }

    fn render(&self, spoke: &str, service: &str, mode: &str) -> Aggregate {
        let error_rate = if self.requests == 0 {
            0.0
        } else {
            // Counts far below 2^53: the conversion is exact.
            self.errors as f64 / self.requests as f64
        };
        Aggregate {
            spoke: spoke.to_owned(),
            service: service.to_owned(),
            mode: mode.to_owned(),
            requests: self.requests,
            errors: self.errors,
            error_rate,
            latency_buckets: self
                .latency_counts
                .iter()
                .enumerate()
                .map(|(i, &count)| LatencyBucket {
                    le_us: LATENCY_BOUNDS_US.get(i).copied(),
                    count,
                })
                .collect(),
            latency_sum_us: self.latency_sum_us,
            p50_le_us: self.quantile_le(500),
            p99_le_us: self.quantile_le(990),
            authz_denials: self.authz_denials,
            breaker_open: self.breaker_open,
            rate_limited: self.rate_limited,
            drill: self.drill,
            shed_records: self.shed_records,
            dropped: self.dropped,
        }
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Target => "target",
        Mode::Degraded => "degraded",
        Mode::Survival => "survival",
        Mode::Recovery => "recovery",
    }
}

fn agg_key(spoke: &str, service: &str, mode: &str) -> String {
    format!("{spoke}{SEP}{service}{SEP}{mode}")
}

/// Splits an aggregate key: the spoke ends at the first separator (SPIFFE
/// IDs cannot hold one), the mode starts after the last (a fixed name), the
/// service is what is between.
fn split_agg_key(key: &str) -> Option<(&str, &str, &str)> {
    let (spoke, rest) = key.split_once(SEP)?;
    let (service, mode) = rest.rsplit_once(SEP)?;
    Some((spoke, service, mode))
}

fn corrupt(table: &'static str, reason: impl std::fmt::Display) -> EvidenceStoreError {
    EvidenceStoreError::Corrupt {
        table,
        reason: reason.to_string(),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, EvidenceStoreError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(table, e))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of integers, strings, byte vectors and fixed arrays:
    // postcard serialization into a Vec cannot fail.
    postcard::to_allocvec(v).expect("postcard serialization of evidence rows is infallible")
}

fn load_state(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    spoke: &str,
) -> Result<Option<SpokeState>, EvidenceStoreError> {
    match t.get(spoke)? {
        None => Ok(None),
        Some(v) => Ok(Some(decode("spokes", v.value())?)),
    }
}

fn load_gaps(
    t: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    spoke: &str,
) -> Result<BTreeMap<u64, GapRow>, EvidenceStoreError> {
    let mut out = BTreeMap::new();
    for row in t.range((spoke, 0)..=(spoke, u64::MAX))? {
        let (k, v) = row?;
        out.insert(k.value().1, decode("gaps", v.value())?);
    }
    Ok(out)
}

fn first_held(
    t: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    spoke: &str,
) -> Result<u64, EvidenceStoreError> {
    Ok(t.range((spoke, 0)..=(spoke, u64::MAX))?
        .next()
        .transpose()?
        .map_or(0, |(k, _)| k.value().1))
}

/// The last seq a stored record covers and its link, reading only the
/// header unless it is a shed record.
fn last_and_link(bytes: &[u8], key: u64) -> Result<(EvidenceSeq, ChainHash, bool), IngestError> {
    let bad = |e: tidemesh_evidence::RecordError| corrupt("records", format!("record {key}: {e}"));
    let h = RecordHeader::peek(bytes).map_err(bad)?;
    if h.kind == RecordKind::Shed {
        let rec = SealedRecord::decode(bytes).map_err(bad)?;
        Ok((rec.last_seq(), rec.link(), true))
    } else {
        Ok((h.seq, h.hash, false))
    }
}

/// Checks a record that ends before the hub's position against what is
/// stored (see the module docs); `Ok` means a consistent duplicate.
fn check_duplicate(
    records: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    spoke: &str,
    r: &SealedRecord,
) -> Result<(), IngestError> {
    let last = r.last_seq();
    let covering = records
        .range((spoke, 0)..=(spoke, last.get()))?
        .next_back()
        .transpose()?;
    check_duplicate_against(covering.as_ref().map(|(k, v)| (k.value().1, v.value())), r)
}

/// The duplicate rule of "Ingest", given the stored row with the greatest
/// key not past `r`'s last seq (`None`: pruned, or never held).
fn check_duplicate_against(
    covering: Option<(u64, &[u8])>,
    r: &SealedRecord,
) -> Result<(), IngestError> {
    let last = r.last_seq();
    let Some((key, stored)) = covering else {
        // Pruned, or never held (inside a declared gap).
        return Ok(());
    };
    if key == r.seq.get() && stored == r.encode().as_slice() {
        return Ok(());
    }
    let (s_last, s_link, s_shed) = last_and_link(stored, key)?;
    if key == r.seq.get() && !s_shed && r.as_shed().is_none() {
        return Err(IngestError::Fork { seq: r.seq });
    }
    if s_last == last && s_link != r.link() {
        return Err(IngestError::Fork { seq: last });
    }
    Ok(())
}

fn kind_name(k: &ChainErrorKind) -> &'static str {
    match k {
        ChainErrorKind::Gap { .. } => "missing",
        ChainErrorKind::OutOfOrder { .. } => "out_of_order",
        ChainErrorKind::HashMismatch => "hash_mismatch",
        ChainErrorKind::BadShed(_) => "bad_shed",
        ChainErrorKind::Malformed(_) => "malformed",
        ChainErrorKind::KeyMismatch { .. } => "key_mismatch",
    }
}

/// The last 32 bytes of a stored record (its hash field), for a position
/// after a record that does not decode.
fn tail_hash(bytes: &[u8]) -> ChainHash {
    let mut h = [0u8; 32];
    if let Some(tail) = bytes.len().checked_sub(32).and_then(|i| bytes.get(i..)) {
        h.copy_from_slice(tail);
    }
    ChainHash(h)
}

/// Walks stored rows of one spoke in key order from a checkpoint, crossing
/// declared gaps and continuing after breaks (see "Verification").
struct Walk {
    verifier: ChainVerifier,
    /// The link of the current position is unknown (after an undecodable
    /// record): the next record restarts the chain unchecked.
    resync: bool,
    gaps: BTreeMap<u64, GapRow>,
    passed_gaps: Vec<u64>,
    breaks: Vec<BreakInfo>,
    /// Breaks other than declared gaps.
    broken: u64,
    breaks_total: u64,
    checked: u64,
}

impl Walk {
    fn new(from: ChainPosition, gaps: BTreeMap<u64, GapRow>) -> Walk {
        Walk {
            verifier: ChainVerifier::new(from),
            resync: false,
            gaps,
            passed_gaps: Vec::new(),
            breaks: Vec::new(),
            broken: 0,
            breaks_total: 0,
            checked: 0,
        }
    }

    fn position(&self) -> ChainPosition {
        *self.verifier.position()
    }

    fn report(&mut self, seq: u64, kind: &str, detail: String) {
        self.breaks_total += 1;
        if kind != "declared_gap" {
            self.broken += 1;
        }
        if self.breaks.len() < MAX_REPORTED_BREAKS {
            self.breaks.push(BreakInfo {
                seq,
                kind: kind.to_owned(),
                detail,
            });
        }
    }

    /// Crosses declared gaps starting at the current position whose resume
    /// position is at or before `upto`.
    fn cross_gaps(&mut self, upto: u64) {
        loop {
            let next = self.verifier.position().next_seq.get();
            let Some(g) = self.gaps.get(&next) else {
                return;
            };
            if g.resume.next_seq.get() > upto {
                return;
            }
            let resume = g.resume;
            let detail = format!(
                "records {next}..={} missing (gap declared {}): {}",
                g.last_missing,
                UnixMillis(g.at_ms).to_rfc3339(),
                g.reason
            );
            self.report(next, "declared_gap", detail);
            self.passed_gaps.push(next);
            self.verifier = ChainVerifier::new(resume);
            self.resync = false;
        }
    }

    fn step(&mut self, key: u64, bytes: &[u8]) {
        self.checked += 1;
        self.cross_gaps(key);
        let Some(seq) = EvidenceSeq::new(key) else {
            self.report(0, "key_mismatch", "a record is stored under seq 0".into());
            return;
        };
        let next = self.verifier.position().next_seq;
        if !self.resync && seq > next {
            // Rows are missing: the link before this one is unknown.
            self.report(
                next.get(),
                "missing",
                format!("records {next}..={} are not stored", key - 1),
            );
            self.resync = true;
        }
        if self.resync {
            match SealedRecord::decode(bytes) {
                Ok(rec) if rec.seq == seq => {
                    self.verifier = ChainVerifier::new(ChainPosition::after(&rec));
                    self.resync = false;
                }
                Ok(rec) => self.unreadable(
                    seq,
                    bytes,
                    "key_mismatch",
                    format!("record stored under this key says it is {}", rec.seq),
                ),
                Err(e) => {
                    self.unreadable(seq, bytes, "malformed", format!("undecodable record: {e}"))
                }
            }
            return;
        }
        if let Err(e) = self.verifier.push_encoded(seq, bytes) {
            let kind = kind_name(&e.kind);
            match SealedRecord::decode(bytes) {
                Ok(rec) if rec.seq == seq => {
                    self.report(e.seq.get(), kind, e.kind.to_string());
                    self.verifier = ChainVerifier::new(ChainPosition::after(&rec));
                }
                _ => self.unreadable(seq, bytes, kind, e.kind.to_string()),
            }
        }
    }

    fn unreadable(&mut self, seq: EvidenceSeq, bytes: &[u8], kind: &str, detail: String) {
        self.report(seq.get(), kind, detail);
        self.verifier = ChainVerifier::new(ChainPosition {
            next_seq: seq.next(),
            hash: tail_hash(bytes),
        });
        self.resync = true;
    }
}

/// The hub's evidence database. Cheap to clone (the database is shared);
/// every method is blocking I/O.
/// How the store opens its database again after a write error.
type Opener = Arc<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// How long a reopen waits for readers to let go of the old handle (the
/// file lock is released only when the last one does).
const READERS_GRACE: Duration = Duration::from_secs(2);

/// The open database and how to open it again: redb refuses every
/// operation after an I/O error until the database is reopened.
struct Slot {
    open: Opener,
    db: RwLock<Option<Arc<Database>>>,
    /// The directory holding the file (none on a storage backend).
    dir: Option<std::path::PathBuf>,
}

/// Below this much free space on the file system of `evidence.db`, a
/// storage error whose cause redb no longer reports (`PreviousIo`) is
/// taken for a full disk.
pub const FULL_BELOW_BYTES: u64 = 1 << 20;

/// The hub's evidence database. Cheap to clone; clones share one handle.
#[derive(Clone)]
pub struct EvidenceStore {
    slot: Arc<Slot>,
}

impl std::fmt::Debug for EvidenceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceStore").finish_non_exhaustive()
    }
}

impl EvidenceStore {
    /// Opens `path`, creating it (and its tables and schema row) if
    /// missing. Refuses another schema version or a file with foreign
    /// tables (e.g. a spoke's buffer).
    pub fn open(path: &Path) -> Result<EvidenceStore, EvidenceStoreError> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let path = path.to_owned();
        Self::init(
            Arc::new(move || Builder::new().set_cache_size(CACHE_BYTES).create(&path)),
            Some(dir),
        )
    }

    /// [`EvidenceStore::open`] on redb storage backends instead of a file
    /// (tests run the store on a simulated disk with power cuts and full
    /// disks): `backend` makes a fresh handle at open and at each
    /// [`EvidenceStore::reopen`].
    pub fn open_with_backend<B: redb::StorageBackend>(
        backend: impl Fn() -> B + Send + Sync + 'static,
    ) -> Result<EvidenceStore, EvidenceStoreError> {
        Self::init(
            Arc::new(move || {
                Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .create_with_backend(backend())
            }),
            None,
        )
    }

    fn init(
        open: Opener,
        dir: Option<std::path::PathBuf>,
    ) -> Result<EvidenceStore, EvidenceStoreError> {
        let db = open()?;
        let tx = db.begin_write()?;
        {
            let existing: Vec<String> = tx.list_tables()?.map(|t| t.name().to_owned()).collect();
            if let Some(t) = existing.iter().find(|t| !TABLES.contains(&t.as_str())) {
                return Err(EvidenceStoreError::Foreign { table: t.clone() });
            }
            let mut meta = tx.open_table(META)?;
            let schema = meta
                .get("schema")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match schema.as_deref() {
                None => {
                    if existing.iter().any(|t| t != "meta") {
                        return Err(corrupt("meta", "tables without a schema row"));
                    }
                    meta.insert("schema", EVIDENCE_SCHEMA.as_bytes())?;
                    meta.insert("kind", KIND.as_bytes())?;
                }
                Some(EVIDENCE_SCHEMA) => {}
                Some(other) => {
                    return Err(EvidenceStoreError::Schema {
                        found: other.to_owned(),
                    })
                }
            }
            tx.open_table(SPOKES)?;
            tx.open_table(RECORDS)?;
            tx.open_table(BATCHES)?;
            tx.open_table(GAPS)?;
            tx.open_table(AGGREGATES)?;
        }
        tx.commit()?;
        Ok(EvidenceStore {
            slot: Arc::new(Slot {
                open,
                db: RwLock::new(Some(Arc::new(db))),
                dir,
            }),
        })
    }

    /// The current handle.
    fn db(&self) -> Result<Arc<Database>, EvidenceStoreError> {
        self.slot
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(EvidenceStoreError::Closed)
    }

    /// Classifies a storage error ([`StorageFault::of`]); redb reports the
    /// disk filling up during a commit as `PreviousIo` at times, so an
    /// unclassified fault counts as [`StorageFault::Full`] when the file
    /// system holding the file has less than [`FULL_BELOW_BYTES`] free.
    pub fn fault(&self, e: &EvidenceStoreError) -> Option<StorageFault> {
        let fault = StorageFault::of(e)?;
        if fault == StorageFault::WriteFailed {
            let free = self.slot.dir.as_deref().and_then(|d| {
                rustix::fs::statvfs(d)
                    .ok()
                    .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            });
            if free.is_some_and(|f| f < FULL_BELOW_BYTES) {
                return Some(StorageFault::Full);
            }
        }
        Some(fault)
    }

    /// Closes the database (waiting briefly for readers to let go) and
    /// opens it again: what redb needs after a failed write before it does
    /// any more work. On error the store stays closed
    /// ([`EvidenceStoreError::Closed`]) and the caller retries later.
    /// Blocking.
    pub fn reopen(&self) -> Result<(), EvidenceStoreError> {
        let old = self
            .slot
            .db
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut old) = old {
            let deadline = Instant::now() + READERS_GRACE;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        }
        let db = Arc::new((self.slot.open)()?);
        *self.slot.db.write().unwrap_or_else(|p| p.into_inner()) = Some(db);
        Ok(())
    }

    fn write(&self) -> Result<WriteTransaction, EvidenceStoreError> {
        let mut tx = self.db()?.begin_write()?;
        tx.set_quick_repair(true);
        Ok(tx)
    }

    /// Where the hub's copy of `spoke`'s chain ends: genesis position if
    /// nothing stored yet.
    pub fn position(&self, spoke: &SpiffeId) -> Result<ChainPosition, EvidenceStoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(SPOKES)?;
        Ok(load_state(&t, &spoke.to_string())?
            .map_or_else(|| ChainPosition::genesis(spoke), |s| s.position))
    }

    /// Stores a signature-checked batch in one durable write transaction
    /// (see "Ingest"). `signer_cert_sha256` is the SHA-256 of the
    /// certificate whose key verified the batch; `now` stamps the receipt.
    /// `Chain` and `Fork` refusals are already flagged in the spoke's stats
    /// when this returns; do not also call [`EvidenceStore::record_rejection`].
    pub fn ingest(
        &self,
        batch: &VerifiedBatch,
        signer_cert_sha256: [u8; 32],
        now: UnixMillis,
    ) -> Result<IngestOutcome, IngestError> {
        let tx = self.write()?;
        match Self::ingest_in(&tx, batch, signer_cert_sha256, now) {
            Ok(outcome) => {
                tx.commit()?;
                Ok(outcome)
            }
            Err(e) => {
                tx.abort()?;
                if matches!(e, IngestError::Chain { .. } | IngestError::Fork { .. }) {
                    self.flag(batch.spoke(), e.to_string(), now, true)?;
                }
                Err(e)
            }
        }
    }

    fn ingest_in(
        tx: &WriteTransaction,
        batch: &VerifiedBatch,
        signer_cert_sha256: [u8; 32],
        now: UnixMillis,
    ) -> Result<IngestOutcome, IngestError> {
        let spoke_id = batch.spoke();
        let spoke_name = spoke_id.to_string();
        let spoke = spoke_name.as_str();
        let mut spokes = tx.open_table(SPOKES)?;
        let mut st = load_state(&spokes, spoke)?.unwrap_or_else(|| SpokeState::genesis(spoke_id));
        let mut records = tx.open_table(RECORDS)?;
        let mut verifier = ChainVerifier::new(st.position);
        let (mut stored, mut duplicates) = (0u32, 0u32);
        let (mut bytes, mut shed_records, mut dropped) = (0u64, 0u64, 0u64);
        let mut first_stored = None;
        let mut cut_shed = None;
        let mut aggs: BTreeMap<String, AggRow> = BTreeMap::new();
        for r in batch.records() {
            let next = verifier.position().next_seq;
            let cut;
            let rec = if r.last_seq() < next {
                check_duplicate(&records, spoke, r)?;
                duplicates = duplicates.saturating_add(1);
                continue;
            } else if r.seq < next {
                cut = resume_shed(r, verifier.position()).map_err(|e| IngestError::Chain {
                    seq: next,
                    detail: e.to_string(),
                })?;
                cut_shed = Some(r.encode());
                &cut
            } else if r.seq > next {
                return Err(IngestError::Ahead {
                    expected: next,
                    found: r.seq,
                });
            } else {
                r
            };
            verifier.push(rec).map_err(|e| IngestError::Chain {
                seq: e.seq,
                detail: e.kind.to_string(),
            })?;
            let enc = rec.encode();
            records.insert((spoke, rec.seq.get()), enc.as_slice())?;
            first_stored.get_or_insert(rec.seq.get());
            stored = stored.saturating_add(1);
            bytes += enc.len() as u64;
            match &rec.body {
                RecordBody::Request(req) => aggs
                    .entry(agg_key(spoke, &req.service_name, mode_name(req.mode)))
                    .or_default()
                    .add_request(req),
                RecordBody::Shed(s) => {
                    shed_records += 1;
                    dropped += s.count;
                    let row = aggs.entry(agg_key(spoke, "", "")).or_default();
                    row.shed_records += 1;
                    row.dropped += s.count;
                }
                _ => {}
            }
        }
        let position = *verifier.position();
        if let Some(first) = first_stored {
            let row = BatchRow {
                batch_first_seq: batch.first_seq().get(),
                last_seq: position.last_seq(),
                signature: batch.signature().to_vec(),
                signer_cert_sha256,
                received_ms: now.as_millis(),
                cut_shed,
            };
            tx.open_table(BATCHES)?
                .insert((spoke, first), encode(&row).as_slice())?;
            let mut t = tx.open_table(AGGREGATES)?;
            for (key, delta) in aggs {
                let mut cur: AggRow = match t.get(key.as_str())? {
                    Some(v) => decode("aggregates", v.value())?,
                    None => AggRow::default(),
                };
                cur.merge(&delta);
                t.insert(key.as_str(), encode(&cur).as_slice())?;
            }
        }
        st.position = position;
        st.records += u64::from(stored);
        st.bytes += bytes;
        st.batches += 1;
        st.duplicates += u64::from(duplicates);
        st.shed_records += shed_records;
        st.dropped += dropped;
        st.last_ingest_ms = Some(now.as_millis());
        spokes.insert(spoke, encode(&st).as_slice())?;
        Ok(IngestOutcome {
            position,
            stored,
            duplicates,
            first_stored,
        })
    }

    /// Records a refused batch on `spoke`'s state in its own transaction.
    fn flag(
        &self,
        spoke: &SpiffeId,
        reason: String,
        now: UnixMillis,
        chain_break: bool,
    ) -> Result<(), EvidenceStoreError> {
        let name = spoke.to_string();
        let tx = self.write()?;
        {
            let mut t = tx.open_table(SPOKES)?;
            let mut st = load_state(&t, &name)?.unwrap_or_else(|| SpokeState::genesis(spoke));
            st.rejected_batches += 1;
            if chain_break {
                st.chain_breaks += 1;
            }
            st.flag(reason, now);
            t.insert(name.as_str(), encode(&st).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Persists a refusal the caller decided (bad signature, undecodable
    /// batch, wrong spoke) so `stats` shows it: increments
    /// `rejected_batches` and sets `last_error`. Does not touch `chain_ok`.
    /// `spoke` must be the authenticated peer, not a claim from the batch.
    pub fn record_rejection(
        &self,
        spoke: &SpiffeId,
        reason: &str,
        now: UnixMillis,
    ) -> Result<(), EvidenceStoreError> {
        self.flag(spoke, reason.to_owned(), now, false)
    }

    /// The spoke no longer holds records the hub needs (it pruned them
    /// after an ack the hub lost, or lost its disk): records a gap from the
    /// hub's position up to `resume.next_seq` (exclusive) with `reason`,
    /// and continues the chain from `resume`. Refused if `resume` is not
    /// past the hub's position. Flags the spoke (`chain_ok` false).
    pub fn declare_gap(
        &self,
        spoke: &SpiffeId,
        resume: &ChainPosition,
        reason: &str,
        now: UnixMillis,
    ) -> Result<GapInfo, EvidenceStoreError> {
        let name = spoke.to_string();
        let tx = self.write()?;
        let info = {
            let mut t = tx.open_table(SPOKES)?;
            let mut st = load_state(&t, &name)?.unwrap_or_else(|| SpokeState::genesis(spoke));
            let next = st.position.next_seq;
            if resume.next_seq <= next {
                return Err(EvidenceStoreError::GapNotAhead {
                    spoke: name,
                    resume: resume.next_seq,
                    next,
                });
            }
            let last_missing = resume.last_seq();
            let row = GapRow {
                last_missing,
                from_hash: st.position.hash,
                resume: *resume,
                reason: reason.to_owned(),
                at_ms: now.as_millis(),
            };
            tx.open_table(GAPS)?
                .insert((name.as_str(), next.get()), encode(&row).as_slice())?;
            let missing = last_missing - next.get() + 1;
            st.position = *resume;
            st.gaps += 1;
            st.missing += missing;
            st.flag(
                format!("gap declared: records {next}..={last_missing} missing: {reason}"),
                now,
            );
            t.insert(name.as_str(), encode(&st).as_slice())?;
            GapInfo {
                spoke: name.clone(),
                first_missing: next.get(),
                last_missing,
                missing,
                resume_seq: resume.next_seq.get(),
                reason: reason.to_owned(),
                declared_at: now.to_rfc3339(),
            }
        };
        tx.commit()?;
        Ok(info)
    }

    /// Stored records of `spoke` in sequence order, filtered by `q`.
    pub fn query(
        &self,
        spoke: &SpiffeId,
        q: &Query,
    ) -> Result<Vec<SealedRecord>, EvidenceStoreError> {
        let mut out = Vec::new();
        if q.limit == 0 {
            return Ok(out);
        }
        let name = spoke.to_string();
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(RECORDS)?;
        let from = q.from_seq.unwrap_or(0);
        for row in t.range((name.as_str(), from)..=(name.as_str(), u64::MAX))? {
            let (k, v) = row?;
            let key = k.value().1;
            let bytes = v.value();
            let bad = |e| corrupt("records", format!("record {key}: {e}"));
            let h = RecordHeader::peek(bytes).map_err(bad)?;
            if q.kind.is_some_and(|kind| kind != h.kind) || q.since.is_some_and(|s| h.timestamp < s)
            {
                continue;
            }
            out.push(SealedRecord::decode(bytes).map_err(bad)?);
            if out.len() >= q.limit {
                break;
            }
        }
        Ok(out)
    }

    /// Verifies `spoke`'s stored chain from its checkpoint to the hub's
    /// position (see "Verification"). Reads every row held: blocking and
    /// proportional to the spoke's evidence.
    pub fn verify(&self, spoke: &SpiffeId) -> Result<VerifyReport, EvidenceStoreError> {
        let name = spoke.to_string();
        let tx = self.db()?.begin_read()?;
        let st = load_state(&tx.open_table(SPOKES)?, &name)?
            .unwrap_or_else(|| SpokeState::genesis(spoke));
        let gaps = load_gaps(&tx.open_table(GAPS)?, &name)?;
        let records = tx.open_table(RECORDS)?;
        let mut walk = Walk::new(st.checkpoint, gaps);
        for row in records.range((name.as_str(), 0)..=(name.as_str(), u64::MAX))? {
            let (k, v) = row?;
            walk.step(k.value().1, v.value());
        }
        walk.cross_gaps(st.position.next_seq.get());
        let end = walk.position();
        let arrived = if walk.resync {
            end.next_seq == st.position.next_seq
        } else {
            end == st.position
        };
        if !arrived {
            walk.report(
                end.next_seq.get(),
                "tip_mismatch",
                format!(
                    "stored records end at seq {} but the hub's position is after seq {} \
                     (records missing at the end, or a different link)",
                    end.last_seq(),
                    st.position.last_seq()
                ),
            );
        }
        Ok(VerifyReport {
            spoke: name,
            records_checked: walk.checked,
            from_seq: st.checkpoint.next_seq.get(),
            to_seq: end.last_seq(),
            ok: walk.breaks_total == 0,
            breaks: walk.breaks,
            breaks_total: walk.breaks_total,
        })
    }

    /// `spoke`'s counters; all zero (and `chain_ok`) for an unknown spoke.
    pub fn stats(&self, spoke: &SpiffeId) -> Result<SpokeEvidenceStats, EvidenceStoreError> {
        let name = spoke.to_string();
        let tx = self.db()?.begin_read()?;
        let st = load_state(&tx.open_table(SPOKES)?, &name)?
            .unwrap_or_else(|| SpokeState::genesis(spoke));
        let first = first_held(&tx.open_table(RECORDS)?, &name)?;
        Ok(st.stats(&name, first))
    }

    /// Every spoke with evidence (or a flagged refusal), by ID.
    pub fn spokes(&self) -> Result<Vec<SpokeEvidenceStats>, EvidenceStoreError> {
        let tx = self.db()?.begin_read()?;
        let spokes = tx.open_table(SPOKES)?;
        let records = tx.open_table(RECORDS)?;
        let mut out = Vec::new();
        for row in spokes.iter()? {
            let (k, v) = row?;
            let name = k.value();
            let st: SpokeState = decode("spokes", v.value())?;
            out.push(st.stats(name, first_held(&records, name)?));
        }
        Ok(out)
    }

    /// Aggregates of one spoke, or of all, ordered by spoke, service, mode.
    pub fn aggregates(
        &self,
        spoke: Option<&SpiffeId>,
    ) -> Result<Vec<Aggregate>, EvidenceStoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(AGGREGATES)?;
        let mut out = Vec::new();
        let mut push = |k: &str, v: &[u8]| -> Result<(), EvidenceStoreError> {
            let (spoke, service, mode) =
                split_agg_key(k).ok_or_else(|| corrupt("aggregates", format!("key {k:?}")))?;
            let row: AggRow = decode("aggregates", v)?;
            out.push(row.render(spoke, service, mode));
            Ok(())
        };
        match spoke {
            Some(s) => {
                let lo = format!("{s}{SEP}");
                let hi = format!("{s}\u{20}");
                for row in t.range(lo.as_str()..hi.as_str())? {
                    let (k, v) = row?;
                    push(k.value(), v.value())?;
                }
            }
            None => {
                for row in t.iter()? {
                    let (k, v) = row?;
                    push(k.value(), v.value())?;
                }
            }
        }
        Ok(out)
    }

    /// Applies `policy` to every spoke (see "Retention"), in transactions
    /// of at most [`PRUNE_CHUNK`] records.
    pub fn prune(
        &self,
        policy: &Retention,
        now: UnixMillis,
    ) -> Result<PruneReport, EvidenceStoreError> {
        self.prune_in_chunks(policy, now, PRUNE_CHUNK)
    }

    fn prune_in_chunks(
        &self,
        policy: &Retention,
        now: UnixMillis,
        chunk: usize,
    ) -> Result<PruneReport, EvidenceStoreError> {
        let mut report = PruneReport::default();
        if policy.max_age.is_none() && policy.max_bytes_per_spoke.is_none() {
            return Ok(report);
        }
        let names: Vec<String> = {
            let tx = self.db()?.begin_read()?;
            let t = tx.open_table(SPOKES)?;
            let mut v = Vec::new();
            for row in t.iter()? {
                v.push(row?.0.value().to_owned());
            }
            v
        };
        for name in names {
            let mut p = SpokePruned {
                spoke: name.clone(),
                records: 0,
                bytes: 0,
                batches: 0,
                checkpoint_seq: 0,
                breaks: Vec::new(),
            };
            while self.prune_chunk(&name, policy, now, chunk, &mut p)? {}
            if p.records > 0 {
                report.records += p.records;
                report.bytes += p.bytes;
                report.batches += p.batches;
                report.spokes.push(p);
            }
        }
        Ok(report)
    }

    /// One retention transaction for `spoke`; true if more may be due.
    fn prune_chunk(
        &self,
        spoke: &str,
        policy: &Retention,
        now: UnixMillis,
        chunk: usize,
        out: &mut SpokePruned,
    ) -> Result<bool, EvidenceStoreError> {
        let max_age_ms = policy
            .max_age
            .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
        let tx = self.write()?;
        let mut spokes = tx.open_table(SPOKES)?;
        let Some(mut st) = load_state(&spokes, spoke)? else {
            return Ok(false);
        };
        let mut gaps = tx.open_table(GAPS)?;
        let mut walk = Walk::new(st.checkpoint, load_gaps(&gaps, spoke)?);
        let mut records = tx.open_table(RECORDS)?;
        let mut doomed = Vec::new();
        let mut held = st.bytes;
        let mut more = false;
        for row in records.range((spoke, 0)..=(spoke, u64::MAX))? {
            if doomed.len() >= chunk.max(1) {
                more = true;
                break;
            }
            let (k, v) = row?;
            let (key, bytes) = (k.value().1, v.value());
            let too_big = policy.max_bytes_per_spoke.is_some_and(|m| held > m);
            let too_old = max_age_ms.is_some_and(|age| {
                RecordHeader::peek(bytes)
                    .is_ok_and(|h| now.as_millis().saturating_sub(h.timestamp.as_millis()) > age)
            });
            if !(too_big || too_old) {
                break;
            }
            walk.step(key, bytes);
            held = held.saturating_sub(bytes.len() as u64);
            doomed.push(key);
        }
        if doomed.is_empty() {
            drop((records, gaps, spokes));
            tx.abort()?;
            return Ok(false);
        }
        for key in &doomed {
            records.remove((spoke, *key))?;
        }
        let checkpoint = walk.position();
        let mut batches = tx.open_table(BATCHES)?;
        let mut old = Vec::new();
        for row in batches.range((spoke, 0)..=(spoke, u64::MAX))? {
            let (k, v) = row?;
            let b: BatchRow = decode("batches", v.value())?;
            if b.last_seq >= checkpoint.next_seq.get() {
                break;
            }
            old.push(k.value().1);
        }
        for key in &old {
            batches.remove((spoke, *key))?;
        }
        for key in &walk.passed_gaps {
            gaps.remove((spoke, *key))?;
        }
        let pruned_bytes = st.bytes - held;
        st.checkpoint = checkpoint;
        st.records = st.records.saturating_sub(doomed.len() as u64);
        st.bytes = held;
        if walk.broken > 0 {
            st.chain_breaks += walk.broken;
            if let Some(b) = walk.breaks.iter().find(|b| b.kind != "declared_gap") {
                st.flag(
                    format!(
                        "retention pruned past a broken chain at seq {}: {}",
                        b.seq, b.detail
                    ),
                    now,
                );
            }
        }
        spokes.insert(spoke, encode(&st).as_slice())?;
        drop((records, gaps, spokes, batches));
        tx.commit()?;
        out.records += doomed.len() as u64;
        out.bytes += pruned_bytes;
        out.batches += old.len() as u64;
        out.checkpoint_seq = checkpoint.last_seq();
        out.breaks
            .extend(walk.breaks.into_iter().filter(|b| b.kind != "declared_gap"));
        Ok(more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tempfile::TempDir;
    use tidemesh_evidence::record::{DrillMarker, ShedReason};
    use tidemesh_evidence::{samples, Batch, Chain, NewRecord, PriorityClass, ShedRun};
    use tidemesh_identity::svid::{self, KeyPair};

    fn spoke() -> SpiffeId {
        SpiffeId::parse("spiffe://edge.company.com/store/sf01/node/n1").expect("valid id")
    }

    const T0: u64 = 1_705_314_600_000;

    fn at(offset_ms: u64) -> UnixMillis {
        UnixMillis(T0 + offset_ms)
    }

    /// Requests 1..=n of `spoke`, record `i` at `at(i * 1000)`; bodies
    /// differ from `fork_at` on (another chain sharing the first records).
    fn chain_for(spoke: &SpiffeId, n: u64, fork_at: u64) -> Vec<SealedRecord> {
        let mut chain = Chain::genesis(spoke);
        (1..=n)
            .map(|i| {
                let body = samples::request(if i >= fork_at { i + 1000 } else { i }, at(i * 1000));
                chain
                    .append(NewRecord::new(at(i * 1000), body))
                    .expect("appends")
            })
            .collect()
    }

    fn chain(n: u64) -> Vec<SealedRecord> {
        chain_for(&spoke(), n, u64::MAX)
    }

    /// The records of seqs `first..=last` (1-based, inclusive).
    fn seqs(c: &[SealedRecord], first: usize, last: usize) -> &[SealedRecord] {
        &c[first - 1..last]
    }

    struct Fx {
        dir: TempDir,
        store: EvidenceStore,
        key: KeyPair,
    }

    fn fixture() -> Fx {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EvidenceStore::open(&dir.path().join("evidence.db")).expect("opens");
        Fx {
            dir,
            store,
            key: svid::generate_key().expect("key"),
        }
    }

    fn signed_for(spoke: &SpiffeId, key: &KeyPair, recs: &[SealedRecord]) -> VerifiedBatch {
        Batch::sign(spoke.clone(), recs.to_vec(), key)
            .expect("signs")
            .verify_signature(key.public_key_raw())
            .expect("verifies")
    }

    impl Fx {
        fn ingest(&self, recs: &[SealedRecord]) -> Result<IngestOutcome, IngestError> {
            self.ingest_as(&spoke(), recs)
        }

        fn ingest_as(
            &self,
            spoke: &SpiffeId,
            recs: &[SealedRecord],
        ) -> Result<IngestOutcome, IngestError> {
            let b = signed_for(spoke, &self.key, recs);
            self.store.ingest(&b, [7; 32], at(1_000_000))
        }

        fn all(&self) -> Vec<SealedRecord> {
            self.store.query(&spoke(), &all_records()).expect("query")
        }

        fn stats(&self) -> SpokeEvidenceStats {
            self.store.stats(&spoke()).expect("stats")
        }

        fn verify(&self) -> VerifyReport {
            self.store.verify(&spoke()).expect("verify")
        }

        /// Rewrites (or with `None` deletes) one stored row behind the
        /// store's back.
        fn tamper(&self, seq: u64, bytes: Option<&[u8]>) {
            let name = spoke().to_string();
            let tx = self.store.db().expect("open").begin_write().expect("write");
            {
                let mut t = tx.open_table(RECORDS).expect("table");
                match bytes {
                    Some(b) => {
                        t.insert((name.as_str(), seq), b).expect("insert");
                    }
                    None => {
                        t.remove((name.as_str(), seq)).expect("remove");
                    }
                }
            }
            tx.commit().expect("commit");
        }
    }

    fn all_records() -> Query {
        Query {
            since: None,
            kind: None,
            from_seq: None,
            limit: usize::MAX,
        }
    }

    fn with_service(mut r: SealedRecord, service: &str) -> SealedRecord {
        if let RecordBody::Request(req) = &mut r.body {
            req.service_name = service.into();
        }
        r
    }

    #[test]
    fn the_store_is_shareable() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<EvidenceStore>();
    }

    #[test]
    fn ingest_in_order_persists_across_reopen() {
        let fx = fixture();
        let c = chain(10);
        assert_eq!(
            fx.store.position(&spoke()).expect("pos"),
            ChainPosition::genesis(&spoke())
        );
        let out = fx.ingest(seqs(&c, 1, 5)).expect("ingests");
        assert_eq!(
            out,
            IngestOutcome {
                position: ChainPosition::after(&c[4]),
                stored: 5,
                duplicates: 0,
                first_stored: Some(1),
            }
        );
        let out = fx.ingest(seqs(&c, 6, 10)).expect("ingests");
        assert_eq!(out.position, ChainPosition::after(&c[9]));
        assert_eq!(fx.all(), c);
        let st = fx.stats();
        assert_eq!(
            (
                st.records,
                st.high_water_mark,
                st.first_seq_held,
                st.checkpoint_seq
            ),
            (10, 10, 1, 0)
        );
        assert_eq!(
            st.bytes,
            c.iter().map(|r| r.encode().len() as u64).sum::<u64>()
        );
        assert!(st.chain_ok);
        assert_eq!(st.batches, 2);
        assert_eq!(
            st.last_ingest.as_deref(),
            Some(at(1_000_000).to_rfc3339().as_str())
        );
        let v = fx.verify();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.records_checked, v.from_seq, v.to_seq), (10, 1, 10));

        // One batch row per batch, with its signature.
        let tx = fx.store.db().expect("open").begin_read().expect("read");
        let t = tx.open_table(BATCHES).expect("table");
        let name = spoke().to_string();
        let rows: Vec<(u64, BatchRow)> = t
            .range((name.as_str(), 0)..=(name.as_str(), u64::MAX))
            .expect("range")
            .map(|r| {
                let (k, v) = r.expect("row");
                (k.value().1, decode("batches", v.value()).expect("decodes"))
            })
            .collect();
        drop((t, tx));
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[1].0, rows[1].1.batch_first_seq, rows[1].1.last_seq),
            (6, 6, 10)
        );
        assert_eq!(rows[1].1.signer_cert_sha256, [7; 32]);
        assert!(!rows[1].1.signature.is_empty());

        let path = fx.dir.path().join("evidence.db");
        let Fx { dir, store, key } = fx;
        drop(store);
        let store = EvidenceStore::open(&path).expect("reopens");
        assert_eq!(
            store.position(&spoke()).expect("pos"),
            ChainPosition::after(&c[9])
        );
        assert_eq!(store.stats(&spoke()).expect("stats"), st);
        let fx = Fx { dir, store, key };
        let more = chain(12);
        let out = fx.ingest(seqs(&more, 11, 12)).expect("continues");
        assert_eq!(out.position, ChainPosition::after(&more[11]));
        assert!(fx.verify().ok);
    }

    #[test]
    fn the_same_batch_twice_is_stored_once() {
        let fx = fixture();
        let c = chain(5);
        fx.ingest(&c).expect("ingests");
        let out = fx.ingest(&c).expect("duplicate batch is fine");
        assert_eq!((out.stored, out.duplicates), (0, 5));
        assert_eq!(out.position, ChainPosition::after(&c[4]));
        assert_eq!(fx.all(), c);
        let st = fx.stats();
        assert_eq!((st.records, st.duplicates, st.rejected_batches), (5, 5, 0));
        assert!(st.chain_ok);
    }

    #[test]
    fn overlapping_batches_store_the_new_part() {
        let fx = fixture();
        let c = chain(10);
        fx.ingest(seqs(&c, 1, 6)).expect("ingests");
        let out = fx.ingest(seqs(&c, 4, 10)).expect("ingests");
        assert_eq!((out.stored, out.duplicates), (4, 3));
        let out = fx.ingest(seqs(&c, 2, 3)).expect("old replay");
        assert_eq!((out.stored, out.duplicates), (0, 2));
        assert_eq!(fx.all(), c);
        assert!(fx.verify().ok);
        assert_eq!(fx.stats().records, 10);
    }

    #[test]
    fn a_batch_ahead_is_refused_and_nothing_is_persisted() {
        let fx = fixture();
        let c = chain(10);
        fx.ingest(seqs(&c, 1, 5)).expect("ingests");
        let before = fx.stats();
        match fx.ingest(seqs(&c, 8, 10)) {
            Err(IngestError::Ahead { expected, found }) => {
                assert_eq!((expected.get(), found.get()), (6, 8));
            }
            other => panic!("expected Ahead, got {other:?}"),
        }
        assert_eq!(fx.stats(), before);
        assert_eq!(fx.all().len(), 5);
        fx.ingest(seqs(&c, 6, 10)).expect("resent from expected");
        assert_eq!(fx.all(), c);
    }

    #[test]
    fn a_broken_link_refuses_the_batch_and_flags_it() {
        let fx = fixture();
        let c = chain(10);
        fx.ingest(seqs(&c, 1, 5)).expect("ingests");
        let mut bad = seqs(&c, 6, 10).to_vec();
        bad[2] = with_service(bad[2].clone(), "evil"); // seq 8, hash kept
        match fx.ingest(&bad) {
            Err(IngestError::Chain { seq, detail }) => {
                assert_eq!(seq.get(), 8);
                assert!(detail.contains("hash mismatch"), "{detail}");
            }
            other => panic!("expected Chain, got {other:?}"),
        }
        // Nothing of the batch was stored, not even 6 and 7.
        assert_eq!(
            fx.store.position(&spoke()).expect("pos"),
            ChainPosition::after(&c[4])
        );
        assert_eq!(fx.all().len(), 5);
        let st = fx.stats();
        assert_eq!((st.rejected_batches, st.chain_breaks, st.gaps), (1, 1, 1));
        assert!(!st.chain_ok);
        assert!(st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("seq 8")));

        // Records of another chain do not link either.
        let other = chain_for(
            &SpiffeId::parse("spiffe://edge.company.com/store/sf02/node/n1").expect("id"),
            6,
            u64::MAX,
        );
        match fx.ingest(seqs(&other, 6, 6)) {
            Err(IngestError::Chain { seq, .. }) => assert_eq!(seq.get(), 6),
            other => panic!("expected Chain, got {other:?}"),
        }
        assert_eq!(fx.stats().rejected_batches, 2);

        // The honest batch still goes in; the flag stays.
        fx.ingest(seqs(&c, 6, 10)).expect("ingests");
        assert_eq!(fx.all(), c);
        assert!(!fx.stats().chain_ok);
        assert!(fx.verify().ok);
    }

    #[test]
    fn a_fork_is_refused_and_flagged() {
        let fx = fixture();
        let c = chain(5);
        fx.ingest(&c).expect("ingests");
        let forked = chain_for(&spoke(), 7, 3);
        assert_eq!(forked[..2], c[..2]);
        match fx.ingest(seqs(&forked, 1, 7)) {
            Err(IngestError::Fork { seq }) => assert_eq!(seq.get(), 3),
            other => panic!("expected Fork, got {other:?}"),
        }
        assert_eq!(fx.all(), c);
        let st = fx.stats();
        assert_eq!(
            (st.rejected_batches, st.chain_breaks, st.high_water_mark),
            (1, 1, 5)
        );
        assert!(!st.chain_ok);
    }

    #[test]
    fn a_shed_record_straddling_the_mark_is_cut_and_replays_are_duplicates() {
        let fx = fixture();
        let c = chain(10);
        fx.ingest(seqs(&c, 1, 4)).expect("ingests");
        // The spoke sheds 3..=8 before learning the hub has 1..=4.
        let mut run = ShedRun::new();
        for r in seqs(&c, 3, 8) {
            run.drop_record(r.seq, r.timestamp, r.class, r.hash)
                .expect("contiguous");
        }
        let shed = run
            .seal(&c[1].link(), ShedReason::BufferFull, at(50_000))
            .expect("non-empty");
        let mut sent = vec![shed.clone()];
        sent.extend_from_slice(seqs(&c, 9, 10));
        let out = fx.ingest(&sent).expect("ingests");
        assert_eq!((out.stored, out.duplicates), (3, 0));
        assert_eq!(out.position, ChainPosition::after(&c[9]));

        let held = fx.all();
        assert_eq!(held.len(), 7);
        assert_eq!(held[..4], c[..4]);
        let cut = held[4].as_shed().expect("a shed record");
        assert_eq!(
            (
                held[4].seq.get(),
                cut.range.first.get(),
                cut.range.last.get()
            ),
            (5, 5, 8)
        );
        assert_eq!(cut.count, 4);
        assert_eq!(held[5..], c[8..]);
        let v = fx.verify();
        assert!(v.ok, "{v:?}");
        let st = fx.stats();
        assert_eq!((st.shed_records, st.dropped, st.records), (1, 4, 7));
        let only_shed = fx
            .store
            .query(
                &spoke(),
                &Query {
                    kind: Some(RecordKind::Shed),
                    ..all_records()
                },
            )
            .expect("query");
        assert_eq!(only_shed, held[4..5]);

        // The cut record as signed is kept with the batch.
        let tx = fx.store.db().expect("open").begin_read().expect("read");
        let t = tx.open_table(BATCHES).expect("table");
        let row: BatchRow = decode(
            "batches",
            t.get((spoke().to_string().as_str(), 5))
                .expect("get")
                .expect("row")
                .value(),
        )
        .expect("decodes");
        assert_eq!(row.cut_shed, Some(shed.encode()));
        assert_eq!(row.batch_first_seq, 3);
        drop((t, tx));

        // Replays of the uncut shed record and of the real records are
        // duplicates, not forks.
        let out = fx.ingest(&sent).expect("replay");
        assert_eq!((out.stored, out.duplicates), (0, 3));
        let out = fx
            .ingest(seqs(&c, 1, 10))
            .expect("replay of the real records");
        assert_eq!((out.stored, out.duplicates), (0, 10));
        assert!(fx.stats().chain_ok);

        // A shed record whose last link disagrees with what the hub holds
        // is a fork.
        let mut lie = ShedRun::new();
        for r in seqs(&c, 2, 3) {
            lie.drop_record(r.seq, r.timestamp, r.class, ChainHash([9; 32]))
                .expect("contiguous");
        }
        let lie = lie
            .seal(&c[0].link(), ShedReason::BufferFull, at(60_000))
            .expect("non-empty");
        let mut sent = vec![lie];
        sent.extend_from_slice(seqs(&c, 4, 4));
        match fx.ingest(&sent) {
            Err(IngestError::Fork { seq }) => assert_eq!(seq.get(), 3),
            other => panic!("expected Fork, got {other:?}"),
        }

        let aggs = fx.store.aggregates(Some(&spoke())).expect("aggregates");
        let shed_row = aggs
            .iter()
            .find(|a| a.service.is_empty())
            .expect("shed row");
        assert_eq!(
            (shed_row.shed_records, shed_row.dropped, shed_row.requests),
            (1, 4, 0)
        );
    }

    #[test]
    fn verify_names_an_altered_record_and_goes_on() {
        let fx = fixture();
        let c = chain(10);
        fx.ingest(&c).expect("ingests");
        let altered = with_service(c[4].clone(), "evil").encode();
        fx.tamper(5, Some(&altered));
        let v = fx.verify();
        assert!(!v.ok);
        assert_eq!(v.breaks_total, 1);
        assert_eq!(
            (v.breaks[0].seq, v.breaks[0].kind.as_str()),
            (5, "hash_mismatch")
        );
        assert_eq!((v.records_checked, v.to_seq), (10, 10));

        // A missing row and undecodable bytes are named too.
        fx.tamper(8, None);
        fx.tamper(9, Some(b"garbage"));
        let v = fx.verify();
        let got: Vec<(u64, &str)> = v.breaks.iter().map(|b| (b.seq, b.kind.as_str())).collect();
        assert_eq!(
            got,
            [(5, "hash_mismatch"), (8, "missing"), (9, "malformed")]
        );
        assert_eq!(v.to_seq, 10);
        // Record 9 after a missing 8 restarts the chain unchecked; 10
        // verifies against it.
        fx.tamper(9, Some(&c[8].encode()));
        let v = fx.verify();
        let got: Vec<(u64, &str)> = v.breaks.iter().map(|b| (b.seq, b.kind.as_str())).collect();
        assert_eq!(got, [(5, "hash_mismatch"), (8, "missing")]);

        // A truncated tail does not arrive at the hub's position.
        fx.tamper(10, None);
        let v = fx.verify();
        assert_eq!(
            v.breaks.last().map(|b| b.kind.as_str()),
            Some("tip_mismatch")
        );
    }

    #[test]
    fn a_declared_gap_is_flagged_and_verification_resumes_after_it() {
        let fx = fixture();
        let c = chain(12);
        fx.ingest(seqs(&c, 1, 5)).expect("ingests");
        let resume = ChainPosition::after(&c[7]);
        let g = fx
            .store
            .declare_gap(&spoke(), &resume, "spoke lost its disk", at(70_000))
            .expect("declares");
        assert_eq!(
            (g.first_missing, g.last_missing, g.missing, g.resume_seq),
            (6, 8, 3, 9)
        );
        assert_eq!(fx.store.position(&spoke()).expect("pos"), resume);
        match fx.store.declare_gap(&spoke(), &resume, "again", at(70_001)) {
            Err(EvidenceStoreError::GapNotAhead { resume, next, .. }) => {
                assert_eq!((resume.get(), next.get()), (9, 9));
            }
            other => panic!("expected GapNotAhead, got {other:?}"),
        }
        fx.ingest(seqs(&c, 9, 12)).expect("continues after the gap");
        // Records inside the gap arriving later are duplicates (never held).
        let out = fx.ingest(seqs(&c, 6, 12)).expect("replay");
        assert_eq!((out.stored, out.duplicates), (0, 7));

        let st = fx.stats();
        assert_eq!(
            (st.gaps, st.declared_gaps, st.missing, st.records),
            (1, 1, 3, 9)
        );
        assert!(!st.chain_ok);
        assert!(st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("6..=8")));
        let v = fx.verify();
        assert!(!v.ok);
        assert_eq!(v.breaks.len(), 1);
        assert_eq!(
            (v.breaks[0].seq, v.breaks[0].kind.as_str()),
            (6, "declared_gap")
        );
        assert_eq!((v.records_checked, v.to_seq), (9, 12));

        // A gap at the very end (nothing after it yet) verifies to the tip.
        let more = chain(14);
        fx.store
            .declare_gap(
                &spoke(),
                &ChainPosition::after(&more[13]),
                "lost",
                at(80_000),
            )
            .expect("declares");
        let v = fx.verify();
        assert_eq!(v.breaks.len(), 2);
        assert_eq!(v.to_seq, 14);
    }

    fn ingest_in_batches(fx: &Fx, c: &[SealedRecord], size: usize) {
        for b in c.chunks(size) {
            fx.ingest(b).expect("ingests");
        }
    }

    fn batch_rows(fx: &Fx) -> Vec<u64> {
        let name = spoke().to_string();
        let tx = fx.store.db().expect("open").begin_read().expect("read");
        let t = tx.open_table(BATCHES).expect("table");
        t.range((name.as_str(), 0)..=(name.as_str(), u64::MAX))
            .expect("range")
            .map(|r| r.expect("row").0.value().1)
            .collect()
    }

    #[test]
    fn retention_by_bytes_keeps_the_rest_verifiable() {
        let fx = fixture();
        let c = chain(20);
        ingest_in_batches(&fx, &c, 5);
        let total = fx.stats().bytes;
        let limit = total / 2;
        let report = fx
            .store
            .prune_in_chunks(
                &Retention {
                    max_age: None,
                    max_bytes_per_spoke: Some(limit),
                },
                at(0),
                3,
            )
            .expect("prunes");
        let st = fx.stats();
        assert!(st.bytes <= limit && st.bytes + c[0].encode().len() as u64 > limit);
        let pruned = report.records;
        assert_eq!(report.spokes.len(), 1);
        assert_eq!(report.spokes[0].checkpoint_seq, pruned);
        assert_eq!(report.bytes, total - st.bytes);
        assert_eq!((st.checkpoint_seq, st.first_seq_held), (pruned, pruned + 1));
        assert_eq!(st.records, 20 - pruned);
        assert_eq!(st.high_water_mark, 20);
        // Batch rows wholly pruned are gone, the others stay.
        let rows = batch_rows(&fx);
        let gone = pruned / 5;
        assert_eq!(report.batches, gone);
        assert_eq!(rows.first().copied(), Some(gone * 5 + 1));
        let v = fx.verify();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.from_seq, v.to_seq), (pruned + 1, 20));
        assert_eq!(fx.all(), c[pruned as usize..]);

        // Replays of pruned records are duplicates; the chain goes on.
        let out = fx.ingest(seqs(&c, 1, 5)).expect("replay");
        assert_eq!(out.duplicates, 5);
        let more = chain(22);
        fx.ingest(seqs(&more, 21, 22)).expect("ingests");
        assert!(fx.verify().ok);

        // Everything can go; verify starts and ends at the tip.
        let report = fx
            .store
            .prune(
                &Retention {
                    max_age: None,
                    max_bytes_per_spoke: Some(0),
                },
                at(0),
            )
            .expect("prunes");
        assert_eq!(report.records, 22 - pruned);
        let st = fx.stats();
        assert_eq!(
            (st.records, st.bytes, st.checkpoint_seq, st.first_seq_held),
            (0, 0, 22, 0)
        );
        assert!(batch_rows(&fx).is_empty());
        let v = fx.verify();
        assert!(v.ok, "{v:?}");
        assert!(st.chain_ok);
    }

    #[test]
    fn retention_by_age_and_across_a_gap() {
        let fx = fixture();
        let c = chain(12);
        fx.ingest(seqs(&c, 1, 5)).expect("ingests");
        fx.store
            .declare_gap(&spoke(), &ChainPosition::after(&c[7]), "lost", at(9_000))
            .expect("declares");
        fx.ingest(seqs(&c, 9, 12)).expect("ingests");
        // Record i is at i s; at 20 s, older than 14.5 s means 1..=5.
        let policy = Retention {
            max_age: Some(Duration::from_millis(14_500)),
            max_bytes_per_spoke: None,
        };
        let report = fx.store.prune(&policy, at(20_000)).expect("prunes");
        assert_eq!(report.records, 5);
        assert!(report.spokes[0].breaks.is_empty());
        let st = fx.stats();
        assert_eq!((st.checkpoint_seq, st.first_seq_held), (5, 9));
        let v = fx.verify();
        assert_eq!(
            v.breaks.len(),
            1,
            "the gap is still ahead of the checkpoint"
        );
        assert_eq!(v.breaks[0].seq, 6);
        assert!(fx
            .store
            .prune(&policy, at(20_000))
            .expect("prunes")
            .spokes
            .is_empty());

        // Pruning past the gap takes the gap row; the flag stays.
        let report = fx.store.prune(&policy, at(24_000)).expect("prunes");
        assert_eq!(report.records, 1);
        let st = fx.stats();
        assert_eq!(st.checkpoint_seq, 9);
        let v = fx.verify();
        assert!(v.ok, "{v:?}");
        assert!(!st.chain_ok);
        assert_eq!(st.declared_gaps, 1);
    }

    #[test]
    fn retention_past_a_damaged_record_flags_it() {
        let fx = fixture();
        let c = chain(6);
        fx.ingest(&c).expect("ingests");
        fx.tamper(2, Some(&with_service(c[1].clone(), "evil").encode()));
        let policy = Retention {
            max_age: Some(Duration::from_millis(3_500)),
            max_bytes_per_spoke: None,
        };
        let report = fx.store.prune(&policy, at(6_000)).expect("prunes");
        assert_eq!(report.records, 2);
        assert_eq!(report.spokes[0].breaks.len(), 1);
        assert_eq!(report.spokes[0].breaks[0].seq, 2);
        let st = fx.stats();
        assert!(!st.chain_ok);
        assert_eq!(st.chain_breaks, 1);
        assert!(
            fx.verify().ok,
            "the rest still verifies from the checkpoint"
        );
    }

    /// A request record of `service` in `mode` with the given outcome.
    #[allow(clippy::too_many_arguments)] // reason: a table of test cases
    fn req(
        i: u64,
        service: &str,
        mode: Mode,
        status_code: Option<u16>,
        status: StatusCode,
        duration_us: u64,
        denied: bool,
        drill: bool,
    ) -> RecordBody {
        let mut body = samples::request(i, at(i));
        if let RecordBody::Request(r) = &mut body {
            r.service_name = service.into();
            r.mode = mode;
            r.telemetry.status_code = status_code;
            r.telemetry.status.code = status;
            r.telemetry.duration_us = duration_us;
            if denied {
                if let Some(p) = &mut r.policy_evaluation {
                    p.final_decision = Decision::Deny;
                }
                if let Some(x) = &mut r.reliability {
                    x.circuit_breaker.state = BreakerState::Open;
                }
                if let Some(x) = &mut r.rate_limit_check {
                    x.decision = RateDecision::Limited;
                }
            }
            if drill {
                r.drill = Some(DrillMarker {
                    run: "d".into(),
                    index: i,
                });
            }
        }
        body
    }

    #[test]
    fn aggregates_count_requests_errors_denials_and_latency() {
        use Mode::*;
        let fx = fixture();
        let bodies = [
            req(1, "a", Target, Some(200), StatusCode::Ok, 400, false, false),
            req(
                2,
                "a",
                Target,
                Some(503),
                StatusCode::Ok,
                1_200,
                false,
                false,
            ),
            req(
                3,
                "a",
                Target,
                Some(200),
                StatusCode::Error,
                3_000_000,
                false,
                false,
            ),
            req(4, "a", Target, Some(403), StatusCode::Ok, 600, true, false),
            req(
                5,
                "a",
                Degraded,
                Some(200),
                StatusCode::Ok,
                100,
                false,
                true,
            ),
            req(6, "b", Target, None, StatusCode::Unset, 500, false, false),
        ];
        let mut ch = Chain::genesis(&spoke());
        let mut recs: Vec<SealedRecord> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                ch.append(NewRecord {
                    timestamp: at(i as u64),
                    class: PriorityClass::Request,
                    body: b,
                })
                .expect("appends")
            })
            .collect();
        recs.push(
            ch.append(NewRecord::new(at(9), samples::mode_transition()))
                .expect("appends"),
        );
        fx.ingest(&recs[..3]).expect("ingests");
        fx.ingest(&recs[2..]).expect("ingests"); // overlap: counted once
        fx.ingest(&recs).expect("replay");
        // Another spoke whose ID extends this one's must not leak in.
        let other = SpiffeId::parse("spiffe://edge.company.com/store/sf01/node/n10").expect("id");
        let oc = chain_for(&other, 2, u64::MAX);
        fx.ingest_as(&other, &oc).expect("ingests");

        let aggs = fx.store.aggregates(Some(&spoke())).expect("aggregates");
        let keys: Vec<(&str, &str)> = aggs
            .iter()
            .map(|a| (a.service.as_str(), a.mode.as_str()))
            .collect();
        assert_eq!(keys, [("a", "degraded"), ("a", "target"), ("b", "target")]);
        let a = &aggs[1];
        assert_eq!((a.requests, a.errors), (4, 2));
        assert_eq!(a.error_rate, 0.5);
        let counts: Vec<u64> = a.latency_buckets.iter().map(|b| b.count).collect();
        assert_eq!(counts, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(a.latency_buckets[0].le_us, Some(500));
        assert_eq!(a.latency_buckets[12].le_us, None);
        assert_eq!(a.latency_sum_us, 400 + 1_200 + 3_000_000 + 600);
        assert_eq!((a.p50_le_us, a.p99_le_us), (Some(1_000), None));
        assert_eq!(
            (a.authz_denials, a.breaker_open, a.rate_limited, a.drill),
            (1, 1, 1, 0)
        );
        assert_eq!((aggs[0].requests, aggs[0].drill, aggs[0].errors), (1, 1, 0));
        assert_eq!((aggs[2].requests, aggs[2].latency_buckets[0].count), (1, 1));
        assert!(aggs.iter().all(|x| x.spoke == spoke().to_string()));

        let every = fx.store.aggregates(None).expect("aggregates");
        assert_eq!(every.len(), 4);
        assert_eq!(every[3].spoke, other.to_string());
        assert_eq!(every[3].requests, 2);

        let json = serde_json::to_value(a).expect("json");
        for k in [
            "spoke",
            "service",
            "mode",
            "requests",
            "errors",
            "error_rate",
            "latency_buckets",
            "latency_sum_us",
            "authz_denials",
            "breaker_open",
            "rate_limited",
            "drill",
        ] {
            assert!(json.get(k).is_some(), "{k}");
        }
        assert_eq!(
            json["latency_buckets"][12],
            serde_json::json!({"le_us": null, "count": 1})
        );
    }

    #[test]
    fn query_filters_by_seq_time_and_kind() {
        let fx = fixture();
        let mut c = chain(6);
        let mut ch = Chain::resume(ChainPosition::after(&c[5]));
        c.push(
            ch.append(NewRecord::new(at(7_000), samples::config_applied()))
                .expect("appends"),
        );
        fx.ingest(&c).expect("ingests");
        let q = |since: Option<u64>, kind, from_seq, limit| {
            fx.store
                .query(
                    &spoke(),
                    &Query {
                        since: since.map(at),
                        kind,
                        from_seq,
                        limit,
                    },
                )
                .expect("query")
                .iter()
                .map(|r| r.seq.get())
                .collect::<Vec<_>>()
        };
        assert_eq!(q(None, None, None, 100), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(q(Some(3_000), None, None, 2), [3, 4]);
        assert_eq!(q(None, None, Some(5), 100), [5, 6, 7]);
        assert_eq!(q(None, Some(RecordKind::ConfigApplied), None, 100), [7]);
        assert_eq!(q(None, None, None, 0), Vec::<u64>::new());
        let other = SpiffeId::parse("spiffe://edge.company.com/store/sf09/node/n1").expect("id");
        assert!(fx
            .store
            .query(&other, &all_records())
            .expect("query")
            .is_empty());
    }

    #[test]
    fn rejections_show_in_stats_and_json_names_are_stable() {
        let fx = fixture();
        fx.store
            .record_rejection(&spoke(), "bad signature", at(5))
            .expect("records");
        let st = fx.stats();
        assert_eq!(st.rejected_batches, 1);
        assert_eq!(st.last_error.as_deref(), Some("bad signature"));
        assert!(st.chain_ok, "a bad signature says nothing about the chain");
        let all = fx.store.spokes().expect("spokes");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0], st);
        let json = serde_json::to_value(&st).expect("json");
        for k in [
            "spoke",
            "records",
            "bytes",
            "high_water_mark",
            "gaps",
            "chain_ok",
            "duplicates",
            "shed_records",
            "dropped",
            "rejected_batches",
            "last_error",
            "last_ingest",
            "checkpoint_seq",
            "first_seq_held",
        ] {
            assert!(json.get(k).is_some(), "{k}");
        }
        assert_eq!(json["last_error_at"], at(5).to_rfc3339());
        // Unknown spokes: zeros.
        let other = SpiffeId::parse("spiffe://edge.company.com/store/sf09/node/n1").expect("id");
        let z = fx.store.stats(&other).expect("stats");
        assert_eq!(
            (z.records, z.high_water_mark, z.rejected_batches),
            (0, 0, 0)
        );
        assert!(fx.store.verify(&other).expect("verify").ok);
    }

    #[test]
    fn open_refuses_foreign_files_and_other_schemas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spoke_file = dir.path().join("spoke.db");
        {
            let db = Database::create(&spoke_file).expect("creates");
            let tx = db.begin_write().expect("write");
            tx.open_table(TableDefinition::<&str, &[u8]>::new("evidence_meta"))
                .expect("table");
            tx.commit().expect("commit");
        }
        assert!(matches!(
            EvidenceStore::open(&spoke_file),
            Err(EvidenceStoreError::Foreign { .. })
        ));

        let path = dir.path().join("evidence.db");
        let store = EvidenceStore::open(&path).expect("creates");
        {
            let tx = store.db().expect("open").begin_write().expect("write");
            tx.open_table(META)
                .expect("table")
                .insert("schema", b"99".as_slice())
                .expect("insert");
            tx.commit().expect("commit");
        }
        drop(store);
        match EvidenceStore::open(&path) {
            Err(EvidenceStoreError::Schema { found }) => assert_eq!(found, "99"),
            other => panic!("expected Schema, got {other:?}"),
        }
    }

    #[derive(Debug, Clone)]
    struct Plan {
        n: u64,
        /// Batches as (first, last) seqs, inclusive.
        batches: Vec<(u64, u64)>,
        /// Deliveries: indices into `batches`, repeats and any order.
        schedule: Vec<usize>,
    }

    fn plan() -> impl Strategy<Value = Plan> {
        (1u64..30)
            .prop_flat_map(|n| {
                (
                    Just(n),
                    proptest::collection::vec(1..=n, 0..6),
                    proptest::collection::vec((1..=n, 1..=n), 0..3),
                    proptest::collection::vec(any::<prop::sample::Index>(), 1..16),
                )
            })
            .prop_map(|(n, mut cuts, extra, schedule)| {
                cuts.sort_unstable();
                cuts.dedup();
                let mut batches = Vec::new();
                let mut start = 1;
                for c in cuts {
                    if c >= start && c < n {
                        batches.push((start, c));
                        start = c + 1;
                    }
                }
                batches.push((start, n));
                // Overlapping batches, as a spoke resending from an older
                // position would make.
                batches.extend(extra.into_iter().map(|(a, b)| (a.min(b), a.max(b))));
                let schedule = schedule.iter().map(|i| i.index(batches.len())).collect();
                Plan {
                    n,
                    batches,
                    schedule,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Any split into batches, delivered duplicated, reordered and
        /// replayed, with the sender resending from the hub's position on
        /// `Ahead`, ends with the chain stored exactly once.
        #[test]
        fn any_delivery_stores_the_chain_exactly_once(p in plan()) {
            let fx = fixture();
            let c = chain(p.n);
            let range = |a: u64, b: u64| &c[(a - 1) as usize..b as usize];
            let mut sent = 0u64;
            for &i in &p.schedule {
                let (a, b) = p.batches[i];
                match fx.ingest(range(a, b)) {
                    Ok(_) => sent += b - a + 1,
                    Err(IngestError::Ahead { expected, found }) => {
                        prop_assert_eq!(found.get(), a);
                        let out = fx.ingest(range(expected.get(), b)).expect("resend");
                        prop_assert_eq!(out.position.last_seq(), b);
                        sent += b - expected.get() + 1;
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
            let pos = fx.store.position(&spoke()).expect("pos");
            if pos.next_seq.get() <= p.n {
                let out = fx.ingest(range(pos.next_seq.get(), p.n)).expect("rest");
                sent += u64::from(out.stored);
            }
            prop_assert_eq!(fx.all(), c.clone());
            let st = fx.stats();
            prop_assert_eq!(st.records, p.n);
            prop_assert_eq!(st.high_water_mark, p.n);
            prop_assert_eq!(st.records + st.duplicates, sent);
            prop_assert!(st.chain_ok);
            prop_assert_eq!(st.rejected_batches, 0);
            prop_assert!(fx.verify().ok);
        }
    }

    /// Power cuts on a simulated disk that drops every write not yet
    /// synced (`tidemesh_simdisk`): after each, every batch whose ingest
    /// returned (the hub acks on that) is still stored, byte for byte, and
    /// the chain verifies. Seeded: `TIDEMESH_POWERCUT_SEED` replays.
    #[test]
    fn power_cuts_lose_no_ingested_batch() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use tidemesh_simdisk::{CutModel, SimDisk};

        let seed = std::env::var("TIDEMESH_POWERCUT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        eprintln!("hub power-cut seed {seed} (replay: TIDEMESH_POWERCUT_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        let key = svid::generate_key().expect("key");
        let c = chain(20_000);
        let disk = SimDisk::new();
        let mut acked = 0u64;
        let (mut cuts, mut batches) = (0u64, 0u64);
        while cuts < 50 {
            let store = EvidenceStore::open_with_backend({
                let d = disk.clone();
                move || d.backend()
            })
            .unwrap_or_else(|e| panic!("seed {seed}, cut {cuts}: reopen failed: {e}"));
            let pos = store.position(&spoke()).expect("position");
            assert!(
                pos.last_seq() >= acked,
                "seed {seed}, cut {cuts}: ingested up to {acked}, the disk holds up to {}",
                pos.last_seq()
            );
            let report = store.verify(&spoke()).expect("verify");
            assert!(report.ok, "seed {seed}, cut {cuts}: {report:?}");
            let stored = store.query(&spoke(), &all_records()).expect("query");
            assert_eq!(
                stored.as_slice(),
                &c[..stored.len()],
                "seed {seed}, cut {cuts}"
            );
            acked = pos.last_seq();
            if acked as usize >= c.len() {
                break;
            }
            disk.cut_after(rng.random_range(1..=300));
            while !disk.is_off() && (acked as usize) < c.len() {
                let n = rng.random_range(1..=60).min(c.len() - acked as usize);
                let from = acked as usize;
                let b = signed_for(&spoke(), &key, &c[from..from + n]);
                match store.ingest(&b, [7; 32], at(1_000_000)) {
                    Ok(o) => {
                        acked = o.position.last_seq();
                        batches += 1;
                    }
                    Err(_) => break,
                }
            }
            disk.cut_now();
            drop(store);
            let model = if rng.random_bool(0.5) {
                CutModel::Scramble
            } else {
                CutModel::DropUnsynced
            };
            disk.restart(model, &mut rng);
            cuts += 1;
        }
        eprintln!(
            "hub: {cuts} power cuts, {batches} batches ingested, {acked} records stored, none lost"
        );
        assert!(cuts >= 50, "the chain ran out after {cuts} cuts");
    }

    /// A full disk: an ingest fails with [`StorageFault::Full`] and stores
    /// nothing; after [`EvidenceStore::reopen`] reads work again; once
    /// space returns the same records are ingested exactly once and the
    /// chain verifies.
    #[test]
    fn a_full_disk_refuses_then_resumes_without_loss_or_duplicates() {
        use tidemesh_simdisk::SimDisk;

        let key = svid::generate_key().expect("key");
        let c = chain(3_000);
        let disk = SimDisk::new();
        let store = EvidenceStore::open_with_backend({
            let d = disk.clone();
            move || d.backend()
        })
        .expect("opens");
        let b = signed_for(&spoke(), &key, &c[..100]);
        store
            .ingest(&b, [7; 32], at(1_000_000))
            .expect("first batch");
        disk.set_full(Some(disk.len()));
        let mut next = 100usize;
        let mut faults = 0;
        // Ingest until the file has to grow.
        while next < c.len() {
            let b = signed_for(&spoke(), &key, &c[next..next + 100]);
            let mut r = store.ingest(&b, [7; 32], at(1_000_000));
            if matches!(&r, Err(IngestError::Store(e)) if StorageFault::of(e).is_some()) {
                // as the hub's ingest does: an earlier error may surface as
                // `PreviousIo`; reopen and try once more
                store.reopen().expect("reopens");
                r = store.ingest(&b, [7; 32], at(1_000_000));
            }
            match r {
                Ok(o) => next = o.position.last_seq() as usize,
                Err(IngestError::Store(e)) => {
                    // redb reports it as `PreviousIo` (no path to ask the
                    // file system about here): a retryable storage fault
                    assert!(store.fault(&e).is_some(), "{e}");
                    faults += 1;
                    break;
                }
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        assert_eq!(faults, 1, "the disk filled up before the chain ran out");
        store.reopen().expect("reopens on a full disk");
        let pos = store.position(&spoke()).expect("reads after reopening");
        assert_eq!(
            pos.last_seq() as usize,
            next,
            "the failed batch stored nothing"
        );
        // Still full: the same batch fails again, nothing changes.
        let b = signed_for(&spoke(), &key, &c[next..next + 100]);
        assert!(store.ingest(&b, [7; 32], at(1_000_000)).is_err());
        store.reopen().expect("reopens");
        disk.set_full(None);
        while next < c.len() {
            let n = 100.min(c.len() - next);
            let b = signed_for(&spoke(), &key, &c[next..next + n]);
            next = store
                .ingest(&b, [7; 32], at(1_000_000))
                .expect("ingests once space returns")
                .position
                .last_seq() as usize;
        }
        let stats = store.stats(&spoke()).expect("stats");
        assert_eq!(stats.records, c.len() as u64);
        assert_eq!(stats.duplicates, 0);
        assert!(store.verify(&spoke()).expect("verify").ok);
        assert_eq!(store.query(&spoke(), &all_records()).expect("query"), c);
    }
}
