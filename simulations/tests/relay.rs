//! End-to-end tests of the relay with real UDP sockets on 127.0.0.1: each impairment
//! measured within a statistical tolerance, blackout and heal (both and one way), flows,
//! the control socket, schedules and the `tidemesh-relay` binary itself.
//!
//! Tolerances are generous (this runs on a loaded 2-core machine) but each would catch
//! a broken mechanism. Every relay uses a fixed seed, printed in failure messages.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tidemesh_sim::control::{self, Request};
use tidemesh_sim::{Direction, Impairment, Relay, RelayConfig, RelayHandle, Schedule, Stats};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::sleep;

const SEED: u64 = 20_240_601;

fn imp(text: &str) -> Impairment {
    text.parse().expect("valid impairment")
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[derive(Clone)]
struct Arrival {
    at: Instant,
    from: SocketAddr,
    payload: Vec<u8>,
}

/// Records every datagram a socket receives, optionally echoing it back.
struct Recorder {
    socket: Arc<UdpSocket>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    async fn bind(echo: bool) -> Result<Self> {
        let socket = Arc::new(UdpSocket::bind(localhost()).await?);
        Ok(Self::spawn(socket, echo))
    }

    /// A client socket connected to the relay.
    async fn client(relay: &RelayHandle) -> Result<Self> {
        let socket = UdpSocket::bind(localhost()).await?;
        socket.connect(relay.local_addr()).await?;
        Ok(Self::spawn(Arc::new(socket), false))
    }

    fn spawn(socket: Arc<UdpSocket>, echo: bool) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let socket = Arc::clone(&socket);
            let arrivals = Arc::clone(&arrivals);
            async move {
                let mut buf = vec![0u8; 65535];
                while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                    let payload = buf[..len].to_vec();
                    if echo {
                        let _ = socket.send_to(&payload, from).await;
                    }
                    arrivals.lock().expect("not poisoned").push(Arrival {
                        at: Instant::now(),
                        from,
                        payload,
                    });
                }
            }
        });
        Self {
            socket,
            arrivals,
            task,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound socket")
    }

    fn count(&self) -> usize {
        self.arrivals.lock().expect("not poisoned").len()
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("not poisoned").clone()
    }

    fn clear(&self) {
        self.arrivals.lock().expect("not poisoned").clear();
    }

    /// Sends on a connected socket.
    async fn send(&self, payload: &[u8]) -> Result<()> {
        self.socket.send(payload).await?;
        Ok(())
    }

    /// Sends `n` datagrams built by `make`, `per_ms` per millisecond, so neither the
    /// relay's nor the receiver's socket buffer overflows; returns the send times.
    async fn send_paced(
        &self,
        n: u32,
        per_ms: u32,
        make: impl Fn(u32) -> Vec<u8>,
    ) -> Result<Vec<Instant>> {
        let mut sent = Vec::with_capacity(n as usize);
        for i in 0..n {
            sent.push(Instant::now());
            self.send(&make(i)).await?;
            if (i + 1) % per_ms == 0 {
                sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(sent)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn seq_payload(i: u32, size: usize) -> Vec<u8> {
    let mut payload = vec![0xA5; size.max(4)];
    payload[..4].copy_from_slice(&i.to_be_bytes());
    payload
}

fn seq_of(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"))
}

async fn start(upstream: SocketAddr, up: &str, down: &str) -> Result<RelayHandle> {
    let config = RelayConfig::new(localhost(), upstream)
        .seed(SEED)
        .impair(Direction::Up, imp(up))
        .impair(Direction::Down, imp(down));
    Ok(Relay::start(config).await?)
}

/// Waits until both queues are empty and the recorders have stopped growing.
async fn settle(relay: &RelayHandle, recorders: &[&Recorder]) -> Result<Stats> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last: Option<Vec<usize>> = None;
    loop {
        sleep(Duration::from_millis(60)).await;
        let stats = relay.stats().await?;
        let counts: Vec<usize> = recorders.iter().map(|r| r.count()).collect();
        let idle = stats.up.queued == 0 && stats.down.queued == 0;
        if (idle && last.as_ref() == Some(&counts)) || Instant::now() > deadline {
            return Ok(stats);
        }
        last = Some(counts);
    }
}

/// Polls `condition` on the stats until it holds, or fails after `timeout`.
async fn wait_for(
    relay: &RelayHandle,
    timeout: Duration,
    what: &str,
    condition: impl Fn(&Stats) -> bool,
) -> Result<Stats> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = relay.stats().await?;
        if condition(&stats) {
            return Ok(stats);
        }
        ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test]
async fn random_loss_of_10_percent_over_5000_datagrams() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let relay = start(upstream.addr(), "loss 10%", "none").await?;
    let client = Recorder::client(&relay).await?;
    client.send_paced(5000, 10, |i| seq_payload(i, 16)).await?;
    let stats = settle(&relay, &[&upstream]).await?;
    let delivered = upstream.count() as f64;
    let received = stats.up.counters.received as f64;
    ensure!(
        received >= 4900.0,
        "relay saw only {received} of 5000 (seed {SEED})"
    );
    let loss = 1.0 - delivered / received;
    eprintln!("seed={SEED} random loss {loss:.4} over {received} datagrams");
    ensure!(
        (0.075..=0.125).contains(&loss),
        "loss {loss:.4}, want 0.10 ± 0.025 (seed {SEED})"
    );
    let c = &stats.up.counters;
    ensure!(
        c.received == c.forwarded + c.dropped.loss,
        "counters add up: {c:?}"
    );
    ensure!(stats.down.counters.received == 0);
    Ok(())
}

