//! The tidemesh hub: certificate authority, enrollment, renewal and
//! revocation for one SPIFFE trust domain, served over QUIC (ALPN
//! `tidemesh-ctl/1`) with a local admin API on a Unix socket.
//!
//! Entry points take their clock and their bound socket, so tests and
//! simulations run the hub in-process and in virtual time:
//! [`init`] creates a data directory, [`Hub::open`] loads it and
//! [`Hub::serve`] runs until the shutdown future resolves.
//!
//! # Data directory
//! | file          | what |
//! |---------------|------|
//! | `ca.pem`      | the CA certificate (the trust bundle) |
//! | `ca_key.pem`  | the CA private key, PKCS#8, mode 0600 |
//! | `hub.db`      | redb: tokens, spokes, audit log ([`store`]); absent with `--store nats://...` ([`state`]) |
//! | `evidence.db` | redb: the spokes' evidence chains, aggregates ([`evidence`]) |
//! | `admin.sock`  | the admin socket while `serve` runs, mode 0600 |

pub mod admission;
pub mod authority;
pub mod config;
pub mod durable;
pub mod evidence;
mod follow;
pub mod gateway;
pub mod ingest;
pub mod jwks;
mod observe;
pub mod origination;
pub mod otlp;
pub mod refusals;
pub mod state;
pub mod store;
pub mod sync;
pub mod vector;

use std::{
    collections::{HashMap, HashSet},
    fs,
    future::Future,
    io::Write,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tidemesh_identity::{
    clock::Clock,
    naming::{self, MeshIdentity},
    svid::{self, Ca},
    verify::{self, Authorizer, TrustBundle, VerifiedSvid},
    RevocationList, Revocations, SignedRevocationList, SpiffeId, TrustDomain,
};
use tidemesh_net::{admin, QuicSettings};
use tidemesh_proto::{
    close, JoinToken, Push, Request, Response, SpokeReport, ALPN_CTL, ALPN_DATA,
    MAX_ANONYMOUS_FRAME, MAX_FRAME,
};
use tracing::{info, warn};

pub use observe::evidence_command;
pub use state::{HubState, StateLocation};
pub use store::{AuditEntry, AuditPage, AuditQuery, SpokeRecord, Store};

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Lifetime of node SVIDs.
    pub node_ttl: Duration,
    /// Lifetime of workload SVIDs.
    pub workload_ttl: Duration,
    /// How long a spoke may have been out of contact and still re-establish
    /// itself with its pinned key after its certificate expired.
    pub max_offline: Duration,
    /// Lifetime of the hub's own serving certificate (re-issued at half life).
    pub hub_cert_ttl: Duration,
    /// QUIC transport settings.
    pub quic: QuicSettings,
    /// Serve the admin socket in the data directory.
    pub admin_socket: bool,
    /// Evidence ingest pacing (window, slots, hub-wide rate).
    pub ingest: ingest::IngestSettings,
    /// Evidence retention (age and bytes per spoke; checkpoints keep the
    /// remaining chain verifiable).
    pub retention: evidence::Retention,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// Serve Prometheus `/metrics` here.
    pub metrics: Option<SocketAddr>,
    /// Most spokes with per-spoke series on `/metrics` (connected first,
    /// then the most recently seen); fleet-wide totals count them all.
    pub metrics_max_spokes: usize,
    /// The gateway to cloud services (`ServiceEntry`).
    pub gateway: gateway::GatewaySettings,
    /// Admission control: new-session budget, connection caps, address
    /// validation ([`admission`]).
    pub admission: admission::AdmissionSettings,
    /// Export spans built from ingested request records over OTLP/HTTP
    /// ([`otlp`]); off unless given.
    pub otlp: Option<otlp::OtlpSettings>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            node_ttl: Duration::from_secs(3600),
            workload_ttl: Duration::from_secs(3600),
            max_offline: Duration::from_secs(30 * 24 * 3600),
            hub_cert_ttl: Duration::from_secs(24 * 3600),
            quic: quic_settings(),
            admin_socket: true,
            ingest: ingest::IngestSettings::default(),
            retention: evidence::Retention::default(),
            prune_interval: Duration::from_secs(600),
            metrics: None,
            metrics_max_spokes: 1000,
            gateway: gateway::GatewaySettings::default(),
            admission: admission::AdmissionSettings::default(),
            otlp: None,
        }
    }
}

/// Flow-control window of one stream into the hub (what a spoke may send
/// on its evidence stream ahead of the hub's reads): 128 KiB. With quinn's
/// default (1.25 MB) a fleet of returning spokes could put about 1.25 GB
/// on the hub's socket and into its memory before the hub read any of it;
/// with this, 1,000 evidence sessions (one per spoke) hold at most 125 MiB
/// there, and what arrives after that is clocked by what the hub's ingest
/// reads. No connection-wide limit is set by default: the hub reads a
/// batch's first bytes and then waits for a held-batch permit, so with a
/// connection window smaller than its streams' windows, unread streams
/// could take the credit a permitted stream needs to finish its frame.
pub const STREAM_WINDOW: u64 = 128 << 10;

/// The hub's writes kept until acknowledged, per connection: 1 MiB (one
/// frame of the largest size).
pub const SEND_WINDOW: u64 = 1 << 20;

/// The hub's QUIC settings: [`QuicSettings::default`] with the hub's
/// flow-control windows ([`STREAM_WINDOW`], no connection-wide limit,
/// [`SEND_WINDOW`]).
pub fn quic_settings() -> QuicSettings {
    QuicSettings {
        stream_window: STREAM_WINDOW,
        connection_window: None,
        send_window: SEND_WINDOW,
        ..QuicSettings::default()
    }
}

