//! `cargo bench --bench risk`: decision latency in process with the shipped expert library plus
//! 200 generated rules over live velocity features (the bar: p99 at most 200 us per decision).
//! One thread; every decision timed on its own; exact quantiles from the sorted sample.
//! Writes its table into BENCHMARKS.md between the `bench:risk` markers.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use kunpay::risk::features::StoreLimits;

mod report;
use kunpay::risk::{OnTimeout, RiskEngine, RiskInput, load_dir, load_sources};

const GENERATED_RULES: usize = 200;
const WARM_EVENTS: usize = 200_000;
const DECISIONS: usize = 100_000;
const CARDS: usize = 20_000;
const DEVICES: usize = 2_000;
/// Rounds, each on a fresh engine; the one with the median p99 is reported (the VM's jitter
/// moves a single round's p99 by a tenth).
const ROUNDS: usize = 3;

/// 200 rules in the shapes analysts write: velocity thresholds on several dimensions and
/// windows, amount bands by hour, list checks, and combinations.
fn generated_rules() -> String {
    let windows = ["1m", "10m", "1h", "24h"];
    let dims = ["card", "device", "ip", "phone", "id", "inst"];
    let measures = ["count", "sum", "cards", "near_limit"];
    let mut text = String::new();
    for i in 0..GENERATED_RULES {
        let dim = dims[i % dims.len()];
        let measure = measures[(i / dims.len()) % measures.len()];
        let window = windows[(i / 3) % windows.len()];
        let threshold = 1_000 + (i as i64) * 37;
        let when = match i % 4 {
            0 => format!("{dim}_{measure}_{window} > {threshold}"),
            1 => format!(
                "amount_fen > {} && local_hour >= {} && {dim}_{measure}_{window} > {}",
                100_000 + i * 1_000,
                i % 24,
                threshold / 10
            ),
            2 => format!(
                "!{}_whitelisted && {dim}_{measure}_{window} >= {threshold} && kind == 'DEBIT'",
                if dim == "inst" { "card" } else { dim }
            ),
            _ => format!(
                "amount_fen * 10 >= single_limit_fen * 9 && {dim}_{measure}_{window} > {threshold} || merchant == 'M{i}'"
            ),
        };
        text.push_str(&format!(
            "[[rule]]\nid = \"GEN-{i:03}\"\ndescription = \"generated\"\nversion = 1\nshadow = {}\nwhen = \"{when}\"\naction = \"score\"\nscore = 10\n\n",
            i % 5 == 0
        ));
    }
    text
}

/// One round on a fresh engine: the store warmed with a day's traffic, then the measured
/// decisions, each timed alone. Returns the sorted sample and the rules fired in it.
fn round(engine: RiskEngine) -> (Vec<Duration>, usize) {
    let start = Utc.with_ymd_and_hms(2026, 11, 23, 2, 0, 0).unwrap();
    let cards: Vec<String> = (0..CARDS).map(|i| format!("62220200{i:011}")).collect();
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("DEV-{i}")).collect();
    let input = |n: usize, at: chrono::DateTime<Utc>| RiskInput {
        kind: "DEBIT",
        inst: "BENCH",
        amount_fen: 1_000 + (n as i64 * 7919) % 5_000_000,
        at,
        card: Some(&cards[(n * 7) % CARDS]),
        id_no: Some("110101199003077774"),
        phone: Some(&devices[(n * 13) % DEVICES]),
        device: Some(&devices[(n * 3) % DEVICES]),
        ip: Some(std::net::IpAddr::from([
            10,
            0,
            (n % 256) as u8,
            (n / 256 % 256) as u8,
        ])),
        merchant: Some("M1"),
        single_limit_fen: 5_000_000,
        daily_limit_fen: 20_000_000,
        agreement_age_s: 86_400,
        holder_mismatch: false,
    };
    // Live features: a day's traffic before the measured decisions.
    for n in 0..WARM_EVENTS {
        let at =
            start + chrono::Duration::milliseconds((n as i64) * 86_400_000 / WARM_EVENTS as i64);
        engine.decide(&input(n, at), Duration::from_secs(1), OnTimeout::Open);
    }
    let measured_from = start + chrono::Duration::days(1);
    let mut sample = Vec::with_capacity(DECISIONS);
    let mut fired = 0usize;
    for n in 0..DECISIONS {
        let at = measured_from + chrono::Duration::milliseconds(n as i64);
        let i = input(WARM_EVENTS + n, at);
        let began = Instant::now();
        let d = engine.decide(&i, Duration::from_secs(1), OnTimeout::Open);
        sample.push(began.elapsed());
        fired += d.fired.len();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
    }
    sample.sort_unstable();
    (sample, fired)
}

fn main() {
    let library = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/risk");
    let shipped = load_dir(&library).expect("the shipped library loads");
    let shipped_rules = shipped.rules.rules.len();
    let mut sources = vec![(
        "strategy.toml".to_string(),
        std::fs::read_to_string(library.join("strategy.toml")).unwrap(),
    )];
    for file in ["rules/10-expert.toml", "lists/00-lists.toml"] {
        sources.push((
            file.to_string(),
            std::fs::read_to_string(library.join(file)).unwrap(),
        ));
    }
    sources.push(("rules/90-generated.toml".to_string(), generated_rules()));
    let mut rounds = Vec::with_capacity(ROUNDS);
    let (mut rules, mut features, mut fired) = (0, 0, 0usize);
    for _ in 0..ROUNDS {
        let loaded = load_sources(&sources).expect("generated rules load");
        rules = loaded.rules.rules.len();
        features = loaded.rules.variables.len();
        let (sample, round_fired) = round(RiskEngine::new(loaded, StoreLimits::default()));
        fired = round_fired;
        rounds.push(sample);
    }
    let q = |sample: &[Duration], p: f64| {
        sample[((sample.len() as f64 * p) as usize).min(sample.len() - 1)].as_secs_f64() * 1e6
    };
    // The round with the median p99 is reported; every round's p99 is listed beside it.
    rounds.sort_by(|a, b| q(a, 0.99).total_cmp(&q(b, 0.99)));
    let p99s: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.1} us", q(r, 0.99)))
        .collect();
    let sample = &rounds[ROUNDS / 2];
    let machine = report::cpu_model();
    let p99 = q(sample, 0.99);
    let section = format!(
        "## Risk decisions (in process)\n\n\
         Method: `cargo bench --bench risk`, one thread, {rules} rules ({shipped_rules} shipped + {GENERATED_RULES} generated, a fifth of them shadow) reading {features} variables; \
         per round a fresh engine, its velocity store warmed with {WARM_EVENTS} decisions over 24 h on {CARDS} cards and {DEVICES} devices (one institution and one id number in every decision, so two subjects hold the store's maximum of 4,096 events), then {DECISIONS} decisions each timed alone; \
         {ROUNDS} rounds, the one with the median p99 shown (every round's p99: {}); mimalloc as the allocator; {machine}.\n\n\
         | decisions | p50 | p99 | p99.9 | max | rules fired per decision | bar (p99) | p99 / bar |\n|---|---|---|---|---|---|---|---|\n\
         | {DECISIONS} | {:.1} us | {p99:.1} us | {:.1} us | {:.1} us | {:.2} | 200 us | {:.2} |\n",
        p99s.join(", "),
        q(sample, 0.5),
        q(sample, 0.999),
        sample.last().unwrap().as_secs_f64() * 1e6,
        fired as f64 / DECISIONS as f64,
        p99 / 200.0,
    );
    print!("{section}");
    match report::write_section("risk", &section) {
        Ok(path) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("BENCHMARKS.md not updated: {e}"),
    }
}
