//! What the control session must do next, with no I/O.
//!
//! What it is: the rules of a connected session's upkeep: renew the node
//! SVID at its renewal point (a fraction of its life, 0.5 by default),
//! renew the node CA at half its life (or get one when there is none),
//! refresh the time anchor on its interval, and after a failed attempt wait
//! the backoff the driver drew before trying again. Who drives it: the
//! session driver in `control/mod.rs` feeds it the facts (the time and the
//! validity of what is installed), performs the actions it polls out and
//! reports each result back. What it must not do: touch sockets, clocks,
//! randomness or the credential store; it sees times and validity windows
//! only, so the tests below run in virtual time without sleeping.

use std::time::{Duration, SystemTime};

/// The validity window of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Validity {
    /// The point `fraction` (clamped to 0.05..=0.95) into the window.
    pub fn at(&self, fraction: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(fraction.clamp(0.05, 0.95))
    }

    /// The window counted from `arrived` (when the certificate was
    /// obtained) when that is later than `not_before`.
    fn since(self, arrived: Option<SystemTime>) -> Validity {
        match arrived {
            Some(t) if t > self.not_before => Validity {
                not_before: t.min(self.not_after),
                not_after: self.not_after,
            },
            _ => self,
        }
    }
}

/// What is installed now.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The (trusted) time.
    pub now: SystemTime,
    /// The node SVID in force.
    pub node: Validity,
    /// The node CA in force, if any.
    pub node_ca: Option<Validity>,
}

/// Something the session must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Renew the node SVID (same key, a new certificate).
    RenewNode,
    /// Get a node CA (a new key each time).
    RenewNodeCa,
    /// Ask the hub for a time anchor.
    RefreshTime,
}

const ACTIONS: [Action; 3] = [Action::RenewNode, Action::RenewNodeCa, Action::RefreshTime];

impl Action {
    fn index(self) -> usize {
        match self {
            Action::RenewNode => 0,
            Action::RenewNodeCa => 1,
            Action::RefreshTime => 2,
        }
    }
}

/// The session's settings.
#[derive(Clone, Copy, Debug)]
pub struct PlanSettings {
    /// Where in its life the node SVID is renewed.
    pub renew_fraction: f64,
    /// How often the time anchor is refreshed.
    pub anchor_interval: Duration,
    /// The least time between two attempts of one action, so a certificate
    /// that is due again at once cannot make the session spin.
    pub min_gap: Duration,
}

/// The upkeep plan of one control session.
#[derive(Debug)]
pub struct Plan {
    settings: PlanSettings,
    /// Per action: not before this time (a backoff or the least gap).
    hold: [Option<SystemTime>; 3],
    /// When this session last renewed the node SVID and the node CA. The
    /// hub backdates `not_before` (60 s, for clock skew), so a window
    /// counted from `not_before` puts the renewal point of a short-lived
    /// certificate in the past the moment it arrives; counted from when it
    /// arrived, a 16 s SVID is renewed after 8 s, not every least gap.
    renewed: [Option<SystemTime>; 2],
    /// When the next time anchor is due.
    next_anchor: SystemTime,
}

impl Plan {
    /// A plan for a session that began at `now`, which anchored its time
    /// (or tried to) as it began.
    pub fn new(settings: PlanSettings, now: SystemTime) -> Plan {
        Plan {
            settings,
            hold: [None; 3],
            renewed: [None; 2],
            next_anchor: now + settings.anchor_interval,
        }
    }

    /// When `action` is due by the facts alone.
    fn due_at(&self, action: Action, f: &Facts) -> SystemTime {
        let due = match action {
            Action::RenewNode => f
                .node
                .since(self.renewed[0])
                .at(self.settings.renew_fraction),
            Action::RenewNodeCa => f
                .node_ca
                .map_or(f.now, |ca| ca.since(self.renewed[1]).at(0.5)),
            Action::RefreshTime => self.next_anchor,
        };
        match self.hold[action.index()] {
            Some(h) => due.max(h),
            None => due,
        }
    }

