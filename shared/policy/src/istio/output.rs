//! Printing a [`MeshConfig`] back as documents that [`super::parse_documents`]
//! reads: the canonical form behind `config get -o yaml|json`.
//!
//! Canonical means: objects in a fixed order (settings, mode matrix, stores,
//! workloads, service entries, destination policies, route rules,
//! authorization policies, peer authentications; each by namespace and name), keys sorted, hosts
//! canonical (`reviews.shop`), durations in their shortest unit, no empty or
//! absent fields. Parsing the output gives back an equal config.

use serde::Serialize;
use serde_json::Value as Json;

use super::input::*;
use super::peer_authn::{MtlsIn, PeerAuthenticationSpec, PortKeyIn};
use super::{SINGLETON_NAME, TIDEMESH_API};
use crate::model::*;
use crate::units::format_duration;

fn doc<S: Serialize>(api: &str, kind: &str, name: &str, namespace: Option<&str>, spec: S) -> Json {
    let d = Doc {
        api_version: api.to_string(),
        kind: kind.to_string(),
        metadata: Metadata {
            name: name.to_string(),
            namespace: namespace.map(str::to_string),
        },
        spec: Some(spec),
    };
    // Serializing plain structs of strings, numbers and maps cannot fail.
    strip(serde_json::to_value(d).unwrap_or(Json::Null))
}

