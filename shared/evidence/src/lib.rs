//! tidemesh evidence: the records every spoke keeps, the per-spoke hash
//! chain that makes them tamper-evident, and the signed batches that carry
//! them to the hub.
//!
//! What it is: plain types and pure functions. [`record`] holds the seed's
//! evidence kinds (identity, authorization, routing, reliability,
//! observability, rate limit; mode transitions, certificate and config
//! events, shed records); [`chain`] seals records into a chain and verifies
//! it, shed records included; [`batch`] is the signed sync unit; [`types`]
//! the small value types; [`samples`] realistic fixed records.
//!
//! Who drives it: the spoke's evidence buffer (`tidemesh_spoke::buffer`)
//! seals and sheds; the spoke's sync session batches and signs; the hub
//! decodes, verifies signatures and chains, and stores. What it must not
//! do: any I/O, any clock reading (every timestamp is passed in), any
//! async runtime, or any panic on hostile bytes.
//!
//! # Record format (version 3; v1 and v2 records decode unchanged)
//! A [`SealedRecord`] on disk and on the wire is postcard of
//! `(seq, timestamp, class, body, hash)`:
//!
//! | field | encoding |
//! |-------|----------|
//! | `seq` | varint u64, from 1 ([`EvidenceSeq`]) |
//! | `timestamp` | varint u64, ms since the Unix epoch ([`UnixMillis`]) |
//! | `class` | varint: 0 audit, 1 request, 2 debug ([`PriorityClass`]) |
//! | `body` | varint variant index, then the variant's fields in order ([`RecordBody`]) |
//! | `hash` | 32 raw bytes ([`ChainHash`]) |
//!
//! The **canonical bytes** of a record are everything before `hash`, i.e.
//! postcard of `(seq, timestamp, class, body)`, and
//! `hash = SHA-256(link of the previous record || canonical bytes)`, from
//! `SHA-256("tidemesh-evidence-genesis-v1" || spoke SPIFFE ID)` (see
//! [`chain`] for links and shed records). Stored bytes must be exactly the
//! canonical encoding of what they decode to ([`SealedRecord::decode`]).
//! The JSON rendering uses the seed's field names; see [`record`].
//!
//! Golden encodings live in `shared/evidence/testdata/` and are checked by
//! the tests: a diff there is a format change and needs a version bump
//! ([`RECORD_FORMAT_VERSION`], [`batch::BATCH_VERSION`]).

pub mod batch;
pub mod chain;
pub mod record;
pub mod samples;
pub mod truncate;
pub mod types;

pub use batch::{fitting_records, Batch, BatchError, VerifiedBatch, MAX_BATCH_BYTES};
pub use chain::{
    genesis_hash, resume_shed, seal_shed, verify_chain, Chain, ChainError, ChainErrorKind,
    ChainPosition, ChainVerifier, EncodedBody, EncodedRecord, ShedError, ShedRun, VerifiedChain,
};
pub use record::{
    NewRecord, RecordBody, RecordError, RecordHeader, RecordKind, SealedRecord, ShedReason,
    ShedRecord, MAX_RECORD_BYTES,
};
pub use truncate::TRUNCATED_MARK;
pub use types::{
    ChainHash, EvidenceSeq, PriorityClass, Ratio, Sha256Digest, SpanId, TraceId, UnixMillis,
};

/// The record format version: the layout of [`SealedRecord`] and every
/// body type. Stores and sync sessions name it; bump it with any golden
/// diff.
///
/// v2 appended [`ShedReason::DiskFull`] and [`ShedReason::WriteFailed`]
/// (shed records written when commits failed); every v1 encoding decodes
/// unchanged, so the v1 golden files stand.
///
/// v3 gives request records a user identity claim
/// ([`record::UserIdentityEvidence`], a verified JWT's issuer and subject)
/// in the slot of the drill marker (tag 2 there); records without one
/// encode exactly as in v2, so every v1 and v2 encoding decodes and
/// verifies unchanged.
///
/// v4 marks request records whose trace was not sampled
/// ([`record::RequestEvidence::trace_sampled`], tag 3 in the same slot);
/// sampled records encode exactly as in v3, so every older encoding
/// decodes as sampled and verifies unchanged.
pub const RECORD_FORMAT_VERSION: u16 = 4;

#[cfg(test)]
mod tests;
