//! X.509-SVID issuance and certificate helpers: the hub's CA, keys, CSRs,
//! proof-of-possession signatures, PEM and fingerprints.
//!
//! What it is: everything needed to mint and inspect tidemesh certificates.
//! [`Ca`] is the hub's root CA (ECDSA P-256); [`Ca::sign_csr`] issues leaf
//! X.509-SVIDs exactly per the SPIFFE X.509-SVID standard, whatever the CSR
//! asked for: one URI SAN (the ID the *hub* decided), `cA=false`, key usage
//! `digitalSignature` (critical), EKU `serverAuth`+`clientAuth`, explicit
//! subject and dates, a random serial. Who drives it: the hub (issuing), the
//! spoke (keys, CSRs, proof of possession). What it must not do: decide *who*
//! may get which ID (that is hub policy, see `naming`), verify chains (that
//! is `verify`), read the clock (every date is passed in), or touch files.
//! Only ECDSA P-256 is accepted anywhere, so one crypto provider (ring)
//! covers rustls, quinn and rcgen.

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

pub use rcgen::KeyPair;

/// Organization name written into every tidemesh certificate subject.
pub const ORGANIZATION: &str = "tidemesh";
/// Length of the random serial numbers we issue, in bytes.
const SERIAL_LEN: usize = 16;
/// Uncompressed SEC1 P-256 point: 0x04 || X (32) || Y (32).
const P256_POINT_LEN: usize = 65;

/// Why issuing, parsing or signing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The system random generator failed (serials, keys).
    #[error("system random number generator failed")]
    Random,
    /// Generating a key pair failed.
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    /// A private key could not be parsed (PEM or PKCS#8).
    #[error("private key is not valid pkcs#8 pem: {0}")]
    InvalidKey(String),
    /// A key, CSR or certificate uses something other than ECDSA P-256.
    #[error("unsupported key: {0}; tidemesh only uses ecdsa p-256")]
    UnsupportedKey(String),
    /// `not_before` is not strictly before `not_after`.
    #[error("validity window is empty: not_before must be before not_after")]
    EmptyValidity,
    /// A date cannot be written into a certificate (before year 1 or after 9999).
    #[error("date is out of the range a certificate can carry (years 1..=9999)")]
    TimeOutOfRange,
    /// The CSR is not valid DER PKCS#10.
    #[error("certificate signing request is malformed: {0}")]
    CsrMalformed(String),
    /// The CSR is signed with something other than ecdsa-with-SHA256.
    #[error("certificate signing request uses signature algorithm {0}; only ecdsa-with-SHA256 is accepted")]
    CsrSignatureAlgorithm(String),
    /// The CSR's self-signature does not verify: the requester does not hold the key.
    #[error("certificate signing request signature does not verify against its own public key")]
    CsrSignature,
    /// A certificate is not valid DER X.509.
    #[error("certificate is malformed: {0}")]
    CertMalformed(String),
    /// PEM text could not be decoded.
    #[error("pem is malformed: {0}")]
    PemMalformed(String),
    /// PEM text contained no `CERTIFICATE` block.
    #[error("pem contains no CERTIFICATE block")]
    NoPemCertificates,
    /// The CA PEM did not contain exactly one certificate.
    #[error("ca pem must contain exactly one certificate, found {0}")]
    CaCertCount(usize),
    /// The CA certificate is not a CA (no `cA=true` or no `keyCertSign`).
    #[error(
        "certificate is not a signing ca (needs basicConstraints cA=true and keyUsage keyCertSign)"
    )]
    NotACa,
    /// The CA private key does not belong to the CA certificate.
    #[error("ca private key does not match the ca certificate's public key")]
    CaKeyMismatch,
    /// The CA certificate does not carry exactly one trust domain ID (`spiffe://TD`).
    #[error("ca certificate does not name its trust domain: {0}")]
    CaIdentity(String),
    /// The requested ID is not in the CA's trust domain.
    #[error("refusing to issue {id}: it is not in this ca's trust domain {expected}")]
    WrongTrustDomain {
        /// The CA's trust domain.
        expected: TrustDomain,
        /// The ID that was requested.
        id: SpiffeId,
    },
    /// A leaf SVID was requested for a trust domain ID (no path).
    #[error("refusing to issue a leaf for {0}: leaf svids need a path (spiffe://td/...)")]
    LeafWithoutPath(SpiffeId),
    /// A certificate has no URI SAN.
    #[error("certificate has no uri san")]
    NoUriSan,
    /// A certificate has more than one URI SAN.
    #[error("certificate has {0} uri sans; an x509-svid has exactly one")]
    MultipleUriSans(usize),
    /// The certificate's URI SAN is not a `spiffe://` URI.
    #[error("certificate uri san {0:?} is not a spiffe id")]
    NotSpiffeUri(String),
    /// The certificate's URI SAN looks like a SPIFFE ID but is invalid.
    #[error("certificate uri san is not a valid spiffe id: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    /// rcgen failed to build or sign a certificate or CSR.
    #[error("could not build or sign the certificate: {0}")]
    Signing(String),
    /// A proof-of-possession signature does not verify.
    #[error("signature does not verify against the public key")]
    BadSignature,
    /// A node CA was asked for an ID that is not a spoke node ID.
    #[error("{0} is not a spoke node id (spiffe://td/store/STORE/node/NODE)")]
    NotANodeId(SpiffeId),
    /// A certificate offered as a node CA is not one.
    #[error("certificate is not a node ca: {0}")]
    NotANodeCa(String),
    /// A node CA was asked to issue an ID outside its store.
    #[error("node ca of {ca} may only issue workload ids of its own store, not {id}")]
    OutOfScope {
        /// The node the CA belongs to.
        ca: Box<SpiffeId>,
        /// The ID that was requested.
        id: Box<SpiffeId>,
    },
    /// The node CA has expired: it can issue nothing more.
    #[error("the node ca of {0} has expired: reconnect to the hub to renew it")]
    IssuerExpired(SpiffeId),
}

