//! The fleet tool (`tidemesh-fleet run`): N spokes in one process against
//! one real hub process, and what a reconnect storm costs the hub.
//!
//! Who drives it: `src/bin/fleet.rs` (the CLI) and the fleet test in
//! `tests/tests/control_plane.rs`. What it does: creates one join token per
//! spoke through the hub's admin socket, enrolls each spoke (its own data
//! dir and evidence buffer under `--work-dir`), runs them in-process with
//! the spoke library, each on its own UDP socket bound to its own loopback
//! address (`127.10.x.y`, so per-address caps at the hub see N peers), and
//! measures: connected counts over time, the time each spoke took to come
//! back after the hub was SIGKILLed and restarted (`--restart-hub`), the
//! evidence backlog each spoke buffered while the hub was down and whether
//! the hub holds every record exactly once, UDP receive-buffer drops from
//! `/proc/net/udp` and `/proc/net/snmp`, and the hub's RSS from
//! `/proc/PID/status`.
//!
//! What it must not do: report a figure it did not read. Every number in
//! the [`Report`] is measured in this run; a figure that could not be read
//! (no `/proc`, hub not ours) is `null`, never a guess.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use tidemesh_identity::clock::SystemClock;
use tidemesh_net::QuicSettings;
use tidemesh_spoke::{Spoke, SpokeConfig};
use tokio::sync::Semaphore;

/// Most spokes one fleet runs (each gets a `127.10.x.y` address).
pub const MAX_SPOKES: usize = 10_000;
/// Most backlog records per spoke.
pub const MAX_BACKLOG: u64 = 100_000;

/// What `tidemesh-fleet run` does.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The hub's QUIC address.
    pub hub: SocketAddr,
    /// The hub's data directory (its admin socket is there).
    pub hub_data_dir: PathBuf,
    /// Spokes to run.
    pub spokes: usize,
    /// Evidence records each spoke buffers (while the hub is down with
    /// `restart_hub`, else right after it connected).
    pub backlog: u64,
    /// Steady state held once all spokes are connected (before the drill).
    pub duration: Duration,
    /// Where the spokes' data dirs and the hub's log go.
    pub work_dir: PathBuf,
    /// Trust domain of the spoke IDs (and of `init` when the tool starts the hub).
    pub trust_domain: String,
    /// Start the hub with this `tidemesh-hub` binary (`init` if the data
    /// dir is empty, then `serve`); needed for `restart_hub`.
    pub hub_bin: Option<PathBuf>,
    /// Extra arguments for `tidemesh-hub serve`.
    pub hub_args: Vec<String>,
    /// The hub's pid when the tool did not start it (else found from the
    /// process holding the hub's UDP port).
    pub hub_pid: Option<u32>,
    /// SIGKILL the hub once all spokes are connected and restart it.
    pub restart_hub: bool,
    /// How long the hub stays down at least (it is restarted once this
    /// has passed and the backlog is committed).
    pub hub_down: Duration,
    /// Bound on all spokes connecting (at start and after the restart).
    pub connect_timeout: Duration,
    /// Bound on the backlog reaching the hub.
    pub deliver_timeout: Duration,
    /// Spokes enrolled at once.
    pub enroll_concurrency: usize,
    /// Query every spoke's stored evidence at the hub afterwards.
    pub verify: bool,
}

impl FleetConfig {
    /// A fleet of `spokes` against `hub`, defaults elsewhere.
    pub fn new(hub: SocketAddr, hub_data_dir: PathBuf, work_dir: PathBuf, spokes: usize) -> Self {
        FleetConfig {
            hub,
            hub_data_dir,
            spokes,
            backlog: 0,
            duration: Duration::from_secs(5),
            work_dir,
            trust_domain: "edge.example".into(),
            hub_bin: None,
            hub_args: Vec::new(),
            hub_pid: None,
            restart_hub: false,
            hub_down: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(300),
            deliver_timeout: Duration::from_secs(1800),
            enroll_concurrency: 8,
            verify: true,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.spokes == 0 || self.spokes > MAX_SPOKES {
            bail!("--spokes {}: must be 1..={MAX_SPOKES}", self.spokes);
        }
        if self.backlog > MAX_BACKLOG {
            bail!("--backlog {}: must be at most {MAX_BACKLOG}", self.backlog);
        }
        if self.restart_hub && self.hub_bin.is_none() {
            bail!("--restart-hub needs --hub-bin: the tool restarts only a hub it started");
        }
        if self.enroll_concurrency == 0 {
            bail!("--enroll-concurrency must be at least 1");
        }
        Ok(())
    }
}

/// Percentiles of a set of durations, in seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Times {
    /// How many.
    pub count: usize,
    /// Median.
    pub p50_s: f64,
    /// 99th percentile (nearest rank).
    pub p99_s: f64,
    /// Largest.
    pub max_s: f64,
}

