//! The evidence pipeline end to end, with the real binaries: drill load on
//! a spoke, partitions and impairments through the relay, SIGKILLs of the
//! spoke and the hub, a full buffer, tampering on disk, and the hub's
//! exactly-once ingest checked record by record.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tidemesh_tests::{bin, run, text, wait_for, HubProc, RelayProc, SpokeProc};

const TD: &str = "edge.example";

fn node(store: &str, name: &str) -> String {
    format!("spiffe://{TD}/store/{store}/node/{name}")
}

/// A hub, optionally a relay in front of it, and one enrolled spoke started
/// with `spoke_args`.
fn setup(
    root: &Path,
    hub_args: &[&str],
    relay_seed: Option<u64>,
    spoke_args: &[&str],
) -> (HubProc, Option<RelayProc>, SpokeProc) {
    let mut hub = HubProc::init(root, TD).with_args(hub_args);
    let hub_addr = hub.start();
    let relay = relay_seed.map(|seed| RelayProc::start(&root.join("relays"), "r0", hub_addr, seed));
    let id = node("sf01", "n1");
    let mut s = SpokeProc::new(root, "spoke", &id).with_args(spoke_args);
    let via = relay.as_ref().map_or(hub_addr, |r| r.addr);
    let o = s.enroll(via, &hub.token(&id, "10m"));
    assert!(o.status.success(), "enroll: {}", text(&o));
    s.start();
    s.wait_state("connected", Duration::from_secs(10));
    (hub, relay, s)
}

fn spoke_stats(s: &SpokeProc) -> Option<Value> {
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["evidence", "stats", "--json", "--data-dir"])
        .arg(&s.dir));
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn hub_stats(hub: &HubProc, spoke: &str) -> Value {
    let o = hub.cli(&["evidence", "stats", "--spoke", spoke, "--json"]);
    assert!(o.status.success(), "evidence stats: {}", text(&o));
    serde_json::from_slice(&o.stdout).expect("stats json")
}

fn hub_verify(hub: &HubProc, spoke: &str) -> std::process::Output {
    hub.cli(&["evidence", "verify", "--spoke", spoke, "--json"])
}

/// Every record the hub holds for `spoke`, oldest first.
fn hub_records(hub: &HubProc, spoke: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut from = 1u64;
    loop {
        let o = hub.cli(&[
            "evidence",
            "query",
            "--spoke",
            spoke,
            "--from-seq",
            &from.to_string(),
            "--limit",
            "5000",
            "--json",
        ]);
        assert!(o.status.success(), "evidence query: {}", text(&o));
        let page: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("record json"))
            .collect();
        let Some(last) = page.last() else { break };
        let covered = last["body"]["shed"]["range"]["last"]
            .as_u64()
            .or_else(|| last["seq"].as_u64())
            .expect("seq");
        let n = page.len();
        out.extend(page);
        if n < 5_000 {
            break;
        }
        from = covered + 1;
    }
    out
}

/// Drill indices of run `run` among `records`; panics on a duplicate.
fn drill_indices(records: &[Value], run_id: &str) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    for r in records {
        let d = &r["body"]["request"]["drill"];
        if d["run"] == run_id {
            let i = d["index"].as_u64().expect("index");
            assert!(seen.insert(i), "drill record {i} stored twice");
        }
    }
    seen
}

/// Sequence numbers strictly increasing and contiguous from the first
/// record (shed records cover ranges): nothing missing, nothing twice.
fn assert_contiguous(records: &[Value]) -> u64 {
    let mut next = records.first().and_then(|r| r["seq"].as_u64()).unwrap_or(1);
    for r in records {
        let seq = r["seq"].as_u64().expect("seq");
        assert_eq!(seq, next, "record {seq} where {next} was expected");
        next = r["body"]["shed"]["range"]["last"].as_u64().unwrap_or(seq) + 1;
    }
    next - 1
}

/// Waits for `drill load`; returns (run id, committed).
fn drill_result(child: Child) -> (String, u64) {
    let o = child.wait_with_output().expect("drill output");
    assert!(o.status.success(), "drill load: {}", text(&o));
    // "drill RUN: appended N, committed N, refused N"
    let line = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let run_id = line
        .strip_prefix("drill ")
        .and_then(|r| r.split(':').next())
        .expect("run id")
        .to_owned();
    let committed = line
        .split("committed ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    (run_id, committed)
}

/// Waits until the hub holds everything the spoke committed and the
/// spoke's buffer is empty; returns the spoke's last stats.
fn wait_drained(hub: &HubProc, s: &SpokeProc, timeout: Duration) -> Value {
    wait_for(timeout, || {
        let st = spoke_stats(s)?;
        let committed = st["last_committed_seq"].as_u64()?;
        let hs = hub_stats(hub, &s.id);
        (st["pending_records"] == 0
            && st["last_acked_seq"].as_u64() == Some(committed)
            && hs["high_water_mark"].as_u64() == Some(committed))
        .then_some(st)
    })
    .unwrap_or_else(|| {
        panic!(
            "evidence did not drain within {timeout:?}: spoke {:?} hub {}\nspoke log:\n{}",
            spoke_stats(s),
            hub_stats(hub, &s.id),
            std::fs::read_to_string(s.dir.with_extension("log")).unwrap_or_default()
        )
    })
}

/// Waits for the drain, then checks the hub holds every record the spoke
/// committed (contiguous seqs, each drill index of `run_id` once, all
/// `committed` of them) and that the chain verifies; returns the spoke's
/// stats.
fn assert_exactly_once(hub: &HubProc, s: &SpokeProc, run_id: &str, committed: u64) -> Value {
    let st = wait_drained(hub, s, Duration::from_secs(60));
    let records = hub_records(hub, &s.id);
    assert_eq!(
        Some(assert_contiguous(&records)),
        st["last_committed_seq"].as_u64()
    );
    let idx = drill_indices(&records, run_id);
    assert_eq!(
        idx.len() as u64,
        committed,
        "every drill record exactly once"
    );
    assert_verified(hub, &s.id);
    st
}

/// The hub's chain for the spoke verifies; returns the report.
fn assert_verified(hub: &HubProc, spoke: &str) -> Value {
    let o = hub_verify(hub, spoke);
    assert!(o.status.success(), "verify failed: {}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).expect("verify json");
    assert_eq!(r["ok"], true, "{r}");
    r
}

/// Must-show 1: drill load at a fixed rate through a 60 s blackout; after
/// the heal the hub holds exactly the appended records, the chain verifies,
/// the buffer drains to 0.
#[test]
fn drill_through_a_60s_blackout_arrives_exactly_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hub, relay, s) = setup(tmp.path(), &[], Some(11), &[]);
    let relay = relay.expect("relay");
    let load = s.drill_load(200, "75s");
    std::thread::sleep(Duration::from_secs(5));
    relay.blackout(None);
    let cut = Instant::now();
    s.wait_state("disconnected", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed()));
    let backlog = spoke_stats(&s).expect("stats")["pending_records"]
        .as_u64()
        .expect("pending");
    relay.heal();
    let healed = Instant::now();
    s.wait_state("connected", Duration::from_secs(10));
    let (run_id, committed) = drill_result(load);
    assert_eq!(committed, 75 * 200, "every drill record committed");
    let st = wait_drained(&hub, &s, Duration::from_secs(60));
    let drained_in = healed.elapsed();
    let records = hub_records(&hub, &s.id);
    let last = assert_contiguous(&records);
    assert_eq!(Some(last), st["last_committed_seq"].as_u64());
    let idx = drill_indices(&records, &run_id);
    assert_eq!(idx.len() as u64, committed, "0 missing, 0 duplicated");
    assert_eq!(idx.first(), Some(&0));
    assert_eq!(idx.last(), Some(&(committed - 1)));
    let report = assert_verified(&hub, &s.id);
    let hs = hub_stats(&hub, &s.id);
    assert_eq!(hs["chain_ok"], true, "{hs}");
    assert_eq!(hs["gaps"], 0, "{hs}");
    assert_eq!(st["pending_records"], 0);
    eprintln!(
        "blackout 60 s: backlog {backlog} records at the heal; hub caught up {:?} after the heal \
         (including reconnect); {} records verified; sync: {}",
        drained_in, report["records_checked"], st
    );
}

