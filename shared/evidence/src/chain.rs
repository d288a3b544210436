//! The per-spoke hash chain: sealing records, shed records, verification.
//!
//! Who drives it: the spoke buffer seals with [`Chain`] and [`ShedRun`];
//! the spoke's sync session cuts shed records at a resume position with
//! [`resume_shed`]; the hub and the `verify` commands check with
//! [`ChainVerifier`] / [`verify_chain`]. What it must not do: I/O, clock
//! reads, or decide *what* to shed (that is the buffer's policy).
//!
//! # Links
//! ```text
//! h(0)  = SHA-256("tidemesh-evidence-genesis-v1" || spoke SPIFFE ID, UTF-8)
//! h(n)  = SHA-256(link(n-1) || canonical bytes of record n)
//! canonical bytes = postcard(seq, timestamp, class, body)
//! link(n) = h(n) for an ordinary record, `last_hash` for a shed record
//! ```
//! A [`ChainPosition`] `(next, hash)` names a point of the chain: the
//! sequence number the next record must carry and the link it must hash
//! from. Verification can start at the genesis position or at any
//! checkpoint (the hub's per-spoke high-water mark, a retention cut).
//!
//! # Shed records
//! When the buffer must drop records `a..=b` (a contiguous run with no audit
//! record in it), it replaces them with **one** shed record:
//! * its sequence number is `a` and its body says `range = a..=b`,
//!   `count`, `class`, `reason`, and `last_hash = link(b)`;
//! * it is hashed like any record from the link before the range:
//!   `hash = SHA-256(link(a-1) || canonical bytes)`;
//! * the record after the range, `b+1`, was sealed long before and still
//!   links to `link(b)`, which is exactly the shed record's `last_hash`.
//!
//! So a verifier walks `… a-1, shed(a..=b), b+1 …` checking every stored
//! hash, and the records after a shed range keep verifying. What the chain
//! cannot prove is what the dropped records said: `last_hash` is the spoke's
//! word for the link at `b`. Any change to a shed record's bytes (its range,
//! count, reason or `last_hash`) breaks its own hash, and a changed
//! `last_hash` also breaks the link of `b+1`.
//!
//! A shed record never overlaps records the hub may already hold: when sync
//! resumes at a position inside a shed range (the hub got real records
//! `a..=m` before they were shed at the spoke), [`resume_shed`] re-seals the
//! rest, `m+1..=b`, from the hub's link at `m`. The same record can also
//! grow: the buffer merges a new run that touches an existing shed record
//! into one record ([`ShedRun::absorb`]); nothing links to a shed record's
//! own hash, so replacing it is safe.

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use tidemesh_identity::SpiffeId;

use crate::record::{
    encode, NewRecord, RecordBody, RecordError, SealedRecord, SeqRange, ShedReason, ShedRecord,
    HASH_LEN, MAX_RECORD_BYTES,
};
use crate::types::{ChainHash, EvidenceSeq, PriorityClass, UnixMillis};

/// Domain separator of the genesis hash.
pub const GENESIS_DOMAIN: &[u8] = b"tidemesh-evidence-genesis-v1";

/// The genesis link of `spoke`'s chain.
pub fn genesis_hash(spoke: &SpiffeId) -> ChainHash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(GENESIS_DOMAIN);
    ctx.update(spoke.to_string().as_bytes());
    finish(ctx)
}

fn finish(ctx: Context) -> ChainHash {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    ChainHash(out)
}

/// `SHA-256(prev || canonical)`.
pub fn link_hash(prev: &ChainHash, canonical: &[u8]) -> ChainHash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&prev.0);
    ctx.update(canonical);
    finish(ctx)
}

impl SealedRecord {
    /// The hash this record must carry if it follows `prev`.
    pub fn expected_hash(&self, prev: &ChainHash) -> ChainHash {
        link_hash(prev, &self.canonical_bytes())
    }
}

/// A point of a chain: the next sequence number and the link it hashes from.
///
/// JSON: `{"next_seq": 42, "hash": "…"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainPosition {
    /// The sequence number the next record carries.
    pub next_seq: EvidenceSeq,
    /// The link the next record hashes from.
    pub hash: ChainHash,
}

