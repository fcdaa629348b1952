//! Result notifications against a real daemon and a callback endpoint the test controls: it
//! fails, hangs, then recovers; a notification that exhausts its schedule is dead, listed and
//! replayed with kunpayctl; pending notifications survive a restart.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::institution::TestInstitution;
use common::*;
use diesel::prelude::*;
use kunpay::payment::request::MsgType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Ok,
    Fail,
    /// Reads the request and never answers (until the client gives up).
    Hang,
}

/// An institution's callback endpoint: answers by a script of behaviours, then by a default.
struct Callback {
    port: u16,
    script: Arc<Mutex<VecDeque<Behaviour>>>,
    default: Arc<Mutex<Behaviour>>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Callback {
    fn start(script: &[Behaviour], default: Behaviour) -> Callback {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let callback = Callback {
            port,
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            default: Arc::new(Mutex::new(default)),
            received: Arc::new(Mutex::new(Vec::new())),
        };
        let (script, default, received) = (
            callback.script.clone(),
            callback.default.clone(),
            callback.received.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let behaviour = script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(*default.lock().unwrap());
                let received = received.clone();
                std::thread::spawn(move || serve(stream, behaviour, &received));
            }
        });
        callback
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/kunpay/notify", self.port)
    }

    fn set_default(&self, behaviour: Behaviour) {
        *self.default.lock().unwrap() = behaviour;
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, received: &Mutex<Vec<Vec<u8>>>) {
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
    received.lock().unwrap().push(body);
    match behaviour {
        Behaviour::Ok => {
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nSUCCESS",
            );
        }
        Behaviour::Fail => {
            let _ = stream.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy",
            );
        }
        Behaviour::Hang => std::thread::sleep(Duration::from_secs(5)),
    }
}

struct Node {
    db: TestDb,
    dir: DaemonDir,
    daemon: Daemon,
    inst: TestInstitution,
    agreement: String,
}

const ZHANG: [&str; 4] = [
    "6222021234567890123",
    "张三",
    "110101199003077774",
    "13812345678",
];

impl Node {
    fn start(callback_url: &str, schedule: &str) -> Node {
        let db = TestDb::new();
        let dir = DaemonDir::new();
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let (inst, section) =
            TestInstitution::create(dir.path(), "NOTIF", &dir.path().join("keys"), &base);
        dir.write_channel_config(
            db.url(),
            port,
            &format!("{section}callback_url = \"{callback_url}\"\n"),
            &format!(
                "[notify]\nschedule = \"{schedule}\"\ntimeout = \"800ms\"\npoll_every = \"50ms\"\n"
            ),
        );
        let mut daemon = Daemon::spawn(&dir);
        daemon.wait_ready();
        let agreement = inst.sign_agreement((ZHANG[0], ZHANG[1], ZHANG[2], ZHANG[3]));
        Node {
            db,
            dir,
            daemon,
            inst,
            agreement,
        }
    }

    /// Pays 100 fen; returns the transaction id.
    fn debit(&self) -> String {
        let answer = self.inst.call(
            MsgType::Debit,
            &[
                ("ReqSerial", &self.inst.next_id("D")),
                ("AgrmtNo", &self.agreement),
                ("Amt", "100"),
                ("Ccy", "CNY"),
            ],
        );
        assert_eq!(answer.code(), "0000", "{:?}", answer.fields);
        answer.get("TxnId").to_string()
    }

