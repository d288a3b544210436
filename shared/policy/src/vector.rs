//! Guarantee vectors: what the mesh guarantees for a service right now, on
//! the seed's six dimensions, and the facts each level rests on.
//!
//! What it is: the ladders of the seed's guarantee vector (⟨Identity,
//! Authorization, Routing, Reliability, Observability, Security⟩) and the
//! one function per dimension that turns measured facts into a level. Who
//! drives it: the spoke (`tidemesh-spoke vector`, from its live state) and
//! the hub (`tidemesh-hub vector`, from the evidence records it holds)
//! gather the facts; both read the levels here, so the two views cannot
//! disagree on what a fact means. What it must not do: gather facts
//! itself (no I/O, no clock).
//!
//! | dimension | ladder (weakest first) | the level is the highest that holds |
//! | --- | --- | --- |
//! | identity | `none`, `mtls`, `spiffe` | `spiffe`: both ends named by verified SPIFFE IDs; `mtls`: mutual TLS without SPIFFE IDs on both ends; else `none` |
//! | authorization | `open`, `l4`, `l7_rbac` | `l7_rbac`: a policy that applies inspects methods, paths or headers; `l4`: policies (or the default deny) decide on the peer's identity only; `open`: nothing is checked |
//! | routing | `static`, `dynamic`, `traffic_shaped` | `traffic_shaped`: a weighted split, a match rule or the Recovery ramp steers traffic; `dynamic`: endpoints picked by a load balancer with health checks and breakers; `static`: one fixed choice (Survival's local only) |
//! | reliability | `best_effort`, `retry`, `circuit_break` | `circuit_break`: breakers trip on errors and retries may follow; `retry`: retries without an error-rate breaker; `best_effort`: neither (Survival's fail fast) |
//! | observability | `none`, `metrics`, `traces`, `logs` | `logs`: every request leaves a per-request evidence record and traces are sampled; `traces`: traces only; `metrics`: counters only |
//! | security | `plaintext`, `encrypted`, `authenticated` | `authenticated`: mutual TLS on every leg; `encrypted`: TLS on every leg, not mutual everywhere; `plaintext`: a leg in clear text |

use serde::Serialize;

/// The six dimensions, in the seed's order.
pub const DIMENSIONS: [&str; 6] = [
    "identity",
    "authorization",
    "routing",
    "reliability",
    "observability",
    "security",
];

/// Which way a call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallPath {
    /// To a workload of the same spoke (no network hop).
    Local,
    /// To a workload of another spoke of the site, over the QUIC mTLS tunnel.
    SameSite,
    /// To a cloud service through the hub gateway.
    Cloud,
}

impl CallPath {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CallPath::Local => "local",
            CallPath::SameSite => "same_site",
            CallPath::Cloud => "cloud",
        }
    }
}

/// Identity: both ends' SPIFFE IDs verified (`spiffe`), mutual TLS without
/// them (`mtls`), or neither.
pub fn identity(spiffe_both_ends: bool, mutual_tls: bool) -> &'static str {
    if spiffe_both_ends {
        "spiffe"
    } else if mutual_tls {
        "mtls"
    } else {
        "none"
    }
}

/// The end user behind a call (not one of the six dimensions: a note on
/// identity): `jwt_claim` when the serving end verifies a JWT
/// (`RequestAuthentication`), a *claim* checked by signature, issuer,
/// audience and expiry, weaker than the services' mTLS identities, and
/// only as fresh as the key set the hub read at apply; else `none` (a
/// token, if sent, is not checked by the mesh).
pub fn user_identity(jwt_verified: bool) -> &'static str {
    if jwt_verified {
        "jwt_claim"
    } else {
        "none"
    }
}

/// Authorization: some applicable policy inspects L7 attributes; or
/// policies / a default deny decide on identity; or nothing is checked.
pub fn authorization(
    l7_rule_applies: bool,
    any_policy_applies: bool,
    default_deny: bool,
) -> &'static str {
    if l7_rule_applies {
        "l7_rbac"
    } else if any_policy_applies || default_deny {
        "l4"
    } else {
        "open"
    }
}

/// Routing: traffic shaped (split, match, ramp), dynamic (balanced with
/// health and breakers), or static (one fixed choice).
pub fn routing(shaped: bool, balanced: bool) -> &'static str {
    if shaped {
        "traffic_shaped"
    } else if balanced {
        "dynamic"
    } else {
        "static"
    }
}

/// Reliability: breakers that trip on errors, retries alone, or neither.
pub fn reliability(error_breaker: bool, retries: u32) -> &'static str {
    if error_breaker {
        "circuit_break"
    } else if retries > 0 {
        "retry"
    } else {
        "best_effort"
    }
}

/// Observability: per-request records with sampled traces (`logs`),
/// traces, metrics only, or nothing.
pub fn observability(records: bool, trace_sampling: f64, metrics: bool) -> &'static str {
    match (records, trace_sampling > 0.0, metrics) {
        (true, true, _) => "logs",
        (_, true, _) => "traces",
        (_, false, true) | (true, false, false) => "metrics",
        (false, false, false) => "none",
    }
}

/// Security of a path, from its legs (each: encrypted, mutually
/// authenticated): the weakest leg decides.
pub fn security(legs: &[(bool, bool)]) -> &'static str {
    if legs.is_empty() || legs.iter().any(|(enc, _)| !enc) {
        "plaintext"
    } else if legs.iter().all(|(_, mutual)| *mutual) {
        "authenticated"
    } else {
        "encrypted"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders() {
        assert_eq!(identity(true, true), "spiffe");
        assert_eq!(identity(false, true), "mtls");
        assert_eq!(identity(false, false), "none");
        assert_eq!(user_identity(true), "jwt_claim");
        assert_eq!(user_identity(false), "none");
        assert_eq!(authorization(true, true, false), "l7_rbac");
        assert_eq!(authorization(false, true, false), "l4");
        assert_eq!(authorization(false, false, true), "l4");
        assert_eq!(authorization(false, false, false), "open");
        assert_eq!(routing(true, true), "traffic_shaped");
        assert_eq!(routing(false, true), "dynamic");
        assert_eq!(routing(false, false), "static");
        assert_eq!(reliability(true, 0), "circuit_break");
        assert_eq!(reliability(false, 2), "retry");
        assert_eq!(reliability(false, 0), "best_effort");
        assert_eq!(observability(true, 1.0, true), "logs");
        assert_eq!(observability(false, 0.1, true), "traces");
        assert_eq!(observability(true, 0.0, true), "metrics");
        assert_eq!(observability(false, 0.0, false), "none");
        assert_eq!(security(&[(true, true)]), "authenticated");
        assert_eq!(security(&[(true, true), (true, false)]), "encrypted");
        assert_eq!(security(&[(true, true), (false, false)]), "plaintext");
        assert_eq!(security(&[]), "plaintext");
    }
}
