//! Routing decisions: which destination (service, subset) a request goes to,
//! then which endpoint serves it.
//!
//! What it is: [`CompiledRoutes`], built once per config version from the
//! model's [`RouteRule`]s (VirtualServices), answers [`CompiledRoutes::route`]:
//! the first HTTP route whose match holds (headers exact / prefix / regex,
//! uri exact / prefix / regex, method), then a weighted pick among its
//! destinations by a random value the caller passes in. [`CompiledRoutes::explain`]
//! gives the same decision with the per-rule evidence the seed shows. The
//! [`balance`] submodule picks the endpoint: locality tiers (same site, same
//! zone, same region, cloud) and round-robin / weighted / least-request /
//! random pickers as plain state machines. Who drives it: the spoke's
//! outbound path, per request. What it must not do: I/O, clocks or its own
//! randomness (randomness comes in as a `u64`; [`SplitMix64`] is a seeded
//! source for tests and simulations).

pub mod balance;

pub use balance::{
    choose_locality, locality_tier, max_tier, ramp_admits, Balancer, Candidate, LocalityChoice,
    LocalityTier, Pick, PickReason, SplitMix64,
};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::istio::compile_regex;
use crate::model::{MeshConfig, RouteRetries, RouteRule, StringMatch};
use crate::request::{normalize_path, HeaderLookup};

/// What routing sees of a request.
#[derive(Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Path (query allowed; it is ignored).
    pub path: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Headers.
    pub headers: &'a dyn HeaderLookup,
}

/// Why this destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RouteReason {
    /// A route with match conditions matched.
    Matched,
    /// A route without match conditions (the default route) took it.
    Default,
    /// No route rule for the host: straight to the host, no subset.
    NoRouteRule,
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteTarget {
    /// Canonical host.
    pub host: Arc<str>,
    /// Subset.
    pub subset: Option<Arc<str>>,
    /// Port.
    pub port: Option<u16>,
}

/// A routing decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDecision {
    /// Name of the route rule (VirtualService) used.
    pub virtual_service: Option<Arc<str>>,
    /// Its namespace.
    pub namespace: Option<Arc<str>>,
    /// Index of the HTTP route taken.
    pub rule_index: Option<usize>,
    /// Its name, if it has one.
    pub rule_name: Option<Arc<str>>,
    /// Destination chosen.
    pub destination: RouteTarget,
    /// Its weight (percent of the route's traffic).
    pub weight: u32,
    /// Sum of the route's weights (100 for validated configs).
    pub total_weight: u32,
    /// Why.
    pub reason: RouteReason,
    /// Request timeout of the route.
    pub timeout: Option<Duration>,
    /// Retries of the route.
    pub retries: Option<Arc<RouteRetries>>,
}

impl RouteDecision {
    /// The seed's reason spelling, e.g. `weighted_random_90_percent`.
    pub fn reason_text(&self) -> String {
        match self.reason {
            RouteReason::NoRouteRule => "no_route_rule_direct".into(),
            _ if self.weight >= self.total_weight => "single_destination_100_percent".into(),
            _ => format!(
                "weighted_random_{}_percent",
                u64::from(self.weight) * 100 / u64::from(self.total_weight.max(1))
            ),
        }
    }
}

/// Why routing failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The host has a route rule, but none of its routes matched the request
    /// (add a route without match as the last one to catch the rest).
    #[error("no route of VirtualService {virtual_service} matches this request to {host}")]
    NoMatchingRoute {
        /// Host requested.
        host: String,
        /// The route rule consulted.
        virtual_service: String,
    },
}

/// Why a config could not be compiled for routing (only possible for a config
/// that did not pass [`crate::istio::parse_documents`]'s checks).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A regex does not compile (or exceeds the size limit).
    #[error("VirtualService {virtual_service}: http[{rule}]: regex {regex:?} does not compile: {reason}")]
    Regex {
        /// Route rule.
        virtual_service: String,
        /// HTTP route index.
        rule: usize,
        /// The pattern.
        regex: String,
        /// Compiler message.
        reason: String,
    },
}

#[derive(Debug)]
enum CMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(regex::Regex),
}

