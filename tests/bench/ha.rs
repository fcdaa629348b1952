//! The active/standby benchmark (issue 8): write unavailability during a planned cutover and
//! its rollback under continuous debit load, and CDC apply throughput against the write rate.
//! Two release `kunpayd` nodes on private PostgreSQL clusters (wal_level = logical), the core
//! simulator on the local RabbitMQ, an F5-like load generator (tests/common/ha.rs). Writes the
//! `ha` section of BENCHMARKS.md.
//!
//! Knobs: KUNPAY_BENCH_HA_WORKERS (load threads, default 16), KUNPAY_BENCH_HA_SECONDS (each
//! measured phase, default 10), KUNPAY_BENCH_HA_HISTORY_ROWS (rows of settled history written
//! (refused requests) on the active and copied before the cutover, so the verify runs on a
//! journal of some size; default 1,000,000), KUNPAY_BENCH_HA_CUTOVER_WORKERS (load threads
//! around the cutover, default 1), KUNPAY_BENCH_HA_MAX_LAG (both nodes' `ha.max_lag`, default
//! the configuration's 1 MiB).

#[path = "../common/mod.rs"]
mod common;
mod report;

use std::time::{Duration, Instant};

use common::ha::*;
use diesel::prelude::*;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The pause clients saw: the longest time between consecutive answers in the window.
fn pause(load: &Load, since: Instant, until: Instant) -> Duration {
    longest_gap(&load.answered.lock().unwrap(), since, until)
}