#[tokio::test]
async fn gilbert_elliott_loss_comes_in_bursts() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    // p = 2%, r = 20%: loss 2/22 = 9.1% in bursts of 5 on average.
    let relay = start(upstream.addr(), "loss gemodel 2% 20%", "none").await?;
    let client = Recorder::client(&relay).await?;
    let n = 4000u32;
    client.send_paced(n, 10, |i| seq_payload(i, 16)).await?;
    let stats = settle(&relay, &[&upstream]).await?;
    let got: HashSet<u32> = upstream
        .arrivals()
        .iter()
        .map(|a| seq_of(&a.payload))
        .collect();
    let lost: Vec<bool> = (0..n).map(|i| !got.contains(&i)).collect();
    let lost_count = lost.iter().filter(|l| **l).count() as f64;
    let rate = lost_count / f64::from(n);
    ensure!(
        (0.05..=0.14).contains(&rate),
        "loss {rate:.3}, want ~0.091 (seed {SEED})"
    );
    let bursts = lost
        .iter()
        .enumerate()
        .filter(|(i, l)| **l && (*i == 0 || !lost[i - 1]))
        .count() as f64;
    let mean_burst = lost_count / bursts;
    eprintln!("seed={SEED} gemodel loss {rate:.4}, mean burst {mean_burst:.2}");
    // Independent 9% loss would give bursts of ~1.1.
    ensure!(
        mean_burst >= 2.5,
        "mean burst {mean_burst:.2}, want ~5 (seed {SEED})"
    );
    ensure!(stats.up.counters.dropped.loss as f64 >= lost_count - 20.0);
    Ok(())
}

/// Sends `n` pings `spacing` apart through an echoing upstream; returns RTTs in ms.
async fn ping_rtts(relay: &RelayHandle, n: u32, spacing: Duration) -> Result<Vec<f64>> {
    let client = Recorder::client(relay).await?;
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push(Instant::now());
        client.send(&seq_payload(i, 32)).await?;
        sleep(spacing).await;
    }
    settle(relay, &[&client]).await?;
    let arrivals = client.arrivals();
    ensure!(
        arrivals.len() as u32 == n,
        "{} of {n} pings came back",
        arrivals.len()
    );
    Ok(arrivals
        .iter()
        .map(|a| (a.at - sent[seq_of(&a.payload) as usize]).as_secs_f64() * 1000.0)
        .collect())
}

#[tokio::test]
async fn delay_adds_up_across_directions() -> Result<()> {
    let upstream = Recorder::bind(true).await?;
    let relay = start(upstream.addr(), "delay 30ms", "delay 20ms").await?;
    let mut rtts = ping_rtts(&relay, 40, Duration::from_millis(5)).await?;
    let min = rtts.iter().copied().fold(f64::MAX, f64::min);
    let median = median(&mut rtts);
    eprintln!("seed={SEED} delay 30ms+20ms: min {min:.1}ms median {median:.1}ms");
    ensure!(min >= 49.0, "min RTT {min:.1}ms is below the 50ms delay");
    ensure!(median <= 80.0, "median RTT {median:.1}ms, want ~50ms");
    let stats = relay.stats().await?;
    ensure!(stats.up.counters.delayed == 40 && stats.down.counters.delayed == 40);
    Ok(())
}

