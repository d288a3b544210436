//! QUIC plumbing: transport settings, framed messages on streams, one-shot
//! requests, peer identity and the re-establishment challenge.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde::{de::DeserializeOwned, Serialize};
use tidemesh_identity::{verify::peer_id, SpiffeId};
use tidemesh_proto::{encode_frame, FrameError, FrameReader, MAX_FRAME};

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The connection could not be set up.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Where to.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection was lost or closed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("write failed: {0}")]
    Write(String),
    /// Reading from a stream failed.
    #[error("read failed: {0}")]
    Read(String),
    /// The peer sent a bad frame.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A TLS configuration problem.
    #[error("tls configuration: {0}")]
    Tls(String),
    /// Local I/O failure (socket, file).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Transport settings shared by hub and spoke.
#[derive(Debug, Clone, Copy)]
pub struct QuicSettings {
    /// Keep-alive interval: how often an idle connection proves it is alive.
    pub keep_alive: Duration,
    /// Idle timeout: a connection with no packets for this long is dead.
    /// Also bounds how long a handshake to a silent peer hangs.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams a peer may open.
    pub max_streams: u32,
    /// Concurrent unidirectional streams a peer may open (0: none). The
    /// spoke's control connection takes the hub's pushes this way.
    pub max_uni_streams: u32,
    /// Flow control: bytes a peer may send on one stream ahead of what this
    /// side has read (quinn's `stream_receive_window`). Bounds what quinn
    /// buffers for a stream nobody reads, and what a peer can put on the
    /// wire before this side reads again.
    pub stream_window: u64,
    /// Flow control: bytes a peer may send across all streams of a
    /// connection ahead of what this side has read (quinn's
    /// `receive_window`); `None`: no connection-wide limit (quinn's
    /// default).
    pub connection_window: Option<u64>,
    /// Bytes of this side's writes kept until acknowledged, per connection
    /// (quinn's `send_window`).
    pub send_window: u64,
}

/// quinn's default stream receive window (100 Mbit/s × 100 ms).
pub const QUINN_STREAM_WINDOW: u64 = 1_250_000;

/// quinn's default send window (8 × its stream window).
pub const QUINN_SEND_WINDOW: u64 = 8 * QUINN_STREAM_WINDOW;

impl Default for QuicSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_millis(1000),
            idle_timeout: Duration::from_millis(4000),
            max_streams: 64,
            max_uni_streams: 0,
            stream_window: QUINN_STREAM_WINDOW,
            connection_window: None,
            send_window: QUINN_SEND_WINDOW,
        }
    }
}

impl QuicSettings {
    /// The quinn transport config for these settings.
    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        // An idle timeout above quinn's VarInt range is a configuration error
        // the caller made; fall back to quinn's default rather than panic.
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_streams));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(self.max_uni_streams));
        let varint = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
        // A zero window would stall every stream: at least one packet's worth.
        t.stream_receive_window(varint(self.stream_window.max(MIN_WINDOW)));
        t.receive_window(
            self.connection_window
                .map_or(quinn::VarInt::MAX, |w| varint(w.max(MIN_WINDOW))),
        );
        t.send_window(self.send_window.max(MIN_WINDOW));
        Arc::new(t)
    }

    /// quinn client config from a rustls client config.
    pub fn client_config(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<quinn::ClientConfig, NetError> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let mut c = quinn::ClientConfig::new(Arc::new(crypto));
        c.transport_config(self.transport());
        Ok(c)
    }

    /// quinn server config from a rustls server config.
    pub fn server_config(
        &self,
        tls: rustls::ServerConfig,
    ) -> Result<quinn::ServerConfig, NetError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        s.transport_config(self.transport());
        Ok(s)
    }
}

/// The smallest flow-control window [`QuicSettings::transport`] sets.
pub const MIN_WINDOW: u64 = 4096;

