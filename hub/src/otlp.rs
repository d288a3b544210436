//! OTLP trace export: the spans of the request records the hub has just
//! committed, posted to an OpenTelemetry collector as OTLP/HTTP protobuf
//! (`serve --otlp-endpoint URL`).
//!
//! What it is: [`spans_of`] turns newly stored request records into OTLP
//! spans (pure: no I/O, no clock); an [`Exporter`] holds them in a bounded
//! queue and a task ([`Exporter::run`]) posts them in batches as an
//! `ExportTraceServiceRequest` with `Content-Type: application/x-protobuf`.
//! Each record is one span: its trace id, span id and parent span id are
//! the ones the spoke wrote into `traceparent`, so spoke A's outbound span
//! (kind CLIENT) is the parent of spoke B's inbound span (kind SERVER),
//! whose id the upstream app saw as its parent. Timestamps are the
//! record's own (start time in milliseconds, duration in microseconds): a
//! span recorded while the hub was out of reach arrives after the heal
//! with the time it happened. Resource attributes: `service.name` (the
//! served service for an inbound span, the calling workload's account for
//! an outbound one), `tidemesh.spoke` (the spoke's SPIFFE ID) and
//! `tidemesh.store`.
//!
//! Who drives it: evidence ingest offers the records of each committed
//! batch ([`Exporter::offer`]); `Hub::serve` runs the export task.
//!
//! The endpoint is `http://` or `https://`; an https collector is verified
//! against the system roots (the platform's trust store, or
//! `SSL_CERT_FILE` / `SSL_CERT_DIR`), loaded when the exporter is made so
//! that a hub without them fails at startup. One HTTP/1.1 connection is
//! kept and made again when it closes or has been idle for
//! [`IDLE_RECONNECT`]. A collector that answers 429 or 503 with
//! `Retry-After: <seconds>` is tried again after that long (at most
//! [`OtlpSettings::max_retry_after`]) instead of the backoff.
//!
//! What it must not do: block or slow ingest (an offer takes a lock and
//! appends; what does not fit in the queue is dropped and counted), export
//! a record twice (only records stored by this commit are offered, and a
//! duplicate is never stored), export an unsampled request or a drill's
//! synthetic one, or retry a batch forever (a bounded number of attempts
//! with backoff, then the batch is dropped and counted).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{
    body::Bytes, client::conn::http1::SendRequest, header, Method, Request, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls::pki_types::ServerName;
use tidemesh_evidence::{
    record::{EnforcementPoint, Locality, Mode, RequestEvidence, StatusCode as SpanStatus},
    RecordBody, SealedRecord,
};
use tidemesh_identity::{naming, MeshIdentity, SpiffeId};
use tracing::{debug, warn};

/// The OTLP protobuf messages the exporter writes: the subset of
/// `opentelemetry/proto/{collector/trace,trace,common,resource}/v1` it
/// uses, with the official field numbers (the integration test decodes
/// them with the official definitions).
pub mod proto {
    /// `collector.trace.v1.ExportTraceServiceRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        /// Spans grouped by resource.
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    /// `collector.trace.v1.ExportTraceServiceResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceResponse {
        /// Set when the collector refused some spans.
        #[prost(message, optional, tag = "1")]
        pub partial_success: Option<ExportTracePartialSuccess>,
    }

    /// `collector.trace.v1.ExportTracePartialSuccess`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTracePartialSuccess {
        /// Spans the collector refused.
        #[prost(int64, tag = "1")]
        pub rejected_spans: i64,
        /// Why.
        #[prost(string, tag = "2")]
        pub error_message: String,
    }

    /// `trace.v1.ResourceSpans`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        /// The resource (service, spoke, store).
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        /// The spans, by instrumentation scope.
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    /// `resource.v1.Resource`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        /// Its attributes.
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    /// `trace.v1.ScopeSpans`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        /// Who made the spans.
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        /// The spans.
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    /// `common.v1.InstrumentationScope`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        /// Name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Version.
        #[prost(string, tag = "2")]
        pub version: String,
    }

    /// `common.v1.KeyValue`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        /// Attribute name.
        #[prost(string, tag = "1")]
        pub key: String,
        /// Its value.
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    /// `common.v1.AnyValue` (the kinds the exporter writes).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        /// The value.
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3")]
        pub value: Option<any_value::Value>,
    }

    /// `AnyValue.value`.
    pub mod any_value {
        /// One attribute value.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// `string_value`.
            #[prost(string, tag = "1")]
            StringValue(String),
            /// `bool_value`.
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            /// `int_value`.
            #[prost(int64, tag = "3")]
            IntValue(i64),
        }
    }

    /// `trace.v1.Span` (no events or links).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        /// 16 bytes.
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        /// 8 bytes.
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        /// 8 bytes, empty for a root span.
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        /// e.g. `POST /api/charge`.
        #[prost(string, tag = "5")]
        pub name: String,
        /// [`SPAN_KIND_SERVER`] or [`SPAN_KIND_CLIENT`].
        #[prost(int32, tag = "6")]
        pub kind: i32,
        /// Start, nanoseconds since the epoch.
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        /// End, nanoseconds since the epoch.
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        /// Span attributes.
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        /// Outcome.
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
        /// W3C trace flags (bits 0-7) and whether the parent is remote
        /// (bits 8 and 9).
        #[prost(fixed32, tag = "16")]
        pub flags: u32,
    }

    /// `trace.v1.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        /// Why it failed.
        #[prost(string, tag = "2")]
        pub message: String,
        /// [`STATUS_CODE_OK`] or [`STATUS_CODE_ERROR`] (or unset, 0).
        #[prost(int32, tag = "3")]
        pub code: i32,
    }

    /// `Span.SpanKind.SPAN_KIND_SERVER`.
    pub const SPAN_KIND_SERVER: i32 = 2;
    /// `Span.SpanKind.SPAN_KIND_CLIENT`.
    pub const SPAN_KIND_CLIENT: i32 = 3;
    /// `Status.StatusCode.STATUS_CODE_OK`.
    pub const STATUS_CODE_OK: i32 = 1;
    /// `Status.StatusCode.STATUS_CODE_ERROR`.
    pub const STATUS_CODE_ERROR: i32 = 2;
    /// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`.
    pub const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
    /// `SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`.
    pub const FLAGS_IS_REMOTE: u32 = 0x200;
}

