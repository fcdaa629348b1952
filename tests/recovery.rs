//! Transactions left without a recorded outcome (the process stopped during the core call, or
//! a timeout nobody queried) are settled by asking the core, never by guessing.

mod common;

use chrono::{Duration, Utc};
use common::TestDb;
use kunpay::core::sim::CoreSimulator;
use kunpay::core::{CoreLink, Posting, PostingKind};
use kunpay::crypto::sm2::{PrivateKey, Signer};
use kunpay::payment::Flows;
use kunpay::payment::journal;
use uuid::Uuid;

const ACCOUNT: &str = "6222021234567890123";

fn stranded(conn: &mut diesel::PgConnection, serial: &str, at: chrono::DateTime<Utc>) -> Uuid {
    common::open_sent_to_core(conn, serial, "DEBIT", 700, None, at)
}

#[test]
fn stranded_transactions_are_settled_by_asking_the_core() {
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let core = CoreSimulator::with_demo_accounts();
    let before = core.balance(ACCOUNT).unwrap();
    let key = PrivateKey::generate().unwrap();
    let flows = Flows::new(
        "B".into(),
        "01".into(),
        Signer::new(&key, "1234567812345678").unwrap(),
        [7u8; 16],
    );
    let now = Utc::now();
    let long_ago = now - Duration::minutes(5);

    // The core posted this one, but its answer never got recorded.
    let posted = stranded(&mut conn, "S1", long_ago);
    core.post(&Posting {
        txn_id: posted,
        kind: PostingKind::Debit,
        account_no: ACCOUNT.into(),
        amount_fen: 700,
    })
    .unwrap();
    // The core never heard of this one.
    stranded(&mut conn, "S2", long_ago);
    // This one is in flight right now: a live worker owns it.
    stranded(&mut conn, "S3", now);

    let resolved = flows
        .resolve_unrecorded(&mut conn, &core, "T", Duration::seconds(60), 100, now)
        .unwrap();
    assert_eq!(resolved.looked_at, 2);
    assert_eq!(resolved.settled, 2);
    let state = |conn: &mut diesel::PgConnection, serial: &str| {
        journal::find_txn(conn, "T", serial).unwrap().unwrap()
    };
    let settled = state(&mut conn, "S1");
    assert_eq!(settled.state, "SUCCEEDED");
    assert!(settled.core_ref.is_some());
    assert_eq!(state(&mut conn, "S2").state, "FAILED");
    assert_eq!(
        state(&mut conn, "S3").state,
        "SENT_TO_CORE",
        "a live transaction is left alone"
    );
    assert_eq!(
        core.balance(ACCOUNT).unwrap(),
        before - 700,
        "money moved exactly once"
    );
    let steps: Vec<String> = journal::history(&mut conn, posted)
        .unwrap()
        .into_iter()
        .map(|(_, to, _)| to)
        .collect();
    assert_eq!(
        steps,
        [
            "RECEIVED",
            "RISK_CHECKED",
            "SENT_TO_CORE",
            "UNKNOWN",
            "SUCCEEDED"
        ]
    );

    // Nothing left to do: a second pass looks at nothing.
    assert_eq!(
        flows
            .resolve_unrecorded(&mut conn, &core, "T", Duration::seconds(60), 100, now)
            .unwrap()
            .looked_at,
        0
    );
    // The outbox holds only the transaction a live worker still owns.
    assert_eq!(journal::pending_count(&mut conn).unwrap(), 1);
}

fn flows() -> Flows {
    let key = PrivateKey::generate().unwrap();
    Flows::new(
        "B".into(),
        "01".into(),
        Signer::new(&key, "1234567812345678").unwrap(),
        [7u8; 16],
    )
}

/// A transaction the resolver recorded as FAILED because the core answered "never received".
fn failed_after_not_found(
    conn: &mut diesel::PgConnection,
    flows: &Flows,
    core: &CoreSimulator,
    serial: &str,
    kind: &str,
    account: &str,
    amount: i64,
) -> Uuid {
    use diesel::prelude::*;
    let long_ago = Utc::now() - Duration::minutes(5);
    let txn_id = common::open_sent_to_core(conn, serial, kind, amount, None, long_ago);
    diesel::sql_query("UPDATE txn SET account_enc = $1 WHERE txn_id = $2")
        .bind::<diesel::sql_types::Text, _>(flows.seal_account(account).unwrap())
        .bind::<diesel::sql_types::Uuid, _>(txn_id)
        .execute(conn)
        .unwrap();
    flows
        .resolve_unrecorded(conn, core, "T", Duration::seconds(60), 100, Utc::now())
        .unwrap();
    assert_eq!(
        journal::txn_by_id(conn, txn_id).unwrap().unwrap().state,
        "FAILED"
    );
    txn_id
}

