//! The shipped expert rule library (packaging/risk), each rule firing and not firing at its
//! boundary; hot reload that keeps the running set when a file is broken and names where; and
//! decisions under concurrent reloads that never mix two versions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use kunpay::risk::features::StoreLimits;
use kunpay::risk::rules::Outcome;
use kunpay::risk::{OnTimeout, RiskEngine, RiskInput, load_dir, load_sources};

fn library() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/risk")
}

fn engine() -> RiskEngine {
    RiskEngine::new(load_dir(&library()).unwrap(), StoreLimits::default())
}

/// A debit that fires nothing: 100 yuan at noon Beijing time on a card with an old agreement.
fn quiet() -> RiskInput<'static> {
    RiskInput {
        kind: "DEBIT",
        inst: "T",
        amount_fen: 10_000,
        at: Utc.with_ymd_and_hms(2026, 11, 23, 4, 0, 0).unwrap(),
        card: Some("6222021234567890123"),
        id_no: Some("110101199003077774"),
        phone: Some("13812345678"),
        device: None,
        ip: None,
        merchant: None,
        single_limit_fen: 5_000_000,
        daily_limit_fen: 20_000_000,
        agreement_age_s: 86_400,
        holder_mismatch: false,
    }
}

fn decide(engine: &RiskEngine, input: &RiskInput<'_>) -> (Outcome, Vec<String>) {
    let d = engine.decide(input, Duration::from_secs(1), OnTimeout::Closed);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    (
        d.outcome,
        d.fired.into_iter().map(|f| f.id.to_string()).collect(),
    )
}

fn fires(engine: &RiskEngine, input: &RiskInput<'_>, rule: &str) -> bool {
    decide(engine, input).1.iter().any(|id| id == rule)
}

#[test]
fn the_library_loads_and_a_quiet_debit_is_approved() {
    let e = engine();
    assert!(
        e.version().starts_with("expert-2026.11+"),
        "{}",
        e.version()
    );
    assert_eq!(decide(&e, &quiet()), (Outcome::Approve, vec![]));
}

#[test]
fn single_and_daily_limits() {
    let e = engine();
    let at_limit = RiskInput {
        amount_fen: 5_000_000,
        ..quiet()
    };
    assert!(!fires(&e, &at_limit, "LIM-SINGLE"));
    let over = RiskInput {
        amount_fen: 5_000_001,
        ..quiet()
    };
    assert_eq!(decide(&e, &over).0, Outcome::Decline);
    assert!(fires(&e, &over, "LIM-SINGLE"));

    // 19,000,000 fen earlier on this card: 1,000,000 more reaches the daily limit exactly,
    // one fen more passes it.
    let e = engine();
    let card = "6222020000000000001";
    for _ in 0..4 {
        let prior = RiskInput {
            card: Some(card),
            amount_fen: 4_750_000,
            ..quiet()
        };
        decide(&e, &prior);
    }
    let exactly = RiskInput {
        card: Some(card),
        amount_fen: 1_000_000,
        ..quiet()
    };
    assert!(
        !fires(&e, &exactly, "LIM-DAILY"),
        "20,000,000 is the limit itself"
    );
    let one_more = RiskInput {
        card: Some(card),
        amount_fen: 1,
        ..quiet()
    };
    assert!(fires(&e, &one_more, "LIM-DAILY"));
}

#[test]
fn velocity_on_one_card() {
    let e = engine();
    let card = RiskInput {
        card: Some("6222020000000000002"),
        ..quiet()
    };
    for n in 0..5 {
        assert!(
            !fires(&e, &card, "VEL-CARD-1M"),
            "{n} earlier in the minute"
        );
    }
    // The sixth within the minute sees five before it.
    assert!(fires(&e, &card, "VEL-CARD-1M"));
    // A minute later the window is empty again for the 1 m rule, not for the 1 h one.
    let later = RiskInput {
        at: card.at + chrono::Duration::seconds(61),
        ..card.clone()
    };
    assert!(!fires(&e, &later, "VEL-CARD-1M"));
    let e = engine();
    for minute in 0..20 {
        let spread = RiskInput {
            at: card.at + chrono::Duration::minutes(minute * 2),
            ..card.clone()
        };
        assert!(!fires(&e, &spread, "VEL-CARD-1H"), "{minute}");
    }
    let twenty_first = RiskInput {
        at: card.at + chrono::Duration::minutes(41),
        ..card.clone()
    };
    assert!(fires(&e, &twenty_first, "VEL-CARD-1H"));
}

