//! Config input and output: multi-document YAML in Istio's words where Istio
//! has them, tidemesh's where it has none.
//!
//! What it is: [`parse_documents`] reads `tidemesh-hub apply -f FILE` input
//! into [`Resource`]s (model objects plus the document they came from), and
//! [`to_documents`] / [`to_yaml`] / [`to_json`] print a [`MeshConfig`] back in
//! the same language, so `config get -o yaml` output can be applied again.
//! Who drives it: the hub's admin surface (and tests). What it must not do:
//! accept anything it does not understand. A field we do not support is an
//! error naming it; so is a kind or an `apiVersion` we do not accept. Every
//! error names the document (1-based position, kind and name), the field path
//! and the reason.
//!
//! Accepted kinds:
//!
//! | apiVersion | kind | becomes |
//! | --- | --- | --- |
//! | `security.istio.io/v1beta1`, `/v1` | `AuthorizationPolicy` | [`AuthzPolicy`] |
//! | same | `PeerAuthentication` | [`PeerAuthn`] |
//! | same | `RequestAuthentication` | [`crate::reqauthn::RequestAuthn`] |
//! | `networking.istio.io/v1alpha3`, `/v1beta1`, `/v1` | `VirtualService` | [`RouteRule`] |
//! | same | `DestinationRule` | [`DestinationPolicy`] |
//! | same | `ServiceEntry` | [`ServiceEntry`] |
//! | `tidemesh.io/v1alpha1` | `Store` (cluster-scoped) | [`Store`] |
//! | same | `Workload` | [`Workload`] |
//! | same | `DestinationPolicy` | [`DestinationPolicy`] (everything a `DestinationRule` has plus timeouts, retries with backoff, error-rate circuit breaking and a token-bucket rate limit) |
//! | same | `ModeMatrix` (singleton `default`) | [`ModeMatrix`] |
//! | same | `MeshSettings` (singleton `default`) | [`MeshSettings`] |
//!
//! Kubernetes `Service`/`Deployment` (use `Workload`), `EnvoyFilter` (use a
//! `DestinationPolicy` `rateLimit`) and every other kind are rejected by name.
//! A document that is a YAML list is read as one document per item, so the
//! JSON array [`to_json`] prints applies too. Empty documents are skipped
//! (but counted in positions).

mod convert;
mod input;
mod output;
mod peer_authn;
mod reqauthn;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::error::{ConfigError, ConfigIssue, DocumentRef, Issues};
use crate::model::*;
use crate::units::{check_label_name, check_object_name};

pub use output::{to_documents, to_json, to_yaml};

pub(crate) use convert::compile_regex;

/// Largest input accepted, in bytes.
pub const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;
/// Most documents accepted in one input.
pub const MAX_DOCUMENTS: usize = 20_000;

const ISTIO_SECURITY: &[&str] = &["security.istio.io/v1beta1", "security.istio.io/v1"];
const ISTIO_NETWORKING: &[&str] = &[
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];
/// The API version of tidemesh's own kinds.
pub const TIDEMESH_API: &str = "tidemesh.io/v1alpha1";

/// One parsed and checked document.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// 1-based position of the document in the input.
    pub document: usize,
    /// What it defines.
    pub object: Object,
}

/// What a document defines, as model types.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// `AuthorizationPolicy`.
    AuthzPolicy(AuthzPolicy),
    /// `PeerAuthentication`.
    PeerAuthn(PeerAuthn),
    /// `VirtualService`.
    RouteRule(RouteRule),
    /// `DestinationRule` or `DestinationPolicy` (see [`DestinationPolicy::origin`]).
    DestinationPolicy(DestinationPolicy),
    /// `ServiceEntry`.
    ServiceEntry(ServiceEntry),
    /// `Store`.
    Store(Store),
    /// `Workload`.
    Workload(Workload),
    /// `ModeMatrix`.
    ModeMatrix(ModeMatrix),
    /// `MeshSettings`.
    MeshSettings(MeshSettings),
    /// `RequestAuthentication`.
    RequestAuthn(crate::reqauthn::RequestAuthn),
}

/// The identity of an object across applies: kind, namespace and name. A
/// later apply of the same key replaces the object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Document kind.
    pub kind: &'static str,
    /// Namespace; `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Name of the singleton kinds' only object.
pub const SINGLETON_NAME: &str = "default";

