//! `cargo bench --bench crypto`: kunpay's SM2/SM3/SM4 throughput against `openssl speed` on the
//! same machine, one thread each, wall-clock time on both sides. Prints a markdown table and
//! writes it into BENCHMARKS.md between the `bench:crypto` markers.

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

mod report;

use kunpay::crypto::sm3::digest;
use kunpay::crypto::sm4::cbc_encrypt;
use kunpay::crypto::{DEFAULT_DISTID, PrivateKey, SignatureFormat, Signer, Verifier};

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_secs(1);
const WARM_UP_TIME: Duration = Duration::from_millis(300);
const OPENSSL_SECONDS: &str = "3";
const SIGNED_MESSAGE_LEN: usize = 256;
const MIB: usize = 1024 * 1024;
const KIB: usize = 1024;
const MEGABYTE: f64 = 1e6;

struct Row {
    name: &'static str,
    unit: &'static str,
    ours: f64,
    openssl: Option<f64>,
}

/// How many operations to run between clock reads so that a batch takes about a millisecond
/// and reading the clock does not distort fast operations.
fn calibrate_batch(operation: &mut dyn FnMut()) -> u64 {
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < WARM_UP_TIME {
        operation();
        ops += 1;
    }
    let ops_per_ms = ops as f64 / start.elapsed().as_secs_f64() / 1000.0;
    (ops_per_ms.round() as u64).max(1)
}

/// Operations per second over one round of about `ROUND_TIME`.
fn one_round(operation: &mut dyn FnMut(), batch: u64) -> f64 {
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < ROUND_TIME {
        for _ in 0..batch {
            operation();
        }
        ops += batch;
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// One of our operations and how to read OpenSSL's figure for the same thing.
struct Contender<'a> {
    operation: &'a mut dyn FnMut(),
    parse_openssl: fn(&str) -> Option<f64>,
}

/// Alternates `ROUNDS` rounds of each of our operations with as many runs of `openssl speed`, so
/// that load from other users of this shared machine hits both sides alike, and returns the
/// medians: (our operations/s, OpenSSL's parsed figure).
fn measure(contenders: &mut [Contender<'_>], openssl_args: &[&str]) -> Vec<(f64, Option<f64>)> {
    let batches: Vec<u64> = contenders
        .iter_mut()
        .map(|contender| calibrate_batch(contender.operation))
        .collect();
    let mut ours = vec![Vec::new(); contenders.len()];
    let mut theirs = vec![Vec::new(); contenders.len()];
    for round in 0..ROUNDS {
        for (index, contender) in contenders.iter_mut().enumerate() {
            let rate = one_round(contender.operation, batches[index]);
            eprintln!("  kunpay round {round}: {rate:.1} ops/s");
            ours[index].push(rate);
        }
        let output = openssl_speed(openssl_args);
        for (index, contender) in contenders.iter().enumerate() {
            if let Some(value) = (contender.parse_openssl)(&output) {
                eprintln!("  openssl run {round}: {value:.1}");
                theirs[index].push(value);
            }
        }
    }
    ours.into_iter()
        .zip(theirs)
        .map(|(ours, theirs)| (median(ours).unwrap_or(0.0), median(theirs)))
        .collect()
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `openssl speed` prints its `+R` lines on stderr and its `+F` lines on stdout; both are kept.
fn openssl_speed(args: &[&str]) -> String {
    let mut full_args = vec!["speed", "-elapsed", "-mr", "-seconds", OPENSSL_SECONDS];
    full_args.extend_from_slice(args);
    eprintln!("  openssl {}", full_args.join(" "));
    match Command::new("openssl").args(&full_args).output() {
        Ok(output) if output.status.success() => format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        _ => String::new(),
    }
}

fn parse_sm2_sign_rate(output: &str) -> Option<f64> {
    parse_sm2_rate(output, "+R10")
}

fn parse_sm2_verify_rate(output: &str) -> Option<f64> {
    parse_sm2_rate(output, "+R11")
}

/// `+R10:<count>:<bits>:CurveSM2:<seconds>` (sign) or `+R11:...` (verify) → operations/second.
fn parse_sm2_rate(output: &str, tag: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() == 5 && fields[0] == tag && fields[3] == "CurveSM2" {
            let count: f64 = fields[1].parse().ok()?;
            let seconds: f64 = fields[4].parse().ok()?;
            (seconds > 0.0).then(|| count / seconds)
        } else {
            None
        }
    })
}

/// `+F:<index>:<algorithm>:<bytes per second>` → MB/s.
fn parse_throughput(output: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() == 4 && fields[0] == "+F" {
            fields[3].parse::<f64>().ok().map(|rate| rate / MEGABYTE)
        } else {
            None
        }
    })
}

