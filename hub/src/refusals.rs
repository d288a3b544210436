//! Refused control requests: counted per request and reason, logged at a
//! bounded rate, and audited only where the number of audit rows is bounded
//! by something other than the caller's effort.
//!
//! Anonymous input (an Enroll with a wrong token, a Reestablish for a
//! guessed node ID or with a bad proof, a bad frame) is cheap to send, so
//! it must cost the hub nothing durable: each refusal bumps an in-memory
//! counter (`tidemesh_hub_refusals_total{request,reason}`, `tidemesh-hub
//! stats`) and at most one log line per request and reason per
//! [`RefusalBook::LOG_EVERY`], which carries how many it stood for.
//! Refusals of a caller that proved an identity (a node SVID, a valid
//! join token, a proof of possession of the pinned key) are audited, at
//! most once per subject and reason per [`RefusalBook::AUDIT_EVERY`], for
//! at most [`RefusalBook::MAX_AUDIT_SUBJECTS`] subjects at a time.
//!
//! Who drives it: `authority` and the stream handler in `lib.rs`, which
//! hold it behind a lock, pass the time in and act on its answers (write
//! the log line, the audit row). What it must not do: read a clock, log,
//! or touch the store.

use std::collections::BTreeMap;

/// Which request was refused (the `request` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusedRequest {
    /// `Enroll` or `EnrollNode` on an anonymous connection.
    Enroll,
    /// `Reestablish` on an anonymous connection.
    Reestablish,
    /// Any other request on an anonymous connection (it needs a session).
    Anonymous,
    /// A request on a session authenticated with a node SVID.
    Session,
    /// A frame that could not be read (too large, malformed, another
    /// version, too slow).
    Frame,
}

impl RefusedRequest {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedRequest::Enroll => "enroll",
            RefusedRequest::Reestablish => "reestablish",
            RefusedRequest::Anonymous => "anonymous",
            RefusedRequest::Session => "session",
            RefusedRequest::Frame => "frame",
        }
    }
}

/// Why it was refused (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The ID asked for is not a node of this trust domain.
    ForeignId,
    /// No such join token (never issued, or its tombstone is gone).
    TokenUnknown,
    /// A join token that was already used or burned, presented again.
    TokenReplayed,
    /// The join token had expired (burned now).
    TokenExpired,
    /// The join token is bound to another node ID (burned now).
    TokenMismatch,
    /// A CSR that does not parse, or a node CA CSR with the node key.
    BadCsr,
    /// A key on the revocation list.
    KeyRevoked,
    /// Re-establishment for a node ID the hub does not know.
    NotEnrolled,
    /// Re-establishment whose proof of possession does not verify.
    BadProof,
    /// A key other than the pinned one (CSR or connection).
    KeyMismatch,
    /// The spoke is revoked.
    Revoked,
    /// Re-establishment past the max-offline window.
    OfflineWindow,
    /// A request that needs an authenticated session.
    NeedsSession,
    /// A workload SVID asked of the hub.
    WorkloadFromHub,
    /// A frame over its size limit.
    TooLarge,
    /// A frame that does not decode.
    Malformed,
    /// A frame of another protocol version.
    UnsupportedVersion,
    /// No complete request within the read deadline.
    Timeout,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ForeignId => "foreign_id",
            Reason::TokenUnknown => "token_unknown",
            Reason::TokenReplayed => "token_replayed",
            Reason::TokenExpired => "token_expired",
            Reason::TokenMismatch => "token_mismatch",
            Reason::BadCsr => "bad_csr",
            Reason::KeyRevoked => "key_revoked",
            Reason::NotEnrolled => "not_enrolled",
            Reason::BadProof => "bad_proof",
            Reason::KeyMismatch => "key_mismatch",
            Reason::Revoked => "revoked",
            Reason::OfflineWindow => "offline_window",
            Reason::NeedsSession => "needs_session",
            Reason::WorkloadFromHub => "workload_from_hub",
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::Timeout => "timeout",
        }
    }
}

/// One kind of refusal: the request and the reason.
pub type Kind = (RefusedRequest, Reason);

#[derive(Debug, Default)]
struct LogState {
    /// When the last line for this kind was due (ms).
    last_ms: Option<u64>,
    /// Refusals since that line.
    suppressed: u64,
}

/// Counters, the log limiter and the audit limiter.
#[derive(Debug, Default)]
pub struct RefusalBook {
    counts: BTreeMap<Kind, u64>,
    log: BTreeMap<Kind, LogState>,
    /// (subject, kind) → when its last audit row was admitted (ms).
    audited: BTreeMap<(String, Kind), u64>,
}

impl RefusalBook {
    /// At most one log line per kind this often (ms).
    pub const LOG_EVERY: u64 = 10_000;
    /// At most one audit row per subject and kind this often (ms).
    pub const AUDIT_EVERY: u64 = 600_000;
    /// Subjects remembered for the audit limiter; when full (after dropping
    /// the ones past [`RefusalBook::AUDIT_EVERY`]), further authenticated
    /// refusals are counted and logged only.
    pub const MAX_AUDIT_SUBJECTS: usize = 4_096;

