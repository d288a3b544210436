//! Control plane end to end, with the real binaries: `apply` through the
//! admin socket, versions, history and rollback, and config sync to each
//! spoke's last-known-good replica, through a relay for the partitions.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use tidemesh_tests::{text, wait_for, HubProc, RelayProc, SpokeProc};

const TD: &str = "edge.example";
const SEED: &str = "../shared/policy/testdata/seed";

fn seed_yaml() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(SEED);
    [
        "authorization_policy.yaml",
        "canary_virtualservice_destinationrule.yaml",
        "serviceentry_multicluster.yaml",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(dir.join(f)).expect("seed yaml"))
    .collect::<Vec<_>>()
    .join("\n---\n")
}

fn store_yaml(name: &str) -> String {
    format!("apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {{name: {name}}}\nspec: {{region: us-west-2, zone: us-west-2a}}\n")
}

fn apply(hub: &HubProc, dir: &Path, name: &str, yaml: &str) -> std::process::Output {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).expect("write yaml");
    hub.cli(&["apply", "-f", f.to_str().expect("utf8")])
}

fn history(hub: &HubProc) -> Vec<serde_json::Value> {
    let o = hub.cli(&["config", "history", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn config_version(s: &SpokeProc) -> Option<u64> {
    s.try_status().and_then(|v| v["config_version"].as_u64())
}

#[test]
fn apply_history_rollback_and_sync_through_partitions_and_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();

    // the seed's Istio YAML applies unchanged
    let o = apply(&hub, tmp.path(), "seed", &seed_yaml());
    assert!(o.status.success(), "seed apply: {}", text(&o));
    assert_eq!(history(&hub).len(), 1);

    // an invalid file is rejected, names document, field and reason, and the version does not move
    let bad = format!("{}---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: broken, namespace: payments}}\nspec:\n  hosts: [broken]\n  http:\n  - route:\n    - destination: {{host: payment-service, subset: v1}}\n      weight: 60\n    - destination: {{host: payment-service, subset: v2}}\n      weight: 50\n", store_yaml("sf01"));
    let o = apply(&hub, tmp.path(), "bad", &bad);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("document 2") && msg.contains("weight") && msg.contains("100"),
        "{msg}"
    );
    assert_eq!(history(&hub).len(), 1, "an invalid file changes nothing");

    // two spokes, each behind a relay
    let mut relays = Vec::new();
    let mut spokes = Vec::new();
    for i in 0..2 {
        let relay = RelayProc::start(
            &tmp.path().join("relays"),
            &format!("r{i}"),
            hub_addr,
            7 + i,
        );
        let id = format!("spiffe://{TD}/store/sf01/node/n{i}");
        let mut s = SpokeProc::new(tmp.path(), &format!("spoke{i}"), &id);
        assert!(s
            .enroll(relay.addr, &hub.token(&id, "10m"))
            .status
            .success());
        s.start();
        s.wait_state("connected", Duration::from_secs(10));
        relays.push(relay);
        spokes.push(s);
    }
    for s in &spokes {
        wait_for(Duration::from_secs(5), || {
            (config_version(s) == Some(1)).then_some(())
        })
        .expect("spokes get version 1 on first contact");
    }

    // a connected spoke has a new version within 1 s; the partitioned one does not
    relays[1].blackout(None);
    spokes[1].wait_state("disconnected", Duration::from_secs(9));
    let o = apply(&hub, tmp.path(), "store", &store_yaml("sf01"));
    assert!(o.status.success(), "{}", text(&o));
    let t0 = Instant::now();
    wait_for(Duration::from_secs(1), || {
        (config_version(&spokes[0]) == Some(2)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "connected spoke did not get version 2 within 1 s: {:?}",
            spokes[0].try_status()
        )
    });
    eprintln!(
        "connected spoke applied version 2 {:?} after the apply returned",
        t0.elapsed()
    );
    assert_eq!(config_version(&spokes[1]), Some(1));

    // restarted while partitioned: serves its last-known-good
    spokes[1].kill();
    spokes[1].start();
    let st = spokes[1].status();
    assert_eq!(st["config_version"], 1, "{st}");
    assert!(st["config_age_s"].is_u64(), "{st}");
    assert_eq!(st["connected"], false);

    // after the heal it converges
    relays[1].heal();
    let t1 = Instant::now();
    wait_for(Duration::from_secs(10), || {
        (config_version(&spokes[1]) == Some(2)).then_some(())
    })
    .expect("partitioned spoke gets version 2 after the heal");
    eprintln!(
        "healed spoke applied version 2 {:?} after the heal",
        t1.elapsed()
    );

    // the hub shows each spoke's applied version
    wait_for(Duration::from_secs(5), || {
        let rows = hub.spokes();
        rows.iter().all(|r| r["config_version"] == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("spokes' applied versions: {:?}", hub.spokes()));

    // history and rollback (a rollback is itself a new version)
    let o = hub.cli(&["config", "rollback", "--to", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let h = history(&hub);
    assert_eq!(h.len(), 3);
    assert_eq!(h[2]["version"], 3);
    assert_eq!(h[2]["rollback_of"], 1);
    let audits: Vec<String> = hub.audit().into_iter().map(|(e, _)| e).collect();
    assert!(
        audits.iter().any(|e| e == "config_rolled_back"),
        "{audits:?}"
    );
    assert!(
        h[2]["summary"].as_str().unwrap_or("").contains("Store"),
        "{h:?}"
    );
    let v1 = hub.cli(&["config", "get", "--version", "1", "-o", "json"]);
    let v3 = hub.cli(&["config", "get", "-o", "json"]);
    assert!(v1.status.success() && v3.status.success());
    assert_eq!(v1.stdout, v3.stdout, "version 3 is version 1's config");
    let yaml = hub.cli(&["config", "get", "--version", "2"]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("kind: Store"));
    for s in &spokes {
        wait_for(Duration::from_secs(5), || {
            (config_version(s) == Some(3)).then_some(())
        })
        .expect("spokes follow the rollback");
    }
}

/// A tiny HTTP server answering `/healthz` with 200 or 503.
fn health_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let healthy = std::sync::Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let resp: &[u8] = if h.load(Ordering::SeqCst) {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown"
            };
            let _ = c.write_all(resp);
        }
    });
    (addr, healthy)
}

fn registry_has(s: &SpokeProc, origin: &str, account: &str) -> bool {
    s.try_status()
        .and_then(|v| v["registry"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|e| e["origin"] == origin && e["service_account"] == account)
}

#[test]
fn spokes_register_endpoints_and_health_reaches_the_site_with_or_without_the_hub() {
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    assert!(apply(&hub, tmp.path(), "store", &store_yaml("sf09"))
        .status
        .success());
    let (health_addr, healthy) = health_server();

    // spoke n1 serves `pos` (health-checked), behind a relay; n2 is at the same site
    let relay = RelayProc::start(&tmp.path().join("relays"), "r", hub_addr, 3);
    let cfg1 = tmp.path().join("n1.toml");
    std::fs::write(
        &cfg1,
        format!("data_advertise = \"127.0.0.1:17444\"\n[[workload]]\nservice_account = \"pos\"\nservice = \"pos\"\nnamespace = \"store\"\nlabels = {{ version = \"v1\" }}\ninbound = \"{health_addr}\"\nhealth = \"/healthz\"\n"),
    )
    .expect("config");
    let id1 = format!("spiffe://{TD}/store/sf09/node/n1");
    let id2 = format!("spiffe://{TD}/store/sf09/node/n2");
    let mut n1 = SpokeProc::new(tmp.path(), "n1", &id1)
        .with_args(&["--config", cfg1.to_str().expect("utf8")]);
    let mut n2 = SpokeProc::new(tmp.path(), "n2", &id2);
    assert!(n1
        .enroll(relay.addr, &hub.token(&id1, "10m"))
        .status
        .success());
    assert!(n2
        .enroll(hub_addr, &hub.token(&id2, "10m"))
        .status
        .success());
    n1.start();
    n2.start();
    n1.wait_state("connected", Duration::from_secs(10));
    n2.wait_state("connected", Duration::from_secs(10));

    // healthy: n1 has it locally, n2 learns it through the hub
    wait_for(Duration::from_secs(10), || {
        registry_has(&n1, "local", "pos").then_some(())
    })
    .expect("n1 local endpoint healthy");
    wait_for(Duration::from_secs(10), || {
        registry_has(&n2, "site", "pos").then_some(())
    })
    .unwrap_or_else(|| panic!("n2 never saw n1's endpoint: {:?}", n2.try_status()));
    let st = n2.status();
    let ep = st["registry"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["origin"] == "site").cloned())
        .expect("site endpoint");
    assert_eq!(ep["address"], "127.0.0.1:17444", "{ep}");

    // unhealthy: leaves n1's registry, and n2's
    healthy.store(false, Ordering::SeqCst);
    wait_for(Duration::from_secs(10), || {
        (!registry_has(&n1, "local", "pos")).then_some(())
    })
    .expect("n1 drops its unhealthy endpoint");
    wait_for(Duration::from_secs(10), || {
        (!registry_has(&n2, "site", "pos")).then_some(())
    })
    .expect("n2 drops it too");

    // partitioned from the hub, n1 still tracks its own endpoint's health
    relay.blackout(None);
    n1.wait_state("disconnected", Duration::from_secs(9));
    healthy.store(true, Ordering::SeqCst);
    wait_for(Duration::from_secs(10), || {
        registry_has(&n1, "local", "pos").then_some(())
    })
    .expect("back in n1's registry without the hub");
    healthy.store(false, Ordering::SeqCst);
    wait_for(Duration::from_secs(10), || {
        (!registry_has(&n1, "local", "pos")).then_some(())
    })
    .expect("out of n1's registry without the hub");
    assert!(!registry_has(&n2, "site", "pos"));

    // heal: the site learns the current health
    healthy.store(true, Ordering::SeqCst);
    relay.heal();
    n1.wait_state("connected", Duration::from_secs(10));
    wait_for(Duration::from_secs(10), || {
        registry_has(&n2, "site", "pos").then_some(())
    })
    .expect("n2 sees it again after the heal");
}

const LIFECYCLE_BASE: &str = "\
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf01}
spec: {region: us-west-2, zone: us-west-2a}
---
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf02}
spec: {region: us-west-2, zone: us-west-2b}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: pos, namespace: retail}
spec: {host: pos, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: inv, namespace: retail}
spec: {host: inv}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: pay, namespace: bank}
spec: {host: pay}
";

