//! The data tunnel between spokes of a site: QUIC, ALPN `tidemesh-data/1`,
//! mutual TLS with SPIFFE identities.
//!
//! What it is: both ends of the tunnel. The calling end ([`call`]) keeps
//! one connection per (calling workload, peer spoke), made with the calling
//! workload's SVID and checking that the peer presents the node ID the
//! registry names for that address; each request opens one bidirectional
//! stream, writes a [`StreamHeader`] and then speaks HTTP/1.1 on it. The
//! serving end ([`accept_loop`]) presents the node SVID, admits only
//! workload SVIDs of its trust domain, reads the bounded header and hands
//! the request to [`super::inbound`] with the peer's verified ID as the
//! source principal.
//!
//! Caps at the serving end, so one peer cannot take every slot before it is
//! authorized: handshakes in progress per source IP address
//! ([`DataSettings::max_handshakes_per_address`], refused before any
//! crypto), connections per peer workload
//! ([`DataSettings::max_connections_per_peer`], closed with `close::BUSY`
//! after the handshake names it) and open streams per peer workload across
//! all its connections ([`DataSettings::max_streams_per_peer`], reset with
//! `close::BUSY`; quinn's stream limit is per connection). A stream holds
//! its slots from the moment it is accepted; one that has not sent its full
//! header within [`DataSettings::header_timeout`] is reset and gives them
//! back. Every refusal is counted ([`super::TunnelRefusal`]).
//!
//! Who drives it: [`super::DataPlane`]. What it must not
//! do: take the caller's identity from anything but the handshake, read an
//! unbounded header, or keep a stream open past the header timeout.
//!
//! The negotiated cipher suite: quinn does not expose it, so the serving
//! end fixes it. Its TLS config picks by its own preference order
//! (`ignore_client_order`) and every tidemesh spoke offers the same provider's
//! suites, so the suite is the first TLS 1.3 suite of that provider on both
//! ends; the evidence records that name.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tidemesh_evidence::{
    record::{EnforcementPoint, IdentityEvidence, RequestEvidence, TlsVersion},
    Sha256Digest,
};
use tidemesh_identity::{
    verify::{self, ExactId, VerifiedSvid, WorkloadsViaNodeCa},
    RevocationList, SpiffeId,
};
use tidemesh_net::caps::PeerCaps;
use tidemesh_proto::{
    close,
    data::{StreamHeader, StreamProtocol},
    ALPN_DATA,
};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::{
    finish_from_response, inbound, local_response, outbound, resilience::Outcome, span_random,
    trace, Body, DataPlaneError, DataSettings, Shared, TunnelRefusal,
};

/// SNI towards peers; the SPIFFE verifier ignores it.
const SNI: &str = "data.tidemesh.invalid";

/// An open connection to a peer spoke for one calling workload.
pub(crate) struct Tunnel {
    conn: quinn::Connection,
    server: SpiffeId,
    fingerprint: Option<Sha256Digest>,
    /// When the calling workload's SVID this connection presented expires:
    /// a renewed SVID means a new connection for new streams.
    own_not_after: SystemTime,
    /// When the first certificate of either chain expires: the connection
    /// is closed then.
    expires: SystemTime,
}

/// Closes a one-off connection when dropped.
struct CloseOnDrop(quinn::Connection);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0
            .close(quinn::VarInt::from_u32(close::NORMAL), b"done");
    }
}

/// The earliest expiry in the peer's chain (leaf and node CA), by the
/// certificates it presented on `conn`.
fn peer_chain_expiry(conn: &quinn::Connection) -> Option<SystemTime> {
    let chain = tidemesh_net::quic::peer_chain(conn)?;
    chain
        .iter()
        .filter_map(|c| tidemesh_identity::svid::cert_validity(c).ok())
        .map(|(_, not_after)| not_after)
        .min()
}

/// Closes `conn` when the trusted clock reaches `deadline` (a certificate
/// that authenticated it expires), or returns when it closes first.
async fn close_at_expiry(
    clock: Arc<crate::TrustedClock>,
    conn: quinn::Connection,
    deadline: SystemTime,
    who: SpiffeId,
) {
    if tidemesh_net::quic::close_at_expiry(clock, conn, deadline).await {
        info!(peer = %who, "closed a data tunnel connection: a certificate it was made with expired");
    }
}

