//! The daemon's life: start-up in a fixed order, readiness, reload, drain and exit.
//!
//! Owns: the start-up sequence (config -> logging -> crypto self-test -> keys -> bind ->
//! privilege drop -> runtime -> database -> serve -> READY=1), systemd notifications and
//! watchdog pings, SIGHUP reload, and the SIGTERM drain with its deadline.
//! Must never: tell systemd READY=1 before every listener is bound and the database answers,
//! leave a listener or a half-started cluster behind when start-up fails, or exit 0 after
//! cutting off a request.

pub mod dev;
pub mod privilege;
pub mod role;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigIssue, Mode, Secret};
use crate::crypto::keyfile::{self, PassphraseSource};
use crate::db::{self, ConnectSettings};
use crate::logging::{self, LogHandle};
use crate::ops::{self, NodeState};
use crate::server;

/// Exit codes, documented in docs/operations.md and used by the systemd unit
/// (`RestartPreventExitStatus=2`: restarting cannot fix a bad configuration).
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
/// The database's role changed under the running process (a planned cutover fenced or demoted
/// this node): it stopped cleanly so the service manager starts it again in its new role
/// (`RestartForceExitStatus=75` in the unit; EX_TEMPFAIL in sysexits.h).
pub const EXIT_ROLE_CHANGED: u8 = 75;

pub struct Options {
    pub config: PathBuf,
    /// `--dev DIR`: generate config and keys in DIR and run the embedded database there.
    pub dev_dir: Option<PathBuf>,
}

