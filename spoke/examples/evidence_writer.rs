//! Appends evidence in a loop and reports what is durable: the process the
//! SIGKILL crash test (`tests/buffer_crash.rs`) kills and restarts.
//!
//! ```text
//! evidence_writer write  <evidence.db>   # appends until killed
//! evidence_writer verify <evidence.db>   # verifies the stored chain, prints JSON
//! ```
//! `write` prints `start <last committed seq>` once opened, then
//! `committed <seq>` for every record only after `committed().await`
//! returned for it: a line on stdout is a promise that the record survives
//! any crash. Three tasks append concurrently, in bursts of 1-32 records of
//! mixed classes (audit, request, debug), stamped with the wall clock.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use tidemesh_evidence::{samples, NewRecord, PriorityClass, UnixMillis};
use tidemesh_identity::SpiffeId;

use tidemesh_spoke::buffer::{BufferConfig, EvidenceBuffer};

/// The spoke every crash-test file belongs to.
const SPOKE: &str = "spiffe://crash.example/store/s1/node/n1";

fn now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn config() -> BufferConfig {
    BufferConfig {
        capacity_bytes: 256 << 20,
        commit_interval: Duration::from_millis(2),
        cache_bytes: 8 << 20,
        ..BufferConfig::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(path)) = (args.get(1), args.get(2)) else {
        bail!("usage: evidence_writer write|verify <evidence.db>");
    };
    let path = PathBuf::from(path);
    let spoke = SpiffeId::parse(SPOKE).context("spoke id")?;
    match mode.as_str() {
        "write" => write(path, spoke).await,
        "verify" => verify(path, spoke).await,
        other => bail!("unknown mode {other:?}; use write or verify"),
    }
}

async fn write(path: PathBuf, spoke: SpiffeId) -> anyhow::Result<()> {
    let buf = EvidenceBuffer::open(&path, &spoke, config()).context("open")?;
    let start = buf.stats(now()).last_committed_seq;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "start {start}")?;
        out.flush()?;
    }
    let mut tasks = Vec::new();
    for worker in 0..3u64 {
        tasks.push(tokio::spawn(append_forever(
            buf.clone(),
            start ^ (worker << 32),
        )));
    }
    for t in tasks {
        t.await.context("writer task")??;
    }
    Ok(())
}

/// Appends bursts and prints each record's seq once it is durable.
async fn append_forever(buf: EvidenceBuffer, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut i = 0u64;
    loop {
        let burst = rng.random_range(1..=32);
        let mut tickets = Vec::with_capacity(burst);
        for _ in 0..burst {
            let t = now();
            let roll = rng.random_range(0..100);
            let record = if roll < 5 {
                NewRecord::new(t, samples::mode_transition())
            } else {
                NewRecord {
                    timestamp: t,
                    class: if roll < 35 {
                        PriorityClass::Debug
                    } else {
                        PriorityClass::Request
                    },
                    body: samples::drill_request("crash", i, t),
                }
            };
            i += 1;
            tickets.push(buf.append(record)?);
        }
        let mut seqs = Vec::with_capacity(tickets.len());
        for t in tickets {
            seqs.push(t.committed().await?);
        }
        let mut out = std::io::stdout().lock();
        for s in seqs {
            writeln!(out, "committed {s}")?;
        }
        out.flush()?;
    }
}

async fn verify(path: PathBuf, spoke: SpiffeId) -> anyhow::Result<()> {
    let buf = EvidenceBuffer::open(&path, &spoke, config()).context("open")?;
    let stats = buf.stats(now());
    let base = buf.base()?;
    let report = match buf.verify() {
        Ok(v) => serde_json::json!({
            "ok": true,
            "last_committed_seq": stats.last_committed_seq,
            "base_next_seq": base.next_seq,
            "end_next_seq": v.end().next_seq,
            "records": v.records(),
            "shed_records": v.shed_records(),
        }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
    };
    buf.close().await?;
    println!("{report}");
    if report["ok"] != true {
        std::process::exit(1);
    }
    Ok(())
}
