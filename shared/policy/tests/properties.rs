//! Properties: the compiled authorization evaluator agrees with the naive
//! one, for HTTP and for raw TCP; weighted routing gives each destination exactly its share of the
//! random range; the parser never panics on hostile input.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tidemesh_policy::model::*;
use tidemesh_policy::{
    evaluate_uncompiled, parse_documents, AuthzRequest, CompiledPolicies, CompiledRoutes,
    NoHeaders, RouteRequest, WorkloadRef,
};

const NAMESPACES: &[&str] = &["istio-system", "shop", "pay"];
const PRINCIPALS: &[&str] = &["td/ns/shop/sa/a", "td/ns/shop/sa/b", "td/ns/pay/sa/c"];
const PATHS: &[&str] = &["/", "/api/charge", "/api/refund", "/admin/x", "/health"];

fn pattern(choices: &'static [&'static str]) -> impl Strategy<Value = String> {
    (0..choices.len(), 0..5u8).prop_map(move |(i, kind)| {
        let s = choices[i];
        match kind {
            0 => "*".to_string(),
            1 => format!("{}*", &s[..s.len() / 2]),
            2 => format!("*{}", &s[s.len() / 2..]),
            _ => s.to_string(),
        }
    })
}

fn rule() -> impl Strategy<Value = AuthzRule> {
    (
        prop::collection::vec(
            (
                prop::collection::vec(pattern(PRINCIPALS), 0..3),
                prop::collection::vec(pattern(NAMESPACES), 0..2),
            )
                .prop_map(|(principals, namespaces)| Source {
                    principals,
                    namespaces,
                    request_principals: vec![],
                    not_request_principals: vec![],
                }),
            0..2,
        ),
        prop::collection::vec(
            (
                prop::collection::vec(
                    prop::sample::select(vec![
                        "GET".to_string(),
                        "POST".to_string(),
                        "P*".to_string(),
                    ]),
                    0..2,
                ),
                prop::collection::vec(pattern(PATHS), 0..3),
                prop::collection::vec(prop::sample::select(vec![80u16, 8080]), 0..2),
            )
                .prop_map(|(methods, paths, ports)| Operation {
                    methods,
                    paths,
                    ports,
                }),
            0..2,
        ),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    ConditionKey::RequestHeader("x-v".into()),
                    ConditionKey::SourcePrincipal,
                    ConditionKey::SourceNamespace,
                    ConditionKey::DestinationPort,
                ]),
                prop::collection::vec(
                    prop::sample::select(vec![
                        "v1".to_string(),
                        "8080".to_string(),
                        "shop".to_string(),
                        "td/*".to_string(),
                        "*".to_string(),
                    ]),
                    1..3,
                ),
            )
                .prop_map(|(key, values)| Condition { key, values }),
            0..2,
        ),
    )
        .prop_map(|(from, to, when)| AuthzRule { from, to, when })
}

