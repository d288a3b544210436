//! Evidence benchmark: the evidence pipeline's three rates, each beside its
//! floor measured in the same process and the same run (fsync-bound figures
//! drift too much on a VM for cross-run ratios).
//!
//! 1. **Durable append** (spoke buffer, group commit of 512):
//!    `EvidenceBuffer::append` of seed-shaped drill request records
//!    (`samples::drill_request`, as `drill load` appends them), timed until
//!    the last record's `committed()` returns. Beside it: raw redb, the same
//!    sealed record bytes under the same keys inserted 512 per write
//!    transaction into a `u64 -> &[u8]` table, with the buffer's settings
//!    (page cache, `Immediate` durability, quick repair, hence two-phase
//!    commit). Interleaved rounds, each on its own file.
//! 2. **Hub ingest**: `EvidenceStore::ingest` of pre-built, signature-checked
//!    batches of up to 2,048 records (fewer when 2,048 exceed
//!    `MAX_BATCH_BYTES`; the sync cuts batches the same way), and the same
//!    batches from their wire bytes through `Batch::decode`,
//!    `verify_signature` and `ingest`. Beside them: raw redb, the same record
//!    bytes keyed `(&str spoke, u64 seq)`, one write transaction per batch,
//!    with the store's settings (64 MiB cache, `Immediate`, quick repair).
//! 3. **Drain over loopback**: a spoke whose `evidence.db` holds a backlog
//!    (1,000,000 records; filled through `EvidenceBuffer` before the spoke
//!    runs) syncs to an in-process hub over a real QUIC mTLS session
//!    (`drain_rate` 0, `batch_records` 2,048; hub ingest settings default),
//!    timed from `Spoke::run` until the spoke's `sync_stats().hub_next_seq`
//!    passes the backlog. Beside it: a raw redb scan of the same file
//!    (every row of `evidence_records`, values read) and raw quinn + rustls
//!    throughput on loopback (one stream, the backlog's encoded bytes in
//!    1 MB writes, same `QuicSettings`), as records per second.
//!
//! Run: `cargo bench -p tidemesh-hub --bench evidence`. Quick smoke pass
//! (a 20,000-record backlog, fewer rounds): set `TIDEMESH_BENCH_QUICK=1`;
//! without `--bench` (for example under `cargo test --benches`) it is quick
//! too. Ratios are printed beside their goals; nothing fails on speed.

mod common;
use common::{loadavg, machine};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use redb::{Builder, Database, ReadableDatabase, ReadableTable, TableDefinition};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tidemesh_evidence::{
    fitting_records, samples, Batch, Chain, NewRecord, SealedRecord, UnixMillis, VerifiedBatch,
    MAX_BATCH_BYTES,
};
use tidemesh_hub::{evidence::EvidenceStore, Hub, HubConfig};
use tidemesh_identity::{
    clock::SystemClock,
    naming,
    svid::{self, KeyPair},
    SpiffeId, TrustDomain,
};
use tidemesh_net::QuicSettings;
use tidemesh_spoke::{
    buffer::{BufferConfig, EvidenceBuffer},
    Spoke, SpokeConfig, SyncSettings,
};

const COMMAND: &str = "cargo bench -p tidemesh-hub --bench evidence";
const QUICK_ENV: &str = "TIDEMESH_BENCH_QUICK";
const TD: &str = "bench.example";
/// The spoke buffer's record table (`spoke/src/buffer.rs`).
const SPOKE_RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("evidence_records");
/// The hub store's record table (`hub/src/evidence.rs`).
const HUB_RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("records");
/// The hub store's page cache (`CACHE_BYTES` in `hub/src/evidence.rs`).
const HUB_CACHE_BYTES: usize = 64 << 20;
/// The sync's batch size (`SyncSettings::default().batch_records`).
const BATCH_RECORDS: usize = 2_048;
/// Records appended between waits while filling the backlog (below the
/// buffer's `max_queued`).
const FILL_CHUNK: u64 = 50_000;
const RAW_ALPN: &[u8] = b"bench";
const RAW_SNI: &str = "localhost";
/// Write size of the raw quinn push (about one evidence batch).
const QUINN_WRITE: usize = 1 << 20;
const SIGNER_CERT: [u8; 32] = [7; 32];

