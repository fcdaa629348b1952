//! Risk control in the payment flows, end to end over HTTP against a real daemon and database:
//! a decline answers 3015 and journals a FAILED transaction with its decision; a review holds
//! the transaction (0001, IN_REVIEW) until `kunpayctl risk case approve` sends it to the core or
//! `decline` fails it with its usage given back; velocity counts are exact under concurrent
//! debits and survive a restart; `kunpayctl risk stats` counts hits and verdicts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::institution::TestInstitution;
use common::*;
use diesel::prelude::*;
use kunpay::payment::request::MsgType;

const ZHANG: (&str, &str, &str, &str) = (
    "6222021234567890123",
    "张三",
    "110101199003077774",
    "13812345678",
);
const LI: (&str, &str, &str, &str) = (
    "6222021234567890131",
    "李四",
    "110101198507071232",
    "13912345678",
);

const STRATEGY: &str = r#"
version = "risk-flows-test"
[strategy]
mode = "worst"
review_at = 50
decline_at = 100
"#;

const RULES: &str = r#"
[[rule]]
id = "T-REVIEW"
description = "a marked amount is held for a person"
version = 1
when = "amount_fen == 7777"
action = "review"

[[rule]]
id = "T-DECLINE"
description = "a marked amount is declined"
version = 2
when = "amount_fen == 6666"
action = "decline"

[[rule]]
id = "T-LISTED"
description = "a blacklisted card"
version = 1
when = "card_blacklisted"
action = "decline"

[[rule]]
id = "T-VELOCITY"
description = "the fourth debit of 5,555 fen on one card within an hour"
version = 1
when = "amount_fen == 5555 && card_count_1h >= 3"
action = "decline"

[[rule]]
id = "T-HOLDER"
description = "the payer the institution names is not the agreement's holder"
version = 1
kinds = ["DEBIT"]
when = "holder_mismatch"
action = "decline"

[[rule]]
id = "T-SEEN"
description = "reads the card's count, so every decision records what it saw"
version = 1
shadow = true
when = "card_count_1h >= 0"
action = "review"
"#;

