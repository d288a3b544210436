//! `tidemesh-bench-hyper-floor`: the data plane bench's reference for what
//! the HTTP stack alone costs. A reverse proxy with nothing but hyper in it:
//! no routing, no policy, no evidence, no trace headers. Every request is
//! forwarded to one upstream and its answer streamed back. The bench runs
//! it beside the spoke and haproxy, so a reader can tell how much of the
//! spoke's added latency is hyper and tokio and how much is the spoke's own
//! work.
//!
//! Usage: `tidemesh-bench-hyper-floor LISTEN UPSTREAM MODE`, where MODE is
//! * `pooled`: tokio's multi-threaded runtime and hyper-util's pooled
//!   client, as the spoke is built;
//! * `affine`: a current-thread runtime, and one upstream connection per
//!   client connection, driven by hyper's low-level client (no pool, no
//!   task per response): the leanest shape hyper offers.
//!
//! Not part of the product; built with the workspace so the bench finds it.

use std::{convert::Infallible, net::SocketAddr, process::ExitCode, sync::Arc};

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    client::conn::http1::SendRequest,
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::{net::TcpStream, sync::Mutex};

type Body = BoxBody<Bytes, hyper::Error>;

fn bad_gateway(why: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(why)).map_err(|n| match n {}).boxed());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// Forwards over hyper-util's pooled client (a task per connection, the
/// pool's bookkeeping per request).
async fn pooled(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build_http();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_owned();
                    let resp = match format!("http://{upstream}{pq}").parse() {
                        Ok(uri) => {
                            *req.uri_mut() = uri;
                            match client.request(req).await {
                                Ok(r) => r.map(BodyExt::boxed),
                                Err(e) => bad_gateway(e.to_string()),
                            }
                        }
                        Err(e) => bad_gateway(format!("bad target: {e}")),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One upstream connection per client connection, made on its first
/// request and reused while it lives.
async fn affine(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let slot: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
            let svc = service_fn(move |req: Request<Incoming>| {
                let slot = slot.clone();
                async move {
                    let mut held = slot.lock().await;
                    if held.as_ref().is_none_or(SendRequest::is_closed) {
                        match connect(upstream).await {
                            Ok(s) => *held = Some(s),
                            Err(e) => return Ok(bad_gateway(e)),
                        }
                    }
                    let Some(sender) = held.as_mut() else {
                        return Ok(bad_gateway("no upstream connection".into()));
                    };
                    let resp = match sender.ready().await {
                        Ok(()) => match sender.send_request(req).await {
                            Ok(r) => r.map(BodyExt::boxed),
                            Err(e) => bad_gateway(e.to_string()),
                        },
                        Err(e) => bad_gateway(e.to_string()),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn connect(upstream: SocketAddr) -> Result<SendRequest<Incoming>, String> {
    let stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connect {upstream}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {upstream}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, mode] = args.as_slice() else {
        eprintln!("usage: tidemesh-bench-hyper-floor LISTEN UPSTREAM pooled|affine");
        return ExitCode::from(2);
    };
    let (Ok(listen), Ok(upstream)) = (listen.parse::<SocketAddr>(), upstream.parse()) else {
        eprintln!("error: LISTEN and UPSTREAM must be socket addresses (127.0.0.1:PORT)");
        return ExitCode::from(2);
    };
    let rt = match mode.as_str() {
        "pooled" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        "affine" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        other => {
            eprintln!("error: unknown mode {other:?} (pooled or affine)");
            return ExitCode::from(2);
        }
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let affine_mode = mode == "affine";
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if affine_mode {
            affine(listener, upstream).await;
        } else {
            pooled(listener, upstream).await;
        }
        ExitCode::SUCCESS
    })
}
