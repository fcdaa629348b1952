//! The SM-signed message log end to end: the writer (durability, concurrency, segments,
//! checkpoints, key rotation, crash recovery) and the offline verifier, which must detect and
//! name every kind of tampering; the `kunpay-audit` command line; the real `openssl` CLI on
//! exported checkpoints; a writer killed with SIGKILL under load.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kunpay::audit::proof::{InclusionProof, check_proof, prove};
use kunpay::audit::record::{CheckpointFrame, Frame, Record, SegmentHeader, read_frame};
use kunpay::audit::segment::{self, Frames, Step};
use kunpay::audit::{
    AuditError, AuditKey, AuditLog, AuditSettings, Checkpoint, Direction, NewRecord, PeerSignature,
    Pubkeys, Report, verify,
};
use kunpay::channel::message::attach_signature;
use kunpay::crypto::{DEFAULT_DISTID, PrivateKey, SignatureFormat, Signer};
use tempfile::TempDir;

const NODE: &str = "node-a";
const CHILD_ENV: &str = "KUNPAY_AUDIT_CRASH_CHILD_DIR";

// ------------------------------------------------------------------------------------------
// Helpers

/// An audit key pair known by its id; hands out fresh `AuditKey`s for the writer.
struct Key {
    id: String,
    private: PrivateKey,
}

impl Key {
    fn new(id: &str) -> Self {
        Key {
            id: id.into(),
            private: PrivateKey::generate().unwrap(),
        }
    }

    fn audit_key(&self) -> AuditKey {
        AuditKey {
            key_id: self.id.clone(),
            signer: Signer::new(&self.private, DEFAULT_DISTID).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.private.public_key().to_public_key_pem().unwrap()
    }
}

struct Institution {
    id: String,
    key: PrivateKey,
}

impl Institution {
    fn new(id: &str) -> Self {
        Institution {
            id: id.into(),
            key: PrivateKey::generate().unwrap(),
        }
    }

    fn signed_request(&self, n: u64) -> Vec<u8> {
        let body = format!(
            "<root><MsgHeader><MsgTp>DEBIT</MsgTp><MsgId>{n}</MsgId></MsgHeader>\
             <MsgBody><Amt>{n}00</Amt></MsgBody></root>"
        )
        .into_bytes();
        let signer = Signer::new(&self.key, DEFAULT_DISTID).unwrap();
        let signature = signer.sign(&body, SignatureFormat::Der).unwrap();
        attach_signature(body, &signature)
    }
}

fn settings(max_segment_bytes: u64, every: u64) -> AuditSettings {
    AuditSettings {
        node_id: NODE.into(),
        max_segment_bytes,
        checkpoint_every_records: every,
        checkpoint_every: Duration::from_secs(3600),
        queue_bound: 64,
    }
}

fn out_record(n: u64) -> NewRecord {
    NewRecord {
        direction: Direction::Out,
        peer: "TENPAY".into(),
        message_type: "DEBIT_ANSWER".into(),
        txn_id: Some(uuid::Uuid::from_u128(n as u128)),
        peer_signature: PeerSignature::None,
        bytes: format!("<root><MsgBody><N>{n}</N></MsgBody></root>{{S:AAAA}}").into_bytes(),
    }
}

fn inbound(institution: &Institution, n: u64) -> NewRecord {
    NewRecord {
        direction: Direction::In,
        peer: institution.id.clone(),
        message_type: "DEBIT".into(),
        txn_id: None,
        peer_signature: PeerSignature::Verified,
        bytes: institution.signed_request(n),
    }
}

fn write_pubkeys(dir: &Path, audit: &[(&str, String)], institutions: &[&Institution]) -> PathBuf {
    let mut text = String::from("[audit_keys]\n");
    for (id, pem) in audit {
        let file = format!("{id}.pub.pem");
        fs::write(dir.join(&file), pem).unwrap();
        text.push_str(&format!("{id} = {{ pem_file = \"{file}\" }}\n"));
    }
    for institution in institutions {
        let pem = institution.key.public_key().to_public_key_pem().unwrap();
        text.push_str(&format!(
            "\n[institutions.{}]\npem = \"\"\"\n{pem}\"\"\"\n",
            institution.id
        ));
    }
    let path = dir.join("pubkeys.toml");
    fs::write(&path, text).unwrap();
    path
}

fn keys_of(path: &Path) -> Pubkeys {
    Pubkeys::load(path).unwrap()
}

/// A closed log of `records` records (one in three an inbound signed request), in several
/// segments, with its key, institution and public-key file.
struct Fixture {
    _tmp: TempDir,
    root: PathBuf,
    log: PathBuf,
    key: Key,
    institution: Institution,
    pubkeys: PathBuf,
}

impl Fixture {
    fn new(records: u64, max_segment_bytes: u64, every: u64) -> Self {
        let tmp = TempDir::new().unwrap();
        let root = tmp.path().to_owned();
        let log_dir = root.join("audit");
        let key = Key::new("audit-1");
        let institution = Institution::new("TENPAY");
        let log = AuditLog::open(
            &log_dir,
            settings(max_segment_bytes, every),
            key.audit_key(),
        )
        .unwrap();
        for n in 1..=records {
            let record = if n % 3 == 1 {
                inbound(&institution, n)
            } else {
                out_record(n)
            };
            assert_eq!(log.append(record).unwrap(), n);
        }
        log.close().unwrap();
        let pubkeys = write_pubkeys(&root, &[(&key.id, key.pem())], &[&institution]);
        Fixture {
            _tmp: tmp,
            root,
            log: log_dir,
            key,
            institution,
            pubkeys,
        }
    }

    fn verify(&self) -> Report {
        verify(&self.log, &keys_of(&self.pubkeys)).unwrap()
    }

