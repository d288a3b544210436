//! Input shapes to model types, checking everything one document can check
//! on its own. Cross-document checks (a subset a route names exists, a store
//! a workload names exists, one route rule per host) are in
//! [`crate::config`].
//!
//! Each function reports every problem it finds to [`Issues`] with the field
//! path, and returns `None` if there was any.

use std::collections::BTreeMap;
use std::time::Duration;

use tidemesh_identity::SpiffeId;

use super::input::*;
use crate::error::Issues;
use crate::model::*;
use crate::units::{
    canonical_host, check_address, check_host_or_ip, check_label_name, parse_duration, Ratio,
};

/// Largest compiled size of one header/uri regex (bytes): bounds the memory a
/// hostile pattern can make the hub and every spoke spend.
pub(crate) const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// Longest accepted regex source.
const REGEX_MAX_LEN: usize = 1024;
/// Most retries a policy may ask for.
const MAX_RETRY_ATTEMPTS: i64 = 10;
/// Largest `degradation.minRequests`.
const MAX_MIN_REQUESTS: i64 = 1_000_000;
/// Largest `recovery.ramp.toleratedFailures`.
const MAX_TOLERATED_FAILURES: i64 = 1_000_000;

/// Conversion context: the issue sink and the object's namespace.
pub(crate) struct Cx<'a, 'b> {
    pub issues: &'a mut Issues<'b>,
    pub namespace: &'a str,
}

impl Cx<'_, '_> {
    pub(super) fn err(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.issues.add(path, reason);
    }

