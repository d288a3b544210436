//! Prometheus metrics and health: a text-format (0.0.4) writer, and the
//! metrics listener (hyper, HTTP/1.1) serving `GET /metrics`, `GET /healthz`
//! and `GET /readyz`, plus the client side of `/readyz` for `healthcheck`.
//!
//! Who drives it: the hub's `serve --metrics ADDR` and the spoke's
//! `run --metrics ADDR`; each renders its counters into a [`Exposition`] on
//! every scrape (no registry, no background work: values are read from the
//! live state when asked). What it must not do: block on a slow scraper or
//! trust its bytes: the request head is bounded ([`MAX_REQUEST_HEAD`], hyper
//! answers 431 past it) and the whole exchange is timed out, connections are
//! capped ([`MAX_CONNECTIONS`]).

use std::{fmt::Write as _, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::debug;

use crate::http::{full, Body};

/// Longest request head accepted from a scraper.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Scrapes served at once; more wait for a slot.
pub const MAX_CONNECTIONS: usize = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic; the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in cumulative buckets: samples are written with
    /// [`Exposition::histogram`].
    Histogram,
}

/// A metrics page being written. Families are written whole: call
/// [`Exposition::family`] once per name, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    current: Option<String>,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Exposition {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self.current = Some(name.to_owned());
        self
    }

    /// A sample of the current family, with labels.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Exposition {
        let name = self.current.clone().unwrap_or_default();
        self.out.push_str(&name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
        self
    }

    /// One labelled histogram of the current family (started with
    /// [`Kind::Histogram`]): `buckets` are (upper bound, observations at or
    /// below it, cumulative) in increasing order; `+Inf`, `_sum` and
    /// `_count` are added.
    pub fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) -> &mut Exposition {
        let name = self.current.clone().unwrap_or_default();
        self.current = Some(format!("{name}_bucket"));
        for (le, n) in buckets {
            let le = format_value(*le);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&with_le, *n as f64);
        }
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&with_le, count as f64);
        self.current = Some(format!("{name}_sum"));
        self.sample(labels, sum);
        self.current = Some(format!("{name}_count"));
        self.sample(labels, count as f64);
        self.current = Some(name);
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Exposition {
        self.family(name, kind, help).sample(&[], value)
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Binds `addr` now (so a bad address fails before anything else starts).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What `GET /readyz` answers: 200 with the reason when ready, 503 with
/// the reason when not. The reason is one short line for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Whether the process can do its job now.
    pub ready: bool,
    /// Why (or why not), one line.
    pub reason: String,
}

impl Readiness {
    /// Ready, because `reason`.
    pub fn ready(reason: impl Into<String>) -> Readiness {
        Readiness {
            ready: true,
            reason: reason.into(),
        }
    }

    /// Not ready, because `reason`.
    pub fn not_ready(reason: impl Into<String>) -> Readiness {
        Readiness {
            ready: false,
            reason: reason.into(),
        }
    }
}

/// Serves, on the metrics listener, with hyper's HTTP/1.1 server:
/// - `GET /metrics`: the page `render` makes at each scrape;
/// - `GET /healthz`: 200 `ok` while the process answers at all;
/// - `GET /readyz`: what `ready` says, 200 or 503 with a one-line reason.
///
/// `HEAD` is answered as `GET` without a body; other paths get 404, other
/// methods 405. One request per connection (the answer closes it). Runs
/// until the task is dropped.
pub async fn serve<R, F, Q, G>(listener: TcpListener, render: R, ready: Q)
where
    R: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
    Q: Fn() -> G + Send + Sync + 'static,
    G: Future<Output = Readiness> + Send + 'static,
{
    let render = Arc::new(render);
    let ready = Arc::new(ready);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (render, ready) = (render.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (render, ready) = (render.clone(), ready.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(req, &*render, &*ready).await) }
            });
            let mut server = crate::http::http1_server(IO_TIMEOUT, MAX_REQUEST_HEAD);
            server.keep_alive(false);
            let conn = server.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(IO_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => debug!(%peer, "metrics request timed out"),
            }
            drop(permit);
        });
    }
}

async fn answer<R, F, Q, G>(
    req: hyper::Request<hyper::body::Incoming>,
    render: &R,
    ready: &Q,
) -> hyper::Response<Body>
where
    R: Fn() -> F,
    F: Future<Output = String>,
    Q: Fn() -> G,
    G: Future<Output = Readiness>,
{
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, EXPOSITION, render().await),
        "/healthz" => text(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            let r = ready().await;
            let status = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let line = crate::http::sanitize(&r.reason);
            text(status, TEXT, format!("{line}\n"))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            TEXT,
            "see /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

fn text(status: StatusCode, content_type: &'static str, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// What a probe of `/readyz` found ([`probe_ready`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// 200: ready, with the reason line.
    Ready(String),
    /// Any other status: not ready, with the status and the reason line.
    NotReady(u16, String),
    /// Nothing answered (refused, timed out, not HTTP).
    Unreachable(String),
}

/// Longest `/readyz` body [`probe_ready`] reads.
const MAX_PROBE_BODY: usize = 4096;

/// `GET /readyz` on `addr` within `timeout` (connect, request and answer
/// together), for the `healthcheck` subcommands.
pub async fn probe_ready(addr: SocketAddr, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, probe(addr)).await {
        Ok(Ok((200, body))) => Probe::Ready(body),
        Ok(Ok((status, body))) => Probe::NotReady(status, body),
        Ok(Err(e)) => Probe::Unreachable(e),
        Err(_) => Probe::Unreachable(format!("no answer within {timeout:?}")),
    }
}

