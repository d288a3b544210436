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
    rfc3339_ms,
    store::{NodeCaRecord, TokenUse},
    AuditEntry, Hub, SpokeRecord,
};

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
                    let _ = hub.inner.store.update_spoke(&sid, None, |r| r.last_seen_ms = now);
                    Response::Welcome { hub_time_unix_ms: now }
                }
                Request::Ping => Response::Pong,
                Request::Renew { csr } => renew(hub, id, &rec, &csr),
                Request::IssueNodeCa { csr } => {
                    if hub.key_revoked(&csr) {
                        hub.audit_refusal(&sid, "node CA request with a revoked key");
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
                    hub.audit_refusal(&wid.to_string(), &format!("hub-issued workload SVID requested by {id}"));
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
    if let Some(ca_csr) = ca_csr {
        match svid::csr_public_key(ca_csr) {
            Ok(k) if k == key => {
                return err(
                    ErrorCode::BadRequest,
                    "the node CA key must differ from the node key",
                )
            }
            Ok(_) => {}
            Err(e) => return err(ErrorCode::BadRequest, format!("invalid node CA CSR: {e}")),
        }
    }
    // A key of a revoked spoke or node CA never comes back: checked before
    // the token is consumed, so the operator can retry with new keys.
    if hub.key_revoked(csr) || ca_csr.is_some_and(|c| hub.key_revoked(c)) {
        hub.audit_refusal(&sid, "enrollment with a revoked key");
        return err(
            ErrorCode::KeyRevoked,
            "this key belonged to a revoked spoke: enroll with new keys (tidemesh-spoke enroll --force generates them)",
        );
    }
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
        hub.audit_refusal(&sid, "renewal with a key other than the pinned one");
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
        return *resp;
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