/// The calling end's connections, the serving end's open connections, its
/// per-peer caps and its certificate state.
pub(crate) struct Pool {
    conns: Mutex<HashMap<(usize, SocketAddr), Arc<Tunnel>>>,
    /// Peers' connections this spoke serves (by quinn stable id), with the
    /// SVID each presented, so a new revocation list closes the ones it names.
    served: Mutex<HashMap<usize, (VerifiedSvid, quinn::Connection)>>,
    server_cert: Mutex<Option<SystemTime>>,
    serving: AtomicBool,
    /// Handshakes in progress per source address.
    handshakes: PeerCaps<IpAddr>,
    /// Served connections per peer workload.
    peer_conns: PeerCaps<SpiffeId>,
    /// Served streams per peer workload, across its connections.
    peer_streams: PeerCaps<SpiffeId>,
}

impl Pool {
    pub(crate) fn new(settings: &DataSettings) -> Pool {
        Pool {
            conns: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            server_cert: Mutex::new(None),
            serving: AtomicBool::new(false),
            handshakes: PeerCaps::new(settings.max_handshakes_per_address),
            peer_conns: PeerCaps::new(settings.max_connections_per_peer),
            peer_streams: PeerCaps::new(settings.max_streams_per_peer),
        }
    }

    /// Closes every connection `list` refuses: served connections whose
    /// peer's SVID (or its node CA) it names, and calling connections to a
    /// peer spoke it names. Returns how many.
    pub(crate) fn close_revoked(&self, list: &RevocationList) -> usize {
        let mut closed = 0;
        if let Ok(mut m) = self.served.lock() {
            m.retain(|_, (svid, conn)| {
                if svid.revoked_by(list) {
                    warn!(target: "tidemesh::audit", peer = %svid.id(), "closing a data tunnel connection: the peer's SVID is revoked");
                    conn.close(quinn::VarInt::from_u32(close::REVOKED), b"revoked");
                    closed += 1;
                    false
                } else {
                    true
                }
            });
        }
        if let Ok(mut m) = self.conns.lock() {
            m.retain(|_, t| {
                if list.node_revoked(&t.server) {
                    warn!(target: "tidemesh::audit", peer = %t.server, "closing a data tunnel connection: the peer spoke is revoked");
                    t.conn.close(quinn::VarInt::from_u32(close::REVOKED), b"revoked");
                    closed += 1;
                    false
                } else {
                    true
                }
            });
        }
        closed
    }
}

fn leaf_fingerprint(conn: &quinn::Connection) -> Option<Sha256Digest> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Sha256Digest::of(c))
}

fn first_tls13_suite(provider: &rustls::crypto::CryptoProvider) -> String {
    provider
        .cipher_suites
        .iter()
        .find(|s| s.version() == &rustls::version::TLS13)
        .and_then(|s| s.suite().as_str())
        .map(|n| n.replacen("TLS13_", "TLS_", 1))
        .unwrap_or_default()
}

/// The serving end's TLS: the node-CA-issued serving SVID while it is
/// valid (renewed offline), else the hub-issued node SVID.
fn server_tls(h: &super::Handles) -> Result<(rustls::ServerConfig, SystemTime), DataPlaneError> {
    use tidemesh_identity::clock::Clock;
    let cur = h.creds.current();
    let now = h.clock.now();
    let node = cur
        .serving
        .as_ref()
        .filter(|s| !s.expired(now))
        .unwrap_or(&cur.node);
    let mut tls = verify::server_config(
        cur.bundle.clone(),
        node.chain.clone(),
        &node.key,
        Arc::new(WorkloadsViaNodeCa),
        false,
        h.clock.clone(),
        &[ALPN_DATA],
    )
    .map_err(|e| DataPlaneError::Tls(e.to_string()))?;
    tls.ignore_client_order = true;
    Ok((tls, node.not_after))
}

/// Binds the QUIC endpoint: serving on `data_listen` when set, else a
/// client-only endpoint on an ephemeral port. Returns it, the cipher suite
/// name and whether it serves.
pub(crate) async fn bind_endpoint(
    h: &super::Handles,
    settings: &DataSettings,
) -> Result<(quinn::Endpoint, String, bool), DataPlaneError> {
    let (tls, _) = server_tls(h)?;
    let suite = first_tls13_suite(tls.crypto_provider());
    let (addr, serving) = match h.file.data_listen {
        Some(a) => (a, true),
        None => (SocketAddr::from(([0, 0, 0, 0], 0)), false),
    };
    let sock = match h.data_socket.clone() {
        Some(sock) => sock,
        None => {
            let sock = std::net::UdpSocket::bind(addr).map_err(|source| DataPlaneError::Bind {
                key: if serving {
                    "data_listen"
                } else {
                    "(data client socket)"
                }
                .into(),
                addr,
                source,
            })?;
            tidemesh_net::quic::wrap_socket(sock).map_err(|e| DataPlaneError::Bind {
                key: "data_listen".into(),
                addr,
                source: std::io::Error::other(e.to_string()),
            })?
        }
    };
    let server = if serving {
        Some(
            settings
                .quic
                .server_config(tls)
                .map_err(|e| DataPlaneError::Tls(e.to_string()))?,
        )
    } else {
        None
    };
    let endpoint = tidemesh_net::quic::endpoint(sock, server)
        .map_err(|e| DataPlaneError::Tls(e.to_string()))?;
    Ok((endpoint, suite, serving))
}

