//! Config input: every error names the document, the field and the reason;
//! an invalid input changes nothing; printing a config and reading it back
//! gives the same config; the wire encoding round-trips.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use tidemesh_policy::istio::ObjectKey;
use tidemesh_policy::model::*;
use tidemesh_policy::units::Ratio;
use tidemesh_policy::{parse_documents, Change, MeshConfig};

const SEED_AUTHZ: &str = include_str!("../testdata/seed/authorization_policy.yaml");
const SEED_CANARY: &str =
    include_str!("../testdata/seed/canary_virtualservice_destinationrule.yaml");
const SEED_SE: &str = include_str!("../testdata/seed/serviceentry_multicluster.yaml");

/// A config using every kind and most fields.
const FULL: &str = r#"
apiVersion: tidemesh.io/v1alpha1
kind: MeshSettings
metadata: {name: default}
spec: {defaultAction: DENY, rootNamespace: mesh-root}
---
apiVersion: tidemesh.io/v1alpha1
kind: ModeMatrix
metadata: {name: default}
spec:
  degraded:
    retries: {attempts: 2, backoff: {kind: LINEAR, base: 50ms, max: 500ms}}
    circuitBreaker: {errorRateThreshold: 0.25}
    observability: {mode: TRACING, sampling: 0.05}
  survival:
    observability: {mode: METRICS_ONLY, buffered: true}
  recovery:
    ramp: {startPercent: 2, factor: 2, step: 30s}
---
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf01}
spec: {region: us-west-2, zone: us-west-2a}
---
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf02}
spec: {region: us-west-2, zone: us-west-2a}
---
apiVersion: tidemesh.io/v1alpha1
kind: Workload
metadata: {name: pos-sf01, namespace: retail}
spec:
  service: pos
  store: sf01
  serviceAccount: pos
  address: 127.0.0.1:9000
  labels: {app: pos, version: v1}
  weight: 3
---
apiVersion: tidemesh.io/v1alpha1
kind: Workload
metadata: {name: pos-sf02, namespace: retail}
spec:
  service: pos.retail.svc.cluster.local
  store: sf02
  serviceAccount: pos
  address: "[::1]:9000"
  labels: {app: pos, version: v2}
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: pos, namespace: retail}
spec:
  host: pos
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  loadBalancer: {algorithm: WEIGHTED, localityAware: true}
  timeout: 2s
  retries:
    attempts: 3
    perTryTimeout: 500ms
    backoff: {kind: EXPONENTIAL, base: 25ms, max: 1s}
    retryOn: [5xx, connect-failure]
  circuitBreaker:
    consecutiveErrors: 5
    errorRateThreshold: 0.5
    minRequests: 20
    window: 10s
    openTime: 30s
    halfOpenProbes: 3
  limits: {maxConnections: 100, maxRequests: 200}
  rateLimit: {maxTokens: 100, tokensPerFill: 100, fillInterval: 1s}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: ledger, namespace: retail}
spec:
  host: ledger
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
      localityLbSetting: {enabled: true}
    connectionPool:
      tcp: {maxConnections: 10}
      http: {http1MaxPendingRequests: 5, http2MaxRequests: 50}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5s, baseEjectionTime: 1m}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: pos, namespace: retail}
