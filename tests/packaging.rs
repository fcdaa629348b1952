//! Packaging: the glibc 2.28 release binaries (x86_64 and aarch64), the systemd units, the RPMs
//! and what installing, upgrading and removing them does to a machine.
//!
//! These tests check artifacts that `make test` builds first (`make rpm`: cross/build.sh for
//! both architectures, then packaging/build-rpm.sh). Run alone, they fail and say which make
//! target to run; they are never skipped silently. They need root (the install test chroots
//! into a scratch root to run the packages' scriptlets), as CI and the build machines have.
//! The test that boots a real systemd needs root too and PostgreSQL; it is skipped, saying why,
//! only where the machine cannot boot one (no namespaces, no cgroup2).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The bound the issue sets on `systemd-analyze security` for our units.
const MAX_EXPOSURE: f64 = 1.5;

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (run `make rpm-deps`)"))
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Arch {
    rpm_arch: &'static str,
    triple: &'static str,
    elf_machine: &'static str,
    make_target: &'static str,
}

const AARCH64: Arch = Arch {
    rpm_arch: "aarch64",
    triple: "aarch64-unknown-linux-gnu",
    elf_machine: "AArch64",
    make_target: "aarch64",
};
const X86_64: Arch = Arch {
    rpm_arch: "x86_64",
    triple: "x86_64-unknown-linux-gnu",
    elf_machine: "Advanced Micro Devices X86-64",
    make_target: "x86_64",
};

impl Arch {
    fn binary(&self, name: &str) -> PathBuf {
        let path = repo(&format!("target/{}/release/{name}", self.triple));
        assert!(
            path.exists(),
            "{} is missing: run `make {}` (or `make test`, which builds it first)",
            path.display(),
            self.make_target
        );
        path
    }

    /// How to run one of its binaries on this machine.
    fn command(&self, binary: &Path) -> Command {
        if self.rpm_arch == "aarch64" {
            // `-L /`: the multiarch aarch64 libc and libpq5:arm64 under /lib/aarch64-linux-gnu.
            // (-L /usr/aarch64-linux-gnu hangs: its ld.so does not match the libc found.)
            let mut cmd = Command::new("qemu-aarch64");
            cmd.arg("-L").arg("/").arg(binary);
            cmd
        } else {
            Command::new(binary)
        }
    }

    fn rpm(&self, dir: &Path, name: &str, release: u32) -> PathBuf {
        let path = dir.join(format!("{name}-{VERSION}-{release}.{}.rpm", self.rpm_arch));
        assert!(
            path.exists(),
            "{} is missing: run `make rpm` (or `make test`, which builds it first)",
            path.display()
        );
        path
    }
}

// ---------------------------------------------------------------------------------------------
// The binaries

/// "GLIBC_2.17" -> (2, 17)
fn glibc_version(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("GLIBC_")?;
    let mut parts = rest.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

/// The symbol versions a binary requires (its .gnu.version_r), read with readelf, which reads
/// any architecture's ELF.
fn required_versions(binary: &Path) -> Vec<String> {
    let text = ok(Command::new("readelf").arg("-V").arg("-W").arg(binary));
    let mut versions = Vec::new();
    let mut in_needs = false;
    for line in text.lines() {
        if line.starts_with("Version needs section") {
            in_needs = true;
        } else if line.starts_with("Version ") {
            in_needs = false;
        } else if in_needs {
            if let Some(i) = line.find("Name: ") {
                let name = line[i + 6..].split_whitespace().next().unwrap_or("");
                versions.push(name.to_string());
            }
        }
    }
    assert!(
        !versions.is_empty(),
        "readelf -V found no version needs in {}",
        binary.display()
    );
    versions
}

fn needed_libraries(binary: &Path) -> Vec<String> {
    let text = ok(Command::new("readelf").arg("-d").arg("-W").arg(binary));
    text.lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            let end = l.rfind(']')?;
            Some(l[start..end].to_string())
        })
        .collect()
}

fn check_release_binary(arch: &Arch, name: &str) {
    let binary = arch.binary(name);
    let header = ok(Command::new("readelf").arg("-h").arg(&binary));
    let machine = header
        .lines()
        .find(|l| l.trim_start().starts_with("Machine:"))
        .unwrap_or_default();
    assert!(
        machine.contains(arch.elf_machine),
        "{}: ELF machine is {machine:?}, expected {}",
        binary.display(),
        arch.elf_machine
    );

    // Kylin V10 and openEuler 20.03 have glibc 2.28: nothing newer may be required.
    let versions = required_versions(&binary);
    let too_new: Vec<&String> = versions
        .iter()
        .filter(|v| glibc_version(v).is_some_and(|v| v > (2, 28)))
        .collect();
    assert!(
        too_new.is_empty(),
        "{} requires glibc symbol versions above GLIBC_2.28: {too_new:?}",
        binary.display()
    );
    assert!(
        versions.iter().any(|v| v.starts_with("GLIBC_")),
        "{}: no GLIBC_ version needs at all: {versions:?} (is it static?)",
        binary.display()
    );
    // OpenSSL is compiled in (the targets have OpenSSL 1.1.1, not 3).
    assert!(
        !versions.iter().any(|v| v.starts_with("OPENSSL_")),
        "{} links the system OpenSSL: {versions:?}",
        binary.display()
    );

    let needed = needed_libraries(&binary);
    assert!(
        !needed
            .iter()
            .any(|l| l.starts_with("libssl") || l.starts_with("libcrypto")),
        "{} needs a shared OpenSSL: {needed:?}",
        binary.display()
    );
    if name == "kunpayd" || name == "kunpayctl" {
        // libpq stays dynamic so openGauss's own libpq.so.5 can be loaded in its place.
        assert!(
            needed.iter().any(|l| l == "libpq.so.5"),
            "{} does not load libpq.so.5 dynamically: {needed:?}",
            binary.display()
        );
    }
}

