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

/// The data directory of a command run without `--data-dir` (and without
/// `TIDEMESH_DATA_DIR`): the entry of `$STATE_DIRECTORY` whose last
/// component is `name` (systemd sets it from the unit's
/// `StateDirectory=NAME`), else `/var/lib/NAME`. Another entry is not taken:
/// a hub command run from some other unit (a backup job, say) inherits that
/// unit's `$STATE_DIRECTORY`, which is not the hub's data.
pub fn default_data_dir(name: &str) -> std::path::PathBuf {
    state_directory(std::env::var_os("STATE_DIRECTORY").as_deref(), name)
}

fn state_directory(v: Option<&std::ffi::OsStr>, name: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    v.and_then(|v| {
        v.as_bytes()
            .split(|b| *b == b':')
            .map(|p| std::path::Path::new(std::ffi::OsStr::from_bytes(p)))
            .find(|p| p.is_absolute() && p.file_name() == Some(std::ffi::OsStr::new(name)))
            .map(std::path::Path::to_path_buf)
    })
    .unwrap_or_else(|| std::path::Path::new("/var/lib").join(name))
}

/// Parses the command line of a binary whose commands take `--data-dir`
/// with [`default_data_dir`] as clap default: a defaulted directory that
/// does not exist is an error here (exit status 1) that says where the
/// default came from, before any command runs; a directory given with
/// `--data-dir` or `TIDEMESH_DATA_DIR` is the command's to check (`init`
/// creates it).
pub fn parse_args<C: clap::Parser>() -> C {
    let m = C::command().get_matches();
    if let Err(e) = check_data_dir(&m) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    C::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
}

fn check_data_dir(m: &clap::ArgMatches) -> Result<(), String> {
    if let Some((_, sub)) = m.subcommand() {
        return check_data_dir(sub);
    }
    let Ok(Some(dir)) = m.try_get_one::<std::path::PathBuf>("data_dir") else {
        return Ok(());
    };
    if m.value_source("data_dir") != Some(clap::parser::ValueSource::DefaultValue) || dir.is_dir() {
        return Ok(());
    }
    let from = match std::env::var_os("STATE_DIRECTORY") {
        Some(v) if std::env::split_paths(&v).any(|p| p == *dir) => "$STATE_DIRECTORY",
        _ => "the default",
    };
    Err(format!(
        "data directory {} ({from}, as neither --data-dir nor TIDEMESH_DATA_DIR is given) does not exist: \
         pass --data-dir DIR, or install the package, which creates it",
        dir.display()
    ))
}

/// The shells `completions` knows.
pub use clap_complete::Shell;

/// Prints the completion script of `cmd` for `shell` on stdout.
pub fn print_completions(mut cmd: clap::Command, shell: Shell) -> std::io::Result<()> {
    use std::io::Write;
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()
}

/// The man pages of `cmd`: its page on stdout, or with `out_dir` one page
/// per command and subcommand (`NAME.1`, `NAME-SUB.1`, ...) written there.
pub fn write_man(cmd: clap::Command, out_dir: Option<&std::path::Path>) -> std::io::Result<()> {
    match out_dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)
        }
    }
}

#[cfg(test)]
mod data_dir_tests {
    use std::{ffi::OsStr, path::PathBuf};

    #[test]
    fn state_directory_wins_then_var_lib() {
        let f = super::state_directory;
        assert_eq!(
            f(Some(OsStr::new("/var/lib/n")), "n"),
            PathBuf::from("/var/lib/n")
        );
        assert_eq!(
            f(Some(OsStr::new("/srv/state/n")), "n"),
            PathBuf::from("/srv/state/n"),
            "StateDirectory= under another root"
        );
        assert_eq!(
            f(Some(OsStr::new("/a:/srv/n:/b/n")), "n"),
            PathBuf::from("/srv/n"),
            "the first entry named like the binary's state"
        );
        assert_eq!(
            f(Some(OsStr::new("/var/lib/backup-job")), "n"),
            PathBuf::from("/var/lib/n"),
            "another unit's state directory is not taken"
        );
        assert_eq!(
            f(Some(OsStr::new("n:/x")), "n"),
            PathBuf::from("/var/lib/n"),
            "a relative entry is not taken"
        );
        assert_eq!(f(Some(OsStr::new("")), "n"), PathBuf::from("/var/lib/n"));
        assert_eq!(
            f(None, "tidemesh-hub"),
            PathBuf::from("/var/lib/tidemesh-hub")
        );
    }
}
