//! The seed's mode matrix, live, end to end with the real binaries: a
//! service's error rate takes it to Degraded and back (retries, breaker
//! thresholds and trace sampling change as the matrix says; a new matrix
//! changes when Degraded is entered); a blackout of the hub and the site
//! peer takes the spoke to Survival, the heal to Recovery, whose ramp
//! admits remote traffic 1, 2, 4, ... 100 % and steps back on a failure;
//! guarantee vectors of a local, a same-site and a cloud service in each
//! mode, on the spoke and at the hub.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tidemesh_tests::{
    bin, free_tcp, free_udp,
    http::{call, echo_server, Faulty},
    mesh::{cloud_entry, frontend_only},
    run, text, wait_for, write_config, HubProc, RelayProc, SpokeProc, STORE_SF01, TD,
};

fn apply(hub: &HubProc, dir: &Path, name: &str, yaml: &str) {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
}

fn start(hub: &HubProc, s: &mut SpokeProc, via: SocketAddr) {
    let o = s.enroll(via, &hub.token(&s.id, "10m"));
    assert!(o.status.success(), "enroll: {}", text(&o));
    s.start();
    s.wait_state("connected", Duration::from_secs(15));
    s.wait_configured(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("config or SVIDs missing on {}: {:?}", s.id, s.try_status()));
}

/// The spoke's `/metrics` page at `addr`.
fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect metrics");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample `line` (name and labels) on a metrics page.
fn sample(page: &str, line: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
}

/// `tidemesh-spoke vector --service S --json`.
fn vector(s: &SpokeProc, service: &str) -> Value {
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["vector", "--json", "--service", service, "--data-dir"])
        .arg(&s.dir));
    assert!(o.status.success(), "vector {service}: {}", text(&o));
    serde_json::from_slice(&o.stdout).expect("vector json")
}

fn level<'a>(v: &'a Value, path: &str, dim: &str) -> &'a str {
    v["paths"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["path"] == path))
        .and_then(|p| p["dimensions"][dim]["level"].as_str())
        .unwrap_or("-")
}

/// The mode of `service` in `status` (its own: target or degraded).
fn service_mode(s: &SpokeProc, service: &str) -> String {
    s.status()["modes"]["services"][service]
        .as_str()
        .unwrap_or("target")
        .to_owned()
}

/// The share of unique traces a workload saw with the sampled flag.
fn sampled_share(traceparents: &[String]) -> (f64, usize) {
    let mut by_trace = std::collections::BTreeMap::new();
    for tp in traceparents {
        let parts: Vec<&str> = tp.split('-').collect();
        if let [_, trace, _, flags] = parts.as_slice() {
            by_trace.insert(trace.to_string(), *flags == "01");
        }
    }
    let n = by_trace.len();
    let yes = by_trace.values().filter(|v| **v).count();
    (yes as f64 / n.max(1) as f64, n)
}

/// Degraded from a measured error rate, with the matrix's retries, breaker
/// threshold and sampling, and back; a new matrix moves the threshold.
#[test]
fn a_service_goes_degraded_on_its_error_rate_and_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let matrix = |enter: f64, exit: f64| {
        format!(
            "---
apiVersion: tidemesh.io/v1alpha1
kind: ModeMatrix
metadata: {{name: default}}
spec:
  degradation: {{enterErrorRate: {enter}, exitErrorRate: {exit}, window: 8s, minRequests: 20}}
"
        )
    };
    // The breaker trips on 1000 consecutive errors or a rate over 1000
    // requests in 2 s: never here, so traffic keeps reaching the workload
    // and only the mode's threshold (in the evidence) changes.
    let policy = "---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: shaky, namespace: store}
spec:
  host: shaky.store
  circuitBreaker: {consecutiveErrors: 1000, minRequests: 1000, window: 2s, openTime: 200ms}
