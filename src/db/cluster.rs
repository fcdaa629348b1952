//! A private PostgreSQL cluster under a directory of ours: the embedded database of
//! `kunpayd --dev` and of tests that must stop, crash or reconfigure a server.
//!
//! Owns: initdb, start, stop and database creation for a cluster bound to 127.0.0.1 only, run
//! as an unprivileged account when we are root (PostgreSQL refuses to run as root).
//! Must never: be used for production data (trust authentication, local only), or touch a
//! cluster it did not create (it refuses a directory that holds something else).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, bail};
use nix::unistd::{Gid, Uid, User};

/// Superuser created by initdb; trust-authenticated on 127.0.0.1 only.
pub const SUPERUSER: &str = "kunpay";
const PORT_FILE: &str = "kunpay-port";

#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` settings, e.g. `("wal_level", "logical")`.
    pub settings: Vec<(String, String)>,
    /// Trade durability for speed (fsync off); only for throwaway test clusters.
    pub fast_unsafe: bool,
}

#[derive(Debug)]
pub struct PrivateCluster {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    run_as: Option<(Uid, Gid)>,
    started_by_us: bool,
}

impl PrivateCluster {
    /// Creates the cluster when `data_dir` is empty or missing, then starts it (or adopts it if
    /// it is already running from an earlier run).
    pub fn create_or_start(
        data_dir: &Path,
        options: &ClusterOptions,
    ) -> anyhow::Result<PrivateCluster> {
        let bin_dir = find_bin_dir()?;
        let run_as = unprivileged_account()?;
        let mut cluster = PrivateCluster {
            data_dir: data_dir.to_path_buf(),
            bin_dir,
            port: 0,
            run_as,
            started_by_us: false,
        };
        if !data_dir.join("PG_VERSION").exists() {
            cluster.init(options)?;
        }
        cluster.port = fs::read_to_string(data_dir.join(PORT_FILE))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| {
                format!(
                    "{} has no readable {PORT_FILE}; remove the directory to recreate it",
                    data_dir.display()
                )
            })?;
        if !cluster.is_running() {
            cluster.start()?;
        }
        Ok(cluster)
    }

    fn init(&mut self, options: &ClusterOptions) -> anyhow::Result<()> {
        if self.data_dir.exists() && fs::read_dir(&self.data_dir)?.next().is_some() {
            bail!(
                "{} exists, is not empty and is not a PostgreSQL cluster; refusing to touch it",
                self.data_dir.display()
            );
        }
        fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))?;
        self.chown(&self.data_dir)?;
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ])
            .output()
            .context("running initdb")?;
        check(&output, "initdb")?;
        let port = free_port()?;
        let mut conf = format!(
            "\n# kunpay private cluster\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = ''\nmax_connections = 200\nlog_min_messages = warning\n"
        );
        if options.fast_unsafe {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        for (key, value) in &options.settings {
            conf.push_str(&format!("{key} = '{value}'\n"));
        }
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path)?;
        existing.push_str(&conf);
        fs::write(&conf_path, existing)?;
        let port_path = self.data_dir.join(PORT_FILE);
        fs::write(&port_path, port.to_string())?;
        self.chown(&conf_path)?;
        self.chown(&port_path)?;
        Ok(())
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = self.data_dir.join("server.log");
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .context("running pg_ctl start")?;
        if let Err(e) = check(&output, "pg_ctl start") {
            let tail = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "{e}; server log {} ends with: {}",
                log.display(),
                tail.join(" | ")
            );
        }
        self.started_by_us = true;
        Ok(())
    }

    /// Fast shutdown: active transactions are rolled back, like a planned stop of a server.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Immediate shutdown: every server process is killed without a checkpoint, as in a
    /// crash; the next start runs crash recovery. For tests of what survives a crash.
    pub fn stop_immediate(&mut self) -> anyhow::Result<()> {
        self.pg_ctl_stop("immediate")
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> anyhow::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()
            .context("running pg_ctl stop")?;
        check(&output, "pg_ctl stop")?;
        self.started_by_us = false;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("status")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `name` unless it exists.
    pub fn ensure_database(&self, name: &str) -> anyhow::Result<()> {
        use diesel::prelude::*;
        anyhow::ensure!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?} must be letters, digits and _"
        );
        let mut conn = diesel::PgConnection::establish(&self.url("postgres"))
            .with_context(|| format!("connecting to the private cluster on port {}", self.port))?;
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let existing: Count =
            diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
                .bind::<diesel::sql_types::Text, _>(name)
                .get_result(&mut conn)?;
        if existing.n == 0 {
            diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut conn)?;
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            // std clears supplementary groups when it changes uid as root.
            command.uid(uid.as_raw()).gid(gid.as_raw());
            // pg_ctl and initdb refuse to work in a cwd they cannot read.
            command.current_dir("/");
        }
        command.env_remove("PGDATA").env("LC_ALL", "C");
        command
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.started_by_us {
            let _ = self.pg_ctl_stop("fast");
        }
    }
}

/// As root we must run PostgreSQL as someone else: `KUNPAY_PG_USER`, or `postgres`.
fn unprivileged_account() -> anyhow::Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = std::env::var("KUNPAY_PG_USER").unwrap_or_else(|_| "postgres".to_string());
    let user = User::from_name(&name)?.with_context(|| {
        format!(
            "running as root, the private PostgreSQL cluster needs an unprivileged account, but user \
             {name:?} does not exist; create it (useradd -r {name}) or set KUNPAY_PG_USER"
        )
    })?;
    Ok(Some((user.uid, user.gid)))
}

/// `KUNPAY_PG_BINDIR`, the directory of `initdb` on PATH, or the newest
/// /usr/lib/postgresql/N/bin (Debian) or /usr/pgsql-N/bin (RPM distributions).
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KUNPAY_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for pattern_dir in ["/usr/lib/postgresql", "/usr"] {
        if let Ok(entries) = fs::read_dir(pattern_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let bin = if pattern_dir == "/usr" {
                    if !name.starts_with("pgsql-") {
                        continue;
                    }
                    entry.path().join("bin")
                } else {
                    entry.path().join("bin")
                };
                if bin.join("initdb").exists() {
                    candidates.push(bin);
                }
            }
        }
    }
    candidates.sort_by_key(|p| {
        p.to_string_lossy()
            .split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(best) = candidates.pop() {
        return Ok(best);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                return Ok(fs::canonicalize(dir.join("initdb"))?
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or(dir));
            }
        }
    }
    bail!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them \
         (Debian: apt-get install postgresql) or set KUNPAY_PG_BINDIR"
    )
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn check(output: &Output, what: &str) -> anyhow::Result<()> {
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let detail = stderr
        .lines()
        .chain(stdout.lines())
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("");
    bail!("{what} failed ({}): {detail}", output.status)
}
