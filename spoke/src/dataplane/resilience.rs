//! Resilience decisions of the data plane: a circuit breaker per endpoint
//! (passive outlier detection), retries (conditions, backoff with jitter, a
//! retry budget) and the limit on requests in flight.
//!
//! What it is: plain types with the time (`now`) and randomness (`rng`)
//! passed in, so every decision is a deterministic function of its inputs
//! and is tested without sockets or sleeps. The settings are built from the
//! policy model ([`BreakerSettings::from_policy`],
//! [`RetrySettings::from_policy`], [`max_requests`]); the results come out as
//! values, with evidence ([`Breaker::evidence`], [`retry_evidence`]).
//!
//! Who drives it: the outbound request path. It keeps one [`Breaker`] per
//! endpoint (behind the caller's lock), lets the picker choose only among
//! endpoints that are [`Breaker::available`], calls [`Breaker::admit`]
//! before sending a try and answers every admission exactly once with
//! [`Breaker::on_result`] (or [`Breaker::on_cancel`] when the try ends
//! without an outcome, e.g. the client went away). Per request it takes an
//! [`InFlightGuard`] for the destination, deposits into the destination's
//! [`RetryBudget`], and before each retry asks [`RetrySettings::may_retry`],
//! [`RetryBudget::try_withdraw`] and [`backoff_delay`], then sleeps on its
//! own timer.
//!
//! What it must not do: read a clock, sleep, spawn, log or do I/O; grow
//! without bound (the sliding windows are ten fixed buckets); or panic on any
//! config value (zero counts and huge durations are clamped). The only shared
//! state is [`InFlight`]'s atomic counter.

#![allow(
    dead_code,
    reason = "a complete API for the request path, which does not use every part of it yet"
)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemesh_evidence::record::{Backoff as EvBackoff, BreakerEvidence, BreakerState, RetryState};
use tidemesh_evidence::Ratio as EvRatio;
use tidemesh_policy::model::{
    Backoff, BackoffKind, CircuitBreaker, ConnectionLimits, RetryPolicy, RouteRetries,
};
use tidemesh_policy::units::Ratio;

// ---------------------------------------------------------------------------
// Sliding window
// ---------------------------------------------------------------------------

/// Buckets of a sliding window; each covers a tenth of the window.
const BUCKETS: usize = 10;

/// One bucket: its epoch (bucket number since the window's origin) and two
/// counters (requests and failures for the breaker, requests and retries
/// for the budget).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    first: u32,
    second: u32,
}

/// Two counters over a sliding window of ten buckets: bounded memory, and
/// the window slides in steps of a tenth of its span (so a sum covers
/// between nine and ten tenths of the span, plus the current bucket).
#[derive(Debug, Clone)]
struct Window {
    width: Duration,
    origin: Option<Instant>,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn new(span: Duration) -> Window {
        Window {
            // A zero span still needs a non-zero bucket.
            width: (span / BUCKETS as u32).max(Duration::from_millis(1)),
            origin: None,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return 0;
        };
        let since = now.saturating_duration_since(origin).as_nanos();
        u64::try_from(since / self.width.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    fn add(&mut self, now: Instant, first: u32, second: u32) {
        if self.origin.is_none() {
            self.origin = Some(now);
        }
        let epoch = self.epoch(now);
        let b = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                first: 0,
                second: 0,
            };
        }
        b.first = b.first.saturating_add(first);
        b.second = b.second.saturating_add(second);
    }

    /// Both counters summed over the buckets still in the window at `now`.
    fn sum(&self, now: Instant) -> (u64, u64) {
        if self.origin.is_none() {
            return (0, 0);
        }
        let cur = self.epoch(now);
        self.buckets
            .iter()
            .filter(|b| b.epoch <= cur && cur - b.epoch < BUCKETS as u64)
            .fold((0, 0), |(a, s), b| {
                (a + u64::from(b.first), s + u64::from(b.second))
            })
    }

    fn reset(&mut self) {
        self.origin = None;
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

// ---------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------

/// Consecutive errors that open a breaker when the policy does not say.
pub const DEFAULT_CONSECUTIVE_ERRORS: u32 = 5;
/// Longest open time after repeated reopenings, as a multiple of
/// `open_time`.
pub const MAX_OPEN_GROWTH: u32 = 10;
/// What [`Breaker::admit`] answers while half-open with every probe slot
/// taken (at most; less when `open_time` is shorter).
const PROBES_BUSY: Duration = Duration::from_secs(1);
/// The open time when the configured one does not fit an `Instant`.
const OPEN_FALLBACK: Duration = Duration::from_secs(86_400);

/// How a per-endpoint breaker behaves.
///
/// The defaults ([`BreakerSettings::from_policy`] with `None`, and
/// [`Default`]) turn outlier detection **on**: an edge mesh must fail over
/// by itself, with nobody around to notice a dead endpoint. They are: open
/// after 5 consecutive errors, no error-rate trigger, 20 requests minimum
/// for a rate, a 10 s window, 10 s open, 3 half-open probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Open after this many consecutive failures; 0 disables this trigger
    /// (Istio's `consecutive5xxErrors: 0`).
    pub consecutive_errors: u32,
    /// Open when the failure rate over `window` reaches this (with at least
    /// one failure); `None` disables this trigger.
    pub error_rate: Option<Ratio>,
    /// Requests needed in the window before the rate counts (at least 1).
    pub min_requests: u32,
    /// Span of the sliding window (measured in ten buckets).
    pub window: Duration,
    /// How long the breaker stays open before it lets probes through; it
    /// doubles with each reopening from half-open, up to
    /// [`MAX_OPEN_GROWTH`] × `open_time`, and is back to `open_time` once
    /// the breaker closes.
    pub open_time: Duration,
    /// Probes in flight at most while half-open; that many successes close
    /// the breaker (at least 1).
    pub half_open_probes: u32,
}

impl BreakerSettings {
    /// The settings of a destination's circuit breaker policy, or the
    /// defaults (see the type) without one. With a policy, an unset
    /// `consecutive_errors` is 5; the other fields are taken as they are
    /// (the policy model fills Istio's defaults, e.g. 30 s ejection).
    pub fn from_policy(cb: Option<&CircuitBreaker>) -> BreakerSettings {
        let Some(cb) = cb else {
            return BreakerSettings {
                consecutive_errors: DEFAULT_CONSECUTIVE_ERRORS,
                error_rate: None,
                min_requests: 20,
                window: Duration::from_secs(10),
                open_time: Duration::from_secs(10),
                half_open_probes: 3,
            };
        };
        BreakerSettings {
            consecutive_errors: cb.consecutive_errors.unwrap_or(DEFAULT_CONSECUTIVE_ERRORS),
            error_rate: cb.error_rate_threshold,
            min_requests: cb.min_requests,
            window: cb.window,
            open_time: cb.open_time,
            half_open_probes: cb.half_open_probes,
        }
    }
}

impl BreakerSettings {
    /// These settings under a mode's circuit breaking: an error-rate mode
    /// sets the rate trigger (the stricter of the policy's and the mode's);
    /// fail fast (Survival, where the only endpoints left are the store's
    /// own) keeps the consecutive-error trigger but no rate trigger, and an
    /// ejected endpoint is probed again after [`FAIL_FAST_OPEN`] with one
    /// request: nothing waits on a dead endpoint, and a store's own
    /// endpoints are never stranded for long.
    pub fn under(self, mode: tidemesh_policy::model::BreakerMode) -> BreakerSettings {
        use tidemesh_policy::model::BreakerMode;
        match mode {
            BreakerMode::ErrorRate(r) => BreakerSettings {
                error_rate: Some(self.error_rate.map_or(r, |p| p.min(r))),
                ..self
            },
            BreakerMode::FailFast => BreakerSettings {
                error_rate: None,
                open_time: self.open_time.min(FAIL_FAST_OPEN),
                half_open_probes: 1,
                ..self
            },
        }
    }
}

/// How long a fail-fast breaker stays open before its one probe.
pub const FAIL_FAST_OPEN: Duration = Duration::from_secs(1);

impl Default for BreakerSettings {
    /// [`BreakerSettings::from_policy`] without a policy.
    fn default() -> Self {
        BreakerSettings::from_policy(None)
    }
}

/// How a try was let through by [`Breaker::admit`]; hand it back to
/// [`Breaker::on_result`] or [`Breaker::on_cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The breaker was closed.
    Normal,
    /// A half-open probe; its ticket names the half-open round it belongs
    /// to, so that a late answer from an earlier round cannot decide the
    /// current one.
    Probe(ProbeTicket),
}

