//! The hub's gateway: how a spoke's workloads reach cloud services.
//!
//! What it is: the serving end of the data tunnel (ALPN `tidemesh-data/1`)
//! on the hub's QUIC endpoint. A spoke opens one connection per calling
//! workload, presenting that workload's SVID, and one stream per request
//! (a [`StreamHeader`] naming the service, then HTTP/1.1). The gateway
//! serves only hosts a `ServiceEntry` of the current config declares:
//! * it refuses a request target whose path is ambiguous (`%2F`, `%5C`,
//!   `;`, `\`, dot segments, `%2E`, control bytes: 400 with the reason,
//!   [`tidemesh_policy::check_path`]) and otherwise authorizes and
//!   forwards the same, normal, path;
//! * it authorizes the call (Istio semantics, `tidemesh-policy`) with the
//!   workload's verified SPIFFE ID as the principal against **each**
//!   endpoint of the entry: the destination "workload" is the entry's
//!   namespace and that endpoint's labels (and port), so an
//!   `AuthorizationPolicy` in the entry's namespace selecting those labels
//!   (or none) applies; when no endpoint is allowed the call gets 403 with
//!   the reason;
//! * it picks among the allowed endpoints (round robin; DNS names resolved
//!   per request; on a connect failure the next allowed endpoint is tried,
//!   which is safe because nothing was sent): failover never reaches an
//!   endpoint the policy refuses;
//! * it forwards with `x-forwarded-client-cert: By=<hub>;URI=<caller>` and
//!   answers with `x-tidemesh-upstream` naming the endpoint, which the
//!   calling spoke writes into its evidence record;
//! * a stream whose header says raw TCP is authorized at L4 (Istio's TCP
//!   semantics, per endpoint as above) and piped to an allowed endpoint; a
//!   refusal resets the stream; the connection is closed when no byte moved
//!   either way for [`GatewaySettings::tcp_idle_timeout`] (5 min, as on
//!   the spokes).
//!
//! * one workload (verified SPIFFE ID) holds at most
//!   [`GatewaySettings::max_connections_per_peer`] connections and
//!   [`GatewaySettings::max_streams_per_peer`] open streams at once, across
//!   all its connections and spokes (quinn's stream limit is per
//!   connection); more are closed or reset with `close::BUSY` and counted.
//!   A stream holds its slots from the moment it is accepted; one that has
//!   not sent its full header within [`GatewaySettings::header_timeout`] is
//!   reset and gives them back, so silent streams cannot keep them.
//!
//! Who drives it: [`crate::Hub::serve`] hands it connections that
//! negotiated the data ALPN. What it must not do: forward to anything a
//! `ServiceEntry` does not declare (it is not an open proxy), take the
//! caller's identity from anything but the handshake, or read unbounded
//! headers.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http_body_util::BodyExt;
use hyper::{body::Incoming, header::HeaderValue, service::service_fn, Request, Response};
use hyper::{StatusCode, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use tidemesh_identity::{naming, SpiffeId};
use tidemesh_net::caps::PeerCaps;
use tidemesh_net::http::{
    full, local_response, path_and_query, read_stream_header, strip_hop_by_hop, Body, UPSTREAM,
    XFCC,
};
use tidemesh_net::pipe::{pipe, End, Piped, TCP_IDLE_TIMEOUT};
use tidemesh_policy::{
    check_path,
    model::{EndpointLocation, Labels, Resolution},
    AuthzRequest, AuthzVerdict, CompiledPolicies, HeaderLookup, MeshConfig, WorkloadRef,
};
use tidemesh_proto::{
    close,
    data::{StreamHeader, StreamProtocol},
};
use tokio::{sync::Semaphore, time::timeout};
use tracing::{debug, warn};

use crate::origination::{self, LegError, Origination};
use crate::Hub;

/// Response header saying what the TLS leg to the cloud endpoint
/// negotiated (`1.3 TLS13_AES_256_GCM_SHA384 SIMPLE sni=api.example`); the
/// calling spoke writes it into its evidence record.
pub use tidemesh_net::http::UPSTREAM_TLS;

/// Limits and timeouts of the gateway.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Connecting to a cloud endpoint.
    pub connect_timeout: Duration,
    /// From forwarding a request to its response head.
    pub request_timeout: Duration,
    /// Reading a stream header or a request head: a stream that has not
    /// sent its full header by then is reset and its slot freed.
    pub header_timeout: Duration,
    /// Most bytes of a request head.
    pub max_header_bytes: usize,
    /// Most streams served at once (all spokes).
    pub max_streams: usize,
    /// Most gateway connections one workload (verified SPIFFE ID) holds at
    /// once, from any number of spokes; one more is closed with
    /// `close::BUSY`.
    pub max_connections_per_peer: usize,
    /// Most streams one workload (verified SPIFFE ID) has open at once
    /// across all its connections; one more is reset with `close::BUSY`.
    pub max_streams_per_peer: usize,
    /// A raw TCP stream is closed when no byte moved either way for this
    /// long (the spoke's raw TCP idle timeout, by default).
    pub tcp_idle_timeout: Duration,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_streams: 4096,
            max_connections_per_peer: 32,
            max_streams_per_peer: 512,
            tcp_idle_timeout: TCP_IDLE_TIMEOUT,
        }
    }
}