#[tokio::test]
async fn jitter_spreads_delays_by_distribution() -> Result<()> {
    let upstream = Recorder::bind(true).await?;
    let relay = start(upstream.addr(), "delay 50ms 20ms", "none").await?;
    let mut uniform = ping_rtts(&relay, 200, Duration::from_millis(2)).await?;
    uniform.sort_by(f64::total_cmp);
    let (min, q1, q3) = (
        uniform[0],
        quantile(&uniform, 0.25),
        quantile(&uniform, 0.75),
    );
    eprintln!("seed={SEED} uniform jitter: min {min:.1} q1 {q1:.1} q3 {q3:.1} ms");
    // Uniform on 30..70ms: IQR 20ms.
    ensure!(
        min >= 29.0,
        "uniform min {min:.1}ms below delay - jitter (seed {SEED})"
    );
    ensure!(
        (10.0..=35.0).contains(&(q3 - q1)),
        "uniform IQR {:.1}ms, want ~20",
        q3 - q1
    );

    relay
        .set(Direction::Up, imp("delay 50ms 10ms distribution normal"))
        .await?;
    let mut normal = ping_rtts(&relay, 200, Duration::from_millis(2)).await?;
    normal.sort_by(f64::total_cmp);
    let (q1, med, q3) = (
        quantile(&normal, 0.25),
        quantile(&normal, 0.5),
        quantile(&normal, 0.75),
    );
    eprintln!("seed={SEED} normal jitter: q1 {q1:.1} median {med:.1} q3 {q3:.1} ms");
    // Normal with sigma 10ms: IQR 13.5ms.
    ensure!(
        (6.0..=28.0).contains(&(q3 - q1)),
        "normal IQR {:.1}ms, want ~13.5",
        q3 - q1
    );
    ensure!(
        (44.0..=75.0).contains(&med),
        "normal median {med:.1}ms, want ~50"
    );
    Ok(())
}

#[tokio::test]
async fn duplication_sends_second_copies() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let relay = start(upstream.addr(), "duplicate 20%", "none").await?;
    let client = Recorder::client(&relay).await?;
    client.send_paced(2000, 10, |i| seq_payload(i, 16)).await?;
    let stats = settle(&relay, &[&upstream]).await?;
    let mut copies: HashMap<u32, u32> = HashMap::new();
    for a in upstream.arrivals() {
        *copies.entry(seq_of(&a.payload)).or_default() += 1;
    }
    ensure!(
        copies.values().all(|c| *c <= 2),
        "at most two copies of each"
    );
    let extra = copies.values().filter(|c| **c == 2).count();
    eprintln!("seed={SEED} duplicates {extra} of 2000");
    ensure!(
        (320..=480).contains(&extra),
        "{extra} duplicates of 2000, want ~400 (seed {SEED})"
    );
    ensure!(stats.up.counters.duplicated as usize >= extra);
    Ok(())
}

#[tokio::test]
async fn reordered_datagrams_overtake_delayed_ones() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let relay = start(upstream.addr(), "delay 30ms reorder 25%", "none").await?;
    let client = Recorder::client(&relay).await?;
    let sent = client.send_paced(400, 1, |i| seq_payload(i, 16)).await?;
    let stats = settle(&relay, &[&upstream]).await?;
    let arrivals = upstream.arrivals();
    ensure!(
        arrivals.len() >= 395,
        "only {} of 400 arrived",
        arrivals.len()
    );
    let fast = arrivals
        .iter()
        .filter(|a| a.at - sent[seq_of(&a.payload) as usize] < Duration::from_millis(15))
        .count();
    let share = fast as f64 / arrivals.len() as f64;
    eprintln!("seed={SEED} reordered share {share:.3}");
    ensure!(
        (0.15..=0.35).contains(&share),
        "{share:.3} skipped the delay, want 0.25 (seed {SEED})"
    );
    let mut highest = 0;
    let mut out_of_order = 0;
    for a in &arrivals {
        let seq = seq_of(&a.payload);
        if seq < highest {
            out_of_order += 1;
        }
        highest = highest.max(seq);
    }
    ensure!(
        out_of_order >= 50,
        "sequence numbers show only {out_of_order} late arrivals"
    );
    let reordered = stats.up.counters.reordered as f64;
    ensure!(
        (reordered - fast as f64).abs() <= 20.0,
        "reordered counter {reordered} vs {fast} fast"
    );
    Ok(())
}

