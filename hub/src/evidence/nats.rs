//! Evidence on NATS JetStream (`--store nats://...`): every spoke's chain
//! in one stream that all hub replicas share, so any replica can ingest any
//! spoke's batches and every record is stored exactly once.
//!
//! # Layout
//! Stream `TIDEMESH_EVIDENCE`, subjects `tidemesh.ev.<key>`, where `<key>`
//! is the lowercase hex of the spoke's SPIFFE ID (its characters are not
//! all valid in a subject); file storage, `min(3, servers)` replicas,
//! no direct gets (reads go to the stream leader). One message per
//! accepted step of a spoke, postcard [`Step`]:
//! * `state`: the spoke's state after the step (the redb backend's
//!   `SpokeState`: position = the **high-water mark**, and the counters),
//! * `prev`: the stream sequence of the spoke's previous message (0: none),
//!   so a reader walks a spoke's history back from its last message,
//! * `kind`: `Batch` (the stored records' encodings, in seq order, and the
//!   batch row, as in `evidence.db`) or `Flag` (a refusal, state only).
//!
//! The high-water mark is the `state` of the last message on the spoke's
//! subject: no separate key, so it cannot disagree with the records.
//!
//! # Exactly once: compare-and-set on the stream's last sequence
//! To accept a batch, a replica reads the stream's last sequence `L`, then
//! the spoke's last message (from the leader; its sequence must be `<= L`,
//! else it reads again), applies the ingest rules of [`super`] to the
//! state there, and publishes the step with `Nats-Expected-Last-Sequence:
//! L`. JetStream stores it only if nothing was stored since `L`: of two
//! replicas racing on a spoke, one lands, the other gets "wrong last
//! sequence", reads again, and now finds the records at or below the
//! high-water mark (duplicates: acked, not stored again). The per-subject
//! check (`Nats-Expected-Last-Subject-Sequence`, what KV updates use) would
//! let spokes not contend with each other, but nats-server before 2.9.21
//! (Debian ships 2.9.10) checks it outside the replicated log in a cluster,
//! so two racing publishes may both land (nats-server issue 4320; with
//! that header instead, the race test in `tests/tests/jetstream.rs` stored
//! a batch twice within its 30 races in each of 3 runs on a 3-node
//! 2.9.10 cluster on loopback). The cost
//! of the stream-wide check: a batch of any spoke makes a concurrent one
//! of another spoke retry. JetStream's duplicate window is not used.
//!
//! # A lost answer
//! A replica may publish a step and die (or lose its connection) before it
//! acks the spoke. The spoke keeps the records (they are acked only from
//! the ack) and resends them, to this replica or another. The step either
//! landed or not; nothing else changes the spoke's subject without the
//! compare-and-set. If it landed, the resend reads a high-water mark past
//! those records: they are duplicates, compared byte for byte with the
//! stored ones (a different record at a stored seq is a fork) and acked
//! with the stored position, nothing is stored twice. If it did not land,
//! the high-water mark is where it was, the resend starts there and is
//! stored once. A resend starting past the high-water mark is `Ahead` and
//! stores nothing, so no gap can appear either. The same holds within one
//! replica: a publish whose answer is lost is followed by a re-read, not a
//! blind retry.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use tidemesh_evidence::{
    resume_shed, ChainPosition, ChainVerifier, RecordBody, SealedRecord, UnixMillis, VerifiedBatch,
};
use tidemesh_identity::SpiffeId;

use super::{
    check_duplicate_against, Aggregate, BatchRow, EvidenceBackend, EvidenceStoreError, GapInfo,
    IngestError, IngestOutcome, PruneReport, Query, Retention, SpokeEvidenceStats, SpokeState,
    VerifyReport, Walk,
};