/// The gateway's state: counters, round-robin positions, the compiled
/// policies of the config in force, pooled connections to cloud endpoints.
pub(crate) struct Gateway {
    settings: GatewaySettings,
    permits: Arc<Semaphore>,
    client: Client<HttpConnector, Body>,
    /// The same for entries whose port protocol is `HTTP2` or `GRPC`.
    client_h2: Client<HttpConnector, Body>,
    rotation: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    policies: Mutex<Option<(u64, Arc<CompiledPolicies>)>>,
    /// Requests answered by a cloud endpoint.
    pub forwarded: AtomicU64,
    /// Requests denied by authorization.
    pub denied: AtomicU64,
    /// Requests for hosts no `ServiceEntry` declares.
    pub unknown: AtomicU64,
    /// Requests no endpoint answered (connect failure, timeout).
    pub failed: AtomicU64,
    /// Connections per verified workload.
    peer_conns: PeerCaps<SpiffeId>,
    /// Open streams per verified workload, across its connections.
    peer_streams: PeerCaps<SpiffeId>,
    /// Connections closed because their workload held its cap.
    pub refused_connections: AtomicU64,
    /// Streams reset because their workload held its cap.
    pub refused_streams: AtomicU64,
    /// Streams reset because the gateway's global stream limit was reached.
    pub refused_streams_global: AtomicU64,
    /// Streams reset because no full header arrived in time.
    pub header_timeouts: AtomicU64,
    /// Open gateway connections (by quinn stable id) and the verified SVID
    /// each was made with, so a new revocation list closes the ones it
    /// names.
    conns: Mutex<HashMap<usize, (tidemesh_identity::VerifiedSvid, quinn::Connection)>>,
    /// TLS origination settings loaded for one config version, by host
    /// (`Ok(None)`: plaintext; `Err`: why the files could not be loaded).
    origination: Mutex<Option<(u64, OriginationCache)>>,
}

type OriginationCache = HashMap<String, Result<Option<Arc<Origination>>, String>>;

impl Gateway {
    pub(crate) fn new(settings: GatewaySettings) -> Gateway {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(http.clone());
        let client_h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .build(http);
        Gateway {
            permits: Arc::new(Semaphore::new(settings.max_streams)),
            peer_conns: PeerCaps::new(settings.max_connections_per_peer),
            peer_streams: PeerCaps::new(settings.max_streams_per_peer),
            refused_connections: AtomicU64::new(0),
            refused_streams: AtomicU64::new(0),
            refused_streams_global: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            settings,
            client,
            client_h2,
            rotation: Mutex::new(HashMap::new()),
            policies: Mutex::new(None),
            forwarded: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            origination: Mutex::new(None),
        }
    }

