//! Trusted time on a spoke: the time every certificate check and evidence
//! timestamp uses, even on a box without a real-time clock that reboots
//! offline with a wrong wall clock.
//!
//! What it is: hub-signed **time anchors** ([`TimeAnchor`], signed with the
//! CA key under [`ANCHOR_CONTEXT`]) and [`TrustedTime`], a sans-IO core
//! that turns an anchor (or, before the first one, the wall clock checked
//! against a persisted floor) plus monotonic time since into "now", and
//! says how far to trust it.
//!
//! Who drives it: the spoke's clock driver passes the monotonic reading in
//! (`handle_*(mono, ...)`, `now_ms(mono)`), persists [`TrustedTime::floor`]
//! now and then, and feeds it every anchor the hub sends. What it must not
//! do: read any clock itself, or touch files.
//!
//! # Rules
//! * Once an anchor arrived in this process, now = anchor time (hub time
//!   plus half the round trip) + monotonic time since. The wall clock is no
//!   longer consulted.
//! * At boot, before any anchor, the wall clock is checked against the
//!   persisted floor (the highest trusted time the spoke knew, saved while
//!   running): a wall clock more than `tolerance` **behind** the floor, or
//!   more than `max_ahead` (the max-offline window) **ahead** of it, is not
//!   trusted; the floor is used instead (plus monotonic time since boot) and
//!   the status is `degraded` with the reason. A wall clock in between is
//!   used, from its boot reading on.
//! * Uncertainty grows with monotonic drift (`drift_ppm`, default 100 ppm,
//!   a cheap crystal's worst case) since the last anchor; time spent powered
//!   off before a degraded boot is unknown and not counted (the reason says
//!   so). The **drift budget** is how long until the uncertainty reaches
//!   `max_uncertainty` (default 5 min: the backdating of issued
//!   certificates, beyond which peers with good clocks may reject them).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;
use crate::svid::{self, IssueError};

/// Signature context of time anchors.
pub const ANCHOR_CONTEXT: &str = "time-anchor/v1";

/// The hub's statement "it is `hub_ms` now", made for one spoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeAnchor {
    /// The spoke node it was made for.
    pub node: SpiffeId,
    /// The hub's clock, ms since the Unix epoch.
    pub hub_ms: u64,
}

/// A [`TimeAnchor`] signed by the hub's CA key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTimeAnchor {
    /// postcard of [`TimeAnchor`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// ECDSA P-256 signature by the CA key over the body.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why an anchor was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    /// The signature does not verify against the trust bundle.
    #[error("time anchor signature does not verify against the trust bundle")]
    BadSignature,
    /// The body does not decode.
    #[error("time anchor does not decode: {0}")]
    Malformed(String),
    /// It was made for another spoke.
    #[error("time anchor was made for {0}, not for this spoke")]
    WrongNode(SpiffeId),
}

impl TimeAnchor {
    /// Signs the anchor with the hub's CA.
    pub fn sign(&self, ca: &svid::Ca) -> Result<SignedTimeAnchor, IssueError> {
        let body = postcard::to_allocvec(self).map_err(|e| IssueError::Signing(e.to_string()))?;
        let signature = ca.sign_message(ANCHOR_CONTEXT, &body)?;
        Ok(SignedTimeAnchor { body, signature })
    }
}

impl SignedTimeAnchor {
    /// Checks the signature against `roots` and that the anchor names `node`.
    pub fn verify(
        &self,
        roots: &[rustls::pki_types::CertificateDer<'_>],
        node: &SpiffeId,
    ) -> Result<TimeAnchor, AnchorError> {
        let signed = roots.iter().any(|r| {
            svid::verify_signed_message(r, ANCHOR_CONTEXT, &self.body, &self.signature).is_ok()
        });
        if !signed {
            return Err(AnchorError::BadSignature);
        }
        let a: TimeAnchor =
            postcard::from_bytes(&self.body).map_err(|e| AnchorError::Malformed(e.to_string()))?;
        if &a.node != node {
            return Err(AnchorError::WrongNode(a.node));
        }
        Ok(a)
    }
}

/// What a spoke persists of its trusted time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeFloor {
    /// The highest trusted time known, ms since the Unix epoch.
    pub floor_ms: u64,
    /// The last hub anchor (hub time), if any ever arrived.
    pub anchor_ms: Option<u64>,
}

