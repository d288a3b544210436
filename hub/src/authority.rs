//! The hub's rules for control requests: who gets which certificate.
//!
//! Who drives it: the connection handler in `lib.rs`, one call per request
//! stream. What it must not do: touch sockets, or write anything durable
//! for a caller that has proved nothing. It reads the clock and the store,
//! signs, records the outcome in the audit log, and answers.
//!
//! # Refusals
//! A refusal of an anonymous caller is counted in memory and logged at a
//! bounded rate ([`crate::refusals`]), never written per attempt: a wrong,
//! used or expired token, a bad CSR, an unknown node ID, a bad proof of
//! possession. The checks run cheapest and least trusting first: Enroll
//! checks its join token (exists, unused, unexpired, bound to the ID asked
//! for: [`CheckedToken`]) before it parses a CSR or signs anything;
//! Reestablish verifies the proof of possession of the pinned key before
//! it looks at revocation, the max-offline window or the CSR. What follows
//! a proof (a valid token, the pinned key, a node SVID) is audited, at most
//! once per subject and reason per ten minutes. Writes a token can cause
//! are bounded by the tokens the operator created: burning an expired or
//! mismatched one (one audit entry), and the first replay of a used or
//! burned one (one audit entry per token; later replays are counted only).
//!
//! | request        | connection           | rule |
//! |----------------|----------------------|------|
//! | Enroll         | no client cert       | valid single-use token bound to the spoke ID asked for (checked before the CSR); then the CSR |
//! | Reestablish    | no client cert       | enrolled; signature over the channel-bound challenge by the pinned key (checked first); then not revoked, within the max-offline window, CSR key = pinned key |
//! | EnrollNode     | no client cert       | as Enroll; neither key on the revocation list; the node CA key differs from the node key |
//! | any below      | node SVID            | not revoked; the connection's key = pinned key |
//! | Hello/Ping     | node SVID            | |
//! | Renew          | node SVID            | CSR key = pinned key |
//! | IssueNodeCa    | node SVID            | CA key not on the revocation list |
//! | IssueWorkload  | node SVID            | refused: workload SVIDs come from the spoke's node CA |
//! | TimeAnchor     | node SVID            | |
//! | Report         | node SVID            | |
//!
//! Node CAs live for the max-offline window (`serve --max-offline`) from
//! issue, never past the hub CA's own expiry; the spoke renews its node CA
//! at half life while connected.

use std::time::{Duration, UNIX_EPOCH};

use tidemesh_identity::{
    naming::{self, MeshIdentity},
    svid,
    trusted_time::{SignedTimeAnchor, TimeAnchor},
    SpiffeId,
};
use tidemesh_proto::{ErrorCode, IssuePolicy, JoinToken, Request, Response};
use tracing::{info, warn};

use crate::{
    refusals::{Kind, Reason, RefusedRequest},
    rfc3339_ms,
    store::{NodeCaRecord, TokenOutcome, TokenState, TokenUse},
    AuditEntry, Hub, SpokeRecord,
};

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

impl Hub {
    /// Counts a refusal of a caller that proved nothing, with a log line at a
    /// bounded rate; writes nothing durable.
    pub(crate) fn refused(&self, kind: Kind, subject: &str) {
        let now = self.now_ms();
        let due = match self.inner.refusals.lock() {
            Ok(mut b) => b.handle_refusal(now, kind),
            Err(p) => p.into_inner().handle_refusal(now, kind),
        };
        if let Some(suppressed) = due {
            warn!(
                request = kind.0.as_str(),
                reason = kind.1.as_str(),
                subject,
                suppressed,
                "request refused (counted; at most one line per request and reason every 10 s)"
            );
        }
    }

