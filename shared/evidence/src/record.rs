//! Evidence record types: the seed's evidence kinds (Parts II-V) as plain
//! data, and the sealed record that carries one through the chain.
//!
//! Who uses it: every component that produces evidence (data plane, mode
//! machine, credential renewal, config sync) builds a [`RecordBody`]; the
//! spoke buffer seals and stores it; sync and the hub move and read
//! [`SealedRecord`]s. What it must not do: I/O, clock reads, policy.
//!
//! # Encodings
//! One set of serde derives serves both encodings:
//! * **postcard** on disk and on the wire. Field order *is* the format:
//!   append fields or enum variants only at the end, and only with a format
//!   version bump (see `testdata/` and the golden tests). Optional evidence
//!   is `Option` (one byte when absent); no `skip_serializing_if`, no
//!   untagged or internally tagged enums, which postcard cannot read back.
//! * **JSON** for people and tools, with the seed's field names
//!   (`client_identity`, `certificate_fingerprint`, `policy_name`,
//!   `selected_endpoint`, `circuit_breaker`, `retry_state`, `trace_id`,
//!   `parent_span_id`, `rate_limit_check`, `trigger`, `evidence`,
//!   `actions`, …). Absent evidence renders as `null`. Enums are tagged
//!   externally (`{"request": {…}}`).
//!
//! Durations are microseconds and say so in their name (`duration_us`,
//! `evaluation_time_us`): the seed writes milliseconds, which would round a
//! 3 µs policy evaluation to 0.

use serde::{Deserialize, Serialize};
use tidemesh_identity::SpiffeId;

use crate::types::{
    ChainHash, EvidenceSeq, PriorityClass, Ratio, Sha256Digest, SpanId, TraceId, UnixMillis,
};

/// What a record says. The variant index is part of the format: append
/// new kinds at the end only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordBody {
    /// One request through a sidecar, with every per-request evidence kind
    /// (boxed: it is several times larger than the other kinds; serde
    /// encodes a box exactly like its content).
    Request(Box<RequestEvidence>),
    /// The spoke changed mode (Part IV).
    ModeTransition(ModeTransition),
    /// A certificate was issued, renewed or expired.
    Certificate(CertificateEvent),
    /// A configuration version was applied.
    ConfigApplied(ConfigApplied),
    /// A range of records was shed; written only by the buffer (see
    /// [`crate::chain`] for how it keeps the chain verifiable).
    Shed(ShedRecord),
}

impl RecordBody {
    /// The class a record of this kind normally gets: `Request` for
    /// requests, `Audit` for everything else. Callers may demote requests
    /// (e.g. verbose drill records) to `Debug`.
    pub fn default_class(&self) -> PriorityClass {
        match self {
            RecordBody::Request(_) => PriorityClass::Request,
            _ => PriorityClass::Audit,
        }
    }

    /// The kind without the data.
    pub fn kind(&self) -> RecordKind {
        match self {
            RecordBody::Request(_) => RecordKind::Request,
            RecordBody::ModeTransition(_) => RecordKind::ModeTransition,
            RecordBody::Certificate(_) => RecordKind::Certificate,
            RecordBody::ConfigApplied(_) => RecordKind::ConfigApplied,
            RecordBody::Shed(_) => RecordKind::Shed,
        }
    }
}

/// The kind of a [`RecordBody`] without its data. Same variant order, so
/// its postcard encoding is the body's leading variant index (see
/// [`RecordHeader`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// [`RecordBody::Request`].
    Request,
    /// [`RecordBody::ModeTransition`].
    ModeTransition,
    /// [`RecordBody::Certificate`].
    Certificate,
    /// [`RecordBody::ConfigApplied`].
    ConfigApplied,
    /// [`RecordBody::Shed`].
    Shed,
}

