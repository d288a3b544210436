//! Reconnect pacing of the control session: exponential backoff with full
//! jitter, and the hub's retry-after when it is over its new-session budget.
//!
//! Driven by the session loop in `Spoke::run`: one `next_delay` per failed
//! or lost session, `reset` once a session is up. Sans-IO: the random draw
//! is passed in (`unit` in `[0, 1)`), the delay comes out; no clock, no
//! sleeping here. It must not synchronise spokes: every delay it returns
//! is spread by the draw, so a fleet that lost the hub at the same moment
//! does not come back at the same moment.

use std::time::Duration;

/// Why the last session attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Lost or could not be set up (hub down, network, refused at the
    /// QUIC level): exponential backoff.
    Lost,
    /// The hub is over its new-session budget and named when to come back.
    Busy {
        /// The hub's retry-after.
        retry_after: Duration,
    },
}

/// Backoff state: the number of failures since the last session that came up.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// `min`: the ceiling after the first failure; `max`: the largest ceiling.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// A session came up: the next failure starts from `min` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// The ceiling of the next exponential delay.
    fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.failures.min(20);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// How long to wait before the next attempt after `failure`; `unit` is
    /// a uniform draw from `[0, 1)`.
    ///
    /// - `Lost`: full jitter, uniform in `[0, min(max, min · 2^n))` for the
    ///   n-th failure in a row.
    /// - `Busy`: the hub's retry-after plus a jitter of up to a quarter of
    ///   it (at least up to `min`), so the slots the hub handed out stay
    ///   spread; the exponential state is left as it was (the hub answered).
    pub(crate) fn next_delay(&mut self, failure: Failure, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        match failure {
            Failure::Lost => {
                let d = self.ceiling().mul_f64(unit);
                self.failures = self.failures.saturating_add(1);
                d
            }
            Failure::Busy { retry_after } => {
                let spread = (retry_after / 4).max(self.min);
                retry_after.saturating_add(spread.mul_f64(unit))
            }
        }
    }
}

/// `enroll --wait`: after the hub answered busy, when to ask again, or
/// that it is time to give up. The hub's retry-after is honoured with
/// jitter ([`Backoff::next_delay`]); at most `max_attempts` waits, and
/// never one that would end past the caller's deadline.
#[derive(Debug, Clone)]
pub(crate) struct EnrollWait {
    backoff: Backoff,
    waits: u32,
    max_waits: u32,
}

impl EnrollWait {
    /// At most `max_waits` waits.
    pub(crate) fn new(max_waits: u32) -> Self {
        Self {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            waits: 0,
            max_waits,
        }
    }

    /// The wait after a busy answer with `retry_after` when `remaining`
    /// is left of the deadline (`unit`: a uniform draw from `[0, 1)`);
    /// `None`: give up.
    pub(crate) fn after_busy(
        &mut self,
        retry_after: Duration,
        unit: f64,
        remaining: Duration,
    ) -> Option<Duration> {
        if self.waits >= self.max_waits {
            return None;
        }
        let d = self.backoff.next_delay(Failure::Busy { retry_after }, unit);
        if d > remaining {
            return None;
        }
        self.waits += 1;
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_wait_honours_retry_after_with_jitter_within_its_bounds() {
        let mut w = EnrollWait::new(3);
        let long = Duration::from_secs(600);
        // retry-after plus up to a quarter of it
        assert_eq!(w.after_busy(4000 * MS, 0.0, long), Some(4000 * MS));
        assert_eq!(w.after_busy(4000 * MS, 0.5, long), Some(4500 * MS));
        // a wait that would pass the deadline: give up (and it does not
        // count as an attempt)
        assert_eq!(w.after_busy(4000 * MS, 1.0, 4999 * MS), None);
        assert_eq!(w.after_busy(4000 * MS, 1.0, 5000 * MS), Some(5000 * MS));
        // attempts used up
        assert_eq!(w.after_busy(MS, 0.0, long), None);
        // a short retry-after is still spread by at least 200 ms
        let mut w = EnrollWait::new(10);
        assert_eq!(w.after_busy(100 * MS, 1.0, long), Some(300 * MS));
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn lost_sessions_back_off_exponentially_under_the_cap_with_full_jitter() {
        let mut b = Backoff::new(200 * MS, 30_000 * MS);
        // the top of the jitter range doubles up to the cap
        let tops: Vec<Duration> = (0..12).map(|_| b.next_delay(Failure::Lost, 1.0)).collect();
        assert_eq!(
            tops,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000, 30000]
                .map(|ms| ms * MS)
        );
        // the bottom is zero: full jitter
        let mut b = Backoff::new(200 * MS, 30_000 * MS);
        assert_eq!(b.next_delay(Failure::Lost, 0.0), Duration::ZERO);
        b.reset();
        assert_eq!(b.next_delay(Failure::Lost, 0.5), 100 * MS);
    }

    #[test]
    fn many_spokes_losing_the_hub_together_spread_their_attempts() {
        // 1,000 spokes, third failure in a row each, draws spread over [0, 1)
        let n = 1000;
        let mut delays: Vec<Duration> = (0..n)
            .map(|i| {
                let mut b = Backoff::new(200 * MS, 30_000 * MS);
                b.next_delay(Failure::Lost, 0.3);
                b.next_delay(Failure::Lost, 0.7);
                b.next_delay(Failure::Lost, (i as f64 + 0.5) / n as f64)
            })
            .collect();
        delays.sort();
        // no 10 ms window holds more than a dozen of them (800 ms / 1000)
        let worst = delays
            .iter()
            .map(|d| {
                delays
                    .iter()
                    .filter(|e| **e >= *d && **e < *d + 10 * MS)
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(worst <= 13, "{worst} attempts within 10 ms");
    }

    #[test]
    fn busy_honours_the_retry_after_with_jitter_and_keeps_the_backoff() {
        let mut b = Backoff::new(200 * MS, 30_000 * MS);
        b.next_delay(Failure::Lost, 0.5);
        let ra = 8_000 * MS;
        let lo = b.next_delay(Failure::Busy { retry_after: ra }, 0.0);
        let hi = b.next_delay(Failure::Busy { retry_after: ra }, 1.0);
        assert_eq!(lo, ra, "never earlier than the hub asked");
        assert_eq!(hi, ra + 2_000 * MS, "at most a quarter later");
        // a tiny retry-after is still spread over at least `min`
        assert_eq!(
            b.next_delay(
                Failure::Busy {
                    retry_after: 10 * MS
                },
                1.0
            ),
            210 * MS
        );
        // the exponential state was left where it was: second failure
        assert_eq!(b.next_delay(Failure::Lost, 1.0), 400 * MS);
    }

    #[test]
    fn bad_draws_and_extreme_settings_do_not_panic() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 2), 10 * MS);
        for u in [f64::NAN, f64::INFINITY, -1.0, 2.0] {
            let _ = b.next_delay(Failure::Lost, u);
        }
        for _ in 0..100 {
            let _ = b.next_delay(Failure::Lost, 0.9);
        }
        let _ = b.next_delay(
            Failure::Busy {
                retry_after: Duration::MAX / 2,
            },
            0.9,
        );
    }
}
