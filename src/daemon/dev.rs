//! `kunpayd --dev DIR`: a complete development node from nothing, for `make run`.
//!
//! Owns: the development directory: a generated configuration, demo keys created on first run,
//! and the embedded PostgreSQL cluster that stands in for the bank's openGauss.
//! Must never: be reachable from a production start (only the `--dev` flag leads here), listen
//! beyond 127.0.0.1, or overwrite a configuration or key that already exists.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::crypto::keyfile;
use crate::crypto::sm2::PrivateKey;
use crate::db::cluster::{ClusterOptions, PrivateCluster};

pub struct DevPaths {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub keys: PathBuf,
    pub cluster: PathBuf,
    /// The message log (`[audit]`), written by the service user.
    pub audit: PathBuf,
    /// The auditor's key file for `kunpay-audit verify --pubkeys`.
    pub pubkeys: PathBuf,
    /// kunpay-coresim's directory (its config and the secrets it shares with the node), made
    /// when a broker answered as the configuration was generated.
    pub coresim: PathBuf,
}

impl DevPaths {
    pub fn new(dir: &Path) -> anyhow::Result<DevPaths> {
        let dir =
            std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        Ok(DevPaths {
            config: dir.join("kunpay.toml"),
            keys: dir.join("keys"),
            cluster: dir.join("pg"),
            audit: dir.join("audit"),
            pubkeys: dir.join("pubkeys.toml"),
            coresim: dir.join("coresim"),
            dir,
        })
    }
}

/// Creates what is missing: directory, configuration, demo keys. Returns what it created.
pub fn prepare(paths: &DevPaths) -> anyhow::Result<Vec<String>> {
    let mut created = Vec::new();
    fs::create_dir_all(&paths.dir).with_context(|| format!("creating {}", paths.dir.display()))?;
    // The embedded cluster's account must be able to reach its data directory inside.
    fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o755))?;
    if !paths.config.exists() {
        let broker = broker_answers();
        if broker {
            prepare_coresim(paths)?;
            created.push(format!(
                "kunpay-coresim configuration {} (a broker answers on {DEV_BROKER})",
                paths.coresim.join("coresim.toml").display()
            ));
        }
        fs::write(&paths.config, dev_config(paths, broker))
            .with_context(|| format!("writing {}", paths.config.display()))?;
        created.push(format!("configuration {}", paths.config.display()));
    }
    fs::create_dir_all(&paths.keys)?;
    fs::set_permissions(&paths.keys, fs::Permissions::from_mode(0o700))?;
    for name in [
        "node-sign",
        "node-encrypt",
        "node-audit-sign",
        "demo-institution-sign",
    ] {
        let private = paths.keys.join(format!("{name}.pem"));
        if !private.exists() {
            let key = PrivateKey::generate()?;
            keyfile::write_private_key(&private, &key, None)?;
            keyfile::write_public_key(
                &paths.keys.join(format!("{name}.pub.pem")),
                &key.public_key(),
            )?;
            created.push(format!("demo key {}", private.display()));
        }
    }
    if !paths.audit.exists() {
        fs::create_dir(&paths.audit)
            .with_context(|| format!("creating {}", paths.audit.display()))?;
        fs::set_permissions(&paths.audit, fs::Permissions::from_mode(0o750))?;
        // The daemon writes its log after dropping to the service user.
        hand_to_service_account(&[&paths.audit])?;
        created.push(format!("message log directory {}", paths.audit.display()));
    }
    if !paths.pubkeys.exists() {
        fs::write(&paths.pubkeys, dev_pubkeys(paths))
            .with_context(|| format!("writing {}", paths.pubkeys.display()))?;
        created.push(format!("auditor's key file {}", paths.pubkeys.display()));
    }
    Ok(created)
}

/// The local broker `make run` uses for kunpay-coresim when it answers.
const DEV_BROKER: &str = "127.0.0.1:5672";

fn broker_answers() -> bool {
    let address: std::net::SocketAddr = DEV_BROKER.parse().expect("a socket address");
    std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_millis(500)).is_ok()
}

