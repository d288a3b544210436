//! Crate tests: golden encodings, JSON names, chain properties, batches.

use std::path::PathBuf;

use proptest::prelude::*;
use tidemesh_identity::{svid, SpiffeId};

use crate::record::*;
use crate::samples;
use crate::types::*;
use crate::*;

fn spoke() -> SpiffeId {
    SpiffeId::parse("spiffe://edge.company.com/store/sf01/node/n1").expect("valid id")
}

const T0: UnixMillis = UnixMillis(1_705_314_600_000);

fn at(offset_ms: u64) -> UnixMillis {
    UnixMillis(T0.0 + offset_ms)
}

/// The golden chain: one record of every appendable kind, then a shed record
/// standing for two dropped requests, then one more request.
fn golden_chain() -> Vec<SealedRecord> {
    let mut chain = Chain::genesis(&spoke());
    let mut out = Vec::new();
    let mut push = |chain: &mut Chain, r: NewRecord| {
        out.push(chain.append(r).expect("appends"));
    };
    push(
        &mut chain,
        NewRecord::new(at(0), samples::request(1, at(0))),
    );
    push(
        &mut chain,
        NewRecord::new(at(1), samples::mode_transition()),
    );
    push(
        &mut chain,
        NewRecord::new(at(2), samples::certificate_renewed(at(2))),
    );
    push(&mut chain, NewRecord::new(at(3), samples::config_applied()));
    push(
        &mut chain,
        NewRecord {
            timestamp: at(4),
            class: PriorityClass::Debug,
            body: samples::drill_request("drill-1", 0, at(4)),
        },
    );
    push(
        &mut chain,
        NewRecord::new(at(5), samples::request(2, at(5))),
    );
    push(
        &mut chain,
        NewRecord::new(at(6), samples::request(3, at(6))),
    );
    push(
        &mut chain,
        NewRecord::new(at(7), samples::request(4, at(7))),
    );
    // Shed records 6 and 7 (the buffer would do this when full).
    let mut run = ShedRun::new();
    for r in &out[5..7] {
        run.drop_record(r.seq, r.timestamp, r.class, r.hash)
            .expect("contiguous");
    }
    let shed = run
        .seal(&out[4].link(), ShedReason::BufferFull, at(9))
        .expect("non-empty");
    out.splice(5..7, [shed]);
    out
}

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

