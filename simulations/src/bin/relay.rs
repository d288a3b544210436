//! `tidemesh-relay`: netem for UDP. Parses the command line, starts a
//! [`tidemesh_sim::Relay`] or talks to a running one through its control socket. All
//! impairment logic lives in the library; this file is flags, output and signals.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tidemesh_sim::control::{self, Request};
use tidemesh_sim::impairment::units;
use tidemesh_sim::{
    Direction, DirectionStats, Distribution, GilbertElliott, Impairment, LossModel, Percent, Rate,
    Relay, RelayConfig, Schedule, Stats,
};

const EXAMPLES: &str = "\
Examples:
  # 50ms ± 10ms each way, 1% loss, through 127.0.0.1:7000 to a hub on :7443
  tidemesh-relay --listen 127.0.0.1:7000 --upstream 127.0.0.1:7443 \\
      --delay 50ms --jitter 10ms --loss 1% --seed 42 --control /tmp/relay.sock

  # bursty loss and a 1 Mbit/s bottleneck on the uplink only
  tidemesh-relay --listen 127.0.0.1:0 --upstream 127.0.0.1:7443 --direction up \\
      --loss-gemodel 1%,10%,70%,0.1% --rate 1mbit

  # change a running relay
  tidemesh-relay ctl --control /tmp/relay.sock set --direction down --delay 200ms
  tidemesh-relay ctl --control /tmp/relay.sock blackout --direction up
  tidemesh-relay ctl --control /tmp/relay.sock heal
  tidemesh-relay ctl --control /tmp/relay.sock stats --json

Schedule file (--schedule), times from relay start, `#` comments:
  0s    delay 50ms loss 1%
  30s   blackout
  90s   heal
  100s  direction up blackout

Units: time ns|us|ms|s|m|h (50ms, 1.5s); percent needs `%` (0.1%);
rate bit|kbit|mbit|gbit = bits/s, bps|kbps|mbps|gbps = BYTES/s (10mbps = 80mbit);
size bytes, or b|kb|mb (1200, 10kb).

On start the relay prints `seed=N` on stderr and `listening=ADDR` on stdout.";

/// netem for UDP: a relay that impairs each direction between clients and an upstream.
///
/// Every client address gets its own upstream-facing socket (a flow), so many spokes
/// can share one relay. "up" is client -> upstream, "down" is upstream -> client.
/// Impairment flags apply to both directions unless --direction says otherwise.
#[derive(Parser)]
#[command(
    name = "tidemesh-relay",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Change or read a running relay through its control socket.
    Ctl(CtlArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// UDP address clients send to, e.g. 127.0.0.1:7000; port 0 picks a free port
    /// (the bound address is printed as `listening=ADDR`).
    #[arg(long, value_name = "ADDR", env = "TIDEMESH_RELAY_LISTEN", required = true, value_parser = parse_addr)]
    listen: Option<SocketAddr>,

    /// UDP address datagrams are forwarded to, e.g. 127.0.0.1:7443.
    #[arg(long, value_name = "ADDR", env = "TIDEMESH_RELAY_UPSTREAM", required = true, value_parser = parse_addr)]
    upstream: Option<SocketAddr>,

    /// Seed for every random decision (loss, jitter, ...). Without it a random seed is
    /// chosen; either way it is printed as `seed=N` and reported in stats.
    #[arg(long, value_name = "N", env = "TIDEMESH_RELAY_SEED")]
    seed: Option<u64>,

    /// Unix socket for runtime control (created with mode 0600, removed on exit);
    /// see `tidemesh-relay ctl --help`.
    #[arg(long, value_name = "PATH", env = "TIDEMESH_RELAY_CONTROL")]
    control: Option<PathBuf>,

    /// File of timed impairment changes, one per line: `TIME [direction up|down|both]
    /// heal | blackout | IMPAIRMENT...`, e.g. `30s blackout`. Checked at start; an invalid
    /// line stops the relay before it binds.
    #[arg(long, value_name = "FILE", env = "TIDEMESH_RELAY_SCHEDULE")]
    schedule: Option<PathBuf>,

    /// Which direction the impairment flags apply to; the other starts unimpaired.
    #[arg(long, value_name = "up|down|both", default_value_t = Direction::Both)]
    direction: Direction,

    /// Close a flow after this long without traffic either way, e.g. 60s.
    #[arg(long, value_name = "TIME", env = "TIDEMESH_RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_idle_timeout)]
    idle_timeout: Duration,

    /// At most this many flows (clients) at once; datagrams from further clients are
    /// dropped and counted as flow_limit.
    #[arg(long, value_name = "N", env = "TIDEMESH_RELAY_MAX_FLOWS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_flows: u32,

    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "TIDEMESH_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,

    #[command(flatten)]
    impairment: ImpairmentArgs,
}

/// The impairment flags, shared by the relay and `ctl set`.
#[derive(Args, Default)]
#[command(next_help_heading = "Impairments")]
struct ImpairmentArgs {
    /// Add this one-way delay to every datagram, e.g. 50ms, 1.5s, 250us.
    #[arg(long, value_name = "TIME", value_parser = units::parse_duration)]
    delay: Option<Duration>,

