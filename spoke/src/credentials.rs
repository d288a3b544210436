//! The spoke's credentials in force, published through a `watch`.
//!
//! What it is: the one owner of the node SVID, the node CA, the trust
//! bundle with the revocation list, and the workload SVIDs the node CA
//! issues. Workload SVIDs are issued here, online and offline through the
//! same code path ([`Credentials::issue_due`]), by the node CA the hub
//! issued at enrollment and renews at half life while connected; every
//! issuance is written to the disk cache ([`CredStore`]) and published as a
//! new [`Svids`] snapshot.
//!
//! Who drives it: the control session installs what the hub sends (node
//! SVID renewals, node CAs, revocation lists); the spoke's issuing loop
//! calls [`Credentials::issue_due`] when the next SVID is due; the data
//! plane only reads snapshots ([`Credentials::subscribe`]) and the
//! revocation handle. What it must not do: talk to the network, accept a
//! revocation list that does not verify against the bundle or is older than
//! the one in force, or issue a workload ID outside its store (the node CA
//! refuses, and so does every verifier).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::pki_types::CertificateDer;
use tidemesh_identity::{
    clock::Clock,
    naming,
    revocation::RevocationError,
    svid::{self, KeyPair, NodeCa},
    verify::TrustBundle,
    Revocations, SignedRevocationList, SpiffeId,
};
use tidemesh_proto::IssuePolicy;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::creds::{CredStore, CredsError, Svid};

/// How far back issued workload SVIDs start: the trusted-time uncertainty
/// bound, so a peer whose clock is that far behind still accepts them.
pub const BACKDATE: Duration = Duration::from_secs(300);
/// Workload SVID lifetime before the hub said otherwise.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(3600);

/// What is known of the node CA in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCaFacts {
    /// Start of its validity.
    pub not_before: SystemTime,
    /// End of its validity.
    pub not_after: SystemTime,
    /// SHA-256 of its public key.
    pub key_fingerprint: [u8; 32],
}

/// One snapshot of the credentials in force.
#[derive(Debug)]
pub struct Svids {
    /// The node SVID the hub issued (the control session's identity).
    pub node: Arc<Svid>,
    /// The data tunnel's serving SVID: the node ID again, issued by the
    /// node CA, so it is renewed offline too (`None`: none yet; the tunnel
    /// then presents the node SVID).
    pub serving: Option<Arc<Svid>>,
    /// Each configured workload's SVID, in config order (`None`: none yet).
    pub workloads: Vec<Option<Arc<Svid>>>,
    /// The trust bundle, with the revocation list in force.
    pub bundle: TrustBundle,
    /// The node CA in force, if any.
    pub node_ca: Option<NodeCaFacts>,
}

/// The credentials owner (see the module docs).
#[derive(Debug)]
pub struct Credentials {
    id: SpiffeId,
    store: CredStore,
    clock: Arc<dyn Clock>,
    accounts: Vec<String>,
    renew_fraction: f64,
    revocations: Revocations,
    tx: watch::Sender<Arc<Svids>>,
    /// The revocation list version in force, for whoever closes connections.
    revoked_tx: watch::Sender<u64>,
    node_ca: Mutex<Option<Arc<NodeCa>>>,
    policy: Mutex<Option<IssuePolicy>>,
    last_error: Mutex<Option<String>>,
}

fn facts(ca: &NodeCa) -> NodeCaFacts {
    let (not_before, not_after) = ca.validity();
    NodeCaFacts {
        not_before,
        not_after,
        key_fingerprint: ca.key_fingerprint(),
    }
}

