//! HTTP pieces both ends of a data stream use: the spoke's proxy and the
//! hub's gateway.
//!
//! What it is: the body type, proxy-made responses (a reason in the body
//! and in `x-tidemesh-reason`), hop-by-hop header stripping, the bounded
//! HTTP/1.1 server settings, and reading a data stream's
//! [`StreamHeader`]. Who drives it: `tidemesh-spoke`'s data plane and
//! `tidemesh-hub`'s gateway. What it must not do: decide anything (routing
//! and authorization live in `tidemesh-policy`), or read an unbounded
//! header.

use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Bytes, header::HeaderValue, server::conn::http1, StatusCode};
use hyper_util::rt::TokioTimer;
use tidemesh_proto::{
    data::{header_len, StreamHeader},
    LEN_PREFIX,
};

/// The body type requests and responses use on the proxy paths.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The header a proxy-made response carries its reason in.
pub const REASON: &str = "x-tidemesh-reason";

/// The header a proxy-made response sets when the hub could not be reached.
pub const HUB_STATUS: &str = "x-tidemesh-hub";

/// The header the hub gateway names the cloud endpoint it chose in.
pub const UPSTREAM: &str = "x-tidemesh-upstream";
/// What the hub gateway's TLS leg to a cloud endpoint negotiated, when it
/// originated TLS: `1.3 TLS13_AES_256_GCM_SHA384 SIMPLE sni=api.example`.
pub const UPSTREAM_TLS: &str = "x-tidemesh-upstream-tls";

/// `x-forwarded-client-cert`.
pub const XFCC: &str = "x-forwarded-client-cert";

/// A body of bytes already in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response made by the proxy itself, with a reason in the body and in
/// `x-tidemesh-reason`, plus `extra` headers.
pub fn local_response(
    status: StatusCode,
    reason: &str,
    extra: &[(&'static str, String)],
) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(format!("{reason}\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&sanitize(reason)) {
        h.insert(REASON, v);
    }
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    r
}

/// `s` as a header value: printable ASCII, at most 200 characters.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the `Connection` header
/// names: never forwarded. Two exceptions keep gRPC working through every
/// hop: a `te` offering trailers is forwarded as `te: trailers` (the only
/// `te` HTTP/2 allows, and what gRPC servers require), and `trailer`, which
/// names the trailer fields a message ends with (end to end in RFC 9110; an
/// HTTP/1.1 hop sends only the trailers it names), is kept.
pub fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    let trailers = h
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    let named: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty() && s != "trailer")
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
    if trailers {
        h.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The trailer fields a gRPC answer ends with.
pub const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// Names gRPC's trailer fields in a gRPC response that does not say which
/// trailers follow (HTTP/2 servers need not): an HTTP/1.1 hop on the way
/// back (the spoke-to-spoke tunnel) sends only the trailers a `trailer`
/// header names, and without `grpc-status` the caller sees a failed call.
pub fn announce_grpc_trailers(h: &mut hyper::HeaderMap) {
    let grpc = h
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc
        && !h.contains_key(hyper::header::TRAILER)
        && !h.contains_key(hyper::header::CONTENT_LENGTH)
    {
        h.insert(
            hyper::header::TRAILER,
            HeaderValue::from_static(GRPC_TRAILERS),
        );
    }
}

/// HTTP/1.1 server settings for untrusted peers: a deadline and a size
/// limit on the request head.
pub fn http1_server(header_timeout: Duration, max_header_bytes: usize) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_header_bytes.max(8192))
        .max_headers(100);
    b
}

/// The server for apps' connections: HTTP/1.1, or HTTP/2 with prior
/// knowledge (h2c), told apart by the connection preface; the same head
/// deadline and size limit for both, and at most `max_streams` concurrent
/// HTTP/2 streams per connection.
pub fn app_server(
    header_timeout: Duration,
    max_header_bytes: usize,
    max_streams: u32,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_header_bytes.max(8192))
        .max_headers(100);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    b
}

/// `req` as an HTTP/1.1 request in origin form, whatever it arrived as
/// (an HTTP/2 request names its authority in the URI, not in `Host`).
pub fn to_http1<B>(req: &mut hyper::Request<B>) {
    if req.headers().get(hyper::header::HOST).is_none() {
        if let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        if let Ok(u) = hyper::Uri::try_from(path_and_query(req.uri())) {
            *req.uri_mut() = u;
        }
    }
    *req.version_mut() = hyper::Version::HTTP_11;
}

/// Reads a data stream's length-prefixed header (the length is checked
/// before anything else is read).
pub async fn read_stream_header(recv: &mut quinn::RecvStream) -> Result<StreamHeader, String> {
    let mut prefix = [0u8; LEN_PREFIX];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = header_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    StreamHeader::decode(&body).map_err(|e| e.to_string())
}

/// The path and query of a request URI (`/` when absent).
pub fn path_and_query(uri: &hyper::Uri) -> String {
    uri.path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = hyper::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_and_the_trailer_header_survive_for_grpc() {
        let mut h = hyper::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("TE, close"));
        h.insert("te", HeaderValue::from_static("gzip;q=0.5, Trailers"));
        h.insert("trailer", HeaderValue::from_static("grpc-status"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.contains_key("trailer"));
        assert!(!h.contains_key("connection"));
        // a te without trailers goes, as any hop-by-hop header
        let mut h = hyper::HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn grpc_answers_name_their_trailers_once() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        announce_grpc_trailers(&mut h);
        assert_eq!(
            h.get("trailer").and_then(|v| v.to_str().ok()),
            Some(GRPC_TRAILERS)
        );
        // one the server named is left alone; other answers get none
        let mut named = hyper::HeaderMap::new();
        named.insert("content-type", HeaderValue::from_static("application/grpc"));
        named.insert("trailer", HeaderValue::from_static("grpc-status"));
        announce_grpc_trailers(&mut named);
        assert_eq!(named.get_all("trailer").iter().count(), 1);
        let mut json = hyper::HeaderMap::new();
        json.insert("content-type", HeaderValue::from_static("application/json"));
        announce_grpc_trailers(&mut json);
        assert!(!json.contains_key("trailer"));
    }

    #[test]
    fn local_responses_carry_a_printable_reason() {
        let r = local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub\nunreachable",
            &[(HUB_STATUS, "unreachable".into())],
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers().get(REASON).and_then(|v| v.to_str().ok()),
            Some("hub?unreachable")
        );
        assert_eq!(
            r.headers().get(HUB_STATUS).and_then(|v| v.to_str().ok()),
            Some("unreachable")
        );
    }
}
