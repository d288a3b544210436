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
//! *before* anything is read or decoded; frames from a peer without a
//! verified client certificate are held to [`MAX_ANONYMOUS_FRAME`].
//! [`FrameReader`] takes a frame's bytes as they arrive and never holds
//! more than twice what arrived (nor more than the announced length), so
//! a length prefix alone makes it allocate nothing. The payload starts with the protocol
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
/// Upper bound on a frame's payload from a peer that presented no verified
/// client certificate (Enroll, EnrollNode, Reestablish on an anonymous
/// connection): a token, an ID and two CSRs take about 1 KiB, so 16 KiB is
/// ample, and an anonymous peer cannot make the hub hold more per stream.
pub const MAX_ANONYMOUS_FRAME: usize = 16 << 10;
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
    /// The hub is over its new-session budget: the reason carries when to
    /// come back ([`busy_reason`], [`retry_after`]).
    pub const BUSY: u32 = 8;

    /// The longest retry-after a client honours, whatever the peer says.
    pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

    const RETRY_AFTER_PREFIX: &str = "busy; retry-after-ms=";

    /// The close reason of a [`BUSY`] close: `busy; retry-after-ms=N`.
    pub fn busy_reason(retry_after: std::time::Duration) -> Vec<u8> {
        format!("{RETRY_AFTER_PREFIX}{}", retry_after.as_millis()).into_bytes()
    }

    /// The retry-after in a [`BUSY`] close reason (untrusted bytes), at
    /// most [`MAX_RETRY_AFTER`]; `None` if the reason is not one.
    pub fn retry_after(reason: &[u8]) -> Option<std::time::Duration> {
        let s = std::str::from_utf8(reason).ok()?;
        let digits = s.strip_prefix(RETRY_AFTER_PREFIX)?;
        if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let ms: u64 = digits.parse().ok()?;
        Some(std::time::Duration::from_millis(ms).min(MAX_RETRY_AFTER))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::time::Duration;

        #[test]
        fn retry_after_round_trips_and_refuses_garbage() {
            for ms in [0, 1, 1234, 599_999] {
                let d = Duration::from_millis(ms);
                assert_eq!(retry_after(&busy_reason(d)), Some(d));
            }
            assert_eq!(
                retry_after(&busy_reason(Duration::from_secs(86_400))),
                Some(MAX_RETRY_AFTER)
            );
            for bad in [
                &b""[..],
                b"busy; retry-after-ms=",
                b"busy; retry-after-ms=-5",
                b"busy; retry-after-ms=12x",
                b"busy; retry-after-ms=99999999999999999999",
                b"retry-after-ms=5",
                b"\xff\xfe",
            ] {
                assert_eq!(retry_after(bad), None, "{bad:?}");
            }
        }
    }
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
    payload_len_max(prefix, MAX_FRAME)
}

/// Checks a length prefix against `max` (itself capped at [`MAX_FRAME`])
/// and returns the payload length it announces.
pub fn payload_len_max(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, FrameError> {
    let max = max.min(MAX_FRAME);
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Truncated("empty frame"));
    }
    Ok(len)
}

/// One frame read from bytes as they arrive, within a limit.
///
/// The length prefix is checked against the limit as soon as its four bytes
/// are in, before any body byte is taken. The body buffer grows with the
/// bytes that arrived, at most doubling and never past the announced length:
/// a peer that announces a large frame and sends little makes the reader
/// hold little ([`FrameReader::held`]). The driver asks [`FrameReader::wanted`]
/// bytes of its stream, feeds them to [`FrameReader::push`] until
/// [`FrameReader::is_complete`], then calls [`FrameReader::decode`].
#[derive(Debug)]
pub struct FrameReader {
    max: usize,
    prefix: [u8; LEN_PREFIX],
    prefix_len: usize,
    /// The announced payload length, once the prefix is in and checked.
    len: Option<usize>,
    body: Vec<u8>,
}

impl FrameReader {
    /// A reader for one frame of at most `max` payload bytes (capped at
    /// [`MAX_FRAME`]).
    pub fn new(max: usize) -> FrameReader {
        FrameReader {
            max: max.min(MAX_FRAME),
            prefix: [0; LEN_PREFIX],
            prefix_len: 0,
            len: None,
            body: Vec::new(),
        }
    }

    /// How many more bytes the frame needs: the rest of the prefix, then the
    /// rest of the body; 0 once complete.
    pub fn wanted(&self) -> usize {
        match self.len {
            None => LEN_PREFIX - self.prefix_len,
            Some(len) => len - self.body.len(),
        }
    }

    /// Whether the whole frame is in.
    pub fn is_complete(&self) -> bool {
        self.len.is_some() && self.wanted() == 0
    }

    /// Bytes of memory the body buffer holds (its capacity).
    pub fn held(&self) -> usize {
        self.body.capacity()
    }

