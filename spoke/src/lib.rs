//! The tidemesh spoke: enrolls once with a join token, then keeps an mTLS
//! control session to the hub, renews its SVIDs at half life, and keeps
//! serving from its cached certificates whenever the hub is unreachable,
//! including after a restart during a partition.
//!
//! Entry points take their clock and bound socket so tests and simulations
//! run spokes in-process and in virtual time: [`enroll`], [`Spoke::open`],
//! [`Spoke::run`].
//!
//! # Expired certificates and the max-offline window
//! A partition can outlast the node SVID. When the link returns with an
//! expired SVID, the spoke opens a connection without a client certificate
//! and proves possession of the node key that the hub pinned at enrollment:
//! it signs a challenge derived from *this* TLS session (an RFC 5705
//! exporter value bound to the spoke ID), so a recorded proof is useless on
//! any other connection. The hub re-issues to the pinned key only if the
//! spoke is not revoked and its last contact lies within the hub's
//! max-offline window (default 30 days). Past the window a new join token is
//! required: a key that sat unattended on a box for longer than the window
//! is not trusted on its own. The key never leaves the box, so the risk is
//! the same as for a stolen unexpired certificate, bounded by the window and
//! by revocation, which is checked first.

pub mod buffer;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod creds;
pub mod dataplane;
mod evsync;
pub mod modes;
pub mod replica;
pub mod survival;

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tidemesh_identity::{
    clock::Clock,
    naming, svid,
    trusted_time::{TimeFloor, TimeSettings},
    verify::{self, ExactId, ServerTrust, TrustBundle},
    SpiffeId,
};
use tidemesh_net::{admin, NetError, QuicSettings};
use tidemesh_policy::MeshConfig;
use tidemesh_proto::{close, ErrorCode, JoinToken, Push, Request, Response, ALPN_CTL};
use tracing::{debug, info, warn};

pub use clock::TrustedClock;
pub use config::{FileConfig, WorkloadConfig};
pub use credentials::{Credentials, Svids};
pub use creds::{CredStore, CredsError, Svid};
pub use evsync::{SyncSettings, SyncStats};

/// The SNI name used towards the hub; the SPIFFE verifier ignores it.
const SNI: &str = "hub.tidemesh.invalid";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Spoke settings.
#[derive(Debug, Clone)]
pub struct SpokeConfig {
    /// Overrides the hub address stored at enrollment.
    pub hub: Option<SocketAddr>,
    /// The file configuration (workloads).
    pub file: FileConfig,
    /// Renew SVIDs this far into their lifetime (0.5 = half life).
    pub renew_fraction: f64,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay (jittered exponential backoff up to this).
    pub reconnect_max: Duration,
    /// QUIC transport settings.
    pub quic: QuicSettings,
    /// Serve the admin socket in the data directory.
    pub admin_socket: bool,
    /// Seed for jitter (random if `None`).
    pub seed: Option<u64>,
    /// How often local workloads' health paths are checked.
    pub health_interval: Duration,
    /// The evidence buffer (`evidence.db`): capacity, group commit.
    pub evidence: buffer::BufferConfig,
    /// Evidence sync pacing.
    pub sync: SyncSettings,
    /// Serve Prometheus `/metrics` here.
    pub metrics: Option<SocketAddr>,
    /// Data plane limits and timeouts.
    pub data: dataplane::DataSettings,
    /// The data tunnel's UDP socket, already bound (`data_listen` is then
    /// only what is advertised): lets simulations run the data plane on a
    /// virtual network. `None`: bind `data_listen` (or an ephemeral port).
    pub data_socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    /// How often the spoke reports its survival horizon to the hub.
    pub report_interval: Duration,
    /// How often a connected spoke asks the hub for a fresh time anchor.
    pub anchor_interval: Duration,
}

impl Default for SpokeConfig {
    fn default() -> Self {
        Self {
            hub: None,
            file: FileConfig::default(),
            renew_fraction: 0.5,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(2),
            quic: QuicSettings::default(),
            admin_socket: true,
            seed: None,
            health_interval: Duration::from_secs(2),
            evidence: buffer::BufferConfig::default(),
            sync: SyncSettings::default(),
            metrics: None,
            data: dataplane::DataSettings::default(),
            data_socket: None,
            report_interval: Duration::from_secs(30),
            anchor_interval: Duration::from_secs(600),
        }
    }
}

