//! Partition drills with the real binaries: a spoke keeps running from its
//! cached certificate through a 30 s blackout, reports `disconnected` within a
//! few seconds, and reconnects shortly after the heal.
//!
//! 1. Through `tidemesh-relay` processes on loopback (one per spoke).
//! 2. Over a spoke - router - hub network-namespace topology with a silent
//!    nftables partition in the router (`deploy/drills/partition.sh`); needs
//!    root, `ip netns` and `nft`, and skips with a message elsewhere.

use std::{path::PathBuf, process::Command, time::Duration};

use tidemesh_tests::{run, text, HubProc, RelayProc, SpokeProc, Timeline};

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
