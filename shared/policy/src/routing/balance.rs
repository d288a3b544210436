//! Endpoint choice: locality tiers, then a picker.
//!
//! What it is: [`locality_tier`] ranks an endpoint against the caller's
//! locality (same site, same zone, same region, cloud, elsewhere);
//! [`choose_locality`] keeps the healthy endpoints of the best tier present;
//! [`Balancer`] picks one of them by round robin, smooth weighted round robin,
//! least request (power of two choices) or at random. The balancer is a plain
//! state machine: the caller reports requests starting and finishing
//! ([`Balancer::handle_request_started`] / [`Balancer::handle_request_finished`])
//! and passes randomness in; nothing here reads a clock or a socket.
//! Who drives it: the spoke's outbound path, one balancer per (service,
//! subset), with a candidate list that keeps its order between calls (its
//! state is per candidate index; a list of a different length resets it).

use serde::{Deserialize, Serialize};

use crate::model::{
    Endpoint, EndpointLocation, Health, LbAlgorithm, LoadBalancer, Locality, RoutingMode,
};

/// How near an endpoint is to the caller, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LocalityTier {
    /// At the caller's own site (store): this spoke or another at the same store.
    SameSite,
    /// Another site in the caller's zone.
    SameZone,
    /// Another site in the caller's region.
    SameRegion,
    /// In the cloud, behind the hub gateway.
    Cloud,
    /// Another site elsewhere.
    Remote,
}

impl LocalityTier {
    /// snake_case name, as in the seed's evidence (`same_zone_preferred`).
    pub fn as_str(self) -> &'static str {
        match self {
            LocalityTier::SameSite => "same_site",
            LocalityTier::SameZone => "same_zone",
            LocalityTier::SameRegion => "same_region",
            LocalityTier::Cloud => "cloud",
            LocalityTier::Remote => "remote",
        }
    }
}

/// The farthest tier a mode's routing may use: the caller's own site in
/// [`RoutingMode::LocalOnly`] (Survival), anything otherwise.
pub fn max_tier(mode: RoutingMode) -> LocalityTier {
    match mode {
        RoutingMode::LocalOnly => LocalityTier::SameSite,
        RoutingMode::Dynamic | RoutingMode::HealthyOnly | RoutingMode::Ramp => LocalityTier::Remote,
    }
}

/// The tier of an endpoint at `location`/`locality` for a caller at `caller`.
pub fn locality_tier(
    caller: &Locality,
    location: &EndpointLocation,
    locality: &Locality,
) -> LocalityTier {
    if *location == EndpointLocation::Cloud {
        return LocalityTier::Cloud;
    }
    let same_region = !caller.region.is_empty() && caller.region == locality.region;
    let same_zone = same_region && !caller.zone.is_empty() && caller.zone == locality.zone;
    match (&caller.site, &locality.site) {
        (Some(a), Some(b)) if a == b => LocalityTier::SameSite,
        _ if same_zone => LocalityTier::SameZone,
        _ if same_region => LocalityTier::SameRegion,
        _ => LocalityTier::Remote,
    }
}

/// What the balancer needs of an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// `host:port`.
    pub address: &'a str,
    /// Spoke or cloud.
    pub location: &'a EndpointLocation,
    /// Region / zone / site.
    pub locality: &'a Locality,
    /// Weight (for [`LbAlgorithm::Weighted`]).
    pub weight: u32,
    /// Passing health checks.
    pub healthy: bool,
}

impl<'a> From<&'a Endpoint> for Candidate<'a> {
    fn from(e: &'a Endpoint) -> Self {
        Candidate {
            address: &e.address,
            location: &e.location,
            locality: &e.locality,
            weight: e.weight,
            healthy: e.health == Health::Healthy,
        }
    }
}

/// The endpoints routing may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityChoice {
    /// Tier of the eligible endpoints (the best tier with a healthy one).
    pub tier: LocalityTier,
    /// Indexes of the eligible candidates.
    pub eligible: Vec<usize>,
    /// Indexes of candidates left out because unhealthy.
    pub health_filtered: Vec<usize>,
}

