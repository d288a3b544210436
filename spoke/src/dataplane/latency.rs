//! Request latency histograms and request totals by response code for
//! `/metrics` (`tidemesh_spoke_request_duration_seconds`,
//! `tidemesh_spoke_requests_total`), per destination service, direction and
//! locality tier; both carry the spoke's `store`.
//!
//! Who drives it: every request record the data plane writes
//! ([`super::Shared::record`]) observes its end-to-end duration and its
//! status code once; the metrics page reads a snapshot. What it must not
//! do: grow without bound: service names come from apps' requests, so past
//! [`MAX_SERIES`] distinct series new services are counted under
//! `service="_other"`; codes are the exact three digits of a valid HTTP
//! status (100..=599), `none` when no response was sent, and past
//! [`MAX_CODE_SERIES`] (service, code) pairs new ones fold into
//! `service="_other",code="other"`.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
};

use tidemesh_evidence::record::{EnforcementPoint, Locality, RequestEvidence};
use tidemesh_net::metrics::{Exposition, Kind};

/// Upper bounds of the buckets, seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Most (service, direction, tier) series kept; more go to `_other`.
pub const MAX_SERIES: usize = 256;
/// The service label of requests past [`MAX_SERIES`].
pub const OTHER: &str = "_other";
/// Most (service, direction, tier, code) series of the request totals.
pub const MAX_CODE_SERIES: usize = 1024;

/// The `code` label of a request: the exact status (`"200"`, `"503"`),
/// `none` when no response was sent, `other` for a number that is not an
/// HTTP status. No allocation: the label of every valid status is made once
/// per process.
pub fn code_label(status: Option<u16>) -> &'static str {
    static CODES: OnceLock<Vec<String>> = OnceLock::new();
    match status {
        None => "none",
        Some(c) if (100..=599).contains(&c) => CODES
            .get_or_init(|| (100..=599u16).map(|c| c.to_string()).collect())
            .get(usize::from(c - 100))
            .map_or("other", String::as_str),
        Some(_) => "other",
    }
}

#[derive(Debug, Default, Clone)]
struct Hist {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// (direction, tier) of a series within its service.
type SeriesKey = (&'static str, &'static str);

/// (direction, tier, code) of a request total within its service.
type CodeKey = (&'static str, &'static str, &'static str);

/// Both families, keyed by service first so that a request of a known
/// series is counted without allocating (one lock per request).
#[derive(Debug, Default)]
struct Families {
    series: BTreeMap<String, BTreeMap<SeriesKey, Hist>>,
    /// (service, direction, tier) series in `series`.
    n_series: usize,
    codes: BTreeMap<String, BTreeMap<CodeKey, u64>>,
    /// (service, direction, tier, code) series in `codes`.
    n_codes: usize,
}

/// The histograms (see the module docs).
#[derive(Debug, Default)]
pub struct Latency {
    families: Mutex<Families>,
}

/// The `tier` label of a request: where the endpoint it went to is
/// (`local`, `same_site`, `cloud`), `none` when no endpoint was chosen
/// (denied, rate limited, no endpoint) or it was served inbound.
pub fn tier(ev: &RequestEvidence) -> &'static str {
    match ev.routing_decision.as_ref().and_then(|r| r.locality) {
        Some(Locality::Local) => "local",
        Some(Locality::SameZone) => "same_site",
        Some(Locality::SameRegion | Locality::OtherRegion) => "cloud",
        None => "none",
    }
}

/// The `direction` label: `outbound` (an app's call) or `inbound` (a call
/// to an app of this spoke).
pub fn direction(ev: &RequestEvidence) -> &'static str {
    match ev.enforcement_point {
        EnforcementPoint::SidecarOutbound => "outbound",
        EnforcementPoint::SidecarInbound => "inbound",
    }
}