impl Object {
    /// The document kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::AuthzPolicy(_) => "AuthorizationPolicy",
            Object::PeerAuthn(_) => "PeerAuthentication",
            Object::RouteRule(_) => "VirtualService",
            Object::DestinationPolicy(p) => match p.origin {
                PolicyOrigin::DestinationRule => "DestinationRule",
                PolicyOrigin::DestinationPolicy => "DestinationPolicy",
            },
            Object::ServiceEntry(_) => "ServiceEntry",
            Object::Store(_) => "Store",
            Object::Workload(_) => "Workload",
            Object::ModeMatrix(_) => "ModeMatrix",
            Object::MeshSettings(_) => "MeshSettings",
            Object::RequestAuthn(_) => "RequestAuthentication",
        }
    }

    /// Kind, namespace and name.
    pub fn key(&self) -> ObjectKey {
        let kind = self.kind();
        let (namespace, name) = match self {
            Object::AuthzPolicy(p) => (Some(p.id.namespace.clone()), p.id.name.clone()),
            Object::PeerAuthn(p) => (Some(p.id.namespace.clone()), p.id.name.clone()),
            Object::RouteRule(r) => (Some(r.id.namespace.clone()), r.id.name.clone()),
            Object::DestinationPolicy(p) => (Some(p.id.namespace.clone()), p.id.name.clone()),
            Object::ServiceEntry(e) => (Some(e.id.namespace.clone()), e.id.name.clone()),
            Object::Workload(w) => (Some(w.id.namespace.clone()), w.id.name.clone()),
            Object::RequestAuthn(r) => (Some(r.id.namespace.clone()), r.id.name.clone()),
            Object::Store(s) => (None, s.name.clone()),
            Object::ModeMatrix(_) | Object::MeshSettings(_) => (None, SINGLETON_NAME.to_string()),
        };
        ObjectKey {
            kind,
            namespace,
            name,
        }
    }
}

