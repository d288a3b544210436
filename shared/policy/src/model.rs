//! The mesh config as plain data: what the hub stores, versions and sends to
//! spokes, and what the evaluators in [`crate::authz`] and [`crate::routing`]
//! compile.
//!
//! What it is: serde types with no behaviour beyond small lookups. They are
//! postcard-friendly (no `untagged`, `flatten` or `skip_serializing_if`: the
//! field order is the format, so a change here is a wire change) and every
//! collection is kept in a canonical order (sorted by namespace and name), so
//! two configs built from the same documents in any order are equal and encode
//! to the same bytes. Who drives it: [`crate::MeshConfig::from_resources`] and
//! [`crate::MeshConfig::apply`] build it from parsed documents, and only after
//! all validation passed; the hub stores it, the spoke keeps it as its
//! last-known-good replica. What it must not do: I/O, clocks, or any Istio
//! YAML spelling (that is [`crate::istio`]'s input layer).
//!
//! Service hosts are canonical everywhere in the model (see
//! [`crate::units::canonical_host`]): `reviews` written in namespace `shop` is
//! `reviews.shop`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::Ratio;

/// Label sets (workload labels, subset labels, selectors), ordered by key.
pub type Labels = BTreeMap<String, String>;

/// The whole mesh config at one version.
///
/// Build it with [`MeshConfig::from_resources`] or [`MeshConfig::apply`]
/// (which validate everything first); print it with [`MeshConfig::to_yaml`]
/// or [`MeshConfig::to_json`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct MeshConfig {
    /// Mesh-wide settings (tidemesh kind `MeshSettings`).
    pub settings: MeshSettings,
    /// Per-mode behaviour (tidemesh kind `ModeMatrix`); the seed's values by default.
    pub mode_matrix: ModeMatrix,
    /// Stores (sites) and their localities (tidemesh kind `Store`).
    pub stores: Vec<Store>,
    /// Workloads declared on spokes (tidemesh kind `Workload`): the local endpoints.
    pub workloads: Vec<Workload>,
    /// Cloud services behind the hub (Istio `ServiceEntry`).
    pub service_entries: Vec<ServiceEntry>,
    /// Routing rules (Istio `VirtualService`).
    pub route_rules: Vec<RouteRule>,
    /// Destination policies (Istio `DestinationRule` or tidemesh `DestinationPolicy`).
    pub destination_policies: Vec<DestinationPolicy>,
    /// Authorization policies (Istio `AuthorizationPolicy`).
    pub authz_policies: Vec<AuthzPolicy>,
    /// What workloads' inbound accepts: mTLS only or plaintext too (Istio
    /// `PeerAuthentication`; see [`MeshConfig::peer_mtls`]). (`default`:
    /// the hub's JSON config versions written before it existed still read.)
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthn>,
    /// JWT request authentication (Istio `RequestAuthentication`). Absent in
    /// configs stored before it existed: none.
    #[serde(default)]
    pub request_authns: Vec<crate::reqauthn::RequestAuthn>,
    /// The key sets that `jwksUri: file://...` rules name, as the hub read
    /// them when this version was applied (the hub fills it; the spoke
    /// verifies tokens with it, so validation needs no hub). Not an object:
    /// not printed, not diffed; rebuilt at every apply and rollback.
    #[serde(default)]
    pub jwks_files: Vec<crate::reqauthn::JwksFile>,
}

/// Mesh-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshSettings {
    /// What happens to a request to a workload that no ALLOW policy selects.
    /// Deny by default: an edge mesh starts closed.
    pub default_action: Action,
    /// Policies in this namespace apply to workloads in every namespace
    /// (Istio's root namespace); `istio-system` by default.
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            default_action: Action::Deny,
            root_namespace: "istio-system".into(),
        }
    }
}

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectName {
    /// Namespace (`default` when a document gives none).
    pub namespace: String,
    /// Name (`metadata.name`).
    pub name: String,
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// ---------------------------------------------------------------------------
// Stores, workloads, endpoints
// ---------------------------------------------------------------------------

/// A store: one site of the edge, served by a spoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    /// Store name, also the site in localities and the `STORE` segment of
    /// workload SPIFFE IDs (`spiffe://TD/store/STORE/sa/ACCOUNT`).
    pub name: String,
    /// Region, e.g. `us-west-2`.
    pub region: String,
    /// Zone, e.g. `us-west-2a`.
    pub zone: String,
}

impl Store {
    /// The store's locality (its site is its name).
    pub fn locality(&self) -> Locality {
        Locality {
            region: self.region.clone(),
            zone: self.zone.clone(),
            site: Some(self.name.clone()),
        }
    }
}

/// Where an endpoint or a caller is: region, zone and site (Istio's
/// `region/zone/subzone`; for a store the site is the store name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Locality {
    /// Region (may be empty when unknown).
    pub region: String,
    /// Zone (may be empty when unknown).
    pub zone: String,
    /// Site: the store for edge endpoints; `None` for cloud endpoints unless
    /// their locality names a subzone.
    pub site: Option<String>,
}

impl Locality {
    /// Parses Istio's `region/zone/subzone` locality (zone and subzone optional).
    pub fn parse(s: &str) -> Result<Locality, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "locality {s:?} must be region, region/zone or region/zone/subzone"
            ));
        }
        Ok(Locality {
            region: parts[0].to_string(),
            zone: parts.get(1).map(|z| z.to_string()).unwrap_or_default(),
            site: parts.get(2).map(|z| z.to_string()),
        })
    }

    /// The `region/zone/subzone` spelling [`Locality::parse`] reads.
    pub fn to_istio(&self) -> String {
        let mut s = self.region.clone();
        if !self.zone.is_empty() {
            s.push('/');
            s.push_str(&self.zone);
            if let Some(site) = &self.site {
                s.push('/');
                s.push_str(site);
            }
        }
        s
    }
}