    /// A copy of the log to damage.
    fn copy(&self) -> TempDir {
        let copy = TempDir::new_in(&self.root).unwrap();
        for entry in fs::read_dir(&self.log).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
        copy
    }
}

fn segments(dir: &Path) -> Vec<segment::SegmentFile> {
    segment::list(dir).unwrap()
}

/// (offset, len, frame) of every frame in a segment file.
fn frames(path: &Path) -> Vec<(usize, usize, Frame)> {
    let bytes = fs::read(path).unwrap();
    let (_, start) = SegmentHeader::decode(&bytes).unwrap();
    Frames::new(&bytes, start)
        .map(|step| match step {
            Step::Frame { offset, len, frame } => (offset, len, frame),
            Step::Damage { offset, error, .. } => panic!("damage at {offset}: {error}"),
        })
        .collect()
}

fn record_seq(frame: &Frame) -> Option<u64> {
    match frame {
        Frame::Record { record, .. } => Some(record.seq),
        Frame::Checkpoint(_) => None,
    }
}

/// Where record `seq` is: (segment file, offset, len).
fn locate(dir: &Path, seq: u64) -> (segment::SegmentFile, usize, usize) {
    for file in segments(dir) {
        for (offset, len, frame) in frames(&file.path) {
            if record_seq(&frame) == Some(seq) {
                return (file, offset, len);
            }
        }
    }
    panic!("record {seq} not found");
}

fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

fn failures(report: &Report) -> String {
    report
        .failures
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn audit_cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kunpay-audit"))
}

// ------------------------------------------------------------------------------------------
// A clean log

#[test]
fn a_clean_log_verifies_across_segments_and_the_cli_says_so() {
    let fixture = Fixture::new(60, 4096, 7);
    let report = fixture.verify();
    assert!(report.holds(), "{report}");
    assert!(report.segments.len() >= 3, "{report}");
    assert_eq!(report.records, 60);
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(60)));
    assert_eq!(report.sealed_through, 60);
    assert_eq!(report.inbound_verified, 20);
    assert!(report.warnings.is_empty(), "{report}");
    // Every segment starts where the previous ended and is sealed by its own checkpoint.
    for file in segments(&fixture.log) {
        let all = frames(&file.path);
        assert!(matches!(all.last().unwrap().2, Frame::Checkpoint(_)));
        let bytes = fs::read(&file.path).unwrap();
        assert!(
            bytes.len() as u64 <= 4096,
            "{} is {} bytes",
            file.name,
            bytes.len()
        );
    }

    let output = audit_cli()
        .args(["verify", fixture.log.to_str().unwrap(), "--pubkeys"])
        .arg(&fixture.pubkeys)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("records: 60 (seq 1..=60)"), "{stdout}");
    assert!(
        stdout.contains("inbound signatures re-verified: 20 (TENPAY: 20)"),
        "{stdout}"
    );
    assert!(stdout.contains("RESULT: OK"), "{stdout}");
}

#[test]
fn cli_usage_and_configuration_errors_exit_2() {
    let fixture = Fixture::new(3, 64 * 1024, 100);
    let missing = audit_cli()
        .args(["verify", "/nonexistent/audit", "--pubkeys"])
        .arg(&fixture.pubkeys)
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let bad_keys = fixture.root.join("bad.toml");
    fs::write(&bad_keys, "[audit_keys]\nx = { pem_fiel = \"a\" }\n").unwrap();
    let output = audit_cli()
        .args(["verify", fixture.log.to_str().unwrap(), "--pubkeys"])
        .arg(&bad_keys)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("pem_fiel"),
        "{stderr}"
    );
    assert_eq!(
        audit_cli().arg("verify").output().unwrap().status.code(),
        Some(2)
    );
}

// ------------------------------------------------------------------------------------------
// Tampering

#[test]
fn flipping_any_single_byte_is_detected() {
    let fixture = Fixture::new(8, 64 * 1024, 3);
    let keys = keys_of(&fixture.pubkeys);
    let file = &segments(&fixture.log)[0];
    let original = fs::read(&file.path).unwrap();
    let last_frame = frames(&file.path).last().unwrap().0;
    for at in 0..original.len() {
        let mut damaged = original.clone();
        damaged[at] ^= 0x01;
        fs::write(&file.path, &damaged).unwrap();
        let report = verify(&fixture.log, &keys).unwrap();
        if at < last_frame {
            assert!(!report.holds(), "flip at byte {at} not detected:\n{report}");
        } else {
            // The final frame damaged looks exactly like a write a crash interrupted: it is
            // reported as a torn tail, and its records as not sealed.
            assert!(
                !report.holds()
                    || report
                        .torn_tail
                        .as_ref()
                        .is_some_and(|t| t.offset as usize == last_frame),
                "flip at byte {at} (last frame) not reported:\n{report}"
            );
        }
    }
    fs::write(&file.path, &original).unwrap();
    assert!(fixture.verify().holds());
}

#[test]
fn a_flipped_byte_is_named_by_segment_offset_and_record() {
    let fixture = Fixture::new(40, 4096, 5);
    let keys = keys_of(&fixture.pubkeys);

    // In the body of record 10.
    let copy = fixture.copy();
    let (file, offset, len) = locate(copy.path(), 10);
    flip(&copy.path().join(&file.name), offset + len / 2);
    let report = verify(copy.path(), &keys).unwrap();
    let first = &report.failures[0];
    assert_eq!(first.at.segment.as_deref(), Some(file.name.as_str()));
    assert_eq!(first.at.offset, Some(offset as u64));
    assert_eq!(first.at.seq, Some(10));
    assert!(first.what.contains("frame hash mismatch"), "{first}");

    // In the stored hash of record 11.
    let copy = fixture.copy();
    let (file, offset, len) = locate(copy.path(), 11);
    flip(&copy.path().join(&file.name), offset + len - 1);
    let report = verify(copy.path(), &keys).unwrap();
    assert_eq!(
        report.failures[0].at.offset,
        Some(offset as u64),
        "{report}"
    );
    assert_eq!(report.failures[0].at.seq, Some(11));

    // In the header of the second segment.
    let copy = fixture.copy();
    let second = &segments(copy.path())[1];
    flip(&second.path, 20);
    let report = verify(copy.path(), &keys).unwrap();
    assert_eq!(
        report.failures[0].at.segment.as_deref(),
        Some(second.name.as_str())
    );
    assert_eq!(report.failures[0].at.offset, Some(0));
    assert!(report.failures[0].what.contains("header"), "{report}");

    // In a checkpoint's signed text, with the frame hash recomputed (a deliberate forgery).
    let copy = fixture.copy();
    let file = &segments(copy.path())[0];
    let (offset, _, _) = frames(&file.path)
        .into_iter()
        .find(|(_, _, f)| matches!(f, Frame::Checkpoint(_)))
        .unwrap();
    rewrite_checkpoint(&file.path, offset, |cp| {
        let text = String::from_utf8(cp.signed.clone()).unwrap();
        cp.signed = text.replace("time: 1", "time: 2").into_bytes();
    });
    let report = verify(copy.path(), &keys).unwrap();
    assert_eq!(report.failures.len(), 1, "{report}");
    assert_eq!(report.failures[0].at.offset, Some(offset as u64));
    assert!(
        report.failures[0]
            .what
            .contains("does not verify with audit key"),
        "{report}"
    );
}

