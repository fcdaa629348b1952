//! kunpayctl: the operators' command line. Exit codes: 0 success, 1 failure (for `verify`: the
//! signature is invalid), 2 usage, configuration or I/O error, 3 the daemon cannot be reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use diesel::Connection as _;
use kunpay::config::{Config, Mode};
use kunpay::crypto::keyfile::{self, PassphraseSource};
use kunpay::crypto::sm2::{DEFAULT_DISTID, PrivateKey, SignatureFormat, Signer, Verifier};

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
/// `kunpayctl cutover` / `rollback` refused: nothing changed, or what changed was put back.
const EXIT_REFUSED: u8 = 4;

#[derive(Parser)]
#[command(name = "kunpayctl", version, about = "Operate a kunpay node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an SM2 key pair as standard PEM (PKCS#8 private key, mode 0600; SPKI public key).
    Keygen {
        #[arg(long, value_name = "SK.pem")]
        private: PathBuf,
        #[arg(long, value_name = "PUB.pem")]
        public: PathBuf,
        /// Encrypt the private key (PBES2, AES-256-CBC) with the passphrase in this file.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Sign a file with SM2/SM3; writes a DER signature (or raw r||s with --format raw).
    Sign {
        #[arg(long, value_name = "SK.pem")]
        key: PathBuf,
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[arg(long, value_name = "SIG.der")]
        out: PathBuf,
        /// Distinguishing id (the signer's user id in GB/T 32918).
        #[arg(long, default_value = DEFAULT_DISTID)]
        id: String,
        #[arg(long, default_value = "der")]
        format: SignatureFormat,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Verify an SM2/SM3 signature: exit 0 valid, 1 invalid, 2 usage or I/O error.
    Verify {
        #[arg(long, value_name = "PUB.pem")]
        pubkey: PathBuf,
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[arg(long, value_name = "SIG.der")]
        sig: PathBuf,
        #[arg(long, default_value = DEFAULT_DISTID)]
        id: String,
        #[arg(long, default_value = "der")]
        format: SignatureFormat,
    },
    /// Validate a configuration file and what it points at; print every problem.
    CheckConfig {
        #[arg(long, value_name = "PATH", default_value = kunpay::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Database administration.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Result notifications to institutions: list, show, replay.
    Notify {
        #[command(subcommand)]
        command: NotifyCommand,
    },
    /// Reversals of postings the core applied after their transaction failed.
    Reversal {
        #[command(subcommand)]
        command: ReversalCommand,
    },
    /// Risk control: the active rule set, review cases, per-rule statistics.
    Risk {
        #[command(subcommand)]
        command: RiskCommand,
    },
    /// Active/standby: this node's role and fencing epoch, CDC position and lag.
    Ha {
        #[command(subcommand)]
        command: HaCommand,
    },
    /// Planned cutover: run on the standby node; it becomes the active, the active its standby
    /// (exit 0 done, 4 refused with nothing changed or everything put back, 1 failed: a person
    /// must decide, 2 usage).
    Cutover {
        #[command(flatten)]
        handover: HandoverArgs,
    },
    /// Undo the last cutover: run on the old active (now the standby); the same steps back.
    Rollback {
        #[command(flatten)]
        handover: HandoverArgs,
    },
    /// Ask the running daemon how it is (through its ops listener).
    Status {
        #[arg(long, value_name = "PATH", default_value = kunpay::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Ops listener base URL, instead of reading ops.listen from the configuration.
        #[arg(long, value_name = "URL")]
        ops: Option<String>,
    },
}

#[derive(clap::Args)]
struct HandoverArgs {
    /// This (standby) node's configuration: its database becomes the active one, ha.source_url
    /// names the active node's database.
    #[command(flatten)]
    database: DatabaseArgs,
    /// The active node's database instead of ha.source_url (ha.source_password_* still applies).
    #[arg(long, value_name = "URL")]
    source_url: Option<String>,
    /// Check everything and say what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long the active node may take to finish its business requests in flight, and how long
    /// transactions still open when it is fenced may take to end.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// How long this node may take to apply everything up to the fence.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    catch_up_timeout: Duration,
    /// This node's ops listener, to wait until it answers 200 on /primary after the promotion
    /// (default: ops.listen from the configuration).
    #[arg(long, value_name = "URL")]
    ops: Option<String>,
    /// Who runs it, for the audit log's operator action (default: the OS user).
    #[arg(long, value_name = "NAME")]
    by: Option<String>,
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the schema migrations this binary carries (idempotent; safe to run twice).
    Migrate {
        #[arg(long, value_name = "PATH", default_value = kunpay::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Database URL instead of database.url (password from database.password_* still applies).
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// Who runs it, for the audit log's operator action when migrations are applied (default: the OS user)
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
    },
}

#[derive(clap::Args)]
struct DatabaseArgs {
    #[arg(long, value_name = "PATH", default_value = kunpay::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Database URL instead of database.url (password from database.password_* still applies).
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum RiskCommand {
    /// The rule set the running daemon decides with, its reloads, and the velocity store.
    Status {
        #[arg(long, value_name = "PATH", default_value = kunpay::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Ops listener base URL, instead of reading ops.listen from the configuration.
        #[arg(long, value_name = "URL")]
        ops: Option<String>,
    },
    /// The black and white lists kept in the database (beside the risk directory's files).
    List {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Review cases: list, show, approve, decline.
    Case {
        #[command(subcommand)]
        command: CaseCommand,
    },
    /// Per-rule statistics for one day (China time): hits, declines, reviews, verdicts.
    Stats {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The day, YYYY-MM-DD (default: today).
        #[arg(long, value_name = "DAY")]
        day: Option<chrono::NaiveDate>,
    },
}

#[derive(Subcommand)]
enum ListCommand {
    /// Put a value on a list; the running daemon uses it within seconds.
    Add {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(value_parser = ["black", "white"])]
        list: String,
        #[arg(value_parser = ["card", "id", "phone", "device", "ip", "merchant"])]
        kind: String,
        /// The card, id or phone number, device id, IP address or CIDR range, or merchant.
        value: String,
        /// Why (kept with the entry and in the change log).
        #[arg(long)]
        reason: String,
        /// Who (default: the operating-system user running kunpayctl).
        #[arg(long)]
        by: Option<String>,
    },
    /// Take a value off a list.
    Remove {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(value_parser = ["black", "white"])]
        list: String,
        #[arg(value_parser = ["card", "id", "phone", "device", "ip", "merchant"])]
        kind: String,
        value: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        by: Option<String>,
    },
    /// The entries (card, id and phone numbers masked), with who added them and why.
    Show {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Every change to the lists, newest first: who, when, what and why.
    Log {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum CaseCommand {
    /// Cases, oldest first (`--state open` is the reviewers' queue).
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long, value_parser = ["open", "approved", "declined"])]
        state: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// One case: the transaction, the rules that fired, every value the decision saw.
    Show {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The transaction id (32 hex digits, as listed).
        txn: String,
    },
    /// Approve: the daemon sends the transaction to the core within seconds.
    Approve {
        #[command(flatten)]
        database: DatabaseArgs,
        txn: String,
        /// Why (kept with the case and in the transaction's history).
        #[arg(long)]
        note: String,
        /// Who decides (default: the operating-system user running kunpayctl).
        #[arg(long)]
        by: Option<String>,
    },
    /// Decline: the transaction fails with 3015 and the institution is notified.
    Decline {
        #[command(flatten)]
        database: DatabaseArgs,
        txn: String,
        #[arg(long)]
        note: String,
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Subcommand)]
enum HaCommand {
    /// Role, epoch, CDC slot, positions and lag (reads both databases; exit 1 when the lag is
    /// over ha.max_lag / ha.max_lag_time or the source cannot be read).
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The active node's database instead of ha.source_url (password from
        /// ha.source_password_* still applies).
        #[arg(long, value_name = "URL")]
        source_url: Option<String>,
    },
    /// Set this node's database role at a fencing epoch (promotion needs a higher epoch;
    /// epochs never go back). A planned cutover does this for you.
    SetRole {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(value_parser = ["active", "standby", "fenced"])]
        role: String,
        #[arg(long)]
        epoch: i64,
        /// Why, recorded with the role.
        #[arg(long)]
        reason: String,
        /// Promote although the other node's database (ha.source_url) cannot be read: a failover
        /// by hand after the old active is gone for good. Without it, a promotion is refused
        /// unless the other database is readable and not ACTIVE.
        #[arg(long)]
        force: bool,
        /// Who sets it, for the audit log's operator action (default: the OS user).
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
    },
}

#[derive(Subcommand)]
enum ReversalCommand {
    /// Reversals, newest first (`--state refused` lists the ones a person must settle).
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long, value_parser = ["pending", "reversed", "nothing_posted", "refused"])]
        state: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum NotifyCommand {
    /// Notifications, newest first (`--status dead` lists the ones that gave up).
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        /// pending, delivered, dead or skipped.
        #[arg(long, value_parser = ["pending", "delivered", "dead", "skipped"])]
        status: Option<String>,
        /// One institution only.
        #[arg(long, value_name = "ID")]
        inst: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// One notification with every delivery attempt.
    Show {
        #[command(flatten)]
        database: DatabaseArgs,
        event_id: String,
    },
    /// Send a notification once more, now (a dead one, or one an institution asks for again).
    Replay {
        #[command(flatten)]
        database: DatabaseArgs,
        event_id: String,
        /// Who (default: the operating-system user running kunpayctl); recorded with the
        /// action for the audit log.
        #[arg(long)]
        by: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen {
            private,
            public,
            passphrase_file,
        } => keygen(&private, &public, passphrase_file),
        Command::Sign {
            key,
            input,
            out,
            id,
            format,
            passphrase_file,
        } => sign(&key, &input, &out, &id, format, passphrase_file),
        Command::Verify {
            pubkey,
            input,
            sig,
            id,
            format,
        } => verify(&pubkey, &input, &sig, &id, format),
        Command::CheckConfig { config } => match kunpay::daemon::check_config(&config) {
            Ok(_) => {
                println!("{}: configuration is valid", config.display());
                Ok(0)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(EXIT_USAGE)
            }
        },
        Command::Db {
            command:
                DbCommand::Migrate {
                    config,
                    database_url,
                    by,
                },
        } => migrate(&config, database_url, by),
        Command::Status { config, ops } => status(&config, ops),
        Command::Notify { command } => notify(command),
        Command::Reversal { command } => reversal(command),
        Command::Risk { command } => risk(command),
        Command::Ha { command } => ha(command),
        Command::Cutover { handover } => {
            handover_command(kunpay::ha::cutover::Kind::Cutover, handover)
        }
        Command::Rollback { handover } => {
            handover_command(kunpay::ha::cutover::Kind::Rollback, handover)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!(
                "kunpayctl: {}",
                kunpay::logging::mask::mask_line(&format!("{e:#}"))
            );
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn read_passphrase(path: Option<PathBuf>) -> anyhow::Result<Option<zeroize::Zeroizing<Vec<u8>>>> {
    path.map(|p| {
        PassphraseSource::File(p)
            .read()
            .context("reading --passphrase-file")
    })
    .transpose()
}

fn keygen(private: &Path, public: &Path, passphrase_file: Option<PathBuf>) -> anyhow::Result<u8> {
    let passphrase = read_passphrase(passphrase_file)?;
    let key = PrivateKey::generate()?;
    keyfile::write_private_key(private, &key, passphrase.as_deref().map(|p| p.as_slice()))?;
    keyfile::write_public_key(public, &key.public_key())?;
    println!(
        "wrote private key {} (mode 0600) and public key {}",
        private.display(),
        public.display()
    );
    Ok(0)
}

fn sign(
    key: &Path,
    input: &Path,
    out: &Path,
    id: &str,
    format: SignatureFormat,
    passphrase_file: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let source = passphrase_file.map(PassphraseSource::File);
    let key = keyfile::load_private_key(key, source.as_ref(), "--passphrase-file")?;
    let message = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let signature = Signer::new(&key, id)?.sign(&message, format)?;
    std::fs::write(out, signature).with_context(|| format!("writing {}", out.display()))?;
    Ok(0)
}

fn verify(
    pubkey: &Path,
    input: &Path,
    sig: &Path,
    id: &str,
    format: SignatureFormat,
) -> anyhow::Result<u8> {
    let public = keyfile::load_public_key(pubkey)?;
    let message = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let signature = std::fs::read(sig).with_context(|| format!("reading {}", sig.display()))?;
    match Verifier::new(&public, id)?.verify(&message, &signature, format) {
        Ok(()) => {
            println!("signature valid");
            Ok(0)
        }
        Err(e) => {
            println!("signature INVALID: {e}");
            Ok(EXIT_FAILURE)
        }
    }
}

/// One connection to the node's database, from its configuration (`--database-url`
/// overrides the URL). `Err(Some(code))`-style usage errors are printed and exited with 2.
fn connect_database(
    config_path: &Path,
    database_url: Option<String>,
    purpose: &str,
) -> anyhow::Result<Result<(diesel::PgConnection, String), u8>> {
    let settings = match database_settings(config_path, database_url, purpose)? {
        Ok(settings) => settings,
        Err(code) => return Ok(Err(code)),
    };
    let conn = kunpay::db::connect_one(&settings)?;
    Ok(Ok((conn, settings.display_target())))
}

/// This node's database as the configuration (or `--database-url`) names it, with its password.
fn database_settings(
    config_path: &Path,
    database_url: Option<String>,
    purpose: &str,
) -> anyhow::Result<Result<kunpay::db::ConnectSettings, u8>> {
    let (url, password) = match (database_url, Config::load(config_path, Mode::Development)) {
        (Some(url), Ok(config)) => (url, config.database.password),
        (Some(url), Err(_)) => (url, None),
        (None, Ok(config)) => (
            config
                .database
                .url
                .as_ref()
                .map(|u| u.expose().to_string())
                .with_context(|| {
                    format!(
                        "{}: database.url is not set; pass --database-url",
                        config_path.display()
                    )
                })?,
            config.database.password,
        ),
        (None, Err(errors)) => {
            eprintln!("{errors}");
            return Ok(Err(EXIT_USAGE));
        }
    };
    let password = password
        .map(|source| -> anyhow::Result<_> {
            let bytes = source.read()?;
            Ok(kunpay::config::Secret::new(
                String::from_utf8(bytes.to_vec()).context("password is not UTF-8")?,
            ))
        })
        .transpose()?;
    let settings = kunpay::db::ConnectSettings {
        url: kunpay::config::Secret::new(url),
        password,
        pool_max_size: 1,
        pool_min_idle: 0,
        connect_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(600),
        application_name: format!("kunpayctl {purpose}"),
    };
    Ok(Ok(settings))
}

/// The active node's database as this (standby) node copies it: `--source-url` or
/// ha.source_url, with ha.source_password_*; `None` when neither names one.
fn source_settings(
    ha_config: Option<&kunpay::config::HaConfig>,
    source_url: Option<String>,
    purpose: &str,
) -> anyhow::Result<Option<kunpay::db::ConnectSettings>> {
    let Some(url) = source_url
        .or_else(|| ha_config.and_then(|h| h.source_url.as_ref().map(|u| u.expose().to_string())))
    else {
        return Ok(None);
    };
    let password = ha_config
        .and_then(|h| h.source_password.clone())
        .map(|source| -> anyhow::Result<_> {
            let bytes = source.read()?;
            Ok(kunpay::config::Secret::new(
                String::from_utf8(bytes.to_vec()).context("password is not UTF-8")?,
            ))
        })
        .transpose()?;
    Ok(Some(kunpay::db::ConnectSettings {
        url: kunpay::config::Secret::new(url),
        password,
        pool_max_size: 1,
        pool_min_idle: 0,
        connect_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(60),
        application_name: format!("kunpayctl {purpose}"),
    }))
}

/// Why a promotion by hand must not happen now, if it must not: the other node's database
/// (ha.source_url) is ACTIVE (two ACTIVE databases would both take writes), or it cannot be
/// read and `--force` does not say the operator knows it is gone.
fn peer_refuses_promotion(
    ha_config: Option<&kunpay::config::HaConfig>,
    force: bool,
) -> anyhow::Result<Option<String>> {
    let Some(peer) = source_settings(ha_config, None, "ha set-role")? else {
        return Ok(None);
    };
    let read = kunpay::db::connect_one(&peer)
        .map_err(anyhow::Error::from)
        .and_then(|mut conn| kunpay::ha::read_role(&mut conn));
    Ok(match read {
        Ok(record) if record.role == kunpay::ha::NodeRole::Active => Some(format!(
            "the other node's database {} is ACTIVE at fencing epoch {}: two ACTIVE databases would both take \
             writes (split brain); move the role with `kunpayctl cutover`, or fence that one first",
            peer.display_target(),
            record.epoch
        )),
        Ok(_) => None,
        Err(_) if force => None,
        Err(e) => Some(format!(
            "the other node's database {} cannot be read ({e:#}), so it may still be ACTIVE; if that node is gone \
             for good, fence it when it returns and promote with --force",
            peer.display_target()
        )),
    })
}

/// How a cutover step ended and how long it took, as printed and as recorded.
fn step_verdict(step: &kunpay::ha::cutover::Step) -> (&'static str, f64) {
    (
        if step.ok { "ok" } else { "FAIL" },
        step.took.as_secs_f64() * 1000.0,
    )
}

/// `kunpayctl cutover` and `kunpayctl rollback`.
fn handover_command(kind: kunpay::ha::cutover::Kind, args: HandoverArgs) -> anyhow::Result<u8> {
    use kunpay::ha::cutover::{self, CutoverSettings, Kind, Outcome};
    let name = match kind {
        Kind::Cutover => "cutover",
        Kind::Rollback => "rollback",
    };
    let config = Config::load(&args.database.config, Mode::Development).ok();
    let ha_config = config.as_ref().and_then(|c| c.ha.clone());
    let standby = match database_settings(
        &args.database.config,
        args.database.database_url.clone(),
        name,
    )? {
        Ok(settings) => settings,
        Err(code) => return Ok(code),
    };
    let Some(active) = source_settings(ha_config.as_ref(), args.source_url.clone(), name)? else {
        eprintln!(
            "kunpayctl: {name}: no active database to take over from: set ha.source_url in {} or pass --source-url",
            args.database.config.display()
        );
        return Ok(EXIT_USAGE);
    };
    let settings = CutoverSettings {
        slot: ha_config
            .as_ref()
            .map_or_else(|| "kunpay_cdc".into(), |h| h.slot.clone()),
        max_lag_bytes: ha_config.as_ref().map_or(1024 * 1024, |h| h.max_lag_bytes),
        max_lag_seconds: ha_config
            .as_ref()
            .map_or(10.0, |h| h.max_lag_time.as_secs_f64()),
        drain_timeout: args.drain_timeout,
        catch_up_timeout: args.catch_up_timeout,
        statement_timeout: Duration::from_secs(600),
    };
    println!(
        "{name}: from {} (active) to {} (this node)",
        active.display_target(),
        standby.display_target()
    );
    let print_step = |step: &cutover::Step| {
        let (verdict, ms) = step_verdict(step);
        println!(
            "  {verdict:<4} {:<22} {ms:>8.1} ms  {}",
            step.name, step.detail
        );
    };
    if args.dry_run {
        let mut a = kunpay::db::connect_one(&active)?;
        let mut s = kunpay::db::connect_one(&standby)?;
        let plan = cutover::dry_run(&mut a, &mut s, &settings);
        plan.checks.iter().for_each(print_step);
        if let Some(refusal) = plan.refusal() {
            println!("{name} would be REFUSED: {}", refusal.detail);
            return Ok(EXIT_REFUSED);
        }
        println!("{name} would do, at fencing epoch {}:", plan.new_epoch);
        for (i, step) in plan.steps.iter().enumerate() {
            println!("  {}. {step}", i + 1);
        }
        return Ok(0);
    }
    let started = std::time::Instant::now();
    let execution = cutover::execute(
        kind,
        active.full_url().expose(),
        standby.full_url().expose(),
        &settings,
        &mut |step| print_step(step),
    );
    // The whole execution as one operator action, in the database that is ACTIVE now (after a
    // cutover this node's, after a refusal the old active's): it spans two databases, so it
    // cannot share a transaction with its changes.
    let mut detail = vec![
        (
            "outcome",
            match &execution.outcome {
                Outcome::Done { epoch } => format!("DONE at fencing epoch {epoch}"),
                Outcome::Refused { reason } => format!("REFUSED: {reason}"),
                Outcome::Failed { reason } => format!("FAILED: {reason}"),
            },
        ),
        ("from", active.display_target()),
        ("to", standby.display_target()),
        (
            "pause_ms",
            execution
                .write_pause
                .map_or_else(|| "none".into(), |p| p.as_millis().to_string()),
        ),
    ];
    for step in &execution.steps {
        let (verdict, ms) = step_verdict(step);
        detail.push((
            "step",
            format!("{verdict} {} {ms:.1} ms: {}", step.name, step.detail),
        ));
    }
    record_on_active(
        vec![standby.clone(), active.clone()],
        &operator_name(args.by.clone()),
        match kind {
            Kind::Cutover => "HA_CUTOVER",
            Kind::Rollback => "HA_ROLLBACK",
        },
        &detail,
        ROLE_ROW_KEEPS_IT,
    );
    match execution.outcome {
        Outcome::Done { epoch } => {
            let ops = args
                .ops
                .clone()
                .or_else(|| config.as_ref().map(|c| format!("http://{}", c.ops.listen)));
            if let Some(base) = ops {
                let url = format!("{base}/primary");
                let waited = std::time::Instant::now();
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(2)))
                    .build()
                    .into();
                let serving = loop {
                    if agent.get(&url).call().is_ok_and(|r| r.status() == 200) {
                        break true;
                    }
                    if waited.elapsed() > Duration::from_secs(30) {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                print_step(&cutover::Step {
                    name: "new active serving",
                    ok: serving,
                    detail: if serving {
                        format!("{url} answers 200: F5 sends business here")
                    } else {
                        format!(
                            "{url} did not answer 200 within 30 s: look at this node's kunpayd (journalctl -u kunpayd)"
                        )
                    },
                    took: waited.elapsed(),
                });
            }
            println!(
                "{name} DONE in {:.1} s: this node is ACTIVE at fencing epoch {epoch}; business paused for {:.0} ms (drain request to promotion); the old active copies from here (rollback: `kunpayctl rollback` on it)",
                started.elapsed().as_secs_f64(),
                execution.write_pause.unwrap_or_default().as_secs_f64() * 1000.0
            );
            Ok(0)
        }
        Outcome::Refused { reason } => {
            println!("{name} REFUSED: {reason}");
            Ok(EXIT_REFUSED)
        }
        Outcome::Failed { reason } => {
            println!("{name} FAILED: {reason}");
            Ok(EXIT_FAILURE)
        }
    }
}

/// Applies the pending migrations. Applying any is an operator action (`DB_MIGRATE`), recorded
/// after the fact like the HA commands: each migration runs in its own transaction, and a
/// standby's database takes no such row, so it goes to the first ACTIVE of this database and the
/// configured `ha.source_url`.
fn migrate(
    config_path: &Path,
    database_url: Option<String>,
    by: Option<String>,
) -> anyhow::Result<u8> {
    let this = match database_settings(config_path, database_url, "db migrate")? {
        Ok(settings) => settings,
        Err(code) => return Ok(code),
    };
    let target = this.display_target();
    let mut conn = kunpay::db::connect_one(&this)?;
    let applied = kunpay::db::migrate(&mut conn)?;
    drop(conn);
    if applied.is_empty() {
        println!("{target}: schema is current; nothing to apply");
        return Ok(0);
    }
    for version in &applied {
        println!("applied migration {version}");
    }
    println!("{target}: {} migration(s) applied", applied.len());
    let ha_config = Config::load(config_path, Mode::Development)
        .ok()
        .and_then(|c| c.ha);
    let peer = source_settings(ha_config.as_ref(), None, "db migrate")
        .ok()
        .flatten();
    let mut detail = vec![("database", target), ("applied", applied.len().to_string())];
    detail.extend(applied.into_iter().map(|name| ("migration", name)));
    record_on_active(
        [Some(this), peer].into_iter().flatten().collect(),
        &operator_name(by),
        "DB_MIGRATE",
        &detail,
        "__diesel_schema_migrations keeps each migration with its time",
    );
    Ok(0)
}

/// The ops listener's base URL: `--ops`, or `ops.listen` from the configuration.
fn ops_base(config_path: &Path, ops: Option<String>) -> Result<String, u8> {
    match ops {
        Some(url) => Ok(url.trim_end_matches('/').to_string()),
        None => {
            let config = match Config::load(config_path, Mode::Development) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Err(EXIT_USAGE);
                }
            };
            let mut addr = config.ops.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            Ok(format!("http://{addr}"))
        }
    }
}

/// GET `url` from the ops listener: the body, or the exit code after saying why not.
fn ops_get(url: &str) -> anyhow::Result<Result<String, u8>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = match agent.get(url).call() {
        Ok(response) => response,
        Err(e) => {
            eprintln!(
                "kunpayctl: cannot reach the ops listener at {url}: {e}; is kunpayd running?"
            );
            return Ok(Err(EXIT_UNREACHABLE));
        }
    };
    Ok(Ok(response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?))
}

