//! kunpay-coresim: the core-banking simulator as a service on the message queue, for test, demo
//! and benchmark environments (never production). Exit codes: 0 stopped by SIGTERM/SIGINT,
//! 2 configuration error, 101 crashed on purpose (fault injection).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use serde::Deserialize;
use zeroize::Zeroizing;

use kunpay::core::Rejection;
use kunpay::core::amqp::AmqpSettings;
use kunpay::core::coresim::{CoreSimService, ServiceFaults};
use kunpay::core::sim::CoreSimulator;
use kunpay::core::wire::MacKeys;

#[derive(Parser)]
#[command(
    name = "kunpay-coresim",
    version,
    about = "Core-banking simulator answering kunpay over AMQP (test environments only)"
)]
struct Cli {
    /// Configuration file (TOML; see packaging/coresim.toml).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/kunpay-coresim/coresim.toml"
    )]
    config: PathBuf,
    /// Override [faults] latency, e.g. 20ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    latency: Option<Duration>,
    /// Override [faults] drop_every: every Nth reply is never sent.
    #[arg(long, value_name = "N")]
    drop_every: Option<u64>,
    /// Override [faults] duplicate_every: every Nth reply is sent twice.
    #[arg(long, value_name = "N")]
    duplicate_every: Option<u64>,
    /// Override [faults] reorder_every: every Nth reply is held back.
    #[arg(long, value_name = "N")]
    reorder_every: Option<u64>,
    /// Override [faults] reject_every: every Nth posting is rejected.
    #[arg(long, value_name = "N")]
    reject_every: Option<u64>,
    /// Override [faults] crash_at: exit abruptly on the Nth request.
    #[arg(long, value_name = "N")]
    crash_at: Option<u64>,
}

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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FaultsSection {
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
    #[serde(default = "yes")]
    query_fence: bool,
}

fn yes() -> bool {
    true
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

struct Loaded {
    amqp: AmqpSettings,
    keys: MacKeys,
    accounts: u32,
    faults: ServiceFaults,
    query_fence: bool,
    database: Option<kunpay::db::ConnectSettings>,
}

fn load(cli: &Cli) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(&cli.config)
        .with_context(|| format!("reading {}", cli.config.display()))?;
    let file: FileConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", cli.config.display()))?;
    let mut uri = file.amqp.url.clone();
    if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
        bail!("[amqp] url must start with amqp:// or amqps://");
    }
    if let Some(path) = &file.amqp.password_file {
        let password = read_secret(path, "[amqp] password_file")?;
        uri = kunpay::core::amqp::uri_with_password(&uri, &password)
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
    let f = &file.faults;
    let mut faults = ServiceFaults {
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
    };
    if let Some(v) = cli.latency {
        faults.latency = v;
    }
    for (value, slot) in [
        (cli.drop_every, &mut faults.drop_every),
        (cli.duplicate_every, &mut faults.duplicate_every),
        (cli.reorder_every, &mut faults.reorder_every),
        (cli.reject_every, &mut faults.reject_every),
        (cli.crash_at, &mut faults.crash_at),
    ] {
        if let Some(v) = value {
            *slot = v;
        }
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
            Some(kunpay::db::ConnectSettings {
                url: kunpay::config::Secret::new(db.url.clone()),
                password: match &db.password_file {
                    None => None,
                    Some(path) => Some(kunpay::config::Secret::new(
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
    Ok(Loaded {
        amqp: settings,
        keys,
        accounts: file.ledger.generated_accounts,
        query_fence: file.faults.query_fence,
        faults,
        database,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let loaded = match load(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("kunpay-coresim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ledger: kunpay::core::coresim::Ledger = match &loaded.database {
        None => {
            tracing::warn!("no [database]: the ledger is in memory and a crash loses it");
            let sim = CoreSimulator::with_demo_accounts().with_generated_accounts(loaded.accounts);
            sim.set_faults(kunpay::core::sim::Faults {
                queries_do_not_fence: !loaded.query_fence,
                ..Default::default()
            });
            Arc::new(sim)
        }
        Some(settings) => {
            let opened = kunpay::db::connect(settings)
                .map_err(anyhow::Error::from)
                .and_then(|pool| {
                    let mut accounts = kunpay::core::sim::demo_accounts();
                    accounts.extend((0..loaded.accounts).map(kunpay::core::sim::generated_account));
                    kunpay::core::sim_store::PgLedger::open(pool, &accounts)
                        .map_err(anyhow::Error::from)
                });
            match opened {
                Ok(ledger) if loaded.query_fence => Arc::new(ledger),
                Ok(ledger) => Arc::new(ledger.without_query_fence()),
                Err(e) => {
                    eprintln!("kunpay-coresim: {}: {e:#}", settings.display_target());
                    return ExitCode::from(1);
                }
            }
        }
    };
    let service = CoreSimService::start(
        runtime.handle().clone(),
        loaded.amqp,
        Arc::new(loaded.keys),
        ledger,
        loaded.faults,
    );
    tracing::info!("kunpay-coresim: started");
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    tracing::info!(handled = service.handled(), "kunpay-coresim: stopping");
    service.stop();
    runtime.shutdown_timeout(Duration::from_secs(2));
    ExitCode::SUCCESS
}
