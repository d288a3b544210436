//! Evidence sync, spoke side: streams the buffer to the hub from the
//! lowest unacked sequence number while a control session is up.
//!
//! One evidence session is one QUIC stream on the control connection
//! (`Request::EvidenceOpen`, see `tidemesh_proto::control`). The hub first
//! says where its copy of this spoke's chain ends; the spoke reads committed
//! records from there ([`EvidenceBuffer::pending`]), signs them as a batch
//! with its node key and sends up to the hub's window of batches ahead. Each
//! `EvidenceAck` arrives after the hub's commit and names the hub's new
//! position; only then does the spoke delete the covered records
//! ([`EvidenceBuffer::ack`]). Acks are idempotent and monotonic, so a lost
//! ack just means the next session starts from the hub's real position and
//! the hub skips what it already holds.
//!
//! Pacing: the hub's window (credits) and `retry_after_ms` slow or pause
//! the spoke; the spoke's own cap ([`SyncSettings::drain_rate`], records per
//! second) keeps a fleet of reconnecting stores from flattening the hub.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tidemesh_evidence::{Batch, ChainHash, ChainPosition, EvidenceSeq, MAX_BATCH_BYTES};
use tidemesh_proto::{ErrorCode, Request, Response};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::buffer::{BufferError, EvidenceBuffer};
use crate::{unix_ms, Spoke, REQUEST_TIMEOUT};

/// Room for a batch's header (spoke ID, sequence number, signature).
const BATCH_HEADROOM: usize = 8 * 1024;

/// Evidence sync settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSettings {
    /// Most records per second sent to the hub (0: no cap). Default 20,000:
    /// a day of a busy store's backlog (a few million records) drains in
    /// minutes, while 500 stores reconnecting at once offer the hub at most
    /// what its window and retry-after let through.
    pub drain_rate: u32,
    /// Most records per batch. Default 2,048 (batches are also capped at
    /// `tidemesh_evidence::MAX_BATCH_BYTES`).
    pub batch_records: usize,
    /// How long a partial batch waits for more records once the spoke is
    /// caught up. Default 200 ms: a spoke answering 1,000 requests/s sends
    /// about 5 batches a second instead of one per group commit (each
    /// batch costs a signature here, and a verification and an fsync at
    /// the hub). Zero sends every commit at once. A backlog of a full
    /// batch or more never waits.
    pub linger: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            drain_rate: 20_000,
            batch_records: 2_048,
            linger: Duration::from_millis(200),
        }
    }
}

