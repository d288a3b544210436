//! What the evidence writer holds in memory while commits fail (disk full,
//! I/O errors), how it sheds from that by the buffer's priority rules, and
//! the counters of every record the buffer could not keep.
//!
//! Who drives it: the writer task in [`super`] keeps its uncommitted
//! records as [`Held`] entries, calls [`shed_held`] while it waits to
//! retry, and counts losses in [`LossCounters`]; `append` counts refusals.
//! What it must not do: touch the disk or a clock, or shed an audit record
//! or anything a failed transaction already carried (that transaction may
//! have reached the disk after all; see [`shed_held`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tidemesh_evidence::{EvidenceSeq, PriorityClass, ShedReason, UnixMillis};

use super::Append;

/// Why records were lost: the `reason` label of
/// `tidemesh_spoke_evidence_lost_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossReason {
    /// Commits failed with "no space left on device"; the writer shed the
    /// records from memory while it waited (a `disk_full` shed record in
    /// the chain stands for them).
    DiskFull,
    /// Commits failed with another I/O error; shed from memory while
    /// retrying (a `write_failed` shed record stands for them).
    WriteFailed,
    /// Refused at append: too many records were waiting for the disk.
    Backlogged,
    /// Refused at append: an audit record that did not fit next to the
    /// audit records held (also counted in `audit_refused`).
    BufferFull,
    /// Refused at append after the writer stopped or the buffer closed, or
    /// still held in memory when the buffer closed while commits failed.
    Stopped,
    /// Over the size limit even after truncation (not expected: see
    /// `tidemesh_evidence::truncate`).
    TooLarge,
}

impl LossReason {
    /// Every reason, in label order.
    pub const ALL: [LossReason; 6] = [
        LossReason::DiskFull,
        LossReason::WriteFailed,
        LossReason::Backlogged,
        LossReason::BufferFull,
        LossReason::Stopped,
        LossReason::TooLarge,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::DiskFull => "disk_full",
            LossReason::WriteFailed => "write_failed",
            LossReason::Backlogged => "backlogged",
            LossReason::BufferFull => "buffer_full",
            LossReason::Stopped => "stopped",
            LossReason::TooLarge => "too_large",
        }
    }

    fn index(self) -> usize {
        match self {
            LossReason::DiskFull => 0,
            LossReason::WriteFailed => 1,
            LossReason::Backlogged => 2,
            LossReason::BufferFull => 3,
            LossReason::Stopped => 4,
            LossReason::TooLarge => 5,
        }
    }

    /// The reason a shed record written for these losses carries (only
    /// the writer's own reasons make shed records).
    pub(super) fn shed_reason(self) -> ShedReason {
        match self {
            LossReason::DiskFull => ShedReason::DiskFull,
            _ => ShedReason::WriteFailed,
        }
    }
}

/// Records the buffer could not keep since it opened, by reason
/// (`evidence stats --json`: `lost`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostCounts {
    /// See [`LossReason::DiskFull`].
    pub disk_full: u64,
    /// See [`LossReason::WriteFailed`].
    pub write_failed: u64,
    /// See [`LossReason::Backlogged`].
    pub backlogged: u64,
    /// See [`LossReason::BufferFull`].
    pub buffer_full: u64,
    /// See [`LossReason::Stopped`].
    pub stopped: u64,
    /// See [`LossReason::TooLarge`].
    pub too_large: u64,
}

impl LostCounts {
    /// All reasons together.
    pub fn total(&self) -> u64 {
        LossReason::ALL.iter().map(|r| self.get(*r)).sum()
    }

    /// The count for `reason`.
    pub fn get(&self, reason: LossReason) -> u64 {
        match reason {
            LossReason::DiskFull => self.disk_full,
            LossReason::WriteFailed => self.write_failed,
            LossReason::Backlogged => self.backlogged,
            LossReason::BufferFull => self.buffer_full,
            LossReason::Stopped => self.stopped,
            LossReason::TooLarge => self.too_large,
        }
    }
}

/// The live counters behind [`LostCounts`].
#[derive(Debug, Default)]
pub(super) struct LossCounters([AtomicU64; 6]);

impl LossCounters {
    pub(super) fn add(&self, reason: LossReason, n: u64) {
        if let Some(c) = self.0.get(reason.index()) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(super) fn snapshot(&self) -> LostCounts {
        let g = |r: LossReason| {
            self.0
                .get(r.index())
                .map_or(0, |c| c.load(Ordering::Relaxed))
        };
        LostCounts {
            disk_full: g(LossReason::DiskFull),
            write_failed: g(LossReason::WriteFailed),
            backlogged: g(LossReason::Backlogged),
            buffer_full: g(LossReason::BufferFull),
            stopped: g(LossReason::Stopped),
            too_large: g(LossReason::TooLarge),
        }
    }
}

/// Records shed from memory while commits failed: contiguous sequence
/// numbers, never sealed, written as one shed record once a commit works
/// (its `last_hash` is the link before the run: nothing was sealed in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LostRun {
    pub(super) first: EvidenceSeq,
    pub(super) last: EvidenceSeq,
    /// `Request` if any request record is in it, else `Debug`.
    pub(super) class: PriorityClass,
    pub(super) first_timestamp: UnixMillis,
    pub(super) last_timestamp: UnixMillis,
    pub(super) reason: LossReason,
}

impl LostRun {
    fn of(a: &Append, reason: LossReason) -> LostRun {
        LostRun {
            first: a.seq,
            last: a.seq,
            class: a.class,
            first_timestamp: a.timestamp,
            last_timestamp: a.timestamp,
            reason,
        }
    }