spec:
  hosts: [pos]
  http:
  - name: canary
    match:
    - headers:
        X-Canary: {exact: "true"}
    - uri: {prefix: /beta/}
      method: {regex: "GET|HEAD"}
    route:
    - destination: {host: pos, subset: v2}
  - name: split
    timeout: 3s
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: "5xx,reset"}
    route:
    - destination: {host: pos, subset: v1, port: {number: 9000}}
      weight: 75
    - destination: {host: pos, subset: v2}
      weight: 25
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: pos-deny-admin, namespace: retail}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"], ports: ["9000"]}}]
    when:
    - {key: source.namespace, values: [guest*]}
    - {key: destination.port, values: ["9000"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: retail}
spec: {}
"#;

fn full() -> MeshConfig {
    MeshConfig::from_yaml(FULL).unwrap_or_else(|e| panic!("{e}"))
}

fn first_error(yaml: &str) -> String {
    match MeshConfig::from_yaml(yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.issues()[0].to_string(),
    }
}

#[test]
fn the_full_example_parses_into_the_model() {
    let c = full();
    assert_eq!(c.settings.root_namespace, "mesh-root");
    assert_eq!(
        c.mode_matrix.degraded.breaker,
        BreakerMode::ErrorRate(Ratio::from_percent(25).unwrap())
    );
    assert_eq!(c.mode_matrix.target, ModeMatrix::default().target);
    assert_eq!(c.mode_matrix.recovery.ramp.unwrap().start_percent, 2);
    assert_eq!(c.workloads[1].service, "pos.retail");
    let pos = c.destination_policy("pos.retail").unwrap();
    assert_eq!(pos.origin, PolicyOrigin::DestinationPolicy);
    assert_eq!(
        pos.traffic.load_balancer.unwrap().algorithm,
        LbAlgorithm::Weighted
    );
    assert_eq!(pos.traffic.rate_limit.unwrap().max_tokens, 100);
    let ledger = c.destination_policy("ledger.retail").unwrap();
    assert_eq!(
        ledger.traffic.load_balancer.unwrap().algorithm,
        LbAlgorithm::LeastRequest
    );
    assert_eq!(
        ledger
            .traffic
            .circuit_breaker
            .as_ref()
            .unwrap()
            .consecutive_errors,
        Some(7)
    );
    let vs = c.route_rule("pos.retail").unwrap();
    assert_eq!(vs.http[0].matches[0].headers[0].name, "x-canary");
    assert_eq!(
        vs.http[1].retries.as_ref().unwrap().retry_on,
        vec!["5xx", "reset"]
    );
    assert_eq!(c.authz_policies.len(), 2);
    assert_eq!(c.endpoints_for("pos.retail", Some("v2")).unwrap().len(), 1);
    assert_eq!(
        c.services(),
        vec!["ledger.retail".to_string(), "pos.retail".to_string()]
    );
}

#[test]
fn printing_and_reading_back_gives_the_same_config() {
    let seed = [SEED_AUTHZ, SEED_CANARY, SEED_SE].join("\n---\n");
    for c in [
        full(),
        MeshConfig::from_yaml(&seed).unwrap(),
        MeshConfig::default(),
    ] {
        let yaml = c.to_yaml();
        let back = MeshConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(back, c, "{yaml}");
        assert_eq!(back.to_yaml(), yaml, "canonical output is stable");
        let json = c.to_json();
        let back = MeshConfig::from_yaml(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
        assert_eq!(back, c);
    }
}

#[test]
fn document_order_does_not_matter() {
    let docs: Vec<&str> = FULL.split("\n---\n").collect();
    let reversed: Vec<&str> = docs.iter().rev().copied().collect();
    assert_eq!(
        MeshConfig::from_yaml(&reversed.join("\n---\n")).unwrap(),
        full()
    );
}

#[test]
fn the_wire_encoding_round_trips() {
    let c = full();
    let bytes = postcard::to_stdvec(&c).unwrap();
    let back: MeshConfig = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, c);
    // Hostile bytes are an error, never a panic.
    for cut in 0..bytes.len().min(400) {
        let _ = postcard::from_bytes::<MeshConfig>(&bytes[..cut]);
    }
}

#[test]
fn errors_name_document_field_and_reason() {
    let bad_weights = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews-canary
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 20
"#;
    assert_eq!(
        first_error(bad_weights),
        "document 2 (VirtualService reviews-canary): spec.http[0].route[1].weight: weights of a route must sum to 100, got 110"
    );

    let unknown_field = SEED_AUTHZ.replace("principals:", "notPrincipals:");
    assert_eq!(
        first_error(&unknown_field),
        "document 1 (AuthorizationPolicy payment-service-authz): spec.rules[0].from[0].source.notPrincipals: field notPrincipals is not supported by tidemesh (supported here: principals, namespaces, requestPrincipals, notRequestPrincipals)"
    );

    let missing_subset = SEED_CANARY.replace(
        "subset: v2\n      weight: 10\n",
        "subset: v3\n      weight: 10\n",
    );
    assert_eq!(
        first_error(&missing_subset),
        "document 1 (VirtualService payment-service): spec.http[1].route[1].destination.subset: subset v3 of host payment-service.payments is not defined (destination policy payments/payment-service defines: v1, v2)"
    );

    let cases: &[(&str, &str)] = &[
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], gateways: [gw], http: [{route: [{destination: {host: a}}]}]}",
         "document 1 (VirtualService a): spec.gateways: field gateways is not supported by tidemesh"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{route: [{destination: {}}]}]}",
         "document 1 (VirtualService a): spec.http[0].route[0].destination.host: required field is missing"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{match: [{headers: {x: {regex: '(('}}}], route: [{destination: {host: a}}]}]}",
         "document 1 (VirtualService a): spec.http[0].match[0].headers.x.regex: invalid regex"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}}]}, {route: [{destination: {host: a}}]}]}",
         "document 1 (VirtualService a): spec.http[0]: a route without match catches every request"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{route: [{destination: {host: nowhere}}]}]}",
         "document 1 (VirtualService a): spec.http[0].route[0].destination.host: host nowhere.default is not a known service"),
        ("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: AUDIT}",
         "document 1 (AuthorizationPolicy a): spec.action: action AUDIT is not supported by tidemesh"),
        ("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{from: [{source: {principals: ['spiffe://td/sa/x']}}]}]}",
         "document 1 (AuthorizationPolicy a): spec.rules[0].from[0].source.principals[0]: write principals without the scheme"),
        ("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{to: [{operation: {paths: ['/a/*/b']}}]}]}",
         "document 1 (AuthorizationPolicy a): spec.rules[0].to[0].operation.paths[0]: \"/a/*/b\": '*' is only allowed"),
        ("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{to: [{operation: {methods: [get]}}]}]}",
         "document 1 (AuthorizationPolicy a): spec.rules[0].to[0].operation.methods[0]: HTTP methods are case-sensitive and uppercase: write \"GET\""),
        ("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{when: [{key: source.ip, values: [10.0.0.1]}]}]}",
         "document 1 (AuthorizationPolicy a): spec.rules[0].when[0].key: condition key \"source.ip\" is not supported"),
        ("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{from: [{source: {}}]}]}",
         "document 1 (AuthorizationPolicy a): spec.rules[0].from[0].source: a source must set principals, namespaces, requestPrincipals or notRequestPrincipals"),
        ("apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {}",
         "document 1 (AuthorizationPolicy a): apiVersion: security.istio.io/v1alpha1 is not supported for kind AuthorizationPolicy; use security.istio.io/v1beta1 or security.istio.io/v1"),
        ("apiVersion: tidemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: retail}\nspec: {service: pos, store: nowhere, serviceAccount: pos, address: '127.0.0.1:1'}",
         "document 1 (Workload w): spec.store: store nowhere is not defined"),
        ("apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {name: sf01, namespace: x}\nspec: {region: r, zone: z}",
         "document 1 (Store sf01): metadata.namespace: Store is cluster-scoped"),
        ("apiVersion: tidemesh.io/v1alpha1\nkind: ModeMatrix\nmetadata: {name: edge}\nspec: {}",
         "document 1 (ModeMatrix edge): metadata.name: there is one mesh-wide object of this kind"),
        ("apiVersion: tidemesh.io/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: p}\nspec: {host: p, circuitBreaker: {window: 1s}}",
         "document 1 (DestinationPolicy p): spec.circuitBreaker: set consecutiveErrors, errorRateThreshold or both"),
        ("apiVersion: tidemesh.io/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: p}\nspec: {host: p, timeout: 10x}",
         "document 1 (DestinationPolicy p): spec.timeout: invalid duration \"10x\": unknown unit"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: p}\nspec: {host: p, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}",
         "document 1 (DestinationRule p): spec.trafficPolicy.loadBalancer.simple: \"PASSTHROUGH\" is not supported"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: p}\nspec: {host: p, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}",
         "document 1 (DestinationRule p): spec.trafficPolicy.tls.mode: ISTIO_MUTUAL is not supported: the hub's leg to a ServiceEntry host leaves the mesh"),
        ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec: {hosts: [a.example], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: a.example}]}",
         "document 1 (ServiceEntry s): spec.endpoints[0].address: resolution STATIC needs IP addresses"),
        ("kind: VirtualService\nmetadata: {name: a}",
         "document 1 (VirtualService a): apiVersion: required, as a string"),
        ("- just\n- a list\n",
         "document 1: a document must be a mapping"),
        ("a: [\n",
         "document 1: invalid YAML:"),
        ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
         "document 1 (Secret s): kind: kind Secret (v1) is not supported by tidemesh"),
    ];
    for (yaml, want) in cases {
        let got = first_error(yaml);
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}…");
    }
}