/// Must-show 2 (end to end; spoke/tests/buffer_crash.rs does 20 kills of the
/// buffer alone): SIGKILL the running spoke under load and while syncing;
/// after each restart its chain verifies, and in the end the hub holds every
/// record the spoke ever reported committed, exactly once.
#[test]
fn spoke_sigkilled_while_syncing_loses_nothing_committed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hub, _relay, mut s) = setup(tmp.path(), &[], None, &["--evidence-drain-rate", "3000"]);
    let mut committed_max = 0u64;
    for round in 0..5u64 {
        let load = s.drill_load(2_000, "10s");
        std::thread::sleep(Duration::from_millis(700 + 450 * round));
        if let Some(st) = spoke_stats(&s) {
            committed_max = committed_max.max(st["last_committed_seq"].as_u64().unwrap_or(0));
        }
        s.kill();
        let _ = load.wait_with_output();
        let o = run(Command::new(bin("tidemesh-spoke"))
            .args(["evidence", "verify", "--json", "--data-dir"])
            .arg(&s.dir));
        assert!(
            o.status.success(),
            "round {round}: chain broken after SIGKILL: {}",
            text(&o)
        );
        let v: Value = serde_json::from_slice(&o.stdout).expect("verify json");
        let to = v["to_seq"].as_u64().unwrap_or(0);
        assert!(
            to >= committed_max,
            "round {round}: committed {committed_max} but the buffer ends at {to}: {v}"
        );
        s.start();
        s.wait_state("connected", Duration::from_secs(10));
    }
    let st = wait_drained(&hub, &s, Duration::from_secs(90));
    let records = hub_records(&hub, &s.id);
    let last = assert_contiguous(&records);
    assert!(
        last >= committed_max,
        "hub ends at {last}, spoke had committed {committed_max}"
    );
    assert_eq!(Some(last), st["last_committed_seq"].as_u64());
    assert_verified(&hub, &s.id);
    eprintln!("5 spoke SIGKILLs while syncing: hub holds 1..={last}, exactly once, chain ok");
}

/// Must-show 3: SIGKILL the hub mid-ingest; exactly once after its restart.
/// The spoke's drain cap (2,000 records/s) makes the ingest slow enough to
/// be caught in the middle.
#[test]
fn hub_sigkilled_mid_ingest_stores_exactly_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut hub, _relay, s) = setup(tmp.path(), &[], None, &["--evidence-drain-rate", "2000"]);
    hub.stop();
    s.wait_state("disconnected", Duration::from_secs(10));
    let (run_id, committed) = drill_result(s.drill_load(5_000, "4s"));
    assert_eq!(committed, 20_000);
    let total = spoke_stats(&s).expect("stats")["last_committed_seq"]
        .as_u64()
        .expect("seq");
    hub.start();
    // caught mid-ingest: some, not all
    let mid = wait_for(Duration::from_secs(20), || {
        let h = hub_stats(&hub, &s.id)["high_water_mark"]
            .as_u64()
            .unwrap_or(0);
        (h > 2_000).then_some(h)
    })
    .expect("ingest started");
    assert!(
        mid < total,
        "ingest finished before the kill ({mid} of {total})"
    );
    hub.kill();
    hub.start();
    let t = Instant::now();
    assert_exactly_once(&hub, &s, &run_id, committed);
    eprintln!(
        "hub SIGKILLed at hwm {mid} of {total}; after restart drained in {:?}; exactly once",
        t.elapsed()
    );
}

/// Must-show 4: lost acks (a one-way blackout hub to spoke in the middle
/// of a sync) on a link that duplicates 10% and reorders 25% of datagrams:
/// each record stored exactly once.
#[test]
fn lost_acks_duplication_and_reordering_store_each_record_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut hub, relay, s) = setup(
        tmp.path(),
        &[],
        Some(23),
        &["--evidence-drain-rate", "4000"],
    );
    let relay = relay.expect("relay");
    relay.ctl(&[
        "set",
        "--duplicate",
        "10%",
        "--reorder",
        "25%",
        "--delay",
        "5ms",
    ]);
    // a backlog, so the sync is busy when the acks are cut
    hub.stop();
    s.wait_state("disconnected", Duration::from_secs(10));
    let (run_id, committed) = drill_result(s.drill_load(5_000, "3s"));
    hub.start();
    wait_for(Duration::from_secs(20), || {
        (hub_stats(&hub, &s.id)["high_water_mark"]
            .as_u64()
            .unwrap_or(0)
            > 1_000)
            .then_some(())
    })
    .expect("sync started");
    relay.blackout(Some("down"));
    std::thread::sleep(Duration::from_secs(2));
    let hwm_during = hub_stats(&hub, &s.id)["high_water_mark"]
        .as_u64()
        .unwrap_or(0);
    let acked_during = spoke_stats(&s).expect("stats")["last_acked_seq"]
        .as_u64()
        .unwrap_or(0);
    s.wait_state("disconnected", Duration::from_secs(10));
    relay.ctl(&[
        "set",
        "--duplicate",
        "10%",
        "--reorder",
        "25%",
        "--delay",
        "5ms",
    ]);
    s.wait_state("connected", Duration::from_secs(15));
    let st = assert_exactly_once(&hub, &s, &run_id, committed);
    let rs = relay.stats();
    eprintln!(
        "acks cut with hub at {hwm_during} and spoke acked at {acked_during}; relay {rs}; \
         spoke sync {st}; exactly once"
    );
}

/// Must-show 5: buffer full during a partition: shed records present, the
/// chain verifies at the hub, counts reported, audit records never shed.
#[test]
fn full_buffer_sheds_requests_keeps_audit_and_verifies_at_the_hub() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hub, relay, s) = setup(tmp.path(), &[], Some(31), &["--evidence-capacity", "1MiB"]);
    let relay = relay.expect("relay");
    let audit_before = hub_records_or_spoke_audit(&s);
    relay.blackout(None);
    s.wait_state("disconnected", Duration::from_secs(10));
    let (_run_id, committed) = drill_result(s.drill_load(2_000, "5s"));
    let st = spoke_stats(&s).expect("stats");
    assert!(st["shed_records"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(
        st["pending_bytes"].as_u64().unwrap_or(u64::MAX) <= 1 << 20,
        "{st}"
    );
    relay.heal();
    s.wait_state("connected", Duration::from_secs(10));
    let st = wait_drained(&hub, &s, Duration::from_secs(60));
    let records = hub_records(&hub, &s.id);
    assert_eq!(
        Some(assert_contiguous(&records)),
        st["last_committed_seq"].as_u64()
    );
    let shed: Vec<&Value> = records
        .iter()
        .filter(|r| r["body"]["shed"].is_object())
        .collect();
    assert!(!shed.is_empty(), "shed records reach the hub");
    let dropped: u64 = shed
        .iter()
        .map(|r| r["body"]["shed"]["count"].as_u64().unwrap_or(0))
        .sum();
    for r in &shed {
        assert_ne!(
            r["body"]["shed"]["class"], "audit",
            "audit records are never shed: {r}"
        );
    }
    let audit_after = records
        .iter()
        .filter(|r| r["class"] == "audit" && !r["body"]["shed"].is_object())
        .count();
    // the partition itself adds a mode transition (audit class: Target to
    // Survival), appended while the buffer was shedding; the way back
    // (Recovery, then Target) follows the mode matrix's health checks and
    // ramp, minutes at the seed's values
    assert!(
        audit_after > audit_before,
        "audit records held before the partition: {audit_before}, at the hub: {audit_after}"
    );
    let transitions = records
        .iter()
        .filter(|r| r["body"]["mode_transition"].is_object())
        .count();
    assert!(
        transitions >= 1,
        "mode transitions at the hub: {transitions}"
    );
    let hs = hub_stats(&hub, &s.id);
    assert_eq!(hs["dropped"].as_u64(), Some(dropped), "{hs}");
    assert_verified(&hub, &s.id);
    let kept = records.len() as u64 - shed.len() as u64;
    eprintln!(
        "buffer 1 MiB: {committed} drill records appended during the partition, {dropped} shed in {} shed records, \
         {kept} records delivered, {audit_after} audit records all delivered; chain verifies",
        shed.len()
    );
}

/// Audit records the spoke holds now (certificate, config), from its tail.
fn hub_records_or_spoke_audit(s: &SpokeProc) -> usize {
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["evidence", "tail", "-n", "1000", "--json", "--data-dir"])
        .arg(&s.dir));
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["class"] == "audit")
        .count()
}

