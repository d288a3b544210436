//! What a link does to datagrams: the [`Impairment`] a direction of the relay applies,
//! as plain data.
//!
//! An impairment is written in netem's vocabulary (`delay 50ms 10ms loss 1% rate 1mbit`)
//! and parsed once, here, by [`Impairment::parse_args`]; the command line, the control
//! socket and the schedule file all go through that parser, and [`Impairment`]'s
//! `Display` writes the same tokens back. Nothing here touches a socket, a clock or a
//! random number generator: [`crate::link`] applies an impairment, the relay driver
//! decides which one is current.

mod parse;
pub mod units;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use parse::ImpairmentError;
pub use units::{Percent, Rate, ValueError};

/// The delay-queue bound used when `limit` is not given (netem's default too).
pub const DEFAULT_LIMIT: u32 = 1000;

/// The largest `limit` accepted.
pub const MAX_LIMIT: u32 = 1_000_000;

/// The largest datagram the relay handles (and the largest `mtu`).
pub const MAX_DATAGRAM: usize = 65535;

/// Which way through the relay: `up` is client→upstream, `down` is upstream→client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
    /// Both directions.
    #[default]
    Both,
}

impl Direction {
    /// True if this selection includes the client→upstream direction.
    pub fn includes_up(self) -> bool {
        matches!(self, Direction::Up | Direction::Both)
    }

    /// True if this selection includes the upstream→client direction.
    pub fn includes_down(self) -> bool {
        matches!(self, Direction::Down | Direction::Both)
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Both => "both",
        })
    }
}

impl FromStr for Direction {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "up" => Ok(Direction::Up),
            "down" => Ok(Direction::Down),
            "both" => Ok(Direction::Both),
            _ => Err(ValueError::invalid(
                "direction",
                s,
                "`up` (client to upstream), `down` (upstream to client) or `both`",
            )),
        }
    }
}

/// How jitter is spread around the base delay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Distribution {
    /// Uniform in `delay ± jitter` (netem's behaviour without a distribution table).
    #[default]
    Uniform,
    /// Normal with mean `delay` and standard deviation `jitter`.
    Normal,
    /// Heavy-tailed: a Pareto (shape 3) sample shifted to mean `delay`, scaled to
    /// standard deviation `jitter`; rare datagrams come very late.
    Pareto,
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::Uniform => "uniform",
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
        })
    }
}

impl FromStr for Distribution {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(Distribution::Uniform),
            "normal" => Ok(Distribution::Normal),
            "pareto" => Ok(Distribution::Pareto),
            _ => Err(ValueError::invalid(
                "distribution",
                s,
                "`uniform`, `normal` or `pareto`",
            )),
        }
    }
}

/// Gilbert-Elliott bursty loss, netem's `loss gemodel p r 1-h 1-k`.
///
/// A two-state chain evaluated once per datagram: in the good state a datagram is lost
/// with probability `good_loss` (1-k) and the chain moves to bad with probability `p`;
/// in the bad state a datagram is lost with probability `bad_loss` (1-h) and the chain
/// moves back to good with probability `r`. The loss decision uses the state the
/// datagram arrived in, as netem does. With `bad_loss` = 100% and `good_loss` = 0%, the
/// long-run loss is `p / (p + r)` and bursts last `1 / r` datagrams on average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from good to bad, per datagram.
    pub p: Percent,
    /// Probability of moving from bad to good, per datagram (default 100%).
    pub r: Percent,
    /// Loss probability in the bad state, netem's 1-h (default 100%).
    pub bad_loss: Percent,
    /// Loss probability in the good state, netem's 1-k (default 0%).
    pub good_loss: Percent,
}

impl GilbertElliott {
    /// Builds the model from one to four percentages `p [r [1-h [1-k]]]`, defaulting
    /// like netem: `r` 100%, `1-h` 100%, `1-k` 0%.
    pub fn from_percents(values: &[Percent]) -> Option<Self> {
        match values {
            [p, rest @ ..] if rest.len() <= 3 => Some(Self {
                p: *p,
                r: rest.first().copied().unwrap_or(Percent::HUNDRED),
                bad_loss: rest.get(1).copied().unwrap_or(Percent::HUNDRED),
                good_loss: rest.get(2).copied().unwrap_or(Percent::ZERO),
            }),
            _ => None,
        }
    }

    /// The long-run fraction of datagrams lost.
    pub fn mean_loss(&self) -> f64 {
        let (p, r) = (self.p.fraction(), self.r.fraction());
        if p + r == 0.0 {
            // The chain never leaves the good state.
            return self.good_loss.fraction();
        }
        let bad = p / (p + r);
        bad * self.bad_loss.fraction() + (1.0 - bad) * self.good_loss.fraction()
    }
}

impl fmt::Display for GilbertElliott {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.p, self.r, self.bad_loss, self.good_loss
        )
    }
}