/// Re-encodes the checkpoint frame at `offset` after `change`, with a valid frame hash.
fn rewrite_checkpoint(path: &Path, offset: usize, change: impl FnOnce(&mut CheckpointFrame)) {
    let bytes = fs::read(path).unwrap();
    let (frame, len) = read_frame(&bytes[offset..]).unwrap();
    let Frame::Checkpoint(mut checkpoint) = frame else {
        panic!("no checkpoint at {offset}");
    };
    change(&mut checkpoint);
    let mut out = bytes[..offset].to_vec();
    checkpoint.encode_frame(&mut out).unwrap();
    out.extend_from_slice(&bytes[offset + len..]);
    fs::write(path, out).unwrap();
}

/// Re-encodes record frame `seq` after `change`, with a valid frame hash (as a forger would).
fn rewrite_record(dir: &Path, seq: u64, change: impl FnOnce(&mut Record)) {
    let (file, offset, len) = locate(dir, seq);
    let bytes = fs::read(&file.path).unwrap();
    let Frame::Record { mut record, .. } = read_frame(&bytes[offset..]).unwrap().0 else {
        unreachable!()
    };
    change(&mut record);
    let mut out = bytes[..offset].to_vec();
    record.encode_frame(&mut out).unwrap();
    out.extend_from_slice(&bytes[offset + len..]);
    fs::write(&file.path, out).unwrap();
}

#[test]
fn an_altered_record_with_a_recomputed_hash_breaks_the_chain_and_the_checkpoint() {
    let fixture = Fixture::new(20, 64 * 1024, 100);
    let copy = fixture.copy();
    rewrite_record(copy.path(), 7, |r| {
        r.payload = b"<root>10000000</root>".to_vec()
    });
    let report = verify(copy.path(), &keys_of(&fixture.pubkeys)).unwrap();
    let text = failures(&report);
    assert!(
        text.contains("record 8: chain broken: the record does not link to record 7"),
        "{text}"
    );
    assert!(
        text.contains("Merkle root does not match") || text.contains("chain head"),
        "{text}"
    );
}

#[test]
fn a_deleted_record_is_named() {
    let fixture = Fixture::new(20, 64 * 1024, 100);
    let copy = fixture.copy();
    let (file, offset, len) = locate(copy.path(), 9);
    let mut bytes = fs::read(&file.path).unwrap();
    bytes.drain(offset..offset + len);
    fs::write(&file.path, bytes).unwrap();
    let report = verify(copy.path(), &keys_of(&fixture.pubkeys)).unwrap();
    let first = &report.failures[0];
    assert_eq!(first.at.seq, Some(10));
    assert_eq!(first.at.offset, Some(offset as u64));
    assert!(first.what.contains("records 9..=9 are missing"), "{first}");
}

#[test]
fn two_swapped_records_are_named() {
    let fixture = Fixture::new(20, 64 * 1024, 100);
    let copy = fixture.copy();
    let (file, offset5, len5) = locate(copy.path(), 5);
    let (_, offset6, len6) = locate(copy.path(), 6);
    assert_eq!(offset5 + len5, offset6);
    let bytes = fs::read(&file.path).unwrap();
    let mut out = bytes[..offset5].to_vec();
    out.extend_from_slice(&bytes[offset6..offset6 + len6]);
    out.extend_from_slice(&bytes[offset5..offset5 + len5]);
    out.extend_from_slice(&bytes[offset6 + len6..]);
    fs::write(&file.path, out).unwrap();
    let report = verify(copy.path(), &keys_of(&fixture.pubkeys)).unwrap();
    let text = failures(&report);
    assert_eq!(report.failures[0].at.seq, Some(6), "{text}");
    assert_eq!(report.failures[0].at.offset, Some(offset5 as u64), "{text}");
    assert!(
        text.contains("record 5 is out of order or duplicated"),
        "{text}"
    );
}

#[test]
fn a_removed_checkpoint_leaves_records_uncovered_and_is_a_failure() {
    let fixture = Fixture::new(20, 64 * 1024, 5);
    let copy = fixture.copy();
    let file = &segments(copy.path())[0];
    let (offset, len, _) = frames(&file.path)
        .into_iter()
        .filter(|(_, _, f)| matches!(f, Frame::Checkpoint(_)))
        .nth(1)
        .unwrap();
    let mut bytes = fs::read(&file.path).unwrap();
    bytes.drain(offset..offset + len);
    fs::write(&file.path, bytes).unwrap();
    let report = verify(copy.path(), &keys_of(&fixture.pubkeys)).unwrap();
    assert!(
        failures(&report).contains("records 6..=10 are covered by no checkpoint"),
        "{report}"
    );
}