/// How much to measure.
struct Plan {
    append_rounds: usize,
    append_records: u64,
    ingest_rounds: usize,
    ingest_batches: usize,
    backlog: u64,
    scan_reps: usize,
    quinn_reps: usize,
    drain_timeout: Duration,
}

const FULL: Plan = Plan {
    append_rounds: 8,
    append_records: 25_600,
    ingest_rounds: 8,
    ingest_batches: 12,
    backlog: 1_000_000,
    scan_reps: 3,
    quinn_reps: 3,
    drain_timeout: Duration::from_secs(3600),
};

const QUICK: Plan = Plan {
    append_rounds: 2,
    append_records: 2_048,
    ingest_rounds: 1,
    ingest_batches: 2,
    backlog: 20_000,
    scan_reps: 1,
    quinn_reps: 1,
    drain_timeout: Duration::from_secs(300),
};

/// One measured quantity over all rounds.
#[derive(Default)]
struct Series {
    records: u64,
    bytes: u64,
    elapsed: Duration,
    per_round: Vec<f64>,
}

impl Series {
    fn add(&mut self, records: u64, bytes: u64, elapsed: Duration) {
        self.records += records;
        self.bytes += bytes;
        self.elapsed += elapsed;
        self.per_round
            .push(records as f64 / elapsed.as_secs_f64().max(1e-9));
    }