/// The evidence stream.
pub const STREAM: &str = "TIDEMESH_EVIDENCE";
/// Subject prefix; the spoke's key follows.
pub const SUBJECT_PREFIX: &str = "tidemesh.ev.";
/// How long one operation may take in all, retries included.
pub const OP_DEADLINE: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One message on a spoke's subject (see "Layout").
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    state: SpokeState,
    prev: u64,
    kind: StepKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum StepKind {
    Batch {
        row: BatchRow,
        /// `(seq, encoding)` of each stored record, in seq order.
        records: Vec<(u64, Vec<u8>)>,
    },
    Flag,
}

/// The subject of `spoke`'s evidence.
pub fn subject(spoke: &SpiffeId) -> String {
    let id = spoke.to_string();
    let mut s = String::with_capacity(SUBJECT_PREFIX.len() + 2 * id.len());
    s.push_str(SUBJECT_PREFIX);
    for b in id.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn err(op: &'static str, reason: impl std::fmt::Display) -> EvidenceStoreError {
    EvidenceStoreError::Nats {
        op,
        reason: reason.to_string(),
    }
}

/// The JetStream backend of [`EvidenceBackend`].
pub struct NatsEvidence {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    js: jetstream::Context,
    servers: Vec<String>,
}

impl std::fmt::Debug for NatsEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsEvidence")
            .field("servers", &self.servers)
            .finish()
    }
}

impl Drop for NatsEvidence {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The spoke's last step and the stream sequence it is read as of.
struct Snapshot {
    last: u64,
    tip: Option<(u64, Step)>,
}

/// What one attempt of an ingest decided.
enum Decided {
    Done(IngestOutcome),
    Write(Vec<u8>, IngestOutcome),
    Refuse(IngestError),
}

impl NatsEvidence {
    /// Connects to the cluster and creates the evidence stream if it is
    /// missing (every replica may call this).
    pub fn open(servers: &[String]) -> Result<NatsEvidence, EvidenceStoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tidemesh-nats-ev")
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
        let js = run_on(&handle, Instant::now() + OP_DEADLINE, async move {
            let client = async_nats::ConnectOptions::new()
                .name("tidemesh-hub-evidence")
                .connection_timeout(REQUEST_TIMEOUT)
                .reconnect_delay_callback(|n| Duration::from_millis(100 * n.min(10) as u64))
                .connect(addrs)
                .await
                .map_err(|e| format!("cannot connect to nats://{list}: {e}"))?;
            let mut js = jetstream::new(client);
            js.set_timeout(REQUEST_TIMEOUT);
            js.get_or_create_stream(stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![format!("{SUBJECT_PREFIX}*")],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                deny_delete: true,
                allow_direct: false,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create stream {STREAM}: {e}"))?;
            Ok(js)
        })
        .map_err(|e| err("connect", e))?;
        Ok(NatsEvidence {
            rt: Some(rt),
            handle,
            js,
            servers: servers.to_vec(),
        })
    }

    fn run<T: Send + 'static>(
        &self,
        until: Instant,
        f: impl Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        run_on(&self.handle, until, f)
    }