#[tokio::test]
async fn corruption_flips_a_single_bit() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let relay = start(upstream.addr(), "corrupt 10%", "none").await?;
    let client = Recorder::client(&relay).await?;
    client.send_paced(2000, 10, |_| vec![0xA5; 64]).await?;
    let stats = settle(&relay, &[&upstream]).await?;
    let arrivals = upstream.arrivals();
    ensure!(
        arrivals.len() >= 1990,
        "corruption must not drop: {} of 2000",
        arrivals.len()
    );
    let flipped: Vec<u32> = arrivals
        .iter()
        .map(|a| a.payload.iter().map(|b| (b ^ 0xA5).count_ones()).sum())
        .collect();
    ensure!(flipped.iter().all(|f| *f <= 1), "never more than one bit");
    let corrupted = flipped.iter().filter(|f| **f == 1).count();
    eprintln!("seed={SEED} corrupted {corrupted} of 2000");
    ensure!(
        (140..=260).contains(&corrupted),
        "{corrupted} corrupted of 2000, want ~200 (seed {SEED})"
    );
    ensure!(stats.up.counters.corrupted as usize >= corrupted);
    ensure!(stats.up.counters.dropped.total() == 0);
    Ok(())
}

#[tokio::test]
async fn rate_limit_holds_throughput_near_the_rate() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    // 4mbit = 500 kB/s: 1000-byte datagrams leave every 2ms.
    let relay = start(upstream.addr(), "rate 4mbit", "none").await?;
    let client = Recorder::client(&relay).await?;
    let started = Instant::now();
    client.send_paced(150, 5, |i| seq_payload(i, 1000)).await?;
    let offered = started.elapsed();
    let stats = settle(&relay, &[&upstream]).await?;
    let arrivals = upstream.arrivals();
    ensure!(
        arrivals.len() >= 140,
        "only {} of 150 arrived: {stats:?}",
        arrivals.len()
    );
    let span = (arrivals[arrivals.len() - 1].at - arrivals[0].at).as_secs_f64();
    let bytes_per_sec = (arrivals.len() - 1) as f64 * 1000.0 / span;
    eprintln!("seed={SEED} rate 4mbit: {bytes_per_sec:.0} B/s, offered in {offered:?}");
    ensure!(
        (375_000.0..=600_000.0).contains(&bytes_per_sec),
        "throughput {bytes_per_sec:.0} B/s, want ~500000 (offered in {offered:?})"
    );
    ensure!(stats.up.counters.delayed >= 100);
    Ok(())
}

#[tokio::test]
async fn mtu_drops_exactly_the_oversized() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let relay = start(upstream.addr(), "mtu 1000", "none").await?;
    let client = Recorder::client(&relay).await?;
    let sizes = [500usize, 1000, 1001, 1500];
    client
        .send_paced(100, 5, |i| seq_payload(i, sizes[i as usize % 4]))
        .await?;
    let stats = settle(&relay, &[&upstream]).await?;
    let arrivals = upstream.arrivals();
    ensure!(
        arrivals.len() == 50,
        "{} arrived, want exactly 50",
        arrivals.len()
    );
    ensure!(arrivals.iter().all(|a| a.payload.len() <= 1000));
    ensure!(stats.up.counters.dropped.mtu == 50);
    Ok(())
}

#[tokio::test]
async fn blackout_drops_everything_until_heal() -> Result<()> {
    let upstream = Recorder::bind(true).await?;
    let relay = start(upstream.addr(), "none", "none").await?;
    let client = Recorder::client(&relay).await?;
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    settle(&relay, &[&client]).await?;
    ensure!(
        client.count() == 10,
        "echoes before blackout: {}",
        client.count()
    );

    relay.blackout(Direction::Both).await?;
    client.clear();
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    let stats = settle(&relay, &[&client, &upstream]).await?;
    ensure!(
        client.count() == 0,
        "{} got through the blackout",
        client.count()
    );
    ensure!(stats.up.counters.dropped.blackout == 10);
    ensure!(stats.up.impairment.blackout && stats.down.impairment.blackout);

    relay.heal().await?;
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    let stats = settle(&relay, &[&client]).await?;
    ensure!(
        client.count() == 10,
        "echoes after heal: {}",
        client.count()
    );
    ensure!(stats.up.impairment.is_none() && stats.down.impairment.is_none());
    Ok(())
}