    fn duration(&mut self, path: &str, s: &Option<String>) -> Option<Duration> {
        let s = s.as_ref()?;
        match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    fn required_duration(&mut self, path: &str, s: &str) -> Option<Duration> {
        self.duration(path, &Some(s.to_string()))
    }

    /// A duration longer than 0.
    fn positive_duration(&mut self, path: &str, s: &str) -> Option<Duration> {
        let d = self.required_duration(path, s)?;
        if d.is_zero() {
            self.err(path, "must be longer than 0");
            return None;
        }
        Some(d)
    }

    /// An integer in `lo..=hi`.
    pub(super) fn int<T: TryFrom<i64>>(
        &mut self,
        path: &str,
        v: i64,
        lo: i64,
        hi: i64,
    ) -> Option<T> {
        if v < lo || v > hi {
            self.err(path, format!("must be between {lo} and {hi}, got {v}"));
            return None;
        }
        T::try_from(v).ok()
    }

    fn opt_int<T: TryFrom<i64>>(
        &mut self,
        path: &str,
        v: Option<i64>,
        lo: i64,
        hi: i64,
    ) -> Option<T> {
        self.int(path, v?, lo, hi)
    }

    fn ratio(&mut self, path: &str, v: f64) -> Option<Ratio> {
        match Ratio::from_f64(v) {
            Ok(r) => Some(r),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    /// `spec.hosts`: at least one, each canonical, none twice.
    fn hosts(&mut self, list: &[String]) -> Vec<String> {
        if list.is_empty() {
            self.err("spec.hosts", "at least one host is required");
        }
        let mut hosts = Vec::new();
        for (i, h) in list.iter().enumerate() {
            if let Some(h) = self.host(&format!("spec.hosts[{i}]"), h) {
                if hosts.contains(&h) {
                    self.err(
                        format!("spec.hosts[{i}]"),
                        format!("host {h} is listed twice"),
                    );
                }
                hosts.push(h);
            }
        }
        hosts
    }

    fn host(&mut self, path: &str, h: &str) -> Option<String> {
        match canonical_host(h, self.namespace) {
            Ok(h) => Some(h),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    pub(super) fn labels(
        &mut self,
        path: &str,
        labels: &Option<BTreeMap<String, String>>,
    ) -> Labels {
        let labels = labels.clone().unwrap_or_default();
        for (k, v) in &labels {
            if k.is_empty() || k.len() > 317 || k.chars().any(|c| c.is_whitespace()) {
                self.err(
                    format!("{path}.{k}"),
                    "label keys must be 1 to 317 characters without spaces",
                );
            }
            if v.len() > 63 || v.chars().any(|c| c.is_whitespace()) {
                self.err(
                    format!("{path}.{k}"),
                    "label values must be at most 63 characters without spaces",
                );
            }
        }
        labels
    }

    pub(super) fn one_of<T: Copy>(
        &mut self,
        path: &str,
        v: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == v) {
            return Some(*t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.err(
            path,
            format!("{v:?} is not supported; use one of {}", names.join(", ")),
        );
        None
    }
}

// --- AuthorizationPolicy ---------------------------------------------------

pub(crate) fn authorization_policy(
    cx: &mut Cx,
    id: ObjectName,
    spec: AuthorizationPolicySpec,
) -> Option<AuthzPolicy> {
    let before = cx.issues.out.count();
    let selector = spec
        .selector
        .map(|s| cx.labels("spec.selector.matchLabels", &s.match_labels))
        .filter(|l| !l.is_empty());
    let action = match spec.action.as_deref() {
        None => Action::Allow,
        Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(a @ ("AUDIT" | "CUSTOM")) => {
            cx.err(
                "spec.action",
                format!("action {a} is not supported by tidemesh; use ALLOW or DENY"),
            );
            Action::Deny
        }
        Some(a) => {
            cx.err(
                "spec.action",
                format!("{a:?} is not an action; use ALLOW or DENY"),
            );
            Action::Deny
        }
    };
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        let mut from = Vec::new();
        for (fi, f) in r.from.unwrap_or_default().into_iter().enumerate() {
            let p = format!("{rp}.from[{fi}].source");
            let principals = f.source.principals.unwrap_or_default();
            let namespaces = f.source.namespaces.unwrap_or_default();
            let request_principals = f.source.request_principals.unwrap_or_default();
            let not_request_principals = f.source.not_request_principals.unwrap_or_default();
            if principals.is_empty()
                && namespaces.is_empty()
                && request_principals.is_empty()
                && not_request_principals.is_empty()
            {
                cx.err(&p, "a source must set principals, namespaces, requestPrincipals or notRequestPrincipals (an empty source would match every caller)");
            }
            for (field, list) in [
                ("requestPrincipals", &request_principals),
                ("notRequestPrincipals", &not_request_principals),
            ] {
                for (i, rp) in list.iter().enumerate() {
                    if let Err(e) = super::reqauthn::check_request_principal(rp) {
                        cx.err(format!("{p}.{field}[{i}]"), e);
                    }
                }
            }
            for (i, pr) in principals.iter().enumerate() {
                if let Err(e) = check_principal(pr) {
                    cx.err(format!("{p}.principals[{i}]"), e);
                }
            }
            for (i, ns) in namespaces.iter().enumerate() {
                if let Err(e) = check_pattern(ns) {
                    cx.err(format!("{p}.namespaces[{i}]"), e);
                }
            }
            from.push(Source {
                principals,
                namespaces,
                request_principals,
                not_request_principals,
            });
        }
        let mut to = Vec::new();
        for (ti, t) in r.to.unwrap_or_default().into_iter().enumerate() {
            let p = format!("{rp}.to[{ti}].operation");
            let methods = t.operation.methods.unwrap_or_default();
            let paths = t.operation.paths.unwrap_or_default();
            let port_strs = t.operation.ports.unwrap_or_default();
            if methods.is_empty() && paths.is_empty() && port_strs.is_empty() {
                cx.err(&p, "an operation must set methods, paths or ports (an empty operation would match every request)");
            }
            for (i, m) in methods.iter().enumerate() {
                if let Err(e) = check_pattern(m) {
                    cx.err(format!("{p}.methods[{i}]"), e);
                } else if m.chars().any(|c| c.is_ascii_lowercase()) {
                    cx.err(
                        format!("{p}.methods[{i}]"),
                        format!(
                            "HTTP methods are case-sensitive and uppercase: write {:?}",
                            m.to_ascii_uppercase()
                        ),
                    );
                }
            }
            for (i, path) in paths.iter().enumerate() {
                if let Err(e) = check_pattern(path) {
                    cx.err(format!("{p}.paths[{i}]"), e);
                } else if !(path.starts_with('/') || path.starts_with('*')) {
                    cx.err(
                        format!("{p}.paths[{i}]"),
                        format!("path {path:?} must start with '/' (or '*' for a suffix match)"),
                    );
                } else if path.contains('{') {
                    cx.err(format!("{p}.paths[{i}]"), "path templates ({*}, {**}) are not supported by tidemesh; use prefix* or *suffix");
                }
            }
            let mut ports = Vec::new();
            for (i, s) in port_strs.iter().enumerate() {
                match s.parse::<u16>() {
                    Ok(n) if n > 0 => ports.push(n),
                    _ => cx.err(
                        format!("{p}.ports[{i}]"),
                        format!("{s:?} is not a port number from 1 to 65535"),
                    ),
                }
            }
            to.push(Operation {
                methods,
                paths,
                ports,
            });
        }
        let mut when = Vec::new();
        for (wi, c) in r.when.unwrap_or_default().into_iter().enumerate() {
            let p = format!("{rp}.when[{wi}]");
            let key = match condition_key(&c.key) {
                Ok(k) => Some(k),
                Err(e) => {
                    cx.err(format!("{p}.key"), e);
                    None
                }
            };
            let values = c.values.unwrap_or_default();
            if values.is_empty() {
                cx.err(
                    format!("{p}.values"),
                    "a condition needs at least one value",
                );
            }
            for (i, v) in values.iter().enumerate() {
                let checked = match key {
                    Some(ConditionKey::SourcePrincipal) => check_principal(v),
                    Some(ConditionKey::RequestAuthPrincipal) => {
                        super::reqauthn::check_request_principal(v)
                    }
                    Some(ConditionKey::DestinationPort) => v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| *n > 0)
                        .map(|_| ())
                        .ok_or_else(|| format!("{v:?} is not a port number from 1 to 65535")),
                    _ => check_pattern(v),
                };
                if let Err(e) = checked {
                    cx.err(format!("{p}.values[{i}]"), e);
                }
            }
            if let Some(key) = key {
                when.push(Condition { key, values });
            }
        }
        rules.push(AuthzRule { from, to, when });
    }
    (cx.issues.out.count() == before).then_some(AuthzPolicy {
        id,
        selector,
        action,
        rules,
    })
}

/// Istio's string patterns: exact, `prefix*`, `*suffix` or `*`.
pub(crate) fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty".into());
    }
    let stars = p.matches('*').count();
    let ok = stars == 0 || p == "*" || (stars == 1 && (p.starts_with('*') || p.ends_with('*')));
    if !ok {
        return Err(format!(
            "{p:?}: '*' is only allowed alone, at the start (*suffix) or at the end (prefix*)"
        ));
    }
    Ok(())
}

/// A principal pattern: a SPIFFE ID without `spiffe://`, as Istio writes it.
pub(crate) fn check_principal(p: &str) -> Result<(), String> {
    check_pattern(p)?;
    if p.starts_with("spiffe://") {
        return Err(format!(
            "write principals without the scheme, as Istio does: {:?}",
            p.trim_start_matches("spiffe://")
        ));
    }
    if !p.contains('*') {
        SpiffeId::parse(&format!("spiffe://{p}"))
            .map_err(|e| format!("{p:?} is not a SPIFFE ID without its scheme: {e}"))?;
    }
    Ok(())
}

/// Fields tidemesh accepts in Istio's schema but does not act on are
/// refused, never ignored; these say what to do instead.
const UNACTED_CONNECT_TIMEOUT: &str = "is not supported by tidemesh: connect timeouts are the spoke's (run --data-* settings, 2 s); remove it";
const UNACTED_PER_CONNECTION: &str =
    "is not supported by tidemesh (connections are pooled and reused); remove it";
const UNACTED_MAX_RETRIES: &str = "is not supported by tidemesh: retries are bounded by the retry budget (20 % of requests plus 10/s) and the mode matrix; remove it";
const UNACTED_EJECTION: &str = "is not supported by tidemesh: every endpoint may be ejected, and traffic fails over local, site, cloud; remove it";

fn condition_key(k: &str) -> Result<ConditionKey, String> {
    if let Some(h) = k
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        let ok = !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !ok {
            return Err(format!("{h:?} is not a header name"));
        }
        return Ok(ConditionKey::RequestHeader(h.to_ascii_lowercase()));
    }
    if let Some(rest) = k.strip_prefix("request.auth.claims") {
        return super::reqauthn::claim_key(rest);
    }
    match k {
        "request.auth.principal" => Ok(ConditionKey::RequestAuthPrincipal),
        "request.auth.audiences" => Ok(ConditionKey::RequestAuthAudiences),
        "request.auth.presenter" => Ok(ConditionKey::RequestAuthPresenter),
        "source.principal" => Ok(ConditionKey::SourcePrincipal),
        "source.namespace" => Ok(ConditionKey::SourceNamespace),
        "destination.port" => Ok(ConditionKey::DestinationPort),
        _ => Err(format!(
            "condition key {k:?} is not supported by tidemesh; use request.headers[NAME], source.principal, source.namespace, destination.port, request.auth.claims[NAME], request.auth.principal, request.auth.audiences or request.auth.presenter"
        )),
    }
}

// --- VirtualService --------------------------------------------------------

pub(crate) fn virtual_service(
    cx: &mut Cx,
    id: ObjectName,
    spec: VirtualServiceSpec,
) -> Option<RouteRule> {
    let before = cx.issues.out.count();
    let hosts = cx.hosts(&spec.hosts);
    let http_in = spec.http.unwrap_or_default();
    if http_in.is_empty() {
        cx.err("spec.http", "at least one http route is required (tcp and tls routes are not supported by tidemesh)");
    }
    let n = http_in.len();
    let mut http = Vec::new();
    for (hi, h) in http_in.into_iter().enumerate() {
        let hp = format!("spec.http[{hi}]");
        let mut matches = Vec::new();
        let match_in = h.matches.unwrap_or_default();
        if match_in.is_empty() && hi + 1 < n {
            cx.err(&hp, format!("a route without match catches every request, so routes {}..{} after it are never used; make it the last", hi + 1, n - 1));
        }
        for (mi, m) in match_in.into_iter().enumerate() {
            let mp = format!("{hp}.match[{mi}]");
            let uri = m
                .uri
                .as_ref()
                .and_then(|s| string_match(cx, &format!("{mp}.uri"), s));
            let method = m
                .method
                .as_ref()
                .and_then(|s| string_match(cx, &format!("{mp}.method"), s));
            let mut headers = Vec::new();
            for (name, sm) in m.headers.unwrap_or_default() {
                let p = format!("{mp}.headers.{name}");
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    cx.err(&p, format!("{name:?} is not a header name"));
                    continue;
                }
                if let Some(matcher) = string_match(cx, &p, &sm) {
                    headers.push(HeaderMatch {
                        name: name.to_ascii_lowercase(),
                        matcher,
                    });
                }
            }
            headers.sort_by(|a, b| a.name.cmp(&b.name));
            matches.push(RequestMatch {
                name: m.name,
                uri,
                method,
                headers,
            });
        }
        let route_in = h.route.unwrap_or_default();
        if route_in.is_empty() {
            cx.err(format!("{hp}.route"), "a route needs at least one destination (redirect, rewrite, fault and mirror are not supported by tidemesh)");
        }
        let single = route_in.len() == 1;
        let mut route = Vec::new();
        let mut sum: i64 = 0;
        let mut last_weight_path = format!("{hp}.route");
        for (di, d) in route_in.into_iter().enumerate() {
            let dp = format!("{hp}.route[{di}]");
            let weight = match d.weight {
                None if single => 100,
                None => 0,
                Some(w) => {
                    last_weight_path = format!("{dp}.weight");
                    cx.int::<u32>(&format!("{dp}.weight"), w, 0, 100)
                        .unwrap_or(0)
                }
            };
            sum += i64::from(weight);
            let host = cx.host(&format!("{dp}.destination.host"), &d.destination.host);
            if let Some(s) = &d.destination.subset {
                if let Err(e) = check_label_name(s) {
                    cx.err(
                        format!("{dp}.destination.subset"),
                        format!("subset name {e}"),
                    );
                }
            }
            let port = d.destination.port.as_ref().and_then(|p| {
                cx.int::<u16>(&format!("{dp}.destination.port.number"), p.number, 1, 65535)
            });
            if let Some(host) = host {
                route.push(WeightedDestination {
                    destination: Destination {
                        host,
                        subset: d.destination.subset.clone(),
                        port,
                    },
                    weight,
                });
            }
        }
        if !route.is_empty() && sum != 100 {
            cx.err(
                last_weight_path,
                format!("weights of a route must sum to 100, got {sum}"),
            );
        }
        let timeout = cx.duration(&format!("{hp}.timeout"), &h.timeout);
        let retries = h.retries.map(|r| {
            let attempts = cx
                .opt_int::<u32>(
                    &format!("{hp}.retries.attempts"),
                    r.attempts,
                    0,
                    MAX_RETRY_ATTEMPTS,
                )
                .unwrap_or(0);
            let per_try_timeout =
                cx.duration(&format!("{hp}.retries.perTryTimeout"), &r.per_try_timeout);
            let retry_on: Vec<String> = r
                .retry_on
                .as_deref()
                .map(|s| {
                    s.split(',')
                        .map(|x| x.trim().to_string())
                        .filter(|x| !x.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            check_retry_on(cx, &format!("{hp}.retries.retryOn"), &retry_on);
            RouteRetries {
                attempts,
                per_try_timeout,
                retry_on,
            }
        });
        http.push(HttpRoute {
            name: h.name,
            matches,
            route,
            timeout,
            retries,
        });
    }
    (cx.issues.out.count() == before).then_some(RouteRule { id, hosts, http })
}

fn string_match(cx: &mut Cx, path: &str, s: &StringMatchIn) -> Option<StringMatch> {
    match (&s.exact, &s.prefix, &s.regex) {
        (Some(e), None, None) => Some(StringMatch::Exact(e.clone())),
        (None, Some(p), None) => Some(StringMatch::Prefix(p.clone())),
        (None, None, Some(r)) => match check_regex(r) {
            Ok(()) => Some(StringMatch::Regex(r.clone())),
            Err(e) => {
                cx.err(format!("{path}.regex"), e);
                None
            }
        },
        _ => {
            cx.err(path, "set exactly one of exact, prefix or regex");
            None
        }
    }
}

/// Compiles a regex the way routing will (whole-value, size-limited).
pub(crate) fn check_regex(r: &str) -> Result<(), String> {
    if r.len() > REGEX_MAX_LEN {
        return Err(format!(
            "regex is {} bytes long; the maximum is {REGEX_MAX_LEN}",
            r.len()
        ));
    }
    compile_regex(r)
        .map(|_| ())
        .map_err(|e| format!("invalid regex: {e}"))
}

/// A regex anchored to match the whole value (Envoy's `safe_regex` semantics).
pub(crate) fn compile_regex(r: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{r})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn check_retry_on(cx: &mut Cx, path: &str, conds: &[String]) {
    for c in conds {
        let numeric = c.parse::<u16>().is_ok_and(|n| (100..600).contains(&n));
        if !numeric && !RETRY_ON.contains(&c.as_str()) {
            cx.err(
                path,
                format!(
                    "retry condition {c:?} is not known; use an HTTP status code or one of {}",
                    RETRY_ON.join(", ")
                ),
            );
        }
    }
}

// --- DestinationRule / DestinationPolicy -----------------------------------

fn subsets(cx: &mut Cx, subsets: Option<Vec<SubsetIn>>) -> Vec<Subset> {
    let mut out: Vec<Subset> = Vec::new();
    for (i, s) in subsets.unwrap_or_default().into_iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if let Err(e) = check_label_name(&s.name) {
            cx.err(format!("{p}.name"), format!("subset name {e}"));
        }
        if out.iter().any(|o| o.name == s.name) {
            cx.err(
                format!("{p}.name"),
                format!("subset {} is defined twice", s.name),
            );
        }
        let labels = cx.labels(&format!("{p}.labels"), &s.labels);
        if labels.is_empty() {
            cx.err(
                format!("{p}.labels"),
                "a subset needs at least one label to select its endpoints",
            );
        }
        out.push(Subset {
            name: s.name,
            labels,
        });
    }
    out
}

pub(crate) fn destination_rule(
    cx: &mut Cx,
    id: ObjectName,
    spec: DestinationRuleSpec,
) -> Option<DestinationPolicy> {
    let before = cx.issues.out.count();
    let host = cx.host("spec.host", &spec.host);
    let subsets = subsets(cx, spec.subsets);
    let mut traffic = TrafficPolicy::default();
    if let Some(tp) = spec.traffic_policy {
        if let Some(lb) = tp.load_balancer {
            let algorithm = match lb.simple.as_deref() {
                None => LbAlgorithm::RoundRobin,
                Some(s) => cx
                    .one_of(
                        "spec.trafficPolicy.loadBalancer.simple",
                        s,
                        &[
                            ("ROUND_ROBIN", LbAlgorithm::RoundRobin),
                            ("LEAST_REQUEST", LbAlgorithm::LeastRequest),
                            ("LEAST_CONN", LbAlgorithm::LeastRequest),
                            ("RANDOM", LbAlgorithm::Random),
                        ],
                    )
                    .unwrap_or(LbAlgorithm::RoundRobin),
            };
            let locality_aware = lb
                .locality_lb_setting
                .and_then(|l| l.enabled)
                .unwrap_or(true);
            traffic.load_balancer = Some(LoadBalancer {
                algorithm,
                locality_aware,
            });
        }
        if let Some(pool) = tp.connection_pool {
            let p = "spec.trafficPolicy.connectionPool";
            let mut l = ConnectionLimits::default();
            if let Some(tcp) = pool.tcp {
                l.max_connections = cx.opt_int(
                    &format!("{p}.tcp.maxConnections"),
                    tcp.max_connections,
                    1,
                    i64::from(u32::MAX),
                );
                if tcp.connect_timeout.is_some() {
                    cx.err(format!("{p}.tcp.connectTimeout"), UNACTED_CONNECT_TIMEOUT);
                }
            }
            if let Some(http) = pool.http {
                let max = i64::from(u32::MAX);
                l.max_pending_requests = cx.opt_int(
                    &format!("{p}.http.http1MaxPendingRequests"),
                    http.http1_max_pending_requests,
                    1,
                    max,
                );
                l.max_requests = cx.opt_int(
                    &format!("{p}.http.http2MaxRequests"),
                    http.http2_max_requests,
                    1,
                    max,
                );
                if http.max_requests_per_connection.is_some() {
                    cx.err(
                        format!("{p}.http.maxRequestsPerConnection"),
                        UNACTED_PER_CONNECTION,
                    );
                }
                if http.max_retries.is_some() {
                    cx.err(format!("{p}.http.maxRetries"), UNACTED_MAX_RETRIES);
                }
            }
            traffic.limits = (l != ConnectionLimits::default()).then_some(l);
        }
        if let Some(od) = tp.outlier_detection {
            let p = "spec.trafficPolicy.outlierDetection";
            let mut cb = CircuitBreaker {
                consecutive_errors: cx.opt_int(
                    &format!("{p}.consecutive5xxErrors"),
                    od.consecutive_5xx_errors,
                    0,
                    1000,
                ),
                ..CircuitBreaker::default()
            };
            if let Some(w) = cx.duration(&format!("{p}.interval"), &od.interval) {
                cb.window = w;
            }
            if let Some(t) = cx.duration(&format!("{p}.baseEjectionTime"), &od.base_ejection_time) {
                cb.open_time = t;
            }
            if od.max_ejection_percent.is_some() {
                cx.err(format!("{p}.maxEjectionPercent"), UNACTED_EJECTION);
            }
            traffic.circuit_breaker = Some(cb);
        }
        if let Some(tls) = &tp.tls {
            traffic.tls = client_tls(cx, "spec.trafficPolicy.tls", tls);
        }
        for (i, pl) in tp.port_level_settings.iter().flatten().enumerate() {
            let p = format!("spec.trafficPolicy.portLevelSettings[{i}]");
            let port: Option<u16> = cx.int(&format!("{p}.port.number"), pl.port.number, 1, 65535);
            let Some(tls) = &pl.tls else {
                cx.err(
                    p,
                    "tidemesh acts only on tls in portLevelSettings; give tls or remove the entry",
                );
                continue;
            };
            let tls = client_tls(cx, &format!("{p}.tls"), tls);
            if let (Some(port), Some(tls)) = (port, tls) {
                if traffic.port_tls.iter().any(|t| t.port == port) {
                    cx.err(
                        format!("{p}.port.number"),
                        format!("port {port} has more than one entry"),
                    );
                }
                traffic.port_tls.push(PortTls { port, tls });
            }
        }
        traffic.port_tls.sort_by_key(|t| t.port);
    }
    let host = host?;
    (cx.issues.out.count() == before).then_some(DestinationPolicy {
        id,
        origin: PolicyOrigin::DestinationRule,
        host,
        subsets,
        traffic,
    })
}

/// An absolute path on the hub, as a TLS file field must be.
fn hub_file(cx: &mut Cx, path: &str, v: &Option<String>) -> Option<String> {
    let v = v.as_ref()?;
    if !v.starts_with('/') || v.len() > 4096 || v.chars().any(char::is_control) {
        cx.err(
            path,
            format!("{v:?} must be an absolute path to a PEM file on the hub"),
        );
        return None;
    }
    Some(v.clone())
}

/// `trafficPolicy.tls` (or a port's): what the hub gateway originates.
fn client_tls(cx: &mut Cx, path: &str, t: &ClientTlsIn) -> Option<ClientTls> {
    let before = cx.issues.out.count();
    let mode = match t.mode.as_deref() {
        None => {
            cx.err(
                format!("{path}.mode"),
                "required: DISABLE, SIMPLE or MUTUAL",
            );
            None
        }
        Some("ISTIO_MUTUAL") => {
            cx.err(
                format!("{path}.mode"),
                "ISTIO_MUTUAL is not supported: the hub's leg to a ServiceEntry host leaves the mesh; use MUTUAL with a client certificate, or SIMPLE",
            );
            None
        }
        Some(m) => cx.one_of(
            &format!("{path}.mode"),
            m,
            &[
                ("DISABLE", TlsMode::Disable),
                ("SIMPLE", TlsMode::Simple),
                ("MUTUAL", TlsMode::Mutual),
            ],
        ),
    };
    if t.credential_name.is_some() {
        cx.err(
            format!("{path}.credentialName"),
            "not supported (there are no Kubernetes secrets at the hub); give caCertificates, clientCertificate and privateKey as files on the hub",
        );
    }
    if t.insecure_skip_verify == Some(true) {
        cx.err(
            format!("{path}.insecureSkipVerify"),
            "tidemesh always verifies the server (against caCertificates, or the hub's system roots when it is not set)",
        );
    }
    if t.ca_crl.is_some() {
        cx.err(
            format!("{path}.caCrl"),
            "certificate revocation lists are not supported by tidemesh's TLS origination",
        );
    }
    let ca = hub_file(cx, &format!("{path}.caCertificates"), &t.ca_certificates);
    let cert = hub_file(
        cx,
        &format!("{path}.clientCertificate"),
        &t.client_certificate,
    );
    let key = hub_file(cx, &format!("{path}.privateKey"), &t.private_key);
    let mut sans = Vec::new();
    for (i, n) in t.subject_alt_names.iter().flatten().enumerate() {
        match check_host_or_ip(n) {
            Ok(()) => sans.push(n.to_ascii_lowercase()),
            Err(e) => cx.err(format!("{path}.subjectAltNames[{i}]"), e),
        }
    }
    let sni = t.sni.as_ref().and_then(|n| {
        let ok = check_host_or_ip(n).is_ok() && n.parse::<std::net::IpAddr>().is_err();
        if !ok {
            cx.err(format!("{path}.sni"), format!("{n:?} is not a DNS name"));
        }
        ok.then(|| n.to_ascii_lowercase())
    });
    match mode {
        Some(TlsMode::Disable) => {
            let set = t.ca_certificates.is_some()
                || t.client_certificate.is_some()
                || t.private_key.is_some()
                || t.sni.is_some()
                || !sans.is_empty();
            if set {
                cx.err(
                    path,
                    "mode DISABLE takes no certificates, sni or subjectAltNames",
                );
            }
        }
        Some(m) => {
            // Without caCertificates the hub verifies against the system
            // roots (as Istio does).
            let pair = [
                ("clientCertificate", &t.client_certificate),
                ("privateKey", &t.private_key),
            ];
            for (name, v) in pair {
                match (m, v.is_some()) {
                    (TlsMode::Mutual, false) => {
                        cx.err(format!("{path}.{name}"), "required for MUTUAL")
                    }
                    (TlsMode::Simple, true) => cx.err(
                        format!("{path}.{name}"),
                        "only MUTUAL presents a client certificate; use mode MUTUAL or remove it",
                    ),
                    _ => {}
                }
            }
        }
        None => {}
    }
    let mode = mode?;
    (cx.issues.out.count() == before).then_some(ClientTls {
        mode,
        ca_certificates: ca,
        client_certificate: cert,
        private_key: key,
        sni,
        subject_alt_names: sans,
    })
}

fn backoff(cx: &mut Cx, path: &str, b: &BackoffIn) -> Option<Backoff> {
    let kind = cx.one_of(
        &format!("{path}.kind"),
        &b.kind,
        &[
            ("NONE", BackoffKind::None),
            ("FIXED", BackoffKind::Fixed),
            ("LINEAR", BackoffKind::Linear),
            ("EXPONENTIAL", BackoffKind::Exponential),
        ],
    )?;
    let base = cx.duration(&format!("{path}.base"), &b.base);
    let max = cx.duration(&format!("{path}.max"), &b.max);
    if kind != BackoffKind::None && base.is_none() {
        cx.err(format!("{path}.base"), "required unless kind is NONE");
        return None;
    }
    let base = base.unwrap_or(Duration::ZERO);
    let max = max.unwrap_or(base);
    if max < base {
        cx.err(format!("{path}.max"), "must not be shorter than base");
        return None;
    }
    Some(Backoff { kind, base, max })
}

pub(crate) fn destination_policy(
    cx: &mut Cx,
    id: ObjectName,
    spec: DestinationPolicySpec,
) -> Option<DestinationPolicy> {
    let before = cx.issues.out.count();
    let host = cx.host("spec.host", &spec.host);
    let subsets = subsets(cx, spec.subsets);
    let max = i64::from(u32::MAX);
    let mut traffic = TrafficPolicy::default();
    if let Some(lb) = spec.load_balancer {
        let algorithm = cx.one_of(
            "spec.loadBalancer.algorithm",
            &lb.algorithm,
            &[
                ("ROUND_ROBIN", LbAlgorithm::RoundRobin),
                ("WEIGHTED", LbAlgorithm::Weighted),
                ("LEAST_REQUEST", LbAlgorithm::LeastRequest),
                ("RANDOM", LbAlgorithm::Random),
            ],
        );
        if let Some(algorithm) = algorithm {
            traffic.load_balancer = Some(LoadBalancer {
                algorithm,
                locality_aware: lb.locality_aware.unwrap_or(true),
            });
        }
    }
    traffic.timeout = cx.duration("spec.timeout", &spec.timeout);
    if let Some(r) = spec.retries {
        let attempts = cx.int::<u32>("spec.retries.attempts", r.attempts, 0, MAX_RETRY_ATTEMPTS);
        let per_try_timeout = cx.duration("spec.retries.perTryTimeout", &r.per_try_timeout);
        let backoff = match &r.backoff {
            Some(b) => backoff(cx, "spec.retries.backoff", b),
            None => Some(Backoff::NONE),
        };
        let retry_on = r.retry_on.unwrap_or_default();
        check_retry_on(cx, "spec.retries.retryOn", &retry_on);
        if let (Some(attempts), Some(backoff)) = (attempts, backoff) {
            traffic.retries = Some(RetryPolicy {
                attempts,
                per_try_timeout,
                backoff,
                retry_on,
            });
        }
    }
    if let Some(c) = spec.circuit_breaker {
        let p = "spec.circuitBreaker";
        let mut cb = CircuitBreaker {
            consecutive_errors: cx.opt_int(
                &format!("{p}.consecutiveErrors"),
                c.consecutive_errors,
                1,
                1000,
            ),
            error_rate_threshold: c
                .error_rate_threshold
                .and_then(|v| cx.ratio(&format!("{p}.errorRateThreshold"), v)),
            ..CircuitBreaker::default()
        };
        if cb.consecutive_errors.is_none() && cb.error_rate_threshold.is_none() {
            cx.err(p, "set consecutiveErrors, errorRateThreshold or both: otherwise the breaker never opens");
        }
        if let Some(v) = cx.opt_int(&format!("{p}.minRequests"), c.min_requests, 1, max) {
            cb.min_requests = v;
        }
        if let Some(w) = cx.duration(&format!("{p}.window"), &c.window) {
            cb.window = w;
        }
        if let Some(t) = cx.duration(&format!("{p}.openTime"), &c.open_time) {
            cb.open_time = t;
        }
        if let Some(v) = cx.opt_int(&format!("{p}.halfOpenProbes"), c.half_open_probes, 1, 1000) {
            cb.half_open_probes = v;
        }
        if c.max_ejection_percent.is_some() {
            cx.err(format!("{p}.maxEjectionPercent"), UNACTED_EJECTION);
        }
        if cb.window.is_zero() {
            cx.err(format!("{p}.window"), "must be longer than 0");
        }
        traffic.circuit_breaker = Some(cb);
    }
    if let Some(l) = spec.limits {
        let p = "spec.limits";
        if l.connect_timeout.is_some() {
            cx.err(format!("{p}.connectTimeout"), UNACTED_CONNECT_TIMEOUT);
        }
        if l.max_requests_per_connection.is_some() {
            cx.err(
                format!("{p}.maxRequestsPerConnection"),
                UNACTED_PER_CONNECTION,
            );
        }
        if l.max_retries.is_some() {
            cx.err(format!("{p}.maxRetries"), UNACTED_MAX_RETRIES);
        }
        let l = ConnectionLimits {
            max_connections: cx.opt_int(&format!("{p}.maxConnections"), l.max_connections, 1, max),
            connect_timeout: None,
            max_pending_requests: cx.opt_int(
                &format!("{p}.maxPendingRequests"),
                l.max_pending_requests,
                1,
                max,
            ),
            max_requests: cx.opt_int(&format!("{p}.maxRequests"), l.max_requests, 1, max),
            max_requests_per_connection: None,
            max_retries: None,
        };
        traffic.limits = (l != ConnectionLimits::default()).then_some(l);
    }
    if let Some(r) = spec.rate_limit {
        let p = "spec.rateLimit";
        let max_tokens = cx.int::<u32>(&format!("{p}.maxTokens"), r.max_tokens, 1, max);
        let tokens_per_fill = match r.tokens_per_fill {
            Some(t) => cx.int::<u32>(&format!("{p}.tokensPerFill"), t, 1, max),
            None => max_tokens,
        };
        let fill_interval = cx.required_duration(&format!("{p}.fillInterval"), &r.fill_interval);
        if fill_interval.is_some_and(|d| d < Duration::from_millis(1)) {
            cx.err(format!("{p}.fillInterval"), "must be at least 1ms");
        }
        if let (Some(max_tokens), Some(tokens_per_fill), Some(fill_interval)) =
            (max_tokens, tokens_per_fill, fill_interval)
        {
            traffic.rate_limit = Some(RateLimit {
                max_tokens,
                tokens_per_fill,
                fill_interval,
            });
        }
    }
    let host = host?;
    (cx.issues.out.count() == before).then_some(DestinationPolicy {
        id,
        origin: PolicyOrigin::DestinationPolicy,
        host,
        subsets,
        traffic,
    })
}

// --- ServiceEntry ----------------------------------------------------------

const PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS"];

pub(crate) fn service_entry(
    cx: &mut Cx,
    id: ObjectName,
    spec: ServiceEntrySpec,
) -> Option<ServiceEntry> {
    let before = cx.issues.out.count();
    let hosts = cx.hosts(&spec.hosts);
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.unwrap_or_default().into_iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        let number = cx.int::<u16>(&format!("{pp}.number"), p.number, 1, 65535);
        if p.name.is_empty() {
            cx.err(format!("{pp}.name"), "must not be empty");
        }
        if ports.iter().any(|o| o.name == p.name) {
            cx.err(
                format!("{pp}.name"),
                format!("port name {} is used twice", p.name),
            );
        }
        if let Some(proto) = &p.protocol {
            if !PROTOCOLS.contains(&proto.as_str()) {
                cx.err(
                    format!("{pp}.protocol"),
                    format!(
                        "{proto:?} is not supported; use one of {}",
                        PROTOCOLS.join(", ")
                    ),
                );
            }
        }
        let target_port = p
            .target_port
            .and_then(|t| cx.int::<u16>(&format!("{pp}.targetPort"), t, 1, 65535));
        if let Some(number) = number {
            ports.push(ServicePort {
                number,
                name: p.name,
                protocol: p.protocol,
                target_port,
            });
        }
    }
    let location = match spec.location.as_deref() {
        None => MeshLocation::MeshExternal,
        Some(l) => cx
            .one_of(
                "spec.location",
                l,
                &[
                    ("MESH_INTERNAL", MeshLocation::MeshInternal),
                    ("MESH_EXTERNAL", MeshLocation::MeshExternal),
                ],
            )
            .unwrap_or(MeshLocation::MeshExternal),
    };
    let resolution = match spec.resolution.as_deref() {
        None => Resolution::None,
        Some(r) => cx
            .one_of(
                "spec.resolution",
                r,
                &[
                    ("NONE", Resolution::None),
                    ("STATIC", Resolution::Static),
                    ("DNS", Resolution::Dns),
                    ("DNS_ROUND_ROBIN", Resolution::DnsRoundRobin),
                ],
            )
            .unwrap_or(Resolution::None),
    };
    let mut endpoints = Vec::new();
    for (i, e) in spec.endpoints.unwrap_or_default().into_iter().enumerate() {
        let ep = format!("spec.endpoints[{i}]");
        if let Err(err) = check_host_or_ip(&e.address) {
            cx.err(format!("{ep}.address"), err);
        } else if resolution == Resolution::Static && e.address.parse::<std::net::IpAddr>().is_err()
        {
            cx.err(
                format!("{ep}.address"),
                "resolution STATIC needs IP addresses; use DNS for names",
            );
        }
        let mut eports = BTreeMap::new();
        for (name, n) in e.ports.unwrap_or_default() {
            if !ports.iter().any(|p| p.name == name) {
                cx.err(
                    format!("{ep}.ports.{name}"),
                    format!("no port named {name} in spec.ports"),
                );
            }
            if let Some(n) = cx.int::<u16>(&format!("{ep}.ports.{name}"), n, 1, 65535) {
                eports.insert(name, n);
            }
        }
        let labels = cx.labels(&format!("{ep}.labels"), &e.labels);
        let locality = e
            .locality
            .as_deref()
            .and_then(|l| match Locality::parse(l) {
                Ok(l) => Some(l),
                Err(err) => {
                    cx.err(format!("{ep}.locality"), err);
                    None
                }
            });
        let weight = cx.opt_int::<u32>(&format!("{ep}.weight"), e.weight, 1, i64::from(u32::MAX));
        endpoints.push(EntryEndpoint {
            address: e.address,
            ports: eports,
            labels,
            locality,
            weight,
        });
    }
    if !endpoints.is_empty() && ports.is_empty() {
        cx.err("spec.ports", "endpoints need at least one port");
    }
    (cx.issues.out.count() == before).then_some(ServiceEntry {
        id,
        hosts,
        ports,
        location,
        resolution,
        endpoints,
    })
}

// --- tidemesh kinds --------------------------------------------------------

pub(crate) fn store(cx: &mut Cx, name: String, spec: StoreSpec) -> Option<Store> {
    let before = cx.issues.out.count();
    if let Err(e) = check_label_name(&name) {
        cx.err("metadata.name", format!("store name {e}"));
    }
    for (field, v) in [("spec.region", &spec.region), ("spec.zone", &spec.zone)] {
        if v.is_empty() || v.contains('/') || v.chars().any(char::is_whitespace) {
            cx.err(field, "must be non-empty, without '/' or spaces");
        }
    }
    (cx.issues.out.count() == before).then_some(Store {
        name,
        region: spec.region,
        zone: spec.zone,
    })
}

pub(crate) fn workload(cx: &mut Cx, id: ObjectName, spec: WorkloadSpec) -> Option<Workload> {
    let before = cx.issues.out.count();
    let service = cx.host("spec.service", &spec.service);
    if let Err(e) = check_label_name(&spec.store) {
        cx.err("spec.store", format!("store name {e}"));
    }
    let sa_ok = !spec.service_account.is_empty()
        && spec.service_account != "."
        && spec.service_account != ".."
        && spec
            .service_account
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !sa_ok {
        cx.err(
            "spec.serviceAccount",
            "must be one SPIFFE path segment (letters, digits, '.', '_', '-')",
        );
    }
    if let Err(e) = check_address(&spec.address) {
        cx.err("spec.address", e);
    }
    let labels = cx.labels("spec.labels", &spec.labels);
    let weight = match spec.weight {
        Some(w) => cx.int::<u32>("spec.weight", w, 1, 1_000_000).unwrap_or(1),
        None => 1,
    };
    let service = service?;
    (cx.issues.out.count() == before).then_some(Workload {
        id,
        service,
        store: spec.store,
        service_account: spec.service_account,
        address: spec.address,
        labels,
        weight,
    })
}

pub(crate) fn mode_matrix(cx: &mut Cx, spec: ModeMatrixSpec) -> Option<ModeMatrix> {
    let before = cx.issues.out.count();
    let mut matrix = ModeMatrix::default();
    let given = [
        (Mode::Target, spec.target),
        (Mode::Degraded, spec.degraded),
        (Mode::Survival, spec.survival),
        (Mode::Recovery, spec.recovery),
    ];
    for (mode, p) in given {
        let Some(p) = p else { continue };
        let path = format!("spec.{}", mode.as_str());
        let profile = matrix.profile_mut(mode);
        if let Some(r) = &p.routing {
            if let Some(r) = cx.one_of(
                &format!("{path}.routing"),
                r,
                &[
                    ("DYNAMIC", RoutingMode::Dynamic),
                    ("HEALTHY_ONLY", RoutingMode::HealthyOnly),
                    ("LOCAL_ONLY", RoutingMode::LocalOnly),
                    ("RAMP", RoutingMode::Ramp),
                ],
            ) {
                profile.routing = r;
            }
        }
        if let Some(r) = &p.retries {
            let attempts = cx.int::<u32>(
                &format!("{path}.retries.attempts"),
                r.attempts,
                0,
                MAX_RETRY_ATTEMPTS,
            );
            let b = match &r.backoff {
                Some(b) => backoff(cx, &format!("{path}.retries.backoff"), b),
                None => Some(Backoff::NONE),
            };
            if let (Some(attempts), Some(backoff)) = (attempts, b) {
                profile.retries = ModeRetries { attempts, backoff };
            }
        }
        if let Some(b) = &p.circuit_breaker {
            match (b.error_rate_threshold, b.fail_fast) {
                (Some(t), None | Some(false)) => {
                    if let Some(r) =
                        cx.ratio(&format!("{path}.circuitBreaker.errorRateThreshold"), t)
                    {
                        profile.breaker = BreakerMode::ErrorRate(r);
                    }
                }
                (None, Some(true)) => profile.breaker = BreakerMode::FailFast,
                _ => cx.err(
                    format!("{path}.circuitBreaker"),
                    "set either errorRateThreshold or failFast: true",
                ),
            }
        }
        if let Some(o) = &p.observability {
            let op = format!("{path}.observability");
            match o.mode.as_str() {
                "TRACING" => {
                    if o.buffered.is_some() {
                        cx.err(format!("{op}.buffered"), "only for mode METRICS_ONLY");
                    }
                    let sampling = o
                        .sampling
                        .map(|s| cx.ratio(&format!("{op}.sampling"), s))
                        .unwrap_or(Some(Ratio::ONE));
                    if let Some(sampling) = sampling {
                        profile.observability = Observability::Tracing { sampling };
                    }
                }
                "METRICS_ONLY" => {
                    if o.sampling.is_some() {
                        cx.err(format!("{op}.sampling"), "only for mode TRACING");
                    }
                    profile.observability = Observability::MetricsOnly {
                        buffered: o.buffered.unwrap_or(true),
                    };
                }
                other => cx.err(
                    format!("{op}.mode"),
                    format!("{other:?} is not supported; use TRACING or METRICS_ONLY"),
                ),
            }
        }
        if let Some(r) = &p.ramp {
            let rp = format!("{path}.ramp");
            let start = cx.int::<u8>(&format!("{rp}.startPercent"), r.start_percent, 1, 100);
            let factor = cx.int::<u8>(&format!("{rp}.factor"), r.factor, 2, 100);
            let step = cx.positive_duration(&format!("{rp}.step"), &r.step);
            let tolerated = match r.tolerated_failures {
                Some(t) => cx.int::<u32>(
                    &format!("{rp}.toleratedFailures"),
                    t,
                    0,
                    MAX_TOLERATED_FAILURES,
                ),
                None => Some(0),
            };
            if let (Some(start_percent), Some(factor), Some(step), Some(tolerated_failures)) =
                (start, factor, step, tolerated)
            {
                profile.ramp = Some(Ramp {
                    start_percent,
                    factor,
                    step,
                    tolerated_failures,
                });
            }
        }
    }
    if let Some(d) = &spec.degradation {
        if let Some(d) = degradation(cx, d) {
            matrix.degradation = d;
        }
    }
    if let Some(r) = &spec.reconnection {
        let rp = "spec.reconnection";
        let checks = match r.health_checks {
            Some(n) => cx.int::<u32>(
                &format!("{rp}.healthChecks"),
                n,
                1,
                i64::from(crate::mode::MAX_HEALTH_CHECKS),
            ),
            None => Some(matrix.reconnection.health_checks),
        };
        let window = match &r.window {
            Some(w) => cx.positive_duration(&format!("{rp}.window"), w),
            None => Some(matrix.reconnection.window),
        };
        if let (Some(health_checks), Some(window)) = (checks, window) {
            matrix.reconnection = Reconnection {
                health_checks,
                window,
            };
        }
    }
    (cx.issues.out.count() == before).then_some(matrix)
}

/// `spec.degradation`: every field optional; the exit threshold defaults to
/// half the entry threshold, and must be below it.
fn degradation(cx: &mut Cx, d: &DegradationIn) -> Option<Degradation> {
    let dp = "spec.degradation";
    let defaults = Degradation::default();
    let enter = match d.enter_error_rate {
        Some(v) => cx.ratio(&format!("{dp}.enterErrorRate"), v).filter(|r| {
            let positive = *r > Ratio::ZERO;
            if !positive {
                cx.err(
                    format!("{dp}.enterErrorRate"),
                    "must be above 0 (0 would make every service Degraded)",
                );
            }
            positive
        }),
        None => Some(defaults.enter_error_rate),
    };
    let exit = match (d.exit_error_rate, enter) {
        (Some(v), _) => cx.ratio(&format!("{dp}.exitErrorRate"), v),
        (None, Some(enter)) => Ratio::from_basis_points(enter.basis_points() / 2),
        (None, None) => None,
    };
    if let (Some(enter), Some(exit)) = (enter, exit) {
        if exit >= enter {
            cx.err(
                format!("{dp}.exitErrorRate"),
                format!(
                    "must be below enterErrorRate ({enter}) so that a service does not flap, got {exit}"
                ),
            );
            return None;
        }
    }
    let window = match &d.window {
        Some(w) => cx.positive_duration(&format!("{dp}.window"), w),
        None => Some(defaults.window),
    };
    let min_requests = match d.min_requests {
        Some(n) => cx.int::<u32>(&format!("{dp}.minRequests"), n, 1, MAX_MIN_REQUESTS),
        None => Some(defaults.min_requests),
    };
    Some(Degradation {
        enter_error_rate: enter?,
        exit_error_rate: exit?,
        window: window?,
        min_requests: min_requests?,
    })
}

pub(crate) fn mesh_settings(cx: &mut Cx, spec: MeshSettingsSpec) -> Option<MeshSettings> {
    let before = cx.issues.out.count();
    let mut s = MeshSettings::default();
    if let Some(a) = &spec.default_action {
        if let Some(a) = cx.one_of(
            "spec.defaultAction",
            a,
            &[("ALLOW", Action::Allow), ("DENY", Action::Deny)],
        ) {
            s.default_action = a;
        }
    }
    if let Some(ns) = spec.root_namespace {
        if let Err(e) = check_label_name(&ns) {
            cx.err("spec.rootNamespace", format!("namespace {e}"));
        }
        s.root_namespace = ns;
    }
    (cx.issues.out.count() == before).then_some(s)
}
