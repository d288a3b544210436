//! tidemesh's SPIFFE ID scheme: who is who inside one trust domain.
//!
//! What it is: the single place that knows how the hub, a spoke node and a
//! workload are spelled as SPIFFE IDs, and how to read those back:
//!
//! | who | ID |
//! | --- | --- |
//! | the hub | `spiffe://TD/hub` |
//! | a spoke node | `spiffe://TD/store/STORE/node/NODE` |
//! | a workload at a store | `spiffe://TD/store/STORE/sa/ACCOUNT` |
//!
//! Who drives it: the hub when it decides which IDs a spoke may get signed
//! (a spoke only gets workload IDs under its own store path), policies and
//! evidence when they label peers. What it must not do: decide trust.
//! [`classify`] reads the path only; whether the ID is in the right trust
//! domain and backed by a valid chain is the verifier's job (`verify`).

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Path segment naming the hub.
pub const HUB: &str = "hub";
/// Path segment introducing a store.
pub const STORE: &str = "store";
/// Path segment introducing a spoke node under a store.
pub const NODE: &str = "node";
/// Path segment introducing a workload (service account) under a store.
pub const SERVICE_ACCOUNT: &str = "sa";

/// What a tidemesh SPIFFE ID denotes, read from its path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MeshIdentity {
    /// `/hub`
    Hub,
    /// `/store/STORE/node/NODE`
    Node {
        /// The store (site) the spoke belongs to.
        store: String,
        /// The spoke's node name within the store.
        node: String,
    },
    /// `/store/STORE/sa/ACCOUNT`
    Workload {
        /// The store (site) the workload runs at.
        store: String,
        /// The workload's service account.
        account: String,
    },
}

impl MeshIdentity {
    /// The store this identity belongs to (`None` for the hub).
    pub fn store(&self) -> Option<&str> {
        match self {
            MeshIdentity::Hub => None,
            MeshIdentity::Node { store, .. } | MeshIdentity::Workload { store, .. } => Some(store),
        }
    }
}

/// `spiffe://TD/hub`.
pub fn hub_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::with_const_path(td, "/hub")
}

/// `spiffe://TD/store/STORE/node/NODE`; `store` and `node` must each be one valid segment.
pub fn node_id(td: &TrustDomain, store: &str, node: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::from_segments(td, &[STORE, store, NODE, node])
}

/// `spiffe://TD/store/STORE/sa/ACCOUNT`; `store` and `account` must each be one valid segment.
pub fn workload_id(
    td: &TrustDomain,
    store: &str,
    account: &str,
) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::from_segments(td, &[STORE, store, SERVICE_ACCOUNT, account])
}

/// Reads what `id` denotes under tidemesh's scheme; `None` for any other path.
///
/// Looks at the path only, not at the trust domain.
pub fn classify(id: &SpiffeId) -> Option<MeshIdentity> {
    match id.segments().as_slice() {
        [HUB] => Some(MeshIdentity::Hub),
        [STORE, store, NODE, node] => Some(MeshIdentity::Node {
            store: (*store).to_owned(),
            node: (*node).to_owned(),
        }),
        [STORE, store, SERVICE_ACCOUNT, account] => Some(MeshIdentity::Workload {
            store: (*store).to_owned(),
            account: (*account).to_owned(),
        }),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("corp.example").unwrap()
    }

    #[test]
    fn ids_are_spelled_as_documented() {
        assert_eq!(hub_id(&td()).to_string(), "spiffe://corp.example/hub");
        assert_eq!(
            hub_id(&td()),
            SpiffeId::from_segments(&td(), &[HUB]).unwrap()
        );
        assert_eq!(
            node_id(&td(), "sf01", "n1").unwrap().to_string(),
            "spiffe://corp.example/store/sf01/node/n1"
        );
        assert_eq!(
            workload_id(&td(), "sf01", "pos").unwrap().to_string(),
            "spiffe://corp.example/store/sf01/sa/pos"
        );
    }

    #[test]
    fn classify_roundtrips() {
        assert_eq!(classify(&hub_id(&td())), Some(MeshIdentity::Hub));
        let n = classify(&node_id(&td(), "sf01", "n1").unwrap()).unwrap();
        assert_eq!(
            n,
            MeshIdentity::Node {
                store: "sf01".into(),
                node: "n1".into()
            }
        );
        assert_eq!(n.store(), Some("sf01"));
        assert_eq!(
            classify(&workload_id(&td(), "sf01", "pos").unwrap()),
            Some(MeshIdentity::Workload {
                store: "sf01".into(),
                account: "pos".into()
            })
        );
    }

    #[test]
    fn classify_rejects_other_paths() {
        for s in [
            "spiffe://corp.example",
            "spiffe://corp.example/hub/x",
            "spiffe://corp.example/store/sf01",
            "spiffe://corp.example/store/sf01/node",
            "spiffe://corp.example/store/sf01/pod/x",
            "spiffe://corp.example/store/sf01/node/n1/extra",
            "spiffe://corp.example/Hub",
        ] {
            assert_eq!(classify(&SpiffeId::parse(s).unwrap()), None, "{s}");
        }
    }

    #[test]
    fn segments_cannot_smuggle_paths() {
        assert!(node_id(&td(), "sf01/node/x", "n1").is_err());
        assert!(workload_id(&td(), "sf01", "../hub").is_err());
        assert!(workload_id(&td(), "", "pos").is_err());
        assert!(node_id(&td(), "sf01", "..").is_err());
    }
}
