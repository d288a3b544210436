//! Admission control: which new QUIC connections the hub takes on, so a
//! fleet reconnecting at once (a regional outage healing, a hub restart)
//! is paced by the hub instead of swamping it.
//!
//! Driven by `Hub::serve` (one call per `quinn::Incoming`, before any
//! handshake work) and `handle_incoming` (one call per control connection
//! once its handshake is done). Sans-IO: time is passed in, decisions come
//! out as values; no sockets, no tokio, no clock in here. It must not do
//! anything expensive: it runs on the accept path for every packet that
//! opens a connection.
//!
//! Rules, in order, for each incoming connection:
//! 1. more than `max_connections` open (handshaking ones included):
//!    **refuse** at the QUIC level (`CONNECTION_REFUSED`, no handshake);
//! 2. more than `max_per_address` open from the same IP: **refuse** likewise;
//! 3. the client's address is not validated and either validation is
//!    always asked for, or the new-session budget has no token now, or
//!    more than half of `max_connections` is in use: **retry** (a stateless
//!    QUIC Retry; the client proves it receives at its address, costing the
//!    hub one packet and no state);
//! 4. otherwise: **handshake**.
//!
//! After the handshake, a control session takes a token from the
//! new-session budget (a token bucket: `rate` per second, `burst` at once).
//! Without one it is closed at once with [`close::BUSY`](tidemesh_proto::close::BUSY)
//! and a retry-after: the next free slot in the hub's schedule, one per
//! `1 / rate`, so a thousand refused spokes are handed a thousand different
//! times instead of all coming back together. A QUIC-level refusal cannot
//! carry a reason (before the handshake only transport errors reach the
//! client), which is why the budget is applied after it: the handshake is
//! the cheap part, the session (hello, time, node CA, config sync,
//! registration, evidence) is what the budget protects.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// Admission settings (`tidemesh-hub serve` flags).
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// New control sessions per second (the rate the hub lets a
    /// reconnecting fleet in at).
    pub rate: f64,
    /// New control sessions admitted at once before the rate applies.
    pub burst: u32,
    /// Connections open at once (control, gateway, handshaking).
    pub max_connections: u32,
    /// Connections open at once from one IP address.
    pub max_per_address: u32,
    /// Ask every client without a validated address for a QUIC Retry,
    /// not only when the hub is over budget or loaded.
    pub always_validate: bool,
    /// The longest retry-after handed out; a schedule longer than this is
    /// cut to it (the spoke adds jitter).
    pub max_retry_after: Duration,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            rate: 50.0,
            burst: 100,
            max_connections: 4096,
            max_per_address: 128,
            always_validate: false,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl AdmissionSettings {
    /// Checks the settings; the error names the flag.
    pub fn check(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && self.rate >= 0.1 && self.rate <= 100_000.0) {
            return Err(format!(
                "--admit-rate {}: must be between 0.1 and 100000 sessions per second",
                self.rate
            ));
        }
        if self.burst == 0 {
            return Err("--admit-burst 0: must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections 0: must be at least 1".into());
        }
        if self.max_per_address == 0 {
            return Err("--max-connections-per-address 0: must be at least 1".into());
        }
        if self.max_retry_after.is_zero() {
            return Err("max retry-after must be longer than 0".into());
        }
        Ok(())
    }
}

/// What to do with an incoming connection before any handshake work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Refuse at the QUIC level (`CONNECTION_REFUSED`).
    Refuse(RefuseReason),
    /// Answer with a stateless QUIC Retry (address validation).
    Retry,
    /// Do the handshake; the connection now counts as open until
    /// [`Admission::handle_closed`].
    Handshake,
}

/// Why a connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// `max_connections` reached.
    GlobalCap,
    /// `max_per_address` reached for the client's IP.
    AddressCap,
}

impl RefuseReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::GlobalCap => "global_cap",
            RefuseReason::AddressCap => "address_cap",
        }
    }
}

/// What to do with a control session whose handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// Serve it.
    Admit,
    /// Close it with `close::BUSY`; come back after this long.
    Busy {
        /// The slot the hub set aside for it, from now.
        retry_after: Duration,
    },
}

