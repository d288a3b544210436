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
            // for A's pooled connection to the old process to be noticed
            // (and A's breaker, fail fast in Survival, to probe again).
            excused.push((down, t0.elapsed() + Duration::from_secs(6)));
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
                // the new handshake, and the breaker (Survival: fail fast,
                // probed again after 1 s, longer after repeated failures)
                excused.push((c, t0.elapsed() + Duration::from_secs(8)));
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
    let healed_at = dark + excused[1].1 - Duration::from_secs(8);
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

/// A client handshake with `chain`/`key` to the data port `addr`, expecting
/// the server `server`, and one stream: what a workload SVID minted by a
/// node CA gets from a peer spoke or the hub gateway. `Ok` once the server
/// answered the stream (the handshake was accepted).
fn data_handshake(
    addr: SocketAddr,
    bundle: tidemesh_identity::TrustBundle,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: &tidemesh_identity::KeyPair,
    server: tidemesh_identity::SpiffeId,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tls = tidemesh_identity::verify::client_config(
            bundle,
            chain,
            key,
            std::sync::Arc::new(tidemesh_identity::verify::ExactId(server)),
            std::sync::Arc::new(tidemesh_identity::clock::SystemClock),
            &[tidemesh_proto::ALPN_DATA],
        )
        .map_err(|e| e.to_string())?;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let ep = tidemesh_net::quic::endpoint(
            tidemesh_net::quic::wrap_socket(sock).map_err(|e| e.to_string())?,
            None,
        )
        .map_err(|e| e.to_string())?;
        let cfg = tidemesh_net::QuicSettings::default()
            .client_config(tls)
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let conn = ep
                .connect_with(cfg, addr, "data.test")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            // TLS 1.3: a refused client certificate shows on the first
            // stream operation, not at connect.
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let header = tidemesh_proto::data::StreamHeader {
                service: "inventory.store".into(),
                workload: "inventory".into(),
                protocol: tidemesh_proto::data::StreamProtocol::Http1,
                trace: None,
                request_id: None,
            };
            send.write_all(&header.encode().map_err(|e| e.to_string())?)
                .await
                .map_err(|e| e.to_string())?;
            send.write_all(b"GET /items HTTP/1.1\r\nHost: inventory\r\nContent-Length: 0\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 12];
            recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(String::from_utf8_lossy(&buf).to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), exchange).await {
            Ok(Ok(line)) if line.starts_with("HTTP/1.1") => Ok(()),
            Ok(Ok(line)) => Err(format!("unexpected answer {line:?}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no answer within 5 s".into()),
        }
    })
}

