//! Authorization decisions with Istio's semantics, and the evidence behind them.
//!
//! What it is: [`CompiledPolicies`], built once per config version from the
//! model's [`AuthzPolicy`]s, answers "may this request reach this workload?"
//! in two ways: [`CompiledPolicies::decide`] (the hot path: no allocation,
//! returns an [`AuthzVerdict`]) and [`CompiledPolicies::evaluate`] (the same
//! decision plus the evidence the seed shows: policy, rule index and the
//! result of every from / to / when check, see [`AuthzDecision::to_seed_json`]).
//! [`evaluate`] is the one-shot convenience, [`evaluate_uncompiled`] a naive
//! reference used by tests and as the benchmark's baseline. Who drives it: the
//! spoke's inbound path, per request. What it must not do: I/O, clocks (the
//! caller times the evaluation), or allow anything its rules do not.
//!
//! Semantics (Istio's, with a mesh-wide default):
//! 1. A policy selects a workload when it is in the workload's namespace (or
//!    in the root namespace) and its `selector.matchLabels` (if any) are all
//!    among the workload's labels.
//! 2. If any selecting DENY policy matches, deny.
//! 3. If any selecting ALLOW policy matches, allow.
//! 4. If some ALLOW policy selects the workload but none matched, deny.
//! 5. If no ALLOW policy selects it, the mesh default decides (deny for the edge).
//!
//! A policy matches when any of its rules does; a rule when its `from`, `to`
//! and `when` all hold; `from` when any source matches, a source when each of
//! its non-empty fields has a matching value; likewise `to`; `when` when every
//! condition has a matching value. Patterns are exact, `prefix*`, `*suffix`
//! or `*` (present). A request without a principal (no mTLS) matches no
//! principal pattern, not even `*`. Paths are matched after
//! [`normalize_path`].
//!
//! Raw TCP ([`CompiledPolicies::decide_l4`]) has no method, path or
//! headers, so the HTTP-only fields (`to.operation.methods`, `paths`, and
//! `when` on `request.headers[...]`) cannot be checked. As Istio does: in an
//! ALLOW policy a rule that uses any of them never matches TCP (allowing on
//! a condition that cannot be checked would allow too much); in a DENY
//! policy they are ignored and the rest of the rule decides (denying
//! more, never less). Sources, ports and the other `when` keys apply as
//! for HTTP. A JWT's request principal (`requestPrincipals`,
//! `notRequestPrincipals`) and the `request.auth.*` keys are HTTP-only too.
//!
//! Request principals come from [`crate::reqauthn`]: `iss/sub` of a
//! verified token. A request without a token has none, so it matches no
//! `requestPrincipals` pattern (not even `*`) and matches every
//! `notRequestPrincipals` list.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};

use crate::model::{labels_match, Action, AuthzPolicy, ConditionKey, Labels, MeshSettings};
use crate::request::{normalize_path, HeaderLookup};

/// The workload a request is addressed to.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadRef<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a Labels,
}

/// A request to authorize.
#[derive(Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// Destination workload.
    pub workload: WorkloadRef<'a>,
    /// Peer principal from its verified SVID, without `spiffe://` (as in
    /// Istio); `None` for a peer without a verified identity.
    pub source_principal: Option<&'a str>,
    /// Peer namespace, if known.
    pub source_namespace: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// Request path (query allowed; it is ignored).
    pub path: &'a str,
    /// Destination port.
    pub port: u16,
    /// Request headers.
    pub headers: &'a dyn HeaderLookup,
    /// What a verified JWT says (`None`: no token, or no
    /// `RequestAuthentication` applies): `requestPrincipals` and the
    /// `request.auth.*` conditions read it.
    pub request_auth: Option<&'a crate::reqauthn::RequestAuth>,
}

/// Why a decision came out as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthzReason {
    /// A DENY policy matched.
    DenyPolicyMatched,
    /// An ALLOW policy matched.
    AllowPolicyMatched,
    /// ALLOW policies select the workload, none matched.
    NoAllowPolicyMatched,
    /// No ALLOW policy selects the workload: the mesh default applied.
    MeshDefault,
}

impl AuthzReason {
    /// snake_case name, for evidence.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzReason::DenyPolicyMatched => "deny_policy_matched",
            AuthzReason::AllowPolicyMatched => "allow_policy_matched",
            AuthzReason::NoAllowPolicyMatched => "no_allow_policy_matched",
            AuthzReason::MeshDefault => "mesh_default",
        }
    }
}

/// The hot-path answer: no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthzVerdict {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Index (into [`CompiledPolicies::policies`]) of the deciding policy.
    pub policy: Option<usize>,
    /// Index of the matching rule in that policy.
    pub rule_index: Option<usize>,
    /// Why.
    pub reason: AuthzReason,
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CheckResult {
    /// The request satisfies it.
    Matched,
    /// It does not.
    NotMatched,
}

impl CheckResult {
    fn of(b: bool) -> CheckResult {
        if b {
            CheckResult::Matched
        } else {
            CheckResult::NotMatched
        }
    }

    /// `matched` / `not_matched`, as in the seed's evidence.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Matched => "matched",
            CheckResult::NotMatched => "not_matched",
        }
    }
}

/// The `from` check of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromCheck {
    /// The request's principal.
    pub source_principal: Option<String>,
    /// The request's namespace.
    pub source_namespace: Option<String>,
    /// Principal patterns of all sources.
    pub allowed_principals: Vec<String>,
    /// Namespace patterns of all sources.
    pub allowed_namespaces: Vec<String>,
    /// The request principal (`iss/sub` of a verified JWT).
    #[serde(default)]
    pub request_principal: Option<String>,
    /// Request principal patterns of all sources.
    #[serde(default)]
    pub allowed_request_principals: Vec<String>,
    /// `notRequestPrincipals` patterns of all sources.
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Outcome.
    pub result: CheckResult,
}

/// One allowed operation, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedOperation {
    /// Method patterns.
    pub methods: Vec<String>,
    /// Path patterns.
    pub paths: Vec<String>,
    /// Ports.
    pub ports: Vec<u16>,
}

/// The `to` check of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToCheck {
    /// The request's method.
    pub method: String,
    /// The request's normalized path.
    pub path: String,
    /// The request's port.
    pub port: u16,
    /// The rule's operations.
    pub allowed_operations: Vec<AllowedOperation>,
    /// Outcome.
    pub result: CheckResult,
}

/// One `when` condition's check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhenCheck {
    /// The attribute.
    pub key: ConditionKey,
    /// The request's value of it.
    pub value: Option<String>,
    /// Allowed value patterns.
    pub allowed_values: Vec<String>,
    /// Outcome.
    pub result: CheckResult,
}

