//! Data plane benchmark (issue #6): what a spoke hop adds to an HTTP
//! request, beside direct calls and haproxy measured in the same run.
//!
//! One process on loopback runs a tiny upstream (HTTP/1.1 keep-alive, every
//! request answered with a 1 KB body) and a load generator; the release
//! `tidemesh-hub` and `tidemesh-spoke` binaries run as processes (a hub and
//! two spokes at store sf01, as in `tests/tests/dataplane.rs`), and so does
//! the Debian `haproxy`. Every request is `POST` with a 1 KB body, answered
//! by a 1 KB body. Scenarios:
//!
//! 1. **direct**: client -> upstream.
//! 2. **spoke, one hop**: client -> spoke A's outbound listener
//!    (`Host: echo-local.bench`) -> workload of A -> upstream.
//! 3. **two spokes**: client -> spoke A -> QUIC mTLS tunnel -> spoke B ->
//!    upstream (`echo-remote` is registered on B only).
//! 4. **haproxy, one hop**: client -> haproxy (plain HTTP) -> upstream.
//! 5. **haproxy pair, TLS hop**: client -> haproxy A (HTTP in, TLS 1.3 out
//!    with a client certificate) -> haproxy B (TLS in, verifies the client
//!    certificate) -> upstream.
//!
//! 6. **hyper only, pooled**: client -> `tidemesh-bench-hyper-floor`
//!    (tests/bin/hyper_floor.rs: hyper's server, hyper-util's pooled
//!    client, tokio's multi-threaded runtime, nothing else) -> upstream.
//! 7. **hyper only, affine**: the same proxy with one upstream connection
//!    per client connection on a current-thread runtime.
//!
//! 6 and 7 are references, not goals: what the HTTP stack the spoke is
//! built on adds by itself, so the spoke's own share can be told apart.
//!
//! Scenarios 1 to 5 run again with 4 KiB and 64 KiB bodies (both ways:
//! the upstream answers with as many bytes as it was sent; keys `_4k`,
//! `_64k`) and with 256 client connections at the same rate (`_c256`);
//! each is measured against direct with the same body and connections.
//! The `_h2` rows (spoke one hop, two spokes, haproxy one hop with an h2c
//! frontend) carry every caller's requests as streams of one long-lived
//! HTTP/2 connection, as `ab`-style and gRPC callers do.
//!
//! haproxy runs with `nbthread 1`, keep-alive on both sides and `http-reuse
//! always`; it is skipped (with a message) when not installed. The spokes
//! run as shipped (tokio's default: one worker per core; every request
//! writes an evidence record, which the spoke syncs to the hub).
//!
//! Method. Each run opens fresh keep-alive connections to the entry point
//! and warms them up (unmeasured), then:
//! * **fixed rate** (open loop): `rate` requests/s spread over `conns`
//!   connections, each sending on its own schedule. Latency is taken from
//!   the intended send time whenever the previous response on that
//!   connection came back late (so a stall counts for every request it
//!   delays: no coordinated omission), and from the actual send time
//!   otherwise (so the load generator's own timer lateness is not charged
//!   to the proxy).
//! * **saturation** (closed loop): `conns` connections, each sending its
//!   next request as soon as the previous answer is in.
//!
//! Runs are interleaved round by round (the order rotates every round) and
//! pooled per scenario; *added* latency is the scenario's percentile minus
//! direct's at the same percentile, per hop divided by the hops. CPU is
//! utime + stime of the proxy processes on the path (`/proc/PID/stat`)
//! across the measured window, per 1,000 answered requests. RSS is VmRSS
//! (`/proc/PID/status`): idle after start-up settles, the highest sample
//! (every 100 ms) under load, and after load; VmHWM is the peak.
//!
//! Everything shares the machine's cores (the load generator and upstream
//! take one thread each); figures are only meaningful as ratios within one
//! run. Nothing fails on speed.
//!
//! Run: `cargo bench -p tidemesh-tests --bench dataplane` (builds the
//! release binaries first). Quick smoke pass: set `TIDEMESH_BENCH_QUICK=1`;
//! without `--bench` (for example under `cargo test --benches`) it is quick
//! too. `TIDEMESH_BENCH_ONLY=spoke_one_hop,haproxy_one_hop` runs only the
//! scenarios named (and the direct runs they are measured against).
//! `TIDEMESH_BENCH_CPUS=0-1` pins the bench to those CPUs before it starts
//! anything, so every process it spawns inherits the set (the spokes' tokio
//! runtimes then start one worker per CPU of the set).

#[path = "../../hub/benches/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use common::{loadavg, machine};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};
use tidemesh_tests::{
    bin, free_tcp, free_udp, text, use_release_bins, wait_for, write_config, HubProc, SpokeProc,
    STORE_SF01,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const COMMAND: &str = "cargo bench -p tidemesh-tests --bench dataplane";
const QUICK_ENV: &str = "TIDEMESH_BENCH_QUICK";
/// Set to keep the temp dir (spoke and haproxy logs and configs).
const KEEP_ENV: &str = "TIDEMESH_BENCH_KEEP";
/// Set to a comma-separated list of scenario keys to run only those
/// (direct always runs): for quick comparisons while working on one path.
const ONLY_ENV: &str = "TIDEMESH_BENCH_ONLY";
/// The hyper-only reference proxy (tests/bin/hyper_floor.rs).
const FLOOR_BIN: &str = "tidemesh-bench-hyper-floor";
const TD: &str = "edge.example";
/// Request and response body size of the main rows.
const BODY: usize = 1024;
/// Every body size a scenario uses (the upstream answers with as many bytes).
const BODIES: [usize; 3] = [BODY, 4 * 1024, 64 * 1024];
/// Client connections of the many-connections rows.
const MANY_CONNS: usize = 256;
/// Set to a CPU list (`0-1`, `0,2-3`) to pin the whole bench to those CPUs:
/// the bench sets its own affinity first, so the hub, spokes, haproxy and
/// the reference proxies it spawns inherit it.
const CPUS_ENV: &str = "TIDEMESH_BENCH_CPUS";
/// The issue's goal for a spoke's idle RSS.
const IDLE_RSS_GOAL_MIB: f64 = 15.0;
/// Most bytes of a message head the parser accepts.
const MAX_HEAD: usize = 64 * 1024;
/// The name haproxy B's certificate carries and haproxy A checks.
const HAPROXY_B_NAME: &str = "haproxy-b.bench.invalid";

/// How much load, for how long.
struct Plan {
    rounds: usize,
    rate: f64,
    fixed_conns: usize,
    fixed_secs: f64,
    sat_conns: usize,
    sat_secs: f64,
    /// Unmeasured requests per connection before each run.
    warmup: usize,
    /// Pause between runs (lets TIME_WAIT and evidence sync settle).
    pause: Duration,
    /// Wait after start-up before sampling idle RSS.
    settle: Duration,
}

const FULL: Plan = Plan {
    rounds: 3,
    rate: 1000.0,
    fixed_conns: 16,
    fixed_secs: 3.0,
    sat_conns: 16,
    sat_secs: 2.0,
    warmup: 5,
    pause: Duration::from_millis(400),
    settle: Duration::from_secs(3),
};

const QUICK: Plan = Plan {
    rounds: 1,
    rate: 200.0,
    fixed_conns: 4,
    fixed_secs: 0.5,
    sat_conns: 4,
    sat_secs: 0.5,
    warmup: 2,
    pause: Duration::from_millis(100),
    settle: Duration::from_millis(500),
};

// ---- machine facts (machine() and loadavg() are the hub benches', in common) ---

/// Kernel counters worth a look after a loopback run (listen queue
/// overflows, UDP receive buffer drops, retransmits, failed connects).
fn kernel_counters() -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let Ok(s) = std::fs::read_to_string(file) else {
            continue;
        };
        let lines: Vec<&str> = s.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((proto, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                let key = format!("{proto}.{n}");
                if [
                    "TcpExt.ListenOverflows",
                    "TcpExt.ListenDrops",
                    "Udp.RcvbufErrors",
                    "Udp.SndbufErrors",
                    "Tcp.RetransSegs",
                    "Tcp.AttemptFails",
                ]
                .contains(&key.as_str())
                {
                    out.insert(key, v.parse().unwrap_or(0));
                }
            }
        }
    }
    out
}

