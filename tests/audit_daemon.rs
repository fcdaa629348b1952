//! The daemon writing its SM-signed message log (docs/audit.md), end to end with a real
//! `kunpayd`, PostgreSQL, `kunpayctl` and the auditors' `kunpay-audit`: a realistic session is
//! logged completely and verifies; a daemon killed with SIGKILL under load leaves a log that
//! verifies and holds every answer a client received, byte for byte; a log that cannot be
//! written stops the node from answering as if it had logged; an operator action interrupted
//! between its append and its mark is found in the log, not logged twice.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::amqp::*;
use common::institution::TestInstitution;
use common::*;
use diesel::prelude::*;
use kunpay::audit::record::{Frame, Record, SegmentHeader};
use kunpay::audit::segment::{self, Frames, Step};
use kunpay::audit::{Direction, PeerSignature};
use kunpay::crypto::keyfile;
use kunpay::crypto::sm2::PrivateKey;
use kunpay::payment::request::MsgType;

const AUDIT_KEY_ID: &str = "test-node-audit-1";

const ZHANG: (&str, &str, &str, &str) = (
    "6222021234567890123",
    "张三",
    "110101199003077774",
    "13812345678",
);
const LI: (&str, &str) = ("6222021234567890131", "李四");

/// A node with `[audit]`, one institution (TENPAY), and the auditor's public-key file.
struct AuditNode {
    db: TestDb,
    dir: DaemonDir,
    daemon: Daemon,
    tenpay: Arc<TestInstitution>,
    base: String,
    audit_dir: PathBuf,
    pubkeys: PathBuf,
}

