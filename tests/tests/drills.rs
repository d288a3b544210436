//! Partition drills with the real binaries: a spoke keeps running from its
//! cached certificate through a 30 s blackout, reports `disconnected` within a
//! few seconds, and reconnects shortly after the heal.
//!
//! 1. Through `tidemesh-relay` processes on loopback (one per spoke).
//! 2. Over a spoke - router - hub network-namespace topology with a silent
//!    nftables partition in the router (`deploy/drills/partition.sh`); needs
//!    root, `ip netns` and `nft`, and skips with a message elsewhere.
//! 3. `tidemesh-fleet`: a small fleet of in-process spokes against a real hub
//!    process that is SIGKILLed and restarted; all come back and the backlog
//!    they buffered meanwhile is stored exactly once.
//! 4. The README's demo (`tidemesh-demo run --short`): store apps served
//!    same-site through a hub blackout longer than the SVID lifetime, cloud
//!    calls failing fast, evidence exactly once, and the HTML report.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tidemesh_tests::{bin, run, text, wait_for, HubProc, RelayProc, SpokeProc, Timeline};

/// Whether a process runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        st.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

const TD: &str = "edge.example";
const BLACKOUT: Duration = Duration::from_secs(30);
/// Generous bounds that still catch a broken mechanism (a missing timer or a
/// hang); the measured figures are printed.
const NOTICE_BOUND: Duration = Duration::from_secs(9);
const RECONNECT_BOUND: Duration = Duration::from_secs(6);

fn check_scenario(tl: &Timeline, spoke: usize, cut: Duration, heal: Duration, cert_before: &str) {
    let noticed = tl.first(spoke, "disconnected", cut).unwrap_or_else(|| {
        panic!(
            "spoke {spoke} never reported disconnected: {:?}",
            tl.samples
        )
    });
    let back = tl
        .first(spoke, "connected", heal)
        .unwrap_or_else(|| panic!("spoke {spoke} never reconnected: {:?}", tl.samples));
    eprintln!(
        "spoke {spoke}: disconnected {:.2}s after the cut, reconnected {:.2}s after the heal",
        (noticed - cut).as_secs_f64(),
        (back - heal).as_secs_f64()
    );
    assert!(
        noticed - cut <= NOTICE_BOUND,
        "noticed after {:?}",
        noticed - cut
    );
    assert!(
        back - heal <= RECONNECT_BOUND,
        "reconnected after {:?}",
        back - heal
    );
    // Through the blackout it kept answering, on the same certificate.
    let during: Vec<_> = tl
        .samples
        .iter()
        .filter(|s| s.spoke == spoke && s.at >= noticed && s.at < heal)
        .collect();
    assert!(!during.is_empty());
    for s in during {
        assert_eq!(s.state, "disconnected", "{s:?}");
        assert_eq!(
            s.cert_not_after, cert_before,
            "served from the cached certificate"
        );
    }
}