// ---- /proc: CPU and memory of the proxy processes -----------------------------

/// Clock ticks per second for `/proc/PID/stat` (USER_HZ).
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14 and stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn cpu_ticks_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| cpu_ticks(p)).sum()
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Datagrams the kernel dropped on the UDP sockets of these processes
/// (receive buffer full), from the `drops` column of `/proc/net/udp{,6}`:
/// on loopback a drop is a QUIC packet loss the sender must recover from.
fn udp_drops(pids: &[u32]) -> u64 {
    let mut inodes = std::collections::BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path()) {
                if let Some(i) = l
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                {
                    inodes.insert(i.to_owned());
                }
            }
        }
    }
    let mut drops = 0;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(s) = std::fs::read_to_string(file) else {
            continue;
        };
        for l in s.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let (Some(inode), Some(d)) = (f.get(9), f.get(12)) {
                if inodes.contains(*inode) {
                    drops += d.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    drops
}

/// Samples the VmRSS of some processes every 100 ms until stopped; keeps
/// the highest sample of each.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = vec![0u64; pids.len()];
            loop {
                for (m, &p) in max.iter_mut().zip(&pids) {
                    *m = (*m).max(status_kib(p, "VmRSS").unwrap_or(0));
                }
                if flag.load(Ordering::SeqCst) {
                    return max;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

// ---- HTTP/1.1 on raw keep-alive sockets ----------------------------------------

/// One parsed message (its bytes already consumed from the buffer).
struct Message {
    /// Response status (0 for requests).
    status: u16,
    /// The peer asked to close the connection after this message.
    close: bool,
    body_len: usize,
    /// Head and start of the body, for error reports (non-200 answers only).
    snippet: String,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads more bytes into `buf`; end of stream is an error.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    if s.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads one HTTP/1.1 message (Content-Length or chunked body; a response
/// with neither is read to end of stream) and removes it from `buf`.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, response: bool) -> io::Result<Message> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("message head too long"));
        }
        fill(s, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("head not utf-8"))?;
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or("");
    let status = if response {
        start
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| invalid("bad status line"))?
    } else {
        0
    };
    let (mut length, mut chunked, mut close) = (None::<usize>, false, false);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse().map_err(|_| invalid("bad content-length"))?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    let (body_len, end) = if chunked {
        let (mut pos, mut total) = (head_end, 0);
        loop {
            let line_end = loop {
                if let Some(i) = find(&buf[pos..], b"\r\n") {
                    break pos + i;
                }
                fill(s, buf).await?;
            };
            let size = std::str::from_utf8(&buf[pos..line_end])
                .ok()
                .and_then(|l| l.split(';').next())
                .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                .ok_or_else(|| invalid("bad chunk size"))?;
            pos = line_end + 2;
            if size == 0 {
                // trailers, up to an empty line
                loop {
                    let le = loop {
                        if let Some(i) = find(&buf[pos..], b"\r\n") {
                            break pos + i;
                        }
                        fill(s, buf).await?;
                    };
                    let empty = le == pos;
                    pos = le + 2;
                    if empty {
                        break;
                    }
                }
                break;
            }
            while buf.len() < pos + size + 2 {
                fill(s, buf).await?;
            }
            pos += size + 2;
            total += size;
        }
        (total, pos)
    } else if let Some(n) = length {
        while buf.len() < head_end + n {
            fill(s, buf).await?;
        }
        (n, head_end + n)
    } else if response {
        loop {
            match fill(s, buf).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        close = true;
        (buf.len() - head_end, buf.len())
    } else {
        (0, head_end)
    };
    let snippet = if response && status != 200 {
        String::from_utf8_lossy(&buf[..end.min(head_end + 200)])
            .replace("\r\n", " | ")
            .trim()
            .to_owned()
    } else {
        String::new()
    };
    buf.drain(..end);
    Ok(Message {
        status,
        close,
        body_len,
        snippet,
    })
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One request/response on a kept-alive connection (connecting first when
/// there is none); an error drops the connection.
async fn exchange(
    addr: SocketAddr,
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
    req: &[u8],
    body: usize,
) -> Result<(), String> {
    if conn.is_none() {
        buf.clear();
        *conn = Some(
            connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?,
        );
    }
    let s = conn.as_mut().expect("connected just above");
    let res = async {
        s.write_all(req).await?;
        read_message(s, buf, true).await
    }
    .await;
    match res {
        Ok(m) => {
            if m.close {
                *conn = None;
            }
            if m.status != 200 {
                return Err(format!("HTTP {}: {}", m.status, m.snippet));
            }
            if m.body_len != body {
                return Err(format!("body of {} bytes, want {body}", m.body_len));
            }
            Ok(())
        }
        Err(e) => {
            *conn = None;
            Err(format!("i/o: {e}"))
        }
    }
}

/// The request every scenario sends (the Host and body size differ).
fn request(host: &str, body: usize) -> Arc<[u8]> {
    let mut r = format!(
        "POST /bench HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {body}\r\n\r\n"
    )
    .into_bytes();
    r.extend(std::iter::repeat_n(b'q', body));
    r.into()
}

/// The upstream's answer to a request with a `body`-byte body: as many bytes.
fn response(body: usize) -> Arc<[u8]> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {body}\r\n\r\n"
    )
    .into_bytes();
    r.extend(std::iter::repeat_n(b'r', body));
    r.into()
}

/// A caller's connection: HTTP/1.1 on a raw keep-alive socket (one request
/// at a time), or one stream slot on a shared long-lived HTTP/2 connection
/// (h2c, prior knowledge), as `ab`-style and gRPC callers use.
enum Caller {
    H1 {
        conn: Option<TcpStream>,
        buf: Vec<u8>,
    },
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Caller {
    async fn exchange(&mut self, sc: &Scenario) -> Result<(), String> {
        match self {
            Caller::H1 { conn, buf } => exchange(sc.addr, conn, buf, &sc.req, sc.body).await,
            Caller::H2(send) => {
                let req = hyper::Request::post(format!("http://{}/bench", sc.host))
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(Bytes::from(vec![b'q'; sc.body])))
                    .map_err(|e| format!("request: {e}"))?;
                send.ready().await.map_err(|e| format!("h2: {e}"))?;
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("h2 body: {e}"))?
                    .to_bytes();
                if status != hyper::StatusCode::OK {
                    return Err(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    ));
                }
                if body.len() != sc.body {
                    return Err(format!("body of {} bytes, want {}", body.len(), sc.body));
                }
                Ok(())
            }
        }
    }
}

/// Opens `n` callers to the scenario's entry: `n` HTTP/1.1 connections, or
/// `n` stream slots on one HTTP/2 connection.
async fn open_callers(sc: &Scenario, n: usize) -> Result<Vec<Caller>> {
    if sc.h2 {
        let s = connect(sc.addr)
            .await
            .with_context(|| format!("{}: connect {}", sc.name, sc.addr))?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(s))
            .await
            .with_context(|| format!("{}: HTTP/2 handshake", sc.name))?;
        tokio::spawn(conn);
        return Ok((0..n).map(|_| Caller::H2(send.clone())).collect());
    }
    let mut out = Vec::new();
    for _ in 0..n {
        let conn = connect(sc.addr)
            .await
            .with_context(|| format!("{}: connect {}", sc.name, sc.addr))?;
        out.push(Caller::H1 {
            conn: Some(conn),
            buf: Vec::with_capacity(8192),
        });
    }
    Ok(out)
}

// ---- the upstream ----------------------------------------------------------------