impl Times {
    /// Nearest-rank percentiles of `d`; `None` when empty.
    pub fn of(mut d: Vec<Duration>) -> Option<Times> {
        if d.is_empty() {
            return None;
        }
        d.sort();
        let rank = |p: f64| {
            let i = ((p * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1;
            d[i].as_secs_f64()
        };
        Some(Times {
            count: d.len(),
            p50_s: rank(0.50),
            p99_s: rank(0.99),
            max_s: rank(1.0),
        })
    }
}

/// UDP counters from `/proc`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct UdpCounters {
    /// Sum of the `drops` column of the sockets bound to the hub's port.
    pub hub_socket_drops: Option<u64>,
    /// Sum of the `drops` column of the fleet's sockets (127.10.0.0/16).
    pub fleet_socket_drops: Option<u64>,
    /// `Udp: RcvbufErrors` of `/proc/net/snmp` (whole network namespace).
    pub rcvbuf_errors: Option<u64>,
    /// `Udp: InErrors` of `/proc/net/snmp` (whole network namespace).
    pub in_errors: Option<u64>,
}

/// Memory of a process from `/proc/PID/status`, KiB.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Rss {
    /// `VmRSS`.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS of this process).
    pub hwm_kib: u64,
}

/// The restart drill's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    /// Seconds from the SIGKILL until every spoke reported disconnected.
    pub all_noticed_s: Option<f64>,
    /// How long the hub was down (kill to restart), s.
    pub down_s: f64,
    /// Seconds from the restart (process spawned) until its admin socket answered.
    pub hub_ready_s: f64,
    /// Per spoke, from the restart until it was connected again.
    pub reconnect: Option<Times>,
    /// Spokes back within `connect_timeout`.
    pub back: usize,
    /// Seconds from the restart until all were back (`null`: not all were).
    pub all_back_s: Option<f64>,
    /// Spokes per second over the whole return (`back / all_back_s`).
    pub reconnect_rate_per_s: Option<f64>,
    /// Most spokes that came back within one second.
    pub peak_reconnects_per_s: usize,
    /// Falls (a spoke seen connected, then not) from the restart until
    /// the end of the run: churn after a spoke came back.
    pub falls_after_restart: u64,
    /// Fewest spokes connected in the samples after all had come back
    /// (`null`: not all came back, or no sample after).
    pub min_connected_after_all_back: Option<usize>,
    /// UDP counters of the hub's socket just before the kill.
    pub udp_before_kill: UdpCounters,
    /// UDP counters once all were back and the backlog delivered (the
    /// restarted hub's socket: a new socket starts at 0 drops).
    pub udp_after: UdpCounters,
    /// `RcvbufErrors` added during the drill (namespace-wide).
    pub rcvbuf_errors_delta: Option<u64>,
}

/// The exactly-once check at the hub.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExactlyOnce {
    /// Spokes checked.
    pub spokes_checked: usize,
    /// Backlog records expected (spokes × backlog).
    pub expected: u64,
    /// Backlog records found at the hub, each counted once.
    pub found: u64,
    /// Backlog indices stored more than once (summed over spokes).
    pub duplicates: u64,
    /// Backlog indices missing (summed over spokes).
    pub missing: u64,
    /// Spokes whose stored sequence numbers were not contiguous.
    pub seq_breaks: usize,
    /// Spokes with a gap or chain break in the hub's evidence stats.
    pub chain_not_ok: usize,
    /// Batches the hub skipped as already held (ingest counter: resends after the crash).
    pub hub_duplicate_records: Option<u64>,
    /// Everything expected, once, in order.
    pub ok: bool,
}

