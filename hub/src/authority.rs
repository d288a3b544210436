//! The hub's rules for control requests: who gets which certificate.
//!
//! Who drives it: the connection handler in `lib.rs`, one call per request
//! stream. What it must not do: touch sockets. It reads the clock and the
//! store, signs, records the outcome in the audit log, and answers.
//!
//! | request        | connection           | rule |
//! |----------------|----------------------|------|
//! | Enroll         | no client cert       | valid single-use token bound to the CSR's spoke ID |
//! | Reestablish    | no client cert       | enrolled, not revoked, within the max-offline window, CSR key = pinned key, signature over the channel-bound challenge by that key |
//! | Hello/Ping     | node SVID            | not revoked |
//! | Renew          | node SVID            | not revoked, CSR key = pinned key |
//! | IssueWorkload  | node SVID            | not revoked, ID is `spiffe://TD/store/<own store>/sa/ACCOUNT` |

use std::time::{Duration, UNIX_EPOCH};

use tidemesh_identity::{
    naming::{self, MeshIdentity},
    svid, SpiffeId,
};
use tidemesh_proto::{ErrorCode, JoinToken, Request, Response};
use tracing::{info, warn};

use crate::{rfc3339_ms, store::TokenUse, AuditEntry, Hub, SpokeRecord};

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

impl Hub {
    fn audit_refusal(&self, subject: &str, detail: &str) {
        warn!(target: "tidemesh::audit", subject, detail, "request refused");
        let _ = self.inner.store.audit(&AuditEntry {
            at_ms: self.now_ms(),
            event: "refused".into(),
            subject: Some(subject.to_owned()),
            detail: detail.to_owned(),
        });
    }

    fn certificate(&self, chain: Vec<Vec<u8>>) -> Response {
        Response::Certificate {
            chain,
            bundle: vec![self.inner.ca.cert_der().to_vec()],
        }
    }

    /// Signs a CSR for `id` valid for `ttl` from now (backdated 60 s for
    /// clock skew). Returns the chain and its not_after in ms.
    fn sign(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Vec<Vec<u8>>, u64), svid::IssueError> {
        let now = self.inner.clock.now();
        // Never issue past the CA's own expiry.
        let ca_not_after = svid::cert_validity(&self.inner.ca.cert_der())?.1;
        let not_after = (now + ttl).min(ca_not_after);
        let leaf = self
            .inner
            .ca
            .sign_csr(csr, id, now - Duration::from_secs(60), not_after)?;
        let na = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok((vec![leaf.to_vec()], na))
    }
}

/// Answers one control request.
pub fn handle(
    hub: &Hub,
    conn: &quinn::Connection,
    node: Option<&SpiffeId>,
    req: Request,
) -> Response {
    match (node, req) {
        (None, Request::Enroll { token, spoke, csr }) => enroll(hub, &token, &spoke, &csr),
        (None, Request::Reestablish { spoke, csr, proof }) => {
            reestablish(hub, conn, &spoke, &csr, &proof)
        }
        (None, _) => err(
            ErrorCode::Forbidden,
            "this request needs a control session authenticated with the node SVID",
        ),
        (Some(id), req) => {
            let sid = id.to_string();
            if hub.is_revoked(&sid) {
                hub.audit_refusal(&sid, "request from a revoked spoke");
                return err(ErrorCode::Revoked, format!("{sid} is revoked"));
            }
            match req {
                Request::Hello { .. } => {
                    let now = hub.now_ms();
                    let _ = hub.inner.store.update_spoke(&sid, None, |r| r.last_seen_ms = now);
                    Response::Welcome { hub_time_unix_ms: now }
                }
                Request::Ping => Response::Pong,
                Request::Renew { csr } => renew(hub, id, &csr),
                Request::IssueWorkload { id: wid, csr } => issue_workload(hub, id, &wid, &csr),
                Request::SyncConfig { .. } | Request::Register { .. } | Request::EvidenceOpen => {
                    err(ErrorCode::BadRequest, "served by the session handler")
                }
                Request::EvidenceBatch { .. } | Request::EvidenceGap { .. } => err(
                    ErrorCode::BadRequest,
                    "evidence batches belong on an evidence session stream (EvidenceOpen first)",
                ),
                Request::Enroll { .. } | Request::Reestablish { .. } => err(
                    ErrorCode::BadRequest,
                    "already authenticated: enrollment and re-establishment use an anonymous connection",
                ),
            }
        }
    }
}