impl RecordKind {
    /// The snake_case name used in JSON and by `--kind` filters.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Request => "request",
            RecordKind::ModeTransition => "mode_transition",
            RecordKind::Certificate => "certificate",
            RecordKind::ConfigApplied => "config_applied",
            RecordKind::Shed => "shed",
        }
    }

    /// Parses [`RecordKind::as_str`].
    pub fn parse(s: &str) -> Option<RecordKind> {
        [
            RecordKind::Request,
            RecordKind::ModeTransition,
            RecordKind::Certificate,
            RecordKind::ConfigApplied,
            RecordKind::Shed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// The mode the spoke was in (the seed's mode matrix, Part IV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Normal operation: dynamic routing, full tracing.
    Target,
    /// Partial failures: healthy endpoints only, 10% sampling.
    Degraded,
    /// Network partition: local only, fail fast, metrics only.
    Survival,
    /// After a partition: ramping remote traffic back up.
    Recovery,
}

/// Which side of the sidecar produced a request record (the seed's
/// `enforcement_point`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcementPoint {
    /// Traffic arriving for a local workload.
    SidecarInbound,
    /// Traffic leaving a local workload.
    SidecarOutbound,
}

/// One request through a sidecar: the per-request evidence kinds bundled
/// (Parts II and V). A stage that did not run (no TLS on a local hop, no
/// routing after a denial, tracing off in Survival) is `None`.
///
/// Encoding: postcard writes the fields in order, except that `drill` and
/// `user_identity` share the last slot (see [`crate::record`]'s format
/// notes): without a user identity the slot is exactly the old
/// `Option<DrillMarker>` (tag 0 or 1), so every v1/v2 record decodes and
/// re-encodes to the same bytes; with one, the slot's tag is 2 (format v3),
/// followed by the drill marker option and the user identity. JSON has
/// both fields by name (`user_identity` absent in older JSON reads as
/// `null`).
///
/// Format v4 adds `trace_sampled`: a sampled record (every record before
/// v4) encodes exactly as in v3; an unsampled one writes tag 3 in the last
/// slot, followed by the drill marker option and the user identity option.
/// JSON has `trace_sampled` by name (absent in older JSON reads as `true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEvidence {
    /// The service the request was for, e.g. `backend.payments`.
    pub service_name: String,
    /// Inbound or outbound.
    pub enforcement_point: EnforcementPoint,
    /// The spoke's mode when the request was handled.
    pub mode: Mode,
    /// Who the peers were and how the connection was secured.
    pub identity: Option<IdentityEvidence>,
    /// The authorization decision.
    pub policy_evaluation: Option<AuthorizationEvidence>,
    /// The rate limiter's decision.
    pub rate_limit_check: Option<RateLimitEvidence>,
    /// How the endpoint was chosen.
    pub routing_decision: Option<RoutingEvidence>,
    /// Retries and circuit breaker.
    pub reliability: Option<ReliabilityEvidence>,
    /// Timing, status and trace context. Always present (latency and status
    /// feed the hub's aggregates even when tracing is off).
    pub telemetry: TelemetryEvidence,
    /// Set on synthetic records made by `drill load`.
    pub drill: Option<DrillMarker>,
    /// The end user, when the request carried a verified token: a *claim*
    /// the request made (issuer, subject), checked by JWT signature, not a
    /// peer proven by mTLS (format v3).
    pub user_identity: Option<UserIdentityEvidence>,
    /// Whether the request's trace was sampled (the caller's flag, or the
    /// mode's sampling rate for a new trace). An unsampled request keeps
    /// its record and its trace ids but is not exported as a span
    /// (format v4; every older record reads as sampled).
    pub trace_sampled: bool,
}

/// What kind of identity a user identity is: a claim carried by the
/// request. (Peers are identified by mTLS in [`IdentityEvidence`]; a user
/// is never more than a claim the mesh checked.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserIdentityKind {
    /// A claim in the request, verified by its signature.
    Claim,
}

/// How a user identity claim was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimVerification {
    /// A JWT's signature against a configured key set, with its issuer,
    /// audience and validity times (Istio `RequestAuthentication`).
    Jwt,
}

/// The end user behind a request, as a verified claim (Istio's request
/// principal `issuer/subject`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIdentityEvidence {
    /// Always [`UserIdentityKind::Claim`]: not an mTLS identity.
    pub kind: UserIdentityKind,
    /// How it was checked.
    pub verified_by: ClaimVerification,
    /// The token's issuer (`iss`).
    pub issuer: String,
    /// The token's subject (`sub`), if any.
    pub subject: Option<String>,
    /// The signature algorithm (`ES256`, `EdDSA`).
    pub algorithm: String,
    /// The key id the token named, if any.
    pub key_id: Option<String>,
    /// The `RequestAuthentication` whose rule verified it (`ns/name`).
    pub policy: String,
    /// The token's expiry.
    pub expires_at: UnixMillis,
    /// Age of the key set it was verified with, seconds (since the hub read
    /// it at apply).
    pub jwks_age_s: Option<u64>,
}

