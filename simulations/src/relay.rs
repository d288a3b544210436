//! The relay driver: UDP sockets, the flow table, timers and the control channel wired
//! around two [`Link`]s, one per direction.
//!
//! A single task owns the listening socket, both links, the flow table and the
//! schedule; each flow has a small task receiving from its upstream-facing socket, and
//! the control socket has its own tasks. Everything that decides a datagram's fate is
//! in [`crate::link`]; this module only reads sockets, passes the clock and a seeded
//! generator in, and sends what the links release. Start it with [`Relay::start`]
//! (or [`Relay::start_with_socket`] with a pre-bound socket) and drive it through the
//! returned [`RelayHandle`].

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::action::Action;
use crate::control;
use crate::flows::FlowTable;
use crate::impairment::{Direction, Impairment, ImpairmentError, MAX_DATAGRAM};
use crate::link::{Counters, Link};
use crate::schedule::{Schedule, ScheduleEntry};

/// Tracing target of impairment changes, so they can be routed as audit events.
pub const AUDIT_TARGET: &str = "tidemesh::audit";

/// Flows idle this long are closed, unless configured otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many flows (clients) at once, unless configured otherwise.
pub const DEFAULT_MAX_FLOWS: usize = 1024;

/// Datagrams from upstream waiting for the driver; beyond it, flow tasks wait and the
/// kernel drops, as a full NIC queue would.
const FROM_UPSTREAM_QUEUE: usize = 1024;
const COMMAND_QUEUE: usize = 64;

