//! Raw TCP through the mesh: `tcp_outbound` listeners, L4 authorization
//! and byte copying, one evidence record per connection and spoke.
//!
//! What it is: both ends of a proxied TCP connection. The calling end
//! ([`serve`]) accepts an app's connection on a `tcp_outbound` listener,
//! resolves the listener's service as an HTTP `Host` would be (local
//! first), and either delivers it to a workload of this spoke ([`admit`]:
//! L4 authorization with the calling workload's ID as principal, then the
//! workload's inbound address) or opens a tunnel stream to the peer spoke
//! (or, for a cloud service, to the hub's gateway) with a [`StreamHeader`]
//! of protocol [`StreamProtocol::Tcp`]. The serving
//! end ([`serve_stream`], called by the tunnel after the header) admits the
//! stream the same way with the peer's verified SPIFFE ID; a refusal resets
//! the QUIC stream, so the app sees its TCP connection closed without data.
//! Either way the bytes are then copied both ways ([`pipe`]) until both
//! sides have closed, one fails, or nothing moved for
//! [`super::DataSettings::tcp_idle_timeout`].
//!
//! Authorization is Istio's for TCP
//! ([`tidemesh_policy::CompiledPolicies::decide_l4`]): sources, ports and
//! the non-HTTP `when` keys apply; an ALLOW rule that needs a method, path
//! or header never matches; a DENY rule is checked without those fields.
//! Only a `protocol = "tcp"` workload receives raw TCP.
//!
//! Who drives it: [`super::DataPlane::serve`] (listeners) and
//! [`super::tunnel`] (streams). What it must not do: deliver a byte before
//! the decision, take the principal from anything but the handshake (or the
//! calling workload's own listener), or keep a connection past its idle
//! timeout; it holds a connection-limit permit for every connection.
//!
//! Stream resets by the serving end: [`close::FORBIDDEN`] when
//! authorization refuses, [`close::PROTOCOL_ERROR`] when no raw TCP
//! workload of that service and account is here, [`close::UNREACHABLE`]
//! when the workload cannot be reached (nothing was delivered), and
//! [`close::NORMAL`] when the connection failed midway.
//!
//! Failover: an endpoint that cannot be reached (a local workload that
//! refuses, a peer spoke that cannot be dialed, or a peer whose workload
//! refuses: its [`close::UNREACHABLE`] reset) counts against its circuit
//! breaker and the connection goes on to the next endpoint. Until the
//! serving end answers, the calling end keeps what the app sent (at most
//! [`MAX_HELD`] bytes) and replays it to the next endpoint; an app that
//! sent more than that before any answer is not moved.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tidemesh_evidence::{
    record::{
        EnforcementPoint, ReliabilityEvidence, RequestEvidence, Status, StatusCode as SpanStatus,
    },
    Sha256Digest,
};
use tidemesh_identity::SpiffeId;
use tidemesh_policy::{
    model::{Backoff, BackoffKind},
    NoHeaders,
};
use tidemesh_proto::{
    close,
    data::{StreamHeader, StreamProtocol},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{timeout, Instant},
};
use tracing::{debug, info, warn};

pub(crate) use tidemesh_net::pipe::{pipe, End, Piped};

use super::{
    resilience::{retry_evidence, RetrySettings},
    resolve::{self, Target},
    span_random, trace, DataPlaneError, Shared,
};
use crate::config::WorkloadProtocol;

/// A bound `tcp_outbound` listener, not yet serving.
pub(crate) struct Listener {
    /// The workload calling through it (index into `Shared::workloads`).
    caller: usize,
    /// The service as configured (`name` or `name.namespace`).
    service: String,
    listener: tokio::net::TcpListener,
}

/// Binds every `tcp_outbound` listener of the config; a taken address is
/// an error naming its key.
pub(crate) async fn bind(file: &crate::FileConfig) -> Result<Vec<Listener>, DataPlaneError> {
    let mut out = Vec::new();
    for (i, w) in file.workloads.iter().enumerate() {
        for (j, t) in w.tcp_outbound.iter().enumerate() {
            if !t.listen.ip().is_loopback() {
                warn!(workload = %w.service_account, addr = %t.listen, "tcp_outbound listener is not on loopback: anyone who reaches it connects with this workload's identity");
            }
            let listener = tokio::net::TcpListener::bind(t.listen)
                .await
                .map_err(|source| DataPlaneError::Bind {
                    key: format!("workload[{i}].tcp_outbound[{j}].listen"),
                    addr: t.listen,
                    source,
                })?;
            out.push(Listener {
                caller: i,
                service: t.service.clone(),
                listener,
            });
        }
    }
    Ok(out)
}

