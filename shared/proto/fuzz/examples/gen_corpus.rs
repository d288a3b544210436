//! Writes the seed corpus in `corpus/` from valid messages, so the fuzzer
//! starts from frames, tokens, evidence batches and evidence chains that get
//! past the first checks.
//!
//! Run from anywhere (stable is fine, nothing here is instrumented):
//! `cargo run --manifest-path shared/proto/fuzz/Cargo.toml --example gen_corpus`
//! and commit what changed. Files are named after the message they hold, so a
//! rerun overwrites them instead of adding copies.

use std::fs;
use std::path::Path;

use tidemesh_evidence::{
    samples, Batch, Chain, NewRecord, SealedRecord, ShedReason, ShedRun, UnixMillis,
};
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

    evidence(&root);
}

/// Seeds for `evidence_batch` and `evidence_chain`, from one valid chain of
/// `tidemesh_evidence::samples` records (every body kind, and a shed record).
fn evidence(root: &Path) {
    let batches = root.join("evidence_batch");
    let chains = root.join("evidence_chain");
    fs::create_dir_all(&batches).expect("create corpus/evidence_batch");
    fs::create_dir_all(&chains).expect("create corpus/evidence_chain");

    // Must match the spoke id in fuzz_targets/evidence_chain.rs, whose
    // verifier starts at this spoke's genesis.
    let spoke = "spiffe://edge.company.com/store/sf01/node/n1"
        .parse()
        .expect("valid spoke id");
    let at = |s: u64| UnixMillis(1_767_225_600_000 + s * 1000);
    let mut chain = Chain::genesis(&spoke);
    let mut append = |body| chain.append(NewRecord::new(at(1), body)).expect("seals");
    // 1..=4: one record of each kind but shed, then 5..=7 requests, 8 a config.
    let mut records = vec![
        append(samples::request(1, at(1))),
        append(samples::mode_transition()),
        append(samples::certificate_renewed(at(2))),
        append(samples::config_applied()),
    ];
    let dropped: Vec<SealedRecord> = (5..=7)
        .map(|i| append(samples::drill_request("fuzz-seed", i, at(i))))
        .collect();
    let after_shed = append(samples::config_applied());
    // Records 5..=7 shed, as the spoke's buffer does when it is full.
    let mut run = ShedRun::new();
    for r in &dropped {
        run.drop_record(r.seq, r.timestamp, r.class, r.hash)
            .expect("contiguous non-audit records");
    }
    let shed = run
        .seal(&records[3].link(), ShedReason::BufferFull, at(9))
        .expect("non-empty run");
    records.push(shed);
    records.push(after_shed);

    // A DER-shaped placeholder: decode checks only the signature's length.
    let signature = vec![0x30; 70];
    let batch = |records: &[SealedRecord]| Batch {
        spoke: spoke.clone(),
        first_seq: records[0].seq,
        records: records.to_vec(),
        signature: signature.clone(),
    };
    let encode = |b: Batch| b.encode().expect("batch encodes");
    write(&batches, "one_record", &encode(batch(&records[..1])));
    write(&batches, "every_kind", &encode(batch(&records[..4])));
    write(&batches, "shed_and_after", &encode(batch(&records[4..])));
    write(&batches, "whole_chain", &encode(batch(&records)));

    // evidence_chain input: a flags byte, then u16-LE-length-prefixed records.
    let framed = |flags: u8, records: &[SealedRecord]| {
        let mut out = vec![flags];
        for r in records {
            let bytes = r.encode();
            let len = u16::try_from(bytes.len()).expect("a seed record fits a u16 length");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        out
    };
    write(&chains, "one_record", &framed(0, &records[..1]));
    write(&chains, "whole_chain", &framed(0, &records));
    write(&chains, "whole_chain_reseal", &framed(1, &records));
    write(&chains, "gap_peeked_key", &framed(2, &records[1..]));
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("{} ({} bytes)", path.display(), bytes.len());
}