/// One rule's evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEvaluation {
    /// Position in the policy.
    pub rule_index: usize,
    /// Whether the whole rule matched.
    pub matched: bool,
    /// `from`, if the rule has one.
    pub from: Option<FromCheck>,
    /// `to`, if the rule has one.
    pub to: Option<ToCheck>,
    /// One entry per `when` condition.
    pub when: Vec<WhenCheck>,
}

/// One policy's evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEvaluation {
    /// Policy name.
    pub policy: String,
    /// Policy namespace.
    pub namespace: String,
    /// Its action.
    pub action: Action,
    /// Rules evaluated, in order, up to the first match.
    pub rules_evaluated: Vec<RuleEvaluation>,
}

/// A decision with its evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzDecision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Name of the deciding policy.
    pub policy: Option<String>,
    /// Namespace of the deciding policy.
    pub policy_namespace: Option<String>,
    /// The action applied: the deciding policy's; `Deny` when ALLOW
    /// policies select the workload and none matched; the mesh default's
    /// when no ALLOW policy selects it.
    pub action: Action,
    /// Matching rule of the deciding policy.
    pub rule_index: Option<usize>,
    /// Why.
    pub reason: AuthzReason,
    /// Policies evaluated with per-rule checks: the deciding policy, or,
    /// when no ALLOW policy matched, every ALLOW policy that selects the workload.
    pub evaluated: Vec<PolicyEvaluation>,
    /// Selecting DENY policies that were checked and did not match.
    pub deny_policies_checked: u32,
}

// ---------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------

/// Istio's string pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pattern {
    fn new(p: &str) -> Pattern {
        if p == "*" {
            Pattern::Any
        } else if let Some(s) = p.strip_suffix('*') {
            Pattern::Prefix(s.into())
        } else if let Some(s) = p.strip_prefix('*') {
            Pattern::Suffix(s.into())
        } else {
            Pattern::Exact(p.into())
        }
    }

    #[inline]
    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == &**e,
            Pattern::Prefix(p) => v.starts_with(&**p),
            Pattern::Suffix(s) => v.ends_with(&**s),
        }
    }
}

#[inline]
fn any_matches(patterns: &[Pattern], v: Option<&str>) -> bool {
    match v {
        Some(v) => patterns.iter().any(|p| p.matches(v)),
        None => false,
    }
}

#[derive(Debug)]
struct CSource {
    principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    request_principals: Vec<Pattern>,
    not_request_principals: Vec<Pattern>,
}

#[derive(Debug)]
struct COperation {
    methods: Vec<Pattern>,
    paths: Vec<Pattern>,
    ports: Vec<u16>,
}

#[derive(Debug)]
enum CKey {
    Header(Box<str>),
    Principal,
    Namespace,
    Port,
    Claim(Vec<String>),
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
}

impl CKey {
    /// Only HTTP requests carry it (headers, a JWT's facts).
    fn http_only(&self) -> bool {
        !matches!(self, CKey::Principal | CKey::Namespace | CKey::Port)
    }
}

#[derive(Debug)]
struct CCondition {
    key: CKey,
    values: Vec<Pattern>,
}

#[derive(Debug)]
struct CRule {
    from: Vec<CSource>,
    to: Vec<COperation>,
    when: Vec<CCondition>,
    /// Uses a field only HTTP has (methods, paths, request headers).
    http_only: bool,
}

/// What a connection carries, as far as the rules can see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    /// HTTP: every field applies.
    Http,
    /// Raw TCP: the HTTP-only fields cannot be checked.
    Tcp,
}

#[derive(Debug)]
struct CPolicy {
    selector: Option<Labels>,
    rules: Vec<CRule>,
}

/// Requests with the path already normalized.
struct Req<'a> {
    r: &'a AuthzRequest<'a>,
    path: &'a str,
}

impl CSource {
    #[inline]
    fn matches(&self, q: &Req) -> bool {
        let rp = q.r.request_auth.map(|a| a.principal.as_str());
        (self.principals.is_empty() || any_matches(&self.principals, q.r.source_principal))
            && (self.namespaces.is_empty() || any_matches(&self.namespaces, q.r.source_namespace))
            && (self.request_principals.is_empty() || any_matches(&self.request_principals, rp))
            && (self.not_request_principals.is_empty()
                || !any_matches(&self.not_request_principals, rp))
    }

    /// The source with its HTTP-only fields (request principals) ignored.
    #[inline]
    fn matches_l4(&self, q: &Req) -> bool {
        (self.principals.is_empty() || any_matches(&self.principals, q.r.source_principal))
            && (self.namespaces.is_empty() || any_matches(&self.namespaces, q.r.source_namespace))
    }
}

impl COperation {
    #[inline]
    fn matches(&self, q: &Req) -> bool {
        (self.methods.is_empty() || any_matches(&self.methods, Some(q.r.method)))
            && (self.paths.is_empty() || any_matches(&self.paths, Some(q.path)))
            && self.matches_port(q)
    }

    /// The operation with its HTTP-only fields ignored.
    #[inline]
    fn matches_port(&self, q: &Req) -> bool {
        self.ports.is_empty() || self.ports.contains(&q.r.port)
    }
}

impl CCondition {
    fn value<'a>(&self, q: &'a Req<'a>, port_buf: &'a mut [u8; 5]) -> Option<&'a str> {
        match &self.key {
            CKey::Header(h) => q.r.headers.header(h),
            CKey::Principal => q.r.source_principal,
            CKey::Namespace => q.r.source_namespace,
            CKey::Port => Some(port_str(q.r.port, port_buf)),
            CKey::AuthPrincipal => q.r.request_auth.map(|a| a.principal.as_str()),
            CKey::AuthPresenter => q.r.request_auth.and_then(|a| a.presenter.as_deref()),
            // multi-valued: see `values`
            CKey::Claim(_) | CKey::AuthAudiences => None,
        }
    }

    /// Every value of a multi-valued key (a list claim, the audiences).
    fn values_of(&self, q: &Req) -> Option<Vec<String>> {
        match &self.key {
            CKey::Claim(path) => Some(q.r.request_auth?.claim_values(path)),
            CKey::AuthAudiences => Some(q.r.request_auth?.audiences.clone()),
            _ => None,
        }
    }

    /// The request's value, as evidence shows it.
    fn value_text(&self, q: &Req) -> Option<String> {
        if matches!(self.key, CKey::Claim(_) | CKey::AuthAudiences) {
            return self.values_of(q).map(|v| v.join(","));
        }
        let mut buf = [0u8; 5];
        self.value(q, &mut buf).map(str::to_string)
    }

    #[inline]
    fn matches(&self, q: &Req) -> bool {
        if matches!(self.key, CKey::Claim(_) | CKey::AuthAudiences) {
            return self
                .values_of(q)
                .is_some_and(|vs| vs.iter().any(|v| any_matches(&self.values, Some(v))));
        }
        let mut buf = [0u8; 5];
        let v = self.value(q, &mut buf);
        any_matches(&self.values, v)
    }
}

