//! Fuzz target: `tidemesh_evidence::Batch::decode` on arbitrary bytes (what
//! the hub's ingest gets from a spoke).
//!
//! Properties checked:
//! - `decode` never panics, whatever the input;
//! - a batch that decodes re-encodes with `encode`, the re-encoding decodes
//!   to the same batch (roundtrip), encodes to the same bytes again (encoding
//!   is deterministic), and is no longer than the input (the encoder is
//!   canonical; the decoder may accept longer varint spellings);
//! - what the hub does next with a decoded, not yet verified batch never
//!   panics either: `signed_bytes`, `fitting_records`, and checking its
//!   records as a chain from the genesis of the spoke it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemesh_evidence::{fitting_records, verify_chain, Batch, ChainPosition};

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::decode(data) else {
        return;
    };
    let encoded = batch.encode().expect("a decoded batch re-encodes");
    assert!(
        encoded.len() <= data.len(),
        "canonical encoding ({} bytes) longer than the accepted input ({} bytes)",
        encoded.len(),
        data.len()
    );
    let again = Batch::decode(&encoded).expect("a re-encoded batch decodes");
    assert_eq!(batch, again, "batch roundtrip changed the batch");
    assert_eq!(
        again.encode().expect("re-encodes"),
        encoded,
        "encoding is not deterministic"
    );

    let _ = batch.signed_bytes();
    let n = fitting_records(&batch.spoke, &batch.records, data.len());
    assert!(
        (1..=batch.records.len()).contains(&n),
        "fitting_records gave {n} of {} records",
        batch.records.len()
    );
    let _ = verify_chain(&ChainPosition::genesis(&batch.spoke), &batch.records);
});
