//! The spoke's operating mode: the seed's mode matrix (Part IV) as a sans-IO
//! state machine.
//!
//! What it is: [`ModeMachine`], one per spoke, holding the spoke-wide mode
//! (Target, Survival or Recovery) and, inside it, the mode of every
//! destination service it has seen (Target or Degraded). Observations go in
//! as `handle_*(now, …)` calls; decisions come out as values:
//! [`ModeMachine::poll_transition`] (every mode change with its measured
//! evidence and the actions of the new profile),
//! [`ModeMachine::poll_ramp_step`] (the Recovery ramp moving),
//! [`ModeMachine::effective_profile`] (what the data plane applies to a
//! request to a service) and [`ModeMachine::admit_remote`] (whether the
//! Recovery ramp lets this request go remote). Who drives it: the spoke, which
//! reports request outcomes, reachability and health checks, arms a timer at
//! [`ModeMachine::poll_timeout`] and calls [`ModeMachine::handle_timeout`]
//! when it fires, turns transitions into evidence records and log lines, and
//! hands the effective profiles to its data plane. What it must not do: read
//! a clock (time comes in as `now`; an earlier `now` than one already seen
//! counts as the latest one seen), draw random numbers (they come in as a
//! `u64`), do I/O, panic on any input, or grow without bound (see the limits
//! below).
//!
//! Every number below is a [`ModeMatrix`](crate::model::ModeMatrix) field, so
//! drills can run in seconds (`deploy/examples/mode-drill.yaml`); the seed's
//! values are the defaults.
//!
//! # Target ⇄ Degraded (per destination service)
//!
//! Every reported request counts in its service's sliding window (any
//! locality tier; a failure is whatever the data plane calls one: 5xx,
//! connect failure, reset, timeout; requests the Recovery ramp refused
//! without trying are not reported).
//!
//! - **Target → Degraded** (`error_rate_exceeded`) when the window holds at
//!   least `degradation.min_requests` requests (default 20; the seed names
//!   no minimum) and
//!   its error rate is **at or above** `degradation.enter_error_rate` (seed:
//!   30 % over `degradation.window`, 5 minutes). Checked at every request of
//!   the service, at every window bucket boundary and at every new matrix.
//! - **Degraded → Target** (`error_rate_recovered`), with hysteresis, once the
//!   service was *calm* at every check for a whole `degradation.window`.
//!   Calm means the error rate is **at or below**
//!   `degradation.exit_error_rate` (default half the entry threshold, 15 %),
//!   or the window holds fewer than `min_requests` requests (too little
//!   traffic to measure: a service nobody calls any more leaves Degraded one
//!   window after its traffic in the window fell below `min_requests`,
//!   instead of staying Degraded forever). One check that is not calm
//!   restarts the clock. "At or below" lets an exit threshold of 0 mean "no
//!   error at all for a window". Since the errors that made a service
//!   Degraded must first age out of the window, a service typically stays
//!   Degraded about two windows after its errors stop.
//!
//! The window is [`WINDOW_BUCKETS`] buckets of `window / 20`, aligned for
//! every service to one machine-wide bucket clock, each holding a request
//! and an error counter: 160 bytes per service whatever the traffic. The
//! rate is measured over the current bucket and the 19 before it, so it
//! covers between 19/20 and all of the window (4 min 45 s to 5 min for the
//! seed), and a request leaves the window up to one bucket (5 %) early.
//! Checks at bucket boundaries make the Degraded → Target exit up to one
//! bucket late. Counters saturate (at 2³² per bucket) instead of wrapping.
//!
//! # → Survival (spoke-wide)
//!
//! [`ModeMachine::handle_reachability`] reports the hub and, per
//! [`LocalityTier`](crate::routing::LocalityTier), how many endpoints are
//! reachable of how many known. *Remote* is every tier but `SameSite` (the
//! same notion as Survival's local-only routing and the Recovery ramp). The
//! spoke is **partitioned** when the hub is unreachable **and** no remote
//! endpoint is reachable ([`Reachability::is_partition`]); a store with no
//! remote endpoints at all is therefore judged on the hub alone. Reachable
//! same-site endpoints neither prevent nor cause a partition. A partition
//! seen in Target is `network_partition_detected`, in Recovery
//! `partition_during_recovery`; both go to Survival at once (debouncing a
//! flaky hub link is the driver's job: report the hub unreachable when its
//! session has timed out, not at one lost packet).
//!
//! # Survival → Recovery
//!
//! `connectivity_restored_health_checks_passed` when the latest reachability
//! is no longer a partition **and** the active health checks
//! ([`ModeMachine::handle_health_check`]) show at least
//! `reconnection.health_checks` passes (seed 10) and no failure within the
//! last `reconnection.window` (seed 2 minutes). A failure resets the count,
//! and the window must also be clear of it. Checked at every health check
//! and every reachability report. At most `health_checks` timestamps are
//! kept ([`MAX_HEALTH_CHECKS`] at most).
//!
//! # Recovery
//!
//! Remote traffic ramps by `recovery.ramp` (seed 1, 2, 4, 8, 16, 32, 64,
//! 100 %, one step a minute). A step advances when its time is up and it
//! stayed healthy: no more than `recovery.ramp.tolerated_failures` failures
//! (default 0) of remote requests (a failed request reported with a remote
//! tier) and failed health checks during the step. The failure beyond the
//! tolerance steps the ramp **back one step** (never below the first) and
//! restarts the step timer at once. Recovery → Target (`ramp_complete`) once
//! the 100 % step has itself lasted a healthy step (seed: 8 minutes after
//! Recovery began, if nothing failed). A partition returns to Survival.
//! [`ModeMachine::admit_remote`] draws against the current percent; a
//! refused request is served locally when a same-site endpoint exists,
//! otherwise answered with 503 and `retry-after` set to the time to the next
//! step, which the refusal carries.
//!
//! # How the spoke's mode and a service's mode combine
//!
//! The effective mode of a service ([`ModeMachine::mode`]) is the spoke's
//! mode when that is Survival or Recovery, else the service's own (Target or
//! Degraded). A service's own mode keeps being measured during Survival and
//! Recovery (its transitions are still reported) and applies again once the
//! spoke is back in Target; spoke-wide transitions are reported once, for the
//! spoke, not once per service.
//!
//! # Limits
//!
//! At most [`MAX_SERVICES`] services are tracked; a new one beyond that
//! evicts the one seen least recently (a Degraded one is reported as a
//! `service_evicted` transition back to Target). Services in Target whose
//! window has emptied are forgotten at the next bucket boundary. Service
//! names are at most [`MAX_SERVICE_NAME`] bytes. At most
//! [`MAX_QUEUED_TRANSITIONS`] transitions and [`MAX_QUEUED_RAMP_STEPS`] ramp
//! steps wait to be polled; beyond that the oldest is dropped and counted
//! ([`ModeMachine::dropped_outputs`]).