/// Runs the daemon to completion and returns the process exit code.
pub fn run(options: Options) -> ExitCode {
    match start(options) {
        Ok(code) => ExitCode::from(code),
        Err(Fatal::Config(message)) => {
            eprintln!("{message}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Fatal::Other(error)) => {
            // One line, on stderr (the journal keeps it) and in the log when that is syslog.
            let line = logging::mask::mask_line(&format!("{error:#}")).into_owned();
            if !logging::writes_to_stderr() {
                tracing::error!("start-up failed: {line}");
            }
            logging::print_final_line(&format!("kunpayd: {line}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

enum Fatal {
    Config(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Fatal {
    fn from(error: anyhow::Error) -> Self {
        Fatal::Other(error)
    }
}

/// The business side, prepared while privileged: keys read, socket bound.
struct ChannelPrepared {
    listener: std::net::TcpListener,
    tls: Option<openssl::ssl::SslAcceptor>,
    signer: crate::crypto::sm2::Signer,
    encrypt_key: crate::crypto::sm2::PrivateKey,
    data_key: [u8; 16],
    institution_keys: std::collections::HashMap<String, crate::crypto::sm2::PublicKey>,
    /// With `core.link = "amqp"`: the MAC keys and the broker URI with its password, read
    /// while still privileged like every other secret.
    core_link: Option<CoreLinkSecrets>,
}

struct CoreLinkSecrets {
    mac_keys: Arc<crate::core::wire::MacKeys>,
    uri: String,
}

/// What start-up reads while still privileged, handed to the async part.
struct Prepared {
    config: Config,
    mode: Mode,
    log: LogHandle,
    ops_listener: std::net::TcpListener,
    channel: Option<ChannelPrepared>,
    connect: ConnectSettings,
    dev_url: Option<Secret>,
    dev_cluster: Option<db::cluster::PrivateCluster>,
    /// `make run`'s kunpay-coresim, when its configuration uses one.
    dev_coresim: Option<dev::DevCoreSim>,
    risk: Option<crate::risk::Loaded>,
    /// The message log, opened (and recovered) as the service user; `None` without `[audit]`.
    audit: Option<crate::audit::AuditLog>,
    /// The active node's database, for the CDC applier of a standby with `[ha]`.
    cdc_source: Option<ConnectSettings>,
}

fn start(options: Options) -> Result<u8, Fatal> {
    let (config_path, mode, dev_paths) = match &options.dev_dir {
        Some(dir) => {
            let paths = dev::DevPaths::new(dir)?;
            let created = dev::prepare(&paths)?;
            for item in created {
                println!("kunpayd --dev: created {item}");
            }
            (paths.config.clone(), Mode::Development, Some(paths))
        }
        None => (options.config.clone(), Mode::Production, None),
    };
    let mut config = Config::load(&config_path, mode).map_err(|e| Fatal::Config(e.to_string()))?;
    let log = logging::init(&config.log, "kunpayd")
        .map_err(|e| Fatal::Other(e.context("setting up logging")))?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config_path.display(), "kunpayd starting");

    crate::crypto::self_test()
        .context("cryptographic self-test failed; this binary must not sign anything")?;
    let sign_key = keyfile::load_private_key(
        &config.keys.sign_private,
        config.keys.sign_passphrase.as_ref(),
        "keys.sign_passphrase_file",
    )
    .context("loading keys.sign_private")?;
    // Prove the key signs under the configured distinguishing id before anyone relies on it.
    let signer = crate::crypto::sm2::Signer::new(&sign_key, &config.keys.distinguishing_id)
        .context("keys.distinguishing_id cannot be used with keys.sign_private")?;
    drop(sign_key);
    // The audit key is read while still privileged, like every key; the log itself is opened
    // after the privilege drop so its files belong to the service user.
    let audit_key = match &config.audit {
        Some(audit) => Some(load_audit_key(audit)?),
        None => None,
    };

    let password = match &config.database.password {
        Some(source) => Some(read_secret(source, "database.password_file")?),
        None => None,
    };

    let ops_listener = server::bind(config.ops.listen, "ops.listen")?;
    let channel = match &config.channel {
        None => None,
        Some(channel) => {
            let path = config
                .keys
                .encrypt_private
                .as_ref()
                .context("keys.encrypt_private is not set")?;
            let encrypt_key = keyfile::load_private_key(
                path,
                config.keys.encrypt_passphrase.as_ref(),
                "keys.encrypt_passphrase_file",
            )
            .context("loading keys.encrypt_private")?;
            let tls = if channel.plain_http {
                tracing::warn!(listen = %channel.listen, "channel.plain_http: institutions are served without TLS (tests only)");
                None
            } else {
                let cert = channel
                    .tls_cert
                    .as_ref()
                    .context("channel.tls_cert is not set")?;
                let key = channel
                    .tls_key
                    .as_ref()
                    .context("channel.tls_key is not set")?;
                Some(crate::gateway::tls_acceptor(cert, key)?)
            };
            let institution_keys = crate::gateway::load_institution_keys(&config.institutions)?;
            let listener = server::bind(channel.listen, "channel.listen")?;
            let core_link = match &config.core.amqp {
                None => None,
                Some(amqp) => Some(CoreLinkSecrets {
                    mac_keys: Arc::new(
                        crate::core::wire::MacKeys::single(&amqp.mac_key_id, read_mac_key(amqp)?)
                            .map_err(|e| anyhow::anyhow!("core.amqp.mac_key_file: {e}"))?,
                    ),
                    uri: amqp_uri(amqp)?,
                }),
            };
            Some(ChannelPrepared {
                core_link,
                institution_keys,
                listener,
                tls,
                signer,
                data_key: data_key_from(&encrypt_key)?,
                encrypt_key,
            })
        }
    };

    // The embedded cluster starts after the bind so a port clash fails before a server starts.
    let (dev_cluster, dev_url, dev_coresim) = match &dev_paths {
        Some(paths) => {
            let cluster = dev::start_database(paths)?;
            let url = Secret::new(cluster.url("kunpay"));
            config.database.url = Some(url.clone());
            let coresim = dev::DevCoreSim::start(paths, config.core.amqp.is_some())?;
            (Some(cluster), Some(url), coresim)
        }
        None => (None, None, None),
    };
    let url = config
        .database
        .url
        .clone()
        .context("database.url is not set")?;
    let connect = ConnectSettings {
        url,
        password,
        pool_max_size: config.database.pool_max_size,
        pool_min_idle: config.database.pool_min_idle,
        connect_timeout: config.database.connect_timeout,
        statement_timeout: config.database.statement_timeout,
        application_name: format!("kunpayd {}", config.node.id),
    };

    // The CDC source's password is read while still privileged, like every other secret.
    // Built whenever [ha] names a source: the database's role, read later, decides whether the
    // applier runs (a node configured active whose database a cutover made STANDBY copies from
    // the new active).
    let cdc_source = match config
        .ha
        .as_ref()
        .and_then(|ha| ha.source_url.clone().map(|url| (ha, url)))
    {
        Some((ha, url)) => {
            let password = match &ha.source_password {
                Some(source) => Some(read_secret(source, "ha.source_password_file")?),
                None => None,
            };
            Some(ConnectSettings {
                url,
                password,
                pool_max_size: 1,
                pool_min_idle: 0,
                connect_timeout: config.database.connect_timeout,
                statement_timeout: config.database.statement_timeout,
                application_name: format!("kunpayd {} cdc", config.node.id),
            })
        }
        None => None,
    };

    if nix::unistd::geteuid().is_root() {
        let (uid, gid) = privilege::drop_to(&config.service.user, config.service.group.as_deref())?;
        tracing::info!(user = %config.service.user, uid = uid.as_raw(), gid = gid.as_raw(), "dropped root privileges");
    } else {
        tracing::info!("started unprivileged; no privilege drop needed");
    }

    // The log is recovered (a torn tail quarantined, unsealed records sealed) before anything
    // is served; its writer thread is the first thread, started only after the drop.
    let audit = match (&config.audit, audit_key) {
        (Some(settings), Some(key)) => Some(open_audit_log(settings, &config.node.id, key)?),
        _ => None,
    };
    // Risk rules load before anything is served: a broken file stops the start with its line.
    let risk = match &config.risk {
        Some(risk) => Some(load_risk(risk)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kunpayd")
        .build()
        .context("starting the async runtime")?;
    let prepared = Prepared {
        cdc_source,
        risk,
        audit,
        config,
        mode,
        log,
        ops_listener,
        channel,
        connect,
        dev_url,
        dev_cluster,
        dev_coresim,
    };
    let code = runtime.block_on(serve(prepared))?;
    // Blocking tasks (a stuck probe) must not hold the exit hostage.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(code)
}

async fn serve(prepared: Prepared) -> anyhow::Result<u8> {
    let Prepared {
        mut config,
        mode,
        log,
        ops_listener,
        channel,
        connect,
        dev_url,
        mut dev_cluster,
        mut dev_coresim,
        risk,
        audit,
        cdc_source,
    } = prepared;

    let migrate = config.database.migrate_on_start;
    let node_id = config.node.id.clone();
    let role = config.node.role;
    let settings = connect.clone();
    let (pool, run_id, db_role) = tokio::task::spawn_blocking(
        move || -> anyhow::Result<(db::Pool, i64, crate::ha::RoleRecord)> {
            let (db_role, pool) = {
                let first = db::connect(&settings)?;
                let mut conn = db::checkout(&first, settings.connect_timeout)?;
                if migrate {
                    let applied = db::migrate(&mut conn)?;
                    if !applied.is_empty() {
                        tracing::info!(applied = %applied.join(", "), "database migrations applied");
                    }
                }
                db::ensure_schema_current(&mut conn)?;
                // The database says which role it has and at which fencing epoch; every pooled
                // connection declares that epoch, so the guard refuses this process's writes
                // once a cutover has moved the database on.
                let db_role = crate::ha::read_role(&mut conn)?;
                // Every pool opened from here on (the institutions' too) claims it.
                db::set_process_epoch(db_role.epoch);
                (db_role.clone(), db::connect(&settings)?)
            };
            let mut conn = db::checkout(&pool, settings.connect_timeout)?;
            let run_id = db::record_start(&mut conn, &node_id, role)?;
            Ok((pool, run_id, db_role))
        },
    )
    .await
    .context("database start-up task")??;

    // The database is authoritative: a node configured active whose database is STANDBY or
    // FENCED (a fenced old active restarted with a stale configuration) serves as a standby,
    // so /primary says 503 and F5 sends it nothing; its writes would be refused anyway. With
    // [ha], a cutover moves the roles between the databases, so the database alone decides and
    // node.role only says what the operator expected.
    let effective_role = match (config.node.role, db_role.role) {
        (_, crate::ha::NodeRole::Active) if config.ha.is_some() => crate::config::Role::Active,
        (crate::config::Role::Active, crate::ha::NodeRole::Active) => crate::config::Role::Active,
        (crate::config::Role::Active, db) => {
            tracing::error!(
                database_role = %db, epoch = db_role.epoch, reason = %db_role.reason,
                "node.role is active but this node's database is {db}: serving as a standby (503 on /primary); \
                 the database's role wins (kunpayctl ha status)"
            );
            crate::config::Role::Standby
        }
        (crate::config::Role::Standby, crate::ha::NodeRole::Active) => {
            tracing::error!(
                epoch = db_role.epoch,
                "node.role is standby but this node's database is ACTIVE: it accepts writes and CDC will not \
                 apply into it; declare it with `kunpayctl ha set-role standby`"
            );
            crate::config::Role::Standby
        }
        (crate::config::Role::Standby, _) => crate::config::Role::Standby,
    };
    if config.ha.is_some() && effective_role != config.node.role {
        tracing::warn!(
            node_role = %config.node.role, database_role = %db_role.role, epoch = db_role.epoch,
            reason = %db_role.reason,
            "with [ha] the database's role decides: serving as {effective_role}"
        );
    }
    let state = NodeState::new(
        config.node.id.clone(),
        effective_role,
        pool.clone(),
        config.ops.health_timeout,
        config.ops.liveness_ttl,
    );
    state.metrics.ha_fencing_epoch.set(db_role.epoch);
    let mut cdc = match (&config.ha, cdc_source, db_role.role) {
        (Some(ha), Some(source), crate::ha::NodeRole::Standby) => {
            Some(start_cdc(ha, &source, &connect, &state)?)
        }
        (Some(_), Some(_), role) => {
            tracing::info!(database_role = %role, "CDC applier not started: this node's database is not STANDBY");
            None
        }
        _ => None,
    };
    state.set_run_id(run_id);
    let ops_served = server::serve(
        "ops",
        ops_listener,
        ops::router(state.clone()),
        config.ops.max_connections,
        state.metrics.clone(),
    )?;
    let heartbeat = tokio::spawn(heartbeat(state.clone()));
    let audit = match audit {
        Some(log) => {
            let sink = crate::audit::AuditSink::new(log, state.clone());
            tokio::spawn(sink.clone().export_metrics());
            sink
        }
        None => crate::audit::AuditSink::disabled(),
    };
    let risk = match (&config.risk, risk) {
        (Some(settings), Some(loaded)) => Some(start_risk(settings, loaded, &state)?),
        _ => None,
    };
    // A standby starts none of the business machinery (gateway workers, core link, resolvers,
    // notifiers, the operator relay): each of them writes, and the core link would take the
    // active node's replies off the shared queue. Its channel listener answers 503 until a
    // cutover promotes it in place (`promote`).
    let mut business = Business {
        channel,
        standby_channel: None,
        channel_served: None,
    };
    if effective_role == crate::config::Role::Active {
        business.start(
            &config,
            &connect,
            pool.clone(),
            &state,
            risk.as_ref().map(|(engine, _)| engine.clone()),
            audit.clone(),
        )?;
    } else {
        business.serve_standby(&config, &state)?;
    }
    let mut role_events = role::spawn_watcher(
        pool.clone(),
        state.clone(),
        db_role.clone(),
        effective_role == crate::config::Role::Active,
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    {
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = db::checkout(&pool, Duration::from_secs(5))?;
            db::record_ready(&mut conn, run_id)?;
            Ok(())
        })
        .await??;
    }
    state.mark_ready();
    let status = format!(
        "serving as {}; ops on {}",
        effective_role, ops_served.local_addr
    );
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    tracing::info!(
        node = %config.node.id,
        role = %effective_role,
        ops = %ops_served.local_addr,
        database = %connect.display_target(),
        run_id,
        "kunpayd ready"
    );
    if mode == Mode::Development {
        print_dev_banner(
            &config,
            &ops_served,
            business.channel_served.as_ref(),
            &connect,
            dev_coresim.as_ref().map(dev::DevCoreSim::pid),
        );
    }

    let mut role_changed = false;
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            Some(event) = role_events.recv() => match event {
                role::RoleEvent::Promote(record) => {
                    let started = Instant::now();
                    if let Some(applier) = cdc.take() {
                        applier.stop().await;
                    }
                    business
                        .promote(
                            &record,
                            &config,
                            &connect,
                            &state,
                            risk.as_ref().map(|(engine, _)| engine.clone()),
                            audit.clone(),
                        )
                        .await
                        .context("promotion to ACTIVE failed; kunpayd stops and its next start serves as the database says")?;
                    let status = format!("serving as active (promoted at fencing epoch {})", record.epoch);
                    notify(&[NotifyState::Status(&status)]);
                    tracing::warn!(epoch = record.epoch, took_ms = started.elapsed().as_millis() as u64,
                        "promoted: this node is ACTIVE and takes business");
                }
                role::RoleEvent::Restart { from, to } => {
                    tracing::warn!(from = %from.role, from_epoch = from.epoch, to = %to.role, epoch = to.epoch,
                        exit_code = EXIT_ROLE_CHANGED, "stopping for a restart in the new role");
                    role_changed = true;
                    break "database role changed";
                }
            },
            _ = sighup.recv() => {
                reload(&mut config, mode, dev_url.as_ref(), &log, &state);
                if let Some((_, poke)) = &risk {
                    // A full channel already holds a reload request.
                    let _ = poke.try_send(());
                }
            }
        }
    };
    // The role watcher ends at its next tick once nobody listens.
    drop(role_events);

    tracing::info!(
        signal = reason,
        in_flight = ops_served.in_flight(),
        deadline_ms = config.lifecycle.drain_timeout.as_millis() as u64,
        "stopping: draining in-flight requests"
    );
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    state.begin_drain();
    let deadline = Instant::now() + config.lifecycle.drain_timeout;
    // Business traffic first; the ops listener keeps answering (503 on /primary) meanwhile.
    let mut abandoned = business.drain(deadline).await;
    abandoned += ops_served.drain(deadline).await;
    heartbeat.abort();
    if audit.is_enabled() {
        // Every answer that left is durable already; this seals the last records with a
        // checkpoint so the verifier finds nothing unsealed.
        let closing = audit.clone();
        match tokio::task::spawn_blocking(move || closing.close()).await {
            Ok(Ok(())) => tracing::info!("audit log sealed and closed"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the audit log was not closed cleanly; the next start seals its last records")
            }
            Err(e) => tracing::error!(error = %e, "closing the audit log failed"),
        }
    }
    if let Some(cdc) = cdc {
        cdc.stop().await;
    }

    let stop_reason = if abandoned == 0 {
        format!("{reason}; drained cleanly")
    } else {
        format!("{reason}; {abandoned} request(s) abandoned at the drain deadline")
    };
    let record = {
        let pool = pool.clone();
        let stop_reason = stop_reason.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = db::checkout(&pool, Duration::from_secs(2))?;
            db::record_stop(&mut conn, run_id, &stop_reason)?;
            Ok(())
        })
    };
    match tokio::time::timeout(Duration::from_secs(3), record).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not record the stop in node_run"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not record the stop in node_run"),
        Err(_) => tracing::warn!("recording the stop in node_run timed out"),
    }
    drop(pool);
    if let Some(coresim) = dev_coresim.as_mut() {
        coresim.stop();
    }
    if let Some(cluster) = dev_cluster.as_mut() {
        if let Err(e) = cluster.stop() {
            tracing::warn!(error = %e, "could not stop the embedded database");
        }
    }

    if role_changed {
        tracing::warn!(reason = %stop_reason, "kunpayd stopped for a restart in its new role");
        Ok(EXIT_ROLE_CHANGED)
    } else if abandoned == 0 {
        tracing::info!(reason = %stop_reason, "kunpayd stopped");
        Ok(EXIT_OK)
    } else {
        tracing::error!(
            abandoned,
            deadline_ms = config.lifecycle.drain_timeout.as_millis() as u64,
            "kunpayd stopped with requests cut off at lifecycle.drain_timeout"
        );
        Ok(EXIT_FAILURE)
    }
}

/// The CDC applier of a standby: one thread running `ha::cdc::run`, its outcomes turned into
/// metrics and into /standby's verdict.
struct CdcThread {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl CdcThread {
    /// Stops the applier after its current batch (a batch is bounded by `ha.batch` and the
    /// statement timeout); waits at most a few seconds, then leaves it to the exit.
    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.thread.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            tracing::warn!(
                "the CDC applier did not stop within 5 s; its batch is rolled back by the exit"
            );
        }
    }
}

fn start_cdc(
    ha: &crate::config::HaConfig,
    source: &ConnectSettings,
    target: &ConnectSettings,
    state: &Arc<NodeState>,
) -> anyhow::Result<CdcThread> {
    use crate::ha::cdc;
    let settings = cdc::CdcSettings {
        slot: ha.slot.clone(),
        batch: ha.batch,
        statement_timeout: target.statement_timeout,
    };
    let source_url = source.full_url();
    let target_url = target.full_url();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll_every = ha.poll_every;
    let (max_bytes, max_seconds) = (ha.max_lag_bytes, ha.max_lag_time.as_secs_f64());
    let thread_stop = stop.clone();
    let state = state.clone();
    // Until the first batch says otherwise, the copy is not known to be fit to take over.
    state.set_standby_fit(false);
    tracing::info!(
        source = %source.display_target(), slot = %ha.slot, batch = ha.batch,
        "CDC applier starting: this standby copies the active node's database"
    );
    let thread = std::thread::Builder::new()
        .name("cdc-applier".into())
        .spawn(move || {
            let metrics = state.metrics.clone();
            cdc::run(
                source_url.expose(),
                target_url.expose(),
                &settings,
                poll_every,
                &thread_stop,
                |event| match event {
                    cdc::Event::Applied(out) => {
                        metrics.ha_cdc_up.set(1);
                        metrics.ha_cdc_applied_transactions.inc_by(out.transactions);
                        metrics.ha_cdc_applied_changes.inc_by(out.changes);
                        let (bytes, seconds) = (out.lag_bytes(), out.lag_seconds());
                        metrics
                            .ha_cdc_lag_bytes
                            .set(bytes.min(i64::MAX as u64) as i64);
                        metrics.ha_cdc_lag_seconds.set(seconds);
                        state.set_standby_fit(bytes <= max_bytes && seconds <= max_seconds);
                    }
                    cdc::Event::Failed(_) => {
                        metrics.ha_cdc_up.set(0);
                        metrics.ha_cdc_failures.inc();
                        state.set_standby_fit(false);
                    }
                },
            )
        })
        .context("starting the CDC applier thread")?;
    Ok(CdcThread { stop, thread })
}

/// Late posting replies waiting to be compared with the journal.
const LATE_REPLY_QUEUE: usize = 4096;

/// The MQ bridge to core banking, and the thread that reconciles late posting replies.
fn start_core_bridge(
    amqp: &crate::config::AmqpCoreConfig,
    secrets: CoreLinkSecrets,
    node_id: &str,
    pool: db::Pool,
    state: &Arc<NodeState>,
    audit: crate::audit::AuditSink,
) -> anyhow::Result<Arc<dyn crate::core::CoreLink>> {
    let CoreLinkSecrets {
        mac_keys: keys,
        uri,
    } = secrets;
    let (bridge, late_replies) = crate::core::bridge::MqCore::start_logged(
        tokio::runtime::Handle::current(),
        crate::core::amqp::AmqpSettings {
            uri,
            queues: vec![amqp.request_queue.clone(), amqp.reply_queue.clone()],
            dead_letter_queue: amqp.dead_letter_queue.clone(),
            consume_queue: amqp.reply_queue.clone(),
            prefetch: amqp.prefetch,
            // Replies are matched in the order they arrive; the handler does not wait.
            concurrency: 1,
            confirm_timeout: amqp.confirm_timeout,
            connection_name: format!("kunpay {node_id}"),
            app_id: "kunpay".into(),
        },
        crate::core::bridge::BridgeSettings {
            request_queue: amqp.request_queue.clone(),
            reply_queue: amqp.reply_queue.clone(),
            reply_timeout: amqp.reply_timeout,
            max_in_flight: amqp.max_in_flight,
            late_queue: LATE_REPLY_QUEUE,
            max_queued: amqp.max_queued,
        },
        keys,
        audit,
    );
    let round_trips = state.metrics.core_round_trip.clone();
    let bridge = Arc::new(
        bridge.with_round_trip_observer(Arc::new(move |request, took| {
            round_trips
                .get_or_create(&crate::ops::metrics::CoreRequestLabels {
                    request: request.operation(),
                })
                .observe(took.as_secs_f64());
        })),
    );
    tokio::spawn(watch_outbox(
        bridge.clone(),
        pool.clone(),
        state.clone(),
        amqp.max_queued,
    ));
    std::thread::Builder::new()
        .name("core-late-replies".into())
        .spawn(move || reconcile_late_replies(late_replies, pool))
        .context("starting the late-reply thread")?;
    tracing::info!(
        request_queue = %amqp.request_queue,
        reply_queue = %amqp.reply_queue,
        "core link: MQ bridge started (connecting in the background)"
    );
    Ok(bridge)
}

/// How often the outbox depth is counted for readiness, the bridge's bound and /metrics.
const OUTBOX_WATCH_EVERY: Duration = Duration::from_secs(1);

/// Counts the outbox; beyond `max_queued` readiness and /primary say 503 (F5 stops sending)
/// until it drains below the bound again. Also removes entries a final state left behind.
async fn watch_outbox(
    bridge: Arc<crate::core::bridge::MqCore>,
    pool: db::Pool,
    state: Arc<NodeState>,
    max_queued: u64,
) {
    // What /metrics has been told so far: counters only go up by the difference.
    let mut exported: std::collections::HashMap<&'static str, u64> = Default::default();
    let mut exported_timeouts = 0u64;
    loop {
        tokio::time::sleep(OUTBOX_WATCH_EVERY).await;
        let (verdicts, timeouts) = bridge.counters().snapshot();
        for (result, total) in verdicts {
            let before = exported.insert(result, total).unwrap_or(0);
            state
                .metrics
                .core_replies
                .get_or_create(&crate::ops::metrics::ResultLabels { result })
                .inc_by(total.saturating_sub(before));
        }
        state
            .metrics
            .core_timeouts
            .inc_by(timeouts.saturating_sub(exported_timeouts));
        exported_timeouts = timeouts;
        let pool = pool.clone();
        let counted =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(i64, Vec<(String, i64)>)> {
                let mut conn = db::checkout(&pool, Duration::from_secs(2))?;
                crate::payment::journal::prune_settled_pending(&mut conn)?;
                Ok((
                    crate::payment::journal::pending_count(&mut conn)?,
                    crate::payment::journal::reversal::counts(&mut conn)?,
                ))
            })
            .await;
        state
            .metrics
            .core_link_connected
            .set(i64::from(bridge.is_connected()));
        let Ok(Ok((pending, reversals))) = counted else {
            continue;
        };
        for state_name in ["PENDING", "REVERSED", "NOTHING_POSTED", "REFUSED"] {
            let n = reversals
                .iter()
                .find(|(s, _)| s == state_name)
                .map_or(0, |(_, n)| *n);
            state
                .metrics
                .core_reversals
                .get_or_create(&crate::ops::metrics::StateLabels { state: state_name })
                .set(n);
        }
        let pending = pending.max(0) as u64;
        bridge.set_backlog(pending);
        state.metrics.core_outbox_depth.set(pending as i64);
        let full = pending >= max_queued;
        if full != state.is_outbox_full() {
            if full {
                tracing::error!(
                    pending,
                    max_queued,
                    "core outbox full: readiness and /primary answer 503 until it drains"
                );
            } else {
                tracing::info!(pending, "core outbox below its bound again: ready");
            }
            state.set_outbox_full(full);
        }
    }
}

