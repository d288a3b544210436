//! The outbound listeners: where a local app calls mesh services.
//!
//! What it is: one HTTP/1.1 server per workload with an `outbound` address.
//! A request is routed by its `Host` ([`super::resolve`]), gets trace
//! context (a new span under the app's, or a new trace) and an
//! `x-request-id` if it had none, and goes to the chosen endpoint: a
//! workload of this spoke through [`super::inbound`] directly (one record,
//! this one, carrying routing, authorization and rate limit), or a
//! workload of a peer spoke through [`super::tunnel`] (this record carries
//! routing and the tunnel's identity evidence; the peer writes the
//! authorization record). Who drives it: [`super::DataPlane::serve`].
//! What it must not do: trust identity headers from the app (an
//! `x-forwarded-client-cert` it sends is dropped), or wait for the evidence
//! commit.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use hyper::{
    body::Incoming, header::HeaderValue, server::conn::http1, Request, Response, StatusCode,
};
use tidemesh_evidence::record::{EnforcementPoint, ReliabilityEvidence, RequestEvidence};
use tidemesh_identity::naming;
use tidemesh_net::http::{full, HUB_STATUS, UPSTREAM, UPSTREAM_TLS};
use tidemesh_proto::data::{StreamHeader, StreamProtocol};
use tracing::debug;

use tidemesh_policy::{mode::RemoteAdmission, model::RoutingMode, routing::LocalityTier};

use super::{
    finish_evidence, finish_from_response, inbound, local_response,
    resilience::{self, backoff_delay, retry_evidence, Outcome, RetrySettings},
    resolve::{self, Target},
    span_random, trace, Body, DataSettings, Shared,
};

/// The HTTP/1.1 server settings every listener of the data plane uses.
pub(crate) fn http1_server(settings: &DataSettings) -> http1::Builder {
    tidemesh_net::http::http1_server(settings.header_timeout, settings.max_header_bytes)
}

/// Accepts app connections on workload `caller`'s outbound listener.
pub(crate) async fn serve(s: Arc<Shared>, caller: usize, listener: tokio::net::TcpListener) {
    super::serve_apps_http(s, listener, "outbound", move |s, req| async move {
        handle(&s, caller, req).await
    })
    .await
}

fn header_string(h: &hyper::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Sets `x-request-id` when absent; returns it.
pub(crate) fn ensure_request_id(h: &mut hyper::HeaderMap, given: Option<&str>) -> Option<String> {
    if let Some(v) = h.get(&trace::H_REQUEST_ID) {
        return v.to_str().ok().map(str::to_owned);
    }
    let v = match given {
        Some(g) => HeaderValue::from_str(g).ok()?,
        None => HeaderValue::from_bytes(&trace::request_id_bytes(rand::random())).ok()?,
    };
    let id = v.to_str().ok().map(str::to_owned);
    h.insert(trace::H_REQUEST_ID, v);
    id
}

/// Writes this hop's span into the request headers (replacing the caller's).
pub(crate) fn set_trace_headers(h: &mut hyper::HeaderMap, span: &trace::Span) {
    h.remove(&trace::H_B3_SINGLE);
    let mut parent = false;
    for (k, v) in span.header_values().into_iter().flatten() {
        parent |= k == trace::B3_PARENT;
        h.insert(k, v);
    }
    if !parent {
        h.remove(trace::B3_PARENT);
    }
}

/// Most bytes of a request body kept in memory so the request can be
/// retried; a larger (or streamed) body is sent once.
const MAX_RETRY_BODY: u64 = 64 * 1024;

/// A proxy-made failure that says nothing about the endpoint's health:
/// neither retried nor counted by its circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Neutral {
    /// The hub (and so its gateway) is unreachable.
    HubUnreachable,
    /// A local limit (requests in flight) refused it.
    Overflow,
}

/// What an attempt's response says about the endpoint.
pub(crate) fn outcome_of<B>(resp: &Response<B>) -> Outcome {
    if resp.extensions().get::<Neutral>().is_some() {
        return Outcome::Overflow;
    }
    if let Some(o) = resp.extensions().get::<Outcome>() {
        return o.clone();
    }
    Outcome::Status(resp.status().as_u16())
}

/// A copy of the request's head, for another attempt (extensions are
/// the hop's own and are not copied).
fn copy_parts(parts: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r.into_parts().0
}

