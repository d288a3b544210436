//! The mode matrix's transition fields in config (YAML in, YAML/JSON out,
//! errors naming the field, older configs still read), and the drill matrix
//! in `deploy/examples/mode-drill.yaml` run through the mode machine.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use tidemesh_policy::mode::{
    EndpointCount, ModeMachine, Reachability, RemoteAdmission, RequestOutcome, Scope,
};
use tidemesh_policy::model::*;
use tidemesh_policy::routing::LocalityTier;
use tidemesh_policy::units::Ratio;
use tidemesh_policy::MeshConfig;

const DRILL: &str = include_str!("../../../deploy/examples/mode-drill.yaml");

fn matrix(spec: &str) -> Result<ModeMatrix, String> {
    let yaml = format!(
        "apiVersion: tidemesh.io/v1alpha1\nkind: ModeMatrix\nmetadata: {{name: default}}\nspec:\n{spec}"
    );
    MeshConfig::from_yaml(&yaml)
        .map(|c| c.mode_matrix)
        .map_err(|e| e.issues()[0].to_string())
}

fn error(spec: &str) -> String {
    match matrix(spec) {
        Ok(m) => panic!("accepted: {spec}\n{m:?}"),
        Err(e) => e,
    }
}

#[test]
fn a_mode_matrix_without_the_transition_fields_gets_the_seeds_values() {
    let m = matrix("  degraded:\n    circuitBreaker: {errorRateThreshold: 0.25}\n  recovery:\n    ramp: {startPercent: 2, factor: 2, step: 30s}\n").unwrap();
    assert_eq!(m.degradation, Degradation::default());
    assert_eq!(m.reconnection, Reconnection::default());
    assert_eq!(m.recovery.ramp.unwrap().tolerated_failures, 0);
    let d = Degradation::default();
    assert_eq!(d.enter_error_rate, Ratio::percent(30));
    assert_eq!(d.exit_error_rate, Ratio::percent(15));
    assert_eq!(d.window, Duration::from_secs(300));
    assert_eq!(d.min_requests, 20);
    let r = Reconnection::default();
    assert_eq!((r.health_checks, r.window), (10, Duration::from_secs(120)));
    assert_eq!(matrix("  {}\n").unwrap(), ModeMatrix::default());
}

#[test]
fn the_transition_fields_are_read() {
    let m = matrix(
        "  degradation: {enterErrorRate: 0.4, exitErrorRate: 0.1, window: 30s, minRequests: 50}\n  reconnection: {healthChecks: 5, window: 1m}\n  recovery:\n    ramp: {startPercent: 5, factor: 3, step: 10s, toleratedFailures: 2}\n",
    )
    .unwrap();
    assert_eq!(
        m.degradation,
        Degradation {
            enter_error_rate: Ratio::percent(40),
            exit_error_rate: Ratio::percent(10),
            window: Duration::from_secs(30),
            min_requests: 50,
        }
    );
    assert_eq!(
        m.reconnection,
        Reconnection {
            health_checks: 5,
            window: Duration::from_secs(60),
        }
    );
    assert_eq!(
        m.recovery.ramp,
        Some(Ramp {
            start_percent: 5,
            factor: 3,
            step: Duration::from_secs(10),
            tolerated_failures: 2,
        })
    );
    // The exit threshold defaults to half the entry threshold; the rest to
    // the seed's values.
    let m = matrix("  degradation: {enterErrorRate: 0.5}\n").unwrap();
    assert_eq!(m.degradation.exit_error_rate, Ratio::percent(25));
    assert_eq!(m.degradation.window, Duration::from_secs(300));
    let m = matrix("  degradation: {exitErrorRate: 0}\n").unwrap();
    assert_eq!(m.degradation.enter_error_rate, Ratio::percent(30));
    assert_eq!(m.degradation.exit_error_rate, Ratio::ZERO);
    let m = matrix("  reconnection: {window: 30s}\n").unwrap();
    assert_eq!(m.reconnection.health_checks, 10);
}