/// Installs a renewed node SVID on the serving endpoint.
pub(crate) async fn refresh_server_config(s: &Arc<Shared>) {
    if !s.tunnels.serving.load(Ordering::Relaxed) {
        return;
    }
    let Ok((tls, not_after)) = server_tls(&s.h) else {
        return;
    };
    let changed = s
        .tunnels
        .server_cert
        .lock()
        .map(|mut c| c.replace(not_after) != Some(not_after))
        .unwrap_or(false);
    if changed {
        match s.settings.quic.server_config(tls) {
            Ok(cfg) => {
                s.endpoint.set_server_config(Some(cfg));
                debug!("data tunnel certificate refreshed");
            }
            Err(e) => warn!(error = %e, "cannot refresh the data tunnel certificate"),
        }
    }
}

/// Why a tunnel stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenError {
    /// What failed or timed out, for the caller's message.
    pub reason: String,
    /// The caller's own limit ran out (rather than the handshake failing
    /// or the handshake's own timeout expiring): a timeout, not a connect
    /// failure.
    pub timed_out: bool,
}

impl OpenError {
    fn failed(reason: impl Into<String>) -> OpenError {
        OpenError {
            reason: reason.into(),
            timed_out: false,
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// How long the next step of opening a stream (a handshake, waiting for
/// stream credit) may wait at `now`: its own timeout `cap`, or what is left
/// of the caller's `deadline` when that is shorter (then `true`: the
/// caller's limit is what binds). `None` when the deadline has passed.
pub(crate) fn step_wait(
    cap: Duration,
    now: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Option<(Duration, bool)> {
    let left = deadline.saturating_duration_since(now);
    if left.is_zero() {
        None
    } else if left < cap {
        Some((left, true))
    } else {
        Some((cap, false))
    }
}

/// When a call must be over: the instant, and the limit it was set from
/// (for messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub at: tokio::time::Instant,
    pub limit: Duration,
}

impl Deadline {
    /// `limit` from now; a limit too large to represent is a day (nothing
    /// here waits that long).
    pub(crate) fn after(limit: Duration) -> Deadline {
        let now = tokio::time::Instant::now();
        Deadline {
            at: now
                .checked_add(limit)
                .unwrap_or_else(|| now + Duration::from_secs(86_400)),
            limit,
        }
    }

    /// The error for this deadline running out while `what`.
    fn out_of_time(&self, what: &str) -> OpenError {
        OpenError {
            reason: format!("{what} within the call's limit of {}", ms(self.limit)),
            timed_out: true,
        }
    }
}

/// A limit in whole milliseconds, rounded up (a 300 ms route timeout is
/// `300ms` however little of it earlier steps took).
fn ms(d: Duration) -> String {
    format!("{}ms", d.as_micros().div_ceil(1000))
}

/// The pooled connection of `caller` to `addr`, or a new one (then with the
/// handshake time) made by `deadline`. A pooled connection made with an
/// SVID the caller has since renewed is not used for new streams: it
/// drains and closes at its expiry.
async fn connect(
    s: &Shared,
    caller: usize,
    addr: SocketAddr,
    server: &SpiffeId,
    deadline: Deadline,
) -> Result<(Arc<Tunnel>, Option<u32>), OpenError> {
    let key = (caller, addr);
    if let Some(t) = s
        .tunnels
        .conns
        .lock()
        .ok()
        .and_then(|m| m.get(&key).cloned())
    {
        let current =
            s.h.creds
                .current()
                .workloads
                .get(caller)
                .cloned()
                .flatten()
                .map(|w| w.not_after);
        if t.conn.close_reason().is_none()
            && &t.server == server
            && s.now() < t.expires
            && current == Some(t.own_not_after)
        {
            return Ok((t, None));
        }
    }
    let (t, hs) = connect_new(s, caller, addr, server, deadline).await?;
    let t = Arc::new(t);
    if let Ok(mut m) = s.tunnels.conns.lock() {
        if let Some(old) = m.insert(key, t.clone()) {
            if old.conn.close_reason().is_none() {
                // A concurrent request connected too, or the SVID was
                // renewed; let the old one drain.
                debug!(%addr, "replacing a data tunnel connection");
            }
        }
    }
    Ok((t, Some(hs)))
}

/// A new connection of `caller` to the peer spoke `server` at `addr`, with
/// the handshake's duration in µs; closed when a certificate of either
/// chain expires. The handshake waits `connect_timeout` at most, and no
/// later than `deadline` (the instant and the caller's limit it came from).
async fn connect_new(
    s: &Shared,
    caller: usize,
    addr: SocketAddr,
    server: &SpiffeId,
    deadline: Deadline,
) -> Result<(Tunnel, u32), OpenError> {
    let cur = s.h.creds.current();
    let svid = cur
        .workloads
        .get(caller)
        .cloned()
        .flatten()
        .ok_or_else(|| {
            OpenError::failed(format!(
                "no SVID for workload {} yet: {}",
                s.workloads[caller].account,
                s.h.creds
                    .last_error()
                    .unwrap_or_else(|| "the node CA has not issued one yet".into())
            ))
        })?;
    if svid.expired(s.now()) {
        return Err(OpenError::failed(format!(
            "the SVID of workload {} expired at {}: {}",
            s.workloads[caller].account,
            crate::rfc3339(svid.not_after),
            s.h.creds
                .last_error()
                .unwrap_or_else(|| "it has not been renewed".into())
        )));
    }
    let tls = verify::client_config(
        cur.bundle.clone(),
        svid.chain.clone(),
        &svid.key,
        Arc::new(ExactId(server.clone())),
        s.h.clock.clone(),
        &[ALPN_DATA],
    )
    .map_err(|e| OpenError::failed(e.to_string()))?;
    let cfg = s
        .settings
        .quic
        .client_config(tls)
        .map_err(|e| OpenError::failed(e.to_string()))?;
    let t0 = tokio::time::Instant::now();
    let Some((wait, by_caller)) = step_wait(s.settings.connect_timeout, t0, deadline.at) else {
        return Err(deadline.out_of_time("no time left for a QUIC handshake"));
    };
    let connecting = s
        .endpoint
        .connect_with(cfg, addr, SNI)
        .map_err(|e| OpenError::failed(e.to_string()))?;
    let conn = match timeout(wait, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(OpenError::failed(e.to_string())),
        Err(_) if by_caller => return Err(deadline.out_of_time("no QUIC handshake")),
        Err(_) => {
            return Err(OpenError::failed(format!(
                "no QUIC handshake within {:?} (is UDP to it allowed?)",
                s.settings.connect_timeout
            )))
        }
    };
    let hs = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    info!(workload = %s.workloads[caller].account, peer = %server, %addr, "data tunnel connected");
    // a leaf never outlives the node CA that issued it
    let expires = [Some(svid.not_after), peer_chain_expiry(&conn)]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(svid.not_after);
    tokio::spawn(close_at_expiry(
        s.h.clock.clone(),
        conn.clone(),
        expires,
        server.clone(),
    ));
    Ok((
        Tunnel {
            fingerprint: leaf_fingerprint(&conn),
            conn,
            server: server.clone(),
            own_not_after: svid.not_after,
            expires,
        },
        hs,
    ))
}

impl Tunnel {
    /// The identity evidence of a stream on this connection for local
    /// workload `caller`; `handshake_us` when the stream paid for one.
    pub(crate) fn identity_evidence(
        &self,
        s: &Shared,
        caller: usize,
        handshake_us: Option<u32>,
    ) -> IdentityEvidence {
        IdentityEvidence {
            client_identity: Some(s.workloads[caller].id.clone()),
            server_identity: Some(self.server.clone()),
            certificate_fingerprint: self.fingerprint,
            tls_version: TlsVersion::Tls13,
            cipher_suite: Some(s.cipher_suite.clone()),
            trust_chain_verified: true,
            handshake_duration_us: handshake_us,
        }
    }
}

/// Opens one bidirectional stream to the peer spoke `server` (`addr`) for
/// local workload `caller`, on the pooled connection or a new one; returns
/// the connection, the handshake time when this call made the connection,
/// and the stream. A pooled connection may have died since its last use:
/// one fresh try. All of it (handshakes, waits for stream credit, the fresh
/// try) ends by `deadline`; a handshake also within `connect_timeout`.
pub(crate) async fn open_stream(
    s: &Shared,
    caller: usize,
    addr: SocketAddr,
    server: &SpiffeId,
    deadline: Deadline,
) -> Result<
    (
        Arc<Tunnel>,
        Option<u32>,
        (quinn::SendStream, quinn::RecvStream),
    ),
    OpenError,
> {
    let mut last_err = String::new();
    for _ in 0..2 {
        let (t, hs) = connect(s, caller, addr, server, deadline).await?;
        let Some((wait, by_caller)) = step_wait(
            s.settings.connect_timeout,
            tokio::time::Instant::now(),
            deadline.at,
        ) else {
            return Err(deadline.out_of_time("no time left to open a stream"));
        };
        match timeout(wait, t.conn.open_bi()).await {
            Ok(Ok(streams)) => return Ok((t, hs, streams)),
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) if by_caller => {
                return Err(deadline.out_of_time("no stream credit from the peer"));
            }
            Err(_) => last_err = "no stream credit from the peer in time".into(),
        }
        if let Ok(mut m) = s.tunnels.conns.lock() {
            m.remove(&(caller, addr));
        }
    }
    Err(OpenError::failed(last_err))
}

/// Sends one request to workload `header.workload` at the peer spoke
/// `server` (`addr`) for local workload `caller`; fills `ev`'s identity.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
pub(crate) async fn call(
    s: &Shared,
    caller: usize,
    addr: SocketAddr,
    server: &SpiffeId,
    header: StreamHeader,
    req: Request<Body>,
    limit: Duration,
    ev: &mut RequestEvidence,
) -> Response<Body> {
    let failed = |status, outcome: Outcome, reason: String| {
        let mut r = local_response(status, &reason, &[]);
        r.extensions_mut().insert(outcome);
        r
    };
    let bytes = match header.encode() {
        Ok(b) => b,
        Err(e) => {
            return local_response(
                StatusCode::BAD_REQUEST,
                &format!("cannot frame the request: {e}"),
                &[],
            )
        }
    };
    // The call's limit bounds everything from here: the handshake, the
    // stream, the retry of a dead pooled connection and the exchange.
    let deadline = Deadline::after(limit);
    let (t, hs, (mut send, recv)) = match open_stream(s, caller, addr, server, deadline).await {
        Ok(x) => x,
        // The limit ran out before the request left the spoke: a 504, but
        // a connect failure to the retry policy (`connect-failure` matches,
        // and a POST may be tried again on another endpoint).
        Err(e) if e.timed_out => {
            return failed(
                StatusCode::GATEWAY_TIMEOUT,
                Outcome::ConnectFailure,
                format!("{server} at {addr}: {e}"),
            )
        }
        Err(e) => {
            return failed(
                StatusCode::BAD_GATEWAY,
                Outcome::ConnectFailure,
                format!("cannot reach {server} at {addr}: {e}"),
            )
        }
    };
    // A retry on the same connection keeps the handshake an earlier try
    // of this request paid for.
    let earlier = ev
        .identity
        .as_ref()
        .filter(|i| i.server_identity.as_ref() == Some(&t.server))
        .and_then(|i| i.handshake_duration_us);
    ev.identity = Some(t.identity_evidence(s, caller, hs.or(earlier)));
    let exchange = async move {
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let io = TokioIo::new(tokio::io::join(recv, send));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "tunnel stream ended");
            }
        });
        sender.send_request(req).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout_at(deadline.at, exchange).await {
        Ok(Ok(mut resp)) => {
            inbound::strip_hop_by_hop(resp.headers_mut());
            resp.map(http_body_util::BodyExt::boxed)
        }
        Ok(Err(e)) => failed(
            StatusCode::BAD_GATEWAY,
            Outcome::Reset,
            format!("{server} at {addr}: {e}"),
        ),
        Err(_) => failed(
            StatusCode::GATEWAY_TIMEOUT,
            Outcome::Timeout,
            format!("{server} at {addr}: no response within {}", ms(limit)),
        ),
    }
}