/// The `service.name` of a span whose workload is unknown (the OTel
/// default).
pub const UNKNOWN_SERVICE: &str = "unknown_service:tidemesh";

/// Export settings (`serve --otlp-endpoint`).
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// Where to POST, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: Uri,
    /// Spans held while the collector is slow or down; more are dropped.
    pub queue: usize,
    /// Spans per request at most.
    pub batch: usize,
    /// How long a span may wait for a full batch.
    pub flush: Duration,
    /// Tries per batch (the first one included) before it is dropped.
    pub attempts: u32,
    /// Wait before the second try; doubled before each further one.
    pub backoff: Duration,
    /// One request's deadline (connect, send, answer).
    pub timeout: Duration,
    /// The longest `Retry-After` honoured; a longer one waits this long.
    pub max_retry_after: Duration,
}

/// A kept connection idle this long is closed and made again before the
/// next request (collectors close idle connections; a request on one they
/// just closed would fail).
pub const IDLE_RECONNECT: Duration = Duration::from_secs(30);

impl OtlpSettings {
    /// The defaults, sending to `endpoint`.
    pub fn new(endpoint: Uri) -> OtlpSettings {
        OtlpSettings {
            endpoint,
            queue: 8192,
            batch: 512,
            flush: Duration::from_secs(1),
            attempts: 4,
            backoff: Duration::from_millis(250),
            timeout: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// Reads `--otlp-endpoint`: an `http://` or `https://` URL with a host
/// (the collector's OTLP/HTTP traces path, usually `/v1/traces`, is taken
/// as given).
pub fn parse_endpoint(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| {
        format!("{s:?} is not a URL ({e}): give e.g. http://127.0.0.1:4318/v1/traces")
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{s:?}: give an http:// or https:// URL, e.g. http://127.0.0.1:4318/v1/traces"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?}: no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("{s:?}: credentials in the URL are not supported"));
    }
    Ok(uri)
}

/// The wait a `Retry-After` value asks for, in its delay-seconds form
/// (`120`), at most `max`; `None` for anything else (an HTTP date, junk),
/// when the exporter's own backoff applies.
pub fn retry_after(value: &[u8], max: Duration) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // all digits: only an overflow fails, and that is beyond any cap
    let secs = text.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(max))
}

/// Who a span's resource is: service, spoke, store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceKey {
    /// `service.name`.
    pub service: String,
    /// `tidemesh.spoke`: the spoke's SPIFFE ID.
    pub spoke: String,
    /// `tidemesh.store`.
    pub store: String,
}

/// One span waiting to be sent, with its resource.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSpan {
    /// Whose span it is.
    pub resource: ResourceKey,
    /// The span.
    pub span: proto::Span,
}

fn kv(key: &str, value: proto::any_value::Value) -> proto::KeyValue {
    proto::KeyValue {
        key: key.to_owned(),
        value: Some(proto::AnyValue { value: Some(value) }),
    }
}

fn s(key: &str, value: impl Into<String>) -> proto::KeyValue {
    kv(key, proto::any_value::Value::StringValue(value.into()))
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Target => "target",
        Mode::Degraded => "degraded",
        Mode::Survival => "survival",
        Mode::Recovery => "recovery",
    }
}

fn locality_name(l: Locality) -> &'static str {
    match l {
        Locality::Local => "local",
        Locality::SameZone => "same_zone",
        Locality::SameRegion => "same_region",
        Locality::OtherRegion => "other_region",
    }
}

/// The account of a workload SPIFFE ID (`…/sa/ACCOUNT`).
fn account_of(id: Option<&SpiffeId>) -> Option<String> {
    match naming::classify(id?)? {
        MeshIdentity::Workload { account, .. } => Some(account),
        _ => None,
    }
}

