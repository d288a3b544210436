//! Foundation benchmark: the hub's two hot paths, each measured beside its
//! floor in the same process and the same run, interleaved round by round
//! (the fsync-bound figures drift too much on a VM for cross-run ratios).
//!
//! 1. **Issuance**: `Request::IssueWorkload` over a real QUIC control session
//!    (node SVID, loopback) to an in-process hub; each answer is written after
//!    the hub signed the CSR and committed its redb audit entry (two-phase
//!    commit). Sequential and with [`Plan::inflight`] requests in flight.
//!    Beside it: `Ca::sign_csr` alone (same CA, same pre-made CSR, no I/O) and
//!    a raw redb write transaction shaped like the audit append (2PC, read the
//!    last key, insert about 150 bytes, durable commit) on a fresh file in the
//!    same temp dir.
//! 2. **Handshakes**, sequential, a fresh connection each time, closed after:
//!    the tidemesh control handshake (client presents its node SVID, SPIFFE
//!    verifiers on both sides) plus one `Ping`/`Pong` round trip, whose `Pong`
//!    shows the hub accepted the client SVID; beside it raw quinn + rustls
//!    (ring, TLS 1.3, one rcgen self-signed P-256 cert, `WebPkiServerVerifier`,
//!    no client auth) plus one 4-byte echo round trip; and, to split the gap,
//!    raw mTLS (the same node SVID checked by `WebPkiClientVerifier`).
//!    Resumption and tickets are off everywhere, so every handshake is full.
//!
//! Run: `cargo bench -p tidemesh-hub --bench foundation`. Without `--bench`
//! (for example under `cargo test --benches`) it does a quick smoke pass.

mod common;
use common::{loadavg, machine};
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use redb::{ReadableTable, TableDefinition};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tidemesh_hub::{AuditEntry, Hub, HubConfig};
use tidemesh_identity::{
    clock::SystemClock,
    naming,
    svid::{self, Ca, KeyPair},
    verify, SpiffeId, TrustDomain,
};
use tidemesh_net::QuicSettings;
use tidemesh_proto::{Request, Response, ALPN_CTL};

const COMMAND: &str = "cargo bench -p tidemesh-hub --bench foundation";
const TD: &str = "bench.example";
const RAW_ALPN: &[u8] = b"bench";
const RAW_SNI: &str = "localhost";
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How much to measure.
struct Plan {
    rounds: usize,
    sign: Duration,
    commit: Duration,
    issue: Duration,
    inflight: usize,
    handshakes: usize,
    warmup: usize,
}

// Many short rounds: the fsync latency on a VM switches regime within
// seconds, so the floors are measured in slices next to what they bound.
const FULL: Plan = Plan {
    rounds: 15,
    sign: Duration::from_millis(100),
    commit: Duration::from_millis(200),
    issue: Duration::from_millis(300),
    inflight: 8,
    handshakes: 70,
    warmup: 50,
};

const SMOKE: Plan = Plan {
    rounds: 1,
    sign: Duration::from_millis(20),
    commit: Duration::from_millis(20),
    issue: Duration::from_millis(20),
    inflight: 8,
    handshakes: 3,
    warmup: 2,
};

/// One measured quantity over all rounds.
#[derive(Default)]
struct Series {
    ops: u64,
    elapsed: Duration,
    per_round: Vec<f64>,
    latencies: Vec<Duration>,
}

impl Series {
    fn add(&mut self, ops: u64, elapsed: Duration, latencies: Vec<Duration>) {
        self.ops += ops;
        self.elapsed += elapsed;
        self.per_round.push(ops as f64 / elapsed.as_secs_f64());
        self.latencies.extend(latencies);
        self.latencies.sort_unstable();
    }

    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// From the sorted per-op latencies.
    fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i].as_secs_f64() * 1e6
    }
}

/// `a / b` on the totals, and the median of the per-round ratios.
fn ratio(a: &Series, b: &Series) -> (f64, f64) {
    let mut r: Vec<f64> = a
        .per_round
        .iter()
        .zip(&b.per_round)
        .map(|(x, y)| x / y)
        .collect();
    r.sort_by(f64::total_cmp);
    let median = match r.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => r[n / 2],
        n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
    };
    (a.rate() / b.rate(), median)
}

/// Runs `op` back to back for at least `dur`; per-op latencies.
fn timed(
    dur: Duration,
    mut op: impl FnMut() -> Result<()>,
) -> Result<(u64, Duration, Vec<Duration>)> {
    let start = Instant::now();
    let mut lat = Vec::new();
    loop {
        let t = Instant::now();
        op()?;
        lat.push(t.elapsed());
        if start.elapsed() >= dur {
            break;
        }
    }
    Ok((lat.len() as u64, start.elapsed(), lat))
}

