//! The MQ bridge to core banking against the real RabbitMQ: postings, bindings and queries
//! through the broker to the core simulator service; forged, unmatched, duplicate and late
//! replies; a broker that is not there; and a daemon whose core is `kunpay-coresim`.

mod common;

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::amqp::*;
use common::institution::TestInstitution;
use common::*;
use diesel::prelude::*;
use kunpay::core::amqp::{AmqpLink, AmqpSettings, Disposition, Handler, RawMessage};
use kunpay::core::bridge::{BridgeSettings, LateReply, MqCore, Refusal};
use kunpay::core::coresim::{CoreSimService, ServiceFaults};
use kunpay::core::sim::CoreSimulator;
use kunpay::core::wire::{CoreReply, Envelope, MacKeys, MessageType, now_ms};
use kunpay::core::{
    BindOutcome, BindRequest, CodeCheck, CoreError, CoreLink, Posting, PostingKind, PostingOutcome,
};
use kunpay::payment::request::MsgType;
use uuid::Uuid;
use zeroize::Zeroizing;

struct Pair {
    queues: Queues,
    core: Arc<CoreSimulator>,
    coresim: CoreSimService,
    bridge: MqCore,
    late: Receiver<LateReply>,
    runtime: tokio::runtime::Runtime,
}

fn start_pair(faults: ServiceFaults, reply_timeout: Duration) -> Pair {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queues = Queues::new();
    let core = Arc::new(CoreSimulator::with_demo_accounts());
    let coresim = CoreSimService::start(
        runtime.handle().clone(),
        queues.only(&queues.request, "coresim"),
        keys(),
        core.clone(),
        faults,
    );
    let (bridge, late) = MqCore::start(
        runtime.handle().clone(),
        queues.settings(&queues.reply, "kunpay"),
        BridgeSettings {
            request_queue: queues.request.clone(),
            reply_queue: queues.reply.clone(),
            reply_timeout,
            max_in_flight: 64,
            late_queue: 64,
            max_queued: 1000,
        },
        keys(),
    );
    assert!(
        bridge.wait_connected(Duration::from_secs(20))
            && coresim.wait_connected(Duration::from_secs(20)),
        "RabbitMQ at {} (make test-deps starts it)",
        amqp_url()
    );
    Pair {
        queues,
        core,
        coresim,
        bridge,
        late,
        runtime,
    }
}

const ZHANG_ACCOUNT: &str = "6222021234567890123";

fn debit(amount_fen: i64) -> Posting {
    Posting {
        txn_id: Uuid::now_v7(),
        kind: PostingKind::Debit,
        account_no: ZHANG_ACCOUNT.into(),
        amount_fen,
    }
}

#[test]
fn postings_bindings_and_queries_go_through_the_broker() {
    let pair = start_pair(ServiceFaults::default(), Duration::from_secs(10));
    let before = pair.core.balance(ZHANG_ACCOUNT).unwrap();
    let bind = pair
        .bridge
        .request_binding(&BindRequest {
            agreement_no: "AGR-MQ-1".into(),
            account_no: ZHANG_ACCOUNT.into(),
            account_name: "张三".into(),
            id_no: "110101199003077774".into(),
            phone: "13812345678".into(),
        })
        .unwrap();
    assert!(matches!(bind, BindOutcome::CodeSent { .. }), "{bind:?}");
    let code = kunpay::core::sim::verification_code("AGR-MQ-1");
    assert_eq!(
        pair.bridge.check_code("AGR-MQ-1", &code).unwrap(),
        CodeCheck::Valid
    );
    assert_eq!(
        pair.bridge.check_code("AGR-MQ-1", "000000").unwrap(),
        CodeCheck::Wrong
    );

    let posting = debit(1_234);
    let first = pair.bridge.post(&posting).unwrap();
    assert!(matches!(first, PostingOutcome::Posted { .. }), "{first:?}");
    assert_eq!(pair.core.balance(ZHANG_ACCOUNT).unwrap(), before - 1_234);
    // A repeated posting (a republish after a crash) is answered with the first outcome and
    // moves no money.
    assert_eq!(pair.bridge.post(&posting).unwrap(), first);
    assert_eq!(pair.core.balance(ZHANG_ACCOUNT).unwrap(), before - 1_234);
    assert_eq!(
        pair.bridge.query_posting(posting.txn_id).unwrap(),
        Some(first)
    );
    assert_eq!(pair.bridge.query_posting(Uuid::now_v7()).unwrap(), None);
    let too_much = pair.bridge.post(&debit(i64::MAX / 2)).unwrap();
    assert!(
        matches!(too_much, PostingOutcome::Rejected(_)),
        "{too_much:?}"
    );
    assert_eq!(pair.bridge.in_flight(), 0);
    assert!(pair.late.try_recv().is_err(), "nothing was late");
    assert_eq!(pair.queues.depth(&pair.queues.dead), 0);
}

fn idle_handler() -> Handler {
    Arc::new(|_: RawMessage| {
        let settle: std::pin::Pin<Box<dyn std::future::Future<Output = Disposition> + Send>> =
            Box::pin(async { Disposition::Requeue });
        settle
    })
}

