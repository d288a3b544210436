//! Fuzz target: the control-frame decoder on arbitrary bytes.
//!
//! Properties checked, for both `Request` and `Response`:
//! - `decode_frame` and `decode_payload` never panic, whatever the input;
//! - a frame that decodes re-encodes with `encode_frame`, and the re-encoded
//!   frame decodes to the same message (roundtrip), encodes to the same bytes
//!   again (encoding is deterministic), and is no longer than the input
//!   (the encoder is canonical, the decoder may accept longer spellings).
//!
//! The payload-only path (`decode_payload`) is driven too, so mutations of a
//! seed's body are not all stopped by the length-prefix check.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use tidemesh_proto::{
    decode_frame, decode_payload, encode_frame, payload_len, Request, Response, LEN_PREFIX,
};

fn check_frame<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(msg) = decode_frame::<T>(data) else {
        return;
    };
    let encoded = encode_frame(&msg).expect("a decoded message re-encodes");
    assert!(
        encoded.len() <= data.len(),
        "canonical encoding ({} bytes) longer than the accepted input ({} bytes)",
        encoded.len(),
        data.len()
    );
    let mut prefix = [0u8; LEN_PREFIX];
    prefix.copy_from_slice(&encoded[..LEN_PREFIX]);
    assert_eq!(
        payload_len(prefix).expect("re-encoded prefix is valid"),
        encoded.len() - LEN_PREFIX
    );
    let again = decode_frame::<T>(&encoded).expect("a re-encoded frame decodes");
    assert_eq!(msg, again, "frame roundtrip changed the message");
    assert_eq!(
        encode_frame(&again).expect("re-encodes"),
        encoded,
        "encoding is not deterministic"
    );
}

fn check_payload<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(msg) = decode_payload::<T>(data) else {
        return;
    };
    let encoded = encode_frame(&msg).expect("a decoded message re-encodes");
    let again = decode_payload::<T>(&encoded[LEN_PREFIX..]).expect("re-encoded payload decodes");
    assert_eq!(msg, again, "payload roundtrip changed the message");
}

fuzz_target!(|data: &[u8]| {
    check_frame::<Request>(data);
    check_frame::<Response>(data);
    check_payload::<Request>(data);
    check_payload::<Response>(data);
});