// ---- issuance floor: redb --------------------------------------------------

const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// A raw redb file written like the hub's audit append.
struct RawAudit {
    db: redb::Database,
    value: Vec<u8>,
}

impl RawAudit {
    fn create(path: &Path, value: Vec<u8>) -> Result<RawAudit> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(AUDIT)?;
        tx.commit()?;
        Ok(RawAudit { db, value })
    }

    fn append(&self) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_two_phase_commit(true);
        {
            let mut t = tx.open_table(AUDIT)?;
            let next = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            t.insert(next, self.value.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }
}

// ---- issuance over the control session -------------------------------------

async fn issue_one(conn: &quinn::Connection, req: &Request) -> Result<()> {
    match tidemesh_net::request(conn, req, ANSWER_TIMEOUT).await? {
        Response::Certificate { chain, .. } if !chain.is_empty() => Ok(()),
        other => bail!("hub did not issue: {other:?}"),
    }
}

/// `inflight` workers send `req` back to back on `conn` until `dur` passed.
async fn issue_for(
    conn: &quinn::Connection,
    req: &Request,
    dur: Duration,
    inflight: usize,
) -> Result<(u64, Duration, Vec<Duration>)> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..inflight {
        let (conn, req) = (conn.clone(), req.clone());
        workers.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                issue_one(&conn, &req).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(done) = workers.join_next().await {
        lat.extend(done??);
    }
    Ok((lat.len() as u64, start.elapsed(), lat))
}

// ---- handshakes --------------------------------------------------------------

/// What follows the handshake on each connection.
#[derive(Clone, Copy)]
enum Exchange {
    /// tidemesh `Ping` → `Pong`.
    Ping,
    /// 4 bytes echoed by the raw server.
    Echo,
}

struct Dialer {
    name: &'static str,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    sni: &'static str,
    exchange: Exchange,
}

impl Dialer {
    async fn once(&self) -> Result<()> {
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), self.addr, self.sni)?
            .await
            .with_context(|| format!("{} handshake", self.name))?;
        match self.exchange {
            Exchange::Ping => {
                match tidemesh_net::request(&conn, &Request::Ping, ANSWER_TIMEOUT).await? {
                    Response::Pong => {}
                    other => bail!("{}: expected Pong, got {other:?}", self.name),
                }
            }
            Exchange::Echo => {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(b"ping").await?;
                send.finish()?;
                let back = recv.read_to_end(64).await?;
                ensure!(back == b"ping", "{}: echo mismatch", self.name);
            }
        }
        conn.close(quinn::VarInt::from_u32(0), b"done");
        Ok(())
    }

    async fn run(&self, n: usize) -> Result<(u64, Duration, Vec<Duration>)> {
        let start = Instant::now();
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.once().await?;
            lat.push(t.elapsed());
        }
        Ok((n as u64, start.elapsed(), lat))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A raw quinn endpoint answering each bidi stream with what it read.
fn echo_server(tls: rustls::ServerConfig) -> Result<(quinn::Endpoint, SocketAddr)> {
    let endpoint = quinn::Endpoint::server(
        QuicSettings::default().server_config(tls)?,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )?;
    let addr = endpoint.local_addr()?;
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if let Ok(b) = recv.read_to_end(64).await {
                            let _ = send.write_all(&b).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
    Ok((endpoint, addr))
}

/// Plain rustls on both sides: TLS 1.3, ring, a self-signed cert, the
/// standard webpki verifier; client auth with the node SVID if `client` is
/// given (verified against `client_roots` by `WebPkiClientVerifier`).
fn raw_dialer(
    name: &'static str,
    client: Option<(
        &[CertificateDer<'static>],
        &KeyPair,
        CertificateDer<'static>,
    )>,
) -> Result<Dialer> {
    let server_cert = rcgen::generate_simple_self_signed(vec![RAW_SNI.to_owned()])?;
    let server_der = server_cert.cert.der().clone();
    let tls13 = &[&rustls::version::TLS13];
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(tls13)?;
    let builder = match &client {
        None => builder.with_no_client_auth(),
        Some((_, _, ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone())?;
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()?,
            )
        }
    };
    let mut server =
        builder.with_single_cert(vec![server_der.clone()], pkcs8(&server_cert.signing_key))?;
    server.alpn_protocols = vec![RAW_ALPN.to_vec()];
    server.send_tls13_tickets = 0;
    let (_server_ep, addr) = echo_server(server)?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_der)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(tls13)?
        .with_root_certificates(roots);
    let mut tls = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key, _)) => builder.with_client_auth_cert(chain.to_vec(), pkcs8(key))?,
    };
    tls.alpn_protocols = vec![RAW_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(Dialer {
        name,
        endpoint: quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?,
        config: QuicSettings::default().client_config(tls)?,
        addr,
        sni: RAW_SNI,
        exchange: Exchange::Echo,
    })
}

