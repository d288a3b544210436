//! [`ModeMachine`]: the spoke-wide mode and the per-service modes inside it.
//!
//! What it is: the state machine the [module docs](super) describe, with the
//! quinn-proto shape: `handle_*(now, …)` inputs, `poll_*` outputs, and a
//! timer the driver arms at [`ModeMachine::poll_timeout`]. Who drives it: the
//! spoke's mode driver, one machine per spoke. What it must not do: read a
//! clock, draw randomness, do I/O, or panic; illegal states are kept out by
//! the types (a ramp exists only in Recovery, health checks are counted only
//! in Survival, a calm-since instant exists only for a Degraded service).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::connectivity::{is_remote, HealthChecks, Reachability};
use super::transition::{
    actions, ErrorRateEvidence, HealthCheckEvidence, RampChange, RampEvidence, RampFailure,
    RampStep, Scope, Transition, Trigger,
};
use super::window::{BucketClock, Window};
use super::{
    ModeError, MAX_HEALTH_CHECKS, MAX_QUEUED_RAMP_STEPS, MAX_QUEUED_TRANSITIONS, MAX_SERVICES,
    MAX_SERVICE_NAME,
};
use crate::model::{
    BreakerMode, Degradation, Mode, ModeMatrix, ModeRetries, Observability, Ramp, RoutingMode,
};
use crate::routing::{ramp_admits, LocalityTier};
use crate::units::Ratio;

/// One finished request, as the data plane reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestOutcome<'a> {
    /// The destination service's canonical host (`pos.retail`).
    pub service: &'a str,
    /// The locality tier of the endpoint that was tried (remote = every tier
    /// but `SameSite`, see [`super::is_remote`]).
    pub tier: LocalityTier,
    /// Whether it succeeded. A failure is a 5xx, a connect failure, a reset
    /// or a timeout; a 4xx is the service answering, a success.
    pub ok: bool,
}

/// Whether one request may go to a remote tier now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteAdmission {
    /// Go ahead.
    Admit,
    /// Not now: serve it from a same-site endpoint if there is one, else
    /// answer 503 at once.
    Refuse {
        /// For the 503's `retry-after`: the time to the Recovery ramp's next
        /// step; `None` in Survival, where no estimate exists.
        retry_after: Option<Duration>,
    },
}

/// What the data plane applies to a request to one service: the profile of
/// its effective mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveProfile {
    /// The effective mode (the spoke's in Survival and Recovery, else the
    /// service's own).
    pub mode: Mode,
    /// Which endpoints routing may use.
    pub routing: RoutingMode,
    /// Retries: attempts after the first try, and the backoff between them.
    pub retries: ModeRetries,
    /// Open at an error rate, or fail fast.
    pub breaker: BreakerMode,
    /// Share of requests traced (1 = full tracing, 0 = metrics only).
    pub sampling: Ratio,
    /// Telemetry is buffered for later upload (Survival's metrics only).
    pub buffer_telemetry: bool,
    /// Share of remote traffic admitted, percent, in Recovery only.
    pub ramp_percent: Option<u8>,
}

/// The spoke-wide state; each mode holds only what it needs.
#[derive(Clone, Debug)]
enum SpokeState {
    /// Target.
    Connected,
    /// Partitioned, counting health checks.
    Survival(HealthChecks),
    /// Ramping remote traffic.
    Recovery(RampState),
}

