//! Debit throughput end to end: signed HTTPS request in, journal committed, core posted (the
//! in-process simulator), signed response out; database on this machine, load generator on
//! this machine sending pre-signed requests over keep-alive TLS connections.
//!
//! `make bench` runs it (`cargo bench --bench payments`); results go to BENCHMARKS.md between
//! the `bench:payments` markers (and `payments-group`, `payments-broker`, `payments-audit`).
//! Environment:
//! - KUNPAY_BENCH_DEBITS (default 20000), KUNPAY_BENCH_CONNECTIONS (default 32);
//! - KUNPAY_BENCH_ONLY: `in-process` (the in-process figure, the journal group comparison and
//!   the audit-log comparison), `group` (the journal group comparison alone), `risk`
//!   (in-process without and with risk control, then the two side by side in alternating
//!   blocks), `broker`, `audit` (the audit comparison alone), `versus` (this build against the
//!   kunpayd named by KUNPAY_BENCH_VERSUS, in alternating blocks: for measuring a change);
//! - KUNPAY_BENCH_AUDIT_ROUNDS (rounds of each side-by-side comparison, default 1; 0 skips the
//!   audit comparison), KUNPAY_BENCH_AUDIT_BLOCK (default 2000), KUNPAY_BENCH_AUDIT_DIR (where
//!   the compared runs keep their log; default: the run's temporary directory);
//! - KUNPAY_BENCH_WORKERS (the institution's workers and database connections, default 32),
//!   KUNPAY_BENCH_JOURNAL_GROUP_MAX and KUNPAY_BENCH_JOURNAL_GROUP_LEADERS (its journal
//!   group, defaults 32 and 3);
//! - KUNPAY_BENCH_PGBENCH_SCRIPT (a path: the database-ceiling measurement writes its pgbench
//!   script there, for looking into the ceiling by hand), KUNPAY_TEST_DATABASE_URL.

#[path = "../common/mod.rs"]
mod common;
mod report;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::free_port;
use common::institution::TestInstitution;
use diesel::prelude::*;
use kunpay::payment::request::MsgType;
use openssl::ssl::{SslConnector, SslMethod, SslStream};

const CUSTOMERS: u32 = 256;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One keep-alive HTTPS connection speaking just enough HTTP/1.1.
struct Client {
    tls: SslStream<TcpStream>,
    buffer: Vec<u8>,
}

impl Client {
    /// The TLS client configuration trusting only the daemon's certificate. Built once per
    /// daemon: building one loads the system's CA store as well (tens of milliseconds of CPU),
    /// which per connection would put the load generator's set-up into every measured block.
    fn tls(ca: &Path) -> SslConnector {
        let mut builder = SslConnector::builder(SslMethod::tls_client()).unwrap();
        builder.set_ca_file(ca).unwrap();
        builder.build()
    }

    fn connect(port: u16, tls: &SslConnector) -> Client {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tls.connect("localhost", tcp).unwrap();
        Client {
            tls,
            buffer: Vec::with_capacity(16 * 1024),
        }
    }

    fn post(&mut self, path: &str, body: &[u8]) -> Vec<u8> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        self.tls.write_all(&request).unwrap();
        self.buffer.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = self.tls.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed");
            self.buffer.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .expect("content-length");
                while self.buffer.len() < end + 4 + length {
                    let n = self.tls.read(&mut chunk).unwrap();
                    assert!(n > 0, "connection closed");
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                return self.buffer[end + 4..end + 4 + length].to_vec();
            }
        }
    }
}

fn result_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.split("<RsltCd>")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or("")
        .to_string()
}

fn field(body: &[u8], name: &str) -> String {
    let text = String::from_utf8_lossy(body);
    text.split(&format!("<{name}>"))
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or("")
        .to_string()
}

struct Node {
    child: Child,
    database: String,
    admin_url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if let Ok(mut admin) = PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&mut admin);
        }
    }
}

/// The median of the per-block ratios of a side-by-side comparison (sorts them).
fn median(ratios: &mut [f64]) -> f64 {
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The daemon's core round trip of postings (publish to reply in hand, `/metrics`), p50 and p99
/// in seconds.
fn core_round_trip(metrics_before: &str, metrics_after: &str) -> (f64, f64) {
    histogram_percentiles(
        metrics_before,
        metrics_after,
        "kunpay_core_round_trip_seconds_bucket{",
        "request=\"post\"",
    )
}

/// Server-side time from the daemon's histogram: (p50, p99) upper bucket bounds in seconds.
fn server_percentiles(metrics_before: &str, metrics_after: &str) -> (f64, f64) {
    histogram_percentiles(
        metrics_before,
        metrics_after,
        "kunpay_http_request_duration_seconds_bucket{",
        "listener=\"channel\"",
    )
}

/// (p50, p99) of the histogram whose bucket lines start with `prefix` and contain `label`,
/// over what was observed between the two scrapes.
fn histogram_percentiles(
    metrics_before: &str,
    metrics_after: &str,
    prefix: &str,
    label: &str,
) -> (f64, f64) {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(label))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    },
                    count,
                ))
            })
            .collect()
    };
    let (before, after) = (buckets(metrics_before), buckets(metrics_after));
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, count)| {
            (
                *le,
                count
                    - before
                        .iter()
                        .find(|(b, _)| b == le)
                        .map(|(_, c)| *c)
                        .unwrap_or(0.0),
            )
        })
        .collect();
    let total = deltas.last().map(|(_, c)| *c).unwrap_or(0.0);
    // Linear interpolation inside the bucket that holds the quantile, as Prometheus's
    // histogram_quantile does.
    let at = |p: f64| {
        let rank = total * p;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &deltas {
            if count >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let in_bucket = count - lower.1;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * fraction;
            }
            lower = (le, count);
        }
        f64::NAN
    };
    (at(0.5), at(0.99))
}

/// The institution's journal group settings: KUNPAY_BENCH_JOURNAL_GROUP_MAX (default 32) and
/// KUNPAY_BENCH_JOURNAL_GROUP_LEADERS (default 3, for this 2-core machine: two leaders left
/// the CPU idle while groups waited for their commits, more gave smaller groups). `grouped`
/// false: every statement alone (`journal_group_max = 1`, the configuration's default).
fn journal_group_settings(grouped: bool) -> String {
    if !grouped {
        return "journal_group_max = 1\n".into();
    }
    format!(
        "journal_group_max = {}\njournal_group_leaders = {}\n",
        env_number("KUNPAY_BENCH_JOURNAL_GROUP_MAX", 32),
        env_number("KUNPAY_BENCH_JOURNAL_GROUP_LEADERS", 3)
    )
}

