//! The config-sync core, with no I/O: what the hub answers to a spoke's
//! long poll, and what the spoke does with the answer. The hub and spoke
//! drivers call exactly these functions; the property test below drives them
//! through random schedules of applies, partitions, lost messages and
//! restarts to show that every connected spoke converges on the latest
//! version.
//!
//! The protocol: the spoke polls with the version it has applied (`None`
//! before its first); the hub answers at once with its newest version when
//! that differs from the spoke's, or holds the poll until a new version is
//! made (or a timeout, after which it answers "unchanged"). Versions only
//! grow, and a rollback is a new version, so "differs" is the whole rule:
//! no ordering of versions is needed on the spoke.

/// What the hub does with a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubAnswer {
    /// Send this version's slice now.
    Send(u64),
    /// Hold the poll until the newest version changes (or it times out).
    Wait,
}

/// The hub's rule: `latest` is its newest version (0: none yet).
pub fn hub_answer(latest: u64, have: Option<u64>) -> HubAnswer {
    if latest > 0 && have != Some(latest) {
        HubAnswer::Send(latest)
    } else {
        HubAnswer::Wait
    }
}

/// The same rule over the registry generation, which moves on its own (a
/// spoke at the same site registers or changes health): send when either
/// differs.
pub fn hub_answer_with_registry(
    latest: u64,
    registry: u64,
    have: Option<u64>,
    have_registry: u64,
) -> HubAnswer {
    match hub_answer(latest, have) {
        HubAnswer::Wait if latest > 0 && registry != have_registry => HubAnswer::Send(latest),
        other => other,
    }
}

/// The spoke's side: the version it has applied (its last-known-good).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpokeSync {
    /// The applied version.
    pub have: Option<u64>,
    /// The registry generation of the applied slice.
    pub have_registry: u64,
}

impl SpokeSync {
    /// The `have` to send in the next poll.
    pub fn poll(&self) -> Option<u64> {
        self.have
    }

    /// A version arrived and was validated and stored: it is now applied.
    /// A stale answer (for a poll sent before a newer version was applied on
    /// another connection) is ignored only if it is the version we have.
    pub fn handle_config(&mut self, version: u64, registry: u64) -> bool {
        if self.have == Some(version) && self.have_registry == registry {
            return false;
        }
        self.have = Some(version);
        self.have_registry = registry;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Event {
        Apply,
        Rollback,
        Cut(usize),
        Heal(usize),
        Restart(usize),
        Deliver(usize),
        Drop(usize),
        Timeout(usize),
    }

    fn event(n: usize) -> impl Strategy<Value = Event> {
        prop_oneof![
            2 => Just(Event::Apply),
            1 => Just(Event::Rollback),
            1 => (0..n).prop_map(Event::Cut),
            1 => (0..n).prop_map(Event::Heal),
            1 => (0..n).prop_map(Event::Restart),
            4 => (0..n).prop_map(Event::Deliver),
            1 => (0..n).prop_map(Event::Drop),
            1 => (0..n).prop_map(Event::Timeout),
        ]
    }

    /// One spoke's view: its sync state (persisted: survives restarts), its
    /// link, and the poll or answer in flight on its connection.
    #[derive(Debug, Default, Clone)]
    struct SimSpoke {
        sync: SpokeSync,
        cut: bool,
        /// A poll the hub holds (its `have`).
        held: Option<Option<u64>>,
        /// An answer on its way to the spoke.
        answer: Option<Option<u64>>,
    }

    /// Runs the hub's rule for a spoke's poll.
    fn hub_handle(latest: u64, s: &mut SimSpoke, have: Option<u64>) {
        match hub_answer(latest, have) {
            HubAnswer::Send(v) => s.answer = Some(Some(v)),
            HubAnswer::Wait => s.held = Some(have),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn connected_spokes_converge_after_any_schedule(
            events in proptest::collection::vec(event(4), 0..200),
        ) {
            let n = 4;
            let mut latest = 0u64;
            let mut spokes = vec![SimSpoke::default(); n];
            // every spoke starts with a poll held at the hub
            for s in spokes.iter_mut() {
                let have = s.sync.poll();
                hub_handle(latest, s, have);
            }
            for e in events {
                match e {
                    Event::Apply | Event::Rollback => {
                        latest += 1;
                        // the hub wakes every held poll of a connected spoke
                        for s in spokes.iter_mut().filter(|s| !s.cut) {
                            if let Some(have) = s.held.take() {
                                hub_handle(latest, s, have);
                            }
                        }
                    }
                    Event::Cut(i) => {
                        // the connection dies: whatever was in flight is lost
                        let s = &mut spokes[i];
                        s.cut = true;
                        s.held = None;
                        s.answer = None;
                    }
                    Event::Heal(i) | Event::Restart(i) => {
                        // a new session: the spoke polls with what it has (a
                        // restart reloads the same persisted version)
                        let s = &mut spokes[i];
                        s.cut = false;
                        s.held = None;
                        s.answer = None;
                        let have = s.sync.poll();
                        hub_handle(latest, s, have);
                    }
                    Event::Deliver(i) => {
                        let s = &mut spokes[i];
                        if let Some(Some(v)) = s.answer.take() {
                            s.sync.handle_config(v, 0);
                            let have = s.sync.poll();
                            hub_handle(latest, s, have);
                        }
                    }
                    Event::Drop(i) => {
                        // a lost answer kills the stream; the session's
                        // request times out and the spoke reconnects
                        let s = &mut spokes[i];
                        if s.answer.take().is_some() {
                            s.cut = true;
                        }
                    }
                    Event::Timeout(i) => {
                        let s = &mut spokes[i];
                        if !s.cut {
                            if let Some(have) = s.held.take() {
                                // "unchanged", and the spoke polls again
                                let have2 = s.sync.poll();
                                prop_assert_eq!(have, have2);
                                hub_handle(latest, s, have2);
                            }
                        }
                    }
                }
            }
            // heal everything and let the messages flow
            for s in spokes.iter_mut() {
                if s.cut {
                    s.cut = false;
                    let have = s.sync.poll();
                    hub_handle(latest, s, have);
                }
            }
            for _ in 0..3 {
                for s in spokes.iter_mut() {
                    if let Some(Some(v)) = s.answer.take() {
                        s.sync.handle_config(v, 0);
                        let have = s.sync.poll();
                        hub_handle(latest, s, have);
                    }
                }
            }
            for s in &spokes {
                if latest > 0 {
                    prop_assert_eq!(s.sync.have, Some(latest));
                    prop_assert!(s.held.is_some(), "every spoke ends with a poll held at the hub");
                } else {
                    prop_assert_eq!(s.sync.have, None);
                }
            }
        }
    }
}