    /// Closes every open gateway connection whose SVID `list` refuses (its
    /// leaf, its node CA, or their keys); returns how many.
    pub(crate) fn close_revoked(&self, list: &tidemesh_identity::RevocationList) -> usize {
        let doomed: Vec<(String, quinn::Connection)> = match self.conns.lock() {
            Ok(mut m) => {
                let ids: Vec<usize> = m
                    .iter()
                    .filter(|(_, (svid, _))| svid.revoked_by(list))
                    .map(|(k, _)| *k)
                    .collect();
                ids.into_iter()
                    .filter_map(|k| m.remove(&k))
                    .map(|(svid, c)| (svid.id().to_string(), c))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for (id, c) in &doomed {
            warn!(target: "tidemesh::audit", peer = %id, "closing a gateway connection: its SVID is revoked");
            c.close(quinn::VarInt::from_u32(close::REVOKED), b"revoked");
        }
        doomed.len()
    }

    /// The counters, for `stats` and `/metrics`.
    pub(crate) fn counters(&self) -> [(&'static str, u64); 4] {
        [
            ("forwarded", self.forwarded.load(Ordering::Relaxed)),
            ("denied", self.denied.load(Ordering::Relaxed)),
            ("unknown_service", self.unknown.load(Ordering::Relaxed)),
            ("failed", self.failed.load(Ordering::Relaxed)),
        ]
    }

    /// What the per-peer caps and the header deadline refused, by reason,
    /// for `stats` and `/metrics`.
    pub(crate) fn refusals(&self) -> [(&'static str, u64); 4] {
        [
            (
                "peer_connections",
                self.refused_connections.load(Ordering::Relaxed),
            ),
            ("peer_streams", self.refused_streams.load(Ordering::Relaxed)),
            (
                "global_streams",
                self.refused_streams_global.load(Ordering::Relaxed),
            ),
            (
                "header_timeout",
                self.header_timeouts.load(Ordering::Relaxed),
            ),
        ]
    }
}

struct HeaderMapLookup<'a>(&'a hyper::HeaderMap);

impl HeaderLookup for HeaderMapLookup<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One cloud endpoint of a service entry, as the gateway dials it.
#[derive(Debug, Clone)]
struct CloudEndpoint {
    /// `host:port` (host may be a DNS name).
    address: String,
    labels: Labels,
}

/// Whether a `ServiceEntry` serves HTTP/2 (its first port's protocol is
/// `HTTP2` or `GRPC`): the gateway then speaks HTTP/2 with prior knowledge
/// to its endpoints, as gRPC servers need.
fn entry_speaks_h2(config: &MeshConfig, host: &str) -> bool {
    config
        .service_entries
        .iter()
        .find(|e| e.hosts.iter().any(|h| h == host))
        .and_then(|e| e.ports.first())
        .and_then(|p| p.protocol.as_deref())
        .is_some_and(|p| p.eq_ignore_ascii_case("HTTP2") || p.eq_ignore_ascii_case("GRPC"))
}

/// The entry declaring `host`: its namespace and endpoints.
fn entry_endpoints(config: &MeshConfig, host: &str) -> Option<(String, Vec<CloudEndpoint>)> {
    let entry = config
        .service_entries
        .iter()
        .find(|e| e.hosts.iter().any(|h| h == host))?;
    let mut eps: Vec<CloudEndpoint> = config
        .endpoints_for(host, None)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.location == EndpointLocation::Cloud)
        .map(|e| CloudEndpoint {
            address: e.address,
            labels: e.labels,
        })
        .collect();
    if eps.is_empty() && matches!(entry.resolution, Resolution::None | Resolution::Dns) {
        // No endpoints listed: the host itself, on the entry's port.
        let port = entry
            .ports
            .first()
            .map(|p| p.target_port.unwrap_or(p.number))
            .unwrap_or(80);
        eps.push(CloudEndpoint {
            address: format!("{host}:{port}"),
            labels: Labels::new(),
        });
    }
    Some((entry.id.namespace.clone(), eps))
}

/// The call's facts except the destination, which each candidate endpoint
/// fills in (its labels and port).
struct Call<'a> {
    namespace: &'a str,
    principal: &'a str,
    caller_ns: Option<&'a str>,
    /// `None`: raw TCP (L4 semantics).
    l7: Option<(&'a str, &'a str, &'a (dyn HeaderLookup + Sync))>,
}

/// The endpoints a call may go to, in rotation order from `start`: each is
/// authorized with its own labels and port, so failover never reaches an
/// endpoint the policy refuses. `Err` carries the verdict for the first
/// endpoint in rotation when none is allowed.
fn authorized_endpoints<'e>(
    policies: &CompiledPolicies,
    call: &Call<'_>,
    endpoints: &'e [CloudEndpoint],
    start: usize,
) -> Result<Vec<&'e CloudEndpoint>, AuthzVerdict> {
    let mut first_denial = None;
    let mut allowed = Vec::new();
    for k in 0..endpoints.len() {
        let ep = &endpoints[(start + k) % endpoints.len()];
        let mut req = AuthzRequest {
            workload: WorkloadRef {
                namespace: call.namespace,
                labels: &ep.labels,
            },
            source_principal: Some(call.principal),
            source_namespace: call.caller_ns,
            method: "",
            path: "",
            port: port_of(&ep.address),
            headers: &tidemesh_policy::NoHeaders,
            request_auth: None,
        };
        let verdict = match call.l7 {
            Some((method, path, headers)) => {
                req.method = method;
                req.path = path;
                req.headers = headers;
                policies.decide(&req)
            }
            None => policies.decide_l4(&req),
        };
        if verdict.allowed {
            allowed.push(ep);
        } else if first_denial.is_none() {
            first_denial = Some(verdict);
        }
    }
    match first_denial {
        Some(v) if allowed.is_empty() => Err(v),
        _ => Ok(allowed),
    }
}

impl Hub {
    fn gateway_policies(&self, version: u64, config: &MeshConfig) -> Arc<CompiledPolicies> {
        let g = &self.inner.gateway;
        if let Ok(slot) = g.policies.lock() {
            if let Some((v, p)) = slot.as_ref() {
                if *v == version {
                    return p.clone();
                }
            }
        }
        let p = Arc::new(CompiledPolicies::from_config(config));
        if let Ok(mut slot) = g.policies.lock() {
            *slot = Some((version, p.clone()));
        }
        p
    }

    /// The TLS leg `host` needs under config `version`, loaded once per
    /// version (the files are read again after every apply).
    fn gateway_origination(
        &self,
        version: u64,
        config: &MeshConfig,
        host: &str,
    ) -> Result<Option<Arc<Origination>>, String> {
        let g = &self.inner.gateway;
        if let Ok(slot) = g.origination.lock() {
            if let Some((v, cache)) = slot.as_ref() {
                if *v == version {
                    if let Some(r) = cache.get(host) {
                        return r.clone();
                    }
                }
            }
        }
        let r = match origination::setting_for(config, host) {
            None => Ok(None),
            Some((p, tls)) => Origination::load(host, tls)
                .map(|o| o.map(Arc::new))
                .map_err(|e| format!("TLS settings of DestinationRule {}: {e}", p.id)),
        };
        if let Ok(mut slot) = g.origination.lock() {
            let fresh = !matches!(slot.as_ref(), Some((v, _)) if *v == version);
            if fresh {
                *slot = Some((version, HashMap::new()));
            }
            if let Some((_, cache)) = slot.as_mut() {
                cache.insert(host.to_owned(), r.clone());
            }
        }
        r
    }