/// The last slot of a [`RequestEvidence`] in postcard: variants 0 and 1 are
/// the bytes of the `Option<DrillMarker>` it once was.
#[derive(Serialize)]
enum TailRef<'a> {
    None,
    Drill(&'a DrillMarker),
    WithUser(&'a Option<DrillMarker>, &'a UserIdentityEvidence),
    Unsampled(&'a Option<DrillMarker>, &'a Option<UserIdentityEvidence>),
}

#[derive(Deserialize)]
enum TailOwned {
    None,
    Drill(DrillMarker),
    WithUser(Option<DrillMarker>, UserIdentityEvidence),
    Unsampled(Option<DrillMarker>, Option<UserIdentityEvidence>),
}

#[derive(Serialize)]
struct WireRef<'a> {
    service_name: &'a String,
    enforcement_point: &'a EnforcementPoint,
    mode: &'a Mode,
    identity: &'a Option<IdentityEvidence>,
    policy_evaluation: &'a Option<AuthorizationEvidence>,
    rate_limit_check: &'a Option<RateLimitEvidence>,
    routing_decision: &'a Option<RoutingEvidence>,
    reliability: &'a Option<ReliabilityEvidence>,
    telemetry: &'a TelemetryEvidence,
    tail: TailRef<'a>,
}

#[derive(Deserialize)]
struct WireOwned {
    service_name: String,
    enforcement_point: EnforcementPoint,
    mode: Mode,
    identity: Option<IdentityEvidence>,
    policy_evaluation: Option<AuthorizationEvidence>,
    rate_limit_check: Option<RateLimitEvidence>,
    routing_decision: Option<RoutingEvidence>,
    reliability: Option<ReliabilityEvidence>,
    telemetry: TelemetryEvidence,
    tail: TailOwned,
}

#[derive(Serialize)]
struct JsonRef<'a> {
    service_name: &'a String,
    enforcement_point: &'a EnforcementPoint,
    mode: &'a Mode,
    identity: &'a Option<IdentityEvidence>,
    policy_evaluation: &'a Option<AuthorizationEvidence>,
    rate_limit_check: &'a Option<RateLimitEvidence>,
    routing_decision: &'a Option<RoutingEvidence>,
    reliability: &'a Option<ReliabilityEvidence>,
    telemetry: &'a TelemetryEvidence,
    drill: &'a Option<DrillMarker>,
    user_identity: &'a Option<UserIdentityEvidence>,
    trace_sampled: bool,
}

#[derive(Deserialize)]
struct JsonOwned {
    service_name: String,
    enforcement_point: EnforcementPoint,
    mode: Mode,
    identity: Option<IdentityEvidence>,
    policy_evaluation: Option<AuthorizationEvidence>,
    rate_limit_check: Option<RateLimitEvidence>,
    routing_decision: Option<RoutingEvidence>,
    reliability: Option<ReliabilityEvidence>,
    telemetry: TelemetryEvidence,
    #[serde(default)]
    drill: Option<DrillMarker>,
    #[serde(default)]
    user_identity: Option<UserIdentityEvidence>,
    #[serde(default = "sampled_by_default")]
    trace_sampled: bool,
}

/// Records without the flag (before format v4) were sampled.
fn sampled_by_default() -> bool {
    true
}