/// The span of one request record, or `None` when it is not to be
/// exported: not sampled, a drill's synthetic record, or without trace
/// context.
pub fn span_of(spoke: &SpiffeId, seq: u64, r: &RequestEvidence) -> Option<PendingSpan> {
    if !r.trace_sampled || r.drill.is_some() {
        return None;
    }
    let t = &r.telemetry;
    let (trace_id, span_id) = (t.trace_id?, t.span_id?);
    let inbound = r.enforcement_point == EnforcementPoint::SidecarInbound;
    let client = r.identity.as_ref().and_then(|i| i.client_identity.as_ref());
    let server = r.identity.as_ref().and_then(|i| i.server_identity.as_ref());
    let service = if inbound {
        r.service_name.clone()
    } else {
        account_of(client).unwrap_or_else(|| UNKNOWN_SERVICE.to_owned())
    };
    let store = match naming::classify(spoke) {
        Some(MeshIdentity::Node { store, .. }) => store,
        _ => String::new(),
    };
    let start = t.start_time.as_millis().saturating_mul(1_000_000);
    let end = start.saturating_add(t.duration_us.saturating_mul(1_000));
    let mut attributes = vec![
        s("tidemesh.service", r.service_name.clone()),
        s("tidemesh.mode", mode_name(r.mode)),
        s(
            "tidemesh.enforcement_point",
            if inbound {
                "sidecar_inbound"
            } else {
                "sidecar_outbound"
            },
        ),
        kv(
            "tidemesh.evidence_seq",
            proto::any_value::Value::IntValue(i64::try_from(seq).unwrap_or(i64::MAX)),
        ),
    ];
    if !inbound {
        attributes.push(s("peer.service", r.service_name.clone()));
    }
    if let Some(c) = client {
        attributes.push(s("tidemesh.source.principal", c.to_string()));
    }
    if let Some(p) = server {
        attributes.push(s("tidemesh.destination.principal", p.to_string()));
    }
    if let Some(code) = t.status_code {
        attributes.push(kv(
            "http.response.status_code",
            proto::any_value::Value::IntValue(i64::from(code)),
        ));
    }
    if let Some(rd) = &r.routing_decision {
        if let Some(l) = rd.locality {
            attributes.push(s("tidemesh.locality", locality_name(l)));
        }
        if let Some(e) = &rd.selected_endpoint {
            attributes.push(s("tidemesh.selected_endpoint", e.clone()));
        }
    }
    if let Some(p) = &r.policy_evaluation {
        attributes.push(s(
            "tidemesh.policy.decision",
            match p.final_decision {
                tidemesh_evidence::record::Decision::Allow => "ALLOW",
                tidemesh_evidence::record::Decision::Deny => "DENY",
            },
        ));
    }
    let status = proto::Status {
        message: t.status.message.clone(),
        code: match t.status.code {
            SpanStatus::Unset => 0,
            SpanStatus::Ok => proto::STATUS_CODE_OK,
            SpanStatus::Error => proto::STATUS_CODE_ERROR,
        },
    };
    // a parent always came from another process: an inbound span's is the
    // calling spoke's, an outbound span's the app's (from its traceparent)
    let remote = if t.parent_span_id.is_some() {
        proto::FLAGS_IS_REMOTE
    } else {
        0
    };
    Some(PendingSpan {
        resource: ResourceKey {
            service,
            spoke: spoke.to_string(),
            store,
        },
        span: proto::Span {
            trace_id: trace_id.0.to_vec(),
            span_id: span_id.0.to_vec(),
            parent_span_id: t.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
            name: t.operation_name.clone(),
            kind: if inbound {
                proto::SPAN_KIND_SERVER
            } else {
                proto::SPAN_KIND_CLIENT
            },
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: Some(status),
            flags: 0x01 | proto::FLAGS_HAS_IS_REMOTE | remote,
        },
    })
}

/// The spans of the records of `spoke`'s batch that this commit stored
/// (sequence numbers from `first_stored` on; `None`: it stored nothing).
pub fn spans_of(
    spoke: &SpiffeId,
    records: &[SealedRecord],
    first_stored: Option<u64>,
) -> Vec<PendingSpan> {
    let Some(first) = first_stored else {
        return Vec::new();
    };
    records
        .iter()
        .filter(|r| r.seq.get() >= first)
        .filter_map(|r| match &r.body {
            RecordBody::Request(q) => span_of(spoke, r.seq.get(), q),
            _ => None,
        })
        .collect()
}

