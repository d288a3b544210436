//! Disk full and I/O errors under the evidence writer, on a simulated disk
//! (`tidemesh_simdisk`): the writer survives failed commits, every record
//! is either stored or counted as lost, and the chain says where.

use std::collections::BTreeMap;
use std::io::ErrorKind;

use tidemesh_evidence::{samples, RecordBody};
use tidemesh_simdisk::SimDisk;

use super::*;

fn spoke() -> SpiffeId {
    SpiffeId::parse("spiffe://edge.example/store/sf01/node/n1").expect("valid id")
}

fn storage(disk: &SimDisk) -> Storage {
    let disk = disk.clone();
    Storage::Backend(Arc::new(move || Box::new(disk.backend())))
}

fn config() -> BufferConfig {
    BufferConfig {
        capacity_bytes: 64 << 20,
        commit_interval: Duration::from_millis(2),
        max_group: 64,
        max_queued: 400,
        cache_bytes: 1 << 20,
        retry_min: Duration::from_millis(2),
        retry_max: Duration::from_millis(20),
        ..BufferConfig::default()
    }
}

fn record(i: u64) -> NewRecord {
    let t = UnixMillis(1_705_314_600_000 + i);
    match i % 10 {
        0 => NewRecord::new(t, samples::mode_transition()),
        1..=3 => NewRecord {
            timestamp: t,
            class: PriorityClass::Debug,
            body: samples::request(i, t),
        },
        _ => NewRecord::new(t, samples::request(i, t)),
    }
}

/// What the test appended: accepted (by sequence number) and refused.
#[derive(Default)]
struct Ledger {
    accepted: BTreeMap<u64, (PriorityClass, RecordBody)>,
    refused: u64,
    last: Option<AppendTicket>,
}