/// The hub's root CA: self-signed certificate plus its private key.
#[derive(Debug)]
pub struct Ca {
    trust_domain: TrustDomain,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new root CA for `td`, valid from `not_before` to `not_after`.
    ///
    /// ECDSA P-256, `cA=true` without a path length limit, key usage
    /// `keyCertSign`+`cRLSign`, URI SAN `spiffe://TD`, subject
    /// `O=tidemesh, CN=tidemesh CA TD`, a random serial, no name constraints.
    pub fn generate(
        td: &TrustDomain,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Ca, IssueError> {
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        set_validity(&mut params, not_before, not_after)?;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = subject(Some(&format!("tidemesh CA {td}")));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&td.id())?];
        params.name_constraints = None;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok(Ca {
            trust_domain: td.clone(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`Ca::cert_pem`] and [`Ca::key_pem`].
    ///
    /// Checks that the certificate is a signing CA, that the key belongs to
    /// it, and reads the trust domain from its `spiffe://TD` URI SAN.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IssueError> {
        let certs = pem_certs(cert_pem)?;
        let [cert_der] = <[CertificateDer<'static>; 1]>::try_from(certs)
            .map_err(|certs| IssueError::CaCertCount(certs.len()))?;
        let key = key_from_pem(key_pem)?;
        let cert = parse_cert(&cert_der)?;

        let is_ca = cert
            .basic_constraints()
            .map_err(|e| IssueError::CertMalformed(e.to_string()))?
            .is_some_and(|bc| bc.value.ca);
        let can_sign = cert
            .key_usage()
            .map_err(|e| IssueError::CertMalformed(e.to_string()))?
            .is_some_and(|ku| ku.value.key_cert_sign());
        if !is_ca || !can_sign {
            return Err(IssueError::NotACa);
        }
        if p256_point(cert.public_key())? != key.public_key_raw() {
            return Err(IssueError::CaKeyMismatch);
        }
        let id = single_spiffe_id(&cert).map_err(|e| IssueError::CaIdentity(e.to_string()))?;
        if !id.is_trust_domain_id() {
            return Err(IssueError::CaIdentity(format!(
                "{id} has a path; a ca carries spiffe://<trust-domain> only"
            )));
        }
        // rcgen panics on a subject with an empty RDN set; refuse it first.
        if cert.subject().iter().any(|rdn| rdn.iter().next().is_none()) {
            return Err(IssueError::CertMalformed(
                "ca subject has an empty relative distinguished name".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| IssueError::CertMalformed(e.to_string()))?;
        Ok(Ca {
            trust_domain: id.trust_domain().clone(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        certs_to_pem(std::slice::from_ref(&self.cert_der))
    }

    /// The CA private key as PKCS#8 PEM. Secret: store with 0600 permissions.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// SHA-256 of the CA certificate DER: what join tokens pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        sha256(&self.cert_der)
    }

    /// The trust domain this CA is authoritative for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Issues a leaf X.509-SVID for `id` to the key in `csr_der`.
    ///
    /// The CSR is only used for its public key (which must be ECDSA P-256)
    /// and its self-signature (proof that the requester holds the key).
    /// Whatever names, extensions or subject it asks for are ignored; the
    /// certificate carries exactly: URI SAN `id`, `cA=false` (critical),
    /// key usage `digitalSignature` (critical), EKU `serverAuth`+`clientAuth`,
    /// subject `O=tidemesh`, the given dates, a random 16-byte serial, AKI.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateDer<'static>, IssueError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IssueError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                id: id.clone(),
            });
        }
        if id.is_trust_domain_id() {
            return Err(IssueError::LeafWithoutPath(id.clone()));
        }
        let public_key = P256PublicKey(csr_public_key(csr_der)?);
        issue_leaf(&self.issuer, &public_key, id, not_before, not_after)
    }

    /// Issues a spoke its **node CA**: an intermediate CA certificate for the
    /// key in `csr_der` (generated on the spoke, which proves possession by
    /// the CSR's self-signature), named by the node's ID, that may sign
    /// workload SVIDs and nothing else.
    ///
    /// The certificate carries exactly: URI SAN `node` (a
    /// `spiffe://TD/store/STORE/node/NODE` ID: verifiers read the store the
    /// CA may vouch for from it), `cA=true` with `pathLenConstraint=0`
    /// (critical: it cannot sign another CA), key usage
    /// `keyCertSign`+`cRLSign` (critical), no extended key usage, subject
    /// `O=tidemesh, CN=tidemesh node CA STORE/NODE`, the given dates, a
    /// random serial, AKI and SKI. `not_after` is clamped to this CA's own
    /// expiry. Name constraints are not used: webpki refuses URI name
    /// constraints, so the store scope is enforced by `verify` instead.
    pub fn issue_node_ca(
        &self,
        csr_der: &[u8],
        node: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateDer<'static>, IssueError> {
        if node.trust_domain() != &self.trust_domain {
            return Err(IssueError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                id: node.clone(),
            });
        }
        let Some(crate::naming::MeshIdentity::Node { store, node: name }) =
            crate::naming::classify(node)
        else {
            return Err(IssueError::NotANodeId(node.clone()));
        };
        let public_key = P256PublicKey(csr_public_key(csr_der)?);
        let own_not_after = cert_validity(&self.cert_der)?.1;
        let mut params = CertificateParams::default();
        set_validity(&mut params, not_before, not_after.min(own_not_after))?;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = subject(Some(&format!("tidemesh node CA {store}/{name}")));
        params.subject_alt_names = vec![uri_san(node)?];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok(cert.der().clone())
    }

    /// Signs `msg` with the CA key under a domain-separation `context`
    /// (see [`signed_message`]): how the hub vouches for data that is not a
    /// certificate (revocation lists, time anchors). Verify with
    /// [`verify_signed_message`] and the CA certificate's public key.
    pub fn sign_message(&self, context: &str, msg: &[u8]) -> Result<Vec<u8>, IssueError> {
        self.issuer
            .key()
            .sign(&signed_message(context, msg))
            .map_err(|e| IssueError::Signing(e.to_string()))
    }
}

/// The bytes a [`Ca::sign_message`] signature covers: `tidemesh:`, the
/// context, a NUL, then the message. A signature for one context never
/// verifies for another.
pub fn signed_message(context: &str, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + context.len() + msg.len());
    out.extend_from_slice(b"tidemesh:");
    out.extend_from_slice(context.as_bytes());
    out.push(0);
    out.extend_from_slice(msg);
    out
}

