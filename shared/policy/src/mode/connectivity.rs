//! What the spoke can reach: the observations behind Survival and Recovery.
//!
//! What it is: [`Reachability`] (the hub, and endpoints reachable of known per
//! locality tier) with the partition rule [`Reachability::is_partition`], and
//! the health-check record that decides Survival → Recovery. Who drives it:
//! the spoke reports reachability and health checks to
//! [`super::ModeMachine`]. What it must not do: probe anything itself, or
//! keep more than `reconnection.health_checks` timestamps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::ModeError;
use crate::model::Reconnection;
use crate::routing::LocalityTier;

/// Whether `tier` is remote for the mode machine: every tier but the
/// caller's own site. Survival routes only to `SameSite`; the Recovery ramp
/// meters the rest.
pub fn is_remote(tier: LocalityTier) -> bool {
    tier != LocalityTier::SameSite
}

/// Endpoints reachable of those known, for one tier. Never more reachable
/// than known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointCount {
    reachable: u32,
    total: u32,
}

impl EndpointCount {
    /// No endpoint known.
    pub const NONE: EndpointCount = EndpointCount {
        reachable: 0,
        total: 0,
    };

    /// `reachable` of `total` endpoints; an error if `reachable > total`.
    pub fn new(reachable: u32, total: u32) -> Result<EndpointCount, ModeError> {
        if reachable > total {
            return Err(ModeError::EndpointCount { reachable, total });
        }
        Ok(EndpointCount { reachable, total })
    }

    /// `total` endpoints, all reachable.
    pub fn all(total: u32) -> EndpointCount {
        EndpointCount {
            reachable: total,
            total,
        }
    }

    /// `total` endpoints, none reachable.
    pub fn unreachable(total: u32) -> EndpointCount {
        EndpointCount {
            reachable: 0,
            total,
        }
    }

    /// Endpoints reachable.
    pub fn reachable(self) -> u32 {
        self.reachable
    }

    /// Endpoints known.
    pub fn total(self) -> u32 {
        self.total
    }

    fn plus(self, other: EndpointCount) -> EndpointCount {
        // Saturating both keeps reachable ≤ total.
        EndpointCount {
            reachable: self.reachable.saturating_add(other.reachable),
            total: self.total.saturating_add(other.total),
        }
    }

    /// `available` (some reachable), `unavailable` (none of some), `none`
    /// (no endpoint known), as in the seed's connectivity evidence.
    fn as_str(self) -> &'static str {
        match (self.reachable, self.total) {
            (_, 0) => "none",
            (0, _) => "unavailable",
            _ => "available",
        }
    }
}

/// What the spoke reaches right now: the hub, and endpoints per locality tier
/// (tiers as [`crate::routing::locality_tier`] ranks them from this spoke).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reachability {
    /// Whether the hub answers.
    pub hub: bool,
    /// Endpoints at this store (this spoke or another of the site).
    pub same_site: EndpointCount,
    /// Endpoints at other sites of this zone.
    pub same_zone: EndpointCount,
    /// Endpoints at other sites of this region.
    pub same_region: EndpointCount,
    /// Cloud endpoints behind the hub gateway.
    pub cloud: EndpointCount,
    /// Endpoints at sites elsewhere.
    pub remote: EndpointCount,
}

impl Reachability {
    /// The hub as given, no endpoints known; add some with
    /// [`Reachability::with_tier`].
    pub fn new(hub: bool) -> Reachability {
        Reachability {
            hub,
            same_site: EndpointCount::NONE,
            same_zone: EndpointCount::NONE,
            same_region: EndpointCount::NONE,
            cloud: EndpointCount::NONE,
            remote: EndpointCount::NONE,
        }
    }

    /// This reachability with `tier`'s count replaced.
    pub fn with_tier(mut self, tier: LocalityTier, count: EndpointCount) -> Reachability {
        *self.tier_mut(tier) = count;
        self
    }

    /// The count of `tier`.
    pub fn tier(&self, tier: LocalityTier) -> EndpointCount {
        match tier {
            LocalityTier::SameSite => self.same_site,
            LocalityTier::SameZone => self.same_zone,
            LocalityTier::SameRegion => self.same_region,
            LocalityTier::Cloud => self.cloud,
            LocalityTier::Remote => self.remote,
        }
    }

    fn tier_mut(&mut self, tier: LocalityTier) -> &mut EndpointCount {
        match tier {
            LocalityTier::SameSite => &mut self.same_site,
            LocalityTier::SameZone => &mut self.same_zone,
            LocalityTier::SameRegion => &mut self.same_region,
            LocalityTier::Cloud => &mut self.cloud,
            LocalityTier::Remote => &mut self.remote,
        }
    }

