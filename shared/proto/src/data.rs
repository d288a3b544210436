//! The data tunnel (ALPN [`crate::ALPN_DATA`]): the header that opens every
//! proxied stream between spokes.
//!
//! Who drives it: the spoke's data plane (the calling spoke writes a
//! [`StreamHeader`] first on each bidirectional QUIC stream it opens, the
//! serving spoke reads and checks it before anything else). What it must not
//! do: I/O, clocks, or trust the caller's claims about *who* it is: the
//! source principal comes from mTLS, never from this header.
//!
//! # Stream layout
//! ```text
//! caller -> server: frame(StreamHeader) ++ the proxied bytes (HTTP/1.1 for Http1,
//!                   the app's bytes for Tcp, nothing for Probe)
//! server -> caller: the proxied bytes (the HTTP/1.1 response, the workload's bytes,
//!                   one frame(ProbeAnswer) for Probe)
//! ```
//! The header is one frame of the crate's codec (length prefix, protocol
//! version, postcard body), but bounded by [`MAX_HEADER`] rather than
//! [`crate::MAX_FRAME`], and its strings by [`MAX_NAME`]; [`header_len`]
//! checks the prefix before a byte of the body is read. One stream carries
//! one request (HTTP) or one connection (raw TCP; a refused connection's
//! stream is reset).

use serde::{Deserialize, Serialize};

use crate::{decode_payload, FrameError, LEN_PREFIX};

/// Most bytes of a header frame's payload.
pub const MAX_HEADER: usize = 2048;
/// Most bytes of a service or account name in the header (a DNS name).
pub const MAX_NAME: usize = 253;
/// Most bytes of a request id.
pub const MAX_REQUEST_ID: usize = 128;

/// What the stream carries after the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamProtocol {
    /// One HTTP/1.1 request and its response.
    Http1,
    /// A raw TCP connection's bytes, both ways, until each side finishes.
    Tcp,
    /// A mesh probe: the serving spoke itself answers with one
    /// [`ProbeAnswer`] frame and finishes (no workload is involved). What
    /// `tidemesh-spoke probe` and the drills use to show that mTLS between
    /// two spokes works, and with which certificates. Both ends record it.
    Probe,
    /// A routine reachability probe (the mode machine's measure of the
    /// site): answered like [`StreamProtocol::Probe`], recorded by neither
    /// end, so a store that probes its peers every few seconds for a month
    /// does not fill its evidence buffer with them.
    Reach,
}

/// The serving spoke's answer to a [`StreamProtocol::Probe`] (or
/// [`StreamProtocol::Reach`]) stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    /// The serving spoke's node ID.
    pub node: tidemesh_identity::SpiffeId,
    /// Its trusted time, ms since the Unix epoch.
    pub time_ms: u64,
    /// Whether its time is trusted (not degraded).
    pub time_trusted: bool,
    /// Whether it serves `service` with the workload the header names.
    pub serves: bool,
}

/// W3C trace context carried with the request (the caller's span).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// 128-bit trace id.
    pub trace_id: [u8; 16],
    /// The calling spoke's span id (the serving spoke's parent).
    pub span_id: [u8; 8],
    /// Sampled flag.
    pub sampled: bool,
}

/// The first frame on every data stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The canonical host of the service called, e.g. `payment-service.payments`.
    pub service: String,
    /// Service account of the workload at the serving spoke the caller's
    /// balancer picked.
    pub workload: String,
    /// What follows.
    pub protocol: StreamProtocol,
    /// Trace context, if the request has one.
    pub trace: Option<TraceContext>,
    /// `x-request-id` of the request, if it has one.
    pub request_id: Option<String>,
}

/// Why a stream header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The frame itself is bad (length, version, body).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A field is out of bounds.
    #[error("stream header field {field}: {reason}")]
    Field {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// Checks a header's length prefix against [`MAX_HEADER`]; returns the
/// payload length to read.
pub fn header_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, HeaderError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_HEADER,
        }
        .into());
    }
    if len == 0 {
        return Err(FrameError::Truncated("empty frame").into());
    }
    Ok(len)
}

fn check_name(field: &'static str, s: &str) -> Result<(), HeaderError> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(HeaderError::Field {
            field,
            reason: "must be 1 to 253 bytes",
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(HeaderError::Field {
            field,
            reason: "only letters, digits, '.', '-' and '_' are allowed",
        });
    }
    Ok(())
}