fn read_mac_key(
    amqp: &crate::config::AmqpCoreConfig,
) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    let source = amqp
        .mac_key
        .as_ref()
        .expect("configuration requires a MAC key source with core.link = amqp");
    let text = source
        .read()
        .map_err(|e| anyhow::anyhow!("core.amqp.mac_key_file: {e}"))?;
    let trimmed: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let trimmed = zeroize::Zeroizing::new(trimmed);
    hex::decode(trimmed.as_slice())
        .map(zeroize::Zeroizing::new)
        .map_err(|_| {
            anyhow::anyhow!(
                "core.amqp.mac_key_file: the MAC key must be hex (e.g. from `openssl rand -hex 32`)"
            )
        })
}

/// The broker URI with the password from its file or credential put in.
fn amqp_uri(amqp: &crate::config::AmqpCoreConfig) -> anyhow::Result<String> {
    let Some(source) = &amqp.password else {
        return Ok(amqp.url.clone());
    };
    let password = source
        .read()
        .map_err(|e| anyhow::anyhow!("core.amqp.password_file: {e}"))?;
    let password = String::from_utf8(password.to_vec())
        .map_err(|_| anyhow::anyhow!("core.amqp.password_file: the password is not UTF-8"))?;
    let password = password.trim_end_matches(['\r', '\n']);
    crate::core::amqp::uri_with_password(&amqp.url, password)
        .map_err(|e| anyhow::anyhow!("core.amqp.url: {e}"))
}

