//! The control session with the hub: enrollment, the session (hello, time
//! anchors, node CA, renewal and re-establishment), config sync, endpoint
//! registration, the hub's pushes (revocation lists), reports, pings.
//!
//! Who drives it: [`crate::Spoke::run`] keeps one session up and
//! reconnects with backoff; `tidemesh-spoke enroll` calls [`enroll`]. What
//! it must not do: hold protocol rules the hub decides (who may get what),
//! or block the data plane: everything it learns it publishes (credentials,
//! config, hub link) for others to read.

use super::*;

pub(crate) mod backoff;
pub(crate) mod failover;
pub(crate) mod plan;

pub(crate) use backoff::{Backoff, Failure};
use plan::{Action, Facts, Plan, PlanSettings, Validity};

pub(crate) fn expect_cert(
    resp: Response,
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), SpokeError> {
    match resp {
        Response::Certificate { chain, bundle } => Ok((
            chain.into_iter().map(CertificateDer::from).collect(),
            bundle.into_iter().map(CertificateDer::from).collect(),
        )),
        Response::Error { code, message } => Err(SpokeError::Refused { code, message }),
        other => Err(SpokeError::Unexpected(format!("{other:?}"))),
    }
}

pub(crate) fn client_endpoint(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
) -> Result<quinn::Endpoint, NetError> {
    tidemesh_net::quic::endpoint(socket, None)
}

/// The hub's retry-after if it closed `conn` as over its new-session
/// budget, else `e`.
pub(crate) fn busy_or(conn: &quinn::Connection, e: NetError) -> SpokeError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(close::BUSY) =>
        {
            match close::retry_after(&c.reason) {
                Some(d) => SpokeError::Busy(d),
                None => SpokeError::Net(e),
            }
        }
        _ => SpokeError::Net(e),
    }
}

pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    quic: &QuicSettings,
    tls: rustls::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, NetError> {
    let cfg = quic.client_config(tls)?;
    let connecting = endpoint
        .connect_with(cfg, addr, SNI)
        .map_err(|e| NetError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    connecting.await.map_err(|e| NetError::Connect {
        addr,
        reason: format!("{e} (is the hub running, and is UDP to it allowed?)"),
    })
}

/// What enrollment produced.
#[derive(Debug)]
pub struct Enrolled {
    /// The node ID.
    pub id: SpiffeId,
    /// not_after of the node SVID.
    pub not_after: SystemTime,
}

/// [`enroll`], but a hub that answers busy (over its new-session budget,
/// or its durable queue full) is asked again after its retry-after plus
/// jitter, at most `max_waits` times and never past `wait` from now;
/// any other failure, or busy once the bounds are spent, is returned.
/// `socket` makes a fresh socket per attempt; `on_busy` hears of every
/// wait (the hub's retry-after, the wait chosen).
#[allow(clippy::too_many_arguments)]
pub async fn enroll_waiting(
    data_dir: &Path,
    hub: SocketAddr,
    token: &str,
    force: bool,
    mut socket: impl FnMut() -> Result<Arc<dyn quinn::AsyncUdpSocket>, SpokeError>,
    clock: Arc<dyn Clock>,
    quic: QuicSettings,
    wait: Duration,
    max_waits: u32,
    mut on_busy: impl FnMut(Duration, Duration),
) -> Result<Enrolled, SpokeError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pacing = backoff::EnrollWait::new(max_waits);
    loop {
        let sock = socket()?;
        match enroll(data_dir, hub, token, force, sock, clock.clone(), quic).await {
            Err(SpokeError::Busy(after)) => {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                let unit: f64 = rand::random();
                match pacing.after_busy(after, unit, remaining) {
                    Some(d) => {
                        on_busy(after, d);
                        tokio::time::sleep(d).await;
                    }
                    None => return Err(SpokeError::Busy(after)),
                }
            }
            other => return other,
        }
    }
}

