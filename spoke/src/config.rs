//! The spoke's TOML configuration (`tidemesh-spoke run --config FILE`).
//!
//! Every key is documented in `deploy/examples/spoke.toml`. Unknown keys are
//! errors, and every value is checked before any socket is bound; an error
//! names the key and the value.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use serde::Deserialize;
use tidemesh_identity::SpiffeId;

use crate::workload_api::{selector::Selector, SocketMode, WorkloadApiAddr};

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The hub's QUIC address, or the addresses of its replicas tried in
    /// turn (`hub = ["a:7443", "b:7443"]`); defaults to the one used at
    /// enrollment.
    pub hub: Option<HubAddrs>,
    /// QUIC listener for peer spokes at the site (data plane).
    pub data_listen: Option<SocketAddr>,
    /// The address peers dial; registered with the hub.
    pub data_advertise: Option<SocketAddr>,
    /// Serve the SPIFFE Workload API on this Unix socket,
    /// `unix:///run/tidemesh/workload.sock` (`run --workload-api` overrides).
    pub workload_api: Option<WorkloadApiAddr>,
    /// The Workload API socket's permission bits, octal (default `"0666"`).
    pub workload_api_mode: Option<SocketMode>,
    /// Local workloads this spoke holds SVIDs for and proxies.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadConfig>,
}

/// One `[[workload]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Its SVID is `spiffe://TD/store/STORE/sa/<service_account>`.
    pub service_account: String,
    /// The service it serves.
    pub service: Option<String>,
    /// Namespace of the service.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels, e.g. `version = "v1"`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the spoke delivers calls for it.
    pub inbound: Option<SocketAddr>,
    /// Where it calls mesh services.
    pub outbound: Option<SocketAddr>,
    /// A plaintext HTTP listener for local clients outside the mesh (no
    /// SVID): what it accepts follows the workload's `PeerAuthentication`
    /// mode, read per request: STRICT (the default) refuses every request
    /// with 403, PERMISSIVE and DISABLE deliver it to `inbound` authorized
    /// with no identity (a `principals` or `namespaces` rule never matches).
    pub plaintext_inbound: Option<SocketAddr>,
    /// Optional HTTP health-check path.
    pub health: Option<String>,
    /// Local rate limit on calls delivered to this workload (token bucket);
    /// over it, callers get 429 with `retry-after`.
    pub rate_limit: Option<RateLimitConfig>,
    /// What its `inbound` listener speaks: `"http"` (HTTP/1.1, the default),
    /// `"http2"` (HTTP/2 with prior knowledge) or `"tcp"` (raw
    /// TCP: the spoke delivers the caller's bytes as they are, after an L4
    /// authorization of the caller's identity).
    #[serde(default)]
    pub protocol: WorkloadProtocol,
    /// Raw TCP listeners where it calls mesh services, one per service:
    /// `tcp_outbound = [{ listen = "127.0.0.1:15002", service = "db" }]`.
    #[serde(default)]
    pub tcp_outbound: Vec<TcpOutboundConfig>,
    /// Who gets this workload's SVID from the Workload API, in SPIRE's
    /// syntax (`unix:uid:1000`, `unix:gid:N`, `unix:path:/usr/bin/pos`,
    /// `systemd:unit:pos.service`): a caller must match all of them; none
    /// (the default) means no caller ever gets it.
    #[serde(default)]
    pub selectors: Vec<Selector>,
}

/// `protocol = "http" | "http2" | "tcp"` of a `[[workload]]`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadProtocol {
    /// HTTP/1.1: requests are authorized, routed and recorded one by one.
    #[default]
    Http,
    /// Raw TCP: each connection is authorized (L4) and recorded as a whole.
    Tcp,
    /// HTTP/2 with prior knowledge (h2c), an HTTP/2-only server: requests are
    /// handled as for `http` and delivered over HTTP/2 (one pooled
    /// connection, many streams); its health check speaks HTTP/2 too.
    Http2,
}

