//! What the mode machine reports: transitions with their measured evidence,
//! and the Recovery ramp's steps.
//!
//! What it is: plain values. A [`Trigger`] carries the evidence of its own
//! kind (an error-rate trigger cannot carry reachability), so a transition's
//! cause and its measurements cannot disagree. [`Transition::to_json`] gives
//! the seed's shape (`trigger`, `evidence`, `actions`, Part IV). Who drives
//! it: [`super::ModeMachine`] builds them; the spoke turns them into evidence
//! records and log lines. What it must not do: hold anything but
//! measurements (no clocks, no wall time: the driver stamps that).

use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::connectivity::Reachability;
use crate::model::{BackoffKind, BreakerMode, Mode, ModeProfile, Observability, RoutingMode};
use crate::units::{format_duration, Ratio};

/// Whose mode changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The spoke as a whole (Target, Survival, Recovery).
    Spoke,
    /// One destination service (Target, Degraded), by canonical host.
    Service(String),
}

/// A mode change. `from != to` always.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// When it happened (the `now` of the input that caused it).
    pub at: Instant,
    /// Whose mode.
    pub scope: Scope,
    /// The mode left.
    pub from: Mode,
    /// The mode entered.
    pub to: Mode,
    /// Why, with the measurements.
    pub trigger: Trigger,
    /// What the new mode's profile does, for people
    /// (`retries: linear backoff x2`, `breaker: open at 30%`, `sampling: 10%`).
    pub actions: Vec<String>,
}

impl Transition {
    /// The seed's transition evidence shape:
    /// `{"scope", "from", "to", "trigger", "evidence": {…}, "actions": […]}`
    /// (`at` is left out: an `Instant` means nothing outside this process).
    pub fn to_json(&self) -> Json {
        let mut evidence = self.trigger.evidence_json();
        if let (Scope::Service(name), Json::Object(map)) = (&self.scope, &mut evidence) {
            map.insert("service".into(), json!(name));
        }
        json!({
            "scope": match self.scope { Scope::Spoke => "spoke", Scope::Service(_) => "service" },
            "from": self.from.as_str(),
            "to": self.to.as_str(),
            "trigger": self.trigger.as_str(),
            "evidence": evidence,
            "actions": self.actions,
        })
    }
}

/// Why a mode changed, carrying what was measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Target → Degraded: the service's error rate reached the entry threshold.
    ErrorRateExceeded(ErrorRateEvidence),
    /// Degraded → Target: the error rate stayed at or below the exit
    /// threshold (or traffic too low to measure) for a whole window.
    ErrorRateRecovered(ErrorRateEvidence),
    /// Degraded → Target: the service was evicted to track a new one (the
    /// tracking limit); the evidence is its window when it went.
    ServiceEvicted(ErrorRateEvidence),
    /// Target → Survival: hub and every remote endpoint unreachable.
    NetworkPartitionDetected(Reachability),
    /// Recovery → Survival: a partition again while ramping.
    PartitionDuringRecovery {
        /// What was reachable.
        reachability: Reachability,
        /// Where the ramp was.
        ramp: RampEvidence,
    },
    /// Survival → Recovery: connectivity back and the health checks passed.
    ConnectivityRestored(HealthCheckEvidence),
    /// Recovery → Target: the ramp held 100 % for a healthy step.
    RampComplete(RampEvidence),
}

impl Trigger {
    /// snake_case name, as in the seed's evidence.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::ErrorRateExceeded(_) => "error_rate_exceeded",
            Trigger::ErrorRateRecovered(_) => "error_rate_recovered",
            Trigger::ServiceEvicted(_) => "service_evicted",
            Trigger::NetworkPartitionDetected(_) => "network_partition_detected",
            Trigger::PartitionDuringRecovery { .. } => "partition_during_recovery",
            Trigger::ConnectivityRestored(_) => "connectivity_restored_health_checks_passed",
            Trigger::RampComplete(_) => "ramp_complete",
        }
    }

    fn evidence_json(&self) -> Json {
        match self {
            Trigger::ErrorRateExceeded(e)
            | Trigger::ErrorRateRecovered(e)
            | Trigger::ServiceEvicted(e) => e.to_json(),
            Trigger::NetworkPartitionDetected(r) => r.to_json(),
            Trigger::PartitionDuringRecovery { reachability, ramp } => {
                let mut j = reachability.to_json();
                if let Json::Object(map) = &mut j {
                    map.insert("ramp".into(), ramp.to_json());
                }
                j
            }
            Trigger::ConnectivityRestored(h) => h.to_json(),
            Trigger::RampComplete(r) => r.to_json(),
        }
    }
}

/// A service's error rate as measured over its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorRateEvidence {
    /// Failed ÷ all requests in the window, rounded down to a basis point.
    pub error_rate: Ratio,
    /// The threshold it was compared with (entry or exit).
    pub threshold: Ratio,
    /// The window's length (the counts cover 19/20 to all of it).
    pub window: Duration,
    /// Requests in the window.
    pub total_requests: u64,
    /// Failed requests in the window.
    pub failed_requests: u64,
    /// Requests needed for the rate to count.
    pub min_requests: u32,
}

impl ErrorRateEvidence {
    fn to_json(self) -> Json {
        json!({
            "error_rate": self.error_rate.as_f64(),
            "threshold": self.threshold.as_f64(),
            "window": format_duration(self.window),
            "failed_requests": self.failed_requests,
            "total_requests": self.total_requests,
            "min_requests": self.min_requests,
        })
    }
}

/// The health checks that ended Survival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheckEvidence {
    /// Passing checks in the window (since the last failure, at most
    /// `required` counted).
    pub successful_health_checks: u32,
    /// Failing checks in the window (0 when they passed).
    pub failed_health_checks: u32,
    /// Passing checks required.
    pub required: u32,
    /// The window.
    pub window: Duration,
    /// The reachability that showed connectivity back.
    pub reachability: Reachability,
}