#[test]
fn a_replaced_checkpoint_signature_is_detected() {
    let fixture = Fixture::new(12, 64 * 1024, 4);
    let copy = fixture.copy();
    let file = &segments(copy.path())[0];
    let (offset, _, _) = frames(&file.path)
        .into_iter()
        .find(|(_, _, f)| matches!(f, Frame::Checkpoint(_)))
        .unwrap();
    // A genuine signature by the right key, but over other bytes.
    let signer = fixture.key.audit_key().signer;
    rewrite_checkpoint(&file.path, offset, |cp| {
        cp.signature = signer
            .sign(b"something else", SignatureFormat::Der)
            .unwrap();
    });
    let report = verify(copy.path(), &keys_of(&fixture.pubkeys)).unwrap();
    assert_eq!(report.failures.len(), 1, "{report}");
    let failure = &report.failures[0];
    assert_eq!(failure.at.offset, Some(offset as u64));
    assert!(
        failure.what.contains("checkpoint of records 1..=4"),
        "{failure}"
    );
    assert!(
        failure
            .what
            .contains("does not verify with audit key \"audit-1\""),
        "{failure}"
    );
    assert_eq!(report.sealed_through, 12);
}

#[test]
fn verifying_with_the_wrong_key_fails_every_checkpoint_and_exits_1() {
    let fixture = Fixture::new(12, 64 * 1024, 4);
    let impostor = Key::new("audit-1");
    let dir = TempDir::new().unwrap();
    let pubkeys = write_pubkeys(
        dir.path(),
        &[("audit-1", impostor.pem())],
        &[&fixture.institution],
    );
    let report = verify(&fixture.log, &keys_of(&pubkeys)).unwrap();
    assert_eq!(report.failures.len(), 3, "{report}");
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.what.contains("does not verify"))
    );
    let output = audit_cli()
        .args(["verify", fixture.log.to_str().unwrap(), "--pubkeys"])
        .arg(&pubkeys)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("FAILED: segment audit-"), "{stdout}");
    assert!(stdout.contains("RESULT: FAILED, 3 problem(s)"), "{stdout}");

    // A key id the file does not know is named, with what to do.
    let unknown = write_pubkeys(dir.path(), &[("other", impostor.pem())], &[]);
    let report = verify(&fixture.log, &keys_of(&unknown)).unwrap();
    assert!(failures(&report).contains("key id \"audit-1\" is not in the public-key file"));
}

#[test]
fn keys_rotated_mid_day_and_at_restart_each_verify_with_their_own_key() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("audit");
    let (a, b, c) = (
        Key::new("audit-a"),
        Key::new("audit-b"),
        Key::new("audit-c"),
    );
    let log = AuditLog::open(&dir, settings(64 * 1024, 4), a.audit_key()).unwrap();
    for n in 1..=6 {
        log.append(out_record(n)).unwrap();
    }
    let sealed = log.rotate_key(b.audit_key()).unwrap().unwrap();
    assert_eq!(
        (sealed.first_seq, sealed.last_seq, sealed.key_id.as_str()),
        (5, 6, "audit-a")
    );
    for n in 7..=12 {
        log.append(out_record(n)).unwrap();
    }
    log.close().unwrap();
    let log = AuditLog::open(&dir, settings(64 * 1024, 4), c.audit_key()).unwrap();
    for n in 13..=15 {
        assert_eq!(log.append(out_record(n)).unwrap(), n);
    }
    log.close().unwrap();

    let all = write_pubkeys(
        tmp.path(),
        &[
            ("audit-a", a.pem()),
            ("audit-b", b.pem()),
            ("audit-c", c.pem()),
        ],
        &[],
    );
    let report = verify(&dir, &keys_of(&all)).unwrap();
    assert!(report.holds(), "{report}");
    assert_eq!(report.checkpoints_by_key["audit-a"], 2);
    assert_eq!(report.checkpoints_by_key["audit-b"], 2);
    assert_eq!(report.checkpoints_by_key["audit-c"], 1);

    // Without the old key, exactly the old checkpoints fail, and say which key they need.
    let newer = write_pubkeys(
        tmp.path(),
        &[("audit-b", b.pem()), ("audit-c", c.pem())],
        &[],
    );
    let report = verify(&dir, &keys_of(&newer)).unwrap();
    assert_eq!(report.failures.len(), 2, "{report}");
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.what.contains("\"audit-a\""))
    );
    // The old key cannot pass for the new one.
    let swapped = write_pubkeys(
        tmp.path(),
        &[
            ("audit-a", a.pem()),
            ("audit-b", a.pem()),
            ("audit-c", c.pem()),
        ],
        &[],
    );
    let report = verify(&dir, &keys_of(&swapped)).unwrap();
    assert_eq!(report.failures.len(), 2, "{report}");
}

#[test]
fn a_forged_inbound_signature_is_detected_and_a_refused_one_is_not_required() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("audit");
    let key = Key::new("k1");
    let tenpay = Institution::new("TENPAY");
    let forger = Institution::new("TENPAY");
    let log = AuditLog::open(&dir, settings(64 * 1024, 100), key.audit_key()).unwrap();
    log.append(inbound(&tenpay, 1)).unwrap();
    let forged = log.append(inbound(&forger, 2)).unwrap();
    // A genuine request whose amount was changed after signing.
    let mut altered = inbound(&tenpay, 3);
    let text = String::from_utf8(altered.bytes.clone()).unwrap();
    altered.bytes = text
        .replace("<Amt>300</Amt>", "<Amt>900</Amt>")
        .into_bytes();
    let altered_seq = log.append(altered).unwrap();
    // The edge refused this forgery: logged, but not a failure of the log.
    log.append(NewRecord {
        peer_signature: PeerSignature::NotVerified,
        ..inbound(&forger, 4)
    })
    .unwrap();
    let unknown = log.append(inbound(&Institution::new("ALIPAY"), 5)).unwrap();
    log.close().unwrap();

    let pubkeys = write_pubkeys(tmp.path(), &[("k1", key.pem())], &[&tenpay]);
    let report = verify(&dir, &keys_of(&pubkeys)).unwrap();
    assert_eq!(report.inbound_verified, 1, "{report}");
    assert_eq!(report.inbound_refused, 1);
    let seqs: Vec<Option<u64>> = report.failures.iter().map(|f| f.at.seq).collect();
    assert_eq!(
        seqs,
        vec![Some(forged), Some(altered_seq), Some(unknown)],
        "{report}"
    );
    assert!(
        report.failures[0]
            .what
            .contains("does not verify with the institution's public key")
    );
    assert!(
        report.failures[2]
            .what
            .contains("add [institutions.ALIPAY]")
    );
}

