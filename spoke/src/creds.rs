//! The spoke's credential cache on disk, so it serves through partitions and
//! reboots without the hub.
//!
//! # Data directory
//! | file                          | what |
//! |-------------------------------|------|
//! | `spoke.json`                  | ID, hub address, trust domain, enrollment time |
//! | `node_key.pem`                | node private key, PKCS#8, mode 0600; generated here, never sent |
//! | `node.pem`                    | node SVID chain, leaf first |
//! | `node_ca_key.pem`             | node CA private key, PKCS#8, mode 0600; generated here, never sent |
//! | `node_ca.pem`                 | node CA certificate (issued by the hub, pathLen 0) |
//! | `issue_policy.json`           | workload SVID lifetime and max-offline window, as the hub set them |
//! | `bundle.pem`                  | trust bundle (the hub CA) |
//! | `revocations.bin`             | the newest signed revocation list received (postcard) |
//! | `time.json`                   | trusted-time floor and last hub time anchor |
//! | `serving.pem`                 | data-tunnel serving SVID (the node ID, node key, issued here by the node CA) |
//! | `workloads/ACCOUNT/key.pem`   | workload key, mode 0600 |
//! | `workloads/ACCOUNT/svid.pem`  | workload SVID chain (leaf, node CA), issued here by the node CA |
//! | `state.json`                  | last successful contact with the hub |
//! | `admin.sock`                  | the admin socket while `run` is up, mode 0600 |
//!
//! Every file is replaced atomically (write to a temporary file with a
//! unique name, fsync, rename, fsync the directory), so a power cut leaves
//! the old or the new version, never a torn one, and two writers of the
//! same file never share a temporary file. Modes are enforced at every
//! open, not only at creation: the directory is tightened to 0700 and key
//! files to 0600 whenever they are read (a restored backup or a `cp` must
//! not leave a key readable), with a line on the `tidemesh::audit` target.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tidemesh_identity::{
    svid::{self, KeyPair, NodeCa},
    trusted_time::TimeFloor,
    verify::TrustBundle,
    SignedRevocationList, SpiffeId, TrustDomain,
};
use tidemesh_proto::IssuePolicy;

/// Errors reading or writing the cache.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// The spoke was never enrolled in this directory.
    #[error("{0} holds no enrolled spoke: run `tidemesh-spoke enroll` first")]
    NotEnrolled(PathBuf),
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredsError + '_ {
    move |source| CredsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl ToString) -> CredsError {
    CredsError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Tightens `path`'s permission bits to at most `mode` (it never widens
/// them), logging when it had to.
pub fn enforce_mode(path: &Path, mode: u32) -> Result<(), CredsError> {
    let cur = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o7777;
    if cur & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(cur & mode)).map_err(io(path))?;
        tracing::warn!(
            target: "tidemesh::audit",
            path = %path.display(),
            was = format!("{cur:o}"),
            now = format!("{:o}", cur & mode),
            "file mode too open: tightened"
        );
    }
    Ok(())
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> Result<(), CredsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(io(tmp))?;
    f.write_all(bytes).map_err(io(tmp))?;
    f.sync_all().map_err(io(tmp))?;
    fs::rename(tmp, path).map_err(io(path))
}

/// Makes temporary names unique within the process (with the pid, across
/// processes).
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically with the given mode: a uniquely
/// named temporary file in the same directory, fsync'd, renamed over
/// `path`, then the directory fsync'd so the rename is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CredsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write_then_rename(&tmp, path, bytes, mode);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// `spoke.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// The node ID.
    pub id: SpiffeId,
    /// The hub address used at enrollment.
    pub hub: String,
    /// When it enrolled (RFC 3339).
    pub enrolled_at: String,
}

/// `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContactState {
    /// Last successful contact, ms since the Unix epoch.
    pub last_contact_ms: Option<u64>,
}