#[derive(Clone, Copy, Debug)]
struct RampState {
    /// Step index, at most the ramp's full step.
    step: u8,
    /// When this step began.
    started: Instant,
    /// Failures counted in this step (never above the tolerance: one more
    /// steps back and resets it).
    failures: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceMode {
    Target,
    /// Degraded; calm (at or below the exit threshold, or unmeasurable) at
    /// every check since `calm_since`, if set.
    Degraded {
        calm_since: Option<Instant>,
    },
}

impl ServiceMode {
    fn mode(self) -> Mode {
        match self {
            ServiceMode::Target => Mode::Target,
            ServiceMode::Degraded { .. } => Mode::Degraded,
        }
    }
}

#[derive(Clone, Debug)]
struct Service {
    window: Window,
    mode: ServiceMode,
    /// Input sequence number of the last request (least recently seen goes
    /// first when the table is full).
    seen: u64,
}

/// The mode machine of one spoke; see the [module docs](super) for the rules.
///
/// ```
/// use std::time::{Duration, Instant};
/// use tidemesh_policy::mode::{ModeMachine, Reachability, Scope};
/// use tidemesh_policy::model::{Mode, ModeMatrix};
///
/// let t0 = Instant::now();
/// let mut m = ModeMachine::new(t0, &ModeMatrix::default())?;
/// m.handle_reachability(t0, Reachability::new(false));
/// let t = m.poll_transition().expect("a partition");
/// assert_eq!((t.scope, t.from, t.to), (Scope::Spoke, Mode::Target, Mode::Survival));
/// assert_eq!(t.trigger.as_str(), "network_partition_detected");
/// assert_eq!(m.mode("pos.retail"), Mode::Survival);
/// # Ok::<(), tidemesh_policy::mode::ModeError>(())
/// ```
#[derive(Clone, Debug)]
pub struct ModeMachine {
    matrix: ModeMatrix,
    /// The Recovery profile's ramp (the default one if it has none).
    ramp: Ramp,
    /// The latest `now` seen.
    now: Instant,
    clock: BucketClock,
    /// The last bucket whose boundary was handled.
    ticked: u64,
    services: BTreeMap<String, Service>,
    max_services: usize,
    /// Input sequence, for least-recently-seen eviction.
    seq: u64,
    spoke: SpokeState,
    /// The latest reachability reported.
    reachability: Option<Reachability>,
    transitions: VecDeque<Transition>,
    ramp_steps: VecDeque<RampStep>,
    dropped: u64,
}

impl ModeMachine {
    /// A machine in Target with no service tracked, running `matrix`.
    pub fn new(now: Instant, matrix: &ModeMatrix) -> Result<ModeMachine, ModeError> {
        check_matrix(matrix)?;
        Ok(ModeMachine {
            matrix: matrix.clone(),
            ramp: recovery_ramp(matrix),
            now,
            clock: BucketClock::new(now, matrix.degradation.window),
            ticked: 0,
            services: BTreeMap::new(),
            max_services: MAX_SERVICES,
            seq: 0,
            spoke: SpokeState::Connected,
            reachability: None,
            transitions: VecDeque::new(),
            ramp_steps: VecDeque::new(),
            dropped: 0,
        })
    }

    /// The same machine tracking at most `n` services (tests of eviction).
    #[cfg(test)]
    pub(crate) fn with_max_services(mut self, n: usize) -> ModeMachine {
        self.max_services = n.max(1);
        self
    }

    /// Health-check timestamps held (tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn held_health_checks(&self) -> usize {
        match &self.spoke {
            SpokeState::Survival(checks) => checks.held(),
            SpokeState::Connected | SpokeState::Recovery(_) => 0,
        }
    }

