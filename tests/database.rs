//! Migrations, the schema and the daemon's refusal to run on a schema older than itself.

mod common;

use std::time::Duration;

use common::*;
use diesel::prelude::*;
use nix::sys::signal::Signal;

#[test]
fn migrations_apply_once_and_are_idempotent() {
    let db = TestDb::new();
    let mut conn = db.connect();
    let pending = kunpay::db::pending_migrations(&mut conn).unwrap();
    assert!(!pending.is_empty());
    let applied = kunpay::db::migrate(&mut conn).unwrap();
    assert_eq!(applied.len(), pending.len());
    assert!(
        kunpay::db::migrate(&mut conn).unwrap().is_empty(),
        "a second run applies nothing"
    );
    kunpay::db::ensure_schema_current(&mut conn).unwrap();
}

#[test]
fn schema_matches_migrations() {
    // Every column diesel knows is selectable and writable as declared.
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let run_id = kunpay::db::record_start(&mut conn, "n1", kunpay::config::Role::Standby).unwrap();
    kunpay::db::record_ready(&mut conn, run_id).unwrap();
    kunpay::db::record_stop(&mut conn, run_id, "test").unwrap();
    let runs = kunpay::db::recent_runs(&mut conn, "n1", 10).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].role, "standby");
    assert_eq!(runs[0].stop_reason.as_deref(), Some("test"));
    assert!(runs[0].stopped_at.unwrap() >= runs[0].started_at);
    // The database enforces the role domain, not only the code.
    let bad = diesel::sql_query(
        "INSERT INTO node_run (node_id, version, pid, role, started_at) VALUES ('n', 'v', 1, 'leader', now())",
    )
    .execute(&mut conn);
    assert!(
        bad.is_err(),
        "role outside active/standby must be rejected by the CHECK"
    );
}

#[test]
fn kunpayctl_db_migrate_applies_and_reports() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let (code, stdout, stderr) = run(kunpayctl()
        .args(["db", "migrate", "--by", "dba-li", "--config"])
        .arg(dir.config_path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("migration(s) applied"), "{stdout}");
    assert!(
        stdout.contains("recorded as operator action 1 (DB_MIGRATE)"),
        "{stdout}"
    );
    // The audit log gets it through the operator_action relay, with every migration named.
    let actions = || -> Vec<(String, String, String)> {
        let mut conn = db.connect();
        diesel::sql_query(
            "SELECT operator, command, detail FROM operator_action ORDER BY action_id",
        )
        .load::<Action>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|a| (a.operator, a.command, a.detail))
        .collect()
    };
    let recorded = actions();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let (operator, command, detail) = &recorded[0];
    assert_eq!(
        (operator.as_str(), command.as_str()),
        ("dba-li", "DB_MIGRATE")
    );
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert!(
        detail.contains(&format!("applied: {migrations}")),
        "{detail}"
    );
    assert!(
        detail.contains("migration: 2026-11-22-000001_node_run"),
        "{detail}"
    );
    assert_eq!(
        detail.matches("migration: ").count(),
        migrations,
        "{detail}"
    );
    // Nothing applied, nothing recorded.
    let (code, stdout, _) = run(kunpayctl()
        .args(["db", "migrate", "--config"])
        .arg(dir.config_path()));
    assert_eq!(code, 0);
    assert!(stdout.contains("schema is current"), "{stdout}");
    assert_eq!(actions().len(), 1);
}

#[derive(diesel::QueryableByName)]
struct Action {
    #[diesel(sql_type = diesel::sql_types::Text)]
    operator: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    command: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    detail: String,
}

#[test]
fn the_daemon_refuses_a_schema_behind_the_binary_unless_told_to_migrate() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace("migrate_on_start = true", "migrate_on_start = false"),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&dir);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("refuses to start");
    assert_eq!(status.code(), Some(1));
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("the database schema is behind this binary"),
        "{stderr}"
    );
    assert!(stderr.contains("kunpayctl db migrate"), "{stderr}");

    let (code, _, stderr) = run(kunpayctl()
        .args(["db", "migrate", "--config"])
        .arg(dir.config_path()));
    assert_eq!(code, 0, "{stderr}");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
}