/// Queue names of this development directory, so two of them on one machine (or a test's
/// queues) never share a queue.
fn queue_prefix(paths: &DevPaths) -> String {
    let digest = crate::crypto::sm3::digest(paths.dir.to_string_lossy().as_bytes());
    format!("kunpay.dev.{}", hex::encode(&digest[..4]))
}

/// kunpay-coresim's directory: its configuration, the broker password and the core link's
/// MAC key, owned by the service user (the simulator runs as that user; kunpayd reads the
/// same two secrets before it drops privileges).
fn prepare_coresim(paths: &DevPaths) -> anyhow::Result<()> {
    let dir = &paths.coresim;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let mut mac_key = [0u8; 32];
    getrandom::fill(&mut mac_key).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    let prefix = queue_prefix(paths);
    let files = [
        ("amqp-password", "guest\n".to_string()),
        ("core-mac.key", format!("{}\n", hex::encode(mac_key))),
        (
            "coresim.toml",
            format!(
                r#"# Generated by `kunpayd --dev`: the core-banking simulator of the development node,
# on the local broker (packaging/coresim.toml documents every key). kunpayd --dev starts and
# stops it.
[amqp]
url = "amqp://guest@{DEV_BROKER}/%2f"
password_file = "{dir}/amqp-password"
request_queue = "{prefix}.request"
dead_letter_queue = "{prefix}.dead"

[mac]
key_id = "dev-core"
key_file = "{dir}/core-mac.key"
"#,
                dir = dir.display()
            ),
        ),
    ];
    let mut owned = vec![dir.clone()];
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        owned.push(path);
    }
    hand_to_service_account(&owned.iter().map(PathBuf::as_path).collect::<Vec<_>>())
}

/// The development node's kunpay-coresim, a child process: started before the node serves,
/// stopped (SIGTERM, then SIGKILL after 10 s) when the node stops or fails to start.
pub struct DevCoreSim {
    child: std::process::Child,
}