/// Verifies a [`Ca::sign_message`] signature against `ca_cert_der`'s key.
pub fn verify_signed_message(
    ca_cert_der: &[u8],
    context: &str,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), IssueError> {
    verify_signature(
        &cert_public_key(ca_cert_der)?,
        &signed_message(context, msg),
        sig,
    )
}

/// Builds and signs a leaf X.509-SVID (the fixed shape [`Ca::sign_csr`]
/// documents) for `public_key`, issued by `issuer`.
fn issue_leaf(
    issuer: &Issuer<'static, KeyPair>,
    public_key: &impl PublicKeyData,
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateDer<'static>, IssueError> {
    let mut params = CertificateParams::default();
    set_validity(&mut params, not_before, not_after)?;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = subject(None);
    params.subject_alt_names = vec![uri_san(id)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(public_key, issuer)
        .map_err(|e| IssueError::Signing(e.to_string()))?;
    Ok(cert.der().clone())
}

/// A spoke's node CA: the intermediate certificate the hub issued it
/// ([`Ca::issue_node_ca`]) and its private key, which never leaves the box.
/// It issues the spoke's workload SVIDs, online and offline alike.
pub struct NodeCa {
    node: SpiffeId,
    store: String,
    cert_der: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCa")
            .field("node", &self.node.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// Loads a node CA from its certificate and key, checking that the key
    /// belongs to the certificate, that it is a CA limited to
    /// `pathLenConstraint=0` with `keyCertSign`, and that it names a node.
    pub fn new(cert_der: CertificateDer<'static>, key: KeyPair) -> Result<NodeCa, IssueError> {
        require_p256(&key)?;
        let cert = parse_cert(&cert_der)?;
        let bc = cert
            .basic_constraints()
            .map_err(|e| IssueError::CertMalformed(e.to_string()))?
            .map(|bc| (bc.value.ca, bc.value.path_len_constraint));
        let can_sign = cert
            .key_usage()
            .map_err(|e| IssueError::CertMalformed(e.to_string()))?
            .is_some_and(|ku| ku.value.key_cert_sign());
        if bc != Some((true, Some(0))) || !can_sign {
            return Err(IssueError::NotANodeCa(
                "needs cA=true, pathLenConstraint=0 and keyUsage keyCertSign".into(),
            ));
        }
        if p256_point(cert.public_key())? != key.public_key_raw() {
            return Err(IssueError::CaKeyMismatch);
        }
        let node = single_spiffe_id(&cert).map_err(|e| IssueError::NotANodeCa(e.to_string()))?;
        let Some(crate::naming::MeshIdentity::Node { store, .. }) = crate::naming::classify(&node)
        else {
            return Err(IssueError::NotANodeId(node));
        };
        let v = cert.validity();
        let not_before = system_time(v.not_before.timestamp())?;
        let not_after = system_time(v.not_after.timestamp())?;
        if cert.subject().iter().any(|rdn| rdn.iter().next().is_none()) {
            return Err(IssueError::CertMalformed(
                "node ca subject has an empty relative distinguished name".into(),
            ));
        }
        drop(cert);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| IssueError::CertMalformed(e.to_string()))?;
        Ok(NodeCa {
            node,
            store,
            cert_der,
            not_before,
            not_after,
            issuer,
        })
    }

    /// The node ID the CA is named by.
    pub fn node(&self) -> &SpiffeId {
        &self.node
    }

    /// The store whose workload IDs it may issue.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's validity.
    pub fn validity(&self) -> (SystemTime, SystemTime) {
        (self.not_before, self.not_after)
    }

    /// SHA-256 of the CA's public key (what revocation lists name).
    pub fn key_fingerprint(&self) -> [u8; 32] {
        sha256(self.issuer.key().public_key_raw())
    }

    /// Issues the spoke's data-tunnel serving SVID: its own node ID, for
    /// `key`'s public key, chain `[leaf, node CA]`, the leaf shape and
    /// clamping of [`NodeCa::issue_workload`]. Peers accept it where they
    /// expect that node; the hub's control plane never does (it only takes
    /// node SVIDs the hub itself issued).
    pub fn issue_serving(
        &self,
        key: &KeyPair,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        require_p256(key)?;
        if not_before >= self.not_after {
            return Err(IssueError::IssuerExpired(self.node.clone()));
        }
        let leaf = issue_leaf(
            &self.issuer,
            key,
            &self.node,
            not_before.max(self.not_before),
            not_after.min(self.not_after),
        )?;
        Ok(vec![leaf, self.cert_der.clone()])
    }

    /// Issues a workload X.509-SVID for `key`'s public key: the leaf shape
    /// [`Ca::sign_csr`] documents, chain `[leaf, node CA]`. Refuses IDs that
    /// are not `spiffe://TD/store/<this store>/sa/ACCOUNT`; `not_after` is
    /// clamped to the CA's own expiry (a leaf never outlives its CA), and
    /// issuing at or after that expiry is refused.
    pub fn issue_workload(
        &self,
        key: &KeyPair,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        require_p256(key)?;
        let in_scope = id.trust_domain() == self.node.trust_domain()
            && matches!(crate::naming::classify(id),
                Some(crate::naming::MeshIdentity::Workload { ref store, .. }) if *store == self.store);
        if !in_scope {
            return Err(IssueError::OutOfScope {
                ca: Box::new(self.node.clone()),
                id: Box::new(id.clone()),
            });
        }
        if not_before >= self.not_after {
            return Err(IssueError::IssuerExpired(self.node.clone()));
        }
        let leaf = issue_leaf(
            &self.issuer,
            key,
            id,
            not_before.max(self.not_before),
            not_after.min(self.not_after),
        )?;
        Ok(vec![leaf, self.cert_der.clone()])
    }
}

/// A bare ECDSA P-256 public key (uncompressed point), for rcgen.
struct P256PublicKey(Vec<u8>);

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The public key (uncompressed P-256 point) of a CSR, after checking that the
/// CSR is signed with ecdsa-with-SHA256 by that very key.
pub fn csr_public_key(csr_der: &[u8]) -> Result<Vec<u8>, IssueError> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| IssueError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::CsrMalformed(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(IssueError::CsrSignatureAlgorithm(
            csr.signature_algorithm.algorithm.to_id_string(),
        ));
    }
    let info = &csr.certification_request_info;
    let point = p256_point(&info.subject_pki)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| IssueError::CsrSignature)?;
    Ok(point)
}

