//! A real NATS JetStream cluster on loopback for the hub-state tests:
//! `nats-server -js` processes (Debian's `nats-server`) joined by routes,
//! on free ports, each with its own store directory; killed on drop.
//!
//! Tests call [`available`] first: without `nats-server` on the PATH they
//! skip with a message, unless `TIDEMESH_REQUIRE_NATS` is set (CI), where
//! that is a failure.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{free_tcp, kill, wait_for};

/// Whether `nats-server` can run here; prints why a test skips when not,
/// and panics instead when `TIDEMESH_REQUIRE_NATS` is set.
pub fn available(test: &str) -> bool {
    let ok = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("TIDEMESH_REQUIRE_NATS").is_some() {
            panic!("{test}: nats-server not found (apt-get install nats-server)");
        }
        eprintln!("{test}: nats-server not installed: skipping (apt-get install nats-server)");
    }
    ok
}

/// One server of the cluster.
pub struct Node {
    /// Its name (`n0`, `n1`, ...), as JetStream reports leaders.
    pub name: String,
    /// Client address.
    pub client: SocketAddr,
    monitor: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster of [`Node`]s.
pub struct Cluster {
    /// The servers, in start order.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` servers under `root` and waits until every one reports
    /// JetStream healthy and a meta leader is elected.
    pub fn start(root: &Path, n: usize) -> Cluster {
        let ports: Vec<(SocketAddr, SocketAddr, SocketAddr)> = (0..n)
            .map(|_| (free_tcp(), free_tcp(), free_tcp()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, c, _)| format!("nats://{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, (client, cluster, monitor)) in ports.into_iter().enumerate() {
            let dir = root.join(format!("nats-n{i}"));
            std::fs::create_dir_all(&dir).expect("nats dir");
            let args = vec![
                "-js".to_owned(),
                "-sd".to_owned(),
                dir.to_str().expect("utf8").to_owned(),
                "--server_name".to_owned(),
                format!("n{i}"),
                "-a".to_owned(),
                "127.0.0.1".to_owned(),
                "-p".to_owned(),
                client.port().to_string(),
                "-m".to_owned(),
                monitor.port().to_string(),
                "--cluster_name".to_owned(),
                "tidemesh".to_owned(),
                "--cluster".to_owned(),
                format!("nats://{cluster}"),
                "--routes".to_owned(),
                routes.clone(),
            ];
            let mut node = Node {
                name: format!("n{i}"),
                client,
                monitor,
                args,
                log: root.join(format!("nats-n{i}.log")),
                child: None,
            };
            node.spawn();
            nodes.push(node);
        }
        let c = Cluster { nodes };
        c.wait_ready(Duration::from_secs(30));
        c
    }

    /// `host:port` of every server (what `--store nats://` lists).
    pub fn servers(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.to_string()).collect()
    }

    /// The `--store` value naming every server.
    pub fn url(&self) -> String {
        format!("nats://{}", self.servers().join(","))
    }

    /// Waits until every running server answers `/healthz` with ok and
    /// one of them knows the meta leader.
    pub fn wait_ready(&self, timeout: Duration) {
        wait_for(timeout, || {
            let live: Vec<&Node> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
            let healthy = live
                .iter()
                .all(|n| n.get("/healthz").is_some_and(|v| v["status"] == "ok"));
            let leader = live.iter().any(|n| {
                n.get("/jsz")
                    .and_then(|v| v["meta_cluster"]["leader"].as_str().map(str::to_owned))
                    .is_some_and(|l| !l.is_empty())
            });
            (healthy && leader).then_some(())
        })
        .unwrap_or_else(|| panic!("nats cluster not ready in {timeout:?}: {}", self.logs()));
    }

    /// The index of the server leading `stream`'s replicas, as a running
    /// server reports it.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let leader = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| {
                let v = n.get("/jsz?accounts=true&streams=true")?;
                v["account_details"]
                    .as_array()?
                    .iter()
                    .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                    .find(|s| s["name"] == stream)
                    .and_then(|s| s["cluster"]["leader"].as_str().map(str::to_owned))
            })?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// How many servers hold `stream` (leader and replicas), as a running
    /// server reports it.
    pub fn stream_servers(&self, stream: &str) -> Option<usize> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| {
                let v = n.get("/jsz?accounts=true&streams=true")?;
                let s = v["account_details"]
                    .as_array()?
                    .iter()
                    .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                    .find(|s| s["name"] == stream)?;
                let replicas = s["cluster"]["replicas"].as_array().map_or(0, Vec::len);
                s["cluster"]["leader"].as_str().map(|_| 1 + replicas)
            })
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            kill(&mut c);
        }
    }

    /// Every server's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    std::fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("nats log");
        let child = Command::new("nats-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
    }

    /// GET on the monitoring port, as JSON.
    fn get(&self, path: &str) -> Option<Value> {
        let mut s = TcpStream::connect_timeout(&self.monitor, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let (_, body) = buf.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                kill(&mut c);
            }
        }
    }
}