/// Knobs of [`TrustedTime`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeSettings {
    /// A wall clock further ahead of the floor than this is implausible
    /// (the max-offline window: a spoke offline longer cannot serve anyway).
    pub max_ahead: Duration,
    /// A wall clock this far behind the floor is still accepted (a floor
    /// saved just before a clean shutdown, NTP slew).
    pub tolerance: Duration,
    /// Worst-case monotonic clock drift, parts per million.
    pub drift_ppm: u32,
    /// Uncertainty at which time is no longer good enough to issue
    /// certificates others accept (the drift budget's limit).
    pub max_uncertainty: Duration,
}

impl Default for TimeSettings {
    fn default() -> Self {
        TimeSettings {
            max_ahead: Duration::from_secs(30 * 24 * 3600),
            tolerance: Duration::from_secs(2),
            drift_ppm: 100,
            max_uncertainty: Duration::from_secs(300),
        }
    }
}

/// Where "now" comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// A hub anchor received in this process, plus monotonic time since.
    HubAnchor,
    /// The wall clock read at boot (it passed the floor check), plus
    /// monotonic time since.
    WallClock,
    /// The persisted floor (the wall clock failed the check), plus
    /// monotonic time since boot.
    Floor,
}

/// How far to trust the time, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimeStatus {
    /// `trusted` or `degraded`.
    pub state: &'static str,
    /// Where now comes from.
    pub source: TimeSource,
    /// Why it is degraded.
    pub reason: Option<String>,
    /// Bound on the error from monotonic drift since the last anchor, ms.
    pub uncertainty_ms: u64,
    /// Last anchor (hub time, ms since the epoch), if any ever arrived.
    pub last_anchor_ms: Option<u64>,
    /// Wall clock minus trusted time at the last check, ms (positive: the
    /// wall clock is ahead).
    pub wall_offset_ms: i64,
}

/// The sans-IO trusted-time core (see the module docs for the rules).
#[derive(Clone, Debug)]
pub struct TrustedTime {
    settings: TimeSettings,
    /// Trusted ms since the epoch at monotonic reading `base_mono`.
    base_ms: u64,
    base_mono: Duration,
    source: TimeSource,
    reason: Option<String>,
    /// Error bound at `base_mono` (half the anchor's round trip).
    base_uncertainty: Duration,
    /// Last anchor, hub ms.
    anchor_ms: Option<u64>,
    wall_offset_ms: i64,
    /// The wall clock's reading at boot and the monotonic reading then, to
    /// judge it again against a floor learned later.
    boot: (u64, Duration),
}

fn signed_diff(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map(|d| -d).unwrap_or(i64::MIN)
    }
}

fn show(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 2 * 86_400 {
        format!("{:.1} days", s as f64 / 86_400.0)
    } else if s >= 7_200 {
        format!("{:.1} hours", s as f64 / 3_600.0)
    } else {
        format!("{s} s")
    }
}

