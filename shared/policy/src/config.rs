//! Building a [`MeshConfig`] from documents: upsert, cross-document checks,
//! canonical order, and the summary of what changed.
//!
//! What it is: [`MeshConfig::from_resources`] (a whole config from documents),
//! [`MeshConfig::apply`] (kubectl-apply semantics: each document creates or
//! replaces the object of its kind, namespace and name), [`MeshConfig::without`]
//! (delete), [`MeshConfig::diff`] (audit summaries) and the printing helpers.
//! Who drives it: the hub's apply/rollback path; tests. What it must not do:
//! return a config that failed any check. All checks run on the candidate
//! config before it is returned; on error the caller's config is untouched
//! (these functions take `&self` and build a new value).
//!
//! Cross-document checks: every workload's store is defined; each host has at
//! most one route rule, one destination policy and one service entry; every
//! route destination is a known host, and a subset it names is defined by
//! that host's destination policy.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{ConfigError, ConfigIssue, DocumentRef};
use crate::istio::{self, parse_documents, Object, ObjectKey, Resource};
use crate::model::*;

/// One object's change between two configs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Not in the old config.
    Added(ObjectKey),
    /// In both, different.
    Changed(ObjectKey),
    /// Not in the new config.
    Removed(ObjectKey),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added(k) => write!(f, "added {k}"),
            Change::Changed(k) => write!(f, "changed {k}"),
            Change::Removed(k) => write!(f, "removed {k}"),
        }
    }
}

/// An object with the input document it came from (`None`: applied earlier).
type Entry = (Option<usize>, Object);

impl MeshConfig {
    /// A whole config from parsed documents (on top of the defaults: the
    /// seed's mode matrix, deny-by-default settings). Two documents with the
    /// same kind, namespace and name are an error.
    pub fn from_resources(resources: Vec<Resource>) -> Result<MeshConfig, ConfigError> {
        MeshConfig::default().apply(resources)
    }

    /// Parses YAML and builds a whole config from it.
    pub fn from_yaml(yaml: &str) -> Result<MeshConfig, ConfigError> {
        MeshConfig::from_resources(parse_documents(yaml)?)
    }

    /// This config with `resources` created or replaced, after every check
    /// passed on the result. `self` is never modified.
    pub fn apply(&self, resources: Vec<Resource>) -> Result<MeshConfig, ConfigError> {
        self.apply_pruning(resources, &[])
    }

    /// [`MeshConfig::apply`], also removing the objects `prune` (see
    /// [`crate::lifecycle::prune_set`]) in the same candidate, so the checks
    /// run once on the result. A key of `prune` that the input also defines
    /// is kept (the input wins); a singleton key is ignored.
    pub fn apply_pruning(
        &self,
        resources: Vec<Resource>,
        prune: &[ObjectKey],
    ) -> Result<MeshConfig, ConfigError> {
        let mut errors = ConfigError::empty();
        let mut objects: BTreeMap<ObjectKey, Entry> = self
            .objects()
            .into_iter()
            .map(|o| (o.key(), (None, o)))
            .collect();
        let mut seen: BTreeMap<ObjectKey, usize> = BTreeMap::new();
        for r in resources {
            let key = r.object.key();
            if let Some(first) = seen.get(&key) {
                errors.push(ConfigIssue {
                    document: Some(doc_ref(Some(r.document), &key)),
                    path: "metadata.name".into(),
                    reason: format!("{key} is also defined by document {first} of this input"),
                });
                continue;
            }
            seen.insert(key.clone(), r.document);
            objects.insert(key, (Some(r.document), r.object));
        }
        for k in prune {
            if !seen.contains_key(k) && !matches!(k.kind, "ModeMatrix" | "MeshSettings") {
                objects.remove(k);
            }
        }
        let candidate = assemble(objects.values().map(|(_, o)| o.clone()));
        validate(&candidate, &objects, &mut errors);
        if errors.is_empty() {
            Ok(candidate)
        } else {
            Err(errors)
        }
    }