    /// Retries `step` (a lost server, a leader election) until `until`.
    fn retrying<T>(
        &self,
        until: Instant,
        op: &'static str,
        mut step: impl FnMut() -> Result<T, String>,
    ) -> Result<T, EvidenceStoreError> {
        loop {
            match step() {
                Ok(t) => return Ok(t),
                Err(e) if Instant::now() + Duration::from_millis(200) >= until => {
                    return Err(err(op, e))
                }
                Err(e) => {
                    tracing::debug!(op, error = %e, "nats evidence step failed; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn stream_last(&self, until: Instant, op: &'static str) -> Result<u64, EvidenceStoreError> {
        self.retrying(until, op, || {
            let js = self.js.clone();
            self.run(until, async move {
                let mut s = js
                    .get_stream(STREAM)
                    .await
                    .map_err(|e| format!("stream {STREAM}: {e}"))?;
                let info = s
                    .info()
                    .await
                    .map_err(|e| format!("stream {STREAM}: {e}"))?;
                Ok(info.state.last_sequence)
            })
        })
    }

    /// The message at `seq` (`None` for the last message of `subject`).
    fn get(
        &self,
        subject: &str,
        seq: Option<u64>,
        until: Instant,
        op: &'static str,
    ) -> Result<Option<(u64, Step)>, EvidenceStoreError> {
        let raw = self.retrying(until, op, || {
            let js = self.js.clone();
            let subject = subject.to_owned();
            self.run(until, async move {
                let s = js
                    .get_stream_no_info(STREAM)
                    .await
                    .map_err(|e| format!("stream {STREAM}: {e}"))?;
                let m = match seq {
                    None => match s.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => m,
                        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                            return Ok(None)
                        }
                        Err(e) => return Err(format!("read {subject}: {e}")),
                    },
                    Some(n) => s
                        .get_raw_message(n)
                        .await
                        .map_err(|e| format!("read {STREAM} message {n}: {e}"))?,
                };
                Ok(Some((
                    m.sequence,
                    m.subject.to_string(),
                    m.payload.to_vec(),
                )))
            })
        })?;
        let Some((n, subj, payload)) = raw else {
            return Ok(None);
        };
        if subj != subject {
            return Err(super::corrupt(
                "evidence stream",
                format!("message {n} is on {subj}, expected {subject}"),
            ));
        }
        let step: Step = postcard::from_bytes(&payload)
            .map_err(|e| super::corrupt("evidence stream", format!("message {n}: {e}")))?;
        Ok(Some((n, step)))
    }

    /// The spoke's last step as of the stream's last sequence.
    fn snapshot(
        &self,
        subject: &str,
        until: Instant,
        op: &'static str,
    ) -> Result<Snapshot, EvidenceStoreError> {
        loop {
            let last = self.stream_last(until, op)?;
            let tip = self.get(subject, None, until, op)?;
            if tip.as_ref().is_none_or(|(n, _)| *n <= last) {
                return Ok(Snapshot { last, tip });
            }
            if Instant::now() >= until {
                return Err(err(op, "the stream kept changing under a read"));
            }
        }
    }

    /// Publishes `payload` if the stream's last sequence is still `last`:
    /// `Ok(true)` stored, `Ok(false)` another write came first.
    fn publish(
        &self,
        subject: &str,
        payload: Vec<u8>,
        last: u64,
        until: Instant,
    ) -> Result<bool, String> {
        let js = self.js.clone();
        let subject = subject.to_owned();
        self.run(until, async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Expected-Stream", STREAM);
            h.insert("Nats-Expected-Last-Sequence", last.to_string().as_str());
            let ack = js
                .publish_with_headers(subject.clone(), h, payload.into())
                .await
                .map_err(|e| format!("publish {subject}: {e}"))?
                .await;
            match ack {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    Ok(false)
                }
                Err(e) => Err(format!("publish {subject}: {e}")),
            }
        })
    }

