//! Control messages (ALPN `tidemesh-ctl/1`): enrollment, renewal, node CA
//! issuance, re-establishment after expiry, session hello, time anchors,
//! reports, and the hub's pushes.
//!
//! Every request travels on its own QUIC bidirectional stream: the spoke
//! writes one [`Request`] frame and finishes the stream, the hub answers with
//! one [`Response`] frame. The variants' order is the wire format.

use serde::{Deserialize, Serialize};
use tidemesh_identity::{trusted_time::SignedTimeAnchor, SignedRevocationList, SpiffeId};

/// A DER-encoded certificate chain, leaf first.
pub type DerChain = Vec<Vec<u8>>;

/// Spoke to hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Opens a control session on an mTLS connection made with the node SVID.
    Hello {
        /// Version of the spoke software, for the operator.
        agent: String,
    },
    /// First contact: a join token and a CSR for the node SVID. Sent on a
    /// connection without a client certificate.
    Enroll {
        /// The single-use join token's secret part.
        token: String,
        /// The spoke ID the spoke believes the token is bound to.
        spoke: SpiffeId,
        /// PKCS#10 CSR (DER) made with the spoke's freshly generated key.
        csr: Vec<u8>,
    },
    /// Renewal of the node SVID on an authenticated session; the CSR must use
    /// the key pinned at enrollment.
    Renew {
        /// PKCS#10 CSR (DER).
        csr: Vec<u8>,
    },
    /// A workload SVID for one of the spoke's own workloads.
    IssueWorkload {
        /// The requested workload ID, `spiffe://TD/store/STORE/sa/ACCOUNT`.
        id: SpiffeId,
        /// PKCS#10 CSR (DER) made with the workload's key, generated on the spoke.
        csr: Vec<u8>,
    },
    /// Re-establishment after the node SVID expired during a partition: sent
    /// on a connection without a client certificate. `proof` is an ECDSA
    /// signature by the pinned node key over this connection's TLS exporter
    /// value (see `tidemesh_net::reestablish_challenge`), so it cannot be
    /// replayed on another connection.
    Reestablish {
        /// The spoke's node ID.
        spoke: SpiffeId,
        /// PKCS#10 CSR (DER) with the pinned key.
        csr: Vec<u8>,
        /// Signature over the channel-bound challenge.
        proof: Vec<u8>,
    },
    /// Liveness probe on an authenticated session.
    Ping,
    /// Config sync (long poll): the spoke names the config version it has
    /// applied (its last-known-good); the hub answers with the spoke's slice
    /// of a newer version at once, or waits up to `wait_ms` for one and then
    /// answers `ConfigUnchanged`. The `have` field is also how the hub learns
    /// each spoke's applied version.
    SyncConfig {
        /// The version the spoke has applied, if any.
        have: Option<u64>,
        /// The registry generation of the slice the spoke has (0: none).
        have_registry: u64,
        /// How long the hub may hold the request open.
        wait_ms: u32,
    },
    /// The spoke's local endpoints and their health, as its own checks see
    /// them; replaces what the hub held for this spoke.
    Register {
        /// Every local workload endpoint.
        endpoints: Vec<RegisteredEndpoint>,
    },
    /// Opens an evidence sync session. Unlike the other requests this
    /// stream stays open: the hub answers with an [`Response::EvidenceAck`]
    /// naming where its copy of the spoke's chain ends, then the spoke sends
    /// [`Request::EvidenceBatch`] (or [`Request::EvidenceGap`]) frames, at
    /// most `window` unanswered, and the hub answers each, in order, with an
    /// `EvidenceAck` sent only after its commit. A refused batch is answered
    /// with [`Response::Error`] (code [`ErrorCode::EvidenceRejected`]) and the
    /// hub ends the session.
    EvidenceOpen,
    /// A signed evidence batch (`tidemesh_evidence::Batch` encoding, at most
    /// `tidemesh_evidence::MAX_BATCH_BYTES`), inside an evidence session.
    EvidenceBatch {
        /// The encoded batch (serde_bytes: same wire bytes as a `Vec<u8>`,
        /// decoded in one copy instead of byte by byte).
        #[serde(with = "serde_bytes")]
        batch: Vec<u8>,
    },
    /// Inside an evidence session: the spoke no longer holds the records the
    /// hub asks for (it pruned them after an earlier ack the hub has since
    /// lost); the hub records a gap and continues the chain at `resume`.
    EvidenceGap {
        /// The spoke's oldest held position: next sequence number.
        resume_seq: u64,
        /// The chain link before `resume_seq`.
        resume_hash: [u8; 32],
        /// Why the records are gone, for the operator.
        reason: String,
    },
    /// First contact with a node CA: like [`Request::Enroll`], plus a CSR
    /// for the spoke's node CA made with a second key generated on the
    /// spoke. Answered with [`Response::Enrolled`].
    EnrollNode {
        /// The single-use join token's secret part.
        token: String,
        /// The spoke ID the spoke believes the token is bound to.
        spoke: SpiffeId,
        /// PKCS#10 CSR (DER) for the node SVID.
        csr: Vec<u8>,
        /// PKCS#10 CSR (DER) for the node CA, with its own key.
        ca_csr: Vec<u8>,
    },
    /// A new node CA (renewal at half life, or a spoke without one) on an
    /// authenticated session. Answered with [`Response::NodeCa`].
    IssueNodeCa {
        /// PKCS#10 CSR (DER) made with a key generated on the spoke.
        csr: Vec<u8>,
    },
    /// Asks for a hub-signed time anchor ([`Response::TimeAnchor`]).
    TimeAnchor,
    /// What the spoke reports about itself (survival horizon, the
    /// revocation list it enforces, its time trust), for the hub's
    /// `spokes` view and metrics. Answered with [`Response::Reported`].
    Report {
        /// The report.
        report: SpokeReport,
    },
}

