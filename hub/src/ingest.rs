//! Evidence sync, hub side: one evidence session per stream
//! (`Request::EvidenceOpen`), batches checked against the spoke's
//! certificate and committed through [`crate::evidence::EvidenceStore`]
//! before they are acknowledged.
//!
//! Backpressure: every batch needs one of [`IngestSettings::max_concurrent`]
//! ingest slots and draws its records from a hub-wide token bucket
//! ([`IngestSettings::rate`]). A batch that waited for a slot, or that left
//! the bucket in debt, is still committed and acknowledged, but the ack
//! carries a window of one batch and a `retry_after_ms` (with jitter) that
//! the spoke honours before sending more: a wave of reconnecting stores is
//! spread out instead of flattening the hub.
//!
//! Memory: a session reads a batch only once it holds one of the hub-wide
//! [`Limits::held`] permits (twice the commit slots), from the first byte of
//! the frame until the batch is committed and acknowledged; it waits for
//! the first byte holding nothing. So however many sessions are open, the
//! hub holds at most `2 × max_concurrent` batches read or decoded (each at
//! most 1 MiB); the rest waits in the spokes, behind QUIC flow control
//! (quinn buffers at most one stream receive window per session). A frame
//! must arrive within [`FRAME_DEADLINE`] once begun, or the session ends,
//! so a slow sender cannot sit on a permit.
//!
//! A full or failing `evidence.db`: a batch whose commit fails with a
//! storage error ([`StorageFault`]: no space left, an I/O error) stores
//! nothing; the hub reopens the database (redb refuses all work after an
//! I/O error until then) and answers with an ack that names a position the
//! hub holds, a window of one batch and a `retry_after_ms` of
//! [`STORE_RETRY`] (with jitter): the spoke keeps its records and resends
//! them from that position later. The hub says so meanwhile
//! (`tidemesh_hub_evidence_store_full`, `stats` → `evidence_store`, one
//! log line per outage) and clears the state at the next commit that
//! works. Renewals, revocations and everything else in `hub.db` go on.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use rustls::pki_types::CertificateDer;
use tidemesh_evidence::{Batch, ChainHash, ChainPosition, EvidenceSeq, UnixMillis, VerifiedBatch};
use tidemesh_identity::{svid, SpiffeId};
use tidemesh_proto::{ErrorCode, Request, Response};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::evidence::{EvidenceStoreError, IngestError, IngestOutcome, StorageFault};
use crate::Hub;

/// Evidence ingest settings.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestSettings {
    /// Batches a spoke may send ahead of the hub's acks. Default 4.
    pub window: u32,
    /// Batches committed at once across all spokes. Default 2 (redb
    /// serializes writers; a second slot overlaps decoding and signature
    /// checks with the commit).
    pub max_concurrent: usize,
    /// Records per second across all spokes (0: no limit). Default 0.
    pub rate: u32,
    /// A batch that waited longer than this for a slot makes its spoke
    /// back off. Default 200 ms.
    pub busy_after: Duration,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            window: 4,
            max_concurrent: 2,
            rate: 0,
            busy_after: Duration::from_millis(200),
        }
    }
}

/// Ingest counters since start, for `/metrics` and `stats`.
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Records newly stored.
    pub records: AtomicU64,
    /// Records received again and skipped.
    pub duplicates: AtomicU64,
    /// Batches refused (signature, chain, fork, malformed).
    pub rejected: AtomicU64,
    /// Acks that told a spoke to back off.
    pub throttled: AtomicU64,
    /// Batches that named a later sequence number than the hub holds.
    pub ahead: AtomicU64,
    /// Evidence sessions opened.
    pub sessions: AtomicU64,
    /// Batches read or decoded and not yet answered, now (all sessions).
    pub held: AtomicU64,
    /// The most batches ever held at once.
    pub held_peak: AtomicU64,
    /// Batches and gaps whose commit failed with a storage error (disk
    /// full, I/O error): nothing stored, the spoke told to retry.
    pub store_failures: AtomicU64,
}

/// How long a begun batch frame may take to arrive in full.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// One batch's place among the held ones, from its first byte until it
/// is answered.
struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    limits: std::sync::Arc<Limits>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.limits.counters.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a spoke is told to wait (plus up to half again as jitter)
/// after a commit failed on a full or failing `evidence.db`.
pub const STORE_RETRY: Duration = Duration::from_secs(2);

