//! The data plane end to end, with the real binaries and real HTTP servers
//! on loopback: a hub and two spokes at store sf01; apps call their spoke's
//! outbound listener with plain HTTP/1.1; the spokes route local first and
//! cross over the QUIC mTLS tunnel, authorize per the seed's
//! AuthorizationPolicy, rate-limit, propagate trace context and write one
//! evidence record per request.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use tidemesh_tests::{
    bin, free_tcp, free_udp,
    http::{call, echo_server, read_message, Reply},
    mesh::{cloud_entry, frontend_only, service_entry},
    run, text, wait_for, write_config, HubProc, OtlpReceiver, RelayProc, SpokeProc, STORE_SF01, TD,
};

/// The seed's AuthorizationPolicy with the principals spelled in tidemesh's
/// SPIFFE scheme (the seed's `cluster.local/ns/…` IDs are Kubernetes ones),
/// plus one letting `frontend` GET the store's inventory.
fn mesh_yaml() -> String {
    format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: payment-service-authz
  namespace: payments
spec:
  selector:
    matchLabels:
      app: payment-service
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - "{TD}/store/sf01/sa/frontend"
        - "{TD}/store/sf01/sa/checkout-service"
    to:
    - operation:
        methods: ["POST"]
        paths: ["/api/charge", "/api/refund"]
    when:
    - key: request.headers[x-api-version]
      values: ["v1", "v2"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: inventory-readers
  namespace: store
spec:
  selector:
    matchLabels:
      app: inventory
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
    to:
    - operation:
        methods: ["GET"]
"#
    )
}

/// A spoke's request records: those it still holds (`evidence tail
/// --json`) and those it already synced to the hub and pruned (`evidence
/// query` at the hub), once each by sequence number.
fn request_records(hub: &HubProc, s: &SpokeProc) -> Vec<Value> {
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    let o = run(std::process::Command::new(bin("tidemesh-spoke"))
        .args(["evidence", "tail", "--json", "-n", "10000", "--data-dir"])
        .arg(&s.dir));
    assert!(o.status.success(), "evidence tail: {}", text(&o));
    let q = hub.cli(&[
        "evidence", "query", "--spoke", &s.id, "--kind", "request", "--limit", "5000", "--json",
    ]);
    assert!(q.status.success(), "evidence query: {}", text(&q));
    // The spoke first: a record it held then is at the hub by the query if
    // it was pruned in between (the hub stores before it acks).
    for line in String::from_utf8_lossy(&o.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&q.stdout).lines())
    {
        if let Ok(r) = serde_json::from_str::<Value>(line) {
            if let (Some(seq), Some(req)) = (r["seq"].as_u64(), r["body"].get("request")) {
                by_seq.insert(seq, req.clone());
            }
        }
    }
    by_seq.into_values().collect()
}

/// Waits for a request record matching `f` on spoke `s`.
fn find_record(hub: &HubProc, s: &SpokeProc, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(Duration::from_secs(10), || {
        request_records(hub, s).into_iter().find(|r| f(r))
    })
    .unwrap_or_else(|| {
        panic!(
            "no record of {what} on {}: {:#?}",
            s.id,
            request_records(hub, s)
        )
    })
}

/// Waits for the request record with this operation name, and checks that
/// it is the only one.
fn one_record(hub: &HubProc, s: &SpokeProc, operation: &str) -> Value {
    let rec = find_record(hub, s, operation, |r| {
        r["telemetry"]["operation_name"] == operation
    });
    // Appends are group-committed: give a second record the chance to appear.
    std::thread::sleep(Duration::from_millis(500));
    let n = request_records(hub, s)
        .iter()
        .filter(|r| r["telemetry"]["operation_name"] == operation)
        .count();
    assert_eq!(n, 1, "one record per request per spoke for {operation}");
    rec
}

fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or("")
}

fn span_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(2).unwrap_or("")
}

/// Enrolls spoke `name` as node `n{i}` of store sf01 through `via` (the
/// hub or a relay to it), starts it with `cfg` and waits until it is
/// connected, has a config and holds every workload's SVID.
fn start_spoke(
    tmp: &Path,
    hub: &HubProc,
    name: &str,
    i: usize,
    cfg: &str,
    via: SocketAddr,
) -> SpokeProc {
    let id = format!("spiffe://{TD}/store/sf01/node/n{i}");
    let mut s = SpokeProc::new(tmp, name, &id).with_args(&["--config", cfg]);
    let o = s.enroll(via, &hub.token(&id, "10m"));
    assert!(o.status.success(), "enroll: {}", text(&o));
    s.start();
    s.wait_state("connected", Duration::from_secs(10));
    s.wait_configured(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("config or SVIDs missing on {}: {:?}", s.id, s.try_status()));
    s
}

/// Waits until spoke `s` sees `service` registered by a peer of its site.
fn wait_site_service(s: &SpokeProc, service: &str) {
    s.wait_site_service(service, Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "{} never saw {service} at the site: {:?}",
                s.id,
                s.try_status()
            )
        });
}

#[test]
fn local_and_cross_spoke_calls_with_authorization_rate_limit_trace_and_evidence() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, mesh_yaml()).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    // spoke A (n0): the callers frontend and kiosk, and inventory (rate limited)
    let inventory = echo_server("inventory");
    let payments = echo_server("payment-service");
    let (o_front, o_kiosk) = (free_tcp(), free_tcp());
    let (data_a, data_b) = (free_udp(), free_udp());
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "frontend"
service = "frontend"
labels = {{ app = "frontend" }}
outbound = "{o_front}"

[[workload]]
service_account = "kiosk"
outbound = "{o_kiosk}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory", version = "v1" }}
inbound = "{inventory}"
health = "/healthz"
rate_limit = {{ requests_per_second = 1, burst = 4 }}
"#
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "payments"
service = "payment-service"
namespace = "payments"
labels = {{ app = "payment-service", version = "v1" }}
inbound = "{payments}"
health = "/healthz"
"#
        ),
    );
    let mut spokes = Vec::new();
    // each spoke reaches the hub through its own relay, for the blackout
    let mut relays = Vec::new();
    for (i, cfg) in [cfg_a, cfg_b].iter().enumerate() {
        let relay = RelayProc::start(
            &tmp.path().join("relays"),
            &format!("r{i}"),
            hub_addr,
            51 + i as u64,
        );
        let name = format!("spoke{i}");
        spokes.push(start_spoke(tmp.path(), &hub, &name, i, cfg, relay.addr));
        relays.push(relay);
    }
    let (a, b) = (&spokes[0], &spokes[1]);
    // A sees B's payment-service at the site
    wait_site_service(a, "payment-service");

    let frontend_id = format!("spiffe://{TD}/store/sf01/sa/frontend");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    // 2. cross-spoke over QUIC mTLS, allowed by the seed's policy (B may
    // take a moment to receive the policy with its slice)
    let charge = |outbound, path: &str, extra: &[(&str, &str)]| {
        call(outbound, "POST", "payment-service.payments", path, extra)
    };
    let r = wait_for(Duration::from_secs(10), || {
        let r = charge(
            o_front,
            "/api/charge",
            &[("x-api-version", "v1"), ("traceparent", tp)],
        );
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "cross-spoke call never allowed: {:?}",
            charge(o_front, "/api/charge", &[("x-api-version", "v1")])
        )
    });
    assert_eq!(r.echo()["server"], "payment-service");
    assert_eq!(
        r.upstream_header("x-forwarded-client-cert").as_deref(),
        Some(format!("By=spiffe://{TD}/store/sf01/sa/payments;URI={frontend_id}").as_str()),
        "{r:?}"
    );
    // 9. trace context arrives: the app's trace, a new span; a request id
    let up = r
        .upstream_header("traceparent")
        .expect("traceparent upstream");
    assert_eq!(trace_id(&up), trace_id(tp), "{up}");
    assert_ne!(span_id(&up), span_id(tp), "{up}");
    assert_eq!(
        r.upstream_header("x-b3-traceid").as_deref(),
        Some(trace_id(tp))
    );
    let rid = r
        .upstream_header("x-request-id")
        .expect("x-request-id created");
    assert_eq!(rid.len(), 36, "{rid}");

    // the serving spoke's record: the caller's workload ID from mTLS, the decision
    let op = "POST /api/charge";
    let rec = find_record(&hub, b, "the allowed charge", |r| {
        r["telemetry"]["operation_name"] == op && r["telemetry"]["status_code"] == 200
    });
    assert_eq!(rec["service_name"], "payment-service.payments");
    assert_eq!(rec["enforcement_point"], "sidecar_inbound");
    let id = &rec["identity"];
    assert_eq!(id["client_identity"], frontend_id.as_str());
    assert_eq!(id["server_identity"], b.id.as_str());
    assert_eq!(id["tls_version"], "1.3");
    assert!(
        id["cipher_suite"]
            .as_str()
            .unwrap_or("")
            .starts_with("TLS_"),
        "{id}"
    );
    assert!(id["certificate_fingerprint"]
        .as_str()
        .unwrap_or("")
        .starts_with("sha256:"));
    let pol = &rec["policy_evaluation"];
    assert_eq!(pol["final_decision"], "ALLOW", "{pol}");
    assert_eq!(pol["policy_name"], "payments/payment-service-authz");
    assert_eq!(pol["matched_rule"], "0");
    assert_eq!(rec["telemetry"]["trace_id"], trace_id(tp));
    assert_eq!(rec["telemetry"]["span_id"], span_id(&up));
    // and the calling spoke's: routed to the site peer over the tunnel
    let rec = find_record(&hub, a, "the allowed charge", |r| {
        r["telemetry"]["operation_name"] == op && r["telemetry"]["status_code"] == 200
    });
    assert_eq!(rec["enforcement_point"], "sidecar_outbound");
    let route = &rec["routing_decision"];
    assert_eq!(
        route["selected_endpoint"],
        data_b.to_string().as_str(),
        "{route}"
    );
    assert_eq!(route["locality"], "same_zone");
    assert_eq!(route["load_balancing_algorithm"], "round_robin");
    assert_eq!(rec["identity"]["client_identity"], frontend_id.as_str());
    assert_eq!(rec["identity"]["server_identity"], b.id.as_str());
    assert_eq!(rec["telemetry"]["parent_span_id"], span_id(tp));

    // 2. denied per the policy: another workload, or another path -> 403 with a reason
    let r = charge(o_kiosk, "/api/charge", &[("x-api-version", "v1")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("RBAC: access denied"), "{r:?}");
    assert!(r.body.contains("sa/kiosk"), "{r:?}");
    let r = charge(o_front, "/api/admin", &[("x-api-version", "v1")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("no_allow_policy_matched"), "{r:?}");
    let rec = one_record(&hub, b, "POST /api/admin");
    assert_eq!(rec["policy_evaluation"]["final_decision"], "DENY");
    assert_eq!(rec["telemetry"]["status_code"], 403);

    // 1. a local call: frontend -> inventory, both on A; one record
    let r = call(o_front, "GET", "inventory.store", "/local-once", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echo()["server"], "inventory");
    assert_eq!(
        r.upstream_header("x-forwarded-client-cert").as_deref(),
        Some(format!("By=spiffe://{TD}/store/sf01/sa/inventory;URI={frontend_id}").as_str())
    );
    // 9. no context from the app: a new trace, a new request id
    let up = r
        .upstream_header("traceparent")
        .expect("traceparent created");
    assert_eq!(up.len(), 55, "{up}");
    assert!(r.upstream_header("x-request-id").is_some());
    let rec = one_record(&hub, a, "GET /local-once");
    assert_eq!(rec["service_name"], "inventory.store");
    assert_eq!(rec["routing_decision"]["locality"], "local");
    assert_eq!(
        rec["routing_decision"]["selected_endpoint"],
        inventory.to_string().as_str()
    );
    assert_eq!(rec["policy_evaluation"]["final_decision"], "ALLOW");
    assert_eq!(
        rec["policy_evaluation"]["policy_name"],
        "store/inventory-readers"
    );
    assert_eq!(rec["rate_limit_check"]["decision"], "allowed");
    assert_eq!(rec["telemetry"]["trace_id"], trace_id(&up));
    assert_eq!(rec["telemetry"]["status_code"], 200);
    assert!(r.upstream_header("x-b3-spanid").is_some());
    // a short name resolves to the one service of that name
    assert_eq!(call(o_front, "GET", "inventory", "/short", &[]).status, 200);

    // 7. the rate limit answers 429 with retry-after (burst 4, 1 per second)
    let replies: Vec<Reply> = (0..8)
        .map(|i| {
            call(
                o_front,
                "GET",
                "inventory.store",
                &format!("/burst/{i}"),
                &[],
            )
        })
        .collect();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(!limited.is_empty(), "{replies:?}");
    assert!(
        replies.iter().all(|r| r.status == 200 || r.status == 429),
        "{replies:?}"
    );
    let after: u64 = limited[0].headers["retry-after"]
        .parse()
        .expect("retry-after seconds");
    assert!((1..=2).contains(&after), "{after}");
    assert!(limited[0].body.contains("rate limit"), "{:?}", limited[0]);
    let rec = find_record(&hub, a, "a limited request", |r| {
        r["telemetry"]["status_code"] == 429
    });
    assert_eq!(rec["rate_limit_check"]["decision"], "limited");
    assert_eq!(rec["rate_limit_check"]["limit"], 1);

    // an unknown service: 503 naming it, and a record
    let r = call(o_front, "GET", "nowhere.store", "/", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("nowhere.store"), "{r:?}");

    // indicative latency on loopback (debug build, a new app connection per
    // call): straight to the workload, and through both spokes and the tunnel
    let median = |f: &dyn Fn() -> u16| {
        let mut v: Vec<Duration> = (0..30)
            .map(|_| {
                let t = std::time::Instant::now();
                assert_eq!(f(), 200);
                t.elapsed()
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    let direct = median(&|| {
        call(
            payments,
            "POST",
            "payment-service.payments",
            "/api/charge",
            &[],
        )
        .status
    });
    let tunnel = median(&|| charge(o_front, "/api/charge", &[("x-api-version", "v1")]).status);
    eprintln!("median latency: direct {direct:?}, app -> spoke A -> QUIC -> spoke B -> workload {tunnel:?}");

    // one QUIC connection per (calling workload, peer spoke), reused: of
    // frontend's many calls to B, exactly one paid for a handshake
    // (the last calls' records are committed within the group-commit
    // interval: wait for them)
    let calls_to_b = || -> Vec<Value> {
        request_records(&hub, a)
            .into_iter()
            .filter(|r| {
                r["identity"]["client_identity"] == frontend_id.as_str()
                    && r["identity"]["server_identity"] == b.id.as_str()
            })
            .collect()
    };
    let to_b = wait_for(Duration::from_secs(10), || {
        let v = calls_to_b();
        (v.len() > 30).then_some(v)
    })
    .unwrap_or_else(calls_to_b);
    let paid: Vec<&Value> = to_b
        .iter()
        .filter(|r| r["identity"]["handshake_duration_us"].is_u64())
        .collect();
    let handshakes = (paid.len(), to_b.len());
    assert_eq!(
        handshakes.0,
        1,
        "(new connections, calls) = {handshakes:?}; the calls that connected: {:#?}",
        paid.iter()
            .map(|r| (&r["telemetry"], &r["reliability"]))
            .collect::<Vec<_>>()
    );
    assert!(handshakes.1 > 30, "{handshakes:?}");

    // a hub blackout through the relays: local and same-site calls keep
    // flowing, with zero errors, while the spokes notice the loss and after
    for r in &relays {
        r.blackout(None);
    }
    let cut = Instant::now();
    let (mut calls, mut errors) = (0u32, Vec::new());
    let mut both_disconnected = None;
    // inventory is rate limited to 1 request/s (and the rate-limit check
    // above emptied its bucket): call it every 1.1 s after a refill, the
    // same-site service every 100 ms
    let mut next_local = Instant::now() + Duration::from_millis(1_500);
    while cut.elapsed() < Duration::from_secs(12) {
        let mut replies = vec![charge(o_front, "/api/refund", &[("x-api-version", "v2")])];
        if Instant::now() >= next_local {
            replies.push(call(o_front, "GET", "inventory.store", "/offline", &[]));
            next_local += Duration::from_millis(1_100);
        }
        for r in replies {
            calls += 1;
            if r.status != 200 {
                errors.push(r);
            }
        }
        if both_disconnected.is_none()
            && [a, b].iter().all(|s| {
                s.try_status()
                    .is_some_and(|st| st["state"] == "disconnected")
            })
        {
            both_disconnected = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let disconnected = both_disconnected.expect("both spokes notice the hub blackout");
    assert!(
        errors.is_empty(),
        "{} of {calls} calls failed during the hub blackout: {errors:?}",
        errors.len()
    );
    eprintln!(
        "hub blackout: {calls} local and same-site calls over 12 s, 0 errors; both spokes disconnected {disconnected:?} after the cut"
    );
    // and the hub gone altogether
    hub.kill();
    let r = call(o_front, "GET", "inventory.store", "/offline", &[]);
    assert_eq!(r.status, 200, "local without the hub: {r:?}");
    let r = charge(o_front, "/api/refund", &[("x-api-version", "v2")]);
    assert_eq!(r.status, 200, "cross-spoke without the hub: {r:?}");
}

#[test]
fn a_taken_outbound_port_stops_the_spoke_before_it_serves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let cfg = write_config(
        tmp.path(),
        "taken",
        &format!("[[workload]]\nservice_account = \"pos\"\noutbound = \"{addr}\"\n"),
    );
    let id = format!("spiffe://{TD}/store/sf01/node/n9");
    let s = SpokeProc::new(tmp.path(), "spoke9", &id);
    assert!(s.enroll(hub_addr, &hub.token(&id, "10m")).status.success());
    let o = run(std::process::Command::new(bin("tidemesh-spoke"))
        .args(["run", "--config", &cfg, "--data-dir"])
        .arg(&s.dir));
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("workload[0].outbound") && msg.contains(&addr.to_string()),
        "{msg}"
    );
    hub.stop();
}

/// The seed's canary VirtualService and DestinationRule
/// (canary_virtualservice_destinationrule.yaml) with `payment-service` in
/// `payments` renamed to `reviews` in `bookinfo`, and a policy letting
/// `productpage` GET reviews (the mesh denies by default).
fn canary_yaml() -> String {
    let seed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/policy/testdata/seed/canary_virtualservice_destinationrule.yaml"),
    )
    .expect("the seed's canary yaml");
    assert!(
        seed.contains("x-canary") && seed.contains("weight: 90"),
        "{seed}"
    );
    format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: reviews-readers, namespace: bookinfo}}
spec:
  selector:
    matchLabels: {{app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/productpage"]
    to:
    - operation:
        methods: ["GET"]
---
{}"#,
        seed.replace("payment-service", "reviews")
            .replace("namespace: payments", "namespace: bookinfo")
    )
}

/// An app's HTTP/1.1 connection to its outbound listener, kept alive
/// across requests (reconnecting if the spoke closes it).
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    connects: usize,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            addr,
            conn: None,
            connects: 0,
        }
    }

    /// GET `path` of `host`; the status and the body.
    fn get(&mut self, host: &str, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Content-Length: 0\r\n\r\n");
        for _ in 0..2 {
            if self.conn.is_none() {
                let c = TcpStream::connect(self.addr).expect("connect to the outbound listener");
                c.set_read_timeout(Some(Duration::from_secs(15)))
                    .expect("timeout");
                let _ = c.set_nodelay(true);
                self.conn = Some(c);
                self.connects += 1;
            }
            let c = self.conn.as_mut().expect("connected");
            if c.write_all(req.as_bytes()).is_err() {
                self.conn = None;
                continue;
            }
            let Some((head, body)) = read_message(c) else {
                self.conn = None;
                continue;
            };
            let head = head.to_ascii_lowercase();
            assert!(
                head.contains("content-length:"),
                "a keep-alive answer needs a length: {head}"
            );
            if head.contains("connection: close") {
                self.conn = None;
            }
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return (status, String::from_utf8_lossy(&body).to_string());
        }
        panic!("the outbound listener closed the connection twice in a row");
    }
}