";
    let mesh = format!(
        "{STORE_SF01}\n{}{}{policy}",
        matrix(0.3, 0.15),
        frontend_only("shaky-callers", "store", "shaky")
    );
    apply(&hub, tmp.path(), "mesh", &mesh);
    let shaky = Faulty::start("shaky");
    let outbound = free_tcp();
    let cfg = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"[[workload]]
service_account = "frontend"
service = "frontend"
namespace = "store"
labels = {{ app = "frontend" }}
outbound = "{outbound}"

[[workload]]
service_account = "shaky"
service = "shaky"
namespace = "store"
labels = {{ app = "shaky" }}
inbound = "{}"
"#,
            shaky.addr
        ),
    );
    let metrics = free_tcp();
    let mut a = SpokeProc::new(tmp.path(), "a", &format!("spiffe://{TD}/store/sf01/node/a"))
        .with_args(&["--config", &cfg, "--metrics", &metrics.to_string()]);
    start(&hub, &mut a, hub_addr);
    let get = || call(outbound, "GET", "shaky.store", "/item", &[]);

    // Target: full tracing, 3 exponential retries, breaker at 50 %. Once
    // under a loaded CI the first call right after the config appeared in
    // `status` was denied (403): the first call waits for the policy, and
    // says what it saw if it never comes.
    let mut first = None;
    let allowed = wait_for(Duration::from_secs(10), || {
        let r = get();
        let ok = r.status == 200;
        first.get_or_insert((
            r.status,
            r.headers.get("x-tidemesh-reason").cloned(),
            r.body,
        ));
        ok.then_some(())
    });
    assert!(allowed.is_some(), "never allowed: {first:?}");
    if let Some((status, reason, _)) = &first {
        if *status != 200 {
            eprintln!("the first call was answered {status} ({reason:?}) before the policy held");
        }
    }
    for _ in 0..199 {
        assert_eq!(get().status, 200);
    }
    // Each call's duration, by service, direction and locality tier, with
    // the spoke's store; the totals by exact code agree with the count.
    let page = scrape(metrics);
    let series = "store=\"sf01\",service=\"shaky.store\",direction=\"outbound\",tier=\"local\"";
    let count = sample(
        &page,
        &format!("tidemesh_spoke_request_duration_seconds_count{{{series}}}"),
    );
    assert!(count.is_some_and(|n| n >= 200.0), "{count:?}: {page}");
    assert_eq!(
        sample(
            &page,
            &format!("tidemesh_spoke_request_duration_seconds_bucket{{{series},le=\"+Inf\"}}")
        ),
        count,
        "{page}"
    );
    let ok = sample(
        &page,
        &format!("tidemesh_spoke_requests_total{{{series},code=\"200\"}}"),
    );
    assert!(ok.is_some_and(|n| n >= 200.0), "{ok:?}: {page}");
    let totals: f64 = page
        .lines()
        .filter(|l| l.starts_with(&format!("tidemesh_spoke_requests_total{{{series},code=")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        Some(totals),
        count,
        "totals by code add up to the count: {page}"
    );
    let (share, n) = shaky.with(|s| sampled_share(&s.traceparents));
    assert_eq!((share, n >= 200), (1.0, true), "Target traces everything");
    let v = vector(&a, "shaky.store");
    assert_eq!(v["mode"], "target", "{v}");
    assert_eq!(level(&v, "local", "observability"), "logs");

    // 35 % of the answers are 503: Degraded within one window (8 s). The
    // window first empties of the healthy baseline (which would dilute
    // the rate, as a sliding window must).
    std::thread::sleep(Duration::from_secs(9));
    shaky.with(|s| s.fail_of_20 = 7);
    let t0 = Instant::now();
    let degraded = wait_for(Duration::from_secs(10), || {
        for _ in 0..20 {
            get();
        }
        (service_mode(&a, "shaky.store") == "degraded").then(|| t0.elapsed())
    })
    .unwrap_or_else(|| panic!("never degraded: {}", a.status()));
    eprintln!("35 % errors: Degraded after {degraded:?}");
    assert!(degraded < Duration::from_secs(8), "{degraded:?}");
    let page = scrape(metrics);
    // the workload's 503s are counted under their exact code
    let failed = sample(
        &page,
        &format!("tidemesh_spoke_requests_total{{{series},code=\"503\"}}"),
    );
    assert!(failed.is_some_and(|n| n >= 1.0), "{failed:?}: {page}");
    assert_eq!(
        sample(
            &page,
            "tidemesh_spoke_service_degraded{service=\"shaky.store\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "tidemesh_spoke_mode{mode=\"target\"}"),
        Some(1.0),
        "{page}"
    );
    assert!(
        sample(&page, "tidemesh_spoke_mode_transitions_total").is_some_and(|n| n >= 1.0),
        "{page}"
    );
    shaky.with(|s| s.fail_of_20 = 0);
    let rec = wait_for(Duration::from_secs(10), || {
        a.records(&hub, "mode_transition")
            .into_iter()
            .find(|r| r["body"]["mode_transition"]["to"] == "degraded")
    })
    .expect("a transition record to degraded");
    let t = &rec["body"]["mode_transition"];
    eprintln!("transition: {t}");
    assert_eq!(t["from"], "target");
    assert_eq!(t["trigger"], "high_error_rate");
    let ev = &t["evidence"];
    assert_eq!(ev["service"], "shaky.store");
    assert_eq!(ev["threshold"].as_f64(), Some(0.3));
    assert_eq!(ev["window_s"], 8);
    let rate = ev["error_rate"].as_f64().expect("rate");
    assert!((0.28..=0.45).contains(&rate), "measured rate {rate}");
    let (failed, total) = (
        ev["failed_requests"].as_u64().unwrap_or(0),
        ev["total_requests"].as_u64().unwrap_or(0),
    );
    assert!(total >= 20 && failed * 10 >= total * 3, "{failed}/{total}");
    assert!(
        t["actions"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|x| x.contains("sampling")))),
        "{t}"
    );

    // Degraded: 10 % sampling (over 1,000 new traces), 2 linear retries,
    // breaker at 30 % (all in the evidence); healthy endpoints only.
    let before = shaky.with(|s| s.traceparents.len());
    for _ in 0..1_100 {
        assert_eq!(get().status, 200);
    }
    assert_eq!(
        service_mode(&a, "shaky.store"),
        "degraded",
        "still Degraded (hysteresis)"
    );
    let (share, n) = shaky.with(|s| sampled_share(&s.traceparents[before..]));
    eprintln!("Degraded: {:.1} % of {n} new traces sampled", share * 100.0);
    assert!(n >= 1_000, "{n}");
    assert!((share - 0.10).abs() <= 0.04, "sampled {share}");
    let v = vector(&a, "shaky.store");
    assert_eq!(v["mode"], "degraded", "{v}");
    assert_eq!(
        v["dimensions"]["observability"]["evidence"]["trace_sampling"].as_f64(),
        Some(0.1)
    );
    let reqs = a.records(&hub, "request");
    let in_mode = |mode: &str| {
        reqs.iter()
            .map(|r| &r["body"]["request"])
            .rfind(|r| {
                r["service_name"] == "shaky.store"
                    && r["mode"] == mode
                    && r["reliability"].is_object()
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {mode} record"))
    };
    let (tr, dg) = (in_mode("target"), in_mode("degraded"));
    for (r, attempts, backoff, threshold) in [(&tr, 4, "exponential", 0.5), (&dg, 3, "linear", 0.3)]
    {
        let rel = &r["reliability"];
        assert_eq!(rel["retry_state"]["max_attempts"], attempts, "{rel}");
        assert_eq!(rel["retry_state"]["backoff"], backoff, "{rel}");
        assert_eq!(
            rel["circuit_breaker"]["error_threshold"].as_f64(),
            Some(threshold),
            "{rel}"
        );
    }

    // Healed: back to Target after the hysteresis (about two windows).
    let t1 = Instant::now();
    let back = wait_for(Duration::from_secs(25), || {
        get();
        (service_mode(&a, "shaky.store") == "target").then(|| t1.elapsed())
    })
    .unwrap_or_else(|| panic!("never back to Target: {}", a.status()));
    eprintln!("healed: back to Target after {back:?}");
    let recovered = wait_for(Duration::from_secs(10), || {
        a.records(&hub, "mode_transition").into_iter().find(|r| {
            r["body"]["mode_transition"]["from"] == "degraded"
                && r["body"]["mode_transition"]["trigger"] == "error_rate_recovered"
        })
    });
    assert!(recovered.is_some(), "a transition record back to target");

    // 25 % errors stay under the 30 % threshold; a matrix at 20 % makes
    // the same traffic Degraded.
    shaky.with(|s| s.fail_of_20 = 5);
    let t2 = Instant::now();
    while t2.elapsed() < Duration::from_secs(6) {
        get();
    }
    assert_eq!(service_mode(&a, "shaky.store"), "target", "25 % < 30 %");
    apply(
        &hub,
        tmp.path(),
        "matrix",
        &format!("{STORE_SF01}\n{}", matrix(0.2, 0.1)),
    );
    let t3 = Instant::now();
    let moved = wait_for(Duration::from_secs(10), || {
        for _ in 0..10 {
            get();
        }
        (service_mode(&a, "shaky.store") == "degraded").then(|| t3.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "the 20 % matrix did not make 25 % errors Degraded: {}",
            a.status()
        )
    });
    eprintln!("ModeMatrix at 20 %: 25 % errors Degraded after {moved:?}");
    shaky.with(|s| s.fail_of_20 = 0);

    // The hub backs the vector with the synced records.
    let o = hub.cli(&[
        "vector",
        "--service",
        "shaky.store",
        "--spoke",
        &a.id,
        "--json",
    ]);
    assert!(o.status.success(), "hub vector: {}", text(&o));
    let hv: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(hv["service"], "shaky.store", "{hv}");
    assert_eq!(hv["path"], "local", "{hv}");
    assert!(hv["evidence"]["records"].as_u64().unwrap_or(0) > 0, "{hv}");
    for d in tidemesh_policy_dims() {
        assert!(hv["dimensions"][d]["level"].is_string(), "{d}: {hv}");
    }
}

fn tidemesh_policy_dims() -> [&'static str; 6] {
    [
        "identity",
        "authorization",
        "routing",
        "reliability",
        "observability",
        "security",
    ]
}

/// One call's outcome during the ramp.
struct Ramped {
    at: SystemTime,
    admitted: bool,
}

/// Survival through a blackout of the hub and the site peer, Recovery on
/// the heal with the ramp's shares, a step back on a failure, then Target;
/// vectors of a local, a same-site and a cloud service in each mode.
#[test]
fn survival_then_recovery_ramps_remote_traffic_back() {
    const STEP: Duration = Duration::from_secs(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let catalog = Faulty::start("catalog");
    let ledger_cloud = echo_server("ledger-cloud");
    let pos = echo_server("pos");
    let inventory = echo_server("inventory");
    let ledger_local = echo_server("ledger-local");
    let mesh = format!(
        "{STORE_SF01}
---
apiVersion: tidemesh.io/v1alpha1
kind: ModeMatrix
metadata: {{name: default}}
spec:
  reconnection: {{healthChecks: 3, window: 6s}}
  recovery:
    ramp: {{startPercent: 1, factor: 2, step: {}s}}
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: ledger, namespace: store}}
spec:
  host: ledger.cloud
  loadBalancer: {{algorithm: ROUND_ROBIN, localityAware: false}}
{}{}{}{}{}{}",
        STEP.as_secs(),
        cloud_entry("catalog", catalog.addr, "HTTP"),
        frontend_only("catalog-readers", "cloud", "catalog"),
        cloud_entry("ledger", ledger_cloud, "HTTP").replace("MESH_EXTERNAL", "MESH_INTERNAL"),
        frontend_only("ledger-readers", "cloud", "ledger"),
        frontend_only("store-readers", "store", "inventory"),
        frontend_only("pos-readers", "store", "pos"),
    );
    apply(&hub, tmp.path(), "mesh", &mesh);
    let relay_a = RelayProc::start(tmp.path(), "hub-a", hub_addr, 5);
    let (outbound, data_a, data_b) = (free_tcp(), free_udp(), free_udp());
    let link = RelayProc::start(tmp.path(), "a-to-b", data_b, 6);
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "frontend"
service = "frontend"
namespace = "store"
labels = {{ app = "frontend" }}
outbound = "{outbound}"

[[workload]]
service_account = "pos"
service = "pos"
namespace = "store"
labels = {{ app = "pos" }}
inbound = "{pos}"

[[workload]]
service_account = "ledger"
service = "ledger.cloud"
namespace = "cloud"
labels = {{ app = "ledger" }}
inbound = "{ledger_local}"
"#
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{inventory}"
"#,
            link.addr
        ),
    );
    let data_args = ["--data-idle-timeout", "3s", "--data-keep-alive", "1s"];
    let metrics = free_tcp();
    let metrics_arg = metrics.to_string();
    let mut a = SpokeProc::new(tmp.path(), "a", &format!("spiffe://{TD}/store/sf01/node/a"))
        .with_args(
            &[
                &["--config", &cfg_a, "--metrics", &metrics_arg][..],
                &data_args[..],
            ]
            .concat(),
        );
    let mut b = SpokeProc::new(tmp.path(), "b", &format!("spiffe://{TD}/store/sf01/node/b"))
        .with_args(&[&["--config", &cfg_b][..], &data_args[..]].concat());
    start(&hub, &mut a, relay_a.addr);
    start(&hub, &mut b, hub_addr);
    a.wait_site_service("inventory", Duration::from_secs(15))
        .expect("A sees B's inventory");
    // reachability is measured: B answers A's probes
    let measured = wait_for(Duration::from_secs(10), || {
        let st = a.status();
        (st["modes"]["site_endpoints"] == serde_json::json!([1, 1])).then_some(st)
    });
    assert!(
        measured.is_some(),
        "site reachability never measured: {}",
        a.status()["modes"]
    );
    let get = |host: &str| call(outbound, "GET", host, "/x", &[]);
    for host in ["pos", "inventory", "catalog.cloud", "ledger.cloud"] {
        assert_eq!(get(host).status, 200, "{host} before the blackout");
    }
    let services = [
        ("pos.store", "local"),
        ("inventory.store", "same_site"),
        ("catalog.cloud", "cloud"),
    ];
    let mut vectors: Vec<(String, Value)> = Vec::new();
    let mut snap = |label: &str| {
        for (svc, path) in services {
            let v = vector(&a, svc);
            eprintln!(
                "{label} {svc} ({path}): mode {} routing {} reliability {} observability {} security {}",
                v["mode"],
                level(&v, path, "routing"),
                level(&v, path, "reliability"),
                level(&v, path, "observability"),
                level(&v, path, "security"),
            );
            vectors.push((format!("{label}/{svc}"), v));
        }
    };
    snap("target");

    // The hub and the site peer go dark for A: Survival.
    relay_a.blackout(None);
    link.blackout(None);
    let st = wait_for(Duration::from_secs(15), || {
        let st = a.status();
        (st["mode"] == "survival").then_some(st)
    })
    .unwrap_or_else(|| panic!("never Survival: {}", a.status()));
    eprintln!("survival: {}", st["modes"]);
    let part = wait_for(Duration::from_secs(10), || {
        a.records(&hub, "mode_transition")
            .into_iter()
            .find(|r| r["body"]["mode_transition"]["to"] == "survival")
    });
    // (A's records wait in its buffer: the hub is dark; the tail has them)
    let part = part.expect("a transition record to survival");
    let ev = &part["body"]["mode_transition"]["evidence"];
    eprintln!("partition evidence: {ev}");
    assert_eq!(
        part["body"]["mode_transition"]["trigger"],
        "network_partition_detected"
    );
    assert_eq!(ev["hub_reachable"], false, "{ev}");
    assert!(ev["endpoints_total"].as_u64().unwrap_or(0) >= 1, "{ev}");
    // local works; the cloud fails at once, saying the hub is unreachable
    assert_eq!(get("pos").status, 200);
    let r = get("catalog.cloud");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.headers.get("x-tidemesh-hub").map(String::as_str),
        Some("unreachable")
    );
    snap("survival");

    // Heal: health checks pass, Recovery; the ramp.
    relay_a.heal();
    link.heal();
    let t_rec = wait_for(Duration::from_secs(30), || {
        get("pos");
        (a.status()["mode"] == "recovery").then(Instant::now)
    })
    .unwrap_or_else(|| panic!("never Recovery: {}", a.status()));
    snap("recovery");
    let page = scrape(metrics);
    assert_eq!(
        sample(&page, "tidemesh_spoke_mode{mode=\"recovery\"}"),
        Some(1.0),
        "{page}"
    );
    assert!(
        sample(&page, "tidemesh_spoke_recovery_ramp_percent")
            .is_some_and(|p| (1.0..100.0).contains(&p)),
        "{page}"
    );
    let mut ramped: Vec<Ramped> = Vec::new();
    let mut failed_once = false;
    let mut ledger = (0usize, 0usize); // (served locally, served in the cloud)
    let done = loop {
        assert!(
            t_rec.elapsed() < Duration::from_secs(90),
            "the ramp never completed"
        );
        let r = get("catalog.cloud");
        let refused = r.status == 503 && r.headers.contains_key("retry-after");
        if !refused {
            ramped.push(Ramped {
                at: SystemTime::now(),
                admitted: true,
            });
        } else {
            ramped.push(Ramped {
                at: SystemTime::now(),
                admitted: false,
            });
        }
        let l = get("ledger.cloud");
        assert_eq!(l.status, 200, "ledger is served in every step: {l:?}");
        match l.echo()["server"].as_str() {
            Some("ledger-local") => ledger.0 += 1,
            _ => ledger.1 += 1,
        }
        if ramped.len().is_multiple_of(200) {
            let st = a.status();
            let pct = st["modes"]["ramp_percent"].as_u64().unwrap_or(0);
            // one failure of an admitted remote call at 16 %: a step back
            if !failed_once && pct >= 16 {
                catalog.with(|s| s.fail_next = 1);
                failed_once = true;
            }
            if st["mode"] == "target" {
                break Instant::now();
            }
        }
    };
    eprintln!(
        "Recovery lasted {:?}; {} cloud calls; ledger served locally {} times and in the cloud {} times",
        done - t_rec,
        ramped.len(),
        ledger.0,
        ledger.1
    );
    assert!(failed_once, "the ramp never reached 16 %");
    assert!(ledger.0 > 0 && ledger.1 > 0, "{ledger:?}");
    snap("target-again");

    // The ramp's steps, from A's evidence, and each step's admitted share.
    let trans = wait_for(Duration::from_secs(20), || {
        let t: Vec<Value> = a.records(&hub, "mode_transition");
        t.iter()
            .any(|r| r["body"]["mode_transition"]["trigger"] == "ramp_complete")
            .then_some(t)
    })
    .expect("a ramp_complete record");
    let start_at = trans
        .iter()
        .rev()
        .find(|r| {
            r["body"]["mode_transition"]["to"] == "recovery"
                && r["body"]["mode_transition"]["from"] == "survival"
        })
        .expect("survival -> recovery");
    let ts = |r: &Value| {
        humantime::parse_rfc3339(r["timestamp"].as_str().unwrap_or("")).expect("timestamp")
    };
    let mut steps: Vec<(SystemTime, u64)> = vec![(ts(start_at), 1)];
    let mut seq_pcts = vec![1u64];
    for r in &trans {
        let t = &r["body"]["mode_transition"];
        if t["trigger"] == "ramp_step" && ts(r) > ts(start_at) {
            let p = t["evidence"]["traffic_percent"].as_u64().unwrap_or(0);
            steps.push((ts(r), p));
            seq_pcts.push(p);
        }
    }
    eprintln!("ramp percents: {seq_pcts:?}");
    let back = seq_pcts.windows(2).any(|w| w[1] < w[0]);
    assert!(
        back,
        "a failure during the ramp steps it back: {seq_pcts:?}"
    );
    let mut uniq = seq_pcts.clone();
    uniq.dedup();
    for p in [1, 2, 4, 8, 16, 32, 64, 100] {
        assert!(uniq.contains(&p), "{p} % never reached: {seq_pcts:?}");
    }
    let margin = Duration::from_millis(150);
    let mut checked = 0;
    for (i, (from, p)) in steps.iter().enumerate() {
        let to = steps.get(i + 1).map(|s| s.0).unwrap_or(SystemTime::now());
        let calls: Vec<&Ramped> = ramped
            .iter()
            .filter(|c| c.at > *from + margin && c.at + margin < to)
            .collect();
        if calls.len() < 200 {
            continue;
        }
        let n = calls.len() as f64;
        let share = calls.iter().filter(|c| c.admitted).count() as f64 / n;
        let pf = *p as f64 / 100.0;
        let tol = 3.0 * (pf * (1.0 - pf) / n).sqrt() + 0.02;
        eprintln!(
            "step at {p} %: {} calls, {:.1} % admitted (tolerance {:.1} %)",
            calls.len(),
            share * 100.0,
            tol * 100.0
        );
        assert!(
            (share - pf).abs() <= tol,
            "step {p} %: admitted {share} of {n}"
        );
        checked += 1;
    }
    assert!(checked >= 6, "steps with at least 200 calls: {checked}");

    // Vectors: each service answered in each mode, with levels that moved.
    for (label, v) in &vectors {
        assert!(
            v["mode"].is_string() && v["dimensions"]["routing"]["level"].is_string(),
            "{label}: {v}"
        );
    }
    let get_v = |label: &str| &vectors.iter().find(|(l, _)| l == label).expect(label).1;
    assert_eq!(get_v("target/pos.store")["mode"], "target");
    assert_eq!(get_v("survival/pos.store")["mode"], "survival");
    assert_eq!(get_v("recovery/catalog.cloud")["mode"], "recovery");
    assert_eq!(
        level(get_v("target/pos.store"), "local", "routing"),
        "dynamic"
    );
    assert_eq!(
        level(get_v("survival/pos.store"), "local", "routing"),
        "static"
    );
    assert_eq!(
        level(get_v("target/pos.store"), "local", "observability"),
        "logs"
    );
    assert_eq!(
        level(get_v("survival/pos.store"), "local", "observability"),
        "metrics"
    );
    assert_eq!(
        level(get_v("target/catalog.cloud"), "cloud", "reliability"),
        "circuit_break"
    );
    assert_eq!(
        level(get_v("survival/catalog.cloud"), "cloud", "reliability"),
        "best_effort"
    );
    assert_eq!(
        level(get_v("recovery/catalog.cloud"), "cloud", "routing"),
        "traffic_shaped"
    );
    assert_eq!(
        level(get_v("target/inventory.store"), "same_site", "security"),
        "authenticated"
    );
    assert_eq!(
        level(get_v("target/catalog.cloud"), "cloud", "security"),
        "plaintext"
    );
    assert_eq!(
        level(get_v("target/catalog.cloud"), "cloud", "identity"),
        "none"
    );
    assert_eq!(
        level(get_v("target/inventory.store"), "same_site", "identity"),
        "spiffe"
    );
    assert_eq!(
        get_v("survival/catalog.cloud")["paths"][0]["usable"],
        false,
        "the cloud path is not usable in survival"
    );
    let weakens =
        &get_v("target/catalog.cloud")["paths"][0]["dimensions"]["security"]["evidence"]["legs"];
    assert_eq!(weakens[1]["encrypted"], false, "{weakens}");
}