/// Accepts app connections on one `tcp_outbound` listener.
pub(crate) async fn serve(s: std::sync::Arc<Shared>, l: Listener) {
    info!(
        workload = %s.workloads[l.caller].account,
        service = %l.service,
        addr = %l.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "tcp outbound listener up"
    );
    let service: std::sync::Arc<str> = l.service.into();
    let caller = l.caller;
    super::accept_apps(s, l.listener, "tcp_outbound", move |s, stream| {
        let service = service.clone();
        async move { outbound_conn(&s, caller, &service, stream).await }
    })
    .await
}

/// What a connection did, for its record.
struct Outcome {
    up: u64,
    down: u64,
    /// `Err`: the connection was refused or failed; the reason.
    result: Result<String, String>,
}

impl Outcome {
    fn refused(reason: String) -> Outcome {
        Outcome {
            up: 0,
            down: 0,
            result: Err(reason),
        }
    }

    /// Adds `n` bytes the app sent before this try's pipe started.
    fn with_up(mut self, n: u64) -> Outcome {
        self.up += n;
        self
    }

    fn of(p: Piped) -> Outcome {
        let result = match p.end {
            End::Closed => Ok("closed".to_owned()),
            End::Idle(d) => Ok(format!("closed after {}s idle", d.as_secs())),
            End::Failed(e) => Err(e),
        };
        Outcome {
            up: p.up,
            down: p.down,
            result,
        }
    }
}

/// Completes a connection's record: its lifetime, OK or ERROR, and the
/// bytes each way in the status message (records have no byte counts).
fn finish(ev: &mut RequestEvidence, started: Instant, o: &Outcome) {
    ev.telemetry.duration_us = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
    ev.telemetry.status_code = None;
    let (code, what) = match &o.result {
        Ok(m) => (SpanStatus::Ok, m.as_str()),
        Err(m) => (SpanStatus::Error, m.as_str()),
    };
    ev.telemetry.status = Status {
        code,
        message: format!("{what}; {} bytes up, {} bytes down", o.up, o.down),
    };
}

/// Most endpoints one app connection is offered to: the first pick plus
/// as many others after a connect failure.
const MAX_CONNECT_TRIES: u32 = 3;

/// How one try of a connection ended.
enum Try {
    /// The connection was made and piped (or refused for a reason that
    /// says nothing about the endpoint's health).
    Done(Outcome),
    /// The endpoint could not be reached: no byte was sent, so the next
    /// endpoint may be tried.
    Unreachable(String),
}

/// Most bytes an app may send before the serving end answers and still be
/// moved to another endpoint if that one turns out unreachable.
pub(crate) const MAX_HELD: usize = 64 * 1024;

/// What the app sent before any endpoint answered: replayed to the next
/// endpoint when this one turns out unreachable.
#[derive(Default)]
struct Held {
    bytes: Vec<u8>,
    /// More than [`MAX_HELD`] was sent: no longer replayable.
    overflowed: bool,
    /// Bytes taken from the app before an answer (for the record).
    taken: u64,
    /// The app closed its side before an answer (passed on after a replay).
    eof: bool,
}

impl Held {
    fn keep(&mut self, b: &[u8]) {
        self.taken += b.len() as u64;
        if self.overflowed {
            return;
        }
        if self.bytes.len() + b.len() > MAX_HELD {
            self.overflowed = true;
            self.bytes = Vec::new();
        } else {
            self.bytes.extend_from_slice(b);
        }
    }
}