impl Serialize for RequestEvidence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return JsonRef {
                service_name: &self.service_name,
                enforcement_point: &self.enforcement_point,
                mode: &self.mode,
                identity: &self.identity,
                policy_evaluation: &self.policy_evaluation,
                rate_limit_check: &self.rate_limit_check,
                routing_decision: &self.routing_decision,
                reliability: &self.reliability,
                telemetry: &self.telemetry,
                drill: &self.drill,
                user_identity: &self.user_identity,
                trace_sampled: self.trace_sampled,
            }
            .serialize(s);
        }
        let tail = match (&self.drill, &self.user_identity, self.trace_sampled) {
            (d, u, false) => TailRef::Unsampled(d, u),
            (None, None, true) => TailRef::None,
            (Some(d), None, true) => TailRef::Drill(d),
            (d, Some(u), true) => TailRef::WithUser(d, u),
        };
        WireRef {
            service_name: &self.service_name,
            enforcement_point: &self.enforcement_point,
            mode: &self.mode,
            identity: &self.identity,
            policy_evaluation: &self.policy_evaluation,
            rate_limit_check: &self.rate_limit_check,
            routing_decision: &self.routing_decision,
            reliability: &self.reliability,
            telemetry: &self.telemetry,
            tail,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RequestEvidence {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let j = JsonOwned::deserialize(d)?;
            return Ok(RequestEvidence {
                service_name: j.service_name,
                enforcement_point: j.enforcement_point,
                mode: j.mode,
                identity: j.identity,
                policy_evaluation: j.policy_evaluation,
                rate_limit_check: j.rate_limit_check,
                routing_decision: j.routing_decision,
                reliability: j.reliability,
                telemetry: j.telemetry,
                drill: j.drill,
                user_identity: j.user_identity,
                trace_sampled: j.trace_sampled,
            });
        }
        let w = WireOwned::deserialize(d)?;
        let (drill, user_identity, trace_sampled) = match w.tail {
            TailOwned::None => (None, None, true),
            TailOwned::Drill(m) => (Some(m), None, true),
            TailOwned::WithUser(m, u) => (m, Some(u), true),
            TailOwned::Unsampled(m, u) => (m, u, false),
        };
        Ok(RequestEvidence {
            service_name: w.service_name,
            enforcement_point: w.enforcement_point,
            mode: w.mode,
            identity: w.identity,
            policy_evaluation: w.policy_evaluation,
            rate_limit_check: w.rate_limit_check,
            routing_decision: w.routing_decision,
            reliability: w.reliability,
            telemetry: w.telemetry,
            drill,
            user_identity,
            trace_sampled,
        })
    }
}

/// Marks a synthetic request made by a drill, not by real traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillMarker {
    /// The drill run, e.g. a timestamp or an operator-chosen name.
    pub run: String,
    /// Position of this record within the run, from 0.
    pub index: u64,
}

/// TLS version of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TlsVersion {
    /// No TLS (a local plaintext hop).
    #[serde(rename = "none")]
    None,
    /// TLS 1.2.
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Identity and security evidence of the connection a request used
/// (seed Part II, "mTLS Connection Establishment" and Evidence Type 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityEvidence {
    /// The client's SPIFFE ID, if it presented an SVID.
    pub client_identity: Option<SpiffeId>,
    /// The server's SPIFFE ID, if it presented an SVID.
    pub server_identity: Option<SpiffeId>,
    /// SHA-256 of the peer's leaf certificate (`"sha256:…"` in JSON).
    pub certificate_fingerprint: Option<Sha256Digest>,
    /// `"1.3"`, `"1.2"` or `"none"`.
    pub tls_version: TlsVersion,
    /// The negotiated suite as IANA names it, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher_suite: Option<String>,
    /// Whether the peer chain verified against the trust bundle.
    pub trust_chain_verified: bool,
    /// Handshake time; `None` for a reused connection.
    pub handshake_duration_us: Option<u32>,
}

/// An authorization decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    /// Let through.
    Allow,
    /// Refused.
    Deny,
}

/// Authorization policy evidence (seed Evidence Type 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationEvidence {
    /// The policy that decided, e.g. `allow-frontend-to-backend`.
    pub policy_name: String,
    /// Its version, e.g. `v1.2.3` or a config version number.
    pub policy_version: String,
    /// The rule that matched (name or index), `None` for a default decision.
    pub matched_rule: Option<String>,
    /// `"ALLOW"` or `"DENY"`.
    pub final_decision: Decision,
    /// Why, e.g. `identity_matches_and_method_allowed`.
    pub reason: String,
    /// How long evaluation took.
    pub evaluation_time_us: u32,
    /// Whether the decision came from a cache.
    pub cached: bool,
}

