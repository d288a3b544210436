//! The mode machine in virtual time: every instant is `t0` plus a duration,
//! timers fire when [`Driver::run_to`] passes them, nothing sleeps.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::model::{
    BreakerMode, Degradation, Mode, ModeMatrix, Observability, Ramp, Reconnection, RoutingMode,
};
use crate::routing::{LocalityTier, SplitMix64};
use crate::units::Ratio;

const SEC: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn bp(n: u16) -> Ratio {
    Ratio::from_basis_points(n).unwrap()
}

/// The drill matrix: 10 s window, 3 health checks in 10 s, 2 s ramp steps.
fn drill() -> ModeMatrix {
    ModeMatrix {
        degradation: Degradation {
            window: secs(10),
            ..Degradation::default()
        },
        reconnection: Reconnection {
            health_checks: 3,
            window: secs(10),
        },
        recovery: crate::model::ModeProfile {
            ramp: Some(Ramp {
                step: secs(2),
                ..Ramp::default()
            }),
            ..ModeMatrix::default().recovery
        },
        ..ModeMatrix::default()
    }
}

fn connected() -> Reachability {
    Reachability::new(true).with_tier(LocalityTier::Cloud, EndpointCount::all(2))
}

fn partitioned() -> Reachability {
    Reachability::new(false)
        .with_tier(LocalityTier::SameSite, EndpointCount::all(1))
        .with_tier(LocalityTier::Cloud, EndpointCount::unreachable(2))
}

/// A driver in virtual time: fires timers as a real one would, collects
/// outputs.
struct Driver {
    m: ModeMachine,
    t0: Instant,
    now: Instant,
    transitions: Vec<Transition>,
    steps: Vec<RampStep>,
}

impl Driver {
    fn new(matrix: &ModeMatrix) -> Driver {
        let t0 = Instant::now();
        Driver {
            m: ModeMachine::new(t0, matrix).unwrap(),
            t0,
            now: t0,
            transitions: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// Time since t0.
    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Moves time to `t0 + at`, firing every timer due on the way.
    fn run_to(&mut self, at: Duration) {
        let target = self.t0 + at;
        for _ in 0..1_000_000 {
            match self.m.poll_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.m.handle_timeout(self.now);
                    self.drain();
                }
                _ => {
                    self.now = self.now.max(target);
                    return;
                }
            }
        }
        panic!("the timer does not make progress");
    }

    fn drain(&mut self) {
        while let Some(t) = self.m.poll_transition() {
            self.transitions.push(t);
        }
        while let Some(s) = self.m.poll_ramp_step() {
            self.steps.push(s);
        }
    }

    fn request(&mut self, service: &str, tier: LocalityTier, ok: bool) {
        let outcome = RequestOutcome { service, tier, ok };
        self.m.handle_request(self.now, outcome).unwrap();
        self.drain();
    }

    fn local(&mut self, service: &str, ok: bool) {
        self.request(service, LocalityTier::SameSite, ok);
    }

    fn reach(&mut self, r: Reachability) {
        self.m.handle_reachability(self.now, r);
        self.drain();
    }

    fn check(&mut self, ok: bool) {
        self.m.handle_health_check(self.now, ok);
        self.drain();
    }

    fn take(&mut self) -> Vec<Transition> {
        self.drain();
        std::mem::take(&mut self.transitions)
    }

    fn take_steps(&mut self) -> Vec<RampStep> {
        self.drain();
        std::mem::take(&mut self.steps)
    }

    /// Partition, connectivity back and passing checks: Recovery now.
    fn enter_recovery(&mut self) {
        self.reach(partitioned());
        self.reach(connected());
        let n = self.m.matrix().reconnection.health_checks;
        for _ in 0..n {
            self.check(true);
        }
        assert_eq!(self.m.spoke_mode(), Mode::Recovery);
        self.take();
    }
}

fn error_rate(t: &Transition) -> ErrorRateEvidence {
    match &t.trigger {
        Trigger::ErrorRateExceeded(e)
        | Trigger::ErrorRateRecovered(e)
        | Trigger::ServiceEvicted(e) => *e,
        other => panic!("not an error-rate trigger: {other:?}"),
    }
}

fn service(name: &str) -> Scope {
    Scope::Service(name.to_string())
}

// --- Target ⇄ Degraded --------------------------------------------------------

#[test]
fn a_35_percent_error_rate_makes_a_service_degraded_with_its_measurements() {
    let matrix = ModeMatrix {
        degradation: Degradation {
            min_requests: 100,
            ..Degradation::default()
        },
        ..ModeMatrix::default()
    };
    let mut d = Driver::new(&matrix);
    // 100 requests over 50 s, 7 of every 20 answered 503.
    for i in 0..100u64 {
        d.run_to(ms(500 * i));
        d.local("backend.payments", i % 20 >= 7);
        if i < 99 {
            assert_eq!(d.m.service_mode("backend.payments"), Mode::Target, "{i}");
        }
    }
    let ts = d.take();
    assert_eq!(ts.len(), 1, "{ts:?}");
    let t = &ts[0];
    assert_eq!(t.scope, service("backend.payments"));
    assert_eq!((t.from, t.to), (Mode::Target, Mode::Degraded));
    assert_eq!(t.at, d.t0 + ms(49_500));
    assert_eq!(t.trigger.as_str(), "error_rate_exceeded");
    assert_eq!(
        error_rate(t),
        ErrorRateEvidence {
            error_rate: Ratio::percent(35),
            threshold: Ratio::percent(30),
            window: secs(300),
            total_requests: 100,
            failed_requests: 35,
            min_requests: 100,
        }
    );
    assert_eq!(
        t.actions,
        [
            "routing: healthy endpoints only",
            "retries: linear backoff x2",
            "breaker: open at 30%",
            "sampling: 10%"
        ]
    );
    let p = d.m.effective_profile("backend.payments");
    assert_eq!(p.mode, Mode::Degraded);
    assert_eq!(p.routing, RoutingMode::HealthyOnly);
    assert_eq!(p.retries.attempts, 2);
    assert_eq!(p.breaker, BreakerMode::ErrorRate(Ratio::percent(30)));
    assert_eq!(p.sampling, Ratio::percent(10));
    assert_eq!(p.ramp_percent, None);
    // Other services are not affected.
    assert_eq!(d.m.mode("frontend.shop"), Mode::Target);
}

