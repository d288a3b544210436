//! A [`Clock`] that follows tokio's clock, so certificate validity checks
//! move with paused-time tests and turmoil's virtual time.

use std::time::{Duration, SystemTime};

use tidemesh_identity::clock::Clock;

/// Wall time = a fixed base plus the time elapsed on tokio's clock.
///
/// Outside tests tokio's clock is the monotonic clock, so this drifts from
/// the system clock only by what NTP corrects after start-up. A process that
/// must track NTP steps uses `SystemClock` instead.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at `base` now.
    pub fn starting_at(base: SystemTime) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }

    /// Starts at the system's current time.
    pub fn from_system() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// How long this clock has run.
    pub fn elapsed(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.start)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.elapsed()
    }
}