fn check_runs(arch: &Arch) {
    let kunpayd = arch.binary("kunpayd");
    let version = ok(arch.command(&kunpayd).arg("--version"));
    assert_eq!(version.trim(), format!("kunpayd {VERSION}"));

    let out = run(arch.command(&kunpayd).arg("--self-test"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("self-test passed"),
        "kunpayd --self-test ({}) failed: {}\n{}{}",
        arch.rpm_arch,
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );

    let kunpayctl = arch.binary("kunpayctl");
    let version = ok(arch.command(&kunpayctl).arg("--version"));
    assert!(
        version.trim().ends_with(VERSION),
        "kunpayctl --version: {version}"
    );
}

#[test]
fn aarch64_release_binaries_target_glibc_2_28_with_vendored_openssl_and_dynamic_libpq() {
    check_release_binary(&AARCH64, "kunpayd");
    check_release_binary(&AARCH64, "kunpayctl");
}

#[test]
fn aarch64_kunpayd_runs_its_self_test_under_qemu() {
    check_runs(&AARCH64);
}

#[test]
fn x86_64_release_binaries_target_glibc_2_28_with_vendored_openssl_and_dynamic_libpq() {
    check_release_binary(&X86_64, "kunpayd");
    check_release_binary(&X86_64, "kunpayctl");
}

#[test]
fn x86_64_release_kunpayd_runs_its_self_test() {
    check_runs(&X86_64);
}

#[test]
fn glibc_version_parsing() {
    assert_eq!(glibc_version("GLIBC_2.28"), Some((2, 28)));
    assert_eq!(glibc_version("GLIBC_2.3.4"), Some((2, 3)));
    assert!(glibc_version("GLIBC_2.34").unwrap() > (2, 28));
    assert!(glibc_version("GLIBC_2.3").unwrap() < (2, 28));
    assert_eq!(glibc_version("GCC_3.0"), None);
}

// ---------------------------------------------------------------------------------------------
// The systemd units

/// `systemd-analyze security --offline=true` of a unit file (drop-ins beside it are read too).
fn exposure(unit: &Path) -> f64 {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit));
    let text = String::from_utf8_lossy(&out.stdout);
    parse_exposure(&text).unwrap_or_else(|| {
        panic!(
            "no overall exposure level in systemd-analyze's output for {} ({}):\n{text}\n{}",
            unit.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn parse_exposure(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let after = line.rsplit_once(": ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn exposure_parsing() {
    let text =
        "✗ PrivateNetwork= ...   0.5\n\n→ Overall exposure level for kunpayd.service: 1.1 OK 🙂\n";
    assert_eq!(parse_exposure(text), Some(1.1));
    assert_eq!(
        parse_exposure("→ Overall exposure level for x.service: 9.6 UNSAFE 😨"),
        Some(9.6)
    );
    assert_eq!(parse_exposure("nothing"), None);
}

/// A copy of a unit (without its drop-ins) in a directory of its own.
fn unit_alone(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::copy(repo(&format!("systemd/{name}")), &path).unwrap();
    (dir, path)
}

#[test]
fn kunpayd_unit_exposure_is_at_most_1_5_with_systemd_249_directives_alone() {
    let (_dir, unit) = unit_alone("kunpayd.service");
    let score = exposure(&unit);
    eprintln!("systemd-analyze security kunpayd.service (base unit): {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "kunpayd.service exposure {score} > {MAX_EXPOSURE}"
    );
}

/// The packaged drop-in holds only settings systemd 249 ignores (every line needs a newer
/// systemd, see `base_units_use_only_directives_systemd_249_understands`), and no version of
/// `systemd-analyze security` has a check for any of them (MemoryKSM=, ProtectControlGroups=strict,
/// PrivateTmp=disconnected): the checks the unit still fails (root directory, address families,
/// private network, device list, IP allow list) are all about settings 249 already has. So the
/// drop-in cannot lower the number; it must never raise it. What lowers it is the site's IP allow
/// list, next test.
#[test]
fn kunpayd_unit_with_the_newer_systemd_drop_in_is_no_more_exposed() {
    let (_dir, alone) = unit_alone("kunpayd.service");
    let base = exposure(&alone);
    // The repository's layout is the installed one: systemd/kunpayd.service.d/ beside the unit.
    let with_drop_in = exposure(&repo("systemd/kunpayd.service"));
    eprintln!("systemd-analyze security kunpayd.service: base {base}, with drop-in {with_drop_in}");
    assert!(with_drop_in <= base);
    assert!(with_drop_in <= MAX_EXPOSURE);
}

#[test]
fn kunpayd_unit_with_the_site_network_drop_in_is_less_exposed() {
    let (dir, alone) = unit_alone("kunpayd.service");
    let base = exposure(&alone);
    // As a site installs the example: /etc/systemd/system/kunpayd.service.d/60-network.conf.
    let drop_ins = dir.path().join("kunpayd.service.d");
    fs::create_dir(&drop_ins).unwrap();
    fs::copy(
        repo("systemd/kunpayd-network.conf.example"),
        drop_ins.join("60-network.conf"),
    )
    .unwrap();
    let with_network = exposure(&alone);
    eprintln!(
        "systemd-analyze security kunpayd.service: base {base}, with the network drop-in {with_network}"
    );
    assert!(with_network < base, "{with_network} is not below {base}");
    assert!(with_network <= MAX_EXPOSURE);
}

#[test]
fn the_exposure_test_can_fail() {
    // The same analysis of an unhardened unit must land far above the bound, or the checks
    // above would pass whatever the units say.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("plain.service");
    fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let score = exposure(&unit);
    assert!(score > 5.0, "an unhardened unit scored {score}");
}

#[test]
fn coresim_unit_exposure_is_at_most_1_5() {
    let (_dir, unit) = unit_alone("kunpay-coresim.service");
    let score = exposure(&unit);
    eprintln!("systemd-analyze security kunpay-coresim.service: {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "kunpay-coresim.service exposure {score}"
    );
}

/// `[Section] Key=value` pairs of a unit file, in order.
fn directives(path: &Path) -> Vec<(String, String, String)> {
    let text = fs::read_to_string(path).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=value");
        out.push((section.clone(), key.trim().into(), value.trim().into()));
    }
    out
}

/// The systemd version that introduced each directive our units may use (systemd's NEWS and
/// systemd.directives(7)). A directive missing here fails the test: look its version up and
/// add it, so nothing newer than 249 slips into the base units.
const DIRECTIVE_SINCE: &[(&str, u32)] = &[
    ("Description", 1),
    ("Documentation", 1),
    ("Wants", 1),
    ("After", 1),
    ("StartLimitIntervalSec", 230),
    ("StartLimitBurst", 1),
    ("Type", 1),
    ("NotifyAccess", 1),
    ("ExecStart", 1),
    ("ExecReload", 1),
    ("WatchdogSec", 1),
    ("Restart", 1),
    ("RestartSec", 1),
    ("RestartPreventExitStatus", 189),
    ("SuccessExitStatus", 189),
    ("RestartForceExitStatus", 189),
    ("TimeoutStartSec", 188),
    ("TimeoutStopSec", 1),
    ("KillMode", 1),
    ("User", 1),
    ("Group", 1),
    ("ConfigurationDirectory", 235),
    ("ConfigurationDirectoryMode", 235),
    ("StateDirectory", 235),
    ("StateDirectoryMode", 235),
    ("LogsDirectory", 235),
    ("LogsDirectoryMode", 235),
    ("WorkingDirectory", 1),
    ("UMask", 1),
    ("LimitNOFILE", 1),
    ("LimitCORE", 1),
    ("LoadCredential", 247),
    ("IPAddressDeny", 235),
    ("IPAddressAllow", 235),
    ("NoNewPrivileges", 187),
    ("CapabilityBoundingSet", 1),
    ("AmbientCapabilities", 229),
    ("SecureBits", 1),
    ("ProtectSystem", 214),
    ("ProtectHome", 214),
    ("PrivateTmp", 1),
    ("PrivateDevices", 209),
    ("DevicePolicy", 1),
    ("PrivateUsers", 232),
    ("PrivateIPC", 248),
    ("PrivateMounts", 239),
    ("ProtectKernelTunables", 232),
    ("ProtectKernelModules", 232),
    ("ProtectKernelLogs", 244),
    ("ProtectControlGroups", 232),
    ("ProtectClock", 245),
    ("ProtectHostname", 242),
    ("ProtectProc", 247),
    ("ProcSubset", 247),
    ("RestrictNamespaces", 233),
    ("RestrictRealtime", 231),
    ("RestrictSUIDSGID", 242),
    ("LockPersonality", 235),
    ("MemoryDenyWriteExecute", 231),
    ("RemoveIPC", 232),
    ("KeyringMode", 235),
    ("RestrictAddressFamilies", 211),
    ("SystemCallArchitectures", 209),
    ("SystemCallFilter", 187),
    ("SystemCallErrorNumber", 187),
    ("WantedBy", 1),
    // Only in the newer drop-in:
    ("MemoryKSM", 254),
];

/// Values that need a newer systemd than their directive does.
const VALUE_SINCE: &[(&str, &str, u32)] = &[
    ("ProtectControlGroups", "strict", 257),
    ("PrivateTmp", "disconnected", 257),
];

/// Newer values that are weaker than the base unit's setting: a drop-in must not use them.
/// ProtectHostname=private (258) keeps the UTS namespace but allows sethostname() in it, which
/// ProtectHostname=yes refuses.
const WEAKER_VALUES: &[(&str, &str)] = &[("ProtectHostname", "private")];

fn needs_systemd(key: &str, value: &str) -> u32 {
    let base = DIRECTIVE_SINCE
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("{key}= is not in DIRECTIVE_SINCE: look up its version"))
        .1;
    let value_since = VALUE_SINCE
        .iter()
        .find(|(k, v, _)| *k == key && *v == value)
        .map(|(_, _, since)| *since)
        .unwrap_or(0);
    base.max(value_since)
}

#[test]
fn base_units_use_only_directives_systemd_249_understands() {
    for unit in ["kunpayd.service", "kunpay-coresim.service"] {
        for (_, key, value) in directives(&repo(&format!("systemd/{unit}"))) {
            let since = needs_systemd(&key, &value);
            assert!(since <= 249, "{unit}: {key}={value} needs systemd {since}");
        }
    }
    // The drop-in exists for what the base cannot have: every line needs a newer systemd.
    for (_, key, value) in directives(&repo("systemd/kunpayd.service.d/50-hardening-newer.conf")) {
        let since = needs_systemd(&key, &value);
        assert!(
            since > 249,
            "50-hardening-newer.conf: {key}={value} works on 249 (since {since}): move it to the unit"
        );
        assert!(
            !WEAKER_VALUES.contains(&(key.as_str(), value.as_str())),
            "50-hardening-newer.conf: {key}={value} is weaker than the unit's own setting"
        );
    }
    // The site's network drop-in must work on the oldest systemd a bank runs.
    for (_, key, value) in directives(&repo("systemd/kunpayd-network.conf.example")) {
        let since = needs_systemd(&key, &value);
        assert!(
            since <= 243,
            "kunpayd-network.conf.example: {key}={value} needs systemd {since}"
        );
    }
}

/// The credentials kunpayd understands: configuration key, credential name.
const CREDENTIALS: &[(&str, &str)] = &[
    ("keys.sign_passphrase_credential", "node-sign-passphrase"),
    (
        "keys.encrypt_passphrase_credential",
        "node-encrypt-passphrase",
    ),
    ("audit.sign_passphrase_credential", "audit-sign-passphrase"),
    ("database.password_credential", "db-password"),
    ("core.amqp.password_credential", "amqp-password"),
    ("core.amqp.mac_key_credential", "core-mac-key"),
    ("ha.source_password_credential", "cdc-password"),
];

/// systemd refuses to start a unit whose LoadCredential= source is missing: every source the
/// unit names must be created by the package (tmpfiles.d at boot, %post at install), and every
/// credential the configuration reader knows must be loaded by the unit.
#[test]
fn the_unit_loads_every_credential_and_the_package_creates_every_source() {
    let loaded: Vec<(String, String)> = directives(&repo("systemd/kunpayd.service"))
        .into_iter()
        .filter(|(_, key, _)| key == "LoadCredential")
        .map(|(_, _, value)| {
            let (name, path) = value.split_once(':').expect("LoadCredential=NAME:PATH");
            (name.to_string(), path.to_string())
        })
        .collect();
    let mut names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let mut expected: Vec<&str> = CREDENTIALS.iter().map(|(_, n)| *n).collect();
    expected.sort();
    assert_eq!(names, expected, "the unit's LoadCredential= names");

    let tmpfiles = fs::read_to_string(repo("systemd/kunpay.tmpfiles")).unwrap();
    assert!(tmpfiles.contains("d /etc/kunpay/credentials 0700 root root -"));
    let spec = fs::read_to_string(repo("packaging/kunpay.spec")).unwrap();
    let spec_names: Vec<&str> = spec
        .lines()
        .find_map(|l| l.strip_prefix("%global kunpay_credentials "))
        .expect("%global kunpay_credentials in the spec")
        .split_whitespace()
        .collect();
    let config = fs::read_to_string(repo("packaging/kunpay.toml")).unwrap();
    let reference = fs::read_to_string(repo("docs/configuration.md")).unwrap();
    for (name, path) in &loaded {
        assert_eq!(path, &format!("/etc/kunpay/credentials/{name}"));
        let line = format!("f {path} 0600 root root -");
        assert!(tmpfiles.contains(&line), "kunpay.tmpfiles lacks {line:?}");
        assert!(
            spec_names.contains(&name.as_str()),
            "%global kunpay_credentials lacks {name}"
        );
    }
    assert_eq!(spec_names.len(), loaded.len(), "{spec_names:?}");
    for (key, name) in CREDENTIALS {
        // The packaged configuration shows each (commented out), with the unit's name.
        let leaf = key.rsplit('.').next().unwrap();
        let shown = [
            format!("#{leaf} = \"{name}\""),
            format!("# {leaf} = \"{name}\""),
        ];
        assert!(
            shown.iter().any(|s| config.contains(s.as_str())),
            "packaging/kunpay.toml does not show {key} = \"{name}\""
        );
        assert!(
            reference.contains(&format!("`{key}`")) && reference.contains(&format!("`{name}`")),
            "docs/configuration.md does not name {key} with {name}"
        );
    }
}

#[test]
fn kunpayd_unit_matches_the_daemons_contract() {
    let d = directives(&repo("systemd/kunpayd.service"));
    let get = |key: &str| -> Vec<String> {
        d.iter()
            .filter(|(_, k, _)| k == key)
            .map(|(_, _, v)| v.clone())
            .collect()
    };
    let one = |key: &str| -> String {
        let values = get(key);
        assert_eq!(values.len(), 1, "{key}= must appear once: {values:?}");
        values[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("User"), "kunpay");
    assert_eq!(one("Group"), "kunpay");
    assert_eq!(one("Restart"), "on-failure");
    // kunpayd exits 2 on an invalid configuration (kunpay::daemon::EXIT_CONFIG).
    assert_eq!(
        one("RestartPreventExitStatus"),
        kunpay::daemon::EXIT_CONFIG.to_string()
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(
        one("ExecStart"),
        format!(
            "/usr/bin/kunpayd --config {}",
            kunpay::config::DEFAULT_CONFIG_PATH
        )
    );
    assert_eq!(one("StateDirectory"), "kunpay");
    assert_eq!(one("LogsDirectory"), "kunpay");
    assert_eq!(one("ConfigurationDirectory"), "kunpay");
    let secs = |v: String| humantime::parse_duration(&v).unwrap().as_secs();
    // The drain (lifecycle.drain_timeout, 30s by default) plus recording the stop must fit.
    assert!(secs(one("TimeoutStopSec")) > 30 + 5);
    assert_eq!(secs(one("WatchdogSec")), 30);
    // The sockets kunpayd opens: TCP/IP, and AF_UNIX for /dev/log and the notify socket.
    assert_eq!(one("RestrictAddressFamilies"), "AF_UNIX AF_INET AF_INET6");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("ProtectSystem"), "strict");
}

#[test]
fn sysusers_and_tmpfiles_match_the_package() {
    let sysusers = fs::read_to_string(repo("systemd/kunpay.sysusers")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("g kunpay ")));
    assert!(sysusers.lines().any(|l| l.starts_with("u kunpay ")
        && l.contains("/var/lib/kunpay")
        && l.ends_with("/sbin/nologin")));
    let tmpfiles = fs::read_to_string(repo("systemd/kunpay.tmpfiles")).unwrap();
    assert!(tmpfiles.contains("d /var/lib/kunpay 0750 kunpay kunpay -"));
    assert!(tmpfiles.contains("d /var/log/kunpay 0750 kunpay kunpay -"));
}

// ---------------------------------------------------------------------------------------------
// The RPMs

fn rpm_dir() -> PathBuf {
    repo("target/rpm")
}

#[test]
fn rpmlint_passes_on_the_spec_and_both_architectures() {
    let rpms = [
        X86_64.rpm(&rpm_dir(), "kunpay", 1),
        AARCH64.rpm(&rpm_dir(), "kunpay", 1),
    ];
    let out = ok(Command::new("rpmlint")
        .arg("-c")
        .arg(repo("packaging/rpmlint.toml"))
        .arg(repo("packaging/kunpay.spec"))
        .args(&rpms));
    eprintln!("{out}");
    assert!(out.contains("0 errors, 0 warnings"), "rpmlint: {out}");
}

/// `rpm -qp --dump`: path -> (mode, owner, group, is config)
fn dump(rpm: &Path) -> BTreeMap<String, (u32, String, String, bool)> {
    let text = ok(Command::new("rpm").args(["-qp", "--dump"]).arg(rpm));
    text.lines()
        .map(|l| {
            // path size mtime digest mode owner group isconfig isdoc rdev symlink
            let f: Vec<&str> = l.split_whitespace().collect();
            let mode = u32::from_str_radix(f[4], 8).unwrap();
            (
                f[0].to_string(),
                (mode & 0o7777, f[5].into(), f[6].into(), f[7] == "1"),
            )
        })
        .collect()
}

fn check_payload(arch: &Arch) {
    let rpm = arch.rpm(&rpm_dir(), "kunpay", 1);
    let got = ok(Command::new("rpm")
        .args(["-qp", "--qf", "%{ARCH}"])
        .arg(&rpm));
    assert_eq!(got, arch.rpm_arch);
    let files = dump(&rpm);
    let expect: &[(&str, u32, &str, &str, bool)] = &[
        ("/usr/bin/kunpayd", 0o755, "root", "root", false),
        ("/usr/bin/kunpayctl", 0o755, "root", "root", false),
        ("/usr/bin/kunpay-audit", 0o755, "root", "root", false),
        (
            "/usr/lib/systemd/system/kunpayd.service",
            0o644,
            "root",
            "root",
            false,
        ),
        (
            "/usr/lib/systemd/system/kunpayd.service.d/50-hardening-newer.conf",
            0o644,
            "root",
            "root",
            false,
        ),
        (
            "/usr/lib/sysusers.d/kunpay.conf",
            0o644,
            "root",
            "root",
            false,
        ),
        (
            "/usr/lib/tmpfiles.d/kunpay.conf",
            0o644,
            "root",
            "root",
            false,
        ),
        ("/etc/kunpay", 0o750, "root", "kunpay", false),
        ("/etc/kunpay/kunpay.toml", 0o640, "root", "kunpay", true),
        ("/etc/kunpay/keys", 0o750, "root", "kunpay", false),
        ("/etc/kunpay/credentials", 0o700, "root", "root", false),
        ("/etc/kunpay/tls", 0o750, "root", "kunpay", false),
        ("/etc/kunpay/institutions", 0o750, "root", "kunpay", false),
        ("/etc/kunpay/risk", 0o750, "root", "kunpay", false),
        (
            "/etc/kunpay/risk/strategy.toml",
            0o640,
            "root",
            "kunpay",
            true,
        ),
        (
            "/etc/kunpay/risk/rules/10-expert.toml",
            0o640,
            "root",
            "kunpay",
            true,
        ),
        (
            "/etc/kunpay/risk/lists/00-lists.toml",
            0o640,
            "root",
            "kunpay",
            true,
        ),
        ("/var/lib/kunpay", 0o750, "kunpay", "kunpay", false),
        ("/var/log/kunpay", 0o750, "kunpay", "kunpay", false),
        (
            "/usr/share/doc/kunpay/operations.md",
            0o644,
            "root",
            "root",
            false,
        ),
        (
            "/usr/share/doc/kunpay/configuration.md",
            0o644,
            "root",
            "root",
            false,
        ),
        (
            "/usr/share/doc/kunpay/README.md",
            0o644,
            "root",
            "root",
            false,
        ),
        (
            "/usr/share/doc/kunpay/kunpayd-network.conf.example",
            0o644,
            "root",
            "root",
            false,
        ),
    ];
    for (path, mode, owner, group, config) in expect {
        let got = files
            .get(*path)
            .unwrap_or_else(|| panic!("{}: {path} is not packaged", rpm.display()));
        assert_eq!(
            got,
            &(*mode, owner.to_string(), group.to_string(), *config),
            "{}: {path}",
            rpm.display()
        );
    }
    // The payload's binary is this architecture's.
    let tmp = tempfile::tempdir().unwrap();
    extract(&rpm, tmp.path());
    let header = ok(Command::new("readelf")
        .arg("-h")
        .arg(tmp.path().join("usr/bin/kunpayd")));
    assert!(header.contains(arch.elf_machine), "{header}");

    // What rpm will ask the target for: nothing above glibc 2.28, libpq.so.5, no OpenSSL 3.
    let requires = ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&rpm));
    for line in requires.lines() {
        // e.g. "libc.so.6(GLIBC_2.28)(64bit)"
        if let Some(i) = line.find("(GLIBC_") {
            let name = line[i + 1..].split(')').next().unwrap();
            assert!(
                glibc_version(name).is_some_and(|v| v <= (2, 28)),
                "{} requires {line}",
                rpm.display()
            );
        }
        assert!(
            !line.contains("OPENSSL"),
            "{} requires {line}",
            rpm.display()
        );
    }
    assert!(
        requires.lines().any(|l| l.starts_with("libpq.so.5")),
        "{} does not require libpq.so.5: {requires}",
        rpm.display()
    );
}