    /// Vary the delay by this much, e.g. 10ms: uniform in delay ± jitter, or the standard
    /// deviation for normal/pareto. Jittered datagrams may overtake each other.
    #[arg(long, value_name = "TIME", value_parser = units::parse_duration)]
    jitter: Option<Duration>,

    /// Jitter distribution: uniform (default), normal or pareto (heavy tail).
    #[arg(long, value_name = "uniform|normal|pareto")]
    distribution: Option<Distribution>,

    /// Drop this share of datagrams at random, e.g. 1% or 0.5%.
    #[arg(long, value_name = "PERCENT", conflicts_with = "loss_gemodel")]
    loss: Option<Percent>,

    /// Bursty Gilbert-Elliott loss, netem's `loss gemodel p r 1-h 1-k`: P[,R[,1-H[,1-K]]],
    /// e.g. 1%,10%,70%,0.1%. p: good->bad per datagram; r: bad->good (default 100%);
    /// 1-h: loss in bad (default 100%); 1-k: loss in good (default 0%). With the
    /// defaults, loss is p/(p+r) in bursts of 1/r datagrams on average.
    #[arg(long, value_name = "P,R,1-H,1-K")]
    loss_gemodel: Option<GilbertElliott>,

    /// Send this share of datagrams twice, e.g. 1%.
    #[arg(long, value_name = "PERCENT")]
    duplicate: Option<Percent>,

    /// Send this share of datagrams at once, skipping --delay, so they overtake the
    /// datagrams still waiting (netem's reorder), e.g. 5%. Needs --delay.
    #[arg(long, value_name = "PERCENT", requires = "delay")]
    reorder: Option<Percent>,

    /// Flip one random bit in this share of datagrams (still delivered), e.g. 0.1%.
    #[arg(long, value_name = "PERCENT")]
    corrupt: Option<Percent>,

    /// Token-bucket rate limit; datagrams queue for tokens (up to --limit). bit, kbit,
    /// mbit, gbit are bits/s; bps, kbps, mbps, gbps are BYTES/s. E.g. 1mbit, 100kbit,
    /// 10mbps (= 80mbit).
    #[arg(long, value_name = "RATE")]
    rate: Option<Rate>,

    /// Token-bucket depth for --rate: bytes that may pass back to back after an idle
    /// spell, e.g. 10kb. Default 0: every datagram is paced, as netem's rate.
    #[arg(long, value_name = "SIZE", requires = "rate", value_parser = units::parse_burst)]
    burst: Option<u32>,

    /// Drop datagrams larger than this many bytes, e.g. 1200.
    #[arg(long, value_name = "BYTES", value_parser = units::parse_mtu)]
    mtu: Option<u32>,

    /// At most this many datagrams wait in the delay/rate queue; more are dropped as
    /// queue_full. Default 1000.
    #[arg(long, value_name = "PACKETS", value_parser = units::parse_limit)]
    limit: Option<u32>,

    /// Drop everything (a partition), including datagrams already in flight.
    #[arg(long)]
    blackout: bool,
}

impl ImpairmentArgs {
    fn impairment(&self) -> anyhow::Result<Impairment> {
        let defaults = Impairment::none();
        let impairment = Impairment {
            delay: self.delay.unwrap_or(defaults.delay),
            jitter: self.jitter.unwrap_or(defaults.jitter),
            distribution: self.distribution.unwrap_or(defaults.distribution),
            loss: match (self.loss, self.loss_gemodel) {
                (Some(p), _) => Some(LossModel::Random(p)),
                (None, Some(ge)) => Some(LossModel::GilbertElliott(ge)),
                (None, None) => None,
            },
            duplicate: self.duplicate.unwrap_or(defaults.duplicate),
            reorder: self.reorder.unwrap_or(defaults.reorder),
            corrupt: self.corrupt.unwrap_or(defaults.corrupt),
            rate: self.rate,
            burst: self.burst.unwrap_or(defaults.burst),
            mtu: self.mtu,
            limit: self.limit.unwrap_or(defaults.limit),
            blackout: self.blackout,
        };
        impairment
            .validate()
            .with_context(|| format!("invalid impairment flags `{impairment}`"))?;
        Ok(impairment)
    }
}

#[derive(Args)]
struct CtlArgs {
    /// The relay's control socket (its --control).
    #[arg(
        long,
        value_name = "PATH",
        env = "TIDEMESH_RELAY_CONTROL",
        global = true
    )]
    control: Option<PathBuf>,

    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand)]