impl CMatch {
    #[inline]
    fn matches(&self, v: &str) -> bool {
        match self {
            CMatch::Exact(e) => v == &**e,
            CMatch::Prefix(p) => v.starts_with(&**p),
            CMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct CRequestMatch {
    uri: Option<CMatch>,
    method: Option<CMatch>,
    headers: Vec<(Box<str>, CMatch)>,
}

impl CRequestMatch {
    #[inline]
    fn matches(&self, path: &str, req: &RouteRequest) -> bool {
        self.uri.as_ref().is_none_or(|m| m.matches(path))
            && self.method.as_ref().is_none_or(|m| m.matches(req.method))
            && self
                .headers
                .iter()
                .all(|(name, m)| req.headers.header(name).is_some_and(|v| m.matches(v)))
    }
}

#[derive(Debug)]
struct CDestination {
    target: RouteTarget,
    weight: u32,
}

#[derive(Debug)]
struct CHttpRoute {
    name: Option<Arc<str>>,
    matches: Vec<CRequestMatch>,
    destinations: Vec<CDestination>,
    total_weight: u32,
    timeout: Option<Duration>,
    retries: Option<Arc<RouteRetries>>,
}

impl CHttpRoute {
    #[inline]
    fn matches(&self, path: &str, req: &RouteRequest) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(path, req))
    }

    /// Weighted pick: `rng` scaled onto `0..total` (multiply-shift, unbiased
    /// enough for 100 buckets), then the first destination whose cumulative
    /// weight exceeds it.
    #[inline]
    fn pick(&self, rng: u64) -> &CDestination {
        let total = u64::from(self.total_weight);
        if total > 0 {
            let r = ((u128::from(rng) * u128::from(total)) >> 64) as u64;
            let mut acc = 0u64;
            for d in &self.destinations {
                acc += u64::from(d.weight);
                if r < acc {
                    return d;
                }
            }
        }
        // All weights 0 (not a validated config) or rounding: the first
        // destination with any weight, else the first. Routes always have at
        // least one destination (checked at compile time).
        self.destinations
            .iter()
            .find(|d| d.weight > 0)
            .unwrap_or(&self.destinations[0])
    }
}

#[derive(Debug)]
struct CRouteRule {
    name: Arc<str>,
    namespace: Arc<str>,
    http: Vec<CHttpRoute>,
}

/// Route rules compiled for fast decisions (one per config version).
#[derive(Debug, Default)]
pub struct CompiledRoutes {
    by_host: HashMap<Box<str>, usize>,
    rules: Vec<CRouteRule>,
    source: Vec<RouteRule>,
}

fn compile_match(m: &StringMatch) -> Result<CMatch, regex::Error> {
    Ok(match m {
        StringMatch::Exact(s) => CMatch::Exact(s.as_str().into()),
        StringMatch::Prefix(s) => CMatch::Prefix(s.as_str().into()),
        StringMatch::Regex(r) => CMatch::Regex(compile_regex(r)?),
    })
}

impl CompiledRoutes {
    /// Compiles the route rules of a config.
    pub fn from_config(config: &MeshConfig) -> Result<CompiledRoutes, CompileError> {
        CompiledRoutes::new(&config.route_rules)
    }

    /// Compiles route rules. A host routed by two rules keeps the first.
    pub fn new(rules: &[RouteRule]) -> Result<CompiledRoutes, CompileError> {
        let mut out = CompiledRoutes {
            source: rules.to_vec(),
            ..CompiledRoutes::default()
        };
        let mut hosts: HashMap<&str, Arc<str>> = HashMap::new();
        for (ri, r) in rules.iter().enumerate() {
            let mut http = Vec::new();
            for (hi, h) in r.http.iter().enumerate() {
                let err = |regex: &str, e: regex::Error| CompileError::Regex {
                    virtual_service: r.id.to_string(),
                    rule: hi,
                    regex: regex.to_string(),
                    reason: e.to_string(),
                };
                let src = |m: &StringMatch| match m {
                    StringMatch::Regex(r) => r.clone(),
                    StringMatch::Exact(s) | StringMatch::Prefix(s) => s.clone(),
                };
                let mut matches = Vec::new();
                for m in &h.matches {
                    let c = |sm: &StringMatch| compile_match(sm).map_err(|e| err(&src(sm), e));
                    matches.push(CRequestMatch {
                        uri: m.uri.as_ref().map(c).transpose()?,
                        method: m.method.as_ref().map(c).transpose()?,
                        headers: m
                            .headers
                            .iter()
                            .map(|hm| Ok((hm.name.to_ascii_lowercase().into(), c(&hm.matcher)?)))
                            .collect::<Result<_, CompileError>>()?,
                    });
                }
                let destinations: Vec<CDestination> = h
                    .route
                    .iter()
                    .map(|d| CDestination {
                        target: RouteTarget {
                            host: hosts
                                .entry(d.destination.host.as_str())
                                .or_insert_with(|| Arc::from(d.destination.host.as_str()))
                                .clone(),
                            subset: d.destination.subset.as_deref().map(Arc::from),
                            port: d.destination.port,
                        },
                        weight: d.weight,
                    })
                    .collect();
                if destinations.is_empty() {
                    // A route without destinations cannot take traffic; a
                    // validated config has none. Skip it rather than panic.
                    continue;
                }
                http.push(CHttpRoute {
                    name: h.name.as_deref().map(Arc::from),
                    total_weight: destinations.iter().map(|d| d.weight).sum(),
                    matches,
                    destinations,
                    timeout: h.timeout,
                    retries: h.retries.clone().map(Arc::new),
                });
            }
            for host in &r.hosts {
                out.by_host.entry(host.as_str().into()).or_insert(ri);
            }
            out.rules.push(CRouteRule {
                name: r.id.name.as_str().into(),
                namespace: r.id.namespace.as_str().into(),
                http,
            });
        }
        Ok(out)
    }

