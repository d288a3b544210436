//! The spoke's data plane: the proxy that local apps talk through.
//!
//! What it is: the thin async driver around the I/O-free decisions
//! (authorization and routing from `tidemesh-policy`, the [`ratelimit`]
//! bucket, [`trace`] context): it owns the sockets and moves bytes.
//! * **Outbound** ([`outbound`]): each workload with an `outbound` address
//!   gets an HTTP/1.1 listener; a request is routed by its `Host` to a mesh
//!   service, local first: a workload on this spoke directly, else one on
//!   another spoke of the same site through the [`tunnel`].
//! * **Tunnel** ([`tunnel`]): QUIC with ALPN `tidemesh-data/1`. The calling
//!   spoke presents the *calling workload's* SVID, one connection per
//!   (calling workload, peer spoke), one bidirectional stream per request
//!   opening with a [`tidemesh_proto::data::StreamHeader`]. The serving
//!   spoke takes the peer's SPIFFE ID from mTLS as the source principal.
//! * **Inbound** ([`inbound`]): authorization (Istio semantics), the
//!   workload's rate limit, `x-forwarded-client-cert`, then the workload's
//!   own listener. Same-spoke calls take this path too, with the calling
//!   workload's ID as principal.
//! * **Plaintext inbound** ([`plaintext`]): a workload's optional
//!   `plaintext_inbound` listener for local clients outside the mesh; the
//!   workload's `PeerAuthentication` mode (per request) refuses them
//!   (STRICT) or delivers them through inbound with no identity.
//! * **Raw TCP** ([`tcp`]): each `tcp_outbound` listener sends every
//!   connection to one service, resolved as an HTTP `Host` is; the serving
//!   end (this spoke, or a peer through a tunnel stream with
//!   [`tidemesh_proto::data::StreamProtocol::Tcp`]) authorizes the caller
//!   at L4 and copies bytes to a `protocol = "tcp"` workload.
//!
//! Every request (or raw TCP connection) yields one evidence record per
//! spoke it crosses, appended to the evidence buffer without waiting for
//! the commit.
//!
//! Who drives it: [`crate::Spoke::run`] binds it ([`DataPlane::bind`], so a
//! taken port is an error before the hub session starts) and spawns
//! [`DataPlane::serve`]. It needs nothing from the hub at request time:
//! cached SVIDs (`CredStore`) and the last-known-good config, so local and
//! same-site calls keep working through a hub outage. What it must not do:
//! block on disk on the request path (SVIDs are loaded off the path, the
//! evidence append never waits for the commit), hold protocol rules of its
//! own, or let untrusted bytes panic it (bounded headers, streams,
//! connections and timeouts everywhere).

pub(crate) mod inbound;
pub mod latency;
pub(crate) mod outbound;
pub(crate) mod plaintext;
pub mod ratelimit;
pub(crate) mod resilience;
pub(crate) mod resolve;
pub(crate) mod tcp;
pub mod trace;
pub(crate) mod tunnel;
pub(crate) mod vector;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tidemesh_evidence::record::{
    EnforcementPoint, RequestEvidence, Status, StatusCode as SpanStatus, TelemetryEvidence,
};
use tidemesh_evidence::{Sha256Digest, SpanId, TraceId, UnixMillis};
use tidemesh_identity::{naming, SpiffeId, TrustDomain};
use tidemesh_net::QuicSettings;
use tidemesh_policy::{model::Labels, CompiledPolicies, CompiledRoutes, MeshConfig};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::unix_ms;

/// The body type both directions use.
pub(crate) use tidemesh_net::http::Body;

/// Limits and timeouts of the data plane.
#[derive(Debug, Clone)]
pub struct DataSettings {
    /// Connecting to a workload's inbound listener.
    pub connect_timeout: Duration,
    /// From sending a request upstream to its response head (a route's own
    /// timeout, when it has one, applies instead).
    pub request_timeout: Duration,
    /// Reading a request head (HTTP) or a stream header (tunnel), and a
    /// tunnel handshake: a tunnel stream without its full header by then is
    /// reset and its slots freed.
    pub header_timeout: Duration,
    /// Most bytes of an HTTP request head.
    pub max_header_bytes: usize,
    /// Most connections open at once from apps (all outbound listeners) and
    /// most tunnel streams served at once.
    pub max_connections: usize,
    /// Tunnel connections one peer workload (verified SPIFFE ID) holds at
    /// once on the listener; one more is closed with `close::BUSY`.
    pub max_connections_per_peer: usize,
    /// Tunnel streams one peer workload has open at once across all its
    /// connections (quinn's limit is per connection); one more is reset
    /// with `close::BUSY`.
    pub max_streams_per_peer: usize,
    /// Tunnel handshakes in progress from one source IP address, before any
    /// identity is known; one more is refused.
    pub max_handshakes_per_address: usize,
    /// QUIC transport of the tunnel (streams per connection, idle timeout).
    pub quic: QuicSettings,
    /// A raw TCP connection with no byte in either direction for this long
    /// is closed (both ends).
    pub tcp_idle_timeout: Duration,
}

impl Default for DataSettings {
    fn default() -> Self {
        DataSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            max_connections_per_peer: 32,
            max_streams_per_peer: 512,
            max_handshakes_per_address: 32,
            quic: QuicSettings {
                keep_alive: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(30),
                max_streams: 256,
                max_uni_streams: 0,
                ..QuicSettings::default()
            },
            tcp_idle_timeout: tidemesh_net::pipe::TCP_IDLE_TIMEOUT,
        }
    }
}