#[test]
fn many_cards_on_one_device_or_ip() {
    let e = engine();
    let cards = [
        "6222020000000000011",
        "6222020000000000012",
        "6222020000000000013",
        "6222020000000000014",
    ];
    for (n, card) in cards.iter().enumerate() {
        let on_device = RiskInput {
            card: Some(card),
            device: Some("DEV-1"),
            ..quiet()
        };
        // The fourth card sees three others on the device.
        assert_eq!(fires(&e, &on_device, "DEV-MANY-CARDS"), n == 3, "card {n}");
    }
    let e = engine();
    let ip = "198.51.100.7".parse().unwrap();
    for n in 0..6 {
        let card = format!("62220200000000001{n:02}");
        let from_ip = RiskInput {
            card: Some(&card),
            ip: Some(ip),
            ..quiet()
        };
        assert_eq!(fires(&e, &from_ip, "IP-MANY-CARDS"), n == 5, "card {n}");
    }
}

#[test]
fn large_amounts_at_night_score_into_review() {
    let e = engine();
    let night = Utc.with_ymd_and_hms(2026, 11, 22, 21, 30, 0).unwrap(); // 05:30 Beijing
    let large = RiskInput {
        at: night,
        amount_fen: 500_000,
        ..quiet()
    };
    assert_eq!(
        decide(&e, &large),
        (Outcome::Review, vec!["NIGHT-LARGE".to_string()])
    );
    let small = RiskInput {
        at: night,
        amount_fen: 499_999,
        ..quiet()
    };
    assert!(!fires(&e, &small, "NIGHT-LARGE"));
    let six = Utc.with_ymd_and_hms(2026, 11, 22, 22, 0, 0).unwrap(); // 06:00 Beijing
    let morning = RiskInput {
        at: six,
        amount_fen: 500_000,
        card: Some("6222020000000000031"),
        ..quiet()
    };
    assert!(!fires(&e, &morning, "NIGHT-LARGE"));
}

#[test]
fn first_large_debit_right_after_binding() {
    let e = engine();
    let fresh = RiskInput {
        agreement_age_s: 599,
        amount_fen: 200_000,
        card: Some("6222020000000000041"),
        ..quiet()
    };
    assert!(fires(&e, &fresh, "NEW-BIND-LARGE"));
    let e = engine();
    for (age, amount, fired) in [
        (600, 200_000, false),
        (599, 199_999, false),
        (-1, 200_000, false),
    ] {
        let input = RiskInput {
            agreement_age_s: age,
            amount_fen: amount,
            card: Some("6222020000000000042"),
            ..quiet()
        };
        assert_eq!(
            fires(&e, &input, "NEW-BIND-LARGE"),
            fired,
            "age {age} amount {amount}"
        );
    }
    // Not the first on this card in 24 h any more.
    let e = engine();
    decide(
        &e,
        &RiskInput {
            card: Some("6222020000000000043"),
            ..quiet()
        },
    );
    let second = RiskInput {
        agreement_age_s: 10,
        amount_fen: 300_000,
        card: Some("6222020000000000043"),
        ..quiet()
    };
    assert!(!fires(&e, &second, "NEW-BIND-LARGE"));
}

#[test]
fn repeated_amounts_just_under_the_limit() {
    let e = engine();
    let card = "6222020000000000051";
    let near = RiskInput {
        card: Some(card),
        amount_fen: 4_500_000,
        ..quiet()
    };
    let below = RiskInput {
        card: Some(card),
        amount_fen: 4_499_999,
        ..quiet()
    };
    assert!(!fires(&e, &below, "NEAR-LIMIT-REPEAT"));
    assert!(!fires(&e, &near, "NEAR-LIMIT-REPEAT"));
    assert!(
        !fires(&e, &near, "NEAR-LIMIT-REPEAT"),
        "one near-limit amount before"
    );
    assert!(fires(&e, &near, "NEAR-LIMIT-REPEAT"), "two before");
    assert!(
        !fires(&e, &below, "NEAR-LIMIT-REPEAT"),
        "this one is not near the limit"
    );
}

