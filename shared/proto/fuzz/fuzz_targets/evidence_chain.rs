//! Fuzz target: the evidence chain verifier on arbitrary stored records, from
//! a genesis position (what `verify` and the hub's ingest do with records
//! read from disk or a batch).
//!
//! Input layout: one flags byte, then records, each as a little-endian `u16`
//! length and that many bytes (the last one takes whatever is left). Flags:
//! - bit 0, reseal: a chunk that decodes as a record gets the hash it must
//!   carry at the verifier's position before it is pushed, so the fuzzer gets
//!   past the hash check to the shed-record checks and the position updates;
//! - bit 1, peeked key: the storage key passed to `push_encoded` is the
//!   sequence number `RecordHeader::peek` reads from the chunk (when it
//!   reads one), not the verifier's next sequence number.
//!
//! Properties checked:
//! - `SealedRecord::decode`, `RecordHeader::peek`, `ChainVerifier::push_encoded`
//!   and `verify_chain` never panic, whatever the input;
//! - a chunk that decodes is exactly the encoding of what it decodes to, and
//!   that decodes to the same record (roundtrip); `peek` agrees with it;
//! - `push_encoded` returns the record the bytes decode to and moves the
//!   verifier to the position after it; on an error the verifier stays where
//!   it was;
//! - `verify_chain` from the genesis over the records the verifier accepted
//!   succeeds with the same result as the verifier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemesh_evidence::{verify_chain, ChainPosition, ChainVerifier, RecordHeader, SealedRecord};

const RESEAL: u8 = 1;
const PEEKED_KEY: u8 = 2;

/// Splits `data` into length-prefixed chunks (see the module docs).
fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let [lo, hi, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        out.push(chunk);
        data = tail;
    }
    if !data.is_empty() {
        out.push(data);
    }
    out
}

/// Roundtrip and `peek` properties of one chunk; the record if it decodes.
fn check_record(bytes: &[u8]) -> Option<SealedRecord> {
    let header = RecordHeader::peek(bytes);
    let record = SealedRecord::decode(bytes).ok()?;
    let encoded = record.encode();
    assert_eq!(encoded, bytes, "decode accepted a non-canonical encoding");
    let again = SealedRecord::decode(&encoded).expect("a re-encoded record decodes");
    assert_eq!(record, again, "record roundtrip changed the record");
    let header = header.expect("peek reads a record that decodes");
    assert_eq!(
        (
            header.seq,
            header.timestamp,
            header.class,
            header.kind,
            header.hash
        ),
        (
            record.seq,
            record.timestamp,
            record.class,
            record.body.kind(),
            record.hash
        ),
        "peek disagrees with decode"
    );
    Some(record)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let spoke = "spiffe://edge.company.com/store/sf01/node/n1"
        .parse()
        .expect("valid spoke id");
    let genesis = ChainPosition::genesis(&spoke);
    let mut verifier = ChainVerifier::new(genesis);
    let mut accepted = Vec::new();

    for chunk in chunks(data) {
        let decoded = check_record(chunk);
        let before = *verifier.position();
        let resealed;
        let (bytes, expected) = match decoded {
            Some(mut record) if flags & RESEAL != 0 => {
                record.hash = record.expected_hash(&before.hash);
                resealed = record.encode();
                (&resealed[..], Some(record))
            }
            other => (chunk, other),
        };
        let key = match RecordHeader::peek(bytes) {
            Ok(h) if flags & PEEKED_KEY != 0 => h.seq,
            _ => before.next_seq,
        };
        match verifier.push_encoded(key, bytes) {
            Ok(record) => {
                assert_eq!(
                    Some(&record),
                    expected.as_ref(),
                    "push_encoded accepted a record decode does not return"
                );
                assert_eq!(
                    *verifier.position(),
                    ChainPosition::after(&record),
                    "verifier is not right after the record it accepted"
                );
                accepted.push(record);
            }
            Err(_) => assert_eq!(
                *verifier.position(),
                before,
                "verifier moved on a refused record"
            ),
        }
    }

    let verified = verify_chain(&genesis, &accepted).expect("accepted records verify as a chain");
    assert_eq!(
        verified,
        verifier.finish(),
        "verify_chain and ChainVerifier disagree"
    );
});