/// Answers per second over the next `seconds`.
fn rate(load: &Load, seconds: u64) -> f64 {
    let (n0, t0) = (load.answered(), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    (load.answered() - n0) as f64 / t0.elapsed().as_secs_f64()
}

/// The "business paused for N ms" kunpayctl reports.
fn reported_pause(report: &str) -> f64 {
    report
        .split("business paused for ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One step's duration and detail from kunpayctl's report.
fn step(report: &str, name: &str) -> (f64, String) {
    report
        .lines()
        .find_map(|l| {
            // `  ok   NAME   12.3 ms  detail`: the name is the column after the verdict.
            let after = l
                .trim_start()
                .strip_prefix("ok")?
                .trim_start()
                .strip_prefix(name)?;
            let (ms, detail) = after.strip_prefix(' ')?.trim_start().split_once(" ms")?;
            Some((ms.trim().parse().ok()?, detail.trim().to_string()))
        })
        .unwrap_or((f64::NAN, String::new()))
}

/// A cutover or rollback, run again (up to three times) when its lag check refused it: the
/// byte lag moves with the WAL the active writes besides row changes (vacuum), as an operator
/// would see and simply run it again. Returns when the run that counts started.
fn handover_within_lag(kind: &str, node: &Node) -> (Instant, i32, String) {
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        let (code, report) = handover(kind, node);
        attempt += 1;
        if code == 4 && report.contains("FAIL CDC lag") && attempt < 3 {
            eprintln!("{kind} refused by the lag check; again in 2 s:\n{report}");
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        return (started, code, report);
    }
}

/// The changes B's applier has applied from A (its position row).
fn applied_changes(pair: &Pair) -> i64 {
    count(
        &pair.b.url(),
        "SELECT CAST(COALESCE(SUM(changes), 0) AS BIGINT) AS n FROM ha_cdc_position",
    )
}

fn lag_bytes(pair: &Pair) -> u64 {
    let mut a = PgConnection::establish(&pair.a.url()).unwrap();
    let mut b = PgConnection::establish(&pair.b.url()).unwrap();
    kunpay::ha::cdc::status(&mut a, &mut b, "kunpay_cdc")
        .map(|s| s.lag_bytes)
        .unwrap_or(u64::MAX)
}

fn main() {
    let workers = env_number("KUNPAY_BENCH_HA_WORKERS", 16) as usize;
    let cutover_workers = env_number("KUNPAY_BENCH_HA_CUTOVER_WORKERS", 1) as usize;
    let max_lag = bench_max_lag().map_or_else(
        || "1MiB (the default)".to_string(),
        |b| format!("{b} (KUNPAY_BENCH_HA_MAX_LAG)"),
    );
    let seconds = env_number("KUNPAY_BENCH_HA_SECONDS", 10);
    let mut pair = Pair::start();
    let agreement = pair.sign_agreement();

    // 1. Apply throughput against the write rate: full load on A while B is down, then B
    // applies the backlog alone.
    let before = applied_changes(&pair);
    assert_eq!(pair.b.daemon.as_mut().unwrap().stop(), Some(0));
    let written_from = Instant::now();
    let load = Load::start(&pair, &agreement, workers);
    std::thread::sleep(Duration::from_secs(2));
    let tps_full = rate(&load, seconds);
    let (full_answered, unanswered) = load.finish();
    assert_eq!(unanswered, 0);
    let written_for = written_from.elapsed();
    let catch_up_from = Instant::now();
    pair.b.daemon = Some(Supervised::start(pair.b.dir.clone()));
    wait_until("B to apply the backlog", Duration::from_secs(900), || {
        lag_bytes(&pair) == 0
    });
    let catch_up = catch_up_from.elapsed();
    let backlog = applied_changes(&pair) - before;
    let write_rate = backlog as f64 / written_for.as_secs_f64();
    let apply_rate = backlog as f64 / catch_up.as_secs_f64();
    let per_debit = backlog as f64 / full_answered.len().max(1) as f64;
    eprintln!(
        "apply phase: {tps_full:.0} debits/s with {workers} threads; {backlog} changes ({per_debit:.1} per debit): \
         written at {write_rate:.0}/s, applied at {apply_rate:.0}/s in {:.1} s",
        catch_up.as_secs_f64()
    );

    // History: a journal of some size, copied like everything else, for the verify to face.
    let history_rows = env_number("KUNPAY_BENCH_HA_HISTORY_ROWS", 1_000_000);
    {
        // In transactions of 10,000 rows, as an archive restore or a batch job would write.
        let mut a = PgConnection::establish(&pair.a.url()).unwrap();
        for from in (0..history_rows).step_by(10_000) {
            diesel::sql_query(format!(
                "INSERT INTO channel_rejection (inst_id, path, msg_id, result_code, detail, \
                                                body_sm3, at) \
                 SELECT 'HISTORY', '/debit', 'H' || i, '1001', 'signature does not verify', \
                        md5('H' || i) || md5('h' || i), now() - interval '30 days' \
                 FROM generate_series({}, {}) AS i",
                from + 1,
                (from + 10_000).min(history_rows)
            ))
            .execute(&mut a)
            .unwrap();
        }
    }
    let history_from = Instant::now();
    wait_until("B to copy the history", Duration::from_secs(1800), || {
        lag_bytes(&pair) == 0
    });
    eprintln!(
        "history: {history_rows} rows copied in {:.1} s",
        history_from.elapsed().as_secs_f64()
    );

    let total_rows = count(
        &pair.a.url(),
        "SELECT (SELECT count(*) FROM channel_rejection) + (SELECT count(*) FROM seen_message) \
         + (SELECT count(*) FROM txn) + (SELECT count(*) FROM txn_state_history) \
         + (SELECT count(*) FROM channel_request) AS n",
    );

    // 2. Cutover and rollback under a load the copy keeps up with; the lag it keeps.
    let load = Load::start(&pair, &agreement, cutover_workers);
    std::thread::sleep(Duration::from_secs(3));
    let lag_sampler = {
        let (a_url, b_url) = (pair.a.url(), pair.b.url());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut a = PgConnection::establish(&a_url).unwrap();
            let mut b = PgConnection::establish(&b_url).unwrap();
            let mut worst = (0u64, 0.0f64);
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(s) = kunpay::ha::cdc::status(&mut a, &mut b, "kunpay_cdc") {
                    worst = (
                        worst.0.max(s.lag_bytes),
                        worst.1.max(s.lag_seconds.unwrap_or(0.0)),
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            worst
        });
        (stop, thread)
    };
    let tps_a = rate(&load, seconds);
    eprintln!("cutover phase: {tps_a:.0} debits/s with {cutover_workers} threads");
    lag_sampler
        .0
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let worst_lag = lag_sampler.1.join().unwrap();
    wait_until("B within the lag bound", Duration::from_secs(300), || {
        pair.b.ops("/standby") == 200
    });

    let (started, code, cutover_report) = handover_within_lag("cutover", &pair.b);
    assert_eq!(code, 0, "cutover\n{cutover_report}");
    let cutover_took = started.elapsed();
    let tps_b = rate(&load, seconds);
    let cutover_pause = pause(&load, started, Instant::now());
    wait_until(
        "A to copy from B within the bound",
        Duration::from_secs(300),
        || pair.a.ops("/standby") == 200,
    );

    let (started, code, rollback_report) = handover_within_lag("rollback", &pair.a);
    assert_eq!(code, 0, "rollback\n{rollback_report}");
    let rollback_took = started.elapsed();
    let tps_back = rate(&load, seconds);
    let rollback_pause = pause(&load, started, Instant::now());
    let (answered, unanswered) = load.finish();
    assert_eq!(unanswered, 0);

    let cpu = report::cpu_model();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let section = format!(
        "## Active/standby: planned cutover and CDC (issue 8)\n\n\
         Machine: {cpu}, {cores} cores; both nodes, both PostgreSQL 15 clusters, RabbitMQ and the load \
         generator on it. Goals: write unavailability during a planned cutover at most 2 s under 1,000 \
         TPS; CDC apply throughput against the write rate.\n\n\
         **CDC apply against the write rate** (full load: {workers} closed-loop threads, {tps_full:.0} \
         debits/s on the active, {per_debit:.1} row changes per debit): the active wrote {backlog} row \
         changes in {:.1} s while the standby was down, **{write_rate:.0} changes/s**; the returning \
         standby applied them in {:.1} s (its start-up included), **{apply_rate:.0} changes/s = \
         {:.2}x the write rate**. Below 1x the standby falls behind at full load and a cutover is \
         refused by the lag bound until the load eases (ha.max_lag).\n\n\
         **Cutover under load** ({cutover_workers} threads, a load the copy keeps up with; its lag, read \
         from both databases every 100 ms, peaked at {} bytes / {:.2} s):\n\n\
         | measure | cutover A->B | rollback B->A | goal | ratio |\n|---|---|---|---|---|\n\
         | longest pause clients saw (between two answers) | {:.0} ms | {:.0} ms | 2,000 ms | {:.2}x / {:.2}x of the allowance |\n\
         | pause kunpayctl reports (drain request to promotion) | {:.0} ms | {:.0} ms | | |\n\
         | kunpayctl end to end (checks to new active serving) | {:.2} s | {:.2} s | | |\n\
         | debit load around it | {tps_a:.0} TPS before, {tps_b:.0} after | {tps_back:.0} TPS after | 1,000 TPS | {:.2}x |\n\n\
         Method: `cargo bench --bench ha` (release binaries). Load: closed-loop threads, each debit \
         signed and sealed like an institution's, sent to the node that takes business and moved to \
         the other on 503 or a refused connection, as F5 does (KUNPAY_BENCH_HA_WORKERS={workers} for \
         the apply phase, KUNPAY_BENCH_HA_CUTOVER_WORKERS={cutover_workers} around the cutover, \
         KUNPAY_BENCH_HA_SECONDS={seconds} per phase; `ha.max_lag` {max_lag}, `ha.batch` the default). Pause = the longest gap between two consecutive \
         answers from the start of `kunpayctl cutover` to the end of the phase after it. {} debits \
         answered, none lost (every answer is checked by tests/ha_cutover.rs, not here). The pause is \
         made of the drain (the role-watch period is 100 ms), the verify step, and the promotion \
         (pool, core link). The journal held {history_rows} rows of copied history besides the \
         load's ({total_rows} rows in its five largest tables before the cutover). The pre-verify \
         step, before the drain and outside the pause, digested both databases in full while the \
         load went on: {:.0} ms in the cutover ({}), {:.0} ms in the rollback. Then, still \
         serving, the standby caught up with the active (close the gap): {gap_cutover:.0} ms in \
         the cutover ({gap_detail}), {gap_rollback:.0} ms in the rollback. The verify step in \
         the pause then re-read only the rows written since: {:.0} ms ({}) in the cutover, {:.0} ms \
         in the rollback, where a full digest of every row took ~7.7 us per row with both \
         databases read at once (587 ms for 70,935 rows, stop 16). The applier sends a source \
         transaction's changes to the standby as one statement (a data-modifying CTE per change, \
         split where their order could matter; consecutive inserts into one table as one \
         multi-row INSERT of up to 32 rows): a debit's opening and its outcome are one round \
         trip each.\n\n",
        written_for.as_secs_f64(),
        catch_up.as_secs_f64(),
        apply_rate / write_rate.max(1.0),
        worst_lag.0,
        worst_lag.1,
        cutover_pause.as_secs_f64() * 1000.0,
        rollback_pause.as_secs_f64() * 1000.0,
        cutover_pause.as_secs_f64() / 2.0,
        rollback_pause.as_secs_f64() / 2.0,
        reported_pause(&cutover_report),
        reported_pause(&rollback_report),
        cutover_took.as_secs_f64(),
        rollback_took.as_secs_f64(),
        tps_a / 1000.0,
        answered.len() + full_answered.len(),
        step(&cutover_report, "pre-verify").0,
        step(&cutover_report, "pre-verify").1,
        step(&rollback_report, "pre-verify").0,
        step(&cutover_report, "verify").0,
        step(&cutover_report, "verify").1,
        step(&rollback_report, "verify").0,
        gap_cutover = step(&cutover_report, "close the gap").0,
        gap_detail = step(&cutover_report, "close the gap").1,
        gap_rollback = step(&rollback_report, "close the gap").0,
    );
    eprintln!("{cutover_report}\n{rollback_report}");
    print!("{section}");
    let path = report::write_section("ha", &section).expect("writing BENCHMARKS.md");
    println!("written to {}", path.display());
    pair.coresim.stop();
}
