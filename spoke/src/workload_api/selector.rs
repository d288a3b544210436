//! Workload selectors in SPIRE's syntax, and the rule that entitles a
//! caller to a workload's SVID.
//!
//! What it is: the parsed form of a `[[workload]]`'s `selectors` and the
//! match of a caller's attested facts against them; plain types, no I/O
//! (the facts are read by `attest`). Who drives it: the config parses
//! selectors once at load; the Workload API server asks [`entitled`] per
//! RPC. What it must not do: entitle a caller to a workload that declares
//! no selectors, or match on a fact that could not be read (an unknown
//! path or unit matches nothing).

use std::{fmt, path::PathBuf};

/// One selector, `type:key:value` as SPIRE writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `unix:uid:N`: the caller's user ID (from the socket's peer credentials).
    Uid(u32),
    /// `unix:gid:N`: the caller's primary group ID (peer credentials).
    Gid(u32),
    /// `unix:path:/abs/exe`: the caller's executable, as `/proc/PID/exe` names it.
    Path(PathBuf),
    /// `systemd:unit:NAME.service` (also `systemd:id:…`, SPIRE's spelling): the
    /// systemd unit whose cgroup the caller runs in.
    SystemdUnit(String),
}

/// The selector types this spoke understands, for error messages.
pub const SUPPORTED: &str =
    "unix:uid:N, unix:gid:N, unix:path:/absolute/exe, systemd:unit:NAME (or systemd:id:NAME)";

impl Selector {
    /// Parses `type:key:value`.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(ty), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("expected type:key:value, one of {SUPPORTED}"));
        };
        if value.is_empty() {
            return Err("the value is empty".into());
        }
        let number = |what: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{what} {value:?} is not a number from 0 to 4294967295"))
        };
        match (ty, key) {
            ("unix", "uid") => number("uid").map(Selector::Uid),
            ("unix", "gid") => number("gid").map(Selector::Gid),
            ("unix", "path") => {
                if !value.starts_with('/') {
                    return Err(format!("path {value:?} must be absolute"));
                }
                Ok(Selector::Path(PathBuf::from(value)))
            }
            ("systemd", "unit" | "id") => {
                if value.contains('/') || value.chars().any(char::is_whitespace) {
                    return Err(format!("unit {value:?} is not a unit name"));
                }
                Ok(Selector::SystemdUnit(value.to_owned()))
            }
            _ => Err(format!(
                "unsupported selector {ty}:{key}: this spoke attests {SUPPORTED}"
            )),
        }
    }

    /// Whether the caller's facts satisfy this selector.
    pub fn matches(&self, c: &Caller) -> bool {
        match self {
            Selector::Uid(u) => c.uid == *u,
            Selector::Gid(g) => c.gid == *g,
            Selector::Path(p) => c.path.as_ref() == Some(p),
            Selector::SystemdUnit(u) => c.unit.as_deref() == Some(u.as_str()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(u) => write!(f, "unix:uid:{u}"),
            Selector::Gid(g) => write!(f, "unix:gid:{g}"),
            Selector::Path(p) => write!(f, "unix:path:{}", p.display()),
            Selector::SystemdUnit(u) => write!(f, "systemd:unit:{u}"),
        }
    }
}

impl TryFrom<String> for Selector {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Selector::parse(&s).map_err(|e| format!("selector {s:?}: {e}"))
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Selector::try_from(s).map_err(serde::de::Error::custom)
    }
}

/// What is known of a caller of the Workload API: its peer credentials
/// (kernel-provided at connect time) and, when they could be read, its
/// executable and systemd unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Process ID (0 when the kernel could not name it in our namespace).
    pub pid: i32,
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// `/proc/PID/exe`, if readable.
    pub path: Option<PathBuf>,
    /// The systemd unit from `/proc/PID/cgroup`, if any.
    pub unit: Option<String>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)?;
        match &self.path {
            Some(p) => write!(f, " path {}", p.display())?,
            None => write!(f, " path unknown")?,
        }
        match &self.unit {
            Some(u) => write!(f, " unit {u}"),
            None => write!(f, " no systemd unit"),
        }
    }
}

/// The indices of the workloads (in config order) whose selectors the
/// caller all satisfies; a workload with no selectors is never handed out.
/// A caller matching several gets all of them, the first in config order
/// first (its default SVID), as SPIRE does.
pub fn entitled<'a>(
    workloads: impl IntoIterator<Item = &'a [Selector]>,
    caller: &Caller,
) -> Vec<usize> {
    workloads
        .into_iter()
        .enumerate()
        .filter(|(_, sel)| !sel.is_empty() && sel.iter().all(|s| s.matches(caller)))
        .map(|(i, _)| i)
        .collect()
}

