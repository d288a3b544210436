//! Deterministic simulation: the real hub and spoke, in-process, over
//! turmoil's simulated network and virtual clock (quinn through
//! `tidemesh_tests::turmoil_quic`). A 24 h partition of a spoke holding a 1 h
//! certificate runs in seconds of wall time.
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
                            health: None,
                            rate_limit: None,
                            protocol: Default::default(),
                            tcp_outbound: Vec::new(),
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
