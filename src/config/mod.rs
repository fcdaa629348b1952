//! kunpay's configuration: `/etc/kunpay/kunpay.toml` (or `--config PATH`).
//!
//! Owns: the schema (every key, its type, default, range and meaning — mirrored in
//! docs/configuration.md and packaging/kunpay.toml), validation that reports every problem at
//! once, and the split between keys a SIGHUP may change and keys that need a restart.
//! Must never: touch the network or the database, or keep a secret (passwords, passphrases) in a
//! form that `Debug` prints.

mod reader;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use reader::Reader;
pub use reader::{ConfigErrors, ConfigIssue, parse_duration, parse_size_with_unit};

use crate::crypto::keyfile::PassphraseSource;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kunpay/kunpay.toml";

/// The node's role until the HA issue makes it dynamic: it decides what `/primary` and
/// `/standby` answer and therefore where F5 sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

impl FromStr for Role {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "active" => Ok(Role::Active),
            "standby" => Ok(Role::Standby),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Syslog,
    Stderr,
}

impl FromStr for LogTarget {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "syslog" => Ok(LogTarget::Syslog),
            "stderr" => Ok(LogTarget::Stderr),
            _ => Err(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(()),
        }
    }
}

/// A string that must not appear in logs or `Debug` output (database passwords, URLs with one).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: String,
    pub role: Role,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Account to drop to after binding and reading keys when started as root.
    pub user: String,
    /// Group to drop to; the user's primary group when absent.
    pub group: Option<String>,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct OpsConfig {
    pub listen: SocketAddr,
    /// Bound on the database probe behind /health, /primary, /standby and /readiness.
    pub health_timeout: Duration,
    /// /liveness answers 503 when the internal heartbeat is older than this.
    pub liveness_ttl: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// libpq URL without the password; `None` only in `--dev` mode (embedded cluster).
    pub url: Option<Secret>,
    pub password: Option<PassphraseSource>,
    pub pool_max_size: u32,
    pub pool_min_idle: u32,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    /// kunpay's own SM2 signing key (responses, notifications, audit checkpoints).
    pub sign_private: PathBuf,
    pub sign_passphrase: Option<PassphraseSource>,
    /// Serial under which institutions know our signing key (goes into message headers).
    pub sign_key_serial: String,
    pub distinguishing_id: String,
    /// kunpay's SM2 encryption key: institutions seal digital envelopes to it.
    pub encrypt_private: Option<PathBuf>,
    pub encrypt_passphrase: Option<PassphraseSource>,
    /// The serial institutions put in `<EncSN>` when they encrypt to us.
    pub encrypt_key_serial: String,
}

#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// How long SIGTERM waits for in-flight requests before giving up on them.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub target: LogTarget,
    /// An `EnvFilter` directive such as `info` or `info,kunpay::ops=debug`.
    pub level: String,
    pub format: LogFormat,
    pub syslog_facility: String,
    /// Longer log lines are cut so one runaway message cannot flood syslog.
    pub max_line: usize,
}

/// The business listener institutions connect to.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Plain HTTP instead of TLS: only for tests on loopback.
    pub plain_http: bool,
    pub max_body: usize,
    pub max_connections: usize,
    /// Our id as institutions address us (`RcvInstId` in responses we send).
    pub bank_id: String,
}

/// Real-time risk control (docs/risk-rules.md).
#[derive(Debug, Clone)]
pub struct RiskConfig {
    /// `strategy.toml`, `rules/*.toml`, `lists/*.toml`; watched and reloaded while running.
    pub dir: PathBuf,
    /// How long velocity events are kept: the longest window a rule may read.
    pub velocity_horizon: Duration,
    /// Default time budget per decision (an institution's `risk_budget` overrides it).
    pub budget: Duration,
    /// Default policy past the budget: true approves (fail-open), false declines.
    pub fail_open: bool,
}

/// The SM-signed message log (docs/audit.md): where it is written and how it is sealed.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The log directory (one per node; the daemon holds its lock).
    pub dir: PathBuf,
    /// The node's audit signing key (PKCS#8 PEM, SM2), read before the privilege drop.
    pub sign_private: PathBuf,
    pub sign_passphrase: Option<PassphraseSource>,
    /// The id auditors know the key's public half by; written into every checkpoint.
    pub key_id: String,
    /// A checkpoint at least this often while records arrive...
    pub checkpoint_every: Duration,
    /// ...and after this many records, whichever comes first.
    pub checkpoint_every_records: u64,
    /// A segment is closed before it grows past this size (and at each UTC day).
    pub max_segment_size: u64,
    /// Records that may wait for the writer; more make their callers wait (back-pressure).
    pub queue_bound: usize,
}

/// Result notifications to institutions' callback URLs.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Delays between attempts: the first attempt is at once, then one per entry; after the
    /// last a notification is DEAD (listed by `kunpayctl notify list --status dead`).
    pub schedule: Vec<Duration>,
    /// Bound on one delivery attempt (connect, send, answer).
    pub timeout: Duration,
    /// How often each institution's notifier looks for due notifications.
    pub poll_every: Duration,
    /// Notifications one notifier round takes at most.
    pub batch: usize,
}

/// The default schedule: 1 min, 2x5 min, 5x10 min, 5x1 h, 3x6 h.
pub const DEFAULT_NOTIFY_SCHEDULE: &str = "1min, 2x5min, 5x10min, 5x1h, 3x6h";