impl ChainPosition {
    /// The start of `spoke`'s chain: next 1, genesis hash.
    pub fn genesis(spoke: &SpiffeId) -> ChainPosition {
        ChainPosition {
            next_seq: EvidenceSeq::FIRST,
            hash: genesis_hash(spoke),
        }
    }

    /// The position right after `record`.
    pub fn after(record: &SealedRecord) -> ChainPosition {
        ChainPosition {
            next_seq: record.last_seq().next(),
            hash: record.link(),
        }
    }

    /// The last sequence number before this position (0 at the start).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.get() - 1
    }
}

/// A body encoded once, ready to be sealed at whatever sequence number it
/// gets (the postcard of a struct is the concatenation of its fields, so
/// the canonical bytes are `postcard(seq, timestamp, class) || body`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBody {
    bytes: Vec<u8>,
}

/// Room for the fixed fields and the hash: seq and timestamp varints (10
/// bytes each), the class, and 32 hash bytes.
const ENVELOPE_MAX: usize = 10 + 10 + 1 + HASH_LEN;

impl EncodedBody {
    /// Encodes `body`. Refuses shed records (only [`ShedRun`] makes them)
    /// and bodies that would not fit in [`MAX_RECORD_BYTES`].
    pub fn new(body: &RecordBody) -> Result<EncodedBody, RecordError> {
        if matches!(body, RecordBody::Shed(_)) {
            return Err(RecordError::ReservedKind);
        }
        let bytes = encode(body);
        if bytes.len() + ENVELOPE_MAX > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                len: bytes.len() + ENVELOPE_MAX,
                max: MAX_RECORD_BYTES,
            });
        }
        Ok(EncodedBody { bytes })
    }

    /// The encoded body's length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false (a body has at least its variant byte).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// An upper bound of the sealed record's encoded size.
    pub fn sealed_len_bound(&self) -> usize {
        self.bytes.len() + ENVELOPE_MAX
    }
}

/// A record sealed from an [`EncodedBody`]: its encoding is exactly
/// [`SealedRecord::encode`] of the same record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedRecord {
    /// Its sequence number.
    pub seq: EvidenceSeq,
    /// Its timestamp.
    pub timestamp: UnixMillis,
    /// Its class.
    pub class: PriorityClass,
    /// Its chain hash.
    pub hash: ChainHash,
    /// The postcard encoding (canonical bytes, then the hash).
    pub bytes: Vec<u8>,
}

/// The sealing end of a chain: assigns sequence numbers and hashes.
///
/// Holds only the current [`ChainPosition`]; the spoke buffer resumes it
/// from the last committed record after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    position: ChainPosition,
}

impl Chain {
    /// A chain continuing at `position`.
    pub fn resume(position: ChainPosition) -> Chain {
        Chain { position }
    }

    /// A new chain for `spoke`.
    pub fn genesis(spoke: &SpiffeId) -> Chain {
        Chain::resume(ChainPosition::genesis(spoke))
    }

    /// Where the next record goes.
    pub fn position(&self) -> &ChainPosition {
        &self.position
    }

    /// Seals `record` as the next record.
    pub fn append(&mut self, record: NewRecord) -> Result<SealedRecord, RecordError> {
        if matches!(record.body, RecordBody::Shed(_)) {
            return Err(RecordError::ReservedKind);
        }
        let mut sealed = SealedRecord {
            seq: self.position.next_seq,
            timestamp: record.timestamp,
            class: record.class,
            body: record.body,
            hash: ChainHash::default(),
        };
        let canonical = sealed.canonical_bytes();
        if canonical.len() + HASH_LEN > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                len: canonical.len() + HASH_LEN,
                max: MAX_RECORD_BYTES,
            });
        }
        sealed.hash = link_hash(&self.position.hash, &canonical);
        self.position = ChainPosition::after(&sealed);
        Ok(sealed)
    }

    /// Seals a pre-encoded body as the next record, producing its bytes
    /// directly (the buffer's hot path: no second encoding).
    pub fn append_encoded(
        &mut self,
        timestamp: UnixMillis,
        class: PriorityClass,
        body: &EncodedBody,
    ) -> EncodedRecord {
        let seq = self.position.next_seq;
        let mut bytes = encode(&(seq, timestamp, class));
        bytes.reserve(body.bytes.len() + HASH_LEN);
        bytes.extend_from_slice(&body.bytes);
        let hash = link_hash(&self.position.hash, &bytes);
        bytes.extend_from_slice(&hash.0);
        self.position = ChainPosition {
            next_seq: seq.next(),
            hash,
        };
        EncodedRecord {
            seq,
            timestamp,
            class,
            hash,
            bytes,
        }
    }
}

