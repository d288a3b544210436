//! Fixed, realistic records built from the seed's examples: for tests,
//! benches, golden files and `drill load` (which appends
//! [`drill_request`]s). Deterministic: the same arguments give the same
//! record, byte for byte.

use tidemesh_identity::SpiffeId;

use crate::record::*;
use crate::types::*;

fn id(s: &str) -> Option<SpiffeId> {
    SpiffeId::parse(s).ok()
}

/// A full request record as the seed's Parts II and V describe one (an
/// inbound `POST /api/charge` to `backend.payments`, allowed, routed by
/// weighted round robin, no retries, breaker closed). `i` varies the trace
/// ids, timing and status so consecutive records differ.
pub fn request(i: u64, at: UnixMillis) -> RecordBody {
    let mut trace = [0u8; 16];
    trace[8..].copy_from_slice(&i.to_be_bytes());
    trace[0] = 0xab;
    RecordBody::Request(Box::new(RequestEvidence {
        service_name: "backend.payments".into(),
        enforcement_point: EnforcementPoint::SidecarInbound,
        mode: Mode::Target,
        identity: Some(IdentityEvidence {
            client_identity: id("spiffe://cluster.local/ns/default/sa/frontend"),
            server_identity: id("spiffe://cluster.local/ns/payments/sa/backend"),
            certificate_fingerprint: Some(Sha256Digest([0xab; 32])),
            tls_version: TlsVersion::Tls13,
            cipher_suite: Some("TLS_AES_256_GCM_SHA384".into()),
            trust_chain_verified: true,
            handshake_duration_us: None,
        }),
        policy_evaluation: Some(AuthorizationEvidence {
            policy_name: "allow-frontend-to-backend".into(),
            policy_version: "v1.2.3".into(),
            matched_rule: Some("0".into()),
            final_decision: Decision::Allow,
            reason: "identity_matches_and_method_allowed".into(),
            evaluation_time_us: 3,
            cached: false,
        }),
        rate_limit_check: Some(RateLimitEvidence {
            decision: RateDecision::Allowed,
            tokens_remaining: 5,
            limit: 100,
            current_rate: 95,
        }),
        routing_decision: Some(RoutingEvidence {
            load_balancing_algorithm: LbAlgorithm::WeightedRoundRobin,
            available_endpoints: vec![
                EndpointCandidate {
                    address: "10.0.1.5:8080".into(),
                    weight: 90,
                    healthy: true,
                    locality: Some(Locality::SameZone),
                },
                EndpointCandidate {
                    address: "10.0.1.8:8080".into(),
                    weight: 10,
                    healthy: true,
                    locality: Some(Locality::SameRegion),
                },
            ],
            selected_endpoint: Some("10.0.1.5:8080".into()),
            selection_reason: "weighted_distribution_v1_90_percent".into(),
            locality: Some(Locality::SameZone),
            version: Some("v1".into()),
        }),
        reliability: Some(ReliabilityEvidence {
            circuit_breaker: BreakerEvidence {
                state: BreakerState::Closed,
                error_rate: Ratio(50_000),
                error_threshold: Ratio(500_000),
                consecutive_errors: 0,
            },
            retry_state: RetryState {
                attempt: 1,
                max_attempts: 3,
                retries: 0,
                backoff: Backoff::Exponential,
                backoff_ms: 0,
            },
        }),
        telemetry: TelemetryEvidence {
            trace_id: Some(TraceId(trace)),
            span_id: Some(SpanId((i ^ 0x5a5a).to_be_bytes())),
            parent_span_id: Some(SpanId(i.to_be_bytes())),
            operation_name: "POST /api/charge".into(),
            start_time: at,
            duration_us: 245_000 + (i % 1000),
            status: Status {
                code: StatusCode::Ok,
                message: String::new(),
            },
            status_code: Some(200),
        },
        drill: None,
        user_identity: None,
        trace_sampled: true,
    }))
}

/// A synthetic request tagged as drill record `index` of run `run`.
pub fn drill_request(run: &str, index: u64, at: UnixMillis) -> RecordBody {
    match request(index, at) {
        RecordBody::Request(mut r) => {
            r.drill = Some(DrillMarker {
                run: run.to_owned(),
                index,
            });
            RecordBody::Request(r)
        }
        other => other,
    }
}

/// The seed's Target → Degraded transition (Part IV).
pub fn mode_transition() -> RecordBody {
    RecordBody::ModeTransition(ModeTransition {
        from: Mode::Target,
        to: Mode::Degraded,
        trigger: Trigger::HighErrorRate,
        evidence: TransitionEvidence {
            service: Some("backend.payments".into()),
            error_rate: Some(Ratio(350_000)),
            threshold: Some(Ratio(300_000)),
            window_s: Some(300),
            failed_requests: Some(350),
            total_requests: Some(1000),
            ..TransitionEvidence::default()
        },
        actions: vec![
            "reduce_retry_attempts_to_2".into(),
            "lower_circuit_breaker_threshold_to_30_percent".into(),
            "reduce_trace_sampling_to_10_percent".into(),
            "enable_localhost_caching".into(),
        ],
    })
}

/// A node certificate renewal.
pub fn certificate_renewed(at: UnixMillis) -> RecordBody {
    RecordBody::Certificate(CertificateEvent {
        event: CertEventKind::Renewed,
        // A constant, valid SPIFFE ID (the tests parse it too).
        spiffe_id: SpiffeId::parse("spiffe://edge.company.com/store/sf01/node/n1")
            .expect("constant spiffe id is valid"),
        certificate_fingerprint: Sha256Digest([0x11; 32]),
        serial_number: "0a1b2c3d4e5f60718293a4b5c6d7e8f9".into(),
        issued_at: at,
        expires_at: UnixMillis(at.0 + 3_600_000),
        issuer: "spiffe://edge.company.com".into(),
    })
}

/// A mesh configuration version applied from the hub.
pub fn config_applied() -> RecordBody {
    RecordBody::ConfigApplied(ConfigApplied {
        config: ConfigKind::Mesh,
        version: "7".into(),
        previous_version: Some("6".into()),
        digest: Sha256Digest([0x22; 32]),
        source: ConfigSource::Hub,
    })
}