/// What the data plane did, for `/metrics` (counters since start).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered to apps, by status class (1xx..5xx as 1..=5; 0:
    /// no status, e.g. a raw TCP connection).
    pub requests: [std::sync::atomic::AtomicU64; 6],
    /// Retries made.
    pub retries: std::sync::atomic::AtomicU64,
    /// Circuit breakers that opened (closed or half-open → open).
    pub breaker_opened: std::sync::atomic::AtomicU64,
    /// Circuit breakers that closed again (half-open → closed).
    pub breaker_closed: std::sync::atomic::AtomicU64,
    /// Cloud calls refused at once because the hub was unreachable.
    pub hub_unreachable: std::sync::atomic::AtomicU64,
    /// What the tunnel listener refused, by [`TunnelRefusal`].
    pub tunnel_refused: [std::sync::atomic::AtomicU64; TunnelRefusal::ALL.len()],
    /// Request durations by service, direction and locality tier.
    pub latency: latency::Latency,
}

/// Why the tunnel listener refused a handshake, a connection or a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelRefusal {
    /// The source address had as many handshakes in progress as allowed.
    AddressHandshakes,
    /// The peer workload held its connection cap.
    PeerConnections,
    /// The peer workload held its stream cap.
    PeerStreams,
    /// The spoke-wide limit of connections and streams was reached.
    GlobalStreams,
    /// A stream sent no full header within the header deadline.
    HeaderTimeout,
}

impl TunnelRefusal {
    /// Every reason, in counter order.
    pub const ALL: [TunnelRefusal; 5] = [
        TunnelRefusal::AddressHandshakes,
        TunnelRefusal::PeerConnections,
        TunnelRefusal::PeerStreams,
        TunnelRefusal::GlobalStreams,
        TunnelRefusal::HeaderTimeout,
    ];

    /// The `reason` label on /metrics.
    pub fn label(self) -> &'static str {
        match self {
            TunnelRefusal::AddressHandshakes => "address_handshakes",
            TunnelRefusal::PeerConnections => "peer_connections",
            TunnelRefusal::PeerStreams => "peer_streams",
            TunnelRefusal::GlobalStreams => "global_limit",
            TunnelRefusal::HeaderTimeout => "header_timeout",
        }
    }
}