fn status(config_path: &Path, ops: Option<String>) -> anyhow::Result<u8> {
    let base = match ops_base(config_path, ops) {
        Ok(base) => base,
        Err(code) => return Ok(code),
    };
    let url = format!("{base}/status");
    let body = match ops_get(&url)? {
        Ok(body) => body,
        Err(code) => return Ok(code),
    };
    let report: kunpay::ops::NodeReport = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not answer with a kunpay status"))?;
    println!("node       {}", report.node);
    println!("role       {}", report.role);
    println!("state      {}", report.state);
    println!("database   {}", report.database);
    println!("version    {}", report.version);
    println!("pid        {}", report.pid);
    println!("run        {}", report.run_id);
    println!(
        "uptime     {}",
        humantime::format_duration(Duration::from_secs(report.uptime_seconds))
    );
    let healthy = report.state == "running" && report.database == "up";
    Ok(if healthy { 0 } else { EXIT_FAILURE })
}

fn lsn(value: i64) -> String {
    kunpay::ha::decode::Lsn(value.max(0) as u64).to_string()
}

fn ha(command: HaCommand) -> anyhow::Result<u8> {
    use kunpay::ha::{self, cdc};
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string();
    match command {
        HaCommand::SetRole {
            database,
            role,
            epoch,
            reason,
            force,
            by,
        } => {
            let this = match database_settings(
                &database.config,
                database.database_url.clone(),
                "ha set-role",
            )? {
                Ok(settings) => settings,
                Err(code) => return Ok(code),
            };
            let target = this.display_target();
            let mut conn = kunpay::db::connect_one(&this)?;
            let ha_config = Config::load(&database.config, Mode::Development)
                .ok()
                .and_then(|c| c.ha);
            let role: ha::NodeRole = role.parse().map_err(anyhow::Error::msg)?;
            if role == ha::NodeRole::Active {
                if let Some(refusal) = peer_refuses_promotion(ha_config.as_ref(), force)? {
                    eprintln!("kunpayctl: {target}: refused: {refusal}");
                    return Ok(EXIT_REFUSED);
                }
            }
            match ha::set_role(&mut conn, role, epoch, &reason) {
                Ok(before) => {
                    println!(
                        "{target}: {} at epoch {} (was {} at epoch {})",
                        role, epoch, before.role, before.epoch
                    );
                    drop(conn);
                    let peer = source_settings(ha_config.as_ref(), None, "ha set-role")
                        .ok()
                        .flatten();
                    let detail = vec![
                        ("database", target.clone()),
                        ("role", format!("{role} at epoch {epoch}")),
                        ("was", format!("{} at epoch {}", before.role, before.epoch)),
                        ("reason", reason.clone()),
                        ("forced", force.to_string()),
                    ];
                    record_on_active(
                        [Some(this), peer].into_iter().flatten().collect(),
                        &operator_name(by),
                        "HA_SET_ROLE",
                        &detail,
                        ROLE_ROW_KEEPS_IT,
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("kunpayctl: {target}: {e:#}");
                    Ok(EXIT_FAILURE)
                }
            }
        }
        HaCommand::Status {
            database,
            source_url,
        } => {
            let config = Config::load(&database.config, Mode::Development).ok();
            let (mut conn, target) = match connect_database(
                &database.config,
                database.database_url.clone(),
                "ha status",
            )? {
                Ok(connected) => connected,
                Err(code) => return Ok(code),
            };
            let role = ha::read_role(&mut conn)?;
            println!("database      {target}");
            println!("role          {} (fencing epoch {})", role.role, role.epoch);
            println!("changed       {} ({})", time(role.changed_at), role.reason);
            let unguarded = ha::unguarded_tables(&mut conn)?;
            if !unguarded.is_empty() {
                println!(
                    "UNGUARDED     {} (run `kunpayctl db migrate`)",
                    unguarded.join(", ")
                );
            }
            let ha_config = config.as_ref().and_then(|c| c.ha.clone());
            let slot = ha_config
                .as_ref()
                .map(|h| h.slot.clone())
                .unwrap_or_else(|| "kunpay_cdc".into());
            let positions = cdc::positions(&mut conn)?;
            for p in &positions {
                println!(
                    "applied       slot {} from source {}: up to {} (xid {}), committed there {}, {} transactions, {} changes",
                    p.slot_name,
                    p.source_id,
                    lsn(p.applied_lsn),
                    p.applied_xid.map_or("-".into(), |x| x.to_string()),
                    p.commit_time.map_or("-".into(), time),
                    p.transactions,
                    p.changes
                );
            }
            let Some(settings) = source_settings(ha_config.as_ref(), source_url, "ha status")?
            else {
                println!("source        not configured (ha.source_url); this node copies nothing");
                return Ok(0);
            };
            println!("source        {}", settings.display_target());
            let mut source = match kunpay::db::connect_one(&settings) {
                Ok(source) => source,
                Err(e) => {
                    eprintln!("kunpayctl: cannot read the source: {e}");
                    return Ok(EXIT_FAILURE);
                }
            };
            let status = cdc::status(&mut source, &mut conn, &slot)?;
            println!(
                "slot          {} (confirmed up to {})",
                status.slot,
                status
                    .slot_confirmed
                    .map_or("MISSING on the source".into(), |l| l.to_string())
            );
            if let (Some(restart), Some(confirmed)) = (status.slot_restart, status.slot_confirmed) {
                println!(
                    "slot restart  {restart} ({} bytes of WAL before the confirmed position, \
                     decoded again by every read of the slot)",
                    confirmed.bytes_after(restart)
                );
            }
            println!(
                "source WAL    {} at {}",
                status.source_flush,
                time(status.source_now)
            );
            println!(
                "lag           {} bytes, {}",
                status.lag_bytes,
                status
                    .lag_seconds
                    .map_or("unknown seconds (nothing applied yet)".into(), |s| format!(
                        "{s:.1} s"
                    ))
            );
            let (max_bytes, max_time) = ha_config.as_ref().map_or((1024 * 1024, 10.0), |h| {
                (h.max_lag_bytes, h.max_lag_time.as_secs_f64())
            });
            let within = status.slot_confirmed.is_some()
                && status.lag_bytes <= max_bytes
                && status.lag_seconds.is_some_and(|s| s <= max_time);
            println!(
                "verdict       {}",
                if within {
                    "within the lag bound".to_string()
                } else {
                    format!("OVER the lag bound ({max_bytes} bytes, {max_time} s) or not copying")
                }
            );
            Ok(if within { 0 } else { EXIT_FAILURE })
        }
    }
}

fn parse_event_id(text: &str) -> anyhow::Result<uuid::Uuid> {
    uuid::Uuid::parse_str(text.trim())
        .with_context(|| format!("\"{text}\" is not an event id (32 hex digits, as listed)"))
}

fn reversal(command: ReversalCommand) -> anyhow::Result<u8> {
    let ReversalCommand::List {
        database,
        state,
        limit,
    } = command;
    let (mut conn, _) = match connect_database(
        &database.config,
        database.database_url.clone(),
        "reversal list",
    )? {
        Ok(connected) => connected,
        Err(code) => return Ok(code),
    };
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let state = state.map(|s| s.to_ascii_uppercase());
    let rows = kunpay::payment::journal::reversal::list(&mut conn, state.as_deref(), limit)?;
    println!(
        "{:<32}  {:<12}  {:<32}  {:<14}  {:>8}  {:<23}  DETAIL",
        "REVERSAL", "INSTITUTION", "TRANSACTION", "STATE", "ATTEMPTS", "REQUESTED"
    );
    for r in &rows {
        let detail = match (r.state.as_str(), &r.core_ref, &r.refusal, &r.last_error) {
            ("REVERSED", Some(core_ref), _, _) => format!("core ref {core_ref}"),
            ("REFUSED", _, Some(why), _) => format!("refused: {why}; settle by hand"),
            ("PENDING", _, _, Some(error)) => format!("retrying: {error}"),
            _ => r.reason.clone(),
        };
        println!(
            "{:<32}  {:<12}  {:<32}  {:<14}  {:>8}  {:<23}  {}",
            r.reversal_id.simple(),
            r.inst_id,
            r.txn_id.simple(),
            r.state,
            r.attempts,
            time(r.created_at),
            detail
        );
    }
    println!("{} reversal(s)", rows.len());
    Ok(0)
}

fn notify(command: NotifyCommand) -> anyhow::Result<u8> {
    use kunpay::notify::store;
    let (database, purpose) = match &command {
        NotifyCommand::List { database, .. } => (database, "notify list"),
        NotifyCommand::Show { database, .. } => (database, "notify show"),
        NotifyCommand::Replay { database, .. } => (database, "notify replay"),
    };
    let (mut conn, _) =
        match connect_database(&database.config, database.database_url.clone(), purpose)? {
            Ok(connected) => connected,
            Err(code) => return Ok(code),
        };
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    match command {
        NotifyCommand::List {
            status,
            inst,
            limit,
            ..
        } => {
            let status = status.map(|s| s.to_ascii_uppercase());
            let rows = store::list(&mut conn, status.as_deref(), inst.as_deref(), limit)?;
            println!(
                "{:<32}  {:<12}  {:<32}  {:<9}  {:<9}  {:>8}  {:<23}  LAST ERROR",
                "EVENT",
                "INSTITUTION",
                "TRANSACTION",
                "STATE",
                "STATUS",
                "ATTEMPTS",
                "NEXT/FINISHED"
            );
            for n in &rows {
                println!(
                    "{:<32}  {:<12}  {:<32}  {:<9}  {:<9}  {:>8}  {:<23}  {}",
                    n.event_id.simple(),
                    n.inst_id,
                    n.txn_id.simple(),
                    n.txn_state,
                    n.status,
                    n.attempts,
                    time(n.finished_at.unwrap_or(n.next_at)),
                    n.last_error.as_deref().unwrap_or("")
                );
            }
            println!("{} notification(s)", rows.len());
            Ok(0)
        }
        NotifyCommand::Show { event_id, .. } => {
            let event_id = parse_event_id(&event_id)?;
            let Some(n) = store::get(&mut conn, event_id)? else {
                eprintln!("kunpayctl: no notification {}", event_id.simple());
                return Ok(EXIT_FAILURE);
            };
            println!("event        {}", n.event_id.simple());
            println!("institution  {}", n.inst_id);
            println!("transaction  {} ({})", n.txn_id.simple(), n.txn_state);
            println!("status       {} after {} attempt(s)", n.status, n.attempts);
            println!("queued       {}", time(n.created_at));
            for a in store::attempts(&mut conn, event_id)? {
                println!(
                    "attempt {:>3}  {}  {:>6} ms  state {}  {}",
                    a.attempt,
                    time(a.at),
                    a.duration_ms,
                    a.txn_state,
                    match (a.http_status, a.error.as_deref()) {
                        (Some(status), _) if (200..300).contains(&status) =>
                            format!("HTTP {status}: delivered"),
                        (_, Some(error)) => error.to_string(),
                        (Some(status), None) => format!("HTTP {status}"),
                        (None, None) => String::new(),
                    }
                );
            }
            Ok(0)
        }
        NotifyCommand::Replay { event_id, by, .. } => {
            let event_id = parse_event_id(&event_id)?;
            let name = operator_name(by);
            let now = chrono::Utc::now();
            // The change and its operator-action row (for the audit log) commit together.
            let replayed = conn.transaction::<_, anyhow::Error, _>(|conn| {
                if !store::replay(conn, event_id, now)? {
                    return Ok(false);
                }
                let n = store::get(conn, event_id)?.context("the replayed notification")?;
                record_action(
                    conn,
                    &name,
                    "NOTIFY_REPLAY",
                    Some(n.txn_id),
                    &[
                        ("event", n.event_id.simple().to_string()),
                        ("institution", n.inst_id.clone()),
                        ("txn_state", n.txn_state.clone()),
                    ],
                    now,
                )?;
                Ok(true)
            })?;
            if replayed {
                println!(
                    "notification {} queued; the institution's notifier sends it within notify.poll_every",
                    event_id.simple()
                );
                Ok(0)
            } else {
                eprintln!(
                    "kunpayctl: notification {} does not exist or is still pending",
                    event_id.simple()
                );
                Ok(EXIT_FAILURE)
            }
        }
    }
}

fn parse_txn_id(text: &str) -> anyhow::Result<uuid::Uuid> {
    uuid::Uuid::parse_str(text.trim()).with_context(|| {
        format!("\"{text}\" is not a transaction id (32 hex digits, as `risk case list` shows)")
    })
}

/// The operator-action row of a change, written in the change's own database transaction so
/// the daemon logs it to the audit log exactly once (`kunpay::audit::operator`).
fn record_action(
    conn: &mut diesel::PgConnection,
    operator: &str,
    command: &str,
    txn_id: Option<uuid::Uuid>,
    detail: &[(&str, String)],
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<i64> {
    Ok(kunpay::audit::operator::record(
        conn,
        &kunpay::audit::operator::OperatorAction {
            operator,
            command,
            txn_id,
            detail,
        },
        now,
    )?)
}

/// What a list change logs: the entry as stored (card, id and phone numbers as their keyed
/// digest and masked form, never in plaintext).
fn list_detail(
    list: &str,
    kind: &str,
    key: &str,
    shown: &str,
    reason: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("list", list.to_string()),
        ("kind", kind.to_string()),
        ("value", shown.to_string()),
        ("key", key.to_string()),
        ("reason", reason.to_string()),
    ]
}

/// What still records an HA command that no ACTIVE database took as an operator action.
const ROLE_ROW_KEEPS_IT: &str = "the role row keeps its reason";

/// Records an operator action whose change is already made and could not share its transaction
/// (an HA command, whose changes span both databases and their roles; a migration, which runs
/// in transactions of its own) in the first of `candidates` that is ACTIVE, whose node's daemon
/// then appends it to its audit log. Says where, or why it could not and what still records
/// the change (`kept_by`).
fn record_on_active(
    candidates: Vec<kunpay::db::ConnectSettings>,
    operator: &str,
    command: &str,
    detail: &[(&str, String)],
    kept_by: &str,
) {
    let mut why_not = Vec::new();
    for settings in candidates {
        let target = settings.display_target();
        match record_if_active(&settings, operator, command, detail) {
            Ok(Ok(id)) => {
                println!(
                    "recorded as operator action {id} ({command}) in {target}: its node's audit log holds it"
                );
                return;
            }
            Ok(Err(role)) => why_not.push(format!("{target} is {role}")),
            Err(e) => why_not.push(format!("{target}: {e:#}")),
        }
    }
    eprintln!(
        "kunpayctl: {command} is not in the audit log: no ACTIVE database took its operator action ({}); {kept_by}",
        why_not.join("; ")
    );
}

/// The action's id, or the database's role when it is not ACTIVE (nothing written then).
fn record_if_active(
    settings: &kunpay::db::ConnectSettings,
    operator: &str,
    command: &str,
    detail: &[(&str, String)],
) -> anyhow::Result<Result<i64, kunpay::ha::NodeRole>> {
    use diesel::Connection as _;
    let mut conn = kunpay::db::connect_one(settings)?;
    let role = kunpay::ha::read_role(&mut conn)?.role;
    if role != kunpay::ha::NodeRole::Active {
        return Ok(Err(role));
    }
    Ok(Ok(conn.transaction(|conn| {
        record_action(conn, operator, command, None, detail, chrono::Utc::now())
    })?))
}

fn operator_name(by: Option<String>) -> String {
    by.unwrap_or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
    })
}