/// The serving end: accepts peer connections until the endpoint closes.
pub(crate) async fn accept_loop(s: Arc<Shared>) {
    s.tunnels.serving.store(true, Ordering::Relaxed);
    refresh_server_config(&s).await;
    while let Some(incoming) = s.endpoint.accept().await {
        if s.endpoint.open_connections() > s.settings.max_connections {
            s.counters().tunnel_refused(TunnelRefusal::GlobalStreams);
            incoming.refuse();
            continue;
        }
        // before any crypto: one address cannot hold every handshake
        let Ok(handshake) = s
            .tunnels
            .handshakes
            .try_acquire(&incoming.remote_address().ip())
        else {
            s.counters()
                .tunnel_refused(TunnelRefusal::AddressHandshakes);
            incoming.refuse();
            continue;
        };
        let s = s.clone();
        tokio::spawn(async move {
            let handshaken = timeout(s.settings.header_timeout, incoming).await;
            drop(handshake);
            let conn = match handshaken {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    debug!(error = %e, "data tunnel handshake failed");
                    return;
                }
                Err(_) => return,
            };
            serve_conn(s, conn).await;
        });
    }
}

struct Peer {
    id: SpiffeId,
    fingerprint: Option<Sha256Digest>,
}

async fn serve_conn(s: Arc<Shared>, conn: quinn::Connection) {
    // The handshake verified the chain; verify it again to hold its facts
    // (node CA, key fingerprints) for later revocation lists.
    let bundle = s.h.creds.current().bundle.clone();
    let svid = match tidemesh_net::peer_svid(&conn, &bundle, s.now()) {
        Ok(v) => v,
        Err(e) => {
            conn.close(quinn::VarInt::from_u32(close::FORBIDDEN), e.as_bytes());
            return;
        }
    };
    let id = svid.id().clone();
    // Held while this connection lives: a peer workload's connections are
    // capped however many addresses it dials from.
    let _conn_slot = match s.tunnels.peer_conns.try_acquire(&id) {
        Ok(slot) => slot,
        Err(e) => {
            s.counters().tunnel_refused(TunnelRefusal::PeerConnections);
            debug!(peer = %id, remote = %conn.remote_address(), "data tunnel connection refused: per-peer cap");
            conn.close(
                quinn::VarInt::from_u32(close::BUSY),
                e.to_string().as_bytes(),
            );
            return;
        }
    };
    debug!(peer = %id, remote = %conn.remote_address(), "data tunnel peer connected");
    let stable = conn.stable_id();
    if let Ok(mut m) = s.tunnels.served.lock() {
        m.insert(stable, (svid.clone(), conn.clone()));
    }
    // A list installed between the handshake and the insert above.
    if let Some(list) = s.h.creds.revocations().current() {
        if svid.revoked_by(&list) {
            s.tunnels.close_revoked(&list);
        }
    }
    // closed when the peer's leaf or node CA, or this spoke's serving
    // certificate, expires
    let own = s.tunnels.server_cert.lock().ok().and_then(|c| *c);
    let expires = [
        Some(svid.not_after()),
        svid.issuer().map(|i| i.not_after()),
        own,
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(svid.not_after());
    let _expiry = crate::AbortOnDrop(tokio::spawn(close_at_expiry(
        s.h.clock.clone(),
        conn.clone(),
        expires,
        id.clone(),
    )));
    let peer = Arc::new(Peer {
        fingerprint: leaf_fingerprint(&conn),
        id,
    });
    serve_streams(&s, &conn, peer).await;
    if let Ok(mut m) = s.tunnels.served.lock() {
        m.remove(&stable);
    }
}

async fn serve_streams(s: &Arc<Shared>, conn: &quinn::Connection, peer: Arc<Peer>) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(x) => x,
            Err(_) => return,
        };
        // The peer's own cap first, so its flood is refused before it can
        // take the spoke-wide slots (which local apps share) from everyone.
        let Ok(peer_slot) = s.tunnels.peer_streams.try_acquire(&peer.id) else {
            s.counters().tunnel_refused(TunnelRefusal::PeerStreams);
            let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
            let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
            continue;
        };
        let Ok(permit) = s.conn_limit.clone().try_acquire_owned() else {
            s.counters().tunnel_refused(TunnelRefusal::GlobalStreams);
            let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
            let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
            continue;
        };
        let s = s.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _peer_slot = peer_slot;
            let header = match timeout(
                s.settings.header_timeout,
                tidemesh_net::http::read_stream_header(&mut recv),
            )
            .await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    warn!(peer = %peer.id, error = %e, "bad data stream header; resetting the stream");
                    let _ = send.reset(quinn::VarInt::from_u32(close::PROTOCOL_ERROR));
                    let _ = recv.stop(quinn::VarInt::from_u32(close::PROTOCOL_ERROR));
                    return;
                }
                Err(_) => {
                    // silent, or a partial header: the slots go back now
                    s.counters().tunnel_refused(TunnelRefusal::HeaderTimeout);
                    let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
                    let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
                    return;
                }
            };
            if header.protocol == StreamProtocol::Tcp {
                let fingerprint = peer.fingerprint;
                super::tcp::serve_stream(&s, &peer.id, fingerprint, header, send, recv).await;
                return;
            }
            if matches!(
                header.protocol,
                StreamProtocol::Probe | StreamProtocol::Reach
            ) {
                serve_probe(&s, &peer, &header, send).await;
                return;
            }
            let io = TokioIo::new(tokio::io::join(recv, send));
            let header = Arc::new(header);
            let svc = {
                let s = s.clone();
                service_fn(move |req| {
                    let s = s.clone();
                    let peer = peer.clone();
                    let header = header.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            serve_request(&s, &peer, &header, req).await,
                        )
                    }
                })
            };
            if let Err(e) = outbound::http1_server(&s.settings)
                .serve_connection(io, svc)
                .await
            {
                debug!(error = %e, "data stream ended");
            }
        });
    }
}