#[test]
fn all_problems_are_reported_together() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a}
spec:
  hosts: [a]
  http:
  - timeout: forever
    route:
    - {destination: {host: a}, weight: 50}
    - {destination: {host: a}, weight: 20}
---
apiVersion: v1
kind: Service
metadata: {name: b}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c}
spec: {action: MAYBE}
"#;
    let e = MeshConfig::from_yaml(yaml).unwrap_err();
    let all: Vec<String> = e.issues().iter().map(ToString::to_string).collect();
    assert_eq!(e.count(), 4, "{all:#?}");
    assert!(all[0].starts_with("document 1 (VirtualService a): spec.http[0].route[1].weight: weights of a route must sum to 100, got 70"));
    assert!(
        all[1].starts_with("document 1 (VirtualService a): spec.http[0].timeout: invalid duration")
    );
    assert!(all[2].starts_with("document 2 (Service b): kind:"));
    assert!(all[3].starts_with("document 3 (AuthorizationPolicy c): spec.action:"));
    assert!(e
        .to_string()
        .starts_with("4 problems in the config; nothing was applied:\n  document 1"));
}

#[test]
fn an_invalid_apply_changes_nothing_and_names_the_broken_reference() {
    let base = full();
    let before = base.clone();
    // Removing subset v2 from pos's policy would break the route rule applied earlier.
    let breaking = r#"
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: pos, namespace: retail}
spec:
  host: pos
  subsets: [{name: v1, labels: {version: v1}}]
