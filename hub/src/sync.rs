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
    model::{ObjectName, Workload},
    MeshConfig,
};
use tidemesh_proto::{
    sync::{hub_answer_with_registry, HubAnswer},
    ErrorCode, RegisteredEndpoint, Response, MAX_FRAME,
};

use crate::{config::ConfigVersion, Hub, HubError};

/// Endpoints spokes registered, per spoke, and a generation per store.
#[derive(Debug, Default)]
pub struct Registry {
    by_spoke: HashMap<String, (String, Vec<RegisteredEndpoint>)>,
    generation: HashMap<String, u64>,
}

impl Registry {
    /// Replaces a spoke's endpoints; returns whether anything changed.
    pub fn register(
        &mut self,
        spoke: &str,
        store: &str,
        endpoints: Vec<RegisteredEndpoint>,
    ) -> bool {
        let new = (store.to_owned(), endpoints);
        if self.by_spoke.get(spoke) == Some(&new) {
            return false;
        }
        self.by_spoke.insert(spoke.to_owned(), new);
        *self.generation.entry(store.to_owned()).or_insert(0) += 1;
        true
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
    let authz_policies = config
        .authz_policies
        .iter()
        .filter(|p| match &p.selector {
            None => true,
            Some(sel) => workloads
                .iter()
                .map(|w| &w.labels)
                .chain(registered)
                .any(|labels| sel.iter().all(|(k, v)| labels.get(k) == Some(v))),
        })
        .cloned()
        .collect();
    MeshConfig {
        workloads,
        authz_policies,
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
        let v = self.inner.store.config().latest()?.map(Arc::new);
        if let Ok(mut c) = self.inner.latest.lock() {
            c.clone_from(&v);
        }
        Ok(v)
    }

    fn publish(&self, v: ConfigVersion) -> Arc<ConfigVersion> {
        let v = Arc::new(v);
        if let Ok(mut c) = self.inner.latest.lock() {
            *c = Some(v.clone());
        }
        self.inner.config_tx.send_replace(v.meta.version);
        v
    }

    /// Validates `yaml` against the current config and, if every check
    /// passes, stores the result as a new version. An invalid file changes
    /// nothing; the error names the document, the field and the reason.
    pub fn apply_yaml(&self, yaml: &str, uid: Option<u32>) -> Result<Arc<ConfigVersion>, HubError> {
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .map_err(|_| HubError::Invalid("apply lock poisoned".into()))?;
        let cur = self.latest_config()?;
        let base = cur.as_ref().map(|c| c.config.clone()).unwrap_or_default();
        let next = base
            .apply_yaml(yaml)
            .map_err(|e| HubError::Invalid(e.to_string()))?;
        let summary = change_summary(&base, &next);
        let v = self
            .inner
            .store
            .config()
            .append(self.now_ms(), uid, summary, None, next)?;
        tracing::info!(target: "tidemesh::audit", version = v.meta.version, uid = ?uid, summary = %v.meta.summary, "config applied");
        Ok(self.publish(v))
    }

    /// Makes version `to` current again, as a new version.
    pub fn rollback(&self, to: u64, uid: Option<u32>) -> Result<Arc<ConfigVersion>, HubError> {
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .map_err(|_| HubError::Invalid("apply lock poisoned".into()))?;
        let target = self
            .inner
            .store
            .config()
            .get(to)?
            .ok_or_else(|| HubError::Invalid(format!("no config version {to}")))?;
        let cur = self.latest_config()?;
        let base = cur.as_ref().map(|c| c.config.clone()).unwrap_or_default();
        let summary = format!(
            "rollback to version {to}: {}",
            change_summary(&base, &target.config)
        );
        let v = self.inner.store.config().append(
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
        if endpoints.len() > 1024 {
            return Response::Error {
                code: ErrorCode::BadRequest,
                message: "at most 1024 endpoints per spoke".into(),
            };
        }
        let changed = self
            .inner
            .registry
            .lock()
            .map(|mut r| r.register(&node.to_string(), &store, endpoints))
            .unwrap_or(false);
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
        if snapshot.len() > MAX_FRAME - 64 {
            return internal(format!(
                "config slice of {} bytes exceeds the frame limit",
                snapshot.len()
            ));
        }
        Response::Config {
            version: v.meta.version,
            registry,
            applied_ms: v.meta.at_ms,
            snapshot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
