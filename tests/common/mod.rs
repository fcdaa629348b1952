//! Test harness: a fresh database per test on the shared server, private clusters for tests
//! that must stop or reconfigure a server, and a real `kunpayd` process per test.
//!
//! Everything a test creates is removed when its guard drops, so tests run in parallel
//! (nextest runs each in its own process) and leave nothing behind.

#![allow(dead_code)]

use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use kunpay::crypto::keyfile;
use kunpay::crypto::sm2::PrivateKey;
use kunpay::db::cluster::{ClusterOptions, PrivateCluster};

/// The shared server the machine runs (CI: PostgreSQL 15 on 127.0.0.1:5432, trust auth).
pub fn admin_url() -> String {
    std::env::var("KUNPAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A database of its own on the shared server, dropped (with its connections) at the end.
pub struct TestDb {
    pub name: String,
    url: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let name = unique("kunpay_t");
        let mut admin = PgConnection::establish(&admin_url()).unwrap_or_else(|e| {
            panic!(
                "the shared PostgreSQL at {} is not reachable ({e}); run `make test-deps`",
                admin_url()
            )
        });
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .unwrap();
        let base = admin_url();
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => panic!("KUNPAY_TEST_DATABASE_URL has no database part"),
        };
        TestDb { name, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn connect(&self) -> PgConnection {
        PgConnection::establish(&self.url).unwrap()
    }

    pub fn migrated() -> TestDb {
        let db = TestDb::new();
        kunpay::db::migrate(&mut db.connect()).unwrap();
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&admin_url()) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

/// A PostgreSQL cluster of the test's own, under target/tmp (reachable by the `postgres`
/// account that runs it when tests run as root); stopped and deleted at the end.
pub struct TestCluster {
    pub cluster: PrivateCluster,
    dir: PathBuf,
}

impl TestCluster {
    pub fn start(options: ClusterOptions) -> TestCluster {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("clusters");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = root.join(unique("pg"));
        let cluster = PrivateCluster::create_or_start(&dir, &options).unwrap();
        cluster.ensure_database("kunpay").unwrap();
        TestCluster { cluster, dir }
    }

    pub fn url(&self) -> String {
        self.cluster.url("kunpay")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on, for a daemon to bind a moment later. Taken below the kernel's
/// ephemeral range: a port the kernel hands out for `bind(0)` can be handed out again, in the
/// gap before the daemon binds it, as the local port of some outgoing connection (a database
/// client's, say), and the daemon then fails with "address in use".
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_from.max(10_001));
    for _ in 0..1000 {
        // Random per call and per process, so parallel tests spread over the range.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let port = low + (hasher.finish() % u64::from(high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {low} and {high}");
}

/// A directory for one daemon: config, keys, logs, the notify socket.
pub struct DaemonDir {
    pub dir: tempfile::TempDir,
    pub ops_port: u16,
}

impl DaemonDir {
    pub fn new() -> DaemonDir {
        let dir = tempfile::Builder::new()
            .prefix("kunpayd-test")
            .tempdir()
            .unwrap();
        // Readable by an account we drop to in privilege tests.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let key = PrivateKey::generate().unwrap();
        keyfile::write_private_key(&keys.join("node-sign.pem"), &key, None).unwrap();
        keyfile::write_public_key(&keys.join("node-sign.pub.pem"), &key.public_key()).unwrap();
        let encrypt = PrivateKey::generate().unwrap();
        keyfile::write_private_key(&keys.join("node-encrypt.pem"), &encrypt, None).unwrap();
        keyfile::write_public_key(&keys.join("node-encrypt.pub.pem"), &encrypt.public_key())
            .unwrap();
        DaemonDir {
            dir,
            ops_port: free_port(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("kunpay.toml")
    }

    /// A complete configuration; `extra` is appended verbatim (later sections may repeat
    /// none of the ones written here, so pass whole new sections or use `role`).
    pub fn write_config(&self, database_url: &str, role: &str, extra: &str) {
        // As root (CI) the daemon must drop privileges, so give it an account to drop to.
        let user = if nix::unistd::geteuid().is_root() {
            "nobody".to_string()
        } else {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .unwrap()
                .map(|u| u.name)
                .unwrap_or_else(|| "nobody".into())
        };
        let text = format!(
            r#"[node]
id = "test-node"
role = "{role}"

[service]
user = "{user}"
state_dir = "{state}"

[ops]
listen = "127.0.0.1:{port}"

[database]
url = "{database_url}"
migrate_on_start = true
pool_max_size = 4
connect_timeout = "3s"

[keys]
sign_private = "{keys}/node-sign.pem"

[log]
target = "stderr"
level = "info"
{extra}
"#,
            state = self.path().join("state").display(),
            port = self.ops_port,
            keys = self.path().join("keys").display(),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ops_port)
    }
}

impl DaemonDir {
    /// A node with the channel listener on plain HTTP (loopback) and the given institution
    /// sections; returns the channel's base URL.
    pub fn write_channel_config(
        &self,
        database_url: &str,
        channel_port: u16,
        institutions: &str,
        extra: &str,
    ) -> String {
        let channel = format!(
            "[channel]\nlisten = \"127.0.0.1:{channel_port}\"\nplain_http = true\nbank_id = \"KUNPAYTEST\"\nmax_body = \"64KiB\"\n\n{institutions}\n{extra}"
        );
        self.write_config(database_url, "active", &channel);
        let text = std::fs::read_to_string(self.config_path()).unwrap();
        let keys = self.path().join("keys");
        std::fs::write(
            self.config_path(),
            text.replace(
                "[keys]\n",
                &format!(
                    "[keys]\nencrypt_private = \"{}\"\nencrypt_key_serial = \"test-enc-01\"\n",
                    keys.join("node-encrypt.pem").display()
                ),
            ),
        )
        .unwrap();
        format!("http://127.0.0.1:{channel_port}")
    }
}

pub mod amqp;
pub mod ha;
pub mod institution;
pub mod proxy;

pub fn kunpayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kunpayd"))
}

pub fn kunpayctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kunpayctl"))
}

/// A running kunpayd with a systemd-style notify socket we read.
pub struct Daemon {
    pub child: Option<Child>,
    notify: UnixDatagram,
    pub stderr_path: PathBuf,
    pub notifications: Vec<String>,
}

impl Daemon {
    pub fn spawn(dir: &DaemonDir) -> Daemon {
        Daemon::spawn_with(dir, |_| {})
    }

    pub fn spawn_with(dir: &DaemonDir, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let socket_path = dir.path().join(format!("notify-{}.sock", unique("n")));
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o777)).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let stderr_path = dir.path().join(format!("{}.stderr", unique("kunpayd")));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = kunpayd();
        command
            .arg("--config")
            .arg(dir.config_path())
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        adjust(&mut command);
        let child = command.spawn().unwrap();
        Daemon {
            child: Some(child),
            notify,
            stderr_path,
            notifications: Vec::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Collects notifications until one contains `wanted`, the process exits, or time runs out.
    pub fn wait_notification(&mut self, wanted: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if self.notifications.iter().any(|n| n.contains(wanted)) {
                return true;
            }
            match self.notify.recv(&mut buf) {
                Ok(n) => self
                    .notifications
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => {
                    if let Some(child) = self.child.as_mut()
                        && child.try_wait().unwrap().is_some()
                    {
                        // Drain anything sent before the exit.
                        while let Ok(n) = self.notify.recv(&mut buf) {
                            self.notifications
                                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                        }
                        return self.notifications.iter().any(|n| n.contains(wanted));
                    }
                }
            }
        }
        false
    }

    pub fn wait_ready(&mut self) {
        if !self.wait_notification("READY=1", Duration::from_secs(60)) {
            panic!("kunpayd did not become ready; stderr:\n{}", self.stderr());
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.stderr_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && child.try_wait().ok().flatten().is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP client for tests: a generous timeout, and an error status is an answer, not an Err.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// GET with a generous timeout; returns (status, body). Never follows an error status into Err.
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    let mut response = http_agent().get(url).call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

pub fn status_of(url: &str) -> u16 {
    http_get(url)
        .map(|(s, _)| s)
        .unwrap_or_else(|e| panic!("GET {url} failed: {e}"))
}

/// Runs a command to completion, returning (exit code, stdout, stderr).
pub fn run(command: &mut Command) -> (i32, String, String) {
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// The one BIGINT column `n` of a query's one row.
pub fn scalar(conn: &mut PgConnection, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

/// A transaction of institution `T` journaled in SENT_TO_CORE at `at` (as the flows leave it
/// before the core call), on account hash `acct`; its id.
pub fn open_sent_to_core(
    conn: &mut diesel::PgConnection,
    serial: &str,
    kind: &str,
    amount_fen: i64,
    orig_txn_id: Option<uuid::Uuid>,
    at: chrono::DateTime<chrono::Utc>,
) -> uuid::Uuid {
    let txn_id = uuid::Uuid::now_v7();
    kunpay::payment::journal::insert_opened(
        conn,
        &kunpay::payment::journal::NewTxn {
            txn_id,
            inst_id: "T",
            req_serial: serial,
            kind,
            amount_fen,
            agreement_no: None,
            orig_txn_id,
            account_hash: "acct",
            account_masked: "622202*********0123",
            account_enc: "sealed",
            business_date: at.date_naive(),
            created_at: at,
        },
        &kunpay::payment::journal::Opening {
            risk_reason: "test",
            open_as: kunpay::payment::journal::OpenAs::SentToCore,
            decision: None,
        },
    )
    .unwrap();
    txn_id
}