/// Parses a retry schedule such as "1min, 2x5min, 5x10min": comma-separated delays, each
/// optionally repeated with `Nx`.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    let mut delays = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("\"{text}\" has an empty entry"));
        }
        let (times, delay) = match part.split_once('x') {
            Some((n, d)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("\"{part}\": {n} is not a count"))?;
                (n, d)
            }
            _ => (1, part),
        };
        if times == 0 || times > 100 {
            return Err(format!("\"{part}\": repeat 1 to 100 times"));
        }
        let delay = reader::parse_duration(delay)?;
        if delay.is_zero() {
            return Err(format!("\"{part}\": a delay must be positive"));
        }
        delays.extend(std::iter::repeat_n(delay, times));
    }
    if delays.len() > 1000 {
        return Err("at most 1000 attempts".into());
    }
    Ok(delays)
}

/// Which core banking kunpay talks to.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Generated customers the in-process simulator holds besides its three demo accounts.
    pub simulator_generated_accounts: u32,
    /// `None`: the in-process simulator (`core.link = "simulator"`).
    pub amqp: Option<AmqpCoreConfig>,
}

/// The MQ bridge to core banking (`core.link = "amqp"`), see docs/core-link.md.
#[derive(Debug, Clone)]
pub struct AmqpCoreConfig {
    /// `amqp://user@host:port/vhost` or `amqps://...`, without a password.
    pub url: String,
    pub password: Option<PassphraseSource>,
    pub request_queue: String,
    pub reply_queue: String,
    pub dead_letter_queue: String,
    pub mac_key_id: String,
    /// Holds the shared MAC key as hex (at least 16 bytes).
    pub mac_key: Option<PassphraseSource>,
    pub reply_timeout: Duration,
    pub confirm_timeout: Duration,
    pub max_in_flight: usize,
    pub prefetch: u16,
    /// Postings the outbox may hold while the broker is away.
    pub max_queued: u64,
    /// UNKNOWN postings younger than this are delivered again; older ones only queried.
    pub redeliver_within: Duration,
}

#[derive(Debug, Clone)]
pub struct InstitutionConfig {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    pub sign_public: PathBuf,
    pub sign_key_serial: String,
    pub distinguishing_id: String,
    pub signature_format: crate::crypto::sm2::SignatureFormat,
    pub cipher_order: crate::crypto::sm2::CipherOrder,
    pub send_time_window: Duration,
    pub single_limit_fen: i64,
    pub daily_limit_fen: i64,
    pub callback_url: Option<String>,
    pub workers: usize,
    pub queue_depth: usize,
    pub db_pool_size: u32,
    /// Debit and credit statements one journal group commits together at most (1: each
    /// alone), and how many such groups run at once.
    pub journal_group_max: usize,
    pub journal_group_leaders: usize,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub breaker_failure_threshold: u32,
    pub breaker_open_for: Duration,
    /// Overrides of `risk.budget` / `risk.on_timeout` for this institution.
    pub risk_budget: Option<Duration>,
    pub risk_fail_open: Option<bool>,
}

/// Active/standby with CDC (docs/operations.md, "CDC and fencing"). The node's role is
/// `node.role` (configured) checked against its database's `ha_node_role` (authoritative).
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// The active node's database, which this node copies while it is the standby: a libpq URL
    /// without the password, for a user with REPLICATION (logical decoding reads its WAL).
    pub source_url: Option<Secret>,
    pub source_password: Option<PassphraseSource>,
    /// The logical replication slot on the source (created with test_decoding when missing).
    pub slot: String,
    /// Rows one read of the slot returns at most (a transaction is never split).
    pub batch: u32,
    /// How often a caught-up applier looks for new changes.
    pub poll_every: Duration,
    /// /standby answers 503 beyond these: the standby is too far behind to take over.
    pub max_lag_bytes: u64,
    pub max_lag_time: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub node: NodeConfig,
    pub service: ServiceConfig,
    pub ops: OpsConfig,
    pub database: DatabaseConfig,
    pub keys: KeysConfig,
    pub lifecycle: LifecycleConfig,
    pub log: LogConfig,
    /// `None` when the file has no `[channel]` section: an ops-only node.
    pub channel: Option<ChannelConfig>,
    pub institutions: Vec<InstitutionConfig>,
    pub core: CoreConfig,
    pub notify: NotifyConfig,
    /// `None` when the file has no `[risk]` section: every transaction is approved and the
    /// history says no rules are configured.
    pub risk: Option<RiskConfig>,
    /// `None` when the file has no `[audit]` section: no message log (tests, development).
    pub audit: Option<AuditConfig>,
    /// `None` when the file has no `[ha]` section: a single node, or a standby without CDC.
    pub ha: Option<HaConfig>,
}

/// How strict loading is about keys that only the embedded development setup may omit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Production,
    /// `kunpayd --dev`: a missing `database.url` means "start the embedded cluster".
    Development,
}