/// A spoke's report of how long it can last without the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpokeReport {
    /// Seconds until the spoke can no longer serve its store as now, were
    /// the hub to vanish (`None`: no budget is bounded).
    pub survival_horizon_s: Option<u64>,
    /// Which budget runs out first (`node_ca`, `max_offline`,
    /// `evidence_buffer`, `time_drift`, ...).
    pub survival_limit: String,
    /// Version of the revocation list it enforces.
    pub revocation_version: u64,
    /// Whether its time is trusted (not degraded).
    pub time_trusted: bool,
    /// Expiry of its node CA, ms since the Unix epoch.
    pub node_ca_not_after_ms: Option<u64>,
}

/// What the hub decides about the certificates a spoke issues itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuePolicy {
    /// Lifetime of the workload SVIDs the spoke issues from its node CA.
    pub workload_ttl_ms: u64,
    /// The max-offline window (the node CA's lifetime).
    pub max_offline_ms: u64,
}

/// Hub to spoke, unprompted: one frame on a unidirectional stream the hub
/// opens on the control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// A new revocation list version (also sent at session start).
    Revocations(SignedRevocationList),
}

/// A local workload endpoint a spoke registers with the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredEndpoint {
    /// Its service account (the SVID's last segment).
    pub service_account: String,
    /// The service it serves.
    pub service: String,
    /// The service's namespace.
    pub namespace: String,
    /// Labels (e.g. version).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Where peers reach it (the spoke's advertised data address).
    pub address: String,
    /// The spoke's own health check says it is healthy.
    pub healthy: bool,
}