#[test]
fn the_transition_fields_round_trip_through_yaml_json_and_the_wire() {
    let mut c = MeshConfig::from_yaml(DRILL).unwrap();
    c.mode_matrix.degradation.exit_error_rate = Ratio::from_basis_points(1_234).unwrap();
    c.mode_matrix.degradation.window = Duration::from_millis(1_500);
    for c in [c, MeshConfig::default()] {
        let yaml = c.to_yaml();
        assert!(yaml.contains("enterErrorRate"), "{yaml}");
        assert!(yaml.contains("toleratedFailures"), "{yaml}");
        let back = MeshConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(back, c, "{yaml}");
        assert_eq!(back.to_yaml(), yaml, "canonical output is stable");
        let back = MeshConfig::from_yaml(&c.to_json()).unwrap();
        assert_eq!(back, c);
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<MeshConfig>(&bytes).unwrap(), c);
    }
}

#[test]
fn a_config_stored_before_the_transition_fields_still_decodes() {
    // The hub stores versions as JSON; one written before these fields
    // existed has none of them.
    let mut old = serde_json::to_value(MeshConfig::default()).unwrap();
    let m = old["mode_matrix"].as_object_mut().unwrap();
    assert!(m.remove("degradation").is_some());
    assert!(m.remove("reconnection").is_some());
    let ramp = old["mode_matrix"]["recovery"]["ramp"]
        .as_object_mut()
        .unwrap();
    assert!(ramp.remove("tolerated_failures").is_some());
    let back: MeshConfig = serde_json::from_value(old).unwrap();
    assert_eq!(back, MeshConfig::default());
}

#[test]
fn bad_transition_fields_are_errors_naming_the_field() {
    let d = "document 1 (ModeMatrix default): spec.";
    let cases: &[(&str, &str)] = &[
        ("  degradation: {enterErrorRate: 0}\n",
         "degradation.enterErrorRate: must be above 0"),
        ("  degradation: {enterErrorRate: 1.5}\n",
         "degradation.enterErrorRate: must be a number between 0 and 1, got 1.5"),
        ("  degradation: {enterErrorRate: 0.2, exitErrorRate: 0.2}\n",
         "degradation.exitErrorRate: must be below enterErrorRate (0.2) so that a service does not flap, got 0.2"),
        ("  degradation: {exitErrorRate: 0.5}\n",
         "degradation.exitErrorRate: must be below enterErrorRate (0.3)"),
        ("  degradation: {exitErrorRate: -0.1}\n",
         "degradation.exitErrorRate: must be a number between 0 and 1"),
        ("  degradation: {window: 0s}\n",
         "degradation.window: must be longer than 0"),
        ("  degradation: {window: 5 minutes}\n",
         "degradation.window: invalid duration"),
        ("  degradation: {minRequests: 0}\n",
         "degradation.minRequests: must be between 1 and 1000000, got 0"),
        ("  degradation: {threshold: 0.3}\n",
         "degradation.threshold: field threshold is not supported by tidemesh (supported here: enterErrorRate, exitErrorRate, window, minRequests)"),
        ("  reconnection: {healthChecks: 0}\n",
         "reconnection.healthChecks: must be between 1 and 1000, got 0"),
        ("  reconnection: {healthChecks: 1001}\n",
         "reconnection.healthChecks: must be between 1 and 1000, got 1001"),
        ("  reconnection: {window: 0ms}\n",
         "reconnection.window: must be longer than 0"),
        ("  reconnection: {successes: 10}\n",
         "reconnection.successes: field successes is not supported by tidemesh"),
        ("  recovery:\n    ramp: {startPercent: 0, factor: 2, step: 1m}\n",
         "recovery.ramp.startPercent: must be between 1 and 100, got 0"),
        ("  recovery:\n    ramp: {startPercent: 101, factor: 2, step: 1m}\n",
         "recovery.ramp.startPercent: must be between 1 and 100, got 101"),
        ("  recovery:\n    ramp: {startPercent: 1, factor: 1, step: 1m}\n",
         "recovery.ramp.factor: must be between 2 and 100, got 1"),
        ("  recovery:\n    ramp: {startPercent: 1, factor: 2, step: 0s}\n",
         "recovery.ramp.step: must be longer than 0"),
        ("  recovery:\n    ramp: {startPercent: 1, factor: 2, step: 1m, toleratedFailures: -1}\n",
         "recovery.ramp.toleratedFailures: must be between 0 and 1000000, got -1"),
    ];
    for (spec, want) in cases {
        let got = error(spec);
        let want = format!("{d}{want}");
        assert!(got.starts_with(&want), "\n got: {got}\nwant: {want}…");
    }
}