/// Revoking spoke A while it holds an open tunnel to spoke B and an open
/// gateway connection to the hub: within 5 s B and the gateway refuse A's
/// requests and close those connections, and A's node CA cannot mint a
/// workload SVID that either accepts.
#[test]
fn revocation_reaches_peers_and_the_gateway_within_seconds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let catalog = echo_server("catalog");
    apply(
        &hub,
        tmp.path(),
        &format!(
            "{}{}{}",
            mesh_yaml(),
            tidemesh_tests::mesh::cloud_entry("catalog", catalog, "HTTP"),
            tidemesh_tests::mesh::frontend_only("catalog-readers", "cloud", "catalog"),
        ),
    );
    let upstream = echo_server("inventory");
    let (outbound, data_a, data_b) = (free_tcp(), free_udp(), free_udp());
    let mut a = SpokeProc::new(tmp.path(), "a", &format!("spiffe://{TD}/store/sf01/node/a"))
        .with_args(&["--config", &caller_config(tmp.path(), outbound, data_a)]);
    let mut b = SpokeProc::new(tmp.path(), "b", &format!("spiffe://{TD}/store/sf01/node/b"))
        .with_args(&[
            "--config",
            &server_config(tmp.path(), upstream, data_b, data_b),
        ]);
    enroll_and_start(&hub, &mut a, hub_addr);
    enroll_and_start(&hub, &mut b, hub_addr);
    a.wait_site_service("inventory", Duration::from_secs(15))
        .expect("A sees B's inventory");
    // Open (pooled) connections: A -> B's tunnel, A -> the hub gateway.
    for _ in 0..3 {
        assert_eq!(
            call(outbound, "GET", "inventory", "/items", &[]).status,
            200
        );
        assert_eq!(
            call(outbound, "GET", "catalog.cloud", "/items", &[]).status,
            200
        );
    }
    let before_b = b.status()["revocation_version"].as_u64().unwrap_or(0);

    let o = hub.cli(&["revoke", "--spoke", &a.id]);
    assert!(o.status.success(), "revoke: {}", text(&o));
    let revoked = Instant::now();
    // B hears of it (a push on its control session) and closes A's tunnel;
    // the hub closes A's gateway connection; A's next calls fail.
    let refused = wait_for(Duration::from_secs(5), || {
        let b_knows = b.status()["revocation_version"].as_u64().unwrap_or(0) > before_b;
        let b_closed = b.log().contains("closing a data tunnel connection");
        let gw_closed = hub.log().contains("closing a gateway connection");
        let call_fails = call(outbound, "GET", "inventory", "/items", &[]).status != 200;
        (b_knows && b_closed && gw_closed && call_fails).then(|| revoked.elapsed())
    });
    let took = refused.unwrap_or_else(|| {
        panic!(
            "not refused within 5 s: B {}\nB log:\n{}\nhub log:\n{}",
            b.status(),
            b.log(),
            hub.log()
        )
    });
    eprintln!("revocation enforced by B and the gateway {took:?} after the revoke command");
    let r = call(outbound, "GET", "inventory", "/items", &[]);
    assert_ne!(r.status, 200, "{r:?}");

    // A's node CA (read off A's disk, as a thief would) mints a fresh
    // workload SVID: neither B nor the gateway accepts it. The control: the
    // same handshake with a fresh SVID from B's own (unrevoked) node CA is
    // accepted.
    let creds_a = tidemesh_spoke::CredStore::new(&a.dir);
    let ca = creds_a
        .node_ca()
        .expect("read")
        .expect("A's node CA on disk");
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let bundle = creds_a.bundle(&td).expect("bundle");
    let key = tidemesh_identity::svid::generate_key().expect("key");
    let now = SystemTime::now();
    let frontend: tidemesh_identity::SpiffeId = format!("spiffe://{TD}/store/sf01/sa/frontend")
        .parse()
        .expect("id");
    let minted = ca
        .issue_workload(
            &key,
            &frontend,
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        )
        .expect("A's node CA still signs");
    let node_b: tidemesh_identity::SpiffeId = b.id.parse().expect("id");
    let hub_id = tidemesh_identity::naming::hub_id(&td);
    let to_b = data_handshake(data_b, bundle.clone(), minted.clone(), &key, node_b.clone());
    assert!(
        to_b.is_err(),
        "B accepted an SVID minted by A's revoked node CA"
    );
    let to_gw = data_handshake(hub_addr, bundle.clone(), minted, &key, hub_id.clone());
    assert!(
        to_gw.is_err(),
        "the gateway accepted an SVID minted by A's revoked node CA"
    );
    eprintln!("minted by A's node CA: B says {to_b:?}; the gateway says {to_gw:?}");
    let creds_b = tidemesh_spoke::CredStore::new(&b.dir);
    let ca_b = creds_b.node_ca().expect("read").expect("B's node CA");
    let inventory: tidemesh_identity::SpiffeId = format!("spiffe://{TD}/store/sf01/sa/inventory")
        .parse()
        .expect("id");
    let good = ca_b
        .issue_workload(
            &key,
            &inventory,
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        )
        .expect("B's node CA signs");
    assert_eq!(
        data_handshake(data_b, bundle, good, &key, node_b),
        Ok(()),
        "the same handshake with an unrevoked node CA's SVID"
    );
    // The hub's audit names the revocation; B reports the version it enforces.
    assert!(hub
        .audit()
        .iter()
        .any(|(e, s)| e == "revoked" && s == &a.id));
    let v = hub.spoke(&b.id).expect("B at the hub");
    let asked = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let v = hub.spoke(&b.id)?;
            (v["revocation_version"].as_u64()? > before_b).then_some(())
        })
        .is_some(),
        "B never reported the new revocation version: {v}"
    );
    eprintln!(
        "B's report of the new version reached the hub within {:?} of asking",
        asked.elapsed()
    );
}

/// Debian's libfaketime (package `faketime`, which `.ci/run` installs), the
/// multithreaded variant, if installed. Preloaded straight into the spoke
/// (not through the `faketime` wrapper, which would run it as a child that
/// outlives a SIGKILL of the wrapper).
fn libfaketime() -> Option<String> {
    let dir = std::fs::read_dir("/usr/lib").ok()?;
    dir.filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .map(|p| p.to_string_lossy().into_owned())
}