/// A rate limiter decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateDecision {
    /// Within limits.
    Allowed,
    /// Over the limit: refused.
    Limited,
}

/// Rate limit evidence (seed Part II "rate_limit_check", Part VIII).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitEvidence {
    /// `"allowed"` or `"limited"`.
    pub decision: RateDecision,
    /// Tokens left in the bucket after this request.
    pub tokens_remaining: u32,
    /// The configured limit, requests per second.
    pub limit: u32,
    /// The measured rate, requests per second.
    pub current_rate: u32,
}

/// Load balancing algorithm (seed Part III).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbAlgorithm {
    /// Next endpoint in rotation.
    RoundRobin,
    /// Rotation by weight.
    WeightedRoundRobin,
    /// Random by weight (canary splits).
    WeightedRandom,
    /// Fewest outstanding requests.
    LeastRequest,
    /// Nearest locality first.
    LocalityAware,
    /// Only endpoints on this spoke (Survival).
    LocalOnly,
}

/// Where an endpoint is relative to the spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// On this spoke.
    Local,
    /// Same zone.
    SameZone,
    /// Same region, other zone.
    SameRegion,
    /// Another region.
    OtherRegion,
}

/// One endpoint the balancer could choose from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCandidate {
    /// The address as the routing table names it, e.g. `10.0.1.5:8080`.
    pub address: String,
    /// Its weight.
    pub weight: u32,
    /// Whether health checks passed.
    pub healthy: bool,
    /// Where it is, if known.
    pub locality: Option<Locality>,
}

/// Routing decision evidence (seed Evidence Type 3 and Part III).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingEvidence {
    /// The algorithm used.
    pub load_balancing_algorithm: LbAlgorithm,
    /// The candidates considered.
    pub available_endpoints: Vec<EndpointCandidate>,
    /// The endpoint chosen; `None` when none was usable.
    pub selected_endpoint: Option<String>,
    /// Why, e.g. `next_in_rotation`, `same_zone_preferred`.
    pub selection_reason: String,
    /// Where the chosen endpoint is.
    pub locality: Option<Locality>,
    /// The subset / version chosen, e.g. `v1` of a canary split.
    pub version: Option<String>,
}

/// Circuit breaker state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Passing traffic.
    Closed,
    /// Failing fast.
    Open,
    /// Letting test requests through.
    HalfOpen,
}

/// Circuit breaker evidence (seed Evidence Type 4, `circuit_breaker`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerEvidence {
    /// The state when the request was handled.
    pub state: BreakerState,
    /// The error rate the breaker measured.
    pub error_rate: Ratio,
    /// Its threshold.
    pub error_threshold: Ratio,
    /// Consecutive errors seen.
    pub consecutive_errors: u32,
}

/// Backoff between retries (the mode matrix: exponential in Target,
/// linear in Degraded, none in Survival).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// No retries.
    None,
    /// Fixed increments.
    Linear,
    /// Doubling.
    Exponential,
}

/// Retry evidence (seed Evidence Type 4, `retry_state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryState {
    /// The attempt that produced the outcome, from 1.
    pub attempt: u32,
    /// The most attempts the policy allowed.
    pub max_attempts: u32,
    /// Retries made for this request (attempts after the first, including
    /// ones moved to another endpoint).
    pub retries: u32,
    /// The backoff policy.
    pub backoff: Backoff,
    /// Total time spent waiting between attempts.
    pub backoff_ms: u32,
}

/// Reliability evidence: breaker and retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReliabilityEvidence {
    /// The breaker of the chosen destination.
    pub circuit_breaker: BreakerEvidence,
    /// What retrying did.
    pub retry_state: RetryState,
}

/// Span status code (OpenTelemetry style, as the seed writes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StatusCode {
    /// Not set.
    Unset,
    /// Success.
    Ok,
    /// Failure.
    Error,
}

/// Status of the request (seed `status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `"OK"`, `"ERROR"` or `"UNSET"`.
    pub code: StatusCode,
    /// Why it failed; empty on success.
    pub message: String,
}

