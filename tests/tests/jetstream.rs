//! The hub's control-plane state on both backends: the same store-level
//! cases against redb (a temp file) and a real 3-node NATS JetStream
//! cluster on loopback; two connections (as two hub replicas would hold)
//! racing on one join token; operations going on after a NATS node is
//! SIGKILLed; `tidemesh-hub serve --store nats://...` enrolling a
//! real spoke; and two hub replicas sharing one CA, a spoke failing over
//! from one to the other. Skips (with a message) without `nats-server`, unless
//! `TIDEMESH_REQUIRE_NATS` is set.

use std::{
    process::{Child, Command},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use tidemesh_evidence::{
    samples, Batch, Chain, NewRecord, SealedRecord, UnixMillis, VerifiedBatch,
};
use tidemesh_hub::evidence::{
    nats::NatsEvidence, EvidenceBackend, EvidenceStore, IngestError, Query, Retention,
};
use tidemesh_hub::{
    state::nats::NatsState,
    store::{NodeCaRecord, TokenOutcome, TokenRecord, TokenState, TokenUse},
    AuditEntry, AuditQuery, HubState, SpokeRecord, Store,
};
use tidemesh_identity::{
    svid::{self, sha256, KeyPair},
    SpiffeId,
};
use tidemesh_policy::MeshConfig;
use tidemesh_tests::{bin, nats, run, text, wait_for, HubProc, SpokeProc, TD};

fn node(n: &str) -> String {
    format!("spiffe://{TD}/store/sf01/node/{n}")
}

fn entry(event: &str) -> AuditEntry {
    AuditEntry {
        at_ms: 1,
        event: event.into(),
        subject: None,
        detail: String::new(),
    }
}

fn spoke_rec(key: u8, at: u64) -> SpokeRecord {
    SpokeRecord {
        pinned_key: vec![key; 65],
        enrolled_ms: at,
        cert_not_after_ms: 50_000,
        last_seen_ms: at,
        revoked_ms: None,
    }
}

fn token(spoke: &str, expires_ms: u64) -> TokenRecord {
    TokenRecord {
        spoke: spoke.into(),
        created_ms: 1_000,
        expires_ms,
    }
}

/// The store-level cases, whatever the backend: token create, consume,
/// replay, burn; spoke pin update; node CAs; revocation and re-enrollment;
/// config versions; the audit log they leave.
fn exercise(s: &dyn HubState) {
    let a = node("n1");
    let b = node("n2");
    let a_id = SpiffeId::parse(&a).expect("id");
    assert_eq!(s.meta("trust_domain").expect("meta").as_deref(), Some(TD));

    // a token: valid, mismatched, expired, unknown
    let h1 = [1u8; 32];
    s.put_token(&h1, &token(&a, 100_000), &entry("token_created"))
        .expect("put");
    assert_eq!(
        s.token_state(&h1, &a, 2_000).expect("st"),
        TokenState::Valid
    );
    assert_eq!(
        s.token_state(&h1, &b, 2_000).expect("st"),
        TokenState::Mismatch { bound: a.clone() }
    );
    assert_eq!(
        s.token_state(&h1, &a, 100_000).expect("st"),
        TokenState::Expired
    );
    assert_eq!(
        s.token_state(&[0; 32], &a, 2_000).expect("st"),
        TokenState::Unknown
    );
    // consumed once; the replay is refused, noted once
    let rec = spoke_rec(4, 2_000);
    assert_eq!(
        s.consume_token(&h1, &a, 2_000, &rec, &entry("enrolled"))
            .expect("consume"),
        TokenUse::Enrolled
    );
    assert_eq!(
        s.consume_token(&h1, &a, 2_100, &rec, &entry("enrolled"))
            .expect("consume"),
        TokenUse::Invalid
    );
    let TokenState::Used(u) = s.token_state(&h1, &a, 2_200).expect("st") else {
        panic!("tombstone expected");
    };
    assert_eq!(
        (u.outcome, u.used_ms, u.replay_ms),
        (TokenOutcome::Enrolled, 2_000, None)
    );
    assert!(s.note_replay(&h1, 3_000, &entry("refused")).expect("note"));
    assert!(!s.note_replay(&h1, 3_100, &entry("refused")).expect("note"));
    assert_eq!(s.spoke(&a).expect("spoke"), Some(rec.clone()));

    // presented for another ID: burned; expired: burned once
    let h2 = [2u8; 32];
    s.put_token(&h2, &token(&b, 100_000), &entry("token_created"))
        .expect("put");
    assert_eq!(
        s.consume_token(&h2, &a, 3_000, &rec, &entry("enrolled"))
            .expect("consume"),
        TokenUse::Mismatch { bound: b.clone() }
    );
    assert!(matches!(
        s.token_state(&h2, &b, 3_100).expect("st"),
        TokenState::Used(u) if u.outcome == TokenOutcome::Mismatch
    ));
    let h3 = [3u8; 32];
    s.put_token(&h3, &token(&b, 5_000), &entry("token_created"))
        .expect("put");
    assert!(s
        .burn_token(&h3, 6_000, TokenOutcome::Expired, &entry("refused"))
        .expect("burn"));
    assert!(!s
        .burn_token(&h3, 6_100, TokenOutcome::Expired, &entry("refused"))
        .expect("burn"));
    assert_eq!(s.spoke(&b).expect("spoke"), None);

    // the pinned key and certificate expiry change (a re-key renewal)
    let updated = s
        .update_spoke(&a, Some(&entry("renewed")), &mut |r| {
            r.pinned_key = vec![5; 65];
            r.cert_not_after_ms = 60_000;
        })
        .expect("update")
        .expect("known spoke");
    assert_eq!(updated.pinned_key, vec![5; 65]);
    assert_eq!(s.spoke(&a).expect("spoke"), Some(updated));
    assert_eq!(
        s.update_spoke(&b, None, &mut |r| r.last_seen_ms = 1)
            .expect("update"),
        None
    );

    // node CAs: recorded, expired ones not returned
    let ca = NodeCaRecord {
        key_fingerprint: [9; 32],
        issued_ms: 3_000,
        not_after_ms: 90_000,
    };
    assert!(s.add_node_ca(&a, ca, 3_000, &entry("node_ca")).expect("ca"));
    assert_eq!(s.node_cas(&a, 4_000).expect("cas"), vec![ca]);
    assert!(s.node_cas(&a, 90_000).expect("cas").is_empty());

    // revocation: a new list version naming the node, its key and its CA
    assert_eq!(s.revocation_list().expect("list").version, 0);
    let (r, list) = s
        .revoke_spoke(&a_id, 7_000, &entry("revoked"))
        .expect("revoke")
        .expect("known spoke");
    assert_eq!(r.revoked_ms, Some(7_000));
    assert_eq!((list.version, list.issued_ms), (1, 7_000));
    assert!(list.nodes.contains(&a_id));
    let fps: Vec<[u8; 32]> = list.keys.iter().map(|k| k.fingerprint).collect();
    assert!(
        fps.contains(&sha256(&[5; 65])) && fps.contains(&[9; 32]),
        "{list:?}"
    );
    assert_eq!(s.revocation_list().expect("list"), list);
    assert!(
        !s.add_node_ca(&a, ca, 7_100, &entry("node_ca")).expect("ca"),
        "no node CA for a revoked spoke"
    );
    assert_eq!(s.reconcile_revocations(8_000).expect("reconcile"), list);
    let unknown = SpiffeId::parse(&node("n9")).expect("id");
    assert!(s
        .revoke_spoke(&unknown, 8_000, &entry("revoked"))
        .expect("revoke")
        .is_none());

    // enrolled again with a new token: the node leaves the list, its old
    // keys stay
    let h4 = [4u8; 32];
    s.put_token(&h4, &token(&a, 100_000), &entry("token_created"))
        .expect("put");
    assert_eq!(
        s.consume_token(&h4, &a, 9_000, &spoke_rec(6, 9_000), &entry("enrolled"))
            .expect("consume"),
        TokenUse::Enrolled
    );
    let list2 = s.revocation_list().expect("list");
    assert_eq!(list2.version, 2);
    assert!(!list2.nodes.contains(&a_id));
    assert_eq!(list2.keys, list.keys);
    assert!(s.node_cas(&a, 9_000).expect("cas").is_empty());
    assert_eq!(s.spoke(&a).expect("spoke"), Some(spoke_rec(6, 9_000)));

    // config versions
    assert!(s.config_latest().expect("latest").is_none());
    let v1 = s
        .config_append(
            "config_applied",
            10_000,
            Some(1000),
            "first".into(),
            None,
            MeshConfig::default(),
        )
        .expect("append");
    let v2 = s
        .config_append(
            "config_rolled_back",
            11_000,
            None,
            "back".into(),
            Some(1),
            MeshConfig::default(),
        )
        .expect("append");
    assert_eq!((v1.meta.version, v2.meta.version), (1, 2));
    assert_eq!(s.config_get(1).expect("get"), Some(v1.clone()));
    assert_eq!(s.config_get(3).expect("get"), None);
    assert_eq!(s.config_latest().expect("latest"), Some(v2.clone()));
    let h = s.config_history().expect("history");
    assert_eq!(h, vec![v1.meta, v2.meta]);

    let spokes = s.spokes().expect("spokes");
    assert_eq!(spokes.len(), 1);
    assert_eq!(spokes[0].0, a);

    // the audit log: 4 tokens created, 2 enrolled, 1 replay, 1 burn,
    // 1 renewal, 1 node CA, 1 revocation, 2 config versions
    assert_eq!(s.audit_len().expect("len"), 13);
    let log = s.audit_log().expect("log");
    assert_eq!(
        log.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        (1..=13).collect::<Vec<_>>()
    );
    assert_eq!(log[0].1.event, "token_created");
    assert_eq!(log[12].1.event, "config_rolled_back");
    assert_eq!(log[12].1.detail, "version 2: back");
    let page = s
        .audit_page(&AuditQuery {
            before: None,
            after: None,
            limit: 3,
        })
        .expect("page");
    assert_eq!(
        page.entries.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    assert_eq!((page.older, page.newer), (Some(11), None));
    let page = s
        .audit_page(&AuditQuery {
            before: None,
            after: Some(2),
            limit: 2,
        })
        .expect("page");
    assert_eq!(
        page.entries.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!((page.older, page.newer), (None, Some(4)));
}

#[test]
fn store_cases_pass_on_redb() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Store::create(&tmp.path().join("hub.db"), TD).expect("create");
    assert_eq!(HubState::backend(&s), "redb");
    exercise(&s);
}

#[test]
fn store_cases_pass_on_jetstream() {
    if !nats::available("store_cases_pass_on_jetstream") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let s = NatsState::init(&cluster.servers(), TD).expect("init");
    assert_eq!(s.backend(), "jetstream");
    exercise(&s);
    // every bucket and the audit stream on all three servers
    for stream in [
        "KV_tidemesh_meta",
        "KV_tidemesh_tokens",
        "KV_tidemesh_spokes",
        "KV_tidemesh_node_cas",
        "KV_tidemesh_revocations",
        "KV_tidemesh_config",
        "TIDEMESH_AUDIT",
    ] {
        let n = wait_for(Duration::from_secs(10), || {
            cluster.stream_servers(stream).filter(|&n| n == 3)
        });
        assert_eq!(
            n,
            Some(3),
            "{stream} on 3 servers: {:?}",
            cluster.stream_servers(stream)
        );
    }
    // a second init is refused; open finds the same state
    let e = NatsState::init(&cluster.servers(), TD).expect_err("second init");
    assert!(e.to_string().contains("already holds a hub"), "{e}");
    let again = NatsState::open(&cluster.servers()).expect("open");
    assert_eq!(again.audit_len().expect("len"), 13);
    assert_eq!(again.revocation_list().expect("list").version, 2);
}

/// Two connections, as two hub replicas hold, present one join token at
/// once, 50 times: exactly one enrolls each time, and the spoke record
/// is the winner's.
#[test]
fn two_hubs_racing_on_one_token_exactly_one_wins() {
    if !nats::available("two_hubs_racing_on_one_token_exactly_one_wins") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let hubs: [Arc<dyn HubState>; 2] = [
        Arc::new(NatsState::init(&cluster.servers(), TD).expect("init")),
        Arc::new(NatsState::open(&cluster.servers()).expect("open")),
    ];
    let mut wins = [0u32; 2];
    for race in 0..50u8 {
        let id = node(&format!("r{race}"));
        let hash = [race; 32];
        hubs[0]
            .put_token(&hash, &token(&id, u64::MAX), &entry("token_created"))
            .expect("put");
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2u8)
            .map(|i| {
                let (hub, barrier, id) = (hubs[i as usize].clone(), barrier.clone(), id.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    hub.consume_token(&hash, &id, 2_000, &spoke_rec(i, 2_000), &entry("enrolled"))
                        .expect("consume")
                })
            })
            .collect();
        let got: Vec<TokenUse> = racers
            .into_iter()
            .map(|t| t.join().expect("racer"))
            .collect();
        let winners: Vec<usize> = (0..2).filter(|&i| got[i] == TokenUse::Enrolled).collect();
        assert_eq!(winners.len(), 1, "race {race}: {got:?}");
        let w = winners[0];
        assert_eq!(got[1 - w], TokenUse::Invalid, "race {race}: {got:?}");
        wins[w] += 1;
        let stored = hubs[1 - w].spoke(&id).expect("spoke").expect("enrolled");
        assert_eq!(stored.pinned_key, vec![w as u8; 65], "race {race}");
    }
    eprintln!("winning connection per race: {wins:?} of 50");
    assert_eq!(
        hubs[0].audit_len().expect("len"),
        100,
        "50 tokens, 50 enrollments"
    );
    eprintln!("wins per connection: {wins:?}");
}

