//! What an apply, a prune or a delete would do, worked out before it is done:
//! the outcome per object in kubectl's words (created, configured,
//! unchanged, pruned, deleted), the prune set, and a line diff of the
//! objects that change.
//!
//! Who drives it: the hub's `apply` (also `--dry-run`, `--prune`), `diff` and
//! `delete` admin commands. What it must not do: I/O or storing anything;
//! every candidate config it returns passed the same checks as
//! [`MeshConfig::apply`] / [`MeshConfig::without`].
//!
//! # The prune set
//! `apply --prune -f FILE` removes every object of the current config whose
//! kind *and* namespace pair occurs in FILE (for the cluster-scoped `Store`:
//! whose kind occurs in FILE) and whose kind, namespace and name does not.
//! Objects of other kinds, or of the same kind in other namespaces, are
//! kept. The singletons `ModeMatrix` and `MeshSettings` are never pruned.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as Json;

use crate::error::ConfigError;
use crate::istio::{to_documents, ObjectKey, Resource, SINGLETON_NAME};
use crate::model::MeshConfig;

/// What happens to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not in the current config; the input adds it.
    Created,
    /// In the current config; the input changes it.
    Configured,
    /// In the current config; the input defines it exactly as it is.
    Unchanged,
    /// In the current config, in the prune set: removed.
    Pruned,
    /// Named by a delete: removed (a singleton returns to its default).
    Deleted,
}

impl Outcome {
    /// kubectl's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Pruned => "pruned",
            Outcome::Deleted => "deleted",
        }
    }
}

/// One object's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Kind, namespace and name.
    pub key: ObjectKey,
    /// What happens to it.
    pub outcome: Outcome,
}

/// The result of planning: the config it would make and what happens to
/// each object named by the input (and each pruned one).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The config after the change; it passed every check.
    pub candidate: MeshConfig,
    /// Per object, in input order, then the pruned ones in key order.
    pub objects: Vec<Planned>,
}