impl AuditNode {
    /// `institution_extra` goes into TENPAY's section, `audit_extra` into `[audit]`, `extra`
    /// after both; `adjust` changes the daemon's command (limits).
    fn start(
        institution_extra: &str,
        audit_extra: &str,
        extra: &str,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> AuditNode {
        let db = TestDb::new();
        let dir = DaemonDir::new();
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let keys = dir.path().join("keys");
        let (tenpay, section) = TestInstitution::create(dir.path(), "TENPAY", &keys, &base);
        let audit_key = PrivateKey::generate().unwrap();
        keyfile::write_private_key(&keys.join("audit-sign.pem"), &audit_key, None).unwrap();
        keyfile::write_public_key(&keys.join("audit-sign.pub.pem"), &audit_key.public_key())
            .unwrap();
        let audit_dir = dir.path().join("audit");
        std::fs::create_dir(&audit_dir).unwrap();
        if nix::unistd::geteuid().is_root() {
            // The daemon drops to `nobody` (common::DaemonDir) and writes the log as that user,
            // as kunpayd writes /var/lib/kunpay/audit as `kunpay`.
            let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
            nix::unistd::chown(&audit_dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
        }
        let audit = format!(
            "[audit]\ndir = \"{}\"\nsign_private = \"{}\"\nkey_id = \"{AUDIT_KEY_ID}\"\n{audit_extra}\n",
            audit_dir.display(),
            keys.join("audit-sign.pem").display()
        );
        dir.write_channel_config(
            db.url(),
            port,
            &format!("{section}send_time_window = \"1h\"\n{institution_extra}\n"),
            &format!("{audit}\n{extra}"),
        );
        // The auditor's file: the audit key by its id, the institution's key for the inbound
        // signatures.
        let pubkeys = dir.path().join("pubkeys.toml");
        std::fs::write(
            &pubkeys,
            format!(
                "[audit_keys]\n{AUDIT_KEY_ID} = {{ pem_file = \"keys/audit-sign.pub.pem\" }}\n\n\
                 [institutions.TENPAY]\npem_file = \"TENPAY-sign.pub.pem\"\n"
            ),
        )
        .unwrap();
        let mut daemon = Daemon::spawn_with(&dir, adjust);
        daemon.wait_ready();
        AuditNode {
            db,
            dir,
            daemon,
            tenpay: Arc::new(tenpay),
            base,
            audit_dir,
            pubkeys,
        }
    }

    fn restart(&mut self) {
        self.daemon = Daemon::spawn(&self.dir);
        self.daemon.wait_ready();
    }

    fn stop(&mut self) {
        self.daemon.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self
            .daemon
            .wait_exit(Duration::from_secs(60))
            .expect("kunpayd stops on SIGTERM");
        assert!(
            status.success(),
            "clean stop; stderr:\n{}",
            self.daemon.stderr()
        );
    }

    fn verify(&self) -> (i32, String) {
        let (code, stdout, stderr) = run(std::process::Command::new(env!(
            "CARGO_BIN_EXE_kunpay-audit"
        ))
        .arg("verify")
        .arg(&self.audit_dir)
        .arg("--pubkeys")
        .arg(&self.pubkeys));
        (code, format!("{stdout}{stderr}"))
    }

    fn conn(&self) -> PgConnection {
        self.db.connect()
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(&self.dir.ops_url("/metrics")).unwrap();
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
    }
}

/// Every record of the log in `dir`, in order (complete frames only).
fn read_log(dir: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    for file in segment::list(dir).unwrap() {
        let bytes = std::fs::read(&file.path).unwrap();
        let (_, start) = SegmentHeader::decode(&bytes).unwrap();
        for step in Frames::new(&bytes, start) {
            match step {
                Step::Frame {
                    frame: Frame::Record { record, .. },
                    ..
                } => records.push(record),
                Step::Frame { .. } => {}
                Step::Damage { .. } => break,
            }
        }
    }
    for pair in records.windows(2) {
        assert_eq!(
            pair[0].seq + 1,
            pair[1].seq,
            "records are numbered without gaps"
        );
    }
    records
}

fn txn_of(answer_raw: &[u8]) -> Option<uuid::Uuid> {
    let text = String::from_utf8_lossy(answer_raw);
    let id = text.split("<TxnId>").nth(1)?.split('<').next()?;
    uuid::Uuid::parse_str(id).ok()
}

/// The request and its answer are in the log, byte for byte, in that order, with the right
/// type, peer, signature flag and transaction; returns (request seq, answer seq).
fn assert_exchange(
    records: &[Record],
    peer: &str,
    msg_type: MsgType,
    request: &[u8],
    answer: &[u8],
    verified: bool,
) -> (u64, u64) {
    let what = format!("{} {}", msg_type.name(), String::from_utf8_lossy(answer));
    let inbound: Vec<&Record> = records
        .iter()
        .filter(|r| r.direction == Direction::In && r.payload == request)
        .collect();
    assert_eq!(inbound.len(), 1, "the request of {what} is logged once");
    let inbound = inbound[0];
    assert_eq!(inbound.peer, peer, "{what}");
    assert_eq!(inbound.message_type, msg_type.name(), "{what}");
    assert_eq!(
        inbound.peer_signature,
        if verified {
            PeerSignature::Verified
        } else {
            PeerSignature::NotVerified
        },
        "{what}"
    );
    let outbound: Vec<&Record> = records
        .iter()
        .filter(|r| r.direction == Direction::Out && r.payload == answer)
        .collect();
    assert_eq!(outbound.len(), 1, "the answer of {what} is logged once");
    let outbound = outbound[0];
    assert_eq!(outbound.peer, peer, "{what}");
    assert_eq!(outbound.message_type, msg_type.response_name(), "{what}");
    if msg_type != MsgType::QueryRange {
        assert_eq!(outbound.txn_id, txn_of(answer), "{what}");
    }
    assert!(inbound.seq < outbound.seq, "request before answer: {what}");
    (inbound.seq, outbound.seq)
}

/// An institution's callback endpoint answering 200 `SUCCESS`; keeps every body it answered.
/// The first `drop_first` connections are closed unanswered once their request is read.
struct Callback {
    port: u16,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Callback {
    fn start(drop_first: usize) -> Callback {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let keep = received.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let keep = keep.clone();
                let answer = n >= drop_first;
                std::thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut data = Vec::new();
                    let mut buffer = [0u8; 8192];
                    let body = loop {
                        let Ok(n) = stream.read(&mut buffer) else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        data.extend_from_slice(&buffer[..n]);
                        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if data.len() >= end + 4 + length {
                            break data[end + 4..end + 4 + length].to_vec();
                        }
                    };
                    if !answer {
                        return;
                    }
                    keep.lock().unwrap().push(body);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nSUCCESS",
                    );
                });
            }
        });
        Callback { port, received }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/kunpay/notify", self.port)
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

fn sign_agreement(inst: &TestInstitution, account: (&str, &str, &str, &str)) -> Vec<Exchange> {
    let mut exchanges = Vec::new();
    let apply = inst.message(
        MsgType::AgreementApply,
        &[
            ("ReqSerial", &inst.next_id("AP")),
            ("AcctNo", account.0),
            ("AcctNm", account.1),
            ("IdTp", "01"),
            ("IdNo", account.2),
            ("PhoneNo", account.3),
        ],
    );
    let applied = inst.send(MsgType::AgreementApply, &apply);
    assert_eq!(applied.code(), "0000", "{:?}", applied.fields);
    let agreement = applied.get("AgrmtNo").to_string();
    exchanges.push(Exchange::new(MsgType::AgreementApply, apply, applied.raw));
    let confirm = inst.message(
        MsgType::AgreementConfirm,
        &[
            ("ReqSerial", &inst.next_id("CF")),
            ("AgrmtNo", &agreement),
            ("VrfyCd", &kunpay::core::sim::verification_code(&agreement)),
        ],
    );
    let confirmed = inst.send(MsgType::AgreementConfirm, &confirm);
    assert_eq!(confirmed.code(), "0000", "{:?}", confirmed.fields);
    exchanges.push(Exchange::new(
        MsgType::AgreementConfirm,
        confirm,
        confirmed.raw,
    ));
    exchanges.last_mut().unwrap().agreement = Some(agreement);
    exchanges
}