/// Must-show 4: the seed's canary (90/10 by weight; `x-canary: true` all to
/// v2) over `reviews` v1 and v2, both workloads of one spoke, called by
/// `productpage` on the same spoke through its outbound listener.
#[test]
fn canary_splits_90_10_and_x_canary_sends_all_to_v2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let f = tmp.path().join("canary.yaml");
    std::fs::write(&f, canary_yaml()).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    let (v1, v2) = (echo_server("reviews-v1"), echo_server("reviews-v2"));
    let outbound = free_tcp();
    let data = free_udp();
    let cfg = write_config(
        tmp.path(),
        "canary",
        &format!(
            r#"data_listen = "{data}"
data_advertise = "{data}"

[[workload]]
service_account = "productpage"
namespace = "bookinfo"
outbound = "{outbound}"

[[workload]]
service_account = "reviews-v1"
service = "reviews"
namespace = "bookinfo"
labels = {{ app = "reviews", version = "v1" }}
inbound = "{v1}"

[[workload]]
service_account = "reviews-v2"
service = "reviews"
namespace = "bookinfo"
labels = {{ app = "reviews", version = "v2" }}
inbound = "{v2}"
"#
        ),
    );
    // the route rules have arrived with the config, and every SVID is there
    let mut s = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg, hub_addr);

    let server = |body: &str| -> String {
        serde_json::from_str::<Value>(body).unwrap_or(Value::Null)["server"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let mut app = KeepAlive::new(outbound);
    let started = std::time::Instant::now();
    let n = 2000;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        let (status, body) = app.get("reviews", &format!("/reviews/{i}"), &[]);
        assert_eq!(status, 200, "request {i}: {body}");
        *counts.entry(server(&body)).or_default() += 1;
    }
    let split_took = started.elapsed();
    let to_v2 = counts.get("reviews-v2").copied().unwrap_or(0);
    let to_v1 = counts.get("reviews-v1").copied().unwrap_or(0);
    eprintln!(
        "canary: {to_v2}/{n} to v2, {to_v1}/{n} to v1 in {split_took:?} over {} app connection(s)",
        app.connects
    );
    assert_eq!(to_v1 + to_v2, n, "{counts:?}");
    // Binomial(2000, 0.1): sigma = sqrt(2000 * 0.1 * 0.9) = 13.4 requests,
    // so 10% +- 2.5 points (+- 50 requests) is more than 3.7 sigma even for
    // a random split; the smooth weighted rotation gives exactly 200.
    assert!(
        (150..=250).contains(&to_v2),
        "v2 share {to_v2}/{n} outside 10% +- 2.5 points: {counts:?}"
    );
    assert!(
        app.connects <= 2,
        "the outbound listener kept the connection alive ({} connects)",
        app.connects
    );

    // x-canary: true -> all to v2 (the seed's header match, route 0)
    for i in 0..200 {
        let (status, body) = app.get(
            "reviews.bookinfo",
            &format!("/canary/{i}"),
            &[("x-canary", "true")],
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(server(&body), "reviews-v2", "x-canary request {i}: {body}");
    }
    // any other value is not the match: the split again
    let (status, _) = app.get("reviews", "/canary/false", &[("x-canary", "false")]);
    assert_eq!(status, 200);

    // the evidence: the split and the header match, with the version
    let recs = wait_for(Duration::from_secs(20), || {
        let recs = request_records(&hub, &s);
        let count = |prefix: &str| {
            recs.iter()
                .filter(|r| {
                    r["telemetry"]["operation_name"]
                        .as_str()
                        .is_some_and(|o| o.starts_with(prefix))
                })
                .count()
        };
        (count("GET /reviews/") >= n && count("GET /canary/") >= 201).then_some(recs)
    })
    .unwrap_or_else(|| panic!("not every request has a record"));
    eprintln!("canary: every record in after {:?}", started.elapsed());
    let of = |prefix: &str| -> Vec<&Value> {
        recs.iter()
            .filter(|r| {
                r["telemetry"]["operation_name"]
                    .as_str()
                    .is_some_and(|o| o.starts_with(prefix))
            })
            .collect()
    };
    let split = of("GET /reviews/");
    assert_eq!(split.len(), n, "one record per request");
    let v2_records = split
        .iter()
        .filter(|r| r["routing_decision"]["version"] == "v2")
        .count();
    assert_eq!(v2_records, to_v2, "records agree with the upstreams");
    for r in &split {
        let route = &r["routing_decision"];
        assert_eq!(
            route["load_balancing_algorithm"], "weighted_round_robin",
            "{route}"
        );
        let reason = route["selection_reason"].as_str().unwrap_or("");
        let want = if route["version"] == "v2" {
            ("route_1_canary_weighted_round_robin_10_percent", v2)
        } else {
            ("route_1_canary_weighted_round_robin_90_percent", v1)
        };
        assert!(reason.starts_with(want.0), "{route}");
        assert_eq!(
            route["selected_endpoint"],
            want.1.to_string().as_str(),
            "{route}"
        );
        assert_eq!(route["locality"], "local", "{route}");
        assert_eq!(r["service_name"], "reviews.bookinfo");
        assert_eq!(r["telemetry"]["status_code"], 200);
    }
    let canary = of("GET /canary/");
    assert_eq!(canary.len(), 201, "one record per request");
    for r in canary
        .iter()
        .filter(|r| r["telemetry"]["operation_name"] != "GET /canary/false")
    {
        let route = &r["routing_decision"];
        assert_eq!(route["version"], "v2", "{route}");
        assert_eq!(
            route["selected_endpoint"],
            v2.to_string().as_str(),
            "{route}"
        );
        assert!(
            route["selection_reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("route_0_matched;"),
            "{route}"
        );
        assert_eq!(route["load_balancing_algorithm"], "round_robin", "{route}");
    }
    eprintln!("canary test took {:?}", started.elapsed());
    s.kill();
    hub.stop();
}

/// One HTTP/2 request with prior knowledge (h2c) to an outbound listener:
/// the response head and the whole body (with its trailers).
fn h2_call(
    outbound: SocketAddr,
    req: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> (
    hyper::http::response::Parts,
    http_body_util::Collected<hyper::body::Bytes>,
) {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(outbound)
            .await
            .expect("connect");
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let resp = send.send_request(req).await.expect("h2 response");
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let (head, body) = resp.into_parts();
        (head, body.collect().await.expect("body"))
    })
}

/// An HTTP/2 GET (h2c) to an outbound listener: the status and the body.
fn h2_get(outbound: SocketAddr, authority: &str, path: &str) -> (u16, String) {
    let req = hyper::Request::get(format!("http://{authority}{path}"))
        .body(http_body_util::Full::default())
        .expect("request");
    let (head, body) = h2_call(outbound, req);
    let body = body.to_bytes();
    (
        head.status.as_u16(),
        String::from_utf8_lossy(&body).to_string(),
    )
}

/// A gRPC message frame: uncompressed, length-prefixed.
fn grpc_frame(msg: &[u8]) -> hyper::body::Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.into()
}

/// A response body of fixed frames (data, then trailers), as a gRPC
/// server's.
struct GrpcBody(std::collections::VecDeque<hyper::body::Frame<hyper::body::Bytes>>);

impl hyper::body::Body for GrpcBody {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// `grpc-status` and `grpc-message`, as a gRPC server ends a call with.
fn grpc_status(code: &'static str, message: &'static str) -> hyper::HeaderMap {
    let mut h = hyper::HeaderMap::new();
    h.insert("grpc-status", hyper::header::HeaderValue::from_static(code));
    h.insert(
        "grpc-message",
        hyper::header::HeaderValue::from_static(message),
    );
    h
}

/// What a unary gRPC call through the mesh returned.
#[derive(Debug)]
struct GrpcReply {
    status: u16,
    /// The status came in the headers, with no body and no trailers (a
    /// gRPC "trailers-only" answer, as errors are sent).
    trailers_only: bool,
    /// The `grpc-status` trailer, or header in a trailers-only answer
    /// (`None`: neither arrived).
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    /// The reply message (the frame's payload).
    message: String,
}

/// One unary gRPC call (HTTP/2 with prior knowledge, `te: trailers`,
/// `application/grpc`) to an outbound listener.
fn grpc_call(outbound: SocketAddr, authority: &str, path: &str) -> GrpcReply {
    let req = hyper::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(grpc_frame(b"{}")))
        .expect("request");
    let (head, got) = h2_call(outbound, req);
    let trailer = |n: &str| {
        got.trailers()
            .and_then(|t| t.get(n))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let header = |n: &str| {
        head.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (grpc_status, grpc_message) = (trailer("grpc-status"), trailer("grpc-message"));
    let trailers_only = grpc_status.is_none() && header("grpc-status").is_some();
    let bytes = got.to_bytes();
    GrpcReply {
        status: head.status.as_u16(),
        trailers_only,
        grpc_status: grpc_status.or_else(|| header("grpc-status")),
        grpc_message: grpc_message.or_else(|| header("grpc-message")),
        message: String::from_utf8_lossy(bytes.get(5..).unwrap_or_default()).to_string(),
    }
}

/// An HTTP/2-only (prior knowledge) workload, as a gRPC server is: answers
/// every request with 200 and a JSON body naming the protocol version, the
/// path and the identity header it got.
fn h2_server(name: &'static str) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| async move {
                            use http_body_util::BodyExt;
                            let out = serde_json::json!({
                                "server": name,
                                "version": format!("{:?}", req.version()),
                                "path": req.uri().path(),
                                "xfcc": req.headers().get("x-forwarded-client-cert")
                                    .and_then(|v| v.to_str().ok()).unwrap_or(""),
                            })
                            .to_string();
                            let grpc = req
                                .headers()
                                .get("content-type")
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            if !grpc {
                                return Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(hyper::body::Bytes::from(out))
                                        .boxed(),
                                ));
                            }
                            // as gRPC servers do: `te: trailers` or no call
                            if req.headers().get("te").map(|v| v.as_bytes()) != Some(b"trailers") {
                                let mut r = hyper::Response::new(
                                    http_body_util::Full::new(hyper::body::Bytes::from(
                                        "te: trailers required",
                                    ))
                                    .boxed(),
                                );
                                *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                                return Ok(r);
                            }
                            if req.uri().path().ends_with("/Missing") {
                                // an error as gRPC servers send one: trailers
                                // only (status in the headers, no body)
                                let mut r =
                                    hyper::Response::new(http_body_util::Empty::new().boxed());
                                let h = r.headers_mut();
                                h.insert(
                                    "content-type",
                                    hyper::header::HeaderValue::from_static("application/grpc"),
                                );
                                h.extend(grpc_status("5", name));
                                return Ok(r);
                            }
                            let trailers = grpc_status("0", name);
                            let body = GrpcBody(
                                [
                                    hyper::body::Frame::data(grpc_frame(out.as_bytes())),
                                    hyper::body::Frame::trailers(trailers),
                                ]
                                .into(),
                            );
                            let mut r = hyper::Response::new(body.boxed());
                            r.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/grpc"),
                            );
                            Ok(r)
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
    });
    addr
}

/// What a [`Workload`] answers (health checks on `/healthz` always pass
/// while it listens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    /// 500 to everything but `/healthz`.
    Fail,
    /// 503 to every fourth request (by arrival), 200 otherwise: 25 %
    /// errors, under the mode matrix's thresholds (a service at 30 % goes
    /// Degraded, an endpoint at 50 % trips its breaker in Target).
    Quarter,
}

/// A workload that can be killed (its port closed: connections refused)
/// and started again on the same port, with a switchable failure mode and
/// a count of requests it answered (health checks aside).
struct Workload {
    name: &'static str,
    addr: SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<(Mode, u64)>>,
    stop: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Workload {
    fn start(name: &'static str) -> Workload {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let mut w = Workload {
            name,
            addr,
            state: std::sync::Arc::new(std::sync::Mutex::new((Mode::Ok, 0))),
            stop: None,
        };
        w.up();
        w
    }

    fn up(&mut self) {
        assert!(self.stop.is_none(), "{} is up already", self.name);
        // std sets SO_REUSEADDR: the port can be bound again at once
        let l = TcpListener::bind(self.addr).expect("rebind the workload's port");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (name, state, flag) = (self.name, self.state.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            for conn in l.incoming() {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let state = state.clone();
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let Some((head, _)) = read_message(&mut c) else {
                        return;
                    };
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let lower = head.to_ascii_lowercase();
                    let header = |n: &str| {
                        lower
                            .split("\r\n")
                            .find_map(|l| l.strip_prefix(&format!("{n}: ")))
                            .unwrap_or("")
                            .to_owned()
                    };
                    let status = if path == "/healthz" {
                        200
                    } else {
                        let mut st = state.lock().expect("state");
                        st.1 += 1;
                        match st.0 {
                            Mode::Ok => 200,
                            Mode::Fail => 500,
                            Mode::Quarter if st.1 % 4 == 1 => 503,
                            Mode::Quarter => 200,
                        }
                    };
                    let out = serde_json::json!({
                        "server": name,
                        "path": path,
                        "xfcc": header("x-forwarded-client-cert"),
                        "traceparent": header("traceparent"),
                    })
                    .to_string();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                        out.len()
                    );
                    let _ = c.write_all(resp.as_bytes());
                });
            }
        });
        self.stop = Some((stop, t));
    }

    /// Closes the port (in-flight answers finish).
    fn down(&mut self) {
        let (flag, t) = self.stop.take().expect("up");
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        t.join().expect("listener thread");
    }

    fn set(&self, mode: Mode) {
        self.state.lock().expect("state").0 = mode;
    }

    fn hits(&self) -> u64 {
        self.state.lock().expect("state").1
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.down();
        }
    }
}

/// The mesh for the gateway, failover and breaker test: `inventory.store`
/// has a workload on each spoke and a cloud twin declared by a
/// ServiceEntry; `catalog.cloud` exists only in the cloud; `flaky.store`
/// has a retry policy and a circuit breaker.
fn resilience_yaml(
    inventory_cloud: SocketAddr,
    catalog: SocketAddr,
    pricing: SocketAddr,
) -> String {
    format!(
        r#"{STORE_SF01}
---
apiVersion: tidemesh.io/v1alpha1
kind: ModeMatrix
metadata: {{name: default}}
spec:
  reconnection: {{healthChecks: 3, window: 6s}}
  recovery:
    ramp: {{startPercent: 25, factor: 2, step: 1s}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: inventory-cloud, namespace: store}}
spec:
  hosts: [inventory.store]
  location: MESH_INTERNAL
  ports:
  - {{number: {ip}, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    labels: {{app: inventory}}
    locality: us-west-2/us-west-2b
{catalog_entry}{pricing_entry}{pricing_callers}---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: inventory-readers, namespace: store}}
spec:
  selector:
    matchLabels: {{app: inventory}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
    to:
    - operation:
        methods: ["GET"]
{catalog_callers}{flaky_callers}{quotes_callers}{ledger_callers}---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: flaky, namespace: store}}
spec:
  host: flaky.store
  retries:
    attempts: 3
    retryOn: ["5xx"]
    backoff: {{kind: EXPONENTIAL, base: 10ms, max: 80ms}}
  circuitBreaker:
    consecutiveErrors: 3
    window: 10s
    openTime: 1s
    halfOpenProbes: 2
"#,
        ip = inventory_cloud.port(),
        catalog_entry = cloud_entry("catalog", catalog, "HTTP"),
        pricing_entry = cloud_entry("pricing", pricing, "GRPC"),
        pricing_callers = frontend_only("pricing-callers", "cloud", "pricing"),
        catalog_callers = frontend_only("catalog-readers", "cloud", "catalog"),
        flaky_callers = frontend_only("flaky-callers", "store", "flaky"),
        quotes_callers = frontend_only("quotes-callers", "store", "quotes"),
        ledger_callers = frontend_only("ledger-callers", "store", "ledger"),
    )
}

#[test]
fn cloud_gateway_failover_circuit_breaker_and_retries() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let inventory_cloud = Workload::start("inventory-cloud");
    let catalog = Workload::start("catalog");
    let f = tmp.path().join("mesh.yaml");
    let pricing = h2_server("pricing");
    std::fs::write(
        &f,
        resilience_yaml(inventory_cloud.addr, catalog.addr, pricing),
    )
    .expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    let mut inv_a = Workload::start("inventory-a");
    let mut inv_b = Workload::start("inventory-b");
    let flaky = Workload::start("flaky");
    let quotes = h2_server("quotes");
    let ledger = h2_server("ledger");
    let (o_front, o_kiosk) = (free_tcp(), free_tcp());
    let (data_a, data_b) = (free_udp(), free_udp());
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "frontend"
outbound = "{o_front}"

[[workload]]
service_account = "kiosk"
outbound = "{o_kiosk}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{}"
health = "/healthz"

[[workload]]
service_account = "flaky"
service = "flaky"
namespace = "store"
labels = {{ app = "flaky" }}
inbound = "{}"

[[workload]]
service_account = "ledger"
service = "ledger"
namespace = "store"
labels = {{ app = "ledger" }}
inbound = "{ledger}"
protocol = "http2"
health = "/healthz"
"#,
            inv_a.addr, flaky.addr
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{}"
health = "/healthz"