/// Since when `evidence.db` has been failing, and how.
#[derive(Debug, Clone)]
pub struct StoreOutage {
    /// What failed.
    pub fault: StorageFault,
    /// When the first failure of this outage happened (ms since the epoch).
    pub since_ms: u64,
    /// The last error.
    pub error: String,
}

/// The shared limits: slots and the token bucket.
pub(crate) struct Limits {
    slots: Semaphore,
    /// Batches in memory hub-wide (read, decoded, committing).
    held: std::sync::Arc<Semaphore>,
    bucket: Mutex<(f64, Instant)>,
    pub(crate) counters: IngestCounters,
    /// Set while commits to `evidence.db` fail.
    outage: Mutex<Option<StoreOutage>>,
}

impl Limits {
    pub(crate) fn new(s: &IngestSettings) -> Limits {
        Limits {
            slots: Semaphore::new(s.max_concurrent.max(1)),
            held: std::sync::Arc::new(Semaphore::new(2 * s.max_concurrent.max(1))),
            bucket: Mutex::new((f64::from(s.rate), Instant::now())),
            counters: IngestCounters::default(),
            outage: Mutex::new(None),
        }
    }

    /// The current outage of `evidence.db`, if any.
    pub(crate) fn outage(&self) -> Option<StoreOutage> {
        self.outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes a failed commit; logs when an outage starts or changes kind.
    fn store_failed(&self, fault: StorageFault, error: &EvidenceStoreError, now_ms: u64) {
        self.counters.store_failures.fetch_add(1, Ordering::Relaxed);
        let mut o = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        let error = error.to_string();
        match o.as_mut() {
            Some(cur) if cur.fault == fault => cur.error = error,
            _ => {
                warn!(target: "tidemesh::audit", fault = fault.as_str(), %error,
                    "evidence store cannot commit: ingest paused, spokes told to retry; renewals and revocations go on");
                *o = Some(StoreOutage {
                    fault,
                    since_ms: now_ms,
                    error,
                });
            }
        }
    }

    /// Notes a commit that worked; logs the end of an outage.
    fn store_ok(&self, now_ms: u64) {
        let mut o = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ended) = o.take() {
            info!(target: "tidemesh::audit", fault = ended.fault.as_str(),
                lasted_ms = now_ms.saturating_sub(ended.since_ms),
                "evidence store commits again: ingest resumed");
        }
    }

    /// Draws `n` records; returns how long the sender should wait.
    fn draw(&self, rate: u32, n: u32) -> Duration {
        if rate == 0 {
            return Duration::ZERO;
        }
        let rate = f64::from(rate);
        let Ok(mut b) = self.bucket.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let (tokens, at) = *b;
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * rate).min(rate) - f64::from(n);
        *b = (tokens, now);
        if tokens < 0.0 {
            Duration::from_secs_f64(-tokens / rate)
        } else {
            Duration::ZERO
        }
    }
}

fn ack(pos: &ChainPosition, out: Option<&IngestOutcome>, window: u32, retry: Duration) -> Response {
    Response::EvidenceAck {
        next_seq: pos.next_seq.get(),
        hash: pos.hash.0,
        stored: out.map_or(0, |o| o.stored),
        duplicates: out.map_or(0, |o| o.duplicates),
        window,
        retry_after_ms: retry.as_millis().min(u128::from(u32::MAX)) as u32,
    }
}