// ------------------------------------------------------------------------------------------
// Torn tails and recovery

fn partial_record(dir: &Path, seq: u64, prev: [u8; 32], keep: usize) -> (PathBuf, u64) {
    let file = segments(dir).pop().unwrap();
    let mut frame = Vec::new();
    Record {
        seq,
        time_ms: 1,
        direction: Direction::Out,
        peer_signature: PeerSignature::None,
        txn_id: None,
        prev_hash: prev,
        peer: "TENPAY".into(),
        message_type: "DEBIT_ANSWER".into(),
        payload: vec![b'z'; 300],
    }
    .encode_frame(&mut frame)
    .unwrap();
    let before = fs::metadata(&file.path).unwrap().len();
    let mut handle = fs::OpenOptions::new()
        .append(true)
        .open(&file.path)
        .unwrap();
    handle.write_all(&frame[..keep]).unwrap();
    (file.path, before)
}

fn last_hash(dir: &Path) -> [u8; 32] {
    let file = segments(dir).pop().unwrap();
    frames(&file.path)
        .into_iter()
        .rev()
        .find_map(|(_, _, f)| match f {
            Frame::Record { hash, .. } => Some(hash),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_torn_tail_is_reported_as_such_and_the_records_before_it_verify() {
    let fixture = Fixture::new(10, 64 * 1024, 100);
    let (path, before) = partial_record(&fixture.log, 11, last_hash(&fixture.log), 150);
    let report = fixture.verify();
    assert!(report.holds(), "{report}");
    let torn = report.torn_tail.clone().expect("torn tail reported");
    assert_eq!(torn.offset, before);
    assert_eq!(torn.length, 150);
    assert_eq!(&torn.segment, path.file_name().unwrap().to_str().unwrap());
    assert_eq!(report.sealed_through, 10);
    let output = audit_cli()
        .args(["verify", fixture.log.to_str().unwrap(), "--pubkeys"])
        .arg(&fixture.pubkeys)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("byte {before}, record 11: torn tail")),
        "{stdout}"
    );

    // Cutting into the last checkpoint: a torn tail, and its records reported unsealed.
    let copy = fixture.copy();
    let file = segments(copy.path()).pop().unwrap();
    // (The copy carries the partial record too: cut back to 40 bytes before it.)
    fs::OpenOptions::new()
        .write(true)
        .open(&file.path)
        .unwrap()
        .set_len(before - 40)
        .unwrap();
    let report = verify(copy.path(), &keys_of(&fixture.pubkeys)).unwrap();
    assert!(report.holds(), "{report}");
    assert!(report.torn_tail.is_some());
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.what.contains("records 1..=10 after the last checkpoint")),
        "{report}"
    );
}

#[test]
fn reopening_after_a_partial_record_quarantines_it_and_continues_a_valid_chain() {
    let fixture = Fixture::new(10, 64 * 1024, 100);
    let (path, before) = partial_record(&fixture.log, 11, last_hash(&fixture.log), 200);
    let torn_bytes = fs::read(&path).unwrap()[before as usize..].to_vec();
    let log = AuditLog::open(
        &fixture.log,
        settings(64 * 1024, 100),
        fixture.key.audit_key(),
    )
    .unwrap();
    assert_eq!(log.recovery_notes().len(), 1, "{:?}", log.recovery_notes());
    // Record 11 is the recovery record; the chain goes on after it.
    assert_eq!(log.append(out_record(12)).unwrap(), 12);
    log.close().unwrap();

    let quarantine = fixture.log.join(format!(
        "{}.torn-{before}",
        path.file_name().unwrap().to_str().unwrap()
    ));
    assert_eq!(fs::read(&quarantine).unwrap(), torn_bytes);
    let report = fixture.verify();
    assert!(report.holds(), "{report}");
    assert!(report.torn_tail.is_none());
    assert!(report.warnings.is_empty(), "{report}");
    assert_eq!(report.records, 12);
    assert_eq!(report.recoveries.len(), 1);
    assert_eq!(report.recoveries[0].offset, before);
    assert_eq!(report.recoveries[0].length, 200);

    // Altering the quarantined bytes is caught; losing them is only a warning.
    fs::write(&quarantine, b"other").unwrap();
    assert!(failures(&fixture.verify()).contains("does not match the length and SM3"));
    fs::remove_file(&quarantine).unwrap();
    let report = fixture.verify();
    assert!(report.holds() && report.warnings.len() == 1, "{report}");
}

#[test]
fn a_torn_segment_header_is_moved_aside_and_the_chain_continues() {
    let fixture = Fixture::new(5, 64 * 1024, 100);
    let last = segments(&fixture.log).pop().unwrap();
    let header = fs::read(&last.path).unwrap();
    let torn_name = segment::file_name(last.number + 1, segment::utc_day(0));
    fs::write(fixture.log.join(&torn_name), &header[..30]).unwrap();
    let log = AuditLog::open(
        &fixture.log,
        settings(64 * 1024, 100),
        fixture.key.audit_key(),
    )
    .unwrap();
    assert_eq!(log.append(out_record(7)).unwrap(), 7);
    log.close().unwrap();
    assert!(fixture.log.join(format!("{torn_name}.torn-0")).exists());
    let report = fixture.verify();
    assert!(report.holds(), "{report}");
    assert_eq!(report.recoveries.len(), 1);
    assert_eq!(report.records, 7);
}