/// One request carrying `spans`, grouped by resource.
pub fn export_request(spans: Vec<PendingSpan>) -> proto::ExportTraceServiceRequest {
    let mut by: BTreeMap<ResourceKey, Vec<proto::Span>> = BTreeMap::new();
    for p in spans {
        by.entry(p.resource).or_default().push(p.span);
    }
    proto::ExportTraceServiceRequest {
        resource_spans: by
            .into_iter()
            .map(|(k, spans)| proto::ResourceSpans {
                resource: Some(proto::Resource {
                    attributes: vec![
                        s("service.name", k.service),
                        s("tidemesh.spoke", k.spoke),
                        s("tidemesh.store", k.store),
                    ],
                }),
                scope_spans: vec![proto::ScopeSpans {
                    scope: Some(proto::InstrumentationScope {
                        name: "tidemesh".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            })
            .collect(),
    }
}

/// The export counters (`/metrics`).
#[derive(Debug, Default)]
pub struct OtlpCounters {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans given up: the queue was full, every try failed, or the
    /// collector refused them.
    pub dropped: AtomicU64,
    /// Export requests that failed (each try counts).
    pub failures: AtomicU64,
}

/// What one try came to.
#[derive(Debug)]
enum Sent {
    /// Accepted (`rejected` of them refused by the collector).
    Accepted { rejected: u64 },
    /// Worth another try (connection failure, timeout, 429, 502-504),
    /// after the collector's `Retry-After` when it gave one.
    Retry(String, Option<Duration>),
    /// Not worth another try (any other answer).
    Refused(String),
}

/// Where the collector is and how to speak to it.
struct Target {
    /// Host name or IP address (without IPv6 brackets) and port.
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// The request target (path and query).
    path: String,
    /// For `https://`: the TLS connector and the name the certificate
    /// must carry.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Target {
    fn of(endpoint: &Uri, roots: Option<Arc<rustls::RootCertStore>>) -> Result<Target, String> {
        let https = endpoint.scheme_str() == Some("https");
        let host = endpoint
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{endpoint}: no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = endpoint.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = endpoint
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.clone());
        let path = endpoint
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        let tls = if https {
            let roots = match roots {
                Some(r) => r,
                None => crate::origination::load_system_roots()
                    .map_err(|e| format!("{endpoint} is https, but {e}"))?
                    .roots(),
            };
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("{endpoint}: {host:?} is not a TLS server name: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Target {
            host,
            port,
            authority,
            path,
            tls,
        })
    }
}

/// The kept connection to the collector and when it was last used.
struct Link {
    sender: SendRequest<Full<Bytes>>,
    used: tokio::time::Instant,
}

/// The bounded span queue and the export task's state.
pub struct Exporter {
    settings: OtlpSettings,
    queue: Mutex<VecDeque<PendingSpan>>,
    wake: tokio::sync::Notify,
    /// Exported, dropped and failed counts.
    pub counters: OtlpCounters,
    target: Target,
    /// Only the export task sends, one request at a time.
    link: tokio::sync::Mutex<Option<Link>>,
}

impl Exporter {
    /// An exporter for `settings` (its task is [`Exporter::run`]); for an
    /// `https://` endpoint it loads the system roots, and fails without
    /// them.
    pub fn new(settings: OtlpSettings) -> Result<Exporter, String> {
        Exporter::with_roots(settings, None)
    }

    /// [`Exporter::new`] trusting `roots` instead of the system roots for
    /// an `https://` endpoint (when `Some`).
    pub fn with_roots(
        settings: OtlpSettings,
        roots: Option<Arc<rustls::RootCertStore>>,
    ) -> Result<Exporter, String> {
        let target = Target::of(&settings.endpoint, roots)?;
        Ok(Exporter {
            settings,
            queue: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            counters: OtlpCounters::default(),
            target,
            link: tokio::sync::Mutex::new(None),
        })
    }

    /// The endpoint spans go to.
    pub fn endpoint(&self) -> &Uri {
        &self.settings.endpoint
    }

    /// Spans waiting now.
    pub fn queued(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Queues `spans` without waiting: what does not fit is dropped and
    /// counted.
    pub fn offer(&self, spans: Vec<PendingSpan>) {
        if spans.is_empty() {
            return;
        }
        let n = spans.len();
        let (kept, full) = match self.queue.lock() {
            Ok(mut q) => {
                let room = self.settings.queue.saturating_sub(q.len());
                let kept = n.min(room);
                q.extend(spans.into_iter().take(kept));
                (kept, q.len() >= self.settings.batch)
            }
            Err(_) => (0, false),
        };
        if kept < n {
            self.counters
                .dropped
                .fetch_add((n - kept) as u64, Ordering::Relaxed);
            debug!(dropped = n - kept, "OTLP export queue full: spans dropped");
        }
        if full {
            self.wake.notify_one();
        }
    }

    fn take_batch(&self) -> Vec<PendingSpan> {
        match self.queue.lock() {
            Ok(mut q) => {
                let n = q.len().min(self.settings.batch);
                q.drain(..n).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Sends queued spans until `shutdown` resolves, then what is still
    /// queued (the caller bounds how long that may take): a batch when it
    /// is full or every `flush`; each batch tried up to `attempts` times
    /// with doubling backoff, then dropped.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut stopping = false;
        while !stopping {
            tokio::select! {
                _ = &mut shutdown => stopping = true,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.settings.flush) => {}
            }
            loop {
                let batch = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                self.export(batch).await;
            }
        }
    }

    /// Sends one batch, retrying as the settings say, and counts the outcome.
    async fn export(&self, batch: Vec<PendingSpan>) {
        let n = batch.len() as u64;
        let body = Bytes::from(export_request(batch).encode_to_vec());
        let mut wait = self.settings.backoff;
        for attempt in 1..=self.settings.attempts.max(1) {
            match self.send(body.clone()).await {
                Sent::Accepted { rejected } => {
                    let rejected = rejected.min(n);
                    self.counters
                        .exported
                        .fetch_add(n - rejected, Ordering::Relaxed);
                    if rejected > 0 {
                        self.counters.dropped.fetch_add(rejected, Ordering::Relaxed);
                    }
                    return;
                }
                Sent::Refused(why) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    self.counters.dropped.fetch_add(n, Ordering::Relaxed);
                    warn!(endpoint = %self.settings.endpoint, spans = n, error = %why, "OTLP collector refused spans: dropped");
                    return;
                }
                Sent::Retry(why, after) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    if attempt == self.settings.attempts.max(1) {
                        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
                        warn!(endpoint = %self.settings.endpoint, spans = n, attempts = attempt, error = %why, "OTLP export failed: spans dropped");
                        return;
                    }
                    // the collector's word when it gave one, else the backoff
                    let pause = after.unwrap_or(wait);
                    debug!(endpoint = %self.settings.endpoint, attempt, error = %why, ?pause, "OTLP export failed; retrying");
                    tokio::time::sleep(pause).await;
                    wait = wait.saturating_mul(2);
                }
            }
        }
    }

    /// A new connection to the collector (TCP, TLS for https, HTTP/1.1).
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let t = &self.target;
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", t.host, t.port))?;
        let _ = tcp.set_nodelay(true);
        let sender = match &t.tls {
            None => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "OTLP connection ended");
                    }
                });
                sender
            }
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", t.host))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "OTLP connection ended");
                    }
                });
                sender
            }
        };
        Ok(sender)
    }

    async fn send(&self, body: Bytes) -> Sent {
        let req = match Request::builder()
            .method(Method::POST)
            .uri(self.target.path.as_str())
            .header(header::HOST, self.target.authority.as_str())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
        {
            Ok(r) => r,
            Err(e) => return Sent::Refused(e.to_string()),
        };
        let mut link = self.link.lock().await;
        let exchange = async {
            // the kept connection while it is open and was used lately
            let kept = link
                .take()
                .filter(|l| !l.sender.is_closed() && l.used.elapsed() < IDLE_RECONNECT);
            let mut sender = match kept {
                Some(l) => l.sender,
                None => self.connect().await?,
            };
            sender.ready().await.map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| retry_after(v.as_bytes(), self.settings.max_retry_after));
            // a collector's answer is small; cap what is read of it
            let body = http_body_util::Limited::new(resp.into_body(), 64 << 10)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((sender, status, after, body))
        };
        let (sender, status, after, body) =
            match tokio::time::timeout(self.settings.timeout, exchange).await {
                Err(_) => {
                    return Sent::Retry(
                        format!("no answer within {:?}", self.settings.timeout),
                        None,
                    )
                }
                Ok(Err(e)) => return Sent::Retry(e, None),
                Ok(Ok(x)) => x,
            };
        // kept for the next batch (a connection the collector closes is
        // noticed then)
        *link = Some(Link {
            sender,
            used: tokio::time::Instant::now(),
        });
        if status.is_success() {
            let rejected = proto::ExportTraceServiceResponse::decode(body)
                .ok()
                .and_then(|r| r.partial_success)
                .map(|p| u64::try_from(p.rejected_spans).unwrap_or(0))
                .unwrap_or(0);
            Sent::Accepted { rejected }
        } else if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            Sent::Retry(format!("answered {status}"), after)
        } else if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
        ) {
            Sent::Retry(format!("answered {status}"), None)
        } else {
            Sent::Refused(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{atomic::AtomicUsize, Arc},
    };

    use hyper::{body::Incoming, service::service_fn, Response};
    use hyper_util::rt::TokioIo;
    use tidemesh_evidence::{
        record::{IdentityEvidence, TlsVersion},
        samples, Chain, NewRecord, SpanId, TraceId, UnixMillis,
    };

    use super::*;

    fn spoke() -> SpiffeId {
        SpiffeId::parse("spiffe://edge.test/store/sf01/node/n1").unwrap()
    }

    fn request(seq: u64, inbound: bool) -> RequestEvidence {
        let RecordBody::Request(mut q) = samples::request(seq, UnixMillis(1_700_000_000_000))
        else {
            panic!("a request")
        };
        q.enforcement_point = if inbound {
            EnforcementPoint::SidecarInbound
        } else {
            EnforcementPoint::SidecarOutbound
        };
        q.identity = Some(IdentityEvidence {
            client_identity: SpiffeId::parse("spiffe://edge.test/store/sf01/sa/pos").ok(),
            server_identity: SpiffeId::parse("spiffe://edge.test/store/sf01/sa/inventory").ok(),
            certificate_fingerprint: None,
            tls_version: TlsVersion::Tls13,
            cipher_suite: None,
            trust_chain_verified: true,
            handshake_duration_us: None,
        });
        q.service_name = "inventory.store".into();
        q.telemetry.trace_id = Some(TraceId([7; 16]));
        q.telemetry.span_id = Some(SpanId([seq as u8; 8]));
        q.telemetry.parent_span_id = Some(SpanId([9; 8]));
        q.telemetry.start_time = UnixMillis(1_700_000_000_123);
        q.telemetry.duration_us = 2_500;
        *q
    }

    #[test]
    fn a_record_becomes_a_span_with_its_ids_times_and_resource() {
        let out = span_of(&spoke(), 42, &request(1, false)).unwrap();
        assert_eq!(out.resource.service, "pos", "the calling workload");
        assert_eq!(out.resource.spoke, "spiffe://edge.test/store/sf01/node/n1");
        assert_eq!(out.resource.store, "sf01");
        let sp = &out.span;
        assert_eq!(sp.kind, proto::SPAN_KIND_CLIENT);
        assert_eq!(sp.trace_id, vec![7; 16]);
        assert_eq!(sp.span_id, vec![1; 8]);
        assert_eq!(sp.parent_span_id, vec![9; 8]);
        assert_eq!(sp.start_time_unix_nano, 1_700_000_000_123_000_000);
        assert_eq!(sp.end_time_unix_nano - sp.start_time_unix_nano, 2_500_000);
        assert_eq!(
            sp.flags, 0x301,
            "sampled, parent remote (the app's span, from its traceparent)"
        );
        assert_eq!(sp.status.as_ref().unwrap().code, proto::STATUS_CODE_OK);
        let attr = |k: &str| {
            sp.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            attr("peer.service"),
            Some(proto::any_value::Value::StringValue(
                "inventory.store".into()
            ))
        );
        assert_eq!(
            attr("tidemesh.mode"),
            Some(proto::any_value::Value::StringValue("target".into()))
        );
        assert_eq!(
            attr("tidemesh.evidence_seq"),
            Some(proto::any_value::Value::IntValue(42))
        );
        assert_eq!(
            attr("tidemesh.source.principal"),
            Some(proto::any_value::Value::StringValue(
                "spiffe://edge.test/store/sf01/sa/pos".into()
            ))
        );
        // the serving side: kind server, the served service, remote parent
        let inb = span_of(&spoke(), 43, &request(2, true)).unwrap();
        assert_eq!(inb.resource.service, "inventory.store");
        assert_eq!(inb.span.kind, proto::SPAN_KIND_SERVER);
        assert_eq!(inb.span.flags, 0x301);
        // a root span has no parent id
        let mut root = request(3, false);
        root.telemetry.parent_span_id = None;
        assert!(span_of(&spoke(), 1, &root)
            .unwrap()
            .span
            .parent_span_id
            .is_empty());
        // an error
        let mut failed = request(4, false);
        failed.telemetry.status.code = SpanStatus::Error;
        failed.telemetry.status.message = "no endpoint".into();
        let st = span_of(&spoke(), 1, &failed).unwrap().span.status.unwrap();
        assert_eq!(
            (st.code, st.message.as_str()),
            (proto::STATUS_CODE_ERROR, "no endpoint")
        );
    }

    #[test]
    fn unsampled_drill_and_other_records_are_not_spans_and_only_new_records_are() {
        let mut unsampled = request(1, true);
        unsampled.trace_sampled = false;
        assert!(span_of(&spoke(), 1, &unsampled).is_none());
        let mut drill = request(1, true);
        drill.drill = Some(tidemesh_evidence::record::DrillMarker {
            run: "r".into(),
            index: 0,
        });
        assert!(span_of(&spoke(), 1, &drill).is_none());
        let mut untraced = request(1, true);
        untraced.telemetry.trace_id = None;
        assert!(span_of(&spoke(), 1, &untraced).is_none());
        // a batch: only the records this commit stored become spans
        let mut chain = Chain::genesis(&spoke());
        let records: Vec<SealedRecord> = (1..=4)
            .map(|i| {
                let body = match i {
                    3 => samples::drill_request("r", 0, UnixMillis(1)),
                    _ => RecordBody::Request(Box::new(request(i, true))),
                };
                chain.append(NewRecord::new(UnixMillis(i), body)).unwrap()
            })
            .collect();
        let seqs =
            |v: Vec<PendingSpan>| -> Vec<u8> { v.iter().map(|p| p.span.span_id[0]).collect() };
        assert_eq!(seqs(spans_of(&spoke(), &records, Some(1))), vec![1, 2, 4]);
        assert_eq!(seqs(spans_of(&spoke(), &records, Some(2))), vec![2, 4]);
        assert!(spans_of(&spoke(), &records, None).is_empty());
    }

    #[test]
    fn spans_are_grouped_by_resource_and_round_trip() {
        let spans = vec![
            span_of(&spoke(), 1, &request(1, false)).unwrap(),
            span_of(&spoke(), 2, &request(2, true)).unwrap(),
            span_of(&spoke(), 3, &request(3, false)).unwrap(),
        ];
        let req = export_request(spans);
        assert_eq!(req.resource_spans.len(), 2);
        let bytes = req.encode_to_vec();
        let back = proto::ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
        let names: Vec<(String, usize)> = back
            .resource_spans
            .iter()
            .map(|r| {
                let res = r.resource.as_ref().unwrap();
                let name = match res.attributes[0].value.as_ref().unwrap().value.as_ref() {
                    Some(proto::any_value::Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                };
                (name, r.scope_spans[0].spans.len())
            })
            .collect();
        assert_eq!(
            names,
            vec![("inventory.store".into(), 1), ("pos".into(), 2)]
        );
    }

    #[test]
    fn endpoints_are_http_or_https_urls() {
        assert!(parse_endpoint("http://127.0.0.1:4318/v1/traces").is_ok());
        assert!(parse_endpoint("http://collector/v1/traces").is_ok());
        assert!(parse_endpoint("https://collector:4318/v1/traces").is_ok());
        assert!(parse_endpoint("collector:4318").is_err());
        assert!(parse_endpoint("not a url").is_err());
        let ftp = parse_endpoint("ftp://x/").unwrap_err();
        assert!(ftp.contains("http:// or https://"), "{ftp}");
        let creds = parse_endpoint("https://u:p@collector/v1/traces").unwrap_err();
        assert!(creds.contains("credentials"), "{creds}");
        // where requests go: host, port (the scheme's default), Host, path
        let t = Target::of(&"http://[::1]/v1/traces".parse().unwrap(), None).unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            ("::1", 80, "[::1]", "/v1/traces")
        );
        assert!(t.tls.is_none());
        let roots = Arc::new(rustls::RootCertStore::empty());
        let t = Target::of(&"https://otel.example:4318".parse().unwrap(), Some(roots)).unwrap();
        assert_eq!((t.port, t.path.as_str()), (4318, "/"));
        let t = Target::of(
            &"https://otel.example/v1/traces".parse().unwrap(),
            Some(Arc::new(rustls::RootCertStore::empty())),
        )
        .unwrap();
        assert_eq!(t.port, 443);
        assert_eq!(
            t.tls.map(|(_, n)| n.to_str().into_owned()),
            Some("otel.example".to_owned())
        );
    }

    #[test]
    fn retry_after_seconds_are_honoured_up_to_the_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(retry_after(b"1", max), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(b" 30 ", max), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(b"0", max), Some(Duration::ZERO));
        assert_eq!(retry_after(b"3600", max), Some(max), "capped");
        assert_eq!(
            retry_after(b"99999999999999999999", max),
            Some(max),
            "an overflow is capped too"
        );
        // the date form, junk and signs fall back to the backoff
        assert_eq!(retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", max), None);
        assert_eq!(retry_after(b"-1", max), None);
        assert_eq!(retry_after(b"1.5", max), None);
        assert_eq!(retry_after(b"", max), None);
        assert_eq!(retry_after(b"\xff", max), None);
        assert_eq!(retry_after(&[b'9'; 21], max), None, "too long");
    }

    fn settings(addr: SocketAddr) -> OtlpSettings {
        OtlpSettings {
            queue: 8,
            batch: 4,
            flush: Duration::from_millis(20),
            attempts: 3,
            backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(2),
            ..OtlpSettings::new(format!("http://{addr}/v1/traces").parse().unwrap())
        }
    }

    /// What a test collector got: the accepted requests, and when each
    /// request (accepted or not) arrived.
    type Got = Arc<Mutex<Vec<proto::ExportTraceServiceRequest>>>;
    type Arrivals = Arc<Mutex<Vec<tokio::time::Instant>>>;

    /// A collector on loopback that answers the first `fail` requests
    /// with `status`, then 200, and keeps what it accepted.
    async fn collector(
        fail: usize,
        status: StatusCode,
    ) -> (
        SocketAddr,
        Arc<Mutex<Vec<proto::ExportTraceServiceRequest>>>,
        Arc<AtomicUsize>,
    ) {
        let (addr, got, seen, _) = collector_with(fail, status, None, None).await;
        (addr, got, seen)
    }

    /// [`collector`], its refusals carrying `Retry-After: retry_after`,
    /// serving TLS with `tls` when given; also when each request came.
    async fn collector_with(
        fail: usize,
        status: StatusCode,
        retry_after: Option<&'static str>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (SocketAddr, Got, Arc<AtomicUsize>, Arrivals) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(AtomicUsize::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (g, n, a) = (got.clone(), seen.clone(), arrivals.clone());
        tokio::spawn(async move {
            loop {
                let Ok((c, _)) = l.accept().await else { return };
                let (g, n, a) = (g.clone(), n.clone(), a.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (g, n, a) = (g.clone(), n.clone(), a.clone());
                        async move {
                            a.lock().unwrap().push(tokio::time::Instant::now());
                            let ct = req.headers().get(header::CONTENT_TYPE).cloned();
                            let host = req.headers().get(header::HOST).cloned();
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let i = n.fetch_add(1, Ordering::SeqCst);
                            if i < fail {
                                let mut r = Response::builder().status(status);
                                if let Some(v) = retry_after {
                                    r = r.header(header::RETRY_AFTER, v);
                                }
                                return Ok::<_, std::convert::Infallible>(
                                    r.body(Full::new(Bytes::new())).unwrap(),
                                );
                            }
                            assert_eq!(ct.unwrap(), "application/x-protobuf");
                            assert_eq!(path, "/v1/traces");
                            assert!(host.is_some(), "a Host header");
                            let req = proto::ExportTraceServiceRequest::decode(body).unwrap();
                            g.lock().unwrap().push(req);
                            let answer = proto::ExportTraceServiceResponse::default();
                            Ok(Response::new(Full::new(Bytes::from(
                                answer.encode_to_vec(),
                            ))))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(c), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(c) = acceptor.accept(c).await {
                                let _ = http.serve_connection(TokioIo::new(c), svc).await;
                            }
                        }
                    }
                });
            }
        });
        (addr, got, seen, arrivals)
    }

    /// The span ids a collector accepted, in order.
    fn span_ids(got: &Got) -> Vec<u8> {
        got.lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|r| r.scope_spans.iter())
            .flat_map(|s| s.spans.iter())
            .map(|s| s.span_id[0])
            .collect()
    }

    fn pending(n: u8) -> Vec<PendingSpan> {
        (1..=n)
            .map(|i| span_of(&spoke(), u64::from(i), &request(u64::from(i), true)).unwrap())
            .collect()
    }

    async fn until(f: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("in time");
    }

    #[tokio::test]
    async fn spans_are_posted_in_batches_and_retried_through_a_busy_collector() {
        let (addr, got, seen) = collector(2, StatusCode::SERVICE_UNAVAILABLE).await;
        let x = Arc::new(Exporter::new(settings(addr)).unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let x = x.clone();
            tokio::spawn(async move {
                x.run(async {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        x.offer(pending(6));
        until(|| x.counters.exported.load(Ordering::Relaxed) == 6).await;
        let c = &x.counters;
        assert_eq!(c.failures.load(Ordering::Relaxed), 2, "two 503s, retried");
        assert_eq!(c.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(seen.load(Ordering::SeqCst), 4, "2 refused + 2 batches");
        let batches: Vec<usize> = got
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                r.resource_spans
                    .iter()
                    .map(|s| s.scope_spans[0].spans.len())
                    .sum()
            })
            .collect();
        assert_eq!(batches, vec![4, 2], "batches of at most 4");
        let _ = stop_tx.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_a_dead_collector_costs_bounded_tries() {
        // nothing listens there
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let x = Arc::new(Exporter::new(settings(addr)).unwrap());
        // the task is not running: the queue holds 8 of 11
        x.offer(pending(11));
        assert_eq!(x.queued(), 8);
        assert_eq!(x.counters.dropped.load(Ordering::Relaxed), 3);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let x = x.clone();
            tokio::spawn(async move {
                x.run(async {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        // two batches of 4, 3 tries each, then dropped
        until(|| x.counters.dropped.load(Ordering::Relaxed) == 11).await;
        assert_eq!(x.counters.failures.load(Ordering::Relaxed), 6);
        assert_eq!(x.counters.exported.load(Ordering::Relaxed), 0);
        assert_eq!(x.queued(), 0);
        // a collector that refuses outright: one try, dropped
        let (addr, got, _) = collector(usize::MAX, StatusCode::BAD_REQUEST).await;
        let y = Exporter::new(settings(addr)).unwrap();
        y.offer(pending(2));
        let batch = y.take_batch();
        y.export(batch).await;
        assert_eq!(y.counters.failures.load(Ordering::Relaxed), 1);
        assert_eq!(y.counters.dropped.load(Ordering::Relaxed), 2);
        assert!(got.lock().unwrap().is_empty());
        let _ = stop_tx.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn retry_after_from_a_busy_collector_is_waited_and_nothing_is_lost_or_sent_twice() {
        // 429 with Retry-After: 1, then 503 with Retry-After: 1, then 200;
        // the exporter's own backoff is 10 ms
        let (addr, got, seen, arrivals) =
            collector_with(2, StatusCode::TOO_MANY_REQUESTS, Some("1"), None).await;
        let x = Exporter::new(settings(addr)).unwrap();
        x.offer(pending(3));
        let batch = x.take_batch();
        let t0 = tokio::time::Instant::now();
        x.export(batch).await;
        let took = t0.elapsed();
        assert_eq!(x.counters.exported.load(Ordering::Relaxed), 3);
        assert_eq!(x.counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(x.counters.failures.load(Ordering::Relaxed), 2);
        assert_eq!(seen.load(Ordering::SeqCst), 3, "two refusals, one accept");
        assert_eq!(span_ids(&got), vec![1, 2, 3], "each span once");
        let at = arrivals.lock().unwrap().clone();
        for w in at.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= Duration::from_millis(950),
                "the retry waited Retry-After, not the 10 ms backoff: {gap:?}"
            );
        }
        assert!(took < Duration::from_secs(5), "{took:?}");

        // a Retry-After beyond the cap waits the cap
        let (addr, got, _, arrivals) =
            collector_with(1, StatusCode::SERVICE_UNAVAILABLE, Some("3600"), None).await;
        let x = Exporter::new(OtlpSettings {
            max_retry_after: Duration::from_millis(300),
            ..settings(addr)
        })
        .unwrap();
        x.offer(pending(2));
        let batch = x.take_batch();
        x.export(batch).await;
        assert_eq!(span_ids(&got), vec![1, 2]);
        let at = arrivals.lock().unwrap().clone();
        let gap = at[1] - at[0];
        assert!(
            gap >= Duration::from_millis(280) && gap < Duration::from_secs(3),
            "{gap:?}"
        );
    }

    /// A CA and a server certificate for 127.0.0.1 and `localhost` it
    /// signed: the CA's roots and the server's TLS acceptor.
    fn tls_pki() -> (Arc<rustls::RootCertStore>, tokio_rustls::TlsAcceptor) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        (
            Arc::new(roots),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        )
    }

    #[tokio::test]
    async fn an_https_collector_is_verified_and_gets_the_spans() {
        let (roots, acceptor) = tls_pki();
        let (addr, got, _, _) =
            collector_with(0, StatusCode::OK, None, Some(acceptor.clone())).await;
        let https = |addr: SocketAddr| OtlpSettings {
            endpoint: format!("https://{addr}/v1/traces").parse().unwrap(),
            ..settings(addr)
        };
        let x = Exporter::with_roots(https(addr), Some(roots)).unwrap();
        x.offer(pending(4));
        let batch = x.take_batch();
        x.export(batch).await;
        assert_eq!(x.counters.exported.load(Ordering::Relaxed), 4);
        // the kept connection carries the next batch
        x.offer(pending(2));
        let batch = x.take_batch();
        x.export(batch).await;
        assert_eq!(span_ids(&got), vec![1, 2, 3, 4, 1, 2]);

        // a collector whose certificate the roots do not vouch for gets
        // nothing: every try fails, the batch is dropped
        let (other_roots, _) = tls_pki();
        let (addr, got, seen, _) = collector_with(0, StatusCode::OK, None, Some(acceptor)).await;
        let y = Exporter::with_roots(https(addr), Some(other_roots)).unwrap();
        y.offer(pending(2));
        let batch = y.take_batch();
        y.export(batch).await;
        assert_eq!(y.counters.exported.load(Ordering::Relaxed), 0);
        assert_eq!(y.counters.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(y.counters.failures.load(Ordering::Relaxed), 3);
        assert_eq!(seen.load(Ordering::SeqCst), 0, "no request got through");
        assert!(got.lock().unwrap().is_empty());
    }
}