/// Mixed into the seed for the down direction, so each direction has its own stream
/// and its decisions do not depend on traffic in the other.
const DOWN_SEED_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where clients send to (port 0 picks a free port; see [`RelayHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Where datagrams are forwarded to.
    pub upstream: SocketAddr,
    /// Seed for every random decision; `None` picks one (reported by
    /// [`RelayHandle::seed`] and in [`Stats`]).
    pub seed: Option<u64>,
    /// Impairment of client→upstream datagrams at start.
    pub up: Impairment,
    /// Impairment of upstream→client datagrams at start.
    pub down: Impairment,
    /// A flow without traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// At most this many flows; datagrams from further clients are dropped
    /// (`dropped.flow_limit`).
    pub max_flows: usize,
    /// Unix socket for runtime control (see [`crate::control`]).
    pub control: Option<PathBuf>,
    /// Changes applied at fixed times after start.
    pub schedule: Schedule,
}

impl RelayConfig {
    /// A relay from `listen` to `upstream` with no impairment and default limits.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstream,
            seed: None,
            up: Impairment::none(),
            down: Impairment::none(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_flows: DEFAULT_MAX_FLOWS,
            control: None,
            schedule: Schedule::empty(),
        }
    }

    /// Sets the starting impairment of `direction`.
    pub fn impair(mut self, direction: Direction, impairment: Impairment) -> Self {
        if direction.includes_up() {
            self.up = impairment.clone();
        }
        if direction.includes_down() {
            self.down = impairment;
        }
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    fn validate(&self) -> Result<(), RelayError> {
        self.up
            .validate()
            .map_err(|reason| RelayError::InvalidImpairment {
                direction: Direction::Up,
                reason,
            })?;
        self.down
            .validate()
            .map_err(|reason| RelayError::InvalidImpairment {
                direction: Direction::Down,
                reason,
            })?;
        if self.max_flows == 0 {
            return Err(RelayError::InvalidConfig("max_flows must be at least 1"));
        }
        if self.idle_timeout.is_zero() {
            return Err(RelayError::InvalidConfig("idle_timeout must be above zero"));
        }
        Ok(())
    }
}

/// Why a relay could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The listening socket could not be bound.
    #[error("cannot bind UDP {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: std::io::Error,
    },
    /// An impairment breaks a cross-field rule.
    #[error("invalid {direction} impairment: {reason}")]
    InvalidImpairment {
        /// Which direction.
        direction: Direction,
        /// The rule broken.
        reason: ImpairmentError,
    },
    /// A limit is out of range.
    #[error("invalid relay configuration: {0}")]
    InvalidConfig(&'static str),
    /// Another relay is serving the control socket path.
    #[error("control socket {path} is in use by a running relay")]
    ControlInUse {
        /// The path.
        path: PathBuf,
    },
    /// The control path exists and is not a socket.
    #[error("{path} exists and is not a socket; refusing to replace it with the control socket")]
    ControlNotSocket {
        /// The path.
        path: PathBuf,
    },
    /// The control socket could not be created.
    #[error("cannot create control socket {path}: {reason}")]
    Control {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// A socket call failed.
    #[error("socket error: {0}")]
    Io(std::io::Error),
    /// The relay task has ended.
    #[error("the relay has stopped")]
    Stopped,
}

/// The impairments of both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Impairments {
    /// Client→upstream.
    pub up: Impairment,
    /// Upstream→client.
    pub down: Impairment,
}

/// One direction's impairment, queue and counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// The impairment in force, as netem text.
    pub impairment: Impairment,
    /// Datagrams waiting out a delay or the rate limit.
    pub queued: usize,
    /// What happened so far.
    #[serde(flatten)]
    pub counters: Counters,
}

/// The flow table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStats {
    /// Flows open now.
    pub active: usize,
    /// Flows opened since start.
    pub created: u64,
    /// Flows closed for idleness.
    pub expired: u64,
    /// The flow limit.
    pub max: usize,
    /// The idle timeout, in milliseconds.
    pub idle_timeout_ms: u64,
}

/// A snapshot of a running relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The seed of every random decision; rerun with it to reproduce.
    pub seed: u64,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// The bound listening address.
    pub listen: SocketAddr,
    /// The upstream.
    pub upstream: SocketAddr,
    /// The flow table.
    pub flows: FlowStats,
    /// Client→upstream.
    pub up: DirectionStats,
    /// Upstream→client.
    pub down: DirectionStats,
}

/// What the handle and the control socket ask of the driver.
pub(crate) enum Command {
    Apply(Action, oneshot::Sender<Impairments>),
    Stats(oneshot::Sender<Stats>),
}

/// Starts relays.
pub struct Relay;

impl Relay {
    /// Validates `config`, binds `config.listen` and starts the relay on the current
    /// tokio runtime.
    pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
        config.validate()?;
        let socket = UdpSocket::bind(config.listen)
            .await
            .map_err(|reason| RelayError::Bind {
                addr: config.listen,
                reason,
            })?;
        Self::start_with_socket(config, socket).await
    }

    /// Starts the relay on an already bound socket (`config.listen` is ignored).
    pub async fn start_with_socket(
        config: RelayConfig,
        socket: UdpSocket,
    ) -> Result<RelayHandle, RelayError> {
        config.validate()?;
        let seed = config.seed.unwrap_or_else(rand::random);
        let local_addr = socket.local_addr().map_err(RelayError::Io)?;
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let control = match &config.control {
            Some(path) => {
                let listener = control::bind(path)?;
                let task = tokio::spawn(control::serve(listener, commands_tx.clone()));
                Some((task, path.clone()))
            }
            None => None,
        };
        let (from_upstream_tx, from_upstream_rx) = mpsc::channel(FROM_UPSTREAM_QUEUE);
        info!(
            listen = %local_addr,
            upstream = %config.upstream,
            seed,
            up = %config.up,
            down = %config.down,
            "relay started"
        );
        let driver = Driver {
            listen: socket,
            listen_addr: local_addr,
            upstream: config.upstream,
            seed,
            started: now(),
            up: Link::new(config.up),
            down: Link::new(config.down),
            up_rng: StdRng::seed_from_u64(seed),
            down_rng: StdRng::seed_from_u64(seed ^ DOWN_SEED_MIX),
            flows: FlowTable::new(config.max_flows, config.idle_timeout),
            max_flows: config.max_flows,
            idle_timeout: config.idle_timeout,
            from_upstream_tx,
            from_upstream_rx,
            commands: commands_rx,
            schedule: config.schedule.entries().to_vec(),
            next_entry: 0,
            control: control.as_ref().map(|(_, path)| path.clone()),
        };
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let control_task = control.map(|(task, _)| task);
        let task = tokio::spawn(driver.run(shutdown_rx, control_task));
        Ok(RelayHandle {
            local_addr,
            seed,
            control: config.control,
            commands: commands_tx,
            shutdown: Some(shutdown_tx),
            task: Some(task),
        })
    }
}

/// A running relay. Dropping the handle stops the relay too, without waiting.
pub struct RelayHandle {
    local_addr: SocketAddr,
    seed: u64,
    control: Option<PathBuf>,
    commands: mpsc::Sender<Command>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RelayHandle {
    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The seed of every random decision.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The control socket path, if any.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// Applies `action`; returns the impairments now in force.
    pub async fn apply(&self, action: Action) -> Result<Impairments, RelayError> {
        if let Action::Set {
            direction,
            impairment,
        } = &action
        {
            impairment
                .validate()
                .map_err(|reason| RelayError::InvalidImpairment {
                    direction: *direction,
                    reason,
                })?;
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Apply(action, reply))
            .await
            .map_err(|_| RelayError::Stopped)?;
        answer.await.map_err(|_| RelayError::Stopped)
    }

    /// Replaces the impairment of `direction`.
    pub async fn set(
        &self,
        direction: Direction,
        impairment: Impairment,
    ) -> Result<(), RelayError> {
        self.apply(Action::Set {
            direction,
            impairment,
        })
        .await
        .map(drop)
    }

    /// Drops everything in `direction` (other settings stay until `heal`).
    pub async fn blackout(&self, direction: Direction) -> Result<(), RelayError> {
        self.apply(Action::Blackout { direction }).await.map(drop)
    }

    /// Removes every impairment in both directions.
    pub async fn heal(&self) -> Result<(), RelayError> {
        self.apply(Action::Heal {
            direction: Direction::Both,
        })
        .await
        .map(drop)
    }

    /// Reads the counters, seed and impairments.
    pub async fn stats(&self) -> Result<Stats, RelayError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Stats(reply))
            .await
            .map_err(|_| RelayError::Stopped)?;
        answer.await.map_err(|_| RelayError::Stopped)
    }

    /// Stops the relay and waits for it: flows closed, control socket removed.
    pub async fn shutdown(mut self) -> Result<(), RelayError> {
        if let Some(shutdown) = self.shutdown.take() {
            // An error means the driver is gone already, which is the goal.
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.map_err(|_| RelayError::Stopped)?;
        }
        Ok(())
    }
}

/// The tokio clock as a std `Instant`, so paused-clock tests steer the links too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// An upstream-facing socket and the task receiving on it.
struct Flow {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Driver {
    listen: UdpSocket,
    listen_addr: SocketAddr,
    upstream: SocketAddr,
    seed: u64,
    started: Instant,
    up: Link<SocketAddr>,
    down: Link<SocketAddr>,
    up_rng: StdRng,
    down_rng: StdRng,
    flows: FlowTable<SocketAddr, Flow>,
    max_flows: usize,
    idle_timeout: Duration,
    from_upstream_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    from_upstream_rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    commands: mpsc::Receiver<Command>,
    schedule: Vec<ScheduleEntry>,
    next_entry: usize,
    control: Option<PathBuf>,
}

impl Driver {
    async fn run(
        mut self,
        mut shutdown: oneshot::Receiver<()>,
        control_task: Option<JoinHandle<()>>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let period =
            (self.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut expiry = tokio::time::interval(period);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = now();
            self.run_schedule(now);
            self.flush(now).await;
            let deadline = [
                self.up.poll_timeout(),
                self.down.poll_timeout(),
                self.next_schedule(),
            ]
            .into_iter()
            .flatten()
            .min();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                Some(command) = self.commands.recv() => self.command(command),
                received = self.listen.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        let payload = buf.get(..len).unwrap_or_default().to_vec();
                        self.on_client_datagram(now_after(now), from, payload);
                    }
                    Err(error) => {
                        debug!(%error, "receive from clients failed");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                },
                Some((client, payload)) = self.from_upstream_rx.recv() => {
                    self.on_upstream_datagram(now_after(now), client, payload);
                }
                _ = expiry.tick() => self.expire(),
                () = timer => {}
            }
        }
        if let Some(task) = control_task {
            task.abort();
        }
        if let Some(path) = &self.control {
            if let Err(error) = std::fs::remove_file(path) {
                debug!(path = %path.display(), %error, "control socket not removed");
            }
        }
        let dropped = self.up.clear() + self.down.clear();
        self.flows.clear();
        info!(seed = self.seed, queued_dropped = dropped, "relay stopped");
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Apply(action, reply) => {
                let impairments = self.apply(&action, "control");
                // The requester may have gone; the change stands either way.
                let _ = reply.send(impairments);
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
        }
    }

    fn apply(&mut self, action: &Action, origin: &'static str) -> Impairments {
        let direction = action.direction();
        if direction.includes_up() {
            let next = action.apply(self.up.impairment());
            self.up.set_impairment(next);
        }
        if direction.includes_down() {
            let next = action.apply(self.down.impairment());
            self.down.set_impairment(next);
        }
        info!(
            target: AUDIT_TARGET,
            origin,
            %direction,
            up = %self.up.impairment(),
            down = %self.down.impairment(),
            "impairment changed"
        );
        Impairments {
            up: self.up.impairment().clone(),
            down: self.down.impairment().clone(),
        }
    }

    fn run_schedule(&mut self, now: Instant) {
        while let Some(entry) = self.schedule.get(self.next_entry) {
            if self.due(entry) > now {
                break;
            }
            let action = entry.action.clone();
            debug!(line = entry.line, at = ?entry.at, "schedule entry due");
            self.next_entry += 1;
            self.apply(&action, "schedule");
        }
    }

    fn due(&self, entry: &ScheduleEntry) -> Instant {
        self.started.checked_add(entry.at).unwrap_or(self.started)
    }

    fn next_schedule(&self) -> Option<Instant> {
        self.schedule.get(self.next_entry).map(|e| self.due(e))
    }

    fn on_client_datagram(&mut self, now: Instant, client: SocketAddr, payload: Vec<u8>) {
        if self.flows.touch(now, &client).is_none() {
            if !self.flows.has_room() {
                debug!(%client, "flow table full, datagram dropped");
                self.up.record_flow_limit(payload.len());
                return;
            }
            match self.open_flow(client) {
                Ok(flow) => {
                    debug!(%client, "flow opened");
                    // Room was checked above, so the insert cannot be refused.
                    if self.flows.insert(now, client, flow).is_err() {
                        self.up.record_flow_limit(payload.len());
                        return;
                    }
                }
                Err(error) => {
                    warn!(%client, %error, "cannot open upstream socket, datagram dropped");
                    self.up.record_flow_limit(payload.len());
                    return;
                }
            }
        }
        self.up
            .handle_datagram(now, client, payload, &mut self.up_rng);
    }

    fn on_upstream_datagram(&mut self, now: Instant, client: SocketAddr, payload: Vec<u8>) {
        self.flows.touch(now, &client);
        self.down
            .handle_datagram(now, client, payload, &mut self.down_rng);
    }

    fn open_flow(&self, client: SocketAddr) -> std::io::Result<Flow> {
        let any: SocketAddr = if self.upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(any)?;
        socket.connect(self.upstream)?;
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let task = tokio::spawn(receive_upstream(
            Arc::clone(&socket),
            client,
            self.from_upstream_tx.clone(),
        ));
        Ok(Flow { socket, task })
    }

    async fn flush(&mut self, now: Instant) {
        while let Some(transmit) = self.up.poll_transmit(now) {
            let len = transmit.payload.len();
            let sent = match self.flows.get(&transmit.tag) {
                Some(flow) => flow.socket.send(&transmit.payload).await.is_ok(),
                None => false,
            };
            if sent {
                self.up.record_sent(len);
            } else {
                self.up.record_send_error();
            }
        }
        while let Some(transmit) = self.down.poll_transmit(now) {
            let len = transmit.payload.len();
            match self.listen.send_to(&transmit.payload, transmit.tag).await {
                Ok(_) => self.down.record_sent(len),
                Err(error) => {
                    debug!(client = %transmit.tag, %error, "send to client failed");
                    self.down.record_send_error();
                }
            }
        }
    }

    fn expire(&mut self) {
        let gone = self.flows.expire(now());
        for (client, _flow) in &gone {
            debug!(%client, "flow expired");
        }
    }

    fn stats(&self) -> Stats {
        let direction = |link: &Link<SocketAddr>| DirectionStats {
            impairment: link.impairment().clone(),
            queued: link.queued(),
            counters: link.counters().clone(),
        };
        Stats {
            seed: self.seed,
            uptime_ms: u64::try_from(now().saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
            listen: self.listen_addr,
            upstream: self.upstream,
            flows: FlowStats {
                active: self.flows.len(),
                created: self.flows.created(),
                expired: self.flows.expired(),
                max: self.max_flows,
                idle_timeout_ms: u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            },
            up: direction(&self.up),
            down: direction(&self.down),
        }
    }
}

/// The clock after a wait that began at `before` (never earlier).
fn now_after(before: Instant) -> Instant {
    now().max(before)
}

/// Receives from one flow's upstream-facing socket and hands datagrams to the driver.
async fn receive_upstream(
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    to_driver: mpsc::Sender<(SocketAddr, Vec<u8>)>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(len) => {
                let payload = buf.get(..len).unwrap_or_default().to_vec();
                if to_driver.send((client, payload)).await.is_err() {
                    return;
                }
            }
            // An ICMP port-unreachable from an upstream that is not up (yet).
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                debug!(%client, "upstream refused a datagram");
            }
            Err(error) => {
                warn!(%client, %error, "upstream receive failed, flow stops receiving");
                return;
            }
        }
    }
}