/// Backpressure: a hub-wide rate makes the hub answer with retry-after,
/// and the spoke's drain cap bounds its own rate; both show in the stats.
#[test]
fn hub_rate_and_spoke_cap_pace_the_drain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut hub, _relay, s) = setup(
        tmp.path(),
        &["--evidence-rate", "2000"],
        None,
        &["--evidence-batch", "500"],
    );
    hub.stop();
    s.wait_state("disconnected", Duration::from_secs(10));
    drill_result(s.drill_load(5_000, "2s"));
    hub.start();
    let t = Instant::now();
    let st = wait_drained(&hub, &s, Duration::from_secs(60));
    let took = t.elapsed();
    // 10,000 records at 2,000/s after a 2,000-record burst: at least ~3.5 s.
    assert!(
        took >= Duration::from_secs(3),
        "drained in {took:?} despite the hub's rate"
    );
    assert!(st["sync_throttled_ms"].as_u64().unwrap_or(0) > 0, "{st}");
    let o = hub.cli(&["stats", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let hs: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(
        hs["ingest"]["throttled_acks"].as_u64().unwrap_or(0) > 0,
        "{hs}"
    );
    eprintln!("hub rate 2000/s: 10,000-record backlog drained in {took:?}; spoke {st}");

    // retention by bytes: the oldest records go, the rest still verifies
    // from the checkpoint
    let before = hub_stats(&hub, &s.id);
    let keep = before["bytes"].as_u64().expect("bytes") / 2;
    let o = hub.cli(&["evidence", "prune", "--max-bytes", &keep.to_string()]);
    assert!(o.status.success(), "prune: {}", text(&o));
    let after = hub_stats(&hub, &s.id);
    assert!(
        after["bytes"].as_u64().unwrap_or(u64::MAX) <= keep,
        "{after}"
    );
    let cp = after["checkpoint_seq"].as_u64().unwrap_or(0);
    assert!(cp > 0, "{after}");
    assert_eq!(after["high_water_mark"], before["high_water_mark"]);
    let v = assert_verified(&hub, &s.id);
    assert_eq!(v["from_seq"].as_u64(), Some(cp + 1), "{v}");
    eprintln!("retention to {keep} bytes: checkpoint at seq {cp}; {v}");
}

/// A caught-up spoke under steady load: group commits are gathered for the
/// commit interval and evidence batches linger, so a busy spoke commits
/// and signs a few times a second rather than per request; records still
/// reach the hub promptly. The same load with `--evidence-linger 0s`
/// sends a batch per commit, showing the linger is what makes the
/// difference.
#[test]
fn steady_load_syncs_in_few_batches_and_arrives_promptly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hub, _relay, s) = setup(tmp.path(), &[], None, &[]);
    let id = node("sf01", "n2");
    let mut eager = SpokeProc::new(tmp.path(), "eager", &id).with_args(&[
        "--evidence-linger",
        "0s",
        "--evidence-commit-interval",
        "5ms",
    ]);
    let o = eager.enroll(hub.addr.expect("hub address"), &hub.token(&id, "10m"));
    assert!(o.status.success(), "enroll: {}", text(&o));
    eager.start();
    eager.wait_state("connected", Duration::from_secs(10));
    let base = |p: &SpokeProc| {
        let st = spoke_stats(p).expect("stats");
        (
            st["sync_batches_sent"].as_u64().expect("batches"),
            st["commits"].as_u64().expect("commits"),
        )
    };
    let (b0, c0) = base(&s);
    let (eb0, ec0) = base(&eager);
    let loads = [s.drill_load(500, "4s"), eager.drill_load(500, "4s")];
    let mut runs = Vec::new();
    for l in loads {
        runs.push(drill_result(l));
    }
    let done = Instant::now();
    let st = wait_drained(&hub, &s, Duration::from_secs(30));
    let arrived = done.elapsed();
    let est = wait_drained(&hub, &eager, Duration::from_secs(30));
    let batches = st["sync_batches_sent"].as_u64().expect("batches") - b0;
    let commits = st["commits"].as_u64().expect("commits") - c0;
    let eager_batches = est["sync_batches_sent"].as_u64().expect("batches") - eb0;
    let eager_commits = est["commits"].as_u64().expect("commits") - ec0;
    eprintln!(
        "2,000 drill records at 500/s: default {commits} commits, {batches} batches, on the \
         hub {arrived:?} after the last commit; eager (5 ms, no linger) {eager_commits} \
         commits, {eager_batches} batches"
    );
    // 4 s of load: 20 ms commits are at most ~200 (plus acks' deletions),
    // 200 ms lingers at most ~20 batches. Without the linger every commit
    // with new records is a batch.
    assert!(batches >= 4, "{batches} batches");
    assert!(batches <= 30, "{batches} batches for 2,000 records");
    assert!(commits <= 400, "{commits} commits for 2,000 records");
    assert!(
        eager_batches >= 3 * batches,
        "no linger: {eager_batches} batches vs {batches}"
    );
    assert!(arrived < Duration::from_secs(10), "{arrived:?}");
    for ((run_id, committed), p) in runs.into_iter().zip([&s, &eager]) {
        assert_eq!(committed, 2_000);
        assert_exactly_once(&hub, p, &run_id, committed);
    }
}

/// Must-show 6: a record altered on disk at the spoke or at the hub:
/// `verify` detects it and names the sequence number.
#[test]
fn altered_records_are_detected_and_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut hub, relay, mut s) = setup(tmp.path(), &[], Some(41), &[]);
    let relay = relay.expect("relay");
    drill_result(s.drill_load(500, "1s"));
    wait_drained(&hub, &s, Duration::from_secs(30));
    // at the hub: stop it, alter record 100 in evidence.db, verify offline
    hub.stop();
    tamper_hub(&hub.dir.join("evidence.db"), &s.id, 100);
    let o = hub_verify(&hub, &s.id);
    assert!(
        !o.status.success(),
        "verify must fail after tampering: {}",
        text(&o)
    );
    let msg = text(&o);
    assert!(msg.contains("seq 100"), "verify names the record: {msg}");
    hub.start();
    let o = hub.cli(&["evidence", "verify", "--spoke", &s.id]);
    assert!(
        !o.status.success() && text(&o).contains("seq 100"),
        "through the running hub too: {}",
        text(&o)
    );

    // at the spoke: partition, append, stop it, alter a pending record
    relay.blackout(None);
    s.wait_state("disconnected", Duration::from_secs(10));
    drill_result(s.drill_load(500, "1s"));
    let last = spoke_stats(&s).expect("stats")["last_committed_seq"]
        .as_u64()
        .expect("seq");
    s.kill();
    let target = last - 10;
    tamper_spoke(&s.dir.join("evidence.db"), target);
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args(["evidence", "verify", "--data-dir"])
        .arg(&s.dir));
    assert!(!o.status.success());
    assert!(text(&o).contains(&format!("seq {target}")), "{}", text(&o));
    // and the hub refuses the altered batch, flags it, stores nothing past it
    relay.heal();
    s.start();
    let hs = wait_for(Duration::from_secs(30), || {
        let h = hub_stats(&hub, &s.id);
        (h["rejected_batches"].as_u64().unwrap_or(0) > 0).then_some(h)
    })
    .expect("the hub flags the altered batch");
    assert!(
        hs["last_error"]
            .as_str()
            .unwrap_or("")
            .contains(&target.to_string()),
        "{hs}"
    );
    assert!(hs["high_water_mark"].as_u64().unwrap_or(0) < target, "{hs}");
    eprintln!("tampering detected: hub seq 100 by verify; spoke seq {target} by verify and by the hub's ingest: {hs}");
}