/// Errors of the hub's operations.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The data directory already holds a hub.
    #[error("{0} already exists: refusing to overwrite an existing hub")]
    AlreadyInitialized(PathBuf),
    /// The data directory holds no hub.
    #[error("{0} is not a hub data directory (run `tidemesh-hub init` first)")]
    NotInitialized(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Certificate handling failed.
    #[error("certificate: {0}")]
    Cert(#[from] svid::IssueError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// An argument was invalid.
    #[error("{0}")]
    Invalid(String),
    /// The network layer failed.
    #[error(transparent)]
    Net(#[from] tidemesh_net::NetError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 rendering of a millisecond timestamp.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca_key.pem";
/// The hub database file in the data directory.
pub const HUB_DB: &str = "hub.db";
/// The evidence database file in the data directory.
pub const EVIDENCE_DB: &str = "evidence.db";

/// Tightens `path`'s permission bits to at most `mode` (never widens them),
/// logging when it had to: the data directory (0700) and the CA key (0600)
/// at every open, not only at creation, so a restored backup or a `cp`
/// cannot leave the CA key readable.
pub(crate) fn enforce_mode(path: &Path, mode: u32) -> Result<(), HubError> {
    use std::os::unix::fs::PermissionsExt;
    let cur = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o7777;
    if cur & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(cur & mode)).map_err(io_err(path))?;
        warn!(
            target: "tidemesh::audit",
            path = %path.display(),
            was = format!("{cur:o}"),
            now = format!("{:o}", cur & mode),
            "file mode too open: tightened"
        );
    }
    Ok(())
}

/// Writes a file that must not exist yet, with the given mode, durably.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HubError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Creates a hub data directory: the CA (key mode 0600) and the database.
/// Refuses to touch a directory that already holds either.
pub fn init(data_dir: &Path, td: &TrustDomain, clock: &dyn Clock) -> Result<[u8; 32], HubError> {
    init_with_state(data_dir, td, clock, &StateLocation::Redb)
}

/// [`init`] with the control-plane state at `location`: the CA stays in
/// `data_dir` whatever the location; `hub.db` is created there only for
/// [`StateLocation::Redb`], the JetStream buckets otherwise.
pub fn init_with_state(
    data_dir: &Path,
    td: &TrustDomain,
    clock: &dyn Clock,
    location: &StateLocation,
) -> Result<[u8; 32], HubError> {
    for name in [CA_CERT, CA_KEY, HUB_DB] {
        let p = data_dir.join(name);
        if p.exists() {
            return Err(HubError::AlreadyInitialized(p));
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io_err(data_dir))?;
    let now = clock.now();
    // Backdate a little so a spoke whose clock lags by minutes still accepts it.
    let ca = Ca::generate(
        td,
        now - Duration::from_secs(3600),
        now + Duration::from_secs(10 * 365 * 24 * 3600),
    )?;
    // the buckets first, so that a cluster already holding a hub's state
    // leaves no CA behind
    if let StateLocation::Nats(servers) = location {
        state::nats::NatsState::init(servers, td.as_str())?
            .check_ca(&svid::hex(&ca.fingerprint()))?;
    }
    write_new(&data_dir.join(CA_KEY), ca.key_pem().as_bytes(), 0o600)?;
    write_new(&data_dir.join(CA_CERT), ca.cert_pem().as_bytes(), 0o644)?;
    if *location == StateLocation::Redb {
        Store::create(&data_dir.join(HUB_DB), td.as_str())?;
    }
    // The new names are durable only once the directory is.
    fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(data_dir))?;
    Ok(ca.fingerprint())
}

/// `init --join`: makes `data_dir` a replica of the hub whose state is in
/// the JetStream cluster at `location`. The hub's CA files must already be
/// there (copied from the first replica's data directory); they are checked
/// against the trust domain and the CA fingerprint recorded in the cluster.
/// Nothing is written to the cluster. Returns the trust domain and the CA
/// fingerprint.
pub fn join_state(
    data_dir: &Path,
    location: &StateLocation,
) -> Result<(TrustDomain, [u8; 32]), HubError> {
    let StateLocation::Nats(servers) = location else {
        return Err(HubError::Invalid(
            "--join: only with --store nats://...: replicas share a JetStream cluster's state"
                .into(),
        ));
    };
    let key_path = data_dir.join(CA_KEY);
    let cert_path = data_dir.join(CA_CERT);
    for p in [&cert_path, &key_path] {
        if !p.exists() {
            return Err(HubError::Invalid(format!(
                "--join: {} is missing: copy ca.pem and ca_key.pem from the first replica's data directory first (install -m 600 A/ca.pem A/ca_key.pem {})",
                p.display(),
                data_dir.display()
            )));
        }
    }
    if data_dir.join(HUB_DB).exists() {
        return Err(HubError::Invalid(format!(
            "--join: {} holds hub.db, a hub of its own on redb: a replica's data directory has only the CA files",
            data_dir.display()
        )));
    }
    enforce_mode(data_dir, 0o700)?;
    enforce_mode(&key_path, 0o600)?;
    let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let ca = Ca::from_pem(&cert, &key)?;
    let state = state::nats::NatsState::open(servers)?;
    let td = state.meta("trust_domain")?.unwrap_or_default();
    if td != ca.trust_domain().as_str() {
        return Err(HubError::Invalid(format!(
            "--join: the CA in {} is for trust domain {}, the hub in the cluster for {td:?}",
            data_dir.display(),
            ca.trust_domain()
        )));
    }
    state.check_ca(&svid::hex(&ca.fingerprint()))?;
    Ok((ca.trust_domain().clone(), ca.fingerprint()))
}

/// Admits, at the TLS handshake, spoke nodes (their node SVID, issued by
/// the root) and workloads issued through a node CA (for the gateway);
/// revoked ones are already refused by the bundle's revocation list.
#[derive(Debug)]
struct HubAuthorizer;

impl Authorizer for HubAuthorizer {
    fn authorize(&self, peer: &VerifiedSvid) -> Result<(), String> {
        match (naming::classify(peer.id()), peer.issuer()) {
            (Some(MeshIdentity::Node { .. }), None) => Ok(()),
            (Some(MeshIdentity::Workload { .. }), Some(_)) => Ok(()),
            (Some(MeshIdentity::Workload { .. }), None) => {
                Err("workload SVIDs must be issued by their spoke's node CA".into())
            }
            _ => Err("only spoke nodes and their workloads may connect".into()),
        }
    }
}

struct Live {
    conn: quinn::Connection,
    stable_id: usize,
}

/// A spoke's last report, and when it arrived.
#[derive(Debug, Clone)]
pub(crate) struct Reported {
    pub(crate) at_ms: u64,
    pub(crate) report: SpokeReport,
}

pub(crate) struct Inner {
    pub(crate) data_dir: PathBuf,
    pub(crate) store: Arc<dyn HubState>,
    pub(crate) ca: Ca,
    pub(crate) td: TrustDomain,
    pub(crate) cfg: HubConfig,
    pub(crate) clock: Arc<dyn Clock>,
    /// The revocation list in force; every handshake's verifier reads it.
    pub(crate) revocations: Revocations,
    /// The list in force, signed (made once per version).
    signed_revocations: Mutex<Option<(u64, Arc<SignedRevocationList>)>>,
    live: Mutex<HashMap<String, Live>>,
    /// Each spoke's last report (survival horizon, revocation version).
    pub(crate) reports: Mutex<HashMap<String, Reported>>,
    /// The newest config version number; spokes' long polls wait on it.
    pub(crate) config_tx: tokio::sync::watch::Sender<u64>,
    /// Cache of the newest config version.
    pub(crate) latest: Mutex<Option<Arc<config::ConfigVersion>>>,
    /// Serializes applies and rollbacks.
    pub(crate) apply_lock: Mutex<()>,
    /// The config version each spoke last reported as applied.
    pub(crate) applied: Mutex<HashMap<String, u64>>,
    /// Registered endpoints: spoke ID → (store, endpoints), and each
    /// store's registry generation. In memory: spokes register on every
    /// session, so a restarted hub relearns them as they reconnect.
    pub(crate) registry: Mutex<sync::Registry>,
    /// Bumped on every registration; held polls wake on it.
    pub(crate) registry_tx: tokio::sync::watch::Sender<u64>,
    /// Evidence from the spokes (`evidence.db`).
    pub(crate) evidence: Arc<dyn evidence::EvidenceBackend>,
    /// Evidence ingest slots, rate and counters.
    pub(crate) ingest: Arc<ingest::Limits>,
    /// The OTLP span exporter (`--otlp-endpoint`).
    pub(crate) otlp: Option<Arc<otlp::Exporter>>,
    /// The gateway to cloud services.
    pub(crate) gateway: gateway::Gateway,
    /// Refused requests: counters, log and audit limiters.
    pub(crate) refusals: Mutex<refusals::RefusalBook>,
    /// Admission control of new connections and sessions.
    pub(crate) admission: Mutex<admission::Admission>,
    /// The UDP receive buffer asked for and the size the kernel granted
    /// (reported by whoever bound the socket).
    pub(crate) udp_recv_buffer: Mutex<Option<(usize, usize)>>,
    /// Slots for durable work on the blocking pool ([`durable`]).
    pub(crate) durable: durable::Durable,
    /// `serve` has bound the QUIC endpoint and the admin socket and
    /// accepts (readiness); false again once shutdown starts.
    pub(crate) serving: std::sync::atomic::AtomicBool,
}

/// Holds one admitted connection's place in the admission counts (overall
/// and per address) until dropped.
struct AdmissionSlot {
    hub: Hub,
    ip: std::net::IpAddr,
}

impl Drop for AdmissionSlot {
    fn drop(&mut self) {
        if let Ok(mut a) = self.hub.inner.admission.lock() {
            a.handle_closed(self.ip);
        }
    }
}

/// Outcomes per object as the admin surface answers them.
fn planned_json(objects: &[tidemesh_policy::lifecycle::Planned]) -> Value {
    Value::Array(
        objects
            .iter()
            .map(|o| {
                json!({
                    "kind": o.key.kind,
                    "namespace": o.key.namespace,
                    "name": o.key.name,
                    "outcome": o.outcome.as_str(),
                })
            })
            .collect(),
    )
}

/// A loaded hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("data_dir", &self.inner.data_dir)
            .finish()
    }
}

