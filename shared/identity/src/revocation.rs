//! Revocation lists: which spokes (node IDs) and which keys (node keys and
//! node CA keys) no verifier may accept any more.
//!
//! What it is: the list itself ([`RevocationList`]), its signed wire and
//! disk form ([`SignedRevocationList`], signed by the hub's CA key with
//! [`crate::svid::Ca::sign_message`] under the context [`CONTEXT`]), and
//! [`Revocations`], the shared handle every verifier of a process reads on
//! each handshake (`verify::verify_svid` refuses a chain whose leaf or node
//! CA is named by it).
//!
//! Who drives it: the hub builds and signs a new version on every
//! revocation or re-enrollment and sends it to spokes (in every config
//! slice and as a push on the control session); spokes verify it against
//! the trust bundle, keep the newest version ([`Revocations::install`]
//! never goes back) and persist it. What it must not do: any I/O, or accept
//! a list it cannot verify or an older version than the one it holds.
//!
//! # What a list names
//! * `nodes`: node IDs revoked now. A chain is refused when its leaf is such
//!   a node's SVID or when its node CA is named by such a node ID.
//! * `keys`: SHA-256 of public keys (node keys and every node CA key the hub
//!   issued a revoked spoke), with the time until which they matter (the
//!   certificate's expiry: afterwards the chain fails on its dates anyway, so
//!   the hub drops the entry). Keys stay listed after the node ID is enrolled
//!   again with a new key, so re-enrolling never revives the old node CA.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;
use crate::svid::{self, IssueError};

/// Signature context of revocation lists.
pub const CONTEXT: &str = "revocation-list/v1";
/// Most entries (nodes plus keys) a list may carry: bounds decoding.
pub const MAX_ENTRIES: usize = 100_000;

/// A revoked key: SHA-256 of the public key and when its last certificate
/// expires (ms since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RevokedKey {
    /// SHA-256 of the uncompressed P-256 point.
    pub fingerprint: [u8; 32],
    /// Expiry of the last certificate for this key the hub issued.
    pub until_ms: u64,
}

/// One version of the trust domain's revocation list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// Increases with every change; 0 is the empty list nobody signed.
    pub version: u64,
    /// When the hub made it (ms since the Unix epoch).
    pub issued_ms: u64,
    /// Node IDs revoked now.
    pub nodes: BTreeSet<SpiffeId>,
    /// Revoked keys.
    pub keys: BTreeSet<RevokedKey>,
}

impl RevocationList {
    /// Whether `node` is revoked.
    pub fn node_revoked(&self, node: &SpiffeId) -> bool {
        self.nodes.contains(node)
    }

    /// Whether the key with this fingerprint is revoked.
    pub fn key_revoked(&self, fingerprint: &[u8; 32]) -> bool {
        // Few entries per revoked spoke; a range scan keeps this O(log n).
        let from = RevokedKey {
            fingerprint: *fingerprint,
            until_ms: 0,
        };
        self.keys
            .range(from..)
            .next()
            .is_some_and(|k| &k.fingerprint == fingerprint)
    }

    /// Signs this list with the hub's CA.
    pub fn sign(&self, ca: &svid::Ca) -> Result<SignedRevocationList, IssueError> {
        let body = postcard::to_allocvec(self).map_err(|e| IssueError::Signing(e.to_string()))?;
        let signature = ca.sign_message(CONTEXT, &body)?;
        Ok(SignedRevocationList { body, signature })
    }
}

/// A list as the hub signed it: the postcard body and the CA's signature
/// over it. This is what travels and what spokes store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocationList {
    /// postcard of [`RevocationList`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// ECDSA P-256 signature by the CA key over the body (see [`CONTEXT`]).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a signed list was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// The signature does not verify against any root of the bundle.
    #[error("revocation list signature does not verify against the trust bundle: refusing it")]
    BadSignature,
    /// The body does not decode.
    #[error("revocation list does not decode: {0}")]
    Malformed(String),
    /// The list names more entries than [`MAX_ENTRIES`].
    #[error("revocation list names {0} entries, more than the {MAX_ENTRIES} allowed")]
    TooLarge(usize),
}

