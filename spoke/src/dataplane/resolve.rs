//! From a `Host` to an endpoint: the service's canonical host, the route
//! rule's destination (service, subset), then an endpoint, local first.
//!
//! What it is: the glue between the spoke's registry (its own workloads and
//! the same-site workloads of the last config slice) and the I/O-free
//! routing of `tidemesh-policy` ([`tidemesh_policy::CompiledRoutes`] for the
//! destination, [`Balancer`] for the endpoint). Who drives it: the outbound
//! path, per request. What it must not do: I/O; it reads only memory.
//!
//! Locality: a healthy workload on this spoke wins; only when there is none
//! does the request cross to another spoke of the same site, and only when
//! no site endpoint is usable does it go to the cloud, through the hub's
//! gateway, for hosts a `ServiceEntry` declares. Endpoints whose circuit
//! breaker is open (passive outlier detection, [`super::resilience`]) and
//! endpoints a retry of the same request already tried are skipped while
//! any other endpoint remains.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tidemesh_evidence::record::{
    EndpointCandidate, LbAlgorithm as EvAlgorithm, Locality as EvLocality, RoutingEvidence,
};
use tidemesh_identity::{naming, SpiffeId};
use tidemesh_policy::{
    model::{labels_match, EndpointLocation, LbAlgorithm, LoadBalancer, Locality, RouteRetries},
    routing::{Balancer, Candidate, LocalityTier, PickReason},
    units::canonical_host,
    HeaderLookup, RouteRequest,
};

use super::Shared;

/// Where an endpoint is, nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Tier {
    /// A workload of this spoke.
    Local,
    /// A workload on another spoke of the site.
    Site,
    /// A cloud service behind the hub gateway.
    Cloud,
    /// Every tier as one pool (a destination policy with
    /// `localityAware: false`); never a candidate's tier.
    Any,
}

impl Tier {
    fn reason(self) -> &'static str {
        match self {
            Tier::Local => "local_endpoint_preferred",
            Tier::Site => "no_healthy_local_endpoint_same_site_peer",
            Tier::Cloud => "no_healthy_site_endpoint_cloud_via_hub_gateway",
            Tier::Any => "locality_unaware",
        }
    }
}

/// One balancer per (destination host, subset, tier).
pub(crate) type BalancerKey = (String, Option<String>, Tier);

/// Where the chosen endpoint is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A workload of this spoke (index into `Shared::workloads`).
    Local(usize),
    /// A workload on another spoke of the site, reached through the tunnel.
    Site {
        /// The peer spoke's data address.
        addr: SocketAddr,
        /// The peer spoke's node ID (what its certificate must say).
        server: SpiffeId,
        /// The workload's service account there.
        account: String,
    },
    /// A cloud service: the hub's gateway forwards to one of its endpoints.
    Cloud,
}

/// A resolved request.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// Canonical host of the destination service.
    pub host: String,
    pub target: Target,
    /// The endpoint's key (its circuit breaker's name).
    pub key: String,
    pub evidence: RoutingEvidence,
    /// The route's timeout, if it sets one.
    pub timeout: Option<std::time::Duration>,
    /// The route's retries, if it sets them.
    pub retries: Option<Arc<RouteRetries>>,
    /// The balancer slot picked (least request counts requests in flight).
    pub slot: (BalancerKey, usize),
}

/// Why no endpoint was chosen (the proxy answers with the status).
#[derive(Debug)]
pub(crate) struct Unroutable {
    pub status: hyper::StatusCode,
    pub reason: String,
    pub host: String,
    pub evidence: Option<Box<RoutingEvidence>>,
    /// The mode's limits excluded the cloud tier, which had the only usable
    /// endpoints.
    pub cloud_excluded: bool,
}

pub(crate) struct Cand {
    address: String,
    /// Breaker key: unique per endpoint.
    key: String,
    health: Health,
    weight: u32,
    labels: tidemesh_policy::model::Labels,
    target: Option<Target>,
    tier: Tier,
    locality: EvLocality,
}