/// One row of `tidemesh-hub spokes`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpokeInfo {
    /// Node SPIFFE ID.
    pub id: String,
    /// Whether a control session is live now.
    pub connected: bool,
    /// Last authenticated contact (RFC 3339).
    pub last_seen: String,
    /// not_after of its current node SVID (RFC 3339).
    pub cert_not_after: String,
    /// When it enrolled (RFC 3339).
    pub enrolled: String,
    /// Whether it is revoked.
    pub revoked: bool,
    /// The config version it last reported as applied.
    pub config_version: Option<u64>,
    /// The hub's newest config version (`None`: nothing applied yet).
    pub config_latest: Option<u64>,
    /// `SYNCED` when it reported the newest version as applied, else
    /// `STALE` (`None` when nothing has been applied).
    pub config_state: Option<&'static str>,
    /// Seconds it could last without the hub, as it last reported
    /// (`None`: unbounded or never reported).
    pub survival_horizon_s: Option<u64>,
    /// The budget that limits its horizon, as it last reported.
    pub survival_limit: Option<String>,
    /// When it last reported (RFC 3339).
    pub reported_at: Option<String>,
    /// The revocation list version it enforces, as it last reported.
    pub revocation_version: Option<u64>,
    /// Whether its time is trusted, as it last reported.
    pub time_trusted: Option<bool>,
}

impl Hub {
    /// Loads a hub data directory.
    pub fn open(data_dir: &Path, cfg: HubConfig, clock: Arc<dyn Clock>) -> Result<Hub, HubError> {
        Self::open_at(data_dir, &StateLocation::Redb, cfg, clock)
    }