/// A workload declared on a spoke: one local endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Namespace and name.
    pub id: ObjectName,
    /// The canonical host of the service it serves.
    pub service: String,
    /// The store (site) whose spoke runs it; must name a [`Store`].
    pub store: String,
    /// Service account: its identity is `spiffe://TD/store/STORE/sa/ACCOUNT`.
    pub service_account: String,
    /// `host:port` the spoke forwards to.
    pub address: String,
    /// Labels (e.g. `app`, `version`): subsets and authorization selectors match them.
    pub labels: Labels,
    /// Load-balancing weight (1 by default).
    pub weight: u32,
}

/// A cloud service reachable through the hub (Istio `ServiceEntry`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// Namespace and name.
    pub id: ObjectName,
    /// Canonical hosts this entry defines.
    pub hosts: Vec<String>,
    /// Service ports.
    pub ports: Vec<ServicePort>,
    /// Whether the service is part of the mesh (mTLS inside) or external.
    pub location: MeshLocation,
    /// How endpoints are resolved.
    pub resolution: Resolution,
    /// Endpoints (behind the hub).
    pub endpoints: Vec<EntryEndpoint>,
}

/// A service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Port number.
    pub number: u16,
    /// Port name.
    pub name: String,
    /// Protocol as Istio names it (`HTTP`, `HTTP2`, `GRPC`, `TCP`, `TLS`, `HTTPS`), if given.
    pub protocol: Option<String>,
    /// Port on the endpoints, if different.
    pub target_port: Option<u16>,
}

/// `MESH_INTERNAL` or `MESH_EXTERNAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshLocation {
    /// Inside the mesh: mTLS with SPIFFE identities.
    MeshInternal,
    /// Outside the mesh.
    MeshExternal,
}

/// How a service entry's endpoints are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    /// Forward to the address the caller asked for.
    None,
    /// Endpoint addresses are IPs.
    Static,
    /// Endpoint addresses are DNS names, resolved by the hub gateway.
    Dns,
    /// Like `Dns`, one address at a time.
    DnsRoundRobin,
}

/// One endpoint of a [`ServiceEntry`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryEndpoint {
    /// Address (IP or DNS name, no port).
    pub address: String,
    /// Per-port-name port overrides.
    pub ports: BTreeMap<String, u16>,
    /// Labels.
    pub labels: Labels,
    /// Locality, if given.
    pub locality: Option<Locality>,
    /// Weight, if given.
    pub weight: Option<u32>,
}

/// Where an endpoint runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EndpointLocation {
    /// On the spoke of this store.
    Store(String),
    /// In the cloud, behind the hub gateway.
    Cloud,
}

/// Health of an endpoint as last observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Passing health checks (or not yet checked: declared endpoints start healthy).
    Healthy,
    /// Failing health checks: routing skips it.
    Unhealthy,
}

/// An endpoint of a service, as routing and load balancing see it: derived
/// from [`Workload`]s and [`ServiceEntry`] endpoints by
/// [`MeshConfig::endpoints`], or registered at run time by a spoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Canonical host of the service.
    pub service: String,
    /// `host:port`.
    pub address: String,
    /// Spoke or cloud.
    pub location: EndpointLocation,
    /// Region / zone / site.
    pub locality: Locality,
    /// Labels (subsets match them).
    pub labels: Labels,
    /// Load-balancing weight.
    pub weight: u32,
    /// Health.
    pub health: Health,
    /// Service account of the workload, for local workloads.
    pub service_account: Option<String>,
}

// ---------------------------------------------------------------------------
// Routing (VirtualService)
// ---------------------------------------------------------------------------

/// A routing rule set for some hosts (Istio `VirtualService`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRule {
    /// Namespace and name.
    pub id: ObjectName,
    /// Canonical hosts it routes.
    pub hosts: Vec<String>,
    /// Ordered HTTP routes: the first whose match holds wins.
    pub http: Vec<HttpRoute>,
}

/// One ordered HTTP route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Optional name (shows in decisions).
    pub name: Option<String>,
    /// Conditions, any of which selects this route; empty = always (a default route).
    pub matches: Vec<RequestMatch>,
    /// Weighted destinations; weights sum to 100.
    pub route: Vec<WeightedDestination>,
    /// Request timeout for this route.
    pub timeout: Option<Duration>,
    /// Retry policy for this route.
    pub retries: Option<RouteRetries>,
}

/// A request condition: all its parts must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMatch {
    /// Optional name.
    pub name: Option<String>,
    /// Path condition (without the query string).
    pub uri: Option<StringMatch>,
    /// Method condition.
    pub method: Option<StringMatch>,
    /// Header conditions, by lowercase header name, in name order.
    pub headers: Vec<HeaderMatch>,
}

/// A header condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lowercase header name.
    pub name: String,
    /// How its value must look.
    pub matcher: StringMatch,
}

/// Istio's `StringMatch`: exact, prefix or (RE2, whole-value) regex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// The whole value matches this RE2-syntax regex.
    Regex(String),
}

/// A destination with its share of traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedDestination {
    /// Where.
    pub destination: Destination,
    /// Share in percent (0..=100); the shares of a route sum to 100.
    pub weight: u32,
}

/// A routing destination: a service, optionally a subset and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Destination {
    /// Canonical host.
    pub host: String,
    /// Subset name (defined by the host's destination policy).
    pub subset: Option<String>,
    /// Port.
    pub port: Option<u16>,
}

/// Retries as a VirtualService route states them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRetries {
    /// Number of retries (not counting the first try).
    pub attempts: u32,
    /// Timeout per try.
    pub per_try_timeout: Option<Duration>,
    /// Conditions (`5xx`, `connect-failure`, `reset`, …).
    pub retry_on: Vec<String>,
}

// ---------------------------------------------------------------------------
// Destination policy (DestinationRule)
// ---------------------------------------------------------------------------