/// Why a shed run could not take a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShedError {
    /// The record does not follow the run's last sequence number.
    #[error("record {got} does not follow the shed run (expected {expected})")]
    NotContiguous {
        /// The sequence number the run needed.
        expected: EvidenceSeq,
        /// The one it got.
        got: EvidenceSeq,
    },
    /// Audit records are never shed.
    #[error("audit record {0} cannot be shed")]
    Audit(EvidenceSeq),
    /// The position is not inside the shed record's range.
    #[error("position {next} is outside the shed range {first}..={last}")]
    OutsideRange {
        /// The resume position's next sequence number.
        next: EvidenceSeq,
        /// Range start.
        first: EvidenceSeq,
        /// Range end.
        last: EvidenceSeq,
    },
    /// The record is not a shed record.
    #[error("record {0} is not a shed record")]
    NotShed(EvidenceSeq),
}

/// Accumulates a contiguous run of records being shed (and shed records
/// being merged) and seals the one shed record that replaces them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShedRun {
    range: Option<SeqRange>,
    count: u64,
    dropped: u64,
    class: Option<PriorityClass>,
    first_timestamp: UnixMillis,
    last_timestamp: UnixMillis,
    last_hash: ChainHash,
}

impl ShedRun {
    /// An empty run.
    pub fn new() -> ShedRun {
        ShedRun::default()
    }

    fn extend(&mut self, first: EvidenceSeq, last: EvidenceSeq) -> Result<(), ShedError> {
        match &mut self.range {
            None => {
                self.range = Some(SeqRange { first, last });
            }
            Some(r) => {
                let expected = r.last.next();
                if first != expected {
                    return Err(ShedError::NotContiguous {
                        expected,
                        got: first,
                    });
                }
                r.last = last;
            }
        }
        Ok(())
    }

    /// Adds one dropped (non-audit) record, given by its header fields and
    /// stored hash.
    pub fn drop_record(
        &mut self,
        seq: EvidenceSeq,
        timestamp: UnixMillis,
        class: PriorityClass,
        hash: ChainHash,
    ) -> Result<(), ShedError> {
        if class == PriorityClass::Audit {
            return Err(ShedError::Audit(seq));
        }
        let first = self.range.is_none();
        self.extend(seq, seq)?;
        if first {
            self.first_timestamp = timestamp;
        }
        self.last_timestamp = timestamp;
        self.count += 1;
        self.dropped += 1;
        self.class = Some(most_important(self.class, class));
        self.last_hash = hash;
        Ok(())
    }

    /// Merges an existing shed record into the run.
    pub fn absorb(&mut self, shed: &ShedRecord) -> Result<(), ShedError> {
        let first = self.range.is_none();
        self.extend(shed.range.first, shed.range.last)?;
        if first {
            self.first_timestamp = shed.first_timestamp;
        }
        self.last_timestamp = shed.last_timestamp;
        self.count += shed.count;
        self.class = Some(most_important(self.class, shed.class));
        self.last_hash = shed.last_hash;
        Ok(())
    }

    /// The first sequence number of the run, if any.
    pub fn first(&self) -> Option<EvidenceSeq> {
        self.range.map(|r| r.first)
    }

