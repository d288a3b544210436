//! The seed document's examples, unchanged: its Istio YAML applies, its
//! authorization example evaluates exactly as its evidence JSON shows, and its
//! canary route splits 90/10 with the x-canary header sending all to v2.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::collections::BTreeMap;
use std::time::Duration;

use tidemesh_policy::model::{Action, EndpointLocation};
use tidemesh_policy::routing::{Balancer, Candidate, LocalityTier, SplitMix64};
use tidemesh_policy::{
    parse_documents, AuthzReason, AuthzRequest, CompiledPolicies, CompiledRoutes, MeshConfig,
    NoHeaders, RouteReason, RouteRequest, WorkloadRef,
};

const AUTHZ: &str = include_str!("../testdata/seed/authorization_policy.yaml");
const CANARY: &str = include_str!("../testdata/seed/canary_virtualservice_destinationrule.yaml");
const SERVICE_ENTRY: &str = include_str!("../testdata/seed/serviceentry_multicluster.yaml");
const K8S: &str = include_str!("../testdata/seed/k8s_service_deployment.yaml");
const ENVOY_FILTER: &str = include_str!("../testdata/seed/envoyfilter_rate_limit.yaml");
const AUTHZ_EVIDENCE: &str = include_str!("../testdata/seed/authorization_policy_evidence.json");
const ROUTING_EVIDENCE: &str = include_str!("../testdata/seed/canary_routing_evidence.json");

fn seed_config() -> MeshConfig {
    let all = [AUTHZ, CANARY, SERVICE_ENTRY].join("\n---\n");
    MeshConfig::from_yaml(&all).expect("the seed's YAML applies unchanged")
}

