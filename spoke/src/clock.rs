//! The spoke's trusted clock: what every certificate check, every SVID the
//! node CA issues and every evidence timestamp reads.
//!
//! What it is: the driver of the sans-IO [`TrustedTime`] core
//! (`tidemesh_identity::trusted_time`): it supplies the monotonic reading
//! (tokio's clock, so simulations run it in virtual time), reads the wall
//! clock once at boot, and exposes the result as a [`Clock`]. Who drives
//! it: [`crate::Spoke`] builds it at open from the persisted floor; the
//! control session feeds it hub time anchors; the run loop persists its
//! floor every minute. What it must not do: follow the wall clock after
//! boot, or fail open (a poisoned lock yields the floor-based time it had).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tidemesh_identity::{
    clock::Clock,
    trusted_time::{TimeFloor, TimeSettings, TimeStatus, TrustedTime},
};

/// A [`Clock`] backed by [`TrustedTime`].
#[derive(Debug)]
pub struct TrustedClock {
    origin: tokio::time::Instant,
    core: Mutex<TrustedTime>,
    wall: Arc<dyn Clock>,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl TrustedClock {
    /// Boots from `floor` and the wall clock's current reading.
    pub fn boot(wall: Arc<dyn Clock>, floor: TimeFloor, settings: TimeSettings) -> TrustedClock {
        let origin = tokio::time::Instant::now();
        let core = TrustedTime::boot(settings, floor, ms(wall.now()), Duration::ZERO);
        TrustedClock {
            origin,
            core: Mutex::new(core),
            wall,
        }
    }

    fn mono(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.origin)
    }

    fn with<T>(&self, f: impl FnOnce(&mut TrustedTime, Duration) -> T) -> Option<T> {
        let mono = self.mono();
        self.core.lock().ok().map(|mut c| f(&mut c, mono))
    }

    /// A verified anchor: the hub said `hub_ms`, answering a request sent
    /// `rtt` ago.
    pub fn anchor(&self, hub_ms: u64, rtt: Duration) {
        let wall = ms(self.wall.now());
        self.with(|c, mono| c.handle_anchor(hub_ms, rtt, wall, mono));
    }

    /// A floor learned after boot (the newest evidence record's time).
    pub fn raise_floor(&self, floor_ms: u64) {
        self.with(|c, _| c.raise_floor(floor_ms));
    }

    /// What to persist.
    pub fn floor(&self) -> TimeFloor {
        self.with(|c, mono| c.floor(mono)).unwrap_or_default()
    }

    /// The status document.
    pub fn status(&self) -> Option<TimeStatus> {
        self.with(|c, mono| c.status(mono))
    }

    /// Whether time is trusted.
    pub fn trusted(&self) -> bool {
        self.with(|c, _| c.trusted()).unwrap_or(false)
    }

    /// How long until drift makes the time unusable for issuing.
    pub fn drift_budget(&self) -> Duration {
        self.with(|c, mono| c.drift_budget(mono))
            .unwrap_or(Duration::ZERO)
    }
}

impl Clock for TrustedClock {
    fn now(&self) -> SystemTime {
        let ms = self.with(|c, mono| c.now_ms(mono)).unwrap_or(0);
        UNIX_EPOCH + Duration::from_millis(ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use tidemesh_identity::clock::FixedClock;

    const T0: u64 = 1_800_000_000_000;

    fn at(ms: u64) -> Arc<dyn Clock> {
        Arc::new(FixedClock(UNIX_EPOCH + Duration::from_millis(ms)))
    }

    #[tokio::test(start_paused = true)]
    async fn follows_monotonic_time_not_the_wall_clock() {
        // A wall clock stuck in the past (no RTC) behind the saved floor.
        let floor = TimeFloor {
            floor_ms: T0,
            anchor_ms: Some(T0),
        };
        let c = TrustedClock::boot(at(T0 - 10 * 86_400_000), floor, TimeSettings::default());
        assert!(!c.trusted());
        assert_eq!(c.status().unwrap().state, "degraded");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(c.now(), UNIX_EPOCH + Duration::from_millis(T0 + 30_000));
        c.anchor(T0 + 3_600_000, Duration::from_millis(20));
        assert!(c.trusted());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            c.now(),
            UNIX_EPOCH + Duration::from_millis(T0 + 3_600_000 + 10 + 1000)
        );
        assert_eq!(c.floor().anchor_ms, Some(T0 + 3_600_000));
    }
}