/// One request a client sent and the answer it received.
struct Exchange {
    msg_type: MsgType,
    request: Vec<u8>,
    answer: Vec<u8>,
    agreement: Option<String>,
}

impl Exchange {
    fn new(msg_type: MsgType, request: Vec<u8>, answer: Vec<u8>) -> Exchange {
        Exchange {
            msg_type,
            request,
            answer,
            agreement: None,
        }
    }
}

#[test]
fn a_realistic_session_is_logged_completely_and_verifies() {
    // The first notification attempt gets no answer (the connection closes): logged as such,
    // and the retry after it is answered.
    let callback = Callback::start(1);
    let mut node = AuditNode::start(
        &format!("callback_url = \"{}\"\n", callback.url()),
        "checkpoint_every = \"300ms\"\n",
        "[notify]\npoll_every = \"100ms\"\nschedule = \"200ms, 1h\"\n",
        |_| {},
    );
    let inst = node.tenpay.clone();
    let inst = &*inst;
    let mut exchanges = sign_agreement(inst, ZHANG);
    let agreement = exchanges[1].agreement.clone().unwrap();
    let mut call = |msg_type: MsgType, fields: &[(&str, &str)]| {
        let request = inst.message(msg_type, fields);
        let answer = inst.send(msg_type, &request);
        assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
        exchanges.push(Exchange::new(msg_type, request, answer.raw.clone()));
        answer
    };
    let debit_serial = inst.next_id("D");
    let debit = call(
        MsgType::Debit,
        &[
            ("ReqSerial", &debit_serial),
            ("AgrmtNo", &agreement),
            ("Amt", "10000"),
            ("Ccy", "CNY"),
        ],
    );
    let debit_txn = txn_of(&debit.raw).expect("a debit answer names its transaction");
    call(
        MsgType::Credit,
        &[
            ("ReqSerial", &inst.next_id("CR")),
            ("AcctNo", LI.0),
            ("AcctNm", LI.1),
            ("Amt", "2500"),
            ("Ccy", "CNY"),
        ],
    );
    call(
        MsgType::Refund,
        &[
            ("ReqSerial", &inst.next_id("RF")),
            ("OrigReqSerial", &debit_serial),
            ("Amt", "4000"),
            ("Ccy", "CNY"),
        ],
    );
    let query = call(MsgType::Query, &[("QrySerial", &debit_serial)]);
    assert_eq!(txn_of(&query.raw), Some(debit_txn));

    // Refused at the worker: the signature does not cover what arrived (an amount changed).
    let good = inst.message(
        MsgType::Debit,
        &[
            ("ReqSerial", &inst.next_id("D")),
            ("AgrmtNo", &agreement),
            ("Amt", "100"),
            ("Ccy", "CNY"),
        ],
    );
    let forged = String::from_utf8(good)
        .unwrap()
        .replace("<Amt>100</Amt>", "<Amt>900</Amt>")
        .into_bytes();
    let refused = inst.send(MsgType::Debit, &forged);
    assert_eq!(refused.code(), "2002", "{:?}", refused.fields);
    // Refused at the edge: a sender kunpay does not know.
    let keys = node.dir.path().join("keys");
    let (ghost, _) = TestInstitution::create(node.dir.path(), "GHOST", &keys, &node.base);
    let stranger = ghost.message(MsgType::Query, &[("QrySerial", "X1")]);
    let unknown = inst.send(MsgType::Query, &stranger);
    assert_eq!(unknown.code(), "2001", "{:?}", unknown.fields);

    // Notifications: one per final state (debit, credit, refund), each delivered once.
    let mut conn = node.conn();
    wait_for(
        "three notifications delivered",
        Duration::from_secs(30),
        || {
            count(
                &mut conn,
                "SELECT count(*) AS n FROM notification WHERE status = 'DELIVERED'",
            ) == 3
        },
    );
    #[derive(QueryableByName)]
    struct Event {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        event_id: uuid::Uuid,
    }
    let event = diesel::sql_query(format!(
        "SELECT event_id FROM notification WHERE txn_id = '{debit_txn}'"
    ))
    .get_result::<Event>(&mut conn)
    .unwrap()
    .event_id;

    // An operator action: kunpayctl replays the debit's notification.
    let (code, stdout, stderr) = run(kunpayctl()
        .args(["notify", "replay"])
        .arg(event.simple().to_string())
        .arg("--config")
        .arg(node.dir.config_path())
        .args(["--by", "auditor-ann"]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Two more: a card put on the black list and taken off again; adding it twice changes
    // nothing and is no action.
    for args in [
        &["add", "black", "card", LI.0, "--reason", "stolen"][..],
        &["add", "black", "card", LI.0, "--reason", "again"][..],
        &["remove", "black", "card", LI.0, "--reason", "found"][..],
    ] {
        let (code, stdout, stderr) = run(kunpayctl()
            .args(["risk", "list"])
            .args(args)
            .arg("--config")
            .arg(node.dir.config_path())
            .args(["--by", "auditor-ann"]));
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
    wait_for(
        "the replayed notification and the logged operator actions",
        Duration::from_secs(30),
        || {
            callback.received().len() == 4
                && count(
                    &mut conn,
                    "SELECT count(*) AS n FROM operator_action WHERE audit_seq IS NOT NULL",
                ) == 3
        },
    );
    wait_for(
        "the checkpoint after the last record",
        Duration::from_secs(10),
        || {
            node.metric("kunpay_audit_operator_actions_pending") == 0.0
                && node.metric("kunpay_audit_last_checkpoint_seq")
                    >= node.metric("kunpay_audit_records_appended_total")
        },
    );
    assert_eq!(node.metric("kunpay_audit_log_usable"), 1.0);
    assert_eq!(node.metric("kunpay_audit_append_failures_total"), 0.0);
    assert!(node.metric("kunpay_audit_checkpoints_total") >= 1.0);
    // Waited for: 6 answers, 2 refusals, 5 notification attempts, 4 answers and 1 record of
    // no answer, 3 operator actions.
    assert_eq!(
        node.metric("kunpay_audit_append_duration_seconds_count"),
        21.0
    );
    node.stop();

    // The auditors' verifier, as they run it.
    let (code, report) = node.verify();
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("RESULT: OK"), "{report}");
    assert!(
        report.contains("TENPAY"),
        "inbound signatures re-verified: {report}"
    );

    let records = read_log(&node.audit_dir);
    for exchange in &exchanges {
        assert_exchange(
            &records,
            "TENPAY",
            exchange.msg_type,
            &exchange.request,
            &exchange.answer,
            true,
        );
    }
    assert_exchange(
        &records,
        "TENPAY",
        MsgType::Debit,
        &forged,
        &refused.raw,
        false,
    );
    assert_exchange(
        &records,
        "unknown",
        MsgType::Query,
        &stranger,
        &unknown.raw,
        false,
    );

    // Every notification attempt as POSTed, and the institution's answer to it.
    let delivered = callback.received();
    for body in &delivered {
        let sent: Vec<&Record> = records
            .iter()
            .filter(|r| r.direction == Direction::Out && &r.payload == body)
            .collect();
        assert!(!sent.is_empty(), "a notification POSTed is logged");
        assert!(sent.iter().all(|r| r.message_type == "TXN_NOTIFY"));
    }
    let notify_out = records
        .iter()
        .filter(|r| r.message_type == "TXN_NOTIFY")
        .count();
    assert_eq!(
        notify_out, 5,
        "three first attempts, the retry of the unanswered one and the replay"
    );
    let unanswered: Vec<&Record> = records
        .iter()
        .filter(|r| r.message_type == "TXN_NOTIFY_UNANSWERED")
        .collect();
    assert_eq!(unanswered.len(), 1, "the attempt whose connection closed");
    let unanswered = unanswered[0];
    assert_eq!(unanswered.direction, Direction::Internal);
    assert_eq!(unanswered.peer, "TENPAY");
    let text = String::from_utf8(unanswered.payload.clone()).unwrap();
    assert!(
        text.starts_with("kunpay notification attempt v1\nevent: ")
            && text.contains("\noutcome: no answer\n")
            && text.contains("\nerror: "),
        "{text}"
    );
    let attempt = records
        .iter()
        .rev()
        .find(|r| r.seq < unanswered.seq && r.message_type == "TXN_NOTIFY")
        .unwrap();
    assert_eq!(attempt.txn_id, unanswered.txn_id, "it follows its attempt");
    let answers: Vec<&Record> = records
        .iter()
        .filter(|r| r.message_type == "TXN_NOTIFY_ANSWER")
        .collect();
    assert_eq!(answers.len(), 4);
    for answer in &answers {
        assert_eq!(answer.direction, Direction::In);
        assert_eq!(answer.payload, b"HTTP 200\n\nSUCCESS");
        let attempt = records
            .iter()
            .rev()
            .find(|r| r.seq < answer.seq && r.message_type == "TXN_NOTIFY")
            .unwrap();
        assert_eq!(
            attempt.txn_id, answer.txn_id,
            "the answer follows its attempt"
        );
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r.message_type == "TXN_NOTIFY" && r.txn_id == Some(debit_txn))
            .count(),
        2 + usize::from(unanswered.txn_id == Some(debit_txn)),
        "the debit's notification: first attempt (and its retry) and the replay"
    );

    // The operator actions: each once, in order, as the rows say.
    let actions: Vec<&Record> = records
        .iter()
        .filter(|r| r.direction == Direction::Internal && r.peer.starts_with("operator:"))
        .collect();
    assert_eq!(
        actions
            .iter()
            .map(|r| r.message_type.as_str())
            .collect::<Vec<_>>(),
        ["NOTIFY_REPLAY", "RISK_LIST_ADD", "RISK_LIST_REMOVE"],
        "each operator action logged once, in order"
    );
    for listed in &actions[1..] {
        let text = String::from_utf8(listed.payload.clone()).unwrap();
        assert!(text.contains("value: 622202*********0131\n"), "{text}");
        assert!(!text.contains(LI.0), "no card number in clear: {text}");
        assert_eq!(listed.txn_id, None);
    }
    let action = actions[0];
    assert_eq!(action.peer, "operator:auditor-ann");
    assert_eq!(action.message_type, "NOTIFY_REPLAY");
    assert_eq!(action.txn_id, Some(debit_txn));
    let text = String::from_utf8(action.payload.clone()).unwrap();
    assert!(text.starts_with("kunpay operator action v1\n"), "{text}");
    assert!(
        text.contains(&format!("event: {}", event.simple())),
        "{text}"
    );
    let rows = kunpay::audit::operator::all(&mut node.conn(), 10).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.audit_seq).collect::<Vec<_>>(),
        actions
            .iter()
            .map(|r| Some(r.seq as i64))
            .collect::<Vec<_>>()
    );
    assert!(
        rows.iter()
            .all(|r| r.audit_node.as_deref() == Some("test-node"))
    );
}

