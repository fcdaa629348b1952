//! kunpayd: the payment daemon. All behaviour lives in the library (`kunpay::daemon`); this
//! file only parses the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "kunpayd", version, about = "kunpay payment daemon")]
struct Args {
    /// Configuration file.
    #[arg(long, value_name = "PATH", default_value = kunpay::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration and what it points at (keys, users), print every problem, exit.
    #[arg(long)]
    check_config: bool,
    /// Run the cryptographic known-answer tests and exit (0 when they pass).
    #[arg(long)]
    self_test: bool,
    /// Development node: config, demo keys and an embedded PostgreSQL cluster in DIR.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "target/dev")]
    dev: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.self_test {
        return match kunpay::crypto::self_test() {
            Ok(()) => {
                println!(
                    "kunpayd {}: cryptographic self-test passed (SM2, SM3, SM4)",
                    env!("CARGO_PKG_VERSION")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kunpayd: cryptographic self-test FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.check_config {
        return match kunpay::daemon::check_config(&args.config) {
            Ok(_) => {
                println!("{}: configuration is valid", args.config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(kunpay::daemon::EXIT_CONFIG)
            }
        };
    }
    kunpay::daemon::run(kunpay::daemon::Options {
        config: args.config,
        dev_dir: args.dev,
    })
}
