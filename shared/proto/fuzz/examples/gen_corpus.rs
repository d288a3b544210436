//! Writes the seed corpus in `corpus/` from valid messages, so the fuzzer
//! starts from frames and tokens that get past the first checks.
//!
//! Run from anywhere (stable is fine, nothing here is instrumented):
//! `cargo run --manifest-path shared/proto/fuzz/Cargo.toml --example gen_corpus`
//! and commit what changed. Files are named after the message they hold, so a
//! rerun overwrites them instead of adding copies.

use std::fs;
use std::path::Path;

use tidemesh_proto::{encode_frame, ErrorCode, JoinToken, Request, Response};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let frames = root.join("control_frame");
    let tokens = root.join("join_token");
    fs::create_dir_all(&frames).expect("create corpus/control_frame");
    fs::create_dir_all(&tokens).expect("create corpus/join_token");

    let node = "spiffe://corp.example/store/sf01/node/n1"
        .parse()
        .expect("valid node id");
    let workload = "spiffe://corp.example/store/sf01/sa/pos"
        .parse()
        .expect("valid workload id");

    let requests = [
        (
            "req_hello",
            Request::Hello {
                agent: "tidemesh-spoke/0.1.0".into(),
            },
        ),
        (
            "req_enroll",
            Request::Enroll {
                token: "ab".repeat(32),
                spoke: node,
                csr: vec![0x30, 0x82, 0x01, 0x0a, 0x02, 0x01, 0x00],
            },
        ),
        ("req_renew", Request::Renew { csr: vec![0x30; 8] }),
        (
            "req_issue_workload",
            Request::IssueWorkload {
                id: workload,
                csr: vec![0x30, 0x03, 0x02, 0x01, 0x00],
            },
        ),
        (
            "req_reestablish",
            Request::Reestablish {
                spoke: "spiffe://td/store/a/node/b".parse().expect("valid id"),
                csr: vec![0x30, 0x00],
                proof: vec![0x30, 0x44, 0x02, 0x20, 0x01],
            },
        ),
        ("req_ping", Request::Ping),
    ];
    let responses = [
        (
            "resp_welcome",
            Response::Welcome {
                hub_time_unix_ms: 1_767_225_600_000,
            },
        ),
        (
            "resp_certificate",
            Response::Certificate {
                chain: vec![vec![0x30, 0x82, 0x01], vec![0x30, 0x05]],
                bundle: vec![vec![0x30, 0x01, 0x00]],
            },
        ),
        ("resp_pong", Response::Pong),
        (
            "resp_error",
            Response::Error {
                code: ErrorCode::OfflineWindowExceeded,
                message: "offline window exceeded; enroll again".into(),
            },
        ),
    ];
    for (name, msg) in &requests {
        write(&frames, name, &encode_frame(msg).expect("encodes"));
    }
    for (name, msg) in &responses {
        write(&frames, name, &encode_frame(msg).expect("encodes"));
    }

    let spoke = "spiffe://corp.example/store/sf01/node/n1"
        .parse()
        .expect("valid node id");
    let token = JoinToken::new(spoke, &[0x5a; 32], [0xc3; 32]).to_string();
    write(&tokens, "valid", token.as_bytes());
    write(&tokens, "valid_padded", format!("  {token}\n").as_bytes());
    let root_id = "spiffe://td".parse().expect("valid trust domain id");
    let short = JoinToken::new(root_id, &[0; 32], [0xff; 32]).to_string();
    write(&tokens, "valid_trust_domain_id", short.as_bytes());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("{} ({} bytes)", path.display(), bytes.len());
}