fn enroll(hub: &Hub, token: &str, spoke: &SpiffeId, csr: &[u8]) -> Response {
    // Only the secret matters to the hub; the rest of the token string is the
    // spoke's business. Accept either the whole token or its secret.
    let secret = JoinToken::parse(token)
        .map(|t| t.secret)
        .unwrap_or_else(|_| token.trim().to_owned());
    let sid = spoke.to_string();
    if spoke.trust_domain() != hub.trust_domain()
        || !matches!(naming::classify(spoke), Some(MeshIdentity::Node { .. }))
    {
        hub.audit_refusal(
            &sid,
            "enrollment for an ID that is not a node of this trust domain",
        );
        return err(
            ErrorCode::Forbidden,
            format!(
                "{sid} is not a spoke node ID of trust domain {}",
                hub.trust_domain()
            ),
        );
    }
    let key = match svid::csr_public_key(csr) {
        Ok(k) => k,
        Err(e) => return err(ErrorCode::BadRequest, format!("invalid CSR: {e}")),
    };
    let (chain, not_after) = match hub.sign(csr, spoke, hub.inner.cfg.node_ttl) {
        Ok(x) => x,
        Err(e) => return err(ErrorCode::BadRequest, format!("cannot sign CSR: {e}")),
    };
    let now = hub.now_ms();
    let record = SpokeRecord {
        pinned_key: key,
        enrolled_ms: now,
        cert_not_after_ms: not_after,
        last_seen_ms: now,
        revoked_ms: None,
    };
    let audit = AuditEntry {
        at_ms: now,
        event: "enrolled".into(),
        subject: Some(sid.clone()),
        detail: format!("node SVID until {}", rfc3339_ms(not_after)),
    };
    let hash = svid::sha256(secret.as_bytes());
    match hub
        .inner
        .store
        .consume_token(&hash, &sid, now, &record, &audit)
    {
        Ok(TokenUse::Enrolled) => {
            if let Ok(mut r) = hub.inner.revoked.write() {
                r.remove(&sid);
            }
            info!(target: "tidemesh::audit", spoke = %sid, "spoke enrolled");
            hub.certificate(chain)
        }
        Ok(TokenUse::Invalid) | Ok(TokenUse::Expired) => {
            hub.audit_refusal(&sid, "enrollment with an unknown, used or expired token");
            err(
                ErrorCode::InvalidToken,
                "invalid join token: unknown, already used or expired",
            )
        }
        Ok(TokenUse::Mismatch { bound }) => {
            hub.audit_refusal(&sid, &format!("token bound to {bound}; burned"));
            err(
                ErrorCode::TokenMismatch,
                format!("join token is bound to another spoke ID, not {sid}; it has been burned"),
            )
        }
        Err(e) => err(ErrorCode::Internal, format!("hub storage failed: {e}")),
    }
}

fn check_pinned(rec: &SpokeRecord, csr: &[u8]) -> Result<(), Response> {
    match svid::csr_public_key(csr) {
        Err(e) => Err(err(ErrorCode::BadRequest, format!("invalid CSR: {e}"))),
        Ok(k) if k != rec.pinned_key => Err(err(
            ErrorCode::KeyMismatch,
            "the CSR's key is not the key pinned at enrollment",
        )),
        Ok(_) => Ok(()),
    }
}

fn renew(hub: &Hub, id: &SpiffeId, csr: &[u8]) -> Response {
    let sid = id.to_string();
    let rec = match hub.inner.store.spoke(&sid) {
        Ok(Some(r)) => r,
        Ok(None) => return err(ErrorCode::NotEnrolled, format!("{sid} is not enrolled")),
        Err(e) => return err(ErrorCode::Internal, e.to_string()),
    };
    if let Err(resp) = check_pinned(&rec, csr) {
        hub.audit_refusal(&sid, "renewal with a key other than the pinned one");
        return resp;
    }
    issue_node(hub, id, csr, "renewed")
}