/// Errors of the spoke's operations.
#[derive(Debug, thiserror::Error)]
pub enum SpokeError {
    /// The credential cache failed.
    #[error(transparent)]
    Creds(#[from] CredsError),
    /// The token is malformed.
    #[error(transparent)]
    Token(#[from] tidemesh_proto::TokenError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The hub refused.
    #[error("hub refused: {code}: {message}")]
    Refused {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The hub answered something unexpected.
    #[error("unexpected answer from the hub: {0}")]
    Unexpected(String),
    /// Certificate handling failed.
    #[error("certificate: {0}")]
    Cert(#[from] svid::IssueError),
    /// Already enrolled.
    #[error("{0} already holds an enrolled spoke: pass --force to replace it")]
    AlreadyEnrolled(PathBuf),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// The data plane could not start (a port taken, credentials unusable).
    #[error(transparent)]
    DataPlane(#[from] dataplane::DataPlaneError),
}

fn tls_err(e: rustls::Error) -> NetError {
    NetError::Tls(e.to_string())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn expect_cert(
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

fn client_endpoint(socket: Arc<dyn quinn::AsyncUdpSocket>) -> Result<quinn::Endpoint, NetError> {
    tidemesh_net::quic::endpoint(socket, None)
}

async fn connect(
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
    .await;
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

/// Aborts a task when dropped (the session's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the spoke is doing, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Trying to reach the hub.
    Connecting,
    /// A control session is up.
    Connected,
    /// The hub is unreachable; serving from the cache.
    Disconnected,
    /// The hub revoked this spoke.
    Revoked,
    /// Past the max-offline window: a new join token is needed.
    NeedsEnrollment,
}

#[derive(Debug)]
struct Live {
    state: State,
    last_error: Option<String>,
    last_contact_ms: Option<u64>,
}

/// The config in force: the last-known-good, decoded once.
#[derive(Debug)]
pub struct ConfigInForce {
    /// Version, times and the snapshot as stored.
    pub applied: replica::Applied,
    /// The decoded config.
    pub config: Arc<MeshConfig>,
}

/// The config in force, as published (`None` before the first config).
pub type ConfigWatch = tokio::sync::watch::Receiver<Option<Arc<ConfigInForce>>>;

/// Whether the hub is reachable now, and where: its gateway listens on the
/// same QUIC endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubLink {
    /// A control session is up.
    pub connected: bool,
    /// The address the session reached.
    pub addr: Option<SocketAddr>,
}

/// Appends evidence records, stamped with trusted time, without waiting
/// for the commit; a no-op until the buffer is open. Cheap to clone: every
/// component that writes evidence holds one.
#[derive(Clone)]
pub struct EvidenceSink {
    buffer: Arc<std::sync::OnceLock<buffer::EvidenceBuffer>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for EvidenceSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceSink")
            .field("open", &self.buffer.get().is_some())
            .finish()
    }
}

impl EvidenceSink {
    /// Appends one record; returns its sequence number. A refusal (buffer
    /// full of audit records, writer stopped) is logged on the audit target.
    pub fn record(&self, body: tidemesh_evidence::RecordBody) -> Option<u64> {
        let b = self.buffer.get()?;
        let now = tidemesh_evidence::UnixMillis(unix_ms(self.clock.now()));
        match b.append(tidemesh_evidence::NewRecord::new(now, body)) {
            Ok(t) => Some(t.seq().get()),
            Err(e) => {
                warn!(target: "tidemesh::audit", error = %e, "evidence append failed");
                None
            }
        }
    }

    /// The buffer, once open.
    pub fn get(&self) -> Option<&buffer::EvidenceBuffer> {
        self.buffer.get()
    }

    /// Opens the sink onto `buf` (once).
    fn set(&self, buf: buffer::EvidenceBuffer) {
        let _ = self.buffer.set(buf);
    }
}

struct Inner {
    /// The durable evidence buffer (`evidence.db`), open while `run` is.
    evidence: EvidenceSink,
    /// Evidence sync counters.
    sync: Mutex<SyncStats>,
    /// What the data plane did (for `/metrics`).
    data_counters: Arc<dataplane::Counters>,
    /// The last-known-good config replica (`spoke.db`).
    replica: replica::Replica,
    /// The config in force: the last-known-good, decoded; published to the
    /// data plane and the mode machine.
    config: tokio::sync::watch::Sender<Option<Arc<ConfigInForce>>>,
    /// Whether the hub is reachable, published to the data plane.
    hub_link: tokio::sync::watch::Sender<HubLink>,
    /// The modes (the seed's mode matrix, live).
    modes: Arc<modes::Modes>,
    /// Last time the hub confirmed the config is current (ms).
    config_checked_ms: Mutex<Option<u64>>,
    /// Registry generation of the slice in force (in memory: 0 after a
    /// restart, so the hub resends the slice once).
    registry_gen: Mutex<u64>,
    /// Health of each local workload (service account → healthy), from the
    /// spoke's own checks; kept current with or without the hub; published
    /// to the data plane and the registration.
    health: tokio::sync::watch::Sender<Arc<std::collections::BTreeMap<String, bool>>>,
    /// Wakes the issuing loop (a node CA was installed).
    issue_wake: tokio::sync::Notify,
    /// Why the hub refused this spoke's last registration, if it did.
    registration_error: Mutex<Option<String>>,
    /// `host:port` of the hub, resolved at each connection attempt.
    hub: String,
    store: CredStore,
    ident: creds::Identity,
    cfg: SpokeConfig,
    /// Trusted time (the same object as `tclock`), for TLS and evidence.
    clock: Arc<dyn Clock>,
    tclock: Arc<TrustedClock>,
    /// The credentials in force (node SVID, node CA, workload SVIDs,
    /// revocation list).
    creds: Arc<Credentials>,
    /// The evidence buffer's append rate (survival horizon).
    evidence_rate: Mutex<survival::RateMeter>,
    /// Same-site peer spokes (reachable, known) at the last probe round.
    site_reach: Mutex<(u32, u32)>,
    /// The running data plane, for probes.
    data: std::sync::OnceLock<std::sync::Weak<dataplane::Shared>>,
    live: Mutex<Live>,
    rng: Mutex<StdRng>,
}

/// A loaded, enrolled spoke. Cheap to clone.
#[derive(Clone)]
pub struct Spoke {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spoke")
            .field("id", &self.inner.ident.id.to_string())
            .finish()
    }
}

enum SessionEnd {
    /// The session ran and then the connection ended.
    Lost(String),
    /// Shutdown requested.
    Shutdown,
}

impl Spoke {
    /// Loads an enrolled spoke from its data directory; needs no network.
    ///
    /// `wall` is the wall clock; the spoke runs on trusted time built from
    /// it, the persisted floor and monotonic time (see [`clock`]).
    pub fn open(
        data_dir: &Path,
        cfg: SpokeConfig,
        wall: Arc<dyn Clock>,
    ) -> Result<Spoke, SpokeError> {
        let store = CredStore::new(data_dir);
        let ident = store.identity()?;
        // Fail now, not at the first connection, if the cache is unusable.
        store.node()?;
        store.bundle(ident.id.trust_domain())?;
        let max_offline = store
            .policy()
            .map(|p| Duration::from_millis(p.max_offline_ms))
            .unwrap_or(Duration::from_secs(30 * 24 * 3600));
        let tclock = Arc::new(TrustedClock::boot(
            wall,
            store.time_floor(),
            TimeSettings {
                max_ahead: max_offline,
                ..TimeSettings::default()
            },
        ));
        if let Some(st) = tclock.status().filter(|s| s.state != "trusted") {
            warn!(target: "tidemesh::audit", reason = ?st.reason, "time is not trusted");
        }
        let clock: Arc<dyn Clock> = tclock.clone();
        let creds = Arc::new(Credentials::open(
            store.clone(),
            ident.id.clone(),
            cfg.file
                .workloads
                .iter()
                .map(|w| w.service_account.clone())
                .collect(),
            clock.clone(),
            cfg.renew_fraction,
        )?);
        let hub = match (cfg.hub, &cfg.file.hub) {
            (Some(a), _) => a.to_string(),
            (None, Some(h)) => h.clone(),
            (None, None) => ident.hub.clone(),
        };
        config::check_hub_addr(&hub)
            .map_err(|e| SpokeError::Invalid(format!("hub address {hub:?}: {e}")))?;
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let last_contact_ms = store.contact().last_contact_ms;
        let replica =
            replica::Replica::open(store.dir()).map_err(|e| SpokeError::Invalid(e.to_string()))?;
        let config = match replica.last_known_good() {
            Ok(Some(a)) => match postcard::from_bytes::<MeshConfig>(&a.snapshot) {
                Ok(c) => {
                    info!(version = a.version, "serving the last-known-good config");
                    Some(Arc::new(ConfigInForce {
                        applied: a,
                        config: Arc::new(c),
                    }))
                }
                Err(e) => {
                    warn!(version = a.version, error = %e, "last-known-good config does not decode; ignoring it");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "cannot read the last-known-good config");
                None
            }
        };
        let evidence = EvidenceSink {
            buffer: Arc::new(std::sync::OnceLock::new()),
            clock: clock.clone(),
        };
        let matrix = config
            .as_ref()
            .map(|c| c.config.mode_matrix.clone())
            .unwrap_or_default();
        let sink = evidence.clone();
        let modes = Arc::new(
            modes::Modes::new(&matrix, cfg.seed, Arc::new(move |b| sink.record(b)))
                .map_err(SpokeError::Invalid)?,
        );
        Ok(Spoke {
            inner: Arc::new(Inner {
                evidence,
                modes,
                hub_link: tokio::sync::watch::channel(HubLink::default()).0,
                data_counters: Arc::new(dataplane::Counters::default()),
                sync: Mutex::new(SyncStats {
                    sync_state: "disconnected",
                    ..SyncStats::default()
                }),
                replica,
                config: tokio::sync::watch::channel(config).0,
                config_checked_ms: Mutex::new(None),
                registry_gen: Mutex::new(0),
                health: tokio::sync::watch::channel(Arc::new(
                    cfg.file
                        .workloads
                        .iter()
                        .map(|w| (w.service_account.clone(), w.health.is_none()))
                        .collect(),
                ))
                .0,
                issue_wake: tokio::sync::Notify::new(),
                registration_error: Mutex::new(None),
                store,
                ident,
                cfg,
                clock,
                tclock,
                creds,
                evidence_rate: Mutex::new(survival::RateMeter::default()),
                site_reach: Mutex::new((0, 0)),
                data: std::sync::OnceLock::new(),
                live: Mutex::new(Live {
                    state: State::Connecting,
                    last_error: None,
                    last_contact_ms,
                }),
                hub,
                rng: Mutex::new(rng),
            }),
        })
    }

    /// The node ID.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.ident.id
    }

    fn set_state(&self, state: State, error: Option<String>) {
        let changed = match self.inner.live.lock() {
            Ok(mut l) => {
                let changed = l.state != state;
                if changed {
                    info!(spoke = %self.inner.ident.id, from = ?l.state, to = ?state, "spoke state");
                }
                l.state = state;
                if error.is_some() || state == State::Connected {
                    l.last_error = error;
                }
                changed
            }
            Err(_) => false,
        };
        let connected = state == State::Connected;
        self.inner.hub_link.send_if_modified(|h| {
            let was = h.connected;
            h.connected = connected;
            was != connected
        });
        if changed {
            self.report_reachability();
        }
    }

    /// Tells the mode machine what is reachable now: the hub (its control
    /// session), the same-site peers (the last probe round), the cloud
    /// services (through the hub's gateway).
    fn report_reachability(&self) {
        use tidemesh_policy::mode::{EndpointCount, Reachability};
        use tidemesh_policy::routing::LocalityTier;
        let hub = self.hub_connected();
        let (up, total) = self.inner.site_reach.lock().map(|r| *r).unwrap_or((0, 0));
        let cloud = self
            .config()
            .map(|c| {
                c.service_entries
                    .iter()
                    .map(|e| e.endpoints.len().max(1) as u32)
                    .sum::<u32>()
            })
            .unwrap_or(0);
        let mut r = Reachability::new(hub);
        if let Ok(site) = EndpointCount::new(up.min(total), total) {
            r = r.with_tier(LocalityTier::SameSite, site);
        }
        let cloud = if hub {
            EndpointCount::all(cloud)
        } else {
            EndpointCount::unreachable(cloud)
        };
        r = r.with_tier(LocalityTier::Cloud, cloud);
        self.inner.modes.reachability(r);
    }

    fn state(&self) -> State {
        self.inner
            .live
            .lock()
            .map(|l| l.state)
            .unwrap_or(State::Disconnected)
    }

    fn touch_contact(&self) {
        self.touch_contact_at(self.inner.clock.now());
    }

    fn touch_contact_at(&self, at: SystemTime) {
        let now = unix_ms(at);
        if let Ok(mut l) = self.inner.live.lock() {
            l.last_contact_ms = Some(now);
        }
        if let Err(e) = self.inner.store.save_contact(&creds::ContactState {
            last_contact_ms: Some(now),
        }) {
            warn!(error = %e, "cannot persist last contact");
        }
    }

    /// The survival horizon now (see [`survival`]).
    pub fn horizon(&self) -> survival::Horizon {
        let now = self.inner.clock.now();
        let cur = self.inner.creds.current();
        let connected = self.state() == State::Connected;
        let last_contact = if connected {
            Some(now)
        } else {
            self.inner
                .live
                .lock()
                .ok()
                .and_then(|l| l.last_contact_ms)
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        };
        let evidence = self.inner.evidence.get().map(|b| {
            let st = b.stats(tidemesh_evidence::UnixMillis(unix_ms(now)));
            let rate = self
                .inner
                .evidence_rate
                .lock()
                .map(|r| r.bytes_per_s())
                .unwrap_or(0.0);
            (st.capacity_bytes, st.pending_bytes, rate)
        });
        survival::horizon(&survival::Inputs {
            now: Some(now),
            node_ca_not_after: cur.node_ca.map(|f| f.not_after),
            last_contact,
            max_offline: self
                .inner
                .creds
                .policy()
                .map(|p| Duration::from_millis(p.max_offline_ms)),
            evidence,
            drift_budget: Some(self.inner.tclock.drift_budget()),
        })
    }

    /// Probes the same-site endpoints of `service` as local workload
    /// `account` over the data tunnel (mTLS with the workload's SVID): one
    /// JSON object per endpoint (see `dataplane::probe_site`).
    pub async fn probe(&self, account: &str, service: &str) -> Result<Value, String> {
        let data = self
            .inner
            .data
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or("the data plane is not running (no data_listen, outbound or tcp_outbound in the config)")?;
        Ok(Value::Array(
            dataplane::probe_site(&data, account, service).await?,
        ))
    }

    /// `evidence stats` of the running spoke (buffer and sync), if the
    /// buffer is open.
    pub fn evidence_stats(&self) -> Option<Value> {
        let b = self.inner.evidence.get()?;
        let now = tidemesh_evidence::UnixMillis(unix_ms(self.inner.clock.now()));
        let mut v = serde_json::to_value(b.stats(now)).ok()?;
        let sync = serde_json::to_value(self.sync_stats()).ok()?;
        if let (Some(o), Value::Object(s)) = (v.as_object_mut(), sync) {
            o.extend(s);
        }
        Some(v)
    }

    /// The status document (`tidemesh-spoke status --json`).
    pub fn status(&self) -> Value {
        let now = self.inner.clock.now();
        let hub = &self.inner.hub;
        let (state, last_error, last_contact_ms) = match self.inner.live.lock() {
            Ok(l) => (l.state, l.last_error.clone(), l.last_contact_ms),
            Err(_) => (State::Disconnected, None, None),
        };
        let cfg = self
            .inner
            .config
            .borrow()
            .as_ref()
            .map(|c| c.applied.clone());
        let checked = self.inner.config_checked_ms.lock().ok().and_then(|c| *c);
        let connected = state == State::Connected;
        let last_contact = if connected {
            Some(now)
        } else {
            last_contact_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        };
        let cur = self.inner.creds.current();
        let node = &cur.node;
        let workloads: Vec<Value> = self
            .inner
            .cfg
            .file
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let s = cur.workloads.get(i).cloned().flatten();
                json!({
                    "service_account": w.service_account,
                    "id": s.as_ref().map(|s| s.id.to_string()),
                    "cert_not_after": s.as_ref().map(|s| rfc3339(s.not_after)),
                    "issued_by": s.as_ref().and_then(|s| s.chain.get(1)).and_then(|c| svid::cert_spiffe_id(c).ok()).map(|id| format!("node CA {id}")),
                })
            })
            .collect();
        let horizon = self.horizon();
        let revocations = self.inner.creds.revocations().current();
        let ca_error = self.inner.creds.last_error();
        json!({
            "id": self.inner.ident.id.to_string(),
            "connected": connected,
            "state": state,
            "hub": hub,
            "cert_not_after": rfc3339(node.not_after),
            "cert_time_left_s": node.not_after.duration_since(now).map(|d| d.as_secs() as i64).unwrap_or_else(|e| -(e.duration().as_secs() as i64)),
            "cert_expired": node.expired(now),
            "node_ca_not_after": cur.node_ca.map(|f| rfc3339(f.not_after)),
            "node_ca_expired": cur.node_ca.map(|f| now >= f.not_after),
            "issue_error": ca_error,
            "last_contact": last_contact.map(rfc3339),
            "last_contact_age_s": last_contact.map(|t| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0)),
            "last_error": last_error,
            "workloads": workloads,
            "mode": self.inner.modes.view().spoke,
            "modes": &*self.inner.modes.view(),
            "survival_horizon_s": horizon.survival_horizon_s,
            "survival_limit": horizon.survival_limit,
            "survival_budgets": horizon.survival_budgets,
            "time_trust": self.inner.tclock.status(),
            "revocation_version": revocations.as_ref().map_or(0, |l| l.version),
            "revocation_issued_at": revocations.as_ref().filter(|l| l.version > 0).map(|l| rfc3339(UNIX_EPOCH + Duration::from_millis(l.issued_ms))),
            // While connected the hub pushes every new list at once; offline,
            // a revocation made since the last contact is not known here.
            "revocation_stale_s": if connected { Some(0) } else { last_contact.map(|t| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0)) },
            "config_version": cfg.as_ref().map(|a| a.version),
            "config_age_s": cfg.as_ref().map(|a| now.duration_since(UNIX_EPOCH + Duration::from_millis(a.hub_applied_ms)).map(|d| d.as_secs()).unwrap_or(0)),
            "config_applied_at": cfg.as_ref().map(|a| rfc3339(UNIX_EPOCH + Duration::from_millis(a.applied_ms))),
            "config_checked_at": checked.map(|ms| rfc3339(UNIX_EPOCH + Duration::from_millis(ms))),
            "local_endpoints": self.local_endpoints().iter().map(|e| json!({
                "service_account": e.service_account,
                "service": e.service,
                "address": e.address,
                "healthy": e.healthy,
            })).collect::<Vec<_>>(),
            "registry": self.local_registry(),
            "registration_error": self.inner.registration_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// The endpoints this spoke can route to without the hub: its own
    /// healthy local workloads (an unhealthy one leaves at once, hub or no
    /// hub) and the healthy endpoints of other spokes at its site from the
    /// last slice.
    pub fn local_registry(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .local_endpoints()
            .into_iter()
            .filter(|e| e.healthy)
            .map(|e| json!({"service": e.service, "service_account": e.service_account, "address": e.address, "origin": "local"}))
            .collect();
        out.extend(
            self.site_workloads()
                .iter()
                .map(|w| json!({"service": w.service, "service_account": w.service_account, "address": w.address, "origin": "site"})),
        );
        out
    }

    /// The workloads of other spokes at this spoke's site, from the last
    /// config slice (the hub sends only healthy ones).
    pub fn site_workloads(&self) -> Vec<tidemesh_policy::model::Workload> {
        match self.config() {
            Some(cfg) => self.site_workloads_of(&cfg),
            None => Vec::new(),
        }
    }

    /// [`Spoke::site_workloads`] of a given config.
    pub(crate) fn site_workloads_of(
        &self,
        cfg: &MeshConfig,
    ) -> Vec<tidemesh_policy::model::Workload> {
        dataplane::resolve::site_workloads(&self.inner.ident.id, &self.inner.cfg.file, cfg)
    }

    /// The config in force (the last-known-good replica), if any.
    pub fn config(&self) -> Option<Arc<MeshConfig>> {
        self.inner
            .config
            .borrow()
            .as_ref()
            .map(|c| c.config.clone())
    }

    /// The version of the config in force.
    pub fn config_version(&self) -> Option<u64> {
        self.inner
            .config
            .borrow()
            .as_ref()
            .map(|c| c.applied.version)
    }

    /// Validates a snapshot from the hub and makes it the last-known-good,
    /// atomically (one redb transaction), then the config in force.
    fn apply_config(
        &self,
        version: u64,
        registry: u64,
        hub_applied_ms: u64,
        snapshot: Vec<u8>,
    ) -> Result<(), SpokeError> {
        let cfg: MeshConfig = postcard::from_bytes(&snapshot).map_err(|e| {
            SpokeError::Unexpected(format!("config version {version} does not decode: {e}"))
        })?;
        let previous = self.config_version();
        self.record_config(
            version,
            previous,
            &snapshot,
            tidemesh_evidence::record::ConfigSource::Hub,
        );
        let applied = replica::Applied {
            version,
            hub_applied_ms,
            applied_ms: unix_ms(self.inner.clock.now()),
            snapshot,
        };
        self.inner
            .replica
            .apply(&applied)
            .map_err(|e| SpokeError::Invalid(e.to_string()))?;
        let cfg = Arc::new(cfg);
        self.inner.modes.config(&cfg.mode_matrix);
        self.inner.config.send_replace(Some(Arc::new(ConfigInForce {
            applied,
            config: cfg,
        })));
        if let Ok(mut g) = self.inner.registry_gen.lock() {
            *g = registry;
        }
        info!(target: "tidemesh::audit", version, registry, "config applied");
        Ok(())
    }

    /// Keeps the config current while the session lasts (long polls).
    async fn sync_loop(&self, conn: quinn::Connection) {
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
                    self.install_revocations(&revocations);
                    if !sync.handle_config(version, registry) {
                        continue;
                    }
                    if let Err(e) = self.apply_config(version, registry, applied_ms, snapshot) {
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
                    if let Err(e) = self.apply_config(version, registry, applied_ms, snapshot) {
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

    /// Appends synthetic request records tagged as drill records at `rate`
    /// per second for `duration`, then waits for their commit: load for
    /// drills on devices without real traffic.
    async fn drill_load(&self, rate: f64, duration: Duration) -> Result<Value, String> {
        if !(rate > 0.0 && rate <= 100_000.0) {
            return Err(format!(
                "rate {rate}: must be between 0 and 100000 records/s"
            ));
        }
        if duration.is_zero() || duration > Duration::from_secs(24 * 3600) {
            return Err("duration must be between 1 ms and 24 h".into());
        }
        let b = self
            .inner
            .evidence
            .get()
            .ok_or("the evidence buffer is not open")?;
        let run = format!("drill-{}", unix_ms(self.inner.clock.now()));
        let period = Duration::from_secs_f64(1.0 / rate);
        let start = tokio::time::Instant::now();
        let total = (rate * duration.as_secs_f64()).floor() as u64;
        let (mut appended, mut refused) = (0u64, 0u64);
        let mut last_ticket = None;
        for i in 0..total {
            tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
            let now = tidemesh_evidence::UnixMillis(unix_ms(self.inner.clock.now()));
            let body = tidemesh_evidence::samples::drill_request(&run, i, now);
            match b.append(tidemesh_evidence::NewRecord::new(now, body)) {
                Ok(t) => {
                    appended += 1;
                    last_ticket = Some(t);
                }
                Err(_) => refused += 1,
            }
        }
        // Group commits are written in order by one writer: once the last
        // drill record is durable, every earlier accepted one is too.
        let last = match last_ticket {
            Some(t) => Some(t.committed().await.map_err(|e| e.to_string())?.get()),
            None => None,
        };
        let committed = if last.is_some() { appended } else { 0 };
        Ok(
            json!({"run": run, "appended": appended, "committed": committed, "refused": refused, "last_seq": last}),
        )
    }

    /// Appends a system record to the evidence buffer (if it is open); the
    /// caller never waits on disk.
    fn record(&self, body: tidemesh_evidence::RecordBody) {
        self.inner.evidence.record(body);
    }

    /// The guarantee vector of `service` now (see `dataplane::vector`).
    pub fn vector(&self, service: &str) -> Result<Value, String> {
        let data = self
            .inner
            .data
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or("the data plane is not running (no data_listen, outbound or tcp_outbound in the config)")?;
        let mut v = dataplane::vector::vector(&data, service)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("spoke".into(), json!(self.inner.ident.id.to_string()));
            o.insert("config_version".into(), json!(self.config_version()));
        }
        Ok(v)
    }

    fn record_config(
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

    fn record_cert(&self, s: &Svid, event: tidemesh_evidence::record::CertEventKind) {
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

    /// This spoke's local endpoints with their current health.
    fn local_endpoints(&self) -> Vec<tidemesh_proto::RegisteredEndpoint> {
        let health = self.inner.health.borrow().clone();
        let advertise = self.inner.cfg.file.data_advertise;
        self.inner
            .cfg
            .file
            .workloads
            .iter()
            .map(|w| tidemesh_proto::RegisteredEndpoint {
                service_account: w.service_account.clone(),
                service: w
                    .service
                    .clone()
                    .unwrap_or_else(|| w.service_account.clone()),
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                address: advertise
                    .or(w.inbound)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                healthy: health.get(&w.service_account).copied().unwrap_or(false),
            })
            .collect()
    }

    /// Checks every local workload that declares a health path: an HTTP GET
    /// on its inbound address, healthy on a 2xx answer within a second.
    async fn health_loop(&self) {
        let checked: Vec<(String, SocketAddr, String, bool)> = self
            .inner
            .cfg
            .file
            .workloads
            .iter()
            .filter_map(|w| {
                Some((
                    w.service_account.clone(),
                    w.inbound?,
                    w.health.clone()?,
                    w.protocol == config::WorkloadProtocol::Http2,
                ))
            })
            .collect();
        if checked.is_empty() {
            return;
        }
        loop {
            for (account, addr, path, h2) in &checked {
                let ok = if *h2 {
                    http2_health(*addr, path).await
                } else {
                    http_health(*addr, path).await
                };
                let changed = self.inner.health.send_if_modified(|h| {
                    if h.get(account) == Some(&ok) {
                        return false;
                    }
                    let mut n = (**h).clone();
                    n.insert(account.clone(), ok);
                    *h = Arc::new(n);
                    true
                });
                if changed {
                    info!(workload = %account, healthy = ok, "local endpoint health changed");
                }
            }
            tokio::time::sleep(self.inner.cfg.health_interval).await;
        }
    }

    /// Registers the local endpoints with the hub now and whenever their
    /// health changes, for as long as the session lasts.
    async fn register_loop(&self, conn: quinn::Connection) {
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

    fn jitter(&self, d: Duration) -> Duration {
        // Full jitter over [d/2, d].
        let f: f64 = self
            .inner
            .rng
            .lock()
            .map(|mut r| r.random_range(0.5..=1.0))
            .unwrap_or(0.75);
        d.mul_f64(f)
    }

    /// What the data plane is handed: the spoke's state as watches and
    /// handles (it never sees the spoke).
    fn data_handles(&self) -> dataplane::Handles {
        let i = &self.inner;
        dataplane::Handles {
            node_id: i.ident.id.clone(),
            file: i.cfg.file.clone(),
            data_socket: i.cfg.data_socket.clone(),
            clock: i.tclock.clone(),
            creds: i.creds.clone(),
            config: i.config.subscribe(),
            health: i.health.subscribe(),
            hub: i.hub_link.subscribe(),
            modes: i.modes.clone(),
            evidence: i.evidence.clone(),
            counters: i.data_counters.clone(),
        }
    }

    /// Whether a control session with the hub is up now.
    pub(crate) fn hub_connected(&self) -> bool {
        self.inner
            .live
            .lock()
            .map(|l| l.state == State::Connected)
            .unwrap_or(false)
    }

    async fn hub_addr(&self) -> Result<SocketAddr, SpokeError> {
        if let Some(a) = self.inner.cfg.hub {
            return Ok(a);
        }
        if let Ok(a) = self.inner.hub.parse() {
            return Ok(a);
        }
        tokio::net::lookup_host(self.inner.hub.as_str())
            .await
            .map_err(|e| {
                SpokeError::Invalid(format!("cannot resolve hub {}: {e}", self.inner.hub))
            })?
            .next()
            .ok_or_else(|| {
                SpokeError::Invalid(format!("hub {} resolves to no address", self.inner.hub))
            })
    }

    fn bundle(&self) -> Result<TrustBundle, SpokeError> {
        Ok(self.inner.creds.current().bundle.clone())
    }

    fn hub_authorizer(&self) -> Arc<ExactId> {
        Arc::new(ExactId(naming::hub_id(self.inner.ident.id.trust_domain())))
    }

    /// Runs until `shutdown` resolves: keeps the control session up, renews,
    /// reconnects, and serves `status` on the admin socket throughout.
    pub async fn run(
        &self,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SpokeError> {
        let endpoint = client_endpoint(socket)?;
        let metrics_task = match self.inner.cfg.metrics {
            Some(addr) => {
                let l = tidemesh_net::metrics::bind(addr)
                    .await
                    .map_err(|e| SpokeError::Invalid(format!("--metrics {addr}: {e}")))?;
                info!(addr = %l.local_addr().unwrap_or(addr), "serving /metrics");
                let me = self.clone();
                Some(AbortOnDrop(tokio::spawn(tidemesh_net::metrics::serve(
                    l,
                    move || {
                        let me = me.clone();
                        async move { me.metrics_page() }
                    },
                ))))
            }
            None => None,
        };
        let admin_task = if self.inner.cfg.admin_socket {
            let path = admin::socket_path(self.inner.store.dir());
            let listener = admin::bind(&path)
                .map_err(|e| SpokeError::Invalid(format!("{}: {e}", path.display())))?;
            let me = self.clone();
            Some(tokio::spawn(admin::serve(listener, move |_caller, req| {
                let me = me.clone();
                async move { me.admin(req).await }
            })))
        } else {
            None
        };
        let path = self.inner.store.dir().join("evidence.db");
        let buf = match buffer::EvidenceBuffer::open(
            &path,
            &self.inner.ident.id,
            self.inner.cfg.evidence.clone(),
        ) {
            // Traffic matters more than a damaged record: keep running and
            // appending after it, say so loudly, and let the hub flag the
            // break when the record reaches it (it refuses the batch).
            Err(buffer::OpenError::ChainBroken(e)) => {
                warn!(target: "tidemesh::audit", error = %e, "evidence buffer chain is broken; running on, the hub will refuse and flag the damaged record; see `tidemesh-spoke evidence verify`");
                self.sync_update(|s| s.sync_last_error = Some(format!("local evidence chain broken: {e}")));
                buffer::EvidenceBuffer::open(
                    &path,
                    &self.inner.ident.id,
                    buffer::BufferConfig {
                        tail_check: 0,
                        ..self.inner.cfg.evidence.clone()
                    },
                )
            }
            other => other,
        }
        .map_err(|e| SpokeError::Invalid(format!("{}: {e}", path.display())))?;
        // Every record was stamped with trusted time: the newest one is a
        // floor at least as fresh as time.json (a crash loses the last
        // minute of that, never of committed evidence).
        if let Ok(last) = buf.tail(1) {
            if let Some(r) = last.first() {
                let was = self.inner.tclock.trusted();
                self.inner.tclock.raise_floor(r.timestamp.0);
                if was && !self.inner.tclock.trusted() {
                    warn!(target: "tidemesh::audit", reason = ?self.inner.tclock.status().and_then(|s| s.reason), "time is not trusted");
                }
            }
        }
        self.inner.evidence.set(buf);
        if let Some(c) = self.inner.config.borrow().clone() {
            self.record_config(
                c.applied.version,
                None,
                &c.applied.snapshot,
                tidemesh_evidence::record::ConfigSource::Cache,
            );
        }
        // Workload SVIDs due now are issued before the data plane binds,
        // with or without the hub; the loop keeps them fresh from then on.
        {
            let creds = self.inner.creds.clone();
            if let Ok((issued, _)) = tokio::task::spawn_blocking(move || creds.issue_due()).await {
                for s in &issued {
                    self.record_cert(s, tidemesh_evidence::record::CertEventKind::Issued);
                }
            }
        }
        let me = self.clone();
        let _issue = AbortOnDrop(tokio::spawn(async move { me.issue_loop().await }));
        let me = self.clone();
        let _clock = AbortOnDrop(tokio::spawn(async move { me.clock_loop().await }));
        let _modes = AbortOnDrop(tokio::spawn(self.inner.modes.clone().drive()));
        // The data plane binds now, so a taken port stops the spoke before
        // the hub session starts; it serves without the hub from here on.
        let _data = if dataplane::needed(&self.inner.cfg.file) {
            let data = dataplane::DataPlane::bind(self.data_handles(), self.inner.cfg.data.clone())
                .await?;
            let _ = self.inner.data.set(data.shared());
            Some(AbortOnDrop(tokio::spawn(data.serve())))
        } else {
            None
        };
        let me = self.clone();
        let _health = AbortOnDrop(tokio::spawn(async move { me.health_loop().await }));
        let me = self.clone();
        let _reach = AbortOnDrop(tokio::spawn(async move { me.reachability_loop().await }));
        info!(spoke = %self.inner.ident.id, hub = %self.inner.hub, "spoke running");
        tokio::pin!(shutdown);
        let mut backoff = self.inner.cfg.reconnect_min;
        loop {
            let end = tokio::select! {
                _ = &mut shutdown => SessionEnd::Shutdown,
                r = self.session(&endpoint) => match r {
                    Ok(end) => end,
                    Err(e) => {
                        let (state, msg) = self.classify_failure(&e);
                        self.set_state(state, Some(msg.clone()));
                        warn!(spoke = %self.inner.ident.id, error = %msg, "hub session failed");
                        SessionEnd::Lost(msg)
                    }
                },
            };
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(reason) => {
                    if self.state() == State::Connected {
                        self.set_state(State::Disconnected, Some(reason));
                    }
                    if self.state() == State::Connecting {
                        self.set_state(State::Disconnected, None);
                    }
                }
            }
            let wait = match self.state() {
                // Nothing a retry can fix soon; still retry, slowly, so an
                // operator's fix (unrevoke, new window) is picked up.
                State::Revoked | State::NeedsEnrollment => Duration::from_secs(60),
                _ => self.jitter(backoff),
            };
            backoff = (backoff * 2).min(self.inner.cfg.reconnect_max);
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
            if self.state() == State::Connected {
                backoff = self.inner.cfg.reconnect_min;
            }
        }
        endpoint.close(
            quinn::VarInt::from_u32(close::SHUTDOWN),
            b"spoke shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        self.save_time_floor();
        if let Some(t) = admin_task {
            t.abort();
            let _ = std::fs::remove_file(admin::socket_path(self.inner.store.dir()));
        }
        drop(metrics_task);
        Ok(())
    }

    fn classify_failure(&self, e: &SpokeError) -> (State, String) {
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

    async fn admin(&self, req: Value) -> Result<Value, String> {
        match req.get("cmd").and_then(Value::as_str) {
            Some("drill_load") => {
                let rate = req.get("rate").and_then(Value::as_f64).unwrap_or(0.0);
                let duration_ms = req.get("duration_ms").and_then(Value::as_u64).unwrap_or(0);
                self.drill_load(rate, Duration::from_millis(duration_ms))
                    .await
            }
            Some("status") => Ok(self.status()),
            Some("vector") => {
                let service = req.get("service").and_then(Value::as_str);
                match service {
                    Some(svc) => self.vector(svc),
                    None => {
                        // every service this spoke could route to
                        let hosts = self
                            .inner
                            .data
                            .get()
                            .and_then(std::sync::Weak::upgrade)
                            .map(|d| dataplane::vector::hosts(&d))
                            .unwrap_or_default();
                        let mut out = Vec::new();
                        for h in hosts {
                            out.push(self.vector(&h)?);
                        }
                        Ok(Value::Array(out))
                    }
                }
            }
            Some("probe") => {
                let account = req.get("workload").and_then(Value::as_str).unwrap_or("");
                let service = req.get("service").and_then(Value::as_str).unwrap_or("");
                self.probe(account, service).await
            }
            Some("evidence_stats") => self
                .evidence_stats()
                .ok_or_else(|| "the evidence buffer is not open".into()),
            Some("evidence_verify") => {
                let b = self
                    .inner
                    .evidence
                    .get()
                    .ok_or("the evidence buffer is not open")?
                    .clone();
                tokio::task::spawn_blocking(move || verify_json(&b))
                    .await
                    .map_err(|e| e.to_string())
            }
            Some("evidence_tail") => {
                let b = self
                    .inner
                    .evidence
                    .get()
                    .ok_or("the evidence buffer is not open")?;
                let n = req
                    .get("n")
                    .and_then(Value::as_u64)
                    .unwrap_or(10)
                    .min(10_000) as usize;
                let recs = b.tail(n).map_err(|e| e.to_string())?;
                serde_json::to_value(recs).map_err(|e| e.to_string())
            }
            other => Err(format!("unknown admin command {other:?}")),
        }
    }

    /// Re-establishes an expired node SVID with the pinned key.
    async fn reestablish(
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
        let s = self.inner.creds.install_node(chain, bundle)?;
        info!(target: "tidemesh::audit", spoke = %s.id, not_after = %rfc3339(s.not_after), "node SVID installed");
        self.record_cert(&s, tidemesh_evidence::record::CertEventKind::Reestablished);
        Ok(s)
    }

    /// Installs a signed revocation list (from a push or a config slice)
    /// if it verifies and is newer; a bad one is logged and ignored.
    fn install_revocations(&self, signed: &tidemesh_identity::SignedRevocationList) {
        if let Err(e) = self.inner.creds.install_revocations(signed) {
            warn!(target: "tidemesh::audit", error = %e, "revocation list refused");
        }
    }

    /// Reads the hub's pushes (unidirectional streams on the control
    /// connection) for as long as the session lasts.
    async fn push_loop(&self, conn: quinn::Connection) {
        loop {
            let mut recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(_) => return,
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, tidemesh_net::read_frame::<Push>(&mut recv))
                .await
            {
                Ok(Ok(Push::Revocations(signed))) => self.install_revocations(&signed),
                Ok(Err(e)) => warn!(error = %e, "bad push from the hub"),
                Err(_) => warn!("push from the hub timed out"),
            }
        }
    }

    /// Asks the hub for a time anchor and feeds it to the trusted clock.
    async fn refresh_time(&self, conn: &quinn::Connection) -> Result<(), SpokeError> {
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
        self.save_time_floor();
        Ok(())
    }

    /// Persists the trusted-time floor (blocking write; small).
    fn save_time_floor(&self) {
        if let Err(e) = self.inner.store.save_time_floor(&self.inner.tclock.floor()) {
            warn!(error = %e, "cannot persist the trusted-time floor");
        }
    }

    /// Requests a node CA (a new key each time) if none is in force or the
    /// one in force is past half its life.
    async fn ensure_node_ca(&self, conn: &quinn::Connection) -> Result<(), SpokeError> {
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
    async fn report_loop(&self, conn: quinn::Connection) {
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

    /// How often reachability is measured and the hub health-checked: half
    /// the time the mode matrix allows per needed check (seed: 2 min / 10
    /// checks → every 6 s).
    fn check_interval(&self) -> Duration {
        let r = self
            .inner
            .modes
            .matrix()
            .map(|m| m.reconnection)
            .unwrap_or_default();
        (r.window / (2 * r.health_checks.max(1)))
            .clamp(Duration::from_millis(200), Duration::from_secs(60))
    }

    /// Measures reachability for the mode machine for as long as the spoke
    /// runs: the site's peer spokes by a probe each, the hub by its control
    /// session (a missing session is a failed health check; the session's
    /// pings are the passing ones).
    async fn reachability_loop(&self) {
        loop {
            tokio::time::sleep(self.check_interval()).await;
            if let Some(data) = self.inner.data.get().and_then(std::sync::Weak::upgrade) {
                let (up, total) = dataplane::probe_peers(&data).await;
                if let Ok(mut r) = self.inner.site_reach.lock() {
                    *r = (up, total);
                }
            }
            if !self.hub_connected() {
                self.inner.modes.health_check(false);
            }
            self.report_reachability();
        }
    }

    /// Health-checks the hub over the control session (a `Ping` answered
    /// within the check interval) for as long as the session lasts.
    async fn ping_loop(&self, conn: quinn::Connection) {
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

    /// Persists the trusted-time floor every minute (so a reboot with a bad
    /// wall clock starts from at most a minute ago) and samples the evidence
    /// buffer's append rate every 10 s (the survival horizon's budget).
    async fn clock_loop(&self) {
        let mut tick = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            tick += 1;
            if let Some(b) = self.inner.evidence.get() {
                let st = b.stats(tidemesh_evidence::UnixMillis(unix_ms(
                    self.inner.clock.now(),
                )));
                if let Ok(mut r) = self.inner.evidence_rate.lock() {
                    r.sample(
                        tokio::time::Instant::now(),
                        st.last_committed_seq,
                        st.pending_records,
                        st.pending_bytes,
                    );
                }
            }
            if tick.is_multiple_of(6) {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.save_time_floor()).await;
            }
        }
    }

    /// Issues workload SVIDs from the node CA whenever one falls due, with
    /// or without the hub, for as long as the spoke runs.
    async fn issue_loop(&self) {
        loop {
            let creds = self.inner.creds.clone();
            let (issued, next) = match tokio::task::spawn_blocking(move || creds.issue_due()).await
            {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "issuing task failed");
                    (Vec::new(), None)
                }
            };
            for s in &issued {
                self.record_cert(s, tidemesh_evidence::record::CertEventKind::Issued);
            }
            let now = self.inner.clock.now();
            // Nothing can be issued (no node CA, or it expired): look again
            // when the session installs a new node CA, or in a minute.
            let wait = next
                .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::from_secs(60))
                .max(Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.issue_wake.notified() => {}
            }
        }
    }

    /// One control session: connect (re-establishing first if the node SVID
    /// expired), say hello, anchor the time, get a node CA if due, then
    /// renew on time until the connection ends.
    async fn session(&self, endpoint: &quinn::Endpoint) -> Result<SessionEnd, SpokeError> {
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
        .await?;
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
        let mut next_anchor = tokio::time::Instant::now() + self.inner.cfg.anchor_interval;
        loop {
            let next = self.maintain(&conn).await;
            let now = self.inner.clock.now();
            let wait = next.duration_since(now).unwrap_or(Duration::ZERO);
            debug!(wait = ?wait, "next certificate maintenance");
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
                _ = tokio::time::sleep_until(next_anchor) => {
                    next_anchor = tokio::time::Instant::now() + self.inner.cfg.anchor_interval;
                    if let Err(e) = self.refresh_time(&conn).await {
                        warn!(error = %e, "no time anchor from the hub");
                    }
                    self.touch_contact();
                }
            }
        }
    }

    /// Renews the node SVID and the node CA when due; returns when to look
    /// again.
    async fn maintain(&self, conn: &quinn::Connection) -> SystemTime {
        let now = self.inner.clock.now();
        let frac = self.inner.cfg.renew_fraction;
        let retry = now + self.jitter(Duration::from_secs(5));
        let mut next = now + Duration::from_secs(3600);
        let node = self.inner.creds.current().node.clone();
        if node.renew_at(frac) <= now {
            match self.renew_node(conn, &node).await {
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "node SVID renewal failed; retrying");
                    if let SpokeError::Refused {
                        code: ErrorCode::Revoked,
                        ..
                    } = e
                    {
                        self.set_state(State::Revoked, Some(e.to_string()));
                    }
                    next = next.min(retry);
                }
            }
        }
        let node = self.inner.creds.current().node.clone();
        next = next.min(node.renew_at(frac).max(now + Duration::from_millis(100)));
        if self.inner.creds.node_ca_due() {
            if let Err(e) = self.ensure_node_ca(conn).await {
                warn!(error = %e, "node CA renewal failed; retrying");
                next = next.min(retry);
            }
        }
        if let Some(f) = self.inner.creds.current().node_ca {
            let half =
                f.not_before + f.not_after.duration_since(f.not_before).unwrap_or_default() / 2;
            next = next.min(half.max(now + Duration::from_millis(100)));
        }
        next
    }

    async fn renew_node(
        &self,
        conn: &quinn::Connection,
        node: &Svid,
    ) -> Result<Arc<Svid>, SpokeError> {
        let csr = svid::make_csr(&node.key, &self.inner.ident.id)?;
        let resp = tidemesh_net::request(conn, &Request::Renew { csr }, REQUEST_TIMEOUT).await?;
        let (chain, bundle) = expect_cert(resp)?;
        let s = self.inner.creds.install_node(chain, bundle)?;
        info!(target: "tidemesh::audit", spoke = %s.id, not_after = %rfc3339(s.not_after), "node SVID installed");
        self.record_cert(&s, tidemesh_evidence::record::CertEventKind::Renewed);
        self.touch_contact();
        Ok(s)
    }
}

/// One HTTP/1.1 health probe: GET `path` on `addr`, healthy on a 2xx status
/// line within one second.
/// `evidence verify` as JSON: `ok`, `records`, `from_seq`, `to_seq`,
/// `shed_records`, and on a break `broken_seq` and `error`.
fn verify_json(b: &buffer::EvidenceBuffer) -> Value {
    match b.verify() {
        Ok(v) => json!({
            "ok": true,
            "records": v.records(),
            "from_seq": v.start().next_seq.get(),
            "to_seq": v.end().last_seq(),
            "shed_records": v.shed_records(),
            "dropped": v.dropped(),
        }),
        Err(buffer::BufferError::ChainBroken(e)) => json!({
            "ok": false,
            "broken_seq": e.seq.get(),
            "error": e.to_string(),
        }),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

/// Verifies `evidence.db` of a spoke that is not running (opening it
/// without the tail check, so a damaged file is reported, not refused).
pub fn verify_evidence_offline(data_dir: &Path) -> Result<Value, SpokeError> {
    let ident = CredStore::new(data_dir).identity()?;
    let path = data_dir.join("evidence.db");
    if !path.exists() {
        return Err(SpokeError::Invalid(format!(
            "{} does not exist (has the spoke run?)",
            path.display()
        )));
    }
    let cfg = buffer::BufferConfig {
        tail_check: 0,
        ..Default::default()
    };
    let b = buffer::EvidenceBuffer::open(&path, &ident.id, cfg)
        .map_err(|e| SpokeError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(verify_json(&b))
}

/// [`http_health`] for an HTTP/2 (prior knowledge) workload.
async fn http2_health(addr: SocketAddr, path: &str) -> bool {
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .ok()?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{addr}{path}"))
            .header(hyper::header::USER_AGENT, "tidemesh-health")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .ok()?;
        let ok = send.send_request(req).await.ok()?.status().is_success();
        driver.abort();
        Some(ok)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}

async fn http_health(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tidemesh-health\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut buf[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code = line.split_whitespace().nth(1)?;
        Some(code.starts_with('2') && line.starts_with("HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}