    /// Takes bytes from the front of `bytes`, at most [`FrameReader::wanted`],
    /// and returns how many it took. A prefix over the limit (or of zero) is
    /// refused as soon as it is complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<usize, FrameError> {
        let mut taken = 0;
        if self.len.is_none() {
            let n = (LEN_PREFIX - self.prefix_len).min(bytes.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&bytes[..n]);
            self.prefix_len += n;
            taken = n;
            if self.prefix_len < LEN_PREFIX {
                return Ok(taken);
            }
            self.len = Some(payload_len_max(self.prefix, self.max)?);
        }
        let rest = &bytes[taken..];
        let n = self.wanted().min(rest.len());
        if n == 0 {
            return Ok(taken);
        }
        let need = self.body.len() + n;
        if need > self.body.capacity() {
            // Amortized growth, but never past the announced length and
            // never more than twice what has arrived.
            let len = self.len.unwrap_or(need);
            let cap = need.max(self.body.capacity().saturating_mul(2)).min(len);
            self.body.reserve_exact(cap - self.body.len());
        }
        self.body.extend_from_slice(&rest[..n]);
        Ok(taken + n)
    }

    /// Decodes the complete frame.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        if !self.is_complete() {
            return Err(FrameError::Truncated(
                "payload shorter than its length prefix",
            ));
        }
        decode_payload(&self.body)
    }
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

    /// An anonymous peer's 1 MiB length prefix is refused the moment its
    /// four bytes are in, with nothing allocated for the body.
    #[test]
    fn anonymous_reader_refuses_a_large_prefix_at_once() {
        let mut r = FrameReader::new(MAX_ANONYMOUS_FRAME);
        let prefix = (MAX_FRAME as u32).to_be_bytes();
        assert_eq!(r.push(&prefix[..3]), Ok(3));
        assert_eq!(
            r.push(&prefix[3..]),
            Err(FrameError::TooLarge {
                len: MAX_FRAME,
                max: MAX_ANONYMOUS_FRAME
            })
        );
        assert_eq!(r.held(), 0);
        // one byte over the anonymous limit, with body bytes in the same push
        let mut r = FrameReader::new(MAX_ANONYMOUS_FRAME);
        let mut f = ((MAX_ANONYMOUS_FRAME + 1) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[1; 64]);
        assert!(matches!(r.push(&f), Err(FrameError::TooLarge { .. })));
        assert_eq!(r.held(), 0);
        // an Enroll with a CSR-sized body fits
        let req = Request::Enroll {
            token: "t".repeat(200),
            spoke: "spiffe://td/store/a/node/b".parse().expect("valid id"),
            csr: vec![7; 2_000],
        };
        let f = encode_frame(&req).expect("encodes");
        let mut r = FrameReader::new(MAX_ANONYMOUS_FRAME);
        assert_eq!(r.push(&f), Ok(f.len()));
        assert_eq!(r.decode::<Request>(), Ok(req));
    }

    /// A peer that announces 1 MiB and sends 100 bytes makes the reader hold
    /// at most twice what arrived.
    #[test]
    fn reader_holds_what_arrived_not_what_was_announced() {
        let mut r = FrameReader::new(MAX_FRAME);
        assert_eq!(r.push(&(MAX_FRAME as u32).to_be_bytes()), Ok(4));
        assert_eq!(r.held(), 0);
        assert_eq!(r.wanted(), MAX_FRAME);
        for _ in 0..10 {
            r.push(&[0; 10]).expect("within the limit");
        }
        assert!(r.held() <= 200, "{}", r.held());
        assert!(!r.is_complete());
        assert!(matches!(
            r.decode::<Request>(),
            Err(FrameError::Truncated(_))
        ));
    }

    #[test]
    fn reader_takes_no_more_than_one_frame() {
        let mut two = ping();
        two.extend_from_slice(&ping());
        let mut r = FrameReader::new(MAX_FRAME);
        assert_eq!(r.push(&two), Ok(6));
        assert!(r.is_complete());
        assert_eq!(r.push(&two[6..]), Ok(0));
        assert_eq!(r.decode::<Request>(), Ok(Request::Ping));
        let mut r = FrameReader::new(MAX_FRAME);
        assert_eq!(
            r.push(&[0, 0, 0, 0]),
            Err(FrameError::Truncated("empty frame"))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any split of a frame into pieces reads the same message, and
        /// holds no more than the payload.
        #[test]
        fn reader_reads_any_split(csr_len in 0usize..3000, cuts in proptest::collection::vec(1usize..700, 0..20)) {
            let req = Request::Enroll {
                token: "secret".into(),
                spoke: "spiffe://td/store/a/node/b".parse().expect("valid id"),
                csr: vec![7; csr_len],
            };
            let f = encode_frame(&req).expect("encodes");
            let mut r = FrameReader::new(MAX_ANONYMOUS_FRAME);
            let mut rest = &f[..];
            for c in cuts {
                let c = c.min(rest.len());
                let n = r.push(&rest[..c]).expect("valid frame");
                prop_assert_eq!(n, c);
                rest = &rest[c..];
            }
            while !rest.is_empty() {
                let n = r.push(rest).expect("valid frame");
                rest = &rest[n..];
            }
            prop_assert!(r.held() <= f.len() - LEN_PREFIX);
            prop_assert_eq!(r.decode::<Request>(), Ok(req));
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), max in 0usize..64) {
            let mut r = FrameReader::new(max);
            let mut rest = &bytes[..];
            while let Ok(n) = r.push(rest) {
                if n == 0 {
                    break;
                }
                rest = &rest[n..];
            }
            let _ = r.decode::<Request>();
        }

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
