//! One direction of the relay as an impaired link: the decision logic, without I/O.
//!
//! A [`Link`] is fed datagrams with [`Link::handle_datagram`]`(now, tag, payload, rng)`
//! and hands back the ones due with [`Link::poll_transmit`]`(now)`;
//! [`Link::poll_timeout`] says when the next one comes due. Time and randomness come
//! in as arguments, so the same seed and the same arrival times give the same fate for
//! every datagram, and tests need neither sockets nor sleeps. The relay driver owns one
//! link per direction and does the sending; it holds no impairment rules of its own.
//!
//! A datagram's path, in order (each step counted in [`Counters`]):
//!
//! 1. `blackout`: dropped (`dropped.blackout`).
//! 2. `mtu`: larger than the MTU, dropped (`dropped.mtu`).
//! 3. `loss` (random or Gilbert-Elliott): dropped (`dropped.loss`).
//! 4. `duplicate`: a second copy is made (`duplicated`); each copy then goes on alone.
//! 5. `limit`: if `limit` datagrams are already waiting, the copy is dropped
//!    (`dropped.queue_full`). This bounds both the delay and the rate backlog.
//! 6. `corrupt`: one random bit is flipped (`corrupted`); the datagram is still sent.
//! 7. `rate`: a token bucket of `burst` bytes filled at `rate`; the datagram leaves
//!    when the bucket holds its size, in arrival order (serialisation delay, as netem).
//! 8. `reorder`: the datagram skips the delay and leaves as soon as the rate allows,
//!    overtaking the datagrams still waiting out their delay (`reordered`), as netem
//!    does. Otherwise it waits `delay` ± `jitter` on top of the rate wait; jitter alone
//!    can also reorder datagrams, as with netem.
//! 9. At departure, if the link is (now) blacked out, the datagram is dropped
//!    (`dropped.blackout`): a partition also loses what was in flight.
//!
//! Datagrams held for any time count as `delayed`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::impairment::units::MAX_DURATION;
use crate::impairment::{Distribution, Impairment, LossModel};

/// Datagrams dropped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    /// Random or Gilbert-Elliott loss.
    pub loss: u64,
    /// The direction was blacked out on arrival or at departure.
    pub blackout: u64,
    /// Larger than the MTU.
    pub mtu: u64,
    /// The delay/rate queue already held `limit` datagrams.
    pub queue_full: u64,
    /// A new client arrived while the flow table was full, or its upstream-facing
    /// socket could not be opened (up direction only).
    pub flow_limit: u64,
    /// The operating system refused to send, or the flow had expired.
    pub send_error: u64,
}

impl Drops {
    /// All drops together.
    pub fn total(&self) -> u64 {
        self.loss
            .saturating_add(self.blackout)
            .saturating_add(self.mtu)
            .saturating_add(self.queue_full)
            .saturating_add(self.flow_limit)
            .saturating_add(self.send_error)
    }
}

/// What happened to the datagrams of one direction.
///
/// Once the queue is empty, `received + duplicated == forwarded + dropped.total()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Datagrams that arrived.
    pub received: u64,
    /// Bytes that arrived.
    pub received_bytes: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    /// Bytes sent on.
    pub forwarded_bytes: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Datagrams (copies) held in the queue for some time by delay or rate.
    pub delayed: u64,
    /// Datagrams (copies) that skipped the delay to overtake others.
    pub reordered: u64,
    /// Datagrams (copies) sent with a flipped bit; not dropped.
    pub corrupted: u64,
    /// Datagrams dropped, by reason.
    pub dropped: Drops,
}

fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}

fn add(counter: &mut u64, amount: usize) {
    *counter = counter.saturating_add(amount as u64);
}

/// A datagram the link releases: send `payload` towards `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<T> {
    /// Where it goes (the relay uses the client's address).
    pub tag: T,
    /// The bytes to send, possibly corrupted.
    pub payload: Vec<u8>,
}

struct Pending<T> {
    due: Instant,
    seq: u64,
    tag: T,
    payload: Vec<u8>,
}

