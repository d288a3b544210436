//! The spoke's durable evidence buffer: one redb file, a per-spoke hash
//! chain, group commit, a byte bound with a shedding policy, and the
//! read/ack API the sync session drains it with.
//!
//! Who drives it: every evidence producer on the spoke calls
//! [`EvidenceBuffer::append`] (the data plane will be the main writer); the
//! sync session calls [`EvidenceBuffer::pending`] and
//! [`EvidenceBuffer::ack`]; the CLI and metrics call
//! [`EvidenceBuffer::stats`] and [`EvidenceBuffer::tail`]. What it must not
//! do: decide chain or record rules (those are `tidemesh_evidence`'s), read
//! a clock (timestamps come with the records), or drop anything silently.
//!
//! # Group commit and the power-cut window
//! `append` seals nothing and touches no disk: it encodes the body, takes
//! the next sequence number and queues the record for the writer task. The
//! writer gathers records for up to [`BufferConfig::commit_interval`]
//! (default 20 ms) after the first one arrives (up to
//! [`BufferConfig::max_group`], default 512, per transaction), then seals them
//! into the chain and writes them in **one** redb write transaction
//! (fsync'd; two-phase with quick repair by default). The writer sleeps
//! through the interval and then takes what was queued: one wake-up per
//! commit, not per append. Records queued while a commit runs form the
//! next group. `AppendTicket::committed().await`
//! returns once the record's transaction is durable.
//!
//! **What a power cut can lose:** the records appended but not yet
//! committed, i.e. at most `commit_interval` plus one commit's duration
//! (an fsync: typically 1-20 ms on SSD or eMMC) of appends, and nothing a
//! caller saw `committed()` return for. A SIGKILL loses the same window and
//! nothing else; on restart the buffer re-verifies the tail of the chain
//! and continues from the last committed record, reusing the sequence
//! numbers of the lost, never-committed records (nobody outside the
//! process ever saw them: `pending` only reads committed records).
//!
//! This is shown, not claimed: the `powercut` tests run the buffer on a
//! simulated disk (`tidemesh_simdisk`, opened with [`Storage::Backend`])
//! that drops every write not yet synced at a seeded moment (and may land
//! a torn subset of them), then reopen from what the disk kept and check
//! that every record reported committed is there and the chain verifies.
//! The same check with fsync left out fails, so the test can fail.
//!
//! # Disk full and I/O errors
//! A failed commit does not stop the writer. It keeps the group (and
//! everything appended since) in memory, reopens the database (redb
//! refuses every operation after an I/O error until it is reopened) and
//! retries with backoff ([`BufferConfig::retry_min`] doubling to
//! [`BufferConfig::retry_max`]); `stats` shows `degraded` meanwhile and
//! appends go on. When more than half of [`BufferConfig::max_queued`]
//! records are held, it sheds from memory by the priority rules (debug,
//! then request, never audit), oldest first, and counts each shed record in
//! `lost` (`disk_full` or `write_failed`). Once a commit works again, each
//! shed run is written as one shed record with reason `disk_full` or
//! `write_failed` (the gap in the chain, stated: range, count, class) and
//! the recovery is logged on the `tidemesh::audit` target. Appends refused
//! (backlogged, buffer full of audit records, writer stopped) are counted
//! in `lost` by reason too, so every record is either stored or counted.
//! A record over the size limit is truncated and marked
//! (`tidemesh_evidence::truncate`), counted in `truncated_records`.
//!
//! # Bound and shedding
//! The buffer holds at most [`BufferConfig::capacity_bytes`] of evidence,
//! counted as the encoded record size plus [`RECORD_OVERHEAD`] bytes per
//! record (the file on disk is larger: redb's pages, its B-tree and
//! copy-on-write free space add up to about 2x). The default, 2 GiB, is
//! sized for days of a store's traffic: a full request record (every
//! evidence kind, two SPIFFE IDs, two endpoint candidates) is ~475 bytes,
//! ~490 counted, so 2 GiB holds ~4.4 million requests, 5 days at a
//! sustained 10 requests/s or 10 days at 5/s.
//!
//! When a commit leaves the buffer over capacity, the writer sheds, oldest
//! first, until [`BufferConfig::shed_chunk_bytes`] (default 1% of capacity)
//! are free: first contiguous runs of `debug` records, and only when no
//! `debug` record is left, runs of `request` and `debug` records. Each run
//! is replaced by one shed record (see `tidemesh_evidence::chain`) saying
//! which range was lost, how many records, the highest class and why; a
//! run touching an earlier shed record is merged into it. The chain keeps
//! verifying. `audit` records are never shed: an audit append that would
//! not fit next to the audit records already held gets
//! [`AppendError::BufferFull`] and increments `audit_refused`. Every shed
//! logs on the `tidemesh::audit` target and counts in [`BufferStats`].
//! Nothing is dropped silently.
//!
//! # Sync
//! [`EvidenceBuffer::pending`] reads committed records from a
//! [`ChainPosition`] (the hub's high-water mark and link), cutting a shed
//! record that covers that position with `resume_shed` so the hub never
//! gets a record overlapping what it holds. [`EvidenceBuffer::ack`]
//! deletes records up to the hub's acknowledged sequence number and moves
//! the buffer's base position, from which its own verification starts.
//!
//! # Tables (`evidence.db`)
//! | table | key | value |
//! |-------|-----|-------|
//! | `evidence_meta` | `&str` | `schema`: `b"1"`; `spoke`: the spoke SPIFFE ID (UTF-8); `base`: postcard [`ChainPosition`] after the last acked record (genesis at creation); `stats`: postcard `Stats` (pending records and bytes, audit bytes, shed totals) |
//! | `evidence_records` | `u64` first sequence number the record covers | postcard `SealedRecord` (record format v1, see `tidemesh_evidence`): a shed record is keyed by its range's first number |
//!
//! Every write transaction updates `base` and `stats` with the records, so
//! they are consistent after any crash. Keys are contiguous: the first key
//! is `base.next_seq`, each next key is the previous record's last covered
//! sequence number + 1.

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};
use tidemesh_evidence::record::SeqRange;
use tidemesh_evidence::{
    resume_shed, seal_shed, Chain, ChainError, ChainHash, ChainPosition, ChainVerifier,
    EncodedBody, EvidenceSeq, NewRecord, PriorityClass, RecordError, RecordHeader, RecordKind,
    SealedRecord, ShedError, ShedReason, ShedRecord, ShedRun, UnixMillis, VerifiedChain,
    MAX_RECORD_BYTES,
};
use tidemesh_identity::SpiffeId;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

mod outage;
mod storage;

use outage::{shed_held, Held, LossCounters, LostRun};
pub use outage::{LossReason, LostCounts};
use storage::DbSlot;
pub use storage::{BackendFactory, Storage};

#[cfg(test)]
mod faults;
#[cfg(test)]
mod powercut;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("evidence_meta");
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("evidence_records");

/// Schema of `evidence.db`.
pub const SCHEMA: &str = "1";
/// Bytes counted per record on top of its encoding (key and B-tree entry).
pub const RECORD_OVERHEAD: u64 = 16;
/// Most records the shedder looks at per commit, so one commit never
/// stalls on a full scan; shedding resumes at the next commit.
const SHED_SCAN_BUDGET: usize = 65_536;
/// What a shed record costs, counted (an estimate, used to decide whether
/// a run frees enough).
const SHED_RECORD_COST: u64 = 110 + RECORD_OVERHEAD;

/// Buffer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferConfig {
    /// Upper bound of buffered evidence: encoded records plus
    /// [`RECORD_OVERHEAD`] each. Default 2 GiB (see the module docs).
    pub capacity_bytes: u64,
    /// How long the writer gathers appends after the first before
    /// committing them. Default 20 ms; the power-cut window. Each commit
    /// costs an fsync and redb's page and allocator writes, whatever the
    /// group's size: at 5 ms a spoke answering 1,000 requests/s spent
    /// about a quarter more CPU per request than at 25 ms (data-plane bench).
    pub commit_interval: Duration,
    /// Most appends per transaction. Default 512.
    pub max_group: usize,
    /// When over capacity, shed until this much is free. `None`: 1% of
    /// capacity, at least 64 KiB (capped at half the capacity).
    pub shed_chunk_bytes: Option<u64>,
    /// Records at the tail re-verified on open. Default 4096; 0 skips the
    /// check (e.g. to open a damaged file and run [`EvidenceBuffer::verify`]).
    pub tail_check: usize,
    /// Appends queued but not yet committed before `append` refuses with
    /// [`AppendError::Backlogged`] (memory bound if the disk stalls).
    /// Default 100,000 (~50 MB).
    pub max_queued: u64,
    /// redb page cache. Default 32 MiB.
    pub cache_bytes: usize,
    /// redb quick repair (two-phase commit that also saves the allocator
    /// state), so reopening after a crash is instant instead of a full
    /// scan of a possibly multi-GB file. Default true.
    pub quick_repair: bool,
    /// First wait before retrying a failed commit (disk full, I/O error);
    /// doubles per failure up to `retry_max`. Default 100 ms.
    pub retry_min: Duration,
    /// Longest wait between retries of a failed commit. Default 5 s.
    pub retry_max: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            capacity_bytes: 2 << 30,
            commit_interval: Duration::from_millis(20),
            max_group: 512,
            shed_chunk_bytes: None,
            tail_check: 4096,
            max_queued: 100_000,
            cache_bytes: 32 << 20,
            quick_repair: true,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

impl BufferConfig {
    fn shed_chunk(&self) -> u64 {
        self.shed_chunk_bytes
            .unwrap_or((self.capacity_bytes / 100).max(64 << 10))
            .min(self.capacity_bytes / 2)
    }

    fn validate(&self) -> Result<(), OpenError> {
        let min = 4 * MAX_RECORD_BYTES as u64;
        if self.capacity_bytes < min {
            return Err(OpenError::Config(format!(
                "capacity_bytes {} is below the minimum {min} (four maximum-size records)",
                self.capacity_bytes
            )));
        }
        if self.commit_interval.is_zero() || self.commit_interval > Duration::from_secs(1) {
            return Err(OpenError::Config(format!(
                "commit_interval {:?} must be between 1 ns and 1 s",
                self.commit_interval
            )));
        }
        if self.max_group == 0 {
            return Err(OpenError::Config("max_group must be at least 1".into()));
        }
        if self.max_queued == 0 {
            return Err(OpenError::Config("max_queued must be at least 1".into()));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(OpenError::Config(format!(
                "retry_min {:?} must be above zero and at most retry_max {:?}",
                self.retry_min, self.retry_max
            )));
        }
        Ok(())
    }
}