#[test]
fn damage_a_crash_cannot_explain_makes_open_refuse() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("audit");
    let key = Key::new("k1");
    let log = AuditLog::open(&dir, settings(1 << 30, 1000), key.audit_key()).unwrap();
    // More than the most a crash can leave unsynced (one batch) after the damaged record.
    let big = vec![b'x'; 4 << 20];
    log.append(out_record(1)).unwrap();
    for _ in 0..14 {
        log.append(NewRecord {
            bytes: big.clone(),
            ..out_record(0)
        })
        .unwrap();
    }
    log.close().unwrap();
    let (file, offset, len) = locate(&dir, 1);
    flip(&file.path, offset + len / 2);
    match AuditLog::open(&dir, settings(1 << 30, 1000), key.audit_key()) {
        Err(AuditError::Damaged {
            segment,
            offset: at,
            ..
        }) => {
            assert_eq!(segment, file.path);
            assert_eq!(at, offset as u64);
        }
        Err(other) => panic!("expected Damaged, got {other}"),
        Ok(_) => panic!("opened a damaged log"),
    }
}

// ------------------------------------------------------------------------------------------
// Proofs and OpenSSL

#[test]
fn inclusion_proofs_round_trip_and_tampered_proofs_are_rejected() {
    let fixture = Fixture::new(30, 4096, 7);
    let keys = keys_of(&fixture.pubkeys);
    for seq in [1, 2, 7, 8, 13, 21, 30] {
        let proof = prove(&fixture.log, seq).unwrap();
        let proven = check_proof(&proof, &keys).unwrap_or_else(|e| panic!("seq {seq}: {e}"));
        assert_eq!(proven.record.seq, seq);
        if seq % 3 == 1 {
            assert_eq!(proven.inbound_signature, Some(Ok(())));
        }
    }
    let proof = prove(&fixture.log, 10).unwrap();
    let tampered: Vec<(&str, InclusionProof)> = vec![
        ("record frame", {
            let mut p = proof.clone();
            let mut frame = base64_decode(&p.record_frame);
            let at = frame.len() / 2;
            frame[at] ^= 1;
            p.record_frame = base64_encode(&frame);
            p
        }),
        ("audit path", {
            let mut p = proof.clone();
            p.audit_path[0] = "00".repeat(32);
            p
        }),
        ("leaf index", {
            let mut p = proof.clone();
            p.leaf_index += 1;
            p
        }),
        ("checkpoint text", {
            let mut p = proof.clone();
            let mut checkpoint = Checkpoint::parse(p.checkpoint.signed.as_bytes()).unwrap();
            checkpoint.time_ms += 1;
            p.checkpoint.signed = String::from_utf8(checkpoint.signed_bytes()).unwrap();
            p
        }),
        ("signature", {
            let mut p = proof.clone();
            let mut sig = base64_decode(&p.checkpoint.signature);
            let at = sig.len() - 2;
            sig[at] ^= 1;
            p.checkpoint.signature = base64_encode(&sig);
            p
        }),
        ("another record", {
            let mut p = proof.clone();
            let other = prove(&fixture.log, 11).unwrap();
            p.record_frame = other.record_frame;
            p.record_hash = other.record_hash;
            p
        }),
    ];
    for (what, proof) in tampered {
        assert!(
            check_proof(&proof, &keys).is_err(),
            "tampered {what} accepted"
        );
    }
    let impostor = Key::new("audit-1");
    let elsewhere = TempDir::new().unwrap();
    let other_keys = write_pubkeys(elsewhere.path(), &[("audit-1", impostor.pem())], &[]);
    assert!(check_proof(&proof, &keys_of(&other_keys)).is_err());

    // Through the command line, the proof checked without the log.
    let proof_path = fixture.root.join("proof-10.json");
    let status = audit_cli()
        .args(["prove", fixture.log.to_str().unwrap(), "10", "--out"])
        .arg(&proof_path)
        .status()
        .unwrap();
    assert!(status.success());
    let output = audit_cli()
        .arg("check-proof")
        .arg(&proof_path)
        .arg("--pubkeys")
        .arg(&fixture.pubkeys)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("record 10 is included in the log of node node-a"),
        "{stdout}"
    );
    let text = fs::read_to_string(&proof_path)
        .unwrap()
        .replace("time: 1", "time: 2");
    fs::write(&proof_path, text).unwrap();
    let output = audit_cli()
        .arg("check-proof")
        .arg(&proof_path)
        .arg("--pubkeys")
        .arg(&fixture.pubkeys)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn openssl_verifies_every_exported_checkpoint_with_no_kunpay_code() {
    let fixture = Fixture::new(20, 64 * 1024, 6);
    let out = fixture.root.join("export");
    let output = audit_cli()
        .args([
            "export-openssl",
            fixture.log.to_str().unwrap(),
            out.to_str().unwrap(),
            "--pubkeys",
        ])
        .arg(&fixture.pubkeys)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let index = fs::read_to_string(out.join("checkpoints.tsv")).unwrap();
    assert_eq!(index.lines().count(), 1 + 4, "{index}");
    for n in 1..=4 {
        let signed = fs::read(out.join(format!("CP-{n}.bin"))).unwrap();
        let checkpoint = Checkpoint::parse(&signed).unwrap();
        assert_eq!(checkpoint.key_id, fixture.key.id);
        // Exactly the command docs/audit.md gives the auditors.
        let result = Command::new("openssl")
            .current_dir(&out)
            .args([
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                "KEY-audit-1.pem",
                "-rawin",
            ])
            .args([
                "-in",
                &format!("CP-{n}.bin"),
                "-sigfile",
                &format!("CP-{n}.sig"),
            ])
            .args(["-digest", "sm3", "-pkeyopt", "distid:1234567812345678"])
            .output()
            .expect("the openssl command line (3.x) must be installed");
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success(),
            "CP-{n}: {stdout} {}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert!(
            stdout.contains("Signature Verified Successfully"),
            "{stdout}"
        );
    }
    let script = Command::new("sh")
        .arg(out.join("verify.sh"))
        .output()
        .unwrap();
    assert!(
        script.status.success(),
        "{}",
        String::from_utf8_lossy(&script.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&script.stdout)
            .matches("Signature Verified Successfully")
            .count(),
        4
    );
    // OpenSSL refuses an altered checkpoint.
    let altered = String::from_utf8(fs::read(out.join("CP-2.bin")).unwrap())
        .unwrap()
        .replace("last: 12", "last: 13");
    fs::write(out.join("CP-2.bin"), altered).unwrap();
    assert!(
        !Command::new("sh")
            .arg(out.join("verify.sh"))
            .output()
            .unwrap()
            .status
            .success()
    );
}