/// The public key (uncompressed P-256 point) of a certificate.
pub fn cert_public_key(cert_der: &[u8]) -> Result<Vec<u8>, IssueError> {
    p256_point(parse_cert(cert_der)?.public_key())
}

/// SHA-256 of a certificate's public key (the uncompressed P-256 point):
/// how revocation lists name node keys and node CA keys.
pub fn cert_key_fingerprint(cert_der: &[u8]) -> Result<[u8; 32], IssueError> {
    Ok(sha256(&cert_public_key(cert_der)?))
}

/// SHA-256 of a key pair's public key, as [`cert_key_fingerprint`].
pub fn key_fingerprint(key: &KeyPair) -> [u8; 32] {
    sha256(key.public_key_raw())
}

/// A certificate's `(not_before, not_after)`.
pub fn cert_validity(cert_der: &[u8]) -> Result<(SystemTime, SystemTime), IssueError> {
    let cert = parse_cert(cert_der)?;
    let v = cert.validity();
    Ok((
        system_time(v.not_before.timestamp())?,
        system_time(v.not_after.timestamp())?,
    ))
}

/// The SPIFFE ID of a certificate: its one URI SAN, which must parse.
///
/// Does not verify anything else; see `verify::verify_svid` for that.
pub fn cert_spiffe_id(cert_der: &[u8]) -> Result<SpiffeId, IssueError> {
    single_spiffe_id(&parse_cert(cert_der)?).map_err(|e| match e {
        UriSanError::Malformed(m) => IssueError::CertMalformed(m),
        UriSanError::None => IssueError::NoUriSan,
        UriSanError::Multiple(n) => IssueError::MultipleUriSans(n),
        UriSanError::NotSpiffe(u) => IssueError::NotSpiffeUri(u),
        UriSanError::Invalid(e) => IssueError::InvalidSpiffeId(e),
    })
}

