//! Units of the netem vocabulary: durations (`50ms`), percentages (`1%`), rates
//! (`1mbit`, `10mbps`), byte sizes (`1200`, `10kb`) and counts.
//!
//! Parsing and formatting only, no I/O. Every `format_*` output parses back to the same
//! value, which is what lets an [`Impairment`](super::Impairment) travel as text (control
//! socket, stats) without losing anything.

use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

/// The largest delay, jitter or schedule time accepted: one hour.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// The largest rate accepted: 10 Tbit/s.
pub const MAX_RATE_BITS: u64 = 10_000_000_000_000;

/// A value that could not be parsed or is out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// The text is not in the expected form.
    #[error("invalid {what} `{text}`: expected {expected}")]
    Invalid {
        /// What was being parsed ("duration", "percentage", ...).
        what: &'static str,
        /// The offending text.
        text: String,
        /// What would have been accepted, with an example.
        expected: &'static str,
    },
    /// The text parsed but the value is outside the accepted range.
    #[error("{what} `{text}` is out of range: {range}")]
    OutOfRange {
        /// What was being parsed.
        what: &'static str,
        /// The offending text.
        text: String,
        /// The accepted range.
        range: &'static str,
    },
}

impl ValueError {
    pub(crate) fn invalid(what: &'static str, text: &str, expected: &'static str) -> Self {
        Self::Invalid {
            what,
            text: text.to_owned(),
            expected,
        }
    }

    fn out_of_range(what: &'static str, text: &str, range: &'static str) -> Self {
        Self::OutOfRange {
            what,
            text: text.to_owned(),
            range,
        }
    }
}

/// Splits `12.5ms` into `(12.5, "ms")`. The number has no sign and no exponent.
fn split_number(text: &str) -> Option<(f64, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some((value, unit))
}

const DURATION_EXPECTED: &str =
    "a number with a unit ns, us, ms, s, m or h, like `50ms`, `1.5s` or `250us`";

/// Parses a duration like `50ms`, `1.5s`, `250us`, `2m`, `1h` (also tc's `msec`, `usec`,
/// `sec`). A unit is required except for `0`. At most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    const WHAT: &str = "duration";
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let (value, unit) =
        split_number(t).ok_or_else(|| ValueError::invalid(WHAT, text, DURATION_EXPECTED))?;
    let nanos_per_unit = match unit.to_ascii_lowercase().as_str() {
        "ns" | "nsec" => 1.0,
        "us" | "usec" | "µs" => 1e3,
        "ms" | "msec" => 1e6,
        "s" | "sec" | "secs" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return Err(ValueError::invalid(WHAT, text, DURATION_EXPECTED)),
    };
    let nanos = (value * nanos_per_unit).round();
    if nanos > MAX_DURATION.as_nanos() as f64 {
        return Err(ValueError::out_of_range(WHAT, text, "at most 1 hour"));
    }
    // In range 0..=3.6e12 by the check above, so the cast is exact.
    Ok(Duration::from_nanos(nanos as u64))
}

/// Formats a duration in the largest unit that represents it exactly (`50ms`, `1s`,
/// `250us`, `7ns`); parses back with [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        "0s".to_owned()
    } else if nanos.is_multiple_of(1_000_000_000) {
        format!("{}s", nanos / 1_000_000_000)
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}ms", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{}us", nanos / 1_000)
    } else {
        format!("{nanos}ns")
    }
}

/// A probability written as a percentage, always in `0..=100`.
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd)]
pub struct Percent(f64);

impl Percent {
    /// Zero percent.
    pub const ZERO: Percent = Percent(0.0);
    /// One hundred percent.
    pub const HUNDRED: Percent = Percent(100.0);

    /// A percentage in `0..=100`.
    pub fn new(percent: f64) -> Result<Self, ValueError> {
        if (0.0..=100.0).contains(&percent) {
            Ok(Self(percent))
        } else {
            Err(ValueError::out_of_range(
                "percentage",
                &format!("{percent}%"),
                "0% to 100%",
            ))
        }
    }

    /// The value in percent, `0..=100`.
    pub fn percent(self) -> f64 {
        self.0
    }

    /// The value as a probability, `0..=1`.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }

    /// True for 0%.
    pub fn is_zero(self) -> bool {
        self.0 == 0.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // f64's Display is the shortest text that parses back to the same value.
        write!(f, "{}%", self.0)
    }
}

impl std::str::FromStr for Percent {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_percent(s)
    }
}