#[test]
fn a_daemon_killed_under_load_leaves_a_log_that_verifies_and_holds_every_answer() {
    const CLIENTS: usize = 6;
    let mut node = AuditNode::start(
        "workers = 4\n",
        "checkpoint_every = \"200ms\"\ncheckpoint_every_records = 50\n",
        "[core]\nsimulator_generated_accounts = 8\n",
        |_| {},
    );
    let inst = node.tenpay.clone();
    let mut agreements = Vec::new();
    let mut setup = Vec::new();
    for index in 0..CLIENTS as u32 {
        let account = kunpay::core::sim::generated_account(index);
        let exchanges = sign_agreement(
            &inst,
            (
                &account.account_no,
                &account.name,
                &account.id_no,
                &account.phone,
            ),
        );
        agreements.push(exchanges[1].agreement.clone().unwrap());
        setup.extend(exchanges);
    }

    // Clients send debits and queries until the daemon is gone; each keeps what it received.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = agreements
        .into_iter()
        .enumerate()
        .map(|(client, agreement)| {
            let (inst, stop, answered) = (inst.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut received = Vec::new();
                let mut serials: Vec<String> = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (msg_type, request) = if n % 4 == 3 && !serials.is_empty() {
                        let serial = serials[n % serials.len()].as_str();
                        (
                            MsgType::Query,
                            inst.message(MsgType::Query, &[("QrySerial", serial)]),
                        )
                    } else {
                        let serial = format!("K{client}x{n}");
                        let request = inst.message(
                            MsgType::Debit,
                            &[
                                ("ReqSerial", &serial),
                                ("AgrmtNo", &agreement),
                                ("Amt", "100"),
                                ("Ccy", "CNY"),
                            ],
                        );
                        serials.push(serial);
                        (MsgType::Debit, request)
                    };
                    match inst.try_post(msg_type, &request) {
                        Some((status, answer)) => {
                            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
                            answered.fetch_add(1, Ordering::SeqCst);
                            received.push(Exchange::new(msg_type, request, answer));
                        }
                        // The daemon is gone (killed mid-request, or refusing connections).
                        None => break,
                    }
                }
                received
            })
        })
        .collect();
    wait_for("load on the daemon", Duration::from_secs(60), || {
        answered.load(Ordering::SeqCst) >= 150
    });
    node.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    node.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("SIGKILL ends the daemon");
    stop.store(true, Ordering::SeqCst);
    let mut received: Vec<Exchange> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(received.len() >= 150, "{} answers", received.len());

    // The log as the crash left it: it verifies (a torn tail and unsealed records are
    // warnings), and every answer a client received is in it with its request.
    let (code, report) = node.verify();
    assert_eq!(code, 0, "{report}");
    // Shown with the test's output: whether the kill left a torn tail this time.
    eprintln!(
        "{} answers received; the log after SIGKILL:\n{report}",
        received.len()
    );
    let records = read_log(&node.audit_dir);
    received.extend(setup);
    for exchange in &received {
        assert_exchange(
            &records,
            "TENPAY",
            exchange.msg_type,
            &exchange.request,
            &exchange.answer,
            true,
        );
    }
    let last_before = records.last().unwrap().seq;

    // The next start recovers the end, seals it, and goes on from there.
    node.restart();
    let inst = inst.clone();
    let request = inst.message(MsgType::Query, &[("QrySerial", "K0x0")]);
    let answer = inst.send(MsgType::Query, &request);
    assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
    node.stop();
    let (code, report) = node.verify();
    assert_eq!(code, 0, "{report}");
    assert!(
        !report.contains("not yet sealed"),
        "a clean stop seals everything: {report}"
    );
    let after = read_log(&node.audit_dir);
    assert_eq!(
        &after[..records.len()],
        &records[..],
        "a restart rewrites nothing that was acknowledged"
    );
    let (_, answered_at) = assert_exchange(
        &after,
        "TENPAY",
        MsgType::Query,
        &request,
        &answer.raw,
        true,
    );
    assert!(answered_at > last_before);
}