/// A probe from a peer spoke: this spoke answers for itself (and whether it
/// serves the named workload) and records it, unless it is a routine
/// reachability probe.
async fn serve_probe(s: &Shared, peer: &Peer, header: &StreamHeader, mut send: quinn::SendStream) {
    let started = tokio::time::Instant::now();
    let span = trace::Span::start(None, span_random(), || s.h.modes.sample(&header.service));
    let mut ev = s.new_evidence(
        &header.service,
        EnforcementPoint::SidecarInbound,
        &span,
        format!("PROBE {}", header.service),
    );
    ev.identity = Some(s.served_identity(&peer.id, peer.fingerprint));
    let answer = tidemesh_proto::data::ProbeAnswer {
        node: s.node_id.clone(),
        time_ms: crate::unix_ms(s.now()),
        time_trusted: s.h.clock.trusted(),
        serves: s.workload_for(header).is_some(),
    };
    let sent = async {
        tidemesh_net::write_frame(&mut send, &answer)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())
    };
    let status = match timeout(s.settings.header_timeout, sent).await {
        Ok(Ok(())) => StatusCode::OK,
        _ => StatusCode::BAD_GATEWAY,
    };
    if header.protocol == StreamProtocol::Probe {
        super::finish_evidence(&mut ev, started, status, "");
        s.record(ev);
    }
}