#[test]
fn too_few_requests_measure_nothing() {
    let mut d = Driver::new(&ModeMatrix::default());
    // 1 failure of 2 is 50 %, but 2 requests are below the minimum of 20.
    d.local("a.shop", true);
    d.local("a.shop", false);
    assert_eq!(d.m.service_mode("a.shop"), Mode::Target);
    let mut d = Driver::new(&ModeMatrix::default());
    for i in 0..19 {
        d.local("a.shop", false);
        assert_eq!(d.m.service_mode("a.shop"), Mode::Target, "{i}");
    }
    d.local("a.shop", false);
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
    let t = d.take().remove(0);
    assert_eq!(error_rate(&t).total_requests, 20);
    assert_eq!(error_rate(&t).error_rate, Ratio::ONE);
}

#[test]
fn a_healed_service_goes_back_to_target_only_after_a_calm_window() {
    let mut d = Driver::new(&ModeMatrix::default());
    // Phase A, 0..60 s: one request a second, every other one fails.
    for s in 0..60 {
        d.run_to(secs(s));
        d.local("a.shop", s % 2 == 0);
    }
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].at, d.t0 + secs(19), "20 requests, 10 failed");
    // Phase B: all good. The 30 failures keep the rate above 15 % until
    // 200 requests are in the window (t = 199 s); calm from then on, for a
    // whole window (300 s).
    for s in 60..700 {
        d.run_to(secs(s));
        d.local("a.shop", true);
        let mode = d.m.service_mode("a.shop");
        if s < 499 {
            assert_eq!(mode, Mode::Degraded, "at {s} s");
        } else {
            assert_eq!(mode, Mode::Target, "at {s} s");
        }
    }
    let ts = d.take();
    assert_eq!(ts.len(), 1, "{ts:?}");
    let t = &ts[0];
    assert_eq!((t.from, t.to), (Mode::Degraded, Mode::Target));
    assert_eq!(t.trigger.as_str(), "error_rate_recovered");
    assert_eq!(t.at, d.t0 + secs(499));
    let e = error_rate(t);
    assert_eq!(e.threshold, Ratio::percent(15));
    // The window then holds buckets from 210 s (4 m 45 s to 5 m of history).
    assert_eq!((e.total_requests, e.failed_requests), (290, 0));
    assert_eq!(t.actions[1], "retries: exponential backoff x3");
}

#[test]
fn one_bad_check_restarts_the_calm_window() {
    let mut d = Driver::new(&drill());
    for _ in 0..20 {
        d.local("a.shop", false);
    }
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
    // 10 s later the failures have aged out: calm from then (no traffic).
    d.run_to(secs(15));
    // A burst of failures at 15 s: not calm again.
    for _ in 0..20 {
        d.local("a.shop", false);
    }
    d.run_to(secs(24));
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
    // The burst ages out at 25 s; calm until 35 s.
    d.run_to(ms(34_500));
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
    d.run_to(secs(35));
    assert_eq!(d.m.service_mode("a.shop"), Mode::Target);
    let ts = d.take();
    assert_eq!(ts.len(), 2);
    assert_eq!(ts[1].at, d.t0 + secs(35));
}

#[test]
fn a_degraded_service_nobody_calls_leaves_degraded_and_is_forgotten() {
    let mut d = Driver::new(&drill());
    for _ in 0..20 {
        d.local("a.shop", false);
    }
    assert_eq!(d.m.tracked_services(), 1);
    // Ticks every 0.5 s; the failures leave the window at 10 s, calm for a
    // window until 20 s; then the empty Target service is dropped.
    d.run_to(ms(19_500));
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
    d.run_to(secs(20));
    let ts = d.take();
    assert_eq!(ts.len(), 2);
    assert_eq!(ts[1].at, d.t0 + secs(20));
    assert_eq!(error_rate(&ts[1]).total_requests, 0);
    assert_eq!(d.m.tracked_services(), 0);
    assert_eq!(d.m.poll_timeout(), None, "nothing left to wait for");
}

#[test]
fn a_lower_threshold_in_a_new_matrix_applies_at_once() {
    let mut d = Driver::new(&ModeMatrix::default());
    for i in 0..100 {
        d.local("a.shop", i % 5 != 0); // 20 % errors
    }
    assert_eq!(d.m.service_mode("a.shop"), Mode::Target);
    assert!(d.take().is_empty());
    d.run_to(secs(30));
    let lower = ModeMatrix {
        degradation: Degradation {
            enter_error_rate: Ratio::percent(15),
            exit_error_rate: bp(750),
            ..Degradation::default()
        },
        ..ModeMatrix::default()
    };
    d.m.handle_config(d.now, &lower).unwrap();
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].at, d.t0 + secs(30));
    let e = error_rate(&ts[0]);
    assert_eq!(e.error_rate, Ratio::percent(20));
    assert_eq!(e.threshold, Ratio::percent(15));
    assert_eq!((e.total_requests, e.failed_requests), (100, 20));
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
}