/// Parses multi-document YAML (or JSON) into checked [`Resource`]s.
///
/// Every document is read and checked on its own (fields, values, names,
/// patterns, regexes, weights); checks across documents happen in
/// [`MeshConfig::from_resources`] / [`MeshConfig::apply`]. All problems found
/// are returned together; on error nothing is returned.
pub fn parse_documents(yaml: &str) -> Result<Vec<Resource>, ConfigError> {
    let mut errors = ConfigError::empty();
    if yaml.len() > MAX_INPUT_BYTES {
        return Err(ConfigError::single(
            None,
            "",
            format!(
                "input is {} bytes; the maximum is {MAX_INPUT_BYTES}",
                yaml.len()
            ),
        ));
    }
    let mut out = Vec::new();
    let mut index = 0usize;
    for de in serde_yaml_ng::Deserializer::from_str(yaml) {
        // After a syntax error the document stream cannot resume (the
        // iterator would repeat the error), so stop at the first one.
        let value = match Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ConfigIssue {
                    document: Some(doc_ref(index + 1, None, None, None)),
                    path: String::new(),
                    reason: format!("invalid YAML: {e}"),
                });
                break;
            }
        };
        let items = match value {
            Value::Null => {
                index += 1;
                continue;
            }
            Value::Sequence(items) => items,
            other => vec![other],
        };
        for item in items {
            index += 1;
            if index > MAX_DOCUMENTS {
                errors.push(ConfigIssue {
                    document: None,
                    path: String::new(),
                    reason: format!("more than {MAX_DOCUMENTS} documents"),
                });
                return Err(errors);
            }
            if let Some(object) = parse_one(index, item, &mut errors) {
                out.push(Resource {
                    document: index,
                    object,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn doc_ref(
    index: usize,
    kind: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> DocumentRef {
    DocumentRef {
        index: Some(index),
        kind: kind.map(str::to_string),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn parse_one(index: usize, value: Value, errors: &mut ConfigError) -> Option<Object> {
    let api = str_field(&value, "apiVersion").map(str::to_string);
    let kind = str_field(&value, "kind").map(str::to_string);
    let meta = value.get("metadata");
    let name = meta.and_then(|m| str_field(m, "name")).map(str::to_string);
    let namespace = meta
        .and_then(|m| str_field(m, "namespace"))
        .map(str::to_string);
    let doc = Some(doc_ref(
        index,
        kind.as_deref(),
        namespace.as_deref(),
        name.as_deref(),
    ));
    let mut issues = Issues {
        doc: &doc,
        out: errors,
    };
    if !value.is_mapping() {
        issues.add(
            "",
            "a document must be a mapping with apiVersion, kind, metadata and spec",
        );
        return None;
    }
    let (Some(api), Some(kind)) = (api, kind) else {
        if value.get("apiVersion").and_then(Value::as_str).is_none() {
            issues.add("apiVersion", "required, as a string");
        }
        if value.get("kind").and_then(Value::as_str).is_none() {
            issues.add("kind", "required, as a string");
        }
        return None;
    };
    let versions: &[&str] = match kind.as_str() {
        "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication" => ISTIO_SECURITY,
        "VirtualService" | "DestinationRule" | "ServiceEntry" => ISTIO_NETWORKING,
        "Store" | "Workload" | "DestinationPolicy" | "ModeMatrix" | "MeshSettings" => {
            &[TIDEMESH_API]
        }
        other => {
            let hint = match other {
                "Service" | "Deployment" | "Pod" | "StatefulSet" | "DaemonSet"
                | "WorkloadEntry" => {
                    format!("; declare the service's workloads with {TIDEMESH_API} Workload (and cloud services with ServiceEntry)")
                }
                "EnvoyFilter" => format!(
                    "; for a local rate limit use rateLimit in a {TIDEMESH_API} DestinationPolicy"
                ),
                _ => String::new(),
            };
            issues.add(
                "kind",
                format!(
                    "kind {other} ({api}) is not supported by tidemesh; supported kinds: AuthorizationPolicy, PeerAuthentication, RequestAuthentication, VirtualService, DestinationRule, ServiceEntry, and {TIDEMESH_API} Store, Workload, DestinationPolicy, ModeMatrix, MeshSettings{hint}"
                ),
            );
            return None;
        }
    };
    if !versions.contains(&api.as_str()) {
        issues.add(
            "apiVersion",
            format!(
                "{api} is not supported for kind {kind}; use {}",
                versions.join(" or ")
            ),
        );
        return None;
    }
    let cluster_scoped = matches!(kind.as_str(), "Store" | "ModeMatrix" | "MeshSettings");
    let singleton = matches!(kind.as_str(), "ModeMatrix" | "MeshSettings");
    match kind.as_str() {
        "AuthorizationPolicy" => {
            let (id, spec) = typed::<input::AuthorizationPolicySpec>(value, &mut issues, false)?;
            let spec = spec.unwrap_or_default();
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            convert::authorization_policy(&mut cx, id, spec).map(Object::AuthzPolicy)
        }
        "PeerAuthentication" => {
            let (id, spec) =
                typed::<peer_authn::PeerAuthenticationSpec>(value, &mut issues, false)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            peer_authn::peer_authentication(&mut cx, id, spec.unwrap_or_default())
                .map(Object::PeerAuthn)
        }
        "RequestAuthentication" => {
            let (id, spec) =
                typed::<reqauthn::RequestAuthenticationSpec>(value, &mut issues, false)?;
            let spec = spec.unwrap_or_default();
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            reqauthn::request_authentication(&mut cx, id, spec).map(Object::RequestAuthn)
        }
        "VirtualService" => {
            let (id, spec) = typed::<input::VirtualServiceSpec>(value, &mut issues, false)?;
            let spec = required(spec, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            convert::virtual_service(&mut cx, id, spec).map(Object::RouteRule)
        }
        "DestinationRule" => {
            let (id, spec) = typed::<input::DestinationRuleSpec>(value, &mut issues, false)?;
            let spec = required(spec, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            convert::destination_rule(&mut cx, id, spec).map(Object::DestinationPolicy)
        }
        "ServiceEntry" => {
            let (id, spec) = typed::<input::ServiceEntrySpec>(value, &mut issues, false)?;
            let spec = required(spec, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            convert::service_entry(&mut cx, id, spec).map(Object::ServiceEntry)
        }
        "Workload" => {
            let (id, spec) = typed::<input::WorkloadSpec>(value, &mut issues, false)?;
            let spec = required(spec, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            convert::workload(&mut cx, id, spec).map(Object::Workload)
        }
        "DestinationPolicy" => {
            let (id, spec) = typed::<input::DestinationPolicySpec>(value, &mut issues, false)?;
            let spec = required(spec, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: &id.namespace.clone(),
            };
            convert::destination_policy(&mut cx, id, spec).map(Object::DestinationPolicy)
        }
        "Store" => {
            let (id, spec) = typed::<input::StoreSpec>(value, &mut issues, cluster_scoped)?;
            let spec = required(spec, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: "",
            };
            convert::store(&mut cx, id.name, spec).map(Object::Store)
        }
        "ModeMatrix" => {
            let (id, spec) = typed::<input::ModeMatrixSpec>(value, &mut issues, cluster_scoped)?;
            check_singleton(&id, singleton, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: "",
            };
            convert::mode_matrix(&mut cx, spec.unwrap_or_default()).map(Object::ModeMatrix)
        }
        "MeshSettings" => {
            let (id, spec) = typed::<input::MeshSettingsSpec>(value, &mut issues, cluster_scoped)?;
            check_singleton(&id, singleton, &mut issues)?;
            let mut cx = convert::Cx {
                issues: &mut issues,
                namespace: "",
            };
            convert::mesh_settings(&mut cx, spec.unwrap_or_default()).map(Object::MeshSettings)
        }
        // Every kind was matched when choosing the versions above.
        _ => None,
    }
}

fn required<S>(spec: Option<S>, issues: &mut Issues) -> Option<S> {
    if spec.is_none() {
        issues.add("spec", "required");
    }
    spec
}

fn check_singleton(id: &ObjectName, singleton: bool, issues: &mut Issues) -> Option<()> {
    if singleton && id.name != SINGLETON_NAME {
        issues.add(
            "metadata.name",
            format!(
                "there is one mesh-wide object of this kind: name it {SINGLETON_NAME:?}, got {:?}",
                id.name
            ),
        );
        return None;
    }
    Some(())
}

/// Deserializes the document into its input shape, with field paths on errors,
/// and checks `metadata`.
fn typed<S: DeserializeOwned>(
    value: Value,
    issues: &mut Issues,
    cluster_scoped: bool,
) -> Option<(ObjectName, Option<S>)> {
    let doc: input::Doc<S> = match serde_path_to_error::deserialize(value) {
        Ok(d) => d,
        Err(e) => {
            let (path, reason) =
                describe_serde_error(&e.path().to_string(), &e.inner().to_string());
            issues.add(path, reason);
            return None;
        }
    };
    let mut ok = true;
    if let Err(e) = check_object_name(&doc.metadata.name) {
        issues.add("metadata.name", e);
        ok = false;
    }
    let namespace = match (&doc.metadata.namespace, cluster_scoped) {
        (Some(_), true) => {
            issues.add(
                "metadata.namespace",
                format!("{} is cluster-scoped: remove the namespace", doc.kind),
            );
            ok = false;
            String::new()
        }
        (Some(ns), false) => {
            if let Err(e) = check_label_name(ns) {
                issues.add("metadata.namespace", e);
                ok = false;
            }
            ns.clone()
        }
        (None, true) => String::new(),
        (None, false) => "default".to_string(),
    };
    ok.then_some((
        ObjectName {
            namespace,
            name: doc.metadata.name,
        },
        doc.spec,
    ))
}

/// Turns serde's messages into "path: reason" with tidemesh's wording.
fn describe_serde_error(path: &str, msg: &str) -> (String, String) {
    let path = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest
            .split('`')
            .skip(1)
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        let supported = if expected.is_empty() {
            String::new()
        } else {
            format!(" (supported here: {})", expected.join(", "))
        };
        return (
            path,
            format!("field {field} is not supported by tidemesh{supported}"),
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let full = if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return (full, "required field is missing".to_string());
    }
    (path, msg.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_are_reworded() {
        assert_eq!(
            describe_serde_error(
                "spec.rules[0].from[0].source.notPrincipals",
                "unknown field `notPrincipals`, expected `principals` or `namespaces`"
            ),
            (
                "spec.rules[0].from[0].source.notPrincipals".to_string(),
                "field notPrincipals is not supported by tidemesh (supported here: principals, namespaces)".to_string()
            )
        );
        assert_eq!(
            describe_serde_error("spec.http[0].route[1].destination", "missing field `host`"),
            (
                "spec.http[0].route[1].destination.host".to_string(),
                "required field is missing".to_string()
            )
        );
        assert_eq!(
            describe_serde_error(".", "boom"),
            (String::new(), "boom".to_string())
        );
    }
}
