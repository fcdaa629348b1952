//! The journal's group commit (`payment/journal/group.rs`) against the real PostgreSQL: the
//! statements that wait while a leader is busy commit together in one transaction (the rows'
//! `xmin` says which), never more than the bound per transaction; one failing statement rolls
//! its group back and every statement runs again alone, the failing one meeting its own error
//! and the others committed exactly once; a failed COMMIT is reported to every member and
//! nothing of the group is kept.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{TestDb, scalar};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use kunpay::payment::journal::group::{Group, LockKey};

/// A statement a test hands to the group.
type Statement = Box<dyn Fn(&mut PgConnection) -> QueryResult<usize> + Send + Sync>;

fn insert(id: i64) -> impl Fn(&mut PgConnection) -> QueryResult<usize> + Send + Sync + 'static {
    move |conn| {
        diesel::sql_query("INSERT INTO grouped (id, payload) VALUES ($1, 'x')")
            .bind::<diesel::sql_types::BigInt, _>(id)
            .execute(conn)
    }
}

/// Runs `first` alone through `group` on one thread (it holds the group's only leader slot for
/// `hold`), and, while it runs, each of `others` on its own thread and connection; returns
/// every result, `first`'s first.
fn behind_a_busy_leader(
    db: &TestDb,
    group: &Arc<Group>,
    hold: Duration,
    others: Vec<(String, Statement)>,
) -> Vec<QueryResult<usize>> {
    let started = Arc::new(Barrier::new(2));
    let leader = {
        let (group, started, url) = (group.clone(), started.clone(), db.url().to_string());
        std::thread::spawn(move || {
            let mut conn = PgConnection::establish(&url).unwrap();
            let seconds = hold.as_secs_f64();
            group.run(&mut conn, LockKey::debit("0"), move |conn| {
                started.wait();
                diesel::sql_query("SELECT pg_sleep($1)")
                    .bind::<diesel::sql_types::Double, _>(seconds)
                    .execute(conn)?;
                insert(0)(conn)
            })
        })
    };
    started.wait();
    let waiting: Vec<_> = others
        .into_iter()
        .map(|(key, statement)| {
            let (group, url) = (group.clone(), db.url().to_string());
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                group.run(&mut conn, LockKey::debit(&key), statement)
            })
        })
        .collect();
    let mut results = vec![leader.join().unwrap()];
    results.extend(waiting.into_iter().map(|t| t.join().unwrap()));
    results
}

fn prepared_db() -> TestDb {
    let db = TestDb::new();
    let mut conn = db.connect();
    diesel::sql_query(
        "CREATE TABLE grouped (id BIGINT PRIMARY KEY, payload TEXT NOT NULL, \
         tag BIGINT UNIQUE DEFERRABLE INITIALLY DEFERRED)",
    )
    .execute(&mut conn)
    .unwrap();
    db
}

fn boxed(
    statement: impl Fn(&mut PgConnection) -> QueryResult<usize> + Send + Sync + 'static,
) -> Statement {
    Box::new(statement)
}

#[test]
fn statements_waiting_for_a_busy_leader_commit_together_within_the_bound() {
    let db = prepared_db();
    let group = Arc::new(Group::new(3, 1));
    let others = (1..=7)
        .map(|id| (format!("{id:02}"), boxed(insert(id))))
        .collect();
    let results = behind_a_busy_leader(&db, &group, Duration::from_millis(500), others);
    assert!(results.iter().all(|r| matches!(r, Ok(1))), "{results:?}");
    let mut conn = db.connect();
    assert_eq!(scalar(&mut conn, "SELECT count(*) AS n FROM grouped"), 8);
    // Rows inserted by one transaction share its xmin.
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT max(c) AS n FROM (SELECT count(*) AS c FROM grouped WHERE id > 0 \
             GROUP BY xmin::text) AS per_transaction"
        ),
        3,
        "the seven waiting statements went in groups of at most three"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(DISTINCT xmin::text) AS n FROM grouped WHERE id > 0"
        ),
        3,
        "seven statements in three transactions (3 + 3 + 1)"
    );
    let counters = &group.counters;
    let load = |c: &prometheus_client::metrics::counter::Counter| c.get();
    assert_eq!(
        (load(&counters.groups), load(&counters.grouped)),
        (2, 6),
        "two groups of three; the last one ran alone"
    );
    assert_eq!(load(&counters.alone), 2);
    assert_eq!(load(&counters.rolled_back), 0);
}