async fn handle(s: &Shared, caller: usize, mut req: Request<Incoming>) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let w = &s.workloads[caller];
    let parent = {
        let h = req.headers();
        trace::extract(&|n| header_string(h, n))
    };
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    // The mode of the service asked for decides what routing may use, how
    // many retries, how the breakers trip, whether a new trace is sampled.
    let service = host.as_ref().map(|host| {
        resolve::canonical_target(&s.compiled().hosts, host, &w.namespace)
            .unwrap_or_else(|_| host.clone())
    });
    let span = trace::Span::start(parent, span_random(), || {
        s.h.modes.sample(service.as_deref().unwrap_or_default())
    });
    let operation = format!("{} {}", req.method(), req.uri().path());
    // HTTP/2 from the app goes on as HTTP/1.1 (to the workload, over the
    // tunnel); the Host is the authority it named.
    tidemesh_net::http::to_http1(&mut req);
    let headers = req.headers_mut();
    inbound::strip_hop_by_hop(headers);
    // Identity is the spoke's to assert, never the app's.
    headers.remove(inbound::XFCC);
    set_trace_headers(headers, &span);
    let request_id = ensure_request_id(headers, None);

    let (Some(host), Some(service)) = (host, service) else {
        let mut ev = s.new_evidence("", EnforcementPoint::SidecarOutbound, &span, operation);
        let r = local_response(
            StatusCode::BAD_REQUEST,
            "no Host header: name the mesh service to call",
            &[],
        );
        finish_evidence(&mut ev, started, r.status(), "no host");
        s.record(ev);
        return r;
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let method = req.method().as_str().to_owned();
    let profile = s.h.modes.profile(&service);
    let limits = resolve::RouteLimits::of(profile.routing);
    let first = resolve::resolve(
        s,
        &host,
        &w.namespace,
        &method,
        &path,
        &inbound::Headers(req.headers()),
        &[],
        limits,
        Instant::now(),
    );
    let mut resolved = match first {
        Ok(r) => r,
        Err(u) => {
            let mut ev =
                s.new_evidence(&u.host, EnforcementPoint::SidecarOutbound, &span, operation);
            ev.routing_decision = u.evidence.map(|e| *e);
            // A cloud service in survival: the hub is out of reach (the
            // mode says so), and the answer says it as a cloud call would.
            let extra: Vec<(&str, String)> = if u.cloud_excluded && !s.h.hub.borrow().connected {
                s.counters()
                    .hub_unreachable
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                vec![(HUB_STATUS, "unreachable".into())]
            } else {
                Vec::new()
            };
            let r = local_response(u.status, &u.reason, &extra);
            finish_evidence(&mut ev, started, r.status(), &u.reason);
            s.record(ev);
            return r;
        }
    };
    // Recovery: the ramp decides whether this request may go remote; one
    // it does not admit is served at the site when it can be, else refused
    // at once with the time to the next step.
    if profile.routing == RoutingMode::Ramp && matches!(resolved.target, Target::Cloud) {
        if let RemoteAdmission::Refuse { retry_after } = s.h.modes.admit_remote() {
            let local = resolve::resolve(
                s,
                &host,
                &w.namespace,
                &method,
                &path,
                &inbound::Headers(req.headers()),
                &[],
                resolve::RouteLimits {
                    no_cloud: true,
                    ..limits
                },
                Instant::now(),
            );
            match local {
                Ok(mut r) => {
                    r.evidence
                        .selection_reason
                        .push_str("_ramp_not_admitted_remote");
                    resolved = r;
                }
                Err(u) => {
                    let mut ev = s.new_evidence(
                        &u.host,
                        EnforcementPoint::SidecarOutbound,
                        &span,
                        operation,
                    );
                    let wait = retry_after.unwrap_or(Duration::from_secs(1));
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    let reason = format!(
                        "recovery ramp at {}% does not admit this request to the cloud, and {} has no endpoint at this site; retry in {secs} s",
                        profile.ramp_percent.unwrap_or(0),
                        u.host
                    );
                    let r = local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &reason,
                        &[("retry-after", secs.max(1).to_string())],
                    );
                    ev.routing_decision = Some(resolved.evidence);
                    finish_evidence(&mut ev, started, r.status(), &reason);
                    s.record(ev);
                    return r;
                }
            }
        }
    }
    let mut ev = s.new_evidence(
        &resolved.host,
        EnforcementPoint::SidecarOutbound,
        &span,
        operation,
    );
    let compiled = s.compiled();
    let policy = compiled.config.destination_policy(&resolved.host);
    let policy_retries = policy.and_then(|p| p.traffic.retries.as_ref());
    let mut retry = RetrySettings::from_policy(resolved.retries.as_deref(), policy_retries);
    // The mode's retries: the mode's own when no route or policy sets
    // them, else no more attempts than the mode allows.
    if resolved.retries.is_none() && policy_retries.is_none() {
        retry.attempts = profile.retries.attempts.min(resilience::MAX_RETRIES);
        retry.backoff = profile.retries.backoff;
    } else {
        retry.attempts = retry.attempts.min(profile.retries.attempts);
    }
    let dest = resolved.host.clone();
    // The destination's rate limit (its policy's rateLimit), at the caller.
    if let Some(check) = s.dest_rate_check(&dest) {
        ev.rate_limit_check = Some(check.evidence.clone());
        if let Some(after) = check.retry_after {
            let reason = format!(
                "rate limit of {dest} exceeded ({} requests/s, its destination policy)",
                check.evidence.limit
            );
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            let r = local_response(
                StatusCode::TOO_MANY_REQUESTS,
                &reason,
                &[("retry-after", secs.max(1).to_string())],
            );
            ev.routing_decision = Some(resolved.evidence);
            finish_evidence(&mut ev, started, r.status(), &reason);
            s.record(ev);
            return r;
        }
    }
    // The route's timeout (else the destination policy's) bounds the whole
    // call, retries included (as Istio's); each try has its own when the
    // retry policy sets one.
    let deadline = started
        + resolved
            .timeout
            .or(policy.and_then(|p| p.traffic.timeout))
            .unwrap_or(s.settings.request_timeout);

    // A request that may be retried keeps its (small) body in memory.
    let (mut parts, body) = req.into_parts();
    parts.extensions.clear();
    let size = hyper::body::Body::size_hint(&body).upper();
    let bufferable = retry.attempts > 0 && size.is_some_and(|n| n <= MAX_RETRY_BODY);
    let mut once = None;
    let kept = if bufferable {
        match http_body_util::Limited::new(body, MAX_RETRY_BODY as usize)
            .collect()
            .await
        {
            Ok(c) => Some(c.to_bytes()),
            Err(e) => {
                let r = local_response(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the request body: {e}"),
                    &[],
                );
                ev.routing_decision = Some(resolved.evidence);
                finish_from_response(&mut ev, started, &r);
                s.record(ev);
                return r;
            }
        }
    } else {
        once = Some(body.boxed());
        None
    };
    let max_attempts = if kept.is_some() {
        retry.attempts + 1
    } else {
        1
    };
    s.retry_deposit(&dest);

    let who = Caller {
        idx: caller,
        span: &span,
        request_id,
    };
    let mut tried: Vec<String> = Vec::new();
    let mut attempt = 0u32;
    let mut backoff_total = Duration::ZERO;
    let resp = loop {
        attempt += 1;
        let body = match (&kept, once.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(b)) => b,
            (None, None) => full(Vec::new()),
        };
        // A later attempt needs the head again: every attempt but the last
        // keeps a copy, and the last takes the original.
        let spare = (attempt < max_attempts).then(|| copy_parts(&parts));
        let req = Request::from_parts(parts, body);
        let now = tokio::time::Instant::now();
        let try_limit = retry
            .per_try_timeout
            .unwrap_or(Duration::MAX)
            .min(deadline.saturating_duration_since(now));
        let key = resolved.key.clone();
        // This try's routing (the hub gateway names its endpoint into it).
        ev.routing_decision = Some(resolved.evidence.clone());
        let resp = one_attempt(s, &who, &resolved, req, try_limit, &mut ev).await;
        let outcome = outcome_of(&resp);
        // Retried when the conditions hold and the method is idempotent or
        // the request never reached the endpoint.
        let retry_reason =
            (attempt < max_attempts && retry.may_retry(&outcome, &method)).then(|| outcome.clone());
        ev.reliability = Some(ReliabilityEvidence {
            circuit_breaker: s.breaker_evidence(&key, Instant::now()),
            retry_state: retry_evidence(
                &retry,
                attempt,
                attempt - 1,
                backoff_total.as_millis().min(u128::from(u32::MAX)) as u32,
            ),
        });
        if retry_reason.is_none() {
            break resp;
        }
        let delay = backoff_delay(&retry.backoff, attempt, rand::random());
        if tokio::time::Instant::now() + delay >= deadline || !s.retry_withdraw(&dest) {
            break resp;
        }
        debug!(service = %dest, endpoint = %key, attempt, ?outcome, ?delay, "retrying");
        s.counters()
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(delay).await;
        backoff_total += delay;
        tried.push(key);
        // (a retry is only chosen below max_attempts, where a copy was kept)
        let Some(p) = spare else {
            break resp;
        };
        parts = p;
        resolved = match resolve::resolve(
            s,
            &host,
            &w.namespace,
            &method,
            &path,
            &inbound::Headers(&parts.headers),
            &tried,
            limits,
            Instant::now(),
        ) {
            Ok(r) => r,
            // Nothing left to try: the last answer stands.
            Err(_) => break resp,
        };
    };
    finish_from_response(&mut ev, started, &resp);
    s.record(ev);
    resp
}

