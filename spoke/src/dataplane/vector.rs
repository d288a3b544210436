//! The guarantee vector of a service, from this spoke's live state.
//!
//! What it is: the facts behind each of the seed's six dimensions for one
//! destination service, per call path (local, same-site, cloud through the
//! hub gateway), read from what the data plane holds now: the config in
//! force, the endpoints and their breakers, the mode and its profile, the
//! SVIDs, the tunnel's TLS; the levels come from `tidemesh_policy::vector`
//! (the same ladders the hub uses on evidence). Each vector names the range
//! of evidence records of the service in its current mode that back it.
//! Who drives it: `tidemesh-spoke vector` (admin socket). What it must not
//! do: change anything it reads.

use serde_json::{json, Value};
use tidemesh_evidence::record::Mode as EvMode;
use tidemesh_policy::{
    model::{Action, BreakerMode, Observability, RoutingMode},
    vector::{self, CallPath},
    WorkloadRef,
};

use super::{
    resilience::{BreakerSettings, RetrySettings, MAX_RETRIES},
    resolve::{self, EndpointFacts, Target, Tier},
    Shared,
};

/// Most services whose evidence ranges are tracked (the least recently
/// recorded goes first).
const MAX_TRACKED: usize = 4096;

/// The evidence records of one service in one mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqRange {
    mode: EvMode,
    from: u64,
    to: u64,
    records: u64,
}

/// Notes record `seq` of `service` in `mode`: a new mode starts a new range.
pub(crate) fn note_record(s: &Shared, service: &str, mode: EvMode, seq: u64) {
    let Ok(mut m) = s.seqs.lock() else { return };
    if let Some(r) = m.get_mut(service) {
        if r.mode == mode {
            r.to = seq;
            r.records += 1;
        } else {
            *r = SeqRange {
                mode,
                from: seq,
                to: seq,
                records: 1,
            };
        }
        return;
    }
    if m.len() >= MAX_TRACKED {
        if let Some(oldest) = m.iter().min_by_key(|(_, r)| r.to).map(|(k, _)| k.clone()) {
            m.remove(&oldest);
        }
    }
    m.insert(
        service.to_owned(),
        SeqRange {
            mode,
            from: seq,
            to: seq,
            records: 1,
        },
    );
}

/// Every service host this spoke could route to, sorted.
pub(crate) fn hosts(s: &Shared) -> Vec<String> {
    let mut v: Vec<String> = s.compiled().hosts.iter().cloned().collect();
    v.sort();
    v
}

fn path_of(t: Tier) -> Option<CallPath> {
    match t {
        Tier::Local => Some(CallPath::Local),
        Tier::Site => Some(CallPath::SameSite),
        Tier::Cloud => Some(CallPath::Cloud),
        Tier::Any => None,
    }
}