/// Enrolls a spoke: generates the node key and the node CA key here, sends
/// their CSRs with the join token to the hub (verified by the token's
/// pinned CA fingerprint) and stores the node SVID, the node CA, the
/// bundle and both keys (0600) in `data_dir`, with the hub's first time
/// anchor as the trusted-time floor.
pub async fn enroll(
    data_dir: &Path,
    hub: SocketAddr,
    token: &str,
    force: bool,
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    clock: Arc<dyn Clock>,
    quic: QuicSettings,
) -> Result<Enrolled, SpokeError> {
    let token = JoinToken::parse(token)?;
    let store = CredStore::new(data_dir);
    if store.is_enrolled() && !force {
        return Err(SpokeError::AlreadyEnrolled(data_dir.to_owned()));
    }
    let td = token.spoke.trust_domain().clone();
    let key = svid::generate_key()?;
    let csr = svid::make_csr(&key, &token.spoke)?;
    let ca_key = svid::generate_key()?;
    let ca_csr = svid::make_csr(&ca_key, &token.spoke)?;
    let tls = verify::anonymous_client_config(
        ServerTrust::Pinned {
            trust_domain: td.clone(),
            ca_fingerprint: token.ca_fingerprint,
        },
        Arc::new(ExactId(naming::hub_id(&td))),
        clock.clone(),
        &[ALPN_CTL],
    )
    .map_err(tls_err)?;
    let endpoint = client_endpoint(socket)?;
    let conn = connect(&endpoint, &quic, tls, hub).await?;
    let sent = tokio::time::Instant::now();
    let resp = tidemesh_net::request(
        &conn,
        &Request::EnrollNode {
            token: token.secret.clone(),
            spoke: token.spoke.clone(),
            csr,
            ca_csr,
        },
        REQUEST_TIMEOUT,
    )
    .await
    .map_err(|e| busy_or(&conn, e));
    let rtt = sent.elapsed();
    conn.close(quinn::VarInt::from_u32(close::NORMAL), b"enrolled");
    endpoint.wait_idle().await;
    let (chain, node_ca, bundle, policy, anchor) = match resp? {
        Response::Enrolled {
            chain,
            node_ca,
            bundle,
            policy,
            anchor,
        } => (chain, node_ca, bundle, policy, anchor),
        Response::Error { code, message } => return Err(SpokeError::Refused { code, message }),
        other => return Err(SpokeError::Unexpected(format!("{other:?}"))),
    };
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let bundle: Vec<CertificateDer<'static>> =
        bundle.into_iter().map(CertificateDer::from).collect();
    if !bundle
        .iter()
        .any(|c| svid::sha256(c) == token.ca_fingerprint)
    {
        return Err(SpokeError::Unexpected(
            "the trust bundle does not contain the pinned CA".into(),
        ));
    }
    let node = Svid::new(key, chain)?;
    if node.id != token.spoke {
        return Err(SpokeError::Unexpected(format!(
            "issued {} instead of {}",
            node.id, token.spoke
        )));
    }
    let ca_cert = CertificateDer::from(node_ca);
    let ca = svid::NodeCa::new(
        ca_cert.clone(),
        svid::key_from_pem(&ca_key.serialize_pem())?,
    )?;
    if ca.node() != &token.spoke {
        return Err(SpokeError::Unexpected(format!(
            "node CA issued for {} instead of {}",
            ca.node(),
            token.spoke
        )));
    }
    let anchor = anchor
        .verify(&bundle, &token.spoke)
        .map_err(|e| SpokeError::Unexpected(e.to_string()))?;
    let ident = creds::Identity {
        id: token.spoke.clone(),
        hub: hub.to_string(),
        enrolled_at: rfc3339(clock.now()),
    };
    store.save_enrollment(&ident, &node.key, &node.chain, &bundle)?;
    store.save_node_ca(&ca_cert, &ca_key)?;
    store.save_policy(&policy)?;
    let anchor_ms = anchor.hub_ms + (rtt.as_millis() as u64) / 2;
    store.save_time_floor(&TimeFloor {
        floor_ms: anchor_ms,
        anchor_ms: Some(anchor.hub_ms),
    })?;
    store.save_contact(&creds::ContactState {
        last_contact_ms: Some(unix_ms(clock.now())),
    })?;
    Ok(Enrolled {
        id: node.id,
        not_after: node.not_after,
    })
}