#[test]
fn a_new_window_length_starts_the_windows_afresh() {
    let mut d = Driver::new(&ModeMatrix::default());
    for _ in 0..19 {
        d.local("a.shop", false);
    }
    d.m.handle_config(d.now, &drill()).unwrap();
    // The 19 failures are gone: 19 more are needed, not 1.
    d.local("a.shop", false);
    assert_eq!(d.m.service_mode("a.shop"), Mode::Target);
    for _ in 0..19 {
        d.local("a.shop", false);
    }
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
}

// --- Survival ---------------------------------------------------------------

#[test]
fn the_partition_rule() {
    use LocalityTier::*;
    assert!(Reachability::new(false).is_partition());
    assert!(
        Reachability::new(false)
            .with_tier(SameSite, EndpointCount::all(3))
            .is_partition(),
        "a local-only store is judged on the hub alone"
    );
    assert!(partitioned().is_partition());
    let zone_up = Reachability::new(false)
        .with_tier(SameZone, EndpointCount::new(1, 3).unwrap())
        .with_tier(Cloud, EndpointCount::unreachable(5));
    assert!(!zone_up.is_partition(), "a reachable remote endpoint");
    assert!(!Reachability::new(true).is_partition(), "the hub answers");
    assert_eq!(
        zone_up.remote_endpoints(),
        EndpointCount::new(1, 8).unwrap()
    );
    assert!(!is_remote(SameSite));
    assert!([SameZone, SameRegion, Cloud, Remote]
        .into_iter()
        .all(is_remote));
}

#[test]
fn a_partition_sends_the_spoke_to_survival() {
    let mut d = Driver::new(&drill());
    d.reach(connected());
    d.reach(Reachability::new(false).with_tier(LocalityTier::Cloud, EndpointCount::all(2)));
    assert!(d.take().is_empty(), "the cloud still answers");
    d.run_to(secs(1));
    d.reach(partitioned());
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    let t = &ts[0];
    assert_eq!(
        (&t.scope, t.from, t.to),
        (&Scope::Spoke, Mode::Target, Mode::Survival)
    );
    assert_eq!(t.trigger, Trigger::NetworkPartitionDetected(partitioned()));
    assert_eq!(
        t.actions,
        [
            "routing: local only",
            "retries: none",
            "breaker: fail fast",
            "sampling: 0%, metrics only, buffered"
        ]
    );
    let p = d.m.effective_profile("pos.retail");
    assert_eq!(p.mode, Mode::Survival);
    assert_eq!(p.routing, RoutingMode::LocalOnly);
    assert_eq!(p.retries.attempts, 0);
    assert_eq!(p.breaker, BreakerMode::FailFast);
    assert_eq!((p.sampling, p.buffer_telemetry), (Ratio::ZERO, true));
    assert_eq!(
        d.m.admit_remote(d.now, 0),
        RemoteAdmission::Refuse { retry_after: None }
    );
    let j = t.to_json();
    assert_eq!(j["trigger"], "network_partition_detected");
    assert_eq!(j["evidence"]["connectivity"]["hub"], "unavailable");
    assert_eq!(j["evidence"]["connectivity"]["same_site"], "available");
    assert_eq!(j["evidence"]["connectivity"]["cloud"], "unavailable");
    assert_eq!(j["evidence"]["connectivity"]["same_zone"], "none");
    assert_eq!(j["evidence"]["service_discovery"]["endpoints_reachable"], 1);
    assert_eq!(j["evidence"]["service_discovery"]["endpoints_total"], 3);
    assert_eq!(j["evidence"]["service_discovery"]["reachability"], "33%");
    // Still partitioned: nothing more.
    d.reach(partitioned());
    assert!(d.take().is_empty());
}

// --- Survival → Recovery -----------------------------------------------------

#[test]
fn ten_passing_health_checks_start_recovery() {
    let mut d = Driver::new(&ModeMatrix::default());
    d.reach(partitioned());
    d.take();
    d.run_to(secs(10));
    d.reach(connected());
    assert_eq!(
        d.m.spoke_mode(),
        Mode::Survival,
        "connectivity alone is not enough"
    );
    for s in (15..=55).step_by(5) {
        d.run_to(secs(s));
        d.check(true);
    }
    assert_eq!(d.m.spoke_mode(), Mode::Survival, "9 passes");
    d.run_to(secs(60));
    d.check(true);
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    let t = &ts[0];
    assert_eq!((t.from, t.to), (Mode::Survival, Mode::Recovery));
    assert_eq!(t.at, d.t0 + secs(60));
    assert_eq!(
        t.trigger,
        Trigger::ConnectivityRestored(HealthCheckEvidence {
            successful_health_checks: 10,
            failed_health_checks: 0,
            required: 10,
            window: secs(120),
            reachability: connected(),
        })
    );
    assert_eq!(
        t.actions[0],
        "routing: ramp remote traffic from 1% x2 every 1m to 100%"
    );
    assert_eq!(t.actions[1], "retries: fixed backoff x1");
    let j = t.to_json();
    assert_eq!(j["trigger"], "connectivity_restored_health_checks_passed");
    assert_eq!(j["evidence"]["successful_health_checks"], 10);
    assert_eq!(j["evidence"]["failed_health_checks"], 0);
    assert_eq!(j["evidence"]["window"], "2m");
    assert_eq!(d.m.ramp_percent(), Some(1));
}

