//! Fuzz target: the JWS verifier (`tidemesh_policy::jwt`) on arbitrary
//! UTF-8, as a token and as a key set.
//!
//! Properties checked:
//! - `verify`, `Jwks::parse` and `b64url` never panic;
//! - no arbitrary input verifies against a key set the fuzzer cannot sign
//!   for (an Ed25519 key whose private half is not in the input);
//! - strict base64url: a decoded string re-encodes to itself (one spelling
//!   per byte string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemesh_policy::jwt::{b64url, verify, Jwks};

/// An Ed25519 public key (RFC 8037 appendix A.2's example key).
const JWKS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

fn enc(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let jwks = Jwks::parse(JWKS).expect("the fixed key set parses");
    let r = verify(s, &jwks, "https://idp.test", &[], 1_800_000_000, 0);
    assert!(r.is_err(), "an unsigned input verified: {s:?}");
    let _ = Jwks::parse(s);
    if let Ok(bytes) = b64url(s) {
        assert_eq!(enc(&bytes), s, "b64url accepted a non-canonical spelling");
    }
});