/// SIGKILL the server leading the join-token bucket: token consume,
/// revocation and config put go on with the other two.
#[test]
fn operations_continue_after_a_nats_node_is_killed() {
    if !nats::available("operations_continue_after_a_nats_node_is_killed") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cluster = nats::Cluster::start(tmp.path(), 3);
    let s = NatsState::init(&cluster.servers(), TD).expect("init");
    let a = node("n1");
    s.put_token(&[1; 32], &token(&a, u64::MAX), &entry("token_created"))
        .expect("put");
    s.put_token(
        &[2; 32],
        &token(&node("n2"), u64::MAX),
        &entry("token_created"),
    )
    .expect("put");
    s.config_append(
        "config_applied",
        1_000,
        None,
        "before".into(),
        None,
        MeshConfig::default(),
    )
    .expect("append");
    let victim = wait_for(Duration::from_secs(10), || {
        cluster.stream_leader("KV_tidemesh_tokens")
    })
    .expect("the tokens bucket has a leader");
    cluster.kill(victim);
    let t0 = Instant::now();
    assert_eq!(
        s.consume_token(
            &[1; 32],
            &a,
            2_000,
            &spoke_rec(1, 2_000),
            &entry("enrolled")
        )
        .unwrap_or_else(|e| panic!("consume after the kill: {e}\n{}", cluster.logs())),
        TokenUse::Enrolled
    );
    let first = t0.elapsed();
    let (_, list) = s
        .revoke_spoke(&SpiffeId::parse(&a).expect("id"), 3_000, &entry("revoked"))
        .expect("revoke after the kill")
        .expect("known spoke");
    assert_eq!(list.version, 1);
    let v = s
        .config_append(
            "config_applied",
            4_000,
            None,
            "after".into(),
            None,
            MeshConfig::default(),
        )
        .expect("config after the kill");
    assert_eq!(v.meta.version, 2);
    // the single use still holds on two servers
    assert_eq!(
        s.consume_token(
            &[1; 32],
            &a,
            5_000,
            &spoke_rec(1, 5_000),
            &entry("enrolled")
        )
        .expect("consume"),
        TokenUse::Invalid
    );
    assert_eq!(
        s.consume_token(
            &[2; 32],
            &node("n2"),
            5_000,
            &spoke_rec(2, 5_000),
            &entry("enrolled")
        )
        .expect("consume"),
        TokenUse::Enrolled
    );
    // and a new connection (a hub starting now) reads it all
    let fresh = NatsState::open(&cluster.servers()).expect("open with a server down");
    assert_eq!(
        fresh
            .config_latest()
            .expect("latest")
            .map(|v| v.meta.version),
        Some(2)
    );
    assert_eq!(fresh.revocation_list().expect("list").version, 1);
    assert_eq!(fresh.audit_len().expect("len"), 7);
    eprintln!("killed n{victim} (tokens leader); first operation after it took {first:?}");
}

