//! The survival horizon: how long this spoke can keep serving its store as
//! it does now if the hub stayed out of reach from this moment.
//!
//! What it is: a pure function over the budgets that run out while the hub
//! is unreachable, and a rate meter for the evidence buffer's fill rate.
//! Who drives it: `status`, `/metrics` and the report the control session
//! sends the hub compute it on demand from the credentials, the buffer and
//! the trusted clock. What it must not do: read clocks or files (time and
//! figures are passed in).
//!
//! | budget | runs out when |
//! | --- | --- |
//! | `node_ca` | the node CA expires: no more workload SVIDs, so no new mTLS |
//! | `max_offline` | the hub's max-offline window since the last contact closes: the node key alone no longer re-establishes the spoke (a new join token is needed) |
//! | `evidence_buffer` | the evidence buffer fills at the current append rate: request records start being shed |
//! | `time_drift` | monotonic drift since the last hub time anchor exceeds the bound, so issued certificates may be refused by peers with good clocks |
//!
//! The horizon is the smallest budget; the limit names it. A budget that
//! does not run out at the current rate (no appends) is `None`.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde::Serialize;

/// What the horizon is computed from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Trusted now.
    pub now: Option<SystemTime>,
    /// Expiry of the node CA (`None`: the spoke has none).
    pub node_ca_not_after: Option<SystemTime>,
    /// Last contact with the hub (now when connected).
    pub last_contact: Option<SystemTime>,
    /// The hub's max-offline window (`None`: unknown yet).
    pub max_offline: Option<Duration>,
    /// Evidence buffer bound and use, and the append rate in bytes/s.
    pub evidence: Option<(u64, u64, f64)>,
    /// Time until trusted-time drift reaches its bound.
    pub drift_budget: Option<Duration>,
}

/// The horizon and its budgets.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Horizon {
    /// Seconds until the first budget runs out (`None`: none is bounded).
    pub survival_horizon_s: Option<u64>,
    /// The budget that runs out first.
    pub survival_limit: &'static str,
    /// Every budget, seconds (`None`: not bounded at the current rate).
    pub survival_budgets: BTreeMap<&'static str, Option<u64>>,
}

fn until(now: SystemTime, t: SystemTime) -> u64 {
    t.duration_since(now).map(|d| d.as_secs()).unwrap_or(0)
}

/// Computes the horizon.
pub fn horizon(i: &Inputs) -> Horizon {
    let now = i.now.unwrap_or(SystemTime::UNIX_EPOCH);
    let mut budgets: BTreeMap<&'static str, Option<u64>> = BTreeMap::new();
    budgets.insert(
        "node_ca",
        Some(i.node_ca_not_after.map_or(0, |t| until(now, t))),
    );
    budgets.insert(
        "max_offline",
        match (i.last_contact, i.max_offline) {
            (Some(c), Some(w)) => Some(until(now, c + w)),
            _ => None,
        },
    );
    budgets.insert(
        "evidence_buffer",
        i.evidence.and_then(|(capacity, used, rate)| {
            (rate > 0.0).then(|| (capacity.saturating_sub(used) as f64 / rate) as u64)
        }),
    );
    budgets.insert("time_drift", i.drift_budget.map(|d| d.as_secs()));
    let (limit, horizon) = budgets
        .iter()
        .filter_map(|(k, v)| v.map(|v| (*k, v)))
        // ties: the order of the table in the module docs
        .min_by_key(|(k, v)| {
            let rank = ["node_ca", "max_offline", "evidence_buffer", "time_drift"]
                .iter()
                .position(|x| x == k)
                .unwrap_or(9);
            (*v, rank)
        })
        .map_or(("none", None), |(k, v)| (k, Some(v)));
    Horizon {
        survival_horizon_s: horizon,
        survival_limit: limit,
        survival_budgets: budgets,
    }
}

/// The evidence buffer's append rate, bytes per second: an exponentially
/// weighted mean over about five minutes of samples of the committed
/// sequence number and the held bytes per record.
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    last: Option<(tokio::time::Instant, u64)>,
    bytes_per_record: f64,
    rate: f64,
}

/// Time constant of the meter.
const TAU: Duration = Duration::from_secs(300);
/// Bytes per record assumed before any is held (a seed-shaped request record).
const DEFAULT_RECORD_BYTES: f64 = 480.0;

impl RateMeter {
    /// Adds a sample: the last committed sequence number and the buffer's
    /// held records and bytes, at `now`.
    pub fn sample(
        &mut self,
        now: tokio::time::Instant,
        committed_seq: u64,
        pending_records: u64,
        pending_bytes: u64,
    ) {
        if pending_records > 0 {
            self.bytes_per_record = pending_bytes as f64 / pending_records as f64;
        } else if self.bytes_per_record == 0.0 {
            self.bytes_per_record = DEFAULT_RECORD_BYTES;
        }
        if let Some((t, seq)) = self.last {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            if dt > 0.0 {
                let inst = committed_seq.saturating_sub(seq) as f64 / dt * self.bytes_per_record;
                let alpha = 1.0 - (-dt / TAU.as_secs_f64()).exp();
                self.rate += alpha * (inst - self.rate);
            }
        }
        self.last = Some((now, committed_seq));
    }

    /// The current estimate, bytes per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    const T: u64 = 1_800_000_000;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn the_smallest_budget_is_the_horizon_and_names_the_limit() {
        let h = horizon(&Inputs {
            now: Some(at(T)),
            node_ca_not_after: Some(at(T + 20 * 86_400)),
            last_contact: Some(at(T - 86_400)),
            max_offline: Some(Duration::from_secs(30 * 86_400)),
            evidence: Some((1_000_000, 0, 0.0)),
            drift_budget: Some(Duration::from_secs(3_000_000)),
        });
        assert_eq!(h.survival_horizon_s, Some(20 * 86_400));
        assert_eq!(h.survival_limit, "node_ca");
        assert_eq!(h.survival_budgets["max_offline"], Some(29 * 86_400));
        assert_eq!(h.survival_budgets["evidence_buffer"], None);

        let h = horizon(&Inputs {
            evidence: Some((1_000_000, 400_000, 10.0)),
            ..Inputs {
                now: Some(at(T)),
                node_ca_not_after: Some(at(T + 20 * 86_400)),
                ..Default::default()
            }
        });
        assert_eq!(h.survival_limit, "evidence_buffer");
        assert_eq!(h.survival_horizon_s, Some(60_000));
    }

    #[test]
    fn no_node_ca_means_no_horizon_left() {
        let h = horizon(&Inputs {
            now: Some(at(T)),
            ..Default::default()
        });
        assert_eq!(h.survival_horizon_s, Some(0));
        assert_eq!(h.survival_limit, "node_ca");
    }

    #[tokio::test(start_paused = true)]
    async fn the_meter_converges_on_a_steady_rate() {
        let mut m = RateMeter::default();
        let t0 = tokio::time::Instant::now();
        // 100 records/s of 500 bytes, sampled every 10 s for an hour.
        for i in 0..=360u64 {
            m.sample(t0 + Duration::from_secs(10 * i), 1000 * i, 5000, 2_500_000);
        }
        let r = m.bytes_per_s();
        assert!((r - 50_000.0).abs() < 500.0, "{r}");
        // stops: decays towards zero
        for i in 361..=720u64 {
            m.sample(t0 + Duration::from_secs(10 * i), 360_000, 5000, 2_500_000);
        }
        assert!(m.bytes_per_s() < 100.0, "{}", m.bytes_per_s());
    }
}