    /// Serves one spoke connection that negotiated the data ALPN.
    /// The namespace of a verified calling workload: from the registry
    /// (what its spoke registered) and the config's `Workload` objects of
    /// its store; `None` when unknown or not unique, so a
    /// `source.namespaces` rule does not match.
    fn caller_namespace(&self, peer: &SpiffeId, config: &MeshConfig) -> Option<String> {
        let Some(naming::MeshIdentity::Workload { store, account }) = naming::classify(peer) else {
            return None;
        };
        let mut all = self
            .inner
            .registry
            .lock()
            .map(|r| r.namespaces_of(&store, &account))
            .unwrap_or_default();
        all.extend(
            config
                .workloads
                .iter()
                .filter(|w| w.store == store && w.service_account == account)
                .map(|w| w.id.namespace.clone()),
        );
        all.sort();
        all.dedup();
        match all.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }

    pub(crate) async fn serve_gateway(&self, conn: quinn::Connection) {
        // The handshake verified the chain; verify it again to hold its
        // facts (issuer node CA, key fingerprints) for later revocations.
        let svid = match tidemesh_net::peer_svid(&conn, &self.bundle(), self.inner.clock.now()) {
            Ok(s) => s,
            Err(e) => {
                conn.close(quinn::VarInt::from_u32(close::FORBIDDEN), e.as_bytes());
                return;
            }
        };
        if !matches!(
            naming::classify(svid.id()),
            Some(naming::MeshIdentity::Workload { .. })
        ) || svid.issuer().is_none()
        {
            conn.close(
                quinn::VarInt::from_u32(close::FORBIDDEN),
                b"only workload SVIDs issued by a node CA may use the gateway",
            );
            return;
        }
        let peer = svid.id().clone();
        let gw = &self.inner.gateway;
        // Held while this connection lives: one workload's connections are
        // capped however many spokes or sockets it dials from.
        let _conn_slot = match gw.peer_conns.try_acquire(&peer) {
            Ok(slot) => slot,
            Err(e) => {
                gw.refused_connections.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, remote = %conn.remote_address(), "gateway connection refused: per-peer cap");
                conn.close(
                    quinn::VarInt::from_u32(close::BUSY),
                    e.to_string().as_bytes(),
                );
                return;
            }
        };
        debug!(%peer, remote = %conn.remote_address(), "gateway peer connected");
        let stable = conn.stable_id();
        if let Ok(mut m) = gw.conns.lock() {
            m.insert(stable, (svid.clone(), conn.clone()));
        }
        // A list installed between the handshake and the insert above.
        if let Some(list) = self.inner.revocations.current() {
            if svid.revoked_by(&list) {
                gw.close_revoked(&list);
            }
        }
        // no connection outlives the certificates it was made with
        let expires = svid
            .issuer()
            .map_or(svid.not_after(), |i| i.not_after().min(svid.not_after()));
        let clock = self.inner.clock.clone();
        let watched = conn.clone();
        let who = peer.clone();
        let expiry = async move {
            if tidemesh_net::quic::close_at_expiry(clock, watched, expires).await {
                debug!(peer = %who, "closed a gateway connection: its SVID expired");
            }
        };
        tokio::select! {
            _ = self.serve_gateway_streams(conn.clone(), Arc::new(peer)) => {}
            _ = expiry => {}
        }
        if let Ok(mut m) = gw.conns.lock() {
            m.remove(&stable);
        }
    }

    async fn serve_gateway_streams(&self, conn: quinn::Connection, peer: Arc<SpiffeId>) {
        loop {
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(x) => x,
                Err(_) => return,
            };
            let gw = &self.inner.gateway;
            // The workload's own cap first, so one peer's flood is refused
            // before it can take the global slots from everyone else.
            let Ok(peer_slot) = gw.peer_streams.try_acquire(&peer) else {
                gw.refused_streams.fetch_add(1, Ordering::Relaxed);
                let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
                let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
                continue;
            };
            let Ok(permit) = gw.permits.clone().try_acquire_owned() else {
                gw.refused_streams_global.fetch_add(1, Ordering::Relaxed);
                let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
                let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
                continue;
            };
            let hub = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _peer_slot = peer_slot;
                let gw = &hub.inner.gateway;
                let settings = &gw.settings;
                let header = match timeout(settings.header_timeout, read_stream_header(&mut recv))
                    .await
                {
                    Ok(Ok(h)) => h,
                    Ok(Err(e)) => {
                        warn!(%peer, error = %e, "bad gateway stream header; resetting the stream");
                        let _ = send.reset(quinn::VarInt::from_u32(close::PROTOCOL_ERROR));
                        let _ = recv.stop(quinn::VarInt::from_u32(close::PROTOCOL_ERROR));
                        return;
                    }
                    Err(_) => {
                        // silent, or a partial header: the slots go back now
                        gw.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
                        let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
                        return;
                    }
                };
                if header.protocol == StreamProtocol::Tcp {
                    hub.gateway_tcp(&peer, &header, send, recv).await;
                    return;
                }
                let header = Arc::new(header);
                let io = TokioIo::new(tokio::io::join(recv, send));
                let svc = {
                    let hub = hub.clone();
                    service_fn(move |req| {
                        let hub = hub.clone();
                        let peer = peer.clone();
                        let header = header.clone();
                        async move {
                            Ok::<_, Infallible>(hub.gateway_request(&peer, &header, req).await)
                        }
                    })
                };
                if let Err(e) = tidemesh_net::http::http1_server(
                    settings.header_timeout,
                    settings.max_header_bytes,
                )
                .serve_connection(io, svc)
                .await
                {
                    debug!(error = %e, "gateway stream ended");
                }
            });
        }
    }

    /// A raw TCP connection to a cloud service: L4 authorization (Istio's
    /// TCP semantics), an endpoint in rotation (the next on a connect
    /// failure), then bytes both ways until both sides finish. A refusal
    /// resets the stream, so the app sees its connection closed.
    async fn gateway_tcp(
        &self,
        peer: &SpiffeId,
        header: &StreamHeader,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let g = &self.inner.gateway;
        let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code| {
            let _ = send.reset(quinn::VarInt::from_u32(code));
            let _ = recv.stop(quinn::VarInt::from_u32(code));
        };
        let latest = self.latest_config().ok().flatten();
        let Some((latest, (namespace, endpoints))) = latest.and_then(|l| {
            let e = entry_endpoints(&l.config, &header.service)?;
            Some((l, e))
        }) else {
            g.unknown.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, service = %header.service, "raw TCP for a host no ServiceEntry declares; refused");
            return refuse(&mut send, &mut recv, close::PROTOCOL_ERROR);
        };
        if endpoints.is_empty() {
            g.failed.fetch_add(1, Ordering::Relaxed);
            return refuse(&mut send, &mut recv, close::NORMAL);
        }
        let start = self.gateway_rotation(&header.service);
        let policies = self.gateway_policies(latest.meta.version, &latest.config);
        let caller_ns = self.caller_namespace(peer, &latest.config);
        let principal = peer.to_string();
        let call = Call {
            namespace: &namespace,
            principal: principal.strip_prefix("spiffe://").unwrap_or(&principal),
            caller_ns: caller_ns.as_deref(),
            l7: None,
        };
        let candidates = match authorized_endpoints(&policies, &call, &endpoints, start) {
            Ok(c) => c,
            Err(verdict) => {
                g.denied.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, service = %header.service, reason = verdict.reason.as_str(), "raw TCP denied at the gateway");
                return refuse(&mut send, &mut recv, close::FORBIDDEN);
            }
        };
        for ep in candidates {
            let Ok(addr) = resolve(&ep.address).await else {
                continue;
            };
            let connected = timeout(
                g.settings.connect_timeout,
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            let Ok(Ok(upstream)) = connected else {
                continue;
            };
            let _ = upstream.set_nodelay(true);
            g.forwarded.fetch_add(1, Ordering::Relaxed);
            let mut stream = tokio::io::join(recv, send);
            let piped = relay_tcp(&mut stream, upstream, g.settings.tcp_idle_timeout).await;
            let (mut recv, mut send) = stream.into_inner();
            match piped.end {
                End::Closed => {
                    let _ = send.finish();
                }
                End::Idle(idle) => {
                    debug!(%peer, endpoint = %ep.address, ?idle, up = piped.up, down = piped.down, "raw TCP through the gateway closed: idle");
                    let _ = send.finish();
                    let _ = recv.stop(quinn::VarInt::from_u32(close::NORMAL));
                }
                End::Failed(e) => {
                    debug!(%peer, endpoint = %ep.address, error = %e, "raw TCP through the gateway ended");
                    refuse(&mut send, &mut recv, close::NORMAL);
                }
            }
            return;
        }
        g.failed.fetch_add(1, Ordering::Relaxed);
        refuse(&mut send, &mut recv, close::NORMAL);
    }

    /// The next position in `service`'s endpoint rotation.
    fn gateway_rotation(&self, service: &str) -> usize {
        self.inner
            .gateway
            .rotation
            .lock()
            .map(|mut m| m.entry(service.to_owned()).or_default().clone())
            .unwrap_or_default()
            .fetch_add(1, Ordering::Relaxed)
    }

    async fn gateway_request(
        &self,
        peer: &SpiffeId,
        header: &StreamHeader,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let g = &self.inner.gateway;
        // The path authorized is the path forwarded: ambiguous encodings
        // are refused, the rest is put in normal form before either.
        let raw = path_and_query(req.uri());
        let path = match check_path(&raw) {
            Ok(p) => p.into_owned(),
            Err(e) => {
                return local_response(
                    StatusCode::BAD_REQUEST,
                    &format!("refused by the hub gateway: {e}"),
                    &[],
                )
            }
        };
        let latest = match self.latest_config() {
            Ok(Some(v)) => v,
            _ => {
                g.unknown.fetch_add(1, Ordering::Relaxed);
                return local_response(
                    StatusCode::NOT_FOUND,
                    "the hub has no config: no ServiceEntry declares any cloud service",
                    &[],
                );
            }
        };
        let Some((namespace, endpoints)) = entry_endpoints(&latest.config, &header.service) else {
            g.unknown.fetch_add(1, Ordering::Relaxed);
            return local_response(
                StatusCode::NOT_FOUND,
                &format!(
                    "no ServiceEntry declares {} at the hub gateway",
                    header.service
                ),
                &[],
            );
        };
        if endpoints.is_empty() {
            g.failed.fetch_add(1, Ordering::Relaxed);
            return local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the ServiceEntry of {} lists no endpoint", header.service),
                &[],
            );
        }
        let start = self.gateway_rotation(&header.service);
        let policies = self.gateway_policies(latest.meta.version, &latest.config);
        let caller_ns = self.caller_namespace(peer, &latest.config);
        let principal = peer.to_string();
        // Each endpoint is authorized with its own labels: the call goes
        // (and fails over) only to endpoints the policy allows.
        let decision = {
            let headers = HeaderMapLookup(req.headers());
            let call = Call {
                namespace: &namespace,
                principal: principal.strip_prefix("spiffe://").unwrap_or(&principal),
                caller_ns: caller_ns.as_deref(),
                l7: Some((req.method().as_str(), path.as_str(), &headers)),
            };
            authorized_endpoints(&policies, &call, &endpoints, start)
                .map(|c| c.into_iter().cloned().collect::<Vec<CloudEndpoint>>())
        };
        let candidates = match decision {
            Ok(c) => c,
            Err(verdict) => {
                g.denied.fetch_add(1, Ordering::Relaxed);
                let policy = verdict
                    .policy
                    .and_then(|i| policies.policies().get(i))
                    .map(|p| format!("{}/{}", p.id.namespace, p.id.name))
                    .unwrap_or_else(|| "mesh-default".into());
                return local_response(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "RBAC: access denied at the hub gateway: {} ({policy}) for {peer} calling {} {} on {}",
                        verdict.reason.as_str(),
                        req.method(),
                        req.uri().path(),
                        header.service
                    ),
                    &[],
                );
            }
        };
        let h = req.headers_mut();
        strip_hop_by_hop(h);
        h.remove(XFCC);
        if let Ok(v) = HeaderValue::from_str(&format!(
            "By={};URI={peer}",
            naming::hub_id(peer.trust_domain())
        )) {
            h.insert(XFCC, v);
        }
        let h2 = entry_speaks_h2(&latest.config, &header.service);
        let client = if h2 {
            // HTTP/2 names the authority in the URI; Host would be a
            // connection-specific duplicate.
            h.remove(hyper::header::HOST);
            &g.client_h2
        } else {
            &g.client
        };
        let (mut parts, body) = req.into_parts();
        if h2 {
            parts.version = hyper::Version::HTTP_2;
        }
        match self.gateway_origination(latest.meta.version, &latest.config, &header.service) {
            Ok(None) => {}
            Ok(Some(o)) => {
                return self
                    .gateway_request_tls(&o, &header.service, &candidates, h2, parts, body, &path)
                    .await
            }
            Err(e) => {
                g.failed.fetch_add(1, Ordering::Relaxed);
                return local_response(StatusCode::SERVICE_UNAVAILABLE, &e, &[]);
            }
        }
        // The body can be sent once; a connect failure (nothing sent yet)
        // moves on to the next endpoint with the body still unread.
        let mut body = Some(body.boxed());
        let mut last_err = String::new();
        for ep in &candidates {
            let addr = match resolve(&ep.address).await {
                Ok(a) => a,
                Err(e) => {
                    last_err = e;
                    continue;
                }
            };
            let Ok(uri) = Uri::try_from(format!("http://{addr}{path}")) else {
                last_err = format!("{path:?} is not a valid request target");
                break;
            };
            let Some(b) = body.take() else { break };
            let mut out = Request::from_parts(parts.clone(), b);
            *out.uri_mut() = uri;
            match timeout(g.settings.request_timeout, client.request(out)).await {
                Ok(Ok(mut resp)) => {
                    g.forwarded.fetch_add(1, Ordering::Relaxed);
                    strip_hop_by_hop(resp.headers_mut());
                    // the stream back to the spoke is HTTP/1.1
                    tidemesh_net::http::announce_grpc_trailers(resp.headers_mut());
                    if let Ok(v) = HeaderValue::from_str(&ep.address) {
                        resp.headers_mut().insert(UPSTREAM, v);
                    }
                    return resp.map(|b| b.boxed());
                }
                Ok(Err(e)) if e.is_connect() => {
                    last_err = format!("{}: {e}", ep.address);
                    // hyper took the body; only an empty one can go again.
                    if parts.headers.get(hyper::header::CONTENT_LENGTH).is_none()
                        && !parts.headers.contains_key(hyper::header::TRANSFER_ENCODING)
                    {
                        body = Some(full(Vec::new()));
                    }
                }
                Ok(Err(e)) => {
                    g.failed.fetch_add(1, Ordering::Relaxed);
                    return local_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("cloud endpoint {}: {e}", ep.address),
                        &[(UPSTREAM, ep.address.clone())],
                    );
                }
                Err(_) => {
                    g.failed.fetch_add(1, Ordering::Relaxed);
                    return local_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "cloud endpoint {}: no response within {:?}",
                            ep.address, g.settings.request_timeout
                        ),
                        &[(UPSTREAM, ep.address.clone())],
                    );
                }
            }
        }
        g.failed.fetch_add(1, Ordering::Relaxed);
        local_response(
            StatusCode::BAD_GATEWAY,
            &format!(
                "no endpoint of {} could be reached from the hub: {last_err}",
                header.service
            ),
            &[],
        )
    }
}