/// Why the buffer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A setting is out of range.
    #[error("invalid evidence buffer setting: {0}")]
    Config(String),
    /// `open` was called outside a tokio runtime (the writer is a task).
    #[error("the evidence buffer must be opened inside a tokio runtime")]
    NoRuntime,
    /// The evidence thread could not be started.
    #[error("cannot start the evidence thread: {0}")]
    Thread(String),
    /// redb failed (I/O, a lock held by another process, a damaged file).
    #[error("evidence database: {0}")]
    Db(#[from] redb::Error),
    /// The file was written by another schema version.
    #[error("evidence database schema {found:?}, this build reads {SCHEMA}")]
    Schema {
        /// The schema found.
        found: String,
    },
    /// The file belongs to another spoke.
    #[error("evidence database belongs to {found}, not {expected}: wrong data directory?")]
    SpokeMismatch {
        /// The spoke named in the file.
        found: String,
        /// The spoke opening it.
        expected: SpiffeId,
    },
    /// Stored metadata or a record does not decode.
    #[error("evidence database is damaged: {0}")]
    Corrupt(String),
    /// The tail of the chain does not verify.
    #[error("evidence chain tail does not verify ({0}); the file was altered or damaged. Set tail_check = 0 to open it and run verify")]
    ChainBroken(ChainError),
}

/// Why an append was refused or its commit did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// An audit record does not fit: audit records already fill the buffer
    /// (they are never shed). Sync must drain the buffer.
    #[error("evidence buffer full: {held} bytes of audit records held, {needed} more needed, capacity {capacity}; audit records are never shed, so sync must drain the buffer")]
    BufferFull {
        /// Audit bytes held (committed and queued).
        held: u64,
        /// What this record needs.
        needed: u64,
        /// The capacity.
        capacity: u64,
    },
    /// Too many appends are waiting for the disk.
    #[error(
        "evidence writer backlogged: {0} records queued for commit; the disk is not keeping up"
    )]
    Backlogged(u64),
    /// The record itself is invalid (too large, or a shed record).
    #[error("invalid evidence record: {0}")]
    Invalid(#[from] RecordError),
    /// The writer stopped (closed, or a commit failed).
    #[error("evidence writer stopped: {0}")]
    Stopped(String),
}

/// Why a read, ack or verification failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// redb failed.
    #[error("evidence database: {0}")]
    Db(#[from] redb::Error),
    /// A stored value does not decode.
    #[error("evidence database is damaged: {0}")]
    Corrupt(String),
    /// The stored chain does not verify.
    #[error("{0}")]
    ChainBroken(#[from] ChainError),
    /// The sync position's hash is not this buffer's link at that point:
    /// the hub holds a different history for this spoke.
    #[error(
        "sync position {seq} does not match this spoke's chain: the hub holds a different history"
    )]
    PositionMismatch {
        /// The position's next sequence number.
        seq: EvidenceSeq,
    },
    /// The position is before records already acked and deleted.
    #[error("records from {requested} were already acked and deleted (oldest held: {oldest})")]
    Pruned {
        /// What was asked.
        requested: EvidenceSeq,
        /// The first sequence number still held.
        oldest: EvidenceSeq,
    },
    /// The position or ack is beyond the last committed record.
    #[error("{requested} is beyond the last committed evidence record (next is {next})")]
    Ahead {
        /// What was asked.
        requested: EvidenceSeq,
        /// The next sequence number to be committed.
        next: EvidenceSeq,
    },
    /// The writer stopped.
    #[error("evidence writer stopped: {0}")]
    Stopped(String),
    /// The database is being reopened after an I/O error (the writer
    /// retries; see `evidence stats` for `degraded`).
    #[error(
        "evidence database unavailable while it is reopened after an I/O error; retry shortly"
    )]
    Unavailable,
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for BufferError {
            fn from(e: $t) -> Self { BufferError::Db(e.into()) }
        }
        impl From<$t> for OpenError {
            fn from(e: $t) -> Self { OpenError::Db(e.into()) }
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

impl From<BufferError> for OpenError {
    fn from(e: BufferError) -> Self {
        match e {
            BufferError::Db(e) => OpenError::Db(e),
            BufferError::ChainBroken(e) => OpenError::ChainBroken(e),
            other => OpenError::Corrupt(other.to_string()),
        }
    }
}

/// Counters persisted with every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stats {
    pending_records: u64,
    pending_bytes: u64,
    audit_bytes: u64,
    shed_records: u64,
    shed_events: u64,
}

/// What the buffer reports (`tidemesh-spoke evidence stats --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferStats {
    /// Highest sequence number durably committed (0: none yet).
    pub last_committed_seq: u64,
    /// Highest sequence number acked by the hub and deleted (0: none).
    pub last_acked_seq: u64,
    /// Records held (a shed record counts once).
    pub pending_records: u64,
    /// Bytes held, as counted against the capacity.
    pub pending_bytes: u64,
    /// Bytes of audit records (and shed records) held: what can never be shed.
    pub audit_bytes: u64,
    /// The byte bound.
    pub capacity_bytes: u64,
    /// Records dropped and replaced by shed records, over the file's life.
    pub shed_records: u64,
    /// Shed operations (each wrote or extended one shed record).
    pub shed_events: u64,
    /// Audit appends refused with `BufferFull` since open.
    pub audit_refused: u64,
    /// Appends queued and not yet committed.
    pub queued_records: u64,
    /// Write transactions since open (appends / commits = group size).
    pub commits: u64,
    /// Age of the oldest evidence held, seconds before `now` (0: none).
    pub oldest_pending_age_s: u64,
    /// Set when the writer stopped on an error.
    pub failed: Option<String>,
    /// Set while commits fail and the writer retries (disk full, I/O
    /// error): what failed, since when, how often.
    pub degraded: Option<String>,
    /// Commits that failed since open (each retried).
    pub write_failures: u64,
    /// Records the buffer could not keep since open, by reason.
    pub lost: LostCounts,
    /// Records over the size limit stored truncated (marked) since open.
    pub truncated_records: u64,
}

/// What the writer publishes after each commit.
#[derive(Clone, Debug, Default)]
struct Published {
    committed: u64,
    commits: u64,
    acked: u64,
    stats: Stats,
    oldest: Option<UnixMillis>,
    failed: Option<String>,
    degraded: Option<String>,
    write_failures: u64,
}

struct Append {
    seq: EvidenceSeq,
    timestamp: UnixMillis,
    class: PriorityClass,
    body: EncodedBody,
    est_cost: u64,
}

enum Cmd {
    Append(Append),
    Ack {
        up_to: EvidenceSeq,
        done: oneshot::Sender<Result<(), BufferError>>,
    },
    Close(oneshot::Sender<()>),
}

struct SeqState {
    next: EvidenceSeq,
    tx: Option<mpsc::UnboundedSender<Cmd>>,
}

struct Inner {
    db: Arc<DbSlot>,
    spoke: SpiffeId,
    cfg: BufferConfig,
    seq: Mutex<SeqState>,
    published: watch::Receiver<Published>,
    queued_audit_bytes: Arc<AtomicU64>,
    queued_records: Arc<AtomicU64>,
    audit_refused: AtomicU64,
    truncated: AtomicU64,
    lost: Arc<LossCounters>,
    writer: Mutex<Option<JoinHandle<()>>>,
    disk: DiskThread,
}

/// Niceness of the evidence thread: below the request path, so a commit or
/// a batch being read and signed yields the CPU to requests on a small box.
pub const EVIDENCE_NICE: i32 = 10;

/// The thread that does the buffer's disk and signing work (group commits,
/// the sync's reads and batch signatures), one job at a time, at a lower
/// CPU priority ([`EVIDENCE_NICE`], best effort) than the request path.
#[derive(Clone)]
struct DiskThread {
    tx: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl DiskThread {
    fn spawn() -> std::io::Result<DiskThread> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("tidemesh-evidence".into())
            .spawn(move || {
                lower_priority();
                // Ends when every sender (the buffer's clones and its writer
                // task) is gone.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(DiskThread { tx })
    }

    /// Runs `f` on the thread; `Err` if the thread is gone (a job panicked).
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, String> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| "the evidence thread ended".to_owned())?;
        result
            .await
            .map_err(|_| "the evidence thread ended during a job".to_owned())
    }
}

/// Lowers the calling thread's CPU priority to [`EVIDENCE_NICE`] (Linux:
/// niceness is per thread). Best effort: a failure leaves it as it was.
fn lower_priority() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), EVIDENCE_NICE)
    {
        tracing::debug!(error = %e, "cannot lower the evidence thread's priority");
    }
}

/// The spoke's evidence buffer. Cheap to clone; all clones share one
/// writer. The file is released when the last clone is dropped (after
/// [`EvidenceBuffer::close`], or shortly after a drop, once the writer has
/// committed what was queued).
#[derive(Clone)]
pub struct EvidenceBuffer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EvidenceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceBuffer")
            .field("spoke", &self.inner.spoke)
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// A queued append: its sequence number, and a way to wait until it is
/// durable.
#[derive(Debug)]
pub struct AppendTicket {
    seq: EvidenceSeq,
    published: watch::Receiver<Published>,
}

impl AppendTicket {
    /// The record's sequence number.
    pub fn seq(&self) -> EvidenceSeq {
        self.seq
    }

    /// Waits until the record's transaction is durable. If the buffer later
    /// sheds the record, the shed record standing for it is what remains.
    pub async fn committed(mut self) -> Result<EvidenceSeq, AppendError> {
        let seq = self.seq.get();
        let res = self
            .published
            .wait_for(|p| p.committed >= seq || p.failed.is_some())
            .await
            .map(|p| p.clone());
        let p = match res {
            Ok(p) => p,
            Err(_) => self.published.borrow().clone(),
        };
        if p.committed >= seq {
            Ok(self.seq)
        } else {
            Err(AppendError::Stopped(p.failed.unwrap_or_else(|| {
                "closed before the record was committed".into()
            })))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind (a
    // counter and a sender); recovering it is safe.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cost(len: usize) -> u64 {
    len as u64 + RECORD_OVERHEAD
}

fn corrupt(what: impl std::fmt::Display) -> BufferError {
    BufferError::Corrupt(what.to_string())
}

fn decode_meta<T: for<'de> Deserialize<'de>>(name: &str, bytes: &[u8]) -> Result<T, BufferError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(format!("meta {name}: {e}")))
}

fn encode_meta<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of integers and fixed arrays always serialize.
    postcard::to_allocvec(v).expect("postcard serialization of buffer metadata is infallible")
}

/// The last sequence number a stored record covers, and its link.
fn last_and_link(
    bytes: &[u8],
    key: u64,
) -> Result<(RecordHeader, EvidenceSeq, ChainHash), BufferError> {
    let h = RecordHeader::peek(bytes).map_err(|e| corrupt(format!("record {key}: {e}")))?;
    if h.kind == RecordKind::Shed {
        let rec = SealedRecord::decode(bytes).map_err(|e| corrupt(format!("record {key}: {e}")))?;
        Ok((h, rec.last_seq(), rec.link()))
    } else {
        Ok((h, h.seq, h.hash))
    }
}

fn decode_record(key: u64, bytes: &[u8]) -> Result<SealedRecord, BufferError> {
    SealedRecord::decode(bytes).map_err(|e| corrupt(format!("record {key}: {e}")))
}

