//! The drill harness: starts the real `tidemesh-hub` and `tidemesh-spoke`
//! binaries as processes on loopback, drives their command lines, and waits
//! for what they report. End-to-end tests under `tests/tests/` use it.
//!
//! Binaries are built once per test run with `cargo build --workspace
//! --bins` (a no-op when they are fresh), so `cargo test --workspace` alone
//! is enough.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod turmoil_quic;

/// Plain HTTP/1.1 on std sockets for end-to-end tests: an echo workload and
/// an app's call through its spoke's outbound listener.
pub mod http {
    use std::{
        collections::BTreeMap,
        io::{Read, Write},
        net::{SocketAddr, TcpListener, TcpStream},
        time::Duration,
    };

    use serde_json::Value;

    /// A workload: answers every request with 200 and a JSON body of what it
    /// received (method, path, headers with lowercase names).
    pub fn echo_server(name: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let Some((head, body)) = read_message(&mut c) else {
                        return;
                    };
                    let mut lines = head.split("\r\n");
                    let start: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
                    let headers: BTreeMap<String, String> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let out = serde_json::json!({
                        "server": name,
                        "method": start.first(),
                        "path": start.get(1),
                        "headers": headers,
                        "body_len": body.len(),
                    })
                    .to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                        out.len()
                    );
                    let _ = c.write_all(resp.as_bytes());
                });
            }
        });
        addr
    }

    /// What a [`Faulty`] workload does and saw.
    #[derive(Debug, Default)]
    pub struct FaultyState {
        /// Answer 503 to this many of every 20 requests (by arrival).
        pub fail_of_20: u64,
        /// Answer 503 to the next this many requests.
        pub fail_next: u64,
        /// Requests answered.
        pub hits: u64,
        /// Requests answered 503.
        pub failed: u64,
        /// The `traceparent` of every request (empty when absent).
        pub traceparents: Vec<String>,
    }

    /// A workload whose failures the test controls: 503 to a share of
    /// requests, or to the next few; it remembers what it saw.
    #[derive(Clone)]
    pub struct Faulty {
        /// Where it listens.
        pub addr: SocketAddr,
        /// Its state.
        pub state: std::sync::Arc<std::sync::Mutex<FaultyState>>,
    }

    impl Faulty {
        /// Starts one answering `name` in its JSON body.
        pub fn start(name: &'static str) -> Faulty {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let state = std::sync::Arc::new(std::sync::Mutex::new(FaultyState::default()));
            let st = state.clone();
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(mut c) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                        let Some((head, _)) = read_message(&mut c) else {
                            return;
                        };
                        let tp = head
                            .split("\r\n")
                            .filter_map(|l| l.split_once(':'))
                            .find(|(k, _)| k.trim().eq_ignore_ascii_case("traceparent"))
                            .map(|(_, v)| v.trim().to_owned())
                            .unwrap_or_default();
                        let fail = {
                            let mut s = st.lock().expect("state");
                            let n = s.hits;
                            s.hits += 1;
                            s.traceparents.push(tp);
                            let fail = if s.fail_next > 0 {
                                s.fail_next -= 1;
                                true
                            } else {
                                n % 20 < s.fail_of_20
                            };
                            s.failed += u64::from(fail);
                            fail
                        };
                        let (code, text) = if fail {
                            (503, "Service Unavailable")
                        } else {
                            (200, "OK")
                        };
                        let out = format!("{{\"server\":\"{name}\"}}");
                        let resp = format!(
                            "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                            out.len()
                        );
                        let _ = c.write_all(resp.as_bytes());
                    });
                }
            });
            Faulty { addr, state }
        }

        /// Runs `f` on the state.
        pub fn with<T>(&self, f: impl FnOnce(&mut FaultyState) -> T) -> T {
            f(&mut self.state.lock().expect("state"))
        }
    }

    /// Reads one HTTP/1.1 message (head and a Content-Length body).
    pub fn read_message(c: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = c.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let len: usize = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let n = c.read(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some((head, body))
    }

    /// An app's answer.
    #[derive(Debug)]
    pub struct Reply {
        /// The status code (0: no status line).
        pub status: u16,
        /// Headers, names lowercase.
        pub headers: BTreeMap<String, String>,
        /// The body as text.
        pub body: String,
    }

    impl Reply {
        /// The echo server's JSON, when the request reached it.
        pub fn echo(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or(Value::Null)
        }
        /// A header the echo server received.
        pub fn upstream_header(&self, name: &str) -> Option<String> {
            self.echo()["headers"][name].as_str().map(str::to_owned)
        }
    }

    /// An app's call: one raw HTTP/1.1 request to its spoke's outbound
    /// listener. No answer within 15 s (or a connection closed without
    /// one, or no listener yet: a spoke just restarted) is a reply with
    /// status 0 (the body says why), so a `wait_for` loop tries again.
    pub fn call(
        outbound: SocketAddr,
        method: &str,
        host: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut c = match TcpStream::connect(outbound) {
            Ok(c) => c,
            Err(e) => {
                return Reply {
                    status: 0,
                    headers: BTreeMap::new(),
                    body: format!("connect to the outbound listener {outbound}: {e}"),
                }
            }
        };
        c.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = if method == "POST" {
            "{\"amount\":12}"
        } else {
            ""
        };
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        c.write_all(req.as_bytes()).expect("send");
        let Some((head, body)) = read_message(&mut c) else {
            return Reply {
                status: 0,
                headers: BTreeMap::new(),
                body: String::new(),
            };
        };
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).to_string(),
        }
    }
}