impl Spoke {
    /// Validates a snapshot from the hub and makes it the last-known-good,
    /// atomically (one redb transaction), then the config in force.
    pub(crate) fn apply_config(
        &self,
        version: u64,
        registry: u64,
        hub_applied_ms: u64,
        snapshot: Vec<u8>,
    ) -> Result<(), SpokeError> {
        let applied = replica::Applied {
            version,
            hub_applied_ms,
            applied_ms: unix_ms(self.inner.clock.now()),
            snapshot,
        };
        // decoded and compiled before it may become the last-known-good
        let checked = ConfigInForce::check(applied)?;
        let previous = self.config_version();
        self.record_config(
            version,
            previous,
            &checked.applied.snapshot,
            tidemesh_evidence::record::ConfigSource::Hub,
        );
        self.inner
            .replica
            .apply(&checked.applied)
            .map_err(|e| SpokeError::Invalid(e.to_string()))?;
        self.inner.modes.config(&checked.config.mode_matrix);
        self.inner.config.send_replace(Some(Arc::new(checked)));
        if let Ok(mut g) = self.inner.registry_gen.lock() {
            *g = registry;
        }
        info!(target: "tidemesh::audit", version, registry, "config applied");
        Ok(())
    }

    /// Keeps the config current while the session lasts (long polls).
    pub(crate) async fn sync_loop(&self, conn: quinn::Connection) {
        loop {
            let mut sync = tidemesh_proto::sync::SpokeSync {
                have: self.config_version(),
                have_registry: self.inner.registry_gen.lock().map(|g| *g).unwrap_or(0),
            };
            let req = Request::SyncConfig {
                have: sync.poll(),
                have_registry: sync.have_registry,
                wait_ms: 20_000,
            };
            match tidemesh_net::request::<_, Response>(&conn, &req, Duration::from_secs(35)).await {
                Ok(Response::ConfigSlice {
                    version,
                    registry,
                    applied_ms,
                    snapshot,
                    revocations,
                }) => {
                    self.install_revocations(revocations).await;
                    if !sync.handle_config(version, registry) {
                        continue;
                    }
                    let me = self.clone();
                    // checks, then one redb commit: on the blocking pool
                    let applied = tokio::task::spawn_blocking(move || {
                        me.apply_config(version, registry, applied_ms, snapshot)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(SpokeError::Invalid(format!("config task failed: {e}")))
                    });
                    if let Err(e) = applied {
                        warn!(version, error = %e, "config rejected; keeping the last-known-good");
                        tokio::time::sleep(self.jitter(Duration::from_secs(5))).await;
                    }
                }
                Ok(Response::Config {
                    version,
                    registry,
                    applied_ms,
                    snapshot,
                }) => {
                    if !sync.handle_config(version, registry) {
                        continue;
                    }
                    let me = self.clone();
                    // checks, then one redb commit: on the blocking pool
                    let applied = tokio::task::spawn_blocking(move || {
                        me.apply_config(version, registry, applied_ms, snapshot)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(SpokeError::Invalid(format!("config task failed: {e}")))
                    });
                    if let Err(e) = applied {
                        warn!(version, error = %e, "config rejected; keeping the last-known-good");
                        tokio::time::sleep(self.jitter(Duration::from_secs(5))).await;
                    }
                }
                Ok(Response::ConfigUnchanged { .. }) => {
                    if let Ok(mut c) = self.inner.config_checked_ms.lock() {
                        *c = Some(unix_ms(self.inner.clock.now()));
                    }
                }
                Ok(other) => {
                    warn!(answer = ?other, "config sync refused");
                    tokio::time::sleep(self.jitter(Duration::from_secs(5))).await;
                }
                // The session itself notices a dead connection.
                Err(_) => return,
            }
        }
    }