#[test]
fn unknown_store_schemes_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("hub");
    let dir = dir.to_str().expect("utf8");
    for args in [
        &["init", "--trust-domain", TD, "--data-dir", dir][..],
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", dir][..],
    ] {
        let cmd = args[0];
        let o = run(Command::new(bin("tidemesh-hub"))
            .args(args)
            .args(["--store", "etcd://127.0.0.1:2379"]));
        assert!(!o.status.success(), "{cmd}: {}", text(&o));
        assert!(text(&o).contains("unknown store"), "{cmd}: {}", text(&o));
    }
    assert!(!tmp.path().join("hub").join("ca_key.pem").exists());
}

/// `tidemesh-hub init|serve --store nats://...` enrolls a real spoke; the
/// hub keeps its CA in the data directory and no `hub.db`.
#[test]
fn hub_serve_on_jetstream_enrolls_a_spoke() {
    if !nats::available("hub_serve_on_jetstream_enrolls_a_spoke") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let url = cluster.url();
    let mut hub =
        HubProc::init_with(tmp.path(), TD, &["--store", &url]).with_args(&["--store", &url]);
    assert!(hub.dir.join("ca_key.pem").exists());
    assert!(!hub.dir.join("hub.db").exists(), "the state is in NATS");
    let addr = hub.start();
    assert!(
        !hub.dir.join("evidence.db").exists(),
        "evidence is in the cluster too"
    );
    assert!(!hub.dir.join("hub.db").exists());
    let id = node("n1");
    let tok = hub.token(&id, "10m");
    let mut spoke = SpokeProc::new(tmp.path(), "s1", &id);
    let o = spoke.enroll(addr, &tok);
    assert!(o.status.success(), "enroll: {}\n{}", text(&o), hub.log());
    // the token is single use through the hub too
    let again = SpokeProc::new(tmp.path(), "s1b", &id).enroll(addr, &tok);
    assert!(!again.status.success(), "a used token enrolled again");
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(15));
    wait_for(Duration::from_secs(10), || {
        hub.spoke(&id).filter(|r| r["connected"] == true)
    })
    .unwrap_or_else(|| panic!("hub lists the spoke: {}", hub.log()));
    // the records are in the buckets: a second connection reads them
    let s = NatsState::open(&cluster.servers()).expect("open");
    assert!(s.spoke(&id).expect("spoke").is_some());
    let events: Vec<String> = s
        .audit_log()
        .expect("audit")
        .into_iter()
        .map(|(_, e)| e.event)
        .collect();
    assert!(
        events.iter().any(|e| e == "token_created") && events.iter().any(|e| e == "enrolled"),
        "{events:?}"
    );
    hub.stop();
}