    fn text(&self, sql: &str) -> String {
        #[derive(QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            t: String,
        }
        let mut conn = PgConnection::establish(self.db.url()).unwrap();
        diesel::sql_query(sql)
            .get_result::<T>(&mut conn)
            .map(|r| r.t)
            .unwrap_or_default()
    }

    fn status_of(&self, txn_id: &str) -> String {
        self.text(&format!(
            "SELECT status AS t FROM notification WHERE txn_id = '{txn_id}'"
        ))
    }

    fn wait_status(&self, txn_id: &str, wanted: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.status_of(txn_id) == wanted {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn attempts(&self, txn_id: &str) -> String {
        self.text(&format!(
            "SELECT string_agg(coalesce(CAST(a.http_status AS TEXT), 'none'), ',' ORDER BY a.id) AS t \
             FROM notification_attempt a JOIN notification n ON n.event_id = a.event_id \
             WHERE n.txn_id = '{txn_id}'"
        ))
    }

    fn kunpayctl(&self, args: &[&str]) -> (i32, String) {
        let output = kunpayctl()
            .args(args)
            .arg("--config")
            .arg(self.dir.config_path())
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }
}

#[test]
fn a_notification_survives_a_failing_then_hanging_endpoint_and_is_signed() {
    let callback = Callback::start(&[Behaviour::Fail, Behaviour::Hang], Behaviour::Ok);
    let node = Node::start(&callback.url(), "200ms, 200ms, 200ms");
    let txn_id = node.debit();
    assert!(
        node.wait_status(&txn_id, "DELIVERED", Duration::from_secs(15)),
        "delivered after the endpoint recovers: {}\n{}",
        node.status_of(&txn_id),
        node.daemon.stderr()
    );
    // Every attempt recorded: refused, no answer (timeout), acknowledged.
    assert_eq!(node.attempts(&txn_id), "500,none,200");
    let received = callback.received();
    assert_eq!(received.len(), 3);
    let mut message_ids = Vec::new();
    for raw in received {
        // Signed by kunpay with its key, like every answer.
        let notice = node.inst.verify_answer(raw);
        assert_eq!(notice.get("MsgTp"), "TXN_NOTIFY");
        assert_eq!(notice.get("RcvInstId"), "NOTIF");
        assert_eq!(notice.get("TxnId"), txn_id);
        assert_eq!(notice.get("TxnStatus"), "SUCCEEDED");
        assert_eq!(notice.get("Amt"), "100");
        assert_eq!(notice.get("AcctNoMasked"), "622202*********0123");
        assert_eq!(notice.get("EventId"), notice.get("MsgId"));
        message_ids.push(notice.get("MsgId").to_string());
    }
    message_ids.dedup();
    assert_eq!(
        message_ids.len(),
        1,
        "one event id across attempts, for deduplication"
    );
}

#[test]
fn a_dead_notification_is_listed_and_replayed_and_pending_ones_survive_a_restart() {
    let callback = Callback::start(&[], Behaviour::Fail);
    let mut node = Node::start(&callback.url(), "100ms, 100ms");
    let dead = node.debit();
    assert!(
        node.wait_status(&dead, "DEAD", Duration::from_secs(15)),
        "dead after the schedule: {}",
        node.status_of(&dead)
    );
    assert_eq!(node.attempts(&dead), "500,500,500");
    let event = node.text(&format!(
        "SELECT replace(CAST(event_id AS TEXT), '-', '') AS t FROM notification WHERE txn_id = '{dead}'"
    ));
    let (code, listed) = node.kunpayctl(&["notify", "list", "--status", "dead"]);
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains(&event), "{listed}");
    assert!(listed.contains("HTTP 500"), "{listed}");
    let (code, shown) = node.kunpayctl(&["notify", "show", &event]);
    assert_eq!(code, 0, "{shown}");
    assert_eq!(shown.matches("HTTP 500").count(), 3, "{shown}");

    callback.set_default(Behaviour::Ok);
    let (code, replayed) = node.kunpayctl(&["notify", "replay", &event]);
    assert_eq!(code, 0, "{replayed}");
    assert!(node.wait_status(&dead, "DELIVERED", Duration::from_secs(10)));
    let (code, again) = node.kunpayctl(&["notify", "replay", "not-an-id"]);
    assert_eq!(code, 2, "{again}");
    assert!(again.contains("not an event id"), "{again}");

    // A notification still pending when the daemon stops is delivered after it starts again.
    // (The endpoint hangs, so the first attempt is still waiting when the daemon stops.)
    callback.set_default(Behaviour::Hang);
    let pending = node.debit();
    std::thread::sleep(Duration::from_millis(150));
    node.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    node.daemon
        .wait_exit(Duration::from_secs(30))
        .expect("stops");
    assert_eq!(node.status_of(&pending), "PENDING");
    callback.set_default(Behaviour::Ok);
    let mut daemon = Daemon::spawn(&node.dir);
    daemon.wait_ready();
    node.daemon = daemon;
    assert!(
        node.wait_status(&pending, "DELIVERED", Duration::from_secs(10)),
        "{}",
        node.status_of(&pending)
    );
}