/// What vectors need to know of one endpoint of a host.
#[derive(Debug, Clone)]
pub(crate) struct EndpointFacts {
    pub tier: Tier,
    pub address: String,
    pub labels: tidemesh_policy::model::Labels,
    pub target: Option<Target>,
    /// Healthy and its breaker available now.
    pub usable: bool,
}

/// The endpoints of canonical `host` in the config in force, with whether
/// each is usable now.
pub(crate) fn endpoint_facts(s: &Shared, host: &str) -> Vec<EndpointFacts> {
    let compiled = s.compiled();
    let made;
    let known = match compiled.candidates.get(host) {
        Some(c) => c,
        None => {
            made = candidates(s, &compiled.config, &compiled.site, host);
            &made
        }
    };
    let now = Instant::now();
    known
        .iter()
        .map(|c| EndpointFacts {
            tier: c.tier,
            address: c.address.clone(),
            labels: c.labels.clone(),
            target: c.target.clone(),
            usable: c.healthy(s) && c.target.is_some() && s.endpoint_available(&c.key, now, false),
        })
        .collect()
}

/// Where a candidate's health comes from.
#[derive(Debug, Clone, Copy)]
enum Health {
    /// Local workload `i`: its active health check, read per request.
    Local(usize),
    /// Known when the config was compiled.
    Fixed(bool),
}

impl Cand {
    fn healthy(&self, s: &Shared) -> bool {
        match self.health {
            Health::Local(i) => s.workloads.get(i).is_some_and(|w| s.healthy(&w.account)),
            Health::Fixed(h) => h,
        }
    }
}

/// The candidates of every host in `hosts` (computed once per config; only
/// their health and breakers change between requests).
pub(crate) fn candidates_by_host(
    s: &Shared,
    config: &tidemesh_policy::MeshConfig,
    site: &[SiteEndpoint],
    hosts: &std::collections::HashSet<String>,
) -> std::collections::HashMap<String, Vec<Cand>> {
    hosts
        .iter()
        .map(|h| (h.clone(), candidates(s, config, site, h)))
        .collect()
}

/// Every endpoint of canonical `host`: this spoke's workloads (healthy or
/// not, for the evidence), the site's from the last slice, and the cloud
/// endpoints a `ServiceEntry` declares.
fn candidates(
    s: &Shared,
    config: &tidemesh_policy::MeshConfig,
    site: &[SiteEndpoint],
    host: &str,
) -> Vec<Cand> {
    let mut out = Vec::new();
    for (i, w) in s.workloads.iter().enumerate() {
        if w.service == host {
            if let Some(addr) = w.inbound {
                out.push(Cand {
                    address: addr.to_string(),
                    key: format!("local/{}", w.account),
                    health: Health::Local(i),
                    weight: 1,
                    labels: w.labels.clone(),
                    target: Some(Target::Local(i)),
                    tier: Tier::Local,
                    locality: EvLocality::Local,
                });
            }
        }
    }
    for e in site {
        if e.host != host {
            continue;
        }
        out.push(Cand {
            key: e.key.clone(),
            address: e.address.clone(),
            health: Health::Fixed(e.target.is_some()),
            weight: e.weight,
            labels: e.labels.clone(),
            target: e.target.clone(),
            tier: Tier::Site,
            locality: EvLocality::SameZone,
        });
    }
    if config
        .service_entries
        .iter()
        .any(|e| e.hosts.iter().any(|h| h == host))
    {
        let here = config.store(&s.store).map(|st| st.locality());
        for e in config.endpoints_for(host, None).unwrap_or_default() {
            if e.location != EndpointLocation::Cloud {
                continue;
            }
            let same_region = here
                .as_ref()
                .is_some_and(|h| !h.region.is_empty() && h.region == e.locality.region);
            out.push(Cand {
                // The hub gateway picks among them; one breaker for the
                // gateway path of this host.
                key: format!("cloud/{host}"),
                address: e.address,
                health: Health::Fixed(true),
                weight: e.weight.max(1),
                labels: e.labels,
                target: Some(Target::Cloud),
                tier: Tier::Cloud,
                locality: if same_region {
                    EvLocality::SameRegion
                } else {
                    EvLocality::OtherRegion
                },
            });
        }
        if !out.iter().any(|c| c.tier == Tier::Cloud) {
            // An entry without endpoints: the gateway resolves the host.
            out.push(Cand {
                key: format!("cloud/{host}"),
                address: host.to_owned(),
                health: Health::Fixed(true),
                weight: 1,
                labels: Default::default(),
                target: Some(Target::Cloud),
                tier: Tier::Cloud,
                locality: EvLocality::OtherRegion,
            });
        }
    }
    out
}