/// Whether [`bin`] builds and returns release binaries (see [`use_release_bins`]).
static RELEASE_BINS: AtomicBool = AtomicBool::new(false);

/// Makes [`bin`] build the binaries with `--release` and return those from
/// `target/release`: for benches, whose figures mean nothing on debug
/// builds. Call it before the first [`bin`]; tests do not call it.
pub fn use_release_bins() {
    RELEASE_BINS.store(true, Ordering::SeqCst);
}

/// Path of a workspace binary, building the binaries on first use.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/debug/deps/<test-exe> -> target/debug
        let exe = std::env::current_exe().expect("test executable path");
        let mut dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let mut args = vec!["build", "--workspace", "--bins", "--quiet"];
        if RELEASE_BINS.load(Ordering::SeqCst) {
            args.push("--release");
            dir = dir.parent().expect("target dir").join("release");
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo {} failed", args.join(" "));
        dir
    });
    dir.join(name)
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion, with stdin closed.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn command")
}

/// The trust domain of the end-to-end tests.
pub const TD: &str = "edge.example";

pub mod mesh;
pub mod nats;

/// The Store document of store sf01 (region us-west-2, zone us-west-2a),
/// which the data-plane tests and bench apply first.
pub const STORE_SF01: &str = "apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf01}
spec: {region: us-west-2, zone: us-west-2a}";

/// Output as text (stdout then stderr), for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A free TCP port on loopback (bound and released: a tiny race, fine here).
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free tcp port")
}

/// A free UDP port on loopback (bound and released, as [`free_tcp`]).
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free udp port")
}

/// Writes a spoke config file `dir/<name>.toml`; its path, for `--config`.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("write config");
    p.to_str().expect("utf8").to_owned()
}

/// Starts a child whose stdout's first line is `listening=ADDR`; returns the
/// child and the address. Logs go to `log`.
fn spawn_listening(mut cmd: Command, log: &Path) -> (Child, SocketAddr) {
    let log = std::fs::File::create(log).expect("log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    let addr = line
        .trim()
        .strip_prefix("listening=")
        .unwrap_or_else(|| panic!("expected listening=ADDR, got {line:?}"))
        .parse()
        .expect("address");
    (child, addr)
}

/// Kills a child with SIGKILL and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGTERM and waits up to 5 s, then SIGKILL.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    if wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten()).is_none() {
        kill(child);
    }
}

/// A hub process and its data directory.
pub struct HubProc {
    /// Data directory.
    pub dir: PathBuf,
    /// The trust domain.
    pub td: String,
    /// Where it listens (fixed after the first start, so restarts reuse it).
    pub addr: Option<SocketAddr>,
    child: Option<Child>,
    extra: Vec<String>,
    wrap: Vec<String>,
    /// Environment of `serve` and the admin subcommands: `Some` sets a
    /// variable, `None` removes it.
    env: Vec<(String, Option<String>)>,
}

