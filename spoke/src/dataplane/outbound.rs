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

use std::{convert::Infallible, sync::Arc};

use hyper::{
    body::Incoming, header::HeaderValue, server::conn::http1, service::service_fn, Request,
    Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tidemesh_evidence::record::{EnforcementPoint, IdentityEvidence, TlsVersion};
use tidemesh_proto::data::{StreamHeader, StreamProtocol, TraceContext};
use tracing::{debug, warn};

use super::{
    finish_evidence, finish_from_response, inbound, local_response, new_evidence,
    resolve::{self, Target},
    span_random, trace, Body, DataSettings, Shared,
};

/// The HTTP/1.1 server settings every listener of the data plane uses.
pub(crate) fn http1_server(settings: &DataSettings) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(100);
    b
}

/// Accepts app connections on workload `caller`'s outbound listener.
pub(crate) async fn serve(s: Arc<Shared>, caller: usize, listener: tokio::net::TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = s.conn_limit.clone().try_acquire_owned() else {
            warn!(
                limit = s.settings.max_connections,
                "connection limit reached; refusing an app connection"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let s = s.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = {
                let s = s.clone();
                service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(handle(&s, caller, req).await) }
                })
            };
            if let Err(e) = http1_server(&s.settings)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "app connection ended");
            }
        });
    }
}

fn header_string(h: &hyper::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Sets `x-request-id` when absent; returns it.
pub(crate) fn ensure_request_id(h: &mut hyper::HeaderMap, given: Option<&str>) -> Option<String> {
    if let Some(v) = header_string(h, trace::REQUEST_ID) {
        return Some(v);
    }
    let id = given
        .map(str::to_owned)
        .unwrap_or_else(|| trace::new_request_id(rand::random()));
    let v = HeaderValue::from_str(&id).ok()?;
    h.insert(trace::REQUEST_ID, v);
    Some(id)
}

/// Writes this hop's span into the request headers (replacing the caller's).
pub(crate) fn set_trace_headers(h: &mut hyper::HeaderMap, span: &trace::Span) {
    h.remove(trace::B3_SINGLE);
    h.remove(trace::B3_PARENT);
    for (k, v) in span.headers() {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
}

async fn handle(s: &Shared, caller: usize, mut req: Request<Incoming>) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let w = &s.workloads[caller];
    let parent = {
        let h = req.headers();
        trace::extract(&|n| header_string(h, n))
    };
    let span = trace::Span::start(parent, span_random());
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let operation = format!("{} {}", req.method(), req.uri().path());
    let headers = req.headers_mut();
    inbound::strip_hop_by_hop(headers);
    // Identity is the spoke's to assert, never the app's.
    headers.remove(inbound::XFCC);
    set_trace_headers(headers, &span);
    let request_id = ensure_request_id(headers, None);

    let Some(host) = host else {
        let mut ev = new_evidence(
            "",
            EnforcementPoint::SidecarOutbound,
            s.mode(),
            &span,
            operation,
        );
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
    let resolved = resolve::resolve(
        s,
        &host,
        &w.namespace,
        req.method().as_str(),
        &path,
        &inbound::Headers(req.headers()),
    );
    let resolved = match resolved {
        Ok(r) => r,
        Err(u) => {
            let mut ev = new_evidence(
                &u.host,
                EnforcementPoint::SidecarOutbound,
                s.mode(),
                &span,
                operation,
            );
            ev.routing_decision = u.evidence.map(|e| *e);
            let r = local_response(u.status, &u.reason, &[]);
            finish_evidence(&mut ev, started, r.status(), &u.reason);
            s.record(ev);
            return r;
        }
    };
    let mut ev = new_evidence(
        &resolved.host,
        EnforcementPoint::SidecarOutbound,
        s.mode(),
        &span,
        operation,
    );
    ev.routing_decision = Some(resolved.evidence);
    let resp = match resolved.target {
        Target::Local(i) => {
            let target = &s.workloads[i];
            ev.identity = Some(IdentityEvidence {
                client_identity: Some(w.id.clone()),
                server_identity: Some(target.id.clone()),
                // The SVID the spoke vouches with for the caller.
                certificate_fingerprint: s.svid(caller).map(|i| i.fingerprint),
                tls_version: TlsVersion::None,
                cipher_suite: None,
                trust_chain_verified: false,
                handshake_duration_us: None,
            });
            let limit = resolved.timeout.unwrap_or(s.settings.request_timeout);
            match tokio::time::timeout(limit, inbound::deliver(s, i, Some(&w.id), req, &mut ev))
                .await
            {
                Ok(r) => r,
                Err(_) => local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("no response within the route timeout of {limit:?}"),
                    &[],
                ),
            }
        }
        Target::Site {
            addr,
            server,
            account,
        } => {
            let header = StreamHeader {
                service: resolved.host.clone(),
                workload: account,
                protocol: StreamProtocol::Http1,
                trace: Some(TraceContext {
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    sampled: span.sampled,
                }),
                request_id: request_id.filter(|r| {
                    r.len() <= tidemesh_proto::data::MAX_REQUEST_ID
                        && !r.is_empty()
                        && r.bytes().all(|b| b.is_ascii_graphic())
                }),
            };
            let limit = resolved.timeout.unwrap_or(s.settings.request_timeout);
            super::tunnel::call(s, caller, addr, &server, header, req, limit, &mut ev).await
        }
    };
    finish_from_response(&mut ev, started, &resp);
    s.record(ev);
    resp
}
