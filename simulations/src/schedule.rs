//! Schedule files: impairment changes at fixed times after the relay starts.
//!
//! ```text
//! # time  [direction up|down|both]  heal | blackout | IMPAIRMENT...
//! 0s      delay 50ms loss 1%
//! 30s     blackout
//! 90s     heal
//! 100s    direction up blackout
//! 2m      direction down delay 200ms 50ms distribution normal
//! ```
//!
//! One change per line. `#` starts a comment; blank lines are ignored. A line whose
//! action is exactly `heal` or `blackout` is that control command (blackout keeps the
//! other settings, heal clears everything); any other tokens replace the impairment of
//! the direction(s), exactly like `ctl set`. Without `direction`, a line applies to both
//! directions. Entries run in time order (lines with equal times in file order).
//! Parsing is the whole job of this module; the relay driver runs the entries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::action::Action;
use crate::impairment::units::{self, ValueError};
use crate::impairment::{Direction, Impairment, ImpairmentError};

/// One scheduled change.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleEntry {
    /// When, counted from the relay's start.
    pub at: Duration,
    /// What changes.
    pub action: Action,
    /// The 1-based line it came from.
    pub line: usize,
}

/// Impairment changes in time order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schedule {
    entries: Vec<ScheduleEntry>,
}

/// What is wrong with one schedule line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    /// The first token is not a time.
    #[error("time: {0}")]
    Time(ValueError),
    /// `direction` has a bad or missing value.
    #[error("direction: {0}")]
    Direction(ValueError),
    /// Nothing follows the time.
    #[error("missing action after the time (heal, blackout or impairment tokens)")]
    MissingAction,
    /// The impairment tokens are invalid.
    #[error("{0}")]
    Impairment(ImpairmentError),
}

/// A schedule that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The file could not be read.
    #[error("cannot read schedule {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// A line is invalid.
    #[error("schedule line {line} `{text}`: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The line, trimmed.
        text: String,
        /// What is wrong.
        reason: LineError,
    },
}

impl Schedule {
    /// No entries.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses schedule text; the error names the first bad line.
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        let mut entries = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let entry = parse_line(content, line).map_err(|reason| ScheduleError::Line {
                line,
                text: raw.trim().to_owned(),
                reason,
            })?;
            entries.push(entry);
        }
        // Stable: equal times keep file order.
        entries.sort_by_key(|e| e.at);
        Ok(Self { entries })
    }

    /// Reads and parses a schedule file.
    pub fn from_file(path: &Path) -> Result<Self, ScheduleError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ScheduleError::Read {
            path: path.to_owned(),
            reason,
        })?;
        Self::parse(&text)
    }

    /// The entries, in time order.
    pub fn entries(&self) -> &[ScheduleEntry] {
        &self.entries
    }

    /// True if there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn parse_line(content: &str, line: usize) -> Result<ScheduleEntry, LineError> {
    let words: Vec<&str> = content.split_whitespace().collect();
    let Some((time, mut tokens)) = words.split_first() else {
        return Err(LineError::MissingAction);
    };
    let at = units::parse_duration(time).map_err(LineError::Time)?;
    let mut direction = Direction::Both;
    if let Some((keyword, rest)) = tokens.split_first() {
        if keyword.eq_ignore_ascii_case("direction") {
            let (value, rest) = rest.split_first().ok_or_else(|| {
                LineError::Direction(ValueError::invalid("direction", "", "up, down or both"))
            })?;
            direction = value.parse().map_err(LineError::Direction)?;
            tokens = rest;
        }
    }
    let action = match tokens {
        [] => return Err(LineError::MissingAction),
        [word] if word.eq_ignore_ascii_case("heal") => Action::Heal { direction },
        [word] if word.eq_ignore_ascii_case("blackout") => Action::Blackout { direction },
        tokens => Action::Set {
            direction,
            impairment: Impairment::parse_args(tokens).map_err(LineError::Impairment)?,
        },
    };
    Ok(ScheduleEntry { at, action, line })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(text: &str) -> Impairment {
        text.parse().expect("valid impairment")
    }

    #[test]
    fn parses_the_documented_example() {
        let text = "\
# warm-up
0s delay 50ms loss 1%

30s blackout      # partition
90s heal
100s direction up blackout
2m direction down delay 200ms 50ms distribution normal
";
        let schedule = Schedule::parse(text).expect("valid");
        let got: Vec<(Duration, Action, usize)> = schedule
            .entries()
            .iter()
            .map(|e| (e.at, e.action.clone(), e.line))
            .collect();
        let both = Direction::Both;
        assert_eq!(
            got,
            vec![
                (
                    Duration::ZERO,
                    Action::Set {
                        direction: both,
                        impairment: imp("delay 50ms loss 1%")
                    },
                    2
                ),
                (
                    Duration::from_secs(30),
                    Action::Blackout { direction: both },
                    4
                ),
                (Duration::from_secs(90), Action::Heal { direction: both }, 5),
                (
                    Duration::from_secs(100),
                    Action::Blackout {
                        direction: Direction::Up
                    },
                    6
                ),
                (
                    Duration::from_secs(120),
                    Action::Set {
                        direction: Direction::Down,
                        impairment: imp("delay 200ms 50ms distribution normal")
                    },
                    7
                ),
            ]
        );
    }

    #[test]
    fn entries_are_sorted_stably() {
        let schedule = Schedule::parse("2s heal\n1s blackout\n2s delay 1ms\n").expect("valid");
        let lines: Vec<usize> = schedule.entries().iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 1, 3]);
    }

    #[test]
    fn blackout_with_more_tokens_is_a_set() {
        let schedule = Schedule::parse("1s blackout delay 5ms").expect("valid");
        assert_eq!(
            schedule.entries()[0].action,
            Action::Set {
                direction: Direction::Both,
                impairment: imp("delay 5ms blackout")
            }
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "0s delay 5ms\nsoon heal\n",
                2,
                "time: invalid duration `soon`",
            ),
            ("# c\n\n5s\n", 3, "missing action"),
            (
                "5s direction sideways heal",
                1,
                "direction: invalid direction `sideways`",
            ),
            ("5s direction", 1, "direction"),
            (
                "1s heal\n2s delay 5ms blaakout\n",
                2,
                "unknown impairment keyword `blaakout`",
            ),
            ("1s loss 200%", 1, "out of range"),
            ("2h heal", 1, "at most 1 hour"),
        ];
        for (text, line, reason) in cases {
            let err = Schedule::parse(text).expect_err(text);
            let message = err.to_string();
            assert!(
                matches!(err, ScheduleError::Line { line: l, .. } if l == line),
                "{text:?}: {message}"
            );
            assert!(
                message.starts_with(&format!("schedule line {line} ")),
                "{message}"
            );
            assert!(
                message.contains(reason),
                "{text:?}: {message:?} lacks {reason:?}"
            );
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Schedule::from_file(Path::new("/nonexistent/plan.txt")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/plan.txt"));
    }
}