#[test]
fn a_failed_check_resets_the_count_and_must_leave_the_window() {
    let mut d = Driver::new(&ModeMatrix::default());
    d.reach(partitioned());
    d.run_to(secs(10));
    d.reach(connected());
    for s in (15..=55).step_by(5) {
        d.run_to(secs(s));
        d.check(true);
    }
    d.run_to(secs(60));
    d.check(false);
    // 10 passes again by 110 s, but the failure at 60 s is in the window
    // until 180 s (inclusive).
    let mut entered = None;
    for s in (65..=200).step_by(5) {
        d.run_to(secs(s));
        d.check(true);
        if entered.is_none() && d.m.spoke_mode() == Mode::Recovery {
            entered = Some(s);
        }
    }
    assert_eq!(entered, Some(185));
}

#[test]
fn checks_that_pass_during_a_partition_wait_for_connectivity() {
    let mut d = Driver::new(&drill());
    d.reach(partitioned());
    for _ in 0..5 {
        d.check(true);
    }
    assert_eq!(d.m.spoke_mode(), Mode::Survival);
    assert!(d.m.held_health_checks() <= 3, "only the newest are kept");
    d.run_to(secs(3));
    d.reach(connected());
    assert_eq!(d.m.spoke_mode(), Mode::Recovery);
    // Checks older than the window no longer count.
    let mut d = Driver::new(&drill());
    d.reach(partitioned());
    for _ in 0..3 {
        d.check(true);
    }
    d.run_to(secs(11));
    d.reach(connected());
    assert_eq!(d.m.spoke_mode(), Mode::Survival);
}

// --- Recovery ---------------------------------------------------------------

#[test]
fn the_ramp_doubles_every_step_and_completes_after_a_healthy_step_at_100() {
    let mut d = Driver::new(&ModeMatrix::default());
    d.enter_recovery();
    let start = d.elapsed();
    assert_eq!(d.m.poll_timeout(), Some(d.now + secs(60)));
    let mut percents = vec![d.m.ramp_percent().unwrap()];
    for k in 1..=7 {
        d.run_to(start + secs(60 * k));
        percents.push(d.m.ramp_percent().unwrap());
        assert_eq!(d.m.spoke_mode(), Mode::Recovery);
    }
    assert_eq!(percents, [1, 2, 4, 8, 16, 32, 64, 100]);
    let steps = d.take_steps();
    assert_eq!(steps.len(), 7);
    assert!(steps.iter().all(|s| s.change == RampChange::Advanced));
    assert_eq!(
        (steps[6].from_percent, steps[6].to_percent, steps[6].step),
        (64, 100, 7)
    );
    assert_eq!(steps[0].at, d.t0 + start + secs(60));
    d.run_to(start + secs(60 * 8) - ms(1));
    assert_eq!(d.m.spoke_mode(), Mode::Recovery);
    d.run_to(start + secs(60 * 8));
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    let t = &ts[0];
    assert_eq!((t.from, t.to), (Mode::Recovery, Mode::Target));
    assert_eq!(t.at, d.t0 + start + secs(480));
    assert_eq!(
        t.trigger,
        Trigger::RampComplete(RampEvidence {
            step: 7,
            percent: 100,
            step_length: secs(60),
            failures_in_step: 0,
            tolerated_failures: 0,
        })
    );
    assert_eq!(d.m.ramp_percent(), None);
    assert_eq!(d.m.admit_remote(d.now, u64::MAX), RemoteAdmission::Admit);
    assert_eq!(d.m.effective_profile("x.y").mode, Mode::Target);
}

#[test]
fn a_remote_failure_steps_the_ramp_back_one_step_and_restarts_the_step() {
    let mut d = Driver::new(&drill());
    d.enter_recovery();
    let start = d.elapsed();
    d.run_to(start + secs(6));
    assert_eq!(d.m.ramp_percent(), Some(8));
    d.take_steps();
    // A local failure does not count against the ramp.
    d.run_to(start + ms(6_500));
    d.local("a.shop", false);
    assert_eq!(d.m.ramp_percent(), Some(8));
    // A remote one does.
    d.run_to(start + secs(7));
    d.request("a.shop", LocalityTier::Cloud, false);
    assert_eq!(d.m.ramp_percent(), Some(4));
    let steps = d.take_steps();
    assert_eq!(
        steps,
        [RampStep {
            at: d.t0 + start + secs(7),
            from_percent: 8,
            to_percent: 4,
            step: 2,
            change: RampChange::SteppedBack {
                failures: 1,
                tolerated: 0,
                cause: RampFailure::RemoteRequest
            },
        }]
    );
    assert_eq!(
        d.m.poll_timeout().unwrap(),
        d.t0 + start + ms(7_500),
        "a bucket tick first"
    );
    d.run_to(start + ms(8_999));
    assert_eq!(d.m.ramp_percent(), Some(4), "the step restarted at 7 s");
    d.run_to(start + secs(9));
    assert_eq!(d.m.ramp_percent(), Some(8));
    // A failed health check counts too.
    d.check(false);
    assert_eq!(d.m.ramp_percent(), Some(4));
    assert!(matches!(
        d.take_steps().last().unwrap().change,
        RampChange::SteppedBack {
            cause: RampFailure::HealthCheck,
            ..
        }
    ));
    assert_eq!(d.m.spoke_mode(), Mode::Recovery);
}