/// Parses a percentage like `1%`, `0.1%` or `100%`. The `%` sign is required.
pub fn parse_percent(text: &str) -> Result<Percent, ValueError> {
    const WHAT: &str = "percentage";
    const EXPECTED: &str = "a number followed by `%`, like `1%` or `0.5%`";
    let t = text.trim();
    let number = t
        .strip_suffix('%')
        .ok_or_else(|| ValueError::invalid(WHAT, text, EXPECTED))?;
    match split_number(number) {
        Some((value, "")) => {
            Percent::new(value).map_err(|_| ValueError::out_of_range(WHAT, text, "0% to 100%"))
        }
        _ => Err(ValueError::invalid(WHAT, text, EXPECTED)),
    }
}

/// A link rate in bits per second, never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(NonZeroU64);

impl Rate {
    /// A rate of `bits` per second; `None` for zero or above [`MAX_RATE_BITS`].
    pub fn bits_per_second(bits: u64) -> Option<Self> {
        if bits > MAX_RATE_BITS {
            return None;
        }
        NonZeroU64::new(bits).map(Self)
    }

    /// The rate in bits per second.
    pub fn bits(self) -> u64 {
        self.0.get()
    }

    /// How long `bytes` take to serialize at this rate.
    pub fn transmit_time(self, bytes: usize) -> Duration {
        let nanos = (bytes as u128 * 8 * 1_000_000_000) / u128::from(self.bits());
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits();
        for (factor, unit) in [
            (1_000_000_000_000, "tbit"),
            (1_000_000_000, "gbit"),
            (1_000_000, "mbit"),
            (1_000, "kbit"),
        ] {
            if bits.is_multiple_of(factor) {
                return write!(f, "{}{unit}", bits / factor);
            }
        }
        write!(f, "{bits}bit")
    }
}

impl std::str::FromStr for Rate {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_rate(s)
    }
}

/// Parses a rate with tc's units: `bit`, `kbit`, `mbit`, `gbit`, `tbit` are bits per
/// second (SI, ×1000; `kibit`, `mibit`, … are ×1024), `bps`, `kbps`, `mbps`, `gbps`,
/// `tbps` are **bytes** per second (`kibps`, … ×1024). A bare number is bits per second.
/// Examples: `1mbit`, `100kbit`, `10mbps` (= 80 Mbit/s).
pub fn parse_rate(text: &str) -> Result<Rate, ValueError> {
    const WHAT: &str = "rate";
    const EXPECTED: &str =
        "a number with a unit bit, kbit, mbit, gbit (bits/s) or bps, kbps, mbps, gbps (bytes/s), like `1mbit`";
    let t = text.trim();
    let (value, unit) = split_number(t).ok_or_else(|| ValueError::invalid(WHAT, text, EXPECTED))?;
    let unit = unit.to_ascii_lowercase();
    let (scale_unit, bits_per_unit) = if let Some(prefix) = unit.strip_suffix("bit") {
        (prefix.to_owned(), 1.0)
    } else if let Some(prefix) = unit.strip_suffix("bps") {
        (prefix.to_owned(), 8.0)
    } else if unit.is_empty() {
        (String::new(), 1.0)
    } else {
        return Err(ValueError::invalid(WHAT, text, EXPECTED));
    };
    let scale: f64 = match scale_unit.as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(ValueError::invalid(WHAT, text, EXPECTED)),
    };
    let bits = (value * scale * bits_per_unit).round();
    if bits < 1.0 || bits > MAX_RATE_BITS as f64 {
        return Err(ValueError::out_of_range(
            WHAT,
            text,
            "at least 1bit and at most 10tbit",
        ));
    }
    // In range 1..=1e13 by the check above, so the cast is exact.
    Rate::bits_per_second(bits as u64)
        .ok_or_else(|| ValueError::out_of_range(WHAT, text, "at least 1bit and at most 10tbit"))
}

/// Parses a byte size: a bare number or `b` is bytes, `kb`/`k` is KiB, `mb`/`m` is MiB
/// (tc's sizes). Examples: `1200`, `1500b`, `10kb`.
pub fn parse_size(text: &str) -> Result<u64, ValueError> {
    const WHAT: &str = "size";
    const EXPECTED: &str = "a number of bytes, optionally with b, kb or mb, like `1200` or `10kb`";
    let t = text.trim();
    let (value, unit) = split_number(t).ok_or_else(|| ValueError::invalid(WHAT, text, EXPECTED))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1024.0,
        "m" | "mb" => 1024.0 * 1024.0,
        _ => return Err(ValueError::invalid(WHAT, text, EXPECTED)),
    };
    let bytes = (value * scale).round();
    if bytes > u32::MAX as f64 {
        return Err(ValueError::out_of_range(WHAT, text, "at most 4gb"));
    }
    // Non-negative and at most u32::MAX by the checks above.
    Ok(bytes as u64)
}

