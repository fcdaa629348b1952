//! Two kunpay nodes copying each other through CDC, for the cutover tests and the HA
//! benchmark: private PostgreSQL clusters with wal_level = logical, two `kunpayd` processes
//! under a supervisor that restarts them on exit status 75 (as systemd does with the packaged
//! unit), a core simulator on the real RabbitMQ shared by both, and a load generator that
//! behaves like F5.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use kunpay::core::coresim::{CoreSimService, ServiceFaults};
use kunpay::core::sim::CoreSimulator;
use kunpay::db::cluster::ClusterOptions;
use kunpay::ha::{self, NodeRole};
use kunpay::payment::request::MsgType;

use super::amqp::*;
use super::institution::TestInstitution;
use super::proxy;
use super::*;

pub const ZHANG_ACCOUNT: &str = "6222021234567890123";
/// The simulator's demo customer: account, name, id number, phone.
pub const ZHANG: (&str, &str, &str, &str) =
    (ZHANG_ACCOUNT, "张三", "110101199003077774", "13812345678");
pub const AMOUNT_FEN: i64 = 100;

pub fn cluster() -> TestCluster {
    TestCluster::start(ClusterOptions {
        settings: vec![
            ("wal_level".into(), "logical".into()),
            ("fsync".into(), "off".into()),
            ("max_replication_slots".into(), "4".into()),
        ],
        fast_unsafe: false,
    })
}

pub fn count(url: &str, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(url).unwrap();
    diesel::sql_query(sql).get_result::<N>(&mut conn).unwrap().n
}

/// The `ha.max_lag` the HA benchmark was told (`KUNPAY_BENCH_HA_MAX_LAG`, say "8MiB": the lag
/// a cutover accepts under more load); None: the default (1 MiB).
pub fn bench_max_lag() -> Option<String> {
    std::env::var("KUNPAY_BENCH_HA_MAX_LAG").ok()
}

/// `ha.max_lag` for both nodes (see [`bench_max_lag`]).
fn max_lag_line() -> String {
    bench_max_lag()
        .map(|bound| format!("max_lag = \"{bound}\"\n"))
        .unwrap_or_default()
}

pub fn role(url: &str) -> ha::RoleRecord {
    ha::read_role(&mut PgConnection::establish(url).unwrap()).unwrap()
}

pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `kunpayd` that is started again whenever it exits with status 75 (its database's role
/// changed), like `RestartForceExitStatus=75` in the unit.
pub struct Supervised {
    pub daemon: Arc<Mutex<Daemon>>,
    pub restarts: Arc<AtomicU32>,
    /// Exit statuses other than 75: the supervisor stops at the first.
    pub other_exit: Arc<Mutex<Option<i32>>>,
    pub stop: Arc<AtomicBool>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervised {
    pub fn start(dir: Arc<DaemonDir>) -> Supervised {
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

    pub fn stderr(&self) -> String {
        self.daemon.lock().unwrap().stderr()
    }

    pub fn stop(&mut self) -> Option<i32> {
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

pub struct Node {
    pub cluster: TestCluster,
    pub dir: Arc<DaemonDir>,
    pub base: String,
    pub daemon: Option<Supervised>,
}

impl Node {
    pub fn url(&self) -> String {
        self.cluster.url()
    }

    pub fn daemon(&self) -> &Supervised {
        self.daemon.as_ref().unwrap()
    }

    pub fn ops(&self, path: &str) -> u16 {
        status_of(&self.dir.ops_url(path))
    }
}

/// Two nodes copying each other through CDC (each node's [ha] source is the other's database),
/// one institution registered on both with the same bank keys, and the core simulator on the
/// broker. Node A starts ACTIVE at epoch 0, node B STANDBY at epoch 1.
pub struct Pair {
    pub a: Node,
    pub b: Node,
    /// Between B (its CDC and its kunpayctl) and A's database, when the test cuts that link.
    pub link: Option<proxy::Proxy>,
    pub inst: Arc<TestInstitution>,
    pub core: Arc<CoreSimulator>,
    pub coresim: CoreSimService,
    pub _queues: Queues,
    pub _runtime: tokio::runtime::Runtime,
    pub _scratch: tempfile::TempDir,
}

impl Pair {
    pub fn start() -> Pair {
        Pair::start_with(false)
    }

    /// `cuttable_link`: B reaches A's database through a proxy the test can sever.
    pub fn start_with(cuttable_link: bool) -> Pair {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let queues = Queues::new();
        let core = Arc::new(CoreSimulator::with_demo_accounts());
        let coresim = CoreSimService::start(
            runtime.handle().clone(),
            queues.only(&queues.request, "coresim"),
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
                     [ha]\nsource_url = \"{peer}\"\npoll_every = \"20ms\"\nmax_lag_time = \"30s\"\n{max_lag}",
                    password_file.display(),
                    queues.request,
                    queues.reply,
                    queues.dead,
                    mac_file.display(),
                    max_lag = max_lag_line(),
                ),
            );
        };
        // B reaches A's database directly, or through a proxy the test can sever.
        let link =
            cuttable_link.then(|| proxy::Proxy::start(&format!("127.0.0.1:{}", ca.cluster.port())));
        let a_as_b_sees_it = match &link {
            Some(proxy) => ca.url().replace(
                &format!(":{}/", ca.cluster.port()),
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

    /// The simulator's demo customer 张三's agreement, signed on the active node A.
    pub fn sign_agreement(&self) -> String {
        self.inst.sign_agreement(ZHANG)
    }
}

pub use super::institution::post_to as post;

/// What the load generator saw of one debit.
#[derive(Debug, Clone)]
pub struct Answered {
    pub code: String,
    pub node: usize,
    pub at: Instant,
}

/// Debits from `workers` threads until `stop`, each sent to the node F5 would pick (the last
/// one that took business; on a 503 or a refused connection, the other one) and sent again,
/// byte for byte, until a node answers. Returns serial -> answer.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub answered: Arc<Mutex<BTreeMap<String, Answered>>>,
    pub unanswered: Arc<AtomicUsize>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(pair: &Pair, agreement: &str, workers: usize) -> Load {
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

    pub fn answered(&self) -> usize {
        self.answered.lock().unwrap().len()
    }

    pub fn finish(self) -> (BTreeMap<String, Answered>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        let answered = self.answered.lock().unwrap().clone();
        (answered, self.unanswered.load(Ordering::SeqCst))
    }
}

/// The longest time between two consecutive answers from `since` on: the pause clients saw.
pub fn longest_gap(
    answered: &BTreeMap<String, Answered>,
    since: Instant,
    until: Instant,
) -> Duration {
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

pub fn handover(kind: &str, node: &Node) -> (i32, String) {
    handover_with(
        kind,
        node,
        &["--drain-timeout", "15s", "--catch-up-timeout", "60s"],
    )
}

/// `kunpayctl cutover|rollback` on `node` with these timeouts; its exit code and report.
pub fn handover_with(kind: &str, node: &Node, timeouts: &[&str]) -> (i32, String) {
    let (code, stdout, stderr) = run(&mut handover_command(kind, node, timeouts));
    (code, format!("{stdout}{stderr}"))
}

/// The `kunpayctl cutover|rollback` command for `node`, for a test that runs it itself.
pub fn handover_command(kind: &str, node: &Node, timeouts: &[&str]) -> std::process::Command {
    let mut command = kunpayctl();
    command
        .arg(kind)
        .arg("--config")
        .arg(node.dir.config_path())
        .args(timeouts);
    command
}

pub fn debit(pair: &Pair, base: &str, agreement: &str) -> (u16, String) {
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
pub fn assert_taken((status, code): (u16, String)) {
    assert_eq!(status, 200);
    assert!(code == "0000" || code == "0001", "answer {code}");
}