/// What a probe of a peer spoke found.
#[derive(Debug, Clone)]
pub(crate) struct Probed {
    pub answer: tidemesh_proto::data::ProbeAnswer,
    /// The handshake's duration, when the probe made a new connection.
    pub handshake_us: Option<u32>,
    /// SHA-256 of the peer's leaf certificate.
    pub fingerprint: Option<Sha256Digest>,
    pub elapsed: Duration,
}

/// Probes the peer spoke `server` at `addr` as local workload `caller`,
/// naming `service` served by `account` there. An operator's or a drill's
/// probe (`record`) makes a new handshake on a one-off connection and is
/// recorded; the mode machine's routine reachability probes use the
/// connection pool and are not recorded.
pub(crate) async fn probe(
    s: &Shared,
    caller: usize,
    addr: SocketAddr,
    server: &SpiffeId,
    service: &str,
    account: &str,
    record: bool,
) -> Result<Probed, String> {
    let started = tokio::time::Instant::now();
    let span = trace::Span::start(None, span_random(), || s.h.modes.sample(service));
    let mut ev = s.new_evidence(
        service,
        EnforcementPoint::SidecarOutbound,
        &span,
        format!("PROBE {service}"),
    );
    let header = super::stream_header(
        service,
        account.to_owned(),
        if record {
            StreamProtocol::Probe
        } else {
            StreamProtocol::Reach
        },
        &span,
        None,
    );
    let result = async {
        let bytes = header.encode().map_err(|e| e.to_string())?;
        // an operator's probe makes a new handshake (does mTLS work now,
        // with the SVIDs in force?); the routine ones use the pool
        let (t, hs, (mut send, mut recv)) = if record {
            let within = Deadline::after(s.settings.connect_timeout);
            let (t, hs) = connect_new(s, caller, addr, server, within)
                .await
                .map_err(|e| e.reason)?;
            let streams = timeout(s.settings.connect_timeout, t.conn.open_bi())
                .await
                .map_err(|_| "no stream credit from the peer in time".to_string())?
                .map_err(|e| e.to_string())?;
            (Arc::new(t), Some(hs), streams)
        } else {
            // routine: the pooled connection, or a new one, within the
            // handshake timeout in all
            open_stream(
                s,
                caller,
                addr,
                server,
                Deadline::after(s.settings.connect_timeout),
            )
            .await
            .map_err(|e| e.reason)?
        };
        let _close = record.then(|| CloseOnDrop(t.conn.clone()));
        ev.identity = Some(t.identity_evidence(s, caller, hs));
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let answer: tidemesh_proto::data::ProbeAnswer = timeout(
            s.settings.request_timeout,
            tidemesh_net::read_frame(&mut recv),
        )
        .await
        .map_err(|_| "no probe answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        if &answer.node != server {
            return Err(format!("{} answered for {server}", answer.node));
        }
        Ok(Probed {
            answer,
            handshake_us: hs,
            fingerprint: t.fingerprint,
            elapsed: started.elapsed(),
        })
    }
    .await;
    if record {
        let (status, msg) = match &result {
            Ok(_) => (StatusCode::OK, String::new()),
            Err(e) => (StatusCode::BAD_GATEWAY, e.clone()),
        };
        super::finish_evidence(&mut ev, started, status, &msg);
        s.record(ev);
    }
    result
}