/// One app connection on a `tcp_outbound` listener of workload `caller`.
/// An endpoint that cannot be reached counts against its circuit breaker
/// and the connection moves on to the next one (local, then site, then
/// cloud), as an HTTP request's retry does: nothing was sent yet.
async fn outbound_conn(s: &Shared, caller: usize, service: &str, mut app: TcpStream) {
    let started = Instant::now();
    let w = &s.workloads[caller];
    // The mode of the service decides what routing may use (a connection
    // is not retried by the mode: only moved on when unreachable) and
    // whether the connection's new trace is sampled.
    let canon = resolve::canonical_target(&s.compiled().hosts, service, &w.namespace)
        .unwrap_or_else(|_| service.to_owned());
    let span = trace::Span::start(None, span_random(), || s.h.modes.sample(&canon));
    let profile = s.h.modes.profile(&canon);
    let mut limits = resolve::RouteLimits::of(profile.routing);
    if profile.routing == tidemesh_policy::model::RoutingMode::Ramp
        && matches!(
            s.h.modes.admit_remote(),
            tidemesh_policy::mode::RemoteAdmission::Refuse { .. }
        )
    {
        limits.no_cloud = true;
    }
    let route = |exclude: &[String]| {
        // A connection is routed as a request without method, path or headers.
        resolve::resolve(
            s,
            service,
            &w.namespace,
            "",
            "",
            &NoHeaders,
            exclude,
            limits,
            std::time::Instant::now(),
        )
    };
    let mut resolved = match route(&[]) {
        Ok(r) => r,
        Err(u) => {
            let mut ev = s.new_evidence(
                &u.host,
                EnforcementPoint::SidecarOutbound,
                &span,
                format!("TCP {}", u.host),
            );
            ev.routing_decision = u.evidence.map(|e| *e);
            debug!(workload = %w.account, %service, reason = %u.reason, "tcp connection unroutable; closing it");
            finish(&mut ev, started, &Outcome::refused(u.reason));
            s.record(ev);
            return;
        }
    };
    let mut ev = s.new_evidence(
        &resolved.host,
        EnforcementPoint::SidecarOutbound,
        &span,
        format!("TCP {}", resolved.host),
    );
    // Connect failures are what a connection is retried on (once per
    // endpoint, no backoff: the next endpoint is a different one).
    let defaults = RetrySettings::from_policy(None, None);
    let retry = RetrySettings {
        attempts: MAX_CONNECT_TRIES - 1,
        backoff: Backoff {
            kind: BackoffKind::None,
            ..defaults.backoff
        },
        ..defaults
    };
    let mut tried: Vec<String> = Vec::new();
    let mut attempt = 0u32;
    let mut held = Held::default();
    let outcome = loop {
        attempt += 1;
        ev.routing_decision = Some(resolved.evidence.clone());
        let key = resolved.key.clone();
        let result = match s.breaker_admit(&resolved.host, &key, std::time::Instant::now()) {
            Err(wait) => Try::Done(Outcome::refused(format!(
                "circuit breaker of {key} is open for another {wait:?}"
            ))),
            Ok(admit) => {
                // least request counts open connections as requests
                s.lb_started(&resolved.slot);
                let r = one_try(s, caller, &resolved, &span, &mut app, &mut held, &mut ev).await;
                s.lb_finished(&resolved.slot);
                let tier = super::outbound::tier_of(&resolved.target);
                match &r {
                    Try::Unreachable(_) => {
                        s.breaker_report(&key, admit, false, std::time::Instant::now());
                        s.h.modes.report(&resolved.host, tier, false);
                    }
                    Try::Done(o) if o.up > 0 || o.down > 0 || o.result.is_ok() => {
                        s.breaker_report(&key, admit, true, std::time::Instant::now());
                        s.h.modes.report(&resolved.host, tier, true);
                    }
                    // refused before any byte (authorization, protocol, hub
                    // unreachable): says nothing about the endpoint
                    Try::Done(_) => s.breaker_release(&key, admit),
                }
                r
            }
        };
        ev.reliability = Some(ReliabilityEvidence {
            circuit_breaker: s.breaker_evidence(&key, std::time::Instant::now()),
            retry_state: retry_evidence(&retry, attempt, attempt - 1, 0),
        });
        let why = match result {
            Try::Done(o) => break o,
            Try::Unreachable(why) => why,
        };
        tried.push(key);
        if attempt >= MAX_CONNECT_TRIES {
            break Outcome::refused(why).with_up(held.taken);
        }
        if held.overflowed {
            break Outcome::refused(format!(
                "{why}; the app sent more than {MAX_HELD} bytes before any answer, so the connection was not moved to another endpoint"
            ))
            .with_up(held.taken);
        }
        match route(&tried) {
            Ok(next) if !tried.contains(&next.key) => {
                debug!(workload = %w.account, service = %resolved.host, error = %why, next = %next.key, "tcp endpoint unreachable; trying the next");
                s.counters()
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                resolved = next;
            }
            _ => break Outcome::refused(why).with_up(held.taken),
        }
    };
    if let Err(e) = &outcome.result {
        debug!(workload = %w.account, service = %resolved.host, error = %e, "tcp connection refused or failed");
    }
    finish(&mut ev, started, &outcome);
    s.record(ev);
}