impl Counters {
    /// Counts one refusal of the tunnel listener.
    pub(crate) fn tunnel_refused(&self, why: TunnelRefusal) {
        if let Some(c) = self.tunnel_refused.get(why as usize) {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Counters {
    fn add(c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// One request answered with `status`.
    pub fn answered(&self, status: u16) {
        let class = usize::from(status / 100).min(5);
        Self::add(&self.requests[class]);
    }
}

/// Errors setting up the data plane (at start, before the hub session).
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// A listener could not be bound.
    #[error("{key} = {addr}: cannot bind: {source}")]
    Bind {
        /// The config key naming the address.
        key: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The credential cache is unusable.
    #[error(transparent)]
    Creds(#[from] crate::CredsError),
    /// TLS or QUIC setup failed.
    #[error("data plane tls: {0}")]
    Tls(String),
    /// The spoke's own ID is not a node ID.
    #[error("{0} is not a spoke node ID (spiffe://TD/store/STORE/node/NODE)")]
    NotANode(SpiffeId),
}

/// A workload of this spoke, as the data plane serves it.
#[derive(Debug)]
pub(crate) struct LocalWorkload {
    pub account: String,
    /// `spiffe://TD/store/STORE/sa/ACCOUNT`.
    pub id: SpiffeId,
    /// Canonical host of its service.
    pub service: String,
    pub namespace: String,
    pub labels: Labels,
    pub inbound: Option<SocketAddr>,
    /// `inbound` as a URI authority, made once (every delivery names it).
    pub inbound_authority: Option<hyper::http::uri::Authority>,
    pub outbound: Option<SocketAddr>,
    /// Its plaintext listener for local non-mesh clients.
    pub plaintext: Option<SocketAddr>,
    /// What its inbound listener speaks.
    pub protocol: crate::config::WorkloadProtocol,
    pub limiter: Option<Mutex<ratelimit::TokenBucket>>,
}

/// The config in force, compiled once per config (a new slice, even of
/// the same version, is a new config: the registry may have moved).
pub(crate) struct Compiled {
    pub version: Option<u64>,
    pub config: Arc<MeshConfig>,
    pub policies: Arc<CompiledPolicies>,
    /// The `RequestAuthentication`s, key sets parsed.
    pub authn: Arc<tidemesh_policy::reqauthn::CompiledAuthn>,
    /// When the hub made this config version (inline key sets are this old).
    pub hub_applied_ms: Option<u64>,
    pub routes: Option<Arc<CompiledRoutes>>,
    /// Endpoints on other spokes of the site.
    pub site: Vec<resolve::SiteEndpoint>,
    /// Every canonical service host this spoke could route to.
    pub hosts: std::collections::HashSet<String>,
    /// Each host's endpoints, as routing considers them.
    pub candidates: HashMap<String, Vec<resolve::Cand>>,
}

/// What the data plane knows of a cached SVID without touching disk.
#[derive(Debug, Clone)]
pub(crate) struct SvidInfo {
    pub fingerprint: Sha256Digest,
}

/// What the data plane is handed by the spoke: its state as watches and
/// handles. The data plane never sees the spoke itself.
pub(crate) struct Handles {
    /// This spoke's node ID.
    pub node_id: SpiffeId,
    /// The spoke's file config (workloads, data addresses).
    pub file: crate::FileConfig,
    /// A pre-bound data socket (simulations), else `data_listen` is bound.
    pub data_socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    /// Trusted time.
    pub clock: Arc<crate::TrustedClock>,
    /// The credentials in force (SVIDs, bundle, revocation list).
    pub creds: Arc<crate::Credentials>,
    /// The config in force.
    pub config: crate::ConfigWatch,
    /// Local workloads' health (service account → healthy).
    pub health: tokio::sync::watch::Receiver<Arc<std::collections::BTreeMap<String, bool>>>,
    /// Whether the hub (and so its gateway) is reachable, and where.
    pub hub: tokio::sync::watch::Receiver<crate::HubLink>,
    /// The modes: profiles, ramp admission, outcome reports.
    pub modes: Arc<crate::modes::Modes>,
    /// Where request records go.
    pub evidence: crate::EvidenceSink,
    /// What the data plane did (for `/metrics`).
    pub counters: Arc<Counters>,
}

/// State shared by every listener and request.
pub(crate) struct Shared {
    /// The spoke's handles.
    pub h: Handles,
    pub td: TrustDomain,
    pub store: String,
    pub node_id: SpiffeId,
    pub workloads: Vec<LocalWorkload>,
    pub settings: DataSettings,
    compiled: RwLock<Option<Arc<Compiled>>>,
    pub balancers: Mutex<HashMap<resolve::BalancerKey, tidemesh_policy::routing::Balancer>>,
    /// The weighted-split rotation of each route ("ns/virtual service", route index).
    pub splits: Mutex<HashMap<(String, usize), resolve::SplitRotation>>,
    pub svids: RwLock<Vec<Option<SvidInfo>>>,
    pub tunnels: tunnel::Pool,
    pub endpoint: quinn::Endpoint,
    /// The negotiated TLS 1.3 suite (see [`tunnel`] for why it is known).
    pub cipher_suite: String,
    pub conn_limit: Arc<Semaphore>,
    /// Pooled keep-alive connections to this spoke's workloads.
    pub client: Client<HttpConnector, Body>,
    /// The same for `protocol = "http2"` workloads (h2c, multiplexed).
    pub client_h2: Client<HttpConnector, Body>,
    /// Circuit breaker (outlier detection) of each endpoint, by key.
    breakers: Mutex<HashMap<String, resilience::Breaker>>,
    /// Retry budget of each destination host.
    budgets: Mutex<HashMap<String, resilience::RetryBudget>>,
    /// Requests in flight to each destination host (its request limit).
    in_flight: Mutex<HashMap<String, Arc<resilience::InFlight>>>,
    /// The evidence records of each service in its current mode (vectors).
    pub(crate) seqs: Mutex<HashMap<String, vector::SeqRange>>,
    /// Each destination host's rate limit (its destination policy's
    /// `rateLimit`), as a token bucket, with the limit it was made for.
    dest_limits:
        Mutex<HashMap<String, (tidemesh_policy::model::RateLimit, ratelimit::TokenBucket)>>,
}

impl Shared {
    /// The config in force, compiled once per config.
    pub fn compiled(&self) -> Arc<Compiled> {
        // the routes and policies were compiled when the config was
        // checked; only what depends on the registry is derived here
        let (version, config, routes, policies, authn, hub_applied_ms) =
            match self.h.config.borrow().as_ref() {
                Some(c) => (
                    Some(c.applied.version),
                    c.config.clone(),
                    Some(c.routes().clone()),
                    c.policies().clone(),
                    c.authn().clone(),
                    Some(c.applied.hub_applied_ms),
                ),
                None => (
                    None,
                    empty_config(),
                    None,
                    empty_policies(),
                    Arc::default(),
                    None,
                ),
            };
        if let Ok(c) = self.compiled.read() {
            if let Some(c) = c.as_ref() {
                if Arc::ptr_eq(&c.config, &config) {
                    return c.clone();
                }
            }
        }
        let site = resolve::site_endpoints(self, &config);
        let hosts = resolve::known_hosts(self, &config, &site);
        let candidates = resolve::candidates_by_host(self, &config, &site, &hosts);
        let c = Arc::new(Compiled {
            candidates,
            version,
            policies,
            authn,
            hub_applied_ms,
            routes,
            site,
            hosts,
            config,
        });
        if let Ok(mut slot) = self.compiled.write() {
            *slot = Some(c.clone());
        }
        c
    }

    /// The effective mode of `service`, for evidence.
    pub fn mode(&self, service: &str) -> tidemesh_evidence::record::Mode {
        crate::modes::ev_mode(self.h.modes.mode(service))
    }

    /// The hub's address, while its control session is up (its gateway is
    /// on the same endpoint).
    pub fn hub_address(&self) -> Result<SocketAddr, String> {
        self.h
            .hub
            .borrow()
            .addr
            .ok_or_else(|| "the hub's address is not known yet".to_owned())
    }

    /// Whether a local workload passes its health checks.
    pub fn healthy(&self, account: &str) -> bool {
        self.h
            .health
            .borrow()
            .get(account)
            .copied()
            .unwrap_or(false)
    }

    /// Trusted now.
    pub fn now(&self) -> SystemTime {
        use tidemesh_identity::clock::Clock;
        self.h.clock.now()
    }

    /// The cached SVID facts of local workload `i`.
    pub fn svid(&self, i: usize) -> Option<SvidInfo> {
        self.svids.read().ok()?.get(i).cloned().flatten()
    }

    /// Whether endpoint `key` may be picked now (its breaker is closed, or
    /// half-open with a probe slot free).
    /// With `closed_only` (Degraded's healthy-only routing), a half-open
    /// breaker's endpoint is not picked either.
    pub fn endpoint_available(
        &self,
        key: &str,
        now: std::time::Instant,
        closed_only: bool,
    ) -> bool {
        self.breakers
            .lock()
            .map(|m| {
                m.get(key).is_none_or(|b| {
                    if closed_only {
                        b.state(now) == tidemesh_evidence::record::BreakerState::Closed
                    } else {
                        b.available(now)
                    }
                })
            })
            .unwrap_or(false)
    }

    /// The breaker settings of destination `host`: its destination
    /// policy's (or the defaults) under the circuit breaking of its mode.
    fn breaker_settings(&self, host: &str) -> resilience::BreakerSettings {
        let c = self.compiled();
        resilience::BreakerSettings::from_policy(
            c.config
                .destination_policy(host)
                .and_then(|p| p.traffic.circuit_breaker.as_ref()),
        )
        .under(self.h.modes.profile(host).breaker)
    }

    /// Asks endpoint `key`'s breaker to admit a request.
    pub fn breaker_admit(
        &self,
        host: &str,
        key: &str,
        now: std::time::Instant,
    ) -> Result<resilience::Admit, Duration> {
        let mut m = match self.breakers.lock() {
            Ok(m) => m,
            // a poisoned lock never silently disables the breaker
            Err(_) => return Err(Duration::from_secs(1)),
        };
        let settings = self.breaker_settings(host);
        match m.get_mut(key) {
            Some(b) => {
                // the mode (or the policy) may have changed since
                if b.settings() != &settings {
                    b.set_settings(settings);
                }
                b.admit(now)
            }
            None => {
                let mut b = resilience::Breaker::new(settings);
                let r = b.admit(now);
                m.insert(key.to_owned(), b);
                r
            }
        }
    }

    /// Gives back an admission whose request never reached the endpoint.
    pub fn breaker_release(&self, key: &str, admit: resilience::Admit) {
        if let Ok(mut m) = self.breakers.lock() {
            if let Some(b) = m.get_mut(key) {
                b.on_cancel(admit);
            }
        }
    }

    /// Reports an attempt's result to endpoint `key`'s breaker.
    pub fn breaker_report(
        &self,
        key: &str,
        admit: resilience::Admit,
        success: bool,
        now: std::time::Instant,
    ) {
        let change = self.breakers.lock().ok().and_then(|mut m| {
            m.get_mut(key)
                .and_then(|b| b.on_result(now, admit, success))
        });
        if let Some((from, to)) = change {
            use tidemesh_evidence::record::BreakerState;
            let c = &self.h.counters;
            match to {
                BreakerState::Open => Counters::add(&c.breaker_opened),
                BreakerState::Closed => Counters::add(&c.breaker_closed),
                BreakerState::HalfOpen => {}
            }
            info!(endpoint = %key, ?from, ?to, "circuit breaker changed state");
        }
    }

    /// Endpoint `key`'s breaker, for evidence.
    pub fn breaker_evidence(
        &self,
        key: &str,
        now: std::time::Instant,
    ) -> tidemesh_evidence::record::BreakerEvidence {
        self.breakers
            .lock()
            .ok()
            .and_then(|m| m.get(key).map(|b| b.evidence(now)))
            .unwrap_or_else(|| {
                resilience::Breaker::new(resilience::BreakerSettings::from_policy(None))
                    .evidence(now)
            })
    }

    /// An original request to `host`: a deposit in its retry budget.
    pub fn retry_deposit(&self, host: &str) {
        if let Ok(mut m) = self.budgets.lock() {
            if !m.contains_key(host) {
                m.insert(host.to_owned(), resilience::RetryBudget::default());
            }
            if let Some(b) = m.get_mut(host) {
                b.on_request(std::time::Instant::now());
            }
        }
    }

    /// Whether `host`'s retry budget allows one more retry (and takes it).
    pub fn retry_withdraw(&self, host: &str) -> bool {
        self.budgets
            .lock()
            .ok()
            .and_then(|mut m| {
                m.get_mut(host)
                    .map(|b| b.try_withdraw(std::time::Instant::now()))
            })
            .unwrap_or(false)
    }

    /// `host`'s rate limit (its destination policy's `rateLimit`), checked
    /// by the caller: `None` without one. A poisoned lock refuses.
    pub fn dest_rate_check(&self, host: &str) -> Option<ratelimit::Check> {
        let limit = {
            let c = self.compiled();
            c.config
                .destination_policy(host)
                .and_then(|p| p.traffic.rate_limit)
        }?;
        let now = std::time::Instant::now();
        let mut m = match self.dest_limits.lock() {
            Ok(m) => m,
            Err(_) => {
                let mut b = ratelimit::TokenBucket::new(limit);
                let mut c = b.handle_request(now);
                c.allowed = false;
                c.retry_after = Some(Duration::from_secs(1));
                return Some(c);
            }
        };
        let e = m
            .entry(host.to_owned())
            .or_insert_with(|| (limit, ratelimit::TokenBucket::new(limit)));
        if e.0 != limit {
            *e = (limit, ratelimit::TokenBucket::new(limit));
        }
        Some(e.1.handle_request(now))
    }

    /// The namespace of the workload a verified caller is: one of this
    /// spoke's own workloads, else the one workload of that service account
    /// at the caller's store in the config in force (the registry). `None`
    /// when it is not known or not unique: a `source.namespaces` rule then
    /// does not match.
    pub fn caller_namespace(&self, principal: &SpiffeId) -> Option<String> {
        let (store, account) = match naming::classify(principal)? {
            naming::MeshIdentity::Workload { store, account } => (store, account),
            _ => return None,
        };
        if store == self.store {
            if let Some(w) = self.workloads.iter().find(|w| w.account == account) {
                return Some(w.namespace.clone());
            }
        }
        let c = self.compiled();
        let mut found = c
            .config
            .workloads
            .iter()
            .filter(|w| w.store == store && w.service_account == account)
            .map(|w| w.id.namespace.clone());
        let first = found.next()?;
        found.all(|n| n == first).then_some(first)
    }

    /// A slot under `host`'s request limit, if one is free.
    pub fn in_flight(&self, host: &str) -> Option<resilience::InFlightGuard> {
        let limit = {
            let c = self.compiled();
            resilience::max_requests(
                c.config
                    .destination_policy(host)
                    .and_then(|p| p.traffic.limits.as_ref()),
            )
        };
        let counter = {
            let mut m = self.in_flight.lock().ok()?;
            let e = m
                .entry(host.to_owned())
                .or_insert_with(|| Arc::new(resilience::InFlight::new(limit)));
            if e.max() != limit {
                *e = Arc::new(resilience::InFlight::new(limit));
            }
            e.clone()
        };
        counter.try_acquire()
    }

    /// A request to a balancer slot started (least request counts them).
    pub fn lb_started(&self, slot: &(resolve::BalancerKey, usize)) {
        if let Ok(mut m) = self.balancers.lock() {
            if let Some(b) = m.get_mut(&slot.0) {
                b.handle_request_started(slot.1);
            }
        }
    }

    /// A request to a balancer slot finished.
    pub fn lb_finished(&self, slot: &(resolve::BalancerKey, usize)) {
        if let Ok(mut m) = self.balancers.lock() {
            if let Some(b) = m.get_mut(&slot.0) {
                b.handle_request_finished(slot.1);
            }
        }
    }

    /// The identity evidence of a stream this spoke serves for `peer`.
    pub fn served_identity(
        &self,
        peer: &SpiffeId,
        fingerprint: Option<Sha256Digest>,
    ) -> tidemesh_evidence::record::IdentityEvidence {
        tidemesh_evidence::record::IdentityEvidence {
            client_identity: Some(peer.clone()),
            server_identity: Some(self.node_id.clone()),
            certificate_fingerprint: fingerprint,
            tls_version: tidemesh_evidence::record::TlsVersion::Tls13,
            cipher_suite: Some(self.cipher_suite.clone()),
            trust_chain_verified: true,
            handshake_duration_us: None,
        }
    }

    /// The identity evidence of a call between two workloads of this spoke
    /// (no TLS: the spoke vouches for the caller with its SVID).
    pub fn local_identity(
        &self,
        caller: usize,
        target: usize,
    ) -> tidemesh_evidence::record::IdentityEvidence {
        tidemesh_evidence::record::IdentityEvidence {
            client_identity: Some(self.workloads[caller].id.clone()),
            server_identity: Some(self.workloads[target].id.clone()),
            certificate_fingerprint: self.svid(caller).map(|i| i.fingerprint),
            tls_version: tidemesh_evidence::record::TlsVersion::None,
            cipher_suite: None,
            trust_chain_verified: false,
            handshake_duration_us: None,
        }
    }

    /// The local workload a stream header names (account and service).
    pub fn workload_for(&self, header: &tidemesh_proto::data::StreamHeader) -> Option<usize> {
        self.workloads
            .iter()
            .position(|w| w.account == header.workload && w.service == header.service)
    }

    /// The data plane's counters.
    pub fn counters(&self) -> &Counters {
        &self.h.counters
    }

    /// Starts a request record in the spoke's current mode, timestamped
    /// with trusted time.
    pub fn new_evidence(
        &self,
        service: &str,
        point: EnforcementPoint,
        span: &trace::Span,
        operation: String,
    ) -> RequestEvidence {
        let mut ev = new_evidence(service, point, self.mode(service), span, operation);
        ev.telemetry.start_time = UnixMillis(unix_ms(self.now()));
        ev
    }

    /// Appends a request record; never waits for the commit. Notes the
    /// record's sequence number as evidence of its service in its mode.
    pub fn record(&self, ev: RequestEvidence) {
        if let Some(code) = ev.telemetry.status_code {
            self.counters().answered(code);
        }
        self.counters().latency.observe(
            &ev.service_name,
            latency::direction(&ev),
            latency::tier(&ev),
            ev.telemetry.status_code,
            ev.telemetry.duration_us as f64 / 1e6,
        );
        let service = ev.service_name.clone();
        let mode = ev.mode;
        if let Some(seq) = self
            .h
            .evidence
            .record(tidemesh_evidence::RecordBody::Request(Box::new(ev)))
        {
            vector::note_record(self, &service, mode, seq);
        }
    }
}

/// The empty config (no config in force yet), one per process.
fn empty_policies() -> Arc<CompiledPolicies> {
    static EMPTY: std::sync::OnceLock<Arc<CompiledPolicies>> = std::sync::OnceLock::new();
    EMPTY
        .get_or_init(|| Arc::new(CompiledPolicies::from_config(&empty_config())))
        .clone()
}

fn empty_config() -> Arc<MeshConfig> {
    static EMPTY: std::sync::OnceLock<Arc<MeshConfig>> = std::sync::OnceLock::new();
    EMPTY
        .get_or_init(|| Arc::new(MeshConfig::default()))
        .clone()
}

/// Starts a request record: what is known before anything is decided.
pub(crate) fn new_evidence(
    service: &str,
    point: EnforcementPoint,
    mode: tidemesh_evidence::record::Mode,
    span: &trace::Span,
    operation: String,
) -> RequestEvidence {
    RequestEvidence {
        service_name: service.to_owned(),
        enforcement_point: point,
        mode,
        identity: None,
        policy_evaluation: None,
        rate_limit_check: None,
        routing_decision: None,
        reliability: None,
        telemetry: TelemetryEvidence {
            trace_id: Some(TraceId(span.trace_id)),
            span_id: Some(SpanId(span.span_id)),
            parent_span_id: span.parent_span_id.map(SpanId),
            operation_name: operation,
            start_time: UnixMillis(unix_ms(SystemTime::now())),
            duration_us: 0,
            status: Status {
                code: SpanStatus::Unset,
                message: String::new(),
            },
            status_code: None,
        },
        drill: None,
        user_identity: None,
        trace_sampled: span.sampled,
    }
}

/// Completes a record's telemetry with the outcome.
pub(crate) fn finish_evidence(
    ev: &mut RequestEvidence,
    started: tokio::time::Instant,
    status: hyper::StatusCode,
    message: &str,
) {
    ev.telemetry.duration_us = started.elapsed().as_micros() as u64;
    ev.telemetry.status_code = Some(status.as_u16());
    ev.telemetry.status = Status {
        code: if status.is_server_error() || status.is_client_error() {
            SpanStatus::Error
        } else {
            SpanStatus::Ok
        },
        message: message.to_owned(),
    };
}

/// Completes a record from the response: its status, and the reason the
/// proxy gave in `x-tidemesh-reason` (empty for the upstream's answers).
pub(crate) fn finish_from_response<B>(
    ev: &mut RequestEvidence,
    started: tokio::time::Instant,
    resp: &hyper::Response<B>,
) {
    let reason = resp
        .headers()
        .get(tidemesh_net::http::REASON)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    finish_evidence(ev, started, resp.status(), reason);
}

pub(crate) use tidemesh_net::http::local_response;

/// The header of a data stream (tunnel or hub gateway) for `service`,
/// workload `workload` there, carrying this hop's span; a request id that
/// does not fit the header's rules is left out.
pub(crate) fn stream_header(
    service: &str,
    workload: String,
    protocol: tidemesh_proto::data::StreamProtocol,
    span: &trace::Span,
    request_id: Option<String>,
) -> tidemesh_proto::data::StreamHeader {
    tidemesh_proto::data::StreamHeader {
        service: service.to_owned(),
        workload,
        protocol,
        trace: Some(tidemesh_proto::data::TraceContext {
            trace_id: span.trace_id,
            span_id: span.span_id,
            sampled: span.sampled,
        }),
        request_id: request_id.filter(|r| {
            r.len() <= tidemesh_proto::data::MAX_REQUEST_ID
                && !r.is_empty()
                && r.bytes().all(|b| b.is_ascii_graphic())
        }),
    }
}

/// 24 random bytes for a span (and a trace, when it starts here).
pub(crate) fn span_random() -> [u8; 24] {
    rand::random()
}

/// Probes every same-site endpoint of `service` as local workload
/// `account`: a new handshake on a one-off connection each, answered by
/// the peer spoke itself. One JSON object
/// per endpoint: `server`, `address`, `ok`, `error`, `handshake_us`,
/// `peer_time`, `peer_time_trusted`, `serves`, `elapsed_ms`.
pub(crate) async fn probe_site(
    s: &Arc<Shared>,
    account: &str,
    service: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let caller = s
        .workloads
        .iter()
        .position(|w| w.account == account)
        .ok_or_else(|| format!("no workload {account:?} on this spoke"))?;
    let c = s.compiled();
    let host = resolve::canonical_target(&c.hosts, service, &s.workloads[caller].namespace)?;
    let targets: Vec<(SocketAddr, SpiffeId, String, String)> = c
        .site
        .iter()
        .filter(|e| e.host == host)
        .filter_map(|e| match &e.target {
            Some(resolve::Target::Site {
                addr,
                server,
                account,
            }) => Some((*addr, server.clone(), account.clone(), e.address.clone())),
            _ => None,
        })
        .collect();
    if targets.is_empty() {
        return Err(format!(
            "no endpoint of {host} at this site (the registry from the last config slice names none)"
        ));
    }
    let mut out = Vec::with_capacity(targets.len());
    for (addr, server, there, address) in targets {
        let r = tunnel::probe(s, caller, addr, &server, &host, &there, true).await;
        out.push(match r {
            Ok(p) => serde_json::json!({
                "server": server.to_string(),
                "address": address,
                "ok": true,
                "handshake_us": p.handshake_us,
                "peer_certificate": p.fingerprint.map(|f| f.to_string()),
                "peer_time": crate::rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(p.answer.time_ms)),
                "peer_time_trusted": p.answer.time_trusted,
                "serves": p.answer.serves,
                "elapsed_ms": p.elapsed.as_millis() as u64,
            }),
            Err(e) => serde_json::json!({
                "server": server.to_string(),
                "address": address,
                "ok": false,
                "error": e,
            }),
        });
    }
    Ok(out)
}

/// Probes every peer spoke of the site once (as the first local workload
/// that holds an SVID; not recorded): how many answered, of how many known.
/// The mode machine's measure of same-site reachability.
pub(crate) async fn probe_peers(s: &Arc<Shared>) -> (u32, u32) {
    let c = s.compiled();
    let mut peers: HashMap<SpiffeId, (SocketAddr, String, String)> = HashMap::new();
    for e in &c.site {
        if let Some(resolve::Target::Site {
            addr,
            server,
            account,
        }) = &e.target
        {
            peers
                .entry(server.clone())
                .or_insert((*addr, e.host.clone(), account.clone()));
        }
    }
    let total = peers.len() as u32;
    let creds = s.h.creds.current();
    let Some(caller) =
        (0..s.workloads.len()).find(|&i| creds.workloads.get(i).is_some_and(Option::is_some))
    else {
        return (0, total);
    };
    let mut up = 0;
    for (server, (addr, host, account)) in peers {
        if tunnel::probe(s, caller, addr, &server, &host, &account, false)
            .await
            .is_ok()
        {
            up += 1;
        }
    }
    (up, total)
}

/// Whether the config asks for a data plane: a workload calling out, or a
/// tunnel listener for peers. Without either, no socket is opened.
pub fn needed(file: &crate::FileConfig) -> bool {
    if let (Some(a), None) = (file.data_advertise, file.data_listen) {
        warn!(data_advertise = %a, "data_advertise is set without data_listen: peers dialing it will fail");
    }
    file.data_listen.is_some()
        || file.workloads.iter().any(|w| {
            w.outbound.is_some() || w.plaintext_inbound.is_some() || !w.tcp_outbound.is_empty()
        })
}

/// The bound, not yet serving, data plane.
pub(crate) struct DataPlane {
    shared: Arc<Shared>,
    outbound: Vec<(usize, tokio::net::TcpListener)>,
    plaintext: Vec<(usize, tokio::net::TcpListener)>,
    tcp_outbound: Vec<tcp::Listener>,
    serving: bool,
}

impl DataPlane {
    /// Binds every listener of the config (outbound and raw TCP outbound
    /// per workload, the QUIC data endpoint) and loads what the request
    /// path needs.
    pub async fn bind(h: Handles, settings: DataSettings) -> Result<DataPlane, DataPlaneError> {
        let ident = h.node_id.clone();
        let store = match naming::classify(&ident) {
            Some(naming::MeshIdentity::Node { store, .. }) => store,
            _ => return Err(DataPlaneError::NotANode(ident.clone())),
        };
        let td = ident.trust_domain().clone();
        let file = &h.file;

        let mut workloads = Vec::new();
        for w in &file.workloads {
            let id = naming::workload_id(&td, &store, &w.service_account)
                .map_err(|e| DataPlaneError::Tls(e.to_string()))?;
            let raw = w.service.as_deref().unwrap_or(&w.service_account);
            let service = tidemesh_policy::units::canonical_host(raw, &w.namespace)
                .unwrap_or_else(|_| raw.to_owned());
            workloads.push(LocalWorkload {
                account: w.service_account.clone(),
                id,
                service,
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                inbound: w.inbound,
                inbound_authority: w
                    .inbound
                    .and_then(|a| hyper::http::uri::Authority::try_from(a.to_string()).ok()),
                outbound: w.outbound,
                plaintext: w.plaintext_inbound,
                protocol: w.protocol,
                limiter: w
                    .rate_limit
                    .map(|r| Mutex::new(ratelimit::TokenBucket::new(r.to_policy()))),
            });
        }
        let mut outbound = Vec::new();
        for (i, w) in workloads.iter().enumerate() {
            if let Some(addr) = w.outbound {
                if !addr.ip().is_loopback() {
                    warn!(workload = %w.account, %addr, "outbound listener is not on loopback: anyone who reaches it calls with this workload's identity");
                }
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DataPlaneError::Bind {
                        key: format!("workload[{i}].outbound"),
                        addr,
                        source,
                    })?;
                outbound.push((i, l));
            }
        }
        let plaintext = plaintext::bind(&workloads).await?;
        let tcp_outbound = tcp::bind(file).await?;
        let (endpoint, cipher_suite, serving) = tunnel::bind_endpoint(&h, &settings).await?;
        let node_id = ident.clone();
        let shared = Arc::new(Shared {
            h,
            td,
            store,
            node_id,
            svids: RwLock::new(vec![None; workloads.len()]),
            workloads,
            compiled: RwLock::new(None),
            balancers: Mutex::new(HashMap::new()),
            splits: Mutex::new(HashMap::new()),
            tunnels: tunnel::Pool::new(&settings),
            endpoint,
            cipher_suite,
            conn_limit: Arc::new(Semaphore::new(settings.max_connections)),
            client: workload_client(&settings, false),
            client_h2: workload_client(&settings, true),
            breakers: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            seqs: Mutex::new(HashMap::new()),
            dest_limits: Mutex::new(HashMap::new()),
            settings,
        });
        refresh_svids(&shared);
        Ok(DataPlane {
            shared,
            outbound,
            plaintext,
            tcp_outbound,
            serving,
        })
    }

    /// A weak handle on the shared state (probes, from the spoke's admin).
    pub fn shared(&self) -> std::sync::Weak<Shared> {
        Arc::downgrade(&self.shared)
    }

    /// Serves until dropped (aborting this future stops every listener).
    pub async fn serve(mut self) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, l) in std::mem::take(&mut self.outbound) {
            info!(workload = %self.shared.workloads[i].account, addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "outbound listener up");
            tasks.spawn(outbound::serve(self.shared.clone(), i, l));
        }
        for (i, l) in std::mem::take(&mut self.plaintext) {
            info!(workload = %self.shared.workloads[i].account, addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "plaintext inbound listener up");
            tasks.spawn(plaintext::serve(self.shared.clone(), i, l));
        }
        for l in std::mem::take(&mut self.tcp_outbound) {
            tasks.spawn(tcp::serve(self.shared.clone(), l));
        }
        if self.serving {
            info!(addr = %self.shared.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "data tunnel listener up");
            tasks.spawn(tunnel::accept_loop(self.shared.clone()));
        }
        // New SVIDs (issued by the node CA, or a renewed node SVID): the
        // request path's facts and the serving certificate follow them.
        let s = self.shared.clone();
        tasks.spawn(async move {
            let mut rx = s.h.creds.subscribe();
            while rx.changed().await.is_ok() {
                refresh_svids(&s);
                tunnel::refresh_server_config(&s).await;
            }
        });
        // A new revocation list closes the connections it names at once.
        let s = self.shared.clone();
        tasks.spawn(async move {
            let mut rx = s.h.creds.revocations_changed();
            loop {
                if let Some(list) = s.h.creds.revocations().current() {
                    let n = s.tunnels.close_revoked(&list);
                    if n > 0 {
                        info!(
                            closed = n,
                            version = list.version,
                            "closed data connections the revocation list names"
                        );
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        while tasks.join_next().await.is_some() {}
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        // Only reached when serve() was never called or has been aborted.
        self.shared.endpoint.close(
            quinn::VarInt::from_u32(tidemesh_proto::close::SHUTDOWN),
            b"data plane stopped",
        );
    }
}

/// Accepts apps' connections on `listener` for as long as it lives, each
/// under a connection-limit permit (refused over the limit), and hands
/// each to `serve` on its own task.
pub(crate) async fn accept_apps<F, Fut>(
    s: Arc<Shared>,
    listener: tokio::net::TcpListener,
    what: &'static str,
    serve: F,
) where
    F: Fn(Arc<Shared>, tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = s.conn_limit.clone().try_acquire_owned() else {
            warn!(
                limit = s.settings.max_connections,
                listener = what,
                "connection limit reached; refusing an app connection"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let fut = serve(s.clone(), stream);
        tokio::spawn(async move {
            let _permit = permit;
            fut.await;
        });
    }
}

/// Serves HTTP (HTTP/1.1 or HTTP/2, as the app speaks) on an app-facing
/// listener: [`accept_apps`], then each request through `handle`.
pub(crate) async fn serve_apps_http<H, Fut>(
    s: Arc<Shared>,
    listener: tokio::net::TcpListener,
    what: &'static str,
    handle: H,
) where
    H: Fn(Arc<Shared>, hyper::Request<hyper::body::Incoming>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    accept_apps(s, listener, what, move |s, stream| {
        let handle = handle.clone();
        async move {
            let svc = {
                let s = s.clone();
                hyper::service::service_fn(move |req| {
                    let fut = handle(s.clone(), req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                })
            };
            if let Err(e) = tidemesh_net::http::app_server(
                s.settings.header_timeout,
                s.settings.max_header_bytes,
                s.settings.quic.max_streams,
            )
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await
            {
                tracing::debug!(error = %e, listener = what, "app connection ended");
            }
        }
    })
    .await
}

/// Most idle connections the pool keeps to one workload address: as many
/// as requests can be in flight at once (`max_connections`), at least 64,
/// at most 1,024 (file descriptors). Fewer than the callers' concurrency
/// makes the pool close connections after every burst and open new ones
/// for the next (with 256 callers and 64 kept: ~300 new upstream
/// connections per 1,000 requests).
pub(crate) fn pool_max_idle(settings: &DataSettings) -> usize {
    settings.max_connections.clamp(64, 1024)
}

/// The pooled client to this spoke's workloads: HTTP/1.1, or HTTP/2 with
/// prior knowledge.
fn workload_client(settings: &DataSettings, h2: bool) -> Client<HttpConnector, Body> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(pool_max_idle(settings))
        .http2_only(h2)
        .timer(hyper_util::rt::TokioTimer::new())
        .build(http)
}

/// Copies the workloads' SVID facts (fingerprint) from the credentials in
/// force, off the request path.
fn refresh_svids(s: &Arc<Shared>) {
    let cur = s.h.creds.current();
    let v: Vec<Option<SvidInfo>> = (0..s.workloads.len())
        .map(|i| {
            let svid = cur.workloads.get(i).cloned().flatten()?;
            Some(SvidInfo {
                fingerprint: Sha256Digest::of(svid.chain.first()?),
            })
        })
        .collect();
    if let Ok(mut slot) = s.svids.write() {
        *slot = v;
    }
}