/// Formats a port into `buf` without allocating.
fn port_str(port: u16, buf: &mut [u8; 5]) -> &str {
    let mut n = port;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

impl CRule {
    #[inline]
    fn matches(&self, q: &Req) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(q)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(q)))
            && self.when.iter().all(|c| c.matches(q))
    }

    /// Whether the rule matches a raw TCP connection in a policy of
    /// `action` (see the module docs): an ALLOW rule with HTTP-only fields
    /// never does; a DENY rule is checked without them.
    #[inline]
    fn matches_tcp(&self, q: &Req, action: Action) -> bool {
        if action == Action::Allow && self.http_only {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches_l4(q)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches_port(q)))
            && self
                .when
                .iter()
                .filter(|c| !c.key.http_only())
                .all(|c| c.matches(q))
    }

    #[inline]
    fn matches_on(&self, q: &Req, layer: Layer, action: Action) -> bool {
        match layer {
            Layer::Http => self.matches(q),
            Layer::Tcp => self.matches_tcp(q, action),
        }
    }
}

impl CPolicy {
    #[inline]
    fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|s| labels_match(s, labels))
    }

    #[inline]
    fn first_match(&self, q: &Req, layer: Layer, action: Action) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.matches_on(q, layer, action))
    }
}

#[derive(Debug, Default)]
struct Bucket {
    deny: Vec<u32>,
    allow: Vec<u32>,
}

/// Authorization policies compiled for fast evaluation (one per config version).
#[derive(Debug)]
pub struct CompiledPolicies {
    source: Vec<AuthzPolicy>,
    compiled: Vec<CPolicy>,
    by_namespace: HashMap<Box<str>, Bucket>,
    root: Bucket,
    root_namespace: Box<str>,
    default_action: Action,
}

impl CompiledPolicies {
    /// Compiles `policies` with the mesh settings (root namespace, default action).
    pub fn new(policies: &[AuthzPolicy], settings: &MeshSettings) -> CompiledPolicies {
        let mut by_namespace: HashMap<Box<str>, Bucket> = HashMap::new();
        let mut root = Bucket::default();
        let mut compiled = Vec::with_capacity(policies.len());
        for (i, p) in policies.iter().enumerate() {
            let bucket = if p.id.namespace == settings.root_namespace {
                &mut root
            } else {
                by_namespace
                    .entry(p.id.namespace.as_str().into())
                    .or_default()
            };
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            match p.action {
                Action::Deny => bucket.deny.push(idx),
                Action::Allow => bucket.allow.push(idx),
            }
            compiled.push(compile_policy(p));
        }
        CompiledPolicies {
            source: policies.to_vec(),
            compiled,
            by_namespace,
            root,
            root_namespace: settings.root_namespace.as_str().into(),
            default_action: settings.default_action,
        }
    }

    /// Compiles the policies of a whole config.
    pub fn from_config(config: &crate::MeshConfig) -> CompiledPolicies {
        CompiledPolicies::new(&config.authz_policies, &config.settings)
    }

    /// The policies, in the order verdict indexes refer to.
    pub fn policies(&self) -> &[AuthzPolicy] {
        &self.source
    }

    /// The mesh default action.
    pub fn default_action(&self) -> Action {
        self.default_action
    }

    /// The policies that apply to `workload` (its namespace's and the root
    /// namespace's, whose selector matches its labels), in order.
    pub fn applicable(&self, workload: WorkloadRef<'_>) -> Vec<&AuthzPolicy> {
        self.source
            .iter()
            .zip(&self.compiled)
            .filter(|(p, c)| {
                (p.id.namespace == workload.namespace || *p.id.namespace == *self.root_namespace)
                    && c.selects(workload.labels)
            })
            .map(|(p, _)| p)
            .collect()
    }

