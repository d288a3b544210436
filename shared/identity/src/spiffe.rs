//! SPIFFE IDs and trust domain names, parsed exactly per the SPIFFE ID standard.
//!
//! What it is: the two newtypes every other part of tidemesh uses to talk about
//! identity, [`TrustDomain`] and [`SpiffeId`]. They are parsed once, at the
//! boundary (config, certificates, the wire), and are valid by construction
//! afterwards. Who drives it: everything that names a workload, a node or the
//! hub. What it must not do: normalise. Input that is not already in canonical
//! form (an uppercase trust domain, percent-encoding, `.` segments, a trailing
//! slash) is rejected with a [`SpiffeIdError`] naming the offending part,
//! never lowercased, decoded or cleaned up, because two spellings of one
//! identity would make authorization and audit ambiguous.
//!
//! Rules enforced (SPIFFE ID standard, section 2):
//! - scheme exactly `spiffe` (lowercase) followed by `://`;
//! - trust domain: non-empty, at most 255 bytes, only `a-z 0-9 . - _`, no
//!   port, no userinfo;
//! - path: empty, or `/`-separated segments of `a-z A-Z 0-9 . - _`, none
//!   empty, none `.` or `..`, no trailing slash;
//! - no query, no fragment, no percent-encoding;
//! - at most 2048 bytes in total.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The only accepted scheme prefix.
const PREFIX: &str = "spiffe://";
/// Maximum length of a whole SPIFFE ID in bytes (SPIFFE ID standard 2.3).
pub const MAX_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name in bytes (the URI host limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain name.
///
/// One variant per rule of the SPIFFE ID standard, so callers (and tests) can
/// tell exactly which rule was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was the empty string.
    #[error("spiffe id is empty: expected spiffe://<trust-domain>/<path>")]
    Empty,
    /// The scheme is missing, not `spiffe`, not lowercase, or not followed by `://`.
    #[error("spiffe id {0:?} must start with exactly \"spiffe://\" (lowercase scheme)")]
    WrongScheme(String),
    /// Nothing between `spiffe://` and the path.
    #[error("spiffe id {0:?} has no trust domain after \"spiffe://\"")]
    MissingTrustDomain(String),
    /// The whole ID is longer than 2048 bytes.
    #[error("spiffe id is {0} bytes long; the maximum is 2048")]
    TooLong(usize),
    /// [`TrustDomain::new`] was given a URI (`spiffe://td`) instead of a bare name.
    #[error("trust domain {0:?} looks like a uri; give the bare name, e.g. \"corp.example\"")]
    NotBareTrustDomain(String),
    /// The trust domain name is longer than 255 bytes.
    #[error("trust domain is {0} bytes long; the maximum is 255")]
    TrustDomainTooLong(usize),
    /// The trust domain contains uppercase letters (they are not lowercased for you).
    #[error("trust domain {0:?} contains uppercase letters; trust domains must be lowercase")]
    UppercaseTrustDomain(String),
    /// The trust domain contains a character outside `a-z 0-9 . - _`.
    #[error("trust domain {trust_domain:?} contains {ch:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar {
        /// The trust domain as given.
        trust_domain: String,
        /// The first offending character.
        ch: char,
    },
    /// The authority carries a port (`:`), which SPIFFE IDs must not.
    #[error("trust domain {0:?} carries a port; remove the ':' and what follows")]
    Port(String),
    /// The authority carries userinfo (`@`), which SPIFFE IDs must not.
    #[error("trust domain {0:?} carries userinfo; remove the part before '@'")]
    Userinfo(String),
    /// The ID has a query component (`?`).
    #[error("spiffe id {0:?} has a query component ('?'); spiffe ids must not")]
    Query(String),
    /// The ID has a fragment component (`#`).
    #[error("spiffe id {0:?} has a fragment component ('#'); spiffe ids must not")]
    Fragment(String),
    /// The ID contains `%`: percent-encoding is not allowed anywhere.
    #[error("spiffe id {0:?} contains '%'; percent-encoding is not allowed")]
    PercentEncoded(String),
    /// The path contains an empty segment (`//`), or a segment given to
    /// [`SpiffeId::from_segments`] is empty.
    #[error("spiffe id {0:?} has an empty path segment ('//')")]
    EmptySegment(String),
    /// The path contains a `.` or `..` segment.
    #[error("path segment {0:?} is not allowed ('.' and '..' segments are forbidden)")]
    DotSegment(String),
    /// The path ends with `/`.
    #[error("spiffe id {0:?} ends with '/'; remove the trailing slash")]
    TrailingSlash(String),
    /// A path segment contains a character outside `a-z A-Z 0-9 . - _`.
    #[error("path segment {segment:?} contains {ch:?}; only a-z, A-Z, 0-9, '.', '-' and '_' are allowed")]
    BadPathChar {
        /// The offending segment.
        segment: String,
        /// The first offending character.
        ch: char,
    },
}