#[test]
fn a_failure_on_the_first_step_only_restarts_it() {
    let mut d = Driver::new(&drill());
    d.enter_recovery();
    let start = d.elapsed();
    d.run_to(start + ms(1_500));
    d.request("a.shop", LocalityTier::SameZone, false);
    assert_eq!(d.m.ramp_percent(), Some(1));
    let steps = d.take_steps();
    assert_eq!((steps[0].from_percent, steps[0].to_percent), (1, 1));
    d.run_to(start + ms(3_499));
    assert_eq!(d.m.ramp_percent(), Some(1));
    d.run_to(start + ms(3_500));
    assert_eq!(d.m.ramp_percent(), Some(2));
}

#[test]
fn tolerated_failures_do_not_step_back() {
    let mut matrix = drill();
    if let Some(r) = &mut matrix.recovery.ramp {
        r.tolerated_failures = 2;
    }
    let mut d = Driver::new(&matrix);
    d.enter_recovery();
    let start = d.elapsed();
    d.run_to(start + secs(4));
    assert_eq!(d.m.ramp_percent(), Some(4));
    d.request("a.shop", LocalityTier::Cloud, false);
    d.check(false);
    assert_eq!(d.m.ramp_percent(), Some(4), "2 failures tolerated");
    d.run_to(start + secs(6));
    assert_eq!(d.m.ramp_percent(), Some(8), "a healthy step: advanced");
    // The count starts again with each step: 2 more are tolerated.
    d.request("a.shop", LocalityTier::Cloud, false);
    d.request("a.shop", LocalityTier::Cloud, false);
    assert_eq!(d.m.ramp_percent(), Some(8));
    d.request("a.shop", LocalityTier::Cloud, false);
    assert_eq!(d.m.ramp_percent(), Some(4));
    assert!(matches!(
        d.take_steps().last().unwrap().change,
        RampChange::SteppedBack {
            failures: 3,
            tolerated: 2,
            ..
        }
    ));
}

#[test]
fn a_failure_at_100_percent_delays_target() {
    let mut d = Driver::new(&drill());
    d.enter_recovery();
    let start = d.elapsed();
    d.run_to(start + secs(15));
    assert_eq!(d.m.ramp_percent(), Some(100));
    d.request("a.shop", LocalityTier::Remote, false);
    assert_eq!(d.m.ramp_percent(), Some(64));
    d.run_to(start + secs(17));
    assert_eq!(d.m.ramp_percent(), Some(100));
    d.run_to(start + ms(18_999));
    assert_eq!(d.m.spoke_mode(), Mode::Recovery);
    d.run_to(start + secs(19));
    assert_eq!(d.m.spoke_mode(), Mode::Target);
}

#[test]
fn a_partition_during_recovery_returns_to_survival() {
    let mut d = Driver::new(&drill());
    d.enter_recovery();
    let start = d.elapsed();
    d.run_to(start + secs(5));
    d.reach(partitioned());
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    let t = &ts[0];
    assert_eq!((t.from, t.to), (Mode::Recovery, Mode::Survival));
    assert_eq!(
        t.trigger,
        Trigger::PartitionDuringRecovery {
            reachability: partitioned(),
            ramp: RampEvidence {
                step: 2,
                percent: 4,
                step_length: secs(2),
                failures_in_step: 0,
                tolerated_failures: 0,
            },
        }
    );
    assert_eq!(t.to_json()["evidence"]["ramp"]["traffic_percent"], 4);
    assert_eq!(d.m.ramp_percent(), None);
    // The checks are counted afresh.
    d.reach(connected());
    assert_eq!(d.m.spoke_mode(), Mode::Survival);
    for _ in 0..3 {
        d.check(true);
    }
    assert_eq!(d.m.spoke_mode(), Mode::Recovery);
    assert_eq!(d.m.ramp_percent(), Some(1), "the ramp starts over");
}

#[test]
fn admission_follows_the_ramp_and_tells_when_to_retry() {
    let mut d = Driver::new(&drill());
    assert_eq!(d.m.admit_remote(d.now, u64::MAX), RemoteAdmission::Admit);
    d.enter_recovery();
    let start = d.elapsed();
    d.run_to(start + ms(500));
    assert_eq!(d.m.admit_remote(d.now, 0), RemoteAdmission::Admit);
    assert_eq!(
        d.m.admit_remote(d.now, u64::MAX),
        RemoteAdmission::Refuse {
            retry_after: Some(ms(1_500))
        }
    );
    let p = d.m.effective_profile("a.shop");
    assert_eq!(p.mode, Mode::Recovery);
    assert_eq!(p.routing, RoutingMode::Ramp);
    assert_eq!(p.ramp_percent, Some(1));
    assert_eq!(p.breaker, BreakerMode::ErrorRate(Ratio::percent(20)));
    assert_eq!(p.sampling, Ratio::ONE);
}

// --- spoke and services together -----------------------------------------------

