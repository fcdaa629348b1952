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
        .args(["db", "migrate", "--config"])
        .arg(dir.config_path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("migration(s) applied"), "{stdout}");
    let (code, stdout, _) = run(kunpayctl()
        .args(["db", "migrate", "--config"])
        .arg(dir.config_path()));
    assert_eq!(code, 0);
    assert!(stdout.contains("schema is current"), "{stdout}");
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
