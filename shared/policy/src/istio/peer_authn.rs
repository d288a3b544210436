//! `PeerAuthentication` (`security.istio.io/v1`, `/v1beta1`): its input
//! shape and its conversion to [`PeerAuthn`].
//!
//! What it is: the document's fields as Istio spells them (`selector`,
//! `mtls.mode`, `portLevelMtls`), checked and turned into the model; the
//! precedence of scopes is [`crate::MeshConfig::peer_mtls`]. Who drives it:
//! [`super::parse_documents`]. What it must not do: accept a mode, a field
//! or a port-level setting tidemesh would not act on (`portLevelMtls`
//! without a selector is refused, as Istio refuses it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::convert::Cx;
use super::input::Selector;
use crate::model::*;

// --- security.istio.io PeerAuthentication ---------------------------------

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<MtlsIn>,
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<PortKeyIn, MtlsIn>>,
}

/// `mtls` and each `portLevelMtls` value: `{ mode: ... }`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MtlsIn {
    #[serde(default)]
    pub mode: Option<String>,
}

/// A `portLevelMtls` key: a number in YAML, a string once printed as JSON.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum PortKeyIn {
    Number(i64),
    Text(String),
}

// --- PeerAuthentication ----------------------------------------------------

/// Istio's spellings of `mtls.mode`; `UNSET` is `None`.
const MTLS_MODES: &[(&str, Option<MtlsMode>)] = &[
    ("UNSET", None),
    ("STRICT", Some(MtlsMode::Strict)),
    ("PERMISSIVE", Some(MtlsMode::Permissive)),
    ("DISABLE", Some(MtlsMode::Disable)),
];

fn mtls_mode(cx: &mut Cx, path: &str, m: &Option<MtlsIn>) -> Option<Option<MtlsMode>> {
    let Some(mode) = m.as_ref().and_then(|m| m.mode.as_deref()) else {
        return Some(None);
    };
    cx.one_of(path, mode, MTLS_MODES)
}