const SYSLOG_FACILITIES: &[&str] = &[
    "daemon", "user", "auth", "authpriv", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

impl Config {
    /// Reads and validates a file; the error lists every problem with file, line, key and reason.
    pub fn load(path: &Path, mode: Mode) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.to_path_buf(),
            issues: vec![ConfigIssue {
                key: String::new(),
                line: None,
                reason: format!("cannot read the configuration file: {e}"),
            }],
        })?;
        Config::parse(path, text, mode)
    }

    pub fn parse(path: &Path, text: String, mode: Mode) -> Result<Config, ConfigErrors> {
        // The parser consumes the text; keep a copy to turn an error's byte offset into a line.
        let raw_for_errors = text.clone();
        let doc = match toml_edit::Document::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                return Err(ConfigErrors {
                    file: path.to_path_buf(),
                    issues: vec![ConfigIssue {
                        key: String::new(),
                        line: e
                            .span()
                            .map(|span| reader::line_of(&raw_for_errors, span.start)),
                        reason: format!("not valid TOML: {}", e.message()),
                    }],
                });
            }
        };
        let mut r = Reader::new(&doc);
        let config = read_config(&mut r, path, mode);
        let issues = r.finish();
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors {
                file: path.to_path_buf(),
                issues,
            })
        }
    }

    /// Keys that differ between two loads and need a restart to take effect.
    pub fn restart_required_changes(&self, newer: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let a = self;
        let b = newer;
        if a.node.id != b.node.id {
            changed.push("node.id");
        }
        if a.service.user != b.service.user || a.service.group != b.service.group {
            changed.push("service.user/service.group");
        }
        if a.service.state_dir != b.service.state_dir {
            changed.push("service.state_dir");
        }
        if a.ops.listen != b.ops.listen || a.ops.max_connections != b.ops.max_connections {
            changed.push("ops.listen/ops.max_connections");
        }
        if a.database.url != b.database.url
            || a.database.password != b.database.password
            || a.database.pool_max_size != b.database.pool_max_size
            || a.database.pool_min_idle != b.database.pool_min_idle
            || a.database.connect_timeout != b.database.connect_timeout
            || a.database.statement_timeout != b.database.statement_timeout
        {
            changed.push("database.*");
        }
        if a.keys.sign_private != b.keys.sign_private
            || a.keys.sign_passphrase != b.keys.sign_passphrase
            || a.keys.sign_key_serial != b.keys.sign_key_serial
            || a.keys.distinguishing_id != b.keys.distinguishing_id
        {
            changed.push("keys.*");
        }
        if a.keys.encrypt_private != b.keys.encrypt_private
            || a.keys.encrypt_key_serial != b.keys.encrypt_key_serial
        {
            changed.push("keys.encrypt_*");
        }
        if format!("{:?}", a.ha) != format!("{:?}", b.ha) {
            changed.push("ha.*");
        }
        if format!("{:?}", a.channel) != format!("{:?}", b.channel) {
            changed.push("channel.*");
        }
        if format!("{:?}", a.institutions) != format!("{:?}", b.institutions) {
            changed.push("institutions.*");
        }
        if format!("{:?}", a.audit) != format!("{:?}", b.audit) {
            changed.push("audit.*");
        }
        if a.log.target != b.log.target
            || a.log.format != b.log.format
            || a.log.syslog_facility != b.log.syslog_facility
        {
            changed.push("log.target/log.format/log.syslog_facility");
        }
        changed
    }
}

fn read_passphrase_source(
    r: &mut Reader,
    file_key: &str,
    credential_key: &str,
) -> Option<PassphraseSource> {
    let file = r.opt_path(file_key);
    let credential = r.opt_str(credential_key);
    match (file, credential) {
        (Some(_), Some(_)) => {
            r.reject(
                credential_key,
                format!("set either {file_key} or {credential_key}, not both"),
            );
            None
        }
        (Some(file), None) => Some(PassphraseSource::File(file)),
        (None, Some(name)) => {
            if name.is_empty() || name.contains('/') {
                r.reject(
                    credential_key,
                    format!("\"{name}\" is not a credential name (no '/', not empty)"),
                );
                None
            } else {
                Some(PassphraseSource::Credential(name))
            }
        }
        (None, None) => None,
    }
}