    /// Parses YAML and applies it to this config.
    pub fn apply_yaml(&self, yaml: &str) -> Result<MeshConfig, ConfigError> {
        self.apply(parse_documents(yaml)?)
    }

    /// This config without the objects `keys` (a singleton returns to its
    /// default), after every check passed on the result (e.g. a destination
    /// policy whose subsets a route still names cannot be removed). Deleting
    /// an object that does not exist is an error.
    pub fn without(&self, keys: &[ObjectKey]) -> Result<MeshConfig, ConfigError> {
        let mut errors = ConfigError::empty();
        let mut objects: BTreeMap<ObjectKey, Entry> = self
            .objects()
            .into_iter()
            .map(|o| (o.key(), (None, o)))
            .collect();
        for k in keys {
            match k.kind {
                "ModeMatrix" => {
                    objects.insert(k.clone(), (None, Object::ModeMatrix(ModeMatrix::default())));
                }
                "MeshSettings" => {
                    objects.insert(
                        k.clone(),
                        (None, Object::MeshSettings(MeshSettings::default())),
                    );
                }
                _ => {
                    if objects.remove(k).is_none() {
                        errors.push(ConfigIssue {
                            document: None,
                            path: String::new(),
                            reason: format!("{k} does not exist"),
                        });
                    }
                }
            }
        }
        let candidate = assemble(objects.values().map(|(_, o)| o.clone()));
        validate(&candidate, &objects, &mut errors);
        if errors.is_empty() {
            Ok(candidate)
        } else {
            Err(errors)
        }
    }

    /// Every object of the config, in canonical order (the order
    /// [`MeshConfig::to_yaml`] prints them).
    pub fn objects(&self) -> Vec<Object> {
        let mut v = vec![
            Object::MeshSettings(self.settings.clone()),
            Object::ModeMatrix(self.mode_matrix.clone()),
        ];
        v.extend(self.stores.iter().cloned().map(Object::Store));
        v.extend(self.workloads.iter().cloned().map(Object::Workload));
        v.extend(
            self.service_entries
                .iter()
                .cloned()
                .map(Object::ServiceEntry),
        );
        v.extend(
            self.destination_policies
                .iter()
                .cloned()
                .map(Object::DestinationPolicy),
        );
        v.extend(self.route_rules.iter().cloned().map(Object::RouteRule));
        v.extend(self.authz_policies.iter().cloned().map(Object::AuthzPolicy));
        v.extend(
            self.peer_authentications
                .iter()
                .cloned()
                .map(Object::PeerAuthn),
        );
        v.extend(
            self.request_authns
                .iter()
                .cloned()
                .map(Object::RequestAuthn),
        );
        v
    }

    /// What changed from `self` to `new`, by object, sorted by key.
    pub fn diff(&self, new: &MeshConfig) -> Vec<Change> {
        let old: BTreeMap<ObjectKey, Object> =
            self.objects().into_iter().map(|o| (o.key(), o)).collect();
        let new: BTreeMap<ObjectKey, Object> =
            new.objects().into_iter().map(|o| (o.key(), o)).collect();
        let keys: BTreeSet<&ObjectKey> = old.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter_map(|k| match (old.get(k), new.get(k)) {
                (None, Some(_)) => Some(Change::Added(k.clone())),
                (Some(_), None) => Some(Change::Removed(k.clone())),
                (Some(a), Some(b)) if a != b => Some(Change::Changed(k.clone())),
                _ => None,
            })
            .collect()
    }

    /// Canonical multi-document YAML; [`MeshConfig::from_yaml`] reads it back
    /// to an equal config.
    pub fn to_yaml(&self) -> String {
        istio::to_yaml(self)
    }

    /// Canonical JSON (an array of documents); [`MeshConfig::from_yaml`]
    /// reads it back to an equal config.
    pub fn to_json(&self) -> String {
        istio::to_json(self)
    }
}

fn doc_ref(index: Option<usize>, key: &ObjectKey) -> DocumentRef {
    DocumentRef {
        index,
        kind: Some(key.kind.to_string()),
        namespace: key.namespace.clone(),
        name: Some(key.name.clone()),
    }
}

