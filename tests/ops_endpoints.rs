//! The ops listener with Patroni's semantics, as an F5 monitor and Prometheus use it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kunpay::db::cluster::ClusterOptions;
use nix::sys::signal::Signal;

#[test]
fn the_active_node_answers_primary_and_refuses_standby() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    for (path, expected) in [
        ("/primary", 200),
        ("/", 200),
        ("/read-write", 200),
        ("/standby", 503),
        ("/replica", 503),
        ("/health", 200),
        ("/liveness", 200),
        ("/readiness", 200),
        ("/status", 200),
        ("/metrics", 200),
        ("/nonexistent", 404),
    ] {
        assert_eq!(status_of(&dir.ops_url(path)), expected, "GET {path}");
    }
    let (_, body) = http_get(&dir.ops_url("/primary")).unwrap();
    let report: kunpay::ops::NodeReport = serde_json::from_str(&body).unwrap();
    assert_eq!(report.role, "active");
    assert_eq!(report.state, "running");
    assert_eq!(report.database, "up");
    assert_eq!(report.node, "test-node");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_standby_node_answers_standby_and_refuses_primary() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "standby", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    assert_eq!(status_of(&dir.ops_url("/primary")), 503);
    assert_eq!(status_of(&dir.ops_url("/standby")), 200);
    assert_eq!(status_of(&dir.ops_url("/replica")), 200);
    assert_eq!(status_of(&dir.ops_url("/health")), 200);
}

#[test]
fn metrics_are_prometheus_text_with_the_node_state() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    status_of(&dir.ops_url("/health"));
    let (status, text) = http_get(&dir.ops_url("/metrics")).unwrap();
    assert_eq!(status, 200);
    for expected in [
        "# TYPE kunpay_build info",
        "kunpay_build_info{version=\"",
        "kunpay_node_role{role=\"active\"} 1",
        "kunpay_node_role{role=\"standby\"} 0",
        "kunpay_draining 0",
        "kunpay_db_probe_total{result=\"up\"}",
        "kunpay_http_requests_total{listener=\"ops\",route=\"/health\",status=\"200\"} 1",
        "# TYPE kunpay_http_request_duration_seconds histogram",
        "# EOF",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn health_follows_the_database_down_and_back_up() {
    let mut cluster = TestCluster::start(ClusterOptions {
        fast_unsafe: true,
        ..ClusterOptions::default()
    });
    let dir = DaemonDir::new();
    dir.write_config(&cluster.url(), "active", "");
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace("[ops]", "[ops]\nhealth_timeout = \"1s\""),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    assert_eq!(status_of(&dir.ops_url("/health")), 200);

    cluster.cluster.stop().unwrap();
    let started = Instant::now();
    assert_eq!(status_of(&dir.ops_url("/health")), 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the probe is bounded by ops.health_timeout"
    );
    assert_eq!(
        status_of(&dir.ops_url("/primary")),
        503,
        "F5 must stop sending to a node without its database"
    );
    assert_eq!(status_of(&dir.ops_url("/readiness")), 503);
    assert_eq!(
        status_of(&dir.ops_url("/liveness")),
        200,
        "the process itself is alive"
    );

    cluster.cluster.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&dir.ops_url("/health")) != 200 {
        assert!(
            Instant::now() < deadline,
            "health did not recover: {}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status_of(&dir.ops_url("/primary")), 200);
}

#[test]
fn kunpayctl_status_reads_the_ops_listener() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    let (code, stdout, stderr) = run(kunpayctl()
        .arg("status")
        .arg("--config")
        .arg(dir.config_path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("node       test-node"), "{stdout}");
    assert!(stdout.contains("role       active"), "{stdout}");
    assert!(stdout.contains("database   up"), "{stdout}");
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(20)).unwrap();
    let (code, _, stderr) = run(kunpayctl()
        .arg("status")
        .arg("--config")
        .arg(dir.config_path()));
    assert_eq!(code, 3, "unreachable daemon");
    assert!(stderr.contains("cannot reach the ops listener"), "{stderr}");
}