[[workload]]
service_account = "quotes"
service = "quotes"
namespace = "store"
labels = {{ app = "quotes" }}
inbound = "{quotes}"
protocol = "http2"
health = "/healthz"
"#,
            inv_b.addr
        ),
    );
    // A reaches the hub (control and gateway) through a relay, for the blackout
    let relay = RelayProc::start(&tmp.path().join("relays"), "ra", hub_addr, 77);
    let spokes = [
        start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg_a, relay.addr),
        start_spoke(tmp.path(), &hub, "spoke1", 1, &cfg_b, hub_addr),
    ];
    let a = &spokes[0];
    wait_site_service(a, "inventory");
    // B's HTTP/2 workload passed its (HTTP/2) health check and registered
    wait_site_service(a, "quotes");
    eprintln!("{:?}: hub and spokes up", started.elapsed());
    let frontend_id = format!("spiffe://{TD}/store/sf01/sa/frontend");
    let served_by = |r: &Reply| r.echo()["server"].as_str().unwrap_or("").to_owned();

    // 3. a cloud call through the hub gateway: the cloud service sees the
    // hub vouching for the calling workload
    let r = wait_for(Duration::from_secs(10), || {
        let r = call(o_front, "GET", "catalog.cloud", "/items", &[]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "cloud call: {:?}",
            call(o_front, "GET", "catalog.cloud", "/items", &[])
        )
    });
    eprintln!("{:?}: first cloud call answered", started.elapsed());
    assert_eq!(served_by(&r), "catalog");
    assert_eq!(
        r.echo()["xfcc"],
        format!("by=spiffe://{TD}/hub;uri={frontend_id}").as_str(),
        "{r:?}"
    );
    let rec = one_record(&hub, a, "GET /items");
    assert_eq!(rec["service_name"], "catalog.cloud");
    let route = &rec["routing_decision"];
    assert_eq!(
        route["selected_endpoint"],
        catalog.addr.to_string().as_str(),
        "{route}"
    );
    assert_eq!(route["locality"], "other_region", "{route}");
    assert!(
        route["selection_reason"]
            .as_str()
            .unwrap_or("")
            .contains("cloud_via_hub_gateway"),
        "{route}"
    );
    assert_eq!(
        rec["identity"]["server_identity"],
        format!("spiffe://{TD}/hub").as_str()
    );
    // the gateway authorizes too: kiosk may not read the catalog
    let r = call(o_kiosk, "GET", "catalog.cloud", "/items", &[]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("hub gateway"), "{r:?}");

    // 5. failover: local first; local killed -> the site; site killed too
    // -> the cloud; local healed -> local again. Retries move a request
    // that hit a dead endpoint on, so no call fails.
    // HTTP/2 from the app (h2c): to the cloud and to a local workload
    let (status, body) = h2_get(o_front, "catalog.cloud", "/h2");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"catalog\""), "{body}");
    let (status, body) = h2_get(o_front, "inventory.store", "/h2");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"inventory-a\""), "{body}");
    // an HTTP/2-only workload (as a gRPC server) on B, called with HTTP/1.1
    // and with HTTP/2 from the app: it gets HTTP/2 and the caller's identity
    for (status, body) in [
        {
            let r = call(o_front, "GET", "quotes.store", "/q1", &[]);
            (r.status, r.body)
        },
        h2_get(o_front, "quotes.store", "/q2"),
    ] {
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(v["version"], "HTTP/2.0", "{body}");
        assert_eq!(
            v["xfcc"],
            format!("By=spiffe://{TD}/store/sf01/sa/quotes;URI={frontend_id}").as_str()
        );
    }
    // gRPC: a unary call to a workload of A (HTTP/2 end to end), to one of
    // B (across the HTTP/1.1 tunnel hop, trailers carried in chunked
    // encoding) and to a cloud service whose ServiceEntry port is GRPC
    // (through the hub gateway, which speaks HTTP/2 to it): the server gets
    // `te: trailers` and the caller gets the grpc-status trailer
    for (host, server) in [
        ("ledger.store", "ledger"),
        ("quotes.store", "quotes"),
        ("pricing.cloud", "pricing"),
    ] {
        let g = grpc_call(o_front, host, "/tidemesh.test.Echo/Call");
        assert_eq!(g.status, 200, "{host}: {g:?}");
        assert!(!g.trailers_only, "{host}: {g:?}");
        assert_eq!(g.grpc_status.as_deref(), Some("0"), "{host}: {g:?}");
        assert_eq!(g.grpc_message.as_deref(), Some(server), "{host}: {g:?}");
        let v: Value = serde_json::from_str(&g.message).unwrap_or(Value::Null);
        assert_eq!(v["server"], server, "{g:?}");
        assert_eq!(v["version"], "HTTP/2.0", "{g:?}");
        assert_eq!(v["path"], "/tidemesh.test.Echo/Call", "{g:?}");
        assert!(
            v["xfcc"]
                .as_str()
                .is_some_and(|x| x.ends_with(&format!("URI={frontend_id}"))),
            "{g:?}"
        );
        // a gRPC error (trailers-only: status in the headers, no body)
        // arrives as one on every path, the HTTP/1.1 tunnel hop included
        let g = grpc_call(o_front, host, "/tidemesh.test.Echo/Missing");
        assert_eq!(g.status, 200, "{host}: {g:?}");
        assert_eq!(g.grpc_status.as_deref(), Some("5"), "{host}: {g:?}");
        assert_eq!(g.grpc_message.as_deref(), Some(server), "{host}: {g:?}");
        assert!(g.message.is_empty(), "{host}: {g:?}");
    }
    eprintln!("{:?}: cloud call checked", started.elapsed());
    let inv = || call(o_front, "GET", "inventory.store", "/stock", &[]);
    let r = inv();
    assert_eq!((r.status, served_by(&r).as_str()), (200, "inventory-a"));
    let phase = |label: &str, n: usize| -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let r = inv();
            assert_eq!(r.status, 200, "{label}: {r:?}");
            *seen.entry(served_by(&r)).or_insert(0) += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{label}: {seen:?}");
        seen
    };
    inv_a.down();
    let seen = phase("local killed", 30);
    assert_eq!(seen.get("inventory-b"), Some(&30), "{seen:?}");
    inv_b.down();
    let seen = phase("local and site killed", 30);
    assert_eq!(seen.get("inventory-cloud"), Some(&30), "{seen:?}");
    let rec = find_record(&hub, a, "a cloud failover", |r| {
        r["telemetry"]["operation_name"] == "GET /stock"
            && r["routing_decision"]["locality"] == "same_region"
    });
    assert_eq!(
        rec["routing_decision"]["selected_endpoint"],
        inventory_cloud.addr.to_string().as_str()
    );
    inv_a.up();
    let healed = Instant::now();
    wait_for(Duration::from_secs(15), || {
        let r = inv();
        (r.status == 200 && served_by(&r) == "inventory-a").then_some(())
    })
    .expect("traffic returns to the healed local endpoint");
    eprintln!("back to local {:?} after the heal", healed.elapsed());
    let seen = phase("local healed", 10);
    assert_eq!(seen.get("inventory-a"), Some(&10), "{seen:?}");

    // 6. retries: every fourth answer of flaky is a 503; each call succeeds
    // on a retry, and retries stay within the budget (20% of requests plus
    // 10/s)
    flaky.set(Mode::Quarter);
    let before = flaky.hits();
    for i in 0..40 {
        let r = call(o_front, "GET", "flaky.store", &format!("/try/{i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let hits = flaky.hits() - before;
    assert!((40..=80).contains(&hits), "{hits}");
    let rec = find_record(&hub, a, "a retried call", |r| {
        r["service_name"] == "flaky.store"
            && r["reliability"]["retry_state"]["retries"] == 1
            && r["telemetry"]["status_code"] == 200
    });
    assert_eq!(rec["reliability"]["retry_state"]["attempt"], 2, "{rec}");
    assert_eq!(
        rec["reliability"]["retry_state"]["max_attempts"], 4,
        "{rec}"
    );
    eprintln!("retries: 40 calls, all 200, {hits} upstream tries");

    // 6. the circuit breaker: flaky fails everything; after 3 consecutive
    // failures it opens and calls fail fast without reaching flaky; after
    // the open time two probes half-open it and close it again
    flaky.set(Mode::Fail);
    let r = call(o_front, "GET", "flaky.store", "/fail/0", &[]);
    assert_eq!(r.status, 500, "{r:?}");
    let opened_hits = flaky.hits();
    let t = Instant::now();
    let r = call(o_front, "GET", "flaky.store", "/fail/1", &[]);
    let fast = t.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("circuit breaker"), "{r:?}");
    assert_eq!(flaky.hits(), opened_hits, "an open breaker sends nothing");
    eprintln!("breaker open: failed fast in {fast:?}");
    flaky.set(Mode::Ok);
    std::thread::sleep(Duration::from_millis(1_200));
    for i in 0..4 {
        let r = call(o_front, "GET", "flaky.store", &format!("/probe/{i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let states: Vec<String> = wait_for(Duration::from_secs(10), || {
        let v: Vec<String> = request_records(&hub, a)
            .iter()
            .filter(|r| r["service_name"] == "flaky.store")
            .filter_map(|r| {
                r["reliability"]["circuit_breaker"]["state"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        (v.iter().filter(|s| *s == "closed").count() >= 2 + 40).then_some(v)
    })
    .expect("breaker evidence");
    let transitions: Vec<&String> = states
        .iter()
        .zip(states.iter().skip(1))
        .filter(|(x, y)| x != y)
        .map(|(_, y)| y)
        .collect();
    assert_eq!(
        transitions,
        ["open", "half_open", "closed"],
        "breaker states in the evidence: {states:?}"
    );

    // 8. a hub blackout: local and same-site traffic flows; cloud calls
    // fail fast with 503 and x-tidemesh-hub: unreachable
    relay.blackout(None);
    // a call already on its way when the link goes ends when the spoke
    // finds the hub gone (about 4 s), not at the 30 s request timeout
    let t = Instant::now();
    let r = call(o_front, "GET", "catalog.cloud", "/in-flight", &[]);
    let in_flight = t.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.headers.get("x-tidemesh-hub").map(String::as_str),
        Some("unreachable"),
        "{r:?}"
    );
    assert!(in_flight < Duration::from_secs(15), "{in_flight:?}");
    eprintln!("a cloud call in flight at the cut: 503 after {in_flight:?}");
    a.wait_state("disconnected", Duration::from_secs(15));
    let mut took = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let r = call(o_front, "GET", "catalog.cloud", &format!("/dark/{i}"), &[]);
        took.push(t.elapsed());
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(
            r.headers.get("x-tidemesh-hub").map(String::as_str),
            Some("unreachable"),
            "{r:?}"
        );
        let r = inv();
        assert_eq!((r.status, served_by(&r).as_str()), (200, "inventory-a"));
    }
    took.sort();
    eprintln!(
        "cloud calls during the blackout: 503 in median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    // under 50 ms is the mechanism; the margin is for a busy CI machine
    assert!(
        took[took.len() / 2] < Duration::from_millis(250),
        "{took:?}"
    );
    relay.heal();
    a.wait_state("connected", Duration::from_secs(15));
    // Recovery (this test's ModeMatrix: 3 health checks in 6 s, a ramp
    // from 25 % doubling every second): cloud calls come back through the
    // ramp; one it does not admit yet is refused at once with retry-after.
    let mut ramped = 0;
    let r = wait_for(Duration::from_secs(30), || {
        let r = call(o_front, "GET", "catalog.cloud", "/again", &[]);
        if r.status == 503 && r.headers.contains_key("retry-after") {
            ramped += 1;
        }
        (r.status == 200).then_some(r)
    });
    assert!(r.is_some(), "cloud calls work again after the heal");
    eprintln!(
        "after the heal: {ramped} cloud calls refused by the recovery ramp before one went through"
    );
    drop(spokes);
    hub.stop();
}

/// Raw TCP (issue #6): `protocol = "tcp"` echo workloads on both spokes,
/// reached through `tcp_outbound` listeners on A, locally and through the
/// tunnel; an L4 AuthorizationPolicy (ALLOW with only source principals)
/// lets frontend in and closes kiosk's connections without a byte (kiosk's
/// rule also names a method: an HTTP-only field, so for TCP it never
/// matches, as in Istio); a TCP listener for an HTTP workload or an unknown
/// service is closed too; one record per connection on each spoke it
/// crosses, with its lifetime and bytes.
#[test]
fn raw_tcp_local_and_cross_spoke_with_l4_authorization() {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// A raw TCP workload: echoes every byte, closes after the caller does.
    fn tcp_echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = c.set_nodelay(true);
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }
    /// Connects, sends `msg`, closes its half and reads to the end: what
    /// came back (a connection closed by a reset has sent nothing back);
    /// `Err` if it could not connect or nothing ended the connection.
    fn exchange(addr: SocketAddr, msg: &[u8]) -> Result<Vec<u8>, String> {
        let mut c = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // written while the echo is read back; a refused connection may be
        // gone already
        let mut w = c.try_clone().expect("clone");
        let msg = msg.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&msg);
            let _ = w.shutdown(Shutdown::Write);
        });
        let mut got = Vec::new();
        let read = c.read_to_end(&mut got);
        let _ = writer.join();
        match read {
            Ok(_) => Ok(got),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                Ok(got)
            }
            Err(e) => Err(format!("not closed: {e}")),
        }
    }
    /// Median round trip of `n` 32-byte messages on one connection.
    fn round_trips(addr: SocketAddr, n: usize) -> Duration {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_nodelay(true).expect("nodelay");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let msg = [b'r'; 32];
        let mut back = [0u8; 32];
        let mut v: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                c.write_all(&msg).expect("send");
                c.read_exact(&mut back).expect("echo");
                t.elapsed()
            })
            .collect();
        assert_eq!(back, msg);
        v.sort();
        v[v.len() / 2]
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let started = Instant::now();
    // a raw TCP service in the cloud, behind the hub gateway
    let echo_cloud = tcp_echo();
    // NAME.cloud: a raw TCP service whose endpoint is the cloud echo, under
    // the tcp-echo policy of namespace store
    // MESH_INTERNAL: spoke B also serves archive.cloud locally (a replica
    // whose port refuses), which the hub only accepts for in-mesh services;
    // a MESH_EXTERNAL host cannot be registered by a spoke (see the
    // registration checks).
    let tcp_entry = |name: &str| {
        service_entry(name, "store", "tcp-echo", echo_cloud, "TCP")
            .replace("location: MESH_EXTERNAL", "location: MESH_INTERNAL")
    };
    let yaml = format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: tcp-echo-clients
  namespace: store
spec:
  selector:
    matchLabels:
      app: tcp-echo
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/kiosk"]
    to:
    - operation:
        methods: ["*"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: standby-clients
  namespace: store
spec:
  selector:
    matchLabels:
      app: db-standby
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend", "{TD}/store/sf01/sa/kiosk"]
{ledger}{archive}"#,
        ledger = tcp_entry("ledger"),
        archive = tcp_entry("archive"),
    );
    let f = tmp.path().join("tcp.yaml");
    std::fs::write(&f, yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    // A: frontend and kiosk call through tcp_outbound listeners; cache is a
    // raw TCP workload, inventory an HTTP one, db-standby a second db whose
    // port refuses connections (no health check: only connecting tells).
    // B: db, a raw TCP workload, and a site replica of archive.cloud whose
    // port refuses (so archive goes on to the cloud, through the gateway).
    let (echo_a, echo_b, http_a) = (tcp_echo(), tcp_echo(), tcp_echo());
    let (dead, dead_b, f_archive) = (free_tcp(), free_tcp(), free_tcp());
    let (f_cache, f_db, f_http, f_none) = (free_tcp(), free_tcp(), free_tcp(), free_tcp());
    let (k_cache, k_db) = (free_tcp(), free_tcp());
    let (f_cloud, k_cloud) = (free_tcp(), free_tcp());
    let (data_a, data_b) = (free_udp(), free_udp());
    let cfg_a = write_config(
        tmp.path(),
        "tcp-a",
        &format!(
            r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "frontend"
tcp_outbound = [
  {{ listen = "{f_cache}", service = "cache" }},
  {{ listen = "{f_db}", service = "db.store" }},
  {{ listen = "{f_http}", service = "inventory.store" }},
  {{ listen = "{f_none}", service = "nowhere.store" }},
  {{ listen = "{f_cloud}", service = "ledger.cloud" }},
  {{ listen = "{f_archive}", service = "archive.cloud" }},
]

[[workload]]
service_account = "kiosk"
tcp_outbound = [
  {{ listen = "{k_cache}", service = "cache.store" }},
  {{ listen = "{k_db}", service = "db.store" }},
  {{ listen = "{k_cloud}", service = "ledger.cloud" }},
]

[[workload]]
service_account = "cache"
service = "cache"
namespace = "store"
labels = {{ app = "tcp-echo" }}
inbound = "{echo_a}"
protocol = "tcp"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "tcp-echo" }}
inbound = "{http_a}"

[[workload]]
service_account = "db-standby"
service = "db"
namespace = "store"
labels = {{ app = "db-standby" }}
inbound = "{dead}"
protocol = "tcp"
"#
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "tcp-b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "db"
service = "db"
namespace = "store"
labels = {{ app = "tcp-echo" }}
inbound = "{echo_b}"
protocol = "tcp"

[[workload]]
service_account = "archive"
service = "archive.cloud"
namespace = "store"
labels = {{ app = "tcp-echo" }}
inbound = "{dead_b}"
protocol = "tcp"
"#
        ),
    );
    let mut spokes = [
        start_spoke(tmp.path(), &hub, "tcp0", 0, &cfg_a, hub_addr),
        start_spoke(tmp.path(), &hub, "tcp1", 1, &cfg_b, hub_addr),
    ];
    let (a, b) = (&spokes[0], &spokes[1]);
    wait_site_service(a, "db");
    let frontend = format!("spiffe://{TD}/store/sf01/sa/frontend");
    let kiosk = format!("spiffe://{TD}/store/sf01/sa/kiosk");

    // allowed: local (a short name, resolved as a Host is) and cross-spoke
    // (B may take a moment to receive the policy with its slice)
    let mut allowed_to_db = 0;
    for (addr, what) in [(f_cache, "local"), (f_db, "cross-spoke")] {
        let msg = format!("hello {what}");
        wait_for(Duration::from_secs(10), || {
            (exchange(addr, msg.as_bytes()).ok()? == msg.as_bytes()).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{what} raw TCP never echoed: {:?}",
                exchange(addr, msg.as_bytes())
            )
        });
        if addr == f_db {
            allowed_to_db += 1;
        }
    }
    // db is local first, but A's db-standby refuses connections: the first
    // connection went on to B (nothing was sent yet), its record says
    // attempt 2, and the standby's breaker counted the failure
    let moved = find_record(&hub, a, "a connection moved past the dead standby", |r| {
        r["telemetry"]["operation_name"] == "TCP db.store"
            && r["enforcement_point"] == "sidecar_outbound"
            && r["reliability"]["retry_state"]["attempt"] == 2
    });
    assert_eq!(moved["telemetry"]["status"]["code"], "OK", "{moved}");
    assert_eq!(
        moved["routing_decision"]["selected_endpoint"],
        data_b.to_string().as_str(),
        "{moved}"
    );
    assert_eq!(
        moved["identity"]["server_identity"],
        b.id.as_str(),
        "{moved}"
    );
    // archive.cloud: B's replica is the nearer endpoint, but B cannot reach
    // its workload; B resets the stream as unreachable before answering, so
    // A replays what the app sent to the next endpoint, the cloud one
    wait_site_service(a, "archive.cloud");
    let msg = b"hello archive, first try at B".to_vec();
    let got = exchange(f_archive, &msg).expect("archive through the gateway");
    assert_eq!(got, msg, "archive.cloud after B's unreachable replica");
    let moved = find_record(&hub, a, "archive moved past B's dead replica", |r| {
        r["telemetry"]["operation_name"] == "TCP archive.cloud"
            && r["reliability"]["retry_state"]["attempt"] == 2
    });
    assert_eq!(moved["telemetry"]["status"]["code"], "OK", "{moved}");
    assert_eq!(
        moved["routing_decision"]["locality"], "other_region",
        "the second try went to the cloud endpoint: {moved}"
    );
    let dead_replica = find_record(&hub, b, "B's refusal of archive", |r| {
        r["telemetry"]["operation_name"] == "TCP archive.cloud"
    });
    assert_eq!(
        dead_replica["telemetry"]["status"]["code"], "ERROR",
        "{dead_replica}"
    );
    assert!(
        dead_replica["telemetry"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused the connection")),
        "{dead_replica}"
    );
    // a connection held open: its record's duration is its lifetime
    {
        let mut c = TcpStream::connect(f_db).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(b"held").expect("send");
        let mut back = [0u8; 4];
        c.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"held");
        std::thread::sleep(Duration::from_millis(400));
        allowed_to_db += 1;
    }
    // 1 MiB each way through both spokes and the tunnel
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let back = exchange(f_db, &big).expect("1 MiB through the tunnel");
    let bulk = t.elapsed();
    assert!(
        back == big,
        "1 MiB came back altered ({} bytes)",
        back.len()
    );
    allowed_to_db += 1;

    // refused: kiosk's only rule needs a method (never for TCP), locally and
    // at B: the connection closes without a byte
    for (addr, what) in [(k_cache, "local"), (k_db, "cross-spoke")] {
        let got = exchange(addr, b"let me in").unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(got.is_empty(), "{what}: kiosk got {got:?}");
    }
    // raw TCP to a cloud service through the hub gateway, authorized there
    // with the same L4 semantics: frontend echoes, kiosk is cut off
    let got = exchange(f_cloud, b"hello cloud").expect("raw TCP through the hub gateway");
    assert_eq!(got, b"hello cloud");
    let got = exchange(k_cloud, b"let me in").expect("kiosk to the cloud");
    assert!(got.is_empty(), "kiosk got {got:?} from the cloud");
    // an HTTP workload takes no raw TCP; an unknown service is unroutable
    for (addr, what) in [(f_http, "HTTP workload"), (f_none, "unknown service")] {
        let got =
            exchange(addr, b"GET / HTTP/1.1\r\n\r\n").unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(got.is_empty(), "{what}: got {got:?}");
    }

    // figures (debug build, loopback): 32-byte round trips on one connection
    let direct = round_trips(echo_b, 200);
    let local = round_trips(f_cache, 200);
    let tunnel = round_trips(f_db, 200);
    allowed_to_db += 1;
    eprintln!(
        "raw tcp echo, median round trip of 32 bytes: direct {direct:?}, via spoke A (local) {local:?}, app -> A -> QUIC -> B -> workload {tunnel:?}; 1 MiB each way through the tunnel in {bulk:?}"
    );

    // evidence: B's inbound records, one per connection that reached it
    let op_db = "TCP db.store";
    let rec = find_record(&hub, b, "the 1 MiB connection", |r| {
        r["telemetry"]["operation_name"] == op_db
            && r["telemetry"]["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("1048576 bytes up, 1048576 bytes down"))
    });
    assert_eq!(rec["enforcement_point"], "sidecar_inbound");
    assert_eq!(rec["service_name"], "db.store");
    assert_eq!(rec["identity"]["client_identity"], frontend.as_str());
    assert_eq!(rec["identity"]["server_identity"], b.id.as_str());
    assert_eq!(rec["identity"]["tls_version"], "1.3");
    let pol = &rec["policy_evaluation"];
    assert_eq!(pol["final_decision"], "ALLOW", "{pol}");
    assert_eq!(pol["policy_name"], "store/tcp-echo-clients");
    assert_eq!(pol["matched_rule"], "0");
    assert_eq!(rec["telemetry"]["status"]["code"], "OK");
    assert!(rec["telemetry"]["status_code"].is_null(), "{rec}");
    let held = find_record(&hub, b, "the held connection", |r| {
        r["telemetry"]["operation_name"] == op_db
            && r["telemetry"]["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("; 4 bytes up, 4 bytes down"))
    });
    let lived = held["telemetry"]["duration_us"].as_u64().unwrap_or(0);
    assert!(lived >= 400_000, "the held connection lived {lived} us");
    let denied = find_record(&hub, b, "kiosk's refused connection", |r| {
        r["telemetry"]["operation_name"] == op_db
            && r["identity"]["client_identity"] == kiosk.as_str()
    });
    assert_eq!(denied["policy_evaluation"]["final_decision"], "DENY");
    assert_eq!(
        denied["policy_evaluation"]["reason"],
        "no_allow_policy_matched"
    );
    assert_eq!(denied["telemetry"]["status"]["code"], "ERROR");
    assert!(
        denied["telemetry"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("RBAC: access denied"),
        "{denied}"
    );
    // one record per connection: every allowed connection, once
    std::thread::sleep(Duration::from_millis(500));
    let count = |s: &SpokeProc, point: &str| {
        request_records(&hub, s)
            .iter()
            .filter(|r| {
                r["telemetry"]["operation_name"] == op_db
                    && r["enforcement_point"] == point
                    && r["identity"]["client_identity"] == frontend.as_str()
                    && r["telemetry"]["status"]["code"] == "OK"
            })
            .count()
    };
    assert_eq!(count(b, "sidecar_inbound"), allowed_to_db);
    // and A's outbound records of the same connections: routed to the peer
    assert_eq!(count(a, "sidecar_outbound"), allowed_to_db);
    let out = find_record(&hub, a, "a cross-spoke connection", |r| {
        r["telemetry"]["operation_name"] == op_db && r["enforcement_point"] == "sidecar_outbound"
    });
    assert_eq!(out["routing_decision"]["locality"], "same_zone");
    assert_eq!(
        out["routing_decision"]["selected_endpoint"],
        data_b.to_string().as_str()
    );
    assert_eq!(out["identity"]["server_identity"], b.id.as_str());
    // A's records of the local connections: authorized there
    let local_ok = find_record(&hub, a, "frontend's local connection", |r| {
        r["telemetry"]["operation_name"] == "TCP cache.store"
            && r["identity"]["client_identity"] == frontend.as_str()
    });
    assert_eq!(local_ok["routing_decision"]["locality"], "local");
    assert_eq!(local_ok["policy_evaluation"]["final_decision"], "ALLOW");
    assert_eq!(local_ok["telemetry"]["status"]["code"], "OK");
    let local_denied = find_record(&hub, a, "kiosk's local connection", |r| {
        r["telemetry"]["operation_name"] == "TCP cache.store"
            && r["identity"]["client_identity"] == kiosk.as_str()
    });
    assert_eq!(local_denied["policy_evaluation"]["final_decision"], "DENY");
    let http = find_record(&hub, a, "raw TCP to an HTTP workload", |r| {
        r["telemetry"]["operation_name"] == "TCP inventory.store"
    });
    assert_eq!(http["telemetry"]["status"]["code"], "ERROR");
    assert!(
        http["policy_evaluation"].is_null(),
        "refused before authorization: {http}"
    );
    let none = find_record(&hub, a, "the unroutable connection", |r| {
        r["telemetry"]["operation_name"] == "TCP nowhere.store"
    });
    assert_eq!(none["telemetry"]["status"]["code"], "ERROR");

    // a taken tcp_outbound port stops the spoke before it serves, naming the key
    spokes[0].kill();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let cfg = write_config(
        tmp.path(),
        "tcp-taken",
        &format!(
            "[[workload]]\nservice_account = \"frontend\"\ntcp_outbound = [{{ listen = \"{addr}\", service = \"db.store\" }}]\n"
        ),
    );
    let o = tidemesh_tests::run(
        std::process::Command::new(tidemesh_tests::bin("tidemesh-spoke"))
            .args(["run", "--config", &cfg, "--data-dir"])
            .arg(&spokes[0].dir),
    );
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("workload[0].tcp_outbound[0].listen") && msg.contains(&addr.to_string()),
        "{msg}"
    );
    spokes[1].kill();
    hub.stop();
    eprintln!("raw tcp test took {:?} after the build", started.elapsed());
}

/// An HTTP server at `addr` answering every request with 200 and
/// `{"server": NAME, "path": ...}` while `up` holds, counting the requests
/// it answered; once `up` is cleared it stops accepting (the next
/// connection attempt wakes it) and its port refuses connections.
fn counting_server(
    name: &'static str,
    l: TcpListener,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    let hits = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(AtomicBool::new(true));
    let (h, u) = (hits.clone(), up.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if !u.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let Some((head, _)) = read_message(&mut c) else {
                continue;
            };
            h.fetch_add(1, Ordering::SeqCst);
            let path = head.split(' ').nth(1).unwrap_or("").to_owned();
            let out = serde_json::json!({"server": name, "path": path}).to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                out.len()
            );
            let _ = c.write_all(resp.as_bytes());
        }
    });
    (hits, up)
}