#[test]
fn a_log_that_cannot_be_written_stops_answers_and_readiness() {
    // The kernel refuses to grow any file of the daemon past 192 KiB (EFBIG, as a full disk
    // would refuse): the audit segment reaches it after some requests.
    const LIMIT: u64 = 192 * 1024;
    let mut node = AuditNode::start("", "max_segment_size = \"16MiB\"\n", "", |command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls (sigaction, setrlimit) between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGXFSZ,
                    nix::sys::signal::SigHandler::SigIgn,
                )
                .map_err(std::io::Error::from)?;
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_FSIZE,
                    LIMIT,
                    LIMIT,
                )
                .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    });
    let inst = node.tenpay.clone();
    let inst = &*inst;
    let agreement = sign_agreement(inst, ZHANG)[1].agreement.clone().unwrap();
    assert_eq!(status_of(&node.dir.ops_url("/readiness")), 200);
    let debit = |n: usize| {
        inst.message(
            MsgType::Debit,
            &[
                ("ReqSerial", &format!("F{n}")),
                ("AgrmtNo", &agreement),
                ("Amt", "1"),
                ("Ccy", "CNY"),
            ],
        )
    };
    let mut answered = Vec::new();
    let mut failed_at = None;
    for n in 0..400 {
        let request = debit(n);
        let (status, raw) = inst.post_raw(MsgType::Debit, &request);
        if status == 500 {
            let answer = inst.verify_answer(raw);
            assert_eq!(answer.code(), "9999", "{:?}", answer.fields);
            failed_at = Some(n);
            break;
        }
        assert_eq!(status, 200);
        answered.push(Exchange::new(MsgType::Debit, request, raw));
    }
    let failed_at = failed_at.expect("the log hit the file size limit");
    assert!(failed_at > 5, "some requests were logged first");

    // Not ready, and saying why; nothing acted on any more.
    assert_eq!(status_of(&node.dir.ops_url("/readiness")), 503);
    assert_eq!(status_of(&node.dir.ops_url("/primary")), 503);
    let (_, status) = http_get(&node.dir.ops_url("/status")).unwrap();
    assert!(status.contains("audit log failed"), "{status}");
    assert_eq!(node.metric("kunpay_audit_log_usable"), 0.0);
    wait_for("the failure counted", Duration::from_secs(5), || {
        node.metric("kunpay_audit_append_failures_total") >= 1.0
    });
    let stderr = node.daemon.stderr();
    assert!(
        stderr.contains("audit log failed") && stderr.contains("restart kunpayd"),
        "{stderr}"
    );
    let mut conn = node.conn();
    let journaled = count(&mut conn, "SELECT count(*) AS n FROM txn");
    for n in 1000..1003 {
        let (status, raw) = inst.post_raw(MsgType::Debit, &debit(n));
        assert_eq!(status, 500);
        assert_eq!(inst.verify_answer(raw).code(), "9999");
    }
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM txn"),
        journaled,
        "no request is acted on once the log failed"
    );

    // What was answered 200 is in the log, which verifies up to the torn write.
    node.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    node.daemon.wait_exit(Duration::from_secs(60)).unwrap();
    let (code, report) = node.verify();
    assert_eq!(code, 0, "{report}");
    let records = read_log(&node.audit_dir);
    for exchange in &answered {
        assert_exchange(
            &records,
            "TENPAY",
            exchange.msg_type,
            &exchange.request,
            &exchange.answer,
            true,
        );
    }
}

