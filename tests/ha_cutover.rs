//! Planned cutover and rollback with two real nodes (issue 8): two private PostgreSQL clusters
//! with wal_level = logical, two `kunpayd` processes copying each other through CDC, a core
//! simulator on the real RabbitMQ shared by both, a load generator that behaves like F5 (it
//! sends to the node that takes business and moves on a 503), and `kunpayctl cutover` /
//! `kunpayctl rollback` run while the load goes on. The daemons run under a supervisor that
//! restarts them on exit status 75, as systemd does with the packaged unit.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::amqp::*;
use common::institution::TestInstitution;
use common::*;
use common::proxy;
use diesel::prelude::*;
use kunpay::core::coresim::{CoreSimService, ServiceFaults};
use kunpay::core::sim::CoreSimulator;
use kunpay::db::cluster::ClusterOptions;
use kunpay::ha::{self, NodeRole};
use kunpay::payment::request::MsgType;

const ZHANG_ACCOUNT: &str = "6222021234567890123";
const AMOUNT_FEN: i64 = 100;

fn cluster() -> TestCluster {
    TestCluster::start(ClusterOptions {
        settings: vec![
            ("wal_level".into(), "logical".into()),
            ("fsync".into(), "off".into()),
            ("max_replication_slots".into(), "4".into()),
        ],
        fast_unsafe: false,
    })
}

fn count(url: &str, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(url).unwrap();
    diesel::sql_query(sql).get_result::<N>(&mut conn).unwrap().n
}

