//! X.509-SVID verification and the rustls plumbing built on it.
//!
//! What it is: [`verify_svid`], the one function that decides whether a
//! presented chain is a valid SVID of our trust domain, the rustls verifiers
//! that call it on every handshake ([`SpiffeServerVerifier`],
//! [`SpiffeClientVerifier`]), and the TLS config builders the hub and spoke
//! use (TLS 1.3 only, no 0-RTT, no resumption, ring, injected clock).
//!
//! Verification runs in a fixed order and never mixes the steps:
//! 0. refuse CA certificates (chain or bundle) carrying URI name constraints
//!    ([`SvidError::UriNameConstraints`]): webpki cannot enforce them and
//!    fails closed, so we say so specifically;
//! 1. chain validity only: webpki path building to the bundle's roots, with
//!    validity dates and the EKU for the usage; no name check of any kind;
//! 2. SPIFFE leaf rules: not a CA, no signing key usage, exactly one URI SAN,
//!    a valid SPIFFE ID with a path, in the bundle's trust domain;
//! 3. node CA rules on the path webpki built (webpki cannot enforce URI name
//!    constraints, so this is ours): at most one intermediate; an
//!    intermediate must be a **node CA** — `pathLenConstraint=0`, one URI
//!    SAN naming a spoke node `spiffe://TD/store/STORE/node/NODE` of the
//!    bundle's trust domain — and the leaf it signed must be a workload of
//!    that same store (`spiffe://TD/store/STORE/sa/ACCOUNT`), or that node
//!    itself (the spoke's data-tunnel serving certificate), and must not
//!    outlive it;
//! 4. revocation, when the bundle carries a [`Revocations`] handle: the
//!    leaf's ID (a node), the leaf's key, the node CA's node ID and the node
//!    CA's key must not be listed;
//! 5. (verifiers only) the caller's [`Authorizer`], given the whole
//!    [`VerifiedSvid`] (ID, issuer, fingerprints).
//!
//! Only this module can construct a [`VerifiedSvid`], so holding one proves
//! steps 0 to 4 ran. Who drives it: rustls during handshakes; hub and spoke
//! through the config builders and [`peer_id`]. What it must not do: look at
//! DNS names or SNI, read the system clock (time comes from the caller or the
//! injected [`Clock`]), or decide authorization policy itself (that is the
//! [`Authorizer`]'s job).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use crate::clock::{from_unix_time, Clock, ClockTimeProvider};
use crate::naming::{self, MeshIdentity};
use crate::revocation::Revocations;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::svid::{self, sha256, KeyPair, UriSanError};

/// Decides whether an authenticated peer may talk to us.
///
/// Called after the chain, the SPIFFE rules, the node CA rules and
/// revocation have passed, with the peer's verified SVID. Return
/// `Err(reason)` to refuse; the reason ends up in [`SvidError::Unauthorized`].
pub trait Authorizer: Send + Sync + fmt::Debug {
    /// `Ok(())` if `peer` is allowed.
    fn authorize(&self, peer: &VerifiedSvid) -> Result<(), String>;
}

/// Accepts every ID (the verifier already checked the trust domain).
#[derive(Debug)]
pub struct AnyInTrustDomain;

impl Authorizer for AnyInTrustDomain {
    fn authorize(&self, _peer: &VerifiedSvid) -> Result<(), String> {
        Ok(())
    }
}

/// Accepts exactly one ID (e.g. a spoke dialing the hub expects `spiffe://TD/hub`).
#[derive(Debug)]
pub struct ExactId(pub SpiffeId);

impl Authorizer for ExactId {
    fn authorize(&self, peer: &VerifiedSvid) -> Result<(), String> {
        if peer.id() == &self.0 {
            Ok(())
        } else {
            Err(format!("expected {}", self.0))
        }
    }
}

/// Accepts workload SVIDs issued through a node CA, and nothing else: the
/// data plane's peers (spoke tunnels, the hub gateway). A workload leaf
/// signed straight by the root would escape per-spoke revocation, and a
/// node or the hub has no business opening data streams.
#[derive(Debug)]
pub struct WorkloadsViaNodeCa;