/// Flips one byte (of the stored hash) in the stored value of record `seq` of
/// `spoke` in the hub's evidence.db (table `records`, key (spoke, seq)), as
/// someone with write access to the file would.
fn tamper_hub(path: &Path, spoke: &str, seq: u64) {
    use redb::{ReadableDatabase, TableDefinition};
    const RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("records");
    let db = redb::Database::open(path).expect("open hub evidence db");
    let mut bytes = {
        let r = db.begin_read().expect("read");
        let t = r.open_table(RECORDS).expect("table");
        let v = t.get((spoke, seq)).expect("get").expect("record present");
        v.value().to_vec()
    };
    // the last byte is part of the stored chain hash: the record still
    // decodes, only the chain shows the change
    let i = bytes.len() - 1;
    bytes[i] ^= 0x01;
    let w = db.begin_write().expect("write");
    {
        let mut t = w.open_table(RECORDS).expect("table");
        t.insert((spoke, seq), bytes.as_slice()).expect("insert");
    }
    w.commit().expect("commit");
}

/// The same in the spoke's evidence.db (table `evidence_records`, key seq).
fn tamper_spoke(path: &Path, seq: u64) {
    use redb::{ReadableDatabase, TableDefinition};
    const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("evidence_records");
    let db = redb::Database::open(path).expect("open spoke db");
    let mut bytes = {
        let r = db.begin_read().expect("read");
        let t = r.open_table(RECORDS).expect("table");
        let v = t.get(seq).expect("get").expect("record present");
        v.value().to_vec()
    };
    // the last byte is part of the stored chain hash: the record still
    // decodes, only the chain shows the change
    let i = bytes.len() - 1;
    bytes[i] ^= 0x01;
    let w = db.begin_write().expect("write");
    {
        let mut t = w.open_table(RECORDS).expect("table");
        t.insert(seq, bytes.as_slice()).expect("insert");
    }
    w.commit().expect("commit");
}

/// Off a terminal the long-running commands keep their output as it was:
/// `drill load` and both `evidence verify`s print their one result line on
/// stdout and draw no progress line (no carriage return) on stderr;
/// `status --watch --until-drained` prints one backlog line per look on
/// stdout, pending while the hub is cut off, and exits 0 once the backlog
/// has drained after the heal. On a pseudo-terminal `drill load` draws its
/// progress line.
#[test]
fn status_watch_follows_the_drain_and_progress_stays_off_pipes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hub, relay, s) = setup(tmp.path(), &[], Some(7), &[]);
    let relay = relay.expect("relay");
    relay.blackout(None);
    let o = s.drill_load(200, "2s").wait_with_output().expect("drill");
    assert!(o.status.success(), "drill load: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("drill "), "{out}");
    assert!(
        !o.stderr.contains(&b'\r'),
        "a progress line off a terminal: {}",
        text(&o)
    );
    // on a terminal (a pty from util-linux `script`), the line is drawn
    // and cleared, and the result line still comes
    match which("script") {
        Some(script) => {
            let cmd = format!(
                "'{}' drill load --data-dir '{}' --rate 100 --duration 3s",
                bin("tidemesh-spoke").display(),
                s.dir.display()
            );
            let o = run(Command::new(script)
                .args(["-q", "-e", "-c", &cmd, "/dev/null"])
                .stdin(Stdio::null()));
            assert!(o.status.success(), "drill load on a pty: {}", text(&o));
            let tty = String::from_utf8_lossy(&o.stdout);
            assert!(
                tty.contains("\rdrill load ["),
                "no progress line on a pty: {tty:?}"
            );
            assert!(tty.contains("committed, "), "{tty:?}");
            assert!(
                tty.contains("\r\x1b[Kdrill "),
                "cleared before the result: {tty:?}"
            );
        }
        None => eprintln!("script (util-linux) not installed: skipping the terminal check"),
    }
    let watch = Command::new(bin("tidemesh-spoke"))
        .args([
            "status",
            "--watch",
            "--until-drained",
            "--interval",
            "300ms",
        ])
        .arg("--data-dir")
        .arg(&s.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn status --watch");
    std::thread::sleep(Duration::from_millis(1500));
    relay.heal();
    let mut watch = watch;
    let t0 = Instant::now();
    let exited = wait_for(Duration::from_secs(60), || watch.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = watch.kill();
    }
    let o = watch.wait_with_output().expect("watch output");
    assert!(
        exited.is_some_and(|e| e.success()),
        "status --watch: {}",
        text(&o)
    );
    eprintln!("drained {:?} after the heal", t0.elapsed());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("id:"), "the status comes first: {out}");
    let backlog: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("evidence backlog"))
        .collect();
    let pending: Vec<u64> = backlog
        .iter()
        .filter_map(|l| {
            l.split("evidence backlog ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        pending.first().is_some_and(|n| *n >= 100),
        "records pending while cut off: {out}"
    );
    assert_eq!(
        backlog.last().copied(),
        Some("connected: evidence backlog drained (0 records pending)"),
        "{out}"
    );
    assert!(!o.stderr.contains(&b'\r'), "{}", text(&o));
    wait_drained(&hub, &s, Duration::from_secs(30));
    for o in [
        hub.cli(&["evidence", "verify", "--spoke", &s.id]),
        run(Command::new(bin("tidemesh-spoke"))
            .args(["evidence", "verify", "--data-dir"])
            .arg(&s.dir)),
    ] {
        assert!(o.status.success(), "verify: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("ok"), "{out}");
        assert!(!o.stderr.contains(&b'\r'), "{}", text(&o));
    }
}

/// `/metrics` on hub and spoke pass `promtool check metrics`; the alert
/// rules in `deploy/observability/` pass `promtool check rules`; the
/// Grafana dashboard there parses, has the shape Grafana loads, and every
/// metric its expressions and the alert rules name is exported by these
/// binaries (on the pages scraped here, or, for a family written only in
/// some states, as a name in the hub's or spoke's source).
#[test]
fn metrics_pass_promtool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hub, _relay, mut s) = setup(
        tmp.path(),
        &["--metrics", "127.0.0.1:19464"],
        None,
        &["--metrics", "127.0.0.1:19465"],
    );
    drill_result(s.drill_load(200, "1s"));
    wait_drained(&hub, &s, Duration::from_secs(30));
    let labels = format!("store=\"sf01\",spoke=\"n1\",spiffe_id=\"{}\"", s.id);
    let promtool = which("promtool");
    let mut exported = std::collections::BTreeSet::new();
    let mut label_names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (who, port) in [("hub", 19464), ("spoke", 19465)] {
        let page = scrape(port);
        // one prefix scheme: tidemesh_hub_ on the hub, tidemesh_spoke_ on
        // the spoke, tidemesh_build_info on both
        for l in page.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = l.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                name == "tidemesh_build_info" || name.starts_with(&format!("tidemesh_{who}_")),
                "{who}: {name} outside the tidemesh_{who}_ scheme"
            );
        }
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, rest)) = l.split_once('{') else {
                continue;
            };
            let set = label_names.entry(name.to_owned()).or_default();
            for pair in rest.split("\",") {
                if let Some((k, _)) = pair.split_once("=\"") {
                    set.insert(k.to_owned());
                }
            }
        }
        assert!(
            page.contains("tidemesh_build_info{version=\""),
            "{who}: {page}"
        );
        assert!(page.contains("tidemesh_"), "{who}: {page}");
        // each family once (promtool lets a repeated family through)
        let mut families = std::collections::HashSet::new();
        for l in page.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = l.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                families.insert(name.to_owned()),
                "{who}: family {name} twice"
            );
            exported.insert(name.to_owned());
        }
        if who == "hub" {
            // per-spoke series: the store and node name, and the full ID
            for family in [
                "tidemesh_hub_evidence_high_water_mark",
                "tidemesh_hub_spoke_connected",
                "tidemesh_hub_spoke_cert_expiry_timestamp_seconds",
            ] {
                assert!(
                    page.contains(&format!("{family}{{{labels}}} ")),
                    "{family}: {page}"
                );
            }
            assert!(page.contains("tidemesh_hub_spoke_connected{"), "{page}");
            assert!(
                page.contains("tidemesh_hub_spoke_series_omitted 0\n"),
                "{page}"
            );
        } else {
            assert!(
                page.contains(&format!("tidemesh_spoke_info{{{labels}}} 1\n")),
                "{page}"
            );
            assert!(page.contains("tidemesh_spoke_connected 1"), "{page}");
            assert!(
                page.contains("tidemesh_spoke_evidence_pending_records 0"),
                "{page}"
            );
        }
        match &promtool {
            Some(p) => {
                let mut c = Command::new(p)
                    .args(["check", "metrics"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("promtool");
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(page.as_bytes())
                    .expect("write");
                let o = c.wait_with_output().expect("promtool output");
                assert!(
                    o.status.success(),
                    "promtool check metrics ({who}): {}\n{page}",
                    text(&o)
                );
            }
            None if std::env::var_os("TIDEMESH_REQUIRE_PROMTOOL").is_some() => {
                panic!("promtool not found (apt-get install prometheus)")
            }
            None => eprintln!("promtool not installed: skipping the format check ({who})"),
        }
    }
    check_observability(&exported, &label_names, promtool.as_deref());
    // a config the spoke applies: the hub's view turns synced (stale 0)
    let doc = tmp.path().join("store.yaml");
    std::fs::write(&doc, tidemesh_tests::STORE_SF01).expect("yaml");
    let o = hub.cli(&["apply", "-f", doc.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
    let stale = |page: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("tidemesh_hub_spoke_config_stale{{{labels}}} ")))
            .map(str::to_owned)
    };
    let synced = wait_for(Duration::from_secs(15), || {
        (stale(&scrape(19464)).as_deref() == Some("0")).then_some(())
    });
    assert!(synced.is_some(), "never synced: {}", scrape(19464));
    let page = scrape(19464);
    assert!(
        page.contains(&format!("tidemesh_hub_spoke_config_version{{{labels}}} ")),
        "{page}"
    );
    // the spoke gone, a newer config: the hub's view turns stale (1)
    s.stop();
    let doc = tmp.path().join("store2.yaml");
    std::fs::write(
        &doc,
        "apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {name: sf02}\nspec: {region: us-west-2, zone: us-west-2b}\n",
    )
    .expect("yaml");
    let o = hub.cli(&["apply", "-f", doc.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
    let page = scrape(19464);
    assert_eq!(stale(&page).as_deref(), Some("1"), "{page}");
}

/// The metric names (`tidemesh_...`) a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("tidemesh_") {
        let start = i + off;
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
        if start > 0 && ident(b[start - 1]) {
            i = start + 1;
            continue;
        }
        let mut end = start;
        while end < b.len() && ident(b[end]) {
            end += 1;
        }
        out.push(expr[start..end].to_owned());
        i = end;
    }
    out
}

