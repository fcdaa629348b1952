//! kunpay-coresim: the core-banking simulator as a service on the message queue, for test, demo
//! and benchmark environments (never production). Exit codes: 0 stopped by SIGTERM/SIGINT,
//! 2 configuration error, 101 crashed on purpose (fault injection).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use kunpay::core::coresim::CoreSimService;
use kunpay::core::coresim_config::{self, CoresimConfig};
use kunpay::core::sim::CoreSimulator;

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
    /// Override [control] listen: the control endpoint's loopback host:port.
    #[arg(long, value_name = "ADDR")]
    control: Option<std::net::SocketAddr>,
}

/// The configuration file with the command line's overrides applied.
fn load(cli: &Cli) -> anyhow::Result<CoresimConfig> {
    let mut config = coresim_config::load(&cli.config)?;
    let faults = &mut config.faults;
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
    if let Some(control) = cli.control {
        anyhow::ensure!(
            control.ip().is_loopback(),
            "--control {control}: the control endpoint listens on loopback only"
        );
        config.control = Some(control);
    }
    Ok(config)
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
    let service = Arc::new(CoreSimService::start(
        runtime.handle().clone(),
        loaded.amqp,
        Arc::new(loaded.keys),
        ledger,
        loaded.faults,
    ));
    if let Some(address) = loaded.control {
        let listener = match runtime.block_on(tokio::net::TcpListener::bind(address)) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("kunpay-coresim: [control] listen = \"{address}\": {e}");
                return ExitCode::from(1);
            }
        };
        let (service, fence) = (service.clone(), loaded.query_fence);
        runtime.spawn(async move {
            if let Err(e) = kunpay::core::coresim_control::serve(listener, service, fence).await {
                tracing::error!("coresim: control endpoint stopped: {e}");
            }
        });
        tracing::info!(%address, "kunpay-coresim: control endpoint listening");
    }
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
