//! What operators read: the evidence admin commands (`tidemesh-hub evidence
//! query|verify|stats|prune`, `tidemesh-hub stats`), the Prometheus page and
//! the retention loop.
//!
//! [`evidence_command`] works on an [`EvidenceStore`] alone, so the CLI can
//! answer from `evidence.db` directly when the hub is not running (after a
//! crash, or to verify a copied file).

use std::{sync::atomic::Ordering, time::Duration};

use serde_json::{json, Value};
use tidemesh_evidence::{RecordKind, UnixMillis};
use tidemesh_identity::SpiffeId;
use tracing::{info, warn};

use crate::evidence::{EvidenceBackend, Query};
use crate::Hub;

/// How long `/readyz` waits for a read of `hub.db`.
pub const READY_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Most records one `evidence query` returns.
pub const MAX_QUERY_LIMIT: u64 = 5_000;

fn now_ms() -> u64 {
    crate::unix_ms(std::time::SystemTime::now())
}

/// Runs an evidence admin command (`evidence_query`, `evidence_verify`,
/// `evidence_stats`, `evidence_prune`, `stats`) against `store`. Blocking.
pub fn evidence_command(store: &dyn EvidenceBackend, req: &Value) -> Result<Value, String> {
    let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
    let spoke = || -> Result<SpiffeId, String> {
        let s = req
            .get("spoke")
            .and_then(Value::as_str)
            .ok_or("missing --spoke")?;
        SpiffeId::parse(s).map_err(|e| format!("--spoke {s}: {e}"))
    };
    match cmd {
        "evidence_query" => {
            let id = spoke()?;
            let since = match req.get("since").and_then(Value::as_str) {
                None => None,
                Some(t) => Some(parse_since(t)?),
            };
            let kind = match req.get("kind").and_then(Value::as_str) {
                None => None,
                Some(k) => Some(RecordKind::parse(k).ok_or_else(|| {
                    format!("--kind {k:?}: expected one of request, mode_transition, certificate, config_applied, shed")
                })?),
            };
            let limit = req
                .get("limit")
                .and_then(Value::as_u64)
                .unwrap_or(1_000)
                .min(MAX_QUERY_LIMIT) as usize;
            let from_seq = req.get("from_seq").and_then(Value::as_u64);
            let recs = store
                .query(
                    &id,
                    &Query {
                        since,
                        kind,
                        from_seq,
                        limit,
                    },
                )
                .map_err(|e| e.to_string())?;
            serde_json::to_value(recs).map_err(|e| e.to_string())
        }
        "evidence_verify" => {
            let r = store.verify(&spoke()?).map_err(|e| e.to_string())?;
            serde_json::to_value(r).map_err(|e| e.to_string())
        }
        "evidence_stats" => {
            let r = store.stats(&spoke()?).map_err(|e| e.to_string())?;
            serde_json::to_value(r).map_err(|e| e.to_string())
        }
        "evidence_prune" => {
            let retention = crate::evidence::Retention {
                max_age: req
                    .get("max_age_s")
                    .and_then(Value::as_u64)
                    .map(Duration::from_secs),
                max_bytes_per_spoke: req.get("max_bytes").and_then(Value::as_u64),
            };
            let r = store
                .prune(&retention, UnixMillis(now_ms()))
                .map_err(|e| e.to_string())?;
            serde_json::to_value(r).map_err(|e| e.to_string())
        }
        "stats" => {
            let spokes = store.spokes().map_err(|e| e.to_string())?;
            let aggregates = store.aggregates(None).map_err(|e| e.to_string())?;
            let records: u64 = spokes.iter().map(|s| s.records).sum();
            let bytes: u64 = spokes.iter().map(|s| s.bytes).sum();
            let gaps: u64 = spokes.iter().map(|s| s.gaps).sum();
            Ok(json!({
                "evidence_spokes": spokes.len(),
                "evidence_records": records,
                "evidence_bytes": bytes,
                "evidence_gaps": gaps,
                "chains_broken": spokes.iter().filter(|s| !s.chain_ok).count(),
                "per_spoke": spokes,
                "aggregates": aggregates,
            }))
        }
        other => Err(format!("unknown evidence command {other:?}")),
    }
}