    /// [`Hub::open`] with the control-plane state at `location` (the CA
    /// and `evidence.db` stay in `data_dir`).
    pub fn open_at(
        data_dir: &Path,
        location: &StateLocation,
        cfg: HubConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Hub, HubError> {
        let key_path = data_dir.join(CA_KEY);
        let cert_path = data_dir.join(CA_CERT);
        let db_path = data_dir.join(HUB_DB);
        let needed: &[&PathBuf] = match location {
            StateLocation::Redb => &[&key_path, &cert_path, &db_path],
            StateLocation::Nats(_) => &[&key_path, &cert_path],
        };
        for p in needed {
            if !p.exists() {
                return Err(HubError::NotInitialized(data_dir.to_owned()));
            }
        }
        enforce_mode(data_dir, 0o700)?;
        enforce_mode(&key_path, 0o600)?;
        let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let ca = Ca::from_pem(&cert, &key)?;
        let store = location.open(data_dir)?;
        let evidence: Arc<dyn evidence::EvidenceBackend> = match location {
            StateLocation::Redb => {
                let ev_path = data_dir.join(EVIDENCE_DB);
                Arc::new(
                    evidence::EvidenceStore::open(&ev_path)
                        .map_err(|e| HubError::Invalid(format!("{}: {e}", ev_path.display())))?,
                )
            }
            StateLocation::Nats(servers) => Arc::new(
                evidence::nats::NatsEvidence::open(servers)
                    .map_err(|e| HubError::Invalid(e.to_string()))?,
            ),
        };
        Self::assemble(data_dir, ca, store, evidence, cfg, clock)
    }

    /// [`Hub::open`] with its databases already open, wherever they live
    /// (tests: on simulated disks with slow syncs or a full disk). The CA
    /// is read from `data_dir` as by [`Hub::open`].
    pub fn open_with_stores(
        data_dir: &Path,
        store: Store,
        evidence: evidence::EvidenceStore,
        cfg: HubConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Hub, HubError> {
        Self::open_with_state(data_dir, Arc::new(store), evidence, cfg, clock)
    }

    /// [`Hub::open_with_stores`] with any [`HubState`] backend.
    pub fn open_with_state(
        data_dir: &Path,
        store: Arc<dyn HubState>,
        evidence: evidence::EvidenceStore,
        cfg: HubConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Hub, HubError> {
        let key_path = data_dir.join(CA_KEY);
        let cert_path = data_dir.join(CA_CERT);
        enforce_mode(data_dir, 0o700)?;
        enforce_mode(&key_path, 0o600)?;
        let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let ca = Ca::from_pem(&cert, &key)?;
        Self::assemble(data_dir, ca, store, Arc::new(evidence), cfg, clock)
    }

    fn assemble(
        data_dir: &Path,
        ca: Ca,
        store: Arc<dyn HubState>,
        evidence: Arc<dyn evidence::EvidenceBackend>,
        cfg: HubConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Hub, HubError> {
        let td_s = store
            .meta("trust_domain")?
            .ok_or_else(|| HubError::NotInitialized(data_dir.to_owned()))?;
        let td = TrustDomain::new(&td_s).map_err(|e| HubError::Invalid(e.to_string()))?;
        // replicas sharing one state must hold one CA
        store.check_ca(&svid::hex(&ca.fingerprint()))?;
        let revocations = Revocations::new(store.reconcile_revocations(unix_ms(clock.now()))?);
        let latest = store.config_latest()?.map(Arc::new);
        let ingest = Arc::new(ingest::Limits::new(&cfg.ingest));
        let otlp = cfg
            .otlp
            .clone()
            .map(otlp::Exporter::new)
            .transpose()
            .map_err(|e| HubError::Invalid(format!("--otlp-endpoint {e}")))?
            .map(Arc::new);
        cfg.admission.check().map_err(HubError::Invalid)?;
        let admission = admission::Admission::new(cfg.admission.clone(), std::time::Instant::now());
        let (config_tx, _) =
            tokio::sync::watch::channel(latest.as_ref().map(|v| v.meta.version).unwrap_or(0));
        Ok(Hub {
            inner: Arc::new(Inner {
                config_tx,
                latest: Mutex::new(latest),
                apply_lock: Mutex::new(()),
                applied: Mutex::new(HashMap::new()),
                registry: Mutex::new(sync::Registry::default()),
                registry_tx: tokio::sync::watch::channel(0).0,
                evidence,
                ingest,
                otlp,
                gateway: gateway::Gateway::new(cfg.gateway.clone()),
                data_dir: data_dir.to_owned(),
                store,
                ca,
                td,
                cfg,
                clock,
                revocations,
                signed_revocations: Mutex::new(None),
                live: Mutex::new(HashMap::new()),
                reports: Mutex::new(HashMap::new()),
                refusals: Mutex::new(refusals::RefusalBook::new()),
                admission: Mutex::new(admission),
                udp_recv_buffer: Mutex::new(None),
                durable: durable::Durable::new(),
                serving: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.td
    }

    /// SHA-256 fingerprint of the CA certificate.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        self.inner.ca.fingerprint()
    }

    /// The control-plane state (for inspection by tests and tools).
    pub fn store(&self) -> &dyn HubState {
        &*self.inner.store
    }

    /// The evidence database (for inspection by tests and tools).
    pub fn evidence(&self) -> &dyn evidence::EvidenceBackend {
        &*self.inner.evidence
    }

    /// Refusals counted since the hub started, by request and reason
    /// (`tidemesh_hub_refusals_total`).
    pub fn refusal_counts(&self) -> Vec<(refusals::Kind, u64)> {
        match self.inner.refusals.lock() {
            Ok(b) => b.counts(),
            Err(p) => p.into_inner().counts(),
        }
    }

    /// Records the UDP receive buffer asked for and the size the kernel
    /// granted, for the log and `/metrics` (`tidemesh_hub_udp_recv_buffer_bytes`).
    pub fn note_udp_recv_buffer(&self, requested: usize, granted: usize) {
        if let Ok(mut b) = self.inner.udp_recv_buffer.lock() {
            *b = Some((requested, granted));
        }
    }

    /// Evidence batches held in memory now and at most so far
    /// (`tidemesh_hub_evidence_batches_held`, `_held_peak`).
    pub fn evidence_batches_held(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.inner.ingest.counters;
        (c.held.load(Relaxed), c.held_peak.load(Relaxed))
    }

    /// Admission counters and state now (`tidemesh_hub_admission_*`).
    pub fn admission(&self) -> Option<admission::Snapshot> {
        self.inner
            .admission
            .lock()
            .ok()
            .map(|mut a| a.snapshot(std::time::Instant::now()))
    }

    /// Applies the admission rules to an incoming connection before any
    /// handshake work: refuse, ask for a Retry, or go on to the handshake
    /// holding a slot. A poisoned admission lock refuses.
    fn admit_incoming(
        &self,
        incoming: quinn::Incoming,
    ) -> Option<(quinn::Incoming, AdmissionSlot)> {
        let remote = incoming.remote_address();
        let ip = remote.ip().to_canonical();
        let decision = match self.inner.admission.lock() {
            Ok(mut a) => a.handle_incoming(
                std::time::Instant::now(),
                ip,
                incoming.remote_address_validated(),
                incoming.may_retry(),
            ),
            Err(_) => {
                warn!("admission state poisoned; refusing connections");
                admission::Incoming::Refuse(admission::RefuseReason::GlobalCap)
            }
        };
        match decision {
            admission::Incoming::Handshake => Some((
                incoming,
                AdmissionSlot {
                    hub: self.clone(),
                    ip,
                },
            )),
            admission::Incoming::Retry => {
                if let Err(e) = incoming.retry() {
                    // may_retry was checked; refuse rather than loop
                    tracing::debug!(%remote, error = %e, "retry not possible; refusing");
                    e.into_incoming().refuse();
                }
                None
            }
            admission::Incoming::Refuse(reason) => {
                tracing::debug!(%remote, reason = reason.label(), "connection refused");
                incoming.refuse();
                None
            }
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        unix_ms(self.inner.clock.now())
    }

    /// Creates a single-use join token bound to a spoke node ID.
    pub fn create_token(&self, spoke: &SpiffeId, ttl: Duration) -> Result<JoinToken, HubError> {
        if spoke.trust_domain() != &self.inner.td {
            return Err(HubError::Invalid(format!(
                "{spoke} is not in this hub's trust domain {}",
                self.inner.td
            )));
        }
        if !matches!(naming::classify(spoke), Some(MeshIdentity::Node { .. })) {
            return Err(HubError::Invalid(format!(
                "{spoke} is not a spoke node ID (expected spiffe://{}/store/STORE/node/NODE)",
                self.inner.td
            )));
        }
        if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(HubError::Invalid(format!(
                "token ttl {} out of range (1s..7d)",
                humantime::format_duration(ttl)
            )));
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| HubError::Invalid("no system randomness".into()))?;
        let token = JoinToken::new(spoke.clone(), &secret, self.ca_fingerprint());
        let now = self.now_ms();
        let rec = store::TokenRecord {
            spoke: spoke.to_string(),
            created_ms: now,
            expires_ms: now + ttl.as_millis() as u64,
        };
        let audit = AuditEntry {
            at_ms: now,
            event: "token_created".into(),
            subject: Some(spoke.to_string()),
            detail: format!("ttl {}", humantime::format_duration(ttl)),
        };
        self.inner
            .store
            .put_token(&svid::sha256(token.secret.as_bytes()), &rec, &audit)?;
        Ok(token)
    }

    /// Every enrolled spoke.
    pub fn spokes(&self) -> Result<Vec<SpokeInfo>, HubError> {
        let live = self.live_ids();
        let reports = self
            .inner
            .reports
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        let latest = self.latest_config()?.map(|v| v.meta.version);
        Ok(self
            .inner
            .store
            .spokes()?
            .into_iter()
            .map(|(id, r)| {
                let connected = live.contains(&id);
                let rep = reports.get(&id);
                SpokeInfo {
                    survival_horizon_s: rep.and_then(|r| r.report.survival_horizon_s),
                    survival_limit: rep.map(|r| r.report.survival_limit.clone()),
                    reported_at: rep.map(|r| rfc3339_ms(r.at_ms)),
                    revocation_version: rep.map(|r| r.report.revocation_version),
                    time_trusted: rep.map(|r| r.report.time_trusted),
                    connected,
                    last_seen: rfc3339_ms(if connected {
                        self.now_ms()
                    } else {
                        r.last_seen_ms
                    }),
                    cert_not_after: rfc3339_ms(r.cert_not_after_ms),
                    enrolled: rfc3339_ms(r.enrolled_ms),
                    revoked: r.revoked_ms.is_some(),
                    config_version: self.applied_version(&id),
                    config_latest: latest,
                    config_state: latest.map(|m| {
                        if self.applied_version(&id) == Some(m) {
                            "SYNCED"
                        } else {
                            "STALE"
                        }
                    }),
                    id,
                }
            })
            .collect())
    }

    fn live_ids(&self) -> HashSet<String> {
        match self.inner.live.lock() {
            Ok(l) => l.keys().cloned().collect(),
            Err(p) => p.into_inner().keys().cloned().collect(),
        }
    }

    /// Revokes a spoke: persisted with a new revocation list version (its
    /// node ID, its node key and every node CA key issued to it), its live
    /// control connection closed at once, the new list pushed to every
    /// connected spoke (which close their tunnels from it), and the hub's
    /// own gateway connections from its workloads closed. Its handshakes,
    /// renewals, streams and re-establishment are refused from then on.
    pub fn revoke(&self, spoke: &SpiffeId) -> Result<(), HubError> {
        let id = spoke.to_string();
        let now = self.now_ms();
        let audit = AuditEntry {
            at_ms: now,
            event: "revoked".into(),
            subject: Some(id.clone()),
            detail: "revoked by operator".into(),
        };
        let Some((_, list)) = self.inner.store.revoke_spoke(spoke, now, &audit)? else {
            return Err(HubError::Invalid(format!("no enrolled spoke {id}")));
        };
        let version = list.version;
        self.install_revocations(list);
        let live = self.inner.live.lock().ok().and_then(|mut l| l.remove(&id));
        if let Some(l) = live {
            l.conn
                .close(quinn::VarInt::from_u32(close::REVOKED), b"revoked");
        }
        info!(target: "tidemesh::audit", spoke = %id, revocation_version = version, "spoke revoked");
        Ok(())
    }

    /// Makes `list` the one in force (if newer), closes gateway connections
    /// it refuses, and pushes it to every connected spoke.
    pub(crate) fn install_revocations(&self, list: RevocationList) {
        if !self.inner.revocations.install(list) {
            return;
        }
        if let Some(cur) = self.inner.revocations.current() {
            self.inner.gateway.close_revoked(&cur);
        }
        let Some(signed) = self.signed_revocations() else {
            return;
        };
        let conns: Vec<quinn::Connection> = self
            .inner
            .live
            .lock()
            .map(|l| l.values().map(|x| x.conn.clone()).collect())
            .unwrap_or_default();
        for conn in conns {
            let signed = signed.clone();
            tokio::spawn(async move { push(&conn, &Push::Revocations((*signed).clone())).await });
        }
    }

    /// The revocation list in force, signed with the CA key (cached per
    /// version).
    pub(crate) fn signed_revocations(&self) -> Option<Arc<SignedRevocationList>> {
        let list = self.inner.revocations.current()?;
        let mut cache = self.inner.signed_revocations.lock().ok()?;
        if let Some((v, s)) = cache.as_ref() {
            if *v == list.version {
                return Some(s.clone());
            }
        }
        match list.sign(&self.inner.ca) {
            Ok(signed) => {
                let signed = Arc::new(signed);
                *cache = Some((list.version, signed.clone()));
                Some(signed)
            }
            Err(e) => {
                warn!(error = %e, "cannot sign the revocation list");
                None
            }
        }
    }

    /// Whether the node ID `id` is revoked now (fails closed).
    pub(crate) fn is_revoked(&self, id: &str) -> bool {
        match (self.inner.revocations.current(), SpiffeId::parse(id)) {
            (Some(list), Ok(id)) => list.node_revoked(&id),
            _ => true,
        }
    }

    /// The revocation list version in force.
    pub fn revocation_version(&self) -> u64 {
        self.inner.revocations.version()
    }

    /// The trust bundle with the revocation list in force.
    pub(crate) fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.inner.td.clone(), vec![self.inner.ca.cert_der()])
            .with_revocations(self.inner.revocations.clone())
    }

    fn server_tls(&self) -> Result<rustls::ServerConfig, HubError> {
        let now = self.inner.clock.now();
        let key = svid::generate_key()?;
        let csr = svid::make_csr(&key, &naming::hub_id(&self.inner.td))?;
        let leaf = self.inner.ca.sign_csr(
            &csr,
            &naming::hub_id(&self.inner.td),
            now - Duration::from_secs(300),
            now + self.inner.cfg.hub_cert_ttl,
        )?;
        let chain = vec![leaf, self.inner.ca.cert_der()];
        let bundle = self.bundle();
        let authorizer = Arc::new(HubAuthorizer);
        verify::server_config(
            bundle,
            chain,
            &key,
            authorizer,
            true,
            self.inner.clock.clone(),
            &[ALPN_CTL, ALPN_DATA],
        )
        .map_err(|e| HubError::Invalid(format!("tls config: {e}")))
    }

    /// Runs the QUIC endpoint (and the admin socket, if configured) on an
    /// already bound socket until `shutdown` resolves.
    pub async fn serve(
        &self,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), HubError> {
        let server = self.inner.cfg.quic.server_config(self.server_tls()?)?;
        let endpoint = tidemesh_net::quic::endpoint(socket, Some(server))?;
        let admin_task = if self.inner.cfg.admin_socket {
            let path = admin::socket_path(&self.inner.data_dir);
            let listener = admin::bind(&path).map_err(io_err(&path))?;
            let hub = self.clone();
            Some(tokio::spawn(admin::serve(listener, move |caller, req| {
                let hub = hub.clone();
                async move { hub.admin(caller, req).await }
            })))
        } else {
            None
        };
        let metrics_task = match self.inner.cfg.metrics {
            Some(addr) => {
                let l = tidemesh_net::metrics::bind(addr)
                    .await
                    .map_err(|e| HubError::Invalid(format!("--metrics {addr}: {e}")))?;
                info!(addr = %l.local_addr().unwrap_or(addr), "serving /metrics, /healthz and /readyz");
                let (hub, hub2) = (self.clone(), self.clone());
                Some(tokio::spawn(tidemesh_net::metrics::serve(
                    l,
                    move || {
                        let hub = hub.clone();
                        async move { hub.metrics_page().await }
                    },
                    move || {
                        let hub = hub2.clone();
                        async move { hub.readiness().await }
                    },
                )))
            }
            None => None,
        };
        let watchdog_task = tokio::spawn(tidemesh_net::sd_notify::watchdog());
        self.inner
            .serving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Listeners bound and stores open (Hub::open opened them): ready
        // for systemd's Type=notify.
        tidemesh_net::sd_notify::notify_logged("READY=1\nSTATUS=serving");
        let hub = self.clone();
        let prune_task = tokio::spawn(async move { hub.prune_loop().await });
        // other replicas' config applies and revocations (shared state only)
        let follow_task = self.follow_shared_state();
        let (otlp_stop, otlp_task) = match &self.inner.otlp {
            Some(x) => {
                info!(endpoint = %x.endpoint(), "exporting spans over OTLP/HTTP");
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let x = x.clone();
                let task = tokio::spawn(async move {
                    x.run(async {
                        let _ = rx.await;
                    })
                    .await
                });
                (Some(tx), Some(task))
            }
            None => (None, None),
        };
        info!(addr = ?endpoint.local_addr().ok(), td = %self.inner.td, "hub serving");
        let refresh = self.inner.cfg.hub_cert_ttl / 2;
        let mut refresh_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + refresh, refresh);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = refresh_timer.tick() => {
                    match self.server_tls().and_then(|tls| Ok(self.inner.cfg.quic.server_config(tls)?)) {
                        Ok(cfg) => endpoint.set_server_config(Some(cfg)),
                        Err(e) => warn!(error = %e, "hub certificate refresh failed"),
                    }
                }
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if let Some((incoming, slot)) = self.admit_incoming(incoming) {
                        let hub = self.clone();
                        tokio::spawn(async move { hub.handle_incoming(incoming, slot).await });
                    }
                }
            }
        }
        tidemesh_net::sd_notify::notify_logged("STOPPING=1\nSTATUS=shutting down");
        self.inner
            .serving
            .store(false, std::sync::atomic::Ordering::SeqCst);
        endpoint.close(
            quinn::VarInt::from_u32(close::SHUTDOWN),
            b"hub shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        if let Some(t) = admin_task {
            t.abort();
            let _ = fs::remove_file(admin::socket_path(&self.inner.data_dir));
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        watchdog_task.abort();
        prune_task.abort();
        if let Some(t) = follow_task {
            t.abort();
        }
        if let (Some(stop), Some(mut task)) = (otlp_stop, otlp_task) {
            // what is queued gets a last, short chance to leave
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        Ok(())
    }

    async fn admin(&self, caller: admin::Caller, req: Value) -> Result<Value, String> {
        let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
        let arg = |k: &str| req.get(k).and_then(Value::as_str).map(str::to_owned);
        match cmd {
            "token_create" => {
                let spoke = arg("spoke").ok_or("missing spoke")?;
                let id = SpiffeId::parse(&spoke).map_err(|e| format!("--spoke {spoke}: {e}"))?;
                let id2 = id.clone();
                let ttl = req
                    .get("ttl_s")
                    .and_then(Value::as_u64)
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_secs(600));
                let token = self
                    .durable(move |hub| hub.create_token(&id2, ttl))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                info!(target: "tidemesh::audit", spoke = %id, uid = ?caller.uid, "join token created");
                Ok(json!({"token": token.to_string(), "expires_in_s": ttl.as_secs()}))
            }
            "spokes" => {
                let list = self.spokes().map_err(|e| e.to_string())?;
                serde_json::to_value(list).map_err(|e| e.to_string())
            }
            "revoke" => {
                let spoke = arg("spoke").ok_or("missing spoke")?;
                let id = SpiffeId::parse(&spoke).map_err(|e| format!("--spoke {spoke}: {e}"))?;
                let id2 = id.clone();
                self.durable(move |hub| hub.revoke(&id2))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(json!({"revoked": id.to_string()}))
            }
            "audit" => {
                let q = audit_query(&req)?;
                let hub = self.clone();
                let page = tokio::task::spawn_blocking(move || hub.inner.store.audit_page(&q))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(audit_page_json(&page))
            }
            "apply" | "diff" | "delete" => {
                let flag = |k: &str| req.get(k).and_then(Value::as_bool).unwrap_or(false);
                let edit =
                    match cmd {
                        "delete" => match (arg("yaml"), arg("kind"), arg("name")) {
                            (Some(yaml), None, None) => sync::ConfigEdit::DeleteYaml(yaml),
                            (None, Some(kind), Some(name)) => sync::ConfigEdit::Delete(vec![
                                tidemesh_policy::lifecycle::parse_key(&kind, &name)?,
                            ]),
                            _ => return Err("delete needs yaml, or kind and name".into()),
                        },
                        _ => sync::ConfigEdit::Apply {
                            yaml: arg("yaml").ok_or("missing yaml")?,
                            prune: flag("prune"),
                        },
                    };
                if cmd == "diff" || flag("dry_run") {
                    let hub = self.clone();
                    let p = tokio::task::spawn_blocking(move || hub.preview(&edit))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    return Ok(json!({
                        "dry_run": true,
                        "base_version": p.base_version,
                        "objects": planned_json(&p.plan.objects),
                        "changes": !p.diff.is_empty(),
                        "diff": p.diff,
                    }));
                }
                let uid = caller.uid;
                let (v, objects) = self
                    .durable(move |hub| hub.edit_config(&edit, uid))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(
                    json!({"version": v.meta.version, "summary": v.meta.summary, "objects": planned_json(&objects)}),
                )
            }
            "config_history" => {
                let h = self
                    .inner
                    .store
                    .config_history()
                    .map_err(|e| e.to_string())?;
                Ok(Value::Array(
                    h.into_iter()
                        .map(|m| json!({"version": m.version, "at": rfc3339_ms(m.at_ms), "uid": m.uid, "summary": m.summary, "rollback_of": m.rollback_of}))
                        .collect(),
                ))
            }
            "config_get" => {
                let v = match req.get("version").and_then(Value::as_u64) {
                    Some(n) => self
                        .inner
                        .store
                        .config_get(n)
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("no config version {n}"))?,
                    None => self
                        .latest_config()
                        .map_err(|e| e.to_string())?
                        .map(|v| (*v).clone())
                        .ok_or("no config has been applied yet")?,
                };
                let text = match arg("format").as_deref() {
                    Some("json") => v.config.to_json(),
                    _ => v.config.to_yaml(),
                };
                Ok(json!({"version": v.meta.version, "text": text}))
            }
            "config_rollback" => {
                let to = req.get("to").and_then(Value::as_u64).ok_or("missing to")?;
                let uid = caller.uid;
                let v = self
                    .durable(move |hub| hub.rollback(to, uid))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(json!({"version": v.meta.version, "summary": v.meta.summary}))
            }
            "stats" => {
                let store = self.inner.evidence.clone();
                // The rest of the stats answer while evidence.db cannot be
                // read (closed after a failed write, reopened later).
                let mut v = tokio::task::spawn_blocking(move || evidence_command(&*store, &req))
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or_else(|e| json!({ "evidence_error": e }));
                if let Some(o) = v.as_object_mut() {
                    let spokes = self.spokes().map_err(|e| e.to_string())?;
                    o.insert("spokes_enrolled".into(), json!(spokes.len()));
                    o.insert(
                        "spokes_connected".into(),
                        json!(spokes.iter().filter(|s| s.connected).count()),
                    );
                    o.insert("ingest".into(), self.ingest_counters_json());
                    o.insert("evidence_store".into(), self.evidence_store_json());
                    o.insert("refusals".into(), self.refusals_json());
                    o.insert(
                        "gateway".into(),
                        self.inner
                            .gateway
                            .counters()
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), json!(v)))
                            .chain(
                                self.inner
                                    .gateway
                                    .refusals()
                                    .into_iter()
                                    .map(|(k, v)| (format!("refused_{k}"), json!(v))),
                            )
                            .collect::<serde_json::Map<_, _>>()
                            .into(),
                    );
                }
                Ok(v)
            }
            "vector" => {
                let service = arg("service").ok_or("missing --service")?;
                let spokes: Vec<SpiffeId> = match arg("spoke") {
                    Some(s) => vec![SpiffeId::parse(&s).map_err(|e| format!("--spoke {s}: {e}"))?],
                    None => self
                        .inner
                        .store
                        .spokes()
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .filter_map(|(id, _)| SpiffeId::parse(&id).ok())
                        .collect(),
                };
                let matrix = self
                    .latest_config()
                    .map_err(|e| e.to_string())?
                    .map(|v| v.config.mode_matrix.clone())
                    .unwrap_or_default();
                let host = tidemesh_policy::units::canonical_host(&service, "default")
                    .map_err(|e| format!("--service {service}: {e}"))?;
                let host = if service.contains('.') {
                    host
                } else {
                    service.clone()
                };
                let store = self.inner.evidence.clone();
                tokio::task::spawn_blocking(move || {
                    vector::vector(&*store, &spokes, &host, &|m| {
                        use tidemesh_evidence::record::Mode as M;
                        use tidemesh_policy::model::{Mode as P, Observability};
                        let mode = match m {
                            M::Target => P::Target,
                            M::Degraded => P::Degraded,
                            M::Survival => P::Survival,
                            M::Recovery => P::Recovery,
                        };
                        match matrix.profile(mode).observability {
                            Observability::Tracing { sampling } => sampling.as_f64(),
                            Observability::MetricsOnly { .. } => 0.0,
                        }
                    })
                })
                .await
                .map_err(|e| e.to_string())?
            }
            c if c.starts_with("evidence_") => {
                let store = self.inner.evidence.clone();
                tokio::task::spawn_blocking(move || evidence_command(&*store, &req))
                    .await
                    .map_err(|e| e.to_string())?
            }
            other => Err(format!("unknown admin command {other:?}")),
        }
    }

    async fn handle_incoming(&self, incoming: quinn::Incoming, _slot: AdmissionSlot) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                info!(%remote, error = %e, "handshake failed");
                return;
            }
        };
        let alpn = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        if alpn.as_deref() == Some(ALPN_DATA) {
            return self.serve_gateway(conn).await;
        }
        // A control session takes a token from the new-session budget, or
        // is told when to come back (before anything else is done for it).
        let session = self
            .inner
            .admission
            .lock()
            .map(|mut a| a.handle_session(std::time::Instant::now()))
            .unwrap_or(admission::Session::Busy {
                retry_after: Duration::from_secs(1),
            });
        if let admission::Session::Busy { retry_after } = session {
            tracing::debug!(%remote, ?retry_after, "over the new-session budget; told to come back");
            conn.close(
                quinn::VarInt::from_u32(close::BUSY),
                &close::busy_reason(retry_after),
            );
            return;
        }
        let peer = tidemesh_net::peer_spiffe_id(&conn);
        let node = match &peer {
            Some(id) => match naming::classify(id) {
                Some(MeshIdentity::Node { .. }) => Some(id.clone()),
                _ => {
                    conn.close(
                        quinn::VarInt::from_u32(close::FORBIDDEN),
                        b"control sessions need a node SVID",
                    );
                    return;
                }
            },
            None => None,
        };
        let stable_id = conn.stable_id();
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => break,
            };
            let hub = self.clone();
            let conn2 = conn.clone();
            let node2 = node.clone();
            tokio::spawn(async move { hub.handle_stream(conn2, node2, send, recv).await });
        }
        if let Some(id) = node {
            let id = id.to_string();
            let removed = self
                .inner
                .live
                .lock()
                .map(|mut l| {
                    if l.get(&id).map(|x| x.stable_id) == Some(stable_id) {
                        l.remove(&id);
                        true
                    } else {
                        false
                    }
                })
                .unwrap_or(false);
            if removed {
                let now = self.now_ms();
                let id2 = id.clone();
                let _ = self
                    .durable_unbounded(move |hub| {
                        hub.inner
                            .store
                            .update_spoke(&id2, None, &mut |r| r.last_seen_ms = now)
                    })
                    .await;
                info!(spoke = %id, reason = ?conn.close_reason(), "spoke disconnected");
            }
        }
    }

    async fn handle_stream(
        &self,
        conn: quinn::Connection,
        node: Option<SpiffeId>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        // A peer without a verified node certificate gets small frames.
        let max = if node.is_some() {
            MAX_FRAME
        } else {
            MAX_ANONYMOUS_FRAME
        };
        let req = match tokio::time::timeout(
            Duration::from_secs(10),
            tidemesh_net::read_frame_max::<Request>(&mut recv, max),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                use tidemesh_proto::FrameError as F;
                let (code, reason) = match &e {
                    tidemesh_net::NetError::Frame(F::UnsupportedVersion { .. }) => (
                        close::UNSUPPORTED_VERSION,
                        refusals::Reason::UnsupportedVersion,
                    ),
                    tidemesh_net::NetError::Frame(F::TooLarge { .. }) => {
                        (close::PROTOCOL_ERROR, refusals::Reason::TooLarge)
                    }
                    _ => (close::PROTOCOL_ERROR, refusals::Reason::Malformed),
                };
                self.refused(
                    (refusals::RefusedRequest::Frame, reason),
                    &node
                        .as_ref()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| conn.remote_address().to_string()),
                );
                tracing::debug!(remote = %conn.remote_address(), error = %e, "bad control frame; closing connection");
                let _ = tidemesh_net::write_frame(
                    &mut send,
                    &Response::Error {
                        code: tidemesh_proto::ErrorCode::BadRequest,
                        message: e.to_string(),
                    },
                )
                .await;
                let _ = send.finish();
                // Let the error frame reach the peer before the close discards it.
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                conn.close(quinn::VarInt::from_u32(code), e.to_string().as_bytes());
                return;
            }
            Err(_) => {
                self.refused(
                    (refusals::RefusedRequest::Frame, refusals::Reason::Timeout),
                    &conn.remote_address().to_string(),
                );
                conn.close(
                    quinn::VarInt::from_u32(close::PROTOCOL_ERROR),
                    b"request timed out",
                );
                return;
            }
        };
        if let (Some(id), Request::Hello { .. }) = (&node, &req) {
            if let Ok(mut l) = self.inner.live.lock() {
                if let Some(old) = l.insert(
                    id.to_string(),
                    Live {
                        conn: conn.clone(),
                        stable_id: conn.stable_id(),
                    },
                ) {
                    if old.stable_id != conn.stable_id() {
                        old.conn.close(
                            quinn::VarInt::from_u32(close::NORMAL),
                            b"replaced by a newer session",
                        );
                    }
                }
            }
            info!(spoke = %id, remote = %conn.remote_address(), "spoke connected");
            if let Some(signed) = self.signed_revocations() {
                let conn = conn.clone();
                tokio::spawn(
                    async move { push(&conn, &Push::Revocations((*signed).clone())).await },
                );
            }
        }
        if let (Some(id), Request::EvidenceOpen) = (&node, &req) {
            if !self.is_revoked(&id.to_string()) {
                self.evidence_session(&conn, id, send, recv).await;
                return;
            }
        }
        let resp = match (&node, req) {
            (
                Some(id),
                Request::SyncConfig {
                    have,
                    have_registry,
                    wait_ms,
                },
            ) if !self.is_revoked(&id.to_string()) => {
                self.sync_config(
                    id,
                    have,
                    have_registry,
                    Duration::from_millis(u64::from(wait_ms)),
                )
                .await
            }
            (Some(id), Request::Register { endpoints }) if !self.is_revoked(&id.to_string()) => {
                self.register(id, endpoints)
            }
            (_, req) => {
                // signing and audit commits: off the async workers
                let c = conn.clone();
                let anonymous = node.is_none();
                match self
                    .durable(move |hub| authority::handle(hub, &c, node.as_ref(), req))
                    .await
                {
                    Ok(r) => r,
                    Err(durable::DurableError::Busy) => {
                        // Refused before any work: an anonymous caller
                        // (enroll, re-establish) is told when to come back;
                        // an authenticated one loses this stream only.
                        if anonymous {
                            let jitter = rand::Rng::random_range(&mut rand::rng(), 0.0..0.5);
                            let after = durable::DURABLE_RETRY_AFTER.mul_f64(1.0 + jitter);
                            conn.close(
                                quinn::VarInt::from_u32(close::BUSY),
                                &close::busy_reason(after),
                            );
                        } else {
                            let _ = send.reset(quinn::VarInt::from_u32(close::BUSY));
                            let _ = recv.stop(quinn::VarInt::from_u32(close::BUSY));
                        }
                        return;
                    }
                    Err(e) => Response::Error {
                        code: tidemesh_proto::ErrorCode::Internal,
                        message: e.to_string(),
                    },
                }
            }
        };
        let close_after = matches!(
            &resp,
            Response::Error {
                code: tidemesh_proto::ErrorCode::Revoked,
                ..
            }
        );
        let _ = tidemesh_net::write_frame(&mut send, &resp).await;
        let _ = send.finish();
        if close_after {
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(quinn::VarInt::from_u32(close::REVOKED), b"revoked");
        }
    }
}

