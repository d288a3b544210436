//! The small value types every record is built from: sequence numbers,
//! timestamps, hashes, digests, trace ids, ratios and the priority class.
//!
//! Each has two serde renderings. On disk and on the wire (postcard, which is
//! not human readable) they are compact integers or raw fixed-size byte
//! arrays. In JSON (human readable) they are what the seed document shows:
//! RFC 3339 timestamps (`"2024-01-15T10:30:00.000Z"`), `"sha256:…"`
//! fingerprints, hex trace ids and ratios as fractions (`0.35`). Parsing
//! either rendering validates, so a bad value never becomes a typed one.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A spoke's evidence sequence number: 1 for the first record of a spoke's
/// chain, then +1 per record. Zero is not a sequence number (it is refused
/// when decoding); positions "before the first record" are expressed with
/// [`crate::ChainPosition`] instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct EvidenceSeq(u64);

impl EvidenceSeq {
    /// The first sequence number of every chain.
    pub const FIRST: EvidenceSeq = EvidenceSeq(1);

    /// `n` as a sequence number; `None` for 0.
    pub const fn new(n: u64) -> Option<EvidenceSeq> {
        if n == 0 {
            None
        } else {
            Some(EvidenceSeq(n))
        }
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The following sequence number. Saturates at `u64::MAX`, which a spoke
    /// cannot reach (584,000 years at a million records per second).
    pub const fn next(self) -> EvidenceSeq {
        EvidenceSeq(self.0.saturating_add(1))
    }

    /// The preceding number, `None` for [`EvidenceSeq::FIRST`].
    pub const fn prev(self) -> Option<EvidenceSeq> {
        EvidenceSeq::new(self.0 - 1)
    }
}

impl fmt::Display for EvidenceSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a number is not a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("0 is not an evidence sequence number (they start at 1)")]
pub struct ZeroSeq;

impl TryFrom<u64> for EvidenceSeq {
    type Error = ZeroSeq;
    fn try_from(n: u64) -> Result<Self, ZeroSeq> {
        EvidenceSeq::new(n).ok_or(ZeroSeq)
    }
}

impl From<EvidenceSeq> for u64 {
    fn from(s: EvidenceSeq) -> u64 {
        s.0
    }
}

/// The priority class of a record: what the buffer may shed when full.
///
/// `Audit` records (system events and shed records) are never shed: when
/// they do not fit, the writer gets an error. `Debug` records are shed
/// first, then `Request` records. The postcard encoding is the variant index
/// (`Audit` = 0, `Request` = 1, `Debug` = 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriorityClass {
    /// Never shed.
    Audit,
    /// Shed after every `Debug` record is gone.
    Request,
    /// Shed first.
    Debug,
}

impl PriorityClass {
    /// The lowercase name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PriorityClass::Audit => "audit",
            PriorityClass::Request => "request",
            PriorityClass::Debug => "debug",
        }
    }
}