/// One try of an app connection against `resolved`'s endpoint.
#[allow(
    clippy::too_many_arguments,
    reason = "the connection's parts; a struct would only rename them"
)]
async fn one_try(
    s: &Shared,
    caller: usize,
    resolved: &resolve::Resolved,
    span: &trace::Span,
    app: &mut TcpStream,
    held: &mut Held,
    ev: &mut RequestEvidence,
) -> Try {
    let w = &s.workloads[caller];
    match &resolved.target {
        Target::Local(i) => {
            ev.identity = Some(s.local_identity(caller, *i));
            match admit(s, *i, Some(&w.id), ev).await {
                Ok(mut upstream) => {
                    // connected: what an unreachable endpoint left over goes first
                    let replay = std::mem::take(&mut held.bytes);
                    if let Err(e) =
                        tokio::io::AsyncWriteExt::write_all(&mut upstream, &replay).await
                    {
                        return Try::Done(
                            Outcome::refused(format!("workload: {e}")).with_up(held.taken),
                        );
                    }
                    Try::Done(
                        Outcome::of(pipe(app, &mut upstream, s.settings.tcp_idle_timeout).await)
                            .with_up(held.taken),
                    )
                }
                Err(r) if r.unreachable => Try::Unreachable(r.reason),
                Err(r) => Try::Done(Outcome::refused(r.reason)),
            }
        }
        Target::Site {
            addr,
            server,
            account,
        } => {
            let header = super::stream_header(
                &resolved.host,
                account.clone(),
                StreamProtocol::Tcp,
                span,
                None,
            );
            through_tunnel(s, caller, *addr, server, header, app, held, ev).await
        }
        // A cloud service: through the hub's gateway, which picks the
        // endpoint; without the hub the connection is closed at once.
        Target::Cloud => {
            if !s.h.hub.borrow().connected {
                s.counters()
                    .hub_unreachable
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Try::Done(Outcome::refused(format!(
                    "hub unreachable: {} is a cloud service behind the hub gateway",
                    resolved.host
                )));
            }
            match s.hub_address() {
                Ok(addr) => {
                    let header = super::stream_header(
                        &resolved.host,
                        "cloud".into(),
                        StreamProtocol::Tcp,
                        span,
                        None,
                    );
                    let hub = tidemesh_identity::naming::hub_id(&s.td);
                    through_tunnel(s, caller, addr, &hub, header, app, held, ev).await
                }
                Err(e) => Try::Done(Outcome::refused(format!("hub unreachable: {e}"))),
            }
        }
    }
}