/// The objects of `current` that `apply --prune` with `resources` removes
/// (see the module header), sorted by key.
pub fn prune_set(current: &MeshConfig, resources: &[Resource]) -> Vec<ObjectKey> {
    let keys: BTreeSet<ObjectKey> = resources.iter().map(|r| r.object.key()).collect();
    let scopes: BTreeSet<(&'static str, Option<&str>)> = keys
        .iter()
        .map(|k| (k.kind, k.namespace.as_deref()))
        .collect();
    let mut out: Vec<ObjectKey> = current
        .objects()
        .into_iter()
        .map(|o| o.key())
        .filter(|k| !is_singleton(k.kind))
        .filter(|k| scopes.contains(&(k.kind, k.namespace.as_deref())))
        .filter(|k| !keys.contains(k))
        .collect();
    out.sort();
    out
}

fn is_singleton(kind: &str) -> bool {
    matches!(kind, "ModeMatrix" | "MeshSettings")
}

/// Plans applying `resources` to `current` (kubectl-apply semantics), with
/// the prune set removed too when `prune` is set.
pub fn plan_apply(
    current: &MeshConfig,
    resources: Vec<Resource>,
    prune: bool,
) -> Result<Plan, ConfigError> {
    let pruned = if prune {
        prune_set(current, &resources)
    } else {
        Vec::new()
    };
    let mut named: Vec<ObjectKey> = Vec::new();
    for r in &resources {
        let k = r.object.key();
        if !named.contains(&k) {
            named.push(k);
        }
    }
    let candidate = current.apply_pruning(resources, &pruned)?;
    let old = by_key(current);
    let new = by_key(&candidate);
    let mut objects: Vec<Planned> = named
        .into_iter()
        .map(|key| {
            let outcome = match (old.get(&key), new.get(&key)) {
                (Some(a), Some(b)) if a == b => Outcome::Unchanged,
                (Some(_), _) => Outcome::Configured,
                (None, _) => Outcome::Created,
            };
            Planned { key, outcome }
        })
        .collect();
    objects.extend(pruned.into_iter().map(|key| Planned {
        key,
        outcome: Outcome::Pruned,
    }));
    Ok(Plan { candidate, objects })
}

/// Plans deleting `keys` from `current`; any key that does not exist
/// refuses the whole delete (see [`MeshConfig::without`]).
pub fn plan_delete(current: &MeshConfig, keys: &[ObjectKey]) -> Result<Plan, ConfigError> {
    let mut unique: Vec<ObjectKey> = Vec::new();
    for k in keys {
        if !unique.contains(k) {
            unique.push(k.clone());
        }
    }
    let candidate = current.without(&unique)?;
    Ok(Plan {
        candidate,
        objects: unique
            .into_iter()
            .map(|key| Planned {
                key,
                outcome: Outcome::Deleted,
            })
            .collect(),
    })
}

fn by_key(c: &MeshConfig) -> BTreeMap<ObjectKey, crate::istio::Object> {
    c.objects().into_iter().map(|o| (o.key(), o)).collect()
}

/// The kinds a delete can name, as their documents spell them.
const KINDS: &[&str] = &[
    "AuthorizationPolicy",
    "PeerAuthentication",
    "VirtualService",
    "DestinationRule",
    "DestinationPolicy",
    "ServiceEntry",
    "Store",
    "Workload",
    "ModeMatrix",
    "MeshSettings",
];

/// Parses `delete KIND NAMESPACE/NAME` (`KIND NAME` for the cluster-scoped
/// `Store` and the singletons, whose only name is `default`). The kind is
/// matched without regard to case.
pub fn parse_key(kind: &str, name: &str) -> Result<ObjectKey, String> {
    let Some(kind) = KINDS.iter().find(|k| k.eq_ignore_ascii_case(kind)) else {
        return Err(format!(
            "unknown kind {kind:?}: one of {}",
            KINDS.join(", ")
        ));
    };
    let cluster_scoped = *kind == "Store" || is_singleton(kind);
    match (cluster_scoped, name.split_once('/')) {
        (true, Some(_)) => Err(format!(
            "{kind} is cluster-scoped: give its name without a namespace, not {name:?}"
        )),
        (true, None) if is_singleton(kind) && name != SINGLETON_NAME => Err(format!(
            "{kind} is a singleton: its only name is {SINGLETON_NAME}, not {name:?}"
        )),
        (true, None) if name.is_empty() => Err(format!("{kind}: empty name")),
        (true, None) => Ok(ObjectKey {
            kind,
            namespace: None,
            name: name.to_string(),
        }),
        (false, Some((ns, n))) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
            Ok(ObjectKey {
                kind,
                namespace: Some(ns.to_string()),
                name: n.to_string(),
            })
        }
        (false, _) => Err(format!(
            "{kind} is namespaced: give NAMESPACE/NAME, not {name:?}"
        )),
    }
}

/// One object of `config` as a document (the form `config get` prints).
fn document(config: &MeshConfig, key: &ObjectKey) -> Option<Json> {
    to_documents(config).into_iter().find(|d| {
        d["kind"] == key.kind
            && d["metadata"]["name"] == key.name.as_str()
            && d["metadata"]["namespace"].as_str() == key.namespace.as_deref()
    })
}

fn yaml_of(doc: Option<Json>) -> String {
    // A JSON value of strings, numbers, bools, lists and maps always
    // serializes to YAML.
    doc.map(|d| serde_yaml_ng::to_string(&d).unwrap_or_default())
        .unwrap_or_default()
}

/// A readable diff of every object that differs between `old` and `new`:
/// per object a `diff KIND NAMESPACE/NAME` header, `---`/`+++` lines
/// labelled `old_label` and `new_label`, and unified hunks (3 lines of
/// context) of its YAML. Empty when nothing differs.
pub fn diff_text(old: &MeshConfig, new: &MeshConfig, old_label: &str, new_label: &str) -> String {
    let mut out = String::new();
    for change in old.diff(new) {
        let key = match &change {
            crate::Change::Added(k) | crate::Change::Changed(k) | crate::Change::Removed(k) => k,
        };
        let a = yaml_of(document(old, key));
        let b = yaml_of(document(new, key));
        out.push_str(&format!(
            "diff {key}\n--- {key} ({old_label})\n+++ {key} ({new_label})\n"
        ));
        out.push_str(&unified(&a, &b, 3));
    }
    out
}

/// Above this many cells of the comparison table (old lines × new lines),
/// the diff shows the whole old text removed and the new one added.
const MAX_CELLS: usize = 4_000_000;