/// A second `serve --store nats://...` replica of the hub behind `a`:
/// its own data directory holding a copy of `a`'s CA key and certificate
/// (made by `init` with the default store, whose `hub.db` is removed, then
/// given `a`'s CA files), serving from the same cluster.
fn second_replica(root: &std::path::Path, a: &HubProc, url: &str) -> HubProc {
    let b = HubProc::init(root, TD).with_args(&["--store", url]);
    for f in ["ca_key.pem", "ca.pem"] {
        std::fs::copy(a.dir.join(f), b.dir.join(f)).expect("copy the CA file");
    }
    std::fs::remove_file(b.dir.join("hub.db")).expect("remove hub.db");
    b
}

/// Two hub replicas on one cluster: a config applied through replica A
/// wakes the long poll a spoke holds on replica B (within 2 s of the
/// apply, against the spoke's 20 s poll), also after the NATS server
/// leading the config bucket is killed; and a spoke revoked through A is
/// cut off by B.
#[test]
fn an_apply_on_one_replica_reaches_spokes_on_the_other() {
    if !nats::available("an_apply_on_one_replica_reaches_spokes_on_the_other") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cluster = nats::Cluster::start(tmp.path(), 3);
    let url = cluster.url();
    let mut a =
        HubProc::init_with(tmp.path(), TD, &["--store", &url]).with_args(&["--store", &url]);
    let mut b = second_replica(&tmp.path().join("b"), &a, &url);
    a.start();
    let b_addr = b.start();

    // a spoke enrolled through B and connected to B only
    let id = node("n1");
    let mut spoke = SpokeProc::new(tmp.path(), "s1", &id);
    let o = spoke.enroll(b_addr, &b.token(&id, "10m"));
    assert!(o.status.success(), "enroll at B: {}\n{}", text(&o), b.log());
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(15));
    assert!(spoke.status()["config_version"].is_null());
    // its long poll is held by B now
    std::thread::sleep(Duration::from_millis(500));

    let f = tmp.path().join("mesh.yaml");
    for (version, doc) in [
        (1, tidemesh_tests::STORE_SF01.to_owned()),
        (
            2,
            tidemesh_tests::STORE_SF01.replace("us-west-2a", "us-west-2b"),
        ),
    ] {
        std::fs::write(&f, doc).expect("yaml");
        let t0 = Instant::now();
        let o = a.cli(&["apply", "-f", f.to_str().expect("utf8")]);
        assert!(o.status.success(), "apply at A: {}", text(&o));
        let applied = t0.elapsed();
        let t1 = Instant::now();
        wait_for(Duration::from_secs(15), || {
            (spoke.try_status()?["config_version"] == version).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "version {version} applied at A never reached the spoke on B: {:?}\nB:\n{}",
                spoke.try_status(),
                b.log()
            )
        });
        let reached = t1.elapsed();
        eprintln!(
            "version {version}: apply at A took {applied:?}; the spoke on B had it {reached:?} after"
        );
        assert!(
            reached <= Duration::from_secs(2),
            "version {version} reached the spoke on B {reached:?} after the apply at A (the poll would have returned by itself after 20 s)"
        );
    }
    // B's own view follows too
    let o = b.cli(&["config", "get"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("us-west-2b"), "{}", text(&o));

    // the NATS server leading the config bucket is killed: the watches
    // are re-created on the other two, and the next apply still wakes B
    let victim = wait_for(Duration::from_secs(10), || {
        cluster.stream_leader("KV_tidemesh_config")
    })
    .expect("the config bucket has a leader");
    cluster.kill(victim);
    std::fs::write(
        &f,
        tidemesh_tests::STORE_SF01.replace("us-west-2a", "us-west-2c"),
    )
    .expect("yaml");
    let t0 = Instant::now();
    let o = a.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(
        o.status.success(),
        "apply at A after the kill: {}",
        text(&o)
    );
    let applied = t0.elapsed();
    let t1 = Instant::now();
    wait_for(Duration::from_secs(30), || {
        (spoke.try_status()?["config_version"] == 3).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "version 3 (after killing n{victim}) never reached the spoke on B: {:?}\nB:\n{}",
            spoke.try_status(),
            b.log()
        )
    });
    let reached = t1.elapsed();
    eprintln!(
        "killed n{victim} (config bucket leader): the apply at A took {applied:?}; the spoke on B had version 3 {reached:?} after"
    );
    assert!(
        reached < Duration::from_secs(15),
        "{reached:?}: the spoke's own 20 s poll, not the watch"
    );

    // revoked through A: B closes the spoke's session and refuses it
    let t0 = Instant::now();
    let o = a.cli(&["revoke", "--spoke", &id]);
    assert!(o.status.success(), "revoke at A: {}", text(&o));
    spoke.wait_state("revoked", Duration::from_secs(15));
    eprintln!(
        "revocation at A reached the spoke on B in {:?}",
        t0.elapsed()
    );
    let row = b.spoke(&id).expect("listed at B");
    assert_eq!(row["connected"], false, "{row}");
    spoke.kill();
    spoke.start();
    std::thread::sleep(Duration::from_secs(3));
    let st = spoke.status();
    assert_eq!(st["connected"], false, "{st}");
    assert_eq!(b.spoke(&id).expect("listed")["connected"], false);
    spoke.stop();
    a.stop();
    b.stop();
}