/// `--since`: RFC 3339, or a duration back from now (`10m`, `2h`).
fn parse_since(t: &str) -> Result<UnixMillis, String> {
    if let Some(ms) = UnixMillis::parse_rfc3339(t) {
        return Ok(ms);
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(UnixMillis(now_ms().saturating_sub(d.as_millis() as u64))),
        Err(_) => Err(format!(
            "--since {t:?}: expected an RFC 3339 time (2026-11-27T10:00:00Z) or a duration (10m)"
        )),
    }
}

/// The labels of a spoke's series on the hub's page: its `store` and node
/// name (`spoke`) from its SPIFFE ID, and the ID itself (`spiffe_id`, as
/// `tidemesh-hub spokes` and `evidence --spoke` take it). One spoke, one
/// set: the three labels add no series over one another.
pub(crate) struct SpokeLabels {
    store: String,
    spoke: String,
    spiffe_id: String,
}

impl SpokeLabels {
    /// From a node SPIFFE ID (as stored); an ID of another shape keeps
    /// only `spiffe_id`, with `store` and `spoke` empty.
    pub(crate) fn of(id: &str) -> SpokeLabels {
        let (store, spoke) = match SpiffeId::parse(id)
            .ok()
            .and_then(|i| tidemesh_identity::naming::classify(&i))
        {
            Some(tidemesh_identity::MeshIdentity::Node { store, node }) => (store, node),
            _ => (String::new(), String::new()),
        };
        SpokeLabels {
            store,
            spoke,
            spiffe_id: id.to_owned(),
        }
    }

    fn as_labels(&self) -> [(&str, &str); 3] {
        [
            ("store", &self.store),
            ("spoke", &self.spoke),
            ("spiffe_id", &self.spiffe_id),
        ]
    }
}

/// The spokes that get per-spoke series, at most `max`: connected ones
/// first, then the most recently seen, ties by ID (so the set is stable
/// from one scrape to the next).
pub(crate) fn exported_spokes(all: &[crate::SpokeInfo], max: usize) -> Vec<&crate::SpokeInfo> {
    let mut v: Vec<&crate::SpokeInfo> = all.iter().collect();
    // RFC 3339 with milliseconds in UTC: the text order is the time order
    v.sort_by(|a, b| {
        b.connected
            .cmp(&a.connected)
            .then_with(|| b.last_seen.cmp(&a.last_seen))
            .then_with(|| a.id.cmp(&b.id))
    });
    v.truncate(max);
    v
}

/// Reads one figure of a spoke's evidence stats.
type StatFn = fn(&crate::evidence::SpokeEvidenceStats) -> f64;

impl Hub {
    pub(crate) fn ingest_counters_json(&self) -> Value {
        let c = &self.inner.ingest.counters;
        json!({
            "sessions": c.sessions.load(Ordering::Relaxed),
            "batches": c.batches.load(Ordering::Relaxed),
            "records": c.records.load(Ordering::Relaxed),
            "duplicates": c.duplicates.load(Ordering::Relaxed),
            "rejected_batches": c.rejected.load(Ordering::Relaxed),
            "throttled_acks": c.throttled.load(Ordering::Relaxed),
            "ahead_batches": c.ahead.load(Ordering::Relaxed),
            "batches_held": c.held.load(Ordering::Relaxed),
            "batches_held_peak": c.held_peak.load(Ordering::Relaxed),
            "store_failures": c.store_failures.load(Ordering::Relaxed),
        })
    }

    /// `evidence.db`'s state for `stats`: `ok`, or `disk_full` /
    /// `write_failed` with when it began and the last error.
    pub(crate) fn evidence_store_json(&self) -> Value {
        match self.inner.ingest.outage() {
            None => json!({"state": "ok"}),
            Some(o) => json!({
                "state": o.fault.as_str(),
                "since": crate::rfc3339_ms(o.since_ms),
                "error": o.error,
            }),
        }
    }