#[tokio::test]
async fn one_way_blackout_blocks_only_its_direction() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let relay = start(upstream.addr(), "none", "none").await?;
    let client = Recorder::client(&relay).await?;
    client.send(b"hello").await?;
    settle(&relay, &[&upstream]).await?;
    let flow = upstream.arrivals().first().context("hello arrived")?.from;
    let from_upstream = |n: u32| {
        let socket = Arc::clone(&upstream.socket);
        async move {
            for i in 0..n {
                socket.send_to(&seq_payload(i, 16), flow).await?;
            }
            anyhow::Ok(())
        }
    };

    // Up blocked: the client's datagrams vanish, the upstream's still arrive.
    relay.blackout(Direction::Up).await?;
    upstream.clear();
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    from_upstream(10).await?;
    let stats = settle(&relay, &[&upstream, &client]).await?;
    ensure!(upstream.count() == 0, "up leaked {}", upstream.count());
    ensure!(
        client.count() == 10,
        "down delivered {} of 10",
        client.count()
    );
    ensure!(stats.up.counters.dropped.blackout == 10 && stats.down.counters.dropped.blackout == 0);

    // And the other way round.
    relay.heal().await?;
    relay.blackout(Direction::Down).await?;
    client.clear();
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    from_upstream(10).await?;
    let stats = settle(&relay, &[&upstream, &client]).await?;
    ensure!(
        upstream.count() == 10,
        "up delivered {} of 10",
        upstream.count()
    );
    ensure!(client.count() == 0, "down leaked {}", client.count());
    ensure!(stats.down.counters.dropped.blackout == 10);
    Ok(())
}

#[tokio::test]
async fn many_clients_get_their_own_flows() -> Result<()> {
    let upstream = Recorder::bind(true).await?;
    let relay = start(upstream.addr(), "delay 5ms", "delay 5ms").await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(Recorder::client(&relay).await?);
    }
    for (id, client) in clients.iter().enumerate() {
        client
            .send_paced(5, 5, |i| seq_payload(id as u32 * 100 + i, 16))
            .await?;
    }
    let refs: Vec<&Recorder> = clients.iter().chain([&upstream]).collect();
    let stats = settle(&relay, &refs).await?;
    let sources: HashSet<SocketAddr> = upstream.arrivals().iter().map(|a| a.from).collect();
    ensure!(
        sources.len() == 20,
        "{} upstream-facing sockets for 20 clients",
        sources.len()
    );
    for (id, client) in clients.iter().enumerate() {
        let echoes = client.arrivals();
        ensure!(echoes.len() == 5, "client {id} got {} echoes", echoes.len());
        ensure!(
            echoes.iter().all(|a| seq_of(&a.payload) / 100 == id as u32),
            "client {id} got another's echo"
        );
    }
    ensure!(stats.flows.active == 20 && stats.flows.created == 20);
    Ok(())
}

#[tokio::test]
async fn flow_table_is_bounded_and_idle_flows_expire() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let mut config = RelayConfig::new(localhost(), upstream.addr()).seed(SEED);
    config.max_flows = 3;
    config.idle_timeout = Duration::from_millis(300);
    let relay = Relay::start(config).await?;
    let mut clients = Vec::new();
    for i in 0..5u32 {
        let client = Recorder::client(&relay).await?;
        client.send(&seq_payload(i, 16)).await?;
        clients.push(client);
    }
    let last_send = Instant::now();
    let stats = settle(&relay, &[&upstream]).await?;
    ensure!(
        upstream.count() == 3,
        "{} clients got through a 3-flow table",
        upstream.count()
    );
    ensure!(stats.up.counters.dropped.flow_limit == 2 && stats.flows.active == 3);

    wait_for(&relay, Duration::from_secs(5), "flows to expire", |s| {
        s.flows.active == 0
    })
    .await?;
    let idle = last_send.elapsed();
    ensure!(
        idle >= Duration::from_millis(300),
        "expired after {idle:?}, before the 300ms timeout"
    );
    clients[4].send(&seq_payload(4, 16)).await?;
    let stats = settle(&relay, &[&upstream]).await?;
    ensure!(upstream.count() == 4, "a new flow fits after expiry");
    ensure!(stats.flows.created == 4 && stats.flows.expired == 3);
    Ok(())
}