impl FromStr for GilbertElliott {
    type Err = ValueError;

    /// Parses the flag form `P[,R[,1-H[,1-K]]]`, e.g. `1%,10%,70%,0.1%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let values = s
            .split(',')
            .map(units::parse_percent)
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_percents(&values).ok_or_else(|| {
            ValueError::invalid(
                "gemodel",
                s,
                "one to four comma-separated percentages P[,R[,1-H[,1-K]]], like `1%,10%,70%,0.1%`",
            )
        })
    }
}

/// How datagrams are lost at random.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossModel {
    /// Each datagram is lost independently with this probability (`loss 1%`).
    Random(Percent),
    /// Bursty loss (`loss gemodel p r 1-h 1-k`).
    GilbertElliott(GilbertElliott),
}

/// What one direction of the relay does to datagrams. `Default` is no impairment.
///
/// Fields are applied in this order (see [`crate::link`]): blackout, mtu, loss,
/// duplicate, then per copy: queue limit, corrupt, rate, reorder or delay.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// Base one-way delay added to every datagram (`delay 50ms`).
    pub delay: Duration,
    /// Random variation around `delay` (`delay 50ms 10ms` or `jitter 10ms`). With jitter,
    /// datagrams can overtake each other, as with netem.
    pub jitter: Duration,
    /// How jitter is distributed (`distribution normal`).
    pub distribution: Distribution,
    /// Random or bursty loss (`loss 1%`, `loss gemodel 1% 10% 70% 0.1%`).
    pub loss: Option<LossModel>,
    /// Probability that a datagram is sent twice (`duplicate 1%`).
    pub duplicate: Percent,
    /// Probability that a datagram skips the delay and is sent at once, overtaking the
    /// datagrams still waiting (`reorder 5%`, needs a `delay`).
    pub reorder: Percent,
    /// Probability that one random bit of a datagram is flipped (`corrupt 0.1%`).
    pub corrupt: Percent,
    /// Token-bucket rate limit (`rate 1mbit`); datagrams wait for tokens in the queue.
    pub rate: Option<Rate>,
    /// Token-bucket depth in bytes (`burst 10kb`): how many bytes may pass back to back
    /// after an idle period. 0 paces every datagram, like netem's `rate`.
    pub burst: u32,
    /// Datagrams larger than this many bytes are dropped (`mtu 1200`).
    pub mtu: Option<u32>,
    /// At most this many datagrams wait in the delay/rate queue; more are dropped as
    /// `queue_full` (`limit 1000`).
    pub limit: u32,
    /// Drop everything, including datagrams already in flight when they come due.
    pub blackout: bool,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            distribution: Distribution::Uniform,
            loss: None,
            duplicate: Percent::ZERO,
            reorder: Percent::ZERO,
            corrupt: Percent::ZERO,
            rate: None,
            burst: 0,
            mtu: None,
            limit: DEFAULT_LIMIT,
            blackout: false,
        }
    }
}

impl Impairment {
    /// No impairment (the same as `Default`).
    pub fn none() -> Self {
        Self::default()
    }

    /// Drop everything.
    pub fn blackout() -> Self {
        Self {
            blackout: true,
            ..Self::default()
        }
    }

    /// True if datagrams pass untouched.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Parses netem-like tokens, e.g. `["delay", "50ms", "10ms", "loss", "1%"]`.
    ///
    /// ```text
    /// delay TIME [JITTER] [distribution uniform|normal|pareto]
    /// jitter TIME                 distribution NAME
    /// loss [random] PERCENT       loss gemodel P [R [1-H [1-K]]]
    /// duplicate PERCENT           reorder PERCENT        corrupt PERCENT
    /// rate RATE [burst SIZE]      mtu BYTES              limit PACKETS
    /// blackout                    none
    /// ```
    ///
    /// Keywords may also be written as flags (`--delay 50ms --loss-gemodel 1%,10%`).
    /// Each keyword may appear once; an empty list or `none` is no impairment. Units are
    /// those of [`units`]: `50ms`, `1%`, `1mbit` (bits/s) or `1mbps` (bytes/s), `10kb`.
    pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Self, ImpairmentError> {
        parse::parse_args(args)
    }

    /// Checks the rules that span fields: values within their ranges and `reorder`
    /// only together with a `delay`. The parsers call it; call it yourself when building
    /// an `Impairment` by hand.
    pub fn validate(&self) -> Result<(), ImpairmentError> {
        parse::validate(self)
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        parse::write_tokens(self, f)
    }
}

impl FromStr for Impairment {
    type Err = ImpairmentError;

    /// Parses whitespace-separated tokens, e.g. `"delay 50ms loss 1%"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_args(&s.split_whitespace().collect::<Vec<_>>())
    }
}

// On the wire (control socket, stats JSON) an impairment is its netem text, so there is
// exactly one parser and one set of validation rules.
impl Serialize for Impairment {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Impairment {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
