//! The verbs that change a running relay: set, blackout, heal.
//!
//! Shared by the library handle, the control socket and the schedule file, so all three
//! mean the same thing. [`Action::apply`] is the whole rule, as a pure function from the
//! current impairment of a direction to the next one.

use serde::{Deserialize, Serialize};

use crate::impairment::{Direction, Impairment};

/// A change to the impairments of a running relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Action {
    /// Replace the impairment of `direction` with `impairment` (anything not given is
    /// cleared, as `tc qdisc change` does).
    Set {
        /// Which direction(s).
        #[serde(default)]
        direction: Direction,
        /// The new impairment.
        impairment: Impairment,
    },
    /// Drop everything in `direction`. The other settings of the direction stay (and
    /// show in stats); `heal` clears them together with the blackout.
    Blackout {
        /// Which direction(s).
        #[serde(default)]
        direction: Direction,
    },
    /// Remove every impairment of `direction`, blackout included.
    Heal {
        /// Which direction(s).
        #[serde(default)]
        direction: Direction,
    },
}

impl Action {
    /// The direction(s) this action changes.
    pub fn direction(&self) -> Direction {
        match self {
            Action::Set { direction, .. }
            | Action::Blackout { direction }
            | Action::Heal { direction } => *direction,
        }
    }

    /// The impairment a direction has after this action, given the one it had.
    pub fn apply(&self, current: &Impairment) -> Impairment {
        match self {
            Action::Set { impairment, .. } => impairment.clone(),
            Action::Blackout { .. } => Impairment {
                blackout: true,
                ..current.clone()
            },
            Action::Heal { .. } => Impairment::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(text: &str) -> Impairment {
        text.parse().expect("valid impairment")
    }

    #[test]
    fn set_replaces_blackout_keeps_heal_clears() {
        let current = imp("delay 50ms loss 1%");
        let set = Action::Set {
            direction: Direction::Up,
            impairment: imp("rate 1mbit"),
        };
        assert_eq!(set.apply(&current), imp("rate 1mbit"));
        let blackout = Action::Blackout {
            direction: Direction::Both,
        };
        assert_eq!(blackout.apply(&current), imp("delay 50ms loss 1% blackout"));
        let heal = Action::Heal {
            direction: Direction::Down,
        };
        assert_eq!(heal.apply(&current), Impairment::none());
        assert_eq!(heal.direction(), Direction::Down);
    }

    #[test]
    fn json_form() {
        let action: Action =
            serde_json::from_str(r#"{"cmd":"set","direction":"up","impairment":"delay 5ms"}"#)
                .expect("valid");
        assert_eq!(
            action,
            Action::Set {
                direction: Direction::Up,
                impairment: imp("delay 5ms")
            }
        );
        let action: Action = serde_json::from_str(r#"{"cmd":"heal"}"#).expect("valid");
        assert_eq!(
            action,
            Action::Heal {
                direction: Direction::Both
            }
        );
    }
}