/// Connections the upstream has accepted (a proxy that does not reuse its
/// upstream connections opens one per request).
static UPSTREAM_ACCEPTS: AtomicU64 = AtomicU64::new(0);

/// Starts the upstream on its own thread and single-threaded runtime:
/// every request gets `200` with a body as long as the request's,
/// connections stay open.
fn start_upstream() -> Result<SocketAddr> {
    let l = StdTcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?;
    let resps: Arc<BTreeMap<usize, Arc<[u8]>>> =
        Arc::new(BODIES.iter().map(|&b| (b, response(b))).collect());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                    return;
                };
                loop {
                    let Ok((mut s, _)) = l.accept().await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    UPSTREAM_ACCEPTS.fetch_add(1, Ordering::Relaxed);
                    let _ = s.set_nodelay(true);
                    let resps = resps.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::with_capacity(4096);
                        while let Ok(m) = read_message(&mut s, &mut buf, false).await {
                            let resp = match resps.get(&m.body_len) {
                                Some(r) => r.clone(),
                                None => response(m.body_len),
                            };
                            if s.write_all(&resp).await.is_err() || m.close {
                                return;
                            }
                        }
                    });
                }
            })
        })?;
    Ok(addr)
}

// ---- the load generator ------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Fixed,
    Saturation,
}

#[derive(Default)]
struct ConnOut {
    /// Latencies of answered requests, in ns.
    lat: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl ConnOut {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// Open loop: this connection's share of the rate, from `first` every
/// `interval` until `end`.
async fn fixed_conn(
    sc: Arc<Scenario>,
    mut caller: Caller,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> ConnOut {
    let mut out = ConnOut::default();
    let mut prev_done = first;
    for k in 0u32.. {
        let intended = first + interval * k;
        if intended >= end {
            break;
        }
        // On time: measure from the actual send (our timer's lateness is
        // not the proxy's). Late because the previous answer was: measure
        // from the intended time.
        let from = if prev_done <= intended {
            tokio::time::sleep_until(intended.into()).await;
            Instant::now()
        } else {
            intended
        };
        let r = caller.exchange(&sc).await;
        let done = Instant::now();
        prev_done = done;
        match r {
            Ok(()) => out.lat.push((done - from).as_nanos() as u64),
            Err(e) => out.error(e),
        }
    }
    out
}

/// Closed loop: the next request as soon as the answer is in, until `end`.
async fn saturation_conn(sc: Arc<Scenario>, mut caller: Caller, end: Instant) -> ConnOut {
    let mut out = ConnOut::default();
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let r = caller.exchange(&sc).await;
        let done = Instant::now();
        if done > end {
            break;
        }
        match r {
            Ok(()) => out.lat.push((done - sent).as_nanos() as u64),
            Err(e) => out.error(e),
        }
    }
    out
}

/// One measured run against one scenario.
struct Run {
    lat: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    /// CPU ticks of the scenario's proxy processes over the window.
    cpu_ticks: u64,
    /// CPU ticks of the hub over the window (evidence ingest; context).
    hub_ticks: u64,
    /// Highest VmRSS sample of each proxy process, KiB.
    rss_max: Vec<u64>,
    /// Connections the upstream accepted during the window.
    upstream_conns: u64,
    /// UDP datagrams dropped on the hub's and spokes' sockets in the window.
    udp_drops: u64,
}

impl Run {
    fn answered(&self) -> u64 {
        self.lat.len() as u64
    }
}

/// What one window of load measured besides latencies.
struct Window {
    secs: f64,
    cpu_ticks: u64,
    hub_ticks: u64,
    upstream_conns: u64,
    udp_drops: u64,
}

async fn load(
    sc: &Arc<Scenario>,
    mode: Mode,
    plan: &Plan,
    hub_pid: Option<u32>,
    mesh_pids: &[u32],
) -> Result<(Vec<ConnOut>, Window)> {
    let conns = sc.conns.unwrap_or(match mode {
        Mode::Fixed => plan.fixed_conns,
        Mode::Saturation => plan.sat_conns,
    });
    let mut ready = open_callers(sc, conns).await?;
    for (i, caller) in ready.iter_mut().enumerate() {
        for _ in 0..plan.warmup {
            if let Err(e) = caller.exchange(sc).await {
                bail!("{}: warm-up request on connection {i} failed: {e}", sc.name);
            }
        }
    }
    let hub = hub_pid.map(|p| vec![p]).unwrap_or_default();
    let (cpu0, hub0) = (cpu_ticks_sum(&sc.pids), cpu_ticks_sum(&hub));
    let (conns0, drops0) = (
        UPSTREAM_ACCEPTS.load(Ordering::Relaxed),
        udp_drops(mesh_pids),
    );
    let t0 = Instant::now() + Duration::from_millis(2);
    let (secs, interval) = match mode {
        Mode::Fixed => (
            plan.fixed_secs,
            Duration::from_secs_f64(conns as f64 / plan.rate),
        ),
        Mode::Saturation => (plan.sat_secs, Duration::ZERO),
    };
    let end = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (i, caller) in ready.into_iter().enumerate() {
        let sc = sc.clone();
        tasks.push(match mode {
            Mode::Fixed => {
                let first = t0 + Duration::from_secs_f64(i as f64 / plan.rate);
                tokio::spawn(fixed_conn(sc, caller, first, interval, end))
            }
            Mode::Saturation => tokio::spawn(saturation_conn(sc, caller, end)),
        });
    }
    let mut outs = Vec::new();
    for t in tasks {
        outs.push(t.await?);
    }
    let (cpu1, hub1) = (cpu_ticks_sum(&sc.pids), cpu_ticks_sum(&hub));
    Ok((
        outs,
        Window {
            secs,
            cpu_ticks: cpu1.saturating_sub(cpu0),
            hub_ticks: hub1.saturating_sub(hub0),
            upstream_conns: UPSTREAM_ACCEPTS
                .load(Ordering::Relaxed)
                .saturating_sub(conns0),
            udp_drops: udp_drops(mesh_pids).saturating_sub(drops0),
        },
    ))
}

fn measure(
    rt: &tokio::runtime::Runtime,
    sc: &Arc<Scenario>,
    mode: Mode,
    plan: &Plan,
    hub_pid: Option<u32>,
    mesh_pids: &[u32],
) -> Result<Run> {
    let sampler = RssSampler::start(sc.pids.clone());
    let res = rt.block_on(load(sc, mode, plan, hub_pid, mesh_pids));
    let rss_max = sampler.finish();
    let (outs, w) = res?;
    let mut run = Run {
        lat: Vec::new(),
        errors: 0,
        first_error: None,
        secs: w.secs,
        cpu_ticks: w.cpu_ticks,
        hub_ticks: w.hub_ticks,
        rss_max,
        upstream_conns: w.upstream_conns,
        udp_drops: w.udp_drops,
    };
    for o in outs {
        run.lat.extend(o.lat);
        run.errors += o.errors;
        if run.first_error.is_none() {
            run.first_error = o.first_error;
        }
    }
    Ok(run)
}

// ---- statistics --------------------------------------------------------------------

/// p50, p99 and p99.9 in µs (nearest rank).
#[derive(Clone, Copy, Default)]
struct Pct {
    n: usize,
    p50: f64,
    p99: f64,
    p999: f64,
}

impl Pct {
    fn of(lat: &[u64]) -> Pct {
        let mut v = lat.to_vec();
        v.sort_unstable();
        let at = |p: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1] as f64 / 1e3
        };
        Pct {
            n: v.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }

    fn minus(&self, base: &Pct) -> Pct {
        Pct {
            n: self.n,
            p50: self.p50 - base.p50,
            p99: self.p99 - base.p99,
            p999: self.p999 - base.p999,
        }
    }

    fn per(&self, hops: u32) -> Pct {
        let h = f64::from(hops.max(1));
        Pct {
            n: self.n,
            p50: self.p50 / h,
            p99: self.p99 / h,
            p999: self.p999 / h,
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "p50_us": self.p50, "p99_us": self.p99, "p99_9_us": self.p999})
    }
}