#[test]
fn the_drill_matrix_is_valid_and_fast() {
    let c = MeshConfig::from_yaml(DRILL).expect("deploy/examples/mode-drill.yaml is valid");
    let m = &c.mode_matrix;
    assert_eq!(m.degradation.window, Duration::from_secs(10));
    assert_eq!(m.degradation.enter_error_rate, Ratio::percent(30));
    assert_eq!(m.degradation.exit_error_rate, Ratio::percent(15));
    assert_eq!(m.reconnection.health_checks, 3);
    assert_eq!(m.recovery.ramp.unwrap().step, Duration::from_secs(2));
    // Its profiles are the seed's.
    let seed = ModeMatrix::default();
    for mode in Mode::ALL {
        let (mut p, mut s) = (m.profile(mode).clone(), seed.profile(mode).clone());
        p.ramp = None;
        s.ramp = None;
        assert_eq!(p, s, "{mode:?}");
    }
}

#[test]
fn a_drill_with_the_drill_matrix_runs_in_seconds() {
    let c = MeshConfig::from_yaml(DRILL).unwrap();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut m = ModeMachine::new(t0, &c.mode_matrix).unwrap();
    let fire = |m: &mut ModeMachine, until: Instant| {
        while let Some(t) = m.poll_timeout().filter(|t| *t <= until) {
            m.handle_timeout(t);
        }
    };
    let mut log = Vec::new();
    let mut drain = |m: &mut ModeMachine| {
        while let Some(t) = m.poll_transition() {
            log.push((t.scope.clone(), t.to, t.at.duration_since(t0)));
        }
    };

    // 30 % 503s from a service: Degraded at the 20th request.
    for i in 0..20u64 {
        let outcome = RequestOutcome {
            service: "inventory.store",
            tier: LocalityTier::SameSite,
            ok: i % 10 >= 3,
        };
        m.handle_request(at(i * 100), outcome).unwrap();
    }
    drain(&mut m);
    // The hub and the cloud go away at 3 s; back at 6 s; 3 checks.
    let cloud = |n| {
        Reachability::new(n > 0).with_tier(LocalityTier::Cloud, EndpointCount::new(n, 2).unwrap())
    };
    fire(&mut m, at(3_000));
    m.handle_reachability(at(3_000), cloud(0));
    fire(&mut m, at(6_000));
    m.handle_reachability(at(6_000), cloud(2));
    for s in 0..3 {
        m.handle_health_check(at(6_000 + s * 500), true);
    }
    drain(&mut m);
    assert_eq!(m.ramp_percent(), Some(1));
    assert_eq!(
        m.admit_remote(at(7_000), u64::MAX),
        RemoteAdmission::Refuse {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    // The ramp: 2 s steps from 7 s, Target 16 s after Recovery began.
    let mut percents = Vec::new();
    for s in 7..=23 {
        fire(&mut m, at(s * 1_000));
        percents.push(m.ramp_percent());
    }
    drain(&mut m);
    let mut want: Vec<Option<u8>> = [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 100, 100]
        .into_iter()
        .map(Some)
        .collect();
    want.push(None);
    assert_eq!(percents, want);
    let secs = Duration::from_secs;
    assert_eq!(
        log,
        [
            (
                Scope::Service("inventory.store".into()),
                Mode::Degraded,
                Duration::from_millis(1_900)
            ),
            (Scope::Spoke, Mode::Survival, secs(3)),
            (Scope::Spoke, Mode::Recovery, secs(7)),
            // No traffic since 1.9 s: from 10 s fewer than 20 requests are
            // left in the window (too few to measure), calm for 10 s.
            (
                Scope::Service("inventory.store".into()),
                Mode::Target,
                secs(20)
            ),
            (Scope::Spoke, Mode::Target, secs(23)),
        ]
    );
}

proptest! {
    /// The YAML input and the machine check the same things: a matrix the
    /// one accepts, the other runs (and mutated input never panics).
    #[test]
    fn every_matrix_the_yaml_accepts_the_machine_runs(
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), prop::sample::select(vec!["0", "1", "9", ".", "-", "0.", "ms", "s", "m", "h", " ", "\n", "1e3"])),
            1..4,
        ),
    ) {
        let mut s = DRILL.to_string();
        for (at, insert) in edits {
            let mut i = at.index(s.len());
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            s.insert_str(i, insert);
        }
        if let Ok(c) = MeshConfig::from_yaml(&s) {
            let t0 = Instant::now();
            let m = ModeMachine::new(t0, &c.mode_matrix);
            prop_assert!(m.is_ok(), "{:?}\n{}", m.err(), s);
        }
    }
}