#[test]
fn the_spokes_survival_and_recovery_override_a_degraded_service() {
    let mut d = Driver::new(&drill());
    for _ in 0..20 {
        d.local("a.shop", false);
    }
    assert_eq!(d.m.mode("a.shop"), Mode::Degraded);
    d.take();
    d.reach(partitioned());
    assert_eq!(d.m.mode("a.shop"), Mode::Survival);
    assert_eq!(d.m.service_mode("a.shop"), Mode::Degraded);
    assert_eq!(
        d.m.effective_profile("a.shop").routing,
        RoutingMode::LocalOnly
    );
    d.reach(connected());
    for _ in 0..3 {
        d.check(true);
    }
    assert_eq!(d.m.mode("a.shop"), Mode::Recovery);
    assert_eq!(d.m.effective_profile("a.shop").ramp_percent, Some(1));
    let ts = d.take();
    assert_eq!(ts.len(), 2, "{ts:?}");
    // The ramp completes at 16 s; the service's own mode applies again.
    d.run_to(secs(17));
    assert_eq!(d.m.spoke_mode(), Mode::Target);
    assert_eq!(d.m.mode("a.shop"), Mode::Degraded);
    assert_eq!(
        d.m.effective_profile("a.shop").routing,
        RoutingMode::HealthyOnly
    );
    // It was measured all along: calm since its failures left the window at
    // 10 s, it heals at 20 s.
    d.run_to(secs(30));
    let ts = d.take();
    assert_eq!(
        ts.iter()
            .map(|t| (t.scope.clone(), t.from, t.to, t.at - d.t0))
            .collect::<Vec<_>>(),
        [
            (Scope::Spoke, Mode::Recovery, Mode::Target, secs(16)),
            (service("a.shop"), Mode::Degraded, Mode::Target, secs(20)),
        ]
    );
    assert_eq!(d.m.mode("a.shop"), Mode::Target);
}

#[test]
fn the_least_recently_seen_service_is_evicted() {
    let mut d = Driver::new(&drill());
    d.m = d.m.clone().with_max_services(3);
    for _ in 0..20 {
        d.local("a.shop", false);
    }
    d.take();
    d.local("b.shop", true);
    d.local("c.shop", true);
    d.local("d.shop", true);
    assert_eq!(d.m.tracked_services(), 3);
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].scope, service("a.shop"));
    assert_eq!((ts[0].from, ts[0].to), (Mode::Degraded, Mode::Target));
    assert_eq!(ts[0].trigger.as_str(), "service_evicted");
    assert_eq!(error_rate(&ts[0]).failed_requests, 20);
    d.local("c.shop", true);
    d.local("e.shop", true);
    let names: Vec<&str> = d.m.services().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["c.shop", "d.shop", "e.shop"],
        "b went: seen least recently"
    );
    assert!(d.take().is_empty(), "a Target service goes quietly");
}

#[test]
fn at_most_max_services_are_tracked() {
    let mut d = Driver::new(&ModeMatrix::default());
    for i in 0..(MAX_SERVICES + 500) {
        d.local(&format!("svc-{i}.shop"), true);
    }
    assert_eq!(d.m.tracked_services(), MAX_SERVICES);
    assert_eq!(d.m.service_mode("svc-0.shop"), Mode::Target);
    assert!(d.m.services().any(|(n, _)| n == "svc-4595.shop"));
    assert!(!d.m.services().any(|(n, _)| n == "svc-0.shop"));
}

#[test]
fn unpolled_outputs_are_bounded() {
    let t0 = Instant::now();
    let mut m = ModeMachine::new(t0, &drill()).unwrap();
    for i in 0..(MAX_QUEUED_TRANSITIONS + 10) {
        let t = t0 + ms(i as u64);
        let r = if i % 2 == 0 {
            partitioned()
        } else {
            connected()
        };
        m.handle_reachability(t, r);
        for _ in 0..3 {
            m.handle_health_check(t, true);
        }
    }
    assert!(m.queued_outputs() <= MAX_QUEUED_TRANSITIONS + MAX_QUEUED_RAMP_STEPS);
    assert!(m.dropped_outputs() > 0);
}

// --- hostile input ------------------------------------------------------------