#![warn(missing_docs)]

mod connectivity;
mod machine;
mod transition;
mod window;

#[cfg(test)]
mod tests;

pub use connectivity::{is_remote, EndpointCount, Reachability};
pub use machine::{EffectiveProfile, ModeMachine, RemoteAdmission, RequestOutcome};
pub use transition::{
    ErrorRateEvidence, HealthCheckEvidence, RampChange, RampEvidence, RampFailure, RampStep, Scope,
    Transition, Trigger,
};

/// Most destination services tracked at once; the least recently seen is
/// evicted for a new one.
pub const MAX_SERVICES: usize = 4096;
/// Longest service name, in bytes (a DNS name).
pub const MAX_SERVICE_NAME: usize = 253;
/// Largest `reconnection.health_checks` (bounds the timestamps kept).
pub const MAX_HEALTH_CHECKS: u32 = 1000;
/// Buckets per error-rate window.
pub const WINDOW_BUCKETS: u32 = 20;
/// Most transitions waiting for [`ModeMachine::poll_transition`].
pub const MAX_QUEUED_TRANSITIONS: usize = 2 * MAX_SERVICES;
/// Most ramp steps waiting for [`ModeMachine::poll_ramp_step`].
pub const MAX_QUEUED_RAMP_STEPS: usize = 64;

/// Why the mode machine refused an input. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// A mode matrix value the machine cannot run with (the YAML input
    /// rejects these too; this guards matrices built in code).
    #[error(
        "mode matrix field {field}: {reason}; fix the ModeMatrix (the previous one stays in force)"
    )]
    InvalidMatrix {
        /// The field, as the model names it (`degradation.window`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A service name that is empty or longer than [`MAX_SERVICE_NAME`].
    #[error("service name of {len} bytes is not a host name: report requests under the canonical host (1 to {MAX_SERVICE_NAME} bytes)")]
    ServiceName {
        /// Its length in bytes.
        len: usize,
    },
    /// An endpoint count with more reachable endpoints than known ones.
    #[error("{reachable} endpoints reachable of {total} known: count the reachable ones among the known ones")]
    EndpointCount {
        /// Reachable endpoints given.
        reachable: u32,
        /// Known endpoints given.
        total: u32,
    },
}