"#;
    let e = base.apply_yaml(breaking).unwrap_err();
    assert!(
        e.issues()[0].to_string().starts_with(
            "VirtualService pos in namespace retail (already applied): spec.http[0].route[0].destination.subset: subset v2 of host pos.retail is not defined"
        ),
        "{e}"
    );
    assert_eq!(base, before);
    // The same document twice in one input.
    let twice = format!("{breaking}\n---\n{breaking}");
    let e = MeshConfig::default().apply_yaml(&twice).unwrap_err();
    assert!(e.to_string().contains("document 2 (DestinationPolicy pos): metadata.name: DestinationPolicy retail/pos is also defined by document 1 of this input"), "{e}");
    // A second policy for one host.
    let dup_host = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pos-2, namespace: retail}\nspec: {host: pos}";
    let e = base.apply_yaml(dup_host).unwrap_err();
    assert!(
        e.to_string()
            .contains("host pos.retail already has a destination policy"),
        "{e}"
    );
}

#[test]
fn apply_replaces_by_key_and_diff_summarizes() {
    let base = full();
    let patch = r#"
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf03}
spec: {region: us-east-1, zone: us-east-1a}
---
apiVersion: tidemesh.io/v1alpha1
kind: MeshSettings
metadata: {name: default}
spec: {defaultAction: ALLOW, rootNamespace: mesh-root}
"#;
    let next = base.apply_yaml(patch).unwrap();
    assert_eq!(next.settings.default_action, Action::Allow);
    assert_eq!(next.stores.len(), 3);
    let changes = base.diff(&next);
    assert_eq!(
        changes,
        vec![
            Change::Changed(ObjectKey {
                kind: "MeshSettings",
                namespace: None,
                name: "default".into()
            }),
            Change::Added(ObjectKey {
                kind: "Store",
                namespace: None,
                name: "sf03".into()
            }),
        ]
    );
    assert_eq!(changes[1].to_string(), "added Store sf03");
    // Re-applying the same content changes nothing.
    assert!(next.diff(&next.apply_yaml(patch).unwrap()).is_empty());
    // Delete, and refuse a delete that would break a reference.
    let removed = next
        .without(&[ObjectKey {
            kind: "Store",
            namespace: None,
            name: "sf03".into(),
        }])
        .unwrap();
    assert_eq!(removed.stores, base.stores);
    let e = next
        .without(&[ObjectKey {
            kind: "Store",
            namespace: None,
            name: "sf01".into(),
        }])
        .unwrap_err();
    assert!(e.to_string().contains("store sf01 is not defined"), "{e}");
}

#[test]
fn empty_documents_are_skipped_and_counted() {
    let yaml = format!("---\n---\n{SEED_AUTHZ}\n---\n");
    let r = parse_documents(&yaml).unwrap();
    assert_eq!(r.len(), 1);
    assert!(r[0].document >= 1);
}