/// pgbench from the PostgreSQL installation the tests use.
fn pgbench() -> Option<std::path::PathBuf> {
    let on_path = Command::new("pgbench").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return Some("pgbench".into());
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// Database clients pgbench uses for the ceiling measurement (the daemon's pool size).
const CEILING_CLIENTS: usize = 16;
const CEILING_SECONDS: u32 = 15;

/// What PostgreSQL alone does with a debit's two statements (the daemon's own SQL, prepared,
/// from pgbench on this machine, against synthetic agreements in the bench database):
/// debits/s with synchronous commit, and without it (the CPU ceiling). None without pgbench.
fn database_ceiling(db_url: &str) -> Option<(f64, f64)> {
    let pgbench = pgbench()?;
    let mut conn = PgConnection::establish(db_url).unwrap();
    diesel::sql_query(
        "INSERT INTO agreement (agreement_no, inst_id, state, account_hash, account_masked, \
         account_enc, code_attempts, created_at, updated_at) \
         SELECT 'PGB' || i, 'PGBENCH', 'ACTIVE', 'pgbench-hash-' || i, '622202*********0123', \
                repeat('x', 120), 0, now(), now() FROM generate_series(0, 255) AS i",
    )
    .execute(&mut conn)
    .unwrap();
    // Binds in the order the journal binds them (see journal::debit_path_sql).
    let today = "CAST(timezone('Asia/Shanghai', now()) AS DATE)";
    let binds: [Vec<String>; 2] = [
        [
            "'PGBENCH'",
            "'M' || :n",
            "now()",
            "true",
            "'PGBENCH'",
            "'S' || :n",
            "'PGB' || :a",
            "'PGBENCH'",
            "true",
            "100",
            "'PGBENCH'",
            today,
            "100",
            "100000000000",
            "CAST(md5('S' || :n) AS UUID)",
            "'PGBENCH'",
            "'S' || :n",
            "'SENT_TO_CORE'",
            "100",
            today,
            "now()",
            "now()",
            "now()",
            "NULL",
            "'RECEIVED'",
            "'request received'",
            "'RECEIVED'",
            "'RISK_CHECKED'",
            "'approved: no risk rules configured'",
            "true",
            "'RISK_CHECKED'",
            "'SENT_TO_CORE'",
            "'posting sent to core'",
            "true",
            // The outbox entry (no risk decision: the statement has no decision or case).
            "true",
        ]
        .map(String::from)
        .to_vec(),
        [
            "'SUCCEEDED'",
            "'0000'",
            "'C' || :n",
            "now()",
            "CAST(md5('S' || :n) AS UUID)",
            "'SENT_TO_CORE'",
            "'SENT_TO_CORE'",
            "'SUCCEEDED'",
            "'core posted'",
            "now()",
            // The outbox entry settled (succeeded: nothing given back, no callback URL).
            "'SUCCEEDED'",
            "'PGBENCH'",
            "'S' || :n",
            "'DEBIT'",
            "repeat('d', 180)",
            "convert_to(repeat('r', 1100), 'UTF8')",
            "'0000'",
            "now()",
            "true",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut script = String::from("\\set a random(0, 255)\n\\set n random(1, 1000000000000000)\n");
    for (sql, binds) in kunpay::payment::journal::debit_path_sql()
        .iter()
        .zip(&binds)
    {
        let parts: Vec<&str> = sql.split('?').collect();
        assert_eq!(parts.len(), binds.len() + 1, "binds for {sql}");
        for (index, part) in parts.iter().enumerate() {
            if index > 0 {
                script.push(' ');
                script.push_str(&binds[index - 1]);
                script.push(' ');
            }
            script.push_str(&part.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        script.push_str(";\n");
    }
    // One usage row per synthetic account, as the first debit of a day would create.
    diesel::sql_query(format!(
        "INSERT INTO daily_usage (inst_id, account_hash, kind, business_date, used_fen) \
         SELECT 'PGBENCH', 'pgbench-hash-' || i, 'DEBIT', {today}, 0 FROM generate_series(0, 255) AS i"
    ))
    .execute(&mut conn)
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script_path = dir.path().join("debit.pgbench");
    std::fs::write(&script_path, &script).unwrap();
    if let Ok(copy) = std::env::var("KUNPAY_BENCH_PGBENCH_SCRIPT") {
        std::fs::write(copy, &script).expect("writing KUNPAY_BENCH_PGBENCH_SCRIPT");
    }
    let run = |synchronous: bool| -> f64 {
        let output = Command::new(&pgbench)
            .args(["-n", "-M", "prepared", "-j", "2"])
            .arg("-c")
            .arg(CEILING_CLIENTS.to_string())
            .arg("-T")
            .arg(CEILING_SECONDS.to_string())
            .arg("-f")
            .arg(&script_path)
            .arg(db_url)
            .env(
                "PGOPTIONS",
                if synchronous {
                    "-c synchronous_commit=on"
                } else {
                    "-c synchronous_commit=off"
                },
            )
            .output()
            .expect("pgbench runs");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.contains("failed transactions: 0 "),
            "pgbench: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("pgbench prints tps")
    };
    Some((run(true), run(false)))
}

/// Where the core is: in the daemon's process (issue 3's figure), or behind RabbitMQ in a
/// separate `kunpay-coresim` process (issue 4's).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CoreSetup {
    InProcess,
    Broker,
}

fn main() {
    let debits = env_number("KUNPAY_BENCH_DEBITS", 20_000);
    let connections = env_number("KUNPAY_BENCH_CONNECTIONS", 32);
    // KUNPAY_BENCH_ONLY=in-process, risk (in-process without and then with risk control),
    // audit (the audit-log comparison) or broker runs only those.
    let only = std::env::var("KUNPAY_BENCH_ONLY").unwrap_or_default();
    let mut tps_without_risk = None;
    if only.is_empty() || only == "in-process" || only == "risk" {
        let measured = run(CoreSetup::InProcess, debits, connections, Audit::Off, false);
        println!("{}", measured.section);
        report::write_section("payments", &measured.section).expect("writing BENCHMARKS.md");
        tps_without_risk = Some(measured.tps);
    }
    if let Some(without) = tps_without_risk
        && (only.is_empty() || only == "risk")
    {
        let measured = run(CoreSetup::InProcess, debits, connections, Audit::Off, true);
        let rounds = env_number("KUNPAY_BENCH_AUDIT_ROUNDS", 1);
        let section = format!(
            "{}
| risk on in this run / risk off in the run above ({without:.0} TPS), one after the other | {:.1}% | | | |
{}",
            measured.section,
            measured.tps / without * 100.0,
            risk_overhead(debits, connections, rounds),
        );
        println!("{section}");
        report::write_section("payments-risk", &section).expect("writing BENCHMARKS.md");
    }
    if only.is_empty() || only == "in-process" || only == "group" {
        let rounds = env_number("KUNPAY_BENCH_AUDIT_ROUNDS", 1).max(1);
        let section = group_commit_gain(debits, connections, rounds);
        println!("{section}");
        report::write_section("payments-group", &section).expect("writing BENCHMARKS.md");
    }
    if only == "versus" {
        let baseline = std::env::var("KUNPAY_BENCH_VERSUS").expect(
            "KUNPAY_BENCH_ONLY=versus needs KUNPAY_BENCH_VERSUS: the kunpayd to compare with",
        );
        let rounds = env_number("KUNPAY_BENCH_AUDIT_ROUNDS", 1).max(1);
        let section = versus(Path::new(&baseline), debits, connections, rounds);
        println!("{section}");
        report::write_section("payments-versus", &section).expect("writing BENCHMARKS.md");
    }
    let audit_rounds = env_number("KUNPAY_BENCH_AUDIT_ROUNDS", 1);
    if (only.is_empty() || only == "in-process" || only == "audit") && audit_rounds > 0 {
        let rounds = audit_rounds;
        let section = audit_overhead(debits, connections, rounds);
        println!("{section}");
        report::write_section("payments-audit", &section).expect("writing BENCHMARKS.md");
    }
    if only.is_empty() || only == "broker" {
        let section = run(CoreSetup::Broker, debits, connections, Audit::Off, false).section;
        println!("{section}");
        report::write_section("payments-broker", &section).expect("writing BENCHMARKS.md");
    }
}

/// The audit log in a run: absent (the figures of issues 3 and 4, with the database ceiling),
/// or one side of the comparison (on or off, no ceiling).
#[derive(Clone, Copy)]
enum Audit {
    Off,
    Compared(bool),
}

/// What one run measured.
struct Measured {
    section: String,
    tps: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
    /// kunpayd's CPU time per debit during the timed part, and its audit writer thread's.
    cpu_ms_per_debit: f64,
    writer_cpu_ms_per_debit: f64,
    /// CPU per debit (ms) of each process a debit passes through (empty when not measured).
    machine_ms_per_debit: Vec<(&'static str, f64)>,
    /// With `[audit]`: what the log holds after the run.
    audit: Option<AuditFigures>,
}

struct AuditFigures {
    /// Records appended during the timed debits (request and answer of each).
    records: f64,
    /// Bytes of the log directory after the run, per debit of the whole run (setup included).
    bytes_per_debit: f64,
    /// Time until fdatasync of the answers' appends (server histogram, interpolated).
    append_p50: f64,
    append_p99: f64,
    /// `kunpay-audit verify` over the run's log: wall time, and its verdict.
    verify_seconds: f64,
    verify_records: u64,
}

/// The 1/5/15-minute load averages, to say how busy the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Debit throughput without and with `[audit]`: in each round two daemons (one without, one
/// with the log, each with its own database) are prepared side by side, then their debits are
/// sent in alternating blocks (off, on, then on, off, ...), so that the machine's drift (other
/// users of the shared machine) falls on both alike; the overhead is 1 - TPS(on) / TPS(off)
/// over all blocks.
fn audit_overhead(debits: usize, connections: usize, rounds: usize) -> String {
    let block = env_number("KUNPAY_BENCH_AUDIT_BLOCK", 2000).clamp(100, debits.max(100));
    let load_before = load_average();
    let where_logged = match std::env::var("KUNPAY_BENCH_AUDIT_DIR") {
        Ok(parent) => {
            let fs = Command::new("stat")
                .args(["-f", "-c", "%T", &parent])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            format!("in {parent} ({fs}, KUNPAY_BENCH_AUDIT_DIR)")
        }
        Err(_) => "in the run's temporary directory on the same disk as PostgreSQL".to_string(),
    };
    let (off, on, mut block_ratios) = compare(debits, connections, rounds, block, "audit", |on| {
        prepare(
            this_build(),
            CoreSetup::InProcess,
            debits,
            Audit::Compared(on),
            false,
            false,
        )
    });
    let median_ratio = median(&mut block_ratios);
    let load_after = load_average();
    let mean = |runs: &[Measured], f: &dyn Fn(&Measured) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len() as f64
    };
    let tps_off = mean(&off, &|m| m.tps);
    let tps_on = mean(&on, &|m| m.tps);
    let overhead = 1.0 - tps_on / tps_off;
    let list = |runs: &[Measured]| {
        runs.iter()
            .map(|m| format!("{:.0}", m.tps))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ms = |d: f64| format!("{:.1} ms", d * 1000.0);
    let figures: Vec<&AuditFigures> = on.iter().filter_map(|m| m.audit.as_ref()).collect();
    let fig = |f: &dyn Fn(&AuditFigures) -> f64| {
        figures.iter().map(|a| f(a)).sum::<f64>() / figures.len() as f64
    };
    let verify_rate = fig(&|a| a.verify_records as f64 / a.verify_seconds) * 60.0;
    format!(
        "## Debit throughput with the audit log (issue 6)\n\n\
         | measure | without `[audit]` | with `[audit]` | ratio | bar |\n|---|---:|---:|---:|---|\n\
         | debit throughput over all blocks ({rounds} round(s) of {debits} debits each side) | {tps_off:.0} TPS | {tps_on:.0} TPS | {:.3} | overhead at most 5%: {:.1}%, {} |\n\
         | the rounds | {} | {} | | |\n\
         | median of the {} per-block ratios (blocks of {block} debits, each pair back to back) | | | {median_ratio:.3} | |\n\
         | client-observed latency p50 / p99 (mean) | {} / {} | {} / {} | | |\n\
         | kunpayd CPU per debit (of which the audit writer thread) | {:.3} ms | {:.3} ms ({:.3} ms) | {:.3} | |\n\
         | audit records per debit (request and answer) | | {:.2} | | |\n\
         | audit log bytes per debit | | {:.0} B | | |\n\
         | append until fdatasync, p50 / p99 (server histogram) | | {} / {} | | |\n\
         | `kunpay-audit verify` on the run's log | | {:.1} M records/min | | 1 M/min |\n\n\
         Method: `KUNPAY_BENCH_ONLY=audit cargo bench --bench payments` prepares, per round, two \
         release daemons as the in-process debit benchmark above does (TLS, in-process \
         core, {debits} pre-signed debits each, a database each) but with each journal statement \
         alone, the configuration's default (with journal groups, the log's added latency also \
         shrinks the groups these closed-loop clients can form: 5.0-6.5% in three rounds on \
         2026-11-24 against 2.0% alone), one without and one with \
         `[audit]` (defaults: checkpoint every 60 s or 10000 records, 256 MiB segments; the log \
         {where_logged}; every answer sent only after its group-committed fdatasync), then sends \
         their debits in alternating blocks of {block} from {connections} keep-alive TLS \
         connections (off then on, then on then off, ...), so that the shared machine's drift \
         falls on both sides alike. Throughput = debits / summed block time; overhead = 1 - \
         TPS(with) / TPS(without). CPU from /proc over the same span. After each round, \
         `kunpay-audit verify` checks the whole log of the daemon with `[audit]` (every chain \
         link, checkpoint and institution signature) and must exit 0. The machine \
         is shared (2 cores; other developers build and test on it): load average {load_before} \
         (1, 5, 15 min) before, {load_after} after; compare the ratio, not the absolute figures. \
         Date: {}.\n",
        tps_on / tps_off,
        overhead * 100.0,
        if overhead <= 0.05 { "met" } else { "NOT met" },
        list(&off),
        list(&on),
        block_ratios.len(),
        ms(mean(&off, &|m| m.p50.as_secs_f64())),
        ms(mean(&off, &|m| m.p99.as_secs_f64())),
        ms(mean(&on, &|m| m.p50.as_secs_f64())),
        ms(mean(&on, &|m| m.p99.as_secs_f64())),
        mean(&off, &|m| m.cpu_ms_per_debit),
        mean(&on, &|m| m.cpu_ms_per_debit),
        mean(&on, &|m| m.writer_cpu_ms_per_debit),
        mean(&on, &|m| m.cpu_ms_per_debit) / mean(&off, &|m| m.cpu_ms_per_debit),
        fig(&|a| a.records) / debits as f64,
        fig(&|a| a.bytes_per_debit),
        ms(fig(&|a| a.append_p50)),
        ms(fig(&|a| a.append_p99)),
        verify_rate / 1e6,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    )
}

/// `rounds` side-by-side comparisons of a feature: per round a daemon without it and one with
/// it (`prepare(false)`, `prepare(true)`), their debits sent by [`alternate`]. Returns the
/// rounds' figures without, with, and every block's throughput ratio with / without.
fn compare(
    debits: usize,
    connections: usize,
    rounds: usize,
    block: usize,
    what: &str,
    prepare: impl Fn(bool) -> Prepared,
) -> (Vec<Measured>, Vec<Measured>, Vec<f64>) {
    let (mut off, mut on, mut block_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        let sides = [prepare(false), prepare(true)];
        let ([side_off, side_on], ratios) = alternate(
            sides,
            debits,
            connections,
            block,
            &format!("{what} round {round}"),
        );
        block_ratios.extend(ratios);
        off.push(side_off);
        on.push(side_on);
    }
    (off, on, block_ratios)
}

/// Sends the debits of two prepared daemons in alternating blocks (0 then 1, then 1 then 0,
/// ...), so that the shared machine's drift falls on both alike. Returns both sides' figures
/// (every debit must answer 0000) and the per-block throughput ratios side 1 / side 0.
fn alternate(
    sides: [Prepared; 2],
    debits: usize,
    connections: usize,
    block: usize,
    what: &str,
) -> ([Measured; 2], Vec<f64>) {
    let before = [sides[0].scrape(), sides[1].scrape()];
    let cpu_before = [sides[0].cpu(), sides[1].cpu()];
    let mut elapsed = [Duration::ZERO; 2];
    let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut failures = [0usize; 2];
    let mut block_ratios = Vec::new();
    // Each side's blocks run alone, so what every process spends during them is that side's.
    let mut machine_cpu: [Vec<(&'static str, f64)>; 2] = [0, 1].map(|side| {
        sides[side]
            .machine_cpu()
            .into_iter()
            .map(|(name, _)| (name, 0.0))
            .collect()
    });
    for (index, start) in (0..debits).step_by(block).enumerate() {
        let range = start..(start + block).min(debits);
        let order = if index % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut tps = [0.0; 2];
        for side in order {
            let machine_before = sides[side].machine_cpu();
            let (took, seen, failed) = sides[side].load(range.clone(), connections);
            for (total, (after, before)) in machine_cpu[side]
                .iter_mut()
                .zip(sides[side].machine_cpu().iter().zip(&machine_before))
            {
                total.1 += after.1 - before.1;
            }
            tps[side] = range.len() as f64 / took.as_secs_f64();
            elapsed[side] += took;
            latencies[side].extend(seen);
            failures[side] += failed;
        }
        block_ratios.push(tps[1] / tps[0]);
        eprintln!(
            "{what}, block {index}: {:.0} TPS side 0, {:.0} TPS side 1",
            tps[0], tps[1]
        );
    }
    let after = [sides[0].scrape(), sides[1].scrape()];
    let cpu_after = [sides[0].cpu(), sides[1].cpu()];
    let [first, second] = sides;
    let measured = [(0, first), (1, second)].map(|(side, prepared)| {
        let measured = finish(
            prepared,
            connections,
            Timed {
                elapsed: elapsed[side],
                latencies: std::mem::take(&mut latencies[side]),
                failures: failures[side],
                before: before[side].clone(),
                after: after[side].clone(),
                cpu: (
                    cpu_after[side].0 - cpu_before[side].0,
                    cpu_after[side].1 - cpu_before[side].1,
                ),
                machine_cpu: std::mem::take(&mut machine_cpu[side]),
                open_loop: (String::new(), String::new()),
            },
        );
        assert_eq!(measured.failures, 0, "every debit answered 0000");
        eprintln!("{what}, side {side}: {:.0} TPS", measured.tps);
        measured
    });
    (measured, block_ratios)
}

/// Debit throughput without and with risk control, measured like the audit log's overhead:
/// two daemons side by side (one without `[risk]`, one with the shipped library, every rule
/// shadow so each debit is decided in full and still paid), debits in alternating blocks.
fn risk_overhead(debits: usize, connections: usize, rounds: usize) -> String {
    let block = env_number("KUNPAY_BENCH_AUDIT_BLOCK", 2000).clamp(100, debits.max(100));
    let load_before = load_average();
    let (off, on, mut block_ratios) = compare(debits, connections, rounds, block, "risk", |on| {
        prepare(
            this_build(),
            CoreSetup::InProcess,
            debits,
            Audit::Compared(false),
            on,
            false,
        )
    });
    let median_ratio = median(&mut block_ratios);
    let tps_off = off.iter().map(|m| m.tps).sum::<f64>() / off.len() as f64;
    let tps_on = on.iter().map(|m| m.tps).sum::<f64>() / on.len() as f64;
    let ratio = tps_on / tps_off;
    format!(
        "| risk on / risk off, side by side ({rounds} round(s) of {debits} debits each side, alternating blocks of {block}): {tps_on:.0} vs {tps_off:.0} TPS | {:.1}% (median of {} block ratios: {:.1}%) | | | within 10%: {} |\n\n\
         The ratio comes from a second pair of daemons prepared side by side (one without and one with `[risk]`, a database each, each journal statement alone) whose debits are sent in alternating blocks, as for the audit log below, so the machine's drift falls on both; the table above is a separate run with risk on. Load average {load_before} before, {} after. Date: {}.\n",
        ratio * 100.0,
        block_ratios.len(),
        median_ratio * 100.0,
        if ratio >= 0.9 { "met" } else { "NOT met" },
        load_average(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    )
}

/// Debit throughput with each journal statement alone and with the institution's journal
/// group commit (`payment/journal/group.rs`), side by side in alternating blocks.
fn group_commit_gain(debits: usize, connections: usize, rounds: usize) -> String {
    let block = env_number("KUNPAY_BENCH_AUDIT_BLOCK", 2000).clamp(100, debits.max(100));
    let load_before = load_average();
    let (alone, grouped, mut block_ratios) =
        compare(debits, connections, rounds, block, "group", |grouped| {
            prepare(
                this_build(),
                CoreSetup::InProcess,
                debits,
                Audit::Compared(false),
                false,
                grouped,
            )
        });
    let median_ratio = median(&mut block_ratios);
    let mean = |side: &[Measured], value: fn(&Measured) -> f64| {
        side.iter().map(value).sum::<f64>() / side.len() as f64
    };
    let (tps_alone, tps_grouped) = (mean(&alone, |m| m.tps), mean(&grouped, |m| m.tps));
    let cpu = |side: &[Measured]| mean(side, |m| m.cpu_ms_per_debit);
    let p99 = |side: &[Measured]| mean(side, |m| m.p99.as_secs_f64() * 1000.0);
    format!(
        "## Journal group commit (issues 3 and 4)\n\n\
         | measure | each statement alone | group commit | ratio |\n\
         |---|---:|---:|---:|\n\
         | debit throughput over all blocks ({rounds} round(s) of {debits} debits each side) | {tps_alone:.0} TPS | {tps_grouped:.0} TPS | {:.3} |\n\
         | median of the {} per-block ratios (blocks of {block}) | | | {median_ratio:.3} |\n\
         | client-observed p99 | {:.1} ms | {:.1} ms | |\n\
         | kunpayd CPU per debit | {:.3} ms | {:.3} ms | |\n\n\
         Method: `KUNPAY_BENCH_ONLY=group cargo bench --bench payments` prepares two release daemons exactly as the in-process benchmark above (a database each, on the same PostgreSQL), one with `journal_group_max = 1` (every opening and outcome statement its own transaction) and one with the institution's journal group at {}, then sends their debits in alternating blocks from {connections} connections so that the machine's drift falls on both. Load average {load_before} before, {} after. Date: {}.\n",
        tps_grouped / tps_alone,
        block_ratios.len(),
        p99(&alone),
        p99(&grouped),
        cpu(&alone),
        cpu(&grouped),
        journal_group_description(),
        load_average(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    )
}

/// This build against another kunpayd (`KUNPAY_BENCH_VERSUS`, say one built from an earlier
/// commit), side by side in alternating blocks: how a change moved throughput and the CPU each
/// process spends per debit, measured in the same minutes, since this machine's speed drifts
/// by up to 2x between hours.
fn versus(baseline: &Path, debits: usize, connections: usize, rounds: usize) -> String {
    assert!(
        baseline.is_file(),
        "KUNPAY_BENCH_VERSUS={}: no such kunpayd",
        baseline.display()
    );
    let block = env_number("KUNPAY_BENCH_AUDIT_BLOCK", 2000).clamp(100, debits.max(100));
    // KUNPAY_BENCH_VERSUS_AUDIT=on: both sides log every message (for changes to the log).
    let audit = std::env::var("KUNPAY_BENCH_VERSUS_AUDIT").is_ok_and(|v| v == "on");
    let load_before = load_average();
    let (before, after, mut block_ratios) =
        compare(debits, connections, rounds, block, "versus", |this| {
            prepare(
                if this { this_build() } else { baseline },
                CoreSetup::InProcess,
                debits,
                Audit::Compared(audit),
                false,
                true,
            )
        });
    let median_ratio = median(&mut block_ratios);
    let mean = |side: &[Measured], value: &dyn Fn(&Measured) -> f64| {
        side.iter().map(value).sum::<f64>() / side.len() as f64
    };
    let (tps_before, tps_after) = (mean(&before, &|m| m.tps), mean(&after, &|m| m.tps));
    let p99 = |side: &[Measured]| mean(side, &|m| m.p99.as_secs_f64() * 1000.0);
    let names: Vec<&'static str> = before[0]
        .machine_ms_per_debit
        .iter()
        .map(|(name, _)| *name)
        .collect();
    let process_cpu = |side: &[Measured], name: &str| {
        mean(side, &|m| {
            m.machine_ms_per_debit
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, ms)| *ms)
        })
    };
    let mut cpu_rows = String::new();
    for name in &names {
        let (was, is) = (process_cpu(&before, name), process_cpu(&after, name));
        cpu_rows.push_str(&format!(
            "| {name} CPU per debit | {was:.3} ms | {is:.3} ms | {:.3} |\n",
            is / was
        ));
    }
    let all = |side: &[Measured]| names.iter().map(|n| process_cpu(side, n)).sum::<f64>();
    format!(
        "## This build against another kunpayd (issues 3 and 4)\n\n\
         | measure | {baseline_name} | this build | ratio |\n\
         |---|---:|---:|---:|\n\
         | debit throughput over all blocks ({rounds} round(s) of {debits} debits each side) | {tps_before:.0} TPS | {tps_after:.0} TPS | {:.3} |\n\
         | median of the {} per-block ratios (blocks of {block}) | | | {median_ratio:.3} |\n\
         | client-observed p99 | {:.1} ms | {:.1} ms | |\n\
         {cpu_rows}\
         | all processes, CPU per debit | {:.3} ms | {:.3} ms | {:.3} |\n\n\
         Method: `KUNPAY_BENCH_ONLY=versus KUNPAY_BENCH_VERSUS=<kunpayd> cargo bench --bench payments` prepares two daemons exactly as the in-process benchmark above (a database each, on the same PostgreSQL, journal group at {}, audit log {}), one running the given binary and one this build, then sends their debits in alternating blocks from {connections} connections so that the machine's drift falls on both. Each side's blocks run alone, so the CPU each process spends during them (from /proc; PostgreSQL: every process of the shared server) is that side's. Load average {load_before} before, {} after. Date: {}.\n",
        tps_after / tps_before,
        block_ratios.len(),
        p99(&before),
        p99(&after),
        all(&before),
        all(&after),
        all(&after) / all(&before),
        journal_group_description(),
        if audit {
            "on (KUNPAY_BENCH_VERSUS_AUDIT=on)"
        } else {
            "off"
        },
        load_average(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        baseline_name = baseline.file_name().map_or_else(
            || baseline.display().to_string(),
            |n| n.to_string_lossy().into_owned()
        ),
    )
}

/// The group settings a grouped run uses, for the method texts.
fn journal_group_description() -> String {
    journal_group_settings(true).trim().replace('\n', ", ")
}

/// A `kunpay-coresim` process and its queues, removed when dropped.
struct Coresim {
    child: Child,
    queues: [String; 3],
}

impl Drop for Coresim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Ok(runtime) = tokio::runtime::Runtime::new() else {
            return;
        };
        let queues = self.queues.clone();
        runtime.block_on(async move {
            let Ok(conn) =
                lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                    .await
            else {
                return;
            };
            let Ok(channel) = conn.create_channel().await else {
                return;
            };
            for q in &queues {
                let _ = channel
                    .queue_delete(
                        q.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
        });
    }
}

fn amqp_url() -> String {
    std::env::var("KUNPAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

const BENCH_MAC_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Starts kunpay-coresim (in-memory ledger: the core's own storage is the bank's cost, not
/// kunpay's) and returns it with the daemon's `[core]` configuration.
fn start_coresim(dir: &Path) -> (Coresim, String) {
    use std::os::unix::fs::PermissionsExt;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let queues = [
        format!("bench.{tag}.request"),
        format!("bench.{tag}.reply"),
        format!("bench.{tag}.dead"),
    ];
    let secret = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let mac = secret("core-mac.key", BENCH_MAC_HEX);
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, host) = rest.split_once('@').unwrap();
    let (user, password) = userinfo.split_once(':').unwrap();
    let password_file = secret("amqp-password", password);
    let config = dir.join("coresim.toml");
    std::fs::write(
        &config,
        format!(
            "[amqp]\nurl = \"{url}\"\nrequest_queue = \"{}\"\ndead_letter_queue = \"{}\"\nprefetch = 256\nconcurrency = 128\n\n\
             [mac]\nkey_id = \"bench\"\nkey_file = \"{}\"\n\n[ledger]\ngenerated_accounts = {CUSTOMERS}\n",
            queues[0],
            queues[2],
            mac.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kunpay-coresim"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let core = format!(
        "[core]\nlink = \"amqp\"\n[core.amqp]\nurl = \"{scheme}://{user}@{host}\"\npassword_file = \"{}\"\n\
         request_queue = \"{}\"\nreply_queue = \"{}\"\ndead_letter_queue = \"{}\"\n\
         mac_key_id = \"bench\"\nmac_key_file = \"{}\"\n",
        password_file.display(),
        queues[0],
        queues[1],
        queues[2],
        mac.display()
    );
    (Coresim { child, queues }, core)
}

/// The value of an unlabelled metric line (0 when absent).
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// CPU clock ticks (user + system) in one `/proc/.../stat` line.
fn ticks(stat: &str) -> f64 {
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); 11 and 12 after the name.
    field(11) + field(12)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds so far of every process whose command is `command` (PostgreSQL's backends,
/// RabbitMQ's Erlang VM).
fn cpu_seconds_named(command: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            stat.split_once('(')
                .and_then(|(_, rest)| rest.rsplit_once(')'))
                .is_some_and(|(name, _)| name == command)
        })
        .map(|stat| ticks(&stat))
        .sum::<f64>()
        / ticks_per_second()
}

/// CPU time (user + system) of process `pid`, or of its threads named `thread`, in seconds.
fn cpu_seconds(pid: u32, thread: Option<&str>) -> f64 {
    let per_second = ticks_per_second();
    let total = match thread {
        None => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| ticks(&s))
            .unwrap_or(0.0),
        Some(name) => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .filter_map(|t| t.ok())
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.trim() == name)
                    })
                    .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                    .map(|s| ticks(&s))
                    .sum()
            })
            .unwrap_or(0.0),
    };
    total / per_second
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// One run; `audit`: with `[audit]` (and then the ceiling is not measured: the comparison
/// wants throughput only).
/// A daemon ready to be measured: started, agreements signed, debits pre-signed.
struct Prepared {
    setup: CoreSetup,
    audit: bool,
    risk: bool,
    ceiling_wanted: bool,
    // Dropped first (SIGTERM, database dropped), then the simulator, then the directory.
    node: Node,
    _coresim: Option<Coresim>,
    dir: tempfile::TempDir,
    audit_dir: std::path::PathBuf,
    port: u16,
    ops_port: u16,
    tls: SslConnector,
    db_url: String,
    signed: Arc<Vec<Vec<u8>>>,
}

/// What the timed part of a run saw.
struct Timed {
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: usize,
    /// /metrics before the first and after the last debit.
    before: String,
    after: String,
    /// kunpayd's CPU seconds (whole process, audit writer thread) over the same span.
    cpu: (f64, f64),
    /// CPU seconds of every process on the debit path over the same span (empty: not taken).
    machine_cpu: Vec<(&'static str, f64)>,
    /// Table rows and a method sentence of the open-loop phases that followed ("" if none).
    open_loop: (String, String),
}

impl Prepared {
    fn scrape(&self) -> String {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        agent
            .get(&format!("http://127.0.0.1:{}/metrics", self.ops_port))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    }

    /// CPU seconds so far of each process a debit passes through, the load generator last.
    fn machine_cpu(&self) -> Vec<(&'static str, f64)> {
        let mut parts = vec![
            ("kunpayd", cpu_seconds(self.node.child.id(), None)),
            ("PostgreSQL", cpu_seconds_named("postgres")),
        ];
        if let Some(coresim) = &self._coresim {
            parts.push(("RabbitMQ", cpu_seconds_named("beam.smp")));
            parts.push(("kunpay-coresim", cpu_seconds(coresim.child.id(), None)));
        }
        parts.push(("load generator", cpu_seconds(std::process::id(), None)));
        parts
    }

    fn cpu(&self) -> (f64, f64) {
        let pid = self.node.child.id();
        (
            cpu_seconds(pid, None),
            cpu_seconds(pid, Some("audit-writer")),
        )
    }

    /// Sends the pre-signed debits `range` closed loop from `connections` threads: each sends its next debit once
    /// the previous one was answered. Returns the time it took, every latency, and how many
    /// answers were not 0000.
    fn load(
        &self,
        range: std::ops::Range<usize>,
        connections: usize,
    ) -> (Duration, Vec<Duration>, usize) {
        self.send(range, connections, None)
    }

    /// Sends `range` open loop: debit k of the range is due `k / rate` seconds after the start,
    /// whatever became of the earlier ones, from `connections` threads connected beforehand.
    /// Each latency counts from the debit's due time, so a debit that waited for a free
    /// connection because the daemon fell behind counts that wait (no coordinated omission).
    fn load_at_rate(
        &self,
        range: std::ops::Range<usize>,
        connections: usize,
        rate: f64,
    ) -> (Duration, Vec<Duration>, usize) {
        assert!(rate > 0.0);
        self.send(range, connections, Some(rate))
    }

    /// [`Prepared::load`] (`rate` None: each thread connects, then sends as answers come) and
    /// [`Prepared::load_at_rate`] (`rate`: every connection made before the clock starts, each
    /// debit sent at its due time and timed from it).
    fn send(
        &self,
        range: std::ops::Range<usize>,
        connections: usize,
        rate: Option<f64>,
    ) -> (Duration, Vec<Duration>, usize) {
        let next = Arc::new(AtomicUsize::new(range.start));
        let (first, end) = (range.start, range.end);
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(range.len())));
        let failures = Arc::new(AtomicUsize::new(0));
        let port = self.port;
        let connected: Vec<Option<Client>> = (0..connections)
            .map(|_| rate.map(|_| Client::connect(port, &self.tls)))
            .collect();
        let started = Instant::now();
        let workers: Vec<_> = connected
            .into_iter()
            .map(|connected| {
                let (signed, next, latencies, failures, tls) = (
                    self.signed.clone(),
                    next.clone(),
                    latencies.clone(),
                    failures.clone(),
                    self.tls.clone(),
                );
                std::thread::spawn(move || {
                    let mut client = connected.unwrap_or_else(|| Client::connect(port, &tls));
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end {
                            break;
                        }
                        let due = match rate {
                            Some(rate) => {
                                let due =
                                    started + Duration::from_secs_f64((i - first) as f64 / rate);
                                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                due
                            }
                            None => Instant::now(),
                        };
                        let answer = client.post(MsgType::Debit.path(), &signed[i]);
                        mine.push(due.elapsed());
                        if result_code(&answer) != "0000" {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    latencies.lock().unwrap().extend(mine);
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let elapsed = started.elapsed();
        let latencies = latencies.lock().unwrap().clone();
        (elapsed, latencies, failures.load(Ordering::Relaxed))
    }
}

/// The open-loop phases after the closed-loop figure: the seed's rate (its 45 ms average is
/// the figure to compare with), twice it, then the bar's (in this order, so an overload at the
/// bar's rate leaves no backlog in the other phases).
const OPEN_LOOP_RATES: [f64; 3] = [500.0, 1000.0, 2000.0];
const OPEN_LOOP_SECONDS: f64 = 10.0;
/// Connections of the open-loop phases: enough that the generator is not what limits them
/// (at 2000 TPS, 128 connections keep up while answers take up to 64 ms).
const OPEN_LOOP_CONNECTIONS: usize = 128;

/// Runs the open-loop phases on the debits from `first` on; returns the table rows and the
/// method sentence for them.
fn open_loop_phases(
    prepared: &Prepared,
    first: usize,
    connections: usize,
    bar_p99_ms: u64,
) -> (String, String) {
    let mut rows = String::new();
    let mut start = first;
    for rate in OPEN_LOOP_RATES {
        let count = (rate * OPEN_LOOP_SECONDS) as usize;
        let before = prepared.scrape();
        let (elapsed, mut latencies, failures) =
            prepared.load_at_rate(start..start + count, OPEN_LOOP_CONNECTIONS, rate);
        let after = prepared.scrape();
        start += count;
        latencies.sort();
        let achieved = latencies.len() as f64 / elapsed.as_secs_f64();
        let (server_p50, server_p99) = server_percentiles(&before, &after);
        let core_round_trip = match prepared.setup {
            CoreSetup::InProcess => String::new(),
            CoreSetup::Broker => {
                let (p50, p99) = core_round_trip(&before, &after);
                format!("; {:.1} ms / {:.1} ms", p50 * 1000.0, p99 * 1000.0)
            }
        };
        let p99 = percentile(&latencies, 0.99);
        eprintln!(
            "open loop at {rate:.0} TPS: {achieved:.0} TPS achieved, p99 {:.1} ms, {failures} failed",
            p99.as_secs_f64() * 1000.0
        );
        let bar = if rate >= 2000.0 {
            let met =
                achieved >= rate * 0.98 && server_p99 * 1000.0 < bar_p99_ms as f64 && failures == 0;
            format!(
                "2000 TPS with p99 under {bar_p99_ms} ms: {}",
                if met { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        };
        rows.push_str(&format!(
            "| open loop, {rate:.0} TPS offered for {OPEN_LOOP_SECONDS:.0} s: achieved; client p50 / p99 from the scheduled send; platform-internal p50 / p99{} | {achieved:.0} TPS; {:.1} ms / {:.1} ms; {:.1} ms / {:.1} ms{core_round_trip} | {} | | {bar} |\n",
            if core_round_trip.is_empty() { "" } else { "; core round trip p50 / p99" },
            percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            server_p50 * 1000.0,
            server_p99 * 1000.0,
            if rate == 500.0 { "45 ms average" } else { "" },
        ));
        assert_eq!(failures, 0, "every open-loop debit answered 0000");
    }
    let method = format!(
        " The open-loop rows then send further pre-signed debits at fixed rates ({} TPS: the seed's, twice it, the bar's; {OPEN_LOOP_SECONDS:.0} s each) from {OPEN_LOOP_CONNECTIONS} connections, each debit at its scheduled time whatever became of the earlier ones; latency counts from the scheduled time, so queueing behind a daemon that falls behind is counted (no coordinated omission). The closed-loop latency above is that of {connections} clients that always wait for their answer, which at saturation measures the queue they form; the open-loop rows are the latency at a given load.{}",
        OPEN_LOOP_RATES.map(|r| format!("{r:.0}")).join(", "),
        match prepared.setup {
            CoreSetup::InProcess => "",
            CoreSetup::Broker =>
                " The core round trip is the daemon's own histogram of postings (`kunpay_core_round_trip_seconds{request=\"post\"}`): from just before the publish to the reply in the waiting worker's hands, so it holds RabbitMQ both ways and the simulator's work; the platform-internal time minus it is kunpay's own, including the wait for a worker.",
        },
    );
    (rows, method)
}

/// Debits the open-loop phases send.
fn open_loop_debits() -> usize {
    OPEN_LOOP_RATES
        .iter()
        .map(|rate| (rate * OPEN_LOOP_SECONDS) as usize)
        .sum()
}

/// One run: the daemon, all its debits at once, the figures; `risk`: with `[risk]` (the
/// shipped library as shadow rules). The figures of issues 3 and 4 (no risk, no audit) are
/// followed by the open-loop phases.
fn run(setup: CoreSetup, debits: usize, connections: usize, audit: Audit, risk: bool) -> Measured {
    let open_loop = !risk && matches!(audit, Audit::Off);
    let extra = if open_loop { open_loop_debits() } else { 0 };
    let prepared = prepare(this_build(), setup, debits + extra, audit, risk, true);
    let before = prepared.scrape();
    let cpu_before = prepared.cpu();
    let machine_before = prepared.machine_cpu();
    let (elapsed, latencies, failures) = prepared.load(0..debits, connections);
    let machine_after = prepared.machine_cpu();
    let after = prepared.scrape();
    let cpu_after = prepared.cpu();
    let machine_cpu = machine_after
        .iter()
        .zip(&machine_before)
        .map(|((name, after), (_, before))| (*name, after - before))
        .collect();
    let open_loop = if open_loop {
        let bar_p99_ms = match setup {
            CoreSetup::InProcess => 20,
            CoreSetup::Broker => 25,
        };
        open_loop_phases(&prepared, debits, connections, bar_p99_ms)
    } else {
        (String::new(), String::new())
    };
    eprintln!(
        "{} debits in {elapsed:?}: {:.0} TPS",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    finish(
        prepared,
        connections,
        Timed {
            elapsed,
            latencies,
            failures,
            before,
            after,
            cpu: (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1),
            machine_cpu,
            open_loop,
        },
    )
}

/// The shipped expert library with every rule made a shadow rule: each debit is decided with
/// the full library and its velocity features, and still reaches the core (the bench's repeated
/// cards would otherwise be held for review), so the run compares like with like.
fn shadow_library(to: &Path) -> String {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/risk");
    for sub in ["", "rules", "lists"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = if sub == "rules" {
                assert!(
                    !text.contains("\nshadow"),
                    "the library has no shadow rules"
                );
                text.replace("[[rule]]\n", "[[rule]]\nshadow = true\n")
            } else {
                text
            };
            std::fs::write(to.join(sub).join(path.file_name().unwrap()), text).unwrap();
        }
    }
    format!("[risk]\ndir = \"{}\"\n", to.display())
}

/// This build's daemon.
fn this_build() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kunpayd"))
}

fn prepare(
    daemon: &Path,
    setup: CoreSetup,
    debits: usize,
    audit: Audit,
    risk: bool,
    grouped: bool,
) -> Prepared {
    let (audit, ceiling_wanted) = match audit {
        Audit::Off => (false, true),
        Audit::Compared(on) => (on, false),
    };
    let admin_url = std::env::var("KUNPAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let database = format!(
        "kunpay_bench_{}_{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    {
        let mut admin =
            PgConnection::establish(&admin_url).expect("the shared PostgreSQL (make test-deps)");
        diesel::sql_query(format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .unwrap();
    }
    let db_url = format!("{}/{database}", &admin_url[..admin_url.rfind('/').unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    for name in ["node-sign", "node-encrypt"] {
        let key = kunpay::crypto::sm2::PrivateKey::generate().unwrap();
        kunpay::crypto::keyfile::write_private_key(&keys.join(format!("{name}.pem")), &key, None)
            .unwrap();
        kunpay::crypto::keyfile::write_public_key(
            &keys.join(format!("{name}.pub.pem")),
            &key.public_key(),
        )
        .unwrap();
    }
    let status = Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            "tls.key",
            "-out",
            "tls.crt",
        ])
        .args([
            "-days",
            "2",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .output()
        .unwrap();
    assert!(status.status.success());
    let port = free_port();
    let ops_port = free_port();
    let (bench, section) = TestInstitution::create(dir.path(), "BENCH", &keys, "unused");
    // The audit log, when measured: its own key, a directory on the same disk as the database.
    // KUNPAY_BENCH_AUDIT_DIR puts the log elsewhere (e.g. /dev/shm, to tell the disk's share
    // of the overhead from the CPU's); removed after the run.
    let audit_dir = match std::env::var_os("KUNPAY_BENCH_AUDIT_DIR") {
        Some(parent) => Path::new(&parent).join(format!(
            "kunpay-bench-audit-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        )),
        None => dir.path().join("audit"),
    };
    let audit_section = if audit {
        let key = kunpay::crypto::sm2::PrivateKey::generate().unwrap();
        kunpay::crypto::keyfile::write_private_key(&keys.join("audit-sign.pem"), &key, None)
            .unwrap();
        kunpay::crypto::keyfile::write_public_key(
            &keys.join("audit-sign.pub.pem"),
            &key.public_key(),
        )
        .unwrap();
        std::fs::create_dir(&audit_dir).unwrap();
        if nix::unistd::geteuid().is_root() {
            let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
            nix::unistd::chown(&audit_dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
        }
        format!(
            "[audit]\ndir = \"{}\"\nsign_private = \"{}\"\nkey_id = \"bench-audit-1\"\n",
            audit_dir.display(),
            keys.join("audit-sign.pem").display()
        )
    } else {
        String::new()
    };
    let user = if nix::unistd::geteuid().is_root() {
        "nobody".to_string()
    } else {
        std::env::var("USER").unwrap_or_default()
    };
    // Dropped after the daemon (declared before it): the queues go once nobody uses them.
    let (coresim, core_section) = match setup {
        CoreSetup::InProcess => (
            None,
            format!("[core]\nsimulator_generated_accounts = {CUSTOMERS}\n"),
        ),
        CoreSetup::Broker => {
            let (coresim, section) = start_coresim(dir.path());
            (Some(coresim), section)
        }
    };
    let config = format!(
        r#"[node]
id = "bench"
[service]
user = "{user}"
[ops]
listen = "127.0.0.1:{ops_port}"
[database]
url = "{db_url}"
migrate_on_start = true
pool_max_size = 4
[keys]
sign_private = "{keys}/node-sign.pem"
encrypt_private = "{keys}/node-encrypt.pem"
encrypt_key_serial = "test-enc-01"
[channel]
listen = "127.0.0.1:{port}"
tls_cert = "{dir}/tls.crt"
tls_key = "{dir}/tls.key"
{core_section}
[log]
target = "stderr"
level = "warn"
{audit_section}
{section}single_limit_fen = 100000000
daily_limit_fen = 100000000000
send_time_window = "1h"
workers = {workers}
db_pool_size = {workers}
queue_depth = 4096
rate_limit_per_second = 1000000
rate_limit_burst = 1000000
{group_section}{risk_section}"#,
        group_section = journal_group_settings(grouped),
        workers = env_number("KUNPAY_BENCH_WORKERS", 32),
        risk_section = if risk {
            shadow_library(&dir.path().join("risk"))
        } else {
            String::new()
        },
        keys = keys.display(),
        dir = dir.path().display(),
    );
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.path().join("kunpay.toml"), config).unwrap();
    let child = Command::new(daemon)
        .arg("--config")
        .arg(dir.path().join("kunpay.toml"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let node = Node {
        child,
        database,
        admin_url: admin_url.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "kunpayd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ca = dir.path().join("tls.crt");
    if setup == CoreSetup::Broker {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let url = format!("http://127.0.0.1:{ops_port}/metrics");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent
            .get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            // The line itself: the metric's HELP text contains the same words.
            .is_some_and(|m| {
                m.lines()
                    .any(|l| l.trim() == "kunpay_core_link_connected 1")
            })
        {
            assert!(Instant::now() < deadline, "the core link did not connect");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Agreements for every generated customer.
    let tls = Client::tls(&ca);
    let mut setup_client = Client::connect(port, &tls);
    let mut agreements = Vec::new();
    for index in 0..CUSTOMERS {
        let account = kunpay::core::sim::generated_account(index);
        let apply = bench.message(
            MsgType::AgreementApply,
            &[
                ("ReqSerial", &format!("AP{index}")),
                ("AcctNo", &account.account_no),
                ("AcctNm", &account.name),
                ("IdTp", "01"),
                ("IdNo", &account.id_no),
                ("PhoneNo", &account.phone),
            ],
        );
        let answer = setup_client.post(MsgType::AgreementApply.path(), &apply);
        assert_eq!(
            result_code(&answer),
            "0000",
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let agreement = field(&answer, "AgrmtNo");
        let code = kunpay::core::sim::verification_code(&agreement);
        let confirm = bench.message(
            MsgType::AgreementConfirm,
            &[
                ("ReqSerial", &format!("CF{index}")),
                ("AgrmtNo", &agreement),
                ("VrfyCd", &code),
            ],
        );
        assert_eq!(
            result_code(&setup_client.post(MsgType::AgreementConfirm.path(), &confirm)),
            "0000"
        );
        agreements.push(agreement);
    }

    // Pre-signed debits, round robin over the customers.
    let signing = Instant::now();
    let bench = Arc::new(bench);
    let agreements = Arc::new(agreements);
    let per_thread = debits.div_ceil(2);
    let signed: Vec<Vec<u8>> = (0..2)
        .map(|t| {
            let bench = bench.clone();
            let agreements = agreements.clone();
            std::thread::spawn(move || {
                (t * per_thread..((t + 1) * per_thread).min(debits))
                    .map(|i| {
                        bench.message(
                            MsgType::Debit,
                            &[
                                ("ReqSerial", &format!("D{i}")),
                                ("AgrmtNo", &agreements[i % agreements.len()]),
                                ("Amt", "100"),
                                ("Ccy", "CNY"),
                            ],
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .flat_map(|h| h.join().unwrap())
        .collect();
    eprintln!("signed {} debits in {:?}", signed.len(), signing.elapsed());

    Prepared {
        setup,
        audit,
        risk,
        ceiling_wanted,
        node,
        _coresim: coresim,
        dir,
        audit_dir,
        port,
        ops_port,
        tls,
        db_url,
        signed: Arc::new(signed),
    }
}

/// The figures and the BENCHMARKS.md section of a run; stops the daemon.
fn finish(prepared: Prepared, connections: usize, timed: Timed) -> Measured {
    let Prepared {
        setup,
        audit,
        risk,
        ceiling_wanted,
        node,
        _coresim,
        dir,
        audit_dir,
        db_url,
        signed,
        ..
    } = prepared;
    let Timed {
        elapsed,
        latencies,
        failures,
        before,
        after,
        cpu,
        machine_cpu,
        open_loop: (open_loop_rows, open_loop_method),
    } = timed;
    let debits = latencies.len();
    let cpu_ms_per_debit = cpu.0 * 1000.0 / debits as f64;
    let writer_cpu_ms_per_debit = cpu.1 * 1000.0 / debits as f64;
    let ceiling = if setup == CoreSetup::InProcess && ceiling_wanted && !risk {
        eprintln!("measuring what PostgreSQL alone does with the same statements (pgbench)");
        database_ceiling(&db_url)
    } else {
        None
    };
    let mut latencies = latencies;
    latencies.sort();
    let tps = latencies.len() as f64 / elapsed.as_secs_f64();
    let (server_p50, server_p99) = server_percentiles(&before, &after);
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let cpu = report::cpu_model();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let machine_ms_per_debit: Vec<(&'static str, f64)> = machine_cpu
        .iter()
        .map(|(name, seconds)| (*name, seconds * 1000.0 / debits as f64))
        .collect();
    let machine_row = if machine_ms_per_debit.is_empty() {
        String::new()
    } else {
        let total: f64 = machine_ms_per_debit.iter().map(|(_, ms)| ms).sum();
        format!(
            "| CPU per debit over the closed loop, by process | {}; all {total:.2} ms | | | at most {:.0} debits/s on {cores} cores at this cost |\n",
            machine_ms_per_debit
                .iter()
                .map(|(name, ms)| format!("{name} {ms:.2} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            cores as f64 * 1000.0 / total,
        )
    };
    let ceiling_rows = match ceiling {
        Some((durable, unsafe_async)) => format!(
            "| database ceiling: the same statements from pgbench, synchronous commit | {durable:.0} debits/s | | {:.2}x | |\n\
             | database ceiling: the same, synchronous commit off (CPU bound, not how kunpay runs) | {unsafe_async:.0} debits/s | | {:.2}x | |\n",
            durable / 500.0,
            unsafe_async / 500.0,
        ),
        None if setup == CoreSetup::Broker || risk => String::new(),
        None => "| database ceiling | pgbench not found | | | |\n".to_string(),
    };
    let (title, bar_tps, bar_p99_ms, core_method) = match setup {
        CoreSetup::InProcess if risk => (
            "Debit end to end with risk control on (issue 5)",
            2000.0,
            20,
            format!(
                "and the in-process core simulator with {CUSTOMERS} generated customers; `[risk]` on with \
                 the shipped expert library (packaging/risk) with every rule made a shadow rule, so each debit is \
                 decided in full (velocity features recorded and read, decision stored with its opening) and \
                 still reaches the core"
            ),
        ),
        CoreSetup::InProcess => (
            "Debit end to end (issue 3)",
            2000.0,
            20,
            format!("and the in-process core simulator with {CUSTOMERS} generated customers"),
        ),
        CoreSetup::Broker => (
            "Debit end to end through RabbitMQ and kunpay-coresim (issue 4)",
            2000.0,
            25,
            format!(
                "and core banking behind the shared RabbitMQ of this machine: every posting published \
                 persistent with a publisher confirm and an HMAC-SM3, answered by a separate \
                 `kunpay-coresim` process (in-memory ledger with {CUSTOMERS} generated customers; the \
                 core's own storage is the bank's cost, not kunpay's) through the reply queue"
            ),
        ),
    };
    let section = format!(
        "## {title}\n\n\
         | measure | kunpay | seed (002) | ratio | bar |\n|---|---:|---:|---:|---|\n\
         | debit throughput | {tps:.0} TPS | 500 TPS | {:.2}x | {bar_tps:.0} TPS: {} |\n\
         | client-observed latency p50 / p99 | {:.1} ms / {:.1} ms | 45 ms average | | p99 under {bar_p99_ms} ms: {} |\n\
         | platform-internal time p50 / p99 (server histogram, interpolated) | {:.1} ms / {:.1} ms | 45 ms average | | |\n\
         | failed answers | {failures} of {} | 0 | | must be 0 |\n\
         {machine_row}{open_loop_rows}{ceiling_rows}\n\
         Method: `cargo bench --bench payments` starts a release `kunpayd` with the channel on TLS 1.3 \
         (self-signed certificate, verified by the client), its database on the shared PostgreSQL 15 \
         of this machine with default durability (fsync, synchronous commit), {core_method}. It signs an agreement for each customer through the \
         protocol, pre-signs {} debits of 100 fen round robin over the agreements (SM2/SM3 over the \
         exact bytes), then sends {debits} of them from {connections} keep-alive TLS connections on {connections} threads, each waiting for its answer before it sends the next (closed loop), \
         and checks every answer's result code. Each debit: signature verification, send-time and \
         message-id replay checks, then one statement (message id recorded, stored answer looked up, \
         agreement share lock, daily usage raised under the limit, journal insert with three state \
         transitions), core posting, outcome transition with \
         the signed answer stored for idempotency (one statement), signed response. The institution \
         has {workers} workers and database connections, and its opening and outcome statements \
         commit in journal groups ({groups}: while the database is busy, statements that arrive \
         meanwhile commit together in one transaction; the `payments-group` section compares it \
         with each statement alone). The database \
         ceiling rows run the daemon's own two statements of a debit (`journal::debit_path_sql`, \
         prepared) from pgbench with {CEILING_CLIENTS} clients for {CEILING_SECONDS} s each on the same \
         database, with and without synchronous commit: what PostgreSQL on this machine can do with \
         a debit's journal work when nothing else runs. The CPU row is each process's user and system time (`/proc`) over the closed loop divided by its debits (PostgreSQL: every process of the shared server; RabbitMQ: its Erlang VM), and the debits/s that this machine's cores could carry at that cost if every one of them were busy.{open_loop_method} Load generator, daemon and database share the machine: {cpu}, {} cores, {}. \
         Date: {}.\n",
        tps / 500.0,
        if tps >= bar_tps { "met" } else { "NOT met" },
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        if p99 < Duration::from_millis(bar_p99_ms) {
            "met"
        } else {
            "NOT met"
        },
        server_p50 * 1000.0,
        server_p99 * 1000.0,
        latencies.len(),
        signed.len(),
        cores,
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().map(|l| l
                .split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0)))
            .map(|kib| format!("{} GiB RAM", kib / 1024 / 1024))
            .unwrap_or_default(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        workers = env_number("KUNPAY_BENCH_WORKERS", 32),
        groups = journal_group_description(),
    );
    let audit = audit.then(|| {
        let records = metric_value(&after, "kunpay_audit_records_appended_total")
            - metric_value(&before, "kunpay_audit_records_appended_total");
        let (append_p50, append_p99) = histogram_percentiles(
            &before,
            &after,
            "kunpay_audit_append_duration_seconds_bucket{",
            "le=",
        );
        // SIGTERM: the daemon seals the log; then the auditors' verifier reads all of it.
        drop(node);
        let bytes_per_debit =
            dir_bytes(&audit_dir) as f64 / (signed.len() + 2 * CUSTOMERS as usize) as f64;
        let started = Instant::now();
        let pubkeys = dir.path().join("pubkeys.toml");
        std::fs::write(
            &pubkeys,
            "[audit_keys]\nbench-audit-1 = { pem_file = \"keys/audit-sign.pub.pem\" }\n\n\
             [institutions.BENCH]\npem_file = \"BENCH-sign.pub.pem\"\n",
        )
        .unwrap();
        let verified = Command::new(env!("CARGO_BIN_EXE_kunpay-audit"))
            .arg("verify")
            .arg(&audit_dir)
            .arg("--pubkeys")
            .arg(&pubkeys)
            .output()
            .unwrap();
        let verify_seconds = started.elapsed().as_secs_f64();
        let report = String::from_utf8_lossy(&verified.stdout);
        assert!(
            verified.status.success(),
            "the bench's log verifies:\n{report}"
        );
        let verify_records = report
            .lines()
            .find_map(|l| l.strip_prefix("records: "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("the verifier counts the records");
        if std::env::var_os("KUNPAY_BENCH_AUDIT_DIR").is_some() {
            let _ = std::fs::remove_dir_all(&audit_dir);
        }
        AuditFigures {
            records,
            bytes_per_debit,
            append_p50,
            append_p99,
            verify_seconds,
            verify_records,
        }
    });
    Measured {
        section,
        tps,
        p50,
        p99,
        failures,
        cpu_ms_per_debit,
        writer_cpu_ms_per_debit,
        machine_ms_per_debit,
        audit,
    }
}
