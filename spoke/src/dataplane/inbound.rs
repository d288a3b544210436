//! Delivery to a workload of this spoke: the path check, request
//! authentication (JWT, Istio `RequestAuthentication`), authorization, the
//! workload's rate limit, `x-forwarded-client-cert`, then the workload's own
//! HTTP listener.
//!
//! What it is: the last hop of every call, from the tunnel (a peer spoke's
//! workload, principal from mTLS) or from this spoke's outbound path (a
//! co-located workload, principal = the calling workload's ID). Who drives
//! it: [`super::tunnel`] and [`super::outbound`]. What it must not do: let
//! a request through without a decision, forward a path other than the one
//! authorized (ambiguous encodings get 400, see
//! [`tidemesh_policy::check_path`]), or let the caller choose the identity
//! the workload sees (any `x-forwarded-client-cert` it sent is replaced,
//! and so is any claim header a `RequestAuthentication` sets: a caller
//! cannot inject a user).

use std::time::Instant;

use http_body_util::BodyExt;
use hyper::{header::HeaderValue, Request, Response, StatusCode};
use tidemesh_evidence::record::{
    AuthorizationEvidence, ClaimVerification, Decision, RequestEvidence, UserIdentityEvidence,
    UserIdentityKind,
};
use tidemesh_evidence::UnixMillis;
use tidemesh_identity::SpiffeId;
use tidemesh_policy::reqauthn::{AuthnOutcome, RequestAuth};
use tidemesh_policy::{check_path, AuthzRequest, HeaderLookup, NoHeaders, WorkloadRef};
use tokio::time::timeout;
use tracing::debug;

use super::{local_response, resilience::Outcome, Body, Shared};
use crate::config::WorkloadProtocol;

pub(crate) use tidemesh_net::http::{strip_hop_by_hop, XFCC};

/// hyper's header map as the policy evaluators read headers.
pub(crate) struct Headers<'a>(pub &'a hyper::HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The HTTP facts an L7 decision reads.
pub(crate) struct L7<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a dyn HeaderLookup,
    /// A verified JWT's facts (request principal, claims).
    pub auth: Option<&'a RequestAuth>,
}

/// Clock skew allowed on a token's `exp` and `nbf`, seconds (the spoke's
/// time is its trusted clock).
pub(crate) const JWT_LEEWAY_S: u64 = 60;