impl TrustedTime {
    /// Starts from the persisted `floor` and the wall clock's reading
    /// `wall_ms` at monotonic reading `mono`.
    pub fn boot(settings: TimeSettings, floor: TimeFloor, wall_ms: u64, mono: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (base_ms, source, reason) = if floor.floor_ms == 0 {
            (wall_ms, TimeSource::WallClock, None)
        } else if wall_ms.saturating_add(ms(settings.tolerance)) < floor.floor_ms {
            let behind = Duration::from_millis(floor.floor_ms - wall_ms);
            (
                floor.floor_ms,
                TimeSource::Floor,
                Some(format!(
                    "the wall clock is {} behind the last trusted time this spoke saved; using that time plus monotonic time since boot (time spent powered off is not counted) until the hub sends an anchor",
                    show(behind)
                )),
            )
        } else if wall_ms > floor.floor_ms.saturating_add(ms(settings.max_ahead)) {
            let ahead = Duration::from_millis(wall_ms - floor.floor_ms);
            (
                floor.floor_ms,
                TimeSource::Floor,
                Some(format!(
                    "the wall clock is {} ahead of the last trusted time this spoke saved, more than the max-offline window ({}); using that time plus monotonic time since boot (time spent powered off is not counted) until the hub sends an anchor",
                    show(ahead),
                    show(settings.max_ahead)
                )),
            )
        } else {
            (wall_ms, TimeSource::WallClock, None)
        };
        TrustedTime {
            settings,
            base_ms,
            base_mono: mono,
            source,
            reason,
            base_uncertainty: Duration::ZERO,
            anchor_ms: floor.anchor_ms,
            wall_offset_ms: signed_diff(wall_ms, base_ms),
            boot: (wall_ms, mono),
        }
    }

    /// A later floor learned after boot (e.g. the timestamp of the newest
    /// evidence record, stamped with trusted time before a crash): before
    /// any anchor, the boot decision is made again against the higher of
    /// the two floors. Does nothing once anchored.
    pub fn raise_floor(&mut self, floor_ms: u64) {
        if self.source == TimeSource::HubAnchor {
            return;
        }
        let (wall, mono) = self.boot;
        // the floor in force at boot: what the current base implies
        let current = match self.source {
            TimeSource::Floor => self.base_ms,
            _ => 0,
        };
        if floor_ms <= current {
            return;
        }
        let again = TrustedTime::boot(
            self.settings,
            TimeFloor {
                floor_ms,
                anchor_ms: self.anchor_ms,
            },
            wall,
            mono,
        );
        // Only ever move forward.
        if again.now_ms(mono) >= self.now_ms(mono) || self.source == TimeSource::WallClock {
            let t = TrustedTime {
                boot: self.boot,
                ..again
            };
            *self = t;
        }
    }