/// The healthy candidates of the best tier present, not beyond `max_tier`
/// (`SameSite` in Survival: local only). Without `locality_aware`, every
/// healthy candidate up to `max_tier` is eligible and the tier reported is
/// the best among them. `None` if no healthy candidate qualifies.
pub fn choose_locality(
    caller: &Locality,
    candidates: &[Candidate],
    max_tier: LocalityTier,
    locality_aware: bool,
) -> Option<LocalityChoice> {
    let mut health_filtered = Vec::new();
    let mut best: Option<LocalityTier> = None;
    let mut tiers = Vec::with_capacity(candidates.len());
    for (i, c) in candidates.iter().enumerate() {
        let t = locality_tier(caller, c.location, c.locality);
        tiers.push(t);
        if !c.healthy {
            health_filtered.push(i);
        } else if t <= max_tier && best.is_none_or(|b| t < b) {
            best = Some(t);
        }
    }
    let tier = best?;
    let eligible = (0..candidates.len())
        .filter(|&i| {
            candidates[i].healthy && tiers[i] <= max_tier && (!locality_aware || tiers[i] == tier)
        })
        .collect();
    Some(LocalityChoice {
        tier,
        eligible,
        health_filtered,
    })
}

/// Why the picker chose this endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PickReason {
    /// Round robin: next in rotation.
    NextInRotation,
    /// Smooth weighted round robin.
    WeightedRotation,
    /// Fewer requests in flight of two random choices.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Only one endpoint was eligible.
    OnlyCandidate,
}

/// A pick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index of the chosen candidate.
    pub index: usize,
    /// Its tier.
    pub tier: LocalityTier,
    /// How it was chosen.
    pub reason: PickReason,
    /// Candidates left out as unhealthy.
    pub health_filtered: Vec<usize>,
}

/// Most candidates per balancer whose in-flight requests are tracked.
const MAX_CANDIDATES: usize = 1 << 16;

/// Picks endpoints for one (service, subset): a state machine driven by
/// [`Balancer::pick`] and the request start / finish events.
#[derive(Clone, Debug)]
pub struct Balancer {
    lb: LoadBalancer,
    next: usize,
    current: Vec<i64>,
    in_flight: Vec<u32>,
}

impl Balancer {
    /// A balancer with `lb`'s algorithm and locality setting.
    pub fn new(lb: LoadBalancer) -> Balancer {
        Balancer {
            lb,
            next: 0,
            current: Vec::new(),
            in_flight: Vec::new(),
        }
    }

    /// Sizes the per-candidate state to `n` candidates: the weighted
    /// rotation restarts when the list changes length; in-flight counts are
    /// kept for the indexes that remain.
    fn fit(&mut self, n: usize) {
        if self.current.len() != n {
            self.current = vec![0; n];
        }
        self.in_flight.resize(n, 0);
    }

    /// Chooses among `candidates` for a caller at `caller`, not beyond
    /// `max_tier`; `rng` is a uniformly random `u64` (used by least request
    /// and random). `None` if no healthy candidate qualifies.
    pub fn pick(
        &mut self,
        caller: &Locality,
        candidates: &[Candidate],
        max_tier: LocalityTier,
        rng: u64,
    ) -> Option<Pick> {
        self.fit(candidates.len());
        let choice = choose_locality(caller, candidates, max_tier, self.lb.locality_aware)?;
        let e = &choice.eligible;
        let (index, reason) = if e.len() == 1 {
            (e[0], PickReason::OnlyCandidate)
        } else {
            match self.lb.algorithm {
                LbAlgorithm::RoundRobin => {
                    let i = e[self.next % e.len()];
                    self.next = self.next.wrapping_add(1);
                    (i, PickReason::NextInRotation)
                }
                LbAlgorithm::Weighted => {
                    let mut total = 0i64;
                    let mut best = e[0];
                    for &i in e {
                        let w = i64::from(candidates[i].weight.max(1));
                        self.current[i] += w;
                        total += w;
                        if self.current[i] > self.current[best] {
                            best = i;
                        }
                    }
                    self.current[best] -= total;
                    (best, PickReason::WeightedRotation)
                }
                LbAlgorithm::LeastRequest => {
                    let a = e[scale(rng as u32 as u64, e.len())];
                    let b = e[scale(rng >> 32, e.len())];
                    let i = if self.in_flight[b] < self.in_flight[a] {
                        b
                    } else {
                        a
                    };
                    (i, PickReason::LeastRequest)
                }
                LbAlgorithm::Random => (e[scale_u64(rng, e.len())], PickReason::Random),
            }
        };
        Some(Pick {
            index,
            tier: choice.tier,
            reason,
            health_filtered: choice.health_filtered,
        })
    }