fn read_config(r: &mut Reader, path: &Path, mode: Mode) -> Config {
    let node = NodeConfig {
        id: {
            let id = r.str_or("node.id", "kunpay-1");
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                r.reject(
                    "node.id",
                    format!("\"{id}\" must be 1-64 characters of A-Z a-z 0-9 - _ ."),
                );
            }
            id
        },
        role: r.parsed_or(
            "node.role",
            Role::Active,
            "a role; use \"active\" or \"standby\"",
        ),
    };

    let service = ServiceConfig {
        user: r.str_or("service.user", "kunpay"),
        group: r.opt_str("service.group"),
        state_dir: r
            .opt_path("service.state_dir")
            .unwrap_or_else(|| PathBuf::from("/var/lib/kunpay")),
    };

    let ops = OpsConfig {
        listen: r.parsed_or(
            "ops.listen",
            SocketAddr::from(([127, 0, 0, 1], 9401)),
            "an address; use IP:PORT such as \"127.0.0.1:9401\" or \"[::1]:9401\"",
        ),
        health_timeout: r.duration_or(
            "ops.health_timeout",
            Duration::from_secs(2),
            (Duration::from_millis(100), Duration::from_secs(60)),
        ),
        liveness_ttl: r.duration_or(
            "ops.liveness_ttl",
            Duration::from_secs(10),
            (Duration::from_secs(2), Duration::from_secs(600)),
        ),
        max_connections: r.int_or("ops.max_connections", 64, 1..=4096) as usize,
    };

    let url = r.opt_str("database.url");
    if url.is_none() && mode == Mode::Production {
        r.reject(
            "database.url",
            "is required; set it to a libpq URL such as \"postgres://kunpay@db.example:5432/kunpay\" \
             (the embedded database exists only with kunpayd --dev)",
        );
        // `reject` cannot find a missing key's line; nothing more to add.
    }
    if let Some(url) = &url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        r.reject(
            "database.url",
            "must start with postgres:// or postgresql://",
        );
    }
    if let Some(url) = &url
        && url_has_password(url)
    {
        r.reject(
            "database.url",
            "contains a password; put it in database.password_file or database.password_credential instead",
        );
    }
    let database = DatabaseConfig {
        url: url.map(Secret::new),
        password: read_passphrase_source(
            r,
            "database.password_file",
            "database.password_credential",
        ),
        pool_max_size: r.int_or("database.pool_max_size", 16, 1..=1024) as u32,
        pool_min_idle: r.int_or("database.pool_min_idle", 1, 0..=1024) as u32,
        connect_timeout: r.duration_or(
            "database.connect_timeout",
            Duration::from_secs(5),
            (Duration::from_millis(100), Duration::from_secs(300)),
        ),
        statement_timeout: r.duration_or(
            "database.statement_timeout",
            Duration::from_secs(30),
            (Duration::from_millis(100), Duration::from_secs(3600)),
        ),
        migrate_on_start: r.bool_or("database.migrate_on_start", false),
    };
    if database.pool_min_idle > database.pool_max_size {
        r.reject(
            "database.pool_min_idle",
            format!(
                "{} is larger than database.pool_max_size ({})",
                database.pool_min_idle, database.pool_max_size
            ),
        );
    }

    let keys = KeysConfig {
        sign_private: r
            .opt_path("keys.sign_private")
            .unwrap_or_else(|| PathBuf::from("/etc/kunpay/keys/node-sign.pem")),
        sign_passphrase: read_passphrase_source(
            r,
            "keys.sign_passphrase_file",
            "keys.sign_passphrase_credential",
        ),
        sign_key_serial: r.str_or("keys.sign_key_serial", "01"),
        distinguishing_id: {
            let id = r.str_or("keys.distinguishing_id", crate::crypto::sm2::DEFAULT_DISTID);
            if id.is_empty() || id.len() > 8191 {
                r.reject("keys.distinguishing_id", "must be 1 to 8191 bytes");
            }
            id
        },
        encrypt_private: r.opt_path("keys.encrypt_private"),
        encrypt_passphrase: read_passphrase_source(
            r,
            "keys.encrypt_passphrase_file",
            "keys.encrypt_passphrase_credential",
        ),
        encrypt_key_serial: r.str_or("keys.encrypt_key_serial", "01"),
    };

    let lifecycle = LifecycleConfig {
        drain_timeout: r.duration_or(
            "lifecycle.drain_timeout",
            Duration::from_secs(30),
            (Duration::from_millis(100), Duration::from_secs(3600)),
        ),
    };

    let log = LogConfig {
        target: r.parsed_or(
            "log.target",
            LogTarget::Syslog,
            "a log target; use \"syslog\" or \"stderr\"",
        ),
        level: {
            let level = r.str_or("log.level", "info");
            if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
                r.reject("log.level", format!("\"{level}\" is not a filter ({e}); use e.g. \"info\" or \"info,kunpay=debug\""));
            }
            level
        },
        format: r.parsed_or(
            "log.format",
            LogFormat::Text,
            "a log format; use \"text\" or \"json\"",
        ),
        syslog_facility: {
            let facility = r.str_or("log.syslog_facility", "daemon");
            if !SYSLOG_FACILITIES.contains(&facility.as_str()) {
                r.reject(
                    "log.syslog_facility",
                    format!(
                        "\"{facility}\" is not a facility; use one of {}",
                        SYSLOG_FACILITIES.join(", ")
                    ),
                );
            }
            facility
        },
        max_line: r.size_or("log.max_line", 8 * 1024, (256, 1024 * 1024)) as usize,
    };

    let channel = read_channel(r);
    let institutions = read_institutions(r);
    let core = CoreConfig {
        simulator_generated_accounts: r.int_or(
            "core.simulator_generated_accounts",
            0,
            0..=1_000_000,
        ) as u32,
        amqp: read_core_amqp(r, &node.id),
    };
    let notify = NotifyConfig {
        schedule: {
            let text = r.str_or("notify.schedule", DEFAULT_NOTIFY_SCHEDULE);
            match parse_schedule(&text) {
                Ok(delays) => delays,
                Err(why) => {
                    r.reject(
                        "notify.schedule",
                        format!("{why}; write delays like \"{DEFAULT_NOTIFY_SCHEDULE}\""),
                    );
                    Vec::new()
                }
            }
        },
        timeout: r.duration_or(
            "notify.timeout",
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(300)),
        ),
        poll_every: r.duration_or(
            "notify.poll_every",
            Duration::from_secs(1),
            (Duration::from_millis(10), Duration::from_secs(600)),
        ),
        batch: r.int_or("notify.batch", 64, 1..=10_000) as usize,
    };
    if channel.is_some() && keys.encrypt_private.is_none() {
        r.reject(
            "keys.encrypt_private",
            "is required when [channel] is configured: institutions encrypt sensitive fields to this key",
        );
    }

    let risk = r.section_exists("risk").then(|| RiskConfig {
        dir: r
            .opt_path("risk.dir")
            .unwrap_or_else(|| PathBuf::from("/etc/kunpay/risk")),
        velocity_horizon: r.duration_or(
            "risk.velocity_horizon",
            Duration::from_secs(7 * 24 * 3600),
            (
                Duration::from_secs(3600),
                Duration::from_secs(30 * 24 * 3600),
            ),
        ),
        budget: r.duration_or(
            "risk.budget",
            Duration::from_millis(5),
            (Duration::from_micros(100), Duration::from_secs(1)),
        ),
        fail_open: read_on_timeout(r, "risk.on_timeout", true),
    });

    let audit = read_audit(r);
    let ha = read_ha(r, node.role);

    Config {
        ha,
        source: path.to_path_buf(),
        node,
        service,
        ops,
        database,
        keys,
        lifecycle,
        log,
        channel,
        institutions,
        core,
        notify,
        risk,
        audit,
    }
}