impl Authorizer for WorkloadsViaNodeCa {
    fn authorize(&self, peer: &VerifiedSvid) -> Result<(), String> {
        match (naming::classify(peer.id()), peer.issuer()) {
            (Some(MeshIdentity::Workload { .. }), Some(_)) => Ok(()),
            (Some(MeshIdentity::Workload { .. }), None) => {
                Err("workload SVIDs must be issued by their spoke's node CA".into())
            }
            _ => Err("only workload SVIDs may open data streams".into()),
        }
    }
}

/// The roots we trust for one trust domain, and optionally the revocation
/// list every verification consults.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    revocations: Option<Revocations>,
}

impl TrustBundle {
    /// A bundle of `roots` (self-signed CA certificates) for `td`.
    pub fn new(td: TrustDomain, roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trust_domain: td,
            roots,
            revocations: None,
        }
    }

    /// This bundle, also refusing what `revocations` names (read at every
    /// verification, so a newer list takes effect on the next handshake).
    pub fn with_revocations(mut self, revocations: Revocations) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// The revocation handle, if any.
    pub fn revocations(&self) -> Option<&Revocations> {
        self.revocations.as_ref()
    }

    /// The trust domain every verified peer must belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates (DER).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

/// Which side of a TLS handshake the presented SVID authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Usage {
    /// The peer is a TLS server (EKU `serverAuth`).
    Server,
    /// The peer is a TLS client (EKU `clientAuth`).
    Client,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Usage::Server => "server",
            Usage::Client => "client",
        })
    }
}

/// The node CA a verified leaf was issued by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCaIssuer {
    node: SpiffeId,
    key_fingerprint: [u8; 32],
    not_after: SystemTime,
}

impl NodeCaIssuer {
    /// The spoke node the CA belongs to.
    pub fn node(&self) -> &SpiffeId {
        &self.node
    }
    /// SHA-256 of the CA's public key.
    pub fn key_fingerprint(&self) -> [u8; 32] {
        self.key_fingerprint
    }
    /// When the CA expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// A leaf SVID that passed [`verify_svid`]. Only this module constructs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSvid {
    id: SpiffeId,
    leaf_fingerprint: [u8; 32],
    key_fingerprint: [u8; 32],
    not_after: SystemTime,
    issuer: Option<NodeCaIssuer>,
}

impl VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }
    /// SHA-256 of the leaf certificate DER (for evidence records).
    pub fn leaf_fingerprint(&self) -> [u8; 32] {
        self.leaf_fingerprint
    }
    /// SHA-256 of the leaf's public key.
    pub fn key_fingerprint(&self) -> [u8; 32] {
        self.key_fingerprint
    }
    /// When the leaf expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
    /// The node CA that issued the leaf (`None`: issued by the root).
    pub fn issuer(&self) -> Option<&NodeCaIssuer> {
        self.issuer.as_ref()
    }
    /// Whether `revocations` names this leaf or its node CA now.
    pub fn revoked_by(&self, list: &crate::revocation::RevocationList) -> bool {
        revoked_reason(list, &self.id, &self.key_fingerprint, self.issuer.as_ref()).is_some()
    }
}

/// Why `list` refuses a chain with this leaf and issuer, if it does.
fn revoked_reason(
    list: &crate::revocation::RevocationList,
    id: &SpiffeId,
    key: &[u8; 32],
    issuer: Option<&NodeCaIssuer>,
) -> Option<String> {
    if list.node_revoked(id) {
        return Some(format!("{id} is revoked"));
    }
    if list.key_revoked(key) {
        return Some(format!("the key of {id} is revoked"));
    }
    let ca = issuer?;
    if list.node_revoked(&ca.node) {
        return Some(format!(
            "its issuer, the node ca of {}, is revoked",
            ca.node
        ));
    }
    if list.key_revoked(&ca.key_fingerprint) {
        return Some(format!(
            "the key of its issuer, the node ca of {}, is revoked",
            ca.node
        ));
    }
    None
}

