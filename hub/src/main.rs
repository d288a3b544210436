//! `tidemesh-hub`: the command line over the hub library.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tidemesh_hub::{Hub, HubConfig};
use tidemesh_identity::{clock::SystemClock, svid, TrustDomain};
use tidemesh_net::admin;

/// The tidemesh hub: SPIFFE certificate authority, enrollment and control
/// plane for a fleet of store spokes.
#[derive(Parser)]
#[command(name = "tidemesh-hub", version, about)]
struct Cli {
    /// Log format for `serve`: `text` or `json`.
    #[arg(
        long,
        global = true,
        env = "TIDEMESH_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a hub data directory: CA (key mode 0600) and database.
    Init {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// The SPIFFE trust domain, e.g. `edge.example`.
        #[arg(long, env = "TIDEMESH_TRUST_DOMAIN")]
        trust_domain: String,
    },
    /// Run the hub: QUIC control endpoint and the admin socket.
    Serve {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// UDP address for QUIC, e.g. `0.0.0.0:7443`.
        #[arg(long, env = "TIDEMESH_LISTEN", default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Lifetime of node SVIDs (e.g. `1h`, `90s`).
        #[arg(long, env = "TIDEMESH_NODE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
        node_ttl: Duration,
        /// Lifetime of workload SVIDs.
        #[arg(long, env = "TIDEMESH_WORKLOAD_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
        workload_ttl: Duration,
        /// How long a spoke may be out of contact and still come back with its
        /// pinned key after its certificate expired.
        #[arg(long, env = "TIDEMESH_MAX_OFFLINE", default_value = "30d", value_parser = humantime::parse_duration)]
        max_offline: Duration,
        /// QUIC keep-alive interval.
        #[arg(long, env = "TIDEMESH_KEEP_ALIVE", default_value = "1s", value_parser = humantime::parse_duration)]
        keep_alive: Duration,
        /// QUIC idle timeout: a silent peer is declared gone after this.
        #[arg(long, env = "TIDEMESH_IDLE_TIMEOUT", default_value = "4s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// List enrolled spokes.
    Spokes {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a spoke: its connection is closed and it is refused from now on.
    Revoke {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// The spoke's node ID.
        #[arg(long)]
        spoke: String,
    },
    /// Apply mesh config: multi-document YAML (Istio AuthorizationPolicy,
    /// VirtualService, DestinationRule, ServiceEntry; tidemesh kinds). All of
    /// it is validated before anything changes; success makes a new version.
    Apply {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// The YAML file (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Config versions: history, get, rollback.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Show the audit log (issuances, renewals, refusals, revocations).
    Audit {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Every version: number, time, who, what changed.
    History {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a version's config (the newest by default).
    Get {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// Which version.
        #[arg(long)]
        version: Option<u64>,
        /// Output format: yaml or json.
        #[arg(short = 'o', long = "output", default_value = "yaml")]
        output: String,
    },
    /// Make an earlier version current again (as a new version).
    Rollback {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// The version to return to.
        #[arg(long)]
        to: u64,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a single-use join token bound to one spoke ID.
    Create {
        /// Where the hub keeps its state.
        #[arg(long, env = "TIDEMESH_DATA_DIR")]
        data_dir: PathBuf,
        /// The spoke node ID: spiffe://TD/store/STORE/node/NODE.
        #[arg(long)]
        spoke: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

async fn call(data_dir: &std::path::Path, req: Value) -> anyhow::Result<Value> {
    Ok(admin::call(&admin::socket_path(data_dir), req).await?)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tidemesh_net::cli::run_main(real_main(cli))
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init {
            data_dir,
            trust_domain,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let fp = tidemesh_hub::init(&data_dir, &td, &SystemClock)?;
            println!(
                "initialized hub for trust domain {td} in {}",
                data_dir.display()
            );
            println!("ca fingerprint sha256:{}", svid::hex(&fp));
        }
        Cmd::Serve {
            data_dir,
            listen,
            node_ttl,
            workload_ttl,
            max_offline,
            keep_alive,
            idle_timeout,
        } => {
            tidemesh_net::cli::init_tracing(&cli.log_format).map_err(anyhow::Error::msg)?;
            if keep_alive >= idle_timeout {
                bail!("--keep-alive {keep_alive:?} must be shorter than --idle-timeout {idle_timeout:?}");
            }
            let cfg = HubConfig {
                node_ttl,
                workload_ttl,
                max_offline,
                quic: tidemesh_net::QuicSettings {
                    keep_alive,
                    idle_timeout,
                    ..Default::default()
                },
                ..Default::default()
            };
            let hub = Hub::open(&data_dir, cfg, Arc::new(SystemClock))?;
            let sock =
                std::net::UdpSocket::bind(listen).with_context(|| format!("--listen {listen}"))?;
            let bound = sock.local_addr()?;
            println!("listening={bound}");
            let socket = tidemesh_net::quic::wrap_socket(sock)?;
            hub.serve(socket, tidemesh_net::cli::shutdown_signal())
                .await?;
        }
        Cmd::Token {
            cmd:
                TokenCmd::Create {
                    data_dir,
                    spoke,
                    ttl,
                },
        } => {
            let r = call(
                &data_dir,
                json!({"cmd": "token_create", "spoke": spoke, "ttl_s": ttl.as_secs().max(1)}),
            )
            .await?;
            println!(
                "{}",
                r.get("token").and_then(Value::as_str).unwrap_or_default()
            );
        }
        Cmd::Spokes { data_dir, json } => {
            let r = call(&data_dir, json!({"cmd": "spokes"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:<50} {:<10} {:<22} {:<22}",
                    "ID", "STATE", "LAST SEEN", "CERT NOT AFTER"
                );
                for s in r.as_array().into_iter().flatten() {
                    let state = if s["revoked"].as_bool() == Some(true) {
                        "revoked"
                    } else if s["connected"].as_bool() == Some(true) {
                        "connected"
                    } else {
                        "offline"
                    };
                    println!(
                        "{:<50} {:<10} {:<22} {:<22}",
                        s["id"].as_str().unwrap_or(""),
                        state,
                        s["last_seen"].as_str().unwrap_or(""),
                        s["cert_not_after"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Revoke { data_dir, spoke } => {
            call(&data_dir, json!({"cmd": "revoke", "spoke": spoke})).await?;
            println!("revoked {spoke}");
        }
        Cmd::Apply { data_dir, file } => {
            let yaml = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading standard input")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("-f {}", file.display()))?
            };
            let r = call(&data_dir, json!({"cmd": "apply", "yaml": yaml})).await?;
            println!(
                "applied: config version {} ({})",
                r["version"],
                r["summary"].as_str().unwrap_or("")
            );
        }
        Cmd::Config {
            cmd: ConfigCmd::History { data_dir, json },
        } => {
            let r = call(&data_dir, json!({"cmd": "config_history"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{:>7}  {:<22} {:<6} SUMMARY", "VERSION", "AT", "UID");
                for e in r.as_array().into_iter().flatten() {
                    println!(
                        "{:>7}  {:<22} {:<6} {}",
                        e["version"].as_u64().unwrap_or(0),
                        e["at"].as_str().unwrap_or(""),
                        e["uid"]
                            .as_u64()
                            .map(|u| u.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e["summary"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Config {
            cmd:
                ConfigCmd::Get {
                    data_dir,
                    version,
                    output,
                },
        } => {
            if output != "yaml" && output != "json" {
                bail!("-o {output:?}: expected yaml or json");
            }
            let mut req = json!({"cmd": "config_get", "format": output});
            if let Some(v) = version {
                req["version"] = json!(v);
            }
            let r = call(&data_dir, req).await?;
            print!("{}", r["text"].as_str().unwrap_or(""));
        }
        Cmd::Config {
            cmd: ConfigCmd::Rollback { data_dir, to },
        } => {
            let r = call(&data_dir, json!({"cmd": "config_rollback", "to": to})).await?;
            println!(
                "rolled back: config version {} ({})",
                r["version"],
                r["summary"].as_str().unwrap_or("")
            );
        }
        Cmd::Audit { data_dir, json } => {
            let r = call(&data_dir, json!({"cmd": "audit"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for e in r.as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {} {:<16} {} {}",
                        e["seq"].as_u64().unwrap_or(0),
                        e["at"].as_str().unwrap_or(""),
                        e["event"].as_str().unwrap_or(""),
                        e["subject"].as_str().unwrap_or("-"),
                        e["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}