/// Label names an expression groups or joins on (`by (..)`, `on(..)`,
/// `without (..)`, `ignoring(..)`), matches (`{k="v"}`) or its legend
/// shows (`{{k}}`); Prometheus' own (`instance`, `job`, `le`) left out.
fn label_refs(expr: &str, legend: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| {
        s.trim()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.trim().is_empty()
    };
    for kw in ["by", "on", "without", "ignoring"] {
        let mut rest = expr;
        while let Some(i) = rest.find(kw) {
            let before = rest[..i].chars().next_back();
            let after = rest[i + kw.len()..].trim_start();
            rest = &rest[i + kw.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(list) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
                for l in list.0.split(',').filter(|l| ident(l)) {
                    out.insert(l.trim().to_owned());
                }
            }
        }
    }
    let mut rest = expr;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        for m in rest[i + 1..i + j].split(',') {
            let k = m.split(['=', '!']).next().unwrap_or_default();
            if ident(k) {
                out.insert(k.trim().to_owned());
            }
        }
        rest = &rest[i + j..];
    }
    let mut rest = legend;
    while let Some(i) = rest.find("{{") {
        let Some(j) = rest[i..].find("}}") else { break };
        let k = &rest[i + 2..i + j];
        if ident(k) {
            out.insert(k.trim().to_owned());
        }
        rest = &rest[i + j..];
    }
    for p in ["instance", "job", "le"] {
        out.remove(p);
    }
    out
}

/// Every `"tidemesh_..."` string literal in the hub's and spoke's sources.
fn names_in_source() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut all = String::new();
    for d in ["hub/src", "spoke/src", "shared/net/src"] {
        walk(&root.join(d), &mut all);
    }
    all
}

/// `deploy/observability/`: rules through promtool, the dashboard's shape,
/// and every metric both name is one the binaries export.
fn check_observability(
    exported: &BTreeSet<String>,
    label_names: &BTreeMap<String, BTreeSet<String>>,
    promtool: Option<&Path>,
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability");
    let mut rules: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/observability")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    rules.sort();
    assert!(!rules.is_empty(), "no rule files in {}", dir.display());
    match promtool {
        Some(p) => {
            let o = run(Command::new(p).args(["check", "rules"]).args(&rules));
            assert!(o.status.success(), "promtool check rules: {}", text(&o));
            assert!(text(&o).contains("SUCCESS"), "{}", text(&o));
        }
        None if std::env::var_os("TIDEMESH_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool not found (apt-get install prometheus)")
        }
        None => eprintln!("promtool not installed: skipping promtool check rules"),
    }
    // (whence, expression, legend)
    let mut exprs: Vec<(String, String, String)> = Vec::new();
    for r in &rules {
        let text = std::fs::read_to_string(r).expect("rules");
        for l in text.lines() {
            if let Some(e) = l.trim().strip_prefix("expr:") {
                exprs.push((r.display().to_string(), e.trim().to_owned(), String::new()));
            }
        }
    }
    let dash_path = dir.join("tidemesh-dashboard.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&dash_path).expect("dashboard json"))
            .expect("the dashboard is valid JSON");
    for k in ["uid", "title"] {
        assert!(
            dash[k].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard {k}"
        );
    }
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30),
        "schemaVersion"
    );
    assert!(
        dash["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        assert!(p["type"].as_str().is_some(), "panel {id} type");
        assert!(p["title"].as_str().is_some(), "panel {id} title");
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].as_u64().is_some(), "panel {id} gridPos.{k}");
        }
        assert!(
            g["x"].as_u64().unwrap_or(99) + g["w"].as_u64().unwrap_or(99) <= 24,
            "panel {id} fits 24 columns"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "panel {id} refId twice"
            );
            let e = t["expr"].as_str().expect("expr");
            assert!(
                t["datasource"]["uid"] == "${datasource}"
                    || p["datasource"]["uid"] == "${datasource}",
                "panel {id}: no datasource"
            );
            let legend = t["legendFormat"].as_str().unwrap_or_default().to_owned();
            exprs.push((format!("dashboard panel {id}"), e.to_owned(), legend));
            queries += 1;
        }
    }
    assert!(queries >= 10, "the dashboard has {queries} queries");
    let source = names_in_source();
    let mut from_source = Vec::new();
    for (whence, e, legend) in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{whence}: {e} reads no tidemesh metric");
        // every label grouped on, matched or shown in the legend is one a
        // series read here carries (judged on the metrics that had samples)
        let seen: Vec<&BTreeSet<String>> =
            names.iter().filter_map(|n| label_names.get(n)).collect();
        if !seen.is_empty() {
            for l in label_refs(e, legend) {
                assert!(
                    seen.iter().any(|set| set.contains(&l)),
                    "{whence}: {e} (legend {legend:?}) uses label {l:?}, which no series of {names:?} carries"
                );
            }
        }
        for n in names {
            // a histogram's series are its family name plus a suffix
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|x| n.strip_suffix(x).filter(|f| exported.contains(*f)));
            if exported.contains(&n) || family.is_some() {
                continue;
            }
            assert!(
                source.contains(&format!("\"{n}\"")),
                "{whence}: {e}: {n} is neither on a scraped page nor a metric name in the source"
            );
            from_source.push(n);
        }
    }
    eprintln!(
        "{} expressions checked; written only in some states (found in the source): {from_source:?}",
        exprs.len()
    );
}