/// Which document kind a destination policy came from (and is printed as).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyOrigin {
    /// Istio `DestinationRule` (only Istio-expressible settings).
    DestinationRule,
    /// tidemesh `DestinationPolicy` (everything).
    DestinationPolicy,
}

/// How traffic to one host is handled once routed: subsets, load balancing,
/// timeouts, retries, circuit breaking, limits, rate limiting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationPolicy {
    /// Namespace and name.
    pub id: ObjectName,
    /// Document kind it came from.
    pub origin: PolicyOrigin,
    /// Canonical host.
    pub host: String,
    /// Named subsets by labels.
    pub subsets: Vec<Subset>,
    /// Traffic settings for the whole host.
    pub traffic: TrafficPolicy,
}

impl DestinationPolicy {
    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

/// A named subset of a service's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    /// Name (`v1`).
    pub name: String,
    /// Labels an endpoint must carry (all of them).
    pub labels: Labels,
}

/// Traffic settings; `None` means "the mode matrix / built-in default".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TrafficPolicy {
    /// Load balancing.
    pub load_balancer: Option<LoadBalancer>,
    /// Request timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: Option<RetryPolicy>,
    /// Circuit breaker / outlier detection.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Connection and request limits.
    pub limits: Option<ConnectionLimits>,
    /// Local rate limit.
    pub rate_limit: Option<RateLimit>,
    /// TLS the hub gateway originates to the host's cloud endpoints
    /// (`trafficPolicy.tls`; only for `ServiceEntry` hosts).
    pub tls: Option<ClientTls>,
    /// Per-port TLS (`trafficPolicy.portLevelSettings[].tls`), overriding
    /// [`TrafficPolicy::tls`] for that service port. (`default`: the hub's
    /// JSON config versions written before TLS origination still read.)
    #[serde(default)]
    pub port_tls: Vec<PortTls>,
}

impl TrafficPolicy {
    /// The TLS settings for service port `port`: the port's own, else the
    /// host's; `None` (or [`TlsMode::Disable`]) means plaintext.
    pub fn tls_for_port(&self, port: u16) -> Option<&ClientTls> {
        self.port_tls
            .iter()
            .find(|p| p.port == port)
            .map(|p| &p.tls)
            .or(self.tls.as_ref())
    }
}

/// How the hub gateway speaks to a cloud endpoint (Istio `ClientTLSSettings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsMode {
    /// Plaintext (`DISABLE`).
    Disable,
    /// TLS, the server verified against [`ClientTls::ca_certificates`] (`SIMPLE`).
    Simple,
    /// TLS with a client certificate as well (`MUTUAL`).
    Mutual,
}

impl TlsMode {
    /// Istio's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "DISABLE",
            TlsMode::Simple => "SIMPLE",
            TlsMode::Mutual => "MUTUAL",
        }
    }
}

/// TLS origination settings. File paths are absolute paths on the hub; the
/// hub reads and checks them when the config is applied and when it
/// connects (this crate does no I/O).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    /// The mode.
    pub mode: TlsMode,
    /// PEM file of the CA certificates the server's chain must end in;
    /// when absent (`SIMPLE`, `MUTUAL`) the hub's system roots.
    pub ca_certificates: Option<String>,
    /// PEM file of the client certificate chain (`MUTUAL`).
    pub client_certificate: Option<String>,
    /// PEM file of the client certificate's private key (`MUTUAL`).
    pub private_key: Option<String>,
    /// Server name sent in the handshake; the service host when absent.
    pub sni: Option<String>,
    /// Names the server certificate must carry (one of them); the SNI name
    /// when empty.
    pub subject_alt_names: Vec<String>,
}

/// TLS settings for one service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTls {
    /// The service port number.
    pub port: u16,
    /// Its TLS settings.
    pub tls: ClientTls,
}

/// Load balancing: an algorithm, optionally locality-aware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    /// Picker among eligible endpoints.
    pub algorithm: LbAlgorithm,
    /// Prefer the same site, then the same zone, then the same region, then
    /// the cloud (see [`crate::routing::LocalityTier`]).
    pub locality_aware: bool,
}

impl Default for LoadBalancer {
    /// Round robin, locality-aware: an edge mesh is local first.
    fn default() -> Self {
        LoadBalancer {
            algorithm: LbAlgorithm::RoundRobin,
            locality_aware: true,
        }
    }
}

/// Endpoint pickers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LbAlgorithm {
    /// Next in rotation.
    RoundRobin,
    /// Smooth weighted round robin by endpoint weight.
    Weighted,
    /// Fewest requests in flight (power of two choices).
    LeastRequest,
    /// Uniformly random.
    Random,
}

/// A retry policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Timeout per try.
    pub per_try_timeout: Option<Duration>,
    /// Delay between tries.
    pub backoff: Backoff,
    /// Conditions (`5xx`, `connect-failure`, `reset`, …); empty = the default set.
    pub retry_on: Vec<String>,
}

/// Delay between retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Growth.
    pub kind: BackoffKind,
    /// First delay.
    pub base: Duration,
    /// Cap.
    pub max: Duration,
}

impl Backoff {
    /// No delay at all.
    pub const NONE: Backoff = Backoff {
        kind: BackoffKind::None,
        base: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// Delay before retry number `retry` (1-based): fixed `base`, `base × n`
    /// (linear) or `base × 2^(n-1)` (exponential), capped at `max`.
    pub fn delay(&self, retry: u32) -> Duration {
        let n = retry.max(1);
        let d = match self.kind {
            BackoffKind::None => Duration::ZERO,
            BackoffKind::Fixed => self.base,
            BackoffKind::Linear => self.base.saturating_mul(n),
            BackoffKind::Exponential => self.base.saturating_mul(1u32 << (n - 1).min(20)),
        };
        d.min(self.max.max(self.base))
    }
}

/// Backoff growth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackoffKind {
    /// Retry at once.
    None,
    /// Always `base`.
    Fixed,
    /// `base × n`.
    Linear,
    /// `base × 2^(n-1)`.
    Exponential,
}