fn issue_node(hub: &Hub, id: &SpiffeId, csr: &[u8], event: &str) -> Response {
    let sid = id.to_string();
    let (chain, not_after) = match hub.sign(csr, id, hub.inner.cfg.node_ttl) {
        Ok(x) => x,
        Err(e) => return err(ErrorCode::BadRequest, format!("cannot sign CSR: {e}")),
    };
    let now = hub.now_ms();
    let audit = AuditEntry {
        at_ms: now,
        event: event.into(),
        subject: Some(sid.clone()),
        detail: format!("node SVID until {}", rfc3339_ms(not_after)),
    };
    match hub.inner.store.update_spoke(&sid, Some(&audit), |r| {
        r.cert_not_after_ms = not_after;
        r.last_seen_ms = now;
    }) {
        Ok(Some(_)) => {
            info!(target: "tidemesh::audit", spoke = %sid, event, "node SVID issued");
            hub.certificate(chain)
        }
        Ok(None) => err(ErrorCode::NotEnrolled, format!("{sid} is not enrolled")),
        Err(e) => err(ErrorCode::Internal, e.to_string()),
    }
}

fn issue_workload(hub: &Hub, node: &SpiffeId, wid: &SpiffeId, csr: &[u8]) -> Response {
    let Some(MeshIdentity::Node { store: own, .. }) = naming::classify(node) else {
        return err(
            ErrorCode::Forbidden,
            "only spoke nodes request workload SVIDs",
        );
    };
    let ok = wid.trust_domain() == hub.trust_domain()
        && matches!(naming::classify(wid), Some(MeshIdentity::Workload { ref store, .. }) if *store == own);
    if !ok {
        hub.audit_refusal(
            &wid.to_string(),
            &format!("workload SVID requested by {node} outside its store {own}"),
        );
        return err(
            ErrorCode::Forbidden,
            format!("{wid} is outside this spoke's store: only spiffe://{}/store/{own}/sa/ACCOUNT may be issued", hub.trust_domain()),
        );
    }
    let (chain, not_after) = match hub.sign(csr, wid, hub.inner.cfg.workload_ttl) {
        Ok(x) => x,
        Err(e) => return err(ErrorCode::BadRequest, format!("cannot sign CSR: {e}")),
    };
    // No certificate leaves the hub without its durable audit record.
    if let Err(e) = hub.inner.store.audit(&AuditEntry {
        at_ms: hub.now_ms(),
        event: "workload_issued".into(),
        subject: Some(wid.to_string()),
        detail: format!("for {node}, until {}", rfc3339_ms(not_after)),
    }) {
        return err(ErrorCode::Internal, format!("hub storage failed: {e}"));
    }
    hub.certificate(chain)
}

fn reestablish(
    hub: &Hub,
    conn: &quinn::Connection,
    spoke: &SpiffeId,
    csr: &[u8],
    proof: &[u8],
) -> Response {
    let sid = spoke.to_string();
    let rec = match hub.inner.store.spoke(&sid) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return err(
                ErrorCode::NotEnrolled,
                format!("{sid} is not enrolled: enroll with a join token"),
            )
        }
        Err(e) => return err(ErrorCode::Internal, e.to_string()),
    };
    if rec.revoked_ms.is_some() || hub.is_revoked(&sid) {
        hub.audit_refusal(&sid, "re-establishment by a revoked spoke");
        return err(ErrorCode::Revoked, format!("{sid} is revoked"));
    }
    let now = hub.now_ms();
    let offline = Duration::from_millis(now.saturating_sub(rec.last_seen_ms));
    if offline > hub.inner.cfg.max_offline {
        hub.audit_refusal(&sid, "re-establishment past the max-offline window");
        return err(
            ErrorCode::OfflineWindowExceeded,
            format!(
                "{sid} was out of contact for {} (since {}), beyond the max-offline window of {}: create a new join token and enroll again",
                humantime::format_duration(Duration::from_secs(offline.as_secs())),
                rfc3339_ms(rec.last_seen_ms),
                humantime::format_duration(hub.inner.cfg.max_offline)
            ),
        );
    }
    if let Err(resp) = check_pinned(&rec, csr) {
        hub.audit_refusal(
            &sid,
            "re-establishment with a key other than the pinned one",
        );
        return resp;
    }
    let challenge = match tidemesh_net::reestablish_challenge(conn, spoke) {
        Ok(c) => c,
        Err(e) => return err(ErrorCode::Internal, e.to_string()),
    };
    if svid::verify_signature(&rec.pinned_key, &challenge, proof).is_err() {
        hub.audit_refusal(&sid, "re-establishment with an invalid proof of possession");
        return err(
            ErrorCode::KeyMismatch,
            "proof of possession of the pinned key failed",
        );
    }
    issue_node(hub, spoke, csr, "reestablished")
}