#[test]
fn hostile_yaml_is_rejected_quickly() {
    // Billion laughs: aliases that would expand exponentially.
    let mut y = String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
    for i in 1..10 {
        let p = (b'a' + i - 1) as char;
        let c = (b'a' + i) as char;
        y.push_str(&format!(
            "{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        ));
    }
    let start = std::time::Instant::now();
    assert!(parse_documents(&y).is_err());
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    // Deep nesting.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(parse_documents(&deep).is_err());
    // Oversized input.
    let big = " ".repeat(tidemesh_policy::istio::MAX_INPUT_BYTES + 1);
    assert!(parse_documents(&big).is_err());
}

#[test]
fn the_deploy_example_mesh_is_valid() {
    let yaml = include_str!("../../../deploy/examples/mesh.yaml");
    let c = MeshConfig::from_yaml(yaml).expect("deploy/examples/mesh.yaml is valid");
    assert_eq!(c.service_entries.len(), 3);
    let p = c
        .destination_policy("inventory.store")
        .expect("the inventory policy");
    let cb = p.traffic.circuit_breaker.as_ref().expect("a breaker");
    assert_eq!(cb.consecutive_errors, Some(5));
    assert_eq!(cb.half_open_probes, 2);
    assert_eq!(p.traffic.retries.as_ref().map(|r| r.attempts), Some(3));
    // the cloud twin of a store service, and a cloud-only service
    let cloud: Vec<String> = c
        .endpoints()
        .into_iter()
        .filter(|e| e.location == EndpointLocation::Cloud)
        .map(|e| format!("{} {}", e.service, e.address))
        .collect();
    assert_eq!(
        cloud,
        [
            "catalog.cloud catalog.example.com:8080",
            "inventory.store inventory.cloud.internal:8080",
            "pricing.cloud pricing.example.com:50051"
        ]
    );
}

/// Fields of Istio's schema tidemesh would not act on are refused, each
/// named, never silently accepted.
#[test]
fn fields_tidemesh_does_not_act_on_are_refused() {
    let yaml = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: ledger, namespace: retail}
spec:
  host: ledger
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms}
      http: {maxRequestsPerConnection: 1, maxRetries: 2}
    outlierDetection: {consecutive5xxErrors: 7, maxEjectionPercent: 50}
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: pos, namespace: retail}
spec:
  host: pos
  circuitBreaker: {consecutiveErrors: 5, maxEjectionPercent: 10}
  limits: {maxConnections: 10, connectTimeout: 1s, maxRequestsPerConnection: 3, maxRetries: 1}
"#;
    let e = MeshConfig::from_yaml(yaml).unwrap_err();
    let all: Vec<String> = e.issues().iter().map(ToString::to_string).collect();
    for field in [
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
        "spec.trafficPolicy.connectionPool.http.maxRetries",
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "spec.circuitBreaker.maxEjectionPercent",
        "spec.limits.connectTimeout",
        "spec.limits.maxRequestsPerConnection",
        "spec.limits.maxRetries",
    ] {
        assert!(
            all.iter()
                .any(|i| i.contains(field) && i.contains("not supported by tidemesh")),
            "{field}: {all:#?}"
        );
    }
    assert_eq!(e.count(), 8, "{all:#?}");
}

const TLS_ENTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: cloud}
spec:
  hosts: [pay.cloud.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: https-api, protocol: HTTP}, {number: 9000, name: raw, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {https-api: 8443}}]
"#;

/// `trafficPolicy.tls` and `portLevelSettings` reach the model and print
/// back to the same config.
#[test]
fn tls_origination_settings_reach_the_model_and_round_trip() {
    let yaml = format!(
        "{TLS_ENTRY}---{}",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payments, namespace: cloud}
spec:
  host: pay.cloud.test
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: /etc/tidemesh/ca.pem, sni: api.pay.test, subjectAltNames: [api.pay.test]}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: MUTUAL, caCertificates: /etc/ca.pem, clientCertificate: /etc/c.pem, privateKey: /etc/k.pem}
"#
    );
    let c = MeshConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let t = &c.destination_policies[0].traffic;
    let host = t.tls.as_ref().unwrap();
    assert_eq!(host.mode, TlsMode::Simple);
    assert_eq!(host.sni.as_deref(), Some("api.pay.test"));
    assert_eq!(host.subject_alt_names, vec!["api.pay.test".to_string()]);
    let port = t.tls_for_port(443).unwrap();
    assert_eq!(port.mode, TlsMode::Mutual);
    assert_eq!(port.private_key.as_deref(), Some("/etc/k.pem"));
    assert_eq!(t.tls_for_port(9000), Some(host));
    let again = MeshConfig::from_yaml(&c.to_yaml()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, c);
    let wire = postcard::to_allocvec(&c).unwrap();
    assert_eq!(postcard::from_bytes::<MeshConfig>(&wire).unwrap(), c);

    // Without caCertificates (SIMPLE or MUTUAL) the hub verifies against its
    // system roots: the setting is accepted, with no CA file, and prints
    // back without one.
    let no_ca = format!(
        "{TLS_ENTRY}---{}",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payments, namespace: cloud}
