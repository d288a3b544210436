//! `tidemesh-spoke`: the command line over the spoke library.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use tidemesh_identity::clock::SystemClock;
use tidemesh_net::{admin, cli::parse_size, progress, QuicSettings};
use tidemesh_spoke::{FileConfig, Spoke, SpokeConfig};

/// The tidemesh spoke: a store's node proxy that keeps working when the
/// uplink to the hub drops.
#[derive(Parser)]
#[command(name = "tidemesh-spoke", version = tidemesh_net::build_info::VERSION_LINE, about)]
struct Cli {
    /// Log format for `run`: `text` or `json`.
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

// Parsed once per process; the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Enroll with the hub using a single-use join token.
    Enroll {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The hub's QUIC address, host:port.
        #[arg(long, env = "TIDEMESH_HUB")]
        hub: String,
        /// The join token from `tidemesh-hub token create`.
        #[arg(long, env = "TIDEMESH_TOKEN")]
        token: String,
        /// Replace an existing enrollment (new key, new identity).
        #[arg(long)]
        force: bool,
        /// When the hub answers busy, wait its retry-after (plus jitter)
        /// and ask again, for at most this long in all (`--wait` alone:
        /// 5m) and at most 100 times; without it a busy hub fails the
        /// enrollment at once.
        #[arg(long, num_args = 0..=1, default_missing_value = "5m", value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
    },
    /// Run the spoke.
    Run {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Spoke configuration (TOML): workloads, hub address.
        #[arg(long, env = "TIDEMESH_CONFIG")]
        config: Option<PathBuf>,
        /// Override the hub address stored at enrollment (and `hub` in the
        /// config file): `host:port`, or the replicas of one hub as a comma
        /// list `a:7443,b:7443` (at most 8), tried in turn.
        #[arg(long, env = "TIDEMESH_HUB")]
        hub: Option<String>,
        /// Renew SVIDs this far into their lifetime (0.05..0.95).
        #[arg(long, env = "TIDEMESH_RENEW_AT", default_value_t = 0.5)]
        renew_at: f64,
        /// Largest ceiling of the delay between reconnect attempts
        /// (exponential backoff from 200 ms with full jitter); when the hub
        /// is busy its retry-after is honoured instead.
        #[arg(long, env = "TIDEMESH_RECONNECT_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
        reconnect_max: Duration,
        /// QUIC keep-alive interval.
        #[arg(long, env = "TIDEMESH_KEEP_ALIVE", default_value = "1s", value_parser = humantime::parse_duration)]
        keep_alive: Duration,
        /// QUIC idle timeout: the hub is declared unreachable after this much silence.
        #[arg(long, env = "TIDEMESH_IDLE_TIMEOUT", default_value = "4s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
        /// QUIC keep-alive of data tunnel connections (to peer spokes and the
        /// hub gateway).
        #[arg(long, env = "TIDEMESH_DATA_KEEP_ALIVE", default_value = "5s", value_parser = humantime::parse_duration)]
        data_keep_alive: Duration,
        /// A data tunnel connection silent this long is dropped; the next
        /// call makes a new handshake.
        #[arg(long, env = "TIDEMESH_DATA_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
        data_idle_timeout: Duration,
        /// Data tunnel connections one peer workload (SPIFFE ID) may hold at
        /// once on this spoke's listener, from any address; one more is closed.
        #[arg(long, env = "TIDEMESH_DATA_PEER_CONNECTIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        data_peer_connections: u32,
        /// Data tunnel streams one peer workload may have open at once on this
        /// spoke, across all its connections; one more is reset.
        #[arg(long, env = "TIDEMESH_DATA_PEER_STREAMS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
        data_peer_streams: u32,
        /// Data tunnel handshakes in progress from one source IP address
        /// (before any identity is known); one more is refused.
        #[arg(long, env = "TIDEMESH_DATA_ADDRESS_HANDSHAKES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        data_address_handshakes: u32,
        /// Deadline for a tunnel handshake, a tunnel stream's header and an
        /// app's request head: a stream that has not sent its full header by
        /// then is reset and its slots freed.
        #[arg(long, env = "TIDEMESH_DATA_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
        data_header_timeout: Duration,
        /// Serve Prometheus metrics (`GET /metrics`), liveness (`GET
        /// /healthz`) and readiness (`GET /readyz`) on this TCP address; off
        /// unless given. With it, a data directory not enrolled yet is
        /// waited on (`/readyz` 503 "not enrolled") instead of an error.
        #[arg(long, env = "TIDEMESH_METRICS")]
        metrics: Option<SocketAddr>,
        /// Byte bound of the evidence buffer (e.g. `2GiB`, `64MiB`); when full,
        /// debug then request records are shed into shed records, audit records never.
        #[arg(long, env = "TIDEMESH_EVIDENCE_CAPACITY", default_value = "2GiB", value_parser = parse_size)]
        evidence_capacity: u64,
        /// How long the evidence writer gathers records before one durable
        /// commit (1ms..1s): the most a power cut or SIGKILL can lose.
        #[arg(long, env = "TIDEMESH_EVIDENCE_COMMIT_INTERVAL", default_value = "20ms", value_parser = parse_commit_interval)]
        evidence_commit_interval: Duration,
        /// Evidence records held in memory while commits are pending or
        /// failing (disk full); past half of it the writer sheds request
        /// and debug records into counted shed records, at the bound appends
        /// are refused (counted as lost, reason `backlogged`).
        #[arg(long, env = "TIDEMESH_EVIDENCE_MAX_QUEUED", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(16..=10_000_000))]
        evidence_max_queued: u64,
        /// Most evidence records per second sent to the hub after a partition (0: no cap).
        #[arg(long, env = "TIDEMESH_EVIDENCE_DRAIN_RATE", default_value_t = 20_000)]
        evidence_drain_rate: u32,
        /// Most records per evidence batch (batches are also capped at 1 MB).
        #[arg(long, env = "TIDEMESH_EVIDENCE_BATCH", default_value_t = 2_048, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        evidence_batch: u32,
        /// How long a partial evidence batch waits for more records once the
        /// spoke is caught up (0s: send each commit at once; at most 10s).
        #[arg(long, env = "TIDEMESH_EVIDENCE_LINGER", default_value = "200ms", value_parser = parse_linger)]
        evidence_linger: Duration,
        /// Serve the SPIFFE Workload API on this Unix socket, e.g.
        /// `unix:///run/tidemesh/workload.sock` (the config file's
        /// `workload_api`; this flag overrides it). Callers get the SVIDs of
        /// the workloads whose `selectors` they match.
        #[arg(long, env = "TIDEMESH_WORKLOAD_API", value_parser = tidemesh_spoke::workload_api::WorkloadApiAddr::parse)]
        workload_api: Option<tidemesh_spoke::workload_api::WorkloadApiAddr>,
        /// The Workload API socket's permission bits, octal (default 0666;
        /// the config file's `workload_api_mode`).
        #[arg(long, env = "TIDEMESH_WORKLOAD_API_MODE", value_parser = tidemesh_spoke::workload_api::SocketMode::parse)]
        workload_api_mode: Option<tidemesh_spoke::workload_api::SocketMode>,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish,
    /// powershell) on stdout, e.g. `tidemesh-spoke completions bash >
    /// /usr/share/bash-completion/completions/tidemesh-spoke`.
    Completions {
        /// The shell.
        shell: tidemesh_net::cli::Shell,
    },
    /// Print the man page (roff) on stdout, or write one page per command
    /// and subcommand into `--out-dir` (`tidemesh-spoke.1`,
    /// `tidemesh-spoke-SUBCOMMAND.1`, ...).
    Man {
        /// Write every page here instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Ask the running spoke's `/readyz` (on its `--metrics` listener) whether
    /// it is ready. Exit status: 0 ready, 1 answered but not ready (the
    /// reason is printed), 2 nothing answered within `--timeout`.
    Healthcheck {
        /// The spoke's metrics listener (its `--metrics`).
        #[arg(long, env = "TIDEMESH_METRICS", default_value = "127.0.0.1:9465")]
        metrics: SocketAddr,
        /// How long to wait for the answer (connect included).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Show the running spoke's status.
    Status {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Then follow the evidence backlog as it drains: one line redrawn
        /// on stderr on a terminal, one line per look on stdout otherwise;
        /// until interrupted (or drained, with --until-drained).
        #[arg(long)]
        watch: bool,
        /// How often --watch looks.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "watch")]
        interval: Duration,
        /// Stop watching (exit 0) once no record is pending.
        #[arg(long, requires = "watch")]
        until_drained: bool,
    },
    /// The config this spoke serves.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// SVIDs for local apps that do their own mTLS.
    Svid {
        #[command(subcommand)]
        cmd: SvidCmd,
    },
    /// The running spoke's evidence buffer.
    Evidence {
        #[command(subcommand)]
        cmd: EvidenceCmd,
    },
    /// Probe the same-site endpoints of a service over the data tunnel, as
    /// one of this spoke's workloads (mTLS with its SVID); the peer spoke
    /// answers for itself. Exit status 1 when no endpoint answers.
    Probe {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The calling workload (service account) of this spoke.
        #[arg(long)]
        workload: String,
        /// The service to probe (a host as apps write it).
        #[arg(long)]
        service: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The guarantee vector of a service (or of every service this spoke
    /// can route to): the level of each of the six dimensions per call
    /// path, the mode, and the evidence behind each level.
    Vector {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// The service (a host as apps write it); all when absent.
        #[arg(long)]
        service: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drill helpers.
    Drill {
        #[command(subcommand)]
        cmd: DrillCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the last-known-good config the spoke serves (its slice of the
    /// hub's config), from the running spoke or, when it is stopped, from
    /// `spoke.db`; the hub is not asked. Its version goes to stderr.
    Dump {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Output format: yaml or json.
        #[arg(short = 'o', long = "output", default_value = "yaml", value_parser = ["yaml", "json"])]
        output: String,
    },
}

#[derive(Subcommand)]
enum EvidenceCmd {
    /// The newest records.
    Tail {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// How many.
        #[arg(short = 'n', default_value_t = 10)]
        n: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Buffer depth, sequence numbers, shed counts, sync progress.
    Stats {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain of every held record (through the running
    /// spoke, or directly on evidence.db when it is stopped); exit status 1
    /// names the first broken sequence number.
    Verify {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DrillCmd {
    /// Make the running spoke append synthetic request records (tagged as
    /// drill records) at a fixed rate; prints how many were committed.
    Load {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Records per second.
        #[arg(long)]
        rate: f64,
        /// For how long (e.g. `60s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[derive(Subcommand)]
enum SvidCmd {
    /// Write svid.pem (leaf first), svid_key.pem (PKCS#8) and bundle.pem.
    Export {
        /// Where the spoke keeps its state [default: $STATE_DIRECTORY, else
        /// /var/lib/tidemesh-spoke].
        #[arg(long, env = "TIDEMESH_DATA_DIR", default_value_os_t = default_data_dir(), hide_default_value = true)]
        data_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Export this workload's SVID instead of the node's.
        #[arg(long)]
        workload: Option<String>,
    },
}

fn hub_addr(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    tidemesh_spoke::config::parse_hub_addr(s).map_err(|e| anyhow::anyhow!("{flag} {s:?}: {e}"))
}

/// Most waits of `enroll --wait` on a busy hub.
const ENROLL_MAX_WAITS: u32 = 100;

fn client_socket(hub: SocketAddr) -> anyhow::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    let bind: SocketAddr = if hub.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let sock = std::net::UdpSocket::bind(bind).context("binding a UDP socket")?;
    Ok(tidemesh_net::quic::wrap_socket(sock)?)
}

fn parse_commit_interval(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(1) {
        return Err(format!("{v}: must be between 1ms and 1s"));
    }
    Ok(d)
}

fn parse_linger(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(10) {
        return Err(format!("{v}: at most 10s"));
    }
    Ok(d)
}

/// `--data-dir`'s default: `$STATE_DIRECTORY` (systemd), else
/// `/var/lib/tidemesh-spoke`; checked to exist before a command runs.
fn default_data_dir() -> PathBuf {
    tidemesh_net::cli::default_data_dir("tidemesh-spoke")
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
        Cmd::Enroll {
            data_dir,
            hub,
            token,
            force,
            wait,
        } => {
            let addr = hub_addr("--hub", &hub)?;
            let e = match wait {
                None => {
                    tidemesh_spoke::enroll(
                        &data_dir,
                        addr,
                        &token,
                        force,
                        client_socket(addr)?,
                        Arc::new(SystemClock),
                        QuicSettings::default(),
                    )
                    .await?
                }
                Some(wait) => {
                    tidemesh_spoke::enroll_waiting(
                        &data_dir,
                        addr,
                        &token,
                        force,
                        || {
                            client_socket(addr).map_err(|e| {
                                tidemesh_spoke::SpokeError::Net(tidemesh_net::NetError::Io(
                                    std::io::Error::other(format!("{e:#}")),
                                ))
                            })
                        },
                        Arc::new(SystemClock),
                        QuicSettings::default(),
                        wait,
                        ENROLL_MAX_WAITS,
                        |after, d| {
                            eprintln!(
                                "hub busy: retry-after {} ms; asking again in {} ms",
                                after.as_millis(),
                                d.as_millis()
                            );
                        },
                    )
                    .await?
                }
            };
            if hub.parse::<SocketAddr>().is_err() {
                // keep the name, so later runs resolve it afresh
                tidemesh_spoke::CredStore::new(&data_dir).set_hub(&hub)?;
            }
            println!(
                "enrolled as {} (node SVID valid until {})",
                e.id,
                humantime::format_rfc3339_seconds(e.not_after)
            );
        }
        Cmd::Run {
            data_dir,
            config,
            hub,
            renew_at,
            reconnect_max,
            keep_alive,
            idle_timeout,
            data_keep_alive,
            data_idle_timeout,
            data_peer_connections,
            data_peer_streams,
            data_address_handshakes,
            data_header_timeout,
            metrics,
            evidence_capacity,
            evidence_commit_interval,
            evidence_max_queued,
            evidence_drain_rate,
            evidence_batch,
            evidence_linger,
            workload_api,
            workload_api_mode,
        } => {
            tidemesh_net::cli::init_tracing(&cli.log_format).map_err(anyhow::Error::msg)?;
            let file = match &config {
                Some(p) => FileConfig::load(p)?,
                None => FileConfig::default(),
            };
            if !(0.05..=0.95).contains(&renew_at) {
                bail!("--renew-at {renew_at}: must be between 0.05 and 0.95");
            }
            if keep_alive >= idle_timeout {
                bail!("--keep-alive {keep_alive:?} must be shorter than --idle-timeout {idle_timeout:?}");
            }
            if data_header_timeout < Duration::from_millis(100) {
                bail!("--data-header-timeout {data_header_timeout:?}: must be at least 100ms");
            }
            if data_keep_alive >= data_idle_timeout {
                bail!("--data-keep-alive {data_keep_alive:?} must be shorter than --data-idle-timeout {data_idle_timeout:?}");
            }
            let hub = hub
                .map(|h| {
                    tidemesh_spoke::config::HubAddrs::parse_list(&h)
                        .map_err(|e| anyhow::anyhow!("--hub {e}"))
                })
                .transpose()?;
            if workload_api.is_none() && file.workload_api.is_none() {
                if workload_api_mode.is_some() {
                    bail!("--workload-api-mode: is the mode of the Workload API socket: set --workload-api (or workload_api in the config file) too");
                }
                if file.workload_api_mode.is_some() {
                    bail!("workload_api_mode in the config file: is the mode of the Workload API socket: set workload_api in the config file (or --workload-api) too");
                }
            }
            let file = FileConfig {
                hub: hub.or(file.hub),
                workload_api: workload_api.or(file.workload_api),
                workload_api_mode: workload_api_mode.or(file.workload_api_mode),
                ..file
            };
            let cfg = SpokeConfig {
                hub: None,
                file,
                renew_fraction: renew_at,
                reconnect_max,
                quic: QuicSettings {
                    keep_alive,
                    idle_timeout,
                    ..Default::default()
                },
                evidence: tidemesh_spoke::buffer::BufferConfig {
                    capacity_bytes: evidence_capacity,
                    commit_interval: evidence_commit_interval,
                    max_queued: evidence_max_queued,
                    ..Default::default()
                },
                sync: tidemesh_spoke::SyncSettings {
                    drain_rate: evidence_drain_rate,
                    batch_records: evidence_batch as usize,
                    linger: evidence_linger,
                },
                metrics,
                data: {
                    let d = tidemesh_spoke::dataplane::DataSettings::default();
                    tidemesh_spoke::dataplane::DataSettings {
                        quic: QuicSettings {
                            keep_alive: data_keep_alive,
                            idle_timeout: data_idle_timeout,
                            ..d.quic
                        },
                        max_connections_per_peer: data_peer_connections as usize,
                        max_streams_per_peer: data_peer_streams as usize,
                        max_handshakes_per_address: data_address_handshakes as usize,
                        header_timeout: data_header_timeout,
                        ..d
                    }
                },
                ..Default::default()
            };
            // Not enrolled yet: with --metrics, wait for `enroll` and say so
            // on /readyz (a unit may be enabled first); without, fail now.
            if let Some(m) = metrics {
                if !tidemesh_spoke::wait_enrolled(
                    &data_dir,
                    m,
                    tidemesh_net::cli::shutdown_signal(),
                )
                .await?
                {
                    return Ok(());
                }
            }
            let spoke = Spoke::open(&data_dir, cfg, Arc::new(SystemClock))?;
            let sock = client_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            spoke
                .run(sock, tidemesh_net::cli::shutdown_signal())
                .await?;
        }
        Cmd::Healthcheck { metrics, timeout } => {
            std::process::exit(tidemesh_net::cli::healthcheck(metrics, timeout).await);
        }
        Cmd::Config {
            cmd: ConfigCmd::Dump { data_dir, output },
        } => {
            let req = json!({"cmd": "config_dump", "format": output});
            let r = match admin::call(&admin::socket_path(&data_dir), req).await {
                Ok(r) => r,
                Err(admin::AdminError::Unreachable { .. }) => {
                    tidemesh_spoke::config_dump_offline(&data_dir, &output)?
                }
                Err(e) => return Err(e.into()),
            };
            eprintln!(
                "config version {} (made at the hub {}, applied here {})",
                r["version"],
                r["hub_applied"].as_str().unwrap_or("?"),
                r["applied"].as_str().unwrap_or("?")
            );
            print!("{}", r["text"].as_str().unwrap_or(""));
        }
        Cmd::Status {
            data_dir,
            json,
            watch,
            interval,
            until_drained,
        } => {
            let s = admin::call(&admin::socket_path(&data_dir), json!({"cmd": "status"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let f = |k: &str| match &s[k] {
                    Value::String(x) => x.clone(),
                    Value::Null => "-".into(),
                    v => v.to_string(),
                };
                println!("id:              {}", f("id"));
                println!("state:           {}", f("state"));
                println!("hub:             {}", f("hub"));
                if let Some(all) = s["hubs"].as_array().filter(|a| a.len() > 1) {
                    let all: Vec<&str> = all.iter().filter_map(Value::as_str).collect();
                    println!("hub replicas:    {}", all.join(", "));
                }
                println!(
                    "cert not after:  {} ({} s left)",
                    f("cert_not_after"),
                    f("cert_time_left_s")
                );
                println!("node CA until:   {}", f("node_ca_not_after"));
                println!("last contact:    {}", f("last_contact"));
                match s["survival_horizon_s"].as_u64() {
                    Some(h) => println!(
                        "survival:        {} (limit: {})",
                        humantime::format_duration(Duration::from_secs(h)),
                        f("survival_limit")
                    ),
                    None => println!("survival:        unbounded"),
                }
                let t = &s["time_trust"];
                println!(
                    "time:            {} ({}){}",
                    t["state"].as_str().unwrap_or("-"),
                    t["source"].as_str().unwrap_or("-"),
                    t["reason"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                println!("revocations:     version {}", f("revocation_version"));
                if s["last_error"].is_string() {
                    println!("last error:      {}", f("last_error"));
                }
                if s["issue_error"].is_string() {
                    println!("issue error:     {}", f("issue_error"));
                }
                if s["registration_error"].is_string() {
                    println!("registration:    {}", f("registration_error"));
                }
                for w in s["workloads"].as_array().into_iter().flatten() {
                    println!(
                        "workload:        {} {} until {}",
                        w["service_account"].as_str().unwrap_or("-"),
                        w["id"].as_str().unwrap_or("(not issued yet)"),
                        w["cert_not_after"].as_str().unwrap_or("-")
                    );
                }
            }
            if watch {
                if interval < Duration::from_millis(100) {
                    bail!("--interval {interval:?}: must be at least 100ms");
                }
                watch_backlog(&admin::socket_path(&data_dir), interval, until_drained).await?;
            }
        }
        Cmd::Vector {
            data_dir,
            service,
            json,
        } => {
            let r = admin::call(
                &admin::socket_path(&data_dir),
                json!({"cmd": "vector", "service": service}),
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
        Cmd::Probe {
            data_dir,
            workload,
            service,
            json,
        } => {
            let r = admin::call(
                &admin::socket_path(&data_dir),
                json!({"cmd": "probe", "workload": workload, "service": service}),
            )
            .await?;
            let all = r.as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &all {
                    if p["ok"] == true {
                        println!(
                            "{} at {}: ok in {} ms{} (peer time {}{})",
                            p["server"].as_str().unwrap_or("-"),
                            p["address"].as_str().unwrap_or("-"),
                            p["elapsed_ms"],
                            p["handshake_us"]
                                .as_u64()
                                .map(|h| format!(", new handshake {h} us"))
                                .unwrap_or_default(),
                            p["peer_time"].as_str().unwrap_or("-"),
                            if p["peer_time_trusted"] == true {
                                ""
                            } else {
                                ", degraded"
                            }
                        );
                    } else {
                        println!(
                            "{} at {}: FAILED: {}",
                            p["server"].as_str().unwrap_or("-"),
                            p["address"].as_str().unwrap_or("-"),
                            p["error"].as_str().unwrap_or("-")
                        );
                    }
                }
            }
            if !all.iter().any(|p| p["ok"] == true) {
                std::process::exit(1);
            }
        }
        Cmd::Evidence {
            cmd: EvidenceCmd::Tail { data_dir, n, json },
        } => {
            let r = admin::call(
                &admin::socket_path(&data_dir),
                json!({"cmd": "evidence_tail", "n": n}),
            )
            .await?;
            tidemesh_net::cli::print_records(&r, json);
        }
        Cmd::Evidence {
            cmd: EvidenceCmd::Stats { data_dir, json },
        } => {
            let r = admin::call(
                &admin::socket_path(&data_dir),
                json!({"cmd": "evidence_stats"}),
            )
            .await?;
            tidemesh_net::cli::print_object(&r, json);
        }
        Cmd::Evidence {
            cmd: EvidenceCmd::Verify { data_dir, json },
        } => {
            let sock = admin::socket_path(&data_dir);
            // the held range, for the progress line (on a terminal only)
            let upto = if std::io::stderr().is_terminal() {
                admin::call(&sock, json!({"cmd": "evidence_stats"}))
                    .await
                    .ok()
                    .and_then(|v| v["last_committed_seq"].as_u64())
            } else {
                None
            };
            let verify = progress::show_while(
                admin::call(&sock, json!({"cmd": "evidence_verify"})),
                Duration::from_millis(250),
                |elapsed| async move {
                    let what = match upto {
                        Some(n) => format!("records up to seq {n}"),
                        None => "evidence.db".to_owned(),
                    };
                    Some(progress::counted(
                        "verifying the evidence chain",
                        0,
                        None,
                        elapsed,
                        &what,
                    ))
                },
            );
            let r = match verify.await {
                Ok(r) => r,
                Err(admin::AdminError::Unreachable { .. }) => {
                    // Not running: open the file directly (no tail check,
                    // so a damaged file still opens and gets reported).
                    let dir = data_dir.clone();
                    progress::show_while(
                        tokio::task::spawn_blocking(move || {
                            tidemesh_spoke::verify_evidence_offline(&dir)
                        }),
                        Duration::from_millis(250),
                        |elapsed| async move {
                            Some(progress::counted(
                                "verifying the evidence chain",
                                0,
                                None,
                                elapsed,
                                "evidence.db (the spoke is stopped)",
                            ))
                        },
                    )
                    .await??
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            if r["ok"] != Value::Bool(true) {
                bail!(
                    "evidence chain broken: {}",
                    r["error"].as_str().unwrap_or("unknown")
                );
            }
            if !json {
                println!(
                    "evidence chain ok: {} records held, seq {}..{}",
                    r["records"], r["from_seq"], r["to_seq"]
                );
            }
        }
        Cmd::Drill {
            cmd:
                DrillCmd::Load {
                    data_dir,
                    rate,
                    duration,
                },
        } => {
            let sock = admin::socket_path(&data_dir);
            // where the buffer stood, for the progress line (terminal only)
            let base = if std::io::stderr().is_terminal() {
                admin::call(&sock, json!({"cmd": "evidence_stats"}))
                    .await
                    .ok()
                    .and_then(|v| v["last_committed_seq"].as_u64())
            } else {
                None
            };
            let total = duration.as_secs().max(1);
            let r = progress::show_while(
                admin::call(
                    &sock,
                    json!({"cmd": "drill_load", "rate": rate, "duration_ms": duration.as_millis() as u64}),
                ),
                Duration::from_millis(500),
                |elapsed| {
                    let sock = sock.clone();
                    async move {
                        let st = admin::call(&sock, json!({"cmd": "evidence_stats"}))
                            .await
                            .ok()?;
                        let committed = st["last_committed_seq"]
                            .as_u64()?
                            .saturating_sub(base.unwrap_or(0));
                        let pending = st["pending_records"].as_u64().unwrap_or(0);
                        Some(progress::counted(
                            "drill load",
                            elapsed.as_secs().min(total),
                            Some(total),
                            elapsed,
                            &format!("{committed} committed, {pending} pending sync"),
                        ))
                    }
                },
            )
            .await?;
            println!(
                "drill {}: appended {}, committed {}, refused {}",
                r["run"].as_str().unwrap_or(""),
                r["appended"],
                r["committed"],
                r["refused"]
            );
        }
        Cmd::Svid {
            cmd:
                SvidCmd::Export {
                    data_dir,
                    out,
                    workload,
                },
        } => {
            let id = tidemesh_spoke::CredStore::new(&data_dir).export(&out, workload.as_deref())?;
            println!("exported {id} to {}", out.display());
        }
    }
    Ok(())
}

/// `status --watch`: the evidence backlog and how fast the hub acknowledges
/// it, every `interval`; a redrawn line on a terminal, lines on stdout
/// otherwise. Returns on Ctrl-C, or once drained with `until_drained`.
async fn watch_backlog(
    sock: &std::path::Path,
    interval: Duration,
    until_drained: bool,
) -> anyhow::Result<()> {
    let mut line = progress::Line::stderr();
    let mut prev: Option<(std::time::Instant, u64)> = None;
    let stop = tidemesh_net::cli::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let st = admin::call(sock, json!({"cmd": "status"})).await?;
        let ev = admin::call(sock, json!({"cmd": "evidence_stats"})).await?;
        let pending = ev["pending_records"].as_u64().unwrap_or(0);
        let acked = ev["last_acked_seq"].as_u64().unwrap_or(0);
        let now = std::time::Instant::now();
        let rate = prev.map(|(t, a)| {
            acked.saturating_sub(a) as f64 / now.duration_since(t).as_secs_f64().max(1e-3)
        });
        prev = Some((now, acked));
        let text = progress::drain(
            st["state"].as_str().unwrap_or("-"),
            pending,
            ev["oldest_pending_age_s"].as_u64().unwrap_or(0),
            rate,
        );
        let done = until_drained && pending == 0;
        if line.enabled() && !done {
            line.draw(&text);
        } else {
            line.clear();
            println!("{text}");
        }
        if done {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut stop => {
                line.clear();
                return Ok(());
            }
        }
    }
}
