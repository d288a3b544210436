//! The spoke's modes: the driver of the sans-IO mode machine
//! (`tidemesh_policy::mode`).
//!
//! What it is: [`Modes`], the one owner of the spoke's [`ModeMachine`]. The
//! data plane reports every attempt's outcome ([`Modes::report`]) and asks
//! for the profile it applies to a request ([`Modes::profile`]) and whether
//! the Recovery ramp admits a remote call ([`Modes::admit_remote`]); the
//! control session reports the hub's reachability and the health checks;
//! the config in force brings the `ModeMatrix`. Every transition (and every
//! ramp step) becomes an audit evidence record with what was measured, a
//! log line on the `tidemesh::audit` target, and a new [`ModeView`] on a
//! `watch` for status, metrics and vectors.
//!
//! Who drives it: [`crate::Spoke::run`] spawns [`Modes::drive`] (the
//! machine's timer); the data plane and the control session call in. What
//! it must not do: hold the machine's lock across an await or an evidence
//! append, read a clock other than tokio's (virtual in simulations), or
//! fail open: a poisoned lock refuses remote admission and reports Survival.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use tidemesh_evidence::record::{
    Connectivity, Mode as EvMode, ModeTransition, Reachability as EvReach, TransitionEvidence,
    Trigger as EvTrigger,
};
use tidemesh_policy::{
    mode::{
        EffectiveProfile, ModeMachine, RampChange, RampStep, Reachability, RemoteAdmission,
        RequestOutcome, Scope, Transition, Trigger,
    },
    model::{Mode, ModeMatrix},
    routing::LocalityTier,
};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// What the modes are now, for status, metrics and vectors.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeView {
    /// The spoke-wide mode.
    pub spoke: &'static str,
    /// Share of remote traffic admitted, percent (Recovery only).
    pub ramp_percent: Option<u8>,
    /// Every tracked service's own mode (`target` or `degraded`).
    pub services: BTreeMap<String, &'static str>,
    /// Transitions recorded since start.
    pub transitions: u64,
    /// The last reachability reported.
    pub hub_reachable: Option<bool>,
    /// Same-site endpoints reachable and known at the last report.
    pub site_endpoints: Option<(u32, u32)>,
}

/// Where transition records go (the evidence buffer; never waits).
pub type Sink = Arc<dyn Fn(tidemesh_evidence::RecordBody) -> Option<u64> + Send + Sync>;

/// The mode machine's owner (see the module docs).
pub struct Modes {
    machine: Mutex<ModeMachine>,
    rng: Mutex<StdRng>,
    view: watch::Sender<Arc<ModeView>>,
    wake: Notify,
    sink: Sink,
}

impl std::fmt::Debug for Modes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modes").finish_non_exhaustive()
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The evidence format's mode.
pub fn ev_mode(m: Mode) -> EvMode {
    match m {
        Mode::Target => EvMode::Target,
        Mode::Degraded => EvMode::Degraded,
        Mode::Survival => EvMode::Survival,
        Mode::Recovery => EvMode::Recovery,
    }
}

fn reach(r: bool) -> EvReach {
    if r {
        EvReach::Available
    } else {
        EvReach::Unavailable
    }
}

/// The seed's connectivity by locality, from measured reachability.
fn connectivity(r: &Reachability) -> (Connectivity, u32, u32) {
    // A tier with endpoints is available when one of them answers; a tier
    // with none would be reached through the hub.
    let any = |t: LocalityTier| {
        let c = r.tier(t);
        if c.total() == 0 {
            r.hub
        } else {
            c.reachable() > 0
        }
    };
    let all = r.all_endpoints();
    (
        Connectivity {
            same_zone: reach(any(LocalityTier::SameSite) && any(LocalityTier::SameZone)),
            same_region: reach(any(LocalityTier::SameRegion)),
            other_regions: reach(any(LocalityTier::Cloud) && any(LocalityTier::Remote)),
        },
        all.reachable(),
        all.total(),
    )
}