/// One request of a session, in arrival order.
enum Item {
    Batch(
        tokio::task::JoinHandle<Result<(VerifiedBatch, u32), Refusal>>,
        Held,
    ),
    Gap {
        resume_seq: u64,
        resume_hash: [u8; 32],
        reason: String,
    },
    Other(String),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Decodes a batch (size checked first), checks that it names the
/// authenticated spoke and that its signature verifies against the key of
/// the connection's certificate. Blocking (CPU).
fn decode_and_check(
    bytes: Vec<u8>,
    id: &SpiffeId,
    public_key: &[u8],
) -> Result<(VerifiedBatch, u32), Refusal> {
    let batch = Batch::decode(&bytes).map_err(|e| Refusal::Flag(format!("batch: {e}")))?;
    if batch.spoke != *id {
        return Err(Refusal::Flag(format!(
            "batch names spoke {} but the connection is authenticated as {id}",
            batch.spoke
        )));
    }
    let n = batch.records.len() as u32;
    let first = batch.first_seq;
    let verified = batch
        .verify_signature(public_key)
        .map_err(|e| Refusal::Flag(format!("batch starting at seq {first}: {e}")))?;
    Ok((verified, n))
}

/// What a batch's commit did.
enum Stored {
    /// Committed (new records and duplicates).
    Batch(IngestOutcome),
    /// It started past the hub's position (here): resend from it.
    Ahead(ChainPosition),
}

/// Why a batch's commit did not happen.
enum Failed {
    /// The batch itself is refused.
    Refused(Refusal),
    /// The store failed (a storage fault, or worse).
    Store(EvidenceStoreError),
}

/// After a storage fault, reopens the database (redb does no more work
/// after an I/O error until then); a failed reopen leaves it closed and
/// the next batch tries again. Blocking.
fn reopen_after(store: &dyn crate::evidence::EvidenceBackend, f: Failed) -> Failed {
    if let Failed::Store(e) = &f {
        if StorageFault::of(e).is_some() {
            if let Err(e) = store.reopen() {
                debug!(error = %e, "evidence store reopen failed; next batch retries");
            }
        }
    }
    f
}

/// Why a batch was refused, for the spoke and the flag.
enum Refusal {
    /// Flag it (the store has not yet).
    Flag(String),
    /// Already flagged by the store (chain, fork).
    Flagged(String),
}

impl Hub {
    /// Serves one evidence session until the spoke ends the stream, the
    /// connection closes or a batch is refused.
    pub(crate) async fn evidence_session(
        &self,
        conn: &quinn::Connection,
        id: &SpiffeId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let limits = &self.inner.ingest;
        limits.counters.sessions.fetch_add(1, Ordering::Relaxed);
        let settings = self.inner.cfg.ingest.clone();
        // The key the batches must be signed with: the one in the
        // certificate this connection was authenticated with.
        let leaf = conn
            .peer_identity()
            .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()));
        let Some(leaf) = leaf else {
            let _ = self
                .refuse(&mut send, "no client certificate on this connection")
                .await;
            return;
        };
        let (public_key, cert_sha256) = match svid::cert_public_key(&leaf) {
            Ok(k) => (k, svid::sha256(&leaf)),
            Err(e) => {
                let _ = self
                    .refuse(&mut send, &format!("client certificate: {e}"))
                    .await;
                return;
            }
        };
        let store = self.inner.evidence.clone();
        let spoke = id.clone();
        let pos = match tokio::task::spawn_blocking(move || {
            store.position(&spoke).or_else(|e| {
                // closed after a failed commit: reads work again once reopened
                if StorageFault::of(&e).is_none() {
                    return Err(e);
                }
                store.reopen()?;
                store.position(&spoke)
            })
        })
        .await
        {
            Ok(Ok(p)) => p,
            other => {
                warn!(spoke = %id, error = ?other.err(), "evidence position unavailable");
                let _ = self.refuse_internal(&mut send).await;
                return;
            }
        };
        debug!(spoke = %id, next_seq = pos.next_seq.get(), "evidence session");
        if tidemesh_net::write_frame(&mut send, &ack(&pos, None, settings.window, Duration::ZERO))
            .await
            .is_err()
        {
            return;
        }
        // Two stages: a reader decodes and checks the signature of batch n+1
        // (on the blocking pool) while batch n commits; the channel bound
        // keeps at most two decoded batches in memory per session.
        // A position the hub holds (it only grows): what a spoke is told
        // to resend from when a commit fails.
        let mut held = pos;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(2);
        let reader_id = id.clone();
        let limits_arc = self.inner.ingest.clone();
        let reader = tokio::spawn(async move {
            loop {
                // Wait for the next frame holding nothing; then take a
                // place among the held batches before reading the rest.
                let first = match recv.read_chunk(tidemesh_proto::LEN_PREFIX, true).await {
                    Ok(Some(c)) => c.bytes,
                    // the spoke ended the session or the link went
                    _ => return,
                };
                let Ok(permit) = limits_arc.held.clone().acquire_owned().await else {
                    return;
                };
                let c = &limits_arc.counters;
                let now = c.held.fetch_add(1, Ordering::Relaxed) + 1;
                c.held_peak.fetch_max(now, Ordering::Relaxed);
                let held = Held {
                    _permit: permit,
                    limits: limits_arc.clone(),
                };
                let frame = tokio::time::timeout(
                    FRAME_DEADLINE,
                    tidemesh_net::quic::read_frame_after::<Request>(
                        &mut recv,
                        tidemesh_proto::MAX_FRAME,
                        &first,
                    ),
                )
                .await;
                let item = match frame {
                    // too slow, the spoke ended the session or the link went
                    Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(Request::EvidenceBatch { batch })) => {
                        let id = reader_id.clone();
                        let key = public_key.clone();
                        Item::Batch(
                            tokio::task::spawn_blocking(move || decode_and_check(batch, &id, &key)),
                            held,
                        )
                    }
                    Ok(Ok(Request::EvidenceGap {
                        resume_seq,
                        resume_hash,
                        reason,
                    })) => Item::Gap {
                        resume_seq,
                        resume_hash,
                        reason,
                    },
                    Ok(Ok(other)) => Item::Other(format!(
                        "unexpected request in an evidence session: {other:?}"
                    )),
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        while let Some(item) = rx.recv().await {
            let answer = match item {
                Item::Batch(checked, _in_memory) => match checked.await {
                    Ok(Ok(v)) => self.ingest_one(id, v, cert_sha256, &settings, &held).await,
                    Ok(Err(r)) => Err(r),
                    Err(e) => Err(Refusal::Flag(format!("batch check failed: {e}"))),
                },
                Item::Gap {
                    resume_seq,
                    resume_hash,
                    reason,
                } => {
                    self.declare_gap(id, resume_seq, resume_hash, reason, &settings, &held)
                        .await
                }
                Item::Other(m) => Err(Refusal::Flag(m)),
            };
            match answer {
                Ok(resp) => {
                    if let Response::EvidenceAck { next_seq, hash, .. } = &resp {
                        if let Some(n) = EvidenceSeq::new(*next_seq).filter(|n| *n > held.next_seq)
                        {
                            held = ChainPosition {
                                next_seq: n,
                                hash: ChainHash(*hash),
                            };
                        }
                    }
                    if tidemesh_net::write_frame(&mut send, &resp).await.is_err() {
                        break;
                    }
                }
                Err(r) => {
                    let msg = match r {
                        Refusal::Flag(m) => {
                            let store = self.inner.evidence.clone();
                            let spoke = id.clone();
                            let now = UnixMillis(self.now_ms());
                            let m2 = m.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                store.record_rejection(&spoke, &m2, now)
                            })
                            .await;
                            m
                        }
                        Refusal::Flagged(m) => m,
                    };
                    limits.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(target: "tidemesh::audit", spoke = %id, reason = %msg, "evidence batch refused");
                    let _ = self.refuse(&mut send, &msg).await;
                    return;
                }
            }
        }
        let _ = send.finish();
    }