/// Issue 15: the path authorized is the path forwarded (ambiguous
/// encodings get 400 at the serving spoke and at the hub gateway), and the
/// gateway sends a call only to endpoints whose labels the policy allows,
/// failover included (shown with raw TCP, which the gateway moves to the
/// next endpoint on any connect failure).
#[test]
fn ambiguous_paths_are_refused_and_the_gateway_never_fails_over_to_a_refused_endpoint() {
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    // two endpoints of ledger.cloud on one port, different addresses and labels
    let replica_l = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let port = replica_l.local_addr().expect("addr").port();
    let primary_l = TcpListener::bind(("127.0.0.1", port)).expect("bind 127.0.0.1");
    let (primary_hits, primary_up) = counting_server("primary", primary_l);
    let (replica_hits, _replica_up) = counting_server("replica", replica_l);
    let inventory = echo_server("inventory");
    // vault.cloud (raw TCP): the primary's port refuses, the replica echoes
    // and counts its connections
    let vault_replica = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let tcp_port = vault_replica.local_addr().expect("addr").port();
    let vault_replica_conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let n = vault_replica_conns.clone();
        std::thread::spawn(move || {
            for conn in vault_replica.incoming() {
                let Ok(mut c) = conn else { continue };
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 64];
                if let Ok(k) = std::io::Read::read(&mut c, &mut buf) {
                    let _ = c.write_all(&buf[..k]);
                }
            }
        });
    }
    let yaml = format!(
        r#"{STORE_SF01}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: ledger, namespace: cloud}}
spec:
  hosts: [ledger.cloud]
  location: MESH_EXTERNAL
  ports:
  - {{number: {port}, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    labels: {{app: ledger, tier: primary}}
  - address: 127.0.0.2
    labels: {{app: ledger, tier: replica}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: vault, namespace: cloud}}
spec:
  hosts: [vault.cloud]
  location: MESH_EXTERNAL
  ports:
  - {{number: {tcp_port}, name: tcp, protocol: TCP}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    labels: {{app: vault, tier: primary}}
  - address: 127.0.0.2
    labels: {{app: vault, tier: replica}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: primary-only, namespace: cloud}}
spec:
  selector:
    matchLabels: {{tier: primary}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: inventory-readers, namespace: store}}
spec:
  selector:
    matchLabels: {{app: inventory}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/public/*"]
"#
    );
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
    let (o_front, t_front, data) = (free_tcp(), free_tcp(), free_udp());
    let cfg = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"data_listen = "{data}"
data_advertise = "{data}"

[[workload]]
service_account = "frontend"
outbound = "{o_front}"
tcp_outbound = [{{ listen = "{t_front}", service = "vault.cloud" }}]

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{inventory}"
"#
        ),
    );
    let _spoke = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg, hub_addr);

    wait_for(Duration::from_secs(10), || {
        (call(o_front, "GET", "inventory.store", "/public/ok", &[]).status == 200).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{:?}",
            call(o_front, "GET", "inventory.store", "/public/ok", &[])
        )
    });
    // 1. the serving spoke: ambiguous paths get 400 with the reason, before
    // authorization (which would allow /public/* and so /public/../admin)
    for (path, why) in [
        ("/public/..%2Fadmin", "encoded slash"),
        ("/public/%2e%2e/admin", "encoded dot"),
        ("/public/../admin", "dot segment"),
        ("/public;x=1/admin", "path parameter"),
        ("/public/%5Cadmin", "encoded slash"),
        ("/public/a%00", "control byte"),
    ] {
        let r = call(o_front, "GET", "inventory.store", path, &[]);
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(r.body.contains(why), "{path}: {r:?}");
    }
    // an unambiguous encoding is authorized and forwarded in normal form
    let r = call(
        o_front,
        "GET",
        "inventory.store",
        "/public//%61bc?q=%2F",
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echo()["path"], "/public/abc?q=%2F", "{r:?}");

    // 2. the gateway: only the primary's labels are allowed, so every call
    // goes there, whatever the rotation
    let r = wait_for(Duration::from_secs(10), || {
        let r = call(o_front, "GET", "ledger.cloud", "/entries", &[]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "{:?}",
            call(o_front, "GET", "ledger.cloud", "/entries", &[])
        )
    });
    assert_eq!(r.echo()["server"], "primary", "{r:?}");
    for _ in 0..6 {
        let r = call(o_front, "GET", "ledger.cloud", "/entries", &[]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.echo()["server"], "primary", "{r:?}");
    }
    // the gateway checks paths too
    let r = call(
        o_front,
        "GET",
        "ledger.cloud",
        "/entries/..%2F..%2Fadmin",
        &[],
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("hub gateway"), "{r:?}");
    let r = call(o_front, "GET", "ledger.cloud", "/%65ntries", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echo()["path"], "/entries", "{r:?}");
    // the primary goes down: connect failures do not fail over to the
    // replica, whose labels the policy refuses
    primary_up.store(false, Ordering::SeqCst);
    let _ = TcpStream::connect(("127.0.0.1", port));
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..6 {
        let r = call(o_front, "GET", "ledger.cloud", "/entries", &[]);
        assert_ne!(r.status, 200, "{r:?}");
        assert_ne!(r.echo()["server"], "replica", "{r:?}");
    }
    assert_eq!(replica_hits.load(Ordering::SeqCst), 0);
    assert!(primary_hits.load(Ordering::SeqCst) >= 8);

    // 3. raw TCP, where the gateway fails over on any connect failure: the
    // primary refuses connections and the replica is never dialed
    for _ in 0..4 {
        let mut c = TcpStream::connect(t_front).expect("connect to tcp_outbound");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = c.write_all(b"secret");
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut got);
        assert!(got.is_empty(), "{got:?}");
    }
    assert_eq!(vault_replica_conns.load(Ordering::SeqCst), 0);
}

/// What one workload's flood of silent streams got from a serving end.
#[derive(Debug, Default)]
struct Flood {
    /// Connections that came up and stayed up.
    alive: usize,
    /// Connections closed by the server with `close::BUSY` (per-peer cap).
    busy_closed: usize,
    /// Connections that failed otherwise (a refused handshake, a timeout).
    failed: usize,
    /// Streams the server holds open (silent: one byte of header sent).
    held: usize,
    /// Streams on live connections the server reset at once.
    refused: usize,
}

/// A workload holding `conns` connections to `addr` (as `server`), each
/// with `streams` silent streams (one byte of a stream header, never the
/// rest), from `bind_ip`; its runtime keeps them alive until dropped.
struct Flooder {
    rt: tokio::runtime::Runtime,
    conns: Vec<quinn::Connection>,
    streams: Vec<(usize, quinn::SendStream, quinn::RecvStream)>,
    failed: usize,
    _endpoint: quinn::Endpoint,
}

impl Flooder {
    #[allow(
        clippy::too_many_arguments,
        reason = "a test helper; a struct would only rename them"
    )]
    fn start(
        addr: SocketAddr,
        server: tidemesh_identity::SpiffeId,
        bundle: tidemesh_identity::TrustBundle,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: &tidemesh_identity::KeyPair,
        bind_ip: std::net::IpAddr,
        conns: usize,
        streams: usize,
    ) -> Flooder {
        // a worker thread drives the connections (keep-alives, acks) while
        // the test thread makes its calls
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let tls = tidemesh_identity::verify::client_config(
            bundle,
            chain,
            key,
            std::sync::Arc::new(tidemesh_identity::verify::ExactId(server)),
            std::sync::Arc::new(tidemesh_identity::clock::SystemClock),
            &[tidemesh_proto::ALPN_DATA],
        )
        .expect("client tls");
        let cfg = tidemesh_net::QuicSettings::default()
            .client_config(tls)
            .expect("client config");
        let endpoint = rt.block_on(async {
            let sock = std::net::UdpSocket::bind((bind_ip, 0)).expect("bind the flooder");
            tidemesh_net::quic::endpoint(tidemesh_net::quic::wrap_socket(sock).expect("wrap"), None)
                .expect("endpoint")
        });
        let (conns, streams, failed) = rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..conns {
                let (ep, cfg) = (endpoint.clone(), cfg.clone());
                tasks.spawn(async move {
                    let connecting = ep.connect_with(cfg, addr, "data.test").ok()?;
                    let conn = tokio::time::timeout(Duration::from_secs(20), connecting)
                        .await
                        .ok()?
                        .ok()?;
                    let mut opened = Vec::new();
                    for _ in 0..streams {
                        let Ok(Ok((mut send, recv))) =
                            tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await
                        else {
                            break;
                        };
                        // one byte of the length prefix: never a full header
                        if send.write_all(&[0]).await.is_err() {
                            break;
                        }
                        opened.push((conn.stable_id(), send, recv));
                    }
                    Some((conn, opened))
                });
            }
            let (mut conns, mut streams, mut failed) = (Vec::new(), Vec::new(), 0);
            while let Some(r) = tasks.join_next().await {
                match r.ok().flatten() {
                    Some((c, s)) => {
                        conns.push(c);
                        streams.extend(s);
                    }
                    None => failed += 1,
                }
            }
            (conns, streams, failed)
        });
        Flooder {
            rt,
            conns,
            streams,
            failed,
            _endpoint: endpoint,
        }
    }

    /// What the server did with the connections and streams by now: a
    /// held stream has nothing to read, a refused one reads a reset.
    fn census(&mut self) -> Flood {
        let busy = quinn::VarInt::from_u32(tidemesh_proto::close::BUSY);
        let mut f = Flood {
            failed: self.failed,
            ..Flood::default()
        };
        let mut live = std::collections::HashSet::new();
        for c in &self.conns {
            match c.close_reason() {
                None => {
                    f.alive += 1;
                    live.insert(c.stable_id());
                }
                Some(quinn::ConnectionError::ApplicationClosed(a)) if a.error_code == busy => {
                    f.busy_closed += 1
                }
                Some(_) => f.failed += 1,
            }
        }
        let streams = &mut self.streams;
        self.rt.block_on(async {
            // streams of connections the server closed are neither
            for (_, _, recv) in streams.iter_mut().filter(|(id, _, _)| live.contains(id)) {
                let mut buf = [0u8; 1];
                // one poll: a reset that arrived is seen at once, and the
                // census stays far shorter than the header deadline
                match tokio::time::timeout(Duration::ZERO, recv.read(&mut buf)).await {
                    Err(_) => f.held += 1,
                    Ok(_) => f.refused += 1,
                }
            }
        });
        f
    }

    /// One full request on a new stream of a live connection: the answer's
    /// status line, or why there was none. The flood's streams are given up
    /// first (reset from this end too), so the connection has stream credit.
    fn request(&mut self, service: &str, workload: &str, host: &str) -> Result<String, String> {
        for (_, mut send, _) in self.streams.drain(..) {
            let _ = send.reset(quinn::VarInt::from_u32(0));
        }
        let conn = self
            .conns
            .iter()
            .find(|c| c.close_reason().is_none())
            .ok_or("no live connection")?
            .clone();
        let header = tidemesh_proto::data::StreamHeader {
            service: service.into(),
            workload: workload.into(),
            protocol: tidemesh_proto::data::StreamProtocol::Http1,
            trace: None,
            request_id: None,
        };
        let req = format!("GET /items HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
        self.rt.block_on(async {
            let exchange = async {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&header.encode().map_err(|e| e.to_string())?)
                    .await
                    .map_err(|e| e.to_string())?;
                send.write_all(req.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = [0u8; 12];
                recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(String::from_utf8_lossy(&buf).to_string())
            };
            tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .map_err(|_| "no answer within 10 s".to_string())?
        })
    }
}

/// The value of one sample line (`name{labels}`) of a /metrics page.
fn metric(page: &str, sample: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

fn scrape(addr: SocketAddr) -> String {
    call(addr, "GET", "metrics", "/metrics", &[]).body
}

/// One workload (an SVID minted by spoke A's node CA, as a compromised app
/// of store sf01 would hold) opens 64 connections with 64 silent streams
/// each (one byte of a stream header, never the rest) against the hub
/// gateway and against spoke B's tunnel listener, from its own address
/// (127.0.0.2; B takes 16 handshakes in progress from one address and 8
/// connections per workload). While it holds them, B's local app calls B's inventory, A's
/// app calls B's inventory over the tunnel and the cloud catalog over the
/// gateway, and store sf02's app calls the catalog: all succeed. The caps
/// (set by flag: 300 streams per workload, 24 connections at the gateway) hold
/// exactly, across connections; after the header deadline (20 s) every held
/// stream is reset, counted, and the slots are free again.
#[test]
fn one_workload_with_64_connections_of_64_silent_streams_starves_neither_the_gateway_nor_a_peer_spoke(
) {
    const CONNS: usize = 64;
    const STREAMS: usize = 64;
    // the gateway's per-workload connection cap; spoke B's is 8, below the
    // 16 handshakes it takes at once from one address, so both caps act
    const PEER_CONNS: usize = 24;
    const B_PEER_CONNS: usize = 8;
    const PEER_STREAMS: usize = 300;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
    let caps = [
        "--gateway-peer-connections",
        "24",
        "--gateway-peer-streams",
        "300",
        "--gateway-header-timeout",
        "20s",
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub_metrics = free_tcp();
    let hub_metrics_s = hub_metrics.to_string();
    let mut hub_args = vec!["--metrics", hub_metrics_s.as_str()];
    hub_args.extend(caps);
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&hub_args);
    let hub_addr = hub.start();
    let catalog = echo_server("catalog");
    let inventory = echo_server("inventory");
    let yaml = format!(
        r#"{STORE_SF01}
---
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {{name: sf02}}
spec: {{region: us-west-2, zone: us-west-2b}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: inventory-readers, namespace: store}}
spec:
  selector:
    matchLabels: {{app: inventory}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: catalog-readers, namespace: cloud}}
spec:
  selector:
    matchLabels: {{app: catalog}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend", "{TD}/store/sf02/sa/frontend"]
{}"#,
        cloud_entry("catalog", catalog, "HTTP")
    );
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    let (ob_a, ob_b, ob_c) = (free_tcp(), free_tcp(), free_tcp());
    let (data_a, data_b) = (free_udp(), free_udp());
    let b_metrics = free_tcp();
    let frontend = |ob: SocketAddr| {
        format!(
            r#"
[[workload]]
service_account = "frontend"
service = "frontend"
namespace = "store"
labels = {{ app = "frontend" }}
outbound = "{ob}"
"#
        )
    };
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            "data_listen = \"{data_a}\"\ndata_advertise = \"{data_a}\"\n{}",
            frontend(ob_a)
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"
{}
[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{inventory}"
"#,
            frontend(ob_b)
        ),
    );
    let cfg_c = write_config(tmp.path(), "c", &frontend(ob_c));
    let a = start_spoke(tmp.path(), &hub, "a", 1, &cfg_a, hub_addr);
    let b_metrics_s = b_metrics.to_string();
    let mut b = SpokeProc::new(
        tmp.path(),
        "b",
        &format!("spiffe://{TD}/store/sf01/node/n2"),
    )
    .with_args(&[
        "--config",
        &cfg_b,
        "--metrics",
        &b_metrics_s,
        "--data-peer-connections",
        "8",
        "--data-peer-streams",
        "300",
        "--data-address-handshakes",
        "16",
        "--data-header-timeout",
        "20s",
    ]);
    let o = b.enroll(hub_addr, &hub.token(&b.id, "10m"));
    assert!(o.status.success(), "enroll b: {}", text(&o));
    b.start();
    b.wait_state("connected", Duration::from_secs(10));
    b.wait_configured(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("B not configured: {:?}", b.try_status()));
    let c_id = format!("spiffe://{TD}/store/sf02/node/n1");
    let mut c = SpokeProc::new(tmp.path(), "c", &c_id).with_args(&["--config", &cfg_c]);
    let o = c.enroll(hub_addr, &hub.token(&c_id, "10m"));
    assert!(o.status.success(), "enroll c: {}", text(&o));
    c.start();
    c.wait_state("connected", Duration::from_secs(10));
    c.wait_configured(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("C not configured: {:?}", c.try_status()));
    wait_site_service(&a, "inventory");
    let calls = || {
        [
            ("B's app -> B's inventory", ob_b, "inventory"),
            ("A's app -> B's inventory (tunnel)", ob_a, "inventory"),
            ("A's app -> catalog (gateway)", ob_a, "catalog.cloud"),
            ("sf02's app -> catalog (gateway)", ob_c, "catalog.cloud"),
        ]
        .map(|(what, ob, host)| (what, call(ob, "GET", host, "/items", &[]).status))
    };
    assert!(
        calls().iter().all(|(_, s)| *s == 200),
        "before the flood: {:?}",
        calls()
    );

    // The intruder: a workload SVID minted by A's node CA (off A's disk).
    let creds_a = tidemesh_spoke::CredStore::new(&a.dir);
    let ca = creds_a.node_ca().expect("read").expect("A's node CA");
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let bundle = creds_a.bundle(&td).expect("bundle");
    let key = tidemesh_identity::svid::generate_key().expect("key");
    let now = std::time::SystemTime::now();
    let intruder: tidemesh_identity::SpiffeId = format!("spiffe://{TD}/store/sf01/sa/intruder")
        .parse()
        .expect("id");
    let chain = ca
        .issue_workload(
            &key,
            &intruder,
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        )
        .expect("A's node CA signs");
    let from: std::net::IpAddr = [127, 0, 0, 2].into();
    let node_b: tidemesh_identity::SpiffeId = b.id.parse().expect("id");
    let hub_id = tidemesh_identity::naming::hub_id(&td);
    let t0 = Instant::now();
    let mut at_gw = Flooder::start(
        hub_addr,
        hub_id,
        bundle.clone(),
        chain.clone(),
        &key,
        from,
        CONNS,
        STREAMS,
    );
    let mut at_b = Flooder::start(data_b, node_b, bundle, chain, &key, from, CONNS, STREAMS);
    let flood_up = t0.elapsed();
    // let the servers see every stream
    std::thread::sleep(Duration::from_secs(1));
    let gw = at_gw.census();
    let bb = at_b.census();
    eprintln!(
        "flood up in {flood_up:?}, census done {:?} later; gateway: {gw:?}; spoke B: {bb:?}",
        t0.elapsed() - flood_up
    );
    for (what, f, cap) in [("gateway", &gw, PEER_CONNS), ("spoke B", &bb, B_PEER_CONNS)] {
        assert!(
            f.alive <= cap,
            "{what}: {} connections of one workload alive (cap {cap})",
            f.alive
        );
        assert!(
            f.alive * STREAMS > PEER_STREAMS,
            "{what}: too few connections came up to test the stream cap: {f:?}"
        );
        assert_eq!(
            f.held, PEER_STREAMS,
            "{what}: silent streams held for one workload across its connections"
        );
        assert!(f.busy_closed >= 1, "{what}: no connection refused: {f:?}");
    }

    // While the flood holds its slots, everyone else's calls go through.
    let during = calls();
    let calls_took = t0.elapsed() - flood_up;
    eprintln!("calls during the flood ({calls_took:?}): {during:?}");
    assert!(
        during.iter().all(|(_, s)| *s == 200),
        "calls during the flood: {during:?}"
    );
    // ... and the flood still held them then.
    let still = (at_gw.census(), at_b.census());
    assert!(
        still.0.held == PEER_STREAMS && still.1.held == PEER_STREAMS,
        "the flood no longer held its streams after the calls ({:?} since it was up; \
         header deadline {HEADER_TIMEOUT:?}): {still:?}",
        t0.elapsed() - flood_up
    );

    // The counters say what was refused, exactly.
    let hub_page = scrape(hub_metrics);
    let b_page = scrape(b_metrics);
    let hub_m = |r: &str| {
        metric(
            &hub_page,
            &format!("tidemesh_hub_gateway_refusals_total{{reason=\"{r}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    let b_m = |r: &str| {
        metric(
            &b_page,
            &format!("tidemesh_spoke_dataplane_tunnel_refusals_total{{reason=\"{r}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    assert_eq!(hub_m("peer_streams"), gw.refused as f64, "{hub_page}");
    assert_eq!(
        hub_m("peer_connections"),
        gw.busy_closed as f64,
        "{hub_page}"
    );
    assert_eq!(hub_m("global_streams"), 0.0, "{hub_page}");
    assert_eq!(b_m("peer_streams"), bb.refused as f64, "{b_page}");
    assert_eq!(b_m("peer_connections"), bb.busy_closed as f64, "{b_page}");
    assert_eq!(b_m("global_limit"), 0.0, "{b_page}");
    // 64 handshakes at once from one address, 16 allowed in progress: the
    // rest are refused before any crypto, and those are the ones that failed
    assert!(bb.failed >= 1, "no handshake refused at spoke B: {bb:?}");
    assert_eq!(b_m("address_handshakes"), bb.failed as f64, "{b_page}");
    eprintln!(
        "spoke B refused {} handshakes from the flooder's address (cap 16 in progress)",
        b_m("address_handshakes")
    );

    // The header deadline resets every held stream and frees the slots.
    let freed = wait_for(HEADER_TIMEOUT + Duration::from_secs(20), || {
        let h = metric(
            &scrape(hub_metrics),
            "tidemesh_hub_gateway_refusals_total{reason=\"header_timeout\"}",
        )?;
        let b = metric(
            &scrape(b_metrics),
            "tidemesh_spoke_dataplane_tunnel_refusals_total{reason=\"header_timeout\"}",
        )?;
        (h == PEER_STREAMS as f64 && b == PEER_STREAMS as f64).then(|| t0.elapsed() - flood_up)
    });
    let freed = freed.unwrap_or_else(|| {
        panic!(
            "held streams were not all reset by the deadline:\n{}\n{}",
            scrape(hub_metrics),
            scrape(b_metrics)
        )
    });
    assert!(
        freed >= HEADER_TIMEOUT - Duration::from_secs(2),
        "streams reset before the deadline ({freed:?})"
    );
    let after = (at_gw.census(), at_b.census());
    assert_eq!((after.0.held, after.1.held), (0, 0), "{after:?}");
    eprintln!("all held streams reset {freed:?} after the flood was up");
    // The freed slots serve the same workload again (its policy then
    // refuses it: an answer, not a reset).
    let gw_answer = at_gw.request("catalog.cloud", "catalog", "catalog.cloud");
    let b_answer = at_b.request("inventory.store", "inventory", "inventory");
    assert!(
        gw_answer
            .as_deref()
            .is_ok_and(|l| l.starts_with("HTTP/1.1 403")),
        "gateway after the deadline: {gw_answer:?}"
    );
    assert!(
        b_answer
            .as_deref()
            .is_ok_and(|l| l.starts_with("HTTP/1.1 403")),
        "spoke B after the deadline: {b_answer:?}"
    );
    assert!(
        calls().iter().all(|(_, s)| *s == 200),
        "after the flood: {:?}",
        calls()
    );
}

/// A server's certificate and key.
type ServerCert = (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// PEM files of a test PKI for TLS origination, made with rcgen: a CA with a
/// server certificate for `api.pay.test`, a second CA the server does not
/// chain to (with a server certificate of its own for `api.pay.test`), and a
/// client CA with a client certificate.
struct TlsPki {
    ca: String,
    other_ca: String,
    server: ServerCert,
    other_server: ServerCert,
    client_ca: rustls::pki_types::CertificateDer<'static>,
    client_cert: String,
    client_key: String,
}

fn tls_pki(dir: &Path) -> TlsPki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca")
    };
    let leaf = |issuer: &CertifiedIssuer<'static, KeyPair>, name: &str, eku| {
        let mut p = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, issuer).expect("leaf");
        (cert, key)
    };
    let server_ca = ca("pay test CA");
    let other = ca("some other CA");
    let client_ca = ca("hub client CA");
    let (server, server_key) = leaf(
        &server_ca,
        "api.pay.test",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (other_server, other_server_key) =
        leaf(&other, "api.pay.test", ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = leaf(
        &client_ca,
        "hub.client.test",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).expect("write pem");
        p.to_str().expect("utf8 path").to_owned()
    };
    TlsPki {
        ca: write("ca.pem", server_ca.pem()),
        other_ca: write("other-ca.pem", other.pem()),
        server: (
            server.der().clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        ),
        other_server: (
            other_server.der().clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(other_server_key.serialize_der().into()),
        ),
        client_ca: client_ca.der().clone(),
        client_cert: write("client.pem", client.pem()),
        client_key: write("client-key.pem", client_key.serialize_pem()),
    }
}

/// A TLS 1.3/1.2 HTTP/1.1 server on 127.0.0.1 (rustls over std threads)
/// presenting `cert`: answers every request with 200 and
/// `tls-ok client-cert=<yes|no>`; requires a client certificate from
/// `client_ca` when given.
fn tls_server(
    cert: &ServerCert,
    client_ca: Option<&rustls::pki_types::CertificateDer<'static>>,
) -> SocketAddr {
    use std::{io::Read, sync::Arc};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone()).expect("client ca");
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let config = Arc::new(
        builder
            .with_single_cert(vec![cert.0.clone()], cert.1.clone_key())
            .expect("server cert"),
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind tls server");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(tcp) = conn else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(session) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(session, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let cert = if s.conn.peer_certificates().is_some() {
                    "yes"
                } else {
                    "no"
                };
                let body = format!("tls-ok client-cert={cert}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.flush();
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    addr
}

/// TLS origination at the hub gateway (`DestinationRule.trafficPolicy.tls`
/// for `ServiceEntry` hosts) against TLS servers with their own CA: SIMPLE
/// works and its TLS version and suite reach the caller's evidence; a wrong
/// CA, a wrong SAN and a missing client certificate get 503 with the reason,
/// also in the evidence; MUTUAL works against a server that requires a
/// client certificate; files are checked at apply.
#[test]
fn tls_origination_simple_mutual_and_refusals() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tls_pki(tmp.path());
    let simple = tls_server(&pki.server, None);
    let mutual = tls_server(&pki.server, Some(&pki.client_ca));
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let entry = |name: &str, addr: SocketAddr| service_entry(name, "cloud", "pay", addr, "HTTP");
    let rule = |name: &str, tls: &str| {
        format!("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: cloud}}\nspec:\n  host: {name}.cloud\n  trafficPolicy:\n    tls: {tls}\n")
    };
    let (ca, other, cc, ck) = (&pki.ca, &pki.other_ca, &pki.client_cert, &pki.client_key);
    let yaml = [
        STORE_SF01.to_string(),
        entry("simple", simple),
        rule("simple", &format!("{{mode: SIMPLE, caCertificates: {ca}, sni: api.pay.test}}")),
        entry("wrongca", simple),
        rule("wrongca", &format!("{{mode: SIMPLE, caCertificates: {other}, sni: api.pay.test}}")),
        entry("wrongsan", simple),
        rule("wrongsan", &format!("{{mode: SIMPLE, caCertificates: {ca}, sni: api.pay.test, subjectAltNames: [billing.pay.test]}}")),
        entry("mutual", mutual),
        rule("mutual", &format!("{{mode: MUTUAL, caCertificates: {ca}, sni: api.pay.test, clientCertificate: {cc}, privateKey: {ck}}}")),
        entry("nocert", mutual),
        rule("nocert", &format!("{{mode: SIMPLE, caCertificates: {ca}, sni: api.pay.test}}")),
        frontend_only("pay-callers", "cloud", "pay"),
    ]
    .join("\n");
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, &yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    // Files are read at apply: a missing CA file or one without a
    // certificate refuses the whole apply, naming the rule, field and file.
    let missing = tmp.path().join("missing.pem");
    let not_pem = tmp.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    for (file, want) in [
        (missing.to_str().expect("utf8"), "cannot read"),
        (
            not_pem.to_str().expect("utf8"),
            "holds no CERTIFICATE block",
        ),
    ] {
        let bad = yaml.replacen(ca.as_str(), file, 1);
        let fb = tmp.path().join("bad.yaml");
        std::fs::write(&fb, bad).expect("yaml");
        let o = hub.cli(&["apply", "-f", fb.to_str().expect("utf8")]);
        let t = text(&o);
        assert!(!o.status.success(), "a bad CA file was applied: {t}");
        assert!(
            t.contains("DestinationRule cloud/simple: spec.trafficPolicy.tls.caCertificates:")
                && t.contains(file)
                && t.contains(want),
            "{t}"
        );
    }
    let h = hub.cli(&["config", "history", "--json"]);
    let versions: Value = serde_json::from_slice(&h.stdout).expect("history json");
    assert_eq!(versions.as_array().map(Vec::len), Some(1), "{versions}");

    let o_front = free_tcp();
    let cfg = write_config(
        tmp.path(),
        "a",
        &format!("[[workload]]\nservice_account = \"frontend\"\noutbound = \"{o_front}\"\n"),
    );
    let spoke = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg, hub_addr);

    // SIMPLE: verified against the CA file, the name from sni.
    let r = wait_for(Duration::from_secs(10), || {
        let r = call(o_front, "GET", "simple.cloud", "/simple", &[]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| panic!("{:?}", call(o_front, "GET", "simple.cloud", "/simple", &[])));
    assert_eq!(r.body, "tls-ok client-cert=no", "{r:?}");
    let rec = find_record(&hub, &spoke, "the SIMPLE call", |r| {
        r["telemetry"]["operation_name"] == "GET /simple" && r["telemetry"]["status_code"] == 200
    });
    let reason = rec["routing_decision"]["selection_reason"]
        .as_str()
        .unwrap_or("");
    assert!(
        reason.contains("upstream_tls=1.3 TLS13_") && reason.contains("SIMPLE sni=api.pay.test"),
        "{rec:#}"
    );

    // MUTUAL: the server requires a client certificate and gets one.
    let r = call(o_front, "GET", "mutual.cloud", "/mutual", &[]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "tls-ok client-cert=yes"),
        "{r:?}"
    );
    let rec = find_record(&hub, &spoke, "the MUTUAL call", |r| {
        r["telemetry"]["operation_name"] == "GET /mutual" && r["telemetry"]["status_code"] == 200
    });
    let reason = rec["routing_decision"]["selection_reason"]
        .as_str()
        .unwrap_or("");
    assert!(reason.contains("MUTUAL sni=api.pay.test"), "{rec:#}");

    // Refusals: 503 with the reason, and the caller's evidence says why.
    for (host, path, why) in [
        (
            "wrongca.cloud",
            "/wrongca",
            "does not chain to a CA in caCertificates",
        ),
        (
            "wrongsan.cloud",
            "/wrongsan",
            "not valid for the expected name",
        ),
        ("nocert.cloud", "/nocert", "requires a client certificate"),
    ] {
        let r = call(o_front, "GET", host, path, &[]);
        assert_eq!(r.status, 503, "{host}: {r:?}");
        assert!(r.body.contains(why), "{host}: {r:?}");
        assert!(!r.body.contains("tls-ok"), "{host}: {r:?}");
        let op = format!("GET {path}");
        let rec = find_record(&hub, &spoke, host, |r| {
            r["telemetry"]["operation_name"] == op.as_str() && r["telemetry"]["status_code"] == 503
        });
        let msg = rec["telemetry"]["status"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("TLS origination") && msg.contains(why),
            "{host}: {rec:#}"
        );
    }
}

/// TLS origination without `caCertificates` verifies the cloud server
/// against the hub's system roots (`SSL_CERT_FILE` here, as
/// `rustls-native-certs` reads it). A bundle holding no certificate makes
/// apply (and the offline validate) refuse the rule, saying no system roots
/// could be loaded; with the bundle holding one CA, a server of that CA is
/// reached with `sni` and with `subjectAltNames` (a wrong SAN is refused),
/// and a server of an unrelated CA gets 503 saying its chain does not end
/// in the system roots, also in the evidence. The roots are read once: the
/// bundle spoiled afterwards changes nothing.
#[test]
fn tls_origination_without_ca_certificates_uses_the_system_roots() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tls_pki(tmp.path());
    // `trusted` is served by the CA the bundle will hold; `unrelated` by
    // the CA of `pki.ca`, which the bundle never holds.
    let trusted = tls_server(&pki.other_server, None);
    let unrelated = tls_server(&pki.server, None);
    let bundle = tmp.path().join("system-bundle.pem");
    let bundle_s = bundle.to_str().expect("utf8").to_owned();
    let key_pem = std::fs::read(&pki.client_key).expect("key pem");
    std::fs::write(&bundle, &key_pem).expect("bundle");
    let mut hub = HubProc::init(tmp.path(), TD);
    hub.set_env(&[("SSL_CERT_FILE", Some(&bundle_s)), ("SSL_CERT_DIR", None)]);
    let hub_addr = hub.start();
    let rule = |name: &str, tls: &str| {
        format!("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: cloud}}\nspec:\n  host: {name}.cloud\n  trafficPolicy:\n    tls: {tls}\n")
    };
    let yaml = [
        STORE_SF01.to_string(),
        service_entry("sys", "cloud", "pay", trusted, "HTTP"),
        rule("sys", "{mode: SIMPLE, sni: api.pay.test}"),
        service_entry("syssan", "cloud", "pay", trusted, "HTTP"),
        rule(
            "syssan",
            "{mode: SIMPLE, sni: api.pay.test, subjectAltNames: [billing.pay.test, api.pay.test]}",
        ),
        service_entry("syswrongsan", "cloud", "pay", trusted, "HTTP"),
        rule(
            "syswrongsan",
            "{mode: SIMPLE, sni: api.pay.test, subjectAltNames: [billing.pay.test]}",
        ),
        service_entry("unrelated", "cloud", "pay", unrelated, "HTTP"),
        rule("unrelated", "{mode: SIMPLE, sni: api.pay.test}"),
        frontend_only("pay-callers", "cloud", "pay"),
    ]
    .join("\n");
    assert!(!yaml.contains("caCertificates"));
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, &yaml).expect("yaml");
    let f = f.to_str().expect("utf8");

    // No certificate in the bundle: apply and validate refuse, naming the
    // rule, the field and where the roots were looked for.
    let no_roots = format!(
        "DestinationRule cloud/sys: spec.trafficPolicy.tls.caCertificates: not set, and no system roots could be loaded from SSL_CERT_FILE={bundle_s}: no CERTIFICATE found"
    );
    let o = hub.cli(&["apply", "-f", f]);
    let t = text(&o);
    assert!(!o.status.success(), "applied without roots: {t}");
    assert!(t.contains(&no_roots), "{t}");
    let o = run(std::process::Command::new(bin("tidemesh-hub"))
        .env("SSL_CERT_FILE", &bundle_s)
        .env_remove("SSL_CERT_DIR")
        .args(["validate", "-f", f]));
    let t = text(&o);
    assert!(!o.status.success(), "validated without roots: {t}");
    assert!(t.contains(&no_roots), "{t}");

    // One CA in the bundle: loaded at this apply, and kept.
    std::fs::write(&bundle, std::fs::read(&pki.other_ca).expect("ca pem")).expect("bundle");
    let o = hub.cli(&["apply", "-f", f]);
    assert!(o.status.success(), "apply: {}", text(&o));
    std::fs::write(&bundle, &key_pem).expect("spoil the bundle");

    let o_front = free_tcp();
    let cfg = write_config(
        tmp.path(),
        "a",
        &format!("[[workload]]\nservice_account = \"frontend\"\noutbound = \"{o_front}\"\n"),
    );
    let spoke = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg, hub_addr);

    // SIMPLE against the system roots, the name from sni.
    let r = wait_for(Duration::from_secs(10), || {
        let r = call(o_front, "GET", "sys.cloud", "/sys", &[]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| panic!("{:?}", call(o_front, "GET", "sys.cloud", "/sys", &[])));
    assert_eq!(r.body, "tls-ok client-cert=no", "{r:?}");
    let rec = find_record(&hub, &spoke, "the SIMPLE call", |r| {
        r["telemetry"]["operation_name"] == "GET /sys" && r["telemetry"]["status_code"] == 200
    });
    let reason = rec["routing_decision"]["selection_reason"]
        .as_str()
        .unwrap_or("");
    assert!(
        reason.contains("upstream_tls=1.3 TLS13_") && reason.contains("SIMPLE sni=api.pay.test"),
        "{rec:#}"
    );
    // subjectAltNames: one of them matching passes, none matching is refused.
    let r = call(o_front, "GET", "syssan.cloud", "/syssan", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "tls-ok client-cert=no"));
    let r = call(o_front, "GET", "syswrongsan.cloud", "/syswrongsan", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("not valid for the expected name"), "{r:?}");

    // A server whose CA is not in the system roots: 503 with the reason,
    // naming where the roots came from, and the evidence says why.
    let why = format!(
        "does not chain to a CA in the system roots (SSL_CERT_FILE={bundle_s}, 1 root; caCertificates is not set)"
    );
    let r = call(o_front, "GET", "unrelated.cloud", "/unrelated", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains(&why), "{r:?}");
    assert!(!r.body.contains("tls-ok"), "{r:?}");
    let rec = find_record(&hub, &spoke, "the refused call", |r| {
        r["telemetry"]["operation_name"] == "GET /unrelated" && r["telemetry"]["status_code"] == 503
    });
    let msg = rec["telemetry"]["status"]["message"].as_str().unwrap_or("");
    // (the record's message is bounded: the start of the reason)
    assert!(
        msg.contains("TLS origination")
            && msg.contains("does not chain to a CA in the system roots (SSL_CERT_FILE="),
        "{rec:#}"
    );
    // The roots were read once: the spoiled bundle is not read again.
    let o = hub.cli(&["apply", "-f", f]);
    assert!(o.status.success(), "apply after the load: {}", text(&o));
    let r = call(o_front, "GET", "sys.cloud", "/sys-again", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "tls-ok client-cert=no"));
}

/// Waits until spoke `s` applied config version `v`.
fn wait_version(s: &SpokeProc, v: u64) {
    wait_for(Duration::from_secs(10), || {
        s.try_status()
            .is_some_and(|st| st["config_version"] == v)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{} never applied version {v}: {:?}", s.id, s.try_status()));
}

/// The mesh for the PeerAuthentication test: `pos` admits only frontend
/// (a `principals` rule), `till` admits any GET (a rule without a source);
/// namespace shop is PERMISSIVE, and `till` STRICT with an optional
/// port-level entry (`till_ports`: `PORT: {mode: ...}` lines).
fn peer_authn_yaml(ns_mode: &str, till_ports: &str) -> String {
    let ports = if till_ports.is_empty() {
        String::new()
    } else {
        format!("  portLevelMtls:\n{till_ports}")
    };
    format!(
        r#"{STORE_SF01}
{pos_only}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: till-reads, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: till}}}}
  action: ALLOW
  rules:
  - to:
    - operation: {{methods: ["GET"]}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: shop}}
spec:
  mtls: {{mode: {ns_mode}}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: till-strict, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: till}}}}
  mtls: {{mode: STRICT}}
{ports}"#,
        pos_only = frontend_only("pos-frontend-only", "shop", "pos"),
    )
}

#[test]
fn peer_authentication_plaintext_clients_permissive_strict_port_level_and_last_known_good() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let apply = |hub: &HubProc, yaml: &str| {
        let f = tmp.path().join("mesh.yaml");
        std::fs::write(&f, yaml).expect("yaml");
        hub.cli(&["apply", "-f", f.to_str().expect("utf8")])
    };
    let o = apply(&hub, &peer_authn_yaml("PERMISSIVE", ""));
    assert!(o.status.success(), "apply: {}", text(&o));

    // spoke A: the mesh caller frontend; spoke B: pos and till, each with a
    // plaintext listener for local clients outside the mesh
    let (pos, till) = (echo_server("pos"), echo_server("till"));
    let (o_front, p_pos, p_till) = (free_tcp(), free_tcp(), free_tcp());
    let (data_a, data_b) = (free_udp(), free_udp());
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            "data_listen = \"{data_a}\"\ndata_advertise = \"{data_a}\"\n\n[[workload]]\nservice_account = \"frontend\"\noutbound = \"{o_front}\"\n"
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "pos"
service = "pos"
namespace = "shop"
labels = {{ app = "pos" }}
inbound = "{pos}"
plaintext_inbound = "{p_pos}"

[[workload]]
service_account = "till"
service = "till"
namespace = "shop"
labels = {{ app = "till" }}
inbound = "{till}"
plaintext_inbound = "{p_till}"
"#
        ),
    );
    let a = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg_a, hub_addr);
    let mut b = start_spoke(tmp.path(), &hub, "spoke1", 1, &cfg_b, hub_addr);
    wait_site_service(&a, "pos");

    let plain = |addr, path: &str| {
        call(
            addr,
            "GET",
            "local-client",
            path,
            &[(
                "x-forwarded-client-cert",
                "By=x;URI=spiffe://forged/sa/frontend",
            )],
        )
    };
    let by_op = |s: &SpokeProc, op: &str| -> Value {
        let op = op.to_string();
        find_record(&hub, s, &op.clone(), move |r| {
            r["telemetry"]["operation_name"] == op.as_str()
        })
    };
    let reason = |r: &Value| -> String {
        r["routing_decision"]["selection_reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let assert_plaintext_identity = |r: &Value| {
        let id = &r["identity"];
        assert!(id["client_identity"].is_null(), "{r:#}");
        assert_eq!(id["tls_version"], "none", "{r:#}");
        assert_eq!(id["trust_chain_verified"], false, "{r:#}");
        assert!(id["cipher_suite"].is_null(), "{r:#}");
        assert_eq!(r["enforcement_point"], "sidecar_inbound", "{r:#}");
    };

    // 1. the mesh caller passes pos's principals rule over QUIC mTLS
    let r = wait_for(Duration::from_secs(10), || {
        let r = call(o_front, "GET", "pos.shop", "/mesh-1", &[]);
        (r.status == 200).then_some(r)
    })
    .expect("frontend reaches pos through the mesh");
    assert_eq!(r.echo()["server"], "pos");

    // 2. a plaintext client of pos (namespace PERMISSIVE) is accepted by the
    // mTLS stage, but authorized with no identity: the principals rule does
    // not match it
    let r = plain(p_pos, "/plain-pos-1");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body.contains("RBAC: access denied") && r.body.contains("an unauthenticated caller"),
        "{r:?}"
    );
    let rec = by_op(&b, "GET /plain-pos-1");
    assert_plaintext_identity(&rec);
    assert_eq!(
        rec["policy_evaluation"]["final_decision"], "DENY",
        "{rec:#}"
    );
    assert_eq!(
        rec["policy_evaluation"]["reason"], "no_allow_policy_matched",
        "{rec:#}"
    );
    assert!(
        reason(&rec).contains("plaintext_inbound no_peer_identity mtls_mode=PERMISSIVE (PeerAuthentication shop/default, namespace scope)"),
        "{rec:#}"
    );

    // 3. till: its workload policy (STRICT) wins over the namespace's
    // PERMISSIVE; the refusal says mTLS is required, and so does the record
    let r = plain(p_till, "/plain-till-1");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("mTLS required"), "{r:?}");
    assert!(r.echo().is_null(), "never delivered: {r:?}");
    let rec = by_op(&b, "GET /plain-till-1");
    assert_plaintext_identity(&rec);
    let pol = &rec["policy_evaluation"];
    assert_eq!(pol["final_decision"], "DENY", "{rec:#}");
    assert_eq!(pol["reason"], "mtls_required", "{rec:#}");
    assert_eq!(
        pol["policy_name"], "PeerAuthentication shop/till-strict",
        "{rec:#}"
    );
    assert!(
        reason(&rec)
            .contains("mtls_mode=STRICT (PeerAuthentication shop/till-strict, workload scope)"),
        "{rec:#}"
    );
    assert!(rec["routing_decision"]["selected_endpoint"].is_null());
    // the spoke's guarantee vector shows both listeners: no identity, plaintext
    let vector = |service: &str| -> Value {
        let o = run(std::process::Command::new(bin("tidemesh-spoke"))
            .args(["vector", "--json", "--service", service, "--data-dir"])
            .arg(&b.dir));
        assert!(o.status.success(), "vector {service}: {}", text(&o));
        serde_json::from_slice(&o.stdout).expect("vector json")
    };
    for (service, listener, mode, accepts) in [
        ("pos", p_pos, "PERMISSIVE", true),
        ("till", p_till, "STRICT", false),
    ] {
        let v = vector(service);
        let pt = &v["plaintext_inbound"][0];
        assert_eq!(pt["listener"], listener.to_string().as_str(), "{v:#}");
        assert_eq!(pt["mtls_mode"], mode, "{v:#}");
        assert_eq!(pt["accepts_plaintext"], accepts, "{v:#}");
        assert_eq!(pt["identity"]["level"], "none", "{v:#}");
        assert_eq!(pt["security"]["level"], "plaintext", "{v:#}");
    }
    // and the mesh caller still reaches till (a rule without a source)
    let r = call(o_front, "GET", "till.shop", "/mesh-till", &[]);
    assert_eq!(r.status, 200, "{r:?}");

    // 4. port level: an entry for another port does not act; one for till's
    // inbound port does, on the next request (no restart)
    let o = apply(
        &hub,
        &peer_authn_yaml(
            "PERMISSIVE",
            &format!("    {}: {{mode: PERMISSIVE}}\n", till.port() ^ 1),
        ),
    );
    assert!(o.status.success(), "apply: {}", text(&o));
    wait_version(&b, 2);
    let r = plain(p_till, "/plain-till-other-port");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("mTLS required"), "{r:?}");
    let o = apply(
        &hub,
        &peer_authn_yaml(
            "PERMISSIVE",
            &format!("    {}: {{mode: PERMISSIVE}}\n", till.port()),
        ),
    );
    assert!(o.status.success(), "apply: {}", text(&o));
    wait_version(&b, 3);
    let r = plain(p_till, "/plain-till-port");
    assert_eq!(
        r.status, 200,
        "the port-level PERMISSIVE admits the plaintext client: {r:?}"
    );
    assert_eq!(r.echo()["server"], "till");
    // the workload sees no identity, whatever the client claimed
    assert_eq!(r.upstream_header("x-forwarded-client-cert"), None, "{r:?}");
    let rec = by_op(&b, "GET /plain-till-port");
    assert_plaintext_identity(&rec);
    assert_eq!(
        rec["policy_evaluation"]["final_decision"], "ALLOW",
        "{rec:#}"
    );
    assert_eq!(rec["policy_evaluation"]["policy_name"], "shop/till-reads");
    assert!(
        reason(&rec)
            .contains("mtls_mode=PERMISSIVE (PeerAuthentication shop/till-strict, port scope)"),
        "{rec:#}"
    );
    assert_eq!(
        rec["routing_decision"]["selected_endpoint"],
        till.to_string().as_str()
    );

    // 5. DISABLE for the namespace: plaintext still reaches the RBAC stage
    // (and is still refused by the principals rule); the mesh caller keeps
    // its verified identity over the tunnel
    let o = apply(
        &hub,
        &peer_authn_yaml(
            "DISABLE",
            &format!("    {}: {{mode: PERMISSIVE}}\n", till.port()),
        ),
    );
    assert!(o.status.success(), "apply: {}", text(&o));
    wait_version(&b, 4);
    let r = plain(p_pos, "/plain-pos-disable");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("RBAC: access denied"), "{r:?}");
    let rec = by_op(&b, "GET /plain-pos-disable");
    assert_plaintext_identity(&rec);
    assert!(
        reason(&rec)
            .contains("mtls_mode=DISABLE (PeerAuthentication shop/default, namespace scope)"),
        "{rec:#}"
    );
    assert_eq!(
        rec["policy_evaluation"]["reason"],
        "no_allow_policy_matched"
    );
    let r = call(o_front, "GET", "pos.shop", "/mesh-disable", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let rec = by_op(&b, "GET /mesh-disable");
    assert_eq!(
        rec["identity"]["client_identity"],
        format!("spiffe://{TD}/store/sf01/sa/frontend").as_str()
    );
    assert_eq!(rec["identity"]["tls_version"], "1.3");

    // 6. last-known-good: with the hub gone, a restarted spoke B applies
    // the saved modes (till's port-level PERMISSIVE, pos's DISABLE)
    hub.stop();
    b.kill();
    b.start();
    let st = b.status();
    assert_eq!(st["connected"], false, "{st}");
    assert_eq!(st["config_version"], 4, "{st}");
    // the admin socket answers before the workload listeners are bound
    wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(p_till).ok().map(|_| ())
    })
    .expect("spoke B's plaintext listener back after the restart");
    let r = plain(p_till, "/plain-till-lkg");
    assert_eq!(r.status, 200, "from the last-known-good: {r:?}");
    assert_eq!(r.echo()["server"], "till");
    let r = plain(p_pos, "/plain-pos-lkg");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("RBAC: access denied"), "{r:?}");
}

/// base64url without padding (JWT spelling).
fn b64url(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..=c.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A JWT signer for the tests: ES256 (P-256) or EdDSA (Ed25519), keys made
/// here with ring.
enum JwtKey {
    Es(ring::signature::EcdsaKeyPair),
    Ed(ring::signature::Ed25519KeyPair),
}

impl JwtKey {
    fn es256() -> JwtKey {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pk = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("p-256 key");
        JwtKey::Es(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng)
                .expect("p-256 key"),
        )
    }

    fn ed25519() -> JwtKey {
        let pk = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("ed25519 key");
        JwtKey::Ed(ring::signature::Ed25519KeyPair::from_pkcs8(pk.as_ref()).expect("ed25519 key"))
    }

    fn jwks(&self, kid: &str) -> String {
        use ring::signature::KeyPair;
        let k = match self {
            JwtKey::Es(k) => {
                let p = k.public_key().as_ref();
                serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64url(&p[1..33]), "y": b64url(&p[33..65])})
            }
            JwtKey::Ed(k) => {
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64url(k.public_key().as_ref())})
            }
        };
        serde_json::json!({ "keys": [k] }).to_string()
    }

    fn sign(&self, kid: &str, claims: &Value) -> String {
        let alg = match self {
            JwtKey::Es(_) => "ES256",
            JwtKey::Ed(_) => "EdDSA",
        };
        let header = serde_json::json!({"alg": alg, "kid": kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = match self {
            JwtKey::Es(k) => k
                .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
                .expect("signs")
                .as_ref()
                .to_vec(),
            JwtKey::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", b64url(&sig))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RequestAuthentication end to end (real hub and spoke processes): a
/// valid JWT passes a `requestPrincipals` rule and a claims condition and
/// the workload receives the configured claim headers (never the caller's
/// own values of them) without the token; no token is a 403 (no request
/// principal); expired, wrongly signed, `alg: none` and unknown-issuer
/// tokens are 401 with the reason, in evidence too; the evidence marks the
/// user as a claim verified by JWT next to the caller's mTLS/SPIFFE
/// identity; the key set from a file on the hub travels in the snapshot,
/// with its age in status and the vector; with the hub killed and the
/// spoke restarted from its last-known-good config, tokens still verify.
#[test]
fn request_authentication_jwt_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let es = JwtKey::es256();
    let ed = JwtKey::ed25519();
    let jwks_file = tmp.path().join("idp-jwks.json");
    std::fs::write(&jwks_file, es.jwks("store-key-1")).expect("jwks file");
    let iss = "https://idp.store.test";
    let iss2 = "https://kiosk-idp.store.test";
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let yaml = format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: pos-jwt, namespace: store}}
spec:
  selector: {{matchLabels: {{app: pos}}}}
  jwtRules:
  - issuer: {iss}
    audiences: [pos]
    jwksUri: file://{jwks}
    outputClaimToHeaders:
    - {{header: x-user, claim: sub}}
    - {{header: x-role, claim: role}}
  - issuer: {iss2}
    jwks: '{inline}'
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: pos-cashiers, namespace: store}}
spec:
  selector: {{matchLabels: {{app: pos}}}}
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/frontend"]
        requestPrincipals: ["{iss}/*", "{iss2}/*"]
    when:
    - key: request.auth.claims[role]
      values: [cashier, manager]
"#,
        jwks = jwks_file.display(),
        inline = ed.jwks("kiosk-1"),
    );
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, &yaml).expect("yaml");
    // an http jwksUri is refused at apply, saying why
    let bad = yaml.replace(
        &format!("file://{}", jwks_file.display()),
        "https://idp.store.test/jwks",
    );
    let fb = tmp.path().join("bad.yaml");
    std::fs::write(&fb, bad).expect("yaml");
    let o = hub.cli(&["apply", "-f", fb.to_str().expect("utf8")]);
    assert!(!o.status.success(), "an http jwksUri was applied");
    assert!(
        text(&o).contains("does not fetch key sets over the network"),
        "{}",
        text(&o)
    );
    // so is a key set file the hub cannot read
    let missing = tmp.path().join("missing-jwks.json");
    let bad = yaml.replace(
        &jwks_file.display().to_string(),
        &missing.display().to_string(),
    );
    std::fs::write(&fb, bad).expect("yaml");
    let o = hub.cli(&["apply", "-f", fb.to_str().expect("utf8")]);
    assert!(!o.status.success(), "a missing key set file was applied");
    assert!(
        text(&o)
            .contains("RequestAuthentication store/pos-jwt: spec.jwtRules[0].jwksUri: cannot read"),
        "{}",
        text(&o)
    );
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    let pos = echo_server("pos");
    let o_front = free_tcp();
    let cfg = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"[[workload]]
service_account = "frontend"
outbound = "{o_front}"

[[workload]]
service_account = "pos"
service = "pos"
namespace = "store"
labels = {{ app = "pos" }}
inbound = "{pos}"
health = "/healthz"
"#
        ),
    );
    let mut spoke = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg, hub_addr);

    let now = unix_now();
    let claims = |sub: &str, role: &str, exp: u64| serde_json::json!({"iss": iss, "sub": sub, "aud": "pos", "role": role, "exp": exp, "iat": now});
    let good = es.sign("store-key-1", &claims("alice", "cashier", now + 600));
    let bearer = |t: &str| format!("Bearer {t}");
    let pos_call = |token: Option<&str>, path: &str, extra: &[(&str, &str)]| {
        let auth = token.map(bearer);
        let mut h: Vec<(&str, &str)> = extra.to_vec();
        if let Some(a) = &auth {
            h.push(("authorization", a.as_str()));
        }
        call(o_front, "GET", "pos.store", path, &h)
    };

    // valid: requestPrincipals and the role claim match; the workload gets
    // the claim headers (the caller's own x-user is replaced), not the token
    let r = wait_for(Duration::from_secs(10), || {
        let r = pos_call(Some(&good), "/sale", &[("x-user", "mallory")]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| panic!("{:?}", pos_call(Some(&good), "/sale", &[])));
    assert_eq!(r.echo()["server"], "pos");
    assert_eq!(
        r.upstream_header("x-user").as_deref(),
        Some("alice"),
        "{r:?}"
    );
    assert_eq!(
        r.upstream_header("x-role").as_deref(),
        Some("cashier"),
        "{r:?}"
    );
    assert_eq!(
        r.upstream_header("authorization"),
        None,
        "token forwarded: {r:?}"
    );
    let rec = find_record(&hub, &spoke, "the JWT call", |r| {
        r["telemetry"]["operation_name"] == "GET /sale" && r["telemetry"]["status_code"] == 200
    });
    let u = &rec["user_identity"];
    assert_eq!(u["kind"], "claim", "{rec:#}");
    assert_eq!(u["verified_by"], "jwt", "{rec:#}");
    assert_eq!(u["issuer"], iss, "{rec:#}");
    assert_eq!(u["subject"], "alice", "{rec:#}");
    assert_eq!(u["algorithm"], "ES256", "{rec:#}");
    assert_eq!(u["key_id"], "store-key-1", "{rec:#}");
    assert_eq!(u["policy"], "store/pos-jwt", "{rec:#}");
    assert!(u["jwks_age_s"].is_u64(), "{rec:#}");
    // the service identity stays the caller's SPIFFE ID
    assert_eq!(
        rec["identity"]["client_identity"],
        format!("spiffe://{TD}/store/sf01/sa/frontend"),
        "{rec:#}"
    );

    // the second issuer (EdDSA, inline key set) forwards its token
    let kiosk = ed.sign(
        "kiosk-1",
        &serde_json::json!({"iss": iss2, "sub": "till-7", "role": "manager", "exp": now + 600}),
    );
    let r = pos_call(Some(&kiosk), "/kiosk", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.upstream_header("authorization"),
        Some(bearer(&kiosk)),
        "forwardOriginalToken: {r:?}"
    );
    assert_eq!(r.upstream_header("x-user"), None, "{r:?}");

    // no token: authentication passes without a request principal, and
    // the requestPrincipals rule does not match: 403; a caller cannot
    // make up the claim headers either
    let r = pos_call(None, "/anon", &[("x-user", "alice"), ("x-role", "cashier")]);
    assert_eq!(r.status, 403, "{r:?}");
    // tokens are read from headers only: a query parameter is not a token
    let r = pos_call(None, "/anon?access_token=not.a.token", &[]);
    assert_eq!(r.status, 403, "{r:?}");
    // clock skew: a token that expired 20 s ago is within the spoke's
    // leeway (60 s), one that expired an hour ago is not (below)
    let skewed = es.sign("store-key-1", &claims("alice", "cashier", now - 20));
    let r = pos_call(Some(&skewed), "/skew", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    // a valid token whose role claim does not match: 403
    let clerk = es.sign("store-key-1", &claims("bob", "clerk", now + 600));
    let r = pos_call(Some(&clerk), "/clerk", &[]);
    assert_eq!(r.status, 403, "{r:?}");

    // invalid tokens: 401 with the reason
    let none_token = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none"}"#),
        b64url(claims("alice", "cashier", now + 600).to_string().as_bytes())
    );
    let unknown_issuer = es.sign(
        "store-key-1",
        &serde_json::json!({"iss": "https://evil.test", "sub": "alice", "aud": "pos", "role": "cashier", "exp": now + 600}),
    );
    let cases = [
        (
            es.sign("store-key-1", &claims("alice", "cashier", now - 3600)),
            "/expired",
            "expired",
        ),
        (
            JwtKey::es256().sign("store-key-1", &claims("alice", "cashier", now + 600)),
            "/forged",
            "signature does not verify",
        ),
        (none_token, "/none", "alg none"),
        (unknown_issuer, "/evil", "is not accepted here"),
        (
            es.sign("other-kid", &claims("alice", "cashier", now + 600)),
            "/kid",
            "no key of the key set",
        ),
    ];
    for (token, path, why) in &cases {
        let r = pos_call(Some(token), path, &[]);
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert!(r.body.contains(why), "{path}: {r:?}");
        assert!(r.body.contains("Jwt verification fails"), "{path}: {r:?}");
    }
    let op = "GET /expired";
    let rec = find_record(&hub, &spoke, "the expired token", |r| {
        r["telemetry"]["operation_name"] == op && r["telemetry"]["status_code"] == 401
    });
    let pe = &rec["policy_evaluation"];
    assert_eq!(pe["final_decision"], "DENY", "{rec:#}");
    assert!(
        pe["policy_name"]
            .as_str()
            .unwrap_or("")
            .contains("store/pos-jwt"),
        "{rec:#}"
    );
    assert!(
        pe["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("jwt_invalid: the token expired"),
        "{rec:#}"
    );
    assert!(rec["user_identity"].is_null(), "{rec:#}");

    // status: the key sets in force and their age; the vector: the user is
    // a JWT claim while the services are SPIFFE identities
    let st = spoke.status();
    let ra = st["request_authentication"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(ra.len(), 2, "{st:#}");
    assert_eq!(
        ra[0]["jwks"],
        format!("file://{}", jwks_file.display()),
        "{st:#}"
    );
    assert_eq!(ra[0]["keys"], 1, "{st:#}");
    assert!(
        ra[0]["jwks_age_s"].as_u64().is_some_and(|a| a < 300),
        "{st:#}"
    );
    assert_eq!(ra[1]["jwks"], "inline", "{st:#}");
    let o = run(std::process::Command::new(bin("tidemesh-spoke"))
        .args(["vector", "--json", "--service", "pos.store", "--data-dir"])
        .arg(&spoke.dir));
    assert!(o.status.success(), "vector: {}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("vector json");
    let id = &v["dimensions"]["identity"];
    assert_eq!(id["level"], "spiffe", "{v:#}");
    assert_eq!(id["user_level"], "jwt_claim", "{v:#}");
    assert_eq!(id["evidence"]["user"]["verified_by"], "jwt", "{v:#}");
    assert!(
        id["evidence"]["user"]["key_sets"][0]["jwks_age_s"].is_u64(),
        "{v:#}"
    );

    // the hub goes away, and the spoke restarts from its last-known-good
    // config: the key set is in the snapshot, so tokens still verify
    std::fs::remove_file(&jwks_file).expect("the hub's file is gone too");
    hub.kill();
    spoke.kill();
    spoke.start();
    spoke
        .wait_configured(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no last-known-good config: {:?}", spoke.try_status()));
    assert_ne!(spoke.status()["state"], "connected");
    let r = wait_for(Duration::from_secs(10), || {
        let r = pos_call(Some(&good), "/offline", &[]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|| panic!("offline: {:?}", pos_call(Some(&good), "/offline", &[])));
    assert_eq!(
        r.upstream_header("x-user").as_deref(),
        Some("alice"),
        "{r:?}"
    );
    let r = pos_call(Some(&cases[0].0), "/offline-expired", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    let r = pos_call(Some(&cases[1].0), "/offline-forged", &[]);
    assert_eq!(r.status, 401, "{r:?}");
}

/// Nanoseconds since the epoch, now.
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One cross-spoke call the OTLP test made: the trace it carried, the
/// span the app named as parent (if it sent one), the span id the upstream
/// saw, and when it was made.
#[derive(Debug)]
struct Traced {
    trace: String,
    app_span: Option<String>,
    upstream_span: String,
    before: u64,
    after: u64,
    offline: bool,
}

/// The hub exports a span per sampled request record over OTLP/HTTP
/// protobuf, decoded by the official definitions (Python's
/// `opentelemetry-proto`): each cross-spoke request is one trace of two
/// spans, spoke A's CLIENT span (child of the app's span) and spoke B's
/// SERVER span (child of A's, and the parent the upstream app saw), with
/// the resource naming service, spoke and store. Requests made while both
/// spokes were cut off from the hub arrive only after the heal, with the
/// time they happened. A request the app marked unsampled is recorded at
/// both spokes (as unsampled) and exported by neither; a new trace is
/// sampled as its mode says.
#[test]
fn otlp_export_one_trace_per_request_across_spokes_through_a_hub_outage() {
    if OtlpReceiver::available().is_none() {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let receiver = OtlpReceiver::start(&tmp.path().join("otlp"));
    let metrics = free_tcp();
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--metrics",
        &metrics.to_string(),
    ]);
    let hub_addr = hub.start();
    eprintln!("hub up {:?} into the test", started.elapsed());
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, mesh_yaml()).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    let payments = echo_server("payment-service");
    let o_front = free_tcp();
    let (data_a, data_b) = (free_udp(), free_udp());
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"data_listen = "{data_a}"
data_advertise = "{data_a}"

[[workload]]
service_account = "frontend"
service = "frontend"
labels = {{ app = "frontend" }}
outbound = "{o_front}"
"#
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"

[[workload]]
service_account = "payments"
service = "payment-service"
namespace = "payments"
labels = {{ app = "payment-service", version = "v1" }}
inbound = "{payments}"
health = "/healthz"
"#
        ),
    );
    let mut spokes = Vec::new();
    let mut relays = Vec::new();
    for (i, cfg) in [cfg_a, cfg_b].iter().enumerate() {
        let relay = RelayProc::start(
            &tmp.path().join("relays"),
            &format!("r{i}"),
            hub_addr,
            71 + i as u64,
        );
        spokes.push(start_spoke(
            tmp.path(),
            &hub,
            &format!("spoke{i}"),
            i,
            cfg,
            relay.addr,
        ));
        relays.push(relay);
    }
    let (a, b) = (&spokes[0], &spokes[1]);
    wait_site_service(a, "payment-service");
    eprintln!("spokes up {:?} into the test", started.elapsed());

    // One charge: `flags` "01" / "00" names an app span (sampled or not),
    // `None` sends no trace context (a new trace at spoke A).
    let mut n = 0u32;
    let mut charge = |flags: Option<&str>, offline: bool| -> Traced {
        n += 1;
        let trace = format!("{:08x}{:024x}", 0x07e1_0000 + n, u64::from(n) * 7919);
        let app_span = format!("{:016x}", 0xa0_0000 + u64::from(n));
        let tp = flags.map(|f| format!("00-{trace}-{app_span}-{f}"));
        let mut headers = vec![("x-api-version", "v1")];
        if let Some(tp) = &tp {
            headers.push(("traceparent", tp.as_str()));
        }
        // once: a second try would be a second request of the same trace
        let before = unix_nanos();
        let r = call(
            o_front,
            "POST",
            "payment-service.payments",
            "/api/charge",
            &headers,
        );
        let after = unix_nanos();
        assert_eq!(r.status, 200, "charge {n}: {r:?}");
        let up = r
            .upstream_header("traceparent")
            .expect("traceparent upstream");
        if flags.is_some() {
            assert_eq!(trace_id(&up), trace, "{up}");
        }
        Traced {
            trace: trace_id(&up).to_owned(),
            app_span: flags.map(|_| app_span),
            upstream_span: span_id(&up).to_owned(),
            before,
            after,
            offline,
        }
    };

    // B may take a moment to receive the policy with its slice
    wait_for(Duration::from_secs(10), || {
        let r = call(
            o_front,
            "POST",
            "payment-service.payments",
            "/api/charge",
            &[("x-api-version", "v1")],
        );
        (r.status == 200).then_some(())
    })
    .expect("the charge is allowed");
    // connected: three sampled app traces, one new trace, one unsampled
    let mut sampled: Vec<Traced> = (0..3).map(|_| charge(Some("01"), false)).collect();
    sampled.push(charge(None, false));
    let unsampled_online = charge(Some("00"), false);

    // the hub out of reach of both spokes; same-site calls go on
    for r in &relays {
        r.blackout(None);
    }
    wait_for(Duration::from_secs(30), || {
        [a, b]
            .iter()
            .all(|s| {
                s.try_status()
                    .is_some_and(|st| st["state"] == "disconnected")
            })
            .then_some(())
    })
    .expect("both spokes notice the hub blackout");
    eprintln!(
        "both spokes disconnected {:?} into the test",
        started.elapsed()
    );
    let offline: Vec<Traced> = (0..3).map(|_| charge(Some("01"), true)).collect();
    let unsampled_offline = charge(Some("00"), true);
    let new_offline = charge(None, true);
    // nothing of the outage has reached the hub, hence the collector
    std::thread::sleep(Duration::from_secs(2));
    let seen: Vec<Value> = receiver.spans();
    for t in &offline {
        assert!(
            !seen.iter().any(|s| s["trace_id"] == t.trace.as_str()),
            "a span of {} arrived during the blackout",
            t.trace
        );
    }
    let heal = unix_nanos();
    for r in &relays {
        r.heal();
    }
    let healed = Instant::now();
    eprintln!("healed {:?} into the test", started.elapsed());
    sampled.extend(offline);

    // every sampled request: one trace of exactly two spans, A -> B -> app
    let by_trace = |trace: &str| -> Vec<Value> {
        receiver
            .spans()
            .into_iter()
            .filter(|s| s["trace_id"] == trace)
            .collect()
    };
    let all_arrived = wait_for(Duration::from_secs(120), || {
        sampled
            .iter()
            .all(|t| by_trace(&t.trace).len() >= 2)
            .then_some(())
    });
    assert!(
        all_arrived.is_some(),
        "spans missing: {:#?}\nreceived: {:#?}\nhub log: {}",
        sampled
            .iter()
            .filter(|t| by_trace(&t.trace).len() < 2)
            .collect::<Vec<_>>(),
        receiver.lines(),
        hub.log()
    );
    eprintln!(
        "every sampled request's spans at the receiver {:?} after the heal",
        healed.elapsed()
    );
    // a moment for any duplicate to show up
    std::thread::sleep(Duration::from_secs(2));
    let lines = receiver.lines();
    assert!(
        lines.iter().all(|l| l.get("error").is_none()),
        "the receiver could not decode a request: {lines:#?}"
    );
    let resource = |s: &Value, k: &str| s["resource"][k].as_str().unwrap_or("").to_owned();
    for t in &sampled {
        let spans = by_trace(&t.trace);
        assert_eq!(spans.len(), 2, "one span per hop, once each: {spans:#?}");
        let client = spans
            .iter()
            .find(|s| s["kind"] == "SPAN_KIND_CLIENT")
            .unwrap_or_else(|| panic!("no client span: {spans:#?}"));
        let server = spans
            .iter()
            .find(|s| s["kind"] == "SPAN_KIND_SERVER")
            .unwrap_or_else(|| panic!("no server span: {spans:#?}"));
        // A's outbound span: child of the app's span (or the root)
        assert_eq!(resource(client, "tidemesh.spoke"), a.id, "{client}");
        assert_eq!(resource(client, "tidemesh.store"), "sf01");
        assert_eq!(resource(client, "service.name"), "frontend");
        assert_eq!(
            client["parent_span_id"].as_str(),
            Some(t.app_span.as_deref().unwrap_or("")),
            "{client}"
        );
        assert_eq!(client["name"], "POST /api/charge");
        assert_eq!(
            client["attributes"]["peer.service"],
            "payment-service.payments"
        );
        assert_eq!(client["attributes"]["http.response.status_code"], 200);
        assert_eq!(client["status_code"], "STATUS_CODE_OK");
        // B's inbound span: child of A's, and the parent the app saw
        assert_eq!(resource(server, "tidemesh.spoke"), b.id, "{server}");
        assert_eq!(resource(server, "tidemesh.store"), "sf01");
        assert_eq!(resource(server, "service.name"), "payment-service.payments");
        assert_eq!(server["parent_span_id"], client["span_id"], "{spans:#?}");
        assert_eq!(server["span_id"].as_str(), Some(t.upstream_span.as_str()));
        assert_eq!(
            server["attributes"]["tidemesh.source.principal"],
            format!("spiffe://{TD}/store/sf01/sa/frontend").as_str()
        );
        // the time it happened (by the spoke's trusted clock, which may
        // stand a few milliseconds off this host's)
        const SLACK: u64 = 500_000_000;
        for s in [client, server] {
            let start = s["start_time_unix_nano"].as_u64().expect("start");
            let end = s["end_time_unix_nano"].as_u64().expect("end");
            assert!(
                start + SLACK >= t.before && start <= t.after + SLACK && end >= start,
                "span time {start}..{end} outside the call {}..{}: {s}",
                t.before,
                t.after
            );
            if t.offline {
                assert!(start < heal, "an outage span after the heal: {s}");
                assert!(s["attributes"]["tidemesh.mode"].is_string(), "{s}");
            }
        }
    }
    // one trace per request
    let mut traces: Vec<&str> = sampled.iter().map(|t| t.trace.as_str()).collect();
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), sampled.len());

    // unsampled: recorded at both spokes, marked so, exported by neither
    for t in [&unsampled_online, &unsampled_offline] {
        assert!(
            by_trace(&t.trace).is_empty(),
            "unsampled {} exported",
            t.trace
        );
        for s in [a, b] {
            let rec = find_record(&hub, s, "the unsampled charge", |r| {
                r["telemetry"]["trace_id"] == t.trace.as_str()
            });
            assert_eq!(rec["trace_sampled"], false, "{rec}");
        }
    }
    // a new trace during the outage: sampled as A's mode for the service says
    let rec = find_record(&hub, a, "the new trace of the outage", |r| {
        r["telemetry"]["trace_id"] == new_offline.trace.as_str()
    });
    let exported = by_trace(&new_offline.trace).len();
    let drawn = rec["trace_sampled"].as_bool().expect("trace_sampled");
    // exported exactly when the spoke's draw sampled it
    assert_eq!(exported, if drawn { 2 } else { 0 }, "{rec}");
    match rec["mode"].as_str() {
        // Survival samples nothing; Target and Recovery everything
        Some("survival") => assert!(!drawn, "{rec}"),
        Some("target") | Some("recovery") => assert!(drawn, "{rec}"),
        // Degraded draws its 10 %: either way, as long as export follows it
        Some("degraded") => {}
        other => panic!("a record in an unknown mode {other:?}: {rec}"),
    }
    eprintln!(
        "OTLP: {} sampled requests (3 made offline) as {} spans; new trace during the outage in mode {} exported {exported} spans",
        sampled.len(),
        sampled.len() * 2,
        rec["mode"]
    );
    let page = scrape(metrics);
    let spans = metric(&page, "tidemesh_hub_otlp_spans_exported_total").expect("exported metric");
    assert!(spans >= (sampled.len() * 2) as f64, "{spans}");
    assert_eq!(
        metric(&page, "tidemesh_hub_otlp_spans_dropped_total"),
        Some(0.0)
    );
    assert!(metric(&page, "tidemesh_hub_otlp_export_failures_total").is_some());
    assert!(metric(&page, "tidemesh_hub_otlp_queue_spans").is_some());
}

/// One HTTP/1.1 GET over the data tunnel of the spoke at `addr` (node ID
/// `server`), made the way any mTLS client holding a workload SVID makes
/// it: QUIC with ALPN `tidemesh-data/1`, the SVID's chain and key as the
/// client certificate, the server checked against `bundle` and its node
/// ID, a stream header naming the service and workload, then the request.
/// Returns the whole answer (head and body).
async fn tunnel_get(
    addr: SocketAddr,
    server: tidemesh_identity::SpiffeId,
    bundle: tidemesh_identity::TrustBundle,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: &tidemesh_identity::KeyPair,
    (service, workload, host): (&str, &str, &str),
) -> Result<String, String> {
    let tls = tidemesh_identity::verify::client_config(
        bundle,
        chain,
        key,
        std::sync::Arc::new(tidemesh_identity::verify::ExactId(server)),
        std::sync::Arc::new(tidemesh_identity::clock::SystemClock),
        &[tidemesh_proto::ALPN_DATA],
    )
    .map_err(|e| e.to_string())?;
    let cfg = tidemesh_net::QuicSettings::default()
        .client_config(tls)
        .map_err(|e| e.to_string())?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let ep = tidemesh_net::quic::endpoint(
        tidemesh_net::quic::wrap_socket(sock).map_err(|e| e.to_string())?,
        None,
    )
    .map_err(|e| e.to_string())?;
    let header = tidemesh_proto::data::StreamHeader {
        service: service.into(),
        workload: workload.into(),
        protocol: tidemesh_proto::data::StreamProtocol::Http1,
        trace: None,
        request_id: None,
    };
    let req = format!(
        "GET /items HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    let exchange = async {
        let conn = ep
            .connect_with(cfg, addr, "data.test")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&header.encode().map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // the send side stays open: the serving end's HTTP/1.1 server
        // takes a half-closed stream for a caller gone; `Connection:
        // close` ends the answer
        let answer = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        Ok::<_, String>(String::from_utf8_lossy(&answer).to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// A raw gRPC call to a Workload API socket with hyper's HTTP/2 client
/// (no SPIFFE library: they all add the security header): the
/// `grpc-status` the server answered with.
async fn workload_api_raw(sock: &Path, rpc: &str, security_header: bool) -> Option<String> {
    let stream = tokio::net::UnixStream::connect(sock).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    let mut req = hyper::Request::post(format!("http://localhost/SpiffeWorkloadAPI/{rpc}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if security_header {
        req = req.header("workload.spiffe.io", "true");
    }
    let body = http_body_util::Full::new(grpc_frame(&[]));
    let resp = send.send_request(req.body(body).ok()?).await.ok()?;
    if let Some(s) = resp.headers().get("grpc-status") {
        return s.to_str().ok().map(str::to_owned);
    }
    use http_body_util::BodyExt;
    let collected = resp.into_body().collect().await.ok()?;
    collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|s| s.to_str().ok())
        .map(str::to_owned)
}

/// The next message of a Workload API X.509 context stream, within 20 s.
async fn next_context<S>(stream: &mut S, what: &str) -> spiffe::X509Context
where
    S: tokio_stream::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + Unpin,
{
    use tokio_stream::StreamExt;
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 20 s"))
        .unwrap_or_else(|| panic!("the stream ended before the {what}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Issue 19's must-show: an app built on a real SPIFFE client library (the
/// `spiffe` crate) gets its X.509-SVID from spoke A's Workload API, sees
/// it rotate (workload TTL 6 s, renewed at half life) on the same stream,
/// and calls spoke B over mTLS with the rotated SVID; B authorizes it by
/// the AuthorizationPolicy's principal. Callers that do not match a
/// workload's selectors are refused with PermissionDenied (another
/// executable, another uid, a spoke whose selectors name another uid), a
/// request without the security header gets InvalidArgument, the JWT
/// profile Unimplemented, and the node key is never returned.
#[test]
fn workload_api_gives_a_spiffe_client_its_rotating_svid_for_mtls_a_peer_spoke_authorizes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().expect("tempdir");
    // another uid must reach the sockets below (the setpriv caller)
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&["--workload-ttl", "6s"]);
    let hub_addr = hub.start();
    let yaml = format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: inventory-readers, namespace: store}}
spec:
  selector:
    matchLabels: {{app: inventory}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/pos"]
    to:
    - operation:
        methods: ["GET"]
"#
    );
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, yaml).expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    let uid = std::fs::metadata("/proc/self").expect("/proc").uid();
    let exe = std::env::current_exe().expect("the test's executable");
    // the spoke creates the parent directories
    let sock_a = tmp.path().join("run-a/tidemesh/workload.sock");
    let sock_b = tmp.path().join("run-b/workload.sock");
    let inventory = echo_server("inventory");
    let data_b = free_udp();
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"workload_api = "unix://{}"

[[workload]]
service_account = "pos"
selectors = ["unix:uid:{uid}", "unix:path:{}"]

[[workload]]
service_account = "kiosk"
selectors = ["unix:uid:{uid}", "systemd:unit:kiosk-test-never.service"]

[[workload]]
service_account = "batch"
"#,
            sock_a.display(),
            exe.display()
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{data_b}"
workload_api = "unix://{}"
workload_api_mode = "0600"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{inventory}"
selectors = ["unix:uid:{}"]
"#,
            sock_b.display(),
            uid.wrapping_add(4242)
        ),
    );
    let a = start_spoke(tmp.path(), &hub, "a", 1, &cfg_a, hub_addr);
    let b = start_spoke(tmp.path(), &hub, "b", 2, &cfg_b, hub_addr);
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&sock_a).expect("A's socket"), 0o666);
    assert_eq!(mode(&sock_b).expect("B's socket"), 0o600);
    let url_a = format!("unix://{}", sock_a.display());
    let url_b = format!("unix://{}", sock_b.display());
    let pos_id = format!("spiffe://{TD}/store/sf01/sa/pos");
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let creds_a = tidemesh_spoke::CredStore::new(&a.dir);
    let node_a = creds_a.node().expect("A's node SVID");
    let node_key = node_a.key.serialize_der();
    let mut node_certs = vec![node_a.chain[0].to_vec()];
    if let Some(s) = creds_a.serving().expect("serving") {
        assert_eq!(s.key.serialize_der(), node_key);
        node_certs.push(s.chain[0].to_vec());
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&url_a)
            .await
            .expect("connect to A's Workload API");
        let mut contexts = client
            .stream_x509_contexts()
            .await
            .expect("FetchX509SVID stream");
        let first = next_context(&mut contexts, "first SVID").await;
        // only the workload whose selectors this process all matches: not
        // kiosk (its unit), not batch (no selectors)
        let ids: Vec<String> = first
            .svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        assert_eq!(ids, [pos_id.as_str()]);
        let s1 = first.default_svid().expect("a default SVID").clone();
        // the workload's own key, the one on the spoke's disk; never the node's
        let pos_key = creds_a
            .workload("pos")
            .expect("read")
            .expect("pos SVID on disk")
            .key
            .serialize_der();
        assert_eq!(s1.private_key().as_ref(), pos_key.as_slice());
        assert_ne!(s1.private_key().as_ref(), node_key.as_slice());
        for c in s1.cert_chain() {
            assert!(
                !node_certs.iter().any(|n| n.as_slice() == c.as_ref()),
                "a node certificate was served"
            );
        }
        let bundle = first.bundle_set().get(&spiffe::TrustDomain::new(TD).expect("td"));
        let roots: Vec<rustls::pki_types::CertificateDer<'static>> = bundle
            .expect("the trust domain's bundle")
            .authorities()
            .iter()
            .map(|c| c.as_ref().to_vec().into())
            .collect();
        assert_eq!(
            roots,
            creds_a.bundle(&td).expect("A's bundle").roots(),
            "the bundle the spoke's verifiers use"
        );

        // FetchX509Bundles: the same bundle, to the same attested caller
        let set = client.fetch_x509_bundles().await.expect("FetchX509Bundles");
        let only: Vec<Vec<u8>> = set
            .get(&spiffe::TrustDomain::new(TD).expect("td"))
            .expect("the trust domain's bundle")
            .authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect();
        assert_eq!(set.len(), 1, "one trust domain, no federation");
        let root_bytes: Vec<Vec<u8>> = roots.iter().map(|c| c.to_vec()).collect();
        assert_eq!(only, root_bytes);

        // rotation: the same stream brings the renewed SVID
        let t0 = Instant::now();
        let second = next_context(&mut contexts, "rotated SVID").await;
        let rotated_in = t0.elapsed();
        let s2 = second.default_svid().expect("a default SVID").clone();
        assert_eq!(s2.spiffe_id().to_string(), pos_id);
        assert_ne!(s2.leaf().as_ref(), s1.leaf().as_ref(), "a new certificate");
        let not_after = |c: &spiffe::Certificate| {
            tidemesh_identity::svid::cert_validity(c.as_ref())
                .expect("validity")
                .1
        };
        assert!(not_after(s2.leaf()) > not_after(s1.leaf()));
        eprintln!(
            "rotated SVID pushed {rotated_in:?} after the first (workload TTL 6 s, renewed at half life)"
        );

        // mTLS with the rotated SVID to spoke B, which authorizes the
        // principal by the policy and delivers to its workload
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> = s2
            .cert_chain()
            .iter()
            .map(|c| c.as_ref().to_vec().into())
            .collect();
        let key = tidemesh_identity::KeyPair::try_from(s2.private_key().as_ref())
            .expect("the served key loads");
        let node_b: tidemesh_identity::SpiffeId = b.id.parse().expect("id");
        let bundle = tidemesh_identity::TrustBundle::new(td.clone(), roots);
        let answer = tunnel_get(
            data_b,
            node_b,
            bundle,
            chain,
            &key,
            ("inventory.store", "inventory", "inventory"),
        )
        .await
        .expect("mTLS call to spoke B");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"server\":\"inventory\""), "{answer}");
        assert!(
            answer.contains(&format!("URI={pos_id}")),
            "the workload sees the caller's SPIFFE ID: {answer}"
        );

        // spoke B's API: its workload's selector names another uid
        let client_b = spiffe::WorkloadApiClient::connect_to(&url_b)
            .await
            .expect("connect to B's Workload API");
        match client_b.fetch_x509_svid().await {
            Err(spiffe::WorkloadApiError::NoIdentityIssued) => {}
            other => panic!("B's API should refuse this caller: {other:?}"),
        }
        // the protocol's own rules, on the wire
        assert_eq!(
            workload_api_raw(&sock_a, "FetchX509SVID", false).await.as_deref(),
            Some("3"),
            "no security header: InvalidArgument"
        );
        assert_eq!(
            workload_api_raw(&sock_a, "FetchJWTSVID", true).await.as_deref(),
            Some("12"),
            "the JWT profile: Unimplemented"
        );
        assert_eq!(
            workload_api_raw(&sock_b, "FetchX509Bundles", true).await.as_deref(),
            Some("7"),
            "bundles need an attested caller too: PermissionDenied"
        );
    });
    let rec = find_record(&hub, &b, "the Workload API caller's request", |r| {
        r["identity"]["client_identity"] == pos_id.as_str()
    });
    assert_eq!(rec["identity"]["server_identity"], b.id.as_str());

    // Another executable with the same uid: pos also names the path.
    let fetch = bin("tidemesh-test-spiffe-fetch");
    let o = run(std::process::Command::new(&fetch).arg(&url_a));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "error no-identity-issued",
        "{}",
        text(&o)
    );
    // Another uid (nobody), through the 0666 socket.
    if uid == 0 && std::path::Path::new("/usr/bin/setpriv").exists() {
        // a copy it can execute, whatever the target directory's modes
        let copy = tmp.path().join("spiffe-fetch");
        std::fs::copy(&fetch, &copy).expect("copy the app");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let o = run(std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(&copy)
            .arg(&url_a));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "error no-identity-issued",
            "{}",
            text(&o)
        );
    } else {
        eprintln!("skipping the other-uid caller: needs root and setpriv");
    }
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
    assert!(
        !sock_a.exists() && !sock_b.exists(),
        "the sockets are removed at shutdown"
    );
}

/// Whether `body` says the QUIC handshake ran out of the call's 300 ms
/// (what is left of it when the try starts, rounded up to a millisecond).
fn handshake_timed_out(body: &str) -> bool {
    body.split_once("no QUIC handshake within the call's limit of ")
        .and_then(|(_, rest)| rest.trim().strip_suffix("ms"))
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| (250..=300).contains(&n))
}

/// A call ends within its route timeout even when the peer never answers
/// the QUIC handshake: a peer spoke whose advertised data address is a UDP
/// socket nobody reads, and the hub gateway in the first moments of a
/// blackout (before the spoke notices it). The handshake's own 2 s timeout
/// does not stretch a 300 ms call.
#[test]
fn a_call_to_a_silent_peer_or_gateway_ends_within_its_route_timeout() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let catalog = Workload::start("catalog");
    let inventory = Workload::start("inventory");
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(
        &f,
        format!(
            r#"{STORE_SF01}
{catalog_entry}{catalog_readers}{inventory_readers}---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: inventory, namespace: store}}
spec:
  host: inventory.store
  timeout: 300ms
---
apiVersion: tidemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: catalog, namespace: cloud}}
spec:
  host: catalog.cloud
  timeout: 300ms
"#,
            catalog_entry = cloud_entry("catalog", catalog.addr, "HTTP"),
            catalog_readers = frontend_only("catalog-readers", "cloud", "catalog"),
            inventory_readers = frontend_only("inventory-readers", "store", "inventory"),
        ),
    )
    .expect("yaml");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));

    // B serves inventory but advertises a data address that drops every
    // datagram: bound (so no ICMP refusal), never read
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the silent socket");
    let silent_addr = silent.local_addr().expect("addr");
    let (o_front, data_b) = (free_tcp(), free_udp());
    let cfg_a = write_config(
        tmp.path(),
        "a",
        &format!(
            r#"[[workload]]
service_account = "frontend"
outbound = "{o_front}"
"#
        ),
    );
    let cfg_b = write_config(
        tmp.path(),
        "b",
        &format!(
            r#"data_listen = "{data_b}"
data_advertise = "{silent_addr}"

[[workload]]
service_account = "inventory"
service = "inventory"
namespace = "store"
labels = {{ app = "inventory" }}
inbound = "{}"
"#,
            inventory.addr
        ),
    );
    // A reaches the hub (control and gateway) through a relay, for the blackout
    let relay = RelayProc::start(&tmp.path().join("relays"), "rs", hub_addr, 91);
    let a = start_spoke(tmp.path(), &hub, "spoke0", 0, &cfg_a, relay.addr);
    let _b = start_spoke(tmp.path(), &hub, "spoke1", 1, &cfg_b, hub_addr);
    wait_site_service(&a, "inventory");
    eprintln!("{:?}: hub and spokes up", started.elapsed());

    // the peer spoke: its handshake never completes
    let t0 = Instant::now();
    let r = call(o_front, "GET", "inventory.store", "/silent", &[]);
    let took = t0.elapsed();
    eprintln!("a 300 ms call to a silent peer spoke ended after {took:?}: {r:?}");
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        handshake_timed_out(&r.body),
        "the answer names what timed out: {r:?}"
    );
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    let rec = one_record(&hub, &a, "GET /silent");
    eprintln!("{:?}: its record found", started.elapsed());
    assert_eq!(rec["telemetry"]["status_code"], 504, "{rec}");
    assert!(
        rec["telemetry"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no QUIC handshake"),
        "{rec}"
    );
    let us = rec["telemetry"]["duration_us"].as_u64().unwrap_or(u64::MAX);
    assert!(us < 1_500_000, "{rec}");

    // the hub gateway, blacked out a moment ago: the spoke still believes
    // it connected, and this caller has no gateway connection yet
    relay.blackout(None);
    let t0 = Instant::now();
    let r = call(o_front, "GET", "catalog.cloud", "/items", &[]);
    let took = t0.elapsed();
    eprintln!("a 300 ms cloud call in a fresh hub blackout ended after {took:?}: {r:?}");
    assert_eq!(r.status, 504, "{r:?}");
    assert!(handshake_timed_out(&r.body), "{r:?}");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    assert_eq!(
        a.try_status().map(|s| s["state"].clone()),
        Some(Value::from("connected")),
        "the spoke had not noticed the blackout yet"
    );
    drop(silent);
}

/// `serve --otlp-endpoint https://…` reads the system roots at startup:
/// with `SSL_CERT_FILE` holding no certificate the hub refuses to start and
/// says where it looked; with a CA there it serves.
#[test]
fn an_https_otlp_endpoint_needs_system_roots_at_startup() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let empty = tmp.path().join("empty.pem");
    std::fs::write(&empty, "").expect("empty bundle");
    let empty_s = empty.to_str().expect("utf8").to_owned();
    let mut child = std::process::Command::new(bin("tidemesh-hub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("hub"))
        .args(["--otlp-endpoint", "https://127.0.0.1:9/v1/traces"])
        .env("SSL_CERT_FILE", &empty_s)
        .env_remove("SSL_CERT_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the hub");
    let exited = wait_for(Duration::from_secs(20), || child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("hub output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        exited.is_some_and(|s| !s.success()),
        "the hub must refuse to start: {err}"
    );
    assert!(
        err.contains(&format!(
            "--otlp-endpoint https://127.0.0.1:9/v1/traces is https, but no system roots could be loaded from SSL_CERT_FILE={empty_s}"
        )),
        "{err}"
    );
    // a bundle with a CA: it serves
    let pki = tls_pki(tmp.path());
    let ca = std::fs::read_to_string(&pki.ca).expect("ca pem");
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, ca).expect("bundle");
    let bundle_s = bundle.to_str().expect("utf8").to_owned();
    hub.set_env(&[("SSL_CERT_FILE", Some(&bundle_s)), ("SSL_CERT_DIR", None)]);
    let mut hub = hub.with_args(&["--otlp-endpoint", "https://127.0.0.1:9/v1/traces"]);
    hub.start();
    let o = hub.cli(&["stats", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A keep-alive workload for the pool test: answers every request on a
/// connection with 200 after `hold` (so a burst's requests are all in
/// flight at once), counting the connections it accepted.
fn keepalive_counting_server(
    hold: Duration,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                while read_message(&mut c).is_some() {
                    std::thread::sleep(hold);
                    let out = b"pooled";
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", out.len());
                    if c.write_all(head.as_bytes()).is_err() || c.write_all(out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Issue 17: the spoke's pool to a workload keeps as many idle connections
/// as its callers use at once. 96 keep-alive callers send three bursts of
/// one request each, every burst's requests in flight together: the first
/// burst opens about 96 upstream connections and the later bursts reuse
/// them (with a pool of 64 idle connections, each later burst opened ~32
/// new ones).
#[test]
fn the_upstream_pool_keeps_a_connection_per_concurrent_caller_between_bursts() {
    use std::sync::{atomic::Ordering, Arc, Barrier};
    const CALLERS: usize = 96;
    let tmp = tempfile::tempdir().expect("tmp");
    let (upstream, accepted) = keepalive_counting_server(Duration::from_millis(300));
    let mut hub = HubProc::init(tmp.path(), TD);
    let hub_addr = hub.start();
    let yaml = format!(
        r#"{STORE_SF01}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: pool-callers, namespace: pool}}
spec:
  selector:
    matchLabels: {{app: pooled}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TD}/store/sf01/sa/caller"]
"#
    );
    let f = tmp.path().join("mesh.yaml");
    std::fs::write(&f, yaml).expect("write mesh");
    let o = hub.cli(&["apply", "-f", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
    let outbound = free_tcp();
    let data = free_udp();
    let cfg = write_config(
        tmp.path(),
        "pool",
        &format!(
            r#"data_listen = "{data}"
data_advertise = "{data}"

[[workload]]
service_account = "caller"
namespace = "pool"
outbound = "{outbound}"

[[workload]]
service_account = "pooled"
service = "pooled"
namespace = "pool"
labels = {{ app = "pooled" }}
inbound = "{upstream}"
"#
        ),
    );
    let s = start_spoke(tmp.path(), &hub, "pool", 0, &cfg, hub_addr);
    // the route is up once one call gets through
    let first = wait_for(Duration::from_secs(20), || {
        let r = call(outbound, "GET", "pooled.pool", "/", &[]);
        (r.status == 200).then_some(r)
    });
    assert!(first.is_some(), "no call reached the pooled workload");
    let before = accepted.load(Ordering::SeqCst);
    let barrier = Arc::new(Barrier::new(CALLERS + 1));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(), String> {
                // Takes part in every burst's two barriers whatever happens,
                // so a failed caller cannot hang the test.
                let mut c = TcpStream::connect(outbound).map_err(|e| e.to_string());
                if let Ok(c) = &c {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
                }
                let mut failure = None;
                for _ in 0..3 {
                    barrier.wait();
                    let answer = match &mut c {
                        Ok(c) => c
                            .write_all(b"GET / HTTP/1.1\r\nHost: pooled.pool\r\n\r\n")
                            .ok()
                            .and_then(|_| read_message(c)),
                        Err(_) => None,
                    };
                    barrier.wait();
                    match answer {
                        Some((head, _)) if head.starts_with("HTTP/1.1 200") => {}
                        other if failure.is_none() => failure = Some(format!("no 200: {other:?}")),
                        _ => {}
                    }
                }
                c?;
                failure.map_or(Ok(()), Err)
            })
        })
        .collect();
    let mut opened = Vec::new();
    let mut seen = before;
    for _ in 0..3 {
        barrier.wait(); // the burst starts
        barrier.wait(); // every answer is in
        let now = accepted.load(Ordering::SeqCst);
        opened.push(now - seen);
        seen = now;
    }
    for c in callers {
        c.join().expect("caller thread").expect("caller");
    }
    eprintln!("upstream connections opened per burst: {opened:?}");
    // the bursts were concurrent: the first needed about one connection per
    // caller (the pool held at most one from the warm-up call)
    assert!(
        opened[0] >= CALLERS - 8,
        "first burst opened only {opened:?}: not concurrent"
    );
    // ... and the later ones found them idle in the pool
    assert!(
        opened[1] + opened[2] <= 8,
        "later bursts opened {opened:?} new upstream connections"
    );
    drop(s);
}