    /// Refusals by request and reason, for `tidemesh-hub stats`.
    pub(crate) fn refusals_json(&self) -> Value {
        let counts = self.refusal_counts();
        json!({
            "total": counts.iter().map(|(_, n)| n).sum::<u64>(),
            "by_reason": counts
                .iter()
                .map(|((req, reason), n)| json!({"request": req.as_str(), "reason": reason.as_str(), "count": n}))
                .collect::<Vec<_>>(),
        })
    }

    /// Applies retention every `prune_interval` (when any limit is set).
    pub(crate) async fn prune_loop(&self) {
        let r = self.inner.cfg.retention;
        if r.max_age.is_none() && r.max_bytes_per_spoke.is_none() {
            return;
        }
        let mut t = tokio::time::interval(self.inner.cfg.prune_interval);
        loop {
            t.tick().await;
            let store = self.inner.evidence.clone();
            let now = UnixMillis(self.now_ms());
            match tokio::task::spawn_blocking(move || store.prune(&r, now)).await {
                Ok(Ok(report)) => info!(report = ?report, "evidence retention applied"),
                Ok(Err(e)) => warn!(error = %e, "evidence retention failed"),
                Err(e) => warn!(error = %e, "evidence retention task failed"),
            }
        }
    }

    /// Whether the hub can serve spokes now, and why (`GET /readyz`,
    /// `tidemesh-hub healthcheck`): `serve` has bound its listeners, the
    /// CA certificate is valid and `hub.db` answers a read within
    /// [`READY_READ_TIMEOUT`]. A failing `evidence.db` does not make the hub
    /// unready (it keeps issuing and renewing; ingest waits), it is named
    /// in the reason.
    pub(crate) async fn readiness(&self) -> tidemesh_net::metrics::Readiness {
        use tidemesh_net::metrics::Readiness;
        if !self.inner.serving.load(Ordering::SeqCst) {
            return Readiness::not_ready("starting or stopping: listeners not serving");
        }
        if let Ok((_, not_after)) =
            tidemesh_identity::svid::cert_validity(&self.inner.ca.cert_der())
        {
            if not_after <= self.inner.clock.now() {
                return Readiness::not_ready(format!(
                    "the hub CA expired at {}: nothing it issues verifies",
                    humantime::format_rfc3339_seconds(not_after)
                ));
            }
        }
        let hub = self.clone();
        let read = tokio::task::spawn_blocking(move || hub.inner.store.meta("trust_domain"));
        match tokio::time::timeout(READY_READ_TIMEOUT, read).await {
            Ok(Ok(Ok(Some(_)))) => {}
            Ok(Ok(Ok(None))) => return Readiness::not_ready("hub.db holds no trust domain"),
            Ok(Ok(Err(e))) => return Readiness::not_ready(format!("hub.db unreadable: {e}")),
            Ok(Err(e)) => return Readiness::not_ready(format!("hub.db read failed: {e}")),
            Err(_) => {
                return Readiness::not_ready(format!(
                    "hub.db did not answer a read within {READY_READ_TIMEOUT:?}"
                ))
            }
        }
        let evidence = match self.inner.ingest.outage() {
            Some(o) => format!(", evidence.db failing ({:?}): ingest paused", o.fault),
            None => String::new(),
        };
        Readiness::ready(format!(
            "ready: serving trust domain {}, config version {}{evidence}",
            self.inner.td,
            *self.inner.config_tx.borrow()
        ))
    }

