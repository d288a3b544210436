//! Crash safety of the evidence buffer, shown with SIGKILL against a real
//! redb file: the `evidence_writer` example appends in a loop and prints
//! every sequence number only after its commit returned; this test kills it
//! at random moments 20 times and, after each kill, checks that every
//! reported record is still there, the whole stored chain verifies from
//! genesis, and the next run continues from the last committed record.
//!
//! The seed is printed; rerun a failure with `TIDEMESH_SEED=<seed>`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

const ROUNDS: usize = 20;

/// The example binary, built next to this test (by `cargo test`, or here).
fn writer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/buffer_crash-<hash> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let bin = profile_dir.join("examples").join("evidence_writer");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "tidemesh-spoke",
        "--example",
        "evidence_writer",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("runs cargo build");
    assert!(
        status.success(),
        "building the evidence_writer example failed"
    );
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

struct Verified {
    last_committed: u64,
}

fn verify(bin: &Path, db: &Path) -> Verified {
    let out = Command::new(bin)
        .arg("verify")
        .arg(db)
        .output()
        .expect("runs verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("verify prints json");
    assert_eq!(v["ok"], true, "{v}");
    let last = v["last_committed_seq"]
        .as_u64()
        .expect("last_committed_seq");
    // Nothing is acked or shed in this test: the chain runs from genesis
    // and holds one record per sequence number.
    assert_eq!(v["base_next_seq"], 1, "{v}");
    assert_eq!(v["end_next_seq"].as_u64(), Some(last + 1), "{v}");
    assert_eq!(v["records"].as_u64(), Some(last), "{v}");
    Verified {
        last_committed: last,
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_reported_committed() {
    let seed = std::env::var("TIDEMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("seed {seed} (rerun with TIDEMESH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bin = writer_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("evidence.db");

    let mut last_committed = 0u64;
    let mut total_reported = 0usize;
    for round in 0..ROUNDS {
        let mut child = Command::new(&bin)
            .arg("write")
            .arg(&db)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawns the writer");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // One kill in four lands anywhere, possibly while the file is being
        // opened and repaired; the others land while records are written.
        let mut lines = Vec::new();
        let anywhere = rng.random_range(0..4) == 0;
        if !anywhere {
            let opened = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the writer opens the buffer within 60 s");
            lines.push(opened);
        }
        let kill_after = Duration::from_millis(rng.random_range(1..400));
        std::thread::sleep(kill_after);
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        reader.join().expect("reader thread");
        lines.extend(rx.try_iter());

        let mut start = None;
        let mut reported = Vec::new();
        for line in &lines {
            if let Some(s) = line.strip_prefix("start ") {
                start = Some(s.parse::<u64>().expect("start seq"));
            } else if let Some(s) = line.strip_prefix("committed ") {
                reported.push(s.parse::<u64>().expect("committed seq"));
            }
        }
        if let Some(start) = start {
            assert_eq!(
                start, last_committed,
                "round {round}: reopened at {start}, last committed was {last_committed}"
            );
        }
        let v = verify(&bin, &db);
        let max_reported = reported.iter().copied().max().unwrap_or(0);
        assert!(
            v.last_committed >= max_reported,
            "round {round} (killed {kill_after:?} after start): seq {max_reported} was reported \
             committed but the buffer ends at {}",
            v.last_committed
        );
        assert!(
            reported.iter().all(|s| *s > last_committed),
            "round {round}: a sequence number was reused after a restart"
        );
        assert!(
            v.last_committed >= last_committed,
            "round {round}: records vanished"
        );
        println!(
            "round {round}: killed {kill_after:?} after {}, {} reported committed, buffer at {}",
            if anywhere { "spawn" } else { "opening" },
            reported.len(),
            v.last_committed
        );
        total_reported += reported.len();
        last_committed = v.last_committed;
    }
    assert!(
        total_reported > 1000,
        "the writer barely wrote anything ({total_reported} records)"
    );
}
