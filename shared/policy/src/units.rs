//! Small value types the config is written in: durations, ratios, names and
//! hosts, each parsed once at the config boundary.
//!
//! What it is: the parsers and canonical spellings shared by [`crate::istio`]
//! (input and output) and [`crate::model`]. Who drives it: the config layer.
//! What it must not do: accept two spellings that print differently without
//! saying so; every value here has one canonical spelling, so that a config
//! printed with [`crate::MeshConfig::to_yaml`] parses back to the same value.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A fraction between 0 and 1, held in basis points (1/10,000) so that it is
/// exact, comparable and compact on the wire.
///
/// Written in config as a number between `0` and `1` (`0.5` = 50 %).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ratio(u16);

impl Ratio {
    /// 0 %.
    pub const ZERO: Ratio = Ratio(0);
    /// 100 %.
    pub const ONE: Ratio = Ratio(10_000);

    /// A ratio from basis points; `None` above 10,000.
    pub const fn from_basis_points(bp: u16) -> Option<Ratio> {
        if bp <= 10_000 {
            Some(Ratio(bp))
        } else {
            None
        }
    }

    /// A ratio from a whole percentage; `None` above 100.
    pub const fn from_percent(p: u8) -> Option<Ratio> {
        if p <= 100 {
            Some(Ratio(p as u16 * 100))
        } else {
            None
        }
    }

    /// A ratio from a whole percentage, capped at 100 (for constants).
    pub const fn percent(p: u8) -> Ratio {
        let p = if p > 100 { 100 } else { p };
        Ratio(p as u16 * 100)
    }

    /// Parses a number between 0 and 1, rounded to the nearest basis point.
    pub fn from_f64(v: f64) -> Result<Ratio, String> {
        if !v.is_finite() || !(0.0..=1.0).contains(&v) {
            return Err(format!("must be a number between 0 and 1, got {v}"));
        }
        // In range [0, 10000] after the check above, so the cast is exact.
        Ok(Ratio((v * 10_000.0).round() as u16))
    }

    /// The ratio in basis points (0..=10,000).
    pub const fn basis_points(self) -> u16 {
        self.0
    }

    /// The ratio as a number between 0 and 1.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_f64())
    }
}

/// Parses a Go/Istio style duration: one or more `<decimal><unit>` terms with
/// units `h`, `m`, `s`, `ms`, `us` (or `µs`) and `ns`, e.g. `30s`, `1.5s`,
/// `1m30s`, `250ms`. The result must be a whole number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let input = s.trim();
    if input.is_empty() {
        return Err("empty duration: write e.g. \"30s\" or \"250ms\"".into());
    }
    if input == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = input;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!(
                "invalid duration {input:?}: expected a number before the unit, e.g. \"30s\""
            ));
        }
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            "" => {
                return Err(format!(
                    "invalid duration {input:?}: missing unit (h, m, s, ms, us, ns)"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {input:?}: unknown unit {other:?} (use h, m, s, ms, us, ns)"
                ))
            }
        };
        let (int_part, frac_part) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
            return Err(format!("invalid duration {input:?}: bad number {num:?}"));
        }
        if int_part.len() > 12 || frac_part.len() > 9 {
            return Err(format!(
                "invalid duration {input:?}: number {num:?} is too long"
            ));
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| format!("invalid duration {input:?}: bad number {num:?}"))?
        };
        let mut term = int * unit_nanos;
        if !frac_part.is_empty() {
            let frac: u128 = frac_part
                .parse()
                .map_err(|_| format!("invalid duration {input:?}: bad number {num:?}"))?;
            let scale = 10u128.pow(frac_part.len() as u32);
            let frac_nanos = frac * unit_nanos;
            if !frac_nanos.is_multiple_of(scale) {
                return Err(format!(
                    "invalid duration {input:?}: finer than one nanosecond"
                ));
            }
            term += frac_nanos / scale;
        }
        total_nanos += term;
        rest = next;
    }
    if !total_nanos.is_multiple_of(1_000_000) {
        return Err(format!(
            "invalid duration {input:?}: must be a whole number of milliseconds"
        ));
    }
    let millis = total_nanos / 1_000_000;
    // Ten years is far beyond any timeout or window this config describes.
    if millis > 10 * 365 * 24 * 3_600_000 {
        return Err(format!("invalid duration {input:?}: longer than ten years"));
    }
    Ok(Duration::from_millis(millis as u64))
}

/// The canonical spelling of a duration produced by [`parse_duration`]:
/// the largest of `h`, `m`, `s` that divides it exactly, else `ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// Checks a Kubernetes object name (DNS-1123 subdomain: lowercase letters,
/// digits, `-` and `.`, starting and ending alphanumeric, at most 253 bytes).
pub fn check_object_name(name: &str) -> Result<(), String> {
    check_dns_name(name, 253, true)
}

/// Checks a namespace or store name (DNS-1123 label: lowercase letters,
/// digits and `-`, starting and ending alphanumeric, at most 63 bytes).
pub fn check_label_name(name: &str) -> Result<(), String> {
    check_dns_name(name, 63, false)
}

