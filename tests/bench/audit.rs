//! `cargo bench --bench audit`: the SM-signed message log.
//! (a) durable appends per second (each returns after its fdatasync; group commit) from 1 and
//!     8 threads, 1 KiB messages;
//! (b) verifier throughput in records per minute, on a log of plain records and on a realistic
//!     mix where one record in five is an institution's signed request that is re-verified.
//! Prints a markdown table; BENCHMARKS.md is updated by hand from it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kunpay::audit::{
    AuditKey, AuditLog, AuditSettings, Direction, NewRecord, PeerSignature, Pubkeys, verify,
};
use kunpay::channel::message::attach_signature;
use kunpay::crypto::{DEFAULT_DISTID, PrivateKey, SignatureFormat, Signer};

const APPEND_SECONDS: u64 = 5;
const MESSAGE_LEN: usize = 1024;
const VERIFY_RECORDS: u64 = 300_000;
const SIGNED_POOL: usize = 500;

fn settings() -> AuditSettings {
    AuditSettings {
        node_id: "bench".into(),
        max_segment_bytes: 128 << 20,
        checkpoint_every_records: 10_000,
        checkpoint_every: Duration::from_secs(60),
        queue_bound: 4096,
    }
}

fn audit_key() -> (AuditKey, String) {
    let key = PrivateKey::generate().expect("key");
    let pem = key.public_key().to_public_key_pem().expect("pem");
    let signer = Signer::new(&key, DEFAULT_DISTID).expect("signer");
    (
        AuditKey {
            key_id: "bench-key".into(),
            signer,
        },
        pem,
    )
}

fn plain(i: u64) -> NewRecord {
    let mut bytes =
        format!("<root><MsgHeader><MsgId>{i}</MsgId></MsgHeader><MsgBody>").into_bytes();
    bytes.resize(MESSAGE_LEN, b'x');
    NewRecord {
        direction: Direction::Out,
        peer: "TENPAY".into(),
        message_type: "DEBIT".into(),
        txn_id: Some(uuid::Uuid::from_u128(i as u128)),
        peer_signature: PeerSignature::None,
        bytes,
    }
}

/// Durable appends per second from `threads` threads for APPEND_SECONDS.
fn append_rate(dir: &Path, threads: usize) -> f64 {
    let (key, _) = audit_key();
    let log = Arc::new(AuditLog::open(dir, settings(), key).expect("open"));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (log, stop, count) = (log.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                let mut i = t as u64 * 1_000_000_000;
                while !stop.load(Ordering::Relaxed) {
                    log.append(plain(i)).expect("append");
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(APPEND_SECONDS));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("worker");
    }
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    log.close().expect("close");
    rate
}

/// Builds a log of VERIFY_RECORDS records (one in `signed_every` an institution's signed
/// request) and returns the records per minute of a full verification.
fn verify_rate(dir: &Path, signed_every: u64) -> (f64, u64) {
    let (key, audit_pem) = audit_key();
    let institution = PrivateKey::generate().expect("key");
    let institution_signer = Signer::new(&institution, DEFAULT_DISTID).expect("signer");
    let pool: Vec<Vec<u8>> = (0..SIGNED_POOL)
        .map(|i| {
            let mut body =
                format!("<root><MsgHeader><MsgId>{i}</MsgId></MsgHeader><MsgBody>").into_bytes();
            body.resize(MESSAGE_LEN - 100, b'y');
            body.extend_from_slice(b"</MsgBody></root>");
            let signature = institution_signer
                .sign(&body, SignatureFormat::Der)
                .expect("sign");
            attach_signature(body, &signature)
        })
        .collect();
    let log = Arc::new(AuditLog::open(dir, settings(), key).expect("open"));
    let threads = 8u64;
    let per_thread = VERIFY_RECORDS / threads;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (log, pool) = (log.clone(), pool.clone());
            std::thread::spawn(move || {
                for n in 0..per_thread {
                    let i = t * per_thread + n;
                    let record = if signed_every > 0 && i.is_multiple_of(signed_every) {
                        NewRecord {
                            direction: Direction::In,
                            peer_signature: PeerSignature::Verified,
                            bytes: pool[i as usize % pool.len()].clone(),
                            ..plain(i)
                        }
                    } else {
                        plain(i)
                    };
                    log.append(record).expect("append");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    log.close().expect("close");
    let institution_pem = institution.public_key().to_public_key_pem().expect("pem");
    let keys = Pubkeys::parse(
        &format!(
            "[audit_keys]\nbench-key = {{ pem = \"\"\"\n{audit_pem}\"\"\" }}\n\
             [institutions.TENPAY]\npem = \"\"\"\n{institution_pem}\"\"\"\n"
        ),
        dir,
    )
    .expect("pubkeys");
    let start = Instant::now();
    let report = verify(dir, &keys).expect("verify");
    let elapsed = start.elapsed().as_secs_f64();
    assert!(report.holds(), "{report}");
    assert_eq!(report.records, per_thread * threads);
    (
        report.records as f64 / elapsed * 60.0,
        report.inbound_verified,
    )
}

fn main() {
    // `cargo bench` passes --bench; any other argument is a filter we do not support.
    let scratch = std::env::var_os("KUNPAY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = |label: &str| {
        tempfile::Builder::new()
            .prefix(label)
            .tempdir_in(&scratch)
            .expect("tempdir")
    };
    println!("| audit log | result |");
    println!("|---|---|");
    let one = append_rate(tmp("audit-append1-").path(), 1);
    println!("| durable appends/s, 1 thread, {MESSAGE_LEN} B | {one:.0} |");
    let eight = append_rate(tmp("audit-append8-").path(), 8);
    println!("| durable appends/s, 8 threads (group commit), {MESSAGE_LEN} B | {eight:.0} |");
    let (plain_rate, _) = verify_rate(tmp("audit-verify-plain-").path(), 0);
    println!("| verifier, plain records, records/min | {plain_rate:.0} |");
    let (mixed_rate, signed) = verify_rate(tmp("audit-verify-mixed-").path(), 5);
    println!(
        "| verifier, 1 in 5 records an institution's SM2-signed request ({signed} re-verified), \
         records/min | {mixed_rate:.0} |"
    );
}
