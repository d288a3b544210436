//! Trace context: W3C `traceparent` and B3 headers read, continued or
//! created, and `x-request-id` created when absent.
//!
//! What it is: parsing and formatting, with randomness passed in as bytes,
//! and the sampling decision of a hop: the caller's flag when it sent one
//! (W3C `traceparent` flags, B3 `x-b3-sampled` / `x-b3-flags`), else the
//! mode's sampling rate for a new trace (or a B3 caller that deferred the
//! decision). Who drives it: the outbound path (a span per proxied call,
//! child of the app's) and the inbound path (a span per delivered call,
//! child of the calling spoke's). What it must not do: draw its own
//! randomness, or trust a malformed header (it is ignored and a new trace
//! starts).

use hyper::header::{HeaderName, HeaderValue};

/// The caller's position in a trace, as read from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// 128-bit trace id (never all zero).
    pub trace_id: [u8; 16],
    /// The caller's span id (never all zero).
    pub span_id: [u8; 8],
    /// The caller's sampling decision; `None` when it left the decision to
    /// this hop (B3 without `x-b3-sampled`).
    pub sampled: Option<bool>,
}

/// The span this proxy hop opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Trace id: the caller's, or new.
    pub trace_id: [u8; 16],
    /// This hop's span id.
    pub span_id: [u8; 8],
    /// The caller's span, if the request came with one.
    pub parent_span_id: Option<[u8; 8]>,
    /// Sampled flag: the caller's, or the mode's draw (see [`Span::start`]).
    pub sampled: bool,
}

/// Header names written by [`Span::headers`] (lowercase).
pub const TRACEPARENT: &str = "traceparent";
/// B3 trace id.
pub const B3_TRACE: &str = "x-b3-traceid";
/// B3 span id.
pub const B3_SPAN: &str = "x-b3-spanid";
/// B3 parent span id.
pub const B3_PARENT: &str = "x-b3-parentspanid";
/// B3 sampled flag.
pub const B3_SAMPLED: &str = "x-b3-sampled";
/// B3 debug flag (`1`: sampled).
pub const B3_FLAGS: &str = "x-b3-flags";
/// Single-header B3, removed when the multi-header form is written.
pub const B3_SINGLE: &str = "b3";
/// Request id.
pub const REQUEST_ID: &str = "x-request-id";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_val(b[2 * i])? << 4 | hex_val(b[2 * i + 1])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lowercase hex into `out` (twice as long), without
/// allocating: the request path writes several ids per call.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 15)];
    }
}

/// `bytes` as lowercase hex in a fixed buffer (`N` = twice the length).
fn hex_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    hex_into(bytes, &mut out);
    out
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; later
/// versions are read by their first four fields, version `ff` is invalid).
pub fn parse_traceparent(v: &str) -> Option<Parent> {
    let v = v.trim();
    let mut parts = v.split('-');
    let version = parse_hex::<1>(parts.next()?)?[0];
    let trace_id = parse_hex::<16>(parts.next()?)?;
    let span_id = parse_hex::<8>(parts.next()?)?;
    let flags = parse_hex::<1>(parts.next()?)?[0];
    if version == 0xff || (version == 0 && parts.next().is_some()) {
        return None;
    }
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
    })
}

/// Reads B3 multi-header context (`x-b3-traceid` of 16 or 32 hex digits,
/// 64-bit ids left-padded with zeros; `x-b3-spanid`; `x-b3-sampled` `1`,
/// `true`, `0` or `false`, anything else or nothing deferring the decision;
/// `x-b3-flags: 1`, debug, meaning sampled).
pub fn parse_b3(get: &dyn Fn(&str) -> Option<String>) -> Option<Parent> {
    let t = get(B3_TRACE)?;
    let trace_id = match t.len() {
        32 => parse_hex::<16>(&t)?,
        16 => {
            let short = parse_hex::<8>(&t)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&short);
            id
        }
        _ => return None,
    };
    let span_id = parse_hex::<8>(&get(B3_SPAN)?)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    let debug = get(B3_FLAGS).is_some_and(|f| f.trim() == "1");
    let sampled = match get(B3_SAMPLED).as_deref().map(str::trim) {
        _ if debug => Some(true),
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        _ => None,
    };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
    })
}