/// The config audit entries (`config_applied`, `config_deleted`, ...).
fn config_audits(hub: &HubProc) -> Vec<String> {
    hub.audit()
        .into_iter()
        .map(|(e, _)| e)
        .filter(|e| e.starts_with("config_"))
        .collect()
}

fn spoke_cli(s: &SpokeProc, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tidemesh_tests::bin("tidemesh-spoke"))
        .args(args)
        .arg("--data-dir")
        .arg(&s.dir)
        .output()
        .expect("run tidemesh-spoke")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn config_lifecycle_validate_dry_run_diff_delete_prune_and_spoke_dump() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut hub = HubProc::init(dir, TD);
    let hub_addr = hub.start();
    let o = apply(&hub, dir, "base", LIFECYCLE_BASE);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(config_audits(&hub), ["config_applied"]);

    let id = format!("spiffe://{TD}/store/sf01/node/n0");
    let mut spoke = SpokeProc::new(dir, "spoke0", &id);
    assert!(spoke
        .enroll(hub_addr, &hub.token(&id, "10m"))
        .status
        .success());
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(10));
    let converge = |v: u64| {
        wait_for(Duration::from_secs(10), || {
            (config_version(&spoke) == Some(v)).then_some(())
        })
        .unwrap_or_else(|| panic!("spoke did not converge to v{v}: {:?}", spoke.try_status()))
    };
    converge(1);

    // validate: offline (no data dir, no hub), same errors as apply
    let validate = |name: &str, yaml: &str, extra: &[&str]| {
        let f = dir.join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).expect("write");
        std::process::Command::new(tidemesh_tests::bin("tidemesh-hub"))
            .args(["validate", "-f", f.to_str().expect("utf8")])
            .args(extra)
            .output()
            .expect("validate")
    };
    let o = validate("ok", LIFECYCLE_BASE, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("valid: 5 objects (3 DestinationRule, 2 Store)"),
        "{}",
        text(&o)
    );
    let bad = "apiVersion: tidemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: till, namespace: retail}\nspec: {service: pos, store: sf09, serviceAccount: pos, address: 127.0.0.1:9}\n";
    let v = validate("bad", bad, &[]);
    assert!(!v.status.success());
    let a = apply(&hub, dir, "bad", bad);
    assert!(!a.status.success());
    let reason = "document 1 (Workload till): spec.store: store sf09 is not defined";
    assert!(text(&v).contains(reason), "validate: {}", text(&v));
    assert!(text(&a).contains(reason), "apply: {}", text(&a));
    // a file that refers to an applied object validates against a base
    let refers = "apiVersion: tidemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: till, namespace: retail}\nspec: {service: pos, store: sf02, serviceAccount: pos, address: 127.0.0.1:9}\n";
    assert!(!validate("refers", refers, &[]).status.success());
    let cur = hub.cli(&["config", "get"]);
    std::fs::write(dir.join("current.yaml"), &cur.stdout).expect("write");
    let base = dir.join("current.yaml");
    let o = validate("refers", refers, &["--base", base.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("valid: 1 object (1 Workload); the config would hold 8 objects"),
        "{}",
        text(&o)
    );
    assert_eq!(history(&hub).len(), 1);

    // dry run and diff: outcomes per object; no version, no audit entry
    let change = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: pos, namespace: retail}\nspec: {host: pos, subsets: [{name: v1, labels: {version: v2}}]}\n---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: cart, namespace: retail}\nspec: {host: cart}\n---\napiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {name: sf01}\nspec: {region: us-west-2, zone: us-west-2a}\n";
    let cf = dir.join("change.yaml");
    std::fs::write(&cf, change).expect("write");
    let cf = cf.to_str().expect("utf8");
    let o = hub.cli(&["apply", "-f", cf, "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    for line in [
        "DestinationRule retail/pos configured (dry run)",
        "DestinationRule retail/cart created (dry run)",
        "Store sf01 unchanged (dry run)",
    ] {
        assert!(out.contains(line), "{out}");
    }
    assert!(!out.contains("pruned"), "{out}");
    let o = hub.cli(&["apply", "-f", cf, "--dry-run", "--prune"]);
    let out = stdout(&o);
    for line in [
        "DestinationRule retail/inv pruned (dry run)",
        "Store sf02 pruned (dry run)",
    ] {
        assert!(out.contains(line), "{out}");
    }
    assert!(
        !out.contains("bank/pay"),
        "another namespace is not pruned: {out}"
    );
    let o = hub.cli(&["diff", "-f", cf]);
    assert_eq!(o.status.code(), Some(1), "differences: {}", text(&o));
    let d = stdout(&o);
    assert!(d.contains("diff DestinationRule retail/pos\n"), "{d}");
    assert!(
        d.contains("\n-      version: v1\n+      version: v2\n"),
        "{d}"
    );
    assert!(d.contains("diff DestinationRule retail/cart\n"), "{d}");
    assert!(d.contains("\n+kind: DestinationRule\n"), "{d}");
    assert!(
        !d.contains("Store sf01"),
        "unchanged objects are not shown: {d}"
    );
    let o = hub.cli(&["diff", "-f", cf, "--prune"]);
    assert!(stdout(&o).contains("diff Store sf02\n"), "{}", text(&o));
    let same = dir.join("same.yaml");
    std::fs::write(&same, LIFECYCLE_BASE).expect("write");
    let o = hub.cli(&["diff", "-f", same.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "");
    let o = hub.cli(&["diff", "-f", dir.join("bad.yaml").to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains(reason), "{}", text(&o));
    assert_eq!(history(&hub).len(), 1, "dry run and diff make no version");
    assert_eq!(config_audits(&hub).len(), 1, "nor an audit entry");

    // delete one object by name: a new version, audited; the spoke converges
    let o = hub.cli(&["delete", "DestinationRule", "retail/inv"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("DestinationRule retail/inv deleted"),
        "{}",
        text(&o)
    );
    assert_eq!(history(&hub).len(), 2);
    assert_eq!(config_audits(&hub), ["config_applied", "config_deleted"]);
    converge(2);
    let dump = spoke_cli(&spoke, &["config", "dump"]);
    assert!(dump.status.success(), "{}", text(&dump));
    let y = stdout(&dump);
    assert!(y.contains("name: pos") && !y.contains("name: inv"), "{y}");
    assert!(text(&dump).contains("config version 2"), "{}", text(&dump));
    // deleting what does not exist is refused whole
    let o = hub.cli(&["delete", "DestinationRule", "retail/inv"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("DestinationRule retail/inv does not exist"),
        "{}",
        text(&o)
    );
    let o = hub.cli(&["delete", "VirtualService", "reviews"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("NAMESPACE/NAME"), "{}", text(&o));
    assert_eq!(history(&hub).len(), 2);

    // delete -f: the objects the documents name
    let pay = dir.join("pay.yaml");
    std::fs::write(
        &pay,
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: pay, namespace: bank}\nspec: {host: pay}\n",
    )
    .expect("write");
    let o = hub.cli(&["delete", "-f", pay.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    converge(3);

    // apply --prune: sf02 goes (Store in the file), retail/cart comes
    let o = hub.cli(&["apply", "-f", cf, "--prune"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    assert!(out.contains("Store sf02 pruned"), "{out}");
    assert!(out.contains("config version 4"), "{out}");
    assert_eq!(
        config_audits(&hub),
        [
            "config_applied",
            "config_deleted",
            "config_deleted",
            "config_applied"
        ]
    );
    converge(4);
    let cur = stdout(&hub.cli(&["config", "get", "-o", "json"]));
    assert!(!cur.contains("sf02") && cur.contains("cart"), "{cur}");

    // spokes: SYNCED at the newest version, STALE once the hub moves on without it
    let o = hub.cli(&["spokes"]);
    assert!(
        stdout(&o).contains("config: SYNCED (v4 of v4)"),
        "{}",
        text(&o)
    );
    spoke.stop();
    let o = apply(&hub, dir, "sf03", &store_yaml("sf03"));
    assert!(o.status.success(), "{}", text(&o));
    let o = hub.cli(&["spokes"]);
    assert!(
        stdout(&o).contains("config: STALE (v4 of v5)"),
        "{}",
        text(&o)
    );

    // the spoke's dump works with the spoke stopped and the hub down
    hub.stop();
    let dump = spoke_cli(&spoke, &["config", "dump", "-o", "json"]);
    assert!(dump.status.success(), "{}", text(&dump));
    let docs: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("json dump");
    let names: Vec<&str> = docs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"cart") && names.contains(&"sf01"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"sf02") && !names.contains(&"sf03"),
        "{names:?}"
    );
    assert!(text(&dump).contains("config version 4"), "{}", text(&dump));
}