    /// A request to candidate `index` started.
    pub fn handle_request_started(&mut self, index: usize) {
        // Indexes come from this balancer's own picks; bound the growth
        // anyway so a stray index cannot allocate without limit.
        if index >= self.in_flight.len() && index < MAX_CANDIDATES {
            self.in_flight.resize(index + 1, 0);
        }
        if let Some(n) = self.in_flight.get_mut(index) {
            *n = n.saturating_add(1);
        }
    }

    /// A request to candidate `index` finished (either way).
    pub fn handle_request_finished(&mut self, index: usize) {
        if let Some(n) = self.in_flight.get_mut(index) {
            *n = n.saturating_sub(1);
        }
    }

    /// Requests in flight to candidate `index`.
    pub fn in_flight(&self, index: usize) -> u32 {
        self.in_flight.get(index).copied().unwrap_or(0)
    }
}

/// A 32-bit random value scaled onto `0..n`.
fn scale(r32: u64, n: usize) -> usize {
    ((r32 * n as u64) >> 32) as usize
}

/// A 64-bit random value scaled onto `0..n`.
fn scale_u64(r: u64, n: usize) -> usize {
    ((u128::from(r) * n as u128) >> 64) as usize
}

/// Whether a request may go to a remote tier while Recovery ramps remote
/// traffic to `percent` (see [`crate::model::Ramp::percent_at`]).
pub fn ramp_admits(percent: u8, rng: u64) -> bool {
    scale_u64(rng, 100) < usize::from(percent.min(100))
}

