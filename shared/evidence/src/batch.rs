//! Signed batches of sealed records: the unit the spoke's sync sends and the
//! hub ingests.
//!
//! Who drives it: the spoke's sync session ([`Batch::sign`],
//! [`Batch::encode`]) and the hub's ingest ([`Batch::decode`],
//! [`Batch::verify_signature`], then [`crate::ChainVerifier`] from the
//! spoke's high-water mark). What it must not do: I/O, or any chain or
//! dedupe decision (the hub owns those).
//!
//! # Format (version 1)
//! ```text
//! postcard(version: u16 = 1) || postcard(Batch { spoke, first_seq, records, signature })
//! ```
//! `spoke` is the SPIFFE ID string, `records` a length-prefixed sequence of
//! [`SealedRecord`]s, `signature` a length-prefixed ASN.1 DER ECDSA P-256
//! SHA-256 signature (at most 72 bytes) by the spoke's SVID key over
//! ```text
//! postcard("tidemesh-evidence-batch-v1", version, spoke, first_seq, records)
//! ```
//! The whole encoding is at most [`MAX_BATCH_BYTES`], checked before
//! anything is decoded; it fits a `tidemesh-proto` frame (1 MiB) with room
//! for the message around it. A batch is non-empty, starts at `first_seq`
//! and is contiguous (each record starts right after the previous one's
//! last covered sequence number); the decoder refuses anything else.

use serde::{Deserialize, Serialize};
use tidemesh_identity::svid::{self, KeyPair};
use tidemesh_identity::SpiffeId;

use crate::record::{encode, SealedRecord};
use crate::types::EvidenceSeq;

/// The batch format version this build writes and reads.
pub const BATCH_VERSION: u16 = 1;
/// Hard upper bound on an encoded batch, checked before decoding.
pub const MAX_BATCH_BYTES: usize = 1_000_000;
/// The longest ECDSA P-256 DER signature.
pub const MAX_SIGNATURE_BYTES: usize = 72;
/// Domain separator of the signed bytes.
pub const BATCH_SIGNING_DOMAIN: &str = "tidemesh-evidence-batch-v1";

/// A batch of consecutive records from one spoke, with the spoke's
/// signature. Decoded batches are unverified: see [`Batch::verify_signature`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The spoke whose chain the records belong to.
    pub spoke: SpiffeId,
    /// The first record's sequence number.
    pub first_seq: EvidenceSeq,
    /// The records, contiguous.
    pub records: Vec<SealedRecord>,
    /// ECDSA P-256 SHA-256 (ASN.1 DER) over [`Batch::signed_bytes`].
    pub signature: Vec<u8>,
}

#[derive(Serialize)]
struct Signed<'a> {
    domain: &'a str,
    version: u16,
    spoke: &'a SpiffeId,
    first_seq: EvidenceSeq,
    records: &'a [SealedRecord],
}

/// Why a batch was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The encoding exceeds [`MAX_BATCH_BYTES`].
    #[error("batch of {len} bytes exceeds the {max}-byte limit; send fewer records")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The version field is missing.
    #[error("batch truncated: missing format version")]
    Truncated,
    /// Another format version.
    #[error("unsupported evidence batch version {got} (this build speaks {BATCH_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        got: u16,
    },
    /// The body does not decode.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// Bytes follow the batch.
    #[error("{0} trailing bytes after the batch")]
    TrailingBytes(usize),
    /// No records.
    #[error("batch has no records")]
    Empty,
    /// `first_seq` is not the first record's sequence number.
    #[error("batch says it starts at {first_seq} but its first record is {found}")]
    FirstSeqMismatch {
        /// What the batch says.
        first_seq: EvidenceSeq,
        /// The first record's.
        found: EvidenceSeq,
    },
    /// A record does not follow the previous one.
    #[error("batch is not contiguous: expected record {expected}, found {found}")]
    NotContiguous {
        /// The sequence number that should come next.
        expected: EvidenceSeq,
        /// The one found.
        found: EvidenceSeq,
    },
    /// The signature is empty or longer than an ECDSA P-256 signature.
    #[error("batch signature of {0} bytes is not an ecdsa p-256 signature")]
    SignatureLength(usize),
    /// The signature does not verify against the spoke's key.
    #[error("batch signature does not verify against the spoke's certificate key")]
    BadSignature,
    /// Signing failed (wrong key type).
    #[error("cannot sign the batch: {0}")]
    Signing(String),
}