    /// The Prometheus page (`serve --metrics ADDR`).
    pub(crate) async fn metrics_page(&self) -> String {
        use tidemesh_net::metrics::{Exposition, Kind::*};
        let mut e = Exposition::new();
        tidemesh_net::build_info::write(&mut e);
        let ready = self.readiness().await;
        e.single(
            "tidemesh_hub_ready",
            Gauge,
            "1 while /readyz answers 200: listeners bound and hub.db readable.",
            f64::from(u8::from(ready.ready)),
        );
        if let Ok((_, not_after)) =
            tidemesh_identity::svid::cert_validity(&self.inner.ca.cert_der())
        {
            e.single(
                "tidemesh_hub_ca_expiry_timestamp_seconds",
                Gauge,
                "When the hub's CA certificate (the trust bundle) expires (Unix time).",
                not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64().floor())
                    .unwrap_or(0.0),
            );
        }
        let version = *self.inner.config_tx.borrow();
        e.single(
            "tidemesh_hub_config_version",
            Gauge,
            "The newest mesh config version applied at the hub (0: none); a spoke whose tidemesh_spoke_config_version is lower has not synced it yet.",
            version as f64,
        );
        let all = self.spokes().unwrap_or_default();
        e.single(
            "tidemesh_hub_spokes_enrolled",
            Gauge,
            "Spokes enrolled (revoked ones included).",
            all.len() as f64,
        );
        e.single(
            "tidemesh_hub_spokes_connected",
            Gauge,
            "Spokes with a live control session.",
            all.iter().filter(|s| s.connected).count() as f64,
        );
        let spokes = exported_spokes(&all, self.inner.cfg.metrics_max_spokes);
        e.single(
            "tidemesh_hub_spoke_series_omitted",
            Gauge,
            "Enrolled spokes left out of the per-spoke series (tidemesh_hub_spoke_*, tidemesh_hub_evidence_* by spoke): past --metrics-max-spokes, connected spokes are kept first, then the most recently seen.",
            all.len().saturating_sub(spokes.len()) as f64,
        );
        let labels: Vec<SpokeLabels> = spokes.iter().map(|s| SpokeLabels::of(&s.id)).collect();
        let f = e.family(
            "tidemesh_hub_spoke_connected",
            Gauge,
            "1 while the spoke has a live control session.",
        );
        for (s, l) in spokes.iter().zip(&labels) {
            f.sample(&l.as_labels(), f64::from(u8::from(s.connected)));
        }
        let f = e.family(
            "tidemesh_hub_spoke_cert_expiry_timestamp_seconds",
            Gauge,
            "When the spoke's current node SVID expires (Unix time).",
        );
        for (s, l) in spokes.iter().zip(&labels) {
            if let Some(t) = UnixMillis::parse_rfc3339(&s.cert_not_after) {
                f.sample(&l.as_labels(), (t.as_millis() / 1000) as f64);
            }
        }
        let f = e.family(
            "tidemesh_hub_spoke_survival_horizon_seconds",
            Gauge,
            "Seconds the spoke said it could last without the hub, at its last report (its limit in the label).",
        );
        for (s, l) in spokes.iter().zip(&labels) {
            if let (Some(h), Some(limit)) = (s.survival_horizon_s, s.survival_limit.as_deref()) {
                let mut with = l.as_labels().to_vec();
                with.push(("limit", limit));
                f.sample(&with, h as f64);
            }
        }
        let f = e.family(
            "tidemesh_hub_spoke_revocation_version",
            Gauge,
            "The revocation list version the spoke said it enforces, at its last report.",
        );
        for (s, l) in spokes.iter().zip(&labels) {
            if let Some(v) = s.revocation_version {
                f.sample(&l.as_labels(), v as f64);
            }
        }
        let f = e.family(
            "tidemesh_hub_spoke_config_version",
            Gauge,
            "The config version the spoke last reported as applied (compare with tidemesh_hub_config_version).",
        );
        for (s, l) in spokes.iter().zip(&labels) {
            if let Some(v) = s.config_version {
                f.sample(&l.as_labels(), v as f64);
            }
        }
        let f = e.family(
            "tidemesh_hub_spoke_config_stale",
            Gauge,
            "1 while the spoke has not reported the hub's newest config version as applied (STALE in `tidemesh-hub spokes`), 0 once it has (SYNCED); absent while the hub has no config.",
        );
        for (s, l) in spokes.iter().zip(&labels) {
            if let Some(state) = s.config_state {
                f.sample(&l.as_labels(), f64::from(u8::from(state != "SYNCED")));
            }
        }
        e.single(
            "tidemesh_hub_revocation_list_version",
            Gauge,
            "The revocation list version in force at the hub.",
            self.revocation_version() as f64,
        );
        let c = &self.inner.ingest.counters;
        e.single(
            "tidemesh_hub_evidence_batches_held",
            Gauge,
            "Evidence batches read or decoded and not yet answered, across all sessions (at most twice --evidence-slots).",
            c.held.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "tidemesh_hub_evidence_batches_held_peak",
            Gauge,
            "The most evidence batches held at once since the hub started.",
            c.held_peak.load(Ordering::Relaxed) as f64,
        );
        let counters = [
            (
                "tidemesh_hub_evidence_batches_total",
                "Evidence batches committed.",
                &c.batches,
            ),
            (
                "tidemesh_hub_evidence_records_total",
                "Evidence records newly stored.",
                &c.records,
            ),
            (
                "tidemesh_hub_evidence_duplicates_total",
                "Evidence records received again and skipped (exactly-once dedupe).",
                &c.duplicates,
            ),
            (
                "tidemesh_hub_evidence_rejected_batches_total",
                "Evidence batches refused (signature, chain, fork).",
                &c.rejected,
            ),
            (
                "tidemesh_hub_evidence_throttled_acks_total",
                "Acks that told a spoke to back off.",
                &c.throttled,
            ),
            (
                "tidemesh_hub_evidence_sessions_total",
                "Evidence sync sessions opened.",
                &c.sessions,
            ),
        ];
        for (name, help, v) in counters {
            e.single(name, Counter, help, v.load(Ordering::Relaxed) as f64);
        }
        e.single(
            "tidemesh_hub_evidence_store_failures_total",
            Counter,
            "Evidence commits that failed on a full or failing evidence.db (nothing stored; the spoke retries).",
            c.store_failures.load(Ordering::Relaxed) as f64,
        );
        if let Some(x) = &self.inner.otlp {
            let c = &x.counters;
            e.single(
                "tidemesh_hub_otlp_spans_exported_total",
                Counter,
                "Spans built from ingested request records that the OTLP collector (--otlp-endpoint) accepted.",
                c.exported.load(Ordering::Relaxed) as f64,
            );
            e.single(
                "tidemesh_hub_otlp_spans_dropped_total",
                Counter,
                "Spans given up: the export queue was full, every try of their batch failed, or the collector refused them.",
                c.dropped.load(Ordering::Relaxed) as f64,
            );
            e.single(
                "tidemesh_hub_otlp_export_failures_total",
                Counter,
                "OTLP export requests that failed (each try counts): no connection, no answer in time, or an error status.",
                c.failures.load(Ordering::Relaxed) as f64,
            );
            e.single(
                "tidemesh_hub_otlp_queue_spans",
                Gauge,
                "Spans waiting to be exported.",
                x.queued() as f64,
            );
        }
        let outage = self.inner.ingest.outage();
        e.single(
            "tidemesh_hub_evidence_store_full",
            Gauge,
            "1 while evidence.db cannot grow (no space left): ingest paused, spokes told to retry.",
            f64::from(u8::from(
                outage.as_ref().map(|o| o.fault) == Some(crate::evidence::StorageFault::Full),
            )),
        );
        e.single(
            "tidemesh_hub_evidence_store_failing",
            Gauge,
            "1 while commits to evidence.db fail for any reason (full disk included).",
            f64::from(u8::from(outage.is_some())),
        );
        let f = e.family(
            "tidemesh_hub_refusals_total",
            Counter,
            "Control requests and frames refused, by request and reason (counted, not audited, for anonymous callers).",
        );
        for ((req, reason), n) in self.refusal_counts() {
            f.sample(
                &[("request", req.as_str()), ("reason", reason.as_str())],
                n as f64,
            );
        }
        if let Some(a) = self.admission() {
            let c = a.counts;
            let f = e.family(
                "tidemesh_hub_admission_total",
                Counter,
                "New connections and control sessions by admission decision: admitted, busy (closed with a retry-after), refused_global_cap / refused_address_cap (QUIC CONNECTION_REFUSED before the handshake), retry (QUIC Retry sent to validate the address), validated (arrived with a validated address), handshake (let through to the handshake).",
            );
            for (d, n) in [
                ("admitted", c.admitted),
                ("busy", c.busy),
                ("refused_global_cap", c.refused_global),
                ("refused_address_cap", c.refused_address),
                ("retry", c.retries),
                ("validated", c.validated),
                ("handshake", c.handshakes),
            ] {
                f.sample(&[("decision", d)], n as f64);
            }
            e.single(
                "tidemesh_hub_admission_rate",
                Gauge,
                "The new-session budget: control sessions admitted per second once the burst is spent (--admit-rate).",
                a.rate,
            );
            e.single(
                "tidemesh_hub_admission_admitted_per_second",
                Gauge,
                "Control sessions admitted per second, measured over the last 10 s.",
                a.admitted_rate,
            );
            e.single(
                "tidemesh_hub_admission_tokens",
                Gauge,
                "Tokens left in the new-session budget now.",
                a.tokens,
            );
            e.single(
                "tidemesh_hub_admission_retry_after_seconds",
                Gauge,
                "The retry-after a session refused now would be handed (the end of the schedule of slots handed out).",
                a.retry_after.as_secs_f64(),
            );
            e.single(
                "tidemesh_hub_connections_open",
                Gauge,
                "QUIC connections open now (control, gateway and handshaking).",
                f64::from(a.open),
            );
        }
        e.single(
            "tidemesh_hub_durable_busy_total",
            Counter,
            "Requests refused busy because every durable slot was taken and the queue of waiters was full.",
            self.inner.durable.refused() as f64,
        );
        if let Some((asked, granted)) = self.inner.udp_recv_buffer.lock().ok().and_then(|b| *b) {
            let f = e.family(
                "tidemesh_hub_udp_recv_buffer_bytes",
                Gauge,
                "The QUIC socket's receive buffer: what --udp-recv-buffer asked for and what the kernel granted (as getsockopt reports it).",
            );
            f.sample(&[("size", "requested")], asked as f64);
            f.sample(&[("size", "granted")], granted as f64);
        }
        let f = e.family(
            "tidemesh_hub_gateway_requests_total",
            Counter,
            "Requests to cloud services through the gateway, by result.",
        );
        for (result, n) in self.inner.gateway.counters() {
            f.sample(&[("result", result)], n as f64);
        }
        let f = e.family(
            "tidemesh_hub_gateway_refusals_total",
            Counter,
            "Gateway connections and streams refused by the per-peer caps, the global stream limit or the header deadline, by reason.",
        );
        for (reason, n) in self.inner.gateway.refusals() {
            f.sample(&[("reason", reason)], n as f64);
        }
        let store = self.inner.evidence.clone();
        let ev = tokio::task::spawn_blocking(move || store.spokes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let families: [(&str, &str, StatFn); 5] = [
            (
                "tidemesh_hub_evidence_high_water_mark",
                "Last evidence sequence number stored for the spoke.",
                |s| s.high_water_mark as f64,
            ),
            (
                "tidemesh_hub_evidence_stored_records",
                "Evidence records held for the spoke.",
                |s| s.records as f64,
            ),
            (
                "tidemesh_hub_evidence_stored_bytes",
                "Evidence bytes held for the spoke.",
                |s| s.bytes as f64,
            ),
            (
                "tidemesh_hub_evidence_gaps",
                "Gaps and breaks flagged in the spoke's chain.",
                |s| s.gaps as f64,
            ),
            (
                "tidemesh_hub_evidence_chain_ok",
                "1 while no gap or break has been flagged for the spoke.",
                |s| f64::from(u8::from(s.chain_ok)),
            ),
        ];
        // the same spokes as above, in the same bounded set
        let exported: std::collections::HashMap<&str, &SpokeLabels> = spokes
            .iter()
            .zip(&labels)
            .map(|(s, l)| (s.id.as_str(), l))
            .collect();
        let ev: Vec<_> = ev
            .iter()
            .filter_map(|s| exported.get(s.spoke.as_str()).map(|l| (s, *l)))
            .collect();
        for (name, help, get) in families {
            let f = e.family(name, Gauge, help);
            for (s, l) in &ev {
                f.sample(&l.as_labels(), get(s));
            }
        }
        let f = e.family(
            "tidemesh_hub_evidence_dropped_records",
            Gauge,
            "Records the spoke shed under its byte bound (reported by its shed records).",
        );
        for (s, l) in &ev {
            f.sample(&l.as_labels(), s.dropped as f64);
        }
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use tidemesh_identity::{
        clock::{FixedClock, SystemClock},
        TrustDomain,
    };

    use super::*;
    use crate::{Hub, HubConfig};

    #[tokio::test]
    async fn readiness_needs_serving_a_valid_ca_and_a_readable_hub_db() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("hub");
        let td = TrustDomain::new("ready.example").expect("td");
        crate::init(&dir, &td, &SystemClock).expect("init");
        let cfg = HubConfig {
            admin_socket: false,
            ..HubConfig::default()
        };
        {
            let hub = Hub::open(&dir, cfg.clone(), Arc::new(SystemClock)).expect("open");
            let r = hub.readiness().await;
            assert!(!r.ready && r.reason.starts_with("starting"), "{r:?}");
            hub.inner.serving.store(true, Ordering::SeqCst);
            let r = hub.readiness().await;
            assert!(r.ready, "{r:?}");
            assert!(
                r.reason.contains("serving trust domain ready.example"),
                "{r:?}"
            );
            let page = hub.metrics_page().await;
            assert!(page.contains("tidemesh_hub_ready 1\n"), "{page}");
            assert!(page.contains("tidemesh_hub_config_version 0\n"), "{page}");
        }
        // the same hub seen eleven years on: its ten-year CA has expired
        let later = SystemTime::now() + Duration::from_secs(11 * 365 * 24 * 3600);
        let hub = Hub::open(&dir, cfg, Arc::new(FixedClock(later))).expect("open");
        hub.inner.serving.store(true, Ordering::SeqCst);
        let r = hub.readiness().await;
        assert!(!r.ready, "{r:?}");
        assert!(r.reason.contains("the hub CA expired at"), "{r:?}");
    }