/// An endpoint on another spoke of the site, as the last slice lists it.
#[derive(Debug, Clone)]
pub(crate) struct SiteEndpoint {
    /// Canonical host of its service.
    pub host: String,
    /// The peer spoke's data address (as registered).
    pub address: String,
    /// Breaker key.
    pub key: String,
    pub weight: u32,
    pub labels: tidemesh_policy::model::Labels,
    /// `None` when the address or node name is unusable.
    pub target: Option<Target>,
}

/// The workloads of other spokes at `node`'s site in `cfg` (the registry
/// of the last slice, and declared workloads of the store), without this
/// spoke's own registrations (named `ACCOUNT.NODE`).
pub(crate) fn site_workloads(
    node: &SpiffeId,
    file: &crate::FileConfig,
    cfg: &tidemesh_policy::MeshConfig,
) -> Vec<tidemesh_policy::model::Workload> {
    let store = match naming::classify(node) {
        Some(naming::MeshIdentity::Node { store, .. }) => store,
        _ => String::new(),
    };
    let own: std::collections::HashSet<&str> = file
        .workloads
        .iter()
        .map(|w| w.service_account.as_str())
        .collect();
    let name = node.path().rsplit('/').next().unwrap_or("").to_owned();
    let suffix = format!(".{name}");
    cfg.workloads
        .iter()
        .filter(|w| {
            w.store == store
                && !(own.contains(w.service_account.as_str()) && w.id.name.ends_with(&suffix))
        })
        .cloned()
        .collect()
}

/// The site's endpoints of `config` (computed once per config).
pub(crate) fn site_endpoints(
    s: &Shared,
    config: &tidemesh_policy::MeshConfig,
) -> Vec<SiteEndpoint> {
    site_workloads(&s.node_id, &s.h.file, config)
        .into_iter()
        .map(|w| {
            let host = canonical_host(&w.service, &w.id.namespace).unwrap_or(w.service.clone());
            let node =
                w.id.name
                    .strip_prefix(&format!("{}.", w.service_account))
                    .unwrap_or("");
            let target = match (
                w.address.parse::<SocketAddr>(),
                naming::node_id(&s.td, &s.store, node),
            ) {
                (Ok(addr), Ok(server)) => Some(Target::Site {
                    addr,
                    server,
                    account: w.service_account.clone(),
                }),
                _ => None,
            };
            SiteEndpoint {
                host,
                key: format!("site/{}/{}", w.address, w.service_account),
                address: w.address,
                weight: w.weight.max(1),
                labels: w.labels,
                target,
            }
        })
        .collect()
}

/// Every canonical service host this spoke could route to (computed once
/// per config).
pub(crate) fn known_hosts(
    s: &Shared,
    config: &tidemesh_policy::MeshConfig,
    site: &[SiteEndpoint],
) -> std::collections::HashSet<String> {
    s.workloads
        .iter()
        .map(|w| w.service.clone())
        .chain(site.iter().map(|e| e.host.clone()))
        .chain(config.services())
        .collect()
}