// ------------------------------------------------------------------------------------------
// The writer

#[test]
fn concurrent_appends_get_unique_contiguous_sequence_numbers_and_the_log_verifies() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("audit");
    let key = Key::new("k1");
    let log = Arc::new(AuditLog::open(&dir, settings(32 * 1024, 50), key.audit_key()).unwrap());
    let threads = 16;
    let per_thread = 150;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|i| {
                        let tag = format!("t{t}-{i}");
                        let seq = log
                            .append(NewRecord {
                                bytes: tag.clone().into_bytes(),
                                ..out_record(0)
                            })
                            .unwrap();
                        assert!(log.durable_seq() >= seq);
                        (seq, tag)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for handle in handles {
        for (seq, tag) in handle.join().unwrap() {
            assert!(
                acked.insert(seq, tag).is_none(),
                "sequence number {seq} given twice"
            );
        }
    }
    let total = (threads * per_thread) as u64;
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    log.close().unwrap();
    assert!(matches!(log.append(out_record(0)), Err(AuditError::Closed)));

    let pubkeys = write_pubkeys(tmp.path(), &[("k1", key.pem())], &[]);
    let report = verify(&dir, &keys_of(&pubkeys)).unwrap();
    assert!(report.holds(), "{report}");
    assert_eq!(report.records, total);
    assert!(report.segments.len() > 1);
    for file in segments(&dir) {
        for (_, _, frame) in frames(&file.path) {
            if let Frame::Record { record, .. } = frame {
                assert_eq!(record.payload, acked[&record.seq].as_bytes());
            }
        }
    }
}

#[test]
fn a_checkpoint_is_written_when_the_interval_passes() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("audit");
    let key = Key::new("k1");
    let log = AuditLog::open(
        &dir,
        AuditSettings {
            checkpoint_every: Duration::from_millis(50),
            ..settings(1 << 20, 1000)
        },
        key.audit_key(),
    )
    .unwrap();
    for n in 1..=3 {
        log.append(out_record(n)).unwrap();
    }
    let pubkeys = write_pubkeys(tmp.path(), &[("k1", key.pem())], &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let report = verify(&dir, &keys_of(&pubkeys)).unwrap();
        if report.sealed_through == 3 {
            assert!(report.holds() && report.warnings.is_empty(), "{report}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint after the interval: {report}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(log.checkpoint_now().unwrap(), None);
    log.append(out_record(4)).unwrap();
    let info = log.checkpoint_now().unwrap().unwrap();
    assert_eq!((info.first_seq, info.last_seq), (4, 4));
}

#[test]
fn settings_and_a_second_writer_are_refused_with_what_to_do() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("audit");
    let key = Key::new("k1");
    let bad = AuditSettings {
        node_id: "node a".into(),
        ..settings(1 << 20, 10)
    };
    let error = AuditLog::open(&dir, bad, key.audit_key())
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("node_id"), "{error}");
    let bad = AuditSettings {
        queue_bound: 0,
        ..settings(1 << 20, 10)
    };
    assert!(AuditLog::open(&dir, bad, key.audit_key()).is_err());
    let other_distid = AuditKey {
        key_id: "k1".into(),
        signer: Signer::new(&key.private, "ALICE123@YAHOO.COM").unwrap(),
    };
    assert!(AuditLog::open(&dir, settings(1 << 20, 10), other_distid).is_err());

    let log = AuditLog::open(&dir, settings(1 << 20, 10), key.audit_key()).unwrap();
    let error = AuditLog::open(&dir, settings(1 << 20, 10), key.audit_key())
        .err()
        .unwrap();
    assert!(matches!(error, AuditError::Locked { .. }), "{error}");
    let refused = log.append(NewRecord {
        peer: "".into(),
        ..out_record(1)
    });
    assert!(matches!(refused, Err(AuditError::Record(_))));
    // A refused record does not use up a sequence number.
    assert_eq!(log.append(out_record(1)).unwrap(), 1);
    log.close().unwrap();
    let other_node = AuditSettings {
        node_id: "node-b".into(),
        ..settings(1 << 20, 10)
    };
    let error = AuditLog::open(&dir, other_node, key.audit_key())
        .err()
        .unwrap();
    assert!(matches!(error, AuditError::WrongNode { .. }), "{error}");
}

// ------------------------------------------------------------------------------------------
// SIGKILL under load

