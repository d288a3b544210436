//! What every hub bench reports about the machine it ran on.

use serde_json::json;

/// CPU count, architecture, CPU model, kernel and load average.
pub fn machine() -> serde_json::Value {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    json!({"nproc": nproc, "arch": std::env::consts::ARCH, "cpu": cpu, "kernel": kernel, "loadavg": loadavg()})
}

/// The 1/5/15-minute load averages: other work on the box skews every figure.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The report's first lines: the title (with `note` when it is a smoke
/// pass, not figures), the command and the machine.
pub fn print_header(title: &str, note: Option<&str>, command: &str, m: &serde_json::Value) {
    println!(
        "{title}{}",
        note.map(|n| format!(" ({n})")).unwrap_or_default()
    );
    println!("  command: {command}");
    println!(
        "  machine: nproc={} arch={} cpu=\"{}\" kernel={}",
        m["nproc"],
        m["arch"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or("")
    );
}