/// Compares every late posting reply with the journal, one at a time, for as long as the
/// bridge lives.
fn reconcile_late_replies(
    late_replies: std::sync::mpsc::Receiver<crate::core::bridge::LateReply>,
    pool: db::Pool,
) {
    use crate::payment::LateReplyVerdict;
    for late in late_replies {
        let verdict = db::checkout(&pool, Duration::from_secs(5))
            .map_err(|e| e.to_string())
            .and_then(|mut conn| {
                crate::payment::Flows::reconcile_late_reply(
                    &mut conn,
                    late.txn_id,
                    &late.outcome,
                    chrono::Utc::now(),
                )
                .map_err(|e| e.to_string())
            });
        match verdict {
            Ok(LateReplyVerdict::Settled(state)) => {
                tracing::info!(txn_id = %late.txn_id, "late core reply settled the transaction as {state}")
            }
            Ok(LateReplyVerdict::Duplicate) => {
                tracing::info!(txn_id = %late.txn_id, "late core reply repeats the recorded outcome")
            }
            Ok(LateReplyVerdict::LeftToResolver) => {
                tracing::info!(txn_id = %late.txn_id, "late core reply left to the resolver (no outcome recorded yet)")
            }
            Ok(LateReplyVerdict::ReversalRequested { reversal_id, new }) => {
                if new {
                    tracing::warn!(
                        txn_id = %late.txn_id, %reversal_id,
                        "the core posted a transaction recorded as FAILED; reversal requested"
                    )
                } else {
                    tracing::info!(
                        txn_id = %late.txn_id, %reversal_id,
                        "late core reply repeats a posting already being reversed"
                    )
                }
            }
            Ok(LateReplyVerdict::Conflict {
                recorded,
                core_says,
            }) => tracing::error!(
                txn_id = %late.txn_id,
                "CONFLICT: the journal says {recorded}, the core says {core_says}; no money moved at the core, settle by hand"
            ),
            Ok(LateReplyVerdict::NoSuchTransaction) => {
                tracing::error!(txn_id = %late.txn_id, "late core reply for a transaction this database does not have")
            }
            Err(why) => tracing::error!(
                txn_id = %late.txn_id,
                "late core reply not reconciled ({why}); the resolver settles the transaction by query"
            ),
        }
    }
}