impl Credentials {
    /// Loads everything from the disk cache; the workloads are the
    /// configured service accounts, in config order.
    pub fn open(
        store: CredStore,
        id: SpiffeId,
        accounts: Vec<String>,
        clock: Arc<dyn Clock>,
        renew_fraction: f64,
    ) -> Result<Credentials, CredsError> {
        let node = Arc::new(store.node()?);
        let bundle = store.bundle(id.trust_domain())?;
        let revocations = Revocations::default();
        if let Some(signed) = store.revocations() {
            match signed.verify(bundle.roots()) {
                Ok(list) => {
                    revocations.install(list);
                }
                Err(e) => warn!(error = %e, "ignoring the stored revocation list"),
            }
        }
        let node_ca = match store.node_ca() {
            Ok(ca) => ca.map(Arc::new),
            Err(e) => {
                warn!(error = %e, "the stored node CA is unusable; a new one will be requested from the hub");
                None
            }
        };
        let workloads = accounts
            .iter()
            .map(|a| store.workload(a).ok().flatten().map(Arc::new))
            .collect();
        let serving = store.serving().ok().flatten().map(Arc::new);
        let snapshot = Svids {
            node,
            serving,
            workloads,
            bundle: bundle.with_revocations(revocations.clone()),
            node_ca: node_ca.as_deref().map(facts),
        };
        Ok(Credentials {
            policy: Mutex::new(store.policy()),
            id,
            store,
            clock,
            accounts,
            renew_fraction,
            revoked_tx: watch::channel(revocations.version()).0,
            revocations,
            tx: watch::channel(Arc::new(snapshot)).0,
            node_ca: Mutex::new(node_ca),
            last_error: Mutex::new(None),
        })
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Svids> {
        self.tx.borrow().clone()
    }

    /// A receiver of every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Svids>> {
        self.tx.subscribe()
    }

    /// The revocation handle every verifier of this spoke reads.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// A receiver of the revocation list version in force.
    pub fn revocations_changed(&self) -> watch::Receiver<u64> {
        self.revoked_tx.subscribe()
    }

    /// The issuance policy the hub set, if known.
    pub fn policy(&self) -> Option<IssuePolicy> {
        self.policy.lock().ok().and_then(|p| *p)
    }

    /// Why the last issuance failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The configured service accounts, in config order.
    pub fn accounts(&self) -> &[String] {
        &self.accounts
    }

    fn publish(&self, f: impl FnOnce(&mut Svids)) {
        self.tx.send_modify(|cur| {
            let mut next = Svids {
                node: cur.node.clone(),
                serving: cur.serving.clone(),
                workloads: cur.workloads.clone(),
                bundle: cur.bundle.clone(),
                node_ca: cur.node_ca,
            };
            f(&mut next);
            *cur = Arc::new(next);
        });
    }

    /// Installs a node SVID chain the hub issued for the pinned key (and a
    /// newer bundle, if it sent one).
    pub fn install_node(
        &self,
        chain: Vec<CertificateDer<'static>>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Svid>, CredsError> {
        let key = self.store.node()?.key;
        let s = Svid::new(key, chain).map_err(|e| CredsError::Corrupt {
            path: self.store.dir().join("node.pem"),
            reason: e.to_string(),
        })?;
        if s.id != self.id {
            return Err(CredsError::Corrupt {
                path: self.store.dir().join("node.pem"),
                reason: format!("hub issued {} instead of {}", s.id, self.id),
            });
        }
        if !bundle.is_empty() {
            self.store.save_bundle(&bundle)?;
        }
        self.store.save_node_chain(&s.chain)?;
        let s = Arc::new(s);
        let td = self.id.trust_domain().clone();
        let new_bundle = (!bundle.is_empty())
            .then(|| TrustBundle::new(td, bundle).with_revocations(self.revocations.clone()));
        self.publish(|n| {
            n.node = s.clone();
            if let Some(b) = new_bundle {
                n.bundle = b;
            }
        });
        Ok(s)
    }

    /// Whether a node CA should be requested now: none, expired, or past
    /// half its life.
    pub fn node_ca_due(&self) -> bool {
        let now = self.clock.now();
        match self.current().node_ca {
            None => true,
            Some(f) => {
                let life = f.not_after.duration_since(f.not_before).unwrap_or_default();
                now >= f.not_before + life / 2
            }
        }
    }