/// A command, optionally run through a wrapper such as
/// `ip netns exec NS` (the first element is the program).
fn command(wrap: &[String], program: PathBuf) -> Command {
    match wrap.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
    }
}

impl HubProc {
    /// `tidemesh-hub init` in `root/hub`.
    pub fn init(root: &Path, td: &str) -> HubProc {
        Self::init_with(root, td, &[])
    }

    /// [`HubProc::init`] with extra `init` flags (e.g. `--store URL`).
    pub fn init_with(root: &Path, td: &str, args: &[&str]) -> HubProc {
        let dir = root.join("hub");
        let o = run(Command::new(bin("tidemesh-hub"))
            .args([
                "init",
                "--data-dir",
                dir.to_str().expect("utf8 path"),
                "--trust-domain",
                td,
            ])
            .args(args));
        assert!(o.status.success(), "hub init failed: {}", text(&o));
        HubProc::at(dir, td)
    }

    /// A hub data directory made some other way (a replica's, after
    /// `init --join`), not started yet.
    pub fn at(dir: PathBuf, td: &str) -> HubProc {
        HubProc {
            dir,
            td: td.into(),
            addr: None,
            child: None,
            extra: Vec::new(),
            wrap: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Runs `serve` through a wrapper (e.g. `["ip", "netns", "exec", "NS"]`)
    /// and on a fixed listen address.
    pub fn wrapped(mut self, wrap: &[&str], listen: SocketAddr) -> HubProc {
        self.wrap = wrap.iter().map(|s| s.to_string()).collect();
        self.addr = Some(listen);
        self
    }

    /// Extra `serve` flags for every (re)start.
    pub fn with_args(mut self, args: &[&str]) -> HubProc {
        self.extra = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The environment of the next starts and admin subcommands: each
    /// variable set (`Some`) or removed (`None`), replacing earlier calls'
    /// settings of the same names.
    pub fn set_env(&mut self, vars: &[(&str, Option<&str>)]) {
        for (k, v) in vars {
            self.env.retain(|(n, _)| n != k);
            self.env.push((k.to_string(), v.map(str::to_owned)));
        }
    }

    fn apply_env(&self, cmd: &mut Command) {
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    }

    /// Starts `serve` (on the previous address after the first start).
    pub fn start(&mut self) -> SocketAddr {
        assert!(self.child.is_none(), "hub already running");
        let listen = self
            .addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let mut cmd = command(&self.wrap, bin("tidemesh-hub"));
        cmd.args(["serve", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &listen])
            .args(&self.extra);
        self.apply_env(&mut cmd);
        let log = self.dir.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let (child, addr) = spawn_listening(cmd, &log);
        self.child = Some(child);
        self.addr = Some(addr);
        // The admin socket comes up right after the QUIC endpoint.
        wait_for(Duration::from_secs(10), || {
            self.dir.join("admin.sock").exists().then_some(())
        })
        .expect("hub admin socket");
        addr
    }

    /// Everything the hub logged, over all its starts.
    pub fn log(&self) -> String {
        let name = self
            .dir
            .file_name()
            .map(|n| format!("{}.log.", n.to_string_lossy()))
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = self
            .dir
            .parent()
            .and_then(|p| std::fs::read_dir(p).ok())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&name))
            })
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// The running hub's process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the hub.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    /// SIGTERMs the hub (orderly shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Runs an admin subcommand, e.g. `["spokes", "--json"]`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("tidemesh-hub"));
        self.apply_env(&mut cmd);
        cmd.arg(args[0]);
        if args[0] == "token" || args[0] == "config" || args[0] == "evidence" {
            cmd.arg(args[1])
                .arg("--data-dir")
                .arg(&self.dir)
                .args(&args[2..]);
        } else {
            cmd.arg("--data-dir").arg(&self.dir).args(&args[1..]);
        }
        run(&mut cmd)
    }

    /// `token create` for a node ID, returning the token.
    pub fn token(&self, spoke: &str, ttl: &str) -> String {
        let o = self.cli(&["token", "create", "--spoke", spoke, "--ttl", ttl]);
        assert!(o.status.success(), "token create failed: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// `spokes --json`.
    pub fn spokes(&self) -> Vec<Value> {
        let o = self.cli(&["spokes", "--json"]);
        assert!(o.status.success(), "spokes failed: {}", text(&o));
        serde_json::from_slice::<Value>(&o.stdout)
            .expect("json")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The `spokes --json` row of one spoke.
    pub fn spoke(&self, id: &str) -> Option<Value> {
        self.spokes().into_iter().find(|s| s["id"] == id)
    }

    /// Every record of `kind` (`request`, `mode_transition`, ...) the hub
    /// holds for `spoke`, oldest first (paged by sequence number).
    pub fn records(&self, spoke: &str, kind: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut from = 0u64;
        loop {
            let o = self.cli(&[
                "evidence",
                "query",
                "--spoke",
                spoke,
                "--kind",
                kind,
                "--from-seq",
                &from.to_string(),
                "--limit",
                "5000",
                "--json",
            ]);
            assert!(o.status.success(), "evidence query: {}", text(&o));
            let page: Vec<Value> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let n = page.len();
            let Some(last) = page.last().and_then(|r| r["seq"].as_u64()) else {
                break;
            };
            out.extend(page);
            if n < 5000 {
                break;
            }
            from = last + 1;
        }
        out
    }

    /// `audit --json` events as (event, subject) pairs.
    pub fn audit(&self) -> Vec<(String, String)> {
        let o = self.cli(&["audit", "--json"]);
        assert!(o.status.success(), "audit failed: {}", text(&o));
        serde_json::from_slice::<Value>(&o.stdout)
            .expect("json")
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["event"].as_str().unwrap_or("").to_owned(),
                    e["subject"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A spoke process and its data directory.
pub struct SpokeProc {
    /// Data directory.
    pub dir: PathBuf,
    /// Its node ID.
    pub id: String,
    child: Option<Child>,
    args: Vec<String>,
    wrap: Vec<String>,
    env: Vec<(String, String)>,
}

impl SpokeProc {
    /// A spoke in `root/<name>` for node ID `id`.
    pub fn new(root: &Path, name: &str, id: &str) -> SpokeProc {
        SpokeProc {
            dir: root.join(name),
            id: id.into(),
            child: None,
            args: Vec::new(),
            wrap: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Extra environment variables for every (re)start.
    pub fn with_env(mut self, vars: &[(&str, &str)]) -> SpokeProc {
        self.env = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }

    /// Runs `enroll` and `run` through a wrapper (e.g. `ip netns exec NS`).
    pub fn wrapped(mut self, wrap: &[&str]) -> SpokeProc {
        self.wrap = wrap.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `tidemesh-spoke enroll`.
    pub fn enroll(&self, hub: SocketAddr, token: &str) -> Output {
        run(command(&self.wrap, bin("tidemesh-spoke"))
            .args(["enroll", "--data-dir"])
            .arg(&self.dir)
            .args(["--hub", &hub.to_string(), "--token", token]))
    }

    /// `tidemesh-spoke drill load` against this spoke, in the background;
    /// its output says what was committed.
    pub fn drill_load(&self, rate: u32, duration: &str) -> Child {
        Command::new(bin("tidemesh-spoke"))
            .args(["drill", "load", "--data-dir"])
            .arg(&self.dir)
            .args(["--rate", &rate.to_string(), "--duration", duration])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn drill load")
    }

    /// Extra `run` flags for every (re)start.
    pub fn with_args(mut self, args: &[&str]) -> SpokeProc {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts `run`; waits for the admin socket.
    pub fn start(&mut self) {
        self.spawn();
        wait_for(Duration::from_secs(10), || self.try_status())
            .expect("spoke admin socket answers");
    }

    /// Starts `run` without waiting for anything (a spoke not enrolled yet
    /// has no admin socket).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "spoke already running");
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent).expect("spoke parent dir");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("log");
        // The tests' timings assume quick reconnects (the default ceiling,
        // 30 s, is sized for a fleet); a test's own flag comes later and wins.
        let child = command(&self.wrap, bin("tidemesh-spoke"))
            .args(["run", "--data-dir"])
            .arg(&self.dir)
            .args(["--reconnect-max", "2s"])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spoke");
        self.child = Some(child);
    }

    /// SIGTERMs the spoke (orderly shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Every record of `kind` of this spoke, held here or already synced to
    /// `hub`, once each, in sequence order.
    pub fn records(&self, hub: &HubProc, kind: &str) -> Vec<Value> {
        let mut by_seq: std::collections::BTreeMap<u64, Value> = Default::default();
        // The spoke first: a record it held then is at the hub by the query
        // if it was pruned in between (the hub stores before it acks).
        let o = run(Command::new(bin("tidemesh-spoke"))
            .args(["evidence", "tail", "--json", "-n", "10000", "--data-dir"])
            .arg(&self.dir));
        assert!(o.status.success(), "evidence tail: {}", text(&o));
        let held: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        for r in held.into_iter().chain(hub.records(&self.id, kind)) {
            if let (Some(seq), true) = (r["seq"].as_u64(), r["body"].get(kind).is_some()) {
                by_seq.insert(seq, r);
            }
        }
        by_seq.into_values().collect()
    }

    /// Everything the spoke logged, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// The running spoke's process ID (of the wrapper, when wrapped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the spoke.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    /// `status --json`, if the spoke answers.
    pub fn try_status(&self) -> Option<Value> {
        let o = run(Command::new(bin("tidemesh-spoke"))
            .args(["status", "--json", "--data-dir"])
            .arg(&self.dir));
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.try_status().expect("spoke status")
    }

    /// Waits until `status.state == state`; returns that status.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> Value {
        wait_for(timeout, || {
            self.try_status().filter(|s| s["state"] == state)
        })
        .unwrap_or_else(|| {
            panic!(
                "spoke {} did not reach state {state} within {timeout:?}; last status: {:?}\nlog:\n{}",
                self.id,
                self.try_status(),
                std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
            )
        })
    }

    /// Waits until the spoke has a config and every workload holds its SVID
    /// (an `id` in `status --json`); `None` if `timeout` passes first.
    pub fn wait_configured(&self, timeout: Duration) -> Option<()> {
        wait_for(timeout, || {
            let st = self.try_status()?;
            (st["config_version"].is_u64()
                && st["workloads"]
                    .as_array()?
                    .iter()
                    .all(|w| w["id"].is_string()))
            .then_some(())
        })
    }

    /// Waits until the spoke sees `service` registered by a peer of its
    /// site; `None` if `timeout` passes first.
    pub fn wait_site_service(&self, service: &str, timeout: Duration) -> Option<()> {
        wait_for(timeout, || {
            self.try_status()?["registry"]
                .as_array()?
                .iter()
                .any(|e| e["service"] == service && e["origin"] == "site")
                .then_some(())
        })
    }
}

impl Drop for SpokeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tidemesh-relay` process between one spoke and the hub, driven through
/// its control socket.
pub struct RelayProc {
    /// Where spokes send (the relay's listen address).
    pub addr: SocketAddr,
    control: PathBuf,
    child: Option<Child>,
}

impl RelayProc {
    /// Starts a relay in front of `upstream`, control socket and log in `dir`.
    pub fn start(dir: &Path, name: &str, upstream: SocketAddr, seed: u64) -> RelayProc {
        std::fs::create_dir_all(dir).expect("relay dir");
        let control = dir.join(format!("{name}.ctl"));
        let mut cmd = Command::new(bin("tidemesh-relay"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
        ])
        .args(["--seed", &seed.to_string()])
        .arg("--control")
        .arg(&control);
        let (child, addr) = spawn_listening(cmd, &dir.join(format!("{name}.log")));
        wait_for(Duration::from_secs(5), || control.exists().then_some(()))
            .expect("relay control socket");
        RelayProc {
            addr,
            control,
            child: Some(child),
        }
    }

    /// Runs `tidemesh-relay ctl --control PATH ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let o = run(Command::new(bin("tidemesh-relay"))
            .args(["ctl", "--control"])
            .arg(&self.control)
            .args(args));
        assert!(o.status.success(), "relay ctl {args:?}: {}", text(&o));
        o
    }

    /// Drops everything (both directions, or `up` / `down` only).
    pub fn blackout(&self, direction: Option<&str>) {
        match direction {
            None => self.ctl(&["blackout"]),
            Some(d) => self.ctl(&["blackout", "--direction", d]),
        };
    }

    /// Removes every impairment.
    pub fn heal(&self) {
        self.ctl(&["heal"]);
    }

    /// `stats --json`.
    pub fn stats(&self) -> Value {
        serde_json::from_slice(&self.ctl(&["stats", "--json"]).stdout).expect("stats json")
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }
}

/// One status sample of one spoke.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the timeline started.
    pub at: Duration,
    /// Which spoke.
    pub spoke: usize,
    /// `state` from `status --json` (or `down` if the spoke did not answer).
    pub state: String,
    /// `cert_not_after` from the status.
    pub cert_not_after: String,
}

/// What happened to the spokes over time: the drill's record.
#[derive(Debug, Default)]
pub struct Timeline {
    start: Option<Instant>,
    /// Samples in time order.
    pub samples: Vec<Sample>,
    /// (time, label) of the faults applied.
    pub events: Vec<(Duration, String)>,
}

impl Timeline {
    /// Starts the clock.
    pub fn start() -> Timeline {
        Timeline {
            start: Some(Instant::now()),
            ..Default::default()
        }
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.start.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Notes a fault or action.
    pub fn event(&mut self, label: &str) -> Duration {
        let at = self.now();
        eprintln!("[{:>7.2}s] {label}", at.as_secs_f64());
        self.events.push((at, label.to_owned()));
        at
    }

    /// Samples every spoke every 200 ms for `d`.
    pub fn record(&mut self, spokes: &[&SpokeProc], d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            for (i, s) in spokes.iter().enumerate() {
                let st = s.try_status();
                self.samples.push(Sample {
                    at: self.now(),
                    spoke: i,
                    state: st
                        .as_ref()
                        .and_then(|v| v["state"].as_str())
                        .unwrap_or("down")
                        .to_owned(),
                    cert_not_after: st
                        .as_ref()
                        .and_then(|v| v["cert_not_after"].as_str())
                        .unwrap_or("")
                        .to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The first time at or after `after` that spoke `i` was in `state`.
    pub fn first(&self, i: usize, state: &str, after: Duration) -> Option<Duration> {
        self.samples
            .iter()
            .find(|s| s.spoke == i && s.at >= after && s.state == state)
            .map(|s| s.at)
    }

    /// Every state spoke `i` was seen in between two times.
    pub fn states(&self, i: usize, from: Duration, to: Duration) -> Vec<String> {
        let mut v: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.spoke == i && s.at >= from && s.at <= to)
            .map(|s| s.state.clone())
            .collect();
        v.dedup();
        v
    }
}

/// The OTLP/HTTP receiver of `deploy/observability/otlp_receiver.py`: it
/// decodes what the hub exports with the official OpenTelemetry protobuf
/// definitions (Python's `opentelemetry-proto`) and writes a JSON line per
/// span, read back by [`OtlpReceiver::spans`].
pub struct OtlpReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    out: PathBuf,
    child: Option<Child>,
}

impl OtlpReceiver {
    /// Whether `python3` can import `opentelemetry-proto`; `None` (with a
    /// message) to skip, a panic when `TIDEMESH_REQUIRE_OTLP` is set.
    pub fn available() -> Option<()> {
        let ok = Command::new("python3")
            .args([
                "-c",
                "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(());
        }
        assert!(
            std::env::var_os("TIDEMESH_REQUIRE_OTLP").is_none(),
            "python3 with opentelemetry-proto not found (python3 -m pip install opentelemetry-proto)"
        );
        eprintln!(
            "SKIP: python3 with opentelemetry-proto not found: skipping the OTLP export test"
        );
        None
    }

    /// Starts the receiver on a free loopback port, spans and log in `dir`.
    pub fn start(dir: &Path) -> OtlpReceiver {
        std::fs::create_dir_all(dir).expect("receiver dir");
        let out = dir.join("otlp-spans.jsonl");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/otlp_receiver.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--listen", "127.0.0.1:0", "--out"])
            .arg(&out);
        let (child, addr) = spawn_listening(cmd, &dir.join("otlp-receiver.log"));
        OtlpReceiver {
            addr,
            out,
            child: Some(child),
        }
    }

    /// The URL to give `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every line written so far (spans, and `{"error": …}` for requests it
    /// could not decode).
    pub fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l.get("error").is_none())
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }
}
