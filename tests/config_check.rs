//! `kunpayd --check-config` and `kunpayctl check-config`: every error named with file, line,
//! key and reason; non-zero exit; nothing started.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::*;

#[test]
fn a_valid_configuration_passes_both_checkers() {
    let dir = DaemonDir::new();
    dir.write_config("postgres://kunpay@127.0.0.1:5432/kunpay", "active", "");
    let (code, stdout, stderr) = run(kunpayd()
        .arg("--config")
        .arg(dir.config_path())
        .arg("--check-config"));
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("configuration is valid"));
    let (code, _, stderr) = run(kunpayctl()
        .arg("check-config")
        .arg("--config")
        .arg(dir.config_path()));
    assert_eq!(code, 0, "stderr: {stderr}");
}

#[test]
fn every_error_is_listed_with_file_line_key_and_reason() {
    let dir = DaemonDir::new();
    dir.write_config(
        "postgres://kunpay@127.0.0.1:5432/kunpay",
        "leader",
        "[lifecycle]\ndrain_timeout = \"30\"\nretries = 3\n",
    );
    let (code, stdout, stderr) = run(kunpayd()
        .arg("--config")
        .arg(dir.config_path())
        .arg("--check-config"));
    assert_eq!(code, 2, "a bad configuration exits 2; stdout: {stdout}");
    let file = dir.config_path().display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "one line per problem: {stderr}");
    assert_eq!(
        lines[0],
        format!("{file}:3: node.role: \"leader\" is not a role; use \"active\" or \"standby\"")
    );
    assert!(lines[1].starts_with(&format!("{file}:")), "{stderr}");
    assert!(
        lines[1].contains("lifecycle.drain_timeout: \"30\" has no unit"),
        "{stderr}"
    );
    assert!(
        lines[2].contains("lifecycle.retries: unknown key; known here: drain_timeout"),
        "{stderr}"
    );
}

#[test]
fn sizes_and_durations_take_units() {
    let dir = DaemonDir::new();
    dir.write_config(
        "postgres://kunpay@127.0.0.1:5432/kunpay",
        "active",
        "[lifecycle]\ndrain_timeout = \"1500ms\"\n",
    );
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace("level = \"info\"", "level = \"info\"\nmax_line = \"16KiB\""),
    )
    .unwrap();
    let (code, _, stderr) = run(kunpayd()
        .arg("--config")
        .arg(dir.config_path())
        .arg("--check-config"));
    assert_eq!(code, 0, "{stderr}");

    std::fs::write(
        dir.config_path(),
        std::fs::read_to_string(dir.config_path())
            .unwrap()
            .replace("\"16KiB\"", "\"16\""),
    )
    .unwrap();
    let (code, _, stderr) = run(kunpayd()
        .arg("--config")
        .arg(dir.config_path())
        .arg("--check-config"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("log.max_line: \"16\" has no unit"),
        "{stderr}"
    );
}

#[test]
fn a_private_key_readable_by_others_is_refused_with_the_fix() {
    let dir = DaemonDir::new();
    dir.write_config("postgres://kunpay@127.0.0.1:5432/kunpay", "active", "");
    let key = dir.path().join("keys/node-sign.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = run(kunpayd()
        .arg("--config")
        .arg(dir.config_path())
        .arg("--check-config"));
    assert_eq!(code, 2);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("keys.sign_private"), "{stderr}");
    assert!(stderr.contains(&key.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("chmod"),
        "the message says how to fix it: {stderr}"
    );
}

#[test]
fn a_missing_file_and_broken_toml_are_named() {
    let (code, _, stderr) =
        run(kunpayd().args(["--config", "/nonexistent/kunpay.toml", "--check-config"]));
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("/nonexistent/kunpay.toml: cannot read the configuration file"),
        "{stderr}"
    );

    let dir = DaemonDir::new();
    std::fs::write(
        dir.config_path(),
        "[ops]\nlisten = \"127.0.0.1:1\"\n[database\n",
    )
    .unwrap();
    let (code, _, stderr) = run(kunpayd()
        .arg("--config")
        .arg(dir.config_path())
        .arg("--check-config"));
    assert_eq!(code, 2);
    assert!(stderr.contains(":3: not valid TOML"), "{stderr}");
}

#[test]
fn the_shipped_example_configuration_is_valid_and_complete() {
    // packaging/kunpay.toml documents every key; it must parse with no unknown key, and every
    // key it sets must appear in docs/configuration.md.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("packaging/kunpay.toml")).unwrap();
    let parsed = kunpay::config::Config::parse(
        &root.join("packaging/kunpay.toml"),
        example.clone(),
        kunpay::config::Mode::Production,
    );
    assert!(parsed.is_ok(), "{}", parsed.unwrap_err());
    let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in example.lines() {
        let line = line.trim_start_matches('#').trim();
        if line.starts_with('[') && line.ends_with(']') {
            section = line.trim_matches(['[', ']']).to_string();
            // Institution sections are documented once, as institutions.ID.
            if let Some(rest) = section.strip_prefix("institutions.") {
                assert!(!rest.contains('.'), "{section}");
                section = "institutions.ID".to_string();
            }
        } else if let Some((key, _)) = line.split_once(" = ")
            && !key.contains(' ')
            && !section.is_empty()
        {
            keys.push(format!("{section}.{key}"));
        }
    }
    assert!(
        keys.len() >= 20,
        "the example lists every key, found only {keys:?}"
    );
    for key in keys {
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/configuration.md does not document `{key}`"
        );
    }
}

#[test]
fn the_audit_key_is_checked_like_the_signing_key() {
    let dir = DaemonDir::new();
    let key = dir.path().join("keys/audit-sign.pem");
    kunpay::crypto::keyfile::write_private_key(
        &key,
        &kunpay::crypto::sm2::PrivateKey::generate().unwrap(),
        None,
    )
    .unwrap();
    dir.write_config(
        "postgres://kunpay@127.0.0.1:5432/kunpay",
        "active",
        &format!(
            "[audit]\ndir = \"{}\"\nsign_private = \"{}\"\nkey_id = \"node-a-audit-1\"\n",
            dir.path().join("audit").display(),
            key.display()
        ),
    );
    let check = || {
        run(kunpayd()
            .arg("--config")
            .arg(dir.config_path())
            .arg("--check-config"))
    };
    let (code, _, stderr) = check();
    assert_eq!(code, 0, "{stderr}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, stderr) = check();
    assert_eq!(code, 2);
    assert!(stderr.contains("audit.sign_private"), "{stderr}");
    assert!(
        stderr.contains("chmod"),
        "the message says how to fix it: {stderr}"
    );
}
