//! Async glue shared by the hub and spoke drivers: QUIC endpoints and
//! transport settings, framed request/response on QUIC streams, the local
//! admin socket, the metrics and health listener, systemd notifications, per-peer caps on connections and streams, raw TCP byte copying with an idle timeout, a clock that follows tokio's (possibly virtual) time, and progress lines on a terminal.
//!
//! Who drives it: `tidemesh-hub` and `tidemesh-spoke`. What it must not do:
//! hold protocol rules (who may enroll, when to renew): those live in the
//! hub and spoke logic. This crate only moves bytes and maps errors.

pub mod admin;
pub mod build_info;
pub mod caps;
pub mod cli;
pub mod clock;
pub mod http;
pub mod metrics;
pub mod pipe;
pub mod progress;
pub mod quic;
pub mod sd_notify;

pub use clock::TokioClock;
pub use quic::{
    peer_chain, peer_spiffe_id, peer_svid, read_frame, read_frame_max, reestablish_challenge,
    request, write_frame, NetError, QuicSettings,
};