#[test]
fn spokes_ride_out_a_relay_blackout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    // two spokes, each behind its own relay; only the first is cut off
    let mut relays = Vec::new();
    let mut spokes = Vec::new();
    for i in 0..2 {
        let relay = RelayProc::start(
            &tmp.path().join("relays"),
            &format!("r{i}"),
            hub_addr,
            1000 + i,
        );
        let id = format!("spiffe://{TD}/store/s{i}/node/n1");
        let spoke = SpokeProc::new(tmp.path(), &format!("spoke{i}"), &id);
        let o = spoke.enroll(relay.addr, &hub.token(&id, "10m"));
        assert!(o.status.success(), "enroll through the relay: {}", text(&o));
        relays.push(relay);
        spokes.push(spoke);
    }
    for s in &mut spokes {
        s.start();
        s.wait_state("connected", Duration::from_secs(10));
    }
    let cert_before = spokes[0].status()["cert_not_after"]
        .as_str()
        .unwrap_or("")
        .to_owned();

    let refs: Vec<&SpokeProc> = spokes.iter().collect();
    let mut tl = Timeline::start();
    tl.record(&refs, Duration::from_secs(1));
    relays[0].blackout(None);
    let cut = tl.event("relay 0 blackout (both directions)");
    tl.record(&refs, BLACKOUT);
    relays[0].heal();
    let heal = tl.event("relay 0 heal");
    tl.record(&refs, Duration::from_secs(8));

    check_scenario(&tl, 0, cut, heal, &cert_before);
    // the other spoke never noticed
    assert_eq!(
        tl.states(1, Duration::ZERO, tl.now()),
        vec!["connected".to_owned()]
    );
    let stats = relays[0].stats();
    assert!(
        stats["up"]["dropped"]["blackout"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    // the hub saw it go and come back
    let row = hub
        .spoke("spiffe://edge.example/store/s0/node/n1")
        .expect("listed");
    assert_eq!(row["connected"], true);
}

/// Runs `deploy/drills/partition.sh` with this test's prefix.
struct Netns {
    script: PathBuf,
    prefix: String,
}

impl Netns {
    fn sh(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("TIDEMESH_DRILL_PREFIX", &self.prefix)
            .env(
                "TIDEMESH_DRILL_STATE_DIR",
                format!("/tmp/{}-state", self.prefix),
            ))
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.sh(args);
        assert!(o.status.success(), "partition.sh {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.sh(&["teardown"]);
    }
}

fn netns_available() -> Result<(), String> {
    let is_root = run(Command::new("id").arg("-u")).stdout.starts_with(b"0");
    if !is_root {
        return Err("not root".into());
    }
    for (tool, args) in [("ip", vec!["netns", "list"]), ("nft", vec!["--version"])] {
        match Command::new(tool).args(&args).output() {
            Ok(o) if o.status.success() => {}
            _ => return Err(format!("`{tool}` is missing or not usable")),
        }
    }
    Ok(())
}

#[test]
fn spoke_rides_out_a_silent_netns_partition() {
    if let Err(why) = netns_available() {
        eprintln!("SKIPPED spoke_rides_out_a_silent_netns_partition: {why} (needs root, ip netns and nftables)");
        return;
    }
    let net = Netns {
        script: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/drills/partition.sh"),
        prefix: format!("tt{}", std::process::id() % 100_000),
    };
    net.ok(&["setup"]);
    let hub_ip = net.ok(&["addr", "hub"]);
    let ns = |side: &str| format!("{}-{side}", net.prefix);
    let hub_ns = ns("hub");
    let spoke_ns = ns("spoke");
    // the namespace names come from the script's own listing
    let listing = run(Command::new("ip").args(["netns", "list"]));
    let names = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(
        names.contains(&hub_ns) && names.contains(&spoke_ns),
        "{names}"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let listen = format!("{hub_ip}:7443").parse().expect("addr");
    let mut hub = HubProc::init(tmp.path(), TD).wrapped(&["ip", "netns", "exec", &hub_ns], listen);
    hub.start();
    let id = format!("spiffe://{TD}/store/ns1/node/n1");
    let mut spoke =
        SpokeProc::new(tmp.path(), "spoke", &id).wrapped(&["ip", "netns", "exec", &spoke_ns]);
    let o = spoke.enroll(listen, &hub.token(&id, "10m"));
    assert!(o.status.success(), "enroll across the router: {}", text(&o));
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(10));
    let cert_before = spoke.status()["cert_not_after"]
        .as_str()
        .unwrap_or("")
        .to_owned();

    let mut tl = Timeline::start();
    tl.record(&[&spoke], Duration::from_secs(1));
    net.ok(&["partition"]);
    let cut = tl.event("router: silent partition (nftables drop, both directions)");
    tl.record(&[&spoke], BLACKOUT);
    net.ok(&["heal"]);
    let heal = tl.event("router: heal");
    tl.record(&[&spoke], Duration::from_secs(8));
    check_scenario(&tl, 0, cut, heal, &cert_before);
    hub.kill();
    spoke.kill();
}

/// `tidemesh-fleet` as an operator runs it: 24 in-process spokes against a
/// real hub process, the hub SIGKILLed and restarted, 200 evidence records
/// per spoke buffered while it was down. Every spoke comes back and the hub
/// holds every backlog record exactly once.
#[test]
fn fleet_comes_back_after_a_hub_sigkill_with_its_backlog_exactly_once() {
    const SPOKES: u64 = 24;
    const BACKLOG: u64 = 200;
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub_addr = tidemesh_tests::free_udp();
    let o = run(Command::new(tidemesh_tests::bin("tidemesh-fleet")).args([
        "run",
        "--hub",
        &hub_addr.to_string(),
        "--hub-data-dir",
        tmp.path().join("hub").to_str().expect("utf8"),
        "--hub-bin",
        tidemesh_tests::bin("tidemesh-hub").to_str().expect("utf8"),
        "--work-dir",
        tmp.path().join("fleet").to_str().expect("utf8"),
        "--spokes",
        &SPOKES.to_string(),
        "--backlog",
        &BACKLOG.to_string(),
        "--restart-hub",
        "--hub-down",
        "6s",
        "--duration",
        "1s",
        // generous for a loaded 2-core box; redial is every 0.2-2 s
        "--connect-timeout",
        "60s",
        "--deliver-timeout",
        "120s",
        "--json",
    ]));
    let out = text(&o);
    assert!(o.status.success(), "tidemesh-fleet failed: {out}");
    let r: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("report: {e}: {out}"));
    eprintln!(
        "fleet: connect {} | restart {} | delivered in {} s | hub RSS before {} peak {} after {} | udp {}",
        r["connect"], r["restart"]["reconnect"], r["delivered_s"], r["hub_rss_before"],
        r["hub_rss_peak_sampled_kib"], r["hub_rss_after"], r["udp"]
    );
    assert_eq!(r["connected_at_start"], SPOKES, "{r}");
    let restart = &r["restart"];
    assert_eq!(restart["back"], SPOKES, "{restart}");
    assert_eq!(restart["reconnect"]["count"], SPOKES, "{restart}");
    assert!(restart["all_back_s"].as_f64().is_some(), "{restart}");
    assert!(restart["all_noticed_s"].as_f64().is_some(), "{restart}");
    // The kill really happened: the count fell to 0 and came back to all.
    let counts: Vec<u64> = r["connected_over_time"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|s| s[1].as_u64())
        .collect();
    let up = counts
        .iter()
        .position(|&c| c == SPOKES)
        .expect("all connected");
    let low = up
        + counts[up..]
            .iter()
            .position(|&c| c == 0)
            .expect("a sample with 0 connected after all were");
    assert!(counts[low..].contains(&SPOKES), "{counts:?}");
    let once = &r["exactly_once"];
    assert_eq!(once["ok"], true, "{once}");
    assert_eq!(once["expected"], SPOKES * BACKLOG, "{once}");
    assert_eq!(once["found"], SPOKES * BACKLOG, "{once}");
    assert_eq!(once["duplicates"], 0, "{once}");
    assert_eq!(once["missing"], 0, "{once}");
    assert_eq!(once["spokes_checked"], SPOKES, "{once}");
    assert_eq!(r["delivered_records"], SPOKES * BACKLOG, "{r}");
    // The figures come from /proc of the hub the tool started.
    for k in ["hub_rss_before", "hub_rss_after"] {
        assert!(r[k]["rss_kib"].as_u64().unwrap_or(0) > 0, "{k}: {r}");
    }
    assert!(r["udp"]["hub_socket_drops"].as_u64().is_some(), "{r}");
    assert!(
        restart["udp_before_kill"]["hub_socket_drops"]
            .as_u64()
            .is_some(),
        "{restart}"
    );
}