// Ordered by due time, then arrival order; `BinaryHeap` is a max-heap, so reversed.
impl<T> Ord for Pending<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl<T> PartialOrd for Pending<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> PartialEq for Pending<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<T> Eq for Pending<T> {}

/// One impaired direction; see the [module docs](self) for what happens to a datagram.
pub struct Link<T> {
    impairment: Impairment,
    /// Gilbert-Elliott chain state: true while in the bad state.
    ge_bad: bool,
    /// Token bucket as a virtual clock: when the bytes accepted so far have drained at
    /// `rate`. The bucket is full when this is `burst/rate` or more in the past.
    drained_at: Option<Instant>,
    queue: BinaryHeap<Pending<T>>,
    next_seq: u64,
    counters: Counters,
}

impl<T> Link<T> {
    /// A link applying `impairment`.
    pub fn new(impairment: Impairment) -> Self {
        Self {
            impairment,
            ge_bad: false,
            drained_at: None,
            queue: BinaryHeap::new(),
            next_seq: 0,
            counters: Counters::default(),
        }
    }

    /// The impairment in force.
    pub fn impairment(&self) -> &Impairment {
        &self.impairment
    }

    /// Replaces the impairment. Datagrams already queued keep their departure time; the
    /// loss chain and the token bucket restart if their settings changed.
    pub fn set_impairment(&mut self, impairment: Impairment) {
        if impairment.loss != self.impairment.loss {
            self.ge_bad = false;
        }
        if impairment.rate != self.impairment.rate || impairment.burst != self.impairment.burst {
            self.drained_at = None;
        }
        self.impairment = impairment;
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Datagrams waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Takes in a datagram that arrived at `now`, bound for `tag`.
    pub fn handle_datagram<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        tag: T,
        payload: Vec<u8>,
        rng: &mut R,
    ) where
        T: Clone,
    {
        bump(&mut self.counters.received);
        add(&mut self.counters.received_bytes, payload.len());
        let imp = &self.impairment;
        if imp.blackout {
            bump(&mut self.counters.dropped.blackout);
            return;
        }
        if imp.mtu.is_some_and(|mtu| payload.len() > mtu as usize) {
            bump(&mut self.counters.dropped.mtu);
            return;
        }
        if self.lose(rng) {
            bump(&mut self.counters.dropped.loss);
            return;
        }
        if chance(rng, self.impairment.duplicate.fraction()) {
            bump(&mut self.counters.duplicated);
            self.enqueue(now, tag.clone(), payload.clone(), rng);
        }
        self.enqueue(now, tag, payload, rng);
    }

    /// Records a datagram for a new client turned away because the flow table is full.
    pub fn record_flow_limit(&mut self, bytes: usize) {
        bump(&mut self.counters.received);
        add(&mut self.counters.received_bytes, bytes);
        bump(&mut self.counters.dropped.flow_limit);
    }

    /// The next datagram due at `now`, if any. Datagrams that come due while the link is
    /// blacked out are dropped here. The caller reports the outcome with
    /// [`Link::record_sent`] or [`Link::record_send_error`].
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<T>> {
        while self.queue.peek().is_some_and(|p| p.due <= now) {
            let pending = self.queue.pop()?;
            if self.impairment.blackout {
                bump(&mut self.counters.dropped.blackout);
                continue;
            }
            return Some(Transmit {
                tag: pending.tag,
                payload: pending.payload,
            });
        }
        None
    }