fn machine_info() -> Vec<(&'static str, String)> {
    let cpu_model = command_output("lscpu", &[])
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("Model name:"))
                .map(|line| line.trim_start_matches("Model name:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism()
        .map(|count| count.to_string())
        .unwrap_or_else(|_| "unknown".to_owned());
    let trimmed = |text: Option<String>| {
        text.map(|text| text.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    };
    vec![
        ("CPU", cpu_model),
        ("Cores available", cores),
        ("OpenSSL", trimmed(command_output("openssl", &["version"]))),
        ("rustc", trimmed(command_output("rustc", &["--version"]))),
        (
            "Date (UTC)",
            trimmed(command_output("date", &["-u", "+%Y-%m-%d %H:%M"])),
        ),
    ]
}

fn render(rows: &[Row]) -> String {
    let mut text = String::new();
    text.push_str("## SM2 / SM3 / SM4: kunpay (RustCrypto) vs OpenSSL\n\n");
    text.push_str(
        "| Operation | Unit | kunpay | OpenSSL | Ratio kunpay/OpenSSL | Pass (>= 1.0) |\n",
    );
    text.push_str("|---|---|---:|---:|---:|---|\n");
    for row in rows {
        let (openssl, ratio, verdict) = match row.openssl {
            Some(openssl) if openssl > 0.0 => {
                let ratio = row.ours / openssl;
                (
                    format!("{openssl:.1}"),
                    format!("{ratio:.2}"),
                    if ratio >= 1.0 { "yes" } else { "NO" },
                )
            }
            _ => ("n/a".to_owned(), "n/a".to_owned(), "n/a"),
        };
        text.push_str(&format!(
            "| {} | {} | {:.1} | {openssl} | {ratio} | {verdict} |\n",
            row.name, row.unit, row.ours
        ));
    }
    text.push_str("\nMachine:\n\n");
    for (label, value) in machine_info() {
        text.push_str(&format!("- {label}: {value}\n"));
    }
    text.push_str(&format!(
        "\nMethod: `cargo bench --bench crypto` (release profile: thin LTO, codegen-units 4, \
         panic=abort, no target-cpu flags). kunpay figures are the median of {ROUNDS} rounds of \
         about {}s each after a warm-up, on one thread, wall-clock time, through the public \
         `kunpay::crypto` API: SM2 signs a {SIGNED_MESSAGE_LEN}-byte message (DER output, \
         distinguishing id {DEFAULT_DISTID}, one reused `Signer`, hedged RFC 6979 nonce with \
         32 bytes from getrandom per signature) and verifies it with one reused `Verifier`; SM3 \
         hashes 1 MiB and 1 KiB buffers; SM4-CBC encrypts 1 MiB with PKCS#7 padding into a new \
         buffer. OpenSSL figures are the median of {ROUNDS} runs of `openssl speed -elapsed -mr -seconds \
         {OPENSSL_SECONDS}` per row, alternating with our rounds so that load from other users \
         of the machine hits both sides alike (`sm2`; `-evp sm3 -bytes 1048576` / `-bytes 1024`; \
         `-evp sm4-cbc -bytes 1048576`), also one thread and wall-clock; note that OpenSSL's \
         `speed sm2` signs a short message and re-initialises the digest context (recomputing \
         Z) on every operation. MB = 10^6 bytes. The machine is shared with other developers, \
         so expect noise between runs; compare ratios rather than absolute figures.\n",
        ROUND_TIME.as_secs()
    ));
    text
}

/// MB/s of `operation` over `buffer`, ours and OpenSSL's.
fn measure_throughput(
    label: &str,
    buffer: &[u8],
    operation: &mut dyn FnMut(&[u8]),
    openssl_args: &[&str],
) -> (f64, Option<f64>) {
    eprintln!("{label}");
    let mut run = || operation(black_box(buffer));
    let (ops_per_second, openssl) = measure(
        &mut [Contender {
            operation: &mut run,
            parse_openssl: parse_throughput,
        }],
        openssl_args,
    )[0];
    (ops_per_second * buffer.len() as f64 / MEGABYTE, openssl)
}

fn main() {
    let key = PrivateKey::generate().expect("key generation");
    let signer = Signer::new(&key, DEFAULT_DISTID).expect("signer");
    let verifier = Verifier::new(&key.public_key(), DEFAULT_DISTID).expect("verifier");
    let message = vec![0x5au8; SIGNED_MESSAGE_LEN];
    let signature = signer
        .sign(&message, SignatureFormat::Der)
        .expect("signature");
    let one_mib = vec![0xa5u8; MIB];
    let one_kib = vec![0xa5u8; KIB];
    let sm4_key = [0x11u8; 16];
    let sm4_iv = [0x22u8; 16];

    eprintln!("SM2 sign/verify");
    let mut sign = || {
        black_box(
            signer
                .sign(black_box(&message), SignatureFormat::Der)
                .expect("sign"),
        );
    };
    let mut verify = || {
        verifier
            .verify(
                black_box(&message),
                black_box(&signature),
                SignatureFormat::Der,
            )
            .expect("verify");
    };
    let sm2 = measure(
        &mut [
            Contender {
                operation: &mut sign,
                parse_openssl: parse_sm2_sign_rate,
            },
            Contender {
                operation: &mut verify,
                parse_openssl: parse_sm2_verify_rate,
            },
        ],
        &["sm2"],
    );

    let mut hash = |data: &[u8]| {
        black_box(digest(data));
    };
    let sm3_mib = measure_throughput(
        "SM3 1 MiB",
        &one_mib,
        &mut hash,
        &["-bytes", "1048576", "-evp", "sm3"],
    );
    let sm3_kib = measure_throughput(
        "SM3 1 KiB",
        &one_kib,
        &mut hash,
        &["-bytes", "1024", "-evp", "sm3"],
    );
    let mut encrypt = |data: &[u8]| {
        black_box(cbc_encrypt(&sm4_key, &sm4_iv, data));
    };
    let sm4_cbc = measure_throughput(
        "SM4-CBC 1 MiB",
        &one_mib,
        &mut encrypt,
        &["-bytes", "1048576", "-evp", "sm4-cbc"],
    );

    let row = |name, unit, (ours, openssl): (f64, Option<f64>)| Row {
        name,
        unit,
        ours,
        openssl,
    };
    let rows = [
        row("SM2 sign (256-byte message, DER)", "ops/s", sm2[0]),
        row("SM2 verify (256-byte message, DER)", "ops/s", sm2[1]),
        row("SM3, 1 MiB buffers", "MB/s", sm3_mib),
        row("SM3, 1 KiB buffers", "MB/s", sm3_kib),
        row("SM4-CBC encrypt, 1 MiB buffers", "MB/s", sm4_cbc),
    ];

    let section = render(&rows);
    println!("{section}");
    match report::write_section("crypto", &section) {
        Ok(path) => eprintln!("wrote {}", path.display()),
        Err(error) => eprintln!("could not update BENCHMARKS.md: {error}"),
    }
}