// ---- the in-process hub ----------------------------------------------------

struct Bench {
    _tmp: tempfile::TempDir,
    tmp_path: std::path::PathBuf,
    hub: Hub,
    hub_dir: std::path::PathBuf,
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), tidemesh_hub::HubError>>,
    spoke_dir: std::path::PathBuf,
}

async fn start_hub() -> Result<Bench> {
    let tmp = tempfile::tempdir()?;
    let hub_dir = tmp.path().join("hub");
    let td = TrustDomain::new(TD)?;
    tidemesh_hub::init(&hub_dir, &td, &SystemClock)?;
    let cfg = HubConfig {
        admin_socket: false,
        ..HubConfig::default()
    };
    let hub = Hub::open(&hub_dir, cfg, Arc::new(SystemClock))?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = sock.local_addr()?;
    let socket = tidemesh_net::quic::wrap_socket(sock)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let h = hub.clone();
    let served = tokio::spawn(async move {
        h.serve(socket, async {
            let _ = stopped.await;
        })
        .await
    });

    let spoke_dir = tmp.path().join("spoke");
    let node = naming::node_id(&td, "s1", "n1")?;
    let token = hub.create_token(&node, Duration::from_secs(60))?;
    tidemesh_spoke::enroll(
        &spoke_dir,
        addr,
        &token.to_string(),
        false,
        tidemesh_net::quic::wrap_socket(std::net::UdpSocket::bind("127.0.0.1:0")?)?,
        Arc::new(SystemClock),
        QuicSettings::default(),
    )
    .await?;
    Ok(Bench {
        tmp_path: tmp.path().to_owned(),
        _tmp: tmp,
        hub,
        hub_dir,
        addr,
        stop,
        served,
        spoke_dir,
    })
}

// ---- report ----------------------------------------------------------------

fn row(name: &str, s: &Series, unit: &str) {
    println!(
        "  {name:<46} {ops:>7} {el:>8.3} s {rate:>10.0} {unit:<6} p50 {p50:>8.1} µs  p99 {p99:>8.1} µs",
        ops = s.ops,
        el = s.elapsed.as_secs_f64(),
        rate = s.rate(),
        p50 = s.percentile_us(0.5),
        p99 = s.percentile_us(0.99),
    );
}

fn ratio_row(name: &str, r: (f64, f64)) {
    println!(
        "  {name:<46} {:>7.3}  (median of per-round ratios {:.3})",
        r.0, r.1
    );
}

fn series_json(s: &Series) -> serde_json::Value {
    json!({
        "ops": s.ops,
        "elapsed_s": s.elapsed.as_secs_f64(),
        "per_s": s.rate(),
        "per_round_per_s": s.per_round,
        "p50_us": s.percentile_us(0.5),
        "p99_us": s.percentile_us(0.99),
    })
}

fn ratio_json(r: (f64, f64)) -> serde_json::Value {
    json!({"total": r.0, "median_round": r.1})
}