/// Circuit breaker and outlier detection settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitBreaker {
    /// Open after this many consecutive errors (Istio `consecutive5xxErrors`).
    pub consecutive_errors: Option<u32>,
    /// Open when the error rate over `window` reaches this.
    pub error_rate_threshold: Option<Ratio>,
    /// Requests needed in a window before the error rate counts.
    pub min_requests: u32,
    /// Sliding window (Istio `interval`).
    pub window: Duration,
    /// How long it stays open before probing (Istio `baseEjectionTime`).
    pub open_time: Duration,
    /// Probe requests allowed while half-open; that many successes close it.
    pub half_open_probes: u32,
    /// At most this share of endpoints ejected (Istio `maxEjectionPercent`).
    pub max_ejection_percent: Option<u8>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_errors: None,
            error_rate_threshold: None,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_time: Duration::from_secs(30),
            half_open_probes: 3,
            max_ejection_percent: None,
        }
    }
}

/// Connection and request limits (Istio `connectionPool`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConnectionLimits {
    /// Connections to the host (`tcp.maxConnections`).
    pub max_connections: Option<u32>,
    /// Connect timeout (`tcp.connectTimeout`).
    pub connect_timeout: Option<Duration>,
    /// Requests waiting for a connection (`http.http1MaxPendingRequests`).
    pub max_pending_requests: Option<u32>,
    /// Requests in flight (`http.http2MaxRequests`).
    pub max_requests: Option<u32>,
    /// Requests per connection (`http.maxRequestsPerConnection`).
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight (`http.maxRetries`).
    pub max_retries: Option<u32>,
}

/// Local rate limit as a token bucket (Envoy's `local_ratelimit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Bucket size.
    pub max_tokens: u32,
    /// Tokens added per fill.
    pub tokens_per_fill: u32,
    /// Fill period.
    pub fill_interval: Duration,
}

// ---------------------------------------------------------------------------
// Authorization (AuthorizationPolicy)
// ---------------------------------------------------------------------------

/// ALLOW or DENY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allow matching requests.
    Allow,
    /// Deny matching requests.
    Deny,
}

impl Action {
    /// `ALLOW` / `DENY`, as Istio and the seed's evidence spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

/// An authorization policy with Istio's semantics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzPolicy {
    /// Namespace and name.
    pub id: ObjectName,
    /// `selector.matchLabels`; `None` selects every workload of the namespace
    /// (of every namespace, in the root namespace).
    pub selector: Option<Labels>,
    /// ALLOW or DENY.
    pub action: Action,
    /// Rules, any of which matches; none = the policy never matches (an ALLOW
    /// policy without rules therefore denies its workloads).
    pub rules: Vec<AuthzRule>,
}

impl AuthzPolicy {
    /// Whether a rule of this policy inspects L7 attributes (methods, paths,
    /// request headers), so it decides per request, not per peer.
    pub fn inspects_l7(&self) -> bool {
        self.rules.iter().any(|r| {
            r.to.iter()
                .any(|o| !o.methods.is_empty() || !o.paths.is_empty())
                || r.from.iter().any(|s| {
                    !s.request_principals.is_empty() || !s.not_request_principals.is_empty()
                })
                || r.when.iter().any(|c| c.key.is_http_only())
        })
    }
}

/// One rule: from AND to AND when. An empty part holds for every request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzRule {
    /// Sources, any of which must match.
    pub from: Vec<Source>,
    /// Operations, any of which must match.
    pub to: Vec<Operation>,
    /// Conditions, all of which must hold.
    pub when: Vec<Condition>,
}

/// A request source. Each non-empty field must match (any of its values).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Principal patterns: SPIFFE IDs without `spiffe://`, with `prefix*`,
    /// `*suffix` or `*` (any authenticated peer).
    pub principals: Vec<String>,
    /// Namespace patterns.
    pub namespaces: Vec<String>,
    /// Request principal patterns (`iss/sub` of a verified JWT, see
    /// [`crate::reqauthn`]); `*` matches any request with a verified token.
    /// Absent in configs stored before them: none.
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// The source matches only when the request principal matches none of
    /// these (a request without a token has no principal, so it matches).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

/// A request operation. Each non-empty field must match (any of its values).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Method patterns.
    pub methods: Vec<String>,
    /// Path patterns (exact, `prefix*`, `*suffix`, `*`), query excluded.
    pub paths: Vec<String>,
    /// Destination ports.
    pub ports: Vec<u16>,
}

/// A `when` condition: the attribute must match one of the values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// Attribute.
    pub key: ConditionKey,
    /// Value patterns (exact, `prefix*`, `*suffix`, `*`).
    pub values: Vec<String>,
}

/// Attributes a `when` condition can test.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionKey {
    /// `request.headers[name]` (lowercase name).
    RequestHeader(String),
    /// `source.principal`.
    SourcePrincipal,
    /// `source.namespace`.
    SourceNamespace,
    /// `destination.port`.
    DestinationPort,
    /// `request.auth.claims[a][b]...`: a claim of the verified JWT (the
    /// path of nested claim names); a list claim matches when any of its
    /// string items does.
    RequestAuthClaim(Vec<String>),
    /// `request.auth.principal`: `iss/sub` of the verified JWT.
    RequestAuthPrincipal,
    /// `request.auth.audiences`: the token's `aud` values.
    RequestAuthAudiences,
    /// `request.auth.presenter`: the token's `azp`.
    RequestAuthPresenter,
}

impl ConditionKey {
    /// Whether only an HTTP request carries the attribute (request headers
    /// and the `request.auth.*` facts of a JWT); raw TCP does not.
    pub fn is_http_only(&self) -> bool {
        !matches!(
            self,
            ConditionKey::SourcePrincipal
                | ConditionKey::SourceNamespace
                | ConditionKey::DestinationPort
        )
    }