    /// When the next queued datagram comes due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|p| p.due)
    }

    /// Records that a datagram from [`Link::poll_transmit`] was sent.
    pub fn record_sent(&mut self, bytes: usize) {
        bump(&mut self.counters.forwarded);
        add(&mut self.counters.forwarded_bytes, bytes);
    }

    /// Records that a datagram from [`Link::poll_transmit`] could not be sent.
    pub fn record_send_error(&mut self) {
        bump(&mut self.counters.dropped.send_error);
    }

    /// Drops everything queued (used on shutdown); returns how many were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        n
    }

    fn lose<R: Rng + ?Sized>(&mut self, rng: &mut R) -> bool {
        match self.impairment.loss {
            None => false,
            Some(LossModel::Random(p)) => chance(rng, p.fraction()),
            Some(LossModel::GilbertElliott(ge)) => {
                // As netem: move the chain, then decide with the state the datagram
                // arrived in.
                if self.ge_bad {
                    if chance(rng, ge.r.fraction()) {
                        self.ge_bad = false;
                    }
                    chance(rng, ge.bad_loss.fraction())
                } else {
                    if chance(rng, ge.p.fraction()) {
                        self.ge_bad = true;
                    }
                    chance(rng, ge.good_loss.fraction())
                }
            }
        }
    }

    fn enqueue<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        tag: T,
        mut payload: Vec<u8>,
        rng: &mut R,
    ) {
        let imp = &self.impairment;
        if self.queue.len() >= imp.limit as usize {
            bump(&mut self.counters.dropped.queue_full);
            return;
        }
        if !payload.is_empty() && chance(rng, imp.corrupt.fraction()) {
            let bit = rng.random_range(0..payload.len() * 8);
            if let Some(byte) = payload.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
            bump(&mut self.counters.corrupted);
        }
        let mut due = now;
        if let Some(rate) = imp.rate {
            // Token bucket as a virtual clock: the bytes accepted drain at `rate`; this
            // datagram may leave once the backlog ahead of it, itself included, fits in
            // the bucket (`burst` bytes, i.e. `burst/rate` of drain time).
            let tolerance = rate.transmit_time(imp.burst as usize);
            let start = self.drained_at.map_or(now, |t| t.max(now));
            let drained = start
                .checked_add(rate.transmit_time(payload.len()))
                .unwrap_or(start);
            self.drained_at = Some(drained);
            due = drained.checked_sub(tolerance).unwrap_or(now).max(now);
        }
        let has_delay = !imp.delay.is_zero() || !imp.jitter.is_zero();
        if has_delay {
            if !imp.reorder.is_zero() && chance(rng, imp.reorder.fraction()) {
                bump(&mut self.counters.reordered);
            } else {
                let delay = sample_delay(imp, rng);
                due = due.checked_add(delay).unwrap_or(due);
            }
        }
        if due > now {
            bump(&mut self.counters.delayed);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.queue.push(Pending {
            due,
            seq,
            tag,
            payload,
        });
    }
}

/// True with probability `p` (0 and 1 exactly never/always, without drawing).
fn chance<R: Rng + ?Sized>(rng: &mut R, p: f64) -> bool {
    if p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rng.random::<f64>() < p
    }
}

/// A standard normal sample (Box-Muller).
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A Pareto (shape 3) sample shifted and scaled to mean 0 and standard deviation 1:
/// bounded below at about -0.58, with a long tail above.
fn standard_pareto<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    const ALPHA: f64 = 3.0;
    // For shape 3 and scale 1: mean 1.5, standard deviation sqrt(3)/2.
    let mean = ALPHA / (ALPHA - 1.0);
    let std_dev = (ALPHA / ((ALPHA - 1.0).powi(2) * (ALPHA - 2.0))).sqrt();
    let u = 1.0 - rng.random::<f64>();
    let x = u.powf(-1.0 / ALPHA);
    (x - mean) / std_dev
}