impl DevCoreSim {
    /// Starts kunpay-coresim when the generated configuration uses it (the core link is AMQP
    /// and the node's coresim directory exists); `None` otherwise.
    pub fn start(paths: &DevPaths, core_over_amqp: bool) -> anyhow::Result<Option<DevCoreSim>> {
        let config = paths.coresim.join("coresim.toml");
        if !core_over_amqp || !config.exists() {
            return Ok(None);
        }
        let exe = std::env::current_exe()?.with_file_name("kunpay-coresim");
        anyhow::ensure!(
            exe.exists(),
            "{} is missing; `cargo build --bins` (make run) builds it",
            exe.display()
        );
        let mut command = std::process::Command::new(&exe);
        command
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null());
        if let Some(user) = service_account()? {
            use std::os::unix::process::CommandExt as _;
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(Some(DevCoreSim { child }))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        tracing::warn!("kunpay-coresim did not stop within 10 s of SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DevCoreSim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The account the daemon drops to: as root, the one that runs the embedded cluster (so that
/// it can also stop that cluster when it exits); otherwise the caller.
fn service_user() -> String {
    if nix::unistd::Uid::effective().is_root() {
        std::env::var("KUNPAY_PG_USER").unwrap_or_else(|_| "postgres".to_string())
    } else {
        nix::unistd::User::from_uid(nix::unistd::Uid::effective())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "nobody".to_string())
    }
}

/// The service account when we are root (and so drop to it); `None` when we run as ourselves.
fn service_account() -> anyhow::Result<Option<nix::unistd::User>> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    let name = service_user();
    let user = nix::unistd::User::from_name(&name)?
        .with_context(|| format!("no account {name} to run the development node as"))?;
    Ok(Some(user))
}

/// Makes `paths` the service account's, for what it writes or reads after the privilege drop.
fn hand_to_service_account(paths: &[&Path]) -> anyhow::Result<()> {
    if let Some(user) = service_account()? {
        for path in paths {
            nix::unistd::chown(*path, Some(user.uid), Some(user.gid))
                .with_context(|| format!("handing {} to {}", path.display(), user.name))?;
        }
    }
    Ok(())
}

/// The development node's audit key id.
const DEV_AUDIT_KEY_ID: &str = "dev-audit-1";

/// What an auditor passes to `kunpay-audit verify DIR --pubkeys FILE` (docs/audit.md).
fn dev_pubkeys(paths: &DevPaths) -> String {
    format!(
        r#"# Generated by `kunpayd --dev`: the keys that check the development node's message log:
#   kunpay-audit verify {audit} --pubkeys {this}
[audit_keys]
{DEV_AUDIT_KEY_ID} = {{ pem_file = "{keys}/node-audit-sign.pub.pem" }}

[institutions.DEMO]
pem_file = "{keys}/demo-institution-sign.pub.pem"
"#,
        audit = paths.audit.display(),
        this = paths.pubkeys.display(),
        keys = paths.keys.display(),
    )
}

/// Starts (creating on first run) the embedded cluster and its `kunpay` database.
pub fn start_database(paths: &DevPaths) -> anyhow::Result<PrivateCluster> {
    let cluster = PrivateCluster::create_or_start(&paths.cluster, &ClusterOptions::default())
        .context("starting the embedded PostgreSQL cluster")?;
    cluster.ensure_database("kunpay")?;
    Ok(cluster)
}

/// The documented port, unless something already holds it on this machine.
fn dev_port(preferred: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return preferred;
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

fn dev_config(paths: &DevPaths, broker: bool) -> String {
    let user = service_user();
    let core = if broker {
        let prefix = queue_prefix(paths);
        format!(
            r#"# Core banking: kunpay-coresim (started and stopped by kunpayd --dev) over the broker
# that answered on {DEV_BROKER} when this file was generated. For the in-process simulator
# instead, set link = "simulator" and delete [core.amqp].
[core]
link = "amqp"

[core.amqp]
url = "amqp://guest@{DEV_BROKER}/%2f"
password_file = "{dir}/amqp-password"
request_queue = "{prefix}.request"
reply_queue = "{prefix}.reply"
dead_letter_queue = "{prefix}.dead"
mac_key_id = "dev-core"
mac_key_file = "{dir}/core-mac.key"
"#,
            dir = paths.coresim.display()
        )
    } else {
        format!(
            "# Core banking: the in-process simulator (no broker answered on {DEV_BROKER} when this\n\
             # file was generated; delete it with a broker running to use kunpay-coresim).\n\
             [core]\nlink = \"simulator\"\n"
        )
    };
    format!(
        r#"# Generated by `kunpayd --dev` for a development node on this machine. Not for production:
# the embedded database trusts every local connection. Every key is documented in
# docs/configuration.md. Delete this file to get a fresh one.

[node]
id = "dev-1"
role = "active"

[service]
user = "{user}"
state_dir = "{state}"

[ops]
listen = "127.0.0.1:{ops_port}"

[database]
# No url: kunpayd --dev starts the embedded cluster in {cluster}.
migrate_on_start = true
pool_max_size = 8

[keys]
sign_private = "{keys}/node-sign.pem"
sign_key_serial = "dev-01"
encrypt_private = "{keys}/node-encrypt.pem"
encrypt_key_serial = "dev-enc-01"

# Plain HTTP on loopback for the development node; production uses TLS (channel.tls_cert).
[channel]
listen = "127.0.0.1:{channel_port}"
plain_http = true
bank_id = "KUNPAYDEV"

# A demo institution whose private key is {keys}/demo-institution-sign.pem.
[institutions.DEMO]
name = "Demo payment institution"
sign_public = "{keys}/demo-institution-sign.pub.pem"
sign_key_serial = "demo-01"

{core}
# The SM2-signed message log; check it with
#   kunpay-audit verify {audit} --pubkeys {pubkeys}
[audit]
dir = "{audit}"
sign_private = "{keys}/node-audit-sign.pem"
key_id = "{DEV_AUDIT_KEY_ID}"
checkpoint_every = "10s"

[lifecycle]
drain_timeout = "10s"

[log]
target = "stderr"
level = "info"
"#,
        ops_port = dev_port(9401),
        channel_port = dev_port(8443),
        state = paths.dir.join("state").display(),
        cluster = paths.cluster.display(),
        keys = paths.keys.display(),
        audit = paths.audit.display(),
        pubkeys = paths.pubkeys.display(),
    )
}