    /// A new key for a node CA request.
    pub fn new_ca_key() -> Result<KeyPair, svid::IssueError> {
        svid::generate_key()
    }

    /// Installs a node CA the hub issued for `key`, and the policy it came
    /// with.
    pub fn install_node_ca(
        &self,
        cert: CertificateDer<'static>,
        key: KeyPair,
        policy: IssuePolicy,
    ) -> Result<NodeCaFacts, CredsError> {
        let bad = |e: svid::IssueError| CredsError::Corrupt {
            path: self.store.dir().join("node_ca.pem"),
            reason: e.to_string(),
        };
        let key_pem = key.serialize_pem();
        let ca = NodeCa::new(cert.clone(), key).map_err(bad)?;
        if ca.node() != &self.id {
            return Err(bad(svid::IssueError::NotANodeCa(format!(
                "issued for {} instead of {}",
                ca.node(),
                self.id
            ))));
        }
        let key = svid::key_from_pem(&key_pem).map_err(bad)?;
        self.store.save_node_ca(&cert, &key)?;
        self.store.save_policy(&policy)?;
        let f = facts(&ca);
        if let Ok(mut p) = self.policy.lock() {
            *p = Some(policy);
        }
        if let Ok(mut c) = self.node_ca.lock() {
            *c = Some(Arc::new(ca));
        }
        self.publish(|n| n.node_ca = Some(f));
        info!(target: "tidemesh::audit", spoke = %self.id, not_after = %humantime::format_rfc3339_seconds(f.not_after), "node CA installed");
        Ok(f)
    }

    /// Verifies a signed revocation list against the bundle and installs it
    /// if it is newer than the one in force (persisting it). Returns
    /// whether it was installed.
    pub fn install_revocations(
        &self,
        signed: &SignedRevocationList,
    ) -> Result<bool, RevocationError> {
        let list = signed.verify(self.current().bundle.roots())?;
        let version = list.version;
        if !self.revocations.install(list) {
            return Ok(false);
        }
        if let Err(e) = self.store.save_revocations(signed) {
            warn!(error = %e, "cannot persist the revocation list");
        }
        self.revoked_tx.send_replace(version);
        info!(target: "tidemesh::audit", version, "revocation list installed");
        Ok(true)
    }

    /// When an SVID this node CA issued with lifetime `ttl` falls due: at
    /// the renew fraction of its life counted from its issuance, not from
    /// its backdated not_before.
    fn due(&self, s: &Svid, ttl: Duration) -> SystemTime {
        let start = s
            .not_before
            .max(s.not_after.checked_sub(ttl).unwrap_or(s.not_before));
        let life = s.not_after.duration_since(start).unwrap_or_default();
        start + life.mul_f64(self.renew_fraction.clamp(0.05, 0.95))
    }

    fn needs_issue(
        &self,
        cur: Option<&Svid>,
        ca: &NodeCaFacts,
        now: SystemTime,
        ttl: Duration,
    ) -> bool {
        match cur {
            None => true,
            // Issued by the hub directly (an older enrollment), or by a node
            // CA other than the one in force and close to its expiry:
            // peers only accept SVIDs from a node CA in force.
            Some(s) if s.chain.len() < 2 => true,
            Some(s) => {
                s.expired(now)
                    || self.due(s, ttl) <= now
                    || (s
                        .chain
                        .get(1)
                        .and_then(|c| svid::cert_key_fingerprint(c).ok())
                        != Some(ca.key_fingerprint)
                        && s.not_after > ca.not_after)
            }
        }
    }

