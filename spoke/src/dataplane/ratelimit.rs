//! The local rate limiter: a token bucket per workload (Envoy's
//! `local_ratelimit`), refilled continuously.
//!
//! What it is: a plain type driven by [`TokenBucket::handle_request`] with
//! the time passed in; it answers admit or refuse with the `retry-after` to
//! send, and the evidence of the check. Who drives it: the inbound path,
//! once per request delivered to a workload that declares `rate_limit`.
//! What it must not do: read a clock, sleep, or lock (the caller holds it).

use std::time::{Duration, Instant};

use tidemesh_evidence::record::{RateDecision, RateLimitEvidence};
use tidemesh_policy::model::RateLimit;

/// Fixed point: one token is this many micro-tokens.
const MICRO: u64 = 1_000_000;

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Capacity in micro-tokens.
    capacity: u64,
    /// Micro-tokens added per second.
    rate: u64,
    /// Micro-tokens now (as of `last`).
    level: u64,
    last: Option<Instant>,
    /// Requests admitted in the current one-second window, and the one before.
    window_start: Option<Instant>,
    window_count: u32,
    last_window_count: u32,
    limit_rps: u32,
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// When refused: how long until a token is back (rounded up to whole
    /// seconds for `retry-after`, at least 1).
    pub retry_after: Option<Duration>,
    /// The evidence of this check.
    pub evidence: RateLimitEvidence,
}

impl TokenBucket {
    /// A full bucket for `limit` (`max_tokens` capacity, `tokens_per_fill`
    /// per `fill_interval`, spread evenly).
    pub fn new(limit: RateLimit) -> TokenBucket {
        let interval_us = (limit.fill_interval.as_micros() as u64).max(1);
        // tokens_per_fill / interval, in micro-tokens per second.
        let rate = (u128::from(limit.tokens_per_fill) * u128::from(MICRO) * 1_000_000
            / u128::from(interval_us))
        .min(u128::from(u64::MAX)) as u64;
        let capacity = u64::from(limit.max_tokens.max(1)) * MICRO;
        TokenBucket {
            capacity,
            rate: rate.max(1),
            level: capacity,
            last: None,
            window_start: None,
            window_count: 0,
            last_window_count: 0,
            limit_rps: (rate / MICRO).min(u64::from(u32::MAX)) as u32,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_micros() as u64;
            let add = (u128::from(dt) * u128::from(self.rate) / 1_000_000) as u64;
            self.level = self.level.saturating_add(add).min(self.capacity);
        }
        self.last = Some(now);
    }

    fn count(&mut self, now: Instant) -> u32 {
        match self.window_start {
            Some(s) if now.saturating_duration_since(s) < Duration::from_secs(1) => {}
            Some(s) if now.saturating_duration_since(s) < Duration::from_secs(2) => {
                self.last_window_count = self.window_count;
                self.window_count = 0;
                self.window_start = Some(s + Duration::from_secs(1));
            }
            _ => {
                self.last_window_count = 0;
                self.window_count = 0;
                self.window_start = Some(now);
            }
        }
        self.window_count = self.window_count.saturating_add(1);
        self.window_count.max(self.last_window_count)
    }

    /// One request at `now`: takes a token if there is one.
    pub fn handle_request(&mut self, now: Instant) -> Check {
        self.refill(now);
        let current_rate = self.count(now);
        let allowed = self.level >= MICRO;
        let retry_after = if allowed {
            self.level -= MICRO;
            None
        } else {
            let missing = MICRO - self.level;
            let us = (u128::from(missing) * 1_000_000).div_ceil(u128::from(self.rate));
            let secs = (us as u64).div_ceil(1_000_000).max(1);
            Some(Duration::from_secs(secs))
        };
        Check {
            allowed,
            retry_after,
            evidence: RateLimitEvidence {
                decision: if allowed {
                    RateDecision::Allowed
                } else {
                    RateDecision::Limited
                },
                tokens_remaining: (self.level / MICRO).min(u64::from(u32::MAX)) as u32,
                limit: self.limit_rps,
                current_rate,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn bucket(rps: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(RateLimit {
            max_tokens: burst,
            tokens_per_fill: rps,
            fill_interval: Duration::from_secs(1),
        })
    }

    #[test]
    fn burst_then_refuse_with_retry_after_then_refill() {
        let t0 = Instant::now();
        let mut b = bucket(2, 3);
        for i in 0..3 {
            let c = b.handle_request(t0);
            assert!(c.allowed, "request {i}");
            assert_eq!(c.evidence.tokens_remaining, 2 - i);
        }
        let c = b.handle_request(t0);
        assert!(!c.allowed);
        assert_eq!(c.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(c.evidence.decision, RateDecision::Limited);
        assert_eq!(c.evidence.limit, 2);
        assert_eq!(c.evidence.current_rate, 4);
        // half a second later one token is back (2 per second)
        let c = b.handle_request(t0 + Duration::from_millis(500));
        assert!(c.allowed);
        assert!(!b.handle_request(t0 + Duration::from_millis(500)).allowed);
        // a long pause refills to the burst, not beyond
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.handle_request(later).allowed);
        }
        assert!(!b.handle_request(later).allowed);
    }

    #[test]
    fn slow_rates_round_retry_after_up() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit {
            max_tokens: 1,
            tokens_per_fill: 1,
            fill_interval: Duration::from_secs(10),
        });
        assert!(b.handle_request(t0).allowed);
        let c = b.handle_request(t0 + Duration::from_secs(1));
        assert_eq!(c.retry_after, Some(Duration::from_secs(9)));
        // time going backwards (a stale `now`) neither panics nor refills
        assert!(!b.handle_request(t0).allowed);
    }

    #[test]
    fn sustained_rate_is_the_configured_one() {
        let t0 = Instant::now();
        let mut b = bucket(100, 1);
        let mut ok = 0;
        // 1,000 requests per second for 2 s
        for i in 0..2000u64 {
            if b.handle_request(t0 + Duration::from_millis(i)).allowed {
                ok += 1;
            }
        }
        assert!((199..=201).contains(&ok), "{ok}");
    }
}