fn risk(command: RiskCommand) -> anyhow::Result<u8> {
    use kunpay::payment::journal::risk as journal;
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let (database, purpose) = match &command {
        RiskCommand::Status { config, ops } => return risk_status(config, ops.clone()),
        RiskCommand::Stats { database, .. } => (database, "risk stats"),
        RiskCommand::List { command } => match command {
            ListCommand::Add { database, .. } => (database, "risk list add"),
            ListCommand::Remove { database, .. } => (database, "risk list remove"),
            ListCommand::Show { database } => (database, "risk list show"),
            ListCommand::Log { database, .. } => (database, "risk list log"),
        },
        RiskCommand::Case { command } => match command {
            CaseCommand::List { database, .. } => (database, "risk case list"),
            CaseCommand::Show { database, .. } => (database, "risk case show"),
            CaseCommand::Approve { database, .. } => (database, "risk case approve"),
            CaseCommand::Decline { database, .. } => (database, "risk case decline"),
        },
    };
    let (mut conn, _) =
        match connect_database(&database.config, database.database_url.clone(), purpose)? {
            Ok(connected) => connected,
            Err(code) => return Ok(code),
        };
    let config_path = database.config.clone();
    match command {
        RiskCommand::Status { .. } => unreachable!("answered above"),
        RiskCommand::Stats { day, .. } => risk_stats(&mut conn, day),
        RiskCommand::List { command } => risk_list(&mut conn, command),
        RiskCommand::Case { command } => match command {
            CaseCommand::List { state, limit, .. } => {
                let state = state.map(|s| s.to_ascii_uppercase());
                let cases = journal::cases(&mut conn, state.as_deref(), limit)?;
                println!(
                    "{:<32}  {:<12}  {:<8}  {:<6}  {:>12}  {:<23}  {:<9}  RULES",
                    "TRANSACTION", "INSTITUTION", "STATE", "KIND", "AMOUNT_FEN", "OPENED", "TXN"
                );
                for c in &cases {
                    println!(
                        "{:<32}  {:<12}  {:<8}  {:<6}  {:>12}  {:<23}  {:<9}  {}",
                        c.txn_id.simple(),
                        c.inst_id,
                        c.state,
                        c.kind,
                        c.amount_fen,
                        time(c.opened_at),
                        c.txn_state,
                        c.fired
                    );
                }
                println!("{} case(s)", cases.len());
                Ok(0)
            }
            CaseCommand::Show { txn, .. } => {
                let txn_id = parse_txn_id(&txn)?;
                let Some(c) = journal::case(&mut conn, txn_id)? else {
                    eprintln!(
                        "kunpayctl: no review case for transaction {}",
                        txn_id.simple()
                    );
                    return Ok(EXIT_FAILURE);
                };
                println!("transaction   {}", c.txn_id.simple());
                println!("institution   {}", c.inst_id);
                println!("serial        {}", c.req_serial);
                println!("kind          {}", c.kind);
                println!("amount_fen    {}", c.amount_fen);
                println!("account       {}", c.account_masked);
                println!("txn state     {}", c.txn_state);
                println!("case          {}", c.state);
                println!("opened        {}", time(c.opened_at));
                if let Some(at) = c.resolved_at {
                    println!(
                        "resolved      {} by {}: {}",
                        time(at),
                        c.resolved_by.as_deref().unwrap_or("?"),
                        c.note.as_deref().unwrap_or("")
                    );
                }
                if let Some(at) = c.sent_at {
                    println!("sent to core  {}", time(at));
                }
                println!("rule set      {}", c.ruleset);
                println!("score         {}", c.score);
                println!("fired         {}", c.fired);
                println!("values seen:");
                for pair in c.seen.split(';').filter(|p| !p.is_empty()) {
                    println!("  {pair}");
                }
                Ok(0)
            }
            CaseCommand::Approve { txn, note, by, .. } => {
                let txn_id = parse_txn_id(&txn)?;
                let name = operator_name(by);
                let now = chrono::Utc::now();
                let verdict = conn.transaction::<_, anyhow::Error, _>(|conn| {
                    let verdict = journal::approve(
                        conn,
                        txn_id,
                        &journal::Reviewer {
                            name: &name,
                            note: &note,
                        },
                        now,
                    )?;
                    if verdict == journal::Verdict::Applied {
                        record_action(
                            conn,
                            &name,
                            "RISK_CASE_APPROVE",
                            Some(txn_id),
                            &[("note", note.clone())],
                            now,
                        )?;
                    }
                    Ok(verdict)
                })?;
                report_verdict(txn_id, verdict, "approved; the daemon sends it to the core")
            }
            CaseCommand::Decline { txn, note, by, .. } => {
                let txn_id = parse_txn_id(&txn)?;
                let name = operator_name(by);
                let inst_id = journal::case(&mut conn, txn_id)?.map(|c| c.inst_id);
                // Announce the failure when the institution has a callback (or when the
                // configuration cannot tell: a notification nobody delivers is only listed).
                let notify = match (Config::load(&config_path, Mode::Development), inst_id) {
                    (Ok(config), Some(inst_id)) => config
                        .institutions
                        .iter()
                        .find(|i| i.id == inst_id)
                        .is_none_or(|i| i.callback_url.is_some()),
                    _ => true,
                };
                let now = chrono::Utc::now();
                let verdict = conn.transaction::<_, anyhow::Error, _>(|conn| {
                    let verdict = journal::decline(
                        conn,
                        txn_id,
                        &journal::Reviewer {
                            name: &name,
                            note: &note,
                        },
                        kunpay::channel::codes::ResultCode::RiskDeclined.code(),
                        notify,
                        now,
                    )?;
                    if verdict == journal::Verdict::Applied {
                        record_action(
                            conn,
                            &name,
                            "RISK_CASE_DECLINE",
                            Some(txn_id),
                            &[
                                ("note", note.clone()),
                                (
                                    "result_code",
                                    kunpay::channel::codes::ResultCode::RiskDeclined
                                        .code()
                                        .to_string(),
                                ),
                            ],
                            now,
                        )?;
                    }
                    Ok(verdict)
                })?;
                report_verdict(
                    txn_id,
                    verdict,
                    "declined; the transaction FAILED with 3015",
                )
            }
        },
    }
}