/// Makes an endpoint over an already bound socket (real or simulated).
pub fn endpoint(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, NetError> {
    Ok(quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// Receive and send buffer asked of the kernel for every QUIC socket. The
/// Linux default (about 208 KiB) overflows when a 1 MB evidence batch or a
/// burst of data streams lands while the process is busy; the kernel caps
/// the value at `net.core.rmem_max` / `wmem_max`.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Wraps a bound std UDP socket for quinn's tokio runtime, with larger
/// kernel buffers ([`UDP_BUFFER_BYTES`], best effort).
pub fn wrap_socket(sock: std::net::UdpSocket) -> Result<Arc<dyn quinn::AsyncUdpSocket>, NetError> {
    Ok(wrap_socket_sized(sock, UDP_BUFFER_BYTES)?.0)
}

/// Wraps a bound std UDP socket for quinn's tokio runtime after asking the
/// kernel for a `recv_bytes` receive buffer (and [`UDP_BUFFER_BYTES`] to
/// send); returns the receive buffer size the kernel reports it granted
/// (Linux doubles the request for bookkeeping and caps it at
/// `net.core.rmem_max`; SO_RCVBUFFORCE is not reachable without unsafe
/// code, so the cap applies even as root).
pub fn wrap_socket_sized(
    sock: std::net::UdpSocket,
    recv_bytes: usize,
) -> Result<(Arc<dyn quinn::AsyncUdpSocket>, usize), NetError> {
    use quinn::Runtime;
    let s = socket2::SockRef::from(&sock);
    for (what, r) in [
        ("receive", s.set_recv_buffer_size(recv_bytes)),
        ("send", s.set_send_buffer_size(UDP_BUFFER_BYTES)),
    ] {
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot enlarge the UDP {what} buffer");
        }
    }
    let granted = s.recv_buffer_size()?;
    Ok((quinn::TokioRuntime.wrap_udp_socket(sock)?, granted))
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), NetError> {
    let bytes = encode_frame(msg)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| NetError::Write(e.to_string()))
}

/// Reads one frame of at most [`MAX_FRAME`] payload bytes; see
/// [`read_frame_max`].
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, NetError> {
    read_frame_max(recv, MAX_FRAME).await
}

/// Reads one frame of at most `max` payload bytes. The length prefix is
/// checked against `max` before any body byte is read, and the body buffer
/// grows with the bytes that arrive ([`FrameReader`]): a peer that
/// announces a large frame and sends little makes this hold little.
pub async fn read_frame_max<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, NetError> {
    read_frame_after(recv, max, &[]).await
}

/// Reads one frame of at most `max` payload bytes whose first bytes,
/// `already`, were read from `recv` by the caller (to wait for a frame
/// without committing memory to it); see [`read_frame_max`].
pub async fn read_frame_after<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    already: &[u8],
) -> Result<T, NetError> {
    let mut frame = FrameReader::new(max);
    let mut bytes = already;
    while !bytes.is_empty() {
        let n = frame.push(bytes)?;
        if n == 0 {
            break;
        }
        bytes = &bytes[n..];
    }
    while !frame.is_complete() {
        let chunk = recv
            .read_chunk(frame.wanted(), true)
            .await
            .map_err(|e| NetError::Read(e.to_string()))?
            .ok_or_else(|| {
                NetError::Read("stream finished before the frame was complete".into())
            })?;
        let mut bytes = &chunk.bytes[..];
        while !bytes.is_empty() {
            let n = frame.push(bytes)?;
            if n == 0 {
                break;
            }
            bytes = &bytes[n..];
        }
    }
    Ok(frame.decode()?)
}

/// Sends one request on a new stream and waits for its answer.
pub async fn request<Q: Serialize, A: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Q,
    timeout: Duration,
) -> Result<A, NetError> {
    let fut = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, req).await?;
        // The stream can only be closed already if the peer reset it; the
        // read below reports that.
        let _ = send.finish();
        read_frame(&mut recv).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| NetError::Timeout(timeout))?
}

/// The peer's SPIFFE ID, if it presented a certificate that passed the verifier.
pub fn peer_spiffe_id(conn: &quinn::Connection) -> Option<SpiffeId> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    peer_id(&certs).ok()
}

/// The certificate chain the peer presented (leaf first), if any.
pub fn peer_chain(
    conn: &quinn::Connection,
) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let any = conn.peer_identity()?;
    any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// The peer's chain verified again against `bundle` at `now` as a TLS
/// client's (what the handshake checked, as a value: the ID, the node CA
/// it came through, the key fingerprints), so connections can be matched
/// against later revocation lists.
pub fn peer_svid(
    conn: &quinn::Connection,
    bundle: &tidemesh_identity::TrustBundle,
    now: std::time::SystemTime,
) -> Result<tidemesh_identity::VerifiedSvid, String> {
    let chain = peer_chain(conn).ok_or("the peer presented no certificate")?;
    let now = tidemesh_identity::clock::to_unix_time(now).ok_or("time before 1970")?;
    tidemesh_identity::verify_svid(&chain, bundle, now, tidemesh_identity::Usage::Client)
        .map_err(|e| e.to_string())
}

/// The message a re-establishing spoke signs with its pinned key: bound to
/// this very TLS session (RFC 5705 exporter) and to the spoke's ID, so it can
/// be neither replayed on another connection nor reused for another spoke.
pub fn reestablish_challenge(
    conn: &quinn::Connection,
    spoke: &SpiffeId,
) -> Result<Vec<u8>, NetError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(
        &mut out,
        b"EXPORTER-tidemesh-reestablish-v1",
        spoke.to_string().as_bytes(),
    )
    .map_err(|_| NetError::Tls("keying material export failed".into()))?;
    let mut msg = b"tidemesh reestablish v1\n".to_vec();
    msg.extend_from_slice(spoke.to_string().as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(&out);
    Ok(msg)
}

/// Closes `conn` (code `EXPIRED`) when `clock` reaches `deadline`, the
/// first expiry of a certificate that authenticated it, so no connection
/// outlives its certificates; returns early when it closes first. The clock
/// may jump (a trusted clock takes a new time anchor), so the deadline is
/// looked at again at least every minute. Returns whether it closed `conn`.
pub async fn close_at_expiry(
    clock: Arc<dyn tidemesh_identity::clock::Clock>,
    conn: quinn::Connection,
    deadline: std::time::SystemTime,
) -> bool {
    loop {
        let left = deadline
            .duration_since(clock.now())
            .unwrap_or(Duration::ZERO);
        if left.is_zero() {
            conn.close(
                quinn::VarInt::from_u32(tidemesh_proto::close::EXPIRED),
                b"certificate expired",
            );
            return true;
        }
        tokio::select! {
            _ = conn.closed() => return false,
            _ = tokio::time::sleep(left.min(Duration::from_secs(60))) => {}
        }
    }
}