/// The authorization decision (Istio semantics; the mesh default decides
/// when no ALLOW policy selects the workload) for `principal` calling local
/// workload `idx` on `port`: L7 with the request's facts, or L4 (raw TCP,
/// [`tidemesh_policy::CompiledPolicies::decide_l4`]) without. Fills `ev`'s
/// policy evidence; `Err` starts the denial's reason ("RBAC: access
/// denied: ... for <caller>").
pub(crate) fn authorize(
    s: &Shared,
    idx: usize,
    principal: Option<&SpiffeId>,
    port: u16,
    l7: Option<L7<'_>>,
    ev: &mut RequestEvidence,
) -> Result<(), String> {
    let w = &s.workloads[idx];
    let compiled = s.compiled();
    let principal_str = principal.map(|p| {
        let s = p.as_str();
        s.strip_prefix("spiffe://").unwrap_or(s)
    });
    let source_ns = principal.and_then(|p| s.caller_namespace(p));
    let t0 = Instant::now();
    let mut req = AuthzRequest {
        workload: WorkloadRef {
            namespace: &w.namespace,
            labels: &w.labels,
        },
        source_principal: principal_str,
        source_namespace: source_ns.as_deref(),
        method: "",
        path: "",
        port,
        headers: &NoHeaders,
        request_auth: None,
    };
    let l7_auth = l7.as_ref().and_then(|h| h.auth);
    let verdict = match l7 {
        Some(h) => {
            req.method = h.method;
            req.path = h.path;
            req.headers = h.headers;
            req.request_auth = h.auth;
            compiled.policies.decide(&req)
        }
        None => compiled.policies.decide_l4(&req),
    };
    let eval_us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    let policy_name = verdict
        .policy
        .and_then(|i| compiled.policies.policies().get(i))
        .map(|p| format!("{}/{}", p.id.namespace, p.id.name))
        .unwrap_or_else(|| "mesh-default".into());
    let denial = (!verdict.allowed).then(|| policy_name.clone());
    ev.policy_evaluation = Some(AuthorizationEvidence {
        policy_name,
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
    let Some(policy_name) = denial else {
        return Ok(());
    };
    let mut who = principal
        .map(|p| p.to_string())
        .unwrap_or_else(|| "an unauthenticated caller".into());
    if let Some(a) = l7_auth {
        who.push_str(&format!(" (request principal {})", a.principal));
    }
    Err(format!(
        "RBAC: access denied: {} ({policy_name}) for {who}",
        verdict.reason.as_str()
    ))
}

/// Authorizes, rate-limits and forwards `req` to local workload `idx`,
/// filling `ev`'s policy and rate-limit evidence. `principal` is the
/// verified caller (`None`: unauthenticated, which no principal rule matches).
pub(crate) async fn deliver(
    s: &Shared,
    idx: usize,
    principal: Option<&SpiffeId>,
    mut req: Request<Body>,
    ev: &mut RequestEvidence,
) -> Response<Body> {
    let w = &s.workloads[idx];
    let (Some(inbound), Some(authority)) = (w.inbound, &w.inbound_authority) else {
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("workload {} has no inbound address", w.account),
            &[],
        );
    };
    if w.protocol == WorkloadProtocol::Tcp {
        return local_response(
            StatusCode::BAD_GATEWAY,
            &format!(
                "workload {} speaks raw TCP (protocol = \"tcp\"): call it through a tcp_outbound listener",
                w.account
            ),
            &[],
        );
    }
    // The path authorized is the path forwarded: ambiguous encodings are
    // refused, the rest is put in normal form before either happens.
    let raw = tidemesh_net::http::path_and_query(req.uri());
    let path = match check_path(&raw) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            return local_response(
                StatusCode::BAD_REQUEST,
                &format!("refused by the mesh at {}: {e}", w.id),
                &[],
            )
        }
    };
    if path != raw {
        if let Err(e) = set_path(&mut req, &path) {
            return local_response(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {e}"),
                &[],
            );
        }
    }
    // Request authentication: before authorization (which reads its
    // principal and claims) and before any header condition is checked.
    let authn = match authenticate(s, idx, &mut req, ev) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let l7 = L7 {
        method: req.method().as_str(),
        path: &path,
        headers: &Headers(req.headers()),
        auth: authn.as_ref(),
    };
    if let Err(why) = authorize(s, idx, principal, inbound.port(), Some(l7), ev) {
        return local_response(
            StatusCode::FORBIDDEN,
            &format!(
                "{why} calling {} {} on {}",
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
    let h2 = w.protocol == WorkloadProtocol::Http2;
    forward(s, inbound, authority, h2, req, s.settings.request_timeout).await
}

/// Authenticates `req` for local workload `idx` by the
/// `RequestAuthentication`s that select it (Istio semantics, see
/// [`tidemesh_policy::reqauthn`]): `Ok(None)` without a token (or when none
/// applies), `Ok(Some(..))` for a verified token, `Err(401)` for a present
/// token that does not verify. The caller's own values of every claim
/// header are removed first; a verified token's claim headers are set, and
/// the token removed unless its rule forwards it. Fills `ev`'s user
/// identity (a claim, verified by JWT) or, on a 401, its policy evidence.
fn authenticate(
    s: &Shared,
    idx: usize,
    req: &mut Request<Body>,
    ev: &mut RequestEvidence,
) -> Result<Option<RequestAuth>, Box<Response<Body>>> {
    let w = &s.workloads[idx];
    let compiled = s.compiled();
    if compiled.authn.is_empty() {
        return Ok(None);
    }
    let now_ms = crate::unix_ms(s.now());
    let t0 = Instant::now();
    let outcome = compiled.authn.authenticate(
        &w.namespace,
        &w.labels,
        &Headers(req.headers()),
        now_ms / 1000,
        JWT_LEEWAY_S,
    );
    let h = req.headers_mut();
    for name in compiled.authn.claim_header_names(&w.namespace, &w.labels) {
        h.remove(name.as_str());
    }
    match outcome {
        AuthnOutcome::NotApplicable | AuthnOutcome::NoToken => Ok(None),
        AuthnOutcome::Failed(f) => {
            let eval_us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            ev.policy_evaluation = Some(AuthorizationEvidence {
                policy_name: format!("RequestAuthentication {}", f.policies),
                policy_version: compiled
                    .version
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "none".into()),
                matched_rule: None,
                final_decision: Decision::Deny,
                reason: format!("jwt_invalid: {}", f.reason),
                evaluation_time_us: eval_us,
                cached: false,
            });
            Err(Box::new(local_response(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "Jwt verification fails: {} (RequestAuthentication {} for {})",
                    f.reason, f.policies, w.id
                ),
                &[(
                    "www-authenticate",
                    "Bearer error=\"invalid_token\"".to_owned(),
                )],
            )))
        }
        AuthnOutcome::Verified(a) => {
            let age = a
                .jwks_read_ms
                .or(compiled.hub_applied_ms)
                .map(|t| now_ms.saturating_sub(t) / 1000);
            let clip = |v: &str| v.chars().take(256).collect::<String>();
            ev.user_identity = Some(UserIdentityEvidence {
                kind: UserIdentityKind::Claim,
                verified_by: ClaimVerification::Jwt,
                issuer: clip(&a.verified.issuer),
                subject: a.verified.subject.as_deref().map(clip),
                algorithm: a.verified.alg.as_str().to_owned(),
                key_id: a.verified.kid.as_deref().map(clip),
                policy: a.policy.clone(),
                expires_at: UnixMillis(a.verified.expires.saturating_mul(1000)),
                jwks_age_s: age,
            });
            for (name, value) in &a.claim_headers {
                if let (Ok(n), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    h.insert(n, v);
                }
            }
            if !a.forward_original_token {
                h.remove(a.token_header.as_str());
            }
            Ok(Some(a.auth))
        }
    }
}

