//! tidemesh identity: SPIFFE IDs, X.509-SVID issuance and verification, and
//! the rustls configs built on them.
//!
//! What it is: the library both the hub and the spokes link for everything
//! about *who* a peer is. [`spiffe`] parses IDs, [`naming`] spells tidemesh's
//! IDs, [`svid`] mints certificates (the hub's CA) and handles keys and CSRs,
//! [`verify`] decides whether a presented chain is a valid SVID of our trust
//! domain and plugs that into rustls, [`clock`] injects the time those checks
//! use. Who drives it: hub and spoke drivers. What it must not do: any file or
//! network I/O, any async runtime, any direct reading of the system clock
//! outside [`clock::SystemClock`]. DNS names play no part in authentication.

pub mod clock;
pub mod naming;
pub mod revocation;
pub mod spiffe;
pub mod svid;
pub mod trusted_time;
pub mod verify;

pub use clock::{Clock, ClockTimeProvider, FixedClock, SystemClock};
pub use naming::{classify, hub_id, node_id, workload_id, MeshIdentity};
pub use revocation::{RevocationList, Revocations, SignedRevocationList};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{Ca, IssueError, KeyPair, NodeCa};
pub use verify::{
    anonymous_client_config, client_config, client_config_no_cert, peer_id, server_config,
    svid_error, verify_svid, AnyInTrustDomain, Authorizer, ExactId, NodeCaIssuer, ServerTrust,
    SpiffeClientVerifier, SpiffeServerVerifier, SvidError, TrustBundle, Usage, VerifiedSvid,
    WorkloadsViaNodeCa,
};