/// Sends one [`Push`] to a spoke on a new unidirectional stream of its
/// control connection; a spoke that is gone just misses it (it gets the
/// same state at its next session start).
pub(crate) async fn push(conn: &quinn::Connection, msg: &Push) {
    let sent = async {
        let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
        tidemesh_net::write_frame(&mut s, msg)
            .await
            .map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), sent).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "push not delivered"),
        Err(_) => tracing::debug!("push timed out"),
    }
}

/// The admin `audit` command's query: `limit` (default
/// [`store::DEFAULT_AUDIT_PAGE`], at most [`store::MAX_AUDIT_PAGE`]),
/// `before` and `after` sequence numbers.
pub fn audit_query(req: &Value) -> Result<AuditQuery, String> {
    let num = |k: &str| -> Result<Option<u64>, String> {
        match req.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("--{k} {v}: expected a sequence number")),
        }
    };
    let limit = num("limit")?.unwrap_or(store::DEFAULT_AUDIT_PAGE as u64);
    if limit == 0 || limit > store::MAX_AUDIT_PAGE as u64 {
        return Err(format!(
            "--limit {limit}: expected 1..={}",
            store::MAX_AUDIT_PAGE
        ));
    }
    Ok(AuditQuery {
        before: num("before")?,
        after: num("after")?,
        limit: limit as usize,
    })
}

/// An audit page as the admin socket answers it: `entries` (oldest first,
/// each `{seq, at, event, subject, detail}`), and the `older` / `newer`
/// cursors (`--before` / `--after` for the next page; null at the ends).
pub fn audit_page_json(page: &AuditPage) -> Value {
    json!({
        "entries": page
            .entries
            .iter()
            .map(|(seq, e)| json!({"seq": seq, "at": rfc3339_ms(e.at_ms), "event": e.event, "subject": e.subject, "detail": e.detail}))
            .collect::<Vec<_>>(),
        "older": page.older,
        "newer": page.newer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tidemesh_identity::clock::SystemClock;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn data_dir_and_ca_key_modes_are_enforced_at_every_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("hub");
        let td = TrustDomain::new("modes.example").expect("td");
        init(&dir, &td, &SystemClock).expect("init");
        let key = dir.join(CA_KEY);
        assert_eq!((mode(&dir), mode(&key)), (0o700, 0o600));
        // A restored backup left both open.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let hub = Hub::open(&dir, HubConfig::default(), Arc::new(SystemClock)).expect("opens");
        drop(hub);
        assert_eq!((mode(&dir), mode(&key)), (0o700, 0o600));
    }
}