/// `(seconds since start, spokes connected, hub VmRSS KiB, falls so far)`;
/// a fall is a spoke seen connected and then not (250 ms polling).
pub type Sample = (f64, usize, Option<u64>, u64);

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Spokes run.
    pub spokes: usize,
    /// Backlog per spoke.
    pub backlog: u64,
    /// Enrolled by this run (the rest were enrolled in `work_dir` before).
    pub enrolled: usize,
    /// Seconds enrolling took.
    pub enroll_s: f64,
    /// Per spoke, from its start until its first connection.
    pub connect: Option<Times>,
    /// Spokes connected at the end of the start phase.
    pub connected_at_start: usize,
    /// Spokes connected when the run ended.
    pub connected_at_end: usize,
    /// Seconds from start until all were connected (`null`: not all were).
    pub all_connected_s: Option<f64>,
    /// Seconds to append and commit the backlog on every spoke.
    pub backlog_commit_s: Option<f64>,
    /// Seconds from the backlog's commit (or the hub's restart) until every
    /// backlog record was acknowledged by the hub.
    pub delivered_s: Option<f64>,
    /// Backlog records acknowledged by the hub, per the spokes.
    pub delivered_records: u64,
    /// The hub SIGKILL / restart drill.
    pub restart: Option<RestartReport>,
    /// The hub's memory: steady state before the drill, peak sampled, at the end.
    pub hub_rss_before: Option<Rss>,
    /// Highest `VmRSS` sampled over the run, KiB.
    pub hub_rss_peak_sampled_kib: Option<u64>,
    /// At the end (`hwm_kib` is the restarted process's own peak).
    pub hub_rss_after: Option<Rss>,
    /// UDP counters at the end.
    pub udp: UdpCounters,
    /// Exactly-once check of the backlog at the hub.
    pub exactly_once: Option<ExactlyOnce>,
    /// `[seconds since start, spokes connected, hub VmRSS KiB, falls so
    /// far]`, every 500 ms.
    pub connected_over_time: Vec<Sample>,
    /// What happened when (seconds since start).
    pub events: Vec<(f64, String)>,
}

/// The spokes' addresses: spoke `i` binds `127.10.(i / 250).(i % 250 + 1)`.
pub fn spoke_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 10, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// A spoke ID of the fleet.
pub fn spoke_id(td: &str, i: usize) -> String {
    format!("spiffe://{td}/store/fleet{i:05}/node/n1")
}

/// The process holding a UDP socket on `port` (the hub), from `/proc`.
pub fn pid_of_udp_port(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for row in parse_udp_table(&text) {
            if row.port == port {
                inodes.push(row.inode);
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if targets.iter().any(|t| link.as_os_str() == t.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// One row of `/proc/net/udp` (IPv4 rows carry the address; IPv6 `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct UdpRow {
    /// Local IPv4 address (`None` for IPv6 rows).
    pub addr: Option<Ipv4Addr>,
    /// Local port.
    pub port: u16,
    /// Socket inode.
    pub inode: u64,
    /// Datagrams dropped (receive buffer full, checksum, ...).
    pub drops: u64,
}

/// Parses `/proc/net/udp` or `/proc/net/udp6`; malformed rows are skipped.
pub fn parse_udp_table(text: &str) -> Vec<UdpRow> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 13 {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        let addr = if addr.len() == 8 {
            u32::from_str_radix(addr, 16)
                .ok()
                .map(|a| Ipv4Addr::from(a.to_le_bytes()))
        } else {
            None
        };
        let (Ok(inode), Ok(drops)) = (f[9].parse::<u64>(), f[f.len() - 1].parse::<u64>()) else {
            continue;
        };
        out.push(UdpRow {
            addr,
            port,
            inode,
            drops,
        });
    }
    out
}

/// `Udp:` counters of `/proc/net/snmp` by name.
pub fn parse_snmp_udp(text: &str) -> BTreeMap<String, u64> {
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let mut out = BTreeMap::new();
    if let [names, values, ..] = rows.as_slice() {
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if let Ok(v) = v.parse() {
                out.insert(n.to_owned(), v);
            }
        }
    }
    out
}

/// Reads the UDP counters now.
pub fn udp_counters(hub_port: u16) -> UdpCounters {
    let mut hub = None;
    let mut fleet = None;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for row in parse_udp_table(&text) {
            if row.port == hub_port {
                *hub.get_or_insert(0) += row.drops;
            }
            if row.addr.is_some_and(|a| a.octets()[..2] == [127, 10]) {
                *fleet.get_or_insert(0) += row.drops;
            }
        }
    }
    let snmp = std::fs::read_to_string("/proc/net/snmp")
        .map(|t| parse_snmp_udp(&t))
        .unwrap_or_default();
    UdpCounters {
        hub_socket_drops: hub,
        fleet_socket_drops: fleet,
        rcvbuf_errors: snmp.get("RcvbufErrors").copied(),
        in_errors: snmp.get("InErrors").copied(),
    }
}

/// `VmRSS` and `VmHWM` of `pid`.
pub fn rss_of(pid: u32) -> Option<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss(&text)
}