impl fmt::Display for PriorityClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch (UTC), passed in by the caller: nothing
/// in this crate reads a clock.
///
/// postcard: varint `u64`. JSON: RFC 3339 with milliseconds,
/// `"2024-01-15T10:30:00.000Z"`; parsing also accepts no or up to nine
/// fraction digits (truncated to milliseconds) and a bare integer of
/// milliseconds. Years outside 1970..=9999 are refused in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds from `earlier` to `self`, 0 if `earlier` is later.
    pub const fn seconds_since(self, earlier: UnixMillis) -> u64 {
        self.0.saturating_sub(earlier.0) / 1000
    }

    /// The RFC 3339 rendering, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn to_rfc3339(self) -> String {
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let days = secs / 86_400;
        let sod = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z` (UTC only).
    pub fn parse_rfc3339(s: &str) -> Option<UnixMillis> {
        let b = s.as_bytes();
        if b.len() < 20 || b.last() != Some(&b'Z') {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u64> {
            let part = b.get(r)?;
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(part.iter().fold(0u64, |n, c| n * 10 + u64::from(c - b'0')))
        };
        let sep = |i: usize, c: u8| b.get(i) == Some(&c);
        if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
            return None;
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        if d < 1 || d > days_in_month(y, mo) {
            return None;
        }
        let rest = &b[19..b.len() - 1];
        let ms = match rest {
            [] => 0,
            [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
                if !frac.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                let mut ms = 0u64;
                for i in 0..3 {
                    ms = ms * 10 + frac.get(i).map_or(0, |c| u64::from(c - b'0'));
                }
                ms
            }
            _ => return None,
        };
        let days = days_from_civil(y, mo, d);
        Some(UnixMillis(
            ((days * 86_400) + h * 3600 + mi * 60 + sec) * 1000 + ms,
        ))
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year >= 1970),
/// after Howard Hinnant's `days_from_civil`.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

impl Serialize for UnixMillis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_rfc3339())
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for UnixMillis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = UnixMillis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 UTC timestamp or milliseconds since the Unix epoch")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UnixMillis, E> {
                Ok(UnixMillis(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UnixMillis, E> {
                UnixMillis::parse_rfc3339(v)
                    .ok_or_else(|| E::custom(format!("{v:?} is not an RFC 3339 UTC timestamp")))
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(V)
        } else {
            d.deserialize_u64(V)
        }
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    tidemesh_identity::svid::hex(bytes)
}

/// Parses exactly `N` bytes of hex.
fn from_hex_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    let v = tidemesh_identity::svid::from_hex(s)?;
    <[u8; N]>::try_from(v).ok()
}

/// Defines a fixed-size byte newtype: raw bytes in postcard, text in JSON.
macro_rules! bytes_newtype {
    ($(#[$m:meta])* $name:ident, $len:expr, $prefix:expr, $what:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Parses the JSON rendering.
            pub fn parse(s: &str) -> Option<$name> {
                from_hex_exact::<$len>(s.strip_prefix($prefix)?).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, hex(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    $name::parse(&s).ok_or_else(|| {
                        de::Error::custom(format!("{:?} is not {}", s, $what))
                    })
                } else {
                    <[u8; $len]>::deserialize(d).map($name)
                }
            }
        }
    };
}

bytes_newtype!(
    /// A link of the evidence hash chain (SHA-256). JSON: 64 lowercase hex digits.
    ChainHash,
    32,
    "",
    "a 64-digit hex sha-256 chain hash"
);

bytes_newtype!(
    /// A SHA-256 digest of something outside the chain: a certificate
    /// (fingerprint) or a config document. JSON: `"sha256:<64 hex digits>"`,
    /// as the seed writes `certificate_fingerprint`.
    Sha256Digest,
    32,
    "sha256:",
    "\"sha256:\" followed by 64 hex digits"
);

bytes_newtype!(
    /// A W3C / B3 128-bit trace id (64-bit B3 ids are left-padded with
    /// zeros). JSON: 32 hex digits.
    TraceId,
    16,
    "",
    "a 32-digit hex trace id"
);

bytes_newtype!(
    /// A 64-bit span id. JSON: 16 hex digits.
    SpanId,
    8,
    "",
    "a 16-digit hex span id"
);

impl Sha256Digest {
    /// SHA-256 of `bytes` (a certificate DER, a config document).
    pub fn of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(tidemesh_identity::svid::sha256(bytes))
    }
}

/// A fraction such as an error rate (`0.35`) or a threshold, stored exactly
/// as parts per million.
///
/// postcard: varint `u32` ppm. JSON: the fraction as a number, `0.35`;
/// parsing rounds to the nearest ppm and refuses negative, non-finite or
/// out-of-range values (above 4294.967295).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ratio(pub u32);

impl Ratio {
    /// Parts per million in one.
    pub const ONE_PPM: u32 = 1_000_000;

    /// `num / den`, rounded to ppm; 0 when `den` is 0; saturates.
    pub fn from_counts(num: u64, den: u64) -> Ratio {
        if den == 0 {
            return Ratio(0);
        }
        let ppm = (u128::from(num) * 1_000_000 + u128::from(den) / 2) / u128::from(den);
        Ratio(u32::try_from(ppm).unwrap_or(u32::MAX))
    }

    /// The fraction as a float (for display and JSON).
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 1_000_000.0
    }

    /// The fraction from a float, rounded to ppm; `None` when negative,
    /// not finite or too large.
    pub fn from_f64(v: f64) -> Option<Ratio> {
        let ppm = (v * 1_000_000.0).round();
        if !ppm.is_finite() || ppm < 0.0 || ppm > f64::from(u32::MAX) {
            return None;
        }
        // In range and integral, checked above, so the cast is exact.
        Some(Ratio(ppm as u32))
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_f64(self.as_f64())
        } else {
            s.serialize_u32(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ratio;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative fraction such as 0.35")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ratio, E> {
                Ratio::from_f64(v).ok_or_else(|| E::custom(format!("{v} is not a valid ratio")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ratio, E> {
                // Integers are fractions too (0 and 1 are common); the cast
                // only loses precision for values the range check refuses.
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ratio, E> {
                // As above: negative or huge values are refused by the check.
                self.visit_f64(v as f64)
            }
            fn visit_u32<E: de::Error>(self, v: u32) -> Result<Ratio, E> {
                Ok(Ratio(v))
            }
        }
        if d.is_human_readable() {
            d.deserialize_f64(V)
        } else {
            d.deserialize_u32(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(UnixMillis(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        let t = UnixMillis::parse_rfc3339("2024-01-15T10:30:00.245Z").expect("parses");
        assert_eq!(t, UnixMillis(1_705_314_600_245));
        assert_eq!(t.to_rfc3339(), "2024-01-15T10:30:00.245Z");
        assert_eq!(
            UnixMillis::parse_rfc3339("2024-01-15T10:00:00Z"),
            Some(UnixMillis(1_705_312_800_000))
        );
        assert_eq!(
            UnixMillis::parse_rfc3339("2024-02-29T00:00:00.123456789Z"),
            Some(UnixMillis(1_709_164_800_123))
        );
        for bad in [
            "",
            "2024-01-15T10:30:00.245",
            "2024-01-15 10:30:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-15T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "2024-01-15T10:30:00.Z",
            "2024-01-15T10:30:00.1234567890Z",
            "2024-01-15T10:30:00+00:00",
            "２０２４-01-15T10:30:00Z",
            "2024-01-15T10:30:0aZ",
        ] {
            assert_eq!(UnixMillis::parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn rfc3339_roundtrips(ms in 0u64..253_402_300_800_000) {
            let t = UnixMillis(ms);
            prop_assert_eq!(UnixMillis::parse_rfc3339(&t.to_rfc3339()), Some(t));
        }

        #[test]
        fn rfc3339_parse_never_panics(s in "\\PC{0,40}") {
            let _ = UnixMillis::parse_rfc3339(&s);
        }

        #[test]
        fn ratio_json_roundtrips(ppm in any::<u32>()) {
            let r = Ratio(ppm);
            let j = serde_json::to_string(&r).expect("serializes");
            prop_assert_eq!(serde_json::from_str::<Ratio>(&j).expect("parses"), r);
        }
    }

    #[test]
    fn json_renderings() {
        let j = |v: &dyn erased::Ser| v.json();
        assert_eq!(
            j(&UnixMillis(1_705_314_600_245)),
            "\"2024-01-15T10:30:00.245Z\""
        );
        assert_eq!(j(&Ratio(350_000)), "0.35");
        assert_eq!(
            j(&Sha256Digest([0xab; 32])),
            format!("\"sha256:{}\"", "ab".repeat(32))
        );
        assert_eq!(j(&SpanId([1, 2, 3, 4, 5, 6, 7, 8])), "\"0102030405060708\"");
        assert_eq!(j(&EvidenceSeq::FIRST), "1");
        assert_eq!(j(&PriorityClass::Debug), "\"debug\"");
        assert!(serde_json::from_str::<EvidenceSeq>("0").is_err());
        assert!(serde_json::from_str::<Sha256Digest>("\"ab\"").is_err());
        assert!(serde_json::from_str::<Ratio>("-0.5").is_err());
        assert_eq!(
            serde_json::from_str::<Ratio>("1").expect("parses"),
            Ratio(1_000_000)
        );
        assert_eq!(
            serde_json::from_str::<UnixMillis>("1705314600245").expect("parses"),
            UnixMillis(1_705_314_600_245)
        );
    }

    #[test]
    fn postcard_renderings_are_compact() {
        let p = |v: &dyn erased::Ser| v.postcard();
        assert_eq!(p(&UnixMillis(300)), vec![0xac, 0x02]);
        assert_eq!(p(&Ratio(1)), vec![1]);
        assert_eq!(p(&SpanId([9; 8])), vec![9; 8]);
        assert_eq!(p(&ChainHash([7; 32])).len(), 32);
        assert_eq!(p(&PriorityClass::Debug), vec![2]);
        assert!(postcard::from_bytes::<EvidenceSeq>(&[0]).is_err());
    }

    #[test]
    fn ratio_from_counts() {
        assert_eq!(Ratio::from_counts(350, 1000), Ratio(350_000));
        assert_eq!(Ratio::from_counts(1, 3), Ratio(333_333));
        assert_eq!(Ratio::from_counts(5, 0), Ratio(0));
        assert_eq!(Ratio::from_counts(u64::MAX, 1), Ratio(u32::MAX));
    }

    /// Object-safe helpers so the tests above can take mixed types.
    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
            fn postcard(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).expect("serializes")
            }
            fn postcard(&self) -> Vec<u8> {
                postcard::to_allocvec(self).expect("serializes")
            }
        }
    }
}