fn posting(txn_id: Uuid, kind: PostingKind, account: &str, amount_fen: i64) -> Posting {
    Posting {
        txn_id,
        kind,
        account_no: account.into(),
        amount_fen,
    }
}

/// The core posts a debit after it told the resolver it never received it (a core without the
/// query fence): the late reply requests a reversal once, the resolver drives it through a core
/// outage with a growing pause, the money comes back exactly once, the transaction stays
/// FAILED (what the institution was told) and its history tells the whole story.
#[test]
fn a_posting_applied_after_failure_is_reversed_exactly_once() {
    use kunpay::core::sim::Faults;
    use kunpay::core::{PostingOutcome, Reversal, ReversalOutcome};
    use kunpay::payment::LateReplyVerdict;
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let core = CoreSimulator::with_demo_accounts();
    core.set_faults(Faults {
        queries_do_not_fence: true,
        ..Faults::default()
    });
    let flows = flows();
    let before = core.balance(ACCOUNT).unwrap();
    let txn_id = failed_after_not_found(&mut conn, &flows, &core, "R1", "DEBIT", ACCOUNT, 900);

    // The posting arrives at the core late and is applied; its reply reaches reconciliation.
    let late = core
        .post(&posting(txn_id, PostingKind::Debit, ACCOUNT, 900))
        .unwrap();
    assert!(matches!(late, PostingOutcome::Posted { .. }));
    assert_eq!(core.balance(ACCOUNT).unwrap(), before - 900);
    let now = Utc::now();
    let first = Flows::reconcile_late_reply(&mut conn, txn_id, &late, now).unwrap();
    let LateReplyVerdict::ReversalRequested {
        reversal_id,
        new: true,
    } = first
    else {
        panic!("expected a new reversal, got {first:?}");
    };
    // A duplicate of the late reply requests nothing more.
    assert_eq!(
        Flows::reconcile_late_reply(&mut conn, txn_id, &late, now).unwrap(),
        LateReplyVerdict::ReversalRequested {
            reversal_id,
            new: false
        }
    );

    // The core is down: the attempt is counted and the next one waits.
    core.set_faults(Faults {
        unavailable: true,
        ..Faults::default()
    });
    let driven = flows
        .drive_reversals(&mut conn, &core, "T", 10, now)
        .unwrap();
    assert_eq!((driven.looked_at, driven.finished), (1, 0));
    let row = &journal::reversal::list(&mut conn, None, 10).unwrap()[0];
    assert_eq!((row.state.as_str(), row.attempts), ("PENDING", 1));
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("simulated outage")
    );
    // (The database keeps microseconds.)
    assert!(row.next_at >= now + Duration::seconds(5) - Duration::milliseconds(1));
    assert_eq!(
        flows
            .drive_reversals(&mut conn, &core, "T", 10, now)
            .unwrap()
            .looked_at,
        0,
        "not due before its pause is over"
    );

    // Back up: reversed once, money returned once.
    core.set_faults(Faults::default());
    let later = now + Duration::seconds(6);
    let driven = flows
        .drive_reversals(&mut conn, &core, "T", 10, later)
        .unwrap();
    assert_eq!((driven.looked_at, driven.finished), (1, 1));
    assert_eq!(core.balance(ACCOUNT).unwrap(), before);
    let row = &journal::reversal::list(&mut conn, None, 10).unwrap()[0];
    assert_eq!(row.state, "REVERSED");
    assert_eq!(row.attempts, 2);
    assert!(row.core_ref.as_deref().unwrap().starts_with("REV"));
    assert!(row.finished_at.is_some());
    assert_eq!(
        flows
            .drive_reversals(&mut conn, &core, "T", 10, later + Duration::hours(1))
            .unwrap()
            .looked_at,
        0
    );
    // The core itself answers a repeat with the same reversal and moves nothing.
    assert!(matches!(
        core.reverse(&Reversal {
            reversal_id,
            txn_id,
            kind: PostingKind::Debit,
            account_no: ACCOUNT.into(),
            amount_fen: 900,
        })
        .unwrap(),
        ReversalOutcome::Reversed { .. }
    ));
    assert_eq!(core.balance(ACCOUNT).unwrap(), before);

    let txn = journal::txn_by_id(&mut conn, txn_id).unwrap().unwrap();
    assert_eq!(
        txn.state, "FAILED",
        "the institution was told FAILED; it stays so"
    );
    let history = journal::history(&mut conn, txn_id).unwrap();
    let reasons: Vec<&str> = history.iter().map(|(_, _, why)| why.as_str()).collect();
    assert!(
        reasons[reasons.len() - 2].contains("after FAILED was recorded")
            && reasons[reasons.len() - 2].contains("requested"),
        "{reasons:?}"
    );
    assert!(
        reasons[reasons.len() - 1].contains("the core undid the posting"),
        "{reasons:?}"
    );
}

