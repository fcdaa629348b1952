//! kunpay-coresim's configuration file (TOML, unknown keys refused; docs/core-link.md): the
//! broker, the shared MAC key, the ledger's database, generated accounts, the faults and the
//! control endpoint. A library module so the daemon's tests and the control endpoint share it.
//! Must never: accept a secret file readable by others, or a control endpoint off loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::Rejection;
use super::amqp::AmqpSettings;
use super::coresim::ServiceFaults;
use super::wire::MacKeys;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    amqp: AmqpSection,
    mac: MacSection,
    /// The ledger's own database; without it the ledger lives in memory and a crash loses it.
    database: Option<DatabaseSection>,
    #[serde(default)]
    ledger: LedgerSection,
    #[serde(default)]
    faults: FaultsSection,
    control: Option<ControlSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlSection {
    /// host:port of the HTTP control endpoint; loopback only (it has no authentication).
    listen: std::net::SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AmqpSection {
    url: String,
    password_file: Option<PathBuf>,
    #[serde(default = "default_request_queue")]
    request_queue: String,
    #[serde(default = "default_dead_letter_queue")]
    dead_letter_queue: String,
    #[serde(default = "default_prefetch")]
    prefetch: u16,
    /// Requests handled at once (each waits for its reply's confirm); at most `prefetch`.
    #[serde(default = "default_concurrency")]
    concurrency: usize,
}

fn default_request_queue() -> String {
    "kunpay.core.request".into()
}
fn default_dead_letter_queue() -> String {
    "kunpay.core.dead".into()
}
fn default_prefetch() -> u16 {
    64
}
fn default_concurrency() -> usize {
    32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseSection {
    /// libpq URL without a password.
    url: String,
    password_file: Option<PathBuf>,
    #[serde(default = "default_pool")]
    pool_max_size: u32,
}

fn default_pool() -> u32 {
    4
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MacSection {
    key_id: String,
    key_file: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LedgerSection {
    #[serde(default)]
    generated_accounts: u32,
}

/// `[faults]`; also the body of the control endpoint's `PUT /faults` (as JSON).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FaultsSection {
    latency: Option<String>,
    #[serde(default)]
    drop_every: u64,
    #[serde(default)]
    duplicate_every: u64,
    #[serde(default)]
    reorder_every: u64,
    hold_back: Option<String>,
    #[serde(default)]
    reject_every: u64,
    /// insufficient_funds, unknown_account, frozen or name_mismatch.
    reject_reason: Option<String>,
    #[serde(default)]
    crash_at: u64,
    /// Postings wait this long before they are applied, e.g. "2s".
    post_delay: Option<String>,
    /// false: a query for an unknown id does not fence it (a core breaking the contract;
    /// kunpay's reversals then undo the late posting).
    /// Fixed at start: the control endpoint refuses to change it.
    pub query_fence: Option<bool>,
}

/// A secret file: must not be readable by group or others.
fn read_secret(path: &Path, what: &str) -> anyhow::Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{what} {} is readable by group or others; chmod 600 it",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))?;
    Ok(Zeroizing::new(text.trim().to_string()))
}

fn duration(text: Option<&str>, key: &str, default: Duration) -> anyhow::Result<Duration> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t).with_context(|| {
            format!("[faults] {key} = \"{t}\" is not a duration such as \"20ms\"")
        }),
    }
}

/// kunpay-coresim's configuration, read and checked.
pub struct CoresimConfig {
    pub amqp: AmqpSettings,
    pub keys: MacKeys,
    pub accounts: u32,
    pub faults: ServiceFaults,
    /// See `sim::Faults::queries_do_not_fence`.
    pub query_fence: bool,
    pub database: Option<crate::db::ConnectSettings>,
    /// The control endpoint's address (loopback only), if any.
    pub control: Option<std::net::SocketAddr>,
}