/// The half-open round a probe was admitted in (opaque).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTicket {
    round: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { successes: u32 },
}

/// A circuit breaker for one endpoint, which is also its passive outlier
/// detection: an endpoint is ejected exactly while its breaker is open.
///
/// * **Closed**: every try passes ([`Admit::Normal`]). It opens when
///   `consecutive_errors` failures come in a row, or when the failure rate
///   over the sliding window reaches `error_rate` with at least
///   `min_requests` requests in the window.
/// * **Open**: nothing passes, for the open time. Then it is half-open
///   (seen by [`Breaker::state`] as soon as the time has passed).
/// * **Half-open**: at most `half_open_probes` probes in flight
///   ([`Admit::Probe`]). That many probe successes close it (counters and
///   window reset); any probe failure opens it again, for twice the last
///   open time (at most [`MAX_OPEN_GROWTH`] × `open_time`), like Envoy's
///   growing ejection time.
///
/// Answers to tries admitted [`Admit::Normal`] count only while the breaker
/// is closed: a request sent before it opened and answered after cannot
/// close or reopen it. A probe's answer frees its slot whenever it comes,
/// but only decides the round it was admitted in.
///
/// Contract: every admission is answered exactly once, by
/// [`Breaker::on_result`] or [`Breaker::on_cancel`]; a probe never answered
/// keeps its slot, and with all slots lost the breaker stays half-open.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    phase: Phase,
    /// Half-open rounds entered so far (the ticket of a probe).
    round: u32,
    /// Probes admitted and not yet answered, of any round.
    probes_out: u32,
    /// Reopenings from half-open since the breaker last closed.
    reopens: u32,
    /// Consecutive failures while closed.
    consecutive: u32,
    /// Requests and failures while closed.
    window: Window,
}

impl Breaker {
    /// A closed breaker. `min_requests` and `half_open_probes` below 1 are
    /// taken as 1.
    pub fn new(settings: BreakerSettings) -> Self {
        let settings = BreakerSettings {
            min_requests: settings.min_requests.max(1),
            half_open_probes: settings.half_open_probes.max(1),
            ..settings
        };
        Breaker {
            window: Window::new(settings.window),
            settings,
            phase: Phase::Closed,
            round: 0,
            probes_out: 0,
            reopens: 0,
            consecutive: 0,
        }
    }

    /// The phase and round at `now`: an open breaker whose time has passed
    /// is half-open, in a new round.
    fn settled(&self, now: Instant) -> (Phase, u32) {
        match self.phase {
            Phase::Open { until } if now >= until => {
                (Phase::HalfOpen { successes: 0 }, self.round.wrapping_add(1))
            }
            phase => (phase, self.round),
        }
    }

    fn advance(&mut self, now: Instant) {
        (self.phase, self.round) = self.settled(now);
    }