/// Observability evidence: timing, status and trace context (seed Evidence
/// Type 5). Trace ids are kept when the trace was not sampled (the record
/// says so in [`RequestEvidence::trace_sampled`]), so an audit can still
/// follow a request across spokes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryEvidence {
    /// Trace id.
    pub trace_id: Option<TraceId>,
    /// This sidecar's span.
    pub span_id: Option<SpanId>,
    /// The caller's span.
    pub parent_span_id: Option<SpanId>,
    /// e.g. `POST /api/charge`.
    pub operation_name: String,
    /// When the request started.
    pub start_time: UnixMillis,
    /// How long it took end to end.
    pub duration_us: u64,
    /// Span status.
    pub status: Status,
    /// HTTP status code, `None` for plain TCP.
    pub status_code: Option<u16>,
}

/// What triggered a mode transition (seed Part IV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The spoke started (initial mode).
    Startup,
    /// An error rate crossed its threshold.
    HighErrorRate,
    /// Error rates fell back under their thresholds.
    ErrorRateRecovered,
    /// The hub or remote endpoints became unreachable.
    NetworkPartitionDetected,
    /// Connectivity came back.
    ConnectivityRestored,
    /// A Recovery ramp step.
    RampStep,
    /// The Recovery ramp reached 100%.
    RampComplete,
    /// An operator forced the mode.
    Operator,
}

/// Whether a part of the network is reachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Reachable.
    Available,
    /// Not reachable.
    Unavailable,
}

/// Connectivity by locality (seed Part IV, Degraded → Survival).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connectivity {
    /// This zone.
    pub same_zone: Reachability,
    /// This region.
    pub same_region: Reachability,
    /// Other regions (and the hub).
    pub other_regions: Reachability,
}

/// The measurements behind a transition (seed Part IV `evidence`). Each
/// trigger fills what it measured and leaves the rest `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionEvidence {
    /// The service whose measurements triggered it.
    pub service: Option<String>,
    /// Measured error rate.
    pub error_rate: Option<Ratio>,
    /// The threshold it crossed.
    pub threshold: Option<Ratio>,
    /// The measurement window, seconds.
    pub window_s: Option<u32>,
    /// Failed requests in the window.
    pub failed_requests: Option<u64>,
    /// All requests in the window.
    pub total_requests: Option<u64>,
    /// Reachability by locality.
    pub connectivity: Option<Connectivity>,
    /// Whether the hub answered.
    pub hub_reachable: Option<bool>,
    /// Endpoints reachable.
    pub endpoints_reachable: Option<u32>,
    /// Endpoints known.
    pub endpoints_total: Option<u32>,
    /// Health checks passed in the window.
    pub successful_health_checks: Option<u32>,
    /// Health checks failed in the window.
    pub failed_health_checks: Option<u32>,
    /// Share of remote traffic after this step (Recovery ramp), percent.
    pub traffic_percent: Option<u8>,
}

/// A mode transition (seed Part IV): trigger, evidence, actions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeTransition {
    /// The mode left.
    pub from: Mode,
    /// The mode entered.
    pub to: Mode,
    /// What caused it.
    pub trigger: Trigger,
    /// The measurements.
    pub evidence: TransitionEvidence,
    /// What the spoke changed, e.g. `reduce_retry_attempts_to_2`,
    /// `disable_retries`, `start_with_1_percent_traffic`.
    pub actions: Vec<String>,
}

/// What happened to a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertEventKind {
    /// First issuance (enrollment, new workload).
    Issued,
    /// Renewal before expiry.
    Renewed,
    /// Re-issued after expiry via proof of possession.
    Reestablished,
    /// It expired without a renewal.
    Expired,
}

/// A certificate event (seed Evidence Type 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateEvent {
    /// What happened.
    pub event: CertEventKind,
    /// The certificate's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// SHA-256 of its DER.
    pub certificate_fingerprint: Sha256Digest,
    /// Its serial number, hex.
    pub serial_number: String,
    /// not_before.
    pub issued_at: UnixMillis,
    /// not_after.
    pub expires_at: UnixMillis,
    /// The issuing CA, e.g. its trust domain ID.
    pub issuer: String,
}

/// What kind of configuration was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigKind {
    /// The mesh resource set (authorization, routing) from the hub.
    Mesh,
    /// The spoke's local file configuration (workloads).
    Local,
    /// The trust bundle.
    TrustBundle,
}