/// Not a test on its own: the body of the child process that `a_writer_killed_with_sigkill...`
/// starts (this test binary re-executed with CHILD_ENV set). Appends from 4 threads until
/// killed and prints every acknowledged record.
#[test]
fn sigkill_child_helper() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let pem = fs::read_to_string(dir.with_extension("key.pem")).unwrap();
    let key = PrivateKey::from_pkcs8_pem(&pem).unwrap();
    let audit_key = AuditKey {
        key_id: "k1".into(),
        signer: Signer::new(&key, DEFAULT_DISTID).unwrap(),
    };
    let log = Arc::new(AuditLog::open(&dir, settings(256 * 1024, 25), audit_key).unwrap());
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (log, stdout) = (Arc::clone(&log), Arc::clone(&stdout));
            std::thread::spawn(move || {
                for i in 0.. {
                    let tag = format!("t{t}-{i}");
                    let mut bytes = tag.clone().into_bytes();
                    bytes.resize(6000, b'.');
                    let seq = log
                        .append(NewRecord {
                            bytes,
                            ..out_record(0)
                        })
                        .unwrap();
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {seq} {tag}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

#[test]
fn a_writer_killed_with_sigkill_under_load_leaves_a_log_that_verifies_with_every_acked_record() {
    let tmp = TempDir::new().unwrap();
    let key = Key::new("k1");
    let pubkeys = write_pubkeys(tmp.path(), &[("k1", key.pem())], &[]);
    for round in 0..3 {
        let dir = tmp.path().join(format!("audit-{round}"));
        fs::write(
            dir.with_extension("key.pem"),
            key.private.to_pkcs8_pem().unwrap().as_bytes(),
        )
        .unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_child_helper",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked: BTreeMap<u64, String> = BTreeMap::new();
        let wanted = 200 + round * 150;
        while acked.len() < wanted {
            let line = lines.next().expect("the child stopped early").unwrap();
            if let Some(rest) = line.strip_prefix("ack ") {
                let (seq, tag) = rest.split_once(' ').unwrap();
                acked.insert(seq.parse().unwrap(), tag.to_owned());
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in lines {
            if let Some(rest) = line.unwrap().strip_prefix("ack ") {
                let (seq, tag) = rest.split_once(' ').unwrap();
                acked.insert(seq.parse().unwrap(), tag.to_owned());
            }
        }

        // As the crash left it: holds, up to a torn tail and unsealed records.
        let report = verify(&dir, &keys_of(&pubkeys)).unwrap();
        assert!(report.holds(), "round {round}: {report}");
        // After a restart: the tail is quarantined, everything sealed, nothing lost.
        let log = AuditLog::open(&dir, settings(256 * 1024, 25), key.audit_key()).unwrap();
        log.close().unwrap();
        let report = verify(&dir, &keys_of(&pubkeys)).unwrap();
        assert!(report.holds(), "round {round}: {report}");
        assert!(
            report.torn_tail.is_none() && report.warnings.is_empty(),
            "{report}"
        );
        let mut logged: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for file in segments(&dir) {
            for (_, _, frame) in frames(&file.path) {
                if let Frame::Record { record, .. } = frame {
                    logged.insert(record.seq, record.payload);
                }
            }
        }
        let tags: BTreeSet<&String> = acked.values().collect();
        assert_eq!(tags.len(), acked.len(), "a tag acknowledged twice");
        for (seq, tag) in &acked {
            let payload = logged
                .get(seq)
                .unwrap_or_else(|| panic!("acked record {seq} lost"));
            assert!(
                payload.starts_with(format!("{tag}.").as_bytes()),
                "record {seq} is not {tag}"
            );
        }
    }
}

#[test]
fn a_hole_in_the_last_unsynced_batch_is_quarantined_with_the_complete_records_after_it() {
    // What a crash leaves when the disk wrote a later page of the last batch but not an earlier
    // one: a damaged frame followed by a complete one, at the end of the last segment.
    let fixture = Fixture::new(10, 64 * 1024, 100);
    let prev = last_hash(&fixture.log);
    let (path, before) = partial_record(&fixture.log, 11, prev, 120);
    let mut frame = Vec::new();
    Record {
        seq: 12,
        time_ms: 2,
        direction: Direction::Out,
        peer_signature: PeerSignature::None,
        txn_id: None,
        prev_hash: [0u8; 32],
        peer: "TENPAY".into(),
        message_type: "DEBIT_ANSWER".into(),
        payload: b"complete".to_vec(),
    }
    .encode_frame(&mut frame)
    .unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&frame)
        .unwrap();
    // Before the restart the verifier is strict: damage followed by a valid frame.
    assert!(!fixture.verify().holds());

    let log = AuditLog::open(
        &fixture.log,
        settings(64 * 1024, 100),
        fixture.key.audit_key(),
    )
    .unwrap();
    assert_eq!(log.append(out_record(12)).unwrap(), 12);
    log.close().unwrap();
    let report = fixture.verify();
    assert!(report.holds(), "{report}");
    assert_eq!(report.recoveries[0].offset, before);
    assert_eq!(report.warnings.len(), 1, "{report}");
    assert!(
        report.warnings[0]
            .what
            .contains("complete record frames (1 records, 12..12)"),
        "{report}"
    );
}

#[test]
fn a_log_cut_back_with_its_last_checkpoints_is_caught_by_a_kept_checkpoint() {
    let fixture = Fixture::new(20, 64 * 1024, 5);
    let export = fixture.root.join("kept");
    let status = audit_cli()
        .args([
            "export-openssl",
            fixture.log.to_str().unwrap(),
            export.to_str().unwrap(),
        ])
        .arg("--pubkeys")
        .arg(&fixture.pubkeys)
        .status()
        .unwrap();
    assert!(status.success());
    let kept = export.join("CP-4.bin");
    let verify_kept = |dir: &Path| {
        audit_cli()
            .args(["verify", dir.to_str().unwrap(), "--pubkeys"])
            .arg(&fixture.pubkeys)
            .arg("--expect-checkpoint")
            .arg(&kept)
            .output()
            .unwrap()
    };
    let output = verify_kept(&fixture.log);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("kept checkpoints found in the log: 1"),
        "{stdout}"
    );

    // Cut back to the end of the third checkpoint: on its own the shorter log verifies...
    let copy = fixture.copy();
    let file = &segments(copy.path())[0];
    let (offset, len, _) = frames(&file.path)
        .into_iter()
        .filter(|(_, _, f)| matches!(f, Frame::Checkpoint(_)))
        .nth(2)
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&file.path)
        .unwrap()
        .set_len((offset + len) as u64)
        .unwrap();
    assert!(
        verify(copy.path(), &keys_of(&fixture.pubkeys))
            .unwrap()
            .holds()
    );
    // ...but not against the checkpoint the auditor kept.
    let output = verify_kept(copy.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("no longer contains the checkpoint of records 16..=20"),
        "{stdout}"
    );
}
