//! The error of the config surface: parsing documents and applying them.
//!
//! What it is: [`ConfigError`], a list of [`ConfigIssue`]s, each naming the
//! document (position in the file, kind and name), the field path inside it
//! and the reason, e.g.
//! `document 2 (VirtualService reviews-canary): spec.http[0].route[1].weight:
//! weights of a route must sum to 100, got 110`. Who produces it:
//! [`crate::istio::parse_documents`] and [`crate::MeshConfig::apply`]; the
//! hub prints it to the operator. What it must not do: stop at the first
//! problem when more can be found (validation collects every issue it can,
//! up to [`MAX_ISSUES`]).

use std::fmt;

/// At most this many issues are kept; the rest are counted.
pub const MAX_ISSUES: usize = 100;

/// Which document an issue is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentRef {
    /// 1-based position of the document in the input (`None` for an object
    /// applied earlier, not part of this input).
    pub index: Option<usize>,
    /// `kind`, when it could be read.
    pub kind: Option<String>,
    /// `metadata.namespace`, when given.
    pub namespace: Option<String>,
    /// `metadata.name`, when it could be read.
    pub name: Option<String>,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match (&self.kind, &self.name) {
            (Some(k), Some(n)) => Some(format!("{k} {n}")),
            (Some(k), None) => Some(k.clone()),
            (None, Some(n)) => Some(n.clone()),
            (None, None) => None,
        };
        match (self.index, label) {
            (Some(i), Some(l)) => write!(f, "document {i} ({l})"),
            (Some(i), None) => write!(f, "document {i}"),
            (None, Some(l)) => match &self.namespace {
                Some(ns) => write!(f, "{l} in namespace {ns} (already applied)"),
                None => write!(f, "{l} (already applied)"),
            },
            (None, None) => write!(f, "config"),
        }
    }
}

/// One problem found in the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The document it is in (`None` for the input as a whole, e.g. a YAML
    /// syntax error before the first document could be read).
    pub document: Option<DocumentRef>,
    /// Field path inside the document (`spec.http[0].route[1].weight`);
    /// empty when the issue is about the document as a whole.
    pub path: String,
    /// What is wrong and, where possible, what to write instead.
    pub reason: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.document {
            write!(f, "{d}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.reason)
    }
}

/// Why a config input was rejected. Nothing was applied.
///
/// `Display` prints the first issue on one line, or a count followed by one
/// issue per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    issues: Vec<ConfigIssue>,
    /// Issues found beyond [`MAX_ISSUES`].
    more: usize,
}

impl ConfigError {
    /// An error with the given issues (at least one).
    pub fn new(issues: Vec<ConfigIssue>) -> ConfigError {
        let mut e = ConfigError {
            issues: Vec::new(),
            more: 0,
        };
        for i in issues {
            e.push(i);
        }
        e
    }

    /// An error with one issue.
    pub fn single(
        document: Option<DocumentRef>,
        path: impl Into<String>,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::new(vec![ConfigIssue {
            document,
            path: path.into(),
            reason: reason.into(),
        }])
    }

    /// Every issue kept, in input order.
    pub fn issues(&self) -> &[ConfigIssue] {
        &self.issues
    }

    /// The first issue.
    pub fn first(&self) -> Option<&ConfigIssue> {
        self.issues.first()
    }

    /// Number of issues found, including those beyond [`MAX_ISSUES`].
    pub fn count(&self) -> usize {
        self.issues.len() + self.more
    }

    pub(crate) fn push(&mut self, issue: ConfigIssue) {
        if self.issues.len() < MAX_ISSUES {
            self.issues.push(issue);
        } else {
            self.more += 1;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.issues.is_empty() && self.more == 0
    }

    pub(crate) fn empty() -> ConfigError {
        ConfigError {
            issues: Vec::new(),
            more: 0,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.issues.as_slice() {
            [] => f.write_str("invalid config"),
            [one] if self.more == 0 => write!(f, "{one}"),
            many => {
                write!(
                    f,
                    "{} problems in the config; nothing was applied:",
                    self.count()
                )?;
                for i in many {
                    write!(f, "\n  {i}")?;
                }
                if self.more > 0 {
                    write!(f, "\n  … and {} more", self.more)?;
                }
                Ok(())
            }
        }
    }
}

/// Collects issues for one document, with a path prefix.
pub(crate) struct Issues<'a> {
    pub(crate) doc: &'a Option<DocumentRef>,
    pub(crate) out: &'a mut ConfigError,
}

impl Issues<'_> {
    pub(crate) fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.out.push(ConfigIssue {
            document: self.doc.clone(),
            path: path.into(),
            reason: reason.into(),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn display_names_document_field_and_reason() {
        let e = ConfigError::single(
            Some(DocumentRef {
                index: Some(2),
                kind: Some("VirtualService".into()),
                namespace: None,
                name: Some("reviews-canary".into()),
            }),
            "spec.http[0].route[1].weight",
            "weights of a route must sum to 100, got 110",
        );
        assert_eq!(
            e.to_string(),
            "document 2 (VirtualService reviews-canary): spec.http[0].route[1].weight: weights of a route must sum to 100, got 110"
        );
    }

    #[test]
    fn many_issues_are_listed_and_capped() {
        let issues = (0..150)
            .map(|i| ConfigIssue {
                document: None,
                path: format!("spec.x[{i}]"),
                reason: "bad".into(),
            })
            .collect();
        let e = ConfigError::new(issues);
        assert_eq!(e.count(), 150);
        assert_eq!(e.issues().len(), MAX_ISSUES);
        let s = e.to_string();
        assert!(s.starts_with("150 problems in the config; nothing was applied:"));
        assert!(s.ends_with("… and 50 more"));
    }
}