fn check_dns_name(name: &str, max: usize, dots: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > max {
        return Err(format!(
            "{name:?} is {} bytes long; the maximum is {max}",
            name.len()
        ));
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if let Some(c) = name.chars().find(|c| !ok_char(*c)) {
        let allowed = if dots {
            "lowercase letters, digits, '-' and '.'"
        } else {
            "lowercase letters, digits and '-'"
        };
        return Err(format!(
            "{name:?} contains {c:?}; only {allowed} are allowed"
        ));
    }
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_last_ok(name.chars().next()) || !first_last_ok(name.chars().last()) {
        return Err(format!(
            "{name:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// The suffix Kubernetes-style service hosts may carry; it is dropped so that
/// `reviews.shop.svc.cluster.local` and `reviews.shop` name one service.
const CLUSTER_SUFFIX: &str = ".svc.cluster.local";

/// Resolves a host as written in a resource of `namespace` to its canonical
/// service host, the key services are known by everywhere in tidemesh:
/// a short name (`reviews`) becomes `reviews.<namespace>`; a trailing
/// `.svc.cluster.local` is dropped; anything else (`api.example.com`,
/// `payment-service.remote-cluster.global`) is kept as written, lowercase.
pub fn canonical_host(host: &str, namespace: &str) -> Result<String, String> {
    let mut h = host.trim_end_matches('.').to_ascii_lowercase();
    if h.is_empty() {
        return Err("host must not be empty".into());
    }
    if h.contains('*') {
        return Err(format!(
            "wildcard host {host:?} is not supported by tidemesh: name one service"
        ));
    }
    if h.len() > 253 {
        return Err(format!("host {host:?} is longer than 253 bytes"));
    }
    if let Some(c) = h
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Err(format!(
            "host {host:?} contains {c:?}; hosts are DNS names (letters, digits, '-', '.')"
        ));
    }
    if h.split('.').any(str::is_empty) {
        return Err(format!("host {host:?} has an empty label"));
    }
    if let Some(stripped) = h.strip_suffix(CLUSTER_SUFFIX) {
        h = stripped.to_string();
    }
    if !h.contains('.') {
        h = format!("{h}.{namespace}");
    }
    Ok(h)
}

/// Checks `host:port` (a DNS name or IPv4 address, or `[IPv6]`, and a port).
pub fn check_address(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("address {addr:?} must be host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address {addr:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("address {addr:?}: port must not be 0"));
    }
    check_host_or_ip(host).map_err(|e| format!("address {addr:?}: {e}"))
}

/// Checks a bare host: a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn check_host_or_ip(host: &str) -> Result<(), String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("{host:?} is not an IPv6 address"));
    }
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(());
    }
    if host.is_empty() || host.len() > 253 {
        return Err("host must be 1 to 253 bytes".into());
    }
    let ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok || host.split('.').any(str::is_empty) {
        return Err(format!("{host:?} is not a DNS name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        let ms = |v| Duration::from_millis(v);
        assert_eq!(parse_duration("30s"), Ok(ms(30_000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("2h"), Ok(ms(7_200_000)));
        assert_eq!(parse_duration("1000us"), Ok(ms(1)));
        assert_eq!(parse_duration("0"), Ok(ms(0)));
        assert!(parse_duration("1").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5.5s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("1us").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn durations_print_canonically_and_round_trip() {
        for s in ["30s", "1m", "1h", "1500ms", "0s", "90s"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn ratios() {
        assert_eq!(Ratio::from_f64(0.5), Ok(Ratio(5000)));
        assert!(Ratio::from_f64(1.5).is_err());
        assert!(Ratio::from_f64(f64::NAN).is_err());
        assert_eq!(Ratio::from_percent(30).map(Ratio::as_f64), Some(0.3));
    }

    #[test]
    fn hosts_resolve_relative_to_the_namespace() {
        assert_eq!(canonical_host("reviews", "shop").unwrap(), "reviews.shop");
        assert_eq!(
            canonical_host("reviews.shop.svc.cluster.local", "other").unwrap(),
            "reviews.shop"
        );
        assert_eq!(
            canonical_host("Payment-Service.remote-cluster.global", "x").unwrap(),
            "payment-service.remote-cluster.global"
        );
        assert!(canonical_host("*.example.com", "x").is_err());
        assert!(canonical_host("a..b", "x").is_err());
        assert!(canonical_host("a/b", "x").is_err());
    }

    #[test]
    fn names_and_addresses() {
        assert!(check_object_name("payment-service.v1").is_ok());
        assert!(check_object_name("Payment").is_err());
        assert!(check_label_name("sf01").is_ok());
        assert!(check_label_name("sf.01").is_err());
        assert!(check_label_name("-a").is_err());
        assert!(check_address("127.0.0.1:8080").is_ok());
        assert!(check_address("[::1]:8080").is_ok());
        assert!(check_address("pos.local:80").is_ok());
        assert!(check_address("pos.local").is_err());
        assert!(check_address("pos.local:0").is_err());
        assert!(check_address(":80").is_err());
    }
}