fn extract(rpm: &Path, into: &Path) {
    let status = Command::new("sh")
        .arg("-c")
        .arg("rpm2cpio \"$1\" | cpio -idm --quiet")
        .arg("sh")
        .arg(rpm)
        .current_dir(into)
        .status()
        .unwrap();
    assert!(status.success(), "extracting {}", rpm.display());
}

#[test]
fn x86_64_rpm_has_the_files_owners_modes_and_requirements() {
    check_payload(&X86_64);
}

#[test]
fn aarch64_rpm_has_the_files_owners_modes_and_requirements() {
    check_payload(&AARCH64);
}

#[test]
fn scriptlets_create_the_account_and_manage_the_service_like_openeuler_packages() {
    let rpm = X86_64.rpm(&rpm_dir(), "kunpay", 1);
    let scripts = ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    for expected in [
        "getent group kunpay >/dev/null || groupadd -r kunpay",
        "useradd -r -g kunpay -d /var/lib/kunpay -s /sbin/nologin -c \"kunpay payment daemon\" kunpay",
        // %systemd_post: preset on first install only.
        "if [ $1 -eq 1 ]; then systemctl --no-reload preset kunpayd.service",
        // %systemd_preun: stop and disable on removal, not on upgrade.
        "if [ $1 -eq 0 ]; then systemctl --no-reload disable --now kunpayd.service",
        // %systemd_postun_with_restart: restart a running service after an upgrade.
        "if [ $1 -ge 1 ]; then systemctl try-restart kunpayd.service",
        "systemd-tmpfiles --create /usr/lib/tmpfiles.d/kunpay.conf",
        // The credential sources, also where systemd-tmpfiles is absent; existing ones kept.
        "for c in node-sign-passphrase node-encrypt-passphrase audit-sign-passphrase db-password amqp-password core-mac-key cdc-password; do",
        "[ -e /etc/kunpay/credentials/$c ] || (umask 077 && : > /etc/kunpay/credentials/$c)",
    ] {
        assert!(
            scripts.contains(expected),
            "scriptlets lack {expected:?}:\n{scripts}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Install, upgrade, remove in a scratch root

/// A directory tree rpm installs into with `--root`, holding just enough of a system to run
/// the packages' scriptlets for real: sh, getent, groupadd, useradd and their libraries, and an
/// /etc/passwd with root only. systemctl and systemd-tmpfiles are absent on purpose: the
/// scriptlets must tolerate that (`|| :`), as in a container or an image build.
struct ScratchRoot {
    dir: tempfile::TempDir,
}

impl ScratchRoot {
    fn new() -> ScratchRoot {
        let dir = tempfile::Builder::new()
            .prefix("kunpay-rpm-root")
            .tempdir()
            .unwrap();
        let root = dir.path();
        for d in [
            "etc",
            "dev",
            "tmp",
            "var/lib/rpm",
            "usr/bin",
            "usr/sbin",
            "bin",
            "sbin",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        fs::write(root.join("etc/gshadow"), "root:*::\n").unwrap();
        fs::set_permissions(root.join("etc/shadow"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(root.join("etc/gshadow"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::copy("/etc/login.defs", root.join("etc/login.defs")).unwrap();
        // Scriptlets redirect to /dev/null. A character device when we may create one, else a
        // plain file that swallows the output just as well for this test.
        let null = root.join("dev/null");
        let made = Command::new("mknod")
            .args(["-m", "666"])
            .arg(&null)
            .args(["c", "1", "3"])
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            fs::write(&null, "").unwrap();
        }
        for tool in [
            "/bin/sh",
            "/usr/bin/getent",
            "/usr/sbin/groupadd",
            "/usr/sbin/useradd",
        ] {
            copy_with_libraries(Path::new(tool), root);
        }
        ok(Command::new("rpm").arg("--root").arg(root).arg("--initdb"));
        ScratchRoot { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    fn rpm(&self, args: &[&str], package: Option<&Path>) -> Output {
        let mut cmd = Command::new("rpm");
        cmd.arg("--root").arg(self.dir.path()).args(args);
        if let Some(p) = package {
            cmd.arg(p);
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "rpm {args:?} {package:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// uid and gid of a name in the scratch root's own passwd/group.
    fn id_of(&self, file: &str, name: &str) -> Option<u32> {
        fs::read_to_string(self.path(file))
            .unwrap()
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .map(|l| l.split(':').nth(2).unwrap().parse().unwrap())
    }

    fn assert_file(&self, path: &str, mode: u32, owner: &str, group: &str) {
        let meta = fs::symlink_metadata(self.path(path))
            .unwrap_or_else(|e| panic!("{path} in the scratch root: {e}"));
        let uid = self.id_of("etc/passwd", owner).unwrap();
        let gid = self.id_of("etc/group", group).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (mode, uid, gid),
            "{path}: expected {mode:o} {owner}({uid}):{group}({gid})"
        );
    }
}

/// Copies a program and the shared libraries ldd names into the same paths under root.
fn copy_with_libraries(program: &Path, root: &Path) {
    let mut files = vec![program.to_path_buf()];
    let ldd = ok(Command::new("ldd").arg(program));
    for line in ldd.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for file in files {
        let target = root.join(file.strip_prefix("/").unwrap());
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        // Follow symlinks: the copy is the real file under the link's name.
        fs::copy(&file, &target).unwrap_or_else(|e| panic!("copying {}: {e}", file.display()));
    }
}

/// Builds RPMs of the current binaries with another release number and, optionally, another
/// packaged default configuration, into a directory of their own.
fn build_variant(arch: &Arch, release: u32, config: Option<&str>) -> tempfile::TempDir {
    let out = tempfile::Builder::new()
        .prefix("kunpay-rpm-variant")
        .tempdir()
        .unwrap();
    let mut cmd = Command::new(repo("packaging/build-rpm.sh"));
    cmd.arg(arch.rpm_arch)
        .env("KUNPAY_RPM_RELEASE", release.to_string())
        .env("KUNPAY_RPM_OUT", out.path());
    if let Some(text) = config {
        let path = out.path().join("kunpay.toml");
        fs::write(&path, text).unwrap();
        cmd.env("KUNPAY_RPM_CONFIG", &path);
    }
    ok(&mut cmd);
    out
}

fn install_upgrade_remove(arch: &Arch) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the install test needs root (chroot for the scriptlets, file ownership)"
    );
    let shipped = fs::read_to_string(repo("packaging/kunpay.toml")).unwrap();
    let changed = format!("{shipped}\n# A default changed in release 3.\n");
    let r2 = build_variant(arch, 2, None);
    let r3 = build_variant(arch, 3, Some(&changed));
    let root = ScratchRoot::new();
    // --nodeps: the scratch root has no glibc, libpq or systemd packages to satisfy them.
    // --ignorearch for aarch64 only: rpm refuses another architecture otherwise; the payload is
    // what is checked, nothing executes it.
    let mut flags = vec!["--nodeps"];
    if arch.rpm_arch != "x86_64" {
        flags.push("--ignorearch");
    }
    let with = |base: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(flags.iter()).copied().collect()
    };

    // First install: %pre created the account in the scratch root, files got their owners.
    root.rpm(&with(&["-ivh"]), Some(&arch.rpm(&rpm_dir(), "kunpay", 1)));
    let passwd = fs::read_to_string(root.path("etc/passwd")).unwrap();
    let account = passwd
        .lines()
        .find(|l| l.starts_with("kunpay:"))
        .unwrap_or_else(|| panic!("%pre did not create the kunpay account:\n{passwd}"));
    assert!(
        account.ends_with(":kunpay payment daemon:/var/lib/kunpay:/sbin/nologin"),
        "{account}"
    );
    let uid = root.id_of("etc/passwd", "kunpay").unwrap();
    assert!(
        uid > 0 && uid < 1000,
        "kunpay is not a system account: uid {uid}"
    );
    root.assert_file("/etc/kunpay", 0o750, "root", "kunpay");
    root.assert_file("/etc/kunpay/kunpay.toml", 0o640, "root", "kunpay");
    root.assert_file("/etc/kunpay/keys", 0o750, "root", "kunpay");
    root.assert_file("/etc/kunpay/credentials", 0o700, "root", "root");
    // %post created every credential source the unit loads, empty and root's alone (there is
    // no systemd-tmpfiles in the scratch root).
    for (_, name) in CREDENTIALS {
        let path = format!("/etc/kunpay/credentials/{name}");
        root.assert_file(&path, 0o600, "root", "root");
        assert_eq!(fs::read(root.path(&path)).unwrap(), b"", "{path}");
    }
    root.assert_file("/var/lib/kunpay", 0o750, "kunpay", "kunpay");
    root.assert_file("/var/log/kunpay", 0o750, "kunpay", "kunpay");
    root.assert_file("/usr/bin/kunpayd", 0o755, "root", "root");
    root.assert_file(
        "/usr/lib/systemd/system/kunpayd.service",
        0o644,
        "root",
        "root",
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/kunpay.toml")).unwrap(),
        shipped
    );
    // The installed unit, with its drop-in from the installed layout, scores within the bound.
    let installed = exposure(&root.path("/usr/lib/systemd/system/kunpayd.service"));
    assert!(installed <= MAX_EXPOSURE, "installed unit: {installed}");

    // The operator configures the node, installs a key, and the daemon writes state.
    let configured = shipped.replace("id = \"kunpay-a\"", "id = \"bank-node-7\"");
    assert_ne!(
        configured, shipped,
        "the example config no longer has id = \"kunpay-a\""
    );
    fs::write(root.path("/etc/kunpay/kunpay.toml"), &configured).unwrap();
    fs::write(root.path("/etc/kunpay/keys/node-sign.pem"), "KEY").unwrap();
    fs::write(
        root.path("/etc/kunpay/credentials/db-password"),
        "PASSWORD\n",
    )
    .unwrap();
    fs::write(root.path("/var/lib/kunpay/outbox.spill"), "STATE").unwrap();

    // Upgrade with an unchanged default: the configuration stays, no .rpmnew.
    root.rpm(&with(&["-Uvh"]), Some(&arch.rpm(r2.path(), "kunpay", 2)));
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/kunpay.toml")).unwrap(),
        configured
    );
    assert!(!root.path("/etc/kunpay/kunpay.toml.rpmnew").exists());
    root.assert_file("/etc/kunpay/kunpay.toml", 0o640, "root", "kunpay");

    // Upgrade with a changed default: the configuration stays, the new default is beside it.
    root.rpm(&with(&["-Uvh"]), Some(&arch.rpm(r3.path(), "kunpay", 3)));
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/kunpay.toml")).unwrap(),
        configured
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/kunpay.toml.rpmnew")).unwrap(),
        changed
    );
    root.assert_file("/etc/kunpay/kunpay.toml", 0o640, "root", "kunpay");
    // The secrets are the site's: upgrades leave them as they are.
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/credentials/db-password")).unwrap(),
        "PASSWORD\n"
    );
    root.assert_file("/etc/kunpay/credentials/db-password", 0o600, "root", "root");
    let q = root.rpm(&["-q", "kunpay"], None);
    assert_eq!(
        String::from_utf8_lossy(&q.stdout).trim(),
        format!("kunpay-{VERSION}-3.{}", arch.rpm_arch)
    );

    // Removal: programs and units go; the configuration (rpm keeps a modified %config file as
    // .rpmsave), keys, state and the account stay.
    root.rpm(&["-e", "--nodeps"], Some(Path::new("kunpay")));
    assert!(!root.path("/usr/bin/kunpayd").exists());
    assert!(
        !root
            .path("/usr/lib/systemd/system/kunpayd.service")
            .exists()
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/kunpay.toml.rpmsave")).unwrap(),
        configured
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/keys/node-sign.pem")).unwrap(),
        "KEY"
    );
    assert_eq!(
        fs::read_to_string(root.path("/var/lib/kunpay/outbox.spill")).unwrap(),
        "STATE"
    );
    // The credential files are not the package's: removal leaves them, secrets included.
    assert_eq!(
        fs::read_to_string(root.path("/etc/kunpay/credentials/db-password")).unwrap(),
        "PASSWORD\n"
    );
    assert!(
        root.path("/etc/kunpay/credentials/node-sign-passphrase")
            .exists()
    );
    assert!(root.id_of("etc/passwd", "kunpay").is_some());
}

#[test]
fn x86_64_rpm_installs_upgrades_keeps_configuration_and_removes() {
    install_upgrade_remove(&X86_64);
}

#[test]
fn aarch64_rpm_installs_upgrades_keeps_configuration_and_removes() {
    install_upgrade_remove(&AARCH64);
}

/// `systemd-analyze verify` of a copy of a unit whose program path points at an executable
/// here (verify insists that ExecStart= exists). Returns what it printed.
fn verify(unit: &str, program: &str, stand_in: &Path) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(repo(&format!("systemd/{unit}"))).unwrap();
    assert!(text.contains(program), "{unit} does not run {program}");
    let path = dir.path().join(unit);
    fs::write(&path, text.replace(program, stand_in.to_str().unwrap())).unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn units_pass_systemd_analyze_verify_without_a_warning() {
    let kunpayd = X86_64.binary("kunpayd");
    let (success, printed) = verify("kunpayd.service", "/usr/bin/kunpayd", &kunpayd);
    assert!(
        success && printed.trim().is_empty(),
        "kunpayd.service: {printed}"
    );
    // The simulator's binary does not exist yet (a later issue adds it): any executable stands in.
    let (success, printed) = verify(
        "kunpay-coresim.service",
        "/usr/bin/kunpay-coresim",
        Path::new("/bin/true"),
    );
    assert!(
        success && printed.trim().is_empty(),
        "kunpay-coresim.service: {printed}"
    );
}

#[test]
fn systemd_analyze_verify_reports_a_broken_unit() {
    // The check above must be able to fail: a misspelt directive is reported.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.service");
    fs::write(
        &path,
        "[Service]\nExecStart=/bin/true\nProtectSystm=strict\n",
    )
    .unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));
    let printed = String::from_utf8_lossy(&out.stderr);
    assert!(printed.contains("ProtectSystm"), "{printed}");
}

#[test]
fn coresim_subpackage_is_built_when_its_binary_exists() {
    // The spec's conditional subpackage, built from whatever binary is named kunpay-coresim
    // (kunpayctl stands in, so this test does not need a release build of the simulator):
    // it builds, lints and carries the right files with the right owners.
    let bins = tempfile::tempdir().unwrap();
    for bin in ["kunpayd", "kunpayctl", "kunpay-audit"] {
        fs::copy(X86_64.binary(bin), bins.path().join(bin)).unwrap();
    }
    fs::copy(
        X86_64.binary("kunpayctl"),
        bins.path().join("kunpay-coresim"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    ok(Command::new(repo("packaging/build-rpm.sh"))
        .arg("x86_64")
        .env("KUNPAY_RPM_BINDIR", bins.path())
        .env("KUNPAY_RPM_OUT", out.path()));
    let coresim = X86_64.rpm(out.path(), "kunpay-coresim", 1);
    let files = dump(&coresim);
    assert_eq!(
        files["/usr/bin/kunpay-coresim"],
        (0o755, "root".into(), "root".into(), false)
    );
    assert_eq!(
        files["/usr/lib/systemd/system/kunpay-coresim.service"],
        (0o644, "root".into(), "root".into(), false)
    );
    assert_eq!(
        files["/var/lib/kunpay-coresim"],
        (
            0o750,
            "kunpay-coresim".into(),
            "kunpay-coresim".into(),
            false
        )
    );
    assert!(files.contains_key("/usr/share/doc/kunpay-coresim/README.md"));
    assert_eq!(
        files["/etc/kunpay-coresim/coresim.toml"],
        (0o640, "root".into(), "kunpay-coresim".into(), true),
        "the sample configuration, kept on upgrade"
    );
    let scripts = ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&coresim));
    assert!(
        scripts.contains("useradd -r -g kunpay-coresim"),
        "{scripts}"
    );
    assert!(
        scripts.contains("systemctl try-restart kunpay-coresim.service"),
        "{scripts}"
    );
    let lint = ok(Command::new("rpmlint")
        .arg("-c")
        .arg(repo("packaging/rpmlint.toml"))
        .arg(&coresim));
    assert!(lint.contains("0 errors, 0 warnings"), "rpmlint: {lint}");
    // The main package is unchanged by the option.
    assert!(!dump(&X86_64.rpm(out.path(), "kunpay", 1)).contains_key("/usr/bin/kunpay-coresim"));
}

#[test]
fn the_glibc_check_catches_a_binary_linked_against_this_machines_glibc() {
    // The debug build of the test run links Debian 12's glibc 2.36 the usual way: the check
    // that passes the release binaries must find versions above 2.28 in it.
    let host = Path::new(env!("CARGO_BIN_EXE_kunpayd"));
    let versions = required_versions(host);
    assert!(
        versions
            .iter()
            .any(|v| glibc_version(v).is_some_and(|v| v > (2, 28))),
        "{versions:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// kunpayd under a real systemd

/// Why this machine cannot boot a systemd of its own for the test (tests/systemd-boot.sh), or
/// None when it can: root, systemd and util-linux's unshare/nsenter, overlayfs, a cgroup2
/// hierarchy, and namespaces the kernel lets us create (a container without privileges does not).
fn real_systemd_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, mounts, a cgroup of its own)".into());
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return Some("/lib/systemd/systemd is not installed".into());
    }
    for tool in ["unshare", "nsenter", "systemctl", "journalctl"] {
        if !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("\toverlay\n") {
        return Some("the kernel has no overlayfs".into());
    }
    if cgroup2_root().is_none() {
        return Some(
            "no cgroup2 hierarchy is mounted (/sys/fs/cgroup or /sys/fs/cgroup/unified)".into(),
        );
    }
    let probe = Command::new("unshare")
        .args([
            "--mount", "--pid", "--fork", "--uts", "--ipc", "--cgroup", "true",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "the kernel refuses new namespaces here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// The mount point of the machine's cgroup2 hierarchy (unified or hybrid layout).
fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")
            && (mount_point == "/sys/fs/cgroup" || mount_point == "/sys/fs/cgroup/unified"))
            .then(|| PathBuf::from(mount_point))
    })
}

/// A systemd booted by tests/systemd-boot.sh; powered off (and its cgroup removed) on drop.
struct BootedSystemd {
    dir: tempfile::TempDir,
    cgroup: PathBuf,
    boot: std::process::Child,
    pid: u32,
}

impl BootedSystemd {
    fn boot(dir: tempfile::TempDir) -> BootedSystemd {
        let cgroup = cgroup2_root()
            .unwrap()
            .join(format!("kunpay-systemd-test-{}", std::process::id()));
        fs::create_dir(&cgroup).unwrap();
        let log = fs::File::create(dir.path().join("boot.log")).unwrap();
        let boot = Command::new(repo("tests/systemd-boot.sh"))
            .arg(dir.path())
            .arg(&cgroup)
            .arg(env!("CARGO_BIN_EXE_kunpayd"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut booted = BootedSystemd {
            dir,
            cgroup,
            boot,
            pid: 0,
        };
        let pid_file = booted.dir.path().join("pid");
        booted.pid = wait_until(std::time::Duration::from_secs(20), || {
            fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("systemd did not start: {}", booted.boot_log()));
        booted
    }

    fn boot_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("boot.log")).unwrap_or_default()
    }

    /// Runs a command inside (all of systemd's namespaces); returns status and stdout.
    fn inside(&self, args: &[&str]) -> (bool, String) {
        let out = run(Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "--"])
            .args(args));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `systemctl show` properties of a unit.
    fn show(&self, unit: &str) -> BTreeMap<String, String> {
        self.inside(&["systemctl", "show", unit])
            .1
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn journal(&self, args: &[&str]) -> String {
        let mut all = vec!["journalctl", "--no-pager", "-b"];
        all.extend_from_slice(args);
        self.inside(&all).1
    }
}

impl Drop for BootedSystemd {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SIGRTMIN+4: poweroff, as a container manager asks for it.
            let _ = Command::new("kill")
                .args(["-s", "RTMIN+4", &self.pid.to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if matches!(self.boot.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if matches!(self.boot.try_wait(), Ok(None)) && self.pid != 0 {
            // PID 1 of the namespace: killing it ends every process in it.
            let _ = Command::new("kill")
                .args(["-s", "KILL", &self.pid.to_string()])
                .status();
            let _ = self.boot.wait();
        }
        // Leaves first: systemd's slices and scopes below our cgroup.
        let _ = Command::new("find")
            .arg(&self.cgroup)
            .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
            .status();
    }
}

fn wait_until<T>(timeout: std::time::Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The files of an installed node, as the RPM and an operator leave them, under `upper`.
fn install_node(upper: &Path, database_url: &str, database_password: &str, ops_port: u16) -> u32 {
    use kunpay::crypto::keyfile;
    use kunpay::crypto::sm2::PrivateKey;
    // An id free on this machine for the kunpay account (the RPM's useradd -r picks one).
    let taken = |file: &str, id: u32| {
        fs::read_to_string(file)
            .unwrap()
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&id.to_string()))
    };
    let id = (900..1000)
        .find(|&id| !taken("/etc/passwd", id) && !taken("/etc/group", id))
        .expect("a free system uid and gid");
    let etc = upper.join("etc");
    fs::create_dir_all(etc.join("systemd/system")).unwrap();
    let mut passwd = fs::read_to_string("/etc/passwd").unwrap();
    passwd.push_str(&format!(
        "kunpay:x:{id}:{id}:kunpay payment daemon:/var/lib/kunpay:/sbin/nologin\n"
    ));
    fs::write(etc.join("passwd"), passwd).unwrap();
    let mut group = fs::read_to_string("/etc/group").unwrap();
    group.push_str(&format!("kunpay:x:{id}:\n"));
    fs::write(etc.join("group"), group).unwrap();

    // The packaged unit, drop-in and tmpfiles.d file where the RPM puts them.
    let units = upper.join("usr/lib/systemd/system");
    fs::create_dir_all(units.join("kunpayd.service.d")).unwrap();
    fs::copy(
        repo("systemd/kunpayd.service"),
        units.join("kunpayd.service"),
    )
    .unwrap();
    fs::copy(
        repo("systemd/kunpayd.service.d/50-hardening-newer.conf"),
        units.join("kunpayd.service.d/50-hardening-newer.conf"),
    )
    .unwrap();
    fs::create_dir_all(upper.join("usr/lib/tmpfiles.d")).unwrap();
    fs::copy(
        repo("systemd/kunpay.tmpfiles"),
        upper.join("usr/lib/tmpfiles.d/kunpay.conf"),
    )
    .unwrap();
    fs::write(
        etc.join("systemd/system/kunpaytest.target"),
        "[Unit]\nDescription=kunpay under systemd (tests/packaging.rs)\nWants=kunpayd.service\n",
    )
    .unwrap();

    // /etc/kunpay as the RPM creates it, with an encrypted signing key whose passphrase is a
    // credential, the database password as a credential, the packaged risk library (watched
    // with inotify) and an audit key.
    let chown = |path: &Path, uid: u32, gid: u32, mode: u32| {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    let conf = etc.join("kunpay");
    for d in ["keys", "credentials", "risk/rules", "risk/lists"] {
        fs::create_dir_all(conf.join(d)).unwrap();
    }
    for d in ["", "keys", "risk", "risk/rules", "risk/lists"] {
        chown(&conf.join(d), 0, id, 0o750);
    }
    chown(&conf.join("credentials"), 0, 0, 0o700);
    for f in [
        "strategy.toml",
        "rules/10-expert.toml",
        "lists/00-lists.toml",
    ] {
        fs::copy(
            repo(&format!("packaging/risk/{f}")),
            conf.join("risk").join(f),
        )
        .unwrap();
        chown(&conf.join("risk").join(f), 0, id, 0o640);
    }
    let passphrase = "correct horse battery staple";
    let sign = PrivateKey::generate().unwrap();
    keyfile::write_private_key(
        &conf.join("keys/node-sign.pem"),
        &sign,
        Some(passphrase.as_bytes()),
    )
    .unwrap();
    chown(&conf.join("keys/node-sign.pem"), id, id, 0o600);
    let audit = PrivateKey::generate().unwrap();
    keyfile::write_private_key(&conf.join("keys/audit-sign.pem"), &audit, None).unwrap();
    chown(&conf.join("keys/audit-sign.pem"), id, id, 0o600);
    // The two secrets this node uses; systemd-tmpfiles creates the other five, empty, at boot.
    for (name, secret) in [
        ("node-sign-passphrase", passphrase),
        ("db-password", database_password),
    ] {
        let path = conf.join("credentials").join(name);
        fs::write(&path, format!("{secret}\n")).unwrap();
        chown(&path, 0, 0, 0o600);
    }
    let config = conf.join("kunpay.toml");
    fs::write(
        &config,
        format!(
            r#"[node]
id = "systemd-test"
role = "active"

[service]
user = "kunpay"
state_dir = "/var/lib/kunpay"

[ops]
listen = "127.0.0.1:{ops_port}"

[database]
url = "{database_url}"
password_credential = "db-password"
migrate_on_start = true
pool_max_size = 4
connect_timeout = "5s"

[keys]
sign_private = "/etc/kunpay/keys/node-sign.pem"
sign_passphrase_credential = "node-sign-passphrase"

[risk]
dir = "/etc/kunpay/risk"

[audit]
dir = "/var/lib/kunpay/audit"
sign_private = "/etc/kunpay/keys/audit-sign.pem"
key_id = "systemd-test-1"

[log]
target = "syslog"
level = "info"
"#
        ),
    )
    .unwrap();
    chown(&config, 0, id, 0o640);
    id
}

/// `postgres://user:password@host/db` -> (`postgres://user@host/db`, password): kunpayd refuses
/// a password in the URL; it gets it as a credential. Trust authentication needs none.
fn split_password(url: &str) -> (String, String) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), "unused".into());
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return (url.to_string(), "unused".into());
    };
    match userinfo.split_once(':') {
        Some((user, password)) => (format!("{scheme}://{user}@{host}"), password.to_string()),
        None => (url.to_string(), "unused".into()),
    }
}