    fn extend(&mut self, a: &Append) {
        self.last = a.seq;
        self.last_timestamp = a.timestamp;
        if a.class == PriorityClass::Request {
            self.class = PriorityClass::Request;
        }
    }
}

/// An entry the writer holds until a commit stores it: a record, or a run
/// of records shed from memory.
pub(super) enum Held {
    Rec(Append),
    Lost(LostRun),
}

impl Held {
    pub(super) fn first(&self) -> EvidenceSeq {
        match self {
            Held::Rec(a) => a.seq,
            Held::Lost(l) => l.first,
        }
    }

    pub(super) fn last(&self) -> EvidenceSeq {
        match self {
            Held::Rec(a) => a.seq,
            Held::Lost(l) => l.last,
        }
    }
}

/// Sheds up to `excess` records from `held`, oldest first, by the
/// buffer's priority rules: `debug` records, then (if that was not
/// enough) `request` records, never `audit`. Adjacent shed records merge
/// into one run (of the same reason). Nothing at or below `attempted` (the
/// last sequence number a failed transaction carried) is touched: that
/// transaction may have reached the disk after all, and the writer must
/// then find exactly what it sent. Returns how many records were shed.
pub(super) fn shed_held(
    held: &mut VecDeque<Held>,
    excess: u64,
    attempted: u64,
    reason: LossReason,
) -> u64 {
    let mut shed = 0;
    for level in [PriorityClass::Debug, PriorityClass::Request] {
        if shed >= excess {
            break;
        }
        let mut out = VecDeque::with_capacity(held.len());
        for h in held.drain(..) {
            let movable = shed < excess && h.first().get() > attempted;
            let take = movable
                && match &h {
                    Held::Rec(a) => match level {
                        PriorityClass::Debug => a.class == PriorityClass::Debug,
                        _ => a.class != PriorityClass::Audit,
                    },
                    Held::Lost(_) => false,
                };
            if !take {
                match (out.back_mut(), h) {
                    // Two runs shed at different times, now adjacent: one.
                    (Some(Held::Lost(run)), Held::Lost(next))
                        if run.first.get() > attempted
                            && next.first.get() > attempted
                            && run.reason == next.reason
                            && run.last.next() == next.first =>
                    {
                        run.last = next.last;
                        run.last_timestamp = next.last_timestamp;
                        if next.class == PriorityClass::Request {
                            run.class = PriorityClass::Request;
                        }
                    }
                    (_, h) => out.push_back(h),
                }
                continue;
            }
            let Held::Rec(a) = h else {
                continue;
            };
            shed += 1;
            match out.back_mut() {
                Some(Held::Lost(run))
                    if run.first.get() > attempted
                        && run.reason == reason
                        && run.last.next() == a.seq =>
                {
                    run.extend(&a);
                }
                _ => out.push_back(Held::Lost(LostRun::of(&a, reason))),
            }
        }
        *held = out;
    }
    shed
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemesh_evidence::{samples, EncodedBody, RecordBody};

    fn append(seq: u64, class: PriorityClass) -> Held {
        let body: RecordBody = samples::mode_transition();
        Held::Rec(Append {
            seq: EvidenceSeq::new(seq).expect("nz"),
            timestamp: UnixMillis(seq),
            class,
            body: EncodedBody::new(&body).expect("encodes"),
            est_cost: 100,
        })
    }

    fn shape(held: &VecDeque<Held>) -> Vec<String> {
        held.iter()
            .map(|h| match h {
                Held::Rec(a) => format!("{}{:?}", a.seq, a.class),
                Held::Lost(l) => format!("lost{}-{}{:?}", l.first, l.last, l.class),
            })
            .collect()
    }

    #[test]
    fn sheds_debug_first_then_requests_never_audit_nor_attempted() {
        use PriorityClass::*;
        let classes = [
            Request, Debug, Debug, Audit, Request, Debug, Request, Request,
        ];
        let mut held: VecDeque<Held> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| append(i as u64 + 1, *c))
            .collect();
        // 1..=2 were in a failed transaction: untouchable.
        let n = shed_held(&mut held, 2, 2, LossReason::DiskFull);
        assert_eq!(n, 2);
        assert_eq!(
            shape(&held),
            [
                "1Request",
                "2Debug",
                "lost3-3Debug",
                "4Audit",
                "5Request",
                "lost6-6Debug",
                "7Request",
                "8Request"
            ]
        );
        let n = shed_held(&mut held, 10, 2, LossReason::DiskFull);
        assert_eq!(n, 3, "the three requests after the attempted ones");
        assert_eq!(
            shape(&held),
            [
                "1Request",
                "2Debug",
                "lost3-3Debug",
                "4Audit",
                "lost5-8Request"
            ]
        );
        let seqs: Vec<(u64, u64)> = held
            .iter()
            .map(|h| (h.first().get(), h.last().get()))
            .collect();
        assert!(seqs.windows(2).all(|w| w[0].1 + 1 == w[1].0), "contiguous");
    }

    #[test]
    fn counters_add_up_by_reason() {
        let c = LossCounters::default();
        c.add(LossReason::DiskFull, 3);
        c.add(LossReason::Backlogged, 2);
        let s = c.snapshot();
        assert_eq!((s.disk_full, s.backlogged, s.total()), (3, 2, 5));
        let json = serde_json::to_value(s).expect("json");
        assert_eq!(json["disk_full"], 3);
    }
}