impl Batch {
    /// Signs `records` (non-empty, contiguous) as `spoke` with its SVID key.
    /// Refuses a batch whose encoding would exceed [`MAX_BATCH_BYTES`]; use
    /// [`fitting_records`] to pick how many records to send.
    pub fn sign(
        spoke: SpiffeId,
        records: Vec<SealedRecord>,
        key: &KeyPair,
    ) -> Result<Batch, BatchError> {
        let first_seq = records.first().ok_or(BatchError::Empty)?.seq;
        let mut batch = Batch {
            spoke,
            first_seq,
            records,
            signature: Vec::new(),
        };
        batch.check_structure()?;
        batch.signature = svid::sign(key, &batch.signed_bytes())
            .map_err(|e| BatchError::Signing(e.to_string()))?;
        batch.encode()?;
        Ok(batch)
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        encode(&Signed {
            domain: BATCH_SIGNING_DOMAIN,
            version: BATCH_VERSION,
            spoke: &self.spoke,
            first_seq: self.first_seq,
            records: &self.records,
        })
    }

    /// The wire encoding (version, then the batch).
    pub fn encode(&self) -> Result<Vec<u8>, BatchError> {
        let mut out = encode(&BATCH_VERSION);
        out.extend_from_slice(&encode(self));
        if out.len() > MAX_BATCH_BYTES {
            return Err(BatchError::TooLarge {
                len: out.len(),
                max: MAX_BATCH_BYTES,
            });
        }
        Ok(out)
    }

    /// Decodes a batch: size first, then version, then the body and its
    /// structure. Hostile input yields an error, never a panic. The
    /// signature and the chain are *not* checked here.
    pub fn decode(bytes: &[u8]) -> Result<Batch, BatchError> {
        if bytes.len() > MAX_BATCH_BYTES {
            return Err(BatchError::TooLarge {
                len: bytes.len(),
                max: MAX_BATCH_BYTES,
            });
        }
        let (version, rest): (u16, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|_| BatchError::Truncated)?;
        if version != BATCH_VERSION {
            return Err(BatchError::UnsupportedVersion { got: version });
        }
        let (batch, rest): (Batch, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| BatchError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(BatchError::TrailingBytes(rest.len()));
        }
        batch.check_structure()?;
        if batch.signature.is_empty() || batch.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(BatchError::SignatureLength(batch.signature.len()));
        }
        Ok(batch)
    }

    fn check_structure(&self) -> Result<(), BatchError> {
        let first = self.records.first().ok_or(BatchError::Empty)?;
        if first.seq != self.first_seq {
            return Err(BatchError::FirstSeqMismatch {
                first_seq: self.first_seq,
                found: first.seq,
            });
        }
        for pair in self.records.windows(2) {
            let expected = pair[0].last_seq().next();
            if pair[1].seq != expected {
                return Err(BatchError::NotContiguous {
                    expected,
                    found: pair[1].seq,
                });
            }
        }
        Ok(())
    }

    /// Checks the signature with the spoke's public key (the uncompressed
    /// P-256 point of its SVID, `svid::cert_public_key`). The caller must
    /// also check that `spoke` is the authenticated peer.
    pub fn verify_signature(self, public_key: &[u8]) -> Result<VerifiedBatch, BatchError> {
        svid::verify_signature(public_key, &self.signed_bytes(), &self.signature)
            .map_err(|_| BatchError::BadSignature)?;
        Ok(VerifiedBatch { batch: self })
    }
}

/// How many of `records` (from the start) fit in one batch of at most
/// `max_bytes` (capped at [`MAX_BATCH_BYTES`]) for `spoke`. At least one
/// if `records` is non-empty (a record is at most 64 KiB, far below the cap).
pub fn fitting_records(spoke: &SpiffeId, records: &[SealedRecord], max_bytes: usize) -> usize {
    let max = max_bytes.min(MAX_BATCH_BYTES);
    // version (≤3) + spoke (len varint ≤ 2 + ≤2048) + first_seq (≤10)
    // + record count (≤5) + signature (1 + 72)
    let mut used = 3 + 2 + spoke.to_string().len() + 10 + 5 + 1 + MAX_SIGNATURE_BYTES;
    let mut n = 0;
    for r in records {
        used += encode(r).len();
        if used > max && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

/// A batch whose signature verified: only [`Batch::verify_signature`]
/// makes one. Its chain is still to be checked against the hub's position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBatch {
    batch: Batch,
}

impl VerifiedBatch {
    /// The spoke that signed it.
    pub fn spoke(&self) -> &SpiffeId {
        &self.batch.spoke
    }

    /// The first record's sequence number.
    pub fn first_seq(&self) -> EvidenceSeq {
        self.batch.first_seq
    }

    /// The records.
    pub fn records(&self) -> &[SealedRecord] {
        &self.batch.records
    }

    /// The spoke's signature (ASN.1 DER ECDSA P-256 SHA-256 over
    /// [`Batch::signed_bytes`]), e.g. to store as proof of origin.
    pub fn signature(&self) -> &[u8] {
        &self.batch.signature
    }

    /// The batch, e.g. to store it as received.
    pub fn into_batch(self) -> Batch {
        self.batch
    }
}
