//! The bucketed sliding window behind a service's error rate.
//!
//! What it is: [`BucketClock`], one per machine, cuts time into buckets of
//! `window / WINDOW_BUCKETS` from an epoch; [`Window`], one per service, keeps
//! a request and an error counter per bucket in a ring, plus their sums. Who
//! drives it: [`super::machine`]. What it must not do: allocate per request,
//! wrap a counter, or panic on any instant or duration (time before the epoch
//! counts as bucket 0; far-future arithmetic saturates).

use std::time::{Duration, Instant};

use super::WINDOW_BUCKETS;
use crate::units::Ratio;

const BUCKETS: usize = WINDOW_BUCKETS as usize;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Bucket numbering shared by every window of a machine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BucketClock {
    epoch: Instant,
    /// Bucket width in nanoseconds (≥ 1).
    width: u128,
}

impl BucketClock {
    /// Buckets of `window / WINDOW_BUCKETS` (at least 1 ns) from `epoch`.
    pub(crate) fn new(epoch: Instant, window: Duration) -> BucketClock {
        BucketClock {
            epoch,
            width: (window.as_nanos() / u128::from(WINDOW_BUCKETS)).max(1),
        }
    }

    /// The bucket `now` falls in.
    pub(crate) fn index(&self, now: Instant) -> u64 {
        let n = now.saturating_duration_since(self.epoch).as_nanos() / self.width;
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// When bucket `index` begins; `None` beyond what an `Instant` can hold.
    pub(crate) fn start_of(&self, index: u64) -> Option<Instant> {
        let nanos = self.width.checked_mul(u128::from(index))?;
        let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
        // The remainder is below 10⁹, so it fits.
        let sub = (nanos % NANOS_PER_SEC) as u32;
        self.epoch.checked_add(Duration::new(secs, sub))
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    requests: u32,
    errors: u32,
}

/// Requests and errors over the last `WINDOW_BUCKETS` buckets.
///
/// Invariants: `requests`/`errors` are the sums of the buckets, and every
/// bucket has `errors ≤ requests`.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    buckets: [Bucket; BUCKETS],
    /// The newest bucket's index (its slot is `head % BUCKETS`).
    head: u64,
    requests: u64,
    errors: u64,
}

impl Window {
    /// An empty window whose newest bucket is `index`.
    pub(crate) fn new(index: u64) -> Window {
        Window {
            buckets: [Bucket::default(); BUCKETS],
            head: index,
            requests: 0,
            errors: 0,
        }
    }

    /// Moves the newest bucket to `index`, emptying the buckets that fell out.
    /// An older `index` than the newest changes nothing.
    pub(crate) fn advance(&mut self, index: u64) {
        if index <= self.head {
            return;
        }
        let gap = index - self.head;
        if gap >= BUCKETS as u64 {
            self.buckets = [Bucket::default(); BUCKETS];
            self.requests = 0;
            self.errors = 0;
        } else {
            for i in 1..=gap {
                let slot = slot(self.head + i);
                let old = std::mem::take(&mut self.buckets[slot]);
                self.requests -= u64::from(old.requests);
                self.errors -= u64::from(old.errors);
            }
        }
        self.head = index;
    }

    /// Counts one request in bucket `index` (an older index counts in the
    /// newest bucket). A full bucket stops counting rather than wrapping.
    pub(crate) fn record(&mut self, index: u64, ok: bool) {
        self.advance(index);
        let b = &mut self.buckets[slot(self.head)];
        if b.requests == u32::MAX {
            return;
        }
        b.requests += 1;
        self.requests += 1;
        if !ok {
            b.errors += 1;
            self.errors += 1;
        }
    }

    /// Requests in the window.
    pub(crate) fn requests(&self) -> u64 {
        self.requests
    }

    /// Failed requests in the window.
    pub(crate) fn errors(&self) -> u64 {
        self.errors
    }

    /// The error rate, rounded down to a basis point (0 with no requests).
    pub(crate) fn error_rate(&self) -> Ratio {
        if self.requests == 0 {
            return Ratio::ZERO;
        }
        let bp = u128::from(self.errors) * 10_000 / u128::from(self.requests);
        // errors ≤ requests, so bp ≤ 10,000.
        Ratio::from_basis_points(u16::try_from(bp).unwrap_or(10_000)).unwrap_or(Ratio::ONE)
    }

    /// Whether the error rate is at or above `r` (exact, no rounding).
    pub(crate) fn rate_at_least(&self, r: Ratio) -> bool {
        u128::from(self.errors) * 10_000 >= u128::from(r.basis_points()) * u128::from(self.requests)
    }

    /// Whether the error rate is above `r` (exact, no rounding).
    pub(crate) fn rate_above(&self, r: Ratio) -> bool {
        u128::from(self.errors) * 10_000 > u128::from(r.basis_points()) * u128::from(self.requests)
    }
}

fn slot(index: u64) -> usize {
    // The remainder is below BUCKETS.
    (index % BUCKETS as u64) as usize
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn buckets_age_out_one_at_a_time() {
        let mut w = Window::new(0);
        for i in 0..20 {
            w.record(i, i % 2 == 0);
        }
        assert_eq!((w.requests(), w.errors()), (20, 10));
        assert_eq!(w.error_rate(), Ratio::percent(50));
        w.advance(20); // bucket 0 (a success) falls out
        assert_eq!((w.requests(), w.errors()), (19, 10));
        w.advance(21); // bucket 1 (an error) falls out
        assert_eq!((w.requests(), w.errors()), (18, 9));
        w.advance(15); // the past changes nothing
        assert_eq!(w.requests(), 18);
        w.advance(1_000);
        assert_eq!((w.requests(), w.errors()), (0, 0));
        assert_eq!(w.error_rate(), Ratio::ZERO);
        w.record(3, false); // late: counts in the newest bucket
        assert_eq!((w.requests(), w.errors()), (1, 1));
    }

    #[test]
    fn thresholds_compare_exactly() {
        let mut w = Window::new(0);
        for i in 0..3 {
            w.record(0, i != 0);
        }
        // 1 of 3 = 33.33…%
        assert!(w.rate_at_least(Ratio::from_basis_points(3333).unwrap()));
        assert!(!w.rate_at_least(Ratio::from_basis_points(3334).unwrap()));
        assert!(w.rate_above(Ratio::from_basis_points(3333).unwrap()));
        assert_eq!(w.error_rate(), Ratio::from_basis_points(3333).unwrap());
        let mut none = Window::new(0);
        none.advance(1);
        assert!(none.rate_at_least(Ratio::ZERO));
        assert!(!none.rate_above(Ratio::ZERO));
    }

    #[test]
    fn the_clock_numbers_buckets_and_never_panics() {
        let t0 = Instant::now();
        let c = BucketClock::new(t0, Duration::from_secs(10));
        assert_eq!(c.index(t0), 0);
        assert_eq!(c.index(t0 + Duration::from_millis(499)), 0);
        assert_eq!(c.index(t0 + Duration::from_millis(500)), 1);
        assert_eq!(c.start_of(3), Some(t0 + Duration::from_millis(1_500)));
        let tiny = BucketClock::new(t0, Duration::from_nanos(1));
        assert_eq!(tiny.index(t0 + Duration::from_nanos(7)), 7);
        let _ = c.start_of(u64::MAX);
        let _ = tiny.start_of(u64::MAX);
        let huge = BucketClock::new(t0, Duration::MAX);
        assert_eq!(huge.start_of(u64::MAX), None);
    }
}