/// The systemd unit a process runs in, from the text of its
/// `/proc/PID/cgroup`: in the unified (v2) hierarchy, or the `name=systemd`
/// one (v1), the FIRST path component under the root that names a unit
/// (`.service` or `.scope`; slices above it are skipped: a process of a
/// login session reports its session scope, e.g. `session-3.scope`).
/// `None` when there is none (a container's own cgroup, the root) and for
/// any path through a user manager (`user@UID.service`): that subtree is
/// delegated to the user, who names its units freely, so a unit there
/// (`.../user@1000.service/app.slice/pos.service`) proves nothing.
/// Sub-cgroups below the unit (a service's own delegated tree) do not
/// change the answer.
pub fn unit_from_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        (controllers.is_empty() || controllers == "name=systemd").then_some(path)
    })?;
    if path.split('/').any(|c| c.starts_with("user@")) {
        return None;
    }
    path.split('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller {
            pid: 42,
            uid: 1000,
            gid: 1000,
            path: Some("/usr/bin/pos".into()),
            unit: Some("pos.service".into()),
        }
    }

    #[test]
    fn selectors_parse_print_and_refuse_what_they_cannot_attest() {
        for s in [
            "unix:uid:1000",
            "unix:gid:0",
            "unix:path:/usr/bin/pos",
            "systemd:unit:pos.service",
        ] {
            assert_eq!(Selector::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            Selector::parse("systemd:id:pos.service").unwrap(),
            Selector::SystemdUnit("pos.service".into())
        );
        // a path may contain ':'
        assert_eq!(
            Selector::parse("unix:path:/opt/a:b").unwrap(),
            Selector::Path("/opt/a:b".into())
        );
        for (bad, why) in [
            ("unix:uid:-1", "not a number"),
            ("unix:uid:", "empty"),
            ("unix:user:pos", "unsupported selector unix:user"),
            ("k8s:ns:default", "unsupported selector k8s:ns"),
            ("unix:path:bin/pos", "must be absolute"),
            ("systemd:unit:a/b", "not a unit name"),
            ("uid", "expected type:key:value"),
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn every_selector_of_a_workload_must_match_and_none_means_never() {
        let sel = |v: &[&str]| -> Vec<Selector> {
            v.iter().map(|s| Selector::parse(s).unwrap()).collect()
        };
        let workloads = [
            sel(&["unix:uid:1000", "unix:path:/usr/bin/pos"]),
            sel(&[]),
            sel(&["unix:uid:1000", "systemd:unit:other.service"]),
            sel(&["unix:gid:1000"]),
            sel(&["systemd:unit:pos.service"]),
        ];
        let refs = || workloads.iter().map(Vec::as_slice);
        assert_eq!(entitled(refs(), &caller()), vec![0, 3, 4]);
        // facts that could not be read match nothing
        let blind = Caller {
            path: None,
            unit: None,
            ..caller()
        };
        assert_eq!(entitled(refs(), &blind), vec![3]);
        let stranger = Caller {
            uid: 65534,
            gid: 65534,
            ..blind
        };
        assert!(entitled(refs(), &stranger).is_empty());
    }

    #[test]
    fn the_unit_comes_from_the_cgroup_file() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/pos.service\n").as_deref(),
            Some("pos.service")
        );
        // the first unit under the root: a service's own sub-cgroups, or a
        // unit-like name it gives them, do not change it
        assert_eq!(
            unit_from_cgroup("0::/system.slice/pos.service/worker/fake.service\n").as_deref(),
            Some("pos.service")
        );
        assert_eq!(
            unit_from_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n").as_deref(),
            Some("session-3.scope")
        );
        // a user manager's subtree is the user's to name: nothing matches
        for text in [
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/pos.service\n",
            "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n",
            "1:name=systemd:/user.slice/user-1000.slice/user@1000.service/app.slice/pos.service\n",
            "12:cpu,cpuacct:/\n1:name=systemd:/user.slice/user-1000.slice/user@1000.service/pos.service\n",
        ] {
            assert_eq!(unit_from_cgroup(text), None, "{text}");
        }
        // cgroup v1: the name=systemd hierarchy
        assert_eq!(
            unit_from_cgroup("12:cpu,cpuacct:/\n1:name=systemd:/system.slice/pos.service\n")
                .as_deref(),
            Some("pos.service")
        );
        // a container or a process outside any unit
        assert_eq!(unit_from_cgroup("0::/\n"), None);
        assert_eq!(unit_from_cgroup("0::/docker/0123abcd\n"), None);
        assert_eq!(unit_from_cgroup(""), None);
    }
}