/// The canonical host a `Host` header names for a caller in `namespace`:
/// `name` is `name.<caller's namespace>` as in Kubernetes, or, when no such
/// service exists, the one service of that name in another namespace.
pub(crate) fn canonical_target(
    known: &std::collections::HashSet<String>,
    host: &str,
    namespace: &str,
) -> Result<String, String> {
    let name = strip_port(host);
    let canon = canonical_host(name, namespace)?;
    if known.contains(&canon) || name.contains('.') {
        return Ok(canon);
    }
    let prefix = format!("{name}.");
    let mut matches: Vec<&String> = known.iter().filter(|h| h.starts_with(&prefix)).collect();
    matches.sort();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Ok(canon),
        many => Err(format!(
            "host {name:?} is ambiguous: {} (use name.namespace)",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host;
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn ev_algorithm(a: LbAlgorithm) -> EvAlgorithm {
    match a {
        LbAlgorithm::RoundRobin => EvAlgorithm::RoundRobin,
        LbAlgorithm::Weighted => EvAlgorithm::WeightedRoundRobin,
        LbAlgorithm::LeastRequest => EvAlgorithm::LeastRequest,
        LbAlgorithm::Random => EvAlgorithm::WeightedRandom,
    }
}

fn pick_reason(r: PickReason) -> &'static str {
    match r {
        PickReason::NextInRotation => "next_in_rotation",
        PickReason::WeightedRotation => "weighted_rotation",
        PickReason::LeastRequest => "least_request",
        PickReason::Random => "random",
        PickReason::OnlyCandidate => "only_candidate",
    }
}

/// Routes a request to `host` (as the caller wrote it) for the caller in
/// `namespace`, skipping endpoints whose breaker is open and those in
/// `exclude` (already tried by this request) while others remain.
#[allow(
    clippy::too_many_arguments,
    reason = "the request's parts; a struct would only rename them"
)]
/// What the mode in force allows routing to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RouteLimits {
    /// Skip the cloud tier: Survival's local only, or a request the
    /// Recovery ramp did not admit to a remote tier.
    pub no_cloud: bool,
    /// Only endpoints whose circuit breaker is closed (Degraded's healthy
    /// only: no half-open probing).
    pub healthy_only: bool,
}

