//! `tidemesh-demo`: the product's story in about two minutes, with the
//! real binaries on loopback.
//!
//! A hub, two spokes of store sf01 that reach it through one
//! `tidemesh-relay`, and small store apps: pos (on spoke A) calls inventory
//! (on spoke B, same site) and payments.cloud (a ServiceEntry behind the hub
//! gateway) in a steady loop. The relay then blacks the hub out for longer
//! than the workload SVID lifetime, and heals. Every second one console line
//! shows the mode, the calls per path, the evidence backlog and the survival
//! horizon; at the end a summary (same-site served, cloud failed fast,
//! evidence exactly once) and an HTML report with an SVG timeline.
//!
//! Who drives it: `tidemesh-demo run` (and `deploy/demo.sh`). What it must
//! not do: leave processes behind (every child is stopped on drop) or
//! claim what it did not measure (every summary figure comes from the
//! calls made and the binaries' own `status` / `evidence` output).

pub mod app;
pub mod report;

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use report::{Call, EvidenceCheck, Phase, Second, Summary};

/// The trust domain of the demo.
pub const TD: &str = "demo.tidemesh.example";

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Where tidemesh-hub, tidemesh-spoke and tidemesh-relay are.
    pub bin_dir: PathBuf,
    /// This binary (for `app`).
    pub self_exe: PathBuf,
    /// Data directories and logs; a new directory under the system temp
    /// directory when `None` (removed at the end unless `keep`).
    pub work_dir: Option<PathBuf>,
    /// Where the HTML report goes.
    pub report: PathBuf,
    /// Where the summary JSON goes.
    pub summary: PathBuf,
    /// The CI profile: a shorter outage, still longer than the SVID TTL.
    pub short: bool,
    /// Leave everything running until Ctrl-C once the report is written.
    pub keep: bool,
}

/// The phases' lengths.
#[derive(Debug, Clone, Copy)]
struct Timings {
    ttl: Duration,
    before: Duration,
    outage: Duration,
    /// Most time after the heal waiting for Target and an empty backlog.
    after_max: Duration,
    /// Time after the heal shown even when all is settled.
    after_min: Duration,
}

impl Timings {
    fn of(short: bool) -> Timings {
        if short {
            Timings {
                ttl: Duration::from_secs(8),
                before: Duration::from_secs(5),
                outage: Duration::from_secs(14),
                after_max: Duration::from_secs(30),
                after_min: Duration::from_secs(4),
            }
        } else {
            Timings {
                ttl: Duration::from_secs(20),
                before: Duration::from_secs(15),
                outage: Duration::from_secs(50),
                after_max: Duration::from_secs(60),
                after_min: Duration::from_secs(10),
            }
        }
    }
}

/// The children alive now, for the signal watcher: a SIGINT or SIGTERM
/// before `--keep`'s wait stops them and ends the demo (the process would
/// otherwise die without running `Procs`' drop and leave them running).
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Set once a signal has stopped the children: a child started after that
/// is stopped at once.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Set while `--keep` waits: a signal then only ends the wait.
static KEEPING: AtomicBool = AtomicBool::new(false);
/// A signal arrived while `--keep` waited.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

fn term(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Starts the thread that handles SIGINT and SIGTERM for the whole run (the
/// handlers are in place when this returns).
fn watch_signals(work: &Path) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let (mut int, mut trm) = {
        let _g = rt.enter();
        (
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
        )
    };
    let work = work.to_path_buf();
    std::thread::spawn(move || loop {
        let name = rt.block_on(async {
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = trm.recv() => "SIGTERM",
            }
        });
        if KEEPING.load(Ordering::SeqCst) {
            SIGNALLED.store(true, Ordering::SeqCst);
            continue;
        }
        let pids = {
            let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            STOPPING.store(true, Ordering::SeqCst);
            live.clone()
        };
        eprintln!(
            "\n{name}: stopping the hub, spokes, relay and apps ({} processes); logs and data kept in {}",
            pids.len(),
            work.display()
        );
        for &p in &pids {
            term(p);
        }
        // they are our children: reap them, SIGKILL what is left after 5 s
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = |p: u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        };
        while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &p in pids.iter().filter(|&&p| alive(p)) {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::process::exit(if name == "SIGINT" { 130 } else { 143 });
    });
    Ok(())
}