impl HealthCheckEvidence {
    fn to_json(self) -> Json {
        let mut j = self.reachability.to_json();
        if let Json::Object(map) = &mut j {
            map.insert(
                "successful_health_checks".into(),
                json!(self.successful_health_checks),
            );
            map.insert(
                "failed_health_checks".into(),
                json!(self.failed_health_checks),
            );
            map.insert("required_health_checks".into(), json!(self.required));
            map.insert("window".into(), json!(format_duration(self.window)));
        }
        j
    }
}

/// Where the Recovery ramp stood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RampEvidence {
    /// Step index (0 = the first).
    pub step: u8,
    /// Share of remote traffic at that step, percent.
    pub percent: u8,
    /// Step length.
    pub step_length: Duration,
    /// Failures counted in the step so far.
    pub failures_in_step: u32,
    /// Failures a step tolerates.
    pub tolerated_failures: u32,
}

impl RampEvidence {
    fn to_json(self) -> Json {
        json!({
            "step": self.step,
            "traffic_percent": self.percent,
            "step_length": format_duration(self.step_length),
            "failures_in_step": self.failures_in_step,
            "tolerated_failures": self.tolerated_failures,
        })
    }
}

/// The Recovery ramp moved (not a mode change: the spoke stays in Recovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RampStep {
    /// When.
    pub at: Instant,
    /// Share of remote traffic before, percent.
    pub from_percent: u8,
    /// Share of remote traffic now, percent (equal to `from_percent` when a
    /// failure on the first step only restarted its timer).
    pub to_percent: u8,
    /// The step now (0 = the first).
    pub step: u8,
    /// Why.
    pub change: RampChange,
}

/// Why the ramp moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RampChange {
    /// The step lasted its time with no more failures than tolerated.
    Advanced,
    /// One failure more than tolerated: one step back, timer restarted.
    SteppedBack {
        /// Failures in the step, this one included.
        failures: u32,
        /// Failures a step tolerates.
        tolerated: u32,
        /// What the last failure was.
        cause: RampFailure,
    },
}

/// A failure that counts against a ramp step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RampFailure {
    /// A request to a remote tier failed.
    RemoteRequest,
    /// An active health check of the hub or a remote tier failed.
    HealthCheck,
}

/// What `profile` does, one line per aspect, for a transition's `actions`.
pub(crate) fn actions(profile: &ModeProfile) -> Vec<String> {
    let routing = match profile.routing {
        RoutingMode::Dynamic => "routing: dynamic, health-checked".to_string(),
        RoutingMode::HealthyOnly => "routing: healthy endpoints only".to_string(),
        RoutingMode::LocalOnly => "routing: local only".to_string(),
        RoutingMode::Ramp => {
            let r = profile.ramp.unwrap_or_default();
            format!(
                "routing: ramp remote traffic from {}% x{} every {} to 100%",
                r.percent_at_step(0),
                r.factor.max(2),
                format_duration(r.step)
            )
        }
    };
    let n = profile.retries.attempts;
    let retries = if n == 0 {
        "retries: none".to_string()
    } else {
        let kind = match profile.retries.backoff.kind {
            BackoffKind::None => "immediate",
            BackoffKind::Fixed => "fixed backoff",
            BackoffKind::Linear => "linear backoff",
            BackoffKind::Exponential => "exponential backoff",
        };
        format!("retries: {kind} x{n}")
    };
    let breaker = match profile.breaker {
        BreakerMode::ErrorRate(r) => format!("breaker: open at {}", percent(r)),
        BreakerMode::FailFast => "breaker: fail fast".to_string(),
    };
    let observability = match profile.observability {
        Observability::Tracing { sampling } => format!("sampling: {}", percent(sampling)),
        Observability::MetricsOnly { buffered: true } => {
            "sampling: 0%, metrics only, buffered".to_string()
        }
        Observability::MetricsOnly { buffered: false } => "sampling: 0%, metrics only".to_string(),
    };
    vec![routing, retries, breaker, observability]
}

/// `30%`, `12.5%`, `0.01%`.
fn percent(r: Ratio) -> String {
    let bp = r.basis_points();
    let (whole, frac) = (bp / 100, bp % 100);
    match frac {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModeMatrix;

    #[test]
    fn actions_describe_the_seed_profiles() {
        let m = ModeMatrix::default();
        assert_eq!(
            actions(&m.target),
            [
                "routing: dynamic, health-checked",
                "retries: exponential backoff x3",
                "breaker: open at 50%",
                "sampling: 100%"
            ]
        );
        assert_eq!(
            actions(&m.degraded),
            [
                "routing: healthy endpoints only",
                "retries: linear backoff x2",
                "breaker: open at 30%",
                "sampling: 10%"
            ]
        );
        assert_eq!(
            actions(&m.survival),
            [
                "routing: local only",
                "retries: none",
                "breaker: fail fast",
                "sampling: 0%, metrics only, buffered"
            ]
        );
        assert_eq!(
            actions(&m.recovery),
            [
                "routing: ramp remote traffic from 1% x2 every 1m to 100%",
                "retries: fixed backoff x1",
                "breaker: open at 20%",
                "sampling: 100%"
            ]
        );
    }

    #[test]
    fn percents_print_without_float_noise() {
        let bp = |b| Ratio::from_basis_points(b).unwrap_or(Ratio::ZERO);
        assert_eq!(percent(bp(1250)), "12.5%");
        assert_eq!(percent(bp(1)), "0.01%");
        assert_eq!(percent(bp(3333)), "33.33%");
        assert_eq!(percent(Ratio::ONE), "100%");
    }
}
