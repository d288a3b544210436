//! Foundation end to end: enrollment, join tokens, revocation, hub outages,
//! renewal and re-establishment, with the real binaries on loopback; and
//! hostile control input against an in-process hub.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use tidemesh_identity::{clock::SystemClock, naming, svid, verify, SpiffeId};
use tidemesh_proto::{close, ErrorCode, Request, Response, ALPN_CTL};
use tidemesh_tests::{bin, run, text, wait_for, HubProc, SpokeProc};

const TD: &str = "edge.example";

fn node(store: &str, n: &str) -> String {
    format!("spiffe://{TD}/store/{store}/node/{n}")
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn enroll_connects_lists_and_exports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    assert_eq!(mode(&hub.dir.join("ca_key.pem")), 0o600);
    // init refuses to overwrite
    let again = run(Command::new(bin("tidemesh-hub"))
        .args(["init", "--trust-domain", TD, "--data-dir"])
        .arg(&hub.dir));
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );

    let addr = hub.start();
    let id = node("sf01", "n1");
    let token = hub.token(&id, "10m");
    let cfg = tmp.path().join("spoke.toml");
    std::fs::write(&cfg, "[[workload]]\nservice_account = \"pos\"\n").expect("config");
    let mut spoke =
        SpokeProc::new(tmp.path(), "s1", &id).with_args(&["--config", cfg.to_str().expect("utf8")]);
    let o = spoke.enroll(addr, &token);
    assert!(o.status.success(), "enroll: {}", text(&o));
    assert_eq!(mode(&spoke.dir.join("node_key.pem")), 0o600);
    spoke.start();
    let st = spoke.wait_state("connected", Duration::from_secs(10));
    assert_eq!(st["connected"], true);
    assert_eq!(st["id"], id.as_str());
    assert!(
        st["cert_not_after"].is_string() && st["last_contact"].is_string(),
        "{st}"
    );

    let row = wait_for(Duration::from_secs(5), || {
        hub.spoke(&id).filter(|r| r["connected"] == true)
    })
    .expect("hub lists the spoke as connected");
    assert!(
        row["last_seen"].is_string() && row["cert_not_after"].is_string(),
        "{row}"
    );
    assert_eq!(mode(&hub.dir.join("admin.sock")), 0o600);

    // the workload SVID arrives and exports for local apps
    wait_for(Duration::from_secs(5), || {
        spoke.status()["workloads"][0]["id"]
            .as_str()
            .map(str::to_owned)
    })
    .expect("workload SVID issued");
    // evidence: drill load appends durably; stats survive a SIGKILL
    let o = run(Command::new(bin("tidemesh-spoke"))
        .args([
            "drill",
            "load",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--data-dir",
        ])
        .arg(&spoke.dir));
    assert!(o.status.success(), "drill load: {}", text(&o));
    assert!(
        text(&o).contains("appended 200, committed 200"),
        "{}",
        text(&o)
    );
    let stats = |spoke: &SpokeProc| -> serde_json::Value {
        let o = run(Command::new(bin("tidemesh-spoke"))
            .args(["evidence", "stats", "--json", "--data-dir"])
            .arg(&spoke.dir));
        assert!(o.status.success(), "evidence stats: {}", text(&o));
        serde_json::from_slice(&o.stdout).expect("json")
    };
    let before = stats(&spoke);
    for k in [
        "last_committed_seq",
        "last_acked_seq",
        "pending_records",
        "pending_bytes",
        "shed_records",
        "oldest_pending_age_s",
    ] {
        assert!(before[k].is_u64(), "{k} missing: {before}");
    }
    assert!(
        before["last_committed_seq"].as_u64().unwrap_or(0) >= 200,
        "{before}"
    );
    spoke.kill();
    spoke.start();
    let after = stats(&spoke);
    assert!(
        after["last_committed_seq"].as_u64() >= before["last_committed_seq"].as_u64(),
        "{before} -> {after}"
    );
    spoke.wait_state("connected", Duration::from_secs(10));

    for (args, want) in [
        (vec![], id.clone()),
        (
            vec!["--workload", "pos"],
            format!("spiffe://{TD}/store/sf01/sa/pos"),
        ),
    ] {
        let out = tmp.path().join(format!("export{}", args.len()));
        let o = run(Command::new(bin("tidemesh-spoke"))
            .args(["svid", "export", "--data-dir"])
            .arg(&spoke.dir)
            .arg("--out")
            .arg(&out)
            .args(&args));
        assert!(o.status.success(), "export: {}", text(&o));
        let chain = svid::pem_certs(&std::fs::read_to_string(out.join("svid.pem")).expect("svid"))
            .expect("pem");
        assert_eq!(
            svid::cert_spiffe_id(&chain[0]).expect("id").to_string(),
            want
        );
        assert_eq!(mode(&out.join("svid_key.pem")), 0o600);
        let key = std::fs::read_to_string(out.join("svid_key.pem")).expect("key");
        assert!(key.contains("BEGIN PRIVATE KEY"), "PKCS#8 expected");
        assert!(out.join("bundle.pem").exists());
    }
}

#[test]
fn join_tokens_are_single_use_expire_bind_and_race() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let addr = hub.start();

    // reuse
    let t1 = hub.token(&node("s", "a"), "10m");
    let o = SpokeProc::new(tmp.path(), "a", &node("s", "a")).enroll(addr, &t1);
    assert!(o.status.success(), "{}", text(&o));
    let reuse = SpokeProc::new(tmp.path(), "a2", &node("s", "a")).enroll(addr, &t1);
    assert!(!reuse.status.success());
    let reuse_msg = text(&reuse);
    assert!(reuse_msg.contains("invalid join token"), "{reuse_msg}");

    // unknown token: the very same error as a used one
    let unknown = t1.replace(&t1[t1.len() - 129..t1.len() - 65], &"ab".repeat(32));
    assert_ne!(unknown, t1);
    let o = SpokeProc::new(tmp.path(), "u", &node("s", "a")).enroll(addr, &unknown);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("invalid join token: unknown, already used or expired"),
        "{}",
        text(&o)
    );

    // expired, and burned
    let t2 = hub.token(&node("s", "b"), "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let o = SpokeProc::new(tmp.path(), "b", &node("s", "b")).enroll(addr, &t2);
    assert!(!o.status.success());
    assert!(text(&o).contains("invalid join token"), "{}", text(&o));

    // bound to another ID: refused and burned
    let t3 = hub.token(&node("s", "c"), "10m");
    let forged = t3.replace(&node("s", "c"), &node("s", "d"));
    let o = SpokeProc::new(tmp.path(), "d", &node("s", "d")).enroll(addr, &forged);
    assert!(!o.status.success());
    assert!(text(&o).contains("bound to another spoke"), "{}", text(&o));
    let o = SpokeProc::new(tmp.path(), "c", &node("s", "c")).enroll(addr, &t3);
    assert!(
        !o.status.success(),
        "a token misused for another ID is burned"
    );

    // garbage
    let o = SpokeProc::new(tmp.path(), "g", &node("s", "g")).enroll(addr, "hello");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a tidemesh join token"),
        "{}",
        text(&o)
    );

    // two spokes race on one token: exactly one wins
    for round in 0..3 {
        let t = hub.token(&node("r", &format!("n{round}")), "10m");
        let spawn = |name: &str| {
            Command::new(bin("tidemesh-spoke"))
                .args([
                    "enroll",
                    "--hub",
                    &addr.to_string(),
                    "--token",
                    &t,
                    "--data-dir",
                ])
                .arg(tmp.path().join(format!("{name}{round}")))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let (x, y) = (spawn("x"), spawn("y"));
        let (ox, oy) = (
            x.wait_with_output().expect("x"),
            y.wait_with_output().expect("y"),
        );
        let wins = [&ox, &oy].iter().filter(|o| o.status.success()).count();
        assert_eq!(wins, 1, "round {round}: {} / {}", text(&ox), text(&oy));
    }
    let enrolled: Vec<_> = hub
        .audit()
        .into_iter()
        .filter(|(e, _)| e == "enrolled")
        .collect();
    assert_eq!(enrolled.len(), 4, "{enrolled:?}");
}

#[test]
fn revoked_spoke_is_cut_off_and_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let addr = hub.start();
    let id = node("sf02", "n1");
    let mut spoke = SpokeProc::new(tmp.path(), "s", &id);
    assert!(spoke.enroll(addr, &hub.token(&id, "10m")).status.success());
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(10));

    let t0 = Instant::now();
    let o = hub.cli(&["revoke", "--spoke", &id]);
    assert!(o.status.success(), "{}", text(&o));
    spoke.wait_state("revoked", Duration::from_secs(3));
    eprintln!("revocation reached the spoke in {:?}", t0.elapsed());
    let row = hub.spoke(&id).expect("listed");
    assert_eq!(row["connected"], false);
    assert_eq!(row["revoked"], true);

    // a restarted spoke cannot get back in
    spoke.kill();
    spoke.start();
    std::thread::sleep(Duration::from_secs(4));
    let st = spoke.status();
    assert_eq!(st["connected"], false, "{st}");
    assert!(st["last_error"].is_string(), "{st}");
    assert_eq!(hub.spoke(&id).expect("listed")["connected"], false);

    // renewal and re-establishment are refused too (library level, same files)
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let creds = tidemesh_spoke::CredStore::new(&spoke.dir);
        // TLS 1.3: the client finishes its handshake before the hub has
        // checked the client certificate, so the refusal shows on first use.
        if let Ok(c) = ctl_session(addr, &creds, true).await {
            let sid: SpiffeId = id.parse().expect("id");
            let csr = svid::make_csr(&creds.node().expect("node").key, &sid).expect("csr");
            let r = tidemesh_net::request::<_, Response>(
                &c,
                &Request::Renew { csr },
                Duration::from_secs(5),
            )
            .await;
            assert!(r.is_err(), "renewal must fail for a revoked spoke: {r:?}");
        }
        let resp = reestablish_on_fresh_conn(addr, &spoke.dir).await;
        assert!(
            matches!(
                resp,
                Response::Error {
                    code: ErrorCode::Revoked,
                    ..
                }
            ),
            "{resp:?}"
        );
    });
    assert!(hub.audit().iter().any(|(e, s)| e == "revoked" && s == &id));
}

#[test]
fn hub_outage_spoke_serves_from_cache_and_recovers_with_renewal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&["--node-ttl", "16s"]);
    let addr = hub.start();
    let id = node("sf03", "n1");
    let mut spoke = SpokeProc::new(tmp.path(), "s", &id);
    assert!(spoke.enroll(addr, &hub.token(&id, "10m")).status.success());
    spoke.start();
    let first = spoke.wait_state("connected", Duration::from_secs(10));

    hub.kill();
    let t0 = Instant::now();
    spoke.wait_state("disconnected", Duration::from_secs(9));
    eprintln!("disconnection noticed after {:?}", t0.elapsed());

    // restart while the hub is down: runs from the cache
    spoke.kill();
    spoke.start();
    let st = spoke.wait_state("disconnected", Duration::from_secs(10));
    assert_eq!(st["id"], id.as_str());
    assert_eq!(st["connected"], false);
    assert!(st["last_contact"].is_string(), "{st}");

    // hub back: reconnects and renews, no restart
    hub.start();
    let t1 = Instant::now();
    spoke.wait_state("connected", Duration::from_secs(8));
    eprintln!("reconnected {:?} after the hub came back", t1.elapsed());
    let renewed = wait_for(Duration::from_secs(20), || {
        let s = spoke.status();
        (s["cert_not_after"] != first["cert_not_after"]).then_some(s)
    })
    .expect("node SVID renewed without a restart");
    assert_eq!(renewed["connected"], true);
    assert!(hub.audit().iter().any(|(e, s)| e == "renewed" && s == &id));
}

#[test]
fn expired_certificate_reestablishes_within_window_and_not_past_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // within the window
    let mut hub = HubProc::init(&tmp.path().join("a"), TD).with_args(&[
        "--node-ttl",
        "3s",
        "--max-offline",
        "1h",
    ]);
    let addr = hub.start();
    let id = node("sf04", "n1");
    let mut spoke = SpokeProc::new(tmp.path(), "s", &id);
    assert!(spoke.enroll(addr, &hub.token(&id, "10m")).status.success());
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(10));
    hub.kill();
    spoke.wait_state("disconnected", Duration::from_secs(9));
    wait_for(Duration::from_secs(10), || {
        (spoke.status()["cert_expired"] == true).then_some(())
    })
    .expect("certificate expires during the outage");
    hub.start();
    let st = spoke.wait_state("connected", Duration::from_secs(10));
    assert_eq!(st["cert_expired"], false, "{st}");
    assert!(hub
        .audit()
        .iter()
        .any(|(e, s)| e == "reestablished" && s == &id));
    spoke.kill();
    hub.kill();

    // past the window
    let mut hub = HubProc::init(&tmp.path().join("b"), TD).with_args(&[
        "--node-ttl",
        "3s",
        "--max-offline",
        "2s",
    ]);
    let addr = hub.start();
    let id = node("sf04", "n2");
    let mut spoke = SpokeProc::new(tmp.path(), "s2", &id);
    assert!(spoke.enroll(addr, &hub.token(&id, "10m")).status.success());
    spoke.start();
    spoke.wait_state("connected", Duration::from_secs(10));
    hub.kill();
    wait_for(Duration::from_secs(10), || {
        (spoke.status()["cert_expired"] == true).then_some(())
    })
    .expect("certificate expires during the outage");
    hub.start();
    let st = spoke.wait_state("needs_enrollment", Duration::from_secs(10));
    let err = st["last_error"].as_str().unwrap_or("");
    assert!(
        err.contains("max-offline window") && err.contains("new join token"),
        "{err}"
    );
    assert!(hub.audit().iter().any(|(e, s)| e == "refused" && s == &id));
}

