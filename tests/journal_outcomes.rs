//! Recording outcomes: each is a compare-and-set (a second recording of one transaction writes
//! nothing), a failure gives back exactly its own daily usage (two on one account add up), a
//! failed refund returns its reservation, and answers are stored only where given.

mod common;

use chrono::Utc;
use common::{TestDb, scalar};
use diesel::prelude::*;
use kunpay::payment::journal::{self, AnswerToStore, OutcomeRecord};
use kunpay::payment::state::TxnState;
use uuid::Uuid;

fn open(
    conn: &mut PgConnection,
    serial: &str,
    kind: &str,
    amount: i64,
    orig: Option<Uuid>,
) -> Uuid {
    common::open_sent_to_core(conn, serial, kind, amount, orig, Utc::now())
}

struct Outcome {
    record: OutcomeRecord<'static>,
    answer: Option<AnswerToStore<'static>>,
}

fn outcome(txn_id: Uuid, to: TxnState, serial: Option<&'static str>) -> Outcome {
    Outcome {
        record: OutcomeRecord {
            txn_id,
            from: TxnState::SentToCore,
            to,
            reason: "test",
            result_code: if to == TxnState::Succeeded {
                "0000"
            } else {
                "3010"
            },
            core_ref: None,
            now: Utc::now(),
            notify: true,
        },
        answer: serial.map(|serial| AnswerToStore {
            inst_id: "T",
            req_serial: serial,
            msg_type: "DEBIT",
            field_digests: "d",
            response: serial.as_bytes(),
        }),
    }
}

fn record(conn: &mut PgConnection, outcomes: &[Outcome]) -> Vec<bool> {
    outcomes
        .iter()
        .map(|o| journal::record_outcome(conn, &o.record, o.answer.as_ref()).unwrap())
        .collect()
}

#[test]
fn each_outcome_is_a_compare_and_set_that_gives_back_what_a_failure_held() {
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let today = Utc::now().date_naive();
    diesel::sql_query(
        "INSERT INTO daily_usage (inst_id, account_hash, kind, business_date, used_fen) \
         VALUES ('T', 'acct', 'DEBIT', $1, 1000)",
    )
    .bind::<diesel::sql_types::Date, _>(today)
    .execute(&mut conn)
    .unwrap();
    // A succeeded debit with 100 of it reserved by a refund that will fail.
    let original = open(&mut conn, "O", "DEBIT", 500, None);
    assert_eq!(
        record(&mut conn, &[outcome(original, TxnState::Succeeded, None)]),
        [true]
    );
    journal::add_refunded(&mut conn, original, 100).unwrap();
    let refund = open(&mut conn, "R", "REFUND", 100, Some(original));
    let ok = open(&mut conn, "A", "DEBIT", 300, None);
    let failed_1 = open(&mut conn, "B", "DEBIT", 200, None);
    let failed_2 = open(&mut conn, "C", "DEBIT", 250, None);
    let outcomes = [
        outcome(ok, TxnState::Succeeded, Some("A")),
        outcome(failed_1, TxnState::Failed, Some("B")),
        // Someone recorded this one first: it is reported, and nothing is written for it.
        outcome(original, TxnState::Succeeded, Some("O")),
        outcome(failed_2, TxnState::Failed, None),
        outcome(refund, TxnState::Failed, Some("R")),
    ];
    assert_eq!(
        record(&mut conn, &outcomes),
        [true, true, false, true, true]
    );
    assert_eq!(
        scalar(&mut conn, "SELECT used_fen AS n FROM daily_usage"),
        1000 - 200 - 250,
        "both failures on one account given back"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT refunded_fen AS n FROM txn WHERE req_serial = 'O'"
        ),
        0,
        "the failed refund's reservation returned"
    );
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM channel_request"),
        3,
        "answers stored for A, B and R only"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM txn_state_history WHERE from_state = 'SENT_TO_CORE'"
        ),
        5,
        "one history row per transition: O once, A, B, C, R"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM txn WHERE state = 'FAILED' AND req_serial IN ('B', 'C', 'R')"
        ),
        3
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM notification n JOIN txn t ON t.txn_id = n.txn_id \
             WHERE n.status = 'PENDING' AND n.txn_state = t.state"
        ),
        5,
        "each final state recorded queues exactly one notification announcing it"
    );
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM core_pending"),
        0,
        "nothing is owed by the core after final outcomes"
    );

    // Without a callback URL nothing is announced; an UNKNOWN outcome is not final (nothing
    // announced) and the core still owes its answer.
    let quiet = open(&mut conn, "D", "DEBIT", 10, None);
    let unknown = open(&mut conn, "E", "DEBIT", 10, None);
    let mut silent = outcome(quiet, TxnState::Succeeded, Some("D"));
    silent.record.notify = false;
    let mut unanswered = outcome(unknown, TxnState::Unknown, None);
    unanswered.record.result_code = "9999";
    assert_eq!(record(&mut conn, &[silent, unanswered]), [true, true]);
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM notification"),
        5,
        "neither a success without callback nor an UNKNOWN is announced"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM core_pending p JOIN txn t ON t.txn_id = p.txn_id \
             WHERE t.req_serial = 'E'"
        ),
        1,
        "the UNKNOWN transaction is still owed by the core"
    );
    assert_eq!(
        scalar(&mut conn, "SELECT used_fen AS n FROM daily_usage"),
        1000 - 200 - 250,
        "a success and an UNKNOWN give nothing back"
    );
}