/// With the query fence (the contract in `CoreLink::query_posting`), the late posting is
/// refused as TOO_LATE: nothing moves and nothing needs reversing. A credit the customer has
/// already spent cannot be reversed automatically: REFUSED, for a person. A late rejection of
/// what the journal records as SUCCEEDED is a conflict, never applied.
#[test]
fn the_query_fence_prevents_reversals_and_a_refused_one_is_left_for_a_person() {
    use kunpay::core::sim::Faults;
    use kunpay::core::{PostingOutcome, Rejection};
    use kunpay::payment::LateReplyVerdict;
    use kunpay::payment::state::TxnState;
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let core = CoreSimulator::with_demo_accounts();
    let flows = flows();
    let before = core.balance(ACCOUNT).unwrap();
    let fenced = failed_after_not_found(&mut conn, &flows, &core, "F1", "DEBIT", ACCOUNT, 400);
    let late = core
        .post(&posting(fenced, PostingKind::Debit, ACCOUNT, 400))
        .unwrap();
    assert_eq!(late, PostingOutcome::Rejected(Rejection::TooLate));
    assert_eq!(
        Flows::reconcile_late_reply(&mut conn, fenced, &late, Utc::now()).unwrap(),
        LateReplyVerdict::Duplicate
    );
    assert_eq!(core.balance(ACCOUNT).unwrap(), before);

    // A payout credited late to 王五, who spent it at once.
    const WANG: &str = "6217001234567890149";
    core.set_faults(Faults {
        queries_do_not_fence: true,
        ..Faults::default()
    });
    let credit = failed_after_not_found(&mut conn, &flows, &core, "C1", "CREDIT", WANG, 500);
    let late = core
        .post(&posting(credit, PostingKind::Credit, WANG, 500))
        .unwrap();
    core.post(&posting(Uuid::now_v7(), PostingKind::Debit, WANG, 500))
        .unwrap();
    assert!(matches!(
        Flows::reconcile_late_reply(&mut conn, credit, &late, Utc::now()).unwrap(),
        LateReplyVerdict::ReversalRequested { new: true, .. }
    ));
    let driven = flows
        .drive_reversals(&mut conn, &core, "T", 10, Utc::now())
        .unwrap();
    assert_eq!(driven.finished, 1);
    let refused = journal::reversal::list(&mut conn, Some("REFUSED"), 10).unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].refusal.as_deref(), Some("INSUFFICIENT_FUNDS"));
    let history = journal::history(&mut conn, credit).unwrap();
    assert!(
        history
            .last()
            .unwrap()
            .2
            .contains("a person must settle it")
    );
    assert_eq!(core.balance(WANG).unwrap(), 0);

    // SUCCEEDED in the journal, rejected by the core: nothing to reverse, a conflict.
    let paid = common::open_sent_to_core(&mut conn, "P1", "DEBIT", 100, None, Utc::now());
    journal::record_outcome(
        &mut conn,
        &journal::OutcomeRecord {
            txn_id: paid,
            from: TxnState::SentToCore,
            to: TxnState::Succeeded,
            reason: "test",
            result_code: "0000",
            core_ref: Some("C1"),
            now: Utc::now(),
            notify: false,
        },
        None,
    )
    .unwrap();
    assert_eq!(
        Flows::reconcile_late_reply(
            &mut conn,
            paid,
            &PostingOutcome::Rejected(Rejection::Frozen),
            Utc::now()
        )
        .unwrap(),
        LateReplyVerdict::Conflict {
            recorded: TxnState::Succeeded,
            core_says: TxnState::Failed
        }
    );
    assert_eq!(
        journal::reversal::list(&mut conn, None, 10).unwrap().len(),
        1
    );
}
