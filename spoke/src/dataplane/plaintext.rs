//! A workload's plaintext listener (`plaintext_inbound`): local clients
//! outside the mesh, admitted or refused by the workload's
//! `PeerAuthentication` mode.
//!
//! What it is: an HTTP listener per workload that sets `plaintext_inbound`.
//! Each request reads the mTLS mode in force for the workload's inbound
//! port from the config in force ([`tidemesh_policy::MeshConfig::peer_mtls`]:
//! port, workload, namespace, mesh, else STRICT), so a config change acts on
//! the next request without a restart. STRICT: 403 `mTLS required`, recorded
//! as a denial with reason `mtls_required`. PERMISSIVE or DISABLE: delivered
//! through [`super::inbound::deliver`] with no principal, so only rules
//! without a source can allow it. Either way the request's evidence record
//! has no client identity, TLS version `none`, an unverified chain, and a
//! `routing_decision.selection_reason` naming the listener, the mode and
//! the policy that set it. Who drives it: [`super::DataPlane::serve`]. What
//! it must not do: give a plaintext request an identity (any
//! `x-forwarded-client-cert` it sent is dropped by delivery), or deliver one
//! without reading the mode first.

use std::{sync::Arc, time::Instant};

use hyper::{body::Incoming, Request, Response, StatusCode};
use tidemesh_evidence::record::{
    AuthorizationEvidence, Decision, EnforcementPoint, IdentityEvidence, LbAlgorithm,
    RoutingEvidence, TlsVersion,
};
use tidemesh_policy::model::PeerMtls;
use tokio::time::timeout;

use super::{
    finish_from_response, inbound, local_response, outbound, span_random, trace, Body,
    DataPlaneError, LocalWorkload, Shared,
};

/// The `reason` of the authorization evidence of a refused plaintext request.
pub(crate) const MTLS_REQUIRED: &str = "mtls_required";

/// Binds every workload's `plaintext_inbound` listener.
pub(crate) async fn bind(
    workloads: &[LocalWorkload],
) -> Result<Vec<(usize, tokio::net::TcpListener)>, DataPlaneError> {
    let mut out = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        if let Some(addr) = w.plaintext {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DataPlaneError::Bind {
                    key: format!("workload[{i}].plaintext_inbound"),
                    addr,
                    source,
                })?;
            out.push((i, l));
        }
    }
    Ok(out)
}

/// Serves local clients of workload `idx` on `listener`.
pub(crate) async fn serve(s: Arc<Shared>, idx: usize, listener: tokio::net::TcpListener) {
    super::serve_apps_http(s, listener, "plaintext_inbound", move |s, req| async move {
        handle(&s, idx, req).await
    })
    .await
}

/// What a plaintext request is known by: nobody, over no TLS.
fn plaintext_identity(w: &LocalWorkload) -> IdentityEvidence {
    IdentityEvidence {
        client_identity: None,
        server_identity: Some(w.id.clone()),
        certificate_fingerprint: None,
        tls_version: TlsVersion::None,
        cipher_suite: None,
        trust_chain_verified: false,
        handshake_duration_us: None,
    }
}

/// The record's statement of how the request came in and which mode let it
/// in (or not).
fn listener_facts(w: &LocalWorkload, mtls: &PeerMtls, delivered: bool) -> RoutingEvidence {
    RoutingEvidence {
        load_balancing_algorithm: LbAlgorithm::LocalOnly,
        available_endpoints: Vec::new(),
        selected_endpoint: delivered
            .then(|| w.inbound.map(|a| a.to_string()))
            .flatten(),
        selection_reason: format!("plaintext_inbound no_peer_identity mtls_mode={mtls}"),
        locality: None,
        version: None,
    }
}

async fn handle(s: &Shared, idx: usize, mut req: Request<Incoming>) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let w = &s.workloads[idx];
    let parent = {
        let h = req.headers();
        trace::extract(&|n| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned))
    };
    let span = trace::Span::start(parent, span_random(), || s.h.modes.sample(&w.service));
    let operation = format!("{} {}", req.method(), req.uri().path());
    tidemesh_net::http::to_http1(&mut req);
    {
        let h = req.headers_mut();
        inbound::strip_hop_by_hop(h);
        outbound::set_trace_headers(h, &span);
        outbound::ensure_request_id(h, None);
    }
    let mut ev = s.new_evidence(
        &w.service,
        EnforcementPoint::SidecarInbound,
        &span,
        operation,
    );
    ev.identity = Some(plaintext_identity(w));
    let port = w.inbound.map(|a| a.port()).unwrap_or(0);
    let t0 = Instant::now();
    let (mtls, version) = {
        let c = s.compiled();
        (c.config.peer_mtls(&w.namespace, &w.labels, port), c.version)
    };
    let resp = if mtls.mode.accepts_plaintext() {
        ev.routing_decision = Some(listener_facts(w, &mtls, true));
        match timeout(
            s.settings.request_timeout,
            inbound::deliver(
                s,
                idx,
                None,
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
    } else {
        ev.routing_decision = Some(listener_facts(w, &mtls, false));
        ev.policy_evaluation = Some(AuthorizationEvidence {
            policy_name: mtls
                .policy
                .as_ref()
                .map(|p| format!("PeerAuthentication {p}"))
                .unwrap_or_else(|| "mesh-default".into()),
            policy_version: version
                .map(|v| v.to_string())
                .unwrap_or_else(|| "none".into()),
            matched_rule: None,
            final_decision: Decision::Deny,
            reason: MTLS_REQUIRED.into(),
            evaluation_time_us: t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
            cached: false,
        });
        local_response(
            StatusCode::FORBIDDEN,
            &format!(
                "mTLS required: {} accepts mesh callers only, mode {mtls}; call it through the mesh or set PERMISSIVE",
                w.id
            ),
            &[],
        )
    };
    finish_from_response(&mut ev, started, &resp);
    s.record(ev);
    resp
}