    /// The settings in force.
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// New settings (a mode change): the state carries over; a new window
    /// length starts the error-rate window afresh.
    pub fn set_settings(&mut self, settings: BreakerSettings) {
        let settings = BreakerSettings {
            min_requests: settings.min_requests.max(1),
            half_open_probes: settings.half_open_probes.max(1),
            ..settings
        };
        if settings.window != self.settings.window {
            self.window = Window::new(settings.window);
        }
        self.settings = settings;
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.settled(now).0 {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a picker may choose this endpoint at `now`: closed, or
    /// half-open with a free probe slot ([`Breaker::admit`] would succeed).
    pub fn available(&self, now: Instant) -> bool {
        match self.settled(now).0 {
            Phase::Closed => true,
            Phase::HalfOpen { .. } => self.probes_out < self.settings.half_open_probes,
            Phase::Open { .. } => false,
        }
    }

    /// Lets a try through, or says how long until it is worth asking again:
    /// the rest of the open time, or (half-open with every probe slot taken)
    /// a short wait of at most 1 s, since a probe's answer frees a slot.
    pub fn admit(&mut self, now: Instant) -> Result<Admit, Duration> {
        self.advance(now);
        match self.phase {
            Phase::Closed => Ok(Admit::Normal),
            Phase::HalfOpen { .. } if self.probes_out < self.settings.half_open_probes => {
                self.probes_out += 1;
                Ok(Admit::Probe(ProbeTicket { round: self.round }))
            }
            Phase::HalfOpen { .. } => Err(PROBES_BUSY
                .min(self.settings.open_time)
                .max(Duration::from_millis(1))),
            Phase::Open { until } => Err(until.saturating_duration_since(now)),
        }
    }

    /// Takes the outcome of a try admitted as `admit` (`success` as the
    /// caller judges it, e.g. [`Outcome::is_failure`]); returns the
    /// transition it caused, `(from, to)`. The time-driven change from open
    /// to half-open is not reported here: [`Breaker::state`] shows it.
    pub fn on_result(
        &mut self,
        now: Instant,
        admit: Admit,
        success: bool,
    ) -> Option<(BreakerState, BreakerState)> {
        self.advance(now);
        if let Admit::Probe(ticket) = admit {
            self.probes_out = self.probes_out.saturating_sub(1);
            if ticket.round != self.round {
                // From an earlier half-open round, which is decided already.
                return None;
            }
        }
        match (self.phase, admit) {
            // A probe of the round that closed the breaker counts as a
            // normal request.
            (Phase::Closed, _) => {
                self.window.add(now, 1, u32::from(!success));
                self.consecutive = if success {
                    0
                } else {
                    self.consecutive.saturating_add(1)
                };
                if self.tripped(now) {
                    self.reopens = 0;
                    self.open(now);
                    return Some((BreakerState::Closed, BreakerState::Open));
                }
                None
            }
            (Phase::HalfOpen { successes }, Admit::Probe(_)) => {
                if success {
                    let successes = successes.saturating_add(1);
                    if successes >= self.settings.half_open_probes {
                        self.close();
                        return Some((BreakerState::HalfOpen, BreakerState::Closed));
                    }
                    self.phase = Phase::HalfOpen { successes };
                    None
                } else {
                    self.reopens = self.reopens.saturating_add(1);
                    self.open(now);
                    Some((BreakerState::HalfOpen, BreakerState::Open))
                }
            }
            // Sent before the breaker opened: neither closes nor reopens it.
            (Phase::HalfOpen { .. }, Admit::Normal) | (Phase::Open { .. }, _) => None,
        }
    }

    /// Gives back an admission that ended without an outcome (frees the
    /// probe slot; counts nothing).
    pub fn on_cancel(&mut self, admit: Admit) {
        if let Admit::Probe(_) = admit {
            self.probes_out = self.probes_out.saturating_sub(1);
        }
    }

    /// The breaker's evidence at `now`: its state, the failure rate in the
    /// window, the rate threshold (0 when only consecutive errors can open
    /// it) and the consecutive errors seen while closed.
    pub fn evidence(&self, now: Instant) -> BreakerEvidence {
        let (total, failures) = self.window.sum(now);
        BreakerEvidence {
            state: self.state(now),
            error_rate: EvRatio::from_counts(failures, total),
            error_threshold: EvRatio(
                self.settings
                    .error_rate
                    .map_or(0, |r| u32::from(r.basis_points()) * 100),
            ),
            consecutive_errors: self.consecutive,
        }
    }

    fn tripped(&self, now: Instant) -> bool {
        let s = &self.settings;
        if s.consecutive_errors > 0 && self.consecutive >= s.consecutive_errors {
            return true;
        }
        let Some(rate) = s.error_rate else {
            return false;
        };
        let (total, failures) = self.window.sum(now);
        total >= u64::from(s.min_requests)
            && failures > 0
            && failures * 10_000 >= u64::from(rate.basis_points()) * total
    }

    /// Opens for `open_time × 2^reopens`, at most [`MAX_OPEN_GROWTH`] ×
    /// `open_time`.
    fn open(&mut self, now: Instant) {
        let base = self.settings.open_time;
        let time = base
            .saturating_mul(1 << self.reopens.min(4))
            .min(base.saturating_mul(MAX_OPEN_GROWTH));
        // A config-sized duration can overflow `Instant`: fall back to a
        // day, then to "open until now" (half-open at once).
        let until = now
            .checked_add(time)
            .or_else(|| now.checked_add(OPEN_FALLBACK))
            .unwrap_or(now);
        self.phase = Phase::Open { until };
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.reopens = 0;
        self.consecutive = 0;
        self.window.reset();
    }
}

// ---------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------

/// Retries when neither the route nor the destination says.
pub const DEFAULT_RETRIES: u32 = 2;
/// Most retries of one request, whatever the policy says.
pub const MAX_RETRIES: u32 = 10;
/// Backoff when the destination policy does not say: exponential from
/// 25 ms to 250 ms (Envoy's default base interval and its 10× cap).
pub const DEFAULT_BACKOFF: Backoff = Backoff {
    kind: BackoffKind::Exponential,
    base: Duration::from_millis(25),
    max: Duration::from_millis(250),
};

/// The outcome of one try, as far as retrying and the breaker care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No connection (or tunnel stream) to the endpoint could be opened:
    /// the request never left.
    ConnectFailure,
    /// The endpoint refused the stream before reading the request (HTTP/2
    /// `REFUSED_STREAM`, a tunnel stream refused by the peer spoke): the
    /// request was not processed.
    RefusedStream,
    /// The connection or stream broke after the request was sent.
    Reset,
    /// The per-try timeout expired.
    Timeout,
    /// The endpoint answered with this status.
    Status(u16),
    /// A local limit refused the try (requests in flight, retry budget):
    /// never retried, and not the endpoint's fault.
    Overflow,
}

impl Outcome {
    /// Whether this counts against the endpoint's breaker: no connection,
    /// refused, reset, timed out or a 5xx (Istio counts 5xx and gateway
    /// failures). Local overflows and other statuses do not.
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::ConnectFailure
            | Outcome::RefusedStream
            | Outcome::Reset
            | Outcome::Timeout => true,
            Outcome::Status(code) => (500..=599).contains(code),
            Outcome::Overflow => false,
        }
    }

    /// Whether the endpoint certainly did not process the request, so a
    /// retry is safe whatever the method.
    pub fn never_reached_upstream(&self) -> bool {
        matches!(self, Outcome::ConnectFailure | Outcome::RefusedStream)
    }
}

/// The retry conditions (Istio/Envoy `retryOn`), as a small bitset of
/// condition flags and of HTTP status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    flags: u8,
    /// Status codes 0..640, one bit each (only 100..=599 are ever set).
    codes: [u64; 10],
}

const ON_5XX: u8 = 1;
const ON_GATEWAY_ERROR: u8 = 1 << 1;
const ON_CONNECT_FAILURE: u8 = 1 << 2;
const ON_REFUSED_STREAM: u8 = 1 << 3;
const ON_RESET: u8 = 1 << 4;
const ON_RETRIABLE_4XX: u8 = 1 << 5;

/// Conditions the config accepts that can never occur on this HTTP/1.1
/// data plane (gRPC statuses) or that need settings the model does not
/// have (`retriable-headers`); `retriable-status-codes` only says that the
/// numeric codes of the list apply, which they always do here.
const INERT_CONDITIONS: &[&str] = &[
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

impl RetryOn {
    /// Retry on nothing.
    pub const NONE: RetryOn = RetryOn {
        flags: 0,
        codes: [0; 10],
    };

    /// Parses condition names: `5xx` (any 5xx, timeouts, resets and connect
    /// failures), `gateway-error` (502, 503, 504, timeouts, resets and
    /// connect failures), `connect-failure`, `refused-stream`, `reset`
    /// (resets and connect failures, not timeouts), `retriable-4xx` (409)
    /// and status codes `100`..=`599`; the gRPC conditions,
    /// `retriable-headers` and `retriable-status-codes` are accepted and
    /// change nothing here. Entries are trimmed and may hold several names
    /// separated by commas. Returns the names it did not know.
    pub fn parse(list: &[String]) -> (RetryOn, Vec<String>) {
        let mut on = RetryOn::NONE;
        let mut unknown = Vec::new();
        for name in list.iter().flat_map(|e| e.split(',')).map(str::trim) {
            match name {
                "" => {}
                "5xx" => on.flags |= ON_5XX,
                "gateway-error" => on.flags |= ON_GATEWAY_ERROR,
                "connect-failure" => on.flags |= ON_CONNECT_FAILURE,
                "refused-stream" => on.flags |= ON_REFUSED_STREAM,
                "reset" => on.flags |= ON_RESET,
                "retriable-4xx" => on.flags |= ON_RETRIABLE_4XX,
                _ if INERT_CONDITIONS.contains(&name) => {}
                _ => match name.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => on = on.with_code(code),
                    _ => unknown.push(name.to_owned()),
                },
            }
        }
        (on, unknown)
    }

    fn with_code(mut self, code: u16) -> RetryOn {
        if let Some(word) = self.codes.get_mut(usize::from(code / 64)) {
            *word |= 1 << (code % 64);
        }
        self
    }

    fn has_code(&self, code: u16) -> bool {
        self.codes
            .get(usize::from(code / 64))
            .is_some_and(|word| word & (1 << (code % 64)) != 0)
    }

    fn has(&self, flags: u8) -> bool {
        self.flags & flags != 0
    }

    /// Whether `outcome` meets one of the conditions (whatever the method;
    /// see [`RetrySettings::may_retry`]).
    pub fn matches(&self, outcome: &Outcome) -> bool {
        match *outcome {
            Outcome::ConnectFailure => {
                self.has(ON_CONNECT_FAILURE | ON_RESET | ON_5XX | ON_GATEWAY_ERROR)
            }
            Outcome::RefusedStream => self.has(ON_REFUSED_STREAM | ON_5XX),
            Outcome::Reset => self.has(ON_RESET | ON_5XX | ON_GATEWAY_ERROR),
            // Envoy treats an expired per-try timeout as a 504.
            Outcome::Timeout => self.has(ON_5XX | ON_GATEWAY_ERROR) || self.has_code(504),
            Outcome::Status(code) => {
                (self.has(ON_5XX) && (500..=599).contains(&code))
                    || (self.has(ON_GATEWAY_ERROR) && (502..=504).contains(&code))
                    || (self.has(ON_RETRIABLE_4XX) && code == 409)
                    || self.has_code(code)
            }
            Outcome::Overflow => false,
        }
    }
}