impl Latency {
    /// Counts one request of `service` answered with `status` (`None`: no
    /// response sent) that took `seconds`.
    pub fn observe(
        &self,
        service: &str,
        direction: &'static str,
        tier: &'static str,
        status: Option<u16>,
        seconds: f64,
    ) {
        let Ok(mut g) = self.families.lock() else {
            return;
        };
        let Families {
            series,
            n_series,
            codes,
            n_codes,
        } = &mut *g;
        let key = (direction, tier);
        let known = series.get(service).is_some_and(|m| m.contains_key(&key));
        let service = if known || *n_series < MAX_SERIES {
            service
        } else {
            OTHER
        };
        let code = code_label(status);
        let code_key = (direction, tier, code);
        let known_code = codes
            .get(service)
            .is_some_and(|m| m.contains_key(&code_key));
        let (code_service, code_key) = if known_code || *n_codes < MAX_CODE_SERIES {
            (service, code_key)
        } else {
            (OTHER, (direction, tier, "other"))
        };
        let by_code = match codes.get_mut(code_service) {
            Some(m) => m,
            None => codes.entry(code_service.to_owned()).or_default(),
        };
        *by_code.entry(code_key).or_insert_with(|| {
            *n_codes += 1;
            0
        }) += 1;
        let by_key = match series.get_mut(service) {
            Some(m) => m,
            None => series.entry(service.to_owned()).or_default(),
        };
        let h = by_key.entry(key).or_insert_with(|| {
            *n_series += 1;
            Hist::default()
        });
        h.count += 1;
        h.sum += seconds;
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            h.buckets[i] += 1;
        }
    }

    /// Writes both families (one histogram per series, one counter per
    /// series and code), labelled with this spoke's `store`.
    pub fn write(&self, e: &mut Exposition, store: &str) {
        let (codes, snapshot): (Vec<_>, Vec<_>) = match self.families.lock() {
            Ok(g) => (
                g.codes
                    .iter()
                    .flat_map(|(svc, m)| {
                        m.iter()
                            .map(move |((d, t, c), n)| ((svc.clone(), *d, *t, *c), *n))
                    })
                    .collect(),
                g.series
                    .iter()
                    .flat_map(|(svc, m)| {
                        m.iter()
                            .map(move |((d, t), h)| ((svc.clone(), *d, *t), h.clone()))
                    })
                    .collect(),
            ),
            Err(_) => (Vec::new(), Vec::new()),
        };
        let fam = e.family(
            "tidemesh_spoke_requests_total",
            Kind::Counter,
            "Requests the spoke answered, by destination service, direction, locality tier of the chosen endpoint and exact response code (none: no response sent).",
        );
        for ((service, direction, tier, code), n) in &codes {
            fam.sample(
                &[
                    ("store", store),
                    ("service", service),
                    ("direction", direction),
                    ("tier", tier),
                    ("code", code),
                ],
                *n as f64,
            );
        }
        let fam = e.family(
            "tidemesh_spoke_request_duration_seconds",
            Kind::Histogram,
            "End-to-end duration of requests the spoke answered, by destination service, direction (outbound: an app's call; inbound: a call to an app here) and locality tier of the chosen endpoint (local, same_site, cloud; none when none was chosen).",
        );
        for ((service, direction, tier), h) in &snapshot {
            let mut cumulative = 0;
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .zip(h.buckets)
                .map(|(le, n)| {
                    cumulative += n;
                    (*le, cumulative)
                })
                .collect();
            fam.histogram(
                &[
                    ("store", store),
                    ("service", service),
                    ("direction", direction),
                    ("tier", tier),
                ],
                &buckets,
                h.count,
                h.sum,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_series_bounded() {
        let l = Latency::default();
        l.observe("inventory.store", "outbound", "local", Some(200), 0.0004);
        l.observe("inventory.store", "outbound", "local", Some(503), 0.02);
        l.observe("inventory.store", "outbound", "local", Some(200), 60.0);
        let mut e = Exposition::new();
        l.write(&mut e, "s1");
        let page = e.finish();
        let labels =
            "store=\"s1\",service=\"inventory.store\",direction=\"outbound\",tier=\"local\"";
        for (code, n) in [("200", 2), ("503", 1)] {
            let line = format!("tidemesh_spoke_requests_total{{{labels},code=\"{code}\"}} {n}\n");
            assert!(page.contains(&line), "{line} in {page}");
        }
        for (le, n) in [
            ("0.001", 1),
            ("0.01", 1),
            ("0.025", 2),
            ("30", 2),
            ("+Inf", 3),
        ] {
            let line = format!(
                "tidemesh_spoke_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n"
            );
            assert!(page.contains(&line), "{line} in {page}");
        }
        assert!(page.contains(&format!(
            "tidemesh_spoke_request_duration_seconds_count{{{labels}}} 3\n"
        )));
        for i in 0..MAX_SERIES + 10 {
            l.observe(&format!("svc{i}"), "outbound", "cloud", Some(200), 0.1);
        }
        let n = l.families.lock().map(|g| g.n_series).unwrap_or(0);
        assert!(n <= MAX_SERIES + 1, "{n} series");
        // every code of every service: the totals stay bounded too
        for c in 100..=599 {
            l.observe("svc1", "outbound", "cloud", Some(c), 0.1);
            l.observe("svc2", "outbound", "cloud", Some(c), 0.1);
            l.observe("svc3", "outbound", "cloud", Some(c), 0.1);
        }
        let n = l.families.lock().map(|g| g.n_codes).unwrap_or(0);
        assert!(n <= MAX_CODE_SERIES + 1, "{n} code series");
        let mut e = Exposition::new();
        l.write(&mut e, "s1");
        let page = e.finish();
        assert!(page.contains("service=\"_other\""));
        assert!(page
            .contains("service=\"_other\",direction=\"outbound\",tier=\"cloud\",code=\"other\""));
    }

    #[test]
    fn code_labels_are_exact_statuses_or_a_fixed_word() {
        assert_eq!(code_label(Some(200)), "200");
        assert_eq!(code_label(Some(503)), "503");
        assert_eq!(code_label(None), "none");
        assert_eq!(code_label(Some(0)), "other");
        assert_eq!(code_label(Some(600)), "other");
        assert_eq!(code_label(Some(99)), "other");
    }
}