/// Line operations turning `a` into `b` (longest common subsequence).
fn edit_script<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(char, &'a str)> {
    let (n, m) = (a.len(), b.len());
    if n.saturating_mul(m) > MAX_CELLS {
        return a
            .iter()
            .map(|l| ('-', *l))
            .chain(b.iter().map(|l| ('+', *l)))
            .collect();
    }
    let w = m + 1;
    // t[i * w + j]: length of the longest common subsequence of a[i..], b[j..]
    let mut t = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            t[i * w + j] = if a[i] == b[j] {
                t[(i + 1) * w + j + 1] + 1
            } else {
                t[(i + 1) * w + j].max(t[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(n + m);
    while i < n && j < m {
        if a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if t[(i + 1) * w + j] >= t[i * w + j + 1] {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    ops.extend(a[i..].iter().map(|l| ('-', *l)));
    ops.extend(b[j..].iter().map(|l| ('+', *l)));
    ops
}

/// Unified diff hunks of two texts, `context` lines around each change.
pub fn unified(a: &str, b: &str, context: usize) -> String {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let ops = edit_script(&al, &bl);
    // line numbers (1-based) in a and b at each op
    let mut pos = Vec::with_capacity(ops.len());
    let (mut x, mut y) = (1usize, 1usize);
    for (tag, _) in &ops {
        pos.push((x, y));
        match tag {
            '-' => x += 1,
            '+' => y += 1,
            _ => {
                x += 1;
                y += 1;
            }
        }
    }
    let changed: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].0 != ' ').collect();
    let mut out = String::new();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(context);
        let mut last = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= last + 2 * context + 1 {
            k += 1;
            last = changed[k];
        }
        let end = (last + context + 1).min(ops.len());
        let hunk = &ops[start..end];
        let old_n = hunk.iter().filter(|(t, _)| *t != '+').count();
        let new_n = hunk.iter().filter(|(t, _)| *t != '-').count();
        let (x0, y0) = pos[start];
        let x0 = if old_n == 0 { x0 - 1 } else { x0 };
        let y0 = if new_n == 0 { y0 - 1 } else { y0 };
        out.push_str(&format!("@@ -{x0},{old_n} +{y0},{new_n} @@\n"));
        for (t, l) in hunk {
            out.push(*t);
            out.push_str(l);
            out.push('\n');
        }
        k += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::parse_documents;

    const BASE: &str = "\
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf01}
spec: {region: us-west-2, zone: us-west-2a}
---
apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {name: sf02}
spec: {region: us-west-2, zone: us-west-2b}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: pos, namespace: retail}
spec: {host: pos, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: inv, namespace: retail}
spec: {host: inv}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: pay, namespace: bank}
spec: {host: pay}
";

    fn base() -> MeshConfig {
        MeshConfig::from_yaml(BASE).expect("base")
    }

    fn outcomes(p: &Plan) -> Vec<(String, &'static str)> {
        p.objects
            .iter()
            .map(|o| (o.key.to_string(), o.outcome.as_str()))
            .collect()
    }

    #[test]
    fn prune_set_is_per_kind_and_namespace_and_spares_singletons() {
        let file = parse_documents(
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: pos, namespace: retail}\nspec: {host: pos}\n---\napiVersion: tidemesh.io/v1alpha1\nkind: ModeMatrix\nmetadata: {name: default}\nspec: {}\n",
        )
        .expect("file");
        let keys: Vec<String> = prune_set(&base(), &file)
            .iter()
            .map(ToString::to_string)
            .collect();
        // retail's other DestinationRule goes; bank's and the Stores stay
        assert_eq!(keys, vec!["DestinationRule retail/inv".to_string()]);
        // a Store in the file makes the other Stores prunable
        let file = parse_documents(
            "apiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {name: sf02}\nspec: {region: us-west-2, zone: us-west-2b}\n",
        )
        .expect("file");
        let keys: Vec<String> = prune_set(&base(), &file)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(keys, vec!["Store sf01".to_string()]);
    }

    #[test]
    fn plan_apply_reports_kubectl_outcomes_and_prunes() {
        let file = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: pos, namespace: retail}\nspec: {host: pos, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n---\napiVersion: tidemesh.io/v1alpha1\nkind: Store\nmetadata: {name: sf01}\nspec: {region: us-west-2, zone: us-west-2a}\n---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: cart, namespace: retail}\nspec: {host: cart}\n";
        let cur = base();
        let p = plan_apply(&cur, parse_documents(file).expect("file"), false).expect("plan");
        assert_eq!(
            outcomes(&p),
            vec![
                ("DestinationRule retail/pos".into(), "configured"),
                ("Store sf01".into(), "unchanged"),
                ("DestinationRule retail/cart".into(), "created"),
            ]
        );
        assert_eq!(p.candidate, cur.apply_yaml(file).expect("apply"));
        let p = plan_apply(&cur, parse_documents(file).expect("file"), true).expect("plan");
        assert_eq!(
            outcomes(&p)[3..],
            [
                ("DestinationRule retail/inv".into(), "pruned"),
                ("Store sf02".into(), "pruned"),
            ]
        );
        assert!(p.candidate.stores.iter().all(|s| s.name == "sf01"));
        assert_eq!(p.candidate.destination_policies.len(), 3, "bank/pay stays");
        // the current config is untouched
        assert_eq!(cur, base());
    }

    #[test]
    fn prune_that_breaks_a_reference_is_refused_whole() {
        // a route in retail names subset v1 of pos: pruning pos (by applying
        // only retail/inv) must fail the checks, not half-apply
        let with_route = base()
            .apply_yaml("apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: pos, namespace: shop}\nspec: {hosts: [pos.retail], http: [{route: [{destination: {host: pos.retail, subset: v1}}]}]}\n")
            .expect("route");
        let file = parse_documents("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: inv, namespace: retail}\nspec: {host: inv}\n").expect("file");
        let e = plan_apply(&with_route, file, true).expect_err("refused");
        assert!(e.to_string().contains("subset v1"), "{e}");
        // and so is deleting it
        let pos = parse_key("DestinationRule", "retail/pos").expect("key");
        let e = plan_delete(&with_route, &[pos]).expect_err("refused");
        assert!(e.to_string().contains("subset v1"), "{e}");
    }

    #[test]
    fn delete_names_every_missing_object_and_changes_nothing() {
        let cur = base();
        let keys = [
            parse_key("destinationrule", "retail/inv").expect("key"),
            parse_key("Store", "sf09").expect("key"),
        ];
        let e = plan_delete(&cur, &keys).expect_err("missing");
        assert!(e.to_string().contains("Store sf09 does not exist"), "{e}");
        let p = plan_delete(&cur, &keys[..1]).expect("delete");
        assert_eq!(
            outcomes(&p),
            vec![("DestinationRule retail/inv".into(), "deleted")]
        );
        assert_eq!(p.candidate.destination_policies.len(), 2);
    }

    #[test]
    fn parse_key_checks_scope() {
        assert!(parse_key("VirtualService", "reviews").is_err());
        assert!(parse_key("Store", "a/b").is_err());
        assert!(parse_key("ModeMatrix", "x").is_err());
        assert!(parse_key("Deployment", "a/b").is_err());
        assert!(parse_key("VirtualService", "a/b/c").is_err());
        assert_eq!(
            parse_key("modematrix", "default").expect("key").to_string(),
            "ModeMatrix default"
        );
    }

    #[test]
    fn diff_shows_changed_lines_of_changed_objects_only() {
        let cur = base();
        let new = cur
            .apply_yaml("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: pos, namespace: retail}\nspec: {host: pos, subsets: [{name: v1, labels: {version: v9}}]}\n")
            .expect("apply");
        let d = diff_text(&cur, &new, "hub", "file");
        assert!(d.starts_with("diff DestinationRule retail/pos\n"), "{d}");
        assert!(d.contains("\n-      version: v1\n"), "{d}");
        assert!(d.contains("\n+      version: v9\n"), "{d}");
        assert!(!d.contains("inv"), "unchanged objects are not shown: {d}");
        assert_eq!(diff_text(&cur, &cur, "a", "b"), "");
        let removed = cur
            .without(&[parse_key("Store", "sf02").expect("key")])
            .expect("without");
        let d = diff_text(&cur, &removed, "hub", "file");
        assert!(
            d.contains("@@ -1,") && d.contains("+0,0 @@") && d.contains("-kind: Store"),
            "{d}"
        );
    }

    #[test]
    fn unified_hunks_have_context_and_counts() {
        let a = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n";
        let b = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n10\n";
        assert_eq!(
            unified(a, b, 3),
            "@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n"
        );
        assert_eq!(unified("", "x\n", 3), "@@ -0,0 +1,1 @@\n+x\n");
        assert_eq!(unified(a, a, 3), "");
    }
}