fn read_audit(r: &mut Reader) -> Option<AuditConfig> {
    if !r.section_exists("audit") {
        return None;
    }
    let key_id = r.str_or("audit.key_id", "");
    if crate::audit::record::check_identifier("key id", &key_id, 64).is_err() {
        r.reject(
            "audit.key_id",
            format!(
                "\"{key_id}\" must be 1-64 characters of A-Z a-z 0-9 . _ - (the id auditors know \
                 the audit public key by, e.g. \"node-a-2026\"); it is required with [audit]"
            ),
        );
    }
    let dir = r
        .opt_path("audit.dir")
        .unwrap_or_else(|| PathBuf::from("/var/lib/kunpay/audit"));
    if !dir.is_absolute() {
        r.reject("audit.dir", "must be an absolute path");
    }
    Some(AuditConfig {
        dir,
        sign_private: r
            .opt_path("audit.sign_private")
            .unwrap_or_else(|| PathBuf::from("/etc/kunpay/keys/audit-sign.pem")),
        sign_passphrase: read_passphrase_source(
            r,
            "audit.sign_passphrase_file",
            "audit.sign_passphrase_credential",
        ),
        key_id,
        checkpoint_every: r.duration_or(
            "audit.checkpoint_every",
            Duration::from_secs(60),
            (Duration::from_millis(100), Duration::from_secs(86_400)),
        ),
        checkpoint_every_records: r.int_or(
            "audit.checkpoint_every_records",
            10_000,
            1..=crate::audit::MAX_CHECKPOINT_EVERY_RECORDS as i64,
        ) as u64,
        max_segment_size: r.size_or(
            "audit.max_segment_size",
            256 * 1024 * 1024,
            (64 * 1024, 1024 * 1024 * 1024 * 1024),
        ),
        queue_bound: r.int_or(
            "audit.queue_bound",
            4096,
            1..=crate::audit::MAX_QUEUE_BOUND as i64,
        ) as usize,
    })
}

fn read_ha(r: &mut Reader, role: Role) -> Option<HaConfig> {
    if !r.section_exists("ha") {
        return None;
    }
    let source_url = r.opt_str("ha.source_url");
    match &source_url {
        None if role == Role::Standby => r.reject(
            "ha.source_url",
            "is required on a standby: the active node's database URL, e.g. \
             \"postgres://kunpay_cdc@node-a-db:5432/kunpay\" (a user with REPLICATION)",
        ),
        Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
            r.reject("ha.source_url", "must start with postgres:// or postgresql://")
        }
        Some(url) if url_has_password(url) => r.reject(
            "ha.source_url",
            "contains a password; put it in ha.source_password_file or ha.source_password_credential instead",
        ),
        _ => {}
    }
    let slot = r.str_or("ha.slot", "kunpay_cdc");
    if !crate::ha::cdc::valid_slot_name(&slot) {
        r.reject(
            "ha.slot",
            format!("\"{slot}\" is not a slot name: 1-63 of a-z 0-9 _"),
        );
    }
    Some(HaConfig {
        source_url: source_url.map(Secret::new),
        source_password: read_passphrase_source(
            r,
            "ha.source_password_file",
            "ha.source_password_credential",
        ),
        slot,
        batch: r.int_or("ha.batch", 10_000, 1..=100_000) as u32,
        poll_every: r.duration_or(
            "ha.poll_every",
            Duration::from_millis(200),
            (Duration::from_millis(10), Duration::from_secs(60)),
        ),
        max_lag_bytes: r.size_or("ha.max_lag", 1024 * 1024, (0, 1024 * 1024 * 1024 * 1024)),
        max_lag_time: r.duration_or(
            "ha.max_lag_time",
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(24 * 3600)),
        ),
    })
}

/// `open` (approve past the budget) or `closed` (decline).
fn read_on_timeout(r: &mut Reader, key: &str, default_open: bool) -> bool {
    match r.opt_str(key).as_deref() {
        None => default_open,
        Some("open") => true,
        Some("closed") => false,
        Some(other) => {
            r.reject(
                key,
                format!("\"{other}\"; use \"open\" (approve) or \"closed\" (decline)"),
            );
            default_open
        }
    }
}

/// AMQP queue names: what RabbitMQ accepts, kept to a safe alphabet.
fn is_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with("amq.")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