    /// Records per second.
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `a / b` on the totals, and the median of the per-round ratios.
fn ratio(a: &Series, b: &Series) -> (f64, f64) {
    let r = a
        .per_round
        .iter()
        .zip(&b.per_round)
        .map(|(x, y)| x / y)
        .collect();
    (a.rate() / b.rate(), median(r))
}

fn now_ms() -> u64 {
    tidemesh_hub::unix_ms(SystemTime::now())
}

/// Drill request `i` of `run`, stamped `t0 + i` ms.
fn drill_record(run: &str, t0: u64, i: u64) -> NewRecord {
    let at = UnixMillis(t0 + i);
    NewRecord::new(at, samples::drill_request(run, i, at))
}

// ---- 1. durable append -------------------------------------------------------

/// One write transaction of `(seq, bytes)` rows into a spoke-shaped table.
fn raw_spoke_commit(db: &Database, rows: &[(u64, Vec<u8>)], quick_repair: bool) -> Result<()> {
    let mut tx = db.begin_write()?;
    tx.set_quick_repair(quick_repair);
    {
        let mut t = tx.open_table(SPOKE_RECORDS)?;
        for (k, v) in rows {
            t.insert(*k, v.as_slice())?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Appends `records` and waits for the last one's commit.
async fn append_all(buf: &EvidenceBuffer, records: Vec<NewRecord>) -> Result<Duration> {
    let t = Instant::now();
    let mut last = None;
    for r in records {
        last = Some(buf.append(r)?);
    }
    if let Some(last) = last {
        last.committed().await?;
    }
    Ok(t.elapsed())
}

struct AppendResult {
    buffer: Series,
    raw: Series,
    commits: u64,
    record_bytes: f64,
}

fn bench_append(rt: &tokio::runtime::Runtime, plan: &Plan, dir: &Path) -> Result<AppendResult> {
    let cfg = BufferConfig::default();
    let max_group = cfg.max_group;
    let quick_repair = cfg.quick_repair;
    let spoke = naming::node_id(&TrustDomain::new(TD)?, "s1", "append")?;
    let buf = rt.block_on(async {
        EvidenceBuffer::open(&dir.join("append-buffer.db"), &spoke, cfg.clone())
    })?;
    let raw = Builder::new()
        .set_cache_size(cfg.cache_bytes)
        .create(dir.join("append-raw.redb"))?;
    raw_spoke_commit(&raw, &[], quick_repair)?;

    // The raw side gets the bytes the buffer seals: the same chain, sealed
    // here (deterministic), checked against the buffer's tail at the end.
    let mut chain = Chain::genesis(&spoke);
    let run = format!("drill-{}", now_ms());
    let t0 = now_ms();
    let mut next = 0u64;
    let mut last_bytes = Vec::new();
    let (mut s_buf, mut s_raw) = (Series::default(), Series::default());
    let commits_before = buf.stats(UnixMillis(now_ms())).commits;
    for round in 0..plan.append_rounds {
        let idx = next..next + plan.append_records;
        next = idx.end;
        let records: Vec<NewRecord> = idx.clone().map(|i| drill_record(&run, t0, i)).collect();
        let mut rows = Vec::with_capacity(records.len());
        for r in &records {
            let sealed = chain.append(r.clone())?;
            rows.push((sealed.seq.get(), sealed.encode()));
        }
        let bytes: u64 = rows.iter().map(|(_, v)| v.len() as u64).sum();
        last_bytes = rows.last().map(|(_, v)| v.clone()).unwrap_or_default();
        let mut records = Some(records);
        for k in 0..2 {
            if (k + round) % 2 == 0 {
                let recs = records.take().context("appended twice")?;
                let el = rt.block_on(append_all(&buf, recs))?;
                s_buf.add(plan.append_records, bytes, el);
            } else {
                let t = Instant::now();
                for group in rows.chunks(max_group) {
                    raw_spoke_commit(&raw, group, quick_repair)?;
                }
                s_raw.add(plan.append_records, bytes, t.elapsed());
            }
        }
    }
    let commits = buf.stats(UnixMillis(now_ms())).commits - commits_before;
    let tail = buf.tail(1)?;
    ensure!(
        tail.first().map(SealedRecord::encode) == Some(last_bytes),
        "the raw baseline's bytes differ from what the buffer stored"
    );
    rt.block_on(buf.close())?;
    let record_bytes = s_buf.bytes as f64 / s_buf.records as f64;
    Ok(AppendResult {
        buffer: s_buf,
        raw: s_raw,
        commits,
        record_bytes,
    })
}

// ---- 2. hub ingest -----------------------------------------------------------

/// One round's batches, in the three shapes the variants consume.
struct IngestRound {
    verified: Vec<VerifiedBatch>,
    wire: Vec<Vec<u8>>,
    rows: Vec<Vec<(u64, Vec<u8>)>>,
    records: u64,
    bytes: u64,
}

/// Seals and signs the next `batches` batches of `spoke`'s chain: up to
/// [`BATCH_RECORDS`] records each, cut to fit like the sync cuts them.
struct BatchMaker {
    spoke: SpiffeId,
    key: KeyPair,
    chain: Chain,
    carry: Vec<SealedRecord>,
    run: String,
    t0: u64,
    next: u64,
}

impl BatchMaker {
    fn round(&mut self, batches: usize) -> Result<IngestRound> {
        let mut out = IngestRound {
            verified: Vec::new(),
            wire: Vec::new(),
            rows: Vec::new(),
            records: 0,
            bytes: 0,
        };
        for _ in 0..batches {
            while self.carry.len() < BATCH_RECORDS {
                let r = drill_record(&self.run, self.t0, self.next);
                self.next += 1;
                self.carry.push(self.chain.append(r)?);
            }
            let n = fitting_records(&self.spoke, &self.carry, MAX_BATCH_BYTES).min(BATCH_RECORDS);
            let records: Vec<SealedRecord> = self.carry.drain(..n).collect();
            let rows: Vec<(u64, Vec<u8>)> =
                records.iter().map(|r| (r.seq.get(), r.encode())).collect();
            let batch = Batch::sign(self.spoke.clone(), records, &self.key)?;
            let wire = batch.encode()?;
            out.records += n as u64;
            out.bytes += rows.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
            out.verified
                .push(batch.verify_signature(self.key.public_key_raw())?);
            out.wire.push(wire);
            out.rows.push(rows);
        }
        Ok(out)
    }
}

fn ingest_checked(store: &EvidenceStore, b: &VerifiedBatch) -> Result<()> {
    let out = store.ingest(b, SIGNER_CERT, UnixMillis(now_ms()))?;
    ensure!(
        out.stored as usize == b.records().len(),
        "ingest stored {} of {} records",
        out.stored,
        b.records().len()
    );
    Ok(())
}

struct IngestResult {
    verified: Series,
    wire: Series,
    raw: Series,
    batches: u64,
    batch_bytes: f64,
}

fn bench_ingest(plan: &Plan, dir: &Path) -> Result<IngestResult> {
    let spoke = naming::node_id(&TrustDomain::new(TD)?, "s1", "ingest")?;
    let spoke_name = spoke.to_string();
    let key = svid::generate_key()?;
    let public_key = key.public_key_raw().to_vec();
    let store = EvidenceStore::open(&dir.join("ingest-verified.db"))?;
    let store_wire = EvidenceStore::open(&dir.join("ingest-wire.db"))?;
    let raw = Builder::new()
        .set_cache_size(HUB_CACHE_BYTES)
        .create(dir.join("ingest-raw.redb"))?;
    let mut maker = BatchMaker {
        chain: Chain::genesis(&spoke),
        spoke,
        key,
        carry: Vec::new(),
        run: format!("drill-{}", now_ms()),
        t0: now_ms(),
        next: 0,
    };
    let (mut s_ver, mut s_wire, mut s_raw) =
        (Series::default(), Series::default(), Series::default());
    let (mut batches, mut wire_bytes) = (0u64, 0u64);
    for round in 0..plan.ingest_rounds {
        let r = maker.round(plan.ingest_batches)?;
        batches += r.verified.len() as u64;
        wire_bytes += r.wire.iter().map(|w| w.len() as u64).sum::<u64>();
        for k in 0..3 {
            let t = Instant::now();
            match (k + round) % 3 {
                0 => {
                    for b in &r.verified {
                        ingest_checked(&store, b)?;
                    }
                    s_ver.add(r.records, r.bytes, t.elapsed());
                }
                1 => {
                    for w in &r.wire {
                        let b = Batch::decode(w)?.verify_signature(&public_key)?;
                        ingest_checked(&store_wire, &b)?;
                    }
                    s_wire.add(r.records, r.bytes, t.elapsed());
                }
                _ => {
                    for rows in &r.rows {
                        let mut tx = raw.begin_write()?;
                        tx.set_quick_repair(true);
                        {
                            let mut tab = tx.open_table(HUB_RECORDS)?;
                            for (seq, v) in rows {
                                tab.insert((spoke_name.as_str(), *seq), v.as_slice())?;
                            }
                        }
                        tx.commit()?;
                    }
                    s_raw.add(r.records, r.bytes, t.elapsed());
                }
            }
        }
    }
    Ok(IngestResult {
        verified: s_ver,
        wire: s_wire,
        raw: s_raw,
        batch_bytes: wire_bytes as f64 / batches.max(1) as f64,
        batches,
    })
}

// ---- 3. drain over loopback --------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A raw quinn + rustls loopback pair (TLS 1.3, ring, rcgen self-signed,
/// the tidemesh `QuicSettings` transport); the server reads every stream to
/// its end and answers with the byte count.
async fn raw_quinn() -> Result<(quinn::Endpoint, quinn::Endpoint, quinn::Connection)> {
    let cert = rcgen::generate_simple_self_signed(vec![RAW_SNI.to_owned()])?;
    let der = cert.cert.der().clone();
    let tls13 = &[&rustls::version::TLS13];
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(tls13)?
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der())),
        )?;
    server.alpn_protocols = vec![RAW_ALPN.to_vec()];
    let server_ep = quinn::Endpoint::server(
        QuicSettings::default().server_config(server)?,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )?;
    let addr = server_ep.local_addr()?;
    let ep = server_ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while let Ok(Some(c)) = recv.read_chunk(usize::MAX, true).await {
                            n += c.bytes.len() as u64;
                        }
                        let _ = send.write_all(&n.to_be_bytes()).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(tls13)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![RAW_ALPN.to_vec()];
    let client_ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let conn = client_ep
        .connect_with(QuicSettings::default().client_config(tls)?, addr, RAW_SNI)?
        .await?;
    Ok((server_ep, client_ep, conn))
}

/// Pushes `total` bytes on one new stream; done when the server has counted
/// them all.
async fn quinn_push(conn: &quinn::Connection, total: u64) -> Result<Duration> {
    let chunk = vec![0x5au8; QUINN_WRITE];
    let t = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        send.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    send.finish()?;
    let answer = recv.read_to_end(8).await?;
    let got = u64::from_be_bytes(answer.as_slice().try_into().context("short answer")?);
    ensure!(got == total, "quinn server counted {got} of {total} bytes");
    Ok(t.elapsed())
}

/// Reads every row of the buffer's record table; (rows, value bytes).
fn raw_scan(db: &Database) -> Result<(u64, u64)> {
    let tx = db.begin_read()?;
    let t = tx.open_table(SPOKE_RECORDS)?;
    let (mut rows, mut bytes, mut sum) = (0u64, 0u64, 0u64);
    for item in t.iter()? {
        let (_, v) = item?;
        let v = v.value();
        rows += 1;
        bytes += v.len() as u64;
        // Touch the value so the read is not just a length lookup.
        sum = sum.wrapping_add(u64::from(v.get(v.len() / 2).copied().unwrap_or(0)));
    }
    std::hint::black_box(sum);
    Ok((rows, bytes))
}

struct DrainResult {
    fill: Series,
    scan: Series,
    quinn: Series,
    drain: Series,
    connect: Duration,
    quarters: Vec<f64>,
    batches_sent: u64,
    throttled_ms: u64,
    /// Records the hub's acks said it newly stored (after its commit).
    hub_stored: u64,
    duplicates: u64,
}

async fn bench_drain(plan: &Plan, dir: &Path) -> Result<DrainResult> {
    // Hub and enrolled spoke, as in the foundation bench.
    let hub_dir = dir.join("hub");
    let td = TrustDomain::new(TD)?;
    tidemesh_hub::init(&hub_dir, &td, &SystemClock)?;
    let hub = Hub::open(
        &hub_dir,
        HubConfig {
            admin_socket: false,
            ..HubConfig::default()
        },
        Arc::new(SystemClock),
    )?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = sock.local_addr()?;
    let socket = tidemesh_net::quic::wrap_socket(sock)?;
    let (stop_hub, hub_stopped) = tokio::sync::oneshot::channel::<()>();
    let h = hub.clone();
    let served = tokio::spawn(async move {
        h.serve(socket, async {
            let _ = hub_stopped.await;
        })
        .await
    });
    let spoke_dir = dir.join("spoke");
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
    let spoke = Spoke::open(
        &spoke_dir,
        SpokeConfig {
            admin_socket: false,
            sync: SyncSettings {
                drain_rate: 0,
                batch_records: BATCH_RECORDS,
                ..SyncSettings::default()
            },
            ..SpokeConfig::default()
        },
        Arc::new(SystemClock),
    )?;

    // The backlog, through the buffer the spoke will open.
    eprintln!(
        "evidence bench: 3. filling a {}-record backlog",
        plan.backlog
    );
    let db_path = spoke_dir.join("evidence.db");
    let buf = EvidenceBuffer::open(&db_path, spoke.id(), BufferConfig::default())?;
    let run = format!("drill-{}", now_ms());
    let t0 = now_ms();
    let t = Instant::now();
    let mut i = 0u64;
    while i < plan.backlog {
        let end = (i + FILL_CHUNK).min(plan.backlog);
        let mut last = None;
        for j in i..end {
            last = Some(buf.append(drill_record(&run, t0, j))?);
        }
        if let Some(last) = last {
            last.committed().await?;
        }
        i = end;
    }
    let fill_el = t.elapsed();
    let held = buf.stats(UnixMillis(now_ms()));
    ensure!(
        held.last_committed_seq == plan.backlog && held.pending_records == plan.backlog,
        "backlog not as filled: {held:?}"
    );
    buf.close().await?;

    // Floor (a): scan the same file, with the buffer's page cache.
    let mut scan = Series::default();
    let mut backlog_bytes = 0u64;
    {
        let db = Builder::new()
            .set_cache_size(BufferConfig::default().cache_bytes)
            .open(&db_path)?;
        for _ in 0..plan.scan_reps {
            let t = Instant::now();
            let (rows, bytes) = raw_scan(&db)?;
            scan.add(rows, bytes, t.elapsed());
            ensure!(rows == plan.backlog, "scan found {rows} rows");
            backlog_bytes = bytes;
        }
    }
    let mut fill = Series::default();
    fill.add(plan.backlog, backlog_bytes, fill_el);

    // Floor (b): raw quinn, the backlog's bytes on one stream.
    let mut quinn = Series::default();
    {
        let (server_ep, client_ep, conn) = raw_quinn().await?;
        for _ in 0..plan.quinn_reps {
            let el = quinn_push(&conn, backlog_bytes).await?;
            quinn.add(plan.backlog, backlog_bytes, el);
        }
        conn.close(quinn::VarInt::from_u32(0), b"done");
        client_ep.wait_idle().await;
        server_ep.close(quinn::VarInt::from_u32(0), b"done");
    }

    // The drain.
    eprintln!("evidence bench: 3. draining");
    let sock = tidemesh_net::quic::wrap_socket(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
    let (stop_spoke, spoke_stopped) = tokio::sync::oneshot::channel::<()>();
    let s2 = spoke.clone();
    let t = Instant::now();
    let running = tokio::spawn(async move {
        s2.run(sock, async {
            let _ = spoke_stopped.await;
        })
        .await
    });
    let target = plan.backlog + 1;
    let mut connect = None;
    let mut marks = [None; 4];
    let last = loop {
        let s = spoke.sync_stats();
        if connect.is_none() && s.hub_next_seq >= 1 {
            connect = Some(t.elapsed());
        }
        for (q, m) in marks.iter_mut().enumerate() {
            if m.is_none() && s.hub_next_seq > plan.backlog * (q as u64 + 1) / 4 {
                *m = Some(t.elapsed());
            }
        }
        if s.hub_next_seq >= target {
            break s;
        }
        if s.sync_rejections > 0 {
            bail!("the hub refused evidence: {s:?}");
        }
        if t.elapsed() > plan.drain_timeout {
            bail!("drain did not finish in {:?}: {s:?}", plan.drain_timeout);
        }
        if running.is_finished() {
            bail!("the spoke stopped during the drain: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let drain_el = t.elapsed();
    ensure!(
        last.sync_records_acked >= plan.backlog,
        "the hub's acks cover {} stored records, the backlog is {}",
        last.sync_records_acked,
        plan.backlog
    );
    let mut drain = Series::default();
    drain.add(plan.backlog, backlog_bytes, drain_el);
    let connect = connect.unwrap_or_default();
    let mut quarters = Vec::new();
    let mut prev = connect;
    for m in marks.into_iter().flatten() {
        quarters.push((plan.backlog / 4) as f64 / (m - prev).as_secs_f64().max(1e-9));
        prev = m;
    }

    let _ = stop_spoke.send(());
    running.await??;
    let _ = stop_hub.send(());
    served.await??;
    Ok(DrainResult {
        fill,
        scan,
        quinn,
        drain,
        connect,
        quarters,
        batches_sent: last.sync_batches_sent,
        throttled_ms: last.sync_throttled_ms,
        hub_stored: last.sync_records_acked,
        duplicates: last.sync_duplicates,
    })
}

// ---- report ------------------------------------------------------------------

fn row(name: &str, s: &Series) {
    println!(
        "  {name:<52} {n:>9} {el:>8.3} s {rate:>11.0} rec/s {mb:>8.1} MB/s",
        n = s.records,
        el = s.elapsed.as_secs_f64(),
        rate = s.rate(),
        mb = s.mb_per_s(),
    );
}

fn ratio_row(name: &str, r: (f64, f64), goal: Option<f64>) {
    let goal = goal.map_or(String::new(), |g| format!("  [goal >= {g}]"));
    println!(
        "  {name:<52} {:>9.3}  (median of per-round ratios {:.3}){goal}",
        r.0, r.1
    );
}

fn header(title: &str) {
    println!(
        "  {title:<52} {:>9} {:>10} {:>17} {:>13}",
        "N", "elapsed", "rate", "throughput"
    );
}

fn series_json(s: &Series) -> serde_json::Value {
    json!({
        "records": s.records,
        "bytes": s.bytes,
        "elapsed_s": s.elapsed.as_secs_f64(),
        "records_per_s": s.rate(),
        "mb_per_s": s.mb_per_s(),
        "per_round_records_per_s": s.per_round,
    })
}

fn ratio_json(r: (f64, f64)) -> serde_json::Value {
    json!({"total": r.0, "median_round": r.1})
}

fn temp_root() -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().to_owned();
    Ok((tmp, path))
}

// ---- main --------------------------------------------------------------------

fn main() -> Result<()> {
    let quick = std::env::var(QUICK_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let plan = if quick { QUICK } else { FULL };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (_tmp, dir) = temp_root()?;
    let t_all = Instant::now();
    let load_start = loadavg();

    eprintln!("evidence bench: 1. durable append");
    let append = bench_append(&rt, &plan, &dir)?;
    eprintln!("evidence bench: 2. hub ingest");
    let ingest = bench_ingest(&plan, &dir)?;
    let drain = rt.block_on(bench_drain(&plan, &dir))?;
    let total = t_all.elapsed();

    let r_append = ratio(&append.buffer, &append.raw);
    let r_ingest = ratio(&ingest.verified, &ingest.raw);
    let r_wire = ratio(&ingest.wire, &ingest.raw);
    let floor = drain.scan.rate().min(drain.quinn.rate());
    let r_drain = drain.drain.rate() / floor;
    let r_drain_scan = drain.drain.rate() / drain.scan.rate();
    let r_drain_quinn = drain.drain.rate() / drain.quinn.rate();
    // Context only: section 2's figures, same run but not interleaved.
    let r_drain_hub_raw = drain.drain.rate() / ingest.raw.rate();
    let r_drain_hub_wire = drain.drain.rate() / ingest.wire.rate();

    let m = machine();
    println!();
    common::print_header(
        "tidemesh evidence bench",
        quick.then_some("QUICK smoke pass: TIDEMESH_BENCH_QUICK set or no --bench; not figures"),
        COMMAND,
        &m,
    );
    println!(
        "  plan: append {} rounds x {} records; ingest {} rounds x {} batches; backlog {} records; scan x{}, quinn x{}",
        plan.append_rounds,
        plan.append_records,
        plan.ingest_rounds,
        plan.ingest_batches,
        plan.backlog,
        plan.scan_reps,
        plan.quinn_reps
    );
    println!("  temp dir: {}", dir.display());
    println!(
        "  load average at start: {load_start}, at end: {}",
        m["loadavg"].as_str().unwrap_or("")
    );
    println!("  total wall time: {:.1} s", total.as_secs_f64());
    println!();
    header("1. durable append (group commit, fsync)");
    row("EvidenceBuffer append -> last committed()", &append.buffer);
    row("raw redb insert, 512 rows/txn, quick repair", &append.raw);
    ratio_row("ratio buffer / raw redb", r_append, Some(0.8));
    println!(
        "  {} buffer commits for {} appends: {:.1} records per commit; {:.0} bytes per record",
        append.commits,
        append.buffer.records,
        append.buffer.records as f64 / append.commits.max(1) as f64,
        append.record_bytes
    );
    println!();
    header("2. hub ingest (one durable txn per batch)");
    row("EvidenceStore::ingest (verified batches)", &ingest.verified);
    row("decode + verify_signature + ingest", &ingest.wire);
    row("raw redb insert, (spoke, seq) keys, txn/batch", &ingest.raw);
    ratio_row("ratio ingest / raw redb", r_ingest, Some(0.5));
    ratio_row("ratio decode+verify+ingest / raw redb", r_wire, None);
    println!(
        "  {} batches, {:.0} records and {:.0} wire bytes per batch",
        ingest.batches,
        ingest.verified.records as f64 / ingest.batches.max(1) as f64,
        ingest.batch_bytes
    );
    println!();
    header("3. drain a backlog, spoke -> hub over loopback");
    row(
        "backlog fill through EvidenceBuffer (reference)",
        &drain.fill,
    );
    row("spoke -> hub sync, from Spoke::run", &drain.drain);
    row("raw redb scan of the spoke's evidence.db", &drain.scan);
    row("raw quinn+rustls, one stream, 1 MB writes", &drain.quinn);
    println!(
        "  {:<52} {:>9.3}  (floor: min(scan, quinn) = {:.0} rec/s)  [goal >= 0.5]",
        "ratio drain / min(scan, quinn)", r_drain, floor
    );
    println!("  {:<52} {:>9.3}", "ratio drain / scan", r_drain_scan);
    println!("  {:<52} {:>9.3}", "ratio drain / quinn", r_drain_quinn);
    println!(
        "  {:<52} {:>9.3}  (context: section 2, not interleaved)",
        "ratio drain / raw redb hub insert", r_drain_hub_raw
    );
    println!(
        "  {:<52} {:>9.3}  (context: section 2, not interleaved)",
        "ratio drain / decode+verify+ingest", r_drain_hub_wire
    );
    let quarters: Vec<String> = drain.quarters.iter().map(|q| format!("{q:.0}")).collect();
    println!(
        "  session open after {:.0} ms; rate by quarter of the backlog: {} rec/s",
        drain.connect.as_secs_f64() * 1e3,
        quarters.join(" / ")
    );
    println!(
        "  {} batches sent ({:.0} records each), hub retry-after {} ms; hub acks: {} records stored, {} duplicates",
        drain.batches_sent,
        drain.drain.records as f64 / drain.batches_sent.max(1) as f64,
        drain.throttled_ms,
        drain.hub_stored,
        drain.duplicates
    );
    println!();

    let out = json!({
        "bench": "tidemesh-evidence",
        "quick": quick,
        "command": COMMAND,
        "machine": m,
        "loadavg_start": load_start,
        "total_s": total.as_secs_f64(),
        "append": {
            "buffer": series_json(&append.buffer),
            "raw_redb": series_json(&append.raw),
            "ratio": ratio_json(r_append),
            "commits": append.commits,
        },
        "ingest": {
            "verified": series_json(&ingest.verified),
            "decode_verify_ingest": series_json(&ingest.wire),
            "raw_redb": series_json(&ingest.raw),
            "ratio": ratio_json(r_ingest),
            "ratio_decode_verify_ingest": ratio_json(r_wire),
            "batches": ingest.batches,
        },
        "drain": {
            "fill": series_json(&drain.fill),
            "sync": series_json(&drain.drain),
            "raw_scan": series_json(&drain.scan),
            "raw_quinn": series_json(&drain.quinn),
            "ratio_min_floor": r_drain,
            "ratio_scan": r_drain_scan,
            "ratio_quinn": r_drain_quinn,
            "ratio_hub_raw_insert_context": r_drain_hub_raw,
            "ratio_decode_verify_ingest_context": r_drain_hub_wire,
            "session_open_ms": drain.connect.as_secs_f64() * 1e3,
            "quarter_records_per_s": drain.quarters,
            "batches_sent": drain.batches_sent,
            "hub_retry_after_ms": drain.throttled_ms,
            "hub_acked_stored": drain.hub_stored,
            "hub_acked_duplicates": drain.duplicates,
        },
    });
    println!("{out}");
    Ok(())
}
