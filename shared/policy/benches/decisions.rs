//! Authorization and route decisions per second on realistic policy sets,
//! each beside a baseline measured in the same run.
//!
//! Run: `cargo bench -p tidemesh-policy --bench decisions`
//! (`-- --quick` for a shorter run). The seed quotes 2–5 ms per authorization
//! and 0.5 ms per routing decision; tidemesh aims for microseconds.
//!
//! - Authorization: 100 AuthorizationPolicies over 20 namespaces (per
//!   namespace: one DENY for admin paths from other namespaces, four ALLOWs
//!   selecting apps by label, with principals, methods, path prefixes and a
//!   header condition), plus mesh-wide root-namespace policies; 4,096
//!   requests mixing allowed, denied and unselected ones. Measured: the
//!   compiled hot path (`decide`), the compiled path with full evidence
//!   (`evaluate`), and two baselines: the naive uncompiled evaluator over the
//!   model, and a bare `HashMap` lookup of a precomputed answer (the floor).
//! - Routing: 1,000 VirtualServices (one per host), each with an `x-canary`
//!   header route, a uri-prefix route (every tenth with a regex method match)
//!   and a 90/10 weighted default; 4,096 requests over random hosts.
//!   Measured: `route`, and a bare `HashMap<host, destination>` lookup (the floor).

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::{Duration, Instant};

use tidemesh_policy::model::*;
use tidemesh_policy::routing::SplitMix64;
use tidemesh_policy::{
    evaluate_uncompiled, AuthzRequest, CompiledPolicies, CompiledRoutes, RouteRequest, WorkloadRef,
};

const NAMESPACES: usize = 20;
const APPS: [&str; 4] = ["pos", "inventory", "ledger", "payments"];
const HOSTS: usize = 1_000;
const REQUESTS: usize = 4_096;

fn policies() -> Vec<AuthzPolicy> {
    let mut v = Vec::new();
    for n in 0..NAMESPACES {
        let ns = format!("ns{n}");
        v.push(AuthzPolicy {
            id: ObjectName {
                namespace: ns.clone(),
                name: "deny-foreign-admin".into(),
            },
            selector: None,
            action: Action::Deny,
            rules: vec![AuthzRule {
                from: vec![Source {
                    principals: vec![],
                    namespaces: vec![
                        format!("ns{}", (n + 1) % NAMESPACES),
                        format!("ns{}", (n + 2) % NAMESPACES),
                    ],
                    request_principals: vec![],
                    not_request_principals: vec![],
                }],
                to: vec![Operation {
                    methods: vec![],
                    paths: vec!["/admin*".into()],
                    ports: vec![],
                }],
                when: vec![],
            }],
        });
        for app in APPS {
            v.push(AuthzPolicy {
                id: ObjectName {
                    namespace: ns.clone(),
                    name: format!("allow-{app}"),
                },
                selector: Some([("app".to_string(), app.to_string())].into()),
                action: Action::Allow,
                rules: vec![
                    AuthzRule {
                        from: vec![Source {
                            principals: vec![
                                format!("edge.example/store/sf01/sa/{app}-client"),
                                format!("edge.example/ns/{ns}/sa/frontend"),
                                "edge.example/ns/ops/*".into(),
                            ],
                            namespaces: vec![],
                            request_principals: vec![],
                            not_request_principals: vec![],
                        }],
                        to: vec![Operation {
                            methods: vec!["GET".into(), "POST".into()],
                            paths: vec![format!("/api/{app}/*"), "/health".into()],
                            ports: vec![8080],
                        }],
                        when: vec![Condition {
                            key: ConditionKey::RequestHeader("x-api-version".into()),
                            values: vec!["v1".into(), "v2".into()],
                        }],
                    },
                    AuthzRule {
                        from: vec![Source {
                            principals: vec!["*/sa/monitoring".into()],
                            namespaces: vec![],
                            request_principals: vec![],
                            not_request_principals: vec![],
                        }],
                        to: vec![Operation {
                            methods: vec!["GET".into()],
                            paths: vec!["/metrics".into()],
                            ports: vec![],
                        }],
                        when: vec![],
                    },
                ],
            });
        }
    }
    // Mesh-wide: nobody unauthenticated reaches debug endpoints.
    v.truncate(98);
    for (name, path) in [("deny-debug", "/debug*"), ("deny-pprof", "*/pprof")] {
        v.push(AuthzPolicy {
            id: ObjectName {
                namespace: "istio-system".into(),
                name: name.into(),
            },
            selector: None,
            action: Action::Deny,
            rules: vec![AuthzRule {
                from: vec![],
                to: vec![Operation {
                    methods: vec![],
                    paths: vec![path.into()],
                    ports: vec![],
                }],
                when: vec![],
            }],
        });
    }
    assert_eq!(v.len(), 100);
    v
}