fn report_verdict(
    txn_id: uuid::Uuid,
    verdict: kunpay::payment::journal::risk::Verdict,
    done: &str,
) -> anyhow::Result<u8> {
    use kunpay::payment::journal::risk::Verdict;
    match verdict {
        Verdict::Applied => {
            println!("{}: {done}", txn_id.simple());
            Ok(0)
        }
        Verdict::NoSuchCase => {
            eprintln!(
                "kunpayctl: no review case for transaction {}",
                txn_id.simple()
            );
            Ok(EXIT_FAILURE)
        }
        Verdict::AlreadyResolved { state, by } => {
            eprintln!(
                "kunpayctl: the case of {} is already {state} (by {}); nothing changed",
                txn_id.simple(),
                by.as_deref().unwrap_or("?")
            );
            Ok(EXIT_FAILURE)
        }
    }
}

fn risk_status(config_path: &Path, ops: Option<String>) -> anyhow::Result<u8> {
    let base = match ops_base(config_path, ops) {
        Ok(base) => base,
        Err(code) => return Ok(code),
    };
    let body = match ops_get(&format!("{base}/metrics"))? {
        Ok(body) => body,
        Err(code) => return Ok(code),
    };
    let value_of = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("?")
            .to_string()
    };
    let active = body
        .lines()
        .filter(|l| l.starts_with("kunpay_risk_ruleset{") && l.ends_with(" 1"))
        .filter_map(|l| l.split("version=\"").nth(1)?.split('"').next())
        .next();
    let Some(version) = active else {
        eprintln!("kunpayctl: the daemon at {base} reports no risk rule set (no [risk] section?)");
        return Ok(EXIT_FAILURE);
    };
    println!("rule set          {version}");
    println!("reloads           {}", value_of("kunpay_risk_reloads"));
    println!(
        "reload failures   {}",
        value_of("kunpay_risk_reload_failures")
    );
    println!(
        "velocity subjects {}",
        value_of("kunpay_risk_velocity_subjects")
    );
    Ok(0)
}