/// A transition as an evidence record body (the measured evidence with it).
fn record_of(t: &Transition) -> ModeTransition {
    let mut ev = TransitionEvidence {
        service: match &t.scope {
            Scope::Service(s) => Some(s.clone()),
            Scope::Spoke => None,
        },
        ..Default::default()
    };
    let ratio = |r: tidemesh_policy::units::Ratio| {
        tidemesh_evidence::Ratio::from_counts(u64::from(r.basis_points()), 10_000)
    };
    let trigger = match &t.trigger {
        Trigger::ErrorRateExceeded(e)
        | Trigger::ErrorRateRecovered(e)
        | Trigger::ServiceEvicted(e) => {
            ev.error_rate = Some(ratio(e.error_rate));
            ev.threshold = Some(ratio(e.threshold));
            ev.window_s = Some(e.window.as_secs().min(u64::from(u32::MAX)) as u32);
            ev.failed_requests = Some(e.failed_requests);
            ev.total_requests = Some(e.total_requests);
            if matches!(t.trigger, Trigger::ErrorRateExceeded(_)) {
                EvTrigger::HighErrorRate
            } else {
                EvTrigger::ErrorRateRecovered
            }
        }
        Trigger::NetworkPartitionDetected(r) => {
            let (c, up, total) = connectivity(r);
            ev.connectivity = Some(c);
            ev.hub_reachable = Some(r.hub);
            ev.endpoints_reachable = Some(up);
            ev.endpoints_total = Some(total);
            EvTrigger::NetworkPartitionDetected
        }
        Trigger::PartitionDuringRecovery { reachability, ramp } => {
            let (c, up, total) = connectivity(reachability);
            ev.connectivity = Some(c);
            ev.hub_reachable = Some(reachability.hub);
            ev.endpoints_reachable = Some(up);
            ev.endpoints_total = Some(total);
            ev.traffic_percent = Some(ramp.percent);
            EvTrigger::NetworkPartitionDetected
        }
        Trigger::ConnectivityRestored(h) => {
            let (c, up, total) = connectivity(&h.reachability);
            ev.connectivity = Some(c);
            ev.hub_reachable = Some(h.reachability.hub);
            ev.endpoints_reachable = Some(up);
            ev.endpoints_total = Some(total);
            ev.successful_health_checks = Some(h.successful_health_checks);
            ev.failed_health_checks = Some(h.failed_health_checks);
            ev.window_s = Some(h.window.as_secs().min(u64::from(u32::MAX)) as u32);
            EvTrigger::ConnectivityRestored
        }
        Trigger::RampComplete(r) => {
            ev.traffic_percent = Some(r.percent);
            EvTrigger::RampComplete
        }
    };
    let mut actions = t.actions.clone();
    if matches!(t.trigger, Trigger::ServiceEvicted(_)) {
        actions.insert(0, "stop tracking the service (tracking limit)".into());
    }
    ModeTransition {
        from: ev_mode(t.from),
        to: ev_mode(t.to),
        trigger,
        evidence: ev,
        actions,
    }
}

/// A ramp step as a Recovery → Recovery record (trigger `ramp_step`).
fn step_record(s: &RampStep) -> ModeTransition {
    let action = match s.change {
        RampChange::Advanced => format!("remote traffic {}% -> {}%", s.from_percent, s.to_percent),
        RampChange::SteppedBack {
            failures,
            tolerated,
            cause,
        } => format!(
            "remote traffic {}% -> {}% after {failures} failures (tolerated {tolerated}, last: {cause:?})",
            s.from_percent, s.to_percent
        ),
    };
    ModeTransition {
        from: EvMode::Recovery,
        to: EvMode::Recovery,
        trigger: EvTrigger::RampStep,
        evidence: TransitionEvidence {
            traffic_percent: Some(s.to_percent),
            ..Default::default()
        },
        actions: vec![action],
    }
}

