//! What the evaluators see of a request: header lookup and path normalization.
//!
//! What it is: [`HeaderLookup`], implemented for the header containers a
//! proxy is likely to hold; [`normalize_path`], the RFC 3986 path
//! normalization both authorization and routing apply before matching (so
//! `/api/./charge`, `/api//charge` and `/%61pi/charge` cannot slip past a
//! DENY rule for `/api/charge`); and [`check_path`], the gate every
//! enforcement point (the spoke's inbound delivery, the hub gateway) puts
//! a request target through before authorizing it: encodings an upstream
//! may read differently from the policy (`%2F`, `%5C`, `;`, `\`, dot
//! segments, `%2E`, control bytes) are refused, and what passes comes back
//! in the normal form that is both authorized and forwarded. Who drives
//! it: [`crate::authz`], [`crate::routing`] and the enforcement points.
//! What it must not do: allocate when the path is already normal (the
//! common case).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

/// Read access to request headers by lowercase name.
///
/// Implementations for slices of pairs compare names case-insensitively; the
/// map implementations expect their keys to be lowercase already.
pub trait HeaderLookup {
    /// The first value of header `name` (given in lowercase), if present.
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for [(String, String)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl HeaderLookup for Vec<(String, String)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl HeaderLookup for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl<const N: usize> HeaderLookup for [(&str, &str); N] {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl HeaderLookup for BTreeMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl<S: std::hash::BuildHasher> HeaderLookup for HashMap<String, String, S> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// No headers.
pub struct NoHeaders;

impl HeaderLookup for NoHeaders {
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// Normalizes a request path for matching: drops the query and fragment,
/// decodes percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`),
/// uppercases the hex of other escapes, merges repeated slashes and removes
/// `.` and `..` segments (RFC 3986 §5.2.4). Borrows when nothing changes.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let path = match raw.find(['?', '#']) {
        Some(i) => &raw[..i],
        None => raw,
    };
    if !needs_work(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let absolute = decoded.starts_with('/');
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    if absolute {
        s.push('/');
    }
    s.push_str(&out.join("/"));
    if trailing && !out.is_empty() {
        s.push('/');
    }
    Cow::Owned(s)
}

/// Why [`check_path`] refused a request target: an encoding the policy and
/// the upstream could read as different paths. Each message names what
/// was found and what the client should send instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The target is not an origin-form path (`/…`), e.g. `*` or empty.
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// `%2F` or `%5C` (any case): an encoded `/` or `\`, which upstreams
    /// decode differently (Envoy's `path_with_escaped_slashes_action`).
    #[error("the request path has an encoded slash or backslash ({0}): send the path unencoded")]
    EscapedSlash(String),
    /// A raw `\`, which some servers treat as `/`.
    #[error("the request path has a backslash: use '/'")]
    Backslash,
    /// A `;` (or `%3B`): a path parameter some servers strip before routing.
    #[error("the request path has a ';' path parameter: send it as a query parameter")]
    PathParameter,
    /// A `.` or `..` segment (`/./`, `/../`, trailing `/..`).
    #[error("the request path has a dot segment ('.' or '..'): send the resolved path")]
    DotSegment,
    /// `%2E` (any case): an encoded dot, which decodes into a dot segment.
    #[error("the request path has an encoded dot (%2E): send '.' unencoded")]
    EscapedDot,
    /// A raw or encoded control byte (NUL, `\r`, `\n`, … or DEL).
    #[error("the request path has a control byte (0x{0:02x})")]
    ControlByte(u8),
    /// A `%` not followed by two hex digits.
    #[error(
        "the request path has a malformed percent-encoding: '%' must be followed by two hex digits"
    )]
    BadEscape,
    /// A `#` fragment, which a request target never carries.
    #[error("the request path has a '#' fragment, which a request target must not carry")]
    Fragment,
}