/// A key and the chain issued to it.
pub struct Svid {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: KeyPair,
    /// The ID in the leaf.
    pub id: SpiffeId,
    /// Validity of the leaf.
    pub not_before: SystemTime,
    /// Validity of the leaf.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Builds from a key and a DER chain, reading the leaf's ID and validity.
    pub fn new(
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Svid, svid::IssueError> {
        let leaf = chain.first().ok_or(svid::IssueError::NoPemCertificates)?;
        let id = svid::cert_spiffe_id(leaf)?;
        let (not_before, not_after) = svid::cert_validity(leaf)?;
        Ok(Svid {
            chain,
            key,
            id,
            not_before,
            not_after,
        })
    }

    /// Whether it has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// When to renew: `fraction` of the way through its lifetime.
    pub fn renew_at(&self, fraction: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(fraction.clamp(0.05, 0.95))
    }
}

/// The credential directory.
#[derive(Debug, Clone)]
pub struct CredStore {
    dir: PathBuf,
}

impl CredStore {
    /// The cache in `dir`.
    pub fn new(dir: &Path) -> CredStore {
        CredStore {
            dir: dir.to_owned(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether an enrollment is stored.
    pub fn is_enrolled(&self) -> bool {
        self.p("spoke.json").exists()
    }

    /// Reads `spoke.json`.
    pub fn identity(&self) -> Result<Identity, CredsError> {
        let path = self.p("spoke.json");
        if !path.exists() {
            return Err(CredsError::NotEnrolled(self.dir.clone()));
        }
        enforce_mode(&self.dir, 0o700)?;
        let b = fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&b).map_err(|e| corrupt(&path, e))
    }

    /// Writes a complete enrollment: key first, then chain and bundle, then
    /// `spoke.json` last, so a crash midway leaves "not enrolled".
    pub fn save_enrollment(
        &self,
        ident: &Identity,
        key: &KeyPair,
        chain: &[CertificateDer<'_>],
        bundle: &[CertificateDer<'_>],
    ) -> Result<(), CredsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let _ = fs::remove_file(self.p("spoke.json"));
        write_atomic(
            &self.p("node_key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.p("node.pem"),
            svid::certs_to_pem(chain).as_bytes(),
            0o644,
        )?;
        write_atomic(
            &self.p("bundle.pem"),
            svid::certs_to_pem(bundle).as_bytes(),
            0o644,
        )?;
        let _ = fs::remove_dir_all(self.p("workloads"));
        let _ = fs::remove_file(self.p("state.json"));
        let _ = fs::remove_file(self.p("node_ca.pem"));
        let _ = fs::remove_file(self.p("node_ca_key.pem"));
        let _ = fs::remove_file(self.p("serving.pem"));
        let json =
            serde_json::to_vec_pretty(ident).map_err(|e| corrupt(&self.p("spoke.json"), e))?;
        write_atomic(&self.p("spoke.json"), &json, 0o644)
    }

    /// Records the hub address as the operator wrote it (a name stays a name).
    pub fn set_hub(&self, hub: &str) -> Result<(), CredsError> {
        let mut ident = self.identity()?;
        ident.hub = hub.to_owned();
        let json =
            serde_json::to_vec_pretty(&ident).map_err(|e| corrupt(&self.p("spoke.json"), e))?;
        write_atomic(&self.p("spoke.json"), &json, 0o644)
    }

    fn read_pem(&self, path: &Path) -> Result<String, CredsError> {
        fs::read_to_string(path).map_err(io(path))
    }

    /// A private key file, tightened to 0600 first.
    fn read_key(&self, path: &Path) -> Result<String, CredsError> {
        enforce_mode(path, 0o600)?;
        self.read_pem(path)
    }

    fn load_svid(&self, key_path: &Path, chain_path: &Path) -> Result<Svid, CredsError> {
        let key =
            svid::key_from_pem(&self.read_key(key_path)?).map_err(|e| corrupt(key_path, e))?;
        let chain =
            svid::pem_certs(&self.read_pem(chain_path)?).map_err(|e| corrupt(chain_path, e))?;
        Svid::new(key, chain).map_err(|e| corrupt(chain_path, e))
    }

    /// The node SVID.
    pub fn node(&self) -> Result<Svid, CredsError> {
        self.load_svid(&self.p("node_key.pem"), &self.p("node.pem"))
    }

    /// Replaces the node chain (the key stays: it is pinned at the hub).
    pub fn save_node_chain(&self, chain: &[CertificateDer<'_>]) -> Result<(), CredsError> {
        write_atomic(
            &self.p("node.pem"),
            svid::certs_to_pem(chain).as_bytes(),
            0o644,
        )
    }

    /// The data-tunnel serving SVID the node CA issued (node key), if any.
    pub fn serving(&self) -> Result<Option<Svid>, CredsError> {
        if !self.p("serving.pem").exists() {
            return Ok(None);
        }
        self.load_svid(&self.p("node_key.pem"), &self.p("serving.pem"))
            .map(Some)
    }

    /// Stores the serving SVID's chain.
    pub fn save_serving_chain(&self, chain: &[CertificateDer<'_>]) -> Result<(), CredsError> {
        write_atomic(
            &self.p("serving.pem"),
            svid::certs_to_pem(chain).as_bytes(),
            0o644,
        )
    }

    /// The trust bundle.
    pub fn bundle(&self, td: &TrustDomain) -> Result<TrustBundle, CredsError> {
        let path = self.p("bundle.pem");
        let roots = svid::pem_certs(&self.read_pem(&path)?).map_err(|e| corrupt(&path, e))?;
        if roots.is_empty() {
            return Err(corrupt(&path, "no certificates"));
        }
        Ok(TrustBundle::new(td.clone(), roots))
    }

    /// Replaces the trust bundle.
    pub fn save_bundle(&self, roots: &[CertificateDer<'_>]) -> Result<(), CredsError> {
        write_atomic(
            &self.p("bundle.pem"),
            svid::certs_to_pem(roots).as_bytes(),
            0o644,
        )
    }

    fn workload_dir(&self, account: &str) -> PathBuf {
        self.dir.join("workloads").join(account)
    }

    /// A workload's key, generated and stored on first use.
    pub fn workload_key(&self, account: &str) -> Result<KeyPair, CredsError> {
        let path = self.workload_dir(account).join("key.pem");
        if path.exists() {
            return svid::key_from_pem(&self.read_key(&path)?).map_err(|e| corrupt(&path, e));
        }
        let key = svid::generate_key().map_err(|e| corrupt(&path, e))?;
        write_atomic(&path, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(key)
    }

    /// A workload's SVID, if one was issued.
    pub fn workload(&self, account: &str) -> Result<Option<Svid>, CredsError> {
        let d = self.workload_dir(account);
        if !d.join("svid.pem").exists() {
            return Ok(None);
        }
        self.load_svid(&d.join("key.pem"), &d.join("svid.pem"))
            .map(Some)
    }

    /// Stores a workload's chain.
    pub fn save_workload_chain(
        &self,
        account: &str,
        chain: &[CertificateDer<'_>],
    ) -> Result<(), CredsError> {
        write_atomic(
            &self.workload_dir(account).join("svid.pem"),
            svid::certs_to_pem(chain).as_bytes(),
            0o644,
        )
    }

    /// The node CA, if the hub issued one.
    pub fn node_ca(&self) -> Result<Option<NodeCa>, CredsError> {
        let (cert, key) = (self.p("node_ca.pem"), self.p("node_ca_key.pem"));
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        let k = svid::key_from_pem(&self.read_key(&key)?).map_err(|e| corrupt(&key, e))?;
        let mut certs = svid::pem_certs(&self.read_pem(&cert)?).map_err(|e| corrupt(&cert, e))?;
        if certs.len() != 1 {
            return Err(corrupt(&cert, "expected exactly one certificate"));
        }
        let der = certs.remove(0);
        NodeCa::new(der, k).map(Some).map_err(|e| corrupt(&cert, e))
    }

    /// Stores a node CA: key first, then the certificate (a crash between
    /// the two leaves a key without a matching certificate, which
    /// [`CredStore::node_ca`] refuses, and the spoke asks for a new one).
    pub fn save_node_ca(&self, cert: &CertificateDer<'_>, key: &KeyPair) -> Result<(), CredsError> {
        write_atomic(
            &self.p("node_ca_key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.p("node_ca.pem"),
            svid::certs_to_pem(std::slice::from_ref(cert)).as_bytes(),
            0o644,
        )
    }

    /// The issuance policy the hub set (`None` before the first node CA).
    pub fn policy(&self) -> Option<IssuePolicy> {
        let b = fs::read(self.p("issue_policy.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
        Some(IssuePolicy {
            workload_ttl_ms: v.get("workload_ttl_ms")?.as_u64()?,
            max_offline_ms: v.get("max_offline_ms")?.as_u64()?,
        })
    }

    /// Stores the issuance policy.
    pub fn save_policy(&self, p: &IssuePolicy) -> Result<(), CredsError> {
        let json = serde_json::json!({
            "workload_ttl_ms": p.workload_ttl_ms,
            "max_offline_ms": p.max_offline_ms,
        });
        write_atomic(
            &self.p("issue_policy.json"),
            json.to_string().as_bytes(),
            0o644,
        )
    }

    /// The stored signed revocation list, if any (not verified here).
    pub fn revocations(&self) -> Option<SignedRevocationList> {
        let b = fs::read(self.p("revocations.bin")).ok()?;
        SignedRevocationList::decode(&b).ok()
    }

    /// Stores a signed revocation list.
    pub fn save_revocations(&self, list: &SignedRevocationList) -> Result<(), CredsError> {
        write_atomic(&self.p("revocations.bin"), &list.encode(), 0o644)
    }

    /// The trusted-time floor (zero before the first save).
    pub fn time_floor(&self) -> TimeFloor {
        fs::read(self.p("time.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Stores the trusted-time floor.
    pub fn save_time_floor(&self, f: &TimeFloor) -> Result<(), CredsError> {
        let json = serde_json::to_vec(f).map_err(|e| corrupt(&self.p("time.json"), e))?;
        write_atomic(&self.p("time.json"), &json, 0o644)
    }

    /// `state.json`.
    pub fn contact(&self) -> ContactState {
        fs::read(self.p("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records a successful contact.
    pub fn save_contact(&self, s: &ContactState) -> Result<(), CredsError> {
        let json = serde_json::to_vec(s).map_err(|e| corrupt(&self.p("state.json"), e))?;
        write_atomic(&self.p("state.json"), &json, 0o644)
    }

    /// Writes `svid.pem`, `svid_key.pem` (PKCS#8, 0600) and `bundle.pem` of
    /// the node SVID or of one workload's into `out`.
    pub fn export(&self, out: &Path, workload: Option<&str>) -> Result<SpiffeId, CredsError> {
        let ident = self.identity()?;
        let s = match workload {
            None => self.node()?,
            Some(a) => self.workload(a)?.ok_or_else(|| CredsError::Corrupt {
                path: self.workload_dir(a),
                reason: format!("no SVID issued for workload {a:?} yet (is it in the config, and has the spoke reached the hub since?)"),
            })?,
        };
        let bundle = self.bundle(ident.id.trust_domain())?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .map_err(io(out))?;
        write_atomic(
            &out.join("svid.pem"),
            svid::certs_to_pem(&s.chain).as_bytes(),
            0o644,
        )?;
        write_atomic(
            &out.join("svid_key.pem"),
            s.key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(
            &out.join("bundle.pem"),
            svid::certs_to_pem(bundle.roots()).as_bytes(),
            0o644,
        )?;
        Ok(s.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn replaces_are_atomic_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("data");
        let f = d.join("state.json");
        write_atomic(&f, b"one", 0o644).expect("writes");
        // Many writers of one file at once: each replace is whole.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let f = &f;
                s.spawn(move || {
                    for _ in 0..25 {
                        write_atomic(f, &[b'a' + t; 64], 0o644).expect("replaces");
                    }
                });
            }
        });
        let got = fs::read(&f).expect("reads");
        assert_eq!(got.len(), 64);
        assert!(got.iter().all(|b| *b == got[0]), "one writer's bytes");
        let names: Vec<_> = fs::read_dir(&d)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn key_and_directory_modes_are_enforced_at_every_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("data");
        let store = CredStore::new(&d);
        store.workload_key("web").expect("generates");
        let key = d.join("workloads/web/key.pem");
        assert_eq!(mode(&key), 0o600);
        // A restored backup left it readable: the next open tightens it.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        store.workload_key("web").expect("reads");
        assert_eq!(mode(&key), 0o600);
        // Never widened.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).expect("chmod");
        store.workload_key("web").expect("reads");
        assert_eq!(mode(&key), 0o400);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(d.join("spoke.json"), b"{}").expect("writes");
        let _ = store.identity();
        assert_eq!(mode(&d), 0o700);
    }
}