    /// Records dropped by this run (not counting absorbed shed records).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Seals the shed record, linking from `prev` (the link before the
    /// run's first sequence number), stamped `now`. `None` for an empty run.
    pub fn seal(
        &self,
        prev: &ChainHash,
        reason: ShedReason,
        now: UnixMillis,
    ) -> Option<SealedRecord> {
        let range = self.range?;
        Some(seal_shed(
            prev,
            now,
            ShedRecord {
                range,
                count: self.count,
                class: self.class.unwrap_or(PriorityClass::Debug),
                reason,
                first_timestamp: self.first_timestamp,
                last_timestamp: self.last_timestamp,
                last_hash: self.last_hash,
            },
        ))
    }
}

/// The class a run reports: `Request` if it dropped any request record.
fn most_important(a: Option<PriorityClass>, b: PriorityClass) -> PriorityClass {
    if a == Some(PriorityClass::Request) || b == PriorityClass::Request {
        PriorityClass::Request
    } else {
        PriorityClass::Debug
    }
}

/// Seals `shed` as the record at `shed.range.first`, following `prev`.
pub fn seal_shed(prev: &ChainHash, timestamp: UnixMillis, shed: ShedRecord) -> SealedRecord {
    let mut rec = SealedRecord {
        seq: shed.range.first,
        timestamp,
        class: PriorityClass::Audit,
        body: RecordBody::Shed(shed),
        hash: ChainHash::default(),
    };
    rec.hash = rec.expected_hash(prev);
    rec
}

/// Cuts a shed record at `from` (a position inside its range, e.g. the
/// hub's high-water mark after it received some of the records before they
/// were shed): the result covers `from.next_seq..=last`, links from
/// `from.hash`, keeps `last_hash`, and counts at most the remaining range.
pub fn resume_shed(record: &SealedRecord, from: &ChainPosition) -> Result<SealedRecord, ShedError> {
    let Some(shed) = record.as_shed() else {
        return Err(ShedError::NotShed(record.seq));
    };
    if !shed.range.contains(from.next_seq) {
        return Err(ShedError::OutsideRange {
            next: from.next_seq,
            first: shed.range.first,
            last: shed.range.last,
        });
    }
    if from.next_seq == shed.range.first {
        return Ok(record.clone());
    }
    let range = SeqRange {
        first: from.next_seq,
        last: shed.range.last,
    };
    Ok(seal_shed(
        &from.hash,
        record.timestamp,
        ShedRecord {
            range,
            count: shed.count.min(range.len()),
            ..shed.clone()
        },
    ))
}

/// How a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainErrorKind {
    /// Records are missing: the record found has a later sequence number.
    Gap {
        /// The sequence number found instead.
        found: EvidenceSeq,
    },
    /// A record repeats or goes back: it has an earlier sequence number.
    OutOfOrder {
        /// The sequence number found instead.
        found: EvidenceSeq,
    },
    /// The stored hash is not SHA-256(previous link || canonical bytes):
    /// the record (or its stored hash) was altered, or it does not belong
    /// after the previous record.
    HashMismatch,
    /// A shed record is inconsistent (range, count or class).
    BadShed(&'static str),
    /// Stored bytes do not decode as a record.
    Malformed(RecordError),
    /// A stored record's sequence number differs from its storage key.
    KeyMismatch {
        /// The sequence number inside the record.
        found: EvidenceSeq,
    },
}

impl std::fmt::Display for ChainErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainErrorKind::Gap { found } => write!(f, "gap: next record found is {found}"),
            ChainErrorKind::OutOfOrder { found } => {
                write!(f, "out of order: found {found} (duplicate or replay)")
            }
            ChainErrorKind::HashMismatch => f.write_str(
                "hash mismatch: the record was altered or does not follow the previous one",
            ),
            ChainErrorKind::BadShed(why) => write!(f, "malformed shed record: {why}"),
            ChainErrorKind::Malformed(e) => write!(f, "undecodable record: {e}"),
            ChainErrorKind::KeyMismatch { found } => {
                write!(f, "record stored under this key says it is {found}")
            }
        }
    }
}

/// The first break of a chain: the sequence number where the verifier was
/// when it broke (the one it expected next) and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("evidence chain broken at seq {seq}: {kind}")]
pub struct ChainError {
    /// The sequence number at which the chain breaks.
    pub seq: EvidenceSeq,
    /// How.
    pub kind: ChainErrorKind,
}