fn read_core_amqp(r: &mut Reader, node_id: &str) -> Option<AmqpCoreConfig> {
    let link = r.str_or("core.link", "simulator");
    match link.as_str() {
        "simulator" => return None,
        "amqp" => {}
        other => {
            r.reject(
                "core.link",
                format!("\"{other}\" is not a core link; use \"simulator\" or \"amqp\""),
            );
            return None;
        }
    }
    let url = r.opt_str("core.amqp.url").unwrap_or_default();
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        r.reject(
            "core.amqp.url",
            "is required with core.link = \"amqp\" and must start with amqp:// or amqps://, e.g. \"amqp://kunpay@mq.bank:5672/%2f\"",
        );
    } else if url_has_password(&url) {
        r.reject(
            "core.amqp.url",
            "contains a password; put it in core.amqp.password_file or core.amqp.password_credential instead",
        );
    }
    let queue = |r: &mut Reader, key: &str, default: String| {
        let name = r.str_or(key, &default);
        if !is_queue_name(&name) {
            r.reject(
                key,
                format!("\"{name}\" is not a usable queue name (1-200 of A-Z a-z 0-9 . - _ :, not amq.*)"),
            );
        }
        name
    };
    let request_queue = queue(r, "core.amqp.request_queue", "kunpay.core.request".into());
    let reply_queue = queue(
        r,
        "core.amqp.reply_queue",
        format!("kunpay.core.reply.{node_id}"),
    );
    let dead_letter_queue = queue(r, "core.amqp.dead_letter_queue", "kunpay.core.dead".into());
    if request_queue == reply_queue
        || dead_letter_queue == request_queue
        || dead_letter_queue == reply_queue
    {
        r.reject(
            "core.amqp.reply_queue",
            "the request, reply and dead-letter queues must be three different queues",
        );
    }
    let mac_key_id = r.str_or("core.amqp.mac_key_id", "");
    if mac_key_id.is_empty() || mac_key_id.len() > 64 || !mac_key_id.is_ascii() {
        r.reject(
            "core.amqp.mac_key_id",
            "is required with core.link = \"amqp\": the id of the shared MAC key, 1-64 ASCII characters, agreed with the core team",
        );
    }
    let mac_key =
        read_passphrase_source(r, "core.amqp.mac_key_file", "core.amqp.mac_key_credential");
    if mac_key.is_none() {
        r.reject(
            "core.amqp.mac_key_file",
            "core.amqp.mac_key_file or core.amqp.mac_key_credential is required with core.link = \"amqp\" (the shared MAC key as hex)",
        );
    }
    Some(AmqpCoreConfig {
        url,
        password: read_passphrase_source(
            r,
            "core.amqp.password_file",
            "core.amqp.password_credential",
        ),
        request_queue,
        reply_queue,
        dead_letter_queue,
        mac_key_id,
        mac_key,
        reply_timeout: r.duration_or(
            "core.amqp.reply_timeout",
            Duration::from_secs(5),
            (Duration::from_millis(50), Duration::from_secs(300)),
        ),
        confirm_timeout: r.duration_or(
            "core.amqp.confirm_timeout",
            Duration::from_secs(5),
            (Duration::from_millis(50), Duration::from_secs(300)),
        ),
        max_in_flight: r.int_or("core.amqp.max_in_flight", 4096, 1..=1_000_000) as usize,
        prefetch: r.int_or("core.amqp.prefetch", 256, 1..=65_535) as u16,
        max_queued: r.int_or("core.amqp.max_queued", 100_000, 1..=100_000_000) as u64,
        redeliver_within: r.duration_or(
            "core.amqp.redeliver_within",
            Duration::from_secs(600),
            (Duration::ZERO, Duration::from_secs(7 * 24 * 3600)),
        ),
    })
}

fn read_channel(r: &mut Reader) -> Option<ChannelConfig> {
    if !r.section_exists("channel") {
        return None;
    }
    let channel = ChannelConfig {
        listen: r.parsed_or(
            "channel.listen",
            SocketAddr::from(([0, 0, 0, 0], 8443)),
            "an address; use IP:PORT such as \"0.0.0.0:8443\"",
        ),
        tls_cert: r.opt_path("channel.tls_cert"),
        tls_key: r.opt_path("channel.tls_key"),
        plain_http: r.bool_or("channel.plain_http", false),
        max_body: r.size_or("channel.max_body", 64 * 1024, (1024, 16 * 1024 * 1024)) as usize,
        max_connections: r.int_or("channel.max_connections", 1024, 1..=65_536) as usize,
        bank_id: r.str_or("channel.bank_id", "KUNPAY"),
    };
    if !channel.plain_http && (channel.tls_cert.is_none() || channel.tls_key.is_none()) {
        r.reject(
            "channel.tls_cert",
            "channel.tls_cert and channel.tls_key are required unless channel.plain_http = true (tests only)",
        );
    }
    if channel.plain_http && !channel.listen.ip().is_loopback() {
        r.reject(
            "channel.plain_http",
            "plain HTTP is allowed only on a loopback address",
        );
    }
    Some(channel)
}