    /// The key as written in Istio YAML.
    pub fn to_istio(&self) -> String {
        match self {
            ConditionKey::RequestHeader(h) => format!("request.headers[{h}]"),
            ConditionKey::SourcePrincipal => "source.principal".into(),
            ConditionKey::SourceNamespace => "source.namespace".into(),
            ConditionKey::DestinationPort => "destination.port".into(),
            ConditionKey::RequestAuthClaim(path) => {
                let mut s = String::from("request.auth.claims");
                for p in path {
                    s.push('[');
                    s.push_str(p);
                    s.push(']');
                }
                s
            }
            ConditionKey::RequestAuthPrincipal => "request.auth.principal".into(),
            ConditionKey::RequestAuthAudiences => "request.auth.audiences".into(),
            ConditionKey::RequestAuthPresenter => "request.auth.presenter".into(),
        }
    }
}

// ---------------------------------------------------------------------------
// Peer authentication (PeerAuthentication)
// ---------------------------------------------------------------------------

/// What a workload's inbound accepts (Istio `PeerAuthentication`
/// `mtls.mode`; `UNSET` is `None` where a mode may be absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MtlsMode {
    /// Mesh callers over mTLS only: the workload's plaintext listener
    /// refuses every request.
    Strict,
    /// mTLS from mesh callers, and plaintext from local non-mesh clients on
    /// the workload's plaintext listener (authorized with no identity).
    Permissive,
    /// As [`MtlsMode::Permissive`] for the plaintext listener; mesh callers
    /// still arrive over the mTLS tunnel (tidemesh has no clear-text mesh
    /// transport) and keep their verified identity.
    Disable,
}

impl MtlsMode {
    /// `STRICT` / `PERMISSIVE` / `DISABLE`, as Istio spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }

    /// Whether a request without mTLS (no peer identity) is accepted.
    pub fn accepts_plaintext(self) -> bool {
        self != MtlsMode::Strict
    }
}