/// A workload answering after `delay`.
fn slow_server(delay: Duration) -> SocketAddr {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                if tidemesh_tests::http::read_message(&mut c).is_none() {
                    return;
                }
                std::thread::sleep(delay);
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    addr
}

/// Config that acts: a DestinationPolicy's `timeout` bounds the call, its
/// `rateLimit` answers 429 with retry-after at the caller, and an
/// AuthorizationPolicy's `source.namespaces` is enforced from the calling
/// workload's namespace.
#[test]
fn destination_policy_timeout_rate_limit_and_source_namespaces_act() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let mesh = format!(
        "{STORE_SF01}
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: slow, namespace: store}}
spec:
  host: slow.store
  timeout: 400ms
  retries: {{attempts: 0}}
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: limited, namespace: store}}
spec:
  host: limited.store
  rateLimit: {{maxTokens: 3, tokensPerFill: 3, fillInterval: 30s}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: open-store, namespace: store}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{namespaces: [store, kiosk]}}}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: store-only, namespace: vault}}
spec:
  selector: {{matchLabels: {{app: vault}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{namespaces: [store]}}}}]
"
    );
    apply(&hub, tmp.path(), "mesh", &mesh);
    let slow = slow_server(Duration::from_secs(2));
    let limited = echo_server("limited");
    let vault = echo_server("vault");
    let (o_front, o_kiosk) = (free_tcp(), free_tcp());
    let cfg = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"[[workload]]
