//! Operations: what an operator asks a running spoke through the admin
//! socket (status, probes, guarantee vectors, evidence, drills, the config
//! dump) and the survival horizon they see.
//!
//! Who drives it: the admin socket (`tidemesh-spoke status`, `probe`,
//! `vector`, `evidence ...`, `drill load`). What it must not do: change the
//! spoke's state (drills only append tagged records).

use super::*;

/// `evidence verify` as JSON: `ok`, `records`, `from_seq`, `to_seq`,
/// `shed_records`, and on a break `broken_seq` and `error`.
pub(crate) fn verify_json(b: &buffer::EvidenceBuffer) -> Value {
    match b.verify() {
        Ok(v) => json!({
            "ok": true,
            "records": v.records(),
            "from_seq": v.start().next_seq.get(),
            "to_seq": v.end().last_seq(),
            "shed_records": v.shed_records(),
            "dropped": v.dropped(),
        }),
        Err(buffer::BufferError::ChainBroken(e)) => json!({
            "ok": false,
            "broken_seq": e.seq.get(),
            "error": e.to_string(),
        }),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

/// `config dump`: the last-known-good config as `format` (`yaml` or
/// `json`) text, with its version and when the hub made it and this spoke
/// applied it.
fn config_dump_json(applied: &replica::Applied, config: &MeshConfig, format: &str) -> Value {
    let text = match format {
        "json" => config.to_json(),
        _ => config.to_yaml(),
    };
    json!({
        "version": applied.version,
        "hub_applied": rfc3339_ms(applied.hub_applied_ms),
        "applied": rfc3339_ms(applied.applied_ms),
        "text": text,
    })
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `config dump` of a spoke that is not running: reads `spoke.db` directly
/// (the same check a starting spoke makes: it must decode and compile).
pub fn config_dump_offline(data_dir: &Path, format: &str) -> Result<Value, SpokeError> {
    let path = data_dir.join("spoke.db");
    if !path.exists() {
        return Err(SpokeError::Invalid(format!(
            "{} does not exist (has the spoke run?)",
            path.display()
        )));
    }
    let replica =
        replica::Replica::open(data_dir).map_err(|e| SpokeError::Invalid(e.to_string()))?;
    let applied = replica
        .last_known_good()
        .map_err(|e| SpokeError::Invalid(e.to_string()))?
        .ok_or_else(|| SpokeError::Invalid("no config has been applied yet".into()))?;
    let c = ConfigInForce::check(applied)?;
    Ok(config_dump_json(&c.applied, &c.config, format))
}

/// Verifies `evidence.db` of a spoke that is not running (opening it
/// without the tail check, so a damaged file is reported, not refused).
pub fn verify_evidence_offline(data_dir: &Path) -> Result<Value, SpokeError> {
    let ident = CredStore::new(data_dir).identity()?;
    let path = data_dir.join("evidence.db");
    if !path.exists() {
        return Err(SpokeError::Invalid(format!(
            "{} does not exist (has the spoke run?)",
            path.display()
        )));
    }
    let cfg = buffer::BufferConfig {
        tail_check: 0,
        ..Default::default()
    };
    let b = buffer::EvidenceBuffer::open(&path, &ident.id, cfg)
        .map_err(|e| SpokeError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(verify_json(&b))
}

impl Spoke {
    /// The survival horizon now (see [`survival`]).
    pub fn horizon(&self) -> survival::Horizon {
        let now = self.inner.clock.now();
        let cur = self.inner.creds.current();
        let connected = self.state() == State::Connected;
        let last_contact = if connected {
            Some(now)
        } else {
            self.inner
                .live
                .lock()
                .ok()
                .and_then(|l| l.last_contact_ms)
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        };
        let evidence = self.inner.evidence.get().map(|b| {
            let st = b.stats(tidemesh_evidence::UnixMillis(unix_ms(now)));
            let rate = self
                .inner
                .evidence_rate
                .lock()
                .map(|r| r.bytes_per_s())
                .unwrap_or(0.0);
            (st.capacity_bytes, st.pending_bytes, rate)
        });
        survival::horizon(&survival::Inputs {
            now: Some(now),
            node_ca_not_after: cur.node_ca.map(|f| f.not_after),
            last_contact,
            max_offline: self
                .inner
                .creds
                .policy()
                .map(|p| Duration::from_millis(p.max_offline_ms)),
            evidence,
            drift_budget: Some(self.inner.tclock.drift_budget()),
        })
    }

    /// Probes the same-site endpoints of `service` as local workload
    /// `account` over the data tunnel (mTLS with the workload's SVID): one
    /// JSON object per endpoint (see `dataplane::probe_site`).
    pub async fn probe(&self, account: &str, service: &str) -> Result<Value, String> {
        let data = self
            .inner
            .data
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or("the data plane is not running (no data_listen, outbound or tcp_outbound in the config)")?;
        Ok(Value::Array(
            dataplane::probe_site(&data, account, service).await?,
        ))
    }

    /// `evidence stats` of the running spoke (buffer and sync), if the
    /// buffer is open.
    pub fn evidence_stats(&self) -> Option<Value> {
        let b = self.inner.evidence.get()?;
        let now = tidemesh_evidence::UnixMillis(unix_ms(self.inner.clock.now()));
        let mut v = serde_json::to_value(b.stats(now)).ok()?;
        let sync = serde_json::to_value(self.sync_stats()).ok()?;
        if let (Some(o), Value::Object(s)) = (v.as_object_mut(), sync) {
            o.extend(s);
        }
        Some(v)
    }

    /// The status document (`tidemesh-spoke status --json`).
    pub fn status(&self) -> Value {
        let now = self.inner.clock.now();
        let hub = self.current_hub();
        let (state, last_error, last_contact_ms) = match self.inner.live.lock() {
            Ok(l) => (l.state, l.last_error.clone(), l.last_contact_ms),
            Err(_) => (State::Disconnected, None, None),
        };
        let cfg = self
            .inner
            .config
            .borrow()
            .as_ref()
            .map(|c| c.applied.clone());
        let checked = self.inner.config_checked_ms.lock().ok().and_then(|c| *c);
        let connected = state == State::Connected;
        let last_contact = if connected {
            Some(now)
        } else {
            last_contact_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        };
        let cur = self.inner.creds.current();
        let node = &cur.node;
        let workloads: Vec<Value> = self
            .inner
            .cfg
            .file
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let s = cur.workloads.get(i).cloned().flatten();
                json!({
                    "service_account": w.service_account,
                    "id": s.as_ref().map(|s| s.id.to_string()),
                    "cert_not_after": s.as_ref().map(|s| rfc3339(s.not_after)),
                    "issued_by": s.as_ref().and_then(|s| s.chain.get(1)).and_then(|c| svid::cert_spiffe_id(c).ok()).map(|id| format!("node CA {id}")),
                })
            })
            .collect();
        let horizon = self.horizon();
        let revocations = self.inner.creds.revocations().current();
        let ca_error = self.inner.creds.last_error();
        json!({
            "id": self.inner.ident.id.to_string(),
            "connected": connected,
            "state": state,
            // the address the control session dials (or last reached)
            "hub": hub,
            "hubs": &self.inner.hubs,
            "cert_not_after": rfc3339(node.not_after),
            "cert_time_left_s": node.not_after.duration_since(now).map(|d| d.as_secs() as i64).unwrap_or_else(|e| -(e.duration().as_secs() as i64)),
            "cert_expired": node.expired(now),
            "node_ca_not_after": cur.node_ca.map(|f| rfc3339(f.not_after)),
            "node_ca_expired": cur.node_ca.map(|f| now >= f.not_after),
            "issue_error": ca_error,
            "last_contact": last_contact.map(rfc3339),
            "last_contact_age_s": last_contact.map(|t| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0)),
            "last_error": last_error,
            "workloads": workloads,
            "mode": self.inner.modes.view().spoke,
            "modes": &*self.inner.modes.view(),
            "survival_horizon_s": horizon.survival_horizon_s,
            "survival_limit": horizon.survival_limit,
            "survival_budgets": horizon.survival_budgets,
            "time_trust": self.inner.tclock.status(),
            "revocation_version": revocations.as_ref().map_or(0, |l| l.version),
            "revocation_issued_at": revocations.as_ref().filter(|l| l.version > 0).map(|l| rfc3339(UNIX_EPOCH + Duration::from_millis(l.issued_ms))),
            // While connected the hub pushes every new list at once; offline,
            // a revocation made since the last contact is not known here.
            "revocation_stale_s": if connected { Some(0) } else { last_contact.map(|t| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0)) },
            "config_version": cfg.as_ref().map(|a| a.version),
            "config_age_s": cfg.as_ref().map(|a| now.duration_since(UNIX_EPOCH + Duration::from_millis(a.hub_applied_ms)).map(|d| d.as_secs()).unwrap_or(0)),
            "config_applied_at": cfg.as_ref().map(|a| rfc3339(UNIX_EPOCH + Duration::from_millis(a.applied_ms))),
            "config_checked_at": checked.map(|ms| rfc3339(UNIX_EPOCH + Duration::from_millis(ms))),
            // JWT key sets in force (RequestAuthentication): verified here,
            // with the hub unreachable too; refreshed only by an apply.
            "request_authentication": self.inner.config.borrow().as_ref().map(|c| c.jwks_status(unix_ms(now))).unwrap_or_default(),
            "local_endpoints": self.local_endpoints().iter().map(|e| json!({
                "service_account": e.service_account,
                "service": e.service,
                "address": e.address,
                "healthy": e.healthy,
            })).collect::<Vec<_>>(),
            "registry": self.local_registry(),
            "registration_error": self.inner.registration_error.lock().ok().and_then(|e| e.clone()),
            // Whether evidence is being stored: `degraded` while commits
            // fail (disk full, I/O errors), `lost` by reason since start.
            "evidence": self.inner.evidence.get().map(|b| {
                let st = b.stats(tidemesh_evidence::UnixMillis(unix_ms(now)));
                json!({
                    "degraded": st.degraded,
                    "failed": st.failed,
                    "lost": st.lost,
                    "lost_total": st.lost.total(),
                    "truncated_records": st.truncated_records,
                    "write_failures": st.write_failures,
                })
            }),
        })
    }

    /// The endpoints this spoke can route to without the hub: its own
    /// healthy local workloads (an unhealthy one leaves at once, hub or no
    /// hub) and the healthy endpoints of other spokes at its site from the
    /// last slice.
    pub fn local_registry(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .local_endpoints()
            .into_iter()
            .filter(|e| e.healthy)
            .map(|e| json!({"service": e.service, "service_account": e.service_account, "address": e.address, "origin": "local"}))
            .collect();
        out.extend(
            self.site_workloads()
                .iter()
                .map(|w| json!({"service": w.service, "service_account": w.service_account, "address": w.address, "origin": "site"})),
        );
        out
    }

    /// Appends synthetic request records tagged as drill records at `rate`
    /// per second for `duration`, then waits for their commit: load for
    /// drills on devices without real traffic.
    pub(crate) async fn drill_load(&self, rate: f64, duration: Duration) -> Result<Value, String> {
        if !(rate > 0.0 && rate <= 100_000.0) {
            return Err(format!(
                "rate {rate}: must be between 0 and 100000 records/s"
            ));
        }
        if duration.is_zero() || duration > Duration::from_secs(24 * 3600) {
            return Err("duration must be between 1 ms and 24 h".into());
        }
        let b = self
            .inner
            .evidence
            .get()
            .ok_or("the evidence buffer is not open")?;
        let run = format!("drill-{}", unix_ms(self.inner.clock.now()));
        let period = Duration::from_secs_f64(1.0 / rate);
        let start = tokio::time::Instant::now();
        let total = (rate * duration.as_secs_f64()).floor() as u64;
        let (mut appended, mut refused) = (0u64, 0u64);
        let mut last_ticket = None;
        for i in 0..total {
            tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
            let now = tidemesh_evidence::UnixMillis(unix_ms(self.inner.clock.now()));
            let body = tidemesh_evidence::samples::drill_request(&run, i, now);
            match b.append(tidemesh_evidence::NewRecord::new(now, body)) {
                Ok(t) => {
                    appended += 1;
                    last_ticket = Some(t);
                }
                Err(_) => refused += 1,
            }
        }
        // Group commits are written in order by one writer: once the last
        // drill record is durable, every earlier accepted one is too.
        let last = match last_ticket {
            Some(t) => Some(t.committed().await.map_err(|e| e.to_string())?.get()),
            None => None,
        };
        let committed = if last.is_some() { appended } else { 0 };
        Ok(
            json!({"run": run, "appended": appended, "committed": committed, "refused": refused, "last_seq": last}),
        )
    }

    /// The guarantee vector of `service` now (see `dataplane::vector`).
    pub fn vector(&self, service: &str) -> Result<Value, String> {
        let data = self
            .inner
            .data
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or("the data plane is not running (no data_listen, outbound or tcp_outbound in the config)")?;
        let mut v = dataplane::vector::vector(&data, service)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("spoke".into(), json!(self.inner.ident.id.to_string()));
            o.insert("config_version".into(), json!(self.config_version()));
        }
        Ok(v)
    }

    pub(crate) async fn admin(&self, req: Value) -> Result<Value, String> {
        match req.get("cmd").and_then(Value::as_str) {
            Some("drill_load") => {
                let rate = req.get("rate").and_then(Value::as_f64).unwrap_or(0.0);
                let duration_ms = req.get("duration_ms").and_then(Value::as_u64).unwrap_or(0);
                self.drill_load(rate, Duration::from_millis(duration_ms))
                    .await
            }
            Some("status") => Ok(self.status()),
            Some("config_dump") => {
                let format = req.get("format").and_then(Value::as_str).unwrap_or("yaml");
                let c = self
                    .inner
                    .config
                    .borrow()
                    .clone()
                    .ok_or("no config has been applied yet")?;
                Ok(config_dump_json(&c.applied, &c.config, format))
            }
            Some("vector") => {
                let service = req.get("service").and_then(Value::as_str);
                match service {
                    Some(svc) => self.vector(svc),
                    None => {
                        // every service this spoke could route to
                        let hosts = self
                            .inner
                            .data
                            .get()
                            .and_then(std::sync::Weak::upgrade)
                            .map(|d| dataplane::vector::hosts(&d))
                            .unwrap_or_default();
                        let mut out = Vec::new();
                        for h in hosts {
                            out.push(self.vector(&h)?);
                        }
                        Ok(Value::Array(out))
                    }
                }
            }
            Some("probe") => {
                let account = req.get("workload").and_then(Value::as_str).unwrap_or("");
                let service = req.get("service").and_then(Value::as_str).unwrap_or("");
                self.probe(account, service).await
            }
            Some("evidence_stats") => self
                .evidence_stats()
                .ok_or_else(|| "the evidence buffer is not open".into()),
            Some("evidence_verify") => {
                let b = self
                    .inner
                    .evidence
                    .get()
                    .ok_or("the evidence buffer is not open")?
                    .clone();
                tokio::task::spawn_blocking(move || verify_json(&b))
                    .await
                    .map_err(|e| e.to_string())
            }
            Some("evidence_tail") => {
                let b = self
                    .inner
                    .evidence
                    .get()
                    .ok_or("the evidence buffer is not open")?;
                let n = req
                    .get("n")
                    .and_then(Value::as_u64)
                    .unwrap_or(10)
                    .min(10_000) as usize;
                let recs = b.tail(n).map_err(|e| e.to_string())?;
                serde_json::to_value(recs).map_err(|e| e.to_string())
            }
            other => Err(format!("unknown admin command {other:?}")),
        }
    }
}