/// Publishes `envelope` to the reply queue the way a core would (or a forger).
fn publish_reply(pair: &Pair, envelope: &Envelope) {
    let link = AmqpLink::start(
        pair.runtime.handle().clone(),
        AmqpSettings {
            // Consumes the dead-letter queue only to have something to consume; never acks.
            consume_queue: format!("{}.forger", pair.queues.request),
            queues: vec![format!("{}.forger", pair.queues.request)],
            ..pair.queues.settings(&pair.queues.reply, "forger")
        },
        idle_handler(),
    );
    assert!(link.wait_connected(Duration::from_secs(20)));
    link.publish_blocking(&pair.queues.reply, envelope, None)
        .unwrap();
    link.stop();
}

#[test]
fn forged_malformed_and_unmatched_replies_are_refused() {
    let pair = start_pair(ServiceFaults::default(), Duration::from_secs(10));
    let before = pair.core.balance(ZHANG_ACCOUNT).unwrap();
    let victim = Uuid::now_v7();
    // Forged: a posting reply under the right key id with the wrong key.
    let forger_keys = MacKeys::single("test-2026", Zeroizing::new(vec![0x42; 32])).unwrap();
    let forged = CoreReply::Post {
        txn_id: victim,
        outcome: PostingOutcome::Posted {
            core_ref: "FORGED".into(),
        },
    };
    publish_reply(
        &pair,
        &Envelope::seal(
            &forger_keys,
            MessageType::PostReply,
            &victim.simple().to_string(),
            now_ms(),
            forged.encode(),
        ),
    );
    // Malformed: a valid MAC over a body that is not a reply.
    publish_reply(
        &pair,
        &Envelope::seal(
            &keys(),
            MessageType::PostReply,
            &victim.simple().to_string(),
            now_ms(),
            br#"{"txn_id":"nonsense","status":"POSTED","core_ref":"X"}"#.to_vec(),
        ),
    );
    // Unmatched: a valid code reply nobody asked for.
    publish_reply(
        &pair,
        &Envelope::seal(
            &keys(),
            MessageType::CodeReply,
            "no-such-request",
            now_ms(),
            CoreReply::CheckCode(CodeCheck::Valid).encode(),
        ),
    );
    let counters = pair.bridge.counters();
    for _ in 0..100 {
        if counters.refused(Refusal::UnknownCorrelation) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(counters.refused(Refusal::BadMac), 1);
    assert_eq!(counters.refused(Refusal::Malformed), 1);
    assert_eq!(counters.refused(Refusal::UnknownCorrelation), 1);
    // The forged and the malformed reply wait in the dead-letter queue for a person.
    assert_eq!(pair.queues.depth(&pair.queues.dead), 2);
    assert!(
        pair.late.try_recv().is_err(),
        "a forged reply must never reach the journal"
    );
    // The link still works, and nothing moved money.
    assert!(matches!(
        pair.bridge.post(&debit(100)).unwrap(),
        PostingOutcome::Posted { .. }
    ));
    assert_eq!(pair.core.balance(ZHANG_ACCOUNT).unwrap(), before - 100);
}

#[test]
fn duplicate_replies_are_late_and_carry_the_same_outcome() {
    let pair = start_pair(
        ServiceFaults {
            duplicate_every: 1,
            ..ServiceFaults::default()
        },
        Duration::from_secs(10),
    );
    let before = pair.core.balance(ZHANG_ACCOUNT).unwrap();
    let posting = debit(500);
    let outcome = pair.bridge.post(&posting).unwrap();
    let late = pair.late.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        late,
        LateReply {
            txn_id: posting.txn_id,
            outcome: outcome.clone()
        }
    );
    assert_eq!(pair.core.balance(ZHANG_ACCOUNT).unwrap(), before - 500);
}