    fn buckets<'a>(&'a self, namespace: &str) -> [Option<&'a Bucket>; 2] {
        let ns = if namespace == &*self.root_namespace {
            None
        } else {
            self.by_namespace.get(namespace)
        };
        [Some(&self.root), ns]
    }

    /// The decision, without evidence and without allocating (unless the
    /// path needs normalizing, or a rule tests a claim or the audiences).
    pub fn decide(&self, request: &AuthzRequest) -> AuthzVerdict {
        self.decide_on(request, Layer::Http)
    }

    /// The decision for a raw TCP connection: `method`, `path` and
    /// `headers` of `request` are not read, and rules that need them are
    /// treated as Istio treats them for TCP (see the module docs: an ALLOW
    /// rule using them never matches, a DENY rule is checked without them).
    pub fn decide_l4(&self, request: &AuthzRequest) -> AuthzVerdict {
        self.decide_on(request, Layer::Tcp)
    }

    fn decide_on(&self, request: &AuthzRequest, layer: Layer) -> AuthzVerdict {
        let path = match layer {
            Layer::Http => normalize_path(request.path),
            Layer::Tcp => std::borrow::Cow::Borrowed(""),
        };
        let q = Req {
            r: request,
            path: &path,
        };
        let labels = request.workload.labels;
        let buckets = self.buckets(request.workload.namespace);
        for b in buckets.iter().flatten() {
            for &i in &b.deny {
                let p = &self.compiled[i as usize];
                if p.selects(labels) {
                    if let Some(r) = p.first_match(&q, layer, Action::Deny) {
                        return AuthzVerdict {
                            allowed: false,
                            policy: Some(i as usize),
                            rule_index: Some(r),
                            reason: AuthzReason::DenyPolicyMatched,
                        };
                    }
                }
            }
        }
        let mut any_allow = false;
        for b in buckets.iter().flatten() {
            for &i in &b.allow {
                let p = &self.compiled[i as usize];
                if p.selects(labels) {
                    any_allow = true;
                    if let Some(r) = p.first_match(&q, layer, Action::Allow) {
                        return AuthzVerdict {
                            allowed: true,
                            policy: Some(i as usize),
                            rule_index: Some(r),
                            reason: AuthzReason::AllowPolicyMatched,
                        };
                    }
                }
            }
        }
        if any_allow {
            AuthzVerdict {
                allowed: false,
                policy: None,
                rule_index: None,
                reason: AuthzReason::NoAllowPolicyMatched,
            }
        } else {
            AuthzVerdict {
                allowed: self.default_action == Action::Allow,
                policy: None,
                rule_index: None,
                reason: AuthzReason::MeshDefault,
            }
        }
    }

    /// The decision with its evidence (allocates; the decision is the same as
    /// [`CompiledPolicies::decide`]'s).
    pub fn evaluate(&self, request: &AuthzRequest) -> AuthzDecision {
        let verdict = self.decide(request);
        let path = normalize_path(request.path);
        let q = Req {
            r: request,
            path: &path,
        };
        let labels = request.workload.labels;
        let selecting = |action: Action| -> Vec<usize> {
            self.buckets(request.workload.namespace)
                .iter()
                .flatten()
                .flat_map(|b| match action {
                    Action::Deny => b.deny.iter(),
                    Action::Allow => b.allow.iter(),
                })
                .map(|&i| i as usize)
                .filter(|&i| self.compiled[i].selects(labels))
                .collect()
        };
        let deny_selecting = selecting(Action::Deny);
        let (evaluated, deny_checked) = match verdict.reason {
            AuthzReason::DenyPolicyMatched | AuthzReason::AllowPolicyMatched => {
                let i = verdict.policy.unwrap_or_default();
                let checked = match verdict.reason {
                    AuthzReason::DenyPolicyMatched => {
                        deny_selecting.iter().take_while(|&&d| d != i).count()
                    }
                    _ => deny_selecting.len(),
                };
                (vec![self.explain_policy(i, &q)], checked)
            }
            AuthzReason::NoAllowPolicyMatched => (
                selecting(Action::Allow)
                    .into_iter()
                    .map(|i| self.explain_policy(i, &q))
                    .collect(),
                deny_selecting.len(),
            ),
            AuthzReason::MeshDefault => (Vec::new(), deny_selecting.len()),
        };
        let deciding = verdict.policy.and_then(|i| self.source.get(i));
        AuthzDecision {
            allowed: verdict.allowed,
            policy: deciding.map(|p| p.id.name.clone()),
            policy_namespace: deciding.map(|p| p.id.namespace.clone()),
            action: match verdict.reason {
                AuthzReason::MeshDefault => self.default_action,
                AuthzReason::NoAllowPolicyMatched => Action::Deny,
                _ => deciding.map_or(self.default_action, |p| p.action),
            },
            rule_index: verdict.rule_index,
            reason: verdict.reason,
            evaluated,
            deny_policies_checked: u32::try_from(deny_checked).unwrap_or(u32::MAX),
        }
    }

    fn explain_policy(&self, i: usize, q: &Req) -> PolicyEvaluation {
        let p = &self.source[i];
        let c = &self.compiled[i];
        let mut rules_evaluated = Vec::new();
        for (ri, (rule, crule)) in p.rules.iter().zip(&c.rules).enumerate() {
            let from = (!rule.from.is_empty()).then(|| FromCheck {
                source_principal: q.r.source_principal.map(str::to_string),
                source_namespace: q.r.source_namespace.map(str::to_string),
                allowed_principals: rule
                    .from
                    .iter()
                    .flat_map(|s| s.principals.iter().cloned())
                    .collect(),
                allowed_namespaces: rule
                    .from
                    .iter()
                    .flat_map(|s| s.namespaces.iter().cloned())
                    .collect(),
                request_principal: q.r.request_auth.map(|a| a.principal.clone()),
                allowed_request_principals: rule
                    .from
                    .iter()
                    .flat_map(|s| s.request_principals.iter().cloned())
                    .collect(),
                not_request_principals: rule
                    .from
                    .iter()
                    .flat_map(|s| s.not_request_principals.iter().cloned())
                    .collect(),
                result: CheckResult::of(crule.from.iter().any(|s| s.matches(q))),
            });
            let to = (!rule.to.is_empty()).then(|| ToCheck {
                method: q.r.method.to_string(),
                path: q.path.to_string(),
                port: q.r.port,
                allowed_operations: rule
                    .to
                    .iter()
                    .map(|o| AllowedOperation {
                        methods: o.methods.clone(),
                        paths: o.paths.clone(),
                        ports: o.ports.clone(),
                    })
                    .collect(),
                result: CheckResult::of(crule.to.iter().any(|o| o.matches(q))),
            });
            let when = rule
                .when
                .iter()
                .zip(&crule.when)
                .map(|(cond, ccond)| WhenCheck {
                    key: cond.key.clone(),
                    value: ccond.value_text(q),
                    allowed_values: cond.values.clone(),
                    result: CheckResult::of(ccond.matches(q)),
                })
                .collect();
            let matched = crule.matches(q);
            rules_evaluated.push(RuleEvaluation {
                rule_index: ri,
                matched,
                from,
                to,
                when,
            });
            if matched {
                break;
            }
        }
        PolicyEvaluation {
            policy: p.id.name.clone(),
            namespace: p.id.namespace.clone(),
            action: p.action,
            rules_evaluated,
        }
    }
}