impl Modes {
    /// A machine in Target with `matrix`; transitions go to `sink`.
    pub fn new(matrix: &ModeMatrix, seed: Option<u64>, sink: Sink) -> Result<Modes, String> {
        let machine = ModeMachine::new(now(), matrix)
            .or_else(|e| {
                warn!(error = %e, "the mode matrix is invalid; running the seed's");
                ModeMachine::new(now(), &ModeMatrix::default())
            })
            .map_err(|e| e.to_string())?;
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s ^ 0x6d6f_6465),
            None => StdRng::from_os_rng(),
        };
        let view = ModeView {
            spoke: machine.spoke_mode().as_str(),
            ..Default::default()
        };
        Ok(Modes {
            machine: Mutex::new(machine),
            rng: Mutex::new(rng),
            view: watch::channel(Arc::new(view)).0,
            wake: Notify::new(),
            sink,
        })
    }

    /// Runs `f` on the machine, then turns what it queued into records and
    /// a new view (outside the lock).
    fn with<T>(&self, f: impl FnOnce(&mut ModeMachine) -> T) -> Option<T> {
        let (out, transitions, steps, view) = {
            let mut m = match self.machine.lock() {
                Ok(m) => m,
                Err(_) => {
                    warn!("mode machine lock poisoned");
                    return None;
                }
            };
            let out = f(&mut m);
            let mut transitions = Vec::new();
            while let Some(t) = m.poll_transition() {
                transitions.push(t);
            }
            let mut steps = Vec::new();
            while let Some(s) = m.poll_ramp_step() {
                steps.push(s);
            }
            let view = (!transitions.is_empty() || !steps.is_empty()).then(|| ModeView {
                spoke: m.spoke_mode().as_str(),
                ramp_percent: m.ramp_percent(),
                services: m
                    .services()
                    .map(|(s, mode)| (s.to_owned(), mode.as_str()))
                    .collect(),
                ..Default::default()
            });
            (out, transitions, steps, view)
        };
        for t in &transitions {
            info!(target: "tidemesh::audit", scope = ?t.scope, from = t.from.as_str(), to = t.to.as_str(), trigger = t.trigger.as_str(), "mode transition");
            (self.sink)(tidemesh_evidence::RecordBody::ModeTransition(record_of(t)));
        }
        for s in &steps {
            info!(target: "tidemesh::audit", from = s.from_percent, to = s.to_percent, change = ?s.change, "recovery ramp step");
            (self.sink)(tidemesh_evidence::RecordBody::ModeTransition(step_record(
                s,
            )));
        }
        if let Some(mut v) = view {
            let n = transitions.len() as u64;
            self.view.send_modify(|cur| {
                v.transitions = cur.transitions + n;
                v.hub_reachable = cur.hub_reachable;
                v.site_endpoints = cur.site_endpoints;
                *cur = Arc::new(v);
            });
        }
        self.wake.notify_one();
        Some(out)
    }

    /// One attempt's outcome at an endpoint of `tier` (not for requests the
    /// proxy refused without trying).
    pub fn report(&self, service: &str, tier: LocalityTier, ok: bool) {
        self.with(|m| {
            let _ = m.handle_request(now(), RequestOutcome { service, tier, ok });
        });
    }

    /// The hub's and the endpoints' reachability, as measured now.
    pub fn reachability(&self, r: Reachability) {
        let site = r.tier(LocalityTier::SameSite);
        self.view.send_modify(|v| {
            let mut n = (**v).clone();
            n.hub_reachable = Some(r.hub);
            n.site_endpoints = Some((site.reachable(), site.total()));
            *v = Arc::new(n);
        });
        self.with(|m| m.handle_reachability(now(), r));
    }

    /// An active health check of the hub (and its gateway).
    pub fn health_check(&self, ok: bool) {
        self.with(|m| m.handle_health_check(now(), ok));
    }

    /// A new mode matrix from the config in force.
    pub fn config(&self, matrix: &ModeMatrix) {
        let r = self.with(|m| m.handle_config(now(), matrix));
        if let Some(Err(e)) = r {
            warn!(error = %e, "mode matrix refused; keeping the one in force");
        }
    }

    /// The profile a request to `service` gets now. A poisoned lock yields
    /// Survival's (local only, no retries).
    pub fn profile(&self, service: &str) -> EffectiveProfile {
        match self.machine.lock() {
            Ok(m) => m.effective_profile(service),
            Err(_) => survival_profile(),
        }
    }

    /// The effective mode of `service`.
    pub fn mode(&self, service: &str) -> Mode {
        self.machine
            .lock()
            .map(|m| m.mode(service))
            .unwrap_or(Mode::Survival)
    }

    /// The spoke-wide mode.
    pub fn spoke_mode(&self) -> Mode {
        self.machine
            .lock()
            .map(|m| m.spoke_mode())
            .unwrap_or(Mode::Survival)
    }

    /// Whether the Recovery ramp lets one request go remote now.
    pub fn admit_remote(&self) -> RemoteAdmission {
        let r: u64 = self.rng.lock().map(|mut r| r.random()).unwrap_or(u64::MAX);
        self.machine
            .lock()
            .map(|m| m.admit_remote(now(), r))
            .unwrap_or(RemoteAdmission::Refuse { retry_after: None })
    }

    /// Whether a new trace is sampled under `service`'s profile.
    pub fn sample(&self, service: &str) -> bool {
        let p = self.profile(service).sampling.basis_points();
        if p >= 10_000 {
            return true;
        }
        let r: u16 = self
            .rng
            .lock()
            .map(|mut r| r.random_range(0..10_000))
            .unwrap_or(0);
        r < p
    }

    /// The view now.
    pub fn view(&self) -> Arc<ModeView> {
        self.view.borrow().clone()
    }

    /// A receiver of every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ModeView>> {
        self.view.subscribe()
    }

    /// The matrix in force.
    pub fn matrix(&self) -> Option<ModeMatrix> {
        self.machine.lock().ok().map(|m| m.matrix().clone())
    }

    /// Runs the machine's timer (window buckets, ramp steps) for as long as
    /// the spoke runs.
    pub async fn drive(self: Arc<Self>) {
        loop {
            let next = self.machine.lock().ok().and_then(|m| m.poll_timeout());
            let sleep = match next {
                Some(t) => tokio::time::Instant::from_std(t),
                None => tokio::time::Instant::now() + Duration::from_secs(60),
            };
            tokio::select! {
                _ = tokio::time::sleep_until(sleep) => {
                    self.with(|m| m.handle_timeout(now()));
                }
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// Survival's profile, for a poisoned lock: local only, no retries, fail
/// fast, no tracing.
fn survival_profile() -> EffectiveProfile {
    let survival = ModeMatrix::default().survival;
    EffectiveProfile {
        mode: Mode::Survival,
        routing: survival.routing,
        retries: survival.retries,
        breaker: survival.breaker,
        sampling: tidemesh_policy::units::Ratio::ZERO,
        buffer_telemetry: true,
        ramp_percent: None,
    }
}