    /// Counts a refusal of a caller that proved an identity (a node SVID, a
    /// valid join token, the pinned key), and audits it at most once per
    /// subject and reason per audit period.
    fn audit_refusal(&self, kind: Kind, subject: &str, detail: &str) {
        let now = self.now_ms();
        let (due_log, due_audit) = {
            let mut b = match self.inner.refusals.lock() {
                Ok(b) => b,
                Err(p) => p.into_inner(),
            };
            (b.handle_refusal(now, kind), b.audit_due(now, subject, kind))
        };
        if !due_audit {
            if let Some(suppressed) = due_log {
                warn!(
                    request = kind.0.as_str(),
                    reason = kind.1.as_str(),
                    subject,
                    suppressed,
                    detail,
                    "request refused (audited before; counted)"
                );
            }
            return;
        }
        warn!(target: "tidemesh::audit", subject, detail, reason = kind.1.as_str(), "request refused");
        let _ = self.inner.store.audit(&AuditEntry {
            at_ms: now,
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

    /// What spokes are told about the certificates they issue themselves.
    fn issue_policy(&self) -> IssuePolicy {
        IssuePolicy {
            workload_ttl_ms: self.inner.cfg.workload_ttl.as_millis() as u64,
            max_offline_ms: self.inner.cfg.max_offline.as_millis() as u64,
        }
    }

    /// A node CA for `node` with the key in `csr`, valid for the
    /// max-offline window from now (backdated 60 s), recorded with its
    /// audit entry. Returns the certificate DER.
    fn issue_node_ca(
        &self,
        csr: &[u8],
        node: &SpiffeId,
        event: &str,
    ) -> Result<Vec<u8>, Box<Response>> {
        let sid = node.to_string();
        let now = self.inner.clock.now();
        let cert = self
            .inner
            .ca
            .issue_node_ca(
                csr,
                node,
                now - Duration::from_secs(60),
                now + self.inner.cfg.max_offline,
            )
            .map_err(|e| {
                err(
                    ErrorCode::BadRequest,
                    format!("cannot sign the node CA CSR: {e}"),
                )
            })?;
        let fingerprint = svid::cert_key_fingerprint(&cert)
            .map_err(|e| Box::new(err(ErrorCode::Internal, e.to_string())))?;
        let not_after_ms = svid::cert_validity(&cert)
            .map(|(_, na)| crate::unix_ms(na))
            .map_err(|e| Box::new(err(ErrorCode::Internal, e.to_string())))?;
        let now_ms = self.now_ms();
        let audit = AuditEntry {
            at_ms: now_ms,
            event: event.into(),
            subject: Some(sid.clone()),
            detail: format!(
                "node CA key {} until {}",
                &svid::hex(&fingerprint)[..16],
                rfc3339_ms(not_after_ms)
            ),
        };
        let record = NodeCaRecord {
            key_fingerprint: fingerprint,
            issued_ms: now_ms,
            not_after_ms,
        };
        match self.inner.store.add_node_ca(&sid, record, now_ms, &audit) {
            Ok(true) => {
                info!(target: "tidemesh::audit", spoke = %sid, until = %rfc3339_ms(not_after_ms), "node CA issued");
                Ok(cert.to_vec())
            }
            Ok(false) => Err(Box::new(err(
                ErrorCode::Revoked,
                format!("{sid} is revoked or not enrolled"),
            ))),
            Err(e) => Err(Box::new(err(
                ErrorCode::Internal,
                format!("hub storage failed: {e}"),
            ))),
        }
    }

    /// A time anchor for `node`, signed with the CA key.
    fn time_anchor(&self, node: &SpiffeId) -> Result<SignedTimeAnchor, Box<Response>> {
        TimeAnchor {
            node: node.clone(),
            hub_ms: self.now_ms(),
        }
        .sign(&self.inner.ca)
        .map_err(|e| {
            Box::new(err(
                ErrorCode::Internal,
                format!("cannot sign a time anchor: {e}"),
            ))
        })
    }

    /// Whether the key in `csr` is on the revocation list.
    fn key_revoked(&self, csr: &[u8]) -> bool {
        match (svid::csr_public_key(csr), self.inner.revocations.current()) {
            (Ok(k), Some(list)) => list.key_revoked(&svid::sha256(&k)),
            (Ok(_), None) => true,
            (Err(_), _) => false,
        }
    }
}

/// The public key (uncompressed point) of the certificate the peer
/// presented on `conn`.
fn peer_key(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    svid::cert_public_key(certs.first()?).ok()
}

/// Answers one control request.
pub fn handle(
    hub: &Hub,
    conn: &quinn::Connection,
    node: Option<&SpiffeId>,
    req: Request,
) -> Response {
    match (node, req) {
        (None, Request::Enroll { token, spoke, csr }) => enroll(hub, &token, &spoke, &csr, None),
        (
            None,
            Request::EnrollNode {
                token,
                spoke,
                csr,
                ca_csr,
            },
        ) => enroll(hub, &token, &spoke, &csr, Some(&ca_csr)),
        (None, Request::Reestablish { spoke, csr, proof }) => {
            reestablish(hub, conn, &spoke, &csr, &proof)
        }
        (None, _) => {
            hub.refused(
                (RefusedRequest::Anonymous, Reason::NeedsSession),
                &conn.remote_address().to_string(),
            );
            err(
                ErrorCode::Forbidden,
                "this request needs a control session authenticated with the node SVID",
            )
        }
        (Some(id), req) => {
            let sid = id.to_string();
            if hub.is_revoked(&sid) {
                hub.audit_refusal(
                    (RefusedRequest::Session, Reason::Revoked),
                    &sid,
                    "request from a revoked spoke",
                );
                return err(ErrorCode::Revoked, format!("{sid} is revoked"));
            }
            let rec = match hub.inner.store.spoke(&sid) {
                Ok(Some(r)) => r,
                Ok(None) => return err(ErrorCode::NotEnrolled, format!("{sid} is not enrolled")),
                Err(e) => return err(ErrorCode::Internal, e.to_string()),
            };
            // The handshake proved the peer holds the key of its certificate;
            // that key must be the one pinned at enrollment (a certificate of
            // an earlier enrollment of the same ID does not count).
            if peer_key(conn).as_deref() != Some(rec.pinned_key.as_slice()) {
                hub.audit_refusal(
                    (RefusedRequest::Session, Reason::KeyMismatch),
                    &sid,
                    "control request on a connection whose key is not the pinned key",
                );
                return err(
                    ErrorCode::KeyMismatch,
                    "this connection's certificate key is not the key pinned at enrollment",
                );
            }
            match req {
                Request::Hello { .. } => {
                    let now = hub.now_ms();
                    let _ = hub.inner.store.update_spoke(&sid, None, &mut |r| r.last_seen_ms = now);
                    Response::Welcome { hub_time_unix_ms: now }
                }
                Request::Ping => Response::Pong,
                Request::Renew { csr } => renew(hub, id, &rec, &csr),
                Request::IssueNodeCa { csr } => {
                    if hub.key_revoked(&csr) {
                        hub.audit_refusal((RefusedRequest::Session, Reason::KeyRevoked), &sid, "node CA request with a revoked key");
                        return err(ErrorCode::KeyRevoked, "this key is on the revocation list: generate a new one");
                    }
                    match hub.issue_node_ca(&csr, id, "node_ca_issued") {
                        Ok(cert) => Response::NodeCa {
                            cert,
                            policy: hub.issue_policy(),
                        },
                        Err(resp) => *resp,
                    }
                }
                Request::IssueWorkload { id: wid, .. } => {
                    hub.audit_refusal((RefusedRequest::Session, Reason::WorkloadFromHub), &wid.to_string(), &format!("hub-issued workload SVID requested by {id}"));
                    err(
                        ErrorCode::BadRequest,
                        "workload SVIDs are issued by the spoke's own node CA (IssueNodeCa); upgrade this spoke",
                    )
                }
                Request::TimeAnchor => match hub.time_anchor(id) {
                    Ok(anchor) => Response::TimeAnchor { anchor },
                    Err(resp) => *resp,
                },
                Request::Report { report } => {
                    if let Ok(mut m) = hub.inner.reports.lock() {
                        m.insert(
                            sid,
                            crate::Reported {
                                at_ms: hub.now_ms(),
                                report,
                            },
                        );
                    }
                    Response::Reported
                }
                Request::SyncConfig { .. } | Request::Register { .. } | Request::EvidenceOpen => {
                    err(ErrorCode::BadRequest, "served by the session handler")
                }
                Request::EvidenceBatch { .. } | Request::EvidenceGap { .. } => err(
                    ErrorCode::BadRequest,
                    "evidence batches belong on an evidence session stream (EvidenceOpen first)",
                ),
                Request::Enroll { .. } | Request::EnrollNode { .. } | Request::Reestablish { .. } => err(
                    ErrorCode::BadRequest,
                    "already authenticated: enrollment and re-establishment use an anonymous connection",
                ),
            }
        }
    }
}

/// A join token found unused, unexpired and bound to the spoke ID asked
/// for, before anything else of the request was looked at. Only
/// [`check_token`] makes one, and enrollment signs nothing without it.
/// (The store consumes the token in the transaction that enrolls the spoke,
/// so of two racers with one token exactly one wins.)
struct CheckedToken {
    hash: [u8; 32],
}

const ENROLL: RefusedRequest = RefusedRequest::Enroll;

fn invalid_token() -> Box<Response> {
    Box::new(err(
        ErrorCode::InvalidToken,
        "invalid join token: unknown, already used or expired",
    ))
}

/// Checks the token of an Enroll for `spoke`. Writes only what a token the
/// operator created can cause once: burning it if expired or bound to
/// another ID, noting its first replay if used or burned before.
fn check_token(hub: &Hub, secret: &str, spoke: &SpiffeId) -> Result<CheckedToken, Box<Response>> {
    let sid = spoke.to_string();
    let hash = svid::sha256(secret.as_bytes());
    let now = hub.now_ms();
    let state = match hub.inner.store.token_state(&hash, &sid, now) {
        Ok(s) => s,
        Err(e) => {
            return Err(Box::new(err(
                ErrorCode::Internal,
                format!("hub storage failed: {e}"),
            )))
        }
    };
    let audit = |detail: String| AuditEntry {
        at_ms: now,
        event: "refused".into(),
        subject: Some(sid.clone()),
        detail,
    };
    match state {
        TokenState::Valid => Ok(CheckedToken { hash }),
        TokenState::Unknown => {
            hub.refused((ENROLL, Reason::TokenUnknown), &sid);
            Err(invalid_token())
        }
        TokenState::Used(used) => {
            hub.refused((ENROLL, Reason::TokenReplayed), &sid);
            if used.replay_ms.is_none() {
                let what = match used.outcome {
                    TokenOutcome::Enrolled => "used to enroll",
                    TokenOutcome::Expired => "burned as expired",
                    TokenOutcome::Mismatch => "burned for another ID",
                };
                let detail = format!(
                    "join token bound to {} ({what} at {}) presented again: it may have leaked; later replays are counted, not audited",
                    used.spoke,
                    rfc3339_ms(used.used_ms)
                );
                match hub.inner.store.note_replay(&hash, now, &audit(detail)) {
                    Ok(true) => {
                        warn!(target: "tidemesh::audit", spoke = %sid, bound = %used.spoke, "join token replayed")
                    }
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "cannot note a token replay"),
                }
            }
            Err(invalid_token())
        }
        TokenState::Expired => {
            hub.refused((ENROLL, Reason::TokenExpired), &sid);
            let detail = "enrollment with an expired token; burned".to_owned();
            if let Err(e) =
                hub.inner
                    .store
                    .burn_token(&hash, now, TokenOutcome::Expired, &audit(detail))
            {
                warn!(error = %e, "cannot burn an expired token");
            }
            Err(invalid_token())
        }
        TokenState::Mismatch { bound } => {
            hub.refused((ENROLL, Reason::TokenMismatch), &sid);
            let detail = format!("token bound to {bound}; burned");
            if let Err(e) =
                hub.inner
                    .store
                    .burn_token(&hash, now, TokenOutcome::Mismatch, &audit(detail))
            {
                warn!(error = %e, "cannot burn a mismatched token");
            }
            Err(Box::new(err(
                ErrorCode::TokenMismatch,
                format!("join token is bound to another spoke ID, not {sid}; it has been burned"),
            )))
        }
    }
}

fn enroll(hub: &Hub, token: &str, spoke: &SpiffeId, csr: &[u8], ca_csr: Option<&[u8]>) -> Response {
    // Only the secret matters to the hub; the rest of the token string is the
    // spoke's business. Accept either the whole token or its secret.
    let secret = JoinToken::parse(token)
        .map(|t| t.secret)
        .unwrap_or_else(|_| token.trim().to_owned());
    let sid = spoke.to_string();
    if spoke.trust_domain() != hub.trust_domain()
        || !matches!(naming::classify(spoke), Some(MeshIdentity::Node { .. }))
    {
        hub.refused((ENROLL, Reason::ForeignId), &sid);
        return err(
            ErrorCode::Forbidden,
            format!(
                "{sid} is not a spoke node ID of trust domain {}",
                hub.trust_domain()
            ),
        );
    }
    // The token first: nothing below runs for a caller without one.
    let token = match check_token(hub, &secret, spoke) {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    enroll_with(hub, &token, spoke, csr, ca_csr)
}

/// Enrollment past the token check: the CSRs, the revocation list, the
/// signature, and the transaction that consumes the token.
fn enroll_with(
    hub: &Hub,
    token: &CheckedToken,
    spoke: &SpiffeId,
    csr: &[u8],
    ca_csr: Option<&[u8]>,
) -> Response {
    let sid = spoke.to_string();
    let key = match svid::csr_public_key(csr) {
        Ok(k) => k,
        Err(e) => {
            hub.refused((ENROLL, Reason::BadCsr), &sid);
            return err(ErrorCode::BadRequest, format!("invalid CSR: {e}"));
        }
    };
    if let Some(ca_csr) = ca_csr {
        match svid::csr_public_key(ca_csr) {
            Ok(k) if k == key => {
                hub.refused((ENROLL, Reason::BadCsr), &sid);
                return err(
                    ErrorCode::BadRequest,
                    "the node CA key must differ from the node key",
                );
            }
            Ok(_) => {}
            Err(e) => {
                hub.refused((ENROLL, Reason::BadCsr), &sid);
                return err(ErrorCode::BadRequest, format!("invalid node CA CSR: {e}"));
            }
        }
    }
    // A key of a revoked spoke or node CA never comes back: checked before
    // the token is consumed, so the operator can retry with new keys.
    if hub.key_revoked(csr) || ca_csr.is_some_and(|c| hub.key_revoked(c)) {
        hub.audit_refusal(
            (ENROLL, Reason::KeyRevoked),
            &sid,
            "enrollment with a revoked key",
        );
        return err(
            ErrorCode::KeyRevoked,
            "this key belonged to a revoked spoke: enroll with new keys (tidemesh-spoke enroll --force generates them)",
        );
    }
    let (chain, not_after) = match hub.sign(csr, spoke, hub.inner.cfg.node_ttl) {
        Ok(x) => x,
        Err(e) => {
            hub.refused((ENROLL, Reason::BadCsr), &sid);
            return err(ErrorCode::BadRequest, format!("cannot sign CSR: {e}"));
        }
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
    match hub
        .inner
        .store
        .consume_token(&token.hash, &sid, now, &record, &audit)
    {
        Ok(TokenUse::Enrolled) => {
            // Enrolling a revoked ID again made a new list without its
            // node ID (its old keys stay listed).
            match hub.inner.store.revocation_list() {
                Ok(list) => hub.install_revocations(list),
                Err(e) => warn!(error = %e, "cannot read the revocation list"),
            }
            info!(target: "tidemesh::audit", spoke = %sid, "spoke enrolled");
            let Some(ca_csr) = ca_csr else {
                return hub.certificate(chain);
            };
            let node_ca = match hub.issue_node_ca(ca_csr, spoke, "node_ca_issued") {
                Ok(c) => c,
                Err(resp) => return *resp,
            };
            let anchor = match hub.time_anchor(spoke) {
                Ok(a) => a,
                Err(resp) => return *resp,
            };
            Response::Enrolled {
                chain,
                node_ca,
                bundle: vec![hub.inner.ca.cert_der().to_vec()],
                policy: hub.issue_policy(),
                anchor,
            }
        }
        // Lost a race with another Enroll of the same token (or its expiry
        // passed since the check): the token is gone either way.
        Ok(TokenUse::Invalid) => {
            hub.refused((ENROLL, Reason::TokenReplayed), &sid);
            *invalid_token()
        }
        Ok(TokenUse::Expired) => {
            hub.refused((ENROLL, Reason::TokenExpired), &sid);
            *invalid_token()
        }
        Ok(TokenUse::Mismatch { .. }) => {
            hub.refused((ENROLL, Reason::TokenMismatch), &sid);
            err(
                ErrorCode::TokenMismatch,
                format!("join token is bound to another spoke ID, not {sid}; it has been burned"),
            )
        }
        Err(e) => err(ErrorCode::Internal, format!("hub storage failed: {e}")),
    }
}

fn check_pinned(rec: &SpokeRecord, csr: &[u8]) -> Result<(), Box<Response>> {
    match svid::csr_public_key(csr) {
        Err(e) => Err(Box::new(err(
            ErrorCode::BadRequest,
            format!("invalid CSR: {e}"),
        ))),
        Ok(k) if k != rec.pinned_key => Err(Box::new(err(
            ErrorCode::KeyMismatch,
            "the CSR's key is not the key pinned at enrollment",
        ))),
        Ok(_) => Ok(()),
    }
}

fn renew(hub: &Hub, id: &SpiffeId, rec: &SpokeRecord, csr: &[u8]) -> Response {
    let sid = id.to_string();
    if let Err(resp) = check_pinned(rec, csr) {
        hub.audit_refusal(
            (RefusedRequest::Session, Reason::KeyMismatch),
            &sid,
            "renewal with a key other than the pinned one",
        );
        return *resp;
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
    match hub.inner.store.update_spoke(&sid, Some(&audit), &mut |r| {
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

const REESTABLISH: RefusedRequest = RefusedRequest::Reestablish;

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
            hub.refused((REESTABLISH, Reason::NotEnrolled), &sid);
            return err(
                ErrorCode::NotEnrolled,
                format!("{sid} is not enrolled: enroll with a join token"),
            );
        }
        Err(e) => return err(ErrorCode::Internal, e.to_string()),
    };
    // The proof first: until it verifies, the caller is anyone who knows
    // (or guessed) a node ID, and nothing of its request is recorded.
    let challenge = match tidemesh_net::reestablish_challenge(conn, spoke) {
        Ok(c) => c,
        Err(e) => return err(ErrorCode::Internal, e.to_string()),
    };
    if svid::verify_signature(&rec.pinned_key, &challenge, proof).is_err() {
        hub.refused((REESTABLISH, Reason::BadProof), &sid);
        return err(
            ErrorCode::KeyMismatch,
            "proof of possession of the pinned key failed",
        );
    }
    // From here the caller holds the pinned key: its refusals are audited.
    if rec.revoked_ms.is_some() || hub.is_revoked(&sid) {
        hub.audit_refusal(
            (REESTABLISH, Reason::Revoked),
            &sid,
            "re-establishment by a revoked spoke",
        );
        return err(ErrorCode::Revoked, format!("{sid} is revoked"));
    }
    let now = hub.now_ms();
    let offline = Duration::from_millis(now.saturating_sub(rec.last_seen_ms));
    if offline > hub.inner.cfg.max_offline {
        hub.audit_refusal(
            (REESTABLISH, Reason::OfflineWindow),
            &sid,
            "re-establishment past the max-offline window",
        );
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
            (REESTABLISH, Reason::KeyMismatch),
            &sid,
            "re-establishment with a key other than the pinned one",
        );
        return *resp;
    }
    issue_node(hub, spoke, csr, "reestablished")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tidemesh_identity::{clock::SystemClock, TrustDomain};

    use super::*;

    fn hub() -> (tempfile::TempDir, Hub) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let td = TrustDomain::new("edge.example").expect("td");
        crate::init(tmp.path(), &td, &SystemClock).expect("init");
        let hub = Hub::open(
            tmp.path(),
            crate::HubConfig::default(),
            Arc::new(SystemClock),
        )
        .expect("open");
        (tmp, hub)
    }

    fn code(r: &Response) -> Option<ErrorCode> {
        match r {
            Response::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn count(hub: &Hub, reason: Reason) -> u64 {
        hub.refusal_counts()
            .into_iter()
            .find(|((req, r), _)| *req == ENROLL && *r == reason)
            .map(|(_, n)| n)
            .unwrap_or(0)
    }

    fn audit_len(hub: &Hub) -> u64 {
        hub.store().audit_len().expect("audit")
    }

    /// A bad token with a garbage CSR is refused as a token error: the
    /// token is checked before the CSR is parsed, and nothing is written.
    #[test]
    fn the_token_is_checked_before_the_csr() {
        let (_tmp, hub) = hub();
        let id: SpiffeId = "spiffe://edge.example/store/s1/node/n1"
            .parse()
            .expect("id");
        let before = audit_len(&hub);
        let r = enroll(&hub, &"ab".repeat(32), &id, &[0xde, 0xad], None);
        assert_eq!(code(&r), Some(ErrorCode::InvalidToken), "{r:?}");
        let r = enroll(&hub, "nope", &id, &[1], Some(&[1]));
        assert_eq!(code(&r), Some(ErrorCode::InvalidToken), "{r:?}");
        assert_eq!(audit_len(&hub), before);
        assert_eq!(count(&hub, Reason::TokenUnknown), 2);
        assert_eq!(count(&hub, Reason::BadCsr), 0);

        // A valid token with a garbage CSR: a CSR error, counted, and the
        // token is not consumed.
        let token = hub
            .create_token(&id, Duration::from_secs(60))
            .expect("token")
            .to_string();
        let r = enroll(&hub, &token, &id, &[0xde, 0xad], None);
        assert_eq!(code(&r), Some(ErrorCode::BadRequest), "{r:?}");
        assert_eq!(count(&hub, Reason::BadCsr), 1);
        let key = svid::generate_key().expect("key");
        let csr = svid::make_csr(&key, &id).expect("csr");
        let r = enroll(&hub, &token, &id, &csr, None);
        assert!(matches!(r, Response::Certificate { .. }), "{r:?}");

        // The used token presented again: refused like an unknown one,
        // audited the first time only, counted every time.
        let before = audit_len(&hub);
        for _ in 0..5 {
            let r = enroll(&hub, &token, &id, &csr, None);
            assert_eq!(code(&r), Some(ErrorCode::InvalidToken), "{r:?}");
        }
        assert_eq!(audit_len(&hub), before + 1);
        assert_eq!(count(&hub, Reason::TokenReplayed), 5);
        let log = hub.store().audit_log().expect("log");
        let last = &log.last().expect("entry").1;
        assert!(last.detail.contains("presented again"), "{last:?}");

        // A token presented for another ID is burned once (one entry), then
        // it is a replay.
        let other: SpiffeId = "spiffe://edge.example/store/s1/node/n2"
            .parse()
            .expect("id");
        let t2 = hub
            .create_token(&id, Duration::from_secs(60))
            .expect("token")
            .to_string();
        let before = audit_len(&hub);
        let r = enroll(&hub, &t2, &other, &[0], None);
        assert_eq!(code(&r), Some(ErrorCode::TokenMismatch), "{r:?}");
        let r = enroll(&hub, &t2, &id, &csr, None);
        assert_eq!(code(&r), Some(ErrorCode::InvalidToken), "{r:?}");
        let r = enroll(&hub, &t2, &id, &csr, None);
        assert_eq!(code(&r), Some(ErrorCode::InvalidToken), "{r:?}");
        assert_eq!(audit_len(&hub), before + 2);

        // An ID outside the trust domain: counted, nothing written.
        let foreign: SpiffeId = "spiffe://elsewhere/store/s1/node/n1".parse().expect("id");
        let before = audit_len(&hub);
        let r = enroll(&hub, &t2, &foreign, &[0], None);
        assert_eq!(code(&r), Some(ErrorCode::Forbidden), "{r:?}");
        assert_eq!(audit_len(&hub), before);
        assert_eq!(count(&hub, Reason::ForeignId), 1);
    }

    /// 2,000 bad enrollments leave no audit row and hub.db within 1 MiB of
    /// its size; the counter says 2,000.
    #[test]
    fn bad_enrollments_write_nothing() {
        let (tmp, hub) = hub();
        let db = tmp.path().join(crate::HUB_DB);
        let size0 = std::fs::metadata(&db).expect("db").len();
        let before = audit_len(&hub);
        let id: SpiffeId = "spiffe://edge.example/store/s1/node/n1"
            .parse()
            .expect("id");
        for i in 0..2_000u32 {
            let r = enroll(&hub, &format!("{i:064x}"), &id, &[0x30, 0x82], None);
            assert_eq!(code(&r), Some(ErrorCode::InvalidToken), "{r:?}");
        }
        assert_eq!(audit_len(&hub), before);
        assert_eq!(count(&hub, Reason::TokenUnknown), 2_000);
        let size1 = std::fs::metadata(&db).expect("db").len();
        assert!(size1 - size0 < 1 << 20, "{size0} -> {size1}");
    }
}