impl Ledger {
    fn append(&mut self, b: &EvidenceBuffer, i: u64) {
        let r = record(i);
        let (class, body) = (r.class, r.body.clone());
        match b.append(r) {
            Ok(tk) => {
                self.accepted.insert(tk.seq().get(), (class, body));
                self.last = Some(tk);
            }
            Err(AppendError::Backlogged(_)) => self.refused += 1,
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }

    async fn settle(&mut self) {
        if let Some(tk) = self.last.take() {
            tokio::time::timeout(Duration::from_secs(20), tk.committed())
                .await
                .expect("the writer recovers")
                .expect("committed");
        }
    }
}

/// Every accepted record is stored as appended or covered by a shed
/// record of `reason`; returns how many were shed.
fn account(b: &EvidenceBuffer, ledger: &Ledger, reason: ShedReason) -> u64 {
    let v = b.verify().expect("the chain verifies");
    let recs = b
        .pending(v.start(), usize::MAX, usize::MAX)
        .expect("pending");
    let mut covered = 0u64;
    let mut shed = 0u64;
    for r in &recs {
        match r.as_shed() {
            Some(s) => {
                assert_eq!(s.reason, reason, "{s:?}");
                for seq in s.range.first.get()..=s.range.last.get() {
                    let (class, _) = ledger.accepted.get(&seq).expect("shed an appended record");
                    assert_ne!(*class, PriorityClass::Audit, "audit record {seq} shed");
                }
                covered += s.range.len();
                shed += s.count;
            }
            None => {
                let (class, body) = ledger.accepted.get(&r.seq.get()).expect("appended");
                assert_eq!((*class, body), (r.class, &r.body), "record {}", r.seq);
                covered += 1;
            }
        }
    }
    assert_eq!(
        covered,
        ledger.accepted.len() as u64,
        "every seq accounted for"
    );
    shed
}

async fn outage(kind: ErrorKind, reason: ShedReason, lost: fn(&LostCounts) -> u64) {
    let disk = SimDisk::new();
    let b = EvidenceBuffer::open_on(storage(&disk), &spoke(), config()).expect("opens");
    let mut ledger = Ledger::default();
    for i in 0..100 {
        ledger.append(&b, i);
    }
    ledger.settle().await;
    // The disk fails; traffic goes on.
    disk.fail_writes(Some(kind));
    for i in 100..1_500 {
        ledger.append(&b, i);
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let st = b.stats(UnixMillis(0));
    assert!(st.degraded.is_some(), "{st:?}");
    assert!(st.failed.is_none(), "{st:?}");
    assert!(st.write_failures > 0);
    assert!(lost(&st.lost) > 0, "shed from memory while failing: {st:?}");
    // Space comes back.
    disk.fail_writes(None);
    ledger.settle().await;
    let st = b.stats(UnixMillis(0));
    assert!(st.degraded.is_none(), "{st:?}");
    assert_eq!(st.lost.backlogged, ledger.refused);
    let shed = account(&b, &ledger, reason);
    assert_eq!(shed, lost(&st.lost), "every shed record counted: {st:?}");
    eprintln!(
        "{:?}: {} appended, {} stored, {} shed (in {} shed records), {} refused, {} failed commits",
        kind,
        ledger.accepted.len() as u64 + ledger.refused,
        ledger.accepted.len() as u64 - shed,
        shed,
        b.tail(usize::MAX)
            .expect("tail")
            .iter()
            .filter(|r| r.as_shed().is_some())
            .count(),
        ledger.refused,
        st.write_failures
    );
    // The writer goes on, and the file reopens.
    for i in 1_500..1_600 {
        ledger.append(&b, i);
    }
    ledger.settle().await;
    b.close().await.expect("closes");
    let b = EvidenceBuffer::open_on(storage(&disk), &spoke(), config()).expect("reopens");
    account(&b, &ledger, reason);
    b.close().await.expect("closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_sheds_counts_marks_and_recovers() {
    outage(ErrorKind::StorageFull, ShedReason::DiskFull, |l| {
        l.disk_full
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_errors_shed_count_mark_and_recover() {
    outage(ErrorKind::Other, ShedReason::WriteFailed, |l| {
        l.write_failed
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_failure_anywhere_in_a_commit_loses_nothing() {
    // One failed write or sync at every position of a commit, including
    // the last sync (the commit reached the file but was reported failed:
    // the writer must find it stored and not write it twice).
    for n in 1..=40 {
        let disk = SimDisk::new();
        let b = EvidenceBuffer::open_on(storage(&disk), &spoke(), config()).expect("opens");
        let mut ledger = Ledger::default();
        for i in 0..20 {
            ledger.append(&b, i);
        }
        ledger.settle().await;
        disk.fail_once_after(n, ErrorKind::Other);
        for i in 20..60 {
            ledger.append(&b, i);
        }
        ledger.settle().await;
        disk.fail_once_after(0, ErrorKind::Other);
        let st = b.stats(UnixMillis(0));
        assert_eq!(st.lost.total(), 0, "n={n}: {st:?}");
        assert_eq!(account(&b, &ledger, ShedReason::WriteFailed), 0, "n={n}");
        b.close().await.expect("closes");
        let b = EvidenceBuffer::open_on(storage(&disk), &spoke(), config()).expect("reopens");
        account(&b, &ledger, ShedReason::WriteFailed);
        assert_eq!(b.stats(UnixMillis(0)).last_committed_seq, 60, "n={n}");
        b.close().await.expect("closes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_while_failing_counts_what_is_held() {
    let disk = SimDisk::new();
    let b = EvidenceBuffer::open_on(storage(&disk), &spoke(), config()).expect("opens");
    disk.fail_writes(Some(ErrorKind::StorageFull));
    for i in 0..10 {
        b.append(record(i)).expect("taken while failing");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let probe = b.clone();
    assert!(b.close().await.is_err(), "could not commit");
    let st = probe.stats(UnixMillis(0));
    assert_eq!(st.lost.stopped, 10, "{st:?}");
    assert!(st.failed.is_some());
    assert!(probe.append(record(10)).is_err());
    assert_eq!(probe.stats(UnixMillis(0)).lost.stopped, 11);
}