    /// Trusted now, ms since the Unix epoch, at monotonic reading `mono`.
    pub fn now_ms(&self, mono: Duration) -> u64 {
        let since = mono.saturating_sub(self.base_mono);
        self.base_ms
            .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// A verified anchor arrived: the hub said `hub_ms` in answer to a
    /// request sent `rtt` before monotonic reading `mono`. From now on time
    /// follows this anchor; the status is trusted again.
    pub fn handle_anchor(&mut self, hub_ms: u64, rtt: Duration, wall_ms: u64, mono: Duration) {
        let half = rtt / 2;
        let at = hub_ms.saturating_add(u64::try_from(half.as_millis()).unwrap_or(u64::MAX));
        self.base_ms = at;
        self.base_mono = mono;
        self.base_uncertainty = half;
        self.source = TimeSource::HubAnchor;
        self.reason = None;
        self.anchor_ms = Some(hub_ms);
        self.wall_offset_ms = signed_diff(wall_ms, at);
    }

    /// What to persist now (call every minute or so, and at shutdown).
    pub fn floor(&self, mono: Duration) -> TimeFloor {
        TimeFloor {
            floor_ms: self.now_ms(mono),
            anchor_ms: self.anchor_ms,
        }
    }

    /// Whether time is trusted (not degraded).
    pub fn trusted(&self) -> bool {
        self.source != TimeSource::Floor
    }

    /// The error bound at `mono`: half the anchor's round trip plus drift
    /// since the last anchor (since boot when there is none).
    pub fn uncertainty(&self, mono: Duration) -> Duration {
        let since_anchor = match (self.source, self.anchor_ms) {
            (TimeSource::HubAnchor, _) => mono.saturating_sub(self.base_mono),
            (_, Some(a)) => Duration::from_millis(self.now_ms(mono).saturating_sub(a)),
            (_, None) => mono.saturating_sub(self.base_mono),
        };
        self.base_uncertainty + since_anchor.mul_f64(f64::from(self.settings.drift_ppm) * 1e-6)
    }

    /// How long until the uncertainty reaches `max_uncertainty` (zero once
    /// it has).
    pub fn drift_budget(&self, mono: Duration) -> Duration {
        let left = self
            .settings
            .max_uncertainty
            .saturating_sub(self.uncertainty(mono));
        if self.settings.drift_ppm == 0 {
            return Duration::MAX;
        }
        left.mul_f64(1e6 / f64::from(self.settings.drift_ppm))
    }

    /// The status document.
    pub fn status(&self, mono: Duration) -> TimeStatus {
        TimeStatus {
            state: if self.trusted() {
                "trusted"
            } else {
                "degraded"
            },
            source: self.source,
            reason: self.reason.clone(),
            uncertainty_ms: u64::try_from(self.uncertainty(mono).as_millis()).unwrap_or(u64::MAX),
            last_anchor_ms: self.anchor_ms,
            wall_offset_ms: self.wall_offset_ms,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::spiffe::TrustDomain;
    use std::time::SystemTime;

    const DAY: u64 = 86_400_000;
    const T0: u64 = 1_800_000_000_000;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_plausible_wall_clock_is_used_from_its_boot_reading() {
        let floor = TimeFloor {
            floor_ms: T0,
            anchor_ms: Some(T0 - 1000),
        };
        let t = TrustedTime::boot(TimeSettings::default(), floor, T0 + 3 * DAY, s(5));
        assert!(t.trusted());
        assert_eq!(t.status(s(5)).source, TimeSource::WallClock);
        assert_eq!(t.now_ms(s(65)), T0 + 3 * DAY + 60_000);
    }

    #[test]
    fn a_wall_clock_ten_days_behind_the_floor_is_not_trusted() {
        let floor = TimeFloor {
            floor_ms: T0,
            anchor_ms: Some(T0),
        };
        let t = TrustedTime::boot(TimeSettings::default(), floor, T0 - 10 * DAY, s(1));
        assert!(!t.trusted());
        let st = t.status(s(1));
        assert_eq!(st.state, "degraded");
        assert_eq!(st.source, TimeSource::Floor);
        assert!(
            st.reason.as_deref().unwrap().contains("10.0 days behind"),
            "{st:?}"
        );
        assert_eq!(st.wall_offset_ms, -10 * DAY as i64);
        // floor plus monotonic time since boot
        assert_eq!(t.now_ms(s(11)), T0 + 10_000);
    }

    #[test]
    fn a_wall_clock_a_year_ahead_is_not_trusted() {
        let floor = TimeFloor {
            floor_ms: T0,
            anchor_ms: Some(T0),
        };
        let t = TrustedTime::boot(TimeSettings::default(), floor, T0 + 365 * DAY, s(0));
        let st = t.status(s(0));
        assert_eq!(st.state, "degraded");
        assert!(
            st.reason.as_deref().unwrap().contains("365.0 days ahead"),
            "{st:?}"
        );
        assert_eq!(t.now_ms(s(1)), T0 + 1000);
    }

    #[test]
    fn small_lag_within_tolerance_and_no_floor_are_trusted() {
        let floor = TimeFloor {
            floor_ms: T0,
            anchor_ms: None,
        };
        assert!(TrustedTime::boot(TimeSettings::default(), floor, T0 - 1500, s(0)).trusted());
        assert!(
            TrustedTime::boot(TimeSettings::default(), TimeFloor::default(), 5, s(0)).trusted()
        );
    }

    #[test]
    fn an_anchor_restores_trust_and_time_follows_it() {
        let floor = TimeFloor {
            floor_ms: T0,
            anchor_ms: Some(T0),
        };
        let mut t = TrustedTime::boot(TimeSettings::default(), floor, T0 - 10 * DAY, s(1));
        t.handle_anchor(T0 + 60_000, Duration::from_millis(40), T0 - 10 * DAY, s(3));
        assert!(t.trusted());
        assert_eq!(t.status(s(3)).source, TimeSource::HubAnchor);
        assert_eq!(t.now_ms(s(3)), T0 + 60_020);
        assert_eq!(t.now_ms(s(13)), T0 + 70_020);
        assert_eq!(t.floor(s(13)).floor_ms, T0 + 70_020);
        assert_eq!(t.floor(s(13)).anchor_ms, Some(T0 + 60_000));
    }

    #[test]
    fn a_floor_learned_after_boot_is_judged_again() {
        // booted with no fresh floor: the stale wall clock looked fine
        let stale = TimeFloor {
            floor_ms: T0 - 20 * DAY,
            anchor_ms: Some(T0 - 20 * DAY),
        };
        let mut t = TrustedTime::boot(TimeSettings::default(), stale, T0 - 10 * DAY, s(1));
        assert!(t.trusted());
        // the newest evidence record says it was T0 before the crash
        t.raise_floor(T0);
        assert!(!t.trusted());
        assert_eq!(t.now_ms(s(3)), T0 + 2_000);
        // an older floor changes nothing
        t.raise_floor(T0 - DAY);
        assert_eq!(t.now_ms(s(3)), T0 + 2_000);
        // a floor-based clock moves up to a newer floor
        t.raise_floor(T0 + 60_000);
        assert_eq!(t.now_ms(s(3)), T0 + 60_000 + 2_000);
        // once anchored, floors do not matter
        t.handle_anchor(T0 + 100_000, Duration::ZERO, T0, s(4));
        t.raise_floor(T0 + 900_000);
        assert_eq!(t.now_ms(s(4)), T0 + 100_000);
    }

    #[test]
    fn drift_budget_shrinks_with_time_since_the_anchor() {
        let mut t = TrustedTime::boot(TimeSettings::default(), TimeFloor::default(), T0, s(0));
        t.handle_anchor(T0, Duration::ZERO, T0, s(0));
        // 100 ppm of 5 min: 3e6 s (34.7 days) until the bound.
        assert_eq!(t.drift_budget(s(0)).as_secs(), 3_000_000);
        let later = t.drift_budget(s(86_400));
        assert_eq!(later.as_secs(), 3_000_000 - 86_400);
        assert!(t.uncertainty(s(86_400)) > Duration::from_millis(8_600));
        assert_eq!(t.drift_budget(s(4_000_000)), Duration::ZERO);
    }

    #[test]
    fn anchors_are_signed_for_one_node() {
        let now = SystemTime::now();
        let td = TrustDomain::new("edge.example").unwrap();
        let ca = svid::Ca::generate(&td, now - s(60), now + s(3600)).unwrap();
        let me: SpiffeId = "spiffe://edge.example/store/sf01/node/a".parse().unwrap();
        let other: SpiffeId = "spiffe://edge.example/store/sf01/node/b".parse().unwrap();
        let a = TimeAnchor {
            node: me.clone(),
            hub_ms: T0,
        }
        .sign(&ca)
        .unwrap();
        assert_eq!(a.verify(&[ca.cert_der()], &me).unwrap().hub_ms, T0);
        assert_eq!(
            a.verify(&[ca.cert_der()], &other),
            Err(AnchorError::WrongNode(me.clone()))
        );
        let mut bad = a.clone();
        bad.body[0] ^= 1;
        assert_eq!(
            bad.verify(&[ca.cert_der()], &me),
            Err(AnchorError::BadSignature)
        );
    }
}