    /// The route rules, as compiled.
    pub fn rules(&self) -> &[RouteRule] {
        &self.source
    }

    /// Routes a request to `host` (canonical, see
    /// [`crate::units::canonical_host`]). `rng` is a uniformly random `u64`
    /// for the weighted split.
    pub fn route(
        &self,
        host: &str,
        req: &RouteRequest,
        rng: u64,
    ) -> Result<RouteDecision, RouteError> {
        let Some(&ri) = self.by_host.get(host) else {
            return Ok(RouteDecision {
                virtual_service: None,
                namespace: None,
                rule_index: None,
                rule_name: None,
                destination: RouteTarget {
                    host: host.into(),
                    subset: None,
                    port: None,
                },
                weight: 100,
                total_weight: 100,
                reason: RouteReason::NoRouteRule,
                timeout: None,
                retries: None,
            });
        };
        let rule = &self.rules[ri];
        let path = normalize_path(req.path);
        for (i, h) in rule.http.iter().enumerate() {
            if h.matches(&path, req) {
                let d = h.pick(rng);
                return Ok(RouteDecision {
                    virtual_service: Some(rule.name.clone()),
                    namespace: Some(rule.namespace.clone()),
                    rule_index: Some(i),
                    rule_name: h.name.clone(),
                    destination: d.target.clone(),
                    weight: d.weight,
                    total_weight: h.total_weight,
                    reason: if h.matches.is_empty() {
                        RouteReason::Default
                    } else {
                        RouteReason::Matched
                    },
                    timeout: h.timeout,
                    retries: h.retries.clone(),
                });
            }
        }
        Err(RouteError::NoMatchingRoute {
            host: host.to_string(),
            virtual_service: format!("{}/{}", rule.namespace, rule.name),
        })
    }

    /// The same decision as [`CompiledRoutes::route`], with the evidence of
    /// every rule evaluated (allocates).
    pub fn explain(&self, host: &str, req: &RouteRequest, rng: u64) -> RouteEvidence {
        let result = self.route(host, req, rng);
        let mut rules_evaluated = Vec::new();
        let mut virtual_service = None;
        if let (Some(&ri), Some(src)) = (
            self.by_host.get(host),
            self.by_host.get(host).and_then(|&i| self.source.get(i)),
        ) {
            let rule = &self.rules[ri];
            virtual_service = Some(rule.name.to_string());
            let path = normalize_path(req.path);
            for (i, (h, hsrc)) in rule.http.iter().zip(&src.http).enumerate() {
                let matched = h.matches(&path, req);
                let mut checks = Vec::new();
                for (m, msrc) in h.matches.iter().zip(&hsrc.matches) {
                    for ((name, cm), hm) in m.headers.iter().zip(&msrc.headers) {
                        let v = req.headers.header(name);
                        checks.push(MatchCheck {
                            field: format!("header {name}"),
                            expected: hm.matcher.clone(),
                            value: v.map(str::to_string),
                            matched: v.is_some_and(|v| cm.matches(v)),
                        });
                    }
                    if let (Some(cm), Some(sm)) = (&m.uri, &msrc.uri) {
                        checks.push(MatchCheck {
                            field: "uri".into(),
                            expected: sm.clone(),
                            value: Some(path.to_string()),
                            matched: cm.matches(&path),
                        });
                    }
                    if let (Some(cm), Some(sm)) = (&m.method, &msrc.method) {
                        checks.push(MatchCheck {
                            field: "method".into(),
                            expected: sm.clone(),
                            value: Some(req.method.to_string()),
                            matched: cm.matches(req.method),
                        });
                    }
                }
                let weights = h
                    .destinations
                    .iter()
                    .map(|d| (d.target.subset.as_deref().map(str::to_string), d.weight))
                    .collect();
                rules_evaluated.push(RouteRuleEvaluation {
                    rule_index: i,
                    default: h.matches.is_empty(),
                    matched,
                    checks,
                    weights: if matched { weights } else { Vec::new() },
                });
                if matched {
                    break;
                }
            }
        }
        RouteEvidence {
            virtual_service,
            rules_evaluated,
            random_value: rng as f64 / 18_446_744_073_709_551_616.0,
            decision: result,
        }
    }
}

/// One checked match condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchCheck {
    /// `header NAME`, `uri` or `method`.
    pub field: String,
    /// The condition.
    pub expected: StringMatch,
    /// The request's value.
    pub value: Option<String>,
    /// Whether it held.
    pub matched: bool,
}