fn role(url: &str) -> ha::RoleRecord {
    ha::read_role(&mut PgConnection::establish(url).unwrap()).unwrap()
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `kunpayd` that is started again whenever it exits with status 75 (its database's role
/// changed), like `RestartForceExitStatus=75` in the unit.
struct Supervised {
    daemon: Arc<Mutex<Daemon>>,
    restarts: Arc<AtomicU32>,
    /// Exit statuses other than 75: the supervisor stops at the first.
    other_exit: Arc<Mutex<Option<i32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervised {
    fn start(dir: Arc<DaemonDir>) -> Supervised {
        let mut first = Daemon::spawn(&dir);
        first.wait_ready();
        let daemon = Arc::new(Mutex::new(first));
        let restarts = Arc::new(AtomicU32::new(0));
        let other_exit = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (daemon, restarts, other_exit, stop) = (
                daemon.clone(),
                restarts.clone(),
                other_exit.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let exited = {
                        let mut d = daemon.lock().unwrap();
                        d.child.as_mut().unwrap().try_wait().unwrap()
                    };
                    match exited.map(|s| s.code()) {
                        None => {}
                        Some(Some(75)) => {
                            restarts.fetch_add(1, Ordering::SeqCst);
                            let next = Daemon::spawn(&dir);
                            let old = std::mem::replace(&mut *daemon.lock().unwrap(), next);
                            // Its log stays in its own file; keep the text for failures.
                            eprintln!(
                                "--- kunpayd exited 75 and was restarted; its log:\n{}",
                                old.stderr()
                            );
                        }
                        Some(code) => {
                            *other_exit.lock().unwrap() = Some(code.unwrap_or(-1));
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Supervised {
            daemon,
            restarts,
            other_exit,
            stop,
            thread: Some(thread),
        }
    }

    fn stderr(&self) -> String {
        self.daemon.lock().unwrap().stderr()
    }

    fn stop(&mut self) -> Option<i32> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        let mut daemon = self.daemon.lock().unwrap();
        daemon.signal(nix::sys::signal::Signal::SIGTERM);
        daemon
            .wait_exit(Duration::from_secs(60))
            .and_then(|s| s.code())
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Node {
    cluster: TestCluster,
    dir: Arc<DaemonDir>,
    base: String,
    daemon: Option<Supervised>,
}

impl Node {
    fn url(&self) -> String {
        self.cluster.url()
    }

    fn daemon(&self) -> &Supervised {
        self.daemon.as_ref().unwrap()
    }

    fn ops(&self, path: &str) -> u16 {
        status_of(&self.dir.ops_url(path))
    }
}

/// Two nodes copying each other through CDC (each node's [ha] source is the other's database),
/// one institution registered on both with the same bank keys, and the core simulator on the
/// broker. Node A starts ACTIVE at epoch 0, node B STANDBY at epoch 1.
struct Pair {
    a: Node,
    b: Node,
    /// Between B (its CDC and its kunpayctl) and A's database, when the test cuts that link.
    link: Option<proxy::Proxy>,
    inst: Arc<TestInstitution>,
    core: Arc<CoreSimulator>,
    coresim: CoreSimService,
    _queues: Queues,
    _runtime: tokio::runtime::Runtime,
    _scratch: tempfile::TempDir,
}

impl Pair {
    fn start() -> Pair {
        Pair::start_with(false)
    }

    /// `cuttable_link`: B reaches A's database through a proxy the test can sever.
    fn start_with(cuttable_link: bool) -> Pair {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let queues = Queues::new();
        let core = Arc::new(CoreSimulator::with_demo_accounts());
        let mut settings = queues.settings(&queues.request, "coresim");
        settings.queues = vec![queues.request.clone()];
        let coresim = CoreSimService::start(
            runtime.handle().clone(),
            settings,
            keys(),
            core.clone(),
            ServiceFaults::default(),
        );
        assert!(coresim.wait_connected(Duration::from_secs(20)));

        let (ca, cb) = std::thread::scope(|s| {
            let a = s.spawn(cluster);
            let b = s.spawn(cluster);
            (a.join().unwrap(), b.join().unwrap())
        });
        kunpay::db::migrate(&mut PgConnection::establish(&ca.url()).unwrap()).unwrap();
        let mut conn = PgConnection::establish(&cb.url()).unwrap();
        kunpay::db::migrate(&mut conn).unwrap();
        ha::set_role(&mut conn, NodeRole::Standby, 1, "test: the standby").unwrap();

        let scratch = tempfile::tempdir().unwrap();
        let mac_file = scratch.path().join("core-mac.key");
        write_secret(&mac_file, &format!("{MAC_HEX}\n"));
        let (scheme, user, password, host) = broker_parts();
        let password_file = scratch.path().join("amqp-password");
        write_secret(&password_file, &password);
        let (dir_a, dir_b) = (Arc::new(DaemonDir::new()), Arc::new(DaemonDir::new()));
        // One bank behind F5: both nodes sign and decrypt with the same keys.
        for key in [
            "node-sign.pem",
            "node-sign.pub.pem",
            "node-encrypt.pem",
            "node-encrypt.pub.pem",
        ] {
            std::fs::copy(
                dir_a.path().join("keys").join(key),
                dir_b.path().join("keys").join(key),
            )
            .unwrap();
        }
        let (port_a, port_b) = (free_port(), free_port());
        let base_a = format!("http://127.0.0.1:{port_a}");
        let (inst, section) =
            TestInstitution::create(scratch.path(), "HAPAY", &dir_a.path().join("keys"), &base_a);
        let config = |dir: &DaemonDir, own: &str, peer: &str, port: u16| {
            dir.write_channel_config(
                own,
                port,
                &format!("{section}send_time_window = \"1h\"\n"),
                &format!(
                    "[core]\nlink = \"amqp\"\n\n[core.amqp]\nurl = \"{scheme}://{user}@{host}/%2f\"\n\
                     password_file = \"{}\"\nrequest_queue = \"{}\"\nreply_queue = \"{}\"\n\
                     dead_letter_queue = \"{}\"\nmac_key_id = \"test-2026\"\nmac_key_file = \"{}\"\n\n\
                     [ha]\nsource_url = \"{peer}\"\nbatch = 1000\npoll_every = \"20ms\"\nmax_lag_time = \"30s\"\n",
                    password_file.display(),
                    queues.request,
                    queues.reply,
                    queues.dead,
                    mac_file.display(),
                ),
            );
        };
        let link = cuttable_link.then(|| {
            let port = ca.url().rsplit(':').next().unwrap().split('/').next().unwrap().to_string();
            proxy::Proxy::start(&format!("127.0.0.1:{port}"))
        });
        let a_as_b_sees_it = match &link {
            Some(proxy) => ca.url().replace(
                &format!(":{}/", ca.url().rsplit(':').next().unwrap().split('/').next().unwrap()),
                &format!(":{}/", proxy.port),
            ),
            None => ca.url(),
        };
        config(&dir_a, &ca.url(), &cb.url(), port_a);
        config(&dir_b, &cb.url(), &a_as_b_sees_it, port_b);
        let mut a = Node {
            cluster: ca,
            dir: dir_a,
            base: base_a,
            daemon: None,
        };
        let mut b = Node {
            cluster: cb,
            dir: dir_b,
            base: format!("http://127.0.0.1:{port_b}"),
            daemon: None,
        };
        a.daemon = Some(Supervised::start(a.dir.clone()));
        b.daemon = Some(Supervised::start(b.dir.clone()));
        // The copy starts while A is quiet: wait for B's applier before any business.
        wait_until("B's copy to start", Duration::from_secs(60), || {
            b.ops("/standby") == 200
        });
        Pair {
            a,
            b,
            link,
            inst: Arc::new(inst),
            core,
            coresim,
            _queues: queues,
            _runtime: runtime,
            _scratch: scratch,
        }
    }

    fn sign_agreement(&self) -> String {
        let inst = &self.inst;
        let apply = inst.call(
            MsgType::AgreementApply,
            &[
                ("ReqSerial", &inst.next_id("AP")),
                ("AcctNo", ZHANG_ACCOUNT),
                ("AcctNm", "张三"),
                ("IdTp", "01"),
                ("IdNo", "110101199003077774"),
                ("PhoneNo", "13812345678"),
            ],
        );
        assert_eq!(
            apply.code(),
            "0000",
            "{:?}\n{}",
            apply.fields,
            self.a.daemon().stderr()
        );
        let agreement = apply.get("AgrmtNo").to_string();
        let confirm = inst.call(
            MsgType::AgreementConfirm,
            &[
                ("ReqSerial", &inst.next_id("CF")),
                ("AgrmtNo", &agreement),
                ("VrfyCd", &kunpay::core::sim::verification_code(&agreement)),
            ],
        );
        assert_eq!(confirm.code(), "0000", "{:?}", confirm.fields);
        agreement
    }
}

fn post(base: &str, msg_type: MsgType, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent
        .post(&format!("{base}{}", msg_type.path()))
        .header("Content-Type", "application/xml")
        .send(body)
        .ok()?;
    let status = response.status().as_u16();
    let bytes = response.body_mut().read_to_vec().ok()?;
    Some((status, bytes))
}

/// What the load generator saw of one debit.
#[derive(Debug, Clone)]
struct Answered {
    code: String,
    node: usize,
    at: Instant,
}

/// Debits from `workers` threads until `stop`, each sent to the node F5 would pick (the last
/// one that took business; on a 503 or a refused connection, the other one) and sent again,
/// byte for byte, until a node answers. Returns serial -> answer.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<BTreeMap<String, Answered>>>,
    unanswered: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(pair: &Pair, agreement: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(BTreeMap::new()));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(AtomicUsize::new(0));
        let bases = Arc::new([pair.a.base.clone(), pair.b.base.clone()]);
        let threads = (0..workers)
            .map(|worker| {
                let (stop, answered, unanswered, target, bases, inst, agreement) = (
                    stop.clone(),
                    answered.clone(),
                    unanswered.clone(),
                    target.clone(),
                    bases.clone(),
                    pair.inst.clone(),
                    agreement.to_string(),
                );
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let serial = format!("L{worker}x{n}");
                        let body = inst.message(
                            MsgType::Debit,
                            &[
                                ("ReqSerial", &serial),
                                ("AgrmtNo", &agreement),
                                ("Amt", &AMOUNT_FEN.to_string()),
                                ("Ccy", "CNY"),
                            ],
                        );
                        let give_up = Instant::now() + Duration::from_secs(60);
                        loop {
                            let node = target.load(Ordering::SeqCst);
                            match post(&bases[node], MsgType::Debit, &body) {
                                Some((200, raw)) => {
                                    let answer = inst.verify_answer(raw);
                                    answered.lock().unwrap().insert(
                                        serial.clone(),
                                        Answered {
                                            code: answer.code().to_string(),
                                            node,
                                            at: Instant::now(),
                                        },
                                    );
                                    break;
                                }
                                other => {
                                    // 503 (standby, handing over) or no listener (restarting):
                                    // F5 marks this member down and sends to the other one.
                                    if let Some((status, _)) = &other {
                                        assert_eq!(
                                            *status, 503,
                                            "only 503 sends a request elsewhere"
                                        );
                                    }
                                    let _ = target.compare_exchange(
                                        node,
                                        1 - node,
                                        Ordering::SeqCst,
                                        Ordering::SeqCst,
                                    );
                                    if Instant::now() > give_up {
                                        unanswered.fetch_add(1, Ordering::SeqCst);
                                        break;
                                    }
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            answered,
            unanswered,
            threads,
        }
    }

    fn answered(&self) -> usize {
        self.answered.lock().unwrap().len()
    }

    fn finish(self) -> (BTreeMap<String, Answered>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        let answered = self.answered.lock().unwrap().clone();
        (answered, self.unanswered.load(Ordering::SeqCst))
    }
}

/// The longest time between two consecutive answers from `since` on: the pause clients saw.
fn longest_gap(answered: &BTreeMap<String, Answered>, since: Instant, until: Instant) -> Duration {
    let mut times: Vec<Instant> = answered
        .values()
        .map(|a| a.at)
        .filter(|t| *t >= since && *t <= until)
        .collect();
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

fn handover(kind: &str, node: &Node) -> (i32, String) {
    let (code, stdout, stderr) = run(kunpayctl()
        .arg(kind)
        .arg("--config")
        .arg(node.dir.config_path())
        .args(["--drain-timeout", "15s", "--catch-up-timeout", "60s"]));
    (code, format!("{stdout}{stderr}"))
}

#[test]
fn cutover_and_rollback_under_debit_load_lose_nothing_and_apply_nothing_twice() {
    let mut pair = Pair::start();
    let agreement = pair.sign_agreement();
    let balance_before = pair.core.balance(ZHANG_ACCOUNT).unwrap();

    let load = Load::start(&pair, &agreement, 4);
    wait_until("load on A", Duration::from_secs(60), || {
        load.answered() >= 100
    });

    // Cutover A -> B, run on B.
    let started = Instant::now();
    let (code, report) = handover("cutover", &pair.b);
    let cutover_took = started.elapsed();
    eprintln!("{report}");
    assert_eq!(
        code,
        0,
        "cutover done\n{report}\nA:\n{}\nB:\n{}",
        pair.a.daemon().stderr(),
        pair.b.daemon().stderr()
    );
    for step in [
        "drain",
        "fence",
        "catch up",
        "verify",
        "sequences",
        "reverse CDC",
        "promote",
        "demote the old active",
        "retire the old copy",
        "new active serving",
    ] {
        assert!(
            report.contains(&format!(" {step} ")),
            "step {step} reported:\n{report}"
        );
    }
    assert_eq!(role(&pair.b.url()).role, NodeRole::Active);
    assert_eq!(role(&pair.b.url()).epoch, 2);
    assert_eq!(role(&pair.a.url()).role, NodeRole::Standby);
    assert_eq!(pair.b.ops("/primary"), 200);
    // B serves: the load moves there.
    let on_b = {
        let n = load.answered();
        wait_until("load on B", Duration::from_secs(60), || {
            load.answered() >= n + 100
        });
        Instant::now()
    };
    // A restarted into its new role and copies from B.
    wait_until("A to copy from B", Duration::from_secs(60), || {
        pair.a.ops("/standby") == 200
    });
    assert!(
        pair.a.daemon().restarts.load(Ordering::SeqCst) >= 1,
        "A restarted after the fence"
    );
    assert_eq!(
        pair.b.daemon().restarts.load(Ordering::SeqCst),
        0,
        "B was promoted in place"
    );
    assert_eq!(pair.a.ops("/primary"), 503);
    let (status, _) = post(
        &pair.a.base,
        MsgType::Debit,
        &pair.inst.message(
            MsgType::Debit,
            &[
                ("ReqSerial", "STRAY"),
                ("AgrmtNo", &agreement),
                ("Amt", "100"),
                ("Ccy", "CNY"),
            ],
        ),
    )
    .unwrap();
    assert_eq!(status, 503, "the standby takes no business");

    // Rollback B -> A, run on A.
    let (code, report) = handover("rollback", &pair.a);
    eprintln!("{report}");
    assert_eq!(
        code,
        0,
        "rollback done\n{report}\nA:\n{}\nB:\n{}",
        pair.a.daemon().stderr(),
        pair.b.daemon().stderr()
    );
    assert_eq!(role(&pair.a.url()).role, NodeRole::Active);
    assert_eq!(role(&pair.a.url()).epoch, 3);
    assert_eq!(role(&pair.b.url()).role, NodeRole::Standby);
    let n = load.answered();
    wait_until("load on A again", Duration::from_secs(60), || {
        load.answered() >= n + 100
    });
    let ended = Instant::now();
    let (answered, unanswered) = load.finish();
    assert_eq!(
        unanswered, 0,
        "every debit was answered by one node or the other"
    );

    // B restarted into standby and catches up with A; then both databases agree.
    wait_until("B to copy from A", Duration::from_secs(60), || {
        pair.b.ops("/standby") == 200
    });
    let mut a = PgConnection::establish(&pair.a.url()).unwrap();
    wait_until(
        "no business owed to the core",
        Duration::from_secs(120),
        || count(&pair.a.url(), "SELECT count(*) AS n FROM core_pending") == 0,
    );
    wait_until("B to hold all of A", Duration::from_secs(60), || {
        let status = kunpay::ha::cdc::status(
            &mut a,
            &mut PgConnection::establish(&pair.b.url()).unwrap(),
            "kunpay_cdc",
        )
        .unwrap();
        status.lag_bytes == 0
    });
    let da = ha::database_digest(&mut a).unwrap();
    let db = ha::database_digest(&mut PgConnection::establish(&pair.b.url()).unwrap()).unwrap();
    assert_eq!(
        ha::digest_differences(&da, &db),
        Vec::<String>::new(),
        "both databases agree"
    );

    // Every acknowledged debit exists exactly once on the active; nothing else exists.
    let by_node = |n: usize| answered.values().filter(|a| a.node == n).count();
    assert!(by_node(1) >= 100, "B answered business while active");
    let mut acknowledged = 0;
    for (serial, answer) in &answered {
        let rows = count(
            &pair.a.url(),
            &format!("SELECT count(*) AS n FROM txn WHERE req_serial = '{serial}'"),
        );
        assert_eq!(rows, 1, "{serial} ({answer:?}) is journaled once");
        match answer.code.as_str() {
            "0000" => {
                acknowledged += 1;
                assert_eq!(
                    count(
                        &pair.a.url(),
                        &format!(
                            "SELECT count(*) AS n FROM txn WHERE req_serial = '{serial}' AND state = 'SUCCEEDED'"
                        )
                    ),
                    1,
                    "{serial} was acknowledged as paid"
                );
            }
            "0001" => {}
            other => panic!(
                "{serial}: unexpected answer {other} from node {}",
                answer.node
            ),
        }
    }
    let debits = count(
        &pair.a.url(),
        "SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT'",
    );
    assert_eq!(
        debits as usize,
        answered.len(),
        "no debit exists that no client was answered for"
    );
    let succeeded = count(
        &pair.a.url(),
        "SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT' AND state = 'SUCCEEDED'",
    );
    assert!(succeeded >= acknowledged);
    assert_eq!(
        pair.core.balance(ZHANG_ACCOUNT).unwrap(),
        balance_before - AMOUNT_FEN * succeeded,
        "the core moved exactly what the journal says succeeded, once each"
    );
    eprintln!(
        "cutover took {:.2} s end to end; {} debits answered ({} by B); longest pause clients saw: \
         {:.0} ms around the cutover, {:.0} ms around the rollback",
        cutover_took.as_secs_f64(),
        answered.len(),
        by_node(1),
        longest_gap(&answered, started, on_b).as_secs_f64() * 1000.0,
        longest_gap(&answered, on_b, ended).as_secs_f64() * 1000.0,
    );
    assert_eq!(pair.a.daemon.as_mut().unwrap().stop(), Some(0));
    assert_eq!(pair.b.daemon.as_mut().unwrap().stop(), Some(0));
    assert_eq!(*pair.a.daemon().other_exit.lock().unwrap(), None);
    pair.coresim.stop();
}

fn debit(pair: &Pair, base: &str, agreement: &str) -> (u16, String) {
    let serial = pair.inst.next_id("D");
    let body = pair.inst.message(
        MsgType::Debit,
        &[
            ("ReqSerial", &serial),
            ("AgrmtNo", agreement),
            ("Amt", &AMOUNT_FEN.to_string()),
            ("Ccy", "CNY"),
        ],
    );
    let (status, raw) = post(base, MsgType::Debit, &body).expect("the node answers");
    let code = if status == 200 {
        pair.inst.verify_answer(raw).code().to_string()
    } else {
        String::new()
    };
    (status, code)
}

/// A debit the node took: paid (0000) or being processed (0001, the core's reply came after
/// the worker's wait).
fn assert_taken((status, code): (u16, String)) {
    assert_eq!(status, 200);
    assert!(code == "0000" || code == "0001", "answer {code}");
}

/// The standby's copy stops (its daemon is down) just before a cutover: the catch-up step
/// cannot finish, the cutover is refused, and the old active, already fenced, is put back and
/// takes business again by itself; the load it answered meanwhile is all there, once.
#[test]
fn a_cutover_that_cannot_catch_up_is_refused_and_the_old_active_serves_again() {
    let mut pair = Pair::start();
    let agreement = pair.sign_agreement();
    let load = Load::start(&pair, &agreement, 2);
    wait_until("load on A", Duration::from_secs(60), || load.answered() >= 50);
    assert_eq!(pair.b.daemon.as_mut().unwrap().stop(), Some(0));
    let (code, stdout, stderr) = run(kunpayctl()
        .arg("cutover")
        .arg("--config")
        .arg(pair.b.dir.config_path())
        .args(["--catch-up-timeout", "2s"]));
    let report = format!("{stdout}{stderr}");
    eprintln!("{report}");
    assert_eq!(code, 4, "refused\n{report}");
    assert!(report.contains("FAIL catch up"), "{report}");
    assert!(report.contains("the old active is ACTIVE again"), "{report}");
    // A was fenced at 2 and is back at 3; its daemon restarted on the fence and was promoted in
    // place when the role came back. B was never promoted.
    assert_eq!((role(&pair.a.url()).role, role(&pair.a.url()).epoch), (NodeRole::Active, 3));
    assert_eq!(role(&pair.b.url()).role, NodeRole::Standby);
    wait_until("A to take business again", Duration::from_secs(30), || pair.a.ops("/primary") == 200);
    let n = load.answered();
    wait_until("load on A after the refusal", Duration::from_secs(60), || load.answered() >= n + 50);
    let (answered, unanswered) = load.finish();
    assert_eq!(unanswered, 0);
    assert!(answered.values().all(|a| a.node == 0), "only A ever answered");
    wait_until("nothing owed to the core", Duration::from_secs(120), || {
        count(&pair.a.url(), "SELECT count(*) AS n FROM core_pending") == 0
    });
    for (serial, answer) in &answered {
        let state = if answer.code == "0000" { " AND state = 'SUCCEEDED'" } else { "" };
        assert_eq!(
            count(&pair.a.url(), &format!("SELECT count(*) AS n FROM txn WHERE req_serial = '{serial}'{state}")),
            1,
            "{serial} {answer:?}"
        );
    }
    assert_eq!(
        count(&pair.a.url(), "SELECT count(*) AS n FROM txn WHERE kind = 'DEBIT'") as usize,
        answered.len()
    );
    // B, started again, catches up with A as before.
    pair.b.daemon = Some(Supervised::start(pair.b.dir.clone()));
    wait_until("B to copy again", Duration::from_secs(60), || pair.b.ops("/standby") == 200);
    pair.coresim.stop();
}

/// Ways to end up with two active nodes, each tried and refused: a cutover or a promotion by
/// hand while the standby cannot reach the active's database; a promotion by hand while the
/// other database is ACTIVE; the old active restarted after a cutover with its old
/// configuration; a process from an earlier epoch writing into either database.
#[test]
fn split_brain_attempts_are_refused() {
    let mut pair = Pair::start_with(true);
    let agreement = pair.sign_agreement();
    assert_taken(debit(&pair, &pair.a.base, &agreement));

    // The link between the nodes is cut: B's copy stops, B cannot be promoted.
    pair.link.as_ref().unwrap().sever();
    wait_until("B to leave /standby", Duration::from_secs(60), || pair.b.ops("/standby") == 503);
    assert_eq!(pair.b.ops("/primary"), 503);
    assert_eq!(debit(&pair, &pair.b.base, &agreement).0, 503, "B takes no business");
    let (code, out, err) = run(kunpayctl()
        .arg("cutover")
        .arg("--config")
        .arg(pair.b.dir.config_path())
        .args(["--drain-timeout", "2s"]));
    assert_eq!(code, 4, "refused: {out}{err}");
    let (code, out, err) = run(kunpayctl()
        .args(["ha", "set-role", "active", "--epoch", "5", "--reason", "test", "--config"])
        .arg(pair.b.dir.config_path()));
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("cannot be read"), "{err}");
    assert_eq!(role(&pair.b.url()).role, NodeRole::Standby);
    assert_eq!(role(&pair.a.url()).role, NodeRole::Active);
    assert_taken(debit(&pair, &pair.a.base, &agreement));

    // The link is back: a promotion by hand is still refused while A is ACTIVE.
    pair.link.as_ref().unwrap().restore();
    wait_until("B to copy again", Duration::from_secs(60), || pair.b.ops("/standby") == 200);
    let (code, out, err) = run(kunpayctl()
        .args(["ha", "set-role", "active", "--epoch", "5", "--reason", "test", "--config"])
        .arg(pair.b.dir.config_path()));
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("is ACTIVE at fencing epoch 0"), "{err}");

    // A cutover moves the role; then the old active is restarted with a configuration from
    // before any of this (no [ha], node.role = "active").
    let (code, report) = handover("cutover", &pair.b);
    assert_eq!(code, 0, "{report}");
    assert_taken(debit(&pair, &pair.b.base, &agreement));
    let mut old = pair.a.daemon.take().unwrap();
    old.stop.store(true, Ordering::SeqCst);
    old.daemon.lock().unwrap().signal(nix::sys::signal::Signal::SIGKILL);
    drop(old);
    let stale = std::fs::read_to_string(pair.a.dir.config_path()).unwrap();
    let stale = stale[..stale.find("[ha]").unwrap()].to_string();
    assert!(stale.contains("role = \"active\""));
    std::fs::write(pair.a.dir.config_path(), stale).unwrap();
    let mut restarted = Daemon::spawn(&pair.a.dir);
    restarted.wait_ready();
    assert_eq!(pair.a.ops("/primary"), 503, "{}", restarted.stderr());
    assert_eq!(debit(&pair, &pair.a.base, &agreement).0, 503, "the old active takes no business");
    assert!(
        restarted.stderr().contains("node.role is active but this node's database is STANDBY"),
        "{}",
        restarted.stderr()
    );

    // A process that started under epoch 0 writes into either database: refused on both.
    for (url, what) in [(pair.a.url(), "STANDBY"), (pair.b.url(), "epoch 0")] {
        let mut conn = PgConnection::establish(&url).unwrap();
        ha::claim_epoch(&mut conn, 0).unwrap();
        let e = diesel::sql_query(
            "INSERT INTO seen_message (inst_id, msg_id, seen_at) VALUES ('X', 'stale-writer', now())",
        )
        .execute(&mut conn)
        .unwrap_err()
        .to_string();
        assert!(e.contains("kunpay fenced") && e.contains(what), "{url}: {e}");
    }
    restarted.signal(nix::sys::signal::Signal::SIGTERM);
    restarted.wait_exit(Duration::from_secs(30));
    pair.coresim.stop();
}
