//! Config versions and their sync to spokes.
//!
//! Who drives it: the admin API (apply, history, get, rollback) and each
//! spoke's `SyncConfig` long poll. What it must not do: validate config (the
//! policy crate does) or hold per-spoke protocol state beyond the version a
//! spoke last reported; the spoke asks with the version it has, and the hub
//! answers with its slice of the newest version, or waits for one.
//!
//! A spoke's slice: the mesh-wide settings and mode matrix, every store's
//! locality, the workloads at its own store (other spokes at the same site
//! included), every cloud service entry, every route and destination policy,
//! and the authorization policies whose selector could select one of its
//! workloads (policies without a selector included).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tidemesh_identity::{naming, SpiffeId};
use tidemesh_policy::{
    lifecycle,
    model::{ObjectName, Workload},
    parse_documents, MeshConfig, ObjectKey,
};
use tidemesh_proto::{
    sync::{hub_answer_with_registry, HubAnswer},
    ErrorCode, RegisteredEndpoint, Response, MAX_FRAME,
};

use crate::{config::ConfigVersion, Hub, HubError};

/// Most endpoints one spoke may register (a box runs a handful of workloads).
pub const MAX_ENDPOINTS: usize = 64;
/// Most bytes (postcard) of one spoke's registration.
pub const MAX_REGISTRATION_BYTES: usize = 16 * 1024;
/// Most bytes of all registrations at one store: what a store's slice
/// carries for its site, kept far below the frame limit so one store's
/// registrations can never stop its config sync.
pub const MAX_STORE_REGISTRATION_BYTES: usize = 256 * 1024;
/// Most labels on one endpoint.
pub const MAX_LABELS: usize = 32;