/// Who is calling: the local workload, this hop's span and the request id.
struct Caller<'a> {
    idx: usize,
    span: &'a trace::Span,
    request_id: Option<String>,
}

impl Caller<'_> {
    /// The data stream header for `service` (workload `workload` there).
    fn stream_header(&self, service: &str, workload: String) -> StreamHeader {
        super::stream_header(
            service,
            workload,
            StreamProtocol::Http1,
            self.span,
            self.request_id.clone(),
        )
    }
}

/// One try of a request against `resolved`'s endpoint: its circuit
/// breaker admits it (or not), the destination's request limit holds, the
/// request goes local, over the tunnel or to the hub gateway, and the
/// result is reported to the breaker.
async fn one_attempt(
    s: &Shared,
    who: &Caller<'_>,
    resolved: &resolve::Resolved,
    req: Request<Body>,
    limit: Duration,
    ev: &mut RequestEvidence,
) -> Response<Body> {
    let caller = who.idx;
    let w = &s.workloads[caller];
    let now = Instant::now();
    let admit = match s.breaker_admit(&resolved.host, &resolved.key, now) {
        Ok(a) => a,
        Err(wait) => {
            let mut r = local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "circuit breaker of {} is open for another {wait:?}",
                    resolved.key
                ),
                &[],
            );
            r.extensions_mut().insert(Neutral::Overflow);
            return r;
        }
    };
    let Some(_guard) = s.in_flight(&resolved.host) else {
        let mut r = local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "request limit to {} reached (max_requests of its destination policy)",
                resolved.host
            ),
            &[],
        );
        r.extensions_mut().insert(Neutral::Overflow);
        s.breaker_release(&resolved.key, admit);
        return r;
    };
    s.lb_started(&resolved.slot);
    let resp = match &resolved.target {
        Target::Local(i) => {
            ev.identity = Some(s.local_identity(caller, *i));
            match tokio::time::timeout(limit, inbound::deliver(s, *i, Some(&w.id), req, ev)).await {
                Ok(r) => r,
                Err(_) => {
                    let mut r = local_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("no response within {limit:?}"),
                        &[],
                    );
                    r.extensions_mut().insert(Outcome::Timeout);
                    r
                }
            }
        }
        Target::Site {
            addr,
            server,
            account,
        } => {
            let header = who.stream_header(&resolved.host, account.clone());
            super::tunnel::call(s, caller, *addr, server, header, req, limit, ev).await
        }
        Target::Cloud => cloud(s, who, resolved, req, limit, ev).await,
    };
    s.lb_finished(&resolved.slot);
    let outcome = outcome_of(&resp);
    if outcome == Outcome::Overflow {
        s.breaker_release(&resolved.key, admit);
    } else {
        let ok = !outcome.is_failure();
        s.breaker_report(&resolved.key, admit, ok, Instant::now());
        s.h.modes
            .report(&resolved.host, tier_of(&resolved.target), ok);
    }
    resp
}