/// Reads `audit.sign_private` and proves it signs with the distinguishing id the verifier and
/// the OpenSSL commands of docs/audit.md assume.
fn load_audit_key(audit: &crate::config::AuditConfig) -> anyhow::Result<crate::audit::AuditKey> {
    let key = keyfile::load_private_key(
        &audit.sign_private,
        audit.sign_passphrase.as_ref(),
        "audit.sign_passphrase_file",
    )
    .context("loading audit.sign_private")?;
    let signer = crate::crypto::sm2::Signer::new(&key, crate::crypto::sm2::DEFAULT_DISTID)
        .context("audit.sign_private cannot sign with the distinguishing id 1234567812345678")?;
    Ok(crate::audit::AuditKey {
        key_id: audit.key_id.clone(),
        signer,
    })
}

/// Opens the log in `audit.dir`: recovers its end and seals what a crash left unsealed.
fn open_audit_log(
    audit: &crate::config::AuditConfig,
    node_id: &str,
    key: crate::audit::AuditKey,
) -> anyhow::Result<crate::audit::AuditLog> {
    let log = crate::audit::AuditLog::open(
        &audit.dir,
        crate::audit::AuditSettings {
            node_id: node_id.to_string(),
            max_segment_bytes: audit.max_segment_size,
            checkpoint_every_records: audit.checkpoint_every_records,
            checkpoint_every: audit.checkpoint_every,
            queue_bound: audit.queue_bound,
        },
        key,
    )
    .with_context(|| format!("audit.dir {}", audit.dir.display()))?;
    for note in log.recovery_notes() {
        tracing::warn!(dir = %audit.dir.display(), "audit log recovery: {note}");
    }
    tracing::info!(
        dir = %audit.dir.display(),
        key_id = %audit.key_id,
        durable_seq = log.durable_seq(),
        "audit log open"
    );
    Ok(log)
}

/// How often the relay looks for operator actions to log.
const OPERATOR_RELAY_EVERY: Duration = Duration::from_secs(1);

