//! `tidemesh-fleet`: N spokes in one process against one hub. Flags and
//! output only; the fleet lives in [`tidemesh_sim::fleet`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tidemesh_sim::fleet::{self, FleetConfig, Report};

const EXAMPLES: &str = "\
Examples:
  # 100 spokes against a running hub, 30 s of steady state
  tidemesh-fleet run --hub 127.0.0.1:7443 --hub-data-dir /var/lib/tidemesh-hub --spokes 100

  # the reconnect drill: start a hub, connect 1,000 spokes, SIGKILL the hub,
  # buffer 1,000 records per spoke while it is down, restart it, measure
  tidemesh-fleet run --hub 127.0.0.1:7443 --hub-data-dir /tmp/fleet/hub \\
      --hub-bin target/release/tidemesh-hub --spokes 1000 --backlog 1000 \\
      --restart-hub --hub-down 10s --work-dir /tmp/fleet/spokes --json";

/// N in-process spokes against one real hub: connected counts, reconnect
/// times after a hub restart, evidence exactly once, UDP drops and hub RSS.
#[derive(Parser)]
#[command(name = "tidemesh-fleet", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll and run the fleet, then print what was measured.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The hub's QUIC address.
    #[arg(long, env = "TIDEMESH_FLEET_HUB")]
    hub: SocketAddr,
    /// The hub's data directory (its admin socket creates the join tokens).
    #[arg(long, env = "TIDEMESH_FLEET_HUB_DATA_DIR")]
    hub_data_dir: PathBuf,
    /// Spokes to run (1..=10000); spoke i binds 127.10.(i/250).(i%250+1).
    #[arg(long, env = "TIDEMESH_FLEET_SPOKES")]
    spokes: usize,
    /// Evidence records each spoke buffers: while the hub is down with
    /// --restart-hub, else once it is connected. Checked exactly once at
    /// the hub afterwards.
    #[arg(long, env = "TIDEMESH_FLEET_BACKLOG", default_value_t = 0)]
    backlog: u64,
    /// Steady state held once every spoke is connected.
    #[arg(long, env = "TIDEMESH_FLEET_DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Where the spokes' data directories (and hub.log) go; an enrolled
    /// spoke there is reused.
    #[arg(long, env = "TIDEMESH_FLEET_WORK_DIR", default_value = "fleet-work")]
    work_dir: PathBuf,
    /// Trust domain of the spoke IDs (and of `init` with --hub-bin).
    #[arg(
        long,
        env = "TIDEMESH_FLEET_TRUST_DOMAIN",
        default_value = "edge.example"
    )]
    trust_domain: String,
    /// Start the hub with this binary (`init` if the data dir is empty,
    /// then `serve --listen HUB`); its log goes to WORK_DIR/hub.log.
    #[arg(long, env = "TIDEMESH_FLEET_HUB_BIN")]
    hub_bin: Option<PathBuf>,
    /// One extra argument for `tidemesh-hub serve` (repeat the flag).
    #[arg(long = "hub-arg", allow_hyphen_values = true)]
    hub_args: Vec<String>,
    /// The hub's pid for RSS when the tool did not start it (default: the
    /// process holding the hub's UDP port, from /proc).
    #[arg(long, env = "TIDEMESH_FLEET_HUB_PID")]
    hub_pid: Option<u32>,
    /// SIGKILL the hub once all are connected and restart it (needs --hub-bin).
    #[arg(long, env = "TIDEMESH_FLEET_RESTART_HUB")]
    restart_hub: bool,
    /// How long the hub stays down at least with --restart-hub (it is
    /// restarted once this has passed and every spoke committed its backlog).
    #[arg(long, env = "TIDEMESH_FLEET_HUB_DOWN", default_value = "10s", value_parser = humantime::parse_duration)]
    hub_down: Duration,
    /// Bound on every spoke (re)connecting.
    #[arg(long, env = "TIDEMESH_FLEET_CONNECT_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Bound on the backlog reaching the hub.
    #[arg(long, env = "TIDEMESH_FLEET_DELIVER_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    deliver_timeout: Duration,
    /// Spokes enrolled at once.
    #[arg(long, env = "TIDEMESH_FLEET_ENROLL_CONCURRENCY", default_value_t = 8)]
    enroll_concurrency: usize,
    /// Skip reading every spoke's evidence back from the hub.
    #[arg(long)]
    no_verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn print_human(r: &Report) {
    let t = |t: &Option<fleet::Times>| match t {
        Some(t) => format!(
            "p50 {:.2} s, p99 {:.2} s, max {:.2} s ({} spokes)",
            t.p50_s, t.p99_s, t.max_s, t.count
        ),
        None => "none".into(),
    };
    println!(
        "spokes {} (enrolled now {}, in {:.1} s)",
        r.spokes, r.enrolled, r.enroll_s
    );
    println!(
        "first connect: {}; all connected: {}",
        t(&r.connect),
        r.all_connected_s
            .map(|s| format!("{s:.2} s"))
            .unwrap_or("no".into())
    );
    if let Some(x) = &r.restart {
        println!(
            "hub restart: down {:.1} s, ready {:.2} s after spawn; back {}/{}; all back {}; {}",
            x.down_s,
            x.hub_ready_s,
            x.back,
            r.spokes,
            x.all_back_s
                .map(|s| format!("{s:.2} s"))
                .unwrap_or("no".into()),
            t(&x.reconnect)
        );
        println!(
            "after the restart: {} falls (connected, then not); fewest connected once all were back: {:?}; connected at the end: {}",
            x.falls_after_restart, x.min_connected_after_all_back, r.connected_at_end
        );
        println!(
            "reconnect rate {} spokes/s (peak {} in one second); RcvbufErrors during the drill: {:?}",
            x.reconnect_rate_per_s.map(|v| v.to_string()).unwrap_or("-".into()),
            x.peak_reconnects_per_s,
            x.rcvbuf_errors_delta
        );
    }
    println!(
        "hub RSS KiB: before {:?}, peak sampled {:?}, after {:?}",
        r.hub_rss_before.map(|x| x.rss_kib),
        r.hub_rss_peak_sampled_kib,
        r.hub_rss_after.map(|x| (x.rss_kib, x.hwm_kib))
    );
    println!("udp: {:?}", r.udp);
    if let Some(e) = &r.exactly_once {
        println!(
            "backlog: {} acknowledged, delivered in {:?} s; exactly once: {} ({} of {} found, {} duplicates, {} missing)",
            r.delivered_records, r.delivered_s, e.ok, e.found, e.expected, e.duplicates, e.missing
        );
    }
}

fn main() -> ExitCode {
    let Cmd::Run(a) = Cli::parse().cmd;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = FleetConfig::new(a.hub, a.hub_data_dir, a.work_dir, a.spokes);
    cfg.backlog = a.backlog;
    cfg.duration = a.duration;
    cfg.trust_domain = a.trust_domain;
    cfg.hub_bin = a.hub_bin;
    cfg.hub_args = a.hub_args;
    cfg.hub_pid = a.hub_pid;
    cfg.restart_hub = a.restart_hub;
    cfg.hub_down = a.hub_down;
    cfg.connect_timeout = a.connect_timeout;
    cfg.deliver_timeout = a.deliver_timeout;
    cfg.enroll_concurrency = a.enroll_concurrency;
    cfg.verify = !a.no_verify;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemesh-fleet: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fleet::run(cfg, |line| eprintln!("{line}"))) {
        Ok(r) => {
            if a.json {
                match serde_json::to_string_pretty(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("tidemesh-fleet: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_human(&r);
            }
            let failed = r.restart.as_ref().is_some_and(|x| x.all_back_s.is_none())
                || r.all_connected_s.is_none()
                || r.exactly_once.as_ref().is_some_and(|e| !e.ok);
            if failed {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("tidemesh-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
