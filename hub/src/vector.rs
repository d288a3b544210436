//! The guarantee vector of a service as the hub can prove it: from the
//! evidence records the spokes synced.
//!
//! What it is: for one service (and one spoke, or every spoke that called
//! it), the newest request record the calling spoke wrote for each call
//! path (local, same-site, cloud), read into the seed's six dimensions with
//! the ladders of `tidemesh_policy::vector` (the same the spokes use on
//! their live state). The evidence of each level is the record's own
//! fields, and the vector names the records it read (spoke, seq). Who
//! drives it: `tidemesh-hub vector` (admin socket, or `evidence.db`
//! directly). What it must not do: claim more than the records show: a
//! level the records cannot back says so (`unknown`).

use serde_json::{json, Value};
use tidemesh_evidence::{
    record::{BreakerState, EnforcementPoint, Mode, RecordBody, RequestEvidence, TlsVersion},
    RecordKind, SealedRecord,
};
use tidemesh_identity::SpiffeId;
use tidemesh_policy::vector::{self, CallPath};

use crate::evidence::{EvidenceBackend, Query};

/// Records read per spoke, newest first.
const WINDOW: u64 = 5_000;

fn path_of(r: &RequestEvidence) -> Option<CallPath> {
    let reason = &r.routing_decision.as_ref()?.selection_reason;
    if reason.contains("local_endpoint_preferred") {
        Some(CallPath::Local)
    } else if reason.contains("same_site_peer") {
        Some(CallPath::SameSite)
    } else if reason.contains("cloud_via_hub_gateway") {
        Some(CallPath::Cloud)
    } else {
        None
    }
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Target => "target",
        Mode::Degraded => "degraded",
        Mode::Survival => "survival",
        Mode::Recovery => "recovery",
    }
}

/// The dimensions one record backs, for `path`.
fn dimensions(r: &RequestEvidence, path: CallPath, sampling: f64) -> Value {
    let id = r.identity.as_ref();
    let tls = id.is_some_and(|i| i.tls_version != TlsVersion::None);
    let spiffe = id.is_some_and(|i| i.client_identity.is_some() && i.server_identity.is_some());
    let identity = match path {
        CallPath::Cloud => vector::identity(false, false),
        _ => vector::identity(spiffe && (tls || path == CallPath::Local), tls),
    };
    let authz = match &r.policy_evaluation {
        Some(p) => json!({"level": "recorded_by_the_enforcer", "evidence": p}),
        None => json!({
            "level": "unknown",
            "evidence": match path {
                CallPath::Local => "no decision in the record",
                CallPath::SameSite => "decided by the serving spoke: see its inbound record",
                CallPath::Cloud => "decided by the hub gateway (counted in tidemesh_hub_gateway_requests_total)",
            }
        }),
    };
    let routing = r.routing_decision.as_ref();
    let shaped = routing.is_some_and(|d| {
        d.selection_reason.contains("split")
            || d.selection_reason.contains("ramp")
            || d.version.is_some()
    });
    let balanced = r.mode != Mode::Survival;
    let rel = r.reliability.as_ref();
    let retries = rel.map_or(0, |x| x.retry_state.max_attempts.saturating_sub(1));
    let breaker =
        rel.is_some_and(|x| x.circuit_breaker.error_threshold.0 > 0) && r.mode != Mode::Survival;
    let legs: Vec<(bool, bool)> = match path {
        CallPath::Local => vec![],
        CallPath::SameSite => vec![(tls, tls)],
        CallPath::Cloud => vec![(tls, tls), (false, false)],
    };
    json!({
        "identity": {"level": identity, "evidence": id},
        "authorization": authz,
        "routing": {"level": vector::routing(shaped, balanced), "evidence": routing},
        "reliability": {"level": vector::reliability(breaker, retries), "evidence": rel.map(|x| json!({
            "retry_state": x.retry_state,
            "circuit_breaker": x.circuit_breaker,
            "breaker_open": x.circuit_breaker.state == BreakerState::Open,
        }))},
        "observability": {"level": vector::observability(true, sampling, true), "evidence": {
            "trace_id": r.telemetry.trace_id,
            "trace_sampling_of_the_mode": sampling,
            "per_request_record": true,
        }},
        "security": {"level": vector::security(&legs), "evidence": {
            "tls_version": id.map(|i| i.tls_version),
            "cipher_suite": id.and_then(|i| i.cipher_suite.clone()),
            "legs": match path {
                CallPath::Local => json!([]),
                CallPath::SameSite => json!(["spoke_to_spoke"]),
                CallPath::Cloud => json!(["spoke_to_gateway (as recorded)", "gateway_to_cloud (plain HTTP)"]),
            },
        }},
    })
}