/// Parses an MTU in bytes (a [`parse_size`]), `1..=65535`.
pub fn parse_mtu(text: &str) -> Result<u32, ValueError> {
    let bytes = parse_size(text)?;
    match u32::try_from(bytes) {
        Ok(mtu) if mtu >= 1 && bytes as usize <= super::MAX_DATAGRAM => Ok(mtu),
        _ => Err(ValueError::out_of_range("mtu", text, "1 to 65535 bytes")),
    }
}

/// Parses a token-bucket depth in bytes (a [`parse_size`]), at most 4gb.
pub fn parse_burst(text: &str) -> Result<u32, ValueError> {
    u32::try_from(parse_size(text)?)
        .map_err(|_| ValueError::out_of_range("burst", text, "at most 4gb"))
}

/// Parses a queue limit in datagrams, `1..=1000000`.
pub fn parse_limit(text: &str) -> Result<u32, ValueError> {
    let count = parse_count(text)?;
    match u32::try_from(count) {
        Ok(limit) if (1..=super::MAX_LIMIT).contains(&limit) => Ok(limit),
        _ => Err(ValueError::out_of_range(
            "limit",
            text,
            "1 to 1000000 datagrams",
        )),
    }
}

/// Parses a plain non-negative integer count like `1000`.
pub fn parse_count(text: &str) -> Result<u64, ValueError> {
    text.trim()
        .parse()
        .map_err(|_| ValueError::invalid("count", text, "a whole number like `1000`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("10usec"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_reject_garbage() {
        for bad in [
            "", "50", "ms", "-5ms", "5 ms", "1e3ms", "5xs", "1.2.3s", "2h", "61m", "NaNs",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn durations_round_trip_through_format() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(3),
            Duration::from_millis(50),
            Duration::from_millis(1500),
            Duration::from_micros(250),
            Duration::from_nanos(1_000_007),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("1%").map(Percent::fraction), Ok(0.01));
        assert_eq!(parse_percent("0.1%").map(Percent::percent), Ok(0.1));
        assert_eq!(parse_percent("100%"), Ok(Percent::HUNDRED));
        for bad in ["1", "%", "101%", "-1%", "1 %", "abc%", "1%%"] {
            assert!(parse_percent(bad).is_err(), "{bad:?} should be rejected");
        }
        for p in [0.0, 0.1, 1.0, 33.333, 100.0] {
            let percent = Percent::new(p).expect("in range");
            assert_eq!(parse_percent(&percent.to_string()), Ok(percent));
        }
        assert!(Percent::new(f64::NAN).is_err());
    }

    #[test]
    fn rates_follow_tc_units() {
        let bits = |s: &str| parse_rate(s).map(Rate::bits);
        assert_eq!(bits("1mbit"), Ok(1_000_000));
        assert_eq!(bits("100kbit"), Ok(100_000));
        assert_eq!(bits("10mbps"), Ok(80_000_000));
        assert_eq!(bits("1kibit"), Ok(1024));
        assert_eq!(bits("1.5Mbit"), Ok(1_500_000));
        assert_eq!(bits("800"), Ok(800));
        assert_eq!(bits("1bps"), Ok(8));
        for bad in [
            "",
            "0bit",
            "mbit",
            "5furlongs",
            "1kbitx",
            "0.1bit",
            "11tbit",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} should be rejected");
        }
        for s in ["1mbit", "100kbit", "3bit", "80mbit", "2gbit", "1234567bit"] {
            let rate = parse_rate(s).expect("valid");
            assert_eq!(rate.to_string(), s);
        }
    }

    #[test]
    fn transmit_time_is_size_over_rate() {
        let rate = parse_rate("1mbit").expect("valid");
        assert_eq!(rate.transmit_time(125), Duration::from_millis(1));
        assert_eq!(rate.transmit_time(0), Duration::ZERO);
        let slow = Rate::bits_per_second(1).expect("nonzero");
        assert_eq!(slow.transmit_time(65535), Duration::from_secs(65535 * 8));
    }

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_size("1200"), Ok(1200));
        assert_eq!(parse_size("1500b"), Ok(1500));
        assert_eq!(parse_size("10kb"), Ok(10 * 1024));
        assert!(parse_size("10kbit").is_err());
        assert!(parse_size("99999mb").is_err());
        assert_eq!(parse_count("1000"), Ok(1000));
        assert_eq!(parse_mtu("1200"), Ok(1200));
        assert!(parse_mtu("64kb").is_err(), "65536 bytes is one too many");
        assert_eq!(parse_mtu("65535"), Ok(65535));
        assert!(parse_mtu("0").is_err());
        assert_eq!(parse_burst("10kb"), Ok(10240));
        assert_eq!(parse_limit("1"), Ok(1));
        assert!(parse_limit("0").is_err());
        assert!(parse_limit("1000001").is_err());
        assert!(parse_count("-1").is_err());
        assert!(parse_count("1k").is_err());
    }
}