/// Why a presented certificate chain is not an acceptable SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The chain does not lead to a root in the trust bundle.
    #[error("certificate was not issued by a ca in the trust bundle (unknown issuer): is the peer enrolled with this trust domain's ca?")]
    UnknownIssuer,
    /// A certificate in the chain has expired.
    #[error("certificate expired at {} (now {}): renew it, or check this machine's clock", show(.not_after), show(.now))]
    Expired {
        /// The verification time.
        now: SystemTime,
        /// The certificate's notAfter.
        not_after: SystemTime,
    },
    /// A certificate in the chain is not valid yet.
    #[error("certificate is not valid before {} (now {}): check this machine's clock", show(.not_before), show(.now))]
    NotYetValid {
        /// The verification time.
        now: SystemTime,
        /// The certificate's notBefore.
        not_before: SystemTime,
    },
    /// A signature in the chain does not verify (e.g. issuer name matches but the key does not).
    #[error("certificate signature does not verify against its issuer's key (forged, or signed by a different ca key)")]
    BadSignature,
    /// The leaf is a CA certificate (`cA=true`).
    #[error("a ca certificate was presented as the leaf; an svid leaf must have cA=false")]
    CaUsedAsLeaf,
    /// The leaf has `keyCertSign` or `cRLSign` key usage.
    #[error("leaf certificate has keyCertSign or cRLSign key usage; an svid leaf must not")]
    SigningUsageOnLeaf,
    /// The leaf's extended key usage does not allow this side of the handshake.
    #[error("certificate's extended key usage does not allow tls {0} authentication")]
    WrongPurpose(Usage),
    /// The leaf has no URI SAN.
    #[error("leaf certificate has no uri san; an x509-svid carries exactly one spiffe id")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf certificate has {0} uri sans; an x509-svid must carry exactly one")]
    MultipleUriSans(usize),
    /// The leaf's URI SAN is not a `spiffe:` URI.
    #[error("leaf uri san {0:?} is not a spiffe id")]
    NotSpiffeUri(String),
    /// The leaf's URI SAN is a `spiffe:` URI but not a valid SPIFFE ID.
    #[error("leaf uri san is not a valid spiffe id: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    /// The leaf's SPIFFE ID has no path (it is a trust domain ID).
    #[error("leaf carries the trust domain id {0} without a path; leaf svids name a workload")]
    NoPath(SpiffeId),
    /// The leaf's SPIFFE ID is in another trust domain.
    #[error("peer is in trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// The bundle's trust domain.
        expected: TrustDomain,
        /// The peer's trust domain.
        found: TrustDomain,
    },
    /// A CA certificate (chain or bundle) carries URI name constraints.
    #[error("a ca certificate in the chain or trust bundle carries uri name constraints, which cannot be enforced here; reissue that ca without them")]
    UriNameConstraints,
    /// Pinned mode: no certificate in the presented chain has the pinned fingerprint.
    #[error("no ca certificate in the presented chain matches the pinned fingerprint: wrong hub, or wrong join token")]
    PinMismatch,
    /// The path has more than one intermediate: only root → node CA → leaf
    /// is allowed.
    #[error("certificate path has {0} intermediates; tidemesh allows one (the spoke's node ca)")]
    IntermediateDepth(usize),
    /// An intermediate is not a node CA limited to `pathLenConstraint=0`.
    #[error("intermediate ca of {0} does not carry pathLenConstraint=0: not a node ca")]
    NodeCaPathLen(String),
    /// An intermediate does not name a spoke node of this trust domain.
    #[error("intermediate ca is not a node ca of this trust domain: {0}")]
    NodeCaIdentity(String),
    /// A node CA signed an ID outside its own store.
    #[error("node ca of {ca} vouches for {id}, which is outside its store (a node ca may only issue spiffe://td/store/<its store>/sa/...)")]
    NodeCaScope {
        /// The node the CA belongs to.
        ca: Box<SpiffeId>,
        /// The leaf's ID.
        id: Box<SpiffeId>,
    },
    /// The leaf outlives the node CA that issued it.
    #[error("leaf {id} expires after the node ca that issued it: refused")]
    OutlivesIssuer {
        /// The leaf's ID.
        id: SpiffeId,
    },
    /// The revocation list names the leaf, its key, or its node CA.
    #[error("revoked: {0}")]
    Revoked(String),
    /// The SVID is valid but the [`Authorizer`] refused the peer.
    #[error("peer {id} is not authorized: {reason}")]
    Unauthorized {
        /// The peer's verified ID.
        id: SpiffeId,
        /// The authorizer's reason.
        reason: String,
    },
    /// A certificate could not be parsed.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// Any other chain validation failure (webpki's error, as debug text).
    #[error("certificate chain rejected: {0}")]
    Chain(String),
}