#[test]
fn each_seed_example_applies_unchanged() {
    for (name, yaml) in [
        ("authz", AUTHZ),
        ("canary", CANARY),
        ("service entry", SERVICE_ENTRY),
    ] {
        let resources = parse_documents(yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        MeshConfig::from_resources(resources).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let c = seed_config();
    assert_eq!(c.authz_policies.len(), 1);
    assert_eq!(c.route_rules.len(), 1);
    assert_eq!(c.destination_policies.len(), 1);
    assert_eq!(c.service_entries.len(), 1);
    assert_eq!(c.route_rules[0].hosts, vec!["payment-service.payments"]);
    let se = &c.service_entries[0];
    assert_eq!(se.hosts, vec!["payment-service.remote-cluster.global"]);
    let eps = c.endpoints();
    assert_eq!(eps.len(), 1);
    assert_eq!(
        eps[0].address,
        "payment-service.remote-cluster.svc.cluster.local:8080"
    );
    assert_eq!(eps[0].location, EndpointLocation::Cloud);
    assert_eq!(eps[0].locality.region, "us-west-2");
    assert_eq!(eps[0].locality.zone, "zone-b");
}

#[test]
fn the_seed_authorization_example_evaluates_as_its_evidence_shows() {
    let c = seed_config();
    let compiled = CompiledPolicies::from_config(&c);
    let labels: BTreeMap<String, String> = [("app", "payment-service"), ("version", "v1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let headers = [("x-api-version", "v1")];
    let request = AuthzRequest {
        workload: WorkloadRef {
            namespace: "payments",
            labels: &labels,
        },
        source_principal: Some("cluster.local/ns/default/sa/frontend"),
        source_namespace: Some("default"),
        method: "POST",
        path: "/api/charge",
        port: 8080,
        headers: &headers,
        request_auth: None,
    };
    let decision = compiled.evaluate(&request);
    assert!(decision.allowed);
    assert_eq!(decision.policy.as_deref(), Some("payment-service-authz"));
    assert_eq!(decision.rule_index, Some(0));
    assert_eq!(decision.action, Action::Allow);
    assert_eq!(decision.reason, AuthzReason::AllowPolicyMatched);

    // The seed's evidence, field for field; evaluation_time_ms is the caller's
    // measurement (this crate reads no clock), so the seed's 4 ms is passed in.
    let expected: serde_json::Value = serde_json::from_str(AUTHZ_EVIDENCE).unwrap();
    let got = decision.to_seed_json(Some(Duration::from_millis(4)));
    assert_eq!(
        got,
        expected,
        "got:\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );

    // And the same verdict on the allocation-free path.
    let v = compiled.decide(&request);
    assert!(v.allowed);
    assert_eq!(v.rule_index, Some(0));

    // Each check failing on its own denies (the policy selects the workload).
    let wrong_principal = AuthzRequest {
        source_principal: Some("cluster.local/ns/default/sa/other"),
        ..request
    };
    let wrong_method = AuthzRequest {
        method: "GET",
        ..request
    };
    let wrong_path = AuthzRequest {
        path: "/api/admin",
        ..request
    };
    let old_version = [("x-api-version", "v0")];
    let wrong_header = AuthzRequest {
        headers: &old_version,
        ..request
    };
    let no_header = AuthzRequest {
        headers: &NoHeaders,
        ..request
    };
    let no_identity = AuthzRequest {
        source_principal: None,
        ..request
    };
    for (what, r) in [
        ("principal", wrong_principal),
        ("method", wrong_method),
        ("path", wrong_path),
        ("header value", wrong_header),
        ("header missing", no_header),
        ("no identity", no_identity),
    ] {
        let d = compiled.evaluate(&r);
        assert!(!d.allowed, "{what}");
        assert_eq!(d.reason, AuthzReason::NoAllowPolicyMatched, "{what}");
        assert_eq!(d.evaluated.len(), 1);
        assert!(!d.evaluated[0].rules_evaluated[0].matched);
    }
    // The refund path and the checkout principal and v2 are allowed too.
    let v2 = [("x-api-version", "v2")];
    let refund = AuthzRequest {
        source_principal: Some("cluster.local/ns/checkout/sa/checkout-service"),
        path: "/api/refund?id=7",
        headers: &v2,
        ..request
    };
    assert!(compiled.decide(&refund).allowed);
    // A workload the policy does not select gets the mesh default: deny.
    let other: BTreeMap<String, String> = [("app".to_string(), "ledger".to_string())].into();
    let unselected = AuthzRequest {
        workload: WorkloadRef {
            namespace: "payments",
            labels: &other,
        },
        ..request
    };
    let d = compiled.evaluate(&unselected);
    assert_eq!((d.allowed, d.reason), (false, AuthzReason::MeshDefault));
}

#[test]
fn the_canary_route_splits_90_10_and_x_canary_sends_all_to_v2() {
    let c = seed_config();
    let routes = CompiledRoutes::from_config(&c).unwrap();
    let host = "payment-service.payments";
    let plain = RouteRequest {
        path: "/api/charge",
        method: "POST",
        headers: &NoHeaders,
    };
    let mut rng = SplitMix64::new(0x5eed);
    let n = 10_000;
    let mut v1 = 0;
    let mut v2 = 0;
    for _ in 0..n {
        let d = routes.route(host, &plain, rng.next_u64()).unwrap();
        assert_eq!(d.rule_index, Some(1));
        assert_eq!(d.reason, RouteReason::Default);
        assert_eq!(&*d.destination.host, host);
        match d.destination.subset.as_deref() {
            Some("v1") => v1 += 1,
            Some("v2") => v2 += 1,
            other => panic!("unexpected subset {other:?}"),
        }
    }
    // 90/10 within ±1.5 points (σ ≈ 0.3 points at n = 10,000).
    let share_v2 = f64::from(v2) / f64::from(n);
    assert!((0.085..=0.115).contains(&share_v2), "v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, n);

    let canary_headers = [("x-canary", "true")];
    let canary = RouteRequest {
        headers: &canary_headers,
        ..plain
    };
    for _ in 0..n {
        let d = routes.route(host, &canary, rng.next_u64()).unwrap();
        assert_eq!(d.destination.subset.as_deref(), Some("v2"));
        assert_eq!(d.rule_index, Some(0));
        assert_eq!(d.reason, RouteReason::Matched);
        assert_eq!(d.weight, 100);
    }
    // Header values match exactly: "True" or "false" take the split.
    let not_quite = [("x-canary", "True")];
    let d = routes
        .route(
            host,
            &RouteRequest {
                headers: &not_quite,
                ..plain
            },
            0,
        )
        .unwrap();
    assert_eq!(d.rule_index, Some(1));

    // The subsets resolve to endpoints by the DestinationRule's labels.
    assert!(c.endpoints_for(host, Some("v1")).is_some());
    assert!(c.endpoints_for(host, Some("v3")).is_none());
}

#[test]
fn the_canary_evidence_has_the_seeds_shape() {
    let c = seed_config();
    let routes = CompiledRoutes::from_config(&c).unwrap();
    let plain = RouteRequest {
        path: "/api/charge",
        method: "POST",
        headers: &NoHeaders,
    };
    // The seed's random value 0.42 as a u64 fraction.
    let rng = (0.42f64 * 18_446_744_073_709_551_616.0) as u64;
    let ev = routes.explain("payment-service.payments", &plain, rng);
    let got = ev.to_seed_json();
    let seed: serde_json::Value = serde_json::from_str(ROUTING_EVIDENCE).unwrap();
    let s = &seed["routing_decision"];
    let g = &got["routing_decision"];
    assert_eq!(g["virtual_service"], s["virtual_service"]);
    let (sr, gr) = (&s["rules_evaluated"], &g["rules_evaluated"]);
    // Rule 0: the x-canary header match, not matched, skipped.
    assert_eq!(gr[0]["rule_index"], sr[0]["rule_index"]);
    assert_eq!(gr[0]["match"]["header"], sr[0]["match"]["header"]);
    assert_eq!(gr[0]["match"]["value"], sr[0]["match"]["value"]);
    assert_eq!(gr[0]["match"]["matched"], sr[0]["match"]["matched"]);
    assert_eq!(gr[0]["skipped"], sr[0]["skipped"]);
    // Rule 1: default, weights 90/10, random 0.42, v1.
    for key in ["rule_index", "match", "weights", "selected_subset"] {
        assert_eq!(gr[1][key], sr[1][key], "{key}");
    }
    assert!((gr[1]["random_value"].as_f64().unwrap() - 0.42).abs() < 1e-9);
    assert_eq!(g["final_route"]["subset"], s["final_route"]["subset"]);
    assert_eq!(g["final_route"]["reason"], s["final_route"]["reason"]);
}

#[test]
fn kubernetes_and_envoyfilter_kinds_are_rejected_by_name() {
    let e = parse_documents(K8S).unwrap_err();
    assert_eq!(e.count(), 2, "{e}");
    let first = e.issues()[0].to_string();
    assert!(first.starts_with("document 1 (Service payment-service): kind: kind Service (v1) is not supported by tidemesh"), "{first}");
    assert!(first.contains("Workload"), "{first}");
    assert!(e.issues()[1].to_string().starts_with(
        "document 2 (Deployment payment-service): kind: kind Deployment (apps/v1) is not supported"
    ));
    let e = parse_documents(ENVOY_FILTER).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("document 1 (EnvoyFilter rate-limit-filter): kind: kind EnvoyFilter"),
        "{msg}"
    );
    assert!(msg.contains("rateLimit"), "{msg}");
}

#[test]
fn locality_aware_endpoint_choice_is_local_first_with_cloud_fallback() {
    // The seed's far transfer: store sf01, local POS first, cloud fallback.
    let yaml = r#"
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata:
  name: sf01
spec:
  region: us-west-2
  zone: us-west-2a
---
apiVersion: tidemesh.io/v1alpha1
kind: Workload
metadata:
  name: inventory-sf01
  namespace: retail
spec:
  service: inventory
  store: sf01
  serviceAccount: inventory
  address: 127.0.0.1:9100
  labels: {app: inventory, version: v1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: inventory-cloud
  namespace: retail
spec:
  hosts: [inventory.retail]
  location: MESH_INTERNAL
  ports: [{number: 8443, name: https, protocol: HTTPS}]
  resolution: DNS
  endpoints:
  - address: inventory.cloud.example
    locality: us-west-2/us-west-2c
"#;
    let c = MeshConfig::from_yaml(yaml).unwrap();
    let mut eps = c.endpoints_for("inventory.retail", None).unwrap();
    assert_eq!(eps.len(), 2);
    let me = c.store("sf01").unwrap().locality();
    let mut b = Balancer::new(Default::default());
    let pick = |b: &mut Balancer, eps: &[tidemesh_policy::model::Endpoint], max| {
        let cands: Vec<Candidate> = eps.iter().map(Candidate::from).collect();
        b.pick(&me, &cands, max, 0)
            .map(|p| (eps[p.index].address.clone(), p.tier))
    };
    assert_eq!(
        pick(&mut b, &eps, LocalityTier::Remote),
        Some(("127.0.0.1:9100".into(), LocalityTier::SameSite))
    );
    eps.iter_mut()
        .find(|e| e.address.starts_with("127."))
        .unwrap()
        .health = tidemesh_policy::model::Health::Unhealthy;
    assert_eq!(
        pick(&mut b, &eps, LocalityTier::Remote),
        Some(("inventory.cloud.example:8443".into(), LocalityTier::Cloud))
    );
    // Survival: local only, so nothing.
    assert_eq!(pick(&mut b, &eps, LocalityTier::SameSite), None);
}