#[test]
fn bad_inputs_are_errors_and_change_nothing() {
    let t0 = Instant::now();
    let mut m = ModeMachine::new(t0, &drill()).unwrap();
    let long = "a".repeat(MAX_SERVICE_NAME + 1);
    for name in ["", long.as_str()] {
        let outcome = RequestOutcome {
            service: name,
            tier: LocalityTier::SameSite,
            ok: false,
        };
        assert_eq!(
            m.handle_request(t0, outcome),
            Err(ModeError::ServiceName { len: name.len() })
        );
    }
    assert_eq!(m.tracked_services(), 0);
    assert_eq!(
        EndpointCount::new(3, 2),
        Err(ModeError::EndpointCount {
            reachable: 3,
            total: 2
        })
    );

    let bad: Vec<(&str, ModeMatrix)> = vec![
        ("degradation.enter_error_rate", {
            let mut m = drill();
            m.degradation.enter_error_rate = Ratio::ZERO;
            m.degradation.exit_error_rate = Ratio::ZERO;
            m
        }),
        ("degradation.exit_error_rate", {
            let mut m = drill();
            m.degradation.exit_error_rate = m.degradation.enter_error_rate;
            m
        }),
        ("degradation.window", {
            let mut m = drill();
            m.degradation.window = Duration::ZERO;
            m
        }),
        ("degradation.min_requests", {
            let mut m = drill();
            m.degradation.min_requests = 0;
            m
        }),
        ("reconnection.health_checks", {
            let mut m = drill();
            m.reconnection.health_checks = MAX_HEALTH_CHECKS + 1;
            m
        }),
        ("reconnection.window", {
            let mut m = drill();
            m.reconnection.window = Duration::ZERO;
            m
        }),
        ("recovery.ramp.start_percent", {
            let mut m = drill();
            m.recovery.ramp = Some(Ramp {
                start_percent: 0,
                ..Ramp::default()
            });
            m
        }),
        ("recovery.ramp.factor", {
            let mut m = drill();
            m.recovery.ramp = Some(Ramp {
                factor: 1,
                ..Ramp::default()
            });
            m
        }),
        ("recovery.ramp.step", {
            let mut m = drill();
            m.recovery.ramp = Some(Ramp {
                step: Duration::ZERO,
                ..Ramp::default()
            });
            m
        }),
    ];
    for (field, matrix) in bad {
        match m.handle_config(t0, &matrix) {
            Err(ModeError::InvalidMatrix { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
        assert!(ModeMachine::new(t0, &matrix).is_err());
        assert_eq!(m.matrix(), &drill(), "the old matrix stays");
    }
    let e = m.handle_config(t0, &{
        let mut m = drill();
        m.degradation.exit_error_rate = Ratio::percent(40);
        m
    });
    assert_eq!(
        e.unwrap_err().to_string(),
        "mode matrix field degradation.exit_error_rate: must be below enter_error_rate (0.3), got 0.4; fix the ModeMatrix (the previous one stays in force)"
    );
}

#[test]
fn time_going_backwards_counts_as_the_latest_time() {
    let mut d = Driver::new(&drill());
    d.run_to(secs(100));
    d.m.handle_timeout(d.now); // the machine has seen 100 s
    let past = d.t0;
    for _ in 0..20 {
        let outcome = RequestOutcome {
            service: "a.shop",
            tier: LocalityTier::Cloud,
            ok: false,
        };
        d.m.handle_request(past, outcome).unwrap();
    }
    let ts = d.take();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].at, d.t0 + secs(100));
    d.m.handle_timeout(past);
    d.m.handle_reachability(past, partitioned());
    assert_eq!(d.take()[0].at, d.t0 + secs(100));
}

#[test]
fn the_error_rate_evidence_has_the_seeds_shape() {
    let mut d = Driver::new(&ModeMatrix::default());
    for i in 0..20 {
        d.local("backend.payments", i % 3 == 0);
    }
    let t = d.take().remove(0);
    let j = t.to_json();
    assert_eq!(j["scope"], "service");
    assert_eq!(j["from"], "target");
    assert_eq!(j["to"], "degraded");
    assert_eq!(j["trigger"], "error_rate_exceeded");
    let e = &j["evidence"];
    assert_eq!(e["service"], "backend.payments");
    assert_eq!(e["error_rate"], 0.65);
    assert_eq!(e["threshold"], 0.3);
    assert_eq!(e["window"], "5m");
    assert_eq!(e["failed_requests"], 13);
    assert_eq!(e["total_requests"], 20);
    assert_eq!(j["actions"][1], "retries: linear backoff x2");
}

// --- properties ---------------------------------------------------------------

const NAMES: [&str; 6] = ["a.shop", "b.shop", "c.shop", "d.shop", "e.shop", "f.shop"];
const TIERS: [LocalityTier; 5] = [
    LocalityTier::SameSite,
    LocalityTier::SameZone,
    LocalityTier::SameRegion,
    LocalityTier::Cloud,
    LocalityTier::Remote,
];

#[derive(Clone, Debug)]
enum Input {
    Request {
        service: usize,
        tier: usize,
        ok: bool,
    },
    Reach {
        hub: bool,
        counts: [(u8, u8); 5],
    },
    Check {
        ok: bool,
    },
    Timeout,
    Advance {
        ms: u64,
    },
    Config {
        which: usize,
    },
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => (0..NAMES.len(), 0..TIERS.len(), prop::bool::weighted(0.7))
            .prop_map(|(service, tier, ok)| Input::Request { service, tier, ok }),
        2 => (any::<bool>(), prop::array::uniform5((0u8..3, 0u8..3)))
            .prop_map(|(hub, counts)| Input::Reach { hub, counts }),
        3 => prop::bool::weighted(0.8).prop_map(|ok| Input::Check { ok }),
        3 => Just(Input::Timeout),
        3 => (0u64..3_000).prop_map(|ms| Input::Advance { ms }),
        1 => (0usize..3).prop_map(|which| Input::Config { which }),
    ]
}

/// Small valid matrices, so that short sequences reach every mode.
fn config(which: usize) -> ModeMatrix {
    let mut m = ModeMatrix {
        degradation: Degradation {
            window: secs(2),
            min_requests: 3,
            ..Degradation::default()
        },
        reconnection: Reconnection {
            health_checks: 2,
            window: secs(5),
        },
        ..ModeMatrix::default()
    };
    m.recovery.ramp = Some(Ramp {
        step: ms(400),
        ..Ramp::default()
    });
    match which {
        1 => {
            m.degradation.enter_error_rate = Ratio::percent(10);
            m.degradation.exit_error_rate = Ratio::percent(5);
        }
        2 => {
            m.degradation.window = secs(3);
            m.reconnection.health_checks = 4;
            m.recovery.ramp = Some(Ramp {
                start_percent: 5,
                factor: 3,
                step: ms(300),
                tolerated_failures: 1,
            });
        }
        _ => {}
    }
    m
}