fn policies() -> impl Strategy<Value = Vec<AuthzPolicy>> {
    prop::collection::vec(
        (
            0..NAMESPACES.len(),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec!["pos", "ledger"])),
            prop::collection::vec(rule(), 0..3),
        ),
        0..8,
    )
    .prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, (ns, deny, app, rules))| AuthzPolicy {
                id: ObjectName {
                    namespace: NAMESPACES[ns].into(),
                    name: format!("p{i}"),
                },
                selector: app.map(|a| [("app".to_string(), a.to_string())].into()),
                action: if deny { Action::Deny } else { Action::Allow },
                rules,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compiled_authorization_agrees_with_the_naive_evaluator(
        ps in policies(),
        default_allow in any::<bool>(),
        ns in 0..NAMESPACES.len(),
        app in prop::sample::select(vec!["pos", "ledger", "other"]),
        principal in prop::option::of(0..PRINCIPALS.len()),
        src_ns in prop::option::of(0..NAMESPACES.len()),
        method in prop::sample::select(vec!["GET", "POST", "PUT"]),
        path in prop::sample::select(PATHS.to_vec()),
        port in prop::sample::select(vec![80u16, 8080, 9090]),
        header in prop::option::of(prop::sample::select(vec!["v1", "v2"])),
    ) {
        let settings = MeshSettings {
            default_action: if default_allow { Action::Allow } else { Action::Deny },
            ..MeshSettings::default()
        };
        let labels: Labels = [("app".to_string(), app.to_string())].into();
        let headers: Vec<(String, String)> = header.map(|v| vec![("X-V".to_string(), v.to_string())]).unwrap_or_default();
        let req = AuthzRequest {
            workload: WorkloadRef { namespace: NAMESPACES[ns], labels: &labels },
            source_principal: principal.map(|i| PRINCIPALS[i]),
            source_namespace: src_ns.map(|i| NAMESPACES[i]),
            method,
            path,
            port,
            headers: &headers,
            request_auth: None,
        };
        let compiled = CompiledPolicies::new(&ps, &settings);
        let fast = compiled.decide(&req);
        prop_assert_eq!(fast.allowed, evaluate_uncompiled(&ps, &req, &settings));
        let full = compiled.evaluate(&req);
        prop_assert_eq!(full.allowed, fast.allowed);
        prop_assert_eq!(full.rule_index, fast.rule_index);
        prop_assert_eq!(full.reason, fast.reason);
        // The evidence of the deciding rule says it matched.
        if let Some(ri) = fast.rule_index {
            let rules = &full.evaluated[0].rules_evaluated;
            prop_assert_eq!(rules.len(), ri + 1);
            prop_assert!(rules[ri].matched);
            prop_assert!(rules[..ri].iter().all(|r| !r.matched));
        }
    }

    /// Raw TCP decisions agree with Istio's translation of the policies for
    /// a TCP filter chain, evaluated naively: ALLOW rules using HTTP-only
    /// fields (methods, paths, request headers) dropped, DENY rules with
    /// those fields removed.
    #[test]
    fn raw_tcp_decisions_agree_with_istios_tcp_translation(
        ps in policies(),
        default_allow in any::<bool>(),
        ns in 0..NAMESPACES.len(),
        app in prop::sample::select(vec!["pos", "ledger", "other"]),
        principal in prop::option::of(0..PRINCIPALS.len()),
        src_ns in prop::option::of(0..NAMESPACES.len()),
        port in prop::sample::select(vec![80u16, 8080, 9090]),
    ) {
        let settings = MeshSettings {
            default_action: if default_allow { Action::Allow } else { Action::Deny },
            ..MeshSettings::default()
        };
        let labels: Labels = [("app".to_string(), app.to_string())].into();
        let req = AuthzRequest {
            workload: WorkloadRef { namespace: NAMESPACES[ns], labels: &labels },
            source_principal: principal.map(|i| PRINCIPALS[i]),
            source_namespace: src_ns.map(|i| NAMESPACES[i]),
            method: "",
            path: "",
            port,
            headers: &NoHeaders,
            request_auth: None,
        };
        let is_header = |c: &Condition| matches!(c.key, ConditionKey::RequestHeader(_));
        let tcp: Vec<AuthzPolicy> = ps
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.rules = match p.action {
                    Action::Allow => p
                        .rules
                        .into_iter()
                        .filter(|r| {
                            r.to.iter().all(|o| o.methods.is_empty() && o.paths.is_empty())
                                && !r.when.iter().any(is_header)
                        })
                        .collect(),
                    Action::Deny => p
                        .rules
                        .into_iter()
                        .map(|mut r| {
                            for o in &mut r.to {
                                o.methods.clear();
                                o.paths.clear();
                            }
                            r.when.retain(|c| !is_header(c));
                            r
                        })
                        .collect(),
                };
                p
            })
            .collect();
        let compiled = CompiledPolicies::new(&ps, &settings);
        prop_assert_eq!(
            compiled.decide_l4(&req).allowed,
            evaluate_uncompiled(&tcp, &req, &settings)
        );
    }

    #[test]
    fn weighted_routing_gives_each_destination_exactly_its_share(
        cuts in prop::collection::vec(0u32..=100, 1..5),
    ) {
        // Random weights summing to 100.
        let mut cuts = cuts;
        cuts.sort();
        let mut weights = Vec::new();
        let mut prev = 0;
        for c in cuts.iter().chain(std::iter::once(&100)) {
            weights.push(c - prev);
            prev = *c;
        }
        let rule = RouteRule {
            id: ObjectName { namespace: "shop".into(), name: "r".into() },
            hosts: vec!["svc.shop".into()],
            http: vec![HttpRoute {
                name: None,
                matches: vec![],
                route: weights
                    .iter()
                    .enumerate()
                    .map(|(i, w)| WeightedDestination {
                        destination: Destination { host: "svc.shop".into(), subset: Some(format!("s{i}")), port: None },
                        weight: *w,
                    })
                    .collect(),
                timeout: None,
                retries: None,
            }],
        };
        let routes = CompiledRoutes::new(&[rule]).unwrap();
        let req = RouteRequest { path: "/", method: "GET", headers: &NoHeaders };
        // One random value in the middle of each 1/100 of the range.
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for k in 0..100u128 {
            let rng = (((2 * k + 1) << 64) / 200) as u64;
            let d = routes.route("svc.shop", &req, rng).unwrap();
            *counts.entry(d.destination.subset.unwrap().to_string()).or_default() += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            prop_assert_eq!(counts.get(&format!("s{i}")).copied().unwrap_or(0), *w);
        }
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_text(s in "\\PC{0,400}") {
        let _ = parse_documents(&s);
    }

    #[test]
    fn the_parser_never_panics_on_mutated_seed_yaml(
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec!["", "*", "-", ":", "[", "{", "\n", " ", "'", "0", "~", "!!", "&a", "*a", "---\n"])), 1..6),
    ) {
        let mut s = [
            include_str!("../testdata/seed/authorization_policy.yaml"),
            include_str!("../testdata/seed/canary_virtualservice_destinationrule.yaml"),
            include_str!("../testdata/seed/serviceentry_multicluster.yaml"),
        ]
        .join("---\n");
        for (at, insert) in edits {
            let mut i = at.index(s.len());
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            s.insert_str(i, insert);
        }
        if let Ok(resources) = parse_documents(&s) {
            let _ = tidemesh_policy::MeshConfig::from_resources(resources);
        }
    }
}