    /// Issues, from the node CA, every workload SVID that is missing or due
    /// for renewal (blocking: writes the cache). Returns the SVIDs issued
    /// and when the next one falls due (`None`: nothing can be issued: no
    /// node CA, or it expired).
    pub fn issue_due(&self) -> (Vec<Arc<Svid>>, Option<SystemTime>) {
        let now = self.clock.now();
        let ca = self.node_ca.lock().ok().and_then(|c| c.clone());
        let Some(ca) = ca else {
            self.set_error(Some(
                "no node CA yet: the spoke gets one from the hub at its next session".into(),
            ));
            return (Vec::new(), None);
        };
        let f = facts(&ca);
        if now >= f.not_after {
            self.set_error(Some(format!(
                "the node CA expired at {}: no workload certificate can be issued until the hub is reached again (past the max-offline window a new join token is needed)",
                humantime::format_rfc3339_seconds(f.not_after)
            )));
            return (Vec::new(), None);
        }
        let ttl = self
            .policy()
            .map(|p| Duration::from_millis(p.workload_ttl_ms))
            .unwrap_or(DEFAULT_WORKLOAD_TTL);
        let store_name = match naming::classify(&self.id) {
            Some(naming::MeshIdentity::Node { store, .. }) => store,
            _ => return (Vec::new(), None),
        };
        let cur = self.current();
        let mut issued = Vec::new();
        let mut next: Option<SystemTime> = Some(f.not_after);
        let mut error = None;
        for (i, account) in self.accounts.iter().enumerate() {
            let existing = cur.workloads.get(i).cloned().flatten();
            if !self.needs_issue(existing.as_deref(), &f, now, ttl) {
                if let Some(s) = existing {
                    let due = self.due(&s, ttl);
                    next = next.map(|n| n.min(due));
                }
                continue;
            }
            match self.issue_one(&ca, &store_name, account, now, ttl) {
                Ok(s) => {
                    let due = self.due(&s, ttl);
                    next = next.map(|n| n.min(due));
                    self.publish(|n| {
                        if let Some(slot) = n.workloads.get_mut(i) {
                            *slot = Some(s.clone());
                        }
                    });
                    issued.push(s);
                }
                Err(e) => {
                    warn!(account = %account, error = %e, "cannot issue a workload SVID");
                    error = Some(format!("workload {account}: {e}"));
                    next = next.map(|n| n.min(now + Duration::from_secs(5)));
                }
            }
        }
        let serving = cur.serving.clone();
        if self.needs_issue(serving.as_deref(), &f, now, ttl) {
            match self.issue_serving(&ca, now, ttl) {
                Ok(s) => {
                    let due = self.due(&s, ttl);
                    next = next.map(|n| n.min(due));
                    self.publish(|n| n.serving = Some(s.clone()));
                    issued.push(s);
                }
                Err(e) => {
                    warn!(error = %e, "cannot issue the data-tunnel serving SVID");
                    error = Some(format!("serving SVID: {e}"));
                    next = next.map(|n| n.min(now + Duration::from_secs(5)));
                }
            }
        } else if let Some(s) = serving {
            next = next.map(|n| n.min(self.due(&s, ttl)));
        }
        self.set_error(error);
        (issued, next)
    }