    async fn refuse(&self, send: &mut quinn::SendStream, msg: &str) -> Result<(), ()> {
        let r = Response::Error {
            code: ErrorCode::EvidenceRejected,
            message: msg.to_owned(),
        };
        tidemesh_net::write_frame(send, &r).await.map_err(|_| ())?;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        Ok(())
    }

    async fn refuse_internal(&self, send: &mut quinn::SendStream) -> Result<(), ()> {
        let r = Response::Error {
            code: ErrorCode::Internal,
            message: "the hub cannot read its evidence store; retry later".into(),
        };
        tidemesh_net::write_frame(send, &r).await.map_err(|_| ())?;
        let _ = send.finish();
        Ok(())
    }

    /// Pacing for the next batch after one that waited `waited` for a slot
    /// and drew `n` records.
    fn pacing(&self, settings: &IngestSettings, waited: Duration, n: u32) -> (u32, Duration) {
        let limits = &self.inner.ingest;
        let debt = limits.draw(settings.rate, n);
        let busy = waited > settings.busy_after;
        if debt.is_zero() && !busy {
            return (settings.window, Duration::ZERO);
        }
        limits.counters.throttled.fetch_add(1, Ordering::Relaxed);
        let base = if busy { waited.max(debt) } else { debt };
        // Jitter so spokes told to wait do not come back together.
        let jitter = rand::rng().random_range(0.0..0.5);
        (1, base.mul_f64(1.0 + jitter).min(Duration::from_secs(60)))
    }