/// Refuses a request target (`/path?query`) whose path an upstream could
/// read as a different path than authorization does, and returns the
/// target in the form to authorize **and** forward: the path as
/// [`normalize_path`] leaves it (unreserved escapes decoded, other escapes'
/// hex uppercased, repeated slashes merged), then the query unchanged.
///
/// Refused (Istio's "reject ambiguous paths", stricter than Envoy's
/// defaults): `%2F`/`%5C` in any case, a raw `\`, `;` or `%3B`, `.`/`..`
/// segments, `%2E` in any case, raw or encoded control bytes (below 0x20
/// and 0x7F), malformed `%` escapes, a fragment, and a path not starting
/// with `/`. So normalization only undoes encodings with one meaning, and
/// [`normalize_path`] of the result is its own path (the policy sees what
/// the upstream gets). Borrows when the target is already normal.
pub fn check_path(target: &str) -> Result<Cow<'_, str>, PathError> {
    let (path, rest) = match target.find(['?', '#']) {
        Some(i) => target.split_at(i),
        None => (target, ""),
    };
    if rest.starts_with('#') {
        return Err(PathError::Fragment);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            c if c < 0x20 || c == 0x7f => return Err(PathError::ControlByte(c)),
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            b'%' => {
                let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
                let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(PathError::BadEscape);
                };
                // both digits are ASCII hex, so the slice is on char bounds
                let seen = &path[i..i + 3];
                match (h * 16 + l) as u8 {
                    b'/' | b'\\' => return Err(PathError::EscapedSlash(seen.to_owned())),
                    b'.' => return Err(PathError::EscapedDot),
                    b';' => return Err(PathError::PathParameter),
                    c if c < 0x20 || c == 0x7f => return Err(PathError::ControlByte(c)),
                    _ => {}
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(PathError::DotSegment);
    }
    match normalize_path(path) {
        Cow::Owned(mut p) if p != path => {
            p.push_str(rest);
            Ok(Cow::Owned(p))
        }
        _ => Ok(Cow::Borrowed(target)),
    }
}

fn needs_work(p: &str) -> bool {
    let b = p.as_bytes();
    if b.contains(&b'%') || p.contains("//") {
        return true;
    }
    // A `.` or `..` segment.
    p.split('/').any(|s| s == "." || s == "..")
}