/// The locality tier of a target, for the mode machine (remote = cloud).
pub(crate) fn tier_of(t: &Target) -> LocalityTier {
    match t {
        Target::Local(_) | Target::Site { .. } => LocalityTier::SameSite,
        Target::Cloud => LocalityTier::Cloud,
    }
}

/// A call to a cloud service through the hub's gateway; without the hub it
/// fails at once with 503 and `x-tidemesh-hub: unreachable` rather than
/// waiting on a link that is down.
async fn cloud(
    s: &Shared,
    who: &Caller<'_>,
    resolved: &resolve::Resolved,
    req: Request<Body>,
    limit: Duration,
    ev: &mut RequestEvidence,
) -> Response<Body> {
    let unreachable = |why: String| {
        let mut r = local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "hub unreachable: {} is a cloud service behind the hub gateway ({why})",
                resolved.host
            ),
            &[(HUB_STATUS, "unreachable".into())],
        );
        r.extensions_mut().insert(Neutral::HubUnreachable);
        r
    };
    if !s.h.hub.borrow().connected {
        s.counters()
            .hub_unreachable
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return unreachable("the spoke is disconnected".into());
    }
    let addr = match s.hub_address() {
        Ok(a) => a,
        Err(e) => return unreachable(e),
    };
    let server = naming::hub_id(&s.td);
    // The gateway chooses the endpoint; the header names no workload.
    let header = who.stream_header(&resolved.host, "cloud".into());
    let call = super::tunnel::call(s, who.idx, addr, &server, header, req, limit, ev);
    // A call in flight when the spoke finds the hub gone (the control
    // session's idle timeout) ends then, not at its own timeout.
    let mut hub = s.h.hub.clone();
    let link_lost = async move {
        // the control session publishes every change of the link
        let _ = hub.wait_for(|h| !h.connected).await;
    };
    let mut resp = tokio::select! {
        r = call => r,
        () = link_lost => {
            return unreachable("the link to the hub went down during the call".into());
        }
    };
    if resp.status() == StatusCode::BAD_GATEWAY && resp.headers().get(UPSTREAM).is_none() {
        // The gateway itself could not be reached (the hub answers with
        // x-tidemesh-upstream whenever it chose an endpoint).
        if !s.h.hub.borrow().connected {
            return unreachable("the link to the hub went down".into());
        }
    }
    if let Some(up) = resp.headers_mut().remove(UPSTREAM) {
        if let (Ok(up), Some(r)) = (up.to_str(), ev.routing_decision.as_mut()) {
            r.selected_endpoint = Some(up.to_owned());
        }
    }
    // The hub's TLS leg to the cloud endpoint (TLS origination): what it
    // negotiated goes with the routing decision, after the selection reason.
    if let Some(tls) = resp.headers_mut().remove(UPSTREAM_TLS) {
        if let (Ok(tls), Some(r)) = (tls.to_str(), ev.routing_decision.as_mut()) {
            r.selection_reason = format!("{}; upstream_tls={tls}", r.selection_reason);
        }
    }
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn trace_headers_replace_the_callers_and_drop_a_stale_parent() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba8-e457b5a2e4d86bd1-1"),
        );
        h.insert(
            trace::B3_PARENT,
            HeaderValue::from_static("05e3ac9a4f6e3b90"),
        );
        h.insert(trace::B3_SPAN, HeaderValue::from_static("e457b5a2e4d86bd1"));
        let root = trace::Span::start(None, [3; 24], || true);
        set_trace_headers(&mut h, &root);
        assert!(h.get("b3").is_none());
        assert!(
            h.get(trace::B3_PARENT).is_none(),
            "a new trace has no parent"
        );
        assert_eq!(h.get(trace::B3_SPAN).unwrap(), "0303030303030303");
        assert_eq!(
            h.get(trace::TRACEPARENT).unwrap().to_str().unwrap(),
            root.traceparent()
        );
        let child = trace::Span::start(Some(root.as_parent()), [4; 24], || true);
        set_trace_headers(&mut h, &child);
        assert_eq!(h.get(trace::B3_PARENT).unwrap(), "0303030303030303");
        assert_eq!(h.get_all(trace::B3_SPAN).iter().count(), 1);
    }

    #[test]
    fn a_request_id_is_kept_given_or_made() {
        let mut h = hyper::HeaderMap::new();
        h.insert(trace::REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(
            ensure_request_id(&mut h, Some("zzz")).as_deref(),
            Some("abc")
        );
        let mut h = hyper::HeaderMap::new();
        assert_eq!(
            ensure_request_id(&mut h, Some("given-1")).as_deref(),
            Some("given-1")
        );
        assert_eq!(h.get(trace::REQUEST_ID).unwrap(), "given-1");
        let mut h = hyper::HeaderMap::new();
        let made = ensure_request_id(&mut h, None).unwrap();
        assert_eq!(made.len(), 36);
        assert_eq!(&made[14..15], "4");
        assert_eq!(h.get(trace::REQUEST_ID).unwrap().to_str().unwrap(), made);
    }
}
