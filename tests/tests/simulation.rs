//! Deterministic simulation: the real hub and spokes, in-process, over
//! turmoil's simulated network and virtual clock (quinn through
//! `tidemesh_tests::turmoil_quic`). A 24 h partition of a spoke holding a 1 h
//! certificate runs in seconds of wall time; a 30-day hub outage of a store
//! of two spokes calling each other every hour over the data tunnel in about
//! two minutes; the same store past its max-offline window.
//!
//! Seeds: turmoil's network and the spoke's jitter are seeded and the seed is
//! printed; `TIDEMESH_SIM_SEED=N` replays it. rustls and quinn still draw OS
//! randomness (keys, connection IDs), so a replay follows the same schedule
//! of faults and timers but not bit-for-bit the same packets.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tidemesh_hub::{Hub, HubConfig};
use tidemesh_identity::{clock::SystemClock, TrustDomain};
use tidemesh_net::{QuicSettings, TokioClock};
use tidemesh_spoke::{FileConfig, Spoke, SpokeConfig, WorkloadConfig};
use tidemesh_tests::turmoil_quic::TurmoilUdp;

const HOUR: Duration = Duration::from_secs(3600);

fn seed() -> u64 {
    std::env::var("TIDEMESH_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

#[derive(Default)]
struct Shared {
    token: Option<String>,
    /// (virtual time, status) snapshots taken inside the spoke host.
    status: Option<(Duration, Value)>,
}

#[test]
fn day_long_partition_expires_the_certificate_and_the_spoke_comes_back() {
    let seed = seed();
    eprintln!("simulation seed={seed} (replay: TIDEMESH_SIM_SEED={seed})");
    let wall = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub_dir = tmp.path().join("hub");
    let spoke_dir = tmp.path().join("spoke");
    let td = TrustDomain::new("edge.example").expect("td");
    tidemesh_hub::init(&hub_dir, &td, &SystemClock).expect("hub init");
    let epoch = SystemTime::now();

    let mut sim = turmoil::Builder::new()
        .simulation_duration(30 * HOUR)
        .tick_duration(Duration::from_millis(50))
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(30))
        .rng_seed(seed)
        .build();

    let shared = Arc::new(Mutex::new(Shared::default()));
    let hub_cell: Arc<Mutex<Option<Hub>>> = Arc::default();
    let quic = QuicSettings::default();

    {
        let (shared, hub_cell, hub_dir) = (shared.clone(), hub_cell.clone(), hub_dir.clone());
        sim.host("hub", move || {
            let (shared, hub_cell, hub_dir) = (shared.clone(), hub_cell.clone(), hub_dir.clone());
            async move {
                let clock = Arc::new(TokioClock::starting_at(epoch));
                let cfg = HubConfig {
                    node_ttl: HOUR,
                    workload_ttl: HOUR,
                    admin_socket: false,
                    quic,
                    ..Default::default()
                };
                let hub = Hub::open(&hub_dir, cfg, clock)?;
                let token = hub.create_token(
                    &"spiffe://edge.example/store/sf01/node/n1".parse()?,
                    Duration::from_secs(600),
                )?;
                shared.lock().expect("lock").token = Some(token.to_string());
                *hub_cell.lock().expect("lock") = Some(hub.clone());
                let sock =
                    TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7443))
                        .await?;
                hub.serve(sock, std::future::pending()).await?;
                Ok(())
            }
        });
    }
    {
        let (shared, spoke_dir) = (shared.clone(), spoke_dir.clone());
        sim.host("spoke", move || {
            let (shared, spoke_dir) = (shared.clone(), spoke_dir.clone());
            async move {
                let clock = Arc::new(TokioClock::starting_at(epoch));
                let hub = SocketAddr::new(turmoil::lookup("hub"), 7443);
                let token = loop {
                    if let Some(t) = shared.lock().expect("lock").token.clone() {
                        break t;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                if !tidemesh_spoke::CredStore::new(&spoke_dir).is_enrolled() {
                    let sock =
                        TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
                            .await?;
                    tidemesh_spoke::enroll(
                        &spoke_dir,
                        hub,
                        &token,
                        false,
                        sock,
                        clock.clone(),
                        quic,
                    )
                    .await?;
                }
                let cfg = SpokeConfig {
                    hub: Some(hub),
                    admin_socket: false,
                    seed: Some(seed),
                    reconnect_max: Duration::from_secs(30),
                    quic,
                    file: FileConfig {
                        workloads: vec![WorkloadConfig {
                            service_account: "pos".into(),
                            service: None,
                            namespace: "store".into(),
                            labels: Default::default(),
                            inbound: None,
                            outbound: None,
                            plaintext_inbound: None,
                            health: None,
                            rate_limit: None,
                            protocol: Default::default(),
                            tcp_outbound: Vec::new(),
                            selectors: Vec::new(),
                        }],
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let spoke = Spoke::open(&spoke_dir, cfg, clock)?;
                let watcher = spoke.clone();
                let shared2 = shared.clone();
                tokio::spawn(async move {
                    loop {
                        let snap = (turmoil::elapsed(), watcher.status());
                        shared2.lock().expect("lock").status = Some(snap);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
                let sock =
                    TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
                spoke.run(sock, std::future::pending()).await?;
                Ok(())
            }
        });
    }

    let status = |shared: &Arc<Mutex<Shared>>| shared.lock().expect("lock").status.clone();
    // Steps until `pred` holds on a snapshot, or `limit` of virtual time passes.
    let run_until =
        |sim: &mut turmoil::Sim, limit: Duration, pred: &dyn Fn(&Value) -> bool| -> Option<Value> {
            let end = sim.elapsed() + limit;
            while sim.elapsed() < end {
                sim.step().expect("simulation step");
                if let Some((_, s)) = status(&shared) {
                    if pred(&s) {
                        return Some(s);
                    }
                }
            }
            None
        };

    let before = run_until(&mut sim, Duration::from_secs(120), &|s| {
        s["connected"] == true && s["workloads"][0]["id"].is_string()
    })
    .expect("spoke enrolls and connects");
    let key_before = std::fs::read(spoke_dir.join("node_key.pem")).expect("key");
    eprintln!(
        "t={:?} connected: {}",
        sim.elapsed(),
        before["cert_not_after"]
    );

    sim.partition("hub", "spoke");
    let cut = sim.elapsed();
    let s = run_until(&mut sim, Duration::from_secs(60), &|s| {
        s["connected"] == false
    })
    .expect("spoke notices the partition");
    eprintln!(
        "t={:?} partition noticed after {:?}",
        sim.elapsed(),
        sim.elapsed() - cut
    );
    assert_eq!(s["state"], "disconnected");

    // Two hours in: the 1 h certificate has expired; the spoke holds on.
    run_until(&mut sim, 2 * HOUR, &|_| false);
    let (_, s) = status(&shared).expect("status");
    eprintln!(
        "t={:?} during partition: state={} cert_expired={} last_contact={}",
        sim.elapsed(),
        s["state"],
        s["cert_expired"],
        s["last_contact"]
    );
    assert_eq!(s["cert_expired"], true, "{s}");
    assert_eq!(s["connected"], false);
    assert_eq!(s["id"], before["id"]);
    // Workload SVIDs are issued by the spoke's node CA, offline as online:
    // the same workload, a newer certificate.
    assert_eq!(s["workloads"][0]["id"], before["workloads"][0]["id"]);
    assert_ne!(
        s["workloads"][0]["cert_not_after"], before["workloads"][0]["cert_not_after"],
        "workload SVID re-issued offline"
    );
    assert!(
        s["workloads"][0]["issued_by"]
            .as_str()
            .is_some_and(|i| i.contains("/node/n1")),
        "{s}"
    );

    // The rest of the day.
    let rest = 24 * HOUR - (sim.elapsed() - cut);
    run_until(&mut sim, rest, &|_| false);
    let (_, s) = status(&shared).expect("status");
    assert_eq!(s["connected"], false);
    assert_eq!(
        std::fs::read(spoke_dir.join("node_key.pem")).expect("key"),
        key_before,
        "node key kept"
    );
    sim.repair("hub", "spoke");
    let healed = sim.elapsed();
    eprintln!(
        "t={:?} repaired after {:?} of partition",
        healed,
        healed - cut
    );

    let after = run_until(&mut sim, Duration::from_secs(300), &|s| {
        s["connected"] == true && s["cert_expired"] == false
    })
    .expect("spoke re-establishes itself after the heal");
    eprintln!(
        "t={:?} re-established {:?} after the heal; cert until {}",
        sim.elapsed(),
        sim.elapsed() - healed,
        after["cert_not_after"]
    );
    let hub = hub_cell.lock().expect("lock").clone().expect("hub");
    let log = hub.store().audit_log().expect("audit");
    assert!(
        log.iter().any(|(_, e)| e.event == "reestablished"),
        "{log:?}"
    );
    // workloads were re-issued too
    run_until(&mut sim, Duration::from_secs(120), &|s| {
        s["workloads"][0]["cert_not_after"] != before["workloads"][0]["cert_not_after"]
    })
    .expect("workload SVID renewed after the heal");
    eprintln!(
        "simulated {:?} in {:?} of wall time (seed {seed})",
        sim.elapsed(),
        wall.elapsed()
    );
}

/// One hourly probe from spoke A to spoke B, with A's status then.
#[derive(Debug, Clone)]
struct Probe {
    at: Duration,
    ok: bool,
    error: String,
    handshake: bool,
    horizon: Option<u64>,
    limit: String,
    issue_error: Option<String>,
}

#[derive(Default)]
struct Store2 {
    tokens: Vec<String>,
    /// Latest status of each spoke (A, B).
    status: [Option<Value>; 2],
    /// Latest evidence stats of each spoke.
    evidence: [Option<Value>; 2],
    probes: Vec<Probe>,
}

/// The store, and a mode matrix whose reconnection window (10 checks in
/// 10 min) has the spokes measure reachability every 30 s instead of the
/// seed's 6 s: a month of virtual time costs a fifth of the wall time.
const STORE_YAML: &str = "apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf01}
spec: {region: us-west-2, zone: us-west-2a}
---
apiVersion: tidemesh.io/v1alpha1
kind: ModeMatrix
metadata: {name: default}
spec:
  reconnection: {healthChecks: 10, window: 10m}";

/// The simulation, the shared record, the hub, and the data directories.
type StoreSim = (
    turmoil::Sim<'static>,
    Arc<Mutex<Store2>>,
    Arc<Mutex<Option<Hub>>>,
    tempfile::TempDir,
);

/// A hub and two spokes of store sf01 in turmoil; A probes B's `inventory`
/// over the data tunnel (mTLS with A's workload SVID against B's serving
/// SVID, both issued by the spokes' node CAs) once per simulated hour.
/// Returns the simulation, the shared record and the hub.
fn store_of_two(seed: u64, max_offline: Duration, tick: Duration, horizon: Duration) -> StoreSim {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub_dir = tmp.path().join("hub");
    let td = TrustDomain::new("edge.example").expect("td");
    tidemesh_hub::init(&hub_dir, &td, &SystemClock).expect("hub init");
    let epoch = SystemTime::now();
    let sim = turmoil::Builder::new()
        .simulation_duration(horizon)
        .tick_duration(tick)
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(30))
        .rng_seed(seed)
        .build();
    let mut sim = sim;
    let shared = Arc::new(Mutex::new(Store2::default()));
    let hub_cell: Arc<Mutex<Option<Hub>>> = Arc::default();
    // Slow ticks: RTTs of a couple of seconds; generous timeouts.
    let quic = QuicSettings {
        keep_alive: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        ..QuicSettings::default()
    };
    {
        let (shared, hub_cell, hub_dir) = (shared.clone(), hub_cell.clone(), hub_dir.clone());
        sim.host("hub", move || {
            let (shared, hub_cell, hub_dir) = (shared.clone(), hub_cell.clone(), hub_dir.clone());
            async move {
                let clock = Arc::new(TokioClock::starting_at(epoch));
                let cfg = HubConfig {
                    node_ttl: HOUR,
                    workload_ttl: HOUR,
                    max_offline,
                    admin_socket: false,
                    quic,
                    ..Default::default()
                };
                let hub = Hub::open(&hub_dir, cfg, clock)?;
                hub.apply_yaml(STORE_YAML, None)?;
                let tokens = ["a", "b"]
                    .iter()
                    .map(|n| {
                        hub.create_token(
                            &format!("spiffe://edge.example/store/sf01/node/{n}").parse()?,
                            Duration::from_secs(600),
                        )
                        .map(|t| t.to_string())
                        .map_err(Into::into)
                    })
                    .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
                shared.lock().expect("lock").tokens = tokens;
                *hub_cell.lock().expect("lock") = Some(hub.clone());
                let sock =
                    TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7443))
                        .await?;
                hub.serve(sock, std::future::pending()).await?;
                Ok(())
            }
        });
    }
    for (i, (name, account)) in [("spoke-a", "pos"), ("spoke-b", "inventory")]
        .into_iter()
        .enumerate()
    {
        let shared = shared.clone();
        let dir = tmp.path().join(name);
        sim.host(name, move || {
            let (shared, dir) = (shared.clone(), dir.clone());
            async move {
                let clock = Arc::new(TokioClock::starting_at(epoch));
                let hub = SocketAddr::new(turmoil::lookup("hub"), 7443);
                let token = loop {
                    if let Some(t) = shared.lock().expect("lock").tokens.get(i).cloned() {
                        break t;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                if !tidemesh_spoke::CredStore::new(&dir).is_enrolled() {
                    let sock =
                        TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
                            .await?;
                    tidemesh_spoke::enroll(&dir, hub, &token, false, sock, clock.clone(), quic)
                        .await?;
                }
                let me = SocketAddr::new(turmoil::lookup(name), 7500);
                let data = tidemesh_spoke::dataplane::DataSettings::default();
                let cfg = SpokeConfig {
                    hub: Some(hub),
                    admin_socket: false,
                    seed: Some(seed + i as u64),
                    reconnect_max: Duration::from_secs(30),
                    quic,
                    data: tidemesh_spoke::dataplane::DataSettings {
                        connect_timeout: Duration::from_secs(30),
                        // no keep-alive: an idle tunnel closes after a minute,
                        // so every hourly probe makes a new handshake
                        quic: QuicSettings {
                            max_streams: data.quic.max_streams,
                            keep_alive: Duration::from_secs(7200),
                            ..quic
                        },
                        ..data
                    },
                    data_socket: Some(
                        TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7500))
                            .await?,
                    ),
                    file: FileConfig {
                        data_listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7500)),
                        data_advertise: Some(me),
                        workloads: vec![WorkloadConfig {
                            service_account: account.into(),
                            service: None,
                            namespace: "store".into(),
                            labels: Default::default(),
                            inbound: None,
                            outbound: None,
                            plaintext_inbound: None,
                            health: None,
                            rate_limit: None,
                            protocol: Default::default(),
                            tcp_outbound: Vec::new(),
                            selectors: Vec::new(),
                        }],
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let spoke = Spoke::open(&dir, cfg, clock)?;
                let watcher = spoke.clone();
                let shared2 = shared.clone();
                tokio::spawn(async move {
                    loop {
                        let st = watcher.status();
                        let ev = watcher.evidence_stats();
                        {
                            let mut s = shared2.lock().expect("lock");
                            s.status[i] = Some(st);
                            s.evidence[i] = ev;
                        }
                        tokio::time::sleep(Duration::from_secs(300)).await;
                    }
                });
                if i == 0 {
                    let prober = spoke.clone();
                    let shared3 = shared.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(HOUR).await;
                            let r = prober.probe("pos", "inventory").await;
                            let first = r.as_ref().ok().and_then(|v| v.get(0).cloned());
                            let st = prober.status();
                            let p = Probe {
                                at: turmoil::elapsed(),
                                ok: first.as_ref().is_some_and(|p| p["ok"] == true),
                                error: match (&r, &first) {
                                    (Err(e), _) => e.clone(),
                                    (Ok(_), Some(p)) => p["error"].as_str().unwrap_or("").into(),
                                    (Ok(_), None) => "no answer".into(),
                                },
                                handshake: first
                                    .as_ref()
                                    .is_some_and(|p| p["handshake_us"].is_u64()),
                                horizon: st["survival_horizon_s"].as_u64(),
                                limit: st["survival_limit"].as_str().unwrap_or("").into(),
                                issue_error: st["issue_error"].as_str().map(str::to_owned),
                            };
                            shared3.lock().expect("lock").probes.push(p);
                        }
                    });
                }
                let sock =
                    TurmoilUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
                spoke.run(sock, std::future::pending()).await?;
                Ok(())
            }
        });
    }
    (sim, shared, hub_cell, tmp)
}