fn compile_policy(p: &AuthzPolicy) -> CPolicy {
    let pats = |v: &[String]| v.iter().map(|s| Pattern::new(s)).collect::<Vec<_>>();
    CPolicy {
        selector: p.selector.clone().filter(|s| !s.is_empty()),
        rules: p
            .rules
            .iter()
            .map(|r| CRule {
                http_only: r
                    .to
                    .iter()
                    .any(|o| !o.methods.is_empty() || !o.paths.is_empty())
                    || r.from.iter().any(|s| {
                        !s.request_principals.is_empty() || !s.not_request_principals.is_empty()
                    })
                    || r.when.iter().any(|c| c.key.is_http_only()),
                from: r
                    .from
                    .iter()
                    .map(|s| CSource {
                        principals: pats(&s.principals),
                        namespaces: pats(&s.namespaces),
                        request_principals: pats(&s.request_principals),
                        not_request_principals: pats(&s.not_request_principals),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|o| COperation {
                        methods: pats(&o.methods),
                        paths: pats(&o.paths),
                        ports: o.ports.clone(),
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| CCondition {
                        key: match &c.key {
                            ConditionKey::RequestHeader(h) => {
                                CKey::Header(h.to_ascii_lowercase().into())
                            }
                            ConditionKey::SourcePrincipal => CKey::Principal,
                            ConditionKey::SourceNamespace => CKey::Namespace,
                            ConditionKey::DestinationPort => CKey::Port,
                            ConditionKey::RequestAuthClaim(p) => CKey::Claim(p.clone()),
                            ConditionKey::RequestAuthPrincipal => CKey::AuthPrincipal,
                            ConditionKey::RequestAuthAudiences => CKey::AuthAudiences,
                            ConditionKey::RequestAuthPresenter => CKey::AuthPresenter,
                        },
                        values: pats(&c.values),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// One-shot evaluation with evidence: compiles `policies` and evaluates.
/// Compile once with [`CompiledPolicies::new`] when deciding more than once.
pub fn evaluate(
    policies: &[AuthzPolicy],
    request: &AuthzRequest,
    settings: &MeshSettings,
) -> AuthzDecision {
    CompiledPolicies::new(policies, settings).evaluate(request)
}

/// A naive, uncompiled evaluation straight from the model (patterns re-read on
/// every call, every policy scanned). The reference the compiled form is
/// tested against, and the benchmark's baseline.
pub fn evaluate_uncompiled(
    policies: &[AuthzPolicy],
    request: &AuthzRequest,
    settings: &MeshSettings,
) -> bool {
    let path = normalize_path(request.path);
    let pat = |p: &String, v: Option<&str>| v.is_some_and(|v| Pattern::new(p).matches(v));
    let selects = |p: &AuthzPolicy| {
        (p.id.namespace == settings.root_namespace || p.id.namespace == request.workload.namespace)
            && p.selector
                .as_ref()
                .is_none_or(|s| labels_match(s, request.workload.labels))
    };
    let rp = request.request_auth.map(|a| a.principal.as_str());
    let rule_matches = |r: &crate::model::AuthzRule| {
        let from = r.from.is_empty()
            || r.from.iter().any(|s| {
                (s.principals.is_empty()
                    || s.principals
                        .iter()
                        .any(|p| pat(p, request.source_principal)))
                    && (s.namespaces.is_empty()
                        || s.namespaces
                            .iter()
                            .any(|p| pat(p, request.source_namespace)))
                    && (s.request_principals.is_empty()
                        || s.request_principals.iter().any(|p| pat(p, rp)))
                    && (s.not_request_principals.is_empty()
                        || !s.not_request_principals.iter().any(|p| pat(p, rp)))
            });
        let to = r.to.is_empty()
            || r.to.iter().any(|o| {
                (o.methods.is_empty() || o.methods.iter().any(|p| pat(p, Some(request.method))))
                    && (o.paths.is_empty() || o.paths.iter().any(|p| pat(p, Some(&path))))
                    && (o.ports.is_empty() || o.ports.contains(&request.port))
            });
        let when = r.when.iter().all(|c| {
            let port = request.port.to_string();
            let auth = request.request_auth;
            let many = match &c.key {
                ConditionKey::RequestAuthClaim(path) => auth.map(|a| a.claim_values(path)),
                ConditionKey::RequestAuthAudiences => auth.map(|a| a.audiences.clone()),
                _ => None,
            };
            if let Some(vs) = many {
                return vs.iter().any(|v| c.values.iter().any(|p| pat(p, Some(v))));
            }
            let v = match &c.key {
                ConditionKey::RequestHeader(h) => request.headers.header(h),
                ConditionKey::SourcePrincipal => request.source_principal,
                ConditionKey::SourceNamespace => request.source_namespace,
                ConditionKey::DestinationPort => Some(port.as_str()),
                ConditionKey::RequestAuthPrincipal => auth.map(|a| a.principal.as_str()),
                ConditionKey::RequestAuthPresenter => auth.and_then(|a| a.presenter.as_deref()),
                ConditionKey::RequestAuthClaim(_) | ConditionKey::RequestAuthAudiences => None,
            };
            c.values.iter().any(|p| pat(p, v))
        });
        from && to && when
    };
    let matches = |p: &AuthzPolicy| p.rules.iter().any(rule_matches);
    if policies
        .iter()
        .any(|p| p.action == Action::Deny && selects(p) && matches(p))
    {
        return false;
    }
    let allow: Vec<&AuthzPolicy> = policies
        .iter()
        .filter(|p| p.action == Action::Allow && selects(p))
        .collect();
    if allow.is_empty() {
        return settings.default_action == Action::Allow;
    }
    allow.into_iter().any(matches)
}

// ---------------------------------------------------------------------------
// The seed's evidence shape
// ---------------------------------------------------------------------------

impl AuthzDecision {
    /// The decision as the seed's "Authorization Policy Evidence" JSON
    /// (`{"policy_evaluation": {...}}`). `evaluation_time` is the caller's
    /// measurement, if any (this crate reads no clock); whole milliseconds
    /// print as an integer like the seed's, finer values as a fraction.
    pub fn to_seed_json(&self, evaluation_time: Option<std::time::Duration>) -> Json {
        let mut pe = Map::new();
        match self.evaluated.as_slice() {
            [one] if self.policy.is_some() => {
                pe.insert("policy".into(), json!(one.policy));
                pe.insert("namespace".into(), json!(one.namespace));
                pe.insert("action".into(), json!(one.action.as_str()));
                pe.insert("rules_evaluated".into(), rules_json(&one.rules_evaluated));
            }
            many => {
                pe.insert("policy".into(), Json::Null);
                pe.insert("reason".into(), json!(self.reason.as_str()));
                pe.insert(
                    "policies_evaluated".into(),
                    Json::Array(
                        many.iter()
                            .map(|p| {
                                json!({
                                    "policy": p.policy,
                                    "namespace": p.namespace,
                                    "action": p.action.as_str(),
                                    "rules_evaluated": rules_json(&p.rules_evaluated),
                                })
                            })
                            .collect(),
                    ),
                );
            }
        }
        pe.insert(
            "final_decision".into(),
            json!(if self.allowed { "ALLOW" } else { "DENY" }),
        );
        if let Some(t) = evaluation_time {
            let ms = if t.as_nanos().is_multiple_of(1_000_000) {
                json!(t.as_millis() as u64)
            } else {
                json!(t.as_secs_f64() * 1000.0)
            };
            pe.insert("evaluation_time_ms".into(), ms);
        }
        json!({ "policy_evaluation": Json::Object(pe) })
    }
}

fn rules_json(rules: &[RuleEvaluation]) -> Json {
    Json::Array(
        rules
            .iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("rule_index".into(), json!(r.rule_index));
                m.insert("matched".into(), json!(r.matched));
                if let Some(f) = &r.from {
                    let mut fm = Map::new();
                    if !f.allowed_principals.is_empty() {
                        fm.insert("source_principal".into(), json!(f.source_principal));
                        fm.insert("allowed_principals".into(), json!(f.allowed_principals));
                    }
                    if !f.allowed_namespaces.is_empty() {
                        fm.insert("source_namespace".into(), json!(f.source_namespace));
                        fm.insert("allowed_namespaces".into(), json!(f.allowed_namespaces));
                    }
                    if !f.allowed_request_principals.is_empty()
                        || !f.not_request_principals.is_empty()
                    {
                        fm.insert("request_principal".into(), json!(f.request_principal));
                    }
                    if !f.allowed_request_principals.is_empty() {
                        fm.insert(
                            "allowed_request_principals".into(),
                            json!(f.allowed_request_principals),
                        );
                    }
                    if !f.not_request_principals.is_empty() {
                        fm.insert(
                            "not_request_principals".into(),
                            json!(f.not_request_principals),
                        );
                    }
                    fm.insert("result".into(), json!(f.result.as_str()));
                    m.insert("from_check".into(), Json::Object(fm));
                }
                if let Some(t) = &r.to {
                    let mut tm = Map::new();
                    tm.insert("method".into(), json!(t.method));
                    tm.insert("path".into(), json!(t.path));
                    if t.allowed_operations.iter().any(|o| !o.ports.is_empty()) {
                        tm.insert("port".into(), json!(t.port));
                    }
                    let ops: Vec<Json> = t
                        .allowed_operations
                        .iter()
                        .map(|o| {
                            let mut om = Map::new();
                            if !o.methods.is_empty() {
                                om.insert("methods".into(), json!(o.methods));
                            }
                            if !o.paths.is_empty() {
                                om.insert("paths".into(), json!(o.paths));
                            }
                            if !o.ports.is_empty() {
                                om.insert("ports".into(), json!(o.ports));
                            }
                            Json::Object(om)
                        })
                        .collect();
                    tm.insert("allowed_operations".into(), Json::Array(ops));
                    tm.insert("result".into(), json!(t.result.as_str()));
                    m.insert("to_check".into(), Json::Object(tm));
                }
                let whens: Vec<Json> = r
                    .when
                    .iter()
                    .map(|w| {
                        let mut wm = Map::new();
                        match &w.key {
                            ConditionKey::RequestHeader(h) => {
                                wm.insert("header".into(), json!(h));
                            }
                            other => {
                                wm.insert("key".into(), json!(other.to_istio()));
                            }
                        }
                        wm.insert("value".into(), json!(w.value));
                        wm.insert("allowed_values".into(), json!(w.allowed_values));
                        wm.insert("result".into(), json!(w.result.as_str()));
                        Json::Object(wm)
                    })
                    .collect();
                match whens.len() {
                    0 => {}
                    1 => {
                        m.insert(
                            "when_check".into(),
                            whens.into_iter().next().unwrap_or(Json::Null),
                        );
                    }
                    _ => {
                        m.insert("when_check".into(), Json::Array(whens));
                    }
                }
                Json::Object(m)
            })
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::model::{AuthzRule, Condition, ObjectName, Operation, Source};

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(
        ns: &str,
        name: &str,
        action: Action,
        selector: Option<Labels>,
        rules: Vec<AuthzRule>,
    ) -> AuthzPolicy {
        AuthzPolicy {
            id: ObjectName {
                namespace: ns.into(),
                name: name.into(),
            },
            selector,
            action,
            rules,
        }
    }

    fn rule_from(principals: &[&str]) -> AuthzRule {
        AuthzRule {
            from: vec![Source {
                principals: principals.iter().map(|s| s.to_string()).collect(),
                namespaces: vec![],
                request_principals: vec![],
                not_request_principals: vec![],
            }],
            to: vec![],
            when: vec![],
        }
    }

    fn req<'a>(
        ns: &'a str,
        labels: &'a Labels,
        principal: Option<&'a str>,
        method: &'a str,
        path: &'a str,
    ) -> AuthzRequest<'a> {
        AuthzRequest {
            workload: WorkloadRef {
                namespace: ns,
                labels,
            },
            source_principal: principal,
            source_namespace: None,
            method,
            path,
            port: 8080,
            headers: &crate::request::NoHeaders,
            request_auth: None,
        }
    }

    #[test]
    fn patterns() {
        assert!(Pattern::new("*").matches("anything"));
        assert!(Pattern::new("td/ns/a/*").matches("td/ns/a/sa/x"));
        assert!(!Pattern::new("td/ns/a/*").matches("td/ns/b/sa/x"));
        assert!(Pattern::new("*/sa/pos").matches("edge/store/sf01/sa/pos"));
        assert!(Pattern::new("/api/charge").matches("/api/charge"));
        assert!(!Pattern::new("/api/charge").matches("/api/charge/x"));
        let mut buf = [0u8; 5];
        assert_eq!(port_str(8080, &mut buf), "8080");
        assert_eq!(port_str(0, &mut buf), "0");
        assert_eq!(port_str(65535, &mut buf), "65535");
    }

    #[test]
    fn deny_wins_over_allow() {
        let l = labels(&[("app", "pos")]);
        let ps = vec![
            policy(
                "shop",
                "allow-all-td",
                Action::Allow,
                None,
                vec![rule_from(&["td/*"])],
            ),
            policy(
                "shop",
                "deny-bad",
                Action::Deny,
                None,
                vec![rule_from(&["td/sa/bad"])],
            ),
        ];
        let c = CompiledPolicies::new(&ps, &MeshSettings::default());
        let v = c.decide(&req("shop", &l, Some("td/sa/bad"), "GET", "/"));
        assert!(!v.allowed);
        assert_eq!(v.reason, AuthzReason::DenyPolicyMatched);
        assert_eq!(c.policies()[v.policy.unwrap()].id.name, "deny-bad");
        let v = c.decide(&req("shop", &l, Some("td/sa/good"), "GET", "/"));
        assert!(v.allowed);
        assert_eq!(v.reason, AuthzReason::AllowPolicyMatched);
    }

    #[test]
    fn allow_selecting_without_match_denies_and_no_policy_takes_default() {
        let l = labels(&[("app", "pos")]);
        let other = labels(&[("app", "inventory")]);
        let ps = vec![policy(
            "shop",
            "pos-only-frontend",
            Action::Allow,
            Some(labels(&[("app", "pos")])),
            vec![rule_from(&["td/sa/frontend"])],
        )];
        let deny_default = MeshSettings::default();
        let c = CompiledPolicies::new(&ps, &deny_default);
        let v = c.decide(&req("shop", &l, Some("td/sa/other"), "GET", "/"));
        assert_eq!(
            (v.allowed, v.reason),
            (false, AuthzReason::NoAllowPolicyMatched)
        );
        let v = c.decide(&req("shop", &other, Some("td/sa/frontend"), "GET", "/"));
        assert_eq!((v.allowed, v.reason), (false, AuthzReason::MeshDefault));
        let allow_default = MeshSettings {
            default_action: Action::Allow,
            ..MeshSettings::default()
        };
        let c = CompiledPolicies::new(&ps, &allow_default);
        let v = c.decide(&req("shop", &other, Some("td/sa/frontend"), "GET", "/"));
        assert_eq!((v.allowed, v.reason), (true, AuthzReason::MeshDefault));
        // Another namespace is not selected by a namespaced policy.
        let v = c.decide(&req("other", &l, Some("td/sa/other"), "GET", "/"));
        assert_eq!((v.allowed, v.reason), (true, AuthzReason::MeshDefault));
    }

    #[test]
    fn root_namespace_policies_apply_everywhere() {
        let l = labels(&[("app", "pos")]);
        let ps = vec![policy(
            "istio-system",
            "deny-anon-admin",
            Action::Deny,
            None,
            vec![AuthzRule {
                from: vec![],
                to: vec![Operation {
                    methods: vec![],
                    paths: vec!["/admin*".into()],
                    ports: vec![],
                }],
                when: vec![],
            }],
        )];
        let c = CompiledPolicies::new(
            &ps,
            &MeshSettings {
                default_action: Action::Allow,
                ..MeshSettings::default()
            },
        );
        assert!(
            !c.decide(&req("shop", &l, Some("td/sa/x"), "GET", "/admin/users"))
                .allowed
        );
        // Path tricks are normalized before matching.
        assert!(
            !c.decide(&req(
                "shop",
                &l,
                Some("td/sa/x"),
                "GET",
                "/x/../admin/users"
            ))
            .allowed
        );
        assert!(
            !c.decide(&req("shop", &l, Some("td/sa/x"), "GET", "//%61dmin"))
                .allowed
        );
        assert!(
            c.decide(&req("shop", &l, Some("td/sa/x"), "GET", "/api"))
                .allowed
        );
    }

    #[test]
    fn no_principal_matches_no_principal_pattern() {
        let l = Labels::new();
        let ps = vec![policy(
            "shop",
            "any-authenticated",
            Action::Allow,
            None,
            vec![rule_from(&["*"])],
        )];
        let c = CompiledPolicies::new(&ps, &MeshSettings::default());
        assert!(
            c.decide(&req("shop", &l, Some("td/sa/x"), "GET", "/"))
                .allowed
        );
        assert!(!c.decide(&req("shop", &l, None, "GET", "/")).allowed);
    }

    /// Istio's rules for raw TCP (its authz-tcp task): an ALLOW rule with an
    /// HTTP-only field never matches; a DENY rule ignores those fields.
    #[test]
    fn raw_tcp_ignores_http_only_allow_rules_and_widens_deny_rules() {
        let l = labels(&[("app", "db")]);
        let op = |methods: &[&str], paths: &[&str], ports: &[u16]| Operation {
            methods: methods.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            ports: ports.to_vec(),
        };
        let rule = |principals: &[&str], to: Vec<Operation>, when: Vec<Condition>| AuthzRule {
            from: if principals.is_empty() {
                vec![]
            } else {
                vec![Source {
                    principals: principals.iter().map(|s| s.to_string()).collect(),
                    namespaces: vec![],
                    request_principals: vec![],
                    not_request_principals: vec![],
                }]
            },
            to,
            when,
        };
        let header = |v: &str| Condition {
            key: ConditionKey::RequestHeader("x-v".into()),
            values: vec![v.into()],
        };
        let tcp = |c: &CompiledPolicies, principal: Option<&str>, port: u16| {
            let mut r = req("shop", &l, principal, "", "");
            r.port = port;
            c.decide_l4(&r)
        };
        let deny_default = MeshSettings::default();
        let allow_default = MeshSettings {
            default_action: Action::Allow,
            ..MeshSettings::default()
        };

        // ALLOW on principals and ports only: an L4 rule, checked as for HTTP
        let ps = vec![policy(
            "shop",
            "db-clients",
            Action::Allow,
            None,
            vec![rule(&["td/sa/app"], vec![op(&[], &[], &[5432])], vec![])],
        )];
        let c = CompiledPolicies::new(&ps, &deny_default);
        let v = tcp(&c, Some("td/sa/app"), 5432);
        assert_eq!((v.allowed, v.rule_index), (true, Some(0)));
        assert!(!tcp(&c, Some("td/sa/other"), 5432).allowed);
        assert!(!tcp(&c, Some("td/sa/app"), 5433).allowed);
        assert!(!tcp(&c, None, 5432).allowed);

        // ALLOW rules with methods, paths or a header condition never match
        // TCP, even with `*` (which would match an empty method); the L4
        // rule after them still does
        for http in [
            rule(&["td/sa/app"], vec![op(&["*"], &[], &[5432])], vec![]),
            rule(&["td/sa/app"], vec![op(&[], &["*"], &[])], vec![]),
            rule(&["td/sa/app"], vec![], vec![header("*")]),
        ] {
            let ps = vec![policy("shop", "http", Action::Allow, None, vec![http])];
            let c = CompiledPolicies::new(&ps, &allow_default);
            let v = tcp(&c, Some("td/sa/app"), 5432);
            assert_eq!(
                (v.allowed, v.reason),
                (false, AuthzReason::NoAllowPolicyMatched),
                "{ps:?}"
            );
            // HTTP is unchanged: `*` matches any method, path, header
            let mut r = req("shop", &l, Some("td/sa/app"), "GET", "/x");
            r.port = 5432;
            r.headers = &[("x-v", "1")];
            assert!(c.decide(&r).allowed, "{ps:?}");
        }
        let ps = vec![policy(
            "shop",
            "mixed",
            Action::Allow,
            None,
            vec![
                rule(&["td/sa/app"], vec![op(&["GET"], &[], &[])], vec![]),
                rule(&["td/sa/app"], vec![], vec![]),
            ],
        )];
        let c = CompiledPolicies::new(&ps, &deny_default);
        assert_eq!(tcp(&c, Some("td/sa/app"), 1).rule_index, Some(1));

        // DENY ignores the HTTP-only fields: methods alone deny every port,
        // methods with a port deny that port, a header condition is dropped
        let ps = vec![policy(
            "shop",
            "no-get",
            Action::Deny,
            None,
            vec![rule(&[], vec![op(&["GET"], &["/admin"], &[])], vec![])],
        )];
        let c = CompiledPolicies::new(&ps, &allow_default);
        let v = tcp(&c, Some("td/sa/app"), 9000);
        assert_eq!(
            (v.allowed, v.reason),
            (false, AuthzReason::DenyPolicyMatched)
        );
        assert!(
            c.decide(&req("shop", &l, Some("td/sa/app"), "POST", "/"))
                .allowed
        );
        let ps = vec![policy(
            "shop",
            "no-get-9000",
            Action::Deny,
            None,
            vec![rule(
                &["td/sa/bad"],
                vec![op(&["GET"], &[], &[9000])],
                vec![header("v1")],
            )],
        )];
        let c = CompiledPolicies::new(&ps, &allow_default);
        assert!(!tcp(&c, Some("td/sa/bad"), 9000).allowed);
        assert!(tcp(&c, Some("td/sa/bad"), 9001).allowed);
        assert!(tcp(&c, Some("td/sa/good"), 9000).allowed);

        // the other `when` keys still apply to TCP
        let ps = vec![policy(
            "shop",
            "port-cond",
            Action::Allow,
            None,
            vec![rule(
                &[],
                vec![],
                vec![Condition {
                    key: ConditionKey::DestinationPort,
                    values: vec!["5432".into()],
                }],
            )],
        )];
        let c = CompiledPolicies::new(&ps, &deny_default);
        assert!(tcp(&c, None, 5432).allowed);
        assert!(!tcp(&c, None, 80).allowed);
    }

    #[test]
    fn allow_policy_without_rules_denies_all() {
        let l = Labels::new();
        let ps = vec![policy("shop", "deny-all", Action::Allow, None, vec![])];
        let c = CompiledPolicies::new(
            &ps,
            &MeshSettings {
                default_action: Action::Allow,
                ..MeshSettings::default()
            },
        );
        let v = c.decide(&req("shop", &l, Some("td/sa/x"), "GET", "/"));
        assert_eq!(
            (v.allowed, v.reason),
            (false, AuthzReason::NoAllowPolicyMatched)
        );
        let d = c.evaluate(&req("shop", &l, Some("td/sa/x"), "GET", "/"));
        assert_eq!(d.evaluated.len(), 1);
        assert!(d.evaluated[0].rules_evaluated.is_empty());
        assert_eq!(
            d.to_seed_json(None)["policy_evaluation"]["reason"],
            "no_allow_policy_matched"
        );
    }

    /// requestPrincipals (Istio's `*`, prefix and suffix patterns),
    /// notRequestPrincipals, and `when` on request.auth.*: a request
    /// without a token has no request principal; the compiled decision
    /// agrees with the reference; raw TCP never satisfies an ALLOW rule on
    /// them.
    #[test]
    fn request_principals_and_claim_conditions() {
        use crate::reqauthn::RequestAuth;
        let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cashiers, namespace: shop}
spec:
  selector: {matchLabels: {app: pos}}
  rules:
  - from: [{source: {requestPrincipals: ["https://idp.test/*"]}}]
    when:
    - {key: "request.auth.claims[role]", values: [cashier, manager]}
    - {key: "request.auth.claims[org][store]", values: ["sf*"]}
  - from: [{source: {requestPrincipals: ["*/service-bot"]}}]
    to: [{operation: {methods: [GET]}}]
    when:
    - {key: request.auth.audiences, values: [pos]}
    - {key: request.auth.presenter, values: [till]}
    - {key: request.auth.principal, values: ["*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: need-token, namespace: shop}
spec:
  selector: {matchLabels: {app: pos}}
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/admin*"]}}]
"#;
        let config = crate::MeshConfig::from_yaml(yaml).unwrap();
        let c = CompiledPolicies::from_config(&config);
        let l = labels(&[("app", "pos")]);
        let auth = |principal: &str, claims: serde_json::Value| RequestAuth {
            principal: principal.into(),
            audiences: claims["aud"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(Into::into))
                        .collect()
                })
                .unwrap_or_default(),
            presenter: claims["azp"].as_str().map(Into::into),
            claims: claims.as_object().cloned().unwrap_or_default(),
        };
        let alice = auth(
            "https://idp.test/alice",
            serde_json::json!({"role": ["clerk", "cashier"], "org": {"store": "sf01"}}),
        );
        let clerk = auth(
            "https://idp.test/bob",
            serde_json::json!({"role": "clerk", "org": {"store": "sf01"}}),
        );
        let other_store = auth(
            "https://idp.test/carol",
            serde_json::json!({"role": "manager", "org": {"store": "ny02"}}),
        );
        let evil = auth(
            "https://evil.test/alice",
            serde_json::json!({"role": "cashier", "org": {"store": "sf01"}}),
        );
        let bot = auth(
            "https://idp.test/service-bot",
            serde_json::json!({"aud": ["pos", "x"], "azp": "till"}),
        );
        let bot_wrong_azp = auth(
            "https://idp.test/service-bot",
            serde_json::json!({"aud": ["pos"], "azp": "kiosk"}),
        );
        let check = |a: Option<&RequestAuth>, method: &str, path: &str| {
            let mut r = req("shop", &l, Some("td/store/sf01/sa/till"), method, path);
            r.request_auth = a;
            let got = c.decide(&r).allowed;
            assert_eq!(
                got,
                evaluate_uncompiled(&config.authz_policies, &r, &config.settings),
                "reference disagrees for {:?} {method} {path}",
                a.map(|a| &a.principal)
            );
            assert_eq!(c.evaluate(&r).allowed, got);
            got
        };
        assert!(check(Some(&alice), "POST", "/sale"));
        assert!(!check(Some(&clerk), "POST", "/sale"), "claim value");
        assert!(!check(Some(&other_store), "POST", "/sale"), "nested claim");
        assert!(!check(Some(&evil), "POST", "/sale"), "issuer prefix");
        assert!(
            !check(None, "POST", "/sale"),
            "no token: no request principal"
        );
        assert!(
            check(Some(&bot), "GET", "/stock"),
            "suffix, audiences, presenter"
        );
        assert!(!check(Some(&bot), "POST", "/stock"));
        assert!(!check(Some(&bot_wrong_azp), "GET", "/stock"));
        // notRequestPrincipals ["*"] in a DENY: only requests without a token
        assert!(check(Some(&alice), "POST", "/admin/x"));
        let mut r = req(
            "shop",
            &l,
            Some("td/store/sf01/sa/till"),
            "POST",
            "/admin/x",
        );
        let v = c.decide(&r);
        assert!(!v.allowed);
        assert_eq!(v.reason, AuthzReason::DenyPolicyMatched);
        // evidence shows the request principal and the claim values
        r.request_auth = Some(&alice);
        r.path = "/sale";
        let d = c.evaluate(&r);
        let rule = &d.evaluated[0].rules_evaluated[0];
        let from = rule.from.as_ref().unwrap();
        assert_eq!(
            from.request_principal.as_deref(),
            Some("https://idp.test/alice")
        );
        assert_eq!(from.allowed_request_principals, vec!["https://idp.test/*"]);
        assert_eq!(rule.when[0].value.as_deref(), Some("clerk,cashier"));
        let seed = d.to_seed_json(None).to_string();
        assert!(seed.contains("allowed_request_principals"), "{seed}");
        // raw TCP has no token: the DENY's HTTP-only fields are ignored, so
        // it denies (more, never less); the ALLOW rules never match TCP
        let v = c.decide_l4(&r);
        assert!(!v.allowed);
        assert_eq!(v.reason, AuthzReason::DenyPolicyMatched);
        let allow_only = CompiledPolicies::new(&config.authz_policies[..1], &config.settings);
        assert_eq!(
            allow_only.decide_l4(&r).reason,
            AuthzReason::NoAllowPolicyMatched
        );
        // round trip through YAML
        let back = crate::MeshConfig::from_yaml(&config.to_yaml()).unwrap();
        assert_eq!(back, config);
    }
}
