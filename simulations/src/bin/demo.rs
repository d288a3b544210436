//! `tidemesh-demo`: the product's story on loopback. Flags and output
//! only; the demo lives in [`tidemesh_sim::demo`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tidemesh_sim::demo::{self, DemoConfig};

const EXAMPLES: &str = "\
Examples:
  # the two-minute story (deploy/demo.sh builds the binaries and runs this)
  tidemesh-demo run --report target/demo/report.html

  # CI's short run, with the debug binaries next to this one
  tidemesh-demo run --short --report /tmp/demo/report.html

  # one of the store apps alone
  tidemesh-demo app --name inventory --listen 127.0.0.1:8081";

/// A hub, two spokes of one store behind tidemesh-relay, store apps with a
/// steady request loop, a hub blackout longer than the workload SVID
/// lifetime, the heal: a live timeline, a summary and an HTML report.
#[derive(Parser)]
#[command(name = "tidemesh-demo", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the story and write the report.
    Run {
        /// Where tidemesh-hub, tidemesh-spoke and tidemesh-relay are
        /// (default: next to this binary).
        #[arg(long, env = "TIDEMESH_DEMO_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Data directories and logs (default: a new directory under the
        /// system temp directory, removed at the end unless --keep).
        #[arg(long, env = "TIDEMESH_DEMO_WORK_DIR")]
        work_dir: Option<PathBuf>,
        /// Where the HTML report goes.
        #[arg(
            long,
            env = "TIDEMESH_DEMO_REPORT",
            default_value = "tidemesh-demo-report.html"
        )]
        report: PathBuf,
        /// Where the summary JSON (summary, timeline, every call) goes
        /// (default: the report's path with `.json`).
        #[arg(long, env = "TIDEMESH_DEMO_SUMMARY")]
        summary: Option<PathBuf>,
        /// CI mode: a 14 s outage with 8 s SVIDs (about 25 s of timeline).
        #[arg(long, env = "TIDEMESH_DEMO_SHORT")]
        short: bool,
        /// Leave everything running, /metrics on, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// A store app: answers every HTTP/1.1 request with 200 and a small
    /// JSON body; prints `listening=ADDR` first.
    App {
        /// `inventory` or `payments` (any other name answers generically).
        #[arg(long)]
        name: String,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemesh-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::App { name, listen } => {
            demo::app::serve(&name, listen)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            bin_dir,
            work_dir,
            report,
            summary,
            short,
            keep,
        } => {
            let self_exe = std::env::current_exe().context("this binary's path")?;
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => self_exe
                    .parent()
                    .context("this binary's directory")?
                    .to_path_buf(),
            };
            let summary = summary.unwrap_or_else(|| report.with_extension("json"));
            let cfg = DemoConfig {
                bin_dir,
                self_exe,
                work_dir,
                report,
                summary,
                short,
                keep,
            };
            let s = demo::run(&cfg)?;
            let problems = demo::problems(&s);
            if problems.is_empty() {
                println!("demo OK");
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    eprintln!("demo check failed: {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