    fn issue_serving(
        &self,
        ca: &NodeCa,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Arc<Svid>, String> {
        let key = self.store.node().map_err(|e| e.to_string())?.key;
        let chain = ca
            .issue_serving(&key, now - BACKDATE, now + ttl)
            .map_err(|e| e.to_string())?;
        self.store
            .save_serving_chain(&chain)
            .map_err(|e| e.to_string())?;
        let s = Svid::new(key, chain).map_err(|e| e.to_string())?;
        info!(target: "tidemesh::audit", node = %self.id, not_after = %humantime::format_rfc3339_seconds(s.not_after), "serving SVID issued by the node CA");
        Ok(Arc::new(s))
    }

    fn issue_one(
        &self,
        ca: &NodeCa,
        store_name: &str,
        account: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Arc<Svid>, String> {
        let id = naming::workload_id(self.id.trust_domain(), store_name, account)
            .map_err(|e| e.to_string())?;
        let key = self
            .store
            .workload_key(account)
            .map_err(|e| e.to_string())?;
        let chain = ca
            .issue_workload(&key, &id, now - BACKDATE, now + ttl)
            .map_err(|e| e.to_string())?;
        self.store
            .save_workload_chain(account, &chain)
            .map_err(|e| e.to_string())?;
        let s = Svid::new(key, chain).map_err(|e| e.to_string())?;
        info!(target: "tidemesh::audit", workload = %id, not_after = %humantime::format_rfc3339_seconds(s.not_after), "workload SVID issued by the node CA");
        Ok(Arc::new(s))
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = e;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::creds::Identity;
    use tidemesh_identity::{clock::FixedClock, TrustDomain};

    const TTL: Duration = Duration::from_secs(20);

    /// An enrolled cache with a node CA valid for a day, at `now`.
    fn enrolled(dir: &std::path::Path, now: SystemTime) -> (svid::Ca, SpiffeId) {
        let td = TrustDomain::new("edge.example").unwrap();
        let ca = svid::Ca::generate(
            &td,
            now - Duration::from_secs(60),
            now + Duration::from_secs(86_400 * 30),
        )
        .unwrap();
        let id: SpiffeId = "spiffe://edge.example/store/sf01/node/a".parse().unwrap();
        let key = svid::generate_key().unwrap();
        let leaf = ca
            .sign_csr(
                &svid::make_csr(&key, &id).unwrap(),
                &id,
                now,
                now + Duration::from_secs(3600),
            )
            .unwrap();
        let store = CredStore::new(dir);
        store
            .save_enrollment(
                &Identity {
                    id: id.clone(),
                    hub: "127.0.0.1:1".into(),
                    enrolled_at: String::new(),
                },
                &key,
                &[leaf],
                &[ca.cert_der()],
            )
            .unwrap();
        let ca_key = svid::generate_key().unwrap();
        let ca_cert = ca
            .issue_node_ca(
                &svid::make_csr(&ca_key, &id).unwrap(),
                &id,
                now - Duration::from_secs(60),
                now + Duration::from_secs(86_400),
            )
            .unwrap();
        store.save_node_ca(&ca_cert, &ca_key).unwrap();
        store
            .save_policy(&IssuePolicy {
                workload_ttl_ms: TTL.as_millis() as u64,
                max_offline_ms: 86_400_000,
            })
            .unwrap();
        (ca, id)
    }

    fn open(dir: &std::path::Path, id: &SpiffeId, now: SystemTime) -> Credentials {
        Credentials::open(
            CredStore::new(dir),
            id.clone(),
            vec!["pos".into(), "inventory".into()],
            Arc::new(FixedClock(now)),
            0.5,
        )
        .unwrap()
    }

    #[test]
    fn issues_each_svid_once_and_again_at_half_its_life() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let (_, id) = enrolled(tmp.path(), now);
        let c = open(tmp.path(), &id, now);
        let (issued, next) = c.issue_due();
        // two workloads and the serving SVID
        assert_eq!(issued.len(), 3);
        let next = next.unwrap();
        // (certificate times are whole seconds)
        let half = next.duration_since(now).unwrap().as_secs();
        assert!((9..=10).contains(&half), "{half}");
        // nothing more is due now, however often it is asked
        let (again, next2) = c.issue_due();
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(next2, Some(next));
        let cur = c.current();
        assert_eq!(
            cur.workloads[0].as_ref().unwrap().id.to_string(),
            "spiffe://edge.example/store/sf01/sa/pos"
        );
        assert_eq!(cur.serving.as_ref().unwrap().id, id);
        // past half life they are issued again, and kept on disk
        let later = open(tmp.path(), &id, next + Duration::from_secs(1));
        let (renewed, _) = later.issue_due();
        assert_eq!(renewed.len(), 3);
    }

    #[test]
    fn an_expired_node_ca_issues_nothing_and_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let (_, id) = enrolled(tmp.path(), now);
        let c = open(tmp.path(), &id, now + Duration::from_secs(2 * 86_400));
        let (issued, next) = c.issue_due();
        assert!(issued.is_empty());
        assert_eq!(next, None);
        assert!(
            c.last_error().unwrap().contains("node CA expired"),
            "{:?}",
            c.last_error()
        );
    }
}