impl EvidenceBuffer {
    /// Opens (or creates) the buffer at `path` for `spoke`, re-verifies the
    /// chain's tail, and starts the writer task. Must run inside a tokio
    /// runtime; does blocking file I/O (call it before serving, or from
    /// `spawn_blocking`).
    pub fn open(
        path: &Path,
        spoke: &SpiffeId,
        cfg: BufferConfig,
    ) -> Result<EvidenceBuffer, OpenError> {
        Self::open_on(Storage::File(path.to_path_buf()), spoke, cfg)
    }

    /// [`EvidenceBuffer::open`] on any [`Storage`]: a file, or a redb
    /// storage backend (tests run the buffer on a simulated disk with
    /// power cuts and injected I/O errors).
    pub fn open_on(
        storage: Storage,
        spoke: &SpiffeId,
        cfg: BufferConfig,
    ) -> Result<EvidenceBuffer, OpenError> {
        Self::open_with(storage, spoke, cfg, true)
    }

    /// `fsync: false` commits with redb's `Durability::None`: only for the
    /// test that shows the power-cut check fails without fsync.
    fn open_with(
        storage: Storage,
        spoke: &SpiffeId,
        cfg: BufferConfig,
        fsync: bool,
    ) -> Result<EvidenceBuffer, OpenError> {
        cfg.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OpenError::NoRuntime)?;
        let db = storage.open(cfg.cache_bytes)?;