/// Every child process, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Default)]
struct Procs {
    children: Vec<(String, Child)>,
}

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> Result<()> {
        let log =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name} ({cmd:?})"))?;
        register(child.id());
        self.children.push((name.into(), child));
        Ok(())
    }

    /// Starts a child that prints `listening=ADDR` first; its address.
    fn spawn_listening(&mut self, name: &str, cmd: &mut Command, log: &Path) -> Result<SocketAddr> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start {name} ({cmd:?})"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        register(child.id());
        self.children.push((name.into(), child));
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .with_context(|| format!("read {name}'s listening line"))?;
        line.trim()
            .strip_prefix("listening=")
            .and_then(|a| a.parse().ok())
            .with_context(|| {
                format!(
                    "{name} did not start (first line {line:?}); its log {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
    }

    fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }
}

/// Notes a child for the signal watcher (stopping it at once when a signal
/// already stopped the others).
fn register(pid: u32) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if STOPPING.load(Ordering::SeqCst) {
        term(pid);
    }
    live.push(pid);
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &self.children {
            term(c.id());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|p| !self.children.iter().any(|(_, c)| c.id() == *p));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_cmd(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))
}

fn free_tcp() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// Polls `f` every 100 ms until `Some` or `timeout`.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mesh config the hub applies: the store, a quick mode matrix, the
/// cloud payments service, who may call what, payments' time budget.
fn mesh_yaml(payments: SocketAddr) -> String {
    format!(
        r#"apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {{name: sf01}}
spec: {{region: us-west-2, zone: us-west-2a}}
---
apiVersion: tidemesh.io/v1alpha1
kind: ModeMatrix
metadata: {{name: default}}
spec:
  reconnection: {{healthChecks: 2, window: 4s}}
  recovery:
    ramp: {{startPercent: 25, factor: 2, step: 1s}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: payments, namespace: cloud}}
spec:
  hosts: [payments.cloud]
  location: MESH_EXTERNAL
  ports:
  - {{number: {port}, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - address: {ip}
    labels: {{app: payments}}
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: payments, namespace: cloud}}
spec:
  host: payments.cloud
  timeout: 1s
  retries: {{attempts: 0}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: inventory-callers, namespace: store}}
spec:
  selector:
    matchLabels: {{app: inventory}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/pos"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: payments-callers, namespace: cloud}}
spec:
  selector:
    matchLabels: {{app: payments}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/pos"]
"#,
        port = payments.port(),
        ip = payments.ip(),
    )
}

/// A running spoke.
struct Spoke {
    name: &'static str,
    id: String,
    dir: PathBuf,
    metrics: SocketAddr,
}

/// The binaries and the hub's data directory.
struct Tools {
    hub: PathBuf,
    spoke: PathBuf,
    relay: PathBuf,
    hub_dir: PathBuf,
}

impl Tools {
    /// An admin subcommand of the hub (`evidence stats ...`, `apply ...`).
    fn hub_cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.hub);
        let sub = matches!(args.first(), Some(&"token" | &"evidence" | &"config"));
        let split = if sub { 2 } else { 1 };
        cmd.args(&args[..split.min(args.len())])
            .arg("--data-dir")
            .arg(&self.hub_dir)
            .args(&args[split.min(args.len())..]);
        run_cmd(&mut cmd)
    }

    fn hub_json(&self, args: &[&str]) -> Result<Value> {
        let o = self.hub_cli(args)?;
        if !o.status.success() {
            bail!("tidemesh-hub {}: {}", args.join(" "), text(&o));
        }
        serde_json::from_slice(&o.stdout)
            .with_context(|| format!("tidemesh-hub {}: not JSON", args.join(" ")))
    }

    /// `tidemesh-spoke <args> --data-dir DIR --json`, if it answers.
    fn spoke_json(&self, s: &Spoke, args: &[&str]) -> Option<Value> {
        let o = run_cmd(
            Command::new(&self.spoke)
                .args(args)
                .arg("--data-dir")
                .arg(&s.dir)
                .arg("--json"),
        )
        .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    fn relay_ctl(&self, control: &Path, what: &str) -> Result<()> {
        let o = run_cmd(
            Command::new(&self.relay)
                .args(["ctl", "--control"])
                .arg(control)
                .arg(what),
        )?;
        if !o.status.success() {
            bail!("tidemesh-relay ctl {what}: {}", text(&o));
        }
        Ok(())
    }
}