/// The caller's context: `traceparent` first, then B3.
pub fn extract(get: &dyn Fn(&str) -> Option<String>) -> Option<Parent> {
    get(TRACEPARENT)
        .and_then(|v| parse_traceparent(&v))
        .or_else(|| parse_b3(get))
}

/// Whether this hop samples: the caller's decision when it made one, else
/// `draw()` (the mode's sampling rate), called only then.
pub fn sampled(parent: Option<&Parent>, draw: impl FnOnce() -> bool) -> bool {
    match parent.and_then(|p| p.sampled) {
        Some(decided) => decided,
        None => draw(),
    }
}

impl Span {
    /// Opens a span under `parent` (or a new trace), with ids made from
    /// `random` (24 random bytes: 16 for a new trace id, 8 for the span),
    /// sampled as [`sampled`] decides (`draw` is the mode's draw for a new
    /// trace).
    pub fn start(parent: Option<Parent>, random: [u8; 24], draw: impl FnOnce() -> bool) -> Span {
        let sampled = sampled(parent.as_ref(), draw);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&random[16..]);
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        match parent {
            Some(p) => Span {
                trace_id: p.trace_id,
                span_id,
                parent_span_id: Some(p.span_id),
                sampled,
            },
            None => {
                let mut trace_id = [0u8; 16];
                trace_id.copy_from_slice(&random[..16]);
                if trace_id == [0; 16] {
                    trace_id[15] = 1;
                }
                Span {
                    trace_id,
                    span_id,
                    parent_span_id: None,
                    sampled,
                }
            }
        }
    }

    /// This span as the parent of the next hop.
    pub fn as_parent(&self) -> Parent {
        Parent {
            trace_id: self.trace_id,
            span_id: self.span_id,
            sampled: Some(self.sampled),
        }
    }

    /// The `traceparent` value naming this span.
    #[cfg(test)]
    pub fn traceparent(&self) -> String {
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }

    /// `traceparent` as bytes: `00-<32 hex>-<16 hex>-<01|00>`.
    fn traceparent_bytes(&self) -> [u8; 55] {
        let mut b = [b'-'; 55];
        b[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut b[3..35]);
        hex_into(&self.span_id, &mut b[36..52]);
        b[53..].copy_from_slice(if self.sampled { b"01" } else { b"00" });
        b
    }

    /// Headers to set on the request leaving this hop: `traceparent` and
    /// the B3 multi-header set (the parent id only when there is one), as
    /// ready names and values, without formatting or name parsing.
    pub fn header_values(&self) -> [Option<(HeaderName, HeaderValue)>; 5] {
        let value = |b: &[u8]| HeaderValue::from_bytes(b).ok();
        let tp = value(&self.traceparent_bytes());
        let trace = value(&hex_array::<32>(&self.trace_id));
        let span = value(&hex_array::<16>(&self.span_id));
        let sampled = HeaderValue::from_static(if self.sampled { "1" } else { "0" });
        let parent = self
            .parent_span_id
            .and_then(|p| value(&hex_array::<16>(&p)));
        [
            tp.map(|v| (H_TRACEPARENT, v)),
            trace.map(|v| (H_B3_TRACE, v)),
            span.map(|v| (H_B3_SPAN, v)),
            Some((H_B3_SAMPLED, sampled)),
            parent.map(|v| (H_B3_PARENT, v)),
        ]
    }
}

const H_TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT);
const H_B3_TRACE: HeaderName = HeaderName::from_static(B3_TRACE);
const H_B3_SPAN: HeaderName = HeaderName::from_static(B3_SPAN);
const H_B3_SAMPLED: HeaderName = HeaderName::from_static(B3_SAMPLED);
const H_B3_PARENT: HeaderName = HeaderName::from_static(B3_PARENT);
/// `x-request-id`, ready to insert.
pub const H_REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID);
/// `b3` (single header), ready to remove.
pub const H_B3_SINGLE: HeaderName = HeaderName::from_static(B3_SINGLE);