/// What the sync is doing, for `evidence stats` and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncStats {
    /// `idle` (caught up), `syncing`, `throttled`, `disconnected` or `error`.
    pub sync_state: &'static str,
    /// Batches sent since start.
    pub sync_batches_sent: u64,
    /// Records the hub acknowledged since start.
    pub sync_records_acked: u64,
    /// Records the hub said it already held.
    pub sync_duplicates: u64,
    /// Time spent paused by the hub's retry-after, ms.
    pub sync_throttled_ms: u64,
    /// Batches the hub refused.
    pub sync_rejections: u64,
    /// The hub's position: the next sequence number it expects.
    pub hub_next_seq: u64,
    /// Last ack (RFC 3339).
    pub sync_last_ack: Option<String>,
    /// Last failure.
    pub sync_last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Net(#[from] tidemesh_net::NetError),
    #[error("evidence buffer: {0}")]
    Buffer(#[from] BufferError),
    #[error("cannot sign the batch: {0}")]
    Batch(#[from] tidemesh_evidence::BatchError),
    #[error("hub refused evidence: {0}")]
    Rejected(String),
    #[error("hub answered {0}")]
    Unexpected(String),
    #[error("{0}")]
    Other(String),
}

/// A token bucket for the drain-rate cap (burst: one second's worth).
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    /// Waits until `n` records may go.
    async fn take(&mut self, n: usize) {
        if self.rate <= 0.0 {
            return;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(n as f64));
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}

struct Ack {
    pos: ChainPosition,
    stored: u32,
    duplicates: u32,
    window: u32,
    retry_after: Duration,
}

fn position(next_seq: u64, hash: [u8; 32]) -> Result<ChainPosition, SyncError> {
    let next_seq = EvidenceSeq::new(next_seq)
        .ok_or_else(|| SyncError::Unexpected("an ack with sequence number 0".into()))?;
    Ok(ChainPosition {
        next_seq,
        hash: ChainHash(hash),
    })
}

fn parse_ack(r: Response) -> Result<Ack, SyncError> {
    match r {
        Response::EvidenceAck {
            next_seq,
            hash,
            stored,
            duplicates,
            window,
            retry_after_ms,
        } => Ok(Ack {
            pos: position(next_seq, hash)?,
            stored,
            duplicates,
            window: window.clamp(1, 64),
            retry_after: Duration::from_millis(u64::from(retry_after_ms.min(600_000))),
        }),
        Response::Error {
            code: ErrorCode::EvidenceRejected,
            message,
        } => Err(SyncError::Rejected(message)),
        other => Err(SyncError::Unexpected(format!("{other:?}"))),
    }
}

impl Spoke {
    pub(crate) fn sync_update(&self, f: impl FnOnce(&mut SyncStats)) {
        if let Ok(mut s) = self.inner.sync.lock() {
            f(&mut s);
        }
    }

    /// The sync counters.
    pub fn sync_stats(&self) -> SyncStats {
        self.inner
            .sync
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Runs evidence sessions on `conn` until it closes, retrying after
    /// failures (longer after a refusal: it needs an operator).
    pub(crate) async fn evidence_loop(&self, conn: quinn::Connection) {
        let Some(buf) = self.inner.evidence.get().cloned() else {
            return;
        };
        loop {
            let res = self.evidence_session(&conn, &buf).await;
            if conn.close_reason().is_some() {
                self.sync_update(|s| s.sync_state = "disconnected");
                return;
            }
            let wait = match res {
                Ok(()) => Duration::from_secs(1),
                Err(SyncError::Rejected(m)) => {
                    warn!(target: "tidemesh::audit", error = %m, "hub refused evidence; retrying in 30 s");
                    self.sync_update(|s| {
                        s.sync_rejections += 1;
                        s.sync_state = "error";
                        s.sync_last_error = Some(format!("hub refused evidence: {m}"));
                    });
                    Duration::from_secs(30)
                }
                Err(e) => {
                    warn!(error = %e, "evidence sync failed; retrying");
                    self.sync_update(|s| {
                        s.sync_state = "error";
                        s.sync_last_error = Some(e.to_string());
                    });
                    Duration::from_secs(2)
                }
            };
            tokio::select! {
                _ = conn.closed() => {
                    self.sync_update(|s| s.sync_state = "disconnected");
                    return;
                }
                _ = tokio::time::sleep(self.jitter(wait)) => {}
            }
        }
    }

    async fn evidence_session(
        &self,
        conn: &quinn::Connection,
        buf: &EvidenceBuffer,
    ) -> Result<(), SyncError> {
        let settings = self.inner.cfg.sync.clone();
        let key = Arc::new(
            self.inner
                .store
                .node()
                .map_err(|e| SyncError::Other(e.to_string()))?
                .key,
        );
        let id = self.inner.ident.id.clone();
        let (mut send, mut recv) = conn.open_bi().await.map_err(tidemesh_net::NetError::from)?;
        tidemesh_net::write_frame(&mut send, &Request::EvidenceOpen).await?;
        let first = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tidemesh_net::read_frame::<Response>(&mut recv),
        )
        .await
        .map_err(|_| SyncError::Other("the hub did not answer EvidenceOpen in time".into()))??;
        let first = parse_ack(first)?;
        let mut hub = first.pos;
        let mut window = first.window as usize;
        let mut resume_at = Instant::now() + first.retry_after;
        self.sync_update(|s| {
            s.hub_next_seq = hub.next_seq.get();
            s.sync_last_error = None;
        });
        // The spoke may already hold fewer records than the hub lacks.
        self.ack_buffer(buf, &hub).await?;
        // Later acks are applied in the background (the deletion commits
        // with an fsync): the send loop goes on meanwhile. Acks are
        // monotonic and idempotent, so only the newest matters.
        let (ack_tx, mut ack_rx) = tokio::sync::watch::channel(0u64);
        let ack_buf = buf.clone();
        let _acker = crate::AbortOnDrop(tokio::spawn(async move {
            while ack_rx.changed().await.is_ok() {
                let up = *ack_rx.borrow_and_update();
                if let Some(seq) = EvidenceSeq::new(up) {
                    if let Err(e) = ack_buf.ack(seq).await {
                        warn!(error = %e, "cannot delete acknowledged evidence");
                        return;
                    }
                }
            }
        }));
        // Answers arrive on their own task so waiting for them can be
        // combined with waiting for new evidence.
        let (tx, mut rx) = mpsc::channel::<Result<Response, tidemesh_net::NetError>>(64);
        let _reader = crate::AbortOnDrop(tokio::spawn(async move {
            loop {
                let r = tidemesh_net::read_frame::<Response>(&mut recv).await;
                let stop = r.is_err();
                if tx.send(r).await.is_err() || stop {
                    return;
                }
            }
        }));
        let mut bucket = Bucket::new(settings.drain_rate);
        let mut sent = hub;
        // Last sequence number of each unanswered batch, oldest first.
        let mut inflight: VecDeque<u64> = VecDeque::new();
        // An answer showed the hub is not where the pipeline assumed: stop
        // sending until the pipeline is empty, then restart from the hub.
        let mut resync = false;
        let mut seen = buf.stats(self.now_evidence()).last_committed_seq;
        // Since when committed records have been waiting to be sent while
        // less than a full batch was ready (the linger's start).
        let mut waiting_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            seen = seen.max(buf.stats(self.now_evidence()).last_committed_seq);
            let unsent = (seen + 1).saturating_sub(sent.next_seq.get());
            let linger_until = if unsent == 0 {
                waiting_since = None;
                None
            } else if unsent >= settings.batch_records.max(1) as u64 {
                None
            } else {
                let since = *waiting_since.get_or_insert(now);
                Some(since + settings.linger).filter(|t| *t > now)
            };
            while !resync && inflight.len() < window && now >= resume_at && linger_until.is_none() {
                let from = sent;
                let b = buf.clone();
                let max = settings.batch_records.max(1);
                // Stored bytes are the records' encodings: leave room for
                // each one's length prefix and the batch header, so the
                // batch fits without encoding it once more to measure it.
                let budget = MAX_BATCH_BYTES.saturating_sub(5 * max + BATCH_HEADROOM);
                let got = buf
                    .background(move || b.pending(&from, max, budget))
                    .await?;
                let records = match got {
                    Ok(r) => r,
                    Err(BufferError::Pruned { requested, oldest }) if inflight.is_empty() => {
                        let base = buf.base()?;
                        let reason = format!(
                            "the spoke no longer holds records {}..{} (acked earlier); resuming at {}",
                            requested.get(),
                            oldest.get().saturating_sub(1),
                            oldest.get()
                        );
                        warn!(target: "tidemesh::audit", %reason, "hub lacks records the spoke pruned");
                        tidemesh_net::write_frame(
                            &mut send,
                            &Request::EvidenceGap {
                                resume_seq: base.next_seq.get(),
                                resume_hash: base.hash.0,
                                reason,
                            },
                        )
                        .await?;
                        inflight.push_back(base.next_seq.get().saturating_sub(1));
                        sent = base;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if records.is_empty() {
                    break;
                }
                bucket.take(records.len()).await;
                let last = records[records.len() - 1].clone();
                let k = key.clone();
                let spoke = id.clone();
                let bytes = buf
                    .background(move || Batch::sign(spoke, records, &k).and_then(|b| b.encode()))
                    .await??;
                tidemesh_net::write_frame(&mut send, &Request::EvidenceBatch { batch: bytes })
                    .await?;
                sent = ChainPosition::after(&last);
                waiting_since = None;
                inflight.push_back(last.last_seq().get());
                self.sync_update(|s| {
                    s.sync_batches_sent += 1;
                    s.sync_state = "syncing";
                });
                // Caught up: what was committed meanwhile waits for the
                // linger instead of leaving as another small batch.
                let committed = buf.stats(self.now_evidence()).last_committed_seq;
                if !settings.linger.is_zero()
                    && (committed + 1).saturating_sub(sent.next_seq.get())
                        < settings.batch_records.max(1) as u64
                {
                    break;
                }
            }
            if inflight.is_empty() {
                if resync {
                    resync = false;
                    sent = hub;
                    continue;
                }
                let state = if Instant::now() < resume_at {
                    "throttled"
                } else {
                    "idle"
                };
                self.sync_update(|s| s.sync_state = state);
            }
            let pause = resume_at.saturating_duration_since(Instant::now());
            tokio::select! {
                answer = rx.recv() => {
                    let answer = match answer {
                        Some(r) => r?,
                        None => return Err(SyncError::Other("evidence stream ended".into())),
                    };
                    let ack = parse_ack(answer)?;
                    let expected = inflight.pop_front().ok_or_else(|| {
                        SyncError::Unexpected("an ack with no batch outstanding".into())
                    })?;
                    if ack.pos.next_seq.get() <= expected {
                        // The hub did not take the batch as sent (it holds
                        // less than assumed, or more): restart from it once
                        // the pipeline is empty.
                        debug!(hub_next = ack.pos.next_seq.get(), expected, "evidence pipeline resync");
                        resync = true;
                    }
                    if ack.pos.next_seq > hub.next_seq {
                        hub = ack.pos;
                    }
                    window = ack.window as usize;
                    if !ack.retry_after.is_zero() {
                        resume_at = Instant::now() + ack.retry_after;
                        self.sync_update(|s| {
                            s.sync_throttled_ms += ack.retry_after.as_millis() as u64;
                            s.sync_state = "throttled";
                        });
                    }
                    self.check_ack(buf, &hub)?;
                    if let Some(up) = hub.next_seq.prev() {
                        ack_tx.send_if_modified(|v| {
                            let newer = up.get() > *v;
                            if newer {
                                *v = up.get();
                            }
                            newer
                        });
                    }
                    self.sync_update(|s| {
                        s.sync_records_acked += u64::from(ack.stored);
                        s.sync_duplicates += u64::from(ack.duplicates);
                        s.hub_next_seq = hub.next_seq.get();
                        s.sync_last_ack = Some(crate::rfc3339(self.inner.clock.now()));
                    });
                }
                c = buf.committed_after(seen), if inflight.is_empty() && pause.is_zero() && linger_until.is_none() => {
                    seen = c?;
                }
                _ = tokio::time::sleep_until(linger_until.unwrap_or(now).into()), if linger_until.is_some() => {}
                _ = tokio::time::sleep(pause), if !pause.is_zero() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)), if inflight.is_empty() && pause.is_zero() => {}
            }
            if inflight.is_empty() && !resync && hub.next_seq > sent.next_seq {
                // The hub holds more than this session sent (an earlier
                // session's batch landed after all): skip ahead.
                sent = hub;
            }
        }
    }

    /// Deletes what the hub holds, now.
    async fn ack_buffer(&self, buf: &EvidenceBuffer, hub: &ChainPosition) -> Result<(), SyncError> {
        let Some(up_to) = hub.next_seq.prev() else {
            return Ok(());
        };
        if up_to.get() <= buf.stats(self.now_evidence()).last_acked_seq {
            return Ok(());
        }
        self.check_ack(buf, hub)?;
        buf.ack(up_to).await?;
        Ok(())
    }

    /// An ack past the last committed record means the local buffer is not
    /// the one the hub's chain came from.
    fn check_ack(&self, buf: &EvidenceBuffer, hub: &ChainPosition) -> Result<(), SyncError> {
        let Some(up_to) = hub.next_seq.prev() else {
            return Ok(());
        };
        let st = buf.stats(self.now_evidence());
        if up_to.get() > st.last_committed_seq {
            return Err(SyncError::Other(format!(
                "the hub holds this spoke's evidence up to {} but the local buffer ends at {}: \
                 the local evidence database was replaced; evidence sync stops",
                up_to.get(),
                st.last_committed_seq
            )));
        }
        Ok(())
    }

    fn now_evidence(&self) -> tidemesh_evidence::UnixMillis {
        tidemesh_evidence::UnixMillis(unix_ms(self.inner.clock.now()))
    }
}

impl Spoke {
    /// The Prometheus page (`run --metrics ADDR`): connection state,
    /// certificate expiry, config version, evidence buffer depth and sync.
    pub fn metrics_page(&self) -> String {
        use tidemesh_net::metrics::{Exposition, Kind::*};
        let now = self.inner.clock.now();
        let mut e = Exposition::new();
        tidemesh_net::build_info::write(&mut e);
        let (store, node) = match tidemesh_identity::naming::classify(self.id()) {
            Some(tidemesh_identity::MeshIdentity::Node { store, node }) => (store, node),
            _ => (String::new(), String::new()),
        };
        e.family(
            "tidemesh_spoke_info",
            Gauge,
            "Always 1: who this spoke is (its store, node name and SPIFFE ID), to join with its other series.",
        )
        .sample(
            &[
                ("store", &store),
                ("spoke", &node),
                ("spiffe_id", &self.id().to_string()),
            ],
            1.0,
        );
        let state = self.state();
        e.single(
            "tidemesh_spoke_connected",
            Gauge,
            "1 while a control session with the hub is up.",
            f64::from(u8::from(state == crate::State::Connected)),
        );
        let fam = e.family(
            "tidemesh_spoke_state",
            Gauge,
            "The spoke's state (1 for the current one).",
        );
        for s in [
            "connecting",
            "connected",
            "disconnected",
            "revoked",
            "needs_enrollment",
        ] {
            let cur = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(|x| x == s))
                .unwrap_or(false);
            fam.sample(&[("state", s)], f64::from(u8::from(cur)));
        }
        let ready = self.readiness();
        e.single(
            "tidemesh_spoke_ready",
            Gauge,
            "1 while /readyz answers 200: started, a last-known-good config in force and a valid node CA (the hub need not be reachable).",
            f64::from(u8::from(ready.ready)),
        );
        let cur = self.inner.creds.current();
        let unix = |t: SystemTime| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs_f64().floor(),
            Err(_) => 0.0,
        };
        e.single(
            "tidemesh_spoke_node_cert_expiry_timestamp_seconds",
            Gauge,
            "When the node SVID expires (Unix time); renewed at --renew-at of its lifetime while the hub is reachable.",
            unix(cur.node.not_after),
        );
        if let Some(f) = cur.node_ca {
            e.single(
                "tidemesh_spoke_node_ca_expiry_timestamp_seconds",
                Gauge,
                "When the node CA expires (Unix time); it issues the workload SVIDs, offline too.",
                unix(f.not_after),
            );
        }
        let last_contact = if state == crate::State::Connected {
            Some(now)
        } else {
            self.inner
                .live
                .lock()
                .ok()
                .and_then(|l| l.last_contact_ms)
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        };
        if let Some(t) = last_contact {
            e.single(
                "tidemesh_spoke_last_contact_timestamp_seconds",
                Gauge,
                "Last time the hub answered this spoke (Unix time; now while connected): how stale the config, revocation list and time anchor may be.",
                unix(t),
            );
        }
        let view = self.inner.modes.view();
        let fam = e.family(
            "tidemesh_spoke_mode",
            Gauge,
            "The spoke-wide mode of the seed's mode matrix (1 for the current one).",
        );
        for m in ["target", "survival", "recovery"] {
            fam.sample(&[("mode", m)], f64::from(u8::from(view.spoke == m)));
        }
        let fam = e.family(
            "tidemesh_spoke_service_degraded",
            Gauge,
            "1 while a destination service is in Degraded (its own mode; the spoke-wide mode overrides it in Survival and Recovery).",
        );
        for (svc, m) in &view.services {
            fam.sample(&[("service", svc)], f64::from(u8::from(*m == "degraded")));
        }
        if let Some(p) = view.ramp_percent {
            e.single(
                "tidemesh_spoke_recovery_ramp_percent",
                Gauge,
                "Share of remote traffic the Recovery ramp admits, percent.",
                f64::from(p),
            );
        }
        e.single(
            "tidemesh_spoke_mode_transitions_total",
            Counter,
            "Mode transitions recorded since start (spoke-wide and per service).",
            view.transitions as f64,
        );
        let h = self.horizon();
        if let Some(v) = h.survival_horizon_s {
            e.single(
                "tidemesh_spoke_survival_horizon_seconds",
                Gauge,
                "Seconds this spoke can keep serving its store as now without the hub (the smallest survival budget).",
                v as f64,
            );
        }
        let fam = e.family(
            "tidemesh_spoke_survival_budget_seconds",
            Gauge,
            "Seconds until each survival budget runs out (absent: not bounded at the current rate).",
        );
        for (name, v) in &h.survival_budgets {
            if let Some(v) = v {
                fam.sample(&[("budget", name)], *v as f64);
            }
        }
        let fam = e.family(
            "tidemesh_spoke_survival_limit",
            Gauge,
            "1 for the budget that limits the survival horizon.",
        );
        for name in h.survival_budgets.keys() {
            fam.sample(
                &[("budget", name)],
                f64::from(u8::from(*name == h.survival_limit)),
            );
        }
        e.single(
            "tidemesh_spoke_time_trusted",
            Gauge,
            "1 while the spoke's time is trusted (hub-anchored, or a wall clock that passed the floor check); 0 when degraded.",
            f64::from(u8::from(self.inner.tclock.trusted())),
        );
        e.single(
            "tidemesh_spoke_revocation_list_version",
            Gauge,
            "Version of the revocation list this spoke enforces.",
            self.inner.creds.revocations().version() as f64,
        );
        if let Some(v) = self.config_version() {
            e.single(
                "tidemesh_spoke_config_version",
                Gauge,
                "The config version in force (last-known-good).",
                v as f64,
            );
        }
        if let Some(b) = self.inner.evidence.get() {
            let st = b.stats(self.now_evidence());
            let gauges: [(&str, &str, u64); 7] = [
                (
                    "tidemesh_spoke_evidence_last_committed_seq",
                    "Highest durably committed evidence sequence number.",
                    st.last_committed_seq,
                ),
                (
                    "tidemesh_spoke_evidence_last_acked_seq",
                    "Highest sequence number the hub acknowledged.",
                    st.last_acked_seq,
                ),
                (
                    "tidemesh_spoke_evidence_pending_records",
                    "Records in the buffer not yet acknowledged by the hub.",
                    st.pending_records,
                ),
                (
                    "tidemesh_spoke_evidence_pending_bytes",
                    "Bytes held by the evidence buffer.",
                    st.pending_bytes,
                ),
                (
                    "tidemesh_spoke_evidence_capacity_bytes",
                    "The evidence buffer's byte bound.",
                    st.capacity_bytes,
                ),
                (
                    "tidemesh_spoke_evidence_sync_lag_records",
                    "Committed records the hub has not acknowledged (sequence numbers).",
                    st.last_committed_seq.saturating_sub(st.last_acked_seq),
                ),
                (
                    "tidemesh_spoke_evidence_oldest_pending_age_seconds",
                    "Age of the oldest record not yet acknowledged (sync lag).",
                    st.oldest_pending_age_s,
                ),
            ];
            for (name, help, v) in gauges {
                e.single(name, Gauge, help, v as f64);
            }
            let counters: [(&str, &str, u64); 3] = [
                (
                    "tidemesh_spoke_evidence_shed_records_total",
                    "Records dropped under the byte bound and replaced by shed records.",
                    st.shed_records,
                ),
                (
                    "tidemesh_spoke_evidence_audit_refused_total",
                    "Audit records refused because the buffer was full.",
                    st.audit_refused,
                ),
                (
                    "tidemesh_spoke_evidence_commits_total",
                    "Group commits of the evidence buffer since start.",
                    st.commits,
                ),
            ];
            for (name, help, v) in counters {
                e.single(name, Counter, help, v as f64);
            }
            let fam = e.family(
                "tidemesh_spoke_evidence_lost_total",
                Counter,
                "Evidence records the buffer could not keep, by reason: disk_full and write_failed (shed from memory while commits failed; a shed record in the chain stands for them), backlogged, buffer_full, stopped (refused at append), too_large.",
            );
            for r in crate::buffer::LossReason::ALL {
                fam.sample(&[("reason", r.as_str())], st.lost.get(r) as f64);
            }
            e.single(
                "tidemesh_spoke_evidence_truncated_total",
                Counter,
                "Evidence records over the size limit stored truncated (marked).",
                st.truncated_records as f64,
            );
            e.single(
                "tidemesh_spoke_evidence_write_failures_total",
                Counter,
                "Evidence commits that failed (disk full, I/O error) and were retried.",
                st.write_failures as f64,
            );
            e.single(
                "tidemesh_spoke_evidence_degraded",
                Gauge,
                "1 while evidence commits fail and the writer retries, holding records in memory.",
                f64::from(u8::from(st.degraded.is_some())),
            );
        }
        let s = self.sync_stats();
        let counters: [(&str, &str, f64); 5] = [
            (
                "tidemesh_spoke_evidence_sync_batches_total",
                "Evidence batches sent to the hub.",
                s.sync_batches_sent as f64,
            ),
            (
                "tidemesh_spoke_evidence_sync_records_acked_total",
                "Records the hub acknowledged as newly stored.",
                s.sync_records_acked as f64,
            ),
            (
                "tidemesh_spoke_evidence_sync_duplicates_total",
                "Records the hub said it already held.",
                s.sync_duplicates as f64,
            ),
            (
                "tidemesh_spoke_evidence_sync_rejections_total",
                "Batches the hub refused.",
                s.sync_rejections as f64,
            ),
            (
                "tidemesh_spoke_evidence_sync_throttled_seconds_total",
                "Time the hub's retry-after paused the sync.",
                s.sync_throttled_ms as f64 / 1000.0,
            ),
        ];
        for (name, help, v) in counters {
            e.single(name, Counter, help, v);
        }
        let c = &self.inner.data_counters;
        let load =
            |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
        let fam = e.family(
            "tidemesh_spoke_dataplane_requests_total",
            Counter,
            "Requests answered to local apps, by status class.",
        );
        for (i, class) in ["none", "1xx", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .enumerate()
        {
            fam.sample(&[("class", class)], load(&c.requests[i]));
        }
        let counters: [(&str, &str, f64); 4] = [
            (
                "tidemesh_spoke_dataplane_retries_total",
                "Retries made (under the retry budget).",
                load(&c.retries),
            ),
            (
                "tidemesh_spoke_dataplane_breaker_opened_total",
                "Circuit breakers that opened (endpoints ejected).",
                load(&c.breaker_opened),
            ),
            (
                "tidemesh_spoke_dataplane_breaker_closed_total",
                "Circuit breakers that closed again after half-open probes.",
                load(&c.breaker_closed),
            ),
            (
                "tidemesh_spoke_dataplane_hub_unreachable_total",
                "Cloud calls answered 503 at once because the hub was unreachable.",
                load(&c.hub_unreachable),
            ),
        ];
        for (name, help, v) in counters {
            e.single(name, Counter, help, v);
        }
        c.latency.write(&mut e, &store);
        let fam = e.family(
            "tidemesh_spoke_dataplane_tunnel_refusals_total",
            Counter,
            "Tunnel handshakes, connections and streams refused by the per-address and per-peer caps, the spoke-wide limit or the header deadline, by reason.",
        );
        for why in crate::dataplane::TunnelRefusal::ALL {
            fam.sample(
                &[("reason", why.label())],
                c.tunnel_refused.get(why as usize).map(load).unwrap_or(0.0),
            );
        }
        e.finish()
    }
}