/// One delay drawn from `delay`, `jitter` and `distribution`, never negative and at
/// most an hour past `delay`.
fn sample_delay<R: Rng + ?Sized>(imp: &Impairment, rng: &mut R) -> Duration {
    if imp.jitter.is_zero() {
        return imp.delay.min(MAX_DURATION);
    }
    let jitter = imp.jitter.as_secs_f64();
    let offset = match imp.distribution {
        Distribution::Uniform => rng.random_range(-1.0..=1.0) * jitter,
        Distribution::Normal => standard_normal(rng) * jitter,
        Distribution::Pareto => standard_pareto(rng) * jitter,
    };
    let seconds = (imp.delay.as_secs_f64() + offset).clamp(0.0, 2.0 * MAX_DURATION.as_secs_f64());
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SEED: u64 = 0x7d3e_5eed;

    fn imp(text: &str) -> Impairment {
        text.parse().expect("valid impairment")
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(SEED)
    }

    /// Feeds `n` datagrams of `size` bytes at `spacing`, collecting (sent index, due
    /// offset, payload) for each transmit.
    fn run(
        link: &mut Link<u64>,
        n: u64,
        size: usize,
        spacing: Duration,
    ) -> Vec<(u64, Duration, Vec<u8>)> {
        let start = Instant::now();
        let mut rng = rng();
        let mut out = Vec::new();
        let drain = |link: &mut Link<u64>, until: Instant, out: &mut Vec<_>| {
            while let Some(due) = link.poll_timeout().filter(|d| *d <= until) {
                while let Some(t) = link.poll_transmit(due) {
                    link.record_sent(t.payload.len());
                    out.push((t.tag, due - start, t.payload));
                }
            }
        };
        for i in 0..n {
            let now = start + spacing * u32::try_from(i).expect("small n");
            drain(link, now, &mut out);
            link.handle_datagram(now, i, vec![0xA5; size], &mut rng);
        }
        drain(link, start + Duration::from_secs(100_000), &mut out);
        out
    }

    fn assert_conserved(link: &Link<u64>) {
        let c = link.counters();
        assert_eq!(link.queued(), 0);
        assert_eq!(
            c.received + c.duplicated,
            c.forwarded + c.dropped.total(),
            "{c:?}"
        );
    }

    #[test]
    fn no_impairment_passes_everything_at_once() {
        let mut link = Link::new(Impairment::none());
        let out = run(&mut link, 100, 10, Duration::from_millis(1));
        assert_eq!(out.len(), 100);
        for (i, (tag, at, payload)) in out.iter().enumerate() {
            assert_eq!(*tag, i as u64);
            assert_eq!(*at, Duration::from_millis(i as u64));
            assert_eq!(payload, &vec![0xA5; 10]);
        }
        assert_eq!(link.counters().delayed, 0);
        assert_conserved(&link);
    }

    #[test]
    fn random_loss_rate() {
        let mut link = Link::new(imp("loss 10%"));
        let out = run(&mut link, 20_000, 10, Duration::from_micros(10));
        let lost = 20_000 - out.len();
        assert!((1_800..=2_200).contains(&lost), "lost {lost}");
        assert_eq!(link.counters().dropped.loss, lost as u64);
        assert_conserved(&link);
    }

    #[test]
    fn gilbert_elliott_loss_is_bursty() {
        let mut link = Link::new(imp("loss gemodel 1% 25%"));
        let n = 100_000;
        let out = run(&mut link, n, 10, Duration::from_micros(10));
        let mut received = vec![false; n as usize];
        for (tag, _, _) in &out {
            received[*tag as usize] = true;
        }
        let lost = received.iter().filter(|r| !**r).count() as f64;
        let bursts = received.windows(2).filter(|w| w[0] && !w[1]).count() as f64;
        let expected = 0.01 / (0.01 + 0.25);
        let rate = lost / n as f64;
        assert!((rate - expected).abs() < 0.01, "loss {rate} vs {expected}");
        let mean_burst = lost / bursts;
        assert!(
            (3.0..5.0).contains(&mean_burst),
            "mean burst {mean_burst}, want ~4"
        );
        assert_conserved(&link);
    }

    #[test]
    fn gilbert_elliott_mean_loss_formula() {
        let Some(LossModel::GilbertElliott(ge)) = imp("loss gemodel 5% 20% 50% 1%").loss else {
            panic!("gemodel expected");
        };
        let expected = 0.2 * 0.5 + 0.8 * 0.01;
        assert!((ge.mean_loss() - expected).abs() < 1e-12);
        let mut link = Link::new(imp("loss gemodel 5% 20% 50% 1%"));
        let out = run(&mut link, 100_000, 10, Duration::from_micros(10));
        let rate = 1.0 - out.len() as f64 / 100_000.0;
        assert!((rate - expected).abs() < 0.01, "loss {rate} vs {expected}");
    }

    #[test]
    fn fixed_delay_is_exact() {
        let mut link = Link::new(imp("delay 50ms"));
        let out = run(&mut link, 100, 10, Duration::from_millis(1));
        for (tag, at, _) in &out {
            assert_eq!(*at, Duration::from_millis(*tag + 50));
        }
        assert_eq!(link.counters().delayed, 100);
        assert_conserved(&link);
    }

    fn delays(text: &str, n: u64) -> Vec<f64> {
        let mut link = Link::new(imp(text));
        run(&mut link, n, 10, Duration::from_millis(1))
            .iter()
            .map(|(tag, at, _)| (at.as_secs_f64() - *tag as f64 / 1000.0) * 1000.0)
            .collect()
    }

    fn mean_and_std(xs: &[f64]) -> (f64, f64) {
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn uniform_jitter_stays_in_band() {
        let d = delays("delay 50ms 10ms", 10_000);
        assert!(d.iter().all(|x| (39.999..=60.001).contains(x)));
        let (mean, std) = mean_and_std(&d);
        assert!((mean - 50.0).abs() < 0.5, "mean {mean}");
        // Uniform on ±10: std 20/sqrt(12) = 5.77.
        assert!((std - 5.77).abs() < 0.3, "std {std}");
    }

    #[test]
    fn normal_jitter_has_the_given_deviation() {
        let d = delays("delay 50ms 10ms distribution normal", 10_000);
        let (mean, std) = mean_and_std(&d);
        assert!((mean - 50.0).abs() < 0.5, "mean {mean}");
        assert!((std - 10.0).abs() < 0.5, "std {std}");
        assert!(
            d.iter().any(|x| *x > 75.0),
            "a normal should exceed 2.5 sigma sometimes"
        );
    }

    #[test]
    fn pareto_jitter_is_heavy_tailed() {
        let d = delays("delay 50ms 10ms distribution pareto", 20_000);
        let (mean, std) = mean_and_std(&d);
        assert!((mean - 50.0).abs() < 1.0, "mean {mean}");
        assert!((7.0..13.0).contains(&std), "std {std}");
        assert!(
            d.iter().all(|x| *x >= 44.0),
            "bounded below at ~ -0.58 sigma"
        );
        assert!(d.iter().any(|x| *x > 100.0), "tail should reach 5 sigma");
    }

    #[test]
    fn jitter_never_goes_negative() {
        let d = delays("delay 1ms 50ms distribution normal", 1_000);
        assert!(d.iter().all(|x| *x >= 0.0));
    }

    #[test]
    fn duplication_makes_second_copies() {
        let mut link = Link::new(imp("duplicate 20%"));
        let out = run(&mut link, 10_000, 10, Duration::from_micros(100));
        let dups = out.len() - 10_000;
        assert!((1_800..=2_200).contains(&dups), "dups {dups}");
        assert_eq!(link.counters().duplicated, dups as u64);
        assert_conserved(&link);
    }

    #[test]
    fn reordered_datagrams_skip_the_delay() {
        let mut link = Link::new(imp("delay 20ms reorder 25%"));
        let out = run(&mut link, 10_000, 10, Duration::from_millis(1));
        let fast = out
            .iter()
            .filter(|(tag, at, _)| at.as_millis() as u64 == *tag)
            .count();
        let slow = out
            .iter()
            .filter(|(tag, at, _)| at.as_millis() as u64 == *tag + 20)
            .count();
        assert_eq!(fast + slow, 10_000);
        assert!((2_300..=2_700).contains(&fast), "fast {fast}");
        assert_eq!(link.counters().reordered, fast as u64);
        let overtaken = out.windows(2).filter(|w| w[1].0 < w[0].0).count();
        assert!(overtaken > 1_000, "sequence numbers should show reordering");
        assert_conserved(&link);
    }

    #[test]
    fn corruption_flips_exactly_one_bit() {
        let mut link = Link::new(imp("corrupt 10%"));
        let out = run(&mut link, 10_000, 64, Duration::from_micros(100));
        let flipped: Vec<u32> = out
            .iter()
            .map(|(_, _, p)| p.iter().map(|b| (b ^ 0xA5).count_ones()).sum())
            .collect();
        assert!(flipped.iter().all(|f| *f <= 1));
        let corrupted = flipped.iter().filter(|f| **f == 1).count();
        assert!((900..=1_100).contains(&corrupted), "corrupted {corrupted}");
        assert_eq!(link.counters().corrupted, corrupted as u64);
        assert_eq!(out.len(), 10_000);
    }

    #[test]
    fn empty_datagrams_are_never_corrupted() {
        let mut link = Link::new(imp("corrupt 100%"));
        let out = run(&mut link, 10, 0, Duration::from_millis(1));
        assert_eq!(out.len(), 10);
        assert_eq!(link.counters().corrupted, 0);
    }

    #[test]
    fn rate_paces_datagrams() {
        // 1mbit: 1250 bytes take 10ms. Offered 10x faster than the rate.
        let mut link = Link::new(imp("rate 1mbit"));
        let out = run(&mut link, 100, 1250, Duration::from_millis(1));
        assert_eq!(out.len(), 100);
        for (i, (_, at, _)) in out.iter().enumerate() {
            assert_eq!(*at, Duration::from_millis(10 * (i as u64 + 1)));
        }
        assert_conserved(&link);
    }

    #[test]
    fn rate_under_the_limit_adds_only_serialisation() {
        let mut link = Link::new(imp("rate 1mbit"));
        let out = run(&mut link, 10, 125, Duration::from_millis(5));
        for (tag, at, _) in &out {
            assert_eq!(*at, Duration::from_millis(tag * 5 + 1));
        }
    }

    #[test]
    fn burst_lets_a_bucketful_through_at_once() {
        let mut link = Link::new(imp("rate 1mbit burst 5000"));
        let out = run(&mut link, 10, 1250, Duration::ZERO);
        let at: Vec<u64> = out.iter().map(|(_, at, _)| at.as_millis() as u64).collect();
        // The first 4 datagrams (5000 bytes) leave at once, then one per 10ms.
        assert_eq!(at, vec![0, 0, 0, 0, 10, 20, 30, 40, 50, 60]);
    }

    #[test]
    fn rate_backlog_is_bounded_by_the_limit() {
        let mut link = Link::new(imp("rate 1mbit limit 10"));
        let out = run(&mut link, 100, 1250, Duration::ZERO);
        assert_eq!(out.len(), 10);
        assert_eq!(link.counters().dropped.queue_full, 90);
        assert_conserved(&link);
    }

    #[test]
    fn delay_queue_is_bounded_by_the_limit() {
        let mut link = Link::new(imp("delay 1s limit 5"));
        let out = run(&mut link, 20, 10, Duration::from_millis(1));
        assert_eq!(out.len(), 5);
        assert_eq!(link.counters().dropped.queue_full, 15);
    }

    #[test]
    fn mtu_drops_exactly_the_oversized() {
        let mut link: Link<u64> = Link::new(imp("mtu 1000"));
        let now = Instant::now();
        let mut rng = rng();
        for (i, size) in [999usize, 1000, 1001, 65535, 0].into_iter().enumerate() {
            link.handle_datagram(now, i as u64, vec![0; size], &mut rng);
        }
        let mut sent = Vec::new();
        while let Some(t) = link.poll_transmit(now) {
            sent.push(t.tag);
        }
        sent.sort_unstable();
        assert_eq!(sent, vec![0, 1, 4]);
        assert_eq!(link.counters().dropped.mtu, 2);
    }

    #[test]
    fn blackout_drops_new_and_in_flight_datagrams() {
        let mut link: Link<u64> = Link::new(imp("delay 10ms"));
        let start = Instant::now();
        let mut rng = rng();
        link.handle_datagram(start, 1, vec![1], &mut rng);
        let mut dark = link.impairment().clone();
        dark.blackout = true;
        link.set_impairment(dark);
        link.handle_datagram(start, 2, vec![2], &mut rng);
        assert_eq!(link.counters().dropped.blackout, 1);
        assert_eq!(link.poll_timeout(), Some(start + Duration::from_millis(10)));
        assert_eq!(link.poll_transmit(start + Duration::from_millis(10)), None);
        assert_eq!(link.counters().dropped.blackout, 2);
        link.set_impairment(Impairment::none());
        link.handle_datagram(start, 3, vec![3], &mut rng);
        assert_eq!(link.poll_transmit(start).map(|t| t.tag), Some(3));
    }

    #[test]
    fn healing_before_departure_delivers_in_flight_datagrams() {
        let mut link: Link<u64> = Link::new(imp("delay 10ms"));
        let start = Instant::now();
        let mut rng = rng();
        link.handle_datagram(start, 1, vec![1], &mut rng);
        link.set_impairment(imp("delay 10ms blackout"));
        link.set_impairment(imp("delay 10ms"));
        let due = start + Duration::from_millis(10);
        assert_eq!(link.poll_transmit(due).map(|t| t.tag), Some(1));
    }

    #[test]
    fn same_seed_same_fate() {
        let text = "delay 10ms 5ms distribution normal loss gemodel 5% 30% duplicate 5% corrupt 5% reorder 10%";
        let a = run(
            &mut Link::new(imp(text)),
            2_000,
            32,
            Duration::from_micros(300),
        );
        let b = run(
            &mut Link::new(imp(text)),
            2_000,
            32,
            Duration::from_micros(300),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn arbitrary_impairments_never_panic_and_conserve_datagrams() {
        use crate::impairment::{GilbertElliott, Percent, Rate};
        let mut rng = rng();
        for round in 0..200u64 {
            let pct =
                |rng: &mut StdRng| Percent::new(rng.random_range(0.0..=100.0)).expect("in range");
            // Deliberately unvalidated: the link must cope with anything the fields hold.
            let impairment = Impairment {
                delay: Duration::from_micros(rng.random_range(0..5_000)),
                jitter: Duration::from_micros(rng.random_range(0..5_000)),
                distribution: [
                    Distribution::Uniform,
                    Distribution::Normal,
                    Distribution::Pareto,
                ][rng.random_range(0..3)],
                loss: match rng.random_range(0..3) {
                    0 => None,
                    1 => Some(LossModel::Random(pct(&mut rng))),
                    _ => Some(LossModel::GilbertElliott(GilbertElliott {
                        p: pct(&mut rng),
                        r: pct(&mut rng),
                        bad_loss: pct(&mut rng),
                        good_loss: pct(&mut rng),
                    })),
                },
                duplicate: pct(&mut rng),
                reorder: pct(&mut rng),
                corrupt: pct(&mut rng),
                rate: Rate::bits_per_second(rng.random_range(0..10_000_000)),
                burst: rng.random_range(0..100_000),
                mtu: rng.random_bool(0.5).then(|| rng.random_range(0..70_000)),
                limit: rng.random_range(0..50),
                blackout: rng.random_bool(0.1),
            };
            let mut link = Link::new(impairment);
            let start = Instant::now();
            for i in 0..200u64 {
                let now = start + Duration::from_micros(i * 50);
                let size = rng.random_range(0..2_000);
                link.handle_datagram(now, i, vec![0; size], &mut rng);
                while let Some(t) = link.poll_transmit(now) {
                    link.record_sent(t.payload.len());
                }
            }
            while let Some(due) = link.poll_timeout() {
                while let Some(t) = link.poll_transmit(due) {
                    link.record_sent(t.payload.len());
                }
            }
            let c = link.counters();
            assert_eq!(c.received, 200, "round {round}");
            assert_eq!(
                c.received + c.duplicated,
                c.forwarded + c.dropped.total(),
                "round {round}"
            );
        }
    }

    #[test]
    fn time_going_backwards_does_not_panic() {
        let mut link: Link<u64> = Link::new(imp("rate 1kbit delay 1ms"));
        let later = Instant::now() + Duration::from_secs(1);
        let earlier = later - Duration::from_secs(1);
        let mut rng = rng();
        link.handle_datagram(later, 1, vec![0; 100], &mut rng);
        link.handle_datagram(earlier, 2, vec![0; 100], &mut rng);
        assert_eq!(link.poll_transmit(earlier), None);
    }
}