impl RouteLimits {
    /// The limits of a mode's routing.
    pub fn of(routing: tidemesh_policy::model::RoutingMode) -> RouteLimits {
        use tidemesh_policy::model::RoutingMode;
        RouteLimits {
            no_cloud: routing == RoutingMode::LocalOnly,
            healthy_only: routing == RoutingMode::HealthyOnly,
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the request's facts and the mode's limits; a struct would only rename them"
)]
pub(crate) fn resolve(
    s: &Shared,
    host: &str,
    namespace: &str,
    method: &str,
    path: &str,
    headers: &dyn HeaderLookup,
    exclude: &[String],
    limits: RouteLimits,
    now: Instant,
) -> Result<Resolved, Unroutable> {
    let compiled = s.compiled();
    let unroutable = |status, reason: String, host: &str| Unroutable {
        status,
        reason,
        host: host.to_owned(),
        evidence: None,
        cloud_excluded: false,
    };
    let canon = canonical_target(&compiled.hosts, host, namespace)
        .map_err(|e| unroutable(hyper::StatusCode::BAD_REQUEST, e, host))?;
    let req = RouteRequest {
        path,
        method,
        headers,
    };
    let (dest, subset, timeout, retries, split) = match &compiled.routes {
        Some(r) => match route(s, r, &canon, &req) {
            Ok((d, split)) => (
                d.destination.host.to_string(),
                d.destination.subset.as_deref().map(str::to_owned),
                d.timeout,
                d.retries.clone(),
                split,
            ),
            Err(e) => {
                return Err(unroutable(
                    hyper::StatusCode::NOT_FOUND,
                    e.to_string(),
                    &canon,
                ))
            }
        },
        None => (canon.clone(), None, None, None, None),
    };
    let selector = match &subset {
        Some(name) => match compiled
            .config
            .destination_policy(&dest)
            .and_then(|p| p.subset(name))
        {
            Some(sub) => Some(sub.labels.clone()),
            None => {
                return Err(unroutable(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    format!("subset {name:?} of {dest} is not defined"),
                    &dest,
                ))
            }
        },
        None => None,
    };
    let lb = compiled
        .config
        .destination_policy(&dest)
        .and_then(|p| p.traffic.load_balancer)
        .unwrap_or_default();
    let made;
    let known = match compiled.candidates.get(&dest) {
        Some(c) => c,
        None => {
            made = candidates(s, &compiled.config, &compiled.site, &dest);
            &made
        }
    };
    let all: Vec<&Cand> = known
        .iter()
        .filter(|c| {
            // Cloud endpoints carry the entry's labels, not the subset's:
            // a subset selects among workloads.
            c.tier == Tier::Cloud || selector.as_ref().is_none_or(|l| labels_match(l, &c.labels))
        })
        .collect();
    let available: Vec<bool> = all
        .iter()
        .map(|c| {
            c.healthy(s)
                && c.target.is_some()
                && !(limits.no_cloud && c.tier == Tier::Cloud)
                && s.endpoint_available(&c.key, now, limits.healthy_only)
        })
        .collect();
    let mut evidence = RoutingEvidence {
        // A weighted split between subsets is the decision that matters
        // for a canary; the endpoint pick within the subset follows it.
        load_balancing_algorithm: match &split {
            Some(Split::Weighted { .. }) => EvAlgorithm::WeightedRoundRobin,
            _ => ev_algorithm(lb.algorithm),
        },
        available_endpoints: all
            .iter()
            .zip(&available)
            .map(|(c, ok)| EndpointCandidate {
                address: c.address.clone(),
                weight: c.weight,
                healthy: *ok,
                locality: Some(c.locality),
            })
            .collect(),
        selected_endpoint: None,
        selection_reason: String::new(),
        locality: None,
        version: subset.clone(),
    };
    // Nearest tier with a usable endpoint; within it, endpoints this request
    // has not tried yet when there are any. Without locality awareness
    // (`localityAware: false`) every tier is one pool.
    let tiers: &[Tier] = if lb.locality_aware {
        &[Tier::Local, Tier::Site, Tier::Cloud]
    } else {
        &[Tier::Any]
    };
    for &tier in tiers {
        let usable: Vec<usize> = (0..all.len())
            .filter(|&i| (tier == Tier::Any || all[i].tier == tier) && available[i])
            .collect();
        if usable.is_empty() {
            continue;
        }
        let fresh: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| !exclude.contains(&all[i].key))
            .collect();
        if fresh.is_empty()
            && tier != Tier::Cloud
            && tier != Tier::Any
            && has_later_tier(&all, &available, tier, exclude)
        {
            // Every endpoint here failed this request already; a farther
            // tier has one it has not tried.
            continue;
        }
        let pool: Vec<&Cand> = if fresh.is_empty() { &usable } else { &fresh }
            .iter()
            .map(|&i| all[i])
            .collect();
        let Some((i, reason)) = pick(s, &dest, &subset, tier, lb, &pool) else {
            continue;
        };
        let c = pool[i];
        evidence.selected_endpoint = Some(c.address.clone());
        evidence.locality = Some(c.locality);
        evidence.selection_reason = format!(
            "{}{}_{}{}",
            split.as_ref().map(|x| format!("{x};")).unwrap_or_default(),
            pick_reason(reason),
            if tier == Tier::Any {
                "locality_unaware"
            } else {
                c.tier.reason()
            },
            if exclude.is_empty() {
                ""
            } else {
                "_after_retry"
            }
        );
        let target = c.target.clone().ok_or_else(|| Unroutable {
            status: hyper::StatusCode::SERVICE_UNAVAILABLE,
            reason: "no usable endpoint".into(),
            host: dest.clone(),
            evidence: None,
            cloud_excluded: false,
        })?;
        return Ok(Resolved {
            slot: ((dest.clone(), subset.clone(), tier), i),
            host: dest,
            key: c.key.clone(),
            target,
            evidence,
            timeout,
            retries,
        });
    }
    let cloud_excluded = limits.no_cloud
        && all.iter().any(|c| {
            c.tier == Tier::Cloud
                && c.healthy(s)
                && c.target.is_some()
                && s.endpoint_available(&c.key, now, limits.healthy_only)
        });
    let open = all.iter().zip(&available).any(|(c, ok)| {
        let excluded_by_mode = limits.no_cloud && c.tier == Tier::Cloud;
        !(*ok || excluded_by_mode) && c.healthy(s) && c.target.is_some()
    });
    evidence.selection_reason = if all.is_empty() {
        "no_endpoints".into()
    } else if cloud_excluded {
        "local_only_cloud_excluded".into()
    } else if open {
        "circuit_open_on_every_endpoint".into()
    } else {
        "no_healthy_endpoint".into()
    };
    Err(Unroutable {
        status: hyper::StatusCode::SERVICE_UNAVAILABLE,
        reason: if all.is_empty() {
            format!("no endpoint of {dest} on this spoke, at its site or in the cloud")
        } else if cloud_excluded {
            format!("{dest} has no usable endpoint at this site, and the mode routes local only (survival: the hub and the cloud are out of reach)")
        } else if open {
            format!("every endpoint of {dest} is ejected (circuit breaker open)")
        } else {
            format!("no healthy endpoint of {dest} on this spoke, at its site or in the cloud")
        },
        host: dest,
        evidence: Some(Box::new(evidence)),
        cloud_excluded,
    })
}