        let mut txn = db.begin_write()?;
        txn.set_quick_repair(cfg.quick_repair);
        let (base, stats) = {
            let mut meta = txn.open_table(META)?;
            let records = txn.open_table(RECORDS)?;
            let schema = meta
                .get("schema")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match schema.as_deref() {
                None => {
                    if records.first()?.is_some() {
                        return Err(OpenError::Corrupt("records without metadata".into()));
                    }
                    let base = ChainPosition::genesis(spoke);
                    meta.insert("schema", SCHEMA.as_bytes())?;
                    meta.insert("spoke", spoke.to_string().as_bytes())?;
                    meta.insert("base", encode_meta(&base).as_slice())?;
                    meta.insert("stats", encode_meta(&Stats::default()).as_slice())?;
                }
                Some(SCHEMA) => {}
                Some(other) => {
                    return Err(OpenError::Schema {
                        found: other.to_owned(),
                    })
                }
            }
            let found = meta
                .get("spoke")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned())
                .unwrap_or_default();
            if found != spoke.to_string() {
                return Err(OpenError::SpokeMismatch {
                    found,
                    expected: spoke.clone(),
                });
            }
            let get = |name: &str| -> Result<Vec<u8>, OpenError> {
                meta.get(name)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| OpenError::Corrupt(format!("meta {name} missing")))
            };
            let base: ChainPosition = decode_meta("base", &get("base")?)?;
            let stats: Stats = decode_meta("stats", &get("stats")?)?;
            (base, stats)
        };
        txn.commit()?;

        let Tail {
            tip,
            oldest,
            newest,
        } = check_tail(&db, &base, cfg.tail_check)?;
        let db = Arc::new(DbSlot::new(storage, cfg.cache_bytes, db));
        let committed = tip.last_seq();
        let published = Published {
            committed,
            commits: 0,
            acked: base.last_seq(),
            stats,
            oldest,
            failed: None,
            degraded: None,
            write_failures: 0,
        };
        let (pub_tx, pub_rx) = watch::channel(published);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued_audit_bytes = Arc::new(AtomicU64::new(0));
        let queued_records = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(LossCounters::default());
        let writer = Writer {
            slot: db.clone(),
            fsync,
            chain: Chain::resume(tip),
            base,
            stats,
            oldest,
            now: newest,
            debug_cursor: base.next_seq.get(),
            request_cursor: base.next_seq.get(),
            commits: 0,
            capacity: cfg.capacity_bytes,
            shed_chunk: cfg.shed_chunk(),
            quick_repair: cfg.quick_repair,
        };
        let disk = DiskThread::spawn().map_err(|e| OpenError::Thread(e.to_string()))?;
        let task = runtime.spawn(run_writer(
            rx,
            writer,
            disk.clone(),
            pub_tx,
            WriterSettings {
                interval: cfg.commit_interval,
                max_group: cfg.max_group,
                retry_min: cfg.retry_min,
                retry_max: cfg.retry_max,
                shed_at: (cfg.max_queued / 2).max(1),
            },
            Shared {
                queued_audit_bytes: queued_audit_bytes.clone(),
                queued_records: queued_records.clone(),
                lost: lost.clone(),
            },
        ));
        Ok(EvidenceBuffer {
            inner: Arc::new(Inner {
                db,
                spoke: spoke.clone(),
                cfg,
                seq: Mutex::new(SeqState {
                    next: tip.next_seq,
                    tx: Some(tx),
                }),
                published: pub_rx,
                queued_audit_bytes,
                queued_records,
                audit_refused: AtomicU64::new(0),
                truncated: AtomicU64::new(0),
                lost,
                writer: Mutex::new(Some(task)),
                disk,
            }),
        })
    }

    /// The spoke this buffer belongs to.
    pub fn spoke(&self) -> &SpiffeId {
        &self.inner.spoke
    }

    /// Queues `record` for the next group commit. Never waits on disk.
    ///
    /// Refuses shed records and oversized records
    /// ([`AppendError::Invalid`]), audit records that do not fit
    /// ([`AppendError::BufferFull`]), and anything once the writer stopped
    /// or too much is queued. Request and debug records are always taken:
    /// when the buffer is full, older ones are shed instead.
    pub fn append(&self, record: NewRecord) -> Result<AppendTicket, AppendError> {
        let inner = &*self.inner;
        let failed = inner.published.borrow().failed.clone();
        if let Some(f) = failed {
            inner.lost.add(LossReason::Stopped, 1);
            return Err(AppendError::Stopped(f));
        }
        let body = self.encode(record.body)?;
        let est_cost = cost(body.sealed_len_bound());
        let queued = inner.queued_records.load(Ordering::Relaxed);
        if queued >= inner.cfg.max_queued {
            inner.lost.add(LossReason::Backlogged, 1);
            return Err(AppendError::Backlogged(queued));
        }
        let audit = record.class == PriorityClass::Audit;
        if audit {
            let held = inner.published.borrow().stats.audit_bytes
                + inner.queued_audit_bytes.load(Ordering::Relaxed);
            if held + est_cost > inner.cfg.capacity_bytes {
                inner.audit_refused.fetch_add(1, Ordering::Relaxed);
                inner.lost.add(LossReason::BufferFull, 1);
                warn!(
                    target: "tidemesh::audit",
                    held,
                    needed = est_cost,
                    capacity = inner.cfg.capacity_bytes,
                    "evidence buffer full: audit record refused"
                );
                return Err(AppendError::BufferFull {
                    held,
                    needed: est_cost,
                    capacity: inner.cfg.capacity_bytes,
                });
            }
        }
        let mut st = lock(&inner.seq);
        let seq = st.next;
        let Some(tx) = &st.tx else {
            inner.lost.add(LossReason::Stopped, 1);
            return Err(AppendError::Stopped("the buffer was closed".into()));
        };
        if audit {
            inner
                .queued_audit_bytes
                .fetch_add(est_cost, Ordering::Relaxed);
        }
        inner.queued_records.fetch_add(1, Ordering::Relaxed);
        let cmd = Cmd::Append(Append {
            seq,
            timestamp: record.timestamp,
            class: record.class,
            body,
            est_cost,
        });
        if tx.send(cmd).is_err() {
            if audit {
                inner
                    .queued_audit_bytes
                    .fetch_sub(est_cost, Ordering::Relaxed);
            }
            inner.queued_records.fetch_sub(1, Ordering::Relaxed);
            inner.lost.add(LossReason::Stopped, 1);
            let why = inner
                .published
                .borrow()
                .failed
                .clone()
                .unwrap_or_else(|| "the writer task ended".into());
            return Err(AppendError::Stopped(why));
        }
        st.next = seq.next();
        drop(st);
        Ok(AppendTicket {
            seq,
            published: inner.published.clone(),
        })
    }

    /// Encodes a body, truncating (and marking) one over the size limit
    /// rather than losing it.
    fn encode(&self, mut body: tidemesh_evidence::RecordBody) -> Result<EncodedBody, AppendError> {
        match EncodedBody::new(&body) {
            Ok(b) => return Ok(b),
            Err(RecordError::TooLarge { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let kind = body.kind().as_str();
        let encoded = body.truncate_to_fit().and_then(|_| EncodedBody::new(&body));
        match encoded {
            Ok(b) => {
                self.inner.truncated.fetch_add(1, Ordering::Relaxed);
                warn!(
                    target: "tidemesh::audit",
                    kind,
                    "evidence record over the size limit stored truncated"
                );
                Ok(b)
            }
            Err(e) => {
                self.inner.lost.add(LossReason::TooLarge, 1);
                warn!(target: "tidemesh::audit", kind, error = %e, "evidence record too large even truncated: lost");
                Err(e.into())
            }
        }
    }

    /// Runs `f` on the buffer's evidence thread (below the request path's
    /// CPU priority, one job at a time with the group commits): for the
    /// sync's reads and batch signatures. `Err` if that thread is gone.
    pub async fn background<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, BufferError> {
        self.inner.disk.run(f).await.map_err(BufferError::Stopped)
    }

    /// Committed records from `from` (the hub's position: next sequence
    /// number and link), oldest first: at most `max_records`, and no more
    /// than `max_bytes` of encoded records (always at least one record if
    /// any is pending). A shed record covering `from` is cut to start
    /// there. Empty when `from` is the tip. Blocking read (short).
    pub fn pending(
        &self,
        from: &ChainPosition,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<SealedRecord>, BufferError> {
        let txn = self.db()?.begin_read()?;
        let meta = txn.open_table(META)?;
        let records = txn.open_table(RECORDS)?;
        let base: ChainPosition = match meta.get("base")? {
            Some(v) => decode_meta("base", v.value())?,
            None => return Err(corrupt("meta base missing")),
        };
        if from.next_seq < base.next_seq {
            return Err(BufferError::Pruned {
                requested: from.next_seq,
                oldest: base.next_seq,
            });
        }
        if max_records == 0 {
            return Ok(Vec::new());
        }
        let mismatch = || BufferError::PositionMismatch { seq: from.next_seq };
        let at = from.next_seq.get();
        let entry = records.range(..=at)?.next_back().transpose()?;
        let Some((k, v)) = entry else {
            // Nothing at or before `from`: the buffer is empty.
            if from.next_seq != base.next_seq {
                return Err(BufferError::Ahead {
                    requested: from.next_seq,
                    next: base.next_seq,
                });
            }
            if from.hash != base.hash {
                return Err(mismatch());
            }
            return Ok(Vec::new());
        };
        let key = k.value();
        let rec = decode_record(key, v.value())?;
        drop((k, v));
        let first = if key == at {
            let prev_link = match records.range(..key)?.next_back().transpose()? {
                Some((pk, pv)) => last_and_link(pv.value(), pk.value())?.2,
                None => base.hash,
            };
            if prev_link != from.hash {
                return Err(mismatch());
            }
            rec
        } else if rec.last_seq() >= from.next_seq {
            resume_shed(&rec, from).map_err(|e: ShedError| corrupt(e))?
        } else {
            let next = rec.last_seq().next();
            if next != from.next_seq {
                return Err(BufferError::Ahead {
                    requested: from.next_seq,
                    next,
                });
            }
            if rec.link() != from.hash {
                return Err(mismatch());
            }
            return Ok(Vec::new());
        };
        let mut bytes = first.encode().len();
        let mut out = vec![first];
        let after = (Bound::Excluded(key), Bound::Unbounded);
        for item in records.range::<u64>(after)? {
            if out.len() >= max_records {
                break;
            }
            let (k, v) = item?;
            let len = v.value().len();
            if bytes + len > max_bytes {
                break;
            }
            bytes += len;
            out.push(decode_record(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Deletes every record the hub acknowledged (all records whose last
    /// covered sequence number is at most `up_to`) in the next group
    /// commit, and moves the base position. Acking what is already acked is
    /// a no-op; acking beyond the last committed record is refused.
    pub async fn ack(&self, up_to: EvidenceSeq) -> Result<(), BufferError> {
        let (done, rx) = oneshot::channel();
        {
            let st = lock(&self.inner.seq);
            let Some(tx) = &st.tx else {
                return Err(BufferError::Stopped("the buffer was closed".into()));
            };
            if tx.send(Cmd::Ack { up_to, done }).is_err() {
                return Err(BufferError::Stopped(self.failure()));
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(BufferError::Stopped(self.failure())))
    }

    /// The open database (`Unavailable` while the writer reopens it).
    fn db(&self) -> Result<Arc<Database>, BufferError> {
        self.inner.db.get().ok_or(BufferError::Unavailable)
    }

    fn failure(&self) -> String {
        self.inner
            .published
            .borrow()
            .failed
            .clone()
            .unwrap_or_else(|| "the writer task ended".into())
    }

    /// Counters and ages, from memory (no disk read). `now` is the caller's
    /// clock, for `oldest_pending_age_s`.
    pub fn stats(&self, now: UnixMillis) -> BufferStats {
        let p = self.inner.published.borrow().clone();
        BufferStats {
            last_committed_seq: p.committed,
            last_acked_seq: p.acked,
            pending_records: p.stats.pending_records,
            pending_bytes: p.stats.pending_bytes,
            audit_bytes: p.stats.audit_bytes,
            capacity_bytes: self.inner.cfg.capacity_bytes,
            shed_records: p.stats.shed_records,
            shed_events: p.stats.shed_events,
            audit_refused: self.inner.audit_refused.load(Ordering::Relaxed),
            queued_records: self.inner.queued_records.load(Ordering::Relaxed),
            commits: p.commits,
            oldest_pending_age_s: p.oldest.map_or(0, |t| now.seconds_since(t)),
            failed: p.failed,
            degraded: p.degraded,
            write_failures: p.write_failures,
            lost: self.inner.lost.snapshot(),
            truncated_records: self.inner.truncated.load(Ordering::Relaxed),
        }
    }

    /// The last `n` committed records, oldest first. Blocking read.
    pub fn tail(&self, n: usize) -> Result<Vec<SealedRecord>, BufferError> {
        let txn = self.db()?.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let mut out = Vec::with_capacity(n.min(4096));
        for item in records.iter()?.rev().take(n) {
            let (k, v) = item?;
            out.push(decode_record(k.value(), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// The position after the last acked record: where the buffer's own
    /// chain starts (genesis until the first ack).
    pub fn base(&self) -> Result<ChainPosition, BufferError> {
        let txn = self.db()?.begin_read()?;
        let meta = txn.open_table(META)?;
        match meta.get("base")? {
            Some(v) => decode_meta("base", v.value()),
            None => Err(corrupt("meta base missing")),
        }
    }

    /// Verifies every held record from the base position, reading each
    /// stored value as is; the error names the first broken sequence
    /// number. Blocking; reads the whole buffer.
    pub fn verify(&self) -> Result<VerifiedChain, BufferError> {
        let txn = self.db()?.begin_read()?;
        let meta = txn.open_table(META)?;
        let records = txn.open_table(RECORDS)?;
        let base: ChainPosition = match meta.get("base")? {
            Some(v) => decode_meta("base", v.value())?,
            None => return Err(corrupt("meta base missing")),
        };
        let mut v = ChainVerifier::new(base);
        for item in records.iter()? {
            let (k, val) = item?;
            let key = EvidenceSeq::new(k.value()).ok_or_else(|| corrupt("record key 0"))?;
            v.push_encoded(key, val.value())?;
        }
        Ok(v.finish())
    }

    /// Resolves when the last committed sequence number exceeds `seen`,
    /// with the new value: how the sync session waits for new evidence.
    pub async fn committed_after(&self, seen: u64) -> Result<u64, BufferError> {
        let mut rx = self.inner.published.clone();
        let res = rx
            .wait_for(|p| p.committed > seen || p.failed.is_some())
            .await
            .map(|p| (p.committed, p.failed.clone()));
        match res {
            Ok((c, _)) if c > seen => Ok(c),
            Ok((_, f)) => Err(BufferError::Stopped(f.unwrap_or_default())),
            Err(_) => Err(BufferError::Stopped(self.failure())),
        }
    }

    /// Commits everything queued so far, stops the writer and waits for it.
    /// Later appends on any clone fail with [`AppendError::Stopped`].
    pub async fn close(self) -> Result<(), BufferError> {
        let (done, rx) = oneshot::channel();
        let sent = {
            let mut st = lock(&self.inner.seq);
            st.tx.take().map(|tx| tx.send(Cmd::Close(done)).is_ok())
        };
        if sent == Some(true) {
            let _ = rx.await;
        }
        let task = lock(&self.inner.writer).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        match self.inner.published.borrow().failed.clone() {
            Some(f) => Err(BufferError::Stopped(f)),
            None => Ok(()),
        }
    }
}

/// What opening learns from the stored records.
struct Tail {
    /// Where the next record goes.
    tip: ChainPosition,
    /// The oldest evidence held.
    oldest: Option<UnixMillis>,
    /// The newest record's timestamp (stamped on shed records until a
    /// newer record arrives).
    newest: UnixMillis,
}

/// Verifies the last `k` records (from the link before them; from the
/// base when the buffer holds no more than `k`) and returns the tip.
fn check_tail(db: &Database, base: &ChainPosition, k: usize) -> Result<Tail, OpenError> {
    let txn = db.begin_read()?;
    let records = txn.open_table(RECORDS)?;
    let oldest = match records.first()? {
        Some((key, v)) => {
            if key.value() != base.next_seq.get() {
                return Err(OpenError::Corrupt(format!(
                    "first record is {} but the base position is {}",
                    key.value(),
                    base.next_seq
                )));
            }
            Some(decode_record(key.value(), v.value())?.oldest_timestamp())
        }
        None => {
            return Ok(Tail {
                tip: *base,
                oldest: None,
                newest: UnixMillis(0),
            })
        }
    };
    if k == 0 {
        let (tip, newest) = match records.last()? {
            Some((key, v)) => {
                let rec = decode_record(key.value(), v.value())?;
                (ChainPosition::after(&rec), rec.timestamp)
            }
            None => (*base, UnixMillis(0)),
        };
        return Ok(Tail {
            tip,
            oldest,
            newest,
        });
    }
    let mut window = Vec::with_capacity(k.min(4096) + 1);
    for item in records.iter()?.rev().take(k.saturating_add(1)) {
        let (key, v) = item?;
        window.push((key.value(), v.value().to_vec()));
    }
    window.reverse();
    let start = if window.len() <= k {
        *base
    } else {
        let (key, bytes) = window.remove(0);
        let (_, last, link) = last_and_link(&bytes, key)?;
        ChainPosition {
            next_seq: last.next(),
            hash: link,
        }
    };
    let mut v = ChainVerifier::new(start);
    let mut newest = UnixMillis(0);
    for (key, bytes) in &window {
        let seq =
            EvidenceSeq::new(*key).ok_or_else(|| OpenError::Corrupt("record key 0".into()))?;
        newest = v
            .push_encoded(seq, bytes)
            .map_err(OpenError::ChainBroken)?
            .timestamp;
    }
    Ok(Tail {
        tip: *v.position(),
        oldest,
        newest,
    })
}

/// Result of a run search.
enum Found {
    Run(RunAcc),
    /// No sheddable record left at this level.
    End,
    /// The scan budget ran out; resume at this key.
    OutOfBudget(u64),
}

/// A run being collected: keys `first_key..=last_key`, all removed and
/// replaced by one shed record.
struct RunAcc {
    run: ShedRun,
    first_key: u64,
    last_key: u64,
    entries: u64,
    removed_cost: u64,
    removed_audit_cost: u64,
}

impl RunAcc {
    fn new() -> RunAcc {
        RunAcc {
            run: ShedRun::new(),
            first_key: 0,
            last_key: 0,
            entries: 0,
            removed_cost: 0,
            removed_audit_cost: 0,
        }
    }

    fn take_key(&mut self, key: u64, c: u64, audit: bool) {
        if self.entries == 0 {
            self.first_key = key;
        }
        self.last_key = key;
        self.entries += 1;
        self.removed_cost += c;
        if audit {
            self.removed_audit_cost += c;
        }
    }

    fn absorb(&mut self, key: u64, rec: &SealedRecord, c: u64) -> Result<(), BufferError> {
        let shed = rec
            .as_shed()
            .ok_or_else(|| corrupt(format!("record {key} is not a shed record")))?;
        self.run.absorb(shed).map_err(corrupt)?;
        self.take_key(key, c, rec.class == PriorityClass::Audit);
        Ok(())
    }

    fn freed(&self) -> u64 {
        self.removed_cost.saturating_sub(SHED_RECORD_COST)
    }
}

/// The writer task's state; moved to the evidence thread for each commit.
struct Writer {
    slot: Arc<DbSlot>,
    /// false only in the test showing the power-cut check needs fsync.
    fsync: bool,
    chain: Chain,
    base: ChainPosition,
    stats: Stats,
    oldest: Option<UnixMillis>,
    /// The latest record timestamp seen: the time stamped on shed records.
    now: UnixMillis,
    /// No unshed debug record below this key.
    debug_cursor: u64,
    /// No unshed debug or request record below this key.
    request_cursor: u64,
    /// Transactions committed since open.
    commits: u64,
    capacity: u64,
    shed_chunk: u64,
    quick_repair: bool,
}

/// The writer's in-memory state as of the last commit, restored when a
/// transaction fails (so memory never runs ahead of the disk).
struct Mark {
    chain: Chain,
    base: ChainPosition,
    stats: Stats,
    oldest: Option<UnixMillis>,
    now: UnixMillis,
    debug_cursor: u64,
    request_cursor: u64,
}

impl Writer {
    fn publish(&self) -> Published {
        Published {
            committed: self.chain.position().last_seq(),
            commits: self.commits,
            acked: self.base.last_seq(),
            stats: self.stats,
            oldest: self.oldest,
            failed: None,
            degraded: None,
            write_failures: 0,
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            chain: self.chain.clone(),
            base: self.base,
            stats: self.stats,
            oldest: self.oldest,
            now: self.now,
            debug_cursor: self.debug_cursor,
            request_cursor: self.request_cursor,
        }
    }

    fn restore(&mut self, m: Mark) {
        self.chain = m.chain;
        self.base = m.base;
        self.stats = m.stats;
        self.oldest = m.oldest;
        self.now = m.now;
        self.debug_cursor = m.debug_cursor;
        self.request_cursor = m.request_cursor;
    }

    /// One write transaction: the group's held entries (records, and runs
    /// shed from memory while commits failed), then the acks, each with
    /// its answer. On error the in-memory state is as before.
    fn commit(
        &mut self,
        group: &[Held],
        acks: &[EvidenceSeq],
    ) -> Result<Vec<Result<(), BufferError>>, BufferError> {
        let mark = self.mark();
        let res = self.commit_in(group, acks);
        if res.is_err() {
            self.restore(mark);
        }
        res
    }

    fn commit_in(
        &mut self,
        group: &[Held],
        acks: &[EvidenceSeq],
    ) -> Result<Vec<Result<(), BufferError>>, BufferError> {
        let db = self.slot.get().ok_or(BufferError::Unavailable)?;
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(self.quick_repair);
        if !self.fsync {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| BufferError::Stopped(e.to_string()))?;
        }
        let mut replies = Vec::with_capacity(acks.len());
        {
            let mut records = txn.open_table(RECORDS)?;
            for h in group {
                match h {
                    Held::Rec(a) => self.insert(&mut records, a)?,
                    Held::Lost(l) => self.insert_lost(&mut records, l)?,
                }
            }
            for up_to in acks {
                replies.push(self.ack_in(&mut records, *up_to)?);
            }
            if self.stats.pending_bytes > self.capacity {
                self.shed(&mut records)?;
            }
            self.oldest = match records.first()? {
                Some((k, v)) => Some(decode_record(k.value(), v.value())?.oldest_timestamp()),
                None => None,
            };
        }
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("base", encode_meta(&self.base).as_slice())?;
            meta.insert("stats", encode_meta(&self.stats).as_slice())?;
        }
        txn.commit()?;
        self.commits += 1;
        Ok(replies)
    }

    /// Reopens the database after an I/O error and takes the writer's state
    /// from what is stored: what it last committed, or, when a commit
    /// reported as failed reached the disk after all, that commit (whose
    /// held entries the task then drops as committed). An error if the
    /// disk holds less than was committed.
    fn reopen(&mut self) -> Result<(), BufferError> {
        let db = self.slot.reopen()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let records = txn.open_table(RECORDS)?;
        let get = |name: &str| -> Result<Vec<u8>, BufferError> {
            meta.get(name)?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| corrupt(format!("meta {name} missing")))
        };
        let base: ChainPosition = decode_meta("base", &get("base")?)?;
        let stats: Stats = decode_meta("stats", &get("stats")?)?;
        let tip = match records.last()? {
            Some((k, v)) => {
                let (_, last, link) = last_and_link(v.value(), k.value())?;
                ChainPosition {
                    next_seq: last.next(),
                    hash: link,
                }
            }
            None => base,
        };
        let pos = *self.chain.position();
        if tip.next_seq < pos.next_seq || (tip.next_seq == pos.next_seq && tip.hash != pos.hash) {
            return Err(corrupt(format!(
                "after reopening, the stored chain ends at {} but {} was committed: the disk lost committed writes",
                tip.last_seq(),
                pos.last_seq()
            )));
        }
        self.oldest = match records.first()? {
            Some((k, v)) => Some(decode_record(k.value(), v.value())?.oldest_timestamp()),
            None => None,
        };
        self.chain = Chain::resume(tip);
        self.base = base;
        self.stats = stats;
        Ok(())
    }

    /// Writes a run shed from memory as one shed record. Its records were
    /// never sealed, so the record after the run links to the link before
    /// it: the shed record's `last_hash`.
    fn insert_lost(
        &mut self,
        records: &mut Table<u64, &[u8]>,
        l: &LostRun,
    ) -> Result<(), BufferError> {
        let pos = *self.chain.position();
        if l.first != pos.next_seq {
            return Err(corrupt(format!(
                "shed run {} reached the writer when {} was next",
                l.first, pos.next_seq
            )));
        }
        let range = SeqRange {
            first: l.first,
            last: l.last,
        };
        self.now = self.now.max(l.last_timestamp);
        let rec = seal_shed(
            &pos.hash,
            self.now,
            ShedRecord {
                range,
                count: range.len(),
                class: l.class,
                reason: l.reason.shed_reason(),
                first_timestamp: l.first_timestamp,
                last_timestamp: l.last_timestamp,
                last_hash: pos.hash,
            },
        );
        let bytes = rec.encode();
        records.insert(l.first.get(), bytes.as_slice())?;
        let c = cost(bytes.len());
        let st = &mut self.stats;
        st.pending_records += 1;
        st.pending_bytes += c;
        st.audit_bytes += c;
        self.chain = Chain::resume(ChainPosition {
            next_seq: l.last.next(),
            hash: pos.hash,
        });
        warn!(
            target: "tidemesh::audit",
            first = %l.first,
            last = %l.last,
            count = range.len(),
            reason = l.reason.as_str(),
            "evidence lost while commits failed: shed record written"
        );
        Ok(())
    }

    fn insert(&mut self, records: &mut Table<u64, &[u8]>, a: &Append) -> Result<(), BufferError> {
        let expected = self.chain.position().next_seq;
        if a.seq != expected {
            return Err(corrupt(format!(
                "append {} reached the writer when {expected} was next",
                a.seq
            )));
        }
        let enc = self.chain.append_encoded(a.timestamp, a.class, &a.body);
        records.insert(enc.seq.get(), enc.bytes.as_slice())?;
        let c = cost(enc.bytes.len());
        self.stats.pending_records += 1;
        self.stats.pending_bytes += c;
        if a.class == PriorityClass::Audit {
            self.stats.audit_bytes += c;
        }
        self.now = self.now.max(a.timestamp);
        Ok(())
    }

    /// Deletes records fully covered by `up_to`. The outer `Result` is a
    /// storage failure (fatal); the inner one is this ack's answer.
    fn ack_in(
        &mut self,
        records: &mut Table<u64, &[u8]>,
        up_to: EvidenceSeq,
    ) -> Result<Result<(), BufferError>, BufferError> {
        let next = self.chain.position().next_seq;
        if up_to >= next {
            return Ok(Err(BufferError::Ahead {
                requested: up_to,
                next,
            }));
        }
        let mut cut = None;
        let mut new_base = self.base;
        let (mut n, mut bytes, mut audit) = (0u64, 0u64, 0u64);
        for item in records.range(..=up_to.get())? {
            let (k, v) = item?;
            let (h, last, link) = last_and_link(v.value(), k.value())?;
            if last > up_to {
                break;
            }
            cut = Some(k.value());
            let c = cost(v.value().len());
            n += 1;
            bytes += c;
            if h.class == PriorityClass::Audit {
                audit += c;
            }
            new_base = ChainPosition {
                next_seq: last.next(),
                hash: link,
            };
        }
        if let Some(cut) = cut {
            records.retain_in(..=cut, |_, _| false)?;
            // Saturating: stats from a damaged file must not panic the writer.
            let st = &mut self.stats;
            st.pending_records = st.pending_records.saturating_sub(n);
            st.pending_bytes = st.pending_bytes.saturating_sub(bytes);
            st.audit_bytes = st.audit_bytes.saturating_sub(audit);
            self.base = new_base;
        }
        Ok(Ok(()))
    }

    /// Sheds until `shed_chunk` bytes are free below capacity: debug runs
    /// first, request runs only when no debug record is left.
    fn shed(&mut self, records: &mut Table<u64, &[u8]>) -> Result<(), BufferError> {
        let target = self.capacity.saturating_sub(self.shed_chunk);
        let mut budget = SHED_SCAN_BUDGET;
        for level in [PriorityClass::Debug, PriorityClass::Request] {
            loop {
                if self.stats.pending_bytes <= target {
                    return Ok(());
                }
                let cursor = match level {
                    PriorityClass::Debug => self.debug_cursor,
                    _ => self.request_cursor,
                };
                let from = cursor.max(self.base.next_seq.get());
                let need = self.stats.pending_bytes - target;
                let (next_cursor, done) = match find_run(records, from, level, need, &mut budget)? {
                    Found::Run(run) => {
                        let next = run.last_key.saturating_add(1);
                        self.replace_run(records, run, level)?;
                        (next, false)
                    }
                    // Resume at the next commit; never skip a level.
                    Found::OutOfBudget(key) => (key, true),
                    Found::End => (self.chain.position().next_seq.get(), false),
                };
                match level {
                    PriorityClass::Debug => self.debug_cursor = next_cursor,
                    _ => self.request_cursor = next_cursor,
                }
                if done {
                    return Ok(());
                }
                if next_cursor >= self.chain.position().next_seq.get() {
                    break;
                }
            }
            if level == PriorityClass::Request {
                self.debug_cursor = self.debug_cursor.max(self.request_cursor);
            }
        }
        if self.stats.pending_bytes > self.capacity {
            warn!(
                target: "tidemesh::audit",
                pending_bytes = self.stats.pending_bytes,
                audit_bytes = self.stats.audit_bytes,
                capacity = self.capacity,
                "evidence buffer over capacity with only audit records left"
            );
        }
        Ok(())
    }

    fn replace_run(
        &mut self,
        records: &mut Table<u64, &[u8]>,
        run: RunAcc,
        level: PriorityClass,
    ) -> Result<(), BufferError> {
        let prev = match records.range(..run.first_key)?.next_back().transpose()? {
            Some((k, v)) => last_and_link(v.value(), k.value())?.2,
            None => self.base.hash,
        };
        let Some(sealed) = run.run.seal(&prev, ShedReason::BufferFull, self.now) else {
            return Ok(());
        };
        let bytes = sealed.encode();
        let c = cost(bytes.len());
        if c >= run.removed_cost {
            // Tiny records: a shed record would not be smaller. Keep them.
            return Ok(());
        }
        records.retain_in(run.first_key..=run.last_key, |_, _| false)?;
        records.insert(run.first_key, bytes.as_slice())?;
        let st = &mut self.stats;
        st.pending_records = st.pending_records.saturating_sub(run.entries) + 1;
        st.pending_bytes = st.pending_bytes.saturating_sub(run.removed_cost) + c;
        st.audit_bytes = st.audit_bytes.saturating_sub(run.removed_audit_cost) + c;
        self.stats.shed_records += run.run.dropped();
        self.stats.shed_events += 1;
        let shed = sealed.as_shed();
        warn!(
            target: "tidemesh::audit",
            first = %sealed.seq,
            last = shed.map_or(0, |s| s.range.last.get()),
            dropped = run.run.dropped(),
            level = %level,
            "evidence shed: buffer full"
        );
        Ok(())
    }
}

/// Finds the oldest run at or after `from` that `level` may shed: a
/// maximal sequence of sheddable records and shed records (merged), with
/// at least one sheddable record, stopping once it frees `need` bytes.
fn find_run(
    records: &Table<u64, &[u8]>,
    from: u64,
    level: PriorityClass,
    need: u64,
    budget: &mut usize,
) -> Result<Found, BufferError> {
    let sheddable = |class: PriorityClass| match level {
        PriorityClass::Debug => class == PriorityClass::Debug,
        _ => class != PriorityClass::Audit,
    };
    // A shed record right before the current position, which a run
    // starting here would merge.
    let mut head: Option<(u64, SealedRecord, u64)> = None;
    if let Some((k, v)) = records.range(..from)?.next_back().transpose()? {
        let h = RecordHeader::peek(v.value())
            .map_err(|e| corrupt(format!("record {}: {e}", k.value())))?;
        if h.kind == RecordKind::Shed {
            let rec = decode_record(k.value(), v.value())?;
            if rec
                .as_shed()
                .is_some_and(|s| s.reason == ShedReason::BufferFull)
            {
                head = Some((k.value(), rec, cost(v.value().len())));
            }
        }
    }
    let mut run: Option<RunAcc> = None;
    for item in records.range(from..)? {
        let (k, v) = item?;
        let key = k.value();
        if *budget == 0 {
            return Ok(match run {
                Some(r) => Found::Run(r),
                None => Found::OutOfBudget(key),
            });
        }
        *budget -= 1;
        let bytes = v.value();
        let h = RecordHeader::peek(bytes).map_err(|e| corrupt(format!("record {key}: {e}")))?;
        let c = cost(bytes.len());
        let shed = if h.kind == RecordKind::Shed {
            Some(decode_record(key, bytes)?)
        } else {
            None
        };
        // A shed record of another reason (records lost while commits
        // failed) keeps its reason: it bounds a run like an audit record.
        let mergeable = shed
            .as_ref()
            .and_then(|r| r.as_shed())
            .is_some_and(|s| s.reason == ShedReason::BufferFull);
        if let (Some(rec), true) = (shed.clone(), mergeable) {
            match &mut run {
                Some(r) => r.absorb(key, &rec, c)?,
                None => head = Some((key, rec, c)),
            }
        } else if shed.is_none() && sheddable(h.class) {
            let r = match &mut run {
                Some(r) => r,
                None => {
                    let mut r = RunAcc::new();
                    if let Some((hk, hrec, hc)) = head.take() {
                        r.absorb(hk, &hrec, hc)?;
                    }
                    run.insert(r)
                }
            };
            r.run
                .drop_record(h.seq, h.timestamp, h.class, h.hash)
                .map_err(corrupt)?;
            r.take_key(key, c, false);
            if r.freed() >= need {
                break;
            }
        } else {
            if run.is_some() {
                break;
            }
            head = None;
        }
    }
    Ok(match run {
        Some(r) => Found::Run(r),
        None => Found::End,
    })
}

/// The writer task's settings.
struct WriterSettings {
    interval: Duration,
    max_group: usize,
    retry_min: Duration,
    retry_max: Duration,
    /// While commits fail, shed from memory once more records than this are
    /// held (down to half of it).
    shed_at: u64,
}

/// Counters the writer shares with the buffer's handles.
struct Shared {
    queued_audit_bytes: Arc<AtomicU64>,
    queued_records: Arc<AtomicU64>,
    lost: Arc<LossCounters>,
}

type AckDone = oneshot::Sender<Result<(), BufferError>>;

/// What the writer holds and has been asked for, not yet committed.
#[derive(Default)]
struct Pending {
    held: VecDeque<Held>,
    /// Records (not shed runs) in `held`.
    records: u64,
    acks: Vec<(EvidenceSeq, AckDone)>,
    closing: Option<oneshot::Sender<()>>,
    /// Every sender is gone.
    ended: bool,
}

impl Pending {
    fn take(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Append(a) => {
                self.records += 1;
                self.held.push_back(Held::Rec(a));
            }
            Cmd::Ack { up_to, done } => self.acks.push((up_to, done)),
            Cmd::Close(done) => self.closing = Some(done),
        }
    }

    /// Takes everything queued, without waiting.
    fn drain(&mut self, rx: &mut mpsc::UnboundedReceiver<Cmd>) {
        loop {
            match rx.try_recv() {
                Ok(cmd) => self.take(cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.ended = true;
                    break;
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.closing.is_some() || self.ended
    }

    /// The next group: at most `max` entries from the front.
    fn group(&mut self, max: usize) -> Vec<Held> {
        let n = self.held.len().min(max);
        self.held.drain(..n).collect()
    }
}

/// Records in `group` and their estimated audit bytes.
fn group_counts(group: &[Held]) -> (u64, u64) {
    group.iter().fold((0, 0), |(n, audit), h| match h {
        Held::Rec(a) if a.class == PriorityClass::Audit => (n + 1, audit + a.est_cost),
        Held::Rec(_) => (n + 1, audit),
        Held::Lost(_) => (n, audit),
    })
}

/// A run of failed commits.
struct Outage {
    since: tokio::time::Instant,
    failures: u64,
    backoff: Duration,
    retry_at: tokio::time::Instant,
    reason: LossReason,
    /// `lost` total when it started, for the recovery log.
    lost_before: u64,
}

/// Whether retrying (after reopening the database) may help: storage
/// errors, yes; a damaged file or a broken invariant, no.
fn retryable(e: &BufferError) -> bool {
    matches!(e, BufferError::Db(_) | BufferError::Unavailable)
}

/// `DiskFull` for "no space left on device" (or quota), else `WriteFailed`.
fn loss_reason(e: &BufferError) -> LossReason {
    if let BufferError::Db(redb::Error::Io(io)) = e {
        let full = matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
        if full {
            return LossReason::DiskFull;
        }
    }
    LossReason::WriteFailed
}

/// One commit attempt on the evidence thread: reopen first after a
/// failure, skip what a commit reported as failed stored after all.
/// Returns how many leading entries were found already stored.
fn attempt(
    writer: &mut Writer,
    group: &[Held],
    acks: &[EvidenceSeq],
    reopen: bool,
) -> (usize, Result<Vec<Result<(), BufferError>>, BufferError>) {
    if reopen {
        if let Err(e) = writer.reopen() {
            return (0, Err(e));
        }
    }
    let next = writer.chain.position().next_seq;
    let skip = group.iter().take_while(|h| h.last() < next).count();
    let rest = group.get(skip..).unwrap_or(&[]);
    (skip, writer.commit(rest, acks))
}

/// The writer task: gathers appends into groups (for `interval`, at most
/// `max_group`) and commits each group in one transaction on the evidence
/// thread. A failed commit keeps the group and retries with backoff,
/// shedding from memory if too much piles up (see "Disk full and I/O
/// errors" in the module docs).
async fn run_writer(
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    writer: Writer,
    disk: DiskThread,
    published: watch::Sender<Published>,
    set: WriterSettings,
    shared: Shared,
) {
    let mut slot = Some(writer);
    let mut p = Pending::default();
    let mut outage: Option<Outage> = None;
    // The last sequence number a failed transaction carried.
    let mut attempted = 0u64;
    let mut write_failures = 0u64;
    // Shed when more records than this are held (raised while nothing
    // more can be shed, so a queue of audit records is not rescanned on
    // every append).
    let mut shed_trigger = set.shed_at;
    loop {
        if p.held.is_empty() && p.acks.is_empty() && p.stopping() {
            break;
        }
        match &outage {
            None if p.held.is_empty() && p.acks.is_empty() => {
                let Some(first) = rx.recv().await else {
                    break;
                };
                p.take(first);
                let deadline = tokio::time::Instant::now() + set.interval;
                // The group is what arrives until the deadline (at most
                // max_group appends). The writer sleeps through the
                // interval and then takes what was queued, rather than
                // waking for every append: on a busy request path that is
                // one wake-up per commit, not per request.
                loop {
                    p.drain(&mut rx);
                    if p.stopping()
                        || p.held.len() >= set.max_group
                        || tokio::time::Instant::now() >= deadline
                    {
                        break;
                    }
                    tokio::time::sleep_until(deadline).await;
                }
            }
            None => p.drain(&mut rx),
            Some(o) => {
                // Wait to retry, taking in appends, shedding if too many.
                let retry_at = o.retry_at;
                let reason = o.reason;
                while !p.stopping() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(retry_at) => break,
                        cmd = rx.recv() => match cmd {
                            Some(cmd) => {
                                p.take(cmd);
                                p.drain(&mut rx);
                            }
                            None => p.ended = true,
                        },
                    }
                    if p.records > shed_trigger {
                        let n =
                            shed_held(&mut p.held, p.records - set.shed_at / 2, attempted, reason);
                        p.records -= n;
                        shed_trigger = set.shed_at.max(p.records + set.shed_at / 2);
                        shared.queued_records.fetch_sub(n, Ordering::Relaxed);
                        shared.lost.add(reason, n);
                        if n > 0 {
                            warn!(
                                target: "tidemesh::audit",
                                shed = n,
                                held = p.records,
                                reason = reason.as_str(),
                                "evidence shed from memory while commits fail"
                            );
                        }
                    }
                }
            }
        }
        let group = p.group(set.max_group);
        let acks: Vec<EvidenceSeq> = p.acks.iter().map(|(s, _)| *s).collect();
        let Some(mut writer) = slot.take() else {
            break;
        };
        let reopen = outage.is_some();
        let joined = disk
            .run(move || {
                let (skip, res) = attempt(&mut writer, &group, &acks, reopen);
                (writer, group, skip, res)
            })
            .await;
        let (w, group, res) = match joined {
            Ok((w, group, _skip, res)) => (w, group, res),
            Err(e) => {
                // The evidence thread is gone: nothing more can be stored.
                stop(
                    &mut p,
                    &published,
                    &shared,
                    format!("commit task failed: {e}"),
                );
                break;
            }
        };
        match res {
            Ok(replies) => {
                let (n, audit) = group_counts(&group);
                p.records -= n;
                // Before publishing, so stats never show a committed record
                // as still queued.
                shared.queued_records.fetch_sub(n, Ordering::Relaxed);
                let mut pb = w.publish();
                pb.write_failures = write_failures;
                published.send_replace(pb);
                // After publishing: the group's audit bytes are briefly
                // counted both as held and as queued, never as neither.
                shared
                    .queued_audit_bytes
                    .fetch_sub(audit, Ordering::Relaxed);
                for ((_, done), r) in p.acks.drain(..).zip(replies) {
                    let _ = done.send(r);
                }
                shed_trigger = set.shed_at;
                if let Some(o) = outage.take() {
                    let lost = shared.lost.snapshot().total().saturating_sub(o.lost_before);
                    warn!(
                        target: "tidemesh::audit",
                        failures = o.failures,
                        down_ms = o.since.elapsed().as_millis() as u64,
                        lost,
                        "evidence commits work again"
                    );
                }
                slot = Some(w);
            }
            Err(e) => {
                if let Some(last) = group.last() {
                    attempted = attempted.max(last.last().get());
                }
                for h in group.into_iter().rev() {
                    p.held.push_front(h);
                }
                slot = Some(w);
                if !retryable(&e) {
                    stop(&mut p, &published, &shared, e.to_string());
                    break;
                }
                write_failures += 1;
                let reason = loss_reason(&e);
                let now = tokio::time::Instant::now();
                let o = outage.get_or_insert_with(|| Outage {
                    since: now,
                    failures: 0,
                    backoff: Duration::ZERO,
                    retry_at: now,
                    reason,
                    lost_before: shared.lost.snapshot().total(),
                });
                o.failures += 1;
                o.reason = reason;
                o.backoff = if o.backoff.is_zero() {
                    set.retry_min
                } else {
                    (o.backoff * 2).min(set.retry_max)
                };
                o.retry_at = now + o.backoff;
                if o.failures == 1 {
                    error!(target: "tidemesh::audit", error = %e, reason = reason.as_str(), "evidence commit failed; holding records in memory and retrying");
                } else if o.failures.is_multiple_of(20) {
                    warn!(target: "tidemesh::audit", error = %e, failures = o.failures, held = p.records, "evidence commits still failing");
                } else {
                    debug!(error = %e, failures = o.failures, "evidence commit retry failed");
                }
                let degraded = format!(
                    "evidence commits failing for {} s ({} attempts, {} records held in memory): {e}",
                    o.since.elapsed().as_secs(),
                    o.failures,
                    p.records
                );
                published.send_modify(|pb| {
                    pb.degraded = Some(degraded);
                    pb.write_failures = write_failures;
                });
                if p.stopping() {
                    // Closing (or dropped): that was the last attempt.
                    stop(
                        &mut p,
                        &published,
                        &shared,
                        format!("closed while evidence commits were failing: {e}"),
                    );
                    break;
                }
            }
        }
    }
    if let Some(done) = p.closing.take() {
        let _ = done.send(());
    }
}

/// The writer stops for good: everything still held is counted lost,
/// waiting acks fail, and appends are refused from now on.
fn stop(p: &mut Pending, published: &watch::Sender<Published>, shared: &Shared, why: String) {
    let group: Vec<Held> = p.held.drain(..).collect();
    let (n, audit) = group_counts(&group);
    p.records = 0;
    shared.queued_records.fetch_sub(n, Ordering::Relaxed);
    shared
        .queued_audit_bytes
        .fetch_sub(audit, Ordering::Relaxed);
    shared.lost.add(LossReason::Stopped, n);
    error!(target: "tidemesh::audit", error = %why, lost = n, "evidence writer stopped; the buffer takes no more records");
    for (_, done) in p.acks.drain(..) {
        let _ = done.send(Err(BufferError::Stopped(why.clone())));
    }
    published.send_modify(|pb| pb.failed = Some(why));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemesh_evidence::{samples, verify_chain, RecordBody};

    fn spoke() -> SpiffeId {
        SpiffeId::parse("spiffe://edge.example/store/sf01/node/n1").expect("valid id")
    }

    fn t(i: u64) -> UnixMillis {
        UnixMillis(1_705_314_600_000 + i)
    }

    fn request(i: u64, class: PriorityClass) -> NewRecord {
        NewRecord {
            timestamp: t(i),
            class,
            body: samples::request(i, t(i)),
        }
    }

    fn audit(i: u64) -> NewRecord {
        NewRecord::new(t(i), samples::mode_transition())
    }

    fn small(capacity: u64) -> BufferConfig {
        BufferConfig {
            capacity_bytes: capacity,
            shed_chunk_bytes: Some(4096),
            cache_bytes: 1 << 20,
            ..BufferConfig::default()
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("evidence.db");
        Fixture { _dir: dir, path }
    }

    fn open(f: &Fixture, cfg: BufferConfig) -> EvidenceBuffer {
        EvidenceBuffer::open(&f.path, &spoke(), cfg).expect("opens")
    }

    fn all(b: &EvidenceBuffer) -> Vec<SealedRecord> {
        b.pending(&b.base().expect("base"), usize::MAX, usize::MAX)
            .expect("pending")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_batches_many_appends_per_transaction() {
        let f = fixture();
        let cfg = BufferConfig {
            commit_interval: Duration::from_millis(20),
            ..small(64 << 20)
        };
        let b = open(&f, cfg);
        // Appends never wait on disk: 3000 are queued at once.
        let tickets: Vec<_> = (0..3000)
            .map(|i| {
                b.append(request(i, PriorityClass::Request))
                    .expect("appends")
            })
            .collect();
        assert_eq!(tickets[0].seq(), EvidenceSeq::FIRST);
        let last = tickets.into_iter().last().expect("tickets");
        assert_eq!(last.committed().await.expect("committed").get(), 3000);
        let st = b.stats(t(0));
        assert_eq!((st.last_committed_seq, st.pending_records), (3000, 3000));
        assert_eq!(st.queued_records, 0);
        // At most max_group (512) per transaction, and many per transaction:
        // 3000 queued appends take 6 commits, a few more if the writer got
        // to the channel before all were queued (or the test thread was
        // descheduled for a whole interval on a busy machine).
        assert!(st.commits >= 6, "{} commits", st.commits);
        assert!(3000 / st.commits >= 100, "{} commits", st.commits);
        assert_eq!(b.verify().expect("verifies").records(), 3000);

        // Trickled appends inside one interval share a commit too.
        let before = b.stats(t(0)).commits;
        let tickets: Vec<_> = (0..20)
            .map(|i| {
                b.append(request(i, PriorityClass::Request))
                    .expect("appends")
            })
            .collect();
        for tk in tickets {
            tk.committed().await.expect("durable");
        }
        assert!(b.stats(t(0)).commits - before <= 3);
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_records_survive_close_and_reopen_continues_the_sequence() {
        let f = fixture();
        let b = open(&f, small(64 << 20));
        let mut last = None;
        for i in 0..10 {
            last = Some(
                b.append(request(i, PriorityClass::Request))
                    .expect("appends"),
            );
        }
        last.expect("ticket").committed().await.expect("durable");
        b.append(audit(10)).expect("appends");
        b.close().await.expect("closes");

        let b = open(&f, small(64 << 20));
        assert_eq!(b.stats(t(0)).last_committed_seq, 11);
        let next = b
            .append(request(11, PriorityClass::Request))
            .expect("appends");
        assert_eq!(next.seq().get(), 12);
        next.committed().await.expect("durable");
        let recs = all(&b);
        assert_eq!(recs.len(), 12);
        verify_chain(&ChainPosition::genesis(&spoke()), &recs).expect("verifies");
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_after_drop_continues_the_sequence() {
        let f = fixture();
        let b = open(&f, small(64 << 20));
        let tk = b
            .append(request(0, PriorityClass::Request))
            .expect("appends");
        tk.committed().await.expect("durable");
        b.append(request(1, PriorityClass::Request))
            .expect("appends");
        drop(b);
        // The writer commits what was queued, then releases the file.
        let b = loop {
            match EvidenceBuffer::open(&f.path, &spoke(), small(64 << 20)) {
                Ok(b) => break b,
                Err(OpenError::Db(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(b.stats(t(0)).last_committed_seq, 2);
        assert_eq!(b.append(audit(2)).expect("appends").seq().get(), 3);
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durability_after_committed_is_independent_of_the_process() {
        // committed() means on disk: a second, read-only look at the file
        // after close sees exactly the committed records.
        let f = fixture();
        let b = open(&f, small(64 << 20));
        let tk = b
            .append(request(0, PriorityClass::Request))
            .expect("appends");
        let seq = tk.committed().await.expect("durable");
        let in_file = {
            let txn = b.inner.db.get().expect("open").begin_read().expect("read");
            let t = txn.open_table(RECORDS).expect("table");
            t.get(seq.get()).expect("get").is_some()
        };
        assert!(in_file);
        b.close().await.expect("closes");
        let db = redb::Database::open(&f.path).expect("reopens raw");
        let txn = db.begin_read().expect("read");
        let t = txn.open_table(RECORDS).expect("table");
        let v = t.get(1).expect("get").expect("present");
        assert_eq!(
            SealedRecord::decode(v.value()).expect("decodes").seq,
            EvidenceSeq::FIRST
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sheds_debug_first_then_request_and_the_chain_verifies() {
        let f = fixture();
        // Room for roughly 600 records of ~490 bytes.
        let cap = 300_000;
        let b = open(&f, small(cap));
        // 200 requests interleaved with 200 debug records.
        let mut last = None;
        for i in 0..400 {
            let class = if i % 2 == 0 {
                PriorityClass::Request
            } else {
                PriorityClass::Debug
            };
            last = Some(b.append(request(i, class)).expect("appends"));
        }
        last.take().expect("t").committed().await.expect("durable");
        assert_eq!(b.stats(t(0)).shed_records, 0);
        // Push it over: more requests.
        for i in 400..800 {
            last = Some(
                b.append(request(i, PriorityClass::Request))
                    .expect("appends"),
            );
        }
        last.take().expect("t").committed().await.expect("durable");
        let st = b.stats(t(0));
        assert!(st.pending_bytes <= cap, "{st:?}");
        assert!(st.shed_records > 0, "{st:?}");
        let recs = all(&b);
        verify_chain(&ChainPosition::genesis(&spoke()), &recs).expect("chain verifies");
        b.verify().expect("stored chain verifies");
        // Every debug record went before any request record.
        let shed: Vec<_> = recs.iter().filter_map(|r| r.as_shed()).collect();
        let debug_left = recs
            .iter()
            .filter(|r| r.class == PriorityClass::Debug)
            .count();
        let requests_shed = shed.iter().any(|s| s.class == PriorityClass::Request);
        if requests_shed {
            assert_eq!(debug_left, 0, "requests shed while debug records remain");
        }
        // Covered sequence numbers are all accounted for.
        let covered: u64 = recs
            .iter()
            .map(|r| r.last_seq().get() - r.seq.get() + 1)
            .sum();
        assert_eq!(covered, 800);
        let dropped: u64 = shed.iter().map(|s| s.count).sum();
        assert_eq!(dropped, st.shed_records);
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn debug_only_shedding_leaves_requests() {
        let f = fixture();
        let cap = 300_000;
        let b = open(&f, small(cap));
        let mut last = None;
        // 300 requests, then many debug records: only debug gets shed.
        for i in 0..300 {
            last = Some(
                b.append(request(i, PriorityClass::Request))
                    .expect("appends"),
            );
        }
        for i in 300..1000 {
            last = Some(b.append(request(i, PriorityClass::Debug)).expect("appends"));
        }
        last.take().expect("t").committed().await.expect("durable");
        let recs = all(&b);
        let requests = recs
            .iter()
            .filter(|r| r.class == PriorityClass::Request)
            .count();
        assert_eq!(requests, 300);
        assert!(recs
            .iter()
            .filter_map(|r| r.as_shed())
            .all(|s| s.class == PriorityClass::Debug));
        // Adjacent runs merged: the debug tail collapsed into few shed records.
        assert!(recs.iter().filter(|r| r.as_shed().is_some()).count() <= 3);
        verify_chain(&ChainPosition::genesis(&spoke()), &recs).expect("verifies");
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn audit_records_are_never_shed_and_refused_when_full() {
        let f = fixture();
        let cap = 4 * MAX_RECORD_BYTES as u64;
        let b = open(&f, small(cap));
        let mut audits = Vec::new();
        let mut refused = 0;
        for i in 0..2000 {
            match b.append(audit(i)) {
                Ok(tk) => audits.push(tk.seq()),
                Err(AppendError::BufferFull { .. }) => refused += 1,
                Err(e) => panic!("{e}"),
            }
            if i % 100 == 0 {
                // Mixed in: requests, which get shed instead.
                b.append(request(i, PriorityClass::Request))
                    .expect("requests are always taken");
            }
        }
        assert!(refused > 0);
        let st = b.stats(t(0));
        assert_eq!(st.audit_refused, refused);
        // Let the writer finish.
        let tk = b
            .append(request(9999, PriorityClass::Debug))
            .expect("appends");
        tk.committed().await.expect("durable");
        let recs = all(&b);
        let kept: Vec<_> = recs
            .iter()
            .filter(|r| matches!(r.body, RecordBody::ModeTransition(_)))
            .map(|r| r.seq)
            .collect();
        assert_eq!(kept, audits, "every accepted audit record is still held");
        verify_chain(&ChainPosition::genesis(&spoke()), &recs).expect("verifies");
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_ack_and_resume_inside_a_shed_range() {
        let f = fixture();
        let b = open(&f, small(64 << 20));
        let mut last = None;
        for i in 0..20 {
            last = Some(
                b.append(request(i, PriorityClass::Request))
                    .expect("appends"),
            );
        }
        last.take().expect("t").committed().await.expect("durable");
        let g = ChainPosition::genesis(&spoke());
        let first = b.pending(&g, 5, usize::MAX).expect("pending");
        assert_eq!(first.len(), 5);
        let pos5 = ChainPosition::after(&first[4]);
        // The byte limit holds, but at least one record comes back.
        assert_eq!(b.pending(&pos5, 10, 1).expect("pending").len(), 1);
        let one = first[0].encode().len();
        assert_eq!(b.pending(&pos5, 10, 2 * one + 1).expect("pending").len(), 2);
        // A wrong link is refused.
        let bad = ChainPosition {
            next_seq: pos5.next_seq,
            hash: g.hash,
        };
        assert!(matches!(
            b.pending(&bad, 10, usize::MAX),
            Err(BufferError::PositionMismatch { .. })
        ));
        // Hub got 1..=5 and acked them.
        b.ack(EvidenceSeq::new(5).expect("nz")).await.expect("acks");
        assert_eq!(b.base().expect("base"), pos5);
        assert!(matches!(
            b.pending(&g, 10, usize::MAX),
            Err(BufferError::Pruned { .. })
        ));
        let st = b.stats(t(0));
        assert_eq!((st.last_acked_seq, st.pending_records), (5, 15));
        // Acking beyond the tip is refused; re-acking is a no-op.
        assert!(matches!(
            b.ack(EvidenceSeq::new(21).expect("nz")).await,
            Err(BufferError::Ahead { .. })
        ));
        b.ack(EvidenceSeq::new(3).expect("nz"))
            .await
            .expect("no-op");
        // Everything left, then the tip.
        let rest = b.pending(&pos5, 100, usize::MAX).expect("pending");
        assert_eq!(rest.len(), 15);
        let tip = ChainPosition::after(rest.last().expect("rest"));
        assert!(b
            .pending(&tip, 100, usize::MAX)
            .expect("pending")
            .is_empty());
        let beyond = ChainPosition {
            next_seq: tip.next_seq.next(),
            hash: tip.hash,
        };
        assert!(matches!(
            b.pending(&beyond, 100, usize::MAX),
            Err(BufferError::Ahead { .. })
        ));
        b.ack(EvidenceSeq::new(20).expect("nz"))
            .await
            .expect("acks");
        let st = b.stats(t(0));
        assert_eq!(
            (st.pending_records, st.pending_bytes, st.last_acked_seq),
            (0, 0, 20)
        );
        assert!(b
            .pending(&tip, 100, usize::MAX)
            .expect("pending")
            .is_empty());
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_resumes_inside_a_shed_range() {
        // The hub got records up to some seq m before the spoke shed a run
        // covering m+1: pending from the hub's position cuts the shed record.
        let f = fixture();
        let cap = 300_000;
        let b = open(&f, small(cap));
        let g = ChainPosition::genesis(&spoke());
        let mut last = None;
        for i in 0..500 {
            last = Some(
                b.append(request(i, PriorityClass::Request))
                    .expect("appends"),
            );
        }
        last.take().expect("t").committed().await.expect("durable");
        // The hub took the first 10 before the shed (records are read while
        // still held).
        let hub: Vec<_> = b.pending(&g, 10, usize::MAX).expect("pending");
        for i in 500..1000 {
            last = Some(
                b.append(request(i, PriorityClass::Request))
                    .expect("appends"),
            );
        }
        last.take().expect("t").committed().await.expect("durable");
        let held = all(&b);
        let first_shed = held[0].as_shed().expect("oldest records were shed");
        assert!(first_shed.range.contains(EvidenceSeq::new(11).expect("nz")));
        let hub_pos = ChainPosition::after(&hub[9]);
        let resumed = b
            .pending(&hub_pos, usize::MAX, usize::MAX)
            .expect("pending");
        assert_eq!(resumed[0].seq.get(), 11);
        let mut at_hub = hub.clone();
        at_hub.extend(resumed);
        let v = verify_chain(&g, &at_hub).expect("hub chain verifies");
        assert_eq!(v.end().last_seq(), 1000);
        b.close().await.expect("closes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tail_stats_and_invalid_appends() {
        let f = fixture();
        let b = open(&f, small(64 << 20));
        for i in 0..5 {
            b.append(request(i, PriorityClass::Request))
                .expect("appends");
        }
        let tk = b.append(audit(5)).expect("appends");
        tk.committed().await.expect("durable");
        let tail = b.tail(2).expect("tail");
        assert_eq!(
            tail.iter().map(|r| r.seq.get()).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert_eq!(b.tail(100).expect("tail").len(), 6);
        let st = b.stats(UnixMillis(t(0).0 + 61_000));
        assert_eq!(st.oldest_pending_age_s, 61);
        assert_eq!(st.last_committed_seq, 6);
        let json = serde_json::to_value(&st).expect("json");
        for k in [
            "last_committed_seq",
            "last_acked_seq",
            "pending_records",
            "pending_bytes",
            "shed_records",
            "oldest_pending_age_s",
        ] {
            assert!(json.get(k).is_some(), "{k}");
        }
        let shed_body = {
            let mut run = ShedRun::new();
            run.drop_record(
                EvidenceSeq::FIRST,
                t(0),
                PriorityClass::Debug,
                Default::default(),
            )
            .expect("drops");
            run.seal(&Default::default(), ShedReason::BufferFull, t(0))
                .expect("sealed")
                .body
        };
        assert!(matches!(
            b.append(NewRecord::new(t(0), shed_body)),
            Err(AppendError::Invalid(RecordError::ReservedKind))
        ));
        // Refused appends take no sequence number.
        let next = b
            .append(request(6, PriorityClass::Request))
            .expect("appends");
        assert_eq!(next.seq().get(), 7);
        // An oversized record is stored truncated and marked, not lost.
        let mut big = samples::request(0, t(0));
        if let RecordBody::Request(r) = &mut big {
            r.service_name = "x".repeat(MAX_RECORD_BYTES);
        }
        let tk = b.append(NewRecord::new(t(0), big)).expect("truncated");
        assert_eq!(tk.seq().get(), 8);
        tk.committed().await.expect("durable");
        let stored = b.tail(1).expect("tail");
        match &stored[0].body {
            RecordBody::Request(r) => {
                assert!(r.service_name.ends_with(tidemesh_evidence::TRUNCATED_MARK));
            }
            other => panic!("{other:?}"),
        }
        let st = b.stats(t(0));
        assert_eq!((st.truncated_records, st.lost.total()), (1, 0));
        let clone = b.clone();
        b.close().await.expect("closes");
        assert!(matches!(
            clone.append(request(9, PriorityClass::Request)),
            Err(AppendError::Stopped(_))
        ));
        assert_eq!(clone.stats(t(0)).lost.stopped, 1, "a refusal is counted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_refuses_another_spoke_bad_config_and_a_broken_tail() {
        let f = fixture();
        let b = open(&f, small(64 << 20));
        for i in 0..3 {
            b.append(request(i, PriorityClass::Request))
                .expect("appends");
        }
        b.append(audit(3))
            .expect("appends")
            .committed()
            .await
            .expect("durable");
        b.close().await.expect("closes");
        let other = SpiffeId::parse("spiffe://edge.example/store/sf02/node/n1").expect("id");
        assert!(matches!(
            EvidenceBuffer::open(&f.path, &other, small(64 << 20)),
            Err(OpenError::SpokeMismatch { .. })
        ));
        assert!(matches!(
            EvidenceBuffer::open(&f.path, &spoke(), small(1000)),
            Err(OpenError::Config(_))
        ));
        // Alter record 2 in place (through redb, as an attacker with the
        // file would): the tail check names it.
        {
            let db = redb::Database::open(&f.path).expect("raw open");
            let txn = db.begin_write().expect("write");
            {
                let mut t = txn.open_table(RECORDS).expect("table");
                let mut v = t.get(2).expect("get").expect("present").value().to_vec();
                let last = v.len() - 40;
                v[last] ^= 1;
                t.insert(2, v.as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        match EvidenceBuffer::open(&f.path, &spoke(), small(64 << 20)) {
            Err(OpenError::ChainBroken(e)) => assert_eq!(e.seq.get(), 2),
            other => panic!("expected a broken chain, got {other:?}"),
        }
        let b = open(
            &f,
            BufferConfig {
                tail_check: 0,
                ..small(64 << 20)
            },
        );
        let err = b.verify().expect_err("broken");
        assert!(err.to_string().contains("seq 2"), "{err}");
        b.close().await.expect("closes");
    }

    #[test]
    fn open_outside_a_runtime_is_an_error() {
        let f = fixture();
        assert!(matches!(
            EvidenceBuffer::open(&f.path, &spoke(), small(64 << 20)),
            Err(OpenError::NoRuntime)
        ));
    }
}