async fn probe(addr: SocketAddr) -> Result<(u16, String), String> {
    use http_body_util::BodyExt as _;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get("/readyz")
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "tidemesh-healthcheck")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    let line = String::from_utf8_lossy(&body);
    Ok((status, crate::http::sanitize(line.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_and_escapes_labels() {
        let mut e = Exposition::new();
        e.single("tidemesh_spoke_ready", Kind::Gauge, "Up.", 1.0);
        e.family(
            "tidemesh_hub_evidence_records_total",
            Kind::Counter,
            "Records\nstored.",
        )
        .sample(&[("spoke", "a\"b\\c")], 3.0)
        .sample(&[("spoke", "x"), ("kind", "y")], 0.5);
        let page = e.finish();
        assert_eq!(
            page,
            "# HELP tidemesh_spoke_ready Up.\n# TYPE tidemesh_spoke_ready gauge\ntidemesh_spoke_ready 1\n\
             # HELP tidemesh_hub_evidence_records_total Records\\nstored.\n# TYPE tidemesh_hub_evidence_records_total counter\n\
             tidemesh_hub_evidence_records_total{spoke=\"a\\\"b\\\\c\"} 3\n\
             tidemesh_hub_evidence_records_total{spoke=\"x\",kind=\"y\"} 0.5\n"
        );
        let mut e = Exposition::new();
        e.family("t_seconds", Kind::Histogram, "Latency.")
            .histogram(&[("svc", "a")], &[(0.005, 1), (0.5, 3)], 4, 2.25);
        assert_eq!(
            e.finish(),
            "# HELP t_seconds Latency.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{svc=\"a\",le=\"0.005\"} 1\n\
             t_seconds_bucket{svc=\"a\",le=\"0.5\"} 3\n\
             t_seconds_bucket{svc=\"a\",le=\"+Inf\"} 4\n\
             t_seconds_sum{svc=\"a\"} 2.25\n\
             t_seconds_count{svc=\"a\"} 4\n"
        );
    }

    async fn get(addr: SocketAddr, req: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&req).await.expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_readiness_404_and_bounds_the_head() {
        let l = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ready.clone();
        let task = tokio::spawn(serve(
            l,
            || async { "m 1\n".to_string() },
            move || {
                let r = r.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if r {
                        Readiness::ready("serving")
                    } else {
                        Readiness::not_ready("waiting for config\nsecond line")
                    }
                }
            },
        ));
        // a scraper that neither says `Connection: close` nor closes gets
        // its answer and the end of the connection (one request each)
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nm 1\n"), "{ok}");
        let head = get(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body for HEAD: {head}");
        let alive = get(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(alive.starts_with("HTTP/1.1 200 OK"), "{alive}");
        assert!(alive.ends_with("\r\n\r\nok\n"), "{alive}");
        let not = get(addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(not.starts_with("HTTP/1.1 503"), "{not}");
        // one line, whatever the reason held
        assert!(
            not.ends_with("\r\n\r\nwaiting for config?second line\n"),
            "{not}"
        );
        assert_eq!(
            probe_ready(addr, Duration::from_secs(2)).await,
            Probe::NotReady(503, "waiting for config?second line".into())
        );
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let yes = get(
            addr,
            b"GET /readyz?verbose HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        )
        .await;
        assert!(yes.starts_with("HTTP/1.1 200 OK"), "{yes}");
        assert!(yes.ends_with("\r\n\r\nserving\n"), "{yes}");
        assert_eq!(
            probe_ready(addr, Duration::from_secs(2)).await,
            Probe::Ready("serving".into())
        );
        let nf = get(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = get(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(),
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let mut big = b"GET /metrics HTTP/1.1\r\nx-big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        big.extend(b"\r\n\r\n");
        let too_big = get(addr, big).await;
        assert!(too_big.starts_with("HTTP/1.1 431"), "{too_big}");
        let garbage = get(addr, b"\x00\x01 not http at all\r\n\r\n".to_vec()).await;
        assert!(
            garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
            "{garbage:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn probe_names_an_unreachable_or_silent_endpoint() {
        // nothing listens: refused at once
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        match probe_ready(free, Duration::from_secs(2)).await {
            Probe::Unreachable(e) => assert!(e.contains("cannot connect"), "{e}"),
            other => panic!("expected unreachable, got {other:?}"),
        }
        // a listener that accepts and never answers: the deadline holds
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let t = std::time::Instant::now();
        match probe_ready(addr, Duration::from_millis(300)).await {
            Probe::Unreachable(e) => assert!(e.contains("no answer within"), "{e}"),
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        hold.abort();
    }
}