/// Whether a tier after `tier` has a usable endpoint not in `exclude`.
fn has_later_tier(all: &[&Cand], available: &[bool], tier: Tier, exclude: &[String]) -> bool {
    all.iter()
        .zip(available)
        .any(|(c, ok)| *ok && c.tier > tier && !exclude.contains(&c.key))
}

/// How the route rule chose the destination subset, for the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Split {
    /// A route with match conditions (e.g. `x-canary: true`) took the
    /// request; its one destination has all of the route's weight.
    Matched { rule: usize },
    /// A weighted split (canary): the destination came from the route's
    /// smooth weighted round robin.
    Weighted { rule: usize, percent: u64 },
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Matched { rule } => write!(f, "route_{rule}_matched"),
            Split::Weighted { rule, percent } => {
                write!(
                    f,
                    "route_{rule}_canary_weighted_round_robin_{percent}_percent"
                )
            }
        }
    }
}

/// The rotation state of one weighted route (smooth weighted round robin,
/// as nginx: every pick adds each weight to its counter and takes the
/// largest, which then gives back the total). Deterministic: in each cycle
/// of `total` picks from a (re)start, each destination gets exactly its
/// weight, spread out rather than bunched.
#[derive(Debug, Default)]
pub(crate) struct SplitRotation {
    weights: Vec<u32>,
    current: Vec<i64>,
}