const T0: u64 = 1_705_314_600_000;

/// Requests 1..=n of `spoke`, record `i` at `T0 + i s`; bodies differ from
/// `fork_at` on (another chain sharing the first records).
fn ev_chain(spoke: &SpiffeId, n: u64, fork_at: u64) -> Vec<SealedRecord> {
    let mut chain = Chain::genesis(spoke);
    (1..=n)
        .map(|i| {
            let t = UnixMillis(T0 + i * 1000);
            let body = samples::request(if i >= fork_at { i + 1000 } else { i }, t);
            chain.append(NewRecord::new(t, body)).expect("appends")
        })
        .collect()
}

fn signed(spoke: &SpiffeId, key: &KeyPair, recs: &[SealedRecord]) -> VerifiedBatch {
    Batch::sign(spoke.clone(), recs.to_vec(), key)
        .expect("signs")
        .verify_signature(key.public_key_raw())
        .expect("verifies")
}

fn all() -> Query {
    Query {
        since: None,
        kind: None,
        from_seq: None,
        limit: usize::MAX,
    }
}

/// The evidence store cases, whatever the backend: batches in order, a
/// resend overlapping what is stored (duplicates, stored once), a batch
/// ahead of the high-water mark, a fork, a refusal the caller decided;
/// stats, query and verify after each.
fn exercise_evidence(s: &dyn EvidenceBackend) {
    let key = svid::generate_key().expect("key");
    let a = SpiffeId::parse(&node("ev-a")).expect("id");
    let b = SpiffeId::parse(&node("ev-b")).expect("id");
    let now = UnixMillis(T0 + 100_000);
    let c = ev_chain(&a, 10, u64::MAX);

    assert_eq!(s.position(&a).expect("pos").last_seq(), 0);
    let o = s
        .ingest(&signed(&a, &key, &c[0..4]), [7; 32], now)
        .expect("1..=4");
    assert_eq!((o.position.last_seq(), o.stored, o.duplicates), (4, 4, 0));
    assert_eq!(o.first_stored, Some(1));
    // a resend of 3..=6 (the ack of 1..=4 lost): 3, 4 duplicates, 5, 6 new
    let o = s
        .ingest(&signed(&a, &key, &c[2..6]), [7; 32], now)
        .expect("3..=6");
    assert_eq!((o.position.last_seq(), o.stored, o.duplicates), (6, 2, 2));
    assert_eq!(o.first_stored, Some(5));
    // the same again: all duplicates, nothing stored
    let o = s
        .ingest(&signed(&a, &key, &c[2..6]), [7; 32], now)
        .expect("again");
    assert_eq!((o.position.last_seq(), o.stored, o.duplicates), (6, 0, 4));
    // ahead: 8..=10 while the hub holds up to 6
    let e = s
        .ingest(&signed(&a, &key, &c[7..10]), [7; 32], now)
        .expect_err("ahead");
    assert!(matches!(e, IngestError::Ahead { .. }), "{e}");
    assert_eq!(s.position(&a).expect("pos").last_seq(), 6);
    // a fork: another record 2 (bytes differ from the stored one)
    let fork = ev_chain(&a, 8, 2);
    let e = s
        .ingest(&signed(&a, &key, &fork[1..8]), [7; 32], now)
        .expect_err("fork");
    assert!(matches!(e, IngestError::Fork { .. }), "{e}");
    // the rest, in order
    let o = s
        .ingest(&signed(&a, &key, &c[6..10]), [7; 32], now)
        .expect("7..=10");
    assert_eq!((o.position.last_seq(), o.stored), (10, 4));
    s.record_rejection(&a, "bad signature", now)
        .expect("reject");

    let st = s.stats(&a).expect("stats");
    assert_eq!(st.high_water_mark, 10);
    assert_eq!(st.records, 10);
    assert_eq!(st.first_seq_held, 1);
    assert_eq!(st.rejected_batches, 2, "the fork and the rejection");
    assert_eq!(st.chain_breaks, 1, "the fork");
    assert!(!st.chain_ok);
    assert_eq!(st.last_error.as_deref(), Some("bad signature"));
    let got = s.query(&a, &all()).expect("query");
    assert_eq!(got, c, "every record once, in order");
    let q = Query {
        from_seq: Some(5),
        limit: 3,
        ..all()
    };
    let got: Vec<u64> = s
        .query(&a, &q)
        .expect("query")
        .iter()
        .map(|r| r.seq.get())
        .collect();
    assert_eq!(got, vec![5, 6, 7]);
    let v = s.verify(&a).expect("verify");
    assert!(v.ok, "{v:?}");
    assert_eq!((v.records_checked, v.from_seq, v.to_seq), (10, 1, 10));

    // another spoke is separate
    assert_eq!(s.position(&b).expect("pos").last_seq(), 0);
    let cb = ev_chain(&b, 3, u64::MAX);
    let o = s.ingest(&signed(&b, &key, &cb), [7; 32], now).expect("b");
    assert_eq!(o.position.last_seq(), 3);
    assert!(s.verify(&b).expect("verify b").ok);
    assert_eq!(s.stats(&b).expect("stats b").records, 3);
    assert_eq!(s.stats(&a).expect("stats a").records, 10);
}

#[test]
fn evidence_store_cases_pass_on_redb() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = EvidenceStore::open(&tmp.path().join("evidence.db")).expect("open");
    assert_eq!(EvidenceBackend::backend(&s), "redb");
    exercise_evidence(&s);
}