/// Seconds as `29d 23h`, `5h 02m`, `59s`.
fn human(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The request loop: one thread per path, a call every `period`, each
/// outcome pushed to `calls`.
struct Loop {
    stop: Arc<AtomicBool>,
    phase: Arc<Mutex<Phase>>,
    calls: Arc<Mutex<Vec<Call>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loop {
    fn start(outbound: SocketAddr, t0: Instant, period: Duration) -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new(Phase::Before));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for path in [report::Path::SameSite, report::Path::Cloud] {
            let (stop, phase, calls) = (stop.clone(), phase.clone(), calls.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let at = t0.elapsed();
                    let ph = *phase.lock().unwrap_or_else(|e| e.into_inner());
                    let out = match path {
                        report::Path::SameSite => app::call(
                            outbound,
                            "GET",
                            "inventory.store",
                            &format!("/stock/sku-{}", n % 100),
                            Duration::from_secs(10),
                        ),
                        report::Path::Cloud => app::call(
                            outbound,
                            "POST",
                            "payments.cloud",
                            "/charge",
                            Duration::from_secs(10),
                        ),
                    };
                    calls.lock().unwrap_or_else(|e| e.into_inner()).push(Call {
                        at_ms: at.as_millis() as u64,
                        path,
                        phase: ph,
                        status: out.status,
                        latency_ms: out.latency.as_millis() as u64,
                        reason: out.reason,
                    });
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            }));
        }
        Loop {
            stop,
            phase,
            calls,
            threads,
        }
    }

    fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn finish(self) -> Vec<Call> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What one sample of both spokes read.
#[derive(Default)]
struct Sample {
    mode_a: String,
    mode_b: String,
    state_a: String,
    backlog: u64,
    committed: u64,
    acked: u64,
    horizon_s: Option<u64>,
    svid_not_after: String,
    svid_issuer: String,
    svid_left_s: Option<i64>,
}

fn sample(tools: &Tools, a: &Spoke, b: &Spoke) -> Sample {
    let mut s = Sample::default();
    let st_a = tools.spoke_json(a, &["status"]);
    let st_b = tools.spoke_json(b, &["status"]);
    let str_of = |v: &Option<Value>, k: &str| {
        v.as_ref()
            .and_then(|v| v[k].as_str())
            .unwrap_or("down")
            .to_owned()
    };
    s.mode_a = str_of(&st_a, "mode");
    s.mode_b = str_of(&st_b, "mode");
    s.state_a = str_of(&st_a, "state");
    if let Some(st) = &st_a {
        s.horizon_s = st["survival_horizon_s"].as_u64();
        if let Some(w) = st["workloads"].as_array().and_then(|w| w.first()) {
            s.svid_not_after = w["cert_not_after"].as_str().unwrap_or("").to_owned();
            s.svid_issuer = w["issued_by"].as_str().unwrap_or("hub").to_owned();
            s.svid_left_s = humantime::parse_rfc3339(&s.svid_not_after).ok().map(|t| {
                match t.duration_since(SystemTime::now()) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                }
            });
        }
    }
    for sp in [a, b] {
        if let Some(ev) = tools.spoke_json(sp, &["evidence", "stats"]) {
            s.backlog += ev["pending_records"].as_u64().unwrap_or(0);
            s.committed += ev["last_committed_seq"].as_u64().unwrap_or(0);
            s.acked += ev["last_acked_seq"].as_u64().unwrap_or(0);
        }
    }
    s
}