impl SplitRotation {
    /// The index of the next destination; never one of weight 0 unless
    /// every weight is 0 (then the first).
    fn pick(&mut self, weights: &[u32]) -> usize {
        if self.weights != weights {
            // New or changed route: the rotation restarts.
            self.weights = weights.to_vec();
            self.current = vec![0; weights.len()];
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 {
                continue;
            }
            self.current[i] += i64::from(w);
            total += i64::from(w);
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        match best {
            Some(b) => {
                self.current[b] -= total;
                b
            }
            None => 0,
        }
    }
}

/// The route rule's decision for a request to canonical `host`. A weighted
/// split is taken by the route's [`SplitRotation`] instead of a random draw,
/// so a 90/10 canary sends exactly 1 in 10 to the canary.
fn route(
    s: &Shared,
    routes: &tidemesh_policy::CompiledRoutes,
    host: &str,
    req: &RouteRequest,
) -> Result<
    (tidemesh_policy::routing::RouteDecision, Option<Split>),
    tidemesh_policy::routing::RouteError,
> {
    use tidemesh_policy::routing::RouteReason;
    let d = routes.route(host, req, 0)?;
    let Some(rule) = d.rule_index else {
        return Ok((d, None));
    };
    if d.weight >= d.total_weight {
        let split = (d.reason == RouteReason::Matched).then_some(Split::Matched { rule });
        return Ok((d, split));
    }
    let (Some(vs), Some(ns)) = (d.virtual_service.as_deref(), d.namespace.as_deref()) else {
        return Ok((d, None));
    };
    // The compiled route's weights, from its source (same order).
    let weights: Option<Vec<u32>> = routes
        .rules()
        .iter()
        .find(|r| r.id.name == vs && r.id.namespace == ns)
        .and_then(|r| r.http.get(rule))
        .map(|h| h.route.iter().map(|w| w.weight).collect());
    let total = d.total_weight;
    let Some(weights) = weights.filter(|w| w.iter().sum::<u32>() == total && total > 0) else {
        // Not the route we compiled (cannot happen for a validated
        // config): a random draw by weight.
        let d = routes.route(host, req, rand::random())?;
        let percent = u64::from(d.weight) * 100 / u64::from(total.max(1));
        return Ok((d, Some(Split::Weighted { rule, percent })));
    };
    let j = match s.splits.lock() {
        Ok(mut m) => m
            .entry((format!("{ns}/{vs}"), rule))
            .or_default()
            .pick(&weights),
        Err(_) => 0,
    };
    // The draw that lands in destination j's bucket: the route scales
    // `rng` onto 0..total by multiply-shift, so ceil(prefix * 2^64 / total)
    // maps to exactly `prefix`, the first value of j's bucket.
    let prefix: u64 = weights[..j].iter().map(|&w| u64::from(w)).sum();
    let d = routes.route(host, req, bucket_draw(prefix, u64::from(total)))?;
    let percent = u64::from(d.weight) * 100 / u64::from(total);
    Ok((d, Some(Split::Weighted { rule, percent })))
}

/// The `rng` that the route's multiply-shift `(rng * total) >> 64` maps to
/// exactly `prefix` (for `prefix < total`).
fn bucket_draw(prefix: u64, total: u64) -> u64 {
    ((u128::from(prefix) << 64).div_ceil(u128::from(total.max(1)))) as u64
}

fn pick(
    s: &Shared,
    dest: &str,
    subset: &Option<String>,
    tier_of: Tier,
    lb: LoadBalancer,
    tier: &[&Cand],
) -> Option<(usize, PickReason)> {
    if tier.is_empty() {
        return None;
    }
    // One tier at a time: every candidate is at the caller's site.
    let here = Locality {
        site: Some(s.store.clone()),
        ..Locality::default()
    };
    let location = EndpointLocation::Store(s.store.clone());
    let cands: Vec<Candidate> = tier
        .iter()
        .map(|c| Candidate {
            address: &c.address,
            location: &location,
            locality: &here,
            weight: c.weight,
            healthy: c.healthy(s),
        })
        .collect();
    let mut balancers = s.balancers.lock().ok()?;
    let b = balancers
        .entry((dest.to_owned(), subset.clone(), tier_of))
        .or_insert_with(|| Balancer::new(lb));
    let p = b.pick(&here, &cands, LocalityTier::SameSite, rand::random())?;
    Some((p.index, p.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_gives_each_destination_exactly_its_weight_per_cycle() {
        let mut r = SplitRotation::default();
        let picks: Vec<usize> = (0..1000).map(|_| r.pick(&[90, 10])).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 100);
        for cycle in picks.chunks(100) {
            assert_eq!(cycle.iter().filter(|&&i| i == 1).count(), 10);
        }
        // spread out, not bunched: never two canary picks in a row
        assert!(picks.windows(2).all(|w| w != [1, 1]));
        // a weight of 0 is never picked; new weights restart the rotation
        let picks: Vec<usize> = (0..50).map(|_| r.pick(&[0, 3, 2])).collect();
        assert!(!picks.contains(&0));
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 20);
    }

    #[test]
    fn bucket_draw_lands_on_the_bucket_start() {
        for total in [1u64, 3, 7, 100, 101, 1000, u64::from(u32::MAX)] {
            for prefix in [0, 1, total / 2, total - 1] {
                if prefix >= total {
                    continue;
                }
                let rng = bucket_draw(prefix, total);
                let r = ((u128::from(rng) * u128::from(total)) >> 64) as u64;
                assert_eq!(r, prefix, "total {total} prefix {prefix}");
            }
        }
    }
}