/// `deploy/observability/schema-check/check.mjs` checks the dashboard with
/// `tsc --strict` against Grafana's own definitions (`@grafana/schema`: the
/// dashboard, panels, rows, each panel plugin's options and field config;
/// the foundation SDK's Prometheus query), versions pinned by the lock file
/// there. `.ci/run` installs them with `npm ci` into
/// `TARGET/grafana-schema-check` (or `$TIDEMESH_GRAFANA_SCHEMA_DIR`); the test
/// skips without node or that install unless TIDEMESH_REQUIRE_GRAFANA_SCHEMA=1.
/// Broken copies (a string `gridPos.w`, an unknown panel key, a legend mode
/// the timeseries panel does not have, a query without `refId`) must fail,
/// each naming its place.
#[test]
fn dashboard_passes_grafanas_own_schema_and_broken_copies_fail() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let check = root.join("deploy/observability/schema-check/check.mjs");
    let dash_path = root.join("deploy/observability/tidemesh-dashboard.json");
    let modules = std::env::var_os("TIDEMESH_GRAFANA_SCHEMA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("target dir")
                .join("grafana-schema-check")
        });
    let installed = [
        "typescript/bin/tsc",
        "@grafana/schema/package.json",
        "@grafana/grafana-foundation-sdk/package.json",
    ]
    .iter()
    .all(|f| modules.join("node_modules").join(f).is_file());
    let why = match which("node") {
        None => Some("node not found".to_owned()),
        Some(_) if !installed => Some(format!(
            "no npm ci of deploy/observability/schema-check in {}",
            modules.display()
        )),
        Some(_) => None,
    };
    if let Some(why) = why {
        assert!(
            std::env::var("TIDEMESH_REQUIRE_GRAFANA_SCHEMA").as_deref() != Ok("1"),
            "{why} (TIDEMESH_REQUIRE_GRAFANA_SCHEMA=1; .ci/run installs it)"
        );
        eprintln!(
            "SKIP the Grafana schema check: {why}; install: mkdir -p {m} && cp deploy/observability/schema-check/package*.json {m}/ && npm ci --prefix {m}",
            m = modules.display()
        );
        return;
    }
    let checker = |files: &[&Path]| {
        run(Command::new("node")
            .arg(&check)
            .arg("--modules")
            .arg(&modules)
            .args(files))
    };
    let o = checker(&[&dash_path]);
    assert!(
        o.status.success(),
        "the dashboard fails Grafana's schema: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("grafana schema check OK: 1 dashboard(s) against @grafana/schema 13."),
        "{}",
        text(&o)
    );
    eprintln!("{}", text(&o).trim());

    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&dash_path).expect("dashboard"))
            .expect("dashboard json");
    let panels = dash["panels"].as_array().expect("panels");
    let first = |t: &str| {
        panels
            .iter()
            .position(|p| p["type"] == t)
            .unwrap_or_else(|| panic!("no {t} panel"))
    };
    let (stat, ts) = (first("stat"), first("timeseries"));
    let tmp = tempfile::tempdir().expect("tempdir");
    type Mutation = Box<dyn Fn(&mut Value)>;
    // (file, change, what the checker must say about it)
    let broken: Vec<(&str, Mutation, Vec<String>)> = vec![
        (
            "grid-w-string.json",
            Box::new(move |d| d["panels"][stat]["gridPos"]["w"] = Value::from("6")),
            vec![
                format!("panels[{stat}]"),
                r#""w": "6""#.into(),
                "not assignable to type 'number'".into(),
            ],
        ),
        (
            "unknown-panel-key.json",
            Box::new(move |d| d["panels"][ts]["colour"] = Value::from("red")),
            vec![
                format!("panels[{ts}]"),
                r#"'"colour"' does not exist"#.into(),
            ],
        ),
        (
            "bad-legend-mode.json",
            Box::new(move |d| {
                d["panels"][ts]["options"] =
                    serde_json::json!({"legend": {"displayMode": "sideways"}})
            }),
            vec![
                format!("panels[{ts}].options (timeseries Options)"),
                r#"'"sideways"' is not assignable"#.into(),
            ],
        ),
        (
            "query-without-refid.json",
            Box::new(move |d| {
                d["panels"][stat]["targets"][0]
                    .as_object_mut()
                    .expect("target")
                    .remove("refId");
            }),
            vec![
                format!("panels[{stat}].targets[0] (prometheus query)"),
                "Property 'refId' is missing".into(),
            ],
        ),
    ];
    let mut paths = Vec::new();
    for (name, change, _) in &broken {
        let mut d = dash.clone();
        change(&mut d);
        let p = tmp.path().join(name);
        std::fs::write(&p, serde_json::to_string_pretty(&d).expect("json")).expect("write");
        paths.push(p);
    }
    let o = checker(&paths.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "broken copies pass: {out}");
    assert!(out.contains("grafana schema check FAILED"), "{out}");
    for ((_, _, expect), p) in broken.iter().zip(&paths) {
        let mine: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{}: ", p.display())))
            .collect();
        assert!(
            mine.iter()
                .any(|l| expect.iter().all(|e| l.contains(e.as_str()))),
            "{}: no error with {expect:?} in:\n{out}",
            p.display()
        );
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Replayed, duplicated, reordered and overlapping batches sent over a real
/// QUIC mTLS session as the spoke (with its enrolled key), straight at the
/// hub's evidence session: each record is stored once, a batch ahead of the
/// hub is answered with the hub's position, a foreign signature and an
/// altered record are refused and flagged.
#[test]
fn replayed_and_reordered_batches_over_quic_are_stored_once() {
    use std::sync::Arc;
    use tidemesh_evidence::{samples, Batch, Chain, NewRecord, SealedRecord, UnixMillis};
    use tidemesh_identity::{clock::SystemClock, naming, svid, verify, TrustDomain};
    use tidemesh_net::QuicSettings;
    use tidemesh_proto::{ErrorCode, Request, Response, ALPN_CTL};

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tmp = tempfile::tempdir().expect("tempdir");
        let hub_dir = tmp.path().join("hub");
        let td = TrustDomain::new(TD).expect("td");
        tidemesh_hub::init(&hub_dir, &td, &SystemClock).expect("init");
        let hub = tidemesh_hub::Hub::open(
            &hub_dir,
            tidemesh_hub::HubConfig::default(),
            Arc::new(SystemClock),
        )
        .expect("open");
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = sock.local_addr().expect("addr");
        let h = hub.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            h.serve(
                tidemesh_net::quic::wrap_socket(sock).expect("wrap"),
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        let spoke_dir = tmp.path().join("spoke");
        let id = naming::node_id(&td, "sf01", "n1").expect("id");
        let token = hub
            .create_token(&id, Duration::from_secs(60))
            .expect("token");
        tidemesh_spoke::enroll(
            &spoke_dir,
            addr,
            &token.to_string(),
            false,
            tidemesh_net::quic::wrap_socket(
                std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"),
            )
            .expect("wrap"),
            Arc::new(SystemClock),
            QuicSettings::default(),
        )
        .await
        .expect("enroll");
        let creds = tidemesh_spoke::CredStore::new(&spoke_dir);
        let node = creds.node().expect("node");
        let tls = verify::client_config(
            creds.bundle(&td).expect("bundle"),
            node.chain.clone(),
            &node.key,
            Arc::new(verify::ExactId(naming::hub_id(&td))),
            Arc::new(SystemClock),
            &[ALPN_CTL],
        )
        .expect("tls");
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let conn = ep
            .connect_with(
                QuicSettings::default().client_config(tls).expect("cfg"),
                addr,
                "hub.tidemesh.invalid",
            )
            .expect("connect")
            .await
            .expect("handshake");

        // 300 records of this spoke's chain
        let mut chain = Chain::genesis(&id);
        let now = UnixMillis(tidemesh_hub::unix_ms(std::time::SystemTime::now()));
        let recs: Vec<SealedRecord> = (0..300)
            .map(|i| {
                chain
                    .append(NewRecord::new(
                        now,
                        samples::drill_request("replay", i, now),
                    ))
                    .expect("append")
            })
            .collect();
        let batch = |from: usize, to: usize, key: &svid::KeyPair| -> Vec<u8> {
            Batch::sign(id.clone(), recs[from..to].to_vec(), key)
                .and_then(|b| b.encode())
                .expect("batch")
        };
        // (next_seq, stored, duplicates) of an ack
        async fn send(
            s: &mut quinn::SendStream,
            r: &mut quinn::RecvStream,
            bytes: Vec<u8>,
        ) -> Response {
            tidemesh_net::write_frame(s, &Request::EvidenceBatch { batch: bytes })
                .await
                .expect("write");
            tidemesh_net::read_frame::<Response>(r).await.expect("read")
        }
        fn ack(r: &Response) -> (u64, u32, u32) {
            match r {
                Response::EvidenceAck {
                    next_seq,
                    stored,
                    duplicates,
                    ..
                } => (*next_seq, *stored, *duplicates),
                other => panic!("expected an ack, got {other:?}"),
            }
        }
        async fn open(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream, u64) {
            let (mut s, mut r) = conn.open_bi().await.expect("stream");
            tidemesh_net::write_frame(&mut s, &Request::EvidenceOpen)
                .await
                .expect("open");
            let first = tidemesh_net::read_frame::<Response>(&mut r)
                .await
                .expect("first ack");
            let n = ack(&first).0;
            (s, r, n)
        }

        let key = &node.key;
        let (mut s, mut r, next) = open(&conn).await;
        assert_eq!(next, 1, "a new spoke starts at genesis");
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(0, 100, key)).await),
            (101, 100, 0)
        );
        // reordered: the third batch before the second is answered with the hub's position
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(200, 300, key)).await),
            (101, 0, 0)
        );
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(100, 200, key)).await),
            (201, 100, 0)
        );
        // replayed: stored once, counted as duplicates
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(0, 100, key)).await),
            (201, 0, 100)
        );
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(100, 200, key)).await),
            (201, 0, 100)
        );
        drop((s, r));
        // a new session (as after a reconnect) resumes at the hub's position;
        // an overlapping batch stores only what is new
        let (mut s, mut r, next) = open(&conn).await;
        assert_eq!(next, 201);
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(150, 300, key)).await),
            (301, 100, 50)
        );
        // duplicated datagrams never matter at this level; a duplicated batch does not either
        assert_eq!(
            ack(&send(&mut s, &mut r, batch(150, 300, key)).await),
            (301, 0, 150)
        );

        // signed with another key: refused and flagged
        let other = svid::generate_key().expect("key");
        let mut more = recs.clone();
        let extra = chain
            .append(NewRecord::new(
                now,
                samples::drill_request("replay", 300, now),
            ))
            .expect("append");
        more.push(extra);
        let foreign = Batch::sign(id.clone(), more[300..].to_vec(), &other)
            .and_then(|b| b.encode())
            .expect("batch");
        match send(&mut s, &mut r, foreign).await {
            Response::Error {
                code: ErrorCode::EvidenceRejected,
                message,
            } => {
                assert!(message.contains("signature"), "{message}")
            }
            other => panic!("foreign signature accepted: {other:?}"),
        }
        // an altered record, validly signed by the spoke (a bug or a tampered buffer): refused at its seq
        let (mut s, mut r, _) = open(&conn).await;
        let mut bad = more[300].clone();
        bad.timestamp = UnixMillis(bad.timestamp.0 + 1);
        let altered = Batch::sign(id.clone(), vec![bad], key)
            .and_then(|b| b.encode())
            .expect("batch");
        match send(&mut s, &mut r, altered).await {
            Response::Error {
                code: ErrorCode::EvidenceRejected,
                message,
            } => {
                assert!(message.contains("seq 301"), "{message}")
            }
            other => panic!("altered record accepted: {other:?}"),
        }

        let stats = tidemesh_net::admin::call(
            &tidemesh_net::admin::socket_path(&hub_dir),
            serde_json::json!({"cmd": "evidence_stats", "spoke": id.to_string()}),
        )
        .await
        .expect("stats");
        assert_eq!(stats["records"], 300, "{stats}");
        assert_eq!(stats["high_water_mark"], 300, "{stats}");
        assert_eq!(stats["duplicates"], 400, "{stats}");
        assert_eq!(stats["rejected_batches"], 2, "{stats}");
        let v = tidemesh_net::admin::call(
            &tidemesh_net::admin::socket_path(&hub_dir),
            serde_json::json!({"cmd": "evidence_verify", "spoke": id.to_string()}),
        )
        .await
        .expect("verify");
        assert_eq!(v["ok"], true, "the stored chain is intact: {v}");
        assert_eq!(v["records_checked"], 300, "{v}");
        conn.close(0u32.into(), b"done");
        let _ = stop.send(());
        let _ = served.await;
    });
}