impl StreamHeader {
    /// Decodes a header payload (after the length prefix) and checks its fields.
    pub fn decode(payload: &[u8]) -> Result<StreamHeader, HeaderError> {
        if payload.len() > MAX_HEADER {
            return Err(FrameError::TooLarge {
                len: payload.len(),
                max: MAX_HEADER,
            }
            .into());
        }
        let h: StreamHeader = decode_payload(payload)?;
        h.validate()?;
        Ok(h)
    }

    /// Checks the bounds of every field.
    pub fn validate(&self) -> Result<(), HeaderError> {
        check_name("service", &self.service)?;
        check_name("workload", &self.workload)?;
        if let Some(id) = &self.request_id {
            if id.is_empty()
                || id.len() > MAX_REQUEST_ID
                || !id.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(HeaderError::Field {
                    field: "request_id",
                    reason: "must be 1 to 128 visible ASCII characters",
                });
            }
        }
        Ok(())
    }

    /// Encodes as a complete frame (length prefix included), checking the
    /// fields and [`MAX_HEADER`].
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        self.validate()?;
        let f = crate::encode_frame(self)?;
        if f.len() - LEN_PREFIX > MAX_HEADER {
            return Err(FrameError::TooLarge {
                len: f.len() - LEN_PREFIX,
                max: MAX_HEADER,
            }
            .into());
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> StreamHeader {
        StreamHeader {
            service: "pay.p".into(),
            workload: "pay".into(),
            protocol: StreamProtocol::Http1,
            trace: Some(TraceContext {
                trace_id: [0xab; 16],
                span_id: [0x01; 8],
                sampled: true,
            }),
            request_id: Some("r1".into()),
        }
    }

    /// Golden bytes: a diff here is a protocol change and needs a version bump.
    #[test]
    fn golden_stream_header() {
        let f = sample().encode().expect("encodes");
        let mut want = vec![0, 0, 0, 42, 1];
        want.extend_from_slice(&[5, b'p', b'a', b'y', b'.', b'p']);
        want.extend_from_slice(&[3, b'p', b'a', b'y']);
        want.push(0); // Http1
        want.push(1); // Some(trace)
        want.extend_from_slice(&[0xab; 16]);
        want.extend_from_slice(&[0x01; 8]);
        want.push(1); // sampled
        want.extend_from_slice(&[1, 2, b'r', b'1']);
        assert_eq!(f, want);
        let bare = StreamHeader {
            trace: None,
            request_id: None,
            protocol: StreamProtocol::Tcp,
            ..sample()
        };
        assert_eq!(
            bare.encode().expect("encodes"),
            [0, 0, 0, 14, 1, 5, b'p', b'a', b'y', b'.', b'p', 3, b'p', b'a', b'y', 1, 0, 0]
        );
    }

    #[test]
    fn every_protocol_roundtrips() {
        for protocol in [
            StreamProtocol::Http1,
            StreamProtocol::Tcp,
            StreamProtocol::Probe,
            StreamProtocol::Reach,
        ] {
            let h = StreamHeader {
                protocol,
                ..sample()
            };
            let f = h.encode().expect("encodes");
            assert_eq!(StreamHeader::decode(&f[LEN_PREFIX..]), Ok(h));
        }
    }

    #[test]
    fn roundtrip_and_bounds() {
        let f = sample().encode().expect("encodes");
        let mut p = [0u8; LEN_PREFIX];
        p.copy_from_slice(&f[..LEN_PREFIX]);
        let len = header_len(p).expect("within bounds");
        assert_eq!(
            StreamHeader::decode(&f[LEN_PREFIX..LEN_PREFIX + len]),
            Ok(sample())
        );
        assert!(header_len([0, 0, 8, 1]).is_err(), "over MAX_HEADER");
        assert!(header_len([0, 0, 0, 0]).is_err(), "empty");
        let long = StreamHeader {
            service: "a".repeat(254),
            ..sample()
        };
        assert!(long.encode().is_err());
        let bad = StreamHeader {
            workload: "a/b".into(),
            ..sample()
        };
        assert!(bad.encode().is_err());
        let rid = StreamHeader {
            request_id: Some("has space".into()),
            ..sample()
        };
        assert!(rid.encode().is_err());
        // A header that the codec accepts but whose fields are out of bounds is refused.
        let raw = crate::encode_frame(&bad).expect("codec encodes anything");
        assert!(matches!(
            StreamHeader::decode(&raw[LEN_PREFIX..]),
            Err(HeaderError::Field {
                field: "workload",
                ..
            })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StreamHeader::decode(&bytes);
        }
    }
}
