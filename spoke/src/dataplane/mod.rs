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
//!
//! Every request yields one evidence record per spoke it crosses, appended
//! to the evidence buffer without waiting for the commit.
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
pub(crate) mod outbound;
pub mod ratelimit;
pub(crate) mod resolve;
pub mod trace;
pub(crate) mod tunnel;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Bytes;
use tidemesh_evidence::record::{
    EnforcementPoint, RequestEvidence, Status, StatusCode as SpanStatus, TelemetryEvidence,
};
use tidemesh_evidence::{Sha256Digest, SpanId, TraceId, UnixMillis};
use tidemesh_identity::{naming, SpiffeId, TrustDomain};
use tidemesh_net::QuicSettings;
use tidemesh_policy::{model::Labels, CompiledPolicies, CompiledRoutes, MeshConfig};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::{unix_ms, Spoke};

/// The body type both directions use.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Limits and timeouts of the data plane.
#[derive(Debug, Clone)]
pub struct DataSettings {
    /// Connecting to a workload's inbound listener.
    pub connect_timeout: Duration,
    /// From sending a request upstream to its response head (a route's own
    /// timeout, when it has one, applies instead).
    pub request_timeout: Duration,
    /// Reading a request head (HTTP) or a stream header (tunnel).
    pub header_timeout: Duration,
    /// Most bytes of an HTTP request head.
    pub max_header_bytes: usize,
    /// Most connections open at once from apps (all outbound listeners) and
    /// most tunnel streams served at once.
    pub max_connections: usize,
    /// QUIC transport of the tunnel (streams per connection, idle timeout).
    pub quic: QuicSettings,
    /// How often cached SVIDs are re-read (they renew on disk).
    pub creds_refresh: Duration,
}

impl Default for DataSettings {
    fn default() -> Self {
        DataSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            quic: QuicSettings {
                keep_alive: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(30),
                max_streams: 256,
            },
            creds_refresh: Duration::from_secs(2),
        }
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
    pub outbound: Option<SocketAddr>,
    pub limiter: Option<Mutex<ratelimit::TokenBucket>>,
}

/// The config in force, compiled once per version.
pub(crate) struct Compiled {
    pub version: Option<u64>,
    pub config: Arc<MeshConfig>,
    pub policies: CompiledPolicies,
    pub routes: Option<CompiledRoutes>,
}

/// What the data plane knows of a cached SVID without touching disk.
#[derive(Debug, Clone)]
pub(crate) struct SvidInfo {
    pub fingerprint: Sha256Digest,
}

/// State shared by every listener and request.
pub(crate) struct Shared {
    pub spoke: Spoke,
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
}

impl Shared {
    /// The config in force, compiled (recompiled when the version moved).
    pub fn compiled(&self) -> Arc<Compiled> {
        let (version, config) = match self.spoke.inner.config.read() {
            Ok(c) => match c.as_ref() {
                Some((a, m)) => (Some(a.version), m.clone()),
                None => (None, Arc::new(MeshConfig::default())),
            },
            Err(_) => (None, Arc::new(MeshConfig::default())),
        };
        if let Ok(c) = self.compiled.read() {
            if let Some(c) = c.as_ref() {
                if c.version == version {
                    return c.clone();
                }
            }
        }
        let routes = match CompiledRoutes::from_config(&config) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(version = ?version, error = %e, "route rules do not compile; routing straight to hosts");
                None
            }
        };
        let c = Arc::new(Compiled {
            version,
            policies: CompiledPolicies::from_config(&config),
            routes,
            config,
        });
        if let Ok(mut slot) = self.compiled.write() {
            *slot = Some(c.clone());
        }
        c
    }

    /// The spoke's current mode, for evidence.
    pub fn mode(&self) -> tidemesh_evidence::record::Mode {
        self.spoke
            .inner
            .live
            .lock()
            .map(|l| l.mode)
            .unwrap_or(tidemesh_evidence::record::Mode::Survival)
    }

    /// Whether a local workload passes its health checks.
    pub fn healthy(&self, account: &str) -> bool {
        self.spoke
            .inner
            .local_health
            .lock()
            .map(|h| h.get(account).copied().unwrap_or(false))
            .unwrap_or(false)
    }

    /// The cached SVID facts of local workload `i`.
    pub fn svid(&self, i: usize) -> Option<SvidInfo> {
        self.svids.read().ok()?.get(i).cloned().flatten()
    }

    /// Appends a request record; never waits for the commit.
    pub fn record(&self, ev: RequestEvidence) {
        self.spoke
            .record(tidemesh_evidence::RecordBody::Request(Box::new(ev)));
    }
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
        .get("x-tidemesh-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    finish_evidence(ev, started, resp.status(), reason);
}