service_account = "frontend"
namespace = "store"
outbound = "{o_front}"

[[workload]]
service_account = "kiosk"
namespace = "kiosk"
outbound = "{o_kiosk}"

[[workload]]
service_account = "slow"
namespace = "store"
inbound = "{slow}"

[[workload]]
service_account = "limited"
namespace = "store"
inbound = "{limited}"

[[workload]]
service_account = "vault"
namespace = "vault"
labels = {{ app = "vault" }}
inbound = "{vault}"
"#
        ),
    );
    let mut a = SpokeProc::new(tmp.path(), "a", &format!("spiffe://{TD}/store/sf01/node/a"))
        .with_args(&["--config", &cfg]);
    start(&hub, &mut a, hub_addr);

    // timeout: the workload takes 2 s, the policy allows 400 ms
    let t = Instant::now();
    let r = call(o_front, "GET", "slow.store", "/", &[]);
    let took = t.elapsed();
    eprintln!(
        "slow.store with a 400 ms timeout: {} after {took:?}",
        r.status
    );
    assert_eq!(r.status, 504, "{r:?}");
    assert!(took < Duration::from_millis(1_500), "{took:?}");

    // rate limit: 3 tokens per 30 s, at the caller
    let codes: Vec<u16> = (0..5)
        .map(|_| call(o_front, "GET", "limited.store", "/", &[]).status)
        .collect();
    assert_eq!(&codes[..3], &[200, 200, 200], "{codes:?}");
    let r = call(o_front, "GET", "limited.store", "/", &[]);
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.headers.contains_key("retry-after"), "{r:?}");
    assert!(r.body.contains("destination policy"), "{r:?}");

    // source.namespaces: frontend (namespace store) may call the vault,
    // kiosk (namespace kiosk) may not
    assert_eq!(call(o_front, "GET", "vault.vault", "/", &[]).status, 200);
    let r = call(o_kiosk, "GET", "vault.vault", "/", &[]);
    assert_eq!(r.status, 403, "{r:?}");
}