spec:
  host: pay.cloud.test
  trafficPolicy:
    tls: {mode: SIMPLE, sni: api.pay.test}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: MUTUAL, clientCertificate: /etc/c.pem, privateKey: /etc/k.pem}
"#
    );
    let c = MeshConfig::from_yaml(&no_ca).unwrap_or_else(|e| panic!("{e}"));
    let t = &c.destination_policies[0].traffic;
    let host = t.tls.as_ref().unwrap();
    assert_eq!(
        (host.mode, host.ca_certificates.as_deref()),
        (TlsMode::Simple, None)
    );
    let port = t.tls_for_port(443).unwrap();
    assert_eq!(
        (port.mode, port.ca_certificates.as_deref()),
        (TlsMode::Mutual, None)
    );
    let printed = c.to_yaml();
    assert!(!printed.contains("caCertificates"), "{printed}");
    assert_eq!(
        MeshConfig::from_yaml(&printed).unwrap_or_else(|e| panic!("{e}")),
        c
    );
}

/// Every TLS setting tidemesh could not act on is refused with the field.
#[test]
fn tls_origination_refuses_what_it_cannot_act_on() {
    let dr = |tp: &str| {
        format!("{TLS_ENTRY}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: p, namespace: cloud}}\nspec:\n  host: pay.cloud.test\n  trafficPolicy: {tp}\n")
    };
    let cases = [
        ("{tls: {mode: ISTIO_MUTUAL}}",
         "spec.trafficPolicy.tls.mode: ISTIO_MUTUAL is not supported"),
        ("{tls: {mode: MUTUAL, caCertificates: /ca.pem}}",
         "spec.trafficPolicy.tls.clientCertificate: required for MUTUAL"),
        ("{tls: {mode: SIMPLE, caCertificates: /ca.pem, privateKey: /k.pem}}",
         "spec.trafficPolicy.tls.privateKey: only MUTUAL presents a client certificate"),
        ("{tls: {mode: SIMPLE, caCertificates: ca.pem}}",
         "spec.trafficPolicy.tls.caCertificates: \"ca.pem\" must be an absolute path"),
        ("{tls: {mode: SIMPLE, caCertificates: /ca.pem, insecureSkipVerify: true}}",
         "spec.trafficPolicy.tls.insecureSkipVerify: tidemesh always verifies"),
        ("{tls: {mode: SIMPLE, credentialName: pay-secret}}",
         "spec.trafficPolicy.tls.credentialName: not supported"),
        ("{tls: {mode: SIMPLE, caCertificates: /ca.pem, sni: 'bad name'}}",
         "spec.trafficPolicy.tls.sni: \"bad name\" is not a DNS name"),
        ("{tls: {mode: SIMPLE, caCertificates: /ca.pem, subjectAltNames: ['x y']}}",
         "spec.trafficPolicy.tls.subjectAltNames[0]:"),
        ("{tls: {mode: DISABLE, sni: a.test}}",
         "spec.trafficPolicy.tls: mode DISABLE takes no certificates"),
        ("{tls: {mode: SIMPLE, caCertificates: /ca.pem, verifyCertificateAtClient: true}}",
         "spec.trafficPolicy.tls"),
        ("{portLevelSettings: [{port: {number: 9000}, tls: {mode: SIMPLE, caCertificates: /ca.pem}}]}",
         "spec.trafficPolicy.portLevelSettings[port 9000].port.number: the hub gateway forwards pay.cloud.test to its first port, 443"),
        ("{portLevelSettings: [{port: {number: 7}, tls: {mode: SIMPLE, caCertificates: /ca.pem}}]}",
         "spec.trafficPolicy.portLevelSettings[port 7].port.number: port 7 is not a port of ServiceEntry"),
        ("{portLevelSettings: [{port: {number: 443}}]}",
         "spec.trafficPolicy.portLevelSettings[0]: tidemesh acts only on tls"),
    ];
    for (tp, want) in cases {
        let got = first_error(&dr(tp));
        assert!(got.contains(want), "\n got: {got}\nwant: …{want}…");
    }
    // Only ServiceEntry hosts: spokes never originate TLS (mesh hops are mTLS).
    let mesh = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r, namespace: retail}\nspec:\n  host: ledger\n  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /ca.pem}}\n";
    assert!(
        first_error(mesh).contains("host ledger.retail is not a ServiceEntry host"),
        "{}",
        first_error(mesh)
    );
    // A TCP first port is not originated.
    let tcp = TLS_ENTRY.replace(
        "[{number: 443, name: https-api, protocol: HTTP}, {number: 9000, name: raw, protocol: TCP}]",
        "[{number: 9000, name: raw, protocol: TCP}]",
    ).replace("{https-api: 8443}", "{raw: 9000}");
    let yaml = format!("{tcp}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: p, namespace: cloud}}\nspec:\n  host: pay.cloud.test\n  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: /ca.pem}}}}\n");
    let got = first_error(&yaml);
    assert!(
        got.contains("speaks TCP: tidemesh originates TLS for HTTP"),
        "{got}"
    );
}