/// Endpoints spokes registered, per spoke, and a generation per store.
#[derive(Debug, Default)]
pub struct Registry {
    by_spoke: HashMap<String, (String, Vec<RegisteredEndpoint>)>,
    generation: HashMap<String, u64>,
    /// Encoded bytes of each spoke's registration.
    bytes: HashMap<String, usize>,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// Too many endpoints, fields too long, or over the spoke's or the
    /// store's byte budget.
    #[error("{0}")]
    TooLarge(String),
    /// A field is malformed.
    #[error("endpoint {index}: {reason}")]
    Invalid {
        /// Position in the registration.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The spoke claims a service its workloads may not serve.
    #[error("endpoint {index}: {reason}")]
    Forbidden {
        /// Position in the registration.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

fn label_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// Checks one spoke's registration (pure; the hub calls it before storing):
///
/// * sizes: at most [`MAX_ENDPOINTS`] endpoints and [`MAX_REGISTRATION_BYTES`]
///   encoded, [`MAX_LABELS`] labels each (keys ≤ 317, values ≤ 63 bytes),
///   and the store's registrations together (`others_bytes` is what the
///   store's other spokes hold) within [`MAX_STORE_REGISTRATION_BYTES`];
/// * fields: the service account is one SPIFFE path segment (so it names
///   `spiffe://TD/store/STORE/sa/ACCOUNT`, an ID only this spoke's node CA
///   can issue), the service a DNS host, the namespace a DNS label, the
///   address empty or `ip:port`, no (namespace, service, account) twice;
/// * claims, against the config in force: where `Workload` objects of this
///   store declare who serves a service, only their service accounts may
///   register it; a service account a `Workload` of this store binds to a
///   service may register only that service; and a host a `MESH_EXTERNAL`
///   `ServiceEntry` declares (a cloud service outside the mesh) may only be
///   registered by an account a `Workload` of this store declares for it —
///   same-site endpoints outrank cloud ones, so this is what keeps one box
///   from intercepting its store's calls to a cloud service.
pub fn check_registration(
    config: &MeshConfig,
    td: &tidemesh_identity::TrustDomain,
    store: &str,
    endpoints: &[RegisteredEndpoint],
    others_bytes: usize,
) -> Result<usize, RegistrationError> {
    use tidemesh_policy::model::MeshLocation;
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(RegistrationError::TooLarge(format!(
            "{} endpoints: at most {MAX_ENDPOINTS} per spoke",
            endpoints.len()
        )));
    }
    let bytes = postcard::to_allocvec(endpoints)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if bytes > MAX_REGISTRATION_BYTES {
        return Err(RegistrationError::TooLarge(format!(
            "registration of {bytes} bytes: at most {MAX_REGISTRATION_BYTES} per spoke"
        )));
    }
    if others_bytes.saturating_add(bytes) > MAX_STORE_REGISTRATION_BYTES {
        return Err(RegistrationError::TooLarge(format!(
            "store {store} would hold {} bytes of registrations: at most {MAX_STORE_REGISTRATION_BYTES}",
            others_bytes.saturating_add(bytes)
        )));
    }
    let declared: Vec<&Workload> = config
        .workloads
        .iter()
        .filter(|w| w.store == store)
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (index, e) in endpoints.iter().enumerate() {
        let invalid = |reason: String| RegistrationError::Invalid { index, reason };
        if e.service_account.len() > 128
            || naming::workload_id(td, store, &e.service_account).is_err()
        {
            return Err(invalid(format!(
                "service account {:?} is not one SPIFFE path segment of at most 128 bytes",
                e.service_account
            )));
        }
        if e.namespace.is_empty()
            || e.namespace.len() > 63
            || !e
                .namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(format!(
                "namespace {:?} is not a DNS label",
                e.namespace
            )));
        }
        let host = tidemesh_policy::units::canonical_host(&e.service, &e.namespace)
            .map_err(|r| invalid(format!("service: {r}")))?;
        if !e.address.is_empty() && e.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(format!("address {:?} is not ip:port", e.address)));
        }
        if e.labels.len() > MAX_LABELS {
            return Err(RegistrationError::TooLarge(format!(
                "endpoint {index}: {} labels, at most {MAX_LABELS}",
                e.labels.len()
            )));
        }
        if let Some((k, v)) = e
            .labels
            .iter()
            .find(|(k, v)| !label_ok(k, 317) || !(v.is_empty() || label_ok(v, 63)))
        {
            return Err(invalid(format!(
                "label {k:?}={v:?} is not a Kubernetes-style label"
            )));
        }
        if !seen.insert((
            e.namespace.as_str(),
            host.clone(),
            e.service_account.as_str(),
        )) {
            return Err(invalid(format!(
                "{} is registered twice for {}",
                host, e.service_account
            )));
        }
        let forbidden = |reason: String| RegistrationError::Forbidden { index, reason };
        let serving: Vec<&&Workload> = declared.iter().filter(|w| w.service == host).collect();
        if !serving.is_empty()
            && !serving
                .iter()
                .any(|w| w.service_account == e.service_account)
        {
            return Err(forbidden(format!(
                "{host} at store {store} is served by service account(s) {} (Workload objects); {} may not register it",
                serving
                    .iter()
                    .map(|w| w.service_account.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                e.service_account
            )));
        }
        let bound: Vec<&&Workload> = declared
            .iter()
            .filter(|w| w.service_account == e.service_account)
            .collect();
        if !bound.is_empty() && !bound.iter().any(|w| w.service == host) {
            return Err(forbidden(format!(
                "service account {} at store {store} serves {} (Workload objects), not {host}",
                e.service_account,
                bound
                    .iter()
                    .map(|w| w.service.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let external = config
            .service_entries
            .iter()
            .any(|se| se.location == MeshLocation::MeshExternal && se.hosts.contains(&host));
        if external && serving.is_empty() {
            return Err(forbidden(format!(
                "{host} is a cloud service outside the mesh (a MESH_EXTERNAL ServiceEntry): a spoke may only serve it locally where a Workload object of store {store} declares it"
            )));
        }
    }
    Ok(bytes)
}

impl Registry {
    /// Replaces a spoke's endpoints (already checked, `bytes` encoded);
    /// returns whether anything changed.
    pub fn register(
        &mut self,
        spoke: &str,
        store: &str,
        endpoints: Vec<RegisteredEndpoint>,
        bytes: usize,
    ) -> bool {
        let new = (store.to_owned(), endpoints);
        if self.by_spoke.get(spoke) == Some(&new) {
            return false;
        }
        self.by_spoke.insert(spoke.to_owned(), new);
        self.bytes.insert(spoke.to_owned(), bytes);
        *self.generation.entry(store.to_owned()).or_insert(0) += 1;
        true
    }

    /// Encoded bytes the spokes of `store` other than `except` registered.
    pub fn store_bytes(&self, store: &str, except: &str) -> usize {
        self.by_spoke
            .iter()
            .filter(|(id, (s, _))| s == store && id.as_str() != except)
            .map(|(id, _)| self.bytes.get(id).copied().unwrap_or(0))
            .sum()
    }

    /// The namespaces the workloads of `account` at `store` were registered
    /// in.
    pub fn namespaces_of(&self, store: &str, account: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_spoke
            .values()
            .filter(|(s, _)| s == store)
            .flat_map(|(_, eps)| eps.iter())
            .filter(|e| e.service_account == account)
            .map(|e| e.namespace.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The store's registry generation (0: nothing registered).
    pub fn generation(&self, store: &str) -> u64 {
        self.generation.get(store).copied().unwrap_or(0)
    }

    /// Healthy endpoints registered at `store` by spokes other than `except`,
    /// as workloads (name `ACCOUNT.NODE`).
    pub fn site_workloads(&self, store: &str, except: &str) -> Vec<Workload> {
        let mut out: Vec<Workload> = self
            .by_spoke
            .iter()
            .filter(|(id, (s, _))| s == store && id.as_str() != except)
            .flat_map(|(id, (_, eps))| {
                let node = id.rsplit('/').next().unwrap_or("").to_owned();
                eps.iter().filter(|e| e.healthy).map(move |e| Workload {
                    id: ObjectName {
                        namespace: e.namespace.clone(),
                        name: format!("{}.{node}", e.service_account),
                    },
                    service: e.service.clone(),
                    store: store.to_owned(),
                    service_account: e.service_account.clone(),
                    address: e.address.clone(),
                    labels: e.labels.clone(),
                    weight: 1,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.id.namespace, &a.id.name).cmp(&(&b.id.namespace, &b.id.name)));
        out
    }

    /// Labels of every endpoint registered at `store`, healthy or not: the
    /// authorization policies selecting them belong in the store's slice.
    pub fn store_labels(&self, store: &str) -> Vec<tidemesh_policy::model::Labels> {
        self.by_spoke
            .values()
            .filter(|(s, _)| s == store)
            .flat_map(|(_, eps)| eps.iter().map(|e| e.labels.clone()))
            .collect()
    }
}

/// What changed between two configs, for the audit entry.
/// A change to the config through the admin surface.
#[derive(Debug, Clone)]
pub enum ConfigEdit {
    /// `apply -f` (create or replace each object), with `--prune`: also
    /// remove the prune set ([`lifecycle::prune_set`]).
    Apply {
        /// The documents.
        yaml: String,
        /// Remove the prune set too.
        prune: bool,
    },
    /// `delete KIND NAMESPACE/NAME`.
    Delete(Vec<ObjectKey>),
    /// `delete -f FILE`: the objects the documents name.
    DeleteYaml(String),
}

/// What an edit would do (`apply --dry-run`, `diff`).
#[derive(Debug, Clone)]
pub struct Preview {
    /// The version it was worked out against (`None`: nothing applied yet).
    pub base_version: Option<u64>,
    /// The candidate config and the outcome per object.
    pub plan: lifecycle::Plan,
    /// [`lifecycle::diff_text`] from the current config to the candidate.
    pub diff: String,
}

fn invalid(e: tidemesh_policy::ConfigError) -> HubError {
    HubError::Invalid(e.to_string())
}

fn plan_edit(
    base: &MeshConfig,
    edit: &ConfigEdit,
    now_ms: u64,
) -> Result<lifecycle::Plan, HubError> {
    let mut plan = match edit {
        ConfigEdit::Apply { yaml, prune } => {
            lifecycle::plan_apply(base, parse_documents(yaml).map_err(invalid)?, *prune)
        }
        ConfigEdit::Delete(keys) => lifecycle::plan_delete(base, keys),
        ConfigEdit::DeleteYaml(yaml) => {
            let keys: Vec<ObjectKey> = parse_documents(yaml)
                .map_err(invalid)?
                .iter()
                .map(|r| r.object.key())
                .collect();
            if keys.is_empty() {
                return Err(HubError::Invalid("the file names no objects".into()));
            }
            lifecycle::plan_delete(base, &keys)
        }
    }
    .map_err(invalid)?;
    // Files the config names on the hub (TLS origination, JWT key sets)
    // are read now: a missing or bad file refuses the whole change.
    check_files(&mut plan.candidate, now_ms).map_err(HubError::Invalid)?;
    Ok(plan)
}

/// The checks of files a config names on the hub (TLS origination
/// certificates and keys; JWT key sets, read into the config with the time
/// `now_ms`), shared by apply, delete, rollback and the offline
/// `validate`: every file is read and parsed now.
pub fn check_files(config: &mut MeshConfig, now_ms: u64) -> Result<(), String> {
    crate::origination::check_config(config)?;
    crate::jwks::load_config(config, now_ms)
}

/// `tidemesh-hub validate`: the checks of an apply, without a hub. `yaml`
/// is applied on top of `base` (a `config get` output; the defaults when
/// `None`) exactly as the hub would, files included.
pub fn validate_offline(base: Option<&str>, yaml: &str) -> Result<MeshConfig, String> {
    let base = match base {
        Some(b) => MeshConfig::from_yaml(b).map_err(|e| format!("--base: {e}"))?,
        None => MeshConfig::default(),
    };
    let mut next = base.apply_yaml(yaml).map_err(|e| e.to_string())?;
    check_files(&mut next, crate::unix_ms(std::time::SystemTime::now()))?;
    Ok(next)
}

fn change_summary(from: &MeshConfig, to: &MeshConfig) -> String {
    let changes = from.diff(to);
    if changes.is_empty() {
        "no changes".to_owned()
    } else {
        changes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The part of `config` that concerns the spoke at `store`.
pub fn slice(config: &MeshConfig, store: &str) -> MeshConfig {
    slice_with(config, store, &[])
}

/// [`slice`], also keeping the authorization policies that select any of
/// `registered` (the labels of workloads spokes registered at `store`: they
/// enforce those policies on their inbound path).
pub fn slice_with(
    config: &MeshConfig,
    store: &str,
    registered: &[tidemesh_policy::model::Labels],
) -> MeshConfig {
    let workloads: Vec<_> = config
        .workloads
        .iter()
        .filter(|w| w.store == store)
        .cloned()
        .collect();
    // A policy with a selector travels only to stores with a workload
    // (configured or registered) it selects; one without, everywhere.
    let selects_here = |selector: &Option<tidemesh_policy::model::Labels>| match selector {
        None => true,
        Some(sel) => workloads
            .iter()
            .map(|w| &w.labels)
            .chain(registered)
            .any(|labels| sel.iter().all(|(k, v)| labels.get(k) == Some(v))),
    };
    let authz_policies = config
        .authz_policies
        .iter()
        .filter(|p| selects_here(&p.selector))
        .cloned()
        .collect();
    let request_authns: Vec<_> = config
        .request_authns
        .iter()
        .filter(|p| selects_here(&p.selector))
        .cloned()
        .collect();
    // Only the key set files the store's rules name travel.
    let jwks_files = config
        .jwks_files
        .iter()
        .filter(|f| {
            request_authns.iter().any(|r| {
                r.jwt_rules.iter().any(|j| {
                    matches!(&j.jwks, tidemesh_policy::reqauthn::JwksSource::File(p) if *p == f.path)
                })
            })
        })
        .cloned()
        .collect();
    MeshConfig {
        workloads,
        authz_policies,
        request_authns,
        jwks_files,
        ..config.clone()
    }
}

impl Hub {
    /// The newest config version, if any (cached).
    pub fn latest_config(&self) -> Result<Option<Arc<ConfigVersion>>, HubError> {
        if let Ok(c) = self.inner.latest.lock() {
            if c.is_some() {
                return Ok(c.clone());
            }
        }
        let v = self.inner.store.config_latest()?.map(Arc::new);
        if let Ok(mut c) = self.inner.latest.lock() {
            c.clone_from(&v);
        }
        Ok(v)
    }

    /// Makes `v` the newest version and wakes the long polls, unless a
    /// newer one is already published (another replica's, seen through the
    /// shared state, may arrive before or after our own apply).
    pub(crate) fn publish(&self, v: ConfigVersion) -> Arc<ConfigVersion> {
        let v = Arc::new(v);
        let n = v.meta.version;
        if let Ok(mut c) = self.inner.latest.lock() {
            if c.as_ref().is_none_or(|cur| cur.meta.version < n) {
                *c = Some(v.clone());
            }
            self.inner.config_tx.send_if_modified(|cur| {
                let newer = *cur < n;
                if newer {
                    *cur = n;
                }
                newer
            });
        }
        v
    }

    /// The newest version as the store holds it now, published if it is
    /// newer than the cached one: what an edit builds on, so that an apply
    /// on one hub replica starts from another's latest.
    fn refresh_latest(&self) -> Result<Option<Arc<ConfigVersion>>, HubError> {
        match self.inner.store.config_latest()? {
            Some(v) => {
                self.publish(v);
                self.latest_config()
            }
            None => self.latest_config(),
        }
    }

    /// Validates `yaml` against the current config and, if every check
    /// passes, stores the result as a new version. An invalid file changes
    /// nothing; the error names the document, the field and the reason.
    pub fn apply_yaml(&self, yaml: &str, uid: Option<u32>) -> Result<Arc<ConfigVersion>, HubError> {
        let edit = ConfigEdit::Apply {
            yaml: yaml.to_owned(),
            prune: false,
        };
        Ok(self.edit_config(&edit, uid)?.0)
    }

    /// Works out what `edit` would do to the current config, running every
    /// check an apply runs (files named by the config included), and stores
    /// nothing: `apply --dry-run` and `diff`.
    pub fn preview(&self, edit: &ConfigEdit) -> Result<Preview, HubError> {
        let cur = self.latest_config()?;
        let base = cur.as_ref().map(|c| c.config.clone()).unwrap_or_default();
        let plan = plan_edit(&base, edit, self.now_ms())?;
        let diff = lifecycle::diff_text(
            &base,
            &plan.candidate,
            &format!("hub v{}", cur.as_ref().map(|c| c.meta.version).unwrap_or(0)),
            "after",
        );
        Ok(Preview {
            base_version: cur.map(|c| c.meta.version),
            plan,
            diff,
        })
    }

    /// Applies `edit` (apply, apply with prune, delete): every check passes
    /// on the result or nothing changes; success is a new version with an
    /// audit entry, published to the spokes.
    pub fn edit_config(
        &self,
        edit: &ConfigEdit,
        uid: Option<u32>,
    ) -> Result<(Arc<ConfigVersion>, Vec<lifecycle::Planned>), HubError> {
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .map_err(|_| HubError::Invalid("apply lock poisoned".into()))?;
        let cur = self.refresh_latest()?;
        let base = cur.as_ref().map(|c| c.config.clone()).unwrap_or_default();
        let plan = plan_edit(&base, edit, self.now_ms())?;
        let summary = change_summary(&base, &plan.candidate);
        let event = match edit {
            ConfigEdit::Apply { .. } => "config_applied",
            ConfigEdit::Delete(_) | ConfigEdit::DeleteYaml(_) => "config_deleted",
        };
        let v = self.inner.store.config_append(
            event,
            self.now_ms(),
            uid,
            summary,
            None,
            plan.candidate,
        )?;
        tracing::info!(target: "tidemesh::audit", version = v.meta.version, uid = ?uid, summary = %v.meta.summary, event, "config changed");
        Ok((self.publish(v), plan.objects))
    }

    /// Makes version `to` current again, as a new version.
    pub fn rollback(&self, to: u64, uid: Option<u32>) -> Result<Arc<ConfigVersion>, HubError> {
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .map_err(|_| HubError::Invalid("apply lock poisoned".into()))?;
        let mut target = self
            .inner
            .store
            .config_get(to)?
            .ok_or_else(|| HubError::Invalid(format!("no config version {to}")))?;
        // Key set files are read again: the version rolled back to gets
        // today's keys, stamped now.
        check_files(&mut target.config, self.now_ms()).map_err(HubError::Invalid)?;
        let cur = self.refresh_latest()?;
        let base = cur.as_ref().map(|c| c.config.clone()).unwrap_or_default();
        let summary = format!(
            "rollback to version {to}: {}",
            change_summary(&base, &target.config)
        );
        let v = self.inner.store.config_append(
            "config_rolled_back",
            self.now_ms(),
            uid,
            summary,
            Some(to),
            target.config,
        )?;
        tracing::info!(target: "tidemesh::audit", version = v.meta.version, to, "config rolled back");
        Ok(self.publish(v))
    }

    /// The config version each spoke last reported as applied.
    pub fn applied_version(&self, spoke: &str) -> Option<u64> {
        self.inner
            .applied
            .lock()
            .ok()
            .and_then(|m| m.get(spoke).copied())
    }

    /// Records a spoke's endpoints; spokes at the same site get them with
    /// their next slice.
    pub fn register(&self, node: &SpiffeId, endpoints: Vec<RegisteredEndpoint>) -> Response {
        let Some(naming::MeshIdentity::Node { store, .. }) = naming::classify(node) else {
            return Response::Error {
                code: ErrorCode::Forbidden,
                message: "registration needs a node SVID".into(),
            };
        };
        let config = match self.latest_config() {
            Ok(c) => c.map(|v| v.config.clone()).unwrap_or_default(),
            Err(e) => {
                return Response::Error {
                    code: ErrorCode::Internal,
                    message: e.to_string(),
                }
            }
        };
        let sid = node.to_string();
        let Ok(mut registry) = self.inner.registry.lock() else {
            return Response::Error {
                code: ErrorCode::Internal,
                message: "registry lock poisoned".into(),
            };
        };
        let others = registry.store_bytes(&store, &sid);
        let bytes = match check_registration(&config, &self.inner.td, &store, &endpoints, others) {
            Ok(b) => b,
            Err(e) => {
                drop(registry);
                let code = match e {
                    RegistrationError::Forbidden { .. } => ErrorCode::Forbidden,
                    _ => ErrorCode::BadRequest,
                };
                tracing::warn!(target: "tidemesh::audit", spoke = %sid, error = %e, "registration refused");
                return Response::Error {
                    code,
                    message: format!("registration refused: {e}"),
                };
            }
        };
        let changed = registry.register(&sid, &store, endpoints, bytes);
        drop(registry);
        if changed {
            self.inner.registry_tx.send_modify(|g| *g += 1);
            tracing::info!(spoke = %node, "endpoints registered");
        }
        Response::Registered
    }

    /// Answers a spoke's `SyncConfig`: its slice of a version (or registry
    /// generation) newer than what it has at once, or after waiting up to
    /// `wait` for one.
    pub async fn sync_config(
        &self,
        node: &SpiffeId,
        have: Option<u64>,
        have_registry: u64,
        wait: Duration,
    ) -> Response {
        if let (Some(h), Ok(mut m)) = (have, self.inner.applied.lock()) {
            m.insert(node.to_string(), h);
        }
        let Some(naming::MeshIdentity::Node { store, .. }) = naming::classify(node) else {
            return Response::Error {
                code: ErrorCode::Forbidden,
                message: "config sync needs a node SVID".into(),
            };
        };
        let mut rx = self.inner.config_tx.subscribe();
        let mut reg_rx = self.inner.registry_tx.subscribe();
        let deadline = tokio::time::Instant::now() + wait.min(Duration::from_secs(60));
        loop {
            let latest = *rx.borrow_and_update();
            reg_rx.borrow_and_update();
            let registry = self
                .inner
                .registry
                .lock()
                .map(|r| r.generation(&store))
                .unwrap_or(0);
            if let HubAnswer::Send(_) =
                hub_answer_with_registry(latest, registry, have, have_registry)
            {
                return self.config_response(node, &store);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Response::ConfigUnchanged { version: latest } },
                r = reg_rx.changed() => if r.is_err() { return Response::ConfigUnchanged { version: latest } },
                _ = tokio::time::sleep_until(deadline) => return Response::ConfigUnchanged { version: latest },
            }
        }
    }

    fn config_response(&self, node: &SpiffeId, store: &str) -> Response {
        let internal = |m: String| Response::Error {
            code: ErrorCode::Internal,
            message: m,
        };
        let v = match self.latest_config() {
            Ok(Some(v)) => v,
            Ok(None) => return internal("no config".into()),
            Err(e) => return internal(e.to_string()),
        };
        let (registry, site, labels) = match self.inner.registry.lock() {
            Ok(r) => (
                r.generation(store),
                r.site_workloads(store, &node.to_string()),
                r.store_labels(store),
            ),
            Err(_) => (0, Vec::new(), Vec::new()),
        };
        let mut part = slice_with(&v.config, store, &labels);
        part.workloads.extend(site);
        let snapshot = match postcard::to_allocvec(&part) {
            Ok(b) => b,
            Err(e) => return internal(format!("cannot encode the config slice: {e}")),
        };
        let Some(revocations) = self.signed_revocations() else {
            return internal("cannot sign the revocation list".into());
        };
        // Numbers and length prefixes around the two byte strings take well
        // under 128 bytes.
        let size = snapshot.len() + revocations.body.len() + revocations.signature.len() + 128;
        if size > MAX_FRAME {
            return internal(format!(
                "the config slice for store {store} ({} bytes) and the revocation list ({} bytes) exceed the {MAX_FRAME}-byte frame limit",
                snapshot.len(),
                revocations.body.len()
            ));
        }
        Response::ConfigSlice {
            version: v.meta.version,
            registry,
            applied_ms: v.meta.at_ms,
            snapshot,
            revocations: (*revocations).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(account: &str, service: &str) -> RegisteredEndpoint {
        RegisteredEndpoint {
            service_account: account.into(),
            service: service.into(),
            namespace: "store".into(),
            labels: [("app".to_string(), account.to_string())].into(),
            address: "10.0.0.7:7500".into(),
            healthy: true,
        }
    }

    fn td() -> tidemesh_identity::TrustDomain {
        tidemesh_identity::TrustDomain::new("edge.example").expect("td")
    }

    const CLAIMS: &str = "apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf01}
spec: {region: r1, zone: z1}
---
apiVersion: tidemesh.io/v1alpha1
kind: Workload
metadata: {name: inventory, namespace: store}
spec: {service: inventory, store: sf01, serviceAccount: inventory, address: '10.0.0.9:8080'}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: payments, namespace: cloud}
spec:
  hosts: [payments.cloud]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.9.0.1}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ledger, namespace: store}
spec:
  hosts: [ledger.cloud]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.9.0.2}]
";

    #[test]
    fn registrations_are_bounded_and_claims_checked() {
        let cfg = MeshConfig::from_yaml(CLAIMS).expect("config");
        let check = |eps: &[RegisteredEndpoint], others| {
            check_registration(&cfg, &td(), "sf01", eps, others)
        };
        // ordinary workloads, a declared one, an in-mesh service also in the cloud
        assert!(check(
            &[
                ep("pos", "pos"),
                ep("inventory", "inventory"),
                ep("ledger", "ledger.cloud")
            ],
            0
        )
        .is_ok());
        // 1,024 oversized endpoints
        let mut big = ep("pos", "pos");
        big.labels = (0..40).map(|i| (format!("k{i}"), "v".repeat(63))).collect();
        let many: Vec<RegisteredEndpoint> = (0..1024).map(|_| big.clone()).collect();
        assert!(matches!(
            check(&many, 0),
            Err(RegistrationError::TooLarge(_))
        ));
        assert!(matches!(
            check(&[big], 0),
            Err(RegistrationError::TooLarge(_))
        ));
        // the store's budget
        assert!(matches!(
            check(&[ep("pos", "pos")], MAX_STORE_REGISTRATION_BYTES),
            Err(RegistrationError::TooLarge(_))
        ));
        // malformed fields
        for bad in [
            ep("a/b", "pos"),
            ep("pos", "Pos Service"),
            RegisteredEndpoint {
                namespace: "Store".into(),
                ..ep("pos", "pos")
            },
            RegisteredEndpoint {
                address: "nowhere".into(),
                ..ep("pos", "pos")
            },
        ] {
            assert!(
                matches!(
                    check(std::slice::from_ref(&bad), 0),
                    Err(RegistrationError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check(&[ep("pos", "pos"), ep("pos", "pos")], 0),
            Err(RegistrationError::Invalid { .. })
        ));
        // claims: another account for a declared service, the declared
        // account for another service, a cloud service outside the mesh
        for bad in [
            ep("evil", "inventory"),
            ep("inventory", "pos"),
            ep("pos", "payments.cloud"),
        ] {
            let e = check(std::slice::from_ref(&bad), 0).expect_err("refused");
            assert!(
                matches!(e, RegistrationError::Forbidden { .. }),
                "{bad:?}: {e}"
            );
        }
        // another store's declarations do not bind this one
        assert!(check_registration(&cfg, &td(), "sf02", &[ep("evil", "inventory")], 0).is_ok());
    }

    /// A realistic 1,000-service config: 50 stores, a workload per service
    /// (20 per store), a DestinationRule with two subsets and a 90/10
    /// VirtualService per service, and 100 authorization policies.
    fn big_config_yaml() -> String {
        let mut y = String::new();
        for s in 0..50 {
            y += &format!("apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {{name: st{s}}}\nspec: {{region: r{}, zone: z{s}}}\n---\n", s % 5);
        }
        for i in 0..1000 {
            let store = i % 50;
            y += &format!(
                "apiVersion: tidemesh.io/v1alpha1\nkind: Workload\nmetadata: {{name: svc{i}-st{store}, namespace: retail}}\nspec: {{service: svc{i}, store: st{store}, serviceAccount: svc{i}, address: '10.0.{}.{}:8080', labels: {{app: svc{i}, version: v1}}}}\n---\n",
                i / 250,
                i % 250
            );
            y += &format!(
                "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: svc{i}, namespace: retail}}\nspec:\n  host: svc{i}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\n"
            );
            y += &format!(
                "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: svc{i}, namespace: retail}}\nspec:\n  hosts: [svc{i}]\n  http:\n  - match: [{{headers: {{x-canary: {{exact: 'true'}}}}}}]\n    route: [{{destination: {{host: svc{i}, subset: v2}}, weight: 100}}]\n  - route:\n    - {{destination: {{host: svc{i}, subset: v1}}, weight: 90}}\n    - {{destination: {{host: svc{i}, subset: v2}}, weight: 10}}\n---\n"
            );
        }
        for p in 0..100 {
            y += &format!(
                "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: p{p}, namespace: retail}}\nspec:\n  selector: {{matchLabels: {{app: svc{}}}}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: ['edge.example/store/st{}/sa/*']}}}}]\n    to: [{{operation: {{methods: [GET, POST], paths: ['/api/*']}}}}]\n---\n",
                p * 7,
                p % 50
            );
        }
        y
    }

    /// Reports the bytes a spoke receives for a 1,000-service config (a
    /// size, not a speed: run with `--nocapture` to see the figures).
    #[test]
    fn slice_of_a_1000_service_config_fits_a_frame() {
        let cfg = MeshConfig::from_yaml(&big_config_yaml()).expect("valid config");
        let full = postcard::to_allocvec(&cfg).expect("encode");
        let part = slice(&cfg, "st7");
        let sliced = postcard::to_allocvec(&part).expect("encode");
        let frame = tidemesh_proto::encode_frame(&Response::Config {
            version: 1,
            registry: 0,
            applied_ms: 0,
            snapshot: sliced.clone(),
        })
        .expect("frame");
        eprintln!(
            "1,000 services: full config {} bytes (postcard), JSON {} bytes; slice for one store {} bytes ({} workloads, {} authz policies); frame on the wire {} bytes",
            full.len(),
            cfg.to_json().len(),
            sliced.len(),
            part.workloads.len(),
            part.authz_policies.len(),
            frame.len()
        );
        assert_eq!(part.workloads.len(), 20);
        assert!(
            !part.authz_policies.is_empty() && part.authz_policies.len() < cfg.authz_policies.len()
        );
        assert!(frame.len() < MAX_FRAME);
        let back: MeshConfig = postcard::from_bytes(&sliced).expect("decode");
        assert_eq!(back, part);
    }
}