#[test]
fn an_operator_action_interrupted_between_append_and_mark_is_not_logged_twice() {
    // The relay's own steps against a real database and log: a crash after the append and
    // before the mark leaves the row claimed; the next round finds the record, marks the row,
    // and appends nothing.
    let db = TestDb::migrated();
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = dir.path().join("audit");
    let key = PrivateKey::generate().unwrap();
    let open = || {
        kunpay::audit::AuditLog::open(
            &audit_dir,
            kunpay::audit::AuditSettings {
                node_id: "node-x".into(),
                max_segment_bytes: 1 << 20,
                checkpoint_every_records: 1000,
                checkpoint_every: Duration::from_secs(60),
                queue_bound: 16,
            },
            kunpay::audit::AuditKey {
                key_id: "k1".into(),
                signer: kunpay::crypto::sm2::Signer::new(&key, "1234567812345678").unwrap(),
            },
        )
        .unwrap()
    };
    let state = kunpay::ops::NodeState::new(
        "node-x".into(),
        kunpay::config::Role::Active,
        kunpay::db::connect(&kunpay::db::ConnectSettings {
            url: kunpay::config::Secret::new(db.url().to_string()),
            password: None,
            pool_max_size: 1,
            pool_min_idle: 0,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            application_name: "audit test".into(),
        })
        .unwrap(),
        Duration::from_secs(2),
        Duration::from_secs(10),
    );
    let mut conn = db.connect();
    let now = chrono::Utc::now();
    let record = |conn: &mut PgConnection, note: &str| {
        kunpay::audit::operator::record(
            conn,
            &kunpay::audit::operator::OperatorAction {
                operator: "ops bob",
                command: "RISK_LIST_ADD",
                txn_id: None,
                detail: &[("reason", note.to_string())],
            },
            now,
        )
        .unwrap()
    };
    let first = record(&mut conn, "first");
    let second = record(&mut conn, "second");

    // Run 1: the first action is claimed and appended, then the node "crashes" before the mark.
    {
        let sink = kunpay::audit::AuditSink::new(open(), state.clone());
        let row = &kunpay::audit::operator::unlogged(&mut conn, 10).unwrap()[0];
        assert_eq!(row.action_id, first);
        diesel::sql_query(format!(
            "UPDATE operator_action SET claimed_by = 'node-x', claimed_at = now() WHERE action_id = {first}"
        ))
        .execute(&mut conn)
        .unwrap();
        let bytes = kunpay::audit::operator::record_bytes(row, &[]);
        sink.append(kunpay::audit::NewRecord {
            direction: Direction::Internal,
            peer: kunpay::audit::operator::peer(&row.operator),
            message_type: row.command.clone(),
            txn_id: None,
            peer_signature: PeerSignature::None,
            bytes,
        })
        .unwrap();
        sink.close().unwrap();
    }
    // Run 2: the relay settles the claim from the log and logs only the second action.
    let sink = kunpay::audit::AuditSink::new(open(), state.clone());
    let round =
        kunpay::audit::operator::relay_round(&mut conn, &sink, &audit_dir, "node-x").unwrap();
    assert_eq!(
        round,
        kunpay::audit::operator::RelayRound {
            logged: 1,
            found: 1
        }
    );
    let again =
        kunpay::audit::operator::relay_round(&mut conn, &sink, &audit_dir, "node-x").unwrap();
    assert_eq!(again, kunpay::audit::operator::RelayRound::default());
    sink.close().unwrap();

    let records = read_log(&audit_dir);
    let actions: Vec<&Record> = records
        .iter()
        .filter(|r| r.peer == "operator:ops_bob")
        .collect();
    assert_eq!(actions.len(), 2, "each action once");
    let rows = kunpay::audit::operator::all(&mut conn, 10).unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.action_id, r.audit_seq.map(|s| s as u64)))
            .collect::<Vec<_>>(),
        vec![
            (first, Some(actions[0].seq)),
            (second, Some(actions[1].seq))
        ]
    );
    let text = String::from_utf8(actions[1].payload.clone()).unwrap();
    assert!(text.contains("reason: second\n"), "{text}");
    assert!(!text.contains("in-doubt"), "{text}");
}