impl Hub {
    /// Forwards over a TLS leg per `o`: a new connection per request (TCP
    /// connect failures move on to the next allowed endpoint, as in
    /// plaintext; a handshake failure is the answer: 503 with the reason).
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site, the request's parts"
    )]
    async fn gateway_request_tls(
        &self,
        o: &Origination,
        service: &str,
        candidates: &[CloudEndpoint],
        h2: bool,
        mut parts: hyper::http::request::Parts,
        body: Incoming,
        path: &str,
    ) -> Response<Body> {
        let g = &self.inner.gateway;
        let mut last_err = String::new();
        let mut leg = None;
        for ep in candidates {
            let addr = match resolve(&ep.address).await {
                Ok(a) => a,
                Err(e) => {
                    last_err = e;
                    continue;
                }
            };
            match origination::connect(o, addr, h2, g.settings.connect_timeout).await {
                Ok((stream, facts)) => {
                    leg = Some((ep, stream, facts));
                    break;
                }
                Err(LegError::Connect(e)) => last_err = e,
                Err(LegError::Handshake(why)) => {
                    g.failed.fetch_add(1, Ordering::Relaxed);
                    warn!(endpoint = %ep.address, service, reason = %why, "tls origination failed");
                    return local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "TLS origination to {} ({} sni={}) failed: {why}",
                            ep.address,
                            o.mode.as_str(),
                            o.server_name.to_str()
                        ),
                        &[(UPSTREAM, ep.address.clone())],
                    );
                }
            }
        }
        let Some((ep, stream, facts)) = leg else {
            g.failed.fetch_add(1, Ordering::Relaxed);
            return local_response(
                StatusCode::BAD_GATEWAY,
                &format!("no endpoint of {service} could be reached from the hub: {last_err}"),
                &[],
            );
        };
        let io = TokioIo::new(stream);
        let sent = if h2 {
            let Ok(uri) = Uri::try_from(format!("https://{}{path}", o.server_name.to_str())) else {
                return local_response(
                    StatusCode::BAD_REQUEST,
                    &format!("{path:?} is not a valid request target"),
                    &[],
                );
            };
            parts.uri = uri;
            let req = Request::from_parts(parts, body.boxed());
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
                Ok((mut send, conn)) => {
                    tokio::spawn(conn);
                    timeout(g.settings.request_timeout, send.send_request(req)).await
                }
                Err(e) => Ok(Err(e)),
            }
        } else {
            let Ok(uri) = Uri::try_from(path) else {
                return local_response(
                    StatusCode::BAD_REQUEST,
                    &format!("{path:?} is not a valid request target"),
                    &[],
                );
            };
            parts.uri = uri;
            parts.version = hyper::Version::HTTP_11;
            let req = Request::from_parts(parts, body.boxed());
            match hyper::client::conn::http1::handshake(io).await {
                Ok((mut send, conn)) => {
                    tokio::spawn(conn);
                    timeout(g.settings.request_timeout, send.send_request(req)).await
                }
                Err(e) => Ok(Err(e)),
            }
        };
        match sent {
            Ok(Ok(mut resp)) => {
                g.forwarded.fetch_add(1, Ordering::Relaxed);
                strip_hop_by_hop(resp.headers_mut());
                tidemesh_net::http::announce_grpc_trailers(resp.headers_mut());
                if let Ok(v) = HeaderValue::from_str(&ep.address) {
                    resp.headers_mut().insert(UPSTREAM, v);
                }
                if let Ok(v) = HeaderValue::from_str(&facts.header(o)) {
                    resp.headers_mut().insert(UPSTREAM_TLS, v);
                }
                debug!(endpoint = %ep.address, version = facts.version, cipher = %facts.cipher, "tls leg");
                resp.map(|b| b.boxed())
            }
            Ok(Err(e)) => {
                g.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(why) = o.tls_failure(&e) {
                    warn!(endpoint = %ep.address, service, reason = %why, "tls origination failed");
                    return local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "TLS origination to {} ({} sni={}) failed: {why}",
                            ep.address,
                            o.mode.as_str(),
                            o.server_name.to_str()
                        ),
                        &[(UPSTREAM, ep.address.clone())],
                    );
                }
                local_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("cloud endpoint {} (over TLS): {e}", ep.address),
                    &[(UPSTREAM, ep.address.clone())],
                )
            }
            Err(_) => {
                g.failed.fetch_add(1, Ordering::Relaxed);
                local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "cloud endpoint {}: no response within {:?}",
                        ep.address, g.settings.request_timeout
                    ),
                    &[(UPSTREAM, ep.address.clone())],
                )
            }
        }
    }
}