fn secs_left(s: &Shared, t: std::time::SystemTime) -> i64 {
    match t.duration_since(s.now()) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The guarantee vector of `service` (a host as apps write it).
pub(crate) fn vector(s: &Shared, service: &str) -> Result<Value, String> {
    let namespace = s
        .workloads
        .first()
        .map(|w| w.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let compiled = s.compiled();
    let host = resolve::canonical_target(&compiled.hosts, service, &namespace)?;
    let endpoints = resolve::endpoint_facts(s, &host);
    if endpoints.is_empty() {
        return Err(format!(
            "no endpoint of {host} is known to this spoke (local, at its site or in the cloud)"
        ));
    }
    let profile = s.h.modes.profile(&host);
    let config = &compiled.config;
    let policy = config.destination_policy(&host);
    let lb = policy
        .and_then(|p| p.traffic.load_balancer)
        .unwrap_or_default();

    // Routing facts shared by every path.
    let rule = config.route_rule(&host);
    let split = rule.is_some_and(|r| {
        r.http
            .iter()
            .any(|h| h.route.len() > 1 || !h.matches.is_empty())
    });
    let weights: Vec<Value> = rule
        .map(|r| {
            r.http
                .iter()
                .flat_map(|h| {
                    h.route.iter().map(|d| {
                        json!({
                            "host": d.destination.host,
                            "subset": d.destination.subset,
                            "weight": d.weight,
                        })
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let ramp = profile.routing == RoutingMode::Ramp;
    let mode_routing = format!("{:?}", profile.routing).to_lowercase();

    // Reliability: what a request to this host gets now.
    let policy_retries = policy.and_then(|p| p.traffic.retries.as_ref());
    let mut retry = RetrySettings::from_policy(None, policy_retries);
    if policy_retries.is_none() {
        retry.attempts = profile.retries.attempts.min(MAX_RETRIES);
        retry.backoff = profile.retries.backoff;
    } else {
        retry.attempts = retry.attempts.min(profile.retries.attempts);
    }
    let breaker =
        BreakerSettings::from_policy(policy.and_then(|p| p.traffic.circuit_breaker.as_ref()))
            .under(profile.breaker);
    let error_breaker = matches!(profile.breaker, BreakerMode::ErrorRate(_));
    let reliability_ev = json!({
        "retries": retry.attempts,
        "backoff": format!("{:?}", retry.backoff.kind).to_lowercase(),
        "backoff_base_ms": retry.backoff.base.as_millis() as u64,
        "breaker": match profile.breaker {
            BreakerMode::ErrorRate(r) => json!({"open_at_error_rate": r.as_f64(), "consecutive_errors": breaker.consecutive_errors}),
            BreakerMode::FailFast => json!({"fail_fast": true, "consecutive_errors": breaker.consecutive_errors}),
        },
        "timeout_ms": policy.and_then(|p| p.traffic.timeout).map(|t| t.as_millis() as u64),
    });

    // Observability.
    let sampling = profile.sampling.as_f64();
    let metrics_only = matches!(
        config.mode_matrix.profile(profile.mode).observability,
        Observability::MetricsOnly { .. }
    );
    let observability_ev = json!({
        "trace_sampling": sampling,
        "metrics_only": metrics_only,
        "telemetry_buffered": profile.buffer_telemetry,
        "evidence_records": "one per request, hash-chained",
    });

    // Identity facts: the callers' SVIDs (this spoke's workloads).
    let creds = s.h.creds.current();
    let callers: Vec<Value> = s
        .workloads
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let svid = creds.workloads.get(i).cloned().flatten()?;
            Some(json!({
                "id": w.id.to_string(),
                "certificate": svid.chain.first().map(|c| tidemesh_evidence::Sha256Digest::of(c).to_string()),
                "expires_in_s": secs_left(s, svid.not_after),
            }))
        })
        .collect();

    // Paths, nearest first.
    let mut paths = Vec::new();
    for tier in [Tier::Local, Tier::Site, Tier::Cloud] {
        let eps: Vec<&EndpointFacts> = endpoints.iter().filter(|e| e.tier == tier).collect();
        if eps.is_empty() {
            continue;
        }
        let Some(path) = path_of(tier) else { continue };
        let usable = eps.iter().filter(|e| e.usable).count();
        let allowed_by_mode = !(tier == Tier::Cloud && profile.routing == RoutingMode::LocalOnly);
        // Authorization: the policies the serving end evaluates.
        let (dest_ns, labels) = match eps[0].target.as_ref() {
            Some(Target::Local(i)) => (
                s.workloads[*i].namespace.clone(),
                s.workloads[*i].labels.clone(),
            ),
            _ => (
                host.split_once('.')
                    .map(|(_, ns)| ns.to_owned())
                    .unwrap_or_default(),
                eps[0].labels.clone(),
            ),
        };
        let applicable = compiled.policies.applicable(WorkloadRef {
            namespace: &dest_ns,
            labels: &labels,
        });
        let default_deny = compiled.policies.default_action() == Action::Deny;
        let l7 = applicable.iter().any(|p| p.inspects_l7());
        let authz = vector::authorization(l7, !applicable.is_empty(), default_deny);
        let authz_ev = json!({
            "policies": applicable.iter().map(|p| format!("{}/{}", p.id.namespace, p.id.name)).collect::<Vec<_>>(),
            "default_action": if default_deny { "deny" } else { "allow" },
            "enforced_by": match path {
                CallPath::Local => "this spoke (inbound)",
                CallPath::SameSite => "the serving spoke (inbound)",
                CallPath::Cloud => "the hub gateway",
            },
            "config_version": compiled.version,
        });
        // Identity and security, by leg.
        let (identity, identity_ev, security, security_ev) = match path {
            CallPath::Local => (
                vector::identity(true, false),
                json!({
                    "callers": callers,
                    "server": eps[0].target.as_ref().and_then(|t| match t { Target::Local(i) => Some(s.workloads[*i].id.to_string()), _ => None }),
                    "note": "both workloads' SVIDs are held by this spoke (node proxy); no TLS between them",
                }),
                vector::security(&[]),
                json!({"legs": [], "note": "loopback on this spoke's box only: no network leg, not encrypted"}),
            ),
            CallPath::SameSite => {
                let servers: Vec<String> = eps
                    .iter()
                    .filter_map(|e| match &e.target {
                        Some(Target::Site { server, .. }) => Some(server.to_string()),
                        _ => None,
                    })
                    .collect();
                (
                    vector::identity(true, true),
                    json!({
                        "callers": callers,
                        "servers": servers,
                        "verified": "mutual TLS; chains through each spoke's node CA, store-scoped, revocation checked",
                        "revocation_version": s.h.creds.revocations().version(),
                    }),
                    vector::security(&[(true, true)]),
                    json!({"legs": [{"leg": "spoke_to_spoke", "encrypted": true, "mutual": true, "tls_version": "1.3", "cipher_suite": s.cipher_suite}]}),
                )
            }
            CallPath::Cloud => (
                // The gateway's leg to the cloud endpoint carries the caller
                // only as x-forwarded-client-cert: a claim, not mTLS.
                vector::identity(false, false),
                json!({
                    "callers": callers,
                    "spoke_to_gateway": "mutual TLS, SPIFFE IDs verified by the hub gateway",
                    "gateway_to_cloud": "none: the caller is named in x-forwarded-client-cert only",
                }),
                vector::security(&[(true, true), (false, false)]),
                json!({"legs": [
                    {"leg": "spoke_to_gateway", "encrypted": true, "mutual": true, "tls_version": "1.3", "cipher_suite": s.cipher_suite},
                    {"leg": "gateway_to_cloud", "encrypted": false, "mutual": false, "note": "plain HTTP (h2c for HTTP2/GRPC entries) from the hub to the cloud endpoint"}
                ]}),
            ),
        };
        // The end user: a JWT claim when the serving end verifies one
        // (this spoke's RequestAuthentications apply to its own and its
        // site's workloads alike; the hub gateway verifies none).
        let jwks = if path == CallPath::Cloud {
            Vec::new()
        } else {
            compiled.authn.jwks_facts(&dest_ns, &labels, config)
        };
        let now_ms = crate::unix_ms(s.now());
        let user = json!({
            "level": vector::user_identity(!jwks.is_empty()),
            "verified_by": if jwks.is_empty() { None } else { Some("jwt") },
            "checked_by": if jwks.is_empty() { None } else { Some(authz_ev["enforced_by"].clone()) },
            "key_sets": jwks.iter().map(|f| json!({
                "policy": f.policy,
                "issuer": f.issuer,
                "jwks": f.source,
                "keys": f.keys,
                "jwks_age_s": f.read_at_ms.or(compiled.hub_applied_ms).map(|t| now_ms.saturating_sub(t) / 1000),
            })).collect::<Vec<_>>(),
            "note": if jwks.is_empty() {
                "no RequestAuthentication applies: a user token, if sent, is not checked by the mesh"
            } else {
                "the user is a claim (JWT issuer/subject, checked by signature against a key set read by the hub at apply), not an mTLS identity like the services': weaker across this hop"
            },
        });
        let mut identity_ev = identity_ev;
        if let Some(o) = identity_ev.as_object_mut() {
            o.insert("user".into(), user.clone());
        }
        let shaped = split || (ramp && path == CallPath::Cloud);
        // Survival's local only is one fixed choice; the other modes pick
        // by load balancer among healthy endpoints with breakers.
        let balanced = profile.routing != RoutingMode::LocalOnly;
        let routing_ev = json!({
            "mode_routing": mode_routing,
            "algorithm": format!("{:?}", lb.algorithm).to_lowercase(),
            "locality_aware": lb.locality_aware,
            "endpoints": eps.iter().map(|e| json!({"address": e.address, "usable": e.usable})).collect::<Vec<_>>(),
            "usable_endpoints": usable,
            "allowed_by_mode": allowed_by_mode,
            "route_weights": weights,
            "ramp_percent": if path == CallPath::Cloud { profile.ramp_percent } else { None },
        });
        let dims = json!({
            "identity": {"level": identity, "user_level": user["level"], "evidence": identity_ev},
            "authorization": {"level": authz, "evidence": authz_ev},
            "routing": {"level": vector::routing(shaped, balanced), "evidence": routing_ev},
            "reliability": {"level": vector::reliability(error_breaker, retry.attempts), "evidence": reliability_ev.clone()},
            "observability": {"level": vector::observability(true, sampling, true), "evidence": observability_ev.clone()},
            "security": {"level": security, "evidence": security_ev},
        });
        paths.push((
            tier,
            usable > 0 && allowed_by_mode,
            json!({
                "path": path.as_str(),
                "usable": usable > 0 && allowed_by_mode,
                "dimensions": dims,
            }),
        ));
    }
    // The dimensions of the path routing takes now: the nearest usable one
    // (every tier as one pool when the destination is not locality aware:
    // then the weakest of them).
    let chosen = paths
        .iter()
        .find(|(_, usable, _)| *usable)
        .or_else(|| paths.first())
        .map(|(_, _, v)| v.clone())
        .unwrap_or(Value::Null);
    let seqs = s.seqs.lock().ok().and_then(|m| m.get(&host).copied());
    let mode = profile.mode.as_str();
    let plaintext = plaintext_inbound(s, &compiled.config, &host);
    Ok(json!({
        "plaintext_inbound": plaintext,
        "service": host,
        "mode": mode,
        "path": chosen["path"],
        "dimensions": chosen["dimensions"],
        "paths": paths.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
        "evidence": seqs.filter(|r| super::super::modes::ev_mode(profile.mode) == r.mode).map(|r| json!({
            "from_seq": r.from,
            "to_seq": r.to,
            "records": r.records,
            "note": "request records of this service in its current mode",
        })),
    }))
}

/// What local clients outside the mesh get on this spoke's workloads of
/// `host` with a `plaintext_inbound` listener: no identity, no encryption,
/// admitted or not by the PeerAuthentication mode in force for the
/// workload's inbound port.
fn plaintext_inbound(s: &Shared, config: &tidemesh_policy::MeshConfig, host: &str) -> Vec<Value> {
    s.workloads
        .iter()
        .filter(|w| w.service == host)
        .filter_map(|w| {
            let listener = w.plaintext?;
            let port = w.inbound.map(|a| a.port()).unwrap_or(0);
            let mtls = config.peer_mtls(&w.namespace, &w.labels, port);
            Some(json!({
                "workload": w.id.to_string(),
                "listener": listener.to_string(),
                "mtls_mode": mtls.mode.as_str(),
                "decided_by": mtls.to_string(),
                "accepts_plaintext": mtls.mode.accepts_plaintext(),
                "identity": {"level": vector::identity(false, false), "evidence": "no peer certificate: authorized with no principal"},
                "security": {"level": vector::security(&[(false, false)]), "evidence": "plaintext HTTP from the local client to this spoke"},
            }))
        })
        .collect()
}
