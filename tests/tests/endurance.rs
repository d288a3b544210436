//! Offline endurance end to end, with the real binaries: spokes that keep
//! full mTLS between each other for many workload lifetimes without the
//! hub (workload SVIDs issued offline by each spoke's node CA), through a
//! spoke restart and a cut of the link between them; revocation that
//! reaches the data plane within seconds; trusted time on a spoke whose
//! wall clock is wrong (Debian's `faketime`); and registrations the hub
//! refuses.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tidemesh_tests::{
    bin, free_tcp, free_udp,
    http::{call, echo_server},
    run, text, wait_for, write_config, HubProc, RelayProc, SpokeProc, STORE_SF01,
};

const TD: &str = "edge.example";

/// Lets `frontend` call `inventory` at store sf01.
fn mesh_yaml() -> String {
    format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: inventory-readers
  namespace: store
spec:
  selector:
    matchLabels:
      app: inventory
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
"#
    )
}

fn apply(hub: &HubProc, dir: &Path, yaml: &str) {
    let f = dir.join("mesh.yaml");
    std::fs::write(&f, yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
}

/// Spoke A: the caller `frontend` (outbound listener), serving nothing.
fn caller_config(dir: &Path, outbound: SocketAddr, data: SocketAddr) -> String {
    write_config(
        dir,
        "a",
        &format!(
            r#"data_listen = "{data}"
data_advertise = "{data}"

[[workload]]
service_account = "frontend"
service = "frontend"
namespace = "store"
labels = {{ app = "frontend" }}
outbound = "{outbound}"
"#
        ),
    )
}

/// Spoke B: `inventory` at `upstream`, reached by peers at `advertise`.
fn server_config(
    dir: &Path,
    upstream: SocketAddr,
    listen: SocketAddr,
    advertise: SocketAddr,
) -> String {
    write_config(
        dir,
        "b",
        &format!(
            r#"data_listen = "{listen}"
data_advertise = "{advertise}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{upstream}"
"#
        ),
    )
}

fn enroll_and_start(hub: &HubProc, s: &mut SpokeProc, via: SocketAddr) {
    let o = s.enroll(via, &hub.token(&s.id, "10m"));
    assert!(o.status.success(), "enroll: {}", text(&o));
    s.start();
    s.wait_state("connected", Duration::from_secs(15));
    s.wait_configured(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("config or SVIDs missing on {}: {:?}", s.id, s.try_status()));
}

fn rfc3339(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(v.as_str()?).ok()
}

/// Two spokes at one store call each other through a hub blackout of more
/// than four workload lifetimes (20 s SVIDs, so every SVID in use late in
/// the blackout was issued offline by a node CA), with one spoke restarted
/// and the direct link between them cut for longer than the tunnel's idle
/// timeout and healed (so the calls after it run on a new handshake).
#[test]
fn same_site_mtls_holds_through_a_hub_blackout_a_restart_and_a_cut_link() {
    const TTL: Duration = Duration::from_secs(20);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub =
        HubProc::init(tmp.path(), TD).with_args(&["--workload-ttl", "20s", "--max-offline", "10m"]);
    let hub_addr = hub.start();
    apply(&hub, tmp.path(), &mesh_yaml());
    let relay_a = RelayProc::start(tmp.path(), "hub-a", hub_addr, 1);
    let relay_b = RelayProc::start(tmp.path(), "hub-b", hub_addr, 2);
    let upstream = echo_server("inventory");
    let (outbound, data_a, data_b) = (free_tcp(), free_udp(), free_udp());
    // A reaches B's data port only through this relay: the cuttable link.
    let link = RelayProc::start(tmp.path(), "a-to-b", data_b, 3);
    let data_args = ["--data-idle-timeout", "4s", "--data-keep-alive", "1s"];
    let mut a = SpokeProc::new(tmp.path(), "a", &format!("spiffe://{TD}/store/sf01/node/a"))
        .with_args(
            &[
                &["--config", &caller_config(tmp.path(), outbound, data_a)][..],
                &data_args[..],
            ]
            .concat(),
        );
    let mut b = SpokeProc::new(tmp.path(), "b", &format!("spiffe://{TD}/store/sf01/node/b"))
        .with_args(
            &[
                &[
                    "--config",
                    &server_config(tmp.path(), upstream, data_b, link.addr),
                ][..],
                &data_args[..],
            ]
            .concat(),
        );
    enroll_and_start(&hub, &mut a, relay_a.addr);
    enroll_and_start(&hub, &mut b, relay_b.addr);
    a.wait_site_service("inventory", Duration::from_secs(15))
        .expect("A sees B's inventory");
    let before = call(outbound, "GET", "inventory", "/items", &[]);
    assert_eq!(before.status, 200, "before the blackout: {before:?}");
    assert_eq!(before.echo()["server"], "inventory");

    // The hub goes dark for both spokes.
    relay_a.blackout(None);
    relay_b.blackout(None);
    let dark = SystemTime::now();
    let t0 = Instant::now();
    a.wait_state("disconnected", Duration::from_secs(15));
    b.wait_state("disconnected", Duration::from_secs(15));

    // (t since blackout, status) of every call, and the windows when a
    // failure is expected: B down for its restart, the link cut.
    let mut calls: Vec<(Duration, u16)> = Vec::new();
    let mut excused: Vec<(Duration, Duration)> = Vec::new();
    let mut restarted = false;
    let mut cut: Option<Duration> = None;
    let mut healed = false;
    let mut status_at_heal = None;
    while t0.elapsed() < 5 * TTL {
        let now = t0.elapsed();
        if !restarted && now >= Duration::from_secs(25) {
            restarted = true;
            let down = t0.elapsed();
            b.kill();
            b.start();
            b.wait_state("disconnected", Duration::from_secs(15));
            // The data listener is up once status answers; allow a moment
            // for A's pooled connection to the old process to be noticed.
            excused.push((down, t0.elapsed() + Duration::from_secs(5)));
        }
        if cut.is_none() && now >= Duration::from_secs(45) {
            link.blackout(None);
            cut = Some(t0.elapsed());
        }
        if let (Some(c), false) = (cut, healed) {
            // Longer than the tunnel's 4 s idle timeout: the connection dies.
            if now >= c + Duration::from_secs(8) {
                link.heal();
                healed = true;
                excused.push((c, t0.elapsed() + Duration::from_secs(4)));
                status_at_heal = Some((a.status(), b.status()));
            }
        }
        let started = t0.elapsed();
        let r = call(outbound, "GET", "inventory", "/items", &[]);
        eprintln!(
            "[{:>6.2}s] {} in {:?}",
            started.as_secs_f64(),
            r.status,
            t0.elapsed() - started
        );
        calls.push((started, r.status));
        std::thread::sleep(Duration::from_millis(500));
    }
    let dark_for = t0.elapsed();
    assert!(dark_for >= 4 * TTL, "blackout lasted {dark_for:?}");
    let in_excused = |t: Duration| excused.iter().any(|(s, e)| t >= *s && t <= *e);
    let failed: Vec<&(Duration, u16)> = calls
        .iter()
        .filter(|(t, st)| *st != 200 && !in_excused(*t))
        .collect();
    let ok = calls.iter().filter(|(_, st)| *st == 200).count();
    eprintln!(
        "{} calls over {dark_for:?} of hub blackout, {ok} answered 200; excused windows {excused:?}",
        calls.len()
    );
    assert!(
        failed.is_empty(),
        "calls outside the restart and the cut failed: {failed:?}\nA: {}\nB: {}",
        std::fs::read_to_string(a.dir.with_extension("log")).unwrap_or_default(),
        std::fs::read_to_string(b.dir.with_extension("log")).unwrap_or_default()
    );
    let (c, _) = excused[1];
    let after_heal = calls
        .iter()
        .filter(|(t, st)| *t > c + Duration::from_secs(12) && *st == 200)
        .count();
    assert!(after_heal >= 10, "calls after the healed cut: {after_heal}");

    // The SVIDs in use when the link healed were issued by each spoke's
    // node CA long after the hub went dark: the new tunnel ran on them.
    let (sa, sb) = status_at_heal.expect("statuses at the heal");
    for (s, account) in [(&sa, "frontend"), (&sb, "inventory")] {
        assert_eq!(s["connected"], false, "{s}");
        let w = s["workloads"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["service_account"] == account))
            .expect("workload");
        assert!(
            w["issued_by"]
                .as_str()
                .is_some_and(|i| i.starts_with("node CA spiffe://")),
            "{w}"
        );
        let not_after = rfc3339(&w["cert_not_after"]).expect("time");
        let issued = not_after - TTL;
        assert!(
            issued > dark + Duration::from_secs(30),
            "{account}'s SVID was issued at {:?}, before the hub went dark + 30 s ({:?})",
            humantime::format_rfc3339_seconds(issued),
            humantime::format_rfc3339_seconds(dark)
        );
    }
    // A's records of calls after the heal name a fresh handshake.
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["evidence", "tail", "--json", "-n", "400", "--data-dir"])
        .arg(&a.dir));
    assert!(o.status.success(), "{}", text(&o));
    let recs: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let healed_at = dark + excused[1].1 - Duration::from_secs(4);
    let handshakes = recs
        .iter()
        .filter(|r| {
            r["timestamp"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t >= healed_at)
        })
        .filter(|r| {
            let req = &r["body"]["request"];
            req["telemetry"]["status_code"] == 200
                && req["identity"]["handshake_duration_us"].is_u64()
        })
        .count();
    assert!(
        handshakes >= 1,
        "calls after the heal that paid for a new handshake: {handshakes}; records since {:?}: {:#?}",
        humantime::format_rfc3339_millis(healed_at),
        recs.iter()
            .filter(|r| r["body"]["request"]["identity"]["handshake_duration_us"].is_u64() || r["body"]["request"]["telemetry"]["status_code"].as_u64().is_some_and(|c| c != 200))
            .map(|r| (&r["timestamp"], &r["body"]["request"]["identity"]["handshake_duration_us"], &r["body"]["request"]["telemetry"]["status_code"], &r["body"]["request"]["telemetry"]["status"]))
            .collect::<Vec<_>>()
    );

    // The hub comes back; both spokes reconnect and sync their evidence.
    relay_a.heal();
    relay_b.heal();
    a.wait_state("connected", Duration::from_secs(30));
    b.wait_state("connected", Duration::from_secs(30));
    for s in [&a, &b] {
        let synced = wait_for(Duration::from_secs(60), || {
            let o = run(Command::new(bin("tidemesh-spoke"))
                .args(["evidence", "stats", "--json", "--data-dir"])
                .arg(&s.dir));
            let v: Value = serde_json::from_slice(&o.stdout).ok()?;
            (v["pending_records"] == 0).then_some(())
        });
        assert!(synced.is_some(), "{} never drained its evidence", s.id);
        let o = hub.cli(&["evidence", "verify", "--spoke", &s.id, "--json"]);
        assert!(o.status.success(), "verify {}: {}", s.id, text(&o));
    }
}
