//! Readiness: whether this spoke can serve its store now (`GET /readyz`,
//! `tidemesh-spoke healthcheck`, systemd's `READY=1`).
//!
//! A spoke is ready when it has started (listeners bound, evidence buffer
//! open), holds a config in force (the last-known-good), and the
//! certificate its data plane serves from is valid: the node CA, which
//! issues the workload and tunnel SVIDs offline too (or the node SVID when
//! the hub issued no node CA). Reaching the hub is deliberately not a
//! condition: a spoke serving from its cache during a hub outage is doing
//! its job, and a load balancer or systemd must not take it out.
//!
//! Who drives it: the metrics listener and the notify task in
//! [`crate::Spoke::run`]. What it must not do: touch the network or disk:
//! [`readiness`] is a plain function of what it is handed, time included.

use std::time::SystemTime;

use tidemesh_net::metrics::Readiness;

use crate::State;

/// What readiness is decided from.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Now (trusted time).
    pub now: SystemTime,
    /// `run` has bound its listeners and opened the evidence buffer.
    pub started: bool,
    /// The spoke's state.
    pub state: State,
    /// The version of the config in force (`None`: none yet).
    pub config_version: Option<u64>,
    /// Expiry of the node SVID.
    pub node_not_after: SystemTime,
    /// Expiry of the node CA, if the spoke holds one.
    pub node_ca_not_after: Option<SystemTime>,
}

fn at(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Ready or not, and why (one line).
pub fn readiness(f: &Facts) -> Readiness {
    if !f.started {
        return Readiness::not_ready("starting: listeners and evidence buffer not open yet");
    }
    if f.state == State::Revoked {
        return Readiness::not_ready("revoked by the hub: enroll again with a new join token");
    }
    let Some(version) = f.config_version else {
        return Readiness::not_ready(
            "waiting for the first config from the hub (no last-known-good config yet)",
        );
    };
    let (what, until) = match f.node_ca_not_after {
        Some(t) => ("node CA", t),
        None => ("node SVID", f.node_not_after),
    };
    if until <= f.now {
        let fix = if f.state == State::NeedsEnrollment {
            "enroll again with a new join token"
        } else {
            "it is renewed when the hub is reachable"
        };
        return Readiness::not_ready(format!("{what} expired at {}: {fix}", at(until)));
    }
    let hub = match f.state {
        State::Connected => "hub connected",
        _ => "hub unreachable, serving from the cache",
    };
    Readiness::ready(format!(
        "ready: config version {version}, {what} valid until {}, {hub}",
        at(until)
    ))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn facts() -> Facts {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Facts {
            now,
            started: true,
            state: State::Connected,
            config_version: Some(3),
            node_not_after: now + Duration::from_secs(3600),
            node_ca_not_after: Some(now + Duration::from_secs(30 * 86_400)),
        }
    }

    #[test]
    fn ready_with_config_and_a_valid_node_ca_hub_or_not() {
        let r = readiness(&facts());
        assert!(r.ready, "{r:?}");
        assert!(r.reason.contains("config version 3"), "{r:?}");
        assert!(r.reason.contains("node CA valid until"), "{r:?}");
        for state in [State::Disconnected, State::Connecting] {
            let r = readiness(&Facts { state, ..facts() });
            assert!(r.ready, "{state:?}: {r:?}");
            assert!(r.reason.contains("hub unreachable"), "{r:?}");
        }
        // the node SVID ran out during a long outage: the node CA still
        // issues what the data plane serves with
        let f = facts();
        let r = readiness(&Facts {
            state: State::Disconnected,
            node_not_after: f.now - Duration::from_secs(1),
            ..f
        });
        assert!(r.ready, "{r:?}");
    }

    #[test]
    fn not_ready_before_start_config_or_with_expired_certificates() {
        let r = readiness(&Facts {
            started: false,
            ..facts()
        });
        assert!(!r.ready && r.reason.starts_with("starting"), "{r:?}");
        let r = readiness(&Facts {
            config_version: None,
            ..facts()
        });
        assert!(!r.ready && r.reason.contains("first config"), "{r:?}");
        let r = readiness(&Facts {
            state: State::Revoked,
            ..facts()
        });
        assert!(!r.ready && r.reason.contains("revoked"), "{r:?}");
        let f = facts();
        let r = readiness(&Facts {
            node_ca_not_after: Some(f.now),
            state: State::Disconnected,
            ..f.clone()
        });
        assert!(!r.ready && r.reason.contains("node CA expired"), "{r:?}");
        let r = readiness(&Facts {
            node_ca_not_after: None,
            node_not_after: f.now - Duration::from_secs(5),
            state: State::NeedsEnrollment,
            ..f
        });
        assert!(!r.ready, "{r:?}");
        assert!(r.reason.contains("node SVID expired"), "{r:?}");
        assert!(r.reason.contains("new join token"), "{r:?}");
        assert!(!r.reason.contains('\n'));
    }
}