// ---- in-process helpers -------------------------------------------------

async fn ctl_session(
    addr: SocketAddr,
    creds: &tidemesh_spoke::CredStore,
    with_cert: bool,
) -> Result<quinn::Connection, tidemesh_net::NetError> {
    let ident = creds.identity().expect("identity");
    let td = ident.id.trust_domain().clone();
    let bundle = creds.bundle(&td).expect("bundle");
    let authz = Arc::new(verify::ExactId(naming::hub_id(&td)));
    let tls = if with_cert {
        let n = creds.node().expect("node");
        verify::client_config(
            bundle,
            n.chain.clone(),
            &n.key,
            authz,
            Arc::new(SystemClock),
            &[ALPN_CTL],
        )
    } else {
        verify::client_config_no_cert(bundle, authz, Arc::new(SystemClock), &[ALPN_CTL])
    }
    .expect("tls");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let ep = tidemesh_net::quic::endpoint(tidemesh_net::quic::wrap_socket(sock)?, None)?;
    let cfg = tidemesh_net::QuicSettings::default().client_config(tls)?;
    let conn = ep
        .connect_with(cfg, addr, "hub.test")
        .map_err(|e| tidemesh_net::NetError::Tls(e.to_string()))?
        .await?;
    Ok(conn)
}

async fn reestablish_on_fresh_conn(addr: SocketAddr, dir: &std::path::Path) -> Response {
    let creds = tidemesh_spoke::CredStore::new(dir);
    let id = creds.identity().expect("identity").id;
    let key = creds.node().expect("node").key;
    let conn = ctl_session(addr, &creds, false)
        .await
        .expect("anonymous session");
    let challenge = tidemesh_net::reestablish_challenge(&conn, &id).expect("challenge");
    let proof = svid::sign(&key, &challenge).expect("sign");
    let csr = svid::make_csr(&key, &id).expect("csr");
    tidemesh_net::request(
        &conn,
        &Request::Reestablish {
            spoke: id,
            csr,
            proof,
        },
        Duration::from_secs(5),
    )
    .await
    .expect("answer")
}