/// The hub stores config versions as JSON: a version written before TLS
/// origination existed (no `tls`, no `port_tls`) still reads, as no TLS.
#[test]
fn json_configs_from_before_tls_origination_still_read() {
    let c = full();
    assert!(!c.destination_policies.is_empty());
    let mut v: serde_json::Value = serde_json::to_value(&c).unwrap();
    for p in v["destination_policies"].as_array_mut().unwrap() {
        let t = p["traffic"].as_object_mut().unwrap();
        assert!(t.remove("tls").is_some() && t.remove("port_tls").is_some());
    }
    let old: MeshConfig = serde_json::from_value(v).unwrap();
    assert_eq!(old, c);
}

const JWKS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

fn request_authn(rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: pos}}}}\n  jwtRules:\n  - {rule}\n"
    )
}

#[test]
fn request_authentication_reaches_the_model_and_round_trips() {
    let yaml = request_authn(&format!(
        "{{issuer: 'https://idp.test', audiences: [pos], jwks: '{JWKS}', forwardOriginalToken: true, outputClaimToHeaders: [{{header: X-User, claim: sub}}], fromHeaders: [{{name: x-jwt, prefix: 'Token '}}]}}\n  - {{issuer: 'https://idp2.test', jwksUri: 'file:///etc/tidemesh/jwks.json'}}"
    ));
    let c = MeshConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let ra = &c.request_authns[0];
    assert_eq!(ra.id.to_string(), "shop/jwt");
    let r = &ra.jwt_rules[0];
    assert_eq!(r.issuer, "https://idp.test");
    assert!(r.forward_original_token);
    assert_eq!(r.output_claim_to_headers[0].header, "x-user");
    assert_eq!(r.from_headers[0].prefix.as_deref(), Some("Token "));
    assert_eq!(
        ra.jwt_rules[1].jwks,
        tidemesh_policy::reqauthn::JwksSource::File("/etc/tidemesh/jwks.json".into())
    );
    assert!(!ra.jwt_rules[1].forward_original_token, "default false");
    let back = MeshConfig::from_yaml(&c.to_yaml()).unwrap();
    assert_eq!(back, c);
    let bytes = postcard::to_stdvec(&c).unwrap();
    assert_eq!(postcard::from_bytes::<MeshConfig>(&bytes).unwrap(), c);
    // a hub JSON config stored before RequestAuthentication still reads
    let mut old = serde_json::to_value(full()).unwrap();
    let o = old.as_object_mut().unwrap();
    o.remove("request_authns");
    o.remove("jwks_files");
    for p in o["authz_policies"].as_array_mut().unwrap() {
        for r in p["rules"].as_array_mut().unwrap() {
            for s in r["from"].as_array_mut().unwrap() {
                let s = s.as_object_mut().unwrap();
                s.remove("request_principals");
                s.remove("not_request_principals");
            }
        }
    }
    assert_eq!(serde_json::from_value::<MeshConfig>(old).unwrap(), full());
}