/// A fresh ECDSA P-256 key pair.
pub fn generate_key() -> Result<KeyPair, IssueError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IssueError::KeyGeneration(e.to_string()))
}

/// Parses a PKCS#8 PEM private key; it must be ECDSA P-256.
pub fn key_from_pem(pem: &str) -> Result<KeyPair, IssueError> {
    let key = KeyPair::from_pem(pem).map_err(|e| IssueError::InvalidKey(e.to_string()))?;
    require_p256(&key)?;
    Ok(key)
}

/// A DER PKCS#10 CSR for `key`, asking for `id` as URI SAN.
///
/// The hub ignores what the CSR asks for and decides the ID itself; the SAN
/// is there for humans and logs.
pub fn make_csr(key: &KeyPair, id: &SpiffeId) -> Result<Vec<u8>, IssueError> {
    require_p256(key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(None);
    params.subject_alt_names = vec![uri_san(id)?];
    let csr = params
        .serialize_request(key)
        .map_err(|e| IssueError::Signing(e.to_string()))?;
    let der: &CertificateSigningRequestDer<'static> = csr.der();
    Ok(der.to_vec())
}

/// Signs `msg` with `key` (ECDSA P-256, SHA-256, ASN.1 DER signature):
/// proof of possession of the key.
pub fn sign(key: &KeyPair, msg: &[u8]) -> Result<Vec<u8>, IssueError> {
    require_p256(key)?;
    key.sign(msg)
        .map_err(|e| IssueError::Signing(e.to_string()))
}

/// Verifies an ECDSA P-256 SHA-256 ASN.1 signature by `public_key`
/// (uncompressed point, as from [`csr_public_key`] or [`cert_public_key`]).
pub fn verify_signature(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), IssueError> {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key)
        .verify(msg, sig)
        .map_err(|_| IssueError::BadSignature)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Parses hex (either case); `None` for odd length or a non-hex character.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

/// Every `CERTIFICATE` block in `pem`, in order; other blocks are skipped.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IssueError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IssueError::PemMalformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(IssueError::NoPemCertificates);
    }
    Ok(certs)
}

/// `certs` as concatenated `CERTIFICATE` PEM blocks.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64(cert);
        // base64 output is ASCII, so byte chunks are char boundaries.
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

// ---- crate-internal helpers shared with `verify` ----

/// Why a certificate does not carry exactly one valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UriSanError {
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("no uri san")]
    None,
    #[error("{0} uri sans")]
    Multiple(usize),
    #[error("uri san {0:?} is not a spiffe id")]
    NotSpiffe(String),
    #[error("invalid spiffe id: {0}")]
    Invalid(SpiffeIdError),
}

/// The one URI SAN of `cert`, parsed as a SPIFFE ID.
///
/// Counts every URI entry, including ones whose encoding is broken, so a
/// certificate cannot hide a second identity behind a malformed entry.
pub(crate) fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, UriSanError> {
    /// `[6]` in GeneralName: uniformResourceIdentifier.
    const URI_TAG: u32 = 6;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| UriSanError::Malformed(format!("subject alternative name: {e}")))?;
    let mut uris: Vec<Option<&str>> = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(Some(u)),
                GeneralName::Invalid(tag, _) if tag.0 == URI_TAG => uris.push(None),
                _ => {}
            }
        }
    }
    match uris.as_slice() {
        [] => Err(UriSanError::None),
        [None] => Err(UriSanError::Malformed(
            "uri san is not valid ia5/utf-8".into(),
        )),
        [Some(uri)] => {
            let scheme_is_spiffe = uri
                .split_once(':')
                .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("spiffe"));
            if !scheme_is_spiffe {
                return Err(UriSanError::NotSpiffe((*uri).to_owned()));
            }
            SpiffeId::parse(uri).map_err(UriSanError::Invalid)
        }
        many => Err(UriSanError::Multiple(many.len())),
    }
}

/// Parses a DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, IssueError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| IssueError::CertMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::CertMalformed(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// `t` (seconds since the epoch, may be negative) as a [`SystemTime`].
pub(crate) fn system_time(unix_secs: i64) -> Result<SystemTime, IssueError> {
    let magnitude = std::time::Duration::from_secs(unix_secs.unsigned_abs());
    let t = if unix_secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    t.ok_or(IssueError::TimeOutOfRange)
}