enum CtlOp {
    /// Replace the impairment of the chosen direction(s) with exactly the given flags:
    /// anything not given is cleared (`set` with no flags removes all impairment).
    Set {
        /// Which direction to change.
        #[arg(long, value_name = "up|down|both", default_value_t = Direction::Both)]
        direction: Direction,
        #[command(flatten)]
        impairment: ImpairmentArgs,
    },
    /// Drop everything in the chosen direction(s); other settings stay until `heal`.
    Blackout {
        /// Which direction to black out.
        #[arg(long, value_name = "up|down|both", default_value_t = Direction::Both)]
        direction: Direction,
    },
    /// Remove every impairment (blackout included) of the chosen direction(s).
    Heal {
        /// Which direction to heal.
        #[arg(long, value_name = "up|down|both", default_value_t = Direction::Both)]
        direction: Direction,
    },
    /// Print the seed, flows, current impairments and per-direction counters.
    Stats {
        /// Print the stats as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .map_err(|e| format!("{e}; expected HOST:PORT like 127.0.0.1:7443"))?
        .next()
        .ok_or_else(|| "resolves to no address".to_owned())
}

fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    match units::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be above zero".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Ctl(args)) => ctl(args),
        None => match config(&cli.run) {
            Ok(config) => run(config, cli.run.log_format),
            Err(error) => {
                // Invalid configuration: a usage error, like clap's, before any port binds.
                eprintln!("error: {error:#}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks everything before the runtime starts and before any port binds.
fn config(args: &RunArgs) -> anyhow::Result<RelayConfig> {
    let (Some(listen), Some(upstream)) = (args.listen, args.upstream) else {
        anyhow::bail!("--listen ADDR and --upstream ADDR are required");
    };
    let impairment = args.impairment.impairment()?;
    let schedule = match &args.schedule {
        Some(path) => Schedule::from_file(path)
            .with_context(|| format!("invalid --schedule {}", path.display()))?,
        None => Schedule::empty(),
    };
    let mut config = RelayConfig::new(listen, upstream)
        .seed(args.seed.unwrap_or_else(rand::random))
        .impair(args.direction, impairment);
    config.idle_timeout = args.idle_timeout;
    config.max_flows = args.max_flows as usize;
    config.control = args.control.clone();
    config.schedule = schedule;
    Ok(config)
}

fn run(config: RelayConfig, log_format: LogFormat) -> anyhow::Result<()> {
    if let Some(seed) = config.seed {
        eprintln!("seed={seed}");
    }
    init_tracing(log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let relay = Relay::start(config).await?;
        {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "listening={}", relay.local_addr())?;
            stdout.flush()?;
        }
        wait_for_signal().await?;
        let stats = relay.stats().await;
        relay.shutdown().await?;
        if let Ok(stats) = stats {
            eprint!("{}", render_stats(&stats));
        }
        Ok(())
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for ctrl-c")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let Some(path) = args.control else {
        anyhow::bail!(
            "ctl needs --control PATH (or TIDEMESH_RELAY_CONTROL): the relay's control socket"
        );
    };
    let (request, json) = match &args.op {
        CtlOp::Set {
            direction,
            impairment,
        } => (
            Request::Set {
                direction: *direction,
                impairment: impairment.impairment()?,
            },
            false,
        ),
        CtlOp::Blackout { direction } => (
            Request::Blackout {
                direction: *direction,
            },
            false,
        ),
        CtlOp::Heal { direction } => (
            Request::Heal {
                direction: *direction,
            },
            false,
        ),
        CtlOp::Stats { json } => (Request::Stats, *json),
    };
    let response = control::request(&path, &request)?;
    let mut stdout = std::io::stdout().lock();
    if let Some(stats) = &response.stats {
        if json {
            writeln!(stdout, "{}", serde_json::to_string_pretty(stats)?)?;
        } else {
            write!(stdout, "{}", render_stats(stats))?;
        }
    }
    if let Some(impairments) = &response.impairments {
        writeln!(stdout, "up: {}", impairments.up)?;
        writeln!(stdout, "down: {}", impairments.down)?;
    }
    stdout.flush()?;
    Ok(())
}

fn render_stats(stats: &Stats) -> String {
    let mut out = format!(
        "seed={} uptime={:.1}s listen={} upstream={}\nflows active={} created={} expired={} max={}\n",
        stats.seed,
        stats.uptime_ms as f64 / 1000.0,
        stats.listen,
        stats.upstream,
        stats.flows.active,
        stats.flows.created,
        stats.flows.expired,
        stats.flows.max,
    );
    for (name, direction) in [("up", &stats.up), ("down", &stats.down)] {
        out.push_str(&render_direction(name, direction));
    }
    out
}

fn render_direction(name: &str, d: &DirectionStats) -> String {
    let c = &d.counters;
    let dropped = &c.dropped;
    format!(
        "{name}: {imp}\n  received={} ({} B) forwarded={} ({} B) queued={}\n  \
         duplicated={} delayed={} reordered={} corrupted={}\n  \
         dropped: loss={} blackout={} mtu={} queue_full={} flow_limit={} send_error={}\n",
        c.received,
        c.received_bytes,
        c.forwarded,
        c.forwarded_bytes,
        d.queued,
        c.duplicated,
        c.delayed,
        c.reordered,
        c.corrupted,
        dropped.loss,
        dropped.blackout,
        dropped.mtu,
        dropped.queue_full,
        dropped.flow_limit,
        dropped.send_error,
        imp = d.impairment,
    )
}