    #[test]
    fn per_spoke_series_are_capped_connected_first_then_most_recent() {
        let spoke = |node: &str, connected: bool, last_seen: &str| crate::SpokeInfo {
            id: format!("spiffe://m.example/store/s1/node/{node}"),
            connected,
            last_seen: last_seen.into(),
            ..Default::default()
        };
        let all = vec![
            spoke("old", false, "2026-12-01T10:00:00.000Z"),
            spoke("new", false, "2026-12-07T10:00:00.000Z"),
            spoke("live-b", true, "2026-12-07T11:00:00.000Z"),
            spoke("live-a", true, "2026-12-07T11:00:00.000Z"),
            spoke("mid", false, "2026-12-05T10:00:00.000Z"),
        ];
        let ids = |max| -> Vec<String> {
            exported_spokes(&all, max)
                .iter()
                .map(|s| SpokeLabels::of(&s.id).spoke)
                .collect()
        };
        assert_eq!(ids(10), ["live-a", "live-b", "new", "mid", "old"]);
        assert_eq!(ids(3), ["live-a", "live-b", "new"]);
        assert_eq!(ids(1), ["live-a"]);
        let l = SpokeLabels::of("spiffe://m.example/store/s1/node/n7");
        assert_eq!(
            l.as_labels(),
            [
                ("store", "s1"),
                ("spoke", "n7"),
                ("spiffe_id", "spiffe://m.example/store/s1/node/n7")
            ]
        );
        let odd = SpokeLabels::of("not an id");
        assert_eq!(odd.as_labels()[0], ("store", ""));
        assert_eq!(odd.as_labels()[2], ("spiffe_id", "not an id"));
    }
}
