//! The tidemesh wire protocol: message types and the frame codec.
//!
//! Who drives it: the hub and spoke drivers (`tidemesh-net` reads and writes
//! frames on QUIC streams). What it must not do: any I/O, any clock reading.
//! It turns bytes into typed messages and back, and rejects everything else
//! with a typed [`FrameError`]; hostile input never panics.
//!
//! # Frame format
//! ```text
//! +----------------+---------------------------------------------+
//! | len: u32 (BE)  | payload: postcard(version: u16) ++ postcard(T)|
//! +----------------+---------------------------------------------+
//! ```
//! `len` counts the payload bytes and is checked against [`MAX_FRAME`]
//! *before* anything is read or decoded. The payload starts with the protocol
//! version (postcard varint); a frame of another version is refused with
//! [`FrameError::UnsupportedVersion`] before its body is looked at. postcard is
//! not self-describing: field order is the format, so every change to a
//! message type is a protocol change (see the golden tests in `tests`).

pub mod control;
pub mod data;
pub mod sync;
pub mod token;

use serde::{de::DeserializeOwned, Serialize};

pub use control::{
    ErrorCode, IssuePolicy, Push, RegisteredEndpoint, Request, Response, SpokeReport,
};
pub use token::{JoinToken, TokenError};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Hard upper bound on a frame's payload, checked before decoding.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;
/// ALPN of the control connection (enrollment, renewal, sync).
pub const ALPN_CTL: &[u8] = b"tidemesh-ctl/1";
/// ALPN of the data tunnel between spokes and to the hub gateway.
pub const ALPN_DATA: &[u8] = b"tidemesh-data/1";

/// QUIC application close codes used by tidemesh.
pub mod close {
    /// Orderly shutdown.
    pub const NORMAL: u32 = 0;
    /// The peer sent a frame that could not be decoded.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The peer speaks another protocol version.
    pub const UNSUPPORTED_VERSION: u32 = 2;
    /// The spoke was revoked by an operator.
    pub const REVOKED: u32 = 3;
    /// The peer is not allowed to do what it asked.
    pub const FORBIDDEN: u32 = 4;
    /// The process is shutting down.
    pub const SHUTDOWN: u32 = 5;
    /// A raw TCP stream's workload could not be reached (refused or timed
    /// out connecting): nothing of the stream was delivered, so the caller
    /// may offer it to another endpoint.
    pub const UNREACHABLE: u32 = 6;
    /// A certificate the connection was made with expired: a connection
    /// never outlives the SVIDs (or node CAs) that authenticated it.
    pub const EXPIRED: u32 = 7;
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is empty or shorter than its header.
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    /// The version field names a protocol version this build does not speak.
    #[error("unsupported protocol version {got} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u16,
    },
    /// The body does not decode as the expected message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// Bytes follow the message inside the frame.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The message could not be encoded (too large, or a serializer error).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Checks a length prefix and returns the payload length it announces.
pub fn payload_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    if len == 0 {
        return Err(FrameError::Truncated("empty frame"));
    }
    Ok(len)
}

/// Encodes a message as a complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let out = postcard::to_extend(&PROTOCOL_VERSION, vec![0u8; LEN_PREFIX])
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let mut out = postcard::to_extend(msg, out).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - LEN_PREFIX;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    // len <= MAX_FRAME < u32::MAX, so the cast is lossless.
    out[..LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes a frame payload (the bytes after the length prefix).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        });
    }
    if payload.is_empty() {
        return Err(FrameError::Truncated("empty frame"));
    }
    let (version, rest): (u16, &[u8]) = postcard::take_from_bytes(payload)
        .map_err(|_| FrameError::Truncated("missing protocol version"))?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { got: version });
    }
    let (msg, rest): (T, &[u8]) =
        postcard::take_from_bytes(rest).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Decodes one complete frame (length prefix included) from `buf`.