/// Copies bytes both ways between a spoke's stream and a cloud endpoint
/// until both close, one fails, or nothing moved for `idle`; the endpoint's
/// connection is closed on return.
async fn relay_tcp<S>(stream: &mut S, mut upstream: tokio::net::TcpStream, idle: Duration) -> Piped
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    pipe(stream, &mut upstream, idle).await
}

/// The port of `host:port` (0 when absent).
fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

/// `host:port` to a socket address (DNS for names).
async fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to no address"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    /// `ledger.cloud` has two endpoints whose labels differ; only the
    /// primary's are allowed to `frontend`.
    const MESH: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ledger, namespace: cloud}
spec:
  hosts: [ledger.cloud]
  location: MESH_EXTERNAL
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    labels: {app: ledger, tier: primary}
  - address: 127.0.0.2
    labels: {app: ledger, tier: replica}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: primary-only, namespace: cloud}
spec:
  selector:
    matchLabels: {tier: primary}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["td.example/store/sf01/sa/frontend"]
"#;

    fn call<'a>(principal: &'a str, l7: bool) -> Call<'a> {
        Call {
            namespace: "cloud",
            principal,
            caller_ns: None,
            l7: l7.then_some(("GET", "/entries", &tidemesh_policy::NoHeaders as _)),
        }
    }

    #[test]
    fn only_endpoints_the_policy_allows_are_candidates_whatever_the_rotation() {
        let config = MeshConfig::from_yaml(MESH).unwrap();
        let policies = CompiledPolicies::from_config(&config);
        let (ns, endpoints) = entry_endpoints(&config, "ledger.cloud").unwrap();
        assert_eq!(ns, "cloud");
        assert_eq!(endpoints.len(), 2, "{endpoints:?}");
        for l7 in [true, false] {
            for start in 0..4 {
                let got = authorized_endpoints(
                    &policies,
                    &call("td.example/store/sf01/sa/frontend", l7),
                    &endpoints,
                    start,
                )
                .unwrap();
                // the replica is never tried, not even on failover
                let addrs: Vec<&str> = got.iter().map(|e| e.address.as_str()).collect();
                assert_eq!(addrs, ["127.0.0.1:8080"], "l7 {l7}, start {start}");
            }
            // a caller no endpoint admits is refused, with the reason for
            // the first endpoint in rotation
            let denied = authorized_endpoints(
                &policies,
                &call("td.example/store/sf01/sa/kiosk", l7),
                &endpoints,
                1,
            )
            .unwrap_err();
            assert!(!denied.allowed);
            assert_eq!(denied.reason.as_str(), "mesh_default");
        }
    }

    #[test]
    fn endpoints_with_the_same_decision_keep_their_rotation() {
        let yaml = MESH.replace("matchLabels: {tier: primary}", "matchLabels: {app: ledger}");
        let config = MeshConfig::from_yaml(&yaml).unwrap();
        let policies = CompiledPolicies::from_config(&config);
        let (_, endpoints) = entry_endpoints(&config, "ledger.cloud").unwrap();
        let got = authorized_endpoints(
            &policies,
            &call("td.example/store/sf01/sa/frontend", true),
            &endpoints,
            1,
        )
        .unwrap();
        let addrs: Vec<&str> = got.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["127.0.0.2:8080", "127.0.0.1:8080"]);
    }

    /// A raw TCP connection through the gateway with nothing moving is
    /// closed after the configured idle time: the endpoint sees its
    /// connection end, the spoke's side its stream end.
    #[tokio::test]
    async fn raw_tcp_through_the_gateway_is_closed_when_idle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let idle = Duration::from_millis(300);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // a silent endpoint that answers one message, then waits for the end
        let endpoint = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).await.unwrap();
            conn.write_all(b"pong").await.unwrap();
            let t = tokio::time::Instant::now();
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).await.unwrap();
            (buf, t.elapsed())
        });
        let upstream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut spoke, mut gateway_side) = tokio::io::duplex(64);
        let t = tokio::time::Instant::now();
        let relay = tokio::spawn(async move { relay_tcp(&mut gateway_side, upstream, idle).await });
        spoke.write_all(b"ping!").await.unwrap();
        let mut got = [0u8; 4];
        spoke.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        let piped = relay.await.unwrap();
        assert_eq!(piped.end, End::Idle(idle));
        assert_eq!((piped.up, piped.down), (5, 4));
        assert!(t.elapsed() >= idle, "{:?}", t.elapsed());
        assert!(t.elapsed() < idle * 10, "{:?}", t.elapsed());
        let (sent, waited) = endpoint.await.unwrap();
        assert_eq!(&sent, b"ping!");
        assert!(waited < idle * 10, "{waited:?}");
        // the spoke's side ends too (its stream is dropped with the relay)
        let mut rest = Vec::new();
        spoke.read_to_end(&mut rest).await.unwrap();
    }

    #[test]
    fn the_gateway_uses_the_spokes_raw_tcp_idle_timeout() {
        assert_eq!(
            GatewaySettings::default().tcp_idle_timeout,
            Duration::from_secs(300)
        );
        assert_eq!(TCP_IDLE_TIMEOUT, Duration::from_secs(300));
    }
}