fn risk_stats(
    conn: &mut diesel::PgConnection,
    day: Option<chrono::NaiveDate>,
) -> anyhow::Result<u8> {
    use kunpay::payment::journal::risk as journal;
    use std::collections::BTreeMap;
    const MAX_FIRED_ROWS: i64 = 1_000_000;
    let china = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8");
    let day = day.unwrap_or_else(|| chrono::Utc::now().with_timezone(&china).date_naive());
    let from = day
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_local_timezone(china)
        .single()
        .expect("a fixed offset has one midnight")
        .with_timezone(&chrono::Utc);
    let to = from + chrono::Duration::days(1);
    let outcomes = journal::outcomes_between(conn, from, to)?;
    let total: i64 = outcomes.iter().map(|(_, n)| n).sum();
    println!("risk decisions on {day} (China time): {total}");
    for (outcome, n) in &outcomes {
        println!("  {outcome:<8} {n}");
    }
    #[derive(Default)]
    struct RuleDay {
        hits: u64,
        shadow_hits: u64,
        declined: u64,
        reviewed: u64,
        approved_by_reviewer: u64,
        declined_by_reviewer: u64,
    }
    let rows = journal::fired_between(conn, from, to, MAX_FIRED_ROWS)?;
    let mut rules: BTreeMap<String, RuleDay> = BTreeMap::new();
    for (fired, outcome, case_state) in &rows {
        for hit in fired.split(',').filter(|h| !h.is_empty()) {
            let id = hit.split(':').next().unwrap_or(hit).to_string();
            let entry = rules.entry(id).or_default();
            if hit.ends_with("(shadow)") {
                entry.shadow_hits += 1;
                continue;
            }
            entry.hits += 1;
            match outcome.as_str() {
                "DECLINE" => entry.declined += 1,
                "REVIEW" => entry.reviewed += 1,
                _ => {}
            }
            match case_state.as_deref() {
                Some("APPROVED") => entry.approved_by_reviewer += 1,
                Some("DECLINED") => entry.declined_by_reviewer += 1,
                _ => {}
            }
        }
    }
    println!(
        "{:<28}  {:>8}  {:>8}  {:>8}  {:>8}  {:>10}  {:>10}",
        "RULE@VERSION", "HITS", "SHADOW", "DECLINED", "REVIEWED", "REV_APPRVD", "REV_DECLND"
    );
    for (rule, d) in &rules {
        println!(
            "{:<28}  {:>8}  {:>8}  {:>8}  {:>8}  {:>10}  {:>10}",
            rule,
            d.hits,
            d.shadow_hits,
            d.declined,
            d.reviewed,
            d.approved_by_reviewer,
            d.declined_by_reviewer
        );
    }
    if rows.len() as i64 == MAX_FIRED_ROWS {
        println!("(the first {MAX_FIRED_ROWS} decisions with fired rules only)");
    }
    Ok(0)
}