impl Default for RetryOn {
    /// `connect-failure`, `refused-stream`, `reset`, `502`, `503`: failures
    /// where the endpoint did not do the work. Timeouts and 504 are not
    /// retried by default: the work may still be running upstream.
    fn default() -> Self {
        RetryOn {
            flags: ON_CONNECT_FAILURE | ON_REFUSED_STREAM | ON_RESET,
            codes: [0; 10],
        }
        .with_code(502)
        .with_code(503)
    }
}

/// How the requests of one route to one destination are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    /// Retries after the first try (at most [`MAX_RETRIES`]).
    pub attempts: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    /// Delay before each retry (jittered by [`backoff_delay`]).
    pub backoff: Backoff,
    /// Outcomes that are retried.
    pub retry_on: RetryOn,
}

impl RetrySettings {
    /// The route's retries over the destination policy's, field by field:
    /// attempts, per-try timeout and conditions from the route when it says,
    /// else from the destination policy, else the defaults
    /// ([`DEFAULT_RETRIES`], no per-try timeout, [`RetryOn::default`]); the
    /// backoff from the destination policy, else [`DEFAULT_BACKOFF`].
    /// Attempts are capped at [`MAX_RETRIES`]. Unknown condition names are
    /// dropped (config validation reports them): a list of only unknown
    /// names retries nothing.
    pub fn from_policy(route: Option<&RouteRetries>, dest: Option<&RetryPolicy>) -> RetrySettings {
        let attempts = route
            .map(|r| r.attempts)
            .or(dest.map(|d| d.attempts))
            .unwrap_or(DEFAULT_RETRIES)
            .min(MAX_RETRIES);
        let per_try_timeout = route
            .and_then(|r| r.per_try_timeout)
            .or(dest.and_then(|d| d.per_try_timeout));
        let names = route
            .map(|r| &r.retry_on)
            .filter(|l| !l.is_empty())
            .or(dest.map(|d| &d.retry_on).filter(|l| !l.is_empty()));
        RetrySettings {
            attempts,
            per_try_timeout,
            backoff: dest.map_or(DEFAULT_BACKOFF, |d| d.backoff),
            retry_on: names.map_or_else(RetryOn::default, |l| RetryOn::parse(l).0),
        }
    }

    /// Whether `outcome` meets the retry conditions (not counting attempts,
    /// the budget or the method).
    pub fn should_retry(&self, outcome: &Outcome) -> bool {
        self.retry_on.matches(outcome)
    }

    /// Whether a try of a `method` request that ended in `outcome` may be
    /// retried: the conditions hold, and the method is idempotent or the
    /// request never reached the endpoint. Attempts and the budget are the
    /// caller's to check.
    pub fn may_retry(&self, outcome: &Outcome, method: &str) -> bool {
        self.should_retry(outcome) && (is_idempotent(method) || outcome.never_reached_upstream())
    }
}

impl Default for RetrySettings {
    /// [`RetrySettings::from_policy`] without any policy.
    fn default() -> Self {
        RetrySettings::from_policy(None, None)
    }
}

/// Whether `method` is idempotent (RFC 9110 §9.2.2: GET, HEAD, OPTIONS,
/// TRACE, PUT, DELETE). Methods are case-sensitive.
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// The delay before retry number `retry` (from 1): the policy's
/// [`Backoff::delay`] `d` with "equal jitter", `d/2 + uniform(0..=d/2)`
/// drawn from `rng`. Equal rather than full jitter: clients that failed
/// together still spread over half the interval, but no retry comes back
/// at once (full jitter can draw 0 and hammer an endpoint that just
/// failed). Never above `d`, so never above the policy's cap.
pub fn backoff_delay(backoff: &Backoff, retry: u32, rng: u64) -> Duration {
    let d = backoff.delay(retry);
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let half = nanos / 2;
    let span = u128::from(nanos - half) + 1;
    // Multiply-shift maps rng uniformly onto 0..span.
    let jitter = (u128::from(rng) * span) >> 64;
    Duration::from_nanos(half + u64::try_from(jitter).unwrap_or(0))
}

/// The evidence of retrying: `attempt` produced the outcome (from 1),
/// `retries` were made, `backoff_ms` spent waiting. Fixed backoff is
/// recorded as linear (the evidence format has no fixed).
pub fn retry_evidence(
    settings: &RetrySettings,
    attempt: u32,
    retries: u32,
    backoff_ms: u32,
) -> RetryState {
    RetryState {
        attempt,
        max_attempts: settings.attempts.saturating_add(1),
        retries,
        backoff: match settings.backoff.kind {
            BackoffKind::None => EvBackoff::None,
            BackoffKind::Fixed | BackoffKind::Linear => EvBackoff::Linear,
            BackoffKind::Exponential => EvBackoff::Exponential,
        },
        backoff_ms,
    }
}

/// Parts per million in one.
const PPM: u128 = 1_000_000;

/// A retry budget (Finagle's, as Linkerd uses it), so that retries cannot
/// multiply the load on a failing destination: over a sliding `ttl`
/// window, retries ≤ `ratio` × requests + `min_per_second` × `ttl` (in
/// seconds). The reserve lets a quiet service retry at all; the ratio
/// bounds retries to a share of real traffic.
///
/// The window slides in tenths of `ttl`, so the bound holds exactly over
/// windows aligned to those steps, and over any `ttl` window within one
/// tenth's worth of retries.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Retries earned per request, ppm.
    ratio_ppm: u128,
    /// `min_per_second` × `ttl`, in ppm of a retry.
    reserve_ppm: u128,
    /// Requests and retries.
    window: Window,
}

