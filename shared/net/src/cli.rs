//! What both binaries' `main` needs: the runtime, error reporting, the log
//! subscriber and the shutdown signal. Libraries emit events; only binaries
//! call [`init_tracing`].

use std::{fmt::Display, future::Future, process::ExitCode};

/// Runs `main` on a multi-threaded runtime; an error is printed as
/// `error: ...` (with its causes) and gives exit status 1.
pub fn run_main<E: Display>(main: impl Future<Output = Result<(), E>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the log subscriber on stderr: `text` (ANSI colours only on a
/// terminal) or `json`; the filter comes from `RUST_LOG`, default `info`.
pub fn init_tracing(format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        "text" => b.init(),
        "json" => b.json().init(),
        other => return Err(format!("--log-format {other:?}: expected text or json")),
    }
    Ok(())
}

/// Prints evidence records as the `evidence tail` / `evidence query`
/// commands do: one JSON object per line with `json`, else one line each
/// (seq, time, class, kind).
pub fn print_records(records: &serde_json::Value, json: bool) {
    for rec in records.as_array().into_iter().flatten() {
        if json {
            println!("{rec}");
        } else {
            let kind = rec["body"]
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default();
            println!(
                "{:>10} {} {:<8} {}",
                rec["seq"],
                rec["timestamp"].as_str().unwrap_or(""),
                rec["class"].as_str().unwrap_or(""),
                kind
            );
        }
    }
}

/// Prints a stats object: pretty JSON with `json`, else one `key value`
/// line per field.
pub fn print_object(v: &serde_json::Value, json: bool) {
    if json {
        println!("{v:#}");
    } else if let Some(o) = v.as_object() {
        for (k, v) in o {
            println!("{k:<24} {v}");
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Prints a guarantee vector (spoke or hub) as a table: one line per call
/// path, one column per dimension.
pub fn print_vector(v: &serde_json::Value) {
    const DIMS: [&str; 6] = [
        "identity",
        "authorization",
        "routing",
        "reliability",
        "observability",
        "security",
    ];
    println!(
        "{}  mode {}{}",
        v["service"].as_str().unwrap_or("-"),
        v["mode"].as_str().unwrap_or("-"),
        v["spoke"]
            .as_str()
            .map(|s| format!("  ({s})"))
            .unwrap_or_default()
    );
    print!("  {:<10}", "path");
    for d in DIMS {
        print!(" {d:<14}");
    }
    println!();
    let paths = match v["paths"].as_array() {
        Some(p) if !p.is_empty() => p.clone(),
        _ => vec![serde_json::json!({"path": v["path"], "dimensions": v["dimensions"]})],
    };
    for p in &paths {
        print!("  {:<10}", p["path"].as_str().unwrap_or("-"));
        for d in DIMS {
            print!(
                " {:<14}",
                p["dimensions"][d]["level"].as_str().unwrap_or("-")
            );
        }
        if p["usable"] == false {
            print!(" (not usable now)");
        }
        println!();
    }
    if let Some(e) = v["evidence"].as_object() {
        println!(
            "  evidence: records {}..{} ({})",
            e.get("from_seq").cloned().unwrap_or_default(),
            e.get("to_seq").cloned().unwrap_or_default(),
            e.get("records").cloned().unwrap_or_default()
        );
    }
}

/// Parses a byte size: a number with an optional unit (B, KiB, MiB, GiB,
/// KB, MB, GB; case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes such as 64MiB"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Exit status of `healthcheck`: ready.
pub const HEALTHCHECK_READY: i32 = 0;
/// Exit status of `healthcheck`: the process answered, not ready.
pub const HEALTHCHECK_NOT_READY: i32 = 1;
/// Exit status of `healthcheck`: nothing answered in time.
pub const HEALTHCHECK_UNREACHABLE: i32 = 2;

/// `tidemesh-hub healthcheck` and `tidemesh-spoke healthcheck`: asks
/// `GET /readyz` on `addr` within `timeout`, prints the answer and returns
/// the exit status: [`HEALTHCHECK_READY`] (0), [`HEALTHCHECK_NOT_READY`] (1,
/// with the reason) or [`HEALTHCHECK_UNREACHABLE`] (2).
pub async fn healthcheck(addr: std::net::SocketAddr, timeout: std::time::Duration) -> i32 {
    use crate::metrics::{probe_ready, Probe};
    match probe_ready(addr, timeout).await {
        Probe::Ready(reason) => {
            println!("{reason}");
            HEALTHCHECK_READY
        }
        Probe::NotReady(status, reason) => {
            println!("not ready (HTTP {status}): {reason}");
            HEALTHCHECK_NOT_READY
        }
        Probe::Unreachable(e) => {
            eprintln!(
                "unreachable: http://{addr}/readyz: {e} (is it running with --metrics {addr}?)"
            );
            HEALTHCHECK_UNREACHABLE
        }
    }
}