/// Renders a time for error messages (UTC), without panicking on odd values.
fn show(t: &SystemTime) -> String {
    let secs = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    match secs.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok()) {
        Some(dt) => dt.to_string(),
        None => format!("{t:?}"),
    }
}

/// The signature algorithms of the ring provider (one provider everywhere).
fn algorithms() -> WebPkiSupportedAlgorithms {
    static ALGS: OnceLock<WebPkiSupportedAlgorithms> = OnceLock::new();
    *ALGS.get_or_init(|| rustls::crypto::ring::default_provider().signature_verification_algorithms)
}

/// Verifies that `chain` (leaf first, then intermediates) is an X.509-SVID of
/// `bundle`'s trust domain, valid at `now` for `usage`.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    usage: Usage,
) -> Result<VerifiedSvid, SvidError> {
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        return Err(SvidError::NoCertificate);
    };

    // Step 0: URI name constraints anywhere we might build a path through.
    for (i, der) in intermediates.iter().enumerate() {
        refuse_uri_name_constraints(der, &format!("chain certificate {}", i + 1))?;
    }
    for (i, der) in bundle.roots.iter().enumerate() {
        refuse_uri_name_constraints(der, &format!("trust bundle root {i}"))?;
    }

    // Step 1: chain validity only (signatures, dates, basic constraints, EKU).
    let anchors = bundle
        .roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            webpki::anchor_from_trusted_cert(root)
                .map_err(|e| SvidError::Malformed(format!("trust bundle root {i}: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let end_entity =
        webpki::EndEntityCert::try_from(leaf_der).map_err(|e| from_webpki(e, usage))?;
    let eku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    let path = end_entity
        .verify_for_usage(
            algorithms().all,
            &anchors,
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map_err(|e| from_webpki(e, usage))?;
    let path_cas: Vec<CertificateDer<'_>> =
        path.intermediate_certificates().map(|c| c.der()).collect();

    // Step 2: SPIFFE rules on the leaf.
    let leaf = svid::parse_cert(leaf_der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let is_ca = leaf
        .basic_constraints()
        .map_err(|e| SvidError::Malformed(format!("basic constraints: {e}")))?
        .is_some_and(|bc| bc.value.ca);
    if is_ca {
        return Err(SvidError::CaUsedAsLeaf);
    }
    let can_sign = leaf
        .key_usage()
        .map_err(|e| SvidError::Malformed(format!("key usage: {e}")))?
        .is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign());
    if can_sign {
        return Err(SvidError::SigningUsageOnLeaf);
    }
    let id = svid::single_spiffe_id(&leaf).map_err(from_uri_san)?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(SvidError::WrongTrustDomain {
            expected: bundle.trust_domain().clone(),
            found: id.trust_domain().clone(),
        });
    }
    if id.is_trust_domain_id() {
        return Err(SvidError::NoPath(id));
    }
    let not_after = svid::system_time(leaf.validity().not_after.timestamp())
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let key_fingerprint = sha256(leaf.public_key().subject_public_key.data.as_ref());

    // Step 3: node CA rules on the path webpki built.
    let issuer = match path_cas.as_slice() {
        [] => None,
        [ca] => Some(node_ca_rules(ca, &id, not_after, bundle.trust_domain())?),
        more => return Err(SvidError::IntermediateDepth(more.len())),
    };

    // Step 4: revocation.
    if let Some(handle) = &bundle.revocations {
        let list = handle.current().ok_or_else(|| {
            SvidError::Revoked("revocation list unavailable (poisoned lock)".into())
        })?;
        if let Some(why) = revoked_reason(&list, &id, &key_fingerprint, issuer.as_ref()) {
            return Err(SvidError::Revoked(why));
        }
    }
    Ok(VerifiedSvid {
        id,
        leaf_fingerprint: sha256(leaf_der),
        key_fingerprint,
        not_after,
        issuer,
    })
}

/// Step 3 for the one intermediate of a path: it must be a node CA of this
/// trust domain limited to `pathLenConstraint=0`, and `leaf` must be a
/// workload of the CA's store expiring no later than the CA.
fn node_ca_rules(
    ca_der: &CertificateDer<'_>,
    leaf: &SpiffeId,
    leaf_not_after: SystemTime,
    td: &TrustDomain,
) -> Result<NodeCaIssuer, SvidError> {
    let ca = svid::parse_cert(ca_der).map_err(|e| SvidError::Malformed(format!("node ca: {e}")))?;
    let node = svid::single_spiffe_id(&ca).map_err(|e| SvidError::NodeCaIdentity(e.to_string()))?;
    let path_len = ca
        .basic_constraints()
        .map_err(|e| SvidError::Malformed(format!("node ca basic constraints: {e}")))?
        .and_then(|bc| bc.value.path_len_constraint);
    if path_len != Some(0) {
        return Err(SvidError::NodeCaPathLen(node.to_string()));
    }
    if node.trust_domain() != td {
        return Err(SvidError::NodeCaIdentity(format!(
            "{node} is in trust domain {}, expected {td}",
            node.trust_domain()
        )));
    }
    let Some(MeshIdentity::Node { store, .. }) = naming::classify(&node) else {
        return Err(SvidError::NodeCaIdentity(format!(
            "{node} is not a spoke node id (spiffe://td/store/STORE/node/NODE)"
        )));
    };
    // A node CA vouches for the workloads of its store, and for its own
    // node ID (the spoke's data-tunnel serving certificate), nothing else.
    let in_store = leaf == &node
        || matches!(naming::classify(leaf),
        Some(MeshIdentity::Workload { store: ref s, .. }) if *s == store);
    if !in_store {
        return Err(SvidError::NodeCaScope {
            ca: Box::new(node),
            id: Box::new(leaf.clone()),
        });
    }
    let not_after = svid::system_time(ca.validity().not_after.timestamp())
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    if leaf_not_after > not_after {
        return Err(SvidError::OutlivesIssuer { id: leaf.clone() });
    }
    Ok(NodeCaIssuer {
        key_fingerprint: sha256(ca.public_key().subject_public_key.data.as_ref()),
        node,
        not_after,
    })
}

/// The SPIFFE ID of a peer whose chain rustls already verified with one of
/// our verifiers (e.g. from quinn's `peer_identity()`): the leaf's one URI SAN.
///
/// This does not verify the chain; it only reads the leaf.
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, SvidError> {
    let leaf = certs.first().ok_or(SvidError::NoCertificate)?;
    let leaf = svid::parse_cert(leaf).map_err(|e| SvidError::Malformed(e.to_string()))?;
    svid::single_spiffe_id(&leaf).map_err(from_uri_san)
}

/// The [`SvidError`] inside a rustls error produced by our verifiers, if any.
pub fn svid_error(err: &rustls::Error) -> Option<&SvidError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

fn refuse_uri_name_constraints(der: &CertificateDer<'_>, what: &str) -> Result<(), SvidError> {
    let cert = svid::parse_cert(der).map_err(|e| SvidError::Malformed(format!("{what}: {e}")))?;
    let Some(nc) = cert
        .name_constraints()
        .map_err(|e| SvidError::Malformed(format!("{what}: name constraints: {e}")))?
    else {
        return Ok(());
    };
    let has_uri = nc
        .value
        .permitted_subtrees
        .iter()
        .chain(nc.value.excluded_subtrees.iter())
        .flatten()
        .any(|subtree| matches!(subtree.base, GeneralName::URI(_)));
    if has_uri {
        return Err(SvidError::UriNameConstraints);
    }
    Ok(())
}

fn from_uri_san(e: UriSanError) -> SvidError {
    match e {
        UriSanError::Malformed(m) => SvidError::Malformed(m),
        UriSanError::None => SvidError::NoUriSan,
        UriSanError::Multiple(n) => SvidError::MultipleUriSans(n),
        UriSanError::NotSpiffe(u) => SvidError::NotSpiffeUri(u),
        UriSanError::Invalid(e) => SvidError::InvalidSpiffeId(e),
    }
}

#[allow(deprecated, reason = "older webpki variants must still map somewhere")]
fn from_webpki(e: webpki::Error, usage: Usage) -> SvidError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => SvidError::UnknownIssuer,
        W::CertExpired { time, not_after } => SvidError::Expired {
            now: from_unix_time(time),
            not_after: from_unix_time(not_after),
        },
        W::CertNotValidYet { time, not_before } => SvidError::NotYetValid {
            now: from_unix_time(time),
            not_before: from_unix_time(not_before),
        },
        W::InvalidSignatureForPublicKey
        | W::SignatureAlgorithmMismatch
        | W::UnsupportedSignatureAlgorithm
        | W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => SvidError::BadSignature,
        W::CaUsedAsEndEntity => SvidError::CaUsedAsLeaf,
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) | W::EmptyEkuExtension => {
            SvidError::WrongPurpose(usage)
        }
        W::BadDer
        | W::BadDerTime
        | W::TrailingData(_)
        | W::MalformedExtensions
        | W::ExtensionValueInvalid
        | W::InvalidSerialNumber
        | W::InvalidCertValidity
        | W::UnsupportedCertVersion => SvidError::Malformed(format!("{e:?}")),
        other => SvidError::Chain(format!("{other:?}")),
    }
}

