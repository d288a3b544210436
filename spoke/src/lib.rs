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
//!
//! # Layout
//! - this file: [`Spoke`], its settings and the wiring of its tasks;
//! - `control`: enrollment and the control session to the hub (sync,
//!   pushes, reports), with `control/plan.rs`, the sans-IO upkeep of a
//!   session (renewal of the node SVID and the node CA, time anchors,
//!   retry backoff); config sync follows `tidemesh_proto::sync`;
//! - [`ConfigInForce`]: a config decoded and compiled once, before it
//!   becomes the last-known-good, and published through a watch;
//! - `health`: workload health checks and reachability probes of site peers;
//! - `ops`: the read side (status, horizon, vectors, evidence verification,
//!   the admin socket);
//! - [`modes`]: the driver of the sans-IO mode machine
//!   (`tidemesh_policy::mode`); [`credentials`]: the watch that owns the
//!   SVIDs and the node CA; [`clock`]: trusted time; [`survival`]: the
//!   horizon; [`dataplane`]: inbound, outbound and the tunnel, handed watches
//!   and handles rather than the spoke; [`workload_api`]: the SPIFFE
//!   Workload API for local apps, handed the credentials.

pub mod buffer;
pub mod clock;
pub mod config;
mod control;
pub mod credentials;
pub mod creds;
pub mod dataplane;
mod evsync;
mod health;
pub mod modes;
mod ops;
pub mod ready;
pub mod replica;
pub mod survival;
pub mod workload_api;

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
use control::client_endpoint;
pub use control::{enroll, enroll_waiting, Enrolled};
pub use credentials::{Credentials, Svids};
pub use creds::{CredStore, CredsError, Svid};
pub use evsync::{SyncSettings, SyncStats};
pub use ops::{config_dump_offline, verify_evidence_offline};

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
    /// Ceiling of the first reconnect delay (full jitter below it).
    pub reconnect_min: Duration,
    /// Largest ceiling of the reconnect delay (exponential backoff with
    /// full jitter up to this); a hub's retry-after is honoured instead.
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
            reconnect_max: Duration::from_secs(30),
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
    /// The hub is over its new-session budget and said when to come back.
    #[error("hub busy (over its new-session budget): retry after {0:?}")]
    Busy(Duration),
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

/// Aborts a task when dropped (the session's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A served socket: the task is aborted, then the file removed, when
/// dropped.
struct RemoveOnDrop(AbortOnDrop, PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0 .0.abort();
        let _ = std::fs::remove_file(&self.1);
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

/// The config in force: a snapshot decoded and compiled once, before it
/// becomes the last-known-good. Only [`ConfigInForce::check`] makes one, so
/// a config the data plane sees has compiled route rules and policies: a
/// snapshot that does not decode or compile is refused and the previous
/// last-known-good stays in force.
pub struct ConfigInForce {
    /// Version, times and the snapshot as stored.
    pub applied: replica::Applied,
    /// The decoded config.
    pub config: Arc<MeshConfig>,
    routes: Arc<tidemesh_policy::CompiledRoutes>,
    policies: Arc<tidemesh_policy::CompiledPolicies>,
    authn: Arc<tidemesh_policy::reqauthn::CompiledAuthn>,
}

impl std::fmt::Debug for ConfigInForce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigInForce")
            .field("version", &self.applied.version)
            .field("bytes", &self.applied.snapshot.len())
            .finish_non_exhaustive()
    }
}