/// Carries `app`'s connection to the peer spoke `server` (`addr`); a peer
/// that cannot be reached, or that resets the stream with
/// [`close::UNREACHABLE`] before answering, is [`Try::Unreachable`].
#[allow(
    clippy::too_many_arguments,
    reason = "the connection's parts; a struct would only rename them"
)]
async fn through_tunnel(
    s: &Shared,
    caller: usize,
    addr: SocketAddr,
    server: &SpiffeId,
    header: StreamHeader,
    app: &mut TcpStream,
    held: &mut Held,
    ev: &mut RequestEvidence,
) -> Try {
    let bytes = match header.encode() {
        Ok(b) => b,
        Err(e) => {
            return Try::Done(
                Outcome::refused(format!("cannot frame the stream header: {e}"))
                    .with_up(held.taken),
            )
        }
    };
    // Raw TCP has no request timeout: opening the stream (the handshake,
    // stream credit, the fresh try after a dead pooled connection) gets the
    // handshake timeout in all.
    let within = super::tunnel::Deadline::after(s.settings.connect_timeout);
    let (t, hs, (mut send, mut recv)) =
        match super::tunnel::open_stream(s, caller, addr, server, within).await {
            Ok(x) => x,
            Err(e) => return Try::Unreachable(format!("cannot reach {server} at {addr}: {e}")),
        };
    ev.identity = Some(t.identity_evidence(s, caller, hs));
    if let Err(e) = send.write_all(&bytes).await {
        return Try::Unreachable(format!("{server} at {addr}: {e}"));
    }
    if let Err(e) = send.write_all(&held.bytes).await {
        return Try::Unreachable(format!("{server} at {addr}: {e}"));
    }
    let mut send = SendHalf {
        send,
        finished: false,
    };
    if held.eof && send.finish_now().is_err() {
        return Try::Unreachable(format!("{server} at {addr}: the stream closed"));
    }
    let idle = s.settings.tcp_idle_timeout;
    let reset = |send: &mut SendHalf, recv: &mut quinn::RecvStream| {
        let _ = send.send.reset(quinn::VarInt::from_u32(close::NORMAL));
        let _ = recv.stop(quinn::VarInt::from_u32(close::NORMAL));
    };
    let (head, ended) = match await_answer(app, &mut send, &mut recv, held, idle).await {
        Answer::Go { head, ended } => (head, ended),
        Answer::Unreachable(why) => {
            reset(&mut send, &mut recv);
            return Try::Unreachable(format!("{server} at {addr}: {why}"));
        }
        Answer::Failed(e) => {
            reset(&mut send, &mut recv);
            return Try::Done(Outcome::refused(e).with_up(held.taken));
        }
        Answer::Idle => {
            reset(&mut send, &mut recv);
            return Try::Done(
                Outcome::of(Piped {
                    up: 0,
                    down: 0,
                    end: End::Idle(idle),
                })
                .with_up(held.taken),
            );
        }
    };
    // answered: nothing is replayed from here on
    held.bytes = Vec::new();
    let peer_side = Prefixed {
        head,
        at: 0,
        ended,
        inner: recv,
    };
    let mut stream = tokio::io::join(peer_side, send);
    let piped = pipe(app, &mut stream, idle).await;
    if matches!(piped.end, End::Failed(_)) {
        let (mut peer_side, mut send) = stream.into_inner();
        reset(&mut send, &mut peer_side.inner);
    }
    Try::Done(Outcome::of(piped).with_up(held.taken))
}

/// What the serving end of a tunnel stream did first.
enum Answer {
    /// It answered: `head` is what it sent first (`ended`: and then
    /// finished its side).
    Go { head: Vec<u8>, ended: bool },
    /// It could not reach its workload ([`close::UNREACHABLE`]).
    Unreachable(String),
    /// The stream or the app failed.
    Failed(String),
    /// Nothing moved either way for the idle timeout.
    Idle,
}

/// Forwards what the app sends (keeping it in `held`, and passing on its
/// close) until the serving end answers or resets the stream.
async fn await_answer(
    app: &mut TcpStream,
    send: &mut SendHalf,
    recv: &mut quinn::RecvStream,
    held: &mut Held,
    idle: Duration,
) -> Answer {
    use tokio::io::AsyncReadExt;
    let unreachable = quinn::VarInt::from_u32(close::UNREACHABLE);
    let mut from_app = vec![0u8; 16 * 1024];
    let mut from_peer = vec![0u8; 16 * 1024];
    loop {
        // both reads are cancel safe: a read that lost the race took nothing
        tokio::select! {
            r = recv.read(&mut from_peer) => return match r {
                Ok(Some(n)) => {
                    from_peer.truncate(n);
                    Answer::Go { head: from_peer, ended: false }
                }
                Ok(None) => Answer::Go { head: Vec::new(), ended: true },
                Err(quinn::ReadError::Reset(code)) if code == unreachable => {
                    Answer::Unreachable("its workload could not be reached".into())
                }
                Err(e) => Answer::Failed(format!("tunnel stream: {e}")),
            },
            r = app.read(&mut from_app), if !held.eof => match r {
                // the app closed its side: so does the stream; the answer
                // (or the reset) is still to come
                Ok(0) => {
                    held.eof = true;
                    if let Err(e) = send.finish_now() {
                        return Answer::Failed(format!("tunnel stream: {e}"));
                    }
                }
                Ok(n) => {
                    held.keep(&from_app[..n]);
                    match send.send.write_all(&from_app[..n]).await {
                        Ok(()) => {}
                        Err(quinn::WriteError::Stopped(code)) if code == unreachable => {
                            return Answer::Unreachable("its workload could not be reached".into())
                        }
                        Err(e) => return Answer::Failed(format!("tunnel stream: {e}")),
                    }
                }
                Err(e) => return Answer::Failed(format!("app connection: {e}")),
            },
            () = tokio::time::sleep(idle) => return Answer::Idle,
        }
    }
}