/// A spoke restarted while the hub is down, its wall clock 10 days behind
/// and then a year ahead (libfaketime on the real process), keeps serving
/// on valid certificates: it runs on its trusted-time floor, says
/// `time_trust: degraded` with the reason, issues its workload SVIDs and
/// stamps its evidence with real time; the hub's next anchor trusts it again.
#[test]
fn a_spoke_restarted_offline_with_a_wrong_clock_keeps_serving() {
    let Some(lib) = libfaketime() else {
        assert!(
            std::env::var_os("TIDEMESH_REQUIRE_FAKETIME").is_none(),
            "faketime is required here (apt-get install faketime)"
        );
        eprintln!("SKIP: faketime is not installed (apt-get install faketime)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&["--workload-ttl", "20s"]);
    let hub_addr = hub.start();
    apply(&hub, tmp.path(), &mesh_yaml());
    let upstream = echo_server("inventory");
    let (outbound, data_a, data_b) = (free_tcp(), free_udp(), free_udp());
    let a_args = [
        "--config".to_string(),
        caller_config(tmp.path(), outbound, data_a),
        // a dead peer's tunnel is noticed within seconds
        "--data-idle-timeout".into(),
        "4s".into(),
        "--data-keep-alive".into(),
        "1s".into(),
    ];
    let a_id = format!("spiffe://{TD}/store/sf01/node/a");
    let mut a = SpokeProc::new(tmp.path(), "a", &a_id)
        .with_args(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut b = SpokeProc::new(tmp.path(), "b", &format!("spiffe://{TD}/store/sf01/node/b"))
        .with_args(&[
            "--config",
            &server_config(tmp.path(), upstream, data_b, data_b),
        ]);
    enroll_and_start(&hub, &mut a, hub_addr);
    enroll_and_start(&hub, &mut b, hub_addr);
    a.wait_site_service("inventory", Duration::from_secs(15))
        .expect("A sees B's inventory");
    assert_eq!(a.status()["time_trust"]["state"], "trusted");
    assert_eq!(
        call(outbound, "GET", "inventory", "/items", &[]).status,
        200
    );

    // The hub goes away for good; A is restarted twice with a wrong clock.
    hub.kill();
    for skew in ["-10d", "+365d"] {
        a.kill();
        let mut wrong = SpokeProc::new(tmp.path(), "a", &a_id)
            .wrapped(&[
                "env",
                &format!("LD_PRELOAD={lib}"),
                &format!("FAKETIME={skew}"),
                "FAKETIME_DONT_FAKE_MONOTONIC=1",
            ])
            .with_args(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
        wrong.start();
        let st = wrong.status();
        assert_eq!(st["time_trust"]["state"], "degraded", "{skew}: {st}");
        assert_eq!(st["time_trust"]["source"], "floor", "{skew}: {st}");
        let reason = st["time_trust"]["reason"].as_str().unwrap_or("");
        let word = if skew.starts_with('-') {
            "behind"
        } else {
            "ahead"
        };
        assert!(reason.contains(word), "{skew}: {reason}");
        let offset = st["time_trust"]["wall_offset_ms"].as_i64().unwrap_or(0);
        assert!(
            if skew.starts_with('-') {
                offset < -9 * 86_400_000
            } else {
                offset > 364 * 86_400_000
            },
            "{skew}: wall offset {offset} ms"
        );
        // Workload SVIDs issued on trusted time (20 s lifetime: re-issued
        // during this phase), accepted by B with its good clock.
        let t = Instant::now();
        let mut ok = 0;
        while t.elapsed() < Duration::from_secs(25) {
            let r = call(outbound, "GET", "inventory", "/items", &[]);
            assert_eq!(r.status, 200, "{skew}: {r:?}\n{}", wrong.log());
            ok += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        // B restarts: A's next call needs a new handshake, made with the
        // SVID A issued on its degraded clock; B (good clock) accepts it.
        b.kill();
        b.start();
        let fresh = wait_for(Duration::from_secs(10), || {
            let r = call(outbound, "GET", "inventory", "/items", &[]);
            (r.status == 200).then_some(())
        });
        assert!(
            fresh.is_some(),
            "{skew}: no call on a new tunnel\n{}",
            wrong.log()
        );
        let st = wrong.status();
        let not_after = rfc3339(&st["workloads"][0]["cert_not_after"]).expect("time");
        let real = SystemTime::now();
        assert!(
            not_after > real && not_after < real + Duration::from_secs(30),
            "{skew}: frontend's SVID ends at {:?}, real time is {:?}",
            humantime::format_rfc3339_seconds(not_after),
            humantime::format_rfc3339_seconds(real)
        );
        // evidence stamped with trusted (real) time, not the wall clock's
        let o = run(Command::new(bin("tidemesh-spoke"))
            .args(["evidence", "tail", "--json", "-n", "5", "--data-dir"])
            .arg(&wrong.dir));
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let r: Value = serde_json::from_str(line).expect("record");
            let ts = rfc3339(&r["timestamp"]).expect("timestamp");
            let off = ts.duration_since(real).unwrap_or_else(|e| e.duration());
            assert!(
                off < Duration::from_secs(60),
                "{skew}: record stamped {}",
                r["timestamp"]
            );
        }
        eprintln!("{skew}: {ok} calls answered 200 on a degraded clock; {reason}");
        wrong.kill();
    }

    // Back with a good clock and the hub: anchored, trusted again.
    hub.start();
    a.start();
    let st = a.wait_state("connected", Duration::from_secs(20));
    assert_eq!(st["time_trust"]["state"], "trusted", "{st}");
    assert_eq!(st["time_trust"]["source"], "hub_anchor", "{st}");
}