#[test]
fn request_authentication_refuses_what_it_cannot_act_on() {
    for (rule, want) in [
        (
            "{issuer: i, jwksUri: 'https://idp.test/jwks'}".to_string(),
            "spec.jwtRules[0].jwksUri: \"https://idp.test/jwks\": tidemesh does not fetch key sets over the network",
        ),
        ("{issuer: i, jwksUri: 'file://rel/j.json'}".into(), "needs an absolute path"),
        ("{issuer: i}".into(), "spec.jwtRules[0].jwks: a key set is required"),
        (format!("{{issuer: i, jwks: '{JWKS}', jwksUri: 'file:///j'}}"), "not both"),
        ("{issuer: i, jwks: '{\"keys\": []}'}".into(), "spec.jwtRules[0].jwks: key set"),
        (format!("{{issuer: i, jwks: '{JWKS}', fromParams: [access_token]}}"), "spec.jwtRules[0].fromParams: tokens in query parameters are not supported"),
        (format!("{{issuer: i, jwks: '{JWKS}', fromCookies: [session]}}"), "fromCookies: tokens in cookies"),
        (format!("{{issuer: i, jwks: '{JWKS}', outputPayloadToHeader: x}}"), "field outputPayloadToHeader is not supported"),
        (format!("{{issuer: i, jwks: '{JWKS}', outputClaimToHeaders: [{{header: authorization, claim: sub}}]}}"), "owned by HTTP or the mesh"),
        (format!("{{issuer: i, jwks: '{JWKS}', outputClaimToHeaders: [{{header: 'x y', claim: sub}}]}}"), "not an HTTP header name"),
        (format!("{{issuer: i, jwks: '{JWKS}', fromHeaders: [{{name: x-t}}], outputClaimToHeaders: [{{header: x-t, claim: sub}}]}}"), "carries the token"),
        (format!("{{issuer: '', jwks: '{JWKS}'}}"), "spec.jwtRules[0].issuer: required"),
    ] {
        let e = first_error(&request_authn(&rule));
        assert!(e.contains(want), "{rule}: {e}");
        assert!(e.contains("document 1 (RequestAuthentication shop/jwt)") || e.contains("RequestAuthentication"), "{e}");
    }
    let e = first_error("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\nspec: {}\n");
    assert!(e.contains("at least one JWT rule"), "{e}");
    // the JWT parts of AuthorizationPolicy
    let authz = |source: &str, when: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: shop}}\nspec:\n  rules:\n  - from: [{{source: {source}}}]\n    when: [{when}]\n")
    };
    let ok = authz(
        "{requestPrincipals: ['https://idp.test/*'], notRequestPrincipals: ['*/root']}",
        "{key: 'request.auth.claims[groups]', values: [admin]}, {key: 'request.auth.claims[a][b]', values: [x]}, {key: request.auth.principal, values: ['*']}, {key: request.auth.audiences, values: [pos]}, {key: request.auth.presenter, values: [till]}",
    );
    MeshConfig::from_yaml(&ok).unwrap_or_else(|e| panic!("{e}"));
    for (source, when, want) in [
        (
            "{requestPrincipals: [alice]}",
            "{key: destination.port, values: ['80']}",
            "is not a request principal: write ISSUER/SUBJECT",
        ),
        (
            "{requestPrincipals: ['a*b/c']}",
            "{key: destination.port, values: ['80']}",
            "'*' is only allowed",
        ),
        (
            "{principals: ['td/ns/a/sa/b']}",
            "{key: 'request.auth.claims', values: [x]}",
            "name 1 to 8 nested claims",
        ),
        (
            "{principals: ['td/ns/a/sa/b']}",
            "{key: 'request.auth.claims[a', values: [x]}",
            "unclosed",
        ),
        (
            "{principals: ['td/ns/a/sa/b']}",
            "{key: request.auth.foo, values: [x]}",
            "is not supported by tidemesh",
        ),
        (
            "{principals: ['td/ns/a/sa/b']}",
            "{key: request.auth.principal, values: [nobody]}",
            "is not a request principal",
        ),
    ] {
        let e = first_error(&authz(source, when));
        assert!(e.contains(want), "{source} {when}: {e}");
    }
}
