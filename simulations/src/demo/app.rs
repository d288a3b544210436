//! The demo's store apps: tiny HTTP/1.1 servers (inventory at the store,
//! payments in the cloud) and the client the point-of-sale loop calls
//! through its spoke's outbound listener with.
//!
//! What it is: blocking std sockets, one thread per connection, at most
//! [`MAX_CONNECTIONS`] at once, request heads and bodies bounded. Who drives
//! it: `tidemesh-demo app` (the servers) and [`super::run`] (the client).
//! What it must not do: trust what it reads (sizes are capped, bad input
//! closes the connection) or block forever (every socket has a timeout).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;

/// Connections an app serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Largest request or response head read.
const MAX_HEAD: usize = 16 * 1024;
/// Largest body read.
const MAX_BODY: usize = 64 * 1024;

/// Binds `listen`, prints `listening=ADDR` on stdout and serves `name`'s
/// answers until the process ends.
pub fn serve(name: &str, listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    let addr = l.local_addr().context("local address")?;
    println!("listening={addr}");
    std::io::stdout().flush().context("stdout")?;
    let open = Arc::new(AtomicUsize::new(0));
    let name: Arc<str> = name.into();
    for conn in l.incoming() {
        let Ok(c) = conn else { continue };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (open, name) = (open.clone(), name.clone());
        std::thread::spawn(move || {
            let _ = answer(&name, c);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// Answers one request: 200 with a small JSON body naming the app.
fn answer(name: &str, mut c: TcpStream) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    let Some((head, _body)) = read_message(&mut c)? else {
        return Ok(());
    };
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/");
    let body = match name {
        "inventory" => format!("{{\"app\":\"inventory\",\"path\":{path:?},\"in_stock\":7}}"),
        "payments" => format!("{{\"app\":\"payments\",\"path\":{path:?},\"approved\":true}}"),
        other => format!("{{\"app\":{other:?},\"path\":{path:?}}}"),
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(resp.as_bytes())
}

/// Reads one HTTP/1.1 message: its head (as text) and a Content-Length
/// body. `None` when the peer closed first; an error for oversized input.
fn read_message(c: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut r = BufReader::new(c);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = (&mut r).take(MAX_HEAD as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        head.push_str(&line);
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return Err(std::io::Error::other("body too large"));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// One call's outcome as the calling app saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Status code; 0 when no answer came (the reason says why).
    pub status: u16,
    /// How long the call took.
    pub latency: Duration,
    /// Why it failed: the mesh's `x-tidemesh-reason` or hub header, or the
    /// socket error.
    pub reason: String,
}

/// An app's call: `method` `path` to `host` through the spoke's outbound
/// listener at `outbound`, `timeout` at most.
pub fn call(
    outbound: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Outcome {
    let t = Instant::now();
    let fail = |reason: String| Outcome {
        status: 0,
        latency: t.elapsed(),
        reason,
    };
    let mut c = match TcpStream::connect_timeout(&outbound, timeout) {
        Ok(c) => c,
        Err(e) => return fail(format!("connect {outbound}: {e}")),
    };
    let _ = c.set_read_timeout(Some(timeout));
    let _ = c.set_write_timeout(Some(timeout));
    let body = if method == "POST" {
        "{\"amount_cents\":1250}"
    } else {
        ""
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = c.write_all(req.as_bytes()) {
        return fail(format!("send: {e}"));
    }
    match read_message(&mut c) {
        Ok(Some((head, _))) => {
            let status = head
                .lines()
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let header = |name: &str| {
                head.lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_owned())
            };
            let reason = match (header("x-tidemesh-hub"), header("x-tidemesh-reason")) {
                (Some(h), _) => format!("hub {h}"),
                (None, Some(r)) => r,
                (None, None) => String::new(),
            };
            Outcome {
                status,
                latency: t.elapsed(),
                reason,
            }
        }
        Ok(None) => fail("closed without an answer".into()),
        Err(e) => fail(format!("no answer: {e}")),
    }
}