    /// Outputs waiting to be polled (tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn queued_outputs(&self) -> usize {
        self.transitions.len() + self.ramp_steps.len()
    }

    // --- inputs -----------------------------------------------------------

    /// Runs `matrix` from now on: thresholds, minimum requests, health-check
    /// counts and the ramp apply at once (every service is checked against
    /// them here), a Recovery ramp keeps its step (capped at the new ramp's
    /// last) and its step's start. A new window length starts every window
    /// afresh (counts are not re-bucketed); modes are kept. An invalid
    /// matrix changes nothing.
    pub fn handle_config(&mut self, now: Instant, matrix: &ModeMatrix) -> Result<(), ModeError> {
        check_matrix(matrix)?;
        let now = self.advance_clock(now);
        let window_changed = matrix.degradation.window != self.matrix.degradation.window;
        self.matrix = matrix.clone();
        self.ramp = recovery_ramp(matrix);
        if window_changed {
            self.clock = BucketClock::new(now, matrix.degradation.window);
            self.ticked = 0;
            for s in self.services.values_mut() {
                s.window = Window::new(0);
            }
        }
        let full = full_step(&self.ramp);
        let rule = self.matrix.reconnection;
        match &mut self.spoke {
            SpokeState::Recovery(r) => r.step = r.step.min(full),
            SpokeState::Survival(checks) => checks.prune(now, &rule),
            SpokeState::Connected => {}
        }
        self.check_all_services(now);
        self.try_reconnect(now);
        Ok(())
    }

    /// A request to `outcome.service` finished: counts in its window (which
    /// may make it Degraded or, after a calm window, Target), and a failed
    /// remote request counts against the Recovery ramp's step. An empty or
    /// overlong service name is refused (nothing counted).
    pub fn handle_request(
        &mut self,
        now: Instant,
        outcome: RequestOutcome<'_>,
    ) -> Result<(), ModeError> {
        let len = outcome.service.len();
        if len == 0 || len > MAX_SERVICE_NAME {
            return Err(ModeError::ServiceName { len });
        }
        let now = self.advance_clock(now);
        let index = self.clock.index(now);
        self.seq = self.seq.saturating_add(1);
        let degradation = self.matrix.degradation;
        let change = match self.services.get_mut(outcome.service) {
            Some(s) => {
                s.seen = self.seq;
                s.window.record(index, outcome.ok);
                check_service(s, now, &degradation)
            }
            None => {
                self.make_room(now, index);
                let mut s = Service {
                    window: Window::new(index),
                    mode: ServiceMode::Target,
                    seen: self.seq,
                };
                s.window.record(index, outcome.ok);
                let change = check_service(&mut s, now, &degradation);
                self.services.insert(outcome.service.to_string(), s);
                change
            }
        };
        if let Some((from, to, trigger)) = change {
            let scope = Scope::Service(outcome.service.to_string());
            self.push_transition(now, scope, from, to, trigger);
        }
        if !outcome.ok && is_remote(outcome.tier) {
            self.ramp_failure(now, RampFailure::RemoteRequest);
        }
        Ok(())
    }

    /// What the spoke reaches now. A partition (see
    /// [`Reachability::is_partition`]) sends Target or Recovery to Survival;
    /// in Survival, connectivity back plus passed health checks start
    /// Recovery.
    pub fn handle_reachability(&mut self, now: Instant, reachability: Reachability) {
        let now = self.advance_clock(now);
        self.reachability = Some(reachability);
        let partition = reachability.is_partition();
        match &self.spoke {
            SpokeState::Connected if partition => {
                self.spoke = SpokeState::Survival(HealthChecks::default());
                let trigger = Trigger::NetworkPartitionDetected(reachability);
                self.push_transition(now, Scope::Spoke, Mode::Target, Mode::Survival, trigger);
            }
            SpokeState::Recovery(r) if partition => {
                let ramp = ramp_evidence(r, &self.ramp);
                self.spoke = SpokeState::Survival(HealthChecks::default());
                let trigger = Trigger::PartitionDuringRecovery { reachability, ramp };
                self.push_transition(now, Scope::Spoke, Mode::Recovery, Mode::Survival, trigger);
            }
            SpokeState::Survival(_) => self.try_reconnect(now),
            SpokeState::Connected | SpokeState::Recovery(_) => {}
        }
    }

    /// An active health check of the hub or a remote tier. In Survival it
    /// counts towards Recovery (a failure resets the count); in Recovery a
    /// failure counts against the ramp's step; in Target it changes nothing.
    pub fn handle_health_check(&mut self, now: Instant, ok: bool) {
        let now = self.advance_clock(now);
        let rule = self.matrix.reconnection;
        match &mut self.spoke {
            SpokeState::Survival(checks) => {
                checks.record(now, ok, &rule);
                self.try_reconnect(now);
            }
            SpokeState::Recovery(_) if !ok => self.ramp_failure(now, RampFailure::HealthCheck),
            SpokeState::Recovery(_) | SpokeState::Connected => {}
        }
    }

    /// The timer fired (call it at or after [`ModeMachine::poll_timeout`]):
    /// ramp steps that are due advance (or complete Recovery), and at a
    /// window bucket boundary every service is checked and services in
    /// Target with an empty window are forgotten. Calling it early or twice
    /// is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.advance_clock(now);
        self.advance_ramp(now);
        let index = self.clock.index(now);
        if index > self.ticked {
            self.ticked = index;
            self.check_all_services(now);
            self.services
                .retain(|_, s| s.mode != ServiceMode::Target || s.window.requests() > 0);
        }
    }

    // --- outputs ----------------------------------------------------------

    /// When [`ModeMachine::handle_timeout`] should be called next: the
    /// Recovery step's end, or the next window bucket boundary while any
    /// service is tracked. `None`: nothing to wait for. May lie in the past
    /// (call it at once then).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let tick = if self.services.is_empty() {
            None
        } else {
            self.clock.start_of(self.ticked.saturating_add(1))
        };
        let step_end = match &self.spoke {
            SpokeState::Recovery(r) => r.started.checked_add(self.ramp.step),
            SpokeState::Connected | SpokeState::Survival(_) => None,
        };
        match (tick, step_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next mode change, oldest first.
    pub fn poll_transition(&mut self) -> Option<Transition> {
        self.transitions.pop_front()
    }

    /// The next move of the Recovery ramp, oldest first.
    pub fn poll_ramp_step(&mut self) -> Option<RampStep> {
        self.ramp_steps.pop_front()
    }

    /// Transitions and ramp steps dropped because nobody polled them
    /// (at most [`super::MAX_QUEUED_TRANSITIONS`] /
    /// [`super::MAX_QUEUED_RAMP_STEPS`] wait).
    pub fn dropped_outputs(&self) -> u64 {
        self.dropped
    }

    // --- queries ----------------------------------------------------------

    /// The spoke's mode: Target, Survival or Recovery.
    pub fn spoke_mode(&self) -> Mode {
        match self.spoke {
            SpokeState::Connected => Mode::Target,
            SpokeState::Survival(_) => Mode::Survival,
            SpokeState::Recovery(_) => Mode::Recovery,
        }
    }

    /// The service's own mode, Target or Degraded (Target for a service not
    /// tracked), whatever the spoke's mode.
    pub fn service_mode(&self, service: &str) -> Mode {
        self.services
            .get(service)
            .map_or(Mode::Target, |s| s.mode.mode())
    }

    /// The service's effective mode: the spoke's when that is Survival or
    /// Recovery, else the service's own.
    pub fn mode(&self, service: &str) -> Mode {
        match self.spoke_mode() {
            Mode::Target => self.service_mode(service),
            spoke => spoke,
        }
    }

    /// What the data plane applies to a request to `service` now.
    pub fn effective_profile(&self, service: &str) -> EffectiveProfile {
        let mode = self.mode(service);
        let p = self.matrix.profile(mode);
        let (sampling, buffer_telemetry) = match p.observability {
            Observability::Tracing { sampling } => (sampling, false),
            Observability::MetricsOnly { buffered } => (Ratio::ZERO, buffered),
        };
        EffectiveProfile {
            mode,
            routing: p.routing,
            retries: p.retries,
            breaker: p.breaker,
            sampling,
            buffer_telemetry,
            ramp_percent: if mode == Mode::Recovery {
                self.ramp_percent()
            } else {
                None
            },
        }
    }

    /// The share of remote traffic the Recovery ramp admits now, percent
    /// (1..=100); `None` outside Recovery.
    pub fn ramp_percent(&self) -> Option<u8> {
        match &self.spoke {
            SpokeState::Recovery(r) => Some(self.ramp.percent_at_step(u32::from(r.step))),
            SpokeState::Connected | SpokeState::Survival(_) => None,
        }
    }

    /// Whether a request may go to a remote tier, given a uniformly random
    /// `rand`: always in Target, never in Survival, and in Recovery with the
    /// ramp's probability ([`crate::routing::ramp_admits`]). A refusal in
    /// Recovery carries the time from `now` to the next step.
    pub fn admit_remote(&self, now: Instant, rand: u64) -> RemoteAdmission {
        match &self.spoke {
            SpokeState::Connected => RemoteAdmission::Admit,
            SpokeState::Survival(_) => RemoteAdmission::Refuse { retry_after: None },
            SpokeState::Recovery(r) => {
                if ramp_admits(self.ramp.percent_at_step(u32::from(r.step)), rand) {
                    RemoteAdmission::Admit
                } else {
                    let end = r.started.checked_add(self.ramp.step);
                    RemoteAdmission::Refuse {
                        retry_after: Some(
                            end.map_or(self.ramp.step, |e| e.saturating_duration_since(now)),
                        ),
                    }
                }
            }
        }
    }

    /// The services tracked and their own modes, by name.
    pub fn services(&self) -> impl Iterator<Item = (&str, Mode)> + '_ {
        self.services
            .iter()
            .map(|(name, s)| (name.as_str(), s.mode.mode()))
    }

    /// How many services are tracked (at most [`super::MAX_SERVICES`]).
    pub fn tracked_services(&self) -> usize {
        self.services.len()
    }

    /// The matrix in force.
    pub fn matrix(&self) -> &ModeMatrix {
        &self.matrix
    }

    // --- internals --------------------------------------------------------

    /// `now`, or the latest instant seen if `now` is earlier.
    fn advance_clock(&mut self, now: Instant) -> Instant {
        if now > self.now {
            self.now = now;
        }
        self.now
    }

    fn push_transition(
        &mut self,
        at: Instant,
        scope: Scope,
        from: Mode,
        to: Mode,
        trigger: Trigger,
    ) {
        if self.transitions.len() >= MAX_QUEUED_TRANSITIONS {
            self.transitions.pop_front();
            self.dropped = self.dropped.saturating_add(1);
        }
        self.transitions.push_back(Transition {
            at,
            scope,
            from,
            to,
            trigger,
            actions: actions(self.matrix.profile(to)),
        });
    }

    fn push_ramp_step(&mut self, step: RampStep) {
        if self.ramp_steps.len() >= MAX_QUEUED_RAMP_STEPS {
            self.ramp_steps.pop_front();
            self.dropped = self.dropped.saturating_add(1);
        }
        self.ramp_steps.push_back(step);
    }

    /// Checks every service at `now`, in name order.
    fn check_all_services(&mut self, now: Instant) {
        let index = self.clock.index(now);
        let degradation = self.matrix.degradation;
        let mut changes = Vec::new();
        for (name, s) in self.services.iter_mut() {
            s.window.advance(index);
            if let Some(change) = check_service(s, now, &degradation) {
                changes.push((name.clone(), change));
            }
        }
        for (name, (from, to, trigger)) in changes {
            self.push_transition(now, Scope::Service(name), from, to, trigger);
        }
    }

    /// Evicts least recently seen services until one more fits.
    fn make_room(&mut self, now: Instant, index: u64) {
        while self.services.len() >= self.max_services {
            let Some(name) = self
                .services
                .iter()
                .min_by_key(|(_, s)| s.seen)
                .map(|(name, _)| name.clone())
            else {
                return;
            };
            let Some(mut s) = self.services.remove(&name) else {
                return;
            };
            if let ServiceMode::Degraded { .. } = s.mode {
                s.window.advance(index);
                let evidence = error_rate_evidence(&s.window, &self.matrix.degradation, false);
                let trigger = Trigger::ServiceEvicted(evidence);
                self.push_transition(
                    now,
                    Scope::Service(name),
                    Mode::Degraded,
                    Mode::Target,
                    trigger,
                );
            }
        }
    }

    /// Survival → Recovery if connectivity is back and the checks passed.
    fn try_reconnect(&mut self, now: Instant) {
        let SpokeState::Survival(checks) = &self.spoke else {
            return;
        };
        let Some(reachability) = self.reachability else {
            return;
        };
        let rule = self.matrix.reconnection;
        if reachability.is_partition() || !checks.passed(now, &rule) {
            return;
        }
        let evidence = HealthCheckEvidence {
            successful_health_checks: checks.passes(now, &rule),
            failed_health_checks: checks.failures(now, &rule),
            required: rule.health_checks,
            window: rule.window,
            reachability,
        };
        self.spoke = SpokeState::Recovery(RampState {
            step: 0,
            started: now,
            failures: 0,
        });
        let trigger = Trigger::ConnectivityRestored(evidence);
        self.push_transition(now, Scope::Spoke, Mode::Survival, Mode::Recovery, trigger);
    }

    /// Advances every ramp step that is due (each anchored at the end of the
    /// one before, so a late timer keeps the schedule), completing Recovery
    /// after a healthy step at 100 %.
    fn advance_ramp(&mut self, now: Instant) {
        // At most full_step + 1 rounds: every round advances or returns.
        loop {
            let SpokeState::Recovery(r) = &mut self.spoke else {
                return;
            };
            let Some(end) = r.started.checked_add(self.ramp.step) else {
                return;
            };
            if now < end {
                return;
            }
            if r.step >= full_step(&self.ramp) {
                let evidence = ramp_evidence(r, &self.ramp);
                self.spoke = SpokeState::Connected;
                let trigger = Trigger::RampComplete(evidence);
                self.push_transition(now, Scope::Spoke, Mode::Recovery, Mode::Target, trigger);
                return;
            }
            let from_percent = self.ramp.percent_at_step(u32::from(r.step));
            r.step += 1;
            r.started = end;
            r.failures = 0;
            let step = RampStep {
                at: now,
                from_percent,
                to_percent: self.ramp.percent_at_step(u32::from(r.step)),
                step: r.step,
                change: RampChange::Advanced,
            };
            self.push_ramp_step(step);
        }
    }

    /// A failure against the Recovery ramp: beyond the tolerance, one step
    /// back and the step timer restarted.
    fn ramp_failure(&mut self, now: Instant, cause: RampFailure) {
        let SpokeState::Recovery(r) = &mut self.spoke else {
            return;
        };
        r.failures = r.failures.saturating_add(1);
        let tolerated = self.ramp.tolerated_failures;
        if r.failures <= tolerated {
            return;
        }
        let from_percent = self.ramp.percent_at_step(u32::from(r.step));
        let failures = r.failures;
        r.step = r.step.saturating_sub(1);
        r.started = now;
        r.failures = 0;
        let step = RampStep {
            at: now,
            from_percent,
            to_percent: self.ramp.percent_at_step(u32::from(r.step)),
            step: r.step,
            change: RampChange::SteppedBack {
                failures,
                tolerated,
                cause,
            },
        };
        self.push_ramp_step(step);
    }
}

