//! The YAML shapes we accept, field for field: Istio's, for the subset we
//! support, and tidemesh's own kinds.
//!
//! Every struct denies unknown fields, so a field we do not support is an
//! error naming it, never silently dropped. These types are read (and, for
//! printing a config back, written) only by [`super`]; they never go on the
//! wire. Values stay as written here (strings for durations, enums and
//! ports); [`super::convert`] checks and converts them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The envelope every document has.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Doc<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Option<S>,
}

/// `metadata`: name and namespace only.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

// --- security.istio.io AuthorizationPolicy ---------------------------------

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Option<Vec<AuthzRuleIn>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Selector {
    #[serde(default)]
    pub match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthzRuleIn {
    #[serde(default)]
    pub from: Option<Vec<FromIn>>,
    #[serde(default)]
    pub to: Option<Vec<ToIn>>,
    #[serde(default)]
    pub when: Option<Vec<ConditionIn>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FromIn {
    pub source: SourceIn,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SourceIn {
    #[serde(default)]
    pub principals: Option<Vec<String>>,
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub request_principals: Option<Vec<String>>,
    #[serde(default)]
    pub not_request_principals: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ToIn {
    pub operation: OperationIn,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OperationIn {
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConditionIn {
    pub key: String,
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

// --- networking.istio.io VirtualService ------------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub http: Option<Vec<HttpRouteIn>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpRouteIn {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Option<Vec<MatchIn>>,
    #[serde(default)]
    pub route: Option<Vec<RouteDestinationIn>>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<RetriesIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchIn {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatchIn>,
    #[serde(default)]
    pub method: Option<StringMatchIn>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, StringMatchIn>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StringMatchIn {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteDestinationIn {
    pub destination: DestinationIn,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DestinationIn {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelectorIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortSelectorIn {
    pub number: i64,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RetriesIn {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Comma-separated, as in Istio.
    #[serde(default)]
    pub retry_on: Option<String>,
}

// --- networking.istio.io DestinationRule -----------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub subsets: Option<Vec<SubsetIn>>,
    #[serde(default)]
    pub traffic_policy: Option<IstioTrafficPolicyIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubsetIn {
    pub name: String,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct IstioTrafficPolicyIn {
    #[serde(default)]
    pub load_balancer: Option<IstioLoadBalancerIn>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolIn>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionIn>,
    #[serde(default)]
    pub tls: Option<ClientTlsIn>,
    #[serde(default)]
    pub port_level_settings: Option<Vec<PortTrafficPolicyIn>>,
}

/// Istio `ClientTLSSettings`; the fields tidemesh does not act on are read
/// so that they can be refused by name.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ClientTlsIn {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Option<Vec<String>>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub ca_crl: Option<String>,
}

/// Istio `PortTrafficPolicy`: tidemesh acts on `tls` only.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortTrafficPolicyIn {
    pub port: PortSelectorIn,
    #[serde(default)]
    pub tls: Option<ClientTlsIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct IstioLoadBalancerIn {
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSettingIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LocalityLbSettingIn {
    #[serde(default)]
    pub enabled: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectionPoolIn {
    #[serde(default)]
    pub tcp: Option<TcpPoolIn>,
    #[serde(default)]
    pub http: Option<HttpPoolIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TcpPoolIn {
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpPoolIn {
    #[serde(default, rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(default, rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    #[serde(default, rename = "maxRequestsPerConnection")]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default, rename = "maxRetries")]
    pub max_retries: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutlierDetectionIn {
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default, rename = "baseEjectionTime")]
    pub base_ejection_time: Option<String>,
    #[serde(default, rename = "maxEjectionPercent")]
    pub max_ejection_percent: Option<i64>,
}

// --- networking.istio.io ServiceEntry --------------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Option<Vec<PortIn>>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<WorkloadEntryIn>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PortIn {
    pub number: i64,
    pub name: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadEntryIn {
    pub address: String,
    #[serde(default)]
    pub ports: Option<BTreeMap<String, i64>>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<i64>,
}

// --- tidemesh.io kinds -----------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreSpec {
    pub region: String,
    pub zone: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct WorkloadSpec {
    pub service: String,
    pub store: String,
    pub service_account: String,
    pub address: String,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DestinationPolicySpec {
    pub host: String,
    #[serde(default)]
    pub subsets: Option<Vec<SubsetIn>>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerIn>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<RetryPolicyIn>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerIn>,
    #[serde(default)]
    pub limits: Option<LimitsIn>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LoadBalancerIn {
    pub algorithm: String,
    #[serde(default)]
    pub locality_aware: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RetryPolicyIn {
    pub attempts: i64,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub backoff: Option<BackoffIn>,
    #[serde(default)]
    pub retry_on: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackoffIn {
    pub kind: String,
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub max: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CircuitBreakerIn {
    #[serde(default)]
    pub consecutive_errors: Option<i64>,
    #[serde(default)]
    pub error_rate_threshold: Option<f64>,
    #[serde(default)]
    pub min_requests: Option<i64>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub open_time: Option<String>,
    #[serde(default)]
    pub half_open_probes: Option<i64>,
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LimitsIn {
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub max_pending_requests: Option<i64>,
    #[serde(default)]
    pub max_requests: Option<i64>,
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default)]
    pub max_retries: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RateLimitIn {
    pub max_tokens: i64,
    #[serde(default)]
    pub tokens_per_fill: Option<i64>,
    pub fill_interval: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModeMatrixSpec {
    #[serde(default)]
    pub target: Option<ModeProfileIn>,
    #[serde(default)]
    pub degraded: Option<ModeProfileIn>,
    #[serde(default)]
    pub survival: Option<ModeProfileIn>,
    #[serde(default)]
    pub recovery: Option<ModeProfileIn>,
    #[serde(default)]
    pub degradation: Option<DegradationIn>,
    #[serde(default)]
    pub reconnection: Option<ReconnectionIn>,
}

/// `spec.degradation`: Target ⇄ Degraded per service.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DegradationIn {
    #[serde(default)]
    pub enter_error_rate: Option<f64>,
    #[serde(default)]
    pub exit_error_rate: Option<f64>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub min_requests: Option<i64>,
}

/// `spec.reconnection`: Survival → Recovery.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ReconnectionIn {
    #[serde(default)]
    pub health_checks: Option<i64>,
    #[serde(default)]
    pub window: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ModeProfileIn {
    #[serde(default)]
    pub routing: Option<String>,
    #[serde(default)]
    pub retries: Option<ModeRetriesIn>,
    #[serde(default)]
    pub circuit_breaker: Option<ModeBreakerIn>,
    #[serde(default)]
    pub observability: Option<ObservabilityIn>,
    #[serde(default)]
    pub ramp: Option<RampIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModeRetriesIn {
    pub attempts: i64,
    #[serde(default)]
    pub backoff: Option<BackoffIn>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ModeBreakerIn {
    #[serde(default)]
    pub error_rate_threshold: Option<f64>,
    #[serde(default)]
    pub fail_fast: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ObservabilityIn {
    pub mode: String,
    #[serde(default)]
    pub sampling: Option<f64>,
    #[serde(default)]
    pub buffered: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RampIn {
    pub start_percent: i64,
    pub factor: i64,
    pub step: String,
    #[serde(default)]
    pub tolerated_failures: Option<i64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MeshSettingsSpec {
    #[serde(default)]
    pub default_action: Option<String>,
    #[serde(default)]
    pub root_namespace: Option<String>,
}