/// Replaces `req`'s path and query with `target` (a checked `/path?query`).
fn set_path<B>(req: &mut Request<B>, target: &str) -> Result<(), hyper::http::Error> {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query = Some(hyper::http::uri::PathAndQuery::try_from(target)?);
    *req.uri_mut() = hyper::Uri::from_parts(parts)?;
    Ok(())
}

/// Sends `req` to a workload's HTTP listener (HTTP/2 when `h2`) over the
/// pooled client and
/// returns its response (502 when it cannot be reached, 504 when it does
/// not answer in time); proxy-made failures carry their [`Outcome`].
pub(crate) async fn forward(
    s: &Shared,
    addr: std::net::SocketAddr,
    authority: &hyper::http::uri::Authority,
    h2: bool,
    mut req: Request<Body>,
    limit: std::time::Duration,
) -> Response<Body> {
    // http://ADDR/path?query, from the request's own path (no re-parse)
    let mut target = std::mem::take(req.uri_mut()).into_parts();
    target.scheme = Some(hyper::http::uri::Scheme::HTTP);
    target.authority = Some(authority.clone());
    if target.path_and_query.is_none() {
        target.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    match hyper::Uri::from_parts(target) {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => {
            return local_response(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {e}"),
                &[],
            )
        }
    }
    let failed = |status, outcome: Outcome, reason: String| {
        let mut r = local_response(status, &reason, &[]);
        r.extensions_mut().insert(outcome);
        r
    };
    let client = if h2 {
        *req.version_mut() = hyper::Version::HTTP_2;
        // HTTP/2 names the authority in the URI; Host would be a
        // connection-specific duplicate.
        req.headers_mut().remove(hyper::header::HOST);
        &s.client_h2
    } else {
        &s.client
    };
    match timeout(limit, client.request(req)).await {
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            tidemesh_net::http::announce_grpc_trailers(resp.headers_mut());
            resp.map(|b| b.boxed())
        }
        Ok(Err(e)) if e.is_connect() => failed(
            StatusCode::BAD_GATEWAY,
            Outcome::ConnectFailure,
            format!("workload at {addr} refused the connection: {e}"),
        ),
        Ok(Err(e)) => {
            debug!(error = %e, %addr, "upstream request failed");
            failed(
                StatusCode::BAD_GATEWAY,
                Outcome::Reset,
                format!("workload at {addr}: {e}"),
            )
        }
        Err(_) => failed(
            StatusCode::GATEWAY_TIMEOUT,
            Outcome::Timeout,
            format!("workload at {addr}: no response within {limit:?}"),
        ),
    }
}