fn p256_point(spki: &SubjectPublicKeyInfo<'_>) -> Result<Vec<u8>, IssueError> {
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(IssueError::UnsupportedKey(format!(
            "public key algorithm {}",
            spki.algorithm.algorithm.to_id_string()
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| x509_parser::der_parser::oid::Oid::try_from(p).ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(IssueError::UnsupportedKey(format!(
            "ec curve {}",
            curve.map_or_else(|| "(missing)".to_owned(), |c| c.to_id_string())
        )));
    }
    let point = spki.subject_public_key.data.as_ref();
    if point.len() != P256_POINT_LEN || point.first() != Some(&0x04) {
        return Err(IssueError::UnsupportedKey(
            "p-256 public key is not an uncompressed point".into(),
        ));
    }
    Ok(point.to_vec())
}

fn require_p256(key: &KeyPair) -> Result<(), IssueError> {
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(IssueError::UnsupportedKey(format!("{:?}", key.algorithm())));
    }
    Ok(())
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), IssueError> {
    let nb = asn1_time(not_before)?;
    let na = asn1_time(not_after)?;
    if nb >= na {
        return Err(IssueError::EmptyValidity);
    }
    params.not_before = nb;
    params.not_after = na;
    Ok(())
}

/// `t`, truncated to whole seconds, if a certificate can carry it.
fn asn1_time(t: SystemTime) -> Result<OffsetDateTime, IssueError> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| IssueError::TimeOutOfRange)?,
        Err(e) => {
            let back = e.duration();
            // Round towards the past so a pre-epoch instant is never moved later.
            let whole = back.as_secs() + u64::from(back.subsec_nanos() > 0);
            i64::try_from(whole)
                .map(|s| -s)
                .map_err(|_| IssueError::TimeOutOfRange)?
        }
    };
    let dt = OffsetDateTime::from_unix_timestamp(secs).map_err(|_| IssueError::TimeOutOfRange)?;
    if !(1..=9999).contains(&dt.year()) {
        return Err(IssueError::TimeOutOfRange);
    }
    Ok(dt)
}