#[test]
fn listed_parties_and_holder_mismatch_are_declined() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&library(), dir.path());
    std::fs::write(
        dir.path().join("lists/10-fraud.toml"),
        "[black]\ncard = [\"6222020000000000061\"]\nip = [\"203.0.113.0/24\"]\n\n[white]\ncard = [\"6222020000000000062\"]\n",
    )
    .unwrap();
    let e = RiskEngine::new(load_dir(dir.path()).unwrap(), StoreLimits::default());
    let black = RiskInput {
        card: Some("6222020000000000061"),
        ..quiet()
    };
    assert_eq!(
        decide(&e, &black),
        (Outcome::Decline, vec!["LISTED-PARTY".to_string()])
    );
    let from_range = RiskInput {
        ip: Some("203.0.113.200".parse().unwrap()),
        ..quiet()
    };
    assert!(fires(&e, &from_range, "LISTED-PARTY"));
    let outside = RiskInput {
        ip: Some("203.0.114.1".parse().unwrap()),
        ..quiet()
    };
    assert!(!fires(&e, &outside, "LISTED-PARTY"));
    // A whitelisted card is exempt from the velocity rules.
    let white = RiskInput {
        card: Some("6222020000000000062"),
        ..quiet()
    };
    for _ in 0..6 {
        assert_eq!(decide(&e, &white).0, Outcome::Approve);
    }
    let mismatch = RiskInput {
        holder_mismatch: true,
        ..quiet()
    };
    assert_eq!(
        decide(&e, &mismatch),
        (Outcome::Decline, vec!["HOLDER-MISMATCH".to_string()])
    );
    let credit = RiskInput {
        holder_mismatch: true,
        kind: "CREDIT",
        ..quiet()
    };
    assert!(!fires(&e, &credit, "HOLDER-MISMATCH"), "scoped to debits");
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in walk(from) {
        let target = to.join(entry.strip_prefix(from).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, target).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn shadow_rules_are_recorded_but_never_decide() {
    let sources = vec![(
        "rules/a.toml".to_string(),
        "[[rule]]\nid = \"S1\"\ndescription = \"d\"\nversion = 2\nshadow = true\nwhen = \"amount_fen > 0\"\naction = \"decline\"\n".to_string(),
    )];
    let e = RiskEngine::new(load_sources(&sources).unwrap(), StoreLimits::default());
    let d = e.decide(&quiet(), Duration::from_secs(1), OnTimeout::Closed);
    assert_eq!(d.outcome, Outcome::Approve);
    assert_eq!(d.fired.len(), 1);
    assert!(d.fired[0].shadow && d.fired[0].version == 2);
    assert!(
        d.seen
            .iter()
            .any(|(name, value)| &**name == "amount_fen" && value.to_string() == "10000")
    );
}

#[test]
fn broken_files_are_refused_with_file_line_and_reason() {
    let rule = |when: &str| {
        format!(
            "# header\n\n[[rule]]\nid = \"X1\"\ndescription = \"d\"\nversion = 1\nwhen = \"{when}\"\naction = \"review\"\n"
        )
    };
    for (text, line, says) in [
        (
            rule("crad_count_1h > 3"),
            7,
            "unknown variable `crad_count_1h`",
        ),
        (rule("amount_fen > "), 7, "does not compile"),
        (rule("amount_fen > 'x'"), 7, "fails on a trial run"),
        (rule("amount_fen + 1"), 7, "must be true or false"),
        (
            rule("amount_fen > 1").replace("review", "maybe"),
            8,
            "action \"maybe\"",
        ),
        (
            rule("amount_fen > 1").replace("version = 1", "version = 1\nsevrity = 2"),
            7,
            "unknown field `sevrity`",
        ),
    ] {
        let error = load_sources(&[("rules/broken.toml".to_string(), text.clone())])
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        assert_eq!(error.file, "rules/broken.toml");
        assert_eq!(error.line, Some(line), "{error}\n{text}");
        assert!(error.reason.contains(says), "{error}");
    }
}

#[test]
fn a_broken_reload_keeps_the_running_set_and_a_good_one_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&library(), dir.path());
    let e = Arc::new(RiskEngine::new(
        load_dir(dir.path()).unwrap(),
        StoreLimits::default(),
    ));
    let reloader = kunpay::risk::reload::Reloader::new(dir.path(), e.clone());
    let poke = reloader.start_watching().unwrap();
    let running = e.version();
    std::fs::write(
        dir.path().join("rules/20-local.toml"),
        "[[rule]]\nid = \"LOCAL-1\"\ndescription = \"d\"\nversion = 1\nwhen = \"amount_fen >\"\naction = \"review\"\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reloader.status().failures == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = reloader.status();
    let error = status.last_error.expect("the broken file is reported");
    assert_eq!(
        (error.file.as_str(), error.line),
        ("rules/20-local.toml", Some(5))
    );
    assert_eq!(e.version(), running, "the running set stays");
    assert_eq!(decide(&e, &quiet()).0, Outcome::Approve);

    std::fs::write(
        dir.path().join("rules/20-local.toml"),
        "[[rule]]\nid = \"LOCAL-1\"\ndescription = \"d\"\nversion = 1\nwhen = \"amount_fen > 9999\"\naction = \"review\"\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while e.version() == running && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(e.version(), running);
    assert!(reloader.status().last_error.is_none());
    assert_eq!(
        decide(&e, &quiet()),
        (Outcome::Review, vec!["LOCAL-1".to_string()])
    );
    // SIGHUP's path: a reload on request.
    poke.send(()).unwrap();
}

#[test]
fn decisions_during_reloads_never_mix_two_versions() {
    let set = |tag: &str| {
        let mut text = format!("version = \"{tag}\"\n");
        text.clear();
        let mut rules = String::new();
        for i in 0..30 {
            rules.push_str(&format!(
                "[[rule]]\nid = \"{tag}-{i}\"\ndescription = \"d\"\nversion = 1\nwhen = \"amount_fen > 0\"\naction = \"score\"\nscore = 1\n\n"
            ));
        }
        vec![
            (
                "strategy.toml".to_string(),
                format!("version = \"{tag}\"\n"),
            ),
            ("rules/all.toml".to_string(), rules),
        ]
    };
    let e = Arc::new(RiskEngine::new(
        load_sources(&set("A")).unwrap(),
        StoreLimits::default(),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deciders: Vec<_> = (0..4)
        .map(|t| {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut decided = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let card = format!("card-{t}-{decided}");
                    let d = e.decide(
                        &RiskInput {
                            card: Some(&card),
                            ..quiet()
                        },
                        Duration::from_secs(1),
                        OnTimeout::Closed,
                    );
                    let tag = &d.version[..1];
                    assert_eq!(d.fired.len(), 30);
                    assert!(
                        d.fired.iter().all(|f| f.id.starts_with(tag)),
                        "{} mixed: {:?}",
                        d.version,
                        d.fired
                    );
                    decided += 1;
                }
                decided
            })
        })
        .collect();
    for i in 0..200 {
        let tag = if i % 2 == 0 { "B" } else { "A" };
        e.replace(load_sources(&set(tag)).unwrap()).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let decided: usize = deciders.into_iter().map(|d| d.join().unwrap()).sum();
    assert!(decided > 0);
}

#[test]
fn an_overrun_budget_decides_by_the_institutions_policy() {
    let e = engine();
    let open = e.decide(
        &RiskInput {
            amount_fen: 9_000_000,
            ..quiet()
        },
        Duration::ZERO,
        OnTimeout::Open,
    );
    assert!(open.budget_exceeded);
    assert_eq!(open.outcome, Outcome::Approve, "fail-open");
    let closed = e.decide(
        &RiskInput {
            card: Some("6222020000000000071"),
            ..quiet()
        },
        Duration::ZERO,
        OnTimeout::Closed,
    );
    assert_eq!(closed.outcome, Outcome::Decline, "fail-closed");
}