/// Builds a config from objects, in canonical order.
fn assemble(objects: impl Iterator<Item = Object>) -> MeshConfig {
    let mut c = MeshConfig::default();
    for o in objects {
        match o {
            Object::AuthzPolicy(p) => c.authz_policies.push(p),
            Object::PeerAuthn(p) => c.peer_authentications.push(p),
            Object::RouteRule(r) => c.route_rules.push(r),
            Object::DestinationPolicy(p) => c.destination_policies.push(p),
            Object::ServiceEntry(e) => c.service_entries.push(e),
            Object::Store(s) => c.stores.push(s),
            Object::Workload(w) => c.workloads.push(w),
            Object::ModeMatrix(m) => c.mode_matrix = m,
            Object::MeshSettings(s) => c.settings = s,
            Object::RequestAuthn(r) => c.request_authns.push(r),
        }
    }
    c.authz_policies.sort_by(|a, b| a.id.cmp(&b.id));
    // sorted by namespace and name: `MeshConfig::peer_mtls` takes the first
    c.peer_authentications.sort_by(|a, b| a.id.cmp(&b.id));
    c.request_authns.sort_by(|a, b| a.id.cmp(&b.id));
    c.route_rules.sort_by(|a, b| a.id.cmp(&b.id));
    c.destination_policies.sort_by(|a, b| a.id.cmp(&b.id));
    c.service_entries.sort_by(|a, b| a.id.cmp(&b.id));
    c.stores.sort_by(|a, b| a.name.cmp(&b.name));
    c.workloads.sort_by(|a, b| a.id.cmp(&b.id));
    c
}