/// A SPIFFE trust domain name, e.g. `corp.example`.
///
/// Valid by construction: lowercase `a-z 0-9 . - _`, 1 to 255 bytes.
/// Serialized as the bare name; deserialization validates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`corp.example`, not `spiffe://corp.example`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The name, e.g. `corp.example`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>` (no path).
    pub fn id(&self) -> SpiffeId {
        SpiffeId::assemble(self.clone(), String::new())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate_trust_domain(&s)?;
        Ok(Self(s))
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.0
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain><path>`.
///
/// Valid by construction (see the module docs for the rules). Displayed and
/// serialized as the canonical URI string; deserialization validates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
    /// The whole URI, kept so display and serialization (every evidence
    /// record carries IDs) neither allocate nor format.
    uri: String,
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl SpiffeId {
    fn assemble(trust_domain: TrustDomain, path: String) -> SpiffeId {
        let mut uri = String::with_capacity(PREFIX.len() + trust_domain.0.len() + path.len());
        uri.push_str(PREFIX);
        uri.push_str(&trust_domain.0);
        uri.push_str(&path);
        SpiffeId {
            trust_domain,
            path,
            uri,
        }
    }

    /// The canonical URI, `spiffe://<trust-domain><path>`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Parses a SPIFFE ID exactly per the SPIFFE ID standard.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Err(SpiffeIdError::WrongScheme(scheme_of(s)));
        };
        // Components that may not appear anywhere, checked before the
        // per-character rules so the error names the real problem.
        if s.contains('#') {
            return Err(SpiffeIdError::Fragment(s.to_owned()));
        }
        if s.contains('?') {
            return Err(SpiffeIdError::Query(s.to_owned()));
        }
        if s.contains('%') {
            return Err(SpiffeIdError::PercentEncoded(s.to_owned()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain(s.to_owned()));
        }
        validate_trust_domain(authority)?;
        validate_path(s, path)?;
        Ok(Self::assemble(
            TrustDomain(authority.to_owned()),
            path.to_owned(),
        ))
    }

    /// Builds `spiffe://<td>/<seg1>/<seg2>...`, validating every segment.
    ///
    /// A segment containing `/` is rejected (it is one segment, not a path).
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut path = String::new();
        for seg in segments {
            if seg.is_empty() {
                return Err(SpiffeIdError::EmptySegment(format!("{PREFIX}{td}{path}//")));
            }
            if seg.contains('%') {
                return Err(SpiffeIdError::PercentEncoded((*seg).to_owned()));
            }
            validate_segment(seg)?;
            path.push('/');
            path.push_str(seg);
        }
        let len = PREFIX.len() + td.as_str().len() + path.len();
        if len > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(len));
        }
        Ok(Self::assemble(td.clone(), path))
    }

    /// Builds an ID from a compile-time constant path.
    ///
    /// Invariant (the caller's): `path` is `""` or `/seg(/seg)*` with every
    /// segment valid; used only for constants such as `/hub`, which the tests
    /// check against [`SpiffeId::parse`].
    pub(crate) fn with_const_path(td: &TrustDomain, path: &'static str) -> Self {
        debug_assert!(validate_path(path, path).is_ok());
        Self::assemble(td.clone(), path.to_owned())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: `""` for a trust domain ID, otherwise `/a/b`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path segments, `["a", "b"]` for `/a/b`, empty for no path.
    pub fn segments(&self) -> Vec<&str> {
        match self.path.strip_prefix('/') {
            Some(p) => p.split('/').collect(),
            None => Vec::new(),
        }
    }

    /// True if this is a trust domain ID (`spiffe://td`, no path).
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.uri
    }
}

