//! The daemon with `[risk]`: the rule set is loaded before it serves (a broken one stops the
//! start, exit 2, naming file and line), its version is in /metrics, a broken edit is refused
//! while the running set stays, a good edit and SIGHUP reload it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn copy_library(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/risk");
    for sub in ["", "rules", "lists"] {
        let dir = to.join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        // The daemon reads them after dropping to an unprivileged account.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let target = dir.join(path.file_name().unwrap());
                std::fs::copy(&path, &target).unwrap();
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
    }
}

fn metric(dir: &DaemonDir, prefix: &str) -> Option<String> {
    let (_, text) = http_get(&dir.ops_url("/metrics")).ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The line of the active version: `kunpay_risk_ruleset{version="..."} 1`.
fn active_version(dir: &DaemonDir) -> Option<String> {
    let (_, text) = http_get(&dir.ops_url("/metrics")).ok()?;
    text.lines()
        .filter(|l| l.starts_with("kunpay_risk_ruleset{") && l.ends_with(" 1"))
        .map(str::to_string)
        .next()
}

#[test]
fn rules_load_at_start_reload_on_change_and_sighup_and_a_broken_edit_is_refused() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    let risk = dir.path().join("risk");
    copy_library(&risk);
    dir.write_config(
        db.url(),
        "active",
        &format!("\n[risk]\ndir = \"{}\"\n", risk.display()),
    );
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    assert!(wait_for(Duration::from_secs(5), || active_version(&dir).is_some()));
    let first = active_version(&dir).unwrap();
    assert!(first.contains("version=\"expert-2026.11+"), "{first}");

    let local = risk.join("rules/20-local.toml");
    std::fs::write(
        &local,
        "[[rule]]\nid = \"LOCAL-1\"\ndescription = \"d\"\nversion = 1\nwhen = \"amout_fen > 1\"\naction = \"review\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || metric(
            &dir,
            "kunpay_risk_reload_failures "
        )
        .is_some_and(|l| l.ends_with(" 1"))),
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        active_version(&dir).unwrap(),
        first,
        "the running set stays"
    );
    let logged = daemon.stderr();
    assert!(
        logged.contains("rules/20-local.toml:5") && logged.contains("unknown variable `amout_fen`"),
        "{logged}"
    );

    std::fs::write(
        &local,
        "[[rule]]\nid = \"LOCAL-1\"\ndescription = \"d\"\nversion = 1\nwhen = \"amount_fen > 1\"\naction = \"review\"\n",
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(10), || active_version(&dir)
        .is_some_and(|v| v != first)));
    let reloads = || {
        metric(&dir, "kunpay_risk_reloads ")
            .and_then(|l| l.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()))
            .unwrap_or(0)
    };
    let before = reloads();
    assert!(before >= 1);
    daemon.signal(Signal::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || reloads() > before));
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_broken_rule_set_stops_the_start_and_says_where() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    let risk = dir.path().join("risk");
    copy_library(&risk);
    let broken = risk.join("rules/20-broken.toml");
    std::fs::write(
        &broken,
        "[[rule]]\nid = \"B-1\"\ndescription = \"d\"\nversion = 1\nwhen = \"amount_fen >\"\naction = \"review\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir.write_config(
        db.url(),
        "active",
        &format!("\n[risk]\ndir = \"{}\"\n", risk.display()),
    );
    let mut daemon = Daemon::spawn(&dir);
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("it stops");
    assert_eq!(
        status.code(),
        Some(2),
        "a configuration error: {}",
        daemon.stderr()
    );
    let said = daemon.stderr();
    assert!(said.contains("rules/20-broken.toml:5"), "{said}");
    assert!(said.contains("does not compile"), "{said}");
}