    async fn ingest_one(
        &self,
        id: &SpiffeId,
        verified: (VerifiedBatch, u32),
        cert_sha256: [u8; 32],
        settings: &IngestSettings,
        held: &ChainPosition,
    ) -> Result<Response, Refusal> {
        let limits = &self.inner.ingest;
        let (verified, n) = verified;
        let t0 = Instant::now();
        let _permit = limits
            .slots
            .acquire()
            .await
            .map_err(|_| Refusal::Flag("the hub is shutting down".into()))?;
        let waited = t0.elapsed();
        let store = self.inner.evidence.clone();
        let spoke = id.clone();
        let now = UnixMillis(self.now_ms());
        let otlp = self.inner.otlp.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut res = store.ingest(&verified, cert_sha256, now);
            if let Err(IngestError::Store(e)) = &res {
                // redb reports an earlier I/O error (one that surfaced in a
                // drop, say) as `PreviousIo`: reopen and try once more, so
                // the answer names what fails now (a full disk, or nothing).
                if StorageFault::of(e).is_some() && store.reopen().is_ok() {
                    res = store.ingest(&verified, cert_sha256, now);
                }
            }
            match res {
                Ok(out) => {
                    // committed: the records it stored become spans (never
                    // waits; a full export queue drops and counts)
                    if let Some(x) = &otlp {
                        x.offer(crate::otlp::spans_of(
                            verified.spoke(),
                            verified.records(),
                            out.first_stored,
                        ));
                    }
                    Ok(Stored::Batch(out))
                }
                Err(IngestError::Ahead { .. }) => match store.position(&spoke) {
                    Ok(pos) => Ok(Stored::Ahead(pos)),
                    Err(e) => Err(Failed::Store(e)),
                },
                Err(e @ (IngestError::Chain { .. } | IngestError::Fork { .. })) => {
                    Err(Failed::Refused(Refusal::Flagged(e.to_string())))
                }
                Err(IngestError::Store(e)) => Err(Failed::Store(e)),
            }
            .map_err(|f| reopen_after(&*store, f))
        })
        .await
        .map_err(|e| Refusal::Flag(format!("ingest task failed: {e}")))?;
        let res = match res {
            Ok(r) => r,
            Err(f) => return self.store_failure(f, held),
        };
        limits.store_ok(self.now_ms());
        let (window, retry) = self.pacing(settings, waited, n);
        match res {
            Stored::Batch(out) => {
                let c = &limits.counters;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.records
                    .fetch_add(u64::from(out.stored), Ordering::Relaxed);
                c.duplicates
                    .fetch_add(u64::from(out.duplicates), Ordering::Relaxed);
                Ok(ack(&out.position, Some(&out), window, retry))
            }
            Stored::Ahead(pos) => {
                limits.counters.ahead.fetch_add(1, Ordering::Relaxed);
                debug!(spoke = %id, hub_next = pos.next_seq.get(), "batch ahead of the hub's position; spoke will resend");
                Ok(ack(&pos, None, window, retry))
            }
        }
    }

    /// Answers a commit that failed: a storage fault becomes an ack at a
    /// position the hub holds with a retry-after (the spoke keeps its
    /// records and resends); anything else refuses the batch.
    fn store_failure(&self, f: Failed, held: &ChainPosition) -> Result<Response, Refusal> {
        match f {
            Failed::Refused(r) => Err(r),
            Failed::Store(e) => match self.inner.evidence.fault(&e) {
                Some(fault) => {
                    self.inner.ingest.store_failed(fault, &e, self.now_ms());
                    let jitter = rand::rng().random_range(0.0..0.5);
                    Ok(ack(held, None, 1, STORE_RETRY.mul_f64(1.0 + jitter)))
                }
                None => Err(Refusal::Flag(format!("evidence store: {e}"))),
            },
        }
    }

    async fn declare_gap(
        &self,
        id: &SpiffeId,
        resume_seq: u64,
        resume_hash: [u8; 32],
        reason: String,
        settings: &IngestSettings,
        held: &ChainPosition,
    ) -> Result<Response, Refusal> {
        let Some(next_seq) = EvidenceSeq::new(resume_seq) else {
            return Err(Refusal::Flag("gap resumes at sequence number 0".into()));
        };
        let resume = ChainPosition {
            next_seq,
            hash: ChainHash(resume_hash),
        };
        let store = self.inner.evidence.clone();
        let spoke = id.clone();
        let now = UnixMillis(self.now_ms());
        let r = resume;
        let res = tokio::task::spawn_blocking(move || {
            store
                .declare_gap(&spoke, &r, &reason, now)
                .map_err(|e| match StorageFault::of(&e) {
                    Some(_) => reopen_after(&*store, Failed::Store(e)),
                    None => Failed::Refused(Refusal::Flag(format!("gap refused: {e}"))),
                })
        })
        .await
        .map_err(|e| Refusal::Flag(format!("gap task failed: {e}")))?;
        match res {
            Ok(g) => {
                self.inner.ingest.store_ok(self.now_ms());
                warn!(target: "tidemesh::audit", spoke = %id, gap = ?g, "evidence gap recorded");
                Ok(ack(&resume, None, settings.window, Duration::ZERO))
            }
            Err(f) => self.store_failure(f, held),
        }
    }
}