/// What a list stores for `value`, or None after saying (masked) why it is not acceptable.
fn stored_form_or_say_why(
    dimension: kunpay::risk::features::Dimension,
    value: &str,
) -> Option<(String, String)> {
    kunpay::risk::list_store::stored_form(dimension, value)
        .map_err(|why| eprintln!("kunpayctl: {}", kunpay::logging::mask::mask_line(&why)))
        .ok()
}

fn risk_list(conn: &mut diesel::PgConnection, command: ListCommand) -> anyhow::Result<u8> {
    use kunpay::risk::features::Dimension;
    use kunpay::risk::list_store;
    let parse = |list: &str, kind: &str| {
        (
            list_store::parse_colour(list).expect("clap checked the list"),
            Dimension::parse(kind).expect("clap checked the kind"),
        )
    };
    match command {
        ListCommand::Log { limit, .. } => {
            let changes = list_store::changes(conn, limit)?;
            println!(
                "{:>8}  {:<23}  {:<16}  {:<6}  {:<6}  {:<8}  {:<24}  REASON",
                "CHANGE", "AT", "BY", "ACTION", "LIST", "KIND", "VALUE"
            );
            for c in &changes {
                println!(
                    "{:>8}  {:<23}  {:<16}  {:<6}  {:<6}  {:<8}  {:<24}  {}",
                    c.change_id,
                    c.changed_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    c.changed_by,
                    c.action,
                    c.colour.to_ascii_lowercase(),
                    c.dimension,
                    c.shown,
                    c.reason
                );
            }
            println!("{} change(s)", changes.len());
            Ok(0)
        }
        ListCommand::Show { .. } => {
            let entries = list_store::entries(conn)?;
            println!(
                "{:<6}  {:<8}  {:<24}  {:<23}  {:<16}  REASON",
                "LIST", "KIND", "VALUE", "ADDED", "BY"
            );
            for e in &entries {
                println!(
                    "{:<6}  {:<8}  {:<24}  {:<23}  {:<16}  {}",
                    e.colour.to_ascii_lowercase(),
                    e.dimension,
                    e.shown,
                    e.added_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    e.added_by,
                    e.reason
                );
            }
            println!(
                "{} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            Ok(0)
        }
        ListCommand::Add {
            list,
            kind,
            value,
            reason,
            by,
            ..
        } => {
            let (colour, dimension) = parse(&list, &kind);
            let Some((key, shown)) = stored_form_or_say_why(dimension, &value) else {
                return Ok(EXIT_USAGE);
            };
            let name = operator_name(by);
            let change = list_store::Change {
                by: &name,
                reason: &reason,
                at: chrono::Utc::now(),
            };
            let added = conn.transaction::<_, anyhow::Error, _>(|conn| {
                let added = list_store::add(conn, colour, dimension, &key, &shown, &change)?;
                if added {
                    record_action(
                        conn,
                        &name,
                        "RISK_LIST_ADD",
                        None,
                        &list_detail(&list, &kind, &key, &shown, &reason),
                        change.at,
                    )?;
                }
                Ok(added)
            })?;
            if added {
                println!("added {kind} {shown} to the {list} list");
                Ok(0)
            } else {
                println!("{kind} {shown} is on the {list} list already; nothing changed");
                Ok(0)
            }
        }
        ListCommand::Remove {
            list,
            kind,
            value,
            reason,
            by,
            ..
        } => {
            let (colour, dimension) = parse(&list, &kind);
            let Some((key, shown)) = stored_form_or_say_why(dimension, &value) else {
                return Ok(EXIT_USAGE);
            };
            let name = operator_name(by);
            let change = list_store::Change {
                by: &name,
                reason: &reason,
                at: chrono::Utc::now(),
            };
            let removed = conn.transaction::<_, anyhow::Error, _>(|conn| {
                let removed = list_store::remove(conn, colour, dimension, &key, &change)?;
                if removed {
                    record_action(
                        conn,
                        &name,
                        "RISK_LIST_REMOVE",
                        None,
                        &list_detail(&list, &kind, &key, &shown, &reason),
                        change.at,
                    )?;
                }
                Ok(removed)
            })?;
            if removed {
                println!("removed {kind} {shown} from the {list} list");
                Ok(0)
            } else {
                eprintln!("kunpayctl: {kind} {shown} is not on the {list} list");
                Ok(EXIT_FAILURE)
            }
        }
    }
}