impl RetryBudget {
    /// A budget of `ratio` retries per request (clamped to 0..=1000; not a
    /// number is 0) plus `min_per_second`, over `ttl`.
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        let ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        RetryBudget {
            // In 0..=1e9 after the clamp, so the cast is exact.
            ratio_ppm: (ratio * 1e6).round() as u128,
            reserve_ppm: u128::from(min_per_second) * ttl.as_millis() * 1_000,
            window: Window::new(ttl),
        }
    }

    /// Deposits for one original request (not for retries).
    pub fn on_request(&mut self, now: Instant) {
        self.window.add(now, 1, 0);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let (requests, retries) = self.window.sum(now);
        let allowance = u128::from(requests) * self.ratio_ppm + self.reserve_ppm;
        if (u128::from(retries) + 1) * PPM <= allowance {
            self.window.add(now, 0, 1);
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 retries per second, over 10 s (Linkerd's
    /// defaults).
    fn default() -> Self {
        RetryBudget::new(0.2, 10, Duration::from_secs(10))
    }
}

// ---------------------------------------------------------------------------
// Request limits
// ---------------------------------------------------------------------------

/// The most requests in flight to a destination that `limits` allow: the
/// smaller of `max_requests` (Istio `http2MaxRequests`) and, when both are
/// set, `max_connections + max_pending_requests` (Envoy's HTTP/1.1 pool:
/// one request per connection, the rest wait, and beyond both it answers
/// 503). One of the latter two alone bounds nothing (the other side
/// queues or connects without limit), so it maps to no limit.
pub fn max_requests(limits: Option<&ConnectionLimits>) -> Option<u32> {
    let l = limits?;
    let pool = match (l.max_connections, l.max_pending_requests) {
        (Some(c), Some(p)) => Some(c.saturating_add(p)),
        _ => None,
    };
    match (l.max_requests, pool) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Requests in flight to one destination, against an optional limit.
/// Clones share the counter.
#[derive(Debug, Clone)]
pub struct InFlight {
    max: Option<u32>,
    count: Arc<AtomicU32>,
}

impl InFlight {
    /// A counter with limit `max` (`None`: unlimited; `Some(0)` refuses
    /// every request).
    pub fn new(max: Option<u32>) -> Self {
        InFlight {
            max,
            count: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Counts one more request, or `None` at the limit (answer
    /// [`Outcome::Overflow`]). The guard counts it out when dropped.
    pub fn try_acquire(&self) -> Option<InFlightGuard> {
        let max = self.max.unwrap_or(u32::MAX);
        // Relaxed: the counter orders nothing but itself.
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(1).filter(|n| *n <= max)
            })
            .ok()?;
        Some(InFlightGuard {
            count: self.count.clone(),
        })
    }

    /// Requests in flight now.
    pub fn current(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn max(&self) -> Option<u32> {
        self.max
    }
}

/// One request counted by [`InFlight::try_acquire`]; dropping it counts the
/// request out.
#[derive(Debug)]
#[must_use = "the request is counted out as soon as the guard is dropped"]
pub struct InFlightGuard {
    count: Arc<AtomicU32>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_errors: 5,
            error_rate: None,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_time: Duration::from_secs(10),
            half_open_probes: 3,
        }
    }

    /// Opens `b` at `t` by consecutive failures.
    fn trip(b: &mut Breaker, t: Instant) {
        for _ in 0..b.settings.consecutive_errors {
            let a = b.admit(t).unwrap();
            b.on_result(t, a, false);
        }
        assert_eq!(b.state(t), BreakerState::Open);
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// splitmix64, for spread-out rng values.
    fn splitmix(x: &mut u64) -> u64 {
        *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn breaker_defaults_are_on() {
        let d = BreakerSettings::from_policy(None);
        assert_eq!(d, BreakerSettings::default());
        assert_eq!(d.consecutive_errors, 5);
        assert_eq!(d.error_rate, None);
        assert_eq!(d.min_requests, 20);
        assert_eq!(d.window, Duration::from_secs(10));
        assert_eq!(d.open_time, Duration::from_secs(10));
        assert_eq!(d.half_open_probes, 3);

        let cb = CircuitBreaker {
            error_rate_threshold: Some(Ratio::percent(50)),
            min_requests: 7,
            ..CircuitBreaker::default()
        };
        let s = BreakerSettings::from_policy(Some(&cb));
        assert_eq!(
            s.consecutive_errors, 5,
            "unset consecutive errors default to 5"
        );
        assert_eq!(s.error_rate, Some(Ratio::percent(50)));
        assert_eq!(s.min_requests, 7);
        assert_eq!(s.open_time, cb.open_time);
        let cb = CircuitBreaker {
            consecutive_errors: Some(0),
            ..cb
        };
        assert_eq!(
            BreakerSettings::from_policy(Some(&cb)).consecutive_errors,
            0
        );
    }

    #[test]
    fn consecutive_errors_open_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..4 {
            let a = b.admit(t).unwrap();
            assert_eq!(a, Admit::Normal);
            assert_eq!(b.on_result(t, a, false), None);
        }
        assert_eq!(b.evidence(t).consecutive_errors, 4);
        let a = b.admit(t).unwrap();
        assert_eq!(b.on_result(t, a, true), None);
        assert_eq!(b.evidence(t).consecutive_errors, 0);
        for _ in 0..4 {
            let a = b.admit(t).unwrap();
            assert_eq!(b.on_result(t, a, false), None);
        }
        let a = b.admit(t).unwrap();
        assert_eq!(
            b.on_result(t, a, false),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.available(t));
        assert_eq!(b.admit(t), Err(Duration::from_secs(10)));
        assert_eq!(
            b.admit(t + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
    }

    #[test]
    fn error_rate_opens_only_with_min_requests() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerSettings {
            consecutive_errors: 0,
            error_rate: Some(Ratio::percent(50)),
            min_requests: 10,
            ..settings()
        });
        // 9 failures: a 100 % rate, but too few requests
        for i in 0..9 {
            let a = b.admit(t + i * MS).unwrap();
            assert_eq!(b.on_result(t + i * MS, a, false), None, "request {i}");
        }
        assert_eq!(b.state(t + 9 * MS), BreakerState::Closed);
        let a = b.admit(t + 9 * MS).unwrap();
        assert_eq!(
            b.on_result(t + 9 * MS, a, false),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        let ev = b.evidence(t + 9 * MS);
        assert_eq!(ev.error_rate, EvRatio(1_000_000));
        assert_eq!(ev.error_threshold, EvRatio(500_000));
    }

    #[test]
    fn error_rate_below_threshold_or_outside_the_window_does_not_open() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerSettings {
            consecutive_errors: 0,
            error_rate: Some(Ratio::percent(50)),
            min_requests: 10,
            ..settings()
        });
        // 40 %: 2 failures in every 5
        for i in 0..100u32 {
            let now = t + i * 10 * MS;
            let a = b.admit(now).unwrap();
            assert_eq!(b.on_result(now, a, i % 5 < 3), None, "request {i}");
        }
        let ev = b.evidence(t + Duration::from_secs(1));
        assert_eq!(ev.error_rate, EvRatio(400_000));
        // 9 failures, then the window slides past them before the
        // requests that would reach min_requests
        let mut b = Breaker::new(BreakerSettings {
            consecutive_errors: 0,
            error_rate: Some(Ratio::percent(50)),
            min_requests: 10,
            ..settings()
        });
        for _ in 0..9 {
            let a = b.admit(t).unwrap();
            b.on_result(t, a, false);
        }
        let later = t + Duration::from_secs(11);
        assert_eq!(b.evidence(later).error_rate, EvRatio(0));
        for _ in 0..9 {
            let a = b.admit(later).unwrap();
            assert_eq!(b.on_result(later, a, true), None);
        }
        let a = b.admit(later).unwrap();
        assert_eq!(b.on_result(later, a, false), None, "old failures slid out");
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn open_turns_half_open_after_open_time() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        trip(&mut b, t);
        let open = Duration::from_secs(10);
        assert_eq!(b.state(t + open - MS), BreakerState::Open);
        assert!(!b.available(t + open - MS));
        assert_eq!(b.admit(t + open - MS), Err(MS));
        assert_eq!(b.state(t + open), BreakerState::HalfOpen);
        assert!(b.available(t + open));
        assert!(matches!(b.admit(t + open), Ok(Admit::Probe(_))));
    }

    #[test]
    fn half_open_lets_at_most_n_probes_in_flight() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        trip(&mut b, t);
        let h = t + Duration::from_secs(10);
        let probes: Vec<Admit> = (0..3).map(|_| b.admit(h).unwrap()).collect();
        assert!(probes.iter().all(|p| matches!(p, Admit::Probe(_))));
        assert!(!b.available(h));
        assert_eq!(b.admit(h), Err(Duration::from_secs(1)));
        // one answer frees one slot
        assert_eq!(b.on_result(h, probes[0], true), None);
        assert!(b.available(h));
        let again = b.admit(h).unwrap();
        assert!(b.admit(h).is_err());
        // a cancelled probe frees its slot without counting
        b.on_cancel(again);
        assert!(b.available(h));
        assert_eq!(b.state(h), BreakerState::HalfOpen);
    }

    #[test]
    fn n_probe_successes_close_and_reset() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        trip(&mut b, t);
        let h = t + Duration::from_secs(10);
        let probes: Vec<Admit> = (0..3).map(|_| b.admit(h).unwrap()).collect();
        assert_eq!(b.on_result(h, probes[0], true), None);
        assert_eq!(b.on_result(h, probes[1], true), None);
        assert_eq!(
            b.on_result(h, probes[2], true),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert_eq!(b.state(h), BreakerState::Closed);
        assert_eq!(b.admit(h), Ok(Admit::Normal));
        let ev = b.evidence(h);
        assert_eq!(ev.consecutive_errors, 0);
        assert_eq!(ev.error_rate, EvRatio(0));
        // the open time is back to the base after closing
        trip(&mut b, h);
        assert_eq!(b.admit(h), Err(Duration::from_secs(10)));
    }

    #[test]
    fn a_probe_failure_reopens_for_longer_up_to_ten_times() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        trip(&mut b, t);
        let mut now = t + Duration::from_secs(10);
        for expected in [20, 40, 80, 100, 100] {
            let p = b.admit(now).unwrap();
            assert_eq!(
                b.on_result(now, p, false),
                Some((BreakerState::HalfOpen, BreakerState::Open))
            );
            assert_eq!(b.admit(now), Err(Duration::from_secs(expected)));
            now += Duration::from_secs(expected);
            assert_eq!(b.state(now), BreakerState::HalfOpen);
        }
    }

    #[test]
    fn stale_normal_results_do_not_close_or_reopen() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        // requests in flight before the breaker opens
        let early: Vec<Admit> = (0..10).map(|_| b.admit(t).unwrap()).collect();
        trip(&mut b, t);
        for a in &early[..5] {
            assert_eq!(b.on_result(t + MS, *a, true), None);
        }
        assert_eq!(b.state(t + MS), BreakerState::Open);
        // half-open: normal answers neither count as probes nor reopen
        let h = t + Duration::from_secs(10);
        let p = b.admit(h).unwrap();
        for a in &early[5..8] {
            assert_eq!(b.on_result(h, *a, true), None);
        }
        assert_eq!(b.on_result(h, early[8], false), None);
        assert_eq!(b.state(h), BreakerState::HalfOpen);
        assert_eq!(b.on_result(h, p, true), None, "one success of three");
        assert_eq!(b.state(h), BreakerState::HalfOpen);
    }

    #[test]
    fn late_probes_of_an_earlier_round_free_their_slot_but_decide_nothing() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        trip(&mut b, t);
        let h = t + Duration::from_secs(10);
        let p1 = b.admit(h).unwrap();
        let p2 = b.admit(h).unwrap();
        let p3 = b.admit(h).unwrap();
        assert!(b.on_result(h, p1, false).is_some());
        let h2 = h + Duration::from_secs(20);
        assert_eq!(b.state(h2), BreakerState::HalfOpen);
        // p2 and p3 are still in flight: one slot is free
        let q1 = b.admit(h2).unwrap();
        assert!(b.admit(h2).is_err());
        // their answers free slots, but the old round's success does not
        // count and its failure does not reopen
        assert_eq!(b.on_result(h2, p2, true), None);
        assert_eq!(b.on_result(h2, p3, false), None);
        assert_eq!(b.state(h2), BreakerState::HalfOpen);
        let q2 = b.admit(h2).unwrap();
        let q3 = b.admit(h2).unwrap();
        assert_eq!(b.on_result(h2, q1, true), None);
        assert_eq!(b.on_result(h2, q2, true), None);
        assert_eq!(
            b.on_result(h2, q3, true),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
    }

    #[test]
    fn hostile_settings_do_not_panic() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerSettings {
            consecutive_errors: 1,
            error_rate: Some(Ratio::ZERO),
            min_requests: 0,
            window: Duration::ZERO,
            open_time: Duration::MAX,
            half_open_probes: 0,
        });
        let a = b.admit(t).unwrap();
        assert!(b.on_result(t, a, false).is_some());
        assert!(b.admit(t).is_err());
        // a zero rate threshold needs a failure to trip
        let mut b = Breaker::new(BreakerSettings {
            consecutive_errors: 0,
            error_rate: Some(Ratio::ZERO),
            min_requests: 1,
            ..settings()
        });
        let a = b.admit(t).unwrap();
        assert_eq!(b.on_result(t, a, true), None);
        // time going backwards
        let later = t + Duration::from_secs(5);
        let a = b.admit(later).unwrap();
        b.on_result(later, a, true);
        let a = b.admit(t).unwrap();
        b.on_result(t, a, true);
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn retry_defaults_and_precedence() {
        let d = RetrySettings::from_policy(None, None);
        assert_eq!(d, RetrySettings::default());
        assert_eq!(d.attempts, 2);
        assert_eq!(d.per_try_timeout, None);
        assert_eq!(d.backoff, DEFAULT_BACKOFF);
        assert_eq!(d.retry_on, RetryOn::default());

        let dest = RetryPolicy {
            attempts: 4,
            per_try_timeout: Some(Duration::from_secs(2)),
            backoff: Backoff {
                kind: BackoffKind::Linear,
                base: Duration::from_millis(10),
                max: Duration::from_millis(100),
            },
            retry_on: strings(&["5xx"]),
        };
        let s = RetrySettings::from_policy(None, Some(&dest));
        assert_eq!(s.attempts, 4);
        assert_eq!(s.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.backoff, dest.backoff);
        assert!(s.should_retry(&Outcome::Status(500)));

        let route = RouteRetries {
            attempts: 50,
            per_try_timeout: None,
            retry_on: Vec::new(),
        };
        let s = RetrySettings::from_policy(Some(&route), Some(&dest));
        assert_eq!(s.attempts, MAX_RETRIES, "capped");
        assert_eq!(s.per_try_timeout, Some(Duration::from_secs(2)));
        assert!(s.should_retry(&Outcome::Status(500)), "dest conditions");
        let route = RouteRetries {
            attempts: 0,
            per_try_timeout: Some(Duration::from_millis(300)),
            retry_on: strings(&["gateway-error"]),
        };
        let s = RetrySettings::from_policy(Some(&route), Some(&dest));
        assert_eq!(s.attempts, 0);
        assert_eq!(s.per_try_timeout, Some(Duration::from_millis(300)));
        assert!(!s.should_retry(&Outcome::Status(500)));
        assert!(s.should_retry(&Outcome::Status(504)));
        let s = RetrySettings::from_policy(Some(&route), None);
        assert_eq!(s.backoff, DEFAULT_BACKOFF);
    }

    #[test]
    fn default_conditions_retry_gateway_failures_but_not_timeouts() {
        let on = RetryOn::default();
        for o in [
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
            Outcome::Reset,
            Outcome::Status(502),
            Outcome::Status(503),
        ] {
            assert!(on.matches(&o), "{o:?}");
        }
        for o in [
            Outcome::Timeout,
            Outcome::Status(504),
            Outcome::Status(500),
            Outcome::Status(404),
            Outcome::Status(200),
            Outcome::Overflow,
        ] {
            assert!(!on.matches(&o), "{o:?}");
        }
    }

    #[test]
    fn retry_on_parsing() {
        let (on, unknown) = RetryOn::parse(&strings(&["5xx"]));
        assert!(unknown.is_empty());
        for o in [
            Outcome::Status(500),
            Outcome::Status(599),
            Outcome::Timeout,
            Outcome::Reset,
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
        ] {
            assert!(on.matches(&o), "{o:?}");
        }
        assert!(!on.matches(&Outcome::Status(499)));
        assert!(!on.matches(&Outcome::Overflow));

        let (on, _) = RetryOn::parse(&strings(&["gateway-error"]));
        assert!(on.matches(&Outcome::Status(502)));
        assert!(on.matches(&Outcome::Status(504)));
        assert!(on.matches(&Outcome::Timeout));
        assert!(!on.matches(&Outcome::Status(500)));

        let (on, _) = RetryOn::parse(&strings(&["reset"]));
        assert!(on.matches(&Outcome::Reset));
        assert!(on.matches(&Outcome::ConnectFailure));
        assert!(!on.matches(&Outcome::Timeout));

        let (on, _) = RetryOn::parse(&strings(&["connect-failure"]));
        assert!(on.matches(&Outcome::ConnectFailure));
        assert!(!on.matches(&Outcome::Reset));

        let (on, unknown) = RetryOn::parse(&strings(&[
            " 503 ,retriable-4xx",
            "retriable-status-codes",
            "unavailable",
            "cancelled",
            "bogus",
            "600",
            "99",
            "",
            "5XX",
        ]));
        assert_eq!(unknown, strings(&["bogus", "600", "99", "5XX"]));
        assert!(on.matches(&Outcome::Status(503)));
        assert!(on.matches(&Outcome::Status(409)));
        assert!(!on.matches(&Outcome::Status(502)));
        assert!(!on.matches(&Outcome::Reset));
        assert!(!on.matches(&Outcome::Status(u16::MAX)));

        let (on, unknown) = RetryOn::parse(&strings(&["nope"]));
        assert_eq!(on, RetryOn::NONE);
        assert_eq!(unknown, strings(&["nope"]));
        let route = RouteRetries {
            attempts: 3,
            per_try_timeout: None,
            retry_on: strings(&["nope"]),
        };
        let s = RetrySettings::from_policy(Some(&route), None);
        assert!(!s.should_retry(&Outcome::ConnectFailure));
    }

    #[test]
    fn idempotent_methods() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(is_idempotent(m), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "get", "", "FOO"] {
            assert!(!is_idempotent(m), "{m}");
        }
        let s = RetrySettings::default();
        assert!(s.may_retry(&Outcome::Reset, "GET"));
        assert!(!s.may_retry(&Outcome::Reset, "POST"));
        assert!(s.may_retry(&Outcome::ConnectFailure, "POST"));
        assert!(s.may_retry(&Outcome::RefusedStream, "POST"));
        assert!(!s.may_retry(&Outcome::Overflow, "GET"));
    }

    #[test]
    fn outcome_failures() {
        assert!(Outcome::Status(503).is_failure());
        assert!(Outcome::Timeout.is_failure());
        assert!(!Outcome::Status(404).is_failure());
        assert!(!Outcome::Status(200).is_failure());
        assert!(!Outcome::Overflow.is_failure());
    }

    #[test]
    fn backoff_jitter_stays_within_half_and_the_cap() {
        let exp = DEFAULT_BACKOFF;
        let mut x = 7;
        for retry in 1..=12 {
            let d = exp.delay(retry);
            let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
            for _ in 0..5_000 {
                let j = backoff_delay(&exp, retry, splitmix(&mut x));
                assert!(j >= d / 2 && j <= d, "retry {retry}: {j:?} vs {d:?}");
                assert!(j <= exp.max);
                lo = lo.min(j);
                hi = hi.max(j);
            }
            // the draws spread over the jitter range
            assert!(lo < d / 2 + d / 10 && hi > d - d / 10, "{lo:?}..{hi:?}");
        }
        assert_eq!(backoff_delay(&exp, 1, 0), Duration::from_micros(12_500));
        assert!(backoff_delay(&exp, 1, u64::MAX) <= Duration::from_millis(25));
        assert!(backoff_delay(&exp, 1, u64::MAX) > Duration::from_micros(24_999));
        assert_eq!(backoff_delay(&exp, 4, 0), Duration::from_millis(100));
        assert_eq!(backoff_delay(&Backoff::NONE, 3, 12345), Duration::ZERO);
        let huge = Backoff {
            kind: BackoffKind::Exponential,
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert!(backoff_delay(&huge, 30, u64::MAX) > Duration::ZERO);
    }

    #[test]
    fn retry_evidence_maps_the_policy() {
        let mut s = RetrySettings::default();
        let ev = retry_evidence(&s, 3, 2, 60);
        assert_eq!(ev.attempt, 3);
        assert_eq!(ev.max_attempts, 3);
        assert_eq!(ev.retries, 2);
        assert_eq!(ev.backoff, EvBackoff::Exponential);
        assert_eq!(ev.backoff_ms, 60);
        s.backoff.kind = BackoffKind::Fixed;
        assert_eq!(retry_evidence(&s, 1, 0, 0).backoff, EvBackoff::Linear);
        s.backoff.kind = BackoffKind::Linear;
        assert_eq!(retry_evidence(&s, 1, 0, 0).backoff, EvBackoff::Linear);
        s.backoff = Backoff::NONE;
        assert_eq!(retry_evidence(&s, 1, 0, 0).backoff, EvBackoff::None);
    }

    #[test]
    fn budget_bounds_retries_when_everything_fails() {
        let t = Instant::now();
        let mut budget = RetryBudget::default();
        // 1,000 requests at 100/s, each failing, each wanting one retry
        let mut allowed = 0u32;
        for i in 0..1000u32 {
            let now = t + i * 10 * MS;
            budget.on_request(now);
            if budget.try_withdraw(now) {
                allowed += 1;
            }
        }
        // 0.2 × 1000 + 10/s × 10 s
        assert!(allowed <= 300, "{allowed}");
        assert!(allowed >= 290, "{allowed}");
    }

    #[test]
    fn budget_bound_holds_in_every_window_of_a_long_run() {
        let t = Instant::now();
        let mut budget = RetryBudget::default();
        // 100 s at 100 requests/s, every request wanting 3 retries
        let mut per_second = vec![0u32; 100];
        for i in 0..10_000u32 {
            let now = t + i * 10 * MS;
            budget.on_request(now);
            for _ in 0..3 {
                if budget.try_withdraw(now) {
                    per_second[(i / 100) as usize] += 1;
                }
            }
        }
        // every 10 s window aligned to the budget's buckets (whole seconds
        // here): at most 0.2 × 1000 requests + 10/s × 10 s
        for w in per_second.windows(10) {
            let sum: u32 = w.iter().sum();
            assert!(sum <= 300, "{sum} in {w:?}");
        }
        // and the budget keeps letting retries through
        let total: u32 = per_second.iter().sum();
        assert!(total > 2_500, "{total}");
    }

    #[test]
    fn budget_reserve_alone_and_refill_after_ttl() {
        let t = Instant::now();
        let mut budget = RetryBudget::new(0.0, 2, Duration::from_secs(5));
        let n = (0..100).filter(|_| budget.try_withdraw(t)).count();
        assert_eq!(n, 10);
        assert!(!budget.try_withdraw(t + Duration::from_secs(4)));
        assert!(budget.try_withdraw(t + Duration::from_secs(5)));
        // nonsense ratios are no ratio
        let mut b = RetryBudget::new(f64::NAN, 0, Duration::from_secs(1));
        b.on_request(t);
        assert!(!b.try_withdraw(t));
        let mut b = RetryBudget::new(-1.0, 0, Duration::ZERO);
        b.on_request(t);
        assert!(!b.try_withdraw(t));
    }

    #[test]
    fn in_flight_limit_and_guard() {
        let f = InFlight::new(Some(2));
        let a = f.try_acquire().unwrap();
        let b = f.clone().try_acquire().unwrap();
        assert_eq!(f.current(), 2);
        assert!(f.try_acquire().is_none());
        drop(a);
        assert_eq!(f.current(), 1);
        let c = f.try_acquire().unwrap();
        drop((b, c));
        assert_eq!(f.current(), 0);
        assert!(InFlight::new(Some(0)).try_acquire().is_none());
        let unlimited = InFlight::new(None);
        let guards: Vec<_> = (0..1000)
            .map(|_| unlimited.try_acquire().unwrap())
            .collect();
        assert_eq!(unlimited.current(), 1000);
        drop(guards);
        assert_eq!(unlimited.current(), 0);
    }

    #[test]
    fn max_requests_mapping() {
        assert_eq!(max_requests(None), None);
        let mut l = ConnectionLimits::default();
        assert_eq!(max_requests(Some(&l)), None);
        l.max_connections = Some(10);
        assert_eq!(max_requests(Some(&l)), None, "connections alone queue");
        l.max_pending_requests = Some(5);
        assert_eq!(max_requests(Some(&l)), Some(15));
        l.max_requests = Some(100);
        assert_eq!(max_requests(Some(&l)), Some(15));
        l.max_requests = Some(7);
        assert_eq!(max_requests(Some(&l)), Some(7));
        l.max_connections = None;
        assert_eq!(max_requests(Some(&l)), Some(7));
        l.max_pending_requests = Some(u32::MAX);
        l.max_connections = Some(u32::MAX);
        l.max_requests = None;
        assert_eq!(max_requests(Some(&l)), Some(u32::MAX));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Admit,
        Answer(usize, bool),
        Cancel(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..1_500).prop_map(Op::Advance),
            Just(Op::Admit),
            (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Answer(i, ok)),
            any::<usize>().prop_map(Op::Cancel),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn probes_in_flight_never_exceed_the_limit(
            probes in 1u32..4,
            consecutive in 0u32..4,
            rate in proptest::option::of(0u8..=100),
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let s = BreakerSettings {
                consecutive_errors: consecutive,
                error_rate: rate.map(Ratio::percent),
                min_requests: 3,
                window: Duration::from_secs(1),
                open_time: Duration::from_millis(500),
                half_open_probes: probes,
            };
            let mut b = Breaker::new(s);
            let mut now = Instant::now();
            let mut out: Vec<Admit> = Vec::new();
            for op in ops {
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Admit => {
                        let available = b.available(now);
                        let state = b.state(now);
                        match b.admit(now) {
                            Ok(a) => {
                                prop_assert!(available);
                                prop_assert_eq!(
                                    matches!(a, Admit::Probe(_)),
                                    state == BreakerState::HalfOpen
                                );
                                prop_assert!(state != BreakerState::Open);
                                out.push(a);
                            }
                            Err(wait) => {
                                prop_assert!(!available);
                                prop_assert!(wait > Duration::ZERO);
                            }
                        }
                    }
                    Op::Answer(i, ok) if !out.is_empty() => {
                        let a = out.swap_remove(i % out.len());
                        let before = b.state(now);
                        if let Some((from, to)) = b.on_result(now, a, ok) {
                            prop_assert_eq!(from, before);
                            prop_assert_ne!(from, to);
                            prop_assert_eq!(b.state(now), to);
                            if to == BreakerState::Closed {
                                prop_assert!(ok && matches!(a, Admit::Probe(_)));
                            }
                        }
                    }
                    Op::Cancel(i) if !out.is_empty() => {
                        let a = out.swap_remove(i % out.len());
                        b.on_cancel(a);
                    }
                    Op::Answer(..) | Op::Cancel(_) => {}
                }
                let probes_out = out.iter().filter(|a| matches!(a, Admit::Probe(_))).count();
                prop_assert!(probes_out <= probes as usize, "{} probes in flight", probes_out);
                prop_assert_eq!(probes_out, b.probes_out as usize);
                let _ = b.evidence(now);
            }
        }
    }
}
