//! The daemon's life as systemd and an operator see it: readiness only when ready, drain on
//! SIGTERM, reload on SIGHUP, one clear line and a non-zero exit when start-up cannot finish,
//! privilege drop when started as root.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use diesel::connection::SimpleConnection as _;
use nix::sys::signal::Signal;

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn readiness_is_sent_only_once_the_node_serves() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    // At the moment READY=1 arrives, every endpoint F5 looks at already answers.
    assert_eq!(status_of(&dir.ops_url("/readiness")), 200);
    assert_eq!(status_of(&dir.ops_url("/primary")), 200);
    let ready = daemon
        .notifications
        .iter()
        .find(|n| n.contains("READY=1"))
        .unwrap();
    assert!(ready.contains("STATUS=serving as active"), "{ready}");

    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "stderr: {}", daemon.stderr());
    assert!(
        daemon.wait_notification("STOPPING=1", Duration::from_secs(1)),
        "{:?}",
        daemon.notifications
    );
    assert!(port_is_free(dir.ops_port), "the ops port is released");

    // The run is recorded from start to stop.
    let mut conn = db.connect();
    let runs = kunpay::db::recent_runs(&mut conn, "test-node", 5).unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].ready_at.is_some());
    assert_eq!(
        runs[0].stop_reason.as_deref(),
        Some("SIGTERM; drained cleanly")
    );
}

#[test]
fn an_unreachable_database_fails_start_with_one_line_and_no_readiness() {
    let dir = DaemonDir::new();
    let dead_port = free_port();
    dir.write_config(
        &format!("postgres://kunpay@127.0.0.1:{dead_port}/kunpay"),
        "active",
        "",
    );
    let mut daemon = Daemon::spawn(&dir);
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("gives up");
    assert_eq!(status.code(), Some(1));
    assert!(
        !daemon.wait_notification("READY=1", Duration::from_millis(300)),
        "never announced ready"
    );
    let stderr = daemon.stderr();
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with(&format!("kunpayd: cannot connect to the database at postgres://kunpay@127.0.0.1:{dead_port}/kunpay:")),
        "{stderr}"
    );
    assert!(port_is_free(dir.ops_port), "nothing is left listening");
}

#[test]
fn a_port_in_use_fails_start_naming_the_address_and_key() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let _holder = TcpListener::bind(("127.0.0.1", dir.ops_port)).unwrap();
    let mut daemon = Daemon::spawn(&dir);
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("gives up");
    assert_eq!(status.code(), Some(1));
    let stderr = daemon.stderr();
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with(&format!(
            "kunpayd: cannot listen on 127.0.0.1:{} (ops.listen): ",
            dir.ops_port
        )),
        "{stderr}"
    );
    assert!(last.contains("another process holds it"), "{stderr}");
    // Start-up stopped before the database: no run was recorded.
    let count: i64 = {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = db.connect();
        diesel::sql_query(
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'node_run'",
        )
        .get_result::<N>(&mut conn)
        .unwrap()
        .n
    };
    assert_eq!(count, 0, "the database was not touched");
}

#[test]
fn a_world_readable_key_stops_the_daemon_before_it_binds() {
    use std::os::unix::fs::PermissionsExt as _;
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let key = dir.path().join("keys/node-sign.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let mut daemon = Daemon::spawn(&dir);
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("gives up");
    assert_eq!(status.code(), Some(1));
    let stderr = daemon.stderr();
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("kunpayd: loading keys.sign_private: "),
        "{stderr}"
    );
    assert!(
        last.contains(&key.display().to_string()) && last.contains("chmod"),
        "{stderr}"
    );
    assert!(port_is_free(dir.ops_port));
}

/// The in-flight request: /health reads this node's run row, so holding an exclusive lock on
/// node_run keeps a /health request waiting inside the daemon.
#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "[lifecycle]\ndrain_timeout = \"20s\"\n");
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace("[database]", "[database]\nstatement_timeout = \"60s\"")
            .replace("[ops]", "[ops]\nhealth_timeout = \"30s\""),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();

    let mut locker = db.connect();
    locker
        .batch_execute("BEGIN; LOCK TABLE node_run IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let url = dir.ops_url("/health");
    let in_flight = std::thread::spawn(move || http_get(&url));
    // Wait until the request is inside the daemon (the metric counts it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(&dir.ops_url("/metrics")).unwrap();
        if metrics.contains("kunpay_http_requests_in_flight{listener=\"ops\"} 2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the /health request never arrived:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_notification("STOPPING=1", Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon.wait_exit(Duration::from_millis(10)).is_none(),
        "kunpayd must wait for the request"
    );
    assert!(
        http_get(&dir.ops_url("/readiness")).is_err(),
        "no new connections are accepted while draining"
    );

    locker.batch_execute("COMMIT").unwrap();
    let (status, body) = in_flight
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(status, 200, "{body}");
    let exit = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("exits after the drain");
    assert_eq!(exit.code(), Some(0), "stderr: {}", daemon.stderr());
}