// ------------------------------------------------------------------------------------------
// The core link over RabbitMQ

#[test]
fn core_messages_on_the_mq_bridge_are_logged_whatever_their_verdict() {
    use kunpay::core::wire::{CoreReply, Envelope, MessageType, now_ms};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queues = Queues::new();
    // The core answers every request twice (a duplicate reply is late by definition).
    let coresim = kunpay::core::coresim::CoreSimService::start(
        runtime.handle().clone(),
        queues.only(&queues.request, "coresim"),
        keys(),
        Arc::new(kunpay::core::sim::CoreSimulator::with_demo_accounts()),
        kunpay::core::coresim::ServiceFaults {
            duplicate_every: 1,
            ..Default::default()
        },
    );
    assert!(coresim.wait_connected(Duration::from_secs(20)));
    let scratch = tempfile::tempdir().unwrap();
    let mac_file = scratch.path().join("core-mac.key");
    write_secret(&mac_file, MAC_HEX);
    let (scheme, user, password, host) = broker_parts();
    let password_file = scratch.path().join("amqp-password");
    write_secret(&password_file, &password);
    let mut node = AuditNode::start(
        "",
        "checkpoint_every = \"300ms\"\n",
        &format!(
            "[core]\nlink = \"amqp\"\n\n[core.amqp]\nurl = \"{scheme}://{user}@{host}/%2f\"\n\
             password_file = \"{}\"\nrequest_queue = \"{}\"\nreply_queue = \"{}\"\n\
             dead_letter_queue = \"{}\"\nmac_key_id = \"test-2026\"\nmac_key_file = \"{}\"\n\
             reply_timeout = \"10s\"\n",
            password_file.display(),
            queues.request,
            queues.reply,
            queues.dead,
            mac_file.display(),
        ),
        |_| {},
    );
    let metric_line = |line: &str| -> f64 {
        let (_, text) = http_get(&node.dir.ops_url("/metrics")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    wait_for("the core link", Duration::from_secs(30), || {
        metric_line("kunpay_core_link_connected ") == 1.0
    });
    let inst = node.tenpay.clone();
    let mut exchanges = sign_agreement(&inst, ZHANG);
    let agreement = exchanges[1].agreement.clone().unwrap();
    let mut debits = Vec::new();
    for _ in 0..3 {
        let request = inst.message(
            MsgType::Debit,
            &[
                ("ReqSerial", &inst.next_id("D")),
                ("AgrmtNo", &agreement),
                ("Amt", "100"),
                ("Ccy", "CNY"),
            ],
        );
        let answer = inst.send(MsgType::Debit, &request);
        assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
        debits.push(Exchange::new(MsgType::Debit, request, answer.raw));
    }
    // A forger's posting reply: right key id, wrong key. Refused (bad MAC), dead-lettered, and
    // logged as received all the same.
    let victim = uuid::Uuid::now_v7();
    let forger_keys =
        kunpay::core::wire::MacKeys::single("test-2026", zeroize::Zeroizing::new(vec![0x42; 32]))
            .unwrap();
    let forged = Envelope::seal(
        &forger_keys,
        MessageType::PostReply,
        &victim.simple().to_string(),
        now_ms(),
        CoreReply::Post {
            txn_id: victim,
            outcome: kunpay::core::PostingOutcome::Posted {
                core_ref: "FORGED".into(),
            },
        }
        .encode(),
    );
    let idle: kunpay::core::amqp::Handler = Arc::new(|_| {
        let settle: std::pin::Pin<
            Box<dyn std::future::Future<Output = kunpay::core::amqp::Disposition> + Send>,
        > = Box::pin(async { kunpay::core::amqp::Disposition::Requeue });
        settle
    });
    // Deleted with the test's queues (common::amqp).
    let forger_queue = format!("{}.forger", queues.request);
    let forger = kunpay::core::amqp::AmqpLink::start(
        runtime.handle().clone(),
        queues.only(&forger_queue, "forger"),
        idle,
    );
    assert!(forger.wait_connected(Duration::from_secs(20)));
    forger
        .publish_blocking(&queues.reply, &forged, None)
        .unwrap();
    forger.stop();
    wait_for("the verdicts", Duration::from_secs(30), || {
        metric_line("kunpay_core_replies_total{result=\"bad_mac\"} ") == 1.0
            && metric_line("kunpay_core_replies_total{result=\"late\"} ") >= 3.0
    });
    node.stop();
    drop(coresim);

    let (code, report) = node.verify();
    assert_eq!(code, 0, "{report}");
    let records = read_log(&node.audit_dir);
    exchanges.extend(debits.drain(..).inspect(|debit| {
        let (request_seq, answer_seq) = assert_exchange(
            &records,
            "TENPAY",
            MsgType::Debit,
            &debit.request,
            &debit.answer,
            true,
        );
        let txn = txn_of(&debit.answer).unwrap();
        let core: Vec<&Record> = records
            .iter()
            .filter(|r| r.peer == "core" && r.txn_id == Some(txn))
            .collect();
        // The posting published, its reply and the duplicate.
        assert_eq!(core.len(), 3, "{core:?}");
        assert_eq!(core[0].direction, Direction::Out);
        assert_eq!(core[0].message_type, MessageType::PostRequest.name());
        for reply in &core[1..] {
            assert_eq!(reply.direction, Direction::In);
            assert_eq!(reply.message_type, MessageType::PostReply.name());
        }
        let text = String::from_utf8_lossy(&core[0].payload).into_owned();
        assert!(
            text.starts_with("type: kunpay.post.request\nmessage-id: "),
            "{text}"
        );
        assert!(
            text.contains(&format!("\ncorrelation-id: {}\n", txn.simple())),
            "{text}"
        );
        assert!(text.contains("\nmac: ") && text.contains("\n\n{"), "{text}");
        assert!(
            request_seq < core[0].seq && core[0].seq < core[1].seq && core[1].seq < answer_seq,
            "request, core request, core reply, answer: in this order"
        );
    }));
    for exchange in &exchanges {
        assert_exchange(
            &records,
            "TENPAY",
            exchange.msg_type,
            &exchange.request,
            &exchange.answer,
            true,
        );
    }
    // The binding and the code check of the agreement crossed the link too.
    for name in [
        MessageType::BindRequest,
        MessageType::BindReply,
        MessageType::CodeRequest,
        MessageType::CodeReply,
    ] {
        assert!(
            records.iter().any(|r| r.message_type == name.name()),
            "{} logged",
            name.name()
        );
    }
    let forged_record: Vec<&Record> = records
        .iter()
        .filter(|r| r.txn_id == Some(victim))
        .collect();
    assert_eq!(forged_record.len(), 1, "the forged reply, once");
    assert_eq!(forged_record[0].direction, Direction::In);
    assert!(forged_record[0].payload.ends_with(&forged.body));
    let text = String::from_utf8_lossy(&forged_record[0].payload).into_owned();
    assert!(
        text.contains(&format!("\nmac: {}\n", forged.mac_hex())),
        "{text}"
    );
    assert!(text.contains("\nredelivered: false\n"), "{text}");
}