/// Hub to spoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`.
    Welcome {
        /// The hub's clock, milliseconds since the Unix epoch.
        hub_time_unix_ms: u64,
    },
    /// A signed SVID and the trust bundle.
    Certificate {
        /// The SVID chain, leaf first (DER).
        chain: DerChain,
        /// The trust bundle's roots (DER).
        bundle: Vec<Vec<u8>>,
    },
    /// Answer to `Ping`.
    Pong,
    /// The request was refused.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// The spoke's slice of a config version.
    Config {
        /// The hub's config version.
        version: u64,
        /// The registry generation included (same-site endpoints).
        registry: u64,
        /// When it was applied at the hub (ms since the Unix epoch).
        applied_ms: u64,
        /// postcard encoding of `tidemesh_policy` 's spoke config slice.
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
    },
    /// No newer version than the one the spoke has.
    ConfigUnchanged {
        /// The hub's current version.
        version: u64,
    },
    /// Answer to `Register`.
    Registered,
    /// Evidence session: the hub's position in the spoke's chain after its
    /// last commit (everything before `next_seq` is durably stored and may be
    /// deleted by the spoke), and how fast to go on.
    EvidenceAck {
        /// The next sequence number the hub expects.
        next_seq: u64,
        /// The chain link of the record before `next_seq` (genesis if 1).
        hash: [u8; 32],
        /// Records of the answered batch stored now.
        stored: u32,
        /// Records of the answered batch the hub already held.
        duplicates: u32,
        /// How many batches the spoke may have unanswered (credits).
        window: u32,
        /// Wait this long before sending the next batch (0: go on).
        retry_after_ms: u32,
    },
    /// Answer to [`Request::EnrollNode`]: the node SVID, the node CA, the
    /// trust bundle, the issuance policy and a first time anchor.
    Enrolled {
        /// The node SVID chain, leaf first (DER).
        chain: DerChain,
        /// The node CA certificate (DER).
        node_ca: Vec<u8>,
        /// The trust bundle's roots (DER).
        bundle: Vec<Vec<u8>>,
        /// Workload lifetime and max-offline window.
        policy: IssuePolicy,
        /// The hub's time, signed.
        anchor: SignedTimeAnchor,
    },
    /// Answer to [`Request::IssueNodeCa`].
    NodeCa {
        /// The node CA certificate (DER).
        cert: Vec<u8>,
        /// Workload lifetime and max-offline window.
        policy: IssuePolicy,
    },
    /// Answer to [`Request::TimeAnchor`].
    TimeAnchor {
        /// The hub's time, signed for this spoke.
        anchor: SignedTimeAnchor,
    },
    /// The spoke's slice of a config version, with the revocation list in
    /// force (what [`Response::Config`] carries, plus the list).
    ConfigSlice {
        /// The hub's config version.
        version: u64,
        /// The registry generation included (same-site endpoints).
        registry: u64,
        /// When it was applied at the hub (ms since the Unix epoch).
        applied_ms: u64,
        /// postcard encoding of `tidemesh_policy` 's spoke config slice.
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
        /// The revocation list in force, signed.
        revocations: SignedRevocationList,
    },
    /// Answer to [`Request::Report`].
    Reported,
}

/// Why the hub refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request was malformed or not valid in this state.
    BadRequest,
    /// Unknown, already used or expired join token (one code for all three,
    /// so a prober learns nothing).
    InvalidToken,
    /// The token is bound to another spoke ID.
    TokenMismatch,
    /// The spoke is revoked.
    Revoked,
    /// The requested identity is outside the caller's store or trust domain.
    Forbidden,
    /// The spoke was offline longer than the max-offline window; it must
    /// enroll again with a new token.
    OfflineWindowExceeded,
    /// The spoke is not known to the hub.
    NotEnrolled,
    /// The proof of possession or the CSR key does not match the pinned key.
    KeyMismatch,
    /// The hub failed internally; retry later.
    Internal,
    /// An evidence batch was refused (bad signature, broken chain, a record
    /// that differs from the one already stored); the hub flagged it.
    EvidenceRejected,
    /// A key offered for enrollment belongs to a revoked spoke or node CA:
    /// generate new keys.
    KeyRevoked,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::InvalidToken => "invalid token",
            ErrorCode::TokenMismatch => "token bound to another spoke",
            ErrorCode::Revoked => "revoked",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::OfflineWindowExceeded => "offline window exceeded",
            ErrorCode::NotEnrolled => "not enrolled",
            ErrorCode::KeyMismatch => "key mismatch",
            ErrorCode::Internal => "internal error",
            ErrorCode::EvidenceRejected => "evidence rejected",
            ErrorCode::KeyRevoked => "key revoked",
        };
        f.write_str(s)
    }
}