/// Counters since the hub started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Control sessions admitted.
    pub admitted: u64,
    /// Control sessions closed with a retry-after.
    pub busy: u64,
    /// Refused before the handshake: global cap.
    pub refused_global: u64,
    /// Refused before the handshake: per-address cap.
    pub refused_address: u64,
    /// QUIC Retries sent (address validation asked for).
    pub retries: u64,
    /// Incoming connections whose address had been validated by a Retry.
    pub validated: u64,
    /// Handshakes let through.
    pub handshakes: u64,
}

/// A snapshot for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Counters since start.
    pub counts: Counts,
    /// Connections open now (handshaking ones included).
    pub open: u32,
    /// Tokens in the new-session budget now.
    pub tokens: f64,
    /// The configured rate (sessions per second).
    pub rate: f64,
    /// Sessions admitted per second over the last [`RATE_WINDOW`].
    pub admitted_rate: f64,
    /// The retry-after a session refused now would get.
    pub retry_after: Duration,
}

/// The window `admitted_rate` is measured over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The admission state: token bucket, schedule of handed-out slots, open
/// connections overall and per address, counters.
#[derive(Debug)]
pub struct Admission {
    settings: AdmissionSettings,
    tokens: f64,
    refilled: Instant,
    /// The end of the schedule of slots handed out to refused sessions.
    horizon: Instant,
    open: u32,
    per_address: HashMap<IpAddr, u32>,
    counts: Counts,
    /// Admissions in the last whole seconds (`RATE_WINDOW`), newest last.
    recent: std::collections::VecDeque<(Instant, u32)>,
}