/// `VmRSS` and `VmHWM` from a `/proc/PID/status` text.
pub fn parse_rss(text: &str) -> Option<Rss> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Rss {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// The hub process the tool started.
struct HubChild {
    child: tokio::process::Child,
}

impl HubChild {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

async fn admin(cfg: &FleetConfig, req: Value) -> anyhow::Result<Value> {
    let path = tidemesh_net::admin::socket_path(&cfg.hub_data_dir);
    tidemesh_net::admin::call(&path, req)
        .await
        .map_err(|e| anyhow!("hub admin socket {}: {e}", path.display()))
}

async fn start_hub(cfg: &FleetConfig) -> anyhow::Result<HubChild> {
    let bin = cfg.hub_bin.as_ref().context("no --hub-bin")?;
    if !cfg.hub_data_dir.join("hub.db").exists() {
        let o = tokio::process::Command::new(bin)
            .args(["init", "--data-dir"])
            .arg(&cfg.hub_data_dir)
            .args(["--trust-domain", &cfg.trust_domain])
            .output()
            .await
            .with_context(|| format!("running {} init", bin.display()))?;
        if !o.status.success() {
            bail!(
                "{} init failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    std::fs::create_dir_all(&cfg.work_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.work_dir.join("hub.log"))?;
    let child = tokio::process::Command::new(bin)
        .args(["serve", "--data-dir"])
        .arg(&cfg.hub_data_dir)
        .args(["--listen", &cfg.hub.to_string()])
        .args(&cfg.hub_args)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} serve", bin.display()))?;
    Ok(HubChild { child })
}

/// Waits until the hub's admin socket answers.
async fn wait_hub_ready(cfg: &FleetConfig, bound: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if admin(cfg, json!({"cmd": "config_history"})).await.is_ok() {
            return Ok(());
        }
        if t0.elapsed() > bound {
            bail!("the hub's admin socket did not answer within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shared state the sampler reads.
struct Fleet {
    spokes: Vec<Spoke>,
    started: Instant,
}

impl Fleet {
    fn connected(&self) -> Vec<bool> {
        self.spokes.iter().map(Spoke::hub_connected).collect()
    }
}

/// Waits until `pred(connected flags)` holds; returns the time each spoke
/// first satisfied `each` (polled every 50 ms), and whether all did.
async fn watch_each(
    fleet: &Fleet,
    since: Instant,
    bound: Duration,
    each: impl Fn(bool) -> bool,
) -> (Vec<Option<Duration>>, bool) {
    let mut first: Vec<Option<Duration>> = vec![None; fleet.spokes.len()];
    loop {
        let now = Instant::now();
        for (i, c) in fleet.connected().into_iter().enumerate() {
            if first[i].is_none() && each(c) {
                first[i] = Some(now - since);
            }
        }
        if first.iter().all(Option::is_some) {
            return (first, true);
        }
        if now - since > bound {
            return (first, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often one spoke's enrollment comes back after a busy hub.
const ENROLL_BUSY_RETRIES: u32 = 100;

async fn enroll_all(cfg: &FleetConfig) -> anyhow::Result<usize> {
    let sem = Arc::new(Semaphore::new(cfg.enroll_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut enrolled = 0;
    for i in 0..cfg.spokes {
        let dir = cfg.work_dir.join(format!("spoke-{i:05}"));
        if tidemesh_spoke::CredStore::new(&dir).is_enrolled() {
            continue;
        }
        let id = spoke_id(&cfg.trust_domain, i);
        let answer = admin(
            cfg,
            json!({"cmd": "token_create", "spoke": id, "ttl_s": 3600}),
        )
        .await?;
        let token = answer["token"]
            .as_str()
            .ok_or_else(|| anyhow!("token_create answered {answer}"))?
            .to_owned();
        let permit = sem.clone().acquire_owned().await?;
        let hub = cfg.hub;
        tasks.spawn(async move {
            let _permit = permit;
            // A hub over its new-session budget answers busy with a
            // retry-after (the token is not used then): come back after it,
            // with jitter, a bounded number of times.
            let mut attempt = 0u32;
            loop {
                let sock = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(spoke_addr(i)), 0))
                    .with_context(|| format!("binding {}", spoke_addr(i)))?;
                match tidemesh_spoke::enroll(
                    &dir,
                    hub,
                    &token,
                    false,
                    tidemesh_net::quic::wrap_socket(sock)?,
                    Arc::new(SystemClock),
                    QuicSettings::default(),
                )
                .await
                {
                    Ok(_) => break,
                    Err(tidemesh_spoke::SpokeError::Busy(after))
                        if attempt < ENROLL_BUSY_RETRIES =>
                    {
                        attempt += 1;
                        let jitter = Duration::from_millis(rand::random_range(
                            0..=after.as_millis().min(1000) as u64 / 4 + 50,
                        ));
                        tokio::time::sleep(after + jitter).await;
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context(format!("enrolling {id}"))),
                }
            }
            anyhow::Ok(())
        });
        enrolled += 1;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(enrolled)
}

fn spoke_config(cfg: &FleetConfig, i: usize) -> SpokeConfig {
    let mut c = SpokeConfig {
        hub: Some(cfg.hub),
        admin_socket: false,
        seed: Some(0x5eed_0000 + i as u64),
        ..SpokeConfig::default()
    };
    // A thousand buffers in one process: small page caches, small files.
    c.evidence.cache_bytes = 1 << 20;
    c.evidence.capacity_bytes = 256 << 20;
    c
}

/// Appends `n` drill records of run `run` to every spoke; returns the last
/// committed seq per spoke.
async fn fill_backlog(fleet: &Fleet, run: &str, n: u64) -> anyhow::Result<Vec<u64>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in fleet.spokes.iter().enumerate() {
        let s = s.clone();
        let run = run.to_owned();
        tasks.spawn(async move {
            let buf = s
                .evidence()
                .get()
                .ok_or_else(|| anyhow!("spoke {i}: evidence buffer not open"))?;
            let mut last = None;
            for k in 0..n {
                let now = tidemesh_evidence::UnixMillis(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                );
                let body = tidemesh_evidence::samples::drill_request(&run, k, now);
                let t = buf
                    .append(tidemesh_evidence::NewRecord::new(now, body))
                    .map_err(|e| anyhow!("spoke {i}: append {k}: {e}"))?;
                last = Some(t);
                if k % 256 == 255 {
                    tokio::task::yield_now().await;
                }
            }
            let seq = match last {
                Some(t) => t
                    .committed()
                    .await
                    .map_err(|e| anyhow!("spoke {i}: commit: {e}"))?
                    .get(),
                None => 0,
            };
            anyhow::Ok((i, seq))
        });
    }
    let mut out = vec![0; fleet.spokes.len()];
    while let Some(r) = tasks.join_next().await {
        let (i, seq) = r??;
        out[i] = seq;
    }
    Ok(out)
}

/// Checks that every backlog record of run `run` is stored at the hub once.
async fn check_exactly_once(
    cfg: &FleetConfig,
    fleet: &Fleet,
    run: &str,
) -> anyhow::Result<ExactlyOnce> {
    let mut r = ExactlyOnce {
        expected: cfg.backlog * cfg.spokes as u64,
        ..ExactlyOnce::default()
    };
    for s in &fleet.spokes {
        let id = s.id().to_string();
        let mut seen = vec![0u32; cfg.backlog as usize];
        let mut from = 0u64;
        let mut next_seq: Option<u64> = None;
        let mut contiguous = true;
        loop {
            let page = admin(
                cfg,
                json!({"cmd": "evidence_query", "spoke": id, "from_seq": from, "limit": 5000}),
            )
            .await?;
            let recs = page
                .as_array()
                .ok_or_else(|| anyhow!("evidence_query answered {page}"))?;
            if recs.is_empty() {
                break;
            }
            for rec in recs {
                let seq = rec["seq"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("record without seq: {rec}"))?;
                if next_seq.is_some_and(|n| n != seq) {
                    contiguous = false;
                }
                let last = rec["body"]["shed"]["range"]["last"].as_u64().unwrap_or(seq);
                next_seq = Some(last + 1);
                from = last + 1;
                let d = &rec["body"]["request"]["drill"];
                if d["run"] == run {
                    if let Some(slot) = d["index"]
                        .as_u64()
                        .and_then(|k| seen.get_mut(usize::try_from(k).ok()?))
                    {
                        *slot += 1;
                    }
                }
            }
        }
        let stats = admin(cfg, json!({"cmd": "evidence_stats", "spoke": id})).await?;
        if stats["chain_ok"] != true || stats["gaps"].as_u64() != Some(0) {
            r.chain_not_ok += 1;
        }
        if !contiguous {
            r.seq_breaks += 1;
        }
        for c in seen {
            match c {
                0 => r.missing += 1,
                1 => r.found += 1,
                n => {
                    r.found += 1;
                    r.duplicates += u64::from(n - 1);
                }
            }
        }
        r.spokes_checked += 1;
    }
    let stats = admin(cfg, json!({"cmd": "stats"})).await?;
    r.hub_duplicate_records = stats["ingest"]["duplicates"].as_u64();
    r.ok = r.found == r.expected
        && r.duplicates == 0
        && r.missing == 0
        && r.seq_breaks == 0
        && r.chain_not_ok == 0;
    Ok(r)
}

/// Waits until the hub acknowledged every spoke's seq up to `last[i]`;
/// returns the records acknowledged and whether all were.
async fn wait_delivered(fleet: &Fleet, last: &[u64], backlog: u64, bound: Duration) -> (u64, bool) {
    let t0 = Instant::now();
    loop {
        let mut done = 0usize;
        for (s, &l) in fleet.spokes.iter().zip(last) {
            if s.sync_stats().hub_next_seq > l {
                done += 1;
            }
        }
        if done == fleet.spokes.len() {
            return (backlog * done as u64, true);
        }
        if t0.elapsed() > bound {
            return (backlog * done as u64, false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Runs the fleet; `progress` gets one line per phase.
pub async fn run(cfg: FleetConfig, progress: impl Fn(&str)) -> anyhow::Result<Report> {
    cfg.check()?;
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating {}", cfg.work_dir.display()))?;
    let t_start = Instant::now();
    let mut events: Vec<(f64, String)> = Vec::new();
    let mut event = |what: String, progress: &dyn Fn(&str)| {
        let at = secs(t_start.elapsed());
        progress(&format!("[{at:>8.2}s] {what}"));
        events.push((at, what));
    };

    let mut hub = None;
    if cfg.hub_bin.is_some() {
        hub = Some(start_hub(&cfg).await?);
        wait_hub_ready(&cfg, Duration::from_secs(60)).await?;
        event("hub started".into(), &progress);
    }
    let hub_pid = |hub: &Option<HubChild>| {
        hub.as_ref()
            .and_then(HubChild::pid)
            .or(cfg.hub_pid)
            .or_else(|| pid_of_udp_port(cfg.hub.port()))
    };

    let t_enroll = Instant::now();
    let enrolled = enroll_all(&cfg).await?;
    let enroll_s = secs(t_enroll.elapsed());
    event(
        format!("{enrolled} spokes enrolled in {enroll_s} s"),
        &progress,
    );

    let mut spokes = Vec::with_capacity(cfg.spokes);
    for i in 0..cfg.spokes {
        let dir = cfg.work_dir.join(format!("spoke-{i:05}"));
        spokes.push(
            Spoke::open(&dir, spoke_config(&cfg, i), Arc::new(SystemClock))
                .with_context(|| format!("opening {}", dir.display()))?,
        );
    }
    let fleet = Arc::new(Fleet {
        spokes,
        started: Instant::now(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut running = tokio::task::JoinSet::new();
    for (i, s) in fleet.spokes.iter().enumerate() {
        let sock = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(spoke_addr(i)), 0))
            .with_context(|| format!("binding {}", spoke_addr(i)))?;
        let sock = tidemesh_net::quic::wrap_socket(sock)?;
        let s = s.clone();
        let mut stop = stop_rx.clone();
        running.spawn(async move {
            let r = s
                .run(sock, async move {
                    let _ = stop.wait_for(|v| *v).await;
                })
                .await;
            (i, r)
        });
    }
    event(format!("{} spokes started", cfg.spokes), &progress);

    // The sampler: every 250 ms it counts connected spokes and falls
    // (connected -> not); every 500 ms it keeps a sample with the hub's RSS.
    // A spoke notices a lost hub only after its idle timeout and redials
    // after at least 200 ms, so a fall lasts longer than the tick.
    let samples: Arc<std::sync::Mutex<Vec<Sample>>> = Arc::default();
    let pid_cell: Arc<std::sync::Mutex<Option<u32>>> =
        Arc::new(std::sync::Mutex::new(hub_pid(&hub)));
    let falls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (fleet, samples, pid_cell, falls) = (
            fleet.clone(),
            samples.clone(),
            pid_cell.clone(),
            falls.clone(),
        );
        tokio::spawn(async move {
            let mut prev = vec![false; fleet.spokes.len()];
            let mut tick = 0u64;
            loop {
                let now = fleet.connected();
                let fell = prev.iter().zip(&now).filter(|(p, n)| **p && !**n).count();
                falls.fetch_add(fell as u64, std::sync::atomic::Ordering::Relaxed);
                let n = now.iter().filter(|c| **c).count();
                prev = now;
                if tick.is_multiple_of(2) {
                    let pid = pid_cell.lock().map(|p| *p).unwrap_or(None);
                    let rss = pid.and_then(rss_of).map(|r| r.rss_kib);
                    let total = falls.load(std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut s) = samples.lock() {
                        // bounded: 100,000 samples is 14 h at 500 ms
                        if s.len() < 100_000 {
                            s.push((secs(t_start.elapsed()), n, rss, total));
                        }
                    }
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    let (first, all) = watch_each(&fleet, fleet.started, cfg.connect_timeout, |c| c).await;
    let connect = Times::of(first.iter().flatten().copied().collect());
    let connected_at_start = first.iter().filter(|f| f.is_some()).count();
    let all_connected_s = all.then(|| secs(fleet.started.elapsed()));
    event(
        format!(
            "{connected_at_start}/{} connected{}",
            cfg.spokes,
            if all { "" } else { " (bound reached)" }
        ),
        &progress,
    );

    let run_tag = format!(
        "fleet-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let mut backlog_last = None;
    let mut backlog_commit_s = None;
    if cfg.backlog > 0 && !cfg.restart_hub {
        let t = Instant::now();
        backlog_last = Some(fill_backlog(&fleet, &run_tag, cfg.backlog).await?);
        backlog_commit_s = Some(secs(t.elapsed()));
        event(
            format!("backlog of {} records per spoke committed", cfg.backlog),
            &progress,
        );
    }

    tokio::time::sleep(cfg.duration).await;
    let hub_rss_before = hub_pid(&hub).and_then(rss_of);
    let mut t_deliver_from = Instant::now();

    let mut restart = None;
    let mut falls_at_restart = 0;
    let mut all_back_at: Option<f64> = None;
    if cfg.restart_hub {
        let Some(h) = hub.as_mut() else {
            bail!("--restart-hub needs a hub this tool started");
        };
        let udp_before_kill = udp_counters(cfg.hub.port());
        h.child.start_kill().context("SIGKILL to the hub")?;
        let _ = h.child.wait().await;
        let t_kill = Instant::now();
        event("hub SIGKILLed".into(), &progress);
        if let Ok(mut p) = pid_cell.lock() {
            *p = None;
        }
        let noticed = {
            let t = Instant::now();
            let (_, all) = watch_each(&fleet, t, Duration::from_secs(60), |c| !c).await;
            all.then(|| secs(t_kill.elapsed()))
        };
        event(
            format!("spokes noticed: all disconnected = {}", noticed.is_some()),
            &progress,
        );
        if cfg.backlog > 0 {
            let t = Instant::now();
            backlog_last = Some(fill_backlog(&fleet, &run_tag, cfg.backlog).await?);
            backlog_commit_s = Some(secs(t.elapsed()));
            event(
                format!(
                    "backlog of {} records per spoke committed while the hub is down",
                    cfg.backlog
                ),
                &progress,
            );
        }
        if let Some(rest) = cfg.hub_down.checked_sub(t_kill.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        let down_s = secs(t_kill.elapsed());
        let new = start_hub(&cfg).await?;
        let t_restart = Instant::now();
        let falls_before_restart = falls.load(std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut p) = pid_cell.lock() {
            *p = new.pid();
        }
        *h = new;
        event("hub restarted".into(), &progress);
        wait_hub_ready(&cfg, Duration::from_secs(120)).await?;
        let hub_ready_s = secs(t_restart.elapsed());
        let (back, all) = watch_each(&fleet, t_restart, cfg.connect_timeout, |c| c).await;
        let times: Vec<Duration> = back.iter().flatten().copied().collect();
        let mut per_s: BTreeMap<u64, usize> = BTreeMap::new();
        for t in &times {
            *per_s.entry(t.as_secs()).or_default() += 1;
        }
        let all_back = all.then(|| times.iter().max().copied().unwrap_or_default());
        falls_at_restart = falls_before_restart;
        all_back_at = all_back.map(|d| secs((t_restart + d).duration_since(t_start)));
        event(
            format!(
                "{}/{} back after the restart{}",
                times.len(),
                cfg.spokes,
                all_back
                    .map(|d| format!(" in {:.2} s", d.as_secs_f64()))
                    .unwrap_or_default()
            ),
            &progress,
        );
        t_deliver_from = t_restart;
        restart = Some(RestartReport {
            all_noticed_s: noticed,
            down_s,
            hub_ready_s,
            back: times.len(),
            all_back_s: all_back.map(secs),
            reconnect_rate_per_s: all_back
                .filter(|d| !d.is_zero())
                .map(|d| (times.len() as f64 / d.as_secs_f64() * 10.0).round() / 10.0),
            peak_reconnects_per_s: per_s.values().copied().max().unwrap_or(0),
            falls_after_restart: 0,
            min_connected_after_all_back: None,
            reconnect: Times::of(times),
            udp_before_kill,
            udp_after: UdpCounters::default(),
            rcvbuf_errors_delta: None,
        });
    }

    let mut delivered_s = None;
    let mut delivered_records = 0;
    let mut exactly_once = None;
    if let Some(last) = &backlog_last {
        let (n, all) = wait_delivered(&fleet, last, cfg.backlog, cfg.deliver_timeout).await;
        delivered_records = n;
        if all {
            delivered_s = Some(secs(t_deliver_from.elapsed()));
        }
        event(
            format!(
                "{n} of {} backlog records acknowledged by the hub",
                cfg.backlog * cfg.spokes as u64
            ),
            &progress,
        );
        if cfg.verify {
            let r = check_exactly_once(&cfg, &fleet, &run_tag).await?;
            event(
                format!(
                    "exactly-once check: {} found of {}, {} duplicates, {} missing",
                    r.found, r.expected, r.duplicates, r.missing
                ),
                &progress,
            );
            exactly_once = Some(r);
        }
    }
    let udp = udp_counters(cfg.hub.port());
    if let Some(r) = restart.as_mut() {
        r.udp_after = udp.clone();
        r.rcvbuf_errors_delta = match (udp.rcvbuf_errors, r.udp_before_kill.rcvbuf_errors) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b)),
            _ => None,
        };
    }
    let hub_rss_after = hub_pid(&hub).and_then(rss_of);
    let connected_at_end = fleet.connected().into_iter().filter(|c| *c).count();

    sampler.abort();
    let _ = stop_tx.send(true);
    while let Some(r) = running.join_next().await {
        if let Ok((i, Err(e))) = r {
            progress(&format!("spoke {i} ended with an error: {e}"));
        }
    }
    if let Some(mut h) = hub {
        if let Some(pid) = h.pid() {
            // A clean stop, so the next run reopens its files quickly.
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), h.child.wait())
                .await
                .is_err()
            {
                let _ = h.child.start_kill();
            }
        }
    }
    let connected_over_time = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let hub_rss_peak_sampled_kib = connected_over_time.iter().filter_map(|s| s.2).max();
    if let Some(r) = restart.as_mut() {
        r.falls_after_restart = falls
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(falls_at_restart);
        r.min_connected_after_all_back = all_back_at.and_then(|at| {
            connected_over_time
                .iter()
                .filter(|s| s.0 >= at)
                .map(|s| s.1)
                .min()
        });
    }
    Ok(Report {
        spokes: cfg.spokes,
        backlog: cfg.backlog,
        enrolled,
        enroll_s,
        connect,
        connected_at_start,
        connected_at_end,
        all_connected_s,
        backlog_commit_s,
        delivered_s,
        delivered_records,
        restart,
        hub_rss_before,
        hub_rss_peak_sampled_kib,
        hub_rss_after,
        udp,
        exactly_once,
        connected_over_time,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let t = Times::of(d).expect("non-empty");
        assert_eq!(t.count, 100);
        assert!((t.p50_s - 0.050).abs() < 1e-9, "{t:?}");
        assert!((t.p99_s - 0.099).abs() < 1e-9, "{t:?}");
        assert!((t.max_s - 0.100).abs() < 1e-9, "{t:?}");
        assert_eq!(Times::of(Vec::new()), None);
    }

    #[test]
    fn proc_net_udp_rows_parse() {
        let text = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
          1: 0100007F:1D13 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 41234 2 0000000000000000 7\n\
          2: 05000A7F:A001 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 41235 2 0000000000000000 0\n\
          garbage\n";
        let rows = parse_udp_table(text);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].addr, Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(rows[0].port, 7443);
        assert_eq!(rows[0].inode, 41234);
        assert_eq!(rows[0].drops, 7);
        assert_eq!(rows[1].addr, Some(Ipv4Addr::new(127, 10, 0, 5)));
    }

    #[test]
    fn snmp_and_status_parse() {
        let snmp = "Ip: Forwarding\nIp: 1\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 10 2 3 9 4 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let m = parse_snmp_udp(snmp);
        assert_eq!(m.get("RcvbufErrors"), Some(&4));
        assert_eq!(m.get("InErrors"), Some(&3));
        let status = "Name:\ttidemesh-hub\nVmHWM:\t   52000 kB\nVmRSS:\t   41000 kB\n";
        assert_eq!(
            parse_rss(status),
            Some(Rss {
                rss_kib: 41000,
                hwm_kib: 52000
            })
        );
        assert_eq!(parse_rss("Name: x\n"), None);
    }

    #[test]
    fn spoke_addresses_are_distinct_loopback_addresses() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..MAX_SPOKES {
            let a = spoke_addr(i);
            assert!(a.is_loopback());
            assert!(seen.insert(a), "{a} twice");
        }
    }
}