/// A response made by the proxy itself, with a reason in the body and in
/// `x-tidemesh-reason`.
pub(crate) fn local_response(
    status: hyper::StatusCode,
    reason: &str,
    extra: &[(&'static str, String)],
) -> hyper::Response<Body> {
    let body = Full::new(Bytes::from(format!("{reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut r = hyper::Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&sanitize(reason)) {
        h.insert("x-tidemesh-reason", v);
    }
    for (k, v) in extra {
        if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    r
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

/// 24 random bytes for a span (and a trace, when it starts here).
pub(crate) fn span_random() -> [u8; 24] {
    rand::random()
}

/// Whether the config asks for a data plane: a workload calling out, or a
/// tunnel listener for peers. Without either, no socket is opened.
pub fn needed(file: &crate::FileConfig) -> bool {
    if let (Some(a), None) = (file.data_advertise, file.data_listen) {
        warn!(data_advertise = %a, "data_advertise is set without data_listen: peers dialing it will fail");
    }
    file.data_listen.is_some() || file.workloads.iter().any(|w| w.outbound.is_some())
}

/// The bound, not yet serving, data plane.
pub(crate) struct DataPlane {
    shared: Arc<Shared>,
    outbound: Vec<(usize, tokio::net::TcpListener)>,
    serving: bool,
}

impl DataPlane {
    /// Binds every listener of the config (outbound TCP per workload, the
    /// QUIC data endpoint) and loads what the request path needs.
    pub async fn bind(spoke: &Spoke, settings: DataSettings) -> Result<DataPlane, DataPlaneError> {
        let ident = &spoke.inner.ident.id;
        let store = match naming::classify(ident) {
            Some(naming::MeshIdentity::Node { store, .. }) => store,
            _ => return Err(DataPlaneError::NotANode(ident.clone())),
        };
        let td = ident.trust_domain().clone();
        let file = &spoke.inner.cfg.file;

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
                outbound: w.outbound,
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
        let (endpoint, cipher_suite, serving) = tunnel::bind_endpoint(spoke, &settings).await?;
        let node_id = ident.clone();
        let shared = Arc::new(Shared {
            spoke: spoke.clone(),
            td,
            store,
            node_id,
            svids: RwLock::new(vec![None; workloads.len()]),
            workloads,
            compiled: RwLock::new(None),
            balancers: Mutex::new(HashMap::new()),
            splits: Mutex::new(HashMap::new()),
            tunnels: tunnel::Pool::default(),
            endpoint,
            cipher_suite,
            conn_limit: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
        });
        refresh_svids(&shared).await;
        Ok(DataPlane {
            shared,
            outbound,
            serving,
        })
    }

    /// Serves until dropped (aborting this future stops every listener).
    pub async fn serve(mut self) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, l) in std::mem::take(&mut self.outbound) {
            info!(workload = %self.shared.workloads[i].account, addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "outbound listener up");
            tasks.spawn(outbound::serve(self.shared.clone(), i, l));
        }
        if self.serving {
            info!(addr = %self.shared.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "data tunnel listener up");
            tasks.spawn(tunnel::accept_loop(self.shared.clone()));
        }
        let s = self.shared.clone();
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(s.settings.creds_refresh).await;
                refresh_svids(&s).await;
                tunnel::refresh_server_config(&s).await;
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

/// Re-reads the workloads' SVID facts (fingerprint, expiry) off the request path.
async fn refresh_svids(s: &Arc<Shared>) {
    let store = s.spoke.inner.store.clone();
    let accounts: Vec<String> = s.workloads.iter().map(|w| w.account.clone()).collect();
    let loaded = tokio::task::spawn_blocking(move || {
        accounts
            .iter()
            .map(|a| {
                store.workload(a).ok().flatten().and_then(|svid| {
                    Some(SvidInfo {
                        fingerprint: Sha256Digest::of(svid.chain.first()?),
                    })
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    if let (Ok(v), Ok(mut slot)) = (loaded, s.svids.write()) {
        *slot = v;
    }
}