/// One HTTP route's evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRuleEvaluation {
    /// Position.
    pub rule_index: usize,
    /// Route without match conditions.
    pub default: bool,
    /// Whether it took the request.
    pub matched: bool,
    /// Conditions checked.
    pub checks: Vec<MatchCheck>,
    /// (subset, weight) of its destinations, for the route taken.
    pub weights: Vec<(Option<String>, u32)>,
}

/// A routing decision with the evidence of how it was reached.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteEvidence {
    /// Route rule consulted.
    pub virtual_service: Option<String>,
    /// Routes evaluated in order, up to the one taken.
    pub rules_evaluated: Vec<RouteRuleEvaluation>,
    /// The random value as a fraction in `[0, 1)`.
    pub random_value: f64,
    /// The decision.
    pub decision: Result<RouteDecision, RouteError>,
}

impl RouteEvidence {
    /// The seed's "Evidence for routing decision" JSON (`{"routing_decision": …}`),
    /// without the endpoint (chosen later by [`balance`]).
    pub fn to_seed_json(&self) -> Json {
        let rules: Vec<Json> = self
            .rules_evaluated
            .iter()
            .map(|r| {
                let mut m = serde_json::Map::new();
                m.insert("rule_index".into(), json!(r.rule_index));
                if r.default {
                    m.insert("match".into(), json!("default"));
                } else {
                    let checks: Vec<Json> = r
                        .checks
                        .iter()
                        .map(|c| {
                            let (kind, name) = match c.field.split_once(' ') {
                                Some((k, n)) => (k, Some(n)),
                                None => (c.field.as_str(), None),
                            };
                            let expected = match &c.expected {
                                StringMatch::Exact(s)
                                | StringMatch::Prefix(s)
                                | StringMatch::Regex(s) => s,
                            };
                            let mut cm = serde_json::Map::new();
                            cm.insert(kind.into(), json!(name.unwrap_or(kind)));
                            cm.insert("value".into(), json!(expected));
                            cm.insert("request_value".into(), json!(c.value));
                            cm.insert("matched".into(), json!(c.matched));
                            Json::Object(cm)
                        })
                        .collect();
                    let single = checks.len() == 1;
                    m.insert(
                        "match".into(),
                        if single {
                            checks.into_iter().next().unwrap_or(Json::Null)
                        } else {
                            Json::Array(checks)
                        },
                    );
                }
                if r.matched {
                    m.insert(
                        "weights".into(),
                        Json::Array(
                            r.weights
                                .iter()
                                .map(|(s, w)| json!({"subset": s, "weight": w}))
                                .collect(),
                        ),
                    );
                    m.insert("random_value".into(), json!(self.random_value));
                    if let Ok(d) = &self.decision {
                        m.insert(
                            "selected_subset".into(),
                            json!(d.destination.subset.as_deref()),
                        );
                    }
                } else {
                    m.insert("skipped".into(), json!(true));
                }
                Json::Object(m)
            })
            .collect();
        let final_route = match &self.decision {
            Ok(d) => json!({
                "host": &*d.destination.host,
                "subset": d.destination.subset.as_deref(),
                "reason": d.reason_text(),
            }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        json!({
            "routing_decision": {
                "virtual_service": self.virtual_service,
                "rules_evaluated": rules,
                "final_route": final_route,
            }
        })
    }
}