struct Req {
    ns: String,
    labels: Labels,
    principal: Option<String>,
    src_ns: String,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
}

fn requests(rng: &mut SplitMix64) -> Vec<Req> {
    (0..REQUESTS)
        .map(|_| {
            let r = rng.next_u64();
            let n = (r % NAMESPACES as u64) as usize;
            let app = APPS[((r >> 8) % 4) as usize];
            let target_app = if (r >> 12).is_multiple_of(10) {
                "unlisted"
            } else {
                app
            };
            let principal = match (r >> 16) % 5 {
                0 => Some(format!("edge.example/store/sf01/sa/{app}-client")),
                1 => Some(format!("edge.example/ns/ns{n}/sa/frontend")),
                2 => Some("edge.example/ns/ops/sa/admin".to_string()),
                3 => Some("edge.example/ns/x/sa/monitoring".to_string()),
                _ => None,
            };
            let path = match (r >> 20) % 6 {
                0 => format!("/api/{app}/items/42?x=1"),
                1 => "/health".to_string(),
                2 => "/admin/users".to_string(),
                3 => "/metrics".to_string(),
                4 => "/debug/vars".to_string(),
                _ => format!("/api/{app}/orders"),
            };
            Req {
                ns: format!("ns{n}"),
                labels: [
                    ("app".to_string(), target_app.to_string()),
                    ("version".to_string(), "v1".to_string()),
                ]
                .into(),
                principal,
                src_ns: format!("ns{}", (r >> 24) % NAMESPACES as u64),
                method: if (r >> 28).is_multiple_of(3) {
                    "POST"
                } else {
                    "GET"
                },
                path,
                headers: vec![(
                    "x-api-version".to_string(),
                    if (r >> 30).is_multiple_of(4) {
                        "v3"
                    } else {
                        "v1"
                    }
                    .to_string(),
                )],
            }
        })
        .collect()
}

fn authz_request(r: &Req) -> AuthzRequest<'_> {
    AuthzRequest {
        workload: WorkloadRef {
            namespace: &r.ns,
            labels: &r.labels,
        },
        source_principal: r.principal.as_deref(),
        source_namespace: Some(&r.src_ns),
        method: r.method,
        path: &r.path,
        port: 8080,
        headers: &r.headers,
        request_auth: None,
    }
}

fn route_rules() -> Vec<RouteRule> {
    (0..HOSTS)
        .map(|i| {
            let host = format!("svc{i}.shop");
            let dest = |subset: &str, weight| WeightedDestination {
                destination: Destination {
                    host: host.clone(),
                    subset: Some(subset.into()),
                    port: None,
                },
                weight,
            };
            RouteRule {
                id: ObjectName {
                    namespace: "shop".into(),
                    name: format!("svc{i}"),
                },
                hosts: vec![host.clone()],
                http: vec![
                    HttpRoute {
                        name: Some("canary".into()),
                        matches: vec![RequestMatch {
                            name: None,
                            uri: None,
                            method: None,
                            headers: vec![HeaderMatch {
                                name: "x-canary".into(),
                                matcher: StringMatch::Exact("true".into()),
                            }],
                        }],
                        route: vec![dest("v2", 100)],
                        timeout: None,
                        retries: None,
                    },
                    HttpRoute {
                        name: Some("beta".into()),
                        matches: vec![RequestMatch {
                            name: None,
                            uri: Some(StringMatch::Prefix("/beta/".into())),
                            method: (i % 10 == 0).then(|| StringMatch::Regex("GET|HEAD".into())),
                            headers: vec![],
                        }],
                        route: vec![dest("v2", 50), dest("v1", 50)],
                        timeout: None,
                        retries: None,
                    },
                    HttpRoute {
                        name: Some("split".into()),
                        matches: vec![],
                        route: vec![dest("v1", 90), dest("v2", 10)],
                        timeout: Some(Duration::from_secs(3)),
                        retries: None,
                    },
                ],
            }
        })
        .collect()
}

struct RReq {
    host: String,
    path: String,
    method: &'static str,
    headers: Vec<(String, String)>,
}

fn route_requests(rng: &mut SplitMix64) -> Vec<RReq> {
    (0..REQUESTS)
        .map(|_| {
            let r = rng.next_u64();
            RReq {
                host: format!("svc{}.shop", r % HOSTS as u64),
                path: if (r >> 16).is_multiple_of(4) {
                    "/beta/cart".into()
                } else {
                    "/api/cart".into()
                },
                method: if (r >> 20).is_multiple_of(2) {
                    "GET"
                } else {
                    "POST"
                },
                headers: if (r >> 24).is_multiple_of(10) {
                    vec![("x-canary".into(), "true".into())]
                } else {
                    vec![("user-agent".into(), "pos/1.0".into())]
                },
            }
        })
        .collect()
}