/// Cross-document checks on a candidate config.
fn validate(c: &MeshConfig, objects: &BTreeMap<ObjectKey, Entry>, errors: &mut ConfigError) {
    // Issues about an object: attributed to its document when it is part of
    // this input, else named as already applied.
    let mut report = |o: &Object, path: String, reason: String| {
        let key = o.key();
        let index = objects.get(&key).and_then(|(i, _)| *i);
        errors.push(ConfigIssue {
            document: Some(doc_ref(index, &key)),
            path,
            reason,
        });
    };
    let stores: BTreeSet<&str> = c.stores.iter().map(|s| s.name.as_str()).collect();
    for w in &c.workloads {
        if !stores.contains(w.store.as_str()) {
            report(
                &Object::Workload(w.clone()),
                "spec.store".into(),
                format!(
                    "store {} is not defined: add a {} Store named {}",
                    w.store,
                    istio::TIDEMESH_API,
                    w.store
                ),
            );
        }
    }
    // One owner per host for each kind.
    let mut owners: BTreeMap<(&str, &str), String> = BTreeMap::new();
    for r in &c.route_rules {
        for (i, h) in r.hosts.iter().enumerate() {
            if let Some(prev) = owners.insert(("VirtualService", h), r.id.to_string()) {
                report(
                    &Object::RouteRule(r.clone()),
                    format!("spec.hosts[{i}]"),
                    format!("host {h} is already routed by VirtualService {prev}; one VirtualService per host"),
                );
            }
        }
    }
    for p in &c.destination_policies {
        let kind = match p.origin {
            PolicyOrigin::DestinationRule => "DestinationRule",
            PolicyOrigin::DestinationPolicy => "DestinationPolicy",
        };
        if let Some(prev) =
            owners.insert(("DestinationPolicy", &p.host), format!("{kind} {}", p.id))
        {
            report(
                &Object::DestinationPolicy(p.clone()),
                "spec.host".into(),
                format!("host {} already has a destination policy ({prev}); one DestinationRule or DestinationPolicy per host", p.host),
            );
        }
    }
    for e in &c.service_entries {
        for (i, h) in e.hosts.iter().enumerate() {
            if let Some(prev) = owners.insert(("ServiceEntry", h), e.id.to_string()) {
                report(
                    &Object::ServiceEntry(e.clone()),
                    format!("spec.hosts[{i}]"),
                    format!("host {h} is already defined by ServiceEntry {prev}"),
                );
            }
        }
    }
    let known: BTreeSet<String> = c.services().into_iter().collect();
    let policies: BTreeMap<&str, &DestinationPolicy> = c
        .destination_policies
        .iter()
        .map(|p| (p.host.as_str(), p))
        .collect();
    for r in &c.route_rules {
        for (hi, h) in r.http.iter().enumerate() {
            for (di, d) in h.route.iter().enumerate() {
                let path = format!("spec.http[{hi}].route[{di}].destination");
                let host = &d.destination.host;
                if !known.contains(host) {
                    report(
                        &Object::RouteRule(r.clone()),
                        format!("{path}.host"),
                        format!("host {host} is not a known service: declare it with a Workload, a ServiceEntry, a DestinationRule or a VirtualService"),
                    );
                    continue;
                }
                let Some(subset) = &d.destination.subset else {
                    continue;
                };
                match policies.get(host.as_str()) {
                    None => report(
                        &Object::RouteRule(r.clone()),
                        format!("{path}.subset"),
                        format!("subset {subset} of host {host} is not defined: no DestinationRule or DestinationPolicy has host {host}"),
                    ),
                    Some(p) if p.subset(subset).is_none() => {
                        let defined: Vec<&str> = p.subsets.iter().map(|s| s.name.as_str()).collect();
                        let defined = if defined.is_empty() { "none".to_string() } else { defined.join(", ") };
                        report(
                            &Object::RouteRule(r.clone()),
                            format!("{path}.subset"),
                            format!("subset {subset} of host {host} is not defined (destination policy {} defines: {defined})", p.id),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
    }
    for p in &c.destination_policies {
        for (path, issue) in tls_issues(c, p) {
            report(&Object::DestinationPolicy(p.clone()), path, issue);
        }
    }
}

/// TLS origination (`trafficPolicy.tls`, `portLevelSettings`) must act:
/// only the hub gateway originates it, to a `ServiceEntry` host's first
/// port (the one the gateway forwards to), over HTTP.
fn tls_issues(c: &MeshConfig, p: &DestinationPolicy) -> Vec<(String, String)> {
    let t = &p.traffic;
    let mut out = Vec::new();
    if t.tls.is_none() && t.port_tls.is_empty() {
        return out;
    }
    let base = "spec.trafficPolicy";
    let entry = c.service_entries.iter().find(|e| e.hosts.contains(&p.host));
    let Some(entry) = entry else {
        let path = if t.tls.is_some() {
            format!("{base}.tls")
        } else {
            format!("{base}.portLevelSettings")
        };
        out.push((path, format!("host {} is not a ServiceEntry host: tidemesh originates TLS only at the hub gateway to cloud services (mesh traffic is always mTLS)", p.host)));
        return out;
    };
    let Some(first) = entry.ports.first() else {
        return out;
    };
    for pt in &t.port_tls {
        if pt.port != first.number {
            let declared = entry.ports.iter().any(|sp| sp.number == pt.port);
            let why = if declared {
                format!("the hub gateway forwards {} to its first port, {}; a setting for port {} would not act", p.host, first.number, pt.port)
            } else {
                format!(
                    "port {} is not a port of ServiceEntry {} (its first port is {})",
                    pt.port, entry.id, first.number
                )
            };
            out.push((
                format!("{base}.portLevelSettings[port {}].port.number", pt.port),
                why,
            ));
        }
    }
    let originated = t
        .tls_for_port(first.number)
        .is_some_and(|tls| tls.mode != TlsMode::Disable);
    let http = first.protocol.as_deref().is_none_or(|pr| {
        ["HTTP", "HTTP2", "GRPC"]
            .iter()
            .any(|h| pr.eq_ignore_ascii_case(h))
    });
    if originated && !http {
        out.push((
            format!("{base}.tls"),
            format!(
                "port {} of {} speaks {}: tidemesh originates TLS for HTTP, HTTP2 and GRPC ports only",
                first.number,
                p.host,
                first.protocol.as_deref().unwrap_or("?")
            ),
        ));
    }
    out
}