    /// The next action due now, in order (node SVID, node CA, time), or
    /// `None` when nothing is.
    pub fn poll_action(&self, f: &Facts) -> Option<Action> {
        ACTIONS.into_iter().find(|a| self.due_at(*a, f) <= f.now)
    }

    /// When to poll again (the earliest due time, never in the past).
    pub fn next_wake(&self, f: &Facts) -> SystemTime {
        ACTIONS
            .into_iter()
            .map(|a| self.due_at(a, f))
            .min()
            .unwrap_or(f.now)
            .max(f.now)
    }

    /// Reports an attempt of `action` at `now`: a success holds it for the
    /// least gap, a failure for `backoff` (the driver draws the jitter).
    pub fn handle_result(&mut self, action: Action, now: SystemTime, ok: bool, backoff: Duration) {
        let hold = if ok {
            self.settings.min_gap
        } else {
            backoff.max(self.settings.min_gap)
        };
        self.hold[action.index()] = Some(now + hold);
        if ok {
            match action {
                Action::RenewNode => self.renewed[0] = Some(now),
                Action::RenewNodeCa => self.renewed[1] = Some(now),
                Action::RefreshTime => {}
            }
        }
        if action == Action::RefreshTime {
            // a failed anchor is retried after the backoff, a good one
            // after the interval
            self.next_anchor = if ok {
                now + self.settings.anchor_interval
            } else {
                now + hold
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn settings() -> PlanSettings {
        PlanSettings {
            renew_fraction: 0.5,
            anchor_interval: Duration::from_secs(600),
            min_gap: Duration::from_millis(100),
        }
    }

    fn window(from: u64, life: Duration) -> Validity {
        Validity {
            not_before: t(from),
            not_after: t(from) + life,
        }
    }

    /// Runs the plan for `until` seconds of virtual time with `ok` deciding
    /// each attempt's fate, installing fresh certificates on success;
    /// returns the attempts made.
    fn run(
        until: u64,
        mut ok: impl FnMut(Action, SystemTime) -> bool,
    ) -> Vec<(Action, SystemTime, bool)> {
        let mut node = window(0, H);
        let mut ca = None;
        let mut plan = Plan::new(settings(), t(0));
        let mut now = t(0);
        let mut log = Vec::new();
        while now < t(until) {
            let f = Facts {
                now,
                node,
                node_ca: ca,
            };
            if let Some(a) = plan.poll_action(&f) {
                let good = ok(a, now);
                if good {
                    match a {
                        Action::RenewNode => {
                            node = Validity {
                                not_before: now,
                                not_after: now + H,
                            }
                        }
                        Action::RenewNodeCa => {
                            ca = Some(Validity {
                                not_before: now,
                                not_after: now + 30 * 24 * H,
                            })
                        }
                        Action::RefreshTime => {}
                    }
                }
                plan.handle_result(a, now, good, Duration::from_secs(5));
                log.push((a, now, good));
                assert!(log.len() < 100_000, "the plan spins");
                continue;
            }
            let wake = plan.next_wake(&f);
            assert!(wake > now, "nothing due yet the wake is now");
            now = wake;
        }
        log
    }

    #[test]
    fn renews_at_half_life_and_anchors_on_the_interval() {
        let log = run(4 * 3600, |_, _| true);
        let renewals: Vec<_> = log
            .iter()
            .filter(|(a, ..)| *a == Action::RenewNode)
            .map(|(_, at, _)| at.duration_since(t(0)).expect("after t0").as_secs())
            .collect();
        // a 1 h SVID renewed at half life: 30 min, then every 30 min
        assert_eq!(renewals, vec![1800, 3600, 5400, 7200, 9000, 10800, 12600]);
        // no node CA at the start: asked for at once, then not for 15 days
        let cas: Vec<_> = log
            .iter()
            .filter(|(a, ..)| *a == Action::RenewNodeCa)
            .collect();
        assert_eq!(cas.len(), 1);
        assert_eq!(cas[0].1, t(0));
        let anchors = log
            .iter()
            .filter(|(a, ..)| *a == Action::RefreshTime)
            .count();
        assert_eq!(anchors, 4 * 3600 / 600 - 1);
    }

    #[test]
    fn a_failure_waits_the_backoff_then_retries() {
        // the hub refuses renewals for the first 20 s after the renewal point
        let log = run(1900, |a, now| a != Action::RenewNode || now >= t(1820));
        let tries: Vec<_> = log
            .iter()
            .filter(|(a, ..)| *a == Action::RenewNode)
            .map(|(_, at, ok)| (at.duration_since(t(0)).expect("after t0").as_secs(), *ok))
            .collect();
        assert_eq!(
            tries,
            vec![
                (1800, false),
                (1805, false),
                (1810, false),
                (1815, false),
                (1820, true)
            ]
        );
    }

    #[test]
    fn a_certificate_due_again_at_once_cannot_make_it_spin() {
        // the hub "renews" with the same old certificate: by its window it
        // is due again at once; the plan retries halfway through what is
        // left each time, never closer than the least gap
        let mut plan = Plan::new(settings(), t(0));
        let node = window(0, H);
        let mut now = t(1800);
        let mut attempts = Vec::new();
        while now < t(3600) {
            let f = Facts {
                now,
                node,
                node_ca: Some(window(0, 30 * 24 * H)),
            };
            match plan.poll_action(&f) {
                Some(a) => {
                    if a == Action::RenewNode {
                        attempts.push(now);
                    }
                    plan.handle_result(a, now, true, Duration::from_secs(5));
                }
                None => now = plan.next_wake(&f),
            }
        }
        assert_eq!(attempts[0], t(1800));
        assert_eq!(attempts[1], t(2700), "{attempts:?}");
        assert!(
            (10..=25).contains(&attempts.len()),
            "{} attempts before expiry",
            attempts.len()
        );
        for w in attempts.windows(2) {
            assert!(w[1].duration_since(w[0]).expect("ordered") >= Duration::from_millis(100));
        }
    }

    #[test]
    fn a_short_backdated_svid_is_renewed_at_half_its_life_not_at_once() {
        // the hub backdates not_before by 60 s: a 16 s SVID's window is
        // 76 s long and its half-life point is in the past when it arrives
        let backdated = |now: SystemTime| Validity {
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(16),
        };
        let mut plan = Plan::new(settings(), t(0));
        let mut node = backdated(t(0));
        let ca = Some(window(0, 30 * 24 * H));
        let mut now = t(0);
        let mut renewals = Vec::new();
        while now < t(120) {
            let f = Facts {
                now,
                node,
                node_ca: ca,
            };
            match plan.poll_action(&f) {
                Some(a) => {
                    if a == Action::RenewNode {
                        renewals.push(now.duration_since(t(0)).expect("after t0").as_secs());
                        node = backdated(now);
                    }
                    plan.handle_result(a, now, true, Duration::from_secs(5));
                }
                None => now = plan.next_wake(&f),
            }
        }
        // at once (the session does not know when the first one came),
        // then every 8 s
        let want: Vec<u64> = (0..15).map(|i| i * 8).collect();
        assert_eq!(renewals, want);
    }

    #[test]
    fn node_ca_renewed_at_half_its_life() {
        let mut plan = Plan::new(settings(), t(0));
        let ca = window(0, 30 * 24 * H);
        let f = |now| Facts {
            now,
            node: window(0, 1000 * H),
            node_ca: Some(ca),
        };
        let half = t(15 * 24 * 3600);
        // only anchors until half life
        let mut now = t(0);
        while now < half {
            match plan.poll_action(&f(now)) {
                Some(Action::RefreshTime) => {
                    plan.handle_result(Action::RefreshTime, now, true, Duration::ZERO)
                }
                Some(other) => panic!("{other:?} before half life"),
                None => now = plan.next_wake(&f(now)).min(half),
            }
        }
        assert_eq!(plan.poll_action(&f(half)), Some(Action::RenewNodeCa));
    }
}
