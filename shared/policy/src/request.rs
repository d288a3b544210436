//! What the evaluators see of a request: header lookup and path normalization.
//!
//! What it is: [`HeaderLookup`], implemented for the header containers a
//! proxy is likely to hold, and [`normalize_path`], the RFC 3986 path
//! normalization both authorization and routing apply before matching (so
//! `/api/./charge`, `/api//charge` and `/%61pi/charge` cannot slip past a
//! DENY rule for `/api/charge`). Who drives it: [`crate::authz`] and
//! [`crate::routing`]. What it must not do: allocate when the path is already
//! normal (the common case).

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
    fn header_lookup_is_case_insensitive_on_pairs() {
        let h = vec![("X-Canary".to_string(), "true".to_string())];
        assert_eq!(h.header("x-canary"), Some("true"));
        let h2 = [("X-Api-Version", "v1")];
        assert_eq!(h2.header("x-api-version"), Some("v1"));
        assert_eq!(NoHeaders.header("x"), None);
    }
}
