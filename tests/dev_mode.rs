//! `make run`'s promise: from nothing, `kunpayd --dev DIR` creates its config, demo keys and
//! an embedded PostgreSQL cluster, serves, and on SIGTERM stops the cluster with it.

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_development_node_starts_from_nothing_and_stops_with_its_database() {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dev-mode");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = root.join(format!("node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let mut child = kunpayd()
        .arg("--dev")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut banner = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !banner
        .iter()
        .any(|l: &String| l.trim_start().starts_with("stop"))
    {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(remaining) {
            Ok(line) => banner.push(line),
            Err(_) => {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "no banner; stdout so far {banner:?}; stderr {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    let text = banner.join("\n");
    assert!(text.contains("created configuration"), "{text}");
    assert!(text.contains("created demo key"), "{text}");
    assert!(text.contains("is running"), "{text}");
    // The first word after `label` on the banner's line that starts with it.
    let banner_value = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label)?.split_whitespace().next())
    };
    let ops = banner_value("ops listener").expect("the banner says where the ops listener is");
    assert_eq!(status_of(&format!("{ops}primary")), 200);
    assert_eq!(status_of(&format!("{ops}health")), 200);
    assert!(text.contains("created message log directory"), "{text}");
    let gateway = banner_value("channel")
        .expect("the banner says where the channel is")
        .strip_suffix("/gateway/...")
        .expect("the channel line names the gateway");
    // The demo institution signs an agreement and is debited: with a broker on this machine
    // (CI has RabbitMQ) through kunpay-coresim, which the node started as its child.
    let coresim_pid: Option<i32> = banner_value("core banking   kunpay-coresim (pid ")
        .map(|pid| pid.trim_end_matches(',').parse().unwrap());
    // The node's queues go when the test ends (the broker outlives every test).
    let queues = text.lines().find_map(|l| {
        let request = l
            .trim()
            .strip_prefix("core banking")?
            .split("queue ")
            .nth(1)?;
        let prefix = request
            .split_whitespace()
            .next()?
            .strip_suffix(".request")?;
        Some(amqp::Queues {
            request: format!("{prefix}.request"),
            reply: format!("{prefix}.reply"),
            dead: format!("{prefix}.dead"),
        })
    });
    if std::net::TcpStream::connect("127.0.0.1:5672").is_ok() {
        let pid = coresim_pid.expect("with a broker, make run's core is kunpay-coresim");
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        // The node serves before its MQ bridge has connected (it connects in the background);
        // an agreement needs the core at once.
        ha::wait_until(
            "the MQ bridge to connect to the local broker",
            Duration::from_secs(60),
            || {
                http_get(&format!("{ops}metrics"))
                    .is_ok_and(|(_, m)| m.lines().any(|l| l == "kunpay_core_link_connected 1"))
            },
        );
        let queues = queues.as_ref().expect("the banner names the queues");
        ha::wait_until(
            "kunpay-coresim to consume the request queue",
            Duration::from_secs(60),
            || queues.consumers(&queues.request).unwrap_or(0) > 0,
        );
    }
    let demo = institution::TestInstitution::from_key(
        "DEMO",
        "demo-01",
        &dir.join("keys/demo-institution-sign.pem"),
        &dir.join("keys"),
        "dev-enc-01",
        gateway,
    );
    let agreement = demo.sign_agreement(ha::ZHANG);
    let debit = demo.call(
        kunpay::payment::request::MsgType::Debit,
        &[
            ("ReqSerial", &demo.next_id("D")),
            ("AgrmtNo", &agreement),
            ("Amt", "100"),
            ("Ccy", "CNY"),
        ],
    );
    assert_eq!(debit.code(), "0000", "{:?}", debit.fields);
    assert_eq!(debit.get("TxnStatus"), "SUCCEEDED", "{:?}", debit.fields);

    // A message from nobody the node knows: refused at its edge, and logged as such.
    let mut refused = ureq::post(&format!("{gateway}/gateway/query"))
        .config()
        .http_status_as_error(false)
        .build()
        .send(b"<root><MsgHeader><SndInst>NOBODY</SndInst></MsgHeader></root>".as_slice())
        .unwrap();
    let answer = refused.body_mut().read_to_string().unwrap();
    assert!(
        answer.contains("<RsltCd>") && !answer.contains("<RsltCd>0000<"),
        "refused with a result code: {answer}"
    );

    // Demo keys are private to their owner and standard PEM.
    let key = dir.join("keys/node-sign.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (code, _, stderr) = run(std::process::Command::new("openssl")
        .arg("pkey")
        .arg("-noout")
        .arg("-in")
        .arg(&key));
    assert_eq!(code, 0, "openssl reads the demo key: {stderr}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !dir.join("pg/postmaster.pid").exists(),
        "the embedded database stopped with the daemon"
    );
    // The development node keeps the signed message log, and the auditors' verifier accepts
    // it with the key file the node wrote: the refused request and its answer are in it.
    let (code, report, stderr) = run(std::process::Command::new(env!(
        "CARGO_BIN_EXE_kunpay-audit"
    ))
    .arg("verify")
    .arg(dir.join("audit"))
    .arg("--pubkeys")
    .arg(dir.join("pubkeys.toml")));
    assert_eq!(code, 0, "{report}{stderr}");
    assert!(report.contains("RESULT: OK"), "{report}");
    // Agreement apply and confirm, the debit, the refused message: each request and answer,
    // besides the core messages (tests/audit_daemon.rs counts those exactly).
    let records: u64 = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("records: "))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the report counts records: {report}"));
    assert!(records >= 8, "{report}");
    if let Some(pid) = coresim_pid {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "kunpay-coresim stopped with the node"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