    /// Every tier, nearest first.
    pub fn tiers(&self) -> [(LocalityTier, EndpointCount); 5] {
        TIERS.map(|t| (t, self.tier(t)))
    }

    /// Endpoints of every remote tier (all but `SameSite`) together.
    pub fn remote_endpoints(&self) -> EndpointCount {
        TIERS
            .into_iter()
            .filter(|t| is_remote(*t))
            .fold(EndpointCount::NONE, |sum, t| sum.plus(self.tier(t)))
    }

    /// Endpoints of every tier together.
    pub fn all_endpoints(&self) -> EndpointCount {
        TIERS
            .into_iter()
            .fold(EndpointCount::NONE, |sum, t| sum.plus(self.tier(t)))
    }

    /// The partition rule: the hub is unreachable **and** no remote endpoint
    /// is. With no remote endpoint known, the hub alone decides.
    pub fn is_partition(&self) -> bool {
        !self.hub && self.remote_endpoints().reachable() == 0
    }

    /// The seed's connectivity evidence: the hub and every tier as
    /// `available` / `unavailable` / `none`, and endpoints reachable of known.
    pub(crate) fn to_json(self) -> Json {
        let mut connectivity = serde_json::Map::new();
        connectivity.insert(
            "hub".into(),
            json!(if self.hub { "available" } else { "unavailable" }),
        );
        let mut tiers = serde_json::Map::new();
        for (t, c) in self.tiers() {
            connectivity.insert(t.as_str().into(), json!(c.as_str()));
            tiers.insert(
                t.as_str().into(),
                json!({"reachable": c.reachable, "total": c.total}),
            );
        }
        let all = self.all_endpoints();
        let remote = self.remote_endpoints();
        json!({
            "connectivity": connectivity,
            "service_discovery": {
                "endpoints_reachable": all.reachable,
                "endpoints_total": all.total,
                "reachability": percent_of(all.reachable, all.total),
                "remote_endpoints_reachable": remote.reachable,
                "remote_endpoints_total": remote.total,
                "tiers": tiers,
            },
            "partition": self.is_partition(),
        })
    }
}

const TIERS: [LocalityTier; 5] = [
    LocalityTier::SameSite,
    LocalityTier::SameZone,
    LocalityTier::SameRegion,
    LocalityTier::Cloud,
    LocalityTier::Remote,
];

fn percent_of(part: u32, whole: u32) -> String {
    if whole == 0 {
        return "0%".into();
    }
    format!("{}%", u64::from(part) * 100 / u64::from(whole))
}

/// Health checks seen in Survival: the passes since the last failure (the
/// newest `health_checks` of them) and when that failure was.
#[derive(Clone, Debug, Default)]
pub(crate) struct HealthChecks {
    passes: VecDeque<Instant>,
    last_failure: Option<Instant>,
}

impl HealthChecks {
    /// Records a check at `now`.
    pub(crate) fn record(&mut self, now: Instant, ok: bool, rule: &Reconnection) {
        if ok {
            self.passes.push_back(now);
        } else {
            self.passes.clear();
            self.last_failure = Some(now);
        }
        self.prune(now, rule);
    }

    /// Drops passes outside the window and beyond the number needed.
    pub(crate) fn prune(&mut self, now: Instant, rule: &Reconnection) {
        while self
            .passes
            .front()
            .is_some_and(|t| !within(now, *t, rule.window))
        {
            self.passes.pop_front();
        }
        let keep = usize::try_from(rule.health_checks.max(1)).unwrap_or(usize::MAX);
        while self.passes.len() > keep {
            self.passes.pop_front();
        }
    }

    /// Passes within the window at `now`.
    pub(crate) fn passes(&self, now: Instant, rule: &Reconnection) -> u32 {
        let n = self
            .passes
            .iter()
            .filter(|t| within(now, **t, rule.window))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Failures within the window at `now` (0 or 1: a failure clears the
    /// passes, so only the last one matters).
    pub(crate) fn failures(&self, now: Instant, rule: &Reconnection) -> u32 {
        u32::from(
            self.last_failure
                .is_some_and(|t| within(now, t, rule.window)),
        )
    }

    /// Whether the checks pass: enough passes and no failure in the window.
    pub(crate) fn passed(&self, now: Instant, rule: &Reconnection) -> bool {
        self.failures(now, rule) == 0 && self.passes(now, rule) >= rule.health_checks.max(1)
    }

    /// Timestamps held (for the memory bound).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.passes.len()
    }
}

/// Whether `t` lies within `window` before `now` (inclusive; a `t` after
/// `now` counts as within).
fn within(now: Instant, t: Instant, window: Duration) -> bool {
    now.saturating_duration_since(t) <= window
}