/// Checks one service's window against the thresholds; the mode change, if
/// any.
fn check_service(s: &mut Service, now: Instant, d: &Degradation) -> Option<(Mode, Mode, Trigger)> {
    let measurable = s.window.requests() >= u64::from(d.min_requests);
    match &mut s.mode {
        ServiceMode::Target => {
            if measurable && s.window.rate_at_least(d.enter_error_rate) {
                s.mode = ServiceMode::Degraded { calm_since: None };
                let evidence = error_rate_evidence(&s.window, d, true);
                return Some((
                    Mode::Target,
                    Mode::Degraded,
                    Trigger::ErrorRateExceeded(evidence),
                ));
            }
            None
        }
        ServiceMode::Degraded { calm_since } => {
            if measurable && s.window.rate_above(d.exit_error_rate) {
                *calm_since = None;
                return None;
            }
            let since = *calm_since.get_or_insert(now);
            if now.saturating_duration_since(since) < d.window {
                return None;
            }
            s.mode = ServiceMode::Target;
            let evidence = error_rate_evidence(&s.window, d, false);
            Some((
                Mode::Degraded,
                Mode::Target,
                Trigger::ErrorRateRecovered(evidence),
            ))
        }
    }
}

fn error_rate_evidence(w: &Window, d: &Degradation, entering: bool) -> ErrorRateEvidence {
    ErrorRateEvidence {
        error_rate: w.error_rate(),
        threshold: if entering {
            d.enter_error_rate
        } else {
            d.exit_error_rate
        },
        window: d.window,
        total_requests: w.requests(),
        failed_requests: w.errors(),
        min_requests: d.min_requests,
    }
}