#[test]
fn password_splitting() {
    assert_eq!(
        split_password("postgres://u:p@h:5432/d"),
        ("postgres://u@h:5432/d".to_string(), "p".to_string())
    );
    assert_eq!(
        split_password("postgres://u@h/d"),
        ("postgres://u@h/d".to_string(), "unused".to_string())
    );
}

/// The packaged unit and drop-in, run by a real systemd (the machine's own, booted in
/// namespaces by tests/systemd-boot.sh), start kunpayd with all of their hardening: the
/// credentials reach it (an encrypted key's passphrase, the database password), the sockets,
/// paths and system calls it needs are allowed (syslog, sd_notify, the database, the ops
/// listener, the audit log under /var/lib/kunpay, inotify on /etc/kunpay/risk), and the
/// sandbox is really in place. Then reload and a clean stop.
#[test]
fn kunpayd_runs_under_a_real_systemd_with_the_units_hardening() {
    if let Some(reason) = real_systemd_unavailable() {
        eprintln!("SKIPPED: cannot boot a systemd on this machine: {reason}");
        return;
    }
    let db = common::TestDb::new();
    let (url, password) = split_password(db.url());
    let ops_port = common::free_port();
    let dir = tempfile::Builder::new()
        .prefix("kunpay-systemd")
        .tempdir()
        .unwrap();
    install_node(&dir.path().join("upper"), &url, &password, ops_port);
    let started = std::time::Instant::now();
    let systemd = BootedSystemd::boot(dir);

    let failed = |what: &str, systemd: &BootedSystemd| -> String {
        format!(
            "{what}\nkunpayd.service: {:?}\njournal:\n{}\nboot log:\n{}",
            systemd.show("kunpayd.service").get("StatusText"),
            systemd.journal(&["-n", "80"]),
            systemd.boot_log()
        )
    };
    // kunpaytest.target wants kunpayd.service: wait for READY=1 (or a failure).
    let state = wait_until(std::time::Duration::from_secs(90), || {
        let p = systemd.show("kunpayd.service");
        let active = p.get("ActiveState").map(String::as_str);
        let restarts = p.get("NRestarts").map(String::as_str);
        (active == Some("active") || active == Some("failed") || restarts.is_some_and(|n| n != "0"))
            .then_some(p)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}",
            failed("kunpayd.service did not settle in 90 s", &systemd)
        )
    });
    assert_eq!(
        (state["ActiveState"].as_str(), state["SubState"].as_str()),
        ("active", "running"),
        "{}",
        failed("kunpayd.service is not running", &systemd)
    );
    eprintln!(
        "kunpayd ready under systemd {:?} after boot",
        started.elapsed()
    );
    assert!(
        state["StatusText"].starts_with("serving as active"),
        "{state:?}"
    );
    assert_eq!(
        common::status_of(&format!("http://127.0.0.1:{ops_port}/readiness")),
        200
    );

    // The sandbox is in place around the running process.
    let main_pid = &state["MainPID"];
    let (_, status) = systemd.inside(&["cat", &format!("/proc/{main_pid}/status")]);
    for expected in [
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ] {
        assert!(status.contains(expected), "{expected:?} not in\n{status}");
    }
    // PrivateUsers=: a user namespace mapping root and kunpay only.
    let (_, uid_map) = systemd.inside(&["cat", &format!("/proc/{main_pid}/uid_map")]);
    assert_eq!(uid_map.lines().count(), 2, "uid_map:\n{uid_map}");
    // ProtectSystem=strict: / read-only, the state directory writable.
    let (_, mounts) = systemd.inside(&["cat", &format!("/proc/{main_pid}/mountinfo")]);
    let options_of = |point: &str| -> Option<String> {
        mounts.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&point)).then(|| f[5].to_string())
        })
    };
    assert!(
        options_of("/").is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "{mounts}"
    );
    assert!(
        options_of("/var/lib/kunpay").is_some_and(|o| o.split(',').any(|x| x == "rw")),
        "{mounts}"
    );
    // Every credential the unit names was handed over; systemd-tmpfiles created the missing
    // sources at boot, as on a real node.
    let (_, credentials) = systemd.inside(&["ls", "/run/credentials/kunpayd.service"]);
    let mut got: Vec<&str> = credentials.lines().collect();
    got.sort();
    let mut expected: Vec<&str> = CREDENTIALS.iter().map(|(_, n)| *n).collect();
    expected.sort();
    assert_eq!(got, expected);
    // Its log went through /dev/log (syslog) into the journal.
    let syslog = systemd.journal(&[
        "_TRANSPORT=syslog",
        "SYSLOG_IDENTIFIER=kunpayd",
        "-o",
        "cat",
    ]);
    assert!(syslog.contains("kunpayd ready"), "syslog:\n{syslog}");

    // inotify on /etc/kunpay/risk works in the sandbox: an edit is picked up without SIGHUP.
    let reloads = |s: &BootedSystemd| {
        s.journal(&["SYSLOG_IDENTIFIER=kunpayd", "-o", "cat"])
            .matches("risk rules reloaded")
            .count()
    };
    let before = reloads(&systemd);
    assert!(
        systemd
            .inside(&[
                "sh",
                "-c",
                "echo '# touched by the test' >> /etc/kunpay/risk/strategy.toml"
            ])
            .0
    );
    assert!(
        wait_until(std::time::Duration::from_secs(15), || (reloads(&systemd)
            > before)
            .then_some(()))
        .is_some(),
        "{}",
        failed("the risk edit was not reloaded", &systemd)
    );

    // systemctl reload (SIGHUP) keeps it serving; stop drains and exits 0.
    assert!(
        systemd
            .inside(&["systemctl", "reload", "kunpayd.service"])
            .0
    );
    assert_eq!(systemd.show("kunpayd.service")["ActiveState"], "active");
    assert!(systemd.inside(&["systemctl", "stop", "kunpayd.service"]).0);
    let stopped = systemd.show("kunpayd.service");
    assert_eq!(
        (
            stopped["Result"].as_str(),
            stopped["ExecMainStatus"].as_str()
        ),
        ("success", "0"),
        "{}",
        failed("kunpayd did not stop cleanly", &systemd)
    );
    let log = systemd.journal(&["SYSLOG_IDENTIFIER=kunpayd", "-o", "cat"]);
    assert!(log.contains("drained cleanly"), "{log}");
    eprintln!("kunpayd under systemd: whole test {:?}", started.elapsed());
}