/// One spoke's evidence at the end: spoke side, hub side, verify.
fn check_evidence(tools: &Tools, s: &Spoke) -> Result<EvidenceCheck> {
    let mut last = EvidenceCheck::default();
    // The spoke may commit a record between the two reads (a health
    // probe's transition): read until both sides agree, 15 s at most.
    for _ in 0..30 {
        let ev = tools
            .spoke_json(s, &["evidence", "stats"])
            .with_context(|| format!("{}: evidence stats", s.name))?;
        let hub = tools.hub_json(&["evidence", "stats", "--spoke", &s.id, "--json"])?;
        let verify = tools.hub_cli(&["evidence", "verify", "--spoke", &s.id, "--json"])?;
        let hwm = hub["high_water_mark"].as_u64().unwrap_or(0);
        let checkpoint = hub["checkpoint_seq"].as_u64().unwrap_or(0);
        let rows = hub["records"].as_u64().unwrap_or(0);
        let shed = hub["shed_records"].as_u64().unwrap_or(0);
        let dropped = hub["dropped"].as_u64().unwrap_or(0);
        // rows held = one per seq after the checkpoint, a shed record
        // standing for the `dropped` seqs it covers
        let expected_rows = hwm.saturating_sub(checkpoint) as i64 + shed as i64 - dropped as i64;
        let c = EvidenceCheck {
            spoke: s.id.clone(),
            last_committed_seq: ev["last_committed_seq"].as_u64().unwrap_or(0),
            pending_records: ev["pending_records"].as_u64().unwrap_or(0),
            hub_high_water_mark: hwm,
            hub_records: rows,
            duplicates_stored: rows as i64 - expected_rows,
            redeliveries_skipped: hub["duplicates"].as_u64().unwrap_or(0),
            gaps: hub["gaps"].as_u64().unwrap_or(0),
            verify_ok: verify.status.success(),
            exactly_once: false,
        };
        let agreed = c.last_committed_seq == c.hub_high_water_mark && c.pending_records == 0;
        last = EvidenceCheck {
            exactly_once: agreed
                && c.duplicates_stored == 0
                && c.gaps == 0
                && hub["chain_ok"] == Value::Bool(true)
                && c.verify_ok
                && c.last_committed_seq > 0,
            ..c
        };
        if agreed {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(last)
}

/// Runs the demo; the summary (also written as JSON next to the report).
pub fn run(cfg: &DemoConfig) -> Result<Summary> {
    let tm = Timings::of(cfg.short);
    let work = match &cfg.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "tidemesh-demo-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        )),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    watch_signals(&work)?;
    let tools = Tools {
        hub: cfg.bin_dir.join("tidemesh-hub"),
        spoke: cfg.bin_dir.join("tidemesh-spoke"),
        relay: cfg.bin_dir.join("tidemesh-relay"),
        hub_dir: work.join("hub"),
    };
    for b in [&tools.hub, &tools.spoke, &tools.relay] {
        if !b.exists() {
            bail!(
                "{} not found: build the workspace binaries first (cargo build --bins) or pass --bin-dir",
                b.display()
            );
        }
    }
    let result = story(cfg, &tm, &tools, &work);
    match &result {
        Ok(_) if !cfg.keep && cfg.work_dir.is_none() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Ok(_) => {}
        Err(_) => eprintln!("logs and data kept in {}", work.display()),
    }
    result
}

fn story(cfg: &DemoConfig, tm: &Timings, tools: &Tools, work: &Path) -> Result<Summary> {
    let mut procs = Procs::default();
    let say = |s: &str| {
        println!("{s}");
        let _ = std::io::stdout().flush();
    };
    say(&format!("== setting up in {}", work.display()));
    // the apps
    let inventory = procs.spawn_listening(
        "inventory",
        Command::new(&cfg.self_exe).args(["app", "--name", "inventory", "--listen", "127.0.0.1:0"]),
        &work.join("inventory.log"),
    )?;
    let payments = procs.spawn_listening(
        "payments",
        Command::new(&cfg.self_exe).args(["app", "--name", "payments", "--listen", "127.0.0.1:0"]),
        &work.join("payments.log"),
    )?;
    // the hub
    let o = run_cmd(
        Command::new(&tools.hub)
            .args(["init", "--trust-domain", TD, "--data-dir"])
            .arg(&tools.hub_dir),
    )?;
    if !o.status.success() {
        bail!("tidemesh-hub init: {}", text(&o));
    }
    let hub_metrics = free_tcp()?;
    let ttl = format!("{}s", tm.ttl.as_secs());
    let hub_addr = procs.spawn_listening(
        "hub",
        Command::new(&tools.hub)
            .args(["serve", "--listen", "127.0.0.1:0", "--workload-ttl", &ttl])
            .args(["--metrics", &hub_metrics.to_string(), "--data-dir"])
            .arg(&tools.hub_dir),
        &work.join("hub.log"),
    )?;
    wait_for(Duration::from_secs(20), || {
        tools.hub_dir.join("admin.sock").exists().then_some(())
    })
    .context("the hub's admin socket never appeared")?;
    say(&format!(
        "hub: QUIC {hub_addr}, workload SVID lifetime {ttl}, metrics http://{hub_metrics}/metrics"
    ));
    // the relay between the store and the hub
    let control = work.join("relay.ctl");
    let relay = procs.spawn_listening(
        "relay",
        Command::new(&tools.relay)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &hub_addr.to_string(),
            ])
            .args(["--seed", "18", "--control"])
            .arg(&control),
        &work.join("relay.log"),
    )?;
    wait_for(Duration::from_secs(10), || control.exists().then_some(()))
        .context("the relay's control socket never appeared")?;
    say(&format!("relay: the store reaches the hub through {relay}"));
    let mesh = work.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(payments))?;
    let o = tools.hub_cli(&["apply", "-f", mesh.to_str().context("utf-8 path")?])?;
    if !o.status.success() {
        bail!("tidemesh-hub apply: {}", text(&o));
    }
    say("hub: applied Store sf01, ModeMatrix, ServiceEntry payments.cloud, DestinationPolicy (1 s budget), AuthorizationPolicies");
    // the spokes
    let (outbound, data_a, data_b) = (free_tcp()?, free_udp()?, free_udp()?);
    let cfg_a = format!(
        r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "pos"
service = "pos"
namespace = "store"
labels = {{ app = "pos" }}
outbound = "{outbound}"
"#
    );
    let cfg_b = format!(
        r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{inventory}"
"#
    );
    let mut spokes = Vec::new();
    for (name, conf) in [("spoke-a", cfg_a), ("spoke-b", cfg_b)] {
        let s = Spoke {
            name,
            id: format!("spiffe://{TD}/store/sf01/node/{name}"),
            dir: work.join(name),
            metrics: free_tcp()?,
        };
        let conf_path = work.join(format!("{name}.toml"));
        std::fs::write(&conf_path, conf)?;
        let o = tools.hub_cli(&["token", "create", "--spoke", &s.id, "--ttl", "10m"])?;
        if !o.status.success() {
            bail!("token create: {}", text(&o));
        }
        let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let o = run_cmd(
            Command::new(&tools.spoke)
                .args(["enroll", "--hub", &relay.to_string(), "--token", &token])
                .arg("--data-dir")
                .arg(&s.dir),
        )?;
        if !o.status.success() {
            bail!("{name}: enroll: {}", text(&o));
        }
        procs.spawn(
            name,
            Command::new(&tools.spoke)
                .arg("run")
                .arg("--data-dir")
                .arg(&s.dir)
                .arg("--config")
                .arg(&conf_path)
                .args(["--metrics", &s.metrics.to_string()])
                .args(["--reconnect-max", "2s"])
                .args(["--data-idle-timeout", "3s", "--data-keep-alive", "1s"]),
            &work.join(format!("{name}.log")),
        )?;
        spokes.push(s);
    }
    let (a, b) = (&spokes[0], &spokes[1]);
    for s in [a, b] {
        wait_for(Duration::from_secs(40), || {
            let st = tools.spoke_json(s, &["status"])?;
            (st["state"] == "connected"
                && st["config_version"].is_u64()
                && st["workloads"]
                    .as_array()?
                    .iter()
                    .all(|w| w["id"].is_string()))
            .then_some(())
        })
        .with_context(|| {
            format!(
                "{} never connected with its config and SVIDs; log:\n{}",
                s.name,
                std::fs::read_to_string(work.join(format!("{}.log", s.name))).unwrap_or_default()
            )
        })?;
        say(&format!(
            "{}: {} connected (metrics http://{}/metrics)",
            s.name, s.id, s.metrics
        ));
    }
    for (host, method, path) in [
        ("inventory.store", "GET", "/stock/sku-0"),
        ("payments.cloud", "POST", "/charge"),
    ] {
        let mut last = None;
        wait_for(Duration::from_secs(30), || {
            let r = app::call(outbound, method, host, path, Duration::from_secs(10));
            let ok = r.status == 200;
            last = Some(r);
            ok.then_some(())
        })
        .with_context(|| format!("the first call to {host} never succeeded: {last:?}"))?;
    }
    say("pos -> inventory.store (spoke B) and pos -> payments.cloud (hub gateway) answer");
    say("");
    say(&format!(
        "== the story: {}s with the hub, a {}s hub blackout (SVIDs live {}s), then the heal",
        tm.before.as_secs(),
        tm.outage.as_secs(),
        tm.ttl.as_secs()
    ));
    let header = format!(
        "{:>5}  {:<7} {:<18} {:<13} {:>14} {:>10} {:>8} {:>8}  {}",
        "t",
        "phase",
        "mode A/B",
        "A's hub link",
        "same-site ok/x",
        "cloud ok/x",
        "backlog",
        "horizon",
        "pos SVID"
    );
    say(&header);

    let t0 = Instant::now();
    let lp = Loop::start(outbound, t0, Duration::from_millis(100));
    let mut seconds: Vec<Second> = Vec::new();
    let mut events: Vec<(f64, String)> = Vec::new();
    let mut phase = Phase::Before;
    let (mut cut_at, mut heal_at) = (None::<Duration>, None::<Duration>);
    let mut survival_at = None;
    let mut noticed_at = None::<Duration>;
    let mut target_at = None;
    let mut drained_at = None;
    let mut committed_at_heal = u64::MAX;
    let mut tick = 0u64;
    let mut seen_calls = 0usize;
    loop {
        tick += 1;
        let due = t0 + Duration::from_secs(tick);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // phase changes on the second; the row is of the second before
        let row_phase = phase;
        let mut news = None;
        let el = t0.elapsed();
        if phase == Phase::Before && el >= tm.before {
            // calls made from here on are the outage's
            tools.relay_ctl(&control, "blackout")?;
            cut_at = Some(t0.elapsed());
            phase = Phase::Outage;
            lp.set_phase(phase);
            events.push((el.as_secs_f64(), "hub blackout".into()));
            news = Some(format!(
                "== {:>3}s  tidemesh-relay ctl blackout: the store loses the hub",
                el.as_secs()
            ));
        } else if phase == Phase::Outage && el >= tm.before + tm.outage {
            tools.relay_ctl(&control, "heal")?;
            heal_at = Some(t0.elapsed());
            phase = Phase::After;
            lp.set_phase(phase);
            committed_at_heal = sample(tools, a, b).committed;
            events.push((el.as_secs_f64(), "heal".into()));
            news = Some(format!(
                "== {:>3}s  tidemesh-relay ctl heal: the hub is back",
                el.as_secs()
            ));
        }
        let s = sample(tools, a, b);
        let t = tick - 1;
        let (mut so, mut sf, mut co, mut cf) = (0, 0, 0, 0);
        {
            let calls = lp.calls.lock().unwrap_or_else(|e| e.into_inner());
            for c in &calls[seen_calls..] {
                match (c.path, c.ok()) {
                    (report::Path::SameSite, true) => so += 1,
                    (report::Path::SameSite, false) => sf += 1,
                    (report::Path::Cloud, true) => co += 1,
                    (report::Path::Cloud, false) => cf += 1,
                }
            }
            seen_calls = calls.len();
        }
        let el = t0.elapsed();
        if phase == Phase::Outage && survival_at.is_none() && s.mode_a == "survival" {
            survival_at = cut_at.map(|c| el.saturating_sub(c));
        }
        if phase == Phase::Outage && noticed_at.is_none() && s.state_a == "disconnected" {
            noticed_at = Some(el);
        }
        if phase == Phase::After {
            if target_at.is_none() && s.mode_a == "target" {
                target_at = heal_at.map(|h| el.saturating_sub(h));
            }
            if drained_at.is_none() && s.acked >= committed_at_heal {
                drained_at = heal_at.map(|h| el.saturating_sub(h));
            }
        }
        let svid = match s.svid_left_s {
            Some(l) => format!("{l}s left"),
            None => "-".into(),
        };
        say(&format!(
            "{:>4}s  {:<7} {:<18} {:<13} {:>14} {:>10} {:>8} {:>8}  {}",
            t,
            match row_phase {
                Phase::Before => "normal",
                Phase::Outage => "OUTAGE",
                Phase::After => "healed",
            },
            format!("{}/{}", short_mode(&s.mode_a), short_mode(&s.mode_b)),
            s.state_a,
            format!("{so}/{sf}"),
            format!("{co}/{cf}"),
            s.backlog,
            s.horizon_s.map(human).unwrap_or_else(|| "-".into()),
            svid
        ));
        seconds.push(Second {
            t,
            phase: Some(row_phase),
            mode_a: s.mode_a.clone(),
            mode_b: s.mode_b.clone(),
            state_a: s.state_a.clone(),
            same_ok: so,
            same_fail: sf,
            cloud_ok: co,
            cloud_fail: cf,
            backlog: s.backlog,
            committed: s.committed,
            acked: s.acked,
            horizon_s: s.horizon_s,
            svid_left_s: s.svid_left_s,
            svid_not_after: s.svid_not_after.clone(),
            svid_issuer: s.svid_issuer.clone(),
        });
        if let Some(n) = news {
            say(&n);
        }
        let el = t0.elapsed();
        if let Some(h) = heal_at {
            let since = el.saturating_sub(h);
            let settled = target_at.is_some() && drained_at.is_some();
            if (settled && since >= tm.after_min) || since >= tm.after_max {
                break;
            }
        }
    }
    let duration = t0.elapsed();
    let calls = lp.finish();
    if let Some(t) = target_at.zip(heal_at) {
        events.push(((t.0 + t.1).as_secs_f64(), "Target".into()));
    }
    say("");
    say("== checking the evidence: spoke committed = hub high-water mark, evidence verify, no duplicates");
    let mut summary = Summary {
        profile: if cfg.short { "short" } else { "full" }.into(),
        workload_ttl_s: tm.ttl.as_secs(),
        outage_s: match (cut_at, heal_at) {
            (Some(c), Some(h)) => (h - c).as_secs_f64(),
            _ => 0.0,
        },
        survival_after_s: survival_at.map(|d| d.as_secs_f64()),
        target_after_heal_s: target_at.map(|d| d.as_secs_f64()),
        drained_after_heal_s: drained_at.map(|d| d.as_secs_f64()),
        duration_s: duration.as_secs_f64(),
        report: cfg.report.display().to_string(),
        ..Default::default()
    };
    summary.count_calls(&calls);
    // the cloud calls of the outage, made before and after spoke A reported
    // the hub unreachable (sampled once a second: "after" is certain)
    let noticed_ms = noticed_at.map_or(u64::MAX, |d| d.as_millis() as u64);
    summary.hub_lost_noticed_after_s = noticed_at
        .zip(cut_at)
        .map(|(n, c)| n.saturating_sub(c).as_secs_f64());
    let outage_cloud_fail = |after: bool| {
        calls
            .iter()
            .filter(|c| c.phase == Phase::Outage && c.path == report::Path::Cloud && !c.ok())
            .filter(|c| (c.at_ms >= noticed_ms) == after)
            .map(|c| c.latency_ms)
            .max()
    };
    summary.cloud_max_failure_ms_before_notice = outage_cloud_fail(false);
    summary.cloud_max_failure_ms_after_notice = outage_cloud_fail(true);
    let outage: Vec<&Second> = seconds
        .iter()
        .filter(|s| s.phase == Some(Phase::Outage))
        .collect();
    let mut svids: Vec<&str> = outage
        .iter()
        .map(|s| s.svid_not_after.as_str())
        .filter(|s| !s.is_empty())
        .collect();
    svids.sort_unstable();
    svids.dedup();
    summary.svids_during_outage = svids.len() as u64;
    summary.svid_issued_offline = outage.iter().any(|s| s.svid_issuer.starts_with("node CA"));
    summary.max_backlog = seconds.iter().map(|s| s.backlog).max().unwrap_or(0);
    for s in [a, b] {
        summary.evidence.push(check_evidence(tools, s)?);
    }
    summary.exactly_once = summary.evidence.iter().all(|e| e.exactly_once);
    // report and summary
    if let Some(dir) = cfg.report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&cfg.report, report::html(&seconds, &events, &summary))
        .with_context(|| format!("write {}", cfg.report.display()))?;
    let full = serde_json::json!({
        "summary": &summary,
        "timeline": &seconds,
        "events": &events,
        "calls": &calls,
    });
    std::fs::write(&cfg.summary, serde_json::to_vec_pretty(&full)?)
        .with_context(|| format!("write {}", cfg.summary.display()))?;
    say("");
    say("== summary");
    for l in summary.lines() {
        say(&l);
    }
    say(&format!("report: {}", cfg.report.display()));
    say(&format!("summary JSON: {}", cfg.summary.display()));
    if cfg.keep {
        say("");
        say("== --keep: everything keeps running (Ctrl-C to stop)");
        say(&format!("hub metrics:     http://{hub_metrics}/metrics"));
        for s in [a, b] {
            say(&format!("{} metrics: http://{}/metrics", s.name, s.metrics));
        }
        say(&format!(
            "pos outbound:    curl -H 'Host: inventory.store' http://{outbound}/stock/sku-1"
        ));
        say(&format!(
            "relay control:   {} ctl --control {} blackout | heal",
            tools.relay.display(),
            control.display()
        ));
        say(&format!("data and logs:   {}", work.display()));
        for (n, pid) in procs.pids() {
            say(&format!("  {n}: pid {pid}"));
        }
        KEEPING.store(true, Ordering::SeqCst);
        while !SIGNALLED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        say("stopping everything");
    }
    drop(procs);
    Ok(summary)
}