/// SplitMix64: a small, seeded, reproducible random source for tests and
/// simulations (not for anything secret).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded generator.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn loc(region: &str, zone: &str, site: Option<&str>) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            site: site.map(str::to_string),
        }
    }

    struct Eps {
        addrs: Vec<String>,
        locs: Vec<(EndpointLocation, Locality)>,
        weights: Vec<u32>,
        healthy: Vec<bool>,
    }

    impl Eps {
        fn candidates(&self) -> Vec<Candidate<'_>> {
            (0..self.addrs.len())
                .map(|i| Candidate {
                    address: &self.addrs[i],
                    location: &self.locs[i].0,
                    locality: &self.locs[i].1,
                    weight: self.weights[i],
                    healthy: self.healthy[i],
                })
                .collect()
        }
    }

    fn fleet() -> Eps {
        // 0: same site, 1: same site, 2: other store same zone, 3: other
        // store same region, 4: cloud, 5: other region store.
        Eps {
            addrs: (0..6).map(|i| format!("10.0.0.{i}:8080")).collect(),
            locs: vec![
                (
                    EndpointLocation::Store("sf01".into()),
                    loc("us-west-2", "us-west-2a", Some("sf01")),
                ),
                (
                    EndpointLocation::Store("sf01".into()),
                    loc("us-west-2", "us-west-2a", Some("sf01")),
                ),
                (
                    EndpointLocation::Store("sf02".into()),
                    loc("us-west-2", "us-west-2a", Some("sf02")),
                ),
                (
                    EndpointLocation::Store("la01".into()),
                    loc("us-west-2", "us-west-2b", Some("la01")),
                ),
                (
                    EndpointLocation::Cloud,
                    loc("us-west-2", "us-west-2c", None),
                ),
                (
                    EndpointLocation::Store("ny01".into()),
                    loc("us-east-1", "us-east-1a", Some("ny01")),
                ),
            ],
            weights: vec![1; 6],
            healthy: vec![true; 6],
        }
    }

    #[test]
    fn tiers_prefer_site_then_zone_then_region_then_cloud() {
        let me = loc("us-west-2", "us-west-2a", Some("sf01"));
        let f = fleet();
        let tiers: Vec<LocalityTier> = f
            .locs
            .iter()
            .map(|(l, lo)| locality_tier(&me, l, lo))
            .collect();
        use LocalityTier::*;
        assert_eq!(
            tiers,
            vec![SameSite, SameSite, SameZone, SameRegion, Cloud, Remote]
        );
    }

    #[test]
    fn locality_falls_back_tier_by_tier_as_health_fails() {
        let me = loc("us-west-2", "us-west-2a", Some("sf01"));
        let mut f = fleet();
        let expect = [
            LocalityTier::SameSite,
            LocalityTier::SameSite,
            LocalityTier::SameZone,
            LocalityTier::SameRegion,
            LocalityTier::Cloud,
            LocalityTier::Remote,
        ];
        for (i, t) in expect.iter().enumerate() {
            let c = choose_locality(&me, &f.candidates(), LocalityTier::Remote, true).unwrap();
            assert_eq!(c.tier, *t);
            assert!(c.eligible.contains(&i));
            f.healthy[i] = false;
        }
        assert!(choose_locality(&me, &f.candidates(), LocalityTier::Remote, true).is_none());
    }

    #[test]
    fn survival_is_local_only() {
        let me = loc("us-west-2", "us-west-2a", Some("sf01"));
        let mut f = fleet();
        f.healthy[0] = false;
        f.healthy[1] = false;
        assert!(choose_locality(&me, &f.candidates(), LocalityTier::SameSite, true).is_none());
        let c = choose_locality(&me, &f.candidates(), LocalityTier::Cloud, true).unwrap();
        assert_eq!(c.tier, LocalityTier::SameZone);
        assert_eq!(c.health_filtered, vec![0, 1]);
    }

    #[test]
    fn round_robin_rotates_and_skips_unhealthy() {
        let me = loc("us-west-2", "us-west-2a", Some("sf01"));
        let mut f = fleet();
        f.locs.truncate(3);
        f.addrs.truncate(3);
        f.weights.truncate(3);
        f.healthy = vec![true, true, false];
        // All three at my site.
        f.locs[2] = f.locs[0].clone();
        let mut b = Balancer::new(LoadBalancer {
            algorithm: LbAlgorithm::RoundRobin,
            locality_aware: true,
        });
        let picks: Vec<usize> = (0..4)
            .map(|_| {
                b.pick(&me, &f.candidates(), LocalityTier::Remote, 0)
                    .unwrap()
                    .index
            })
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        let p = b
            .pick(&me, &f.candidates(), LocalityTier::Remote, 0)
            .unwrap();
        assert_eq!(p.health_filtered, vec![2]);
        assert_eq!(p.reason, PickReason::NextInRotation);
    }

    #[test]
    fn weighted_follows_weights_exactly_per_cycle() {
        let me = loc("r", "z", Some("s"));
        let mut f = fleet();
        for l in &mut f.locs {
            *l = (EndpointLocation::Store("s".into()), me.clone());
        }
        f.weights = vec![5, 3, 1, 1, 0, 0];
        let mut b = Balancer::new(LoadBalancer {
            algorithm: LbAlgorithm::Weighted,
            locality_aware: true,
        });
        let mut counts = [0u32; 6];
        // 83 whole cycles of 5 + 3 + 1 + 1 + 1 + 1 picks.
        for _ in 0..83 * 12 {
            counts[b
                .pick(&me, &f.candidates(), LocalityTier::Remote, 0)
                .unwrap()
                .index] += 1;
        }
        // Weight 0 counts as 1 (an endpoint is never starved).
        assert_eq!(counts, [5 * 83, 3 * 83, 83, 83, 83, 83]);
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let me = loc("r", "z", Some("s"));
        let mut f = fleet();
        f.addrs.truncate(2);
        f.locs = vec![(EndpointLocation::Store("s".into()), me.clone()); 2];
        f.weights.truncate(2);
        f.healthy.truncate(2);
        let mut b = Balancer::new(LoadBalancer {
            algorithm: LbAlgorithm::LeastRequest,
            locality_aware: true,
        });
        for _ in 0..5 {
            b.handle_request_started(0);
        }
        let mut rng = SplitMix64::new(7);
        let mut to_busy = 0;
        for _ in 0..1000 {
            if b.pick(&me, &f.candidates(), LocalityTier::Remote, rng.next_u64())
                .unwrap()
                .index
                == 0
            {
                to_busy += 1;
            }
        }
        // Only when both random choices land on the busy one (~25 %).
        assert!((150..350).contains(&to_busy), "{to_busy}");
        for _ in 0..10 {
            b.handle_request_finished(0);
        }
        assert_eq!(b.in_flight(0), 0);
    }

    #[test]
    fn ramp_admits_its_share() {
        let mut rng = SplitMix64::new(1);
        let n = (0..10_000)
            .filter(|_| ramp_admits(16, rng.next_u64()))
            .count();
        assert!((1_450..1_750).contains(&n), "{n}");
        assert!(!ramp_admits(0, u64::MAX));
        assert!(ramp_admits(100, u64::MAX));
    }
}