#[test]
fn a_failing_statement_rolls_its_group_back_and_each_runs_again_alone() {
    let db = prepared_db();
    let group = Arc::new(Group::new(8, 1));
    // Id 0 is the busy leader's row: inserting it again fails with the primary key.
    let mut others: Vec<_> = (1..=5)
        .map(|id| (format!("{id:02}"), boxed(insert(id))))
        .collect();
    others.push(("03b".into(), boxed(insert(0))));
    let results = behind_a_busy_leader(&db, &group, Duration::from_millis(500), others);
    for (index, result) in results.iter().enumerate() {
        if index == 6 {
            assert!(
                matches!(
                    result,
                    Err(DieselError::DatabaseError(
                        DatabaseErrorKind::UniqueViolation,
                        _
                    ))
                ),
                "the failing statement gets its own error back, not the group's: {result:?}"
            );
        } else {
            assert!(matches!(result, Ok(1)), "statement {index}: {result:?}");
        }
    }
    let mut conn = db.connect();
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM grouped"),
        6,
        "rows 0-5, each once"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(DISTINCT xmin::text) AS n FROM grouped WHERE id > 0"
        ),
        5,
        "after the rollback each statement ran in its own transaction"
    );
    let load = |c: &prometheus_client::metrics::counter::Counter| c.get();
    assert_eq!(load(&group.counters.rolled_back), 1);
    assert_eq!(load(&group.counters.groups), 0);
}

#[test]
fn a_failed_commit_is_reported_to_every_member_and_nothing_of_the_group_is_kept() {
    let db = prepared_db();
    let group = Arc::new(Group::new(8, 1));
    // Two rows with the same deferred-unique tag: each statement succeeds, the COMMIT fails.
    let tagged = |id: i64| {
        boxed(move |conn: &mut PgConnection| {
            diesel::sql_query("INSERT INTO grouped (id, payload, tag) VALUES ($1, 'x', 7)")
                .bind::<diesel::sql_types::BigInt, _>(id)
                .execute(conn)
        })
    };
    let others = vec![
        ("01".to_string(), boxed(insert(1))),
        ("02".to_string(), tagged(2)),
        ("03".to_string(), tagged(3)),
    ];
    let results = behind_a_busy_leader(&db, &group, Duration::from_millis(500), others);
    assert!(matches!(results[0], Ok(1)), "the lone leader committed");
    for result in &results[1..] {
        match result {
            Err(DieselError::DatabaseError(_, info)) => assert!(
                info.message().contains("commit failed"),
                "{}",
                info.message()
            ),
            other => panic!("a member of the failed group got {other:?}"),
        }
    }
    let mut conn = db.connect();
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) AS n FROM grouped"),
        1,
        "only the leader's own row"
    );
    let load = |c: &prometheus_client::metrics::counter::Counter| c.get();
    assert_eq!(load(&group.counters.commit_failed), 1);
}

#[test]
fn with_grouping_off_every_statement_is_its_own_transaction() {
    let db = prepared_db();
    let group = Arc::new(Group::off());
    let others = (1..=4)
        .map(|id| (format!("{id:02}"), boxed(insert(id))))
        .collect();
    let results = behind_a_busy_leader(&db, &group, Duration::from_millis(200), others);
    assert!(results.iter().all(|r| matches!(r, Ok(1))), "{results:?}");
    let mut conn = db.connect();
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(DISTINCT xmin::text) AS n FROM grouped"
        ),
        5
    );
}