/// What stands where the scheme should be, for the error message.
fn scheme_of(s: &str) -> String {
    match s.find("://") {
        Some(i) => s[..i].to_owned(),
        None => s.chars().take(32).collect(),
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain(td.to_owned()));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    if td.contains("://") {
        return Err(SpiffeIdError::NotBareTrustDomain(td.to_owned()));
    }
    if td.contains('@') {
        return Err(SpiffeIdError::Userinfo(td.to_owned()));
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port(td.to_owned()));
    }
    if td.contains('%') {
        return Err(SpiffeIdError::PercentEncoded(td.to_owned()));
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SpiffeIdError::UppercaseTrustDomain(td.to_owned()));
    }
    if let Some(ch) = td.chars().find(|&c| !is_trust_domain_char(c)) {
        return Err(SpiffeIdError::BadTrustDomainChar {
            trust_domain: td.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// `path` is empty or starts with `/`; `whole` is the full ID for messages.
fn validate_path(whole: &str, path: &str) -> Result<(), SpiffeIdError> {
    let Some(body) = path.strip_prefix('/') else {
        return Ok(()); // empty path
    };
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() {
            return Err(if segments.peek().is_none() {
                SpiffeIdError::TrailingSlash(whole.to_owned())
            } else {
                SpiffeIdError::EmptySegment(whole.to_owned())
            });
        }
        validate_segment(seg)?;
    }
    Ok(())
}

fn validate_segment(seg: &str) -> Result<(), SpiffeIdError> {
    if seg == "." || seg == ".." {
        return Err(SpiffeIdError::DotSegment(seg.to_owned()));
    }
    if let Some(ch) = seg.chars().find(|&c| !is_path_char(c)) {
        return Err(SpiffeIdError::BadPathChar {
            segment: seg.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn err(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).unwrap_err()
    }

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/hub",
            "spiffe://example.org/store/sf01/node/n-1",
            "spiffe://ex_am-ple.0rg/A/b.c/D_e-F/0",
            "spiffe://a/..a/.a./a..",
            "spiffe://-._/x",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s, "roundtrip {s}");
        }
    }

    #[test]
    fn accessors() {
        let id = SpiffeId::parse("spiffe://corp.example/store/sf01/sa/pos").unwrap();
        assert_eq!(id.trust_domain().as_str(), "corp.example");
        assert_eq!(id.path(), "/store/sf01/sa/pos");
        assert_eq!(id.segments(), vec!["store", "sf01", "sa", "pos"]);
        assert!(!id.is_trust_domain_id());
        let root = SpiffeId::parse("spiffe://corp.example").unwrap();
        assert_eq!(root.path(), "");
        assert!(root.segments().is_empty());
        assert!(root.is_trust_domain_id());
        assert_eq!(root, root.trust_domain().id());
    }

    #[test]
    fn empty() {
        assert_eq!(err(""), SpiffeIdError::Empty);
    }

    #[test]
    fn wrong_scheme() {
        for s in [
            "SPIFFE://example.org/a",
            "Spiffe://example.org/a",
            "https://example.org/a",
            "spiffe:/example.org/a",
            "spiffe:example.org",
            "example.org/a",
            " spiffe://example.org/a",
        ] {
            assert!(
                matches!(err(s), SpiffeIdError::WrongScheme(_)),
                "{s}: {:?}",
                err(s)
            );
        }
        assert_eq!(
            err("SPIFFE://example.org"),
            SpiffeIdError::WrongScheme("SPIFFE".into())
        );
    }

    #[test]
    fn missing_trust_domain() {
        assert!(matches!(
            err("spiffe://"),
            SpiffeIdError::MissingTrustDomain(_)
        ));
        assert!(matches!(
            err("spiffe:///path"),
            SpiffeIdError::MissingTrustDomain(_)
        ));
    }

    #[test]
    fn uppercase_trust_domain_is_rejected_not_lowercased() {
        assert_eq!(
            err("spiffe://Example.org/a"),
            SpiffeIdError::UppercaseTrustDomain("Example.org".into())
        );
        assert!(matches!(
            TrustDomain::new("EXAMPLE"),
            Err(SpiffeIdError::UppercaseTrustDomain(_))
        ));
    }

    #[test]
    fn bad_trust_domain_char() {
        for (s, ch) in [
            ("spiffe://exa mple.org", ' '),
            ("spiffe://example.org!/a", '!'),
            ("spiffe://exämple.org", 'ä'),
            ("spiffe://ex+ample", '+'),
            ("spiffe://[fe80--1]/a", '['),
        ] {
            match err(s) {
                SpiffeIdError::BadTrustDomainChar { ch: c, .. } => assert_eq!(c, ch, "{s}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn port() {
        assert_eq!(
            err("spiffe://example.org:8443/a"),
            SpiffeIdError::Port("example.org:8443".into())
        );
        assert!(matches!(
            err("spiffe://example.org:"),
            SpiffeIdError::Port(_)
        ));
    }

    #[test]
    fn userinfo() {
        assert_eq!(
            err("spiffe://user@example.org/a"),
            SpiffeIdError::Userinfo("user@example.org".into())
        );
        assert!(matches!(
            err("spiffe://user:pw@example.org"),
            SpiffeIdError::Userinfo(_)
        ));
    }

    #[test]
    fn query_and_fragment() {
        assert!(matches!(
            err("spiffe://example.org/a?x=1"),
            SpiffeIdError::Query(_)
        ));
        assert!(matches!(
            err("spiffe://example.org?x"),
            SpiffeIdError::Query(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a#frag"),
            SpiffeIdError::Fragment(_)
        ));
        assert!(matches!(
            err("spiffe://example.org#"),
            SpiffeIdError::Fragment(_)
        ));
    }

    #[test]
    fn percent_encoding() {
        assert!(matches!(
            err("spiffe://example.org/a%20b"),
            SpiffeIdError::PercentEncoded(_)
        ));
        assert!(matches!(
            err("spiffe://ex%41mple.org/a"),
            SpiffeIdError::PercentEncoded(_)
        ));
    }

    #[test]
    fn empty_segment() {
        assert!(matches!(
            err("spiffe://example.org//a"),
            SpiffeIdError::EmptySegment(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a//b"),
            SpiffeIdError::EmptySegment(_)
        ));
    }

    #[test]
    fn dot_segments() {
        for s in [
            "spiffe://example.org/.",
            "spiffe://example.org/..",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
        ] {
            assert!(matches!(err(s), SpiffeIdError::DotSegment(_)), "{s}");
        }
    }

    #[test]
    fn trailing_slash() {
        assert!(matches!(
            err("spiffe://example.org/"),
            SpiffeIdError::TrailingSlash(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a/"),
            SpiffeIdError::TrailingSlash(_)
        ));
    }

    #[test]
    fn bad_path_char() {
        for (s, ch) in [
            ("spiffe://example.org/a b", ' '),
            ("spiffe://example.org/a:b", ':'),
            ("spiffe://example.org/a@b", '@'),
            ("spiffe://example.org/ä", 'ä'),
            ("spiffe://example.org/a+b", '+'),
            ("spiffe://example.org/a~b", '~'),
        ] {
            match err(s) {
                SpiffeIdError::BadPathChar { ch: c, .. } => assert_eq!(c, ch, "{s}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(255);
        let ok = format!("spiffe://{td}/x");
        assert!(SpiffeId::parse(&ok).is_ok());
        let td_long = "a".repeat(256);
        assert_eq!(
            err(&format!("spiffe://{td_long}/x")),
            SpiffeIdError::TrustDomainTooLong(256)
        );
        // exactly 2048 bytes is fine, 2049 is not
        let base = "spiffe://example.org/";
        let exact = format!("{base}{}", "p".repeat(MAX_ID_LEN - base.len()));
        assert_eq!(exact.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&exact).is_ok());
        let over = format!("{exact}p");
        assert_eq!(err(&over), SpiffeIdError::TooLong(MAX_ID_LEN + 1));
    }

    #[test]
    fn trust_domain_new() {
        assert_eq!(
            TrustDomain::new("corp.example").unwrap().as_str(),
            "corp.example"
        );
        assert!(matches!(
            TrustDomain::new(""),
            Err(SpiffeIdError::MissingTrustDomain(_))
        ));
        assert_eq!(
            TrustDomain::new("spiffe://corp.example"),
            Err(SpiffeIdError::NotBareTrustDomain(
                "spiffe://corp.example".into()
            ))
        );
        assert!(matches!(
            TrustDomain::new("corp/example"),
            Err(SpiffeIdError::BadTrustDomainChar { ch: '/', .. })
        ));
        assert_eq!(
            "corp.example"
                .parse::<TrustDomain>()
                .unwrap()
                .id()
                .to_string(),
            "spiffe://corp.example"
        );
    }

    #[test]
    fn from_segments() {
        let td = TrustDomain::new("corp.example").unwrap();
        let id = SpiffeId::from_segments(&td, &["store", "sf01"]).unwrap();
        assert_eq!(id.to_string(), "spiffe://corp.example/store/sf01");
        assert_eq!(SpiffeId::from_segments(&td, &[]).unwrap(), td.id());
        assert!(matches!(
            SpiffeId::from_segments(&td, &["a", ""]),
            Err(SpiffeIdError::EmptySegment(_))
        ));
        assert!(matches!(
            SpiffeId::from_segments(&td, &["a/b"]),
            Err(SpiffeIdError::BadPathChar { ch: '/', .. })
        ));
        assert!(matches!(
            SpiffeId::from_segments(&td, &[".."]),
            Err(SpiffeIdError::DotSegment(_))
        ));
        assert!(matches!(
            SpiffeId::from_segments(&td, &["a%2F"]),
            Err(SpiffeIdError::PercentEncoded(_))
        ));
        let long = "x".repeat(MAX_ID_LEN);
        assert!(matches!(
            SpiffeId::from_segments(&td, &[&long]),
            Err(SpiffeIdError::TooLong(_))
        ));
    }

    #[test]
    fn serde_as_string_and_validated() {
        let id = SpiffeId::parse("spiffe://corp.example/hub").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://corp.example/hub\"");
        let back: SpiffeId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://Corp/hub\"").is_err());
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://corp/a/\"").is_err());
        let td: TrustDomain = serde_json::from_str("\"corp.example\"").unwrap();
        assert_eq!(serde_json::to_string(&td).unwrap(), "\"corp.example\"");
        assert!(serde_json::from_str::<TrustDomain>("\"corp:1\"").is_err());
    }
}