    pub(crate) fn record_config(
        &self,
        version: u64,
        previous: Option<u64>,
        snapshot: &[u8],
        source: tidemesh_evidence::record::ConfigSource,
    ) {
        self.record(tidemesh_evidence::RecordBody::ConfigApplied(
            tidemesh_evidence::record::ConfigApplied {
                config: tidemesh_evidence::record::ConfigKind::Mesh,
                version: version.to_string(),
                previous_version: previous.map(|v| v.to_string()),
                digest: tidemesh_evidence::Sha256Digest::of(snapshot),
                source,
            },
        ));
    }

    pub(crate) fn record_cert(&self, s: &Svid, event: tidemesh_evidence::record::CertEventKind) {
        let Some(leaf) = s.chain.first() else { return };
        // Workload SVIDs name their node CA as issuer; node SVIDs the root.
        let issuer = s
            .chain
            .get(1)
            .and_then(|c| svid::cert_spiffe_id(c).ok())
            .map(|id| format!("node CA {id}"))
            .unwrap_or_else(|| s.id.trust_domain().id().to_string());
        self.record(tidemesh_evidence::RecordBody::Certificate(
            tidemesh_evidence::record::CertificateEvent {
                event,
                spiffe_id: s.id.clone(),
                certificate_fingerprint: tidemesh_evidence::Sha256Digest::of(leaf),
                serial_number: String::new(),
                issued_at: tidemesh_evidence::UnixMillis(unix_ms(s.not_before)),
                expires_at: tidemesh_evidence::UnixMillis(unix_ms(s.not_after)),
                issuer,
            },
        ));
    }