    /// All of a spoke's steps, oldest first (walks `prev` back from the
    /// last one).
    fn history(&self, spoke: &SpiffeId, op: &'static str) -> Result<Vec<Step>, EvidenceStoreError> {
        let until = Instant::now() + OP_DEADLINE;
        let subject = subject(spoke);
        let mut out = Vec::new();
        let mut at = self.get(&subject, None, until, op)?;
        while let Some((n, step)) = at {
            let prev = step.prev;
            out.push(step);
            if prev == 0 {
                break;
            }
            if prev >= n {
                return Err(super::corrupt(
                    "evidence stream",
                    format!("message {n} points back to {prev}"),
                ));
            }
            at = self.get(&subject, Some(prev), until, op)?;
            if at.is_none() {
                return Err(super::corrupt(
                    "evidence stream",
                    format!("message {prev} missing"),
                ));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Steps the compare-and-set loop until a decision lands.
    fn apply(
        &self,
        spoke: &SpiffeId,
        op: &'static str,
        mut decide: impl FnMut(
            &Snapshot,
            &mut dyn FnMut(u64) -> Option<(u64, Vec<u8>)>,
        ) -> Result<Decided, EvidenceStoreError>,
    ) -> Result<Result<IngestOutcome, IngestError>, EvidenceStoreError> {
        let until = Instant::now() + OP_DEADLINE;
        let subject = subject(spoke);
        loop {
            let snap = self.snapshot(&subject, until, op)?;
            // stored rows covering a seq, fetched back along `prev` on demand
            let mut loaded: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut next_back = snap.tip.as_ref().map(|(n, s)| (*n, s.clone()));
            let mut lookup_err = None;
            let mut covering = |seq: u64| -> Option<(u64, Vec<u8>)> {
                loop {
                    if let Some(found) = loaded.iter().rev().find(|(k, _)| *k <= seq) {
                        if loaded.first().is_some_and(|(k, _)| *k <= seq) {
                            return Some(found.clone());
                        }
                    }
                    let (_, step) = next_back.take()?;
                    if let StepKind::Batch { records, .. } = &step.kind {
                        let mut rs = records.clone();
                        rs.append(&mut loaded);
                        loaded = rs;
                    }
                    if step.prev != 0 {
                        match self.get(&subject, Some(step.prev), until, op) {
                            Ok(s) => next_back = s,
                            Err(e) => {
                                lookup_err = Some(e);
                                return None;
                            }
                        }
                    } else {
                        return loaded.iter().rev().find(|(k, _)| *k <= seq).cloned();
                    }
                }
            };
            let decided = decide(&snap, &mut covering)?;
            if let Some(e) = lookup_err {
                return Err(e);
            }
            match decided {
                Decided::Done(o) => return Ok(Ok(o)),
                Decided::Refuse(e) => return Ok(Err(e)),
                Decided::Write(bytes, o) => match self.publish(&subject, bytes, snap.last, until) {
                    Ok(true) => return Ok(Ok(o)),
                    // another step came first, or the answer was lost: read
                    // again and decide again (see "A lost answer")
                    Ok(false) => {}
                    Err(e) if Instant::now() >= until => return Err(err(op, e)),
                    Err(e) => {
                        tracing::debug!(error = %e, "evidence publish failed; re-reading");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                },
            }
        }
    }

    /// Records a refusal on the spoke's state.
    fn flag(
        &self,
        spoke: &SpiffeId,
        reason: String,
        now: UnixMillis,
        chain_break: bool,
    ) -> Result<(), EvidenceStoreError> {
        self.apply(spoke, "flag", |snap, _| {
            let mut state = snap
                .tip
                .as_ref()
                .map_or_else(|| SpokeState::genesis(spoke), |(_, s)| s.state.clone());
            state.rejected_batches += 1;
            if chain_break {
                state.chain_breaks += 1;
            }
            state.flag(reason.clone(), now);
            let position = state.position;
            let step = Step {
                state,
                prev: snap.tip.as_ref().map_or(0, |(n, _)| *n),
                kind: StepKind::Flag,
            };
            Ok(Decided::Write(
                super::encode(&step),
                IngestOutcome {
                    position,
                    stored: 0,
                    duplicates: 0,
                    first_stored: None,
                },
            ))
        })?
        .map(|_| ())
        .map_err(|e| err("flag", e))
    }
}

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

/// The ingest rules of [`super`] applied to the state at `tip`.
fn decide_batch(
    snap: &Snapshot,
    covering: &mut dyn FnMut(u64) -> Option<(u64, Vec<u8>)>,
    batch: &VerifiedBatch,
    signer_cert_sha256: [u8; 32],
    now: UnixMillis,
) -> Decided {
    let spoke_id = batch.spoke();
    let mut st = snap
        .tip
        .as_ref()
        .map_or_else(|| SpokeState::genesis(spoke_id), |(_, s)| s.state.clone());
    let mut verifier = ChainVerifier::new(st.position);
    let (mut stored, mut duplicates) = (0u32, 0u32);
    let (mut bytes, mut shed_records, mut dropped) = (0u64, 0u64, 0u64);
    let mut records = Vec::new();
    let mut cut_shed = None;
    for r in batch.records() {
        let next = verifier.position().next_seq;
        let cut;
        let rec = if r.last_seq() < next {
            let row = covering(r.last_seq().get());
            if let Err(e) =
                check_duplicate_against(row.as_ref().map(|(k, v)| (*k, v.as_slice())), r)
            {
                return Decided::Refuse(e);
            }
            duplicates = duplicates.saturating_add(1);
            continue;
        } else if r.seq < next {
            cut = match resume_shed(r, verifier.position()) {
                Ok(c) => c,
                Err(e) => {
                    return Decided::Refuse(IngestError::Chain {
                        seq: next,
                        detail: e.to_string(),
                    })
                }
            };
            cut_shed = Some(r.encode());
            &cut
        } else if r.seq > next {
            return Decided::Refuse(IngestError::Ahead {
                expected: next,
                found: r.seq,
            });
        } else {
            r
        };
        if let Err(e) = verifier.push(rec) {
            return Decided::Refuse(IngestError::Chain {
                seq: e.seq,
                detail: e.kind.to_string(),
            });
        }
        let enc = rec.encode();
        bytes += enc.len() as u64;
        records.push((rec.seq.get(), enc));
        stored = stored.saturating_add(1);
        if let RecordBody::Shed(s) = &rec.body {
            shed_records += 1;
            dropped += s.count;
        }
    }
    let position = *verifier.position();
    let first_stored = records.first().map(|(k, _)| *k);
    let outcome = IngestOutcome {
        position,
        stored,
        duplicates,
        first_stored,
    };
    if first_stored.is_none() {
        // all duplicates (a resend after a lost ack): nothing to store
        return Decided::Done(outcome);
    }
    st.position = position;
    st.records += u64::from(stored);
    st.bytes += bytes;
    st.batches += 1;
    st.duplicates += u64::from(duplicates);
    st.shed_records += shed_records;
    st.dropped += dropped;
    st.last_ingest_ms = Some(now.as_millis());
    let step = Step {
        state: st,
        prev: snap.tip.as_ref().map_or(0, |(n, _)| *n),
        kind: StepKind::Batch {
            row: BatchRow {
                batch_first_seq: batch.first_seq().get(),
                last_seq: position.last_seq(),
                signature: batch.signature().to_vec(),
                signer_cert_sha256,
                received_ms: now.as_millis(),
                cut_shed,
            },
            records,
        },
    };
    Decided::Write(super::encode(&step), outcome)
}

impl EvidenceBackend for NatsEvidence {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    fn position(&self, spoke: &SpiffeId) -> Result<ChainPosition, EvidenceStoreError> {
        let until = Instant::now() + OP_DEADLINE;
        Ok(self
            .get(&subject(spoke), None, until, "position")?
            .map_or_else(|| ChainPosition::genesis(spoke), |(_, s)| s.state.position))
    }

    fn ingest(
        &self,
        batch: &VerifiedBatch,
        signer_cert_sha256: [u8; 32],
        now: UnixMillis,
    ) -> Result<IngestOutcome, IngestError> {
        let r = self.apply(batch.spoke(), "ingest", |snap, covering| {
            Ok(decide_batch(snap, covering, batch, signer_cert_sha256, now))
        })?;
        if let Err(e @ (IngestError::Chain { .. } | IngestError::Fork { .. })) = &r {
            self.flag(batch.spoke(), e.to_string(), now, true)?;
        }
        r
    }

    fn record_rejection(
        &self,
        spoke: &SpiffeId,
        reason: &str,
        now: UnixMillis,
    ) -> Result<(), EvidenceStoreError> {
        self.flag(spoke, reason.to_owned(), now, false)
    }

    fn query(&self, spoke: &SpiffeId, q: &Query) -> Result<Vec<SealedRecord>, EvidenceStoreError> {
        let mut out = Vec::new();
        if q.limit == 0 {
            return Ok(out);
        }
        for step in self.history(spoke, "query")? {
            let StepKind::Batch { records, .. } = step.kind else {
                continue;
            };
            for (k, bytes) in records {
                if q.from_seq.is_some_and(|f| k < f) {
                    continue;
                }
                let r = SealedRecord::decode(&bytes)
                    .map_err(|e| super::corrupt("evidence stream", format!("record {k}: {e}")))?;
                if q.kind.is_some_and(|kind| kind != r.body.kind())
                    || q.since.is_some_and(|s| r.timestamp < s)
                {
                    continue;
                }
                out.push(r);
                if out.len() >= q.limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    fn verify(&self, spoke: &SpiffeId) -> Result<VerifyReport, EvidenceStoreError> {
        let name = spoke.to_string();
        let history = self.history(spoke, "verify")?;
        let st = history
            .last()
            .map_or_else(|| SpokeState::genesis(spoke), |s| s.state.clone());
        let mut walk = Walk::new(st.checkpoint, Default::default());
        for step in &history {
            if let StepKind::Batch { records, .. } = &step.kind {
                for (k, bytes) in records {
                    walk.step(*k, bytes);
                }
            }
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
                    "stored records end at seq {} but the hub's position is after seq {}",
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

    fn stats(&self, spoke: &SpiffeId) -> Result<SpokeEvidenceStats, EvidenceStoreError> {
        let until = Instant::now() + OP_DEADLINE;
        let subject = subject(spoke);
        let st = self
            .get(&subject, None, until, "stats")?
            .map_or_else(|| SpokeState::genesis(spoke), |(_, s)| s.state);
        // the first seq held: the first stored record (no retention yet)
        let first = if st.records == 0 {
            0
        } else {
            st.checkpoint.next_seq.get()
        };
        Ok(st.stats(&spoke.to_string(), first))
    }

    fn spokes(&self) -> Result<Vec<SpokeEvidenceStats>, EvidenceStoreError> {
        let until = Instant::now() + OP_DEADLINE;
        let subjects = self.retrying(until, "spokes", || {
            let js = self.js.clone();
            self.run(until, async move {
                let s = js
                    .get_stream_no_info(STREAM)
                    .await
                    .map_err(|e| format!("stream {STREAM}: {e}"))?;
                let mut list = s
                    .info_with_subjects(format!("{SUBJECT_PREFIX}*"))
                    .await
                    .map_err(|e| format!("stream {STREAM} subjects: {e}"))?;
                let mut out = Vec::new();
                while let Some(item) = tokio_stream::StreamExt::next(&mut list).await {
                    let (subject, _) =
                        item.map_err(|e| format!("stream {STREAM} subjects: {e}"))?;
                    out.push(subject);
                }
                Ok(out)
            })
        })?;
        let mut ids = Vec::new();
        for subj in subjects {
            let hex = subj.strip_prefix(SUBJECT_PREFIX).unwrap_or("");
            let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            let id = bytes
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| SpiffeId::parse(&s).ok())
                .ok_or_else(|| super::corrupt("evidence stream", format!("subject {subj}")))?;
            ids.push(id);
        }
        ids.sort_by_key(|id| id.to_string());
        ids.iter().map(|id| self.stats(id)).collect()
    }

    fn declare_gap(
        &self,
        _spoke: &SpiffeId,
        _resume: &ChainPosition,
        _reason: &str,
        _now: UnixMillis,
    ) -> Result<GapInfo, EvidenceStoreError> {
        Err(EvidenceStoreError::Unsupported("declaring a gap"))
    }

    fn aggregates(&self, _spoke: Option<&SpiffeId>) -> Result<Vec<Aggregate>, EvidenceStoreError> {
        Err(EvidenceStoreError::Unsupported("aggregates"))
    }

    fn prune(
        &self,
        _policy: &Retention,
        _now: UnixMillis,
    ) -> Result<PruneReport, EvidenceStoreError> {
        Err(EvidenceStoreError::Unsupported(
            "retention (evidence prune)",
        ))
    }
}