fn temp_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tidemesh-relay-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
async fn control_socket_sets_and_reports() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("control")?;
    let path = dir.join("ctl.sock");
    let upstream = Recorder::bind(false).await?;
    let mut config = RelayConfig::new(localhost(), upstream.addr()).seed(SEED);
    config.control = Some(path.clone());
    let relay = Relay::start(config).await?;
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "control socket mode {mode:o}");

    let ctl = |request: Request| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || control::request(&path, &request))
    };
    let response = ctl(Request::Set {
        direction: Direction::Up,
        impairment: imp("loss 100%"),
    })
    .await??;
    let impairments = response
        .impairments
        .context("set answers with impairments")?;
    ensure!(impairments.up == imp("loss 100%") && impairments.down.is_none());

    let client = Recorder::client(&relay).await?;
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    settle(&relay, &[&upstream]).await?;
    ensure!(upstream.count() == 0);
    let stats = ctl(Request::Stats).await??.stats.context("stats")?;
    ensure!(stats.seed == SEED && stats.up.counters.dropped.loss == 10);

    ctl(Request::Heal {
        direction: Direction::Both,
    })
    .await??;
    client.send_paced(10, 5, |i| seq_payload(i, 16)).await?;
    settle(&relay, &[&upstream]).await?;
    ensure!(upstream.count() == 10, "healed through the control socket");

    // Raw JSON lines, including garbage, on one connection.
    let stream = tokio::net::UnixStream::connect(&path).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write
        .write_all(b"garbage\n{\"cmd\":\"blackout\",\"direction\":\"down\"}\n")
        .await?;
    let bad = lines.next_line().await?.context("answer to garbage")?;
    ensure!(
        bad.contains("\"ok\":false") && bad.contains("invalid request"),
        "{bad}"
    );
    let good = lines.next_line().await?.context("answer to blackout")?;
    ensure!(good.contains("\"down\":\"blackout\""), "{good}");

    // An oversized request is refused and the connection closed.
    let stream = tokio::net::UnixStream::connect(&path).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write
        .write_all(&vec![b'x'; control::MAX_REQUEST + 10])
        .await?;
    let refused = lines
        .next_line()
        .await?
        .context("answer to an oversized request")?;
    ensure!(refused.contains("longer than"), "{refused}");
    ensure!(
        lines.next_line().await?.is_none(),
        "connection closed after it"
    );

    relay.shutdown().await?;
    ensure!(!path.exists(), "control socket removed on shutdown");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn schedule_changes_impairments_over_time() -> Result<()> {
    let upstream = Recorder::bind(false).await?;
    let mut config = RelayConfig::new(localhost(), upstream.addr()).seed(SEED);
    config.schedule =
        Schedule::parse("# partition drill\n0s delay 5ms\n300ms direction up blackout\n1s heal\n")?;
    let started = Instant::now();
    let relay = Relay::start(config).await?;
    let client = Recorder::client(&relay).await?;

    let stats = wait_for(&relay, Duration::from_secs(1), "0s entry", |s| {
        s.up.impairment == imp("delay 5ms")
    })
    .await?;
    ensure!(stats.down.impairment == imp("delay 5ms"));
    client.send(&seq_payload(0, 16)).await?;

    let stats = wait_for(&relay, Duration::from_secs(3), "300ms blackout", |s| {
        s.up.impairment.blackout
    })
    .await?;
    ensure!(
        started.elapsed() >= Duration::from_millis(300),
        "blackout came early"
    );
    ensure!(
        !stats.down.impairment.blackout,
        "only the up direction is blacked out"
    );
    ensure!(
        upstream.count() == 1,
        "datagram before the blackout arrives"
    );
    client.send(&seq_payload(1, 16)).await?;
    wait_for(&relay, Duration::from_secs(1), "blackout drop", |s| {
        s.up.counters.dropped.blackout == 1
    })
    .await?;

    wait_for(&relay, Duration::from_secs(3), "1s heal", |s| {
        s.up.impairment.is_none() && s.down.impairment.is_none()
    })
    .await?;
    ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "heal came early"
    );
    client.send(&seq_payload(2, 16)).await?;
    settle(&relay, &[&upstream]).await?;
    let seqs: Vec<u32> = upstream
        .arrivals()
        .iter()
        .map(|a| seq_of(&a.payload))
        .collect();
    ensure!(seqs == vec![0, 2], "arrived {seqs:?}");
    Ok(())
}