fn read_institutions(r: &mut Reader) -> Vec<InstitutionConfig> {
    use crate::crypto::sm2::{CipherOrder, SignatureFormat};
    let mut institutions = Vec::new();
    for id in r.table_names("institutions") {
        let p = |key: &str| format!("institutions.{id}.{key}");
        if id.is_empty()
            || id.len() > 32
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            r.reject(
                &format!("institutions.{id}"),
                "institution ids are 1-32 characters of A-Z a-z 0-9 _",
            );
            continue;
        }
        let Some(sign_public) = r.opt_path(&p("sign_public")) else {
            r.reject(
                &format!("institutions.{id}"),
                format!("{} is required", p("sign_public")),
            );
            continue;
        };
        let institution = InstitutionConfig {
            name: r.str_or(&p("name"), &id),
            enabled: r.bool_or(&p("enabled"), true),
            sign_public,
            sign_key_serial: r.str_or(&p("sign_key_serial"), "01"),
            distinguishing_id: r
                .str_or(&p("distinguishing_id"), crate::crypto::sm2::DEFAULT_DISTID),
            signature_format: r.parsed_or(
                &p("signature_format"),
                SignatureFormat::Der,
                "a format; use \"der\" or \"raw\"",
            ),
            cipher_order: r.parsed_or(
                &p("cipher_order"),
                CipherOrder::C1C3C2,
                "an order; use \"c1c3c2\" or \"c1c2c3\"",
            ),
            send_time_window: r.duration_or(
                &p("send_time_window"),
                Duration::from_secs(300),
                (Duration::from_secs(1), Duration::from_secs(86_400)),
            ),
            single_limit_fen: r.int_or(&p("single_limit_fen"), 5_000_000, 1..=i64::MAX / 4),
            daily_limit_fen: r.int_or(&p("daily_limit_fen"), 20_000_000, 1..=i64::MAX / 4),
            callback_url: {
                let url = r.opt_str(&p("callback_url"));
                if let Some(url) = &url {
                    let loopback = [
                        "http://127.0.0.1:",
                        "http://127.0.0.1/",
                        "http://localhost:",
                        "http://localhost/",
                        "http://[::1]:",
                    ]
                    .iter()
                    .any(|prefix| url.starts_with(prefix));
                    if !(url.starts_with("https://") || loopback) {
                        r.reject(
                            &p("callback_url"),
                            format!("\"{url}\" must be an https:// URL (plain http only on a loopback address, for tests)"),
                        );
                    }
                }
                url
            },
            workers: r.int_or(&p("workers"), 4, 1..=256) as usize,
            queue_depth: r.int_or(&p("queue_depth"), 256, 1..=100_000) as usize,
            db_pool_size: r.int_or(&p("db_pool_size"), 4, 1..=256) as u32,
            journal_group_max: r.int_or(&p("journal_group_max"), 1, 1..=256) as usize,
            journal_group_leaders: r.int_or(&p("journal_group_leaders"), 2, 1..=256) as usize,
            rate_limit_per_second: r.int_or(&p("rate_limit_per_second"), 2_000, 1..=1_000_000)
                as u32,
            rate_limit_burst: r.int_or(&p("rate_limit_burst"), 500, 1..=1_000_000) as u32,
            breaker_failure_threshold: r.int_or(&p("breaker_failure_threshold"), 20, 1..=100_000)
                as u32,
            breaker_open_for: r.duration_or(
                &p("breaker_open_for"),
                Duration::from_secs(30),
                (Duration::from_millis(100), Duration::from_secs(3600)),
            ),
            risk_budget: r.opt_str(&p("risk_budget")).map(|_| {
                r.duration_or(
                    &p("risk_budget"),
                    Duration::from_millis(5),
                    (Duration::from_micros(100), Duration::from_secs(1)),
                )
            }),
            risk_fail_open: r
                .opt_str(&p("risk_on_timeout"))
                .map(|_| read_on_timeout(r, &p("risk_on_timeout"), true)),
            id,
        };
        if institution.single_limit_fen > institution.daily_limit_fen {
            r.reject(
                &format!("institutions.{}.single_limit_fen", institution.id),
                "is larger than daily_limit_fen",
            );
        }
        institutions.push(institution);
    }
    institutions
}

fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let in_userinfo = match authority.rsplit_once('@') {
        Some((userinfo, _)) => userinfo.contains(':'),
        None => false,
    };
    in_userinfo || url.contains("password=")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_notification_schedule_is_sixteen_retries_as_written() {
        let m = |n: u64| Duration::from_secs(60 * n);
        let delays = parse_schedule(DEFAULT_NOTIFY_SCHEDULE).unwrap();
        let mut expected = vec![m(1), m(5), m(5)];
        expected.extend([m(10); 5]);
        expected.extend([m(60); 5]);
        expected.extend([m(360); 3]);
        assert_eq!(delays, expected);
        assert_eq!(
            parse_schedule("200ms").unwrap(),
            vec![Duration::from_millis(200)]
        );
        for bad in ["", "1min,,5min", "0x1min", "1min, 0s", "5", "2x", "101x1s"] {
            assert!(parse_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(
            Path::new("/etc/kunpay/kunpay.toml"),
            text.to_string(),
            Mode::Production,
        )
    }

    #[test]
    fn minimal_production_config_uses_documented_defaults() {
        let config = parse("[database]\nurl = \"postgres://kunpay@db:5432/kunpay\"\n").unwrap();
        assert_eq!(config.node.role, Role::Active);
        assert_eq!(config.ops.listen, "127.0.0.1:9401".parse().unwrap());
        assert_eq!(config.lifecycle.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.keys.distinguishing_id, "1234567812345678");
        assert_eq!(config.log.max_line, 8192);
    }

    #[test]
    fn every_error_is_reported_with_file_line_and_key() {
        let text = "[node]\nrole = \"primary\"\n[ops]\nlisten = \"nowhere\"\nhealth_timeout = \"2\"\n\
                    [database]\nurl = \"postgres://kunpay:hunter2@db/kunpay\"\npool_max_size = 0\ncolour = \"red\"\n";
        let errors = parse(text).unwrap_err();
        let rendered = errors.to_string();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 6, "{rendered}");
        assert!(
            lines[0].starts_with("/etc/kunpay/kunpay.toml:2: node.role: \"primary\" is not a role")
        );
        assert!(lines[1].starts_with("/etc/kunpay/kunpay.toml:4: ops.listen:"));
        assert!(lines[2].contains(":5: ops.health_timeout: \"2\" has no unit"));
        assert!(lines[3].contains(":7: database.url: contains a password"));
        assert!(
            !rendered.contains("hunter2"),
            "a password must not be echoed: {rendered}"
        );
        assert!(rendered.contains(":8: database.pool_max_size: 0 is out of range"));
        assert!(rendered.contains(":9: database.colour: unknown key"));
    }

    #[test]
    fn production_requires_a_database_url_but_development_does_not() {
        let errors = parse("").unwrap_err().to_string();
        assert!(errors.contains("database.url: is required"), "{errors}");
        Config::parse(Path::new("dev.toml"), String::new(), Mode::Development).unwrap();
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let errors = parse("[ops]\nlisten = \n").unwrap_err();
        assert_eq!(errors.issues.len(), 1);
        assert!(errors.to_string().contains("not valid TOML"), "{errors}");
    }

    #[test]
    fn the_audit_section_has_defaults_needs_a_key_id_and_checks_its_ranges() {
        let base = "[database]\nurl = \"postgres://kunpay@db:5432/kunpay\"\n";
        assert!(parse(base).unwrap().audit.is_none(), "no [audit]: no log");
        let config = parse(&format!("{base}[audit]\nkey_id = \"node-a-audit-1\"\n")).unwrap();
        let audit = config.audit.unwrap();
        assert_eq!(audit.dir, PathBuf::from("/var/lib/kunpay/audit"));
        assert_eq!(
            audit.sign_private,
            PathBuf::from("/etc/kunpay/keys/audit-sign.pem")
        );
        assert_eq!(audit.checkpoint_every, Duration::from_secs(60));
        assert_eq!(audit.checkpoint_every_records, 10_000);
        assert_eq!(audit.max_segment_size, 256 * 1024 * 1024);
        assert_eq!(audit.queue_bound, 4096);

        let errors = parse(&format!(
            "{base}[audit]\ndir = \"relative/audit\"\ncheckpoint_every = \"1ms\"\n\
             checkpoint_every_records = 0\nmax_segment_size = \"1KiB\"\nqueue_bound = 100000\n\
             sign_passphrase_file = \"/a\"\nsign_passphrase_credential = \"b\"\nkeyid = \"x\"\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "audit.key_id: \"\" must be 1-64 characters",
            ":4: audit.dir: must be an absolute path",
            ":5: audit.checkpoint_every:",
            ":6: audit.checkpoint_every_records: 0 is out of range",
            ":7: audit.max_segment_size:",
            ":8: audit.queue_bound: 100000 is out of range",
            "audit.sign_passphrase_credential: set either",
            ":11: audit.keyid: unknown key",
        ] {
            assert!(errors.contains(key), "{key} not in:\n{errors}");
        }
        let bad_id = parse(&format!("{base}[audit]\nkey_id = \"a/b\"\n")).unwrap_err();
        assert!(bad_id.to_string().contains("audit.key_id"), "{bad_id}");
    }

    #[test]
    fn the_ha_section_is_validated_like_the_rest() {
        let base = "[database]\nurl = \"postgres://kunpay@db/kunpay\"\n";
        let config = parse(&format!(
            "{base}[node]\nrole = \"standby\"\n[ha]\nsource_url = \"postgres://cdc@node-a/kunpay\"\n"
        ))
        .unwrap();
        let ha = config.ha.unwrap();
        assert_eq!(ha.slot, "kunpay_cdc");
        assert_eq!(ha.batch, 10_000);
        assert_eq!(ha.max_lag_bytes, 1024 * 1024);
        assert_eq!(ha.poll_every, Duration::from_millis(200));
        assert!(parse(base).unwrap().ha.is_none());

        let errors = parse(&format!(
            "{base}[node]\nrole = \"standby\"\n[ha]\nslot = \"Bad-Slot\"\nbatch = 0\nmax_lag = \"lots\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            errors.contains("ha.source_url: is required on a standby"),
            "{errors}"
        );
        assert!(
            errors.contains(":6: ha.slot: \"Bad-Slot\" is not a slot name"),
            "{errors}"
        );
        assert!(
            errors.contains(":7: ha.batch: 0 is out of range"),
            "{errors}"
        );
        assert!(errors.contains(":8: ha.max_lag:"), "{errors}");
        let errors = parse(&format!(
            "{base}[ha]\nsource_url = \"postgres://cdc:pw@node-a/kunpay\"\nslots = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            errors.contains("ha.source_url: contains a password"),
            "{errors}"
        );
        assert!(!errors.contains("pw@"), "{errors}");
        assert!(errors.contains("ha.slots: unknown key"), "{errors}");
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let secret = Secret::new("postgres://u@h/d".into());
        assert_eq!(format!("{secret:?}"), "Secret(***)");
    }
}