/// One `tcp_outbound` entry: a TCP listener where the workload reaches one
/// mesh service as raw TCP.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TcpOutboundConfig {
    /// Where the workload connects, e.g. `127.0.0.1:15002`.
    pub listen: SocketAddr,
    /// The service every connection goes to: `name` (in the workload's
    /// namespace, as an HTTP `Host`) or `name.namespace`.
    pub service: String,
}

/// `rate_limit = { requests_per_second = 100, burst = 200 }`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate: tokens added per second.
    pub requests_per_second: u32,
    /// Bucket size: requests admitted at once after a quiet spell; defaults
    /// to `requests_per_second`.
    pub burst: Option<u32>,
}

impl RateLimitConfig {
    /// As the policy model's token bucket (Envoy's `local_ratelimit` shape).
    pub fn to_policy(self) -> tidemesh_policy::model::RateLimit {
        tidemesh_policy::model::RateLimit {
            max_tokens: self.burst.unwrap_or(self.requests_per_second),
            tokens_per_fill: self.requests_per_second,
            fill_interval: std::time::Duration::from_secs(1),
        }
    }
}

fn default_namespace() -> String {
    "default".into()
}

/// A configuration error, naming the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax or type error (the message names the key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What toml said.
        message: String,
    },
    /// A value is not acceptable.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
}