/// Reads and checks the configuration file at `path` (secrets included).
pub fn load(path: &Path) -> anyhow::Result<CoresimConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: FileConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut uri = file.amqp.url.clone();
    if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
        bail!("[amqp] url must start with amqp:// or amqps://");
    }
    if let Some(path) = &file.amqp.password_file {
        let password = read_secret(path, "[amqp] password_file")?;
        uri = crate::core::amqp::uri_with_password(&uri, &password)
            .map_err(|e| anyhow::anyhow!("[amqp] url: {e}"))?;
    }
    let key_hex = read_secret(&file.mac.key_file, "[mac] key_file")?;
    let key = Zeroizing::new(hex::decode(key_hex.as_bytes()).map_err(|_| {
        anyhow::anyhow!("[mac] key_file must hold the shared key as hex (openssl rand -hex 32)")
    })?);
    let keys = MacKeys::single(&file.mac.key_id, key).map_err(|e| anyhow::anyhow!("[mac] {e}"))?;
    if file.amqp.prefetch == 0 {
        bail!("[amqp] prefetch must be at least 1");
    }
    if file.amqp.concurrency == 0 || file.amqp.concurrency > usize::from(file.amqp.prefetch) {
        bail!(
            "[amqp] concurrency must be 1 to prefetch ({})",
            file.amqp.prefetch
        );
    }
    let faults = faults_from(&file.faults)?;
    if let Some(control) = &file.control
        && !control.listen.ip().is_loopback()
    {
        bail!(
            "[control] listen = \"{}\": the control endpoint has no authentication and listens on loopback only",
            control.listen
        );
    }
    let settings = AmqpSettings {
        uri,
        queues: vec![file.amqp.request_queue.clone()],
        dead_letter_queue: file.amqp.dead_letter_queue,
        consume_queue: file.amqp.request_queue,
        prefetch: file.amqp.prefetch,
        concurrency: file.amqp.concurrency,
        confirm_timeout: Duration::from_secs(5),
        connection_name: "kunpay-coresim".into(),
        app_id: "kunpay-coresim".into(),
    };
    let database = match &file.database {
        None => None,
        Some(db) => {
            if !(db.url.starts_with("postgres://") || db.url.starts_with("postgresql://")) {
                bail!("[database] url must start with postgres:// or postgresql://");
            }
            Some(crate::db::ConnectSettings {
                url: crate::config::Secret::new(db.url.clone()),
                password: match &db.password_file {
                    None => None,
                    Some(path) => Some(crate::config::Secret::new(
                        read_secret(path, "[database] password_file")?.to_string(),
                    )),
                },
                pool_max_size: db.pool_max_size.clamp(1, 64),
                pool_min_idle: 1,
                connect_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(30),
                application_name: "kunpay-coresim".into(),
            })
        }
    };
    Ok(CoresimConfig {
        amqp: settings,
        keys,
        accounts: file.ledger.generated_accounts,
        query_fence: file.faults.query_fence.unwrap_or(true),
        control: file.control.map(|c| c.listen),
        faults,
        database,
    })
}

/// The faults a `[faults]` section (or the control endpoint's JSON body) describes.
pub fn faults_from(f: &FaultsSection) -> anyhow::Result<ServiceFaults> {
    Ok(ServiceFaults {
        latency: duration(f.latency.as_deref(), "latency", Duration::ZERO)?,
        drop_every: f.drop_every,
        duplicate_every: f.duplicate_every,
        reorder_every: f.reorder_every,
        hold_back: duration(f.hold_back.as_deref(), "hold_back", Duration::from_secs(1))?,
        reject_every: f.reject_every,
        reject_reason: match f.reject_reason.as_deref() {
            None => None,
            Some("insufficient_funds") => Some(Rejection::InsufficientFunds),
            Some("unknown_account") => Some(Rejection::UnknownAccount),
            Some("frozen") => Some(Rejection::Frozen),
            Some("name_mismatch") => Some(Rejection::NameMismatch),
            Some(other) => bail!(
                "[faults] reject_reason = \"{other}\"; use insufficient_funds, unknown_account, frozen or name_mismatch"
            ),
        },
        crash_at: f.crash_at,
        post_delay: duration(f.post_delay.as_deref(), "post_delay", Duration::ZERO)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../packaging/coresim.toml");

    /// The packaged sample with its secret files pointed at `dir` (which holds them, 0600).
    fn sample_in(dir: &Path, extra: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        for (name, text) in [
            ("amqp-password", "secret"),
            ("core-mac.key", &"ab".repeat(32)),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let text = SAMPLE.replace("/etc/kunpay-coresim", &dir.display().to_string()) + extra;
        let path = dir.join("coresim.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_packaged_sample_loads_with_every_fault_off() {
        let dir = tempfile::tempdir().unwrap();
        let config = load(&sample_in(dir.path(), "")).unwrap();
        assert_eq!(
            config.faults,
            ServiceFaults {
                hold_back: Duration::from_secs(1),
                ..ServiceFaults::default()
            }
        );
        assert!(config.query_fence);
        assert!(config.database.is_none());
        assert!(config.control.is_none());
        assert_eq!(config.amqp.consume_queue, "kunpay.core.request");
        assert_eq!(config.amqp.concurrency, 32);
        // The password went into the URI (never printed: AmqpSettings' Debug hides it).
        assert!(config.amqp.uri.contains("kunpay-coresim:secret@"));
    }

    #[test]
    fn mistakes_are_refused_with_the_key_that_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        for (extra, says) in [
            ("\n[control]\nlisten = \"0.0.0.0:9190\"\n", "loopback only"),
            (
                "\n[control]\nlisten = \"127.0.0.1:9190\"\nopen = true\n",
                "unknown field `open`",
            ),
            ("\n[extra]\n", "unknown field `extra`"),
        ] {
            let error = load(&sample_in(dir.path(), extra)).err().unwrap();
            assert!(format!("{error:#}").contains(says), "{extra}: {error:#}");
        }
        let text = SAMPLE.replace("# latency = \"20ms\"", "latency = \"fast\"");
        let path = sample_in(dir.path(), "");
        std::fs::write(
            &path,
            text.replace("/etc/kunpay-coresim", &dir.path().display().to_string()),
        )
        .unwrap();
        let error = load(&path).err().unwrap();
        assert!(
            format!("{error:#}").contains("[faults] latency = \"fast\""),
            "{error:#}"
        );
    }
}