impl ConfigInForce {
    /// Decodes and compiles a snapshot: the only way to a config in force.
    pub fn check(applied: replica::Applied) -> Result<ConfigInForce, SpokeError> {
        let version = applied.version;
        let config: MeshConfig = postcard::from_bytes(&applied.snapshot).map_err(|e| {
            SpokeError::Invalid(format!("config version {version} does not decode: {e}"))
        })?;
        let routes = tidemesh_policy::CompiledRoutes::from_config(&config).map_err(|e| {
            SpokeError::Invalid(format!(
                "config version {version}: route rules do not compile: {e}"
            ))
        })?;
        let policies = tidemesh_policy::CompiledPolicies::from_config(&config);
        let authn = tidemesh_policy::reqauthn::CompiledAuthn::from_config(&config)
            .map_err(|e| SpokeError::Invalid(format!("config version {version}: {e}")))?;
        Ok(ConfigInForce {
            applied,
            config: Arc::new(config),
            routes: Arc::new(routes),
            policies: Arc::new(policies),
            authn: Arc::new(authn),
        })
    }

    /// The compiled `RequestAuthentication`s (key sets parsed).
    pub fn authn(&self) -> &Arc<tidemesh_policy::reqauthn::CompiledAuthn> {
        &self.authn
    }

    /// Age, in seconds at `now_ms`, of a key set read by the hub at
    /// `read_at_ms` (a file key set), else of this config version (an
    /// inline key set came with it).
    pub fn jwks_age_s(&self, read_at_ms: Option<u64>, now_ms: u64) -> u64 {
        now_ms.saturating_sub(read_at_ms.unwrap_or(self.applied.hub_applied_ms)) / 1000
    }

    /// Every JWT rule of the config with its key set's source, size and
    /// age: what `status` shows, so an operator sees how old the keys the
    /// spoke verifies tokens with are (they are refreshed only by an apply
    /// on the hub).
    pub fn jwks_status(&self, now_ms: u64) -> Vec<serde_json::Value> {
        self.authn
            .all_jwks_facts(&self.config)
            .into_iter()
            .map(|f| {
                serde_json::json!({
                    "policy": f.policy,
                    "issuer": f.issuer,
                    "jwks": f.source,
                    "keys": f.keys,
                    "jwks_age_s": self.jwks_age_s(f.read_at_ms, now_ms),
                })
            })
            .collect()
    }

    /// The compiled route rules.
    pub fn routes(&self) -> &Arc<tidemesh_policy::CompiledRoutes> {
        &self.routes
    }

    /// The compiled authorization policies.
    pub fn policies(&self) -> &Arc<tidemesh_policy::CompiledPolicies> {
        &self.policies
    }
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
    /// The last-contact time waiting to be persisted, and whether a writer
    /// is on the blocking pool (at most one: it writes the newest value).
    contact_write: Mutex<(Option<u64>, bool)>,
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
    /// `host:port` of the hub, or of its replicas in the order they are
    /// tried; resolved at each connection attempt.
    hubs: Vec<String>,
    /// Which of `hubs` the control session dials.
    hub_rotation: Mutex<control::failover::Rotation>,
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
    /// `run` has bound its listeners and opened the evidence buffer
    /// (readiness).
    started: std::sync::atomic::AtomicBool,
}

