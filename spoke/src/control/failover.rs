//! Which hub replica the control session dials: the addresses of
//! `hub = ["a:7443", "b:7443"]` in turn, starting from the last one a
//! session came up on.
//!
//! Driven by the session loop in `Spoke::run`: `current` before each
//! attempt, `handle_up` once a session is up, `handle_failure` after an
//! attempt failed. Sans-IO: no clock, no sockets, no sleeping; the caller
//! chooses the delay from what `handle_failure` returns. It must not
//! decide how long to wait: within a round the next replica is tried
//! after a short jitter, and once every address has failed since the last
//! good one the caller's exponential backoff ([`super::Backoff`]) applies,
//! so a spoke with N replicas waits no longer than one with a single hub.

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Another address of this round is left: try it after a short jitter.
    Quick,
    /// Every address failed since the round began: back off.
    Backoff,
}

/// The rotation over `n` hub addresses.
#[derive(Debug, Clone)]
pub(crate) struct Rotation {
    n: usize,
    current: usize,
    /// Where this round of attempts began (the last good address).
    round_start: usize,
}

impl Rotation {
    /// A rotation over `n` addresses (at least one), starting at the first.
    pub(crate) fn new(n: usize) -> Rotation {
        Rotation {
            n: n.max(1),
            current: 0,
            round_start: 0,
        }
    }

    /// The index of the address to dial now.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// A session came up on the current address: it is the last good one,
    /// and the next round of attempts starts there.
    pub(crate) fn handle_up(&mut self) {
        self.round_start = self.current;
    }

    /// An attempt on the current address failed: moves on to the next one.
    pub(crate) fn handle_failure(&mut self) -> Next {
        self.current = (self.current + 1) % self.n;
        if self.current == self.round_start {
            Next::Backoff
        } else {
            Next::Quick
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_always_backs_off() {
        let mut r = Rotation::new(1);
        for _ in 0..3 {
            assert_eq!(r.current(), 0);
            assert_eq!(r.handle_failure(), Next::Backoff);
        }
        assert_eq!(Rotation::new(0).handle_failure(), Next::Backoff);
    }

    #[test]
    fn replicas_are_tried_in_turn_from_the_last_good_one() {
        let mut r = Rotation::new(3);
        assert_eq!(r.current(), 0);
        assert_eq!(r.handle_failure(), Next::Quick);
        assert_eq!(r.current(), 1);
        assert_eq!(r.handle_failure(), Next::Quick);
        assert_eq!(r.current(), 2);
        // all three failed: back off, then start over at the first
        assert_eq!(r.handle_failure(), Next::Backoff);
        assert_eq!(r.current(), 0);
        assert_eq!(r.handle_failure(), Next::Quick);
        // a session comes up on the second: it stays there while it works
        r.handle_up();
        assert_eq!(r.current(), 1);
        // it is lost and the second fails: the third, then the first, then
        // back off before the second again
        assert_eq!(r.handle_failure(), Next::Quick);
        assert_eq!(r.current(), 2);
        assert_eq!(r.handle_failure(), Next::Quick);
        assert_eq!(r.current(), 0);
        assert_eq!(r.handle_failure(), Next::Backoff);
        assert_eq!(r.current(), 1);
    }
}