/// One request from a peer spoke: a span under the caller's, then delivery.
async fn serve_request(
    s: &Shared,
    peer: &Peer,
    header: &StreamHeader,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let parent = {
        let h = req.headers();
        trace::extract(&|n| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned))
    }
    .or_else(|| {
        header.trace.map(|t| trace::Parent {
            trace_id: t.trace_id,
            span_id: t.span_id,
            sampled: Some(t.sampled),
        })
    })
    .filter(|p| p.trace_id != [0; 16] && p.span_id != [0; 8]);
    let span = trace::Span::start(parent, span_random(), || s.h.modes.sample(&header.service));
    let operation = format!("{} {}", req.method(), req.uri().path());
    {
        let h = req.headers_mut();
        inbound::strip_hop_by_hop(h);
        outbound::set_trace_headers(h, &span);
        outbound::ensure_request_id(h, header.request_id.as_deref());
    }
    let mut ev = s.new_evidence(
        &header.service,
        EnforcementPoint::SidecarInbound,
        &span,
        operation,
    );
    ev.identity = Some(s.served_identity(&peer.id, peer.fingerprint));
    let idx = s.workload_for(header);
    let resp = match idx {
        None => local_response(
            StatusCode::NOT_FOUND,
            &format!(
                "no workload {} serving {} on this spoke",
                header.workload, header.service
            ),
            &[],
        ),
        Some(i) => {
            match timeout(
                s.settings.request_timeout,
                inbound::deliver(
                    s,
                    i,
                    Some(&peer.id),
                    req.map(http_body_util::BodyExt::boxed),
                    &mut ev,
                ),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("no response within {:?}", s.settings.request_timeout),
                    &[],
                ),
            }
        }
    };
    finish_from_response(&mut ev, started, &resp);
    s.record(ev);
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn a_step_waits_its_own_timeout_or_what_is_left_of_the_call() {
        let now = tokio::time::Instant::now();
        let cap = Duration::from_secs(2);
        // a long call: the handshake's own timeout binds
        assert_eq!(
            step_wait(cap, now, now + Duration::from_secs(30)),
            Some((cap, false))
        );
        // exactly as long: still the handshake's timeout
        assert_eq!(step_wait(cap, now, now + cap), Some((cap, false)));
        // a 300 ms call: what is left of it, and the call's limit binds
        assert_eq!(
            step_wait(cap, now, now + Duration::from_millis(300)),
            Some((Duration::from_millis(300), true))
        );
        // later in the same call, less is left
        assert_eq!(
            step_wait(
                cap,
                now + Duration::from_millis(200),
                now + Duration::from_millis(300)
            ),
            Some((Duration::from_millis(100), true))
        );
        // at or past the deadline: no time for another step
        assert_eq!(step_wait(cap, now + cap, now + cap), None);
        assert_eq!(step_wait(cap, now + cap, now), None);
    }

    #[test]
    fn a_deadline_too_far_to_represent_is_a_day() {
        let before = tokio::time::Instant::now();
        let d = Deadline::after(Duration::MAX);
        assert_eq!(d.limit, Duration::MAX);
        let ahead = d.at.saturating_duration_since(before);
        assert!(ahead >= Duration::from_secs(86_400), "{ahead:?}");
        assert!(ahead < Duration::from_secs(86_401), "{ahead:?}");
        let d = Deadline::after(Duration::from_millis(300));
        assert!(d.at.saturating_duration_since(before) >= Duration::from_millis(300));
        let e = d.out_of_time("no QUIC handshake");
        assert!(e.timed_out);
        assert_eq!(
            e.reason,
            "no QUIC handshake within the call's limit of 300ms"
        );
        // what is left of a 300 ms timeout after a moment's routing
        let e = Deadline::after(Duration::from_micros(299_560)).out_of_time("no QUIC handshake");
        assert_eq!(
            e.reason,
            "no QUIC handshake within the call's limit of 300ms"
        );
        assert_eq!(ms(Duration::from_secs(2)), "2000ms");
        assert_eq!(ms(Duration::ZERO), "0ms");
    }
}