fn short_mode(m: &str) -> &str {
    match m {
        "target" => "target",
        "survival" => "SURVIVAL",
        "recovery" => "recovery",
        "degraded" => "degraded",
        other => other,
    }
}

/// The slowest a cloud call may fail during the outage: its 1 s policy
/// timeout (`timeout: 1s` of payments.cloud, which bounds the handshake to
/// the gateway too) plus a margin for a loaded machine.
const CLOUD_FAILURE_BOUND_MS: u64 = 1_600;

/// Whether a summary shows the story held: same-site served through the
/// outage, cloud calls failed fast, evidence exactly once. The problems,
/// empty when it did.
pub fn problems(s: &Summary) -> Vec<String> {
    let mut p = Vec::new();
    if s.same_site[1].ok == 0 || s.same_site[1].failed > 0 {
        p.push(format!(
            "same-site during the outage: {} ok, {} failed (want > 0 ok, 0 failed)",
            s.same_site[1].ok, s.same_site[1].failed
        ));
    }
    // Once the spoke knows the hub is gone a cloud call fails at once; in
    // the seconds before (the control session's idle timeout) a call waits
    // at most its 1 s policy timeout, handshake to the gateway included.
    let after = s.cloud_max_failure_ms_after_notice;
    if s.cloud[1].failed == 0 || after.is_none_or(|ms| ms >= 2_000) {
        p.push(format!(
            "cloud during the outage: {} failed, slowest once the hub was known lost {after:?} ms (want failures, each < 2 s)",
            s.cloud[1].failed
        ));
    }
    if s.cloud[1].max_failure_ms >= CLOUD_FAILURE_BOUND_MS {
        p.push(format!(
            "cloud during the outage: a failure took {} ms (want < {CLOUD_FAILURE_BOUND_MS} ms: the 1 s policy timeout plus a margin)",
            s.cloud[1].max_failure_ms
        ));
    }
    if s.outage_s <= s.workload_ttl_s as f64 {
        p.push(format!(
            "the outage ({:.0} s) was not longer than the SVID lifetime ({} s)",
            s.outage_s, s.workload_ttl_s
        ));
    }
    if !s.exactly_once {
        p.push("evidence not delivered exactly once (see the per-spoke lines)".into());
    }
    p
}