/// Runs `f` over the request set repeatedly for about `budget`; returns
/// decisions per second.
fn measure(budget: Duration, mut f: impl FnMut(usize) -> bool) -> f64 {
    // Warm up.
    for i in 0..REQUESTS {
        black_box(f(i));
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for i in 0..REQUESTS {
            black_box(f(i));
        }
        n += REQUESTS as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn line(name: &str, rate: f64, baseline: Option<(&str, f64)>) {
    let ns = 1e9 / rate;
    match baseline {
        Some((b, brate)) => println!(
            "  {name:<44} {rate:>14.0} /s  {ns:>9.1} ns/decision  ({:.2}x the time of {b})",
            brate / rate
        ),
        None => println!("  {name:<44} {rate:>14.0} /s  {ns:>9.1} ns/decision"),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 200 } else { 1_500 });
    let mut rng = SplitMix64::new(0xdec1_5105);

    // --- authorization ---
    let ps = policies();
    let settings = MeshSettings::default();
    let compiled = CompiledPolicies::new(&ps, &settings);
    let reqs = requests(&mut rng);
    let areqs: Vec<AuthzRequest> = reqs.iter().map(authz_request).collect();
    let answers: HashMap<(String, Option<String>, String), bool> = reqs
        .iter()
        .zip(&areqs)
        .map(|(r, a)| {
            (
                (r.ns.clone(), r.principal.clone(), r.path.clone()),
                compiled.decide(a).allowed,
            )
        })
        .collect();
    let allowed = areqs.iter().filter(|r| compiled.decide(r).allowed).count();
    for r in &areqs {
        assert_eq!(
            compiled.decide(r).allowed,
            evaluate_uncompiled(&ps, r, &settings)
        );
    }
    println!(
        "authorization: {} policies, {} requests ({} allowed, {} denied)",
        ps.len(),
        REQUESTS,
        allowed,
        REQUESTS - allowed
    );
    let keys: Vec<(String, Option<String>, String)> = reqs
        .iter()
        .map(|r| (r.ns.clone(), r.principal.clone(), r.path.clone()))
        .collect();
    let floor = measure(budget, |i| answers.get(&keys[i]).copied().unwrap_or(false));
    let fast = measure(budget, |i| compiled.decide(&areqs[i]).allowed);
    let full = measure(budget, |i| compiled.evaluate(&areqs[i]).allowed);
    let naive = measure(budget, |i| evaluate_uncompiled(&ps, &areqs[i], &settings));
    line("baseline: HashMap lookup of the answer", floor, None);
    line("baseline: naive uncompiled evaluation", naive, None);
    line(
        "compiled decide (verdict, no evidence)",
        fast,
        Some(("the HashMap lookup", floor)),
    );
    println!(
        "  {:<44} {:>14.1}x faster than the naive evaluation",
        "",
        fast / naive
    );
    line(
        "compiled evaluate (with seed evidence)",
        full,
        Some(("the HashMap lookup", floor)),
    );
    println!(
        "  seed quotes 2-5 ms per authorization: decide is {:.0}x to {:.0}x faster",
        2e-3 * fast,
        5e-3 * fast
    );

    // --- routing ---
    let rules = route_rules();
    let routes = CompiledRoutes::new(&rules).expect("bench routes compile");
    let rreqs = route_requests(&mut rng);
    let rngs: Vec<u64> = (0..REQUESTS).map(|_| rng.next_u64()).collect();
    let floor_map: HashMap<String, String> = rules
        .iter()
        .map(|r| (r.hosts[0].clone(), "v1".to_string()))
        .collect();
    let mut subsets: BTreeMap<String, u32> = BTreeMap::new();
    for (i, r) in rreqs.iter().enumerate() {
        let q = RouteRequest {
            path: &r.path,
            method: r.method,
            headers: &r.headers,
        };
        let d = routes
            .route(&r.host, &q, rngs[i])
            .expect("every host has a default route");
        *subsets
            .entry(d.destination.subset.as_deref().unwrap_or("-").to_string())
            .or_default() += 1;
    }
    println!(
        "\nrouting: {} route rules ({} http routes), {} requests, subsets chosen {:?}",
        rules.len(),
        rules.len() * 3,
        REQUESTS,
        subsets
    );
    let floor = measure(budget, |i| {
        floor_map.get(&rreqs[i].host).is_some_and(|s| !s.is_empty())
    });
    let routed = measure(budget, |i| {
        let r = &rreqs[i];
        let q = RouteRequest {
            path: &r.path,
            method: r.method,
            headers: &r.headers,
        };
        routes.route(&r.host, &q, rngs[i]).is_ok()
    });
    line("baseline: HashMap<host, destination> lookup", floor, None);
    line(
        "compiled route (match + weighted pick)",
        routed,
        Some(("the HashMap lookup", floor)),
    );
    println!(
        "  seed quotes 0.5 ms per routing decision: route is {:.0}x faster",
        0.5e-3 * routed
    );
}
