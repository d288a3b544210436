//! tidemesh-sim: network impairment for the tidemesh test suites.
//!
//! The main piece is `tidemesh-relay`, netem for UDP: a relay that sits between QUIC
//! peers on loopback and delays, jitters, loses, duplicates, reorders, corrupts,
//! rate-limits, MTU-filters or blacks out each direction separately, with seeded
//! randomness so a failing run can be replayed.
//!
//! - [`impairment`]: what a direction does to datagrams, and the netem-token parser.
//! - [`link`]: the I/O-free decision logic applying an impairment, time passed in.
//! - [`flows`]: the bounded per-client flow table.
//! - [`action`] and [`schedule`]: runtime changes and schedule files.
//! - [`relay`]: the tokio driver and the in-process API ([`Relay::start`]).
//! - [`control`]: the JSON-lines control socket and its client.
//! - [`fleet`]: `tidemesh-fleet`, N in-process spokes against one hub process.
//! - [`demo`]: `tidemesh-demo`, the product's story through a hub outage, with a report.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tidemesh_sim::{Direction, Impairment, Relay, RelayConfig};
//!
//! let upstream = "127.0.0.1:4433".parse()?;
//! let config = RelayConfig::new("127.0.0.1:0".parse()?, upstream)
//!     .seed(7)
//!     .impair(Direction::Both, Impairment::parse_args(&["delay", "50ms", "loss", "1%"])?);
//! let relay = Relay::start(config).await?;
//! let spoke_target = relay.local_addr();
//! relay.blackout(Direction::Up).await?; // partition one way
//! relay.heal().await?;
//! let stats = relay.stats().await?;
//! println!("seed={} up lost {}", stats.seed, stats.up.counters.dropped.loss);
//! relay.shutdown().await?;
//! # let _ = spoke_target;
//! # Ok(())
//! # }
//! ```

pub mod action;
pub mod control;
pub mod demo;
pub mod fleet;
pub mod flows;
pub mod impairment;
pub mod link;
pub mod relay;
pub mod schedule;

pub use action::Action;
pub use impairment::{
    Direction, Distribution, GilbertElliott, Impairment, LossModel, Percent, Rate,
};
pub use link::{Counters, Drops};
pub use relay::{
    DirectionStats, FlowStats, Impairments, Relay, RelayConfig, RelayError, RelayHandle, Stats,
};
pub use schedule::Schedule;