#[test]
fn requests_still_running_at_the_drain_deadline_are_cut_off_and_reported() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "[lifecycle]\ndrain_timeout = \"1s\"\n");
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace("[ops]", "[ops]\nhealth_timeout = \"30s\""),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    let mut locker = db.connect();
    locker
        .batch_execute("BEGIN; LOCK TABLE node_run IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let url = dir.ops_url("/health");
    let in_flight = std::thread::spawn(move || http_get(&url));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let exit = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("the deadline is enforced");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        exit.code(),
        Some(1),
        "cutting off a request is not a clean stop"
    );
    assert!(
        daemon.stderr().contains("request(s) abandoned") || daemon.stderr().contains("cut off"),
        "{}",
        daemon.stderr()
    );
    locker.batch_execute("COMMIT").unwrap();
    assert!(
        in_flight.join().unwrap().is_err(),
        "the cut-off request got no answer"
    );
}

#[test]
fn sighup_applies_the_new_role_and_rejects_a_broken_file_keeping_the_old_one() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    assert_eq!(status_of(&dir.ops_url("/primary")), 200);
    assert_eq!(status_of(&dir.ops_url("/standby")), 503);

    dir.write_config(db.url(), "standby", "");
    daemon.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&dir.ops_url("/standby")) != 200 {
        assert!(
            Instant::now() < deadline,
            "role change not applied: {}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_of(&dir.ops_url("/primary")), 503);

    std::fs::write(dir.config_path(), "[node]\nrole = \"primary\"\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(&dir.ops_url("/metrics")).unwrap();
        if metrics.contains("kunpay_config_reloads_total{result=\"rejected\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rejection not counted:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        status_of(&dir.ops_url("/standby")),
        200,
        "the previous configuration stays in force"
    );
    assert!(
        daemon.stderr().contains("reload rejected"),
        "{}",
        daemon.stderr()
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn watchdog_pings_are_sent_when_systemd_asks_for_them() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn_with(&dir, |command| {
        command.env("WATCHDOG_USEC", "400000");
    });
    daemon.wait_ready();
    assert!(
        daemon.wait_notification("WATCHDOG=1", Duration::from_secs(5)),
        "{:?}",
        daemon.notifications
    );
}

#[test]
fn started_as_root_it_drops_privileges_and_hardens_the_process() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (CI runs as root)");
        return;
    }
    let db = TestDb::new();
    let dir = DaemonDir::new();
    dir.write_config(db.url(), "active", "");
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap()
    };
    let uid = nobody.uid.as_raw().to_string();
    let gid = nobody.gid.as_raw().to_string();
    assert_eq!(
        field("Uid:"),
        vec![uid.clone(), uid.clone(), uid.clone(), uid]
    );
    assert_eq!(
        field("Gid:"),
        vec![gid.clone(), gid.clone(), gid.clone(), gid]
    );
    assert!(
        field("Groups:").is_empty(),
        "supplementary groups are cleared"
    );
    assert_eq!(field("Umask:"), vec!["0077".to_string()]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    // Not dumpable: the kernel makes the files in /proc/PID owned by root instead of the
    // process's uid, so nobody else running as `nobody` can read its memory or environment.
    use std::os::unix::fs::MetadataExt as _;
    let proc_owner = std::fs::metadata(format!("/proc/{}/environ", daemon.pid()))
        .unwrap()
        .uid();
    assert_eq!(proc_owner, 0, "PR_SET_DUMPABLE is 0");
    assert!(daemon.stderr().contains("dropped root privileges"));
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn secrets_never_reach_the_log() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    let password_file = dir.path().join("db-password");
    std::fs::write(&password_file, "Sup3r-s3cret-pw\n").unwrap();
    std::fs::set_permissions(
        &password_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    dir.write_config(db.url(), "active", "");
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace(
            "[database]",
            &format!(
                "[database]\npassword_file = \"{}\"",
                password_file.display()
            ),
        )
        .replace("level = \"info\"", "level = \"debug\""),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(20)).unwrap();
    let log = daemon.stderr();
    assert!(log.contains("kunpayd ready"), "{log}");
    assert!(
        !log.contains("Sup3r-s3cret-pw"),
        "the database password leaked:\n{log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "key material leaked:\n{log}");
}