/// Where a configuration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    /// Pushed by the hub.
    Hub,
    /// Read from the spoke's cache at start (e.g. offline).
    Cache,
    /// Read from a local file.
    File,
}

/// A configuration version was applied (seed Part I, "Configuration:
/// Applied configuration versions").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigApplied {
    /// Which configuration.
    pub config: ConfigKind,
    /// Its version.
    pub version: String,
    /// The version it replaced.
    pub previous_version: Option<String>,
    /// SHA-256 of the applied document.
    pub digest: Sha256Digest,
    /// Where it came from.
    pub source: ConfigSource,
}

/// Why records were shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShedReason {
    /// The spoke's buffer reached its byte bound.
    BufferFull,
    /// The spoke's disk was full: commits failed with "no space left on
    /// device" and the writer shed these records from memory while it
    /// waited for space (format v2).
    DiskFull,
    /// Commits failed with another I/O error and the writer shed these
    /// records from memory while it retried (format v2).
    WriteFailed,
}

/// An inclusive range of sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeqRange {
    /// First sequence number in the range.
    pub first: EvidenceSeq,
    /// Last sequence number in the range (>= `first`).
    pub last: EvidenceSeq,
}

impl SeqRange {
    /// Number of sequence numbers in the range (0 if `last < first`).
    pub fn len(&self) -> u64 {
        self.last
            .get()
            .checked_sub(self.first.get())
            .map_or(0, |d| d.saturating_add(1))
    }

    /// Whether the range is empty (`last < first`, which is malformed).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `seq` is in the range.
    pub fn contains(&self, seq: EvidenceSeq) -> bool {
        self.first <= seq && seq <= self.last
    }
}

/// Records were dropped; this record stands in the chain for them.
///
/// The record's own sequence number is `range.first`; it covers every
/// sequence number of `range`, and the next record in the chain is
/// `range.last + 1`, linking to `last_hash`. See [`crate::chain`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShedRecord {
    /// The sequence numbers this record stands for.
    pub range: SeqRange,
    /// How many records were dropped (`range.len()` for the contiguous
    /// ranges the buffer sheds).
    pub count: u64,
    /// The highest class dropped (`debug` or `request`).
    pub class: PriorityClass,
    /// Why.
    pub reason: ShedReason,
    /// Timestamp of the first dropped record (a lower bound after the
    /// record was cut at a sync position).
    pub first_timestamp: UnixMillis,
    /// Timestamp of the last dropped record.
    pub last_timestamp: UnixMillis,
    /// The chain hash of the last dropped record: what record
    /// `range.last + 1` links to.
    pub last_hash: ChainHash,
}

/// A record before it is sealed into the chain: what callers append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRecord {
    /// When it happened (passed in; nothing here reads a clock).
    pub timestamp: UnixMillis,
    /// Its priority class.
    pub class: PriorityClass,
    /// What it says.
    pub body: RecordBody,
}

impl NewRecord {
    /// A record of `body` with its [`RecordBody::default_class`].
    pub fn new(timestamp: UnixMillis, body: RecordBody) -> NewRecord {
        NewRecord {
            timestamp,
            class: body.default_class(),
            body,
        }
    }
}

/// A record sealed into a spoke's chain.
///
/// postcard encoding (disk and wire) is the fields in order:
/// ```text
/// seq: varint u64 | timestamp: varint u64 ms | class: varint | body | hash: 32 bytes
/// \___________________ canonical bytes ___________________________/
/// ```
/// `hash = SHA-256(previous link || canonical bytes)`; see [`crate::chain`].
/// JSON: `{"seq", "timestamp", "class", "body", "hash"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRecord {
    /// Position in the spoke's chain.
    pub seq: EvidenceSeq,
    /// When it happened.
    pub timestamp: UnixMillis,
    /// Priority class.
    pub class: PriorityClass,
    /// What it says.
    pub body: RecordBody,
    /// Its chain hash (as claimed; [`crate::ChainVerifier`] checks it).
    pub hash: ChainHash,
}

/// The canonical part of a record, borrowed for encoding.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: EvidenceSeq,
    timestamp: UnixMillis,
    class: PriorityClass,
    body: &'a RecordBody,
}