fn to_rustls(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// What a client trusts the server's chain against.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// A full trust bundle (normal operation).
    Bundle(TrustBundle),
    /// Enrollment bootstrap: the server must present, in its chain, a CA
    /// certificate whose SHA-256 is `ca_fingerprint`; that certificate then
    /// serves as the only root. The join token carries the pin.
    Pinned {
        /// The trust domain the server must belong to.
        trust_domain: TrustDomain,
        /// SHA-256 of the CA certificate DER.
        ca_fingerprint: [u8; 32],
    },
}

impl ServerTrust {
    fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedSvid, SvidError> {
        match self {
            ServerTrust::Bundle(bundle) => verify_svid(chain, bundle, now, Usage::Server),
            ServerTrust::Pinned {
                trust_domain,
                ca_fingerprint,
            } => {
                let pinned = chain
                    .iter()
                    .skip(1)
                    .find(|c| &sha256(c) == ca_fingerprint)
                    .ok_or(SvidError::PinMismatch)?;
                let bundle =
                    TrustBundle::new(trust_domain.clone(), vec![pinned.clone().into_owned()]);
                verify_svid(chain, &bundle, now, Usage::Server)
            }
        }
    }
}

/// rustls server-certificate verifier: [`verify_svid`] with
/// [`Usage::Server`], then the [`Authorizer`]. Ignores the server name.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: ServerTrust,
    authorizer: Arc<dyn Authorizer>,
}