/// Steps the simulation until `pred` holds on the shared record, or `limit`
/// of virtual time passes.
fn step_until(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Store2>>,
    limit: Duration,
    pred: &dyn Fn(&Store2) -> bool,
) -> bool {
    let end = sim.elapsed() + limit;
    while sim.elapsed() < end {
        sim.step().expect("simulation step");
        if pred(&shared.lock().expect("lock")) {
            return true;
        }
    }
    false
}

fn both_up_and_a_sees_b(s: &Store2) -> bool {
    let up = |i: usize| {
        s.status[i]
            .as_ref()
            .is_some_and(|st| st["connected"] == true && st["workloads"][0]["id"].is_string())
    };
    up(0)
        && up(1)
        && s.status[0].as_ref().is_some_and(|st| {
            st["registry"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|e| e["service"] == "inventory" && e["origin"] == "site")
            })
        })
}

const DAY: Duration = Duration::from_secs(86_400);

/// A 30-day hub outage for a store of two spokes: one mTLS call (a probe
/// over the data tunnel, a new handshake each hour) per simulated hour, all
/// of them answered; the survival horizon falls monotonically and names
/// its limit; after the heal every evidence record reaches the hub exactly
/// once, in a verified chain.
#[test]
fn a_store_keeps_mtls_through_a_30_day_hub_outage() {
    let seed = seed();
    eprintln!("simulation seed={seed} (replay: TIDEMESH_SIM_SEED={seed})");
    let wall = Instant::now();
    let (mut sim, shared, hub_cell, _tmp) =
        store_of_two(seed, 31 * DAY, Duration::from_secs(1), 33 * DAY);
    assert!(
        step_until(
            &mut sim,
            &shared,
            Duration::from_secs(600),
            &both_up_and_a_sees_b
        ),
        "spokes never came up: {:?}",
        shared.lock().expect("lock").status
    );
    // the first hourly probe, with the hub still there
    assert!(step_until(&mut sim, &shared, 2 * HOUR, &|s| !s
        .probes
        .is_empty()));
    sim.partition("hub", "spoke-a");
    sim.partition("hub", "spoke-b");
    let cut = sim.elapsed();
    let probes_before = shared.lock().expect("lock").probes.len();
    step_until(&mut sim, &shared, 30 * DAY, &|_| false);
    let during: Vec<Probe> = shared.lock().expect("lock").probes[probes_before..].to_vec();
    eprintln!(
        "{} probes during {:?} of outage; first {:?}; last {:?}",
        during.len(),
        sim.elapsed() - cut,
        during.first(),
        during.last()
    );
    assert!(during.len() >= 30 * 24 - 1, "{} probes", during.len());
    let failed: Vec<&Probe> = during.iter().filter(|p| !p.ok).collect();
    assert!(failed.is_empty(), "probes failed: {failed:#?}");
    assert!(
        during.iter().filter(|p| p.handshake).count() >= 30 * 24 - 2,
        "each hourly probe should make a new handshake (the tunnel idles out in between)"
    );
    // the horizon falls monotonically and names its limit
    for w in during.windows(2) {
        let (a, b) = (
            w[0].horizon.expect("bounded"),
            w[1].horizon.expect("bounded"),
        );
        assert!(b <= a, "horizon rose from {a} to {b} at {:?}", w[1].at);
    }
    let last = during.last().expect("probes");
    assert_eq!(last.limit, "node_ca", "{last:?}");
    let left = last.horizon.expect("bounded");
    assert!(
        left > 0 && left < 2 * 86_400,
        "{left} s left after 30 days of a 31-day window"
    );

    sim.repair("hub", "spoke-a");
    sim.repair("hub", "spoke-b");
    let drained = step_until(&mut sim, &shared, HOUR, &|s| {
        (0..2).all(|i| {
            s.status[i]
                .as_ref()
                .is_some_and(|st| st["connected"] == true)
                && s.evidence[i].as_ref().is_some_and(|e| {
                    e["pending_records"] == 0 && e["last_committed_seq"].as_u64() > Some(0)
                })
        })
    });
    assert!(
        drained,
        "evidence never drained: {:?}",
        shared.lock().expect("lock").evidence
    );
    let hub = hub_cell.lock().expect("lock").clone().expect("hub");
    let s = shared.lock().expect("lock");
    for (i, name) in ["a", "b"].iter().enumerate() {
        let id: tidemesh_identity::SpiffeId =
            format!("spiffe://edge.example/store/sf01/node/{name}")
                .parse()
                .expect("id");
        let st = hub.evidence().stats(&id).expect("stats");
        let committed = s.evidence[i]
            .as_ref()
            .and_then(|e| e["last_committed_seq"].as_u64());
        eprintln!("hub holds {} records of spoke {name} (spoke committed {committed:?}), gaps {}, chain ok {}", st.records, st.gaps, st.chain_ok);
        assert!(st.chain_ok && st.gaps == 0 && st.missing == 0, "{st:?}");
        assert_eq!(
            Some(st.records),
            committed,
            "every record exactly once: {st:?}"
        );
        let v = hub.evidence().verify(&id).expect("verify");
        assert!(v.ok, "{v:?}");
    }
    // every probe A made is at the hub once
    let a_id: tidemesh_identity::SpiffeId = "spiffe://edge.example/store/sf01/node/a"
        .parse()
        .expect("id");
    let recs = hub
        .evidence()
        .query(
            &a_id,
            &tidemesh_hub::evidence::Query {
                since: None,
                kind: Some(tidemesh_evidence::RecordKind::Request),
                from_seq: None,
                limit: usize::MAX,
            },
        )
        .expect("query");
    let probes_at_hub = recs
        .iter()
        .filter(|r| match &r.body {
            tidemesh_evidence::RecordBody::Request(q) => {
                q.telemetry.operation_name.starts_with("PROBE ")
            }
            _ => false,
        })
        .count();
    assert_eq!(probes_at_hub, s.probes.len(), "probe records at the hub");
    eprintln!(
        "simulated {:?} in {:?} of wall time (seed {seed})",
        sim.elapsed(),
        wall.elapsed()
    );
}

