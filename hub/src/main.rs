//! `tidemesh-hub`: the command line over the hub library.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use tidemesh_hub::{Hub, HubConfig, StateLocation};
use tidemesh_identity::{clock::SystemClock, svid, TrustDomain};
use tidemesh_net::admin;

/// The tidemesh hub: SPIFFE certificate authority, enrollment and control
/// plane for a fleet of store spokes.
#[derive(Parser)]
#[command(name = "tidemesh-hub", version = tidemesh_net::build_info::VERSION_LINE, about)]
struct Cli {
    /// Log format for `serve`: `text` or `json`.
    #[arg(
        long,
        global = true,
        env = "TIDEMESH_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Per-peer caps of the gateway to cloud services (`serve`).
#[derive(clap::Args)]
struct GatewayArgs {
    /// Gateway connections one workload (SPIFFE ID) may hold at once, from
    /// any number of spokes; one more is closed.
    #[arg(long, env = "TIDEMESH_GATEWAY_PEER_CONNECTIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    gateway_peer_connections: u32,
    /// Gateway streams one workload may have open at once, across all its
    /// connections; one more is reset.
    #[arg(long, env = "TIDEMESH_GATEWAY_PEER_STREAMS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    gateway_peer_streams: u32,
    /// A gateway stream that has not sent its full header (or request
    /// head) by then is reset and its slots freed.
    #[arg(long, env = "TIDEMESH_GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    gateway_header_timeout: Duration,
}

impl GatewayArgs {
    fn settings(&self) -> anyhow::Result<tidemesh_hub::gateway::GatewaySettings> {
        if self.gateway_header_timeout < Duration::from_millis(100) {
            bail!(
                "--gateway-header-timeout {:?}: must be at least 100ms",
                self.gateway_header_timeout
            );
        }
        Ok(tidemesh_hub::gateway::GatewaySettings {
            max_connections_per_peer: self.gateway_peer_connections as usize,
            max_streams_per_peer: self.gateway_peer_streams as usize,
            header_timeout: self.gateway_header_timeout,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at startup; `serve` has many flags"
)]
enum Cmd {
    /// Create a hub data directory: CA (key mode 0600) and database.
    Init {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The SPIFFE trust domain, e.g. `edge.example` (with --join: the
        /// one in the cluster, checked when given).
        #[arg(long, env = "TIDEMESH_TRUST_DOMAIN", required_unless_present = "join")]
        trust_domain: Option<String>,
        /// Make --data-dir a replica of the hub already in the --store
        /// cluster: its ca.pem and ca_key.pem, copied from the first
        /// replica's data directory, are checked against the cluster's
        /// trust domain and CA fingerprint; nothing is created.
        #[arg(long, requires = "store")]
        join: bool,
        /// Where the control-plane state lives: `redb` (`hub.db` in
        /// --data-dir, the default) or `nats://HOST:PORT[,HOST:PORT...]`, a
        /// NATS JetStream cluster (preview; the CA key and `evidence.db`
        /// stay in --data-dir).
        #[arg(long, env = "TIDEMESH_STORE")]
        store: Option<String>,
    },
    /// Run the hub: QUIC control endpoint and the admin socket.
    Serve {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Where the control-plane state lives: `redb` (`hub.db` in
        /// --data-dir, the default) or `nats://HOST:PORT[,HOST:PORT...]`, a
        /// NATS JetStream cluster (preview; the CA key and `evidence.db`
        /// stay in --data-dir).
        #[arg(long, env = "TIDEMESH_STORE")]
        store: Option<String>,
        /// UDP address for QUIC, e.g. `0.0.0.0:7443`.
        #[arg(long, env = "TIDEMESH_LISTEN", default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Lifetime of node SVIDs (e.g. `1h`, `90s`).
        #[arg(long, env = "TIDEMESH_NODE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
        node_ttl: Duration,
        /// Lifetime of workload SVIDs.
        #[arg(long, env = "TIDEMESH_WORKLOAD_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
        workload_ttl: Duration,
        /// How long a spoke may be out of contact and still come back with its
        /// pinned key after its certificate expired.
        #[arg(long, env = "TIDEMESH_MAX_OFFLINE", default_value = "30d", value_parser = humantime::parse_duration)]
        max_offline: Duration,
        /// QUIC keep-alive interval.
        #[arg(long, env = "TIDEMESH_KEEP_ALIVE", default_value = "1s", value_parser = humantime::parse_duration)]
        keep_alive: Duration,
        /// QUIC idle timeout: a silent peer is declared gone after this.
        #[arg(long, env = "TIDEMESH_IDLE_TIMEOUT", default_value = "4s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
        /// Serve Prometheus metrics (`GET /metrics`), liveness (`GET
        /// /healthz`) and readiness (`GET /readyz`) on this TCP address; off
        /// unless given.
        #[arg(long, env = "TIDEMESH_METRICS")]
        metrics: Option<SocketAddr>,
        /// Most spokes given per-spoke series on /metrics (connected ones
        /// first, then the most recently seen); the fleet-wide gauges count
        /// every spoke, and tidemesh_hub_spoke_series_omitted the rest.
        #[arg(long, env = "TIDEMESH_METRICS_MAX_SPOKES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        metrics_max_spokes: u32,
        /// Export a span per sampled request record the spokes sync (trace,
        /// span and parent ids, timing, status, peers, mode) to this
        /// OpenTelemetry collector over OTLP/HTTP protobuf, e.g.
        /// `http://127.0.0.1:4318/v1/traces`; an `https://` collector is
        /// verified against the system roots (`SSL_CERT_FILE` /
        /// `SSL_CERT_DIR` when set); off unless given.
        #[arg(long, env = "TIDEMESH_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
        otlp_endpoint: Option<String>,
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Evidence batches a spoke may send ahead of the hub's acks (credits).
        #[arg(long, env = "TIDEMESH_EVIDENCE_WINDOW", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        evidence_window: u32,
        /// Evidence batches committed at once across all spokes; a batch that
        /// waits for a slot makes its spoke back off.
        #[arg(long, env = "TIDEMESH_EVIDENCE_SLOTS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
        evidence_slots: u32,
        /// Evidence records per second across all spokes (0: no limit); spokes
        /// over it are told to retry after a while.
        #[arg(long, env = "TIDEMESH_EVIDENCE_RATE", default_value_t = 0)]
        evidence_rate: u32,
        /// Delete evidence older than this (e.g. `90d`); the chain stays
        /// verifiable from a checkpoint. Kept forever unless given.
        #[arg(long, env = "TIDEMESH_EVIDENCE_RETENTION", value_parser = humantime::parse_duration)]
        evidence_retention: Option<Duration>,
        /// Keep at most this many bytes of evidence per spoke (oldest deleted first).
        #[arg(long, env = "TIDEMESH_EVIDENCE_MAX_BYTES")]
        evidence_max_bytes: Option<u64>,
        /// How often retention runs.
        #[arg(long, env = "TIDEMESH_EVIDENCE_PRUNE_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
        evidence_prune_interval: Duration,
        /// New control sessions admitted per second once the burst is spent;
        /// a spoke over it is closed with a retry-after (its slot in the
        /// hub's schedule, one per 1/rate).
        #[arg(long, env = "TIDEMESH_ADMIT_RATE", default_value_t = 50.0)]
        admit_rate: f64,
        /// New control sessions admitted at once before the rate applies.
        #[arg(long, env = "TIDEMESH_ADMIT_BURST", default_value_t = 100)]
        admit_burst: u32,
        /// QUIC connections open at once (control, gateway, handshaking);
        /// more are refused before the handshake.
        #[arg(long, env = "TIDEMESH_MAX_CONNECTIONS", default_value_t = 4096)]
        max_connections: u32,
        /// QUIC connections open at once from one IP address; more are
        /// refused before the handshake.
        #[arg(
            long,
            env = "TIDEMESH_MAX_CONNECTIONS_PER_ADDRESS",
            default_value_t = 128
        )]
        max_connections_per_address: u32,
        /// QUIC address validation (Retry) for clients: `auto` when over the
        /// new-session budget or more than half of --max-connections is in
        /// use, `always` for every new client.
        #[arg(long, env = "TIDEMESH_ADDRESS_VALIDATION", default_value = "auto", value_parser = ["auto", "always"])]
        address_validation: String,
        /// Receive buffer asked of the kernel for the QUIC socket (e.g.
        /// `8MiB`); the size granted is logged and on /metrics.
        #[arg(long, env = "TIDEMESH_UDP_RECV_BUFFER", default_value = "4MiB", value_parser = tidemesh_net::cli::parse_size)]
        udp_recv_buffer: u64,
        /// QUIC flow control: bytes a peer may send on one stream ahead of
        /// the hub's reads (a spoke's evidence stream, say). Bounds what a
        /// fleet of returning spokes puts on the hub's socket and in its
        /// memory at once (spokes × this).
        #[arg(long, env = "TIDEMESH_QUIC_STREAM_WINDOW", default_value = "128KiB", value_parser = tidemesh_net::cli::parse_size)]
        quic_stream_window: u64,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish,
    /// powershell) on stdout, e.g. `tidemesh-hub completions bash >
    /// /usr/share/bash-completion/completions/tidemesh-hub`.
    Completions {
        /// The shell.
        shell: tidemesh_net::cli::Shell,
    },
    /// Print the man page (roff) on stdout, or write one page per command
    /// and subcommand into `--out-dir` (`tidemesh-hub.1`,
    /// `tidemesh-hub-SUBCOMMAND.1`, ...).
    Man {
        /// Write every page here instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Ask the running hub's `/readyz` (on its `--metrics` listener) whether
    /// it is ready. Exit status: 0 ready, 1 answered but not ready (the
    /// reason is printed), 2 nothing answered within `--timeout`.
    Healthcheck {
        /// The hub's metrics listener (its `--metrics`).
        #[arg(long, env = "TIDEMESH_METRICS", default_value = "127.0.0.1:9464")]
        metrics: SocketAddr,
        /// How long to wait for the answer (connect included).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Evidence from the spokes: query, verify, stats, prune. Works on the
    /// running hub, or directly on evidence.db when it is stopped.
    Evidence {
        #[command(subcommand)]
        cmd: EvidenceCmd,
    },
    /// Fleet summary: spokes, evidence totals, per-spoke chains, aggregates
    /// per spoke, service and mode.
    Stats {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The guarantee vector of a service as the evidence at the hub backs
    /// it: per spoke that called it, the six dimensions of its newest
    /// outbound request record per call path, and the records read.
    Vector {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The service's canonical host (`inventory.store`).
        #[arg(long)]
        service: String,
        /// Only this spoke's calls (its node ID).
        #[arg(long)]
        spoke: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// List enrolled spokes.
    Spokes {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a spoke: its connection is closed and it is refused from now on.
    Revoke {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The spoke's node ID.
        #[arg(long)]
        spoke: String,
    },
    /// Apply mesh config: multi-document YAML (Istio AuthorizationPolicy,
    /// VirtualService, DestinationRule, ServiceEntry; tidemesh kinds). All of
    /// it is validated before anything changes; success makes a new version.
    Apply {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The YAML file (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Also remove the objects of the current config whose kind and
        /// namespace occur in the file (kind only for `Store`) but which
        /// the file does not define; `ModeMatrix` and `MeshSettings` are
        /// never pruned.
        #[arg(long)]
        prune: bool,
        /// Say what would change per object (created, configured,
        /// unchanged, pruned) after every check, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What `apply -f FILE` would change in the running hub's config: a
    /// unified diff of the YAML of every object that would change. Exit
    /// status: 0 no differences, 1 differences, 2 error. Changes nothing.
    Diff {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The YAML file (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Diff as `apply --prune` would change it.
        #[arg(long)]
        prune: bool,
    },
    /// Delete objects: those the documents of `-f FILE` name, or one given
    /// as `KIND NAMESPACE/NAME` (`KIND NAME` for `Store`; `ModeMatrix
    /// default` and `MeshSettings default` return to the defaults). All or
    /// nothing: an object that does not exist, or whose removal breaks a
    /// reference, refuses the delete. Success makes a new version.
    Delete {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The YAML file naming the objects (`-` for standard input).
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        file: Option<PathBuf>,
        /// The object's kind, e.g. `VirtualService`.
        #[arg(requires = "name")]
        kind: Option<String>,
        /// `NAMESPACE/NAME` (`NAME` for cluster-scoped kinds).
        name: Option<String>,
    },
    /// Check a config file offline, as `apply` would (documents, fields,
    /// references across documents, TLS files named by DestinationRules,
    /// read here); needs no hub and no data directory. Exit status 0 and a
    /// summary of the objects, or 1 and the errors `apply` would give.
    Validate {
        /// The YAML file (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Validate on top of this config (e.g. `config get` output saved
        /// from the hub) instead of the defaults, for files that refer to
        /// objects applied earlier.
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Config versions: history, get, rollback.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Show the audit log (issuances, renewals, revocations, refusals of
    /// authenticated callers, token burns and replays), one page at a time:
    /// the newest `--limit` entries (before `--before SEQ`), or the oldest
    /// after `--after SEQ`, printed oldest first. Works on the running hub,
    /// or directly on hub.db when it is stopped. Refusals of anonymous
    /// requests are counted, not audited: see `tidemesh-hub stats`.
    Audit {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// At most this many entries (1..=10000).
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
        /// Only entries older than this sequence number (page back with the
        /// first sequence number shown).
        #[arg(long)]
        before: Option<u64>,
        /// Only entries newer than this sequence number, oldest first (page
        /// forward with the last sequence number shown).
        #[arg(long)]
        after: Option<u64>,
        /// Print JSON (an array of entries, oldest first).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum EvidenceCmd {
    /// Records of one spoke, oldest first.
    Query {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The spoke's node ID.
        #[arg(long)]
        spoke: String,
        /// Only records at or after this time: RFC 3339 or a duration back from now (`10m`).
        #[arg(long)]
        since: Option<String>,
        /// Only this kind: request, mode_transition, certificate, config_applied, shed.
        #[arg(long)]
        kind: Option<String>,
        /// Start at this sequence number.
        #[arg(long)]
        from_seq: Option<u64>,
        /// At most this many records (up to 5000; page on with --from-seq).
        #[arg(long, default_value_t = 1_000)]
        limit: u64,
        /// Print JSON (one record per line).
        #[arg(long)]
        json: bool,
    },
    /// Check one spoke's chain from genesis or the retention checkpoint;
    /// exit status 1 names the first broken sequence number.
    Verify {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The spoke's node ID.
        #[arg(long)]
        spoke: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One spoke's counts: records, high-water mark, gaps, chain state.
    Stats {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The spoke's node ID.
        #[arg(long)]
        spoke: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply retention now.
    Prune {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Delete records older than this.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
        /// Keep at most this many bytes per spoke.
        #[arg(long)]
        max_bytes: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Every version: number, time, who, what changed.
    History {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a version's config (the newest by default).
    Get {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Which version.
        #[arg(long)]
        version: Option<u64>,
        /// Output format: yaml or json.
        #[arg(short = 'o', long = "output", default_value = "yaml")]
        output: String,
    },
    /// Make an earlier version current again (as a new version).
    Rollback {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The version to return to.
        #[arg(long)]
        to: u64,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a single-use join token bound to one spoke ID.
    Create {
        /// Where the hub keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-hub].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The spoke node ID: spiffe://TD/store/STORE/node/NODE.
        #[arg(long)]
        spoke: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// Reads a config file (`-`: standard input), at most one byte more than
/// the parser accepts (it then names the size limit).
/// `--otlp-endpoint`: checked here (so a bad URL names the flag before
/// anything binds), kept as text.
fn otlp_endpoint(s: &str) -> Result<String, String> {
    tidemesh_hub::otlp::parse_endpoint(s).map(|_| s.to_owned())
}

fn read_input(file: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let limit = tidemesh_policy::istio::MAX_INPUT_BYTES as u64 + 1;
    let mut s = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_string(&mut s)
            .context("reading standard input")?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(limit).read_to_string(&mut s))
            .with_context(|| format!("-f {}", file.display()))?;
    }
    Ok(s)
}

/// kubectl-style lines: `KIND NAMESPACE/NAME OUTCOME`.
fn print_outcomes(r: &Value, dry_run: bool) {
    for o in r["objects"].as_array().into_iter().flatten() {
        let name = match o["namespace"].as_str() {
            Some(ns) => format!("{ns}/{}", o["name"].as_str().unwrap_or("")),
            None => o["name"].as_str().unwrap_or("").to_owned(),
        };
        println!(
            "{} {name} {}{}",
            o["kind"].as_str().unwrap_or(""),
            o["outcome"].as_str().unwrap_or(""),
            if dry_run { " (dry run)" } else { "" }
        );
    }
}

async fn call(data_dir: &std::path::Path, req: Value) -> anyhow::Result<Value> {
    Ok(admin::call(&admin::socket_path(data_dir), req).await?)
}

/// An evidence command through the running hub, or on `evidence.db`
/// directly when no hub answers on the admin socket.
async fn evidence_call(data_dir: &std::path::Path, req: Value) -> anyhow::Result<Value> {
    match admin::call(&admin::socket_path(data_dir), req.clone()).await {
        Err(admin::AdminError::Unreachable { .. }) => {
            let path = data_dir.join(tidemesh_hub::EVIDENCE_DB);
            if !path.exists() {
                bail!(
                    "no hub answers on {} and {} does not exist",
                    admin::socket_path(data_dir).display(),
                    path.display()
                );
            }
            let store = tidemesh_hub::evidence::EvidenceStore::open(&path)
                .with_context(|| format!("{}", path.display()))?;
            tokio::task::spawn_blocking(move || tidemesh_hub::evidence_command(&store, &req))
                .await?
                .map_err(anyhow::Error::msg)
        }
        other => Ok(other?),
    }
}

/// An audit page through the running hub, or from `hub.db` directly when
/// no hub answers on the admin socket.
async fn audit_call(data_dir: &std::path::Path, req: Value) -> anyhow::Result<Value> {
    match admin::call(&admin::socket_path(data_dir), req.clone()).await {
        Err(admin::AdminError::Unreachable { .. }) => {
            let path = data_dir.join(tidemesh_hub::HUB_DB);
            if !path.exists() {
                bail!(
                    "no hub answers on {} and {} does not exist",
                    admin::socket_path(data_dir).display(),
                    path.display()
                );
            }
            let q = tidemesh_hub::audit_query(&req).map_err(anyhow::Error::msg)?;
            let page = tokio::task::spawn_blocking(move || {
                tidemesh_hub::store::read_audit_page(&path, &q)
                    .with_context(|| format!("{}", path.display()))
            })
            .await??;
            Ok(tidemesh_hub::audit_page_json(&page))
        }
        other => Ok(other?),
    }
}

/// `--data-dir`'s default: `$STATE_DIRECTORY` (systemd), else
/// `/var/lib/tidemesh-hub`; checked to exist before a command runs.
fn default_data_dir() -> PathBuf {
    tidemesh_net::cli::default_data_dir("tidemesh-hub")
}

fn main() -> std::process::ExitCode {
    let cli = tidemesh_net::cli::parse_args::<Cli>();
    tidemesh_net::cli::run_main(real_main(cli))
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Completions { shell } => {
            tidemesh_net::cli::print_completions(Cli::command(), shell)
                .context("writing the completion script")?;
        }
        Cmd::Man { out_dir } => {
            tidemesh_net::cli::write_man(Cli::command(), out_dir.as_deref())
                .context("writing the man pages")?;
        }
        Cmd::Init {
            data_dir,
            trust_domain,
            store,
            join,
        } => {
            let location = StateLocation::parse(store.as_deref()).map_err(anyhow::Error::msg)?;
            if join {
                let (td, fp) = tidemesh_hub::join_state(&data_dir, &location)?;
                if let Some(want) = trust_domain.filter(|t| t != td.as_str()) {
                    bail!("--trust-domain {want:?}: the hub in the cluster is for {td}");
                }
                println!(
                    "{} joins the hub for trust domain {td} (state in NATS JetStream)",
                    data_dir.display()
                );
                println!("ca fingerprint sha256:{}", svid::hex(&fp));
                return Ok(());
            }
            let trust_domain = trust_domain.unwrap_or_default();
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let fp = tidemesh_hub::init_with_state(&data_dir, &td, &SystemClock, &location)?;
            println!(
                "initialized hub for trust domain {td} in {}",
                data_dir.display()
            );
            if let StateLocation::Nats(servers) = &location {
                println!("state in NATS JetStream at nats://{}", servers.join(","));
            }
            println!("ca fingerprint sha256:{}", svid::hex(&fp));
        }
        Cmd::Serve {
            data_dir,
            store,
            listen,
            node_ttl,
            workload_ttl,
            max_offline,
            keep_alive,
            idle_timeout,
            metrics,
            metrics_max_spokes,
            otlp_endpoint,
            gateway,
            evidence_window,
            evidence_slots,
            evidence_rate,
            evidence_retention,
            evidence_max_bytes,
            evidence_prune_interval,
            admit_rate,
            admit_burst,
            max_connections,
            max_connections_per_address,
            address_validation,
            udp_recv_buffer,
            quic_stream_window,
        } => {
            tidemesh_net::cli::init_tracing(&cli.log_format).map_err(anyhow::Error::msg)?;
            let location = StateLocation::parse(store.as_deref()).map_err(anyhow::Error::msg)?;
            if evidence_prune_interval < Duration::from_secs(1) {
                bail!("--evidence-prune-interval {evidence_prune_interval:?}: must be at least 1s");
            }
            if keep_alive >= idle_timeout {
                bail!("--keep-alive {keep_alive:?} must be shorter than --idle-timeout {idle_timeout:?}");
            }
            if !(4096..=64 << 20).contains(&quic_stream_window) {
                bail!("--quic-stream-window {quic_stream_window}: must be between 4KiB and 64MiB");
            }
            let cfg = HubConfig {
                node_ttl,
                workload_ttl,
                max_offline,
                quic: tidemesh_net::QuicSettings {
                    keep_alive,
                    idle_timeout,
                    stream_window: quic_stream_window,
                    ..tidemesh_hub::quic_settings()
                },
                metrics,
                metrics_max_spokes: metrics_max_spokes as usize,
                otlp: otlp_endpoint
                    .map(|e| tidemesh_hub::otlp::parse_endpoint(&e))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--otlp-endpoint {e}"))?
                    .map(tidemesh_hub::otlp::OtlpSettings::new),
                gateway: gateway.settings()?,
                ingest: tidemesh_hub::ingest::IngestSettings {
                    window: evidence_window,
                    max_concurrent: evidence_slots as usize,
                    rate: evidence_rate,
                    ..Default::default()
                },
                retention: tidemesh_hub::evidence::Retention {
                    max_age: evidence_retention,
                    max_bytes_per_spoke: evidence_max_bytes,
                },
                prune_interval: evidence_prune_interval,
                admission: tidemesh_hub::admission::AdmissionSettings {
                    rate: admit_rate,
                    burst: admit_burst,
                    max_connections,
                    max_per_address: max_connections_per_address,
                    always_validate: address_validation == "always",
                    ..Default::default()
                },
                ..Default::default()
            };
            cfg.admission.check().map_err(anyhow::Error::msg)?;
            let udp_recv_buffer = usize::try_from(udp_recv_buffer)
                .ok()
                .filter(|b| (4096..=1 << 30).contains(b))
                .with_context(|| {
                    format!("--udp-recv-buffer {udp_recv_buffer}: must be between 4KiB and 1GiB")
                })?;
            let hub = Hub::open_at(&data_dir, &location, cfg, Arc::new(SystemClock))?;
            let sock =
                std::net::UdpSocket::bind(listen).with_context(|| format!("--listen {listen}"))?;
            let bound = sock.local_addr()?;
            println!("listening={bound}");
            let (socket, granted) = tidemesh_net::quic::wrap_socket_sized(sock, udp_recv_buffer)?;
            // Linux grants 2 × min(request, net.core.rmem_max) and reports
            // that (half of it is bookkeeping): less than 2 × the request
            // means the request was capped.
            if granted / 2 < udp_recv_buffer {
                tracing::warn!(
                    requested = udp_recv_buffer,
                    granted,
                    "the kernel granted a smaller UDP receive buffer than --udp-recv-buffer: raise net.core.rmem_max"
                );
            } else {
                tracing::info!(requested = udp_recv_buffer, granted, "UDP receive buffer");
            }
            hub.note_udp_recv_buffer(udp_recv_buffer, granted);
            hub.serve(socket, tidemesh_net::cli::shutdown_signal())
                .await?;
        }
        Cmd::Healthcheck { metrics, timeout } => {
            std::process::exit(tidemesh_net::cli::healthcheck(metrics, timeout).await);
        }
        Cmd::Token {
            cmd:
                TokenCmd::Create {
                    data_dir,
                    spoke,
                    ttl,
                },
        } => {
            let r = call(
                &data_dir,
                json!({"cmd": "token_create", "spoke": spoke, "ttl_s": ttl.as_secs().max(1)}),
            )
            .await?;
            println!(
                "{}",
                r.get("token").and_then(Value::as_str).unwrap_or_default()
            );
        }
        Cmd::Spokes { data_dir, json } => {
            let r = call(&data_dir, json!({"cmd": "spokes"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:<50} {:<10} {:<22} {:<22} {:<24} {:<5} CONFIG",
                    "ID", "STATE", "LAST SEEN", "CERT NOT AFTER", "HORIZON (LIMIT)", "REVOC"
                );
                for s in r.as_array().into_iter().flatten() {
                    let state = if s["revoked"].as_bool() == Some(true) {
                        "revoked"
                    } else if s["connected"].as_bool() == Some(true) {
                        "connected"
                    } else {
                        "offline"
                    };
                    let horizon = match (
                        s["survival_horizon_s"].as_u64(),
                        s["survival_limit"].as_str(),
                    ) {
                        (Some(h), Some(l)) => format!(
                            "{} ({l})",
                            humantime::format_duration(Duration::from_secs(h / 60 * 60))
                        ),
                        (None, Some(l)) => format!("unbounded ({l})"),
                        _ => "-".into(),
                    };
                    let config = match (s["config_state"].as_str(), s["config_latest"].as_u64()) {
                        (Some(st), Some(m)) => format!(
                            "{st} ({} of v{m})",
                            s["config_version"]
                                .as_u64()
                                .map(|n| format!("v{n}"))
                                .unwrap_or_else(|| "none".into())
                        ),
                        _ => "-".into(),
                    };
                    println!(
                        "{:<50} {:<10} {:<22} {:<22} {:<24} {:<5} config: {config}",
                        s["id"].as_str().unwrap_or(""),
                        state,
                        s["last_seen"].as_str().unwrap_or(""),
                        s["cert_not_after"].as_str().unwrap_or(""),
                        horizon,
                        s["revocation_version"]
                            .as_u64()
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        Cmd::Revoke { data_dir, spoke } => {
            call(&data_dir, json!({"cmd": "revoke", "spoke": spoke})).await?;
            println!("revoked {spoke}");
        }
        Cmd::Apply {
            data_dir,
            file,
            prune,
            dry_run,
        } => {
            let yaml = read_input(&file)?;
            let r = call(
                &data_dir,
                json!({"cmd": "apply", "yaml": yaml, "prune": prune, "dry_run": dry_run}),
            )
            .await?;
            print_outcomes(&r, dry_run);
            if dry_run {
                println!(
                    "dry run: nothing changed (current config version {})",
                    r["base_version"].as_u64().unwrap_or(0)
                );
            } else {
                println!(
                    "applied: config version {} ({})",
                    r["version"],
                    r["summary"].as_str().unwrap_or("")
                );
            }
        }
        Cmd::Diff {
            data_dir,
            file,
            prune,
        } => {
            let r = async {
                let yaml = read_input(&file)?;
                call(
                    &data_dir,
                    json!({"cmd": "diff", "yaml": yaml, "prune": prune}),
                )
                .await
            }
            .await;
            match r {
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(2);
                }
                Ok(r) => {
                    print!("{}", r["diff"].as_str().unwrap_or(""));
                    if r["changes"].as_bool() == Some(true) {
                        std::process::exit(1);
                    }
                }
            }
        }
        Cmd::Delete {
            data_dir,
            file,
            kind,
            name,
        } => {
            let req = match (file, kind, name) {
                (Some(f), None, None) => json!({"cmd": "delete", "yaml": read_input(&f)?}),
                (None, Some(k), Some(n)) => json!({"cmd": "delete", "kind": k, "name": n}),
                _ => bail!("give -f FILE, or KIND NAMESPACE/NAME"),
            };
            let r = call(&data_dir, req).await?;
            print_outcomes(&r, false);
            println!(
                "deleted: config version {} ({})",
                r["version"],
                r["summary"].as_str().unwrap_or("")
            );
        }
        Cmd::Validate { file, base } => {
            let yaml = read_input(&file)?;
            let base = base
                .map(|b| {
                    std::fs::read_to_string(&b).with_context(|| format!("--base {}", b.display()))
                })
                .transpose()?;
            let config = tidemesh_hub::sync::validate_offline(base.as_deref(), &yaml)
                .map_err(anyhow::Error::msg)?;
            let docs = tidemesh_policy::parse_documents(&yaml).map_err(anyhow::Error::msg)?;
            let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
            for d in &docs {
                *kinds.entry(d.object.kind()).or_default() += 1;
            }
            let by_kind: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let objects = |n: usize| format!("{n} object{}", if n == 1 { "" } else { "s" });
            println!(
                "valid: {} ({}); the config would hold {}",
                objects(docs.len()),
                by_kind.join(", "),
                objects(config.objects().len())
            );
        }
        Cmd::Config {
            cmd: ConfigCmd::History { data_dir, json },
        } => {
            let r = call(&data_dir, json!({"cmd": "config_history"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{:>7}  {:<22} {:<6} SUMMARY", "VERSION", "AT", "UID");
                for e in r.as_array().into_iter().flatten() {
                    println!(
                        "{:>7}  {:<22} {:<6} {}",
                        e["version"].as_u64().unwrap_or(0),
                        e["at"].as_str().unwrap_or(""),
                        e["uid"]
                            .as_u64()
                            .map(|u| u.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e["summary"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Config {
            cmd:
                ConfigCmd::Get {
                    data_dir,
                    version,
                    output,
                },
        } => {
            if output != "yaml" && output != "json" {
                bail!("-o {output:?}: expected yaml or json");
            }
            let mut req = json!({"cmd": "config_get", "format": output});
            if let Some(v) = version {
                req["version"] = json!(v);
            }
            let r = call(&data_dir, req).await?;
            print!("{}", r["text"].as_str().unwrap_or(""));
        }
        Cmd::Config {
            cmd: ConfigCmd::Rollback { data_dir, to },
        } => {
            let r = call(&data_dir, json!({"cmd": "config_rollback", "to": to})).await?;
            println!(
                "rolled back: config version {} ({})",
                r["version"],
                r["summary"].as_str().unwrap_or("")
            );
        }
        Cmd::Evidence {
            cmd:
                EvidenceCmd::Query {
                    data_dir,
                    spoke,
                    since,
                    kind,
                    from_seq,
                    limit,
                    json,
                },
        } => {
            let r = evidence_call(
                &data_dir,
                json!({"cmd": "evidence_query", "spoke": spoke, "since": since, "kind": kind, "from_seq": from_seq, "limit": limit}),
            )
            .await?;
            tidemesh_net::cli::print_records(&r, json);
        }
        Cmd::Evidence {
            cmd:
                EvidenceCmd::Verify {
                    data_dir,
                    spoke,
                    json,
                },
        } => {
            // how many records there are, for the progress line (terminal only)
            let held = if std::io::stderr().is_terminal() {
                evidence_call(&data_dir, json!({"cmd": "evidence_stats", "spoke": spoke}))
                    .await
                    .ok()
                    .and_then(|v| v["records"].as_u64())
            } else {
                None
            };
            let r = tidemesh_net::progress::show_while(
                evidence_call(&data_dir, json!({"cmd": "evidence_verify", "spoke": spoke})),
                Duration::from_millis(250),
                |elapsed| async move {
                    let what = match held {
                        Some(n) => format!("{n} records held"),
                        None => "evidence.db".to_owned(),
                    };
                    Some(tidemesh_net::progress::counted(
                        "verifying the evidence chain",
                        0,
                        None,
                        elapsed,
                        &what,
                    ))
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            if r["ok"] != Value::Bool(true) {
                let breaks: Vec<String> = r["breaks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        format!(
                            "seq {}: {} {}",
                            b["seq"],
                            b["kind"].as_str().unwrap_or(""),
                            b["detail"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                bail!("evidence chain of {spoke} broken: {}", breaks.join("; "));
            }
            if !json {
                println!(
                    "evidence chain of {spoke} ok: {} records checked, seq {}..{}",
                    r["records_checked"], r["from_seq"], r["to_seq"]
                );
            }
        }
        Cmd::Evidence {
            cmd:
                EvidenceCmd::Stats {
                    data_dir,
                    spoke,
                    json,
                },
        } => {
            let r =
                evidence_call(&data_dir, json!({"cmd": "evidence_stats", "spoke": spoke})).await?;
            tidemesh_net::cli::print_object(&r, json);
        }
        Cmd::Evidence {
            cmd:
                EvidenceCmd::Prune {
                    data_dir,
                    max_age,
                    max_bytes,
                },
        } => {
            if max_age.is_none() && max_bytes.is_none() {
                bail!("give --max-age and/or --max-bytes");
            }
            let r = evidence_call(
                &data_dir,
                json!({"cmd": "evidence_prune", "max_age_s": max_age.map(|d| d.as_secs()), "max_bytes": max_bytes}),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Vector {
            data_dir,
            service,
            spoke,
            json,
        } => {
            let r = call(
                &data_dir,
                json!({"cmd": "vector", "service": service, "spoke": spoke}),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let all = match r {
                    Value::Array(v) => v,
                    one => vec![one],
                };
                for v in &all {
                    tidemesh_net::cli::print_vector(v);
                }
            }
        }
        Cmd::Stats { data_dir, json } => {
            let r = evidence_call(&data_dir, json!({"cmd": "stats"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let f = |k: &str| {
                    r.get(k)
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into())
                };
                println!("spokes enrolled:   {}", f("spokes_enrolled"));
                println!("spokes connected:  {}", f("spokes_connected"));
                println!(
                    "evidence records:  {} ({} bytes)",
                    f("evidence_records"),
                    f("evidence_bytes")
                );
                println!("evidence gaps:     {}", f("evidence_gaps"));
                println!("chains broken:     {}", f("chains_broken"));
                match r["refusals"]["total"].as_u64() {
                    Some(n) => println!("refusals:          {n} (since the hub started)"),
                    None => println!("refusals:          - (the hub is not running)"),
                }
                for x in r["refusals"]["by_reason"].as_array().into_iter().flatten() {
                    println!(
                        "  {}/{} {}",
                        x["request"].as_str().unwrap_or(""),
                        x["reason"].as_str().unwrap_or(""),
                        x["count"]
                    );
                }
                for s in r["per_spoke"].as_array().into_iter().flatten() {
                    println!(
                        "  {} hwm {} records {} gaps {} chain_ok {}",
                        s["spoke"].as_str().unwrap_or(""),
                        s["high_water_mark"],
                        s["records"],
                        s["gaps"],
                        s["chain_ok"]
                    );
                }
                for a in r["aggregates"].as_array().into_iter().flatten() {
                    println!("  {a}");
                }
            }
        }
        Cmd::Audit {
            data_dir,
            limit,
            before,
            after,
            json,
        } => {
            let r = audit_call(
                &data_dir,
                json!({"cmd": "audit", "limit": limit, "before": before, "after": after}),
            )
            .await?;
            let entries = r
                .get("entries")
                .cloned()
                .unwrap_or(Value::Array(Vec::new()));
            if let Some(seq) = r["older"].as_u64() {
                eprintln!("older entries: --before {seq}");
            }
            if let Some(seq) = r["newer"].as_u64() {
                eprintln!("newer entries: --after {seq}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries.as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {} {:<16} {} {}",
                        e["seq"].as_u64().unwrap_or(0),
                        e["at"].as_str().unwrap_or(""),
                        e["event"].as_str().unwrap_or(""),
                        e["subject"].as_str().unwrap_or("-"),
                        e["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}