/// The calling end's write half of a tunnel stream: a close the app made
/// before the answer is passed on once, and the pipe's own close after it
/// is then a no-op.
struct SendHalf {
    send: quinn::SendStream,
    finished: bool,
}

impl SendHalf {
    fn finish_now(&mut self) -> Result<(), quinn::ClosedStream> {
        if !self.finished {
            self.send.finish()?;
            self.finished = true;
        }
        Ok(())
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        let r = AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.finished = true;
        }
        r
    }
}

/// The serving end's side of a tunnel stream once it answered: the bytes
/// [`await_answer`] took first, then the stream (or its end, if it ended).
struct Prefixed<R> {
    head: Vec<u8>,
    at: usize,
    ended: bool,
    inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// Why a connection was not delivered.
struct Refusal {
    /// The stream reset code for a tunnel caller.
    code: u32,
    reason: String,
    /// The workload could not be reached (nothing was sent to it).
    unreachable: bool,
}

/// Checks that local workload `idx` takes raw TCP, authorizes `principal`
/// at L4 (filling `ev`'s policy evidence) and connects to its inbound
/// address.
async fn admit(
    s: &Shared,
    idx: usize,
    principal: Option<&SpiffeId>,
    ev: &mut RequestEvidence,
) -> Result<TcpStream, Refusal> {
    let w = &s.workloads[idx];
    if w.protocol != WorkloadProtocol::Tcp {
        return Err(Refusal {
            code: close::PROTOCOL_ERROR,
            reason: format!(
                "workload {} speaks HTTP: raw TCP is delivered only to protocol = \"tcp\" workloads",
                w.account
            ),
            unreachable: false,
        });
    }
    let Some(inbound) = w.inbound else {
        return Err(Refusal {
            code: close::PROTOCOL_ERROR,
            reason: format!("workload {} has no inbound address", w.account),
            unreachable: false,
        });
    };
    let verdict = authorize(s, idx, inbound.port(), principal, ev);
    if let Err(reason) = verdict {
        return Err(Refusal {
            code: close::FORBIDDEN,
            reason,
            unreachable: false,
        });
    }
    match timeout(s.settings.connect_timeout, TcpStream::connect(inbound)).await {
        Ok(Ok(st)) => {
            let _ = st.set_nodelay(true);
            Ok(st)
        }
        Ok(Err(e)) => Err(Refusal {
            code: close::UNREACHABLE,
            reason: format!("workload at {inbound} refused the connection: {e}"),
            unreachable: true,
        }),
        Err(_) => Err(Refusal {
            code: close::UNREACHABLE,
            reason: format!(
                "workload at {inbound}: no connection within {:?}",
                s.settings.connect_timeout
            ),
            unreachable: true,
        }),
    }
}

/// The L4 decision for a connection to local workload `idx` on `port`;
/// fills `ev`'s policy evidence. `Err` carries the denial's reason.
fn authorize(
    s: &Shared,
    idx: usize,
    port: u16,
    principal: Option<&SpiffeId>,
    ev: &mut RequestEvidence,
) -> Result<(), String> {
    super::inbound::authorize(s, idx, principal, port, None, ev).map_err(|why| {
        format!(
            "{why} connecting to {} (tcp port {port})",
            s.workloads[idx].id
        )
    })
}

/// The serving end of a raw TCP tunnel stream (its header already read):
/// admits the peer `peer` to the workload the header names and copies bytes
/// both ways; a refusal resets the stream. One record.
pub(crate) async fn serve_stream(
    s: &Shared,
    peer: &SpiffeId,
    fingerprint: Option<Sha256Digest>,
    header: StreamHeader,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let started = Instant::now();
    let parent = header
        .trace
        .map(|t| trace::Parent {
            trace_id: t.trace_id,
            span_id: t.span_id,
            sampled: Some(t.sampled),
        })
        .filter(|p| p.trace_id != [0; 16] && p.span_id != [0; 8]);
    let span = trace::Span::start(parent, span_random(), || s.h.modes.sample(&header.service));
    let mut ev = s.new_evidence(
        &header.service,
        EnforcementPoint::SidecarInbound,
        &span,
        format!("TCP {}", header.service),
    );
    ev.identity = Some(s.served_identity(peer, fingerprint));
    let idx = s.workload_for(&header);
    let admitted = match idx {
        None => Err(Refusal {
            code: close::PROTOCOL_ERROR,
            reason: format!(
                "no workload {} serving {} on this spoke",
                header.workload, header.service
            ),
            unreachable: false,
        }),
        Some(i) => admit(s, i, Some(peer), &mut ev).await,
    };
    let outcome = match admitted {
        Err(r) => {
            debug!(%peer, service = %header.service, reason = %r.reason, "tcp stream refused; resetting it");
            let _ = send.reset(quinn::VarInt::from_u32(r.code));
            let _ = recv.stop(quinn::VarInt::from_u32(r.code));
            Outcome::refused(r.reason)
        }
        Ok(mut upstream) => {
            let mut stream = tokio::io::join(recv, send);
            let piped = pipe(&mut stream, &mut upstream, s.settings.tcp_idle_timeout).await;
            if matches!(piped.end, End::Failed(_)) {
                let (mut recv, mut send) = stream.into_inner();
                let _ = send.reset(quinn::VarInt::from_u32(close::NORMAL));
                let _ = recv.stop(quinn::VarInt::from_u32(close::NORMAL));
            }
            Outcome::of(piped)
        }
    };
    finish(&mut ev, started, &outcome);
    s.record(ev);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_record_names_the_outcome_and_the_bytes() {
        let span = trace::Span::start(None, [7; 24], || true);
        let mut ev = super::super::new_evidence(
            "db.default",
            EnforcementPoint::SidecarOutbound,
            tidemesh_evidence::record::Mode::Target,
            &span,
            "TCP db.default".into(),
        );
        let o = Outcome::of(Piped {
            up: 5,
            down: 7,
            end: End::Idle(Duration::from_secs(300)),
        });
        finish(&mut ev, Instant::now(), &o);
        assert_eq!(ev.telemetry.status.code, SpanStatus::Ok);
        assert_eq!(
            ev.telemetry.status.message,
            "closed after 300s idle; 5 bytes up, 7 bytes down"
        );
        assert_eq!(ev.telemetry.status_code, None);
        finish(
            &mut ev,
            Instant::now(),
            &Outcome::refused("RBAC: access denied".into()),
        );
        assert_eq!(ev.telemetry.status.code, SpanStatus::Error);
        assert!(ev
            .telemetry
            .status
            .message
            .starts_with("RBAC: access denied;"));
    }

    #[test]
    fn held_bytes_stop_being_replayable_past_the_limit() {
        let mut h = Held::default();
        h.keep(&[1; 1000]);
        h.keep(&[2; 24]);
        assert!(!h.overflowed);
        assert_eq!(h.bytes.len(), 1024);
        h.keep(&vec![3; MAX_HELD]);
        assert!(h.overflowed);
        assert!(h.bytes.is_empty(), "an overflowed buffer is dropped");
        h.keep(&[4; 10]);
        assert_eq!(h.taken, 1024 + MAX_HELD as u64 + 10);
    }

    #[tokio::test]
    async fn prefixed_yields_its_head_then_the_stream_or_its_end() {
        let (mut far, near) = duplex(64);
        far.write_all(b" world").await.unwrap();
        drop(far);
        let mut p = Prefixed {
            head: b"hello".to_vec(),
            at: 0,
            ended: false,
            inner: near,
        };
        let mut got = Vec::new();
        p.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");

        let (mut far, near) = duplex(64);
        far.write_all(b"not read").await.unwrap();
        let mut p = Prefixed {
            head: b"x".repeat(3),
            at: 0,
            ended: true,
            inner: near,
        };
        let mut got = Vec::new();
        p.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"xxx", "an ended stream is not read further");
    }
}