fn write_risk_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for sub in ["", "rules", "lists"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::set_permissions(dir.join(sub), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let files = [
        ("strategy.toml", STRATEGY.to_string()),
        ("rules/10-test.toml", RULES.to_string()),
        (
            "lists/00-test.toml",
            format!("[black]\ncard = [\"{}\"]\n", LI.0),
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

struct Node {
    db: TestDb,
    dir: DaemonDir,
    daemon: Option<Daemon>,
    inst: TestInstitution,
}

impl Node {
    fn start() -> Node {
        let db = TestDb::new();
        let dir = DaemonDir::new();
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let keys = dir.path().join("keys");
        let (inst, section) = TestInstitution::create(dir.path(), "TENPAY", &keys, &base);
        let risk_dir = dir.path().join("risk");
        write_risk_dir(&risk_dir);
        let sections = format!("{section}single_limit_fen = 100000\ndaily_limit_fen = 200000\n");
        // A generous budget: these tests check what is decided, and a debug build on a loaded
        // machine can overrun the default 5 ms (and then fail open, approving).
        let risk = format!(
            "[risk]\ndir = \"{}\"\nbudget = \"1s\"\non_timeout = \"closed\"\n",
            risk_dir.display()
        );
        dir.write_channel_config(db.url(), port, &sections, &risk);
        let mut node = Node {
            db,
            dir,
            daemon: None,
            inst,
        };
        node.restart();
        node
    }

    fn restart(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.signal(nix::sys::signal::Signal::SIGTERM);
            daemon.wait_exit(Duration::from_secs(30)).expect("stops");
        }
        let mut daemon = Daemon::spawn(&self.dir);
        daemon.wait_ready();
        self.daemon = Some(daemon);
    }

    fn conn(&self) -> PgConnection {
        PgConnection::establish(self.db.url()).unwrap()
    }

    fn count(&self, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query(sql)
            .get_result::<N>(&mut self.conn())
            .unwrap()
            .n
    }

    fn text(&self, sql: &str) -> Vec<String> {
        #[derive(QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            t: String,
        }
        diesel::sql_query(sql)
            .load::<T>(&mut self.conn())
            .unwrap()
            .into_iter()
            .map(|r| r.t)
            .collect()
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let config = self.dir.config_path();
        run(kunpayctl().args(args).arg("--config").arg(&config))
    }

    fn sign_agreement(&self, account: (&str, &str, &str, &str)) -> String {
        self.inst.sign_agreement(account)
    }

    fn debit(&self, agreement: &str, serial: &str, amount: &str) -> common::institution::Answer {
        self.inst.call(
            MsgType::Debit,
            &[
                ("ReqSerial", serial),
                ("AgrmtNo", agreement),
                ("Amt", amount),
                ("Ccy", "CNY"),
                ("DevId", "dev-0001"),
                ("PyerIp", "203.0.113.7"),
            ],
        )
    }

    fn query_state(&self, serial: &str) -> (String, String) {
        let query = self.inst.call(MsgType::Query, &[("QrySerial", serial)]);
        assert_eq!(query.code(), "0000", "{:?}", query.fields);
        (
            query.get("TxnStatus").to_string(),
            query.get("TxnRsltCd").to_string(),
        )
    }

    fn wait_state(&self, serial: &str, wanted: &str) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.query_state(serial);
            if found.0 == wanted || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn txn_id_of(node: &Node, serial: &str) -> String {
    node.text(&format!(
        "SELECT replace(CAST(txn_id AS TEXT), '-', '') AS t FROM txn WHERE req_serial = '{serial}'"
    ))
    .pop()
    .expect("journaled")
}

fn history(node: &Node, serial: &str) -> Vec<String> {
    node.text(&format!(
        "SELECT to_state AS t FROM txn_state_history h JOIN txn USING (txn_id) \
         WHERE req_serial = '{serial}' ORDER BY h.id"
    ))
}

#[test]
fn declines_reviews_and_the_reviewers_verdicts_end_to_end() {
    let node = Node::start();
    let agreement = node.sign_agreement(ZHANG);

    // Approved: on to the core, the decision stored with the shadow rule and what it saw.
    let approved = node.inst.next_id("D");
    let answer = node.debit(&agreement, &approved, "1000");
    assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
    let stored = node.text(&format!(
        "SELECT outcome || ' ' || fired || ' ' || seen AS t FROM risk_decision \
         JOIN txn USING (txn_id) WHERE req_serial = '{approved}'"
    ));
    assert_eq!(stored.len(), 1);
    assert!(
        stored[0].starts_with("APPROVE T-SEEN@1:REVIEW(shadow) "),
        "a shadow rule is recorded and changes nothing: {}",
        stored[0]
    );
    assert!(stored[0].contains("card_count_1h=0"), "{}", stored[0]);

    // Declined by a rule: 3015 at once, FAILED with its decision, nothing reached the core.
    let declined = node.inst.next_id("D");
    let answer = node.debit(&agreement, &declined, "6666");
    assert_eq!(answer.code(), "3015", "{:?}", answer.fields);
    assert_eq!(answer.get("TxnStatus"), "FAILED");
    assert_eq!(history(&node, &declined), ["RECEIVED", "FAILED"]);
    assert_eq!(
        node.query_state(&declined),
        ("FAILED".into(), "3015".into())
    );
    // A repeat is the first answer, byte for byte, and is not decided again.
    let again = node.debit(&agreement, &declined, "6666");
    assert_eq!(again.raw, answer.raw);
    assert_eq!(
        node.count(&format!(
            "SELECT count(*) AS n FROM risk_decision JOIN txn USING (txn_id) \
             WHERE req_serial = '{declined}' AND fired LIKE 'T-DECLINE@2:DECLINE%'"
        )),
        1
    );

    // The payer named in the debit is not the agreement's holder; the holder is fine.
    let mismatch = node.inst.next_id("D");
    let answer = node.inst.call(
        MsgType::Debit,
        &[
            ("ReqSerial", &mismatch),
            ("AgrmtNo", &agreement),
            ("Amt", "1000"),
            ("Ccy", "CNY"),
            ("IdNo", LI.2),
        ],
    );
    assert_eq!(answer.code(), "3015", "{:?}", answer.fields);
    assert!(
        node.text(&format!(
            "SELECT fired AS t FROM risk_decision JOIN txn USING (txn_id) WHERE req_serial = '{mismatch}'"
        ))[0]
            .starts_with("T-HOLDER@1:DECLINE"),
    );
    let holder = node.inst.call(
        MsgType::Debit,
        &[
            ("ReqSerial", &node.inst.next_id("D")),
            ("AgrmtNo", &agreement),
            ("Amt", "1000"),
            ("Ccy", "CNY"),
            ("IdNo", ZHANG.2),
        ],
    );
    assert_eq!(holder.code(), "0000", "{:?}", holder.fields);

    // A blacklisted card, from the list file.
    let li_agreement = node.sign_agreement(LI);
    let listed = node.inst.next_id("D");
    let answer = node.debit(&li_agreement, &listed, "1000");
    assert_eq!(answer.code(), "3015", "{:?}", answer.fields);

    // Review -> approve: 0001 IN_REVIEW, a case, then the core after the reviewer's approval.
    let held = node.inst.next_id("D");
    let answer = node.debit(&agreement, &held, "7777");
    assert_eq!(answer.code(), "0001", "{:?}", answer.fields);
    assert_eq!(answer.get("TxnStatus"), "IN_REVIEW");
    let held_id = txn_id_of(&node, &held);
    let (code, out, err) = node.ctl(&["risk", "case", "list", "--state", "open"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&held_id) && out.contains("T-REVIEW@1:REVIEW"),
        "{out}"
    );
    let (code, out, err) = node.ctl(&["risk", "case", "show", &held_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("amount_fen=7777"), "{out}");
    let (code, _, err) = node.ctl(&[
        "risk",
        "case",
        "approve",
        &held_id,
        "--note",
        "customer confirmed by phone",
        "--by",
        "alice",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        node.wait_state(&held, "SUCCEEDED"),
        ("SUCCEEDED".into(), "0000".into())
    );
    assert_eq!(
        history(&node, &held),
        [
            "RECEIVED",
            "IN_REVIEW",
            "RISK_CHECKED",
            "SENT_TO_CORE",
            "SUCCEEDED"
        ]
    );
    // A second verdict changes nothing and says who decided.
    let (code, _, err) = node.ctl(&["risk", "case", "decline", &held_id, "--note", "late"]);
    assert_eq!(code, 1);
    assert!(err.contains("already APPROVED (by alice)"), "{err}");

    // Review -> decline: FAILED with 3015 and the held usage given back.
    let usage_before =
        node.count("SELECT CAST(COALESCE(SUM(used_fen), 0) AS BIGINT) AS n FROM daily_usage");
    let held_2 = node.inst.next_id("D");
    let answer = node.debit(&agreement, &held_2, "7777");
    assert_eq!(answer.code(), "0001", "{:?}", answer.fields);
    assert_eq!(
        node.count("SELECT CAST(COALESCE(SUM(used_fen), 0) AS BIGINT) AS n FROM daily_usage"),
        usage_before + 7777,
        "a held debit reserves its day's usage"
    );
    let held_2_id = txn_id_of(&node, &held_2);
    let (code, _, err) = node.ctl(&[
        "risk",
        "case",
        "decline",
        &held_2_id,
        "--note",
        "stolen card reported",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(node.query_state(&held_2), ("FAILED".into(), "3015".into()));
    assert_eq!(
        node.count("SELECT CAST(COALESCE(SUM(used_fen), 0) AS BIGINT) AS n FROM daily_usage"),
        usage_before,
        "the declined review gave its usage back"
    );
    assert_eq!(history(&node, &held_2), ["RECEIVED", "IN_REVIEW", "FAILED"]);
    // Each verdict that changed something is an operator action for the audit log, committed
    // with it (the refused second verdict is none); without [audit] the rows wait, unlogged.
    for (command, txn) in [
        ("RISK_CASE_APPROVE", &held_id),
        ("RISK_CASE_DECLINE", &held_2_id),
    ] {
        assert_eq!(
            node.count(&format!(
                "SELECT count(*) AS n FROM operator_action WHERE command = '{command}' \
                 AND txn_id = '{txn}' AND audit_seq IS NULL"
            )),
            1,
            "{command}"
        );
    }
    assert_eq!(
        node.count("SELECT count(*) AS n FROM operator_action WHERE command LIKE 'RISK_CASE_%'"),
        2
    );

    // The day's statistics per rule, with the reviewers' verdicts.
    let (code, out, err) = node.ctl(&["risk", "stats"]);
    assert_eq!(code, 0, "{err}");
    let review_line = out
        .lines()
        .find(|l| l.starts_with("T-REVIEW@1"))
        .unwrap_or_else(|| panic!("{out}"));
    let figures: Vec<&str> = review_line.split_whitespace().collect();
    // RULE HITS SHADOW DECLINED REVIEWED REV_APPRVD REV_DECLND
    assert_eq!(figures[1..], ["2", "0", "0", "2", "1", "1"], "{out}");
    assert!(out.contains("risk decisions on"), "{out}");

    // The active rule set, from the running daemon.
    let (code, out, err) = node.ctl(&["risk", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("risk-flows-test+"), "{out}");
}

#[test]
fn velocity_is_exact_under_concurrent_debits_and_survives_a_restart() {
    let mut node = Node::start();
    let agreement = node.sign_agreement(ZHANG);

    // Eight debits at once on one card: each decision saw a different count, 0 to 7.
    let serials: Vec<String> = (0..8).map(|_| node.inst.next_id("C")).collect();
    std::thread::scope(|scope| {
        for serial in &serials {
            let (node, agreement) = (&node, &agreement);
            scope.spawn(move || {
                let answer = node.debit(agreement, serial, "100");
                assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
            });
        }
    });
    let mut seen: Vec<i64> = node
        .text(
            "SELECT seen AS t FROM risk_decision JOIN txn USING (txn_id) WHERE req_serial LIKE 'C%'",
        )
        .iter()
        .map(|seen| {
            seen.split(';')
                .find_map(|p| p.strip_prefix("card_count_1h="))
                .unwrap_or_else(|| panic!("{seen}"))
                .parse()
                .unwrap()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<i64>>());

    // The velocity rule: 5,555 fen passes while the card has fewer than three... it has eight
    // already, so it is declined; after a restart it still is (rebuilt from the journal).
    let before = node.debit(&agreement, &node.inst.next_id("V"), "5555");
    assert_eq!(before.code(), "3015", "{:?}", before.fields);
    node.restart();
    let after = node.debit(&agreement, &node.inst.next_id("V"), "5555");
    assert_eq!(
        after.code(),
        "3015",
        "a restart must not reset the card's count: {:?}",
        after.fields
    );
    let counts = node.text(
        "SELECT seen AS t FROM risk_decision JOIN txn USING (txn_id) \
         WHERE req_serial LIKE 'V%' ORDER BY decided_at",
    );
    assert!(counts[0].contains("card_count_1h=8"), "{}", counts[0]);
    assert!(counts[1].contains("card_count_1h=9"), "{}", counts[1]);
}

#[test]
fn operators_lists_apply_within_seconds_and_every_change_is_logged() {
    let node = Node::start();
    let agreement = node.sign_agreement(ZHANG);
    let answer = node.debit(&agreement, &node.inst.next_id("L"), "1000");
    assert_eq!(answer.code(), "0000", "{:?}", answer.fields);

    let (code, out, err) = node.ctl(&[
        "risk",
        "list",
        "add",
        "black",
        "card",
        ZHANG.0,
        "--reason",
        "reported stolen",
        "--by",
        "bob",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("622202*********0123"), "{out}");
    let declined_within = |wanted: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answer = node.debit(&agreement, &node.inst.next_id("L"), "1000");
            if answer.code() == wanted {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    assert!(declined_within("3015"), "the blacklisted card is declined");
    // Adding it again changes nothing and logs nothing.
    let (code, out, _) = node.ctl(&[
        "risk", "list", "add", "black", "card", ZHANG.0, "--reason", "again", "--by", "bob",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("already"), "{out}");

    let (code, out, err) = node.ctl(&["risk", "list", "show"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("622202*********0123") && out.contains("bob"),
        "{out}"
    );
    assert!(!out.contains(ZHANG.0), "no card number in plaintext: {out}");

    let (code, _, err) = node.ctl(&[
        "risk",
        "list",
        "remove",
        "black",
        "card",
        ZHANG.0,
        "--reason",
        "found by the customer",
        "--by",
        "carol",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        declined_within("0000"),
        "the card is debited again once removed"
    );
    let (code, _, err) = node.ctl(&[
        "risk", "list", "remove", "black", "card", ZHANG.0, "--reason", "twice",
    ]);
    assert_eq!(code, 1, "removing what is not listed is refused: {err}");

    let (code, out, err) = node.ctl(&["risk", "list", "log"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("622202")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("carol") && lines[0].contains("REMOVE"),
        "{out}"
    );
    assert!(
        lines[1].contains("bob") && lines[1].contains("ADD"),
        "{out}"
    );
    assert!(!out.contains(ZHANG.0), "{out}");

    // A malformed entry is refused with what is wrong.
    let (code, _, err) = node.ctl(&[
        "risk",
        "list",
        "add",
        "black",
        "ip",
        "10.0.0.300",
        "--reason",
        "typo",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("neither an address nor a CIDR range"), "{err}");
}