/// Before the first certificate: waits until `data_dir` holds an
/// enrollment (`tidemesh-spoke enroll` writes it), serving `/readyz` 503
/// "not enrolled" and `/healthz` 200 on `metrics` meanwhile, so a unit
/// enabled before enrollment neither crash-loops nor looks ready. Returns
/// `Ok(true)` once enrolled (at once if it already is; the listener is
/// closed again for [`Spoke::run`] to bind), `Ok(false)` if `shutdown`
/// came first; any other credential error is returned as it is.
pub async fn wait_enrolled(
    data_dir: &Path,
    metrics: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<bool, SpokeError> {
    let store = CredStore::new(data_dir);
    match store.identity() {
        Ok(_) => return Ok(true),
        Err(CredsError::NotEnrolled(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let l = tidemesh_net::metrics::bind(metrics)
        .await
        .map_err(|e| SpokeError::Invalid(format!("--metrics {metrics}: {e}")))?;
    let reason = format!(
        "not enrolled: run `tidemesh-spoke enroll --data-dir {}` with a join token",
        data_dir.display()
    );
    warn!(data_dir = %data_dir.display(), "not enrolled yet: waiting for `tidemesh-spoke enroll` (/readyz answers 503)");
    tidemesh_net::sd_notify::notify_logged(&format!("STATUS={reason}"));
    let r = reason.clone();
    let served = tokio::spawn(tidemesh_net::metrics::serve(
        l,
        || async {
            let mut e = tidemesh_net::metrics::Exposition::new();
            tidemesh_net::build_info::write(&mut e);
            e.single(
                "tidemesh_spoke_ready",
                tidemesh_net::metrics::Kind::Gauge,
                "1 while /readyz answers 200 (not enrolled yet: 0).",
                0.0,
            );
            e.finish()
        },
        move || {
            let r = tidemesh_net::metrics::Readiness::not_ready(r.clone());
            async move { r }
        },
    ));
    let watchdog = tokio::spawn(tidemesh_net::sd_notify::watchdog());
    tokio::pin!(shutdown);
    let enrolled = loop {
        tokio::select! {
            _ = &mut shutdown => break false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        match store.identity() {
            Ok(_) => break true,
            Err(CredsError::NotEnrolled(_)) => {}
            Err(e) => {
                served.abort();
                watchdog.abort();
                return Err(e.into());
            }
        }
    };
    served.abort();
    watchdog.abort();
    // the listener is closed once the task is gone
    let _ = served.await;
    if enrolled {
        info!(data_dir = %data_dir.display(), "enrolled: starting");
    }
    Ok(enrolled)
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
        let hubs = match (cfg.hub, &cfg.file.hub) {
            (Some(a), _) => config::HubAddrs(vec![a.to_string()]),
            (None, Some(h)) => h.clone(),
            (None, None) => config::HubAddrs(vec![ident.hub.clone()]),
        };
        hubs.check().map_err(|(_, value, reason)| {
            SpokeError::Invalid(format!("hub address {value:?}: {reason}"))
        })?;
        let hubs = hubs.0;
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let last_contact_ms = store.contact().last_contact_ms;
        let replica =
            replica::Replica::open(store.dir()).map_err(|e| SpokeError::Invalid(e.to_string()))?;
        let config = match replica.last_known_good() {
            Ok(Some(a)) => {
                let version = a.version;
                match ConfigInForce::check(a) {
                    Ok(c) => {
                        info!(version, "serving the last-known-good config");
                        Some(Arc::new(c))
                    }
                    Err(e) => {
                        warn!(version, error = %e, "last-known-good config is unusable; ignoring it");
                        None
                    }
                }
            }
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
                contact_write: Mutex::new((None, false)),
                live: Mutex::new(Live {
                    state: State::Connecting,
                    last_error: None,
                    last_contact_ms,
                }),
                hub_rotation: Mutex::new(control::failover::Rotation::new(hubs.len())),
                hubs,
                rng: Mutex::new(rng),
                started: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The node ID.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.ident.id
    }

    /// Appends evidence records to this spoke's buffer (a no-op until
    /// [`Spoke::run`] has opened it): the fleet tool pre-fills a backlog.
    pub fn evidence(&self) -> &EvidenceSink {
        &self.inner.evidence
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
        // Persisted off the async workers by at most one blocking job,
        // which writes the newest time until none is waiting.
        let start = {
            let mut w = self
                .inner
                .contact_write
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            w.0 = Some(now);
            !std::mem::replace(&mut w.1, true)
        };
        if !start {
            return;
        }
        let me = self.clone();
        let job = move || loop {
            let next = {
                let mut w = me
                    .inner
                    .contact_write
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match w.0.take() {
                    Some(ms) => ms,
                    None => {
                        w.1 = false;
                        return;
                    }
                }
            };
            if let Err(e) = me.inner.store.save_contact(&creds::ContactState {
                last_contact_ms: Some(next),
            }) {
                warn!(error = %e, "cannot persist last contact");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(job);
            }
            Err(_) => job(),
        }
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

    /// Appends a system record to the evidence buffer (if it is open); the
    /// caller never waits on disk.
    fn record(&self, body: tidemesh_evidence::RecordBody) {
        self.inner.evidence.record(body);
    }

    /// A uniform draw from `[0, 1)` (the spoke's seeded generator).
    fn unit_random(&self) -> f64 {
        self.inner
            .rng
            .lock()
            .map(|mut r| r.random_range(0.0..1.0))
            .unwrap_or(0.5)
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

    /// Whether a control session with the hub is up now (cheaper than
    /// [`Spoke::status`]: the fleet tool polls it for every spoke).
    pub fn hub_connected(&self) -> bool {
        self.inner
            .live
            .lock()
            .map(|l| l.state == State::Connected)
            .unwrap_or(false)
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
                info!(addr = %l.local_addr().unwrap_or(addr), "serving /metrics, /healthz and /readyz");
                let (me, me2) = (self.clone(), self.clone());
                Some(AbortOnDrop(tokio::spawn(tidemesh_net::metrics::serve(
                    l,
                    move || {
                        let me = me.clone();
                        async move { me.metrics_page() }
                    },
                    move || {
                        let r = me2.readiness();
                        async move { r }
                    },
                ))))
            }
            None => None,
        };
        let _watchdog = AbortOnDrop(tokio::spawn(tidemesh_net::sd_notify::watchdog()));
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
        let _workload_api = match &self.inner.cfg.file.workload_api {
            Some(addr) => {
                let mode = self.inner.cfg.file.workload_api_mode.unwrap_or_default();
                let listener = workload_api::bind(addr, mode)
                    .map_err(|e| SpokeError::Invalid(e.to_string()))?;
                let api = workload_api::WorkloadApi::new(
                    self.inner.creds.clone(),
                    self.inner
                        .cfg
                        .file
                        .workloads
                        .iter()
                        .map(|w| workload_api::ApiWorkload {
                            account: w.service_account.clone(),
                            selectors: w.selectors.clone(),
                        })
                        .collect(),
                    self.inner.clock.clone(),
                );
                info!(socket = %addr, mode = format!("{:04o}", mode.0), "serving the SPIFFE Workload API");
                Some(RemoveOnDrop(
                    AbortOnDrop(tokio::spawn(workload_api::serve(listener, api))),
                    addr.path().to_owned(),
                ))
            }
            None => None,
        };
        let me = self.clone();
        let _health = AbortOnDrop(tokio::spawn(async move { me.health_loop().await }));
        let me = self.clone();
        let _reach = AbortOnDrop(tokio::spawn(async move { me.reachability_loop().await }));
        self.inner
            .started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let me = self.clone();
        let _notify = AbortOnDrop(tokio::spawn(async move { me.notify_ready().await }));
        info!(spoke = %self.inner.ident.id, hub = %self.inner.hubs.join(","), "spoke running");
        tokio::pin!(shutdown);
        let mut backoff =
            control::Backoff::new(self.inner.cfg.reconnect_min, self.inner.cfg.reconnect_max);
        loop {
            let mut failure = control::Failure::Lost;
            // a session that came up and ended is retried on its address
            // first; a failed attempt moves on to the next replica
            let mut next = control::failover::Next::Backoff;
            let end = tokio::select! {
                _ = &mut shutdown => SessionEnd::Shutdown,
                r = self.session(&endpoint) => match r {
                    // The session came up before it ended: start over.
                    Ok(end) => {
                        backoff.reset();
                        end
                    }
                    Err(e) => {
                        if let SpokeError::Busy(retry_after) = e {
                            failure = control::Failure::Busy { retry_after };
                        }
                        next = self.hub_failed();
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
                // another replica left in this round: try it soon
                _ if next == control::failover::Next::Quick => {
                    self.inner.cfg.reconnect_min.mul_f64(self.unit_random())
                }
                _ => backoff.next_delay(failure, self.unit_random()),
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tidemesh_net::sd_notify::notify_logged("STOPPING=1\nSTATUS=shutting down");
        self.inner
            .started
            .store(false, std::sync::atomic::Ordering::SeqCst);
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

    /// Whether this spoke can serve its store now, and why (see
    /// [`ready`]): `GET /readyz` and `tidemesh-spoke healthcheck`.
    pub fn readiness(&self) -> tidemesh_net::metrics::Readiness {
        let cur = self.inner.creds.current();
        ready::readiness(&ready::Facts {
            now: self.inner.clock.now(),
            started: self.inner.started.load(std::sync::atomic::Ordering::SeqCst),
            state: self.state(),
            config_version: self.config_version(),
            node_not_after: cur.node.not_after,
            node_ca_not_after: cur.node_ca.map(|f| f.not_after),
        })
    }

    /// Tells systemd (`Type=notify`) `READY=1` once [`Spoke::readiness`]
    /// first says ready: at once on a restart with a last-known-good
    /// config, hub or no hub; after the first config sync on a freshly
    /// enrolled spoke. Until then, and after, `STATUS=` carries the reason
    /// whenever it changes. A no-op outside systemd.
    async fn notify_ready(&self) {
        if std::env::var_os(tidemesh_net::sd_notify::NOTIFY_SOCKET).is_none() {
            return;
        }
        let mut told_ready = false;
        let mut last = String::new();
        loop {
            let r = self.readiness();
            if r.reason != last {
                let line = tidemesh_net::http::sanitize(&r.reason);
                let msg = if r.ready && !told_ready {
                    told_ready = true;
                    format!("READY=1\nSTATUS={line}")
                } else {
                    format!("STATUS={line}")
                };
                tidemesh_net::sd_notify::notify_logged(&msg);
                last = r.reason;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Persists the trusted-time floor (blocking write; small).
    pub(crate) fn save_time_floor(&self) {
        if let Err(e) = self.inner.store.save_time_floor(&self.inner.tclock.floor()) {
            warn!(error = %e, "cannot persist the trusted-time floor");
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
}

#[cfg(test)]
mod config_in_force_tests {
    use super::*;
    use tidemesh_policy::model::StringMatch;

    const YAML: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: store}
spec:
  hosts: [reviews.store]
  http:
  - match: [{uri: {regex: "/v[0-9]+/.*"}}]
    route: [{destination: {host: reviews.store}}]
"#;

    fn applied(snapshot: Vec<u8>) -> replica::Applied {
        replica::Applied {
            version: 7,
            hub_applied_ms: 1,
            applied_ms: 2,
            snapshot,
        }
    }

    #[test]
    fn only_a_config_that_decodes_and_compiles_comes_into_force() {
        let mut cfg = MeshConfig::from_yaml(YAML).expect("the example parses");
        let good = postcard::to_allocvec(&cfg).expect("encodes");
        let c = ConfigInForce::check(applied(good)).expect("a good snapshot is in force");
        assert_eq!(c.applied.version, 7);
        assert_eq!(c.config.route_rules.len(), 1);

        // bytes that are no config
        let e = ConfigInForce::check(applied(vec![0xff; 40])).expect_err("garbage refused");
        assert!(e.to_string().contains("does not decode"), "{e}");

        // a snapshot that decodes but whose route rules do not compile
        // (the hub checks regexes; a spoke never trusts that it did)
        cfg.route_rules[0].http[0].matches[0].uri = Some(StringMatch::Regex("(".into()));
        let bad = postcard::to_allocvec(&cfg).expect("encodes");
        let e = ConfigInForce::check(applied(bad)).expect_err("uncompilable refused");
        assert!(e.to_string().contains("do not compile"), "{e}");
    }
}
