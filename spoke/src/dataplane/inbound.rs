//! Delivery to a workload of this spoke: authorization, the workload's rate
//! limit, `x-forwarded-client-cert`, then the workload's own HTTP listener.
//!
//! What it is: the last hop of every call, from the tunnel (a peer spoke's
//! workload, principal from mTLS) or from this spoke's outbound path (a
//! co-located workload, principal = the calling workload's ID). Who drives
//! it: [`super::tunnel`] and [`super::outbound`]. What it must not do: let
//! a request through without a decision, or let the caller choose the
//! identity the workload sees (any `x-forwarded-client-cert` it sent is
//! replaced).

use std::time::Instant;

use http_body_util::BodyExt;
use hyper::{body::Incoming, header::HeaderValue, Request, Response, StatusCode};
use tidemesh_evidence::record::{AuthorizationEvidence, Decision, RequestEvidence};
use tidemesh_identity::SpiffeId;
use tidemesh_policy::{AuthzRequest, HeaderLookup, WorkloadRef};
use tokio::time::timeout;
use tracing::debug;

use super::{local_response, Body, Shared};

/// `x-forwarded-client-cert`.
pub const XFCC: &str = "x-forwarded-client-cert";

/// hyper's header map as the policy evaluators read headers.
pub(crate) struct Headers<'a>(pub &'a hyper::HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the `Connection` header
/// names: never forwarded.
pub(crate) fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    let named: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// Authorizes, rate-limits and forwards `req` to local workload `idx`,
/// filling `ev`'s policy and rate-limit evidence. `principal` is the
/// verified caller (`None`: unauthenticated, which no principal rule matches).
pub(crate) async fn deliver(
    s: &Shared,
    idx: usize,
    principal: Option<&SpiffeId>,
    mut req: Request<Incoming>,
    ev: &mut RequestEvidence,
) -> Response<Body> {
    let w = &s.workloads[idx];
    let Some(inbound) = w.inbound else {
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("workload {} has no inbound address", w.account),
            &[],
        );
    };
    // Authorization (Istio semantics; the mesh default decides when no ALLOW
    // policy selects the workload).
    let compiled = s.compiled();
    let principal_str = principal.map(|p| {
        let s = p.to_string();
        s.strip_prefix("spiffe://").unwrap_or(&s).to_owned()
    });
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let t0 = Instant::now();
    let verdict = compiled.policies.decide(&AuthzRequest {
        workload: WorkloadRef {
            namespace: &w.namespace,
            labels: &w.labels,
        },
        source_principal: principal_str.as_deref(),
        source_namespace: None,
        method: req.method().as_str(),
        path: &path,
        port: inbound.port(),
        headers: &Headers(req.headers()),
    });
    let eval_us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    let policy = verdict
        .policy
        .and_then(|i| compiled.policies.policies().get(i));
    let policy_name = policy
        .map(|p| format!("{}/{}", p.id.namespace, p.id.name))
        .unwrap_or_else(|| "mesh-default".into());
    ev.policy_evaluation = Some(AuthorizationEvidence {
        policy_name: policy_name.clone(),
        policy_version: compiled
            .version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "none".into()),
        matched_rule: verdict.rule_index.map(|r| r.to_string()),
        final_decision: if verdict.allowed {
            Decision::Allow
        } else {
            Decision::Deny
        },
        reason: verdict.reason.as_str().to_owned(),
        evaluation_time_us: eval_us,
        cached: false,
    });
    if !verdict.allowed {
        let who = principal
            .map(|p| p.to_string())
            .unwrap_or_else(|| "an unauthenticated caller".into());
        return local_response(
            StatusCode::FORBIDDEN,
            &format!(
                "RBAC: access denied: {} ({policy_name}) for {who} calling {} {} on {}",
                verdict.reason.as_str(),
                req.method(),
                req.uri().path(),
                w.id
            ),
            &[],
        );
    }
    // The workload's local rate limit.
    if let Some(l) = &w.limiter {
        let check = match l.lock() {
            Ok(mut b) => b.handle_request(Instant::now()),
            Err(_) => {
                return local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "rate limiter unavailable",
                    &[],
                )
            }
        };
        ev.rate_limit_check = Some(check.evidence.clone());
        if let Some(after) = check.retry_after {
            return local_response(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "local rate limit of {} exceeded ({} requests/s)",
                    w.account, check.evidence.limit
                ),
                &[("retry-after", after.as_secs().to_string())],
            );
        }
    }
    // The verified identity, Envoy style; whatever the caller sent is dropped.
    let h = req.headers_mut();
    h.remove(XFCC);
    if let Some(p) = principal {
        if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={p}", w.id)) {
            h.insert(XFCC, v);
        }
    }
    forward(s, inbound, req, s.settings.request_timeout).await
}

/// Sends `req` to a workload's HTTP listener and returns its response
/// (502 when it cannot be reached, 504 when it does not answer in time).
pub(crate) async fn forward(
    s: &Shared,
    addr: std::net::SocketAddr,
    req: Request<Incoming>,
    limit: std::time::Duration,
) -> Response<Body> {
    let stream = match timeout(
        s.settings.connect_timeout,
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => {
            return local_response(
                StatusCode::BAD_GATEWAY,
                &format!("workload at {addr} refused the connection: {e}"),
                &[],
            )
        }
        Err(_) => {
            return local_response(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "workload at {addr}: no connection within {:?}",
                    s.settings.connect_timeout
                ),
                &[],
            )
        }
    };
    let _ = stream.set_nodelay(true);
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended");
            }
        });
        sender.send_request(req).await
    };
    match timeout(limit, exchange).await {
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            resp.map(|b| b.boxed())
        }
        Ok(Err(e)) => local_response(
            StatusCode::BAD_GATEWAY,
            &format!("workload at {addr}: {e}"),
            &[],
        ),
        Err(_) => local_response(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("workload at {addr}: no response within {limit:?}"),
            &[],
        ),
    }
}
