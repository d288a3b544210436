//! Wall-clock injection for certificate validity checks.
//!
//! What it is: the [`Clock`] trait that identity code reads "now" from, the
//! real [`SystemClock`], and [`ClockTimeProvider`], which hands the same clock
//! to rustls so that the validity dates checked during a handshake come from
//! the clock the caller chose (a virtual clock in simulations, a hub-anchored
//! trusted clock on boxes without an RTC). Who drives it: hub and spoke pass a
//! clock when they build TLS configs. What it must not do: read
//! `SystemTime::now()` anywhere except in [`SystemClock`].

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::UnixTime;
use rustls::time_provider::TimeProvider;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock stuck at one instant; for tests and replay.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub SystemTime);

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// Adapts a [`Clock`] to rustls' [`TimeProvider`].
///
/// Times before the Unix epoch are reported as "unknown" (`None`), which makes
/// rustls fail the handshake rather than guess.
#[derive(Debug, Clone)]
pub struct ClockTimeProvider(pub Arc<dyn Clock>);

impl TimeProvider for ClockTimeProvider {
    fn current_time(&self) -> Option<UnixTime> {
        to_unix_time(self.0.now())
    }
}

/// `t` as a [`UnixTime`], or `None` before 1970.
pub fn to_unix_time(t: SystemTime) -> Option<UnixTime> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(UnixTime::since_unix_epoch)
}

/// `t` as a [`SystemTime`] (whole seconds).
pub fn from_unix_time(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn provider_reads_the_injected_clock() {
        let t = UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        let p = ClockTimeProvider(Arc::new(FixedClock(t)));
        assert_eq!(
            p.current_time(),
            Some(UnixTime::since_unix_epoch(Duration::from_secs(
                4_000_000_000
            )))
        );
        let before = ClockTimeProvider(Arc::new(FixedClock(UNIX_EPOCH - Duration::from_secs(1))));
        assert_eq!(before.current_time(), None);
    }

    #[test]
    fn unix_time_roundtrip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(to_unix_time(t).map(from_unix_time), Some(t));
    }
}
