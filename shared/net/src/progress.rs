//! Progress on a terminal for long-running commands (`tidemesh-spoke drill
//! load`, `evidence verify` on both binaries, the backlog view of
//! `tidemesh-spoke status --watch`): one line on stderr, redrawn in place.
//!
//! Who drives it: the binaries' command handlers; the line's text comes from
//! the plain formatters here ([`bar`], [`eta`], [`counted`], [`drain`]),
//! which take figures and elapsed time as arguments so they are tested
//! without a terminal or a clock. What it must not do: write anything when
//! stderr is not a terminal (scripts and tests read the commands' stdout and
//! stderr), or ever write to stdout.

use std::{
    future::Future,
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

/// Widest line drawn, characters (longer text is cut).
pub const MAX_WIDTH: usize = 100;

/// The status line on stderr (see the module docs). Cleared when dropped.
#[derive(Debug)]
pub struct Line {
    enabled: bool,
    drawn: bool,
}

impl Line {
    /// A line on stderr, drawn only if stderr is a terminal.
    pub fn stderr() -> Line {
        Line {
            enabled: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Whether anything will be drawn.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the line with `text` (cut to [`MAX_WIDTH`]).
    pub fn draw(&mut self, text: &str) {
        if !self.enabled {
            return;
        }
        let cut: String = text
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_WIDTH)
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{cut}\x1b[K");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Removes the line (the next output starts on a clean line).
    pub fn clear(&mut self) {
        if self.enabled && self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Awaits `work`; while it runs and stderr is a terminal, redraws the line
/// every `every` with what `status(elapsed)` answers (`None` keeps the last
/// text). Off a terminal `status` is never called: `work` alone runs.
pub async fn show_while<T, S>(
    work: impl Future<Output = T>,
    every: Duration,
    mut status: impl FnMut(Duration) -> S,
) -> T
where
    S: Future<Output = Option<String>>,
{
    let mut line = Line::stderr();
    if !line.enabled() {
        return work.await;
    }
    let start = Instant::now();
    tokio::pin!(work);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut work => {
                line.clear();
                return out;
            }
            _ = tick.tick() => {
                // the status is asked while the work goes on
                let s = status(start.elapsed());
                tokio::pin!(s);
                let text = tokio::select! {
                    out = &mut work => {
                        line.clear();
                        return out;
                    }
                    t = &mut s => t,
                };
                if let Some(t) = text {
                    line.draw(&t);
                }
            }
        }
    }
}

/// `[#####-----]`: `done` of `total` in `width` cells (full past the end,
/// empty for a zero total).
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((u128::from(done.min(total)) * width as u128) / u128::from(total)) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Time left at the rate so far (`done` of `total` in `elapsed`); `None`
/// before any progress.
pub fn eta(done: u64, total: u64, elapsed: Duration) -> Option<Duration> {
    if done == 0 || elapsed.is_zero() {
        return None;
    }
    let left = total.saturating_sub(done);
    Some(Duration::from_secs_f64(
        elapsed.as_secs_f64() * left as f64 / done as f64,
    ))
}

/// Whole seconds, short: `45s`, `3m05s`, `2h01m`.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A counted task: `drill load [####------] 40% 12s of 30s, 2400 records committed`
/// (`total` known) or `evidence verify 12s, 4800 records` (unknown).
pub fn counted(
    label: &str,
    done: u64,
    total: Option<u64>,
    elapsed: Duration,
    what: &str,
) -> String {
    match total {
        Some(t) => {
            let pct = if t == 0 {
                100
            } else {
                (u128::from(done.min(t)) * 100 / u128::from(t)) as u64
            };
            let left = match eta(done, t, elapsed) {
                Some(e) if done < t => format!(", ~{} left", short(e)),
                _ => String::new(),
            };
            format!(
                "{label} {} {pct:>3}% {}, {what}{left}",
                bar(done, t, 20),
                short(elapsed)
            )
        }
        None => format!("{label} {}, {what}", short(elapsed)),
    }
}

/// The backlog drain view: `pending` records now, `rate` records/s
/// acknowledged over the last interval (`None`: first look); `drained`
/// once nothing is pending.
pub fn drain(state: &str, pending: u64, oldest_age_s: u64, rate: Option<f64>) -> String {
    if pending == 0 {
        return format!("{state}: evidence backlog drained (0 records pending)");
    }
    let when = match rate {
        None => String::new(),
        Some(r) if r > 0.0 => format!(
            ", {r:.0} records/s acked, drained in ~{}",
            short(Duration::from_secs_f64(pending as f64 / r))
        ),
        Some(_) => ", not draining".to_owned(),
    };
    format!(
        "{state}: evidence backlog {pending} records pending, oldest {}{when}",
        short(Duration::from_secs(oldest_age_s))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_times() {
        assert_eq!(bar(0, 10, 10), "[----------]");
        assert_eq!(bar(5, 10, 10), "[#####-----]");
        assert_eq!(bar(25, 10, 4), "[####]");
        assert_eq!(bar(3, 0, 4), "[----]");
        // no overflow near the top of the range
        assert_eq!(bar(u64::MAX - 1, u64::MAX, 2), "[#-]");
        assert_eq!(eta(0, 10, Duration::from_secs(3)), None);
        assert_eq!(
            eta(5, 20, Duration::from_secs(10)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(eta(30, 20, Duration::from_secs(10)), Some(Duration::ZERO));
        assert_eq!(short(Duration::from_secs(45)), "45s");
        assert_eq!(short(Duration::from_secs(185)), "3m05s");
        assert_eq!(short(Duration::from_secs(7260)), "2h01m");
    }

    #[test]
    fn counted_and_drain_lines() {
        assert_eq!(
            counted(
                "drill load",
                12,
                Some(30),
                Duration::from_secs(12),
                "2400 records committed"
            ),
            "drill load [########------------]  40% 12s, 2400 records committed, ~18s left"
        );
        assert_eq!(
            counted("drill load", 30, Some(30), Duration::from_secs(31), "done"),
            "drill load [####################] 100% 31s, done"
        );
        assert_eq!(
            counted("verify", 0, None, Duration::from_secs(2), "4800 records"),
            "verify 2s, 4800 records"
        );
        assert_eq!(
            drain("connected", 0, 0, None),
            "connected: evidence backlog drained (0 records pending)"
        );
        assert_eq!(
            drain("connected", 1200, 75, Some(400.0)),
            "connected: evidence backlog 1200 records pending, oldest 1m15s, 400 records/s acked, drained in ~3s"
        );
        assert_eq!(
            drain("disconnected", 1200, 75, Some(0.0)),
            "disconnected: evidence backlog 1200 records pending, oldest 1m15s, not draining"
        );
        assert_eq!(
            drain("connecting", 9, 3, None),
            "connecting: evidence backlog 9 records pending, oldest 3s"
        );
    }

    #[tokio::test]
    async fn off_a_terminal_only_the_work_runs() {
        // cargo test captures stderr through a pipe: not a terminal here
        if std::io::stderr().is_terminal() {
            eprintln!("stderr is a terminal: skipping the non-terminal check");
            return;
        }
        let mut asked = 0;
        let out = show_while(
            async {
                tokio::time::sleep(Duration::from_millis(60)).await;
                7
            },
            Duration::from_millis(5),
            |_| {
                asked += 1;
                async { Some("x".to_owned()) }
            },
        )
        .await;
        assert_eq!((out, asked), (7, 0));
        assert!(!Line::stderr().enabled());
    }
}