/// The same store past its max-offline window (2 days here, an outage of
/// 4): calls succeed until the survival horizon, then stop, and the spoke
/// says plainly why; when the hub returns it refuses re-establishment and
/// the spoke asks for a new join token.
#[test]
fn past_the_max_offline_window_calls_stop_at_the_horizon_and_say_why() {
    let seed = seed();
    eprintln!("simulation seed={seed} (replay: TIDEMESH_SIM_SEED={seed})");
    let (mut sim, shared, hub_cell, _tmp) =
        store_of_two(seed, 2 * DAY, Duration::from_secs(1), 6 * DAY);
    assert!(
        step_until(
            &mut sim,
            &shared,
            Duration::from_secs(600),
            &both_up_and_a_sees_b
        ),
        "spokes never came up: {:?}",
        shared.lock().expect("lock").status
    );
    assert!(step_until(&mut sim, &shared, 2 * HOUR, &|s| !s
        .probes
        .is_empty()));
    sim.partition("hub", "spoke-a");
    sim.partition("hub", "spoke-b");
    let cut = sim.elapsed();
    let before = shared.lock().expect("lock").probes.len();
    step_until(&mut sim, &shared, 4 * DAY, &|_| false);
    let during: Vec<Probe> = shared.lock().expect("lock").probes[before..].to_vec();
    // The horizon at the first probe of the outage: when calls must stop.
    let first = during.first().expect("probes");
    let end = first.at + Duration::from_secs(first.horizon.expect("bounded"));
    eprintln!(
        "horizon at the start of the outage: {:?} ({}), calls must stop around {:?} after the cut",
        Duration::from_secs(first.horizon.unwrap_or(0)),
        first.limit,
        end - cut
    );
    assert!(end - cut < 2 * DAY + HOUR && end - cut > 2 * DAY - 2 * HOUR);
    for p in &during {
        if p.at + HOUR < end {
            assert!(p.ok, "before the horizon: {p:?}");
            assert!(p.horizon.is_some_and(|h| h > 0), "{p:?}");
        } else if p.at > end + HOUR {
            assert!(!p.ok, "past the horizon a call succeeded: {p:?}");
            assert_eq!(p.horizon, Some(0), "{p:?}");
            let why = p.issue_error.as_deref().unwrap_or("");
            assert!(why.contains("node CA expired"), "{p:?}");
            assert!(p.error.contains("expired"), "{p:?}");
        }
    }
    let after = during.iter().filter(|p| p.at > end + HOUR).count();
    assert!(after >= 40, "{after} probes past the horizon");
    // no connection outlives the certificates it was made with: the pooled
    // tunnel the routine reachability probes kept busy closed at their
    // expiry, so the peer is unreachable now, not only for new handshakes
    let st = shared.lock().expect("lock").status[0]
        .clone()
        .expect("status");
    assert_eq!(
        st["modes"]["site_endpoints"],
        serde_json::json!([0, 1]),
        "{}",
        st["modes"]
    );
    eprintln!(
        "past the horizon, A says: {:?}",
        during.last().and_then(|p| p.issue_error.clone())
    );

    // The hub is back: re-establishment is refused, a new token is needed.
    sim.repair("hub", "spoke-a");
    sim.repair("hub", "spoke-b");
    let refused = step_until(&mut sim, &shared, HOUR, &|s| {
        s.status[0]
            .as_ref()
            .is_some_and(|st| st["state"] == "needs_enrollment")
    });
    let st = shared.lock().expect("lock").status[0].clone();
    assert!(refused, "{st:?}");
    let st = st.expect("status");
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("new join token")),
        "{st}"
    );
    let hub = hub_cell.lock().expect("lock").clone().expect("hub");
    let log = hub.store().audit_log().expect("audit");
    assert!(
        log.iter()
            .any(|(_, e)| e.event == "refused" && e.detail.contains("max-offline")),
        "{log:?}"
    );
}