pub(crate) fn peer_authentication(
    cx: &mut Cx,
    id: ObjectName,
    spec: PeerAuthenticationSpec,
) -> Option<PeerAuthn> {
    let before = cx.issues.out.count();
    let selector = spec
        .selector
        .map(|s| cx.labels("spec.selector.matchLabels", &s.match_labels))
        .filter(|l| !l.is_empty());
    let mode = mtls_mode(cx, "spec.mtls.mode", &spec.mtls).flatten();
    let mut port_modes = BTreeMap::new();
    if let Some(ports) = spec.port_level_mtls {
        if selector.is_none() && !ports.is_empty() {
            cx.err(
                "spec.portLevelMtls",
                "port-level mTLS needs a workload selector (spec.selector.matchLabels), as in Istio: a namespace- or mesh-wide policy cannot set it",
            );
        }
        for (key, m) in ports {
            let shown = match &key {
                PortKeyIn::Number(n) => n.to_string(),
                PortKeyIn::Text(t) => t.clone(),
            };
            let path = format!("spec.portLevelMtls[{shown}]");
            let port = match key {
                PortKeyIn::Number(n) => Some(n),
                PortKeyIn::Text(t) => t.parse::<i64>().ok(),
            };
            let Some(port) = port else {
                cx.err(&path, "a port number is required as the key");
                continue;
            };
            let Some(port) = cx.int::<u16>(&path, port, 1, 65535) else {
                continue;
            };
            if m.mode.is_none() {
                cx.err(
                    format!("{path}.mode"),
                    "required: STRICT, PERMISSIVE, DISABLE or UNSET",
                );
                continue;
            }
            if let Some(mode) = mtls_mode(cx, &format!("{path}.mode"), &Some(m)) {
                if port_modes.insert(port, mode).is_some() {
                    cx.err(&path, format!("port {port} is listed twice"));
                }
            }
        }
    }
    (cx.issues.out.count() == before).then_some(PeerAuthn {
        id,
        selector,
        mode,
        port_modes,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use crate::model::*;
    use crate::MeshConfig;

    fn pa(ns: &str, name: &str, spec: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Every issue of `yaml`, as `path: reason` lines.
    fn errors(yaml: &str) -> String {
        MeshConfig::from_yaml(yaml)
            .map(|_| "accepted".to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn scopes_and_precedence_follow_istio() {
        let yaml = [
            pa("istio-system", "mesh", "  mtls: {mode: PERMISSIVE}"),
            pa("shop", "ns", "  mtls: {mode: STRICT}"),
            pa(
                "shop",
                "pos",
                "  selector: {matchLabels: {app: pos}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    8081: {mode: STRICT}\n    8082: {mode: UNSET}",
            ),
            // UNSET at the workload: the namespace's mode applies
            pa("shop", "till", "  selector: {matchLabels: {app: till}}\n  mtls: {mode: UNSET}\n  portLevelMtls: {9000: {mode: DISABLE}}"),
            // a selector in the root namespace selects root-namespace workloads only
            pa("istio-system", "sel", "  selector: {matchLabels: {app: pos}}\n  mtls: {mode: DISABLE}"),
        ]
        .concat();
        let c = MeshConfig::from_yaml(&yaml).unwrap();
        assert_eq!(c.peer_authentications.len(), 5);
        let pos = labels(&[("app", "pos")]);
        let till = labels(&[("app", "till")]);
        let other = labels(&[("app", "other")]);
        let m = |ns: &str, l: &Labels, port| c.peer_mtls(ns, l, port);
        // workload > namespace
        let got = m("shop", &pos, 8080);
        assert_eq!(
            (got.mode, got.scope),
            (MtlsMode::Permissive, PeerAuthnScope::Workload)
        );
        assert_eq!(got.policy.unwrap().to_string(), "shop/pos");
        // port-level over the workload's own mode; UNSET on a port inherits
        assert_eq!(
            (m("shop", &pos, 8081).mode, m("shop", &pos, 8081).scope),
            (MtlsMode::Strict, PeerAuthnScope::Port)
        );
        assert_eq!(m("shop", &pos, 8082).mode, MtlsMode::Permissive);
        // UNSET workload mode inherits the namespace's, its port entry still acts
        assert_eq!(
            (m("shop", &till, 8080).mode, m("shop", &till, 8080).scope),
            (MtlsMode::Strict, PeerAuthnScope::Namespace)
        );
        assert_eq!(m("shop", &till, 9000).mode, MtlsMode::Disable);
        // namespace > mesh
        assert_eq!(m("shop", &other, 80).mode, MtlsMode::Strict);
        // mesh-wide for a namespace without its own; the root's selector
        // policy does not reach other namespaces
        let got = m("cafe", &pos, 80);
        assert_eq!(
            (got.mode, got.scope),
            (MtlsMode::Permissive, PeerAuthnScope::Mesh)
        );
        assert_eq!(m("istio-system", &pos, 80).mode, MtlsMode::Disable);
        assert_eq!(m("istio-system", &other, 80).mode, MtlsMode::Permissive);
        // without any policy: STRICT, tidemesh's default
        let none = MeshConfig::default().peer_mtls("shop", &pos, 80);
        assert_eq!(
            (none.mode, none.scope, none.policy),
            (MtlsMode::Strict, PeerAuthnScope::Default, None)
        );
        // the round trip through config get -o yaml and -o json
        assert_eq!(MeshConfig::from_yaml(&c.to_yaml()).unwrap(), c);
        assert_eq!(MeshConfig::from_yaml(&c.to_json()).unwrap(), c);
        // and through postcard (the spoke's last-known-good)
        let bytes = postcard::to_allocvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<MeshConfig>(&bytes).unwrap(), c);
    }

    #[test]
    fn several_at_one_scope_the_first_by_name_decides() {
        let yaml = [
            pa("shop", "b-strict", "  mtls: {mode: STRICT}"),
            pa("shop", "a-permissive", "  mtls: {mode: PERMISSIVE}"),
            pa("shop", "w-2", "  selector: {matchLabels: {app: pos}}\n  mtls: {mode: STRICT}"),
            pa("shop", "w-1", "  selector: {matchLabels: {tier: front}}\n  mtls: {mode: DISABLE}"),
            // the mesh-wide policy may live in a root namespace of the config's choosing
            "apiVersion: tidemesh.io/v1alpha1\nkind: MeshSettings\nmetadata: {name: default}\nspec: {rootNamespace: mesh-root}\n---\n".to_string(),
            pa("mesh-root", "all", "  mtls: {mode: DISABLE}"),
        ]
        .concat();
        let c = MeshConfig::from_yaml(&yaml).unwrap();
        let got = c.peer_mtls("shop", &labels(&[("app", "x")]), 80);
        assert_eq!(got.mode, MtlsMode::Permissive);
        assert_eq!(got.policy.unwrap().name, "a-permissive");
        let both = labels(&[("app", "pos"), ("tier", "front")]);
        let got = c.peer_mtls("shop", &both, 80);
        assert_eq!(
            (got.mode, got.policy.unwrap().name.as_str()),
            (MtlsMode::Disable, "w-1")
        );
        assert_eq!(c.peer_mtls("cafe", &both, 80).mode, MtlsMode::Disable);
        // the v1beta1 spelling is the same kind
        let beta = pa("shop", "x", "  mtls: {mode: PERMISSIVE}")
            .replace("security.istio.io/v1", "security.istio.io/v1beta1");
        assert_eq!(
            MeshConfig::from_yaml(&beta).unwrap().peer_authentications[0].mode,
            Some(MtlsMode::Permissive)
        );
        // an empty spec is an UNSET policy
        let empty = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: e, namespace: shop}\n";
        let c = MeshConfig::from_yaml(empty).unwrap();
        assert_eq!(c.peer_authentications[0].mode, None);
        assert_eq!(
            c.peer_mtls("shop", &Labels::new(), 1).mode,
            MtlsMode::Strict
        );
    }

    #[test]
    fn bad_documents_are_refused_with_the_field_named() {
        let mut wrong = Vec::new();
        for (spec, want) in [
            (
                "  mtls: {mode: MUTUAL}",
                "spec.mtls.mode: \"MUTUAL\" is not supported; use one of UNSET, STRICT, PERMISSIVE, DISABLE",
            ),
            (
                "  mtls: {mode: strict}",
                "spec.mtls.mode: \"strict\" is not supported",
            ),
            (
                "  mtls: {mode: STRICT, foo: 1}",
                "spec.mtls.foo: field foo is not supported by tidemesh (supported here: mode)",
            ),
            (
                "  mtls: {mode: STRICT}\n  targetRefs: []",
                "spec.targetRefs: field targetRefs is not supported by tidemesh (supported here: selector, mtls, portLevelMtls)",
            ),
            (
                "  portLevelMtls: {8080: {mode: DISABLE}}",
                "spec.portLevelMtls: port-level mTLS needs a workload selector",
            ),
            (
                "  selector: {matchLabels: {app: a}}\n  portLevelMtls: {0: {mode: DISABLE}}",
                "spec.portLevelMtls[0]: must be between 1 and 65535, got 0",
            ),
            (
                "  selector: {matchLabels: {app: a}}\n  portLevelMtls: {70000: {mode: DISABLE}}",
                "spec.portLevelMtls[70000]: must be between 1 and 65535",
            ),
            (
                "  selector: {matchLabels: {app: a}}\n  portLevelMtls: {http: {mode: DISABLE}}",
                "spec.portLevelMtls[http]: a port number is required as the key",
            ),
            (
                "  selector: {matchLabels: {app: a}}\n  portLevelMtls: {8080: {}}",
                "spec.portLevelMtls[8080].mode: required",
            ),
            (
                "  selector: {matchLabels: {app: a}}\n  portLevelMtls: {8080: {mode: OPTIONAL}}",
                "spec.portLevelMtls[8080].mode: \"OPTIONAL\" is not supported",
            ),
            (
                "  selector: {matchLabels: {app: a, 'bad key': x}}\n  mtls: {mode: STRICT}",
                "spec.selector.matchLabels.bad key",
            ),
        ] {
            let got = errors(&pa("shop", "p", spec));
            if !got.contains(want) || !got.contains("document 1 (PeerAuthentication p)") {
                wrong.push(format!("{spec}\n want {want}\n got {got}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        let alpha = pa("shop", "p", "  mtls: {mode: STRICT}")
            .replace("security.istio.io/v1", "security.istio.io/v1alpha1");
        let got = errors(&alpha);
        assert!(
            got.contains("security.istio.io/v1alpha1 is not supported for kind PeerAuthentication"),
            "{got}"
        );
        // all or nothing: one bad document refuses the whole input
        let mixed = [
            pa("shop", "good", "  mtls: {mode: PERMISSIVE}"),
            pa("shop", "bad", "  mtls: {mode: NOPE}"),
        ]
        .concat();
        assert!(MeshConfig::from_yaml(&mixed).is_err());
        // two with the same name in one input
        let twice = [
            pa("shop", "p", "  mtls: {mode: PERMISSIVE}"),
            pa("shop", "p", "  mtls: {mode: STRICT}"),
        ]
        .concat();
        assert!(
            errors(&twice).contains("also defined by document 1"),
            "{}",
            errors(&twice)
        );
    }

    /// What a plaintext request is authorized as: no principal, no
    /// namespace. No source rule matches it, not even `*`; a rule without
    /// `from` can.
    #[test]
    fn a_request_without_identity_matches_no_source_rule() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchLabels: {app: pos}}\n  rules:\n  - from: [{source: {principals: ['*']}}]\n  - from: [{source: {namespaces: ['*']}}]\n  - to: [{operation: {paths: [/open]}}]\n";
        let c = MeshConfig::from_yaml(yaml).unwrap();
        let compiled = crate::CompiledPolicies::from_config(&c);
        let pos = labels(&[("app", "pos")]);
        let req = |principal, namespace, path| crate::AuthzRequest {
            workload: crate::WorkloadRef {
                namespace: "shop",
                labels: &pos,
            },
            source_principal: principal,
            source_namespace: namespace,
            method: "GET",
            path,
            port: 8080,
            headers: &crate::NoHeaders,
            request_auth: None,
        };
        assert!(!compiled.decide(&req(None, None, "/x")).allowed);
        assert!(
            compiled
                .decide(&req(Some("edge.example/store/sf01/sa/a"), None, "/x"))
                .allowed
        );
        assert!(compiled.decide(&req(None, Some("shop"), "/x")).allowed);
        assert!(compiled.decide(&req(None, None, "/open")).allowed);
    }

    /// The hub stores config versions as JSON: one written before
    /// PeerAuthentication existed still reads, with none.
    #[test]
    fn json_configs_from_before_peer_authentication_still_read() {
        let c = MeshConfig::from_yaml(&pa("shop", "p", "  mtls: {mode: PERMISSIVE}")).unwrap();
        let mut v = serde_json::to_value(&c).unwrap();
        assert!(v
            .as_object_mut()
            .unwrap()
            .remove("peer_authentications")
            .is_some());
        let old: MeshConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old, MeshConfig::default());
    }
}