#[test]
fn a_reply_after_the_timeout_goes_to_reconciliation_and_a_lost_one_is_found_by_query() {
    let pair = start_pair(
        ServiceFaults {
            latency: Duration::from_millis(800),
            ..ServiceFaults::default()
        },
        Duration::from_millis(200),
    );
    let posting = debit(300);
    assert_eq!(pair.bridge.post(&posting), Err(CoreError::Timeout));
    let late = pair.late.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(late.txn_id, posting.txn_id);
    assert!(matches!(late.outcome, PostingOutcome::Posted { .. }));

    pair.coresim.set_faults(ServiceFaults {
        drop_every: 1,
        ..ServiceFaults::default()
    });
    let lost = debit(400);
    assert_eq!(pair.bridge.post(&lost), Err(CoreError::Timeout));
    pair.coresim.set_faults(ServiceFaults::default());
    let found = pair.bridge.query_posting(lost.txn_id).unwrap();
    assert!(
        matches!(found, Some(PostingOutcome::Posted { .. })),
        "{found:?}"
    );
    assert!(
        pair.bridge
            .counters()
            .timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

#[test]
fn without_a_broker_a_posting_is_queued_until_the_outbox_is_full() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queues = Queues::new();
    let mut settings = queues.settings(&queues.reply, "kunpay");
    settings.uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let (bridge, _late) = MqCore::start(
        runtime.handle().clone(),
        settings,
        BridgeSettings {
            request_queue: queues.request.clone(),
            reply_queue: queues.reply.clone(),
            reply_timeout: Duration::from_secs(1),
            max_in_flight: 4,
            late_queue: 4,
            max_queued: 10,
        },
        keys(),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!bridge.is_connected());
    // Journaled by the flow and owed: queued in the outbox, delivered when the broker is back.
    match bridge.post(&debit(100)) {
        Err(CoreError::Queued(why)) => assert!(why.contains("not connected"), "{why}"),
        other => panic!("expected queued, got {other:?}"),
    }
    // Other requests cannot wait in the outbox.
    assert!(matches!(
        bridge.query_posting(Uuid::now_v7()),
        Err(CoreError::Unavailable(_))
    ));
    bridge.set_backlog(10);
    assert!(bridge.outbox_full());
    match bridge.post(&debit(100)) {
        Err(CoreError::Unavailable(why)) => assert!(why.contains("outbox is full"), "{why}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(bridge.in_flight(), 0);
}

fn count(db_url: &str, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(db_url).unwrap();
    diesel::sql_query(sql).get_result::<N>(&mut conn).unwrap().n
}

/// A daemon whose core link is the MQ bridge: its own database and directory, the test MAC key
/// and broker password in 0600 files, the broker reached at `broker` (host:port; a proxy when
/// the test cuts the link), `amqp_extra` appended to [core.amqp].
struct MqNode {
    db: TestDb,
    dir: DaemonDir,
    daemon: Daemon,
    inst: TestInstitution,
}

impl MqNode {
    fn start(queues: &Queues, broker: &str, amqp_extra: &str) -> MqNode {
        let db = TestDb::new();
        let dir = DaemonDir::new();
        let mac_file = dir.path().join("core-mac.key");
        write_secret(&mac_file, &format!("{MAC_HEX}\n"));
        let (scheme, user, password, _) = broker_parts();
        // The guest account is for tests; a bank's broker gets a user and a password file.
        let password_file = dir.path().join("amqp-password");
        write_secret(&password_file, &password);
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let (inst, section) =
            TestInstitution::create(dir.path(), "MQPAY", &dir.path().join("keys"), &base);
        dir.write_channel_config(
            db.url(),
            port,
            &section,
            &format!(
                "[core]\nlink = \"amqp\"\n\n[core.amqp]\nurl = \"{scheme}://{user}@{broker}/%2f\"\n\
                 password_file = \"{}\"\nrequest_queue = \"{}\"\nreply_queue = \"{}\"\n\
                 dead_letter_queue = \"{}\"\nmac_key_id = \"test-2026\"\nmac_key_file = \"{}\"\n{amqp_extra}\n",
                password_file.display(),
                queues.request,
                queues.reply,
                queues.dead,
                mac_file.display(),
            ),
        );
        let mut daemon = Daemon::spawn(&dir);
        daemon.wait_ready();
        // Give the bridge a moment to connect and declare its queues.
        std::thread::sleep(Duration::from_secs(1));
        MqNode {
            db,
            dir,
            daemon,
            inst,
        }
    }

    fn restart(&mut self) {
        let mut daemon = Daemon::spawn(&self.dir);
        daemon.wait_ready();
        self.daemon = daemon;
    }

    /// Agreement for the simulator's demo customer 张三, bound and confirmed through the core.
    fn sign_agreement(&self) -> String {
        self.inst.sign_agreement(common::ha::ZHANG)
    }

    fn debit(&self, serial: &str, agreement: &str, amount: &str) -> common::institution::Answer {
        self.inst.call(
            MsgType::Debit,
            &[
                ("ReqSerial", serial),
                ("AgrmtNo", agreement),
                ("Amt", amount),
                ("Ccy", "CNY"),
            ],
        )
    }

    fn count(&self, sql: &str) -> i64 {
        count(self.db.url(), sql)
    }

    /// Waits until the outbox is empty.
    fn drained(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.count("SELECT count(*) AS n FROM core_pending") == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn ops_status(&self, path: &str) -> u16 {
        http_get(&self.dir.ops_url(path))
            .map(|(s, _)| s)
            .unwrap_or(0)
    }

    fn wait_ops_status(&self, path: &str, wanted: u16) -> bool {
        for _ in 0..100 {
            if self.ops_status(path) == wanted {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// An in-process core simulator on the broker whose balances the test can read.
fn coresim_in_process(
    runtime: &tokio::runtime::Runtime,
    queues: &Queues,
) -> (Arc<CoreSimulator>, CoreSimService) {
    let core = Arc::new(CoreSimulator::with_demo_accounts());
    let coresim = CoreSimService::start(
        runtime.handle().clone(),
        queues.only(&queues.request, "coresim"),
        keys(),
        core.clone(),
        ServiceFaults::default(),
    );
    assert!(coresim.wait_connected(Duration::from_secs(20)));
    (core, coresim)
}

/// The daemon with `core.link = "amqp"` and the `kunpay-coresim` binary as its core.
#[test]
fn the_daemon_pays_through_the_broker_and_kunpay_coresim() {
    let queues = Queues::new();
    let scratch = tempfile::tempdir().unwrap();
    let mac_file = scratch.path().join("core-mac.key");
    write_secret(&mac_file, MAC_HEX);
    let coresim_config = scratch.path().join("coresim.toml");
    let control_port = free_port();
    std::fs::write(
        &coresim_config,
        format!(
            "[amqp]\nurl = \"{}\"\nrequest_queue = \"{}\"\ndead_letter_queue = \"{}\"\n\n[mac]\nkey_id = \"test-2026\"\nkey_file = \"{}\"\n\n[control]\nlisten = \"127.0.0.1:{control_port}\"\n",
            amqp_url(),
            queues.request,
            queues.dead,
            mac_file.display()
        ),
    )
    .unwrap();
    let mut coresim = std::process::Command::new(env!("CARGO_BIN_EXE_kunpay-coresim"))
        .arg("--config")
        .arg(&coresim_config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let coresim = Kill(&mut coresim);
    let node = MqNode::start(&queues, &broker_parts().3, "reply_timeout = \"10s\"");
    let agreement = node.sign_agreement();
    for _ in 0..5 {
        let debit = node.debit(&node.inst.next_id("D"), &agreement, "100");
        assert_eq!(debit.code(), "0000", "{:?}", debit.fields);
    }
    assert_eq!(
        node.count(
            "SELECT count(*) AS n FROM txn WHERE state = 'SUCCEEDED' AND core_ref IS NOT NULL"
        ),
        5
    );
    assert_eq!(node.count("SELECT count(*) AS n FROM core_pending"), 0);
    // Every reply (binding, code check, five postings) matched, none refused, in /metrics.
    let metric = |text: &str, line: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
    };
    let mut matched = None;
    for _ in 0..30 {
        let (_, text) = http_get(&node.dir.ops_url("/metrics")).unwrap();
        matched = metric(&text, "kunpay_core_replies_total{result=\"matched\"}");
        if matched == Some(7) {
            assert_eq!(
                metric(&text, "kunpay_core_replies_total{result=\"bad_mac\"}"),
                Some(0)
            );
            assert_eq!(metric(&text, "kunpay_core_link_connected"), Some(1));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(matched, Some(7));
    // Every answered request's round trip is in its operation's histogram.
    let (_, text) = http_get(&node.dir.ops_url("/metrics")).unwrap();
    for (request, answered) in [("post", 5), ("bind", 1), ("code", 1)] {
        assert_eq!(
            metric(
                &text,
                &format!("kunpay_core_round_trip_seconds_count{{request=\"{request}\"}}")
            ),
            Some(answered),
            "{request}: {text}"
        );
    }

    // The control endpoint changes the faults while it runs.
    let control = format!("http://127.0.0.1:{control_port}");
    let (status, health) = http_get(&format!("{control}/health")).unwrap();
    assert_eq!(status, 200);
    assert!(health.contains("\"handled\":7"), "{health}");
    assert_eq!(
        http_put(
            &format!("{control}/faults"),
            r#"{"reject_every": 1, "reject_reason": "frozen"}"#
        )
        .0,
        200
    );
    let refused = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(
        refused.code(),
        "3012",
        "frozen by the fault: {:?}",
        refused.fields
    );
    let (status, faults) = http_get(&format!("{control}/faults")).unwrap();
    assert_eq!(status, 200);
    assert!(faults.contains("\"reject_every\":1"), "{faults}");
    for (body, says) in [
        (r#"{"latency": "soon"}"#, "latency"),
        (r#"{"query_fence": false}"#, "query_fence is fixed at start"),
        (r#"{"drop_evry": 2}"#, "unknown field `drop_evry`"),
    ] {
        let (status, text) = http_put(&format!("{control}/faults"), body);
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text}");
    }
    // A refused change left the faults as they were.
    let (_, unchanged) = http_get(&format!("{control}/faults")).unwrap();
    assert_eq!(unchanged, faults);
    // A core that takes 300 ms to answer: the posting's round trip is measured as over 250 ms.
    let quick_posts = |text: &str| {
        metric(
            text,
            "kunpay_core_round_trip_seconds_bucket{le=\"0.25\",request=\"post\"}",
        )
    };
    let (_, before) = http_get(&node.dir.ops_url("/metrics")).unwrap();
    assert_eq!(
        http_put(&format!("{control}/faults"), r#"{"latency": "300ms"}"#).0,
        200
    );
    let slow = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(slow.code(), "0000", "{:?}", slow.fields);
    let (_, after) = http_get(&node.dir.ops_url("/metrics")).unwrap();
    let posts = "kunpay_core_round_trip_seconds_count{request=\"post\"}";
    assert_eq!(metric(&after, posts), metric(&before, posts).map(|n| n + 1));
    assert_eq!(quick_posts(&after), quick_posts(&before), "{after}");
    assert_eq!(http_put(&format!("{control}/faults"), "{}").0, 200);
    let paid = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(paid.code(), "0000", "{:?}", paid.fields);
    drop(coresim);
    assert_eq!(queues.depth(&queues.dead), 0);
}

/// PUT a JSON body; returns (status, body) whatever the status.
fn http_put(url: &str, body: &str) -> (u16, String) {
    let mut response = http_agent()
        .put(url)
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// The daemon's broker connection goes through a TCP proxy the test cuts: debits are queued in
/// the outbox (answered "processing"), readiness turns 503 at the bound and postings beyond
/// it fail, and when the broker is back the backlog is delivered oldest first and settled;
/// the core's balance moves exactly by the succeeded debits.
#[test]
fn a_broker_outage_queues_postings_and_drains_them_when_it_returns() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queues = Queues::new();
    let (core, coresim) = coresim_in_process(&runtime, &queues);
    let before = core.balance(ZHANG_ACCOUNT).unwrap();
    let proxy = common::proxy::Proxy::start(&broker_parts().3);
    let node = MqNode::start(
        &queues,
        &format!("127.0.0.1:{}", proxy.port),
        "reply_timeout = \"3s\"\nmax_queued = 3",
    );
    let agreement = node.sign_agreement();
    let serial = || node.inst.next_id("D");
    assert_eq!(node.debit(&serial(), &agreement, "100").code(), "0000");

    proxy.sever();
    std::thread::sleep(Duration::from_millis(500));
    let mut queued = Vec::new();
    for amount in ["201", "202", "203"] {
        let s = serial();
        let answer = node.debit(&s, &agreement, amount);
        assert_eq!(
            answer.code(),
            "0001",
            "queued, not failed: {:?}",
            answer.fields
        );
        queued.push(s);
    }
    assert_eq!(
        node.count("SELECT count(*) AS n FROM core_pending"),
        3,
        "three postings owed"
    );
    // The outbox is at its bound: F5 is told to stop sending, and a posting beyond it fails.
    assert!(
        node.wait_ops_status("/readiness", 503),
        "readiness turns 503 with a full outbox"
    );
    assert_eq!(node.ops_status("/primary"), 503);
    let refused = node.debit(&serial(), &agreement, "300");
    assert_eq!(refused.code(), "9002", "{:?}", refused.fields);

    proxy.restore();
    assert!(
        node.drained(Duration::from_secs(30)),
        "the backlog drains when the broker is back\n{}",
        node.daemon.stderr()
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'SUCCEEDED'"),
        4
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE state = 'FAILED'"),
        1
    );
    // Settled oldest first.
    let out_of_order = node.count(
        "SELECT count(*) AS n FROM ( \
           SELECT row_number() OVER (ORDER BY t.created_at) AS by_created, \
                  row_number() OVER (ORDER BY h.id) AS by_settled \
           FROM txn t JOIN txn_state_history h ON h.txn_id = t.txn_id \
           WHERE h.from_state = 'UNKNOWN' AND h.to_state = 'SUCCEEDED') s \
         WHERE by_created <> by_settled",
    );
    assert_eq!(
        out_of_order, 0,
        "the backlog is delivered in the order it was accepted"
    );
    // The core moved exactly the succeeded debits, once each.
    assert_eq!(
        core.balance(ZHANG_ACCOUNT).unwrap(),
        before - (100 + 201 + 202 + 203)
    );
    assert!(
        node.wait_ops_status("/readiness", 200),
        "ready again once the outbox drained"
    );
    for s in queued {
        let query = node.inst.call(MsgType::Query, &[("QrySerial", &s)]);
        assert_eq!(query.get("TxnStatus"), "SUCCEEDED", "{:?}", query.fields);
    }
    coresim.stop();
}

/// SIGKILL under load, between any two steps (commit and publish included): after a restart
/// every acknowledged debit is SUCCEEDED exactly once, nothing is left owed, and the core moved
/// exactly the succeeded amounts.
#[test]
fn a_daemon_killed_under_load_loses_nothing_and_posts_nothing_twice() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queues = Queues::new();
    let (core, coresim) = coresim_in_process(&runtime, &queues);
    let before = core.balance(ZHANG_ACCOUNT).unwrap();
    let mut node = MqNode::start(&queues, &broker_parts().3, "reply_timeout = \"3s\"");
    let agreement = node.sign_agreement();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    std::thread::scope(|scope| {
        for worker in 0..4 {
            let (stop, answered, inst, agreement) =
                (stop.clone(), answered.clone(), &node.inst, &agreement);
            scope.spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    n += 1;
                    let serial = format!("K{worker}x{n}");
                    let body = inst.message(
                        MsgType::Debit,
                        &[
                            ("ReqSerial", &serial),
                            ("AgrmtNo", agreement),
                            ("Amt", "100"),
                            ("Ccy", "CNY"),
                        ],
                    );
                    match inst.try_post(MsgType::Debit, &body) {
                        Some((200, raw)) => {
                            let answer = inst.verify_answer(raw);
                            answered
                                .lock()
                                .unwrap()
                                .push((serial, answer.code().to_string()));
                        }
                        // The daemon is gone: this one may or may not be journaled.
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        node.daemon.signal(nix::sys::signal::Signal::SIGKILL);
        node.daemon
            .wait_exit(Duration::from_secs(10))
            .expect("killed");
        stop.store(true, std::sync::atomic::Ordering::Release);
    });
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() >= 10,
        "load ran before the kill: {}",
        answered.len()
    );

    node.restart();
    assert!(
        node.drained(Duration::from_secs(60)),
        "everything owed is settled after the restart\n{}",
        node.daemon.stderr()
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE state NOT IN ('SUCCEEDED', 'FAILED')"),
        0,
        "every transaction reached a final state"
    );
    for (serial, code) in &answered {
        let state = node.count(&format!(
            "SELECT count(*) AS n FROM txn WHERE req_serial = '{serial}' AND state = 'SUCCEEDED'"
        ));
        match code.as_str() {
            "0000" => assert_eq!(state, 1, "{serial} was acknowledged as paid"),
            "0001" => {} // processing: either outcome, but final (checked above)
            other => panic!("{serial}: unexpected answer {other}"),
        }
    }
    let succeeded =
        node.count("SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'SUCCEEDED'");
    assert_eq!(
        core.balance(ZHANG_ACCOUNT).unwrap(),
        before - 100 * succeeded,
        "the core moved exactly what the journal says succeeded, once each"
    );
    coresim.stop();
}

/// `kunpay-coresim` with its own database, started with the arguments the test gives.
struct CoresimProcess {
    child: std::process::Child,
    config: std::path::PathBuf,
}

impl CoresimProcess {
    fn start(config: &std::path::Path, args: &[&str]) -> CoresimProcess {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kunpay-coresim"))
            .arg("--config")
            .arg(config)
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        CoresimProcess {
            child,
            config: config.to_path_buf(),
        }
    }

    fn restart(&mut self, args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = CoresimProcess::start(&self.config.clone(), args);
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for CoresimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The core simulator crashes (exit, no reply, no ack) on a posting; the broker redelivers it
/// to the restarted simulator, whose ledger is in its own database: the debit is applied once,
/// kunpay settles it, and the simulator's balance and postings match kunpay's journal.
#[test]
fn a_core_crash_mid_posting_is_settled_once_after_the_core_restarts() {
    let queues = Queues::new();
    let core_db = TestDb::new();
    let scratch = tempfile::tempdir().unwrap();
    let mac_file = scratch.path().join("core-mac.key");
    write_secret(&mac_file, MAC_HEX);
    let config = scratch.path().join("coresim.toml");
    std::fs::write(
        &config,
        format!(
            "[amqp]\nurl = \"{}\"\nrequest_queue = \"{}\"\ndead_letter_queue = \"{}\"\n\n\
             [mac]\nkey_id = \"test-2026\"\nkey_file = \"{}\"\n\n[database]\nurl = \"{}\"\n",
            amqp_url(),
            queues.request,
            queues.dead,
            mac_file.display(),
            core_db.url()
        ),
    )
    .unwrap();
    // Requests 1 and 2 are the agreement's binding and code check; 3 is the first debit.
    let mut coresim = CoresimProcess::start(&config, &["--crash-at", "3"]);
    let node = MqNode::start(&queues, &broker_parts().3, "reply_timeout = \"2s\"");
    let agreement = node.sign_agreement();
    let balance = || {
        count(
            core_db.url(),
            "SELECT balance_fen AS n FROM coresim_account WHERE account_no = '6222021234567890123'",
        )
    };
    let before = balance();

    let first = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(
        first.code(),
        "0001",
        "the core died before answering: {:?}",
        first.fields
    );
    assert_eq!(
        coresim.wait_exit(Duration::from_secs(5)),
        Some(101),
        "crashed on purpose"
    );

    coresim.restart(&[]);
    for _ in 0..3 {
        let debit = node.debit(&node.inst.next_id("D"), &agreement, "100");
        assert_eq!(debit.code(), "0000", "{:?}", debit.fields);
    }
    assert!(
        node.drained(Duration::from_secs(30)),
        "the crashed posting is settled\n{}",
        node.daemon.stderr()
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'SUCCEEDED'"),
        4
    );
    assert_eq!(
        balance(),
        before - 400,
        "each debit moved money exactly once"
    );
    assert_eq!(
        count(
            core_db.url(),
            "SELECT count(*) AS n FROM coresim_posting WHERE status = 'POSTED'"
        ),
        4
    );
}

/// The daemon's link to the broker is slowed past the reply timeout mid-flow: the debit is
/// answered "processing" (UNKNOWN), and once the link is fast again the reply that was on its
/// way (or the resolver's redelivery) settles it exactly once.
#[test]
fn a_delayed_link_makes_a_debit_unknown_and_it_is_settled_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queues = Queues::new();
    let (core, coresim) = coresim_in_process(&runtime, &queues);
    let before = core.balance(ZHANG_ACCOUNT).unwrap();
    let proxy = common::proxy::Proxy::start(&broker_parts().3);
    let node = MqNode::start(
        &queues,
        &format!("127.0.0.1:{}", proxy.port),
        "reply_timeout = \"500ms\"",
    );
    let agreement = node.sign_agreement();
    assert_eq!(
        node.debit(&node.inst.next_id("D"), &agreement, "100")
            .code(),
        "0000"
    );

    proxy.delay(Duration::from_millis(1500));
    let slow = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(slow.code(), "0001", "no reply in time: {:?}", slow.fields);
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE state = 'UNKNOWN'"),
        1
    );
    proxy.delay(Duration::ZERO);
    assert!(
        node.drained(Duration::from_secs(30)),
        "settled once the link is fast again\n{}",
        node.daemon.stderr()
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'SUCCEEDED'"),
        2
    );
    assert_eq!(
        core.balance(ZHANG_ACCOUNT).unwrap(),
        before - 200,
        "posted once each"
    );
    coresim.stop();
}

/// Reads one sample from the daemon's /metrics.
fn metric(node: &MqNode, line: &str) -> Option<u64> {
    let (_, text) = http_get(&node.dir.ops_url("/metrics")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A core slow to post (8 s) and a daemon that asks rather than redelivers: the resolver's
/// query finds nothing and the debit is recorded FAILED; then the posting is applied. Against a
/// core without the query fence the late reply requests a reversal, which goes through the
/// broker and returns the money exactly once; against a core with the fence the posting is
/// refused as TOO_LATE and nothing needs reversing. The journal stays FAILED for both.
#[test]
fn a_posting_applied_after_the_core_said_not_found_is_reversed_through_the_broker() {
    use kunpay::core::sim::Faults;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queues = Queues::new();
    let (core, coresim) = coresim_in_process(&runtime, &queues);
    core.set_faults(Faults {
        queries_do_not_fence: true,
        ..Faults::default()
    });
    let before = core.balance(ZHANG_ACCOUNT).unwrap();
    let node = MqNode::start(
        &queues,
        &broker_parts().3,
        "reply_timeout = \"500ms\"\nredeliver_within = \"0s\"",
    );
    let agreement = node.sign_agreement();
    coresim.set_faults(ServiceFaults {
        post_delay: Duration::from_secs(8),
        ..ServiceFaults::default()
    });

    let slow = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(slow.code(), "0001", "processing: {:?}", slow.fields);
    assert!(
        wait_until(Duration::from_secs(40), || node.count(
            "SELECT count(*) AS n FROM core_reversal WHERE state = 'REVERSED'"
        ) == 1),
        "reversed through the broker\n{}",
        node.daemon.stderr()
    );
    assert_eq!(
        core.balance(ZHANG_ACCOUNT).unwrap(),
        before,
        "debited once, returned once"
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'FAILED'"),
        1
    );
    assert!(wait_until(Duration::from_secs(5), || metric(
        &node,
        "kunpay_core_reversals{state=\"REVERSED\"}"
    ) == Some(1)));

    // The same race against a core that keeps its NOT_FOUND answer.
    core.set_faults(Faults::default());
    let late_before = metric(&node, "kunpay_core_replies_total{result=\"late\"}").unwrap();
    let fenced = node.debit(&node.inst.next_id("D"), &agreement, "100");
    assert_eq!(fenced.code(), "0001", "{:?}", fenced.fields);
    assert!(
        wait_until(Duration::from_secs(40), || metric(
            &node,
            "kunpay_core_replies_total{result=\"late\"}"
        ) == Some(late_before + 1)),
        "the posting's late reply arrives\n{}",
        node.daemon.stderr()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        node.count("SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'FAILED'"),
        2
    );
    assert_eq!(
        node.count("SELECT count(*) AS n FROM core_reversal"),
        1,
        "nothing to reverse"
    );
    assert_eq!(core.balance(ZHANG_ACCOUNT).unwrap(), before);
    assert_eq!(node.count("SELECT count(*) AS n FROM core_pending"), 0);
    coresim.stop();
    assert_eq!(queues.depth(&queues.dead), 0);
}

/// kunpay-coresim's database ledger keeps the same contract as the in-memory one: a NOT_FOUND
/// answer fences the id (also when the query races the posting: never "not found" and then
/// posted), a reversal undoes a posting once and is refused when it does not match or the
/// customer spent the credit.
#[test]
fn the_database_ledger_fences_not_found_ids_and_reverses_once() {
    use kunpay::core::sim_store::PgLedger;
    use kunpay::core::{PostingOutcome, Rejection, Reversal, ReversalOutcome, ReversalRefusal};
    let db = TestDb::new();
    let pool = kunpay::db::connect(&kunpay::db::ConnectSettings {
        url: kunpay::config::Secret::new(db.url().to_string()),
        password: None,
        pool_max_size: 8,
        pool_min_idle: 1,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
        application_name: "test ledger".into(),
    })
    .unwrap();
    let ledger = Arc::new(PgLedger::open(pool, &kunpay::core::sim::demo_accounts()).unwrap());
    let before = ledger.balance(ZHANG_ACCOUNT).unwrap().unwrap();
    let reversal_of = |p: &Posting| Reversal {
        reversal_id: Uuid::now_v7(),
        txn_id: p.txn_id,
        kind: p.kind,
        account_no: p.account_no.clone(),
        amount_fen: p.amount_fen,
    };

    let fenced = debit(100);
    assert_eq!(ledger.query_posting(fenced.txn_id).unwrap(), None);
    assert_eq!(
        ledger.post(&fenced).unwrap(),
        PostingOutcome::Rejected(Rejection::TooLate)
    );
    assert_eq!(ledger.query_posting(fenced.txn_id).unwrap(), None);

    let posted = debit(2_000);
    assert!(matches!(
        ledger.post(&posted).unwrap(),
        PostingOutcome::Posted { .. }
    ));
    let mut wrong = reversal_of(&posted);
    wrong.amount_fen = 1_999;
    assert_eq!(
        ledger.reverse(&wrong).unwrap(),
        ReversalOutcome::Refused(ReversalRefusal::DoesNotMatch)
    );
    let reversal = reversal_of(&posted);
    let first = ledger.reverse(&reversal).unwrap();
    assert!(matches!(first, ReversalOutcome::Reversed { .. }));
    assert_eq!(ledger.reverse(&reversal).unwrap(), first, "idempotent");
    assert_eq!(ledger.balance(ZHANG_ACCOUNT).unwrap().unwrap(), before);
    let never = debit(300);
    assert_eq!(
        ledger.reverse(&reversal_of(&never)).unwrap(),
        ReversalOutcome::NothingPosted
    );
    assert_eq!(
        ledger.post(&never).unwrap(),
        PostingOutcome::Rejected(Rejection::TooLate)
    );

    const WANG: &str = "6217001234567890149";
    let credit = Posting {
        txn_id: Uuid::now_v7(),
        kind: PostingKind::Credit,
        account_no: WANG.into(),
        amount_fen: 500,
    };
    ledger.post(&credit).unwrap();
    ledger
        .post(&Posting {
            txn_id: Uuid::now_v7(),
            kind: PostingKind::Debit,
            account_no: WANG.into(),
            amount_fen: 450,
        })
        .unwrap();
    assert_eq!(
        ledger.reverse(&reversal_of(&credit)).unwrap(),
        ReversalOutcome::Refused(ReversalRefusal::InsufficientFunds)
    );

    // A query racing its posting: whichever commits first wins, the other is asked again.
    let retrying = |f: &dyn Fn() -> Result<Option<PostingOutcome>, kunpay::core::CoreError>| loop {
        match f() {
            Ok(answer) => break answer,
            Err(kunpay::core::CoreError::Unavailable(_)) => continue,
            Err(other) => panic!("{other}"),
        }
    };
    let mut fenced_count = 0;
    for _ in 0..40 {
        let p = debit(1);
        let (l1, l2, p1) = (ledger.clone(), ledger.clone(), p.clone());
        let post = std::thread::spawn(move || retrying(&|| l1.post(&p1).map(Some)));
        let query = std::thread::spawn(move || retrying(&|| l2.query_posting(p.txn_id)));
        let (posted, queried) = (post.join().unwrap().unwrap(), query.join().unwrap());
        match (&posted, &queried) {
            (PostingOutcome::Rejected(Rejection::TooLate), None) => fenced_count += 1,
            (PostingOutcome::Posted { .. }, Some(q)) => assert_eq!(q, &posted),
            other => panic!("posting and query disagree: {other:?}"),
        }
    }
    let moved = before - 2_000 + 2_000 - ledger.balance(ZHANG_ACCOUNT).unwrap().unwrap();
    assert_eq!(
        moved,
        40 - fenced_count,
        "each posted one moved 1 fen, fenced ones none"
    );
}

/// kunpay-coresim holds every second reply back so later ones overtake it; concurrent debits
/// through the daemon each settle with their own posting's reference (the journal's core_ref
/// is the one the core recorded for that transaction id), none twice, none late.
#[test]
fn out_of_order_replies_settle_each_debit_with_its_own_posting() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let queues = Queues::new();
    let (core, coresim) = coresim_in_process(&runtime, &queues);
    let before = core.balance(ZHANG_ACCOUNT).unwrap();
    let node = MqNode::start(&queues, &broker_parts().3, "reply_timeout = \"10s\"");
    let agreement = node.sign_agreement();
    coresim.set_faults(ServiceFaults {
        reorder_every: 2,
        hold_back: Duration::from_millis(400),
        ..ServiceFaults::default()
    });
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=8)
            .map(|i| {
                let (node, agreement) = (&node, &agreement);
                scope.spawn(move || {
                    node.debit(&node.inst.next_id("D"), agreement, &(100 * i).to_string())
                })
            })
            .collect();
        for handle in handles {
            let answer = handle.join().unwrap();
            assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
        }
    });
    #[derive(QueryableByName)]
    struct Settled {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        txn_id: Uuid,
        #[diesel(sql_type = diesel::sql_types::Text)]
        core_ref: String,
    }
    let mut conn = PgConnection::establish(node.db.url()).unwrap();
    let settled: Vec<Settled> = diesel::sql_query(
        "SELECT txn_id, core_ref FROM txn WHERE kind = 'DEBIT' AND state = 'SUCCEEDED'",
    )
    .load(&mut conn)
    .unwrap();
    assert_eq!(settled.len(), 8);
    for s in &settled {
        assert_eq!(
            core.query_posting(s.txn_id).unwrap(),
            Some(kunpay::core::PostingOutcome::Posted {
                core_ref: s.core_ref.clone()
            }),
            "the journal holds the core's reference for this very posting"
        );
    }
    assert_eq!(core.balance(ZHANG_ACCOUNT).unwrap(), before - 3_600);
    assert_eq!(
        metric(&node, "kunpay_core_replies_total{result=\"late\"}").unwrap_or(0),
        0
    );
    coresim.stop();
}