#[test]
fn evidence_store_cases_pass_on_jetstream() {
    if !nats::available("evidence_store_cases_pass_on_jetstream") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let s = NatsEvidence::open(&cluster.servers()).expect("open");
    assert_eq!(s.backend(), "jetstream");
    exercise_evidence(&s);
    let n = wait_for(Duration::from_secs(10), || {
        cluster
            .stream_servers("TIDEMESH_EVIDENCE")
            .filter(|&n| n == 3)
    });
    assert_eq!(n, Some(3), "the evidence stream on 3 servers");
    // not there yet: refused with a message, nothing changed
    let a = SpiffeId::parse(&node("ev-a")).expect("id");
    let e = s
        .prune(&Retention::default(), UnixMillis(T0))
        .expect_err("prune");
    assert!(
        e.to_string().contains("not available on the JetStream"),
        "{e}"
    );
    let e = s.aggregates(None).expect_err("aggregates");
    assert!(
        e.to_string().contains("not available on the JetStream"),
        "{e}"
    );
    let resume = s.position(&a).expect("pos");
    let e = s
        .declare_gap(&a, &resume, "lost disk", UnixMillis(T0))
        .expect_err("gap");
    assert!(
        e.to_string().contains("not available on the JetStream"),
        "{e}"
    );
    let listed: Vec<String> = s
        .spokes()
        .expect("spokes")
        .into_iter()
        .map(|x| x.spoke)
        .collect();
    assert_eq!(listed, vec![node("ev-a"), node("ev-b")]);
    // a second connection (another replica) reads the same chain
    let again = NatsEvidence::open(&cluster.servers()).expect("open again");
    assert_eq!(again.position(&a).expect("pos").last_seq(), 10);
    assert!(again.verify(&a).expect("verify").ok);
}

/// Two connections, as two hub replicas hold, accept the same spoke's
/// next batch at once, 30 times: each time exactly one stores it, the
/// other finds it stored (all duplicates) and acks the same position;
/// every record is stored once and the chain verifies.
#[test]
fn two_replicas_racing_on_one_spokes_batch_store_it_once() {
    if !nats::available("two_replicas_racing_on_one_spokes_batch_store_it_once") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let hubs: [Arc<NatsEvidence>; 2] = [
        Arc::new(NatsEvidence::open(&cluster.servers()).expect("open")),
        Arc::new(NatsEvidence::open(&cluster.servers()).expect("open")),
    ];
    let key = Arc::new(svid::generate_key().expect("key"));
    let spoke = SpiffeId::parse(&node("racer")).expect("id");
    let per = 5u64;
    let races = 30u64;
    let c = Arc::new(ev_chain(&spoke, per * races, u64::MAX));
    let mut wins = [0u32; 2];
    for race in 0..races {
        let lo = (race * per) as usize;
        let batch = Arc::new(signed(&spoke, &key, &c[lo..lo + per as usize]));
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|i| {
                let (hub, barrier, batch) = (hubs[i].clone(), barrier.clone(), batch.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    hub.ingest(&batch, [i as u8; 32], UnixMillis(T0))
                        .expect("ingest")
                })
            })
            .collect();
        let got: Vec<_> = racers
            .into_iter()
            .map(|t| t.join().expect("racer"))
            .collect();
        let end = (race + 1) * per;
        for o in &got {
            assert_eq!(o.position.last_seq(), end, "race {race}: {got:?}");
        }
        let winners: Vec<usize> = (0..2).filter(|&i| got[i].stored > 0).collect();
        assert_eq!(winners.len(), 1, "race {race}: {got:?}");
        let w = winners[0];
        assert_eq!(got[w].stored as u64, per, "race {race}: {got:?}");
        assert_eq!(got[1 - w].duplicates as u64, per, "race {race}: {got:?}");
        wins[w] += 1;
    }
    eprintln!("winning replica per race: {wins:?} of {races}");
    let st = hubs[0].stats(&spoke).expect("stats");
    assert_eq!(st.high_water_mark, per * races);
    assert_eq!(st.records, per * races);
    assert_eq!(st.batches, races, "one stored batch per race");
    let stored: Vec<u64> = hubs[1]
        .query(&spoke, &all())
        .expect("query")
        .iter()
        .map(|r| r.seq.get())
        .collect();
    assert_eq!(stored, (1..=per * races).collect::<Vec<_>>(), "each once");
    let v = hubs[1].verify(&spoke).expect("verify");
    assert!(v.ok && v.records_checked == per * races, "{v:?}");
}

fn spoke_evidence_stats(s: &SpokeProc) -> Option<serde_json::Value> {
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["evidence", "stats", "--json", "--data-dir"])
        .arg(&s.dir));
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn hub_evidence(hub: &HubProc, cmd: &str, spoke: &str) -> serde_json::Value {
    let o = hub.cli(&["evidence", cmd, "--spoke", spoke, "--json"]);
    assert!(
        o.status.success(),
        "evidence {cmd}: {}\n{}",
        text(&o),
        hub.log()
    );
    serde_json::from_slice(&o.stdout).expect("json")
}

/// Every record 1..=`committed` of `spoke` is stored at `hub` once, in
/// order, and the chain verifies. The spoke is still running and may
/// commit (and sync) more records meanwhile, its mode transitions for one,
/// so the hub's count is checked against its own high-water mark.
fn assert_stored_once(hub: &HubProc, spoke: &str, committed: u64) {
    let hs = hub_evidence(hub, "stats", spoke);
    let hwm = hs["high_water_mark"].as_u64().expect("high-water mark");
    assert!(hwm >= committed, "{hs}");
    assert_eq!(hs["records"].as_u64(), Some(hwm), "{hs}");
    assert_eq!(hs["chain_ok"], true, "{hs}");
    let v = hub_evidence(hub, "verify", spoke);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["records_checked"].as_u64().unwrap_or(0) >= committed,
        "{v}"
    );
    let mut next = 1u64;
    while next <= committed {
        let o = hub.cli(&[
            "evidence",
            "query",
            "--spoke",
            spoke,
            "--from-seq",
            &next.to_string(),
            "--limit",
            "5000",
            "--json",
        ]);
        assert!(o.status.success(), "query: {}", text(&o));
        let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("record json"))
            .collect();
        assert!(!recs.is_empty(), "{spoke}: nothing from {next}");
        for r in recs {
            assert_eq!(r["seq"].as_u64(), Some(next), "{spoke}: record {r}");
            next += 1;
        }
    }
}

