//! Prometheus metrics: a text-format (0.0.4) writer and a minimal HTTP
//! endpoint serving `GET /metrics`.
//!
//! Who drives it: the hub's `serve --metrics ADDR` and the spoke's
//! `run --metrics ADDR`; each renders its counters into a [`Exposition`] on
//! every scrape (no registry, no background work: values are read from the
//! live state when asked). What it must not do: block on a slow scraper or
//! trust its bytes: the request head is bounded ([`MAX_REQUEST_HEAD`]) and
//! timed out, connections are capped ([`MAX_CONNECTIONS`]).

use std::{fmt::Write as _, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::debug;

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

/// Serves `GET /metrics` with the page `render` makes at each scrape; other
/// paths get 404, other methods 405. Runs until the task is dropped.
pub async fn serve<R, F>(listener: TcpListener, render: R)
where
    R: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    let render = Arc::new(render);
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
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, handle(stream, &*render)).await {
                debug!(%peer, error = %e, "metrics scrape timed out");
            }
            drop(permit);
        });
    }
}

async fn handle<R, F>(mut stream: TcpStream, render: &R)
where
    R: Fn() -> F,
    F: Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            let _ = respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
            return;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        let _ = respond(&mut stream, "405 Method Not Allowed", "", "").await;
    } else if path != "/metrics" {
        let _ = respond(&mut stream, "404 Not Found", "text/plain", "see /metrics\n").await;
    } else {
        let body = render().await;
        let body = if method == "HEAD" { "" } else { &body };
        let _ = respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            body,
        )
        .await;
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_and_escapes_labels() {
        let mut e = Exposition::new();
        e.single("tidemesh_up", Kind::Gauge, "Up.", 1.0);
        e.family("tidemesh_records_total", Kind::Counter, "Records\nstored.")
            .sample(&[("spoke", "a\"b\\c")], 3.0)
            .sample(&[("spoke", "x"), ("kind", "y")], 0.5);
        let page = e.finish();
        assert_eq!(
            page,
            "# HELP tidemesh_up Up.\n# TYPE tidemesh_up gauge\ntidemesh_up 1\n\
             # HELP tidemesh_records_total Records\\nstored.\n# TYPE tidemesh_records_total counter\n\
             tidemesh_records_total{spoke=\"a\\\"b\\\\c\"} 3\n\
             tidemesh_records_total{spoke=\"x\",kind=\"y\"} 0.5\n"
        );
    }

    #[tokio::test]
    async fn serves_metrics_404_and_bounds_the_head() {
        let l = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(serve(l, || async { "m 1\n".to_string() }));
        let get = |req: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&req).await.expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        };
        let ok = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nm 1\n"), "{ok}");
        let nf = get(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = get(b"POST /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        let too_big = get(big).await;
        assert!(too_big.starts_with("HTTP/1.1 431"), "{too_big}");
        task.abort();
    }
}