/// A peer authentication policy with Istio's scopes: mesh-wide (in the
/// root namespace, no selector), namespace-wide (no selector) or workload
/// (`selector.matchLabels`, workloads of its own namespace only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuthn {
    /// Namespace and name.
    pub id: ObjectName,
    /// `selector.matchLabels`; `None` for a namespace- or mesh-wide policy.
    pub selector: Option<Labels>,
    /// `mtls.mode`; `None` (`UNSET`) inherits from the wider scope.
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`: a workload port's own mode (`None`: `UNSET`, the
    /// policy's). Only with a selector.
    pub port_modes: BTreeMap<u16, Option<MtlsMode>>,
}

/// Which scope decided a workload's mTLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeerAuthnScope {
    /// A workload policy's `portLevelMtls` entry for the port.
    Port,
    /// A workload (selector) policy.
    Workload,
    /// A namespace-wide policy.
    Namespace,
    /// A mesh-wide policy (root namespace, no selector).
    Mesh,
    /// No policy sets a mode: tidemesh's default, STRICT.
    Default,
}

impl PeerAuthnScope {
    /// snake_case name, for evidence and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerAuthnScope::Port => "port",
            PeerAuthnScope::Workload => "workload",
            PeerAuthnScope::Namespace => "namespace",
            PeerAuthnScope::Mesh => "mesh",
            PeerAuthnScope::Default => "default",
        }
    }
}

/// The mTLS mode in force for one workload port, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMtls {
    /// The mode.
    pub mode: MtlsMode,
    /// The scope that set it.
    pub scope: PeerAuthnScope,
    /// The policy that set it (`None` for the default).
    pub policy: Option<ObjectName>,
}

impl std::fmt::Display for PeerMtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.policy {
            Some(p) => write!(
                f,
                "{} (PeerAuthentication {p}, {} scope)",
                self.mode.as_str(),
                self.scope.as_str()
            ),
            None => write!(
                f,
                "{} (no PeerAuthentication sets a mode: the mesh default)",
                self.mode.as_str()
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Mode matrix
// ---------------------------------------------------------------------------

/// The mesh's operating modes (the seed's Part IV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mode {
    /// Normal operation.
    Target,
    /// Partial failures.
    Degraded,
    /// Network partition: disconnected from the hub.
    Survival,
    /// Post-incident ramp back to remote endpoints.
    Recovery,
}

impl Mode {
    /// All modes, in the seed's order.
    pub const ALL: [Mode; 4] = [Mode::Target, Mode::Degraded, Mode::Survival, Mode::Recovery];

    /// Lowercase name, as in the `ModeMatrix` document.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Target => "target",
            Mode::Degraded => "degraded",
            Mode::Survival => "survival",
            Mode::Recovery => "recovery",
        }
    }
}

/// What each mode does to routing, retries, circuit breaking and observability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeMatrix {
    /// Normal operation.
    pub target: ModeProfile,
    /// Partial failures.
    pub degraded: ModeProfile,
    /// Network partition.
    pub survival: ModeProfile,
    /// Post-incident.
    pub recovery: ModeProfile,
    /// When a destination service goes Target → Degraded and back (the
    /// seed: 30 % errors over 5 minutes). Absent in configs stored before it
    /// existed: the seed's values.
    #[serde(default)]
    pub degradation: Degradation,
    /// When a partitioned spoke goes Survival → Recovery (the seed: 10
    /// passing health checks and none failing within 2 minutes). Absent in
    /// configs stored before it existed: the seed's values.
    #[serde(default)]
    pub reconnection: Reconnection,
}

impl ModeMatrix {
    /// The profile of `mode`.
    pub fn profile(&self, mode: Mode) -> &ModeProfile {
        match mode {
            Mode::Target => &self.target,
            Mode::Degraded => &self.degraded,
            Mode::Survival => &self.survival,
            Mode::Recovery => &self.recovery,
        }
    }

    /// Mutable profile of `mode`.
    pub fn profile_mut(&mut self, mode: Mode) -> &mut ModeProfile {
        match mode {
            Mode::Target => &mut self.target,
            Mode::Degraded => &mut self.degraded,
            Mode::Survival => &mut self.survival,
            Mode::Recovery => &mut self.recovery,
        }
    }
}

impl Default for ModeMatrix {
    /// The seed's mode matrix (Part IV):
    ///
    /// | mode | routing | retries | breaker | observability |
    /// | --- | --- | --- | --- | --- |
    /// | Target | dynamic, health-checked | exponential ×3 | 50 % | full tracing |
    /// | Degraded | healthy only | linear ×2 | 30 % | 10 % sampling |
    /// | Survival | local only | none | fail fast | metrics only, buffered |
    /// | Recovery | ramp 1→2→4…→100 %/min | 1 conservative | 20 % | full tracing |
    fn default() -> Self {
        let ms = Duration::from_millis;
        ModeMatrix {
            target: ModeProfile {
                routing: RoutingMode::Dynamic,
                retries: ModeRetries {
                    attempts: 3,
                    backoff: Backoff {
                        kind: BackoffKind::Exponential,
                        base: ms(100),
                        max: ms(2_000),
                    },
                },
                breaker: BreakerMode::ErrorRate(Ratio::percent(50)),
                observability: Observability::Tracing {
                    sampling: Ratio::ONE,
                },
                ramp: None,
            },
            degraded: ModeProfile {
                routing: RoutingMode::HealthyOnly,
                retries: ModeRetries {
                    attempts: 2,
                    backoff: Backoff {
                        kind: BackoffKind::Linear,
                        base: ms(100),
                        max: ms(1_000),
                    },
                },
                breaker: BreakerMode::ErrorRate(Ratio::percent(30)),
                observability: Observability::Tracing {
                    sampling: Ratio::percent(10),
                },
                ramp: None,
            },
            survival: ModeProfile {
                routing: RoutingMode::LocalOnly,
                retries: ModeRetries {
                    attempts: 0,
                    backoff: Backoff::NONE,
                },
                breaker: BreakerMode::FailFast,
                observability: Observability::MetricsOnly { buffered: true },
                ramp: None,
            },
            recovery: ModeProfile {
                routing: RoutingMode::Ramp,
                retries: ModeRetries {
                    attempts: 1,
                    backoff: Backoff {
                        kind: BackoffKind::Fixed,
                        base: ms(500),
                        max: ms(500),
                    },
                },
                breaker: BreakerMode::ErrorRate(Ratio::percent(20)),
                observability: Observability::Tracing {
                    sampling: Ratio::ONE,
                },
                ramp: Some(Ramp::default()),
            },
            degradation: Degradation::default(),
            reconnection: Reconnection::default(),
        }
    }
}

/// Target ⇄ Degraded for one destination service: the error rate over a
/// sliding window against an entry threshold, and a lower exit threshold
/// that must hold for a whole window before the service is back in Target
/// (hysteresis). See [`crate::mode`] for the exact rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Degradation {
    /// Degraded when the window's error rate is at or above this (> 0).
    pub enter_error_rate: Ratio,
    /// Back to Target once the error rate stayed at or below this for a whole
    /// `window` (< `enter_error_rate`; half of it unless written).
    pub exit_error_rate: Ratio,
    /// The sliding window the error rate is measured over (> 0).
    pub window: Duration,
    /// Fewer requests than this in the window measure nothing (≥ 1), so that
    /// 1 failure of 2 does not make a service Degraded.
    pub min_requests: u32,
}

impl Default for Degradation {
    /// The seed's Target → Degraded: 30 % errors over 5 minutes; out again
    /// at 15 % (half); at least 20 requests in the window.
    fn default() -> Self {
        Degradation {
            enter_error_rate: Ratio::percent(30),
            exit_error_rate: Ratio::percent(15),
            window: Duration::from_secs(300),
            min_requests: 20,
        }
    }
}

/// Survival → Recovery: connectivity is back and the active health checks of
/// the hub and remote tiers pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnection {
    /// Passing health checks needed within `window`, with no failing one
    /// in it (≥ 1).
    pub health_checks: u32,
    /// The window they are counted in (> 0).
    pub window: Duration,
}

impl Default for Reconnection {
    /// The seed's Survival → Recovery: 10 successful health checks and 0
    /// failed within 2 minutes.
    fn default() -> Self {
        Reconnection {
            health_checks: 10,
            window: Duration::from_secs(120),
        }
    }
}

/// One row of the mode matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeProfile {
    /// Which endpoints routing may use.
    pub routing: RoutingMode,
    /// Retries.
    pub retries: ModeRetries,
    /// Circuit breaking.
    pub breaker: BreakerMode,
    /// Tracing and metrics.
    pub observability: Observability,
    /// Remote traffic ramp (Recovery).
    pub ramp: Option<Ramp>,
}

/// Routing behaviour of a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RoutingMode {
    /// Every healthy endpoint, by the destination's load balancer.
    Dynamic,
    /// Only endpoints currently passing health checks.
    HealthyOnly,
    /// Only endpoints at the caller's own site (a partition).
    LocalOnly,
    /// Local first; remote traffic ramps up per [`Ramp`].
    Ramp,
}

/// Retries in a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeRetries {
    /// Retries after the first try.
    pub attempts: u32,
    /// Delay between them.
    pub backoff: Backoff,
}

/// Circuit breaking in a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakerMode {
    /// Open at this error rate.
    ErrorRate(Ratio),
    /// Fail fast: no waiting on unhealthy destinations, no probing.
    FailFast,
}

/// Observability in a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observability {
    /// Tracing with this sampling ratio (1 = full tracing).
    Tracing {
        /// Share of requests traced.
        sampling: Ratio,
    },
    /// No tracing, metrics only.
    MetricsOnly {
        /// Telemetry buffered for later upload.
        buffered: bool,
    },
}

/// Recovery's ramp of remote traffic: `start_percent`, then × `factor` every
/// `step`, capped at 100 (the seed: 1, 2, 4, … 64, 100 % per minute).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ramp {
    /// Share of remote traffic at the start.
    pub start_percent: u8,
    /// Growth per step (≥ 2).
    pub factor: u8,
    /// Step length.
    pub step: Duration,
    /// Failures of remote calls (and failed health checks) one step may see
    /// and still count as healthy; one more steps the ramp back (0, the
    /// seed's "double every minute if healthy": any failure steps back).
    /// Absent in configs stored before it existed: 0.
    #[serde(default)]
    pub tolerated_failures: u32,
}

impl Default for Ramp {
    fn default() -> Self {
        Ramp {
            start_percent: 1,
            factor: 2,
            step: Duration::from_secs(60),
            tolerated_failures: 0,
        }
    }
}

impl Ramp {
    /// Share of remote traffic (percent) `elapsed` after recovery began, if
    /// every step was healthy.
    pub fn percent_at(&self, elapsed: Duration) -> u8 {
        let step_ms = self.step.as_millis().max(1);
        let steps = elapsed.as_millis() / step_ms;
        self.percent_at_step(u32::try_from(steps).unwrap_or(u32::MAX))
    }

    /// Share of remote traffic (percent) at step `step` (0 = the start):
    /// `start_percent × factor^step`, capped at 100. A start of 0 counts as
    /// 1 and a factor below 2 as 2, so the ramp always reaches 100.
    pub fn percent_at_step(&self, step: u32) -> u8 {
        let mut p = u64::from(self.start_percent.max(1));
        for _ in 0..step.min(64) {
            p = p.saturating_mul(u64::from(self.factor.max(2)));
            if p >= 100 {
                return 100;
            }
        }
        // At most 100 here.
        p.min(100) as u8
    }

    /// The first step at 100 % (7 for the seed's 1, 2, 4, … 64, 100; at
    /// most 7 for any ramp).
    pub fn full_step(&self) -> u32 {
        (0..64)
            .find(|&s| self.percent_at_step(s) >= 100)
            .unwrap_or(64)
    }
}

// ---------------------------------------------------------------------------
// Lookups
// ---------------------------------------------------------------------------

impl MeshConfig {
    /// The store named `name`.
    pub fn store(&self, name: &str) -> Option<&Store> {
        self.stores.iter().find(|s| s.name == name)
    }

    /// The destination policy of `host` (canonical).
    pub fn destination_policy(&self, host: &str) -> Option<&DestinationPolicy> {
        self.destination_policies.iter().find(|p| p.host == host)
    }

    /// The route rule routing `host` (canonical).
    pub fn route_rule(&self, host: &str) -> Option<&RouteRule> {
        self.route_rules
            .iter()
            .find(|r| r.hosts.iter().any(|h| h == host))
    }

    /// The mTLS mode of the workload in `namespace` with `labels`, for its
    /// port `port`, with Istio's precedence: a workload policy (selector in
    /// the workload's namespace; its `portLevelMtls` entry for the port
    /// first), else the namespace-wide policy, else the mesh-wide one (root
    /// namespace, no selector), else STRICT. An `UNSET` mode inherits from
    /// the next scope. With several policies at one scope the first by name
    /// decides (Istio takes the oldest; the config keeps no creation time).
    pub fn peer_mtls(&self, namespace: &str, labels: &Labels, port: u16) -> PeerMtls {
        let found = |p: &PeerAuthn, mode: MtlsMode, scope| PeerMtls {
            mode,
            scope,
            policy: Some(p.id.clone()),
        };
        // sorted by namespace and name: the first match is the first by name
        let pas = &self.peer_authentications;
        if let Some(p) = pas.iter().find(|p| {
            p.id.namespace == namespace
                && p.selector.as_ref().is_some_and(|s| labels_match(s, labels))
        }) {
            if let Some(Some(m)) = p.port_modes.get(&port) {
                return found(p, *m, PeerAuthnScope::Port);
            }
            if let Some(m) = p.mode {
                return found(p, m, PeerAuthnScope::Workload);
            }
        }
        let root = &self.settings.root_namespace;
        if namespace != root {
            if let Some(p) = pas
                .iter()
                .find(|p| p.id.namespace == namespace && p.selector.is_none())
            {
                if let Some(m) = p.mode {
                    return found(p, m, PeerAuthnScope::Namespace);
                }
            }
        }
        if let Some(p) = pas
            .iter()
            .find(|p| &p.id.namespace == root && p.selector.is_none())
        {
            if let Some(m) = p.mode {
                return found(p, m, PeerAuthnScope::Mesh);
            }
        }
        PeerMtls {
            mode: MtlsMode::Strict,
            scope: PeerAuthnScope::Default,
            policy: None,
        }
    }

    /// Every service host the config knows, sorted: hosts of workloads,
    /// service entries, route rules and destination policies.
    pub fn services(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .workloads
            .iter()
            .map(|w| w.service.clone())
            .chain(
                self.service_entries
                    .iter()
                    .flat_map(|e| e.hosts.iter().cloned()),
            )
            .chain(
                self.route_rules
                    .iter()
                    .flat_map(|r| r.hosts.iter().cloned()),
            )
            .chain(self.destination_policies.iter().map(|p| p.host.clone()))
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Every declared endpoint: one per workload (on its store's spoke) and
    /// one per service entry endpoint and host (in the cloud), sorted by
    /// service then address. Health starts [`Health::Healthy`]; the registry
    /// updates it at run time.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for w in &self.workloads {
            let locality = self
                .store(&w.store)
                .map(Store::locality)
                .unwrap_or_else(|| Locality {
                    site: Some(w.store.clone()),
                    ..Locality::default()
                });
            out.push(Endpoint {
                service: w.service.clone(),
                address: w.address.clone(),
                location: EndpointLocation::Store(w.store.clone()),
                locality,
                labels: w.labels.clone(),
                weight: w.weight,
                health: Health::Healthy,
                service_account: Some(w.service_account.clone()),
            });
        }
        for e in &self.service_entries {
            let port = e.ports.first();
            for ep in &e.endpoints {
                let port_number = port
                    .map(|p| {
                        ep.ports
                            .get(&p.name)
                            .copied()
                            .or(p.target_port)
                            .unwrap_or(p.number)
                    })
                    .unwrap_or(80);
                let address = if ep.address.contains(':') && !ep.address.starts_with('[') {
                    format!("[{}]:{port_number}", ep.address)
                } else {
                    format!("{}:{port_number}", ep.address)
                };
                for host in &e.hosts {
                    out.push(Endpoint {
                        service: host.clone(),
                        address: address.clone(),
                        location: EndpointLocation::Cloud,
                        locality: ep.locality.clone().unwrap_or_default(),
                        labels: ep.labels.clone(),
                        weight: ep.weight.unwrap_or(1),
                        health: Health::Healthy,
                        service_account: None,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.service, &a.address).cmp(&(&b.service, &b.address)));
        out
    }

    /// Endpoints of `host`, restricted to `subset` (by the host's destination
    /// policy) when given. `None` when the subset is not defined.
    pub fn endpoints_for(&self, host: &str, subset: Option<&str>) -> Option<Vec<Endpoint>> {
        let labels = match subset {
            None => None,
            Some(name) => Some(self.destination_policy(host)?.subset(name)?.labels.clone()),
        };
        Some(
            self.endpoints()
                .into_iter()
                .filter(|e| e.service == host)
                .filter(|e| labels.as_ref().is_none_or(|l| labels_match(l, &e.labels)))
                .collect(),
        )
    }
}

/// Whether `labels` carries every key/value of `selector`.
pub fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn seed_ramp_schedule() {
        let r = Ramp::default();
        let got: Vec<u8> = (0..9)
            .map(|m| r.percent_at(Duration::from_secs(60 * m)))
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 64, 100, 100]);
        assert_eq!(r.percent_at(Duration::from_secs(59)), 1);
        assert_eq!(r.full_step(), 7);
        let steps: Vec<u8> = (0..9).map(|s| r.percent_at_step(s)).collect();
        assert_eq!(steps, vec![1, 2, 4, 8, 16, 32, 64, 100, 100]);
        let odd = Ramp {
            start_percent: 3,
            factor: 3,
            ..r
        };
        assert_eq!(odd.full_step(), 4);
        assert_eq!(odd.percent_at_step(3), 81);
        let degenerate = Ramp {
            start_percent: 0,
            factor: 0,
            ..r
        };
        assert_eq!(degenerate.full_step(), 7);
        assert_eq!(
            Ramp {
                start_percent: 100,
                ..r
            }
            .full_step(),
            0
        );
    }

    #[test]
    fn seed_mode_matrix_defaults() {
        let m = ModeMatrix::default();
        assert_eq!(m.target.retries.attempts, 3);
        assert_eq!(m.target.retries.backoff.kind, BackoffKind::Exponential);
        assert_eq!(m.degraded.retries.attempts, 2);
        assert_eq!(m.degraded.retries.backoff.kind, BackoffKind::Linear);
        assert_eq!(m.survival.retries.attempts, 0);
        assert_eq!(m.recovery.retries.attempts, 1);
        assert_eq!(
            m.target.breaker,
            BreakerMode::ErrorRate(Ratio::from_percent(50).unwrap())
        );
        assert_eq!(
            m.degraded.breaker,
            BreakerMode::ErrorRate(Ratio::from_percent(30).unwrap())
        );
        assert_eq!(m.survival.breaker, BreakerMode::FailFast);
        assert_eq!(
            m.recovery.breaker,
            BreakerMode::ErrorRate(Ratio::from_percent(20).unwrap())
        );
        assert_eq!(
            m.degraded.observability,
            Observability::Tracing {
                sampling: Ratio::from_percent(10).unwrap()
            }
        );
        assert_eq!(m.survival.routing, RoutingMode::LocalOnly);
        assert_eq!(m.profile(Mode::Recovery).ramp, Some(Ramp::default()));
        // Target → Degraded at 30 % over 5 minutes (out at half), Survival →
        // Recovery after 10 passing health checks in 2 minutes.
        assert_eq!(m.degradation.enter_error_rate, Ratio::percent(30));
        assert_eq!(m.degradation.exit_error_rate, Ratio::percent(15));
        assert_eq!(m.degradation.window, Duration::from_secs(300));
        assert_eq!(m.reconnection.health_checks, 10);
        assert_eq!(m.reconnection.window, Duration::from_secs(120));
        assert_eq!(Ramp::default().tolerated_failures, 0);
    }

    #[test]
    fn backoff_delays() {
        let ms = Duration::from_millis;
        let exp = Backoff {
            kind: BackoffKind::Exponential,
            base: ms(100),
            max: ms(1_000),
        };
        assert_eq!(
            (1..=5).map(|n| exp.delay(n)).collect::<Vec<_>>(),
            vec![ms(100), ms(200), ms(400), ms(800), ms(1_000)]
        );
        let lin = Backoff {
            kind: BackoffKind::Linear,
            ..exp
        };
        assert_eq!(lin.delay(3), ms(300));
        assert_eq!(Backoff::NONE.delay(4), Duration::ZERO);
        assert_eq!(exp.delay(u32::MAX), ms(1_000));
    }

    #[test]
    fn localities() {
        let l = Locality::parse("us-west-2/zone-b").unwrap();
        assert_eq!(l.region, "us-west-2");
        assert_eq!(l.zone, "zone-b");
        assert_eq!(l.site, None);
        assert_eq!(l.to_istio(), "us-west-2/zone-b");
        assert!(Locality::parse("a//b").is_err());
        assert!(Locality::parse("a/b/c/d").is_err());
    }
}