/// Two `serve --store nats://...` replicas share one cluster (B joined
/// with A's CA files). Three spokes with `hub = [A, B]` send `drill load`
/// evidence to A; A is SIGKILLed mid-ingest; the spokes move to B on
/// their own and resend: for each, the stored chain ends at the spoke's
/// last committed seq, every record once, and it verifies.
#[test]
fn three_spokes_fail_over_mid_ingest_and_every_record_is_stored_once() {
    if !nats::available("three_spokes_fail_over_mid_ingest_and_every_record_is_stored_once") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let url = cluster.url();
    let mut a =
        HubProc::init_with(tmp.path(), TD, &["--store", &url]).with_args(&["--store", &url]);
    let b_dir = tmp.path().join("hub-b");
    copy_ca(&a.dir, &b_dir);
    let o = hub_cmd(&["init", "--join"], &b_dir, &url);
    assert!(o.status.success(), "join: {}", text(&o));
    let mut b = HubProc::at(b_dir, TD).with_args(&["--store", &url]);
    let a_addr = a.start();
    let b_addr = b.start();
    let hubs = format!("hub = [\"{a_addr}\", \"{b_addr}\"]\n");
    let mut spokes: Vec<SpokeProc> = (1..=3)
        .map(|i| {
            let name = format!("s{i}");
            let id = node(&format!("n{i}"));
            let s = SpokeProc::new(tmp.path(), &name, &id);
            let o = s.enroll(a_addr, &a.token(&id, "10m"));
            assert!(o.status.success(), "enroll {id}: {}\n{}", text(&o), a.log());
            let cfg = tidemesh_tests::write_config(tmp.path(), &name, &hubs);
            let mut s = s.with_args(&["--config", &cfg, "--evidence-drain-rate", "1000"]);
            s.start();
            s
        })
        .collect();
    for s in &spokes {
        let st = s.wait_state("connected", Duration::from_secs(15));
        assert_eq!(st["hub"], a_addr.to_string(), "{st}");
    }
    let loads: Vec<Child> = spokes.iter().map(|s| s.drill_load(400, "5s")).collect();
    // mid-ingest: A has stored some of every spoke's load
    let at_kill: Vec<u64> = wait_for(Duration::from_secs(30), || {
        let hwms: Vec<u64> = spokes
            .iter()
            .map(|s| {
                hub_evidence(&a, "stats", &s.id)["high_water_mark"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect();
        hwms.iter().all(|&h| h >= 300).then_some(hwms)
    })
    .unwrap_or_else(|| panic!("A did not store 300 of each: {}", a.log()));
    a.kill();
    let t0 = Instant::now();
    for load in loads {
        let o = load.wait_with_output().expect("drill output");
        assert!(o.status.success(), "drill load: {}", text(&o));
    }
    let mut moved = Vec::new();
    for (s, &killed_at) in spokes.iter().zip(&at_kill) {
        let committed = spoke_evidence_stats(s).expect("spoke stats")["last_committed_seq"]
            .as_u64()
            .expect("committed");
        assert!(
            committed > killed_at,
            "{}: A was killed after the end: {killed_at} of {committed}",
            s.id
        );
        // the spoke keeps committing (its mode transitions are evidence
        // too): caught up is nothing pending and the hub at the spoke's
        // last committed seq, both seen in one look
        let caught_up = wait_for(Duration::from_secs(90), || {
            let st = s.try_status()?;
            let ev = spoke_evidence_stats(s)?;
            let hs = hub_evidence(&b, "stats", &s.id);
            let now = ev["last_committed_seq"].as_u64()?;
            (st["hub"] == b_addr.to_string().as_str()
                && ev["pending_records"] == 0
                && now >= committed
                && hs["high_water_mark"].as_u64() == Some(now))
            .then_some(now)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} did not catch up at B to {committed}: status {:?} spoke {:?} hub {}\n{}\n{}",
                s.id,
                s.try_status(),
                spoke_evidence_stats(s),
                hub_evidence(&b, "stats", &s.id),
                s.log(),
                b.log()
            )
        });
        moved.push((killed_at, caught_up, t0.elapsed()));
        assert_stored_once(&b, &s.id, caught_up);
    }
    eprintln!(
        "replica A killed mid-ingest; per spoke (A's high-water mark at the kill, committed, caught up at B after the kill): {moved:?}"
    );
    for s in &mut spokes {
        s.stop();
    }
    b.stop();
}

/// `sha256:HEX` from an `init` or `init --join` output.
fn fingerprint_line(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ca fingerprint sha256:"))
        .unwrap_or_else(|| panic!("no fingerprint in {}", text(o)))
        .to_owned()
}

/// Copies the CA files of one hub data directory into another (mode 0700
/// directory, 0600 key), as an operator's `install -m 600` does.
fn copy_ca(from: &std::path::Path, to: &std::path::Path) {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)
        .expect("replica dir");
    for f in ["ca.pem", "ca_key.pem"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy CA file");
        std::fs::set_permissions(to.join(f), std::fs::Permissions::from_mode(0o600)).expect("mode");
    }
}