struct InProc {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    hub: tidemesh_hub::Hub,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn in_process_hub() -> InProc {
    in_process_hub_with(tidemesh_hub::HubConfig::default()).await
}

async fn in_process_hub_with(cfg: tidemesh_hub::HubConfig) -> InProc {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("hub");
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    tidemesh_hub::init(&dir, &td, &SystemClock).expect("init");
    let hub = tidemesh_hub::Hub::open(&dir, cfg, Arc::new(SystemClock)).expect("open");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let socket = tidemesh_net::quic::wrap_socket(sock).expect("wrap");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = hub.clone();
    tokio::spawn(async move {
        h.serve(socket, async {
            let _ = rx.await;
        })
        .await
        .expect("serve")
    });
    InProc {
        _tmp: tmp,
        dir,
        hub,
        addr,
        stop: Some(tx),
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn enroll_in_process(h: &InProc, dir: &std::path::Path, id: &str) {
    let token = h
        .hub
        .create_token(&id.parse().expect("id"), Duration::from_secs(60))
        .expect("token");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    tidemesh_spoke::enroll(
        dir,
        h.addr,
        &token.to_string(),
        false,
        tidemesh_net::quic::wrap_socket(sock).expect("wrap"),
        Arc::new(SystemClock),
        Default::default(),
    )
    .await
    .expect("enroll");
}

/// Workload SVIDs come from the spoke's node CA, never from the hub; the
/// node CA only issues its own store's workload IDs; and every
/// authenticated control request checks the connection's key against the
/// key pinned at enrollment (a certificate of an earlier enrollment of the
/// same ID, still valid, gets nothing).
#[tokio::test]
async fn workload_svids_come_from_the_node_ca_of_their_store_only() {
    let h = in_process_hub().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = node("sf05", "n1");
    enroll_in_process(&h, tmp.path(), &id).await;
    let creds = tidemesh_spoke::CredStore::new(tmp.path());
    let conn = ctl_session(h.addr, &creds, true).await.expect("session");
    let key = svid::generate_key().expect("key");

    // The hub issues no workload SVID any more.
    let wid: SpiffeId = format!("spiffe://{TD}/store/sf05/sa/pos")
        .parse()
        .expect("id");
    let resp: Response = tidemesh_net::request(
        &conn,
        &Request::IssueWorkload {
            id: wid.clone(),
            csr: svid::make_csr(&key, &wid).expect("csr"),
        },
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert!(
        matches!(resp, Response::Error { code: ErrorCode::BadRequest, ref message } if message.contains("node CA")),
        "{resp:?}"
    );

    // Enrollment gave the spoke a node CA; it issues its own store only.
    let ca = creds
        .node_ca()
        .expect("read")
        .expect("node CA from enrollment");
    assert_eq!(ca.node().to_string(), id);
    let now = std::time::SystemTime::now();
    for (wid, ok) in [
        (format!("spiffe://{TD}/store/sf05/sa/pos"), true),
        (format!("spiffe://{TD}/store/other/sa/pos"), false),
        (format!("spiffe://{TD}/store/sf05/node/n2"), false),
        ("spiffe://evil.example/store/sf05/sa/pos".to_owned(), false),
    ] {
        let wid: SpiffeId = wid.parse().expect("id");
        let r = ca.issue_workload(&key, &wid, now, now + Duration::from_secs(60));
        assert_eq!(r.is_ok(), ok, "{wid}: {r:?}");
    }

    // A renewal asks for a new node CA with a new key: issued and audited.
    let ca_key = svid::generate_key().expect("key");
    let resp: Response = tidemesh_net::request(
        &conn,
        &Request::IssueNodeCa {
            csr: svid::make_csr(&ca_key, &id.parse().expect("id")).expect("csr"),
        },
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    let Response::NodeCa { cert, policy } = resp else {
        panic!("{resp:?}")
    };
    let renewed = svid::NodeCa::new(cert.into(), ca_key).expect("a node CA for the new key");
    assert_eq!(renewed.node().to_string(), id);
    assert_eq!(
        Duration::from_millis(policy.max_offline_ms),
        tidemesh_hub::HubConfig::default().max_offline
    );
    let log = h.hub.store().audit_log().expect("audit");
    assert_eq!(
        log.iter()
            .filter(|(_, e)| e.event == "node_ca_issued")
            .count(),
        2,
        "{log:?}"
    );

    // The same ID enrolled again (new token, new key): the first
    // enrollment's node SVID is still within its dates, but its key is no
    // longer the pinned one, so no authenticated request succeeds with it.
    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).expect("dir");
    for f in ["spoke.json", "node.pem", "node_key.pem", "bundle.pem"] {
        std::fs::copy(tmp.path().join(f), old.join(f)).expect("copy");
    }
    let again = tmp.path().join("again");
    enroll_in_process(&h, &again, &id).await;
    let stale = ctl_session(h.addr, &tidemesh_spoke::CredStore::new(&old), true)
        .await
        .expect("the old certificate still passes the handshake");
    for req in [
        Request::IssueNodeCa {
            csr: svid::make_csr(
                &svid::generate_key().expect("key"),
                &id.parse().expect("id"),
            )
            .expect("csr"),
        },
        Request::TimeAnchor,
        Request::Hello {
            agent: "stale".into(),
        },
    ] {
        let resp: Response = tidemesh_net::request(&stale, &req, Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(
            matches!(
                resp,
                Response::Error {
                    code: ErrorCode::KeyMismatch,
                    ..
                }
            ),
            "{req:?}: {resp:?}"
        );
    }
}

#[tokio::test]
async fn hostile_control_input_gets_typed_errors_and_a_clean_close() {
    let h = in_process_hub().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = node("sf06", "n1");
    let dir = tmp.path().join("good");
    enroll_in_process(&h, &dir, &id).await;
    // a well-behaved spoke stays connected throughout
    let spoke = tidemesh_spoke::Spoke::open(
        &dir,
        tidemesh_spoke::SpokeConfig {
            admin_socket: false,
            ..Default::default()
        },
        Arc::new(SystemClock),
    )
    .expect("open");
    let sock =
        tidemesh_net::quic::wrap_socket(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .expect("wrap");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s2 = spoke.clone();
    let spoke_task = tokio::spawn(async move {
        s2.run(sock, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let connected = || spoke.status()["connected"] == true;
    let t0 = Instant::now();
    while !connected() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "spoke never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let creds = tidemesh_spoke::CredStore::new(&dir);

    async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<Response> {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(bytes).await.ok()?;
        let _ = send.finish();
        tidemesh_net::read_frame::<Response>(&mut recv).await.ok()
    }
    async fn closed_with(conn: &quinn::Connection) -> u32 {
        match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => c.error_code.into_inner() as u32,
            other => panic!("expected an application close, got {other:?}"),
        }
    }

    // malformed body
    let c = ctl_session(h.addr, &creds, false).await.expect("conn");
    let r = raw(&c, &[0, 0, 0, 4, 1, 0xff, 0xff, 0xff]).await;
    assert!(
        matches!(
            r,
            Some(Response::Error {
                code: ErrorCode::BadRequest,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(closed_with(&c).await, close::PROTOCOL_ERROR);
    // oversized: refused from the length prefix alone
    let c = ctl_session(h.addr, &creds, false).await.expect("conn");
    let r = raw(&c, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
    if let Some(Response::Error { message, .. }) = &r {
        assert!(message.contains("exceeds"), "{message}");
    }
    assert_eq!(closed_with(&c).await, close::PROTOCOL_ERROR);
    // wrong protocol version
    let c = ctl_session(h.addr, &creds, false).await.expect("conn");
    let r = raw(&c, &[0, 0, 0, 2, 9, 6]).await;
    assert!(matches!(r, Some(Response::Error { .. })), "{r:?}");
    assert_eq!(closed_with(&c).await, close::UNSUPPORTED_VERSION);
    // a garbage token and an anonymous renewal: typed refusals
    let c = ctl_session(h.addr, &creds, false).await.expect("conn");
    let key = svid::generate_key().expect("key");
    let other: SpiffeId = node("sf06", "n9").parse().expect("id");
    let resp: Response = tidemesh_net::request(
        &c,
        &Request::Enroll {
            token: "ab".repeat(32),
            spoke: other.clone(),
            csr: svid::make_csr(&key, &other).expect("csr"),
        },
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert!(
        matches!(
            resp,
            Response::Error {
                code: ErrorCode::InvalidToken,
                ..
            }
        ),
        "{resp:?}"
    );
    let resp: Response = tidemesh_net::request(
        &c,
        &Request::Renew { csr: vec![1, 2, 3] },
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert!(
        matches!(
            resp,
            Response::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{resp:?}"
    );
    // a replayed proof of possession (made on another connection) is refused
    let node_key = creds.node().expect("node").key;
    let sid: SpiffeId = id.parse().expect("id");
    let first = ctl_session(h.addr, &creds, false).await.expect("conn");
    let proof = svid::sign(
        &node_key,
        &tidemesh_net::reestablish_challenge(&first, &sid).expect("challenge"),
    )
    .expect("sign");
    let second = ctl_session(h.addr, &creds, false).await.expect("conn");
    let resp: Response = tidemesh_net::request(
        &second,
        &Request::Reestablish {
            spoke: sid.clone(),
            csr: svid::make_csr(&node_key, &sid).expect("csr"),
            proof,
        },
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert!(
        matches!(
            resp,
            Response::Error {
                code: ErrorCode::KeyMismatch,
                ..
            }
        ),
        "{resp:?}"
    );
    // a CSR with another key is refused even with a valid proof
    let other_key = svid::generate_key().expect("key");
    let third = ctl_session(h.addr, &creds, false).await.expect("conn");
    let proof = svid::sign(
        &node_key,
        &tidemesh_net::reestablish_challenge(&third, &sid).expect("challenge"),
    )
    .expect("sign");
    let resp: Response = tidemesh_net::request(
        &third,
        &Request::Reestablish {
            spoke: sid.clone(),
            csr: svid::make_csr(&other_key, &sid).expect("csr"),
            proof,
        },
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert!(
        matches!(
            resp,
            Response::Error {
                code: ErrorCode::KeyMismatch,
                ..
            }
        ),
        "{resp:?}"
    );

    // the good spoke never noticed
    assert!(connected(), "{}", spoke.status());
    let rows = h.hub.spokes().expect("spokes");
    assert!(rows.iter().any(|r| r.id == id && r.connected));
    let _ = stop_tx.send(());
    spoke_task.await.expect("join").expect("run");
}

/// Polls an in-process spoke's status until `f` holds (10 s at most).
async fn until(
    spoke: &tidemesh_spoke::Spoke,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let st = spoke.status();
        if f(&st) {
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A spoke may register only what its store's workloads may serve, within
/// bounds: a cloud service outside the mesh, a service another account is
/// declared for, or 1,024 oversized endpoints are refused with a clear
/// error, and the store's other spokes keep syncing config and registry.
#[tokio::test]
async fn registrations_are_checked_and_a_bad_one_stops_nobody() {
    let h = in_process_hub().await;
    let store_yaml = |v: &str| {
        format!(
            "apiVersion: tidemesh.io/v1alpha1
kind: Store
metadata: {{name: sf07}}
spec: {{region: r1, zone: {v}}}
---
apiVersion: tidemesh.io/v1alpha1
kind: Workload
metadata: {{name: inventory, namespace: store}}
spec: {{service: inventory, store: sf07, serviceAccount: inventory, address: '10.0.0.9:8080'}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: payments, namespace: cloud}}
spec:
  hosts: [payments.cloud]
  location: MESH_EXTERNAL
  ports: [{{number: 443, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 10.9.0.1}}]
"
        )
    };
    h.hub.apply_yaml(&store_yaml("z1"), None).expect("apply");
    let tmp = tempfile::tempdir().expect("tempdir");

    // a well-behaved spoke of the store, in process
    let good_dir = tmp.path().join("good");
    enroll_in_process(&h, &good_dir, &node("sf07", "good")).await;
    let spoke = tidemesh_spoke::Spoke::open(
        &good_dir,
        tidemesh_spoke::SpokeConfig {
            admin_socket: false,
            file: tidemesh_spoke::FileConfig {
                workloads: vec![tidemesh_spoke::WorkloadConfig {
                    service_account: "pos".into(),
                    service: None,
                    namespace: "store".into(),
                    labels: Default::default(),
                    inbound: Some("127.0.0.1:9".parse().expect("addr")),
                    outbound: None,
                    plaintext_inbound: None,
                    health: None,
                    rate_limit: None,
                    protocol: Default::default(),
                    tcp_outbound: Vec::new(),
                    selectors: Vec::new(),
                }],
                ..Default::default()
            },
            ..Default::default()
        },
        Arc::new(SystemClock),
    )
    .expect("open");
    let sock =
        tidemesh_net::quic::wrap_socket(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .expect("wrap");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s2 = spoke.clone();
    let spoke_task = tokio::spawn(async move {
        s2.run(sock, async {
            let _ = stop_rx.await;
        })
        .await
    });
    until(&spoke, "good spoke connected with config 1", |s| {
        s["connected"] == true && s["config_version"] == 1
    })
    .await;

    // a misbehaving spoke of the same store, speaking raw control frames
    let bad_dir = tmp.path().join("bad");
    enroll_in_process(&h, &bad_dir, &node("sf07", "bad")).await;
    let conn = ctl_session(h.addr, &tidemesh_spoke::CredStore::new(&bad_dir), true)
        .await
        .expect("session");
    let ep = |account: &str, service: &str| tidemesh_proto::RegisteredEndpoint {
        service_account: account.into(),
        service: service.into(),
        namespace: "store".into(),
        labels: [("app".to_string(), account.to_string())].into(),
        address: "127.0.0.1:7000".into(),
        healthy: true,
    };
    let mut oversized = ep("pos", "pos");
    // about 800 bytes each: 1,024 of them still fit one frame (the hub must
    // read and refuse them, not the frame codec)
    oversized.labels = (0..10)
        .map(|i| (format!("label-{i}"), "x".repeat(63)))
        .collect();
    let cases = [
        (
            vec![ep("pos", "payments.cloud")],
            ErrorCode::Forbidden,
            "outside the mesh",
        ),
        (
            vec![ep("evil", "inventory")],
            ErrorCode::Forbidden,
            "served by service account(s) inventory",
        ),
        (
            vec![oversized; 1024],
            ErrorCode::BadRequest,
            "1024 endpoints",
        ),
    ];
    for (endpoints, code, says) in cases {
        let resp: Response = tidemesh_net::request(
            &conn,
            &Request::Register { endpoints },
            Duration::from_secs(5),
        )
        .await
        .expect("answer");
        match resp {
            Response::Error { code: c, message } if c == code && message.contains(says) => {
                eprintln!("refused: {message}");
            }
            other => panic!("expected {code} naming {says:?}, got {other:?}"),
        }
    }

    // the good spoke keeps syncing: a new config version reaches it
    h.hub.apply_yaml(&store_yaml("z2"), None).expect("apply");
    until(&spoke, "good spoke follows to config 2", |s| {
        s["config_version"] == 2
    })
    .await;
    assert_eq!(
        spoke.status()["registration_error"],
        serde_json::Value::Null
    );

    let _ = stop_tx.send(());
    let _ = spoke_task.await;
}

/// A connection to the hub without a client certificate, trusting the
/// hub's CA by its fingerprint (as a join token does).
async fn anonymous_session(h: &InProc) -> quinn::Connection {
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let tls = verify::anonymous_client_config(
        verify::ServerTrust::Pinned {
            trust_domain: td.clone(),
            ca_fingerprint: h.hub.ca_fingerprint(),
        },
        Arc::new(verify::ExactId(naming::hub_id(&td))),
        Arc::new(SystemClock),
        &[ALPN_CTL],
    )
    .expect("tls");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let ep =
        tidemesh_net::quic::endpoint(tidemesh_net::quic::wrap_socket(sock).expect("wrap"), None)
            .expect("endpoint");
    let cfg = tidemesh_net::QuicSettings::default()
        .client_config(tls)
        .expect("client config");
    ep.connect_with(cfg, h.addr, "hub.test")
        .expect("connect")
        .await
        .expect("handshake")
}

/// Sends every request on `conn`, 32 at a time, each on its own stream, and
/// checks each is refused with its code.
async fn refused_all(conn: &quinn::Connection, reqs: Vec<(Request, ErrorCode)>) {
    let mut set = tokio::task::JoinSet::new();
    let per_task = reqs.len().div_ceil(32).max(1);
    for chunk in reqs.chunks(per_task) {
        let conn = conn.clone();
        let chunk = chunk.to_vec();
        set.spawn(async move {
            for (req, want) in chunk {
                let resp: Response = tidemesh_net::request(&conn, &req, Duration::from_secs(20))
                    .await
                    .expect("answer");
                match resp {
                    Response::Error { code, .. } if code == want => {}
                    other => panic!("expected {want}, got {other:?}"),
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task");
    }
}

/// One GET of the hub's `/metrics`.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: hub\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    c.read_to_string(&mut out).await.expect("read");
    out
}

/// Anonymous input costs nothing durable, end to end over QUIC on
/// loopback: 2,000 bad Enrolls (unknown tokens, half of them with a garbage
/// CSR, refused as token errors) and 2,000 bad Reestablishes (1,000 guessed
/// node IDs, 1,000 bad proofs for an enrolled one) add no audit row and
/// grow hub.db by less than 1 MiB; `/metrics` and `stats` count every one.
/// An anonymous peer's 1 MiB length prefix is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_refusals_are_counted_not_written() {
    let metrics = tidemesh_tests::free_tcp();
    let h = in_process_hub_with(tidemesh_hub::HubConfig {
        metrics: Some(metrics),
        ..Default::default()
    })
    .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = node("sf08", "n1");
    enroll_in_process(&h, &tmp.path().join("s"), &id).await;
    let db = h.dir.join(tidemesh_hub::HUB_DB);
    let size0 = std::fs::metadata(&db).expect("hub.db").len();
    let audit0 = h.hub.store().audit_len().expect("audit");

    let sid: SpiffeId = id.parse().expect("id");
    let key = svid::generate_key().expect("key");
    let csr = svid::make_csr(&key, &sid).expect("csr");
    const N: usize = 2_000;
    let enrolls = (0..N)
        .map(|i| {
            let csr = if i % 2 == 0 {
                csr.clone()
            } else {
                vec![0xff; 300]
            };
            (
                Request::Enroll {
                    token: format!("{i:064x}"),
                    spoke: sid.clone(),
                    csr,
                },
                ErrorCode::InvalidToken,
            )
        })
        .collect();
    let reestablishes = (0..N)
        .map(|i| {
            if i % 2 == 0 {
                let guess: SpiffeId = node("sf08", &format!("guess{i}")).parse().expect("id");
                (
                    Request::Reestablish {
                        spoke: guess,
                        csr: csr.clone(),
                        proof: vec![0; 70],
                    },
                    ErrorCode::NotEnrolled,
                )
            } else {
                (
                    Request::Reestablish {
                        spoke: sid.clone(),
                        csr: csr.clone(),
                        proof: vec![i as u8; 70],
                    },
                    ErrorCode::KeyMismatch,
                )
            }
        })
        .collect();
    let conn = anonymous_session(&h).await;
    let t0 = Instant::now();
    refused_all(&conn, enrolls).await;
    let t_enroll = t0.elapsed();
    let t1 = Instant::now();
    refused_all(&conn, reestablishes).await;
    let t_reest = t1.elapsed();

    let size1 = std::fs::metadata(&db).expect("hub.db").len();
    let audit1 = h.hub.store().audit_len().expect("audit");
    eprintln!(
        "{N} bad Enrolls in {t_enroll:?}, {N} bad Reestablishes in {t_reest:?}; hub.db {size0} -> {size1} bytes; audit rows {audit0} -> {audit1}"
    );
    assert_eq!(audit1, audit0, "anonymous refusals wrote audit rows");
    assert!(size1.saturating_sub(size0) < 1 << 20, "{size0} -> {size1}");

    use tidemesh_hub::refusals::{Reason, RefusedRequest};
    let count = |req: RefusedRequest, reason: Reason| {
        h.hub
            .refusal_counts()
            .into_iter()
            .find(|(k, _)| *k == (req, reason))
            .map(|(_, n)| n)
            .unwrap_or(0)
    };
    assert_eq!(count(RefusedRequest::Enroll, Reason::TokenUnknown), 2_000);
    assert_eq!(count(RefusedRequest::Enroll, Reason::BadCsr), 0);
    assert_eq!(
        count(RefusedRequest::Reestablish, Reason::NotEnrolled),
        1_000
    );
    assert_eq!(count(RefusedRequest::Reestablish, Reason::BadProof), 1_000);
    let page = scrape(metrics).await;
    for line in [
        r#"tidemesh_hub_refusals_total{request="enroll",reason="token_unknown"} 2000"#,
        r#"tidemesh_hub_refusals_total{request="reestablish",reason="not_enrolled"} 1000"#,
        r#"tidemesh_hub_refusals_total{request="reestablish",reason="bad_proof"} 1000"#,
    ] {
        assert!(page.contains(line), "{line} missing from /metrics:\n{page}");
    }
    let stats = tidemesh_net::admin::call(
        &tidemesh_net::admin::socket_path(&h.dir),
        serde_json::json!({"cmd": "stats"}),
    )
    .await
    .expect("stats");
    assert_eq!(stats["refusals"]["total"], 4_000, "{}", stats["refusals"]);

    // An anonymous peer announcing a 1 MiB frame (within the authenticated
    // limit) is refused from the prefix alone, without sending the body.
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&[0, 0x10, 0, 0, 1, 2, 3])
        .await
        .expect("write");
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        tidemesh_net::read_frame::<Response>(&mut recv),
    )
    .await
    .expect("answered at once, not after the read deadline");
    match r {
        Ok(Response::Error { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("16384-byte limit"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(count(RefusedRequest::Frame, Reason::TooLarge), 1);
}

/// `audit` reads one page: the newest `--limit` entries, older ones with
/// `--before`, newer with `--after`, the same through the running hub and
/// from a stopped hub's data directory; `--json` stays an array.
#[test]
fn audit_reads_in_pages_live_and_stopped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    hub.start();
    for i in 0..7 {
        hub.token(&node("sf09", &format!("n{i}")), "10m");
    }
    let page = |hub: &HubProc, args: &[&str]| -> Vec<(u64, String)> {
        let mut a = vec!["audit", "--json"];
        a.extend_from_slice(args);
        let o = hub.cli(&a);
        assert!(o.status.success(), "audit {args:?}: {}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .expect("json array")
            .as_array()
            .expect("array")
            .iter()
            .map(|e| {
                (
                    e["seq"].as_u64().expect("seq"),
                    e["subject"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    for live in [true, false] {
        let all = page(&hub, &[]);
        let n = all.len();
        assert!(n >= 7, "live {live}: {all:?}");
        assert!(all[n - 7..].iter().all(|(_, s)| s.contains("/store/sf09/")));
        let newest = page(&hub, &["--limit", "3"]);
        assert_eq!(newest, all[n - 3..].to_vec(), "live {live}");
        let before = newest[0].0.to_string();
        let older = page(&hub, &["--limit", "3", "--before", &before]);
        assert_eq!(older, all[n - 6..n - 3].to_vec(), "live {live}");
        let after = all[n - 6].0.to_string();
        let next = page(&hub, &["--limit", "2", "--after", &after]);
        assert_eq!(next, all[n - 5..n - 3].to_vec(), "live {live}");
        let o = hub.cli(&["audit", "--limit", "3"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&format!("--before {before}")),
            "{}",
            text(&o)
        );
        let o = hub.cli(&["audit", "--limit", "0"]);
        assert!(!o.status.success(), "--limit 0 accepted");
        hub.stop();
    }
}

/// An anonymous control connection to `h`, or why it failed.
async fn try_anonymous(h: &InProc) -> Result<quinn::Connection, quinn::ConnectionError> {
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let tls = verify::anonymous_client_config(
        verify::ServerTrust::Pinned {
            trust_domain: td.clone(),
            ca_fingerprint: h.hub.ca_fingerprint(),
        },
        Arc::new(verify::ExactId(naming::hub_id(&td))),
        Arc::new(SystemClock),
        &[ALPN_CTL],
    )
    .expect("tls");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let ep =
        tidemesh_net::quic::endpoint(tidemesh_net::quic::wrap_socket(sock).expect("wrap"), None)
            .expect("endpoint");
    let cfg = tidemesh_net::QuicSettings::default()
        .client_config(tls)
        .expect("client config");
    ep.connect_with(cfg, h.addr, "hub.test")
        .expect("connect")
        .await
}

fn refused_by_quic(r: &Result<quinn::Connection, quinn::ConnectionError>) -> bool {
    matches!(r, Err(quinn::ConnectionError::ConnectionClosed(c))
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// The per-address and the global connection caps refuse before the
/// handshake (QUIC CONNECTION_REFUSED), count it, and free their place when
/// a connection closes; `always_validate` sends every new client a QUIC
/// Retry first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_before_the_handshake_and_addresses_are_validated() {
    use tidemesh_hub::admission::AdmissionSettings;
    // per address: 2, every client validated
    let h = in_process_hub_with(tidemesh_hub::HubConfig {
        admission: AdmissionSettings {
            max_per_address: 2,
            always_validate: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let a = try_anonymous(&h).await.expect("first connection");
    let b = try_anonymous(&h).await.expect("second connection");
    let c = try_anonymous(&h).await;
    assert!(refused_by_quic(&c), "third from one address: {c:?}");
    let s = h.hub.admission().expect("admission");
    assert_eq!(s.counts.refused_address, 1, "{s:?}");
    assert_eq!(s.open, 2, "{s:?}");
    // the caps come first: the third was refused without a Retry
    assert!(
        s.counts.retries == 2 && s.counts.validated == 2 && s.counts.handshakes == 2,
        "every client let through was asked to validate its address first: {s:?}"
    );
    // a closed connection frees its place
    a.close(0u32.into(), b"done");
    let t0 = Instant::now();
    while h.hub.admission().map(|s| s.open) != Some(1) {
        assert!(t0.elapsed() < Duration::from_secs(20), "place never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = try_anonymous(&h).await.expect("a place was freed");
    drop((b, d));

    // global: 2 (addresses do not matter)
    let g = in_process_hub_with(tidemesh_hub::HubConfig {
        admission: AdmissionSettings {
            max_connections: 2,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let _a = try_anonymous(&g).await.expect("first connection");
    let _b = try_anonymous(&g).await.expect("second connection");
    let c = try_anonymous(&g).await;
    assert!(refused_by_quic(&c), "third overall: {c:?}");
    let s = g.hub.admission().expect("admission");
    assert_eq!(
        (s.counts.refused_global, s.counts.refused_address),
        (1, 0),
        "{s:?}"
    );
    // loaded (half the cap in use): the second client was validated first
    assert!(s.counts.retries >= 1, "{s:?}");
}

/// A fleet reconnecting at once is paced by the hub: 24 spokes start
/// together against a budget of 4 at once and 8 per second; the excess is
/// closed with a retry-after (counted), the spokes honour it (few refusals
/// per spoke, not one per 0.2 s redial), every spoke is connected in the end,
/// no sooner than the budget allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_fleet_is_paced_by_the_hub_and_all_get_in() {
    const SPOKES: usize = 24;
    const RATE: f64 = 8.0;
    const BURST: u32 = 4;
    let h = in_process_hub_with(tidemesh_hub::HubConfig {
        admission: tidemesh_hub::admission::AdmissionSettings {
            rate: RATE,
            burst: BURST,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    // Enrollment goes through the same budget: retry what it refuses.
    let mut dirs = Vec::new();
    for i in 0..SPOKES {
        let id = node("sf20", &format!("n{i}"));
        let dir = tmp.path().join(format!("s{i}"));
        let token = h
            .hub
            .create_token(&id.parse().expect("id"), Duration::from_secs(120))
            .expect("token");
        let t0 = Instant::now();
        loop {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            match tidemesh_spoke::enroll(
                &dir,
                h.addr,
                &token.to_string(),
                false,
                tidemesh_net::quic::wrap_socket(sock).expect("wrap"),
                Arc::new(SystemClock),
                Default::default(),
            )
            .await
            {
                Ok(_) => break,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(30), "enroll {i}: {e}");
                    let _ = std::fs::remove_dir_all(&dir);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
        }
        dirs.push(dir);
    }
    // let the bucket fill again: the fleet then comes back at once
    tokio::time::sleep(Duration::from_secs_f64(f64::from(BURST) / RATE + 0.5)).await;
    let before = h.hub.admission().expect("admission").counts;
    let mut spokes = Vec::new();
    let mut stops = Vec::new();
    let t0 = Instant::now();
    for (i, dir) in dirs.iter().enumerate() {
        let spoke = tidemesh_spoke::Spoke::open(
            dir,
            tidemesh_spoke::SpokeConfig {
                admin_socket: false,
                hub: Some(h.addr),
                seed: Some(i as u64),
                ..Default::default()
            },
            Arc::new(SystemClock),
        )
        .expect("open");
        let sock = tidemesh_net::quic::wrap_socket(
            std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"),
        )
        .expect("wrap");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s2 = spoke.clone();
        tokio::spawn(async move {
            s2.run(sock, async {
                let _ = rx.await;
            })
            .await
        });
        spokes.push(spoke);
        stops.push(tx);
    }
    let connected = |spokes: &[tidemesh_spoke::Spoke]| {
        spokes
            .iter()
            .filter(|s| s.status()["connected"] == true)
            .count()
    };
    loop {
        let n = connected(&spokes);
        if n == SPOKES {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{n} of {SPOKES} connected after {:?}: {:?}",
            t0.elapsed(),
            h.hub.admission()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let s = h.hub.admission().expect("admission");
    let admitted = s.counts.admitted - before.admitted;
    let busy = s.counts.busy - before.busy;
    eprintln!(
        "{SPOKES} spokes at a budget of {BURST} + {RATE}/s: all connected in {took:?}; admitted {admitted}, told to come back {busy} times, QUIC retries {}, validated {}",
        s.counts.retries - before.retries,
        s.counts.validated - before.validated,
    );
    // the budget held: the excess waited for tokens
    let floor = Duration::from_secs_f64((SPOKES as f64 - f64::from(BURST)) / RATE * 0.8);
    assert!(
        took >= floor,
        "all in after {took:?}, faster than the budget ({floor:?})"
    );
    assert!(busy >= 1, "nobody was told to come back: {s:?}");
    assert!(admitted >= SPOKES as u64, "{s:?}");
    // told when to come back, spokes do not hammer: a handful of refusals
    // each at most (ignoring the retry-after, 0.2 s redials would give >100)
    assert!(
        busy <= 3 * SPOKES as u64,
        "{busy} refusals for {SPOKES} spokes: the retry-after was not honoured"
    );
    // address validation happened for the clients that came while over budget
    assert!(s.counts.retries > before.retries, "{s:?}");
    assert!(s.counts.validated > before.validated, "{s:?}");
    drop(stops);
}

/// Evidence sessions hold memory only through the hub-wide permits: 16
/// sessions of one spoke each send 4 batches at once (64 in flight); the
/// hub never holds more than twice its commit slots (2 × 2) read or decoded,
/// and every batch is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_sessions_hold_at_most_twice_the_slots_in_memory() {
    use tidemesh_evidence::{samples, Batch, Chain, NewRecord, UnixMillis};
    const SESSIONS: usize = 16;
    const AHEAD: usize = 4;
    let h = in_process_hub().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = node("sf21", "n1");
    let dir = tmp.path().join("s");
    enroll_in_process(&h, &dir, &id).await;
    let sid: SpiffeId = id.parse().expect("id");
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let creds = tidemesh_spoke::CredStore::new(&dir);
    let node_svid = creds.node().expect("node");
    let tls = verify::client_config(
        creds.bundle(&td).expect("bundle"),
        node_svid.chain.clone(),
        &node_svid.key,
        Arc::new(verify::ExactId(naming::hub_id(&td))),
        Arc::new(SystemClock),
        &[ALPN_CTL],
    )
    .expect("tls");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = ep
        .connect_with(
            tidemesh_net::QuicSettings::default()
                .client_config(tls)
                .expect("cfg"),
            h.addr,
            "hub.tidemesh.invalid",
        )
        .expect("connect")
        .await
        .expect("handshake");
    let mut chain = Chain::genesis(&sid);
    let now = UnixMillis(tidemesh_hub::unix_ms(std::time::SystemTime::now()));
    let recs: Vec<_> = (0..AHEAD * 200)
        .map(|i| {
            chain
                .append(NewRecord::new(
                    now,
                    samples::drill_request("held", i as u64, now),
                ))
                .expect("append")
        })
        .collect();
    let batches: Vec<Vec<u8>> = recs
        .chunks(200)
        .map(|c| {
            Batch::sign(sid.clone(), c.to_vec(), &node_svid.key)
                .and_then(|b| b.encode())
                .expect("batch")
        })
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..SESSIONS {
        let conn = conn.clone();
        let batches = batches.clone();
        set.spawn(async move {
            let (mut s, mut r) = conn.open_bi().await.expect("stream");
            tidemesh_net::write_frame(&mut s, &Request::EvidenceOpen)
                .await
                .expect("open");
            let _first: Response = tidemesh_net::read_frame(&mut r).await.expect("first ack");
            for b in batches {
                tidemesh_net::write_frame(&mut s, &Request::EvidenceBatch { batch: b })
                    .await
                    .expect("write");
            }
            let mut acks = 0;
            for _ in 0..AHEAD {
                match tidemesh_net::read_frame::<Response>(&mut r).await {
                    Ok(Response::EvidenceAck { .. }) => acks += 1,
                    other => panic!("expected an ack, got {other:?}"),
                }
            }
            acks
        });
    }
    let mut acks = 0;
    while let Some(n) = set.join_next().await {
        acks += n.expect("session");
    }
    let (held, peak) = h.hub.evidence_batches_held();
    eprintln!(
        "{SESSIONS} sessions x {AHEAD} batches: {acks} acks; at most {peak} batches held at once"
    );
    assert_eq!(acks, SESSIONS * AHEAD);
    let slots = tidemesh_hub::ingest::IngestSettings::default().max_concurrent as u64;
    assert!(peak <= 2 * slots, "{peak} batches held at once");
    assert!(
        peak >= 2,
        "sessions never overlapped (peak {peak}): the bound was not exercised"
    );
    assert_eq!(held, 0, "every held batch was released");
}

/// How many bytes one evidence session can put ahead of the hub's reads
/// while every held-batch permit is taken: four sessions begin a batch
/// frame and stall (each holds a permit for up to the 30 s frame
/// deadline), then a fifth opens its session and writes a 1 MiB frame
/// until quinn blocks it for lack of the hub's credit.
async fn bytes_ahead_of_the_hub(addr: SocketAddr, creds: &tidemesh_spoke::CredStore) -> usize {
    let conn = ctl_session(addr, creds, true).await.expect("session");
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let (mut s, mut r) = conn.open_bi().await.expect("stream");
        tidemesh_net::write_frame(&mut s, &Request::EvidenceOpen)
            .await
            .expect("open");
        let _first: Response = tidemesh_net::read_frame(&mut r).await.expect("first ack");
        // the prefix of a 512 KiB frame and a little of its body
        let mut begun = (512u32 << 10).to_be_bytes().to_vec();
        begun.extend_from_slice(&[0u8; 100]);
        s.write_all(&begun).await.expect("begin a frame");
        stalled.push((s, r));
    }
    let (mut s, mut r) = conn.open_bi().await.expect("stream");
    tidemesh_net::write_frame(&mut s, &Request::EvidenceOpen)
        .await
        .expect("open");
    let _first: Response = tidemesh_net::read_frame(&mut r).await.expect("first ack");
    let mut frame = ((1u32 << 20) - 64).to_be_bytes().to_vec();
    frame.resize(1 << 20, 0);
    let mut sent = 0;
    while sent < frame.len() {
        match tokio::time::timeout(Duration::from_secs(2), s.write(&frame[sent..])).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => panic!("write: {e}"),
            // blocked: the hub's credit for this stream is spent
            Err(_) => break,
        }
    }
    drop(stalled);
    conn.close(0u32.into(), b"done");
    sent
}

/// The hub's QUIC flow control bounds what a spoke's evidence stream puts
/// on the hub's socket and in its memory ahead of the hub's reads: with
/// the default 128 KiB stream window a session that the hub does not read
/// (every held-batch permit taken) gets at most 128 KiB out; with
/// `tidemesh-hub serve --quic-stream-window 512KiB` (the real binary) more
/// than 256 KiB and at most 512 KiB. (quinn's default is 1.25 MB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_stream_window_bounds_what_a_session_sends_ahead() {
    let slots = tidemesh_hub::ingest::IngestSettings::default().max_concurrent;
    assert_eq!(
        2 * slots,
        4,
        "the test stalls 4 sessions to take every permit"
    );
    let window = tidemesh_hub::STREAM_WINDOW as usize;
    let h = in_process_hub().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = node("sf22", "n1");
    let dir = tmp.path().join("s");
    enroll_in_process(&h, &dir, &id).await;
    let creds = tidemesh_spoke::CredStore::new(&dir);
    let ahead = bytes_ahead_of_the_hub(h.addr, &creds).await;
    let (_, peak) = h.hub.evidence_batches_held();
    eprintln!("default window {window} B: {ahead} B sent ahead; {peak} permits held at peak");
    assert_eq!(peak, 4, "the stalled sessions did not take every permit");
    assert!(ahead <= window, "{ahead} B ahead of a {window} B window");
    assert!(
        ahead >= window / 2,
        "only {ahead} B out: something else blocked"
    );

    let mut hub =
        HubProc::init(&tmp.path().join("p"), TD).with_args(&["--quic-stream-window", "512KiB"]);
    let addr = hub.start();
    let id = node("sf22", "n2");
    let token = hub.token(&id, "10m");
    let spoke = SpokeProc::new(&tmp.path().join("p"), "s2", &id);
    let o = spoke.enroll(addr, &token);
    assert!(o.status.success(), "enroll: {}", text(&o));
    let creds = tidemesh_spoke::CredStore::new(&spoke.dir);
    let ahead = bytes_ahead_of_the_hub(addr, &creds).await;
    eprintln!("--quic-stream-window 512KiB: {ahead} B sent ahead");
    assert!(
        ahead > 256 << 10 && ahead <= 512 << 10,
        "{ahead} B ahead with a 512 KiB window"
    );
}

/// One sample of `/metrics` at `addr` (exact name with labels).
fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The admission flags of `tidemesh-hub serve` act, with the real binaries:
/// `--admit-rate`/`--admit-burst` (the budget on /metrics, enrollment paced
/// through it), `--address-validation always` (the very first client is
/// sent a Retry with a full budget), `--max-connections-per-address`
/// (a third spoke from 127.0.0.1 stays out while two are in), then
/// `--max-connections` (one spoke in, the others refused), and
/// `--udp-recv-buffer` (asked and granted sizes on /metrics).
#[test]
fn serve_admission_flags_act() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m1 = tidemesh_tests::free_tcp();
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&[
        "--admit-rate",
        "3",
        "--admit-burst",
        "1",
        "--address-validation",
        "always",
        "--max-connections-per-address",
        "2",
        "--udp-recv-buffer",
        "1MiB",
        "--metrics",
        &m1.to_string(),
    ]);
    let addr = hub.start();
    let m = |name: &str| {
        wait_for(Duration::from_secs(10), || metric(m1, name))
            .unwrap_or_else(|| panic!("{name} not on /metrics"))
    };
    assert_eq!(m("tidemesh_hub_admission_rate"), 3.0);
    assert!(m("tidemesh_hub_admission_tokens") <= 1.0, "burst of 1");
    assert_eq!(
        m("tidemesh_hub_udp_recv_buffer_bytes{size=\"requested\"}"),
        1_048_576.0
    );
    assert!(m("tidemesh_hub_udp_recv_buffer_bytes{size=\"granted\"}") >= 1_048_576.0);
    let mut spokes = Vec::new();
    for i in 0..3 {
        let id = node("sf22", &format!("n{i}"));
        let token = hub.token(&id, "10m");
        let s = SpokeProc::new(tmp.path(), &format!("s{i}"), &id);
        // the budget applies to enrollment too: a refused enroll says so
        let t0 = Instant::now();
        loop {
            let o = s.enroll(addr, &token);
            if o.status.success() {
                break;
            }
            assert!(
                text(&o).contains("busy") && t0.elapsed() < Duration::from_secs(30),
                "enroll: {}",
                text(&o)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        if i == 0 {
            assert!(
                m("tidemesh_hub_admission_total{decision=\"retry\"}") >= 1.0,
                "the first client, with a full budget, was validated"
            );
        }
        spokes.push(s);
    }
    for s in &mut spokes {
        s.start();
    }
    let connected = |spokes: &[SpokeProc]| {
        spokes
            .iter()
            .filter(|s| s.try_status().is_some_and(|st| st["connected"] == true))
            .count()
    };
    wait_for(Duration::from_secs(60), || {
        (connected(&spokes) == 2).then_some(())
    })
    .expect("two spokes connected");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(connected(&spokes), 2, "the per-address cap let a third in");
    assert!(m("tidemesh_hub_admission_total{decision=\"refused_address_cap\"}") >= 1.0);
    assert_eq!(m("tidemesh_hub_connections_open"), 2.0);

    hub.stop();
    let m2 = tidemesh_tests::free_tcp();
    let mut hub = hub.with_args(&["--max-connections", "1", "--metrics", &m2.to_string()]);
    hub.start();
    wait_for(Duration::from_secs(60), || {
        (connected(&spokes) == 1).then_some(())
    })
    .expect("one spoke connected");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(connected(&spokes), 1, "the global cap let a second in");
    assert!(wait_for(Duration::from_secs(10), || metric(
        m2,
        "tidemesh_hub_admission_total{decision=\"refused_global_cap\"}"
    )
    .filter(|v| *v >= 1.0))
    .is_some());
}

/// `tidemesh-spoke enroll --wait`: four spokes enrolling at the same
/// moment against a hub whose new-session budget admits one at a time
/// (`--admit-rate 2 --admit-burst 1`) all enroll in one call each: the
/// hub told some of them busy (its metric counts it) and those said they
/// waited its retry-after and asked again. Without `--wait` a busy hub
/// fails the enrollment (`serve_admission_flags_act`).
#[test]
fn enroll_wait_comes_back_after_the_hubs_retry_after() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = tidemesh_tests::free_tcp();
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&[
        "--admit-rate",
        "2",
        "--admit-burst",
        "1",
        "--metrics",
        &m.to_string(),
    ]);
    let addr = hub.start();
    let tokens: Vec<(String, String)> = (0..4)
        .map(|i| {
            let id = node("sf23", &format!("n{i}"));
            let t = hub.token(&id, "10m");
            (id, t)
        })
        .collect();
    let t0 = Instant::now();
    let children: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, (_, token))| {
            Command::new(bin("tidemesh-spoke"))
                .args(["enroll", "--data-dir"])
                .arg(tmp.path().join(format!("s{i}")))
                .args([
                    "--hub",
                    &addr.to_string(),
                    "--token",
                    token,
                    "--wait",
                    "60s",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn enroll")
        })
        .collect();
    let mut waited = 0;
    for c in children {
        let o = c.wait_with_output().expect("enroll");
        assert!(o.status.success(), "enroll --wait: {}", text(&o));
        waited += String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| l.starts_with("hub busy: retry-after"))
            .count();
    }
    let took = t0.elapsed();
    let busy = wait_for(Duration::from_secs(10), || {
        metric(m, "tidemesh_hub_admission_total{decision=\"busy\"}")
    })
    .expect("admission metric");
    eprintln!("4 enrollments with --wait in {took:?}: {waited} waits, hub said busy {busy} times");
    assert!(waited >= 1, "no enrollment was told to wait");
    assert_eq!(waited as f64, busy, "every busy answer was waited out");
    for (id, _) in &tokens {
        assert!(hub.spoke(id).is_some(), "{id} not enrolled");
    }
}

/// Renewal latencies (ms) of one enrolled spoke renewing its node SVID on
/// its own authenticated control session, one request at a time every
/// `every`, until `stop` says so; errors are counted, not timed.
async fn renew_loop(
    addr: SocketAddr,
    creds: tidemesh_spoke::CredStore,
    id: SpiffeId,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<f64>, usize) {
    let conn = ctl_session(addr, &creds, true)
        .await
        .expect("authenticated session");
    let key = creds.node().expect("node").key;
    let csr = svid::make_csr(&key, &id).expect("csr");
    let (mut lat, mut errors) = (Vec::new(), 0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        tick.tick().await;
        let t = Instant::now();
        let r = tidemesh_net::request::<_, Response>(
            &conn,
            &Request::Renew { csr: csr.clone() },
            Duration::from_secs(30),
        )
        .await;
        match r {
            Ok(Response::Certificate { .. }) => lat.push(t.elapsed().as_secs_f64() * 1e3),
            _ => errors += 1,
        }
    }
    (lat, errors)
}

/// What a flood of bad Enrolls got.
#[derive(Debug, Default)]
struct FloodTally {
    sent: usize,
    /// Refused with `InvalidToken`, as they must be.
    refused: usize,
    /// No answer (a stream or connection error, a timeout).
    unanswered: usize,
    /// Not sent: too many requests already in flight.
    skipped: usize,
}

/// `rate` bad Enrolls per second for `secs` from each address in `from`
/// (shared evenly), one anonymous connection per address, each request on
/// its own stream; at most 4,096 in flight.
async fn enroll_flood(
    hub: SocketAddr,
    ca_fingerprint: [u8; 32],
    from: &[std::net::IpAddr],
    rate: u32,
    secs: u64,
) -> FloodTally {
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    let sid: SpiffeId = node("sf77", "flood").parse().expect("id");
    let key = svid::generate_key().expect("key");
    let csr = svid::make_csr(&key, &sid).expect("csr");
    let mut conns = Vec::new();
    for ip in from {
        let tls = verify::anonymous_client_config(
            verify::ServerTrust::Pinned {
                trust_domain: td.clone(),
                ca_fingerprint,
            },
            Arc::new(verify::ExactId(naming::hub_id(&td))),
            Arc::new(SystemClock),
            &[ALPN_CTL],
        )
        .expect("tls");
        let sock = std::net::UdpSocket::bind((*ip, 0)).expect("bind a flood address");
        let ep = tidemesh_net::quic::endpoint(
            tidemesh_net::quic::wrap_socket(sock).expect("wrap"),
            None,
        )
        .expect("endpoint");
        let cfg = tidemesh_net::QuicSettings::default()
            .client_config(tls)
            .expect("client config");
        let conn = ep
            .connect_with(cfg, hub, "hub.test")
            .expect("connect")
            .await
            .expect("anonymous handshake");
        conns.push((ep, conn));
    }
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let unanswered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tally = FloodTally::default();
    let mut tasks = tokio::task::JoinSet::new();
    let total = u64::from(rate) * secs;
    let started = tokio::time::Instant::now();
    for i in 0..total {
        // paced against the start, so a late tick catches up
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / f64::from(rate)))
            .await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tally.skipped += 1;
            continue;
        };
        tally.sent += 1;
        let conn = conns[i as usize % conns.len()].1.clone();
        let req = Request::Enroll {
            token: format!("{i:064x}"),
            spoke: sid.clone(),
            csr: csr.clone(),
        };
        let (refused, unanswered) = (refused.clone(), unanswered.clone());
        tasks.spawn(async move {
            let _permit = permit;
            match tidemesh_net::request::<_, Response>(&conn, &req, Duration::from_secs(10)).await {
                Ok(Response::Error {
                    code: ErrorCode::InvalidToken,
                    ..
                }) => refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                _ => unanswered.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            };
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    tally.refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    tally.unanswered = unanswered.load(std::sync::atomic::Ordering::Relaxed);
    tally
}

fn p99(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let k = ((v.len() as f64) * 0.99).ceil() as usize;
    v[k.clamp(1, v.len()) - 1]
}

/// The anonymous Enroll flood against a real hub process: 1,000 bad
/// Enrolls per second from one address, then from 50 (127.0.0.2–.51),
/// while three enrolled spokes renew their node SVIDs every 100 ms on their
/// own sessions. Each phase lasts `TIDEMESH_FLOOD_SECS` (5 s by default;
/// 30 s for the full run). hub.db grows by less than 1 MiB per flood
/// (renewals' own audit rows included), every sent Enroll is refused as a
/// bad token, and the renewal p99 during a flood stays under 3 s (the
/// figures, with the quiet baseline, are printed).
#[test]
fn anonymous_enroll_flood_from_one_and_fifty_addresses_while_spokes_renew() {
    let secs: u64 = std::env::var("TIDEMESH_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    const RATE: u32 = 1_000;
    const P99_BOUND_MS: f64 = 3_000.0;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProc::init(tmp.path(), TD);
    let addr = hub.start();
    let mut spokes = Vec::new();
    for i in 0..3 {
        let id = node("sf70", &format!("n{i}"));
        let s = SpokeProc::new(tmp.path(), &format!("r{i}"), &id);
        let o = s.enroll(addr, &hub.token(&id, "10m"));
        assert!(o.status.success(), "enroll: {}", text(&o));
        spokes.push((id, s.dir.clone()));
    }
    let db = hub.dir.join(tidemesh_hub::HUB_DB);
    let size = || std::fs::metadata(&db).expect("hub.db").len();
    let fingerprint = {
        let pem = std::fs::read_to_string(hub.dir.join("ca.pem")).expect("ca cert");
        let certs = svid::pem_certs(&pem).expect("pem");
        svid::sha256(certs.first().expect("one cert"))
    };
    let refusals = |hub: &HubProc| {
        let o = hub.cli(&["stats", "--json"]);
        assert!(o.status.success(), "stats: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["refusals"]["total"].as_u64().expect("refusals.total")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let one: Vec<std::net::IpAddr> = vec![[127, 0, 0, 2].into()];
    let fifty: Vec<std::net::IpAddr> = (2..=51u8).map(|i| [127, 0, 0, i].into()).collect();
    let phases: [(&str, Option<&[std::net::IpAddr]>); 3] = [
        ("no flood", None),
        ("one address", Some(&one)),
        ("50 addresses", Some(&fifty)),
    ];
    let mut report = Vec::new();
    for (name, from) in phases {
        let (size0, refusals0) = (size(), refusals(&hub));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (lat, errors, tally) = rt.block_on(async {
            let mut renewers = tokio::task::JoinSet::new();
            for (id, dir) in &spokes {
                renewers.spawn(renew_loop(
                    addr,
                    tidemesh_spoke::CredStore::new(dir),
                    id.parse().expect("id"),
                    Duration::from_millis(100),
                    stop_rx.clone(),
                ));
            }
            let tally = match from {
                Some(from) => enroll_flood(addr, fingerprint, from, RATE, secs).await,
                None => {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    FloodTally::default()
                }
            };
            let _ = stop_tx.send(true);
            let (mut lat, mut errors) = (Vec::new(), 0);
            while let Some(r) = renewers.join_next().await {
                let (l, e) = r.expect("renewer");
                lat.extend(l);
                errors += e;
            }
            (lat, errors, tally)
        });
        let grew = size().saturating_sub(size0);
        let counted = refusals(&hub) - refusals0;
        let n = lat.len();
        let p = p99(lat);
        eprintln!(
            "{name}: {secs} s, flood {tally:?}, hub refusals counted {counted}; \
             renewals {n} (errors {errors}), p99 {p:.1} ms; hub.db +{grew} bytes"
        );
        report.push((name, p));
        assert_eq!(errors, 0, "{name}: renewals failed");
        assert!(
            n >= 3 * secs as usize,
            "{name}: only {n} renewals in {secs} s"
        );
        assert!(grew < 1 << 20, "{name}: hub.db grew by {grew} bytes");
        if from.is_some() {
            assert_eq!(tally.unanswered, 0, "{name}: {tally:?}");
            assert_eq!(tally.refused, tally.sent, "{name}: {tally:?}");
            assert_eq!(counted, tally.refused as u64, "{name}: refusals counted");
            assert!(
                tally.sent as u64 >= u64::from(RATE) * secs * 9 / 10,
                "{name}: the flood reached only {} of {} requests: {tally:?}",
                tally.sent,
                u64::from(RATE) * secs
            );
            assert!(
                p < P99_BOUND_MS,
                "{name}: renewal p99 {p:.1} ms over the {P99_BOUND_MS} ms bound"
            );
        }
    }
    eprintln!("renewal p99 by phase: {report:?}");
}

/// Durable work runs off the async workers: with hub.db on a disk whose
/// every fsync takes 1.5 s, on a single-threaded runtime (the hub, its
/// QUIC endpoint and the client all on one thread), an Enroll that commits
/// pays the slow fsyncs while a timer on the same thread keeps ticking and
/// another caller's request is answered at once. With the commit back on
/// the async worker the timer stalls for the whole fsync (and this fails).
#[tokio::test(flavor = "current_thread")]
async fn a_slow_fsync_does_not_stall_the_runtime() {
    const SYNC: Duration = Duration::from_millis(1_500);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("hub");
    let td = tidemesh_identity::TrustDomain::new(TD).expect("td");
    tidemesh_hub::init(&dir, &td, &SystemClock).expect("init");
    let disk = tidemesh_simdisk::SimDisk::new();
    let store = tidemesh_hub::store::Store::create_with_backend(disk.backend(), TD)
        .expect("hub.db on the simulated disk");
    let evidence =
        tidemesh_hub::evidence::EvidenceStore::open(&dir.join("evidence.db")).expect("evidence.db");
    let hub = tidemesh_hub::Hub::open_with_stores(
        &dir,
        store,
        evidence,
        Default::default(),
        Arc::new(SystemClock),
    )
    .expect("open");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let socket = tidemesh_net::quic::wrap_socket(sock).expect("wrap");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = hub.clone();
    tokio::spawn(async move {
        h.serve(socket, async {
            let _ = stop_rx.await;
        })
        .await
        .expect("serve")
    });
    let h = InProc {
        _tmp: tmp,
        dir,
        hub,
        addr,
        stop: Some(stop_tx),
    };
    let id: SpiffeId = node("sf09", "n1").parse().expect("id");
    let token = h
        .hub
        .create_token(&id, Duration::from_secs(600))
        .expect("token");
    let key = svid::generate_key().expect("key");
    let csr = svid::make_csr(&key, &id).expect("csr");
    let (enroller, other) = (anonymous_session(&h).await, anonymous_session(&h).await);
    disk.set_sync_delay(SYNC);
    let syncs0 = disk.counters().syncs;

    // A 10 ms ticker on the one runtime thread: its worst gap is how long
    // the thread was blocked.
    let (tick_stop, mut tick_stopped) = tokio::sync::oneshot::channel::<()>();
    let ticker = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = &mut tick_stopped => return worst,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                }
            }
        }
    });
    let t0 = Instant::now();
    let enroll = tokio::spawn(async move {
        let r: Response = tidemesh_net::request(
            &enroller,
            &Request::Enroll {
                token: token.secret.clone(),
                spoke: id,
                csr,
            },
            Duration::from_secs(30),
        )
        .await
        .expect("enroll answered");
        (r, t0.elapsed())
    });
    // While the enrollment's commit waits on the disk, another caller is
    // answered (a wrong token: a read of hub.db, no commit).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t1 = Instant::now();
    let refused: Response = tidemesh_net::request(
        &other,
        &Request::Enroll {
            token: "0".repeat(64),
            spoke: node("sf09", "n2").parse().expect("id"),
            csr: vec![0; 16],
        },
        Duration::from_secs(30),
    )
    .await
    .expect("refusal answered");
    let refused_in = t1.elapsed();
    let (enrolled, enroll_took) = enroll.await.expect("enroll task");
    let _ = tick_stop.send(());
    let worst_gap = ticker.await.expect("ticker");
    let syncs = disk.counters().syncs - syncs0;
    eprintln!(
        "fsync {SYNC:?}: enroll answered in {enroll_took:?} ({syncs} slow syncs), a refusal meanwhile in \
         {refused_in:?}, worst 10 ms tick gap {worst_gap:?}"
    );
    assert!(
        matches!(enrolled, Response::Certificate { .. }),
        "enroll: {enrolled:?}"
    );
    assert!(
        matches!(
            refused,
            Response::Error {
                code: ErrorCode::InvalidToken,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(syncs >= 1, "the enrollment committed on the slow disk");
    assert!(
        enroll_took >= SYNC,
        "the enrollment paid the slow fsync: {enroll_took:?}"
    );
    // Generous for a loaded 2-core machine, far below one fsync.
    assert!(
        worst_gap < Duration::from_millis(700),
        "the runtime thread was blocked for {worst_gap:?}"
    );
    assert!(
        refused_in < Duration::from_millis(1_000),
        "another caller waited {refused_in:?} behind the commit"
    );
}

/// `GET path` on a metrics listener: status and body, `None` if nothing
/// answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `BIN healthcheck --metrics ADDR`: exit code and output.
fn healthcheck(bin_name: &str, addr: SocketAddr) -> (Option<i32>, String) {
    let o = run(Command::new(bin(bin_name)).args([
        "healthcheck",
        "--metrics",
        &addr.to_string(),
        "--timeout",
        "3s",
    ]));
    (o.status.code(), text(&o))
}

/// A unix datagram socket standing in for systemd's notify socket: every
/// datagram it receives, in order.
struct NotifySocket {
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn listen(sock: std::os::unix::net::UnixDatagram) -> NotifySocket {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                s.lock().expect("notify log").push(msg);
            }
        });
        NotifySocket { seen }
    }

    fn messages(&self) -> Vec<String> {
        self.seen.lock().expect("notify log").clone()
    }

    fn count(&self, line: &str) -> usize {
        self.messages()
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }
}

/// Health with the real binaries: `/healthz` is 200 whenever the process
/// answers; spoke `/readyz` is 503 before enrollment and before the first
/// config, 200 once it serves from a valid node CA and a config, and stays
/// 200 through a hub outage; `healthcheck` exits 0 (ready), 1 (not ready,
/// with the reason) and 2 (nothing answers). Under a notify socket the
/// spoke says READY=1 only once ready (STATUS= before), and WATCHDOG=1 at
/// half of WATCHDOG_USEC; the hub says READY=1 once serving and STOPPING=1
/// on SIGTERM.
#[test]
fn readyz_healthcheck_and_sd_notify_follow_enrollment_config_not_the_hub() {
    use std::os::linux::net::SocketAddrExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub_m = tidemesh_tests::free_tcp();
    let spoke_m = tidemesh_tests::free_tcp();

    // nothing listens yet: unreachable
    let (code, out) = healthcheck("tidemesh-hub", hub_m);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("unreachable"), "{out}");

    // the hub under a (path) notify socket with a 400 ms watchdog
    let mut hub = HubProc::init(tmp.path(), TD).with_args(&["--metrics", &hub_m.to_string()]);
    let hub_sock = tmp.path().join("hub-notify.sock");
    let hub_notify = NotifySocket::listen(
        std::os::unix::net::UnixDatagram::bind(&hub_sock).expect("bind notify socket"),
    );
    let mut hub_child = Command::new(bin("tidemesh-hub"))
        .args(["serve", "--data-dir"])
        .arg(&hub.dir)
        .args(["--listen", "127.0.0.1:0", "--metrics", &hub_m.to_string()])
        .env("NOTIFY_SOCKET", &hub_sock)
        .env("WATCHDOG_USEC", "400000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn hub");
    let addr: SocketAddr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(hub_child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        line.trim()
            .strip_prefix("listening=")
            .expect("listening=ADDR")
            .parse()
            .expect("addr")
    };
    wait_for(Duration::from_secs(10), || {
        (hub_notify.count("READY=1") == 1 && hub_notify.count("WATCHDOG=1") >= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("hub notifications: {:?}", hub_notify.messages()));
    let (code, out) = healthcheck("tidemesh-hub", hub_m);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ready: serving trust domain edge.example"),
        "{out}"
    );
    assert_eq!(http_get(hub_m, "/healthz"), Some((200, "ok\n".into())));
    let page = http_get(hub_m, "/metrics").expect("hub metrics").1;
    assert!(page.contains("tidemesh_hub_ready 1"), "{page}");
    assert!(page.contains("tidemesh_build_info{version=\""), "{page}");
    assert!(
        page.contains("tidemesh_hub_ca_expiry_timestamp_seconds "),
        "{page}"
    );

    // a spoke started before enrollment: alive, not ready, says why
    let id = node("sf04", "n1");
    let mut spoke =
        SpokeProc::new(tmp.path(), "s", &id).with_args(&["--metrics", &spoke_m.to_string()]);
    spoke.spawn();
    let (status, body) = wait_for(Duration::from_secs(10), || http_get(spoke_m, "/readyz"))
        .expect("the waiting spoke answers /readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not enrolled"), "{body}");
    assert_eq!(http_get(spoke_m, "/healthz"), Some((200, "ok\n".into())));
    let (code, out) = healthcheck("tidemesh-spoke", spoke_m);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not ready (HTTP 503): not enrolled"), "{out}");
    spoke.stop();

    // enrolled, but the hub is gone before the spoke's first config:
    // running, not ready, no READY=1 (STATUS= and the watchdog only)
    assert!(spoke.enroll(addr, &hub.token(&id, "10m")).status.success());
    let _ = Command::new("kill")
        .args(["-TERM", &hub_child.id().to_string()])
        .status();
    let _ = hub_child.wait();
    assert!(
        hub_notify.count("STOPPING=1") == 1,
        "hub notifications: {:?}",
        hub_notify.messages()
    );
    let name = format!("tidemesh-readyz-{}", std::process::id());
    let abs = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
    let spoke_notify = NotifySocket::listen(
        std::os::unix::net::UnixDatagram::bind_addr(&abs).expect("bind abstract notify socket"),
    );
    let mut spoke = SpokeProc::new(tmp.path(), "s", &id)
        .with_args(&["--metrics", &spoke_m.to_string()])
        .with_env(&[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", "400000"),
        ]);
    spoke.start();
    let (status, body) = wait_for(Duration::from_secs(10), || {
        http_get(spoke_m, "/readyz").filter(|(_, b)| !b.starts_with("starting"))
    })
    .expect("the spoke answers /readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for the first config"), "{body}");
    let (code, out) = healthcheck("tidemesh-spoke", spoke_m);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("waiting for the first config"), "{out}");
    wait_for(Duration::from_secs(10), || {
        (spoke_notify.count("WATCHDOG=1") >= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("spoke notifications: {:?}", spoke_notify.messages()));
    assert_eq!(
        spoke_notify.count("READY=1"),
        0,
        "{:?}",
        spoke_notify.messages()
    );
    assert!(
        spoke_notify
            .messages()
            .iter()
            .any(|m| m.contains("STATUS=waiting for the first config")),
        "{:?}",
        spoke_notify.messages()
    );
    let page = http_get(spoke_m, "/metrics").expect("spoke metrics").1;
    assert!(page.contains("tidemesh_spoke_ready 0"), "{page}");

    // the hub back with a config: the spoke syncs it and is ready
    hub.addr = Some(addr);
    hub.start();
    let yaml = tmp.path().join("store.yaml");
    std::fs::write(&yaml, tidemesh_tests::STORE_SF01.replace("sf01", "sf04")).expect("yaml");
    let o = hub.cli(&["apply", "-f", yaml.to_str().expect("utf8")]);
    assert!(o.status.success(), "apply: {}", text(&o));
    let body = wait_for(Duration::from_secs(20), || {
        http_get(spoke_m, "/readyz").and_then(|(s, b)| (s == 200).then_some(b))
    })
    .unwrap_or_else(|| panic!("ready after the first config: {:?}", spoke.try_status()));
    assert!(body.contains("hub connected"), "{body}");
    wait_for(Duration::from_secs(5), || {
        (spoke_notify.count("READY=1") == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("spoke notifications: {:?}", spoke_notify.messages()));
    let (code, out) = healthcheck("tidemesh-spoke", spoke_m);
    assert_eq!(code, Some(0), "{out}");

    // hub outage: deliberately still ready, serving from the cache
    hub.kill();
    spoke.wait_state("disconnected", Duration::from_secs(15));
    let (status, body) = http_get(spoke_m, "/readyz").expect("readyz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("hub unreachable, serving from the cache"),
        "{body}"
    );
    let (code, out) = healthcheck("tidemesh-spoke", spoke_m);
    assert_eq!(code, Some(0), "{out}");
    let page = http_get(spoke_m, "/metrics").expect("spoke metrics").1;
    assert!(page.contains("tidemesh_spoke_ready 1"), "{page}");
    assert!(page.contains("tidemesh_spoke_connected 0"), "{page}");
    // a restart during the outage is ready again from the last-known-good
    spoke.stop();
    let (code, out) = healthcheck("tidemesh-spoke", spoke_m);
    assert_eq!(code, Some(2), "{out}");
    spoke.start();
    let body = wait_for(Duration::from_secs(10), || {
        http_get(spoke_m, "/readyz").and_then(|(s, b)| (s == 200).then_some(b))
    })
    .expect("ready from the last-known-good, hub down");
    assert!(body.contains("config version"), "{body}");
    assert_eq!(spoke.status()["connected"], false);
    wait_for(Duration::from_secs(5), || {
        (spoke_notify.count("READY=1") == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("spoke notifications: {:?}", spoke_notify.messages()));
    spoke.stop();
    assert!(
        spoke_notify.count("STOPPING=1") >= 1,
        "{:?}",
        spoke_notify.messages()
    );
}

// ---- Packaging: `--version`, the `--data-dir` default, completions and man
// pages, the container build file and the Kubernetes manifests, each checked
// against the real binaries.

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A child process killed when dropped (a failed assertion must not leave a
/// hub running).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        tidemesh_tests::kill(&mut self.0);
    }
}

/// A command for one of the binaries with no tidemesh setting inherited
/// from the environment the tests run in.
fn clean_cmd(name: &str) -> Command {
    let mut c = Command::new(bin(name));
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("TIDEMESH_") || k == "STATE_DIRECTORY" {
                c.env_remove(k);
            }
        }
    }
    c
}

/// Starts `serve` (stdout's first line is `listening=ADDR`) and returns it
/// with the QUIC address.
fn spawn_hub_serve(mut cmd: Command, log: &std::path::Path) -> (Reaped, SocketAddr) {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn hub");
    let stdout = child.stdout.take().expect("stdout");
    let child = Reaped(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    let addr = line
        .trim()
        .strip_prefix("listening=")
        .unwrap_or_else(|| {
            panic!(
                "expected listening=ADDR, got {line:?}; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .parse()
        .expect("address");
    (child, addr)
}

#[test]
fn version_names_the_commit_target_and_profile() {
    // The commit the build recorded: TIDEMESH_BUILD_COMMIT when the build
    // had it, else git's HEAD (CI builds and tests one checkout).
    let commit = match std::env::var("TIDEMESH_BUILD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(repo_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into()),
    };
    for name in ["tidemesh-hub", "tidemesh-spoke"] {
        let o = run(clean_cmd(name).arg("--version"));
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let line = out.trim();
        let want = format!(
            "{name} {} (commit {commit}, built for ",
            env!("CARGO_PKG_VERSION")
        );
        assert!(line.starts_with(&want), "{line:?} should start {want:?}");
        let rest = &line[want.len()..];
        let (target, profile) = rest
            .strip_suffix(')')
            .and_then(|r| r.split_once(", "))
            .unwrap_or_else(|| panic!("{line:?}"));
        assert!(
            target.starts_with(std::env::consts::ARCH) && target.contains("linux"),
            "{line:?}"
        );
        assert!(profile == "debug" || profile == "release", "{line:?}");
    }
}

#[test]
fn data_dir_defaults_to_state_directory_and_says_when_it_is_missing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // systemd's StateDirectory= is named after the binary's state:
    // /var/lib/tidemesh-hub, or under another root
    let missing_root = tmp.path().join("missing");
    let missing = |name: &str| missing_root.join(name);

    // $STATE_DIRECTORY names a directory that does not exist: refused before
    // the command runs, naming it and where it came from.
    for (name, args) in [
        ("tidemesh-hub", &["spokes"][..]),
        ("tidemesh-hub", &["init", "--trust-domain", TD][..]),
        ("tidemesh-spoke", &["status"][..]),
        ("tidemesh-spoke", &["evidence", "verify"][..]),
    ] {
        let missing = missing(name);
        let o = run(clean_cmd(name).args(args).env("STATE_DIRECTORY", &missing));
        assert_eq!(o.status.code(), Some(1), "{name} {args:?}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains(&format!(
                "error: data directory {} ($STATE_DIRECTORY",
                missing.display()
            )) && t.contains("does not exist")
                && t.contains("--data-dir"),
            "{name} {args:?}: {t}"
        );
        assert!(!missing.exists(), "nothing created");
    }
    // Another unit's $STATE_DIRECTORY (a backup job running a hub command)
    // is not the hub's data: it is passed over for /var/lib/NAME.
    let other = tmp.path().join("backup-job");
    std::fs::create_dir(&other).expect("mkdir");
    // Without it the default is /var/lib/NAME, checked the same way (on a
    // box where the package is not installed).
    for name in ["tidemesh-hub", "tidemesh-spoke"] {
        let dflt = format!("/var/lib/{name}");
        if std::path::Path::new(&dflt).exists() {
            eprintln!("{dflt} exists here: its refusal is not checked");
            continue;
        }
        let cmd = if name == "tidemesh-hub" {
            "spokes"
        } else {
            "status"
        };
        for o in [
            run(clean_cmd(name).arg(cmd)),
            run(clean_cmd(name).arg(cmd).env("STATE_DIRECTORY", &other)),
        ] {
            assert_eq!(o.status.code(), Some(1), "{}", text(&o));
            assert!(
                text(&o).contains(&format!("data directory {dflt} (the default")),
                "{}",
                text(&o)
            );
        }
    }

    // Under systemd: init, serve, token create all find the directory
    // through $STATE_DIRECTORY alone.
    let hub_dir = tmp.path().join("tidemesh-hub");
    std::fs::create_dir(&hub_dir).expect("mkdir");
    let o = run(clean_cmd("tidemesh-hub")
        .args(["init", "--trust-domain", TD])
        .env("STATE_DIRECTORY", &hub_dir));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&hub_dir.join("ca_key.pem")), 0o600);
    let mut serve = clean_cmd("tidemesh-hub");
    serve
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("STATE_DIRECTORY", &hub_dir);
    let (_hub, addr) = spawn_hub_serve(serve, &tmp.path().join("hub.log"));
    let id = node("pkg", "n1");
    let token = wait_for(Duration::from_secs(10), || {
        let o = run(clean_cmd("tidemesh-hub")
            .args(["token", "create", "--spoke", &id])
            .env("STATE_DIRECTORY", &hub_dir));
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    })
    .expect("token create through $STATE_DIRECTORY");
    // TIDEMESH_DATA_DIR is an explicit choice: it wins, and is not checked
    // as a default would be.
    let o = run(clean_cmd("tidemesh-hub")
        .args(["spokes", "--json"])
        .env("STATE_DIRECTORY", missing("tidemesh-hub"))
        .env("TIDEMESH_DATA_DIR", &hub_dir));
    assert!(o.status.success(), "{}", text(&o));

    // The spoke: enroll and an offline command through $STATE_DIRECTORY.
    let spoke_dir = tmp.path().join("tidemesh-spoke");
    std::fs::create_dir(&spoke_dir).expect("mkdir");
    let o = run(clean_cmd("tidemesh-spoke")
        .args(["enroll", "--hub", &addr.to_string(), "--token", &token])
        .env("STATE_DIRECTORY", &spoke_dir));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&spoke_dir.join("node_key.pem")), 0o600);
    let out = tmp.path().join("svid");
    let o = run(clean_cmd("tidemesh-spoke")
        .args(["svid", "export", "--out"])
        .arg(&out)
        .env("STATE_DIRECTORY", &spoke_dir));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&id), "{}", text(&o));
    let o = run(clean_cmd("tidemesh-hub")
        .args(["spokes", "--json"])
        .env("STATE_DIRECTORY", &hub_dir));
    assert!(text(&o).contains(&id), "{}", text(&o));
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    for (name, sub, prefix, with_data_dir) in [
        ("tidemesh-hub", "token", "tok", "spokes"),
        ("tidemesh-spoke", "enroll", "enr", "status"),
    ] {
        // bash: load the script and ask its completion function, as
        // bash-completion does on TAB.
        let o = run(clean_cmd(name).args(["completions", "bash"]));
        assert!(o.status.success(), "{}", text(&o));
        let script = String::from_utf8_lossy(&o.stdout).into_owned();
        // The function the script registers: `complete -F FUNC ... NAME`.
        let func = script
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("complete") && l.trim_end().ends_with(name))
                    .then(|| w.skip_while(|x| *x != "-F").nth(1))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no `complete -F FUNC ... {name}` in {script}"));
        let probe = format!(
            "{script}\nCOMP_WORDS=({name} {prefix}); COMP_CWORD=1; COMP_LINE='{name} {prefix}'; \
             COMP_POINT=${{#COMP_LINE}}; {func} {name} {prefix} {name}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let o = run(Command::new("bash").args(["-c", &probe]));
        assert!(o.status.success(), "{}", text(&o));
        let got: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .collect();
        assert_eq!(got, vec![sub.to_owned()], "{name} {prefix}<TAB>");
        for shell in ["zsh", "fish"] {
            let o = run(clean_cmd(name).args(["completions", shell]));
            assert!(o.status.success(), "{}", text(&o));
            let s = String::from_utf8_lossy(&o.stdout);
            assert!(s.contains(name) && s.contains(sub), "{shell}: {s}");
        }
        let o = run(clean_cmd(name).args(["completions", "tcsh"]));
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));

        // man: one page on stdout, or one per command with --out-dir.
        let o = run(clean_cmd(name).arg("man"));
        assert!(o.status.success(), "{}", text(&o));
        let page = String::from_utf8_lossy(&o.stdout);
        assert!(page.contains(&format!(".TH {name} 1")), "{page}");
        let tmp = tempfile::tempdir().expect("tempdir");
        let o = run(clean_cmd(name).args(["man", "--out-dir"]).arg(tmp.path()));
        assert!(o.status.success(), "{}", text(&o));
        let sub_page = tmp.path().join(format!("{name}-{sub}.1"));
        assert!(tmp.path().join(format!("{name}.1")).is_file());
        assert!(sub_page.is_file(), "no {}", sub_page.display());
        // Rendered by man(1) where it is installed: the page documents the
        // --data-dir default.
        if Command::new("man").arg("--version").output().is_ok() {
            let o = run(Command::new("man")
                .arg("-l")
                .arg(tmp.path().join(format!("{name}-{with_data_dir}.1")))
                .env("MANWIDTH", "200")
                .env("MANPAGER", "cat"));
            assert!(o.status.success(), "{}", text(&o));
            let t = String::from_utf8_lossy(&o.stdout);
            assert!(
                t.contains("--data-dir") && t.contains("STATE_DIRECTORY"),
                "{t}"
            );
        } else {
            eprintln!("man(1) not installed: the pages are not rendered");
        }
    }
}

/// One instruction of a Containerfile: keyword (upper case) and the rest,
/// continuation lines joined.
fn containerfile(path: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).expect("read Containerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                let (kw, rest) = cur.trim().split_once(' ').unwrap_or((cur.trim(), ""));
                out.push((kw.to_ascii_uppercase(), rest.trim().to_owned()));
                cur.clear();
            }
        }
    }
    assert!(
        cur.is_empty(),
        "dangling continuation in {}",
        path.display()
    );
    out
}

/// The exec (JSON array) form of CMD/ENTRYPOINT/HEALTHCHECK CMD.
fn exec_form(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?} is not an exec-form array: {e}"))
}

/// Environment values with the image's volume path moved under a test
/// directory.
fn relocate(v: &str, from: &str, to: &std::path::Path) -> String {
    match v.strip_prefix(from) {
        Some(rest) => format!("{}{rest}", to.display()),
        None => v.to_owned(),
    }
}

#[test]
fn containerfile_builds_the_workspace_and_its_runtime_commands_work() {
    let root = repo_root();
    let ins = containerfile(&root.join("deploy/container/Containerfile"));
    let froms: Vec<usize> = ins
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = (&ins[froms[0]..froms[1]], &ins[froms[1]..]);
    let stage = build[0]
        .1
        .rsplit(' ')
        .next()
        .expect("stage name")
        .to_owned();
    assert!(
        build[0].1.contains("rust:") && build[0].1.contains(" AS "),
        "{:?}",
        build[0]
    );
    assert!(
        runtime[0].1.contains("debian:") && runtime[0].1.contains("-slim"),
        "{:?}",
        runtime[0]
    );

    // The build context: every COPY source exists, and every workspace
    // member is copied (or cargo cannot load the workspace).
    let mut copied = Vec::new();
    for (_, rest) in build.iter().filter(|(k, _)| k == "COPY") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (srcs, _dst) = words.split_at(words.len() - 1);
        for s in srcs {
            assert!(
                root.join(s).exists(),
                "COPY {s}: no such file in the repository"
            );
            copied.push(s.trim_end_matches('/').to_owned());
        }
    }
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|m| m.split(']').next())
        .expect("workspace members");
    for m in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        assert!(
            copied
                .iter()
                .any(|c| m == c || m.starts_with(&format!("{c}/"))),
            "workspace member {m} is not copied into the build stage ({copied:?})"
        );
    }
    let run_build = build
        .iter()
        .find(|(k, _)| k == "RUN")
        .expect("RUN cargo build");
    assert!(run_build.1.contains("cargo build") && run_build.1.contains("-p tidemesh-hub"));
    assert!(runtime
        .iter()
        .any(|(k, r)| k == "COPY" && r.starts_with(&format!("--from={stage} "))));

    // Non-root, QUIC on UDP, the metrics port exposed.
    let user = &runtime.iter().find(|(k, _)| k == "USER").expect("USER").1;
    let uid = user.split(':').next().expect("uid");
    assert!(uid != "0" && uid != "root", "USER {user}");
    let useradd = runtime
        .iter()
        .find(|(k, r)| k == "RUN" && r.contains("useradd"))
        .expect("RUN useradd");
    assert!(useradd.1.contains(&format!("--uid {uid}")), "{useradd:?}");
    let exposed: Vec<&str> = runtime
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, r)| r.split_whitespace())
        .collect();
    let mut env: Vec<(String, String)> = Vec::new();
    for (_, rest) in runtime.iter().filter(|(k, _)| k == "ENV") {
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=').expect("ENV K=V");
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no ENV {k}"))
    };
    let port = |a: String| a.rsplit(':').next().expect("port").to_owned();
    assert!(
        exposed.contains(&format!("{}/udp", port(get("TIDEMESH_LISTEN"))).as_str()),
        "{exposed:?}"
    );
    assert!(
        exposed.contains(&format!("{}/tcp", port(get("TIDEMESH_METRICS"))).as_str()),
        "{exposed:?}"
    );

    // Run the image's commands on the real binary: ENV as set (the volume
    // under a temp dir, free ports), `init` as documented, ENTRYPOINT + CMD,
    // then HEALTHCHECK's command until it says ready.
    let volume = exec_form(
        &runtime
            .iter()
            .find(|(k, _)| k == "VOLUME")
            .expect("VOLUME")
            .1,
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).expect("mkdir");
    let metrics = tidemesh_tests::free_tcp();
    let entry = exec_form(
        &runtime
            .iter()
            .find(|(k, _)| k == "ENTRYPOINT")
            .expect("ENTRYPOINT")
            .1,
    );
    let cmd = exec_form(&runtime.iter().find(|(k, _)| k == "CMD").expect("CMD").1);
    assert_eq!(entry[0], "tidemesh-hub");
    let image_cmd = |args: &[String]| {
        let mut c = clean_cmd(&entry[0]);
        c.args(&entry[1..]).args(args);
        for (k, v) in &env {
            c.env(k, relocate(v, &volume[0], &vol));
        }
        c.env("TIDEMESH_LISTEN", "127.0.0.1:0")
            .env("TIDEMESH_METRICS", metrics.to_string());
        c
    };
    let o = run(&mut image_cmd(&[
        "init".into(),
        "--trust-domain".into(),
        TD.into(),
    ]));
    assert!(o.status.success(), "init: {}", text(&o));
    let data = relocate(&get("TIDEMESH_DATA_DIR"), &volume[0], &vol);
    assert!(
        std::path::Path::new(&data).join("hub.db").is_file(),
        "{data}"
    );
    let (_hub, _) = spawn_hub_serve(image_cmd(&cmd), &tmp.path().join("hub.log"));
    let hc = &runtime
        .iter()
        .find(|(k, _)| k == "HEALTHCHECK")
        .expect("HEALTHCHECK")
        .1;
    let hc = exec_form(hc.split_once(" CMD ").expect("HEALTHCHECK ... CMD [..]").1);
    assert_eq!(
        hc[..2],
        ["tidemesh-hub".to_owned(), "healthcheck".to_owned()]
    );
    wait_for(Duration::from_secs(20), || {
        let mut c = clean_cmd(&hc[0]);
        c.args(&hc[1..]);
        for (k, v) in &env {
            c.env(k, v);
        }
        c.env("TIDEMESH_METRICS", metrics.to_string());
        run(&mut c).status.success().then_some(())
    })
    .expect("the HEALTHCHECK command reports the hub ready");
}

/// `kubernetes-validate --strict` (PyPI) checks the manifests against the
/// Kubernetes OpenAPI schemas; required when TIDEMESH_REQUIRE_K8S_SCHEMA=1.
fn k8s_schema_check(files: &[std::path::PathBuf]) {
    let o = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(files)
        .output();
    match o {
        Ok(o) => {
            assert!(o.status.success(), "kubernetes-validate: {}", text(&o));
            eprintln!("kubernetes-validate --strict: {} files pass", files.len());
        }
        Err(e) => {
            assert!(
                std::env::var("TIDEMESH_REQUIRE_K8S_SCHEMA").as_deref() != Ok("1"),
                "kubernetes-validate: {e} (TIDEMESH_REQUIRE_K8S_SCHEMA=1; pip install kubernetes-validate)"
            );
            eprintln!("SKIP the schema check: kubernetes-validate not found ({e}); pip install kubernetes-validate");
        }
    }
}

#[test]
fn k8s_manifests_pass_the_schema_check_and_run_the_hub() {
    use serde::Deserialize;
    use serde_json::Value;
    let root = repo_root();
    let mut files: Vec<_> = std::fs::read_dir(root.join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    k8s_schema_check(&files);

    let mut docs: Vec<Value> = Vec::new();
    for f in &files {
        let s = std::fs::read_to_string(f).expect("read");
        for d in serde_yaml_ng::Deserializer::from_str(&s) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(
                v["apiVersion"].is_string() && v["kind"].is_string(),
                "{}: {v}",
                f.display()
            );
            docs.push(v);
        }
    }
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .expect("a StatefulSet")
        .clone();
    let pod = &sts["spec"]["template"]["spec"];
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    let hub = &pod["containers"][0];
    let init = &pod["initContainers"][0];

    // Services select the pods and name container ports; UDP 7443 for QUIC.
    let ports = hub["ports"].as_array().expect("ports");
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    for s in &services {
        for (k, v) in s["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(
                &labels[k], v,
                "service {} selects the pods",
                s["metadata"]["name"]
            );
        }
        for p in s["spec"]["ports"].as_array().expect("ports") {
            let c = ports
                .iter()
                .find(|c| c["name"] == p["targetPort"])
                .unwrap_or_else(|| panic!("targetPort {} is no container port", p["targetPort"]));
            assert_eq!(c["protocol"], p["protocol"]);
        }
    }
    assert!(services
        .iter()
        .any(|s| s["spec"]["ports"].as_array().is_some_and(|ps| ps
            .iter()
            .any(|p| p["protocol"] == "UDP" && p["port"] == 7443))));
    let governing = find(
        "Service",
        sts["spec"]["serviceName"].as_str().expect("serviceName"),
    );
    assert_eq!(governing["spec"]["clusterIP"], "None", "headless");

    // The data directory is on the claim template's volume.
    let claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].clone();
    let mount = hub["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == claim))
        .expect("the hub mounts the claim")["mountPath"]
        .as_str()
        .expect("mountPath")
        .to_owned();
    assert_eq!(init["volumeMounts"][0]["mountPath"], mount.as_str());
    // Same non-root UID as the image.
    let cf = std::fs::read_to_string(root.join("deploy/container/Containerfile")).expect("read");
    let uid = pod["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser");
    assert!(
        cf.contains(&format!("\nUSER {uid}:")),
        "runAsUser {uid} is the image's USER"
    );

    // Run the pod's commands on the real binary, the volume under a temp
    // dir: the init container's script (twice: the second start keeps the
    // CA), then the hub with the ConfigMap's settings, and its probes.
    let tmp = tempfile::tempdir().expect("tempdir");
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).expect("mkdir");
    let bin_dir = bin("tidemesh-hub").parent().expect("bin dir").to_path_buf();
    let metrics = tidemesh_tests::free_tcp();
    let env_of = |c: &Value| {
        let mut env: Vec<(String, String)> = Vec::new();
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let cm = find(
                "ConfigMap",
                from["configMapRef"]["name"].as_str().expect("name"),
            );
            for (k, v) in cm["data"].as_object().expect("data") {
                env.push((k.clone(), v.as_str().expect("string").to_owned()));
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let v = relocate(e["value"].as_str().expect("value"), &mount, &vol);
            env.push((e["name"].as_str().expect("name").to_owned(), v));
        }
        env
    };
    let pod_cmd = |c: &Value, argv: Vec<String>| {
        let mut cmd = if argv[0] == "tidemesh-hub" {
            clean_cmd("tidemesh-hub")
        } else {
            Command::new(&argv[0])
        };
        cmd.args(&argv[1..]);
        for (k, v) in env_of(c) {
            cmd.env(k, v);
        }
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", bin_dir.display()))
            .env("TIDEMESH_LISTEN", "127.0.0.1:0")
            .env("TIDEMESH_METRICS", metrics.to_string());
        cmd
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| s.as_str().expect("string").to_owned())
            .collect()
    };
    let init_argv = strings(&init["command"]);
    let o = run(&mut pod_cmd(init, init_argv.clone()));
    assert!(o.status.success(), "init container: {}", text(&o));
    let data = env_of(hub)
        .into_iter()
        .find(|(k, _)| k == "TIDEMESH_DATA_DIR")
        .expect("TIDEMESH_DATA_DIR")
        .1;
    let key = std::path::Path::new(&data).join("ca_key.pem");
    let ca = std::fs::read(&key).expect("the init container made the CA");
    let o = run(&mut pod_cmd(init, init_argv));
    assert!(o.status.success(), "init container again: {}", text(&o));
    assert_eq!(
        std::fs::read(&key).expect("CA"),
        ca,
        "the second start keeps the CA"
    );

    // The main container: the image's ENTRYPOINT with the pod's args.
    let mut argv = vec!["tidemesh-hub".to_owned()];
    argv.extend(strings(&hub["args"]));
    let (_hub, _) = spawn_hub_serve(pod_cmd(hub, argv), &tmp.path().join("hub.log"));
    for probe in ["readinessProbe", "livenessProbe"] {
        let g = &hub[probe]["httpGet"];
        let port = ports
            .iter()
            .find(|p| p["name"] == g["port"])
            .unwrap_or_else(|| panic!("{probe} port {} is no container port", g["port"]));
        assert_eq!(port["protocol"], "TCP");
        let path = g["path"].as_str().expect("path");
        let (status, body) = wait_for(Duration::from_secs(20), || {
            http_get(metrics, path).filter(|(s, _)| *s == 200)
        })
        .unwrap_or_else(|| panic!("{probe} GET {path} never answered 200"));
        assert_eq!(status, 200, "{probe} {path}: {body}");
    }
    assert_eq!(hub["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(hub["livenessProbe"]["httpGet"]["path"], "/healthz");
}