/// `a / b`, when `b` is a positive amount.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

// ---- the mesh ------------------------------------------------------------------------

/// The store, and one policy letting the load generator's workload call the
/// bench services (the mesh denies by default).
fn mesh_yaml() -> String {
    format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: bench-callers, namespace: bench}}
spec:
  selector:
    matchLabels: {{tier: bench}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/loadgen"]
    to:
    - operation:
        methods: ["POST"]
        paths: ["/bench"]
"#
    )
}

struct Mesh {
    hub: HubProc,
    a: SpokeProc,
    b: SpokeProc,
    /// Spoke A's outbound listener for the `loadgen` workload.
    outbound: SocketAddr,
}

/// A hub and two spokes at sf01: A holds the caller (`loadgen`) and
/// `echo-local`, B holds `echo-remote`; both services are the upstream.
fn start_mesh(root: &Path, upstream: SocketAddr) -> Result<Mesh> {
    let mut hub = HubProc::init(root, TD);
    let hub_addr = hub.start();
    let f = root.join("mesh.yaml");
    std::fs::write(&f, mesh_yaml())?;
    let o = hub.cli(&["apply", "-f", f.to_str().context("utf8 path")?]);
    ensure!(o.status.success(), "hub apply: {}", text(&o));

    let outbound = free_tcp();
    let (data_a, data_b) = (free_udp(), free_udp());
    let cfg_a = format!(
        r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "loadgen"
namespace = "bench"
outbound = "{outbound}"

[[workload]]
service_account = "echo-local"
service = "echo-local"
namespace = "bench"
labels = {{ app = "echo-local", tier = "bench" }}
inbound = "{upstream}"
"#
    );
    let cfg_b = format!(
        r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "echo-remote"
service = "echo-remote"
namespace = "bench"
labels = {{ app = "echo-remote", tier = "bench" }}
inbound = "{upstream}"
"#
    );
    let mut spokes = Vec::new();
    for (i, cfg) in [cfg_a, cfg_b].iter().enumerate() {
        let name = format!("spoke{i}");
        let path = write_config(root, &name, cfg);
        let id = format!("spiffe://{TD}/store/sf01/node/n{i}");
        let mut s = SpokeProc::new(root, &name, &id).with_args(&["--config", &path]);
        let o = s.enroll(hub_addr, &hub.token(&id, "10m"));
        ensure!(o.status.success(), "enroll {id}: {}", text(&o));
        s.start();
        s.wait_state("connected", Duration::from_secs(20));
        spokes.push(s);
    }
    let b = spokes.pop().context("spoke b")?;
    let a = spokes.pop().context("spoke a")?;
    for s in [&a, &b] {
        s.wait_configured(Duration::from_secs(20))
            .with_context(|| format!("config and SVIDs on {}: {:?}", s.id, s.try_status()))?;
    }
    a.wait_site_service("echo-remote", Duration::from_secs(20))
        .with_context(|| format!("spoke A never saw echo-remote on B: {:?}", a.try_status()))?;
    Ok(Mesh {
        hub,
        a,
        b,
        outbound,
    })
}

// ---- the hyper-only reference -----------------------------------------------------

/// Starts the hyper-only proxy (`pooled` or `affine`) in front of `upstream`;
/// the returned process is killed on drop.
fn start_floor(exe: &Path, upstream: SocketAddr, mode: &str) -> Result<Haproxy> {
    let addr = free_tcp();
    let child = Command::new(exe)
        .arg(addr.to_string())
        .arg(upstream.to_string())
        .arg(mode)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", exe.display()))?;
    let mut h = Haproxy { child, addr };
    match h.wait_listening() {
        Ok(()) => Ok(h),
        Err(e) => bail!("{FLOOR_BIN} {mode} did not come up ({e})"),
    }
}

// ---- haproxy -----------------------------------------------------------------------

/// `haproxy` on PATH (or in /usr/sbin, which a non-root PATH may lack).
fn find_haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// A reference proxy process (haproxy, or the hyper-only one), killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
}

impl Haproxy {
    /// Waits (10 s at most) until the process accepts connections; on
    /// failure it is killed and the error says why.
    fn wait_listening(&mut self) -> Result<(), String> {
        let addr = self.addr;
        let up = wait_for(Duration::from_secs(10), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(Err(format!("exited with {st}")));
            }
            std::net::TcpStream::connect(addr).ok().map(|_| Ok(()))
        });
        let r = up.unwrap_or_else(|| Err(format!("no listener on {addr} within 10 s")));
        if r.is_err() {
            let _ = self.child.kill();
        }
        r
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `haproxy -db` with one frontend on a free port and one server;
/// `bind_tls` / `server_tls` are extra options of the bind and server lines.
fn start_haproxy(
    exe: &Path,
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    bind_tls: &str,
    server_tls: &str,
) -> Result<Haproxy> {
    let addr = free_tcp();
    let cfg = format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option http-keep-alive
    http-reuse always

frontend fe
    bind {addr}{bind_tls}
    default_backend be

backend be
    server s1 {upstream}{server_tls}
"
    );
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, cfg)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawn {}", exe.display()))?;
    let mut h = Haproxy { child, addr };
    match h.wait_listening() {
        Ok(()) => Ok(h),
        Err(e) => {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            bail!("haproxy {name} did not come up ({e}); log:\n{log}")
        }
    }
}