/// Compares `actual` with the golden file `name`; with `TIDEMESH_BLESS=1`
/// writes it instead.
fn golden(name: &str, actual: &str) {
    let path = testdata(name);
    if std::env::var_os("TIDEMESH_BLESS").is_some() {
        std::fs::write(&path, actual).expect("writes golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "golden file {} differs: this is a format change. Bump the format version, \
         then rerun with TIDEMESH_BLESS=1 to rewrite it.\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn hex_lines(bytes: &[u8]) -> String {
    let h = svid::hex(bytes);
    let mut s = String::new();
    for chunk in h.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s
}

#[test]
fn golden_genesis() {
    let g = genesis_hash(&spoke());
    golden(
        "genesis_v1.hex",
        &format!(
            "# SHA-256(\"tidemesh-evidence-genesis-v1\" || \"{}\")\n{}\n",
            spoke(),
            g
        ),
    );
}

#[test]
fn golden_records() {
    let chain = golden_chain();
    let mut s = String::from(
        "# postcard SealedRecord v1: seq, timestamp, class, body, hash (see src/lib.rs)\n",
    );
    for r in &chain {
        s.push_str(&format!(
            "# seq {} {} {} canonical {} bytes + hash\n",
            r.seq,
            r.class,
            r.body.kind().as_str(),
            r.canonical_bytes().len()
        ));
        s.push_str(&hex_lines(&r.encode()));
    }
    golden("records_v1.hex", &s);
    verify_chain(&ChainPosition::genesis(&spoke()), &chain).expect("golden chain verifies");
}

#[test]
fn golden_json() {
    let chain = golden_chain();
    let mut s = serde_json::to_string_pretty(&chain).expect("serializes");
    s.push('\n');
    golden("records_v1.json", &s);
    let back: Vec<SealedRecord> = serde_json::from_str(&s).expect("json parses back");
    assert_eq!(back, chain);
}

#[test]
fn golden_batch() {
    let chain = golden_chain();
    let batch = Batch {
        spoke: spoke(),
        first_seq: chain[0].seq,
        // ECDSA signatures are randomized; the golden uses fixed bytes.
        signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
        records: chain,
    };
    let mut s = String::from("# signed bytes\n");
    s.push_str(&hex_lines(&batch.signed_bytes()));
    s.push_str("# encoded batch v1\n");
    s.push_str(&hex_lines(&batch.encode().expect("encodes")));
    golden("batch_v1.hex", &s);
}

#[test]
fn json_uses_the_seed_field_names() {
    let rec = &golden_chain()[0];
    let v = serde_json::to_value(rec).expect("serializes");
    let req = &v["body"]["request"];
    assert_eq!(v["timestamp"], "2024-01-15T10:30:00.000Z");
    assert_eq!(v["class"], "request");
    assert_eq!(
        req["identity"]["client_identity"],
        "spiffe://cluster.local/ns/default/sa/frontend"
    );
    assert_eq!(
        req["identity"]["certificate_fingerprint"],
        format!("sha256:{}", "ab".repeat(32))
    );
    assert_eq!(req["identity"]["tls_version"], "1.3");
    assert_eq!(req["identity"]["cipher_suite"], "TLS_AES_256_GCM_SHA384");
    assert_eq!(
        req["policy_evaluation"]["policy_name"],
        "allow-frontend-to-backend"
    );
    assert_eq!(req["policy_evaluation"]["policy_version"], "v1.2.3");
    assert_eq!(req["policy_evaluation"]["final_decision"], "ALLOW");
    assert_eq!(req["rate_limit_check"]["tokens_remaining"], 5);
    assert_eq!(
        req["routing_decision"]["load_balancing_algorithm"],
        "weighted_round_robin"
    );
    assert_eq!(
        req["routing_decision"]["selected_endpoint"],
        "10.0.1.5:8080"
    );
    assert_eq!(
        req["routing_decision"]["available_endpoints"][0]["address"],
        "10.0.1.5:8080"
    );
    assert_eq!(req["reliability"]["circuit_breaker"]["state"], "closed");
    assert_eq!(
        req["reliability"]["circuit_breaker"]["error_threshold"],
        0.5
    );
    assert_eq!(req["reliability"]["retry_state"]["attempt"], 1);
    assert_eq!(req["telemetry"]["operation_name"], "POST /api/charge");
    assert_eq!(req["telemetry"]["status"]["code"], "OK");
    assert_eq!(req["telemetry"]["status_code"], 200);
    assert_eq!(req["telemetry"]["start_time"], "2024-01-15T10:30:00.000Z");
    assert!(req["telemetry"]["parent_span_id"].is_string());
    assert!(req["drill"].is_null());

    let mt = serde_json::to_value(samples::mode_transition()).expect("serializes");
    let mt = &mt["mode_transition"];
    assert_eq!(mt["trigger"], "high_error_rate");
    assert_eq!(mt["evidence"]["error_rate"], 0.35);
    assert_eq!(mt["evidence"]["threshold"], 0.3);
    assert_eq!(mt["actions"][0], "reduce_retry_attempts_to_2");

    let shed = serde_json::to_value(&golden_chain()[5]).expect("serializes");
    let s = &shed["body"]["shed"];
    assert_eq!(s["range"]["first"], 6);
    assert_eq!(s["range"]["last"], 7);
    assert_eq!(s["count"], 2);
    assert_eq!(s["reason"], "buffer_full");
    assert_eq!(shed["class"], "audit");
}

#[test]
fn sample_request_size_is_what_the_buffer_sizing_assumes() {
    let rec = &golden_chain()[0];
    let len = rec.encode().len();
    // The spoke buffer's default capacity assumes ~500 bytes per request
    // record; a full seed-shaped record must stay in that range.
    assert!((300..=600).contains(&len), "request record is {len} bytes");
}

#[test]
fn header_peek_matches_decode_for_every_kind() {
    for r in golden_chain() {
        let bytes = r.encode();
        let h = RecordHeader::peek(&bytes).expect("peeks");
        assert_eq!(
            (h.seq, h.timestamp, h.class, h.kind, h.hash),
            (r.seq, r.timestamp, r.class, r.body.kind(), r.hash)
        );
        assert_eq!(SealedRecord::decode(&bytes).expect("decodes"), r);
        assert_eq!(
            RecordKind::parse(r.body.kind().as_str()),
            Some(r.body.kind())
        );
    }
    assert!(RecordHeader::peek(&[]).is_err());
    assert!(RecordHeader::peek(&[1, 2, 0, 0]).is_err());
}

#[test]
fn append_encoded_matches_append() {
    let mut a = Chain::genesis(&spoke());
    let mut b = Chain::genesis(&spoke());
    for i in 0..5 {
        let body = samples::request(i, at(i));
        let sealed = a
            .append(NewRecord::new(at(i), body.clone()))
            .expect("appends");
        let enc = b.append_encoded(
            at(i),
            PriorityClass::Request,
            &EncodedBody::new(&body).expect("encodes"),
        );
        assert_eq!(enc.bytes, sealed.encode());
        assert_eq!((enc.seq, enc.hash), (sealed.seq, sealed.hash));
        assert_eq!(a.position(), b.position());
    }
}

#[test]
fn shed_bodies_cannot_be_appended() {
    let shed = golden_chain()[5].body.clone();
    assert_eq!(EncodedBody::new(&shed), Err(RecordError::ReservedKind));
    let mut c = Chain::genesis(&spoke());
    assert_eq!(
        c.append(NewRecord::new(T0, shed)),
        Err(RecordError::ReservedKind)
    );
    assert_eq!(c.position(), &ChainPosition::genesis(&spoke()));
}

#[test]
fn oversized_records_are_refused() {
    let mut body = samples::request(0, T0);
    if let RecordBody::Request(r) = &mut body {
        r.service_name = "x".repeat(MAX_RECORD_BYTES);
    }
    assert!(matches!(
        EncodedBody::new(&body),
        Err(RecordError::TooLarge { .. })
    ));
    assert!(matches!(
        Chain::genesis(&spoke()).append(NewRecord::new(T0, body)),
        Err(RecordError::TooLarge { .. })
    ));
    assert!(matches!(
        SealedRecord::decode(&vec![0; MAX_RECORD_BYTES + 1]),
        Err(RecordError::TooLarge { .. })
    ));
}

#[test]
fn decode_is_strict() {
    let r = &golden_chain()[1];
    let bytes = r.encode();
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        SealedRecord::decode(&trailing),
        Err(RecordError::TrailingBytes(1))
    );
    // seq 2 as an over-long varint (0x82 0x00) decodes to the same record.
    assert_eq!(bytes[0], 2);
    let mut long = vec![0x82, 0x00];
    long.extend_from_slice(&bytes[1..]);
    assert_eq!(SealedRecord::decode(&long), Err(RecordError::NonCanonical));
    assert!(matches!(
        SealedRecord::decode(&bytes[..bytes.len() - 1]),
        Err(RecordError::Malformed(_))
    ));
}

#[test]
fn verifier_names_gaps_duplicates_and_alterations() {
    let chain = golden_chain();
    let g = ChainPosition::genesis(&spoke());
    let ok = verify_chain(&g, &chain).expect("verifies");
    assert_eq!(ok.records(), chain.len() as u64);
    assert_eq!(ok.shed_records(), 1);
    assert_eq!(ok.dropped(), 2);
    assert_eq!(ok.end().next_seq, EvidenceSeq::new(9).expect("non-zero"));
    assert_eq!(ok.end().hash, chain[chain.len() - 1].hash);

    // Missing record 3.
    let mut gap = chain.clone();
    gap.remove(2);
    let e = verify_chain(&g, &gap).expect_err("gap");
    assert_eq!(e.seq.get(), 3);
    assert_eq!(
        e.kind,
        ChainErrorKind::Gap {
            found: EvidenceSeq::new(4).expect("non-zero")
        }
    );

    // Record 2 repeated.
    let mut dup = chain.clone();
    dup.insert(2, chain[1].clone());
    let e = verify_chain(&g, &dup).expect_err("dup");
    assert_eq!(e.seq.get(), 3);
    assert!(matches!(e.kind, ChainErrorKind::OutOfOrder { .. }));

    // A changed field in record 4.
    let mut alt = chain.clone();
    alt[3].timestamp = UnixMillis(alt[3].timestamp.0 + 1);
    let e = verify_chain(&g, &alt).expect_err("altered");
    assert_eq!((e.seq.get(), e.kind), (4, ChainErrorKind::HashMismatch));

    // The shed record's last_hash changed and its own hash recomputed: the
    // record after the range no longer links.
    let mut forged = chain.clone();
    if let RecordBody::Shed(s) = &mut forged[5].body {
        s.last_hash = ChainHash([0; 32]);
    }
    forged[5].hash = forged[5].expected_hash(&forged[4].link());
    let e = verify_chain(&g, &forged).expect_err("forged");
    assert_eq!((e.seq.get(), e.kind), (8, ChainErrorKind::HashMismatch));

    // Starting from a checkpoint.
    let cp = ChainPosition::after(&chain[2]);
    let tail = verify_chain(&cp, &chain[3..]).expect("verifies from checkpoint");
    assert_eq!(tail.start(), &cp);
    // The wrong spoke's genesis.
    let other = SpiffeId::parse("spiffe://edge.company.com/store/sf02/node/n1").expect("id");
    let e = verify_chain(&ChainPosition::genesis(&other), &chain).expect_err("other spoke");
    assert_eq!((e.seq.get(), e.kind), (1, ChainErrorKind::HashMismatch));
}

#[test]
fn malformed_shed_records_are_refused() {
    let chain = golden_chain();
    let g = ChainPosition::genesis(&spoke());
    let reseal = |f: &dyn Fn(&mut ShedRecord, &mut SealedRecord)| {
        let mut c = chain.clone();
        let mut rec = c[5].clone();
        let mut s = rec.as_shed().expect("shed").clone();
        f(&mut s, &mut rec);
        rec.body = RecordBody::Shed(s);
        rec.hash = rec.expected_hash(&c[4].link());
        c[5] = rec;
        verify_chain(&g, &c).expect_err("refused")
    };
    type Mutate = fn(&mut ShedRecord, &mut SealedRecord);
    let cases: [(&str, Mutate); 5] = [
        ("count 0", |s, _| s.count = 0),
        ("count too big", |s, _| s.count = 3),
        ("request class", |_, r| r.class = PriorityClass::Request),
        ("sheds audit", |s, _| s.class = PriorityClass::Audit),
        ("range start", |s, _| {
            s.range.first = EvidenceSeq::new(5).expect("non-zero")
        }),
    ];
    for (what, f) in cases {
        let e = reseal(&f);
        assert_eq!(e.seq.get(), 6, "{what}");
        assert!(matches!(e.kind, ChainErrorKind::BadShed(_)), "{what}: {e}");
    }
}

#[test]
fn extreme_shed_ranges_do_not_panic() {
    let chain = golden_chain();
    let g = ChainPosition::genesis(&spoke());
    let mut c = chain[..6].to_vec();
    let mut rec = c[5].clone();
    let mut s = rec.as_shed().expect("shed").clone();
    s.range.last = EvidenceSeq::new(u64::MAX).expect("non-zero");
    s.count = u64::MAX - 5;
    rec.body = RecordBody::Shed(s.clone());
    rec.hash = rec.expected_hash(&c[4].link());
    c[5] = rec.clone();
    let v = verify_chain(&g, &c).expect("a range to the end of time is well formed");
    assert_eq!(v.end().next_seq.get(), u64::MAX);
    let mut inverted = s;
    inverted.range.last = EvidenceSeq::FIRST;
    rec.body = RecordBody::Shed(inverted);
    rec.hash = rec.expected_hash(&c[4].link());
    c[5] = rec;
    let e = verify_chain(&g, &c).expect_err("inverted range");
    assert_eq!(e.kind, ChainErrorKind::BadShed("empty range"));
}

#[test]
fn resume_shed_cuts_at_the_hub_position() {
    // The spoke sealed 1..=10, the hub received 1..=5, then the spoke shed
    // 3..=8 before the acks came back.
    let mut chain = Chain::genesis(&spoke());
    let recs: Vec<_> = (0..10)
        .map(|i| {
            chain
                .append(NewRecord::new(at(i), samples::request(i, at(i))))
                .expect("appends")
        })
        .collect();
    let mut run = ShedRun::new();
    for r in &recs[2..8] {
        run.drop_record(r.seq, r.timestamp, r.class, r.hash)
            .expect("contiguous");
    }
    assert_eq!(run.dropped(), 6);
    let shed = run
        .seal(&recs[1].link(), ShedReason::BufferFull, at(20))
        .expect("non-empty");
    let spoke_side = [
        recs[0].clone(),
        recs[1].clone(),
        shed.clone(),
        recs[8].clone(),
        recs[9].clone(),
    ];
    let g = ChainPosition::genesis(&spoke());
    verify_chain(&g, &spoke_side).expect("spoke chain verifies");

    let hub_pos = ChainPosition::after(&recs[4]);
    let cut = resume_shed(&shed, &hub_pos).expect("inside the range");
    let s = cut.as_shed().expect("shed");
    assert_eq!(
        (s.range.first.get(), s.range.last.get(), s.count),
        (6, 8, 3)
    );
    let hub_side: Vec<_> = recs[..5]
        .iter()
        .cloned()
        .chain([cut, recs[8].clone(), recs[9].clone()])
        .collect();
    let v = verify_chain(&g, &hub_side).expect("hub chain verifies");
    assert_eq!(v.dropped(), 3);

    assert_eq!(
        resume_shed(&shed, &ChainPosition::after(&recs[1])),
        Ok(shed.clone())
    );
    assert!(matches!(
        resume_shed(&shed, &ChainPosition::after(&recs[8])),
        Err(ShedError::OutsideRange { .. })
    ));
    assert!(matches!(
        resume_shed(&recs[0], &hub_pos),
        Err(ShedError::NotShed(_))
    ));
}

#[test]
fn shed_runs_merge_and_refuse_audit_and_gaps() {
    let mut chain = Chain::genesis(&spoke());
    let recs: Vec<_> = (0..6)
        .map(|i| {
            chain
                .append(NewRecord {
                    timestamp: at(i),
                    class: if i % 2 == 0 {
                        PriorityClass::Debug
                    } else {
                        PriorityClass::Request
                    },
                    body: samples::request(i, at(i)),
                })
                .expect("appends")
        })
        .collect();
    let mut first = ShedRun::new();
    first
        .drop_record(recs[0].seq, recs[0].timestamp, recs[0].class, recs[0].hash)
        .expect("first");
    let g = ChainPosition::genesis(&spoke());
    let s1 = first
        .seal(&g.hash, ShedReason::BufferFull, at(10))
        .expect("sealed");
    assert_eq!(s1.as_shed().expect("shed").class, PriorityClass::Debug);

    let mut merged = ShedRun::new();
    merged.absorb(s1.as_shed().expect("shed")).expect("absorbs");
    for r in &recs[1..4] {
        merged
            .drop_record(r.seq, r.timestamp, r.class, r.hash)
            .expect("contiguous");
    }
    assert_eq!(merged.dropped(), 3);
    let s2 = merged
        .seal(&g.hash, ShedReason::BufferFull, at(11))
        .expect("sealed");
    let body = s2.as_shed().expect("shed");
    assert_eq!((body.count, body.class), (4, PriorityClass::Request));
    assert_eq!(body.first_timestamp, recs[0].timestamp);
    verify_chain(&g, &[s2, recs[4].clone(), recs[5].clone()]).expect("verifies");

    let mut bad = ShedRun::new();
    assert_eq!(
        bad.drop_record(recs[0].seq, T0, PriorityClass::Audit, recs[0].hash),
        Err(ShedError::Audit(recs[0].seq))
    );
    bad.drop_record(recs[0].seq, T0, PriorityClass::Debug, recs[0].hash)
        .expect("ok");
    assert!(matches!(
        bad.drop_record(recs[2].seq, T0, PriorityClass::Debug, recs[2].hash),
        Err(ShedError::NotContiguous { .. })
    ));
    assert_eq!(
        ShedRun::new().seal(&g.hash, ShedReason::BufferFull, T0),
        None
    );
}

// ---- batches ----------------------------------------------------------------

fn signed_batch() -> (Batch, svid::KeyPair) {
    let key = svid::generate_key().expect("key");
    let batch = Batch::sign(spoke(), golden_chain(), &key).expect("signs");
    (batch, key)
}

#[test]
fn batch_roundtrip_and_signature() {
    let (batch, key) = signed_batch();
    let bytes = batch.encode().expect("encodes");
    let back = Batch::decode(&bytes).expect("decodes");
    assert_eq!(back, batch);
    let v = back
        .clone()
        .verify_signature(key.public_key_raw())
        .expect("verifies");
    assert_eq!(v.spoke(), &spoke());
    assert_eq!(v.first_seq(), EvidenceSeq::FIRST);
    assert_eq!(v.records().len(), 7);
    verify_chain(&ChainPosition::genesis(&spoke()), v.records()).expect("chain verifies");

    let other = svid::generate_key().expect("key");
    assert_eq!(
        back.clone().verify_signature(other.public_key_raw()),
        Err(BatchError::BadSignature)
    );
    let mut tampered = back;
    tampered.records[2].timestamp = UnixMillis(0);
    assert_eq!(
        tampered.verify_signature(key.public_key_raw()),
        Err(BatchError::BadSignature)
    );
}

#[test]
fn batch_decoder_refuses_bad_input() {
    let (batch, _) = signed_batch();
    let bytes = batch.encode().expect("encodes");
    assert!(matches!(
        Batch::decode(&vec![0; MAX_BATCH_BYTES + 1]),
        Err(BatchError::TooLarge { .. })
    ));
    assert_eq!(Batch::decode(&[]), Err(BatchError::Truncated));
    let mut v2 = bytes.clone();
    v2[0] = 2;
    assert_eq!(
        Batch::decode(&v2),
        Err(BatchError::UnsupportedVersion { got: 2 })
    );
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(Batch::decode(&trailing), Err(BatchError::TrailingBytes(1)));
    assert!(matches!(
        Batch::decode(&bytes[..bytes.len() - 3]),
        Err(BatchError::Malformed(_))
    ));

    let reencode = |b: &Batch| {
        let mut out = postcard::to_allocvec(&crate::batch::BATCH_VERSION).expect("enc");
        out.extend(postcard::to_allocvec(b).expect("enc"));
        out
    };
    let mut empty = batch.clone();
    empty.records.clear();
    assert_eq!(Batch::decode(&reencode(&empty)), Err(BatchError::Empty));
    let mut gap = batch.clone();
    gap.records.remove(1);
    assert!(matches!(
        Batch::decode(&reencode(&gap)),
        Err(BatchError::NotContiguous { .. })
    ));
    let mut first = batch.clone();
    first.first_seq = EvidenceSeq::new(2).expect("non-zero");
    assert!(matches!(
        Batch::decode(&reencode(&first)),
        Err(BatchError::FirstSeqMismatch { .. })
    ));
    let mut sig = batch.clone();
    sig.signature = vec![0; 73];
    assert_eq!(
        Batch::decode(&reencode(&sig)),
        Err(BatchError::SignatureLength(73))
    );
    assert_eq!(
        Batch::sign(spoke(), Vec::new(), &svid::generate_key().expect("key")),
        Err(BatchError::Empty)
    );
}

#[test]
fn fitting_records_respects_the_limit() {
    let chain = golden_chain();
    let all = fitting_records(&spoke(), &chain, MAX_BATCH_BYTES);
    assert_eq!(all, chain.len());
    let two = chain[0].encode().len() + chain[1].encode().len();
    let n = fitting_records(&spoke(), &chain, two + 200);
    assert!((1..chain.len()).contains(&n), "{n}");
    assert_eq!(fitting_records(&spoke(), &chain, 1), 1);
    assert_eq!(fitting_records(&spoke(), &[], 1000), 0);
    let key = svid::generate_key().expect("key");
    let b = Batch::sign(spoke(), chain[..n].to_vec(), &key).expect("signs");
    assert!(b.encode().expect("encodes").len() <= two + 200);
}

// ---- properties -------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn spiffe() -> impl Strategy<Value = SpiffeId> {
    "spiffe://[a-z]{1,8}\\.example(/[a-z0-9]{1,6}){0,3}"
        .prop_map(|s| SpiffeId::parse(&s).expect("strategy yields valid ids"))
}

fn millis() -> impl Strategy<Value = UnixMillis> {
    (0u64..4_000_000_000_000).prop_map(UnixMillis)
}

fn ratio() -> impl Strategy<Value = Ratio> {
    any::<u32>().prop_map(Ratio)
}

fn request_body() -> impl Strategy<Value = RecordBody> {
    let identity = (
        proptest::option::of(spiffe()),
        proptest::option::of(spiffe()),
        proptest::option::of(any::<[u8; 32]>().prop_map(Sha256Digest)),
        prop_oneof![
            Just(TlsVersion::None),
            Just(TlsVersion::Tls12),
            Just(TlsVersion::Tls13)
        ],
        proptest::option::of(text()),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(c, s, f, v, cs, t, h)| IdentityEvidence {
            client_identity: c,
            server_identity: s,
            certificate_fingerprint: f,
            tls_version: v,
            cipher_suite: cs,
            trust_chain_verified: t,
            handshake_duration_us: h,
        });
    let authz = (
        text(),
        text(),
        proptest::option::of(text()),
        any::<bool>(),
        text(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(p, v, r, allow, why, us, cached)| AuthorizationEvidence {
            policy_name: p,
            policy_version: v,
            matched_rule: r,
            final_decision: if allow {
                Decision::Allow
            } else {
                Decision::Deny
            },
            reason: why,
            evaluation_time_us: us,
            cached,
        });
    let rate =
        (any::<bool>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(ok, t, l, c)| {
            RateLimitEvidence {
                decision: if ok {
                    RateDecision::Allowed
                } else {
                    RateDecision::Limited
                },
                tokens_remaining: t,
                limit: l,
                current_rate: c,
            }
        });
    let locality = prop_oneof![
        Just(Locality::Local),
        Just(Locality::SameZone),
        Just(Locality::SameRegion),
        Just(Locality::OtherRegion)
    ];
    let candidate = (
        text(),
        any::<u32>(),
        any::<bool>(),
        proptest::option::of(locality.clone()),
    )
        .prop_map(|(a, w, h, l)| EndpointCandidate {
            address: a,
            weight: w,
            healthy: h,
            locality: l,
        });
    let routing = (
        prop_oneof![
            Just(LbAlgorithm::RoundRobin),
            Just(LbAlgorithm::WeightedRandom),
            Just(LbAlgorithm::LocalOnly)
        ],
        proptest::collection::vec(candidate, 0..4),
        proptest::option::of(text()),
        text(),
        proptest::option::of(locality),
        proptest::option::of(text()),
    )
        .prop_map(|(alg, cands, sel, why, loc, ver)| RoutingEvidence {
            load_balancing_algorithm: alg,
            available_endpoints: cands,
            selected_endpoint: sel,
            selection_reason: why,
            locality: loc,
            version: ver,
        });
    let reliability = (
        prop_oneof![
            Just(BreakerState::Closed),
            Just(BreakerState::Open),
            Just(BreakerState::HalfOpen)
        ],
        ratio(),
        ratio(),
        any::<u32>(),
        any::<(u32, u32, u32, u32)>(),
    )
        .prop_map(|(st, er, th, ce, (a, m, r, b))| ReliabilityEvidence {
            circuit_breaker: BreakerEvidence {
                state: st,
                error_rate: er,
                error_threshold: th,
                consecutive_errors: ce,
            },
            retry_state: RetryState {
                attempt: a,
                max_attempts: m,
                retries: r,
                backoff: Backoff::Linear,
                backoff_ms: b,
            },
        });
    let telemetry = (
        proptest::option::of(any::<[u8; 16]>().prop_map(TraceId)),
        proptest::option::of(any::<[u8; 8]>().prop_map(SpanId)),
        proptest::option::of(any::<[u8; 8]>().prop_map(SpanId)),
        text(),
        millis(),
        any::<u64>(),
        text(),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(t, s, p, op, st, d, msg, code)| TelemetryEvidence {
            trace_id: t,
            span_id: s,
            parent_span_id: p,
            operation_name: op,
            start_time: st,
            duration_us: d,
            status: Status {
                code: StatusCode::Error,
                message: msg,
            },
            status_code: code,
        });
    (
        text(),
        any::<bool>(),
        proptest::option::of(identity),
        proptest::option::of(authz),
        proptest::option::of(rate),
        proptest::option::of(routing),
        proptest::option::of(reliability),
        telemetry,
        proptest::option::of((text(), any::<u64>())),
        (
            proptest::option::of((text(), proptest::option::of(text()), millis())),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(svc, inbound, id, az, rl, rt, rel, tel, drill, (user, sampled))| {
                RecordBody::Request(Box::new(RequestEvidence {
                    service_name: svc,
                    enforcement_point: if inbound {
                        EnforcementPoint::SidecarInbound
                    } else {
                        EnforcementPoint::SidecarOutbound
                    },
                    mode: Mode::Survival,
                    identity: id,
                    policy_evaluation: az,
                    rate_limit_check: rl,
                    routing_decision: rt,
                    reliability: rel,
                    telemetry: tel,
                    drill: drill.map(|(run, index)| DrillMarker { run, index }),
                    user_identity: user.map(|(issuer, subject, exp)| UserIdentityEvidence {
                        kind: UserIdentityKind::Claim,
                        verified_by: ClaimVerification::Jwt,
                        issuer,
                        subject,
                        algorithm: "ES256".into(),
                        key_id: Some("k1".into()),
                        policy: "shop/jwt".into(),
                        expires_at: exp,
                        jwks_age_s: Some(3),
                    }),
                    trace_sampled: sampled,
                }))
            },
        )
}

fn system_body() -> impl Strategy<Value = RecordBody> {
    prop_oneof![
        (
            proptest::option::of(text()),
            proptest::option::of(ratio()),
            proptest::collection::vec(text(), 0..3)
        )
            .prop_map(
                |(svc, er, actions)| RecordBody::ModeTransition(ModeTransition {
                    from: Mode::Degraded,
                    to: Mode::Survival,
                    trigger: Trigger::NetworkPartitionDetected,
                    evidence: TransitionEvidence {
                        service: svc,
                        error_rate: er,
                        connectivity: Some(Connectivity {
                            same_zone: Reachability::Available,
                            same_region: Reachability::Unavailable,
                            other_regions: Reachability::Unavailable,
                        }),
                        ..TransitionEvidence::default()
                    },
                    actions,
                })
            ),
        (
            spiffe(),
            any::<[u8; 32]>(),
            text(),
            millis(),
            millis(),
            text()
        )
            .prop_map(|(id, fp, serial, a, b, issuer)| RecordBody::Certificate(
                CertificateEvent {
                    event: CertEventKind::Expired,
                    spiffe_id: id,
                    certificate_fingerprint: Sha256Digest(fp),
                    serial_number: serial,
                    issued_at: a,
                    expires_at: b,
                    issuer,
                }
            )),
        (text(), proptest::option::of(text()), any::<[u8; 32]>()).prop_map(|(v, p, d)| {
            RecordBody::ConfigApplied(ConfigApplied {
                config: ConfigKind::TrustBundle,
                version: v,
                previous_version: p,
                digest: Sha256Digest(d),
                source: ConfigSource::Cache,
            })
        }),
    ]
}

fn new_record() -> impl Strategy<Value = NewRecord> {
    prop_oneof![
        (millis(), request_body(), any::<bool>()).prop_map(|(t, b, debug)| NewRecord {
            timestamp: t,
            class: if debug {
                PriorityClass::Debug
            } else {
                PriorityClass::Request
            },
            body: b,
        }),
        (millis(), system_body()).prop_map(|(t, b)| NewRecord::new(t, b)),
    ]
}

/// Seals `records`, then replaces the non-audit run starting at
/// `shed_at % len` (if any) with a shed record, as the buffer would.
fn build_chain(records: Vec<NewRecord>, shed_at: Option<usize>) -> Vec<SealedRecord> {
    let mut chain = Chain::genesis(&spoke());
    let mut out: Vec<SealedRecord> = records
        .into_iter()
        .map(|r| chain.append(r).expect("appends"))
        .collect();
    if let Some(i) = shed_at {
        let start = i % out.len();
        let end = out[start..]
            .iter()
            .position(|r| r.class == PriorityClass::Audit)
            .map_or(out.len(), |p| start + p);
        if end > start {
            let mut run = ShedRun::new();
            for r in &out[start..end] {
                run.drop_record(r.seq, r.timestamp, r.class, r.hash)
                    .expect("contiguous non-audit run");
            }
            let prev = if start == 0 {
                ChainPosition::genesis(&spoke()).hash
            } else {
                out[start - 1].link()
            };
            let shed = run
                .seal(&prev, ShedReason::BufferFull, UnixMillis(7))
                .expect("non-empty");
            out.splice(start..end, [shed]);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any sequence of records, with or without a shed range, verifies from
    /// genesis, and survives the disk and JSON round trips.
    #[test]
    fn arbitrary_chains_verify(
        records in proptest::collection::vec(new_record(), 1..24),
        shed_at in proptest::option::of(any::<usize>()),
    ) {
        let chain = build_chain(records, shed_at);
        let g = ChainPosition::genesis(&spoke());
        let v = verify_chain(&g, &chain).expect("verifies");
        prop_assert_eq!(v.records(), chain.len() as u64);
        for r in &chain {
            let bytes = r.encode();
            prop_assert_eq!(&SealedRecord::decode(&bytes).expect("decodes"), r);
            let json = serde_json::to_string(r).expect("json");
            prop_assert_eq!(&serde_json::from_str::<SealedRecord>(&json).expect("parses"), r);
        }
    }

    /// Altering any single byte of any stored record is detected, and the
    /// error names that record's sequence number.
    #[test]
    fn any_single_byte_alteration_is_detected_at_its_seq(
        records in proptest::collection::vec(new_record(), 1..12),
        shed_at in proptest::option::of(any::<usize>()),
        which in any::<usize>(),
        pos in any::<usize>(),
        mask in 1u8..=255,
    ) {
        let chain = build_chain(records, shed_at);
        let mut stored: Vec<(EvidenceSeq, Vec<u8>)> =
            chain.iter().map(|r| (r.seq, r.encode())).collect();
        let k = which % stored.len();
        let p = pos % stored[k].1.len();
        stored[k].1[p] ^= mask;
        let mut v = ChainVerifier::new(ChainPosition::genesis(&spoke()));
        let err = stored
            .iter()
            .try_for_each(|(key, bytes)| v.push_encoded(*key, bytes).map(|_| ()))
            .expect_err("alteration must be detected");
        prop_assert_eq!(err.seq, stored[k].0, "{}", err);
    }

    /// Hostile bytes never panic the decoders or the verifier.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Batch::decode(&bytes);
        let _ = SealedRecord::decode(&bytes);
        let _ = RecordHeader::peek(&bytes);
        let mut v = ChainVerifier::new(ChainPosition::genesis(&spoke()));
        let _ = v.push_encoded(EvidenceSeq::FIRST, &bytes);
        let mut with_version = vec![1u8];
        with_version.extend_from_slice(&bytes);
        let _ = Batch::decode(&with_version);
    }

    /// Mutated valid batches never panic and never decode into a different
    /// batch whose signature still verifies.
    #[test]
    fn mutated_batches_fail_cleanly(pos in any::<usize>(), mask in 1u8..=255) {
        let key = svid::generate_key().expect("key");
        let batch = Batch::sign(spoke(), golden_chain(), &key).expect("signs");
        let mut bytes = batch.encode().expect("encodes");
        let p = pos % bytes.len();
        bytes[p] ^= mask;
        if let Ok(b) = Batch::decode(&bytes) {
            if b != batch {
                prop_assert!(b.verify_signature(key.public_key_raw()).is_err());
            }
        }
    }
}

/// Format v2 appended two shed reasons: their variant indexes and JSON
/// names are fixed (v1's `buffer_full` is still 0).
#[test]
fn shed_reasons_v2_are_appended_at_the_end() {
    for (r, index, name) in [
        (ShedReason::BufferFull, 0u8, "buffer_full"),
        (ShedReason::DiskFull, 1, "disk_full"),
        (ShedReason::WriteFailed, 2, "write_failed"),
    ] {
        assert_eq!(postcard::to_allocvec(&r).expect("encodes"), vec![index]);
        assert_eq!(
            serde_json::to_value(r).expect("json"),
            serde_json::json!(name)
        );
    }
    assert_eq!(RECORD_FORMAT_VERSION, 4);
}

/// Format v3: a request record with a user identity claim round-trips in
/// postcard and JSON and chains; the v1/v2 golden records still decode to
/// records without one and re-encode to the same bytes (so their hashes
/// verify).
#[test]
fn user_identity_claims_are_v3_and_old_records_still_decode() {
    let golden = golden_chain();
    for r in &golden {
        let back = SealedRecord::decode(&r.encode()).expect("v1 record decodes");
        assert_eq!(&back, r);
        if let RecordBody::Request(q) = &back.body {
            assert_eq!(q.user_identity, None);
        }
    }
    // the golden hex file itself (written by v1) decodes and verifies
    let hex = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/records_v1.hex"),
    )
    .expect("golden file");
    let mut decoded = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, decoded: &mut Vec<SealedRecord>| {
        if !cur.is_empty() {
            let bytes: Vec<u8> = (0..cur.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&cur[i..i + 2], 16).expect("hex"))
                .collect();
            decoded.push(SealedRecord::decode(&bytes).expect("old bytes decode"));
            cur.clear();
        }
    };
    for line in hex.lines() {
        if line.starts_with('#') {
            flush(&mut cur, &mut decoded);
        } else {
            cur.extend(line.chars().filter(|c| c.is_ascii_hexdigit()));
        }
    }
    flush(&mut cur, &mut decoded);
    assert_eq!(decoded, golden);
    verify_chain(&ChainPosition::genesis(&spoke()), &decoded).expect("old chain verifies");

    // a v3 record
    let mut body = golden[0].body.clone();
    let RecordBody::Request(q) = &mut body else {
        panic!("the golden chain starts with a request")
    };
    let plain = postcard::to_allocvec(&**q).expect("encodes");
    q.user_identity = Some(UserIdentityEvidence {
        kind: UserIdentityKind::Claim,
        verified_by: ClaimVerification::Jwt,
        issuer: "https://idp.store.test".into(),
        subject: Some("alice".into()),
        algorithm: "ES256".into(),
        key_id: Some("k1".into()),
        policy: "shop/jwt".into(),
        expires_at: at(60_000),
        jwks_age_s: Some(12),
    });
    let with = postcard::to_allocvec(&**q).expect("encodes");
    // same bytes up to the last slot, whose tag is 2
    assert_eq!(with[..plain.len() - 1], plain[..plain.len() - 1]);
    assert_eq!(plain[plain.len() - 1], 0);
    assert_eq!(with[plain.len() - 1], 2);
    let mut chain = Chain::genesis(&spoke());
    let sealed = chain.append(NewRecord::new(at(1), body)).expect("appends");
    let back = SealedRecord::decode(&sealed.encode()).expect("v3 decodes");
    assert_eq!(back, sealed);
    verify_chain(&ChainPosition::genesis(&spoke()), &[back]).expect("v3 chain verifies");
    let json = serde_json::to_value(&sealed).expect("json");
    let u = &json["body"]["request"]["user_identity"];
    assert_eq!(u["kind"], "claim");
    assert_eq!(u["verified_by"], "jwt");
    assert_eq!(u["subject"], "alice");
    let from_json: SealedRecord = serde_json::from_value(json).expect("json reads back");
    assert_eq!(from_json, sealed);
    // an unknown tag in the last slot is refused
    let mut bad = with.clone();
    bad[plain.len() - 1] = 4;
    assert!(postcard::from_bytes::<RequestEvidence>(&bad).is_err());
}

/// Format v4: an unsampled request record writes tag 3 in the last slot
/// (with or without a drill marker and a user identity), round-trips in
/// postcard and JSON and chains; a sampled one encodes exactly as in v3,
/// and JSON without the flag (older records) reads as sampled.
#[test]
fn unsampled_requests_are_v4_and_sampled_ones_encode_as_before() {
    let golden = golden_chain();
    let RecordBody::Request(q) = &golden[0].body else {
        panic!("the golden chain starts with a request")
    };
    assert!(q.trace_sampled, "golden records read as sampled");
    let plain = postcard::to_allocvec(&**q).expect("encodes");
    let mut unsampled = q.clone();
    unsampled.trace_sampled = false;
    let bytes = postcard::to_allocvec(&*unsampled).expect("encodes");
    // same bytes up to the last slot; tag 3, then two absent options
    assert_eq!(bytes[..plain.len() - 1], plain[..plain.len() - 1]);
    assert_eq!(bytes[plain.len() - 1..], [3, 0, 0]);
    let back: RequestEvidence = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(back, *unsampled);
    // with a drill marker and a user identity as well
    unsampled.drill = Some(DrillMarker {
        run: "r".into(),
        index: 7,
    });
    unsampled.user_identity = Some(UserIdentityEvidence {
        kind: UserIdentityKind::Claim,
        verified_by: ClaimVerification::Jwt,
        issuer: "https://idp.store.test".into(),
        subject: None,
        algorithm: "EdDSA".into(),
        key_id: None,
        policy: "shop/jwt".into(),
        expires_at: at(1),
        jwks_age_s: None,
    });
    let bytes = postcard::to_allocvec(&*unsampled).expect("encodes");
    let back: RequestEvidence = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(back, *unsampled);
    let mut chain = Chain::genesis(&spoke());
    let sealed = chain
        .append(NewRecord::new(
            at(1),
            RecordBody::Request(Box::new((*unsampled).clone())),
        ))
        .expect("appends");
    let back = SealedRecord::decode(&sealed.encode()).expect("v4 decodes");
    assert_eq!(back, sealed);
    verify_chain(&ChainPosition::genesis(&spoke()), &[back]).expect("v4 chain verifies");
    let mut json = serde_json::to_value(&sealed).expect("json");
    assert_eq!(json["body"]["request"]["trace_sampled"], false);
    let from_json: SealedRecord = serde_json::from_value(json.clone()).expect("json reads back");
    assert_eq!(from_json, sealed);
    // JSON written before v4 has no flag: sampled
    if let Some(r) = json["body"]["request"].as_object_mut() {
        r.remove("trace_sampled");
    }
    let old: SealedRecord = serde_json::from_value(json).expect("old json reads");
    let RecordBody::Request(r) = &old.body else {
        panic!("a request")
    };
    assert!(r.trace_sampled);
}
