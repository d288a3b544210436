//! Fuzz target: `JoinToken::parse` on arbitrary UTF-8.
//!
//! Properties checked:
//! - `parse` never panics;
//! - a token that parses prints (`Display`) to a string that parses back to
//!   the same token (roundtrip);
//! - parsing does not normalise: the printed token is exactly the input with
//!   surrounding whitespace removed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemesh_proto::JoinToken;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = JoinToken::parse(s) else {
        return;
    };
    let printed = token.to_string();
    let again = JoinToken::parse(&printed).expect("a printed token parses");
    assert_eq!(token, again, "token roundtrip changed the token");
    assert_eq!(printed, s.trim(), "parse accepted a non-canonical spelling");
});