/// The demo's short run, as CI runs it: during the outage every same-site
/// call is served and every cloud call fails within its 1 s policy timeout
/// plus a margin (under 1.6 s); afterwards each
/// spoke's last committed record is the hub's high-water mark, the chain
/// verifies and no record is stored twice; the report has its SVG.
#[test]
fn the_demo_serves_the_store_through_a_hub_outage_and_delivers_evidence_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let report = tmp.path().join("out").join("report.html");
    let started = Instant::now();
    let mut demo = Command::new(bin("tidemesh-demo"))
        .args(["run", "--short", "--keep", "--report"])
        .arg(&report)
        .arg("--work-dir")
        .arg(tmp.path().join("work"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    // --keep: read up to the last child's pid line, then everything answers
    let mut out = BufReader::new(demo.stdout.take().expect("stdout"));
    let mut stdout = read_until(&mut out, "  spoke-b: pid ");
    let took = started.elapsed();
    eprintln!("the short demo took {took:?} up to --keep's listing");
    let url = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|u| u.trim().strip_prefix("http://"))
            .and_then(|u| u.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {stdout}"))
            .to_owned()
    };
    for (who, addr) in [
        ("hub", url("hub metrics:")),
        ("spoke-a", url("spoke-a metrics:")),
        ("spoke-b", url("spoke-b metrics:")),
    ] {
        for (path, want) in [
            ("/metrics", "tidemesh_build_info"),
            ("/readyz", "ready"),
            ("/healthz", "ok"),
        ] {
            let reply = http_get(&addr, path);
            assert!(
                reply.starts_with("HTTP/1.1 200") && reply.contains(want),
                "--keep: {who} {path}: {reply}"
            );
        }
    }
    let pids: Vec<u32> = stdout
        .lines()
        .filter_map(|l| {
            l.split_once(": pid ")
                .and_then(|(_, p)| p.trim().parse().ok())
        })
        .collect();
    assert_eq!(pids.len(), 6, "apps, hub, relay, two spokes: {stdout}");
    assert!(pids.iter().all(|&p| alive(p)), "kept running: {pids:?}");
    // SIGTERM (as Ctrl-C's SIGINT) stops everything and the run passes
    let k = run(Command::new("kill").args(["-TERM", &demo.id().to_string()]));
    assert!(k.status.success(), "kill: {}", text(&k));
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = wait_for(Duration::from_secs(30), || demo.try_wait().ok().flatten())
        .expect("the demo stops within 30 s of SIGTERM");
    stdout.push_str(&rest.join().expect("reader"));
    let mut err = String::new();
    let _ = demo.stderr.take().map(|mut e| e.read_to_string(&mut err));
    eprintln!("{stdout}{err}");
    assert!(status.success(), "the demo failed: {status}");
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "still running after SIGTERM: {left:?}");
    assert!(stdout.contains("demo OK"), "{stdout}");
    let json: Value = serde_json::from_slice(
        &std::fs::read(report.with_extension("json")).expect("summary json"),
    )
    .expect("json");
    let s = &json["summary"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    // [before, during, after] the outage
    let (same, cloud) = (&s["same_site"][1], &s["cloud"][1]);
    assert!(
        n(&same["ok"]) > 0,
        "same-site served during the outage: {s}"
    );
    assert_eq!(n(&same["failed"]), 0, "{s}");
    assert!(n(&cloud["failed"]) > 0, "cloud calls failed: {s}");
    // failed fast: at once once the spoke knew the hub was gone, and
    // before that within the 1 s policy timeout (the handshake to the
    // gateway included) plus a margin
    let after = s["cloud_max_failure_ms_after_notice"].as_u64();
    assert!(after.is_some_and(|ms| ms < 2_000), "failed fast: {s}");
    assert!(n(&cloud["max_failure_ms"]) < 1_600, "{s}");
    assert!(
        n(&s["same_site"][0]["ok"]) > 0 && n(&s["cloud"][0]["ok"]) > 0,
        "{s}"
    );
    assert!(
        n(&s["cloud"][2]["ok"]) > 0,
        "cloud back after the heal: {s}"
    );
    assert!(
        s["outage_s"].as_f64().unwrap_or(0.0) > s["workload_ttl_s"].as_f64().unwrap_or(f64::MAX),
        "{s}"
    );
    assert!(n(&s["svids_during_outage"]) >= 2, "renewed offline: {s}");
    // every call of the outage in the per-call data agrees
    let calls = json["calls"].as_array().expect("calls");
    for c in calls.iter().filter(|c| c["phase"] == "outage") {
        if c["path"] == "same_site" {
            assert_eq!(n(&c["status"]), 200, "{c}");
        } else {
            assert_ne!(n(&c["status"]), 200, "{c}");
            assert!(n(&c["latency_ms"]) < 3_500, "{c}");
        }
    }
    // the spoke went to Survival and came back to Target
    let modes: Vec<&str> = json["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|t| t["mode_a"].as_str())
        .collect();
    assert!(modes.contains(&"survival"), "{modes:?}");
    assert_eq!(modes.last(), Some(&"target"), "{modes:?}");
    // exactly once, per spoke
    assert_eq!(s["exactly_once"], true, "{s}");
    let ev = s["evidence"].as_array().expect("evidence");
    assert_eq!(ev.len(), 2, "{s}");
    for e in ev {
        assert!(n(&e["last_committed_seq"]) > 0, "{e}");
        assert_eq!(e["last_committed_seq"], e["hub_high_water_mark"], "{e}");
        assert_eq!(e["duplicates_stored"], 0, "{e}");
        assert_eq!(e["gaps"], 0, "{e}");
        assert_eq!(e["verify_ok"], true, "{e}");
    }
    let html = std::fs::read_to_string(&report).expect("report");
    assert!(html.contains("<svg"), "inline SVG");
    assert!(
        stdout.contains(&report.display().to_string()),
        "the report's path is printed"
    );
}

/// A GET over plain HTTP/1.1; the whole reply.
fn http_get(addr: &str, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    s
}

/// A SIGTERM in the middle of the demo (children up, before the summary)
/// stops every child it started and ends the demo with 143; the logs stay.
#[test]
fn the_demo_stops_every_child_on_sigterm_mid_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    let mut demo = Command::new(bin("tidemesh-demo"))
        .args(["run", "--short", "--report"])
        .arg(tmp.path().join("report.html"))
        .arg("--work-dir")
        .arg(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let mut out = BufReader::new(demo.stdout.take().expect("stdout"));
    // the timeline's first line: every child is up
    read_until(&mut out, "  0s  normal");
    let me = demo.id();
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // "pid (comm) state ppid ..."; comm may hold spaces
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = st.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .collect();
    assert!(
        children.len() >= 6,
        "apps, hub, relay, two spokes: {children:?}"
    );
    let k = run(Command::new("kill").args(["-TERM", &me.to_string()]));
    assert!(k.status.success(), "kill: {}", text(&k));
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = wait_for(Duration::from_secs(30), || demo.try_wait().ok().flatten())
        .expect("the demo ends within 30 s of SIGTERM");
    let _ = rest.join();
    let mut err = String::new();
    let _ = demo.stderr.take().map(|mut e| e.read_to_string(&mut err));
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(
        err.contains("SIGTERM: stopping the hub, spokes, relay and apps"),
        "{err}"
    );
    let left: Vec<u32> = children.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(work.join("hub.log").is_file(), "the logs stay");
}

/// Reads the demo's output up to and including the line holding `marker`.
fn read_until(out: &mut impl BufRead, marker: &str) -> String {
    let mut text = String::new();
    let mut line = String::new();
    while !text.contains(marker) {
        line.clear();
        let n = out.read_line(&mut line).expect("read the demo's output");
        assert!(n > 0, "the demo ended before {marker:?}: {text}");
        text.push_str(&line);
    }
    text
}