///
/// This is the entry point the fuzz target drives: it must never panic.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Err(FrameError::Truncated("missing length prefix"));
    };
    let mut p = [0u8; LEN_PREFIX];
    p.copy_from_slice(prefix);
    let len = payload_len(p)?;
    let body = &buf[LEN_PREFIX..];
    if body.len() < len {
        return Err(FrameError::Truncated(
            "payload shorter than its length prefix",
        ));
    }
    if body.len() > len {
        return Err(FrameError::TrailingBytes(body.len() - len));
    }
    decode_payload(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ping() -> Vec<u8> {
        encode_frame(&Request::Ping).expect("encodes")
    }

    #[test]
    fn roundtrip() {
        let r: Request = decode_frame(&ping()).expect("decodes");
        assert_eq!(r, Request::Ping);
    }

    /// Golden bytes: a diff here is a protocol change and needs a version bump.
    #[test]
    fn golden_ping_and_pong() {
        assert_eq!(ping(), [0, 0, 0, 2, 1, 5]);
        let pong = encode_frame(&Response::Pong).expect("encodes");
        assert_eq!(pong, [0, 0, 0, 2, 1, 2]);
        let err = encode_frame(&Response::Error {
            code: ErrorCode::InvalidToken,
            message: "x".into(),
        })
        .expect("encodes");
        assert_eq!(err, [0, 0, 0, 5, 1, 3, 1, 1, b'x']);
    }

    /// Golden bytes of the evidence session messages (request variants 8 and
    /// 9, response variant 7).
    #[test]
    fn golden_evidence_messages() {
        let open = encode_frame(&Request::EvidenceOpen).expect("encodes");
        assert_eq!(open, [0, 0, 0, 2, 1, 8]);
        let batch = encode_frame(&Request::EvidenceBatch {
            batch: vec![0xab, 0xcd],
        })
        .expect("encodes");
        assert_eq!(batch, [0, 0, 0, 5, 1, 9, 2, 0xab, 0xcd]);
        let ack = encode_frame(&Response::EvidenceAck {
            next_seq: 300,
            hash: [7; 32],
            stored: 2,
            duplicates: 1,
            window: 4,
            retry_after_ms: 0,
        })
        .expect("encodes");
        let mut want = vec![0, 0, 0, 40, 1, 7, 0xac, 0x02];
        want.extend_from_slice(&[7; 32]);
        want.extend_from_slice(&[2, 1, 4, 0]);
        assert_eq!(ack, want);
    }

    /// The largest evidence batch fits a frame with its message around it.
    #[test]
    fn largest_evidence_batch_fits_a_frame() {
        let f = encode_frame(&Request::EvidenceBatch {
            batch: vec![0xff; 1_000_000],
        })
        .expect("fits");
        assert!(f.len() <= MAX_FRAME + LEN_PREFIX);
    }

    #[test]
    fn oversized_prefix_rejected_before_decoding() {
        let mut f = vec![0xff, 0xff, 0xff, 0xff];
        f.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_frame::<Request>(&f),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            payload_len([0, 0x10, 0, 1]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn wrong_version_rejected() {
        let mut f = ping();
        f[4] = 9;
        assert_eq!(
            decode_frame::<Request>(&f),
            Err(FrameError::UnsupportedVersion { got: 9 })
        );
    }

    #[test]
    fn truncated_and_trailing() {
        let f = ping();
        assert!(matches!(
            decode_frame::<Request>(&f[..5]),
            Err(FrameError::Truncated(_))
        ));
        let mut g = f.clone();
        g.push(0);
        assert!(matches!(
            decode_frame::<Request>(&g),
            Err(FrameError::TrailingBytes(1))
        ));
        // payload with an extra byte inside the announced length
        let mut h = vec![0, 0, 0, 3, 1, 5, 0];
        assert!(matches!(
            decode_frame::<Request>(&h),
            Err(FrameError::TrailingBytes(1))
        ));
        h[5] = 200; // unknown variant
        assert!(matches!(
            decode_frame::<Request>(&h),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode_frame::<Request>(&[0, 0, 0, 0]),
            Err(FrameError::Truncated(_))
        ));
    }

    #[test]
    fn bad_spiffe_id_in_message_is_malformed() {
        let req = Request::Enroll {
            token: "t".into(),
            spoke: "spiffe://td/store/a/node/b".parse().expect("valid id"),
            csr: vec![1],
        };
        let mut f = encode_frame(&req).expect("encodes");
        // corrupt the 'td' trust domain into uppercase
        let pos = f.windows(2).position(|w| w == b"td").expect("id present");
        f[pos] = b'T';
        assert!(matches!(
            decode_frame::<Request>(&f),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode_frame::<Response>(&bytes);
            let _ = decode_payload::<Request>(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..64, val in any::<u8>()) {
            let req = Request::Enroll {
                token: "secret".into(),
                spoke: "spiffe://td/store/a/node/b".parse().expect("valid id"),
                csr: vec![7; 20],
            };
            let mut f = encode_frame(&req).expect("encodes");
            let i = idx % f.len();
            f[i] = val;
            let _ = decode_frame::<Request>(&f);
        }
    }
}