fn random_serial() -> Result<SerialNumber, IssueError> {
    let mut bytes = [0u8; SERIAL_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IssueError::Random)?;
    // Positive (top bit clear) and full length (second-highest bit set), so the
    // DER INTEGER is always exactly 16 bytes and never zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn subject(common_name: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(cn) = common_name {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

fn uri_san(id: &SpiffeId) -> Result<SanType, IssueError> {
    // SPIFFE IDs are ASCII by construction, so this cannot fail in practice.
    let ia5 = id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| IssueError::Signing(e.to_string()))?;
    Ok(SanType::URI(ia5))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use std::time::Duration;
    use x509_parser::extensions::ParsedExtension;

    fn td() -> TrustDomain {
        TrustDomain::new("corp.example").unwrap()
    }
    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }
    const NB: u64 = 1_800_000_000;
    const NA: u64 = 1_800_003_600;

    fn ca() -> Ca {
        Ca::generate(&td(), t(NB - 86_400), t(NB + 365 * 86_400)).unwrap()
    }

    #[test]
    fn ca_cert_is_a_spiffe_signing_cert() {
        let ca = ca();
        let ca_der = ca.cert_der();
        let cert = parse_cert(ca_der.as_ref()).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.value.ca);
        assert!(bc.critical);
        assert_eq!(bc.value.path_len_constraint, None);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign());
        assert!(ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert!(cert.name_constraints().unwrap().is_none());
        assert_eq!(single_spiffe_id(&cert).unwrap(), td().id());
        assert_eq!(
            cert.subject().to_string(),
            "O=tidemesh, CN=tidemesh CA corp.example"
        );
        assert_eq!(cert.raw_serial().len(), SERIAL_LEN);
        assert_eq!(
            cert_validity(ca.cert_der().as_ref()).unwrap(),
            (t(NB - 86_400), t(NB + 365 * 86_400))
        );
        assert_eq!(ca.fingerprint(), sha256(ca.cert_der().as_ref()));
        assert_eq!(ca.trust_domain(), &td());
    }

    #[test]
    fn leaf_matches_the_x509_svid_spec() {
        let ca = ca();
        let key = generate_key().unwrap();
        let id = SpiffeId::parse("spiffe://corp.example/store/sf01/node/n1").unwrap();
        let csr = make_csr(&key, &id).unwrap();
        let der = ca.sign_csr(&csr, &id, t(NB), t(NA)).unwrap();
        let cert = parse_cert(der.as_ref()).unwrap();

        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans.len(), 1);
        assert_eq!(
            sans[0],
            GeneralName::URI("spiffe://corp.example/store/sf01/node/n1")
        );
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        assert!(bc.critical);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        assert!(!ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth);
        assert!(eku.value.client_auth);
        assert_eq!(cert.validity().not_before.timestamp(), NB as i64);
        assert_eq!(cert.validity().not_after.timestamp(), NA as i64);
        assert_eq!(cert_validity(der.as_ref()).unwrap(), (t(NB), t(NA)));
        assert_eq!(cert.subject().to_string(), "O=tidemesh");
        assert_eq!(
            cert.issuer(),
            parse_cert(ca.cert_der().as_ref()).unwrap().subject()
        );
        assert_eq!(cert.raw_serial().len(), SERIAL_LEN);
        let has_aki = cert.extensions().iter().any(|e| {
            matches!(
                e.parsed_extension(),
                ParsedExtension::AuthorityKeyIdentifier(_)
            )
        });
        assert!(has_aki);
        assert_eq!(cert_spiffe_id(der.as_ref()).unwrap(), id);
        assert_eq!(cert_public_key(der.as_ref()).unwrap(), key.public_key_raw());
    }

    #[test]
    fn serials_are_random() {
        let ca = ca();
        let key = generate_key().unwrap();
        let id = SpiffeId::parse("spiffe://corp.example/a").unwrap();
        let csr = make_csr(&key, &id).unwrap();
        let a = ca.sign_csr(&csr, &id, t(NB), t(NA)).unwrap();
        let b = ca.sign_csr(&csr, &id, t(NB), t(NA)).unwrap();
        assert_ne!(
            parse_cert(a.as_ref()).unwrap().raw_serial(),
            parse_cert(b.as_ref()).unwrap().raw_serial()
        );
    }

    #[test]
    fn csr_names_and_extensions_are_ignored() {
        let ca = ca();
        let key = generate_key().unwrap();
        // The CSR asks for a foreign SPIFFE ID, a DNS name, and to be a CA.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI("spiffe://evil.example/hub".try_into().unwrap()),
            SanType::DnsName("hub.corp.example".try_into().unwrap()),
        ];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = params.serialize_request(&key).unwrap().der().to_vec();

        let id = SpiffeId::parse("spiffe://corp.example/store/sf01/sa/pos").unwrap();
        let der = ca.sign_csr(&csr, &id, t(NB), t(NA)).unwrap();
        let cert = parse_cert(der.as_ref()).unwrap();
        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &vec![GeneralName::URI("spiffe://corp.example/store/sf01/sa/pos")]
        );
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(cert.subject().to_string(), "O=tidemesh");
    }

    #[test]
    fn sign_csr_refuses_foreign_trust_domain_and_root_ids() {
        let ca = ca();
        let key = generate_key().unwrap();
        let foreign = SpiffeId::parse("spiffe://other.example/x").unwrap();
        let csr = make_csr(&key, &foreign).unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &foreign, t(NB), t(NA)),
            Err(IssueError::WrongTrustDomain { .. })
        ));
        assert!(matches!(
            ca.sign_csr(&csr, &td().id(), t(NB), t(NA)),
            Err(IssueError::LeafWithoutPath(_))
        ));
        let id = SpiffeId::parse("spiffe://corp.example/x").unwrap();
        assert_eq!(
            ca.sign_csr(&csr, &id, t(NA), t(NB)),
            Err(IssueError::EmptyValidity)
        );
        assert_eq!(
            ca.sign_csr(&csr, &id, t(NB), t(NB)),
            Err(IssueError::EmptyValidity)
        );
    }

    #[test]
    fn sign_csr_refuses_tampered_or_garbage_csrs() {
        let ca = ca();
        let key = generate_key().unwrap();
        let id = SpiffeId::parse("spiffe://corp.example/x").unwrap();
        let csr = make_csr(&key, &id).unwrap();
        // Flip a byte inside the signed request info (the subject name).
        let pos = csr
            .windows(ORGANIZATION.len())
            .position(|w| w == ORGANIZATION.as_bytes())
            .unwrap();
        let mut tampered = csr.clone();
        tampered[pos] ^= 0x20;
        assert_eq!(
            ca.sign_csr(&tampered, &id, t(NB), t(NA)),
            Err(IssueError::CsrSignature)
        );
        assert!(matches!(
            ca.sign_csr(b"not a csr", &id, t(NB), t(NA)),
            Err(IssueError::CsrMalformed(_))
        ));
        assert!(matches!(
            ca.sign_csr(&[], &id, t(NB), t(NA)),
            Err(IssueError::CsrMalformed(_))
        ));
        let mut trailing = csr.clone();
        trailing.push(0);
        assert!(matches!(
            ca.sign_csr(&trailing, &id, t(NB), t(NA)),
            Err(IssueError::CsrMalformed(_))
        ));
    }

    #[test]
    fn csr_with_another_curve_is_refused() {
        let ca = ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(None);
        let csr = params.serialize_request(&key).unwrap().der().to_vec();
        let id = SpiffeId::parse("spiffe://corp.example/x").unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &id, t(NB), t(NA)),
            Err(IssueError::CsrSignatureAlgorithm(_))
        ));
        assert!(matches!(
            make_csr(&key, &id),
            Err(IssueError::UnsupportedKey(_))
        ));
        assert!(matches!(
            sign(&key, b"x"),
            Err(IssueError::UnsupportedKey(_))
        ));
    }

    #[test]
    fn proof_of_possession_roundtrip() {
        let key = generate_key().unwrap();
        let id = SpiffeId::parse("spiffe://corp.example/x").unwrap();
        let csr = make_csr(&key, &id).unwrap();
        let pk = csr_public_key(&csr).unwrap();
        assert_eq!(pk, key.public_key_raw());
        let msg = b"challenge nonce 42";
        let sig = sign(&key, msg).unwrap();
        assert_eq!(verify_signature(&pk, msg, &sig), Ok(()));
        assert_eq!(
            verify_signature(&pk, b"another message", &sig),
            Err(IssueError::BadSignature)
        );
        let other = generate_key().unwrap();
        assert_eq!(
            verify_signature(other.public_key_raw(), msg, &sig),
            Err(IssueError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"garbage", msg, &sig),
            Err(IssueError::BadSignature)
        );
    }

    #[test]
    fn ca_pem_roundtrip_keeps_issuing_compatible_leaves() {
        let ca = ca();
        let loaded = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.trust_domain(), &td());
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let key = generate_key().unwrap();
        let id = SpiffeId::parse("spiffe://corp.example/x").unwrap();
        let leaf = loaded
            .sign_csr(&make_csr(&key, &id).unwrap(), &id, t(NB), t(NA))
            .unwrap();
        let leaf = parse_cert(leaf.as_ref()).unwrap();
        let ca_der = ca.cert_der();
        let ca_cert = parse_cert(ca_der.as_ref()).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        assert!(leaf.verify_signature(Some(ca_cert.public_key())).is_ok());
    }

    #[test]
    fn ca_from_pem_refuses_mismatched_or_non_ca_material() {
        let ca = ca();
        let other = Ca::generate(&td(), t(NB), t(NA)).unwrap();
        assert_eq!(
            Ca::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err(),
            IssueError::CaKeyMismatch
        );
        let key = generate_key().unwrap();
        let id = SpiffeId::parse("spiffe://corp.example/x").unwrap();
        let leaf = ca
            .sign_csr(&make_csr(&key, &id).unwrap(), &id, t(NB), t(NA))
            .unwrap();
        assert_eq!(
            Ca::from_pem(&certs_to_pem(&[leaf]), &key.serialize_pem()).unwrap_err(),
            IssueError::NotACa
        );
        let two = certs_to_pem(&[ca.cert_der(), other.cert_der()]);
        assert_eq!(
            Ca::from_pem(&two, &ca.key_pem()).unwrap_err(),
            IssueError::CaCertCount(2)
        );
        assert!(matches!(
            Ca::from_pem(&ca.cert_pem(), "not a key"),
            Err(IssueError::InvalidKey(_))
        ));
        assert_eq!(
            Ca::from_pem("", &ca.key_pem()).unwrap_err(),
            IssueError::NoPemCertificates
        );
    }

    #[test]
    fn pem_roundtrip_and_errors() {
        let ca = ca();
        let other = Ca::generate(&td(), t(NB), t(NA)).unwrap();
        let both = vec![ca.cert_der(), other.cert_der()];
        let pem = certs_to_pem(&both);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(pem_certs(&pem).unwrap(), both);
        // Non-certificate blocks are skipped.
        let with_key = format!("{}{}", ca.key_pem(), ca.cert_pem());
        assert_eq!(pem_certs(&with_key).unwrap(), vec![ca.cert_der()]);
        assert_eq!(pem_certs("hello"), Err(IssueError::NoPemCertificates));
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            pem_certs(broken),
            Err(IssueError::PemMalformed(_))
        ));
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, out) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), out);
        }
    }

    #[test]
    fn hex_roundtrip() {
        let bytes = [0x00, 0x0f, 0xa5, 0xff];
        assert_eq!(hex(&bytes), "000fa5ff");
        assert_eq!(from_hex("000fa5ff").unwrap(), bytes);
        assert_eq!(from_hex("000FA5FF").unwrap(), bytes);
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
        assert_eq!(from_hex("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn keys_roundtrip_through_pem() {
        let key = generate_key().unwrap();
        let back = key_from_pem(&key.serialize_pem()).unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            key_from_pem(&p384.serialize_pem()),
            Err(IssueError::UnsupportedKey(_))
        ));
        assert!(matches!(
            key_from_pem("nope"),
            Err(IssueError::InvalidKey(_))
        ));
    }

    #[test]
    fn dates_out_of_certificate_range_are_refused() {
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000); // year ~14600
        assert_eq!(asn1_time(far), Err(IssueError::TimeOutOfRange));
        assert!(asn1_time(UNIX_EPOCH - Duration::from_millis(1500)).is_ok());
        assert_eq!(
            asn1_time(UNIX_EPOCH - Duration::from_millis(1500))
                .unwrap()
                .unix_timestamp(),
            -2
        );
        assert_eq!(
            system_time(-5).unwrap(),
            UNIX_EPOCH - Duration::from_secs(5)
        );
    }

    #[test]
    fn garbage_certificates_never_panic() {
        for bytes in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x00", &[0xff; 64]] {
            assert!(cert_spiffe_id(bytes).is_err());
            assert!(cert_public_key(bytes).is_err());
            assert!(cert_validity(bytes).is_err());
            assert!(csr_public_key(bytes).is_err());
        }
    }
}