/// Verifies records one at a time, from a genesis or checkpoint position.
/// After an error it stays at the last good position.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    start: ChainPosition,
    position: ChainPosition,
    records: u64,
    shed_records: u64,
    dropped: u64,
}

impl ChainVerifier {
    /// Starts at `from`.
    pub fn new(from: ChainPosition) -> ChainVerifier {
        ChainVerifier {
            start: from,
            position: from,
            records: 0,
            shed_records: 0,
            dropped: 0,
        }
    }

    /// The position after the last verified record.
    pub fn position(&self) -> &ChainPosition {
        &self.position
    }

    /// Checks `record` as the next one.
    pub fn push(&mut self, record: &SealedRecord) -> Result<(), ChainError> {
        let expected = self.position.next_seq;
        let err = |kind| ChainError {
            seq: expected,
            kind,
        };
        if record.seq > expected {
            return Err(err(ChainErrorKind::Gap { found: record.seq }));
        }
        if record.seq < expected {
            return Err(err(ChainErrorKind::OutOfOrder { found: record.seq }));
        }
        if record.expected_hash(&self.position.hash) != record.hash {
            return Err(err(ChainErrorKind::HashMismatch));
        }
        if let Some(shed) = record.as_shed() {
            if shed.range.first != record.seq {
                return Err(err(ChainErrorKind::BadShed(
                    "range does not start at its seq",
                )));
            }
            if shed.range.is_empty() {
                return Err(err(ChainErrorKind::BadShed("empty range")));
            }
            if shed.count == 0 || shed.count > shed.range.len() {
                return Err(err(ChainErrorKind::BadShed(
                    "count outside 1..=range length",
                )));
            }
            if record.class != PriorityClass::Audit || shed.class == PriorityClass::Audit {
                return Err(err(ChainErrorKind::BadShed(
                    "shed records are audit class and shed debug or request records",
                )));
            }
            self.shed_records += 1;
            self.dropped += shed.count;
        }
        self.records += 1;
        self.position = ChainPosition::after(record);
        Ok(())
    }

    /// Decodes and checks a stored record kept under `key` (the storage key
    /// is its sequence number). Names `key` when the bytes are damaged.
    pub fn push_encoded(
        &mut self,
        key: EvidenceSeq,
        bytes: &[u8],
    ) -> Result<SealedRecord, ChainError> {
        let record = SealedRecord::decode(bytes).map_err(|e| ChainError {
            seq: key,
            kind: ChainErrorKind::Malformed(e),
        })?;
        if record.seq != key {
            return Err(ChainError {
                seq: key,
                kind: ChainErrorKind::KeyMismatch { found: record.seq },
            });
        }
        self.push(&record)?;
        Ok(record)
    }

    /// What was verified.
    pub fn finish(self) -> VerifiedChain {
        VerifiedChain {
            start: self.start,
            end: self.position,
            records: self.records,
            shed_records: self.shed_records,
            dropped: self.dropped,
        }
    }
}

/// Proof that a run of records verified: only [`ChainVerifier`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedChain {
    start: ChainPosition,
    end: ChainPosition,
    records: u64,
    shed_records: u64,
    dropped: u64,
}

impl VerifiedChain {
    /// Where verification started.
    pub fn start(&self) -> &ChainPosition {
        &self.start
    }

    /// The position after the last record: the next checkpoint.
    pub fn end(&self) -> &ChainPosition {
        &self.end
    }

    /// Records verified (a shed record counts once).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Shed records among them.
    pub fn shed_records(&self) -> u64 {
        self.shed_records
    }

    /// Records those shed records stand for.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Verifies `records` from `from` (a genesis or checkpoint position).
/// The error names the sequence number of the first break.
pub fn verify_chain(
    from: &ChainPosition,
    records: &[SealedRecord],
) -> Result<VerifiedChain, ChainError> {
    let mut v = ChainVerifier::new(*from);
    for r in records {
        v.push(r)?;
    }
    Ok(v.finish())
}