impl Admission {
    /// A full bucket at `now`.
    pub fn new(settings: AdmissionSettings, now: Instant) -> Self {
        Self {
            tokens: f64::from(settings.burst),
            settings,
            refilled: now,
            horizon: now,
            open: 0,
            per_address: HashMap::new(),
            counts: Counts::default(),
            recent: Default::default(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &AdmissionSettings {
        &self.settings
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * self.settings.rate).min(f64::from(self.settings.burst));
        self.refilled = now.max(self.refilled);
    }

    /// A whole token (up to float rounding of the refill).
    fn has_token(&self) -> bool {
        self.tokens >= 1.0 - 1e-9
    }

    /// Decides on an incoming connection from `ip`, before its handshake.
    /// `validated`: the client answered a Retry; `may_retry`: a Retry can
    /// still be sent for it.
    pub fn handle_incoming(
        &mut self,
        now: Instant,
        ip: IpAddr,
        validated: bool,
        may_retry: bool,
    ) -> Incoming {
        if validated {
            self.counts.validated += 1;
        }
        if self.open >= self.settings.max_connections {
            self.counts.refused_global += 1;
            return Incoming::Refuse(RefuseReason::GlobalCap);
        }
        let here = self.per_address.get(&ip).copied().unwrap_or(0);
        if here >= self.settings.max_per_address {
            self.counts.refused_address += 1;
            return Incoming::Refuse(RefuseReason::AddressCap);
        }
        self.refill(now);
        let loaded = self.open >= self.settings.max_connections / 2;
        if !validated && may_retry && (self.settings.always_validate || !self.has_token() || loaded)
        {
            self.counts.retries += 1;
            return Incoming::Retry;
        }
        self.open += 1;
        *self.per_address.entry(ip).or_insert(0) += 1;
        self.counts.handshakes += 1;
        Incoming::Handshake
    }

    /// A connection let through by [`Incoming::Handshake`] is gone (its
    /// handshake failed or it closed).
    pub fn handle_closed(&mut self, ip: IpAddr) {
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.per_address.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&ip);
            }
        }
    }

    /// Decides on a control session whose handshake is done: a token from
    /// the budget, or a slot in the schedule to come back at.
    pub fn handle_session(&mut self, now: Instant) -> Session {
        self.refill(now);
        if self.has_token() {
            self.tokens = (self.tokens - 1.0).max(0.0);
            self.counts.admitted += 1;
            self.note_admitted(now);
            return Session::Admit;
        }
        self.counts.busy += 1;
        let step = Duration::from_secs_f64(1.0 / self.settings.rate);
        // The first slot is when the next token arrives; each refusal
        // after it gets the one after that.
        let next_token =
            now + Duration::from_secs_f64(((1.0 - self.tokens) / self.settings.rate).max(0.0));
        let slot = self.horizon.max(next_token);
        let limit = now + self.settings.max_retry_after;
        let slot = slot.min(limit);
        self.horizon = (slot + step).min(limit);
        Session::Busy {
            retry_after: slot.saturating_duration_since(now),
        }
    }

    fn note_admitted(&mut self, now: Instant) {
        match self.recent.back_mut() {
            Some((t, n)) if now.saturating_duration_since(*t) < Duration::from_secs(1) => *n += 1,
            _ => self.recent.push_back((now, 1)),
        }
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while let Some((t, _)) = self.recent.front() {
            if now.saturating_duration_since(*t) >= RATE_WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    /// The state for `/metrics`.
    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.refill(now);
        self.trim(now);
        let recent: u32 = self.recent.iter().map(|(_, n)| n).sum();
        Snapshot {
            counts: self.counts,
            open: self.open,
            tokens: self.tokens,
            rate: self.settings.rate,
            admitted_rate: f64::from(recent) / RATE_WINDOW.as_secs_f64(),
            retry_after: self.horizon.saturating_duration_since(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn settings(rate: f64, burst: u32) -> AdmissionSettings {
        AdmissionSettings {
            rate,
            burst,
            ..Default::default()
        }
    }

    #[test]
    fn burst_is_admitted_then_refusals_get_distinct_slots_one_per_token() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings(10.0, 3), t0);
        for _ in 0..3 {
            assert_eq!(a.handle_session(t0), Session::Admit);
        }
        let mut slots = Vec::new();
        for _ in 0..20 {
            match a.handle_session(t0) {
                Session::Busy { retry_after } => slots.push(retry_after),
                Session::Admit => panic!("admitted past the burst"),
            }
        }
        // one slot per 1/rate = 100 ms, starting at the next token
        for (i, s) in slots.iter().enumerate() {
            let want = Duration::from_millis(100 * (i as u64 + 1));
            assert!(
                s.abs_diff(want) < Duration::from_millis(1),
                "slot {i}: {s:?}, want {want:?}"
            );
        }
        assert_eq!(a.snapshot(t0).counts.busy, 20);
        assert_eq!(a.snapshot(t0).counts.admitted, 3);
    }

    #[test]
    fn sessions_coming_back_at_their_slots_are_admitted_at_the_rate() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings(20.0, 5), t0);
        // 100 sessions at once; each comes back exactly at its slot
        let mut pending: Vec<Instant> = vec![t0; 100];
        let mut admitted_at = Vec::new();
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            assert!(rounds < 10_000, "never drained");
            pending.sort();
            let now = pending.remove(0);
            match a.handle_session(now) {
                Session::Admit => admitted_at.push(now),
                Session::Busy { retry_after } => pending.push(now + retry_after),
            }
        }
        let last = admitted_at.iter().max().copied().unwrap_or(t0);
        let took = last - t0;
        // 5 at once, 95 more at 20/s: 4.75 s, give or take one slot
        assert!(
            took >= Duration::from_millis(4_650) && took <= Duration::from_millis(4_850),
            "took {took:?}"
        );
        // each refused session was told once: no retry storm
        assert!(a.snapshot(last).counts.busy <= 100, "{:?}", a.counts);
    }

    #[test]
    fn retry_after_never_exceeds_the_limit() {
        let t0 = Instant::now();
        let mut a = Admission::new(
            AdmissionSettings {
                max_retry_after: Duration::from_secs(2),
                ..settings(1.0, 1)
            },
            t0,
        );
        assert_eq!(a.handle_session(t0), Session::Admit);
        for _ in 0..50 {
            match a.handle_session(t0) {
                Session::Busy { retry_after } => assert!(retry_after <= Duration::from_secs(2)),
                Session::Admit => panic!("admitted without a token"),
            }
        }
    }

    #[test]
    fn caps_refuse_before_the_handshake_and_free_on_close() {
        let t0 = Instant::now();
        let mut a = Admission::new(
            AdmissionSettings {
                max_connections: 4,
                max_per_address: 2,
                ..settings(100.0, 100)
            },
            t0,
        );
        assert_eq!(
            a.handle_incoming(t0, ip(1), true, false),
            Incoming::Handshake
        );
        assert_eq!(
            a.handle_incoming(t0, ip(1), true, false),
            Incoming::Handshake
        );
        assert_eq!(
            a.handle_incoming(t0, ip(1), true, false),
            Incoming::Refuse(RefuseReason::AddressCap)
        );
        assert_eq!(
            a.handle_incoming(t0, ip(2), true, false),
            Incoming::Handshake
        );
        assert_eq!(
            a.handle_incoming(t0, ip(3), true, false),
            Incoming::Handshake
        );
        assert_eq!(
            a.handle_incoming(t0, ip(4), true, false),
            Incoming::Refuse(RefuseReason::GlobalCap)
        );
        a.handle_closed(ip(1));
        assert_eq!(
            a.handle_incoming(t0, ip(4), true, false),
            Incoming::Handshake
        );
        assert_eq!(
            a.handle_incoming(t0, ip(1), true, false),
            Incoming::Refuse(RefuseReason::GlobalCap)
        );
        let c = a.snapshot(t0).counts;
        assert_eq!((c.refused_address, c.refused_global), (1, 2));
        assert_eq!(a.snapshot(t0).open, 4);
        for n in [1, 2, 3, 4] {
            a.handle_closed(ip(n));
        }
        assert_eq!(a.snapshot(t0).open, 0);
        assert!(a.per_address.is_empty(), "per-address entries are freed");
    }

    #[test]
    fn unvalidated_clients_are_retried_when_over_budget_loaded_or_always() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings(1.0, 1), t0);
        // under budget, not loaded: straight to the handshake
        assert_eq!(
            a.handle_incoming(t0, ip(1), false, true),
            Incoming::Handshake
        );
        assert_eq!(a.handle_session(t0), Session::Admit);
        // no token left: validate first
        assert_eq!(a.handle_incoming(t0, ip(2), false, true), Incoming::Retry);
        // a validated one goes on to the handshake (and gets a retry-after)
        assert_eq!(
            a.handle_incoming(t0, ip(2), true, false),
            Incoming::Handshake
        );
        // a client that cannot be retried again is not looped
        assert_eq!(
            a.handle_incoming(t0, ip(3), false, false),
            Incoming::Handshake
        );

        let mut loaded = Admission::new(
            AdmissionSettings {
                max_connections: 4,
                ..settings(100.0, 100)
            },
            t0,
        );
        assert_eq!(
            loaded.handle_incoming(t0, ip(1), false, true),
            Incoming::Handshake
        );
        assert_eq!(
            loaded.handle_incoming(t0, ip(2), false, true),
            Incoming::Handshake
        );
        assert_eq!(
            loaded.handle_incoming(t0, ip(3), false, true),
            Incoming::Retry
        );

        let mut always = Admission::new(
            AdmissionSettings {
                always_validate: true,
                ..settings(100.0, 100)
            },
            t0,
        );
        assert_eq!(
            always.handle_incoming(t0, ip(1), false, true),
            Incoming::Retry
        );
        assert_eq!(
            always.handle_incoming(t0, ip(1), true, false),
            Incoming::Handshake
        );
        let c = always.snapshot(t0).counts;
        assert_eq!((c.retries, c.validated, c.handshakes), (1, 1, 1));
    }

    #[test]
    fn admitted_rate_is_measured_over_the_window() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings(1000.0, 1000), t0);
        for i in 0..50u64 {
            assert_eq!(
                a.handle_session(t0 + Duration::from_millis(100 * i)),
                Session::Admit
            );
        }
        let at = t0 + Duration::from_millis(4_999);
        assert!((a.snapshot(at).admitted_rate - 5.0).abs() < 1e-9);
        let later = t0 + Duration::from_secs(30);
        assert_eq!(a.snapshot(later).admitted_rate, 0.0);
    }

    #[test]
    fn settings_are_checked() {
        assert!(AdmissionSettings::default().check().is_ok());
        for (s, flag) in [
            (settings(0.0, 1), "--admit-rate"),
            (settings(f64::NAN, 1), "--admit-rate"),
            (settings(1.0, 0), "--admit-burst"),
            (
                AdmissionSettings {
                    max_connections: 0,
                    ..Default::default()
                },
                "--max-connections",
            ),
            (
                AdmissionSettings {
                    max_per_address: 0,
                    ..Default::default()
                },
                "--max-connections-per-address",
            ),
        ] {
            let e = s.check().expect_err("refused");
            assert!(e.starts_with(flag), "{e}");
        }
    }
}