/// Appends the operator actions kunpayctl committed to the database to the audit log, in
/// order, exactly once (`audit::operator`). Only the active node does: a standby's database is
/// a copy it must not write.
fn spawn_operator_relay(
    sink: crate::audit::AuditSink,
    dir: PathBuf,
    pool: db::Pool,
    state: Arc<NodeState>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("audit-operator".into())
        .spawn(move || {
            loop {
                std::thread::sleep(OPERATOR_RELAY_EVERY);
                if state.role() != crate::config::Role::Active || sink.is_failed() {
                    continue;
                }
                let Ok(mut conn) = db::checkout(&pool, Duration::from_secs(5)) else {
                    continue;
                };
                match crate::audit::operator::relay_round(
                    &mut conn,
                    &sink,
                    &dir,
                    &state.node_id,
                ) {
                    Ok(round) if round.logged + round.found > 0 => tracing::info!(
                        logged = round.logged,
                        found_logged = round.found,
                        "operator actions written to the audit log"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(
                        "operator actions not logged yet ({e:#}); they stay in operator_action and are retried"
                    ),
                }
                if let Ok(pending) = crate::audit::operator::unlogged_count(&mut conn) {
                    state.metrics.audit_operator_actions_pending.set(pending);
                }
            }
        })
        .context("starting the operator-action relay")?;
    Ok(())
}

/// Loads and checks the risk directory (before privileges are dropped the files are read as
/// root; the watcher reads them again as the service user).
fn load_risk(config: &crate::config::RiskConfig) -> Result<crate::risk::Loaded, Fatal> {
    let loaded = crate::risk::load_dir(&config.dir).map_err(|e| {
        Fatal::Config(format!(
            "risk.dir {}: {e} (fix the file; the daemon does not start on a broken rule set)",
            config.dir.display()
        ))
    })?;
    if loaded.rules.longest_window_ms() > config.velocity_horizon.as_millis() as i64 {
        return Err(Fatal::Config(format!(
            "risk.dir {}: a rule reads a {} s window, longer than risk.velocity_horizon",
            config.dir.display(),
            loaded.rules.longest_window_ms() / 1000
        )));
    }
    tracing::info!(
        version = %loaded.version,
        rules = loaded.rules.rules.len(),
        list_entries = loaded.lists.entries(),
        dir = %config.dir.display(),
        "risk rules loaded"
    );
    Ok(loaded)
}

/// Starts deciding with `loaded`, watches the directory and exports the version and reloads.
fn start_risk(
    config: &crate::config::RiskConfig,
    loaded: crate::risk::Loaded,
    state: &Arc<NodeState>,
) -> anyhow::Result<(
    Arc<crate::risk::RiskEngine>,
    std::sync::mpsc::SyncSender<()>,
)> {
    let limits = crate::risk::features::StoreLimits {
        horizon_ms: config.velocity_horizon.as_millis() as i64,
        ..Default::default()
    };
    let engine = Arc::new(crate::risk::RiskEngine::new(loaded, limits));
    let reloader = crate::risk::reload::Reloader::new(&config.dir, engine.clone());
    let poke = reloader
        .start_watching()
        .map_err(|e| anyhow::anyhow!("watching risk.dir {}: {e}", config.dir.display()))?;
    let (metrics, engine_for_metrics) = (state.metrics.clone(), engine.clone());
    tokio::spawn(async move {
        let mut shown: Option<String> = None;
        loop {
            let version = engine_for_metrics.version();
            if shown.as_deref() != Some(version.as_str()) {
                if let Some(old) = shown.take() {
                    metrics
                        .risk_ruleset
                        .get_or_create(&crate::ops::metrics::VersionLabels { version: old })
                        .set(0);
                }
                metrics
                    .risk_ruleset
                    .get_or_create(&crate::ops::metrics::VersionLabels {
                        version: version.clone(),
                    })
                    .set(1);
                shown = Some(version);
            }
            let status = reloader.status();
            metrics.risk_reloads.set(status.reloads as i64);
            metrics.risk_reload_failures.set(status.failures as i64);
            metrics
                .risk_velocity_subjects
                .set(engine_for_metrics.store().subjects() as i64);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok((engine, poke))
}

/// The business side of the node: the channel listener and, on the active node, everything
/// behind it. A standby keeps the prepared channel (keys, listener) for an in-place promotion.
struct Business {
    /// Prepared and not started: a standby's, until it is promoted.
    channel: Option<ChannelPrepared>,
    /// The 503 server a standby runs on a duplicate of the channel socket.
    standby_channel: Option<server::Served>,
    channel_served: Option<server::Served>,
}

impl Business {
    /// Starts everything that takes and settles business, with `pool`'s connections (they
    /// claim the fencing epoch the process writes under).
    fn start(
        &mut self,
        config: &Config,
        connect: &ConnectSettings,
        pool: db::Pool,
        state: &Arc<NodeState>,
        risk: Option<Arc<crate::risk::RiskEngine>>,
        audit: crate::audit::AuditSink,
    ) -> anyhow::Result<()> {
        if let Some(settings) = &config.audit
            && audit.is_enabled()
        {
            spawn_operator_relay(
                audit.clone(),
                settings.dir.clone(),
                pool.clone(),
                state.clone(),
            )?;
        }
        if let Some(channel) = self.channel.take() {
            self.channel_served = Some(start_channel(
                config, channel, connect, pool, state, risk, audit,
            )?);
        }
        Ok(())
    }

    /// A standby's channel listener: bound (F5's TCP check passes), every request answered 503.
    fn serve_standby(&mut self, config: &Config, state: &Arc<NodeState>) -> anyhow::Result<()> {
        let (Some(channel), Some(channel_config)) = (&self.channel, &config.channel) else {
            return Ok(());
        };
        let listener = channel
            .listener
            .try_clone()
            .context("duplicating the channel socket for the standby's 503 server")?;
        self.standby_channel = Some(server::serve_with(
            "channel",
            listener,
            channel.tls.clone(),
            ops::standby_channel_router(state.clone()),
            channel_config.max_connections,
            state.metrics.clone(),
        )?);
        Ok(())
    }

    /// In-place promotion of a standby whose database a cutover made ACTIVE at `record.epoch`:
    /// connections that claim the new epoch, then the business machinery on them, then the
    /// gate opens. The standby's 503 server stops first; connections arriving meanwhile wait in
    /// the socket's backlog.
    async fn promote(
        &mut self,
        record: &crate::ha::RoleRecord,
        config: &Config,
        connect: &ConnectSettings,
        state: &Arc<NodeState>,
        risk: Option<Arc<crate::risk::RiskEngine>>,
        audit: crate::audit::AuditSink,
    ) -> anyhow::Result<()> {
        assert_eq!(
            record.role,
            crate::ha::NodeRole::Active,
            "promoted only to ACTIVE"
        );
        db::set_process_epoch(record.epoch);
        let settings = connect.clone();
        let pool = tokio::task::spawn_blocking(move || db::connect(&settings))
            .await
            .context("opening the promoted node's pool")??;
        state.metrics.ha_fencing_epoch.set(record.epoch);
        if let Some(standby) = self.standby_channel.take() {
            standby.drain(Instant::now() + Duration::from_secs(2)).await;
        }
        self.start(config, connect, pool, state, risk, audit)?;
        state.set_role(crate::config::Role::Active);
        Ok(())
    }

    /// Stops taking business and lets what is in flight finish until `deadline`; returns how
    /// many requests were cut off.
    async fn drain(self, deadline: Instant) -> usize {
        let mut abandoned = 0;
        if let Some(served) = self.channel_served {
            abandoned += served.drain(deadline).await;
        }
        if let Some(standby) = self.standby_channel {
            abandoned += standby.drain(deadline).await;
        }
        abandoned
    }
}

fn start_channel(
    config: &Config,
    channel: ChannelPrepared,
    connect: &ConnectSettings,
    pool: db::Pool,
    state: &Arc<NodeState>,
    risk: Option<Arc<crate::risk::RiskEngine>>,
    audit: crate::audit::AuditSink,
) -> anyhow::Result<server::Served> {
    let channel_config = config
        .channel
        .as_ref()
        .expect("prepared only when configured");
    let longest_window = config
        .institutions
        .iter()
        .map(|i| i.send_time_window)
        .max()
        .unwrap_or(Duration::from_secs(300));
    let flows = crate::payment::Flows::new(
        channel_config.bank_id.clone(),
        config.keys.sign_key_serial.clone(),
        channel.signer,
        channel.data_key,
    );
    // Over the MQ bridge an UNKNOWN posting is delivered again from the outbox while young.
    let flows = match &config.core.amqp {
        Some(amqp) => flows.with_redelivery(amqp.redeliver_within),
        None => flows,
    };
    let flows = match (risk, &config.risk) {
        (Some(engine), Some(settings)) => {
            let flows = flows.with_screening(crate::payment::screening::Screening::new(
                engine,
                settings.budget,
                settings.fail_open,
            ));
            // Before the first request: the operators' lists, and the velocity a restart must
            // not reset.
            let mut conn = db::checkout(&pool, Duration::from_secs(30))
                .map_err(|e| anyhow::anyhow!("rebuilding risk velocity: {e}"))?;
            let engine = flows.screening().expect("just configured").engine.clone();
            let (lists, generation) =
                crate::risk::list_store::load(&mut conn).map_err(|e| anyhow::anyhow!(e))?;
            state
                .metrics
                .risk_kept_list_entries
                .set(lists.entries() as i64);
            engine.replace_kept_lists(lists, generation);
            spawn_list_poller(engine, pool.clone(), state.metrics.clone())?;
            let started = std::time::Instant::now();
            let loaded = flows
                .rebuild_velocity(&mut conn, chrono::Utc::now())
                .map_err(|e| anyhow::anyhow!("rebuilding risk velocity from risk_decision: {e}"))?;
            tracing::info!(
                decisions = loaded,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "risk velocity rebuilt from the journal"
            );
            flows
        }
        _ => flows,
    };
    let core: Arc<dyn crate::core::CoreLink> = match &config.core.amqp {
        Some(amqp) => start_core_bridge(
            amqp,
            channel
                .core_link
                .expect("prepared whenever core.amqp is configured"),
            &config.node.id,
            pool.clone(),
            state,
            audit.clone(),
        )?,
        None => Arc::new(
            crate::core::sim::CoreSimulator::with_demo_accounts()
                .with_generated_accounts(config.core.simulator_generated_accounts),
        ),
    };
    let gateway = crate::gateway::ChannelGateway::start(
        &config.institutions,
        &channel.institution_keys,
        crate::gateway::Shared {
            flows,
            notify: config.notify.clone(),
            encrypt_key: channel.encrypt_key,
            encrypt_key_serial: config.keys.encrypt_key_serial.clone(),
            audit,
        },
        core,
        connect,
        pool.clone(),
        state.metrics.clone(),
    )?;
    tokio::spawn(prune_expired(pool, longest_window));
    let router = Arc::new(gateway).router(channel_config.max_body).layer(
        axum::middleware::from_fn_with_state(state.clone(), ops::business_gate),
    );
    server::serve_with(
        "channel",
        channel.listener,
        channel.tls,
        router,
        channel_config.max_connections,
        state.metrics.clone(),
    )
}

/// How often the operators' lists are checked for changes (`kunpayctl risk list`).
const LIST_POLL_EVERY: Duration = Duration::from_secs(2);

/// Swaps in the operators' lists whenever their change log moves.
fn spawn_list_poller(
    engine: Arc<crate::risk::RiskEngine>,
    pool: db::Pool,
    metrics: Arc<crate::ops::metrics::Metrics>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("risk-lists".into())
        .spawn(move || {
            loop {
                std::thread::sleep(LIST_POLL_EVERY);
                let Ok(mut conn) = db::checkout(&pool, Duration::from_secs(5)) else {
                    continue;
                };
                let (in_use, _) = engine.kept_lists();
                match crate::risk::list_store::generation(&mut conn) {
                    Ok(generation) if generation == in_use => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the risk list change log failed");
                        continue;
                    }
                }
                match crate::risk::list_store::load(&mut conn) {
                    Ok((lists, generation)) => {
                        let entries = lists.entries();
                        engine.replace_kept_lists(lists, generation);
                        metrics.risk_kept_list_entries.set(entries as i64);
                        tracing::info!(
                            generation,
                            entries,
                            "risk lists changed by an operator reloaded"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "the risk lists stay as they were"),
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the risk list poller: {e}"))?;
    Ok(())
}

/// Days of daily-limit usage kept after their business day (for counter staff's questions about
/// a refusal); limits only ever read today's.
const DAILY_USAGE_KEPT_DAYS: i64 = 7;

/// Message ids older than the widest send-time window can no longer be replayed (their send
/// time is refused), so they are deleted in bounded batches; daily-limit usage of past days is
/// deleted after [`DAILY_USAGE_KEPT_DAYS`].
async fn prune_expired(pool: db::Pool, window: Duration) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        ticker.tick().await;
        let pool = pool.clone();
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(window * 2).unwrap_or(chrono::Duration::hours(1));
        let _ = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = db::checkout(&pool, Duration::from_secs(5))?;
            while crate::payment::journal::prune_seen_messages(&mut conn, before, 10_000)? == 10_000
            {
            }
            let keep_from = crate::payment::business_date(chrono::Utc::now())
                - chrono::Duration::days(DAILY_USAGE_KEPT_DAYS);
            while crate::payment::journal::prune_daily_usage(&mut conn, keep_from, 10_000)?
                == 10_000
            {}
            Ok(())
        })
        .await;
    }
}

/// The key that encrypts account numbers at rest, derived from our encryption key so both
/// nodes of a pair (which share it) read each other's journal.
fn data_key_from(encrypt_key: &crate::crypto::sm2::PrivateKey) -> anyhow::Result<[u8; 16]> {
    let pem = encrypt_key
        .to_pkcs8_pem()
        .context("encoding keys.encrypt_private")?;
    let mac = crate::crypto::sm3::hmac_sm3(pem.as_bytes(), b"kunpay data-at-rest key v1");
    let mut key = [0u8; 16];
    key.copy_from_slice(&mac[..16]);
    Ok(key)
}

/// Ticks the liveness heartbeat and, under a systemd watchdog, pings it at half its interval.
async fn heartbeat(state: Arc<NodeState>) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog
        .map(|usec| usec / 2)
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        state.beat();
        if watchdog.is_some() {
            notify(&[NotifyState::Watchdog]);
        }
    }
}

/// SIGHUP: re-reads the file; applies what can change live, keeps the old values otherwise.
fn reload(
    config: &mut Config,
    mode: Mode,
    dev_url: Option<&Secret>,
    log: &LogHandle,
    state: &NodeState,
) {
    let mut newer = match Config::load(&config.source, mode) {
        Ok(newer) => newer,
        Err(errors) => {
            for line in errors.to_string().lines() {
                tracing::error!("reload rejected, previous configuration stays in force: {line}");
            }
            state
                .metrics
                .config_reloads
                .get_or_create(&ops::metrics::ResultLabels { result: "rejected" })
                .inc();
            return;
        }
    };
    if let Some(url) = dev_url {
        newer.database.url = Some(url.clone());
    }
    if let Err(e) = log.set_level(&newer.log.level) {
        tracing::error!(error = %e, "reload: log.level not applied");
    }
    if newer.node.role != config.node.role {
        if config.ha.is_some() {
            // With [ha] the database's role decides and the applier runs only on a standby:
            // a reload must not make a fenced node say 200 on /primary.
            tracing::warn!(from = %config.node.role, to = %newer.node.role,
                "reload: with [ha], node.role takes effect only at a restart, and the database's role \
                 (kunpayctl ha status / set-role) wins over it");
            newer.node.role = config.node.role;
        } else {
            tracing::warn!(from = %config.node.role, to = %newer.node.role, "reload: node.role changed");
            state.set_role(newer.node.role);
        }
    }
    state.set_timeouts(newer.ops.health_timeout, newer.ops.liveness_ttl);
    for key in config.restart_required_changes(&newer) {
        tracing::warn!(key, "reload: this change takes effect only after a restart");
    }
    // Keep what a restart needs to change as it was, so later reloads compare against what runs.
    config.node.role = newer.node.role;
    config.ops.health_timeout = newer.ops.health_timeout;
    config.ops.liveness_ttl = newer.ops.liveness_ttl;
    config.lifecycle = newer.lifecycle.clone();
    config.log.level = newer.log.level.clone();
    state
        .metrics
        .config_reloads
        .get_or_create(&ops::metrics::ResultLabels { result: "applied" })
        .inc();
    tracing::info!(level = %config.log.level, role = %config.node.role, "configuration reloaded");
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

fn read_secret(source: &PassphraseSource, config_key: &str) -> anyhow::Result<Secret> {
    let bytes = source
        .read()
        .with_context(|| format!("reading {config_key}"))?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{config_key}: the secret is not UTF-8"))?;
    Ok(Secret::new(text.to_string()))
}

fn print_dev_banner(
    config: &Config,
    ops_served: &server::Served,
    channel: Option<&server::Served>,
    connect: &ConnectSettings,
    coresim_pid: Option<u32>,
) {
    let ops = ops_served.local_addr;
    println!();
    println!(
        "kunpay development node {} is running (pid {})",
        config.node.id,
        std::process::id()
    );
    if let Some(channel) = channel {
        println!(
            "  channel        http://{}/gateway/...  (institution DEMO)",
            channel.local_addr
        );
    }
    match (&config.core.amqp, coresim_pid) {
        (Some(amqp), Some(pid)) => println!(
            "  core banking   kunpay-coresim (pid {pid}, demo accounts) over the broker, queue {}",
            amqp.request_queue
        ),
        (Some(amqp), None) => println!(
            "  core banking   over the broker, queue {} (no kunpay-coresim started: none configured)",
            amqp.request_queue
        ),
        (None, _) => println!("  core banking   the in-process simulator (demo accounts)"),
    }
    println!("  ops listener   http://{ops}/  (/primary /health /readiness /metrics /status)");
    println!("  database       {} (embedded)", connect.display_target());
    if let Some(audit) = &config.audit {
        let pubkeys = config.source.with_file_name("pubkeys.toml");
        println!(
            "  message log    {}  (kunpay-audit verify {} --pubkeys {})",
            audit.dir.display(),
            audit.dir.display(),
            pubkeys.display()
        );
    }
    println!("  configuration  {}", config.source.display());
    println!("  try            curl -s http://{ops}/status ; kunpayctl status --ops http://{ops}");
    println!(
        "  stop           Ctrl-C, or kill -TERM {}; the embedded database stops with it",
        std::process::id()
    );
    println!();
}

/// `kunpayd --check-config` and `kunpayctl check-config`: the file, then what it points at
/// (key files and their permissions, passphrases, the service account). Every problem is
/// listed; nothing is started.
pub fn check_config(path: &Path) -> Result<Config, String> {
    let config = Config::load(path, Mode::Production).map_err(|e| e.to_string())?;
    let mut issues: Vec<ConfigIssue> = Vec::new();
    let mut issue = |key: &str, reason: String| {
        issues.push(ConfigIssue {
            key: key.to_string(),
            line: None,
            reason,
        })
    };
    match keyfile::load_private_key(
        &config.keys.sign_private,
        config.keys.sign_passphrase.as_ref(),
        "keys.sign_passphrase_file",
    ) {
        Ok(key) => {
            if let Err(e) = crate::crypto::sm2::Signer::new(&key, &config.keys.distinguishing_id) {
                issue("keys.distinguishing_id", e.to_string());
            }
        }
        Err(e) => issue("keys.sign_private", e.to_string()),
    }
    if let Some(audit) = &config.audit
        && let Err(e) = load_audit_key(audit)
    {
        issue("audit.sign_private", format!("{e:#}"));
    }
    if let Some(source) = &config.database.password
        && let Err(e) = source.read()
    {
        issue("database.password_file", e.to_string());
    }
    match nix::unistd::User::from_name(&config.service.user) {
        Ok(Some(_)) => {}
        Ok(None) => issue(
            "service.user",
            format!("user {:?} does not exist on this host", config.service.user),
        ),
        Err(e) => issue(
            "service.user",
            format!("cannot look up {:?}: {e}", config.service.user),
        ),
    }
    if let Some(group) = &config.service.group
        && !matches!(nix::unistd::Group::from_name(group), Ok(Some(_)))
    {
        issue(
            "service.group",
            format!("group {group:?} does not exist on this host"),
        );
    }
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(crate::config::ConfigErrors {
            file: path.to_path_buf(),
            issues,
        }
        .to_string())
    }
}