fn invalid(
    key: impl Into<String>,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

impl FileConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(h) = &self.hub {
            h.check()
                .map_err(|(key, value, reason)| invalid(key, value, reason))?;
        }
        if let Some(a) = self.data_advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(invalid(
                    "data_advertise",
                    a.to_string(),
                    "must be an address peers can dial: a concrete IP and a non-zero port",
                ));
            }
        }
        // `workload_api_mode` without `workload_api` is allowed here: the
        // socket may come from `run --workload-api`; `run` refuses a mode
        // with no socket from either.
        let mut seen = std::collections::HashSet::new();
        let mut outbound_seen = std::collections::HashSet::new();
        let inbounds: std::collections::HashSet<SocketAddr> =
            self.workloads.iter().filter_map(|w| w.inbound).collect();
        // Every listener the spoke binds for apps, with the key naming it.
        let mut listeners: std::collections::HashMap<SocketAddr, String> =
            std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if let Some(a) = w.outbound {
                listeners
                    .entry(a)
                    .or_insert(format!("workload[{i}].outbound"));
            }
        }
        check_plaintext_inbound(&self.workloads, &inbounds, &mut listeners)?;
        for (i, w) in self.workloads.iter().enumerate() {
            let key = |k: &str| format!("workload[{i}].{k}");
            let probe = format!("spiffe://x/sa/{}", w.service_account);
            if w.service_account.is_empty()
                || w.service_account.contains('/')
                || SpiffeId::parse(&probe).is_err()
            {
                return Err(invalid(
                    key("service_account"),
                    w.service_account.clone(),
                    "must be one SPIFFE path segment: letters, digits, '.', '-', '_'",
                ));
            }
            if !seen.insert(w.service_account.clone()) {
                return Err(invalid(
                    key("service_account"),
                    w.service_account.clone(),
                    "declared twice",
                ));
            }
            if let Some(h) = &w.health {
                if !h.starts_with('/') {
                    return Err(invalid(
                        key("health"),
                        h.clone(),
                        "must be an absolute HTTP path starting with '/'",
                    ));
                }
            }
            if w.namespace.is_empty() {
                return Err(invalid(key("namespace"), "", "must not be empty"));
            }
            if let Some(svc) = &w.service {
                tidemesh_policy::units::canonical_host(svc, &w.namespace)
                    .map_err(|reason| invalid(key("service"), svc.clone(), reason))?;
            }
            if let Some(a) = w.inbound {
                if a.port() == 0 {
                    return Err(invalid(key("inbound"), a.to_string(), "port must not be 0"));
                }
            }
            if let Some(a) = w.outbound {
                if a.port() == 0 {
                    return Err(invalid(
                        key("outbound"),
                        a.to_string(),
                        "port must not be 0: the app needs to know where to call",
                    ));
                }
                if !outbound_seen.insert(a) {
                    return Err(invalid(
                        key("outbound"),
                        a.to_string(),
                        "used by another workload: each workload needs its own outbound listener",
                    ));
                }
                if inbounds.contains(&a) {
                    return Err(invalid(
                        key("outbound"),
                        a.to_string(),
                        "is also a workload's inbound address",
                    ));
                }
            }
            if w.protocol == WorkloadProtocol::Tcp {
                if let Some(h) = &w.health {
                    return Err(invalid(
                        key("health"),
                        h.clone(),
                        "is an HTTP check: a protocol = \"tcp\" workload has none",
                    ));
                }
                if let Some(r) = w.rate_limit {
                    return Err(invalid(
                        key("rate_limit"),
                        format!("{r:?}"),
                        "limits HTTP requests: a protocol = \"tcp\" workload has none",
                    ));
                }
            }
            for (j, t) in w.tcp_outbound.iter().enumerate() {
                let tkey = |k: &str| key(&format!("tcp_outbound[{j}].{k}"));
                if t.listen.port() == 0 {
                    return Err(invalid(
                        tkey("listen"),
                        t.listen.to_string(),
                        "port must not be 0: the app needs to know where to connect",
                    ));
                }
                if inbounds.contains(&t.listen) {
                    return Err(invalid(
                        tkey("listen"),
                        t.listen.to_string(),
                        "is also a workload's inbound address",
                    ));
                }
                if let Some(other) = listeners.insert(t.listen, tkey("listen")) {
                    return Err(invalid(
                        tkey("listen"),
                        t.listen.to_string(),
                        format!("is also {other}: each listener needs its own address"),
                    ));
                }
                tidemesh_policy::units::canonical_host(&t.service, &w.namespace)
                    .map_err(|reason| invalid(tkey("service"), t.service.clone(), reason))?;
            }
            if let Some(r) = w.rate_limit {
                if !(1..=1_000_000).contains(&r.requests_per_second) {
                    return Err(invalid(
                        key("rate_limit.requests_per_second"),
                        r.requests_per_second.to_string(),
                        "must be from 1 to 1000000",
                    ));
                }
                if let Some(b) = r.burst {
                    if !(1..=10_000_000).contains(&b) {
                        return Err(invalid(
                            key("rate_limit.burst"),
                            b.to_string(),
                            "must be from 1 to 10000000",
                        ));
                    }
                }
                if w.inbound.is_none() {
                    return Err(invalid(
                        key("rate_limit"),
                        format!("{r:?}"),
                        "limits calls delivered to the workload: set inbound too",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `plaintext_inbound`: HTTP only, delivered to the workload's `inbound`,
/// on an address no other listener (or workload) uses. Adds each to
/// `listeners` so later listeners cannot reuse it.
fn check_plaintext_inbound(
    workloads: &[WorkloadConfig],
    inbounds: &std::collections::HashSet<SocketAddr>,
    listeners: &mut std::collections::HashMap<SocketAddr, String>,
) -> Result<(), ConfigError> {
    for (i, w) in workloads.iter().enumerate() {
        let Some(a) = w.plaintext_inbound else {
            continue;
        };
        let key = format!("workload[{i}].plaintext_inbound");
        if a.port() == 0 {
            return Err(invalid(
                key,
                a.to_string(),
                "port must not be 0: local clients need to know where to call",
            ));
        }
        if w.inbound.is_none() {
            return Err(invalid(
                key,
                a.to_string(),
                "delivers to the workload's inbound address: set inbound too",
            ));
        }
        if w.protocol == WorkloadProtocol::Tcp {
            return Err(invalid(
                key,
                a.to_string(),
                "is an HTTP listener: a protocol = \"tcp\" workload has none",
            ));
        }
        if inbounds.contains(&a) {
            return Err(invalid(
                key,
                a.to_string(),
                "is also a workload's inbound address",
            ));
        }
        if let Some(other) = listeners.insert(a, key.clone()) {
            return Err(invalid(
                key,
                a.to_string(),
                format!("is also {other}: each listener needs its own address"),
            ));
        }
    }
    Ok(())
}

/// Most hub addresses a spoke may list (`hub = [...]`, `run --hub a,b`).
pub const MAX_HUBS: usize = 8;

/// `hub = "host:port"` or `hub = ["host:port", ...]`: the hub, or the
/// replicas of one hub (one trust domain, one CA), in the order the spoke
/// tries them. Checked by [`HubAddrs::check`] (1 to [`MAX_HUBS`] distinct
/// `host:port` entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAddrs(pub Vec<String>);

impl<'de> Deserialize<'de> for HubAddrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(s)) => Ok(HubAddrs(vec![s])),
            Ok(OneOrMany::Many(v)) => Ok(HubAddrs(v)),
            Err(_) => Err(serde::de::Error::custom(
                "expected \"host:port\" or a list [\"host:port\", ...]",
            )),
        }
    }
}

impl HubAddrs {
    /// A comma-separated list (`run --hub a:7443,b:7443`), checked.
    pub fn parse_list(s: &str) -> Result<HubAddrs, String> {
        let h = HubAddrs(s.split(',').map(|p| p.trim().to_owned()).collect());
        h.check()
            .map_err(|(_, value, reason)| format!("{value:?}: {reason}"))?;
        Ok(h)
    }

    /// 1 to [`MAX_HUBS`] entries, each `host:port` ([`check_hub_addr`]),
    /// none twice; an error is (key, value, reason), the key naming the
    /// entry (`hub[1]`).
    pub fn check(&self) -> Result<(), (String, String, String)> {
        if self.0.is_empty() {
            return Err((
                "hub".into(),
                "[]".into(),
                "an empty list: give at least one host:port".into(),
            ));
        }
        if self.0.len() > MAX_HUBS {
            return Err((
                "hub".into(),
                self.0.join(","),
                format!(
                    "{} addresses: at most {MAX_HUBS} hub replicas may be listed",
                    self.0.len()
                ),
            ));
        }
        let key = |i: usize| {
            if self.0.len() == 1 {
                "hub".to_owned()
            } else {
                format!("hub[{i}]")
            }
        };
        for (i, h) in self.0.iter().enumerate() {
            check_hub_addr(h).map_err(|reason| (key(i), h.clone(), reason))?;
            if self.0[..i].contains(h) {
                return Err((key(i), h.clone(), "is listed twice".into()));
            }
        }
        Ok(())
    }
}

/// Checks the shape of `host:port` without resolving it, so a spoke that
/// boots during an outage (no DNS) still starts; the name is resolved at
/// each connection attempt.
pub fn check_hub_addr(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_owned())?;
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !ok {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(())
}

/// Parses `host:port` into a socket address (IP literal or resolvable name).
pub fn parse_hub_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("not a host:port address: {e}"))?
        .next()
        .ok_or_else(|| "resolves to no address".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_errors_name_the_key() {
        let ok = r#"
hub = "127.0.0.1:7443"
data_listen = "0.0.0.0:7444"
data_advertise = "10.1.2.3:7444"
[[workload]]
service_account = "pos"
service = "pos"
namespace = "store"
labels = { app = "pos", version = "v1" }
inbound = "127.0.0.1:8080"
outbound = "127.0.0.1:15001"
health = "/healthz"
"#;
        let c = FileConfig::parse(ok).expect("valid");
        assert_eq!(c.workloads[0].labels["version"], "v1");
        let e =
            FileConfig::parse("[[workload]]\nservice_account = \"a/b\"\n").expect_err("invalid");
        assert!(e.to_string().contains("workload[0].service_account"), "{e}");
        let e = FileConfig::parse("hub = \"nope\"\n").expect_err("invalid");
        assert!(e.to_string().contains("hub"), "{e}");
        // a name is checked for shape only, not resolved
        FileConfig::parse("hub = \"hub.does-not-resolve.invalid:7443\"\n").expect("name accepted");
        let e = FileConfig::parse("hub = \"bad host:7443\"\n").expect_err("invalid");
        assert!(e.to_string().contains("hub"), "{e}");
        let e = FileConfig::parse("bogus = 1\n").expect_err("unknown key");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = FileConfig::parse("[[workload]]\nservice_account = \"a\"\ninbound = \"x\"\n")
            .expect_err("bad addr");
        assert!(e.to_string().contains("inbound"), "{e}");
    }

    #[test]
    fn hub_is_one_address_or_a_bounded_list_of_replicas() {
        let one = FileConfig::parse("hub = \"a.example:7443\"\n").expect("one address");
        assert_eq!(one.hub, Some(HubAddrs(vec!["a.example:7443".into()])));
        let two =
            FileConfig::parse("hub = [\"10.0.0.1:7443\", \"b.example:7443\"]\n").expect("a list");
        assert_eq!(
            two.hub,
            Some(HubAddrs(vec![
                "10.0.0.1:7443".into(),
                "b.example:7443".into()
            ]))
        );
        let eight: Vec<String> = (1..=8).map(|i| format!("\"10.0.0.{i}:7443\"")).collect();
        FileConfig::parse(&format!("hub = [{}]\n", eight.join(","))).expect("eight addresses");
        let nine: Vec<String> = (1..=9).map(|i| format!("\"10.0.0.{i}:7443\"")).collect();
        let e = FileConfig::parse(&format!("hub = [{}]\n", nine.join(","))).expect_err("nine");
        assert!(e.to_string().contains("at most 8"), "{e}");
        let e = FileConfig::parse("hub = []\n").expect_err("empty");
        assert!(e.to_string().contains("at least one"), "{e}");
        let e =
            FileConfig::parse("hub = [\"a:7443\", \"bad host:7443\"]\n").expect_err("bad entry");
        assert!(
            e.to_string().starts_with("hub[1] = \"bad host:7443\""),
            "{e}"
        );
        let e = FileConfig::parse("hub = [\"a:7443\", \"a:7443\"]\n").expect_err("twice");
        assert!(
            e.to_string().contains("hub[1]") && e.to_string().contains("twice"),
            "{e}"
        );
        let e = FileConfig::parse("hub = 7443\n").expect_err("a number");
        assert!(e.to_string().contains("host:port"), "{e}");
        // the --hub flag's comma list, checked the same way
        assert_eq!(
            HubAddrs::parse_list("a:1, b:2").expect("list"),
            HubAddrs(vec!["a:1".into(), "b:2".into()])
        );
        let e = HubAddrs::parse_list("a:1,nope").expect_err("bad entry");
        assert!(e.contains("nope") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c = FileConfig::parse(include_str!("../../deploy/examples/spoke.toml"))
            .expect("deploy/examples/spoke.toml parses");
        assert!(c.workloads[0].rate_limit.is_some());
        assert!(c.workloads[1].plaintext_inbound.is_some());
        assert!(c.workload_api.is_some());
        assert_eq!(c.workloads[0].selectors.len(), 3);
    }

    #[test]
    fn workload_api_keys_and_selectors_are_checked() {
        let c = FileConfig::parse(
            r#"
workload_api = "unix:///run/tidemesh/workload.sock"
workload_api_mode = "0660"
[[workload]]
service_account = "pos"
selectors = ["unix:uid:1000", "unix:path:/usr/bin/pos", "systemd:unit:pos.service"]
[[workload]]
service_account = "batch"
"#,
        )
        .expect("valid");
        assert_eq!(
            c.workload_api.as_ref().map(|a| a.to_string()).as_deref(),
            Some("unix:///run/tidemesh/workload.sock")
        );
        assert_eq!(c.workload_api_mode.map(|m| m.0), Some(0o660));
        assert_eq!(c.workloads[0].selectors.len(), 3);
        assert_eq!(
            c.workloads[0].selectors[2].to_string(),
            "systemd:unit:pos.service"
        );
        assert!(c.workloads[1].selectors.is_empty());
        // the mode alone is fine in the file: `run --workload-api` may give
        // the socket (`run` refuses a mode with no socket from either)
        let c = FileConfig::parse("workload_api_mode = \"0600\"\n").expect("mode alone");
        assert_eq!(c.workload_api_mode.map(|m| m.0), Some(0o600));
        assert!(c.workload_api.is_none());
        for (text, want) in [
            ("workload_api = \"tcp://127.0.0.1:1\"\n", "Unix socket only"),
            (
                "workload_api = \"unix:///a\"\nworkload_api_mode = \"999\"\n",
                "octal",
            ),
            (
                "[[workload]]\nservice_account = \"a\"\nselectors = [\"unix:user:pos\"]\n",
                "unsupported selector unix:user",
            ),
            (
                "[[workload]]\nservice_account = \"a\"\nselectors = [\"unix:uid:x\"]\n",
                "selectors",
            ),
        ] {
            let e = FileConfig::parse(text).expect_err(text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn raw_tcp_keys_parse() {
        let c = FileConfig::parse(
            r#"
[[workload]]
service_account = "db"
service = "postgres"
inbound = "127.0.0.1:5432"
protocol = "tcp"

[[workload]]
service_account = "app"
tcp_outbound = [
  { listen = "127.0.0.1:15002", service = "postgres" },
  { listen = "127.0.0.1:15003", service = "cache.store" },
]

[[workload]]
service_account = "batch"
[[workload.tcp_outbound]]
listen = "127.0.0.1:15004"
service = "ledger"
"#,
        )
        .expect("valid");
        assert_eq!(c.workloads[0].protocol, WorkloadProtocol::Tcp);
        assert_eq!(c.workloads[1].protocol, WorkloadProtocol::Http);
        let t = &c.workloads[1].tcp_outbound;
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].service, "cache.store");
        assert_eq!(c.workloads[2].tcp_outbound[0].listen.port(), 15004);
    }

    #[test]
    fn plaintext_inbound_is_checked() {
        let c = FileConfig::parse(
            "[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:8080\"\nplaintext_inbound = \"127.0.0.1:18080\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.workloads[0].plaintext_inbound,
            Some("127.0.0.1:18080".parse().expect("addr"))
        );
        let base = "[[workload]]\nservice_account = \"a\"\n";
        for (extra, want) in [
            ("inbound = \"127.0.0.1:1\"\nplaintext_inbound = \"127.0.0.1:0\"\n", "workload[0].plaintext_inbound = \"127.0.0.1:0\": port must not be 0"),
            ("plaintext_inbound = \"127.0.0.1:2\"\n", "set inbound too"),
            ("inbound = \"127.0.0.1:1\"\nprotocol = \"tcp\"\nplaintext_inbound = \"127.0.0.1:2\"\n", "a protocol = \"tcp\" workload has none"),
            ("inbound = \"127.0.0.1:1\"\nplaintext_inbound = \"127.0.0.1:1\"\n", "is also a workload's inbound address"),
            ("inbound = \"127.0.0.1:1\"\noutbound = \"127.0.0.1:2\"\nplaintext_inbound = \"127.0.0.1:2\"\n", "is also workload[0].outbound"),
            ("inbound = \"127.0.0.1:1\"\nplaintext_inbound = \"127.0.0.1:2\"\ntcp_outbound = [{ listen = \"127.0.0.1:2\", service = \"db\" }]\n", "workload[0].tcp_outbound[0].listen"),
            ("inbound = \"127.0.0.1:1\"\nplaintext_inbound = \"nope\"\n", "plaintext_inbound"),
        ] {
            let text = format!("{base}{extra}");
            let e = FileConfig::parse(&text).expect_err(&text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
        // two workloads cannot share one
        let e = FileConfig::parse("[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:1\"\nplaintext_inbound = \"127.0.0.1:3\"\n[[workload]]\nservice_account = \"b\"\ninbound = \"127.0.0.1:2\"\nplaintext_inbound = \"127.0.0.1:3\"\n")
            .expect_err("shared");
        assert!(
            e.to_string().contains("workload[1].plaintext_inbound"),
            "{e}"
        );
    }

    #[test]
    fn data_plane_keys_are_checked() {
        let c = FileConfig::parse(
            "[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:8080\"\nrate_limit = { requests_per_second = 100, burst = 200 }\n",
        )
        .expect("valid");
        let r = c.workloads[0].rate_limit.expect("set").to_policy();
        assert_eq!((r.max_tokens, r.tokens_per_fill), (200, 100));
        for (text, key) in [
            ("data_listen = \"0.0.0.0:7444\"\ndata_advertise = \"0.0.0.0:7444\"\n", "data_advertise"),
            ("[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:1\"\nrate_limit = { requests_per_second = 0 }\n", "workload[0].rate_limit.requests_per_second"),
            ("[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:1\"\nrate_limit = { requests_per_second = 1, burst = 0 }\n", "workload[0].rate_limit.burst"),
            ("[[workload]]\nservice_account = \"a\"\nrate_limit = { requests_per_second = 1 }\n", "workload[0].rate_limit"),
            ("[[workload]]\nservice_account = \"a\"\nrate_limit = { rps = 1 }\n", "rps"),
            ("[[workload]]\nservice_account = \"a\"\noutbound = \"127.0.0.1:0\"\n", "workload[0].outbound"),
            ("[[workload]]\nservice_account = \"a\"\noutbound = \"127.0.0.1:9\"\n[[workload]]\nservice_account = \"b\"\noutbound = \"127.0.0.1:9\"\n", "workload[1].outbound"),
            ("[[workload]]\nservice_account = \"a\"\nservice = \"Bad Name\"\n", "workload[0].service"),
            ("[[workload]]\nservice_account = \"a\"\nprotocol = \"udp\"\n", "protocol"),
            ("[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:1\"\nprotocol = \"tcp\"\nhealth = \"/healthz\"\n", "workload[0].health"),
            ("[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:1\"\nprotocol = \"tcp\"\nrate_limit = { requests_per_second = 1 }\n", "workload[0].rate_limit"),
            ("[[workload]]\nservice_account = \"a\"\ntcp_outbound = [{ listen = \"127.0.0.1:0\", service = \"db\" }]\n", "workload[0].tcp_outbound[0].listen"),
            ("[[workload]]\nservice_account = \"a\"\ntcp_outbound = [{ listen = \"127.0.0.1:7\", service = \"db\" }, { listen = \"127.0.0.1:8\", service = \"no good\" }]\n", "workload[0].tcp_outbound[1].service"),
            ("[[workload]]\nservice_account = \"a\"\ntcp_outbound = [{ listen = \"127.0.0.1:7\", service = \"db:5432\" }]\n", "workload[0].tcp_outbound[0].service"),
            ("[[workload]]\nservice_account = \"a\"\ntcp_outbound = [{ listen = \"127.0.0.1:7\", service = \"db\", port = 1 }]\n", "port"),
            ("[[workload]]\nservice_account = \"a\"\ntcp_outbound = [{ listen = \"127.0.0.1:7\", service = \"db\" }, { listen = \"127.0.0.1:7\", service = \"cache\" }]\n", "workload[0].tcp_outbound[1].listen"),
            ("[[workload]]\nservice_account = \"a\"\noutbound = \"127.0.0.1:9\"\n[[workload]]\nservice_account = \"b\"\ntcp_outbound = [{ listen = \"127.0.0.1:9\", service = \"db\" }]\n", "workload[1].tcp_outbound[0].listen"),
            ("[[workload]]\nservice_account = \"a\"\ninbound = \"127.0.0.1:9\"\n[[workload]]\nservice_account = \"b\"\ntcp_outbound = [{ listen = \"127.0.0.1:9\", service = \"db\" }]\n", "workload[1].tcp_outbound[0].listen"),
        ] {
            let e = FileConfig::parse(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }
}