    /// Registers the local endpoints with the hub now and whenever their
    /// health changes, for as long as the session lasts.
    pub(crate) async fn register_loop(&self, conn: quinn::Connection) {
        let mut rx = self.inner.health.subscribe();
        loop {
            rx.borrow_and_update();
            let req = Request::Register {
                endpoints: self.local_endpoints(),
            };
            let outcome =
                match tidemesh_net::request::<_, Response>(&conn, &req, REQUEST_TIMEOUT).await {
                    Ok(Response::Registered) => None,
                    Ok(Response::Error { code, message }) => {
                        warn!(%code, %message, "registration refused");
                        Some(format!("{code}: {message}"))
                    }
                    Ok(other) => Some(format!("unexpected answer {other:?}")),
                    Err(_) => return,
                };
            if let Ok(mut e) = self.inner.registration_error.lock() {
                *e = outcome;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The hub address the rotation points at now (`host:port` as
    /// configured).
    pub(crate) fn current_hub(&self) -> String {
        let i = self
            .inner
            .hub_rotation
            .lock()
            .map(|r| r.current())
            .unwrap_or(0);
        self.inner
            .hubs
            .get(i)
            .or_else(|| self.inner.hubs.first())
            .cloned()
            .unwrap_or_default()
    }

    /// A session came up on the current hub address.
    pub(crate) fn hub_up(&self) {
        if let Ok(mut r) = self.inner.hub_rotation.lock() {
            r.handle_up();
        }
    }

    /// An attempt on the current hub address failed: the next one is
    /// dialled (the rotation says whether after a short jitter or a
    /// backoff).
    pub(crate) fn hub_failed(&self) -> failover::Next {
        let from = self.current_hub();
        let next = match self.inner.hub_rotation.lock() {
            Ok(mut r) => r.handle_failure(),
            Err(_) => failover::Next::Backoff,
        };
        if self.inner.hubs.len() > 1 {
            info!(spoke = %self.inner.ident.id, from = %from, to = %self.current_hub(), "hub replica unreachable; trying the next");
        }
        next
    }

    /// Resolves the current hub address (a name afresh at each attempt).
    pub(crate) async fn hub_addr(&self) -> Result<SocketAddr, SpokeError> {
        let hub = self.current_hub();
        if let Ok(a) = hub.parse() {
            return Ok(a);
        }
        let found = tokio::net::lookup_host(hub.as_str())
            .await
            .map_err(|e| SpokeError::Invalid(format!("cannot resolve hub {hub}: {e}")))?
            .next();
        found.ok_or_else(|| SpokeError::Invalid(format!("hub {hub} resolves to no address")))
    }

    pub(crate) fn bundle(&self) -> Result<TrustBundle, SpokeError> {
        Ok(self.inner.creds.current().bundle.clone())
    }

    pub(crate) fn hub_authorizer(&self) -> Arc<ExactId> {
        Arc::new(ExactId(naming::hub_id(self.inner.ident.id.trust_domain())))
    }

    pub(crate) fn classify_failure(&self, e: &SpokeError) -> (State, String) {
        match e {
            SpokeError::Refused {
                code: ErrorCode::Revoked,
                ..
            } => (State::Revoked, e.to_string()),
            SpokeError::Refused {
                code: ErrorCode::OfflineWindowExceeded | ErrorCode::NotEnrolled,
                ..
            } => (State::NeedsEnrollment, e.to_string()),
            SpokeError::Net(NetError::Connection(quinn::ConnectionError::ApplicationClosed(c)))
                if c.error_code == quinn::VarInt::from_u32(close::REVOKED) =>
            {
                (State::Revoked, "the hub revoked this spoke".into())
            }
            _ if self.state() == State::Revoked => (State::Revoked, e.to_string()),
            _ => (State::Disconnected, e.to_string()),
        }
    }

    /// Re-establishes an expired node SVID with the pinned key.
    pub(crate) async fn reestablish(
        &self,
        endpoint: &quinn::Endpoint,
        node: &Svid,
    ) -> Result<Arc<Svid>, SpokeError> {
        info!(spoke = %self.inner.ident.id, expired = %rfc3339(node.not_after), "node SVID expired; re-establishing with the pinned key");
        let tls = verify::client_config_no_cert(
            self.bundle()?,
            self.hub_authorizer(),
            self.inner.clock.clone(),
            &[ALPN_CTL],
        )
        .map_err(tls_err)?;
        let conn = connect(endpoint, &self.inner.cfg.quic, tls, self.hub_addr().await?).await?;
        let challenge = tidemesh_net::reestablish_challenge(&conn, &self.inner.ident.id)?;
        let proof = svid::sign(&node.key, &challenge)?;
        let csr = svid::make_csr(&node.key, &self.inner.ident.id)?;
        let resp = tidemesh_net::request(
            &conn,
            &Request::Reestablish {
                spoke: self.inner.ident.id.clone(),
                csr,
                proof,
            },
            REQUEST_TIMEOUT,
        )
        .await;
        conn.close(quinn::VarInt::from_u32(close::NORMAL), b"reestablished");
        let (chain, bundle) = expect_cert(resp?)?;
        let s = self.install_node(chain, bundle).await?;
        info!(target: "tidemesh::audit", spoke = %s.id, not_after = %rfc3339(s.not_after), "node SVID installed");
        self.record_cert(&s, tidemesh_evidence::record::CertEventKind::Reestablished);
        Ok(s)
    }

    /// Installs a signed revocation list (from a push or a config slice)
    /// if it verifies and is newer; a bad one is logged and ignored.
    pub(crate) async fn install_revocations(
        &self,
        signed: tidemesh_identity::SignedRevocationList,
    ) {
        // verifies, then writes revocations.bin: on the blocking pool
        let creds = self.inner.creds.clone();
        match tokio::task::spawn_blocking(move || creds.install_revocations(&signed)).await {
            Ok(Err(e)) => {
                warn!(target: "tidemesh::audit", error = %e, "revocation list refused")
            }
            Err(e) => warn!(error = %e, "revocation install task failed"),
            Ok(Ok(_)) => {}
        }
    }

    /// Installs a node SVID from the hub (files written and synced on the
    /// blocking pool, never on an async worker).
    async fn install_node(
        &self,
        chain: Vec<CertificateDer<'static>>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Svid>, SpokeError> {
        let creds = self.inner.creds.clone();
        tokio::task::spawn_blocking(move || creds.install_node(chain, bundle))
            .await
            .map_err(|e| SpokeError::Invalid(format!("node SVID install task failed: {e}")))?
            .map_err(Into::into)
    }

    /// Reads the hub's pushes (unidirectional streams on the control
    /// connection) for as long as the session lasts.
    pub(crate) async fn push_loop(&self, conn: quinn::Connection) {
        loop {
            let mut recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(_) => return,
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, tidemesh_net::read_frame::<Push>(&mut recv))
                .await
            {
                Ok(Ok(Push::Revocations(signed))) => self.install_revocations(signed).await,
                Ok(Err(e)) => warn!(error = %e, "bad push from the hub"),
                Err(_) => warn!("push from the hub timed out"),
            }
        }
    }

    /// Asks the hub for a time anchor and feeds it to the trusted clock.
    pub(crate) async fn refresh_time(&self, conn: &quinn::Connection) -> Result<(), SpokeError> {
        let sent = tokio::time::Instant::now();
        let resp = tidemesh_net::request(conn, &Request::TimeAnchor, REQUEST_TIMEOUT).await?;
        let rtt = sent.elapsed();
        let anchor = match resp {
            Response::TimeAnchor { anchor } => anchor,
            Response::Error { code, message } => return Err(SpokeError::Refused { code, message }),
            other => return Err(SpokeError::Unexpected(format!("{other:?}"))),
        };
        let roots = self.inner.creds.current().bundle.roots().to_vec();
        let a = anchor
            .verify(&roots, &self.inner.ident.id)
            .map_err(|e| SpokeError::Unexpected(e.to_string()))?;
        let was = self.inner.tclock.trusted();
        self.inner.tclock.anchor(a.hub_ms, rtt);
        if !was {
            info!(target: "tidemesh::audit", "time trusted again: anchored to the hub");
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.save_time_floor()).await;
        Ok(())
    }

    /// Requests a node CA (a new key each time) if none is in force or the
    /// one in force is past half its life.
    pub(crate) async fn ensure_node_ca(&self, conn: &quinn::Connection) -> Result<(), SpokeError> {
        if !self.inner.creds.node_ca_due() {
            return Ok(());
        }
        let key = svid::generate_key()?;
        let csr = svid::make_csr(&key, &self.inner.ident.id)?;
        let resp =
            tidemesh_net::request(conn, &Request::IssueNodeCa { csr }, REQUEST_TIMEOUT).await?;
        let (cert, policy) = match resp {
            Response::NodeCa { cert, policy } => (cert, policy),
            Response::Error { code, message } => return Err(SpokeError::Refused { code, message }),
            other => return Err(SpokeError::Unexpected(format!("{other:?}"))),
        };
        let creds = self.inner.creds.clone();
        let f = tokio::task::spawn_blocking(move || {
            creds.install_node_ca(CertificateDer::from(cert), key, policy)
        })
        .await
        .map_err(|e| SpokeError::Invalid(e.to_string()))??;
        self.record(tidemesh_evidence::RecordBody::Certificate(
            tidemesh_evidence::record::CertificateEvent {
                event: tidemesh_evidence::record::CertEventKind::Issued,
                spiffe_id: self.inner.ident.id.clone(),
                certificate_fingerprint: tidemesh_evidence::Sha256Digest(f.key_fingerprint),
                serial_number: "node-ca".into(),
                issued_at: tidemesh_evidence::UnixMillis(unix_ms(f.not_before)),
                expires_at: tidemesh_evidence::UnixMillis(unix_ms(f.not_after)),
                issuer: self.inner.ident.id.trust_domain().id().to_string(),
            },
        ));
        self.inner.issue_wake.notify_one();
        Ok(())
    }

    /// Tells the hub this spoke's survival horizon and what it enforces.
    pub(crate) async fn report_loop(&self, conn: quinn::Connection) {
        loop {
            let h = self.horizon();
            let report = tidemesh_proto::SpokeReport {
                survival_horizon_s: h.survival_horizon_s,
                survival_limit: h.survival_limit.to_owned(),
                revocation_version: self.inner.creds.revocations().version(),
                time_trusted: self.inner.tclock.trusted(),
                node_ca_not_after_ms: self
                    .inner
                    .creds
                    .current()
                    .node_ca
                    .map(|f| unix_ms(f.not_after)),
            };
            match tidemesh_net::request::<_, Response>(
                &conn,
                &Request::Report { report },
                REQUEST_TIMEOUT,
            )
            .await
            {
                Ok(Response::Reported) => {}
                Ok(other) => debug!(answer = ?other, "report refused"),
                Err(_) => return,
            }
            let mut changed = self.inner.creds.revocations_changed();
            tokio::select! {
                _ = tokio::time::sleep(self.inner.cfg.report_interval) => {}
                _ = changed.changed() => {}
            }
        }
    }

    /// Health-checks the hub over the control session (a `Ping` answered
    /// within the check interval) for as long as the session lasts.
    pub(crate) async fn ping_loop(&self, conn: quinn::Connection) {
        loop {
            let every = self.check_interval();
            tokio::time::sleep(every).await;
            let ok = matches!(
                tidemesh_net::request::<_, Response>(
                    &conn,
                    &Request::Ping,
                    every.max(Duration::from_secs(1))
                )
                .await,
                Ok(Response::Pong)
            );
            self.inner.modes.health_check(ok);
        }
    }

    /// One control session: connect (re-establishing first if the node SVID
    /// expired), say hello, anchor the time, get a node CA if due, then
    /// renew on time until the connection ends.
    pub(crate) async fn session(
        &self,
        endpoint: &quinn::Endpoint,
    ) -> Result<SessionEnd, SpokeError> {
        let mut node = self.inner.creds.current().node.clone();
        if node.expired(self.inner.clock.now()) {
            node = self.reestablish(endpoint, &node).await?;
        }
        let tls = verify::client_config(
            self.bundle()?,
            node.chain.clone(),
            &node.key,
            self.hub_authorizer(),
            self.inner.clock.clone(),
            &[ALPN_CTL],
        )
        .map_err(tls_err)?;
        // The hub pushes (revocation lists) on unidirectional streams.
        let quic = QuicSettings {
            max_uni_streams: 4,
            ..self.inner.cfg.quic
        };
        let addr = self.hub_addr().await?;
        let conn = connect(endpoint, &quic, tls, addr).await?;
        self.inner.hub_link.send_if_modified(|h| {
            let changed = h.addr != Some(addr);
            h.addr = Some(addr);
            changed
        });
        let me = self.clone();
        let push_conn = conn.clone();
        let _push = AbortOnDrop(tokio::spawn(async move { me.push_loop(push_conn).await }));
        let resp: Response = tidemesh_net::request(
            &conn,
            &Request::Hello {
                agent: format!("tidemesh-spoke/{}", env!("CARGO_PKG_VERSION")),
            },
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(|e| busy_or(&conn, e))?;
        match resp {
            Response::Welcome { .. } => {}
            Response::Error { code, message } => return Err(SpokeError::Refused { code, message }),
            other => return Err(SpokeError::Unexpected(format!("{other:?}"))),
        }
        if let Err(e) = self.refresh_time(&conn).await {
            warn!(error = %e, "no time anchor from the hub");
        }
        if let Err(e) = self.ensure_node_ca(&conn).await {
            warn!(error = %e, "node CA request failed; retrying with the next maintenance");
        }
        self.hub_up();
        self.set_state(State::Connected, None);
        self.touch_contact();
        let me = self.clone();
        let sync_conn = conn.clone();
        let _sync = AbortOnDrop(tokio::spawn(async move { me.sync_loop(sync_conn).await }));
        let me = self.clone();
        let ev_conn = conn.clone();
        let _evidence = AbortOnDrop(tokio::spawn(async move { me.evidence_loop(ev_conn).await }));
        let me = self.clone();
        let reg_conn = conn.clone();
        let _register = AbortOnDrop(tokio::spawn(
            async move { me.register_loop(reg_conn).await },
        ));
        let me = self.clone();
        let rep_conn = conn.clone();
        let _report = AbortOnDrop(tokio::spawn(async move { me.report_loop(rep_conn).await }));
        let me = self.clone();
        let ping_conn = conn.clone();
        let _ping = AbortOnDrop(tokio::spawn(async move { me.ping_loop(ping_conn).await }));
        let mut plan = Plan::new(
            PlanSettings {
                renew_fraction: self.inner.cfg.renew_fraction,
                anchor_interval: self.inner.cfg.anchor_interval,
                min_gap: Duration::from_millis(100),
            },
            self.inner.clock.now(),
        );
        loop {
            let facts = self.plan_facts();
            if let Some(action) = plan.poll_action(&facts) {
                let ok = self.perform(&conn, action).await;
                let backoff = self.jitter(Duration::from_secs(5));
                plan.handle_result(action, self.inner.clock.now(), ok, backoff);
                continue;
            }
            let wait = plan
                .next_wake(&facts)
                .duration_since(facts.now)
                .unwrap_or(Duration::ZERO);
            debug!(wait = ?wait, "next session upkeep");
            tokio::select! {
                e = conn.closed() => {
                    return Ok(SessionEnd::Lost(match &e {
                        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(close::REVOKED) => {
                            self.set_state(State::Revoked, Some("the hub revoked this spoke".into()));
                            "revoked".into()
                        }
                        quinn::ConnectionError::TimedOut => {
                            // The last packet arrived about one idle timeout ago.
                            self.touch_contact_at(self.inner.clock.now() - self.inner.cfg.quic.idle_timeout);
                            "connection lost: hub silent for the idle timeout".into()
                        }
                        other => {
                            self.touch_contact();
                            format!("connection lost: {other}")
                        }
                    }));
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// What the session's upkeep plan sees: the time and what is installed.
    pub(crate) fn plan_facts(&self) -> Facts {
        let c = self.inner.creds.current();
        Facts {
            now: self.inner.clock.now(),
            node: Validity {
                not_before: c.node.not_before,
                not_after: c.node.not_after,
            },
            node_ca: c.node_ca.map(|f| Validity {
                not_before: f.not_before,
                not_after: f.not_after,
            }),
        }
    }

    /// Performs one upkeep action the plan asked for; whether it worked.
    pub(crate) async fn perform(&self, conn: &quinn::Connection, action: Action) -> bool {
        match action {
            Action::RenewNode => {
                let node = self.inner.creds.current().node.clone();
                match self.renew_node(conn, &node).await {
                    Ok(_) => true,
                    Err(e) => {
                        warn!(error = %e, "node SVID renewal failed; retrying");
                        if let SpokeError::Refused {
                            code: ErrorCode::Revoked,
                            ..
                        } = e
                        {
                            self.set_state(State::Revoked, Some(e.to_string()));
                        }
                        false
                    }
                }
            }
            Action::RenewNodeCa => match self.ensure_node_ca(conn).await {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "node CA renewal failed; retrying");
                    false
                }
            },
            Action::RefreshTime => match self.refresh_time(conn).await {
                Ok(()) => {
                    self.touch_contact();
                    true
                }
                Err(e) => {
                    warn!(error = %e, "no time anchor from the hub");
                    false
                }
            },
        }
    }

    pub(crate) async fn renew_node(
        &self,
        conn: &quinn::Connection,
        node: &Svid,
    ) -> Result<Arc<Svid>, SpokeError> {
        let csr = svid::make_csr(&node.key, &self.inner.ident.id)?;
        let resp = tidemesh_net::request(conn, &Request::Renew { csr }, REQUEST_TIMEOUT).await?;
        let (chain, bundle) = expect_cert(resp)?;
        let s = self.install_node(chain, bundle).await?;
        info!(target: "tidemesh::audit", spoke = %s.id, not_after = %rfc3339(s.not_after), "node SVID installed");
        self.record_cert(&s, tidemesh_evidence::record::CertEventKind::Renewed);
        self.touch_contact();
        Ok(s)
    }
}