impl SignedRevocationList {
    /// Checks the signature against `roots` (the trust bundle's CA
    /// certificates) and decodes the list.
    pub fn verify(
        &self,
        roots: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<RevocationList, RevocationError> {
        let signed = roots
            .iter()
            .any(|r| svid::verify_signed_message(r, CONTEXT, &self.body, &self.signature).is_ok());
        if !signed {
            return Err(RevocationError::BadSignature);
        }
        let list: RevocationList = postcard::from_bytes(&self.body)
            .map_err(|e| RevocationError::Malformed(e.to_string()))?;
        let n = list.nodes.len() + list.keys.len();
        if n > MAX_ENTRIES {
            return Err(RevocationError::TooLarge(n));
        }
        Ok(list)
    }

    /// The encoding stored on disk and sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of two byte strings always encodes.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes [`SignedRevocationList::encode`]'s output (not verified).
    pub fn decode(bytes: &[u8]) -> Result<SignedRevocationList, RevocationError> {
        postcard::from_bytes(bytes).map_err(|e| RevocationError::Malformed(e.to_string()))
    }
}

/// The revocation list in force in one process, shared by every verifier
/// (cheap to clone). Readers take a snapshot per handshake; the one writer
/// (the hub's revoke path, the spoke's control session) installs newer
/// versions.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    inner: Arc<RwLock<Arc<RevocationList>>>,
}

impl Revocations {
    /// A handle holding `list`.
    pub fn new(list: RevocationList) -> Revocations {
        Revocations {
            inner: Arc::new(RwLock::new(Arc::new(list))),
        }
    }

    /// The list in force. A poisoned lock yields `None`: callers fail closed.
    pub fn current(&self) -> Option<Arc<RevocationList>> {
        self.inner.read().ok().map(|l| l.clone())
    }

    /// The version in force (0 before any list).
    pub fn version(&self) -> u64 {
        self.current().map_or(0, |l| l.version)
    }

    /// Installs `list` if it is newer than the one in force; returns
    /// whether it did. Never goes back to an older version.
    pub fn install(&self, list: RevocationList) -> bool {
        match self.inner.write() {
            Ok(mut cur) if list.version > cur.version => {
                *cur = Arc::new(list);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::spiffe::TrustDomain;
    use std::time::{Duration, SystemTime};

    fn ca() -> svid::Ca {
        let now = SystemTime::now();
        svid::Ca::generate(
            &TrustDomain::new("edge.example").unwrap(),
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap()
    }

    fn list(version: u64) -> RevocationList {
        RevocationList {
            version,
            issued_ms: 1,
            nodes: ["spiffe://edge.example/store/sf01/node/a".parse().unwrap()].into(),
            keys: [RevokedKey {
                fingerprint: [7; 32],
                until_ms: 99,
            }]
            .into(),
        }
    }

    #[test]
    fn signed_list_verifies_and_names_its_entries() {
        let ca = ca();
        let signed = list(3).sign(&ca).unwrap();
        let back = SignedRevocationList::decode(&signed.encode()).unwrap();
        let l = back.verify(&[ca.cert_der()]).unwrap();
        assert_eq!(l, list(3));
        assert!(l.node_revoked(&"spiffe://edge.example/store/sf01/node/a".parse().unwrap()));
        assert!(!l.node_revoked(&"spiffe://edge.example/store/sf01/node/b".parse().unwrap()));
        assert!(l.key_revoked(&[7; 32]));
        assert!(!l.key_revoked(&[8; 32]));
        assert!(!l.key_revoked(&[6; 32]));
    }

    #[test]
    fn a_list_signed_by_another_ca_or_altered_is_refused() {
        let ca = ca();
        let other = self::ca();
        let signed = list(3).sign(&other).unwrap();
        assert_eq!(
            signed.verify(&[ca.cert_der()]),
            Err(RevocationError::BadSignature)
        );
        let mut altered = list(3).sign(&ca).unwrap();
        let last = altered.body.len() - 1;
        altered.body[last] ^= 1;
        assert_eq!(
            altered.verify(&[ca.cert_der()]),
            Err(RevocationError::BadSignature)
        );
        // A signature over the same bytes in another context does not count.
        let sig = ca.sign_message("time-anchor/v1", &signed.body).unwrap();
        let swapped = SignedRevocationList {
            body: list(3).sign(&ca).unwrap().body,
            signature: sig,
        };
        assert_eq!(
            swapped.verify(&[ca.cert_der()]),
            Err(RevocationError::BadSignature)
        );
    }

    #[test]
    fn install_only_moves_forward() {
        let r = Revocations::default();
        assert_eq!(r.version(), 0);
        assert!(r.install(list(2)));
        assert!(!r.install(list(1)));
        assert!(!r.install(list(2)));
        assert_eq!(r.version(), 2);
        assert!(r.install(list(5)));
        assert_eq!(r.version(), 5);
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = SignedRevocationList::decode(&bytes).map(|s| s.verify(&[]));
        }
    }
}