    /// An empty book.
    pub fn new() -> RefusalBook {
        RefusalBook::default()
    }

    /// Counts one refusal at `now_ms`. Returns `Some(suppressed)` when a log
    /// line is due now: it stands for itself and the `suppressed` refusals
    /// of the same kind since the last line.
    pub fn handle_refusal(&mut self, now_ms: u64, kind: Kind) -> Option<u64> {
        *self.counts.entry(kind).or_insert(0) += 1;
        let st = self.log.entry(kind).or_default();
        match st.last_ms {
            Some(last) if now_ms.saturating_sub(last) < Self::LOG_EVERY && now_ms >= last => {
                st.suppressed += 1;
                None
            }
            _ => {
                st.last_ms = Some(now_ms);
                Some(std::mem::take(&mut st.suppressed))
            }
        }
    }

    /// Whether a refusal of an authenticated `subject` gets an audit row at
    /// `now_ms` (and notes it if so). Call after [`RefusalBook::handle_refusal`].
    pub fn audit_due(&mut self, now_ms: u64, subject: &str, kind: Kind) -> bool {
        let key = (subject.to_owned(), kind);
        if let Some(&last) = self.audited.get(&key) {
            if now_ms >= last && now_ms - last < Self::AUDIT_EVERY {
                return false;
            }
            self.audited.insert(key, now_ms);
            return true;
        }
        if self.audited.len() >= Self::MAX_AUDIT_SUBJECTS {
            self.audited
                .retain(|_, last| now_ms < *last || now_ms - *last < Self::AUDIT_EVERY);
            if self.audited.len() >= Self::MAX_AUDIT_SUBJECTS {
                return false;
            }
        }
        self.audited.insert(key, now_ms);
        true
    }

    /// Every kind refused so far with its count, ordered by request and
    /// reason.
    pub fn counts(&self) -> Vec<(Kind, u64)> {
        self.counts.iter().map(|(k, n)| (*k, *n)).collect()
    }

    /// How many refusals of `kind` so far.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD_TOKEN: Kind = (RefusedRequest::Enroll, Reason::TokenUnknown);
    const BAD_PROOF: Kind = (RefusedRequest::Reestablish, Reason::BadProof);

    #[test]
    fn counts_every_refusal_and_logs_one_line_per_kind_per_period() {
        let mut b = RefusalBook::new();
        let mut lines = Vec::new();
        // 2,000 refusals over 30 s, one every 15 ms
        for i in 0..2_000u64 {
            if let Some(s) = b.handle_refusal(1_000 + i * 15, BAD_TOKEN) {
                lines.push(s);
            }
        }
        assert_eq!(b.count(BAD_TOKEN), 2_000);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0], 0);
        // every refusal is accounted for by a line or a suppressed count
        let pending = b.log.get(&BAD_TOKEN).map(|s| s.suppressed).unwrap_or(0);
        assert_eq!(
            lines.len() as u64 + lines.iter().sum::<u64>() + pending,
            2_000
        );
        // another kind has its own line
        assert_eq!(b.handle_refusal(1_010, BAD_PROOF), Some(0));
        assert_eq!(b.counts().len(), 2);
    }

    #[test]
    fn a_clock_stepping_back_does_not_silence_the_log() {
        let mut b = RefusalBook::new();
        assert_eq!(b.handle_refusal(50_000, BAD_TOKEN), Some(0));
        assert_eq!(b.handle_refusal(51_000, BAD_TOKEN), None);
        assert_eq!(b.handle_refusal(1_000, BAD_TOKEN), Some(1));
        assert_eq!(b.handle_refusal(2_000, BAD_TOKEN), None);
    }

    #[test]
    fn authenticated_refusals_are_audited_once_per_subject_and_period() {
        let mut b = RefusalBook::new();
        let k = (RefusedRequest::Session, Reason::KeyMismatch);
        assert!(b.audit_due(0, "a", k));
        assert!(!b.audit_due(1_000, "a", k));
        assert!(b.audit_due(1_000, "b", k));
        assert!(b.audit_due(1_000, "a", (RefusedRequest::Session, Reason::Revoked)));
        assert!(b.audit_due(RefusalBook::AUDIT_EVERY, "a", k));
        assert!(!b.audit_due(RefusalBook::AUDIT_EVERY + 1, "a", k));
    }

    #[test]
    fn the_audit_limiter_is_bounded() {
        let mut b = RefusalBook::new();
        let k = (RefusedRequest::Reestablish, Reason::Revoked);
        for i in 0..RefusalBook::MAX_AUDIT_SUBJECTS {
            assert!(b.audit_due(0, &format!("s{i}"), k));
        }
        assert!(!b.audit_due(10, "one more", k));
        assert_eq!(b.audited.len(), RefusalBook::MAX_AUDIT_SUBJECTS);
        // once the period has passed, room is made again
        assert!(b.audit_due(RefusalBook::AUDIT_EVERY, "one more", k));
        assert_eq!(b.audited.len(), 1);
    }
}
