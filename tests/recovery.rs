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
