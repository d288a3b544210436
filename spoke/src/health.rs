//! Health: the spoke's own active checks of its local workloads (kept with
//! or without the hub; an unhealthy endpoint leaves the registry at once)
//! and the reachability the mode machine measures (site peers by probe,
//! the hub by its control session).
//!
//! Who drives it: loops spawned by [`crate::Spoke::run`]. What it must not
//! do: decide modes (the mode machine does) or block on a slow workload
//! (every probe is bounded to one second).

use super::*;

/// [`http_health`] for an HTTP/2 (prior knowledge) workload.
pub(crate) async fn http2_health(addr: SocketAddr, path: &str) -> bool {
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .ok()?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{addr}{path}"))
            .header(hyper::header::USER_AGENT, "tidemesh-health")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .ok()?;
        let ok = send.send_request(req).await.ok()?.status().is_success();
        driver.abort();
        Some(ok)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}

/// One HTTP/1.1 health probe: GET `path` on `addr`, healthy on a 2xx status
/// line within one second.
pub(crate) async fn http_health(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tidemesh-health\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut buf[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code = line.split_whitespace().nth(1)?;
        Some(code.starts_with('2') && line.starts_with("HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}

impl Spoke {
    /// This spoke's local endpoints with their current health.
    pub(crate) fn local_endpoints(&self) -> Vec<tidemesh_proto::RegisteredEndpoint> {
        let health = self.inner.health.borrow().clone();
        let advertise = self.inner.cfg.file.data_advertise;
        self.inner
            .cfg
            .file
            .workloads
            .iter()
            .map(|w| tidemesh_proto::RegisteredEndpoint {
                service_account: w.service_account.clone(),
                service: w
                    .service
                    .clone()
                    .unwrap_or_else(|| w.service_account.clone()),
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                address: advertise
                    .or(w.inbound)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                healthy: health.get(&w.service_account).copied().unwrap_or(false),
            })
            .collect()
    }

    /// Checks every local workload that declares a health path: an HTTP GET
    /// on its inbound address, healthy on a 2xx answer within a second.
    pub(crate) async fn health_loop(&self) {
        let checked: Vec<(String, SocketAddr, String, bool)> = self
            .inner
            .cfg
            .file
            .workloads
            .iter()
            .filter_map(|w| {
                Some((
                    w.service_account.clone(),
                    w.inbound?,
                    w.health.clone()?,
                    w.protocol == config::WorkloadProtocol::Http2,
                ))
            })
            .collect();
        if checked.is_empty() {
            return;
        }
        loop {
            for (account, addr, path, h2) in &checked {
                let ok = if *h2 {
                    http2_health(*addr, path).await
                } else {
                    http_health(*addr, path).await
                };
                let changed = self.inner.health.send_if_modified(|h| {
                    if h.get(account) == Some(&ok) {
                        return false;
                    }
                    let mut n = (**h).clone();
                    n.insert(account.clone(), ok);
                    *h = Arc::new(n);
                    true
                });
                if changed {
                    info!(workload = %account, healthy = ok, "local endpoint health changed");
                }
            }
            tokio::time::sleep(self.inner.cfg.health_interval).await;
        }
    }

    /// How often reachability is measured and the hub health-checked: half
    /// the time the mode matrix allows per needed check (seed: 2 min / 10
    /// checks → every 6 s).
    pub(crate) fn check_interval(&self) -> Duration {
        let r = self
            .inner
            .modes
            .matrix()
            .map(|m| m.reconnection)
            .unwrap_or_default();
        (r.window / (2 * r.health_checks.max(1)))
            .clamp(Duration::from_millis(200), Duration::from_secs(60))
    }

    /// Measures reachability for the mode machine for as long as the spoke
    /// runs: the site's peer spokes by a probe each, the hub by its control
    /// session (a missing session is a failed health check; the session's
    /// pings are the passing ones).
    pub(crate) async fn reachability_loop(&self) {
        loop {
            tokio::time::sleep(self.check_interval()).await;
            if let Some(data) = self.inner.data.get().and_then(std::sync::Weak::upgrade) {
                let (up, total) = dataplane::probe_peers(&data).await;
                if let Ok(mut r) = self.inner.site_reach.lock() {
                    *r = (up, total);
                }
            }
            if !self.hub_connected() {
                self.inner.modes.health_check(false);
            }
            self.report_reachability();
        }
    }
}