/// The newest outbound request records of `service` from `spoke`, newest
/// first (at most the last [`WINDOW`] records of the spoke are read).
fn newest(
    store: &dyn EvidenceBackend,
    spoke: &SpiffeId,
    service: &str,
) -> Result<Vec<SealedRecord>, String> {
    let st = store.stats(spoke).map_err(|e| e.to_string())?;
    let from = st.high_water_mark.saturating_sub(WINDOW);
    let mut recs = store
        .query(
            spoke,
            &Query {
                since: None,
                kind: Some(RecordKind::Request),
                from_seq: Some(from),
                limit: WINDOW as usize,
            },
        )
        .map_err(|e| e.to_string())?;
    recs.retain(|r| match &r.body {
        RecordBody::Request(q) => {
            q.service_name == service && q.enforcement_point == EnforcementPoint::SidecarOutbound
        }
        _ => false,
    });
    recs.reverse();
    Ok(recs)
}

/// The vector of `service` as `spoke` (or each spoke in `spokes`) called
/// it, from the records at the hub; `sampling` is the trace sampling of
/// each mode of the mode matrix in force.
pub fn vector(
    store: &dyn EvidenceBackend,
    spokes: &[SpiffeId],
    service: &str,
    sampling: &dyn Fn(Mode) -> f64,
) -> Result<Value, String> {
    let mut out = Vec::new();
    for spoke in spokes {
        let recs = newest(store, spoke, service)?;
        let Some(first) = recs.first() else { continue };
        let mut paths: Vec<(CallPath, &SealedRecord)> = Vec::new();
        for r in &recs {
            if let RecordBody::Request(q) = &r.body {
                if let Some(p) = path_of(q) {
                    if !paths.iter().any(|(x, _)| *x == p) {
                        paths.push((p, r));
                    }
                }
            }
        }
        let RecordBody::Request(newest) = &first.body else {
            continue;
        };
        let newest_path = path_of(newest);
        let pv: Vec<Value> = paths
            .iter()
            .filter_map(|(p, r)| match &r.body {
                RecordBody::Request(q) => Some(json!({
                    "path": p.as_str(),
                    "record": {"seq": r.seq.get(), "timestamp": r.timestamp, "mode": mode_str(q.mode)},
                    "dimensions": dimensions(q, *p, sampling(q.mode)),
                })),
                _ => None,
            })
            .collect();
        let mode_seqs: Vec<u64> = recs
            .iter()
            .take_while(|r| matches!(&r.body, RecordBody::Request(q) if q.mode == newest.mode))
            .map(|r| r.seq.get())
            .collect();
        out.push(json!({
            "service": service,
            "spoke": spoke.to_string(),
            "mode": mode_str(newest.mode),
            "path": newest_path.map(CallPath::as_str),
            "dimensions": newest_path.map(|p| dimensions(newest, p, sampling(newest.mode))),
            "paths": pv,
            "evidence": {
                "from_seq": mode_seqs.last(),
                "to_seq": mode_seqs.first(),
                "records": mode_seqs.len(),
                "note": "this spoke's outbound request records of the service in its newest mode, as synced to the hub",
            },
        }));
    }
    if out.is_empty() {
        return Err(format!(
            "no request record for {service} at the hub (from {}): has a spoke called it and synced its evidence?",
            if spokes.len() == 1 { spokes[0].to_string() } else { "any spoke".into() }
        ));
    }
    Ok(if out.len() == 1 {
        out.remove(0)
    } else {
        Value::Array(out)
    })
}