fn decode_unreserved(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push((b[i + 1] as char).to_ascii_uppercase());
                    out.push((b[i + 2] as char).to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        // Copy one UTF-8 character.
        let ch_len = p[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&p[i..i + ch_len]);
        i += ch_len;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalize_path("/api/charge"),
            Cow::Borrowed("/api/charge")
        ));
        assert!(matches!(
            normalize_path("/api/charge?x=1"),
            Cow::Borrowed("/api/charge")
        ));
        assert!(matches!(normalize_path("/a.b/c"), Cow::Borrowed(_)));
    }

    #[test]
    fn tricks_normalize_to_the_real_path() {
        for p in [
            "/api/./charge",
            "/api//charge",
            "/api/x/../charge",
            "/%61pi/charge",
            "/api/%2e/charge",
            "//api/charge#frag",
        ] {
            assert_eq!(normalize_path(p), "/api/charge", "{p}");
        }
        assert_eq!(normalize_path("/../.."), "/");
        assert_eq!(normalize_path("/a/b/.."), "/a/");
        assert_eq!(normalize_path("/a%2fb"), "/a%2Fb");
        assert_eq!(normalize_path("/a%"), "/a%");
        assert_eq!(normalize_path("/a%zz/é"), "/a%zz/é");
    }

    #[test]
    fn ambiguous_paths_are_refused_with_their_reason() {
        use PathError::*;
        for (p, want) in [
            ("/api%2Fadmin", EscapedSlash("%2F".into())),
            ("/api%2fadmin", EscapedSlash("%2f".into())),
            ("/api%5Cadmin", EscapedSlash("%5C".into())),
            ("/api%5cadmin?x=1", EscapedSlash("%5c".into())),
            ("/api\\admin", Backslash),
            ("/api;jsessionid=1/charge", PathParameter),
            ("/api/charge;x", PathParameter),
            ("/api%3bx", PathParameter),
            ("/api/./charge", DotSegment),
            ("/api/../admin", DotSegment),
            ("/api/..", DotSegment),
            ("/api/.", DotSegment),
            ("/..", DotSegment),
            ("/api/%2E%2E/admin", EscapedDot),
            ("/api/%2e/charge", EscapedDot),
            ("/api/.%2e", EscapedDot),
            ("/api%00", ControlByte(0)),
            ("/api\0x", ControlByte(0)),
            ("/api\r\nx", ControlByte(b'\r')),
            ("/api\x7f", ControlByte(0x7f)),
            ("/api%0a", ControlByte(b'\n')),
            ("/api%", BadEscape),
            ("/api%4", BadEscape),
            ("/api%zz", BadEscape),
            ("/api#frag", Fragment),
            ("*", NotAbsolute),
            ("", NotAbsolute),
            ("api/charge", NotAbsolute),
        ] {
            assert_eq!(check_path(p), Err(want), "{p:?}");
        }
        // the reason is one a client can act on
        assert!(check_path("/a%2Fb")
            .unwrap_err()
            .to_string()
            .contains("encoded slash"));
    }

    #[test]
    fn plain_paths_pass_unchanged_and_borrowed() {
        for p in [
            "/",
            "/api/charge",
            "/api/charge?x=1&next=/a/../b;c%2F",
            "/a.b/c..d/.e/f.",
            "/caf%C3%A9",
            "/café",
            "/a%20b",
            "/a%25b",
            "/api/charge/",
        ] {
            assert!(
                matches!(check_path(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p:?}"
            );
        }
    }

    #[test]
    fn unambiguous_encodings_come_back_normal_with_the_query_kept() {
        assert_eq!(
            check_path("/%61pi//charge?x=%2F").unwrap(),
            "/api/charge?x=%2F"
        );
        assert_eq!(check_path("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(check_path("//a").unwrap(), "/a");
    }

    #[test]
    fn header_lookup_is_case_insensitive_on_pairs() {
        let h = vec![("X-Canary".to_string(), "true".to_string())];
        assert_eq!(h.header("x-canary"), Some("true"));
        let h2 = [("X-Api-Version", "v1")];
        assert_eq!(h2.header("x-api-version"), Some("v1"));
        assert_eq!(NoHeaders.header("x"), None);
    }

    /// A path segment from characters that include every one
    /// [`check_path`] treats specially.
    fn segment() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("a".to_owned()),
                Just("Z9-_~".to_owned()),
                Just(".".to_owned()),
                Just("..".to_owned()),
                Just(";".to_owned()),
                Just("\\".to_owned()),
                Just("\0".to_owned()),
                Just("\u{7f}".to_owned()),
                Just("é".to_owned()),
                Just("%".to_owned()),
                Just("%2f".to_owned()),
                Just("%2F".to_owned()),
                Just("%5c".to_owned()),
                Just("%2e".to_owned()),
                Just("%2E".to_owned()),
                Just("%41".to_owned()),
                Just("%c3".to_owned()),
                Just("%3B".to_owned()),
                Just("%00".to_owned()),
                Just("%7e".to_owned()),
                Just("%25".to_owned()),
                Just("%".to_owned()),
                Just("4".to_owned()),
                Just("".to_owned()),
            ],
            0..4,
        )
        .prop_map(|parts| parts.concat())
    }

    /// A request target: `/`-joined segments, maybe a query.
    fn target() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(segment(), 0..6),
            proptest::option::of(segment()),
        )
            .prop_map(|(segs, q)| {
                let mut t = format!("/{}", segs.join("/"));
                if let Some(q) = q {
                    t.push('?');
                    t.push_str(&q);
                }
                t
            })
    }

    /// What may not reach an upstream after [`check_path`].
    fn ambiguous(path: &str) -> bool {
        let lower = path.to_ascii_lowercase();
        ["%2f", "%5c", "%2e", "%3b", "\\", ";"]
            .iter()
            .any(|bad| lower.contains(bad))
            || path.bytes().any(|c| c < 0x20 || c == 0x7f)
            || path.split('/').any(|s| s == "." || s == "..")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// What passes is unambiguous, is its own normal form (so the
        /// policy sees exactly the path forwarded), passes again unchanged,
        /// and keeps the query.
        #[test]
        fn what_passes_is_what_is_authorized(t in target()) {
            if let Ok(out) = check_path(&t) {
                let (path, query) = out.split_once('?').map_or((&*out, None), |(p, q)| (p, Some(q)));
                prop_assert!(!ambiguous(path), "{t:?} -> {out:?}");
                prop_assert_eq!(normalize_path(&out), path);
                prop_assert_eq!(check_path(&out), Ok(Cow::Borrowed(&*out)));
                prop_assert_eq!(query, t.split_once('?').map(|(_, q)| q));
                // the original normalizes to the same path the policy sees
                prop_assert_eq!(normalize_path(&t), path);
            } else {
                let path = t.split('?').next().unwrap_or("");
                // refused only for a reason
                prop_assert!(ambiguous(path) || path.contains('%'), "{t:?}");
            }
        }

        /// Arbitrary bytes never panic it.
        #[test]
        fn any_input_is_answered(t in "\\PC*") {
            let _ = check_path(&t);
            let _ = check_path(&format!("/{t}"));
        }
    }
}