// ---- main ------------------------------------------------------------------

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let plan = if full { FULL } else { SMOKE };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let t_all = Instant::now();
    let load_start = loadavg();
    let b = rt.block_on(start_hub())?;

    // Spoke side: the enrolled node's credentials, as the spoke keeps them.
    let creds = tidemesh_spoke::CredStore::new(&b.spoke_dir);
    let ident = creds.identity()?;
    let td = ident.id.trust_domain().clone();
    let node = creds.node()?;
    let bundle = creds.bundle(&td)?;
    let ctl_tls = verify::client_config(
        bundle.clone(),
        node.chain.clone(),
        &node.key,
        Arc::new(verify::ExactId(naming::hub_id(&td))),
        Arc::new(SystemClock),
        &[ALPN_CTL],
    )?;
    let ctl_config = QuicSettings::default().client_config(ctl_tls)?;

    // Issuance inputs: one workload CSR, signed again on every request.
    let wid: SpiffeId = naming::workload_id(&td, "s1", "bench")?;
    let csr = svid::make_csr(&svid::generate_key()?, &wid)?;
    let issue_req = Request::IssueWorkload {
        id: wid.clone(),
        csr: csr.clone(),
    };
    let ca = Ca::from_pem(
        &std::fs::read_to_string(b.hub_dir.join("ca.pem"))?,
        &std::fs::read_to_string(b.hub_dir.join("ca_key.pem"))?,
    )?;
    let sign = || -> Result<()> {
        let now = SystemTime::now();
        ca.sign_csr(
            &csr,
            &wid,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )?;
        Ok(())
    };
    // The raw redb value: the JSON of an audit entry like the hub's.
    let audit_value = serde_json::to_vec(&AuditEntry {
        at_ms: tidemesh_hub::unix_ms(SystemTime::now()),
        event: "workload_issued".into(),
        subject: Some(wid.to_string()),
        detail: format!("for {}, until 2026-01-01T00:00:00Z", ident.id),
    })?;
    let raw_db = RawAudit::create(&b.tmp_path.join("raw.redb"), audit_value.clone())?;

    // The control session, opened like the spoke's.
    let (ctl_ep, session) = rt.block_on(async {
        let ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let conn = ep
            .connect_with(ctl_config.clone(), b.addr, "hub.tidemesh.invalid")?
            .await?;
        let hello = Request::Hello {
            agent: "foundation-bench".into(),
        };
        match tidemesh_net::request(&conn, &hello, ANSWER_TIMEOUT).await? {
            Response::Welcome { .. } => {}
            other => bail!("hello refused: {other:?}"),
        }
        ensure!(
            tidemesh_net::peer_spiffe_id(&conn) == Some(naming::hub_id(&td)),
            "the session's peer is not the hub"
        );
        Ok((ep, conn))
    })?;

    // Dialers for the handshake comparison.
    let dialers = rt.block_on(async {
        let ctl = Dialer {
            name: "tidemesh",
            endpoint: quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?,
            config: ctl_config.clone(),
            addr: b.addr,
            sni: "hub.tidemesh.invalid",
            exchange: Exchange::Ping,
        };
        let raw = raw_dialer("raw", None)?;
        let raw_mtls = raw_dialer(
            "raw-mtls",
            Some((&node.chain, &node.key, bundle.roots()[0].clone())),
        )?;
        Ok::<_, anyhow::Error>([ctl, raw, raw_mtls])
    })?;

    // Warm up everything once.
    for _ in 0..plan.warmup {
        sign()?;
    }
    for _ in 0..plan.warmup.min(20) {
        raw_db.append()?;
    }
    let mut issued = plan.warmup as u64;
    rt.block_on(async {
        for _ in 0..plan.warmup {
            issue_one(&session, &issue_req).await?;
        }
        for d in &dialers {
            d.run(plan.warmup).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // Interleaved rounds; the order rotates so no variant always goes first.
    let mut s_sign = Series::default();
    let mut s_commit = Series::default();
    let mut s_seq = Series::default();
    let mut s_conc = Series::default();
    let mut s_hs: [Series; 3] = Default::default();
    for round in 0..plan.rounds {
        for k in 0..4 {
            match (k + round) % 4 {
                0 => {
                    let (n, el, lat) = timed(plan.sign, &sign)?;
                    s_sign.add(n, el, lat);
                }
                1 => {
                    let (n, el, lat) = timed(plan.commit, || raw_db.append())?;
                    s_commit.add(n, el, lat);
                }
                2 => {
                    let (n, el, lat) =
                        rt.block_on(issue_for(&session, &issue_req, plan.issue, 1))?;
                    issued += n;
                    s_seq.add(n, el, lat);
                }
                _ => {
                    let (n, el, lat) =
                        rt.block_on(issue_for(&session, &issue_req, plan.issue, plan.inflight))?;
                    issued += n;
                    s_conc.add(n, el, lat);
                }
            }
        }
        for k in 0..dialers.len() {
            let i = (k + round) % dialers.len();
            let (n, el, lat) = rt.block_on(dialers[i].run(plan.handshakes))?;
            s_hs[i].add(n, el, lat);
        }
    }

    // Every answered issuance must have its audit entry on disk.
    let logged = b
        .hub
        .store()
        .audit_log()?
        .iter()
        .filter(|(_, e)| e.event == "workload_issued")
        .count() as u64;
    ensure!(
        logged == issued,
        "{issued} issuances answered but {logged} audit entries committed"
    );

    session.close(quinn::VarInt::from_u32(0), b"done");
    rt.block_on(async {
        ctl_ep.wait_idle().await;
        let _ = b.stop.send(());
        b.served.await??;
        Ok::<_, anyhow::Error>(())
    })?;
    let total = t_all.elapsed();

    // Report.
    let m = machine();
    let [hs_ctl, hs_raw, hs_mtls] = s_hs;
    let r_seq_sign = ratio(&s_seq, &s_sign);
    let r_seq_commit = ratio(&s_seq, &s_commit);
    let r_conc_sign = ratio(&s_conc, &s_sign);
    let r_conc_commit = ratio(&s_conc, &s_commit);
    let r_hs = ratio(&hs_ctl, &hs_raw);
    let r_hs_mtls = ratio(&hs_ctl, &hs_mtls);
    let r_mtls_raw = ratio(&hs_mtls, &hs_raw);
    println!();
    common::print_header(
        "tidemesh foundation bench",
        (!full).then_some("SMOKE pass: run with --bench for figures"),
        COMMAND,
        &m,
    );
    println!(
        "  plan: {} interleaved rounds; per round: sign {:?}, redb {:?}, issuance {:?} sequential + {:?} with {} in flight, {} handshakes of each kind; warm-up {} each",
        plan.rounds, plan.sign, plan.commit, plan.issue, plan.issue, plan.inflight, plan.handshakes, plan.warmup
    );
    println!("  temp dir (hub.db and raw.redb): {}", b.tmp_path.display());
    println!(
        "  load average at start: {load_start}, at end: {}",
        m["loadavg"].as_str().unwrap_or("")
    );
    println!("  total wall time: {:.1} s", total.as_secs_f64());
    println!();
    println!(
        "  {:<46} {:>7} {:>10} {:>10}",
        "1. issuance (CSR -> signed SVID)", "N", "elapsed", "rate"
    );
    row("hub IssueWorkload over QUIC, sequential", &s_seq, "/s");
    let conc_name = format!("hub IssueWorkload over QUIC, {} in flight", plan.inflight);
    row(&conc_name, &s_conc, "/s");
    row("Ca::sign_csr only (no I/O)", &s_sign, "/s");
    row("raw redb 2PC commit (audit-shaped, 1 row)", &s_commit, "/s");
    ratio_row("ratio issuance(seq) / sign-only", r_seq_sign);
    ratio_row("ratio issuance(seq) / redb-commit", r_seq_commit);
    ratio_row(
        &format!("ratio issuance({} in flight) / sign-only", plan.inflight),
        r_conc_sign,
    );
    ratio_row(
        &format!("ratio issuance({} in flight) / redb-commit", plan.inflight),
        r_conc_commit,
    );
    println!("  audit entries committed = issuances answered = {issued}");
    println!();
    println!(
        "  {:<46} {:>7} {:>10} {:>10}",
        "2. handshakes (sequential, fresh conn, closed)", "N", "elapsed", "rate"
    );
    row(
        "tidemesh mTLS (SVID+SPIFFE both ways)+Ping/Pong",
        &hs_ctl,
        "/s",
    );
    row("raw quinn+rustls (server auth only)+echo", &hs_raw, "/s");
    row("raw quinn+rustls mTLS (webpki both)+echo", &hs_mtls, "/s");
    ratio_row("ratio tidemesh / raw", r_hs);
    ratio_row("ratio tidemesh / raw-mtls", r_hs_mtls);
    ratio_row("ratio raw-mtls / raw", r_mtls_raw);
    println!();

    let out = json!({
        "bench": "tidemesh-foundation",
        "smoke": !full,
        "command": COMMAND,
        "machine": m,
        "loadavg_start": load_start,
        "rounds": plan.rounds,
        "inflight": plan.inflight,
        "total_s": total.as_secs_f64(),
        "issuance": {
            "hub_seq": series_json(&s_seq),
            "hub_inflight": series_json(&s_conc),
            "sign_only": series_json(&s_sign),
            "redb_commit": series_json(&s_commit),
            "ratio_seq_over_sign": ratio_json(r_seq_sign),
            "ratio_seq_over_commit": ratio_json(r_seq_commit),
            "ratio_inflight_over_sign": ratio_json(r_conc_sign),
            "ratio_inflight_over_commit": ratio_json(r_conc_commit),
            "audit_entries": logged,
        },
        "handshakes": {
            "n_each": hs_ctl.ops,
            "tidemesh_ping": series_json(&hs_ctl),
            "raw_echo": series_json(&hs_raw),
            "raw_mtls_echo": series_json(&hs_mtls),
            "ratio_tidemesh_over_raw": ratio_json(r_hs),
            "ratio_tidemesh_over_raw_mtls": ratio_json(r_hs_mtls),
            "ratio_raw_mtls_over_raw": ratio_json(r_mtls_raw),
        },
    });
    println!("{out}");
    Ok(())
}