/// A real tmpfs mounted for the length of a test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `8m`, mode 0700) on `dir`; `None`
    /// (with the reason printed) where mounting is not permitted.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mount point");
        let o = run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir));
        if !o.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs on {} (needs root or CAP_SYS_ADMIN): {}",
                dir.display(),
                text(&o)
            );
            return None;
        }
        Some(Tmpfs(dir.to_owned()))
    }

    /// Fills the file system with `filler` until a write fails with "no
    /// space left"; returns the bytes written.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).expect("filler");
        let chunk = vec![0x5a_u8; 4096];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) => {
                    assert_eq!(
                        e.raw_os_error(),
                        Some(28),
                        "filling {}: {e}",
                        self.0.display()
                    );
                    break;
                }
            }
        }
        n
    }

    /// Deletes the filler: the space returns.
    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).expect("remove filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(&self.0));
    }
}

/// Must-show (full disk): the spoke's whole data dir on a real 8 MiB
/// tmpfs, drill load flowing through the running spoke (at most 2,000
/// records held in memory, `--evidence-max-queued`). The hub is cut off
/// (relay blackout: nothing is acked, so evidence.db must grow; while
/// connected, acked records free pages the file reuses and a full disk
/// costs nothing) and the tmpfs filled for 8 s; then the filler is
/// deleted and the link healed. The spoke keeps answering,
/// its status says evidence is degraded, the writer counts what it could
/// not keep (`lost`), recovers when space returns, and at the hub every
/// drill record is either stored exactly once or stood for by a shed
/// record (counted), the chain contiguous and verified.
#[test]
fn spoke_on_a_full_tmpfs_counts_every_lost_record_and_recovers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(fs) = Tmpfs::mount(&tmp.path().join("spoke"), "8m") else {
        return;
    };
    let (hub, relay, s) = setup(
        tmp.path(),
        &[],
        Some(41),
        &["--evidence-max-queued", "2000"],
    );
    let relay = relay.expect("relay");
    const RATE: u32 = 400;
    let load = s.drill_load(RATE, "20s");
    std::thread::sleep(Duration::from_secs(3));
    relay.blackout(None);
    let filled = fs.fill();
    let full_at = Instant::now();
    // The writer notices at its next commit.
    let degraded = wait_for(Duration::from_secs(10), || {
        let st = s.try_status()?;
        st["evidence"]["degraded"].as_str().map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("status never said evidence is degraded: {}", s.status()));
    std::thread::sleep(Duration::from_secs(8).saturating_sub(full_at.elapsed()));
    // Still serving: status and stats answer.
    let during = s.status();
    assert!(during["evidence"]["degraded"].is_string(), "{during}");
    let st_full = spoke_stats(&s).expect("evidence stats while full");
    fs.free();
    relay.heal();
    let freed = Instant::now();
    wait_for(Duration::from_secs(30), || {
        s.try_status()?["evidence"]["degraded"]
            .is_null()
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the writer did not recover: {}", s.status()));
    let recovered_in = freed.elapsed();
    let (run_id, committed) = drill_result(load);
    let st = wait_drained(&hub, &s, Duration::from_secs(60));
    let records = hub_records(&hub, &s.id);
    assert_eq!(
        Some(assert_contiguous(&records)),
        st["last_committed_seq"].as_u64()
    );
    let stored = drill_indices(&records, &run_id).len() as u64;
    let shed: u64 = records
        .iter()
        .filter(|r| r["body"]["shed"]["class"] == "request")
        .map(|r| r["body"]["shed"]["count"].as_u64().unwrap_or(0))
        .sum();
    let lost = &st["lost"];
    let lost_total: u64 = [
        "disk_full",
        "write_failed",
        "backlogged",
        "buffer_full",
        "stopped",
        "too_large",
    ]
    .iter()
    .map(|k| lost[*k].as_u64().unwrap_or(0))
    .sum();
    let total = u64::from(RATE) * 20;
    eprintln!(
        "tmpfs 8 MiB filled with {filled} bytes for {:?}: status said {degraded:?}; {total} drill records, \
         {committed} accepted, {stored} stored at the hub, {shed} stood for by shed records; lost {lost} \
         (write failures {}); recovered {recovered_in:?} after the filler went; stats while full: {st_full}",
        freed.duration_since(full_at),
        st["write_failures"]
    );
    assert!(
        lost_total > 0,
        "nothing was lost while the disk was full: {st}"
    );
    assert!(
        lost["disk_full"].as_u64().unwrap_or(0) > 0,
        "losses counted as disk_full: {lost}"
    );
    assert!(st["write_failures"].as_u64().unwrap_or(0) > 0, "{st}");
    // Only drill load makes request records here: each one is stored
    // once, stood for by a shed record, or refused at append (counted as
    // `backlogged`); the spoke counted every one it could not keep.
    let refused = lost["backlogged"].as_u64().unwrap_or(0);
    assert_eq!(committed + refused, total, "drill: accepted + refused");
    assert_eq!(
        stored + shed + refused,
        total,
        "drill records stored, shed or refused"
    );
    assert_eq!(
        shed + refused,
        lost_total,
        "the hub's shed counts plus the refusals match the spoke's losses"
    );
    assert_verified(&hub, &s.id);
}

/// Must-show (hub evidence.db full): the hub's evidence.db on a real 16
/// MiB tmpfs (a symlink from the data dir; hub.db stays on the normal
/// disk), drill load flowing from one spoke; the tmpfs is filled for 14 s.
/// Meanwhile the hub renews node SVIDs (`--node-ttl 16s`: a renewal every
/// 8 s) and revokes a second spoke, says it is full (`stats` →
/// `evidence_store`, `tidemesh_hub_evidence_store_full 1`), and the
/// spoke's sync is told to retry (throttled, not refused, no hang). Once the
/// filler is deleted the hub ingests again: every drill record exactly
/// once, the chain verified, the state back to `ok`.
#[test]
fn hub_serves_renewals_and_revocations_while_its_evidence_db_is_full() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(fs) = Tmpfs::mount(&tmp.path().join("hub-evidence"), "16m") else {
        return;
    };
    let metrics = tidemesh_tests::free_tcp();
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&[
        "--node-ttl",
        "16s",
        "--metrics",
        &metrics.to_string(),
    ]);
    std::os::unix::fs::symlink(
        fs.0.join("evidence.db"),
        hub.dir.join(tidemesh_hub::EVIDENCE_DB),
    )
    .expect("symlink evidence.db onto the tmpfs");
    let hub_addr = hub.start();
    let id = node("sf01", "n1");
    let mut s = SpokeProc::new(tmp.path(), "spoke", &id);
    assert!(s.enroll(hub_addr, &hub.token(&id, "10m")).status.success());
    s.start();
    s.wait_state("connected", Duration::from_secs(10));
    let other = node("sf01", "n2");
    let mut s2 = SpokeProc::new(tmp.path(), "spoke2", &other);
    assert!(s2
        .enroll(hub_addr, &hub.token(&other, "10m"))
        .status
        .success());
    s2.start();
    s2.wait_state("connected", Duration::from_secs(10));

    let hub_state = |hub: &HubProc| -> Value {
        let o = hub.cli(&["stats", "--json"]);
        assert!(o.status.success(), "stats: {}", text(&o));
        serde_json::from_slice::<Value>(&o.stdout).expect("stats json")["evidence_store"].clone()
    };
    let gauge = |name: &str| -> Option<f64> {
        scrape(metrics.port()).lines().find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.parse().ok())
        })
    };
    assert_eq!(hub_state(&hub)["state"], "ok");
    assert_eq!(gauge("tidemesh_hub_evidence_store_full"), Some(0.0));

    let load = s.drill_load(400, "30s");
    std::thread::sleep(Duration::from_secs(3));
    let cert_before = hub.spoke(&id).expect("row")["cert_not_after"].clone();
    let filled = fs.fill();
    let full_at = Instant::now();
    let state = wait_for(Duration::from_secs(15), || {
        let st = hub_state(&hub);
        (st["state"] == "disk_full").then_some(st)
    })
    .unwrap_or_else(|| {
        panic!(
            "the hub never said its evidence store is full: {}",
            hub_state(&hub)
        )
    });
    assert_eq!(gauge("tidemesh_hub_evidence_store_full"), Some(1.0));
    // Still ready (it renews and revokes below), the outage named.
    assert_eq!(gauge("tidemesh_hub_ready"), Some(1.0));
    let o = run(Command::new(bin("tidemesh-hub")).args([
        "healthcheck",
        "--metrics",
        &metrics.to_string(),
    ]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("evidence.db failing"), "{}", text(&o));
    // The spoke is told to wait, not refused.
    let throttled = wait_for(Duration::from_secs(15), || {
        let st = spoke_stats(&s)?;
        (st["sync_throttled_ms"].as_u64()? > 0).then_some(st)
    })
    .expect("the spoke's sync was told to retry later");
    assert_eq!(throttled["sync_rejections"], 0, "{throttled}");
    // A revocation while full.
    let o = hub.cli(&["revoke", "--spoke", &other]);
    assert!(o.status.success(), "revoke while full: {}", text(&o));
    assert_eq!(hub.spoke(&other).expect("row")["revoked"], true);
    s2.wait_state("revoked", Duration::from_secs(15));
    // A renewal while full (one every 8 s).
    let renewed = wait_for(
        Duration::from_secs(14).saturating_sub(full_at.elapsed()),
        || {
            let now = hub.spoke(&id)?["cert_not_after"].clone();
            (now != cert_before).then_some(now)
        },
    )
    .unwrap_or_else(|| panic!("no renewal while full: still {cert_before}"));
    let still = hub_state(&hub);
    assert_eq!(
        still["state"], "disk_full",
        "full during the renewal: {still}"
    );
    std::thread::sleep(Duration::from_secs(14).saturating_sub(full_at.elapsed()));
    fs.free();
    let freed = Instant::now();
    wait_for(Duration::from_secs(30), || {
        (hub_state(&hub)["state"] == "ok").then_some(())
    })
    .unwrap_or_else(|| panic!("ingest did not resume: {}", hub_state(&hub)));
    let resumed_in = freed.elapsed();
    assert_eq!(gauge("tidemesh_hub_evidence_store_full"), Some(0.0));
    let failures = gauge("tidemesh_hub_evidence_store_failures_total").unwrap_or(0.0);
    assert!(failures >= 1.0, "store failures counted: {failures}");
    let (run_id, committed) = drill_result(load);
    assert_eq!(committed, 400 * 30, "the spoke kept every record");
    // Renewals keep appending certificate records, so the hub may hold
    // more than the spoke had committed when it drained.
    let st = wait_drained(&hub, &s, Duration::from_secs(90));
    let records = hub_records(&hub, &s.id);
    let last = assert_contiguous(&records);
    assert!(
        Some(last) >= st["last_committed_seq"].as_u64(),
        "hub holds up to {last}: {st}"
    );
    assert_eq!(
        drill_indices(&records, &run_id).len() as u64,
        committed,
        "every drill record exactly once"
    );
    assert_verified(&hub, &s.id);
    eprintln!(
        "hub evidence.db on a 16 MiB tmpfs filled ({filled} bytes) for {:?}: stats said {state}; spoke throttled \
         {} ms, 0 refusals; revocation and renewal (cert_not_after {cert_before} -> {renewed}) while full; \
         ingest resumed {resumed_in:?} after the filler went; {failures} failed commits; {committed} drill \
         records stored exactly once, chain verified; spoke sync: duplicates {}",
        freed.duration_since(full_at),
        st["sync_throttled_ms"],
        st["sync_duplicates"]
    );
}