fn reachability(hub: bool, counts: [(u8, u8); 5]) -> Reachability {
    TIERS
        .iter()
        .zip(counts)
        .fold(Reachability::new(hub), |r, (tier, (a, b))| {
            let count = EndpointCount::new(u32::from(a.min(b)), u32::from(b)).unwrap();
            r.with_tier(*tier, count)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_input_sequence_keeps_the_machine_consistent_and_bounded(
        inputs in prop::collection::vec(input(), 1..300)
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut m = ModeMachine::new(t0, &config(0)).unwrap().with_max_services(4);
        let mut current = 0;
        // What the transitions say each scope's mode is.
        let mut modes: HashMap<Scope, Mode> = HashMap::new();
        for input in inputs {
            let before = m.ramp_percent();
            let mut may_lower_ramp = false;
            match input {
                Input::Request { service, tier, ok } => {
                    let tier = TIERS[tier];
                    may_lower_ramp = !ok && is_remote(tier);
                    let outcome = RequestOutcome { service: NAMES[service], tier, ok };
                    prop_assert!(m.handle_request(now, outcome).is_ok());
                }
                Input::Reach { hub, counts } => m.handle_reachability(now, reachability(hub, counts)),
                Input::Check { ok } => {
                    may_lower_ramp = !ok;
                    m.handle_health_check(now, ok);
                }
                Input::Timeout => {
                    if let Some(t) = m.poll_timeout() {
                        now = now.max(t);
                    }
                    m.handle_timeout(now);
                }
                Input::Advance { ms: d } => now += ms(d),
                Input::Config { which } => {
                    may_lower_ramp = which != current;
                    current = which;
                    prop_assert!(m.handle_config(now, &config(which)).is_ok());
                }
            }
            // Every transition changes a mode, starting from the one the
            // scope was in, and the last one is the mode reported now.
            while let Some(t) = m.poll_transition() {
                prop_assert_ne!(t.from, t.to);
                prop_assert!(t.at <= now);
                let was = modes.get(&t.scope).copied().unwrap_or(Mode::Target);
                prop_assert_eq!(was, t.from, "{:?}", t);
                match &t.scope {
                    Scope::Spoke => prop_assert!(t.to != Mode::Degraded),
                    Scope::Service(_) => prop_assert!(matches!(t.to, Mode::Target | Mode::Degraded)),
                }
                modes.insert(t.scope.clone(), t.to);
            }
            prop_assert_eq!(modes.get(&Scope::Spoke).copied().unwrap_or(Mode::Target), m.spoke_mode());
            for name in NAMES {
                let want = modes.get(&Scope::Service(name.to_string())).copied().unwrap_or(Mode::Target);
                prop_assert_eq!(want, m.service_mode(name), "{}", name);
                let effective = m.mode(name);
                prop_assert!(effective == m.spoke_mode() || m.spoke_mode() == Mode::Target);
            }
            // Ramp steps only while in Recovery; percent in 1..=100 and
            // never lower without a failure or a new ramp.
            while let Some(s) = m.poll_ramp_step() {
                prop_assert!((1..=100).contains(&s.to_percent));
                if s.change == RampChange::Advanced {
                    prop_assert!(s.to_percent > s.from_percent);
                }
            }
            let after = m.ramp_percent();
            prop_assert_eq!(after.is_some(), m.spoke_mode() == Mode::Recovery);
            if let Some(p) = after {
                prop_assert!((1..=100).contains(&p));
                if let (Some(b), false) = (before, may_lower_ramp) {
                    prop_assert!(p >= b, "{} -> {}", b, p);
                }
            }
            // Bounded memory.
            prop_assert!(m.tracked_services() <= 4);
            prop_assert!(m.held_health_checks() <= 4);
            prop_assert!(m.queued_outputs() == 0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn remote_admission_matches_the_ramp_percent(
        seed in any::<u64>(),
        start_percent in 1u8..=20,
        factor in 2u8..=4,
    ) {
        let mut matrix = drill();
        matrix.recovery.ramp = Some(Ramp { start_percent, factor, step: secs(2), tolerated_failures: 0 });
        let mut d = Driver::new(&matrix);
        d.enter_recovery();
        let start = d.elapsed();
        let mut rng = SplitMix64::new(seed);
        let mut k = 0;
        while let Some(p) = d.m.ramp_percent() {
            let draws = 20_000u32;
            let admitted = (0..draws)
                .filter(|_| d.m.admit_remote(d.now, rng.next_u64()) == RemoteAdmission::Admit)
                .count();
            let share = admitted as f64 * 100.0 / f64::from(draws);
            prop_assert!((share - f64::from(p)).abs() <= 2.0, "{}% admitted at {}%", share, p);
            k += 1;
            d.run_to(start + secs(2 * k));
        }
        prop_assert_eq!(d.m.spoke_mode(), Mode::Target);
    }
}

#[test]
fn a_ramp_with_no_failures_is_monotonic_and_ends_in_target() {
    for (start_percent, factor) in [(1, 2), (3, 3), (50, 2), (100, 2), (7, 10)] {
        let mut matrix = drill();
        matrix.recovery.ramp = Some(Ramp {
            start_percent,
            factor,
            step: SEC,
            tolerated_failures: 0,
        });
        let mut d = Driver::new(&matrix);
        d.enter_recovery();
        let start = d.elapsed();
        let mut seen = Vec::new();
        for k in 0..20 {
            d.run_to(start + secs(k));
            if let Some(p) = d.m.ramp_percent() {
                seen.push(p);
            }
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(seen.first(), Some(&start_percent));
        assert_eq!(seen.last(), Some(&100));
        assert_eq!(d.m.spoke_mode(), Mode::Target);
    }
}

#[test]
fn observability_profiles_map_to_a_sampling_ratio() {
    let mut matrix = ModeMatrix::default();
    matrix.target.observability = Observability::MetricsOnly { buffered: false };
    let d = Driver::new(&matrix);
    let p = d.m.effective_profile("a.shop");
    assert_eq!((p.sampling, p.buffer_telemetry), (Ratio::ZERO, false));
}