/// A new `x-request-id`: a random (version 4) UUID from 16 random bytes,
/// 8-4-4-4-12 hex digits.
pub fn request_id_bytes(mut r: [u8; 16]) -> [u8; 36] {
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let mut b = [b'-'; 36];
    hex_into(&r[..4], &mut b[..8]);
    hex_into(&r[4..6], &mut b[9..13]);
    hex_into(&r[6..8], &mut b[14..18]);
    hex_into(&r[8..10], &mut b[19..23]);
    hex_into(&r[10..], &mut b[24..]);
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        let mut out = vec![0u8; bytes.len() * 2];
        hex_into(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn new_request_id(r: [u8; 16]) -> String {
        String::from_utf8(request_id_bytes(r).to_vec()).unwrap()
    }

    /// The span's headers as (name, value) strings, in writing order.
    fn written(s: &Span) -> Vec<(String, String)> {
        s.header_values()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn traceparent_is_continued_with_a_new_span() {
        let p = parse_traceparent(TP).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.sampled, Some(true));
        let s = Span::start(Some(p), [7; 24], || panic!("the caller decided"));
        assert_eq!(s.trace_id, p.trace_id);
        assert_eq!(s.parent_span_id, Some(p.span_id));
        assert_eq!(
            s.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-01"
        );
        let h = written(&s);
        assert!(h.contains(&(B3_PARENT.into(), "00f067aa0ba902b7".into())));
        assert!(h.contains(&(B3_TRACE.into(), "4bf92f3577b34da6a3ce929d0e0e4736".into())));
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // a future version may append fields
        assert!(parse_traceparent(&format!("01{}-extra", &TP[2..])).is_some());
        let s = Span::start(None, [9; 24], || true);
        assert_eq!(s.trace_id, [9; 16]);
        assert_eq!(s.parent_span_id, None);
        assert!(s.sampled);
    }

    #[test]
    fn b3_is_read_when_there_is_no_traceparent() {
        let h = [
            ("X-B3-TraceId", "a3ce929d0e0e4736"),
            ("X-B3-SpanId", "00f067aa0ba902b7"),
            ("X-B3-Sampled", "0"),
        ];
        let p = extract(&headers(&h)).unwrap();
        assert_eq!(hex(&p.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(p.sampled, Some(false));
        let both = [("traceparent", TP), ("x-b3-traceid", "a3ce929d0e0e4736")];
        let p = extract(&headers(&both)).unwrap();
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(extract(&headers(&[("x-b3-traceid", "zz")])).is_none());
    }

    #[test]
    fn the_callers_sampling_decision_wins_and_a_new_trace_draws() {
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let p = parse_traceparent(unsampled).unwrap();
        assert_eq!(p.sampled, Some(false));
        // an unsampled caller stays unsampled even where the mode samples
        // everything, and its flag goes on to the next hop
        let s = Span::start(Some(p), [1; 24], || panic!("no draw"));
        assert!(!s.sampled);
        assert!(s.traceparent().ends_with("-00"));
        assert!(written(&s).contains(&(B3_SAMPLED.into(), "0".into())));
        // a sampled caller stays sampled where the mode samples nothing
        let s = Span::start(Some(parse_traceparent(TP).unwrap()), [1; 24], || false);
        assert!(s.sampled);
        // the next hop reads this hop's decision from what it writes
        let next = parse_traceparent(&s.traceparent()).unwrap();
        assert_eq!(next.sampled, Some(true));
        // a new trace takes the mode's draw, either way
        assert!(!Span::start(None, [1; 24], || false).sampled);
        assert!(Span::start(None, [1; 24], || true).sampled);
        // B3: explicit flags decide; debug means sampled; no flag defers
        let b3 = |extra: &[(&'static str, &'static str)]| {
            let mut h = vec![
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
            ];
            h.extend_from_slice(extra);
            let get = headers(&h);
            let p = extract(&get).unwrap();
            p.sampled
        };
        assert_eq!(b3(&[("x-b3-sampled", "1")]), Some(true));
        assert_eq!(b3(&[("x-b3-sampled", "true")]), Some(true));
        assert_eq!(b3(&[("x-b3-sampled", "0")]), Some(false));
        assert_eq!(b3(&[("x-b3-sampled", "false")]), Some(false));
        assert_eq!(
            b3(&[("x-b3-sampled", "0"), ("x-b3-flags", "1")]),
            Some(true)
        );
        assert_eq!(b3(&[]), None);
        assert_eq!(b3(&[("x-b3-sampled", "maybe")]), None);
        let p = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]));
        assert!(!sampled(p.as_ref(), || false));
        assert!(sampled(p.as_ref(), || true));
        assert!(sampled(None, || true));
    }

    #[test]
    fn request_ids_are_v4_uuids() {
        let id = new_request_id([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn request_id_digits_follow_the_random_bytes() {
        let r: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        let id = new_request_id(r);
        // version 4, variant 10xx
        let mut v = r;
        v[6] = 0x40 | (r[6] & 0x0f);
        v[8] = 0x80 | (r[8] & 0x3f);
        let expect = hex(&v);
        let dashed = format!(
            "{}-{}-{}-{}-{}",
            &expect[..8],
            &expect[8..12],
            &expect[12..16],
            &expect[16..20],
            &expect[20..]
        );
        assert_eq!(id, dashed);
    }

    #[test]
    fn header_values_are_the_formatted_ids() {
        for parent in [None, Some(parse_traceparent(TP).unwrap())] {
            for seed in [[0u8; 24], [0xab; 24]] {
                let s = Span::start(parent, seed, || true);
                let (t, sp) = (hex(&s.trace_id), hex(&s.span_id));
                let mut expect = vec![
                    (TRACEPARENT.to_owned(), format!("00-{t}-{sp}-01")),
                    (B3_TRACE.to_owned(), t),
                    (B3_SPAN.to_owned(), sp),
                    (B3_SAMPLED.to_owned(), "1".to_owned()),
                ];
                if let Some(p) = s.parent_span_id {
                    expect.push((B3_PARENT.to_owned(), hex(&p)));
                }
                assert_eq!(written(&s), expect);
                assert_eq!(expect.len(), if parent.is_some() { 5 } else { 4 });
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever an app or a peer sends as trace context, reading it
            /// never panics, and what a span writes reads back as itself.
            #[test]
            fn trace_headers_read_anything_and_round_trip(
                raw in ".{0,80}",
                hexish in "[0-9a-fA-F-]{0,70}",
                seed in proptest::array::uniform24(any::<u8>()),
                continue_it in any::<bool>(),
            ) {
                let _ = parse_traceparent(&raw);
                let _ = parse_traceparent(&hexish);
                let _ = extract(&|n: &str| (n == B3_TRACE || n == B3_SPAN).then(|| hexish.clone()));
                let parent = if continue_it { parse_traceparent(&hexish) } else { None };
                let span = Span::start(parent, seed, || seed[0] & 1 == 1);
                let written = span.header_values();
                let tp = written[0].as_ref().map(|(_, v)| v.to_str().unwrap().to_owned());
                let back = parse_traceparent(&tp.unwrap()).unwrap();
                prop_assert_eq!(back.trace_id, span.trace_id);
                prop_assert_eq!(back.span_id, span.span_id);
                prop_assert_eq!(back.sampled, Some(span.sampled));
                let b3 = extract(&|n: &str| {
                    written.iter().flatten().find(|(k, _)| *k == n && n != TRACEPARENT)
                        .map(|(_, v)| v.to_str().unwrap().to_owned())
                }).unwrap();
                prop_assert_eq!(b3.trace_id, span.trace_id);
                prop_assert_eq!(b3.span_id, span.span_id);
            }

            /// Request ids are always well-formed version 4 UUIDs.
            #[test]
            fn request_ids_are_always_uuids(r in proptest::array::uniform16(any::<u8>())) {
                let id = new_request_id(r);
                prop_assert_eq!(id.len(), 36);
                for (i, c) in id.char_indices() {
                    if [8, 13, 18, 23].contains(&i) {
                        prop_assert_eq!(c, '-');
                    } else {
                        prop_assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
                    }
                }
                prop_assert_eq!(&id[14..15], "4");
                prop_assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
            }
        }
    }
}