/// Hard upper bound on one encoded record (canonical bytes + hash).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Bytes of the hash at the end of an encoded record.
pub const HASH_LEN: usize = 32;

/// Why a record could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The encoding exceeds [`MAX_RECORD_BYTES`].
    #[error("record of {len} bytes exceeds the {max}-byte limit; trim candidate lists or strings")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes do not decode as a record.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Bytes follow the record.
    #[error("{0} trailing bytes after the record")]
    TrailingBytes(usize),
    /// The bytes decode but are not the canonical encoding of what they
    /// decode to (e.g. an over-long varint), so they cannot be hashed as
    /// stored.
    #[error("record bytes are not in canonical postcard form")]
    NonCanonical,
    /// Shed records are written only by the buffer, never appended.
    #[error("shed records cannot be appended; the buffer writes them when it sheds")]
    ReservedKind,
}

impl SealedRecord {
    /// The canonical bytes: postcard of `(seq, timestamp, class, body)`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        encode(&Canonical {
            seq: self.seq,
            timestamp: self.timestamp,
            class: self.class,
            body: &self.body,
        })
    }

    /// The postcard encoding (canonical bytes followed by the hash).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes one record, strictly: size-checked before decoding, no
    /// trailing bytes, and the bytes must be the canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<SealedRecord, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                len: bytes.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let (rec, rest): (SealedRecord, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RecordError::TrailingBytes(rest.len()));
        }
        if rec.encode() != bytes {
            return Err(RecordError::NonCanonical);
        }
        Ok(rec)
    }

    /// The last sequence number this record covers: `seq`, or the end of a
    /// shed record's range.
    pub fn last_seq(&self) -> EvidenceSeq {
        match &self.body {
            RecordBody::Shed(s) => s.range.last,
            _ => self.seq,
        }
    }

    /// The hash the following record links to: `hash`, or a shed record's
    /// `last_hash`.
    pub fn link(&self) -> ChainHash {
        match &self.body {
            RecordBody::Shed(s) => s.last_hash,
            _ => self.hash,
        }
    }

    /// The timestamp of the oldest evidence this record carries (a shed
    /// record's `first_timestamp`).
    pub fn oldest_timestamp(&self) -> UnixMillis {
        match &self.body {
            RecordBody::Shed(s) => s.first_timestamp,
            _ => self.timestamp,
        }
    }

    /// The shed record, if this is one.
    pub fn as_shed(&self) -> Option<&ShedRecord> {
        match &self.body {
            RecordBody::Shed(s) => Some(s),
            _ => None,
        }
    }
}

/// The leading fields of an encoded record, read without decoding the body:
/// what the buffer needs to decide what to shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Sequence number.
    pub seq: EvidenceSeq,
    /// Timestamp.
    pub timestamp: UnixMillis,
    /// Class.
    pub class: PriorityClass,
    /// Body kind.
    pub kind: RecordKind,
    /// The stored hash (the last 32 bytes).
    pub hash: ChainHash,
}

impl RecordHeader {
    /// Reads the header of an encoded [`SealedRecord`]. Checks only what it
    /// reads; use [`SealedRecord::decode`] to validate a whole record.
    pub fn peek(bytes: &[u8]) -> Result<RecordHeader, RecordError> {
        let ((seq, timestamp, class, kind), _): (
            (EvidenceSeq, UnixMillis, PriorityClass, RecordKind),
            &[u8],
        ) = postcard::take_from_bytes(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        let Some(tail) = bytes
            .len()
            .checked_sub(HASH_LEN)
            .and_then(|i| bytes.get(i..))
        else {
            return Err(RecordError::Malformed("shorter than a hash".into()));
        };
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(tail);
        Ok(RecordHeader {
            seq,
            timestamp,
            class,
            kind,
            hash: ChainHash(hash),
        })
    }
}

/// postcard into a `Vec`.
pub(crate) fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    // postcard only fails to serialize sequences of unknown length and
    // values whose Serialize impl errors; every type of this crate has
    // known lengths and infallible impls, so this cannot fail.
    postcard::to_allocvec(v).expect("postcard serialization of evidence types is infallible")
}