/// A CA, a server certificate for haproxy B and a client certificate for
/// haproxy A (ECDSA P-256, as the spokes' SVIDs), as PEM files in `dir`.
fn write_certs(dir: &Path) -> Result<()> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "tidemesh bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for (file, name, eku) in [
        (
            "server.pem",
            HAPROXY_B_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client.pem",
            "haproxy-a.bench.invalid",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let mut p = CertificateParams::new(vec![name.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &*ca)?;
        std::fs::write(
            dir.join(file),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
    }
    Ok(())
}

fn haproxy_version(exe: &Path) -> String {
    Command::new(exe)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

// ---- scenarios -------------------------------------------------------------------

struct Scenario {
    key: String,
    name: String,
    addr: SocketAddr,
    /// The Host (HTTP/1.1) or authority (HTTP/2) requests name.
    host: &'static str,
    /// Request and response body size.
    body: usize,
    /// The HTTP/1.1 request (unused by HTTP/2 callers).
    req: Arc<[u8]>,
    /// Proxy processes on the path (CPU and RSS are theirs).
    pids: Vec<u32>,
    /// Proxy hops on the path.
    hops: u32,
    /// Client connections (or HTTP/2 stream slots), when not the plan's.
    conns: Option<usize>,
    /// One long-lived HTTP/2 connection instead of HTTP/1.1 connections.
    h2: bool,
    /// Key of the direct scenario its added latency is measured against.
    base: String,
}

#[derive(Default)]
struct Results {
    fixed: Vec<Run>,
    sat: Vec<Run>,
}

impl Results {
    fn pooled(runs: &[Run]) -> Pct {
        let all: Vec<u64> = runs.iter().flat_map(|r| r.lat.iter().copied()).collect();
        Pct::of(&all)
    }
    fn answered(runs: &[Run]) -> u64 {
        runs.iter().map(Run::answered).sum()
    }
    fn errors(runs: &[Run]) -> u64 {
        runs.iter().map(|r| r.errors).sum()
    }
    fn first_error(runs: &[Run]) -> Option<&str> {
        runs.iter().find_map(|r| r.first_error.as_deref())
    }
    /// CPU ms of the proxy processes per 1,000 answered requests.
    fn cpu_per_1k(runs: &[Run], tck: f64) -> Option<f64> {
        let ticks: u64 = runs.iter().map(|r| r.cpu_ticks).sum();
        let n = Self::answered(runs);
        (n > 0).then(|| ticks as f64 / tck * 1e3 / (n as f64 / 1e3))
    }
    fn hub_per_1k(runs: &[Run], tck: f64) -> Option<f64> {
        let ticks: u64 = runs.iter().map(|r| r.hub_ticks).sum();
        let n = Self::answered(runs);
        (n > 0).then(|| ticks as f64 / tck * 1e3 / (n as f64 / 1e3))
    }
    /// Upstream connections opened per 1,000 answered requests.
    fn conns_per_1k(runs: &[Run]) -> f64 {
        let c: u64 = runs.iter().map(|r| r.upstream_conns).sum();
        c as f64 * 1e3 / (Self::answered(runs).max(1) as f64)
    }
    fn udp_drops(runs: &[Run]) -> u64 {
        runs.iter().map(|r| r.udp_drops).sum()
    }
    fn rate(runs: &[Run]) -> f64 {
        let secs: f64 = runs.iter().map(|r| r.secs).sum();
        Self::answered(runs) as f64 / secs.max(1e-9)
    }
    fn rss_max(&self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for r in self.fixed.iter().chain(&self.sat) {
            out.resize(out.len().max(r.rss_max.len()), 0);
            for (o, v) in out.iter_mut().zip(&r.rss_max) {
                *o = (*o).max(*v);
            }
        }
        out
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "n/a".into(),
    }
}

/// One request must be answered 200 with the full body (retried for up to
/// 10 s: a serving spoke may still be receiving its policy). The first
/// cross-spoke request also opens the QUIC connection.
fn check(rt: &tokio::runtime::Runtime, sc: &Scenario) -> Result<()> {
    let started = Instant::now();
    loop {
        let r = rt.block_on(async {
            let mut callers = open_callers(sc, 1).await.map_err(|e| format!("{e:#}"))?;
            match callers.first_mut() {
                Some(c) => c.exchange(sc).await,
                None => Err("no caller".into()),
            }
        });
        match r {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                bail!("{} ({}): check request failed: {e}", sc.name, sc.addr)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

// ---- CPU pinning -------------------------------------------------------------------

/// Parses a CPU list (`0-3`, `0,2,4-5`).
fn parse_cpus(list: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (
            lo.trim()
                .parse()
                .with_context(|| format!("{CPUS_ENV}: bad CPU {lo:?} in {list:?}"))?,
            hi.trim()
                .parse()
                .with_context(|| format!("{CPUS_ENV}: bad CPU {hi:?} in {list:?}"))?,
        );
        ensure!(
            lo <= hi && hi < rustix::thread::CpuSet::MAX_CPU,
            "{CPUS_ENV}: bad CPU range {part:?}"
        );
        out.extend(lo..=hi);
    }
    ensure!(!out.is_empty(), "{CPUS_ENV}: no CPU in {list:?}");
    Ok(out)
}

/// Pins this process (its threads to come, and every child it spawns) to
/// the CPUs of `TIDEMESH_BENCH_CPUS`; returns the list when set.
fn pin_cpus() -> Result<Option<String>> {
    let Ok(list) = std::env::var(CPUS_ENV) else {
        return Ok(None);
    };
    if list.trim().is_empty() {
        return Ok(None);
    }
    let mut set = rustix::thread::CpuSet::new();
    for c in parse_cpus(&list)? {
        set.set(c);
    }
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("{CPUS_ENV}={list}: sched_setaffinity"))?;
    Ok(Some(list.trim().to_owned()))
}

// ---- main ----------------------------------------------------------------------------

fn main() -> Result<()> {
    let quick = std::env::var(QUICK_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let plan = if quick { QUICK } else { FULL };
    // Before any thread or child exists, so all inherit it.
    let pinned = pin_cpus()?;
    // The proxies log at their default level, whatever the caller's shell says.
    std::env::remove_var("RUST_LOG");
    use_release_bins();
    let t_build = Instant::now();
    eprintln!(
        "dataplane bench: building the release binaries (cargo build --release --workspace --bins)"
    );
    let spoke_bin = bin("tidemesh-spoke");
    let build = t_build.elapsed();
    ensure!(
        spoke_bin.is_file(),
        "no release spoke binary at {}",
        spoke_bin.display()
    );

    let t_all = Instant::now();
    let load_start = loadavg();
    let tck = clk_tck();
    let tmp = tempfile::tempdir()?;
    let keep = std::env::var(KEEP_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    let root = tmp.path().to_path_buf();
    let root = root.as_path();

    let upstream = start_upstream()?;
    eprintln!("dataplane bench: upstream on {upstream}; starting hub and spokes");
    let mesh = start_mesh(root, upstream)?;
    let (pid_a, pid_b) = (
        mesh.a.pid().context("spoke A pid")?,
        mesh.b.pid().context("spoke B pid")?,
    );
    let hub_pid = mesh.hub.pid();
    let mesh_pids: Vec<u32> = [Some(pid_a), Some(pid_b), hub_pid]
        .into_iter()
        .flatten()
        .collect();

    let haproxy_exe = find_haproxy();
    let mut haproxies = Vec::new();
    let mut haproxy_note = String::new();
    if let Some(exe) = &haproxy_exe {
        write_certs(root)?;
        let d = root.display();
        let one = start_haproxy(exe, root, "haproxy-one", upstream, "", "")?;
        let b = start_haproxy(
            exe,
            root,
            "haproxy-b",
            upstream,
            &format!(
                " ssl crt {d}/server.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3"
            ),
            "",
        )?;
        let a = start_haproxy(
            exe,
            root,
            "haproxy-a",
            b.addr,
            "",
            &format!(
                " ssl crt {d}/client.pem ca-file {d}/ca.pem verify required verifyhost {HAPROXY_B_NAME} ssl-min-ver TLSv1.3"
            ),
        )?;
        // h2c from the caller (prior knowledge), HTTP/1.1 to the upstream
        let h2 = start_haproxy(exe, root, "haproxy-h2", upstream, " proto h2", "")?;
        haproxies = vec![one, a, b, h2];
        haproxy_note = haproxy_version(exe);
    } else {
        eprintln!("dataplane bench: haproxy not found on PATH (apt-get install haproxy): haproxy scenarios skipped");
    }

    // idle RSS, after start-up settles and before any traffic; idle CPU
    // over the settle window
    let idle_pids = [Some(pid_a), Some(pid_b), hub_pid];
    let idle_t0 = Instant::now();
    let idle_ticks0: Vec<u64> = idle_pids
        .iter()
        .map(|p| p.and_then(cpu_ticks).unwrap_or(0))
        .collect();
    std::thread::sleep(plan.settle);
    let idle_secs = idle_t0.elapsed().as_secs_f64();
    // CPU ms per second, idle: spoke A, spoke B, hub
    let idle_cpu: Vec<f64> = idle_pids
        .iter()
        .zip(&idle_ticks0)
        .map(|(p, t0)| {
            let t1 = p.and_then(cpu_ticks).unwrap_or(0);
            t1.saturating_sub(*t0) as f64 / tck * 1e3 / idle_secs
        })
        .collect();
    let idle_a = status_kib(pid_a, "VmRSS").unwrap_or(0);
    let idle_b = status_kib(pid_b, "VmRSS").unwrap_or(0);
    let idle_haproxy: Vec<u64> = haproxies
        .iter()
        .map(|h| status_kib(h.child.id(), "VmRSS").unwrap_or(0))
        .collect();

    // (key, name, entry, host, proxy pids, hops)
    type Base<'a> = (&'a str, &'a str, SocketAddr, &'static str, Vec<u32>, u32);
    let mut bases: Vec<Base> = vec![
        (
            "direct",
            "direct (client -> upstream)",
            upstream,
            "upstream.bench",
            vec![],
            0,
        ),
        (
            "spoke_one_hop",
            "spoke, one hop (local workload)",
            mesh.outbound,
            "echo-local.bench",
            vec![pid_a],
            1,
        ),
        (
            "spoke_two_hops",
            "two spokes (QUIC mTLS hop)",
            mesh.outbound,
            "echo-remote.bench",
            vec![pid_a, pid_b],
            2,
        ),
    ];
    if let [one, a, b, _] = haproxies.as_slice() {
        bases.push((
            "haproxy_one_hop",
            "haproxy, one hop (plain HTTP)",
            one.addr,
            "upstream.bench",
            vec![one.child.id()],
            1,
        ));
        bases.push((
            "haproxy_tls_pair",
            "haproxy pair (TLS 1.3 mTLS hop)",
            a.addr,
            "upstream.bench",
            vec![a.child.id(), b.child.id()],
            2,
        ));
    }
    let mut scenarios = Vec::new();
    // (key suffix, name suffix, body, connections): the main rows, then
    // bigger bodies and many connections
    for (suffix, label, body, conns) in [
        ("", "", BODY, None),
        ("_4k", ", 4 KiB", 4 * 1024, None),
        ("_64k", ", 64 KiB", 64 * 1024, None),
        ("_c256", ", 256 conns", BODY, Some(MANY_CONNS)),
    ] {
        for (key, name, addr, host, pids, hops) in &bases {
            scenarios.push(Scenario {
                key: format!("{key}{suffix}"),
                name: format!("{name}{label}"),
                addr: *addr,
                host,
                body,
                req: request(host, body),
                pids: pids.clone(),
                hops: *hops,
                conns,
                h2: false,
                base: format!("direct{suffix}"),
            });
        }
    }
    // One long-lived HTTP/2 connection carrying every caller's requests
    // (the upstream speaks HTTP/1.1 only: added latency is against direct).
    for (key, name, addr, host, pids, hops) in &bases {
        let addr = match *key {
            "spoke_one_hop" | "spoke_two_hops" => *addr,
            "haproxy_one_hop" => match haproxies.as_slice() {
                [_, _, _, h2] => h2.addr,
                _ => continue,
            },
            _ => continue,
        };
        let pids = if *key == "haproxy_one_hop" {
            haproxies
                .get(3)
                .map(|h| vec![h.child.id()])
                .unwrap_or_default()
        } else {
            pids.clone()
        };
        scenarios.push(Scenario {
            key: format!("{key}_h2"),
            name: format!("{name}, HTTP/2 caller"),
            addr,
            host,
            body: BODY,
            req: request(host, BODY),
            pids,
            hops: *hops,
            conns: None,
            h2: true,
            base: "direct".into(),
        });
    }

    // The HTTP stack alone: hyper proxies with nothing of the spoke's work.
    let floor_exe = bin(FLOOR_BIN);
    let mut floors = Vec::new();
    for (key, name, mode) in [
        ("hyper_floor_pooled", "hyper only, pooled client", "pooled"),
        ("hyper_floor_affine", "hyper only, conn per conn", "affine"),
    ] {
        let f = start_floor(&floor_exe, upstream, mode)?;
        scenarios.push(Scenario {
            key: key.into(),
            name: name.into(),
            addr: f.addr,
            host: "upstream.bench",
            body: BODY,
            req: request("upstream.bench", BODY),
            pids: vec![f.child.id()],
            hops: 1,
            conns: None,
            h2: false,
            base: "direct".into(),
        });
        floors.push(f);
    }
    if let Ok(only) = std::env::var(ONLY_ENV) {
        let mut wanted: Vec<String> = only.split(',').map(|k| k.trim().to_owned()).collect();
        for sc in &scenarios {
            if wanted.contains(&sc.key) && !wanted.contains(&sc.base) {
                wanted.push(sc.base.clone());
            }
        }
        scenarios.retain(|s| wanted.contains(&s.key));
    }
    let scenarios: Vec<Arc<Scenario>> = scenarios.into_iter().map(Arc::new).collect();
    // The load generator: one thread for every connection.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for sc in &scenarios {
        check(&rt, sc)?;
    }
    let counters_start = kernel_counters();
    // per process: spoke A, spoke B, hub
    let drops_start: Vec<u64> = mesh_pids.iter().map(|&p| udp_drops(&[p])).collect();

    let mut results: Vec<Results> = scenarios.iter().map(|_| Results::default()).collect();
    let n = scenarios.len();
    for (mode, label) in [
        (Mode::Fixed, "fixed rate"),
        (Mode::Saturation, "saturation"),
    ] {
        for round in 0..plan.rounds {
            eprintln!(
                "dataplane bench: {label}, round {}/{}",
                round + 1,
                plan.rounds
            );
            for k in 0..n {
                let i = (k + round) % n;
                let run = measure(&rt, &scenarios[i], mode, &plan, hub_pid, &mesh_pids)?;
                match mode {
                    Mode::Fixed => results[i].fixed.push(run),
                    Mode::Saturation => results[i].sat.push(run),
                }
                std::thread::sleep(plan.pause);
            }
        }
    }

    std::thread::sleep(plan.settle);
    let after_a = status_kib(pid_a, "VmRSS").unwrap_or(0);
    let after_b = status_kib(pid_b, "VmRSS").unwrap_or(0);
    let hwm_a = status_kib(pid_a, "VmHWM").unwrap_or(0);
    let hwm_b = status_kib(pid_b, "VmHWM").unwrap_or(0);
    let haproxy_after: Vec<(u64, u64)> = haproxies
        .iter()
        .map(|h| {
            (
                status_kib(h.child.id(), "VmRSS").unwrap_or(0),
                status_kib(h.child.id(), "VmHWM").unwrap_or(0),
            )
        })
        .collect();
    let counters_end = kernel_counters();
    let total = t_all.elapsed();

    // ---- figures ----
    let idx = |key: &str| scenarios.iter().position(|s| s.key == key);
    // each scenario's direct run (same body and connections)
    let base: Vec<usize> = scenarios
        .iter()
        .map(|s| idx(&s.base).unwrap_or(0))
        .collect();
    let fixed_pct: Vec<Pct> = results.iter().map(|r| Results::pooled(&r.fixed)).collect();
    let sat_pct: Vec<Pct> = results.iter().map(|r| Results::pooled(&r.sat)).collect();
    let added: Vec<Pct> = fixed_pct
        .iter()
        .zip(&base)
        .map(|(p, &b)| p.minus(&fixed_pct[b]))
        .collect();
    let per_hop: Vec<Pct> = added
        .iter()
        .zip(&scenarios)
        .map(|(a, s)| a.per(s.hops))
        .collect();
    // per-round added latency (scenario minus direct of the same round)
    let round_added = |i: usize, round: usize| -> Pct {
        Pct::of(&results[i].fixed[round].lat).minus(&Pct::of(&results[base[i]].fixed[round].lat))
    };

    let m = machine();
    println!();
    common::print_header(
        "tidemesh data plane bench",
        quick.then_some("QUICK smoke pass: TIDEMESH_BENCH_QUICK set or no --bench; not figures"),
        COMMAND,
        &m,
    );
    println!(
        "  load average at start: {load_start}, at end: {}",
        m["loadavg"].as_str().unwrap_or("")
    );
    println!(
        "  plan: POST {BODY} B -> 200 with {BODY} B, HTTP/1.1 keep-alive on loopback; fixed rate {:.0} req/s over {} connections, {} rounds x {:.1} s; saturation {} connections, {} rounds x {:.1} s; runs interleaved, order rotating per round",
        plan.rate, plan.fixed_conns, plan.rounds, plan.fixed_secs, plan.sat_conns, plan.rounds, plan.sat_secs
    );
    println!(
        "  extra rows: 4 KiB and 64 KiB bodies (both ways); {MANY_CONNS} client connections (same rate); one long-lived HTTP/2 (h2c) connection carrying every caller's requests; each against direct with the same body and connections"
    );
    println!(
        "  CPUs: {}",
        match &pinned {
            Some(list) => format!("whole bench pinned to {list} ({CPUS_ENV})"),
            None => format!("not pinned (set {CPUS_ENV}=0-1 to pin)"),
        }
    );
    println!(
        "  sharing the cores: load generator 1 thread, upstream 1 thread, each spoke 1 tokio worker per core (+ hub), haproxy nbthread 1; all on {} cores",
        m["nproc"]
    );
    println!(
        "  haproxy: {}",
        if haproxy_exe.is_some() {
            format!("{haproxy_note} (keep-alive, http-reuse always; TLS hop: TLS 1.3, client certificate verified)")
        } else {
            "not found on PATH: haproxy scenarios and ratios skipped (apt-get install haproxy)"
                .into()
        }
    );
    println!(
        "  release binaries built in {:.1} s; bench wall time after the build {:.1} s",
        build.as_secs_f64(),
        total.as_secs_f64()
    );
    println!();
    println!(
        "fixed rate, {:.0} req/s (latency in us; + = minus direct at the same percentile; CPU = proxy processes)",
        plan.rate
    );
    println!(
        "  {:<44} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7} {:>5} {:>6}",
        "scenario",
        "n",
        "p50",
        "p99",
        "p99.9",
        "+p50",
        "+p99",
        "+p99.9",
        "CPU ms/1k",
        "up c/1k",
        "UDPd",
        "errors"
    );
    for (i, sc) in scenarios.iter().enumerate() {
        let p = &fixed_pct[i];
        let a = &added[i];
        let (ap50, ap99, ap999) = if i == 0 {
            ("-".into(), "-".into(), "-".into())
        } else {
            (
                format!("{:.0}", a.p50),
                format!("{:.0}", a.p99),
                format!("{:.0}", a.p999),
            )
        };
        println!(
            "  {:<44} {:>6} {:>7.0} {:>7.0} {:>7.0} {:>7} {:>7} {:>7} {:>9} {:>7.0} {:>5} {:>6}",
            sc.name,
            p.n,
            p.p50,
            p.p99,
            p.p999,
            ap50,
            ap99,
            ap999,
            if sc.pids.is_empty() {
                "-".into()
            } else {
                fmt_opt(Results::cpu_per_1k(&results[i].fixed, tck), 1)
            },
            Results::conns_per_1k(&results[i].fixed),
            Results::udp_drops(&results[i].fixed),
            Results::errors(&results[i].fixed)
        );
    }
    println!();
    println!(
        "saturation, {} closed-loop connections (latency in us)",
        plan.sat_conns
    );
    println!(
        "  {:<44} {:>8} {:>7} {:>7} {:>7} {:>9} {:>7} {:>5} {:>6}",
        "scenario", "req/s", "p50", "p99", "p99.9", "CPU ms/1k", "up c/1k", "UDPd", "errors"
    );
    for (i, sc) in scenarios.iter().enumerate() {
        let p = &sat_pct[i];
        println!(
            "  {:<44} {:>8.0} {:>7.0} {:>7.0} {:>7.0} {:>9} {:>7.0} {:>5} {:>6}",
            sc.name,
            Results::rate(&results[i].sat),
            p.p50,
            p.p99,
            p.p999,
            if sc.pids.is_empty() {
                "-".into()
            } else {
                fmt_opt(Results::cpu_per_1k(&results[i].sat, tck), 1)
            },
            Results::conns_per_1k(&results[i].sat),
            Results::udp_drops(&results[i].sat),
            Results::errors(&results[i].sat)
        );
    }
    println!("  CPU ms/1k: CPU time of the proxy processes on the path per 1,000 answered requests; up c/1k: connections the upstream accepted per 1,000 requests; UDPd: UDP datagrams the kernel dropped on the hub's and spokes' sockets during the runs");
    for (i, sc) in scenarios.iter().enumerate() {
        let runs: Vec<&Run> = results[i].fixed.iter().chain(&results[i].sat).collect();
        if let Some(e) = runs.iter().find_map(|r| r.first_error.as_deref()) {
            println!("  first error, {}: {e}", sc.name);
        }
    }
    println!(
        "  idle CPU before any traffic, ms per s: spoke A {:.1}, spoke B {:.1}, hub {:.1} (clock tick {:.0} ms)",
        idle_cpu[0],
        idle_cpu[1],
        idle_cpu[2],
        1e3 / tck
    );
    println!(
        "  hub CPU per 1k requests (evidence ingest, off the request path): one spoke {} ms, two spokes {} ms (fixed rate)",
        idx("spoke_one_hop")
            .map(|i| fmt_opt(Results::hub_per_1k(&results[i].fixed, tck), 1))
            .unwrap_or_default(),
        idx("spoke_two_hops")
            .map(|i| fmt_opt(Results::hub_per_1k(&results[i].fixed, tck), 1))
            .unwrap_or_default(),
    );

    println!();
    println!("ratios, spoke vs haproxy (same run; lower is better unless noted)");
    let mut ratios = serde_json::Map::new();
    // (key, label, ours, theirs, is it a goal)
    let mut pairs: Vec<(String, String, String, String, bool)> = Vec::new();
    for (suffix, what) in [
        ("", ""),
        ("_4k", ", 4 KiB"),
        ("_64k", ", 64 KiB"),
        ("_c256", ", 256 conns"),
        ("_h2", ", HTTP/2 caller"),
    ] {
        pairs.push((
            format!("one_hop{suffix}"),
            format!("one hop{what}: spoke / haproxy"),
            format!("spoke_one_hop{suffix}"),
            format!("haproxy_one_hop{suffix}"),
            suffix.is_empty(),
        ));
        if suffix != "_h2" {
            pairs.push((
                format!("tls_hop{suffix}"),
                format!("per hop over mTLS{what}: two spokes / haproxy pair"),
                format!("spoke_two_hops{suffix}"),
                format!("haproxy_tls_pair{suffix}"),
                suffix.is_empty(),
            ));
        }
    }
    // References, not goals: what hyper alone adds, on the same scale.
    for (key, label) in [
        (
            "hyper_floor_pooled",
            "one hop: hyper only, pooled / haproxy",
        ),
        (
            "hyper_floor_affine",
            "one hop: hyper only, affine / haproxy",
        ),
    ] {
        pairs.push((
            key.into(),
            label.into(),
            key.into(),
            "haproxy_one_hop".into(),
            false,
        ));
    }
    for (key, label, ours, theirs, is_goal) in pairs {
        let (Some(o), Some(t)) = (idx(&ours), idx(&theirs)) else {
            if is_goal {
                println!("  {label}: skipped (scenario not run)");
            }
            continue;
        };
        let round_ratio = |f: fn(&Pct) -> f64| -> (Option<f64>, f64, f64) {
            let v: Vec<f64> = (0..plan.rounds)
                .filter_map(|r| ratio(f(&round_added(o, r)), f(&round_added(t, r))))
                .collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (median(v), lo, hi)
        };
        let mut obj = serde_json::Map::new();
        for (pname, f, goal) in [
            ("p50", (|p: &Pct| p.p50) as fn(&Pct) -> f64, true),
            ("p99", |p: &Pct| p.p99, true),
            ("p99.9", |p: &Pct| p.p999, false),
        ] {
            let r = ratio(f(&per_hop[o]), f(&per_hop[t]));
            let (med, lo, hi) = round_ratio(f);
            println!(
                "  {:<46} {:>7}  (added per hop {:.0} vs {:.0} us; per round median {} [{}..{}]){}",
                format!("{label}, added {pname} per hop"),
                fmt_opt(r, 2),
                f(&per_hop[o]),
                f(&per_hop[t]),
                fmt_opt(med, 2),
                fmt_opt(Some(lo), 2),
                fmt_opt(Some(hi), 2),
                if goal && is_goal {
                    "  [goal <= 1.0]"
                } else {
                    ""
                }
            );
            obj.insert(
                format!("added_{}_per_hop", pname.replace('.', "_")),
                json!({"ratio": r, "spoke_us": f(&per_hop[o]), "haproxy_us": f(&per_hop[t]), "round_median": med}),
            );
        }
        let rps = ratio(
            Results::rate(&results[o].sat),
            Results::rate(&results[t].sat),
        );
        println!(
            "  {:<46} {:>7}  ({:.0} vs {:.0} req/s; higher is better)",
            format!("{label}, req/s at saturation"),
            fmt_opt(rps, 2),
            Results::rate(&results[o].sat),
            Results::rate(&results[t].sat)
        );
        let cpu = ratio(
            Results::cpu_per_1k(&results[o].fixed, tck).unwrap_or(f64::NAN),
            Results::cpu_per_1k(&results[t].fixed, tck).unwrap_or(f64::NAN),
        );
        let cpu_sat = ratio(
            Results::cpu_per_1k(&results[o].sat, tck).unwrap_or(f64::NAN),
            Results::cpu_per_1k(&results[t].sat, tck).unwrap_or(f64::NAN),
        );
        println!(
            "  {:<46} {:>7}  (at saturation {})",
            format!("{label}, CPU per 1k requests (fixed rate)"),
            fmt_opt(cpu, 2),
            fmt_opt(cpu_sat, 2)
        );
        obj.insert("rps_saturation".into(), json!(rps));
        obj.insert("cpu_per_1k_fixed".into(), json!(cpu));
        obj.insert("cpu_per_1k_saturation".into(), json!(cpu_sat));
        ratios.insert(key, Value::Object(obj));
    }
    if let (Some(one), Some(two)) = (idx("spoke_one_hop"), idx("spoke_two_hops")) {
        println!(
            "  {:<46} {:>7.0} / {:.0} us  (two spokes over QUIC minus one local hop: the tunnel and B)",
            "two spokes - one spoke, p50 / p99",
            fixed_pct[two].p50 - fixed_pct[one].p50,
            fixed_pct[two].p99 - fixed_pct[one].p99
        );
    }

    println!();
    println!("memory, VmRSS in MiB");
    println!(
        "  {:<44} {:>7} {:>11} {:>10} {:>7}",
        "process", "idle", "under load", "after load", "VmHWM"
    );
    // the highest VmRSS sample of a process over every scenario it served
    let rss_under = |pid: u32| -> u64 {
        scenarios
            .iter()
            .zip(&results)
            .filter_map(|(sc, r)| {
                let pos = sc.pids.iter().position(|&p| p == pid)?;
                r.rss_max().get(pos).copied()
            })
            .max()
            .unwrap_or(0)
    };
    let load_a = rss_under(pid_a);
    let load_b = rss_under(pid_b);
    for (name, idle, under, after, hwm) in [
        ("spoke A (caller side)", idle_a, load_a, after_a, hwm_a),
        ("spoke B (serving side)", idle_b, load_b, after_b, hwm_b),
    ] {
        println!(
            "  {:<44} {:>7.1} {:>11.1} {:>10.1} {:>7.1}",
            name,
            mib(idle),
            mib(under),
            mib(after),
            mib(hwm)
        );
    }
    let hap_names = [
        "haproxy one hop",
        "haproxy A (TLS out)",
        "haproxy B (TLS in)",
        "haproxy one hop, h2c in",
    ];
    let hap_under = |i: usize| -> u64 {
        haproxies
            .get(i)
            .map(|h| rss_under(h.child.id()))
            .unwrap_or(0)
    };
    for (i, ((idle, (after, hwm)), name)) in idle_haproxy
        .iter()
        .zip(&haproxy_after)
        .zip(hap_names)
        .enumerate()
    {
        println!(
            "  {:<44} {:>7.1} {:>11.1} {:>10.1} {:>7.1}",
            name,
            mib(*idle),
            mib(hap_under(i)),
            mib(*after),
            mib(*hwm)
        );
    }
    let idle_max = idle_a.max(idle_b);
    println!(
        "  {:<46} {:>7.2}  (largest idle spoke {:.1} MiB vs {:.0} MiB)  [goal <= 1.0]",
        "spoke idle RSS / goal",
        mib(idle_max) / IDLE_RSS_GOAL_MIB,
        mib(idle_max),
        IDLE_RSS_GOAL_MIB
    );

    println!();
    let deltas: BTreeMap<String, i64> = counters_end
        .iter()
        .map(|(k, v)| (k.clone(), v - counters_start.get(k).copied().unwrap_or(0)))
        .collect();
    println!(
        "  kernel counters over the run: {}",
        deltas
            .iter()
            .map(|(k, v)| format!("{k} +{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let drops: Vec<u64> = mesh_pids
        .iter()
        .zip(&drops_start)
        .map(|(&p, d0)| udp_drops(&[p]).saturating_sub(*d0))
        .collect();
    println!(
        "  UDP datagrams dropped on receive over the measured runs, by process: spoke A {}, spoke B {}, hub {}",
        drops.first().copied().unwrap_or(0),
        drops.get(1).copied().unwrap_or(0),
        drops.get(2).copied().unwrap_or(0)
    );
    println!(
        "  temp dir (spoke logs, haproxy configs): {}{}",
        root.display(),
        if keep {
            " (kept)"
        } else {
            " (removed; set TIDEMESH_BENCH_KEEP=1 to keep it)"
        }
    );
    println!();

    let per_scenario: Vec<Value> = scenarios
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            json!({
                "scenario": sc.key,
                "hops": sc.hops,
                "fixed": fixed_pct[i].json(),
                "fixed_added": added[i].json(),
                "fixed_added_per_hop": per_hop[i].json(),
                "fixed_errors": Results::errors(&results[i].fixed),
                "fixed_cpu_ms_per_1k": Results::cpu_per_1k(&results[i].fixed, tck).filter(|_| !sc.pids.is_empty()),
                "saturation": sat_pct[i].json(),
                "saturation_rps": Results::rate(&results[i].sat),
                "saturation_errors": Results::errors(&results[i].sat),
                "saturation_cpu_ms_per_1k": Results::cpu_per_1k(&results[i].sat, tck).filter(|_| !sc.pids.is_empty()),
                "first_error": Results::first_error(&results[i].fixed).or(Results::first_error(&results[i].sat)),
                "answered": Results::answered(&results[i].fixed) + Results::answered(&results[i].sat),
                "fixed_upstream_conns_per_1k": Results::conns_per_1k(&results[i].fixed),
                "saturation_upstream_conns_per_1k": Results::conns_per_1k(&results[i].sat),
                "fixed_udp_drops": Results::udp_drops(&results[i].fixed),
                "saturation_udp_drops": Results::udp_drops(&results[i].sat),
            })
        })
        .collect();
    let out = json!({
        "bench": "tidemesh-dataplane",
        "quick": quick,
        "command": COMMAND,
        "machine": m,
        "loadavg_start": load_start,
        "total_s": total.as_secs_f64(),
        "haproxy": haproxy_exe.as_ref().map(|_| haproxy_note.clone()),
        "plan": {"rate": plan.rate, "fixed_conns": plan.fixed_conns, "fixed_secs": plan.fixed_secs,
                 "sat_conns": plan.sat_conns, "sat_secs": plan.sat_secs, "rounds": plan.rounds, "body": BODY,
                 "bodies": BODIES, "many_conns": MANY_CONNS},
        "cpus": pinned,
        "scenarios": per_scenario,
        "ratios": ratios,
        "rss_kib": {
            "spoke_a": {"idle": idle_a, "under_load": load_a, "after_load": after_a, "hwm": hwm_a},
            "spoke_b": {"idle": idle_b, "under_load": load_b, "after_load": after_b, "hwm": hwm_b},
            "idle_goal_mib": IDLE_RSS_GOAL_MIB,
        },
        "kernel_counters": deltas,
        "udp_drops_by_process": {"spoke_a": drops.first(), "spoke_b": drops.get(1), "hub": drops.get(2)},
        "idle_cpu_ms_per_s": {"spoke_a": idle_cpu[0], "spoke_b": idle_cpu[1], "hub": idle_cpu[2]},
    });
    println!("{out}");
    drop(haproxies);
    drop(mesh);
    if keep {
        let _ = tmp.keep();
    }
    Ok(())
}