fn hub_cmd(args: &[&str], dir: &std::path::Path, url: &str) -> std::process::Output {
    run(Command::new(bin("tidemesh-hub"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--store", url]))
}

/// Two hub replicas on one JetStream cluster: B joins with A's CA files
/// (`init --join`), a data directory with another CA is refused by `init
/// --join` and `serve` naming both fingerprints; a spoke enrolled through
/// A with `hub = [A, B]` keeps working through B once A is SIGKILLed: it
/// reconnects, renews its node SVID and receives a config applied on B,
/// and its status names B.
#[test]
fn hub_replicas_share_one_ca_and_a_spoke_fails_over() {
    if !nats::available("hub_replicas_share_one_ca_and_a_spoke_fails_over") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = nats::Cluster::start(tmp.path(), 3);
    let url = cluster.url();
    let serve = ["--store", url.as_str(), "--node-ttl", "16s"];
    let mut a = HubProc::init_with(tmp.path(), TD, &["--store", &url]).with_args(&serve);

    // a replica needs A's CA files first
    let b_dir = tmp.path().join("hub-b");
    let o = hub_cmd(&["init", "--join"], &b_dir, &url);
    assert!(!o.status.success(), "join without the CA: {}", text(&o));
    assert!(
        text(&o).contains("ca_key.pem") || text(&o).contains("ca.pem"),
        "{}",
        text(&o)
    );
    assert!(!b_dir.exists(), "a refused join creates nothing");
    copy_ca(&a.dir, &b_dir);
    let o = hub_cmd(&["init", "--join"], &b_dir, &url);
    assert!(o.status.success(), "join: {}", text(&o));
    let fp = fingerprint_line(&o);
    let mut files: Vec<String> = std::fs::read_dir(&b_dir)
        .expect("replica dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["ca.pem", "ca_key.pem"], "join creates nothing");
    // init recorded A's CA in the cluster
    let state = NatsState::open(&cluster.servers()).expect("open");
    assert_eq!(
        state.meta("ca_fingerprint").expect("meta").as_deref(),
        Some(fp.as_str())
    );

    // a data directory holding another hub's CA is refused, naming both
    let other = run(Command::new(bin("tidemesh-hub"))
        .args(["init", "--trust-domain", TD, "--data-dir"])
        .arg(tmp.path().join("other")));
    assert!(other.status.success(), "{}", text(&other));
    let other_fp = fingerprint_line(&other);
    assert_ne!(other_fp, fp);
    let x_dir = tmp.path().join("hub-x");
    copy_ca(&tmp.path().join("other"), &x_dir);
    for args in [
        &["init", "--join"][..],
        &["serve", "--listen", "127.0.0.1:0"][..],
    ] {
        let o = hub_cmd(args, &x_dir, &url);
        assert!(
            !o.status.success(),
            "{args:?} with another CA: {}",
            text(&o)
        );
        let msg = text(&o);
        assert!(
            msg.contains(&format!("sha256:{fp}")) && msg.contains(&format!("sha256:{other_fp}")),
            "{args:?}: {msg}"
        );
    }

    let addr_a = a.start();
    let o = apply_store(&a, tmp.path(), "v1");
    assert!(o.status.success(), "apply on A: {}", text(&o));
    let mut b = HubProc::at(b_dir, TD).with_args(&serve);
    let addr_b = b.start();
    assert_ne!(addr_a, addr_b);
    assert_ne!(a.dir.join("admin.sock"), b.dir.join("admin.sock"));

    let id = node("n1");
    let spoke = SpokeProc::new(tmp.path(), "s1", &id);
    let o = spoke.enroll(addr_a, &a.token(&id, "10m"));
    assert!(
        o.status.success(),
        "enroll through A: {}\n{}",
        text(&o),
        a.log()
    );
    let cfg = tidemesh_tests::write_config(
        tmp.path(),
        "s1",
        &format!("hub = [\"{addr_a}\", \"{addr_b}\"]\n"),
    );
    let mut spoke = spoke.with_args(&["--config", &cfg]);
    spoke.start();
    let st = spoke.wait_state("connected", Duration::from_secs(15));
    assert_eq!(st["hub"], addr_a.to_string(), "{st}");
    assert_eq!(
        st["hubs"],
        serde_json::json!([addr_a.to_string(), addr_b.to_string()])
    );
    wait_for(Duration::from_secs(10), || {
        (spoke.try_status()?["config_version"] == 1).then_some(())
    })
    .expect("config v1 through A");

    a.kill();
    let t0 = Instant::now();
    let st = wait_for(Duration::from_secs(30), || {
        spoke
            .try_status()
            .filter(|s| s["state"] == "connected" && s["hub"] == addr_b.to_string().as_str())
    })
    .unwrap_or_else(|| {
        panic!(
            "the spoke did not move to B: {:?}\n{}",
            spoke.try_status(),
            spoke.log()
        )
    });
    let moved = t0.elapsed();
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["status", "--data-dir"])
        .arg(&spoke.dir));
    assert!(
        text(&o).contains(&format!("hub:             {addr_b}")),
        "{}",
        text(&o)
    );
    wait_for(Duration::from_secs(10), || {
        b.spoke(&id).filter(|r| r["connected"] == true)
    })
    .unwrap_or_else(|| panic!("B lists the spoke connected: {}", b.log()));

    // it renews through B (a 16 s node SVID renews at half life)
    let cert = st["cert_not_after"].clone();
    let renewed = wait_for(Duration::from_secs(30), || {
        spoke
            .try_status()
            .filter(|s| s["cert_not_after"] != cert && s["hub"] == addr_b.to_string().as_str())
    })
    .unwrap_or_else(|| {
        panic!(
            "no renewal through B: {:?}\n{}",
            spoke.try_status(),
            b.log()
        )
    });
    assert_eq!(renewed["connected"], true);

    // and receives a config applied on B
    let o = apply_store(&b, tmp.path(), "v2");
    assert!(o.status.success(), "apply on B: {}", text(&o));
    let t1 = Instant::now();
    wait_for(Duration::from_secs(10), || {
        (spoke.try_status()?["config_version"] == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("config v2 from B: {:?}\n{}", spoke.try_status(), b.log()));
    eprintln!(
        "moved to B {moved:?} after A was killed; config from B in {:?}",
        t1.elapsed()
    );
    b.stop();
}

fn apply_store(hub: &HubProc, dir: &std::path::Path, name: &str) -> std::process::Output {
    let f = dir.join(format!("{name}.yaml"));
    let zone = if name == "v1" {
        "us-west-2a"
    } else {
        "us-west-2b"
    };
    std::fs::write(
        &f,
        format!("apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {{name: sf01}}\nspec: {{region: us-west-2, zone: {zone}}}\n"),
    )
    .expect("write yaml");
    hub.cli(&["apply", "-f", f.to_str().expect("utf8")])
}