const BIN: &str = env!("CARGO_BIN_EXE_tidemesh-relay");

async fn ctl(path: &std::path::Path, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(BIN)
        .arg("ctl")
        .arg("--control")
        .arg(path)
        .args(args)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "ctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test]
async fn binary_runs_and_obeys_ctl() -> Result<()> {
    let dir = temp_dir("binary")?;
    let path = dir.join("ctl.sock");
    let upstream = Recorder::bind(true).await?;
    let mut child = tokio::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.addr().to_string())
        .args(["--seed", "99", "--delay", "5ms", "--control"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let seed_line = tokio::time::timeout(Duration::from_secs(10), stderr.next_line()).await??;
    ensure!(
        seed_line.as_deref() == Some("seed=99"),
        "first stderr line {seed_line:?}"
    );
    let listening = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await??
        .context("listening line")?;
    let relay_addr: SocketAddr = listening
        .strip_prefix("listening=")
        .context("listening= prefix")?
        .parse()?;
    ensure!(relay_addr.port() != 0);

    let client = Recorder::bind(false).await?;
    client.socket.connect(relay_addr).await?;
    let ping = |i: u32| {
        let socket = Arc::clone(&client.socket);
        async move { socket.send(&seq_payload(i, 16)).await }
    };
    let client = &client;
    let wait_count = |want: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(3);
        while client.count() < want && Instant::now() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
        client.count()
    };
    ping(0).await?;
    ensure!(wait_count(1).await == 1, "echo through the binary");

    let out = ctl(&path, &["set", "--direction", "up", "--loss", "100%"]).await?;
    ensure!(
        out == "up: loss 100%\ndown: delay 5ms\n",
        "set printed {out:?}"
    );
    for i in 1..=5 {
        ping(i).await?;
    }
    sleep(Duration::from_millis(200)).await;
    ensure!(client.count() == 1, "loss 100% let datagrams through");

    let json = ctl(&path, &["stats", "--json"]).await?;
    let stats: Stats = serde_json::from_str(&json)?;
    ensure!(stats.seed == 99, "seed in stats");
    ensure!(stats.up.impairment == imp("loss 100%") && stats.up.counters.dropped.loss == 5);
    let text = ctl(&path, &["stats"]).await?;
    ensure!(
        text.contains("seed=99") && text.contains("loss=5"),
        "{text}"
    );

    ctl(&path, &["blackout", "--direction", "down"]).await?;
    ctl(&path, &["heal"]).await?;
    ping(6).await?;
    ensure!(wait_count(2).await == 2, "echo after heal");

    let pid = child.id().context("child pid")?;
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    ensure!(exit.success(), "relay exit {exit:?}");
    ensure!(!path.exists(), "control socket removed on exit");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn binary_rejects_bad_values_naming_them() -> Result<()> {
    let dir = temp_dir("bad")?;
    let schedule = dir.join("plan.txt");
    std::fs::write(&schedule, "0s delay 5ms\n10s blackout\n20s loss 150%\n")?;
    let base = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"];
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["--delay".into(), "5x".into()], vec!["--delay", "5x"]),
        (vec!["--loss".into(), "10".into()], vec!["--loss", "'10'"]),
        (vec!["--rate".into(), "fast".into()], vec!["--rate", "fast"]),
        (vec!["--mtu".into(), "0".into()], vec!["--mtu", "'0'"]),
        (
            vec!["--direction".into(), "left".into()],
            vec!["--direction", "left"],
        ),
        (vec!["--reorder".into(), "5%".into()], vec!["--delay"]),
        (
            vec!["--schedule".into(), schedule.display().to_string()],
            vec!["plan.txt", "schedule line 3", "150%"],
        ),
    ];
    for (extra, expected) in cases {
        let output = tokio::process::Command::new(BIN)
            .args(base)
            .args(&extra)
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(2),
            "{extra:?}: exit {:?}",
            output.status
        );
        ensure!(output.stdout.is_empty(), "{extra:?} bound a port anyway");
        for needle in expected {
            ensure!(
                stderr.contains(needle),
                "{extra:?}: {stderr:?} lacks {needle:?}"
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