/// Removes nulls, empty lists and empty maps, recursively.
fn strip(v: Json) -> Json {
    match v {
        Json::Object(m) => Json::Object(
            m.into_iter()
                .map(|(k, v)| (k, strip(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.into_iter().map(strip).collect()),
        other => other,
    }
}

fn is_empty(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::Array(a) => a.is_empty(),
        Json::Object(m) => m.is_empty(),
        _ => false,
    }
}

fn dur(d: Option<std::time::Duration>) -> Option<String> {
    d.map(format_duration)
}

fn list<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

fn labels(l: &Labels) -> Option<Labels> {
    (!l.is_empty()).then(|| l.clone())
}

fn int<T: Into<i64>>(v: T) -> i64 {
    v.into()
}

fn backoff(b: &Backoff) -> BackoffIn {
    let kind = match b.kind {
        BackoffKind::None => "NONE",
        BackoffKind::Fixed => "FIXED",
        BackoffKind::Linear => "LINEAR",
        BackoffKind::Exponential => "EXPONENTIAL",
    };
    let none = b.kind == BackoffKind::None;
    BackoffIn {
        kind: kind.into(),
        base: (!none).then(|| format_duration(b.base)),
        max: (!none).then(|| format_duration(b.max)),
    }
}

fn string_match(m: &StringMatch) -> StringMatchIn {
    let (mut exact, mut prefix, mut regex) = (None, None, None);
    match m {
        StringMatch::Exact(s) => exact = Some(s.clone()),
        StringMatch::Prefix(s) => prefix = Some(s.clone()),
        StringMatch::Regex(s) => regex = Some(s.clone()),
    }
    StringMatchIn {
        exact,
        prefix,
        regex,
    }
}

fn subsets(s: &[Subset]) -> Option<Vec<SubsetIn>> {
    (!s.is_empty()).then(|| {
        s.iter()
            .map(|s| SubsetIn {
                name: s.name.clone(),
                labels: labels(&s.labels),
            })
            .collect()
    })
}

fn lb_name(a: LbAlgorithm) -> &'static str {
    match a {
        LbAlgorithm::RoundRobin => "ROUND_ROBIN",
        LbAlgorithm::Weighted => "WEIGHTED",
        LbAlgorithm::LeastRequest => "LEAST_REQUEST",
        LbAlgorithm::Random => "RANDOM",
    }
}

fn authz(p: &AuthzPolicy) -> Json {
    let spec = AuthorizationPolicySpec {
        selector: p.selector.as_ref().map(|s| Selector {
            match_labels: Some(s.clone()),
        }),
        action: Some(p.action.as_str().to_string()),
        rules: list(&p.rules).map(|rules| {
            rules
                .iter()
                .map(|r| AuthzRuleIn {
                    from: list(&r.from).map(|f| {
                        f.iter()
                            .map(|s| FromIn {
                                source: SourceIn {
                                    principals: list(&s.principals),
                                    namespaces: list(&s.namespaces),
                                    request_principals: list(&s.request_principals),
                                    not_request_principals: list(&s.not_request_principals),
                                },
                            })
                            .collect()
                    }),
                    to: list(&r.to).map(|t| {
                        t.iter()
                            .map(|o| ToIn {
                                operation: OperationIn {
                                    methods: list(&o.methods),
                                    paths: list(&o.paths),
                                    ports: list(&o.ports)
                                        .map(|p| p.iter().map(u16::to_string).collect()),
                                },
                            })
                            .collect()
                    }),
                    when: list(&r.when).map(|w| {
                        w.iter()
                            .map(|c| ConditionIn {
                                key: c.key.to_istio(),
                                values: Some(c.values.clone()),
                            })
                            .collect()
                    }),
                })
                .collect()
        }),
    };
    doc(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        &p.id.name,
        Some(&p.id.namespace),
        spec,
    )
}

fn peer_authn(p: &PeerAuthn) -> Json {
    let mode = |m: Option<MtlsMode>| MtlsIn {
        mode: Some(m.map_or("UNSET", MtlsMode::as_str).to_string()),
    };
    let spec = PeerAuthenticationSpec {
        selector: p.selector.as_ref().map(|s| Selector {
            match_labels: Some(s.clone()),
        }),
        mtls: p.mode.map(|m| mode(Some(m))),
        port_level_mtls: (!p.port_modes.is_empty()).then(|| {
            p.port_modes
                .iter()
                .map(|(port, m)| (PortKeyIn::Number(int(*port)), mode(*m)))
                .collect()
        }),
    };
    doc(
        "security.istio.io/v1",
        "PeerAuthentication",
        &p.id.name,
        Some(&p.id.namespace),
        spec,
    )
}

fn route_rule(r: &RouteRule) -> Json {
    let http = r
        .http
        .iter()
        .map(|h| HttpRouteIn {
            name: h.name.clone(),
            matches: list(&h.matches).map(|ms| {
                ms.iter()
                    .map(|m| MatchIn {
                        name: m.name.clone(),
                        uri: m.uri.as_ref().map(string_match),
                        method: m.method.as_ref().map(string_match),
                        headers: (!m.headers.is_empty()).then(|| {
                            m.headers
                                .iter()
                                .map(|hm| (hm.name.clone(), string_match(&hm.matcher)))
                                .collect()
                        }),
                    })
                    .collect()
            }),
            route: Some(
                h.route
                    .iter()
                    .map(|d| RouteDestinationIn {
                        destination: DestinationIn {
                            host: d.destination.host.clone(),
                            subset: d.destination.subset.clone(),
                            port: d
                                .destination
                                .port
                                .map(|n| PortSelectorIn { number: int(n) }),
                        },
                        weight: Some(int(d.weight)),
                    })
                    .collect(),
            ),
            timeout: dur(h.timeout),
            retries: h.retries.as_ref().map(|r| RetriesIn {
                attempts: Some(int(r.attempts)),
                per_try_timeout: dur(r.per_try_timeout),
                retry_on: (!r.retry_on.is_empty()).then(|| r.retry_on.join(",")),
            }),
        })
        .collect();
    let spec = VirtualServiceSpec {
        hosts: r.hosts.clone(),
        http: Some(http),
    };
    doc(
        "networking.istio.io/v1",
        "VirtualService",
        &r.id.name,
        Some(&r.id.namespace),
        spec,
    )
}

fn client_tls(t: &ClientTls) -> ClientTlsIn {
    ClientTlsIn {
        mode: Some(t.mode.as_str().to_string()),
        client_certificate: t.client_certificate.clone(),
        private_key: t.private_key.clone(),
        ca_certificates: t.ca_certificates.clone(),
        sni: t.sni.clone(),
        subject_alt_names: (!t.subject_alt_names.is_empty()).then(|| t.subject_alt_names.clone()),
        credential_name: None,
        insecure_skip_verify: None,
        ca_crl: None,
    }
}

fn destination_policy(p: &DestinationPolicy) -> Json {
    let t = &p.traffic;
    match p.origin {
        PolicyOrigin::DestinationRule => {
            let load_balancer = t.load_balancer.map(|lb| IstioLoadBalancerIn {
                simple: Some(lb_name(lb.algorithm).to_string()),
                locality_lb_setting: Some(LocalityLbSettingIn {
                    enabled: Some(lb.locality_aware),
                }),
            });
            let connection_pool = t.limits.as_ref().map(|l| ConnectionPoolIn {
                tcp: Some(TcpPoolIn {
                    max_connections: l.max_connections.map(int),
                    connect_timeout: dur(l.connect_timeout),
                }),
                http: Some(HttpPoolIn {
                    http1_max_pending_requests: l.max_pending_requests.map(int),
                    http2_max_requests: l.max_requests.map(int),
                    max_requests_per_connection: l.max_requests_per_connection.map(int),
                    max_retries: l.max_retries.map(int),
                }),
            });
            let outlier_detection = t.circuit_breaker.as_ref().map(|c| OutlierDetectionIn {
                consecutive_5xx_errors: c.consecutive_errors.map(int),
                interval: Some(format_duration(c.window)),
                base_ejection_time: Some(format_duration(c.open_time)),
                max_ejection_percent: c.max_ejection_percent.map(int),
            });
            let tls = t.tls.as_ref().map(client_tls);
            let port_level_settings = (!t.port_tls.is_empty()).then(|| {
                t.port_tls
                    .iter()
                    .map(|pt| PortTrafficPolicyIn {
                        port: PortSelectorIn {
                            number: i64::from(pt.port),
                        },
                        tls: Some(client_tls(&pt.tls)),
                    })
                    .collect()
            });
            let traffic_policy = (load_balancer.is_some()
                || connection_pool.is_some()
                || outlier_detection.is_some()
                || tls.is_some()
                || port_level_settings.is_some())
            .then_some(IstioTrafficPolicyIn {
                load_balancer,
                connection_pool,
                outlier_detection,
                tls,
                port_level_settings,
            });
            let spec = DestinationRuleSpec {
                host: p.host.clone(),
                subsets: subsets(&p.subsets),
                traffic_policy,
            };
            doc(
                "networking.istio.io/v1",
                "DestinationRule",
                &p.id.name,
                Some(&p.id.namespace),
                spec,
            )
        }
        PolicyOrigin::DestinationPolicy => {
            let spec = DestinationPolicySpec {
                host: p.host.clone(),
                subsets: subsets(&p.subsets),
                load_balancer: t.load_balancer.map(|lb| LoadBalancerIn {
                    algorithm: lb_name(lb.algorithm).to_string(),
                    locality_aware: Some(lb.locality_aware),
                }),
                timeout: dur(t.timeout),
                retries: t.retries.as_ref().map(|r| RetryPolicyIn {
                    attempts: int(r.attempts),
                    per_try_timeout: dur(r.per_try_timeout),
                    backoff: Some(backoff(&r.backoff)),
                    retry_on: list(&r.retry_on),
                }),
                circuit_breaker: t.circuit_breaker.as_ref().map(|c| CircuitBreakerIn {
                    consecutive_errors: c.consecutive_errors.map(int),
                    error_rate_threshold: c.error_rate_threshold.map(|r| r.as_f64()),
                    min_requests: Some(int(c.min_requests)),
                    window: Some(format_duration(c.window)),
                    open_time: Some(format_duration(c.open_time)),
                    half_open_probes: Some(int(c.half_open_probes)),
                    max_ejection_percent: c.max_ejection_percent.map(int),
                }),
                limits: t.limits.as_ref().map(|l| LimitsIn {
                    max_connections: l.max_connections.map(int),
                    connect_timeout: dur(l.connect_timeout),
                    max_pending_requests: l.max_pending_requests.map(int),
                    max_requests: l.max_requests.map(int),
                    max_requests_per_connection: l.max_requests_per_connection.map(int),
                    max_retries: l.max_retries.map(int),
                }),
                rate_limit: t.rate_limit.map(|r| RateLimitIn {
                    max_tokens: int(r.max_tokens),
                    tokens_per_fill: Some(int(r.tokens_per_fill)),
                    fill_interval: format_duration(r.fill_interval),
                }),
            };
            doc(
                TIDEMESH_API,
                "DestinationPolicy",
                &p.id.name,
                Some(&p.id.namespace),
                spec,
            )
        }
    }
}

fn service_entry(e: &ServiceEntry) -> Json {
    let spec = ServiceEntrySpec {
        hosts: e.hosts.clone(),
        ports: list(&e.ports).map(|ps| {
            ps.iter()
                .map(|p| PortIn {
                    number: int(p.number),
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                    target_port: p.target_port.map(int),
                })
                .collect()
        }),
        location: Some(
            match e.location {
                MeshLocation::MeshInternal => "MESH_INTERNAL",
                MeshLocation::MeshExternal => "MESH_EXTERNAL",
            }
            .to_string(),
        ),
        resolution: Some(
            match e.resolution {
                Resolution::None => "NONE",
                Resolution::Static => "STATIC",
                Resolution::Dns => "DNS",
                Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
            }
            .to_string(),
        ),
        endpoints: list(&e.endpoints).map(|eps| {
            eps.iter()
                .map(|ep| WorkloadEntryIn {
                    address: ep.address.clone(),
                    ports: (!ep.ports.is_empty())
                        .then(|| ep.ports.iter().map(|(k, v)| (k.clone(), int(*v))).collect()),
                    labels: labels(&ep.labels),
                    locality: ep.locality.as_ref().map(Locality::to_istio),
                    weight: ep.weight.map(int),
                })
                .collect()
        }),
    };
    doc(
        "networking.istio.io/v1",
        "ServiceEntry",
        &e.id.name,
        Some(&e.id.namespace),
        spec,
    )
}

fn mode_profile(p: &ModeProfile) -> ModeProfileIn {
    ModeProfileIn {
        routing: Some(
            match p.routing {
                RoutingMode::Dynamic => "DYNAMIC",
                RoutingMode::HealthyOnly => "HEALTHY_ONLY",
                RoutingMode::LocalOnly => "LOCAL_ONLY",
                RoutingMode::Ramp => "RAMP",
            }
            .to_string(),
        ),
        retries: Some(ModeRetriesIn {
            attempts: int(p.retries.attempts),
            backoff: Some(backoff(&p.retries.backoff)),
        }),
        circuit_breaker: Some(match p.breaker {
            BreakerMode::ErrorRate(r) => ModeBreakerIn {
                error_rate_threshold: Some(r.as_f64()),
                fail_fast: None,
            },
            BreakerMode::FailFast => ModeBreakerIn {
                error_rate_threshold: None,
                fail_fast: Some(true),
            },
        }),
        observability: Some(match p.observability {
            Observability::Tracing { sampling } => ObservabilityIn {
                mode: "TRACING".into(),
                sampling: Some(sampling.as_f64()),
                buffered: None,
            },
            Observability::MetricsOnly { buffered } => ObservabilityIn {
                mode: "METRICS_ONLY".into(),
                sampling: None,
                buffered: Some(buffered),
            },
        }),
        ramp: p.ramp.map(|r| RampIn {
            start_percent: int(r.start_percent),
            factor: int(r.factor),
            step: format_duration(r.step),
            tolerated_failures: Some(int(r.tolerated_failures)),
        }),
    }
}

/// The config as documents (JSON values), in canonical order.
pub fn to_documents(config: &MeshConfig) -> Vec<Json> {
    let mut docs = Vec::new();
    docs.push(doc(
        TIDEMESH_API,
        "MeshSettings",
        SINGLETON_NAME,
        None,
        MeshSettingsSpec {
            default_action: Some(config.settings.default_action.as_str().to_string()),
            root_namespace: Some(config.settings.root_namespace.clone()),
        },
    ));
    let m = &config.mode_matrix;
    docs.push(doc(
        TIDEMESH_API,
        "ModeMatrix",
        SINGLETON_NAME,
        None,
        ModeMatrixSpec {
            target: Some(mode_profile(&m.target)),
            degraded: Some(mode_profile(&m.degraded)),
            survival: Some(mode_profile(&m.survival)),
            recovery: Some(mode_profile(&m.recovery)),
            degradation: Some(DegradationIn {
                enter_error_rate: Some(m.degradation.enter_error_rate.as_f64()),
                exit_error_rate: Some(m.degradation.exit_error_rate.as_f64()),
                window: Some(format_duration(m.degradation.window)),
                min_requests: Some(int(m.degradation.min_requests)),
            }),
            reconnection: Some(ReconnectionIn {
                health_checks: Some(int(m.reconnection.health_checks)),
                window: Some(format_duration(m.reconnection.window)),
            }),
        },
    ));
    for s in &config.stores {
        docs.push(doc(
            TIDEMESH_API,
            "Store",
            &s.name,
            None,
            StoreSpec {
                region: s.region.clone(),
                zone: s.zone.clone(),
            },
        ));
    }
    for w in &config.workloads {
        docs.push(doc(
            TIDEMESH_API,
            "Workload",
            &w.id.name,
            Some(&w.id.namespace),
            WorkloadSpec {
                service: w.service.clone(),
                store: w.store.clone(),
                service_account: w.service_account.clone(),
                address: w.address.clone(),
                labels: labels(&w.labels),
                weight: Some(int(w.weight)),
            },
        ));
    }
    docs.extend(config.service_entries.iter().map(service_entry));
    docs.extend(config.destination_policies.iter().map(destination_policy));
    docs.extend(config.route_rules.iter().map(route_rule));
    docs.extend(config.authz_policies.iter().map(authz));
    docs.extend(config.peer_authentications.iter().map(peer_authn));
    docs.extend(config.request_authns.iter().map(|r| {
        doc(
            "security.istio.io/v1",
            "RequestAuthentication",
            &r.id.name,
            Some(&r.id.namespace),
            super::reqauthn::print(r),
        )
    }));
    docs
}

/// The config as multi-document YAML (`config get -o yaml`).
pub fn to_yaml(config: &MeshConfig) -> String {
    let mut out = String::new();
    for (i, d) in to_documents(config).iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        // A JSON value of strings, numbers, bools, lists and maps always
        // serializes to YAML.
        out.push_str(&serde_yaml_ng::to_string(d).unwrap_or_default());
    }
    out
}

/// The config as a pretty JSON array of documents (`config get -o json`);
/// [`super::parse_documents`] reads it back.
pub fn to_json(config: &MeshConfig) -> String {
    // Serializing a Vec of JSON values cannot fail.
    serde_json::to_string_pretty(&to_documents(config)).unwrap_or_default()
}