fn ramp_evidence(r: &RampState, ramp: &Ramp) -> RampEvidence {
    RampEvidence {
        step: r.step,
        percent: ramp.percent_at_step(u32::from(r.step)),
        step_length: ramp.step,
        failures_in_step: r.failures,
        tolerated_failures: ramp.tolerated_failures,
    }
}

/// The ramp's first step at 100 % (at most 7 for a valid ramp).
fn full_step(ramp: &Ramp) -> u8 {
    u8::try_from(ramp.full_step()).unwrap_or(u8::MAX)
}

fn recovery_ramp(matrix: &ModeMatrix) -> Ramp {
    matrix.recovery.ramp.unwrap_or_default()
}

/// The checks the YAML input makes, for matrices built in code.
fn check_matrix(m: &ModeMatrix) -> Result<(), ModeError> {
    let invalid =
        |field: &'static str, reason: String| Err(ModeError::InvalidMatrix { field, reason });
    let d = &m.degradation;
    if d.enter_error_rate == Ratio::ZERO {
        return invalid("degradation.enter_error_rate", "must be above 0".into());
    }
    if d.exit_error_rate >= d.enter_error_rate {
        return invalid(
            "degradation.exit_error_rate",
            format!(
                "must be below enter_error_rate ({}), got {}",
                d.enter_error_rate, d.exit_error_rate
            ),
        );
    }
    if d.window.is_zero() {
        return invalid("degradation.window", "must be longer than 0".into());
    }
    if d.min_requests == 0 {
        return invalid("degradation.min_requests", "must be at least 1".into());
    }
    let r = &m.reconnection;
    if r.health_checks == 0 || r.health_checks > MAX_HEALTH_CHECKS {
        return invalid(
            "reconnection.health_checks",
            format!(
                "must be between 1 and {MAX_HEALTH_CHECKS}, got {}",
                r.health_checks
            ),
        );
    }
    if r.window.is_zero() {
        return invalid("reconnection.window", "must be longer than 0".into());
    }
    if let Some(ramp) = &m.recovery.ramp {
        if !(1..=100).contains(&ramp.start_percent) {
            return invalid(
                "recovery.ramp.start_percent",
                format!("must be between 1 and 100, got {}", ramp.start_percent),
            );
        }
        if ramp.factor < 2 {
            return invalid(
                "recovery.ramp.factor",
                format!("must be at least 2, got {}", ramp.factor),
            );
        }
        if ramp.step.is_zero() {
            return invalid("recovery.ramp.step", "must be longer than 0".into());
        }
    }
    Ok(())
}