impl SpiffeServerVerifier {
    /// Verifies servers against `bundle`.
    pub fn new(bundle: TrustBundle, authorizer: Arc<dyn Authorizer>) -> Self {
        Self::with_trust(ServerTrust::Bundle(bundle), authorizer)
    }

    /// Verifies servers against `trust` (a bundle or a pinned CA).
    pub fn with_trust(trust: ServerTrust, authorizer: Arc<dyn Authorizer>) -> Self {
        Self { trust, authorizer }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = full_chain(end_entity, intermediates);
        let svid = self.trust.verify(&chain, now).map_err(to_rustls)?;
        authorize(self.authorizer.as_ref(), &svid).map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// rustls client-certificate verifier: [`verify_svid`] with
/// [`Usage::Client`], then the [`Authorizer`]. Sends no CA hints.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    authorizer: Arc<dyn Authorizer>,
    allow_unauthenticated: bool,
}

impl SpiffeClientVerifier {
    /// Verifies clients against `bundle`; with `allow_unauthenticated`,
    /// clients without a certificate are let through (for enrollment).
    pub fn new(
        bundle: TrustBundle,
        authorizer: Arc<dyn Authorizer>,
        allow_unauthenticated: bool,
    ) -> Self {
        Self {
            bundle,
            authorizer,
            allow_unauthenticated,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.allow_unauthenticated
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = full_chain(end_entity, intermediates);
        let svid = verify_svid(&chain, &self.bundle, now, Usage::Client).map_err(to_rustls)?;
        authorize(self.authorizer.as_ref(), &svid).map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn full_chain<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

fn authorize(authorizer: &dyn Authorizer, svid: &VerifiedSvid) -> Result<(), SvidError> {
    authorizer
        .authorize(svid)
        .map_err(|reason| SvidError::Unauthorized {
            id: svid.id.clone(),
            reason,
        })
}

fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 client config presenting `chain`/`key` and verifying the server
/// against `bundle` then `authorizer`. No 0-RTT, no session resumption; the
/// certificate validity checks read `clock`.
pub fn client_config(
    bundle: TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
    authorizer: Arc<dyn Authorizer>,
    clock: Arc<dyn Clock>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let verifier = SpiffeServerVerifier::new(bundle, authorizer);
    let config = client_builder(verifier, clock)?.with_client_auth_cert(chain, private_key(key))?;
    Ok(finish_client(config, alpn))
}

/// Like [`client_config`] but presenting no client certificate: for
/// enrollment, before the spoke holds an SVID.
pub fn client_config_no_cert(
    bundle: TrustBundle,
    authorizer: Arc<dyn Authorizer>,
    clock: Arc<dyn Clock>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    anonymous_client_config(ServerTrust::Bundle(bundle), authorizer, clock, alpn)
}

/// A client config presenting no certificate, verifying the server against a
/// bundle or a pinned CA fingerprint (from a join token).
pub fn anonymous_client_config(
    trust: ServerTrust,
    authorizer: Arc<dyn Authorizer>,
    clock: Arc<dyn Clock>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let verifier = SpiffeServerVerifier::with_trust(trust, authorizer);
    let config = client_builder(verifier, clock)?.with_no_client_auth();
    Ok(finish_client(config, alpn))
}

fn client_builder(
    verifier: SpiffeServerVerifier,
    clock: Arc<dyn Clock>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, rustls::Error> {
    Ok(
        ClientConfig::builder_with_details(provider(), Arc::new(ClockTimeProvider(clock)))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier)),
    )
}

fn finish_client(mut config: ClientConfig, alpn: &[&[u8]]) -> ClientConfig {
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    // A resumed session skips certificate verification; with short-lived
    // SVIDs every connection re-verifies the chain against our clock instead.
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// A TLS 1.3 server config presenting `chain`/`key` and verifying client SVIDs
/// against `bundle` then `authorizer` (clients without a certificate are
/// admitted only if `allow_unauthenticated`). No 0-RTT, no session tickets or
/// resumption; certificate validity checks read `clock`.
pub fn server_config(
    bundle: TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
    authorizer: Arc<dyn Authorizer>,
    allow_unauthenticated: bool,
    clock: Arc<dyn Clock>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let verifier = SpiffeClientVerifier::new(bundle, authorizer, allow_unauthenticated);
    let mut config =
        ServerConfig::builder_with_details(provider(), Arc::new(ClockTimeProvider(clock)))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(chain, private_key(key))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}
